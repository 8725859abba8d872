//! `fsb up`: the one-process composition of gateway, registry and a local agent.

use std::{future::Future, net::SocketAddr, path::PathBuf, time::Duration};

use fsb_core::spec::Runtime;

use crate::{DataDir, LocalError};

/// Default address of the gateway in local mode (loopback only).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7370";

/// How Create records sandboxes when the client does not say.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DefaultMode {
    /// Container first, record written asynchronously.
    #[default]
    Fast,
    /// Record first.
    Strong,
}

/// Everything `fsb up` needs.
#[derive(Clone, Debug)]
pub struct UpConfig {
    /// State, logs, endpoint and token.
    pub data_dir: DataDir,
    /// Gateway address; must be a loopback address (port 0 picks a free one).
    pub listen: SocketAddr,
    /// Use this containerd; `None` uses the system one if it answers, else starts a
    /// private one under the data directory.
    pub containerd_socket: Option<PathBuf>,
    /// Sandboxes held at once by the local agent.
    pub capacity: u32,
    /// Runtime when a request names none.
    pub default_runtime: Runtime,
    /// Consistency mode when a request names none.
    pub default_mode: DefaultMode,
    /// Time between SIGTERM and SIGKILL when deleting.
    pub stop_grace: Duration,
    /// On shutdown, leave sandboxes running (they are re-adopted by the next `fsb up`)
    /// instead of stopping them.
    pub keep_sandboxes: bool,
}

impl UpConfig {
    /// Defaults for `data_dir`.
    pub fn new(data_dir: DataDir) -> Self {
        Self {
            data_dir,
            listen: DEFAULT_LISTEN
                .parse()
                .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 7370))),
            containerd_socket: None,
            capacity: 256,
            default_runtime: Runtime::Runc,
            default_mode: DefaultMode::Fast,
            stop_grace: Duration::from_secs(10),
            keep_sandboxes: true,
        }
    }
}

/// Run local mode until `shutdown` resolves, then stop accepting, drain in-flight
/// work and keep or stop sandboxes as configured. `ready` is called with the bound
/// address once creates are accepted.
pub async fn run(
    config: UpConfig,
    shutdown: impl Future<Output = ()> + Send,
    ready: impl FnOnce(SocketAddr) + Send,
) -> Result<(), LocalError> {
    let _ = (config, shutdown, ready);
    Err(LocalError::Setup("fsb up: not wired yet".to_owned()))
}
