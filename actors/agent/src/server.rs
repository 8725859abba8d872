//! The agent's gRPC server (`agent.v1.Agent`): thin translation between the wire and
//! [`AgentHandle`]. Validation errors name the field; every error goes through
//! `fsb_core::error::to_status`.

use std::{pin::Pin, time::Duration};

use fsb_core::{
    SandboxId,
    error::to_status,
    spec::{EnvVar, ResourcesSpec, Runtime, SandboxSpec, SpecLimits},
};
use fsb_proto::{
    agent::v1::{
        CreateSandboxRequest, CreateSandboxResponse, DeleteSandboxRequest, DeleteSandboxResponse,
        ExecRequest, ListContainersRequest, ListContainersResponse, LogsRequest, SandboxStats,
        StatsRequest, StatsResponse,
        agent_server::{Agent, AgentServer},
    },
    fastpath::v1::{self as fp, ExecResponse, LogChunk},
};
use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::{AgentHandle, SandboxPhase, exec, logs};

/// A boxed stream of gRPC results.
pub type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Largest request decoded: specs are bounded far below it by [`SpecLimits`], exec
/// stdin arrives in small chunks. Larger messages are refused before decoding.
pub const MAX_REQUEST_BYTES: usize = 4 * 1024 * 1024;
/// Largest response sent: what the controller's agent client accepts.
pub const MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024;

/// `agent.v1.Agent` over an [`AgentHandle`].
#[derive(Clone, Debug)]
pub struct AgentService {
    agent: AgentHandle,
    limits: SpecLimits,
}

impl AgentService {
    /// Serve `agent`; `limits` carries the agent's own port (never given to sandboxes).
    pub fn new(agent: AgentHandle, limits: SpecLimits) -> Self {
        Self { agent, limits }
    }

    /// The tonic server with explicit message bounds.
    pub fn server(self) -> AgentServer<Self> {
        AgentServer::new(self)
            .max_decoding_message_size(MAX_REQUEST_BYTES)
            .max_encoding_message_size(MAX_RESPONSE_BYTES)
    }

    /// Exec over any request stream: the gRPC method's, or the gateway's in-process
    /// proxy in local mode. The first message must be `start`.
    pub async fn exec_stream<S>(&self, mut input: S) -> Result<BoxStream<ExecResponse>, Status>
    where
        S: Stream<Item = Result<ExecRequest, Status>> + Send + Unpin + 'static,
    {
        use fsb_proto::agent::v1::exec_request::Msg;
        use fsb_proto::fastpath::v1::exec_response::Msg as Out;
        use tokio::io::AsyncWriteExt;

        let start = match input.next().await.transpose()? {
            Some(ExecRequest {
                msg: Some(Msg::Start(start)),
            }) => start,
            _ => {
                return Err(Status::invalid_argument(
                    "exec: the first message must be `start`",
                ));
            }
        };
        let (id, request) = crate::request::exec_start(start, &self.limits)?;
        let session = exec::exec(self.agent.runtime(), &id, request)
            .await
            .map_err(|e| to_status(&e))?;
        let exec::ExecSession {
            mut stdin,
            output,
            resize,
            ..
        } = session;

        // Client -> process: stdin bytes, close, resize. Ends with the client's stream.
        tokio::spawn(async move {
            while let Some(Ok(msg)) = input.next().await {
                match msg.msg {
                    Some(Msg::Stdin(bytes)) => {
                        if let Some(w) = stdin.as_mut()
                            && w.write_all(&bytes).await.is_err()
                        {
                            break;
                        }
                    }
                    Some(Msg::CloseStdin(true)) => {
                        if let Some(w) = stdin.take() {
                            let _ = w.close().await;
                        }
                    }
                    Some(Msg::Resize(size)) => {
                        if let Some(r) = &resize {
                            let _ = r.resize(size.cols, size.rows).await;
                        }
                    }
                    Some(Msg::Start(_)) | Some(Msg::CloseStdin(false)) | None => {}
                }
            }
            if let Some(w) = stdin.take() {
                let _ = w.close().await;
            }
        });

        let out = output.map(|item| {
            item.map(|o| ExecResponse {
                msg: Some(match o {
                    exec::ExecOutput::Stdout(b) => Out::Stdout(b.to_vec()),
                    exec::ExecOutput::Stderr(b) => Out::Stderr(b.to_vec()),
                    exec::ExecOutput::Exit(code) => Out::ExitCode(code),
                }),
            })
            .map_err(|e| to_status(&e))
        });
        Ok(Box::pin(out))
    }

