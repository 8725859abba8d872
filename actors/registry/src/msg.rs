//! Typed messages of the registry actor. Callers use [`crate::RegistryHandle`], never
//! these directly. Each carries the caller's tracing span so one trace follows a create.

use actix::Message;
use fsb_core::{AgentId, SandboxId};

use crate::state::{
    AgentReport, AllocateOutcome, AllocateRequest, RegistrySnapshot, ReleaseOutcome, ReportOutcome,
};

/// Reserve a slot.
#[derive(Debug, Message)]
#[rtype(result = "AllocateOutcome")]
pub(crate) struct Allocate {
    pub(crate) req: AllocateRequest,
    pub(crate) span: tracing::Span,
}

/// Free a slot.
#[derive(Debug, Message)]
#[rtype(result = "ReleaseOutcome")]
pub(crate) struct Release {
    pub(crate) sandbox: SandboxId,
    pub(crate) agent: AgentId,
    pub(crate) span: tracing::Span,
}

/// An agent's full inventory.
#[derive(Debug, Message)]
#[rtype(result = "ReportOutcome")]
pub(crate) struct Report {
    pub(crate) report: AgentReport,
}

/// An agent is gone (pod deleted, stream closed past its grace).
#[derive(Debug, Message)]
#[rtype(result = "Vec<SandboxId>")]
pub(crate) struct AgentLost {
    pub(crate) agent: AgentId,
}

/// A consistent copy of the state.
#[derive(Debug, Message)]
#[rtype(result = "RegistrySnapshot")]
pub(crate) struct Snapshot;

/// Stop the actor so that its supervisor restarts it empty (used when a caller
/// learns that the registry's view cannot be trusted, and by tests).
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub(crate) struct Reset;
