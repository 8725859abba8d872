//! fsb-registry: the RegistryActor decides which agent holds each sandbox.
//!
//! Role: keep every agent's pool, namespace, capacity, images, ports, health and warm
//! instances, and place sandboxes: pool + namespace, free slot, free ports, a warm
//! instance of the image and runtime (claimable requests, which then take the
//! instance's id), image affinity, least loaded, stable tie-break. Allocation is
//! serialized by the actor's mailbox (no locks) and idempotent by request id.
//!
//! Messages (through [`RegistryHandle`]): allocate, release, agent report, agent lost,
//! snapshot, reset.
//!
//! Invariants: a port is held once per agent; capacity is never exceeded by
//! allocation; release checks ownership and repeats are no-ops; a warm instance serves
//! at most one live sandbox (an allocated id is never offered); finished sandboxes,
//! lost agents and empty groups leave no records. See [`state`] for the rules and
//! [`RegistryState::verify`] for the executable form.

mod actor;
pub mod error;
mod handle;
pub mod metrics;
mod msg;
pub mod state;

pub use actor::RegistryActor;
pub use error::RegistryError;
pub use handle::RegistryHandle;
pub use metrics::RegistryMetrics;
pub use state::{
    AgentInfo, AgentReport, AllocateOutcome, AllocateRequest, ConflictReason, ExhaustedReason,
    Placement, RegistrySnapshot, RegistryState, ReleaseOutcome, ReportOutcome, ReportedSandbox,
    WarmInstance,
};
