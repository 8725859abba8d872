//! The reference scenarios (the original system's end-to-end tests, listed in the
//! design's `reference-behaviour.md`) that `k8s_controller` does not cover, end to end: the controller in-process against the real API server,
//! real `fsb-agent` processes run by the kubelet fixture for pool-made pods, the real
//! containerd, the real `fsb` CLI and the janitor library.
//!
//! - `reference_namespace_isolation_with_a_cluster_wide_controller`: a pool in A serves
//!   A; a Sandbox in B naming the same pool stays Pending `NoPool` and a fast-path
//!   create in B is refused. This one controller watches every namespace, so while it
//!   runs no other test of this file does (see [`CLUSTER_WIDE`]).
//! - `reference_env_workdir_ports_and_fast_path_reset`: env and working directory reach
//!   the process (a missing directory is created); two Sandboxes with the same port land
//!   on different agents, a third waits `PortConflict`; reset of a fast-path Sandbox.
//! - `reference_pool_grows_from_one_to_two_pods_and_back`: autoscaling with poolMin 1,
//!   poolMax 2, perPod 1.
//! - `reference_recreate_graceful_delete_and_capacity_release`: same name three times
//!   (new id, no leftover container or snapshot), SIGTERM trap with phase Terminating,
//!   1 agent x 5 slots: delete 3, a new one runs promptly.
//! - `reference_rejected_fast_record_is_cleaned_up`: a FAST create whose object a
//!   ValidatingAdmissionPolicy denies still succeeds for the client; its container goes
//!   (the gateway's own removal after its record attempts, and the janitor when the
//!   controller keeps retrying).
//! - `reference_deleting_the_agent_pod_ends_in_a_defined_phase`.
//! - `reference_cli_against_the_controller`: `fsb --endpoint <controller>` run (flags
//!   and `-f`), ls, get (yaml, json), logs (with and without `-f`), update, reset, rm,
//!   and same-name recreate through the CLI.
#![cfg(feature = "k8s")]

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Output,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use containerd_client::services::v1::snapshots::{
    StatSnapshotRequest, snapshots_client::SnapshotsClient,
};
use fsb_controller::{
    crd::{PoolCapacity, RuntimeName, Sandbox, SandboxPhase, SandboxPool, SandboxPoolSpec},
    run::ControllerConfig,
};
use fsb_janitor::{Janitor, JanitorConfig, KubeCluster};
use fsb_proto::fastpath::v1::{self as fp, fast_path_client::FastPathClient};
use fsb_tests::{
    agent::container_runtime,
    cluster::{AgentContainers, ControllerUnderTest, install_crds, namespace, pool},
    containerd::ContainerdEnv,
    k8s::{KubeApi, kube_client},
    kubelet::Kubelet,
    local::fsb_bin,
    wait::wait_until,
};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, Client,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams},
};
use serde_json::{Value, json};
use tokio::sync::{RwLock, RwLockReadGuard};

const DEADLINE: Duration = Duration::from_secs(60);

/// A controller with `namespace: None` acts on every namespace of the API server: its
/// Sandbox loop would declare the agents of other tests' controllers lost and its pool
/// reconciler would manage their pools. The test that runs one holds this for writing;
/// every other test of this file holds it for reading.
static CLUSTER_WIDE: RwLock<()> = RwLock::const_new(());

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", &fsb_tests::unique_id()[..8])
}

// ---- fixture -----------------------------------------------------------------------

/// A namespace, a controller scoped to it, the kubelet fixture running its agent pods.
struct Setup {
    client: Client,
    ns: String,
    controller: ControllerUnderTest,
    kubelet: Kubelet,
    _shared: RwLockReadGuard<'static, ()>,
}

impl Setup {
    /// Pool `p` of exactly `agents` pods with `per_pod` slots each, all registered.
    async fn new(prefix: &str, per_pod: u32, agents: u32) -> Result<Self> {
        Self::with(prefix, |_| {}, per_pod, agents).await
    }

    /// As [`Setup::new`], with the controller's configuration tweaked.
    async fn with(
        prefix: &str,
        tweak: impl FnOnce(&mut ControllerConfig),
        per_pod: u32,
        agents: u32,
    ) -> Result<Self> {
        let s = Self::bare(prefix, tweak).await?;
        pool(&s.client, &s.ns, "p", per_pod, agents).await?;
        s.wait_agents(agents as usize).await?;
        Ok(s)
    }

    /// No pool yet.
    async fn bare(prefix: &str, tweak: impl FnOnce(&mut ControllerConfig)) -> Result<Self> {
        let shared = CLUSTER_WIDE.read().await;
        let client = kube_client().await?;
        install_crds(&client).await?;
        let ns = unique(prefix);
        namespace(&client, &ns).await?;
        let controller = ControllerUnderTest::start(client.clone(), &ns, tweak).await?;
        let kubelet = Kubelet::start(client.clone(), &ns).await?;
        Ok(Self {
            client,
            ns,
            controller,
            kubelet,
            _shared: shared,
        })
    }

    async fn wait_agents(&self, n: usize) -> Result<Vec<String>> {
        wait_agents(&self.controller, n).await
    }

    fn sandboxes(&self) -> Api<Sandbox> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    async fn fast_path(&self) -> Result<FastPathClient<tonic::transport::Channel>> {
        Ok(FastPathClient::connect(self.controller.url()).await?)
    }

    async fn kubectl_create(&self, name: &str, spec: Value) -> Result<Sandbox> {
        kubectl_create(&self.sandboxes(), name, spec).await
    }

    async fn wait(&self, name: &str, what: &str, ok: impl Fn(&Sandbox) -> bool) -> Result<Sandbox> {
        wait_for(&self.sandboxes(), name, what, DEADLINE, ok).await
    }

    async fn wait_running(&self, name: &str) -> Result<Sandbox> {
        self.wait(name, &format!("{name} Running"), |o| {
            phase(o) == Some(SandboxPhase::Running)
        })
        .await
    }

    async fn delete(&self, name: &str) -> Result<()> {
        self.sandboxes()
            .delete(name, &DeleteParams::default())
            .await?;
        Ok(())
    }

    async fn wait_gone(&self, name: &str) -> Result<()> {
        wait_gone(&self.sandboxes(), name).await
    }

