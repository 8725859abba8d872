#!/usr/bin/env bash
# A real Kubernetes API server for the tests: etcd + kube-apiserver, both built from
# their Go modules (tests/k8s/etcd, tests/k8s/apiserver), listening on 127.0.0.1 only.
# No kubelet, controller-manager or scheduler runs.
#
#   tests/scripts/k8s.sh build    # go build both binaries into the cache (skipped when there)
#   tests/scripts/k8s.sh start    # start etcd + kube-apiserver (idempotent), wait for /readyz
#   tests/scripts/k8s.sh env      # print `export FSB_K8S_...=...` lines; writes the kubeconfig
#   tests/scripts/k8s.sh stop     # stop kube-apiserver, then etcd; verify; remove the state
#   tests/scripts/k8s.sh status
#
# Run directory: ${FSB_TEST_RUN_DIR:-/tmp/fsb-test}/k8s (certificates, tokens, etcd data,
# logs, pid files, kubeconfig); `stop` removes it. Binaries: ${FSB_K8S_CACHE_DIR:-
# /var/cache/fast-sandbox/k8s}/<kubernetes version>-etcd-<etcd version>-<source hash>/.
#
# Authentication is a static token file: FSB_K8S_TOKEN is user fsb-admin in group
# system:masters, FSB_K8S_USER_TOKEN is user fsb-user with no RBAC bindings at all.
# Privileged pods are allowed (--allow-privileged), as on any cluster that runs
# fast-sandbox: agent pods and the janitor drive the node's containerd.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
SRC_DIR="$REPO_ROOT/tests/k8s"
RUN_DIR="${FSB_TEST_RUN_DIR:-/tmp/fsb-test}"
K8S_DIR="$RUN_DIR/k8s"
CACHE_ROOT="${FSB_K8S_CACHE_DIR:-/var/cache/fast-sandbox/k8s}"
START_TIMEOUT="${FSB_K8S_START_TIMEOUT:-90}"

PKI="$K8S_DIR/pki"
TOKENS="$K8S_DIR/tokens.csv"
STATE="$K8S_DIR/state.env" # ports of the running pair, sourced:
ETCD_CLIENT_PORT="" API_PORT=""
KUBECONFIG_FILE="$K8S_DIR/kubeconfig"
ETCD_DATA="$K8S_DIR/etcd-data"
ETCD_PIDFILE="$K8S_DIR/etcd.pid"
ETCD_LOG="$K8S_DIR/etcd.log"
API_PIDFILE="$K8S_DIR/kube-apiserver.pid"
API_LOG="$K8S_DIR/kube-apiserver.log"
API_CERT_DIR="$K8S_DIR/apiserver-certs" # its --cert-dir; never /var/run/kubernetes

log() { echo "k8s.sh: $*" >&2; }

# The version a go.mod requires for a module.
mod_version() {
  awk -v m="$2" '$1 == m && $2 ~ /^v/ { print $2; exit } $1 == "require" && $2 == m { print $3; exit }' "$1"
}

K8S_VERSION="$(mod_version "$SRC_DIR/apiserver/go.mod" k8s.io/kubernetes)"
ETCD_VERSION="$(mod_version "$SRC_DIR/etcd/go.mod" go.etcd.io/etcd/server/v3)"
# The sources' hash keeps a changed main.go or go.sum from reusing an old build.
SRC_HASH="$(cat "$SRC_DIR"/etcd/{go.mod,go.sum,main.go} "$SRC_DIR"/apiserver/{go.mod,go.sum,main.go} |
  sha256sum | cut -c1-12)"
BIN_DIR="$CACHE_ROOT/$K8S_VERSION-etcd-$ETCD_VERSION-$SRC_HASH"
ETCD_BIN="$BIN_DIR/etcd"
API_BIN="$BIN_DIR/kube-apiserver"

