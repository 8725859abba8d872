//! Identifier newtypes. Cheap to clone (`Arc<str>`), ordered (stable tie-breaks),
//! serialized as plain strings. Names that Kubernetes constrains are checked on parse.

use std::{fmt, sync::Arc};

use crate::spec::SpecError;

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident, #[$serde:meta]) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
        #[$serde]
        pub struct $name(Arc<str>);

        impl $name {
            /// The id as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), &*self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

/// Ids we mint or receive from trusted peers: any non-empty string is accepted.
macro_rules! free_id {
    ($(#[$doc:meta])* $name:ident) => {
        string_id!($(#[$doc])* $name, #[serde(transparent)]);

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                Self(Arc::from(s))
            }
        }

        impl From<String> for $name {
            fn from(s: String) -> Self {
                Self(Arc::from(s))
            }
        }
    };
}

/// Kubernetes-constrained names: only [`Self::parse`] makes one.
macro_rules! checked_id {
    ($(#[$doc:meta])* $name:ident, $check:path) => {
        string_id!($(#[$doc])* $name, #[serde(try_from = "String", into = "String")]);

        impl $name {
            /// Parse and validate; `field` names the input in the error message.
            pub fn parse(field: &str, s: &str) -> Result<Self, SpecError> {
                $check(field, s)?;
                Ok(Self(Arc::from(s)))
            }
        }

        impl TryFrom<String> for $name {
            type Error = SpecError;
            fn try_from(s: String) -> Result<Self, SpecError> {
                Self::parse(stringify!($name), &s)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0.to_string()
            }
        }
    };
}

free_id!(
    /// An agent: its pod UID in Kubernetes, `local` in `fsb up`.
    AgentId
);
free_id!(
    /// The node an agent runs on.
    NodeName
);
checked_id!(
    /// A sandbox's name within its namespace (DNS-1123 subdomain).
    SandboxName,
    check_dns1123_subdomain
);
checked_id!(
    /// A pool's name within its namespace (DNS-1123 subdomain).
    PoolName,
    check_dns1123_subdomain
);
checked_id!(
    /// A Kubernetes namespace (DNS-1123 label).
    NamespaceName,
    check_dns1123_label
);
checked_id!(
    /// A client-chosen idempotency key for Create.
    RequestId,
    check_request_id
);

/// A sandbox's runtime id: 32 lowercase hex characters. Fixed width because runsc
/// matches container ids by prefix; also the containerd container and snapshot key.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SandboxId(Arc<str>);

impl SandboxId {
    /// Width of every sandbox id.
    pub const LEN: usize = 32;

    /// A fresh random id.
    pub fn generate() -> Self {
        Self(Arc::from(uuid::Uuid::new_v4().simple().to_string()))
    }

    /// Parse an id received from outside (a path segment, a label, a request).
    pub fn parse(field: &str, s: &str) -> Result<Self, SpecError> {
        let ok = s.len() == Self::LEN && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        if !ok {
            return Err(SpecError::new(field, "must be 32 lowercase hex characters"));
        }
        Ok(Self(Arc::from(s)))
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for SandboxId {
    type Error = SpecError;
    fn try_from(s: String) -> Result<Self, SpecError> {
        Self::parse("sandbox_id", &s)
    }
}

impl From<SandboxId> for String {
    fn from(id: SandboxId) -> String {
        id.0.to_string()
    }
}

impl fmt::Display for SandboxId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for SandboxId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SandboxId({})", &*self.0)
    }
}

/// DNS-1123 label: 1..=63 chars of `[a-z0-9-]`, starting and ending alphanumeric.
pub fn check_dns1123_label(field: &str, s: &str) -> Result<(), SpecError> {
    if s.is_empty() {
        return Err(SpecError::new(field, "must not be empty"));
    }
    if s.len() > 63 {
        return Err(SpecError::new(
            field,
            format!("must be at most 63 characters, got {}", s.len()),
        ));
    }
    check_label_chars(field, s)
}

/// DNS-1123 subdomain: 1..=253 chars, dot-separated DNS-1123 labels.
pub fn check_dns1123_subdomain(field: &str, s: &str) -> Result<(), SpecError> {
    if s.is_empty() {
        return Err(SpecError::new(field, "must not be empty"));
    }
    if s.len() > 253 {
        return Err(SpecError::new(
            field,
            format!("must be at most 253 characters, got {}", s.len()),
        ));
    }
    for part in s.split('.') {
        if part.is_empty() {
            return Err(SpecError::new(
                field,
                format!("{s:?} has an empty dot-separated part"),
            ));
        }
        check_label_chars(field, part)?;
    }
    Ok(())
}

fn check_label_chars(field: &str, s: &str) -> Result<(), SpecError> {
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let bytes = s.as_bytes();
    let ok = bytes.iter().all(|&b| alnum(b) || b == b'-')
        && bytes.first().is_some_and(|&b| alnum(b))
        && bytes.last().is_some_and(|&b| alnum(b));
    if ok {
        Ok(())
    } else {
        Err(SpecError::new(
            field,
            format!(
                "{s:?} is not a valid DNS-1123 name (lowercase letters, digits and '-', \
                 starting and ending with a letter or digit)"
            ),
        ))
    }
}

fn check_request_id(field: &str, s: &str) -> Result<(), SpecError> {
    if s.is_empty() {
        return Err(SpecError::new(field, "must not be empty"));
    }
    if s.len() > 128 {
        return Err(SpecError::new(
            field,
            format!("must be at most 128 characters, got {}", s.len()),
        ));
    }
    if !s.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(SpecError::new(
            field,
            "must be printable ASCII without spaces",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sandbox_ids_are_fixed_width_hex() {
        let id = SandboxId::generate();
        assert_eq!(id.as_str().len(), SandboxId::LEN);
        assert_eq!(SandboxId::parse("id", id.as_str()).unwrap(), id);
        assert_ne!(SandboxId::generate(), id);
    }

    #[test]
    fn sandbox_id_rejects_traversal_and_wrong_width() {
        for bad in [
            "../../etc/passwd",
            "",
            "ABCDEF0123456789abcdef0123456789",
            "abc",
        ] {
            let err = SandboxId::parse("sandbox_id", bad).unwrap_err();
            assert_eq!(err.field(), "sandbox_id", "{bad}");
        }
    }

    #[test]
    fn dns_names() {
        assert!(SandboxName::parse("name", "web-1").is_ok());
        assert!(SandboxName::parse("name", "a.b-c.d").is_ok());
        assert!(NamespaceName::parse("namespace", "team-a").is_ok());
        for bad in ["", "-a", "a-", "A", "a_b", "a..b", &"x".repeat(254)] {
            let err = SandboxName::parse("metadata.name", bad).unwrap_err();
            assert_eq!(err.field(), "metadata.name", "{bad:?}");
        }
        assert!(
            NamespaceName::parse("namespace", "a.b").is_err(),
            "labels have no dots"
        );
        assert!(NamespaceName::parse("namespace", &"x".repeat(64)).is_err());
    }

    #[test]
    fn request_ids() {
        assert!(RequestId::parse("request_id", "req-1:abc").is_ok());
        assert!(RequestId::parse("request_id", "").is_err());
        assert!(RequestId::parse("request_id", "has space").is_err());
        assert!(RequestId::parse("request_id", &"r".repeat(129)).is_err());
    }

    #[test]
    fn serde_round_trip_validates() {
        let id = SandboxId::generate();
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(serde_json::from_str::<SandboxId>(&json).unwrap(), id);
        assert!(serde_json::from_str::<SandboxId>("\"../x\"").is_err());
    }
}