    /// Delete every Sandbox of the namespace and wait until none is left.
    async fn delete_all(&self) -> Result<()> {
        let api = self.sandboxes();
        for o in api.list(&ListParams::default()).await?.items {
            if let Some(n) = o.metadata.name {
                match api.delete(&n, &DeleteParams::default()).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(e)) if e.code == 404 => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        wait_until("every Sandbox gone", DEADLINE, || {
            let api = api.clone();
            async move {
                Ok(api
                    .list(&ListParams::default())
                    .await?
                    .items
                    .is_empty()
                    .then_some(()))
            }
        })
        .await
    }

    /// The fast path's Logs, read to its end.
    async fn logs(&self, name: &str) -> Result<String> {
        let mut c = self.fast_path().await?;
        let mut stream = c
            .logs(fp::LogsRequest {
                namespace: self.ns.clone(),
                name: name.into(),
                follow: false,
                tail_lines: 0,
            })
            .await?
            .into_inner();
        let mut out = Vec::new();
        while let Some(chunk) = stream.next().await {
            out.extend_from_slice(&chunk?.data);
        }
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    /// Wait until the logs of `name` satisfy `ok`; the logs.
    async fn wait_logs(&self, name: &str, what: &str, ok: impl Fn(&str) -> bool) -> Result<String> {
        wait_until(what, DEADLINE, || {
            let ok = &ok;
            async move {
                let logs = self.logs(name).await?;
                Ok(ok(&logs).then_some(logs))
            }
        })
        .await
    }
}

async fn wait_agents(controller: &ControllerUnderTest, n: usize) -> Result<Vec<String>> {
    let book = controller.shared.book.clone();
    wait_until(&format!("{n} agents registered"), DEADLINE, || {
        let connected: Vec<String> = book
            .all()
            .into_iter()
            .filter(|(_, a)| a.connected)
            .map(|(id, _)| id.to_string())
            .collect();
        async move { Ok((connected.len() == n).then_some(connected)) }
    })
    .await
}

async fn kubectl_create(api: &Api<Sandbox>, name: &str, spec: Value) -> Result<Sandbox> {
    let obj: Sandbox = serde_json::from_value(json!({
        "apiVersion": "sandbox.fast.io/v1alpha1", "kind": "Sandbox",
        "metadata": {"name": name}, "spec": spec,
    }))?;
    Ok(api.create(&PostParams::default(), &obj).await?)
}

async fn wait_for(
    api: &Api<Sandbox>,
    name: &str,
    what: &str,
    timeout: Duration,
    ok: impl Fn(&Sandbox) -> bool,
) -> Result<Sandbox> {
    wait_until(what, timeout, || {
        let api = api.clone();
        let ok = &ok;
        async move { Ok(api.get_opt(name).await?.filter(|s| ok(s))) }
    })
    .await
}

async fn wait_gone(api: &Api<Sandbox>, name: &str) -> Result<()> {
    wait_until(&format!("{name} to be gone"), DEADLINE, || {
        let api = api.clone();
        async move { Ok(api.get_opt(name).await?.is_none().then_some(())) }
    })
    .await
}

fn phase(s: &Sandbox) -> Option<SandboxPhase> {
    s.status.as_ref().and_then(|st| st.phase)
}

fn sandbox_id(s: &Sandbox) -> Option<String> {
    s.status.as_ref().and_then(|st| st.sandbox_id.clone())
}

fn agent_of(s: &Sandbox) -> Option<String> {
    s.status.as_ref().and_then(|st| st.agent_uid.clone())
}

fn condition<'a>(
    s: &'a Sandbox,
    kind: &str,
) -> Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    s.status
        .as_ref()
        .and_then(|st| st.conditions.iter().find(|c| c.type_ == kind))
}

/// Idles until SIGTERM, then exits at once. A bare `sleep` as PID 1 ignores SIGTERM,
/// so every delete (and reset) would wait out the agent's whole stop grace period.
const IDLE: &str = "trap 'exit 0' TERM; sleep 600 & wait";

fn sleeper(image: &str) -> Value {
    json!({"image": image, "poolRef": "p", "command": ["sh", "-c", IDLE]})
}

/// Ids of the containers agent `uid` has in containerd.
async fn containers(uid: &str) -> Result<Vec<String>> {
    let runtime = container_runtime(&ContainerdEnv::from_env()).await?;
    Ok(runtime
        .list(Some(uid))
        .await?
        .into_iter()
        .map(|c| c.id.to_string())
        .collect())
}

/// Whether the harness's containerd namespace holds a container `id` (any agent).
async fn container_exists(id: &str) -> Result<bool> {
    let runtime = container_runtime(&ContainerdEnv::from_env()).await?;
    Ok(runtime
        .list(None)
        .await?
        .iter()
        .any(|c| c.id.as_str() == id))
}

/// Whether containerd still has the overlayfs snapshot keyed `id` (a sandbox's rootfs).
async fn snapshot_exists(id: &str) -> Result<bool> {
    let env = ContainerdEnv::from_env();
    let mut snapshots = SnapshotsClient::new(env.connect().await?);
    let stat = StatSnapshotRequest {
        snapshotter: "overlayfs".into(),
        key: id.to_owned(),
    };
    match snapshots.stat(env.request(stat)).await {
        Ok(_) => Ok(true),
        Err(s) if s.code() == containerd_client::tonic::Code::NotFound => Ok(false),
        Err(s) => Err(s.into()),
    }
}

/// Remove what a dead agent left in containerd (the janitor's job in a cluster).
async fn remove_containers_of(uid: &str) -> Result<()> {
    let runtime = container_runtime(&ContainerdEnv::from_env()).await?;
    for c in runtime.list(Some(uid)).await? {
        runtime.remove(&c.id, Duration::from_secs(1)).await?;
    }
    Ok(())
}

// ---- 1. namespace isolation ----------------------------------------------------------

