//! [`Gateway`]: the fast path's logic (create, delete, get, list, update, watch, logs,
//! exec), the startup reconcile and the background sweeps (expiry, unfinished
//! deletes), over a [`SandboxStore`], the registry and the agents.
//!
//! Create, in order: validate -> replay if the request id is recorded -> reserve the
//! name and request id (gateway actor) -> allocate (registry actor) -> STRONG: record
//! -> agent create (bounded by the client's deadline) -> FAST: record in the
//! background, retried with backoff, tracked until it lands. The part after
//! validation runs in its own task (so does a delete), so a client that goes away
//! cannot cut it in half or strand a reservation: it finishes, releases what it
//! took, and a create then removes what it made. Every failure path undoes what
//! was done before it (record, slot, container), so a create either yields a
//! running, recorded sandbox or leaves nothing behind.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use dashmap::DashMap;
use fsb_agent::{SandboxPhase, server::BoxStream, state::PhaseChange, state::SandboxRecord};
use fsb_core::error::HasErrorCode;
use fsb_core::{
    AgentId, ImageRef, NamespaceName, NodeName, PoolName, RequestId, SandboxId, SandboxName,
    ValidSpec,
    spec::{FailurePolicy, SpecDigest, SpecLimits, validate_labels},
};
use fsb_proto::{agent::v1 as av, fastpath::v1 as fp};
use fsb_registry::{AllocateRequest, RegistryHandle};
use fsb_store::{EventKind, ListFilter, Phase, SandboxStore, StoreError, StoredSandbox};
use futures::StreamExt;
use tokio::sync::{Notify, oneshot};
use tracing::Instrument;

use crate::{
    AgentClient, GatewayError, GatewayHandle, convert,
    state::{Key, Outcome, Reservation},
};

/// Namespace used when a request leaves it empty.
pub const DEFAULT_NAMESPACE: &str = "default";
/// The orphan scan ([`Gateway::collect_orphans`]) runs every this many sweeps
/// (the first at start).
const ORPHAN_SCAN_EVERY: u64 = 10;
/// Label put on records rebuilt from a container at startup (see [`Gateway::reconcile`]).
pub const LABEL_ADOPTED: &str = "fast-sandbox.io/adopted";

/// How the gateway behaves.
#[derive(Clone, Debug)]
pub struct GatewayConfig {
    /// Request limits; `agent_port` is the port sandboxes may never take.
    pub limits: SpecLimits,
    /// Mode of creates that name none.
    pub default_mode: fp::ConsistencyMode,
    /// Local mode: pools are not namespaced; allocate in this namespace whatever the
    /// sandbox's namespace is. `None` (Kubernetes): the sandbox's own namespace.
    pub pool_namespace: Option<NamespaceName>,
    /// Attempts to write a FAST create's record before the sandbox is removed.
    pub record_attempts: u32,
    /// First retry delay of a record write (doubled each time up to `record_backoff_max`).
    pub record_backoff: Duration,
    /// Longest retry delay of a record write.
    pub record_backoff_max: Duration,
    /// How often expiry and unfinished deletes are checked.
    pub sweep_interval: Duration,
    /// How long a delete, update or reset waits for a FAST record still being written.
    pub landing_timeout: Duration,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            limits: SpecLimits::default(),
            default_mode: fp::ConsistencyMode::Fast,
            pool_namespace: None,
            record_attempts: 8,
            record_backoff: Duration::from_millis(10),
            record_backoff_max: Duration::from_secs(2),
            sweep_interval: Duration::from_millis(500),
            landing_timeout: Duration::from_secs(30),
        }
    }
}

/// What [`Gateway::reconcile`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReconcileReport {
    /// Records whose container was found running (or exited: phase updated).
    pub confirmed: usize,
    /// Running records whose container is gone: now Lost.
    pub lost: usize,
    /// Records of creates that never finished (Bound, no container) or deletes that
    /// had (Terminating): removed.
    pub removed_records: usize,
    /// Containers without a record whose name was free: record rebuilt.
    pub adopted: usize,
    /// Containers without a record whose name is taken by another sandbox: removed.
    pub removed_containers: usize,
}

/// Counts in-flight background record writes, so shutdown can wait for them.
#[derive(Debug, Default)]
struct Writes {
    count: AtomicUsize,
    idle: Notify,
}

struct WriteGuard(Arc<Writes>);

impl Drop for WriteGuard {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// The fast path. Cheap to clone.
pub struct Gateway<S: SandboxStore> {
    inner: Arc<Inner<S>>,
}

impl<S: SandboxStore> Clone for Gateway<S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<S: SandboxStore> std::fmt::Debug for Gateway<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("agents", &self.inner.agents.len())
            .field("pending", &self.inner.pending.len())
            .finish_non_exhaustive()
    }
}

struct AgentEntry {
    client: Arc<dyn AgentClient>,
    node: NodeName,
}

struct Inner<S> {
    config: GatewayConfig,
    store: S,
    registry: RegistryHandle,
    actor: GatewayHandle,
    agents: DashMap<AgentId, AgentEntry>,
    /// FAST creates answered but not yet recorded, by key: Get, List and exit events
    /// see them here until the record lands.
    pending: DashMap<Key, StoredSandbox>,
    /// Sandboxes whose agent create is in flight, with the exit seen meanwhile. The
    /// agent can report an exit (a process that ends at once, e.g. `true`) before it
    /// answers the create, when neither `pending` nor the store can take it yet; the
    /// exit was lost (FAST: the sandbox showed Running forever) or overwritten by the
    /// create's own Running write (STRONG). The create applies it once it is done.
    starting: DashMap<SandboxId, Option<(Phase, Option<i32>)>>,
    writes: Arc<Writes>,
    accepting: AtomicBool,
}

fn busy(key: &Key) -> GatewayError {
    GatewayError::Busy(format!("{}/{}", key.0, key.1))
}

