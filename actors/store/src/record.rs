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
    /// Where the create's time went (what `fsb get` shows), written with the create's
    /// record; `None` for records no fast-path create made (adopted, kubectl).
    pub timeline: Option<StartTimeline>,
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

/// How a sandbox's process was started.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum StartPath {
    /// A container was created for it.
    #[default]
    Cold,
    /// A pre-started warm instance was handed its process.
    Warm,
}

impl StartPath {
    /// `cold` or `warm`, as the API and the CRD spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            StartPath::Cold => "cold",
            StartPath::Warm => "warm",
        }
    }

    /// Inverse of [`Self::as_str`]; anything else is cold (the agent's default).
    pub fn parse(s: &str) -> StartPath {
        if s == "warm" {
            StartPath::Warm
        } else {
            StartPath::Cold
        }
    }
}

/// One stage of a start, microseconds relative to when the create was received.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StartStage {
    /// validate, allocate, record, agent, runtime, runtime.<agent stage>.
    pub name: String,
    /// Start, after the create was received.
    pub start_us: u64,
    /// Duration.
    pub duration_us: u64,
}

/// A create's start timeline as the record keeps it. Bounded ([`Self::bounded`]):
/// every write of the record carries it, so it must stay small.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StartTimeline {
    /// Cold or warm.
    pub path: StartPath,
    /// Why a warm request went cold, or similar remarks (at most [`Self::MAX_NOTE`]).
    #[serde(default)]
    pub note: String,
    /// From receipt to the agent's answer.
    pub total_us: u64,
    /// When the user process started, Unix microseconds on the agent's clock; 0 if
    /// unknown.
    #[serde(default)]
    pub started_unix_us: u64,
    /// Stages in order (at most [`Self::MAX_STAGES`]).
    #[serde(default)]
    pub stages: Vec<StartStage>,
}

impl StartTimeline {
    /// Most stages kept (a create has about a dozen).
    pub const MAX_STAGES: usize = 32;
    /// Longest note kept, in bytes.
    pub const MAX_NOTE: usize = 256;
    /// Longest stage name kept, in bytes.
    pub const MAX_NAME: usize = 64;

    /// Cut to the bounds: extra stages dropped, the note and stage names shortened
    /// on a character boundary.
    pub fn bounded(mut self) -> Self {
        self.stages.truncate(Self::MAX_STAGES);
        truncate(&mut self.note, Self::MAX_NOTE);
        for s in &mut self.stages {
            truncate(&mut s.name, Self::MAX_NAME);
        }
        self
    }
}

/// Shorten `s` to at most `max` bytes without splitting a character.
fn truncate(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timelines_are_cut_to_their_bounds_on_character_boundaries() {
        let t = StartTimeline {
            note: "é".repeat(StartTimeline::MAX_NOTE),
            stages: (0..40)
                .map(|i| StartStage {
                    name: format!("{i}{}", "x".repeat(100)),
                    start_us: i,
                    duration_us: 1,
                })
                .collect(),
            ..StartTimeline::default()
        }
        .bounded();
        assert_eq!(t.stages.len(), StartTimeline::MAX_STAGES);
        assert!(t.note.len() <= StartTimeline::MAX_NOTE && t.note.len() > 250);
        assert!(t.note.chars().all(|c| c == 'é'));
        assert!(
            t.stages
                .iter()
                .all(|s| s.name.len() == StartTimeline::MAX_NAME)
        );
        assert_eq!(t.stages[31].start_us, 31, "the first stages are kept");
    }

    #[test]
    fn paths_round_trip_and_unknown_ones_read_cold() {
        for p in [StartPath::Cold, StartPath::Warm] {
            assert_eq!(StartPath::parse(p.as_str()), p);
        }
        assert_eq!(StartPath::parse(""), StartPath::Cold);
    }
}