#[actix_rt::test]
async fn reference_namespace_isolation_with_a_cluster_wide_controller() -> Result<()> {
    let _alone = CLUSTER_WIDE.write().await;
    let image = ContainerdEnv::from_env().image;
    let client = kube_client().await?;
    install_crds(&client).await?;
    let (ns_a, ns_b) = (unique("ref-iso-a"), unique("ref-iso-b"));
    namespace(&client, &ns_a).await?;
    namespace(&client, &ns_b).await?;
    // Every namespace: `ControllerConfig::namespace = None` is `--watch-namespace` unset.
    let controller =
        ControllerUnderTest::start(client.clone(), &ns_a, |c| c.namespace = None).await?;
    let _kubelet = Kubelet::start(client.clone(), &ns_a).await?;
    pool(&client, &ns_a, "p", 4, 1).await?;
    let agent = wait_agents(&controller, 1).await?.remove(0);
    let (a, b): (Api<Sandbox>, Api<Sandbox>) = (
        Api::namespaced(client.clone(), &ns_a),
        Api::namespaced(client.clone(), &ns_b),
    );

    // The pool of A serves A.
    kubectl_create(&a, "a1", sleeper(&image)).await?;
    let a1 = wait_for(&a, "a1", "a1 Running in A", DEADLINE, |o| {
        phase(o) == Some(SandboxPhase::Running)
    })
    .await?;
    assert_eq!(agent_of(&a1).as_deref(), Some(agent.as_str()));

    // B names the same pool but has none: Pending, Scheduled=False NoPool.
    let b1 = kubectl_create(&b, "b1", sleeper(&image)).await?;
    let b1_id = b1.metadata.uid.clone().unwrap_or_default().replace('-', "");
    let seen = wait_for(&b, "b1", "b1 Scheduled=False NoPool", DEADLINE, |o| {
        condition(o, "Scheduled").is_some_and(|c| c.reason == "NoPool")
    })
    .await?;
    assert_eq!(phase(&seen), Some(SandboxPhase::Pending));
    let c = condition(&seen, "Scheduled").expect("a Scheduled condition");
    assert_eq!(c.status, "False");
    assert!(c.message.contains(&ns_b), "{}", c.message);

    // The fast path does not place B's sandbox on A's pool either.
    let mut fast = FastPathClient::connect(controller.url()).await?;
    let refused = fast
        .create(fp::CreateRequest {
            request_id: unique("req"),
            namespace: ns_b.clone(),
            name: "b-fast".into(),
            mode: fp::ConsistencyMode::Strong as i32,
            spec: Some(fp::SandboxSpec {
                image: image.clone(),
                pool_ref: "p".into(),
                command: vec!["sh".into(), "-c".into(), IDLE.into()],
                ..fp::SandboxSpec::default()
            }),
            ..fp::CreateRequest::default()
        })
        .await
        .expect_err("a fast-path create in B must not be placed on A's pool");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{refused}");
    assert!(b.get_opt("b-fast").await?.is_none());

    // Later passes (a2 placed after b1 was judged) still leave b1 unassigned.
    kubectl_create(&a, "a2", sleeper(&image)).await?;
    wait_for(&a, "a2", "a2 Running in A", DEADLINE, |o| {
        phase(o) == Some(SandboxPhase::Running)
    })
    .await?;
    let b1 = b.get("b1").await?;
    assert_eq!(phase(&b1), Some(SandboxPhase::Pending));
    let st = b1.status.clone().unwrap_or_default();
    assert!(
        st.agent_uid.is_none() && st.assigned_pod.is_none(),
        "b1 was assigned: {st:?}"
    );
    assert_eq!(
        condition(&b1, "Scheduled").map(|c| c.reason.as_str()),
        Some("NoPool")
    );
    let held = containers(&agent).await?;
    assert_eq!(held.len(), 2, "only A's two sandboxes run: {held:?}");
    assert!(!held.contains(&b1_id));

    for (api, n) in [(&a, "a1"), (&a, "a2"), (&b, "b1")] {
        api.delete(n, &DeleteParams::default()).await?;
    }
    for (api, n) in [(&a, "a1"), (&a, "a2"), (&b, "b1")] {
        wait_gone(api, n).await?;
    }
    assert!(containers(&agent).await?.is_empty(), "containers left");
    controller.stop().await;
    Ok(())
}

// ---- 2, 3, 10. env and workdir, same port, fast-path reset ----------------------------

