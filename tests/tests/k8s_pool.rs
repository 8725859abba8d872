//! The SandboxPool reconciler (`fsb_controller::pool::run`) against a real
//! kube-apiserver + etcd, with the kubelet fixture running real `fsb-agent` processes
//! on the harness's containerd (`tests/run.sh k8s`).
//!
//! Agent usage comes from [`TestUsage`], whose answers the test controls: every agent
//! whose pod is Ready is "registered" idle; a test marks agents busy or adds pending
//! sandboxes. The agents themselves are given an unreachable controller address (their
//! Session client retries in the background), so the pool logic is tested without the
//! rest of the controller.
//!
//! Scenarios: poolMin pods are created, owned, bound, Running and Ready with agents
//! answering gRPC health; demand grows the pool (1 -> 2 pods, the reference scenario)
//! and is capped at poolMax with ScalingLimited; scale-down drains idle agents before
//! deleting them and never touches a busy one; a killed pod is replaced; a template
//! change brings up new Ready pods before old idle ones go; a deleted pool's pods go;
//! a pool's capability drop list reaches its agents (and their sandboxes), and unknown
//! or added capabilities are refused by the API server naming the field.

#![cfg(feature = "k8s")]
#![allow(clippy::unwrap_used)] // test code

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fsb_controller::crd::{
    CapabilityPolicy, PoolCapacity, RuntimeName, SandboxPool, SandboxPoolSpec, SandboxSecurity,
};
use fsb_controller::pool::{
    self, AgentLoad, AgentUsage, POD_TEMPLATE_HASH_ANNOTATION, PoolConfig, PoolTrigger,
};
use fsb_tests::k8s::{KubeApi, kube_client};
use fsb_tests::kubelet::{Kubelet, RunningPod};
use fsb_tests::wait_until;
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{CustomResourceExt, ResourceExt};
use serde_json::json;
use tokio::task::JoinHandle;

const CRDS: &str = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions";
const WAIT: Duration = Duration::from_secs(90);

/// Registered agents and demand, as the test says.
#[derive(Default)]
struct TestUsage {
    state: Mutex<UsageState>,
}

#[derive(Default)]
struct UsageState {
    agents: HashMap<String, AgentLoad>,
    pending: u32,
    drained: Vec<String>,
}

impl AgentUsage for TestUsage {
    fn agents(&self, _namespace: &str, _pool: &str) -> Vec<AgentLoad> {
        self.state
            .lock()
            .unwrap()
            .agents
            .values()
            .cloned()
            .collect()
    }
    fn pending(&self, _namespace: &str, _pool: &str) -> u32 {
        self.state.lock().unwrap().pending
    }
    fn drain(&self, pod_uid: &str) -> bool {
        let mut s = self.state.lock().unwrap();
        s.drained.push(pod_uid.to_owned());
        match s.agents.get_mut(pod_uid) {
            Some(a) => {
                a.draining = true;
                true
            }
            None => false,
        }
    }
}

impl TestUsage {
    /// Agents of Ready pods register (idle); agents whose process is gone unregister.
    fn sync(&self, running: &[RunningPod], capacity: u32) -> bool {
        let mut s = self.state.lock().unwrap();
        let before = s.agents.len();
        let alive: HashSet<&str> = running.iter().map(|r| r.uid.as_str()).collect();
        s.agents.retain(|uid, _| alive.contains(uid.as_str()));
        let mut changed = s.agents.len() != before;
        for r in running.iter().filter(|r| r.ready) {
            if !s.agents.contains_key(&r.uid) {
                s.agents.insert(
                    r.uid.clone(),
                    AgentLoad {
                        pod_uid: r.uid.clone(),
                        used: 0,
                        capacity,
                        draining: false,
                    },
                );
                changed = true;
            }
        }
        changed
    }

    fn set_used(&self, uid: &str, used: u32) {
        if let Some(a) = self.state.lock().unwrap().agents.get_mut(uid) {
            a.used = used;
        }
    }

    fn set_pending(&self, pending: u32) {
        self.state.lock().unwrap().pending = pending;
    }

    fn drained(&self) -> Vec<String> {
        self.state.lock().unwrap().drained.clone()
    }

    fn registered(&self) -> usize {
        self.state.lock().unwrap().agents.len()
    }
}

