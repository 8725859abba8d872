//! The agent CA the controller manages, and the certificates it issues from it.
//!
//! - [`load_or_create_ca`]: the CA lives in a Secret (`ca.crt`, `ca.key`; by default
//!   `fsb-agent-ca` in the controller's namespace). A controller that finds none creates
//!   one with a fresh CA; when two replicas race, the loser's create answers 409 and it
//!   reads the winner's, so every replica signs with the same CA. An operator can create
//!   the Secret beforehand with a CA of their own (any key rcgen reads: ECDSA, Ed25519,
//!   RSA).
//! - [`AgentCa::issue`]: a leaf certificate for one identity (see [`fsb_agent::tls`]),
//!   usable as server and client certificate. The controller issues its own in memory
//!   at every start; the pool reconciler issues one per pool into a Secret.
//! - [`AgentCa::still_good`]: whether a stored certificate is signed by this CA, names
//!   the identity and stays valid for [`RENEW_BEFORE`] (otherwise it is reissued).

use std::{
    collections::BTreeMap,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use fsb_agent::tls::{CA_FILE, CERT_FILE, KEY_FILE, TlsMaterial};
use k8s_openapi::{ByteString, api::core::v1::Secret};
use kube::{Api, Client, api::PostParams};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime, pem::PemObject};

/// Key of the CA's private key in the CA Secret.
pub const CA_KEY: &str = "ca.key";
/// Default name of the CA Secret.
pub const DEFAULT_CA_SECRET: &str = "fsb-agent-ca";
/// Lifetime of a generated CA.
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Lifetime of an issued certificate.
pub const LEAF_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// A stored certificate expiring sooner than this is reissued.
pub const RENEW_BEFORE: Duration = Duration::from_secs(30 * 24 * 3600);
/// Clock skew allowed for fresh certificates.
const BACKDATE: Duration = Duration::from_secs(3600);

/// Errors of the CA and of issuing.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// Certificate generation or parsing failed.
    #[error("certificate: {0}")]
    Cert(#[from] rcgen::Error),
    /// The CA Secret lacks a key or holds something unreadable.
    #[error("secret {secret}: {why}")]
    BadSecret {
        /// namespace/name.
        secret: String,
        /// What is wrong.
        why: String,
    },
    /// An API server call failed.
    #[error("kubernetes api: {0}")]
    Kube(#[from] kube::Error),
}

/// The CA: its certificate (PEM) and what signs with its key.
pub struct AgentCa {
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    key_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for AgentCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("AgentCa").finish_non_exhaustive()
    }
}

fn offset(t: SystemTime) -> time::OffsetDateTime {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    time::OffsetDateTime::from_unix_timestamp(i64::try_from(secs).unwrap_or(i64::MAX))
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

impl AgentCa {
    /// A fresh CA (ECDSA P-256, ten years).
    pub fn generate() -> Result<Self, TlsError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, "fast-sandbox agent CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = SystemTime::now();
        params.not_before = offset(now - BACKDATE);
        params.not_after = offset(now + CA_VALIDITY);
        let cert = params.self_signed(&key)?;
        Self::from_pem(&cert.pem(), &key.serialize_pem())
    }

    /// The CA from its certificate and key (PEM).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, TlsError> {
        let key = KeyPair::from_pem(key_pem)?;
        let cert_der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|_| rcgen::Error::CouldNotParseCertificate)?;
        let ca = Self {
            cert_pem: cert_pem.to_owned(),
            cert_der,
            key_pem: key_pem.to_owned(),
            issuer: Issuer::from_ca_cert_pem(cert_pem, key)?,
        };
        // A key that is not the certificate's would sign certificates nobody accepts.
        let probe = ca.issue("key-check.fsb.internal")?;
        if !ca.still_good(&probe, "key-check.fsb.internal") {
            return Err(rcgen::Error::CouldNotParseCertificate.into());
        }
        Ok(ca)
    }

    /// The CA certificate (PEM).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// A certificate naming `name` (DNS SAN and common name), for server and client use,
    /// valid for [`LEAF_VALIDITY`], with a fresh ECDSA P-256 key.
    pub fn issue(&self, name: &str) -> Result<TlsMaterial, TlsError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec![name.to_owned()])?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let now = SystemTime::now();
        params.not_before = offset(now - BACKDATE);
        params.not_after = offset(now + LEAF_VALIDITY);
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(TlsMaterial {
            ca_pem: self.cert_pem.clone(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// `material` carries this CA, and a certificate it signed that names `name` and is
    /// still valid [`RENEW_BEFORE`] from now.
    pub fn still_good(&self, material: &TlsMaterial, name: &str) -> bool {
        if material.ca_pem != self.cert_pem {
            return false;
        }
        let Ok(anchor) = webpki::anchor_from_trusted_cert(&self.cert_der) else {
            return false;
        };
        let Ok(der) = CertificateDer::from_pem_slice(material.cert_pem.as_bytes()) else {
            return false;
        };
        let Ok(cert) = webpki::EndEntityCert::try_from(&der) else {
            return false;
        };
        let Ok(server_name) = ServerName::try_from(name) else {
            return false;
        };
        let at = UnixTime::since_unix_epoch(
            (SystemTime::now() + RENEW_BEFORE)
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default(),
        );
        cert.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &[anchor],
            &[],
            at,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .is_ok()
            && cert.verify_is_valid_for_subject_name(&server_name).is_ok()
    }

    fn secret_data(&self) -> BTreeMap<String, ByteString> {
        [(CA_FILE, &self.cert_pem), (CA_KEY, &self.key_pem)]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), ByteString(v.clone().into_bytes())))
            .collect()
    }
}

