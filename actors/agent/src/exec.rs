//! Exec into a running sandbox through containerd's task Exec.
//!
//! [`exec`] builds the exec process spec from the container's own process spec (from
//! its containerd record) with args, env, cwd and terminal replaced, creates FIFOs in
//! a per-exec directory `<sandbox log dir>/exec/<exec id>/`, starts the process and
//! hands back an [`ExecSession`]: an optional stdin writer, a stream of output that
//! ends with the exit code, and a resize handle for terminals. A task of its own
//! drives the rest: it waits for the exit (Tasks.Wait with the exec id), drains the
//! output, deletes the exec process (Tasks.DeleteProcess) and removes the FIFOs,
//! whether the caller keeps reading or not. If the caller drops the output stream
//! while the process runs, the process is killed (SIGKILL) and cleaned up the same way.
//!
//! How the FIFOs meet the shim (containerd 1.6's runc shim, `pkg/process`): the shim
//! opens stdout/stderr for writing with a blocking open before Start returns, and also
//! opens each for reading itself (so it never gets SIGPIPE); we open our reading ends
//! before Exec, so the shim's open completes at once, and read only after Start
//! (before that, a FIFO without writers reads as end-of-file). For stdin the shim
//! keeps a writer of its own until Tasks.CloseIO, so ending stdin takes
//! [`ExecStdin::close`] (dropping it does the same in the background).
//!
//! Ordering: each stream's bytes arrive in order, in chunks of at most 64 KiB;
//! interleaving between stdout and stderr is best effort. [`ExecOutput::Exit`] is the
//! last item after all output the shim delivered; an `Err` item instead means the
//! exec failed after it started (its process has then been killed and removed).

use std::{
    path::{Path, PathBuf},
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use containerd_client::services::v1::{
    CloseIoRequest, DeleteProcessRequest, ExecProcessRequest, GetContainerRequest, KillRequest,
    ResizePtyRequest, StartRequest, WaitRequest, containers_client::ContainersClient,
    tasks_client::TasksClient,
};
use fsb_core::SandboxId;
use tokio::{io::AsyncReadExt, net::unix::pipe, sync::mpsc, task::JoinHandle};
use tokio_stream::wrappers::ReceiverStream;

use crate::{containerd::Containerd, error::AgentError, runtime::ContainerdRuntime};

/// Type URL of an OCI process spec in an exec request.
const PROCESS_TYPE_URL: &str = "types.containerd.io/opencontainers/runtime-spec/1/Process";
/// Longest run of an exec whose request sets no timeout.
pub const DEFAULT_EXEC_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
/// After the exit, how long the output may take to reach end-of-file before the exec
/// process is deleted anyway (deleting closes the shim's side).
const DRAIN_GRACE: Duration = Duration::from_secs(2);
/// After delete, how long to wait for the readers before abandoning them.
const DRAIN_AFTER_DELETE: Duration = Duration::from_secs(2);
/// After SIGKILL, how long to wait for the exit.
const KILL_WAIT: Duration = Duration::from_secs(10);
const SIGKILL: u32 = 9;
/// Output items buffered between the readers and the caller.
const OUTPUT_BUFFER: usize = 16;
const CHUNK: usize = 64 * 1024;

/// What to run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExecRequest {
    /// Program and arguments (non-empty; resolved in the container's `PATH`).
    pub args: Vec<String>,
    /// `NAME=value` entries added to the container's environment (same name replaces).
    pub env: Vec<String>,
    /// Working directory (absolute); `None` keeps the container's.
    pub cwd: Option<String>,
    /// Run under a terminal: stdout carries both streams, resize works.
    pub tty: bool,
    /// Give the process a stdin ([`ExecSession::stdin`]); otherwise it reads `/dev/null`.
    pub stdin: bool,
    /// Kill the process after this long ([`DEFAULT_EXEC_TIMEOUT`] if `None`).
    pub timeout: Option<Duration>,
}

/// One item of an exec's output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExecOutput {
    /// Bytes written to stdout (or to the terminal, with `tty`).
    Stdout(Bytes),
    /// Bytes written to stderr.
    Stderr(Bytes),
    /// The process exited with this status (128 + signal if killed); always last.
    Exit(i32),
}

/// A started exec.
#[derive(Debug)]
pub struct ExecSession {
    /// containerd's id of the exec process.
    pub exec_id: String,
    /// Writer to the process's stdin, if requested.
    pub stdin: Option<ExecStdin>,
    /// Output in order, then [`ExecOutput::Exit`].
    pub output: ReceiverStream<Result<ExecOutput, AgentError>>,
    /// Terminal resize, with `tty`.
    pub resize: Option<ExecResize>,
}

