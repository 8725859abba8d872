//! OCI distribution client (pull side): manifests and blobs over HTTP or HTTPS, with
//! basic auth and the bearer-token dance (`WWW-Authenticate: Bearer realm=...,
//! service=...,scope=...` -> token from the realm -> retry).
//!
//! Error mapping: connection failures (refused, TLS, timeouts) are
//! [`AgentError::RegistryUnavailable`] naming the registry; 401/403 are
//! [`AgentError::Unauthenticated`]; a 404 manifest is NotFound naming the image.

use std::{collections::HashSet, fmt, path::PathBuf, time::Duration};

use reqwest::{Response, StatusCode, header};

use super::oci::{
    MEDIA_DOCKER_LIST, MEDIA_DOCKER_MANIFEST, MEDIA_OCI_INDEX, MEDIA_OCI_MANIFEST, sha256_digest,
};
use crate::error::AgentError;

/// Largest manifest or index we accept.
pub(crate) const MAX_MANIFEST: usize = 4 << 20;
/// Where `docker.io` images are served from.
const DOCKER_HUB_HOST: &str = "registry-1.docker.io";

/// Credentials for a registry (basic auth, also sent to a bearer token realm).
#[derive(Clone, PartialEq, Eq)]
pub struct RegistryAuth {
    /// User name.
    pub username: String,
    /// Password or access token.
    pub password: String,
}

impl fmt::Debug for RegistryAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegistryAuth")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// How the agent reaches registries.
#[derive(Clone, Debug)]
pub struct RegistryOptions {
    /// Registries (`host[:port]`, as in the image reference) spoken to over plain
    /// HTTP; every other registry is HTTPS.
    pub plain_http: HashSet<String>,
    /// PEM files of extra CA certificates trusted for HTTPS registries (on top of the
    /// bundled web PKI roots).
    pub ca_files: Vec<PathBuf>,
    /// Deadline for connecting to a registry.
    pub connect_timeout: Duration,
    /// Deadline for each read from a registry (a stalled download fails after it).
    pub read_timeout: Duration,
}

impl Default for RegistryOptions {
    fn default() -> Self {
        Self {
            plain_http: HashSet::new(),
            ca_files: Vec::new(),
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(60),
        }
    }
}

/// An HTTP client configured for registries. Cheap to clone.
#[derive(Clone, Debug)]
pub(crate) struct RegistryClient {
    http: reqwest::Client,
    plain_http: HashSet<String>,
}

impl RegistryClient {
    /// Builds the client; an unreadable or invalid CA file is InvalidArgument.
    pub(crate) fn new(options: &RegistryOptions) -> Result<Self, AgentError> {
        let mut builder = reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(options.connect_timeout)
            .read_timeout(options.read_timeout)
            .user_agent(concat!("fast-sandbox-agent/", env!("CARGO_PKG_VERSION")));
        for path in &options.ca_files {
            let pem = std::fs::read(path).map_err(|e| {
                AgentError::InvalidArgument(format!("CA file {}: {e}", path.display()))
            })?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                AgentError::InvalidArgument(format!("CA file {}: {e}", path.display()))
            })?;
            if certs.is_empty() {
                return Err(AgentError::InvalidArgument(format!(
                    "CA file {} holds no certificate",
                    path.display()
                )));
            }
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        let http = builder
            .build()
            .map_err(|e| AgentError::Internal(format!("building the HTTP client: {e}")))?;
        Ok(Self {
            http,
            plain_http: options.plain_http.clone(),
        })
    }

    /// A session for one repository of one registry.
    pub(crate) fn session(
        &self,
        registry: &str,
        repository: &str,
        auth: Option<RegistryAuth>,
    ) -> Session {
        let host = if registry == "docker.io" {
            DOCKER_HUB_HOST
        } else {
            registry
        };
        let scheme = if self.plain_http.contains(registry) {
            "http"
        } else {
            "https"
        };
        Session {
            http: self.http.clone(),
            base: format!("{scheme}://{host}/v2/{repository}"),
            registry: registry.to_owned(),
            repository: repository.to_owned(),
            auth,
            authorization: None,
        }
    }
}

/// Requests to one repository, remembering the authorization that worked.
#[derive(Debug)]
pub(crate) struct Session {
    http: reqwest::Client,
    base: String,
    registry: String,
    repository: String,
    auth: Option<RegistryAuth>,
    authorization: Option<String>,
}