    /// Logs of one sandbox: for the gRPC method and the gateway's in-process proxy.
    pub async fn logs_stream(&self, req: LogsRequest) -> Result<BoxStream<LogChunk>, Status> {
        let id = crate::request::logs(&req)?;
        // Subscribe before looking, so an exit between the two is not missed.
        let mut changes = self.agent.subscribe().await.map_err(|e| to_status(&e))?;
        let inventory = self.agent.inventory().await.map_err(|e| to_status(&e))?;
        let Some(record) = inventory.iter().find(|r| r.id == id) else {
            return Err(Status::not_found(format!("sandbox {id} not found")));
        };
        let (exited_tx, exited_rx) = tokio::sync::watch::channel(ended(record.phase));
        if !ended(record.phase) {
            let watched = id.clone();
            let agent = self.agent.clone();
            let deleting = record.phase == SandboxPhase::Deleting;
            tokio::spawn(async move {
                let mut deleting = deleting;
                while !deleting {
                    match changes.recv().await {
                        Ok(c) if c.id == watched && ended(c.phase) => break,
                        Ok(c) if c.id == watched && c.phase == SandboxPhase::Deleting => {
                            deleting = true;
                        }
                        Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                    }
                    if exited_tx.is_closed() {
                        return;
                    }
                }
                if deleting {
                    wait_deleted(&agent, &watched, &exited_tx).await;
                }
                let _ = exited_tx.send(true);
            });
        }
        let options = logs::LogOptions {
            follow: req.follow,
            tail_lines: req.tail_lines,
            until_exited: Some(exited_rx),
        };
        let stream = logs::stream_logs(self.agent.runtime().log_paths(&id), options).map(|item| {
            item.map(|chunk| LogChunk {
                stream: match chunk.stream {
                    logs::LogStream::Stdout => fp::LogStream::Stdout as i32,
                    logs::LogStream::Stderr => fp::LogStream::Stderr as i32,
                },
                data: chunk.data.to_vec(),
                time: None,
            })
            .map_err(|e| to_status(&e))
        });
        Ok(Box::pin(stream))
    }

    /// [`Agent::create_sandbox`] inside its span.
    async fn create_traced(
        &self,
        req: CreateSandboxRequest,
    ) -> Result<Response<CreateSandboxResponse>, Status> {
        let create = crate::request::create(req, &self.limits)?;
        let created = self.agent.create(create).await.map_err(|e| to_status(&e))?;
        let mut stages = Vec::with_capacity(created.stages.len());
        let mut offset = Duration::ZERO;
        for (name, took) in &created.stages {
            stages.push(fp::Stage {
                name: (*name).to_owned(),
                start_us: micros(offset),
                duration_us: micros(*took),
            });
            offset += *took;
        }
        Ok(Response::new(CreateSandboxResponse {
            sandbox_id: created.id.to_string(),
            timeline: Some(fp::Timeline {
                stages,
                total_us: micros(offset),
                path: if created.warm { "warm" } else { "cold" }.into(),
                note: created.note.clone(),
                started_unix_us: created.started_unix_us,
            }),
            pid: created.pid,
        }))
    }
}

/// The wire spec as the core's client-facing spec (validated next).
pub fn core_spec(
    namespace: &str,
    name: &str,
    spec: fp::SandboxSpec,
    runtime: fp::Runtime,
) -> SandboxSpec {
    let (spec_runtime, policy) = (spec.runtime(), spec.failure_policy());
    let resources = spec.resources.unwrap_or_default();
    let runtime = match runtime {
        fp::Runtime::Unspecified => match spec_runtime {
            fp::Runtime::Unspecified => "",
            other => runtime_name(other),
        },
        other => runtime_name(other),
    };
    let failure_policy = match policy {
        fp::FailurePolicy::Unspecified | fp::FailurePolicy::Manual => "Manual",
        fp::FailurePolicy::AutoRecreate => "AutoRecreate",
    };
    SandboxSpec {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        pool_ref: spec.pool_ref,
        image: spec.image,
        command: spec.command,
        args: spec.args,
        envs: spec
            .envs
            .into_iter()
            .map(|e| EnvVar {
                name: e.name,
                value: e.value,
            })
            .collect(),
        working_dir: spec.working_dir,
        exposed_ports: spec.exposed_ports,
        resources: ResourcesSpec {
            cpu: resources.cpu,
            memory: resources.memory,
            pids: resources.pids,
        },
        runtime: runtime.to_owned(),
        failure_policy: failure_policy.to_owned(),
        recovery_timeout_seconds: spec.recovery_timeout_seconds,
        labels: Default::default(),
        read_only_rootfs: spec.read_only_rootfs,
        user_namespace: spec.user_namespace,
    }
}

fn runtime_name(r: fp::Runtime) -> &'static str {
    core_runtime(r).map_or("", Runtime::as_str)
}