/// A Secret's `key` as text.
pub fn secret_text(secret: &Secret, key: &str) -> Option<String> {
    secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .and_then(|b| String::from_utf8(b.0.clone()).ok())
}

/// The material of a pool Secret (`ca.crt`, `tls.crt`, `tls.key`), if complete.
pub fn material_of(secret: &Secret) -> Option<TlsMaterial> {
    Some(TlsMaterial {
        ca_pem: secret_text(secret, CA_FILE)?,
        cert_pem: secret_text(secret, CERT_FILE)?,
        key_pem: secret_text(secret, KEY_FILE)?,
    })
}

/// `material` as the data of a pool Secret.
pub fn material_data(material: &TlsMaterial) -> BTreeMap<String, ByteString> {
    [
        (CA_FILE, &material.ca_pem),
        (CERT_FILE, &material.cert_pem),
        (KEY_FILE, &material.key_pem),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), ByteString(v.clone().into_bytes())))
    .collect()
}

fn from_secret(secret: &Secret, id: &str) -> Result<AgentCa, TlsError> {
    let bad = |why: String| TlsError::BadSecret {
        secret: id.to_owned(),
        why,
    };
    let cert = secret_text(secret, CA_FILE).ok_or_else(|| bad(format!("no {CA_FILE}")))?;
    let key = secret_text(secret, CA_KEY).ok_or_else(|| bad(format!("no {CA_KEY}")))?;
    AgentCa::from_pem(&cert, &key).map_err(|e| bad(e.to_string()))
}

/// The CA of Secret `namespace/name`, created with a fresh CA if there is none. Replicas
/// racing to create it agree: the loser reads the winner's.
pub async fn load_or_create_ca(
    client: &Client,
    namespace: &str,
    name: &str,
) -> Result<AgentCa, TlsError> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let id = format!("{namespace}/{name}");
    if let Some(s) = secrets.get_opt(name).await? {
        return from_secret(&s, &id);
    }
    let ca = AgentCa::generate()?;
    let secret = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/managed-by".to_owned(),
                "fsb-controller".to_owned(),
            )])),
            ..Default::default()
        },
        data: Some(ca.secret_data()),
        type_: Some("Opaque".to_owned()),
        ..Default::default()
    };
    match secrets.create(&PostParams::default(), &secret).await {
        Ok(_) => {
            tracing::info!(secret = %id, "created the agent CA");
            Ok(ca)
        }
        Err(kube::Error::Api(e)) if e.code == 409 => {
            let s = secrets.get(name).await?;
            from_secret(&s, &id)
        }
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn issued_certificates_are_good_for_their_name_only() {
        let ca = AgentCa::generate().unwrap();
        let m = ca.issue("web.team-a.agent.fsb.internal").unwrap();
        assert!(ca.still_good(&m, "web.team-a.agent.fsb.internal"));
        assert!(!ca.still_good(&m, "web.team-b.agent.fsb.internal"));
        let other = AgentCa::generate().unwrap();
        assert!(!other.still_good(&m, "web.team-a.agent.fsb.internal"));
        let mut forged = m.clone();
        forged.ca_pem = other.cert_pem().to_owned();
        assert!(!other.still_good(&forged, "web.team-a.agent.fsb.internal"));
    }

    fn leaf(m: &TlsMaterial) -> Option<std::sync::Arc<Vec<CertificateDer<'static>>>> {
        Some(std::sync::Arc::new(vec![
            CertificateDer::from_pem_slice(m.cert_pem.as_bytes()).unwrap(),
        ]))
    }

    #[test]
    fn the_peer_check_tells_the_controller_from_agents_and_pools_apart() {
        use fsb_agent::tls::{CONTROLLER_NAME, agent_name, check_peer};
        let ca = AgentCa::generate().unwrap();
        let controller = ca.issue(CONTROLLER_NAME).unwrap();
        let web = ca.issue(&agent_name("web", "team-a")).unwrap();
        assert!(check_peer(leaf(&controller), CONTROLLER_NAME).is_ok());
        assert!(check_peer(leaf(&web), &agent_name("web", "team-a")).is_ok());
        let code = |r: Result<(), tonic::Status>| r.err().map(|s| s.code());
        let denied = Some(tonic::Code::PermissionDenied);
        assert_eq!(code(check_peer(leaf(&web), CONTROLLER_NAME)), denied);
        assert_eq!(
            code(check_peer(leaf(&web), &agent_name("web", "team-b"))),
            denied
        );
        assert_eq!(
            code(check_peer(leaf(&controller), &agent_name("web", "team-a"))),
            denied
        );
    }

    #[test]
    fn a_ca_reloads_from_pem_and_refuses_a_foreign_key() {
        let ca = AgentCa::generate().unwrap();
        let again = AgentCa::from_pem(&ca.cert_pem, &ca.key_pem).unwrap();
        let m = again.issue("x.y.agent.fsb.internal").unwrap();
        assert!(ca.still_good(&m, "x.y.agent.fsb.internal"));
        let other = AgentCa::generate().unwrap();
        assert!(AgentCa::from_pem(&ca.cert_pem, &other.key_pem).is_err());
    }
}
