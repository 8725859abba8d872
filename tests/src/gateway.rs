//! The fast-path gateway wired as `fsb up` wires it, against the harness's containerd:
//! a real agent ([`AgentHandle`]), the registry actor with that agent registered, a
//! SQLite store in a temporary directory, the [`Gateway`] with its sweeper and the
//! agent's phase changes forwarded, and the `fastpath.v1` tonic server on
//! 127.0.0.1 behind the bearer-token check. Tests talk to it over real gRPC.
//!
//! Two steps, so a test can prepare the store and the agent before the gateway starts
//! (the startup reconcile): [`GatewayParts::start`] makes the parts,
//! [`GatewayFixture::serve`] reconciles, starts serving and starts the server.
//! [`GatewayFixture::start`] does both.
//!
//! Every test uses its own agent id, so several tests share the harness's containerd:
//! the agent lists only containers carrying its `agent-uid` label.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::{Context, Result, bail};
use containerd_client::services::v1::snapshots::{
    StatSnapshotRequest, snapshots_client::SnapshotsClient,
};
use fsb_agent::{AgentHandle, runtime::ObservedSandbox};
use fsb_core::{AgentId, NodeName, PoolName, spec::SpecLimits};
use fsb_gateway::{
    FastPathService, Gateway, GatewayConfig, LocalAgent, RateLimit, RateLimitConfig,
    ReconcileReport, TokenCheck,
};
use fsb_proto::fastpath::v1::{self as fp, fast_path_client::FastPathClient};
use fsb_registry::{AgentInfo, AgentReport, RegistryHandle, ReportedSandbox};
use fsb_store::{ListFilter, SandboxStore, SqliteStore};
use tokio::{net::TcpListener, task::JoinHandle};
use tonic::{
    metadata::{Ascii, MetadataValue},
    service::{Interceptor, interceptor::InterceptedService},
    transport::Channel,
};

use crate::{ContainerdEnv, wait_until};

/// The pool every fixture agent belongs to.
pub const POOL: &str = "default";
/// The namespace of that pool (local mode: pools are not namespaced; the gateway
/// allocates here whatever the sandbox's namespace).
pub const POOL_NAMESPACE: &str = "local";
/// The bearer token the server requires.
pub const TOKEN: &str = "gateway-test-token";
/// How long fixture helpers wait for cleanup to be visible.
pub const CLEANUP_DEADLINE: Duration = Duration::from_secs(30);

/// Adds `authorization: Bearer <token>` to every call (or nothing).
#[derive(Clone, Debug)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl Bearer {
    /// Sending `token`, or no header.
    pub fn new(token: Option<&str>) -> Result<Self> {
        Ok(Self(
            token
                .map(|t| format!("Bearer {t}").parse::<MetadataValue<Ascii>>())
                .transpose()?,
        ))
    }
}

impl Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// A `fastpath.v1` client as the tests use it.
pub type Client = FastPathClient<InterceptedService<Channel, Bearer>>;

/// Everything but the gateway: made first, so a test can prepare state by hand.
#[derive(Debug)]
pub struct GatewayParts {
    /// The harness's containerd.
    pub env: ContainerdEnv,
    /// This test's agent id (unique per test and run).
    pub agent_id: AgentId,
    /// The node reported for it.
    pub node: NodeName,
    /// Its slots (agent and registry agree).
    pub capacity: u32,
    /// The agent.
    pub agent: AgentHandle,
    /// The registry, with the agent registered.
    pub registry: RegistryHandle,
    /// The SQLite store (in `dir`).
    pub store: SqliteStore,
    /// Where the server will listen: bound now, so its port can be the agent port
    /// that sandboxes may never take.
    listener: Option<TcpListener>,
    /// The listener's port.
    pub port: u16,
    /// Holds the store; removed on drop.
    pub dir: tempfile::TempDir,
}

impl GatewayParts {
    /// An agent `<name>-<random>` with `capacity` slots, registered in a fresh
    /// registry (pool [`POOL`], namespace [`POOL_NAMESPACE`]), and a fresh store.
    /// Must run inside an actix system (`#[actix_rt::test]`).
    pub async fn start(name: &str, capacity: u32) -> Result<Self> {
        let env = ContainerdEnv::try_from_env()?;
        let agent_id = format!("{name}-{}", &crate::unique_id()[..8]);
        let agent = AgentHandle::start(crate::agent_config(&env, &agent_id, capacity))
            .await
            .context("starting the agent")?;
        let agent_id = AgentId::from(agent_id.as_str());
        let node = NodeName::from("test-node");
        let registry = RegistryHandle::start();
        let parts_capacity = capacity;
        registry
            .report(AgentReport {
                agent: AgentInfo {
                    id: agent_id.clone(),
                    pool: PoolName::parse("pool", POOL)?,
                    namespace: fsb_core::NamespaceName::parse("namespace", POOL_NAMESPACE)?,
                    node: node.clone(),
                    capacity: std::num::NonZeroU32::new(capacity).context("capacity 0")?,
                    images: vec![],
                    healthy: true,
                    default_runtime: fsb_core::spec::Runtime::Runc,
                    warm: Vec::new(),
                },
                sandboxes: vec![],
            })
            .await
            .context("registering the agent")?;
        let dir = tempfile::tempdir()?;
        let store = SqliteStore::open(dir.path().join("store.db"))?;
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        Ok(Self {
            env,
            agent_id,
            node,
            capacity: parts_capacity,
            agent,
            registry,
            store,
            listener: Some(listener),
            port,
            dir,
        })
    }

