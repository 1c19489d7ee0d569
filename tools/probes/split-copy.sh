#!/usr/bin/env bash
# Probe for the "big tables split" design (issue #14): is the initial copy of one big table
# faster when it is split over several row-filtered publications, each with its own
# subscription (one table sync worker each), than through one subscription (one worker for the
# table)? Compared in the same run with pg_dump -Fd -j2 | pg_restore -j2.
#
#   tools/probes/split-copy.sh [scale] [splits...]      e.g. tools/probes/split-copy.sh 30 1 2 4
#
# Needs: the lab's cached servers (cargo xtask setup): PostgreSQL 15 as source (row filters
# need a 15+ publisher), 18 as target with pg_dump/pg_restore/pgbench. Runs the servers as the
# unprivileged user $PROBE_USER (default pgshift) in a temporary directory, on loopback ports
# 55432/55433, and removes everything at the end.
set -euo pipefail

scale=${1:-30}
shift || true
splits=("${@:-1 2 4}")
cache=${PGSHIFT_CACHE:-/var/cache/pgshift}
source_bin=$cache/pg/15/bin
target_bin=$cache/pg/18/bin
user=${PROBE_USER:-pgshift}
dir=$(mktemp -d /tmp/split-copy.XXXXXX)
chown "$user" "$dir"

as_user() { runuser -u "$user" -- "$@"; }
src() { PGOPTIONS="-c client_min_messages=warning" "$target_bin/psql" -h 127.0.0.1 -p 55432 -U postgres -qAtX -v ON_ERROR_STOP=1 "$@"; }
tgt() { PGOPTIONS="-c client_min_messages=warning" "$target_bin/psql" -h 127.0.0.1 -p 55433 -U postgres -qAtX -v ON_ERROR_STOP=1 "$@"; }

start_server() { # name bin port
    as_user "$2/initdb" -D "$dir/$1" -U postgres -A trust >/dev/null
    cat >>"$dir/$1/postgresql.conf" <<CONF
port = $3
listen_addresses = '127.0.0.1'
unix_socket_directories = '$dir'
wal_level = logical
max_replication_slots = 20
max_wal_senders = 20
max_logical_replication_workers = 16
max_worker_processes = 24
max_sync_workers_per_subscription = 4
shared_buffers = 512MB
max_wal_size = 4GB
CONF
    as_user "$2/pg_ctl" -D "$dir/$1" -l "$dir/$1.log" -w start >/dev/null
}

stop_all() {
    as_user "$source_bin/pg_ctl" -D "$dir/source" -m fast stop >/dev/null 2>&1 || true
    as_user "$target_bin/pg_ctl" -D "$dir/target" -m fast stop >/dev/null 2>&1 || true
    rm -rf "$dir"
}
trap stop_all EXIT

start_server source "$source_bin" 55432
start_server target "$target_bin" 55433
"$target_bin/pgbench" -i -q -s "$scale" -h 127.0.0.1 -p 55432 -U postgres postgres >/dev/null 2>&1
src -c "ALTER TABLE pgbench_history ADD COLUMN id bigserial PRIMARY KEY"
echo "source: pgbench scale $scale, $(src -c "SELECT pg_size_pretty(pg_database_size('postgres'))")"

seconds_since() { echo "$(date +%s.%N) - $1" | bc; }

copy_by_subscriptions() { # splits
    local n=$1 conn="host=127.0.0.1 port=55432 user=postgres dbname=postgres"
    for s in $(tgt -c "SELECT subname FROM pg_subscription"); do tgt -c "DROP SUBSCRIPTION $s" 2>/dev/null; done
    for p in $(src -c "SELECT pubname FROM pg_publication"); do src -c "DROP PUBLICATION $p"; done
    tgt -c "DROP TABLE IF EXISTS pgbench_accounts, pgbench_branches, pgbench_tellers, pgbench_history"
    "$target_bin/pg_dump" -h 127.0.0.1 -p 55432 -U postgres --schema-only postgres | tgt >/dev/null
    tgt -c "CHECKPOINT"
    local end_aid started
    end_aid=$(src -c "SELECT max(aid) + 1 FROM pgbench_accounts")
    started=$(date +%s.%N)
    if [ "$n" = 1 ]; then
        src -c "CREATE PUBLICATION probe_all FOR ALL TABLES"
        tgt -c "CREATE SUBSCRIPTION probe_all CONNECTION '$conn' PUBLICATION probe_all" 2>/dev/null
    else
        src -c "CREATE PUBLICATION probe_rest FOR TABLE pgbench_branches, pgbench_tellers, pgbench_history"
        tgt -c "CREATE SUBSCRIPTION probe_rest CONNECTION '$conn' PUBLICATION probe_rest" 2>/dev/null
        for i in $(seq 0 $((n - 1))); do
            src -c "CREATE PUBLICATION probe_$i FOR TABLE pgbench_accounts
                    WHERE (aid >= $((end_aid * i / n)) AND aid < $((end_aid * (i + 1) / n)))"
            tgt -c "CREATE SUBSCRIPTION probe_$i CONNECTION '$conn' PUBLICATION probe_$i" 2>/dev/null
        done
    fi
    until [ "$(tgt -c "SELECT count(*) > 0 AND bool_and(srsubstate = 'r') FROM pg_subscription_rel")" = t ]; do
        sleep 0.2
    done
    echo "subscriptions, big table in $n: $(seconds_since "$started") s (rows $(tgt -c 'SELECT count(*) FROM pgbench_accounts'), load $(cut -d' ' -f1 /proc/loadavg))"
}

dump_restore_parallel() {
    tgt -c "DROP DATABASE IF EXISTS peer" -c "CREATE DATABASE peer"
    rm -rf "$dir/dump"
    local started
    started=$(date +%s.%N)
    "$target_bin/pg_dump" -h 127.0.0.1 -p 55432 -U postgres -Fd -j2 -f "$dir/dump" postgres
    "$target_bin/pg_restore" -h 127.0.0.1 -p 55433 -U postgres -j2 -d peer "$dir/dump"
    echo "pg_dump -j2 | pg_restore -j2: $(seconds_since "$started") s (load $(cut -d' ' -f1 /proc/loadavg))"
}

for round in 1 2; do
    echo "round $round"
    dump_restore_parallel
    for n in ${splits[*]}; do copy_by_subscriptions "$n"; done
done
