//! fsb-local: local mode, what `fsb up` runs.
//!
//! Role: one process with the gateway, the registry and one local agent, sandbox
//! records in an embedded SQLite store, a private containerd started when none is
//! reachable, and an offline busybox image so `fsb run -- echo hello` works on a
//! fresh machine.
//!
//! - [`datadir`]: the data directory layout, the endpoint file and the 0600 token file
//!   that every CLI command reads to find and authenticate to `fsb up`.
//! - [`run`] with [`UpConfig`]: the composition.
//! - [`bench`]: `fsb bench`, create latency through the gateway against raw containerd
//!   creates in the same run (percentiles, table and JSON report).
//!
//! Invariants: `fsb up` listens on loopback only; the token file is written with mode
//! 0600 before the endpoint file, so a client that sees the endpoint can authenticate.

pub mod bench;
pub mod datadir;
mod up;

pub use datadir::{DataDir, LocalError};
pub use up::{DEFAULT_LISTEN, DefaultMode, UpConfig, run};
