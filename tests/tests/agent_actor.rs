//! The agent (AgentActor + SandboxActors) against the real containerd of
//! `tests/run.sh containerd`: the product create path (image resolve, OCI spec,
//! containerd), exit codes reported as phases, env and working directory reaching the
//! process, admission, 200 concurrent sandboxes leaving nothing behind, and a new
//! agent rebuilding its table from containerd.

#![allow(clippy::unwrap_used)] // helpers below are test code too

use std::time::Duration;

use containerd_client::services::v1::snapshots::{
    StatSnapshotRequest, snapshots_client::SnapshotsClient,
};
use fsb_agent::{AgentConfig, AgentHandle, CreateSandbox, PhaseChange, SandboxPhase};
use fsb_core::{
    SandboxId,
    spec::{Runtime, SandboxSpec, SpecLimits, ValidSpec},
};
use fsb_tests::{ContainerdEnv, wait_until};
use tokio::sync::broadcast;

const DEADLINE: Duration = Duration::from_secs(30);

/// Each test runs its own agent (`agent`), sharing the harness's containerd.
fn cfg(env: &ContainerdEnv, capacity: u32, agent: &str) -> AgentConfig {
    fsb_tests::agent_config(env, agent, capacity)
}

fn spec(env: &ContainerdEnv, name: &str, command: &[&str], args: &[&str]) -> ValidSpec {
    SandboxSpec {
        namespace: "team-a".into(),
        name: name.into(),
        pool_ref: "default".into(),
        image: env.image.clone(),
        command: command.iter().map(|s| s.to_string()).collect(),
        args: args.iter().map(|s| s.to_string()).collect(),
        ..SandboxSpec::default()
    }
    .validate(&SpecLimits::default())
    .unwrap()
}

fn request(spec: ValidSpec) -> CreateSandbox {
    CreateSandbox {
        id: SandboxId::generate(),
        namespace: spec.namespace.to_string(),
        name: spec
            .name
            .as_ref()
            .map(|n| n.to_string())
            .unwrap_or_default(),
        claim_uid: String::new(),
        request_id: String::new(),
        spec,
    }
}