/// One test's world: its namespace, kubelet, usage and reconciler.
struct World {
    ns: String,
    pools: Api<SandboxPool>,
    pods: Api<Pod>,
    usage: Arc<TestUsage>,
    kubelet: Arc<Kubelet>,
    trigger: PoolTrigger,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for World {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

async fn install_crds(api: &KubeApi) {
    for crd in [fsb_controller::crd::Sandbox::crd(), SandboxPool::crd()] {
        let (code, resp) = api
            .post(CRDS, &serde_json::to_value(&crd).unwrap())
            .await
            .unwrap();
        assert!(
            code == 201 || code == 409,
            "installing the CRD: {code} {resp}"
        );
        let name = crd.metadata.name.clone().unwrap();
        wait_until("CRD established", Duration::from_secs(30), || {
            let name = name.clone();
            async move {
                let (_, v) = api
                    .send(reqwest::Method::GET, &format!("{CRDS}/{name}"), None)
                    .await?;
                Ok(v["status"]["conditions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|c| c["type"] == "Established" && c["status"] == "True")
                    .then_some(()))
            }
        })
        .await
        .unwrap();
    }
}

impl World {
    async fn new(prefix: &str, per_pod: u32) -> World {
        let api = KubeApi::from_env().unwrap();
        install_crds(&api).await;
        let ns = format!("{prefix}-{}", &fsb_tests::unique_id()[..8]);
        let (code, resp) = api
            .post(
                "/api/v1/namespaces",
                &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}),
            )
            .await
            .unwrap();
        assert_eq!(code, 201, "{resp}");
        let client = kube_client().await.unwrap();
        // No controller-manager creates the namespace's default ServiceAccount, which
        // pod admission requires.
        let sa: ServiceAccount =
            serde_json::from_value(json!({"metadata": {"name": "default"}})).unwrap();
        Api::<ServiceAccount>::namespaced(client.clone(), &ns)
            .create(&PostParams::default(), &sa)
            .await
            .unwrap();
        let kubelet = Arc::new(Kubelet::start(client.clone(), &ns).await.unwrap());
        let usage = Arc::new(TestUsage::default());
        let trigger = PoolTrigger::new();
        let mut config = PoolConfig::new("fsb.test/fsb-agent:1", "http://127.0.0.1:9");
        config.namespace = Some(ns.clone());
        config.resync = Duration::from_millis(500);
        let reconciler = {
            let (client, usage, trigger) = (client.clone(), usage.clone(), trigger.clone());
            tokio::spawn(async move {
                let usage: Arc<dyn AgentUsage> = usage;
                let result = pool::run(client, usage, config, trigger).await;
                panic!("the pool reconciler stopped: {result:?}");
            })
        };
        // Registration: what the agents' Session streams would tell the registry.
        let registrar = {
            let (kubelet, usage, trigger) = (kubelet.clone(), usage.clone(), trigger.clone());
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(100));
                loop {
                    tick.tick().await;
                    if usage.sync(&kubelet.running(), per_pod) {
                        trigger.poke();
                    }
                }
            })
        };
        World {
            pools: Api::namespaced(client.clone(), &ns),
            pods: Api::namespaced(client, &ns),
            ns,
            usage,
            kubelet,
            trigger,
            tasks: vec![reconciler, registrar],
        }
    }

    async fn create_pool(&self, name: &str, capacity: PoolCapacity, per_pod: u32) {
        self.try_create_pool(name, capacity, per_pod, None)
            .await
            .unwrap();
    }

    async fn try_create_pool(
        &self,
        name: &str,
        capacity: PoolCapacity,
        per_pod: u32,
        sandbox_security: Option<SandboxSecurity>,
    ) -> kube::Result<SandboxPool> {
        let pool = SandboxPool::new(
            name,
            SandboxPoolSpec {
                capacity,
                max_sandboxes_per_pod: per_pod,
                runtime: RuntimeName::Runc,
                warm_images: vec![],
                agent_template: None,
                sandbox_security,
            },
        );
        self.pools.create(&PostParams::default(), &pool).await
    }

    /// Pods of `pool` that are not being deleted.
    async fn live_pods(&self, pool: &str) -> anyhow::Result<Vec<Pod>> {
        Ok(self
            .pods
            .list(&ListParams::default().labels(&format!("fast-sandbox.io/pool={pool}")))
            .await?
            .items
            .into_iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .collect())
    }

    /// Waits until `pool` has exactly `n` live pods, all Ready (and their agents
    /// registered); returns them.
    async fn wait_ready(&self, pool: &str, n: usize) -> Vec<Pod> {
        wait_until(
            &format!("{n} ready pods in pool {}/{pool}", self.ns),
            WAIT,
            || async move {
                let pods = self.live_pods(pool).await?;
                let ready = pods.iter().filter(|p| pool::pod_ready(p)).count();
                Ok((pods.len() == n && ready == n && self.usage.registered() >= n).then_some(pods))
            },
        )
        .await
        .unwrap()
    }

    async fn status(&self, pool: &str) -> serde_json::Value {
        serde_json::to_value(self.pools.get(pool).await.unwrap().status).unwrap()
    }

    async fn wait_status(
        &self,
        pool: &str,
        what: &str,
        check: impl Fn(&serde_json::Value) -> bool,
    ) {
        let check = &check;
        let waited = wait_until(what, WAIT, || async move {
            let s = self.status(pool).await;
            Ok(check(&s).then_some(()))
        })
        .await;
        if let Err(e) = waited {
            panic!("{e:#}; last status: {}", self.status(pool).await);
        }
    }
}

