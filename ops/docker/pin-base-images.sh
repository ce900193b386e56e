#!/bin/sh
# Resolves the base images of ops/Dockerfile to digests and prints the build
# arguments that pin them, e.g.
#
#   docker build -f ops/Dockerfile $(ops/docker/pin-base-images.sh) --target backup .
#
# Needs a machine with registry access and docker buildx. The digest printed is
# the image index (multi-platform) digest, so the pin holds for every platform.
# Override the tags with RUST_IMAGE=... RUNTIME_IMAGE=... in the environment.
set -eu
cd "$(dirname "$0")/../.."

default_of() {
  sed -n "s/^ARG $1=//p" ops/Dockerfile | head -n1
}

for arg in RUST_IMAGE RUNTIME_IMAGE; do
  eval "ref=\${$arg:-}"
  [ -n "$ref" ] || ref=$(default_of "$arg")
  ref=${ref%@*}
  digest=$(docker buildx imagetools inspect "$ref" --format '{{json .Manifest.Digest}}' | tr -d '"')
  case "$digest" in
    sha256:*) printf -- '--build-arg %s=%s@%s ' "$arg" "$ref" "$digest" ;;
    *) echo "pin-base-images: no digest for $ref" >&2; exit 1 ;;
  esac
done
echo
