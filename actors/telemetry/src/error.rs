//! Errors of the metrics endpoint.

use std::net::SocketAddr;

use fsb_core::error::{ErrorCode, HasErrorCode};

/// Why the metrics endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The listener could not bind.
    #[error("metrics listener {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

impl HasErrorCode for TelemetryError {
    fn error_code(&self) -> ErrorCode {
        match self {
            TelemetryError::Bind { .. } => ErrorCode::Unavailable,
        }
    }
}