# --- build ------------------------------------------------------------------------
build() {
  if [[ -x "$ETCD_BIN" && -x "$API_BIN" ]]; then
    log "binaries present in $BIN_DIR (kubernetes $K8S_VERSION, etcd $ETCD_VERSION)"
    return 0
  fi
  # Go (>= 1.26, see the go.mod files) comes with the machine in /usr/local/go.
  command -v go >/dev/null || [[ ! -x /usr/local/go/bin/go ]] || export PATH="$PATH:/usr/local/go/bin"
  command -v go >/dev/null || { log "go is not installed (need Go >= 1.26)"; return 1; }
  mkdir -p "$BIN_DIR"
  local start=$SECONDS
  log "building etcd $ETCD_VERSION and kube-apiserver $K8S_VERSION into $BIN_DIR"
  # No VCS stamping: the binaries depend on the modules only.
  (cd "$SRC_DIR/etcd" && go build -buildvcs=false -o "$ETCD_BIN.tmp" .)
  mv -f "$ETCD_BIN.tmp" "$ETCD_BIN"
  log "etcd built after $((SECONDS - start))s"
  (cd "$SRC_DIR/apiserver" && go build -buildvcs=false -o "$API_BIN.tmp" .)
  mv -f "$API_BIN.tmp" "$API_BIN"
  log "build took $((SECONDS - start))s"
}

# --- processes --------------------------------------------------------------------
pid_alive() { [[ -n "${1:-}" ]] && kill -0 "$1" 2>/dev/null; }

# The pid in a pid file, if that process is still one of ours (its command line names
# our run directory).
our_pid() {
  local pid
  pid="$(cat "$1" 2>/dev/null || true)"
  if pid_alive "$pid" && tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline" | grep -qF -- "$K8S_DIR/"; then
    echo "$pid"
  fi
}

# Every process of ours, with or without a pid file: etcd names our data dir, the
# apiserver our cert dir.
our_procs() {
  pgrep -f -- "--data-dir=$ETCD_DATA( |$)" || true
  pgrep -f -- "--cert-dir=$API_CERT_DIR( |$)" || true
}

