//! Finding and authenticating to the gateway: endpoint from flag/env/config or the
//! data directory's endpoint file, token from FSB_TOKEN or the 0600 token file, sent
//! as `authorization: Bearer <token>` on every call by an interceptor.

use std::time::Duration;

use fsb_local::LocalError;
use fsb_proto::fastpath::v1::{fast_path_client::FastPathClient, images_client::ImagesClient};
use tonic::{
    Request, Status,
    metadata::{Ascii, MetadataValue},
    service::{Interceptor, interceptor::InterceptedService},
    transport::{Channel, Endpoint},
};
use tonic_health::pb::health_client::HealthClient;

use crate::{config::Settings, error::CliError};

/// How long connecting may take: the gateway is local, so a slow connect means it is
/// not there.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Adds the bearer token to every request.
#[derive(Clone, Debug)]
pub(crate) struct BearerAuth(Option<MetadataValue<Ascii>>);

impl BearerAuth {
    pub(crate) fn new(token: Option<&str>) -> Result<Self, CliError> {
        token
            .map(|t| {
                format!("Bearer {t}").parse().map_err(|_| {
                    CliError::Permission(
                        "the token contains characters a header cannot carry; \
                         use the one `fsb up` wrote or fix FSB_TOKEN"
                            .to_owned(),
                    )
                })
            })
            .transpose()
            .map(Self)
    }
}

impl Interceptor for BearerAuth {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// The fast-path client with authentication.
pub(crate) type FastPath = FastPathClient<InterceptedService<Channel, BearerAuth>>;
/// The health client with authentication.
pub(crate) type Health = HealthClient<InterceptedService<Channel, BearerAuth>>;
/// The images client with authentication.
pub(crate) type Images = ImagesClient<InterceptedService<Channel, BearerAuth>>;

/// A connection to the gateway.
#[derive(Clone, Debug)]
pub(crate) struct Conn {
    pub(crate) endpoint: String,
    pub(crate) channel: Channel,
    pub(crate) token: Option<String>,
    auth: BearerAuth,
}

impl Conn {
    /// Resolve the endpoint and token, then connect.
    pub(crate) async fn connect(settings: &Settings) -> Result<Self, CliError> {
        let endpoint = endpoint(settings)?;
        let token = token(settings)?;
        let auth = BearerAuth::new(token.as_deref())?;
        let mut target = Endpoint::from_shared(endpoint.clone()).map_err(|e| {
            CliError::BadConfig(format!(
                "endpoint {endpoint:?} is not a URL ({e}); use http://127.0.0.1:PORT"
            ))
        })?;
        if endpoint.starts_with("https://") {
            target = target
                .tls_config(tls(settings.ca_file.as_deref())?)
                .map_err(|e| CliError::BadConfig(format!("TLS for {endpoint}: {e}")))?;
        } else if settings.ca_file.is_some() {
            return Err(CliError::BadConfig(format!(
                "--ca-file is for https:// endpoints, and {endpoint} is not one"
            )));
        }
        let channel = target
            .connect_timeout(CONNECT_TIMEOUT)
            .connect()
            .await
            .map_err(|e| CliError::Unreachable {
                endpoint: endpoint.clone(),
                detail: source_chain(&e),
            })?;
        Ok(Self {
            endpoint,
            channel,
            token,
            auth,
        })
    }

    pub(crate) fn fast_path(&self) -> FastPath {
        FastPathClient::with_interceptor(self.channel.clone(), self.auth.clone())
    }

    pub(crate) fn images(&self) -> Images {
        ImagesClient::with_interceptor(self.channel.clone(), self.auth.clone())
    }

    /// gRPC health, with the token too (harmless where health is open).
    pub(crate) fn health(&self) -> Health {
        HealthClient::with_interceptor(self.channel.clone(), self.auth.clone())
    }
}

/// TLS of an `https://` endpoint: trust `ca_file` only, else the system's roots.
fn tls(ca_file: Option<&std::path::Path>) -> Result<tonic::transport::ClientTlsConfig, CliError> {
    let config = tonic::transport::ClientTlsConfig::new();
    let Some(path) = ca_file else {
        return Ok(config.with_native_roots());
    };
    let pem = std::fs::read_to_string(path)
        .map_err(|e| CliError::BadConfig(format!("--ca-file {}: {e}", path.display())))?;
    if !pem.contains("-----BEGIN CERTIFICATE-----") {
        return Err(CliError::BadConfig(format!(
            "--ca-file {}: no PEM certificate in it",
            path.display()
        )));
    }
    Ok(config.ca_certificate(tonic::transport::Certificate::from_pem(pem)))
}

/// The explicit endpoint, else the endpoint file; no file means `fsb up` is not running.
pub(crate) fn endpoint(settings: &Settings) -> Result<String, CliError> {
    if let Some(e) = &settings.endpoint {
        return Ok(e.clone());
    }
    match settings.data_dir.read_endpoint() {
        Ok(url) if !url.is_empty() => Ok(url),
        Ok(_) => Err(CliError::NotRunning {
            endpoint_file: settings.endpoint_file(),
        }),
        Err(LocalError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            Err(CliError::NotRunning {
                endpoint_file: settings.endpoint_file(),
            })
        }
        Err(e) => Err(CliError::Other(anyhow::anyhow!(
            "{e}; check the data directory (--data-dir)"
        ))),
    }
}

/// FSB_TOKEN, else the token file; no token file means no header (the server will
/// answer Unauthenticated with a hint if it wants one).
pub(crate) fn token(settings: &Settings) -> Result<Option<String>, CliError> {
    if let Some(t) = &settings.token {
        return Ok(Some(t.clone()));
    }
    match settings.data_dir.read_token() {
        Ok(t) => Ok(Some(t)),
        Err(LocalError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            Ok(None)
        }
        Err(LocalError::Io { path, source }) => Err(CliError::Permission(format!(
            "cannot read the token {}: {source}; run fsb as the user who ran `fsb up`, or set FSB_TOKEN",
            path.display()
        ))),
        Err(e) => Err(CliError::Permission(e.to_string())),
    }
}

/// An error with its causes (tonic's transport errors hide the useful part there).
pub(crate) fn source_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let s_text = s.to_string();
        if !out.contains(&s_text) {
            out.push_str(": ");
            out.push_str(&s_text);
        }
        cur = s.source();
    }
    out
}
