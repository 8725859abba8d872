//! fsb-gateway: the fast path.
//!
//! Role: serve `fastpath.v1` (Create, Delete, Get, List, Update, Watch, Exec, Logs,
//! Usage, and Images in local mode). A create is validated, its name and request id reserved by
//! the [`GatewayActor`] (mailbox-serialized), a slot allocated by the registry actor,
//! the container created by the agent, and the sandbox recorded in the
//! [`fsb_store::SandboxStore`]: before the container in STRONG mode, after the answer
//! (retried, tracked, drained on shutdown) in FAST mode.
//!
//! - [`state`]: pure reservations (name, request id, outcome for duplicates); [`actor`],
//!   [`msg`], [`handle`]: the actor around it.
//! - [`gateway`]: [`Gateway`], the logic (create with rollback on every failure path,
//!   delete, update/reset, expiry sweeps, exit events, startup reconcile).
//! - [`agents`]: [`AgentClient`], the seam to agents; [`LocalAgent`] in-process.
//! - [`service`]: the tonic services and the bearer-token check; [`limit`]: per-client
//!   rate limiting in front of it; [`auth`]: each call in RBAC terms and the
//!   [`Authorizer`] seam (Kubernetes mode: TokenReview + SubjectAccessReview).
//! - [`convert`]: records <-> wire; [`error`]: [`GatewayError`] -> gRPC code.
//!
//! Invariants: a create either answers with a running sandbox that is recorded (or
//! being recorded, FAST) or leaves no container, slot or record; a slot is released
//! only once its container is proven gone; the same request id with the same spec
//! answers the first result, with another spec AlreadyExists.

pub mod actor;
pub mod agents;
pub mod auth;
pub mod convert;
pub mod error;
pub mod gateway;
pub mod handle;
pub mod limit;
mod msg;
pub mod service;
pub mod state;

pub use actor::GatewayActor;
pub use agents::{AgentClient, LocalAgent};
pub use auth::{Access, Authorizer};
pub use error::GatewayError;
pub use gateway::{DEFAULT_NAMESPACE, Gateway, GatewayConfig, LABEL_ADOPTED, ReconcileReport};
pub use handle::GatewayHandle;
pub use limit::{RateLimit, RateLimitConfig};
pub use service::{FastPathService, LocalImages, TokenCheck};
