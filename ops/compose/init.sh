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
#   <process>.toml             --config of each process: the keys it trusts,
#                              the databases it serves, backup recipients
#
# Everything else each process needs is in compose.yaml's BATON_* environment.
# Runs as root so it can give each file to its reader: uid 10001 (the Baton
# images' user) and uid 999 (the rabbitmq image's user).
set -eu

OUT=${OUT:-/run/baton}
BATON_UID=${BATON_UID:-10001}
RABBITMQ_UID=${RABBITMQ_UID:-999}
ZONES=${ZONES:-staging production}
SERVICE=${SERVICE:-shop-api}

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
for user in baton-scheduler baton-ci $(for z in $ZONES; do echo "baton-daemon-$z"; done); do
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
random_hex > "$OUT/webhook.secret"

# Signing keys: the scheduler trusts every daemon, every daemon the scheduler.
scheduler_pub=$(baton keygen --out "$OUT/scheduler.key")
daemon_pubs=""
for z in $ZONES; do
  for role in db-migration backup; do
    pub=$(baton keygen --out "$OUT/$role-$z.key")
    daemon_pubs="$daemon_pubs\"$pub\", "
  done
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

for f in "$OUT"/*; do
  [ "$f" = "$OUT/broker" ] || chown "$BATON_UID:$BATON_UID" "$f"
done
chown "$BATON_UID:$BATON_UID" "$OUT"
chmod 0755 "$OUT" "$OUT/broker"
touch "$OUT/.initialized"
echo "baton-init: wrote secrets and configuration to $OUT"
