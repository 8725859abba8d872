//! Unpacking an image's layers into committed overlayfs snapshots named by chain id,
//! the way containerd's own client does it: for each layer whose chain snapshot is
//! missing, Prepare an active snapshot on the parent chain (under the caller's lease),
//! diff-Apply the layer blob into it, check the applied digest against the config's
//! diff id, and Commit it as the chain id. Losing a race to another unpack (Commit
//! answers AlreadyExists) is fine: the other one made the same snapshot.

use std::{collections::HashMap, time::Duration};

use containerd_client::services::v1::{
    ApplyRequest,
    diff_client::DiffClient,
    snapshots::{
        CommitSnapshotRequest, PrepareSnapshotRequest, RemoveSnapshotRequest, StatSnapshotRequest,
        snapshots_client::SnapshotsClient,
    },
};

use super::{
    content,
    oci::{Descriptor, chain_ids},
};
use crate::{containerd::Containerd, error::AgentError};

/// Label on a layer blob naming its uncompressed digest (containerd convention).
pub(crate) const LABEL_UNCOMPRESSED: &str = "containerd.io/uncompressed";
/// Label on a snapshot being extracted, naming the chain id it becomes.
const LABEL_SNAPSHOT_REF: &str = "containerd.io/snapshot.ref";
/// Prefix of the config blob's label that keeps the image's top snapshot from GC.
pub(crate) const LABEL_GC_SNAPSHOT_PREFIX: &str = "containerd.io/gc.ref.snapshot.";
/// Applying one layer may take a while (decompression + writes).
const APPLY_TIMEOUT: Duration = Duration::from_secs(600);

/// Whether committed snapshot `key` exists.
pub(crate) async fn snapshot_exists(
    ctrd: &Containerd,
    snapshotter: &str,
    key: &str,
) -> Result<bool, AgentError> {
    let req = ctrd.request(StatSnapshotRequest {
        snapshotter: snapshotter.to_owned(),
        key: key.to_owned(),
    });
    match ctrd
        .call(
            "stat snapshot",
            SnapshotsClient::new(ctrd.channel()).stat(req),
        )
        .await
    {
        Ok(_) => Ok(true),
        Err(e) if e.is_not_found() => Ok(false),
        Err(e) => Err(e),
    }
}

/// Unpacks `layers` (bottom first, with their `diff_ids`) and labels the config blob
/// so the GC keeps the top snapshot. Returns the top chain id.
pub(crate) async fn unpack(
    ctrd: &Containerd,
    snapshotter: &str,
    lease: &str,
    unique: &str,
    config_digest: &str,
    layers: &[Descriptor],
    diff_ids: &[String],
) -> Result<String, AgentError> {
    let chains = chain_ids(diff_ids);
    let top = chains
        .last()
        .cloned()
        .ok_or_else(|| AgentError::InvalidArgument("image has no layers".into()))?;
    // Find the highest chain that already exists; everything below it exists too.
    let mut start = chains.len();
    while start > 0 && !snapshot_exists(ctrd, snapshotter, &chains[start - 1]).await? {
        start -= 1;
    }
    for i in start..chains.len() {
        let parent = if i == 0 { "" } else { chains[i - 1].as_str() };
        apply_layer(
            ctrd,
            snapshotter,
            lease,
            &format!("fsb-extract-{unique}-{i} {}", chains[i]),
            parent,
            &chains[i],
            &layers[i],
            &diff_ids[i],
        )
        .await?;
    }
    content::set_labels(
        ctrd,
        config_digest,
        [(
            format!("{LABEL_GC_SNAPSHOT_PREFIX}{snapshotter}"),
            top.clone(),
        )]
        .into(),
    )
    .await?;
    Ok(top)
}

#[allow(clippy::too_many_arguments)]
async fn apply_layer(
    ctrd: &Containerd,
    snapshotter: &str,
    lease: &str,
    key: &str,
    parent: &str,
    chain: &str,
    layer: &Descriptor,
    diff_id: &str,
) -> Result<(), AgentError> {
    let labels: HashMap<String, String> =
        [(LABEL_SNAPSHOT_REF.to_owned(), chain.to_owned())].into();
    let req = ctrd.leased_request(
        PrepareSnapshotRequest {
            snapshotter: snapshotter.to_owned(),
            key: key.to_owned(),
            parent: parent.to_owned(),
            labels: labels.clone(),
        },
        lease,
    )?;
    let mounts = ctrd
        .call(
            "prepare snapshot",
            SnapshotsClient::new(ctrd.channel()).prepare(req),
        )
        .await?
        .mounts;

    let result = async {
        let mut req = ctrd.request(ApplyRequest {
            diff: Some(layer.to_containerd()),
            mounts,
            payloads: HashMap::new(),
            sync_fs: false,
        });
        req.set_timeout(APPLY_TIMEOUT);
        let applied = ctrd
            .call_with_timeout(
                "apply layer",
                APPLY_TIMEOUT,
                DiffClient::new(ctrd.channel()).apply(req),
            )
            .await?
            .applied
            .ok_or_else(|| AgentError::Internal("diff apply returned no descriptor".into()))?;
        if applied.digest != diff_id {
            return Err(AgentError::InvalidArgument(format!(
                "layer {} unpacks to {}, but the image config says {diff_id}",
                layer.digest, applied.digest
            )));
        }
        let req = ctrd.leased_request(
            CommitSnapshotRequest {
                snapshotter: snapshotter.to_owned(),
                name: chain.to_owned(),
                key: key.to_owned(),
                labels,
            },
            lease,
        )?;
        match ctrd
            .call(
                "commit snapshot",
                SnapshotsClient::new(ctrd.channel()).commit(req),
            )
            .await
        {
            Ok(()) => Ok(true),
            // Another unpack committed this chain first: ours is redundant.
            Err(e) if e.is_already_exists() => Ok(false),
            Err(e) => Err(e),
        }
    }
    .await;

    match result {
        Ok(true) => {}
        Ok(false) | Err(_) => remove_snapshot(ctrd, snapshotter, key).await,
    }
    result?;
    // Record the uncompressed digest on the blob, as containerd's unpacker does.
    content::set_labels(
        ctrd,
        &layer.digest,
        [(LABEL_UNCOMPRESSED.to_owned(), diff_id.to_owned())].into(),
    )
    .await
}

/// Removes snapshot `key`, logging (not failing) if that does not work.
async fn remove_snapshot(ctrd: &Containerd, snapshotter: &str, key: &str) {
    let req = ctrd.request(RemoveSnapshotRequest {
        snapshotter: snapshotter.to_owned(),
        key: key.to_owned(),
    });
    let removed = ctrd
        .call(
            "remove snapshot",
            SnapshotsClient::new(ctrd.channel()).remove(req),
        )
        .await;
    if let Err(e) = removed
        && !e.is_not_found()
    {
        tracing::warn!(%key, error = %e, "removing extraction snapshot");
    }
}
