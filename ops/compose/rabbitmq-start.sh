#!/bin/bash
# compose.yaml's broker: RabbitMQ with ops/rabbitmq/definitions.json imported at
# boot (rabbitmq.conf), then
#   - each Baton user gets the password baton-init generated for it
#     (the definitions create them without one, so nobody can log in as them);
#   - a `guest` administrator is added back for local development only (a node
#     that imports definitions at boot creates no default user; the tests and
#     `cargo run` use guest/guest). The port is published on 127.0.0.1 only.
# The health check passes only once /tmp/baton-broker-ready exists.
set -euo pipefail

secrets=${BATON_SECRETS:-/run/baton}
ready=${BATON_BROKER_READY:-/tmp/baton-broker-ready}
rm -f "$ready"
docker-entrypoint.sh rabbitmq-server &
server=$!
# `docker stop`: stop the node cleanly (rabbitmqctl stop), then report how it ended.
stop() {
  rabbitmqctl -q stop >/dev/null 2>&1 || kill -TERM "$server" 2>/dev/null || true
  wait "$server"
}
trap 'stop; exit $?' TERM INT

until rabbitmq-diagnostics -q check_running >/dev/null 2>&1; do
  if ! kill -0 "$server" 2>/dev/null; then
    wait "$server"
    exit $?
  fi
  sleep 1
done
rabbitmqctl -q await_startup --timeout 120

for file in "$secrets"/broker/*.password; do
  user=$(basename "$file" .password)
  rabbitmqctl -q change_password "$user" "$(cat "$file")"
done
if ! rabbitmqctl -q list_users | grep -q '^guest[[:space:]]'; then
  rabbitmqctl -q add_user guest guest
fi
rabbitmqctl -q set_user_tags guest administrator
rabbitmqctl -q set_permissions -p / guest '.*' '.*' '.*'
touch "$ready"
echo "baton: broker users ready"
wait "$server"
