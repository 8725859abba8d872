//! The scan: list the node's managed containers, gather the API server's answers for
//! those old enough to be orphans, [`decide`] each, remove the orphans. The loop runs
//! one scan at a time; ticks missed while a scan runs are skipped, never queued
//! (seed-review item 13).

use std::{
    collections::{HashMap, HashSet},
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use fsb_agent::runtime::ContainerdRuntime;
use fsb_core::SandboxId;
use serde::Serialize;
use tokio::time::MissedTickBehavior;

use crate::{
    cluster::ClusterView,
    error::JanitorError,
    state::{ContainerFacts, Existence, KeepReason, SandboxFacts, Verdict, decide},
};

/// Default seconds between scans.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(30);
/// Default age below which a container is never removed.
pub const DEFAULT_ORPHAN_TIMEOUT: Duration = Duration::from_secs(120);
/// Default time between SIGTERM and SIGKILL when removing.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(10);

/// How the janitor runs.
#[derive(Clone, Debug)]
pub struct JanitorConfig {
    /// This node's name (for logs).
    pub node_name: String,
    /// Time between scan starts.
    pub interval: Duration,
    /// A container younger than this is never removed: a FAST create's record may
    /// still be on its way to the API server.
    pub orphan_timeout: Duration,
    /// SIGTERM -> SIGKILL grace when removing.
    pub grace: Duration,
}

impl Default for JanitorConfig {
    fn default() -> Self {
        Self {
            node_name: String::new(),
            interval: DEFAULT_INTERVAL,
            orphan_timeout: DEFAULT_ORPHAN_TIMEOUT,
            grace: DEFAULT_GRACE,
        }
    }
}

/// The node's containers: the containerd seam (a fake in the loop's unit tests).
pub trait NodeContainers: Send + Sync {
    /// Every container labelled `fast-sandbox.io/managed=true`, any agent.
    fn list(&self) -> impl Future<Output = Result<Vec<ContainerFacts>, JanitorError>> + Send;

    /// Stop (SIGTERM, `grace`, SIGKILL) and remove it with its task, snapshot, lease
    /// and logs; `Ok(false)` if it was already gone.
    fn remove(
        &self,
        id: &SandboxId,
        grace: Duration,
    ) -> impl Future<Output = Result<bool, JanitorError>> + Send;
}

impl NodeContainers for ContainerdRuntime {
    async fn list(&self) -> Result<Vec<ContainerFacts>, JanitorError> {
        Ok(ContainerdRuntime::list(self, None)
            .await?
            .iter()
            .map(|o| ContainerFacts::from_labels(&o.id, &o.labels, o.created_at))
            .collect())
    }

    async fn remove(&self, id: &SandboxId, grace: Duration) -> Result<bool, JanitorError> {
        Ok(ContainerdRuntime::remove(self, id, grace).await?)
    }
}

/// Counters since start, as read at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct JanitorStats {
    /// Scans completed (including failed ones).
    pub scans: u64,
    /// Scans that failed before deciding anything (containerd list failed).
    pub scan_errors: u64,
    /// Containers examined, summed over scans.
    pub scanned: u64,
    /// Containers removed.
    pub removed: u64,
    /// Removals that failed (retried next scan).
    pub failed: u64,
    /// Containers kept because an answer was unknown (retried next scan).
    pub unknown: u64,
}

/// What one scan did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ScanReport {
    /// Containers examined.
    pub scanned: u64,
    /// Containers removed.
    pub removed: Vec<SandboxId>,
    /// Removals that failed.
    pub failed: u64,
    /// Containers kept because an answer was unknown.
    pub unknown: u64,
}

#[derive(Debug, Default)]
struct Counters {
    scans: AtomicU64,
    scan_errors: AtomicU64,
    scanned: AtomicU64,
    removed: AtomicU64,
    failed: AtomicU64,
    unknown: AtomicU64,
}

/// One node's janitor.
#[derive(Debug)]
pub struct Janitor<C, N> {
    cluster: C,
    containers: N,
    config: JanitorConfig,
    counters: Arc<Counters>,
}

