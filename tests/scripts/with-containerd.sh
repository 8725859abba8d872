#!/usr/bin/env bash
# Runs a command beside a private containerd holding the offline test image, then
# stops everything it started, whatever the command's outcome:
#
#   tests/scripts/with-containerd.sh [--registries] CMD [ARGS...]
#
# 1. builds (or reuses from the cache) the busybox OCI archive (build-test-image.sh);
# 2. starts the private containerd (containerd.sh start) and exports its variables
#    (FSB_CONTAINERD_SOCKET, FSB_CONTAINERD_NAMESPACE, FSB_RUNTIME_ROOT, FSB_TEST_RUNSC,
#    FSB_TEST_RUN_DIR);
# 3. imports the archive with `ctr images import` and exports FSB_TEST_IMAGE and
#    FSB_TEST_IMAGE_ARCHIVE;
# 4. with --registries, starts the two local registries holding the image
#    (registry.sh start) and exports their variables;
# 5. runs CMD; its exit status is the script's.
#
# An EXIT trap stops the registries and containerd (containers, tasks, shims, runtime
# processes, mounts); if anything survives, the script says so and exits non-zero.
# Used by `tests/run.sh containerd` and `benches/run.sh`. Needs root.
#
# Environment: FSB_TEST_RUN_DIR (default /tmp/fsb-test; give each concurrent user its
# own), FSB_TEST_CACHE_DIR (default /var/cache/fast-sandbox/test-images).
set -euo pipefail

SCRIPTS="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export FSB_TEST_RUN_DIR="${FSB_TEST_RUN_DIR:-/tmp/fsb-test}"
CACHE_DIR="${FSB_TEST_CACHE_DIR:-/var/cache/fast-sandbox/test-images}"
NAMESPACE="${FSB_CONTAINERD_NAMESPACE:-fast-sandbox}"

say() { echo "==> $*" >&2; }

registries=0
if [[ "${1:-}" == "--registries" ]]; then
  registries=1
  shift
fi
if [[ $# -eq 0 ]]; then
  echo "usage: $0 [--registries] CMD [ARGS...]" >&2
  exit 64
fi
[[ $(id -u) -eq 0 ]] || { echo "with-containerd.sh: needs root (containerd, runc)" >&2; exit 1; }

CONTAINERD_STARTED=0
REGISTRY_STARTED=0
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [[ $REGISTRY_STARTED -eq 1 ]]; then
    say "stopping the test registries"
    if ! "$SCRIPTS/registry.sh" stop; then
      echo "with-containerd.sh: WARNING: a test registry survived (see above)" >&2
      [[ $rc -ne 0 ]] || rc=1
    fi
  fi
  if [[ $CONTAINERD_STARTED -eq 1 ]]; then
    say "stopping the private containerd"
    if ! "$SCRIPTS/containerd.sh" stop; then
      echo "with-containerd.sh: WARNING: cleanup left something behind (see above)" >&2
      [[ $rc -ne 0 ]] || rc=1
    fi
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

archive="$CACHE_DIR/fsb-busybox-test.oci.tar"
ref="$("$SCRIPTS/build-test-image.sh" "$archive")"
# The same rootfs with `User: nobody` in its config, for the agent's user lookup.
archive_nobody="$CACHE_DIR/fsb-busybox-nobody.oci.tar"
ref_nobody="$(FSB_TEST_IMAGE_REF=docker.io/fsb/busybox:nobody FSB_TEST_IMAGE_USER=nobody \
  "$SCRIPTS/build-test-image.sh" "$archive_nobody")"

CONTAINERD_STARTED=1
"$SCRIPTS/containerd.sh" start
eval "$("$SCRIPTS/containerd.sh" env)"

# Harness setup only: the product loads images itself (content + diff + snapshots).
ctr --address "$FSB_CONTAINERD_SOCKET" -n "$NAMESPACE" images import \
  --snapshotter overlayfs "$archive" >/dev/null
# ctr names the image after the index's ref.name annotation; check, then export it.
# Listed first, then searched: `ctr ... | grep -q` under pipefail fails when grep
# stops reading at its match before ctr (one write per line) has written the rest.
images="$(ctr --address "$FSB_CONTAINERD_SOCKET" -n "$NAMESPACE" images ls -q)"
if ! grep -qxF "$ref" <<<"$images"; then
  echo "with-containerd.sh: ctr did not import the image as $ref; it has:" >&2
  ctr --address "$FSB_CONTAINERD_SOCKET" -n "$NAMESPACE" images ls -q >&2
  exit 1
fi
ctr --address "$FSB_CONTAINERD_SOCKET" -n "$NAMESPACE" images import \
  --snapshotter overlayfs "$archive_nobody" >/dev/null
export FSB_TEST_IMAGE="$ref" FSB_TEST_IMAGE_ARCHIVE="$archive" FSB_TEST_IMAGE_NOBODY="$ref_nobody"

if [[ $registries -eq 1 ]]; then
  # Two local registries (plain HTTP; HTTPS + basic auth) holding the test image.
  REGISTRY_STARTED=1
  "$SCRIPTS/registry.sh" start "$archive"
  eval "$("$SCRIPTS/registry.sh" env)"
fi

say "running $* (image $ref, socket $FSB_CONTAINERD_SOCKET)"
"$@"
