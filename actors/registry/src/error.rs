//! Registry errors: the caller-facing channel. Allocation outcomes are not errors
//! (they are typed in [`crate::AllocateOutcome`]) until a caller turns them into one.

use fsb_core::{ErrorCode, HasErrorCode, HostPort, NamespaceName, PoolName, SandboxId};

/// Why a registry call failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The actor is not running (stopped or restarting); retry.
    #[error("registry is not running")]
    Unavailable,
    /// No agent of the pool is registered in that namespace.
    #[error("spec.poolRef: no agent of pool {pool:?} in namespace {namespace:?}")]
    NoAgents {
        /// Pool asked for.
        pool: PoolName,
        /// Namespace asked for.
        namespace: NamespaceName,
    },
    /// Agents exist but none is healthy.
    #[error("pool {pool:?} has no healthy agent")]
    NoHealthyAgent {
        /// Pool asked for.
        pool: PoolName,
    },
    /// Every healthy agent is full.
    #[error("pool {pool:?} is full: every agent is at capacity")]
    NoFreeSlot {
        /// Pool asked for.
        pool: PoolName,
    },
    /// Agents have free slots but every one uses one of the requested ports.
    #[error(
        "spec.exposedPorts: ports {ports:?} are in use on every agent of pool {pool:?} with a free slot"
    )]
    PortsInUse {
        /// Pool asked for.
        pool: PoolName,
        /// Ports asked for.
        ports: Vec<u16>,
    },
    /// The request id was used before for a different spec.
    #[error("request_id: already used for sandbox {existing} with a different spec")]
    RequestIdReused {
        /// Sandbox created by the earlier request.
        existing: SandboxId,
    },
    /// The sandbox id is already allocated (by another request).
    #[error("sandbox {0} is already allocated")]
    SandboxIdInUse(SandboxId),
}

impl RegistryError {
    pub(crate) fn ports_in_use(pool: PoolName, ports: &[HostPort]) -> Self {
        Self::PortsInUse {
            pool,
            ports: ports.iter().map(|p| p.get()).collect(),
        }
    }
}

impl HasErrorCode for RegistryError {
    fn error_code(&self) -> ErrorCode {
        match self {
            Self::Unavailable => ErrorCode::Unavailable,
            Self::NoAgents { .. } => ErrorCode::FailedPrecondition,
            Self::NoHealthyAgent { .. } => ErrorCode::Unavailable,
            Self::NoFreeSlot { .. } | Self::PortsInUse { .. } => ErrorCode::ResourceExhausted,
            Self::RequestIdReused { .. } | Self::SandboxIdInUse(_) => ErrorCode::AlreadyExists,
        }
    }
}
