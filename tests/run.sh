#!/usr/bin/env bash
# The test entry point: `tests/run.sh [lint|unit|containerd|k8s|all]` (default all).
#
#   lint        cargo fmt --check and cargo clippy -D warnings on every target
#   unit        cargo test for every crate except fsb-tests (no containerd needed)
#   containerd  a private containerd + the offline busybox OCI image + two local
#               registries holding it, then `cargo test -p fsb-tests` (needs root;
#               the setup and cleanup are scripts/with-containerd.sh)
#   k8s         a real kube-apiserver + etcd (built from their Go modules by
#               scripts/k8s.sh, cached under /var/cache/fast-sandbox/k8s) and smoke
#               checks against it (admin creates a namespace, an unprivileged user is
#               refused), then every tests/tests/k8s_*.rs with a private containerd
#
# Whatever it starts, it stops on exit (trap): containers and tasks, containerd, the
# shims that outlive it, and mounts under the run directory. A process that survives
# makes the run fail.
#
# Environment: FSB_K8S_TESTS (k8s suite: only these test files, e.g. "k8s_mtls"),
# FSB_TEST_RUN_DIR (default /tmp/fsb-test), FSB_TEST_CACHE_DIR (default
# /var/cache/fast-sandbox/test-images), CARGO_TARGET_DIR (default
# /var/cache/fast-sandbox/target); extra arguments after the suite go to `cargo test`.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
SCRIPTS="$REPO_ROOT/tests/scripts"

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/cache/fast-sandbox/target}"
# Test runs rebuild from clean clones: incremental state only fills the disk.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

# The shared target dir keeps every checkout's test executables (hundreds of MB each)
# and any incremental state: drop executables not touched for 4 hours before building
# (cargo relinks what it needs), so the cache cannot fill the disk run after run.
prune_target_cache() {
  local deps="$CARGO_TARGET_DIR/debug/deps"
  [[ -d "$deps" ]] || return 0
  find "$deps" -maxdepth 1 -type f -perm -u+x ! -name '*.so' -mmin +240 -delete 2>/dev/null || true
  rm -rf "$CARGO_TARGET_DIR/debug/incremental"
}
prune_target_cache
export FSB_TEST_RUN_DIR="${FSB_TEST_RUN_DIR:-/tmp/fsb-test}"

# Debian packages the suites need, each with the command that shows it is there
# (gcc: Rust's linker; libc6-dev: its static libc for the static fsb-init build;
# prometheus: the real scraper of tests/tests/local_metrics.rs).
PACKAGES=(
  containerd:containerd
  runc:runc
  crun:crun
  runsc:runsc
  busybox-static:
  protobuf-compiler:protoc
  libprotobuf-dev:
  skopeo:skopeo
  docker-registry:docker-registry
  apache2-utils:htpasswd
  openssl:openssl
  curl:curl
  iproute2:ss
  gcc:gcc
  libc6-dev:
  prometheus:prometheus
)

say() { echo "==> $*" >&2; }

# Every `cargo test` output goes through here so the run ends with one total line.
TEST_LOG="$(mktemp /tmp/fsb-run-tests.XXXXXX)"
cargo_test() {
  cargo test "$@" 2>&1 | tee -a "$TEST_LOG"
}

summarize() {
  awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
       END { printf "tests: %d passed, %d failed\n", p, f }' "$TEST_LOG"
  rm -f "$TEST_LOG"
}

