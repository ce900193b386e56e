#!/bin/sh
# compose.yaml's one-shot `baton-init`: creates the local stack's secrets and the
# per-process configuration files in the `baton-secrets` volume, once. Later runs
# find them and change nothing (delete the volume to start over:
# `docker compose down -v`).
#
# What it writes under $OUT (default /run/baton):
#   broker/<user>.password     RabbitMQ passwords, read by the rabbitmq service
#   amqp-<user>.url            broker URLs (referenced as file:...)
#   database.url, pg-admin.url, shop-<zone>.url
#                              PostgreSQL URLs (the local server trusts, so
#                              they carry no password; still passed by reference)
#   webhook.secret             the CI webhook's HMAC key
#   <process>.key              Ed25519 signing keys (`baton keygen`)
#   backup-<zone>.age          age identities (`baton-backup --keygen`)
#   terraform-state.url        Terraform's state database (`pg` backend)
#   <process>.toml             --config of each process: the keys it trusts,
#                              the databases it serves, backup recipients, and
#                              for profile `seed`'s daemons where the site
#                              folder's files are and the site's accounts
#
# Everything else each process needs is in compose.yaml's BATON_* environment.
# The site's accounts come from this script's environment (compose passes them
# from the shell or .env): SITE_TRANSIP_LOGIN, SITE_LB_HTTPS and SITE_LB_HTTP
# (the load balancer, host:port), SITE_ACME_DIRECTORY, SITE_ACME_CONTACT,
# SITE_CDN_STORAGE_ZONE, SITE_CDN_PULL_ZONE_ID and SITE_CDN_EDGE. Left
# empty, the daemon that needs one refuses to start and names its key.
# Runs as root so it can give each file to its reader: uid 10001 (the Baton
# images' user) and uid 999 (the rabbitmq image's user).
set -eu

OUT=${OUT:-/run/baton}
BATON_UID=${BATON_UID:-10001}
RABBITMQ_UID=${RABBITMQ_UID:-999}
ZONES=${ZONES:-staging production}
SERVICE=${SERVICE:-shop-api}
SITE=${SITE:-/run/baton-site}

if [ -f "$OUT/.initialized" ]; then
  echo "baton-init: $OUT already initialised; nothing to do"
  exit 0
