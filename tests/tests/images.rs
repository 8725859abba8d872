//! fsb-agent's `ImageStore` against the real things: the private containerd, and two
//! local `docker-registry` instances (plain HTTP; HTTPS + basic auth) started by
//! `tests/scripts/registry.sh`. Bearer-token auth goes through a small in-test HTTP
//! front (token realm + bearer check) that forwards to the real plain registry.
//!
//! Needs the harness: `tests/run.sh containerd`. The tests in this file run one at a
//! time (a shared lock), so "no leases or extraction snapshots left" is checkable.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use containerd_client::services::v1::leases_client::LeasesClient;
use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::snapshots::{Kind, ListSnapshotsRequest, StatSnapshotRequest};
use containerd_client::services::v1::{
    GetImageRequest, InfoRequest, ListRequest, content_client::ContentClient,
    images_client::ImagesClient,
};
use containerd_client::tonic::transport::Channel;
use fsb_agent::AgentError;
use fsb_agent::containerd::{Containerd, ContainerdConfig, DEFAULT_CALL_TIMEOUT};
use fsb_agent::image::{
    BlobKind, EXTRACT_PREFIX, ImageStore, LEASE_PREFIX, PullProgress, RegistryAuth, RegistryOptions,
};
use fsb_core::{ErrorCode, HasErrorCode, ImageRef};
use fsb_tests::{ContainerdEnv, unique_id};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Mutex;

/// One test at a time in this file.
static SERIAL: Mutex<()> = Mutex::const_new(());

struct Registries {
    plain: String,
    tls: String,
    user: String,
    password: String,
    ca: PathBuf,
    repo: String,
}

fn registries() -> Result<Registries> {
    let var = |n: &str| {
        std::env::var(n).with_context(|| format!("{n} is not set: run tests/run.sh containerd"))
    };
    Ok(Registries {
        plain: var("FSB_TEST_REGISTRY")?,
        tls: var("FSB_TEST_REGISTRY_TLS")?,
        user: var("FSB_TEST_REGISTRY_USER")?,
        password: var("FSB_TEST_REGISTRY_PASSWORD")?,
        ca: PathBuf::from(var("FSB_TEST_REGISTRY_CA")?),
        repo: var("FSB_TEST_REGISTRY_REPO")?,
    })
}

async fn open_store(options: RegistryOptions) -> Result<(ContainerdEnv, Channel, ImageStore)> {
    let env = ContainerdEnv::from_env();
    let channel = env.connect().await?;
    let ctrd = Containerd::connect(ContainerdConfig {
        socket: env.socket.clone(),
        namespace: env.namespace.clone(),
        call_timeout: DEFAULT_CALL_TIMEOUT,
        runtime_root: env.runtime_root.clone(),
        runsc_binary: env.runsc.clone(),
    })
    .await?;
    let store = ImageStore::new(ctrd, &options)?;
    Ok((env, channel, store))
}

fn default_store_options() -> Result<RegistryOptions> {
    let r = registries()?;
    Ok(RegistryOptions {
        plain_http: [r.plain.clone()].into(),
        ca_files: vec![r.ca.clone()],
        ..RegistryOptions::default()
    })
}

fn image_ref(s: &str) -> Result<ImageRef> {
    ImageRef::parse("test", s).map_err(|e| anyhow::anyhow!("{e}"))
}

async fn snapshot_kind(env: &ContainerdEnv, channel: &Channel, key: &str) -> Result<Option<Kind>> {
    let resp = SnapshotsClient::new(channel.clone())
        .stat(env.request(StatSnapshotRequest {
            snapshotter: "overlayfs".into(),
            key: key.to_owned(),
        }))
        .await;
    match resp {
        Ok(r) => Ok(r.into_inner().info.map(|i| i.kind())),
        Err(s) if s.code() == containerd_client::tonic::Code::NotFound => Ok(None),
        Err(s) => Err(s.into()),
    }
}

async fn image_exists(env: &ContainerdEnv, channel: &Channel, name: &str) -> Result<bool> {
    match ImagesClient::new(channel.clone())
        .get(env.request(GetImageRequest { name: name.into() }))
        .await
    {
        Ok(_) => Ok(true),
        Err(s) if s.code() == containerd_client::tonic::Code::NotFound => Ok(false),
        Err(s) => Err(s.into()),
    }
}

