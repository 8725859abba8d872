//! fsb-janitor against a real kube-apiserver + etcd and a real containerd (`tests/run.sh
//! k8s`). Containers are made by the in-process agent (`AgentHandle`) whose agent id is
//! the UID of a Pod object labelled `app=sandbox-agent` (no kubelet runs: the pods stay
//! Pending, existence is all the janitor asks about). Each test scans through the
//! product's `ContainerdRuntime` and `KubeCluster`; the only difference from the binary
//! is that a test's janitor lists the containers of its own agents only
//! (`ContainerdRuntime::list(Some(uid))`), because the tests run in parallel on one
//! containerd and must not clean up each other's containers.
//!
//! Scenarios: sandboxes in several namespaces (and `default`) survive repeated scans
//! (seed-review item 8); a deleted Sandbox's container and a container whose Sandbox
//! never existed (a FAST create whose record never landed) are kept while younger than
//! the orphan timeout and removed after it; a same-name Sandbox recreated under another
//! uid, and a `status.sandboxID` naming another container, orphan the container; a gone
//! agent pod orphans its containers while a present one keeps them; with the API server
//! unreachable (a TCP proxy in front of it refusing) nothing is removed and every
//! container counts as unknown, and once it is reachable again the orphans go (item 9).
//! Last, the `fsb-janitor` binary itself (`--once`, KUBECONFIG, every container of its
//! containerd namespace: a namespace of the test's own, holding bare container records)
//! removes an old orphan, keeps a live one and prints its counters as JSON; bad
//! configuration exits 64. And `deploy/rbac/janitor.yaml`, applied for real, lets the
//! janitor's service account (impersonated) get real answers to both questions, while
//! an account without it gets 403s that count as unknown, never as gone.

#![cfg(feature = "k8s")]
#![allow(clippy::unwrap_used)] // helpers below are test code too

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, SystemTime},
};

use fsb_agent::{AgentHandle, CreateSandbox, runtime::ContainerdRuntime};
use fsb_controller::crd::{Sandbox, SandboxPool, SandboxSpec as CrdSpec};
use fsb_core::{
    SandboxId,
    labels::{LABEL_APP, LABEL_APP_AGENT, LABEL_CLAIM_UID},
    spec::{SandboxSpec, SpecLimits},
};
use fsb_janitor::{
    ClusterView, ContainerFacts, Janitor, JanitorConfig, JanitorError, JanitorStats, KubeCluster,
    NodeContainers,
};
use fsb_tests::{ContainerdEnv, k8s::kube_config, wait_until};
use k8s_openapi::{
    api::core::v1::{Namespace, Pod, ServiceAccount},
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{
    Api, Client, CustomResourceExt,
    api::{DeleteParams, Patch, PatchParams, PostParams},
};
use serde_json::json;
use tokio::{net::TcpListener, task::JoinHandle};

const DEADLINE: Duration = Duration::from_secs(60);

// --- API objects ------------------------------------------------------------------

async fn client() -> Client {
    Client::try_from(kube_config().await.unwrap()).unwrap()
}

/// Both CRDs, installed (idempotent) and serving.
async fn install_crds(client: &Client) {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in [Sandbox::crd(), SandboxPool::crd()] {
        match api.create(&PostParams::default(), &crd).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => panic!("installing a CRD: {e}"),
        }
        let name = crd.metadata.name.clone().unwrap();
        wait_until("CRD established", DEADLINE, || {
            let (api, name) = (api.clone(), name.clone());
            async move {
                let crd = api.get(&name).await?;
                let established = crd
                    .status
                    .and_then(|s| s.conditions)
                    .unwrap_or_default()
                    .iter()
                    .any(|c| c.type_ == "Established" && c.status == "True");
                Ok(established.then_some(()))
            }
        })
        .await
        .unwrap();
    }
}

fn short() -> String {
    fsb_tests::unique_id()[..8].to_owned()
}

