//! fsb-agent: parse the config, start logging, run the agent and its gRPC server
//! (`agent.v1.Agent` plus health and reflection) until SIGTERM or Ctrl-C; with
//! `--controller`, also the Session stream to the controller.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use clap::Parser;
use fsb_agent::{
    AgentConfig, AgentError, AgentHandle,
    containerd::{ContainerdConfig, DEFAULT_CALL_TIMEOUT},
    image::RegistryOptions,
    oci::NetworkMode,
    server::AgentService,
    session::{SessionConfig, spawn_session},
    tls::{CONTROLLER_NAME, RequirePeer, TlsMaterial},
    warm::{WarmConfig, WarmLimits},
};
use fsb_core::{
    AgentId,
    capability::CapabilityDrop,
    spec::{Runtime, SpecLimits},
};
use fsb_proto::{ServingStatus, agent::v1::Register, fastpath::v1 as fp, standard_services};
use tonic::service::InterceptorLayer;

/// Node agent: drives containerd to run sandboxes.
#[derive(Debug, Parser)]
#[command(name = "fsb-agent", version)]
struct Config {
    /// This agent's id (its pod UID in Kubernetes).
    #[arg(long, env = "FSB_AGENT_ID", default_value = "local")]
    agent_id: String,
    /// Address of the agent's gRPC server.
    #[arg(long, env = "FSB_LISTEN", default_value = "127.0.0.1:5758")]
    listen: SocketAddr,
    /// Host the controller reaches this agent at (its pod IP in Kubernetes, where the
    /// listen address is 0.0.0.0); default: the listen address.
    #[arg(long, env = "FSB_ADVERTISE_HOST")]
    advertise_host: Option<String>,
    /// containerd's socket.
    #[arg(
        long,
        env = "FSB_CONTAINERD_SOCKET",
        default_value = "/run/containerd/containerd.sock"
    )]
    containerd_socket: PathBuf,
    /// containerd namespace of our containers.
    #[arg(long, env = "FSB_CONTAINERD_NAMESPACE", default_value = "fast-sandbox")]
    containerd_namespace: String,
    /// Directory of sandbox log files.
    #[arg(long, env = "FSB_LOG_DIR", default_value = "/var/log/fast-sandbox")]
    log_dir: PathBuf,
    /// Parent of the OCI runtimes' state roots.
    #[arg(
        long,
        env = "FSB_RUNTIME_ROOT",
        default_value = "/run/fast-sandbox/runtime"
    )]
    runtime_root: PathBuf,
    /// runsc binary or wrapper used for gVisor.
    #[arg(long, env = "FSB_RUNSC", default_value = "runsc")]
    runsc: PathBuf,
    /// Sandboxes held at once.
    #[arg(long, env = "FSB_CAPACITY", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    capacity: u32,
    /// Runtime when a spec names none: runc, crun or gvisor.
    #[arg(long, env = "FSB_DEFAULT_RUNTIME", default_value = "runc")]
    default_runtime: String,
    /// Seconds between SIGTERM and SIGKILL.
    #[arg(long, env = "FSB_STOP_GRACE_SECONDS", default_value_t = 10)]
    stop_grace_seconds: u64,
    /// Size bound of each sandbox log file, in bytes (0: unbounded).
    #[arg(long, env = "FSB_LOG_MAX_BYTES", default_value_t = fsb_agent::DEFAULT_LOG_MAX_BYTES)]
    log_max_bytes: u64,
    /// Seconds a deleted sandbox's logs are kept (0: removed with it).
    #[arg(long, env = "FSB_LOG_RETENTION_SECONDS", default_value_t = 0)]
    log_retention_seconds: u64,
    /// Network namespace sandboxes join (default: the agent's own).
    #[arg(long, env = "FSB_NETNS")]
    netns: Option<PathBuf>,
    /// Controller's AgentControl address (http://host:port); without it the agent
    /// runs standalone.
    #[arg(long, env = "FSB_CONTROLLER")]
    controller: Option<String>,
    /// Pool this agent belongs to.
    #[arg(long, env = "FSB_POOL", default_value = "default")]
    pool: String,
    /// Kubernetes namespace of the pool.
    #[arg(long, env = "FSB_NAMESPACE", default_value = "default")]
    namespace: String,
    /// Node name (default: /etc/hostname).
    #[arg(long, env = "FSB_NODE_NAME")]
    node_name: Option<String>,
    /// The agent's pod name (Kubernetes mode).
    #[arg(long, env = "FSB_POD_NAME", default_value = "")]
    pod_name: String,
    /// The agent's pod UID (Kubernetes mode).
    #[arg(long, env = "FSB_POD_UID", default_value = "")]
    pod_uid: String,
    /// Keep warm instances ready: `IMAGE=N` or `IMAGE=N:RUNTIME` (repeat the flag, or
    /// comma-separate in the environment variable).
    #[arg(long = "warm", env = "FSB_WARM", value_delimiter = ',')]
    warm: Vec<String>,
    /// The static fsb-init binary warm instances run as PID 1 (default: `fsb-init`
    /// beside this executable).
    #[arg(long, env = "FSB_INIT_BINARY")]
    init_binary: Option<PathBuf>,
    /// Warm instances being started at once.
    #[arg(long, env = "FSB_WARM_MAX_STARTING", default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..))]
    warm_max_starting: u64,
    /// Memory all warm instances may hold, in MiB (each is counted at
    /// `--warm-instance-mib`).
    #[arg(long, env = "FSB_WARM_MEMORY_MIB", default_value_t = 1024)]
    warm_memory_mib: u64,
    /// What one warm instance is counted against the memory budget, in MiB.
    #[arg(long, env = "FSB_WARM_INSTANCE_MIB", default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..))]
    warm_instance_mib: u64,
    /// Heartbeat period in milliseconds unless the controller names one.
    #[arg(long, env = "FSB_HEARTBEAT_MS", default_value_t = 5000, value_parser = clap::value_parser!(u64).range(1..))]
    heartbeat_ms: u64,
    /// Directory of the pool's TLS Secret (`ca.crt`, `tls.crt`, `tls.key`): the gRPC
    /// server then serves mutual TLS and accepts only the controller's certificate, and
    /// the session to the controller uses TLS. Unset: plaintext, unauthenticated.
    #[arg(long, env = "FSB_TLS_DIR")]
    tls_dir: Option<PathBuf>,
    /// Take a capability away from every sandbox (containerd's default set less this;
    /// never adds): `CHOWN`, `CAP_CHOWN` or `chown`, `ALL` for all. Repeat the flag, or
    /// comma-separate in the environment variable.
    #[arg(
        long = "drop-capability",
        env = "FSB_DROP_CAPABILITIES",
        value_delimiter = ',',
        value_name = "CAP"
    )]
    drop_capabilities: Vec<String>,
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
                "fsb-agent: {}",
                e.render()
                    .to_string()
                    .lines()
                    .next()
                    .unwrap_or("invalid configuration")
            );
            return ExitCode::from(64);
        }
    };
    let default_runtime = match Runtime::parse("--default-runtime", &config.default_runtime) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("fsb-agent: {e}");
            return ExitCode::from(64);
        }
    };
    let warm = match warm_config(&config, default_runtime) {
        Ok(w) => w,
        Err(e) => {
            eprintln!("fsb-agent: {e}");
            return ExitCode::from(64);
        }
    };
    let drop_capabilities = match CapabilityDrop::parse(
        config
            .drop_capabilities
            .iter()
            .filter(|s| !s.trim().is_empty()),
    ) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("fsb-agent: --drop-capability: {e}");
            return ExitCode::from(64);
        }
    };
    if let Some(controller) = &config.controller
        && (!controller.starts_with("http://") && !controller.starts_with("https://")
            || tonic::transport::Endpoint::from_shared(controller.clone()).is_err())
    {
        eprintln!("fsb-agent: --controller must be an http(s)://host:port URL, got {controller:?}");
        return ExitCode::from(64);
    }
    let tls = match config.tls_dir.as_deref().map(TlsMaterial::load).transpose() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("fsb-agent: --tls-dir {e}");
            return ExitCode::from(64);
        }
    };
    let _tracing = match fsb_telemetry::trace::init("fsb-agent", Default::default()) {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("fsb-agent: {e}");
            return ExitCode::FAILURE;
        }
    };
    match actix_rt::System::new().block_on(run(
        config,
        default_runtime,
        warm,
        drop_capabilities,
        tls,
    )) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fsb-agent: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The `--warm*` flags as the agent's warm configuration.
