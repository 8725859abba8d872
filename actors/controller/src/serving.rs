//! The fast path's TLS: a serving certificate that may change while the controller runs.
//!
//! - [`ServingSource`]: where the certificate comes from: files (e.g. a mounted
//!   kubernetes.io/tls Secret, which the kubelet updates by swapping a symlink), or
//!   generated: issued by the controller from the gateway CA it keeps in a Secret
//!   ([`crate::tls::load_or_create_ca`], separate from the agent CA), whose certificate
//!   (never the key) it publishes in a ConfigMap of the same name for clients
//!   ([`crate::tls::publish_ca`]).
//! - [`CertSlot`]: the certificate new handshakes get, a rustls `ResolvesServerCert`
//!   over a swapped `Arc<CertifiedKey>`. Open connections keep the certificate they
//!   were accepted with.
//! - [`Refresher`]: one check of the source, run every `check_every`: files are read
//!   and installed when their content changed (and parses: a half-written pair is
//!   skipped and retried); a generated certificate is reissued when
//!   [`crate::tls::Ca::still_good_at`] says so (less than `RENEW_BEFORE` left, the CA
//!   in the Secret changed, or the names did). A failed check keeps the current
//!   certificate.
//! - [`tls_incoming`]: accepted TCP connections, TLS handshakes done concurrently
//!   (bounded, with a timeout), as the stream tonic's `serve_with_incoming` takes.
//! - [`gateway_names`]: the names a generated certificate carries (pure).

use std::{
    path::{Path, PathBuf},
    sync::{Arc, PoisonError, RwLock},
    time::{Duration, SystemTime},
};

use fsb_agent::tls::TlsMaterial;
use kube::Client;
use rustls::{
    ServerConfig,
    crypto::CryptoProvider,
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{Semaphore, mpsc},
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tokio_stream::wrappers::ReceiverStream;

use crate::tls::{GATEWAY_CA_NAME, TlsError, load_or_create_ca, publish_ca};

/// Default period of [`Refresher`] checks.
pub const DEFAULT_CHECK_EVERY: Duration = Duration::from_secs(30);
/// Handshakes in progress at most; further connections wait in the listen backlog.
const MAX_HANDSHAKES: usize = 256;
/// A client that has not finished its handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the fast path's certificate comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServingSource {
    /// A PEM certificate chain and its PEM private key, re-read when they change.
    Files {
        /// The chain, leaf first.
        cert: PathBuf,
        /// The key.
        key: PathBuf,
    },
    /// Issued from the gateway CA.
    Generated(GeneratedCert),
}

/// A certificate the controller issues itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GeneratedCert {
    /// Namespace of the CA Secret and of the ConfigMap.
    pub namespace: String,
    /// Name of the CA Secret (`ca.crt`, `ca.key`; created if missing) and of the
    /// ConfigMap publishing `ca.crt`.
    pub ca_secret: String,
    /// The certificate's names (see [`gateway_names`]).
    pub names: Vec<String>,
}

/// TLS on the fast path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FastPathTls {
    /// The certificate's source.
    pub source: ServingSource,
    /// How often the source is checked for a new certificate.
    pub check_every: Duration,
}

/// Why a serving certificate could not be had.
#[derive(Debug, thiserror::Error)]
pub enum ServingError {
    /// A file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// No certificate or no key in the PEM.
    #[error("{0}")]
    Pem(String),
    /// rustls refused the pair (a key that is not the certificate's, say).
    #[error("certificate and key: {0}")]
    Rustls(#[from] rustls::Error),
    /// The gateway CA or the API server.
    #[error("gateway CA: {0}")]
    Ca(#[from] TlsError),
}

/// The names of a generated certificate: the Service's DNS names (`service.namespace.svc`
/// first, also the common name), loopback, then `extra` (deduplicated, in order).
pub fn gateway_names(service: &str, namespace: &str, extra: &[String]) -> Vec<String> {
    let mut names = vec![
        format!("{service}.{namespace}.svc"),
        format!("{service}.{namespace}.svc.cluster.local"),
        format!("{service}.{namespace}"),
        service.to_owned(),
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ];
    for name in extra {
        let name = name.trim();
        if !name.is_empty() && !names.iter().any(|n| n == name) {
            names.push(name.to_owned());
        }
    }
    names
}

/// `Ok` if `name` can be a certificate's name: an IP address or a DNS name.
pub fn check_name(name: &str) -> Result<(), String> {
    ServerName::try_from(name.trim())
        .map(|_| ())
        .map_err(|_| format!("{name:?} is neither a DNS name nor an IP address"))
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A PEM chain (leaf first) and PEM key as rustls serves them; the key must be the
/// leaf's.
pub fn certified_key(cert_pem: &[u8], key_pem: &[u8]) -> Result<CertifiedKey, ServingError> {
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ServingError::Pem(format!("certificate: {e}")))?;
    if chain.is_empty() {
        return Err(ServingError::Pem("no certificate in the PEM".into()));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| ServingError::Pem(format!("private key: {e}")))?;
    Ok(CertifiedKey::from_der(chain, key, &provider())?)
}

/// The certificate new handshakes get.
#[derive(Debug)]
pub struct CertSlot {
    current: RwLock<Arc<CertifiedKey>>,
}

impl CertSlot {
    /// A slot holding `key`.
    pub fn new(key: CertifiedKey) -> Self {
        Self {
            current: RwLock::new(Arc::new(key)),
        }
    }

    /// The certificate now served.
    pub fn get(&self) -> Arc<CertifiedKey> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Serve `key` from the next handshake on.
    pub fn set(&self, key: CertifiedKey) {
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(key);
    }
}

impl ResolvesServerCert for CertSlot {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.get())
    }
}