/// A fresh namespace (with the `default` ServiceAccount pod admission asks for: no
/// controller-manager runs to create it). Namespaces are not deleted afterwards: with
/// no namespace controller they would stay Terminating; the objects inside are.
async fn namespace(client: &Client) -> String {
    let ns = format!("jan-{}", short());
    let api: Api<Namespace> = Api::all(client.clone());
    let obj: Namespace = serde_json::from_value(json!({"metadata": {"name": ns}})).unwrap();
    api.create(&PostParams::default(), &obj).await.unwrap();
    service_account(client, &ns).await;
    ns
}

async fn service_account(client: &Client, ns: &str) {
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
    let sa: ServiceAccount =
        serde_json::from_value(json!({"metadata": {"name": "default"}})).unwrap();
    match api.create(&PostParams::default(), &sa).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        Err(e) => panic!("creating the default ServiceAccount in {ns}: {e}"),
    }
}

/// An agent Pod object; returns its server-assigned UID (the agent id).
async fn agent_pod(client: &Client, ns: &str, name: &str) -> String {
    let api: Api<Pod> = Api::namespaced(client.clone(), ns);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {LABEL_APP: LABEL_APP_AGENT}},
        "spec": {
            "automountServiceAccountToken": false,
            "containers": [{"name": "agent", "image": "fast-sandbox/fsb-agent:0.1.0"}],
        },
    }))
    .unwrap();
    let pod = api.create(&PostParams::default(), &pod).await.unwrap();
    pod.metadata.uid.unwrap()
}

async fn delete_pod(client: &Client, ns: &str, name: &str) {
    let api: Api<Pod> = Api::namespaced(client.clone(), ns);
    let _ = api
        .delete(name, &DeleteParams::default().grace_period(0))
        .await;
    wait_until("pod gone", DEADLINE, || {
        let api = api.clone();
        async move { Ok(api.get_opt(name).await?.is_none().then_some(())) }
    })
    .await
    .unwrap();
}

/// A Sandbox; `claim` sets the `fast-sandbox.io/claim-uid` metadata label (the fast
/// path's). Returns its metadata.uid.
async fn sandbox(client: &Client, ns: &str, name: &str, claim: Option<&str>) -> String {
    let api: Api<Sandbox> = Api::namespaced(client.clone(), ns);
    let mut s = Sandbox::new(
        name,
        CrdSpec {
            image: "busybox".into(),
            pool_ref: "default".into(),
            // Default::default() gives 0, which the schema rejects (minimum 1).
            recovery_timeout_seconds: 60,
            ..CrdSpec::default()
        },
    );
    if let Some(claim) = claim {
        s.metadata.labels = Some([(LABEL_CLAIM_UID.to_owned(), claim.to_owned())].into());
    }
    let s = api.create(&PostParams::default(), &s).await.unwrap();
    s.metadata.uid.unwrap()
}

async fn set_sandbox_id(client: &Client, ns: &str, name: &str, id: &str) {
    let api: Api<Sandbox> = Api::namespaced(client.clone(), ns);
    let patch = json!({"status": {"sandboxID": id}});
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
}

async fn delete_sandbox(client: &Client, ns: &str, name: &str) {
    let api: Api<Sandbox> = Api::namespaced(client.clone(), ns);
    let _ = api.delete(name, &DeleteParams::default()).await;
    wait_until("sandbox gone", DEADLINE, || {
        let api = api.clone();
        async move { Ok(api.get_opt(name).await?.is_none().then_some(())) }
    })
    .await
    .unwrap();
}

// --- containers -------------------------------------------------------------------

/// The in-process agent whose id is `uid` (its logs under `<run dir>/agent-logs/<uid>`).
async fn start_agent(env: &ContainerdEnv, uid: &str) -> AgentHandle {
    AgentHandle::start(fsb_tests::agent_config(env, uid, 16))
        .await
        .unwrap()
}

/// A running `sleep` container labelled for Sandbox `ns/name` with claim uid `claim`.
async fn container(
    env: &ContainerdEnv,
    agent: &AgentHandle,
    ns: &str,
    name: &str,
    claim: &str,
) -> SandboxId {
    let spec = SandboxSpec {
        namespace: ns.into(),
        name: name.into(),
        pool_ref: "default".into(),
        image: env.image.clone(),
        command: vec!["sleep".into(), "3600".into()],
        ..SandboxSpec::default()
    }
    .validate(&SpecLimits::default())
    .unwrap();
    let id = SandboxId::generate();
    agent
        .create(CreateSandbox {
            id: id.clone(),
            namespace: ns.into(),
            name: name.into(),
            claim_uid: claim.into(),
            request_id: String::new(),
            spec,
        })
        .await
        .unwrap();
    id
}

