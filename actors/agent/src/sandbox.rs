//! SandboxActor: one per sandbox, so operations on a sandbox run one at a time in
//! mailbox order (a delete that arrives mid-create runs after the create finished,
//! and removes what it made). Handlers are atomic: no other message of this sandbox
//! is handled while containerd works.
//!
//! Restart rule: the actor holds no state that containerd does not; a new actor for
//! the same id (after an agent restart) simply acts on what containerd has.

use std::{sync::Arc, time::Instant};

use actix::{
    Actor, ActorContext, ActorFutureExt, AtomicResponse, Context, Handler, Supervised, WrapFuture,
};
use std::time::Duration;

use fsb_core::{
    SandboxId,
    capability::CapabilityDrop,
    spec::{Runtime, SandboxSpec, SpecLimits},
};
use tracing::Instrument;

use crate::{
    error::AgentError,
    image::ImageStore,
    inject::InjectedMount,
    msg::{CreatedSandbox, Start, StartHow, StartWarm, Stop},
    oci::{self, ImageConfig, NetworkMode, SpecInput},
    runtime::{ContainerPlan, ContainerdRuntime},
    userns, warm,
};

/// A started warm instance: its image's config and user, and fsb-init's host pid.
#[derive(Debug)]
struct WarmReady {
    config: ImageConfig,
    user: (u32, u32),
    pid: u32,
}

/// Where fsb-init is mounted in a warm instance.
pub(crate) const INIT_PATH: &str = "/.fsb/init";
/// How long a claimed instance has to report its process started.
const HANDOVER_TIMEOUT: Duration = Duration::from_secs(5);

pub(crate) struct SandboxActor {
    id: SandboxId,
    runtime: ContainerdRuntime,
    images: Arc<ImageStore>,
    network: NetworkMode,
    drop_capabilities: CapabilityDrop,
    started: Option<CreatedSandbox>,
    /// A warm instance made by this actor, ready: a claim needs no image lookup.
    warm: Option<WarmReady>,
}

impl std::fmt::Debug for SandboxActor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SandboxActor")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl SandboxActor {
    pub(crate) fn new(
        id: SandboxId,
        runtime: ContainerdRuntime,
        images: Arc<ImageStore>,
        network: NetworkMode,
        drop_capabilities: CapabilityDrop,
    ) -> Self {
        Self {
            id,
            runtime,
            images,
            network,
            drop_capabilities,
            started: None,
            warm: None,
        }
    }
}

impl Actor for SandboxActor {
    type Context = Context<Self>;
}

/// Runs under an actix `Supervisor`: a failed stop leaves the sandbox in an unknown
/// state, so the actor stops and is restarted with nothing cached; the next delete
/// acts on what containerd holds.
impl Supervised for SandboxActor {
    fn restarting(&mut self, _ctx: &mut Self::Context) {
        tracing::warn!(sandbox = %self.id, "sandbox actor restarting after a failed stop");
        self.started = None;
        self.warm = None;
    }
}

impl Handler<Start> for SandboxActor {
    type Result = AtomicResponse<Self, Result<CreatedSandbox, AgentError>>;

    fn handle(&mut self, msg: Start, _ctx: &mut Self::Context) -> Self::Result {
        if let Some(done) = &self.started {
            let done = done.clone();
            return AtomicResponse::new(Box::pin(async move { Ok(done) }.into_actor(self)));
        }
        let (id, runtime, images, network) = (
            self.id.clone(),
            self.runtime.clone(),
            self.images.clone(),
            (self.network.clone(), self.drop_capabilities.clone()),
        );
        let warm = self.warm.take();
        let span = tracing::info_span!(parent: &msg.span, "agent.start", sandbox = %id, how = msg.how.label());
        let work = async move {
            match msg.how.clone() {
                StartHow::Cold(note) => start(id, runtime, &images, network, msg, note).await,
                StartHow::Replace(note) => {
                    runtime.remove(&id, Duration::ZERO).await?;
                    start(id, runtime, &images, network, msg, note).await
                }
                StartHow::Claim => match claim(&id, &runtime, &images, warm, &msg).await {
                    Ok(done) => Ok(done),
                    Err(e) => {
                        // A spent or broken instance: replace it by a cold create under
                        // the same id, so the caller still gets its sandbox.
                        tracing::warn!(sandbox = %id, error = %e, "warm claim failed; creating cold");
                        runtime.remove(&id, Duration::ZERO).await?;
                        let note = format!("cold: warm claim failed: {e}");
                        start(id, runtime, &images, network, msg, note).await
                    }
                },
            }
        }
        .instrument(span);
        AtomicResponse::new(Box::pin(work.into_actor(self).map(|result, act, _ctx| {
            if let Ok(done) = &result {
                act.started = Some(done.clone());
            }
            result
        })))
    }
}

impl Handler<StartWarm> for SandboxActor {
    type Result = AtomicResponse<Self, Result<u32, AgentError>>;

