//! The offline default image of local mode, [`LOCAL_IMAGE`]: built here from Debian's
//! busybox-static, with no registry, so `fsb run -- echo hello` works on a machine
//! that cannot pull.
//!
//! The image is one uncompressed layer (`bin/busybox`, a symlink per applet from
//! `busybox --list`, a minimal `/etc` with `root` and `nobody`, and the usual empty
//! directories), an image config (`Cmd ["sh"]`, `PATH`, this machine's architecture),
//! a manifest, and an OCI image layout packed as a tar archive.
//!
//! Invariant: the build is deterministic (sorted entries, mtime 0, owner 0), so the
//! manifest digest only changes when busybox changes, and [`ensure_local_image`] loads
//! the image only when containerd holds another digest (or none).

use std::{
    io::Write,
    path::{Path, PathBuf},
};

use fsb_agent::image::{ImageStore, oci::host_architecture};
use fsb_core::ImageRef;
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::LocalError;

/// The default image of local mode.
pub const LOCAL_IMAGE: &str = "fsb.local/busybox:latest";
/// Where Debian's busybox-static installs busybox.
pub const DEFAULT_BUSYBOX: &str = "/bin/busybox";

const MEDIA_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const MEDIA_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const MEDIA_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const MEDIA_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
const EPOCH: &str = "1970-01-01T00:00:00Z";
const PATH_ENV: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
const PASSWD: &str =
    "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n";
const GROUP: &str = "root:x:0:\nnogroup:x:65534:\n";
const HOSTS: &str = "127.0.0.1 localhost\n::1 localhost\n";
/// Name of the archive written into the work directory while loading.
const ARCHIVE_NAME: &str = "fsb-local-busybox.oci.tar";

/// The built image: the archive and the digests that name its parts.
#[derive(Clone, PartialEq, Eq)]
pub struct BuiltImage {
    /// The OCI layout as a tar archive.
    pub archive: Vec<u8>,
    /// Digest of the manifest: what containerd's image record points at.
    pub manifest_digest: String,
    /// Digest of the image config.
    pub config_digest: String,
    /// Digest of the (uncompressed) layer, also its diff id.
    pub layer_digest: String,
}

impl std::fmt::Debug for BuiltImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BuiltImage")
            .field("archive_len", &self.archive.len())
            .field("manifest_digest", &self.manifest_digest)
            .field("config_digest", &self.config_digest)
            .field("layer_digest", &self.layer_digest)
            .finish()
    }
}

/// What [`ensure_local_image`] found or did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalImage {
    /// The image's name in containerd ([`LOCAL_IMAGE`]).
    pub name: String,
    /// The manifest digest containerd's record points at.
    pub digest: String,
    /// True when the archive was (re)loaded; false when containerd already held it.
    pub loaded: bool,
}

/// [`LOCAL_IMAGE`] as a reference.
pub fn local_image_ref() -> Result<ImageRef, LocalError> {
    ImageRef::parse("image", LOCAL_IMAGE).map_err(|e| LocalError::Setup(e.to_string()))
}

/// Make sure containerd holds [`LOCAL_IMAGE`] built from `busybox`: nothing to do if
/// it holds the same manifest digest, else the archive is written into `work_dir`,
/// loaded, and removed. If `busybox` is missing but an image of that name is there,
/// that image is kept.
pub async fn ensure_local_image(
    images: &ImageStore,
    work_dir: &Path,
    busybox: &Path,
) -> Result<LocalImage, LocalError> {
    let reference = local_image_ref()?;
    let present = images
        .list()
        .await?
        .into_iter()
        .find(|i| i.name == reference.as_str());
    let built = {
        let busybox = busybox.to_owned();
        tokio::task::spawn_blocking(move || build_from(&busybox))
            .await
            .map_err(|e| LocalError::Setup(format!("building the busybox image: {e}")))?
    };
    let built = match (built, present) {
        (Ok(built), Some(present)) if present.digest == built.manifest_digest => {
            return Ok(LocalImage {
                name: present.name,
                digest: present.digest,
                loaded: false,
            });
        }
        (Ok(built), _) => built,
        (Err(e), Some(present)) => {
            tracing::warn!("{e}; keeping the {} already in containerd", present.name);
            return Ok(LocalImage {
                name: present.name,
                digest: present.digest,
                loaded: false,
            });
        }
        (Err(e), None) => return Err(e),
    };
    std::fs::create_dir_all(work_dir).map_err(|e| LocalError::io(work_dir, e))?;
    let path = work_dir.join(ARCHIVE_NAME);
    write_file(&path, &built.archive)?;
    let loaded = images.load_archive(&path, Some(&reference)).await;
    let _ = std::fs::remove_file(&path);
    let record = loaded?;
    tracing::info!(image = %record.name, digest = %record.target_digest, "loaded the local busybox image");
    Ok(LocalImage {
        name: record.name,
        digest: record.target_digest,
        loaded: true,
    })
}

