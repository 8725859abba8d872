//! The SandboxPool reconciler: keeps each pool's agent pods at the size its demand
//! needs, manages those pods directly (no Deployment), rolls out template changes with
//! a ready surge and reports counts and conditions in `SandboxPool.status`.
//!
//! # Pods
//! Named `<pool>-<random>` (the API server's `generateName`), labelled
//! `app=sandbox-agent` and `fast-sandbox.io/pool=<pool>`, owned by the pool (controller
//! ownerReference), annotated with [`POD_TEMPLATE_HASH_ANNOTATION`]: a hash of the
//! rendered template (the pool's `agentTemplate` or [`pod::default_template`], plus the
//! environment injected into the first container: identity from the downward API,
//! `FSB_POOL`, `FSB_CAPACITY` = maxSandboxesPerPod, `FSB_DEFAULT_RUNTIME`,
//! `FSB_CONTROLLER`, `FSB_LISTEN`; with the agent CA, `FSB_TLS_DIR` and the mounted
//! Secret [`tls_secret_name`]). A different hash means "old template".
//!
//! # TLS
//! With the agent CA ([`PoolConfig::ca`]), every pass first makes sure the pool's
//! Secret `<pool>-agent-tls` (owned by the pool) holds a certificate of the current CA
//! naming `<pool>.<namespace>.agent.fsb.internal` that stays valid for 30 more days,
//! and reissues it otherwise. Pods read it at start: a reissued certificate reaches a
//! pod when the pod is replaced (no live rotation).
//!
//! # Sizing rule (see [`sizing::plan`])
//! - `busy_needed = ceil((sum of used slots + pending sandboxes) / maxSandboxesPerPod)`,
//!   counting the agents of live pods ([`AgentUsage`] answers both).
//! - `desired = clamp(busy_needed + bufferMin, poolMin, poolMax)`: the pool scales up
//!   to it (pods still starting count, so nothing is created twice).
//! - `upper = clamp(busy_needed + bufferMax, poolMin, poolMax)`: the pool scales down
//!   only while it has more pods than that, and only idle agents (registered, no
//!   sandbox): a pass drains the agent ([`AgentUsage::drain`]: the registry allocates
//!   nothing more to it), a later pass deletes the pod if the agent is still idle and
//!   draining. A busy agent is never deleted; neither is a pod whose agent has not
//!   registered (it may still be starting), unless the pod Failed.
//! - A drained agent that is idle is deleted whatever the demand: nothing can be placed
//!   on it any more. If demand came back meanwhile, a fresh pod replaces it.
//! - Pods in phase Failed or Succeeded are deleted and replaced in the same pass; pods
//!   with a deletionTimestamp are neither counted nor touched.
//! - Template change: new pods are created first (as many as the old ones, keeping the
//!   pool's size within `[desired, upper]`, at most one pod beyond poolMax); an old pod
//!   leaves once the Ready new pods and the remaining old ones cover that size, by the
//!   same drain-then-delete-when-idle path (old pods that never started go at once).
//! - `ScalingLimited` is True while `busy_needed + bufferMin > poolMax`.
//!
//! # Loop
//! [`run`] is a kube-runtime `Controller` over SandboxPools owning their Pods: at most
//! one reconcile per pool in flight, a pass on every pool or pod change, every
//! [`PoolConfig::resync`] (usage changes are not Kubernetes events) and whenever the
//! controller pokes the [`PoolTrigger`]. Every pass lists the pool's pods from the API
//! server (a quorum read, not a cache), so a pass never acts on pods it has not seen.
//!
//! # Deletion
//! Pools carry the finalizer [`POOL_FINALIZER`]. Garbage collection would remove owned
//! pods, but not every API server runs a garbage collector (the test cluster does not),
//! so a deleted pool's reconciler deletes its pods itself and removes the finalizer only
//! once none is left.

pub mod pod;
pub mod sizing;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::controller::{Action, Controller, Error as ControllerError};
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use tokio::sync::Notify;

use crate::crd::{SandboxPool, SandboxPoolStatus};
use crate::tls::Ca;
use fsb_core::labels::{LABEL_APP, LABEL_APP_AGENT, LABEL_POOL};
use sizing::{Capacity, Demand, PodPhase, PodView};