/// The agent pods of one scan, listed at most once, on first need.
enum AgentPods {
    NotListed,
    Listed(HashSet<String>),
    Failed(String),
}

impl<C: ClusterView, N: NodeContainers> Janitor<C, N> {
    /// A janitor asking `cluster` about the containers of `containers`.
    pub fn new(cluster: C, containers: N, config: JanitorConfig) -> Self {
        Self {
            cluster,
            containers,
            config,
            counters: Arc::default(),
        }
    }

    /// The API-server seam.
    pub fn cluster(&self) -> &C {
        &self.cluster
    }

    /// The containerd seam.
    pub fn containers(&self) -> &N {
        &self.containers
    }

    /// Counters since start.
    pub fn stats(&self) -> JanitorStats {
        let c = &self.counters;
        JanitorStats {
            scans: c.scans.load(Ordering::Relaxed),
            scan_errors: c.scan_errors.load(Ordering::Relaxed),
            scanned: c.scanned.load(Ordering::Relaxed),
            removed: c.removed.load(Ordering::Relaxed),
            failed: c.failed.load(Ordering::Relaxed),
            unknown: c.unknown.load(Ordering::Relaxed),
        }
    }

    /// Scan every `interval` until `shutdown` completes. One scan at a time; a tick
    /// missed while a scan runs is skipped. Shutdown may interrupt a scan between two
    /// containerd calls; removal is idempotent, so the next start finishes the job.
    pub async fn run(&self, shutdown: impl Future<Output = ()>) {
        let mut tick = tokio::time::interval(self.config.interval);
        tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                _ = tick.tick() => {}
            }
            tokio::select! {
                () = &mut shutdown => break,
                result = self.scan_once() => {
                    if let Err(e) = result {
                        tracing::warn!(node = %self.config.node_name, error = %e, "scan failed; retrying next tick");
                    }
                }
            }
        }
    }

    /// One scan at the current time. Also counted in the process-wide metrics
    /// (`fsb_janitor_scans_total`, `fsb_janitor_containers_total`).
    pub async fn scan_once(&self) -> Result<ScanReport, JanitorError> {
        let result = self.scan_at(SystemTime::now()).await;
        self.counters.scans.fetch_add(1, Ordering::Relaxed);
        let m = fsb_telemetry::metrics();
        match &result {
            Ok(report) => {
                m.janitor_scans.inc("ok");
                for (outcome, n) in [
                    ("scanned", report.scanned),
                    ("removed", report.removed.len() as u64),
                    ("failed", report.failed),
                    ("unknown", report.unknown),
                ] {
                    m.janitor_containers.inc_by(outcome, n);
                }
            }
            Err(_) => {
                self.counters.scan_errors.fetch_add(1, Ordering::Relaxed);
                m.janitor_scans.inc("error");
            }
        }
        result
    }

    async fn scan_at(&self, now: SystemTime) -> Result<ScanReport, JanitorError> {
        let timeout = self.config.orphan_timeout;
        let containers = self.containers.list().await?;
        let mut report = ScanReport::default();
        let mut sandboxes: HashMap<(String, String), Existence<SandboxFacts>> = HashMap::new();
        let mut pods = AgentPods::NotListed;
        for c in containers {
            report.scanned += 1;
            self.counters.scanned.fetch_add(1, Ordering::Relaxed);
            let (sandbox, agent) = if c.needs_lookup(now, timeout) {
                let sandbox = match c.sandbox_key() {
                    Some((ns, name)) => {
                        let key = (ns.to_owned(), name.to_owned());
                        match sandboxes.get(&key) {
                            Some(known) => known.clone(),
                            None => {
                                let answer = self.cluster.sandbox(ns, name).await;
                                sandboxes.insert(key, answer.clone());
                                answer
                            }
                        }
                    }
                    None => Existence::Unknown("no namespace or sandbox-name label".into()),
                };
                let agent = match &c.agent_uid {
                    Some(uid) => {
                        if matches!(pods, AgentPods::NotListed) {
                            pods = match self.cluster.agent_pod_uids().await {
                                Ok(uids) => AgentPods::Listed(uids),
                                Err(e) => AgentPods::Failed(e),
                            };
                        }
                        match &pods {
                            AgentPods::Listed(uids) if uids.contains(uid) => Existence::Exists(()),
                            AgentPods::Listed(_) => Existence::Gone,
                            AgentPods::Failed(e) => {
                                Existence::Unknown(format!("listing agent pods: {e}"))
                            }
                            AgentPods::NotListed => {
                                Existence::Unknown("agent pods not listed".into())
                            }
                        }
                    }
                    None => Existence::Unknown("no agent-uid label".into()),
                };
                (sandbox, agent)
            } else {
                let why = "not looked up";
                (
                    Existence::Unknown(why.into()),
                    Existence::Unknown(why.into()),
                )
            };
            match decide(&c, &sandbox, &agent, now, timeout) {
                Verdict::Remove(reason) => {
                    let (ns, name) = c.sandbox_key().unwrap_or_default();
                    match self.containers.remove(&c.id, self.config.grace).await {
                        Ok(_) => {
                            self.counters.removed.fetch_add(1, Ordering::Relaxed);
                            tracing::info!(
                                node = %self.config.node_name, container = %c.id, namespace = ns,
                                sandbox = name, %reason, "removed orphan container"
                            );
                            report.removed.push(c.id.clone());
                        }
                        Err(e) => {
                            self.counters.failed.fetch_add(1, Ordering::Relaxed);
                            report.failed += 1;
                            tracing::warn!(
                                node = %self.config.node_name, container = %c.id, namespace = ns,
                                sandbox = name, %reason, error = %e,
                                "removing orphan container failed; retrying next scan"
                            );
                        }
                    }
                }
                Verdict::Keep(KeepReason::Unknown(why)) => {
                    self.counters.unknown.fetch_add(1, Ordering::Relaxed);
                    report.unknown += 1;
                    tracing::warn!(
                        node = %self.config.node_name, container = %c.id, %why,
                        "cannot tell whether the container is an orphan; kept, retrying next scan"
                    );
                }
                Verdict::Keep(reason) => {
                    tracing::debug!(container = %c.id, ?reason, "kept");
                }
            }
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::Mutex;

    use fsb_agent::AgentError;

    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(60);

    /// A working in-memory API server: Sandboxes by (namespace, name), agent pod UIDs,
    /// and a switch that makes every answer unknown.
    #[derive(Default)]
    struct FakeCluster {
        sandboxes: Mutex<HashMap<(String, String), SandboxFacts>>,
        pods: Mutex<HashSet<String>>,
        down: Mutex<bool>,
        gets: AtomicU64,
        lists: AtomicU64,
    }

    impl ClusterView for FakeCluster {
        async fn sandbox(&self, namespace: &str, name: &str) -> Existence<SandboxFacts> {
            self.gets.fetch_add(1, Ordering::SeqCst);
            if *self.down.lock().unwrap() {
                return Existence::Unknown("connection refused".into());
            }
            let key = (namespace.to_owned(), name.to_owned());
            match self.sandboxes.lock().unwrap().get(&key) {
                Some(s) => Existence::Exists(s.clone()),
                None => Existence::Gone,
            }
        }

        async fn agent_pod_uids(&self) -> Result<HashSet<String>, String> {
            self.lists.fetch_add(1, Ordering::SeqCst);
            if *self.down.lock().unwrap() {
                return Err("connection refused".into());
            }
            Ok(self.pods.lock().unwrap().clone())
        }
    }

    /// A working in-memory containerd: containers, removals that fail while `failing`,
    /// a list that takes `list_delay`, and the most lists seen in flight at once.
    #[derive(Default)]
    struct FakeNode {
        containers: Mutex<Vec<ContainerFacts>>,
        failing: Mutex<bool>,
        /// Delay of the first list; later lists answer at once.
        first_list_delay: Duration,
        lists: AtomicU64,
        in_flight: AtomicU64,
        max_in_flight: AtomicU64,
        list_fails: Mutex<bool>,
    }

    impl NodeContainers for FakeNode {
        async fn list(&self) -> Result<Vec<ContainerFacts>, JanitorError> {
            let n = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            self.max_in_flight.fetch_max(n, Ordering::SeqCst);
            if self.lists.fetch_add(1, Ordering::SeqCst) == 0 {
                tokio::time::sleep(self.first_list_delay).await;
            }
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            if *self.list_fails.lock().unwrap() {
                return Err(AgentError::Unavailable("socket gone".into()).into());
            }
            Ok(self.containers.lock().unwrap().clone())
        }

        async fn remove(&self, id: &SandboxId, _grace: Duration) -> Result<bool, JanitorError> {
            if *self.failing.lock().unwrap() {
                return Err(AgentError::Unavailable("socket gone".into()).into());
            }
            let mut cs = self.containers.lock().unwrap();
            let before = cs.len();
            cs.retain(|c| &c.id != id);
            Ok(cs.len() != before)
        }
    }

    fn container(ns: &str, name: &str, claim: &str, agent: &str, age: Duration) -> ContainerFacts {
        let id = SandboxId::generate();
        ContainerFacts {
            managed: true,
            namespace: Some(ns.into()),
            sandbox_name: Some(name.into()),
            claim_uid: Some(claim.into()),
            sandbox_id: Some(id.as_str().into()),
            agent_uid: Some(agent.into()),
            created_at: Some(SystemTime::now() - age),
            id,
        }
    }

    fn janitor(cluster: FakeCluster, node: FakeNode) -> Janitor<FakeCluster, FakeNode> {
        Janitor::new(
            cluster,
            node,
            JanitorConfig {
                node_name: "node-a".into(),
                interval: Duration::from_secs(1),
                orphan_timeout: TIMEOUT,
                grace: Duration::ZERO,
            },
        )
    }

    fn ids(j: &Janitor<FakeCluster, FakeNode>) -> Vec<SandboxId> {
        j.containers
            .containers
            .lock()
            .unwrap()
            .iter()
            .map(|c| c.id.clone())
            .collect()
    }

    #[tokio::test]
    async fn a_scan_removes_proven_orphans_and_counts_the_rest() {
        let old = TIMEOUT * 2;
        let live = container("team-a", "live", "c1", "agent-1", old);
        let gone = container("team-b", "gone", "c2", "agent-1", old);
        let young = container("team-b", "young", "c3", "agent-1", Duration::ZERO);
        let orphaned_by_agent = container("team-a", "live2", "c4", "agent-dead", old);
        let cluster = FakeCluster::default();
        for (name, claim) in [("live", "c1"), ("live2", "c4")] {
            cluster.sandboxes.lock().unwrap().insert(
                ("team-a".into(), name.into()),
                SandboxFacts {
                    claim_uid: claim.into(),
                    sandbox_id: None,
                },
            );
        }
        cluster.pods.lock().unwrap().insert("agent-1".into());
        let node = FakeNode::default();
        *node.containers.lock().unwrap() = vec![
            live.clone(),
            gone.clone(),
            young.clone(),
            orphaned_by_agent.clone(),
        ];
        let j = janitor(cluster, node);

        // Other tests scan concurrently into the same process-wide counters: they
        // only grow, so compare at-least deltas.
        let m = fsb_telemetry::metrics();
        let before = (
            m.janitor_scans.get("ok"),
            m.janitor_containers.get("scanned"),
            m.janitor_containers.get("removed"),
        );
        let report = j.scan_once().await.unwrap();
        assert!(m.janitor_scans.get("ok") > before.0);
        assert!(m.janitor_containers.get("scanned") >= before.1 + 4);
        assert!(m.janitor_containers.get("removed") >= before.2 + 2);
        assert_eq!(report.scanned, 4);
        let mut removed = report.removed.clone();
        removed.sort();
        let mut want = vec![gone.id.clone(), orphaned_by_agent.id.clone()];
        want.sort();
        assert_eq!(removed, want);
        assert_eq!(ids(&j), vec![live.id.clone(), young.id.clone()]);
        assert_eq!(
            j.cluster.lists.load(Ordering::SeqCst),
            1,
            "the agent pods are listed once per scan"
        );
        assert_eq!(
            j.cluster.gets.load(Ordering::SeqCst),
            3,
            "the young container is not looked up"
        );
        let stats = j.stats();
        assert_eq!(
            stats,
            JanitorStats {
                scans: 1,
                scan_errors: 0,
                scanned: 4,
                removed: 2,
                failed: 0,
                unknown: 0,
            }
        );
    }

    #[tokio::test]
    async fn unknown_keeps_and_counts_then_recovery_cleans() {
        let orphan = container("team-a", "gone", "c1", "agent-1", TIMEOUT * 2);
        let cluster = FakeCluster::default();
        cluster.pods.lock().unwrap().insert("agent-1".into());
        *cluster.down.lock().unwrap() = true;
        let node = FakeNode::default();
        *node.containers.lock().unwrap() = vec![orphan.clone()];
        let j = janitor(cluster, node);

        for _ in 0..3 {
            let report = j.scan_once().await.unwrap();
            assert!(report.removed.is_empty());
            assert_eq!(report.unknown, 1);
        }
        assert_eq!(ids(&j), vec![orphan.id.clone()]);
        assert_eq!(j.stats().unknown, 3);

        *j.cluster.down.lock().unwrap() = false;
        let report = j.scan_once().await.unwrap();
        assert_eq!(report.removed, vec![orphan.id.clone()]);
        assert!(ids(&j).is_empty());
        assert_eq!(j.stats().removed, 1);
        assert_eq!(j.stats().unknown, 3);
    }

    #[tokio::test]
    async fn failed_removals_are_counted_and_retried() {
        let orphan = container("team-a", "gone", "c1", "agent-1", TIMEOUT * 2);
        let node = FakeNode::default();
        *node.containers.lock().unwrap() = vec![orphan.clone()];
        *node.failing.lock().unwrap() = true;
        let cluster = FakeCluster::default();
        cluster.pods.lock().unwrap().insert("agent-1".into());
        let j = janitor(cluster, node);
        let report = j.scan_once().await.unwrap();
        assert_eq!(report.failed, 1);
        assert_eq!(j.stats().failed, 1);
        assert_eq!(ids(&j), vec![orphan.id.clone()]);
        *j.containers.failing.lock().unwrap() = false;
        j.scan_once().await.unwrap();
        assert!(ids(&j).is_empty());
        assert_eq!(j.stats().removed, 1);

        *j.containers.list_fails.lock().unwrap() = true;
        assert!(j.scan_once().await.is_err());
        assert_eq!(j.stats().scan_errors, 1);
        assert_eq!(j.stats().scans, 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_scan_skips_missed_ticks_instead_of_catching_up() {
        // The first scan takes 10 intervals. A loop that queued the missed ticks
        // (MissedTickBehavior::Skip) would run 10 catch-up scans the moment it ends;
        // this one runs one at once and then resumes the schedule: scans at 0, 10, 11,
        // 12, 13 s. Never two at once.
        let node = FakeNode {
            first_list_delay: Duration::from_secs(10),
            ..FakeNode::default()
        };
        let j = Arc::new(janitor(FakeCluster::default(), node));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn({
            let j = j.clone();
            async move {
                j.run(async {
                    let _ = stopped.await;
                })
                .await;
            }
        });
        tokio::time::sleep(Duration::from_millis(9_900)).await;
        assert_eq!(j.stats().scans, 0, "the first scan is still running");
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(
            j.stats().scans,
            2,
            "one scan right after the slow one, no burst"
        );
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(j.stats().scans, 5, "then one per interval (11, 12, 13 s)");
        assert_eq!(j.containers.max_in_flight.load(Ordering::SeqCst), 1);
        stop.send(()).unwrap();
        task.await.unwrap();
    }
}
