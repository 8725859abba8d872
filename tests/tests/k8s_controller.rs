//! Kubernetes mode end to end: the controller (in-process) against the real API server,
//! real `fsb-agent` processes for agent pods, real containerd. Each test has its own
//! namespace and a controller scoped to it.
#![cfg(feature = "k8s")]

use std::time::Duration;

use anyhow::Result;
use fsb_controller::crd::{Sandbox, SandboxPhase};
use fsb_proto::{
    agent::v1::{self as av, agent_control_client::AgentControlClient},
    fastpath::v1::{self as fp, fast_path_client::FastPathClient},
};
use fsb_tests::{
    agent::container_runtime,
    cluster::{ControllerUnderTest, install_crds, namespace, pool, pool_tls},
    containerd::ContainerdEnv,
    k8s::kube_client,
    kubelet::Kubelet,
    wait::wait_until,
};
use futures::StreamExt;
use kube::{
    Api, Client,
    api::{DeleteParams, Patch, PatchParams, PostParams},
};
use serde_json::json;

const DEADLINE: Duration = Duration::from_secs(30);

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", &fsb_tests::unique_id()[..8])
}

/// A namespace with a pool `p` of `agents` pods (`per_pod` slots each) that the
/// controller's pool reconciler creates and the kubelet fixture runs (real fsb-agent
/// processes, registering with the controller), and a controller scoped to it.
struct Setup {
    client: Client,
    ns: String,
    controller: ControllerUnderTest,
    kubelet: Kubelet,
}

impl Setup {
    async fn new(prefix: &str, per_pod: u32, agents: u32) -> Result<Self> {
        let client = kube_client().await?;
        install_crds(&client).await?;
        let ns = unique(prefix);
        namespace(&client, &ns).await?;
        let controller = ControllerUnderTest::start(client.clone(), &ns, |_| {}).await?;
        let kubelet = Kubelet::start(client.clone(), &ns).await?;
        pool(&client, &ns, "p", per_pod, agents).await?;
        let s = Self {
            client,
            ns,
            controller,
            kubelet,
        };
        s.wait_agents(agents as usize).await?;
        Ok(s)
    }

    /// Wait until `n` agents are connected; their pod uids.
    async fn wait_agents(&self, n: usize) -> Result<Vec<String>> {
        let book = self.controller.shared.book.clone();
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

    /// Pod name of the agent with pod uid `uid`.
    fn pod_of(&self, uid: &str) -> Option<String> {
        self.kubelet
            .running()
            .into_iter()
            .find(|p| p.uid == uid)
            .map(|p| p.name)
    }

    fn sandboxes(&self) -> Api<Sandbox> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    async fn fast_path(&self) -> Result<FastPathClient<tonic::transport::Channel>> {
        Ok(FastPathClient::connect(self.controller.url()).await?)
    }

    /// kubectl-style create.
    async fn kubectl_create(&self, name: &str, spec: serde_json::Value) -> Result<Sandbox> {
        let obj: Sandbox = serde_json::from_value(json!({
            "apiVersion": "sandbox.fast.io/v1alpha1", "kind": "Sandbox",
            "metadata": {"name": name}, "spec": spec,
        }))?;
        Ok(self
            .sandboxes()
            .create(&PostParams::default(), &obj)
            .await?)
    }

    /// Wait until the Sandbox `name` satisfies `ok`.
    async fn wait(&self, name: &str, what: &str, ok: impl Fn(&Sandbox) -> bool) -> Result<Sandbox> {
        let api = self.sandboxes();
        wait_until(what, DEADLINE, || {
            let api = api.clone();
            let name = name.to_owned();
            let ok = &ok;
            async move { Ok(api.get_opt(&name).await?.filter(|s| ok(s))) }
        })
        .await
    }

    async fn wait_gone(&self, name: &str) -> Result<()> {
        let api = self.sandboxes();
        wait_until(&format!("{name} to be gone"), DEADLINE, || {
            let api = api.clone();
            let name = name.to_owned();
            async move { Ok(api.get_opt(&name).await?.is_none().then_some(())) }
        })
        .await
    }

    /// Ids of the containers agent `uid` has in containerd.
    async fn containers(&self, uid: &str) -> Result<Vec<String>> {
        let runtime = container_runtime(&ContainerdEnv::from_env()).await?;
        Ok(runtime
            .list(Some(uid))
            .await?
            .into_iter()
            .map(|c| c.id.to_string())
            .collect())
    }
}

fn phase(s: &Sandbox) -> Option<SandboxPhase> {
    s.status.as_ref().and_then(|st| st.phase)
}

fn sandbox_id(s: &Sandbox) -> Option<String> {
    s.status.as_ref().and_then(|st| st.sandbox_id.clone())
}

fn condition<'a>(
    s: &'a Sandbox,
    kind: &str,
) -> Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    s.status
        .as_ref()
        .and_then(|st| st.conditions.iter().find(|c| c.type_ == kind))
}