fi
umask 077
mkdir -p "$OUT/broker"
# A half-finished earlier run leaves no .initialized: start it over.
find "$OUT" -mindepth 1 -maxdepth 1 ! -name broker -exec rm -rf {} +
rm -f "$OUT"/broker/*

random_hex() {
  od -An -N24 -tx1 /dev/urandom | tr -d ' \n'
}

# Broker users of ops/rabbitmq/definitions.json and their URLs.
for user in baton-scheduler baton-ci baton-daemon-ci $(for z in $ZONES; do echo "baton-daemon-$z"; done); do
  password=$(random_hex)
  printf '%s\n' "$password" > "$OUT/broker/$user.password"
  printf 'amqp://%s:%s@rabbitmq:5672/%%2f\n' "$user" "$password" > "$OUT/amqp-$user.url"
done
chown -R "$RABBITMQ_UID:$RABBITMQ_UID" "$OUT/broker"

printf 'postgres://postgres@postgres:5432/baton\n' > "$OUT/database.url"
printf 'postgres://postgres@postgres:5432/postgres\n' > "$OUT/pg-admin.url"
for z in $ZONES; do
  printf 'postgres://postgres@postgres:5432/shop_%s\n' "$z" > "$OUT/shop-$z.url"
done
printf 'postgres://postgres@postgres:5432/terraform?sslmode=disable\n' > "$OUT/terraform-state.url"
random_hex > "$OUT/webhook.secret"

# Signing keys: the scheduler trusts every daemon, every daemon the scheduler.
scheduler_pub=$(baton keygen --out "$OUT/scheduler.key")
daemon_pubs=""
# Every daemon compose runs, as <role>-<zone>.
DAEMONS="container-build-ci infrastructure-staging infrastructure-production \
staging-verify-staging production-apply-production network-production cdn-production"
for z in $ZONES; do DAEMONS="$DAEMONS db-migration-$z backup-$z"; done
for d in $DAEMONS; do
  pub=$(baton keygen --out "$OUT/$d.key")
  daemon_pubs="$daemon_pubs\"$pub\", "
done

cat > "$OUT/scheduler.toml" <<TOML
# Written by ops/compose/init.sh.
[signing]
key_file = "$OUT/scheduler.key"
trusted = [${daemon_pubs%, }]
TOML

for z in $ZONES; do
  cat > "$OUT/db-migration-$z.toml" <<TOML
# Written by ops/compose/init.sh.
[signing]
key_file = "$OUT/db-migration-$z.key"
trusted = ["$scheduler_pub"]

[migration.databases]
"$SERVICE" = "file:$OUT/shop-$z.url"
TOML

  recipient=$(baton-backup --keygen "$OUT/backup-$z.age")
  cat > "$OUT/backup-$z.toml" <<TOML
# Written by ops/compose/init.sh.
[signing]
key_file = "$OUT/backup-$z.key"
trusted = ["$scheduler_pub"]

[backup]
recipients = ["$recipient"]
identity_file = "$OUT/backup-$z.age"

[backup.databases]
"$SERVICE" = "file:$OUT/shop-$z.url"
TOML
done

signing() {
  printf '# Written by ops/compose/init.sh.\n[signing]\nkey_file = "%s"\ntrusted = ["%s"]\n\n' \
    "$OUT/$1.key" "$scheduler_pub"
}

# Profile `seed`: the other six roles, reaching the site through $SITE.
{ signing container-build-ci; cat <<TOML
[build.containerd]
address = "/run/containerd/containerd.sock"

[build.scan]
command = ["$SITE/bin/trivy", "image", "--input", "{layout}", "--format", "json", "--scanners", "vuln,secret", "--quiet"]
sbom_command = ["$SITE/bin/trivy", "image", "--input", "{layout}", "--format", "cyclonedx", "--quiet"]
config_command = ["$SITE/bin/trivy", "config", "--format", "json", "--quiet", "--skip-check-update", "{dockerfile}"]
TOML
} > "$OUT/container-build-ci.toml"

for z in staging production; do
  { signing "infrastructure-$z"; cat <<TOML
[infrastructure]
terraform = "$SITE/bin/terraform"
TOML
  } > "$OUT/infrastructure-$z.toml"
done

{ signing staging-verify-staging; cat <<TOML
[verify]
kubeconfig = "$SITE/kubeconfig-staging"
namespace = "{service}"
TOML
} > "$OUT/staging-verify-staging.toml"

{ signing production-apply-production; cat <<TOML
[apply]
kubeconfig = "$SITE/kubeconfig-production"
namespace = "{service}"
TOML
} > "$OUT/production-apply-production.toml"

{ signing network-production; cat <<TOML
[network]
kubeconfig = "$SITE/kubeconfig-production"
namespaces = ["$SERVICE"]

[network.transip]
login = "${SITE_TRANSIP_LOGIN:-}"
private_key = "file:$SITE/transip.key"

[network.acme]
directory_url = "${SITE_ACME_DIRECTORY:-https://acme-v02.api.letsencrypt.org/directory}"
contact = [${SITE_ACME_CONTACT:+\"$SITE_ACME_CONTACT\"}]

[network.load_balancer]
${SITE_LB_HTTPS:+https = \"$SITE_LB_HTTPS\"}
${SITE_LB_HTTP:+http = \"$SITE_LB_HTTP\"}
TOML
} > "$OUT/network-production.toml"

{ signing cdn-production; cat <<TOML
[cdn]
api_key = "file:$SITE/bunny-api-key"

[cdn.services.$SERVICE]
storage_zone = "${SITE_CDN_STORAGE_ZONE:-}"
storage_password = "file:$SITE/bunny-storage-password"
pull_zone_id = ${SITE_CDN_PULL_ZONE_ID:-0}
edge_url = "${SITE_CDN_EDGE:-}"
TOML
} > "$OUT/cdn-production.toml"

for f in "$OUT"/*; do
  [ "$f" = "$OUT/broker" ] || chown "$BATON_UID:$BATON_UID" "$f"
done
chown "$BATON_UID:$BATON_UID" "$OUT"
chmod 0755 "$OUT" "$OUT/broker"
touch "$OUT/.initialized"
echo "baton-init: wrote secrets and configuration to $OUT"
