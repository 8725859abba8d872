//! Smoke test of the containerd path the agent will take, through `containerd-client`
//! only: resolve the image, prepare an overlayfs snapshot, create a container with a
//! hand-built OCI spec, run its task with stdout/stderr in files, wait, clean up.
//!
//! Needs the harness: `tests/run.sh containerd`.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use containerd_client::services::v1::containers_client::ContainersClient;
use containerd_client::services::v1::snapshots::PrepareSnapshotRequest;
use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::tasks_client::TasksClient;
use containerd_client::services::v1::{
    Container, CreateContainerRequest, CreateTaskRequest, DeleteContainerRequest,
    DeleteTaskRequest, GetContainerRequest, StartRequest, WaitRequest,
};
use containerd_client::tonic::Code;
use containerd_client::tonic::transport::Channel;
use fsb_core::labels::{LABEL_ID, LABEL_MANAGED};
use fsb_tests::{
    ContainerdEnv, TestRuntime, minimal_oci_spec as oci_spec, resolve_image, unique_id,
};

/// Type URL containerd gives the OCI runtime spec in `Container.spec`.
const SPEC_TYPE_URL: &str = "types.containerd.io/opencontainers/runtime-spec/1/Spec";

/// What one run produced.
#[derive(Debug)]
struct Outcome {
    exit_status: u32,
    stdout: String,
    stderr: String,
    /// Entries in the runtime's state dir named after the container, seen while the
    /// task existed: proves which runtime binary ran it.
    runtime_state: Vec<String>,
    elapsed: Duration,
}

/// Runs `sh -c "echo hello-from-fsb; echo err >&2"` in a fresh container on
/// `runtime` and tears everything down again.
async fn run_echo(env: &ContainerdEnv, channel: &Channel, runtime: TestRuntime) -> Result<Outcome> {
    let id = unique_id();
    let result = run_echo_steps(env, channel, runtime, &id).await;
    // Cleanup before anything is asserted, and whatever the steps did or did not do.
    let cleanup = env.remove_container(channel, &id).await;
    let outcome = result?;
    cleanup?;

    // Gone means gone: Get answers NotFound.
    let get = ContainersClient::new(channel.clone())
        .get(env.request(GetContainerRequest { id: id.clone() }))
        .await;
    match get {
        Err(status) => ensure!(
            status.code() == Code::NotFound,
            "get of deleted container {id}: {status}"
        ),
        Ok(_) => anyhow::bail!("container {id} still exists after delete"),
    }
    Ok(outcome)
}

