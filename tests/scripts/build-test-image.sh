#!/usr/bin/env bash
# Builds the offline OCI test image from Debian's busybox-static, with no registry:
# one uncompressed layer (/bin/busybox plus applet symlinks and a minimal /etc), an
# image config and a manifest, in an OCI image layout packed as a tar archive.
#
#   tests/scripts/build-test-image.sh OUT.tar
#
# The archive is reproducible (sorted names, fixed mtime, owner 0), so its digests only
# change when busybox or this script changes. OUT.tar.key records that pair; when it
# matches, the script returns at once (the cache that makes reruns instant).
#
# Prints the image reference (the index's org.opencontainers.image.ref.name) on stdout.
set -euo pipefail

IMAGE_REF="${FSB_TEST_IMAGE_REF:-docker.io/fsb/busybox:test}"
# The image config's User (empty: root); a named user tests the agent's passwd lookup.
IMAGE_USER="${FSB_TEST_IMAGE_USER:-}"
BUSYBOX="${FSB_BUSYBOX:-/bin/busybox}"
APPLETS=(sh ash echo cat sleep env ls id true false printf test "[" mkdir rm touch
  ps kill hostname uname pwd wc head tail grep sed sort tr cut date stat readlink
  mkfifo chmod ln cp mv dd df mount umount nproc timeout tee seq xargs which whoami
  nc ip ping wget)
EPOCH_ISO="1970-01-01T00:00:00Z"

die() { echo "build-test-image: $*" >&2; exit 1; }

[[ $# -eq 1 ]] || die "usage: $0 OUT.tar"
out="$1"
[[ -x "$BUSYBOX" ]] || die "$BUSYBOX not found (apt-get install busybox-static)"

case "$(uname -m)" in
  x86_64) arch=amd64 ;;
  aarch64) arch=arm64 ;;
  *) die "unsupported machine $(uname -m)" ;;
esac

busybox_version="$(dpkg-query -W -f '${Version}' busybox-static 2>/dev/null || true)"
[[ -n "$busybox_version" ]] || busybox_version="$(sha256sum "$BUSYBOX" | cut -c1-16)"
script_hash="$(sha256sum "${BASH_SOURCE[0]}" | cut -c1-16)"
key="busybox=${busybox_version} script=${script_hash} ref=${IMAGE_REF} user=${IMAGE_USER} arch=${arch}"

if [[ -f "$out" && -f "$out.key" && "$(cat "$out.key")" == "$key" ]]; then
  echo "$IMAGE_REF"
  exit 0
fi

mkdir -p "$(dirname "$out")"
work="$(mktemp -d "${TMPDIR:-/tmp}/fsb-image.XXXXXX")"
trap 'rm -rf "$work"' EXIT

# Reproducible tar of the current directory's given entries.
repro_tar() {
  local dest="$1"
  shift
  tar --create --file "$dest" --format=gnu --sort=name --mtime="@0" \
    --owner=0 --group=0 --numeric-owner "$@"
}

sha() { sha256sum "$1" | cut -d' ' -f1; }
size() { stat -c %s "$1"; }

# --- the layer (rootfs) -----------------------------------------------------------
root="$work/rootfs"
mkdir -p "$root"/{bin,dev,etc,proc,sys,tmp,root,run,var/tmp}
chmod 1777 "$root/tmp" "$root/var/tmp"
chmod 0700 "$root/root"
install -m 0755 "$BUSYBOX" "$root/bin/busybox"
for applet in "${APPLETS[@]}"; do
  ln -s busybox "$root/bin/$applet"
done
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' >"$root/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' >"$root/etc/group"
printf '127.0.0.1 localhost\n' >"$root/etc/hosts"
: >"$root/etc/resolv.conf"
find "$root" -exec touch -h -d "@0" {} +

layer="$work/layer.tar"
(cd "$root" && repro_tar "$layer" bin dev etc proc root run sys tmp var)
layer_digest="$(sha "$layer")"
layer_size="$(size "$layer")"

# --- config and manifest ------------------------------------------------------------
config="$work/config.json"
printf '{"created":"%s","architecture":"%s","os":"linux","config":{"User":"%s","Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],"Cmd":["sh"],"WorkingDir":"/"},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]},"history":[{"created":"%s","created_by":"fast-sandbox tests/scripts/build-test-image.sh"}]}' \
  "$EPOCH_ISO" "$arch" "$IMAGE_USER" "$layer_digest" "$EPOCH_ISO" >"$config"
config_digest="$(sha "$config")"
config_size="$(size "$config")"

manifest="$work/manifest.json"
printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%s},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:%s","size":%s}]}' \
  "$config_digest" "$config_size" "$layer_digest" "$layer_size" >"$manifest"
manifest_digest="$(sha "$manifest")"
manifest_size="$(size "$manifest")"

# --- the OCI image layout -----------------------------------------------------------
layout="$work/layout"
mkdir -p "$layout/blobs/sha256"
cp "$layer" "$layout/blobs/sha256/$layer_digest"
cp "$config" "$layout/blobs/sha256/$config_digest"
cp "$manifest" "$layout/blobs/sha256/$manifest_digest"
printf '{"imageLayoutVersion":"1.0.0"}' >"$layout/oci-layout"
printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%s,"platform":{"architecture":"%s","os":"linux"},"annotations":{"org.opencontainers.image.ref.name":"%s","io.containerd.image.name":"%s"}}]}' \
  "$manifest_digest" "$manifest_size" "$arch" "$IMAGE_REF" "$IMAGE_REF" >"$layout/index.json"
find "$layout" -exec touch -h -d "@0" {} +

(cd "$layout" && repro_tar "$work/image.tar" oci-layout index.json blobs)
mv -f "$work/image.tar" "$out"
printf '%s' "$key" >"$out.key"
echo "$IMAGE_REF"
