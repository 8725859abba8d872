//! The typed, cloneable way to talk to the registry.

use actix::{Addr, MailboxError, Supervisor};
use fsb_core::{AgentId, SandboxId};

use crate::{
    actor::RegistryActor,
    error::RegistryError,
    msg::{AgentLost, Allocate, Release, Report, Reset, Snapshot},
    state::{
        AgentReport, AllocateOutcome, AllocateRequest, RegistrySnapshot, ReleaseOutcome,
        ReportOutcome,
    },
};

/// Handle to a running, supervised [`RegistryActor`].
#[derive(Clone, Debug)]
pub struct RegistryHandle {
    addr: Addr<RegistryActor>,
}

impl RegistryHandle {
    /// Start the registry under a supervisor on the current actix arbiter.
    pub fn start() -> Self {
        Self {
            addr: Supervisor::start(|_| RegistryActor::default()),
        }
    }

    /// Reserve a slot; see [`AllocateOutcome`].
    pub async fn allocate(&self, req: AllocateRequest) -> Result<AllocateOutcome, RegistryError> {
        let span = tracing::Span::current();
        self.addr
            .send(Allocate { req, span })
            .await
            .map_err(unavailable)
    }

    /// Free the slot of `sandbox` held by `agent`.
    pub async fn release(
        &self,
        sandbox: SandboxId,
        agent: AgentId,
    ) -> Result<ReleaseOutcome, RegistryError> {
        let span = tracing::Span::current();
        self.addr
            .send(Release {
                sandbox,
                agent,
                span,
            })
            .await
            .map_err(unavailable)
    }

    /// Apply an agent's full inventory.
    pub async fn report(&self, report: AgentReport) -> Result<ReportOutcome, RegistryError> {
        self.addr.send(Report { report }).await.map_err(unavailable)
    }

    /// Forget an agent; returns the sandboxes it held.
    pub async fn agent_lost(&self, agent: AgentId) -> Result<Vec<SandboxId>, RegistryError> {
        self.addr
            .send(AgentLost { agent })
            .await
            .map_err(unavailable)
    }

    /// A consistent copy of the state.
    pub async fn snapshot(&self) -> Result<RegistrySnapshot, RegistryError> {
        self.addr.send(Snapshot).await.map_err(unavailable)
    }

    /// Restart the registry empty (its state is no longer trusted); it rebuilds from
    /// the next agent reports.
    pub async fn reset(&self) -> Result<(), RegistryError> {
        self.addr.send(Reset).await.map_err(unavailable)
    }
}

fn unavailable(_: MailboxError) -> RegistryError {
    RegistryError::Unavailable
}
