//! The stored form of a sandbox, its phase, list filters and watch events.

use std::{collections::BTreeMap, fmt};

use fsb_core::{
    AgentId, NamespaceName, NodeName, PoolName, RequestId, SandboxId, SandboxName, ValidSpec,
    spec::SpecDigest,
};

/// Lifecycle phase, as in `Sandbox.status.phase` of the CRD.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Phase {
    /// Recorded, not yet placed.
    Pending,
    /// Placed on an agent, container not yet running.
    Bound,
    /// Container running.
    Running,
    /// Being deleted; cleanup not yet proven.
    Terminating,
    /// Its expire time passed.
    Expired,
    /// Failed to start or crashed (Manual failure policy).
    Failed,
    /// Its agent or container disappeared.
    Lost,
    /// Exited with code 0.
    Succeeded,
}

impl Phase {
    /// Every phase, for exhaustive tests.
    pub const ALL: [Phase; 8] = [
        Phase::Pending,
        Phase::Bound,
        Phase::Running,
        Phase::Terminating,
        Phase::Expired,
        Phase::Failed,
        Phase::Lost,
        Phase::Succeeded,
    ];

    /// The name stored in the database and shown in the CRD.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "Pending",
            Phase::Bound => "Bound",
            Phase::Running => "Running",
            Phase::Terminating => "Terminating",
            Phase::Expired => "Expired",
            Phase::Failed => "Failed",
            Phase::Lost => "Lost",
            Phase::Succeeded => "Succeeded",
        }
    }

    /// Inverse of [`Self::as_str`].
    pub fn parse(s: &str) -> Option<Phase> {
        Phase::ALL.into_iter().find(|p| p.as_str() == s)
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One sandbox as the store keeps it. Key: (`namespace`, `name`). `request_id` and
/// `sandbox_id` are unique across the store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredSandbox {
    /// Namespace (key part 1).
    pub namespace: NamespaceName,
    /// Name (key part 2).
    pub name: SandboxName,
    /// Object uid: tells a recreated same-name sandbox from its predecessor. Immutable.
    pub uid: String,
    /// Runtime id (containerd container and snapshot key).
    pub sandbox_id: SandboxId,
    /// Idempotency key of the Create that made it.
    pub request_id: Option<RequestId>,
    /// Digest of `spec` at create time (idempotent replays compare it).
    pub spec_digest: SpecDigest,
    /// The validated spec, stored as JSON.
    pub spec: ValidSpec,
    /// Current labels (updatable; the spec keeps the ones it was created with).
    pub labels: BTreeMap<String, String>,
    /// Lifecycle phase.
    pub phase: Phase,
    /// Agent holding it, once bound.
    pub agent: Option<AgentId>,
    /// Node of that agent.
    pub node: Option<NodeName>,
    /// Exit code once the container exited.
    pub exit_code: Option<i32>,
    /// Expire time, Unix milliseconds.
    pub expire_time_ms: Option<i64>,
    /// Reset revision asked for.
    pub reset_revision: i64,
    /// Reset revision the agent has carried out.
    pub accepted_reset_revision: i64,
    /// Creation time, Unix milliseconds. Immutable.
    pub created_ms: i64,
    /// Set by the store on every write, strictly increasing across the whole store
    /// (like etcd's revision). Ignored on create; on update it is the version the
    /// caller read.
    pub resource_version: u64,
}

impl StoredSandbox {
    /// The record's pool (from its spec).
    pub fn pool(&self) -> &PoolName {
        &self.spec.pool
    }

    /// `namespace/name`, for messages.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// What [`crate::SandboxStore::list`] returns: every condition given must hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ListFilter {
    /// Only this namespace.
    pub namespace: Option<NamespaceName>,
    /// Only this pool.
    pub pool: Option<PoolName>,
    /// Only records carrying every one of these labels with these values.
    pub labels: BTreeMap<String, String>,
}

impl ListFilter {
    /// Whether `record` passes the filter.
    pub fn matches(&self, record: &StoredSandbox) -> bool {
        self.namespace
            .as_ref()
            .is_none_or(|ns| *ns == record.namespace)
            && self.pool.as_ref().is_none_or(|p| p == record.pool())
            && self
                .labels
                .iter()
                .all(|(k, v)| record.labels.get(k) == Some(v))
    }
}

/// Kind of change in a [`StoreEvent`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// Created.
    Added,
    /// Updated.
    Modified,
    /// Deleted; the record is the last stored state.
    Deleted,
}

/// A committed change, sent to watchers in commit order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreEvent {
    /// What happened.
    pub kind: EventKind,
    /// The record after the change (before it, for deletes).
    pub record: StoredSandbox,
}
