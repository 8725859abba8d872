//! Typed messages of the agent's actors. Callers use [`crate::AgentHandle`].

use std::{collections::HashMap, time::Duration};

use actix::Message;
use fsb_core::{SandboxId, spec::Runtime, spec::ValidSpec};
use tokio::sync::broadcast;

use crate::{
    error::AgentError,
    runtime::ObservedSandbox,
    state::{PhaseChange, SandboxRecord},
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
    /// (stage, time) in order: image, spec, snapshot, container, task, start.
    pub stages: Vec<(&'static str, Duration)>,
}

#[derive(Debug, Message)]
#[rtype(result = "Result<CreatedSandbox, AgentError>")]
pub(crate) struct Create(pub(crate) CreateSandbox);

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

/// To a SandboxActor: create and start (idempotent: a repeat returns the first result).
#[derive(Debug, Message)]
#[rtype(result = "Result<CreatedSandbox, AgentError>")]
pub(crate) struct Start {
    pub(crate) spec: ValidSpec,
    pub(crate) runtime: Runtime,
    pub(crate) labels: HashMap<String, String>,
    pub(crate) hostname: String,
}

/// To a SandboxActor: stop and remove everything.
#[derive(Debug, Message)]
#[rtype(result = "Result<bool, AgentError>")]
pub(crate) struct Stop {
    pub(crate) grace: Duration,
}