async fn phase_of(
    changes: &mut broadcast::Receiver<PhaseChange>,
    id: &SandboxId,
    want: SandboxPhase,
) -> PhaseChange {
    tokio::time::timeout(DEADLINE, async {
        loop {
            let change = changes.recv().await.unwrap();
            if &change.id == id && change.phase == want {
                return change;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{id} never reached {want:?}"))
}

#[actix_rt::test]
async fn env_workdir_and_exit_codes_reach_the_agent_on_every_runtime() {
    let env = ContainerdEnv::from_env();
    let agent = AgentHandle::start(cfg(&env, 10, "agent-logs-a"))
        .await
        .unwrap();
    for runtime in [Runtime::Runc, Runtime::Crun, Runtime::Gvisor] {
        let mut s = spec(
            &env,
            "greeter",
            &["sh", "-c"],
            &["echo \"$GREETING from $(pwd)\"; exit 3"],
        );
        s.envs = vec![("GREETING".into(), "hello".into())];
        s.working_dir = Some("/work/not/yet/there".into());
        s.runtime = Some(runtime);
        let req = request(s);
        let id = req.id.clone();
        let mut changes = agent.subscribe().await.unwrap();
        let created = agent
            .create(req)
            .await
            .unwrap_or_else(|e| panic!("{runtime:?}: {e}"));
        assert!(created.pid > 0);
        assert_eq!(created.stages.len(), 6);
        let exit = phase_of(&mut changes, &id, SandboxPhase::Failed).await;
        assert_eq!(exit.exit_code, Some(3), "{runtime:?}");
        let stdout = agent.runtime().log_paths(&id).stdout;
        let out = tokio::fs::read_to_string(&stdout).await.unwrap();
        assert_eq!(
            out.trim(),
            "hello from /work/not/yet/there",
            "{runtime:?}: env and created workdir"
        );

        agent.delete(id.clone(), None).await.unwrap();
        assert!(agent.inventory().await.unwrap().iter().all(|r| r.id != id));
        let again = agent.delete(id.clone(), None).await.unwrap_err();
        assert!(again.is_not_found(), "{again}");
    }
}

#[actix_rt::test]
async fn command_and_args_follow_kubernetes_semantics() {
    let env = ContainerdEnv::from_env();
    let agent = AgentHandle::start(cfg(&env, 10, "agent-logs-b"))
        .await
        .unwrap();
    // (command, args, expected stdout); the test image has no ENTRYPOINT and CMD ["sh"].
    let cases: [(&[&str], &[&str], &str); 3] = [
        (&["echo"], &["from", "args"], "from args"),
        (&["sh", "-c", "echo only-command"], &[], "only-command"),
        (&[], &[], ""),
    ];
    for (command, args, want) in cases {
        let req = request(spec(&env, "semantics", command, args));
        let id = req.id.clone();
        let mut changes = agent.subscribe().await.unwrap();
        agent.create(req).await.unwrap();
        // Both empty keeps the image's CMD (`sh`), which exits 0 at once on empty stdin.
        let exit = phase_of(&mut changes, &id, SandboxPhase::Succeeded).await;
        assert_eq!(exit.exit_code, Some(0));
        let out = tokio::fs::read_to_string(agent.runtime().log_paths(&id).stdout)
            .await
            .unwrap();
        assert_eq!(out.trim(), want, "command {command:?} args {args:?}");
        agent.delete(id, None).await.unwrap();
    }
}

#[actix_rt::test]
async fn admission_and_a_new_agent_rebuilds_from_containerd() {
    let env = ContainerdEnv::from_env();
    let first = AgentHandle::start(cfg(&env, 2, "agent-logs-c"))
        .await
        .unwrap();
    let mut ids = Vec::new();
    for name in ["keep-1", "keep-2"] {
        let mut s = spec(&env, name, &["sh", "-c", "while :; do sleep 1; done"], &[]);
        s.ports = vec![fsb_core::HostPort::parse("p", 18_080 + ids.len() as u32).unwrap()];
        let req = request(s);
        ids.push(req.id.clone());
        first.create(req).await.unwrap();
    }
    let full = first
        .create(request(spec(&env, "third", &["true"], &[])))
        .await
        .unwrap_err();
    assert!(full.to_string().contains("full"), "{full}");

    // A second agent on the same containerd knows only what containerd holds.
    let second = AgentHandle::start(cfg(&env, 2, "agent-logs-c"))
        .await
        .unwrap();
    let inventory = second.inventory().await.unwrap();
    for id in &ids {
        let rec = inventory
            .iter()
            .find(|r| &r.id == id)
            .expect("rebuilt from containerd");
        assert_eq!(rec.phase, SandboxPhase::Running);
        assert_eq!(rec.namespace, "team-a");
        assert!(rec.name.starts_with("keep-"));
        assert_eq!(rec.ports.len(), 1, "ports survive in labels");
    }
    // Its admission counts them too.
    assert!(
        second
            .create(request(spec(&env, "third", &["true"], &[])))
            .await
            .is_err()
    );
    for id in ids {
        second.delete(id, Some(Duration::ZERO)).await.unwrap();
    }
}

#[actix_rt::test]
async fn two_hundred_concurrent_sandboxes_leave_nothing_behind() {
    let env = ContainerdEnv::from_env();
    let agent = AgentHandle::start(cfg(&env, 200, "agent-logs-d"))
        .await
        .unwrap();
    let reqs: Vec<CreateSandbox> = (0..200)
        .map(|i| {
            request(spec(
                &env,
                &format!("many-{i}"),
                &["sh", "-c", "sleep 600"],
                &[],
            ))
        })
        .collect();
    let ids: Vec<SandboxId> = reqs.iter().map(|r| r.id.clone()).collect();
    let created = futures::future::join_all(reqs.into_iter().map(|r| agent.create(r))).await;
    let failures: Vec<String> = created
        .iter()
        .filter_map(|r| r.as_ref().err().map(|e| e.to_string()))
        .collect();
    assert!(
        failures.is_empty(),
        "{} creates failed, first: {:?}",
        failures.len(),
        failures.first()
    );
    let running = agent.inventory().await.unwrap();
    assert_eq!(
        running
            .iter()
            .filter(|r| r.phase == SandboxPhase::Running)
            .count(),
        200
    );

    let deleted = futures::future::join_all(
        ids.iter()
            .map(|id| agent.delete(id.clone(), Some(Duration::ZERO))),
    )
    .await;
    assert!(
        deleted.iter().all(Result::is_ok),
        "{:?}",
        deleted.iter().find(|r| r.is_err())
    );
    assert!(agent.inventory().await.unwrap().is_empty());

    // Nothing left in containerd, no shim, no log directory.
    let leftover = agent.runtime().list(None).await.unwrap();
    assert!(
        leftover.iter().all(|s| !ids.contains(&s.id)),
        "containers left: {}",
        leftover.len()
    );
    let shims = wait_until("shims of deleted sandboxes to exit", DEADLINE, || async {
        let out = tokio::process::Command::new("pgrep")
            .args(["-f", "containerd-shim"])
            .output()
            .await?;
        let cmdlines = String::from_utf8_lossy(&out.stdout).to_string();
        Ok(ids
            .iter()
            .all(|id| !cmdlines.contains(id.as_str()))
            .then_some(()))
    })
    .await;
    assert!(shims.is_ok(), "a shim outlived its sandbox");
    let mut snapshots = SnapshotsClient::new(agent.runtime().containerd().channel());
    for id in &ids {
        assert!(!agent.runtime().log_paths(id).dir.exists());
        let stat = StatSnapshotRequest {
            snapshotter: "overlayfs".into(),
            key: id.to_string(),
        };
        let found = snapshots
            .stat(agent.runtime().containerd().request(stat))
            .await;
        assert_eq!(
            found.unwrap_err().code(),
            tonic::Code::NotFound,
            "snapshot of {id} left behind"
        );
    }
}

#[actix_rt::test]
async fn log_files_are_kept_under_their_bound() {
    let env = ContainerdEnv::from_env();
    let mut cfg = cfg(&env, 2, "agent-logs-e");
    cfg.log_max_bytes = 64 * 1024;
    let agent = AgentHandle::start(cfg).await.unwrap();
    // ~1 MiB of output at once, then the process stays.
    let req = request(spec(
        &env,
        "chatty",
        &[
            "sh",
            "-c",
            "yes 0123456789abcdef | head -c 1048576; sleep 600",
        ],
        &[],
    ));
    let id = req.id.clone();
    agent.create(req).await.unwrap();
    let stdout = agent.runtime().log_paths(&id).stdout;
    let size = || async {
        tokio::fs::metadata(&stdout)
            .await
            .map(|m| m.len())
            .unwrap_or(0)
    };
    wait_until("the output to be written", DEADLINE, || async {
        Ok((size().await >= 1 << 20).then_some(()))
    })
    .await
    .unwrap();
    let bounded = wait_until("the log to be cut to its bound", DEADLINE, || async {
        let s = size().await;
        Ok((s <= 64 * 1024 + 4096).then_some(s))
    })
    .await
    .unwrap();
    let tail = tokio::fs::read_to_string(&stdout).await.unwrap();
    assert!(
        tail.ends_with("0123456789abcdef\n") || tail.ends_with("0123456789abcdef"),
        "newest bytes kept"
    );
    assert!(
        bounded > 0,
        "the newest half is kept, not everything dropped"
    );
    agent.delete(id, Some(Duration::ZERO)).await.unwrap();
}

#[actix_rt::test]
async fn named_image_users_are_looked_up_in_the_image() {
    let env = ContainerdEnv::from_env();
    let agent = AgentHandle::start(cfg(&env, 2, "agent-logs-f"))
        .await
        .unwrap();
    let image =
        std::env::var("FSB_TEST_IMAGE_NOBODY").expect("set by tests/scripts/with-containerd.sh");
    let mut s = spec(&env, "as-nobody", &["sh", "-c", "id -u; id -g"], &[]);
    s.image = fsb_core::ImageRef::parse("image", &image).unwrap();
    let req = request(s);
    let id = req.id.clone();
    let mut changes = agent.subscribe().await.unwrap();
    agent.create(req).await.unwrap();
    phase_of(&mut changes, &id, SandboxPhase::Succeeded).await;
    let out = tokio::fs::read_to_string(agent.runtime().log_paths(&id).stdout)
        .await
        .unwrap();
    assert_eq!(
        out, "65534\n65534\n",
        "the image's `User: nobody` resolved through its /etc/passwd"
    );
    agent.delete(id, None).await.unwrap();
}

/// The agent's table and containerd agree after racing calls on one id: what the
/// table lists is exactly what containerd holds for this agent.
async fn assert_table_is_containerd(agent: &AgentHandle) {
    let mut table: Vec<SandboxId> = agent
        .inventory()
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.id)
        .collect();
    let mut held = agent.containers().await.unwrap();
    table.sort();
    held.sort();
    assert_eq!(table, held, "the agent's table and containerd disagree");
}

#[actix_rt::test]
async fn a_create_queued_behind_a_delete_of_its_id_is_refused_and_makes_nothing() {
    let env = ContainerdEnv::from_env();
    let agent = AgentHandle::start(cfg(&env, 4, "agent-race-a"))
        .await
        .unwrap();
    let s = spec(&env, "raced", &["sleep", "600"], &[]);
    let req = request(s.clone());
    let id = req.id.clone();
    agent.create(req).await.unwrap();

    // Delete first, then a retried create of the same id, both queued before either
    // runs (a controller's retry crossing a cleanup). Before the fix the create ran
    // after the delete's stop: a new container the table no longer listed.
    let again = CreateSandbox {
        id: id.clone(),
        ..request(s)
    };
    let (deleted, created) = tokio::join!(
        agent.delete(id.clone(), Some(Duration::ZERO)),
        agent.create(again)
    );
    deleted.unwrap();
    let err = created.unwrap_err();
    assert!(err.to_string().contains("being deleted"), "{err}");
    assert!(!agent.containers().await.unwrap().contains(&id));
    assert_table_is_containerd(&agent).await;
}

#[actix_rt::test]
async fn a_failed_create_keeps_the_slot_of_a_retry_queued_behind_it() {
    let env = ContainerdEnv::from_env();
    let agent = AgentHandle::start(cfg(&env, 4, "agent-race-b"))
        .await
        .unwrap();
    // The first attempt fails for good (no such executable); the retry of the same id,
    // queued behind it, succeeds. Before the fix the failure freed the record while
    // the retry went on to make a container: a container no table listed.
    let bad = request(spec(&env, "retried", &["/no/such/binary"], &[]));
    let id = bad.id.clone();
    let good = CreateSandbox {
        id: id.clone(),
        ..request(spec(&env, "retried", &["sleep", "600"], &[]))
    };
    let (first, second) = tokio::join!(agent.create(bad), agent.create(good));
    assert!(first.is_err(), "a missing executable must fail the create");
    second.unwrap();
    let rec = agent
        .inventory()
        .await
        .unwrap()
        .into_iter()
        .find(|r| r.id == id)
        .expect("the retry's sandbox is in the table");
    assert_eq!(rec.phase, SandboxPhase::Running);
    assert_table_is_containerd(&agent).await;
    agent.delete(id, Some(Duration::ZERO)).await.unwrap();
    assert_table_is_containerd(&agent).await;
}
