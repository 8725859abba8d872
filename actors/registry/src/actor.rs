//! The actix actor: thin synchronous handlers over [`RegistryState`]. Mailbox order is
//! the only concurrency control allocation needs: no handler awaits, so no two
//! allocations ever interleave.
//!
//! Restart rule: the actor runs under an actix `Supervisor`. On restart its state is
//! empty; agents re-send full reports on their next heartbeat and the gateway
//! re-reads its store at startup, which rebuilds it (source of truth: agents).

use actix::{Actor, Context, Handler, MessageResult, Supervised};

use crate::{
    msg::{AgentLost, Allocate, Release, Report, Reset, Snapshot},
    state::RegistryState,
};

/// Mailbox size: senders beyond this wait (backpressure) instead of growing memory.
const MAILBOX_CAPACITY: usize = 4096;

/// Owns the [`RegistryState`].
#[derive(Debug, Default)]
pub struct RegistryActor {
    state: RegistryState,
}

impl Actor for RegistryActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(MAILBOX_CAPACITY);
    }
}

impl Supervised for RegistryActor {
    fn restarting(&mut self, _ctx: &mut Self::Context) {
        tracing::warn!(
            sandboxes = self.state.sandbox_count(),
            agents = self.state.agent_count(),
            "registry restarting empty; agents' next reports rebuild it"
        );
        self.state = RegistryState::new();
    }
}

impl Handler<Allocate> for RegistryActor {
    type Result = MessageResult<Allocate>;

    fn handle(&mut self, msg: Allocate, _ctx: &mut Self::Context) -> Self::Result {
        let span =
            tracing::info_span!(parent: &msg.span, "registry.allocate", image = %msg.req.image);
        let _enter = span.enter();
        MessageResult(self.state.allocate(&msg.req))
    }
}

impl Handler<Release> for RegistryActor {
    type Result = MessageResult<Release>;

    fn handle(&mut self, msg: Release, _ctx: &mut Self::Context) -> Self::Result {
        let span = tracing::info_span!(parent: &msg.span, "registry.release");
        let _enter = span.enter();
        MessageResult(self.state.release(&msg.sandbox, &msg.agent))
    }
}

impl Handler<Report> for RegistryActor {
    type Result = MessageResult<Report>;

    fn handle(&mut self, msg: Report, _ctx: &mut Self::Context) -> Self::Result {
        let out = self.state.report(msg.report);
        if !out.evicted.is_empty() || !out.moved.is_empty() {
            tracing::warn!(evicted = ?out.evicted, moved = ?out.moved, "agent report overrode allocations");
        }
        MessageResult(out)
    }
}

impl Handler<AgentLost> for RegistryActor {
    type Result = MessageResult<AgentLost>;

    fn handle(&mut self, msg: AgentLost, _ctx: &mut Self::Context) -> Self::Result {
        MessageResult(self.state.agent_lost(&msg.agent))
    }
}

impl Handler<Snapshot> for RegistryActor {
    type Result = MessageResult<Snapshot>;

    fn handle(&mut self, _msg: Snapshot, _ctx: &mut Self::Context) -> Self::Result {
        MessageResult(self.state.snapshot())
    }
}

impl Handler<Reset> for RegistryActor {
    type Result = ();

    fn handle(&mut self, _msg: Reset, ctx: &mut Self::Context) {
        use actix::ActorContext;
        ctx.stop();
    }
}
