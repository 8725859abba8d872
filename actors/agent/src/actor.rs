//! AgentActor: admission and the sandbox table ([`AgentState`]), one [`SandboxActor`]
//! per sandbox for the containerd work, and phase changes broadcast upward.
//!
//! Restart rule: the source of truth is containerd. At start (and whenever the event
//! stream is re-established after containerd restarts) the actor receives the list of
//! our containers and rebuilds its state from their labels and tasks.

use std::{
    collections::{HashMap, VecDeque},
    sync::Arc,
    time::Duration,
};

use actix::{
    Actor, ActorFutureExt, Addr, AsyncContext, Context, Handler, MessageResult, ResponseActFuture,
    Supervisor, WrapFuture,
};
use fsb_core::{
    AgentId, HostPort, SandboxId,
    capability::CapabilityDrop,
    labels::{
        LABEL_AGENT_UID, LABEL_CLAIM_UID, LABEL_NAMESPACE, LABEL_REQUEST_ID, LABEL_SANDBOX_NAME,
    },
    spec::Runtime,
};
use tokio::sync::broadcast;

use crate::{
    error::AgentError,
    image::ImageStore,
    msg::{
        Create, CreatedSandbox, Delete, Exited, Inventory, Resync, Start, StartHow, StartWarm,
        Stop, StopWarm, Subscribe, WarmInstances,
    },
    oci::NetworkMode,
    runtime::{ContainerdRuntime, ObservedSandbox, TaskState},
    sandbox::SandboxActor,
    state::{Admission, AgentState, PhaseChange, SandboxPhase, SandboxRecord},
    warm::{self, WarmConfig, WarmKey, WarmState},
};

/// Container label listing a sandbox's ports, so admission survives agent restarts.
pub const LABEL_PORTS: &str = "fast-sandbox.io/ports";
/// Container label of an unclaimed warm instance: `<runtime>|<image>`. A claim removes
/// it (and sets the sandbox's labels), so a restarted agent tells instances from
/// sandboxes by it.
pub const LABEL_WARM: &str = "fast-sandbox.io/warm";
/// On a warm instance: the capabilities its agent dropped ([`CapabilityDrop::to_arg`];
/// absent when none). A restarted agent adopts only instances made under its own policy.
pub const LABEL_WARM_DROP: &str = "fast-sandbox.io/warm-drop-capabilities";
/// How often the warm levels are topped up (a claim also triggers a refill).
const REFILL_INTERVAL: Duration = Duration::from_millis(250);
/// After a failed instance start, refills pause this long (a missing image must not
/// turn into a tight loop of failing creates).
const REFILL_BACKOFF: Duration = Duration::from_secs(2);

pub(crate) struct AgentActor {
    agent_id: AgentId,
    state: AgentState,
    runtime: ContainerdRuntime,
    images: Arc<ImageStore>,
    network: NetworkMode,
    drop_capabilities: CapabilityDrop,
    default_runtime: Runtime,
    stop_grace: Duration,
    children: HashMap<SandboxId, Addr<SandboxActor>>,
    /// Starts sent to a sandbox actor and not yet answered, by id: a failed start
    /// frees the slot only if no other start of the same id is still queued behind it
    /// (a retried create), or that one's container would have no record.
    starts: HashMap<SandboxId, usize>,
    /// Warm instances: ready ones are not sandboxes (not in `state`) until claimed.
    warm: WarmState,
    /// fsb-init on the host; `None` when nothing is kept warm.
    warm_init: Option<std::path::PathBuf>,
    refill_paused_until: Option<std::time::Instant>,
    /// When creates took warm instances, within [`warm::CLAIM_WINDOW`]: refills yield
    /// to them by their pace.
    recent_claims: VecDeque<std::time::Instant>,
    /// Unclaimed instances found at startup that cannot serve (not running, or no
    /// longer wanted): removed once the actor runs.
    discard: Vec<SandboxId>,
    /// Sandboxes found claimed (claim file) without their labels in containerd: the
    /// labels to set once the actor runs.
    relabel: Vec<(SandboxId, HashMap<String, String>)>,
    changes: broadcast::Sender<PhaseChange>,
}

impl std::fmt::Debug for AgentActor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentActor")
            .field("agent_id", &self.agent_id)
            .finish_non_exhaustive()
    }
}

