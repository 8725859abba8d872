//! The janitor's errors.

use fsb_agent::AgentError;
use fsb_core::error::{ErrorCode, HasErrorCode};

/// Why a scan or a removal failed.
#[derive(Debug, thiserror::Error)]
pub enum JanitorError {
    /// containerd refused, failed or did not answer.
    #[error("containerd: {0}")]
    Containerd(#[from] AgentError),
}

impl HasErrorCode for JanitorError {
    fn error_code(&self) -> ErrorCode {
        match self {
            Self::Containerd(e) => e.error_code(),
        }
    }
}