/// Build the image from the busybox binary at `busybox` (its applets from
/// `busybox --list`) for this machine's architecture.
pub fn build_from(busybox: &Path) -> Result<BuiltImage, LocalError> {
    let binary = std::fs::read(busybox).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => LocalError::Setup(format!(
            "{} not found: the default image is built from busybox; apt-get install \
             busybox-static",
            busybox.display()
        )),
        _ => LocalError::io(busybox, e),
    })?;
    let applets = applets(busybox)?;
    build_image(&binary, &applets, host_architecture())
}

/// The applet names `busybox --list` prints (names that are not plain file names are
/// left out).
pub fn applets(busybox: &Path) -> Result<Vec<String>, LocalError> {
    let out = std::process::Command::new(busybox)
        .arg("--list")
        .output()
        .map_err(|e| LocalError::io(busybox, e))?;
    if !out.status.success() {
        return Err(LocalError::Setup(format!(
            "`{} --list` failed ({}): is it busybox? apt-get install busybox-static",
            busybox.display(),
            out.status
        )));
    }
    let list = String::from_utf8_lossy(&out.stdout);
    let mut names: Vec<String> = list
        .lines()
        .map(str::trim)
        .filter(|n| valid_applet(n))
        .map(str::to_owned)
        .collect();
    names.sort();
    names.dedup();
    if names.is_empty() {
        return Err(LocalError::Setup(format!(
            "`{} --list` printed no applets: is it busybox? apt-get install busybox-static",
            busybox.display()
        )));
    }
    Ok(names)
}

fn valid_applet(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && name != "busybox"
        && !name.contains(['/', '\0'])
        && !name.contains(char::is_whitespace)
}

/// The image from busybox's bytes and its applet names, for `arch` (OCI name, e.g.
/// `amd64`). Pure and deterministic.
pub fn build_image(
    busybox: &[u8],
    applets: &[String],
    arch: &str,
) -> Result<BuiltImage, LocalError> {
    let layer = layer_tar(busybox, applets)?;
    let layer_digest = sha256(&layer);

    let config = serde_json::to_vec(&json!({
        "created": EPOCH,
        "architecture": arch,
        "os": "linux",
        "config": {
            "Env": [PATH_ENV],
            "Cmd": ["sh"],
            "WorkingDir": "/",
        },
        "rootfs": { "type": "layers", "diff_ids": [layer_digest] },
        "history": [{ "created": EPOCH, "created_by": "fast-sandbox fsb-local busybox image" }],
    }))
    .map_err(json_error)?;
    let config_digest = sha256(&config);

    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": { "mediaType": MEDIA_CONFIG, "digest": config_digest, "size": config.len() },
        "layers": [{ "mediaType": MEDIA_LAYER, "digest": layer_digest, "size": layer.len() }],
    }))
    .map_err(json_error)?;
    let manifest_digest = sha256(&manifest);

    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_INDEX,
        "manifests": [{
            "mediaType": MEDIA_MANIFEST,
            "digest": manifest_digest,
            "size": manifest.len(),
            "platform": { "architecture": arch, "os": "linux" },
            "annotations": {
                "org.opencontainers.image.ref.name": LOCAL_IMAGE,
                "io.containerd.image.name": LOCAL_IMAGE,
            },
        }],
    }))
    .map_err(json_error)?;

    let blob = |digest: &str| format!("blobs/sha256/{}", digest.trim_start_matches("sha256:"));
    let mut entries = vec![
        Entry::dir("blobs/", 0o755),
        Entry::dir("blobs/sha256/", 0o755),
        Entry::file(&blob(&config_digest), 0o644, config),
        Entry::file(&blob(&layer_digest), 0o644, layer),
        Entry::file(&blob(&manifest_digest), 0o644, manifest),
        Entry::file("index.json", 0o644, index),
        Entry::file(
            "oci-layout",
            0o644,
            br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(),
        ),
    ];
    let archive = tar_of(&mut entries)?;
    Ok(BuiltImage {
        archive,
        manifest_digest,
        config_digest,
        layer_digest,
    })
}