async fn run_echo_steps(
    env: &ContainerdEnv,
    channel: &Channel,
    runtime: TestRuntime,
    id: &str,
) -> Result<Outcome> {
    let started = Instant::now();
    let image = resolve_image(env, channel, &env.image).await?;

    // The container's writable layer, on top of the image's top layer, under a lease
    // so the GC cannot take it before the container references it.
    env.create_lease(channel, id).await?;
    let mounts = SnapshotsClient::new(channel.clone())
        .prepare(env.leased_request(
            PrepareSnapshotRequest {
                snapshotter: "overlayfs".into(),
                key: id.to_owned(),
                parent: image.chain_id.clone(),
                labels: HashMap::new(),
            },
            id,
        )?)
        .await
        .with_context(|| format!("preparing snapshot {id} from {}", image.chain_id))?
        .into_inner()
        .mounts;

    let spec = oci_spec(
        id,
        &["sh", "-c", "echo hello-from-fsb; echo err >&2"],
        &image.env(),
        &image.working_dir(),
        &env.namespace,
    );
    let container = Container {
        id: id.to_owned(),
        labels: HashMap::from([
            (LABEL_MANAGED.to_owned(), "true".to_owned()),
            (LABEL_ID.to_owned(), id.to_owned()),
        ]),
        image: image.name.clone(),
        runtime: Some(env.container_runtime(runtime)),
        spec: Some(prost_types::Any {
            type_url: SPEC_TYPE_URL.into(),
            value: serde_json::to_vec(&spec)?,
        }),
        snapshotter: "overlayfs".into(),
        snapshot_key: id.to_owned(),
        ..Container::default()
    };
    ContainersClient::new(channel.clone())
        .create(env.request(CreateContainerRequest {
            container: Some(container),
        }))
        .await
        .with_context(|| format!("creating container {id}"))?;

    // stdout/stderr: plain paths of regular files. containerd 1.6's runc shim treats a
    // scheme-less path as a "fifo" and copies the process's pipes into it with an
    // ordinary open(O_WRONLY), which works for a regular file too, so no FIFO reader
    // has to live in the test. (`file://` would also work but sends stdout and stderr
    // to one file; `binary://` runs a logging binary.) The copy has finished once
    // Tasks.Delete returns: the shim waits for its I/O before answering, so the files
    // are read after the delete.
    let io = env.io_dir(id)?;
    let (stdout_path, stderr_path) = (io.join("stdout"), io.join("stderr"));
    for path in [&stdout_path, &stderr_path] {
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    }

    let mut tasks = TasksClient::new(channel.clone());
    tasks
        .create(env.request(CreateTaskRequest {
            container_id: id.to_owned(),
            rootfs: mounts,
            stdout: stdout_path.display().to_string(),
            stderr: stderr_path.display().to_string(),
            ..CreateTaskRequest::default()
        }))
        .await
        .with_context(|| format!("creating task {id}"))?;

    // Wait is subscribed before Start, so even an instant exit cannot be missed.
    let wait = {
        let mut tasks = tasks.clone();
        let req = env.request(WaitRequest {
            container_id: id.to_owned(),
            exec_id: String::new(),
        });
        tokio::spawn(async move { tasks.wait(req).await })
    };
    tasks
        .start(env.request(StartRequest {
            container_id: id.to_owned(),
            exec_id: String::new(),
        }))
        .await
        .with_context(|| format!("starting task {id}"))?;
    let exit_status = tokio::time::timeout(Duration::from_secs(30), wait)
        .await
        .context("task did not exit within 30s")??
        .with_context(|| format!("waiting for task {id}"))?
        .into_inner()
        .exit_status;
    let elapsed = started.elapsed();

    let runtime_state = state_entries(&env.runtime_state_dir(runtime), id);

    tasks
        .delete(env.request(DeleteTaskRequest {
            container_id: id.to_owned(),
        }))
        .await
        .with_context(|| format!("deleting task {id}"))?;
    ContainersClient::new(channel.clone())
        .delete(env.request(DeleteContainerRequest { id: id.to_owned() }))
        .await
        .with_context(|| format!("deleting container {id}"))?;
    // The snapshot (keyed by the id) goes in the common cleanup.

    Ok(Outcome {
        exit_status,
        stdout: std::fs::read_to_string(&stdout_path)?,
        stderr: std::fs::read_to_string(&stderr_path)?,
        runtime_state,
        elapsed,
    })
}

fn state_entries(dir: &Path, id: &str) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|name| name.starts_with(id))
                .collect()
        })
        .unwrap_or_default()
}

async fn smoke(runtime: TestRuntime) -> Result<()> {
    let env = ContainerdEnv::from_env();
    let channel = env.connect().await?;
    let outcome = run_echo(&env, &channel, runtime).await?;
    eprintln!(
        "{runtime:?}: resolve + create + run + exit in {:?}: {outcome:?}",
        outcome.elapsed
    );
    ensure!(outcome.exit_status == 0, "exit status: {outcome:?}");
    ensure!(
        outcome.stdout.contains("hello-from-fsb"),
        "stdout: {outcome:?}"
    );
    ensure!(outcome.stderr.trim() == "err", "stderr: {outcome:?}");
    ensure!(
        !outcome.runtime_state.is_empty(),
        "no container state under {}: the runtime options were not honoured",
        env.runtime_state_dir(runtime).display()
    );
    Ok(())
}

#[tokio::test]
async fn runc_runs_a_container_and_cleans_up() -> Result<()> {
    smoke(TestRuntime::Runc).await
}

#[tokio::test]
async fn crun_runs_a_container_and_cleans_up() -> Result<()> {
    smoke(TestRuntime::Crun).await
}

/// gVisor through the runc shim, `runsc --network=none` (see tests/scripts/containerd.sh).
#[tokio::test]
async fn gvisor_runs_a_container_and_cleans_up() -> Result<()> {
    smoke(TestRuntime::Gvisor).await
}
