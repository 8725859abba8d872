//! The sandbox spec as clients send it ([`SandboxSpec`], plain strings and numbers, so
//! that every bad value can be reported) and as the rest of the system uses it
//! ([`ValidSpec`], typed, valid by construction). Validation stops at the first
//! problem and names the field the way the API spells it (`spec.envs[2].name`).

use std::{collections::BTreeMap, fmt};

use sha2::{Digest, Sha256};

use crate::{
    error::{ErrorCode, HasErrorCode},
    ids::{NamespaceName, PoolName, SandboxName},
    image::ImageRef,
    quantity::{Bytes, MilliCpu},
};

/// A validation failure: which field, and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct SpecError {
    field: String,
    reason: String,
}

impl SpecError {
    /// A failure of `field` because of `reason` (lowercase, no final period).
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// The offending field, e.g. `spec.exposedPorts[1]`.
    pub fn field(&self) -> &str {
        &self.field
    }

    /// Why it was rejected.
    pub fn reason(&self) -> &str {
        &self.reason
    }
}

impl HasErrorCode for SpecError {
    fn error_code(&self) -> ErrorCode {
        ErrorCode::InvalidArgument
    }
}

/// A port on the agent's network namespace, 1..=65535.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "u32", into = "u16")]
pub struct HostPort(u16);

impl HostPort {
    /// Check the range; `field` names the input in the error.
    pub fn parse(field: &str, port: u32) -> Result<Self, SpecError> {
        match u16::try_from(port) {
            Ok(p) if p != 0 => Ok(Self(p)),
            _ => Err(SpecError::new(
                field,
                format!("port {port} is out of range 1..65535"),
            )),
        }
    }

    /// The port number.
    pub fn get(self) -> u16 {
        self.0
    }
}

impl TryFrom<u32> for HostPort {
    type Error = SpecError;
    fn try_from(p: u32) -> Result<Self, SpecError> {
        Self::parse("port", p)
    }
}

impl From<HostPort> for u16 {
    fn from(p: HostPort) -> u16 {
        p.0
    }
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// OCI runtime running the sandbox.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Runtime {
    /// runc (the default).
    Runc,
    /// crun: smaller and faster to start.
    Crun,
    /// gVisor (runsc): a user-space kernel for strong isolation.
    Gvisor,
}

impl Runtime {
    /// Parse `runc`, `crun` or `gvisor` (`runsc` accepted as an alias).
    pub fn parse(field: &str, s: &str) -> Result<Self, SpecError> {
        match s {
            "runc" => Ok(Self::Runc),
            "crun" => Ok(Self::Crun),
            "gvisor" | "runsc" => Ok(Self::Gvisor),
            other => Err(SpecError::new(
                field,
                format!("unknown runtime {other:?} (runc, crun or gvisor)"),
            )),
        }
    }

    /// Canonical name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Runc => "runc",
            Self::Crun => "crun",
            Self::Gvisor => "gvisor",
        }
    }
}

/// What happens when a sandbox's agent is lost.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
pub enum FailurePolicy {
    /// The sandbox goes Lost and stays there.
    #[default]
    Manual,
    /// The sandbox is recreated elsewhere after the recovery timeout.
    AutoRecreate,
}

impl FailurePolicy {
    /// Parse `Manual` or `AutoRecreate`; empty means the default (Manual).
    pub fn parse(field: &str, s: &str) -> Result<Self, SpecError> {
        match s {
            "" | "Manual" => Ok(Self::Manual),
            "AutoRecreate" => Ok(Self::AutoRecreate),
            other => Err(SpecError::new(
                field,
                format!("unknown failure policy {other:?} (Manual or AutoRecreate)"),
            )),
        }
    }
}

/// One environment variable as sent by a client.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EnvVar {
    /// Variable name (required).
    pub name: String,
    /// Value (may be empty).
    #[serde(default)]
    pub value: String,
}

