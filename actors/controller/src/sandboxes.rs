//! The Sandbox loop: what the fast path does not do by itself in Kubernetes mode.
//!
//! Each pass (every `interval`, one at a time: a slow pass makes the next tick be
//! skipped, never queued — seed-review item 13):
//! - a Sandbox whose spec does not validate (e.g. it names the agent's port) goes
//!   Failed with condition `Ready=False, reason InvalidSpec` and the message; deleting
//!   it just drops the finalizer (nothing was started);
//! - a Pending Sandbox (created with kubectl, or waiting for recreation) is placed
//!   through [`Gateway::place`]; if it cannot be, condition `Scheduled=False` says why:
//!   `NoPool` (no such SandboxPool in its namespace), `Unschedulable` (no free slot),
//!   `PortConflict` (its ports are taken on every agent) or `PlacementFailed`;
//! - a Lost `AutoRecreate` Sandbox is recreated elsewhere once `recoveryTimeoutSeconds`
//!   have passed since `status.phaseTime` (persisted, so a controller restart does not
//!   reset the clock); `Manual` ones stay Lost;
//! - an agent is declared lost ([`Gateway::lose_agent`]) when its pod is proven gone
//!   (NotFound, another UID, or phase Failed/Succeeded) or it has been disconnected
//!   longer than `agent_lost_after`; an API error proves nothing (seed-review item 9).
//!
//! Expiry, deletes (kubectl's included: an object being deleted reads as
//! Terminating) and resets are the gateway's sweeper's.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use fsb_core::{AgentId, labels::SANDBOX_FINALIZER, spec::SpecLimits};
use fsb_gateway::{Gateway, GatewayError};
use fsb_registry::RegistryError;
use fsb_store::Phase;
use k8s_openapi::{
    api::core::v1::Pod,
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{ListParams, Patch, PatchParams},
};
use serde_json::json;

use crate::{
    agents::AgentBook,
    crd::{Sandbox, SandboxPool},
    store::{ANNOTATION_INITIAL_STATUS, KubeStore, to_record},
};

/// An object whose status is still missing this long after its creation lost its
/// status write with the process that created it (the writes are milliseconds
/// apart); the Sandbox loop writes the intended status then.
const INTERRUPTED_CREATE_AFTER: Duration = Duration::from_secs(10);

/// How the loop behaves.
#[derive(Clone, Debug)]
pub struct SandboxLoopConfig {
    /// Time between passes.
    pub interval: Duration,
    /// A disconnected agent whose pod still exists is declared lost after this long.
    pub agent_lost_after: Duration,
    /// Spec limits (the agent port among them), as the store validates.
    pub limits: SpecLimits,
    /// Only this namespace (None: every namespace).
    pub scope: Option<String>,
}

/// Sandboxes waiting for capacity, per (namespace, pool): what pool sizing needs.
#[derive(Debug, Default)]
pub struct PendingDemand {
    counts: Mutex<HashMap<(String, String), u32>>,
}

impl PendingDemand {
    /// Sandboxes of `pool` in `namespace` waiting for a slot.
    pub fn get(&self, namespace: &str, pool: &str) -> u32 {
        self.counts
            .lock()
            .ok()
            .and_then(|c| c.get(&(namespace.to_owned(), pool.to_owned())).copied())
            .unwrap_or(0)
    }

    fn set(&self, counts: HashMap<(String, String), u32>) {
        if let Ok(mut c) = self.counts.lock() {
            *c = counts;
        }
    }
}

/// The loop's state across passes.
pub struct SandboxLoop {
    client: Client,
    gateway: Gateway<KubeStore>,
    book: Arc<AgentBook>,
    demand: Arc<PendingDemand>,
    config: SandboxLoopConfig,
    started: Instant,
}

impl std::fmt::Debug for SandboxLoop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SandboxLoop").finish_non_exhaustive()
    }
}

