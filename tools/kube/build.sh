#!/usr/bin/env bash
# Builds the Kubernetes control plane (kube-apiserver, kube-controller-manager, kube-scheduler)
# and etcd from their Go modules, idempotently, into a cache outside the repository. Release
# binaries cannot be downloaded here; the Go module proxy can be reached.
# Layout:
#   $cache/kube/<k8s-version>/bin/{kube-apiserver,kube-controller-manager,kube-scheduler,etcd}
#   $cache/etcd/<etcd-version>/bin/etcd      (kube's bin/etcd is a symlink to it)
#   .../src/{go.mod,go.sum}                  (the scratch module each was built from)
# Prints the kube bin directory (all four binaries, like envtest's KUBEBUILDER_ASSETS) on its
# last line. A cold build (empty Go caches) took about 7 minutes on 2 idle cores, peaking at ~3 GB
# while two linkers ran; later runs take well under a second and start no go command.
set -euo pipefail

# Newest patches that the module proxy serves *and* the checksum database knows.
# `go list -m -versions k8s.io/kubernetes` lists only some tags; try `go mod download` on newer ones.
KUBE_VERSION=v1.36.4
ETCD_VERSION=v3.6.16

if [ -n "${PGSHIFT_CACHE:-}" ]; then
  cache="$PGSHIFT_CACHE"
elif [ "$(id -u)" = 0 ]; then
  cache=/var/cache/pgshift
else
  cache="${XDG_CACHE_HOME:-$HOME/.cache}/pgshift"
fi
mkdir -p "$cache/kube" "$cache/etcd"
chmod 755 "$cache" "$cache/kube" "$cache/etcd" 2>/dev/null || true

log() { printf 'kube-build: %s\n' "$*" >&2; }

KUBE_BINS=(kube-apiserver kube-controller-manager kube-scheduler)
kube_dir="$cache/kube/$KUBE_VERSION"
etcd_dir="$cache/etcd/$ETCD_VERSION"

kube_done() {
  local b
  for b in "${KUBE_BINS[@]}"; do [ -x "$kube_dir/bin/$b" ] || return 1; done
}
etcd_done() { [ -x "$etcd_dir/bin/etcd" ]; }

setup_go() {
  command -v go >/dev/null 2>&1 || PATH="$PATH:/usr/local/go/bin"
  command -v go >/dev/null 2>&1 || { log "missing go: install Go 1.26 or newer"; exit 1; }
  # Static, host-native binaries; a caller's GOFLAGS (-race, tags, ...) or a go.work above the
  # cache must not leak into the build. VCS stamping would look at whatever repo holds the cache.
  export CGO_ENABLED=0 GOWORK=off GOFLAGS=-buildvcs=false
  unset GOOS GOARCH
}

# Low priority: this shares 2 cores with other builds.
go_nice() { nice -n 19 go "$@"; }

# Field of `go mod download -json` output on stdin, e.g. GoMod or Error.
json_field() { sed -n "s/^[[:space:]]*\"$1\": \"\(.*\)\",\{0,1\}\$/\1/p" | head -n1; }

# Downloads module@version; prints the path of its go.mod in the module cache.
module_gomod() {
  local out err gomod
  out=$(cd "$1" && go mod download -json "$2" 2>&1) || true
  err=$(printf '%s\n' "$out" | json_field Error)
  gomod=$(printf '%s\n' "$out" | json_field GoMod)
  if [ -n "$err" ] || [ ! -f "$gomod" ]; then log "cannot fetch $2: ${err:-$out}"; exit 1; fi
  printf '%s\n' "$gomod"
}

# `go` line of a go.mod: the scratch module takes the dependency's language version (and so
# its default GODEBUG settings).
go_directive() { awk '$1 == "go" { print $2; exit }' "$1"; }