fn warm_config(config: &Config, default_runtime: Runtime) -> Result<WarmConfig, AgentError> {
    let targets = config
        .warm
        .iter()
        .filter(|s| !s.is_empty())
        .map(|s| WarmConfig::parse_target(s, default_runtime))
        .collect::<Result<Vec<_>, _>>()?;
    let init = config.init_binary.clone().or_else(|| {
        std::env::current_exe()
            .ok()
            .and_then(|exe| exe.parent().map(|d| d.join("fsb-init")))
    });
    Ok(WarmConfig {
        targets,
        limits: WarmLimits {
            max_starting: usize::try_from(config.warm_max_starting).unwrap_or(usize::MAX),
            memory_budget: config.warm_memory_mib << 20,
            instance_bytes: config.warm_instance_mib << 20,
        },
        init,
    })
}

async fn run(
    config: Config,
    default_runtime: Runtime,
    warm: WarmConfig,
    drop_capabilities: CapabilityDrop,
    tls: Option<TlsMaterial>,
) -> Result<(), Box<dyn std::error::Error>> {
    if tls.is_none() {
        tracing::warn!(
            "no --tls-dir: the agent API is plaintext and accepts any caller (fine on a \
             test host, not in a cluster)"
        );
    }
    if let Some(addr) = config.metrics_listen {
        fsb_telemetry::serve_in_background(addr).await?;
    }
    let netns = config
        .netns
        .unwrap_or_else(|| PathBuf::from(format!("/proc/{}/ns/net", std::process::id())));
    let register = Register {
        agent_id: config.agent_id.clone(),
        pool: config.pool,
        namespace: config.namespace,
        node_name: config.node_name.unwrap_or_else(hostname),
        pod_name: config.pod_name,
        pod_uid: config.pod_uid,
        endpoint: advertised_endpoint(
            config.advertise_host.as_deref(),
            config.listen,
            tls.is_some(),
        ),
        agent_port: u32::from(config.listen.port()),
        capacity: config.capacity,
        // Every runtime goes through the runc shim; their binaries are not probed.
        runtimes: [fp::Runtime::Runc, fp::Runtime::Crun, fp::Runtime::Gvisor]
            .into_iter()
            .map(i32::from)
            .collect(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        default_runtime: fsb_agent::server::wire_runtime(default_runtime) as i32,
    };
    let agent = AgentHandle::start(AgentConfig {
        agent_id: AgentId::from(config.agent_id),
        containerd: ContainerdConfig {
            socket: config.containerd_socket,
            namespace: config.containerd_namespace,
            call_timeout: DEFAULT_CALL_TIMEOUT,
            runtime_root: config.runtime_root,
            runsc_binary: config.runsc,
        },
        log_dir: config.log_dir,
        capacity: config.capacity,
        network: NetworkMode::Join(netns),
        default_runtime,
        stop_grace: Duration::from_secs(config.stop_grace_seconds),
        registry: RegistryOptions::default(),
        log_max_bytes: config.log_max_bytes,
        log_retention: Duration::from_secs(config.log_retention_seconds),
        warm,
        drop_capabilities,
    })
    .await?;
    // Dropped (and so stopped) when the server returns.
    let _session = config.controller.map(|controller| {
        tracing::info!(%controller, "reporting to the controller");
        spawn_session(
            agent.clone(),
            SessionConfig {
                controller: if tls.is_some() {
                    fsb_agent::tls::https(&controller)
                } else {
                    controller
                },
                tls: tls.as_ref().map(|t| t.client(CONTROLLER_NAME)),
                register,
                heartbeat_interval: Duration::from_millis(config.heartbeat_ms),
                jitter: 0.2,
                reconnect_backoff_max: Duration::from_secs(30),
            },
        )
    });
    let limits = SpecLimits {
        agent_port: Some(config.listen.port()),
        ..SpecLimits::default()
    };
    let (reporter, health, reflection) = standard_services()?;
    reporter
        .set_service_status("agent.v1.Agent", ServingStatus::Serving)
        .await;
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    tracing::info!(addr = %listener.local_addr()?, "agent listening");
    let mut server = tonic::transport::Server::builder();
    let peer = match &tls {
        Some(t) => {
            server = server.tls_config(t.server())?;
            RequirePeer::new(CONTROLLER_NAME)
        }
        None => RequirePeer::nobody(),
    };
    server
        .layer(InterceptorLayer::new(peer))
        .add_service(health)
        .add_service(reflection)
        .add_service(AgentService::new(agent, limits).server())
        .serve_with_incoming_shutdown(tokio_stream_listener(listener), shutdown())
        .await?;
    tracing::info!("agent stopped; sandboxes keep running");
    Ok(())
}

/// The Register endpoint: `http(s)://<advertise-host>:<listen port>`, or the listen
/// address itself. IPv6 hosts are bracketed.
fn advertised_endpoint(advertise_host: Option<&str>, listen: SocketAddr, tls: bool) -> String {
    let scheme = if tls { "https" } else { "http" };
    match advertise_host.map(str::trim).filter(|h| !h.is_empty()) {
        Some(host) if host.contains(':') && !host.starts_with('[') => {
            format!("{scheme}://[{host}]:{}", listen.port())
        }
        Some(host) => format!("{scheme}://{host}:{}", listen.port()),
        None => format!("{scheme}://{listen}"),
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}

fn tokio_stream_listener(
    listener: tokio::net::TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    // No Nagle: answers are small single writes; delaying them costs milliseconds.
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_endpoint_names_the_advertised_host_with_the_listen_port() {
        let listen: SocketAddr = "0.0.0.0:5758".parse().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            advertised_endpoint(None, listen, false),
            "http://0.0.0.0:5758"
        );
        assert_eq!(
            advertised_endpoint(Some(""), listen, false),
            "http://0.0.0.0:5758"
        );
        assert_eq!(
            advertised_endpoint(Some("10.1.2.3"), listen, false),
            "http://10.1.2.3:5758"
        );
        assert_eq!(
            advertised_endpoint(Some("10.1.2.3"), listen, true),
            "https://10.1.2.3:5758"
        );
        assert_eq!(
            advertised_endpoint(Some("fd00::7"), listen, false),
            "http://[fd00::7]:5758"
        );
    }
}
