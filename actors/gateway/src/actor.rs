//! `GatewayActor`: owns [`GatewayState`]; thin synchronous handlers, so reservations
//! are serialized by the mailbox. All I/O happens in [`crate::Gateway`], outside.
//!
//! Restart rule: the actor holds only reservations of work in progress. If it stops,
//! its supervisor restarts it empty; work in flight then finishes (its releases are
//! no-ops) and the store stays the source of truth.

use actix::{Actor, Context, Handler, Supervised};

use crate::{
    msg::{Held, IsHeld, Publish, Release, ReserveCreate, ReserveOp},
    state::{GatewayState, Reservation},
};

/// The gateway actor.
#[derive(Debug, Default)]
pub struct GatewayActor {
    state: GatewayState,
}

impl Actor for GatewayActor {
    type Context = Context<Self>;
}

impl Supervised for GatewayActor {
    fn restarting(&mut self, _: &mut Context<Self>) {
        tracing::warn!("gateway actor restarting with no reservations");
        self.state = GatewayState::new();
    }
}

impl Handler<ReserveCreate> for GatewayActor {
    type Result = actix::MessageResult<ReserveCreate>;
    fn handle(&mut self, m: ReserveCreate, _: &mut Context<Self>) -> Self::Result {
        actix::MessageResult(self.state.reserve_create(m.key, m.request_id, m.digest))
    }
}

impl Handler<ReserveOp> for GatewayActor {
    type Result = bool;
    fn handle(&mut self, m: ReserveOp, _: &mut Context<Self>) -> bool {
        self.state.reserve_op(m.0)
    }
}

impl Handler<Publish> for GatewayActor {
    type Result = ();
    fn handle(&mut self, m: Publish, _: &mut Context<Self>) {
        self.state.publish(&m.0, m.1);
    }
}

impl Handler<Release> for GatewayActor {
    type Result = bool;
    fn handle(&mut self, m: Release, _: &mut Context<Self>) -> bool {
        self.state.release(&m.0)
    }
}

impl Handler<IsHeld> for GatewayActor {
    type Result = bool;
    fn handle(&mut self, m: IsHeld, _: &mut Context<Self>) -> bool {
        self.state.is_held(&m.0)
    }
}

impl Handler<Held> for GatewayActor {
    type Result = usize;
    fn handle(&mut self, _: Held, _: &mut Context<Self>) -> usize {
        self.state.len()
    }
}

/// Keep [`Reservation`] usable as a message result.
impl<A, M> actix::dev::MessageResponse<A, M> for Reservation
where
    A: Actor,
    M: actix::Message<Result = Reservation>,
{
    fn handle(self, _: &mut A::Context, tx: Option<actix::dev::OneshotSender<Reservation>>) {
        if let Some(tx) = tx {
            let _ = tx.send(self);
        }
    }
}