fn sleeper(image: &str) -> serde_json::Value {
    json!({"image": image, "poolRef": "p", "command": ["sleep", "600"]})
}

fn fast_create(name: &str, ns: &str, image: &str, mode: fp::ConsistencyMode) -> fp::CreateRequest {
    fp::CreateRequest {
        request_id: unique("req"),
        namespace: ns.into(),
        name: name.into(),
        mode: mode as i32,
        spec: Some(fp::SandboxSpec {
            image: image.into(),
            pool_ref: "p".into(),
            command: vec!["sleep".into(), "600".into()],
            ..fp::SandboxSpec::default()
        }),
        ..fp::CreateRequest::default()
    }
}

#[actix_rt::test]
async fn kubectl_and_fast_path_sandboxes_share_a_pool() -> Result<()> {
    let image = ContainerdEnv::from_env().image;
    let s = Setup::new("ctl-share", 8, 1).await?;
    let agent_uid = s.wait_agents(1).await?.remove(0);

    // kubectl: the controller places it.
    s.kubectl_create("kube-one", sleeper(&image)).await?;
    let placed = s
        .wait("kube-one", "kube-one Running", |o| {
            phase(o) == Some(SandboxPhase::Running)
        })
        .await?;
    let st = placed.status.clone().unwrap_or_default();
    assert_eq!(st.agent_uid.as_deref(), Some(agent_uid.as_str()));
    let kube_id = sandbox_id(&placed).expect("a sandbox id");
    assert!(
        s.containers(&agent_uid).await?.contains(&kube_id),
        "its container runs"
    );

    // Fast path, STRONG: the object exists when Create returns.
    let mut c = s.fast_path().await?;
    let resp = c
        .create(fast_create(
            "fast-strong",
            &s.ns,
            &image,
            fp::ConsistencyMode::Strong,
        ))
        .await?
        .into_inner();
    let obj = s.sandboxes().get_opt("fast-strong").await?;
    let obj = obj.expect("STRONG: the Sandbox object exists when Create returns");
    assert_eq!(
        sandbox_id(&obj),
        resp.sandbox
            .as_ref()
            .and_then(|x| x.status.as_ref())
            .map(|st| st.sandbox_id.clone())
    );
    // Its start timeline was written with the Running write: status.timeline.
    let timeline = resp
        .timeline
        .clone()
        .expect("a create answers its timeline");
    let written = obj
        .status
        .as_ref()
        .and_then(|st| st.timeline.clone())
        .expect("status.timeline");
    assert_eq!(written.total_us, timeline.total_us);
    assert_eq!(written.path, timeline.path);
    let written_names: Vec<&str> = written.stages.iter().map(|x| x.name.as_str()).collect();
    let answered_names: Vec<&str> = timeline.stages.iter().map(|x| x.name.as_str()).collect();
    assert_eq!(written_names, answered_names);
    // Fast path, FAST: the object lands shortly after, with its timeline.
    let fast = c
        .create(fast_create(
            "fast-fast",
            &s.ns,
            &image,
            fp::ConsistencyMode::Fast,
        ))
        .await?
        .into_inner();
    let landed = s
        .wait("fast-fast", "the FAST record to land Running", |o| {
            phase(o) == Some(SandboxPhase::Running)
        })
        .await?;
    let written = landed.status.and_then(|st| st.timeline);
    assert_eq!(
        written.map(|t| t.total_us),
        fast.timeline.as_ref().map(|t| t.total_us),
        "the FAST record carries the timeline"
    );
    // Get reads it back from the object.
    let got = c
        .get(fp::GetRequest {
            namespace: s.ns.clone(),
            name: "fast-fast".into(),
        })
        .await?
        .into_inner();
    assert_eq!(
        got.status.and_then(|st| st.timeline).map(|t| t.total_us),
        fast.timeline.map(|t| t.total_us)
    );

    // List shows all three; exec reaches the kubectl-made one through the agent.
    let list = c
        .list(fp::ListRequest {
            namespace: s.ns.clone(),
            ..fp::ListRequest::default()
        })
        .await?
        .into_inner();
    let mut names: Vec<String> = list.sandboxes.iter().map(|x| x.name.clone()).collect();
    names.sort();
    assert_eq!(names, ["fast-fast", "fast-strong", "kube-one"]);
    let start = fp::ExecRequest {
        msg: Some(fp::exec_request::Msg::Start(fp::ExecStart {
            namespace: s.ns.clone(),
            name: "kube-one".into(),
            command: vec!["sh".into(), "-c".into(), "echo from-$HOSTNAME-ok".into()],
            ..fp::ExecStart::default()
        })),
    };
    let mut out = c.exec(tokio_stream::iter(vec![start])).await?.into_inner();
    let (mut stdout, mut code) = (Vec::new(), None);
    while let Some(m) = out.next().await {
        match m?.msg {
            Some(fp::exec_response::Msg::Stdout(b)) => stdout.extend_from_slice(&b),
            Some(fp::exec_response::Msg::ExitCode(x)) => code = Some(x),
            _ => {}
        }
    }
    assert_eq!(code, Some(0));
    assert!(String::from_utf8_lossy(&stdout).contains("ok"));

    // kubectl delete: the finalizer comes off once the container is gone.
    s.sandboxes()
        .delete("kube-one", &DeleteParams::default())
        .await?;
    s.wait_gone("kube-one").await?;

    assert!(
        !s.containers(&agent_uid).await?.contains(&kube_id),
        "container removed with it"
    );
    // Fast-path delete removes the object too.
    c.delete(fp::DeleteRequest {
        namespace: s.ns.clone(),
        name: "fast-strong".into(),
        ..fp::DeleteRequest::default()
    })
    .await?;
    s.wait_gone("fast-strong").await?;
    s.controller.stop().await;
    Ok(())
}

