//! The API-server seam: whether a Sandbox exists (three-valued) and which agent pods
//! exist. [`KubeCluster`] asks a real API server; tests of the scan loop use a fake.

use std::{collections::HashSet, future::Future, time::Duration};

use fsb_controller::{crd::Sandbox, store::stated_sandbox_id};
use fsb_core::labels::{LABEL_APP, LABEL_APP_AGENT, LABEL_CLAIM_UID};
use k8s_openapi::api::core::v1::Pod;
use kube::{Api, Client, api::ListParams};

use crate::state::{Existence, SandboxFacts};

/// What the janitor asks the API server. Implementations never fail: every error is
/// an [`Existence::Unknown`] (or `Err` for the pod list) with the reason.
pub trait ClusterView: Send + Sync {
    /// Sandbox `name` in `namespace`.
    fn sandbox(
        &self,
        namespace: &str,
        name: &str,
    ) -> impl Future<Output = Existence<SandboxFacts>> + Send;

    /// UIDs of every agent pod (label `app=sandbox-agent`, all namespaces), or why the
    /// list failed.
    fn agent_pod_uids(&self) -> impl Future<Output = Result<HashSet<String>, String>> + Send;
}

/// [`ClusterView`] over a kube client, each call bounded by `timeout`.
#[derive(Clone)]
pub struct KubeCluster {
    client: Client,
    timeout: Duration,
}

impl std::fmt::Debug for KubeCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeCluster")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl KubeCluster {
    /// Default bound of one API call.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

    /// Over `client`, each call bounded by `timeout`.
    pub fn new(client: Client, timeout: Duration) -> Self {
        Self { client, timeout }
    }
}

impl ClusterView for KubeCluster {
    async fn sandbox(&self, namespace: &str, name: &str) -> Existence<SandboxFacts> {
        let api: Api<Sandbox> = Api::namespaced(self.client.clone(), namespace);
        match tokio::time::timeout(self.timeout, api.get(name)).await {
            Err(_) => Existence::Unknown(format!("no answer within {:?}", self.timeout)),
            Ok(Ok(sandbox)) => Existence::Exists(sandbox_facts(&sandbox)),
            Ok(Err(e)) => classify_get_error(&e, name),
        }
    }

    async fn agent_pod_uids(&self) -> Result<HashSet<String>, String> {
        let api: Api<Pod> = Api::all(self.client.clone());
        let lp = ListParams::default().labels(&format!("{LABEL_APP}={LABEL_APP_AGENT}"));
        match tokio::time::timeout(self.timeout, api.list_metadata(&lp)).await {
            Err(_) => Err(format!("no answer within {:?}", self.timeout)),
            Ok(Err(e)) => Err(e.to_string()),
            Ok(Ok(list)) => Ok(list
                .items
                .into_iter()
                .filter_map(|p| p.metadata.uid)
                .collect()),
        }
    }
}

/// The facts the janitor needs from a Sandbox: its claim uid (label
/// `fast-sandbox.io/claim-uid` if present, else `metadata.uid`) and `status.sandboxID`.
pub fn sandbox_facts(sandbox: &Sandbox) -> SandboxFacts {
    let label = sandbox
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(LABEL_CLAIM_UID))
        .filter(|v| !v.is_empty());
    SandboxFacts {
        claim_uid: label
            .or(sandbox.metadata.uid.as_ref())
            .cloned()
            .unwrap_or_default(),
        sandbox_id: stated_sandbox_id(sandbox)
            .and_then(Result::ok)
            .map(|id| id.to_string()),
    }
}