/// The rustls server settings of the fast path: the slot's certificate, no client
/// certificates (callers authenticate with bearer tokens), HTTP/2 only (gRPC).
pub fn server_config(slot: Arc<CertSlot>) -> Result<Arc<ServerConfig>, ServingError> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(slot);
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// What a [`Refresher`] compares against.
enum Current {
    Files {
        cert: PathBuf,
        key: PathBuf,
        /// The contents last looked at (installed, or refused: not retried until they
        /// change again).
        seen: (Vec<u8>, Vec<u8>),
    },
    Generated {
        client: Client,
        spec: GeneratedCert,
        material: TlsMaterial,
    },
}

/// Checks a source and installs what changed into its [`CertSlot`].
pub struct Refresher {
    slot: Arc<CertSlot>,
    current: Current,
}

impl std::fmt::Debug for Refresher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let source = match &self.current {
            Current::Files { cert, .. } => format!("files {}", cert.display()),
            Current::Generated { spec, .. } => format!("generated {spec:?}"),
        };
        f.debug_struct("Refresher")
            .field("source", &source)
            .finish_non_exhaustive()
    }
}

async fn read(path: &Path) -> Result<Vec<u8>, ServingError> {
    tokio::fs::read(path)
        .await
        .map_err(|source| ServingError::Read {
            path: path.display().to_string(),
            source,
        })
}

/// The gateway CA (created if missing), published; a new certificate unless `current`
/// is still good.
async fn generate(
    client: &Client,
    spec: &GeneratedCert,
    current: Option<&TlsMaterial>,
) -> Result<Option<TlsMaterial>, ServingError> {
    let ca = load_or_create_ca(client, &spec.namespace, &spec.ca_secret, GATEWAY_CA_NAME).await?;
    if publish_ca(client, &spec.namespace, &spec.ca_secret, ca.cert_pem()).await? {
        tracing::info!(
            config_map = %format!("{}/{}", spec.namespace, spec.ca_secret),
            "published the gateway CA certificate"
        );
    }
    if current.is_some_and(|m| ca.still_good_at(m, &spec.names, SystemTime::now())) {
        return Ok(None);
    }
    Ok(Some(ca.issue_for(&spec.names)?))
}

impl Refresher {
    /// The source's certificate now, in a new slot, and what keeps it fresh.
    pub async fn start(
        client: &Client,
        source: &ServingSource,
    ) -> Result<(Arc<CertSlot>, Self), ServingError> {
        let (key, current) = match source {
            ServingSource::Files { cert, key } => {
                let seen = (read(cert).await?, read(key).await?);
                (
                    certified_key(&seen.0, &seen.1)?,
                    Current::Files {
                        cert: cert.clone(),
                        key: key.clone(),
                        seen,
                    },
                )
            }
            ServingSource::Generated(spec) => {
                let material = generate(client, spec, None)
                    .await?
                    .ok_or_else(|| ServingError::Pem("nothing issued".into()))?;
                (
                    certified_key(material.cert_pem.as_bytes(), material.key_pem.as_bytes())?,
                    Current::Generated {
                        client: client.clone(),
                        spec: spec.clone(),
                        material,
                    },
                )
            }
        };
        let slot = Arc::new(CertSlot::new(key));
        Ok((slot.clone(), Self { slot, current }))
    }