/// A fetched manifest or index.
#[derive(Debug)]
pub(crate) struct FetchedManifest {
    /// Media type from the response's Content-Type (or the document).
    pub(crate) media_type: String,
    /// sha256 of the bytes.
    pub(crate) digest: String,
    /// The document.
    pub(crate) bytes: Vec<u8>,
}

impl Session {
    /// The registry host, for messages.
    pub(crate) fn registry(&self) -> &str {
        &self.registry
    }

    /// GETs the manifest `reference` (tag or digest); `image` names it in errors.
    pub(crate) async fn manifest(
        &mut self,
        reference: &str,
        image: &str,
    ) -> Result<FetchedManifest, AgentError> {
        let url = format!("{}/manifests/{reference}", self.base);
        let accept = [
            MEDIA_OCI_INDEX,
            MEDIA_OCI_MANIFEST,
            MEDIA_DOCKER_LIST,
            MEDIA_DOCKER_MANIFEST,
        ]
        .join(", ");
        let resp = self.get(&url, Some(&accept)).await?;
        match resp.status() {
            s if s.is_success() => {}
            StatusCode::NOT_FOUND => return Err(AgentError::NotFound(format!("image {image}"))),
            s => return Err(self.status_error(s, &format!("manifest of {image}"))),
        }
        let header_digest = resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let content_type = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(';').next().unwrap_or(v).trim().to_owned())
            .unwrap_or_default();
        let bytes = self.read_limited(resp, MAX_MANIFEST, image).await?;
        let digest = sha256_digest(&bytes);
        if let Some(h) = header_digest.filter(|h| h.starts_with("sha256:") && *h != digest) {
            return Err(AgentError::InvalidArgument(format!(
                "registry {} sent a manifest for {image} hashing to {digest}, not {h}",
                self.registry
            )));
        }
        if reference.starts_with("sha256:") && reference != digest {
            return Err(AgentError::InvalidArgument(format!(
                "registry {} sent manifest {digest} for {image}, asked for {reference}",
                self.registry
            )));
        }
        // The document's own mediaType wins over a generic Content-Type.
        let media_type = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| v["mediaType"].as_str().map(str::to_owned))
            .filter(|m| !m.is_empty())
            .unwrap_or(content_type);
        Ok(FetchedManifest {
            media_type,
            digest,
            bytes,
        })
    }

    /// GETs blob `digest`; the caller streams the body with `Response::chunk`.
    pub(crate) async fn blob(&mut self, digest: &str) -> Result<Response, AgentError> {
        let url = format!("{}/blobs/{digest}", self.base);
        let resp = self.get(&url, None).await?;
        match resp.status() {
            s if s.is_success() => Ok(resp),
            StatusCode::NOT_FOUND => Err(AgentError::NotFound(format!(
                "blob {digest} in {}/{}",
                self.registry, self.repository
            ))),
            s => Err(self.status_error(s, &format!("blob {digest}"))),
        }
    }

    /// Reads at most `limit` bytes of a body.
    pub(crate) async fn read_limited(
        &self,
        mut resp: Response,
        limit: usize,
        what: &str,
    ) -> Result<Vec<u8>, AgentError> {
        let mut out = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| self.transport_error(&e))? {
            if out.len() + chunk.len() > limit {
                return Err(AgentError::InvalidArgument(format!(
                    "{what}: document from {} exceeds {limit} bytes",
                    self.registry
                )));
            }
            out.extend_from_slice(&chunk);
        }
        Ok(out)
    }

    /// A transport error while talking to this registry.
    pub(crate) fn transport_error(&self, e: &reqwest::Error) -> AgentError {
        AgentError::RegistryUnavailable {
            registry: self.registry.clone(),
            message: error_chain(e),
        }
    }

    /// GET with our authorization; on 401 answer the challenge once and retry.
    async fn get(&mut self, url: &str, accept: Option<&str>) -> Result<Response, AgentError> {
        let resp = self.send(url, accept).await?;
        if resp.status() != StatusCode::UNAUTHORIZED {
            return Ok(resp);
        }
        let challenge = resp
            .headers()
            .get(header::WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .and_then(Challenge::parse);
        let had_authorization = self.authorization.is_some();
        let Some(challenge) = challenge else {
            return Err(AgentError::Unauthenticated(format!(
                "registry {} answered 401 without a usable WWW-Authenticate challenge",
                self.registry
            )));
        };
        if had_authorization && challenge.scheme == Scheme::Basic {
            return Err(self.rejected());
        }
        self.authorize(&challenge).await?;
        let resp = self.send(url, accept).await?;
        if resp.status() == StatusCode::UNAUTHORIZED {
            return Err(self.rejected());
        }
        Ok(resp)
    }

    async fn send(&self, url: &str, accept: Option<&str>) -> Result<Response, AgentError> {
        let mut req = self.http.get(url);
        if let Some(a) = accept {
            req = req.header(header::ACCEPT, a);
        }
        if let Some(auth) = &self.authorization {
            req = req.header(header::AUTHORIZATION, auth);
        }
        req.send().await.map_err(|e| self.transport_error(&e))
    }

    /// Sets `self.authorization` from a challenge: basic credentials, or a bearer
    /// token fetched from the realm (with basic credentials when we have them).
    async fn authorize(&mut self, challenge: &Challenge) -> Result<(), AgentError> {
        match challenge.scheme {
            Scheme::Basic => {
                let auth = self.auth.as_ref().ok_or_else(|| self.needs_credentials())?;
                self.authorization = Some(basic_header(auth));
                Ok(())
            }
            Scheme::Bearer => {
                let realm = challenge.param("realm").ok_or_else(|| {
                    AgentError::Unauthenticated(format!(
                        "registry {} sent a bearer challenge without a realm",
                        self.registry
                    ))
                })?;
                let default_scope = format!("repository:{}:pull", self.repository);
                let scope = challenge.param("scope").unwrap_or(&default_scope);
                let mut query: Vec<(&str, &str)> = vec![("scope", scope)];
                if let Some(service) = challenge.param("service") {
                    query.push(("service", service));
                }
                let mut req = self.http.get(realm).query(&query);
                if let Some(auth) = &self.auth {
                    req = req.header(header::AUTHORIZATION, basic_header(auth));
                }
                let resp = req
                    .send()
                    .await
                    .map_err(|e| AgentError::RegistryUnavailable {
                        registry: format!("{} (token realm {realm})", self.registry),
                        message: error_chain(&e),
                    })?;
                match resp.status() {
                    s if s.is_success() => {}
                    StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                        return Err(if self.auth.is_some() {
                            self.rejected()
                        } else {
                            self.needs_credentials()
                        });
                    }
                    s => {
                        return Err(AgentError::RegistryUnavailable {
                            registry: self.registry.clone(),
                            message: format!("token realm {realm} answered {s}"),
                        });
                    }
                }
                let body = self.read_limited(resp, 1 << 20, "token").await?;
                let token = parse_token(&body).ok_or_else(|| {
                    AgentError::Unauthenticated(format!(
                        "token realm {realm} of registry {} returned no token",
                        self.registry
                    ))
                })?;
                self.authorization = Some(format!("Bearer {token}"));
                Ok(())
            }
        }
    }

    fn needs_credentials(&self) -> AgentError {
        AgentError::Unauthenticated(format!(
            "registry {} requires credentials for {}",
            self.registry, self.repository
        ))
    }

    fn rejected(&self) -> AgentError {
        match &self.auth {
            Some(a) => AgentError::Unauthenticated(format!(
                "registry {} rejected the credentials of user {:?} for {}",
                self.registry, a.username, self.repository
            )),
            None => self.needs_credentials(),
        }
    }

    fn status_error(&self, status: StatusCode, what: &str) -> AgentError {
        match status {
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => AgentError::Unauthenticated(
                format!("registry {} denied {what} ({status})", self.registry),
            ),
            s if s.is_server_error() || s == StatusCode::TOO_MANY_REQUESTS => {
                AgentError::RegistryUnavailable {
                    registry: self.registry.clone(),
                    message: format!("{what}: {s}"),
                }
            }
            s => AgentError::Internal(format!(
                "registry {} answered {s} for {what}",
                self.registry
            )),
        }
    }
}