/// A failed GET of Sandbox `name`: [`Existence::Gone`] only for the API server's own
/// `404 NotFound` about that object. A 404 without that `Status` (the CRD not
/// installed: "404 page not found", or a proxy's page) is not proof and stays unknown,
/// as does every other error.
pub fn classify_get_error(err: &kube::Error, name: &str) -> Existence<SandboxFacts> {
    if let kube::Error::Api(status) = err
        && status.code == 404
        && status.reason == "NotFound"
        && status.details.as_ref().is_some_and(|d| d.name == name)
    {
        return Existence::Gone;
    }
    Existence::Unknown(err.to_string())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use fsb_controller::{
        crd::{SandboxPhase, SandboxSpec, SandboxStatus},
        store::ANNOTATION_INITIAL_STATUS,
    };
    use kube::core::Status;

    /// The body a kube-apiserver returns for a missing custom object.
    fn not_found(name: &str) -> kube::Error {
        let status: Status = serde_json::from_value(serde_json::json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": format!("sandboxes.sandbox.fast.io \"{name}\" not found"),
            "reason": "NotFound",
            "details": {"name": name, "group": "sandbox.fast.io", "kind": "sandboxes"},
            "code": 404
        }))
        .unwrap();
        kube::Error::Api(status.boxed())
    }

    #[test]
    fn only_the_objects_own_not_found_is_gone() {
        assert_eq!(
            classify_get_error(&not_found("web"), "web"),
            Existence::Gone
        );
        assert!(matches!(
            classify_get_error(&not_found("other"), "web"),
            Existence::Unknown(_)
        ));
        // What kube builds from a plain "404 page not found" (CRD not installed).
        let page = Status::failure("404 page not found", "Failed to parse error data")
            .with_code(404)
            .boxed();
        assert!(matches!(
            classify_get_error(&kube::Error::Api(page), "web"),
            Existence::Unknown(_)
        ));
        for (code, reason) in [
            (403, "Forbidden"),
            (500, "InternalError"),
            (503, "ServiceUnavailable"),
            (429, "TooManyRequests"),
        ] {
            let s = Status::failure("no", reason).with_code(code).boxed();
            assert!(matches!(
                classify_get_error(&kube::Error::Api(s), "web"),
                Existence::Unknown(_)
            ));
        }
    }

    /// A Sandbox `web` as kubectl would create it.
    fn web() -> Sandbox {
        Sandbox::new(
            "web",
            SandboxSpec {
                image: "busybox".into(),
                pool_ref: "default".into(),
                ..SandboxSpec::default()
            },
        )
    }

    #[test]
    fn the_claim_label_wins_over_metadata_uid() {
        let mut s = web();
        s.metadata.uid = Some("meta-uid".into());
        assert_eq!(sandbox_facts(&s).claim_uid, "meta-uid");
        s.metadata.labels = Some([(LABEL_CLAIM_UID.to_owned(), "fast-claim".to_owned())].into());
        assert_eq!(sandbox_facts(&s).claim_uid, "fast-claim");
    }

    /// The janitor reads the id a Sandbox states as the store does: an object whose
    /// status write was cut still names its id (intended status, id label), so another
    /// container of the same name is not taken for its own. An unplaced kubectl object
    /// states none.
    #[test]
    fn a_sandbox_states_its_id_before_its_status_is_written() {
        let mut s = web();
        // kubectl-made, not placed yet: no id stated.
        s.metadata.uid = Some("6f1e2d3c-4b5a-4978-8695-a4b3c2d1e0f9".into());
        assert_eq!(sandbox_facts(&s).sandbox_id, None);
        // A fast-path create whose status write was cut: the intended status.
        let intended = "0123456789abcdef0123456789abcdef";
        s.metadata.annotations = Some(
            [(
                ANNOTATION_INITIAL_STATUS.to_owned(),
                format!(r#"{{"phase":"Running","sandboxID":"{intended}"}}"#),
            )]
            .into(),
        );
        assert_eq!(sandbox_facts(&s).sandbox_id.as_deref(), Some(intended));
        // The status, once written, wins.
        let placed = "fedcba9876543210fedcba9876543210";
        s.status = Some(SandboxStatus {
            phase: Some(SandboxPhase::Running),
            sandbox_id: Some(placed.into()),
            ..SandboxStatus::default()
        });
        assert_eq!(sandbox_facts(&s).sandbox_id.as_deref(), Some(placed));
        // A written sandboxID counts even without a phase.
        s.status = Some(SandboxStatus {
            sandbox_id: Some(intended.into()),
            ..SandboxStatus::default()
        });
        assert_eq!(sandbox_facts(&s).sandbox_id.as_deref(), Some(intended));
    }
}