#[actix_rt::test]
async fn invalid_and_unplaceable_sandboxes_say_why_and_delete_cleanly() -> Result<()> {
    let image = ContainerdEnv::from_env().image;
    let s = Setup::new("ctl-why", 8, 1).await?;
    let agent_uid = s.wait_agents(1).await?.remove(0);

    // No such pool: accepted, Pending, the condition says why.
    s.kubectl_create("no-pool", json!({"image": image, "poolRef": "nope"}))
        .await?;
    let o = s
        .wait("no-pool", "Scheduled=False NoPool", |o| {
            condition(o, "Scheduled").is_some_and(|c| c.reason == "NoPool")
        })
        .await?;
    assert_eq!(phase(&o), Some(SandboxPhase::Pending));
    assert!(condition(&o, "Scheduled").unwrap().message.contains("nope"));

    // The agent's own port: the API server accepts it (any 1..65535), we refuse it.
    s.kubectl_create(
        "agent-port",
        json!({"image": image, "poolRef": "p", "exposedPorts": [5758]}),
    )
    .await?;
    let o = s
        .wait("agent-port", "Failed InvalidSpec", |o| {
            phase(o) == Some(SandboxPhase::Failed)
        })
        .await?;
    let c = condition(&o, "Ready").expect("a Ready condition");
    assert_eq!(c.reason, "InvalidSpec");
    assert!(
        c.message.contains("exposedPorts") || c.message.contains("5758"),
        "{}",
        c.message
    );

    // Port 65535 is fine.
    s.kubectl_create("top-port", json!({"image": image, "poolRef": "p", "command": ["sleep", "600"], "exposedPorts": [65535]}))
        .await?;
    s.wait("top-port", "top-port Running", |o| {
        phase(o) == Some(SandboxPhase::Running)
    })
    .await?;

    // Deleting in any phase finishes (the original leaked Pending/Failed ones).
    for name in ["no-pool", "agent-port", "top-port"] {
        s.sandboxes().delete(name, &DeleteParams::default()).await?;
    }
    for name in ["no-pool", "agent-port", "top-port"] {
        s.wait_gone(name).await?;
    }
    assert!(
        s.containers(&agent_uid).await?.is_empty(),
        "no container left"
    );
    s.controller.stop().await;
    Ok(())
}