# TERM, then KILL after a deadline; returns when all are gone.
kill_pids() {
  [[ $# -gt 0 ]] || return 0
  kill -TERM "$@" 2>/dev/null || true
  local deadline=$((SECONDS + 15)) p alive
  while :; do
    alive=()
    for p in "$@"; do pid_alive "$p" && alive+=("$p"); done
    [[ ${#alive[@]} -eq 0 ]] && return 0
    if ((SECONDS >= deadline)); then
      log "killing ${alive[*]} (no exit within 15s of SIGTERM)"
      kill -KILL "${alive[@]}" 2>/dev/null || true
      sleep 0.2
      return 0
    fi
    sleep 0.05
  done
}

# A TCP port on 127.0.0.1 nobody listens on (and not already handed out here).
TAKEN_PORTS=" "
free_port() {
  local port listening
  listening=" $(ss -Htln 2>/dev/null | awk '{ n = split($4, a, ":"); printf "%s ", a[n] }')"
  while :; do
    port=$((20000 + RANDOM % 40000))
    [[ "$listening" == *" $port "* || "$TAKEN_PORTS" == *" $port "* ]] && continue
    TAKEN_PORTS+="$port "
    echo "$port"
    return 0
  done
}

# --- certificates and tokens --------------------------------------------------------
write_pki() {
  [[ -s "$PKI/ca.crt" && -s "$PKI/apiserver.crt" && -s "$PKI/sa.key" && -s "$TOKENS" ]] && return 0
  mkdir -p "$PKI"
  openssl genrsa -out "$PKI/ca.key" 2048 2>/dev/null
  openssl req -x509 -new -key "$PKI/ca.key" -sha256 -days 3650 -subj "/CN=fsb-test-ca" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -out "$PKI/ca.crt"
  openssl genrsa -out "$PKI/apiserver.key" 2048 2>/dev/null
  openssl req -new -key "$PKI/apiserver.key" -subj "/CN=kube-apiserver" -out "$PKI/apiserver.csr"
  cat >"$PKI/apiserver.ext" <<'EOF'
basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=IP:127.0.0.1,IP:10.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local
EOF
  openssl x509 -req -in "$PKI/apiserver.csr" -CA "$PKI/ca.crt" -CAkey "$PKI/ca.key" \
    -CAcreateserial -days 3650 -sha256 -extfile "$PKI/apiserver.ext" -out "$PKI/apiserver.crt" 2>/dev/null
  # Service-account token signing key pair.
  openssl genrsa -out "$PKI/sa.key" 2048 2>/dev/null
  openssl rsa -in "$PKI/sa.key" -pubout -out "$PKI/sa.pub" 2>/dev/null
  chmod 0600 "$PKI"/*.key
  # Static tokens: token,user,uid,"groups".
  local admin user
  admin="$(openssl rand -hex 24)"
  user="$(openssl rand -hex 24)"
  umask 077
  printf '%s,fsb-admin,fsb-admin,"system:masters"\n%s,fsb-user,fsb-user\n' "$admin" "$user" >"$TOKENS"
}

admin_token() { awk -F, '$2 == "fsb-admin" { print $1 }' "$TOKENS"; }
user_token() { awk -F, '$2 == "fsb-user" { print $1 }' "$TOKENS"; }

# --- start ------------------------------------------------------------------------
etcd_healthy() {
  # shellcheck disable=SC1090
  (source "$STATE" && curl -fsS -m 2 "http://127.0.0.1:$ETCD_CLIENT_PORT/health" 2>/dev/null | grep -q '"health":"true"')
}

api_ready() {
  # shellcheck disable=SC1090
  (source "$STATE" && curl -fsS -m 3 --cacert "$PKI/ca.crt" -H "Authorization: Bearer $(admin_token)" \
    "https://127.0.0.1:$API_PORT/readyz" >/dev/null 2>&1)
}

# Waits for `check` while `pid` lives; prints the log tail and fails otherwise.
wait_for() {
  local what="$1" pid="$2" logf="$3" check="$4" deadline=$((SECONDS + START_TIMEOUT))
  until "$check"; do
    if ! pid_alive "$pid"; then
      log "$what exited during start; last log lines ($logf):"
      tail -n 40 "$logf" >&2
      return 1
    fi
    if ((SECONDS >= deadline)); then
      log "$what was not ready within ${START_TIMEOUT}s; last log lines ($logf):"
      tail -n 40 "$logf" >&2
      return 1
    fi
    sleep 0.2
  done
}

start() {
  local etcd_pid api_pid
  etcd_pid="$(our_pid "$ETCD_PIDFILE")"
  api_pid="$(our_pid "$API_PIDFILE")"
  if [[ -n "$etcd_pid" && -n "$api_pid" && -f "$STATE" ]] && api_ready; then
    log "already running (etcd pid $etcd_pid, kube-apiserver pid $api_pid)"
    return 0
  fi
  if [[ -n "$(our_procs)" ]]; then
    log "stopping a half-running or stale pair first"
    stop_procs
  fi
  build
  write_pki
  mkdir -p "$ETCD_DATA" "$API_CERT_DIR"

  local etcd_client etcd_peer api_port
  etcd_client="$(free_port)"
  etcd_peer="$(free_port)"
  api_port="$(free_port)"
  printf 'ETCD_CLIENT_PORT=%s\nETCD_PEER_PORT=%s\nAPI_PORT=%s\n' "$etcd_client" "$etcd_peer" "$api_port" >"$STATE"

  for f in "$ETCD_LOG" "$API_LOG"; do [[ ! -f "$f" ]] || mv -f "$f" "$f.1"; done
  # setsid: a Ctrl-C to the test run reaches the cleanup trap, not these directly.
  # --unsafe-no-fsync: test data, speed over durability.
  setsid "$ETCD_BIN" \
    --name=fsb-test \
    --data-dir="$ETCD_DATA" \
    --listen-client-urls="http://127.0.0.1:$etcd_client" \
    --advertise-client-urls="http://127.0.0.1:$etcd_client" \
    --listen-peer-urls="http://127.0.0.1:$etcd_peer" \
    --initial-advertise-peer-urls="http://127.0.0.1:$etcd_peer" \
    --initial-cluster="fsb-test=http://127.0.0.1:$etcd_peer" \
    --unsafe-no-fsync \
    --log-level=warn \
    >>"$ETCD_LOG" 2>&1 </dev/null &
  etcd_pid=$!
  echo "$etcd_pid" >"$ETCD_PIDFILE"
  if ! wait_for etcd "$etcd_pid" "$ETCD_LOG" etcd_healthy; then
    stop_procs
    return 1
  fi

  setsid "$API_BIN" \
    --bind-address=127.0.0.1 \
    --advertise-address=127.0.0.1 \
    --secure-port="$api_port" \
    --cert-dir="$API_CERT_DIR" \
    --tls-cert-file="$PKI/apiserver.crt" \
    --tls-private-key-file="$PKI/apiserver.key" \
    --client-ca-file="$PKI/ca.crt" \
    --token-auth-file="$TOKENS" \
    --authorization-mode=RBAC \
    --allow-privileged=true \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --service-account-key-file="$PKI/sa.pub" \
    --service-account-signing-key-file="$PKI/sa.key" \
    --etcd-servers="http://127.0.0.1:$etcd_client" \
    --service-cluster-ip-range=10.0.0.0/24 \
    --endpoint-reconciler-type=none \
    --profiling=false \
    >>"$API_LOG" 2>&1 </dev/null &
  api_pid=$!
  echo "$api_pid" >"$API_PIDFILE"
  if ! wait_for kube-apiserver "$api_pid" "$API_LOG" api_ready; then
    stop_procs
    return 1
  fi
  write_kubeconfig
  log "running (etcd pid $etcd_pid, kube-apiserver pid $api_pid, https://127.0.0.1:$api_port)"
}

# --- env --------------------------------------------------------------------------
write_kubeconfig() {
  # shellcheck disable=SC1090
  source "$STATE"
  umask 077
  cat >"$KUBECONFIG_FILE.tmp" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: fsb-test
  cluster:
    server: https://127.0.0.1:$API_PORT
    certificate-authority-data: $(base64 -w0 <"$PKI/ca.crt")
users:
- name: fsb-admin
  user:
    token: $(admin_token)
- name: fsb-user
  user:
    token: $(user_token)
contexts:
- name: fsb-admin
  context:
    cluster: fsb-test
    user: fsb-admin
- name: fsb-user
  context:
    cluster: fsb-test
    user: fsb-user
current-context: fsb-admin
EOF
  mv -f "$KUBECONFIG_FILE.tmp" "$KUBECONFIG_FILE"
}

print_env() {
  [[ -f "$STATE" && -f "$TOKENS" ]] || { log "not started (no $STATE)"; return 1; }
  write_kubeconfig
  # shellcheck disable=SC1090
  source "$STATE"
  echo "export FSB_K8S_SERVER='https://127.0.0.1:$API_PORT'"
  echo "export FSB_K8S_CA='$PKI/ca.crt'"
  echo "export FSB_K8S_TOKEN='$(admin_token)'"
  echo "export FSB_K8S_USER_TOKEN='$(user_token)'"
  echo "export FSB_KUBECONFIG='$KUBECONFIG_FILE'"
}

# --- stop -------------------------------------------------------------------------
stop_procs() {
  local api etcd
  # The apiserver first, so it does not spend its shutdown retrying a dead etcd.
  api="$( (our_pid "$API_PIDFILE"; pgrep -f -- "--cert-dir=$API_CERT_DIR( |$)" || true) | sort -u)"
  # shellcheck disable=SC2086
  kill_pids $api
  etcd="$( (our_pid "$ETCD_PIDFILE"; pgrep -f -- "--data-dir=$ETCD_DATA( |$)" || true) | sort -u)"
  # shellcheck disable=SC2086
  kill_pids $etcd
  rm -f "$API_PIDFILE" "$ETCD_PIDFILE"
}

stop() {
  stop_procs
  local left
  left="$(our_procs | sort -u)"
  if [[ -n "$left" ]]; then
    log "WARNING: processes survived the stop:"
    # shellcheck disable=SC2086
    ps -o pid,args -p "$(echo $left | tr ' ' ',')" >&2 || true
    return 1
  fi
  rm -rf "$K8S_DIR"
}

status() {
  local etcd_pid api_pid
  etcd_pid="$(our_pid "$ETCD_PIDFILE")"
  api_pid="$(our_pid "$API_PIDFILE")"
  if [[ -n "$etcd_pid" && -n "$api_pid" && -f "$STATE" ]] && api_ready; then
    # shellcheck disable=SC1090
    source "$STATE"
    echo "running etcd=$etcd_pid kube-apiserver=$api_pid server=https://127.0.0.1:$API_PORT"
  else
    echo "stopped"
    return 1
  fi
}

case "${1:-}" in
  build) build ;;
  start) start ;;
  stop) stop ;;
  env) print_env ;;
  status) status ;;
  versions) echo "kubernetes=$K8S_VERSION etcd=$ETCD_VERSION bin_dir=$BIN_DIR" ;;
  *)
    echo "usage: $0 build|start|stop|env|status|versions" >&2
    exit 64
    ;;
esac
