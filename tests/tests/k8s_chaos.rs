//! Chaos: `kill -9` of the real `fsb-controller` process at three points during 500
//! creates (FAST and STRONG alternating, 8 in flight, ports contended), a restart
//! after each, then a final controller (in-process, to read its registry):
//! - every acknowledged STRONG create exists as a Sandbox with the acknowledged
//!   sandbox id; an acknowledged FAST create either does too or (its record lost with
//!   the process, as FAST allows) has left no container;
//! - no port is held twice on one agent;
//! - containerd holds exactly the containers of recorded sandboxes within the
//!   janitor's bound (its orphan timeout + a scan; the controller's orphan scan removes
//!   most earlier): nothing unrecorded survives;
//! - the registry's count equals the live sandboxes.
#![cfg(feature = "k8s")]

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use anyhow::{Result, bail};
use fsb_controller::crd::{Sandbox, SandboxPhase};
use fsb_janitor::{Janitor, JanitorConfig, KubeCluster};
use fsb_proto::fastpath::v1::{self as fp, fast_path_client::FastPathClient};
use fsb_tests::{
    agent::container_runtime,
    cluster::{
        AgentContainers, ControllerProcess, ControllerUnderTest, free_port, install_crds,
        namespace, pool,
    },
    containerd::ContainerdEnv,
    k8s::kube_client,
    kubelet::Kubelet,
    wait::wait_until,
};
use futures::StreamExt;
use kube::{Api, api::ListParams};

const CREATES: usize = 500;
const IN_FLIGHT: usize = 8;
const PORTS: u32 = 300;
const KILL_AFTER: [usize; 3] = [90, 230, 380];
/// Slots per agent (2 agents): fewer places than creates.
const SLOTS: u32 = 220;

/// The controller process of this test: leader election on, and the same identity
/// after a restart takes the lease over at once (a restarted container of one pod).
fn spawn_controller(ns: &str, fast: u16, agents: u16) -> Result<ControllerProcess> {
    ControllerProcess::spawn(
        ns,
        fast,
        agents,
        "chaos-controller",
        &[
            "--startup-wait-seconds",
            "10",
            "--agent-lost-after-seconds",
            "60",
            "--heartbeat-ms",
            "500",
        ],
    )
}

#[derive(Clone, Debug)]
struct Acked {
    mode: fp::ConsistencyMode,
    sandbox_id: String,
}

fn request(i: usize, ns: &str, image: &str) -> fp::CreateRequest {
    let mode = if i.is_multiple_of(2) {
        fp::ConsistencyMode::Fast
    } else {
        fp::ConsistencyMode::Strong
    };
    // A spread of ports, contended: 500 creates over 300 ports on 2 agents.
    let port = 20_000 + u32::try_from(i * 7919 % PORTS as usize).unwrap_or(0);
    fp::CreateRequest {
        request_id: format!("chaos-{i}"),
        namespace: ns.into(),
        name: format!("c{i}"),
        mode: mode as i32,
        spec: Some(fp::SandboxSpec {
            image: image.into(),
            pool_ref: "p".into(),
            command: vec!["sleep".into(), "3600".into()],
            exposed_ports: vec![port],
            ..fp::SandboxSpec::default()
        }),
        ..fp::CreateRequest::default()
    }
}