    fn handle(&mut self, msg: StartWarm, _ctx: &mut Self::Context) -> Self::Result {
        let (id, runtime, images) = (self.id.clone(), self.runtime.clone(), self.images.clone());
        let drop = self.drop_capabilities.clone();
        let work = async move { start_warm(&id, &runtime, &images, msg, drop).await };
        AtomicResponse::new(Box::pin(work.into_actor(self).map(|result, act, _ctx| {
            result.map(|ready| {
                let pid = ready.pid;
                act.warm = Some(ready);
                pid
            })
        })))
    }
}

impl Handler<Stop> for SandboxActor {
    type Result = AtomicResponse<Self, Result<bool, AgentError>>;

    fn handle(&mut self, msg: Stop, _ctx: &mut Self::Context) -> Self::Result {
        let (id, runtime) = (self.id.clone(), self.runtime.clone());
        let work = async move { runtime.remove(&id, msg.grace).await };
        AtomicResponse::new(Box::pin(work.into_actor(self).map(|result, act, ctx| {
            match &result {
                Ok(_) => act.started = None,
                Err(_) => ctx.stop(),
            }
            result
        })))
    }
}

/// Resolve the image, write the OCI spec, create and start the container.
async fn start(
    id: SandboxId,
    runtime: ContainerdRuntime,
    images: &ImageStore,
    (network, drop_capabilities): (NetworkMode, CapabilityDrop),
    msg: Start,
    note: String,
) -> Result<CreatedSandbox, AgentError> {
    let t = Instant::now();
    let image = images.resolve(&msg.spec.image).await?;
    let image_time = t.elapsed();

    // A user namespace: the rootfs comes from the image remapped to its host ids.
    let t = Instant::now();
    let (parent_snapshot, remap_note) = if msg.spec.user_namespace {
        let (key, made) = userns::remapped_parent(
            runtime.containerd(),
            images,
            &image,
            userns::MAPPING,
            &runtime.scratch_dir(),
        )
        .await?;
        (key, made.then_some("image remapped for user namespaces"))
    } else {
        (image.chain_id.clone(), None)
    };
    let remap_time = t.elapsed();

    let network = if msg.spec.user_namespace && msg.runtime == Runtime::Runc {
        // runc 1.1 cannot exec into a sandbox whose user namespace does not own its
        // network namespace (it joins the user namespace first, then setns into the
        // shared one fails with EPERM; runc#4390, fixed in 1.2): one of its own.
        NetworkMode::Isolated
    } else {
        network
    };
    let t = Instant::now();
    let (config, user) = image_user(&runtime, &image).await?;
    let spec = oci::build_spec(&SpecInput {
        sandbox_id: &id,
        spec: &msg.spec,
        image: &config,
        runtime: msg.runtime,
        network,
        cgroups_path: format!("/fast-sandbox/{id}"),
        hostname: msg.hostname,
        user,
        mounts: Vec::new(),
        read_only_rootfs: msg.spec.read_only_rootfs,
        user_namespace: msg.spec.user_namespace.then_some(userns::MAPPING),
        drop_capabilities,
    })?;
    let spec_json = serde_json::to_vec(&spec)
        .map_err(|e| AgentError::Internal(format!("encoding OCI spec: {e}")))?;
    let spec_time = t.elapsed();

    let plan = ContainerPlan {
        id: id.clone(),
        image: image.name.clone(),
        parent_snapshot,
        labels: msg.labels,
        runtime: msg.runtime,
        spec_json,
        warm: false,
    };
    let started = runtime.create(&plan).await?;
    let started_unix_us = unix_us_now();
    let t = started.timings;
    let mut stages = vec![("image", image_time)];
    if msg.spec.user_namespace {
        stages.push(("remap", remap_time));
    }
    let note = match remap_note {
        Some(remap) if note.is_empty() => remap.to_owned(),
        Some(remap) => format!("{note}; {remap}"),
        None => note,
    };
    stages.extend([
        ("spec", spec_time),
        ("snapshot", t.snapshot),
        ("container", t.container),
        ("task", t.task),
        ("start", t.start),
    ]);
    Ok(CreatedSandbox {
        id,
        pid: started.pid,
        stages,
        warm: false,
        note,
        started_unix_us,
    })
}

/// The image's config and its user as uid/gid. Numeric users (and root) resolve
/// alone; names need the image's passwd and group.
async fn image_user(
    runtime: &ContainerdRuntime,
    image: &crate::image::ResolvedImage,
) -> Result<(ImageConfig, (u32, u32)), AgentError> {
    let config = ImageConfig::from_oci_config_json(&image.config_json)?;
    let user = match oci::resolve_user(&config.user, None, None) {
        Ok(user) => user,
        Err(_) => {
            let files = runtime
                .read_image_files(&image.chain_id, &["etc/passwd", "etc/group"])
                .await?;
            oci::resolve_user(&config.user, files[0].as_deref(), files[1].as_deref())?
        }
    };
    Ok((config, user))
}