/// No lease of the image module and no extraction snapshot is left.
async fn assert_nothing_left(env: &ContainerdEnv, channel: &Channel) -> Result<()> {
    let leases = LeasesClient::new(channel.clone())
        .list(env.request(ListRequest { filters: vec![] }))
        .await?
        .into_inner()
        .leases;
    let ours: Vec<_> = leases
        .iter()
        .filter(|l| l.id.starts_with(LEASE_PREFIX))
        .map(|l| l.id.clone())
        .collect();
    ensure!(ours.is_empty(), "leases left behind: {ours:?}");
    let mut stream = SnapshotsClient::new(channel.clone())
        .list(env.request(ListSnapshotsRequest {
            snapshotter: "overlayfs".into(),
            filters: vec![],
        }))
        .await?
        .into_inner();
    let mut active = Vec::new();
    while let Some(page) = stream.message().await? {
        for info in page.info {
            if info.kind() == Kind::Active && info.name.starts_with(EXTRACT_PREFIX) {
                active.push(info.name);
            }
        }
    }
    ensure!(active.is_empty(), "extraction snapshots left: {active:?}");
    Ok(())
}

// --- building small OCI archives ----------------------------------------------------

fn tar_entry(out: &mut Vec<u8>, name: &str, data: &[u8]) {
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name.as_bytes());
    h[100..107].copy_from_slice(b"0000644");
    h[108..115].copy_from_slice(b"0000000");
    h[116..123].copy_from_slice(b"0000000");
    h[124..135].copy_from_slice(format!("{:011o}", data.len()).as_bytes());
    h[136..147].copy_from_slice(b"00000000000");
    h[156] = b'0';
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
    out.extend_from_slice(&h);
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
}

fn digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// An OCI archive of a one-layer image whose layer holds a unique file, so nothing
/// of it is in containerd yet. `corrupt` flips a byte of the layer after hashing;
/// `with_index` false leaves out index.json.
fn unique_archive(dir: &Path, ref_name: &str, corrupt: bool, with_index: bool) -> Result<PathBuf> {
    let id = unique_id();
    let mut layer = Vec::new();
    tar_entry(&mut layer, "fsb-unique", id.as_bytes());
    layer.extend([0u8; 1024]);
    let layer_digest = digest(&layer);
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": { "Env": ["PATH=/bin"], "Cmd": ["/bin/sh"] },
        "rootfs": { "type": "layers", "diff_ids": [layer_digest] }
    }))?;
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": { "mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": digest(&config), "size": config.len() },
        "layers": [{ "mediaType": "application/vnd.oci.image.layer.v1.tar",
                     "digest": layer_digest, "size": layer.len() }]
    }))?;
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{ "mediaType": "application/vnd.oci.image.manifest.v1+json",
                        "digest": digest(&manifest), "size": manifest.len(),
                        "annotations": { "org.opencontainers.image.ref.name": ref_name } }]
    }))?;
    if corrupt {
        layer[600] ^= 0x55;
    }
    let mut tar = Vec::new();
    tar_entry(&mut tar, "oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#);
    if with_index {
        tar_entry(&mut tar, "index.json", &index);
    }
    for blob in [&layer, &config, &manifest] {
        let name = if std::ptr::eq(blob, &layer) {
            layer_digest.clone()
        } else {
            digest(blob)
        };
        tar_entry(
            &mut tar,
            &format!("blobs/sha256/{}", name.trim_start_matches("sha256:")),
            blob,
        );
    }
    tar.extend([0u8; 1024]);
    let path = dir.join(format!("{id}.tar"));
    std::fs::write(&path, tar)?;
    Ok(path)
}

