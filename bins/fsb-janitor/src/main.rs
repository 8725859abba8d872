//! fsb-janitor: parse the config, start logging, connect to the node's containerd and
//! the API server (in-cluster config, or KUBECONFIG), then scan every interval until
//! SIGTERM or Ctrl-C; with `--once`, scan once and print the counters as JSON.

use std::{io::Write, net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use clap::Parser;
use fsb_agent::{
    containerd::{Containerd, ContainerdConfig, DEFAULT_CALL_TIMEOUT},
    runtime::ContainerdRuntime,
};
use fsb_janitor::{Janitor, JanitorConfig, KubeCluster};

/// Per-node janitor: removes containers whose Sandbox or agent pod is proven gone.
#[derive(Debug, Parser)]
#[command(name = "fsb-janitor", version)]
struct Config {
    /// This node's name (for logs; default: /etc/hostname).
    #[arg(long, env = "FSB_NODE_NAME")]
    node_name: Option<String>,
    /// containerd's socket.
    #[arg(
        long,
        env = "FSB_CONTAINERD_SOCKET",
        default_value = "/run/containerd/containerd.sock"
    )]
    containerd_socket: PathBuf,
    /// containerd namespace of the sandboxes.
    #[arg(long, env = "FSB_CONTAINERD_NAMESPACE", default_value = "fast-sandbox")]
    containerd_namespace: String,
    /// Directory of sandbox log files (the agents'), removed with their sandbox.
    #[arg(long, env = "FSB_LOG_DIR", default_value = "/var/log/fast-sandbox")]
    log_dir: PathBuf,
    /// Parent of the OCI runtimes' state roots (the agents').
    #[arg(
        long,
        env = "FSB_RUNTIME_ROOT",
        default_value = "/run/fast-sandbox/runtime"
    )]
    runtime_root: PathBuf,
    /// Seconds between scans.
    #[arg(long, env = "FSB_INTERVAL_SECONDS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    interval_seconds: u64,
    /// Containers younger than this are never removed.
    #[arg(long, env = "FSB_ORPHAN_TIMEOUT_SECONDS", default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..))]
    orphan_timeout_seconds: u64,
    /// Seconds between SIGTERM and SIGKILL when removing.
    #[arg(long, env = "FSB_GRACE_SECONDS", default_value_t = 10)]
    grace_seconds: u64,
    /// Bound of one API-server call; a slower answer is "unknown".
    #[arg(long, env = "FSB_API_TIMEOUT_SECONDS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    api_timeout_seconds: u64,
    /// Run one scan, print the counters as JSON and exit (1 if the scan failed).
    #[arg(long)]
    once: bool,
    /// Serve Prometheus metrics on this address (`GET /metrics`); off when unset.
    #[arg(long, env = "FSB_METRICS_LISTEN", value_name = "ADDR")]
    metrics_listen: Option<SocketAddr>,
}

fn main() -> ExitCode {
    let config = match Config::try_parse() {
        Ok(c) => c,
        Err(e)
            if matches!(
                e.kind(),
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion
            ) =>
        {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!(
                "fsb-janitor: {}",
                e.render()
                    .to_string()
                    .lines()
                    .next()
                    .unwrap_or("invalid configuration")
            );
            return ExitCode::from(64);
        }
    };
    let _tracing = match fsb_telemetry::trace::init(
        "fsb-janitor",
        fsb_telemetry::trace::LogOptions {
            stderr: true,
            ansi: std::io::IsTerminal::is_terminal(&std::io::stderr()),
            ..Default::default()
        },
    ) {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("fsb-janitor: {e}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("fsb-janitor: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("fsb-janitor: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let cd = Containerd::connect(ContainerdConfig {
        socket: config.containerd_socket,
        namespace: config.containerd_namespace,
        call_timeout: DEFAULT_CALL_TIMEOUT,
        runtime_root: config.runtime_root,
        runsc_binary: PathBuf::from("runsc"),
    })
    .await?;
    let containers = ContainerdRuntime::new(cd, config.log_dir);
    let client = kube::Client::try_default()
        .await
        .map_err(|e| format!("no Kubernetes client (in-cluster config or KUBECONFIG): {e}"))?;
    let cluster = KubeCluster::new(client, Duration::from_secs(config.api_timeout_seconds));
    let janitor = Janitor::new(
        cluster,
        containers,
        JanitorConfig {
            node_name: config.node_name.unwrap_or_else(hostname),
            interval: Duration::from_secs(config.interval_seconds),
            orphan_timeout: Duration::from_secs(config.orphan_timeout_seconds),
            grace: Duration::from_secs(config.grace_seconds),
        },
    );
    if config.once {
        let result = janitor.scan_once().await;
        let mut out = std::io::stdout().lock();
        writeln!(out, "{}", serde_json::to_string(&janitor.stats())?)?;
        return Ok(match result {
            Ok(_) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("fsb-janitor: scan failed: {e}");
                ExitCode::FAILURE
            }
        });
    }
    if let Some(addr) = config.metrics_listen {
        fsb_telemetry::serve_in_background(addr).await?;
    }
    tracing::info!("janitor running");
    janitor.run(shutdown()).await;
    tracing::info!(stats = ?janitor.stats(), "janitor stopped");
    Ok(ExitCode::SUCCESS)
}

fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}

async fn shutdown() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
