#!/usr/bin/env bash
# The benchmark entry point: `benches/run.sh [BENCH] [ARGS...]` (default agent_create).
#
#   agent_create  agent create -> task running vs the same calls made with
#                 containerd-client directly, for runc, crun and gVisor (needs root:
#                 a private containerd with the offline busybox image, set up and
#                 torn down by tests/scripts/with-containerd.sh, as for the tests)
#   registry      registry allocate + release (no containerd)
#   k8s_modes     `fsb bench --mode fast,strong --compare-raw` against a real
#                 fsb-controller (release build) on a real kube-apiserver + etcd, one
#                 fsb-agent pod run by the kubelet fixture, the private containerd; ARGS
#                 replace the default `fsb bench` arguments
#   tracing       full-path creates through `fsb up` (release) with traces exported
#                 over OTLP to a real receiver vs without, alternating in one run
#
# ARGS go to the bench binary (`cargo bench ... -- ARGS`), e.g.
#   benches/run.sh agent_create --count 50 --runtimes runc,crun,gvisor --json
#
# Environment: FSB_TEST_RUN_DIR (default /tmp/fsb-bench, apart from a test run's
# /tmp/fsb-test so both can run at once), FSB_TEST_CACHE_DIR, CARGO_TARGET_DIR (default
# /var/cache/fast-sandbox/target). The Debian packages are those of tests/run.sh
# (`tests/run.sh containerd` installs any that are missing).
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/cache/fast-sandbox/target}"
export FSB_TEST_RUN_DIR="${FSB_TEST_RUN_DIR:-/tmp/fsb-bench}"

bench="${1:-agent_create}"
[[ $# -eq 0 ]] || shift

case "$bench" in
  agent_create)
    # Compile first, so containerd does not sit idle through a build.
    echo "==> building the $bench bench" >&2
    cargo bench -p fsb-benches --bench "$bench" --no-run
    exec "$REPO_ROOT/tests/scripts/with-containerd.sh" \
      cargo bench -p fsb-benches --bench "$bench" -- "$@"
    ;;
  registry)
    exec cargo bench -p fsb-benches --bench "$bench" -- "$@"
    ;;
  k8s_modes)
    echo "==> building release binaries and the $bench bench" >&2
    cargo build --release -p fsb-agent-bin -p fsb-bin -p fsb-controller-bin
    cargo bench -p fsb-benches --bench "$bench" --no-run
    export FSB_AGENT_BIN="$CARGO_TARGET_DIR/release/fsb-agent"
    export FSB_BIN="$CARGO_TARGET_DIR/release/fsb"
    export FSB_CONTROLLER_BIN="$CARGO_TARGET_DIR/release/fsb-controller"
    "$REPO_ROOT/tests/scripts/k8s.sh" build
    trap '"$REPO_ROOT/tests/scripts/k8s.sh" stop' EXIT
    "$REPO_ROOT/tests/scripts/k8s.sh" start
    eval "$("$REPO_ROOT/tests/scripts/k8s.sh" env)"
    "$REPO_ROOT/tests/scripts/with-containerd.sh" \
      cargo bench -p fsb-benches --bench "$bench" -- "$@"
    ;;
  tracing)
    echo "==> building release fsb and the $bench bench" >&2
    cargo build --release -p fsb-bin
    cargo bench -p fsb-benches --bench tracing_overhead --no-run
    export FSB_BIN="$CARGO_TARGET_DIR/release/fsb"
    exec "$REPO_ROOT/tests/scripts/with-containerd.sh" \
      cargo bench -p fsb-benches --bench tracing_overhead -- "$@"
    ;;
  warm)
    # fsb up (release) with warm instances, then `fsb bench --warm` against it: runc at
    # concurrency 1 and 8, gVisor at concurrency 1, raw cold containerd beside each.
    echo "==> building release fsb and a static fsb-init" >&2
    cargo build --release -p fsb-bin
    cargo rustc -p fsb-init-bin --release --bin fsb-init -- -C target-feature=+crt-static
    fsb="$CARGO_TARGET_DIR/release/fsb"
    data="$FSB_TEST_RUN_DIR/warm-$$"
    mkdir -p "$data"
    port="${FSB_BENCH_PORT:-7391}"
    runc_warm="${FSB_BENCH_WARM:-64}"
    gvisor_warm="${FSB_BENCH_WARM_GVISOR:-16}"
    "$fsb" --data-dir "$data" up --listen "127.0.0.1:$port" \
      --warm "fsb.local/busybox:latest=$runc_warm:runc" \
      --warm "fsb.local/busybox:latest=$gvisor_warm:gvisor" \
      --warm-memory-mib 8192 --warm-max-starting "${FSB_BENCH_MAX_STARTING:-2}" \
      ${FSB_BENCH_CAPACITY:+--capacity "$FSB_BENCH_CAPACITY"} \
      --stop-sandboxes-on-exit >"$data/up.log" 2>&1 &
    up_pid=$!
    # --stop-sandboxes-on-exit: fsb up removes its sandboxes and warm instances.
    trap 'kill -TERM $up_pid 2>/dev/null; wait $up_pid 2>/dev/null || true' EXIT
    for _ in $(seq 1 120); do [[ -f "$data/endpoint" ]] && break; sleep 1; done
    [[ -f "$data/endpoint" ]] || { cat "$data/up.log" >&2; exit 1; }
    # Let the warm levels fill (refills start two at a time).
    sleep "${FSB_BENCH_FILL_SECONDS:-60}"
    count="${FSB_BENCH_COUNT:-500}"
    runs=("--runtime runc --concurrency 1" "--runtime runc --concurrency 8" \
      "--runtime gvisor --concurrency 1")
    # FSB_BENCH_ONLY=N (0-based) runs only that one.
    [[ -z "${FSB_BENCH_ONLY:-}" ]] || runs=("${runs[$FSB_BENCH_ONLY]}")
    # FSB_BENCH_RAW=0: fsb rounds only, no raw cold containerd rounds between them.
    raw="--compare-raw"
    [[ "${FSB_BENCH_RAW:-1}" != 0 ]] || raw=""
    for args in "${runs[@]}"; do
      echo "==> fsb bench --warm --count $count $raw $args" >&2
      # shellcheck disable=SC2086
      "$fsb" --data-dir "$data" bench --warm --count "$count" $raw $args "$@"
      sleep "${FSB_BENCH_REFILL_SECONDS:-30}"
    done
    ;;
  *)
    echo "usage: $0 [agent_create|registry|k8s_modes|tracing|warm] [bench args...]" >&2
    exit 64
    ;;
esac