fn test_dir() -> Result<PathBuf> {
    let env = ContainerdEnv::from_env();
    let dir = env.run_dir.join("image-tests");
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn code_of(result: Result<impl std::fmt::Debug, AgentError>) -> Result<(ErrorCode, String)> {
    match result {
        Ok(v) => bail!("expected an error, got {v:?}"),
        Err(e) => Ok((e.error_code(), e.to_string())),
    }
}

// --- archives -----------------------------------------------------------------------

#[tokio::test]
async fn load_busybox_archive_under_a_new_name_then_resolve_list_remove() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let (env, channel, store) = open_store(default_store_options()?).await?;
    let archive = env
        .image_archive
        .clone()
        .context("FSB_TEST_IMAGE_ARCHIVE is not set")?;
    let name = image_ref(&format!("fsb.test/loaded/busybox:{}", unique_id()))?;

    let started = Instant::now();
    let record = store.load_archive(&archive, Some(&name)).await?;
    eprintln!(
        "load_archive (blobs already present) took {:?}",
        started.elapsed()
    );
    ensure!(record.name == name.as_str(), "{record:?}");
    ensure!(
        snapshot_kind(&env, &channel, &record.chain_id).await? == Some(Kind::Committed),
        "chain snapshot {} is not committed",
        record.chain_id
    );

    let started = Instant::now();
    let resolved = store.resolve(&name).await?;
    let first = started.elapsed();
    let started = Instant::now();
    let again = store.resolve(&name).await?;
    eprintln!("resolve: first {first:?}, cached {:?}", started.elapsed());
    ensure!(resolved == again);
    ensure!(resolved.chain_id == record.chain_id);
    ensure!(resolved.manifest_digest == record.manifest_digest);
    let config: serde_json::Value = serde_json::from_slice(&resolved.config_json)?;
    ensure!(config["rootfs"]["diff_ids"].is_array(), "{config}");
    ensure!(
        resolved.size > 1_000_000,
        "busybox is bigger than {}",
        resolved.size
    );

    // The GC keeps the snapshot through the config's label.
    let info = ContentClient::new(channel.clone())
        .info(env.request(InfoRequest {
            digest: record.config_digest.clone(),
        }))
        .await?
        .into_inner()
        .info
        .context("no info")?;
    ensure!(
        info.labels.get("containerd.io/gc.ref.snapshot.overlayfs") == Some(&record.chain_id),
        "config labels: {:?}",
        info.labels
    );

    // Loading by the archive's own name annotation is idempotent.
    let named = store.load_archive(&archive, None).await?;
    ensure!(named.name == env.image, "{} != {}", named.name, env.image);
    ensure!(named.chain_id == record.chain_id);

    let listed = store.list().await?;
    ensure!(
        listed
            .iter()
            .any(|i| i.name == name.as_str() && i.digest == record.target_digest),
        "{listed:?}"
    );

    let in_use: HashSet<ImageRef> = [name.clone()].into();
    let (code, msg) = code_of(store.remove(&name, &in_use).await)?;
    ensure!(code == ErrorCode::FailedPrecondition, "{code:?}: {msg}");
    store.remove(&name, &HashSet::new()).await?;
    let (code, msg) = code_of(store.resolve(&name).await)?;
    ensure!(
        code == ErrorCode::NotFound && msg.contains(name.as_str()),
        "{msg}"
    );
    let (code, _) = code_of(store.remove(&name, &HashSet::new()).await)?;
    ensure!(code == ErrorCode::NotFound);
    assert_nothing_left(&env, &channel).await
}

#[tokio::test]
async fn load_a_fresh_archive_writes_content_and_unpacks_a_new_layer() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let (env, channel, store) = open_store(default_store_options()?).await?;
    let name = format!("fsb.test/fresh/img:{}", unique_id());
    let archive = unique_archive(&test_dir()?, &name, false, true)?;
    let started = Instant::now();
    let record = store.load_archive(&archive, None).await?;
    eprintln!(
        "load_archive of a new one-layer image took {:?}",
        started.elapsed()
    );
    ensure!(record.name == name, "{record:?}");
    ensure!(snapshot_kind(&env, &channel, &record.chain_id).await? == Some(Kind::Committed));
    // A second load finds everything present and is a no-op.
    let again = store.load_archive(&archive, None).await?;
    ensure!(again == record, "{again:?} != {record:?}");
    store.remove(&image_ref(&name)?, &HashSet::new()).await?;
    std::fs::remove_file(&archive)?;
    assert_nothing_left(&env, &channel).await
}

