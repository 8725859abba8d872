//! `fsb up`: the one-process composition of gateway, registry and a local agent.
//!
//! Start order (each step needs the previous): data directory and token ->
//! containerd (given, system, or a private one) -> agent (rebuilds its table from
//! containerd) -> offline busybox image -> store -> gateway reconcile of store and
//! containers (see `fsb_gateway::Gateway::reconcile` for the rule) -> registry report
//! -> accept creates -> serve `/metrics` (loopback; its address in the `metrics` file)
//! -> write the endpoint file. Shutdown reverses it: stop accepting,
//! let the server finish open calls, drain record writes, then keep or stop sandboxes.

use std::{
    future::Future, net::SocketAddr, num::NonZeroU32, path::PathBuf, sync::Arc, time::Duration,
};

use fsb_agent::{
    AgentConfig, AgentHandle, DEFAULT_LOG_MAX_BYTES, image::RegistryOptions, oci::NetworkMode,
};
use fsb_core::{AgentId, NamespaceName, NodeName, PoolName, spec::Runtime, spec::SpecLimits};
use fsb_gateway::{
    FastPathService, Gateway, GatewayConfig, LocalAgent, LocalImages, TokenCheck, agents::reported,
};
use fsb_proto::{ServingStatus, fastpath::v1 as fp, standard_services};
use fsb_registry::{AgentInfo, AgentReport, RegistryHandle, WarmInstance};
use fsb_store::{SandboxStore, SqliteStore};

use crate::{DataDir, LocalError, busybox, containerd};

/// Default address of the gateway in local mode (loopback only).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7370";
/// The one pool of local mode.
pub const LOCAL_POOL: &str = "default";
/// The local agent's id.
pub const LOCAL_AGENT: &str = "local";
/// Namespace the local pool is registered in (pools are not namespaced locally).
const POOL_NAMESPACE: &str = "local";
/// How long shutdown waits for FAST record writes still in flight.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

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
    /// Debian's busybox-static, for the offline default image.
    pub busybox: PathBuf,
    /// The local agent's id (its containers carry it; two `fsb up` sharing one
    /// containerd need different ids).
    pub agent_id: String,
    /// Warm instances the local agent keeps ready (`--warm IMAGE=N`).
    pub warm: fsb_agent::warm::WarmConfig,
    /// Where `/metrics` is served; must be a loopback address (port 0: a free one).
    pub metrics_listen: SocketAddr,
    /// Per-client rate limit of the fast path (each local connection is a client).
    pub rate_limit: fsb_gateway::RateLimitConfig,
    /// Capabilities taken away from every sandbox (`--drop-capability`).
    pub drop_capabilities: fsb_core::capability::CapabilityDrop,
}

impl UpConfig {
    /// Defaults for `data_dir`.
    pub fn new(data_dir: DataDir) -> Self {
        Self {
            data_dir,
            listen: SocketAddr::from(([127, 0, 0, 1], 7370)),
            containerd_socket: None,
            capacity: 256,
            default_runtime: Runtime::Runc,
            default_mode: DefaultMode::Fast,
            stop_grace: Duration::from_secs(10),
            keep_sandboxes: true,
            busybox: PathBuf::from("/bin/busybox"),
            agent_id: LOCAL_AGENT.to_owned(),
            warm: fsb_agent::warm::WarmConfig::default(),
            metrics_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            rate_limit: fsb_gateway::RateLimitConfig::DEFAULT,
            drop_capabilities: fsb_core::capability::CapabilityDrop::default(),
        }
    }
}

/// How often the local agent's warm instances are compared with the registry's.
const WARM_REPORT_INTERVAL: Duration = Duration::from_millis(100);

/// Keep the registry's view of the warm instances current: when the ready set
/// changes (a refill, a claim), a full report goes out (the registry takes warm
/// instances from reports only, and never re-offers one already allocated).
fn spawn_warm_reports(agent: AgentHandle, registry: RegistryHandle, info: AgentInfo) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(WARM_REPORT_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut last = Vec::new();
        loop {
            tick.tick().await;
            let Ok(ready) = agent.warm_instances().await else {
                return;
            };
            let ids: Vec<_> = ready.iter().map(|(_, id)| id.clone()).collect();
            if ids == last {
                continue;
            }
            let Ok(held) = agent.inventory().await else {
                return;
            };
            let mut info = info.clone();
            info.warm = ready
                .into_iter()
                .map(|(key, id)| WarmInstance {
                    id,
                    image: key.image,
                    runtime: key.runtime,
                })
                .collect();
            let report = AgentReport {
                agent: info,
                sandboxes: reported(&held),
            };
            match registry.report(report).await {
                Ok(_) => {
                    tracing::debug!(ready = ids.len(), "warm instances reported");
                    last = ids;
                }
                Err(e) => tracing::warn!(error = %e, "reporting warm instances"),
            }
        }
    });
}

