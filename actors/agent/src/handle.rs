//! Starting the agent and talking to it.

use std::{path::PathBuf, sync::Arc, time::Duration};

use actix::{Actor, Addr};
use fsb_core::{AgentId, SandboxId, spec::Runtime};
use futures::StreamExt;
use tokio::sync::broadcast;

use crate::{
    actor::{AgentActor, AgentParts, spawn_exit_watch},
    containerd::{Containerd, ContainerdConfig},
    error::AgentError,
    image::{ImageStore, RegistryOptions},
    msg::{
        Create, CreateSandbox, CreatedSandbox, Delete, Inventory, StopWarm, Subscribe,
        WarmInstances,
    },
    oci::NetworkMode,
    runtime::ContainerdRuntime,
    state::{PhaseChange, SandboxRecord},
    warm::{WarmConfig, WarmKey},
};

/// Default time between SIGTERM and SIGKILL.
pub const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(10);

/// Everything the agent needs to run.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// This agent's id (its pod UID in Kubernetes, `local` in `fsb up`).
    pub agent_id: AgentId,
    /// containerd connection.
    pub containerd: ContainerdConfig,
    /// Directory of the sandboxes' log files.
    pub log_dir: PathBuf,
    /// Sandboxes held at once.
    pub capacity: u32,
    /// Network namespace sandboxes join (the agent's own, by default).
    pub network: NetworkMode,
    /// Runtime when the spec names none.
    pub default_runtime: Runtime,
    /// Time between SIGTERM and SIGKILL when the delete names none.
    pub stop_grace: Duration,
    /// How images are pulled.
    pub registry: RegistryOptions,
    /// Size bound of each log file (stdout, stderr) of a sandbox; checked every
    /// [`LOG_CHECK_INTERVAL`], the oldest half dropped when exceeded. 0 disables.
    pub log_max_bytes: u64,
    /// How long a deleted sandbox's logs are kept (zero: removed with it).
    pub log_retention: Duration,
    /// Warm instances to keep ready.
    pub warm: WarmConfig,
    /// Capabilities taken away from every sandbox, warm instances included (the
    /// pool's `sandboxSecurity.capabilities.drop`).
    pub drop_capabilities: fsb_core::capability::CapabilityDrop,
}

/// Default bound of a sandbox log file.
pub const DEFAULT_LOG_MAX_BYTES: u64 = 16 * 1024 * 1024;
/// How long [`AgentHandle::stop_warm`] waits for instances still starting.
const STOP_WARM_WAIT: Duration = Duration::from_secs(30);
/// Warm instances removed at once on shutdown: each removal is mostly `runc` and shim
/// work, so a few in parallel keep both cores busy without a pile-up in containerd.
const STOP_WARM_PARALLEL: usize = 4;
/// How often log sizes are checked.
pub const LOG_CHECK_INTERVAL: Duration = Duration::from_secs(5);

/// Cloneable handle to a running agent.
#[derive(Clone, Debug)]
pub struct AgentHandle {
    addr: Addr<AgentActor>,
    agent_id: AgentId,
    images: Arc<ImageStore>,
    runtime: ContainerdRuntime,
}

impl AgentHandle {
    /// Connect to containerd, rebuild the sandbox table from it, start the actor and
    /// the exit watch. Must run inside an actix system. Creates are accepted only
    /// once the table reflects containerd.
    pub async fn start(config: AgentConfig) -> Result<Self, AgentError> {
        let cd = Containerd::connect(config.containerd.clone()).await?;
        let runtime = ContainerdRuntime::new(cd.clone(), config.log_dir.clone())
            .with_log_retention(config.log_retention);
        let images = Arc::new(ImageStore::new(cd, &config.registry)?);
        let mut warm = config.warm;
        if warm.targets.iter().any(|(_, n)| *n > 0) {
            let Some(init) = &warm.init else {
                return Err(AgentError::InvalidArgument(
                    "warm: keeping instances warm needs the fsb-init binary (--init-binary)".into(),
                ));
            };
            // The same rules as any injected file: a real regular file, symlinks resolved.
            let dir = init.parent().unwrap_or(std::path::Path::new("/"));
            let policy = crate::inject::InjectionPolicy::new([dir])?;
            warm.init = Some(policy.resolve(init, crate::sandbox::INIT_PATH)?.source);
        } else {
            warm.init = None;
        }
        let observed = runtime.list(Some(config.agent_id.as_str())).await?;
        let agent_id = config.agent_id.clone();
        let actor = AgentActor::new(AgentParts {
            agent_id: config.agent_id,
            capacity: config.capacity,
            runtime: runtime.clone(),
            images: images.clone(),
            network: config.network,
            default_runtime: config.default_runtime,
            stop_grace: config.stop_grace,
            observed,
            warm,
            drop_capabilities: config.drop_capabilities,
        });
        let addr = actor.start();
        spawn_exit_watch(addr.clone(), runtime.clone(), agent_id.clone());
        let handle = Self {
            addr,
            agent_id,
            images,
            runtime,
        };
        spawn_log_limits(handle.clone(), config.log_max_bytes);
        Ok(handle)
    }