/// One create, retried with the same request id while the controller is down or
/// restarting. `None`: refused for good (no free slot or port: allowed, not acked).
async fn create_until_answered(url: &str, req: fp::CreateRequest) -> Result<Option<Acked>> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let attempt = async {
            let mut c = FastPathClient::connect(url.to_owned()).await?;
            let mut r = tonic::Request::new(req.clone());
            r.set_timeout(Duration::from_secs(30));
            anyhow::Ok(c.create(r).await)
        }
        .await;
        match attempt {
            Ok(Ok(resp)) => {
                let resp = resp.into_inner();
                let id = resp
                    .sandbox
                    .and_then(|s| s.status)
                    .map(|s| s.sandbox_id)
                    .unwrap_or_default();
                return Ok(Some(Acked {
                    mode: req.mode(),
                    sandbox_id: id,
                }));
            }
            Ok(Err(s)) if s.code() == tonic::Code::ResourceExhausted => return Ok(None),
            Ok(Err(s))
                if matches!(
                    s.code(),
                    tonic::Code::InvalidArgument | tonic::Code::PermissionDenied
                ) =>
            {
                bail!("create {} refused: {s}", req.name)
            }
            // Down, restarting, not serving yet, cut mid-call: retry the same id.
            Ok(Err(_)) | Err(_) => {}
        }
        if tokio::time::Instant::now() > deadline {
            bail!("create {} got no answer within 120 s", req.name);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Acknowledged creates the store contradicts. STRONG: recorded before the answer, so
/// its object must exist with the answered id. FAST: answered before its record, which
/// a `kill -9` may lose (then its container must go too, checked apart); if the
/// object exists it must carry the answered id (never a second container).
fn broken_acks(acked: &BTreeMap<usize, Acked>, by_name: &HashMap<String, &Sandbox>) -> Vec<String> {
    acked
        .iter()
        .filter_map(|(i, a)| {
            let got = by_name
                .get(&format!("c{i}"))
                .and_then(|o| o.status.as_ref())
                .map(|s| (s.sandbox_id.clone(), s.phase));
            let ok = match (a.mode, &got) {
                (fp::ConsistencyMode::Strong, _) | (_, Some(_)) => {
                    got.as_ref().and_then(|g| g.0.as_ref()) == Some(&a.sandbox_id)
                }
                (_, None) => true,
            };
            (!ok).then(|| format!("c{i} {:?} acked {} got {got:?}", a.mode, a.sandbox_id))
        })
        .collect()
}

#[actix_rt::test]
async fn controller_killed_during_500_creates_loses_nothing_and_leaks_nothing() -> Result<()> {
    let image = ContainerdEnv::from_env().image;
    let client = kube_client().await?;
    install_crds(&client).await?;
    let ns = format!("chaos-{}", &fsb_tests::unique_id()[..8]);
    namespace(&client, &ns).await?;
    let kubelet = Kubelet::start(client.clone(), &ns).await?;
    let (fast, agents) = (free_port()?, free_port()?);
    let url = format!("http://127.0.0.1:{fast}");
    let mut controller = Some(spawn_controller(&ns, fast, agents)?);
    pool(&client, &ns, "p", SLOTS, 2).await?;
    wait_until("2 agent pods running", Duration::from_secs(60), || {
        let n = kubelet.running().iter().filter(|p| p.ready).count();
        async move { Ok((n == 2).then_some(())) }
    })
    .await?;

    let acked: Arc<Mutex<BTreeMap<usize, Acked>>> = Arc::default();
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..IN_FLIGHT {
        let (acked, next, url, ns, image) = (
            acked.clone(),
            next.clone(),
            url.clone(),
            ns.clone(),
            image.clone(),
        );
        workers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= CREATES {
                    return anyhow::Ok(());
                }
                if let Some(a) = create_until_answered(&url, request(i, &ns, &image)).await? {
                    acked
                        .lock()
                        .map_err(|_| anyhow::anyhow!("poisoned"))?
                        .insert(i, a);
                }
            }
        }));
    }
    // The killer: kill -9 when enough creates were answered, restart at once.
    for point in KILL_AFTER {
        wait_until(
            &format!("{point} answers"),
            Duration::from_secs(300),
            || {
                let n = next.load(Ordering::Relaxed);
                async move { Ok((n >= point).then_some(())) }
            },
        )
        .await?;
        if let Some(c) = controller.take() {
            c.kill9().await?;
        }
        controller = Some(spawn_controller(&ns, fast, agents)?);
    }
    for w in workers {
        w.await??;
    }
    // The last one is killed too; the final controller runs in-process on the same
    // ports (agents reconnect to it) so its registry can be read.
    if let Some(c) = controller.take() {
        c.kill9().await?;
    }
    let final_ctl = ControllerUnderTest::start(client.clone(), &ns, |c| {
        c.listen = ([127, 0, 0, 1], fast).into();
        c.agent_listen = ([127, 0, 0, 1], agents).into();
        c.startup_wait = Duration::from_secs(10);
        c.agent_lost_after = Duration::from_secs(60);
    })
    .await?;

    let acked = acked
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .clone();
    // Slots are contended too (500 creates, 2 x SLOTS places): the rest were refused
    // with ResourceExhausted, never left unanswered.
    assert!(
        acked.len() >= CREATES * 6 / 10,
        "most creates acknowledged: {}",
        acked.len()
    );
    let sandboxes: Api<Sandbox> = Api::namespaced(client.clone(), &ns);
    let runtime = container_runtime(&ContainerdEnv::from_env()).await?;
    let agent_uids: Vec<String> = kubelet.running().into_iter().map(|p| p.uid).collect();

    // The node's janitor, one per agent here (the suite shares containerd): it removes
    // what no Sandbox accounts for once older than its orphan timeout, including
    // containers the agents' own tables lost track of when their create call was cut
    // by the kill (those never reach the controller's orphan scan).
    let mut janitors = Vec::new();
    for uid in &agent_uids {
        janitors.push(Janitor::new(
            KubeCluster::new(client.clone(), Duration::from_secs(5)),
            AgentContainers {
                runtime: container_runtime(&ContainerdEnv::from_env()).await?,
                agent: uid.clone(),
            },
            JanitorConfig {
                node_name: kubelet.node().to_owned(),
                interval: Duration::from_secs(1),
                orphan_timeout: Duration::from_secs(10),
                grace: Duration::ZERO,
            },
        ));
    }

    // Settled: every acknowledged create recorded with its id, and containerd holds
    // exactly the recorded containers (orphans removed), within the janitor's bound.
    let diff = Mutex::new(String::new());
    let settled = wait_until(
        "the store and containerd to agree",
        Duration::from_secs(90),
        || {
            let (sandboxes, runtime, agent_uids, acked, diff, janitors) =
                (&sandboxes, &runtime, &agent_uids, &acked, &diff, &janitors);
            async move {
                for j in janitors {
                    j.scan_once().await?;
                }
                let objects = sandboxes.list(&ListParams::default()).await?.items;
                let by_name: HashMap<String, &Sandbox> = objects
                    .iter()
                    .map(|o| (o.metadata.name.clone().unwrap_or_default(), o))
                    .collect();
                let wrong = broken_acks(acked, &by_name);
                let missing = wrong.len();
                let recorded: BTreeSet<String> = objects
                    .iter()
                    .filter_map(|o| o.status.as_ref())
                    .filter(|s| s.phase == Some(SandboxPhase::Running))
                    .filter_map(|s| s.sandbox_id.clone())
                    .collect();
                let mut containers = BTreeSet::new();
                for uid in agent_uids {
                    for c in runtime.list(Some(uid)).await? {
                        containers.insert(c.id.to_string());
                    }
                }
                if !(missing == 0 && recorded == containers) {
                    // What disagrees, for the failure message.
                    let phase_of = |id: &String| {
                        objects
                            .iter()
                            .find(|o| o.status.as_ref().and_then(|s| s.sandbox_id.as_ref()) == Some(id))
                            .map(|o| format!("{:?} {:?}", o.metadata.name, o.status.as_ref().and_then(|s| s.phase)))
                    };
                    let wrong: Vec<&String> = wrong.iter().take(10).collect();
                    let unrecorded: Vec<String> = containers
                        .difference(&recorded)
                        .take(10)
                        .map(|id| format!("{id} {:?}", phase_of(id)))
                        .collect();
                    let lost: Vec<&String> = recorded.difference(&containers).take(10).collect();
                    if let Ok(mut d) = diff.lock() {
                        *d = format!(
                            "acked but not recorded as acked ({missing}): {wrong:?}; containers without a Running record: {unrecorded:?}; Running records without a container: {lost:?}"
                        );
                    }
                }
                Ok((missing == 0 && recorded == containers).then_some((objects, containers)))
            }
        },
    )
    .await;
    let (objects, containers) = match settled {
        Ok(x) => x,
        Err(e) => {
            final_ctl.stop().await;
            return Err(e.context(diff.lock().map(|d| d.clone()).unwrap_or_default()));
        }
    };
    let names: BTreeSet<&str> = objects
        .iter()
        .filter_map(|o| o.metadata.name.as_deref())
        .collect();
    let fast_lost = acked
        .iter()
        .filter(|(i, _)| !names.contains(format!("c{i}").as_str()))
        .count();
    eprintln!(
        "chaos: {} acknowledged ({} refused for capacity), {fast_lost} FAST acknowledged but lost with a killed controller (their containers removed), {} running",
        acked.len(),
        CREATES - acked.len(),
        containers.len()
    );
    assert!(
        acked
            .values()
            .any(|a| a.mode == fp::ConsistencyMode::Strong)
    );
    assert!(acked.values().any(|a| a.mode == fp::ConsistencyMode::Fast));

    // No slot or port twice on one agent: each agent holds at most its slots, and
    // each port once.
    let mut per_agent: HashMap<String, usize> = HashMap::new();
    let mut held: HashMap<(String, u32), String> = HashMap::new();
    for o in &objects {
        let Some(st) = o
            .status
            .as_ref()
            .filter(|s| s.phase == Some(SandboxPhase::Running))
        else {
            continue;
        };
        *per_agent
            .entry(st.agent_uid.clone().unwrap_or_default())
            .or_default() += 1;
        for p in &o.spec.exposed_ports {
            let key = (st.agent_uid.clone().unwrap_or_default(), *p);
            let name = o.metadata.name.clone().unwrap_or_default();
            if let Some(other) = held.insert(key.clone(), name.clone()) {
                panic!(
                    "port {} held twice on agent {}: {other} and {name}",
                    key.1, key.0
                );
            }
        }
    }
    for (agent, n) in &per_agent {
        assert!(
            *n <= SLOTS as usize,
            "agent {agent} holds {n} > {SLOTS} sandboxes"
        );
    }
    // The registry counts what runs.
    let snapshot = final_ctl.shared.registry.snapshot().await?;
    assert_eq!(
        snapshot.sandboxes,
        containers.len(),
        "registry count == live sandboxes"
    );
    final_ctl.stop().await;

    // Clean up: the sandboxes of this test, killed at once and several at a time
    // (`sleep` as PID 1 ignores SIGTERM: a grace period would cost it per container).
    let ids: Vec<fsb_core::SandboxId> = containers
        .iter()
        .filter_map(|c| fsb_core::SandboxId::parse("id", c).ok())
        .collect();
    futures::stream::iter(ids)
        .for_each_concurrent(16, |id| {
            let runtime = &runtime;
            async move {
                let _ = runtime.remove(&id, Duration::ZERO).await;
            }
        })
        .await;
    Ok(())
}
