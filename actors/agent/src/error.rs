//! Agent errors: one enum, each variant with its error code.

use fsb_core::{ErrorCode, HasErrorCode};

/// Why an agent operation failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The request is invalid (field named in the message).
    #[error("{0}")]
    InvalidArgument(String),
    /// No such sandbox, image or object.
    #[error("{0} not found")]
    NotFound(String),
    /// The sandbox or object already exists.
    #[error("{0} already exists")]
    AlreadyExists(String),
    /// The agent is at capacity.
    #[error("agent is full: {0}")]
    Exhausted(String),
    /// containerd did not answer before the deadline.
    #[error("containerd {op} timed out after {secs} s")]
    Timeout {
        /// The operation.
        op: &'static str,
        /// The deadline in seconds.
        secs: u64,
    },
    /// containerd is unreachable.
    #[error("containerd unavailable: {0}")]
    Unavailable(String),
    /// containerd refused or failed an operation.
    #[error("containerd {op}: {message}")]
    Containerd {
        /// The operation.
        op: &'static str,
        /// gRPC code containerd returned.
        code: tonic::Code,
        /// containerd's message.
        message: String,
    },
    /// An image registry could not be reached (connection refused, DNS, TLS).
    #[error("registry {registry} unavailable: {message}")]
    RegistryUnavailable {
        /// The registry host (and port).
        registry: String,
        /// What went wrong.
        message: String,
    },
    /// Credentials were missing or rejected (by a registry).
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    /// The object is in a state that forbids the operation (e.g. an image in use).
    #[error("{0}")]
    FailedPrecondition(String),
    /// Anything else that should not happen (I/O on our own files, bad data).
    #[error("{0}")]
    Internal(String),
}

impl AgentError {
    /// Wrap a containerd status for operation `op`, keeping NotFound/AlreadyExists
    /// recognisable for idempotent callers.
    pub fn containerd(op: &'static str, status: tonic::Status) -> Self {
        match status.code() {
            tonic::Code::DeadlineExceeded => Self::Timeout { op, secs: 0 },
            tonic::Code::Unavailable => Self::Unavailable(status.message().to_owned()),
            code => Self::Containerd {
                op,
                code,
                message: status.message().to_owned(),
            },
        }
    }

    /// Whether this is containerd's NotFound (idempotent deletes treat it as done).
    pub fn is_not_found(&self) -> bool {
        matches!(
            self,
            Self::NotFound(_)
                | Self::Containerd {
                    code: tonic::Code::NotFound,
                    ..
                }
        )
    }

    /// Whether containerd may have done the operation anyway: a deadline or a lost
    /// connection says nothing about what happened on containerd's side.
    pub fn is_ambiguous(&self) -> bool {
        matches!(self, Self::Timeout { .. } | Self::Unavailable(_))
    }

    /// Whether this is containerd's AlreadyExists.
    pub fn is_already_exists(&self) -> bool {
        matches!(
            self,
            Self::AlreadyExists(_)
                | Self::Containerd {
                    code: tonic::Code::AlreadyExists,
                    ..
                }
        )
    }
}

impl HasErrorCode for AgentError {
    fn error_code(&self) -> ErrorCode {
        match self {
            Self::InvalidArgument(_) => ErrorCode::InvalidArgument,
            Self::NotFound(_) => ErrorCode::NotFound,
            Self::AlreadyExists(_) => ErrorCode::AlreadyExists,
            Self::Exhausted(_) => ErrorCode::ResourceExhausted,
            Self::Timeout { .. } => ErrorCode::DeadlineExceeded,
            Self::Unavailable(_) => ErrorCode::Unavailable,
            Self::Containerd { code, .. } => match code {
                tonic::Code::NotFound => ErrorCode::NotFound,
                tonic::Code::AlreadyExists => ErrorCode::AlreadyExists,
                tonic::Code::InvalidArgument => ErrorCode::InvalidArgument,
                tonic::Code::FailedPrecondition => ErrorCode::FailedPrecondition,
                tonic::Code::Unavailable => ErrorCode::Unavailable,
                _ => ErrorCode::Internal,
            },
            Self::RegistryUnavailable { .. } => ErrorCode::Unavailable,
            Self::Unauthenticated(_) => ErrorCode::Unauthenticated,
            Self::FailedPrecondition(_) => ErrorCode::FailedPrecondition,
            Self::Internal(_) => ErrorCode::Internal,
        }
    }
}
