//! [`run`]: the controller process, composed. The order is the point:
//! 1. the AgentControl server starts, so agents can register;
//! 2. creates wait until every running agent pod has registered and had its
//!    inventory reconciled with the Sandbox objects (or `startup_wait` passed): the
//!    registry is rebuilt before anything is allocated (the original served creates
//!    before restoring);
//! 3. then the fast path serves, and the sweeper and the Sandbox loop run under the
//!    supervisor.
//!
//! On shutdown: no new creates, open calls finish, FAST record writes are drained.

use std::{collections::HashSet, net::SocketAddr, sync::Arc, time::Duration};

use fsb_core::spec::SpecLimits;
use fsb_gateway::{FastPathService, Gateway, GatewayConfig, TokenCheck};
use fsb_proto::{ServingStatus, fastpath::v1 as fp, standard_services};
use fsb_registry::RegistryHandle;
use k8s_openapi::api::core::v1::Pod;
use kube::{Api, Client, api::ListParams};

use tokio::net::TcpListener;

use crate::{
    agents::{AgentBook, AgentControlService, AgentIdentity},
    identity::PodIdentity,
    leader::{self, LeaseConfig},
    pool::{self, AgentLoad, AgentUsage, PoolConfig, PoolTrigger},
    rbac::{AuthTtl, KubeAuthorizer},
    sandboxes::{PendingDemand, SandboxLoop, SandboxLoopConfig, scoped},
    serving::{FastPathTls, Refresher, server_config, tls_incoming},
    store::KubeStore,
    supervisor::{Backoff, Restarts, supervise},
    tls::{AGENT_CA_NAME, load_or_create_ca},
};
use fsb_agent::tls::CONTROLLER_NAME;

/// How the controller behaves.
#[derive(Clone, Debug)]
pub struct ControllerConfig {
    /// Fast-path gRPC address.
    pub listen: SocketAddr,
    /// AgentControl gRPC address (agents register here).
    pub agent_listen: SocketAddr,
    /// The agents' own port: no sandbox may ask for it.
    pub agent_port: u16,
    /// Mode of creates that name none.
    pub default_mode: fp::ConsistencyMode,
    /// Who may call the fast path.
    pub auth: FastPathAuth,
    /// The fast path's TLS certificate and where it comes from (None: plaintext, for a
    /// mesh or a proxy that terminates TLS in front).
    pub fast_path_tls: Option<FastPathTls>,
    /// Longest wait for running agent pods to register before serving creates.
    pub startup_wait: Duration,
    /// A disconnected agent whose pod exists is declared lost after this long.
    pub agent_lost_after: Duration,
    /// Period of the Sandbox loop.
    pub sandbox_interval: Duration,
    /// Heartbeat period agents are told to use.
    pub heartbeat: Duration,
    /// Only this namespace's Sandboxes, pools and agents (None: the whole cluster).
    pub namespace: Option<String>,
    /// Image of agent pods for pools without `agentTemplate`.
    pub agent_image: String,
    /// The AgentControl URL agent pods dial (in a cluster: the controller Service);
    /// None: this process's own agent address (tests, single host).
    pub agent_url: Option<String>,
    /// Period of the pool reconciler's pass without events.
    pub pool_resync: Duration,
    /// Leader election (None: this replica leads alone, e.g. in tests).
    pub lease: Option<LeaseConfig>,
    /// Gateway settings (record retries, sweep period); limits and namespace are set
    /// from the fields above.
    pub gateway: GatewayConfig,
    /// Where Prometheus metrics are served (`GET /metrics`); None: not served.
    pub metrics_listen: Option<SocketAddr>,
    /// Per-client rate limit of the fast path (a client is a remote host).
    pub rate_limit: fsb_gateway::RateLimitConfig,
    /// Mutual TLS between the controller and its agents (None: plaintext and
    /// unauthenticated, which only a test that needs it should choose).
    pub agent_tls: Option<AgentTlsConfig>,
}

/// Where the agent CA lives (see [`crate::tls`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentTlsConfig {
    /// Name of the CA Secret (`ca.crt`, `ca.key`); created with a fresh CA if missing.
    pub ca_secret: String,
    /// Its namespace (None: the watched namespace, else `fast-sandbox-system`).
    pub ca_namespace: Option<String>,
}

impl Default for AgentTlsConfig {
    fn default() -> Self {
        Self {
            ca_secret: crate::tls::DEFAULT_CA_SECRET.to_owned(),
            ca_namespace: None,
        }
    }
}

