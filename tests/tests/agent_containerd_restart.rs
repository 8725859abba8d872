//! containerd restarts under a running agent: the agent's connection and exit watch
//! come back by themselves, a sandbox that kept running is still known, and its exit
//! after the restart is still reported. (One test in its own binary: it restarts the
//! harness's containerd, which no other test may see.)

#![allow(clippy::unwrap_used)] // helpers below are test code too

use std::time::Duration;

use fsb_agent::{
    AgentHandle, CreateSandbox, SandboxPhase,
    exec::{self, ExecOutput, ExecRequest},
};
use fsb_core::{
    SandboxId,
    spec::{SandboxSpec, SpecLimits},
};
use fsb_tests::ContainerdEnv;
use futures::StreamExt;

const DEADLINE: Duration = Duration::from_secs(30);

#[actix_rt::test]
async fn the_agent_survives_a_containerd_restart() {
    let env = ContainerdEnv::from_env();
    let agent = AgentHandle::start({
        let mut config = fsb_tests::agent_config(&env, "restart-agent", 4);
        config.stop_grace = Duration::from_secs(1);
        config
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
        request_id: String::new(),
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
        request_id: String::new(),
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