/// Finalizer on every pool: its pods are gone before the pool is.
pub const POOL_FINALIZER: &str = "sandbox.fast.io/pods";
/// Annotation on agent pods: hash of the rendered template they were created from.
pub const POD_TEMPLATE_HASH_ANNOTATION: &str = "fast-sandbox.io/template-hash";
/// Default port of the agent's gRPC server in its pod.
pub const DEFAULT_AGENT_PORT: u16 = 5758;
/// Field manager of the reconciler's patches.
const MANAGER: &str = "fsb-pool-reconciler";

/// How the rest of the controller tells the reconciler about agents and demand.
pub trait AgentUsage: Send + Sync + 'static {
    /// Registered agents of this pool (namespace, pool name).
    fn agents(&self, namespace: &str, pool: &str) -> Vec<AgentLoad>;
    /// Sandboxes of this pool waiting for a slot (Pending, Unschedulable).
    fn pending(&self, namespace: &str, pool: &str) -> u32;
    /// Tell the agent to take no new sandboxes (the registry stops allocating to it).
    /// False if unknown.
    fn drain(&self, pod_uid: &str) -> bool;
    /// Warm instances ready on this pool's agents, from their last inventories.
    fn warm_ready(&self, _namespace: &str, _pool: &str) -> u32 {
        0
    }
}

/// One registered agent's load.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentLoad {
    /// UID of the agent's pod (its agent id).
    pub pod_uid: String,
    /// Slots in use.
    pub used: u32,
    /// Slots it has.
    pub capacity: u32,
    /// Takes no new sandboxes.
    pub draining: bool,
}

/// The reconciler's settings.
#[derive(Clone, Debug)]
pub struct PoolConfig {
    /// Agent image of the default template (pools without `agentTemplate`).
    pub agent_image: String,
    /// The controller's AgentControl URL, given to agents as `FSB_CONTROLLER`.
    pub controller_url: String,
    /// The agents' gRPC port (`FSB_LISTEN=0.0.0.0:<port>`).
    pub agent_port: u16,
    /// Only pools (and pods) of this namespace; all namespaces when `None`.
    pub namespace: Option<String>,
    /// Period of the pass every pool gets without any event.
    pub resync: Duration,
    /// The agent CA: each pool gets a Secret [`tls_secret_name`] with its agents'
    /// certificate, mounted into its pods (None: agents run without TLS).
    pub ca: Option<Arc<Ca>>,
}

impl PoolConfig {
    /// Defaults: agent port 5758, all namespaces, a pass every 2 s.
    pub fn new(agent_image: impl Into<String>, controller_url: impl Into<String>) -> Self {
        Self {
            agent_image: agent_image.into(),
            controller_url: controller_url.into(),
            agent_port: DEFAULT_AGENT_PORT,
            namespace: None,
            resync: Duration::from_secs(2),
            ca: None,
        }
    }
}