    /// Limits whose agent port is the server's port.
    pub fn limits(&self) -> SpecLimits {
        SpecLimits {
            agent_port: Some(self.port),
            ..SpecLimits::default()
        }
    }

    /// The fixture's gateway configuration: local pools, the server's port as the
    /// agent port, a 200 ms sweep.
    pub fn config(&self) -> GatewayConfig {
        GatewayConfig {
            pool_namespace: Some(
                fsb_core::NamespaceName::parse("namespace", POOL_NAMESPACE)
                    .expect("a valid namespace"),
            ),
            limits: self.limits(),
            sweep_interval: Duration::from_millis(200),
            ..GatewayConfig::default()
        }
    }

    /// A gateway over `store` with this agent added (not yet reconciled or serving).
    pub fn gateway<S: SandboxStore>(&self, config: GatewayConfig, store: S) -> Gateway<S> {
        let gateway = Gateway::new(config, store, self.registry.clone());
        gateway.add_agent(
            self.agent_id.clone(),
            self.node.clone(),
            Arc::new(LocalAgent::new(self.agent.clone(), self.limits())),
        );
        gateway
    }
}

/// A serving gateway and its parts. Background tasks stop on drop.
#[derive(Debug)]
pub struct GatewayFixture<S: SandboxStore> {
    /// The parts.
    pub parts: GatewayParts,
    /// The gateway.
    pub gateway: Gateway<S>,
    /// The server's address.
    pub addr: SocketAddr,
    tasks: Vec<JoinHandle<()>>,
}

impl<S: SandboxStore> Drop for GatewayFixture<S> {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl GatewayFixture<SqliteStore> {
    /// Parts, a gateway over the SQLite store with [`GatewayParts::config`], served.
    pub async fn start(name: &str, capacity: u32) -> Result<Self> {
        let parts = GatewayParts::start(name, capacity).await?;
        let gateway = parts.gateway(parts.config(), parts.store.clone());
        Ok(Self::serve(parts, gateway).await?.0)
    }
}

impl<S: SandboxStore> GatewayFixture<S> {
    /// Forward the agent's phase changes, reconcile the store with the agent, report
    /// what remains to the registry, accept creates, start the sweeper and the gRPC
    /// server. Returns the reconcile's report too.
    pub async fn serve(
        mut parts: GatewayParts,
        gateway: Gateway<S>,
    ) -> Result<(Self, ReconcileReport)> {
        let mut tasks = Vec::new();
        let mut changes = parts.agent.subscribe().await?;
        let forward = gateway.clone();
        tasks.push(tokio::spawn(async move {
            use tokio::sync::broadcast::error::RecvError;
            loop {
                match changes.recv().await {
                    Ok(change) => forward.phase_changed(change).await,
                    Err(RecvError::Lagged(_)) => {}
                    Err(RecvError::Closed) => return,
                }
            }
        }));
        let inventory = parts.agent.inventory().await?;
        let (report, kept) = gateway
            .reconcile(&parts.agent_id, inventory, &PoolName::parse("pool", POOL)?)
            .await?;
        parts
            .registry
            .report(AgentReport {
                agent: AgentInfo {
                    id: parts.agent_id.clone(),
                    pool: PoolName::parse("pool", POOL)?,
                    namespace: fsb_core::NamespaceName::parse("namespace", POOL_NAMESPACE)?,
                    node: parts.node.clone(),
                    capacity: std::num::NonZeroU32::new(parts.capacity).context("capacity 0")?,
                    images: vec![],
                    healthy: true,
                    default_runtime: fsb_core::spec::Runtime::Runc,
                    warm: Vec::new(),
                },
                sandboxes: kept
                    .iter()
                    .map(|c| ReportedSandbox {
                        id: c.id.clone(),
                        ports: c.ports.clone(),
                    })
                    .collect(),
            })
            .await?;
        gateway.start_serving();
        gateway.spawn_sweeper();
        let listener = parts.listener.take().context("already served")?;
        let addr = listener.local_addr()?;
        let service = FastPathService::server(
            gateway.clone(),
            TokenCheck::new(Some(TOKEN.into())),
            None,
            RateLimit::new(RateLimitConfig::DEFAULT),
        );
        tasks.push(tokio::spawn(async move {
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            if let Err(e) = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(incoming)
                .await
            {
                panic!("gateway server failed: {e}");
            }
        }));
        Ok((
            Self {
                parts,
                gateway,
                addr,
                tasks,
            },
            report,
        ))
    }