#[tokio::test]
async fn corrupt_archives_are_invalid_and_leave_nothing_behind() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let (env, channel, store) = open_store(default_store_options()?).await?;
    let dir = test_dir()?;

    // A flipped byte in a layer nobody has yet: caught while streaming it.
    let name = format!("fsb.test/corrupt/img:{}", unique_id());
    let archive = unique_archive(&dir, &name, true, true)?;
    let (code, msg) = code_of(store.load_archive(&archive, None).await)?;
    ensure!(code == ErrorCode::InvalidArgument, "{code:?}: {msg}");
    ensure!(msg.contains("does not match its digest"), "{msg}");
    ensure!(
        !image_exists(&env, &channel, &name).await?,
        "image record left"
    );
    std::fs::remove_file(&archive)?;

    // A flipped byte in the busybox archive, whose blobs containerd already has.
    let busybox = std::fs::read(env.image_archive.as_ref().context("no archive")?)?;
    let mut flipped = busybox.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x01;
    let path = dir.join(format!("{}-flipped.tar", unique_id()));
    std::fs::write(&path, &flipped)?;
    let renamed = image_ref(&format!("fsb.test/flipped/busybox:{}", unique_id()))?;
    let (code, msg) = code_of(store.load_archive(&path, Some(&renamed)).await)?;
    ensure!(code == ErrorCode::InvalidArgument, "{code:?}: {msg}");
    ensure!(!image_exists(&env, &channel, renamed.as_str()).await?);

    // Truncated.
    std::fs::write(&path, &busybox[..busybox.len() / 3])?;
    let (code, msg) = code_of(store.load_archive(&path, Some(&renamed)).await)?;
    ensure!(
        code == ErrorCode::InvalidArgument && msg.contains("truncated"),
        "{msg}"
    );
    std::fs::remove_file(&path)?;

    // No index.json.
    let archive = unique_archive(&dir, &name, false, false)?;
    let (code, msg) = code_of(store.load_archive(&archive, None).await)?;
    ensure!(
        code == ErrorCode::InvalidArgument && msg.contains("index.json"),
        "{msg}"
    );
    std::fs::remove_file(&archive)?;

    assert_nothing_left(&env, &channel).await
}

// --- registries ---------------------------------------------------------------------

#[tokio::test]
async fn pull_anonymous_over_http() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let r = registries()?;
    let (env, channel, store) = open_store(default_store_options()?).await?;
    let reference = image_ref(&format!("{}/{}", r.plain, r.repo))?;
    let mut events: Vec<PullProgress> = Vec::new();
    let started = Instant::now();
    let record = store.pull(&reference, None, |p| events.push(p)).await?;
    eprintln!("pull (content present) took {:?}", started.elapsed());
    ensure!(record.name == reference.as_str());
    let imported = store.resolve(&image_ref(&env.image)?).await?;
    ensure!(
        record.chain_id == imported.chain_id,
        "same layers, same chain"
    );
    ensure!(
        events.iter().any(|e| e.kind == BlobKind::Layer),
        "{events:?}"
    );
    ensure!(snapshot_kind(&env, &channel, &record.chain_id).await? == Some(Kind::Committed));
    store.remove(&reference, &HashSet::new()).await?;
    assert_nothing_left(&env, &channel).await
}

#[tokio::test]
async fn pull_a_fresh_image_downloads_and_unpacks_with_progress() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let r = registries()?;
    let (env, channel, store) = open_store(default_store_options()?).await?;
    let tag = unique_id();
    let archive = unique_archive(&test_dir()?, "fsb.test/unique:x", false, true)?;
    let dest = format!("{}/fsb/unique:{tag}", r.plain);
    let policy = env.run_dir.join("registry/policy.json");
    let status = std::process::Command::new("skopeo")
        .arg("--policy")
        .arg(&policy)
        .args(["copy", "-q", "--dest-tls-verify=false"])
        .arg(format!("oci-archive:{}", archive.display()))
        .arg(format!("docker://{dest}"))
        .status()?;
    ensure!(status.success(), "skopeo push of {dest} failed");
    std::fs::remove_file(&archive)?;

    let reference = image_ref(&dest)?;
    let mut events: Vec<PullProgress> = Vec::new();
    let started = Instant::now();
    let record = store.pull(&reference, None, |p| events.push(p)).await?;
    eprintln!("pull of a new one-layer image took {:?}", started.elapsed());
    let layer_done = events
        .iter()
        .any(|e| e.kind == BlobKind::Layer && !e.cached && e.done == e.total && e.total > 0);
    ensure!(layer_done, "no completed layer download in {events:?}");
    ensure!(events.iter().any(|e| e.kind == BlobKind::Config));
    ensure!(snapshot_kind(&env, &channel, &record.chain_id).await? == Some(Kind::Committed));
    let resolved = store.resolve(&reference).await?;
    ensure!(resolved.chain_id == record.chain_id);
    store.remove(&reference, &HashSet::new()).await?;
    assert_nothing_left(&env, &channel).await
}