/// The reconciler's errors. A reconcile error is retried for its pool; [`run`] returns
/// only when the loop itself cannot go on (the supervisor restarts it).
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// An API server call failed.
    #[error("kubernetes api: {0}")]
    Kube(#[from] kube::Error),
    /// A (de)serialization failed.
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
    /// The object lacks a field the API server always sets.
    #[error("object has no {0}")]
    MissingField(&'static str),
    /// The pool's agentTemplate cannot make an agent pod.
    #[error("invalid agentTemplate: {0}")]
    InvalidTemplate(&'static str),
    /// The pool's sandboxSecurity names an unknown capability or adds one (the CRD's
    /// schema refuses both; this catches objects stored under an older schema).
    #[error("invalid sandboxSecurity: {0}")]
    InvalidSecurity(String),
    /// The controller's runner failed; its state is not trustworthy.
    #[error("pool controller runner failed: {0}")]
    Runner(String),
    /// The controller's event stream ended.
    #[error("pool controller stopped")]
    Stopped,
    /// The pool's TLS Secret cannot be issued or written.
    #[error("agent TLS secret: {0}")]
    Tls(String),
}

/// A cloneable poke: "usage changed, look at every pool now" (coalesced: many pokes
/// before a pass make one pass). Outlives restarts of [`run`].
#[derive(Clone, Debug, Default)]
pub struct PoolTrigger {
    notify: Arc<Notify>,
}

impl PoolTrigger {
    /// A trigger nobody has poked.
    pub fn new() -> Self {
        Self::default()
    }

    /// Ask for a pass on every pool.
    pub fn poke(&self) {
        self.notify.notify_one();
    }

    fn stream(&self) -> impl futures::Stream<Item = ()> + Send + 'static {
        futures::stream::unfold(self.notify.clone(), |n| async move {
            n.notified().await;
            Some(((), n))
        })
    }
}

struct Ctx {
    client: kube::Client,
    usage: Arc<dyn AgentUsage>,
    config: PoolConfig,
    /// Pools whose failing reconcile was already logged at warn (then debug).
    warned: Mutex<HashSet<String>>,
}

/// Reconcile every SandboxPool until the loop fails. Reconcile errors are retried per
/// pool; this returns only when the controller itself stops ([`PoolError::Runner`],
/// [`PoolError::Stopped`]), for the supervisor to restart it.
pub async fn run(
    client: kube::Client,
    usage: Arc<dyn AgentUsage>,
    config: PoolConfig,
    trigger: PoolTrigger,
) -> Result<(), PoolError> {
    let (pools, pods): (Api<SandboxPool>, Api<Pod>) = match &config.namespace {
        Some(ns) => (
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client.clone(), ns),
        ),
        None => (Api::all(client.clone()), Api::all(client.clone())),
    };
    let ctx = Arc::new(Ctx {
        client,
        usage,
        config,
        warned: Mutex::new(HashSet::new()),
    });
    let mut events = Controller::new(pools, watcher::Config::default())
        .owns(
            pods,
            watcher::Config::default().labels(&format!("{LABEL_APP}={LABEL_APP_AGENT}")),
        )
        .reconcile_all_on(trigger.stream())
        .run(reconcile, error_policy, ctx)
        .boxed();
    while let Some(event) = events.next().await {
        match event {
            Ok(_) | Err(ControllerError::ObjectNotFound(_)) => {}
            // Logged by error_policy, retried there.
            Err(ControllerError::ReconcilerFailed(..)) => {}
            // The watches retry with backoff.
            Err(ControllerError::QueueError(e)) => tracing::warn!(error = %e, "pool watch"),
            Err(ControllerError::RunnerError(e)) => return Err(PoolError::Runner(e.to_string())),
        }
    }
    Err(PoolError::Stopped)
}

fn error_policy(pool: Arc<SandboxPool>, error: &PoolError, ctx: Arc<Ctx>) -> Action {
    fsb_telemetry::metrics().reconcile_errors.inc("pools");
    let key = format!(
        "{}/{}",
        pool.namespace().unwrap_or_default(),
        pool.name_any()
    );
    let first = ctx
        .warned
        .lock()
        .map(|mut w| w.insert(key.clone()))
        .unwrap_or(true);
    if first {
        tracing::warn!(pool = %key, %error, "pool reconcile failed; retrying");
    } else {
        tracing::debug!(pool = %key, %error, "pool reconcile failed again");
    }
    Action::requeue(ctx.config.resync.min(Duration::from_secs(1)))
}