fn setup(what: impl std::fmt::Display) -> LocalError {
    LocalError::Setup(what.to_string())
}

/// Run local mode until `shutdown` resolves, then stop accepting, drain in-flight
/// work and keep or stop sandboxes as configured. `ready` is called with the bound
/// address once creates are accepted. Must run inside an actix system.
pub async fn run(
    config: UpConfig,
    shutdown: impl Future<Output = ()> + Send,
    ready: impl FnOnce(SocketAddr) + Send,
) -> Result<(), LocalError> {
    if !config.listen.ip().is_loopback() {
        return Err(setup(format!(
            "--listen {}: local mode listens on loopback only (e.g. 127.0.0.1:7370)",
            config.listen
        )));
    }
    if !config.metrics_listen.ip().is_loopback() {
        return Err(setup(format!(
            "--metrics-listen {}: local mode listens on loopback only (e.g. 127.0.0.1:9370)",
            config.metrics_listen
        )));
    }
    let dir = &config.data_dir;
    dir.create()?;
    let token = dir.ensure_token()?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| {
            setup(format!(
                "--listen {}: {e} (is another fsb up running?)",
                config.listen
            ))
        })?;
    let addr = listener
        .local_addr()
        .map_err(|e| setup(format!("--listen {}: {e}", config.listen)))?;
    // Bound early, so a taken port fails before anything starts.
    let metrics = fsb_telemetry::MetricsServer::bind(config.metrics_listen)
        .await
        .map_err(|e| setup(format!("--metrics-listen: {e}")))?;
    let metrics_addr = metrics.local_addr();

    let ctrd =
        containerd::ensure_containerd(dir, config.containerd_socket.as_deref(), None).await?;
    let agent_id = AgentId::from(config.agent_id.as_str());
    let agent = AgentHandle::start(AgentConfig {
        agent_id: agent_id.clone(),
        containerd: ctrd.config().clone(),
        log_dir: dir.logs_dir(),
        capacity: config.capacity,
        network: NetworkMode::Join(PathBuf::from(format!(
            "/proc/{}/ns/net",
            std::process::id()
        ))),
        default_runtime: config.default_runtime,
        stop_grace: config.stop_grace,
        registry: RegistryOptions::default(),
        log_max_bytes: DEFAULT_LOG_MAX_BYTES,
        log_retention: Duration::ZERO,
        warm: config.warm.clone(),
        drop_capabilities: config.drop_capabilities.clone(),
    })
    .await
    .map_err(|e| setup(format!("starting the local agent: {e}")))?;
    match busybox::ensure_local_image(agent.images(), &dir.root().join("images"), &config.busybox)
        .await
    {
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(error = %e, "the offline busybox image is not available; pass --image")
        }
    }

    let store = SqliteStore::open(dir.store_file())
        .map_err(|e| setup(format!("{}: {e}", dir.store_file().display())))?;
    let limits = SpecLimits {
        agent_port: Some(addr.port()),
        ..SpecLimits::default()
    };
    let pool = PoolName::parse("pool", LOCAL_POOL).map_err(setup)?;
    let pool_namespace = NamespaceName::parse("namespace", POOL_NAMESPACE).map_err(setup)?;
    let registry = RegistryHandle::start();
    let gateway = Gateway::new(
        GatewayConfig {
            limits: limits.clone(),
            default_mode: match config.default_mode {
                DefaultMode::Fast => fp::ConsistencyMode::Fast,
                DefaultMode::Strong => fp::ConsistencyMode::Strong,
            },
            pool_namespace: Some(pool_namespace.clone()),
            ..GatewayConfig::default()
        },
        store,
        registry.clone(),
    );
    let node = NodeName::from(hostname().as_str());
    gateway.add_agent(
        agent_id.clone(),
        node.clone(),
        Arc::new(LocalAgent::new(agent.clone(), limits)),
    );

    // Subscribe before reading the inventory, so no exit falls between the two.
    let mut changes = agent
        .subscribe()
        .await
        .map_err(|e| setup(format!("local agent: {e}")))?;
    let inventory = agent
        .inventory()
        .await
        .map_err(|e| setup(format!("local agent: {e}")))?;
    let (report, kept) = gateway
        .reconcile(&agent_id, inventory, &pool)
        .await
        .map_err(|e| setup(format!("reconciling the store with containerd: {e}")))?;
    tracing::info!(?report, "store reconciled with containerd");
    let capacity =
        NonZeroU32::new(config.capacity).ok_or_else(|| setup("--capacity: must be at least 1"))?;
    let info = AgentInfo {
        id: agent_id.clone(),
        pool: pool.clone(),
        namespace: pool_namespace,
        node,
        capacity,
        images: Vec::new(),
        healthy: true,
        default_runtime: config.default_runtime,
        warm: Vec::new(),
    };
    registry
        .report(AgentReport {
            agent: info.clone(),
            sandboxes: reported(&kept),
        })
        .await
        .map_err(|e| setup(format!("registry: {e}")))?;
    spawn_warm_reports(agent.clone(), registry.clone(), info);
    let forward = gateway.clone();
    tokio::spawn(async move {
        use tokio::sync::broadcast::error::RecvError;
        loop {
            match changes.recv().await {
                Ok(change) => forward.phase_changed(change).await,
                Err(RecvError::Lagged(n)) => {
                    tracing::warn!(missed = n, "missed agent phase changes");
                }
                Err(RecvError::Closed) => return,
            }
        }
    });
    gateway.start_serving();
    gateway.spawn_sweeper();

    let (reporter, health, reflection) =
        standard_services().map_err(|e| setup(format!("grpc reflection: {e}")))?;
    for name in ["fastpath.v1.FastPath", "fastpath.v1.Images"] {
        reporter
            .set_service_status(name, ServingStatus::Serving)
            .await;
    }
    let auth = TokenCheck::new(Some(token));
    // One budget per client across both services.
    let limit = fsb_gateway::RateLimit::new(config.rate_limit);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tonic::transport::Server::builder()
        .add_service(health)
        .add_service(reflection)
        .add_service(FastPathService::server(
            gateway.clone(),
            auth.clone(),
            None,
            limit.clone(),
        ))
        .add_service(LocalImages::server(
            agent.clone(),
            dir.root().join("uploads"),
            auth,
            limit,
        ))
        .serve_with_incoming_shutdown(
            // No Nagle: a create's answer is one small write; delaying it for an ACK
            // costs milliseconds per call.
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            async {
                let _ = stop_rx.await;
            },
        );
    let server = tokio::spawn(server);
    let (metrics_stop, metrics_stopped) = tokio::sync::oneshot::channel::<()>();
    let metrics = tokio::spawn(gateway.metrics_hook(metrics).run(async {
        let _ = metrics_stopped.await;
    }));
    dir.write_metrics(metrics_addr)?;
    dir.write_endpoint(&format!("http://{addr}"))?;
    ready(addr);

    shutdown.await;
    tracing::info!("shutting down: no new creates");
    gateway.stop_serving();
    let _ = stop_tx.send(());
    match tokio::time::timeout(DRAIN_TIMEOUT, server).await {
        Ok(Ok(Err(e))) => tracing::warn!(error = %e, "gRPC server"),
        Err(_) => tracing::warn!("open calls did not finish within {DRAIN_TIMEOUT:?}"),
        _ => {}
    }
    if !gateway.drain(DRAIN_TIMEOUT).await {
        tracing::warn!(
            unrecorded = gateway.unrecorded(),
            "record writes still in flight; their sandboxes are adopted at the next start"
        );
    }
    dir.remove_endpoint();
    let _ = metrics_stop.send(());
    let _ = metrics.await;
    dir.remove_metrics();
    if !config.keep_sandboxes {
        stop_all(&gateway).await;
        // Unclaimed warm instances go too (kept, they are adopted by the next start).
        match agent.stop_warm().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(removed = n, "removed the warm instances"),
            Err(e) => tracing::warn!(error = %e, "removing the warm instances"),
        }
    }
    if let Err(e) = ctrd.stop().await {
        tracing::warn!(error = %e, "stopping the private containerd");
    }
    Ok(())
}

/// Delete every sandbox (`--stop-sandboxes-on-exit`).
async fn stop_all<S: SandboxStore>(gateway: &Gateway<S>) {
    let all = match gateway.list(fp::ListRequest::default()).await {
        Ok(all) => all,
        Err(e) => {
            tracing::warn!(error = %e, "listing sandboxes to stop");
            return;
        }
    };
    let deletes = all
        .iter()
        .map(|s| gateway.delete(&s.namespace, &s.name, None));
    for (s, result) in all.iter().zip(futures::future::join_all(deletes).await) {
        if let Err(e) = result {
            tracing::warn!(namespace = %s.namespace, name = %s.name, error = %e, "stopping sandbox");
        }
    }
}

/// This machine's name, for `node_name`.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}
