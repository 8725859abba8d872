//! The CAs the controller manages, and the certificates it issues from them. Two CAs,
//! same code, separate Secrets: the agent CA (controller <-> agent mutual TLS) and the
//! gateway CA (the fast path's generated serving certificate, see [`crate::serving`]).
//!
//! - [`load_or_create_ca`]: a CA lives in a Secret (`ca.crt`, `ca.key`; by default
//!   `fsb-agent-ca` and `fsb-gateway-ca` in the controller's namespace). A controller that
//!   finds none creates one with a fresh CA; when two replicas race, the loser's create
//!   answers 409 and it reads the winner's, so every replica signs with the same CA. An
//!   operator can create the Secret beforehand with a CA of their own (any key rcgen
//!   reads: ECDSA, Ed25519, RSA).
//! - [`publish_ca`]: the CA certificate (never the key) in a ConfigMap (`ca.crt`), for
//!   clients to trust, as `kube-root-ca.crt` does for the API server.
//! - [`Ca::issue`]: a leaf certificate for one identity (see [`fsb_agent::tls`]),
//!   usable as server and client certificate. The controller issues its own in memory
//!   at every start; the pool reconciler issues one per pool into a Secret.
//!   [`Ca::issue_for`]: the same for several names (DNS names or IP addresses).
//! - [`Ca::still_good`]: whether a stored certificate is signed by this CA, names
//!   the identity and stays valid for [`RENEW_BEFORE`] (otherwise it is reissued).

use std::{
    collections::BTreeMap,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use fsb_agent::tls::{CA_FILE, CERT_FILE, KEY_FILE, TlsMaterial};
use k8s_openapi::{
    ByteString,
    api::core::v1::{ConfigMap, Secret},
};
use kube::{Api, Client, api::PostParams};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime, pem::PemObject};

/// Key of the CA's private key in the CA Secret.
pub const CA_KEY: &str = "ca.key";
/// Default name of the agent CA Secret.
pub const DEFAULT_CA_SECRET: &str = "fsb-agent-ca";
/// Default name of the gateway CA Secret, and of the ConfigMap publishing its certificate.
pub const DEFAULT_GATEWAY_CA: &str = "fsb-gateway-ca";
/// Common name of a generated agent CA.
pub const AGENT_CA_NAME: &str = "fast-sandbox agent CA";
/// Common name of a generated gateway CA.
pub const GATEWAY_CA_NAME: &str = "fast-sandbox gateway CA";
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

/// A CA: its certificate (PEM) and what signs with its key.
pub struct Ca {
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    key_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("Ca").finish_non_exhaustive()
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

impl Ca {
    /// A fresh CA (ECDSA P-256, ten years) named `common_name`.
    pub fn generate(common_name: &str) -> Result<Self, TlsError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
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
        self.issue_for(&[name.to_owned()])
    }

    /// A certificate naming every one of `names` (an IP address becomes an IP SAN, the
    /// rest DNS SANs; the first is also the common name), otherwise as [`Ca::issue`].
    pub fn issue_for(&self, names: &[String]) -> Result<TlsMaterial, TlsError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(names.to_vec())?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        if let Some(first) = names.first() {
            params
                .distinguished_name
                .push(DnType::CommonName, first.as_str());
        }
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
        self.still_good_at(material, &[name.to_owned()], SystemTime::now())
    }

    /// The renewal decision, pure: `material` carries this CA, and a certificate it
    /// signed that names every one of `names` and is still valid [`RENEW_BEFORE`] after
    /// `now`. False means: issue a new one.
    pub fn still_good_at(&self, material: &TlsMaterial, names: &[String], now: SystemTime) -> bool {
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
        let at = UnixTime::since_unix_epoch(
            (now + RENEW_BEFORE)
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default(),
        );
        let names_all = !names.is_empty()
            && names.iter().all(|name| {
                ServerName::try_from(name.as_str())
                    .is_ok_and(|n| cert.verify_is_valid_for_subject_name(&n).is_ok())
            });
        names_all
            && cert
                .verify_for_usage(
                    webpki::ALL_VERIFICATION_ALGS,
                    &[anchor],
                    &[],
                    at,
                    webpki::KeyUsage::server_auth(),
                    None,
                    None,
                )
                .is_ok()
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

fn from_secret(secret: &Secret, id: &str) -> Result<Ca, TlsError> {
    let bad = |why: String| TlsError::BadSecret {
        secret: id.to_owned(),
        why,
    };
    let cert = secret_text(secret, CA_FILE).ok_or_else(|| bad(format!("no {CA_FILE}")))?;
    let key = secret_text(secret, CA_KEY).ok_or_else(|| bad(format!("no {CA_KEY}")))?;
    Ca::from_pem(&cert, &key).map_err(|e| bad(e.to_string()))
}

fn managed_by() -> BTreeMap<String, String> {
    BTreeMap::from([(
        "app.kubernetes.io/managed-by".to_owned(),
        "fsb-controller".to_owned(),
    )])
}

/// The CA of Secret `namespace/name`, created with a fresh CA named `common_name` if
/// there is none. Replicas racing to create it agree: the loser reads the winner's.
pub async fn load_or_create_ca(
    client: &Client,
    namespace: &str,
    name: &str,
    common_name: &str,
) -> Result<Ca, TlsError> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let id = format!("{namespace}/{name}");
    if let Some(s) = secrets.get_opt(name).await? {
        return from_secret(&s, &id);
    }
    let ca = Ca::generate(common_name)?;
    let secret = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some(managed_by()),
            ..Default::default()
        },
        data: Some(ca.secret_data()),
        type_: Some("Opaque".to_owned()),
        ..Default::default()
    };
    match secrets.create(&PostParams::default(), &secret).await {
        Ok(_) => {
            tracing::info!(secret = %id, ca = common_name, "created a CA");
            Ok(ca)
        }
        Err(kube::Error::Api(e)) if e.code == 409 => {
            let s = secrets.get(name).await?;
            from_secret(&s, &id)
        }
        Err(e) => Err(e.into()),
    }
}