/// Requested resource limits as sent by a client; empty strings and 0 mean "pool default".
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ResourcesSpec {
    /// CPU limit, e.g. `500m`.
    #[serde(default)]
    pub cpu: String,
    /// Memory limit, e.g. `256Mi`.
    #[serde(default)]
    pub memory: String,
    /// Maximum number of processes.
    #[serde(default)]
    pub pids: u32,
}

/// A sandbox as a client asks for it. Field names follow the CRD (`camelCase`).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct SandboxSpec {
    /// Kubernetes namespace.
    pub namespace: String,
    /// Sandbox name; empty lets the server choose one.
    pub name: String,
    /// Pool to run in (required).
    pub pool_ref: String,
    /// Image reference (required).
    pub image: String,
    /// Replaces the image's ENTRYPOINT when non-empty.
    pub command: Vec<String>,
    /// Replaces the image's CMD when non-empty.
    pub args: Vec<String>,
    /// Environment, in order.
    pub envs: Vec<EnvVar>,
    /// Working directory, created if missing; empty keeps the image's.
    pub working_dir: String,
    /// Ports the sandbox listens on in the agent's network namespace.
    pub exposed_ports: Vec<u32>,
    /// Resource limits.
    pub resources: ResourcesSpec,
    /// Runtime override; empty uses the pool's.
    pub runtime: String,
    /// `Manual` (default) or `AutoRecreate`.
    pub failure_policy: String,
    /// Seconds to wait for a lost agent before recreating; 0 means the default (60).
    pub recovery_timeout_seconds: u32,
    /// User labels.
    pub labels: BTreeMap<String, String>,
    /// Mount the root filesystem read-only.
    pub read_only_rootfs: bool,
    /// Run the sandbox in a user namespace of its own: its root is not the host's
    /// root (Kubernetes' `spec.hostUsers: false`). runc and crun only.
    pub user_namespace: bool,
}

/// Bounds on what one spec may carry; hostile input stops here.
#[derive(Clone, Debug)]
pub struct SpecLimits {
    /// The agent's own port: never allocatable (it shares the network namespace).
    pub agent_port: Option<u16>,
    /// Maximum number of env entries.
    pub max_envs: usize,
    /// Maximum bytes of all env names and values together.
    pub max_env_bytes: usize,
    /// Maximum number of command + args entries.
    pub max_argv: usize,
    /// Maximum bytes of command + args together.
    pub max_argv_bytes: usize,
    /// Maximum number of exposed ports.
    pub max_ports: usize,
    /// Maximum number of labels.
    pub max_labels: usize,
    /// Largest pids limit accepted.
    pub max_pids: u32,
    /// Longest delete grace period accepted: a larger one would hold the sandbox (and
    /// its name) in Terminating for as long as its process ignores SIGTERM.
    pub max_grace_seconds: u32,
}

impl Default for SpecLimits {
    fn default() -> Self {
        Self {
            agent_port: None,
            max_envs: 1024,
            max_env_bytes: 256 * 1024,
            max_argv: 4096,
            max_argv_bytes: 256 * 1024,
            max_ports: 64,
            max_labels: 64,
            max_pids: 1 << 22,
            max_grace_seconds: 600,
        }
    }
}

/// Why a user namespace is refused under gVisor (the agent says the same when gVisor is
/// its default runtime): runsc accepts the spec's mappings and ignores them (inside,
/// `/proc/self/uid_map` reads `0 0 4294967295`), and its sandbox already runs under
/// its own kernel, the Sentry, whose uids are not host uids.
pub const USER_NAMESPACE_GVISOR: &str = "is not supported with runtime gvisor (runsc ignores \
     the mappings; gVisor already runs the sandbox under its own kernel): use runc or crun";

/// Default for [`SandboxSpec::recovery_timeout_seconds`].
pub const DEFAULT_RECOVERY_TIMEOUT_SECONDS: u32 = 60;