/// The rootfs layer.
fn layer_tar(busybox: &[u8], applets: &[String]) -> Result<Vec<u8>, LocalError> {
    let mut entries = vec![
        Entry::dir("bin/", 0o755),
        Entry::file("bin/busybox", 0o755, busybox.to_vec()),
        Entry::dir("dev/", 0o755),
        Entry::dir("etc/", 0o755),
        Entry::file("etc/group", 0o644, GROUP.as_bytes().to_vec()),
        Entry::file("etc/hosts", 0o644, HOSTS.as_bytes().to_vec()),
        Entry::file("etc/passwd", 0o644, PASSWD.as_bytes().to_vec()),
        Entry::file("etc/resolv.conf", 0o644, Vec::new()),
        Entry::dir("proc/", 0o555),
        Entry::dir("root/", 0o700),
        Entry::dir("run/", 0o755),
        Entry::dir("sys/", 0o555),
        Entry::dir("tmp/", 0o1777),
        Entry::dir("var/", 0o755),
        Entry::dir("var/run/", 0o755),
        Entry::dir("var/tmp/", 0o1777),
    ];
    for applet in applets.iter().filter(|a| valid_applet(a)) {
        entries.push(Entry::symlink(&format!("bin/{applet}"), "busybox"));
    }
    tar_of(&mut entries)
}

enum Kind {
    Dir,
    File(Vec<u8>),
    Symlink(String),
}

struct Entry {
    path: String,
    mode: u32,
    kind: Kind,
}

impl Entry {
    fn dir(path: &str, mode: u32) -> Self {
        Self {
            path: path.to_owned(),
            mode,
            kind: Kind::Dir,
        }
    }

    fn file(path: &str, mode: u32, data: Vec<u8>) -> Self {
        Self {
            path: path.to_owned(),
            mode,
            kind: Kind::File(data),
        }
    }

    fn symlink(path: &str, target: &str) -> Self {
        Self {
            path: path.to_owned(),
            mode: 0o777,
            kind: Kind::Symlink(target.to_owned()),
        }
    }
}

/// A reproducible tar: entries sorted by name, owner 0:0, mtime 0, GNU headers.
fn tar_of(entries: &mut [Entry]) -> Result<Vec<u8>, LocalError> {
    entries.sort_by(|a, b| a.path.cmp(&b.path));
    let mut builder = tar::Builder::new(Vec::new());
    for entry in entries.iter() {
        let mut header = tar::Header::new_gnu();
        header.set_mode(entry.mode);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(0);
        let appended = match &entry.kind {
            Kind::Dir => {
                header.set_entry_type(tar::EntryType::Directory);
                header.set_size(0);
                builder.append_data(&mut header, &entry.path, std::io::empty())
            }
            Kind::File(data) => {
                header.set_entry_type(tar::EntryType::Regular);
                header.set_size(data.len() as u64);
                builder.append_data(&mut header, &entry.path, data.as_slice())
            }
            Kind::Symlink(target) => {
                header.set_entry_type(tar::EntryType::Symlink);
                header.set_size(0);
                builder.append_link(&mut header, &entry.path, target)
            }
        };
        appended.map_err(|e| LocalError::Setup(format!("building the image tar: {e}")))?;
    }
    builder
        .into_inner()
        .map_err(|e| LocalError::Setup(format!("building the image tar: {e}")))
}

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

