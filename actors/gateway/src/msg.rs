//! Typed messages of the gateway actor. Callers use [`crate::GatewayHandle`].

use actix::Message;
use fsb_core::{RequestId, spec::SpecDigest};

use crate::state::{Key, Outcome, Reservation};

#[derive(Debug, Message)]
#[rtype(result = "Reservation")]
pub(crate) struct ReserveCreate {
    pub(crate) key: Key,
    pub(crate) request_id: RequestId,
    pub(crate) digest: SpecDigest,
}

#[derive(Debug, Message)]
#[rtype(result = "bool")]
pub(crate) struct ReserveOp(pub(crate) Key);

#[derive(Debug, Message)]
#[rtype(result = "()")]
pub(crate) struct Publish(pub(crate) Key, pub(crate) Outcome);

#[derive(Debug, Message)]
#[rtype(result = "bool")]
pub(crate) struct Release(pub(crate) Key);

#[derive(Debug, Message)]
#[rtype(result = "bool")]
pub(crate) struct IsHeld(pub(crate) Key);

#[derive(Debug, Message)]
#[rtype(result = "usize")]
pub(crate) struct Held;