#[actix_rt::test]
async fn reference_env_workdir_ports_and_fast_path_reset() -> Result<()> {
    let image = ContainerdEnv::from_env().image;
    let s = Setup::new("ref-env", 4, 2).await?;

    // Env values and a working directory that does not exist in the image.
    s.kubectl_create(
        "envs",
        json!({
            "image": image, "poolRef": "p",
            "command": ["sh", "-c", format!("echo \"G=$GREETING S=$SECOND\"; pwd; ls -d /tmp/made/here; {IDLE}")],
            "envs": [{"name": "GREETING", "value": "hi there"}, {"name": "SECOND", "value": "two=2"}],
            "workingDir": "/tmp/made/here",
        }),
    )
    .await?;
    s.wait_running("envs").await?;
    let logs = s
        .wait_logs("envs", "the env and workdir lines", |l| {
            l.lines().count() >= 3
        })
        .await?;
    assert_eq!(
        logs.lines().take(3).collect::<Vec<_>>(),
        ["G=hi there S=two=2", "/tmp/made/here", "/tmp/made/here"],
        "{logs}"
    );

    // Two Sandboxes asking for the same port land on different agents.
    let mut with_port = sleeper(&image);
    with_port["exposedPorts"] = json!([18080]);
    s.kubectl_create("port-a", with_port.clone()).await?;
    s.kubectl_create("port-b", with_port.clone()).await?;
    let pa = s.wait_running("port-a").await?;
    let pb = s.wait_running("port-b").await?;
    let (agent_a, agent_b) = (agent_of(&pa), agent_of(&pb));
    assert!(agent_a.is_some() && agent_b.is_some());
    assert_ne!(agent_a, agent_b, "same port, same agent");
    // A third with that port has free slots but no free port: it waits PortConflict.
    s.kubectl_create("port-c", with_port).await?;
    let pc = s
        .wait("port-c", "port-c Scheduled=False PortConflict", |o| {
            condition(o, "Scheduled").is_some_and(|c| c.reason == "PortConflict")
        })
        .await?;
    assert_eq!(phase(&pc), Some(SandboxPhase::Pending));
    // Freed on one agent, it is placed there.
    s.delete("port-a").await?;
    let pc = s.wait_running("port-c").await?;
    assert_eq!(agent_of(&pc), agent_a, "placed where the port was freed");

    // Reset of a Sandbox the fast path made (FAST: its object lands afterwards).
    let mut c = s.fast_path().await?;
    let created = c
        .create(fp::CreateRequest {
            request_id: unique("req"),
            namespace: s.ns.clone(),
            name: "fast-reset".into(),
            mode: fp::ConsistencyMode::Fast as i32,
            spec: Some(fp::SandboxSpec {
                image: image.clone(),
                pool_ref: "p".into(),
                command: vec![
                    "sh".into(),
                    "-c".into(),
                    format!("echo started-$(cat /proc/sys/kernel/random/uuid); {IDLE}"),
                ],
                ..fp::SandboxSpec::default()
            }),
            ..fp::CreateRequest::default()
        })
        .await?
        .into_inner();
    let id = created
        .sandbox
        .and_then(|x| x.status)
        .map(|st| st.sandbox_id)
        .expect("a sandbox id");
    let landed = s.wait_running("fast-reset").await?;
    assert_eq!(sandbox_id(&landed).as_deref(), Some(id.as_str()));
    let first = s
        .wait_logs("fast-reset", "the first start's line", |l| {
            l.contains("started-")
        })
        .await?;
    s.sandboxes()
        .patch(
            "fast-reset",
            &PatchParams::default(),
            &Patch::Merge(&json!({"spec": {"resetRevision": 2}})),
        )
        .await?;
    let after = s
        .wait("fast-reset", "acceptedResetRevision 2 and Running", |o| {
            o.status
                .as_ref()
                .is_some_and(|st| st.accepted_reset_revision == 2)
                && phase(o) == Some(SandboxPhase::Running)
        })
        .await?;
    assert_eq!(
        sandbox_id(&after).as_deref(),
        Some(id.as_str()),
        "reset keeps the id"
    );
    // The process started again (a fresh random marker).
    let second = s
        .wait_logs("fast-reset", "a second start's line", |l| {
            l.lines()
                .any(|x| x.starts_with("started-") && !first.contains(x))
        })
        .await?;
    assert!(second.contains("started-"), "{second}");

    s.delete_all().await?;
    for uid in [agent_a, agent_b].into_iter().flatten() {
        assert!(
            containers(&uid).await?.is_empty(),
            "containers left on {uid}"
        );
    }
    s.controller.stop().await;
    Ok(())
}

// ---- 4. pool autoscaling -----------------------------------------------------------------

#[actix_rt::test]
async fn reference_pool_grows_from_one_to_two_pods_and_back() -> Result<()> {
    let image = ContainerdEnv::from_env().image;
    let s = Setup::bare("ref-scale", |_| {}).await?;
    let pools: Api<SandboxPool> = Api::namespaced(s.client.clone(), &s.ns);
    let spec = SandboxPoolSpec {
        capacity: PoolCapacity {
            pool_min: 1,
            pool_max: 2,
            buffer_min: 0,
            buffer_max: 0,
        },
        max_sandboxes_per_pod: 1,
        runtime: RuntimeName::Runc,
        warm_images: Vec::new(),
        agent_template: None,
        sandbox_security: None,
    };
    pools
        .create(&PostParams::default(), &SandboxPool::new("p", spec))
        .await?;
    let first = s.wait_agents(1).await?.remove(0);
    let pods: Api<Pod> = Api::namespaced(s.client.clone(), &s.ns);
    let live_pods = || {
        let pods = pods.clone();
        async move {
            let list = pods
                .list(&ListParams::default().labels("fast-sandbox.io/pool=p"))
                .await?;
            Ok::<_, anyhow::Error>(
                list.items
                    .into_iter()
                    .filter(|p| p.metadata.deletion_timestamp.is_none())
                    .filter_map(|p| p.metadata.uid)
                    .collect::<BTreeSet<String>>(),
            )
        }
    };
    assert_eq!(
        live_pods().await?.len(),
        1,
        "poolMin 1 and no demand: one pod"
    );

    for n in ["one", "two"] {
        s.kubectl_create(n, sleeper(&image)).await?;
    }
    let one = s.wait_running("one").await?;
    let two = s.wait_running("two").await?;
    assert_ne!(agent_of(&one), agent_of(&two), "one sandbox per pod");
    assert!([agent_of(&one), agent_of(&two)].contains(&Some(first.clone())));
    assert_eq!(live_pods().await?.len(), 2, "the pool grew to poolMax");
    let status = wait_until("pool status: 2 busy agents", DEADLINE, || {
        let pools = pools.clone();
        async move {
            let st = pools.get("p").await?.status.unwrap_or_default();
            Ok((st.current_pods == 2 && st.busy_agents == 2).then_some(st))
        }
    })
    .await?;
    assert_eq!(status.total_agents, 2, "{status:?}");

    // Demand gone: back to poolMin (an idle agent is drained, then its pod deleted).
    s.delete_all().await?;
    wait_until("the pool shrinks back to one pod", DEADLINE, || async {
        Ok((live_pods().await?.len() == 1).then_some(()))
    })
    .await?;
    s.wait_agents(1).await?;
    s.controller.stop().await;
    Ok(())
}

// ---- 5, 6, 7. recreate, graceful delete, capacity ----------------------------------------

