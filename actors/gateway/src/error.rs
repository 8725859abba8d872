//! Gateway errors: what a fast-path caller sees. Each maps to one [`ErrorCode`] and so
//! to one gRPC code (through `fsb_core::error::to_status`, the only place).

use fsb_core::{ErrorCode, HasErrorCode, SpecError};
use fsb_registry::RegistryError;
use fsb_store::StoreError;

/// Why a fast-path call failed.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// A field of the request is wrong (the message names it).
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// A request field outside the sandbox spec is wrong.
    #[error("{field}: {reason}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// No such sandbox.
    #[error("sandbox {0} not found")]
    NotFound(String),
    /// The name or request id is taken.
    #[error("{0}")]
    AlreadyExists(String),
    /// Another operation holds the sandbox; retry shortly.
    #[error("sandbox {0} is busy (being created, reset or deleted); retry")]
    Busy(String),
    /// The gateway is starting (reconciling) or shutting down.
    #[error("gateway is {0}; retry")]
    NotServing(&'static str),
    /// The sandbox is in a phase where the call cannot run.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The client's deadline passed; whatever was started was removed.
    #[error("{0}")]
    DeadlineExceeded(String),
    /// The agent holding the sandbox is not connected.
    #[error("agent {0} is not connected; retry later")]
    AgentGone(String),
    /// The agent answered with an error (its code is kept).
    #[error("agent: {}", .0.message())]
    Agent(tonic::Status),
    /// The client sent more requests than its rate limit allows; retry later.
    #[error("{0}")]
    RateLimited(String),
    /// Allocation failed.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A bug: a task ended without answering.
    #[error("internal: {0}")]
    Internal(String),
}

impl HasErrorCode for GatewayError {
    fn error_code(&self) -> ErrorCode {
        match self {
            Self::Spec(e) => e.error_code(),
            Self::Invalid { .. } => ErrorCode::InvalidArgument,
            Self::NotFound(_) => ErrorCode::NotFound,
            Self::AlreadyExists(_) => ErrorCode::AlreadyExists,
            Self::Busy(_) | Self::NotServing(_) | Self::AgentGone(_) => ErrorCode::Unavailable,
            Self::FailedPrecondition(_) => ErrorCode::FailedPrecondition,
            Self::DeadlineExceeded(_) => ErrorCode::DeadlineExceeded,
            Self::Agent(s) => code_of(s.code()),
            Self::RateLimited(_) => ErrorCode::ResourceExhausted,
            Self::Registry(e) => e.error_code(),
            Self::Store(e) => e.error_code(),
            Self::Internal(_) => ErrorCode::Internal,
        }
    }
}

/// The error code of a gRPC code we received (unknown ones count as Internal).
pub fn code_of(code: tonic::Code) -> ErrorCode {
    ErrorCode::ALL
        .into_iter()
        .find(|c| c.grpc_code() == code)
        .unwrap_or(ErrorCode::Internal)
}

impl From<tonic::Status> for GatewayError {
    /// A status from an actor handle or agent: its code is kept.
    fn from(s: tonic::Status) -> Self {
        Self::Agent(s)
    }
}

impl From<GatewayError> for tonic::Status {
    fn from(e: GatewayError) -> Self {
        fsb_core::error::to_status(&e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_codes_pass_through() {
        for code in ErrorCode::ALL {
            let e = GatewayError::Agent(tonic::Status::new(code.grpc_code(), "x"));
            assert_eq!(e.error_code(), code);
        }
        let e = GatewayError::Agent(tonic::Status::new(tonic::Code::DataLoss, "x"));
        assert_eq!(e.error_code(), ErrorCode::Internal);
    }

    #[test]
    fn busy_and_not_serving_are_retryable() {
        let s: tonic::Status = GatewayError::Busy("default/a".into()).into();
        assert_eq!(s.code(), tonic::Code::Unavailable);
        assert!(s.message().contains("default/a"), "{}", s.message());
        let s: tonic::Status = GatewayError::NotServing("starting").into();
        assert_eq!(s.code(), tonic::Code::Unavailable);
    }
}
