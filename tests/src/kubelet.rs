//! A kubelet and scheduler for agent pods, for the test API server (which runs neither).
//!
//! [`Kubelet`] watches the pods labelled `app=sandbox-agent` in one namespace and, for
//! each: binds it to [`Kubelet::node`] (pods/binding), resolves its first container's
//! environment (literal values and the downward API: metadata.name/uid/namespace,
//! spec.nodeName, status.podIP/hostIP = 127.0.0.1), gives it a network of its own in
//! the only way a test can (`FSB_LISTEN=127.0.0.1:<free port>`,
//! `FSB_ADVERTISE_HOST=127.0.0.1`), points it at the harness's containerd
//! ([`ContainerdEnv`]), projects its Secret volumes (the Secret's keys as files in a
//! per-pod directory; environment values naming the mount path are pointed there, so
//! `FSB_TLS_DIR` finds the pool's certificate), and runs the real agent binary
//! (`$FSB_AGENT_BIN`). The pod's
//! status follows: Running with its IP once started, Ready once the agent's port
//! accepts connections, Failed when the process exits. A pod marked for deletion gets
//! SIGTERM, SIGKILL after its grace period, and is then removed (grace 0, uid
//! precondition), as a kubelet does.
//!
//! Test controls: [`Kubelet::kill`] (SIGKILL, pod Failed and not restarted, like a
//! crashed pod with `restartPolicy: Never`) and [`Kubelet::running`]. Dropping the
//! fixture kills every agent it started.
//!
//! Robustness: a pod watch (restarted with backoff by kube-runtime) wakes the sync loop,
//! which also runs every 250 ms, so a lost event only costs latency; every pass lists
//! the pods afresh and converges (no step depends on having seen an earlier event).

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Container, Node, Pod};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Resource, ResourceExt};
use serde_json::json;
use tokio::process::{Child, Command};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::containerd::ContainerdEnv;

/// Node every pod is bound to unless [`KubeletConfig::node`] says otherwise.
pub const DEFAULT_NODE: &str = "fsb-test-node";
/// The "pod network": every agent listens on its own port of this address.
pub const POD_IP: &str = "127.0.0.1";
/// Label selector of the pods this fixture runs.
const SELECTOR: &str = "app=sandbox-agent";
/// Longest grace period honoured (tests should not wait 30 s for a stubborn agent).
const MAX_GRACE: Duration = Duration::from_secs(10);
const RESYNC: Duration = Duration::from_millis(250);

/// What the fixture needs to run agents.
#[derive(Debug, Clone)]
pub struct KubeletConfig {
    /// Namespace whose agent pods it runs (other namespaces belong to other fixtures).
    pub namespace: String,
    /// Node name pods are bound to.
    pub node: String,
    /// The agent binary.
    pub agent_bin: PathBuf,
    /// Directory of per-pod state (`<dir>/<pod uid>/agent.log`, `logs/`).
    pub state_dir: PathBuf,
    /// The harness's containerd.
    pub containerd: ContainerdEnv,
}

impl KubeletConfig {
    /// From the harness environment: `FSB_AGENT_BIN`, [`ContainerdEnv::try_from_env`],
    /// state under `$FSB_TEST_RUN_DIR/kubelet/<namespace>`.
    pub fn from_env(namespace: &str) -> Result<Self> {
        let agent_bin = std::env::var("FSB_AGENT_BIN")
            .context("FSB_AGENT_BIN is set by tests/run.sh k8s (the built fsb-agent)")?;
        let containerd = ContainerdEnv::try_from_env()?;
        let state_dir = containerd.run_dir.join("kubelet").join(namespace);
        Ok(Self {
            namespace: namespace.to_owned(),
            node: DEFAULT_NODE.to_owned(),
            agent_bin: PathBuf::from(agent_bin),
            state_dir,
            containerd,
        })
    }
}

