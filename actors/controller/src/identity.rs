//! [`PodIdentity`]: an agent is who it says only if the API server agrees: the pod
//! exists with the uid claimed, is not being deleted, is controlled by the pool it
//! names (that pool's current uid), and, once the pod reports addresses, the
//! registration comes from one of them (a pool's certificate used from elsewhere, e.g.
//! copied out of the Secret, cannot register as one of its pods).

use std::net::IpAddr;

use fsb_proto::agent::v1::Register;
use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::Pod;
use kube::{Api, Client};
use tonic::Status;

use crate::{agents::AgentIdentity, crd::SandboxPool};

/// Checks a registration against the agent's pod and pool objects.
#[derive(Clone)]
pub struct PodIdentity {
    client: Client,
}

impl std::fmt::Debug for PodIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodIdentity").finish_non_exhaustive()
    }
}

impl PodIdentity {
    /// Over `client`.
    pub fn new(client: Client) -> Self {
        Self { client }
    }
}

/// The addresses a pod reports (`status.podIPs`, else `status.podIP`); none while it has
/// none yet.
fn pod_ips(pod: &Pod) -> Vec<IpAddr> {
    let Some(status) = pod.status.as_ref() else {
        return Vec::new();
    };
    let listed: Vec<&str> = status
        .pod_ips
        .iter()
        .flatten()
        .map(|p| p.ip.as_str())
        .collect();
    let ips = if listed.is_empty() {
        status.pod_ip.as_deref().into_iter().collect()
    } else {
        listed
    };
    ips.into_iter()
        .filter_map(|ip| ip.parse::<IpAddr>().ok())
        .map(|ip| ip.to_canonical())
        .collect()
}

fn unavailable(e: kube::Error) -> Status {
    Status::unavailable(format!("checking the agent's identity: {e}"))
}

impl AgentIdentity for PodIdentity {
    fn check(&self, reg: &Register, peer: Option<IpAddr>) -> BoxFuture<'_, Result<(), Status>> {
        let reg = reg.clone();
        Box::pin(async move {
            let deny = |why: String| {
                Err(Status::permission_denied(format!(
                    "agent {} (pod {}/{}): {why}",
                    reg.agent_id, reg.namespace, reg.pod_name
                )))
            };
            if reg.pod_name.is_empty() || reg.pod_uid.is_empty() {
                return deny("pod name and uid are required".into());
            }
            if reg.agent_id != reg.pod_uid {
                return deny("agent id must be the pod uid".into());
            }
            let pods: Api<Pod> = Api::namespaced(self.client.clone(), &reg.namespace);
            let Some(pod) = pods.get_opt(&reg.pod_name).await.map_err(unavailable)? else {
                return deny("no such pod".into());
            };
            if pod.metadata.uid.as_deref() != Some(reg.pod_uid.as_str()) {
                return deny("pod uid does not match".into());
            }
            if pod.metadata.deletion_timestamp.is_some() {
                return deny("pod is being deleted".into());
            }
            let pools: Api<SandboxPool> = Api::namespaced(self.client.clone(), &reg.namespace);
            let Some(pool) = pools.get_opt(&reg.pool).await.map_err(unavailable)? else {
                return deny(format!("no pool {:?}", reg.pool));
            };
            let owned = pod.metadata.owner_references.iter().flatten().any(|o| {
                o.kind == "SandboxPool"
                    && o.name == reg.pool
                    && Some(o.uid.as_str()) == pool.metadata.uid.as_deref()
                    && o.controller == Some(true)
            });
            if !owned {
                return deny(format!("pod is not owned by pool {:?}", reg.pool));
            }
            let ips = pod_ips(&pod);
            if let Some(peer) = peer
                && !ips.is_empty()
                && !ips.contains(&peer)
            {
                return deny(format!(
                    "connection from {peer}, which is not the pod's address ({})",
                    ips.iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
            Ok(())
        })
    }
}
