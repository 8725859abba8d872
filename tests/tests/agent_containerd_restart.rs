//! containerd restarts under a running agent: the agent's connection and exit watch
//! come back by themselves, a sandbox that kept running is still known, and its exit
//! after the restart is still reported. (One test in its own binary: it restarts the
//! harness's containerd, which no other test may see.)

#![allow(clippy::unwrap_used)] // helpers below are test code too

use std::{path::PathBuf, time::Duration};

use fsb_agent::{
    AgentConfig, AgentHandle, CreateSandbox, SandboxPhase,
    containerd::{ContainerdConfig, DEFAULT_CALL_TIMEOUT},
    exec::{self, ExecOutput, ExecRequest},
    image::RegistryOptions,
    oci::NetworkMode,
};
use fsb_core::{
    AgentId, SandboxId,
    spec::{Runtime, SandboxSpec, SpecLimits},
};
use fsb_tests::ContainerdEnv;
use futures::StreamExt;

const DEADLINE: Duration = Duration::from_secs(30);

#[actix_rt::test]
async fn the_agent_survives_a_containerd_restart() {
    let env = ContainerdEnv::from_env();
    let agent = AgentHandle::start(AgentConfig {
        agent_id: AgentId::from("restart-agent"),
        containerd: ContainerdConfig {
            socket: env.socket.clone(),
            namespace: env.namespace.clone(),
            call_timeout: DEFAULT_CALL_TIMEOUT,
            runtime_root: env.runtime_root.clone(),
            runsc_binary: env.runsc.clone(),
        },
        log_dir: env.run_dir.join("agent-logs/restart-agent"),
        capacity: 4,
        network: NetworkMode::Join(PathBuf::from(format!(
            "/proc/{}/ns/net",
            std::process::id()
        ))),
        default_runtime: Runtime::Runc,
        stop_grace: Duration::from_secs(1),
        registry: RegistryOptions::default(),
        log_max_bytes: fsb_agent::DEFAULT_LOG_MAX_BYTES,
        log_retention: std::time::Duration::ZERO,
    })
    .await
    .unwrap();
    let spec = |name: &str, script: &str| {
        SandboxSpec {
            namespace: "default".into(),
            name: name.into(),
            pool_ref: "default".into(),
            image: env.image.clone(),
            command: vec!["sh".into(), "-c".into(), script.into()],
            ..SandboxSpec::default()
        }
        .validate(&SpecLimits::default())
        .unwrap()
    };
    let waiter = CreateSandbox {
        id: SandboxId::generate(),
        namespace: "default".into(),
        name: "waiter".into(),
        claim_uid: String::new(),
        spec: spec(
            "waiter",
            "while [ ! -f /tmp/stop ]; do sleep 0.1; done; exit 9",
        ),
    };
    let id = waiter.id.clone();
    agent.create(waiter).await.unwrap();
    let mut changes = agent.subscribe().await.unwrap();

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/containerd.sh");
    let status = tokio::process::Command::new("bash")
        .arg(script)
        .arg("restart")
        .status()
        .await
        .unwrap();
    assert!(status.success(), "containerd restart failed");

    // New work goes through the re-established connection.
    let fresh = CreateSandbox {
        id: SandboxId::generate(),
        namespace: "default".into(),
        name: "after-restart".into(),
        claim_uid: String::new(),
        spec: spec("after-restart", "sleep 600"),
    };
    let fresh_id = fresh.id.clone();
    let created = tokio::time::timeout(DEADLINE, async {
        loop {
            match agent.create(fresh.clone()).await {
                Ok(c) => return c,
                Err(e) if e.is_already_exists() => panic!("{e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    })
    .await
    .expect("creates work again after containerd restarted");
    assert!(created.pid > 0);

    // The sandbox that lived through the restart still reports its exit.
    let mut session = exec::exec(
        agent.runtime(),
        &id,
        ExecRequest {
            args: vec!["touch".into(), "/tmp/stop".into()],
            ..ExecRequest::default()
        },
    )
    .await
    .unwrap();
    while let Some(out) = session.output.next().await {
        if let Ok(ExecOutput::Exit(code)) = out {
            assert_eq!(code, 0);
        }
    }
    let exit = tokio::time::timeout(DEADLINE, async {
        loop {
            let c = changes.recv().await.unwrap();
            if c.id == id && c.phase == SandboxPhase::Failed {
                return c;
            }
        }
    })
    .await
    .expect("exit reported after the restart");
    assert_eq!(exit.exit_code, Some(9));

    agent.delete(id, Some(Duration::ZERO)).await.unwrap();
    agent.delete(fresh_id, Some(Duration::ZERO)).await.unwrap();
}