/// An agent process the fixture runs for a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunningPod {
    /// Pod name.
    pub name: String,
    /// Pod UID (the agent's id).
    pub uid: String,
    /// The agent's gRPC port on [`POD_IP`].
    pub port: u16,
    /// The agent's pid.
    pub pid: u32,
    /// Its port accepted a connection (the pod is Ready).
    pub ready: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ProcState {
    Starting,
    Ready,
    /// Exited or killed; the pod is Failed and never restarted.
    Dead,
}

#[derive(Debug)]
struct Proc {
    name: String,
    port: u16,
    pid: u32,
    child: Child,
    state: ProcState,
    /// Status says so (the last patch succeeded).
    reported: Option<ProcState>,
    /// When SIGTERM was sent and the SIGKILL deadline.
    terminating: Option<Instant>,
}

#[derive(Debug)]
struct Inner {
    config: KubeletConfig,
    pods: Api<Pod>,
    procs: Mutex<HashMap<String, Proc>>,
    wake: Notify,
}

impl Inner {
    fn procs(&self) -> MutexGuard<'_, HashMap<String, Proc>> {
        // A panic while holding the lock leaves plain data; keep going.
        self.procs.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The fixture; see the module doc.
#[derive(Debug)]
pub struct Kubelet {
    inner: Arc<Inner>,
    tasks: Vec<JoinHandle<()>>,
}

impl Kubelet {
    /// Start for `namespace` with [`KubeletConfig::from_env`].
    pub async fn start(client: kube::Client, namespace: &str) -> Result<Self> {
        Self::start_with(client, KubeletConfig::from_env(namespace)?).await
    }

    /// Start with an explicit config. Creates the Node object if missing.
    pub async fn start_with(client: kube::Client, config: KubeletConfig) -> Result<Self> {
        std::fs::create_dir_all(&config.state_dir)
            .with_context(|| format!("creating {}", config.state_dir.display()))?;
        ensure_node(&client, &config.node).await?;
        let pods: Api<Pod> = Api::namespaced(client, &config.namespace);
        let inner = Arc::new(Inner {
            config,
            pods: pods.clone(),
            procs: Mutex::new(HashMap::new()),
            wake: Notify::new(),
        });
        let watch = {
            let inner = inner.clone();
            tokio::spawn(async move {
                let mut events = watcher(pods, watcher::Config::default().labels(SELECTOR))
                    .default_backoff()
                    .boxed();
                while let Some(event) = events.next().await {
                    if event.is_ok() {
                        inner.wake.notify_one();
                    }
                }
            })
        };
        let sync = {
            let inner = inner.clone();
            tokio::spawn(async move {
                loop {
                    if let Err(e) = sync_once(&inner).await {
                        eprintln!("kubelet fixture: {e:#}");
                    }
                    let _ = tokio::time::timeout(RESYNC, inner.wake.notified()).await;
                }
            })
        };
        Ok(Self {
            inner,
            tasks: vec![watch, sync],
        })
    }

    /// The node pods are bound to.
    pub fn node(&self) -> &str {
        &self.inner.config.node
    }