/// The node's containers as the product janitor sees them, restricted to this test's
/// agents (see the module doc). Removal goes through the owning agent's runtime, so
/// its log directory is removed too.
struct OwnContainers {
    agents: Vec<(String, ContainerdRuntime)>,
    owner: Mutex<HashMap<SandboxId, usize>>,
}

impl OwnContainers {
    fn new(agents: &[(&str, &AgentHandle)]) -> Self {
        Self {
            agents: agents
                .iter()
                .map(|(uid, a)| (uid.to_string(), a.runtime().clone()))
                .collect(),
            owner: Mutex::default(),
        }
    }

    async fn ids(&self) -> Vec<SandboxId> {
        self.list()
            .await
            .unwrap()
            .into_iter()
            .map(|c| c.id)
            .collect()
    }
}

impl NodeContainers for OwnContainers {
    async fn list(&self) -> Result<Vec<ContainerFacts>, JanitorError> {
        let mut out = Vec::new();
        for (i, (uid, rt)) in self.agents.iter().enumerate() {
            for o in rt.list(Some(uid)).await? {
                self.owner.lock().unwrap().insert(o.id.clone(), i);
                out.push(ContainerFacts::from_labels(&o.id, &o.labels, o.created_at));
            }
        }
        Ok(out)
    }

    async fn remove(&self, id: &SandboxId, grace: Duration) -> Result<bool, JanitorError> {
        let i = self.owner.lock().unwrap().get(id).copied().unwrap_or(0);
        let rt = self.agents[i].1.clone();
        Ok(rt.remove(id, grace).await?)
    }
}

fn janitor(
    client: Client,
    containers: OwnContainers,
    orphan_timeout: Duration,
) -> Janitor<KubeCluster, OwnContainers> {
    Janitor::new(
        KubeCluster::new(client, Duration::from_secs(5)),
        containers,
        JanitorConfig {
            node_name: "test-node".into(),
            interval: Duration::from_secs(1),
            orphan_timeout,
            grace: Duration::ZERO,
        },
    )
}

fn sorted(mut ids: Vec<SandboxId>) -> Vec<SandboxId> {
    ids.sort();
    ids
}

/// Removes what a test left (containers through their agent, Sandboxes, pods).
async fn cleanup(agents: &[&AgentHandle]) {
    for agent in agents {
        for r in agent.inventory().await.unwrap_or_default() {
            let _ = agent.delete(r.id, Some(Duration::ZERO)).await;
        }
    }
}

// --- scenarios --------------------------------------------------------------------

#[actix_rt::test]
async fn sandboxes_in_every_namespace_survive_repeated_scans() {
    let env = ContainerdEnv::from_env();
    let client = client().await;
    install_crds(&client).await;
    let (ns1, ns2) = (namespace(&client).await, namespace(&client).await);
    let pod = format!("agent-{}", short());
    let uid = agent_pod(&client, &ns1, &pod).await;
    let agent = start_agent(&env, &uid).await;

    // default: claim by metadata.uid; ns1: claim by uid and status.sandboxID set to
    // this container; ns2: claim by the fast path's label.
    let in_default = format!("jan-{}", short());
    let claim = sandbox(&client, "default", &in_default, None).await;
    let a = container(&env, &agent, "default", &in_default, &claim).await;
    let claim = sandbox(&client, &ns1, "web", None).await;
    let b = container(&env, &agent, &ns1, "web", &claim).await;
    set_sandbox_id(&client, &ns1, "web", b.as_str()).await;
    let fast_claim = format!("fast-{}", short());
    sandbox(&client, &ns2, "web", Some(&fast_claim)).await;
    let c = container(&env, &agent, &ns2, "web", &fast_claim).await;

    // Timeout zero: every container is old enough to be looked up and judged.
    let j = janitor(
        client.clone(),
        OwnContainers::new(&[(&uid, &agent)]),
        Duration::ZERO,
    );
    for _ in 0..3 {
        let report = j.scan_once().await.unwrap();
        assert_eq!(report.scanned, 3);
        assert!(report.removed.is_empty(), "{report:?}");
        assert_eq!(report.unknown, 0, "{report:?}");
    }
    assert_eq!(
        sorted(j_containers(&j).await),
        sorted(vec![a.clone(), b.clone(), c.clone()])
    );
    assert_eq!(
        j.stats(),
        JanitorStats {
            scans: 3,
            scanned: 9,
            ..JanitorStats::default()
        }
    );

    cleanup(&[&agent]).await;
    delete_sandbox(&client, "default", &in_default).await;
    delete_sandbox(&client, &ns1, "web").await;
    delete_sandbox(&client, &ns2, "web").await;
    delete_pod(&client, &ns1, &pod).await;
}

