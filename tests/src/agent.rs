//! Agent fixtures shared by the agent tests: configurations pointing at the harness's
//! containerd, a minimal container plan for runtime-level tests, an exec drained to
//! its end, and a sandbox's cgroup files as the host sees them.

use std::{path::PathBuf, time::Duration};

use anyhow::{Context, Result, bail};
use fsb_agent::{
    AgentConfig, AgentError, DEFAULT_LOG_MAX_BYTES,
    containerd::{Containerd, ContainerdConfig, DEFAULT_CALL_TIMEOUT},
    exec::{ExecOutput, ExecSession},
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
        drop_capabilities: Default::default(),
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

/// What an exec wrote and how it ended.
#[derive(Debug)]
pub struct ExecResult {
    /// Everything written to stdout.
    pub stdout: String,
    /// Everything written to stderr.
    pub stderr: String,
    /// The exit code, or the error that ended the output.
    pub exit: Result<i32, AgentError>,
}

/// Drain `session` within `timeout`. An error if the output does not end, is not
/// UTF-8, lacks a final exit code or error, or goes on after it (the exec contract).
pub async fn exec_output(session: ExecSession, timeout: Duration) -> Result<ExecResult> {
    use futures::StreamExt;
    let mut output = session.output;
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let mut last = None;
    tokio::time::timeout(timeout, async {
        while let Some(item) = output.next().await {
            if last.is_some() {
                bail!("exec output went on after its exit code: {item:?}");
            }
            match item {
                Ok(ExecOutput::Stdout(b)) => out.extend_from_slice(&b),
                Ok(ExecOutput::Stderr(b)) => err.extend_from_slice(&b),
                Ok(ExecOutput::Exit(code)) => last = Some(Ok(code)),
                Err(e) => last = Some(Err(e)),
            }
        }
        Ok(())
    })
    .await
    .with_context(|| format!("exec output did not end within {timeout:?}"))??;
    Ok(ExecResult {
        stdout: String::from_utf8(out).context("exec stdout")?,
        stderr: String::from_utf8(err).context("exec stderr")?,
        exit: last.context("exec output ended without an exit code or error")?,
    })
}

/// A sandbox's cgroup file, trimmed: `/sys/fs/cgroup/<controller>/fast-sandbox/<id>/<v1>`
/// (cgroup v1, this machine), else `<v2>` in the unified hierarchy.
pub fn sandbox_cgroup_value(
    controller: &str,
    v1: &str,
    v2: &str,
    id: &SandboxId,
) -> Result<String> {
    let root = std::path::Path::new("/sys/fs/cgroup");
    let rel = std::path::Path::new("fast-sandbox").join(id.as_str());
    let value = std::fs::read_to_string(root.join(controller).join(&rel).join(v1))
        .or_else(|_| std::fs::read_to_string(root.join("unified").join(&rel).join(v2)))
        .with_context(|| format!("{controller} cgroup of {id}"))?;
    Ok(value.trim().to_owned())
}
