//! The container lifecycle on containerd: create + start, observe, stop + remove.
//!
//! Every create either ends with a running task or removes what it made (snapshot,
//! container, lease, log files) before returning the error. Delete is SIGTERM, grace,
//! SIGKILL, then task, container, snapshot and logs; it is idempotent. State lives in
//! containerd (labels, tasks), so [`ContainerdRuntime::list`] rebuilds everything an
//! agent needs after a restart. The shim, not the agent, writes stdout/stderr to the
//! sandbox's log files, so logs keep flowing while the agent is down.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Arc, OnceLock},
    time::{Duration, Instant, SystemTime},
};

use containerd_client::{
    events::TaskExit,
    services::v1::{
        Container, CreateContainerRequest, CreateTaskRequest, DeleteContainerRequest,
        DeleteTaskRequest, GetRequest as GetTaskRequest, KillRequest, ListContainersRequest,
        ListTasksRequest, PublishRequest, StartRequest, SubscribeRequest, UpdateContainerRequest,
        UpdateTaskRequest, WaitRequest,
        containers_client::ContainersClient,
        events_client::EventsClient,
        snapshots::{
            PrepareSnapshotRequest, RemoveSnapshotRequest, ViewSnapshotRequest,
            snapshots_client::SnapshotsClient,
        },
        tasks_client::TasksClient,
    },
    types::{Mount, v1::Status as TaskStatus},
};
use fsb_core::{
    SandboxId,
    labels::{LABEL_AGENT_UID, LABEL_ID, LABEL_MANAGED},
    spec::Runtime,
};
use futures::{Stream, StreamExt};
use prost::Message;

use crate::{
    actor::LABEL_WARM,
    containerd::{Containerd, SNAPSHOTTER},
    error::AgentError,
};

/// Type URL containerd gives the OCI runtime spec in `Container.spec`.
const SPEC_TYPE_URL: &str = "types.containerd.io/opencontainers/runtime-spec/1/Spec";
/// How long a create may hold its lease if the agent dies mid-create.
const CREATE_LEASE_LIFETIME: Duration = Duration::from_secs(600);
const SIGTERM: u32 = 15;
/// Directory under the log dir holding removed sandboxes' logs during retention.
const RETAINED_DIR: &str = ".retained";
const EXIT_TOPIC: &str = "/tasks/exit";
/// Our own event, published to learn that a subscription is live.
const MARKER_TOPIC: &str = "/fast-sandbox/subscribed";
/// containerd's type URL of OCI `LinuxResources` (JSON, as the spec's).
const RESOURCES_TYPE_URL: &str = "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources";
const MARKER_TYPE_URL: &str = "types.fast-sandbox.io/SubscriptionMarker";
const SIGKILL: u32 = 9;
/// After SIGKILL, how long to wait for the exit before giving up with an error.
const KILL_WAIT: Duration = Duration::from_secs(10);

/// Everything needed to create one container; the OCI spec is already built.
#[derive(Clone, Debug)]
pub struct ContainerPlan {
    /// The sandbox, also the container id and the snapshot key.
    pub id: SandboxId,
    /// Image the rootfs comes from (recorded on the container).
    pub image: String,
    /// Chain id of the image's top layer: the snapshot parent.
    pub parent_snapshot: String,
    /// Labels besides `managed` and `id`, which are always set.
    pub labels: HashMap<String, String>,
    /// OCI runtime.
    pub runtime: Runtime,
    /// The OCI runtime spec, JSON.
    pub spec_json: Vec<u8>,
    /// A warm instance: its process (fsb-init) gets a stdin FIFO the agent writes the
    /// process spec to when the instance is claimed ([`ContainerdRuntime::hand_over`]).
    pub warm: bool,
}

/// Time spent in each step of a create.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CreateTimings {
    /// Snapshot prepare.
    pub snapshot: Duration,
    /// Container record.
    pub container: Duration,
    /// Task create (shim start and `runc create`).
    pub task: Duration,
    /// Task start.
    pub start: Duration,
}

/// A started sandbox.
#[derive(Clone, Debug)]
pub struct Started {
    /// Host pid of its init process.
    pub pid: u32,
    /// Where the time went.
    pub timings: CreateTimings,
}

/// One of our containers as containerd holds it, its task not asked for
/// ([`ContainerdRuntime::list_labels`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Labelled {
    /// The sandbox id (the container id).
    pub id: SandboxId,
    /// Its labels, a pending claim's applied.
    pub labels: HashMap<String, String>,
    /// The image it was created from.
    pub image: String,
    /// When containerd created it.
    pub created_at: Option<SystemTime>,
    /// A claim's labels not yet in containerd (see [`ObservedSandbox::pending_labels`]).
    pub pending_labels: Option<HashMap<String, String>>,
}