#[actix_rt::test]
async fn reference_recreate_graceful_delete_and_capacity_release() -> Result<()> {
    let image = ContainerdEnv::from_env().image;
    let s = Setup::new("ref-life", 5, 1).await?;
    let agent = s.wait_agents(1).await?.remove(0);

    // Same name, three times: a new sandbox id each time, nothing left over.
    let mut ids = Vec::new();
    for round in 0..3 {
        s.kubectl_create("again", sleeper(&image)).await?;
        let o = s.wait_running("again").await?;
        let id = sandbox_id(&o).expect("a sandbox id");
        assert!(!ids.contains(&id), "round {round}: sandbox id {id} reused");
        assert!(
            containers(&agent).await?.contains(&id),
            "its container runs"
        );
        assert!(snapshot_exists(&id).await?, "its snapshot exists");
        s.delete("again").await?;
        s.wait_gone("again").await?;
        assert!(
            !containers(&agent).await?.contains(&id),
            "round {round}: container {id} left"
        );
        assert!(
            !snapshot_exists(&id).await?,
            "round {round}: snapshot {id} left"
        );
        ids.push(id);
    }

    // Graceful delete: the trap gets SIGTERM, the phase goes Terminating, the object
    // goes once the process exited.
    s.kubectl_create(
        "trap",
        json!({"image": image, "poolRef": "p", "command": ["sh", "-c",
            "trap 'echo got-term; exit 0' TERM; echo ready; while true; do sleep 0.1; done"]}),
    )
    .await?;
    s.wait_running("trap").await?;
    // Follow the log from before the delete to the process's end.
    let mut c = s.fast_path().await?;
    let mut follow = c
        .logs(fp::LogsRequest {
            namespace: s.ns.clone(),
            name: "trap".into(),
            follow: true,
            tail_lines: 0,
        })
        .await?
        .into_inner();
    let mut text = String::new();
    while !text.contains("ready\n") {
        let chunk = tokio::time::timeout(DEADLINE, follow.next())
            .await
            .context("no log line within the deadline")?
            .context("the log stream ended before `ready`")??;
        text.push_str(&String::from_utf8_lossy(&chunk.data));
    }
    // Watch the object from its current version: every phase it goes through.
    let api = s.sandboxes();
    let version = api
        .get("trap")
        .await?
        .metadata
        .resource_version
        .unwrap_or_default();
    let mut events = api
        .watch(
            &WatchParams::default().fields("metadata.name=trap"),
            &version,
        )
        .await?
        .boxed();
    s.delete("trap").await?;
    let phases = tokio::time::timeout(DEADLINE, async {
        let mut phases = Vec::new();
        while let Some(ev) = events.next().await {
            match ev? {
                WatchEvent::Modified(o) => phases.push(phase(&o)),
                WatchEvent::Deleted(_) => return Ok::<_, anyhow::Error>(phases),
                WatchEvent::Error(e) => bail!("watch: {e:?}"),
                WatchEvent::Added(_) | WatchEvent::Bookmark(_) => {}
            }
        }
        bail!("the watch ended before the object was deleted")
    })
    .await
    .context("the trap Sandbox was not deleted within the deadline")??;
    while let Some(chunk) = tokio::time::timeout(DEADLINE, follow.next())
        .await
        .context("the log stream did not end")?
    {
        text.push_str(&String::from_utf8_lossy(&chunk?.data));
    }
    assert_eq!(text, "ready\ngot-term\n", "the trap ran on SIGTERM");
    assert!(
        phases.contains(&Some(SandboxPhase::Terminating)),
        "status.phase went Terminating before the object went: {phases:?}"
    );
    assert!(
        containers(&agent).await?.is_empty(),
        "the trap's container left"
    );

    // Capacity is released: 5 slots, 5 running, delete 3, a new one runs promptly.
    let names: Vec<String> = (0..5).map(|i| format!("c{i}")).collect();
    for n in &names {
        s.kubectl_create(n, sleeper(&image)).await?;
    }
    for n in &names {
        s.wait_running(n).await?;
    }
    s.kubectl_create("sixth", sleeper(&image)).await?;
    s.wait("sixth", "sixth Unschedulable", |o| {
        condition(o, "Scheduled").is_some_and(|c| c.reason == "Unschedulable")
    })
    .await?;
    let freed = Instant::now();
    for n in &names[..3] {
        s.delete(n).await?;
    }
    const PROMPTLY: Duration = Duration::from_secs(15);
    wait_for(&s.sandboxes(), "sixth", "sixth Running", PROMPTLY, |o| {
        phase(o) == Some(SandboxPhase::Running)
    })
    .await?;
    let took = freed.elapsed();
    assert!(took < PROMPTLY, "placed {took:?} after the deletes");
    for n in &names[..3] {
        s.wait_gone(n).await?;
    }
    s.kubectl_create("seventh", sleeper(&image)).await?;
    s.wait_running("seventh").await?;

    s.delete_all().await?;
    assert!(containers(&agent).await?.is_empty(), "containers left");
    s.controller.stop().await;
    Ok(())
}

// ---- 8. a FAST create whose object admission rejects ---------------------------------

const DENY_LABEL: &str = "deny-record";

/// A ValidatingAdmissionPolicy (+ binding) refusing to create Sandboxes labelled
/// [`DENY_LABEL`] in namespace `ns`; returns once the API server enforces it.
async fn deny_labelled_sandboxes(api: &KubeApi, ns: &str) -> Result<String> {
    let name = format!("fsb-deny-{ns}");
    let policy = json!({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": name},
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": {"resourceRules": [{
                "apiGroups": ["sandbox.fast.io"], "apiVersions": ["v1alpha1"],
                "operations": ["CREATE"], "resources": ["sandboxes"],
            }]},
            "validations": [{
                "expression": format!("!has(object.metadata.labels) || !('{DENY_LABEL}' in object.metadata.labels)"),
                "message": "denied by the test policy",
            }],
        },
    });
    let binding = json!({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": name},
        "spec": {
            "policyName": name,
            "validationActions": ["Deny"],
            "matchResources": {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}}},
        },
    });
    let base = "/apis/admissionregistration.k8s.io/v1";
    for (kind, body) in [
        ("validatingadmissionpolicies", &policy),
        ("validatingadmissionpolicybindings", &binding),
    ] {
        let (code, resp) = api.post(&format!("{base}/{kind}"), body).await?;
        ensure!(code == 201, "creating {kind}: HTTP {code}: {resp}");
    }
    // Policies take effect asynchronously: dry-run creates until one is denied.
    let probe = json!({
        "apiVersion": "sandbox.fast.io/v1alpha1", "kind": "Sandbox",
        "metadata": {"name": "probe", "labels": {DENY_LABEL: "yes"}},
        "spec": {"image": "x", "poolRef": "p"},
    });
    let path = format!("/apis/sandbox.fast.io/v1alpha1/namespaces/{ns}/sandboxes?dryRun=All");
    wait_until("the admission policy to deny", DEADLINE, || async {
        let (code, resp) = api.post(&path, &probe).await?;
        Ok((code >= 400 && resp.to_string().contains("denied by the test policy")).then_some(()))
    })
    .await?;
    Ok(name)
}