pub(crate) struct AgentParts {
    pub(crate) agent_id: AgentId,
    pub(crate) capacity: u32,
    pub(crate) runtime: ContainerdRuntime,
    pub(crate) images: Arc<ImageStore>,
    pub(crate) network: NetworkMode,
    pub(crate) default_runtime: Runtime,
    pub(crate) stop_grace: Duration,
    pub(crate) observed: Vec<ObservedSandbox>,
    pub(crate) warm: WarmConfig,
    pub(crate) drop_capabilities: CapabilityDrop,
}

impl AgentActor {
    pub(crate) fn new(parts: AgentParts) -> Self {
        let mut state = AgentState::new(parts.capacity);
        let mut warm = WarmState::new(parts.warm.limits);
        warm.set_targets(parts.warm.targets.iter().cloned());
        let mut discard = Vec::new();
        let mut sandboxes = Vec::new();
        let mut relabel = Vec::new();
        for mut o in parts.observed {
            match warm_key_of(&o) {
                None => {
                    if let Some(labels) = o.pending_labels.take() {
                        relabel.push((o.id.clone(), labels));
                    }
                    sandboxes.push(record_of(o));
                }
                // Made under another capability policy (an agent restarted with a new
                // one): its PID 1 holds capabilities this agent would not give.
                Some(Some(key))
                    if o.state == TaskState::Running
                        && warm.wanted(&key)
                        && made_under(&o.labels, &parts.drop_capabilities) =>
                {
                    warm.adopt(o.id, key);
                }
                Some(_) => discard.push(o.id),
            }
        }
        // Adopted beyond the targets: removed too.
        discard.extend(warm.surplus());
        state.recover(sandboxes);
        let (changes, _) = broadcast::channel(1024);
        Self {
            agent_id: parts.agent_id,
            state,
            runtime: parts.runtime,
            images: parts.images,
            network: parts.network,
            drop_capabilities: parts.drop_capabilities,
            default_runtime: parts.default_runtime,
            stop_grace: parts.stop_grace,
            children: HashMap::new(),
            starts: HashMap::new(),
            warm,
            warm_init: parts.warm.init,
            refill_paused_until: None,
            recent_claims: VecDeque::new(),
            discard,
            relabel,
            changes,
        }
    }

    fn child(&mut self, id: &SandboxId) -> Addr<SandboxActor> {
        self.children
            .entry(id.clone())
            .or_insert_with(|| {
                let (id, runtime, images, network, drop) = (
                    id.clone(),
                    self.runtime.clone(),
                    self.images.clone(),
                    self.network.clone(),
                    self.drop_capabilities.clone(),
                );
                Supervisor::start(move |_| SandboxActor::new(id, runtime, images, network, drop))
            })
            .clone()
    }

    fn publish(&self, change: Option<PhaseChange>) {
        if let Some(change) = change {
            // No subscriber is fine: the next inventory carries the same truth.
            let _ = self.changes.send(change);
        }
    }
}

impl Actor for AgentActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        for id in std::mem::take(&mut self.discard) {
            self.discard_instance(id, ctx);
        }
        // Instances claimed just before the last agent stopped: their labels, still.
        for (id, labels) in std::mem::take(&mut self.relabel) {
            self.runtime.set_labels_later(id, labels);
        }
        if self.warm_init.is_some() {
            ctx.run_interval(REFILL_INTERVAL, |act, ctx| act.refill(ctx));
        }
    }
}

impl AgentActor {
    /// Start the instances the warm targets lack, within the refill limits.
    fn refill(&mut self, ctx: &mut Context<Self>) {
        let Some(init) = self.warm_init.clone() else {
            return;
        };
        if self
            .refill_paused_until
            .is_some_and(|t| std::time::Instant::now() < t)
        {
            return;
        }
        while self
            .recent_claims
            .front()
            .is_some_and(|t| t.elapsed() >= warm::CLAIM_WINDOW)
        {
            self.recent_claims.pop_front();
        }
        let pace = warm::ClaimPace::of(self.recent_claims.len());
        for (id, key) in self.warm.refills(pace) {
            let mut labels = HashMap::from([
                (LABEL_AGENT_UID.to_owned(), self.agent_id.to_string()),
                (LABEL_WARM.to_owned(), warm_label(&key)),
            ]);
            if !self.drop_capabilities.is_empty() {
                labels.insert(LABEL_WARM_DROP.to_owned(), self.drop_capabilities.to_arg());
            }
            let msg = StartWarm {
                key,
                labels,
                init: init.clone(),
                network: self.network.clone(),
            };
            let child = self.child(&id);
            ctx.spawn(async move { child.send(msg).await }.into_actor(self).map(
                move |sent, act, ctx| match sent {
                    Ok(Ok(_pid)) => {
                        if !act.warm.started(&id) {
                            act.discard_instance(id, ctx);
                        }
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(instance = %id, error = %e, "starting a warm instance failed");
                        act.warm.failed(&id);
                        act.children.remove(&id);
                        act.refill_paused_until =
                            Some(std::time::Instant::now() + REFILL_BACKOFF);
                    }
                    Err(_) => {
                        act.warm.failed(&id);
                        act.children.remove(&id);
                    }
                },
            ));
        }
    }

