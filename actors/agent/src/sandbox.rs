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
use fsb_core::SandboxId;

use crate::{
    error::AgentError,
    image::ImageStore,
    msg::{CreatedSandbox, Start, Stop},
    oci::{self, ImageConfig, NetworkMode, SpecInput},
    runtime::{ContainerPlan, ContainerdRuntime},
};

pub(crate) struct SandboxActor {
    id: SandboxId,
    runtime: ContainerdRuntime,
    images: Arc<ImageStore>,
    network: NetworkMode,
    started: Option<CreatedSandbox>,
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
    ) -> Self {
        Self {
            id,
            runtime,
            images,
            network,
            started: None,
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
            self.network.clone(),
        );
        let work = async move { start(id, runtime, &images, network, msg).await };
        AtomicResponse::new(Box::pin(work.into_actor(self).map(|result, act, _ctx| {
            if let Ok(done) = &result {
                act.started = Some(done.clone());
            }
            result
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
    network: NetworkMode,
    msg: Start,
) -> Result<CreatedSandbox, AgentError> {
    let t = Instant::now();
    let image = images.resolve(&msg.spec.image).await?;
    let image_time = t.elapsed();

    let t = Instant::now();
    let config = ImageConfig::from_oci_config_json(&image.config_json)?;
    // Numeric users (and root) resolve alone; names need the image's passwd and group.
    let user = match oci::resolve_user(&config.user, None, None) {
        Ok(user) => user,
        Err(_) => {
            let files = runtime
                .read_image_files(&image.chain_id, &["etc/passwd", "etc/group"])
                .await?;
            oci::resolve_user(&config.user, files[0].as_deref(), files[1].as_deref())?
        }
    };
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
        read_only_rootfs: false,
    })?;
    let spec_json = serde_json::to_vec(&spec)
        .map_err(|e| AgentError::Internal(format!("encoding OCI spec: {e}")))?;
    let spec_time = t.elapsed();

    let plan = ContainerPlan {
        id: id.clone(),
        image: image.name.clone(),
        parent_snapshot: image.chain_id.clone(),
        labels: msg.labels,
        runtime: msg.runtime,
        spec_json,
        warm: false,
    };
    let started = runtime.create(&plan).await?;
    let t = started.timings;
    Ok(CreatedSandbox {
        id,
        pid: started.pid,
        stages: vec![
            ("image", image_time),
            ("spec", spec_time),
            ("snapshot", t.snapshot),
            ("container", t.container),
            ("task", t.task),
            ("start", t.start),
        ],
    })
}
