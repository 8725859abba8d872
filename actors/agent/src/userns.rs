//! User namespaces (`spec.user_namespace`, Kubernetes' `hostUsers: false`): the id
//! mapping a sandbox gets, and a root filesystem its root can use.
//!
//! The mapping: every sandbox with a user namespace maps container ids `0..65536` to
//! host ids [`HOST_BASE`]`..+65536` ([`MAPPING`]), one fixed range for the node. Root
//! inside is host uid 1073741824, which owns nothing on the host and has no
//! capabilities outside the sandbox's namespaces. Why one range and not one per
//! sandbox: runc 1.1 cannot idmap-mount the rootfs, so the image's files must be owned
//! by the mapped ids on disk; with one range that chown is done once per image
//! ([`remapped_parent`]) and every later sandbox only prepares a snapshot on top of it.
//! A range per sandbox would chown the whole image on every create. What the shared
//! range gives up: two sandboxes' roots are the same host uid, so the isolation
//! *between* sandboxes stays what it is without the option (pid, mount, ipc
//! namespaces, own snapshots); what it gives is that a process escaping its sandbox
//! is not root, and not any host user, on the node.
//!
//! The remapped rootfs: a snapshot prepared on the image's chain, mounted by the
//! agent, every file's owner shifted by [`HOST_BASE`] (lchown, set-id bits restored;
//! overlayfs copies each file up, file capabilities are dropped by the kernel on
//! chown), unmounted and committed as `fsb-userns-<base>-<size>-<chain id>`: the
//! remapped parent, cached. Its config blob gets a GC reference label
//! (`containerd.io/gc.ref.snapshot.overlayfs/userns-<base>-<size>`), so the remapped
//! parent lives exactly as long as the image: removing the image lets containerd's
//! garbage collector take it (after the last sandbox on it is gone). Made under a
//! lease: an agent that dies mid-way leaves nothing past the lease's expiry.