/// A sandbox's task as containerd reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TaskState {
    /// Created, not started.
    Created,
    /// Running.
    Running,
    /// Exited with this status.
    Stopped {
        /// Exit status.
        exit_code: u32,
    },
    /// No task (container without a task, e.g. a create interrupted midway).
    Missing,
    /// Paused, pausing or unknown.
    Other,
}

/// One of our containers as found in containerd.
#[derive(Clone, Debug)]
pub struct ObservedSandbox {
    /// Its id.
    pub id: SandboxId,
    /// Its labels.
    pub labels: HashMap<String, String>,
    /// Its image.
    pub image: String,
    /// Its task.
    pub state: TaskState,
    /// Host pid of its init process (0 if none).
    pub pid: u32,
    /// When containerd created the container (`None` if it did not say); the janitor
    /// removes orphans only once they are older than its orphan timeout.
    pub created_at: Option<SystemTime>,
    /// A claimed warm instance whose labels containerd does not have yet: the claim's
    /// labels (already merged into `labels`), to be set on the container.
    pub pending_labels: Option<HashMap<String, String>>,
}

/// A task exit seen on containerd's event stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exit {
    /// The sandbox whose init process exited.
    pub id: SandboxId,
    /// Exit status.
    pub exit_code: u32,
    /// Host pid of the process that exited (0 if containerd did not say).
    pub pid: u32,
}

/// The sandbox's log files, written by the shim.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogPaths {
    /// Directory holding both.
    pub dir: PathBuf,
    /// stdout.
    pub stdout: PathBuf,
    /// stderr.
    pub stderr: PathBuf,
}

/// A relabel waits at most this long for a pause in claims.
const RELABEL_DELAY_MAX: Duration = Duration::from_secs(5);
/// A pause in claims: no claim for this long.
const RELABEL_QUIET: Duration = Duration::from_millis(100);

/// Claimed instances' labels on their way to containerd ([`ContainerdRuntime::set_labels_later`]).
type Relabel = (SandboxId, HashMap<String, String>);

/// Drives containerd for the agent.
#[derive(Clone, Debug)]
pub struct ContainerdRuntime {
    cd: Containerd,
    log_dir: PathBuf,
    log_retention: Duration,
    /// The relabel worker's queue, started with the first relabel.
    relabels: Arc<OnceLock<tokio::sync::mpsc::UnboundedSender<Relabel>>>,
}

impl ContainerdRuntime {
    /// A runtime writing sandbox logs under `log_dir/<sandbox id>/`.
    pub fn new(cd: Containerd, log_dir: PathBuf) -> Self {
        Self {
            cd,
            log_dir,
            log_retention: Duration::ZERO,
            relabels: Arc::default(),
        }
    }

    /// Keep a removed sandbox's logs for `retention` under `log_dir/.retained/<id>/`
    /// (zero, the default, removes them with the sandbox). [`Self::prune_retained`]
    /// deletes them once they are older.
    pub fn with_log_retention(mut self, retention: Duration) -> Self {
        self.log_retention = retention;
        self
    }

    /// Where a removed sandbox's logs are kept during the retention period.
    pub fn retained_log_dir(&self, id: &SandboxId) -> PathBuf {
        self.log_dir.join(RETAINED_DIR).join(id.as_str())
    }

    /// Delete retained logs older than the retention period; returns how many went.
    pub async fn prune_retained(&self) -> Result<usize, AgentError> {
        let dir = self.log_dir.join(RETAINED_DIR);
        let mut entries = match tokio::fs::read_dir(&dir).await {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => {
                return Err(AgentError::Internal(format!(
                    "reading {}: {e}",
                    dir.display()
                )));
            }
        };
        let mut pruned = 0;
        while let Ok(Some(entry)) = entries.next_entry().await {
            let age = entry
                .metadata()
                .await
                .ok()
                .and_then(|m| m.modified().ok())
                .and_then(|t| t.elapsed().ok())
                .unwrap_or_default();
            if age >= self.log_retention && tokio::fs::remove_dir_all(entry.path()).await.is_ok() {
                pruned += 1;
            }
        }
        Ok(pruned)
    }

    /// The connection.
    pub fn containerd(&self) -> &Containerd {
        &self.cd
    }

    /// Log file paths of a sandbox. Ids are validated 32-hex `SandboxId`s, so the path
    /// cannot leave `log_dir`.
    pub fn log_paths(&self, id: &SandboxId) -> LogPaths {
        let dir = self.log_dir.join(id.as_str());
        LogPaths {
            stdout: dir.join("stdout.log"),
            stderr: dir.join("stderr.log"),
            dir,
        }
    }

    /// A directory of the agent's for short-lived mount points (a user namespace's
    /// remapped image, see [`crate::userns`]).
    pub fn scratch_dir(&self) -> PathBuf {
        self.log_dir.join(".scratch")
    }