    /// Agents running now (not killed, not exited).
    pub fn running(&self) -> Vec<RunningPod> {
        let mut out: Vec<RunningPod> = self
            .inner
            .procs()
            .iter()
            .filter(|(_, p)| p.state != ProcState::Dead)
            .map(|(uid, p)| RunningPod {
                name: p.name.clone(),
                uid: uid.clone(),
                port: p.port,
                pid: p.pid,
                ready: p.state == ProcState::Ready,
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// SIGKILL the agent of pod `name` and mark the pod Failed (a crash the kubelet does
    /// not restart). Returns once the process is gone and the status says Failed.
    pub async fn kill(&self, name: &str) -> Result<()> {
        let uid = {
            let mut procs = self.inner.procs();
            let Some((uid, proc)) = procs.iter_mut().find(|(_, p)| p.name == name) else {
                bail!("no agent runs for pod {name}");
            };
            proc.child.start_kill().ok();
            proc.state = ProcState::Dead;
            uid.clone()
        };
        crate::wait_until("the killed agent to exit", Duration::from_secs(10), || {
            let inner = self.inner.clone();
            let uid = uid.clone();
            async move {
                let mut procs = inner.procs();
                Ok(match procs.get_mut(&uid) {
                    Some(p) => p.child.try_wait()?.map(|_| ()),
                    None => Some(()),
                })
            }
        })
        .await?;
        set_failed(&self.inner.pods, name, &uid, 137, "Killed by the test").await?;
        if let Some(p) = self.inner.procs().get_mut(&uid) {
            p.reported = Some(ProcState::Dead);
        }
        Ok(())
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
        for proc in self.inner.procs().values_mut() {
            let _ = proc.child.start_kill();
            // Reap now when it is already gone; tokio's orphan reaper does the rest.
            let _ = proc.child.try_wait();
        }
    }
}

async fn ensure_node(client: &kube::Client, name: &str) -> Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    let node: Node = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
    }))?;
    match nodes.create(&PostParams::default(), &node).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(e).context("creating the test node"),
    }
}

async fn sync_once(inner: &Inner) -> Result<()> {
    let pods = inner
        .pods
        .list(&ListParams::default().labels(SELECTOR))
        .await?
        .items;
    let mut seen = Vec::new();
    for pod in &pods {
        let Some(uid) = pod.uid() else { continue };
        seen.push(uid.clone());
        if let Err(e) = sync_pod(inner, pod, &uid).await {
            eprintln!("kubelet fixture: pod {}: {e:#}", pod.name_any());
        }
    }
    // Pods deleted behind our back (force delete): their agents go too.
    let mut procs = inner.procs();
    procs.retain(|uid, p| {
        let keep = seen.contains(uid);
        if !keep {
            let _ = p.child.start_kill();
        }
        keep
    });
    Ok(())
}

async fn sync_pod(inner: &Inner, pod: &Pod, uid: &str) -> Result<()> {
    let name = pod.name_any();
    let node = pod.spec.as_ref().and_then(|s| s.node_name.clone());
    if pod.meta().deletion_timestamp.is_some() {
        return terminate(inner, pod, &name, uid).await;
    }
    let Some(node) = node else {
        return bind(inner, &name).await;
    };
    if node != inner.config.node {
        return Ok(());
    }
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    let known = inner.procs().contains_key(uid);
    if !known {
        if matches!(phase, Some("Failed" | "Succeeded")) {
            return Ok(());
        }
        let proc = spawn_agent(inner, pod, &name, uid).await?;
        inner.procs().insert(uid.to_owned(), proc);
    }
    // Observe the process, then report what changed.
    let (state, reported, port) = {
        let mut procs = inner.procs();
        let Some(p) = procs.get_mut(uid) else {
            return Ok(());
        };
        if p.state != ProcState::Dead && p.child.try_wait()?.is_some() {
            p.state = ProcState::Dead;
        }
        (p.state, p.reported, p.port)
    };
    let state = if state == ProcState::Starting
        && tokio::net::TcpStream::connect((POD_IP, port)).await.is_ok()
    {
        ProcState::Ready
    } else {
        state
    };
    if reported == Some(state) {
        return Ok(());
    }
    match state {
        ProcState::Dead => set_failed(&inner.pods, &name, uid, 1, "The agent exited").await?,
        ProcState::Starting | ProcState::Ready => {
            set_running(&inner.pods, pod, state == ProcState::Ready).await?
        }
    }
    if let Some(p) = inner.procs().get_mut(uid) {
        if p.state != ProcState::Dead {
            p.state = state;
        }
        p.reported = Some(state);
    }
    Ok(())
}