    /// Remove an instance that will not be claimed (exited, surplus, unusable).
    fn discard_instance(&mut self, id: SandboxId, ctx: &mut Context<Self>) {
        let child = self.child(&id);
        ctx.spawn(
            async move {
                child
                    .send(Stop {
                        grace: Duration::ZERO,
                    })
                    .await
            }
            .into_actor(self)
            .map(move |sent, act, _ctx| {
                if !matches!(sent, Ok(Ok(_))) {
                    tracing::warn!(instance = %id, "removing a warm instance failed");
                }
                if act.state.get(&id).is_none() {
                    act.children.remove(&id);
                }
            }),
        );
    }
}

impl Handler<Create> for AgentActor {
    type Result = ResponseActFuture<Self, Result<CreatedSandbox, AgentError>>;

    fn handle(&mut self, msg: Create, ctx: &mut Self::Context) -> Self::Result {
        let Create { req, span } = msg;
        let runtime = req.spec.runtime.unwrap_or(self.default_runtime);
        if req.spec.user_namespace && runtime == Runtime::Gvisor {
            // The spec named no runtime and this agent's default is gVisor; refused
            // before anything is recorded or created (a spec naming gVisor never
            // validates).
            return Box::pin(actix::fut::ready(Err(AgentError::FailedPrecondition(
                format!(
                    "spec.userNamespace: user_namespace {} (the agent's default runtime is gvisor)",
                    fsb_core::spec::USER_NAMESPACE_GVISOR
                ),
            ))));
        }
        if req.spec.user_namespace && runtime == Runtime::Runc && !req.spec.ports.is_empty() {
            // Under runc such a sandbox gets a network namespace of its own (see
            // `sandbox::start`), where the agent's ports do not lead.
            return Box::pin(actix::fut::ready(Err(AgentError::FailedPrecondition(
                "spec.exposedPorts: a sandbox with user_namespace under runc 1.1 has a \
                 network namespace of its own (loopback only): use crun to expose ports"
                    .into(),
            ))));
        }
        let record = SandboxRecord {
            id: req.id.clone(),
            namespace: req.namespace.clone(),
            name: req.name.clone(),
            claim_uid: req.claim_uid.clone(),
            request_id: req.request_id.clone(),
            image: req.spec.image.to_string(),
            ports: req.spec.ports.clone(),
            phase: SandboxPhase::Creating,
            exit_code: None,
            pid: 0,
        };
        match self.state.admit(record) {
            Admission::Admitted => {}
            // A create of an id being deleted would run after the delete's stop and
            // make a container the delete then forgets: refused, the caller retries.
            Admission::AlreadyPresent(rec) if rec.phase == SandboxPhase::Deleting => {
                return Box::pin(actix::fut::ready(Err(AgentError::Unavailable(format!(
                    "sandbox {} is being deleted",
                    rec.id
                )))));
            }
            Admission::AlreadyPresent(_) => {}
            Admission::Full { used } => {
                return Box::pin(actix::fut::ready(Err(AgentError::Exhausted(format!(
                    "{used} of {} slots in use",
                    self.state.capacity()
                )))));
            }
            Admission::PortsInUse(ports) => {
                let ports: Vec<u16> = ports.iter().map(|p| p.get()).collect();
                return Box::pin(actix::fut::ready(Err(AgentError::Exhausted(format!(
                    "spec.exposedPorts: {ports:?} already used by another sandbox on this agent"
                )))));
            }
        }
        let ports = req
            .spec
            .ports
            .iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join(",");
        let mut labels = HashMap::from([
            (LABEL_AGENT_UID.to_owned(), self.agent_id.to_string()),
            (LABEL_NAMESPACE.to_owned(), req.namespace.clone()),
            (LABEL_SANDBOX_NAME.to_owned(), req.name.clone()),
            (LABEL_CLAIM_UID.to_owned(), req.claim_uid.clone()),
            (LABEL_PORTS.to_owned(), ports),
        ]);
        if !req.request_id.is_empty() {
            labels.insert(LABEL_REQUEST_ID.to_owned(), req.request_id.clone());
        }
        let hostname = if req.name.is_empty() {
            req.id.as_str()[..12].to_owned()
        } else {
            req.name.clone()
        };
        let how = self.start_how(&req.id, &req.spec, runtime);
        if how == StartHow::Claim {
            // Replace what was taken.
            self.recent_claims.push_back(std::time::Instant::now());
            ctx.notify(RefillNow);
        }
        let start = Start {
            spec: req.spec,
            runtime,
            labels,
            hostname,
            how,
            span,
        };
        let child = self.child(&req.id);
        let id = req.id;
        *self.starts.entry(id.clone()).or_default() += 1;
        Box::pin(async move { child.send(start).await }.into_actor(self).map(
            move |sent, act, ctx| {
                let queued = act.starts.get_mut(&id).map_or(0, |n| {
                    *n -= 1;
                    *n
                });
                if queued == 0 {
                    act.starts.remove(&id);
                }
                let result =
                    sent.map_err(|_| AgentError::Internal(format!("sandbox actor {id} stopped")))?;
                match result {
                    Ok(created) => {
                        let change = act.state.created(&id, created.pid);
                        act.publish(change);
                        Ok(created)
                    }
                    // Another start of this id runs next and settles the record.
                    Err(e) if queued > 0 => Err(e),
                    Err(e) if e.is_ambiguous() || e.is_already_exists() => {
                        // containerd may hold (or finish making) a container under
                        // this id: the slot stays held until a removal proves it gone.
                        act.settle_failed_create(&id, ctx);
                        Err(e)
                    }
                    Err(e) => {
                        // The runtime removed what it made; the slot is free again.
                        act.state.create_failed(&id);
                        act.children.remove(&id);
                        Err(e)
                    }
                }
            },
        ))
    }
}

