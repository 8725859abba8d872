//! Agents as the controller sees them: [`RemoteAgent`] (the gateway's [`AgentClient`]
//! over gRPC to an agent pod) and [`AgentControlService`] (the `agent.v1.AgentControl`
//! Session server where agents register and report).
//!
//! Registration: the first message must be `register`; with mutual TLS (the default in
//! Kubernetes mode) the client certificate must name the pool and namespace the agent
//! claims ([`fsb_agent::tls::agent_name`]); then the agent is accepted only if
//! [`AgentIdentity`] confirms it (in Kubernetes: its pod exists, has the UID it claims,
//! which is also its agent id, is owned by the pool it names, with that pool's current
//! UID, and is not terminating; the original trusted any pod with the right label).
//! Then the agent's first inventory is reconciled with the store
//! ([`Gateway::reconcile`]) and reported to the registry before the agent can receive
//! creates. Later inventories replace what the registry holds for it; phase events go
//! to the gateway.
//!
//! A broken stream makes the agent unhealthy in the registry (no new sandboxes), not
//! lost: agents reconnect after a controller restart or a network blip. Whether a
//! disconnected agent is lost is decided by the sandbox loop ([`crate::sandboxes`]),
//! from its pod and how long it has been away.

use std::{
    net::IpAddr,
    num::NonZeroU32,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use dashmap::DashMap;
use fsb_agent::{
    SandboxRecord,
    server::{BoxStream, core_runtime},
    session::phase_from_wire,
    state::PhaseChange,
    tls::{TlsMaterial, agent_name, check_peer},
};
use fsb_core::{
    AgentId, HostPort, ImageRef, NamespaceName, NodeName, PoolName, SandboxId, spec::Runtime,
};
use fsb_gateway::{
    Gateway,
    agents::{AgentClient, reported},
};
use fsb_proto::{
    agent::v1::{
        self as av, AgentMessage, ControllerMessage, Inventory, Register, Registered,
        agent_client::AgentClient as AgentGrpc,
        agent_control_server::{AgentControl, AgentControlServer},
        agent_message::Msg as In,
        controller_message::Msg as Out,
    },
    fastpath::v1 as fp,
};
use fsb_registry::{AgentInfo, AgentReport, RegistryHandle, ReportedSandbox, WarmInstance};
use fsb_store::SandboxStore;
use futures::{StreamExt, future::BoxFuture};
use tokio::sync::{Notify, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{
    Request, Response, Status, Streaming,
    transport::{Channel, ClientTlsConfig},
};

/// Deadline of every unary call to an agent (creates included: image pulls are bounded
/// by the agent's own deadline).
const AGENT_CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// How long an agent has to send `register` and then its first inventory.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(10);

/// The gateway's client of one agent pod.
#[derive(Debug, Clone)]
pub struct RemoteAgent {
    grpc: AgentGrpc<Channel>,
    /// Sandbox ids of the agent's last inventory (its table), for registry reports.
    inventory: Arc<Mutex<Vec<SandboxId>>>,
}

impl RemoteAgent {
    /// A lazily connecting client of `endpoint` (`http://host:port`). With `tls`, the
    /// connection is TLS whatever the endpoint's scheme says, presents the controller's
    /// certificate and accepts only the server certificate `tls` names.
    pub fn new(endpoint: &str, tls: Option<ClientTlsConfig>) -> Result<Self, Status> {
        let invalid = |e: tonic::transport::Error| {
            Status::invalid_argument(format!("register.endpoint: {e}"))
        };
        let endpoint = match tls {
            Some(_) => fsb_agent::tls::https(endpoint),
            None => endpoint.to_owned(),
        };
        let mut builder = tonic::transport::Endpoint::from_shared(endpoint)
            .map_err(invalid)?
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(5))
            .timeout(AGENT_CALL_TIMEOUT);
        if let Some(tls) = tls {
            builder = builder.tls_config(tls).map_err(invalid)?;
        }
        let channel = builder.connect_lazy();
        Ok(Self {
            grpc: AgentGrpc::new(channel).max_decoding_message_size(16 * 1024 * 1024),
            inventory: Arc::default(),
        })
    }

    fn set_inventory(&self, ids: Vec<SandboxId>) {
        if let Ok(mut inv) = self.inventory.lock() {
            *inv = ids;
        }
    }
}

impl AgentClient for RemoteAgent {
    fn create(
        &self,
        req: av::CreateSandboxRequest,
    ) -> BoxFuture<'_, Result<av::CreateSandboxResponse, Status>> {
        let mut grpc = self.grpc.clone();
        let mut req = Request::new(req);
        fsb_telemetry::trace::inject(req.metadata_mut());
        Box::pin(async move { Ok(grpc.create_sandbox(req).await?.into_inner()) })
    }

    fn delete(
        &self,
        id: SandboxId,
        grace_seconds: Option<u32>,
    ) -> BoxFuture<'_, Result<bool, Status>> {
        let mut grpc = self.grpc.clone();
        Box::pin(async move {
            Ok(grpc
                .delete_sandbox(av::DeleteSandboxRequest {
                    sandbox_id: id.to_string(),
                    grace_period_seconds: grace_seconds,
                })
                .await?
                .into_inner()
                .existed)
        })
    }

    fn exec(
        &self,
        input: BoxStream<av::ExecRequest>,
    ) -> BoxFuture<'_, Result<BoxStream<fp::ExecResponse>, Status>> {
        let mut grpc = self.grpc.clone();
        Box::pin(async move {
            // The agent sees a plain stream of requests; an error on the client's side
            // ends it.
            let (tx, rx) = mpsc::channel(16);
            tokio::spawn(async move {
                let mut input = input;
                while let Some(Ok(m)) = input.next().await {
                    if tx.send(m).await.is_err() {
                        return;
                    }
                }
            });
            let out = grpc
                .exec(Request::new(ReceiverStream::new(rx)))
                .await?
                .into_inner();
            Ok(Box::pin(out) as BoxStream<fp::ExecResponse>)
        })
    }

    fn logs(&self, req: av::LogsRequest) -> BoxFuture<'_, Result<BoxStream<fp::LogChunk>, Status>> {
        let mut grpc = self.grpc.clone();
        Box::pin(async move {
            let out = grpc.logs(req).await?.into_inner();
            Ok(Box::pin(out) as BoxStream<fp::LogChunk>)
        })
    }

    /// Read from the agent's containerd, not its table: a container the table lost
    /// (a create whose outcome containerd left open) is still found.
    fn containers(&self) -> BoxFuture<'_, Result<Vec<SandboxId>, Status>> {
        let mut grpc = self.grpc.clone();
        Box::pin(async move {
            let ids = grpc
                .list_containers(av::ListContainersRequest {})
                .await?
                .into_inner()
                .sandbox_ids;
            ids.iter()
                .enumerate()
                .map(|(i, s)| {
                    SandboxId::parse(&format!("sandbox_ids[{i}]"), s)
                        .map_err(|e| Status::internal(format!("agent answered {e}")))
                })
                .collect()
        })
    }
}