async fn bind(inner: &Inner, name: &str) -> Result<()> {
    let binding = json!({
        "apiVersion": "v1",
        "kind": "Binding",
        "metadata": {"name": name, "namespace": inner.config.namespace},
        "target": {"apiVersion": "v1", "kind": "Node", "name": inner.config.node},
    });
    match inner
        .pods
        .create_subresource::<_, serde_json::Value>(
            "binding",
            name,
            &PostParams::default(),
            &binding,
        )
        .await
    {
        Ok(_) => Ok(()),
        // Bound meanwhile, or gone.
        Err(kube::Error::Api(e)) if e.code == 409 || e.code == 404 => Ok(()),
        Err(e) => Err(e).context("binding"),
    }
}

fn free_port() -> Result<u16> {
    // Bound and released: another process could take it in between, which the agent
    // would report by exiting (the pod goes Failed and the pool replaces it).
    let l = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))?;
    Ok(l.local_addr()?.port())
}

/// The first container's environment with literal values and downward-API fields
/// resolved (other sources are left out: agent pods use none).
pub fn resolve_env(pod: &Pod, container: &Container) -> BTreeMap<String, String> {
    let field = |path: &str| -> Option<String> {
        match path {
            "metadata.name" => pod.metadata.name.clone(),
            "metadata.uid" => pod.metadata.uid.clone(),
            "metadata.namespace" => pod.metadata.namespace.clone(),
            "spec.nodeName" => pod.spec.as_ref().and_then(|s| s.node_name.clone()),
            "status.podIP" | "status.hostIP" => Some(POD_IP.to_owned()),
            _ => None,
        }
    };
    let mut env = BTreeMap::new();
    for var in container.env.iter().flatten() {
        let value = match (&var.value, &var.value_from) {
            (Some(v), _) => Some(v.clone()),
            (None, Some(from)) => from.field_ref.as_ref().and_then(|f| field(&f.field_path)),
            (None, None) => Some(String::new()),
        };
        if let Some(v) = value {
            env.insert(var.name.clone(), v);
        }
    }
    env
}

/// Secret volumes mounted into the first container, projected as a kubelet does: each
/// Secret's data written as files (mode 0400) under `<dir>/volumes/<volume>`. Returns
/// (mount path, host directory) pairs. A missing Secret is an error (the pod waits, as
/// a real one stays ContainerCreating).
async fn project_secrets(
    client: kube::Client,
    pod: &Pod,
    container: &Container,
    dir: &std::path::Path,
) -> Result<Vec<(String, PathBuf)>> {
    use std::os::unix::fs::PermissionsExt;
    let ns = pod.namespace().unwrap_or_default();
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client, &ns);
    let volumes = pod
        .spec
        .as_ref()
        .and_then(|s| s.volumes.clone())
        .unwrap_or_default();
    let mut out = Vec::new();
    for mount in container.volume_mounts.iter().flatten() {
        let Some(secret_name) = volumes
            .iter()
            .find(|v| v.name == mount.name)
            .and_then(|v| v.secret.as_ref())
            .and_then(|s| s.secret_name.clone())
        else {
            continue;
        };
        let secret = secrets
            .get(&secret_name)
            .await
            .with_context(|| format!("secret volume {}: secret {secret_name}", mount.name))?;
        let target = dir.join("volumes").join(&mount.name);
        std::fs::create_dir_all(&target)?;
        for (key, value) in secret.data.iter().flatten() {
            let file = target.join(key);
            std::fs::write(&file, &value.0)?;
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o400))?;
        }
        out.push((mount.mount_path.clone(), target));
    }
    Ok(out)
}

/// `value` with a leading mount path replaced by the host directory projected for it.
pub fn rewrite_mount_path(value: &str, mounts: &[(String, PathBuf)]) -> String {
    for (path, host) in mounts {
        if let Some(rest) = value.strip_prefix(path.as_str())
            && (rest.is_empty() || rest.starts_with('/'))
        {
            return format!("{}{rest}", host.display());
        }
    }
    value.to_owned()
}

