//! The gateway's seam to agents: [`AgentClient`]. In local mode [`LocalAgent`] calls the
//! agent in-process (no network hop); in Kubernetes mode a gRPC client of `agent.v1`
//! implements the same trait. Requests and answers are the `agent.v1` messages, so
//! both behave alike, including error codes.

use std::sync::Arc;

use fsb_agent::{
    AgentHandle,
    server::{AgentService, BoxStream},
};
use fsb_core::SandboxId;
use fsb_proto::{
    agent::v1::{self as av, agent_server::Agent},
    fastpath::v1 as fp,
};
use futures::future::BoxFuture;
use tonic::{Request, Status};

/// An agent's inventory as the registry takes it in a report (local and Kubernetes
/// mode report the same way).
pub fn reported(records: &[fsb_agent::SandboxRecord]) -> Vec<fsb_registry::ReportedSandbox> {
    records
        .iter()
        .map(|c| fsb_registry::ReportedSandbox {
            id: c.id.clone(),
            ports: c.ports.clone(),
        })
        .collect()
}

/// What the gateway asks of an agent.
pub trait AgentClient: Send + Sync + 'static {
    /// Create and start a sandbox (idempotent by id on the agent).
    fn create(
        &self,
        req: av::CreateSandboxRequest,
    ) -> BoxFuture<'_, Result<av::CreateSandboxResponse, Status>>;

    /// Stop and remove a sandbox; `Ok(false)` if the agent did not have it.
    fn delete(
        &self,
        id: SandboxId,
        grace_seconds: Option<u32>,
    ) -> BoxFuture<'_, Result<bool, Status>>;

    /// Run a process in a sandbox; `input` starts with `start`.
    fn exec(
        &self,
        input: BoxStream<av::ExecRequest>,
    ) -> BoxFuture<'_, Result<BoxStream<fp::ExecResponse>, Status>>;

    /// Stream a sandbox's logs.
    fn logs(&self, req: av::LogsRequest) -> BoxFuture<'_, Result<BoxStream<fp::LogChunk>, Status>>;

    /// Ids of every container the agent has in containerd (not only those in its
    /// table), for the orphan scan.
    fn containers(&self) -> BoxFuture<'_, Result<Vec<SandboxId>, Status>>;
}

/// The agent of `fsb up`, in the same process.
#[derive(Clone, Debug)]
pub struct LocalAgent {
    service: Arc<AgentService>,
    agent: AgentHandle,
}

impl LocalAgent {
    /// Serve `service` in-process.
    pub fn new(agent: AgentHandle, limits: fsb_core::spec::SpecLimits) -> Self {
        Self {
            service: Arc::new(AgentService::new(agent.clone(), limits)),
            agent,
        }
    }
}

impl AgentClient for LocalAgent {
    fn create(
        &self,
        req: av::CreateSandboxRequest,
    ) -> BoxFuture<'_, Result<av::CreateSandboxResponse, Status>> {
        // Through the metadata, as over the network: the agent's span continues the
        // trace the same way in both modes.
        let mut req = Request::new(req);
        fsb_telemetry::trace::inject(req.metadata_mut());
        Box::pin(async move {
            self.service
                .create_sandbox(req)
                .await
                .map(tonic::Response::into_inner)
        })
    }

    fn delete(
        &self,
        id: SandboxId,
        grace_seconds: Option<u32>,
    ) -> BoxFuture<'_, Result<bool, Status>> {
        Box::pin(async move {
            self.service
                .delete_sandbox(Request::new(av::DeleteSandboxRequest {
                    sandbox_id: id.to_string(),
                    grace_period_seconds: grace_seconds,
                }))
                .await
                .map(|r| r.into_inner().existed)
        })
    }

    fn exec(
        &self,
        input: BoxStream<av::ExecRequest>,
    ) -> BoxFuture<'_, Result<BoxStream<fp::ExecResponse>, Status>> {
        Box::pin(async move { self.service.exec_stream(input).await })
    }

    fn logs(&self, req: av::LogsRequest) -> BoxFuture<'_, Result<BoxStream<fp::LogChunk>, Status>> {
        Box::pin(async move { self.service.logs_stream(req).await })
    }

    fn containers(&self) -> BoxFuture<'_, Result<Vec<SandboxId>, Status>> {
        Box::pin(async move {
            self.agent
                .containers()
                .await
                .map_err(|e| fsb_core::error::to_status(&e))
        })
    }
}
