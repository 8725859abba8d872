//! fsb-agent's container lifecycle against the real containerd of `tests/run.sh
//! containerd`, for runc, crun and gVisor: create + start, logs written by the shim,
//! exit detection from the event stream, SIGTERM before SIGKILL, idempotent removal,
//! nothing left after a failed create, and state rebuilt from containerd alone.

#![allow(clippy::unwrap_used)] // helpers below are test code too

use std::time::Duration;

use containerd_client::services::v1::snapshots::{
    StatSnapshotRequest, snapshots_client::SnapshotsClient,
};
use fsb_agent::runtime::{ContainerdRuntime, TaskState};
use fsb_core::spec::Runtime;
use fsb_tests::{ContainerdEnv, minimal_oci_spec, wait_until};
use futures::StreamExt;

const DEADLINE: Duration = Duration::from_secs(20);

async fn snapshot_exists(rt: &ContainerdRuntime, key: &str) -> bool {
    let req = rt.containerd().request(StatSnapshotRequest {
        snapshotter: "overlayfs".into(),
        key: key.into(),
    });
    match SnapshotsClient::new(rt.containerd().channel())
        .stat(req)
        .await
    {
        Ok(_) => true,
        Err(s) if s.code() == tonic::Code::NotFound => false,
        Err(s) => panic!("stat snapshot {key}: {s}"),
    }
}

async fn read(path: &std::path::Path) -> String {
    tokio::fs::read_to_string(path).await.unwrap_or_default()
}

#[tokio::test]
async fn lifecycle_on_every_runtime() {
    let env = ContainerdEnv::from_env();
    let rt = fsb_tests::container_runtime(&env).await.unwrap();
    for runtime in [Runtime::Runc, Runtime::Crun, Runtime::Gvisor] {
        let mut exits = Box::pin(rt.exits().await.unwrap());
        let script = "echo out; echo err >&2; trap 'echo got-term; exit 7' TERM; while :; do sleep 0.05; done";
        let plan = fsb_tests::shell_plan(&env, &rt, runtime, script)
            .await
            .unwrap();
        let id = plan.id.clone();
        let started = rt
            .create(&plan)
            .await
            .unwrap_or_else(|e| panic!("{runtime:?}: {e}"));
        assert!(started.pid > 0);
        assert_eq!(
            rt.task_state(&id).await.unwrap(),
            TaskState::Running,
            "{runtime:?}"
        );

        // The shim writes the logs: both streams arrive in their own files.
        let logs = rt.log_paths(&id);
        wait_until("stdout and stderr in the log files", DEADLINE, || async {
            Ok((read(&logs.stdout).await.contains("out")
                && read(&logs.stderr).await.contains("err"))
            .then_some(()))
        })
        .await
        .unwrap();
        let listed = rt.list(None).await.unwrap();
        assert!(
            listed
                .iter()
                .any(|s| s.id == id && s.state == TaskState::Running && s.pid == started.pid)
        );

        // SIGTERM first: the trap's exit code 7 (not 137 from SIGKILL) is what exits.
        assert!(rt.remove(&id, Duration::from_secs(5)).await.unwrap());
        let exit = tokio::time::timeout(DEADLINE, async {
            loop {
                match exits.next().await {
                    Some(e) if e.id == id => return e,
                    Some(_) => continue,
                    None => panic!("event stream ended"),
                }
            }
        })
        .await
        .expect("exit event");
        assert_eq!(
            (&exit.id, exit.exit_code),
            (&id, 7),
            "{runtime:?}: SIGTERM must come before SIGKILL"
        );
        assert_ne!(exit.pid, 0, "containerd names the process that exited");

        // Gone means gone, and removing again is a no-op.
        assert!(!rt.list(None).await.unwrap().iter().any(|s| s.id == id));
        assert!(!snapshot_exists(&rt, id.as_str()).await);
        assert!(!logs.dir.exists(), "log files are removed with the sandbox");
        assert!(!rt.remove(&id, Duration::from_secs(1)).await.unwrap());
    }
}

#[tokio::test]
async fn exits_are_detected_with_their_code() {
    let env = ContainerdEnv::from_env();
    let rt = fsb_tests::container_runtime(&env).await.unwrap();
    let mut exits = Box::pin(rt.exits().await.unwrap());
    let plan = fsb_tests::shell_plan(&env, &rt, Runtime::Runc, "echo bye; exit 3")
        .await
        .unwrap();
    let id = plan.id.clone();
    rt.create(&plan).await.unwrap();
    let exit = tokio::time::timeout(DEADLINE, async {
        loop {
            let e = exits.next().await.expect("event stream open");
            if e.id == id {
                return e;
            }
        }
    })
    .await
    .expect("exit event");
    assert_eq!(exit.exit_code, 3);
    assert_eq!(
        rt.task_state(&id).await.unwrap(),
        TaskState::Stopped { exit_code: 3 }
    );
    assert!(rt.remove(&id, Duration::from_secs(1)).await.unwrap());
}

#[tokio::test]
async fn a_failed_create_leaves_nothing() {
    let env = ContainerdEnv::from_env();
    let rt = fsb_tests::container_runtime(&env).await.unwrap();
    let mut plan = fsb_tests::shell_plan(&env, &rt, Runtime::Runc, "true")
        .await
        .unwrap();
    let spec = minimal_oci_spec(
        plan.id.as_str(),
        &["/no/such/binary"],
        &[],
        "/",
        &env.namespace,
    );
    plan.spec_json = serde_json::to_vec(&spec).unwrap();
    let err = rt
        .create(&plan)
        .await
        .expect_err("a missing executable cannot start");
    assert!(err.to_string().contains("containerd"), "{err}");
    assert!(!rt.list(None).await.unwrap().iter().any(|s| s.id == plan.id));
    assert!(!snapshot_exists(&rt, plan.id.as_str()).await);
    assert!(!rt.log_paths(&plan.id).dir.exists());

    let mut bad_parent = fsb_tests::shell_plan(&env, &rt, Runtime::Runc, "true")
        .await
        .unwrap();
    bad_parent.parent_snapshot = format!("sha256:{}", "0".repeat(64));
    assert!(rt.create(&bad_parent).await.is_err());
    assert!(
        !rt.list(None)
            .await
            .unwrap()
            .iter()
            .any(|s| s.id == bad_parent.id)
    );
    assert!(!snapshot_exists(&rt, bad_parent.id.as_str()).await);
}