impl Default for ControllerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 7370)),
            agent_listen: SocketAddr::from(([0, 0, 0, 0], 7371)),
            agent_port: 5758,
            default_mode: fp::ConsistencyMode::Fast,
            auth: FastPathAuth::None,
            fast_path_tls: None,
            startup_wait: Duration::from_secs(15),
            agent_lost_after: Duration::from_secs(30),
            sandbox_interval: Duration::from_millis(500),
            heartbeat: Duration::from_secs(5),
            namespace: None,
            agent_image: format!("fast-sandbox/fsb-agent:{}", env!("CARGO_PKG_VERSION")),
            agent_url: None,
            pool_resync: Duration::from_secs(2),
            lease: None,
            gateway: GatewayConfig::default(),
            rate_limit: fsb_gateway::RateLimitConfig::DEFAULT,
            metrics_listen: None,
            agent_tls: Some(AgentTlsConfig::default()),
        }
    }
}

/// How fast-path callers are authenticated and authorized.
#[derive(Clone, Debug, Default)]
pub enum FastPathAuth {
    /// Everyone may do everything (tests; a proxy in front that authenticates).
    #[default]
    None,
    /// One shared bearer token, all rights (as local mode).
    Token(String),
    /// Kubernetes: the bearer token is checked with a TokenReview and each call with a
    /// SubjectAccessReview on `sandboxes.sandbox.fast.io`, cached as `AuthTtl` says.
    Kubernetes(AuthTtl),
}

/// Where a running controller listens, for tests and the log.
#[derive(Clone, Copy, Debug)]
pub struct Addresses {
    /// The fast path.
    pub fast_path: SocketAddr,
    /// AgentControl.
    pub agents: SocketAddr,
    /// `/metrics`, if served.
    pub metrics: Option<SocketAddr>,
}

/// What a running controller shares (tests inspect it; the pool reconciler reads it).
#[derive(Debug, Clone)]
pub struct Shared {
    /// Agents heard from.
    pub book: Arc<AgentBook>,
    /// Sandboxes waiting for capacity.
    pub demand: Arc<PendingDemand>,
    /// The registry.
    pub registry: RegistryHandle,
    /// Restart counts of supervised loops.
    pub restarts: Arc<Restarts>,
}

/// Errors that stop the controller before it serves.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    /// A listener could not bind.
    #[error("{what} {addr}: {source}")]
    Bind {
        /// Which listener.
        what: &'static str,
        /// Its address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// Anything else while starting.
    #[error("{0}")]
    Setup(String),
}