fn capacity(pool_min: u32, pool_max: u32, buffer_min: u32, buffer_max: u32) -> PoolCapacity {
    PoolCapacity {
        pool_min,
        pool_max,
        buffer_min,
        buffer_max,
    }
}

fn condition<'a>(status: &'a serde_json::Value, type_: &str) -> &'a serde_json::Value {
    status["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == type_))
        .unwrap_or(&serde_json::Value::Null)
}

async fn health(port: u16) -> anyhow::Result<i32> {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))?
        .connect()
        .await?;
    let mut client = HealthClient::new(channel);
    let resp = client
        .check(HealthCheckRequest {
            service: "agent.v1.Agent".into(),
        })
        .await?;
    Ok(resp.into_inner().status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_min_pods_are_created_bound_and_ready_and_go_with_the_pool() {
    let w = World::new("pool-min", 1).await;
    w.create_pool("p", capacity(2, 4, 0, 0), 1).await;
    let pods = w.wait_ready("p", 2).await;
    let pool = w.pools.get("p").await.unwrap();
    assert!(
        pool.finalizers().iter().any(|f| f == pool::POOL_FINALIZER),
        "{:?}",
        pool.finalizers()
    );
    for p in &pods {
        assert!(p.name_any().starts_with("p-"), "{}", p.name_any());
        let owner = &p.owner_references()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.name.as_str(), owner.controller),
            ("SandboxPool", "p", Some(true))
        );
        assert_eq!(Some(owner.uid.clone()), pool.uid());
        assert_eq!(owner.block_owner_deletion, Some(true));
        assert_eq!(p.labels()["app"], "sandbox-agent");
        assert!(p.annotations().contains_key(POD_TEMPLATE_HASH_ANNOTATION));
        let spec = p.spec.as_ref().unwrap();
        assert_eq!(spec.node_name.as_deref(), Some(w.kubelet.node()));
        let status = p.status.as_ref().unwrap();
        assert_eq!(status.phase.as_deref(), Some("Running"));
        assert_eq!(status.pod_ip.as_deref(), Some("127.0.0.1"));
    }
    // Real agents answer, one per pod.
    let running = w.kubelet.running();
    assert_eq!(running.len(), 2, "{running:?}");
    for r in &running {
        let status = health(r.port).await.unwrap();
        assert_eq!(status, 1, "agent of {} is SERVING", r.name);
    }
    w.wait_status("p", "status counts 2 pods, 2 idle agents", |s| {
        s["currentPods"] == 2
            && s["readyPods"] == 2
            && s["totalAgents"] == 2
            && s["idleAgents"] == 2
            && s["busyAgents"] == 0
            && condition(s, "Ready")["status"] == "True"
            && condition(s, "ScalingLimited")["status"] == "False"
    })
    .await;

    // Deleting the pool deletes its pods (no garbage collector here), then the pool.
    w.pools.delete("p", &DeleteParams::default()).await.unwrap();
    wait_until("the pool and its pods are gone", WAIT, || async {
        let pods = w
            .pods
            .list(&ListParams::default().labels("fast-sandbox.io/pool=p"))
            .await?
            .items;
        let pool_gone = w.pools.get_opt("p").await?.is_none();
        Ok((pods.is_empty() && pool_gone && w.kubelet.running().is_empty()).then_some(()))
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demand_grows_the_pool_from_one_to_two_pods_and_is_capped_at_pool_max() {
    let w = World::new("pool-grow", 1).await;
    w.create_pool("p", capacity(1, 3, 0, 0), 1).await;
    let pods = w.wait_ready("p", 1).await;
    // One sandbox runs on the only agent and a second one waits: perPod 1 -> 2 pods.
    w.usage.set_used(&pods[0].uid().unwrap(), 1);
    w.usage.set_pending(1);
    w.trigger.poke();
    w.wait_ready("p", 2).await;
    w.wait_status("p", "status: 2 pods, 1 busy, within limits", |s| {
        s["currentPods"] == 2
            && s["busyAgents"] == 1
            && s["idleAgents"] == 1
            && condition(s, "ScalingLimited")["status"] == "False"
    })
    .await;

    // Far more demand than poolMax: 3 pods, never more, and ScalingLimited says why.
    w.usage.set_pending(10);
    w.trigger.poke();
    let most = AtomicUsize::new(0);
    wait_until("3 ready pods and ScalingLimited", WAIT, || {
        let (most, w) = (&most, &w);
        async move {
            let pods = w.live_pods("p").await?;
            most.fetch_max(pods.len(), Ordering::SeqCst);
            anyhow::ensure!(pods.len() <= 3, "more pods than poolMax: {}", pods.len());
            let s = w.status("p").await;
            let limited = condition(&s, "ScalingLimited");
            Ok((pods.iter().filter(|p| pool::pod_ready(p)).count() == 3
                && limited["status"] == "True"
                && limited["reason"] == "PoolMaxReached")
                .then_some(()))
        }
    })
    .await
    .unwrap();
    assert!(most.load(Ordering::SeqCst) <= 3);
    let s = w.status("p").await;
    assert!(
        condition(&s, "ScalingLimited")["message"]
            .as_str()
            .unwrap()
            .contains("poolMax is 3"),
        "{s}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_down_drains_idle_agents_first_and_never_touches_a_busy_one() {
    let w = World::new("pool-down", 1).await;
    w.create_pool("p", capacity(1, 4, 0, 0), 1).await;
    w.wait_ready("p", 1).await;
    w.usage.set_pending(3);
    w.trigger.poke();
    let pods = w.wait_ready("p", 3).await;
    let uids: Vec<String> = pods.iter().map(|p| p.uid().unwrap()).collect();
    let busy = uids[1].clone();
    // The demand is gone except one sandbox on the middle agent.
    w.usage.set_used(&busy, 1);
    w.usage.set_pending(0);
    w.trigger.poke();
    wait_until("the pool shrinks to its busy pod", WAIT, || async {
        let live = w.live_pods("p").await?;
        let live_uids: Vec<String> = live.iter().filter_map(|p| p.uid()).collect();
        let drained = w.usage.drained();
        anyhow::ensure!(!drained.contains(&busy), "the busy agent was drained");
        anyhow::ensure!(live_uids.contains(&busy), "the busy pod was deleted");
        for gone in uids.iter().filter(|u| !live_uids.contains(u)) {
            anyhow::ensure!(drained.contains(gone), "{gone} deleted without a drain");
        }
        Ok((live_uids == vec![busy.clone()]).then_some(()))
    })
    .await
    .unwrap();
    let mut drained = w.usage.drained();
    drained.sort();
    drained.dedup();
    let mut idle: Vec<String> = uids.iter().filter(|u| **u != busy).cloned().collect();
    idle.sort();
    assert_eq!(drained, idle);
    w.wait_status("p", "status: 1 pod, 1 busy agent", |s| {
        s["currentPods"] == 1 && s["busyAgents"] == 1 && s["totalAgents"] == 1
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_pod_is_replaced() {
    let w = World::new("pool-kill", 1).await;
    w.create_pool("p", capacity(2, 2, 0, 0), 1).await;
    let pods = w.wait_ready("p", 2).await;
    let victim = pods[0].clone();
    w.kubelet.kill(&victim.name_any()).await.unwrap();
    let pods = w.wait_ready("p", 2).await;
    assert!(pods.iter().all(|p| p.uid() != victim.uid()), "replaced");
    wait_until("the failed pod is deleted", WAIT, || async {
        Ok(w.pods
            .get_opt(&victim.name_any())
            .await?
            .is_none()
            .then_some(()))
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_template_change_brings_up_new_ready_pods_before_old_idle_ones_go() {
    let w = World::new("pool-roll", 1).await;
    w.create_pool("p", capacity(2, 2, 0, 0), 1).await;
    let old = w.wait_ready("p", 2).await;
    let old_hash = old[0].annotations()[POD_TEMPLATE_HASH_ANNOTATION].clone();
    let old_uids: Vec<String> = old.iter().map(|p| p.uid().unwrap()).collect();
    let template = json!({
        "metadata": {"labels": {"revision": "2"}},
        "spec": {"containers": [{"name": "agent", "image": "fsb.test/fsb-agent:2"}]},
    });
    w.pools
        .patch(
            "p",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"agentTemplate": template}})),
        )
        .await
        .unwrap();
    w.trigger.poke();
    let most = AtomicUsize::new(0);
    wait_until("only new pods, all ready", WAIT, || {
        let (most, w, old_uids, old_hash) = (&most, &w, &old_uids, &old_hash);
        async move {
            let live = w.live_pods("p").await?;
            most.fetch_max(live.len(), Ordering::SeqCst);
            anyhow::ensure!(live.len() <= 3, "surge beyond one pod: {}", live.len());
            let old_left = live
                .iter()
                .filter(|p| old_uids.contains(&p.uid().unwrap_or_default()))
                .count();
            let new_ready = live
                .iter()
                .filter(|p| {
                    p.annotations().get(POD_TEMPLATE_HASH_ANNOTATION) != Some(old_hash)
                        && pool::pod_ready(p)
                })
                .count();
            // An old pod went only once new Ready pods took its place.
            anyhow::ensure!(
                new_ready + old_left >= 2,
                "{old_left} old pods left with only {new_ready} new ready ones"
            );
            Ok((old_left == 0 && new_ready == 2 && live.len() == 2).then_some(()))
        }
    })
    .await
    .unwrap();
    assert_eq!(most.load(Ordering::SeqCst), 3, "one surge pod");
    let mut drained = w.usage.drained();
    drained.sort();
    drained.dedup();
    let mut expect = old_uids.clone();
    expect.sort();
    assert_eq!(drained, expect, "old agents were drained before deletion");
    let new = w.live_pods("p").await.unwrap();
    assert!(
        new.iter()
            .all(|p| p.labels().get("revision").map(String::as_str) == Some("2"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_template_the_api_server_refuses_is_reported_in_the_ready_condition() {
    let w = World::new("pool-bad", 1).await;
    w.create_pool("p", capacity(1, 1, 0, 0), 1).await;
    // A container name that is not a DNS label: every pod create is refused.
    let template = json!({
        "spec": {"containers": [{"name": "Not_A_Label", "image": "fsb.test/fsb-agent:1"}]},
    });
    w.pools
        .patch(
            "p",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"agentTemplate": template}})),
        )
        .await
        .unwrap();
    w.wait_status("p", "Ready False with reason PodCreateFailed", |s| {
        let ready = condition(s, "Ready");
        ready["status"] == "False"
            && ready["reason"] == "PodCreateFailed"
            && ready["message"]
                .as_str()
                .unwrap_or("")
                .contains("Not_A_Label")
    })
    .await;
}

fn security(drop: &[&str], add: &[&str]) -> Option<SandboxSecurity> {
    Some(SandboxSecurity {
        capabilities: Some(CapabilityPolicy {
            drop: drop.iter().map(|s| s.to_string()).collect(),
            add: add.iter().map(|s| s.to_string()).collect(),
        }),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_capability_drop_list_reaches_its_agents_and_bad_names_are_refused() {
    use fsb_proto::agent::v1::{
        CreateSandboxRequest, ExecRequest, ExecStart, agent_client::AgentClient, exec_request,
    };
    use fsb_proto::fastpath::v1::{SandboxSpec, exec_response};

    let w = World::new("pool-caps", 1).await;
    // The API server refuses an unknown name and any addition, naming the field.
    for (sec, field, says) in [
        (
            security(&["CHOWN", "NOT_A_CAP"], &[]),
            "spec.sandboxSecurity.capabilities.drop[1]",
            "NOT_A_CAP",
        ),
        (
            security(&[], &["SYS_ADMIN"]),
            "spec.sandboxSecurity.capabilities.add",
            "only drop is supported",
        ),
    ] {
        let err = w
            .try_create_pool("bad", capacity(0, 1, 0, 0), 1, sec)
            .await
            .unwrap_err();
        let kube::Error::Api(resp) = err else {
            panic!("not an API error: {err}")
        };
        assert_eq!(resp.code, 422, "{resp:?}");
        assert!(
            resp.message.contains(field) && resp.message.contains(says),
            "{}",
            resp.message
        );
    }
    assert!(w.pools.get_opt("bad").await.unwrap().is_none());

    // Names as Kubernetes users write them, any case.
    w.try_create_pool(
        "caps",
        capacity(1, 1, 0, 0),
        1,
        security(&["chown", "NET_BIND_SERVICE", "Cap_Chown"], &[]),
    )
    .await
    .unwrap();
    let pods = w.wait_ready("caps", 1).await;
    let env = pods[0].spec.as_ref().unwrap().containers[0]
        .env
        .clone()
        .unwrap();
    let drop = env
        .iter()
        .find(|e| e.name == pool::pod::DROP_CAPABILITIES_ENV)
        .and_then(|e| e.value.clone());
    assert_eq!(drop.as_deref(), Some("CAP_CHOWN,CAP_NET_BIND_SERVICE"));

    // The real agent of that pod applies it to the sandboxes it creates.
    let uid = pods[0].uid().unwrap();
    let agent = w
        .kubelet
        .running()
        .into_iter()
        .find(|r| r.uid == uid)
        .unwrap();
    let channel = tonic::transport::Endpoint::from_shared(format!(
        "http://{}:{}",
        fsb_tests::kubelet::POD_IP,
        agent.port
    ))
    .unwrap()
    .connect()
    .await
    .unwrap();
    let mut client = AgentClient::new(channel);
    let id = fsb_core::SandboxId::generate().to_string();
    client
        .create_sandbox(CreateSandboxRequest {
            sandbox_id: id.clone(),
            namespace: w.ns.clone(),
            name: "caps".into(),
            spec: Some(SandboxSpec {
                pool_ref: "caps".into(),
                image: fsb_tests::ContainerdEnv::from_env().image,
                command: vec!["sleep".into(), "600".into()],
                ..SandboxSpec::default()
            }),
            ..CreateSandboxRequest::default()
        })
        .await
        .unwrap();
    let start = ExecRequest {
        msg: Some(exec_request::Msg::Start(ExecStart {
            sandbox_id: id.clone(),
            command: vec![
                "sh".into(),
                "-c".into(),
                "sed -n 's/^CapEff:[[:space:]]*/eff=/p' /proc/self/status; \
                 touch /tmp/o && chown 1 /tmp/o; echo chown=$?"
                    .into(),
            ],
            ..ExecStart::default()
        })),
    };
    let mut out = client
        .exec(tokio_stream::iter([start]))
        .await
        .unwrap()
        .into_inner();
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    while let Some(msg) = out.message().await.unwrap() {
        match msg.msg {
            Some(exec_response::Msg::Stdout(b)) => stdout.extend(b),
            Some(exec_response::Msg::Stderr(b)) => stderr.extend(b),
            _ => {}
        }
    }
    let (stdout, stderr) = (
        String::from_utf8_lossy(&stdout),
        String::from_utf8_lossy(&stderr),
    );
    let eff = stdout
        .lines()
        .find_map(|l| l.strip_prefix("eff="))
        .unwrap_or_else(|| panic!("no eff= in {stdout:?} {stderr:?}"));
    let eff = u64::from_str_radix(eff, 16).unwrap();
    let bit = |c: &str| 1u64 << fsb_core::capability::bit(c).unwrap();
    assert_eq!(eff & bit("CAP_CHOWN"), 0, "{stdout}");
    assert_eq!(eff & bit("CAP_NET_BIND_SERVICE"), 0, "{stdout}");
    assert_ne!(eff & bit("CAP_KILL"), 0, "the rest stays: {stdout}");
    assert!(
        stdout.contains("chown=1") && stderr.contains("Operation not permitted"),
        "{stdout} {stderr}"
    );
    client
        .delete_sandbox(fsb_proto::agent::v1::DeleteSandboxRequest {
            sandbox_id: id,
            grace_period_seconds: Some(0),
        })
        .await
        .unwrap();
}