async fn reconcile(pool: Arc<SandboxPool>, ctx: Arc<Ctx>) -> Result<Action, PoolError> {
    let ns = pool
        .namespace()
        .ok_or(PoolError::MissingField("metadata.namespace"))?;
    let name = pool.name_any();
    let uid = pool.uid().ok_or(PoolError::MissingField("metadata.uid"))?;
    let pools: Api<SandboxPool> = Api::namespaced(ctx.client.clone(), &ns);
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let owned = owned_pods(&pods, &name, &uid).await?;

    if pool.meta().deletion_timestamp.is_some() {
        return cleanup(&pool, &pools, &pods, owned).await;
    }
    if !pool.finalizers().iter().any(|f| f == POOL_FINALIZER) {
        add_finalizer(&pool, &pools).await?;
    }

    let (template, hash) = match pod::rendered_template(&pool, &ctx.config) {
        Ok(rendered) => rendered,
        Err(e @ PoolError::InvalidTemplate(_)) => {
            report_not_ready(&pool, &pools, "InvalidTemplate", &e.to_string()).await?;
            return Err(e);
        }
        Err(e @ PoolError::InvalidSecurity(_)) => {
            report_not_ready(&pool, &pools, "InvalidSandboxSecurity", &e.to_string()).await?;
            return Err(e);
        }
        Err(e) => return Err(e),
    };
    if let Some(ca) = &ctx.config.ca {
        match ensure_tls_secret(&ctx.client, &pool, ca).await {
            Ok(()) => {}
            Err(e @ PoolError::Tls(_)) => {
                report_not_ready(&pool, &pools, "TlsSecretFailed", &e.to_string()).await?;
                return Err(e);
            }
            Err(e) => return Err(e),
        }
    }
    let views: Vec<PodView> = owned.iter().map(|p| view(p, &hash)).collect();
    let agents = ctx.usage.agents(&ns, &name);
    let pending = ctx.usage.pending(&ns, &name);
    let capacity = Capacity {
        pool_min: pool.spec.capacity.pool_min,
        pool_max: pool.spec.capacity.pool_max,
        buffer_min: pool.spec.capacity.buffer_min,
        buffer_max: pool.spec.capacity.buffer_max,
        per_pod: pool.spec.max_sandboxes_per_pod,
    };
    let plan = sizing::plan(&capacity, &views, &agents, pending);
    if plan.create > 0 || !plan.drain.is_empty() || !plan.delete.is_empty() {
        tracing::info!(
            pool = %format!("{ns}/{name}"),
            create = plan.create,
            drain = plan.drain.len(),
            delete = plan.delete.len(),
            busy_needed = plan.demand.busy_needed,
            desired = plan.demand.desired,
            "pool pass"
        );
    }

    for d in &plan.delete {
        tracing::info!(pod = %d.name, reason = ?d.reason, "deleting agent pod");
        delete_pod(&pods, &d.name, &d.uid, None).await?;
    }
    for pod_uid in &plan.drain {
        if !ctx.usage.drain(pod_uid) {
            tracing::debug!(%pod_uid, "drain: agent unknown to the registry");
        }
    }
    for _ in 0..plan.create {
        let pod = pod::agent_pod(&pool, &template, &hash)?;
        match pods.create(&PostParams::default(), &pod).await {
            Ok(created) => tracing::info!(pod = %created.name_any(), "created agent pod"),
            // The API server refuses the template's pods: say so where users look.
            Err(kube::Error::Api(e)) if e.code == 422 || e.code == 403 => {
                let message = format!("creating an agent pod: {}", e.message);
                report_not_ready(&pool, &pools, "PodCreateFailed", &message).await?;
                return Err(kube::Error::Api(e).into());
            }
            Err(e) => return Err(e.into()),
        }
    }

    let mut status = status_of(&pool, &views, &agents, &plan.demand);
    status.warm_ready = ctx.usage.warm_ready(&ns, &name);
    patch_status(&pool, &pools, status).await?;
    if let Ok(mut w) = ctx.warned.lock() {
        w.remove(&format!("{ns}/{name}"));
    }
    Ok(Action::requeue(ctx.config.resync))
}

/// Name of the Secret holding pool `pool`'s agent certificate (`ca.crt`, `tls.crt`,
/// `tls.key`).
pub fn tls_secret_name(pool: &str) -> String {
    format!("{pool}-agent-tls")
}

/// Make sure the pool's TLS Secret exists, is owned by this pool and holds a
/// certificate of the current CA for the pool's identity that is not about to expire;
/// (re)issue it otherwise. A Secret of that name the pool does not own is left alone
/// and reported.
async fn ensure_tls_secret(
    client: &kube::Client,
    pool: &SandboxPool,
    ca: &Ca,
) -> Result<(), PoolError> {
    let ns = pool
        .namespace()
        .ok_or(PoolError::MissingField("metadata.namespace"))?;
    let uid = pool.uid().ok_or(PoolError::MissingField("metadata.uid"))?;
    let name = tls_secret_name(&pool.name_any());
    let identity = fsb_agent::tls::agent_name(&pool.name_any(), &ns);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let existing = secrets.get_opt(&name).await?;
    if let Some(s) = &existing {
        let ours = s.owner_references().iter().any(|o| o.uid == uid);
        if !ours {
            return Err(PoolError::Tls(format!(
                "secret {ns}/{name} exists and is not owned by this pool"
            )));
        }
        if crate::tls::material_of(s).is_some_and(|m| ca.still_good(&m, &identity)) {
            return Ok(());
        }
    }
    let material = ca
        .issue(&identity)
        .map_err(|e| PoolError::Tls(e.to_string()))?;
    let mut secret = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(name.clone()),
            namespace: Some(ns.clone()),
            owner_references: Some(vec![pod::owner_of(pool)?]),
            labels: Some(std::collections::BTreeMap::from([(
                LABEL_POOL.to_owned(),
                pool.name_any(),
            )])),
            ..Default::default()
        },
        data: Some(crate::tls::material_data(&material)),
        type_: Some("Opaque".to_owned()),
        ..Default::default()
    };
    match existing {
        // Replace carries the resourceVersion read: a concurrent writer makes it 409,
        // and the pass is retried.
        Some(s) => {
            secret.metadata.resource_version = s.resource_version();
            secrets
                .replace(&name, &PostParams::default(), &secret)
                .await?;
            tracing::info!(secret = %format!("{ns}/{name}"), "reissued the agent certificate");
        }
        None => {
            secrets.create(&PostParams::default(), &secret).await?;
            tracing::info!(secret = %format!("{ns}/{name}"), "issued the agent certificate");
        }
    }
    Ok(())
}