async fn j_containers(j: &Janitor<KubeCluster, OwnContainers>) -> Vec<SandboxId> {
    j.containers().ids().await
}

#[actix_rt::test]
async fn orphans_are_kept_while_younger_than_the_timeout_then_removed() {
    const TIMEOUT: Duration = Duration::from_secs(8);
    let env = ContainerdEnv::from_env();
    let client = client().await;
    install_crds(&client).await;
    let ns = namespace(&client).await;
    let pod = format!("agent-{}", short());
    let uid = agent_pod(&client, &ns, &pod).await;
    let agent = start_agent(&env, &uid).await;

    let claim = sandbox(&client, &ns, "deleted", None).await;
    let deleted = container(&env, &agent, &ns, "deleted", &claim).await;
    // A FAST create whose record never landed: no Sandbox at all.
    let never = container(&env, &agent, &ns, "never-recorded", "fast-claim").await;
    let claim = sandbox(&client, &ns, "live", None).await;
    let live = container(&env, &agent, &ns, "live", &claim).await;
    delete_sandbox(&client, &ns, "deleted").await;

    let own = OwnContainers::new(&[(&uid, &agent)]);
    let created: HashMap<SandboxId, SystemTime> = own.agents[0]
        .1
        .list(Some(&uid))
        .await
        .unwrap()
        .into_iter()
        .map(|o| (o.id, o.created_at.expect("containerd reports created_at")))
        .collect();
    let youngest_deadline = created[&deleted].max(created[&never]) + TIMEOUT;
    let j = janitor(client.clone(), own, TIMEOUT);

    let report = j.scan_once().await.unwrap();
    assert!(
        SystemTime::now() < youngest_deadline,
        "the machine is too slow for this test: the first scan ran after the timeout"
    );
    assert!(
        report.removed.is_empty(),
        "young orphans are kept: {report:?}"
    );
    assert_eq!(report.unknown, 0);
    assert_eq!(
        sorted(j_containers(&j).await),
        sorted(vec![deleted.clone(), never.clone(), live.clone()])
    );

    let removed = wait_until("both orphans removed", DEADLINE, || async {
        let report = j.scan_once().await?;
        for id in &report.removed {
            assert!(
                SystemTime::now() >= created[id] + TIMEOUT,
                "{id} removed before it was {TIMEOUT:?} old"
            );
        }
        let left = j_containers(&j).await;
        Ok((!left.contains(&deleted) && !left.contains(&never)).then_some(left))
    })
    .await
    .unwrap();
    assert_eq!(
        removed,
        vec![live.clone()],
        "the live sandbox's container stays"
    );
    let stats = j.stats();
    assert_eq!(stats.removed, 2, "{stats:?}");
    assert_eq!(stats.failed, 0, "{stats:?}");
    assert_eq!(stats.unknown, 0, "{stats:?}");
    assert!(stats.scanned >= 2 * 3, "{stats:?}");
    for id in [&deleted, &never] {
        assert!(
            !agent.runtime().log_paths(id).dir.exists(),
            "the removal took the log directory too"
        );
    }

    cleanup(&[&agent]).await;
    delete_sandbox(&client, &ns, "live").await;
    delete_pod(&client, &ns, &pod).await;
}

