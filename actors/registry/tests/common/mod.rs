//! Fixtures shared by the registry tests.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::num::NonZeroU32;

use fsb_core::{
    AgentId, HostPort, ImageRef, NamespaceName, NodeName, PoolName, RequestId, SandboxId,
    spec::{Runtime, SpecDigest},
};
use fsb_registry::{AgentInfo, AgentReport, AllocateRequest, ReportedSandbox};

pub fn ns(s: &str) -> NamespaceName {
    NamespaceName::parse("namespace", s).unwrap()
}

pub fn pool(s: &str) -> PoolName {
    PoolName::parse("pool", s).unwrap()
}

pub fn image(s: &str) -> ImageRef {
    ImageRef::parse("image", s).unwrap()
}

pub fn port(p: u32) -> HostPort {
    HostPort::parse("port", p).unwrap()
}

pub fn agent(
    id: &str,
    namespace: &str,
    pool_name: &str,
    capacity: u32,
    images: &[&str],
) -> AgentInfo {
    AgentInfo {
        id: AgentId::from(id),
        pool: pool(pool_name),
        namespace: ns(namespace),
        node: NodeName::from(format!("node-of-{id}")),
        capacity: NonZeroU32::new(capacity).unwrap(),
        images: images.iter().map(|i| image(i)).collect(),
        healthy: true,
        default_runtime: Runtime::Runc,
        warm: Vec::new(),
    }
}

pub fn report(info: AgentInfo, sandboxes: &[(&SandboxId, &[u32])]) -> AgentReport {
    AgentReport {
        agent: info,
        sandboxes: sandboxes
            .iter()
            .map(|(id, ports)| ReportedSandbox {
                id: (*id).clone(),
                ports: ports.iter().map(|p| port(*p)).collect(),
            })
            .collect(),
    }
}

/// A request for `namespace/pool` with a fresh sandbox id.
pub fn req(
    request: &str,
    namespace: &str,
    pool_name: &str,
    img: &str,
    ports: &[u32],
) -> AllocateRequest {
    AllocateRequest {
        request_id: RequestId::parse("request_id", request).unwrap(),
        sandbox_id: SandboxId::generate(),
        namespace: ns(namespace),
        pool: pool(pool_name),
        image: image(img),
        ports: ports.iter().map(|p| port(*p)).collect(),
        digest: SpecDigest([1; 32]),
        runtime: None,
        claimable: false,
    }
}