#[tokio::test]
async fn a_new_runtime_finds_the_running_sandboxes() {
    let env = ContainerdEnv::from_env();
    let first = fsb_tests::container_runtime(&env).await.unwrap();
    let mut ids = Vec::new();
    for _ in 0..3 {
        let plan = fsb_tests::shell_plan(&env, &first, Runtime::Runc, "while :; do sleep 1; done")
            .await
            .unwrap();
        first.create(&plan).await.unwrap();
        ids.push(plan.id);
    }
    drop(first);
    // A fresh connection knows nothing but what containerd holds (labels, tasks).
    let second = fsb_tests::container_runtime(&env).await.unwrap();
    let found = second.list(None).await.unwrap();
    for id in &ids {
        let s = found
            .iter()
            .find(|s| &s.id == id)
            .expect("listed after restart");
        assert_eq!(s.state, TaskState::Running);
        assert_eq!(
            s.labels
                .get("fast-sandbox.io/namespace")
                .map(String::as_str),
            Some("default")
        );
        assert_eq!(
            s.labels.get("fast-sandbox.io/managed").map(String::as_str),
            Some("true")
        );
    }
    for id in &ids {
        assert!(second.remove(id, Duration::ZERO).await.unwrap());
    }
}

/// A listing is not bounded by one gRPC message: a container carries its OCI spec
/// (~8 KB), so 600 warm instances outgrew containerd's 4 MiB answer and the orphan
/// scan, and an agent restart's adoption, failed ("decoded message length too
/// large"). Three running sandboxes with 1.5 MB specs stand in for them; each comes
/// back with its task's state and pid.
#[tokio::test]
async fn a_listing_larger_than_one_grpc_message_is_read_whole() {
    let env = ContainerdEnv::from_env();
    let rt = fsb_tests::container_runtime(&env).await.unwrap();
    let mut started = Vec::new();
    for _ in 0..3 {
        let mut plan = fsb_tests::shell_plan(&env, &rt, Runtime::Runc, "while :; do sleep 1; done")
            .await
            .unwrap();
        let mut spec: serde_json::Value = serde_json::from_slice(&plan.spec_json).unwrap();
        spec["annotations"] =
            serde_json::json!({ "fast-sandbox.io/padding": "x".repeat(1_500_000) });
        plan.spec_json = serde_json::to_vec(&spec).unwrap();
        let s = rt.create(&plan).await.unwrap();
        started.push((plan.id, s.pid));
    }
    let found = rt.list(None).await.unwrap();
    let labelled = rt.list_labels(None).await.unwrap();
    for (id, pid) in &started {
        let s = found.iter().find(|s| &s.id == id).expect("listed");
        assert_eq!((s.state, s.pid), (TaskState::Running, *pid));
        assert!(labelled.iter().any(|c| &c.id == id), "listed without tasks");
    }
    for (id, _) in &started {
        assert!(rt.remove(id, Duration::ZERO).await.unwrap());
    }
}

#[tokio::test]
async fn a_repeated_create_never_destroys_the_first() {
    let env = ContainerdEnv::from_env();
    let rt = fsb_tests::container_runtime(&env).await.unwrap();
    let plan = fsb_tests::shell_plan(&env, &rt, Runtime::Runc, "while :; do sleep 1; done")
        .await
        .unwrap();
    rt.create(&plan).await.unwrap();
    let again = rt.create(&plan).await.expect_err("same id twice");
    assert!(again.is_already_exists(), "{again}");
    assert_eq!(
        rt.task_state(&plan.id).await.unwrap(),
        TaskState::Running,
        "the first one is untouched"
    );
    assert!(rt.remove(&plan.id, Duration::ZERO).await.unwrap());
}

#[tokio::test]
async fn logs_are_retained_when_asked_and_pruned_after() {
    let env = ContainerdEnv::from_env();
    let kept = fsb_tests::container_runtime(&env)
        .await
        .unwrap()
        .with_log_retention(Duration::from_secs(3600));
    let plan = fsb_tests::shell_plan(&env, &kept, Runtime::Runc, "echo keep-me; sleep 600")
        .await
        .unwrap();
    kept.create(&plan).await.unwrap();
    let logs = kept.log_paths(&plan.id);
    wait_until("output", DEADLINE, || async {
        Ok(read(&logs.stdout).await.contains("keep-me").then_some(()))
    })
    .await
    .unwrap();
    assert!(kept.remove(&plan.id, Duration::ZERO).await.unwrap());
    assert!(!logs.dir.exists());
    let retained = kept.retained_log_dir(&plan.id);
    assert!(
        read(&retained.join("stdout.log")).await.contains("keep-me"),
        "kept after removal"
    );
    assert_eq!(kept.prune_retained().await.unwrap(), 0, "not yet expired");
    // The same directory seen by a runtime with a zero retention is past it.
    let strict = fsb_tests::container_runtime(&env)
        .await
        .unwrap()
        .with_log_retention(Duration::from_nanos(1));
    assert!(strict.prune_retained().await.unwrap() >= 1);
    assert!(!retained.exists());
}
