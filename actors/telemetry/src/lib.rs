//! fsb-telemetry: the process-wide metrics of fast-sandbox and the HTTP endpoint
//! that serves them to Prometheus.
//!
//! Role: one registry of `fsb_*` families per process ([`metrics`]), instrumented
//! where the work happens (the gateway's creates, the janitor's scans, the agent's
//! pulls, the controller's supervisor), and read at scrape time where a component
//! already keeps its own counts (the registry's decisions and slots, the store's
//! phases: [`MetricsServer::on_scrape`] hooks copy them in before each render).
//!
//! Messages: none; [`MetricsServer`] answers `GET /metrics` (and `HEAD`) with the
//! Prometheus text format 0.0.4, 404 for any other path, 405 for other methods.
//!
//! Invariants: label values come from fixed lists or from configuration (agents,
//! pools, warm images), capped in number ([`metrics::MAX_AGENT_SERIES`],
//! [`metrics::MAX_WARM_SERIES`]); no sandbox id or name is ever a label. Scrapes are
//! serialized, so the hooks' replace-the-set updates never interleave.
//!
//! [`trace`]: the process's `tracing` subscriber and, when an OTLP endpoint is set,
//! span export plus W3C trace context over gRPC metadata.

pub mod error;
pub mod metrics;
mod server;
pub mod trace;

pub use error::TelemetryError;
pub use metrics::{Metrics, metrics};
pub use server::{HOOK_TIMEOUT, MetricsServer, serve_in_background};