ensure_packages() {
  if ! command -v cargo >/dev/null && [[ -x "$HOME/.cargo/bin/cargo" ]]; then
    export PATH="$HOME/.cargo/bin:$PATH"
  fi
  if ! command -v cargo >/dev/null; then
    # A fresh machine: install Rust (stable, minimal profile) with rustup.
    command -v curl >/dev/null || { apt-get update -qq && apt-get install -y -qq curl ca-certificates; }
    say "installing Rust with rustup (stable, minimal profile)"
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs |
      sh -s -- -y --profile minimal --default-toolchain stable --component rustfmt,clippy
    export PATH="$HOME/.cargo/bin:$PATH"
  fi
  local entry pkg missing=()
  for entry in "${PACKAGES[@]}"; do
    pkg="${entry%%:*}"
    if ! dpkg-query -W -f '${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
      missing+=("$pkg")
    fi
  done
  [[ ${#missing[@]} -eq 0 ]] && return 0
  say "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

# --- cleanup ----------------------------------------------------------------------
# containerd and the registries are started and stopped by scripts/with-containerd.sh
# (its own EXIT trap); this one stops the k8s suite's etcd + kube-apiserver if they
# still run and prints the test total.
K8S_STARTED=
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [[ -n "$K8S_STARTED" ]]; then
    "$SCRIPTS/k8s.sh" stop || rc=1
  fi
  summarize
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- suites -----------------------------------------------------------------------
# Builds the binaries the tests run (kill -9, restart, the kubelet fixture) and copies
# them into the run directory, so another checkout building into the same target
# directory cannot swap them mid-run.
build_bins() {
  cargo build -p fsb-agent-bin -p fsb-bin -p fsb-janitor-bin -p fsb-controller-bin
  # fsb-init runs inside images without a libc: statically linked.
  cargo rustc -p fsb-init-bin --bin fsb-init -- -C target-feature=+crt-static
  mkdir -p "$FSB_TEST_RUN_DIR/bin"
  install -m 0755 "$CARGO_TARGET_DIR/debug/fsb-agent" "$CARGO_TARGET_DIR/debug/fsb" \
    "$CARGO_TARGET_DIR/debug/fsb-janitor" "$CARGO_TARGET_DIR/debug/fsb-controller" \
    "$CARGO_TARGET_DIR/debug/fsb-init" "$FSB_TEST_RUN_DIR/bin/"
  export FSB_AGENT_BIN="$FSB_TEST_RUN_DIR/bin/fsb-agent"
  export FSB_BIN="$FSB_TEST_RUN_DIR/bin/fsb"
  export FSB_JANITOR_BIN="$FSB_TEST_RUN_DIR/bin/fsb-janitor"
  export FSB_CONTROLLER_BIN="$FSB_TEST_RUN_DIR/bin/fsb-controller"
  export FSB_INIT_BIN="$FSB_TEST_RUN_DIR/bin/fsb-init"
  # The metrics tests start Debian's Prometheus (tests/src/prometheus.rs).
  export FSB_PROMETHEUS_BIN="${FSB_PROMETHEUS_BIN:-$(command -v prometheus || echo /usr/bin/prometheus)}"
}

run_lint() {
  ensure_packages # protoc for fsb-proto
  say "lint: cargo fmt --check; cargo clippy --workspace --all-targets -D warnings"
  cargo fmt --all --check
  cargo clippy --workspace --all-targets -- -D warnings
  # The Kubernetes suite's tests are behind a feature; lint them too.
  cargo clippy -p fsb-tests --features k8s --all-targets -- -D warnings
}

run_unit() {
  ensure_packages # protoc for fsb-proto
  say "unit: cargo test --workspace --exclude fsb-tests"
  cargo_test --workspace --exclude fsb-tests "$@"
}

run_containerd() {
  [[ $(id -u) -eq 0 ]] || { echo "run.sh: the containerd suite needs root" >&2; return 1; }
  ensure_packages

  # Compile first, so containerd does not sit idle through a build.
  say "containerd: building fsb-tests"
  cargo test -p fsb-tests --no-run
  # Tests that run the real binaries (kill -9, restart) find them here.
  build_bins

  # Private containerd + imported test image + two local registries (plain HTTP; HTTPS
  # + basic auth) holding it, all stopped again when the tests end. Only the tests'
  # output goes through tee, so the cleanup's messages cannot hit a closed pipe.
  say "containerd: cargo test -p fsb-tests"
  "$SCRIPTS/with-containerd.sh" --registries \
    bash -c 'set -o pipefail; cargo test -p fsb-tests "$@" 2>&1 | tee -a "$0"' "$TEST_LOG" "$@"
}

# One smoke check: prints a libtest-style `test ... ok|FAILED` line and counts it in the
# summary through a `test result:` line in TEST_LOG.
k8s_check() {
  local name="$1" want="$2" got="$3"
  if [[ "$got" == "$want" ]]; then
    echo "test k8s::$name ... ok"
    echo "test result: ok. 1 passed; 0 failed" >>"$TEST_LOG"
  else
    echo "test k8s::$name ... FAILED (HTTP $got, want $want)"
    echo "test result: FAILED. 0 passed; 1 failed" >>"$TEST_LOG"
    K8S_FAILED=1
  fi
}

# POSTs a namespace with a token; prints the HTTP status.
k8s_create_namespace() {
  curl -sS -o /dev/null -w '%{http_code}' -m 10 --cacert "$FSB_K8S_CA" \
    -H "Authorization: Bearer $1" -H 'Content-Type: application/json' \
    -X POST "$FSB_K8S_SERVER/api/v1/namespaces" \
    -d "{\"apiVersion\":\"v1\",\"kind\":\"Namespace\",\"metadata\":{\"name\":\"$2\"}}"
}

run_k8s() {
  ensure_packages
  say "k8s: building etcd + kube-apiserver (cached after the first build)"
  "$SCRIPTS/k8s.sh" build
  # Stopped again by the EXIT trap (cleanup) however this suite ends.
  K8S_STARTED=1
  "$SCRIPTS/k8s.sh" start
  eval "$("$SCRIPTS/k8s.sh" env)"

  say "k8s: smoke checks against $FSB_K8S_SERVER"
  K8S_FAILED=0
  local ns="fsb-smoke-$$"
  k8s_check admin_creates_namespace 201 "$(k8s_create_namespace "$FSB_K8S_TOKEN" "$ns")"
  k8s_check unprivileged_user_is_forbidden 403 "$(k8s_create_namespace "$FSB_K8S_USER_TOKEN" "$ns-user")"

  # Every tests/tests/k8s_*.rs runs here, against this API server and a private
  # containerd (the kubelet fixture starts real fsb-agent processes on it).
  # FSB_K8S_TESTS (space-separated names such as "k8s_mtls k8s_controller") narrows
  # the suite to those files; only they are built.
  local f tests=()
  for f in ${FSB_K8S_TESTS:-$(cd tests/tests && ls k8s_*.rs)}; do
    tests+=(--test "$(basename "$f" .rs)")
  done
  say "k8s: building fsb-tests --features k8s ${tests[*]} and the binaries"
  cargo test -p fsb-tests --features k8s "${tests[@]}" --no-run
  build_bins
  say "k8s: cargo test -p fsb-tests --features k8s ${tests[*]}"
  local rc=0
  "$SCRIPTS/with-containerd.sh" \
    bash -c 'set -o pipefail; cargo test -p fsb-tests --features k8s "$@" 2>&1 | tee -a "$0"' \
    "$TEST_LOG" "${tests[@]}" "$@" || rc=$?
  K8S_STARTED=
  "$SCRIPTS/k8s.sh" stop
  [[ $K8S_FAILED -eq 0 && $rc -eq 0 ]]
}

suite="${1:-all}"
[[ $# -eq 0 ]] || shift
case "$suite" in
  lint) run_lint ;;
  unit) run_unit "$@" ;;
  containerd) run_containerd "$@" ;;
  k8s) run_k8s "$@" ;;
  all)
    run_lint
    run_unit
    run_containerd
    run_k8s
    ;;
  *)
    echo "usage: $0 [lint|unit|containerd|k8s|all] [cargo test args...]" >&2
    exit 64
    ;;
esac
