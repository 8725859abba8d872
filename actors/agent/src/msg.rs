//! Typed messages of the agent's actors. Callers use [`crate::AgentHandle`].

use std::{collections::HashMap, time::Duration};

use actix::Message;
use fsb_core::{SandboxId, spec::Runtime, spec::ValidSpec};
use tokio::sync::broadcast;

use crate::{
    error::AgentError,
    runtime::ObservedSandbox,
    state::{PhaseChange, SandboxRecord},
    warm::WarmKey,
};

/// What the controller (or `fsb up`) asks the agent to run.
#[derive(Clone, Debug)]
pub struct CreateSandbox {
    /// Id chosen by the controller (idempotency key on the agent).
    pub id: SandboxId,
    /// Kubernetes namespace.
    pub namespace: String,
    /// Sandbox name.
    pub name: String,
    /// Uid of the Sandbox object (empty in local mode).
    pub claim_uid: String,
    /// Idempotency key of the client's create (empty if none), kept as a label.
    pub request_id: String,
    /// The validated spec.
    pub spec: ValidSpec,
}

/// A sandbox that runs, and where the time of its create went.
#[derive(Clone, Debug)]
pub struct CreatedSandbox {
    /// The sandbox.
    pub id: SandboxId,
    /// Host pid of its init process.
    pub pid: u32,
    /// (stage, time) in order: image, spec, snapshot, container, task, start for a
    /// cold create; claim, limits, handover for a warm one.
    pub stages: Vec<(&'static str, Duration)>,
    /// Whether a warm instance was claimed.
    pub warm: bool,
    /// Why a create that could have been warm went cold (empty otherwise).
    pub note: String,
    /// When the user process started (unix microseconds, fsb-init's report); 0 for
    /// a cold create, whose process starts with the task.
    pub started_unix_us: u64,
}

#[derive(Debug, Message)]
#[rtype(result = "Result<CreatedSandbox, AgentError>")]
pub(crate) struct Create {
    pub(crate) req: CreateSandbox,
    /// The caller's span: the create's work continues its trace.
    pub(crate) span: tracing::Span,
}

#[derive(Debug, Message)]
#[rtype(result = "Result<(), AgentError>")]
pub(crate) struct Delete {
    pub(crate) id: SandboxId,
    pub(crate) grace: Option<Duration>,
}

#[derive(Debug, Message)]
#[rtype(result = "()")]
pub(crate) struct Exited {
    pub(crate) id: SandboxId,
    pub(crate) pid: u32,
    pub(crate) exit_code: i32,
}

/// containerd's view, to replace ours (startup, containerd reconnect).
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub(crate) struct Resync(pub(crate) Vec<ObservedSandbox>);

#[derive(Debug, Message)]
#[rtype(result = "Vec<SandboxRecord>")]
pub(crate) struct Inventory;

#[derive(Debug, Message)]
#[rtype(result = "broadcast::Receiver<PhaseChange>")]
pub(crate) struct Subscribe;

/// Keep nothing warm from now on; the ready instances, for the caller to remove.
#[derive(Debug, Message)]
#[rtype(result = "(Vec<SandboxId>, usize)")]
pub(crate) struct StopWarm;

/// The ready warm instances, for reports.
#[derive(Debug, Message)]
#[rtype(result = "Vec<(WarmKey, SandboxId)>")]
pub(crate) struct WarmInstances;

/// To a SandboxActor: create and start (idempotent: a repeat returns the first result).
#[derive(Debug, Message)]
#[rtype(result = "Result<CreatedSandbox, AgentError>")]
pub(crate) struct Start {
    pub(crate) spec: ValidSpec,
    pub(crate) runtime: Runtime,
    pub(crate) labels: HashMap<String, String>,
    pub(crate) hostname: String,
    pub(crate) how: StartHow,
    /// The create's span, continued by the sandbox actor's containerd calls.
    pub(crate) span: tracing::Span,
}

/// How a [`Start`] gets its container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum StartHow {
    /// Create one (the note says why it is not warm, if it could have been).
    Cold(String),
    /// Hand the process to the warm instance under this id; cold if that fails.
    Claim,
    /// The warm instance under this id cannot serve the spec: remove it, then cold.
    Replace(String),
}

impl StartHow {
    /// For spans and logs.
    pub(crate) fn label(&self) -> &'static str {
        match self {
            StartHow::Cold(_) => "cold",
            StartHow::Claim => "warm",
            StartHow::Replace(_) => "replace",
        }
    }
}

/// To a SandboxActor: create and start a warm instance (fsb-init waiting for its
/// process).
#[derive(Debug, Message)]
#[rtype(result = "Result<u32, AgentError>")]
pub(crate) struct StartWarm {
    pub(crate) key: WarmKey,
    pub(crate) labels: HashMap<String, String>,
    pub(crate) init: std::path::PathBuf,
    pub(crate) network: crate::oci::NetworkMode,
}

/// To a SandboxActor: stop and remove everything.
#[derive(Debug, Message)]
#[rtype(result = "Result<bool, AgentError>")]
pub(crate) struct Stop {
    pub(crate) grace: Duration,
}