/// A spec that passed validation: typed, normalized, safe to act on.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ValidSpec {
    /// Namespace.
    pub namespace: NamespaceName,
    /// Name, if the client chose one.
    pub name: Option<SandboxName>,
    /// Pool.
    pub pool: PoolName,
    /// Normalized image reference.
    pub image: ImageRef,
    /// ENTRYPOINT override (empty keeps the image's).
    pub command: Vec<String>,
    /// CMD override (empty keeps the image's).
    pub args: Vec<String>,
    /// Environment, in the client's order, names unique.
    pub envs: Vec<(String, String)>,
    /// Absolute working directory, if given.
    pub working_dir: Option<String>,
    /// Exposed ports, sorted, unique, never the agent's port.
    pub ports: Vec<HostPort>,
    /// CPU limit.
    pub cpu: Option<MilliCpu>,
    /// Memory limit.
    pub memory: Option<Bytes>,
    /// Process limit.
    pub pids: Option<u32>,
    /// Runtime override.
    pub runtime: Option<Runtime>,
    /// Failure policy.
    pub failure_policy: FailurePolicy,
    /// Recovery timeout in seconds (>= 1).
    pub recovery_timeout_seconds: u32,
    /// User labels.
    pub labels: BTreeMap<String, String>,
    /// Root filesystem read-only. Left out of the JSON when false, so the digest and
    /// the stored form of every spec without it are what they were.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub read_only_rootfs: bool,
    /// A user namespace of its own (container root is an unprivileged host uid). Left
    /// out of the JSON when false, like `read_only_rootfs`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub user_namespace: bool,
}

impl ValidSpec {
    /// A stable digest of the normalized spec: same digest, same sandbox. Used for
    /// idempotency (same request id + same digest replays; another digest conflicts).
    pub fn digest(&self) -> SpecDigest {
        // Field order of a derived Serialize is fixed and labels are a BTreeMap, so the
        // JSON is canonical; serialization of these plain types cannot fail.
        let json = serde_json::to_vec(self).unwrap_or_default();
        SpecDigest(Sha256::digest(&json).into())
    }

    /// Whether the spec sets cpu, memory or pids limits.
    pub fn limited(&self) -> bool {
        self.cpu.is_some() || self.memory.is_some() || self.pids.is_some()
    }

    /// Whether a warm instance of `runtime` (`None`: the agent's default) can take
    /// this spec. Command, args, env, working directory and user are bound at claim
    /// time; limits by a task update, which only runc and crun apply to a running
    /// sandbox so far, so under gVisor a limited spec goes cold. With the runtime
    /// unknown the registry assumes yes and the agent decides.
    pub fn warm_claimable(&self, runtime: Option<Runtime>) -> bool {
        // A warm instance's root filesystem was mounted writable when it started, in
        // the host's user namespace.
        let limits_refused = self.limited() && runtime == Some(Runtime::Gvisor);
        !(self.read_only_rootfs || self.user_namespace || limits_refused)
    }
}

/// SHA-256 of a [`ValidSpec`].
#[derive(Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct SpecDigest(pub [u8; 32]);

impl fmt::Debug for SpecDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpecDigest({})", hex::encode(&self.0[..8]))
    }
}

