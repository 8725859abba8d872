//! Errors of the metrics endpoint and of trace setup.

use std::net::SocketAddr;

use fsb_core::error::{ErrorCode, HasErrorCode};

/// Why the metrics endpoint or tracing could not start.
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
    /// The subscriber or the OTLP exporter could not be set up.
    #[error("tracing: {0}")]
    Trace(String),
}

impl HasErrorCode for TelemetryError {
    fn error_code(&self) -> ErrorCode {
        match self {
            TelemetryError::Bind { .. } => ErrorCode::Unavailable,
            TelemetryError::Trace(_) => ErrorCode::Internal,
        }
    }
}