use std::{
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use containerd_client::{
    services::v1::snapshots::{
        CommitSnapshotRequest, PrepareSnapshotRequest, RemoveSnapshotRequest,
        snapshots_client::SnapshotsClient,
    },
    types::Mount,
};
use fsb_core::SandboxId;

use crate::{
    containerd::{Containerd, SNAPSHOTTER},
    error::AgentError,
    image::{ImageStore, ResolvedImage, unpack::snapshot_exists},
};

/// First host id of the range sandboxes' ids map to.
pub const HOST_BASE: u32 = 1 << 30;
/// Ids mapped: `0..65536`, as Kubernetes gives each pod with `hostUsers: false`.
pub const SIZE: u32 = 65536;
/// The mapping of every sandbox with a user namespace.
pub const MAPPING: IdMapping = IdMapping {
    host: HOST_BASE,
    size: SIZE,
};
/// Prefix of the remapped parents' snapshot names.
pub const REMAP_PREFIX: &str = "fsb-userns-";
/// Prefix of the work (active snapshot, lease, mount point) of one remap.
const WORK_PREFIX: &str = "fsb-remap-";
/// Label on a remapped parent naming the chain id it was made from.
pub const LABEL_REMAPPED_FROM: &str = "fast-sandbox.io/userns-of";
/// How long one remap may hold its lease should the agent die mid-way.
const LEASE_LIFETIME: Duration = Duration::from_secs(600);

/// Serializes remaps in this agent: two creates of one image must not both chown it.
static REMAP_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Container ids `0..size` are host ids `host..host + size` (uids and gids alike).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdMapping {
    /// First host id.
    pub host: u32,
    /// Number of ids.
    pub size: u32,
}

impl IdMapping {
    /// The host id of container id `id`, if mapped.
    pub fn to_host(self, id: u32) -> Option<u32> {
        (id < self.size)
            .then(|| self.host.checked_add(id))
            .flatten()
    }

    /// Whether `id` is a host id of this mapping (an already shifted file).
    pub fn is_host(self, id: u32) -> bool {
        id >= self.host && id - self.host < self.size
    }

    /// Name of the remapped parent of `chain_id` under this mapping.
    pub fn remapped_key(self, chain_id: &str) -> String {
        format!("{REMAP_PREFIX}{}-{}-{chain_id}", self.host, self.size)
    }

    /// Suffix of the GC label that keeps the remapped parent with its image.
    fn gc_name(self) -> String {
        format!("userns-{}-{}", self.host, self.size)
    }
}

/// The committed snapshot to prepare a user-namespace sandbox's rootfs from: `image`'s
/// rootfs owned by `mapping`'s host ids. Made (under [`REMAP_LOCK`]) if missing, in
/// `scratch` (a directory of the agent's); returns its name and whether this call made
/// it. On failure nothing is left behind but what the lease expires.
pub async fn remapped_parent(
    cd: &Containerd,
    images: &ImageStore,
    image: &ResolvedImage,
    mapping: IdMapping,
    scratch: &Path,
) -> Result<(String, bool), AgentError> {
    let key = mapping.remapped_key(&image.chain_id);
    if snapshot_exists(cd, SNAPSHOTTER, &key).await? {
        return Ok((key, false));
    }
    let _one_at_a_time = REMAP_LOCK.lock().await;
    if snapshot_exists(cd, SNAPSHOTTER, &key).await? {
        return Ok((key, false));
    }
    let work = format!("{WORK_PREFIX}{}", SandboxId::generate());
    cd.create_lease(&work, LEASE_LIFETIME).await?;
    let t = Instant::now();
    let made = remap(cd, images, image, mapping, &work, &key, scratch).await;
    // Gone whether committed or not (a committed snapshot took the name `key`).
    let removed = cd
        .call(
            "remove remap snapshot",
            SnapshotsClient::new(cd.channel()).remove(cd.request(RemoveSnapshotRequest {
                snapshotter: SNAPSHOTTER.to_owned(),
                key: work.clone(),
            })),
        )
        .await;
    if let Err(e) = removed.map(|_| ()).or_else(missing_ok) {
        tracing::warn!(snapshot = %work, error = %e, "removing a remap's work snapshot failed; its lease expires it");
    }
    cd.delete_lease(&work).await?;
    made?;
    tracing::info!(image = %image.name, snapshot = %key, elapsed = ?t.elapsed(), "image remapped for user namespaces");
    Ok((key, true))
}

async fn remap(
    cd: &Containerd,
    images: &ImageStore,
    image: &ResolvedImage,
    mapping: IdMapping,
    work: &str,
    key: &str,
    scratch: &Path,
) -> Result<(), AgentError> {
    let prepare = PrepareSnapshotRequest {
        snapshotter: SNAPSHOTTER.to_owned(),
        key: work.to_owned(),
        parent: image.chain_id.clone(),
        labels: Default::default(),
    };
    let mounts = cd
        .call(
            "prepare remap snapshot",
            SnapshotsClient::new(cd.channel()).prepare(cd.leased_request(prepare, work)?),
        )
        .await?
        .mounts;
    let target = scratch.join(work);
    tokio::task::spawn_blocking(move || shift_mounted(&mounts, &target, mapping))
        .await
        .map_err(|e| AgentError::Internal(format!("remapping the image: {e}")))??;
    let commit = CommitSnapshotRequest {
        snapshotter: SNAPSHOTTER.to_owned(),
        name: key.to_owned(),
        key: work.to_owned(),
        labels: [(LABEL_REMAPPED_FROM.to_owned(), image.chain_id.clone())].into(),
    };
    cd.call(
        "commit remapped snapshot",
        SnapshotsClient::new(cd.channel()).commit(cd.leased_request(commit, work)?),
    )
    .await?;
    // Before the lease goes: from here the image keeps it.
    images.keep_with_image(image, &mapping.gc_name(), key).await
}

fn missing_ok(e: AgentError) -> Result<(), AgentError> {
    if e.is_not_found() { Ok(()) } else { Err(e) }
}

/// Mount the active snapshot `mounts` at `target` (created, removed after), shift
/// every file's owner into `mapping`, unmount. A bind mount (a snapshot without a
/// parent) is shifted in place.
fn shift_mounted(mounts: &[Mount], target: &Path, mapping: IdMapping) -> Result<(), AgentError> {
    let failed = |what: String| AgentError::Internal(format!("remapping the image: {what}"));
    let [m] = mounts else {
        return Err(failed(format!("{} mounts, expected one", mounts.len())));
    };
    match m.r#type.as_str() {
        "bind" => shift_tree(Path::new(&m.source), mapping),
        "overlay" => {
            std::fs::create_dir_all(target)
                .map_err(|e| failed(format!("creating {}: {e}", target.display())))?;
            let data = std::ffi::CString::new(m.options.join(","))
                .map_err(|_| failed("a NUL in the overlay options".into()))?;
            let mounted = rustix::mount::mount(
                "overlay",
                target,
                "overlay",
                rustix::mount::MountFlags::empty(),
                data.as_c_str(),
            )
            .map_err(|e| failed(format!("mounting the snapshot: {e}")));
            let shifted = mounted.and_then(|()| {
                let shifted = shift_tree(target, mapping);
                let unmounted =
                    rustix::mount::unmount(target, rustix::mount::UnmountFlags::empty())
                        .map_err(|e| failed(format!("unmounting {}: {e}", target.display())));
                shifted.and(unmounted)
            });
            let _ = std::fs::remove_dir(target);
            shifted
        }
        other => Err(failed(format!("unexpected mount type {other:?}"))),
    }
}