    /// The stdin FIFO of a warm instance (beside its logs).
    pub fn stdin_fifo(&self, id: &SandboxId) -> PathBuf {
        self.log_dir.join(id.as_str()).join("stdin")
    }

    /// Apply OCI `linux.resources` (`crate::oci::limits`) to a running sandbox: a
    /// claimed warm instance gets its create's limits this way.
    pub async fn update_limits(
        &self,
        id: &SandboxId,
        resources: &serde_json::Value,
    ) -> Result<(), AgentError> {
        let value = serde_json::to_vec(resources)
            .map_err(|e| AgentError::Internal(format!("encoding resources: {e}")))?;
        let req = UpdateTaskRequest {
            container_id: id.as_str().to_owned(),
            resources: Some(prost_types::Any {
                type_url: RESOURCES_TYPE_URL.to_owned(),
                value,
            }),
            annotations: HashMap::new(),
        };
        self.cd
            .call(
                "update task",
                TasksClient::new(self.cd.channel()).update(self.cd.request(req)),
            )
            .await?;
        Ok(())
    }

    /// Set (or, with an empty value, remove) labels of a container: a claimed warm
    /// instance gets the labels of the sandbox it became, so a restarted agent and the
    /// janitor read it as that sandbox.
    pub async fn set_labels(
        &self,
        id: &SandboxId,
        labels: &HashMap<String, String>,
    ) -> Result<(), AgentError> {
        let paths = labels.keys().map(|k| format!("labels.{k}")).collect();
        let req = UpdateContainerRequest {
            container: Some(Container {
                id: id.as_str().to_owned(),
                labels: labels
                    .iter()
                    .filter(|(_, v)| !v.is_empty())
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask { paths }),
        };
        self.cd
            .call(
                "update container",
                ContainersClient::new(self.cd.channel()).update(self.cd.request(req)),
            )
            .await?;
        Ok(())
    }

    /// Where a claim's labels wait until containerd has them (beside the logs).
    fn claim_path(&self, id: &SandboxId) -> PathBuf {
        self.log_dir.join(id.as_str()).join("claim.json")
    }

    /// Record the claim of warm instance `id` (the labels it takes, [`LABEL_WARM`]
    /// emptied) before handing it over. Setting labels in containerd is a database
    /// transaction of its own (milliseconds under load), so it follows the claim in
    /// the background ([`Self::set_labels_later`]); until then [`Self::list`] reads
    /// this file, so an agent stopped in between never offers the instance again.
    /// A plain write: it must survive the agent, not the node (whose containers end
    /// with it).
    pub async fn record_claim(
        &self,
        id: &SandboxId,
        labels: &HashMap<String, String>,
    ) -> Result<(), AgentError> {
        let json = serde_json::to_vec(labels)
            .map_err(|e| AgentError::Internal(format!("encoding the claim of {id}: {e}")))?;
        tokio::fs::write(self.claim_path(id), json)
            .await
            .map_err(|e| AgentError::Internal(format!("recording the claim of {id}: {e}")))
    }

    async fn read_claim(&self, id: &SandboxId) -> Option<HashMap<String, String>> {
        let bytes = tokio::fs::read(self.claim_path(id)).await.ok()?;
        match serde_json::from_slice(&bytes) {
            Ok(labels) => Some(labels),
            Err(e) => {
                // Written whole before the handover, so this is not a torn write.
                tracing::warn!(sandbox = %id, error = %e, "unreadable claim file; treated as claimed");
                Some(HashMap::from([(LABEL_WARM.to_owned(), String::new())]))
            }
        }
    }

    /// [`Self::set_labels`], retried (backoff up to 5 s) until containerd takes them or
    /// the container is gone.
    async fn set_labels_eventually(&self, id: &SandboxId, labels: &HashMap<String, String>) {
        let mut pause = Duration::from_millis(50);
        loop {
            match self.set_labels(id, labels).await {
                Ok(()) => return,
                Err(e) if e.is_not_found() => return,
                Err(e) => {
                    tracing::warn!(sandbox = %id, error = %e, "setting a claimed instance's labels failed; retrying");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Give claimed instance `id` its `labels` in containerd soon, after its claim file
    /// ([`Self::record_claim`]), which stands for them until then. One worker sets them
    /// one at a time, each batch once claims pause ([`RELABEL_QUIET`], at most
    /// [`RELABEL_DELAY_MAX`] after its first): each is a database transaction with an
    /// fsync in containerd, which a burst of claims would otherwise wait behind.
    pub fn set_labels_later(&self, id: SandboxId, labels: HashMap<String, String>) {
        let queue = self.relabels.get_or_init(|| {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            // The worker's copy holds no sender (a queue of its own, never used), so
            // the queue closes, and the worker ends, with the last of this runtime's
            // clones.
            let worker = Self {
                relabels: Arc::default(),
                ..self.clone()
            };
            tokio::spawn(relabel_worker(worker, rx));
            tx
        });
        // Closed only if the worker panicked; the claim file still stands for them.
        if queue.send((id, labels)).is_err() {
            tracing::warn!("the relabel worker is gone; claim files stand for the labels");
        }
    }

    /// Claim a warm instance: write `spec` to its fsb-init's stdin, then wait (up to
    /// `timeout`) for the process's start report in its stdout log. Returns the
    /// report; the instance is spent either way.
    ///
    /// `init_pid`: the instance's init as a host process (runc, crun). Then the spec
    /// goes straight into the pipe the shim made its stdin (`/proc/PID/fd/0`), not
    /// through the stdin FIFO and the shim's copy loop: one process to wake instead
    /// of two, which under a burst of claims is most of the delivery time. Without it
    /// (gVisor, whose init is inside the Sentry; an adopted instance) or if that pipe
    /// cannot be opened, through the FIFO.
    pub async fn hand_over(
        &self,
        id: &SandboxId,
        init_pid: Option<u32>,
        spec: &fsb_init::InitSpec,
        timeout: Duration,
    ) -> Result<fsb_init::Started, AgentError> {
        use tokio::io::AsyncWriteExt;
        let failed = |what: &str, e: &dyn std::fmt::Display| {
            AgentError::Internal(format!("warm instance {id}: {what}: {e}"))
        };
        // Watched from its current end: a spent instance's log holds its earlier report.
        let report = crate::report::ReportWatch::new(&self.log_paths(id).stdout)
            .map_err(|e| failed("watching its log", &e))?;
        // Non-blocking: the shim holds the read end; if nothing does, fail at once
        // (ENXIO) rather than wait for a reader that is gone.
        let direct = init_pid.and_then(|pid| {
            init_stdin(pid, id)
                .and_then(tokio::net::unix::pipe::Sender::from_file)
                .inspect_err(
                    |e| tracing::debug!(sandbox = %id, pid, error = %e, "using the stdin FIFO"),
                )
                .ok()
        });
        let mut pipe = match direct {
            Some(pipe) => pipe,
            None => tokio::net::unix::pipe::OpenOptions::new()
                .open_sender(self.stdin_fifo(id))
                .map_err(|e| failed("opening its stdin", &e))?,
        };
        pipe.write_all(spec.to_line().as_bytes())
            .await
            .map_err(|e| failed("writing the spec", &e))?;
        drop(pipe);
        report
            .wait(Instant::now() + timeout)
            .await
            .map_err(|e| failed("reading its log", &e))?
            .ok_or_else(|| {
                AgentError::Internal(format!(
                    "warm instance {id}: no start report within {timeout:?}"
                ))
            })
    }

    /// Create and start a sandbox. On any failure everything created so far is removed
    /// before the error is returned.
    pub async fn create(&self, plan: &ContainerPlan) -> Result<Started, AgentError> {
        match self.try_create(plan).await {
            Ok(started) => Ok(started),
            // The snapshot or container already exists: an earlier create made it and
            // owns it. Cleaning up here would destroy a live sandbox.
            Err(err) if err.is_already_exists() => Err(err),
            Err(err) => {
                if let Err(cleanup) = self.remove(&plan.id, Duration::ZERO).await {
                    tracing::warn!(sandbox = %plan.id, error = %cleanup, "cleanup after failed create failed");
                }
                Err(err)
            }
        }
    }

    async fn try_create(&self, plan: &ContainerPlan) -> Result<Started, AgentError> {
        let id = plan.id.as_str();
        let mut timings = CreateTimings::default();
        let logs = self.log_paths(&plan.id);
        create_log_files(&logs).await?;

        // The lease keeps the garbage collector off the snapshot until the container
        // references it.
        self.cd.create_lease(id, CREATE_LEASE_LIFETIME).await?;
        let t = Instant::now();
        let prepare = PrepareSnapshotRequest {
            snapshotter: SNAPSHOTTER.to_owned(),
            key: id.to_owned(),
            parent: plan.parent_snapshot.clone(),
            labels: HashMap::new(),
        };
        let rootfs: Vec<Mount> = self
            .cd
            .call(
                "prepare snapshot",
                SnapshotsClient::new(self.cd.channel())
                    .prepare(self.cd.leased_request(prepare, id)?),
            )
            .await?
            .mounts;
        timings.snapshot = t.elapsed();

        let t = Instant::now();
        let mut labels = plan.labels.clone();
        labels.insert(LABEL_MANAGED.to_owned(), "true".to_owned());
        labels.insert(LABEL_ID.to_owned(), id.to_owned());
        let container = Container {
            id: id.to_owned(),
            labels,
            image: plan.image.clone(),
            runtime: Some(self.cd.runtime_spec(plan.runtime)),
            spec: Some(prost_types::Any {
                type_url: SPEC_TYPE_URL.to_owned(),
                value: plan.spec_json.clone(),
            }),
            snapshotter: SNAPSHOTTER.to_owned(),
            snapshot_key: id.to_owned(),
            ..Default::default()
        };
        let req = self.cd.leased_request(
            CreateContainerRequest {
                container: Some(container),
            },
            id,
        )?;
        self.cd
            .call(
                "create container",
                ContainersClient::new(self.cd.channel()).create(req),
            )
            .await?;
        // The container now references the snapshot; the lease is no longer needed.
        self.cd.delete_lease(id).await?;
        timings.container = t.elapsed();

        let t = Instant::now();
        let stdin = if plan.warm {
            let fifo = self.stdin_fifo(&plan.id);
            rustix::fs::mkfifoat(
                rustix::fs::CWD,
                &fifo,
                rustix::fs::Mode::from_raw_mode(0o600),
            )
            .map_err(|e| AgentError::Internal(format!("creating {}: {e}", fifo.display())))?;
            fifo.display().to_string()
        } else {
            String::new()
        };
        let task = CreateTaskRequest {
            container_id: id.to_owned(),
            rootfs,
            stdin,
            stdout: logs.stdout.display().to_string(),
            stderr: logs.stderr.display().to_string(),
            ..Default::default()
        };
        let created = self
            .cd
            .call(
                "create task",
                TasksClient::new(self.cd.channel()).create(self.cd.request(task)),
            )
            .await?;
        timings.task = t.elapsed();

        let t = Instant::now();
        let start = StartRequest {
            container_id: id.to_owned(),
            exec_id: String::new(),
        };
        self.cd
            .call(
                "start task",
                TasksClient::new(self.cd.channel()).start(self.cd.request(start)),
            )
            .await?;
        timings.start = t.elapsed();
        Ok(Started {
            pid: created.pid,
            timings,
        })
    }

    /// Read small files (e.g. `etc/passwd`) from an image's rootfs without running
    /// anything: a view snapshot on the image's top layer, its layer directories read
    /// top-down, then the view removed. Symlinks are not followed (they would resolve
    /// on the host); a missing or non-regular file reads as `None`.
    pub async fn read_image_files(
        &self,
        chain_id: &str,
        paths: &[&str],
    ) -> Result<Vec<Option<String>>, AgentError> {
        let key = format!("fsb-view-{}", SandboxId::generate());
        self.cd.create_lease(&key, CREATE_LEASE_LIFETIME).await?;
        let view = ViewSnapshotRequest {
            snapshotter: SNAPSHOTTER.to_owned(),
            key: key.clone(),
            parent: chain_id.to_owned(),
            labels: HashMap::new(),
        };
        let mounts = self
            .cd
            .call(
                "view snapshot",
                SnapshotsClient::new(self.cd.channel()).view(self.cd.leased_request(view, &key)?),
            )
            .await;
        let result = mounts.map(|m| {
            let dirs = layer_dirs(&m.mounts);
            paths.iter().map(|p| read_from_layers(&dirs, p)).collect()
        });
        let remove = RemoveSnapshotRequest {
            snapshotter: SNAPSHOTTER.to_owned(),
            key: key.clone(),
        };
        let removed = self
            .cd
            .call(
                "remove view",
                SnapshotsClient::new(self.cd.channel()).remove(self.cd.request(remove)),
            )
            .await;
        if let Err(e) = removed {
            tracing::warn!(view = %key, error = %e, "removing image view failed; its lease expires it");
        }
        self.cd.delete_lease(&key).await?;
        result
    }

    /// Stop and remove a sandbox: SIGTERM, up to `grace` for it to exit, SIGKILL, then
    /// task, container, snapshot, lease and log files. Returns whether anything
    /// existed; removing a missing sandbox is not an error.
    pub async fn remove(&self, id: &SandboxId, grace: Duration) -> Result<bool, AgentError> {
        let mut existed = self.stop(id, grace).await?;
        let sid = id.as_str().to_owned();
        let tasks = TasksClient::new(self.cd.channel());
        let deleted = self
            .cd
            .call(
                "delete task",
                tasks.clone().delete(self.cd.request(DeleteTaskRequest {
                    container_id: sid.clone(),
                })),
            )
            .await;
        existed |= ok_if_missing(deleted)?;
        let deleted = self
            .cd
            .call(
                "delete container",
                ContainersClient::new(self.cd.channel())
                    .delete(self.cd.request(DeleteContainerRequest { id: sid.clone() })),
            )
            .await;
        existed |= ok_if_missing(deleted)?;
        let removed = self
            .cd
            .call(
                "remove snapshot",
                SnapshotsClient::new(self.cd.channel()).remove(self.cd.request(
                    RemoveSnapshotRequest {
                        snapshotter: SNAPSHOTTER.to_owned(),
                        key: sid.clone(),
                    },
                )),
            )
            .await;
        existed |= ok_if_missing(removed)?;
        self.cd.delete_lease(&sid).await?;
        let logs = self.log_paths(id);
        if !self.log_retention.is_zero() && logs.dir.exists() {
            let kept = self.retained_log_dir(id);
            let moved = async {
                tokio::fs::create_dir_all(self.log_dir.join(RETAINED_DIR)).await?;
                let _ = tokio::fs::remove_dir_all(&kept).await;
                tokio::fs::rename(&logs.dir, &kept).await?;
                // The retention clock starts now, not at the last write.
                tokio::fs::File::create(kept.join(".removed"))
                    .await
                    .map(|_| ())
            };
            if let Err(e) = moved.await {
                tracing::warn!(sandbox = %id, error = %e, "keeping logs failed; removing them");
            }
        }
        match tokio::fs::remove_dir_all(&logs.dir).await {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(AgentError::Internal(format!(
                    "removing {}: {e}",
                    logs.dir.display()
                )));
            }
        }
        Ok(existed)
    }

    /// SIGTERM, wait up to `grace`, SIGKILL, wait. Returns whether a task existed.
    async fn stop(&self, id: &SandboxId, grace: Duration) -> Result<bool, AgentError> {
        match self.task_state(id).await? {
            TaskState::Missing => return Ok(false),
            TaskState::Stopped { .. } => return Ok(true),
            TaskState::Created | TaskState::Running | TaskState::Other => {}
        }
        // Wait answers at once for a task that already exited, so starting it before
        // the signal cannot miss the exit.
        let req = self.cd.request_with_timeout(
            WaitRequest {
                container_id: id.as_str().to_owned(),
                exec_id: String::new(),
            },
            grace + KILL_WAIT,
        );
        let mut tasks = TasksClient::new(self.cd.channel());
        let mut wait = tokio::spawn(async move { tasks.wait(req).await });
        if !grace.is_zero() {
            self.kill(id, SIGTERM, false).await?;
            if tokio::time::timeout(grace, &mut wait).await.is_ok() {
                return Ok(true);
            }
        }
        self.kill(id, SIGKILL, true).await?;
        match tokio::time::timeout(KILL_WAIT, &mut wait).await {
            Ok(_) => Ok(true),
            Err(_) => {
                wait.abort();
                Err(AgentError::Timeout {
                    op: "wait after SIGKILL",
                    secs: KILL_WAIT.as_secs(),
                })
            }
        }
    }

    async fn kill(&self, id: &SandboxId, signal: u32, all: bool) -> Result<(), AgentError> {
        let req = KillRequest {
            container_id: id.as_str().to_owned(),
            exec_id: String::new(),
            signal,
            all,
        };
        let result = self
            .cd
            .call(
                "kill task",
                TasksClient::new(self.cd.channel()).kill(self.cd.request(req)),
            )
            .await;
        match result {
            Ok(()) => Ok(()),
            // Already gone or already stopped: nothing to signal.
            Err(e) if e.is_not_found() => Ok(()),
            Err(AgentError::Containerd {
                code: tonic::Code::FailedPrecondition,
                ..
            }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// The task's state.
    pub async fn task_state(&self, id: &SandboxId) -> Result<TaskState, AgentError> {
        let req = GetTaskRequest {
            container_id: id.as_str().to_owned(),
            exec_id: String::new(),
        };
        match self
            .cd
            .call(
                "get task",
                TasksClient::new(self.cd.channel()).get(self.cd.request(req)),
            )
            .await
        {
            Ok(resp) => Ok(resp
                .process
                .map_or(TaskState::Missing, |p| task_state(p.status, p.exit_status))),
            Err(e) if e.is_not_found() => Ok(TaskState::Missing),
            Err(e) => Err(e),
        }
    }

    /// Every container of ours (label `fast-sandbox.io/managed=true`) with its task;
    /// with `agent`, only those that agent created (several agents may share one
    /// containerd, e.g. pods of different pools on one node).
    ///
    /// Two calls, whatever the count: [`Self::list_labels`], then every task of the
    /// namespace at once. Tasks are listed after containers, so a container's task
    /// started in between is seen.
    pub async fn list(&self, agent: Option<&str>) -> Result<Vec<ObservedSandbox>, AgentError> {
        let containers = self.list_labels(agent).await?;
        let tasks: HashMap<String, (TaskState, u32)> = self
            .cd
            .call(
                "list tasks",
                TasksClient::new(self.cd.channel())
                    .list(self.cd.request(ListTasksRequest::default())),
            )
            .await?
            .tasks
            .into_iter()
            // containerd 1.6 names the init process's container in `id` alone.
            .map(|p| {
                let container = if p.container_id.is_empty() {
                    p.id
                } else {
                    p.container_id
                };
                (container, (task_state(p.status, p.exit_status), p.pid))
            })
            .collect();
        Ok(containers
            .into_iter()
            .map(|c| {
                let (state, pid) = tasks
                    .get(c.id.as_str())
                    .copied()
                    .unwrap_or((TaskState::Missing, 0));
                ObservedSandbox {
                    id: c.id,
                    labels: c.labels,
                    image: c.image,
                    state,
                    pid,
                    created_at: c.created_at,
                    pending_labels: c.pending_labels,
                }
            })
            .collect())
    }

    /// Our containers as [`Self::list`] gives them, without their tasks (no shim is
    /// asked anything): for callers that only need ids and labels, such as the orphan
    /// scan, which runs every few seconds beside hundreds of warm instances. Streamed,
    /// one container per message: a container carries its OCI spec (~8 KB), so
    /// hundreds outgrow a single 4 MiB answer. Sorted by id.
    pub async fn list_labels(&self, agent: Option<&str>) -> Result<Vec<Labelled>, AgentError> {
        let mut filter = format!("labels.\"{LABEL_MANAGED}\"==true");
        if let Some(agent) = agent {
            filter.push_str(&format!(",labels.\"{LABEL_AGENT_UID}\"=={agent:?}"));
        }
        let req = ListContainersRequest {
            filters: vec![filter],
        };
        let timeout = self.cd.config().call_timeout;
        let mut stream = self
            .cd
            .call(
                "list containers",
                ContainersClient::new(self.cd.channel()).list_stream(self.cd.request(req)),
            )
            .await?;
        let containers = tokio::time::timeout(timeout, async {
            let mut containers = Vec::new();
            while let Some(message) = stream.message().await? {
                containers.extend(message.container);
            }
            Ok::<_, tonic::Status>(containers)
        })
        .await
        .map_err(|_| AgentError::Timeout {
            op: "list containers",
            secs: timeout.as_secs(),
        })?
        .map_err(|status| AgentError::containerd("list containers", status))?;
        let mut out = Vec::with_capacity(containers.len());
        for c in containers {
            // Someone else's container with our label but a foreign id: not ours to manage.
            let Ok(id) = SandboxId::parse("container id", &c.id) else {
                tracing::warn!(container = %c.id, "managed label on a container with a foreign id; ignored");
                continue;
            };
            let mut labels = c.labels;
            // A warm instance claimed before containerd had its new labels: it is the
            // sandbox its claim file says, never an instance to offer again.
            let pending_labels = if crate::actor::unclaimed_warm(&labels) {
                self.read_claim(&id).await
            } else {
                None
            };
            if let Some(claimed) = &pending_labels {
                for (k, v) in claimed {
                    if v.is_empty() {
                        labels.remove(k);
                    } else {
                        labels.insert(k.clone(), v.clone());
                    }
                }
            }
            out.push(Labelled {
                id,
                labels,
                image: c.image,
                created_at: c.created_at.and_then(|t| SystemTime::try_from(t).ok()),
                pending_labels,
            });
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    /// Task exits of our init processes, from containerd's event stream. The stream
    /// ends when containerd goes away; callers resubscribe and resync with [`Self::list`].
    ///
    /// Returns once the subscription is registered, so no exit after this call is
    /// missed: containerd sends no response headers before the first event, so we
    /// publish a marker event of our own until it comes back on the stream.
    pub async fn exits(&self) -> Result<impl Stream<Item = Exit> + Send + 'static, AgentError> {
        let namespace = self.cd.config().namespace.clone();
        let req = SubscribeRequest {
            filters: vec![
                format!("topic==\"{EXIT_TOPIC}\",namespace==\"{namespace}\""),
                format!("topic==\"{MARKER_TOPIC}\",namespace==\"{namespace}\""),
            ],
        };
        // A subscription lives as long as we want it: no deadline on this request.
        let mut request = tonic::Request::new(req);
        if let Ok(value) = namespace.parse() {
            request.metadata_mut().insert("containerd-namespace", value);
        }
        let mut client = EventsClient::new(self.cd.channel());
        let subscribe = client.subscribe(request);
        tokio::pin!(subscribe);
        let deadline = Instant::now() + self.cd.config().call_timeout;
        let stream = loop {
            tokio::select! {
                resp = &mut subscribe => {
                    break resp.map_err(|s| AgentError::containerd("subscribe events", s))?.into_inner();
                }
                () = tokio::time::sleep(Duration::from_millis(20)) => {
                    if Instant::now() > deadline {
                        return Err(AgentError::Timeout { op: "subscribe events", secs: self.cd.config().call_timeout.as_secs() });
                    }
                    let marker = PublishRequest {
                        topic: MARKER_TOPIC.to_owned(),
                        event: Some(prost_types::Any { type_url: MARKER_TYPE_URL.to_owned(), value: Vec::new() }),
                    };
                    self.cd.call("publish event", EventsClient::new(self.cd.channel()).publish(self.cd.request(marker))).await?;
                }
            }
        };
        Ok(stream.filter_map(|envelope| async move {
            let envelope = envelope.ok()?;
            if envelope.topic != EXIT_TOPIC {
                return None;
            }
            let exit = TaskExit::decode(envelope.event?.value.as_slice()).ok()?;
            // Exits of exec'd processes carry their exec id; only init exits end a sandbox.
            if !exit.id.is_empty() && exit.id != exit.container_id {
                return None;
            }
            let id = SandboxId::parse("container id", &exit.container_id).ok()?;
            Some(Exit {
                id,
                exit_code: exit.exit_status,
                pid: exit.pid,
            })
        }))
    }
}

/// The directories of a view's layers, top-most first: a bind mount (one layer) or an
/// overlay's `lowerdir=top:...:bottom`.
fn layer_dirs(mounts: &[Mount]) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    for m in mounts {
        match m.r#type.as_str() {
            "bind" => dirs.push(PathBuf::from(&m.source)),
            "overlay" => {
                for opt in &m.options {
                    if let Some(lower) = opt.strip_prefix("lowerdir=") {
                        dirs.extend(lower.split(':').map(PathBuf::from));
                    }
                }
            }
            _ => {}
        }
    }
    dirs
}

fn read_from_layers(dirs: &[PathBuf], relative: &str) -> Option<String> {
    for dir in dirs {
        let path = dir.join(relative.trim_start_matches('/'));
        match std::fs::symlink_metadata(&path) {
            Ok(meta) if meta.file_type().is_file() && meta.len() <= 1 << 20 => {
                return std::fs::read_to_string(&path).ok();
            }
            // A symlink, a directory, or too large: do not trust it.
            Ok(_) => return None,
            Err(_) => continue,
        }
    }
    None
}

fn task_state(status: i32, exit_status: u32) -> TaskState {
    match TaskStatus::try_from(status) {
        Ok(TaskStatus::Created) => TaskState::Created,
        Ok(TaskStatus::Running) => TaskState::Running,
        Ok(TaskStatus::Stopped) => TaskState::Stopped {
            exit_code: exit_status,
        },
        _ => TaskState::Other,
    }
}

/// Work [`ContainerdRuntime::set_labels_later`]'s queue: collect relabels until claims
/// pause, then set them one by one. Runs as long as the runtime's clones do.
async fn relabel_worker(
    runtime: ContainerdRuntime,
    mut queue: tokio::sync::mpsc::UnboundedReceiver<Relabel>,
) {
    while let Some(first) = queue.recv().await {
        let until = Instant::now() + RELABEL_DELAY_MAX;
        let mut batch = vec![first];
        loop {
            let quiet = (Instant::now() + RELABEL_QUIET).min(until);
            match tokio::time::timeout_at(quiet.into(), queue.recv()).await {
                Ok(Some(next)) => batch.push(next),
                Ok(None) | Err(_) => break,
            }
        }
        for (id, labels) in batch {
            runtime.set_labels_eventually(&id, &labels).await;
        }
    }
}

/// The write end of the stdin pipe of `pid`, if `pid` is still the init of sandbox
/// `id` (its cgroup path names the id). Both are read through one handle on
/// `/proc/PID`, which stays with that process: a pid reused after it died fails
/// instead of receiving the spec.
fn init_stdin(pid: u32, id: &SandboxId) -> std::io::Result<std::fs::File> {
    use rustix::fs::{Mode, OFlags, openat};
    let proc_dir = std::fs::File::open(format!("/proc/{pid}"))?;
    let cgroup = openat(
        &proc_dir,
        "cgroup",
        OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let cgroup = std::io::read_to_string(std::fs::File::from(cgroup))?;
    if !cgroup.contains(id.as_str()) {
        return Err(std::io::Error::other(format!(
            "pid {pid} is not the init of {id}"
        )));
    }
    let flags = OFlags::WRONLY | OFlags::NONBLOCK | OFlags::CLOEXEC;
    Ok(openat(&proc_dir, "fd/0", flags, Mode::empty())?.into())
}

/// Map a containerd NotFound to "nothing was there".
fn ok_if_missing<T>(result: Result<T, AgentError>) -> Result<bool, AgentError> {
    match result {
        Ok(_) => Ok(true),
        Err(e) if e.is_not_found() => Ok(false),
        Err(e) => Err(e),
    }
}

async fn create_log_files(logs: &LogPaths) -> Result<(), AgentError> {
    let io = |p: &Path, e: std::io::Error| {
        AgentError::Internal(format!("creating {}: {e}", p.display()))
    };
    tokio::fs::create_dir_all(&logs.dir)
        .await
        .map_err(|e| io(&logs.dir, e))?;
    for path in [&logs.stdout, &logs.stderr] {
        tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .await
            .map_err(|e| io(path, e))?;
    }
    Ok(())
}