fn not_found(ns: impl std::fmt::Display, name: impl std::fmt::Display) -> GatewayError {
    GatewayError::NotFound(format!("{ns}/{name}"))
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Builds a create's timeline, stage by stage, relative to when it was received.
struct Timeline {
    received: Instant,
    last: Instant,
    stages: Vec<fp::Stage>,
}

impl Timeline {
    fn new(received: Instant) -> Self {
        Self {
            received,
            last: received,
            stages: Vec::new(),
        }
    }

    /// Close the stage that started where the previous one ended.
    fn stage(&mut self, name: &str) {
        let now = Instant::now();
        self.push(name, self.last, now - self.last);
        self.last = now;
    }

    fn push(&mut self, name: &str, start: Instant, took: Duration) {
        self.stages.push(fp::Stage {
            name: name.to_owned(),
            start_us: micros(start.saturating_duration_since(self.received)),
            duration_us: micros(took),
        });
    }

    /// The agent call: `agent` is its overhead, `runtime` the agent's own work (with its
    /// detailed stages as `runtime.<stage>`).
    fn agent(&mut self, started: Instant, agent: Option<&fp::Timeline>) {
        let now = Instant::now();
        let call = now - started;
        let runtime = Duration::from_micros(agent.map_or(0, |t| t.total_us)).min(call);
        self.push("agent", started, call - runtime);
        let runtime_start = started + (call - runtime);
        self.push("runtime", runtime_start, runtime);
        for s in agent.map(|t| t.stages.as_slice()).unwrap_or_default() {
            self.stages.push(fp::Stage {
                name: format!("runtime.{}", s.name),
                start_us: micros(runtime_start.saturating_duration_since(self.received))
                    + s.start_us,
                duration_us: s.duration_us,
            });
        }
        self.last = now;
    }

    fn finish(self, path: &str, note: String, started_unix_us: u64) -> fp::Timeline {
        fp::Timeline {
            total_us: micros(self.last - self.received),
            stages: self.stages,
            path: path.to_owned(),
            note,
            started_unix_us,
        }
    }
}

impl<S: SandboxStore> Gateway<S> {
    /// A gateway over `store` and `registry`. Creates are refused until
    /// [`Self::start_serving`] (call it after [`Self::reconcile`]).
    pub fn new(config: GatewayConfig, store: S, registry: RegistryHandle) -> Self {
        Self {
            inner: Arc::new(Inner {
                config,
                store,
                registry,
                actor: GatewayHandle::start(),
                agents: DashMap::new(),
                pending: DashMap::new(),
                starting: DashMap::new(),
                writes: Arc::new(Writes::default()),
                accepting: AtomicBool::new(false),
            }),
        }
    }

    /// The store.
    pub fn store(&self) -> &S {
        &self.inner.store
    }

    /// Make an agent reachable (its registry registration is the caller's).
    pub fn add_agent(&self, id: AgentId, node: NodeName, client: Arc<dyn AgentClient>) {
        self.inner.agents.insert(id, AgentEntry { client, node });
    }

    /// Accept creates (after reconciling).
    pub fn start_serving(&self) {
        self.inner.accepting.store(true, Ordering::Release);
    }

    /// Refuse new creates (shutdown).
    pub fn stop_serving(&self) {
        self.inner.accepting.store(false, Ordering::Release);
    }

    /// Wait until no record write is in flight, at most `timeout`; false if some are
    /// still running (their sandboxes are then adopted by the next start).
    pub async fn drain(&self, timeout: Duration) -> bool {
        let writes = &self.inner.writes;
        tokio::time::timeout(timeout, async {
            loop {
                let idle = writes.idle.notified();
                if writes.count.load(Ordering::Acquire) == 0 {
                    return;
                }
                idle.await;
            }
        })
        .await
        .is_ok()
    }

    /// Records still being written (FAST creates answered, not yet recorded).
    pub fn unrecorded(&self) -> usize {
        self.inner.pending.len()
    }

    fn client(&self, agent: &AgentId) -> Result<(Arc<dyn AgentClient>, NodeName), GatewayError> {
        self.inner
            .agents
            .get(agent)
            .map(|e| (e.client.clone(), e.node.clone()))
            .ok_or_else(|| GatewayError::AgentGone(agent.to_string()))
    }

    fn key(namespace: &str, name: &str) -> Result<Key, GatewayError> {
        let ns = if namespace.is_empty() {
            DEFAULT_NAMESPACE
        } else {
            namespace
        };
        Ok((
            NamespaceName::parse("namespace", ns)?,
            SandboxName::parse("name", name)?,
        ))
    }

    // ---- create ---------------------------------------------------------------

    /// Create a sandbox. `deadline` is the client's remaining time (grpc-timeout).
    /// Every answer is counted in `fsb_creates_total` (mode, `ok` or the error code).
    pub async fn create(
        &self,
        req: fp::CreateRequest,
        deadline: Option<Duration>,
    ) -> Result<fp::CreateResponse, GatewayError> {
        let mode = match req.mode() {
            fp::ConsistencyMode::Unspecified => self.inner.config.default_mode,
            m => m,
        };
        let result = self.create_counted(req, mode, deadline).await;
        fsb_telemetry::metrics().count_create(
            fsb_telemetry::metrics::mode_label(mode == fp::ConsistencyMode::Strong),
            result.as_ref().map(|_| ()).map_err(|e| e.error_code()),
        );
        result
    }

    async fn create_counted(
        &self,
        req: fp::CreateRequest,
        mode: fp::ConsistencyMode,
        deadline: Option<Duration>,
    ) -> Result<fp::CreateResponse, GatewayError> {
        let received = Instant::now();
        let mut timeline = Timeline::new(received);
        if !self.inner.accepting.load(Ordering::Acquire) {
            return Err(GatewayError::NotServing("starting or shutting down"));
        }
        let request_id = RequestId::parse("request_id", &req.request_id)?;
        let namespace = if req.namespace.is_empty() {
            DEFAULT_NAMESPACE.to_owned()
        } else {
            req.namespace.clone()
        };
        let Some(wire) = req.spec else {
            return Err(GatewayError::Invalid {
                field: "spec",
                reason: "required".into(),
            });
        };
        let expire_time_ms = match (&req.ttl, &wire.expire_time) {
            (Some(_), Some(_)) => {
                return Err(GatewayError::Invalid {
                    field: "ttl",
                    reason: "set either ttl or spec.expire_time, not both".into(),
                });
            }
            (Some(ttl), None) => match convert::duration(ttl) {
                Some(d) if !d.is_zero() => Some(
                    convert::now_ms()
                        .saturating_add(i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
                ),
                _ => {
                    return Err(GatewayError::Invalid {
                        field: "ttl",
                        reason: "must be positive".into(),
                    });
                }
            },
            (None, Some(t)) => Some(convert::millis(t)),
            (None, None) => None,
        };
        let reset_revision = wire.reset_revision;
        let mut core =
            fsb_agent::server::core_spec(&namespace, &req.name, wire, fp::Runtime::Unspecified);
        core.labels = req.labels.into_iter().collect();
        let spec = core.validate(&self.inner.config.limits)?;
        let digest = spec.digest();
        timeline.stage("validate");

        // The rest runs detached from the caller: tonic drops a handler's future when
        // its client cancels or its deadline passes, and a future dropped between
        // taking the reservation and handing the work to a task would keep the name
        // and request id reserved forever (every later create of that name: Busy).
        // Detached, the work always ends by releasing what it took; if the client is
        // gone by then, the sandbox it will never learn about is removed.
        let (tx, rx) = oneshot::channel();
        let this = self.clone();
        let validated = Validated {
            request_id,
            mode,
            spec,
            digest,
            expire_time_ms,
            reset_revision,
            deadline: deadline.map(|d| received + d),
            timeline,
        };
        tokio::spawn(async move {
            let (result, made) = match this.create_detached(validated).await {
                Ok((resp, made)) => (Ok(resp), made),
                Err(e) => (Err(e), None),
            };
            if let (Err(Ok(_)), Some(key)) = (tx.send(result), made) {
                // The client went away: undo the create it will never learn about.
                tracing::info!(sandbox = %key.1, namespace = %key.0, "client cancelled; removing its sandbox");
                if let Err(e) = this.delete(key.0.as_str(), key.1.as_str(), Some(0)).await {
                    tracing::warn!(error = %e, "removing a cancelled create failed; the sweeper retries");
                }
            }
        }.in_current_span());
        rx.await
            .map_err(|_| GatewayError::Internal("create task ended without answering".into()))?
    }

    /// A validated create, detached from its caller: replay, reserve, create. Returns
    /// the answer and, if this call made a new sandbox, its key.
    async fn create_detached(
        &self,
        v: Validated,
    ) -> Result<(fp::CreateResponse, Option<Key>), GatewayError> {
        let Validated {
            request_id,
            mode,
            spec,
            digest,
            expire_time_ms,
            reset_revision,
            deadline,
            timeline,
        } = v;
        if let Some(rec) = self.inner.store.get_by_request_id(&request_id).await? {
            return replay(&rec, digest, mode).map(|r| (r, None));
        }
        let sandbox_id = SandboxId::generate();
        let name = match &spec.name {
            Some(n) => n.clone(),
            None => SandboxName::parse("name", &format!("sbx-{}", &sandbox_id.as_str()[..10]))?,
        };
        let key: Key = (spec.namespace.clone(), name);
        // A name held by a delete, reset or sweep is free again in moments: wait for
        // it (as deletes do, bounded, and never past the client's deadline) rather
        // than fail a create that follows a finished delete because background work
        // still touched the name.
        let wait_until = (Instant::now() + Duration::from_secs(5))
            .min(deadline.unwrap_or_else(|| Instant::now() + Duration::from_secs(5)));
        loop {
            match self
                .inner
                .actor
                .reserve_create(key.clone(), request_id.clone(), digest)
                .await?
            {
                Reservation::Granted => break,
                Reservation::InFlight(rx) => {
                    return wait_outcome(rx, mode).await.map(|r| (r, None));
                }
                Reservation::NameBusy if Instant::now() < wait_until => {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Reservation::NameBusy => return Err(busy(&key)),
                Reservation::RequestIdReused { key: other } => {
                    return Err(GatewayError::AlreadyExists(format!(
                        "request_id: {request_id} is creating {}/{} with a different spec",
                        other.0, other.1
                    )));
                }
            }
        }
        // The name may exist already (created earlier, or recorded by a FAST create
        // that landed after our request-id lookup).
        let existing = match self.inner.store.get(&key.0, &key.1).await {
            Ok(r) => r,
            Err(e) => {
                self.inner.actor.release(key.clone());
                return Err(e.into());
            }
        };
        if existing.is_some() {
            self.inner.actor.release(key.clone());
            if let Some(rec) = self.inner.store.get_by_request_id(&request_id).await? {
                return replay(&rec, digest, mode).map(|r| (r, None));
            }
            return Err(GatewayError::AlreadyExists(format!(
                "sandbox {}/{} already exists",
                key.0, key.1
            )));
        }

        let work = Create {
            key: key.clone(),
            request_id,
            sandbox_id,
            spec,
            expire_time_ms,
            reset_revision,
            mode,
            deadline,
            timeline,
        };
        let result = self.create_reserved(work).await;
        let actor = &self.inner.actor;
        match &result {
            Ok((resp, recorded)) => {
                actor.publish(key.clone(), Outcome::Done(Box::new(resp.clone())));
                // A FAST create keeps its reservation until the record lands.
                if *recorded {
                    actor.release(key.clone());
                }
            }
            Err(e) => {
                let code = fsb_core::error::to_status(e).code();
                actor.publish(key.clone(), Outcome::Failed(code, e.to_string()));
                actor.release(key.clone());
            }
        }
        result.map(|(resp, _)| (resp, Some(key)))
    }

    /// The create after its reservation. Returns the answer and whether the record is
    /// already durable (STRONG); on error everything done is undone and the
    /// reservation is the caller's to release.
    async fn create_reserved(
        &self,
        mut c: Create,
    ) -> Result<(fp::CreateResponse, bool), GatewayError> {
        let inner = &self.inner;
        let strong = c.mode == fp::ConsistencyMode::Strong;
        let alloc = AllocateRequest {
            request_id: c.request_id.clone(),
            sandbox_id: c.sandbox_id.clone(),
            namespace: inner
                .config
                .pool_namespace
                .clone()
                .unwrap_or_else(|| c.key.0.clone()),
            pool: c.spec.pool.clone(),
            image: c.spec.image.clone(),
            ports: c.spec.ports.clone(),
            digest: c.spec.digest(),
            runtime: c.spec.runtime,
            claimable: c.spec.warm_claimable(c.spec.runtime),
        };
        let placement = inner.registry.allocate(alloc.clone()).await?;
        let placement = placement.into_result(&alloc)?;
        // The registry assigned a warm instance: the sandbox takes the instance's id,
        // which is how the agent knows which instance to hand the process to.
        c.sandbox_id = placement.sandbox_id.clone();
        c.timeline.stage("allocate");
        let release = || {
            inner
                .registry
                .release(c.sandbox_id.clone(), placement.agent.clone())
        };
        let (client, node) = match self.client(&placement.agent) {
            Ok(x) => x,
            Err(e) => {
                let _ = release().await;
                return Err(e);
            }
        };
        let mut record = StoredSandbox {
            namespace: c.key.0.clone(),
            name: c.key.1.clone(),
            uid: uuid::Uuid::new_v4().to_string(),
            sandbox_id: c.sandbox_id.clone(),
            request_id: Some(c.request_id.clone()),
            spec_digest: c.spec.digest(),
            spec: c.spec.clone(),
            labels: c.spec.labels.clone(),
            phase: if strong { Phase::Bound } else { Phase::Running },
            agent: Some(placement.agent.clone()),
            node: Some(node),
            exit_code: None,
            expire_time_ms: c.expire_time_ms,
            reset_revision: c.reset_revision,
            accepted_reset_revision: c.reset_revision,
            timeline: None,
            created_ms: convert::now_ms(),
            resource_version: 0,
        };
        if strong {
            match inner.store.create(record.clone()).await {
                Ok(stored) => record = stored,
                Err(e) => {
                    let _ = release().await;
                    return Err(e.into());
                }
            }
            c.timeline.stage("record");
        }

        let agent_req = av::CreateSandboxRequest {
            sandbox_id: c.sandbox_id.to_string(),
            namespace: c.key.0.to_string(),
            name: c.key.1.to_string(),
            claim_uid: record.uid.clone(),
            request_id: c.request_id.to_string(),
            spec: Some(convert::spec(&c.spec, c.expire_time_ms, c.reset_revision)),
            runtime: fp::Runtime::Unspecified as i32,
        };
        inner.starting.insert(c.sandbox_id.clone(), None);
        let started = Instant::now();
        let call = client.create(agent_req);
        let answer = match c.deadline {
            Some(at) => match tokio::time::timeout_at(at.into(), call).await {
                Ok(r) => r.map_err(GatewayError::Agent),
                Err(_) => Err(GatewayError::DeadlineExceeded(format!(
                    "create did not finish within the client's deadline ({} ms); nothing was left behind",
                    at.saturating_duration_since(c.timeline.received)
                        .as_millis()
                ))),
            },
            None => call.await.map_err(GatewayError::Agent),
        };
        let created = match answer {
            Ok(created) => created,
            Err(e) => {
                inner.starting.remove(&c.sandbox_id);
                // The agent runs a delete after its create (same sandbox actor), so this
                // also removes a container whose create outlived our deadline.
                if let Err(d) = client.delete(c.sandbox_id.clone(), Some(0)).await {
                    tracing::warn!(sandbox = %c.sandbox_id, error = %d, "cleanup of a failed create");
                }
                let _ = release().await;
                if strong {
                    let _ = inner.store.delete(&c.key.0, &c.key.1, None).await;
                }
                return Err(e);
            }
        };
        c.timeline.agent(started, created.timeline.as_ref());
        let note = created
            .timeline
            .as_ref()
            .map(|t| t.note.clone())
            .unwrap_or_default();
        let path = created
            .timeline
            .as_ref()
            .map_or("cold", |t| {
                if t.path.is_empty() {
                    "cold"
                } else {
                    t.path.as_str()
                }
            })
            .to_owned();

        let started_unix_us = created.timeline.as_ref().map_or(0, |t| t.started_unix_us);
        let timeline = c.timeline.finish(&path, note, started_unix_us);
        // The record keeps it (STRONG: with the Running write; FAST: in the record
        // writer's write), so Get shows it later.
        record.timeline = Some(convert::stored_timeline(&timeline));

        // Take the exit seen during the agent call only after the record can take
        // later ones (STRONG: written Running; FAST: in `pending`), so none is lost.
        let early = |inner: &Inner<S>| inner.starting.remove(&c.sandbox_id).and_then(|(_, e)| e);
        if strong {
            record.phase = Phase::Running;
            record = self.write_phase(record).await;
            if let Some((phase, exit_code)) = early(inner) {
                record.phase = phase;
                record.exit_code = exit_code;
                record = self.write_phase(record).await;
            }
        } else {
            inner.pending.insert(c.key.clone(), record.clone());
            if let Some((phase, exit_code)) = early(inner) {
                record.phase = phase;
                record.exit_code = exit_code;
                if let Some(mut p) = inner.pending.get_mut(&c.key) {
                    p.phase = phase;
                    p.exit_code = exit_code;
                }
            }
            self.spawn_record_writer(c.key.clone());
        }
        // One line per create; the span adds request id, name and trace id.
        tracing::info!(
            sandbox = %c.sandbox_id,
            agent = %placement.agent,
            path = %path,
            total_us = timeline.total_us,
            "sandbox created"
        );
        fsb_telemetry::metrics().observe_create(
            fsb_telemetry::metrics::mode_label(strong),
            placement.runtime,
            fsb_telemetry::metrics::path_label(&path),
            timeline
                .stages
                .iter()
                .map(|s| (s.name.as_str(), Duration::from_micros(s.duration_us))),
            Duration::from_micros(timeline.total_us),
        );
        let sandbox = convert::sandbox(&record, strong);
        Ok((
            fp::CreateResponse {
                sandbox: Some(sandbox),
                timeline: Some(timeline),
                replayed: false,
                mode: c.mode as i32,
            },
            strong,
        ))
    }

    /// STRONG: move the record to its new phase, re-reading on conflicts. The
    /// container runs either way; a record left Bound is corrected by the next
    /// start's reconcile.
    async fn write_phase(&self, record: StoredSandbox) -> StoredSandbox {
        let mut current = record.clone();
        for _ in 0..5 {
            match self.inner.store.update(current.clone()).await {
                Ok(stored) => return stored,
                Err(e) if e.is_conflict() => {
                    match self.inner.store.get(&record.namespace, &record.name).await {
                        Ok(Some(fresh)) if fresh.sandbox_id == record.sandbox_id => {
                            current = StoredSandbox {
                                phase: record.phase,
                                exit_code: record.exit_code.or(fresh.exit_code),
                                timeline: record.timeline.clone().or(fresh.timeline),
                                ..fresh
                            };
                        }
                        _ => return record,
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, sandbox = %record.sandbox_id, "phase write failed");
                    tokio::time::sleep(self.inner.config.record_backoff).await;
                }
            }
        }
        record
    }

    /// FAST: write the record in the background until it lands; if it cannot, remove
    /// the sandbox (nothing may run unrecorded beyond this).
    fn spawn_record_writer(&self, key: Key) {
        let this = self.clone();
        self.inner.writes.count.fetch_add(1, Ordering::AcqRel);
        let guard = WriteGuard(self.inner.writes.clone());
        tokio::spawn(async move {
            let _guard = guard;
            let inner = &this.inner;
            let mut delay = inner.config.record_backoff;
            let mut last_error = String::new();
            for attempt in 1..=inner.config.record_attempts.max(1) {
                let Some(record) = inner.pending.get(&key).map(|r| r.clone()) else {
                    return;
                };
                match inner.store.create(record.clone()).await {
                    Ok(stored) => {
                        // An exit seen while the write was in flight is applied now.
                        if let Some((_, latest)) = inner.pending.remove(&key)
                            && (latest.phase != stored.phase
                                || latest.exit_code != stored.exit_code)
                        {
                            let _ = this
                                .write_phase(StoredSandbox {
                                    phase: latest.phase,
                                    exit_code: latest.exit_code,
                                    ..stored
                                })
                                .await;
                        }
                        inner.actor.release(key);
                        return;
                    }
                    Err(
                        e @ (StoreError::AlreadyExists { .. }
                        | StoreError::RequestIdTaken { .. }
                        | StoreError::SandboxIdTaken { .. }),
                    ) => {
                        last_error = e.to_string();
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(attempt, error = %e, sandbox = %record.sandbox_id, "record write failed; retrying");
                        last_error = e.to_string();
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(inner.config.record_backoff_max);
                    }
                }
            }
            // Could not record: remove the container and free the slot.
            if let Some((_, record)) = inner.pending.remove(&key) {
                tracing::error!(sandbox = %record.sandbox_id, error = %last_error, "record never landed; removing the sandbox");
                if let Some(agent) = &record.agent {
                    if let Ok((client, _)) = this.client(agent)
                        && let Err(e) = client.delete(record.sandbox_id.clone(), Some(0)).await
                    {
                        tracing::warn!(error = %e, "removing an unrecorded sandbox failed; the next start removes it");
                    }
                    let _ = inner
                        .registry
                        .release(record.sandbox_id.clone(), agent.clone())
                        .await;
                }
            }
            inner.actor.release(key);
        });
    }

    // ---- read -----------------------------------------------------------------

    /// The record of `key` from the store, or a FAST create's answered-but-unrecorded
    /// one (flagged `false`).
    async fn lookup(&self, key: &Key) -> Result<Option<(StoredSandbox, bool)>, GatewayError> {
        if let Some(r) = self.inner.store.get(&key.0, &key.1).await? {
            return Ok(Some((r, true)));
        }
        if let Some(r) = self.inner.pending.get(key) {
            return Ok(Some((r.clone(), false)));
        }
        // The record may have landed between the two lookups.
        Ok(self
            .inner
            .store
            .get(&key.0, &key.1)
            .await?
            .map(|r| (r, true)))
    }

    /// One sandbox.
    pub async fn get(&self, namespace: &str, name: &str) -> Result<fp::Sandbox, GatewayError> {
        let key = Self::key(namespace, name)?;
        let (rec, recorded) = self
            .lookup(&key)
            .await?
            .ok_or_else(|| not_found(&key.0, &key.1))?;
        Ok(convert::sandbox(&rec, recorded))
    }

    /// Sandboxes passing the filter, ordered by (namespace, name).
    pub async fn list(&self, req: fp::ListRequest) -> Result<Vec<fp::Sandbox>, GatewayError> {
        let filter = ListFilter {
            namespace: (!req.namespace.is_empty())
                .then(|| NamespaceName::parse("namespace", &req.namespace))
                .transpose()?,
            pool: (!req.pool_ref.is_empty())
                .then(|| PoolName::parse("pool_ref", &req.pool_ref))
                .transpose()?,
            labels: req.label_selector.into_iter().collect(),
        };
        let mut out: BTreeMap<(String, String), fp::Sandbox> = BTreeMap::new();
        for r in self.inner.pending.iter() {
            if filter.matches(r.value()) {
                out.insert(
                    (r.namespace.to_string(), r.name.to_string()),
                    convert::sandbox(r.value(), false),
                );
            }
        }
        for r in self.inner.store.list(&filter).await? {
            out.insert(
                (r.namespace.to_string(), r.name.to_string()),
                convert::sandbox(&r, true),
            );
        }
        Ok(out.into_values().collect())
    }

    /// Copy what the registry and the store know into the process-wide metrics (a
    /// scrape hook): the registry's counters, slots and warm levels
    /// ([`fsb_registry::metrics::export`]) and the sandboxes by phase (records, and
    /// FAST creates whose record is still being written). A failing source leaves
    /// its families as they were.
    pub async fn export_metrics(&self) {
        match self.inner.registry.snapshot().await {
            Ok(snapshot) => fsb_registry::metrics::export(&snapshot),
            Err(e) => tracing::debug!(error = %e, "metrics: registry snapshot"),
        }
        let mut phases: HashMap<Key, Phase> = self
            .inner
            .pending
            .iter()
            .map(|r| (r.key().clone(), r.value().phase))
            .collect();
        match self.inner.store.list(&ListFilter::default()).await {
            Ok(records) => {
                for r in records {
                    phases.insert((r.namespace, r.name), r.phase);
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "metrics: listing sandboxes");
                return;
            }
        }
        let mut counts = [0u64; Phase::ALL.len()];
        for phase in phases.values() {
            if let Some(i) = Phase::ALL.iter().position(|p| p == phase) {
                counts[i] += 1;
            }
        }
        fsb_telemetry::metrics()
            .set_sandboxes(Phase::ALL.iter().zip(counts).map(|(p, n)| (p.as_str(), n)));
    }

    /// `server` running [`Self::export_metrics`] before each scrape.
    pub fn metrics_hook(
        &self,
        server: fsb_telemetry::MetricsServer,
    ) -> fsb_telemetry::MetricsServer {
        let gateway = self.clone();
        server.on_scrape("gateway", move || {
            let gateway = gateway.clone();
            async move { gateway.export_metrics().await }
        })
    }

    /// Ready warm instances per (namespace, pool, image, runtime) over healthy agents,
    /// after `req`'s namespace and pool filters (labels do not apply), sorted.
    pub async fn warm_levels(
        &self,
        req: &fp::ListRequest,
    ) -> Result<Vec<fp::WarmLevel>, GatewayError> {
        let snapshot = self.inner.registry.snapshot().await?;
        Ok(convert::warm_levels(
            &snapshot,
            &req.namespace,
            &req.pool_ref,
        ))
    }

    /// Slots and warm instances per agent and pool now, after `req`'s namespace and
    /// pool filters (`fsb top`).
    pub async fn usage(&self, req: &fp::UsageRequest) -> Result<fp::UsageResponse, GatewayError> {
        if !req.namespace.is_empty() {
            NamespaceName::parse("namespace", &req.namespace)?;
        }
        if !req.pool_ref.is_empty() {
            PoolName::parse("pool_ref", &req.pool_ref)?;
        }
        let snapshot = self.inner.registry.snapshot().await?;
        Ok(convert::usage(&snapshot, &req.namespace, &req.pool_ref))
    }

    /// Changes, optionally preceded by the current state (as ADDED).
    pub async fn watch(
        &self,
        req: fp::WatchRequest,
    ) -> Result<BoxStream<fp::WatchEvent>, GatewayError> {
        let namespace = (!req.namespace.is_empty())
            .then(|| NamespaceName::parse("namespace", &req.namespace))
            .transpose()?;
        let name = (!req.name.is_empty())
            .then(|| SandboxName::parse("name", &req.name))
            .transpose()?;
        // Subscribe before listing so nothing falls between the two.
        let events = self.inner.store.watch();
        let mut initial = Vec::new();
        if req.send_initial {
            let filter = ListFilter {
                namespace: namespace.clone(),
                ..ListFilter::default()
            };
            for r in self.inner.store.list(&filter).await? {
                if name.as_ref().is_none_or(|n| *n == r.name) {
                    initial.push(Ok(fp::WatchEvent {
                        r#type: fp::watch_event::Type::Added as i32,
                        sandbox: Some(convert::sandbox(&r, true)),
                    }));
                }
            }
        }
        let live = tokio_stream::wrappers::BroadcastStream::new(events).filter_map(move |ev| {
            let (namespace, name) = (namespace.clone(), name.clone());
            async move {
                let ev = match ev {
                    Ok(ev) => ev,
                    Err(_) => {
                        return Some(Err(tonic::Status::aborted(
                            "watch fell behind; list and watch again",
                        )));
                    }
                };
                let r = &ev.record;
                if namespace.as_ref().is_some_and(|n| *n != r.namespace)
                    || name.as_ref().is_some_and(|n| *n != r.name)
                {
                    return None;
                }
                let kind = match ev.kind {
                    EventKind::Added => fp::watch_event::Type::Added,
                    EventKind::Modified => fp::watch_event::Type::Modified,
                    EventKind::Deleted => fp::watch_event::Type::Deleted,
                };
                Some(Ok(fp::WatchEvent {
                    r#type: kind as i32,
                    sandbox: Some(convert::sandbox(r, true)),
                }))
            }
        });
        Ok(Box::pin(futures::stream::iter(initial).chain(live)))
    }

    /// The agent and sandbox id behind a running (or exited) sandbox.
    async fn target(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<(Arc<dyn AgentClient>, SandboxId), GatewayError> {
        let key = Self::key(namespace, name)?;
        let (rec, _) = self
            .lookup(&key)
            .await?
            .ok_or_else(|| not_found(&key.0, &key.1))?;
        let agent = match (&rec.agent, rec.phase) {
            (Some(a), Phase::Bound | Phase::Running | Phase::Succeeded | Phase::Failed) => a,
            (_, phase) => {
                return Err(GatewayError::FailedPrecondition(format!(
                    "sandbox {}/{} is {phase}: it has no container",
                    key.0, key.1
                )));
            }
        };
        Ok((self.client(agent)?.0, rec.sandbox_id))
    }

    /// The sandbox's logs, through its agent.
    pub async fn logs(
        &self,
        req: fp::LogsRequest,
    ) -> Result<BoxStream<fp::LogChunk>, GatewayError> {
        let (client, id) = self.target(&req.namespace, &req.name).await?;
        client
            .logs(av::LogsRequest {
                sandbox_id: id.to_string(),
                follow: req.follow,
                tail_lines: req.tail_lines,
            })
            .await
            .map_err(GatewayError::Agent)
    }

    /// Run a process in the sandbox, through its agent. `start` is the first message;
    /// `rest` the client's following ones.
    pub async fn exec(
        &self,
        start: fp::ExecStart,
        rest: BoxStream<fp::ExecRequest>,
    ) -> Result<BoxStream<fp::ExecResponse>, GatewayError> {
        use av::exec_request::Msg as Out;
        use fp::exec_request::Msg as In;
        let envs: Vec<_> = start
            .envs
            .iter()
            .map(|e| fsb_core::spec::EnvVar {
                name: e.name.clone(),
                value: e.value.clone(),
            })
            .collect();
        fsb_core::spec::validate_exec(
            &start.command,
            &envs,
            &start.working_dir,
            &self.inner.config.limits,
        )?;
        let (client, id) = self.target(&start.namespace, &start.name).await?;
        let first = av::ExecRequest {
            msg: Some(Out::Start(av::ExecStart {
                sandbox_id: id.to_string(),
                command: start.command,
                envs: start.envs,
                working_dir: start.working_dir,
                tty: start.tty,
                stdin: start.stdin,
            })),
        };
        let rest = rest.filter_map(|m| async move {
            match m {
                Ok(fp::ExecRequest { msg: Some(msg) }) => Some(Ok(av::ExecRequest {
                    msg: Some(match msg {
                        In::Stdin(b) => Out::Stdin(b),
                        In::CloseStdin(b) => Out::CloseStdin(b),
                        In::Resize(s) => Out::Resize(s),
                        In::Start(_) => return None,
                    }),
                })),
                Ok(fp::ExecRequest { msg: None }) => None,
                Err(e) => Some(Err(e)),
            }
        });
        let input = Box::pin(futures::stream::iter([Ok(first)]).chain(rest));
        client.exec(input).await.map_err(GatewayError::Agent)
    }

    // ---- change ---------------------------------------------------------------

    /// Wait until a FAST create's record of `key` has landed (or was given up).
    async fn wait_landed(&self, key: &Key) -> Result<(), GatewayError> {
        let until = Instant::now() + self.inner.config.landing_timeout;
        while self.inner.pending.contains_key(key) {
            if Instant::now() > until {
                return Err(busy(key));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(())
    }

    /// Hold `key` exclusively for `op` (waiting briefly if a create or another
    /// operation holds it).
    async fn exclusive<T, F>(&self, key: &Key, op: F) -> Result<T, GatewayError>
    where
        F: std::future::Future<Output = Result<T, GatewayError>>,
    {
        self.wait_landed(key).await?;
        let until = Instant::now() + Duration::from_secs(5);
        while !self.inner.actor.reserve_op(key.clone()).await? {
            if Instant::now() > until {
                return Err(busy(key));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let result = op.await;
        self.inner.actor.release(key.clone());
        result
    }

    /// Like [`Self::exclusive`], but `None` at once if `key` is held or its FAST record
    /// is still being written. For the sweeper: whoever holds the key is doing the
    /// work. A sweep that waited instead took the key the moment a client's delete
    /// released it, so the client's next create of that name failed with Busy.
    async fn try_exclusive<T, F>(&self, key: &Key, op: F) -> Result<Option<T>, GatewayError>
    where
        F: std::future::Future<Output = Result<T, GatewayError>>,
    {
        if self.inner.pending.contains_key(key) || !self.inner.actor.reserve_op(key.clone()).await?
        {
            return Ok(None);
        }
        let result = op.await;
        self.inner.actor.release(key.clone());
        result.map(Some)
    }

    /// Delete: Terminating, stop and remove the container (SIGTERM, grace, SIGKILL),
    /// free the slot, remove the record. If the agent fails, the record stays
    /// Terminating and the sweeper retries; the slot is freed only once the container
    /// is proven gone.
    pub async fn delete(
        &self,
        namespace: &str,
        name: &str,
        grace_seconds: Option<u32>,
    ) -> Result<(), GatewayError> {
        let key = Self::key(namespace, name)?;
        fsb_core::spec::validate_grace(
            "grace_period_seconds",
            grace_seconds,
            &self.inner.config.limits,
        )?;
        // Detached from the caller, like create: a handler future dropped while it
        // holds the name (client cancelled, deadline passed) would never release it,
        // leaving the sandbox Terminating for good (the sweeper could not take it
        // either). An accepted delete runs to its end; a cancelled caller just does
        // not hear how it went.
        let this = self.clone();
        tokio::spawn(async move {
            this.exclusive(&key, this.delete_held(&key, grace_seconds))
                .await
        })
        .await
        .map_err(|e| GatewayError::Internal(format!("delete task failed: {e}")))?
    }

    async fn delete_held(&self, key: &Key, grace: Option<u32>) -> Result<(), GatewayError> {
        let store = &self.inner.store;
        let mut rec = store
            .get(&key.0, &key.1)
            .await?
            .ok_or_else(|| not_found(&key.0, &key.1))?;
        if let Some(agent) = rec.agent.clone() {
            // Written even when the record already reads Terminating: a store may read
            // a delete asked for elsewhere as Terminating before its status says so
            // (Kubernetes: kubectl's deletionTimestamp), and the durable phase must say
            // Terminating while the process gets its grace period.
            rec.phase = Phase::Terminating;
            rec = store.update(rec).await?;
            self.remove_container(&agent, &rec.sandbox_id, grace)
                .await?;
            tracing::info!(namespace = %key.0, name = %key.1, sandbox = %rec.sandbox_id, "container removed; removing the record");
        } else {
            tracing::info!(namespace = %key.0, name = %key.1, "no agent holds it; removing the record");
        }
        store.delete(&key.0, &key.1, None).await?;
        Ok(())
    }

    /// Remove a container and free its slot; NotFound on the agent counts as removed.
    async fn remove_container(
        &self,
        agent: &AgentId,
        id: &SandboxId,
        grace: Option<u32>,
    ) -> Result<(), GatewayError> {
        let (client, _) = self.client(agent)?;
        client
            .delete(id.clone(), grace)
            .await
            .map_err(GatewayError::Agent)?;
        let _ = self.inner.registry.release(id.clone(), agent.clone()).await;
        Ok(())
    }

    /// Update expiry, reset revision, failure policy, recovery timeout or labels. A
    /// higher reset revision restarts the sandbox in the background;
    /// `accepted_reset_revision` echoes it once done.
    pub async fn update(&self, req: fp::UpdateRequest) -> Result<fp::Sandbox, GatewayError> {
        let key = Self::key(&req.namespace, &req.name)?;
        if req.expire_time.is_some() && req.clear_expire_time {
            return Err(GatewayError::Invalid {
                field: "expire_time",
                reason: "set expire_time or clear_expire_time, not both".into(),
            });
        }
        if req.recovery_timeout_seconds == Some(0) {
            return Err(GatewayError::Invalid {
                field: "recovery_timeout_seconds",
                reason: "must be >= 1".into(),
            });
        }
        let policy = match req.failure_policy.map(fp::FailurePolicy::try_from) {
            None => None,
            Some(Ok(fp::FailurePolicy::Unspecified | fp::FailurePolicy::Manual)) => {
                Some(FailurePolicy::Manual)
            }
            Some(Ok(fp::FailurePolicy::AutoRecreate)) => Some(FailurePolicy::AutoRecreate),
            Some(Err(_)) => {
                return Err(GatewayError::Invalid {
                    field: "failure_policy",
                    reason: "unknown value".into(),
                });
            }
        };
        self.wait_landed(&key).await?;
        let store = &self.inner.store;
        let mut attempts = 0;
        let updated = loop {
            attempts += 1;
            let mut rec = store
                .get(&key.0, &key.1)
                .await?
                .ok_or_else(|| not_found(&key.0, &key.1))?;
            if let Some(t) = &req.expire_time {
                rec.expire_time_ms = Some(convert::millis(t));
            }
            if req.clear_expire_time {
                rec.expire_time_ms = None;
            }
            if let Some(r) = req.reset_revision {
                if r < rec.reset_revision {
                    return Err(GatewayError::Invalid {
                        field: "reset_revision",
                        reason: format!("must not decrease (is {})", rec.reset_revision),
                    });
                }
                rec.reset_revision = r;
            }
            if let Some(p) = policy {
                rec.spec.failure_policy = p;
            }
            if let Some(t) = req.recovery_timeout_seconds {
                rec.spec.recovery_timeout_seconds = t;
            }
            if let Some(patch) = &req.labels {
                for k in &patch.remove {
                    rec.labels.remove(k);
                }
                for (k, v) in &patch.set {
                    rec.labels.insert(k.clone(), v.clone());
                }
                rec.labels = validate_labels(&rec.labels, &self.inner.config.limits)?;
            }
            match store.update(rec).await {
                Ok(r) => break r,
                Err(e) if e.is_conflict() && attempts < 5 => continue,
                Err(e) => return Err(e.into()),
            }
        };
        if updated.reset_revision > updated.accepted_reset_revision
            && updated.agent.is_some()
            && matches!(
                updated.phase,
                Phase::Running | Phase::Succeeded | Phase::Failed
            )
        {
            let this = self.clone();
            let key = key.clone();
            tokio::spawn(async move {
                if let Err(e) = this.exclusive(&key, this.reset_held(&key)).await {
                    tracing::warn!(namespace = %key.0, name = %key.1, error = %e, "reset failed");
                }
            });
        }
        Ok(convert::sandbox(&updated, true))
    }

    /// Restart a sandbox in place: same id, agent, slot and ports, a fresh container.
    async fn reset_held(&self, key: &Key) -> Result<(), GatewayError> {
        let store = &self.inner.store;
        let Some(rec) = store.get(&key.0, &key.1).await? else {
            return Ok(());
        };
        let Some(agent) = rec.agent.clone() else {
            return Ok(());
        };
        if rec.reset_revision <= rec.accepted_reset_revision {
            return Ok(());
        }
        let (client, _) = self.client(&agent)?;
        client
            .delete(rec.sandbox_id.clone(), None)
            .await
            .map_err(GatewayError::Agent)?;
        let created = client.create(agent_create(&rec)).await;
        let revision = rec.reset_revision;
        let (phase, result) = match created {
            Ok(_) => (Phase::Running, Ok(())),
            Err(e) => (Phase::Failed, Err(GatewayError::Agent(e))),
        };
        for _ in 0..5 {
            let Some(mut fresh) = store.get(&key.0, &key.1).await? else {
                break;
            };
            fresh.phase = phase;
            fresh.exit_code = None;
            if phase == Phase::Running {
                fresh.accepted_reset_revision = revision;
            }
            match store.update(fresh).await {
                Ok(_) => break,
                Err(e) if e.is_conflict() => continue,
                Err(e) => return Err(e.into()),
            }
        }
        result
    }

    /// A sandbox's process exited (or it changed phase otherwise) on `agent`.
    pub async fn phase_changed(&self, change: PhaseChange) {
        let phase = match change.phase {
            SandboxPhase::Succeeded => Phase::Succeeded,
            SandboxPhase::Failed => Phase::Failed,
            SandboxPhase::Creating | SandboxPhase::Running | SandboxPhase::Deleting => return,
        };
        if let Some(mut early) = self.inner.starting.get_mut(&change.id) {
            *early = Some((phase, change.exit_code));
            return;
        }
        for mut p in self.inner.pending.iter_mut() {
            if p.sandbox_id == change.id {
                p.phase = phase;
                p.exit_code = change.exit_code;
            }
        }
        for _ in 0..5 {
            let rec = match self.inner.store.get_by_sandbox_id(&change.id).await {
                Ok(Some(r)) => r,
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "exit event: store lookup failed");
                    return;
                }
            };
            if !matches!(rec.phase, Phase::Bound | Phase::Running) {
                return;
            }
            match self
                .inner
                .store
                .update(StoredSandbox {
                    phase,
                    exit_code: change.exit_code,
                    ..rec
                })
                .await
            {
                Ok(_) => return,
                Err(e) if e.is_conflict() => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "exit event: store update failed");
                    return;
                }
            }
        }
    }

    // ---- records made elsewhere (Kubernetes: kubectl) --------------------------

    /// Place a Pending record that no create made (a Sandbox created with kubectl, or
    /// one waiting for recreation): allocate, write Bound with its agent (so a crash
    /// mid-create is found by the agent's reconcile), create the container, write
    /// Running. On failure everything is undone, the record is Pending again and the
    /// error says why (no pool, no free slot, port conflict, agent error). `Ok(false)`
    /// if there was nothing to place.
    pub async fn place(&self, namespace: &str, name: &str) -> Result<bool, GatewayError> {
        let key = Self::key(namespace, name)?;
        let this = self.clone();
        tokio::spawn(async move {
            match this.try_exclusive(&key, this.place_held(&key)).await {
                Ok(Some(placed)) => Ok(placed),
                Ok(None) => Ok(false),
                Err(e) => Err(e),
            }
        })
        .await
        .map_err(|e| GatewayError::Internal(format!("place task failed: {e}")))?
    }

    async fn place_held(&self, key: &Key) -> Result<bool, GatewayError> {
        let inner = &self.inner;
        let store = &inner.store;
        let Some(mut rec) = store.get(&key.0, &key.1).await? else {
            return Ok(false);
        };
        if rec.phase != Phase::Pending || rec.agent.is_some() {
            return Ok(false);
        }
        // The registry's idempotency key: the record's own, or one derived from its
        // sandbox id (a kubectl create has no request id).
        let request_id = match &rec.request_id {
            Some(r) => r.clone(),
            None => RequestId::parse("request_id", &format!("place-{}", rec.sandbox_id))?,
        };
        let alloc = AllocateRequest {
            request_id,
            sandbox_id: rec.sandbox_id.clone(),
            namespace: inner
                .config
                .pool_namespace
                .clone()
                .unwrap_or_else(|| key.0.clone()),
            pool: rec.spec.pool.clone(),
            image: rec.spec.image.clone(),
            ports: rec.spec.ports.clone(),
            digest: rec.spec.digest(),
            runtime: None,
            claimable: false,
        };
        let placement = inner
            .registry
            .allocate(alloc.clone())
            .await?
            .into_result(&alloc)?;
        let agent = placement.agent.clone();
        let sandbox_id = rec.sandbox_id.clone();
        let release = || inner.registry.release(sandbox_id.clone(), agent.clone());
        let (client, node) = match self.client(&agent) {
            Ok(x) => x,
            Err(e) => {
                let _ = release().await;
                return Err(e);
            }
        };
        rec.phase = Phase::Bound;
        rec.agent = Some(agent.clone());
        rec.node = Some(node);
        rec.exit_code = None;
        rec = match store.update(rec).await {
            Ok(r) => r,
            Err(e) => {
                let _ = release().await;
                return Err(e.into());
            }
        };
        inner.starting.insert(rec.sandbox_id.clone(), None);
        let answer = client.create(agent_create(&rec)).await;
        if let Err(e) = answer {
            inner.starting.remove(&rec.sandbox_id);
            if let Err(d) = client.delete(rec.sandbox_id.clone(), Some(0)).await {
                tracing::warn!(sandbox = %rec.sandbox_id, error = %d, "cleanup of a failed placement");
            }
            let _ = release().await;
            rec.phase = Phase::Pending;
            rec.agent = None;
            rec.node = None;
            let _ = self.write_phase(rec).await;
            return Err(GatewayError::Agent(e));
        }
        rec.phase = Phase::Running;
        rec.accepted_reset_revision = rec.reset_revision;
        let mut rec = self.write_phase(rec).await;
        if let Some((phase, exit_code)) =
            inner.starting.remove(&rec.sandbox_id).and_then(|(_, e)| e)
        {
            rec.phase = phase;
            rec.exit_code = exit_code;
            self.write_phase(rec).await;
        }
        Ok(true)
    }

    /// Make a Lost record Pending again under a fresh sandbox id, to be placed on
    /// another agent (AutoRecreate; the caller decides when). `Ok(false)` if it is
    /// not Lost (any more).
    pub async fn recreate(&self, namespace: &str, name: &str) -> Result<bool, GatewayError> {
        let key = Self::key(namespace, name)?;
        self.exclusive(&key, async {
            let store = &self.inner.store;
            let Some(mut rec) = store.get(&key.0, &key.1).await? else {
                return Ok(false);
            };
            if rec.phase != Phase::Lost {
                return Ok(false);
            }
            if let Some(agent) = rec.agent.take() {
                // Its old container, if the agent ever comes back, is an orphan.
                let _ = self
                    .inner
                    .registry
                    .release(rec.sandbox_id.clone(), agent)
                    .await;
            }
            rec.sandbox_id = SandboxId::generate();
            rec.phase = Phase::Pending;
            rec.node = None;
            rec.exit_code = None;
            // The timeline was the lost container's start.
            rec.timeline = None;
            store.update(rec).await?;
            Ok(true)
        })
        .await
    }

    /// Forget an agent proven gone (its pod is gone, or it stayed disconnected past
    /// the controller's bound): its slots are released, its sandboxes go Lost without
    /// an agent (their containers went with it, or the janitor removes them), and
    /// deletes waiting on it finish. Returns how many records changed.
    pub async fn lose_agent(&self, agent: &AgentId) -> Result<usize, GatewayError> {
        self.inner.agents.remove(agent);
        let _ = self.inner.registry.agent_lost(agent.clone()).await;
        let mut changed = 0;
        for rec in self.inner.store.list(&ListFilter::default()).await? {
            if rec.agent.as_ref() != Some(agent) {
                continue;
            }
            let key = (rec.namespace.clone(), rec.name.clone());
            let result = self
                .exclusive(&key, async {
                    let store = &self.inner.store;
                    let Some(mut rec) = store.get(&key.0, &key.1).await? else {
                        return Ok(());
                    };
                    if rec.agent.as_ref() != Some(agent) {
                        return Ok(());
                    }
                    if rec.phase == Phase::Terminating {
                        store.delete(&key.0, &key.1, None).await?;
                        return Ok(());
                    }
                    rec.phase = Phase::Lost;
                    rec.agent = None;
                    rec.node = None;
                    store.update(rec).await?;
                    Ok(())
                })
                .await;
            match result {
                Ok(()) => changed += 1,
                Err(e) => {
                    tracing::warn!(namespace = %key.0, name = %key.1, error = %e, "marking a sandbox Lost")
                }
            }
        }
        Ok(changed)
    }

    /// Whether an agent is reachable now.
    pub fn has_agent(&self, agent: &AgentId) -> bool {
        self.inner.agents.contains_key(agent)
    }

    // ---- background -----------------------------------------------------------

    /// One sweep: expire sandboxes past their expire time (container removed, record
    /// kept as Expired without agent or sandbox id) and finish deletes left
    /// Terminating. Returns how many sandboxes it acted on.
    pub async fn sweep(&self) -> Result<usize, GatewayError> {
        let now = convert::now_ms();
        let mut acted = 0;
        for rec in self.inner.store.list(&ListFilter::default()).await? {
            let key = (rec.namespace.clone(), rec.name.clone());
            let expired = rec.expire_time_ms.is_some_and(|t| t <= now)
                && !matches!(rec.phase, Phase::Expired | Phase::Terminating);
            let reset = rec.reset_revision > rec.accepted_reset_revision
                && rec.agent.is_some()
                && matches!(rec.phase, Phase::Running | Phase::Succeeded | Phase::Failed);
            let result = if expired {
                self.try_exclusive(&key, self.expire_held(&key)).await
            } else if rec.phase == Phase::Terminating {
                self.try_exclusive(&key, self.delete_held(&key, None)).await
            } else if reset {
                // Asked for by writing the record directly (kubectl edits resetRevision).
                self.try_exclusive(&key, self.reset_held(&key)).await
            } else {
                continue;
            };
            match result {
                Ok(Some(())) => acted += 1,
                // Gone since the listing (a client's delete finished first): nothing to do.
                Ok(None)
                | Err(GatewayError::NotFound(_))
                | Err(GatewayError::Store(StoreError::NotFound { .. })) => {}
                Err(e) => tracing::warn!(namespace = %key.0, name = %key.1, error = %e, "sweep"),
            }
        }
        Ok(acted)
    }

    async fn expire_held(&self, key: &Key) -> Result<(), GatewayError> {
        let store = &self.inner.store;
        let Some(mut rec) = store.get(&key.0, &key.1).await? else {
            return Ok(());
        };
        if rec.expire_time_ms.is_none_or(|t| t > convert::now_ms())
            || matches!(rec.phase, Phase::Expired | Phase::Terminating)
        {
            return Ok(());
        }
        if let Some(agent) = rec.agent.clone() {
            self.remove_container(&agent, &rec.sandbox_id, None).await?;
        }
        rec.phase = Phase::Expired;
        rec.agent = None;
        rec.node = None;
        store.update(rec).await?;
        Ok(())
    }

    /// Remove containers that no record, pending FAST record or create in flight
    /// accounts for. After the startup reconcile every container this process makes
    /// is tracked from its create on, so such a container was never acknowledged: it
    /// is a create a previous (killed) process had sent and containerd finished after
    /// our startup listing. Left alone it would hold a port the registry does not know
    /// and be adopted, under a name since reused, by the next start. Returns how many
    /// were removed.
    pub async fn collect_orphans(&self) -> usize {
        let inner = &self.inner;
        let agents: Vec<(AgentId, Arc<dyn AgentClient>)> = inner
            .agents
            .iter()
            .map(|e| (e.key().clone(), e.client.clone()))
            .collect();
        let mut removed = 0;
        for (agent, client) in agents {
            let ids = match client.containers().await {
                Ok(ids) => ids,
                Err(e) => {
                    tracing::warn!(%agent, error = %e, "orphan scan: listing containers");
                    continue;
                }
            };
            for id in ids {
                // Checked in the order a create moves through them (each inserts into
                // the next before leaving the previous), so none is missed in transit.
                if inner.starting.contains_key(&id)
                    || inner.pending.iter().any(|p| p.sandbox_id == id)
                {
                    continue;
                }
                match inner.store.get_by_sandbox_id(&id).await {
                    Ok(Some(_)) => continue,
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "orphan scan: store lookup");
                        continue;
                    }
                }
                // A listing may be older than a delete that finished since (a remote
                // agent's last inventory): only a container that was still there counts.
                match client.delete(id.clone(), Some(0)).await {
                    Ok(true) => {
                        tracing::warn!(%agent, sandbox = %id, "removed a container no record accounts for");
                        removed += 1;
                    }
                    Ok(false) => {}
                    Err(e) if e.code() == tonic::Code::NotFound => {}
                    Err(e) => tracing::warn!(sandbox = %id, error = %e, "orphan scan: delete"),
                }
            }
        }
        removed
    }

    /// Sweep every `sweep_interval` until the gateway is dropped. One sweep at a time:
    /// a slow sweep makes the next tick be skipped, never queued.
    pub fn spawn_sweeper(&self) {
        let weak = Arc::downgrade(&self.inner);
        let interval = self.inner.config.sweep_interval;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            let mut round: u64 = 0;
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else { return };
                let gateway = Gateway { inner };
                round += 1;
                if round % ORPHAN_SCAN_EVERY == 1 {
                    gateway.collect_orphans().await;
                }
                if let Err(e) = gateway.sweep().await {
                    tracing::warn!(error = %e, "sweep failed");
                }
            }
        });
    }

    /// Make the store agree with `agent`'s containers before creates are accepted.
    ///
    /// The rule, per record of this agent:
    /// - Running/Bound with its container present: confirmed (phase follows the
    ///   container: Running, or Succeeded/Failed with the exit code);
    /// - Bound without container: the create never finished (it was never answered
    ///   with success), so the record is removed and a retry with the same request id
    ///   starts afresh;
    /// - Running without container: Lost (it was acknowledged; it stays visible);
    /// - Terminating: the delete is finished (container removed if present, record
    ///   removed);
    /// - Expired with a container left: the container is removed.
    ///
    /// Per container without a record: if its name is free, the record is rebuilt from
    /// the container's labels (a FAST create answered before its record landed; it
    /// carries the label `fast-sandbox.io/adopted=true`, its spec shows image, pool and
    /// ports only, and it keeps its request id, so a retry of its create replays); if
    /// the name is taken by another
    /// sandbox, the container is a leftover and is removed.
    ///
    /// Returns the containers that remain (for the registry report).
    pub async fn reconcile(
        &self,
        agent: &AgentId,
        inventory: Vec<SandboxRecord>,
        default_pool: &PoolName,
    ) -> Result<(ReconcileReport, Vec<SandboxRecord>), GatewayError> {
        let store = &self.inner.store;
        let (client, node) = self.client(agent)?;
        let mut report = ReconcileReport::default();
        let mut containers: HashMap<SandboxId, SandboxRecord> =
            inventory.into_iter().map(|c| (c.id.clone(), c)).collect();
        let mut kept = Vec::new();
        for mut rec in store.list(&ListFilter::default()).await? {
            if rec.agent.as_ref() != Some(agent) {
                if let Some(c) = containers.remove(&rec.sandbox_id) {
                    // Expired records have no agent: their container is a leftover.
                    let _ = client.delete(c.id.clone(), Some(0)).await;
                    report.removed_containers += 1;
                }
                continue;
            }
            let container = containers.remove(&rec.sandbox_id);
            match (rec.phase, container) {
                (Phase::Terminating, c) => {
                    if c.is_some() {
                        client
                            .delete(rec.sandbox_id.clone(), None)
                            .await
                            .map_err(GatewayError::Agent)?;
                    }
                    store.delete(&rec.namespace, &rec.name, None).await?;
                    report.removed_records += 1;
                }
                (Phase::Bound, None) if rec.request_id.is_none() => {
                    // Made by kubectl, not by a create call: placed again.
                    rec.phase = Phase::Pending;
                    rec.agent = None;
                    rec.node = None;
                    store.update(rec).await?;
                    report.lost += 1;
                }
                (Phase::Bound, None) => {
                    store.delete(&rec.namespace, &rec.name, None).await?;
                    report.removed_records += 1;
                }
                (Phase::Running, None) => {
                    rec.phase = Phase::Lost;
                    store.update(rec).await?;
                    report.lost += 1;
                }
                (Phase::Bound | Phase::Running, Some(c)) => {
                    let (phase, exit) = match c.phase {
                        SandboxPhase::Succeeded => (Phase::Succeeded, c.exit_code),
                        SandboxPhase::Failed => (Phase::Failed, c.exit_code),
                        _ => (Phase::Running, None),
                    };
                    if rec.phase != phase || rec.exit_code != exit {
                        rec.phase = phase;
                        rec.exit_code = exit;
                        store.update(rec).await?;
                    }
                    report.confirmed += 1;
                    kept.push(c);
                }
                (_, Some(c)) => kept.push(c),
                (_, None) => {}
            }
        }
        for (_, c) in containers {
            match adopt(&c, agent, &node, default_pool) {
                Some(rec) if store.get(&rec.namespace, &rec.name).await?.is_none() => {
                    store.create(rec).await?;
                    report.adopted += 1;
                    kept.push(c);
                }
                _ => {
                    client
                        .delete(c.id.clone(), Some(0))
                        .await
                        .map_err(GatewayError::Agent)?;
                    report.removed_containers += 1;
                }
            }
        }
        Ok((report, kept))
    }
}