fn basic_header(auth: &RegistryAuth) -> String {
    format!(
        "Basic {}",
        base64_encode(format!("{}:{}", auth.username, auth.password).as_bytes())
    )
}

/// `token` or `access_token` of a token realm's JSON answer.
pub(crate) fn parse_token(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    ["token", "access_token"]
        .iter()
        .find_map(|k| v[*k].as_str().filter(|t| !t.is_empty()).map(str::to_owned))
}

/// The error and its sources, `: `-joined (reqwest's top line alone hides the cause).
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// Authentication scheme of a challenge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Scheme {
    /// `Basic realm=...`.
    Basic,
    /// `Bearer realm=...,service=...,scope=...`.
    Bearer,
}

/// A parsed `WWW-Authenticate` challenge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Challenge {
    pub(crate) scheme: Scheme,
    pub(crate) params: Vec<(String, String)>,
}

impl Challenge {
    /// Parses `Scheme k="v", k2=v2` (quoted values may hold commas and `\"`).
    /// Unknown schemes yield None.
    pub(crate) fn parse(header: &str) -> Option<Self> {
        let header = header.trim();
        let (scheme, rest) = header
            .split_once(char::is_whitespace)
            .unwrap_or((header, ""));
        let scheme = if scheme.eq_ignore_ascii_case("basic") {
            Scheme::Basic
        } else if scheme.eq_ignore_ascii_case("bearer") {
            Scheme::Bearer
        } else {
            return None;
        };
        let mut params = Vec::new();
        let mut chars = rest.chars().peekable();
        loop {
            while chars.peek().is_some_and(|c| c.is_whitespace() || *c == ',') {
                chars.next();
            }
            let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
            let key = key.trim().to_ascii_lowercase();
            if key.is_empty() {
                break;
            }
            let mut value = String::new();
            if chars.peek() == Some(&'"') {
                chars.next();
                while let Some(c) = chars.next() {
                    match c {
                        '\\' => {
                            if let Some(escaped) = chars.next() {
                                value.push(escaped);
                            }
                        }
                        '"' => break,
                        c => value.push(c),
                    }
                }
            } else {
                while let Some(c) = chars.peek() {
                    if *c == ',' {
                        break;
                    }
                    value.push(*c);
                    chars.next();
                }
                value = value.trim().to_owned();
            }
            params.push((key, value));
        }
        Some(Self { scheme, params })
    }

