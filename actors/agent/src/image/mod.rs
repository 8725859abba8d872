//! Images: load OCI archives, pull from registries, unpack into overlayfs snapshots,
//! resolve for the create path, list and remove — all through containerd's content,
//! images, diff and snapshots services (containerd 1.6's transfer service is not
//! usable with containerd-client 0.9, so pull and unpack are client-side).
//!
//! Flow of [`ImageStore::load_archive`] and [`ImageStore::pull`], all under one lease:
//! fetch the manifest (via the index for the host platform), then config and layers
//! into the content store (each write carries the expected digest and size; blobs
//! already present are skipped), then the manifest and index with the GC reference
//! labels on them (`containerd.io/gc.ref.content.*`), then unpack (see [`unpack`]),
//! and only then create the image record. The lease is deleted at the end, success or
//! not: on success the image record and the labels keep everything alive; on failure
//! the partial content becomes collectable and no image record exists.
//!
//! Invariant: an image record written by this module always has its snapshots
//! unpacked and its config labelled `containerd.io/gc.ref.snapshot.<snapshotter>`.

mod archive;
mod content;
pub mod oci;
mod registry;
pub(crate) mod unpack;

use std::{
    collections::{HashMap, HashSet},
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use containerd_client::services::v1::{
    CreateImageRequest, DeleteImageRequest, GetImageRequest, Image, ListImagesRequest,
    UpdateImageRequest, images_client::ImagesClient,
};
use fsb_core::ImageRef;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

pub use registry::{RegistryAuth, RegistryOptions};

use self::{
    archive::ArchiveIndex,
    content::{BlobWriter, CHUNK, Opened},
    oci::{ANNOTATION_REF_NAME, Descriptor, host_architecture, is_index, is_manifest},
    registry::{MAX_MANIFEST, RegistryClient, Session},
};
use crate::{
    containerd::{Containerd, SNAPSHOTTER},
    error::AgentError,
};

/// How long a load or pull may hold its lease should the agent die mid-way.
const LEASE_LIFETIME: Duration = Duration::from_secs(3600);
/// Prefix of the leases this module creates.
pub const LEASE_PREFIX: &str = "fsb-image-";
/// Prefix of the active snapshots layers are extracted into.
pub const EXTRACT_PREFIX: &str = "fsb-extract-";

/// An image now in containerd, unpacked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageRecord {
    /// The image's name in containerd (a normalized reference).
    pub name: String,
    /// Digest of the record's target (an index or a manifest).
    pub target_digest: String,
    /// Digest of the host platform's manifest.
    pub manifest_digest: String,
    /// Digest of the image config.
    pub config_digest: String,
    /// Chain id of the rootfs: the committed snapshot to prepare containers from.
    pub chain_id: String,
    /// Config plus layer blob sizes, in bytes.
    pub size: u64,
}

/// What the create path needs about an image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolvedImage {
    /// The image's name in containerd.
    pub name: String,
    /// Digest of the host platform's manifest.
    pub manifest_digest: String,
    /// The OCI image config document.
    pub config_json: Vec<u8>,
    /// Its digest (the blob whose GC labels keep the image's snapshots).
    pub config_digest: String,
    /// Chain id of the rootfs (the parent of a container's snapshot).
    pub chain_id: String,
    /// Config plus layer blob sizes, in bytes.
    pub size: u64,
}

/// One inventory entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageInfo {
    /// The image's name in containerd.
    pub name: String,
    /// Digest of the record's target.
    pub digest: String,
    /// Config plus layer blob sizes, in bytes (the target's size if unreadable).
    pub size: u64,
}

/// Which kind of blob a progress event is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlobKind {
    /// An index or manifest list.
    Index,
    /// A manifest.
    Manifest,
    /// The image config.
    Config,
    /// A layer.
    Layer,
}