/// The agent's create request for a recorded sandbox (placement and reset).
fn agent_create(rec: &StoredSandbox) -> av::CreateSandboxRequest {
    av::CreateSandboxRequest {
        sandbox_id: rec.sandbox_id.to_string(),
        namespace: rec.namespace.to_string(),
        name: rec.name.to_string(),
        claim_uid: rec.uid.clone(),
        request_id: rec
            .request_id
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
        spec: Some(convert::spec(
            &rec.spec,
            rec.expire_time_ms,
            rec.reset_revision,
        )),
        runtime: fp::Runtime::Unspecified as i32,
    }
}

/// A record rebuilt from a container's labels, or None if they do not parse.
fn adopt(
    c: &SandboxRecord,
    agent: &AgentId,
    node: &NodeName,
    pool: &PoolName,
) -> Option<StoredSandbox> {
    let namespace = NamespaceName::parse("namespace", &c.namespace).ok()?;
    let name = SandboxName::parse("name", &c.name).ok()?;
    let spec = ValidSpec {
        namespace: namespace.clone(),
        name: Some(name.clone()),
        pool: pool.clone(),
        image: ImageRef::parse("image", &c.image).ok()?,
        command: Vec::new(),
        args: Vec::new(),
        envs: Vec::new(),
        working_dir: None,
        ports: c.ports.to_vec(),
        cpu: None,
        memory: None,
        pids: None,
        runtime: None,
        failure_policy: FailurePolicy::Manual,
        recovery_timeout_seconds: 60,
        labels: BTreeMap::new(),
        // Adopted: what the container was made with is not known here.
        read_only_rootfs: false,
        user_namespace: false,
    };
    let (phase, exit_code) = match c.phase {
        SandboxPhase::Succeeded => (Phase::Succeeded, c.exit_code),
        SandboxPhase::Failed => (Phase::Failed, c.exit_code),
        SandboxPhase::Running | SandboxPhase::Creating => (Phase::Running, None),
        SandboxPhase::Deleting => return None,
    };
    Some(StoredSandbox {
        namespace,
        name,
        uid: if c.claim_uid.is_empty() {
            uuid::Uuid::new_v4().to_string()
        } else {
            c.claim_uid.clone()
        },
        sandbox_id: c.id.clone(),
        request_id: RequestId::parse("request_id", &c.request_id).ok(),
        spec_digest: UNKNOWN_DIGEST,
        labels: BTreeMap::from([(LABEL_ADOPTED.to_owned(), "true".to_owned())]),
        spec,
        phase,
        agent: Some(agent.clone()),
        node: Some(node.clone()),
        exit_code,
        expire_time_ms: None,
        reset_revision: 0,
        accepted_reset_revision: 0,
        timeline: None,
        created_ms: convert::now_ms(),
        resource_version: 0,
    })
}