/// Run the controller until `shutdown` resolves.
pub async fn run(
    client: Client,
    config: ControllerConfig,
    shutdown: impl std::future::Future<Output = ()> + Send,
    ready: impl FnOnce(Addresses, Shared) + Send,
) -> Result<(), ControllerError> {
    // A standby replica neither listens nor reconciles until it leads.
    let mut leadership = match config.lease.clone() {
        Some(lease) => Some(leader::acquire(client.clone(), lease).await),
        None => None,
    };
    // The CA before any listener: a replica that cannot sign cannot serve agents.
    let ca = match &config.agent_tls {
        Some(t) => {
            let ns = t
                .ca_namespace
                .clone()
                .or_else(|| config.namespace.clone())
                .unwrap_or_else(|| "fast-sandbox-system".to_owned());
            let ca = load_or_create_ca(&client, &ns, &t.ca_secret, AGENT_CA_NAME)
                .await
                .map_err(|e| {
                    ControllerError::Setup(format!("agent CA {ns}/{}: {e}", t.ca_secret))
                })?;
            Some(Arc::new(ca))
        }
        None => {
            tracing::warn!(
                "agent TLS is off: agents and the controller talk plaintext, unauthenticated"
            );
            None
        }
    };
    let controller_tls = match &ca {
        Some(ca) => Some(ca.issue(CONTROLLER_NAME).map_err(|e| {
            ControllerError::Setup(format!("issuing the controller's certificate: {e}"))
        })?),
        None => None,
    };
    // The fast path's certificate too: a controller that would serve an unusable one
    // does not start.
    let fast_tls = match &config.fast_path_tls {
        Some(t) => Some((
            Refresher::start(&client, &t.source)
                .await
                .map_err(|e| ControllerError::Setup(format!("fast-path TLS: {e}")))?,
            t.check_every,
        )),
        None => None,
    };
    let bind = |what: &'static str, addr: SocketAddr| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|source| ControllerError::Bind { what, addr, source })
    };
    let fast_listener = bind("--listen", config.listen).await?;
    let agent_listener = bind("--agent-listen", config.agent_listen).await?;
    let mut addrs = Addresses {
        fast_path: fast_listener
            .local_addr()
            .map_err(|e| ControllerError::Setup(e.to_string()))?,
        agents: agent_listener
            .local_addr()
            .map_err(|e| ControllerError::Setup(e.to_string()))?,
        metrics: None,
    };

    let limits = SpecLimits {
        agent_port: Some(config.agent_port),
        ..SpecLimits::default()
    };
    let store = KubeStore::new(client.clone(), limits.clone(), config.namespace.clone());
    let registry = RegistryHandle::start();
    let pod_names = store.clone();
    let gateway = Gateway::new(
        GatewayConfig {
            limits: limits.clone(),
            default_mode: config.default_mode,
            pool_namespace: None,
            ..config.gateway.clone()
        },
        store,
        registry.clone(),
    );
    // Metrics first among the servers, so a controller still waiting for its agents
    // can already be scraped.
    let (metrics_stop, metrics_stopped) = tokio::sync::oneshot::channel::<()>();
    if let Some(addr) = config.metrics_listen {
        let server = fsb_telemetry::MetricsServer::bind(addr)
            .await
            .map_err(|e| ControllerError::Setup(e.to_string()))?;
        addrs.metrics = Some(server.local_addr());
        tokio::spawn(gateway.metrics_hook(server).run(async {
            let _ = metrics_stopped.await;
        }));
    }
    let book = Arc::new(AgentBook::default());
    let identity: Arc<dyn AgentIdentity> = Arc::new(PodIdentity::new(client.clone()));
    let mut agent_service = AgentControlService::new(
        gateway.clone(),
        registry.clone(),
        identity,
        book.clone(),
        config.heartbeat,
    );
    let mut agent_server_builder = tonic::transport::Server::builder();
    if let Some(tls) = &controller_tls {
        agent_service = agent_service.with_tls(tls.clone());
        agent_server_builder = agent_server_builder
            .tls_config(tls.server())
            .map_err(|e| ControllerError::Setup(format!("agent control TLS: {e}")))?;
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let agent_server = tokio::spawn(
        agent_server_builder
            .add_service(agent_service.server())
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(agent_listener)
                    .with_nodelay(Some(true)),
                stopped(stop_rx.clone()),
            ),
    );
    tracing::info!(addr = %addrs.agents, "agent control listening");

    wait_for_agents(
        &client,
        config.namespace.as_deref(),
        &book,
        config.startup_wait,
    )
    .await;
    gateway.start_serving();
    gateway.spawn_sweeper();

    let restarts = Arc::new(Restarts::default());
    let demand = Arc::new(PendingDemand::default());
    {
        let (client, gateway, book, demand) = (
            client.clone(),
            gateway.clone(),
            book.clone(),
            demand.clone(),
        );
        let loop_config = SandboxLoopConfig {
            interval: config.sandbox_interval,
            agent_lost_after: config.agent_lost_after,
            limits: limits.clone(),
            scope: config.namespace.clone(),
        };
        supervise("sandboxes", &restarts, Backoff::default(), move || {
            SandboxLoop::new(
                client.clone(),
                gateway.clone(),
                book.clone(),
                demand.clone(),
                loop_config.clone(),
            )
            .run()
        });
    }

    let trigger = PoolTrigger::new();
    {
        let usage: Arc<dyn AgentUsage> = Arc::new(BookUsage {
            book: book.clone(),
            demand: demand.clone(),
        });
        let controller_url = config
            .agent_url
            .clone()
            .unwrap_or_else(|| format!("http://{}", addrs.agents));
        let pool_config = PoolConfig {
            agent_image: config.agent_image.clone(),
            controller_url: match &ca {
                Some(_) => fsb_agent::tls::https(&controller_url),
                None => controller_url,
            },
            agent_port: config.agent_port,
            namespace: config.namespace.clone(),
            resync: config.pool_resync,
            ca: ca.clone(),
        };
        let (pool_client, pool_trigger) = (client.clone(), trigger.clone());
        supervise("pools", &restarts, Backoff::default(), move || {
            pool::run(
                pool_client.clone(),
                usage.clone(),
                pool_config.clone(),
                pool_trigger.clone(),
            )
        });
        // Registrations and demand changes are what sizing reacts to; registrations
        // also name the pods records show as assignedPod.
        let (book, trigger) = (book.clone(), trigger.clone());
        tokio::spawn(async move {
            loop {
                for (id, a) in book.all() {
                    pod_names.set_pod_name(id, a.register.pod_name.clone());
                }
                trigger.poke();
                book.changed().await;
            }
        });
    }

    let (reporter, health, reflection) =
        standard_services().map_err(|e| ControllerError::Setup(e.to_string()))?;
    reporter
        .set_service_status("fastpath.v1.FastPath", ServingStatus::Serving)
        .await;
    let fast_router = tonic::transport::Server::builder()
        .add_service(health)
        .add_service(reflection)
        .add_service(FastPathService::server(
            gateway.clone(),
            TokenCheck::new(match &config.auth {
                FastPathAuth::Token(t) => Some(t.clone()),
                _ => None,
            }),
            match config.auth {
                FastPathAuth::Kubernetes(ttl) => {
                    Some(Arc::new(KubeAuthorizer::new(client.clone(), ttl))
                        as Arc<dyn fsb_gateway::Authorizer>)
                }
                _ => None,
            },
            fsb_gateway::RateLimit::new(config.rate_limit),
        ));
    // TLS is done here rather than by tonic so that the certificate can change while
    // serving (tonic's own TLS takes one certificate for the server's life).
    let fast_server = match fast_tls {
        Some(((slot, refresher), every)) => {
            let tls = server_config(slot)
                .map_err(|e| ControllerError::Setup(format!("fast-path TLS: {e}")))?;
            tokio::spawn(refresher.run(every, stopped(stop_rx.clone())));
            tokio::spawn(fast_router.serve_with_incoming_shutdown(
                tls_incoming(fast_listener, tls),
                stopped(stop_rx.clone()),
            ))
        }
        None => tokio::spawn(fast_router.serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(fast_listener).with_nodelay(Some(true)),
            stopped(stop_rx.clone()),
        )),
    };
    tracing::info!(addr = %addrs.fast_path, "fast path listening");
    ready(
        addrs,
        Shared {
            book,
            demand,
            registry,
            restarts,
        },
    );

    let lost = async {
        match leadership.as_mut() {
            Some(l) => l.lost().await,
            None => std::future::pending().await,
        }
    };
    let lost_lead = tokio::select! {
        () = shutdown => false,
        () = lost => true,
    };
    tracing::info!("shutting down: no new creates");
    gateway.stop_serving();
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(10), fast_server).await;
    if !gateway.drain(Duration::from_secs(10)).await {
        tracing::warn!(
            unrecorded = gateway.unrecorded(),
            "record writes still in flight at exit"
        );
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), agent_server).await;
    let _ = metrics_stop.send(());
    if lost_lead {
        return Err(ControllerError::Setup(
            "lost the leader lease; another replica takes over".into(),
        ));
    }
    Ok(())
}