#[tokio::test]
async fn pull_with_basic_auth_over_https_with_a_custom_ca() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let r = registries()?;
    let (env, channel, store) = open_store(default_store_options()?).await?;
    let reference = image_ref(&format!("{}/{}", r.tls, r.repo))?;
    let auth = RegistryAuth {
        username: r.user.clone(),
        password: r.password.clone(),
    };
    let record = store.pull(&reference, Some(auth), |_| {}).await?;
    ensure!(snapshot_kind(&env, &channel, &record.chain_id).await? == Some(Kind::Committed));
    store.remove(&reference, &HashSet::new()).await?;

    // Without credentials, and with a wrong password: Unauthenticated.
    let (code, msg) = code_of(store.pull(&reference, None, |_| {}).await)?;
    ensure!(code == ErrorCode::Unauthenticated, "{code:?}: {msg}");
    let wrong = RegistryAuth {
        username: r.user.clone(),
        password: "wrong".into(),
    };
    let (code, msg) = code_of(store.pull(&reference, Some(wrong), |_| {}).await)?;
    ensure!(code == ErrorCode::Unauthenticated, "{code:?}: {msg}");
    ensure!(msg.contains("rejected"), "{msg}");

    // Without the CA the certificate is not trusted: the registry is unavailable.
    let (_, _, no_ca) = store_without_ca().await?;
    let (code, msg) = code_of(no_ca.pull(&reference, None, |_| {}).await)?;
    ensure!(
        code == ErrorCode::Unavailable && msg.contains(&r.tls),
        "{code:?}: {msg}"
    );
    ensure!(!image_exists(&env, &channel, reference.as_str()).await?);
    assert_nothing_left(&env, &channel).await
}

async fn store_without_ca() -> Result<(ContainerdEnv, Channel, ImageStore)> {
    open_store(RegistryOptions::default()).await
}

#[tokio::test]
async fn pull_failures_name_what_failed() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let r = registries()?;
    let (env, channel, store) = open_store(default_store_options()?).await?;

    let unknown = image_ref(&format!("{}/fsb/busybox:no-such-tag", r.plain))?;
    let (code, msg) = code_of(store.pull(&unknown, None, |_| {}).await)?;
    ensure!(code == ErrorCode::NotFound, "{code:?}: {msg}");
    ensure!(msg.contains(unknown.as_str()), "{msg}");

    // A port nobody listens on (bound, then closed).
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?.port()
    };
    let registry = format!("127.0.0.1:{port}");
    let options = RegistryOptions {
        plain_http: [registry.clone()].into(),
        ..RegistryOptions::default()
    };
    let (_, _, plain) = open_store(options).await?;
    let unreachable = image_ref(&format!("{registry}/fsb/busybox:test"))?;
    let (code, msg) = code_of(plain.pull(&unreachable, None, |_| {}).await)?;
    ensure!(code == ErrorCode::Unavailable, "{code:?}: {msg}");
    ensure!(msg.contains(&registry), "{msg}");

    let (code, _) = code_of(
        ImageRef::parse("x", "Busybox:latest")
            .map_err(|e| AgentError::InvalidArgument(e.to_string())),
    )?;
    ensure!(code == ErrorCode::InvalidArgument);
    assert_nothing_left(&env, &channel).await
}

// --- bearer tokens ------------------------------------------------------------------

