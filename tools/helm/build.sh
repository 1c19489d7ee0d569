#!/usr/bin/env bash
# Builds helm from its Go module, idempotently, into a cache outside the repository. Release
# binaries cannot be downloaded here; the Go module proxy can be reached. The chart tests
# (crates/operator/tests/chart.rs) run `helm lint` and `helm template` with it.
# Layout:
#   $cache/helm/<helm-version>/bin/helm
# Prints the bin directory on its last line. A cold build (empty Go caches) takes a few minutes
# on 2 cores; later runs take well under a second and start no go command.
set -euo pipefail

# Must be a version the module proxy serves; the chart tests expect this one.
HELM_VERSION=v3.22.0

if [ -n "${PGSHIFT_CACHE:-}" ]; then
  cache="$PGSHIFT_CACHE"
elif [ "$(id -u)" = 0 ]; then
  cache=/var/cache/pgshift
else
  cache="${XDG_CACHE_HOME:-$HOME/.cache}/pgshift"
fi
mkdir -p "$cache/helm"
chmod 755 "$cache" "$cache/helm" 2>/dev/null || true

log() { printf 'helm-build: %s\n' "$*" >&2; }

helm_dir="$cache/helm/$HELM_VERSION"

helm_done() { [ -x "$helm_dir/bin/helm" ]; }

setup_go() {
  command -v go >/dev/null 2>&1 || PATH="$PATH:/usr/local/go/bin"
  command -v go >/dev/null 2>&1 || { log "missing go: install Go 1.26 or newer"; exit 1; }
  # Static, host-native binary; a caller's GOFLAGS (-race, tags, ...) or a go.work above the
  # cache must not leak into the build. -mod=mod lets `go install pkg@version` resolve the
  # module's own requirements without a go.sum of ours.
  export CGO_ENABLED=0 GOWORK=off GOFLAGS=-mod=mod
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

build_helm() {
  local work="$helm_dir.partial"
  rm -rf "$work"
  mkdir -p "$work/bin"
  local gomod
  gomod=$(module_gomod "$work" "helm.sh/helm/v3@$HELM_VERSION")

  # What helm's Makefile stamps: the release (else `helm version` says only "v3.22") and the
  # Kubernetes version derived from its client-go (else `helm template` and the lint
  # deprecation checks assume Kubernetes v1.20).
  local client_go major minor
  client_go=$(awk '$1 == "k8s.io/client-go" { print $2; exit }' "$gomod")
  [ -n "$client_go" ] || { log "no k8s.io/client-go requirement in $gomod"; exit 1; }
  client_go=${client_go#v}
  major=$((${client_go%%.*} + 1))
  minor=${client_go#*.}
  minor=${minor%%.*}
  local ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
  ldflags+=" -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
  local pkg
  for pkg in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
    ldflags+=" -X $pkg.k8sVersionMajor=$major -X $pkg.k8sVersionMinor=$minor"
  done

  log "building helm $HELM_VERSION (Kubernetes v$major.$minor by default)"
  (
    cd "$work"
    GOBIN="$work/bin" go_nice install -trimpath -ldflags "$ldflags" \
      "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
  )
  "$work/bin/helm" version --template '{{.Version}}' | grep -qx "$HELM_VERSION" ||
    { log "built helm reports an unexpected version"; exit 1; }
  rm -rf "$helm_dir"
  mv "$work" "$helm_dir"
}

# One build at a time; a second caller waits and then finds the binary.
exec 9>"$cache/.helm-build.lock"
flock 9

if ! helm_done; then
  setup_go
  build_helm
  chmod -R a+rX "$helm_dir" 2>/dev/null || true
fi

log "ready: helm $HELM_VERSION in $helm_dir/bin"
echo "$helm_dir/bin"
