//! Linux capability names and the capabilities a pool takes away from its sandboxes.
//!
//! Sandboxes start from containerd's default set (`fsb_agent::oci::DEFAULT_CAPABILITIES`);
//! a pool may only remove from it ([`CapabilityDrop`]), never add. Names are accepted
//! the way Kubernetes users write them (`NET_RAW`) and the way the OCI spec does
//! (`CAP_NET_RAW`), in any case; `ALL` drops every capability. A parsed set holds the
//! canonical `CAP_*` names, so two spellings of one policy are one value (and render to
//! one agent argument, [`CapabilityDrop::to_arg`]).

use std::collections::BTreeSet;

/// Every capability of Linux 6.x, in bit order (`CAP_CHOWN` is bit 0).
pub const KNOWN_CAPABILITIES: [&str; 41] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// The word that drops every capability.
pub const ALL: &str = "ALL";

/// A name that is neither a Linux capability nor `ALL`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown capability {0:?}: give a Linux capability name such as NET_RAW or CAP_CHOWN, or ALL"
)]
pub struct UnknownCapability(pub String);

/// The bit of a canonical name (`CAP_CHOWN` -> 0), as in `/proc/<pid>/status`.
pub fn bit(canonical: &str) -> Option<u32> {
    KNOWN_CAPABILITIES
        .iter()
        .position(|c| *c == canonical)
        .and_then(|i| u32::try_from(i).ok())
}

/// One name, normalised: `Ok(None)` for `ALL`, else the canonical `CAP_*` name.
/// Surrounding whitespace is ignored; case is not significant.
pub fn canonical(name: &str) -> Result<Option<&'static str>, UnknownCapability> {
    let upper = name.trim().to_ascii_uppercase();
    if upper == ALL {
        return Ok(None);
    }
    let bare = upper.strip_prefix("CAP_").unwrap_or(&upper);
    KNOWN_CAPABILITIES
        .iter()
        .find(|c| c.strip_prefix("CAP_") == Some(bare))
        .map(|c| Some(*c))
        .ok_or_else(|| UnknownCapability(name.to_owned()))
}

/// Capabilities taken away from every sandbox of a pool (or of a local agent).
/// Empty by default: sandboxes keep the whole default set.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CapabilityDrop(BTreeSet<&'static str>);

impl CapabilityDrop {
    /// Parse names as a user gives them (see [`canonical`]); `ALL` drops all. The
    /// first unknown name is the error.
    pub fn parse<I, S>(names: I) -> Result<Self, UnknownCapability>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut set = BTreeSet::new();
        for name in names {
            match canonical(name.as_ref())? {
                Some(cap) => {
                    set.insert(cap);
                }
                None => set.extend(KNOWN_CAPABILITIES),
            }
        }
        Ok(Self(set))
    }

    /// Parse a comma-separated list (the agent's `FSB_DROP_CAPABILITIES`); empty
    /// items are skipped.
    pub fn parse_list(list: &str) -> Result<Self, UnknownCapability> {
        Self::parse(list.split(',').filter(|s| !s.trim().is_empty()))
    }

    /// Whether `canonical` (a `CAP_*` name) is dropped.
    pub fn contains(&self, canonical: &str) -> bool {
        self.0.contains(canonical)
    }

    /// Whether nothing is dropped.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The dropped names, canonical, in bit order.
    pub fn names(&self) -> Vec<&'static str> {
        KNOWN_CAPABILITIES
            .iter()
            .copied()
            .filter(|c| self.0.contains(c))
            .collect()
    }

    /// `set` less the dropped names, order kept.
    pub fn apply<'a>(&self, set: impl IntoIterator<Item = &'a str>) -> Vec<&'a str> {
        set.into_iter().filter(|c| !self.contains(c)).collect()
    }

    /// The canonical comma-separated form (bit order; `""` when empty): what
    /// [`CapabilityDrop::parse_list`] reads back.
    pub fn to_arg(&self) -> String {
        self.names().join(",")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_accepted_with_or_without_prefix_in_any_case() {
        for name in [
            "CAP_NET_RAW",
            "NET_RAW",
            "net_raw",
            "cap_net_raw",
            " Net_Raw ",
        ] {
            assert_eq!(canonical(name), Ok(Some("CAP_NET_RAW")), "{name}");
        }
        assert_eq!(canonical("all"), Ok(None));
        assert_eq!(canonical("ALL"), Ok(None));
    }

    #[test]
    fn unknown_names_are_refused_by_name() {
        for name in [
            "",
            "CAP_",
            "NET",
            "CAP_ALL",
            "CAP_FOO",
            "NET-RAW",
            "CAP_CAP_CHOWN",
        ] {
            let err = canonical(name).unwrap_err();
            assert_eq!(err, UnknownCapability(name.to_owned()));
            assert!(err.to_string().contains(&format!("{name:?}")), "{err}");
        }
        let err = CapabilityDrop::parse(["CHOWN", "BOGUS", "NOPE"]).unwrap_err();
        assert_eq!(err.0, "BOGUS", "the first unknown name");
    }

    #[test]
    fn spellings_of_one_policy_are_one_value() {
        let a = CapabilityDrop::parse(["chown", "CAP_NET_BIND_SERVICE", "CAP_CHOWN"]).unwrap();
        let b = CapabilityDrop::parse(["NET_BIND_SERVICE", "Chown"]).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.to_arg(), "CAP_CHOWN,CAP_NET_BIND_SERVICE");
        assert_eq!(CapabilityDrop::parse_list(&a.to_arg()).unwrap(), a);
        assert_eq!(
            CapabilityDrop::parse_list("").unwrap(),
            CapabilityDrop::default()
        );
        assert_eq!(
            CapabilityDrop::parse_list(" chown, ,net_bind_service,").unwrap(),
            a
        );
    }

    #[test]
    fn all_drops_every_capability() {
        let all = CapabilityDrop::parse(["all"]).unwrap();
        assert_eq!(all.names(), KNOWN_CAPABILITIES);
        assert!(all.apply(["CAP_CHOWN", "CAP_KILL"]).is_empty());
        assert_eq!(CapabilityDrop::parse(["CHOWN", "ALL"]).unwrap(), all);
    }

    #[test]
    fn apply_only_removes_and_keeps_order() {
        let drop = CapabilityDrop::parse(["KILL", "SYS_ADMIN"]).unwrap();
        let set = ["CAP_CHOWN", "CAP_KILL", "CAP_AUDIT_WRITE"];
        assert_eq!(drop.apply(set), ["CAP_CHOWN", "CAP_AUDIT_WRITE"]);
        // Dropping a capability the set lacks is a no-op, never an addition.
        assert_eq!(CapabilityDrop::default().apply(set), set);
    }

    #[test]
    fn bits_follow_the_kernel() {
        assert_eq!(bit("CAP_CHOWN"), Some(0));
        assert_eq!(bit("CAP_NET_BIND_SERVICE"), Some(10));
        assert_eq!(bit("CAP_NET_RAW"), Some(13));
        assert_eq!(bit("CAP_SYS_ADMIN"), Some(21));
        assert_eq!(bit("CAP_CHECKPOINT_RESTORE"), Some(40));
        assert_eq!(bit("CHOWN"), None);
    }
}
