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
  *)
    echo "usage: $0 [agent_create|registry|k8s_modes] [bench args...]" >&2
    exit 64
    ;;
esac