/// Pool sizing's view of the agents: the Session book and the Sandbox loop's demand.
#[derive(Debug)]
struct BookUsage {
    book: Arc<AgentBook>,
    demand: Arc<PendingDemand>,
}

impl AgentUsage for BookUsage {
    fn agents(&self, namespace: &str, pool: &str) -> Vec<AgentLoad> {
        self.book
            .all()
            .into_iter()
            .filter(|(_, a)| {
                a.connected && a.register.namespace == namespace && a.register.pool == pool
            })
            .map(|(_, a)| AgentLoad {
                pod_uid: a.register.pod_uid.clone(),
                used: a.used,
                capacity: a.register.capacity,
                draining: a.draining,
            })
            .collect()
    }

    fn pending(&self, namespace: &str, pool: &str) -> u32 {
        self.demand.get(namespace, pool)
    }

    fn drain(&self, pod_uid: &str) -> bool {
        self.book.drain(&fsb_core::AgentId::from(pod_uid))
    }

    fn warm_ready(&self, namespace: &str, pool: &str) -> u32 {
        self.book
            .all()
            .into_iter()
            .filter(|(_, a)| {
                a.connected && a.register.namespace == namespace && a.register.pool == pool
            })
            .fold(0u32, |n, (_, a)| n.saturating_add(a.warm))
    }
}

/// Wait until every running, ready agent pod has registered, at most `limit`.
async fn wait_for_agents(client: &Client, scope: Option<&str>, book: &AgentBook, limit: Duration) {
    let deadline = tokio::time::Instant::now() + limit;
    let pods: Api<Pod> = scoped(client, scope);
    let selector = format!(
        "{}={}",
        fsb_core::labels::LABEL_APP,
        fsb_core::labels::LABEL_APP_AGENT
    );
    loop {
        let expected: Option<HashSet<String>> = pods
            .list(&ListParams::default().labels(&selector))
            .await
            .ok()
            .map(|l| {
                l.items
                    .into_iter()
                    .filter(|p| {
                        p.metadata.deletion_timestamp.is_none()
                            && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
                    })
                    .filter_map(|p| p.metadata.uid)
                    .collect()
            });
        let registered: HashSet<String> = book
            .all()
            .into_iter()
            .filter(|(_, a)| a.connected)
            .map(|(id, _)| id.to_string())
            .collect();
        let missing = expected.as_ref().map(|e| e.difference(&registered).count());
        if missing == Some(0) {
            tracing::info!(agents = registered.len(), "every running agent registered");
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(
                ?missing,
                "serving before every agent registered (startup wait over)"
            );
            return;
        }
        tokio::select! {
            () = book.changed() => {}
            () = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
}