/// Shift the owner of `root` and everything under it (symlinks themselves, never
/// followed) from container ids to `mapping`'s host ids. Already shifted entries (a
/// second name of a hard-linked file) are left alone; an id outside the mapping is an
/// error (inside it would show as the overflow id).
pub fn shift_tree(root: &Path, mapping: IdMapping) -> Result<(), AgentError> {
    let failed =
        |p: &Path, what: String| AgentError::Internal(format!("remapping {}: {what}", p.display()));
    let mut stack: Vec<PathBuf> = vec![root.to_path_buf()];
    while let Some(path) = stack.pop() {
        let meta = std::fs::symlink_metadata(&path).map_err(|e| failed(&path, e.to_string()))?;
        shift_one(&path, &meta, mapping)?;
        if meta.is_dir() {
            for entry in std::fs::read_dir(&path).map_err(|e| failed(&path, e.to_string()))? {
                stack.push(entry.map_err(|e| failed(&path, e.to_string()))?.path());
            }
        }
    }
    Ok(())
}

fn shift_one(path: &Path, meta: &std::fs::Metadata, mapping: IdMapping) -> Result<(), AgentError> {
    let failed =
        |what: String| AgentError::Internal(format!("remapping {}: {what}", path.display()));
    let shift = |id: u32, what: &str| -> Result<Option<u32>, AgentError> {
        if mapping.is_host(id) {
            return Ok(None);
        }
        mapping.to_host(id).map(Some).ok_or_else(|| {
            failed(format!(
                "owned by {what} {id}, outside the user namespace's 0..{}",
                mapping.size
            ))
        })
    };
    let (uid, gid) = (shift(meta.uid(), "uid")?, shift(meta.gid(), "gid")?);
    if uid.is_none() && gid.is_none() {
        return Ok(());
    }
    std::os::unix::fs::lchown(path, uid, gid).map_err(|e| failed(format!("lchown: {e}")))?;
    // chown clears the set-user-id and set-group-id bits (root's too): put them back.
    let mode = meta.mode() & 0o7777;
    if !meta.file_type().is_symlink() && mode & 0o6000 != 0 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .map_err(|e| failed(format!("chmod: {e}")))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn the_mapping_shifts_container_ids_and_recognizes_shifted_ones() {
        let m = MAPPING;
        assert_eq!(m.to_host(0), Some(HOST_BASE));
        assert_eq!(m.to_host(65535), Some(HOST_BASE + 65535));
        assert_eq!(m.to_host(65536), None);
        assert!(m.is_host(HOST_BASE) && m.is_host(HOST_BASE + 65535));
        assert!(!m.is_host(0) && !m.is_host(HOST_BASE + 65536) && !m.is_host(HOST_BASE - 1));
        let top = IdMapping {
            host: u32::MAX - 1,
            size: 10,
        };
        assert_eq!(top.to_host(5), None, "no wrap past u32::MAX");
        assert_eq!(
            m.remapped_key("sha256:ab"),
            "fsb-userns-1073741824-65536-sha256:ab"
        );
    }

    #[test]
    fn a_tree_is_shifted_once_with_set_id_bits_kept() {
        // Needs CAP_CHOWN (the agent runs as root); skipped otherwise.
        if std::fs::metadata("/proc/self").map(|m| m.uid()).ok() != Some(0) {
            return;
        }
        let dir = std::env::temp_dir().join(format!("fsb-shift-{}", SandboxId::generate()));
        std::fs::create_dir_all(dir.join("bin")).unwrap();
        let tool = dir.join("bin/tool");
        std::fs::write(&tool, b"x").unwrap();
        // (chown first: it would clear the bit being tested)
        std::os::unix::fs::lchown(&tool, Some(0), Some(5)).unwrap();
        std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o4755)).unwrap();
        std::fs::hard_link(&tool, dir.join("bin/alias")).unwrap();
        std::os::unix::fs::symlink("tool", dir.join("bin/link")).unwrap();
        std::os::unix::fs::lchown(dir.join("bin/link"), Some(7), Some(7)).unwrap();
        shift_tree(&dir, MAPPING).unwrap();
        let meta = std::fs::metadata(&tool).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (HOST_BASE, HOST_BASE + 5));
        assert_eq!(meta.mode() & 0o7777, 0o4755, "setuid kept");
        let link = std::fs::symlink_metadata(dir.join("bin/link")).unwrap();
        assert_eq!(link.uid(), HOST_BASE + 7, "the link itself, not its target");
        // Shifting again changes nothing (already in the host range).
        shift_tree(&dir, MAPPING).unwrap();
        assert_eq!(std::fs::metadata(&tool).unwrap().uid(), HOST_BASE);
        // An owner outside 0..65536 is refused.
        std::os::unix::fs::lchown(&tool, Some(70_000), None).unwrap();
        let err = shift_tree(&dir, MAPPING).unwrap_err();
        assert!(err.to_string().contains("outside"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
