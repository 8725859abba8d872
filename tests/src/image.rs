//! Resolving an image already in containerd's store: image record -> (index ->)
//! manifest -> config, all read through the content service, plus the rootfs chain id
//! that names the image's top snapshot.

use anyhow::{Context, Result, bail, ensure};
use containerd_client::services::v1::content_client::ContentClient;
use containerd_client::services::v1::images_client::ImagesClient;
use containerd_client::services::v1::{GetImageRequest, ReadContentRequest};
use containerd_client::tonic::transport::Channel;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::ContainerdEnv;

const INDEX_TYPES: [&str; 2] = [
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];
const MANIFEST_TYPES: [&str; 2] = [
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
];

/// An image's manifest and config, as stored in containerd.
#[derive(Debug, Clone)]
pub struct ResolvedImage {
    /// The image name in containerd.
    pub name: String,
    /// Digest of the platform manifest.
    pub manifest_digest: String,
    /// The image config (OCI image config JSON).
    pub config: Value,
    /// `rootfs.diff_ids` of the config, bottom layer first.
    pub diff_ids: Vec<String>,
    /// Chain id of the whole rootfs: the key of the image's top committed snapshot, and
    /// so the parent to prepare a container's snapshot from.
    pub chain_id: String,
}

impl ResolvedImage {
    /// `config.Env` of the image.
    pub fn env(&self) -> Vec<String> {
        self.string_list("Env")
    }

    /// `config.Entrypoint` followed by `config.Cmd`.
    pub fn default_args(&self) -> Vec<String> {
        let mut args = self.string_list("Entrypoint");
        args.extend(self.string_list("Cmd"));
        args
    }

    /// `config.WorkingDir`, `/` when unset.
    pub fn working_dir(&self) -> String {
        match self.config["config"]["WorkingDir"].as_str() {
            Some(dir) if !dir.is_empty() => dir.to_owned(),
            _ => "/".to_owned(),
        }
    }

    fn string_list(&self, key: &str) -> Vec<String> {
        self.config["config"][key]
            .as_array()
            .map(|items| {
                items
                    .iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// The rootfs chain id: `chain(1) = diff(1)`,
/// `chain(n) = sha256(chain(n-1) + " " + diff(n))` (OCI image spec, "ChainID").
pub fn chain_id<S: AsRef<str>>(diff_ids: &[S]) -> Result<String> {
    let mut ids = diff_ids.iter().map(AsRef::as_ref);
    let mut chain = ids.next().context("image has no layers")?.to_owned();
    for diff in ids {
        let digest = Sha256::digest(format!("{chain} {diff}").as_bytes());
        chain = format!("sha256:{}", hex::encode(digest));
    }
    Ok(chain)
}

/// Reads a blob from containerd's content store and checks its sha256 digest.
pub async fn read_content(env: &ContainerdEnv, channel: &Channel, digest: &str) -> Result<Vec<u8>> {
    let mut stream = ContentClient::new(channel.clone())
        .read(env.request(ReadContentRequest {
            digest: digest.to_owned(),
            offset: 0,
            size: 0, // the whole blob
        }))
        .await
        .with_context(|| format!("reading content {digest}"))?
        .into_inner();
    let mut data = Vec::new();
    while let Some(chunk) = stream
        .message()
        .await
        .with_context(|| format!("reading content {digest}"))?
    {
        data.extend_from_slice(&chunk.data);
    }
    let actual = format!("sha256:{}", hex::encode(Sha256::digest(&data)));
    ensure!(actual == digest, "content {digest} reads back as {actual}");
    Ok(data)
}

/// Resolves image `name` in the test namespace for this machine's platform.
pub async fn resolve_image(
    env: &ContainerdEnv,
    channel: &Channel,
    name: &str,
) -> Result<ResolvedImage> {
    let image = ImagesClient::new(channel.clone())
        .get(env.request(GetImageRequest {
            name: name.to_owned(),
        }))
        .await
        .with_context(|| format!("getting image {name}"))?
        .into_inner()
        .image
        .with_context(|| format!("image {name}: empty answer"))?;
    let target = image
        .target
        .with_context(|| format!("image {name} has no target"))?;

    let mut media_type = target.media_type;
    let mut digest = target.digest;
    if INDEX_TYPES.contains(&media_type.as_str()) {
        let index: Value = serde_json::from_slice(&read_content(env, channel, &digest).await?)
            .with_context(|| format!("parsing index {digest}"))?;
        let arch = oci_arch();
        let chosen = index["manifests"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|m| m["platform"]["os"] == "linux" && m["platform"]["architecture"] == arch)
            .with_context(|| format!("index {digest} has no linux/{arch} manifest"))?;
        media_type = chosen["mediaType"].as_str().unwrap_or_default().to_owned();
        digest = chosen["digest"].as_str().unwrap_or_default().to_owned();
    }
    if !MANIFEST_TYPES.contains(&media_type.as_str()) {
        bail!("image {name}: unsupported media type {media_type:?}");
    }

    let manifest: Value = serde_json::from_slice(&read_content(env, channel, &digest).await?)
        .with_context(|| format!("parsing manifest {digest}"))?;
    let config_digest = manifest["config"]["digest"]
        .as_str()
        .with_context(|| format!("manifest {digest} has no config digest"))?;
    let config: Value = serde_json::from_slice(&read_content(env, channel, config_digest).await?)
        .with_context(|| format!("parsing config {config_digest}"))?;
    let diff_ids: Vec<String> = config["rootfs"]["diff_ids"]
        .as_array()
        .with_context(|| format!("config {config_digest} has no rootfs.diff_ids"))?
        .iter()
        .map(|d| {
            d.as_str()
                .map(str::to_owned)
                .context("diff id is not a string")
        })
        .collect::<Result<_>>()?;
    let chain_id = chain_id(&diff_ids)?;
    Ok(ResolvedImage {
        name: image.name,
        manifest_digest: digest,
        config,
        diff_ids,
        chain_id,
    })
}

/// This machine's architecture in OCI terms.
fn oci_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_id_of_one_layer_is_its_diff_id() {
        assert_eq!(chain_id(&["sha256:aa"]).unwrap(), "sha256:aa");
    }

    #[test]
    fn chain_id_hashes_parent_space_diff() {
        let expected = format!(
            "sha256:{}",
            hex::encode(Sha256::digest(b"sha256:aa sha256:bb"))
        );
        assert_eq!(chain_id(&["sha256:aa", "sha256:bb"]).unwrap(), expected);
        let third = format!(
            "sha256:{}",
            hex::encode(Sha256::digest(format!("{expected} sha256:cc").as_bytes()))
        );
        assert_eq!(
            chain_id(&["sha256:aa", "sha256:bb", "sha256:cc"]).unwrap(),
            third
        );
    }

    #[test]
    fn chain_id_of_no_layers_is_an_error() {
        assert!(chain_id::<&str>(&[]).is_err());
    }
}
