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

/// Whether the system containerd answers (then `fsb up` would not start its own, and
/// the private-containerd tests say so and skip).
async fn system_containerd_answers() -> bool {
    let answers = version(Path::new(SYSTEM_SOCKET), ANSWER_TIMEOUT)
        .await
        .is_ok();
    if answers {
        eprintln!("skipped: the system containerd answers, so fsb up would not start its own");
    }
    answers
}

#[tokio::test]
async fn a_private_containerd_is_started_reused_and_stopped() {
    if system_containerd_answers().await {
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

/// Kills, should the test fail half-way, what a fully private local setup leaves:
/// containerds, shims of its socket, sandbox processes.
struct KillAllOnDrop {
    socket: std::path::PathBuf,
    pids: Vec<u32>,
    armed: bool,
}

impl Drop for KillAllOnDrop {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let needle = self.socket.display().to_string();
        let mut pids = self.pids.clone();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
                continue;
            };
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(&needle) {
                pids.push(pid);
            }
        }
        for pid in pids {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
    }
}

/// The agent `fsb up` runs on `data`'s containerd, with the host's network.
fn local_agent_config(
    data: &DataDir,
    containerd: fsb_agent::containerd::ContainerdConfig,
) -> fsb_agent::AgentConfig {
    fsb_agent::AgentConfig {
        agent_id: fsb_core::AgentId::from("local"),
        containerd,
        log_dir: data.logs_dir(),
        capacity: 4,
        network: fsb_agent::NetworkMode::Join(
            format!("/proc/{}/ns/net", std::process::id()).into(),
        ),
        default_runtime: fsb_core::spec::Runtime::Runc,
        stop_grace: Duration::from_secs(5),
        registry: fsb_agent::image::RegistryOptions::default(),
        log_max_bytes: fsb_agent::DEFAULT_LOG_MAX_BYTES,
        log_retention: Duration::ZERO,
        warm: fsb_agent::warm::WarmConfig::default(),
        drop_capabilities: Default::default(),
    }
}

/// The local busybox image loaded into `agent`'s containerd; whether it was loaded now.
async fn load_busybox(agent: &AgentHandle, tmp: &Path) -> bool {
    ensure_local_image(
        agent.images(),
        &tmp.join("work"),
        Path::new(fsb_local::busybox::DEFAULT_BUSYBOX),
    )
    .await
    .unwrap()
    .loaded
}

/// A `sleep 3600` sandbox named `name` created directly on `agent`.
async fn create_sleeper(
    agent: &AgentHandle,
    name: &str,
    user_namespace: bool,
) -> (SandboxId, fsb_agent::CreatedSandbox) {
    let spec = SandboxSpec {
        namespace: "default".into(),
        name: name.into(),
        pool_ref: "local".into(),
        image: LOCAL_IMAGE.into(),
        command: vec!["sleep".into(), "3600".into()],
        user_namespace,
        ..SandboxSpec::default()
    }
    .validate(&SpecLimits::default())
    .unwrap();
    let id = SandboxId::generate();
    let created = agent
        .create(CreateSandbox {
            id: id.clone(),
            namespace: "default".into(),
            name: name.into(),
            claim_uid: String::new(),
            request_id: String::new(),
            spec,
        })
        .await
        .unwrap();
    (id, created)
}

