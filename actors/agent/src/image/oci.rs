//! OCI image-spec and Docker v2 documents: media types, descriptors, index and
//! manifest parsing, platform choice, digests and the rootfs chain id.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::error::AgentError;

/// OCI image index.
pub const MEDIA_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// OCI image manifest.
pub const MEDIA_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// Docker v2 manifest list.
pub const MEDIA_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Docker v2 schema 2 manifest.
pub const MEDIA_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

/// Annotation naming an image inside an OCI layout's index.
pub const ANNOTATION_REF_NAME: &str = "org.opencontainers.image.ref.name";

/// Whether `media_type` is an index / manifest list.
pub fn is_index(media_type: &str) -> bool {
    media_type == MEDIA_OCI_INDEX || media_type == MEDIA_DOCKER_LIST
}

/// Whether `media_type` is a single-platform manifest.
pub fn is_manifest(media_type: &str) -> bool {
    media_type == MEDIA_OCI_MANIFEST || media_type == MEDIA_DOCKER_MANIFEST
}

/// Whether containerd's diff service can apply a layer of `media_type`.
pub fn is_layer(media_type: &str) -> bool {
    matches!(
        media_type,
        "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.oci.image.layer.v1.tar+zstd"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
    )
}

/// A content descriptor (media type, digest, size), as in manifests and indexes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// Media type of the referenced content.
    #[serde(default)]
    pub media_type: String,
    /// `sha256:<hex>`.
    pub digest: String,
    /// Size in bytes.
    pub size: i64,
    /// Platform, in index entries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    /// Annotations.
    #[serde(default, skip_serializing_if = "HashMap::is_empty")]
    pub annotations: HashMap<String, String>,
}

impl Descriptor {
    /// Checks the digest's form (`sha256:` + 64 lowercase hex) and a non-negative size.
    pub fn validate(&self, what: &str) -> Result<(), AgentError> {
        check_digest(&self.digest).map_err(|why| {
            AgentError::InvalidArgument(format!("{what}: digest {:?} {why}", self.digest))
        })?;
        if self.size < 0 {
            return Err(AgentError::InvalidArgument(format!(
                "{what}: negative size {}",
                self.size
            )));
        }
        Ok(())
    }

    /// As containerd's descriptor type.
    pub fn to_containerd(&self) -> containerd_client::types::Descriptor {
        containerd_client::types::Descriptor {
            media_type: self.media_type.clone(),
            digest: self.digest.clone(),
            size: self.size,
            annotations: HashMap::new(),
        }
    }
}

/// A platform entry of an index.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Platform {
    /// e.g. `linux`.
    #[serde(default)]
    pub os: String,
    /// e.g. `amd64`.
    #[serde(default)]
    pub architecture: String,
    /// e.g. `v8`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

/// An image index or Docker manifest list.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Index {
    /// Its own media type, when it states one.
    #[serde(default)]
    pub media_type: Option<String>,
    /// The manifests it lists.
    #[serde(default)]
    pub manifests: Vec<Descriptor>,
}

/// A single-platform image manifest (OCI or Docker v2 schema 2).
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    /// Its own media type, when it states one.
    #[serde(default)]
    pub media_type: Option<String>,
    /// The image config.
    pub config: Descriptor,
    /// Layers, bottom first.
    #[serde(default)]
    pub layers: Vec<Descriptor>,
}

/// The parts of an image config the agent reads.
#[derive(Clone, Debug, Deserialize)]
pub struct ImageConfig {
    /// `rootfs.diff_ids`.
    pub rootfs: RootFs,
}

/// `rootfs` of an image config.
#[derive(Clone, Debug, Deserialize)]
pub struct RootFs {
    /// Uncompressed digests of the layers, bottom first.
    #[serde(default)]
    pub diff_ids: Vec<String>,
}

/// Parses JSON `bytes` as `T`; `what` names the document in the error.
pub fn parse_json<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    what: &str,
) -> Result<T, AgentError> {
    serde_json::from_slice(bytes)
        .map_err(|e| AgentError::InvalidArgument(format!("{what} is not valid: {e}")))
}

/// Parses a manifest and checks it (descriptor digests, layer media types).
pub fn parse_manifest(bytes: &[u8], what: &str) -> Result<Manifest, AgentError> {
    let manifest: Manifest = parse_json(bytes, what)?;
    manifest.config.validate(&format!("{what} config"))?;
    if manifest.layers.is_empty() {
        return Err(AgentError::InvalidArgument(format!("{what} has no layers")));
    }
    for (i, layer) in manifest.layers.iter().enumerate() {
        layer.validate(&format!("{what} layer {i}"))?;
        if !is_layer(&layer.media_type) {
            return Err(AgentError::InvalidArgument(format!(
                "{what} layer {i}: unsupported media type {:?}",
                layer.media_type
            )));
        }
    }
    Ok(manifest)
}