    /// A client sending the right token.
    pub async fn client(&self) -> Result<Client> {
        self.client_with(Some(TOKEN)).await
    }

    /// A client sending `token` (or no authorization header).
    pub async fn client_with(&self, token: Option<&str>) -> Result<Client> {
        let channel = Channel::from_shared(format!("http://{}", self.addr))?
            .connect()
            .await?;
        Ok(FastPathClient::with_interceptor(
            channel,
            Bearer::new(token)?,
        ))
    }

    /// The agent's containers in containerd (by its `agent-uid` label).
    pub async fn containers(&self) -> Result<Vec<ObservedSandbox>> {
        Ok(self
            .parts
            .agent
            .runtime()
            .list(Some(self.parts.agent_id.as_str()))
            .await?)
    }

    /// Whether containerd still has the overlayfs snapshot keyed `id`.
    pub async fn snapshot_exists(&self, id: &str) -> Result<bool> {
        let runtime = self.parts.agent.runtime();
        let mut snapshots = SnapshotsClient::new(runtime.containerd().channel());
        let stat = StatSnapshotRequest {
            snapshotter: "overlayfs".into(),
            key: id.to_owned(),
        };
        match snapshots.stat(runtime.containerd().request(stat)).await {
            Ok(_) => Ok(true),
            Err(s) if s.code() == tonic::Code::NotFound => Ok(false),
            Err(s) => Err(s.into()),
        }
    }

    /// What is left: containers of this agent, records in the store, registry
    /// allocations, FAST records still being written. All zero means clean.
    pub async fn leftovers(&self) -> Result<Leftovers> {
        Ok(Leftovers {
            containers: self.containers().await?.len(),
            records: self
                .gateway
                .store()
                .list(&ListFilter::default())
                .await?
                .len(),
            allocations: self.parts.registry.snapshot().await?.sandboxes,
            unrecorded: self.gateway.unrecorded(),
        })
    }

    /// Wait until nothing is left (see [`Self::leftovers`]).
    pub async fn assert_nothing_left(&self) -> Result<()> {
        let last = std::cell::Cell::new(None);
        let done = wait_until("nothing to be left behind", CLEANUP_DEADLINE, || async {
            let l = self.leftovers().await?;
            last.set(Some(l));
            Ok((l == Leftovers::default()).then_some(()))
        })
        .await;
        if done.is_err() {
            bail!("left behind: {:?}", last.get());
        }
        Ok(())
    }
}

/// What a test left behind (see [`GatewayFixture::leftovers`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Leftovers {
    /// Containers of the agent.
    pub containers: usize,
    /// Records in the store.
    pub records: usize,
    /// Sandboxes holding a registry slot.
    pub allocations: usize,
    /// FAST creates answered, record not yet written.
    pub unrecorded: usize,
}

/// Run an exec to its end (each message within 30 s): stdout and exit code, or the
/// status that refused it.
pub async fn exec(
    c: &mut Client,
    start: fp::ExecStart,
) -> std::result::Result<(String, Option<i32>), tonic::Status> {
    use fp::exec_response::Msg;
    use futures::StreamExt;
    let first = fp::ExecRequest {
        msg: Some(fp::exec_request::Msg::Start(start)),
    };
    let mut out = c.exec(tokio_stream::iter(vec![first])).await?.into_inner();
    let (mut stdout, mut code) = (Vec::new(), None);
    while let Some(m) = tokio::time::timeout(Duration::from_secs(30), out.next())
        .await
        .map_err(|_| tonic::Status::deadline_exceeded("exec sent nothing for 30 s"))?
    {
        match m?.msg {
            Some(Msg::Stdout(b)) => stdout.extend_from_slice(&b),
            Some(Msg::ExitCode(c)) => code = Some(c),
            Some(Msg::Stderr(_)) | None => {}
        }
    }
    Ok((String::from_utf8_lossy(&stdout).into_owned(), code))
}

/// A sandbox's logs so far (not following), or the status that refused them.
pub async fn logs(
    c: &mut Client,
    ns: &str,
    name: &str,
) -> std::result::Result<Vec<u8>, tonic::Status> {
    use futures::StreamExt;
    let mut stream = c
        .logs(fp::LogsRequest {
            namespace: ns.into(),
            name: name.into(),
            ..fp::LogsRequest::default()
        })
        .await?
        .into_inner();
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        out.extend_from_slice(&chunk?.data);
    }
    Ok(out)
}
