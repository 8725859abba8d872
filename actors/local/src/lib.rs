//! fsb-local: local mode, what `fsb up` runs.
//!
//! Role: one process with the gateway, the registry and one local agent, sandbox
//! records in an embedded SQLite store, a private containerd started when none is
//! reachable, and an offline busybox image so `fsb run -- echo hello` works on a
//! fresh machine.
//!
//! - [`datadir`]: the data directory layout, the endpoint file and the 0600 token file
//!   that every CLI command reads to find and authenticate to `fsb up`.
//! - [`containerd`]: [`containerd::ensure_containerd`] finds or starts the containerd
//!   `fsb up` uses (the given socket; a private one of this data directory already
//!   running; the system's if it answers; else a private one started with its own
//!   config, root, state and socket under `<data-dir>/containerd`), prepares the host
//!   (hugetlb cgroup for crun, the `runsc --network=none` wrapper) and hands the agent
//!   its `ContainerdConfig`; [`containerd::LocalContainerd::stop`] stops only a private
//!   containerd, never its shims, so kept sandboxes survive an `fsb up` restart.
//! - [`busybox`]: the offline default image [`busybox::LOCAL_IMAGE`]
//!   (`fsb.local/busybox:latest`), built reproducibly in Rust from Debian's
//!   busybox-static and loaded by [`busybox::ensure_local_image`] unless containerd
//!   already holds the same digest.
//! - [`run`] with [`UpConfig`]: the composition.
//! - [`bench`]: `fsb bench`, create latency through the gateway against raw containerd
//!   creates in the same run (percentiles, table and JSON report).
//!
//! Invariants: `fsb up` listens on loopback only; the token file is written with mode
//! 0600 before the endpoint file, so a client that sees the endpoint can authenticate.

pub mod bench;
pub mod busybox;
pub mod containerd;
pub mod datadir;
mod up;

pub use datadir::{DataDir, LocalError};
/// What `fsb up --warm` keeps ready (the local agent's warm configuration).
pub use fsb_agent::warm::WarmConfig;
pub use up::{DEFAULT_LISTEN, DefaultMode, LOCAL_AGENT, LOCAL_POOL, UpConfig, run};