/// Progress of one blob of a pull or load.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PullProgress {
    /// The blob.
    pub digest: String,
    /// What it is.
    pub kind: BlobKind,
    /// Bytes done.
    pub done: u64,
    /// Bytes in total.
    pub total: u64,
    /// The blob was already in the content store (nothing transferred).
    pub cached: bool,
}

/// Images in the agent's containerd namespace. Cheap to share (`Arc`).
#[derive(Debug)]
pub struct ImageStore {
    ctrd: Containerd,
    snapshotter: String,
    registry: RegistryClient,
    /// Resolved images by target digest (content is immutable). `true` once the chain
    /// snapshot was seen to exist.
    cache: Mutex<HashMap<String, (Arc<ResolvedImage>, bool)>>,
}

/// Where blobs come from.
enum Source {
    Archive(Arc<ArchiveIndex>),
    Registry(Session),
}

type Progress<'a> = &'a mut (dyn FnMut(PullProgress) + Send);

impl ImageStore {
    /// A store over `ctrd` using the overlayfs snapshotter; `options` configure
    /// registry access (plain-HTTP hosts, extra CA files).
    pub fn new(ctrd: Containerd, options: &RegistryOptions) -> Result<Self, AgentError> {
        Ok(Self {
            ctrd,
            snapshotter: SNAPSHOTTER.to_owned(),
            registry: RegistryClient::new(options)?,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// Loads an OCI image archive (tar of an OCI layout). The image is named `name`,
    /// or else after the index's `org.opencontainers.image.ref.name` annotation.
    pub async fn load_archive(
        &self,
        path: &Path,
        name: Option<&ImageRef>,
    ) -> Result<ImageRecord, AgentError> {
        let owned = path.to_owned();
        let index = tokio::task::spawn_blocking(move || ArchiveIndex::scan(&owned))
            .await
            .map_err(|e| AgentError::Internal(format!("archive scan task: {e}")))??;
        let index = Arc::new(index);
        let layout = index.get("index.json").ok_or_else(|| {
            AgentError::InvalidArgument(format!(
                "image archive {} has no index.json (not an OCI layout)",
                path.display()
            ))
        })?;
        let bytes = read_entry(&index, layout, MAX_MANIFEST as u64).await?;
        let layout: oci::Index = oci::parse_json(&bytes, "index.json of the image archive")?;
        let entry = pick_archive_entry(&layout, name.is_some()).ok_or_else(|| {
            AgentError::InvalidArgument(format!(
                "image archive {}: index.json lists no image{}",
                path.display(),
                if name.is_some() {
                    ""
                } else {
                    " named by org.opencontainers.image.ref.name (pass a name)"
                }
            ))
        })?;
        let image_name = match name {
            Some(n) => n.as_str().to_owned(),
            None => {
                let annotated = entry
                    .annotations
                    .get(ANNOTATION_REF_NAME)
                    .map(String::as_str)
                    .unwrap_or_default();
                ImageRef::parse(ANNOTATION_REF_NAME, annotated)
                    .map_err(|e| AgentError::InvalidArgument(e.to_string()))?
                    .as_str()
                    .to_owned()
            }
        };
        entry.validate("index.json entry")?;
        let mut source = Source::Archive(index);
        let top_bytes = source.small(&entry, "top-level manifest").await?;
        self.ingest(&mut source, &image_name, entry, top_bytes, &mut |_| {})
            .await
    }

    /// Pulls `reference` from its registry (anonymous, or with `auth`), reporting
    /// per-blob progress through `progress`. Counted in `fsb_image_pulls_total`.
    pub async fn pull(
        &self,
        reference: &ImageRef,
        auth: Option<RegistryAuth>,
        progress: impl FnMut(PullProgress) + Send,
    ) -> Result<ImageRecord, AgentError> {
        let result = self.pull_uncounted(reference, auth, progress).await;
        fsb_telemetry::metrics()
            .image_pulls
            .inc(if result.is_ok() { "ok" } else { "error" });
        result
    }

    async fn pull_uncounted(
        &self,
        reference: &ImageRef,
        auth: Option<RegistryAuth>,
        mut progress: impl FnMut(PullProgress) + Send,
    ) -> Result<ImageRecord, AgentError> {
        let mut session = self
            .registry
            .session(reference.domain(), reference.path(), auth);
        let tag_or_digest = reference
            .digest()
            .or(reference.tag())
            .unwrap_or("latest")
            .to_owned();
        let fetched = session.manifest(&tag_or_digest, reference.as_str()).await?;
        let size = i64::try_from(fetched.bytes.len()).unwrap_or(i64::MAX);
        let top = Descriptor {
            media_type: fetched.media_type,
            digest: fetched.digest,
            size,
            platform: None,
            annotations: HashMap::new(),
        };
        let mut source = Source::Registry(session);
        self.ingest(
            &mut source,
            reference.as_str(),
            top,
            fetched.bytes,
            &mut progress,
        )
        .await
    }

    /// The image `reference` as the create path needs it. Cached by target digest;
    /// the first resolve of a digest also checks the rootfs snapshot exists and
    /// unpacks the image if it does not (e.g. imported by another client).
    pub async fn resolve(&self, reference: &ImageRef) -> Result<ResolvedImage, AgentError> {
        let image = self.get_image(reference.as_str()).await?;
        let target = target_of(&image)?;
        if let Some((resolved, true)) = self.cached(&target.digest) {
            return Ok(resolved.as_ref().clone());
        }
        let (resolved, manifest) = self.describe(&image.name, &target).await?;
        if !unpack::snapshot_exists(&self.ctrd, &self.snapshotter, &resolved.chain_id).await? {
            let diff_ids =
                oci::parse_config(&resolved.config_json, "image config", manifest.layers.len())?
                    .rootfs
                    .diff_ids;
            self.with_lease(|lease, unique| async move {
                unpack::unpack(
                    &self.ctrd,
                    &self.snapshotter,
                    &lease,
                    &unique,
                    &manifest.config.digest,
                    &manifest.layers,
                    &diff_ids,
                )
                .await
            })
            .await?;
        }
        self.lock_cache()
            .insert(target.digest.clone(), (Arc::clone(&resolved), true));
        Ok(resolved.as_ref().clone())
    }

    /// Every image in the namespace, for the agent's inventory.
    pub async fn list(&self) -> Result<Vec<ImageInfo>, AgentError> {
        let req = self.ctrd.request(ListImagesRequest { filters: vec![] });
        let images = self
            .ctrd
            .call(
                "list images",
                ImagesClient::new(self.ctrd.channel()).list(req),
            )
            .await?
            .images;
        let mut out = Vec::with_capacity(images.len());
        for image in images {
            let Ok(target) = target_of(&image) else {
                continue;
            };
            let size = match self.cached(&target.digest) {
                Some((r, _)) => r.size,
                None => match self.describe(&image.name, &target).await {
                    Ok((r, _)) => r.size,
                    Err(_) => u64::try_from(target.size).unwrap_or(0),
                },
            };
            out.push(ImageInfo {
                name: image.name,
                digest: target.digest,
                size,
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Removes image `reference` unless it is in `in_use` (FailedPrecondition).
    /// Its content and snapshots go with containerd's next garbage collection.
    pub async fn remove(
        &self,
        reference: &ImageRef,
        in_use: &HashSet<ImageRef>,
    ) -> Result<(), AgentError> {
        if in_use.contains(reference) {
            return Err(AgentError::FailedPrecondition(format!(
                "image {reference} is in use by a sandbox"
            )));
        }
        let image = self.get_image(reference.as_str()).await?;
        let req = self.ctrd.request(DeleteImageRequest {
            name: image.name.clone(),
            sync: false,
            target: None,
        });
        match self
            .ctrd
            .call(
                "delete image",
                ImagesClient::new(self.ctrd.channel()).delete(req),
            )
            .await
        {
            Ok(()) => {}
            Err(e) if e.is_not_found() => {
                return Err(AgentError::NotFound(format!("image {reference}")));
            }
            Err(e) => return Err(e),
        }
        if let Ok(target) = target_of(&image) {
            self.lock_cache().remove(&target.digest);
        }
        Ok(())
    }

    /// Keep committed snapshot `key` (derived from `image`'s rootfs, e.g. remapped
    /// for a user namespace) for as long as the image: a GC reference label named
    /// `name` on its config blob, beside the one that keeps its rootfs. Removing the
    /// image lets containerd's garbage collector take the snapshot too (once no
    /// sandbox's snapshot has it as parent).
    pub async fn keep_with_image(
        &self,
        image: &ResolvedImage,
        name: &str,
        key: &str,
    ) -> Result<(), AgentError> {
        let label = format!(
            "{}{}/{name}",
            unpack::LABEL_GC_SNAPSHOT_PREFIX,
            self.snapshotter
        );
        content::set_labels(
            &self.ctrd,
            &image.config_digest,
            [(label, key.to_owned())].into(),
        )
        .await
    }

    // --- internals ------------------------------------------------------------------

    async fn get_image(&self, name: &str) -> Result<Image, AgentError> {
        let req = self.ctrd.request(GetImageRequest {
            name: name.to_owned(),
        });
        match self
            .ctrd
            .call("get image", ImagesClient::new(self.ctrd.channel()).get(req))
            .await
        {
            Ok(resp) => resp
                .image
                .ok_or_else(|| AgentError::NotFound(format!("image {name}"))),
            Err(e) if e.is_not_found() => Err(AgentError::NotFound(format!("image {name}"))),
            Err(e) => Err(e),
        }
    }

    fn lock_cache(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Arc<ResolvedImage>, bool)>> {
        // A poisoned cache only means a panic elsewhere; its entries are still valid.
        self.cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn cached(&self, digest: &str) -> Option<(Arc<ResolvedImage>, bool)> {
        self.lock_cache().get(digest).cloned()
    }

    /// Reads index (if any), manifest and config of a stored image.
    async fn describe(
        &self,
        name: &str,
        target: &Descriptor,
    ) -> Result<(Arc<ResolvedImage>, oci::Manifest), AgentError> {
        let mut manifest_desc = target.clone();
        if is_index(&target.media_type) {
            let bytes = content::read(&self.ctrd, &target.digest).await?;
            let index: oci::Index = oci::parse_json(&bytes, &format!("index {}", target.digest))?;
            manifest_desc = oci::pick_platform(&index, host_architecture())
                .cloned()
                .ok_or_else(|| no_platform(name))?;
        }
        if !is_manifest(&manifest_desc.media_type) {
            return Err(AgentError::InvalidArgument(format!(
                "image {name}: unsupported media type {:?}",
                manifest_desc.media_type
            )));
        }
        let bytes = content::read(&self.ctrd, &manifest_desc.digest).await?;
        let manifest = oci::parse_manifest(&bytes, &format!("manifest {}", manifest_desc.digest))?;
        let config_json = content::read(&self.ctrd, &manifest.config.digest).await?;
        let config = oci::parse_config(&config_json, "image config", manifest.layers.len())?;
        let chain_id = oci::chain_ids(&config.rootfs.diff_ids)
            .pop()
            .ok_or_else(|| AgentError::InvalidArgument(format!("image {name} has no layers")))?;
        let resolved = Arc::new(ResolvedImage {
            name: name.to_owned(),
            manifest_digest: manifest_desc.digest.clone(),
            config_json,
            config_digest: manifest.config.digest.clone(),
            chain_id,
            size: image_size(&manifest),
        });
        self.lock_cache()
            .entry(target.digest.clone())
            .or_insert_with(|| (Arc::clone(&resolved), false));
        Ok((resolved, manifest))
    }

    /// Runs `f` under a fresh lease, deleting the lease afterwards whatever happened.
    async fn with_lease<T, F, Fut>(&self, f: F) -> Result<T, AgentError>
    where
        F: FnOnce(String, String) -> Fut,
        Fut: std::future::Future<Output = Result<T, AgentError>>,
    {
        let unique = unique_id();
        let lease = format!("{LEASE_PREFIX}{unique}");
        self.ctrd.create_lease(&lease, LEASE_LIFETIME).await?;
        let result = f(lease.clone(), unique).await;
        if let Err(e) = self.ctrd.delete_lease(&lease).await {
            tracing::warn!(%lease, error = %e, "deleting image lease");
        }
        result
    }

    /// Stores an image's blobs from `source`, unpacks it and records it as `name`.
    async fn ingest(
        &self,
        source: &mut Source,
        name: &str,
        top: Descriptor,
        top_bytes: Vec<u8>,
        progress: Progress<'_>,
    ) -> Result<ImageRecord, AgentError> {
        self.with_lease(|lease, unique| async move {
            self.ingest_leased(source, name, top, top_bytes, progress, &lease, &unique)
                .await
        })
        .await
    }

    #[allow(clippy::too_many_arguments)]
    async fn ingest_leased(
        &self,
        source: &mut Source,
        name: &str,
        top: Descriptor,
        top_bytes: Vec<u8>,
        progress: Progress<'_>,
        lease: &str,
        unique: &str,
    ) -> Result<ImageRecord, AgentError> {
        let mut index_doc = None;
        let (manifest_desc, manifest_bytes) = if is_index(&top.media_type) {
            let index: oci::Index = oci::parse_json(&top_bytes, &format!("index {}", top.digest))?;
            let chosen = oci::pick_platform(&index, host_architecture())
                .cloned()
                .ok_or_else(|| no_platform(name))?;
            chosen.validate("manifest")?;
            let bytes = source.small(&chosen, "manifest").await?;
            index_doc = Some((top.clone(), top_bytes));
            (chosen, bytes)
        } else if is_manifest(&top.media_type) {
            (top.clone(), top_bytes)
        } else {
            return Err(AgentError::InvalidArgument(format!(
                "image {name}: unsupported media type {:?}",
                top.media_type
            )));
        };
        let manifest = oci::parse_manifest(
            &manifest_bytes,
            &format!("manifest {}", manifest_desc.digest),
        )?;
        let config_bytes = source.small(&manifest.config, "image config").await?;
        let config = oci::parse_config(&config_bytes, "image config", manifest.layers.len())?;

        self.store_small(
            lease,
            unique,
            &manifest.config,
            BlobKind::Config,
            config_bytes,
            HashMap::new(),
            progress,
        )
        .await?;
        for (layer, diff_id) in manifest.layers.iter().zip(&config.rootfs.diff_ids) {
            let labels = [(unpack::LABEL_UNCOMPRESSED.to_owned(), diff_id.clone())].into();
            self.store_layer(source, lease, unique, layer, labels, progress)
                .await?;
        }
        let mut labels: HashMap<String, String> = [(
            "containerd.io/gc.ref.content.config".to_owned(),
            manifest.config.digest.clone(),
        )]
        .into();
        for (i, layer) in manifest.layers.iter().enumerate() {
            labels.insert(
                format!("containerd.io/gc.ref.content.l.{i}"),
                layer.digest.clone(),
            );
        }
        self.store_small(
            lease,
            unique,
            &manifest_desc,
            BlobKind::Manifest,
            manifest_bytes,
            labels,
            progress,
        )
        .await?;
        if let Some((desc, bytes)) = index_doc {
            let labels = [(
                "containerd.io/gc.ref.content.m.0".to_owned(),
                manifest_desc.digest.clone(),
            )]
            .into();
            self.store_small(
                lease,
                unique,
                &desc,
                BlobKind::Index,
                bytes,
                labels,
                progress,
            )
            .await?;
        }

        let chain_id = unpack::unpack(
            &self.ctrd,
            &self.snapshotter,
            lease,
            unique,
            &manifest.config.digest,
            &manifest.layers,
            &config.rootfs.diff_ids,
        )
        .await?;
        self.put_image(name, &top).await?;
        Ok(ImageRecord {
            name: name.to_owned(),
            target_digest: top.digest.clone(),
            manifest_digest: manifest_desc.digest.clone(),
            config_digest: manifest.config.digest.clone(),
            chain_id,
            size: image_size(&manifest),
        })
    }

    /// Writes an in-memory blob (already digest-checked by `Source::small`).
    #[allow(clippy::too_many_arguments)]
    async fn store_small(
        &self,
        lease: &str,
        unique: &str,
        desc: &Descriptor,
        kind: BlobKind,
        bytes: Vec<u8>,
        labels: HashMap<String, String>,
        progress: Progress<'_>,
    ) -> Result<(), AgentError> {
        let total = bytes.len() as u64;
        match BlobWriter::open(&self.ctrd, lease, desc, unique).await? {
            Opened::Exists => {
                content::ensure_labels(&self.ctrd, &desc.digest, &labels).await?;
                progress(event(desc, kind, total, true));
            }
            Opened::Writer(mut w) => {
                for chunk in bytes.chunks(CHUNK) {
                    w.write(chunk.to_vec()).await?;
                }
                w.commit(labels).await?;
                progress(event(desc, kind, total, false));
            }
        }
        Ok(())
    }

    /// Streams a layer from `source` into the content store unless it is there.
    async fn store_layer(
        &self,
        source: &mut Source,
        lease: &str,
        unique: &str,
        desc: &Descriptor,
        labels: HashMap<String, String>,
        progress: Progress<'_>,
    ) -> Result<(), AgentError> {
        let total = u64::try_from(desc.size).unwrap_or(0);
        match BlobWriter::open(&self.ctrd, lease, desc, unique).await? {
            Opened::Exists => {
                // An archive must still be sound even if the store has the blob.
                if let Source::Archive(index) = source {
                    verify_archive_blob(index, desc).await?;
                }
                content::ensure_labels(&self.ctrd, &desc.digest, &labels).await?;
                progress(event(desc, BlobKind::Layer, total, true));
            }
            Opened::Writer(mut w) => {
                progress(PullProgress {
                    digest: desc.digest.clone(),
                    kind: BlobKind::Layer,
                    done: 0,
                    total,
                    cached: false,
                });
                let streamed = source.stream(desc, &mut w, progress).await;
                match streamed {
                    Ok(()) => w.commit(labels).await?,
                    Err(e) => {
                        w.abort().await;
                        return Err(e);
                    }
                }
            }
        }
        Ok(())
    }

    /// Creates image record `name` -> `target`, or points an existing one at it.
    async fn put_image(&self, name: &str, target: &Descriptor) -> Result<(), AgentError> {
        let image = Image {
            name: name.to_owned(),
            labels: HashMap::new(),
            target: Some(target.to_containerd()),
            created_at: None,
            updated_at: None,
        };
        let req = self.ctrd.request(CreateImageRequest {
            image: Some(image.clone()),
            source_date_epoch: None,
        });
        match self
            .ctrd
            .call(
                "create image",
                ImagesClient::new(self.ctrd.channel()).create(req),
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.is_already_exists() => {
                let req = self.ctrd.request(UpdateImageRequest {
                    image: Some(image),
                    update_mask: Some(prost_types::FieldMask {
                        paths: vec!["target".to_owned()],
                    }),
                    source_date_epoch: None,
                });
                self.ctrd
                    .call(
                        "update image",
                        ImagesClient::new(self.ctrd.channel()).update(req),
                    )
                    .await
                    .map(|_| ())
            }
            Err(e) => Err(e),
        }
    }
}

impl Source {
    /// Fetches a small document (manifest, index, config) and checks size and digest.
    async fn small(&mut self, desc: &Descriptor, what: &str) -> Result<Vec<u8>, AgentError> {
        desc.validate(what)?;
        let size = usize::try_from(desc.size).unwrap_or(usize::MAX);
        if size > MAX_MANIFEST {
            return Err(AgentError::InvalidArgument(format!(
                "{what} {} is {size} bytes, more than {MAX_MANIFEST}",
                desc.digest
            )));
        }
        let bytes = match self {
            Source::Archive(index) => {
                let entry = index.blob(&desc.digest)?;
                read_entry(index, entry, MAX_MANIFEST as u64).await?
            }
            Source::Registry(session) => {
                let resp = session.blob(&desc.digest).await?;
                session.read_limited(resp, MAX_MANIFEST, what).await?
            }
        };
        if bytes.len() != size {
            return Err(AgentError::InvalidArgument(format!(
                "{what} {} is {} bytes, its descriptor says {size}",
                desc.digest,
                bytes.len()
            )));
        }
        let actual = oci::sha256_digest(&bytes);
        if actual != desc.digest {
            return Err(AgentError::InvalidArgument(format!(
                "{what} {} does not match its digest (content hashes to {actual})",
                desc.digest
            )));
        }
        Ok(bytes)
    }

    /// Streams blob `desc` into `w`, reporting progress per chunk.
    async fn stream(
        &mut self,
        desc: &Descriptor,
        w: &mut BlobWriter,
        progress: Progress<'_>,
    ) -> Result<(), AgentError> {
        let total = u64::try_from(desc.size).unwrap_or(0);
        let report = |w: &BlobWriter, progress: Progress<'_>| {
            progress(PullProgress {
                digest: desc.digest.clone(),
                kind: BlobKind::Layer,
                done: w.offset(),
                total,
                cached: false,
            });
        };
        match self {
            Source::Archive(index) => {
                let entry = index.blob(&desc.digest)?;
                if entry.size != total {
                    return Err(AgentError::InvalidArgument(format!(
                        "image archive: blob {} is {} bytes, its descriptor says {total}",
                        desc.digest, entry.size
                    )));
                }
                let mut file = open_archive(index).await?;
                file.seek(std::io::SeekFrom::Start(entry.offset))
                    .await
                    .map_err(|e| archive_io(index, &e))?;
                let mut left = entry.size;
                while left > 0 {
                    let n = usize::try_from(left.min(CHUNK as u64)).unwrap_or(CHUNK);
                    let mut buf = vec![0u8; n];
                    file.read_exact(&mut buf)
                        .await
                        .map_err(|e| archive_io(index, &e))?;
                    w.write(buf).await?;
                    left -= n as u64;
                    report(w, progress);
                }
            }
            Source::Registry(session) => {
                let mut resp = session.blob(&desc.digest).await?;
                let mut buf = Vec::with_capacity(CHUNK);
                loop {
                    let chunk = resp
                        .chunk()
                        .await
                        .map_err(|e| session.transport_error(&e))?;
                    let done = chunk.is_none();
                    if let Some(c) = chunk {
                        buf.extend_from_slice(&c);
                    }
                    if buf.len() >= CHUNK || (done && !buf.is_empty()) {
                        let n = buf.len().min(CHUNK);
                        let rest = buf.split_off(n);
                        w.write(std::mem::replace(&mut buf, rest)).await?;
                        report(w, progress);
                    }
                    if done && buf.is_empty() {
                        break;
                    }
                }
                if w.offset() != total {
                    return Err(AgentError::RegistryUnavailable {
                        registry: session.registry().to_owned(),
                        message: format!(
                            "blob {} ended after {} of {total} bytes",
                            desc.digest,
                            w.offset()
                        ),
                    });
                }
            }
        }
        Ok(())
    }
}

/// Hashes an archive blob without storing it (when the store already has it).
async fn verify_archive_blob(index: &ArchiveIndex, desc: &Descriptor) -> Result<(), AgentError> {
    use sha2::{Digest as _, Sha256};
    let entry = index.blob(&desc.digest)?;
    if i64::try_from(entry.size).ok() != Some(desc.size) {
        return Err(AgentError::InvalidArgument(format!(
            "image archive: blob {} is {} bytes, its descriptor says {}",
            desc.digest, entry.size, desc.size
        )));
    }
    let mut file = open_archive(index).await?;
    file.seek(std::io::SeekFrom::Start(entry.offset))
        .await
        .map_err(|e| archive_io(index, &e))?;
    let mut hasher = Sha256::new();
    let mut left = entry.size;
    let mut buf = vec![0u8; CHUNK];
    while left > 0 {
        let n = usize::try_from(left.min(CHUNK as u64)).unwrap_or(CHUNK);
        file.read_exact(&mut buf[..n])
            .await
            .map_err(|e| archive_io(index, &e))?;
        hasher.update(&buf[..n]);
        left -= n as u64;
    }
    let actual = format!("sha256:{}", hex::encode(hasher.finalize()));
    if actual != desc.digest {
        return Err(AgentError::InvalidArgument(format!(
            "image archive {}: blob {} does not match its digest (content hashes to {actual})",
            index.path().display(),
            desc.digest
        )));
    }
    Ok(())
}

async fn open_archive(index: &ArchiveIndex) -> Result<tokio::fs::File, AgentError> {
    tokio::fs::File::open(index.path())
        .await
        .map_err(|e| archive_io(index, &e))
}

fn archive_io(index: &ArchiveIndex, e: &std::io::Error) -> AgentError {
    AgentError::InvalidArgument(format!("image archive {}: {e}", index.path().display()))
}

async fn read_entry(
    index: &Arc<ArchiveIndex>,
    entry: archive::Entry,
    limit: u64,
) -> Result<Vec<u8>, AgentError> {
    let index = Arc::clone(index);
    tokio::task::spawn_blocking(move || index.read_small(entry, limit))
        .await
        .map_err(|e| AgentError::Internal(format!("archive read task: {e}")))?
}

/// The index.json entry to load: a named one (or, with a caller-given name, the
/// host platform's or the only one).
fn pick_archive_entry(layout: &oci::Index, named_by_caller: bool) -> Option<Descriptor> {
    let named = || {
        layout
            .manifests
            .iter()
            .find(|m| m.annotations.contains_key(ANNOTATION_REF_NAME))
    };
    if named_by_caller {
        oci::pick_platform(layout, host_architecture())
            .or_else(named)
            .or(layout.manifests.first())
            .cloned()
    } else {
        named().cloned()
    }
}

fn target_of(image: &Image) -> Result<Descriptor, AgentError> {
    let t = image.target.as_ref().ok_or_else(|| {
        AgentError::InvalidArgument(format!("image {} has no target", image.name))
    })?;
    Ok(Descriptor {
        media_type: t.media_type.clone(),
        digest: t.digest.clone(),
        size: t.size,
        platform: None,
        annotations: HashMap::new(),
    })
}

fn no_platform(name: &str) -> AgentError {
    AgentError::NotFound(format!(
        "a linux/{} manifest of image {name}",
        host_architecture()
    ))
}

fn image_size(manifest: &oci::Manifest) -> u64 {
    let sizes = std::iter::once(manifest.config.size).chain(manifest.layers.iter().map(|l| l.size));
    sizes.map(|s| u64::try_from(s).unwrap_or(0)).sum()
}

fn event(desc: &Descriptor, kind: BlobKind, total: u64, cached: bool) -> PullProgress {
    PullProgress {
        digest: desc.digest.clone(),
        kind,
        done: total,
        total,
        cached,
    }
}

/// A process-unique id for leases, ingest refs and extraction keys.
fn unique_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "{:x}-{:x}-{:x}",
        std::process::id(),
        nanos,
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}