async fn remove_policy(api: &KubeApi, name: &str) -> Result<()> {
    let base = "/apis/admissionregistration.k8s.io/v1";
    for kind in [
        "validatingadmissionpolicybindings",
        "validatingadmissionpolicies",
    ] {
        let (code, resp) = api
            .send(
                reqwest::Method::DELETE,
                &format!("{base}/{kind}/{name}"),
                None,
            )
            .await?;
        ensure!(code == 200, "deleting {kind}/{name}: HTTP {code}: {resp}");
    }
    Ok(())
}

/// A FAST create of `name` labelled to be denied.
fn denied_create(ns: &str, name: &str, image: &str) -> fp::CreateRequest {
    fp::CreateRequest {
        request_id: unique("req"),
        namespace: ns.into(),
        name: name.into(),
        mode: fp::ConsistencyMode::Fast as i32,
        labels: [(DENY_LABEL.to_owned(), "yes".to_owned())].into(),
        spec: Some(fp::SandboxSpec {
            image: image.into(),
            pool_ref: "p".into(),
            command: vec!["sleep".into(), "600".into()],
            ..fp::SandboxSpec::default()
        }),
        ..fp::CreateRequest::default()
    }
}

fn created_id(resp: &fp::CreateResponse) -> String {
    resp.sandbox
        .as_ref()
        .and_then(|x| x.status.as_ref())
        .map(|st| st.sandbox_id.clone())
        .unwrap_or_default()
}

#[actix_rt::test]
async fn reference_rejected_fast_record_is_cleaned_up() -> Result<()> {
    let image = ContainerdEnv::from_env().image;
    let rest = KubeApi::from_env()?;

    // (a) The product as configured: the gateway retries the record write
    // (`record_attempts`, about 2.5 s of backoff), then removes the container itself.
    {
        let s = Setup::new("ref-deny", 4, 1).await?;
        let agent = s.wait_agents(1).await?.remove(0);
        let policy = deny_labelled_sandboxes(&rest, &s.ns).await?;
        let mut c = s.fast_path().await?;
        let resp = c
            .create(denied_create(&s.ns, "denied", &image))
            .await
            .context("a FAST create succeeds before its record is written")?
            .into_inner();
        let id = created_id(&resp);
        assert!(!id.is_empty(), "{resp:?}");
        assert_eq!(resp.mode, fp::ConsistencyMode::Fast as i32);
        const GATEWAY_BOUND: Duration = Duration::from_secs(20);
        wait_until(
            "the unrecorded container removed by the gateway",
            GATEWAY_BOUND,
            || async { Ok((!containers(&agent).await?.contains(&id)).then_some(())) },
        )
        .await?;
        assert!(
            s.sandboxes().get_opt("denied").await?.is_none(),
            "no object"
        );
        // Its slot is free again: an allowed sandbox of the same name runs.
        s.kubectl_create("denied", sleeper(&image)).await?;
        s.wait_running("denied").await?;
        s.delete_all().await?;
        remove_policy(&rest, &policy).await?;
        s.controller.stop().await;
    }

    // (b) A controller still retrying the write when the janitor's orphan timeout has
    // passed (26 attempts: about 20 s of backoff): the janitor removes the container.
    const ORPHAN_TIMEOUT: Duration = Duration::from_secs(5);
    const JANITOR_BOUND: Duration = Duration::from_secs(15);
    let s = Setup::with(
        "ref-deny-j",
        |c| {
            c.gateway.record_attempts = 26;
            c.gateway.record_backoff_max = Duration::from_secs(1);
        },
        4,
        1,
    )
    .await?;
    let agent = s.wait_agents(1).await?.remove(0);
    let policy = deny_labelled_sandboxes(&rest, &s.ns).await?;
    let mut c = s.fast_path().await?;
    let created = Instant::now();
    let resp = c
        .create(denied_create(&s.ns, "denied", &image))
        .await
        .context("a FAST create succeeds before its record is written")?
        .into_inner();
    let id = created_id(&resp);
    assert!(
        containers(&agent).await?.contains(&id),
        "the container runs"
    );
    let janitor = Janitor::new(
        KubeCluster::new(s.client.clone(), Duration::from_secs(5)),
        AgentContainers {
            runtime: container_runtime(&ContainerdEnv::from_env()).await?,
            agent: agent.clone(),
        },
        JanitorConfig {
            node_name: "fsb-test-node".into(),
            interval: Duration::from_secs(1),
            orphan_timeout: ORPHAN_TIMEOUT,
            grace: Duration::ZERO,
        },
    );
    let young = janitor.scan_once().await?;
    if created.elapsed() < ORPHAN_TIMEOUT {
        assert!(
            young.removed.is_empty(),
            "removed while younger than the timeout"
        );
    }
    let removed = wait_until(
        "the janitor to remove the unrecorded container",
        JANITOR_BOUND.saturating_sub(created.elapsed()),
        || async {
            let report = janitor.scan_once().await?;
            Ok((!report.removed.is_empty()).then_some(report.removed))
        },
    )
    .await?;
    assert!(
        created.elapsed() >= ORPHAN_TIMEOUT,
        "removed before the orphan timeout"
    );
    assert_eq!(
        removed.iter().map(|x| x.to_string()).collect::<Vec<_>>(),
        std::slice::from_ref(&id),
        "the janitor removed exactly the unrecorded container"
    );
    assert!(!containers(&agent).await?.contains(&id));
    assert!(!snapshot_exists(&id).await?, "its snapshot went with it");
    // The writer gives up (its reservation is released) and never wrote the object.
    let registry = s.controller.shared.registry.clone();
    wait_until("the record writer to give up", DEADLINE, || async {
        Ok((registry.snapshot().await?.sandboxes == 0).then_some(()))
    })
    .await?;
    assert!(
        s.sandboxes().get_opt("denied").await?.is_none(),
        "no object"
    );
    remove_policy(&rest, &policy).await?;
    s.controller.stop().await;
    Ok(())
}

// ---- 9. deleting the agent pod ---------------------------------------------------------