/// `fsb up`'s own layout (the data directory as `fsb up` creates it, its private
/// containerd inside) lets a user-namespaced sandbox start: the sandbox's root is an
/// unprivileged host uid, which must traverse the data directory to reach its rootfs.
/// With the data directory 0700 the mount failed with "permission denied".
#[actix_rt::test]
async fn a_user_namespaced_sandbox_starts_in_fsb_ups_own_layout() {
    use std::os::unix::fs::PermissionsExt;
    if system_containerd_answers().await {
        return;
    }
    let tmp = short_tmp();
    // The parent of the default data directory is /var/lib, mode 0755.
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let data = DataDir::new(tmp.path().join("d"));
    data.create().unwrap();
    let mut guard = KillAllOnDrop {
        socket: private_socket(&data),
        pids: Vec::new(),
        armed: true,
    };
    let containerd = ensure_containerd(&data, None, None).await.unwrap();
    guard.pids.push(containerd.pid().unwrap());
    let agent = AgentHandle::start(local_agent_config(&data, containerd.config().clone()))
        .await
        .unwrap();
    load_busybox(&agent, tmp.path()).await;
    let (id, created) = create_sleeper(&agent, "userns", true).await;
    guard.pids.push(created.pid);
    let status = std::fs::read_to_string(format!("/proc/{}/status", created.pid)).unwrap();
    let uid = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert!(
        uid.split_whitespace()
            .skip(1)
            .all(|u| u == fsb_agent::userns::HOST_BASE.to_string()),
        "the sandbox's root is not the range's first host uid: {uid}"
    );

    agent.delete(id, Some(Duration::ZERO)).await.unwrap();
    assert!(!process_alive(created.pid));
    containerd.stop().await.unwrap();
    guard.armed = false;
}

/// What `fsb up` does on a machine without a system containerd, end to end below the
/// gateway: a private containerd, the busybox image loaded into it, a sandbox; then an
/// `fsb up` restart that keeps sandboxes: containerd stops, the sandbox (under its
/// shim) keeps running, the next containerd and agent adopt it.
#[actix_rt::test]
async fn kept_sandboxes_survive_a_private_containerd_restart() {
    if system_containerd_answers().await {
        return;
    }
    let tmp = short_tmp();
    let data = DataDir::new(tmp.path().join("d"));
    let mut guard = KillAllOnDrop {
        socket: private_socket(&data),
        pids: Vec::new(),
        armed: true,
    };
    let agent_config = |containerd| local_agent_config(&data, containerd);

    let first = ensure_containerd(&data, None, None).await.unwrap();
    let first_pid = first.pid().unwrap();
    guard.pids.push(first_pid);
    let agent = AgentHandle::start(agent_config(first.config().clone()))
        .await
        .unwrap();
    assert!(
        load_busybox(&agent, tmp.path()).await,
        "a new containerd root holds no image"
    );
    let (id, created) = create_sleeper(&agent, "kept", false).await;
    guard.pids.push(created.pid);
    // The sandbox ran with the runtime state under the data directory.
    assert!(
        data.root()
            .join("runtime/runc/fast-sandbox")
            .join(id.as_str())
            .is_dir()
    );

    // `fsb up` stops (keeping sandboxes): containerd goes, the sandbox stays.
    first.stop().await.unwrap();
    assert!(!process_alive(first_pid));
    assert!(
        process_alive(created.pid),
        "the sandbox survives containerd"
    );

    // The next `fsb up`: a new private containerd, a new agent that adopts the sandbox.
    let second = ensure_containerd(&data, None, None).await.unwrap();
    let second_pid = second.pid().unwrap();
    guard.pids.push(second_pid);
    assert_eq!(
        second.source(),
        ContainerdSource::Private {
            pid: second_pid,
            started: true
        }
    );
    let adopted = AgentHandle::start(agent_config(second.config().clone()))
        .await
        .unwrap();
    let record = adopted
        .inventory()
        .await
        .unwrap()
        .into_iter()
        .find(|r| r.id == id)
        .expect("the new agent adopts the kept sandbox");
    assert_eq!(record.phase, SandboxPhase::Running);
    assert!(
        !load_busybox(&adopted, tmp.path()).await,
        "the image survives in the data directory's containerd root"
    );

    adopted.delete(id, Some(Duration::ZERO)).await.unwrap();
    assert!(!process_alive(created.pid));
    second.stop().await.unwrap();
    assert!(!process_alive(second_pid));
    guard.armed = false;
}