    /// Create and start a sandbox (idempotent by id: a retry gets the first result).
    pub async fn create(&self, req: CreateSandbox) -> Result<CreatedSandbox, AgentError> {
        self.addr
            .send(Create {
                req,
                span: tracing::Span::current(),
            })
            .await
            .map_err(stopped)?
    }

    /// Stop and remove a sandbox; NotFound if the agent does not hold it.
    pub async fn delete(&self, id: SandboxId, grace: Option<Duration>) -> Result<(), AgentError> {
        self.addr
            .send(Delete { id, grace })
            .await
            .map_err(stopped)?
    }

    /// Every sandbox held, by id.
    pub async fn inventory(&self) -> Result<Vec<SandboxRecord>, AgentError> {
        self.addr.send(Inventory).await.map_err(stopped)
    }

    /// Phase changes from now on.
    pub async fn subscribe(&self) -> Result<broadcast::Receiver<PhaseChange>, AgentError> {
        self.addr.send(Subscribe).await.map_err(stopped)
    }

    /// Ids of every sandbox container of this agent in containerd, straight from
    /// containerd (not the agent's table): finds containers the table does not know.
    /// Unclaimed warm instances are the agent's own, not sandboxes, and are left out.
    /// Tasks are not asked for: the orphan scan calls this every few seconds.
    pub async fn containers(&self) -> Result<Vec<SandboxId>, AgentError> {
        Ok(self
            .runtime
            .list_labels(Some(self.agent_id.as_str()))
            .await?
            .into_iter()
            .filter(|c| !crate::actor::unclaimed_warm(&c.labels))
            .map(|c| c.id)
            .collect())
    }

    /// Stop keeping instances warm and remove them (on shutdown, when nothing is to
    /// be left behind): the ready ones, and those still starting once their start
    /// ends. A start cannot be cut short without leaving its container to containerd,
    /// so it is waited for, up to [`STOP_WARM_WAIT`] without any instance becoming
    /// ready (removing hundreds takes longer than that, and must not use the wait up).
    /// Removals run [`STOP_WARM_PARALLEL`] at a time. Returns how many were removed.
    pub async fn stop_warm(&self) -> Result<usize, AgentError> {
        let mut deadline = tokio::time::Instant::now() + STOP_WARM_WAIT;
        let mut removed = 0;
        loop {
            let (ready, starting) = self.addr.send(StopWarm).await.map_err(stopped)?;
            if !ready.is_empty() {
                let results: Vec<Result<bool, AgentError>> = futures::stream::iter(ready)
                    .map(|id| async move { self.runtime.remove(&id, Duration::ZERO).await })
                    .buffer_unordered(STOP_WARM_PARALLEL)
                    .collect()
                    .await;
                for result in results {
                    removed += usize::from(result?);
                }
                deadline = tokio::time::Instant::now() + STOP_WARM_WAIT;
            }
            if starting == 0 {
                return Ok(removed);
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(
                    starting,
                    "warm instances still starting at shutdown are left"
                );
                return Ok(removed);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Ready warm instances (key, id), oldest first per key: what reports offer the
    /// registry.
    pub async fn warm_instances(&self) -> Result<Vec<(WarmKey, SandboxId)>, AgentError> {
        self.addr.send(WarmInstances).await.map_err(stopped)
    }

    /// The image store (load, pull, list).
    pub fn images(&self) -> &ImageStore {
        &self.images
    }

    /// The containerd runtime (logs paths, exec).
    pub fn runtime(&self) -> &ContainerdRuntime {
        &self.runtime
    }
}

/// Keep every sandbox's log files under `max_bytes` (0: unbounded) and prune retained
/// logs past their retention. One pass at a time: a slow pass makes the next tick be
/// skipped, never queued. Ends when the agent stops.
fn spawn_log_limits(agent: AgentHandle, max_bytes: u64) {
    actix::spawn(async move {
        let mut tick = tokio::time::interval(LOG_CHECK_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tick.tick().await;
            let Ok(sandboxes) = agent.inventory().await else {
                return;
            };
            if let Err(e) = agent.runtime.prune_retained().await {
                tracing::warn!(error = %e, "pruning retained logs failed");
            }
            if max_bytes == 0 {
                continue;
            }
            for rec in sandboxes {
                let paths = agent.runtime.log_paths(&rec.id);
                match crate::logs::enforce_limit(&paths, max_bytes).await {
                    Ok(0) => {}
                    Ok(dropped) => tracing::info!(sandbox = %rec.id, dropped, "log rotated"),
                    Err(e) if e.is_not_found() => {}
                    Err(e) => {
                        tracing::warn!(sandbox = %rec.id, error = %e, "log size check failed")
                    }
                }
            }
        }
    });
}

fn stopped(_: actix::MailboxError) -> AgentError {
    AgentError::Unavailable("agent actor stopped".into())
}