/// Who may register as an agent.
pub trait AgentIdentity: Send + Sync + 'static {
    /// `Ok` if `reg`, sent from `peer` (the connection's remote address, if known), is
    /// a genuine agent of its pool; `PermissionDenied` if not, `Unavailable` if that
    /// cannot be told now (the agent retries).
    fn check(&self, reg: &Register, peer: Option<IpAddr>) -> BoxFuture<'_, Result<(), Status>>;
}

/// What the controller knows of one connected (or recently connected) agent.
#[derive(Clone, Debug)]
pub struct AgentState {
    /// Registration as sent.
    pub register: Register,
    /// Connected now.
    pub connected: bool,
    /// When the stream ended (if it did).
    pub disconnected_at: Option<Instant>,
    /// Sandboxes held, from the last inventory.
    pub used: u32,
    /// Warm instances ready, from the last inventory.
    pub warm: u32,
    /// Told to take no new sandboxes.
    pub draining: bool,
    /// Session generation: a stream that ends after a newer one started changes nothing.
    pub epoch: u64,
}

/// The agents the controller has heard from, shared by the Session server, the
/// sandbox loop and the pool reconciler.
#[derive(Debug, Default)]
pub struct AgentBook {
    agents: DashMap<AgentId, AgentState>,
    epochs: AtomicU64,
    changed: Notify,
    drains: DashMap<AgentId, mpsc::Sender<Result<ControllerMessage, Status>>>,
}

impl AgentBook {
    /// Every agent known, connected or not.
    pub fn all(&self) -> Vec<(AgentId, AgentState)> {
        self.agents
            .iter()
            .map(|e| (e.key().clone(), e.value().clone()))
            .collect()
    }