async fn spawn_agent(inner: &Inner, pod: &Pod, name: &str, uid: &str) -> Result<Proc> {
    let container = pod
        .spec
        .as_ref()
        .and_then(|s| s.containers.first())
        .context("pod has no container")?;
    let mut env = resolve_env(pod, container);
    let dir = inner.config.state_dir.join(uid);
    let mounts = project_secrets(inner.pods.clone().into_client(), pod, container, &dir).await?;
    for value in env.values_mut() {
        *value = rewrite_mount_path(value, &mounts);
    }
    let port = free_port()?;
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs)?;
    let cd = &inner.config.containerd;
    let overrides = [
        ("FSB_LISTEN", format!("{POD_IP}:{port}")),
        ("FSB_ADVERTISE_HOST", POD_IP.to_owned()),
        ("FSB_CONTAINERD_SOCKET", cd.socket.display().to_string()),
        ("FSB_CONTAINERD_NAMESPACE", cd.namespace.clone()),
        ("FSB_RUNTIME_ROOT", cd.runtime_root.display().to_string()),
        ("FSB_RUNSC", cd.runsc.display().to_string()),
        ("FSB_LOG_DIR", logs.display().to_string()),
    ];
    for (k, v) in overrides {
        env.insert(k.to_owned(), v);
    }
    let log = std::fs::File::create(dir.join("agent.log"))?;
    let mut cmd = Command::new(&inner.config.agent_bin);
    // The test process's own FSB_* settings are not the pod's.
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("FSB_")) {
        cmd.env_remove(k);
    }
    let child = cmd
        .envs(&env)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("spawning {}", inner.config.agent_bin.display()))?;
    let pid = child.id().context("the agent exited at once")?;
    Ok(Proc {
        name: name.to_owned(),
        port,
        pid,
        child,
        state: ProcState::Starting,
        reported: None,
        terminating: None,
    })
}

fn now() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .round(k8s_openapi::jiff::Unit::Second)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

fn container_name(pod: &Pod) -> String {
    pod.spec
        .as_ref()
        .and_then(|s| s.containers.first())
        .map(|c| c.name.clone())
        .unwrap_or_default()
}

async fn set_running(pods: &Api<Pod>, pod: &Pod, ready: bool) -> Result<()> {
    let ready_s = if ready { "True" } else { "False" };
    let started = pod
        .status
        .as_ref()
        .and_then(|s| s.start_time.as_ref())
        .map(|t| t.0.to_string())
        .unwrap_or_else(now);
    let c = pod
        .spec
        .as_ref()
        .and_then(|s| s.containers.first())
        .cloned()
        .unwrap_or_default();
    let t = now();
    let status = json!({"status": {
        "phase": "Running",
        "podIP": POD_IP, "podIPs": [{"ip": POD_IP}],
        "hostIP": POD_IP, "hostIPs": [{"ip": POD_IP}],
        "startTime": started,
        "conditions": [
            {"type": "PodScheduled", "status": "True", "lastTransitionTime": started},
            {"type": "Initialized", "status": "True", "lastTransitionTime": started},
            {"type": "ContainersReady", "status": ready_s, "lastTransitionTime": t},
            {"type": "Ready", "status": ready_s, "lastTransitionTime": t},
        ],
        "containerStatuses": [{
            "name": c.name,
            "image": c.image.unwrap_or_default(),
            "imageID": "",
            "ready": ready,
            "started": true,
            "restartCount": 0,
            "state": {"running": {"startedAt": started}},
        }],
    }});
    pods.patch_status(
        &pod.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&status),
    )
    .await?;
    Ok(())
}