impl fmt::Display for SpecDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl SandboxSpec {
    /// Validate against `limits`, returning the typed spec or the first offending field.
    pub fn validate(&self, limits: &SpecLimits) -> Result<ValidSpec, SpecError> {
        let namespace = NamespaceName::parse("metadata.namespace", &self.namespace)?;
        let name = match self.name.as_str() {
            "" => None,
            n => Some(SandboxName::parse("metadata.name", n)?),
        };
        let pool = PoolName::parse("spec.poolRef", &self.pool_ref)?;
        let image = ImageRef::parse("spec.image", &self.image)?;

        validate_argv(
            &[("spec.command", &self.command), ("spec.args", &self.args)],
            "spec.args",
            limits,
        )?;

        let envs = validate_envs("spec.envs", &self.envs, limits)?;

        let working_dir = validate_working_dir("spec.workingDir", &self.working_dir)?;

        let ports = validate_ports(&self.exposed_ports, limits)?;

        let cpu = match self.resources.cpu.as_str() {
            "" => None,
            s => Some(MilliCpu::parse("spec.resources.cpu", s)?),
        };
        let memory = match self.resources.memory.as_str() {
            "" => None,
            s => Some(Bytes::parse("spec.resources.memory", s)?),
        };
        let pids = match self.resources.pids {
            0 => None,
            p if p > limits.max_pids => {
                return Err(SpecError::new(
                    "spec.resources.pids",
                    format!("must be at most {}", limits.max_pids),
                ));
            }
            p => Some(p),
        };
        let runtime = match self.runtime.as_str() {
            "" => None,
            r => Some(Runtime::parse("spec.runtime", r)?),
        };
        if self.user_namespace && runtime == Some(Runtime::Gvisor) {
            return Err(SpecError::new(
                "spec.userNamespace",
                format!("user_namespace {USER_NAMESPACE_GVISOR}"),
            ));
        }
        let failure_policy = FailurePolicy::parse("spec.failurePolicy", &self.failure_policy)?;
        let recovery_timeout_seconds = match self.recovery_timeout_seconds {
            0 => DEFAULT_RECOVERY_TIMEOUT_SECONDS,
            s => s,
        };
        let labels = validate_labels(&self.labels, limits)?;

        Ok(ValidSpec {
            namespace,
            name,
            pool,
            image,
            command: self.command.clone(),
            args: self.args.clone(),
            envs,
            working_dir,
            ports,
            cpu,
            memory,
            pids,
            runtime,
            failure_policy,
            recovery_timeout_seconds,
            labels,
            read_only_rootfs: self.read_only_rootfs,
            user_namespace: self.user_namespace,
        })
    }
}

/// Command and args of a spec, or an exec's command: count and bytes bounded, no NUL.
fn validate_argv(
    lists: &[(&str, &[String])],
    count_field: &str,
    limits: &SpecLimits,
) -> Result<(), SpecError> {
    let count: usize = lists.iter().map(|(_, l)| l.len()).sum();
    if count > limits.max_argv {
        return Err(SpecError::new(
            count_field,
            format!(
                "more than {} entries (command and args together)",
                limits.max_argv
            ),
        ));
    }
    let mut argv_bytes = 0;
    for (field, list) in lists {
        for (i, a) in list.iter().enumerate() {
            if a.contains('\0') {
                return Err(SpecError::new(
                    format!("{field}[{i}]"),
                    "must not contain NUL bytes",
                ));
            }
            argv_bytes += a.len();
        }
    }
    if argv_bytes > limits.max_argv_bytes {
        return Err(SpecError::new(
            count_field,
            format!(
                "more than {} bytes (command and args together)",
                limits.max_argv_bytes
            ),
        ));
    }
    Ok(())
}

/// An absolute path without NUL, at most 4096 bytes; empty means "keep the image's".
fn validate_working_dir(field: &str, dir: &str) -> Result<Option<String>, SpecError> {
    match dir {
        "" => Ok(None),
        d if !d.starts_with('/') => Err(SpecError::new(
            field,
            format!("{d:?} must be an absolute path"),
        )),
        d if d.contains('\0') || d.len() > 4096 => Err(SpecError::new(
            field,
            "must be at most 4096 bytes without NUL",
        )),
        d => Ok(Some(d.to_owned())),
    }
}