    /// One agent.
    pub fn get(&self, id: &AgentId) -> Option<AgentState> {
        self.agents.get(id).map(|e| e.clone())
    }

    /// Forget an agent (it was declared lost).
    pub fn remove(&self, id: &AgentId) {
        self.agents.remove(id);
        self.drains.remove(id);
    }

    /// Wait until an agent registers or changes.
    pub async fn changed(&self) {
        self.changed.notified().await;
    }

    /// Mark an agent draining and tell it so. False if it is not connected.
    pub fn drain(&self, id: &AgentId) -> bool {
        let Some(mut a) = self.agents.get_mut(id) else {
            return false;
        };
        a.draining = true;
        let tx = self.drains.get(id).map(|t| t.clone());
        drop(a);
        // The fresh inventory this asks for makes the session report the agent
        // unhealthy to the registry, which then places nothing more on it.
        match tx {
            Some(tx) => [
                Out::Drain(av::Drain {}),
                Out::InventoryRequest(av::InventoryRequest {}),
            ]
            .into_iter()
            .all(|m| tx.try_send(Ok(ControllerMessage { msg: Some(m) })).is_ok()),
            None => false,
        }
    }
}

/// Serves `agent.v1.AgentControl`.
pub struct AgentControlService<S: SandboxStore> {
    gateway: Gateway<S>,
    registry: RegistryHandle,
    identity: Arc<dyn AgentIdentity>,
    book: Arc<AgentBook>,
    heartbeat: Duration,
    tls: Option<TlsMaterial>,
}

impl<S: SandboxStore> std::fmt::Debug for AgentControlService<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentControlService")
            .finish_non_exhaustive()
    }
}

impl<S: SandboxStore> AgentControlService<S> {
    /// The service; `heartbeat` is the period agents are told to use; `tls` is the
    /// controller's certificate when agents speak mutual TLS (see [`AgentControlService::with_tls`]).
    pub fn new(
        gateway: Gateway<S>,
        registry: RegistryHandle,
        identity: Arc<dyn AgentIdentity>,
        book: Arc<AgentBook>,
        heartbeat: Duration,
    ) -> Self {
        Self {
            gateway,
            registry,
            identity,
            book,
            heartbeat,
            tls: None,
        }
    }

    /// Mutual TLS with agents (the server itself must serve `tls.server()`): a
    /// registration is accepted only from a client certificate naming the pool and
    /// namespace it claims, and the controller calls the agent back over TLS with its
    /// own certificate, accepting only that pool's server certificate.
    pub fn with_tls(mut self, tls: TlsMaterial) -> Self {
        self.tls = Some(tls);
        self
    }

    /// As a tonic service.
    pub fn server(self) -> AgentControlServer<Self> {
        AgentControlServer::new(self)
    }
}

fn records(inv: &Inventory) -> Vec<SandboxRecord> {
    inv.sandboxes
        .iter()
        .filter_map(|s| {
            Some(SandboxRecord {
                id: SandboxId::parse("sandbox_id", &s.sandbox_id).ok()?,
                namespace: s.namespace.clone(),
                name: s.name.clone(),
                claim_uid: s.claim_uid.clone(),
                request_id: s.request_id.clone(),
                image: s.image.clone(),
                ports: s
                    .ports
                    .iter()
                    .filter_map(|p| HostPort::parse("ports", *p).ok())
                    .collect(),
                phase: phase_from_wire(s.phase()),
                exit_code: s.exit_code,
                pid: 0,
            })
        })
        .collect()
}

/// How many warm instances an inventory says are ready.
fn warm_ready(inv: &Inventory) -> u32 {
    inv.warm.iter().fold(0u32, |n, w| n.saturating_add(w.ready))
}

/// The ready warm instances an inventory lists (unreadable entries skipped).
fn warm_of(inv: &Inventory) -> Vec<WarmInstance> {
    inv.warm
        .iter()
        .filter_map(|w| {
            let image = ImageRef::parse("warm.image", &w.image).ok()?;
            let runtime = core_runtime(w.runtime())?;
            Some(
                w.sandbox_ids
                    .iter()
                    .filter_map(|id| SandboxId::parse("warm.sandbox_ids", id).ok())
                    .map(move |id| WarmInstance {
                        id,
                        image: image.clone(),
                        runtime,
                    })
                    .collect::<Vec<_>>(),
            )
        })
        .flatten()
        .collect()
}