/// Which exec process a handle talks to.
#[derive(Clone, Debug)]
struct ExecTarget {
    cd: Containerd,
    container_id: String,
    exec_id: String,
}

impl ExecTarget {
    async fn close_stdin(&self) -> Result<(), AgentError> {
        let req = CloseIoRequest {
            container_id: self.container_id.clone(),
            exec_id: self.exec_id.clone(),
            stdin: true,
        };
        self.cd
            .call(
                "close exec stdin",
                TasksClient::new(self.cd.channel()).close_io(self.cd.request(req)),
            )
            .await
            .map(|_| ())
    }

    async fn kill(&self) -> Result<(), AgentError> {
        let req = KillRequest {
            container_id: self.container_id.clone(),
            exec_id: self.exec_id.clone(),
            signal: SIGKILL,
            all: false,
        };
        match self
            .cd
            .call(
                "kill exec",
                TasksClient::new(self.cd.channel()).kill(self.cd.request(req)),
            )
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if e.is_not_found() => Ok(()),
            Err(AgentError::Containerd {
                code: tonic::Code::FailedPrecondition,
                ..
            }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn wait(&self, timeout: Duration) -> Result<u32, AgentError> {
        let req = self.cd.request_with_timeout(
            WaitRequest {
                container_id: self.container_id.clone(),
                exec_id: self.exec_id.clone(),
            },
            timeout,
        );
        self.cd
            .call_with_timeout(
                "wait exec",
                timeout,
                TasksClient::new(self.cd.channel()).wait(req),
            )
            .await
            .map(|r| r.exit_status)
    }

    async fn delete(&self) -> Result<(), AgentError> {
        let req = DeleteProcessRequest {
            container_id: self.container_id.clone(),
            exec_id: self.exec_id.clone(),
        };
        match self
            .cd
            .call(
                "delete exec",
                TasksClient::new(self.cd.channel()).delete_process(self.cd.request(req)),
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// The exec's stdin: an [`tokio::io::AsyncWrite`]. End it with [`Self::close`]; the
/// process sees end-of-file only then (dropping it closes in the background).
#[derive(Debug)]
pub struct ExecStdin {
    pipe: Option<pipe::Sender>,
    target: Option<ExecTarget>,
}

impl ExecStdin {
    /// Close stdin: the process reads end-of-file after what was written.
    pub async fn close(mut self) -> Result<(), AgentError> {
        self.pipe = None;
        match self.target.take() {
            Some(target) => target.close_stdin().await,
            None => Ok(()),
        }
    }
}

impl Drop for ExecStdin {
    fn drop(&mut self) {
        self.pipe = None;
        if let Some(target) = self.target.take()
            && let Ok(handle) = tokio::runtime::Handle::try_current()
        {
            handle.spawn(async move {
                if let Err(e) = target.close_stdin().await
                    && !e.is_not_found()
                {
                    tracing::debug!(exec = %target.exec_id, error = %e, "closing exec stdin");
                }
            });
        }
    }
}

fn closed_stdin() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::BrokenPipe, "exec stdin closed")
}

impl tokio::io::AsyncWrite for ExecStdin {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.pipe.as_mut() {
            Some(p) => Pin::new(p).poll_write(cx, buf),
            None => Poll::Ready(Err(closed_stdin())),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.pipe.as_mut() {
            Some(p) => Pin::new(p).poll_flush(cx),
            None => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.pipe.as_mut() {
            Some(p) => Pin::new(p).poll_shutdown(cx),
            None => Poll::Ready(Ok(())),
        }
    }
}

/// Resizes the exec's terminal.
#[derive(Clone, Debug)]
pub struct ExecResize {
    target: ExecTarget,
}

impl ExecResize {
    /// Set the terminal size in columns and rows.
    pub async fn resize(&self, width: u32, height: u32) -> Result<(), AgentError> {
        let req = ResizePtyRequest {
            container_id: self.target.container_id.clone(),
            exec_id: self.target.exec_id.clone(),
            width,
            height,
        };
        self.target
            .cd
            .call(
                "resize exec pty",
                TasksClient::new(self.target.cd.channel()).resize_pty(self.target.cd.request(req)),
            )
            .await
            .map(|_| ())
    }
}

/// Our ends of the exec's FIFOs.
struct Fifos {
    dir: PathBuf,
    stdin: Option<(PathBuf, pipe::Sender)>,
    stdout: (PathBuf, pipe::Receiver),
    stderr: Option<(PathBuf, pipe::Receiver)>,
}

/// Run `request` in sandbox `id`'s running task. `NotFound` if the sandbox does not
/// exist; containerd's error (FailedPrecondition or NotFound) if it has no running
/// task; `InvalidArgument` for empty args or a relative cwd.
pub async fn exec(
    runtime: &ContainerdRuntime,
    id: &SandboxId,
    request: ExecRequest,
) -> Result<ExecSession, AgentError> {
    if request.args.is_empty() {
        return Err(AgentError::InvalidArgument(
            "exec args must not be empty".to_owned(),
        ));
    }
    if let Some(cwd) = &request.cwd
        && !cwd.starts_with('/')
    {
        return Err(AgentError::InvalidArgument(format!(
            "exec cwd {cwd:?} must be absolute"
        )));
    }
    let cd = runtime.containerd().clone();
    let container = match cd
        .call(
            "get container",
            ContainersClient::new(cd.channel()).get(cd.request(GetContainerRequest {
                id: id.as_str().to_owned(),
            })),
        )
        .await
    {
        Ok(resp) => resp.container,
        Err(e) if e.is_not_found() => None,
        Err(e) => return Err(e),
    }
    .ok_or_else(|| AgentError::NotFound(format!("sandbox {id}")))?;
    let spec = container
        .spec
        .ok_or_else(|| AgentError::Internal(format!("container {id} has no spec")))?;
    let process = exec_process_spec(&spec.value, &request)?;

    let exec_id = SandboxId::generate().as_str().to_owned();
    let dir = runtime.log_paths(id).dir.join("exec").join(&exec_id);
    let fifos = match make_fifos(&dir, &request).await {
        Ok(f) => f,
        Err(e) => {
            remove_dir(&dir).await;
            return Err(e);
        }
    };
    let target = ExecTarget {
        cd: cd.clone(),
        container_id: id.as_str().to_owned(),
        exec_id: exec_id.clone(),
    };
    let req = ExecProcessRequest {
        container_id: id.as_str().to_owned(),
        stdin: fifos
            .stdin
            .as_ref()
            .map(|(p, _)| p.display().to_string())
            .unwrap_or_default(),
        stdout: fifos.stdout.0.display().to_string(),
        stderr: fifos
            .stderr
            .as_ref()
            .map(|(p, _)| p.display().to_string())
            .unwrap_or_default(),
        terminal: request.tty,
        spec: Some(prost_types::Any {
            type_url: PROCESS_TYPE_URL.to_owned(),
            value: process,
        }),
        exec_id: exec_id.clone(),
    };
    if let Err(e) = cd
        .call("exec", TasksClient::new(cd.channel()).exec(cd.request(req)))
        .await
    {
        remove_dir(&dir).await;
        return Err(e);
    }
    let start = StartRequest {
        container_id: id.as_str().to_owned(),
        exec_id: exec_id.clone(),
    };
    if let Err(e) = cd
        .call(
            "start exec",
            TasksClient::new(cd.channel()).start(cd.request(start)),
        )
        .await
    {
        if let Err(cleanup) = target.delete().await {
            tracing::warn!(sandbox = %id, exec = %exec_id, error = %cleanup, "deleting a failed exec");
        }
        remove_dir(&dir).await;
        return Err(e);
    }

    let (tx, rx) = mpsc::channel(OUTPUT_BUFFER);
    let mut readers = vec![tokio::spawn(pump(
        fifos.stdout.1,
        ExecOutput::Stdout,
        tx.clone(),
    ))];
    if let Some((_, r)) = fifos.stderr {
        readers.push(tokio::spawn(pump(r, ExecOutput::Stderr, tx.clone())));
    }
    let timeout = request.timeout.unwrap_or(DEFAULT_EXEC_TIMEOUT);
    tokio::spawn(drive(target.clone(), fifos.dir, readers, tx, timeout));
    Ok(ExecSession {
        exec_id,
        stdin: fifos.stdin.map(|(_, pipe)| ExecStdin {
            pipe: Some(pipe),
            target: Some(target.clone()),
        }),
        output: ReceiverStream::new(rx),
        resize: request.tty.then_some(ExecResize { target }),
    })
}

/// The container's process spec (JSON) with the request's args, env, cwd and terminal.
fn exec_process_spec(container_spec: &[u8], request: &ExecRequest) -> Result<Vec<u8>, AgentError> {
    let spec: serde_json::Value = serde_json::from_slice(container_spec)
        .map_err(|e| AgentError::Internal(format!("container spec is not JSON: {e}")))?;
    let mut process = match spec.get("process") {
        Some(serde_json::Value::Object(p)) => p.clone(),
        _ => {
            return Err(AgentError::Internal(
                "container spec has no process".to_owned(),
            ));
        }
    };
    let mut env: Vec<String> = process
        .get("env")
        .and_then(|e| e.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    for entry in &request.env {
        let Some((name, _)) = entry.split_once('=') else {
            return Err(AgentError::InvalidArgument(format!(
                "exec env {entry:?} is not NAME=value"
            )));
        };
        let prefix = format!("{name}=");
        env.retain(|e| !e.starts_with(&prefix));
        env.push(entry.clone());
    }
    process.insert("args".to_owned(), serde_json::json!(request.args));
    process.insert("env".to_owned(), serde_json::json!(env));
    process.insert("terminal".to_owned(), serde_json::json!(request.tty));
    if let Some(cwd) = &request.cwd {
        process.insert("cwd".to_owned(), serde_json::json!(cwd));
    }
    if !request.tty {
        process.remove("consoleSize");
    }
    serde_json::to_vec(&process)
        .map_err(|e| AgentError::Internal(format!("encoding exec process spec: {e}")))
}

async fn make_fifos(dir: &Path, request: &ExecRequest) -> Result<Fifos, AgentError> {
    let io = |p: &Path, e: std::io::Error| AgentError::Internal(format!("{}: {e}", p.display()));
    tokio::fs::create_dir_all(dir)
        .await
        .map_err(|e| io(dir, e))?;
    let mkfifo = |name: &str| -> Result<PathBuf, AgentError> {
        let path = dir.join(name);
        rustix::fs::mkfifoat(
            rustix::fs::CWD,
            &path,
            rustix::fs::Mode::from_raw_mode(0o600),
        )
        .map_err(|e| io(&path, e.into()))?;
        Ok(path)
    };
    // Reading ends: non-blocking opens that succeed without a writer.
    let receiver = |path: PathBuf| -> Result<(PathBuf, pipe::Receiver), AgentError> {
        let r = pipe::OpenOptions::new()
            .open_receiver(&path)
            .map_err(|e| io(&path, e))?;
        Ok((path, r))
    };
    let stdout = receiver(mkfifo("stdout")?)?;
    let stderr = if request.tty {
        None
    } else {
        Some(receiver(mkfifo("stderr")?)?)
    };
    let stdin = if request.stdin {
        let path = mkfifo("stdin")?;
        // Read-write, so the open does not wait for (or fail without) the shim's reader;
        // we never read from it.
        let s = pipe::OpenOptions::new()
            .read_write(true)
            .open_sender(&path)
            .map_err(|e| io(&path, e))?;
        Some((path, s))
    } else {
        None
    };
    Ok(Fifos {
        dir: dir.to_owned(),
        stdin,
        stdout,
        stderr,
    })
}

async fn remove_dir(dir: &Path) {
    match tokio::fs::remove_dir_all(dir).await {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(dir = %dir.display(), error = %e, "removing exec FIFOs"),
    }
}

/// Copy one FIFO into the output channel until end-of-file or the caller is gone.
async fn pump(
    mut pipe: pipe::Receiver,
    wrap: fn(Bytes) -> ExecOutput,
    tx: mpsc::Sender<Result<ExecOutput, AgentError>>,
) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) => return,
            Ok(n) => {
                if tx
                    .send(Ok(wrap(Bytes::copy_from_slice(&buf[..n]))))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            Err(e) => {
                let _ = tx
                    .send(Err(AgentError::Internal(format!(
                        "reading exec output: {e}"
                    ))))
                    .await;
                return;
            }
        }
    }
}

/// Wait for the exit (or the caller leaving, or the timeout), drain, clean up, and
/// send the exit code (or the error) last.
async fn drive(
    target: ExecTarget,
    dir: PathBuf,
    mut readers: Vec<JoinHandle<()>>,
    tx: mpsc::Sender<Result<ExecOutput, AgentError>>,
    timeout: Duration,
) {
    let outcome: Result<u32, AgentError> = tokio::select! {
        exit = target.wait(timeout) => match exit {
            Err(AgentError::Timeout { .. }) => {
                Err(AgentError::Timeout { op: "exec", secs: timeout.as_secs() })
            }
            other => other,
        },
        // Nobody reads the output any more: the process is stopped below.
        () = tx.closed() => Err(AgentError::Internal("exec output dropped".to_owned())),
    };
    if outcome.is_err() {
        // Whatever failed, the process must not outlive the exec.
        kill_and_wait(&target).await;
    }
    // Output still in flight reaches end-of-file once the process and anything that
    // inherited its stdout/stderr are gone; deleting the exec closes the shim's side.
    let drained = tokio::time::timeout(DRAIN_GRACE, join_all(&mut readers))
        .await
        .is_ok();
    let deleted = target.delete().await;
    if !drained
        && tokio::time::timeout(DRAIN_AFTER_DELETE, join_all(&mut readers))
            .await
            .is_err()
    {
        tracing::warn!(exec = %target.exec_id, "exec output did not end after delete; dropped");
        for r in &readers {
            r.abort();
        }
    }
    remove_dir(&dir).await;
    let last = match (outcome, deleted) {
        (Ok(code), Ok(())) => Ok(ExecOutput::Exit(i32::try_from(code).unwrap_or(i32::MAX))),
        (Err(e), _) | (Ok(_), Err(e)) => Err(e),
    };
    let _ = tx.send(last).await;
}

async fn join_all(readers: &mut [JoinHandle<()>]) {
    for r in readers.iter_mut() {
        let _ = r.await;
    }
}

async fn kill_and_wait(target: &ExecTarget) {
    if let Err(e) = target.kill().await {
        tracing::warn!(exec = %target.exec_id, error = %e, "killing exec");
    }
    if let Err(e) = target.wait(KILL_WAIT).await {
        tracing::warn!(exec = %target.exec_id, error = %e, "waiting for killed exec");
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn spec() -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "ociVersion": "1.0.2",
            "process": {
                "terminal": false,
                "user": {"uid": 0, "gid": 0},
                "args": ["sleep", "inf"],
                "env": ["PATH=/bin", "HOME=/root"],
                "cwd": "/",
                "capabilities": {"bounding": ["CAP_KILL"]},
                "noNewPrivileges": true
            },
            "root": {"path": "rootfs"}
        }))
        .unwrap()
    }

    #[test]
    fn exec_spec_keeps_the_container_process_and_replaces_the_rest() {
        let req = ExecRequest {
            args: vec!["sh".into(), "-c".into(), "id".into()],
            env: vec!["HOME=/tmp".into(), "X=1".into()],
            cwd: Some("/work".into()),
            tty: true,
            ..ExecRequest::default()
        };
        let p: serde_json::Value =
            serde_json::from_slice(&exec_process_spec(&spec(), &req).unwrap()).unwrap();
        assert_eq!(p["args"], serde_json::json!(["sh", "-c", "id"]));
        assert_eq!(
            p["env"],
            serde_json::json!(["PATH=/bin", "HOME=/tmp", "X=1"])
        );
        assert_eq!(p["cwd"], "/work");
        assert_eq!(p["terminal"], true);
        assert_eq!(p["user"]["uid"], 0);
        assert_eq!(p["capabilities"]["bounding"][0], "CAP_KILL");
        assert_eq!(p["noNewPrivileges"], true);
    }

    #[test]
    fn exec_spec_without_cwd_keeps_the_containers() {
        let req = ExecRequest {
            args: vec!["true".into()],
            ..ExecRequest::default()
        };
        let p: serde_json::Value =
            serde_json::from_slice(&exec_process_spec(&spec(), &req).unwrap()).unwrap();
        assert_eq!(p["cwd"], "/");
        assert_eq!(p["terminal"], false);
    }

    #[test]
    fn bad_env_is_rejected() {
        let req = ExecRequest {
            args: vec!["true".into()],
            env: vec!["NOEQUALS".into()],
            ..ExecRequest::default()
        };
        assert!(matches!(
            exec_process_spec(&spec(), &req),
            Err(AgentError::InvalidArgument(_))
        ));
        assert!(exec_process_spec(b"{}", &ExecRequest::default()).is_err());
    }

    #[tokio::test]
    async fn fifos_are_made_and_our_ends_open_without_a_peer() {
        let dir = tempfile::tempdir().unwrap();
        let exec_dir = dir.path().join("exec").join("x");
        let req = ExecRequest {
            args: vec!["cat".into()],
            stdin: true,
            ..ExecRequest::default()
        };
        let fifos = make_fifos(&exec_dir, &req).await.unwrap();
        use std::os::unix::fs::FileTypeExt;
        for name in ["stdin", "stdout", "stderr"] {
            let meta = std::fs::metadata(exec_dir.join(name)).unwrap();
            assert!(meta.file_type().is_fifo(), "{name}");
        }
        drop(fifos);
        remove_dir(&exec_dir).await;
        assert!(!exec_dir.exists());
        let tty = ExecRequest { tty: true, ..req };
        let fifos = make_fifos(&exec_dir, &tty).await.unwrap();
        assert!(fifos.stderr.is_none());
    }
}