/// A bearer-auth front for the plain registry: `/token` hands out a token for basic
/// credentials; `/v2/...` answers 401 with a Bearer challenge unless the request
/// carries that token, and otherwise forwards the GET to the real registry.
async fn bearer_front(
    upstream: String,
    user: String,
    password: String,
) -> Result<(String, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?.to_string();
    let realm = format!("http://{addr}/token");
    let basic = format!("Basic {}", base64(format!("{user}:{password}").as_bytes()));
    let http = reqwest::Client::builder().no_proxy().build()?;
    let shared = Arc::new((upstream, realm, basic, http));
    let task = tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let shared = Arc::clone(&shared);
            tokio::spawn(async move {
                let _ = serve_one(&mut sock, &shared).await;
            });
        }
    });
    Ok((addr, task))
}

const TOKEN: &str = "fsb-test-token";

async fn serve_one(
    sock: &mut tokio::net::TcpStream,
    shared: &(String, String, String, reqwest::Client),
) -> Result<()> {
    let (upstream, realm, basic, http) = shared;
    let mut buf = Vec::new();
    let mut tmp = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = sock.read(&mut tmp).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&tmp[..n]);
    }
    let head = String::from_utf8_lossy(&buf).into_owned();
    let mut lines = head.split("\r\n");
    let path = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("/")
        .to_owned();
    let mut authorization = String::new();
    let mut accept = String::new();
    for line in lines {
        if let Some((k, v)) = line.split_once(':') {
            match k.trim().to_ascii_lowercase().as_str() {
                "authorization" => authorization = v.trim().to_owned(),
                "accept" => accept = v.trim().to_owned(),
                _ => {}
            }
        }
    }
    let (status, headers, body): (&str, Vec<(String, String)>, Vec<u8>) =
        if path.starts_with("/token") {
            if &authorization == basic && path.contains("scope=repository") {
                (
                    "200 OK",
                    vec![],
                    format!(r#"{{"token":"{TOKEN}"}}"#).into_bytes(),
                )
            } else {
                ("401 Unauthorized", vec![], b"{}".to_vec())
            }
        } else if authorization != format!("Bearer {TOKEN}") {
            let challenge = format!(
                r#"Bearer realm="{realm}",service="fsb-test",scope="repository:fsb/busybox:pull""#
            );
            (
                "401 Unauthorized",
                vec![("WWW-Authenticate".into(), challenge)],
                b"{}".to_vec(),
            )
        } else {
            let resp = http
                .get(format!("http://{upstream}{path}"))
                .header("Accept", accept)
                .send()
                .await?;
            let status = if resp.status().is_success() {
                "200 OK"
            } else {
                "404 Not Found"
            };
            let mut headers = Vec::new();
            for name in ["content-type", "docker-content-digest"] {
                if let Some(v) = resp.headers().get(name).and_then(|v| v.to_str().ok()) {
                    headers.push((name.to_owned(), v.to_owned()));
                }
            }
            (status, headers, resp.bytes().await?.to_vec())
        };
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str("\r\n");
    sock.write_all(out.as_bytes()).await?;
    sock.write_all(&body).await?;
    sock.shutdown().await?;
    Ok(())
}

fn base64(input: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in input.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(char::from(T[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[tokio::test]
async fn pull_with_a_bearer_token_from_the_realm() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let r = registries()?;
    let (front, task) = bearer_front(r.plain.clone(), "tok-user".into(), "tok-pass".into()).await?;
    let options = RegistryOptions {
        plain_http: [front.clone()].into(),
        ..RegistryOptions::default()
    };
    let (env, channel, store) = open_store(options).await?;
    let reference = image_ref(&format!("{front}/{}", r.repo))?;
    let auth = RegistryAuth {
        username: "tok-user".into(),
        password: "tok-pass".into(),
    };
    let result = store.pull(&reference, Some(auth), |_| {}).await;
    let wrong = store
        .pull(
            &reference,
            Some(RegistryAuth {
                username: "tok-user".into(),
                password: "nope".into(),
            }),
            |_| {},
        )
        .await;
    task.abort();
    let record = result?;
    ensure!(snapshot_kind(&env, &channel, &record.chain_id).await? == Some(Kind::Committed));
    store.remove(&reference, &HashSet::new()).await?;
    let (code, msg) = code_of(wrong)?;
    ensure!(code == ErrorCode::Unauthenticated, "{code:?}: {msg}");
    assert_nothing_left(&env, &channel).await
}