#[actix_rt::test]
async fn a_recreated_or_repointed_sandbox_orphans_the_old_container() {
    let env = ContainerdEnv::from_env();
    let client = client().await;
    install_crds(&client).await;
    let ns = namespace(&client).await;
    let pod = format!("agent-{}", short());
    let uid = agent_pod(&client, &ns, &pod).await;
    let agent = start_agent(&env, &uid).await;

    // Recreated under the same name: a new metadata.uid.
    let first = sandbox(&client, &ns, "recreated", None).await;
    let old = container(&env, &agent, &ns, "recreated", &first).await;
    delete_sandbox(&client, &ns, "recreated").await;
    let second = sandbox(&client, &ns, "recreated", None).await;
    assert_ne!(first, second);
    // Same claim (fast-path label), but status.sandboxID names another container.
    sandbox(&client, &ns, "repointed", Some("claim-r")).await;
    let stale = container(&env, &agent, &ns, "repointed", "claim-r").await;
    set_sandbox_id(&client, &ns, "repointed", SandboxId::generate().as_str()).await;
    // Control: same claim label, status.sandboxID is this container.
    sandbox(&client, &ns, "current", Some("claim-c")).await;
    let current = container(&env, &agent, &ns, "current", "claim-c").await;
    set_sandbox_id(&client, &ns, "current", current.as_str()).await;

    let j = janitor(
        client.clone(),
        OwnContainers::new(&[(&uid, &agent)]),
        Duration::ZERO,
    );
    let report = j.scan_once().await.unwrap();
    assert_eq!(
        sorted(report.removed.clone()),
        sorted(vec![old.clone(), stale.clone()]),
        "{report:?}"
    );
    assert_eq!(j_containers(&j).await, vec![current.clone()]);
    assert_eq!(j.stats().removed, 2);

    cleanup(&[&agent]).await;
    for name in ["recreated", "repointed", "current"] {
        delete_sandbox(&client, &ns, name).await;
    }
    delete_pod(&client, &ns, &pod).await;
}

#[actix_rt::test]
async fn a_gone_agent_pod_orphans_its_containers_and_a_present_one_keeps_them() {
    let env = ContainerdEnv::from_env();
    let client = client().await;
    install_crds(&client).await;
    let ns = namespace(&client).await;
    let (pod_a, pod_b) = (format!("agent-{}", short()), format!("agent-{}", short()));
    let uid_a = agent_pod(&client, &ns, &pod_a).await;
    let uid_b = agent_pod(&client, &ns, &pod_b).await;
    let agent_a = start_agent(&env, &uid_a).await;
    let agent_b = start_agent(&env, &uid_b).await;
    // Both Sandboxes exist and match: only the agent pod decides.
    let claim = sandbox(&client, &ns, "on-a", None).await;
    let on_a = container(&env, &agent_a, &ns, "on-a", &claim).await;
    let claim = sandbox(&client, &ns, "on-b", None).await;
    let on_b = container(&env, &agent_b, &ns, "on-b", &claim).await;

    let j = janitor(
        client.clone(),
        OwnContainers::new(&[(&uid_a, &agent_a), (&uid_b, &agent_b)]),
        Duration::ZERO,
    );
    let report = j.scan_once().await.unwrap();
    assert!(report.removed.is_empty(), "both pods exist: {report:?}");

    delete_pod(&client, &ns, &pod_b).await;
    let report = j.scan_once().await.unwrap();
    assert_eq!(report.removed, vec![on_b.clone()], "{report:?}");
    assert_eq!(j_containers(&j).await, vec![on_a.clone()]);
    let report = j.scan_once().await.unwrap();
    assert!(
        report.removed.is_empty(),
        "the present pod keeps its container"
    );

    cleanup(&[&agent_a, &agent_b]).await;
    delete_sandbox(&client, &ns, "on-a").await;
    delete_sandbox(&client, &ns, "on-b").await;
    delete_pod(&client, &ns, &pod_a).await;
}