fn json_error(e: serde_json::Error) -> LocalError {
    LocalError::Setup(format!("encoding the image's JSON: {e}"))
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), LocalError> {
    let tmp: PathBuf = path.with_extension("tmp");
    let mut file = std::fs::File::create(&tmp).map_err(|e| LocalError::io(&tmp, e))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(|e| LocalError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| LocalError::io(path, e))
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, io::Read, os::unix::fs::PermissionsExt};

    use fsb_agent::image::oci::{Index, parse_config, parse_json, parse_manifest, pick_platform};

    use super::*;

    struct Parsed {
        /// path -> (entry type, link name, data, mode)
        entries: BTreeMap<String, (tar::EntryType, Option<String>, Vec<u8>, u32)>,
        order: Vec<String>,
    }

    fn parse_tar(bytes: &[u8]) -> Parsed {
        let mut archive = tar::Archive::new(bytes);
        let mut entries = BTreeMap::new();
        let mut order = Vec::new();
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            let header = entry.header().clone();
            assert_eq!(header.mtime().unwrap(), 0);
            assert_eq!((header.uid().unwrap(), header.gid().unwrap()), (0, 0));
            let path = entry.path().unwrap().display().to_string();
            let link = entry.link_name().unwrap().map(|l| l.display().to_string());
            let mut data = Vec::new();
            entry.read_to_end(&mut data).unwrap();
            order.push(path.clone());
            entries.insert(
                path,
                (header.entry_type(), link, data, header.mode().unwrap()),
            );
        }
        Parsed { entries, order }
    }

    fn blob<'a>(p: &'a Parsed, digest: &str) -> &'a [u8] {
        let path = format!("blobs/sha256/{}", digest.strip_prefix("sha256:").unwrap());
        let data = &p.entries.get(&path).unwrap_or_else(|| panic!("{path}")).2;
        assert_eq!(sha256(data), digest, "{path} content matches its name");
        data
    }

    fn sample() -> BuiltImage {
        let applets: Vec<String> = ["sh", "echo", "ls", "[", "[["]
            .iter()
            .map(|s| s.to_string())
            .collect();
        build_image(b"\x7fELF not really busybox", &applets, "amd64").unwrap()
    }

    #[test]
    fn archive_parses_back_and_every_digest_matches() {
        let built = sample();
        let outer = parse_tar(&built.archive);
        let mut sorted = outer.order.clone();
        sorted.sort();
        assert_eq!(outer.order, sorted, "entries are sorted");
        assert_eq!(
            outer.entries["oci-layout"].2,
            br#"{"imageLayoutVersion":"1.0.0"}"#
        );

        // index.json -> manifest (through the agent's own parser and platform choice).
        let index: Index = parse_json(&outer.entries["index.json"].2, "index.json").unwrap();
        let entry = pick_platform(&index, "amd64").unwrap();
        assert_eq!(entry.digest, built.manifest_digest);
        assert_eq!(
            entry.annotations["org.opencontainers.image.ref.name"],
            LOCAL_IMAGE
        );
        let manifest_bytes = blob(&outer, &entry.digest);
        assert_eq!(entry.size as usize, manifest_bytes.len());
        let manifest = parse_manifest(manifest_bytes, "manifest").unwrap();

        // manifest -> config + layer.
        assert_eq!(manifest.config.digest, built.config_digest);
        let config_bytes = blob(&outer, &manifest.config.digest);
        assert_eq!(manifest.config.size as usize, config_bytes.len());
        let config = parse_config(config_bytes, "config", 1).unwrap();
        assert_eq!(manifest.layers.len(), 1);
        let layer = &manifest.layers[0];
        assert_eq!(layer.media_type, MEDIA_LAYER);
        assert_eq!(layer.digest, built.layer_digest);
        assert_eq!(config.rootfs.diff_ids, vec![built.layer_digest.clone()]);
        let layer_bytes = blob(&outer, &layer.digest);
        assert_eq!(layer.size as usize, layer_bytes.len());

        let doc: serde_json::Value = serde_json::from_slice(config_bytes).unwrap();
        assert_eq!(doc["architecture"], "amd64");
        assert_eq!(doc["os"], "linux");
        assert_eq!(doc["config"]["Cmd"], json!(["sh"]));
        assert_eq!(doc["config"]["Env"], json!([PATH_ENV]));

        // The rootfs.
        let rootfs = parse_tar(layer_bytes);
        let (kind, _, data, mode) = &rootfs.entries["bin/busybox"];
        assert_eq!(*kind, tar::EntryType::Regular);
        assert_eq!(data.as_slice(), b"\x7fELF not really busybox");
        assert_eq!(*mode, 0o755);
        for applet in ["sh", "echo", "ls", "[", "[["] {
            let (kind, link, _, _) = &rootfs.entries[&format!("bin/{applet}")];
            assert_eq!(*kind, tar::EntryType::Symlink, "{applet}");
            assert_eq!(link.as_deref(), Some("busybox"), "{applet}");
        }
        for dir in [
            "dev/", "proc/", "sys/", "tmp/", "var/", "run/", "root/", "etc/",
        ] {
            assert_eq!(rootfs.entries[dir].0, tar::EntryType::Directory, "{dir}");
        }
        assert_eq!(rootfs.entries["tmp/"].3, 0o1777);
        let passwd = String::from_utf8(rootfs.entries["etc/passwd"].2.clone()).unwrap();
        assert!(passwd.starts_with("root:x:0:0:") && passwd.contains("\nnobody:x:65534:"));
        let group = String::from_utf8(rootfs.entries["etc/group"].2.clone()).unwrap();
        assert!(group.starts_with("root:x:0:"));
    }

    #[test]
    fn builds_are_reproducible() {
        let a = sample();
        let b = sample();
        assert_eq!(a.archive, b.archive);
        assert_eq!(a.manifest_digest, b.manifest_digest);
        // Another busybox is another image.
        let other = build_image(b"other", &["sh".to_owned()], "amd64").unwrap();
        assert_ne!(other.manifest_digest, a.manifest_digest);
        // Applet order does not matter, odd names are left out.
        let shuffled: Vec<String> = ["[[", "ls", "../x", "echo", "[", "sh", "busybox", ""]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let c = build_image(b"\x7fELF not really busybox", &shuffled, "amd64").unwrap();
        assert_eq!(c.manifest_digest, a.manifest_digest);
    }

    #[test]
    fn applets_come_from_busybox_list() {
        let tmp = tempfile::tempdir().unwrap();
        let fake = tmp.path().join("busybox");
        std::fs::write(
            &fake,
            "#!/bin/sh\n[ \"$1\" = --list ] || exit 1\nprintf 'sh\\nls\\n[\\nbusybox\\nsh\\n'\n",
        )
        .unwrap();
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(applets(&fake).unwrap(), vec!["[", "ls", "sh"]);
        // Built twice from the same file: the same digest.
        let a = build_from(&fake).unwrap();
        let b = build_from(&fake).unwrap();
        assert_eq!(a.manifest_digest, b.manifest_digest);
        let rootfs = parse_tar(blob(&parse_tar(&a.archive), &a.layer_digest));
        assert_eq!(
            rootfs.entries["bin/sh"].1.as_deref(),
            Some("busybox"),
            "bin/sh -> busybox"
        );
    }

    #[test]
    fn a_missing_busybox_says_what_to_install() {
        let err = build_from(Path::new("/nonexistent/busybox"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("apt-get install busybox-static"), "{err}");
    }

    #[test]
    fn the_local_image_reference_is_already_normalized() {
        assert_eq!(local_image_ref().unwrap().as_str(), LOCAL_IMAGE);
    }
}