/// Create and start a warm instance of `msg.key`: the image's root filesystem with
/// fsb-init (mounted read-only) as PID 1, root, waiting on its stdin FIFO for the
/// process. No resource limits beyond the defaults: a claim sets the create's own.
async fn start_warm(
    id: &SandboxId,
    runtime: &ContainerdRuntime,
    images: &ImageStore,
    msg: StartWarm,
    drop_capabilities: CapabilityDrop,
) -> Result<WarmReady, AgentError> {
    let image = images.resolve(&msg.key.image).await?;
    let (config, user) = image_user(runtime, &image).await?;
    let spec = SandboxSpec {
        namespace: "warm".into(),
        pool_ref: "warm".into(),
        image: msg.key.image.to_string(),
        command: vec![INIT_PATH.into()],
        ..SandboxSpec::default()
    }
    .validate(&SpecLimits::default())
    .map_err(|e| AgentError::Internal(format!("warm instance spec: {e}")))?;
    let oci_spec = oci::build_spec(&SpecInput {
        sandbox_id: id,
        spec: &spec,
        image: &config,
        runtime: msg.key.runtime,
        network: msg.network,
        cgroups_path: format!("/fast-sandbox/{id}"),
        hostname: id.as_str()[..12].to_owned(),
        user: (0, 0),
        mounts: vec![InjectedMount {
            source: msg.init,
            destination: INIT_PATH.into(),
        }],
        read_only_rootfs: false,
        user_namespace: None,
        // The instance's PID 1 already has the reduced set; the claimed process
        // inherits it (the bounding set cannot grow back).
        drop_capabilities,
    })?;
    let plan = ContainerPlan {
        id: id.clone(),
        image: image.name.clone(),
        parent_snapshot: image.chain_id.clone(),
        labels: msg.labels,
        runtime: msg.key.runtime,
        spec_json: serde_json::to_vec(&oci_spec)
            .map_err(|e| AgentError::Internal(format!("encoding OCI spec: {e}")))?,
        warm: true,
    };
    let started = runtime.create(&plan).await?;
    Ok(WarmReady {
        config,
        user,
        pid: started.pid,
    })
}

/// Hand the create's process to the warm instance `id`: its limits (task update), the
/// claim recorded with the sandbox's labels, then the process spec to fsb-init. Done
/// when fsb-init reports the process started; the labels reach containerd after.
async fn claim(
    id: &SandboxId,
    runtime: &ContainerdRuntime,
    images: &ImageStore,
    warm: Option<WarmReady>,
    msg: &Start,
) -> Result<CreatedSandbox, AgentError> {
    let t = Instant::now();
    let (config, user, pid) = match warm {
        Some(w) => (w.config, w.user, w.pid),
        // Adopted after an agent restart: look the image up again (pid unknown, 0).
        None => {
            let (config, user) =
                image_user(runtime, &images.resolve(&msg.spec.image).await?).await?;
            (config, user, 0)
        }
    };
    let process = warm::init_spec(&msg.spec, &config, user)?;
    let claim_time = t.elapsed();

    let t = Instant::now();
    if msg.spec.limited() {
        runtime
            .update_limits(id, &oci::limits(&msg.spec, msg.runtime)?)
            .await?;
    }
    let limits_time = t.elapsed();

    let mut labels = msg.labels.clone();
    labels.insert(crate::actor::LABEL_WARM.to_owned(), String::new());
    runtime.record_claim(id, &labels).await?;

    let t = Instant::now();
    let sent_us = unix_us_now();
    // runc and crun run fsb-init as a host process whose stdin is the shim's pipe.
    let init_pid = (pid != 0 && msg.runtime != Runtime::Gvisor).then_some(pid);
    let report = runtime
        .hand_over(id, init_pid, &process, HANDOVER_TIMEOUT)
        .await?;
    let handover = t.elapsed();
    // containerd's copy of the labels follows (the claim file stands for it until then).
    runtime.set_labels_later(id.clone(), labels);

    let us = |from: u64, to: u64| Duration::from_micros(to.saturating_sub(from));
    let mut stages = vec![
        ("claim", claim_time),
        ("limits", limits_time),
        ("handover", handover),
    ];
    if report.spec_us > 0 {
        // Where the handover went: to fsb-init, to the process, back to us.
        stages.extend([
            ("handover.deliver", us(sent_us, report.spec_us)),
            ("handover.spawn", us(report.spec_us, report.unix_us)),
            (
                "handover.report",
                us(report.unix_us, sent_us.saturating_add(micros(handover))),
            ),
        ]);
    }
    Ok(CreatedSandbox {
        id: id.clone(),
        pid,
        stages,
        warm: true,
        note: String::new(),
        started_unix_us: report.unix_us,
    })
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

fn unix_us_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}