/// A TCP proxy in front of the API server that can refuse: while down it closes every
/// new connection at once and has cut the open ones.
struct Proxy {
    addr: SocketAddr,
    up: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl Proxy {
    async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let up = Arc::new(AtomicBool::new(true));
        let conns: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let accept = tokio::spawn({
            let (up, conns) = (up.clone(), conns.clone());
            async move {
                while let Ok((mut inbound, _)) = listener.accept().await {
                    if !up.load(Ordering::SeqCst) {
                        drop(inbound);
                        continue;
                    }
                    let conn = tokio::spawn(async move {
                        if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    });
                    conns.lock().unwrap().push(conn);
                }
            }
        });
        Self {
            addr,
            up,
            conns,
            accept,
        }
    }

    fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::SeqCst);
        if !up {
            for conn in self.conns.lock().unwrap().drain(..) {
                conn.abort();
            }
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.set_up(false);
        self.accept.abort();
    }
}

#[actix_rt::test]
async fn an_unreachable_api_server_removes_nothing_then_orphans_are_cleaned() {
    let env = ContainerdEnv::from_env();
    let client = client().await;
    install_crds(&client).await;
    let ns = namespace(&client).await;
    let (pod_live, pod_gone) = (format!("agent-{}", short()), format!("agent-{}", short()));
    let uid_live = agent_pod(&client, &ns, &pod_live).await;
    let uid_gone = agent_pod(&client, &ns, &pod_gone).await;
    let agent_live = start_agent(&env, &uid_live).await;
    let agent_gone = start_agent(&env, &uid_gone).await;
    let claim = sandbox(&client, &ns, "live", None).await;
    let live = container(&env, &agent_live, &ns, "live", &claim).await;
    let claim = sandbox(&client, &ns, "deleted", None).await;
    let deleted = container(&env, &agent_live, &ns, "deleted", &claim).await;
    let claim = sandbox(&client, &ns, "agentless", None).await;
    let agentless = container(&env, &agent_gone, &ns, "agentless", &claim).await;
    delete_sandbox(&client, &ns, "deleted").await;
    delete_pod(&client, &ns, &pod_gone).await;

    // The janitor's own client goes through the proxy.
    let mut config = kube_config().await.unwrap();
    let target: SocketAddr = config
        .cluster_url
        .authority()
        .unwrap()
        .as_str()
        .parse()
        .unwrap();
    let proxy = Proxy::start(target).await;
    config.cluster_url = format!("https://{}", proxy.addr).parse().unwrap();
    let j = janitor(
        Client::try_from(config).unwrap(),
        OwnContainers::new(&[(&uid_live, &agent_live), (&uid_gone, &agent_gone)]),
        Duration::ZERO,
    );
    let all = sorted(vec![live.clone(), deleted.clone(), agentless.clone()]);

    // Reachable first, so the client has pooled connections to lose.
    assert!(j.cluster().agent_pod_uids().await.is_ok());
    proxy.set_up(false);
    for scan in 1..=3u64 {
        let report = j.scan_once().await.unwrap();
        assert!(
            report.removed.is_empty(),
            "unknown never removes: {report:?}"
        );
        assert_eq!(report.unknown, 3, "{report:?}");
        assert_eq!(j.stats().unknown, 3 * scan);
        assert_eq!(sorted(j_containers(&j).await), all);
    }

    proxy.set_up(true);
    let report = j.scan_once().await.unwrap();
    assert_eq!(
        sorted(report.removed.clone()),
        sorted(vec![deleted.clone(), agentless.clone()]),
        "{report:?}"
    );
    assert_eq!(report.unknown, 0);
    assert_eq!(j_containers(&j).await, vec![live.clone()]);
    let stats = j.stats();
    assert_eq!((stats.removed, stats.unknown, stats.failed), (2, 9, 0));

    cleanup(&[&agent_live, &agent_gone]).await;
    delete_sandbox(&client, &ns, "live").await;
    delete_sandbox(&client, &ns, "agentless").await;
    delete_pod(&client, &ns, &pod_live).await;
}

