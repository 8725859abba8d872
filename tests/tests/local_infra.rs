//! The infrastructure of local mode (`fsb up`, crate fsb-local) against real
//! containerd: `ensure_containerd` with the harness's socket, the offline busybox image
//! built in Rust, loaded and run by a real agent (`echo hello`), and a private
//! containerd started, reused and stopped by `ensure_containerd` itself.
//!
//! Needs the harness: `tests/run.sh containerd --test local_infra`.

#![allow(clippy::unwrap_used)] // helpers below are test code too

use std::{collections::HashSet, path::Path, time::Duration};

use fsb_agent::{AgentHandle, CreateSandbox, SandboxPhase};
use fsb_core::{
    SandboxId,
    spec::{SandboxSpec, SpecLimits},
};
use fsb_local::{
    DataDir,
    busybox::{LOCAL_IMAGE, ensure_local_image, local_image_ref},
    containerd::{
        ANSWER_TIMEOUT, ContainerdSource, SYSTEM_SOCKET, ensure_containerd, private_socket, version,
    },
};
use fsb_tests::ContainerdEnv;

const DEADLINE: Duration = Duration::from_secs(30);

/// A temporary data directory with a short path (unix socket paths are <= 107 bytes).
fn short_tmp() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("fsb-li-")
        .tempdir_in("/tmp")
        .unwrap()
}

#[actix_rt::test]
async fn busybox_image_is_built_loaded_and_says_hello_on_the_given_containerd() {
    let env = ContainerdEnv::from_env();
    let tmp = short_tmp();
    let data = DataDir::new(tmp.path().join("data"));

    let local = ensure_containerd(&data, Some(&env.socket), None)
        .await
        .unwrap();
    assert_eq!(local.source(), ContainerdSource::Given);
    assert!(!local.is_private());
    assert!(!local.version().is_empty());
    let config = local.config().clone();
    assert_eq!(config.socket, env.socket);
    assert_eq!(config.namespace, "fast-sandbox");
    assert_eq!(config.runtime_root, data.root().join("runtime"));
    assert!(config.runsc_binary.starts_with(data.root()));

    let mut agent_config = fsb_tests::agent_config(&env, "local-infra", 4);
    agent_config.containerd = config;
    let agent = AgentHandle::start(agent_config).await.unwrap();

    // From nothing: built and loaded. Then again: found with the same digest.
    let reference = local_image_ref().unwrap();
    match agent.images().remove(&reference, &HashSet::new()).await {
        Ok(()) => {}
        Err(e) if e.is_not_found() => {}
        Err(e) => panic!("removing {LOCAL_IMAGE}: {e}"),
    }
    let work = tmp.path().join("work");
    let busybox = Path::new(fsb_local::busybox::DEFAULT_BUSYBOX);
    let first = ensure_local_image(agent.images(), &work, busybox)
        .await
        .unwrap();
    assert!(first.loaded);
    assert_eq!(first.name, LOCAL_IMAGE);
    let again = ensure_local_image(agent.images(), &work, busybox)
        .await
        .unwrap();
    assert!(!again.loaded, "same digest: not loaded twice");
    assert_eq!(again.digest, first.digest);
    let built = fsb_local::busybox::build_from(busybox).unwrap();
    assert_eq!(first.digest, built.manifest_digest);

    // A sandbox from it.
    let spec = SandboxSpec {
        namespace: "default".into(),
        name: "hello".into(),
        pool_ref: "local".into(),
        image: LOCAL_IMAGE.into(),
        command: vec!["echo".into(), "hello".into()],
        ..SandboxSpec::default()
    }
    .validate(&SpecLimits::default())
    .unwrap();
    let id = SandboxId::generate();
    let mut changes = agent.subscribe().await.unwrap();
    agent
        .create(CreateSandbox {
            id: id.clone(),
            namespace: "default".into(),
            name: "hello".into(),
            claim_uid: String::new(),
            request_id: String::new(),
            spec,
        })
        .await
        .unwrap();
    tokio::time::timeout(DEADLINE, async {
        loop {
            let change = changes.recv().await.unwrap();
            if change.id == id && change.phase == SandboxPhase::Succeeded {
                assert_eq!(change.exit_code, Some(0));
                return;
            }
            assert!(
                !(change.id == id && change.phase == SandboxPhase::Failed),
                "{change:?}"
            );
        }
    })
    .await
    .expect("echo hello exits");
    let out = tokio::fs::read_to_string(agent.runtime().log_paths(&id).stdout)
        .await
        .unwrap();
    assert_eq!(out, "hello\n");
    agent.delete(id, None).await.unwrap();

    // The given containerd is never stopped.
    local.stop().await.unwrap();
    assert!(version(&env.socket, ANSWER_TIMEOUT).await.is_ok());
}

/// Kills the private containerd should the test fail half-way.
struct KillOnDrop(Option<u32>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(pid) = self.0.take() {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
    }
}

fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

#[tokio::test]
async fn a_private_containerd_is_started_reused_and_stopped() {
    if version(Path::new(SYSTEM_SOCKET), ANSWER_TIMEOUT)
        .await
        .is_ok()
    {
        eprintln!("skipped: the system containerd answers, so fsb up would not start its own");
        return;
    }
    let tmp = short_tmp();
    let data = DataDir::new(tmp.path());

    let first = ensure_containerd(&data, None, None).await.unwrap();
    let pid = first.pid().unwrap();
    let mut guard = KillOnDrop(Some(pid));
    assert_eq!(
        first.source(),
        ContainerdSource::Private { pid, started: true }
    );
    assert_eq!(first.socket(), private_socket(&data));
    assert!(first.socket().starts_with(data.containerd_dir()));
    assert_eq!(first.config().runtime_root, data.root().join("runtime"));
    assert!(version(first.socket(), ANSWER_TIMEOUT).await.is_ok());
    let pid_file = data.containerd_dir().join("containerd.pid");
    assert_eq!(
        std::fs::read_to_string(&pid_file).unwrap().trim(),
        pid.to_string()
    );
    assert!(data.containerd_dir().join("config.toml").is_file());

    // A second `fsb up` on this data directory adopts it.
    let second = ensure_containerd(&data, None, None).await.unwrap();
    assert_eq!(
        second.source(),
        ContainerdSource::Private {
            pid,
            started: false
        }
    );
    drop(second);

    // stop() returns once the process is gone (and reaped: we are its parent).
    first.stop().await.unwrap();
    assert!(!process_alive(pid), "containerd {pid} still runs");
    guard.0 = None;
    assert!(!pid_file.exists());
    assert!(
        version(&private_socket(&data), ANSWER_TIMEOUT)
            .await
            .is_err()
    );
}