/// Publish `ca_pem` as `ca.crt` of ConfigMap `namespace/name` (created, or updated if it
/// holds something else); true if it was written. Only the certificate: the key stays
/// in the Secret.
pub async fn publish_ca(
    client: &Client,
    namespace: &str,
    name: &str,
    ca_pem: &str,
) -> Result<bool, TlsError> {
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let data = BTreeMap::from([(CA_FILE.to_owned(), ca_pem.to_owned())]);
    match maps.get_opt(name).await? {
        Some(m) if m.data.as_ref() == Some(&data) => Ok(false),
        Some(mut m) => {
            // resourceVersion is kept: a concurrent writer makes this a 409, retried by
            // the caller's next pass.
            m.data = Some(data);
            maps.replace(name, &PostParams::default(), &m).await?;
            Ok(true)
        }
        None => {
            let m = ConfigMap {
                metadata: kube::api::ObjectMeta {
                    name: Some(name.to_owned()),
                    namespace: Some(namespace.to_owned()),
                    labels: Some(managed_by()),
                    ..Default::default()
                },
                data: Some(data),
                ..Default::default()
            };
            maps.create(&PostParams::default(), &m).await?;
            Ok(true)
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn issued_certificates_are_good_for_their_name_only() {
        let ca = Ca::generate("test CA").unwrap();
        let m = ca.issue("web.team-a.agent.fsb.internal").unwrap();
        assert!(ca.still_good(&m, "web.team-a.agent.fsb.internal"));
        assert!(!ca.still_good(&m, "web.team-b.agent.fsb.internal"));
        let other = Ca::generate("test CA").unwrap();
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
        let ca = Ca::generate("test CA").unwrap();
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
        let ca = Ca::generate("test CA").unwrap();
        let again = Ca::from_pem(&ca.cert_pem, &ca.key_pem).unwrap();
        let m = again.issue("x.y.agent.fsb.internal").unwrap();
        assert!(ca.still_good(&m, "x.y.agent.fsb.internal"));
        let other = Ca::generate("test CA").unwrap();
        assert!(Ca::from_pem(&ca.cert_pem, &other.key_pem).is_err());
    }

    #[test]
    fn a_certificate_for_several_names_is_good_for_all_of_them_and_no_other() {
        let ca = Ca::generate(GATEWAY_CA_NAME).unwrap();
        let names: Vec<String> = ["fsb-controller.ns.svc", "localhost", "127.0.0.1", "::1"]
            .map(str::to_owned)
            .to_vec();
        let m = ca.issue_for(&names).unwrap();
        let now = SystemTime::now();
        assert!(ca.still_good_at(&m, &names, now));
        for name in &names {
            assert!(ca.still_good(&m, name), "{name}");
        }
        // A name it lacks (a new --tls-san) means a new certificate; so does no name.
        let more = [names.clone(), vec!["fsb.example.com".to_owned()]].concat();
        assert!(!ca.still_good_at(&m, &more, now));
        assert!(!ca.still_good_at(&m, &[], now));
        assert!(!ca.still_good(&m, "10.0.0.1"));
    }

    #[test]
    fn renewal_starts_renew_before_the_end() {
        let ca = Ca::generate(GATEWAY_CA_NAME).unwrap();
        let names = vec!["localhost".to_owned()];
        let m = ca.issue_for(&names).unwrap();
        let issued = SystemTime::now();
        let end = issued + LEAF_VALIDITY;
        let day = Duration::from_secs(24 * 3600);
        assert!(ca.still_good_at(&m, &names, end - RENEW_BEFORE - day));
        assert!(!ca.still_good_at(&m, &names, end - RENEW_BEFORE + day));
        assert!(!ca.still_good_at(&m, &names, end + day));
    }
}