impl AgentActor {
    /// After a create whose outcome containerd left open: mark the sandbox Deleting
    /// (so inventories show it and no create reuses the id), wait for containerd to
    /// finish whatever it was still doing, then remove it through its sandbox actor.
    /// If that fails too the record stays Deleting and the next delete retries.
    fn settle_failed_create(&mut self, id: &SandboxId, ctx: &mut Context<Self>) {
        if !self.state.begin_delete(id) {
            return;
        }
        self.publish(Some(PhaseChange {
            id: id.clone(),
            phase: SandboxPhase::Deleting,
            exit_code: None,
        }));
        let settle = self.runtime.containerd().config().call_timeout;
        let child = self.child(id);
        let id = id.clone();
        ctx.spawn(
            async move {
                tokio::time::sleep(settle).await;
                child
                    .send(Stop {
                        grace: Duration::ZERO,
                    })
                    .await
            }
            .into_actor(self)
            .map(move |sent, act, _ctx| match sent {
                // Unless a delete finished first and a new create reused the id.
                Ok(Ok(_))
                    if act.state.get(&id).map(|r| r.phase) == Some(SandboxPhase::Deleting) =>
                {
                    act.state.deleted(&id);
                    act.children.remove(&id);
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(sandbox = %id, error = %e, "removing after a failed create");
                }
                Err(_) => tracing::warn!(sandbox = %id, "sandbox actor stopped"),
            }),
        );
    }
}

impl AgentActor {
    /// Warm or cold, and why. The registry names the instance it assigned by making it
    /// the sandbox id; an instance that cannot serve this spec is replaced by a cold
    /// create under its id.
    fn start_how(
        &mut self,
        id: &SandboxId,
        spec: &fsb_core::spec::ValidSpec,
        runtime: fsb_core::spec::Runtime,
    ) -> StartHow {
        let wanted = WarmKey {
            image: spec.image.clone(),
            runtime,
        };
        let usable = warm::claimable(spec, runtime);
        match self.warm.claim_id(id) {
            Some(key) if key == wanted && usable.is_ok() => StartHow::Claim,
            Some(_) => StartHow::Replace(match usable {
                Err(reason) => reason.as_str().to_owned(),
                Ok(()) => "cold: the assigned warm instance is of another image or runtime".into(),
            }),
            None if self.warm.wanted(&wanted) => StartHow::Cold(match usable {
                Err(reason) => reason.as_str().to_owned(),
                Ok(()) => warm::ColdReason::NoInstance.as_str().to_owned(),
            }),
            None => StartHow::Cold(String::new()),
        }
    }
}

/// Top the warm levels up now (after a claim).
#[derive(Debug, actix::Message)]
#[rtype(result = "()")]
struct RefillNow;