fn info(reg: &Register, healthy: bool, warm: Vec<WarmInstance>) -> Result<AgentInfo, Status> {
    Ok(AgentInfo {
        id: AgentId::from(reg.agent_id.as_str()),
        pool: PoolName::parse("register.pool", &reg.pool)
            .map_err(|e| Status::invalid_argument(e.to_string()))?,
        namespace: NamespaceName::parse("register.namespace", &reg.namespace)
            .map_err(|e| Status::invalid_argument(e.to_string()))?,
        node: NodeName::from(reg.node_name.as_str()),
        capacity: NonZeroU32::new(reg.capacity)
            .ok_or_else(|| Status::invalid_argument("register.capacity: must be at least 1"))?,
        images: Vec::new(),
        healthy,
        default_runtime: core_runtime(reg.default_runtime()).unwrap_or(Runtime::Runc),
        warm,
    })
}

#[tonic::async_trait]
impl<S: SandboxStore> AgentControl for AgentControlService<S> {
    type SessionStream = ReceiverStream<Result<ControllerMessage, Status>>;

    async fn session(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let peer = request.peer_certs();
        let peer_ip = request.remote_addr().map(|a| a.ip().to_canonical());
        let mut inbound = request.into_inner();
        let reg = match tokio::time::timeout(REGISTER_TIMEOUT, inbound.message()).await {
            Ok(Ok(Some(AgentMessage {
                msg: Some(In::Register(r)),
            }))) => r,
            Ok(Ok(_)) => {
                return Err(Status::invalid_argument(
                    "the first message must be register",
                ));
            }
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(Status::deadline_exceeded("no register within 10 s")),
        };
        if reg.agent_id.is_empty() {
            return Err(Status::invalid_argument("register.agent_id: required"));
        }
        info(&reg, true, Vec::new())?;
        let agent_tls = match &self.tls {
            Some(tls) => {
                // The certificate says which pool's agent this is; the API server then
                // says whether that pod is one.
                let name = agent_name(&reg.pool, &reg.namespace);
                check_peer(peer, &name).map_err(|s| {
                    Status::new(
                        s.code(),
                        format!(
                            "agent {} (pod {}/{}): {}",
                            reg.agent_id,
                            reg.namespace,
                            reg.pod_name,
                            s.message()
                        ),
                    )
                })?;
                Some(tls.client(&name))
            }
            None => None,
        };
        self.identity.check(&reg, peer_ip).await?;
        let remote = RemoteAgent::new(&reg.endpoint, agent_tls)?;
        let (tx, rx) = mpsc::channel(16);
        tx.send(Ok(ControllerMessage {
            msg: Some(Out::Registered(Registered {
                heartbeat_interval_ms: u32::try_from(self.heartbeat.as_millis()).unwrap_or(5000),
            })),
        }))
        .await
        .map_err(|_| Status::cancelled("agent went away"))?;
        let session = Session {
            gateway: self.gateway.clone(),
            registry: self.registry.clone(),
            book: self.book.clone(),
            reg,
            remote,
            tx,
        };
        tokio::spawn(session.run(inbound));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// One agent's stream, after its identity was checked.
struct Session<S: SandboxStore> {
    gateway: Gateway<S>,
    registry: RegistryHandle,
    book: Arc<AgentBook>,
    reg: Register,
    remote: RemoteAgent,
    tx: mpsc::Sender<Result<ControllerMessage, Status>>,
}

impl<S: SandboxStore> Session<S> {
    async fn run(self, mut inbound: Streaming<AgentMessage>) {
        let id = AgentId::from(self.reg.agent_id.as_str());
        let epoch = self.book.epochs.fetch_add(1, Ordering::Relaxed) + 1;
        match self.start(&id, epoch, &mut inbound).await {
            Ok(()) => self.serve(&id, &mut inbound).await,
            Err(e) => {
                tracing::warn!(agent = %id, error = %e, "agent session refused");
                let _ = self.tx.send(Err(e)).await;
            }
        }
        // Unhealthy, not lost: the sandbox loop decides that.
        let mut ended = false;
        if let Some(mut a) = self.book.agents.get_mut(&id)
            && a.epoch == epoch
        {
            a.connected = false;
            a.disconnected_at = Some(Instant::now());
            ended = true;
        }
        if ended {
            self.book.drains.remove(&id);
            if let Ok(info) = info(&self.reg, false, Vec::new()) {
                let _ = self
                    .registry
                    .report(AgentReport {
                        agent: info,
                        sandboxes: self
                            .remote
                            .inventory
                            .lock()
                            .map(|i| i.clone())
                            .unwrap_or_default()
                            .into_iter()
                            .map(|id| ReportedSandbox {
                                id,
                                ports: Vec::new(),
                            })
                            .collect(),
                    })
                    .await;
            }
            tracing::info!(agent = %id, pod = %self.reg.pod_name, "agent disconnected");
            self.book.changed.notify_waiters();
        }
    }

    /// Reconcile the first inventory and register the agent with the registry.
    async fn start(
        &self,
        id: &AgentId,
        epoch: u64,
        inbound: &mut Streaming<AgentMessage>,
    ) -> Result<(), Status> {
        let first = loop {
            match tokio::time::timeout(REGISTER_TIMEOUT, inbound.message()).await {
                Ok(Ok(Some(AgentMessage {
                    msg: Some(In::Inventory(inv)),
                }))) => break inv,
                Ok(Ok(Some(_))) => continue,
                Ok(Ok(None)) => return Err(Status::cancelled("agent went away")),
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err(Status::deadline_exceeded("no inventory within 10 s")),
            }
        };
        let pool = PoolName::parse("register.pool", &self.reg.pool)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        self.gateway.add_agent(
            id.clone(),
            NodeName::from(self.reg.node_name.as_str()),
            Arc::new(self.remote.clone()),
        );
        let (report, kept) = self
            .gateway
            .reconcile(id, records(&first), &pool)
            .await
            .map_err(|e| Status::unavailable(format!("reconciling the agent's inventory: {e}")))?;
        tracing::info!(agent = %id, pod = %self.reg.pod_name, ?report, "agent registered");
        self.remote
            .set_inventory(kept.iter().map(|c| c.id.clone()).collect());
        // A drain outlives reconnects: the pool is scaling this agent down.
        let draining = self.book.get(id).is_some_and(|a| a.draining);
        self.registry
            .report(AgentReport {
                agent: info(&self.reg, !draining, warm_of(&first))?,
                sandboxes: reported(&kept),
            })
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        self.book.agents.insert(
            id.clone(),
            AgentState {
                register: self.reg.clone(),
                connected: true,
                disconnected_at: None,
                used: u32::try_from(kept.len()).unwrap_or(u32::MAX),
                warm: warm_ready(&first),
                draining,
                epoch,
            },
        );
        self.book.drains.insert(id.clone(), self.tx.clone());
        self.book.changed.notify_waiters();
        Ok(())
    }

    async fn serve(&self, id: &AgentId, inbound: &mut Streaming<AgentMessage>) {
        loop {
            let msg = match inbound.message().await {
                Ok(Some(m)) => m,
                Ok(None) => return,
                Err(e) => {
                    tracing::debug!(agent = %id, error = %e, "agent stream ended");
                    return;
                }
            };
            match msg.msg {
                Some(In::Inventory(inv)) => {
                    let recs = records(&inv);
                    self.remote
                        .set_inventory(recs.iter().map(|c| c.id.clone()).collect());
                    let draining = match self.book.agents.get_mut(id) {
                        Some(mut a) => {
                            a.used = u32::try_from(recs.len()).unwrap_or(u32::MAX);
                            a.warm = warm_ready(&inv);
                            a.draining
                        }
                        None => false,
                    };
                    if let Ok(info) = info(&self.reg, !draining, warm_of(&inv)) {
                        let _ = self
                            .registry
                            .report(AgentReport {
                                agent: info,
                                sandboxes: reported(&recs),
                            })
                            .await;
                    }
                    self.book.changed.notify_waiters();
                }
                Some(In::Event(ev)) => {
                    if let Ok(sid) = SandboxId::parse("sandbox_id", &ev.sandbox_id) {
                        self.gateway
                            .phase_changed(PhaseChange {
                                id: sid,
                                phase: phase_from_wire(ev.phase()),
                                exit_code: ev.exit_code,
                            })
                            .await;
                    }
                }
                Some(In::Heartbeat(hb)) => {
                    if let Some(mut a) = self.book.agents.get_mut(id) {
                        a.used = hb.used;
                    }
                }
                Some(In::Register(_)) | None => {}
            }
        }
    }
}