/// The wire runtime of `r`: the one place core and protobuf runtimes meet (with
/// [`core_runtime`]).
pub fn wire_runtime(r: Runtime) -> fp::Runtime {
    match r {
        Runtime::Runc => fp::Runtime::Runc,
        Runtime::Crun => fp::Runtime::Crun,
        Runtime::Gvisor => fp::Runtime::Gvisor,
    }
}

/// The runtime `r` names; `None` for unspecified.
pub fn core_runtime(r: fp::Runtime) -> Option<Runtime> {
    match r {
        fp::Runtime::Unspecified => None,
        fp::Runtime::Runc => Some(Runtime::Runc),
        fp::Runtime::Crun => Some(Runtime::Crun),
        fp::Runtime::Gvisor => Some(Runtime::Gvisor),
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

#[tonic::async_trait]
impl Agent for AgentService {
    async fn create_sandbox(
        &self,
        request: Request<CreateSandboxRequest>,
    ) -> Result<Response<CreateSandboxResponse>, Status> {
        // A root in-process: its parent comes only from the request's trace context, so
        // local and Kubernetes mode link the same way (and a lost header shows).
        let span = tracing::info_span!(
            parent: None,
            "agent.create",
            otel.kind = "server",
            sandbox = %request.get_ref().sandbox_id,
            request_id = %request.get_ref().request_id,
        );
        fsb_telemetry::trace::set_remote_parent(&span, request.metadata());
        self.create_traced(request.into_inner())
            .instrument(span)
            .await
    }

    async fn delete_sandbox(
        &self,
        request: Request<DeleteSandboxRequest>,
    ) -> Result<Response<DeleteSandboxResponse>, Status> {
        let (id, grace) = crate::request::delete(&request.into_inner(), &self.limits)?;
        match self.agent.delete(id, grace).await {
            Ok(()) => Ok(Response::new(DeleteSandboxResponse { existed: true })),
            Err(e) if e.is_not_found() => {
                Ok(Response::new(DeleteSandboxResponse { existed: false }))
            }
            Err(e) => Err(to_status(&e)),
        }
    }

    type ExecStream = BoxStream<ExecResponse>;

    async fn exec(
        &self,
        request: Request<Streaming<ExecRequest>>,
    ) -> Result<Response<Self::ExecStream>, Status> {
        self.exec_stream(request.into_inner())
            .await
            .map(Response::new)
    }

    type LogsStream = BoxStream<LogChunk>;

    async fn logs(
        &self,
        request: Request<LogsRequest>,
    ) -> Result<Response<Self::LogsStream>, Status> {
        self.logs_stream(request.into_inner())
            .await
            .map(Response::new)
    }

    async fn list_containers(
        &self,
        _request: Request<ListContainersRequest>,
    ) -> Result<Response<ListContainersResponse>, Status> {
        let ids = self.agent.containers().await.map_err(|e| to_status(&e))?;
        Ok(Response::new(ListContainersResponse {
            sandbox_ids: ids.iter().map(ToString::to_string).collect(),
        }))
    }

    async fn stats(
        &self,
        request: Request<StatsRequest>,
    ) -> Result<Response<StatsResponse>, Status> {
        let ids = crate::request::stats(&request.into_inner())?;
        let inventory = self.agent.inventory().await.map_err(|e| to_status(&e))?;
        let mut out = Vec::new();
        for rec in inventory
            .iter()
            .filter(|r| ids.is_empty() || ids.contains(&r.id))
        {
            let c = crate::stats::read(&rec.id).await;
            out.push(SandboxStats {
                sandbox_id: rec.id.to_string(),
                cpu_usage_ns: c.cpu_usage_ns,
                memory_bytes: c.memory_bytes,
                pids: c.pids,
            });
        }
        Ok(Response::new(StatsResponse { sandboxes: out }))
    }
}

/// Whether a sandbox's process is over (logs can end after draining).
/// Whether the process has exited. Not `Deleting`: a delete sends SIGTERM and the
/// process may still write (its shutdown output) until it exits within the grace
/// period; the agent reports no exit during a delete, so a follower waits for the
/// delete to finish instead (see [`wait_deleted`]). Ending the follow when the delete
/// starts cut that output off.
fn ended(phase: SandboxPhase) -> bool {
    matches!(phase, SandboxPhase::Succeeded | SandboxPhase::Failed)
}

/// Wait until the agent no longer holds `id` (its delete finished: the process is
/// gone and has written everything), or the follower went away.
async fn wait_deleted(
    agent: &AgentHandle,
    id: &SandboxId,
    follower: &tokio::sync::watch::Sender<bool>,
) {
    while !follower.is_closed() {
        match agent.inventory().await {
            Ok(inv) if inv.iter().any(|r| &r.id == id) => {}
            // Gone, or the agent stopped (nothing more will be written).
            _ => return,
        }
        tokio::time::sleep(logs::POLL_INTERVAL).await;
    }
}