async fn set_failed(pods: &Api<Pod>, name: &str, uid: &str, code: i32, why: &str) -> Result<()> {
    let pod = pods.get(name).await?;
    if pod.uid().as_deref() != Some(uid) {
        return Ok(());
    }
    let t = now();
    let status = json!({"status": {
        "phase": "Failed",
        "message": why,
        "conditions": [
            {"type": "PodScheduled", "status": "True", "lastTransitionTime": t},
            {"type": "ContainersReady", "status": "False", "lastTransitionTime": t},
            {"type": "Ready", "status": "False", "lastTransitionTime": t},
        ],
        "containerStatuses": [{
            "name": container_name(&pod),
            "image": pod.spec.as_ref().and_then(|s| s.containers.first()).and_then(|c| c.image.clone()).unwrap_or_default(),
            "imageID": "",
            "ready": false,
            "started": false,
            "restartCount": 0,
            "state": {"terminated": {"exitCode": code, "reason": "Error", "finishedAt": t}},
        }],
    }});
    pods.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await?;
    Ok(())
}

/// deletionTimestamp is set: SIGTERM, SIGKILL after the grace period, then remove the
/// pod for good.
async fn terminate(inner: &Inner, pod: &Pod, name: &str, uid: &str) -> Result<()> {
    let grace = pod
        .meta()
        .deletion_grace_period_seconds
        .and_then(|s| u64::try_from(s).ok())
        .map(Duration::from_secs)
        .unwrap_or(MAX_GRACE)
        .min(MAX_GRACE);
    let (gone, sigterm) = {
        let mut procs = inner.procs();
        match procs.get_mut(uid) {
            None => (true, None),
            Some(p) => {
                if p.child.try_wait()?.is_some() {
                    (true, None)
                } else if let Some(deadline) = p.terminating {
                    if Instant::now() >= deadline {
                        let _ = p.child.start_kill();
                    }
                    (false, None)
                } else {
                    p.terminating = Some(Instant::now() + grace);
                    (false, Some(p.pid))
                }
            }
        }
    };
    if let Some(pid) = sigterm {
        // tokio's Child only sends SIGKILL; kill(1) sends the polite one.
        let status = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .await?;
        if !status.success() {
            eprintln!("kubelet fixture: kill -TERM {pid} failed ({status})");
        }
    }
    if !gone {
        return Ok(());
    }
    let params = DeleteParams {
        grace_period_seconds: Some(0),
        preconditions: Some(Preconditions {
            uid: Some(uid.to_owned()),
            resource_version: None,
        }),
        ..DeleteParams::default()
    };
    match inner.pods.delete(name, &params).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
        Err(e) => return Err(e).context("removing the terminated pod"),
    }
    inner.procs().remove(uid);
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn mount_paths_in_env_values_point_at_the_projection() {
        let mounts = vec![("/var/run/tls".to_owned(), PathBuf::from("/tmp/p/volumes/t"))];
        assert_eq!(
            rewrite_mount_path("/var/run/tls", &mounts),
            "/tmp/p/volumes/t"
        );
        assert_eq!(
            rewrite_mount_path("/var/run/tls/ca.crt", &mounts),
            "/tmp/p/volumes/t/ca.crt"
        );
        assert_eq!(
            rewrite_mount_path("/var/run/tlsx", &mounts),
            "/var/run/tlsx"
        );
        assert_eq!(rewrite_mount_path("x", &mounts), "x");
    }

    #[test]
    fn env_resolves_literals_and_the_downward_api() {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "p-abcde", "namespace": "ns", "uid": "u-1"},
            "spec": {"nodeName": "n1", "containers": [{"name": "agent", "env": [
                {"name": "A", "value": "x"},
                {"name": "EMPTY"},
                {"name": "ID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}}},
                {"name": "NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                {"name": "SECRET", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}},
            ]}]},
        }))
        .unwrap();
        let env = resolve_env(&pod, &pod.spec.as_ref().unwrap().containers[0]);
        let want: BTreeMap<String, String> = [
            ("A", "x"),
            ("EMPTY", ""),
            ("ID", "u-1"),
            ("NAME", "p-abcde"),
            ("NS", "ns"),
            ("NODE", "n1"),
            ("IP", POD_IP),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        assert_eq!(env, want);
    }
}
