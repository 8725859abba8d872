//! AgentActor: admission and the sandbox table ([`AgentState`]), one [`SandboxActor`]
//! per sandbox for the containerd work, and phase changes broadcast upward.
//!
//! Restart rule: the source of truth is containerd. At start (and whenever the event
//! stream is re-established after containerd restarts) the actor receives the list of
//! our containers and rebuilds its state from their labels and tasks.

use std::{collections::HashMap, sync::Arc, time::Duration};

use actix::{
    Actor, ActorFutureExt, Addr, Context, Handler, MessageResult, ResponseActFuture, Supervisor,
    WrapFuture,
};
use fsb_core::{
    AgentId, HostPort, SandboxId,
    labels::{
        LABEL_AGENT_UID, LABEL_CLAIM_UID, LABEL_NAMESPACE, LABEL_REQUEST_ID, LABEL_SANDBOX_NAME,
    },
    spec::Runtime,
};
use tokio::sync::broadcast;

use crate::{
    error::AgentError,
    image::ImageStore,
    msg::{Create, CreatedSandbox, Delete, Exited, Inventory, Resync, Start, Stop, Subscribe},
    oci::NetworkMode,
    runtime::{ContainerdRuntime, ObservedSandbox, TaskState},
    sandbox::SandboxActor,
    state::{Admission, AgentState, PhaseChange, SandboxPhase, SandboxRecord},
};

/// Container label listing a sandbox's ports, so admission survives agent restarts.
pub const LABEL_PORTS: &str = "fast-sandbox.io/ports";

pub(crate) struct AgentActor {
    agent_id: AgentId,
    state: AgentState,
    runtime: ContainerdRuntime,
    images: Arc<ImageStore>,
    network: NetworkMode,
    default_runtime: Runtime,
    stop_grace: Duration,
    children: HashMap<SandboxId, Addr<SandboxActor>>,
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
}

impl AgentActor {
    pub(crate) fn new(parts: AgentParts) -> Self {
        let mut state = AgentState::new(parts.capacity);
        state.recover(parts.observed.into_iter().map(record_of).collect());
        let (changes, _) = broadcast::channel(1024);
        Self {
            agent_id: parts.agent_id,
            state,
            runtime: parts.runtime,
            images: parts.images,
            network: parts.network,
            default_runtime: parts.default_runtime,
            stop_grace: parts.stop_grace,
            children: HashMap::new(),
            changes,
        }
    }

    fn child(&mut self, id: &SandboxId) -> Addr<SandboxActor> {
        self.children
            .entry(id.clone())
            .or_insert_with(|| {
                let (id, runtime, images, network) = (
                    id.clone(),
                    self.runtime.clone(),
                    self.images.clone(),
                    self.network.clone(),
                );
                Supervisor::start(move |_| SandboxActor::new(id, runtime, images, network))
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
}

impl Handler<Create> for AgentActor {
    type Result = ResponseActFuture<Self, Result<CreatedSandbox, AgentError>>;

    fn handle(&mut self, msg: Create, _ctx: &mut Self::Context) -> Self::Result {
        let req = msg.0;
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
            Admission::Admitted | Admission::AlreadyPresent(_) => {}
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
        let runtime = req.spec.runtime.unwrap_or(self.default_runtime);
        let start = Start {
            spec: req.spec,
            runtime,
            labels,
            hostname,
        };
        let child = self.child(&req.id);
        let id = req.id;
        Box::pin(async move { child.send(start).await }.into_actor(self).map(
            move |sent, act, _ctx| {
                let result =
                    sent.map_err(|_| AgentError::Internal(format!("sandbox actor {id} stopped")))?;
                match result {
                    Ok(created) => {
                        let change = act.state.created(&id, created.pid);
                        act.publish(change);
                        Ok(created)
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

impl Handler<Delete> for AgentActor {
    type Result = ResponseActFuture<Self, Result<(), AgentError>>;

    fn handle(&mut self, msg: Delete, _ctx: &mut Self::Context) -> Self::Result {
        let id = msg.id;
        if !self.state.begin_delete(&id) {
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

    fn handle(&mut self, msg: Exited, _ctx: &mut Self::Context) {
        let change = self.state.exited_pid(&msg.id, msg.pid, msg.exit_code);
        self.publish(change);
    }
}

impl Handler<Resync> for AgentActor {
    type Result = ();

    fn handle(&mut self, msg: Resync, _ctx: &mut Self::Context) {
        for change in self
            .state
            .recover(msg.0.into_iter().map(record_of).collect())
        {
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