/// Check an exec's start message with the same bounds as a spec: a non-empty command
/// (`start.command`), env names and sizes (`start.envs`), an absolute working
/// directory (`start.working_dir`). The gateway and the agent both call it, so a
/// hostile exec is refused before it reaches containerd.
pub fn validate_exec(
    command: &[String],
    envs: &[EnvVar],
    working_dir: &str,
    limits: &SpecLimits,
) -> Result<(), SpecError> {
    if command.is_empty() {
        return Err(SpecError::new("start.command", "must not be empty"));
    }
    validate_argv(&[("start.command", command)], "start.command", limits)?;
    validate_envs("start.envs", envs, limits)?;
    validate_working_dir("start.working_dir", working_dir)?;
    Ok(())
}

fn validate_envs(
    prefix: &str,
    envs: &[EnvVar],
    limits: &SpecLimits,
) -> Result<Vec<(String, String)>, SpecError> {
    if envs.len() > limits.max_envs {
        return Err(SpecError::new(
            prefix,
            format!("more than {} entries", limits.max_envs),
        ));
    }
    let mut bytes = 0;
    let mut seen = std::collections::HashMap::with_capacity(envs.len());
    let mut out = Vec::with_capacity(envs.len());
    for (i, e) in envs.iter().enumerate() {
        let field = format!("{prefix}[{i}].name");
        if e.name.is_empty() {
            return Err(SpecError::new(field, "must not be empty"));
        }
        let b = e.name.as_bytes();
        let first_ok = b[0].is_ascii_alphabetic() || matches!(b[0], b'_' | b'-' | b'.');
        let rest_ok = b
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-' | b'.'));
        if !first_ok || !rest_ok {
            return Err(SpecError::new(
                field,
                format!(
                    "{:?} must consist of letters, digits, '_', '-' or '.' and not start with a digit",
                    e.name
                ),
            ));
        }
        if let Some(prev) = seen.insert(e.name.as_str(), i) {
            return Err(SpecError::new(
                field,
                format!("duplicate of {prefix}[{prev}].name ({:?})", e.name),
            ));
        }
        if e.value.contains('\0') {
            return Err(SpecError::new(
                format!("{prefix}[{i}].value"),
                "must not contain NUL bytes",
            ));
        }
        bytes += e.name.len() + e.value.len();
        if bytes > limits.max_env_bytes {
            return Err(SpecError::new(
                prefix,
                format!("names and values exceed {} bytes", limits.max_env_bytes),
            ));
        }
        out.push((e.name.clone(), e.value.clone()));
    }
    Ok(out)
}

fn validate_ports(ports: &[u32], limits: &SpecLimits) -> Result<Vec<HostPort>, SpecError> {
    if ports.len() > limits.max_ports {
        return Err(SpecError::new(
            "spec.exposedPorts",
            format!("more than {} ports", limits.max_ports),
        ));
    }
    let mut out = Vec::with_capacity(ports.len());
    for (i, &p) in ports.iter().enumerate() {
        let field = format!("spec.exposedPorts[{i}]");
        let port = HostPort::parse(&field, p)?;
        if limits.agent_port == Some(port.get()) {
            return Err(SpecError::new(
                field,
                format!("port {p} is the agent's own port (sandboxes share its network namespace)"),
            ));
        }
        if out.contains(&port) {
            return Err(SpecError::new(field, format!("port {p} is listed twice")));
        }
        out.push(port);
    }
    out.sort_unstable();
    Ok(out)
}

/// Check a delete's grace period against [`SpecLimits::max_grace_seconds`].
pub fn validate_grace(
    field: &str,
    seconds: Option<u32>,
    limits: &SpecLimits,
) -> Result<(), SpecError> {
    match seconds {
        Some(s) if s > limits.max_grace_seconds => Err(SpecError::new(
            field,
            format!("{s} s is more than {} s", limits.max_grace_seconds),
        )),
        _ => Ok(()),
    }
}