    /// The value of parameter `key` (lowercase).
    pub(crate) fn param(&self, key: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Standard base64 with padding (RFC 4648), for basic auth.
fn base64_encode(input: &[u8]) -> String {
    const TABLE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(TABLE[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_challenges_parse_with_quoted_commas() {
        let c = Challenge::parse(
            r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push""#,
        )
        .unwrap();
        assert_eq!(c.scheme, Scheme::Bearer);
        assert_eq!(c.param("realm"), Some("https://auth.example/token"));
        assert_eq!(c.param("service"), Some("registry.example"));
        assert_eq!(c.param("scope"), Some("repository:a/b:pull,push"));
    }

    #[test]
    fn basic_and_unquoted_and_unknown_challenges() {
        let c = Challenge::parse("Basic realm=Registry").unwrap();
        assert_eq!(c.scheme, Scheme::Basic);
        assert_eq!(c.param("realm"), Some("Registry"));
        let c = Challenge::parse(r#"bearer Realm="x\"y", error="insufficient_scope""#).unwrap();
        assert_eq!(c.param("realm"), Some("x\"y"));
        assert_eq!(c.param("error"), Some("insufficient_scope"));
        assert!(Challenge::parse("Negotiate abc").is_none());
    }

    #[test]
    fn tokens_come_from_token_or_access_token() {
        assert_eq!(parse_token(br#"{"token":"t1"}"#).as_deref(), Some("t1"));
        assert_eq!(
            parse_token(br#"{"access_token":"t2","expires_in":60}"#).as_deref(),
            Some("t2")
        );
        assert_eq!(parse_token(br#"{"token":""}"#), None);
        assert_eq!(parse_token(b"nope"), None);
    }

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (input, want) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64_encode(input.as_bytes()), want);
        }
    }

    #[test]
    fn credentials_are_redacted_in_debug() {
        let a = RegistryAuth {
            username: "u".into(),
            password: "secret".into(),
        };
        assert!(!format!("{a:?}").contains("secret"));
    }
}
