//! Error codes and their one mapping to gRPC status.
//!
//! Every crate has its own `thiserror` enum (`RegistryError`, `AgentError`, ...) and
//! implements [`HasErrorCode`]; [`to_status`] is the only place a `tonic::Status` is
//! built from an error, so a code can never map two different ways.

use std::fmt;

/// What went wrong, as the caller should react to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum ErrorCode {
    /// The request is malformed; retrying it unchanged cannot succeed.
    InvalidArgument,
    /// The named object does not exist.
    NotFound,
    /// An object with that name (or request id with another spec) exists.
    AlreadyExists,
    /// No capacity (slots, ports, warm instances, rate limit) right now.
    ResourceExhausted,
    /// The system is not in a state where the call can run (e.g. still restoring).
    FailedPrecondition,
    /// A concurrent change won; retry with fresh state.
    Aborted,
    /// No or invalid credentials.
    Unauthenticated,
    /// Credentials valid, action not allowed.
    PermissionDenied,
    /// A dependency (agent, containerd, API server) cannot be reached; retry later.
    Unavailable,
    /// The deadline passed before the work finished.
    DeadlineExceeded,
    /// The caller cancelled.
    Cancelled,
    /// A bug or broken invariant on our side.
    Internal,
}

impl ErrorCode {
    /// Every code, for exhaustive tests and metric label sets.
    pub const ALL: [ErrorCode; 12] = [
        ErrorCode::InvalidArgument,
        ErrorCode::NotFound,
        ErrorCode::AlreadyExists,
        ErrorCode::ResourceExhausted,
        ErrorCode::FailedPrecondition,
        ErrorCode::Aborted,
        ErrorCode::Unauthenticated,
        ErrorCode::PermissionDenied,
        ErrorCode::Unavailable,
        ErrorCode::DeadlineExceeded,
        ErrorCode::Cancelled,
        ErrorCode::Internal,
    ];

    /// The gRPC code this maps to.
    pub fn grpc_code(self) -> tonic::Code {
        match self {
            ErrorCode::InvalidArgument => tonic::Code::InvalidArgument,
            ErrorCode::NotFound => tonic::Code::NotFound,
            ErrorCode::AlreadyExists => tonic::Code::AlreadyExists,
            ErrorCode::ResourceExhausted => tonic::Code::ResourceExhausted,
            ErrorCode::FailedPrecondition => tonic::Code::FailedPrecondition,
            ErrorCode::Aborted => tonic::Code::Aborted,
            ErrorCode::Unauthenticated => tonic::Code::Unauthenticated,
            ErrorCode::PermissionDenied => tonic::Code::PermissionDenied,
            ErrorCode::Unavailable => tonic::Code::Unavailable,
            ErrorCode::DeadlineExceeded => tonic::Code::DeadlineExceeded,
            ErrorCode::Cancelled => tonic::Code::Cancelled,
            ErrorCode::Internal => tonic::Code::Internal,
        }
    }

    /// Stable snake_case name, used as a metric label and in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidArgument => "invalid_argument",
            ErrorCode::NotFound => "not_found",
            ErrorCode::AlreadyExists => "already_exists",
            ErrorCode::ResourceExhausted => "resource_exhausted",
            ErrorCode::FailedPrecondition => "failed_precondition",
            ErrorCode::Aborted => "aborted",
            ErrorCode::Unauthenticated => "unauthenticated",
            ErrorCode::PermissionDenied => "permission_denied",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::DeadlineExceeded => "deadline_exceeded",
            ErrorCode::Cancelled => "cancelled",
            ErrorCode::Internal => "internal",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Implemented by every crate's error enum.
pub trait HasErrorCode: fmt::Display {
    /// The code the caller should act on.
    fn error_code(&self) -> ErrorCode;
}

/// The one conversion from an error to a gRPC status: the code from [`HasErrorCode`],
/// the message from `Display` (which names the offending field for validation errors).
pub fn to_status<E: HasErrorCode + ?Sized>(err: &E) -> tonic::Status {
    tonic::Status::new(err.error_code().grpc_code(), err.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn every_code_maps_to_a_distinct_non_ok_grpc_code() {
        let mut seen = HashSet::new();
        for code in ErrorCode::ALL {
            let grpc = code.grpc_code();
            assert_ne!(grpc, tonic::Code::Ok, "{code} must not map to Ok");
            assert_ne!(grpc, tonic::Code::Unknown, "{code} must not map to Unknown");
            assert!(
                seen.insert(grpc),
                "{code} maps to {grpc:?} which another code uses"
            );
        }
        assert_eq!(seen.len(), ErrorCode::ALL.len());
    }

    #[test]
    fn metric_names_are_distinct() {
        let names: HashSet<_> = ErrorCode::ALL.iter().map(|c| c.as_str()).collect();
        assert_eq!(names.len(), ErrorCode::ALL.len());
    }

    #[derive(Debug, thiserror::Error)]
    #[error("spec.image: must not be empty")]
    struct Sample;
    impl HasErrorCode for Sample {
        fn error_code(&self) -> ErrorCode {
            ErrorCode::InvalidArgument
        }
    }

    #[test]
    fn status_keeps_code_and_message() {
        let status = to_status(&Sample);
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert_eq!(status.message(), "spec.image: must not be empty");
    }
}