#[actix_rt::test]
async fn reference_deleting_the_agent_pod_ends_in_a_defined_phase() -> Result<()> {
    let image = ContainerdEnv::from_env().image;
    let s = Setup::new("ref-podel", 4, 1).await?;
    let old = s.wait_agents(1).await?.remove(0);
    s.kubectl_create("manual", sleeper(&image)).await?;
    let mut auto = sleeper(&image);
    auto["failurePolicy"] = json!("AutoRecreate");
    auto["recoveryTimeoutSeconds"] = json!(2);
    s.kubectl_create("auto", auto).await?;
    let first_auto = s.wait_running("auto").await?;
    s.wait_running("manual").await?;
    let pod = s
        .kubelet
        .running()
        .into_iter()
        .find(|p| p.uid == old)
        .map(|p| p.name)
        .expect("the agent's pod");

    // A normal API delete (grace period, SIGTERM to the agent), not a kill.
    let pods: Api<Pod> = Api::namespaced(s.client.clone(), &s.ns);
    pods.delete(&pod, &DeleteParams::default()).await?;

    let manual = s
        .wait("manual", "manual Lost", |o| {
            phase(o) == Some(SandboxPhase::Lost)
        })
        .await?;
    assert!(agent_of(&manual).is_none(), "{:?}", manual.status);
    // The pool replaces the pod; AutoRecreate moves there under a new id.
    let a = s
        .wait("auto", "auto Running on the replacement agent", |o| {
            phase(o) == Some(SandboxPhase::Running) && agent_of(o).is_some_and(|u| u != old)
        })
        .await?;
    assert_ne!(sandbox_id(&a), sandbox_id(&first_auto));
    let new = agent_of(&a).expect("an agent");
    assert_eq!(
        phase(&s.sandboxes().get("manual").await?),
        Some(SandboxPhase::Lost),
        "Manual stays Lost"
    );
    // Deleting both finishes.
    for n in ["manual", "auto"] {
        s.delete(n).await?;
    }
    for n in ["manual", "auto"] {
        s.wait_gone(n).await?;
    }
    assert!(
        containers(&new).await?.is_empty(),
        "containers left on the new agent"
    );
    // What the old agent left running is the janitor's (k8s_janitor); remove it here.
    remove_containers_of(&old).await?;
    s.controller.stop().await;
    Ok(())
}

// ---- 11. the fsb CLI against the controller --------------------------------------------

/// `fsb --endpoint <controller> --data-dir <dir> ARGS` with no FSB_* setting leaking in.
struct Cli {
    endpoint: String,
    data_dir: PathBuf,
    ns: String,
}

impl Cli {
    async fn run(&self, args: &[&str]) -> Result<Output> {
        let mut cmd = tokio::process::Command::new(fsb_bin());
        for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("FSB_")) {
            cmd.env_remove(k);
        }
        // `-n` right after the command: `run` ends with `-- CMD...`.
        let (command, rest) = args.split_first().context("a command")?;
        Ok(cmd
            .arg("--endpoint")
            .arg(&self.endpoint)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg(command)
            .args(["-n", &self.ns])
            .args(rest)
            .output()
            .await?)
    }

    /// Run and require success; stdout.
    async fn ok(&self, args: &[&str]) -> Result<String> {
        let o = self.run(args).await?;
        ensure!(
            o.status.success(),
            "fsb {args:?}: exit {:?}\nstdout: {}\nstderr: {}",
            o.status.code(),
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    }

    async fn get_json(&self, name: &str) -> Result<Value> {
        Ok(serde_json::from_str(
            &self.ok(&["get", name, "-o", "json"]).await?,
        )?)
    }

    async fn wait_json(
        &self,
        name: &str,
        what: &str,
        ok: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        wait_until(what, DEADLINE, || {
            let ok = &ok;
            async move {
                let v = self.get_json(name).await?;
                Ok(ok(&v).then_some(v))
            }
        })
        .await
    }
}

fn write_manifest(dir: &Path, doc: &Value) -> Result<PathBuf> {
    let path = dir.join("svc.yaml");
    std::fs::write(&path, serde_yaml::to_string(doc)?)?;
    Ok(path)
}

