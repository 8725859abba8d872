//! Agent fixtures shared by the agent tests: configurations pointing at the harness's
//! containerd, and a minimal container plan for runtime-level tests.

use std::{path::PathBuf, time::Duration};

use anyhow::Result;
use fsb_agent::{
    AgentConfig, DEFAULT_LOG_MAX_BYTES,
    containerd::{Containerd, ContainerdConfig, DEFAULT_CALL_TIMEOUT},
    image::RegistryOptions,
    oci::NetworkMode,
    runtime::{ContainerPlan, ContainerdRuntime},
};
use fsb_core::{AgentId, SandboxId, spec::Runtime};

use crate::{ContainerdEnv, minimal_oci_spec, resolve_image};

/// The harness's containerd, as the agent connects to it.
pub fn containerd_config(env: &ContainerdEnv) -> ContainerdConfig {
    ContainerdConfig {
        socket: env.socket.clone(),
        namespace: env.namespace.clone(),
        call_timeout: DEFAULT_CALL_TIMEOUT,
        runtime_root: env.runtime_root.clone(),
        runsc_binary: env.runsc.clone(),
    }
}

/// An agent `agent` with `capacity` slots, logs under `<run dir>/agent-logs/<agent>`,
/// sandboxes joining the test process's network namespace.
pub fn agent_config(env: &ContainerdEnv, agent: &str, capacity: u32) -> AgentConfig {
    AgentConfig {
        agent_id: AgentId::from(agent),
        containerd: containerd_config(env),
        log_dir: env.run_dir.join("agent-logs").join(agent),
        capacity,
        network: NetworkMode::Join(PathBuf::from(format!(
            "/proc/{}/ns/net",
            std::process::id()
        ))),
        default_runtime: Runtime::Runc,
        stop_grace: Duration::from_secs(5),
        registry: RegistryOptions::default(),
        log_max_bytes: DEFAULT_LOG_MAX_BYTES,
        log_retention: Duration::ZERO,
        warm: fsb_agent::warm::WarmConfig::default(),
    }
}

/// The agent's container runtime on the harness's containerd (logs under
/// `<run dir>/agent-logs`).
pub async fn container_runtime(env: &ContainerdEnv) -> Result<ContainerdRuntime> {
    let cd = Containerd::connect(containerd_config(env)).await?;
    Ok(ContainerdRuntime::new(cd, env.run_dir.join("agent-logs")))
}

/// A plan running `sh -c script` from the test image with [`minimal_oci_spec`].
pub async fn shell_plan(
    env: &ContainerdEnv,
    rt: &ContainerdRuntime,
    runtime: Runtime,
    script: &str,
) -> Result<ContainerPlan> {
    let channel = rt.containerd().channel();
    let image = resolve_image(env, &channel, &env.image).await?;
    let id = SandboxId::generate();
    let spec = minimal_oci_spec(
        id.as_str(),
        &["sh", "-c", script],
        &image.env(),
        "/",
        &env.namespace,
    );
    Ok(ContainerPlan {
        id,
        image: image.name.clone(),
        parent_snapshot: image.chain_id.clone(),
        labels: [("fast-sandbox.io/namespace".to_owned(), "default".to_owned())].into(),
        runtime,
        spec_json: serde_json::to_vec(&spec)?,
        warm: false,
    })
}