/// Why a Sandbox could not be placed: (reason, message) of its Scheduled condition.
fn unplaced(e: &GatewayError) -> (&'static str, String) {
    match e {
        GatewayError::Registry(
            RegistryError::NoAgents { .. } | RegistryError::NoHealthyAgent { .. },
        ) => ("NoAgents", e.to_string()),
        GatewayError::Registry(RegistryError::NoFreeSlot { .. }) => {
            ("Unschedulable", e.to_string())
        }
        GatewayError::Registry(RegistryError::PortsInUse { .. }) => ("PortConflict", e.to_string()),
        _ => ("PlacementFailed", e.to_string()),
    }
}

/// An Api over `scope`'s namespace, or every namespace.
pub fn scoped<K>(client: &Client, scope: Option<&str>) -> Api<K>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    K::DynamicType: Default,
{
    match scope {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

fn condition(
    kind: &str,
    ok: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
) -> Condition {
    Condition {
        type_: kind.to_owned(),
        status: if ok { "True" } else { "False" }.to_owned(),
        reason: reason.to_owned(),
        message: message.to_owned(),
        last_transition_time: Time(Timestamp::now()),
        observed_generation: generation,
    }
}

impl SandboxLoop {
    /// A loop over `client`'s Sandboxes, placing through `gateway`.
    pub fn new(
        client: Client,
        gateway: Gateway<KubeStore>,
        book: Arc<AgentBook>,
        demand: Arc<PendingDemand>,
        config: SandboxLoopConfig,
    ) -> Self {
        Self {
            client,
            gateway,
            book,
            demand,
            config,
            started: Instant::now(),
        }
    }

    /// Pass after pass until an error the supervisor should see (the API server
    /// failing is retried here, not returned).
    pub async fn run(self) -> Result<(), GatewayError> {
        let mut tick = tokio::time::interval(self.config.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tick.tick().await;
            if let Err(e) = self.pass().await {
                fsb_telemetry::metrics().reconcile_errors.inc("sandboxes");
                tracing::warn!(error = %e, "sandbox pass failed; retrying next tick");
            }
        }
    }

    /// One pass.
    pub async fn pass(&self) -> Result<(), kube::Error> {
        let all: Api<Sandbox> = scoped(&self.client, self.config.scope.as_deref());
        let objects = all.list(&ListParams::default()).await?.items;
        let mut demand: HashMap<(String, String), u32> = HashMap::new();
        let mut pools_seen: HashMap<(String, String), bool> = HashMap::new();
        for obj in &objects {
            let ns = obj.metadata.namespace.clone().unwrap_or_default();
            let name = obj.metadata.name.clone().unwrap_or_default();
            let record = match to_record(obj, &self.config.limits) {
                Ok(r) => r,
                Err(e) => {
                    self.invalid(obj, &ns, &name, &e.to_string()).await;
                    continue;
                }
            };
            self.finish_interrupted_create(obj, &ns, &name).await;
            match record.phase {
                Phase::Pending if record.agent.is_none() => {
                    match self.gateway.place(&ns, &name).await {
                        Ok(true) => {
                            self.set_condition(
                                &ns,
                                &name,
                                condition(
                                    "Scheduled",
                                    true,
                                    "Placed",
                                    "placed on an agent",
                                    obj.metadata.generation,
                                ),
                            )
                            .await;
                        }
                        Ok(false) => {}
                        Err(e) => {
                            let pool = obj.spec.pool_ref.clone();
                            let key = (ns.clone(), pool.clone());
                            let exists = match pools_seen.get(&key) {
                                Some(b) => *b,
                                None => {
                                    let pools: Api<SandboxPool> =
                                        Api::namespaced(self.client.clone(), &ns);
                                    // Unknown (API error) counts as existing: no claim is made.
                                    let b = !matches!(pools.get_opt(&pool).await, Ok(None));
                                    pools_seen.insert(key.clone(), b);
                                    b
                                }
                            };
                            let (reason, message) = if exists {
                                unplaced(&e)
                            } else {
                                (
                                    "NoPool",
                                    format!("no SandboxPool {pool:?} in namespace {ns:?}"),
                                )
                            };
                            if matches!(reason, "Unschedulable" | "PortConflict" | "NoAgents") {
                                *demand.entry(key).or_default() += 1;
                            }
                            self.set_condition(
                                &ns,
                                &name,
                                condition(
                                    "Scheduled",
                                    false,
                                    reason,
                                    &message,
                                    obj.metadata.generation,
                                ),
                            )
                            .await;
                        }
                    }
                }
                Phase::Lost
                    if record.spec.failure_policy
                        == fsb_core::spec::FailurePolicy::AutoRecreate =>
                {
                    let since = obj
                        .status
                        .as_ref()
                        .and_then(|s| s.phase_time.as_ref())
                        .map_or(0, |t| t.0.as_millisecond());
                    let due =
                        since + i64::from(obj.spec.recovery_timeout_seconds).saturating_mul(1000);
                    if Timestamp::now().as_millisecond() >= due {
                        match self.gateway.recreate(&ns, &name).await {
                            Ok(true) => {
                                tracing::info!(namespace = %ns, name = %name, "recreating a lost sandbox")
                            }
                            Ok(false) => {}
                            Err(e) => {
                                tracing::warn!(namespace = %ns, name = %name, error = %e, "recreate")
                            }
                        }
                    }
                }
                _ => {}
            }
        }
        self.demand.set(demand);
        self.lost_agents(&objects).await;
        Ok(())
    }

    /// A create is two writes (object, then status). A controller killed between them
    /// leaves the intended status only in an annotation: the store already reads it
    /// so, and this writes it, so `kubectl get` and watchers see it too.
    async fn finish_interrupted_create(&self, obj: &Sandbox, ns: &str, name: &str) {
        if obj.status.as_ref().is_some_and(|s| s.phase.is_some()) {
            return;
        }
        let Some(intended) = obj
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(ANNOTATION_INITIAL_STATUS))
            .and_then(|j| serde_json::from_str::<serde_json::Value>(j).ok())
        else {
            return;
        };
        let age_ms = obj.metadata.creation_timestamp.as_ref().map_or(0, |t| {
            Timestamp::now().as_millisecond() - t.0.as_millisecond()
        });
        if age_ms < i64::try_from(INTERRUPTED_CREATE_AFTER.as_millis()).unwrap_or(i64::MAX) {
            return;
        }
        let api: Api<Sandbox> = Api::namespaced(self.client.clone(), ns);
        match api
            .patch_status(
                name,
                &PatchParams::default(),
                &Patch::Merge(&json!({"status": intended})),
            )
            .await
        {
            Ok(_) => {
                tracing::info!(namespace = %ns, name = %name, "wrote the status of an interrupted create")
            }
            Err(e) => {
                tracing::warn!(namespace = %ns, name = %name, error = %e, "writing the status of an interrupted create")
            }
        }
    }

    /// Mark an object whose spec does not validate, or let it go if it is deleted.
    async fn invalid(&self, obj: &Sandbox, ns: &str, name: &str, why: &str) {
        let api: Api<Sandbox> = Api::namespaced(self.client.clone(), ns);
        if obj.metadata.deletion_timestamp.is_some() {
            let finalizers: Vec<String> = obj
                .metadata
                .finalizers
                .iter()
                .flatten()
                .filter(|f| *f != SANDBOX_FINALIZER)
                .cloned()
                .collect();
            let patch = json!({"metadata": {"finalizers": finalizers, "resourceVersion": obj.metadata.resource_version}});
            let _ = api
                .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                .await;
            return;
        }
        let status = obj.status.clone().unwrap_or_default();
        let already = status
            .conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.reason == "InvalidSpec" && c.message == why);
        if already {
            return;
        }
        // The finalizer lets a later delete be seen here too.
        if !obj
            .metadata
            .finalizers
            .iter()
            .flatten()
            .any(|f| f == SANDBOX_FINALIZER)
        {
            let mut finalizers = obj.metadata.finalizers.clone().unwrap_or_default();
            finalizers.push(SANDBOX_FINALIZER.to_owned());
            let patch = json!({"metadata": {"finalizers": finalizers}});
            let _ = api
                .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                .await;
        }
        let patch = json!({"status": {
            "phase": "Failed",
            "conditions": [condition("Ready", false, "InvalidSpec", why, obj.metadata.generation)],
        }});
        if let Err(e) = api
            .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            tracing::warn!(namespace = %ns, name = %name, error = %e, "marking an invalid Sandbox");
        }
    }

    /// Set the one condition of `kind`, keeping the others; unchanged if equal.
    async fn set_condition(&self, ns: &str, name: &str, c: Condition) {
        let api: Api<Sandbox> = Api::namespaced(self.client.clone(), ns);
        let Ok(Some(obj)) = api.get_opt(name).await else {
            return;
        };
        let status = obj.status.unwrap_or_default();
        let mut conditions: BTreeMap<String, Condition> = status
            .conditions
            .into_iter()
            .map(|c| (c.type_.clone(), c))
            .collect();
        if let Some(old) = conditions.get(&c.type_)
            && old.status == c.status
            && old.reason == c.reason
            && old.message == c.message
        {
            return;
        }
        conditions.insert(c.type_.clone(), c);
        let mut patch =
            json!({"status": {"conditions": conditions.into_values().collect::<Vec<_>>()}});
        if status.phase.is_none() {
            patch["status"]["phase"] = json!("Pending");
        }
        if let Err(e) = api
            .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            tracing::debug!(namespace = %ns, name = %name, error = %e, "condition write");
        }
    }

    /// Declare lost the agents that are proven gone or away too long.
    async fn lost_agents(&self, objects: &[Sandbox]) {
        let book = self.book.all();
        let mut suspects: HashSet<AgentId> = book
            .iter()
            .filter(|(_, a)| !a.connected)
            .map(|(id, _)| id.clone())
            .collect();
        // Agents records name that never registered since this controller started.
        if self.started.elapsed() >= self.config.agent_lost_after {
            for obj in objects {
                if let Some(agent) = obj.status.as_ref().and_then(|s| s.agent_uid.as_deref()) {
                    let id = AgentId::from(agent);
                    if !self.gateway.has_agent(&id) && self.book.get(&id).is_none() {
                        suspects.insert(id);
                    }
                }
            }
        }
        if suspects.is_empty() {
            return;
        }
        // One list of agent pods answers for all (an error: nothing is proven).
        let pods: Api<Pod> = scoped(&self.client, self.config.scope.as_deref());
        let Ok(list) = pods
            .list(&ListParams::default().labels(&format!(
                "{}={}",
                fsb_core::labels::LABEL_APP,
                fsb_core::labels::LABEL_APP_AGENT
            )))
            .await
        else {
            return;
        };
        let alive: HashSet<String> = list
            .items
            .iter()
            .filter(|p| {
                !matches!(
                    p.status.as_ref().and_then(|s| s.phase.as_deref()),
                    Some("Failed" | "Succeeded")
                )
            })
            .filter_map(|p| p.metadata.uid.clone())
            .collect();
        for id in suspects {
            let away_too_long = match self.book.get(&id) {
                Some(a) => a
                    .disconnected_at
                    .is_some_and(|t| t.elapsed() >= self.config.agent_lost_after),
                None => true,
            };
            let pod_gone = !alive.contains(id.as_str());
            if pod_gone || away_too_long {
                tracing::warn!(agent = %id, pod_gone, away_too_long, "agent lost");
                match self.gateway.lose_agent(&id).await {
                    Ok(n) => {
                        tracing::info!(agent = %id, sandboxes = n, "sandboxes of a lost agent marked Lost");
                        self.book.remove(&id);
                    }
                    Err(e) => tracing::warn!(agent = %id, error = %e, "declaring an agent lost"),
                }
            }
        }
    }
}
