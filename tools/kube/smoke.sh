#!/usr/bin/env bash
# Smoke test of the control plane that build.sh makes: etcd, then kube-apiserver with TLS, client
# certificates, RBAC and service-account tokens, then kube-controller-manager and kube-scheduler,
# all on free 127.0.0.1 ports, like controller-runtime's envtest plus the two controllers.
# Needs only those binaries, openssl and curl. Every process is stopped on exit.
# Usage: smoke.sh [BIN_DIR]   (default: the directory build.sh prints; builds if needed)
# SMOKE_LOG_DIR=dir keeps the components' logs there.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
bin=${1:-$(bash "$here/build.sh" | tail -n1)}
for b in etcd kube-apiserver kube-controller-manager kube-scheduler; do
  [ -x "$bin/$b" ] || { echo "smoke: missing $bin/$b" >&2; exit 1; }
done
for c in openssl curl; do
  command -v "$c" >/dev/null || { echo "smoke: needs $c" >&2; exit 1; }
done

log() { printf 'smoke: %s\n' "$*"; }

work=$(mktemp -d "${TMPDIR:-/tmp}/pgshift-kube-smoke.XXXXXX")
pids=()

# True while the process runs (a dead child stays a zombie until reaped, and kill -0 succeeds).
running() {
  local _p _c state
  read -r _p _c state _ 2>/dev/null <"/proc/$1/stat" && [ "$state" != Z ]
}
# stop PID: TERM to the daemon's process group, up to 10 s for the daemon to exit, then KILL to
# the group, which also ends anything the daemon forked and left behind.
stop() {
  local i
  kill -TERM -- "-$1" 2>/dev/null
  for i in $(seq 100); do running "$1" || break; sleep 0.1; done
  kill -KILL -- "-$1" 2>/dev/null
  wait "$1" 2>/dev/null
}
cleanup() {
  local rc=$? i
  set +e
  trap - EXIT INT TERM
  # Reverse start order: clients go before the servers they talk to.
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do stop "${pids[i]}"; done
  wait 2>/dev/null
  if [ "$rc" != 0 ]; then
    for f in "$work"/*.log; do
      [ -f "$f" ] || continue
      printf '\n--- last lines of %s ---\n' "$(basename "$f")" >&2
      tail -n 25 "$f" >&2
    done
  fi
  if [ -n "${SMOKE_LOG_DIR:-}" ]; then mkdir -p "$SMOKE_LOG_DIR" && cp "$work"/*.log "$SMOKE_LOG_DIR"/; fi
  rm -rf "$work"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

fail() { echo "smoke: FAIL: $*" >&2; exit 1; }

# start NAME CMD...: runs CMD in a new session and so its own process group, which stop() ends
# whole; output to $work/NAME.log.
start() {
  local name=$1; shift
  setsid "$@" >"$work/$name.log" 2>&1 </dev/null &
  pids+=($!)
}

# Ports below Linux's ephemeral range, not listening now and not handed out before.
taken=" "
free_port() {
  local p
  while :; do
    p=$((20000 + RANDOM % 12000))
    case "$taken" in *" $p "*) continue ;; esac
    (: <>"/dev/tcp/127.0.0.1/$p") 2>/dev/null && continue
    taken+="$p "
    echo "$p"
    return
  done
}

# wait_for SECONDS WHAT CMD...: retries CMD until it succeeds; fails if a daemon died meanwhile.
wait_for() {
  local secs=$1 what=$2 pid i; shift 2
  for i in $(seq $((secs * 4))); do
    "$@" >/dev/null 2>&1 && return 0
    for pid in "${pids[@]}"; do running "$pid" || fail "a daemon exited while waiting for $what"; done
    sleep 0.25
  done
  fail "timed out after ${secs}s waiting for $what"
}

pki="$work/pki"
mkdir -p "$pki"
# new_ca NAME: an EC P-256 key and a self-signed one-day CA certificate.
new_ca() {
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 \
    -subj "/CN=pgshift-smoke-$1" -keyout "$pki/$1.key" -out "$pki/$1.crt" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
}
# sign NAME SUBJECT EXTENSIONS [CA]: an EC P-256 key and a one-day certificate signed by CA.
sign() {
  local ca=${4:-ca}
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -keyout "$pki/$1.key" -subj "$2" -out "$pki/$1.csr" 2>/dev/null
  printf '%s\n' "$3" >"$pki/$1.ext"
  openssl x509 -req -in "$pki/$1.csr" -CA "$pki/$ca.crt" -CAkey "$pki/$ca.key" -CAcreateserial \
    -days 1 -extfile "$pki/$1.ext" -out "$pki/$1.crt" 2>/dev/null
}

log "binaries: $bin"
log "generating CAs, serving, client and service-account keys with openssl"
new_ca ca
# A CA of its own for the front proxy (aggregation) client: the controller manager and scheduler
# read it from the apiserver to authenticate requests, and complain while it is missing.
new_ca front-proxy-ca
sign apiserver "/CN=kube-apiserver" "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth
subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc"
client_ext="basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=clientAuth"
# The organization system:masters is bound to cluster-admin by RBAC's bootstrap policy.
sign admin "/O=system:masters/CN=pgshift-admin" "$client_ext"
# Users the bootstrap policy grants the controller manager's and scheduler's roles to.
sign controller-manager "/CN=system:kube-controller-manager" "$client_ext"
sign scheduler "/CN=system:kube-scheduler" "$client_ext"
sign front-proxy-client "/CN=front-proxy-client" "$client_ext" front-proxy-ca
openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$pki/sa.key" 2>/dev/null
openssl pkey -in "$pki/sa.key" -pubout -out "$pki/sa.pub"

etcd_port=$(free_port)
etcd_peer_port=$(free_port)
api_port=$(free_port)
kcm_port=$(free_port)
sched_port=$(free_port)
api="https://127.0.0.1:$api_port"

# Plain HTTP on loopback, as envtest does; no fsync: the data is thrown away.
start etcd "$bin/etcd" \
  --name=smoke \
  --data-dir="$work/etcd" \
  --listen-client-urls="http://127.0.0.1:$etcd_port" \
  --advertise-client-urls="http://127.0.0.1:$etcd_port" \
  --listen-peer-urls="http://127.0.0.1:$etcd_peer_port" \
  --initial-advertise-peer-urls="http://127.0.0.1:$etcd_peer_port" \
  --initial-cluster="smoke=http://127.0.0.1:$etcd_peer_port" \
  --unsafe-no-fsync=true
wait_for 30 "etcd /health" sh -c "curl -sf http://127.0.0.1:$etcd_port/health | grep -q '\"health\":\"true\"'"
log "etcd $("$bin/etcd" --version | sed -n 's/^etcd Version: //p') healthy on 127.0.0.1:$etcd_port"

# --service-cluster-ip-range is only bookkeeping for Service objects; nothing is routed there.
# No endpoint reconciler: it would publish 127.0.0.1 as the "kubernetes" Service's endpoint, which
# validation refuses (loopback), logging an error every few seconds.
start kube-apiserver "$bin/kube-apiserver" \
  --etcd-servers="http://127.0.0.1:$etcd_port" \
  --bind-address=127.0.0.1 \
  --advertise-address=127.0.0.1 \
  --secure-port="$api_port" \
  --cert-dir="$work/apiserver-certs" \
  --tls-cert-file="$pki/apiserver.crt" \
  --tls-private-key-file="$pki/apiserver.key" \
  --client-ca-file="$pki/ca.crt" \
  --requestheader-client-ca-file="$pki/front-proxy-ca.crt" \
  --requestheader-allowed-names=front-proxy-client \
  --requestheader-username-headers=X-Remote-User \
  --requestheader-group-headers=X-Remote-Group \
  --requestheader-extra-headers-prefix=X-Remote-Extra- \
  --proxy-client-cert-file="$pki/front-proxy-client.crt" \
  --proxy-client-key-file="$pki/front-proxy-client.key" \
  --authorization-mode=RBAC \
  --service-account-issuer=https://kubernetes.default.svc.cluster.local \
  --service-account-key-file="$pki/sa.pub" \
  --service-account-signing-key-file="$pki/sa.key" \
  --service-cluster-ip-range=10.0.0.0/24 \
  --endpoint-reconciler-type=none \
  --allow-privileged=true \
  --profiling=false \
  --v=1

# curl as the admin user; acurl also fails on HTTP errors.
admin_curl() {
  curl -sS --max-time 10 --cacert "$pki/ca.crt" --cert "$pki/admin.crt" --key "$pki/admin.key" "$@"
}
acurl() { admin_curl --fail-with-body "$@"; }
wait_for 120 "kube-apiserver /readyz" sh -c "curl -sf --cacert '$pki/ca.crt' --cert '$pki/admin.crt' --key '$pki/admin.key' '$api/readyz' | grep -qx ok"
version=$(acurl "$api/version")
git_version=$(printf '%s' "$version" | sed -n 's/.*"gitVersion": *"\([^"]*\)".*/\1/p')
# The release stamped in at link time, as the binary reports it.
want=$("$bin/kube-apiserver" --version | sed -n 's/^Kubernetes //p')
[ "$git_version" = "$want" ] || fail "/version reports '$git_version', the binary says '$want': $version"
log "kube-apiserver on $api: /version gitVersion=$git_version, /readyz=$(acurl "$api/readyz")"
# RBAC is on: an authenticated user with no bindings is refused.
[ "$(admin_curl -o /dev/null -w '%{http_code}' -H 'Impersonate-User: nobody' "$api/api/v1/namespaces")" = 403 ] ||
  fail "RBAC did not refuse an unbound user"
log "RBAC refuses an unbound user (403), system:masters is allowed"

# kubeconfig NAME: a kubeconfig that authenticates with the client certificate pki/NAME.
kubeconfig() {
  cat >"$work/$1.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: smoke
  cluster: {server: "$api", certificate-authority: "$pki/ca.crt"}
users:
- name: $1
  user: {client-certificate: "$pki/$1.crt", client-key: "$pki/$1.key"}
contexts:
- name: smoke
  context: {cluster: smoke, user: $1}
current-context: smoke
EOF
  echo "$work/$1.kubeconfig"
}
kcm_kc=$(kubeconfig controller-manager)
sched_kc=$(kubeconfig scheduler)

start kube-controller-manager "$bin/kube-controller-manager" \
  --kubeconfig="$kcm_kc" \
  --authentication-kubeconfig="$kcm_kc" \
  --authorization-kubeconfig="$kcm_kc" \
  --bind-address=127.0.0.1 \
  --secure-port="$kcm_port" \
  --cert-dir="$work/kcm-certs" \
  --leader-elect=false \
  --use-service-account-credentials=true \
  --service-account-private-key-file="$pki/sa.key" \
  --root-ca-file="$pki/ca.crt" \
  --cluster-signing-cert-file="$pki/ca.crt" \
  --cluster-signing-key-file="$pki/ca.key" \
  --profiling=false \
  --v=1
start kube-scheduler "$bin/kube-scheduler" \
  --kubeconfig="$sched_kc" \
  --authentication-kubeconfig="$sched_kc" \
  --authorization-kubeconfig="$sched_kc" \
  --bind-address=127.0.0.1 \
  --secure-port="$sched_port" \
  --cert-dir="$work/scheduler-certs" \
  --leader-elect=false \
  --profiling=false \
  --v=1

# Their own serving certificates are self-signed, hence -k; /healthz is open to anonymous users.
wait_for 60 "kube-controller-manager /healthz" sh -c "curl -skf https://127.0.0.1:$kcm_port/healthz | grep -qx ok"
log "kube-controller-manager healthy on 127.0.0.1:$kcm_port"
wait_for 60 "kube-scheduler /healthz" sh -c "curl -skf https://127.0.0.1:$sched_port/healthz | grep -qx ok"
log "kube-scheduler healthy on 127.0.0.1:$sched_port"

# The controller manager works: its service-account controller creates "default" in each namespace.
wait_for 60 "serviceaccount default/default" acurl "$api/api/v1/namespaces/default/serviceaccounts/default"
log "controller manager created serviceaccount default/default"

# Service-account tokens are signed and accepted: a token for default/default authenticates as
# that service account, which RBAC does not let list pods.
token=$(acurl -X POST -H 'Content-Type: application/json' \
  -d '{"apiVersion":"authentication.k8s.io/v1","kind":"TokenRequest","spec":{}}' \
  "$api/api/v1/namespaces/default/serviceaccounts/default/token" |
  sed -n 's/.*"token": *"\([^"]*\)".*/\1/p')
[ -n "$token" ] || fail "no service-account token issued"
whoami=$(curl -sS --max-time 10 --cacert "$pki/ca.crt" -H "Authorization: Bearer $token" \
  -H 'Content-Type: application/json' -X POST \
  -d '{"apiVersion":"authentication.k8s.io/v1","kind":"SelfSubjectReview"}' \
  "$api/apis/authentication.k8s.io/v1/selfsubjectreviews")
printf '%s' "$whoami" | grep -q '"username": *"system:serviceaccount:default:default"' ||
  fail "service-account token not accepted: $whoami"
code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 10 --cacert "$pki/ca.crt" \
  -H "Authorization: Bearer $token" "$api/api/v1/namespaces/default/pods")
[ "$code" = 403 ] || fail "service account listing pods got HTTP $code, want 403"
log "service-account token authenticates as system:serviceaccount:default:default (listing pods: 403)"

# The scheduler works: with no nodes it marks a new pod unschedulable.
acurl -o /dev/null -X POST -H 'Content-Type: application/json' \
  -d '{"apiVersion":"v1","kind":"Pod","metadata":{"name":"smoke"},"spec":{"containers":[{"name":"c","image":"smoke.invalid/none"}]}}' \
  "$api/api/v1/namespaces/default/pods"
wait_for 60 "the scheduler to mark pod default/smoke unschedulable" \
  sh -c "curl -sf --cacert '$pki/ca.crt' --cert '$pki/admin.crt' --key '$pki/admin.key' '$api/api/v1/namespaces/default/pods/smoke' | grep -q '\"reason\": *\"Unschedulable\"'"
log "scheduler marked pod default/smoke Unschedulable (no nodes)"

[ "$(acurl "$api/readyz")" = ok ] || fail "kube-apiserver /readyz not ok at the end"
acurl "$api/readyz?verbose" | tail -n1 | sed 's/^/smoke: \/readyz?verbose: /'
log "PASS: Kubernetes $git_version control plane with etcd on 127.0.0.1"