impl Handler<RefillNow> for AgentActor {
    type Result = ();

    fn handle(&mut self, _msg: RefillNow, ctx: &mut Self::Context) {
        self.refill(ctx);
    }
}

impl Handler<StopWarm> for AgentActor {
    type Result = MessageResult<StopWarm>;

    fn handle(&mut self, _msg: StopWarm, _ctx: &mut Self::Context) -> Self::Result {
        self.warm_init = None;
        let surplus = self.warm.set_targets(Vec::new());
        MessageResult((surplus, self.warm.starting_count()))
    }
}

impl Handler<WarmInstances> for AgentActor {
    type Result = MessageResult<WarmInstances>;

    fn handle(&mut self, _msg: WarmInstances, _ctx: &mut Self::Context) -> Self::Result {
        MessageResult(
            self.warm
                .ready()
                .map(|(k, id)| (k.clone(), id.clone()))
                .collect(),
        )
    }
}

impl Handler<Delete> for AgentActor {
    type Result = ResponseActFuture<Self, Result<(), AgentError>>;

    fn handle(&mut self, msg: Delete, _ctx: &mut Self::Context) -> Self::Result {
        let id = msg.id;
        if !self.state.begin_delete(&id) {
            // An instance the registry assigned to a create that never reached us.
            self.warm.lost(&id);
            // Not in our table, but containerd may still hold it: a create sent by a
            // previous agent process that containerd finished after we listed. Delete
            // removes whatever containerd has under the id; NotFound only if nothing.
            let runtime = self.runtime.clone();
            let grace = msg.grace.unwrap_or(self.stop_grace);
            return Box::pin(
                async move {
                    match runtime.remove(&id, grace).await? {
                        true => Ok(()),
                        false => Err(AgentError::NotFound(format!("sandbox {id}"))),
                    }
                }
                .into_actor(self),
            );
        }
        self.publish(Some(PhaseChange {
            id: id.clone(),
            phase: SandboxPhase::Deleting,
            exit_code: None,
        }));
        let grace = msg.grace.unwrap_or(self.stop_grace);
        let child = self.child(&id);
        Box::pin(
            async move { child.send(Stop { grace }).await }
                .into_actor(self)
                .map(move |sent, act, _ctx| {
                    let result = sent
                        .map_err(|_| AgentError::Internal(format!("sandbox actor {id} stopped")))?;
                    result?;
                    act.state.deleted(&id);
                    act.children.remove(&id);
                    Ok(())
                }),
        )
    }
}

impl Handler<Exited> for AgentActor {
    type Result = ();

    fn handle(&mut self, msg: Exited, ctx: &mut Self::Context) {
        if self.warm.lost(&msg.id) {
            // An unclaimed instance died: remove it; the refill replaces it.
            self.discard_instance(msg.id, ctx);
            return;
        }
        let change = self.state.exited_pid(&msg.id, msg.pid, msg.exit_code);
        self.publish(change);
    }
}

impl Handler<Resync> for AgentActor {
    type Result = ();

    fn handle(&mut self, msg: Resync, ctx: &mut Self::Context) {
        let mut sandboxes = Vec::new();
        for o in msg.0 {
            match warm_key_of(&o) {
                None => sandboxes.push(record_of(o)),
                // An instance that stopped while containerd was away.
                Some(_) if o.state != TaskState::Running => {
                    if self.warm.lost(&o.id) {
                        self.discard_instance(o.id, ctx);
                    }
                }
                Some(_) => {}
            }
        }
        for change in self.state.recover(sandboxes) {
            self.publish(Some(change));
        }
    }
}

impl Handler<Inventory> for AgentActor {
    type Result = MessageResult<Inventory>;

    fn handle(&mut self, _msg: Inventory, _ctx: &mut Self::Context) -> Self::Result {
        MessageResult(self.state.records().cloned().collect())
    }
}

impl Handler<Subscribe> for AgentActor {
    type Result = MessageResult<Subscribe>;

    fn handle(&mut self, _msg: Subscribe, _ctx: &mut Self::Context) -> Self::Result {
        MessageResult(self.changes.subscribe())
    }
}

/// Whether a container with these labels (a pending claim's applied) is an unclaimed
/// warm instance: the agent's own, not a sandbox.
pub(crate) fn unclaimed_warm(labels: &HashMap<String, String>) -> bool {
    labels.get(LABEL_WARM).is_some_and(|v| !v.is_empty())
}

