#!/usr/bin/env bash
# Start Debian's PostgreSQL (creating its cluster if the package did not) and create the
# kd-mlflow role and database. Idempotent. Used by `sudo make postgres` and by CI (.ci/run).
#
#   KD_PG_USER      role to create (kd_mlflow); LOGIN CREATEDB (the test pass creates a
#                   fresh database per session; `ALTER ROLE ... NOCREATEDB` on a team server)
#   KD_PG_DB        database owned by it (kd_mlflow): the team server's backend store
#   KD_PG_PASSWORD  its password; unset: a new role gets a random one, an existing role
#                   keeps its own when ~/.pgpass already has it
#
# The password goes to ~/.pgpass (mode 600) of the user who asked (SUDO_USER under sudo),
# where libpq finds it for kd-mlflow server, mlflow server and psql: no URI, log line or
# process list carries it. With --env, stdout gets `export KD_TEST_POSTGRES_URI=...`
# for the test pass; every message goes to stderr.
set -euo pipefail
start=$(date +%s.%N)
user=${KD_PG_USER:-kd_mlflow}
db=${KD_PG_DB:-kd_mlflow}
say() { echo "postgres-setup: $*" >&2; }
die() { echo "postgres-setup: error: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "needs root (it starts the cluster and acts as the postgres user): sudo make postgres"
command -v pg_lsclusters >/dev/null || die "PostgreSQL is not installed: apt-get install -y postgresql"
for name in "$user" "$db"; do
  [[ $name =~ ^[a-z_][a-z0-9_]*$ ]] || die "'$name' is not a plain lower-case identifier; choose another KD_PG_USER/KD_PG_DB"
done
as_postgres() { runuser -u postgres -- "$@"; }

version=$(ls /usr/lib/postgresql 2>/dev/null | sort -V | tail -1)
[ -n "$version" ] || die "no PostgreSQL server under /usr/lib/postgresql: apt-get install -y postgresql"
cluster() { pg_lsclusters -h | awk -v v="$version" -v f="$1" '$1 == v && $2 == "main" { print $f }'; }
if [ -z "$(cluster 1)" ]; then
  # The package creates 15/main on install, but not where an image disabled that.
  say "creating cluster $version/main"
  pg_createcluster "$version" main >&2
fi
port=$(cluster 3)
if [ "$(cluster 4)" != online ]; then
  # No systemd in containers: pg_ctlcluster starts the cluster directly; `service` is the fallback.
  say "starting PostgreSQL $version/main on port $port"
  pg_ctlcluster "$version" main start >&2 || service postgresql start >&2 \
    || die "PostgreSQL $version/main did not start; see /var/log/postgresql/postgresql-$version-main.log"
fi
pg_isready -q -h 127.0.0.1 -p "$port" -t 30 \
  || die "PostgreSQL $version/main does not accept connections on 127.0.0.1:$port (listen_addresses, pg_hba.conf)"
# apt-get may have upgraded the binaries under a running server without restarting it
# (policy-rc.d forbids that in containers); the old server then fails to load the new
# plpgsql.so, which MLflow's migrations need. Restart it onto the installed version.
running=$(as_postgres psql -X -p "$port" -d postgres -tAc "SHOW server_version" | awk '{ print $1 }')
installed=$("/usr/lib/postgresql/$version/bin/postgres" --version | awk '{ print $3 }')
if [ "$running" != "$installed" ]; then
  say "server $running is running but $installed is installed: restarting it"
  pg_ctlcluster "$version" main restart >&2
  pg_isready -q -h 127.0.0.1 -p "$port" -t 30 || die "PostgreSQL $version/main did not come back after the restart"
fi

home=${HOME:-$(getent passwd "$(id -un)" | cut -d: -f6)}
if [ -n "${SUDO_USER:-}" ] && [ "$SUDO_USER" != root ]; then home=$(getent passwd "$SUDO_USER" | cut -d: -f6); fi
pgpass="$home/.pgpass"
role_exists=$(as_postgres psql -X -p "$port" -d postgres -tAc "SELECT 1 FROM pg_roles WHERE rolname = '$user'")
password=${KD_PG_PASSWORD:-}
if [ -z "$password" ]; then
  if [ "$role_exists" = 1 ] && [ -f "$pgpass" ] && grep -q "^127\.0\.0\.1:$port:\*:$user:" "$pgpass"; then
    say "role $user exists and ~/.pgpass has its password: kept"
  else
    [ "$role_exists" = 1 ] && say "role $user exists but $pgpass has no password for it: setting a new one"
    password=$(head -c 24 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' | head -c 24)
  fi
fi

as_postgres psql -X -q -v ON_ERROR_STOP=1 -p "$port" -d postgres >&2 <<SQL
\set role '$user'
\set db '$db'
\set pw '${password//\'/\'\'}'
SELECT format('CREATE ROLE %I LOGIN CREATEDB', :'role')
  WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'role') \gexec
SELECT format('ALTER ROLE %I LOGIN CREATEDB PASSWORD %L', :'role', :'pw') WHERE :'pw' <> '' \gexec
SELECT format('CREATE DATABASE %I OWNER %I', :'db', :'role')
  WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'db') \gexec
SQL

if [ -n "$password" ]; then
  escaped=$(printf '%s' "$password" | sed 's/[\\:]/\\&/g')
  touch "$pgpass" && chmod 600 "$pgpass"
  grep -v -e "^127\.0\.0\.1:$port:\*:$user:" -e "^localhost:$port:\*:$user:" "$pgpass" > "$pgpass.tmp" || true
  printf '127.0.0.1:%s:*:%s:%s\nlocalhost:%s:*:%s:%s\n' "$port" "$user" "$escaped" "$port" "$user" "$escaped" >> "$pgpass.tmp"
  chmod 600 "$pgpass.tmp" && mv "$pgpass.tmp" "$pgpass"
  [ -n "${SUDO_USER:-}" ] && [ "$SUDO_USER" != root ] && chown "$SUDO_USER:" "$pgpass"
  say "password of $user written to $pgpass"
fi
PGPASSFILE=$pgpass psql -X -q -h 127.0.0.1 -p "$port" -U "$user" -d "$db" -tAc "SELECT 1" >/dev/null \
  || die "role $user cannot log in to $db over 127.0.0.1:$port with the password in $pgpass"

say "ready in $(awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }') s: PostgreSQL $version on 127.0.0.1:$port, role $user, database $db"
say "  team server:   kd-mlflow server --backend-store-uri postgresql://$user@127.0.0.1:$port/$db   (make server)"
say "  test pass:     KD_TEST_POSTGRES_URI=postgresql://$user@127.0.0.1:$port/postgres make test-postgres"
if [ "${1:-}" = --env ]; then
  echo "export KD_TEST_POSTGRES_URI=postgresql://$user@127.0.0.1:$port/postgres"
fi