/// The pool's pods: its labels and controlled by this pool object (not a deleted pool
/// of the same name).
async fn owned_pods(pods: &Api<Pod>, pool: &str, uid: &str) -> Result<Vec<Pod>, PoolError> {
    let selector = format!("{LABEL_APP}={LABEL_APP_AGENT},{LABEL_POOL}={pool}");
    Ok(pods
        .list(&ListParams::default().labels(&selector))
        .await?
        .items
        .into_iter()
        .filter(|p| {
            p.owner_references()
                .iter()
                .any(|o| o.controller == Some(true) && o.uid == uid)
        })
        .collect())
}

fn view(pod: &Pod, hash: &str) -> PodView {
    let status = pod.status.as_ref();
    PodView {
        name: pod.name_any(),
        uid: pod.uid().unwrap_or_default(),
        phase: PodPhase::parse(status.and_then(|s| s.phase.as_deref())),
        ready: pod_ready(pod),
        deleting: pod.meta().deletion_timestamp.is_some(),
        current: pod
            .annotations()
            .get(POD_TEMPLATE_HASH_ANNOTATION)
            .map(String::as_str)
            == Some(hash),
    }
}

/// The pod's Ready condition is True.
pub fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

async fn delete_pod(
    pods: &Api<Pod>,
    name: &str,
    uid: &str,
    grace: Option<u32>,
) -> Result<(), PoolError> {
    let params = DeleteParams {
        grace_period_seconds: grace,
        preconditions: Some(Preconditions {
            uid: Some(uid.to_owned()),
            resource_version: None,
        }),
        ..DeleteParams::default()
    };
    match pods.delete(name, &params).await {
        Ok(_) => Ok(()),
        // Gone already, or a different pod of that name now.
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

async fn add_finalizer(pool: &SandboxPool, pools: &Api<SandboxPool>) -> Result<(), PoolError> {
    let mut finalizers = pool.finalizers().to_vec();
    finalizers.push(POOL_FINALIZER.to_owned());
    set_finalizers(pool, pools, finalizers).await
}

/// A merge patch carrying the resourceVersion it was computed from: the API server
/// answers 409 if the list changed meanwhile (the pass is retried), so another
/// controller's finalizer is never dropped.
async fn set_finalizers(
    pool: &SandboxPool,
    pools: &Api<SandboxPool>,
    finalizers: Vec<String>,
) -> Result<(), PoolError> {
    let patch = serde_json::json!({
        "metadata": {"finalizers": finalizers, "resourceVersion": pool.resource_version()},
    });
    pools
        .patch(
            &pool.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await?;
    Ok(())
}

async fn cleanup(
    pool: &SandboxPool,
    pools: &Api<SandboxPool>,
    pods: &Api<Pod>,
    owned: Vec<Pod>,
) -> Result<Action, PoolError> {
    let Some(index) = pool.finalizers().iter().position(|f| f == POOL_FINALIZER) else {
        return Ok(Action::await_change());
    };
    if !owned.is_empty() {
        for p in owned
            .iter()
            .filter(|p| p.meta().deletion_timestamp.is_none())
        {
            tracing::info!(pod = %p.name_any(), "pool deleted: deleting agent pod");
            delete_pod(pods, &p.name_any(), &p.uid().unwrap_or_default(), None).await?;
        }
        // Pods terminate gracefully; look again shortly.
        return Ok(Action::requeue(Duration::from_millis(500)));
    }
    // Garbage collection would remove it too; not every API server runs one.
    let secrets: Api<Secret> = Api::namespaced(
        pods.clone().into_client(),
        &pool.namespace().unwrap_or_default(),
    );
    let secret = tls_secret_name(&pool.name_any());
    if let Some(s) = secrets.get_opt(&secret).await?
        && s.owner_references()
            .iter()
            .any(|o| Some(&o.uid) == pool.uid().as_ref())
    {
        match secrets.delete(&secret, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
    }
    let mut finalizers = pool.finalizers().to_vec();
    finalizers.remove(index);
    match set_finalizers(pool, pools, finalizers).await {
        Ok(()) => Ok(Action::await_change()),
        Err(PoolError::Kube(kube::Error::Api(e))) if e.code == 404 => Ok(Action::await_change()),
        Err(e) => Err(e),
    }
}

fn condition(
    previous: &[Condition],
    type_: &str,
    ok: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
) -> Condition {
    let status = if ok { "True" } else { "False" };
    // The transition time moves only when the status does.
    let since = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| Time(k8s_openapi::jiff::Timestamp::now()));
    Condition {
        type_: type_.to_owned(),
        status: status.to_owned(),
        reason: reason.to_owned(),
        message,
        last_transition_time: since,
        observed_generation: generation,
    }
}

fn status_of(
    pool: &SandboxPool,
    views: &[PodView],
    agents: &[AgentLoad],
    demand: &Demand,
) -> SandboxPoolStatus {
    let live: Vec<&PodView> = views
        .iter()
        .filter(|v| !v.deleting && !matches!(v.phase, PodPhase::Failed | PodPhase::Succeeded))
        .collect();
    let ready = live.iter().filter(|v| v.ready).count() as u32;
    let busy = agents.iter().filter(|a| a.used > 0).count() as u32;
    let previous = pool
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    let generation = pool.meta().generation;
    let (ready_ok, ready_reason, ready_msg) = if ready >= demand.desired {
        (
            true,
            "PodsReady",
            format!("{ready} agent pods ready, {} wanted", demand.desired),
        )
    } else {
        (
            false,
            "PodsStarting",
            format!("{ready} of {} wanted agent pods ready", demand.desired),
        )
    };
    let cap = &pool.spec.capacity;
    let (limit_reason, limit_msg) = if demand.limited {
        (
            "PoolMaxReached",
            format!(
                "demand needs {} pods ({} for {} used + {} pending sandboxes, bufferMin {}) but poolMax is {}",
                u64::from(demand.busy_needed) + u64::from(cap.buffer_min),
                demand.busy_needed,
                demand.used,
                demand.pending,
                cap.buffer_min,
                cap.pool_max
            ),
        )
    } else {
        (
            "WithinLimits",
            format!("demand fits in poolMax {}", cap.pool_max),
        )
    };
    SandboxPoolStatus {
        current_pods: live.len() as u32,
        ready_pods: ready,
        total_agents: agents.len() as u32,
        idle_agents: agents.len() as u32 - busy,
        busy_agents: busy,
        warm_ready: 0,
        conditions: vec![
            condition(
                previous,
                "Ready",
                ready_ok,
                ready_reason,
                ready_msg,
                generation,
            ),
            condition(
                previous,
                "ScalingLimited",
                demand.limited,
                limit_reason,
                limit_msg,
                generation,
            ),
        ],
    }
}

/// Ready=False with `reason` when a pass cannot go on (the rest of the status stays).
async fn report_not_ready(
    pool: &SandboxPool,
    pools: &Api<SandboxPool>,
    reason: &str,
    message: &str,
) -> Result<(), PoolError> {
    let mut status = pool.status.clone().unwrap_or_default();
    let ready = condition(
        &status.conditions,
        "Ready",
        false,
        reason,
        message.to_owned(),
        pool.meta().generation,
    );
    status.conditions.retain(|c| c.type_ != "Ready");
    status.conditions.insert(0, ready);
    patch_status(pool, pools, status).await
}

async fn patch_status(
    pool: &SandboxPool,
    pools: &Api<SandboxPool>,
    status: SandboxPoolStatus,
) -> Result<(), PoolError> {
    if pool.status.as_ref() == Some(&status) {
        return Ok(());
    }
    let patch = serde_json::json!({"status": status});
    match pools
        .patch_status(
            &pool.name_any(),
            &PatchParams {
                field_manager: Some(MANAGER.to_owned()),
                ..PatchParams::default()
            },
            &Patch::Merge(&patch),
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}
