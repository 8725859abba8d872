//! Well-known names, kept from the original system so its operators feel at home.

/// containerd namespace holding every sandbox container (never `k8s.io`).
pub const CONTAINERD_NAMESPACE: &str = "fast-sandbox";
/// API group of the CRDs.
pub const API_GROUP: &str = "sandbox.fast.io";
/// Finalizer removed only once cleanup is proven done.
pub const SANDBOX_FINALIZER: &str = "sandbox.fast.io/cleanup";

/// Agent pod label selecting every agent.
pub const LABEL_APP: &str = "app";
/// Value of [`LABEL_APP`] on agent pods.
pub const LABEL_APP_AGENT: &str = "sandbox-agent";
/// Agent pod label naming its pool.
pub const LABEL_POOL: &str = "fast-sandbox.io/pool";

/// Container label: this container is ours.
pub const LABEL_MANAGED: &str = "fast-sandbox.io/managed";
/// Container label: uid of the agent that created it.
pub const LABEL_AGENT_UID: &str = "fast-sandbox.io/agent-uid";
/// Container label: Kubernetes namespace of the owning sandbox (the janitor reads it).
pub const LABEL_NAMESPACE: &str = "fast-sandbox.io/namespace";
/// Container label: name of the owning sandbox.
pub const LABEL_SANDBOX_NAME: &str = "fast-sandbox.io/sandbox-name";
/// Container label: uid of the Sandbox object that claimed it.
pub const LABEL_CLAIM_UID: &str = "fast-sandbox.io/claim-uid";
/// Container label: idempotency key of the create that made it, so a sandbox adopted
/// after a crash still answers a retry of that create.
pub const LABEL_REQUEST_ID: &str = "fast-sandbox.io/request-id";
/// Container label: the sandbox id.
pub const LABEL_ID: &str = "fast-sandbox.io/id";