    /// One check: true if a new certificate is now served.
    pub async fn refresh(&mut self) -> Result<bool, ServingError> {
        match &mut self.current {
            Current::Files { cert, key, seen } => {
                let now = (read(cert).await?, read(key).await?);
                if now == *seen {
                    return Ok(false);
                }
                *seen = now;
                let pair = certified_key(&seen.0, &seen.1)?;
                self.slot.set(pair);
                Ok(true)
            }
            Current::Generated {
                client,
                spec,
                material,
            } => {
                let Some(fresh) = generate(client, spec, Some(material)).await? else {
                    return Ok(false);
                };
                let pair = certified_key(fresh.cert_pem.as_bytes(), fresh.key_pem.as_bytes())?;
                self.slot.set(pair);
                *material = fresh;
                Ok(true)
            }
        }
    }

    /// Check every `every` until `stop` resolves (missed ticks are skipped).
    pub async fn run(mut self, every: Duration, stop: impl std::future::Future<Output = ()>) {
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        ticks.tick().await;
        tokio::pin!(stop);
        loop {
            tokio::select! {
                () = &mut stop => return,
                _ = ticks.tick() => {}
            }
            match self.refresh().await {
                Ok(true) => tracing::info!("fast path: new certificate served"),
                Ok(false) => {}
                Err(e) => tracing::warn!("fast path: keeping the current certificate: {e}"),
            }
        }
    }
}

/// Connections accepted on `listener` after their TLS handshake with `config`, as
/// tonic's `serve_with_incoming` takes them. Handshakes run concurrently (a slow client
/// holds up nobody), at most [`MAX_HANDSHAKES`] at once, each within
/// [`HANDSHAKE_TIMEOUT`]; failed ones are dropped. Accepting stops when the stream is
/// dropped.
pub fn tls_incoming(
    listener: TcpListener,
    config: Arc<ServerConfig>,
) -> ReceiverStream<Result<TlsStream<TcpStream>, std::io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    let acceptor = TlsAcceptor::from(config);
    let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let permit = tokio::select! {
                p = handshakes.clone().acquire_owned() => p,
                () = tx.closed() => return,
            };
            let Ok(permit) = permit else { return };
            let accepted = tokio::select! {
                a = listener.accept() => a,
                () = tx.closed() => return,
            };
            let (tcp, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: pause instead of spinning.
                    tracing::warn!("fast path: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                let _permit = permit;
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, "fast path: TLS handshake: {e}"),
                    Err(_) => tracing::debug!(%peer, "fast path: TLS handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::tls::Ca;

    #[test]
    fn names_are_the_service_then_loopback_then_extra_without_repeats() {
        let names = gateway_names(
            "fsb-controller",
            "fast-sandbox-system",
            &[
                "fsb.example.com".into(),
                " localhost ".into(),
                "10.0.0.7".into(),
                String::new(),
                "fsb.example.com".into(),
            ],
        );
        assert_eq!(
            names,
            [
                "fsb-controller.fast-sandbox-system.svc",
                "fsb-controller.fast-sandbox-system.svc.cluster.local",
                "fsb-controller.fast-sandbox-system",
                "fsb-controller",
                "localhost",
                "127.0.0.1",
                "::1",
                "fsb.example.com",
                "10.0.0.7",
            ]
        );
        for n in &names {
            assert!(check_name(n).is_ok(), "{n}");
        }
        assert!(check_name("not a name").is_err());
        assert!(check_name("").is_err());
    }

    #[test]
    fn a_certificate_with_a_foreign_key_is_refused() {
        let ca = Ca::generate("test CA").unwrap();
        let a = ca.issue("localhost").unwrap();
        let b = ca.issue("localhost").unwrap();
        assert!(certified_key(a.cert_pem.as_bytes(), a.key_pem.as_bytes()).is_ok());
        assert!(certified_key(a.cert_pem.as_bytes(), b.key_pem.as_bytes()).is_err());
        assert!(certified_key(b"", a.key_pem.as_bytes()).is_err());
        assert!(certified_key(a.cert_pem.as_bytes(), b"").is_err());
    }

    #[test]
    fn the_slot_serves_what_was_set_last() {
        let ca = Ca::generate("test CA").unwrap();
        let key = |m: &TlsMaterial| certified_key(m.cert_pem.as_bytes(), m.key_pem.as_bytes());
        let (a, b) = (
            ca.issue("localhost").unwrap(),
            ca.issue("localhost").unwrap(),
        );
        let slot = CertSlot::new(key(&a).unwrap());
        let first = slot.get();
        slot.set(key(&b).unwrap());
        assert_ne!(first.cert, slot.get().cert);
        assert_eq!(
            slot.get().cert[0].as_ref(),
            CertificateDer::from_pem_slice(b.cert_pem.as_bytes())
                .unwrap()
                .as_ref()
        );
    }
}