/// Check Kubernetes label syntax and the count limit (also used by Update's label patch).
pub fn validate_labels(
    labels: &BTreeMap<String, String>,
    limits: &SpecLimits,
) -> Result<BTreeMap<String, String>, SpecError> {
    if labels.len() > limits.max_labels {
        return Err(SpecError::new(
            "metadata.labels",
            format!("more than {} labels", limits.max_labels),
        ));
    }
    let value_ok = |v: &str| {
        v.len() <= 63
            && v.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            && (v.is_empty()
                || (v.as_bytes()[0].is_ascii_alphanumeric()
                    && v.as_bytes()[v.len() - 1].is_ascii_alphanumeric()))
    };
    for (k, v) in labels {
        let field = format!("metadata.labels[{k:?}]");
        let (prefix, name) = match k.rsplit_once('/') {
            Some((p, n)) => (Some(p), n),
            None => (None, k.as_str()),
        };
        if let Some(p) = prefix {
            crate::ids::check_dns1123_subdomain(&field, p)?;
        }
        if name.is_empty() || !value_ok(name) {
            return Err(SpecError::new(
                field,
                "label key must be a qualified name (up to 63 alphanumerics, '-', '_', '.')",
            ));
        }
        if !value_ok(v) {
            return Err(SpecError::new(
                field,
                format!("label value {v:?} must be up to 63 alphanumerics, '-', '_', '.'"),
            ));
        }
    }
    Ok(labels.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::to_status;

    fn valid() -> SandboxSpec {
        SandboxSpec {
            namespace: "team-a".into(),
            name: "web-1".into(),
            pool_ref: "default".into(),
            image: "busybox".into(),
            command: vec!["sh".into(), "-c".into()],
            args: vec!["echo hi".into()],
            envs: vec![
                EnvVar {
                    name: "B".into(),
                    value: "2".into(),
                },
                EnvVar {
                    name: "A".into(),
                    value: "1".into(),
                },
            ],
            working_dir: "/work".into(),
            exposed_ports: vec![8080, 65535],
            resources: ResourcesSpec {
                cpu: "500m".into(),
                memory: "64Mi".into(),
                pids: 128,
            },
            runtime: "crun".into(),
            failure_policy: "AutoRecreate".into(),
            recovery_timeout_seconds: 0,
            labels: [("app".to_string(), "demo".to_string())].into(),
            read_only_rootfs: false,
            user_namespace: false,
        }
    }

    fn limits() -> SpecLimits {
        SpecLimits {
            agent_port: Some(5758),
            ..SpecLimits::default()
        }
    }

    #[test]
    fn a_valid_spec_is_typed_and_normalized() {
        let v = valid().validate(&limits()).unwrap();
        assert_eq!(v.image.as_str(), "docker.io/library/busybox:latest");
        assert_eq!(
            v.envs,
            vec![("B".into(), "2".into()), ("A".into(), "1".into())],
            "env order kept"
        );
        assert_eq!(
            v.ports.iter().map(|p| p.get()).collect::<Vec<_>>(),
            vec![8080, 65535]
        );
        assert_eq!(v.cpu, Some(MilliCpu(500)));
        assert_eq!(v.memory, Some(Bytes(64 << 20)));
        assert_eq!(v.runtime, Some(Runtime::Crun));
        assert_eq!(v.failure_policy, FailurePolicy::AutoRecreate);
        assert_eq!(v.recovery_timeout_seconds, DEFAULT_RECOVERY_TIMEOUT_SECONDS);
    }

    /// Each kind of invalid input is InvalidArgument and the message starts with the field.
    #[test]
    fn every_invalid_kind_names_its_field() {
        type Edit = fn(&mut SandboxSpec);
        let cases: Vec<(&str, Edit)> = vec![
            ("metadata.namespace", |s| s.namespace = String::new()),
            ("metadata.namespace", |s| s.namespace = "Team_A".into()),
            ("metadata.name", |s| s.name = "Web".into()),
            ("spec.poolRef", |s| s.pool_ref = String::new()),
            ("spec.poolRef", |s| s.pool_ref = "bad pool".into()),
            ("spec.image", |s| s.image = String::new()),
            ("spec.image", |s| s.image = "Busybox:latest".into()),
            ("spec.image", |s| s.image = "busybox@sha256:xyz".into()),
            ("spec.command[0]", |s| s.command = vec!["a\0b".into()]),
            ("spec.args", |s| s.args = vec!["x".into(); 5000]),
            ("spec.envs[1].name", |s| s.envs[1].name = String::new()),
            ("spec.envs[0].name", |s| s.envs[0].name = "1ABC".into()),
            ("spec.envs[0].name", |s| s.envs[0].name = "A=B".into()),
            ("spec.envs[1].name", |s| s.envs[1].name = "B".into()),
            ("spec.envs[0].value", |s| s.envs[0].value = "\0".into()),
            ("spec.envs", |s| s.envs[0].value = "x".repeat(1 << 20)),
            ("spec.workingDir", |s| s.working_dir = "relative/dir".into()),
            ("spec.exposedPorts[0]", |s| s.exposed_ports = vec![0]),
            ("spec.exposedPorts[1]", |s| {
                s.exposed_ports = vec![80, 65536]
            }),
            ("spec.exposedPorts[0]", |s| s.exposed_ports = vec![5758]),
            ("spec.exposedPorts[1]", |s| s.exposed_ports = vec![80, 80]),
            ("spec.exposedPorts", |s| {
                s.exposed_ports = (1..=10_000).collect()
            }),
            ("spec.resources.cpu", |s| s.resources.cpu = "lots".into()),
            ("spec.resources.memory", |s| {
                s.resources.memory = "-1Gi".into()
            }),
            ("spec.resources.pids", |s| s.resources.pids = u32::MAX),
            ("spec.runtime", |s| s.runtime = "kata".into()),
            ("spec.failurePolicy", |s| {
                s.failure_policy = "Sometimes".into()
            }),
            ("metadata.labels[\"bad key!\"]", |s| {
                s.labels.insert("bad key!".into(), "v".into());
            }),
        ];
        for (field, edit) in cases {
            let mut spec = valid();
            edit(&mut spec);
            let err = spec.validate(&limits()).expect_err(field);
            assert_eq!(err.field(), field, "wrong field for {err}");
            let status = to_status(&err);
            assert_eq!(status.code(), tonic::Code::InvalidArgument);
            assert!(status.message().starts_with(field), "{}", status.message());
        }
    }

    /// An exec start is bounded like a spec and its errors name `start.*` fields.
    #[test]
    fn exec_inputs_are_bounded_and_named() {
        let ok = vec!["sh".to_string()];
        let env = |name: &str, value: String| EnvVar {
            name: name.into(),
            value,
        };
        assert!(validate_exec(&ok, &[env("A", "1".into())], "/w", &limits()).is_ok());
        let many: Vec<String> = vec!["x".into(); 5000];
        let cases: Vec<(&str, Result<(), SpecError>)> = vec![
            ("start.command", validate_exec(&[], &[], "", &limits())),
            ("start.command", validate_exec(&many, &[], "", &limits())),
            (
                "start.command[1]",
                validate_exec(&["a".into(), "b\0".into()], &[], "", &limits()),
            ),
            (
                "start.envs[0].name",
                validate_exec(&ok, &[env("A=B", String::new())], "", &limits()),
            ),
            (
                "start.envs",
                validate_exec(&ok, &[env("A", "x".repeat(1 << 20))], "", &limits()),
            ),
            (
                "start.working_dir",
                validate_exec(&ok, &[], "../../etc", &limits()),
            ),
        ];
        for (field, result) in cases {
            let err = result.expect_err(field);
            assert_eq!(err.field(), field, "{err}");
            assert_eq!(to_status(&err).code(), tonic::Code::InvalidArgument);
        }
    }

    #[test]
    fn grace_is_bounded() {
        let l = limits();
        assert!(validate_grace("grace_period_seconds", None, &l).is_ok());
        assert!(validate_grace("grace_period_seconds", Some(l.max_grace_seconds), &l).is_ok());
        let err = validate_grace("grace_period_seconds", Some(u32::MAX), &l).unwrap_err();
        assert_eq!(err.field(), "grace_period_seconds");
    }

    #[test]
    fn port_65535_is_accepted_and_agent_port_is_explained() {
        let mut spec = valid();
        spec.exposed_ports = vec![65535];
        assert!(spec.validate(&limits()).is_ok());
        spec.exposed_ports = vec![5758];
        let err = spec.validate(&limits()).unwrap_err();
        assert!(err.reason().contains("agent's own port"), "{err}");
    }

    #[test]
    fn digest_is_stable_and_sensitive() {
        let a = valid().validate(&limits()).unwrap();
        let mut other = valid();
        other.image = "docker.io/library/busybox:latest".into();
        assert_eq!(
            a.digest(),
            other.validate(&limits()).unwrap().digest(),
            "normalized image, same digest"
        );
        other.args = vec!["echo bye".into()];
        assert_ne!(a.digest(), other.validate(&limits()).unwrap().digest());
    }

    #[test]
    fn spec_reads_crd_style_json() {
        let json = r#"{"namespace":"default","poolRef":"p","image":"busybox","exposedPorts":[80],
                       "envs":[{"name":"X"}],"workingDir":"/w","resources":{"memory":"1Gi"}}"#;
        let spec: SandboxSpec = serde_json::from_str(json).unwrap();
        let v = spec.validate(&SpecLimits::default()).unwrap();
        assert_eq!(v.envs, vec![("X".into(), String::new())]);
        assert_eq!(v.memory, Some(Bytes(1 << 30)));
    }

    #[test]
    fn a_read_only_rootfs_is_kept_goes_cold_and_leaves_other_digests_alone() {
        let rw = valid().validate(&SpecLimits::default()).unwrap();
        let json = serde_json::to_value(&rw).unwrap();
        assert!(
            json.get("read_only_rootfs").is_none(),
            "false is left out, so older digests and stored specs stay the same"
        );
        assert!(rw.warm_claimable(Some(Runtime::Runc)));
        let mut spec = valid();
        spec.read_only_rootfs = true;
        let ro = spec.validate(&SpecLimits::default()).unwrap();
        assert!(ro.read_only_rootfs);
        assert_ne!(ro.digest(), rw.digest(), "another spec, another digest");
        assert!(!ro.warm_claimable(Some(Runtime::Runc)));
        assert!(!ro.warm_claimable(None));
        let back: ValidSpec = serde_json::from_value(serde_json::to_value(&ro).unwrap()).unwrap();
        assert_eq!(back, ro);
    }

    #[test]
    fn a_user_namespace_is_kept_goes_cold_is_refused_under_gvisor_and_leaves_other_digests_alone() {
        let plain = valid().validate(&SpecLimits::default()).unwrap();
        let json = serde_json::to_value(&plain).unwrap();
        assert!(json.get("user_namespace").is_none(), "false is left out");
        let mut spec = valid();
        spec.user_namespace = true;
        let userns = spec.validate(&SpecLimits::default()).unwrap();
        assert!(userns.user_namespace);
        assert_ne!(userns.digest(), plain.digest());
        assert!(!userns.warm_claimable(Some(Runtime::Runc)));
        assert!(!userns.warm_claimable(None));
        let back: ValidSpec =
            serde_json::from_value(serde_json::to_value(&userns).unwrap()).unwrap();
        assert_eq!(back, userns);
        spec.runtime = "gvisor".into();
        let err = spec.validate(&SpecLimits::default()).unwrap_err();
        assert_eq!(err.field(), "spec.userNamespace");
        assert!(err.to_string().contains("user_namespace"), "{err}");
        assert!(err.to_string().contains("gvisor"), "{err}");
        spec.runtime = "crun".into();
        assert!(spec.validate(&SpecLimits::default()).is_ok());
    }
}