/// `Some` for an unclaimed warm instance (with its key, if the label parses).
pub(crate) fn warm_key_of(o: &ObservedSandbox) -> Option<Option<WarmKey>> {
    let label = o.labels.get(LABEL_WARM).filter(|v| !v.is_empty())?;
    let key = label.split_once('|').and_then(|(runtime, image)| {
        Some(WarmKey {
            runtime: fsb_core::spec::Runtime::parse("runtime", runtime).ok()?,
            image: fsb_core::ImageRef::parse("image", image).ok()?,
        })
    });
    Some(key)
}

/// Whether a warm instance with these labels was made under `drop` ([`LABEL_WARM_DROP`]).
pub(crate) fn made_under(labels: &HashMap<String, String>, drop: &CapabilityDrop) -> bool {
    labels.get(LABEL_WARM_DROP).map_or("", String::as_str) == drop.to_arg()
}

/// The [`LABEL_WARM`] value of `key`.
fn warm_label(key: &WarmKey) -> String {
    format!("{}|{}", key.runtime.as_str(), key.image)
}

/// What containerd says about one of our containers, as a record.
fn record_of(o: ObservedSandbox) -> SandboxRecord {
    let label = |k: &str| o.labels.get(k).cloned().unwrap_or_default();
    let ports = label(LABEL_PORTS)
        .split(',')
        .filter_map(|p| p.parse::<u32>().ok())
        .filter_map(|p| HostPort::parse("port", p).ok())
        .collect();
    let (phase, exit_code) = match o.state {
        TaskState::Running | TaskState::Created => (SandboxPhase::Running, None),
        TaskState::Stopped { exit_code } => {
            let code = i32::try_from(exit_code).unwrap_or(i32::MAX);
            (
                if code == 0 {
                    SandboxPhase::Succeeded
                } else {
                    SandboxPhase::Failed
                },
                Some(code),
            )
        }
        // A container without a task was interrupted mid-create or mid-delete.
        TaskState::Missing | TaskState::Other => (SandboxPhase::Failed, None),
    };
    SandboxRecord {
        id: o.id,
        namespace: label(LABEL_NAMESPACE),
        name: label(LABEL_SANDBOX_NAME),
        claim_uid: label(LABEL_CLAIM_UID),
        request_id: label(LABEL_REQUEST_ID),
        image: o.image,
        ports,
        phase,
        exit_code,
        pid: o.pid,
    }
}

/// Keep the exit stream alive across containerd restarts: subscribe, resync, forward
/// exits; when the stream ends, back off and do it again. Stops when the actor does.
pub(crate) fn spawn_exit_watch(addr: Addr<AgentActor>, runtime: ContainerdRuntime, agent: AgentId) {
    actix::spawn(async move {
        use futures::StreamExt;
        let mut backoff = Duration::from_millis(100);
        while addr.connected() {
            match runtime.exits().await {
                Ok(stream) => {
                    // Subscribed first, then listed: no exit can fall between the two.
                    match runtime.list(Some(agent.as_str())).await {
                        Ok(observed) => addr.do_send(Resync(observed)),
                        Err(e) => tracing::warn!(error = %e, "resync after subscribing failed"),
                    }
                    backoff = Duration::from_millis(100);
                    let mut stream = Box::pin(stream);
                    while let Some(exit) = stream.next().await {
                        let exit_code = i32::try_from(exit.exit_code).unwrap_or(i32::MAX);
                        addr.do_send(Exited {
                            id: exit.id,
                            pid: exit.pid,
                            exit_code,
                        });
                    }
                    tracing::warn!("containerd event stream ended; resubscribing");
                }
                Err(e) => tracing::warn!(error = %e, "subscribing to containerd events failed"),
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    });
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn only_instances_made_under_the_same_drop_list_are_adopted() {
        let none = CapabilityDrop::default();
        let chown = CapabilityDrop::parse(["CHOWN"]).unwrap();
        let label = |v: &str| HashMap::from([(LABEL_WARM_DROP.to_owned(), v.to_owned())]);
        assert!(
            made_under(&HashMap::new(), &none),
            "older instances, no policy"
        );
        assert!(
            !made_under(&HashMap::new(), &chown),
            "made with more capabilities"
        );
        assert!(made_under(&label("CAP_CHOWN"), &chown));
        assert!(!made_under(&label("CAP_CHOWN"), &none));
        let more = CapabilityDrop::parse(["CHOWN", "KILL"]).unwrap();
        assert!(!made_under(&label("CAP_CHOWN"), &more));
    }
}