#[actix_rt::test]
async fn reference_cli_against_the_controller() -> Result<()> {
    let env = ContainerdEnv::from_env();
    let image = env.image.clone();
    let s = Setup::new("ref-cli", 8, 1).await?;
    let agent = s.wait_agents(1).await?.remove(0);
    let dir = tempfile::tempdir_in(&env.run_dir)?;
    let cli = Cli {
        endpoint: s.controller.url(),
        data_dir: dir.path().to_owned(),
        ns: s.ns.clone(),
    };

    // run with flags; logs in order, with and without follow.
    let name = cli
        .ok(&[
            "run",
            "--name",
            "logs",
            "--image",
            &image,
            "--pool",
            "p",
            "--",
            "sh",
            "-c",
            "echo Log-Line-1; sleep 1; echo Log-Line-2",
        ])
        .await?;
    assert_eq!(name.trim(), "logs");
    assert_eq!(
        cli.ok(&["logs", "-f", "logs"]).await?,
        "Log-Line-1\nLog-Line-2\n",
        "logs -f follows to the process's end"
    );
    let done = cli
        .wait_json("logs", "logs Succeeded", |v| {
            v["status"]["phase"] == "Succeeded"
        })
        .await?;
    assert_eq!(done["status"]["exitCode"], 0, "{done}");
    assert_eq!(cli.ok(&["logs", "logs"]).await?, "Log-Line-1\nLog-Line-2\n");
    let obj = s
        .wait("logs", "the logs object Succeeded", |o| {
            phase(o) == Some(SandboxPhase::Succeeded)
        })
        .await?;
    assert_eq!(obj.status.and_then(|st| st.exit_code), Some(0));

    // run -f manifest (a flag overrides it).
    let manifest = write_manifest(
        dir.path(),
        &json!({
            "apiVersion": "sandbox.fast.io/v1alpha1", "kind": "Sandbox",
            "metadata": {"name": "svc", "labels": {"tier": "one"}},
            "spec": {
                "image": "overridden/by:flag", "poolRef": "p",
                "command": ["sh", "-c", format!("echo started-$(cat /proc/sys/kernel/random/uuid) $MODE; {IDLE}")],
                "envs": [{"name": "MODE", "value": "from-manifest"}],
            },
        }),
    )?;
    let manifest = manifest.display().to_string();
    let name = cli.ok(&["run", "-f", &manifest, "--image", &image]).await?;
    assert_eq!(name.trim(), "svc");
    let svc = cli
        .wait_json("svc", "svc Running", |v| v["status"]["phase"] == "Running")
        .await?;
    assert_eq!(svc["spec"]["image"], image.as_str(), "{svc}");
    assert_eq!(svc["metadata"]["labels"]["tier"], "one", "{svc}");
    let first_log = wait_until("svc's first line", DEADLINE, || async {
        let l = cli.ok(&["logs", "svc"]).await?;
        Ok(l.contains("from-manifest").then_some(l))
    })
    .await?;
    let svc_obj = s.wait_running("svc").await?;
    let svc_id = sandbox_id(&svc_obj).expect("an id");
    assert_eq!(svc["status"]["sandboxId"], svc_id.as_str(), "{svc}");

    // ls (table and json), get -o yaml.
    let table = cli.ok(&["ls"]).await?;
    for (n, p) in [("logs", "Succeeded"), ("svc", "Running")] {
        assert!(
            table.lines().any(|l| l.contains(n) && l.contains(p)),
            "{table}"
        );
    }
    let listed: Value = serde_json::from_str(&cli.ok(&["ls", "-o", "json"]).await?)?;
    let mut names: Vec<&str> = listed["items"]
        .as_array()
        .context("items")?
        .iter()
        .filter_map(|i| i["metadata"]["name"].as_str())
        .collect();
    names.sort();
    assert_eq!(names, ["logs", "svc"], "{listed}");
    let yaml = cli.ok(&["get", "svc", "-o", "yaml"]).await?;
    let doc: Value = serde_yaml::from_str(&yaml)?;
    assert_eq!(doc["kind"], "Sandbox", "{yaml}");
    assert_eq!(doc["status"]["phase"], "Running", "{yaml}");
    assert_eq!(doc["metadata"]["namespace"], s.ns.as_str(), "{yaml}");

    // update: labels, failure policy, then reset, then expiry.
    cli.ok(&[
        "update",
        "svc",
        "--label",
        "team=a",
        "--remove-label",
        "tier",
        "--failure-policy",
        "auto-recreate",
        "--recovery-timeout",
        "7",
    ])
    .await?;
    let v = cli.get_json("svc").await?;
    assert_eq!(v["metadata"]["labels"]["team"], "a", "{v}");
    assert!(v["metadata"]["labels"].get("tier").is_none(), "{v}");
    assert_eq!(v["spec"]["failurePolicy"], "AutoRecreate", "{v}");
    let o = s.sandboxes().get("svc").await?;
    let labels = o.metadata.labels.clone().unwrap_or_default();
    assert_eq!(labels.get("team").map(String::as_str), Some("a"));
    assert!(!labels.contains_key("tier"));
    assert_eq!(
        o.spec.failure_policy,
        fsb_controller::crd::FailurePolicy::AutoRecreate
    );
    assert_eq!(o.spec.recovery_timeout_seconds, 7);

    cli.ok(&["reset", "svc"]).await?;
    let v = cli
        .wait_json("svc", "reset accepted", |v| {
            v["status"]["acceptedResetRevision"] == 1 && v["status"]["phase"] == "Running"
        })
        .await?;
    assert_eq!(v["status"]["sandboxId"], svc_id.as_str(), "{v}");
    wait_until("svc started again", DEADLINE, || async {
        let l = cli.ok(&["logs", "svc"]).await?;
        Ok(l.lines()
            .any(|x| x.starts_with("started-") && !first_log.contains(x))
            .then_some(()))
    })
    .await?;
    s.wait("svc", "the object's acceptedResetRevision 1", |o| {
        o.status
            .as_ref()
            .is_some_and(|st| st.accepted_reset_revision == 1)
    })
    .await?;

    cli.ok(&["update", "svc", "--ttl", "2s"]).await?;
    let expired = cli
        .wait_json("svc", "svc Expired", |v| v["status"]["phase"] == "Expired")
        .await?;
    assert_eq!(expired["status"]["sandboxId"], "", "{expired}");
    let o = s
        .wait("svc", "the object Expired", |o| {
            phase(o) == Some(SandboxPhase::Expired)
        })
        .await?;
    assert!(o.spec.expire_time.is_some());
    assert!(!container_exists(&svc_id).await?, "expired container left");

    // rm, then get says not found (exit 3) and the objects are gone.
    cli.ok(&["rm", "logs", "svc"]).await?;
    for n in ["logs", "svc"] {
        assert_eq!(cli.run(&["get", n]).await?.status.code(), Some(3));
        s.wait_gone(n).await?;
    }

    // Same name through the CLI: create, delete, recreate, twice; nothing left over.
    let mut ids = Vec::new();
    for round in 0..3 {
        cli.ok(&[
            "run", "--name", "again", "--image", &image, "--pool", "p", "--", "sh", "-c", IDLE,
        ])
        .await?;
        let v = cli
            .wait_json("again", "again Running", |v| {
                v["status"]["phase"] == "Running"
            })
            .await?;
        let id = v["status"]["sandboxId"]
            .as_str()
            .context("sandboxId")?
            .to_owned();
        assert!(!ids.contains(&id), "round {round}: id {id} reused");
        assert!(snapshot_exists(&id).await?, "its snapshot exists");
        cli.ok(&["rm", "--grace", "0", "again"]).await?;
        assert_eq!(cli.run(&["get", "again"]).await?.status.code(), Some(3));
        s.wait_gone("again").await?;
        assert!(
            !containers(&agent).await?.contains(&id),
            "container {id} left"
        );
        assert!(!snapshot_exists(&id).await?, "snapshot {id} left");
        ids.push(id);
    }
    let listed: Value = serde_json::from_str(&cli.ok(&["ls", "-o", "json"]).await?)?;
    assert_eq!(
        listed["items"].as_array().map(Vec::len),
        Some(0),
        "{listed}"
    );
    assert!(containers(&agent).await?.is_empty());
    s.controller.stop().await;
    Ok(())
}