build_etcd() {
  local work="$etcd_dir.partial"
  rm -rf "$work"
  mkdir -p "$work/src" "$work/bin"
  local gomod
  gomod=$(module_gomod "$work/src" "go.etcd.io/etcd/server/v3@$ETCD_VERSION")
  # The module's root package is the etcd server's main.
  cat >"$work/src/go.mod" <<EOF
module pgshift.invalid/etcd-build

go $(go_directive "$gomod")

require go.etcd.io/etcd/server/v3 $ETCD_VERSION

tool go.etcd.io/etcd/server/v3
EOF
  log "building etcd $ETCD_VERSION"
  (
    cd "$work/src"
    go_nice mod tidy
    go_nice build -trimpath -o "$work/bin/etcd" \
      -ldflags "-s -w -X go.etcd.io/etcd/api/v3/version.GitSHA=$ETCD_VERSION" \
      go.etcd.io/etcd/server/v3
  )
  "$work/bin/etcd" --version | grep -q "etcd Version: ${ETCD_VERSION#v}\$" ||
    { log "built etcd reports an unexpected version"; exit 1; }
  rm -rf "$etcd_dir"
  mv "$work" "$etcd_dir"
}

build_kube() {
  local work="$kube_dir.partial"
  rm -rf "$work"
  mkdir -p "$work/src" "$work/bin"
  local gomod
  gomod=$(module_gomod "$work/src" "k8s.io/kubernetes@$KUBE_VERSION")

  # k8s.io/kubernetes requires its staging modules at v0.0.0 and replaces them with local
  # directories, which a dependent module ignores; pin each to the matching published v0.x.
  local staging="v0.${KUBE_VERSION#v1.}" m
  local -a mods
  mapfile -t mods < <(awk '$1 ~ /^k8s\.io\// && $2 == "v0.0.0" { print $1 }' "$gomod" | sort -u)
  [ ${#mods[@]} -gt 0 ] || { log "no staging modules found in $gomod"; exit 1; }
  {
    printf 'module pgshift.invalid/kube-build\n\ngo %s\n\n' "$(go_directive "$gomod")"
    printf 'require k8s.io/kubernetes %s\n\ntool (\n' "$KUBE_VERSION"
    for m in "${KUBE_BINS[@]}"; do printf '\tk8s.io/kubernetes/cmd/%s\n' "$m"; done
    printf ')\n\nreplace (\n'
    for m in "${mods[@]}"; do printf '\t%s => %s %s\n' "$m" "$m" "$staging"; done
    printf ')\n'
  } >"$work/src/go.mod"

  # What hack/lib/version.sh stamps, so /version and --version report the real release.
  local minor=${KUBE_VERSION#v1.}
  minor=${minor%%.*}
  local date
  date=$(sed -n 's/.*"Time":"\([^"]*\)".*/\1/p' "${gomod%.mod}.info" 2>/dev/null | sed 's/\.[0-9]*Z$/Z/')
  local ldflags="-s -w" pkg
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkg.gitVersion=$KUBE_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.gitCommit= -X $pkg.buildDate=${date:-1970-01-01T00:00:00Z}"
  done

  log "building ${KUBE_BINS[*]} $KUBE_VERSION (${#mods[@]} staging modules at $staging)"
  local -a pkgs=()
  for m in "${KUBE_BINS[@]}"; do pkgs+=("k8s.io/kubernetes/cmd/$m"); done
  (
    cd "$work/src"
    go_nice mod tidy
    # One invocation: the three commands share most packages.
    go_nice build -trimpath -o "$work/bin/" -ldflags "$ldflags" "${pkgs[@]}"
  )
  for m in "${KUBE_BINS[@]}"; do
    "$work/bin/$m" --version | grep -q "^Kubernetes $KUBE_VERSION\$" ||
      { log "built $m reports an unexpected version"; exit 1; }
  done
  rm -rf "$kube_dir"
  mv "$work" "$kube_dir"
}

# One build at a time; a second caller waits and then finds the binaries.
exec 9>"$cache/.kube-build.lock"
flock 9

if ! etcd_done || ! kube_done; then
  setup_go
  etcd_done || build_etcd
  kube_done || build_kube
  chmod -R a+rX "$etcd_dir" "$kube_dir" 2>/dev/null || true
fi

# envtest-style: one directory with every binary. Replaced atomically, as ETCD_VERSION may change.
ln -sfn "../../../etcd/$ETCD_VERSION/bin/etcd" "$kube_dir/bin/.etcd.tmp"
mv -fT "$kube_dir/bin/.etcd.tmp" "$kube_dir/bin/etcd"
[ -x "$kube_dir/bin/etcd" ] || { log "etcd link broken in $kube_dir/bin"; exit 1; }

log "ready: Kubernetes $KUBE_VERSION and etcd $ETCD_VERSION in $kube_dir/bin"
echo "$kube_dir/bin"