#[actix_rt::test]
async fn capacity_waits_then_frees_and_kubectl_reset_and_expiry_work() -> Result<()> {
    let image = ContainerdEnv::from_env().image;
    let s = Setup::new("ctl-cap", 2, 1).await?;
    let agent_uid = s.wait_agents(1).await?.remove(0);
    for n in ["a", "b", "c"] {
        s.kubectl_create(n, sleeper(&image)).await?;
    }
    // Two run, the third waits with Unschedulable.
    let waiting = wait_until("two Running and one Unschedulable", DEADLINE, || {
        let api = s.sandboxes();
        async move {
            let mut running = 0;
            let mut waiting = None;
            for n in ["a", "b", "c"] {
                let o = api.get(n).await?;
                if phase(&o) == Some(SandboxPhase::Running) {
                    running += 1;
                } else if condition(&o, "Scheduled").is_some_and(|c| c.reason == "Unschedulable") {
                    waiting = Some(n.to_owned());
                }
            }
            Ok((running == 2).then_some(waiting).flatten())
        }
    })
    .await?;
    let running: Vec<&str> = ["a", "b", "c"]
        .into_iter()
        .filter(|n| *n != waiting)
        .collect();
    assert_eq!(
        s.controller.shared.demand.get(&s.ns, "p"),
        1,
        "the pool sees the demand"
    );
    // A slot frees: the waiting one is placed.
    s.sandboxes()
        .delete(running[0], &DeleteParams::default())
        .await?;
    s.wait(&waiting, "the waiting sandbox Running", |o| {
        phase(o) == Some(SandboxPhase::Running)
    })
    .await?;

    // Reset through kubectl: acceptedResetRevision echoes it, with a fresh container.
    let before = s.sandboxes().get(running[1]).await?;
    let pid_marker = sandbox_id(&before);
    s.sandboxes()
        .patch(
            running[1],
            &PatchParams::default(),
            &Patch::Merge(&json!({"spec": {"resetRevision": 3}})),
        )
        .await?;
    let after = s
        .wait(running[1], "acceptedResetRevision 3", |o| {
            o.status
                .as_ref()
                .is_some_and(|st| st.accepted_reset_revision == 3)
                && phase(o) == Some(SandboxPhase::Running)
        })
        .await?;
    assert_eq!(sandbox_id(&after), pid_marker, "reset keeps the sandbox id");

    // Expiry: phase Expired, object kept, container gone, sandbox id and pod cleared.
    let expire =
        k8s_openapi::jiff::Timestamp::now() + k8s_openapi::jiff::SignedDuration::from_secs(3);
    s.sandboxes()
        .patch(
            &waiting,
            &PatchParams::default(),
            &Patch::Merge(&json!({"spec": {"expireTime": expire.to_string()}})),
        )
        .await?;
    let expired_id = sandbox_id(&s.sandboxes().get(&waiting).await?).expect("id");
    let o = s
        .wait(&waiting, "Expired", |o| {
            phase(o) == Some(SandboxPhase::Expired)
        })
        .await?;
    let st = o.status.clone().unwrap_or_default();
    assert!(
        st.sandbox_id.is_none() && st.assigned_pod.is_none() && st.agent_uid.is_none(),
        "{st:?}"
    );
    assert!(!s.containers(&agent_uid).await?.contains(&expired_id));
    s.controller.stop().await;
    Ok(())
}

#[actix_rt::test]
async fn only_genuine_agent_pods_may_register() -> Result<()> {
    let s = Setup::new("ctl-ident", 4, 1).await?;
    let real_uid = s.wait_agents(1).await?.remove(0);
    let real_name = s.pod_of(&real_uid).expect("the agent's pod");
    // Registrations come over mutual TLS with a certificate of pool p (as a pod of p
    // has it mounted): the API-server checks below are what stops them.
    let tls = pool_tls(&s.client, &s.ns, "p").await?;
    let channel = tonic::transport::Endpoint::from_shared(s.controller.agent_url())?
        .tls_config(tls.client(fsb_agent::tls::CONTROLLER_NAME))?
        .connect()
        .await?;
    let c = AgentControlClient::new(channel);
    let register = |pod_name: &str, pod_uid: &str, pool: &str| av::Register {
        agent_id: pod_uid.into(),
        pool: pool.into(),
        namespace: s.ns.clone(),
        node_name: "n".into(),
        pod_name: pod_name.into(),
        pod_uid: pod_uid.into(),
        endpoint: "http://127.0.0.1:1".into(),
        agent_port: 1,
        capacity: 1,
        ..av::Register::default()
    };
    let attempt = |reg: av::Register| {
        let mut c = c.clone();
        async move {
            let msg = av::AgentMessage {
                msg: Some(av::agent_message::Msg::Register(reg)),
            };
            match c.session(tokio_stream::iter(vec![msg])).await {
                Err(status) => status.code(),
                Ok(r) => {
                    let first = r.into_inner().next().await;
                    match first {
                        Some(Ok(_)) => tonic::Code::Ok,
                        Some(Err(status)) => status.code(),
                        None => tonic::Code::Unknown,
                    }
                }
            }
        }
    };
    // A pod with the right labels but no owner (a pretender).
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(s.client.clone(), &s.ns);
    let fake: k8s_openapi::api::core::v1::Pod = serde_json::from_value(json!({
        "metadata": {"name": "pretender", "labels": {"app": "sandbox-agent", "fast-sandbox.io/pool": "p"}},
        "spec": {"containers": [{"name": "a", "image": "x"}]},
    }))?;
    let fake = pods.create(&PostParams::default(), &fake).await?;
    let fake_uid = fake.metadata.uid.clone().unwrap_or_default();
    assert_eq!(
        attempt(register("pretender", &fake_uid, "p")).await,
        tonic::Code::PermissionDenied,
        "right labels, no owner"
    );
    assert_eq!(
        attempt(register(
            &real_name,
            "00000000-0000-0000-0000-000000000000",
            "p"
        ))
        .await,
        tonic::Code::PermissionDenied,
        "wrong pod uid"
    );
    assert_eq!(
        attempt(register(&real_name, &real_uid, "other")).await,
        tonic::Code::PermissionDenied,
        "another pool"
    );
    assert_eq!(
        attempt(register("no-such-pod", &fake_uid, "p")).await,
        tonic::Code::PermissionDenied,
        "no pod"
    );
    // The genuine agent is registered (by its own session).
    assert!(
        s.controller
            .shared
            .book
            .get(&fsb_core::AgentId::from(real_uid.as_str()))
            .is_some_and(|a| a.connected)
    );
    assert!(
        s.controller
            .shared
            .book
            .get(&fsb_core::AgentId::from(fake_uid.as_str()))
            .is_none()
    );
    s.controller.stop().await;
    Ok(())
}