/// Parses an image config and checks its diff ids against the manifest's layers.
pub fn parse_config(bytes: &[u8], what: &str, layers: usize) -> Result<ImageConfig, AgentError> {
    let config: ImageConfig = parse_json(bytes, what)?;
    if config.rootfs.diff_ids.len() != layers {
        return Err(AgentError::InvalidArgument(format!(
            "{what} lists {} diff ids for {layers} layers",
            config.rootfs.diff_ids.len()
        )));
    }
    for id in &config.rootfs.diff_ids {
        check_digest(id)
            .map_err(|why| AgentError::InvalidArgument(format!("{what}: diff id {id:?} {why}")))?;
    }
    Ok(config)
}

/// This machine's architecture in OCI terms.
pub fn host_architecture() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// The manifest of an index for `linux/<arch>` (a manifest without platform counts
/// when it is the only one).
pub fn pick_platform<'a>(index: &'a Index, arch: &str) -> Option<&'a Descriptor> {
    let manifests: Vec<&Descriptor> = index
        .manifests
        .iter()
        .filter(|m| is_manifest(&m.media_type) || m.media_type.is_empty())
        .collect();
    manifests
        .iter()
        .copied()
        .find(|m| {
            m.platform
                .as_ref()
                .is_some_and(|p| p.os == "linux" && p.architecture == arch)
        })
        .or_else(|| match manifests.as_slice() {
            [only] if only.platform.is_none() => Some(*only),
            _ => None,
        })
}

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Checks that `digest` is `sha256:` followed by 64 lowercase hex digits.
pub fn check_digest(digest: &str) -> Result<(), &'static str> {
    let hex = digest
        .strip_prefix("sha256:")
        .ok_or("is not a sha256 digest")?;
    if hex.len() != 64
        || !hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err("is not 64 lowercase hex digits");
    }
    Ok(())
}

/// The rootfs chain id (OCI image spec): `chain(1) = diff(1)`,
/// `chain(n) = sha256(chain(n-1) + " " + diff(n))`. One entry per layer, bottom first.
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for diff in diff_ids {
        let next = match out.last() {
            None => diff.clone(),
            Some(parent) => sha256_digest(format!("{parent} {diff}").as_bytes()),
        };
        out.push(next);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids_follow_the_spec() {
        let a = format!("sha256:{}", "a".repeat(64));
        let b = format!("sha256:{}", "b".repeat(64));
        let ids = chain_ids(&[a.clone(), b.clone()]);
        assert_eq!(ids[0], a);
        assert_eq!(ids[1], sha256_digest(format!("{a} {b}").as_bytes()));
        assert!(chain_ids(&[]).is_empty());
    }

    #[test]
    fn digests_are_checked() {
        assert!(check_digest(&format!("sha256:{}", "0".repeat(64))).is_ok());
        assert!(check_digest("sha256:abc").is_err());
        assert!(check_digest(&format!("md5:{}", "0".repeat(64))).is_err());
        assert!(check_digest(&format!("sha256:{}", "A".repeat(64))).is_err());
    }

    #[test]
    fn platform_choice_prefers_linux_arch_and_accepts_a_lone_manifest() {
        let d = |arch: Option<&str>| Descriptor {
            media_type: MEDIA_OCI_MANIFEST.into(),
            digest: format!("sha256:{}", "1".repeat(64)),
            size: 1,
            platform: arch.map(|a| Platform {
                os: "linux".into(),
                architecture: a.into(),
                variant: None,
            }),
            annotations: HashMap::new(),
        };
        let index = Index {
            media_type: None,
            manifests: vec![d(Some("arm64")), d(Some("amd64"))],
        };
        assert_eq!(
            pick_platform(&index, "amd64")
                .and_then(|m| m.platform.clone())
                .map(|p| p.architecture),
            Some("amd64".to_owned())
        );
        assert!(pick_platform(&index, "s390x").is_none());
        let lone = Index {
            media_type: None,
            manifests: vec![d(None)],
        };
        assert!(pick_platform(&lone, "amd64").is_some());
    }

    #[test]
    fn manifests_without_layers_or_with_odd_layers_are_rejected() {
        let cfg = format!(
            r#"{{"config":{{"mediaType":"x","digest":"sha256:{}","size":2}},"layers":[]}}"#,
            "c".repeat(64)
        );
        assert!(parse_manifest(cfg.as_bytes(), "m").is_err());
        let odd = format!(
            r#"{{"config":{{"mediaType":"x","digest":"sha256:{0}","size":2}},
                "layers":[{{"mediaType":"text/plain","digest":"sha256:{0}","size":2}}]}}"#,
            "c".repeat(64)
        );
        let err = parse_manifest(odd.as_bytes(), "m").unwrap_err().to_string();
        assert!(err.contains("unsupported media type"), "{err}");
    }
}
