//! Mutual TLS between the controller and its agents: the names certificates carry, the
//! files an agent reads, tonic's TLS settings built from them, and the check of who is
//! at the other end of a connection.
//!
//! One CA (managed by the controller) signs every certificate. Identities are DNS
//! subject alternative names:
//! - the controller: [`CONTROLLER_NAME`];
//! - the agents of pool `p` in namespace `ns`: [`agent_name`] = `p.ns.agent.fsb.internal`
//!   (one certificate per pool, in a Secret mounted into the pool's pods).
//!
//! The TLS handshake proves "signed by the CA"; [`check_peer`] then proves "is the one
//! we want": an agent accepts only [`CONTROLLER_NAME`] (another agent's certificate comes
//! from the same CA and must not do), the controller accepts a registration only from
//! the pool and namespace it names.

use std::{path::Path, sync::Arc};

use rustls_pki_types::{CertificateDer, ServerName};
use tonic::{
    Request, Status,
    service::Interceptor,
    transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig},
};

/// The controller's identity (DNS SAN of its certificate).
pub const CONTROLLER_NAME: &str = "fsb-controller.fsb.internal";
/// Parent domain of every agent identity.
pub const AGENT_DOMAIN: &str = "agent.fsb.internal";
/// File of the CA certificate in a TLS directory (and key of Secrets).
pub const CA_FILE: &str = "ca.crt";
/// File of the certificate.
pub const CERT_FILE: &str = "tls.crt";
/// File of the private key.
pub const KEY_FILE: &str = "tls.key";

/// The identity of pool `pool`'s agents in namespace `namespace`. Namespaces have no
/// dots, so the name is unambiguous even for pool names that do.
pub fn agent_name(pool: &str, namespace: &str) -> String {
    format!("{pool}.{namespace}.{AGENT_DOMAIN}")
}

/// A certificate, its key and the CA that signed it, as PEM.
#[derive(Clone)]
pub struct TlsMaterial {
    /// CA certificate (the only trust root).
    pub ca_pem: String,
    /// Our certificate.
    pub cert_pem: String,
    /// Our private key.
    pub key_pem: String,
}

impl std::fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("TlsMaterial").finish_non_exhaustive()
    }
}

/// Why TLS material could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// A file is empty or holds no PEM block.
    #[error("{0}: no PEM data")]
    Empty(String),
}

impl TlsMaterial {
    /// Read [`CA_FILE`], [`CERT_FILE`] and [`KEY_FILE`] from `dir` (a mounted Secret).
    pub fn load(dir: &Path) -> Result<Self, TlsError> {
        let read = |name: &str| {
            let path = dir.join(name);
            let text = std::fs::read_to_string(&path).map_err(|source| TlsError::Read {
                path: path.display().to_string(),
                source,
            })?;
            if !text.contains("-----BEGIN ") {
                return Err(TlsError::Empty(path.display().to_string()));
            }
            Ok(text)
        };
        Ok(Self {
            ca_pem: read(CA_FILE)?,
            cert_pem: read(CERT_FILE)?,
            key_pem: read(KEY_FILE)?,
        })
    }

    fn identity(&self) -> Identity {
        Identity::from_pem(&self.cert_pem, &self.key_pem)
    }

    fn ca(&self) -> Certificate {
        Certificate::from_pem(&self.ca_pem)
    }

    /// Server side: present our certificate, require a client certificate signed by the
    /// CA (a connection without one fails the handshake).
    pub fn server(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(self.identity())
            .client_ca_root(self.ca())
            .client_auth_optional(false)
    }

    /// Client side: present our certificate, trust only the CA, and require the server's
    /// certificate to name `server_name`.
    pub fn client(&self, server_name: &str) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(self.ca())
            .identity(self.identity())
            .domain_name(server_name)
    }
}

/// `Ok` if the peer's (CA-verified) leaf certificate names `expected`;
/// `Unauthenticated` without a certificate, `PermissionDenied` with another identity.
pub fn check_peer(
    certs: Option<Arc<Vec<CertificateDer<'static>>>>,
    expected: &str,
) -> Result<(), Status> {
    let Some(leaf) = certs.as_ref().and_then(|c| c.first()) else {
        return Err(Status::unauthenticated("a client certificate is required"));
    };
    let name = ServerName::try_from(expected)
        .map_err(|_| Status::permission_denied(format!("{expected:?} is not a valid identity")))?;
    let cert = webpki::EndEntityCert::try_from(leaf)
        .map_err(|e| Status::unauthenticated(format!("unreadable client certificate: {e:?}")))?;
    cert.verify_is_valid_for_subject_name(&name)
        .map_err(|_| Status::permission_denied(format!("the client certificate is not {expected}")))
}

/// An interceptor refusing every call whose peer is not `name` (see [`check_peer`]).
#[derive(Clone, Debug)]
pub struct RequirePeer {
    name: Option<Arc<str>>,
}

impl RequirePeer {
    /// Accept only `name`.
    pub fn new(name: &str) -> Self {
        Self {
            name: Some(name.into()),
        }
    }

    /// Check nothing: a plaintext server, which has no peer certificates to check.
    pub fn nobody() -> Self {
        Self { name: None }
    }
}

impl Interceptor for RequirePeer {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(name) = &self.name {
            check_peer(request.peer_certs(), name)?;
        }
        Ok(request)
    }
}

/// `url` with an `https` scheme (TLS is on, whatever the URL said).
pub fn https(url: &str) -> String {
    match url.strip_prefix("http://") {
        Some(rest) => format!("https://{rest}"),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_names_put_the_namespace_last() {
        assert_eq!(agent_name("web", "team-a"), "web.team-a.agent.fsb.internal");
        assert_eq!(agent_name("a.b", "c"), "a.b.c.agent.fsb.internal");
    }

    #[test]
    fn no_certificate_is_unauthenticated() {
        let e = check_peer(None, CONTROLLER_NAME).err().map(|s| s.code());
        assert_eq!(e, Some(tonic::Code::Unauthenticated));
        let e = check_peer(Some(Arc::new(Vec::new())), CONTROLLER_NAME)
            .err()
            .map(|s| s.code());
        assert_eq!(e, Some(tonic::Code::Unauthenticated));
    }

    #[test]
    fn urls_become_https() {
        assert_eq!(https("http://10.0.0.1:5758"), "https://10.0.0.1:5758");
        assert_eq!(https("https://h:1"), "https://h:1");
    }
}