/// A bare container record (no snapshot, no task) with `labels`, in containerd
/// namespace `cd_ns`: enough for the janitor, which lists records and removes them.
async fn bare_container(
    env: &ContainerdEnv,
    cd_ns: &str,
    labels: HashMap<String, String>,
) -> SandboxId {
    use containerd_client::services::v1::{
        Container, CreateContainerRequest, container::Runtime, containers_client::ContainersClient,
    };
    let id = SandboxId::generate();
    let mut labels = labels;
    labels.insert(fsb_core::labels::LABEL_MANAGED.into(), "true".into());
    labels.insert(fsb_core::labels::LABEL_ID.into(), id.as_str().into());
    let mut req = tonic::Request::new(CreateContainerRequest {
        container: Some(Container {
            id: id.as_str().into(),
            labels,
            image: "fsb.test/none:latest".into(),
            runtime: Some(Runtime {
                name: fsb_tests::RUNC_SHIM.into(),
                options: None,
            }),
            spec: Some(prost_types::Any {
                type_url: "types.containerd.io/opencontainers/runtime-spec/1/Spec".into(),
                value: b"{}".to_vec(),
            }),
            ..Container::default()
        }),
    });
    req.metadata_mut()
        .insert("containerd-namespace", cd_ns.parse().unwrap());
    ContainersClient::new(env.connect().await.unwrap())
        .create(req)
        .await
        .unwrap();
    id
}

#[actix_rt::test]
async fn the_binary_removes_an_old_orphan_once_and_prints_its_counters() {
    const TIMEOUT: Duration = Duration::from_secs(1);
    let bin = std::env::var("FSB_JANITOR_BIN").expect("FSB_JANITOR_BIN is set by tests/run.sh k8s");
    let kubeconfig = std::env::var("FSB_KUBECONFIG").unwrap();
    let env = ContainerdEnv::from_env();
    let client = client().await;
    install_crds(&client).await;
    let ns = namespace(&client).await;
    let pod = format!("agent-{}", short());
    let uid = agent_pod(&client, &ns, &pod).await;
    let claim = sandbox(&client, &ns, "live", None).await;
    let labels = |name: &str, claim: &str| -> HashMap<String, String> {
        [
            (fsb_core::labels::LABEL_NAMESPACE, ns.as_str()),
            (fsb_core::labels::LABEL_SANDBOX_NAME, name),
            (LABEL_CLAIM_UID, claim),
            (fsb_core::labels::LABEL_AGENT_UID, uid.as_str()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
    };
    // A containerd namespace of this test's own: the binary judges everything in it.
    let cd_ns = format!("fsb-janitor-{}", short());
    let live = bare_container(&env, &cd_ns, labels("live", &claim)).await;
    let orphan = bare_container(&env, &cd_ns, labels("never-recorded", "fast-claim")).await;
    let created = SystemTime::now();

    let run = |args: &[&str]| {
        std::process::Command::new(&bin)
            .args(args)
            .env("KUBECONFIG", &kubeconfig)
            .env("FSB_CONTAINERD_SOCKET", &env.socket)
            .env("FSB_CONTAINERD_NAMESPACE", &cd_ns)
            .env("FSB_LOG_DIR", env.run_dir.join("janitor-logs"))
            .env("RUST_LOG", "info")
            .output()
            .unwrap()
    };
    let bad = run(&["--interval-seconds", "0"]);
    assert_eq!(bad.status.code(), Some(64), "{bad:?}");
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(stderr.lines().count(), 1, "one clear line: {stderr}");
    assert!(stderr.starts_with("fsb-janitor: "), "{stderr}");

    // Both records must be older than the timeout (1 s, the smallest the flag takes).
    wait_until(
        "records older than the orphan timeout",
        DEADLINE,
        || async {
            Ok((SystemTime::now() >= created + TIMEOUT + Duration::from_millis(100)).then_some(()))
        },
    )
    .await
    .unwrap();
    let out = run(&[
        "--once",
        "--orphan-timeout-seconds",
        "1",
        "--grace-seconds",
        "0",
    ]);
    assert!(out.status.success(), "{out:?}");
    let stats: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        stats,
        json!({"scans": 1, "scan_errors": 0, "scanned": 2, "removed": 1, "failed": 0, "unknown": 0}),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("removed orphan container") && stderr.contains(orphan.as_str()),
        "each removal is logged with its reason: {stderr}"
    );
    let cd = fsb_agent::containerd::Containerd::connect(fsb_agent::containerd::ContainerdConfig {
        namespace: cd_ns.clone(),
        ..fsb_tests::containerd_config(&env)
    })
    .await
    .unwrap();
    let rt = ContainerdRuntime::new(cd, env.run_dir.join("janitor-logs"));
    let left: Vec<SandboxId> = rt
        .list(None)
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.id)
        .collect();
    assert_eq!(left, vec![live.clone()]);

    rt.remove(&live, Duration::ZERO).await.unwrap();
    delete_sandbox(&client, &ns, "live").await;
    delete_pod(&client, &ns, &pod).await;
}