/// A create that passed validation, before its reservation.
struct Validated {
    request_id: RequestId,
    mode: fp::ConsistencyMode,
    spec: ValidSpec,
    digest: fsb_core::spec::SpecDigest,
    expire_time_ms: Option<i64>,
    reset_revision: i64,
    deadline: Option<Instant>,
    timeline: Timeline,
}

/// The work of one create after its reservation.
struct Create {
    key: Key,
    request_id: RequestId,
    sandbox_id: SandboxId,
    spec: ValidSpec,
    expire_time_ms: Option<i64>,
    reset_revision: i64,
    mode: fp::ConsistencyMode,
    deadline: Option<Instant>,
    timeline: Timeline,
}

/// Digest of an adopted record: its full spec is not known, so a retry of its create
/// (same request id) is trusted to be the same request.
const UNKNOWN_DIGEST: SpecDigest = SpecDigest([0; 32]);

/// Answer a repeated request id from its record.
fn replay(
    rec: &StoredSandbox,
    digest: SpecDigest,
    mode: fp::ConsistencyMode,
) -> Result<fp::CreateResponse, GatewayError> {
    if rec.spec_digest != digest && rec.spec_digest != UNKNOWN_DIGEST {
        return Err(GatewayError::AlreadyExists(format!(
            "request_id: already used for sandbox {}/{} with a different spec",
            rec.namespace, rec.name
        )));
    }
    Ok(fp::CreateResponse {
        sandbox: Some(convert::sandbox(rec, true)),
        timeline: None,
        replayed: true,
        mode: mode as i32,
    })
}

/// Wait for the create a duplicate request found in flight, and replay its answer.
async fn wait_outcome(
    mut rx: tokio::sync::watch::Receiver<Option<Outcome>>,
    mode: fp::ConsistencyMode,
) -> Result<fp::CreateResponse, GatewayError> {
    let outcome = rx
        .wait_for(Option::is_some)
        .await
        .map_err(|_| GatewayError::Busy("(request in flight)".into()))?
        .clone();
    match outcome {
        Some(Outcome::Done(resp)) => Ok(fp::CreateResponse {
            replayed: true,
            mode: mode as i32,
            ..*resp
        }),
        Some(Outcome::Failed(code, msg)) => Err(GatewayError::Agent(tonic::Status::new(code, msg))),
        None => Err(GatewayError::Internal("no outcome".into())),
    }
}
