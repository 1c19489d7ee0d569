#!/usr/bin/env bash
# A CLI upgrade and rollback by hand, as docs/user-guide.md shows it: PostgreSQL 15 -> 18 behind
# PgBouncer, pgbench writing the whole time. Run after `cargo xtask setup`, as root (servers run
# as the unprivileged user pgshift). Prints each command and what pgshift said.
set -euo pipefail
cache=${PGSHIFT_CACHE:-/var/cache/pgshift}
pgshift=${PGSHIFT:-$(dirname "$0")/../target/debug/pgshift}
old_bin=$cache/pg/15/bin new_bin=$cache/pg/18/bin
dir=$(mktemp -d /tmp/pgshift-walkthrough.XXXXXX)
chmod 755 "$dir"
chown pgshift "$dir"
as_pgshift() { su pgshift -s /bin/bash -c "$*"; }
cleanup() {
  as_pgshift "$old_bin/pg_ctl -D $dir/old stop -m fast" >/dev/null 2>&1 || true
  as_pgshift "$new_bin/pg_ctl -D $dir/new stop -m fast" >/dev/null 2>&1 || true
  [ -f "$dir/pgbouncer.pid" ] && kill "$(cat "$dir/pgbouncer.pid")" 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT

password=$(head -c 12 /dev/urandom | base64 | tr -d '/+=')
echo "$password" > "$dir/pw" && chown pgshift "$dir/pw"
server() { # name bin port
  as_pgshift "$2/initdb -D $dir/$1 -U postgres --auth=scram-sha-256 --pwfile=$dir/pw" >/dev/null
  cat >> "$dir/$1/postgresql.conf" <<EOF
port = $3
listen_addresses = '127.0.0.1'
unix_socket_directories = '$dir'
wal_level = logical
EOF
  as_pgshift "$2/pg_ctl -D $dir/$1 -l $dir/$1.log start" >/dev/null
}
server old "$old_bin" 55432
server new "$new_bin" 55433
pgpass=$dir/pgpass
printf '127.0.0.1:*:*:postgres:%s\n127.0.0.1:6432:pgbouncer:admin:%s\n127.0.0.1:*:*:app:%s\n' \
  "$password" "$password" "$password" > "$pgpass"
chmod 600 "$pgpass"
export PGPASSFILE=$pgpass
psql() { "$new_bin/psql" -X -q -h 127.0.0.1 "$@"; }
psql -p 55432 -U postgres -d postgres -c "CREATE ROLE app LOGIN PASSWORD '$password'" -c "CREATE DATABASE app OWNER app"
"$new_bin/pgbench" -q -i -s 5 -h 127.0.0.1 -p 55432 -U app app 2>/dev/null
psql -p 55432 -U app -d app -c "ALTER TABLE pgbench_history ADD COLUMN id bigserial PRIMARY KEY"

cat > "$dir/pgbouncer.ini" <<EOF
[databases]
app = host=127.0.0.1 port=55432 dbname=app
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = 6432
unix_socket_dir =
auth_type = scram-sha-256
auth_file = $dir/userlist.txt
admin_users = admin
pool_mode = transaction
ignore_startup_parameters = extra_float_digits,options
pidfile = $dir/pgbouncer.pid
logfile = $dir/pgbouncer.log
EOF
printf '"admin" "%s"\n"app" "%s"\n' "$password" "$password" > "$dir/userlist.txt"
chown pgshift "$dir/pgbouncer.ini" "$dir/userlist.txt"
as_pgshift "$cache/pgbouncer/current/bin/pgbouncer -d $dir/pgbouncer.ini"
sleep 1

# The application: pgbench through PgBouncer for the whole walk-through.
"$new_bin/pgbench" -n -c 4 -T 40 -h 127.0.0.1 -p 6432 -U app app > "$dir/pgbench.out" 2>&1 &
load=$!

common=(--source postgres://postgres@127.0.0.1:55432/app --target postgres://postgres@127.0.0.1:55433/app
        --pg-bin-dir "$new_bin" --pgbouncer postgres://admin@127.0.0.1:6432/pgbouncer
        --pgbouncer-config "$dir/pgbouncer.ini")
say() { echo "\$ pgshift $1 …"; shift; "$pgshift" "$@" 2>&1 || echo "(exit $?)"; echo; }
sleep 3
say run run "${common[@]}"
say status status "${common[@]}"
sleep 3
say rollback rollback "${common[@]}"
say status status "${common[@]}"
sleep 3
say run run "${common[@]}"
wait "$load"
say cleanup cleanup "${common[@]}"
echo "pgbench through PgBouncer during all of it:"
grep -E 'number of (transactions actually processed|failed transactions)|latency average' "$dir/pgbench.out"