#[actix_rt::test]
async fn lost_agent_manual_stays_lost_and_autorecreate_moves() -> Result<()> {
    let image = ContainerdEnv::from_env().image;
    let s = Setup::new("ctl-lost", 4, 2).await?;
    s.kubectl_create("manual", sleeper(&image)).await?;
    let mut auto = sleeper(&image);
    auto["failurePolicy"] = json!("AutoRecreate");
    auto["recoveryTimeoutSeconds"] = json!(2);
    s.kubectl_create("auto", auto).await?;
    let first_auto = s
        .wait("auto", "auto Running", |o| {
            phase(o) == Some(SandboxPhase::Running)
        })
        .await?;
    let first_manual = s
        .wait("manual", "manual Running", |o| {
            phase(o) == Some(SandboxPhase::Running)
        })
        .await?;
    let agent_of = |o: &Sandbox| o.status.as_ref().and_then(|st| st.agent_uid.clone());
    // The node loses the agent holding "auto": its process dies, its pod goes Failed.
    let dead_uid = agent_of(&first_auto).expect("auto has an agent");
    let dead_pod = s.pod_of(&dead_uid).expect("its pod");
    let manual_on_dead = agent_of(&first_manual) == Some(dead_uid.clone());
    s.kubelet.kill(&dead_pod).await?;

    let a = s
        .wait("auto", "auto Running on another agent", |o| {
            phase(o) == Some(SandboxPhase::Running) && agent_of(o).is_some_and(|u| u != dead_uid)
        })
        .await?;
    assert_ne!(
        sandbox_id(&a),
        sandbox_id(&first_auto),
        "recreated under a new sandbox id"
    );
    if manual_on_dead {
        let m = s
            .wait("manual", "manual Lost", |o| {
                phase(o) == Some(SandboxPhase::Lost)
            })
            .await?;
        assert!(m.status.as_ref().is_some_and(|st| st.agent_uid.is_none()));
        // Manual stays Lost (several loop passes later).
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(
            phase(&s.sandboxes().get("manual").await?),
            Some(SandboxPhase::Lost)
        );
    } else {
        assert_eq!(
            phase(&s.sandboxes().get("manual").await?),
            Some(SandboxPhase::Running)
        );
    }
    // The pool replaces the dead pod; Lost and Running sandboxes delete cleanly.
    s.wait_agents(2).await?;
    for n in ["manual", "auto"] {
        s.sandboxes().delete(n, &DeleteParams::default()).await?;
    }
    for n in ["manual", "auto"] {
        s.wait_gone(n).await?;
    }

    // Leftover containers of the dead agent are the janitor's; remove them here.
    let runtime = container_runtime(&ContainerdEnv::from_env()).await?;
    for c in runtime.list(Some(dead_uid.as_str())).await? {
        runtime.remove(&c.id, Duration::from_secs(1)).await?;
    }
    s.controller.stop().await;
    Ok(())
}