/// `deploy/rbac/janitor.yaml` applied for real (server-side apply), with its namespace.
async fn apply_janitor_rbac(client: &Client) {
    use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
    let ns: Api<Namespace> = Api::all(client.clone());
    let obj: Namespace =
        serde_json::from_value(json!({"metadata": {"name": "fast-sandbox-system"}})).unwrap();
    match ns.create(&PostParams::default(), &obj).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        Err(e) => panic!("creating fast-sandbox-system: {e}"),
    }
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/rbac/janitor.yaml");
    let text = std::fs::read_to_string(path).unwrap();
    let pp = PatchParams::apply("fsb-tests").force();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let v: serde_json::Value =
            serde_yaml::from_value(serde::Deserialize::deserialize(doc).unwrap()).unwrap();
        let name = v["metadata"]["name"].as_str().unwrap().to_owned();
        match v["kind"].as_str().unwrap() {
            "ServiceAccount" => {
                let api: Api<ServiceAccount> =
                    Api::namespaced(client.clone(), v["metadata"]["namespace"].as_str().unwrap());
                api.patch(&name, &pp, &Patch::Apply(&v)).await.unwrap();
            }
            "ClusterRole" => {
                let api: Api<ClusterRole> = Api::all(client.clone());
                api.patch(&name, &pp, &Patch::Apply(&v)).await.unwrap();
            }
            "ClusterRoleBinding" => {
                let api: Api<ClusterRoleBinding> = Api::all(client.clone());
                api.patch(&name, &pp, &Patch::Apply(&v)).await.unwrap();
            }
            other => panic!("unexpected kind {other} in {path}"),
        }
    }
}

/// The API server as user `user` (impersonated by the admin).
async fn cluster_as(user: &str) -> KubeCluster {
    let mut config = kube_config().await.unwrap();
    config.auth_info.impersonate = Some(user.to_owned());
    KubeCluster::new(Client::try_from(config).unwrap(), Duration::from_secs(5))
}

#[actix_rt::test]
async fn the_deployed_rbac_answers_every_question_the_janitor_asks() {
    let client = client().await;
    install_crds(&client).await;
    apply_janitor_rbac(&client).await;
    let ns = namespace(&client).await;
    let pod = format!("agent-{}", short());
    let uid = agent_pod(&client, &ns, &pod).await;
    sandbox(&client, &ns, "live", None).await;

    // Without these permissions every answer would be "unknown" (403) and the janitor
    // would keep every orphan forever: the janitor's own account must get real answers.
    let janitor = cluster_as("system:serviceaccount:fast-sandbox-system:fsb-janitor").await;
    wait_until("the janitor's RBAC is in effect", DEADLINE, || async {
        Ok(matches!(
            janitor.sandbox(&ns, "live").await,
            fsb_janitor::Existence::Exists(_)
        )
        .then_some(()))
    })
    .await
    .unwrap();
    assert_eq!(
        janitor.sandbox(&ns, "missing").await,
        fsb_janitor::Existence::Gone
    );
    assert!(janitor.agent_pod_uids().await.unwrap().contains(&uid));

    // Control: an account without the binding gets 403s, which are unknown, not gone.
    let nobody = cluster_as(&format!("system:serviceaccount:{ns}:nobody")).await;
    assert!(matches!(
        nobody.sandbox(&ns, "missing").await,
        fsb_janitor::Existence::Unknown(_)
    ));
    assert!(nobody.agent_pod_uids().await.is_err());

    delete_sandbox(&client, &ns, "live").await;
    delete_pod(&client, &ns, &pod).await;
}
