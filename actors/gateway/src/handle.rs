//! [`GatewayHandle`]: the typed way to the gateway actor.

use actix::{Addr, Supervisor};
use fsb_core::{RequestId, spec::SpecDigest};
use tonic::Status;

use crate::{
    actor::GatewayActor,
    msg::{Held, IsHeld, Publish, Release, ReserveCreate, ReserveOp},
    state::{Key, Outcome, Reservation},
};

/// Cloneable handle to the supervised gateway actor.
#[derive(Clone, Debug)]
pub struct GatewayHandle {
    addr: Addr<GatewayActor>,
}

fn stopped<E>(_: E) -> Status {
    Status::unavailable("gateway actor is restarting; retry")
}

impl GatewayHandle {
    /// Start the actor under a supervisor (inside an actix system).
    pub fn start() -> Self {
        Self {
            addr: Supervisor::start(|_| GatewayActor::default()),
        }
    }

    /// Reserve `key` and `request_id` for a create.
    pub async fn reserve_create(
        &self,
        key: Key,
        request_id: RequestId,
        digest: SpecDigest,
    ) -> Result<Reservation, Status> {
        self.addr
            .send(ReserveCreate {
                key,
                request_id,
                digest,
            })
            .await
            .map_err(stopped)
    }

    /// Reserve `key` for a delete, reset or expiry.
    pub async fn reserve_op(&self, key: Key) -> Result<bool, Status> {
        self.addr.send(ReserveOp(key)).await.map_err(stopped)
    }

    /// Publish a create's outcome to duplicates waiting on it.
    pub fn publish(&self, key: Key, outcome: Outcome) {
        self.addr.do_send(Publish(key, outcome));
    }

    /// Drop a reservation (fire and forget: ordering after earlier sends is kept).
    pub fn release(&self, key: Key) {
        self.addr.do_send(Release(key));
    }

    /// Whether `key` is reserved.
    pub async fn is_held(&self, key: Key) -> Result<bool, Status> {
        self.addr.send(IsHeld(key)).await.map_err(stopped)
    }

    /// How many reservations are held (for drain and tests).
    pub async fn held(&self) -> Result<usize, Status> {
        self.addr.send(Held).await.map_err(stopped)
    }
}
