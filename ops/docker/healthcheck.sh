#!/bin/bash
# Container health check: GET /healthz on the address this process serves.
#
#   BATON_HEALTHCHECK_URL     explicit http://host:port/path (wins if set)
#   BATON_DAEMON__HTTP_LISTEN a daemon's /healthz address
#   BATON_API__LISTEN         the scheduler's API address
#
# A wildcard listen address (0.0.0.0, [::]) is probed on 127.0.0.1. Exit 0 only
# for an HTTP 200. The runtime images carry no curl or wget, so this speaks
# HTTP/1.0 over bash's /dev/tcp.
set -u
# A server that answers and closes early must not kill us with SIGPIPE.
trap '' PIPE

url=${BATON_HEALTHCHECK_URL:-}
if [ -z "$url" ]; then
  listen=${BATON_DAEMON__HTTP_LISTEN:-${BATON_API__LISTEN:-}}
  if [ -z "$listen" ]; then
    echo "baton-healthcheck: neither BATON_DAEMON__HTTP_LISTEN nor BATON_API__LISTEN is set" >&2
    exit 1
  fi
  url="http://${listen}/healthz"
fi

rest=${url#http://}
if [ "$rest" = "$url" ]; then
  echo "baton-healthcheck: only http:// URLs are supported (got $url)" >&2
  exit 1
fi
hostport=${rest%%/*}
path=/${rest#*/}
[ "$hostport" = "$rest" ] && path=/
host=${hostport%:*}
port=${hostport##*:}
case "$host" in
  "" | 0.0.0.0 | "[::]" | "::") host=127.0.0.1 ;;
  \[*\]) host=${host#[}; host=${host%]} ;;
esac

if ! exec 3<>"/dev/tcp/${host}/${port}"; then
  echo "baton-healthcheck: cannot connect to ${host}:${port}" >&2
  exit 1
fi
printf 'GET %s HTTP/1.0\r\nHost: %s\r\nConnection: close\r\n\r\n' "$path" "$hostport" >&3
status_line=""
IFS= read -r -t 5 status_line <&3
exec 3<&- 3>&-
case "$status_line" in
  HTTP/1.[01]\ 200*) exit 0 ;;
  *)
    echo "baton-healthcheck: GET ${path} on ${host}:${port}: ${status_line:-no answer}" >&2
    exit 1
    ;;
esac
