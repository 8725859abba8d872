//! The `sandbox.fast.io/v1alpha1` custom resources, per `design.md`'s contracts.
//! Field names are the API's (camelCase); the Kubernetes API server enforces the
//! schema generated from these types, so invalid objects never reach a reconciler.

// The KubeSchema derive re-emits the annotated types inside a private scope, which the
// lint reports as unreachable `pub` items; the real types are public through `crd`.
#![allow(unreachable_pub)]

use std::collections::BTreeMap;

use kube::{CustomResource, CustomResourceExt, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// API group of every fast-sandbox resource.
pub const GROUP: &str = "sandbox.fast.io";

/// Pod label of agent pods, kept from the original system.
pub const LABEL_APP: &str = "app";

/// What a sandbox runs and where (`Sandbox.spec`).
#[derive(CustomResource, KubeSchema, Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[kube(
    group = "sandbox.fast.io",
    version = "v1alpha1",
    kind = "Sandbox",
    namespaced,
    status = "SandboxStatus",
    shortname = "sbx",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Pool","type":"string","jsonPath":".spec.poolRef"}"#,
    printcolumn = r#"{"name":"Agent","type":"string","jsonPath":".status.assignedPod"}"#,
    printcolumn = r#"{"name":"Image","type":"string","priority":1,"jsonPath":".spec.image"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct SandboxSpec {
    /// Image reference ("busybox" means docker.io/library/busybox:latest).
    #[schemars(length(min = 1))]
    pub image: String,
    /// Pool (in the same namespace) whose agents run the sandbox.
    #[schemars(length(min = 1))]
    pub pool_ref: String,
    /// Replaces the image's ENTRYPOINT when non-empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    /// Replaces the image's CMD when non-empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// Environment, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub envs: Vec<EnvVar>,
    /// Created if missing; empty keeps the image's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    /// Ports the sandbox listens on in the agent's network namespace (never the
    /// agent's own port, which the controller rejects).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(range(min = 1, max = 65535)))]
    pub exposed_ports: Vec<u32>,
    /// When the sandbox expires (RFC 3339); the object stays with phase Expired.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expire_time: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
    /// What happens when its agent is lost.
    #[serde(default)]
    pub failure_policy: FailurePolicy,
    /// Seconds before an AutoRecreate sandbox is recreated elsewhere.
    #[serde(default = "default_recovery_timeout")]
    #[schemars(range(min = 1))]
    pub recovery_timeout_seconds: u32,
    /// Incremented to ask for a restart; echoed in `status.acceptedResetRevision`.
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub reset_revision: i64,
    /// Limits; empty means the pool's defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<Resources>,
    /// Runtime override, if the pool allows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<RuntimeName>,
    /// Mount the image's root filesystem read-only (writes fail with EROFS).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub read_only_rootfs: bool,
    /// Run in a user namespace of its own, so root inside is not root on the node
    /// (like a pod's `hostUsers: false`); runc and crun only.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub user_namespace: bool,
}

fn default_recovery_timeout() -> u32 {
    60
}

/// One environment variable.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, JsonSchema)]
pub struct EnvVar {
    /// Name (required).
    #[schemars(length(min = 1))]
    pub name: String,
    /// Value.
    #[serde(default)]
    pub value: String,
}

/// Resource limits.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, JsonSchema)]
pub struct Resources {
    /// CPU, e.g. "500m".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<String>,
    /// Memory, e.g. "256Mi".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<String>,
    /// Process limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub pids: Option<u32>,
}

/// What happens to a sandbox whose agent is lost.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq, JsonSchema)]
pub enum FailurePolicy {
    /// It goes Lost and stays there.
    #[default]
    Manual,
    /// Recreated elsewhere after `recoveryTimeoutSeconds`.
    AutoRecreate,
}

/// OCI runtime.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum RuntimeName {
    /// runc.
    Runc,
    /// crun.
    Crun,
    /// gVisor (runsc).
    Gvisor,
}

/// Lifecycle phase.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq, JsonSchema)]
pub enum SandboxPhase {
    /// Waiting for a slot (a condition says why).
    Pending,
    /// Placed on an agent, container starting.
    Bound,
    /// Running.
    Running,
    /// Being deleted.
    Terminating,
    /// Past its expire time; container removed, object kept.
    Expired,
    /// Failed to start or exited non-zero.
    Failed,
    /// Its agent or container disappeared (Manual policy).
    Lost,
    /// Exited with 0.
    Succeeded,
}

/// Where a sandbox is and how it started (`Sandbox.status`).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SandboxStatus {
    /// Phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<SandboxPhase>,
    /// Agent pod holding it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assigned_pod: Option<String>,
    /// Node of that pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// containerd container id.
    #[serde(default, rename = "sandboxID", skip_serializing_if = "Option::is_none")]
    pub sandbox_id: Option<String>,
    /// Where its ports are reached.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<Endpoint>,
    /// Why it is where it is (Scheduled, Ready, Recorded; reasons such as NoPool,
    /// Unschedulable, PortConflict).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>,
    /// The reset revision carried out.
    #[serde(default)]
    pub accepted_reset_revision: i64,
    /// The generation this status describes.
    #[serde(default)]
    pub observed_generation: i64,
    /// Where the start time went.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeline: Option<Timeline>,
    /// Exit code once the process exited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// UID of the agent pod holding it (the agent's identity; `assignedPod` is its
    /// name, for people).
    #[serde(default, rename = "agentUID", skip_serializing_if = "Option::is_none")]
    pub agent_uid: Option<String>,
    /// When `phase` last changed (a Lost AutoRecreate sandbox is recreated
    /// `recoveryTimeoutSeconds` after it: the deadline survives controller restarts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase_time: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
}

/// An address of an exposed port.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, JsonSchema)]
pub struct Endpoint {
    /// Host (the agent pod's IP: sandboxes share its network namespace).
    pub host: String,
    /// Port.
    pub port: u32,
}

/// A start's per-stage timings, written with the record of a fast-path create.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Timeline {
    /// Stages in order.
    #[serde(default)]
    pub stages: Vec<Stage>,
    /// Total, microseconds.
    #[serde(default)]
    pub total_us: u64,
    /// "cold" or "warm".
    #[serde(default)]
    pub path: String,
    /// Why a warm request went cold, or similar remarks.
    #[serde(default)]
    #[schemars(length(max = 256))]
    pub note: String,
    /// When the user process started, Unix microseconds on the agent's clock; 0 if
    /// unknown.
    #[serde(default)]
    pub started_unix_us: u64,
}

/// One stage of a start.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Stage {
    /// validate, allocate, record, agent, runtime, ...
    pub name: String,
    /// Start, microseconds after the request arrived.
    pub start_us: u64,
    /// Duration, microseconds.
    pub duration_us: u64,
}

/// A pool of agent pods (`SandboxPool.spec`).
#[derive(CustomResource, KubeSchema, Clone, Debug, Deserialize, Serialize, PartialEq)]
#[kube(
    group = "sandbox.fast.io",
    version = "v1alpha1",
    kind = "SandboxPool",
    namespaced,
    status = "SandboxPoolStatus",
    shortname = "sbxpool",
    printcolumn = r#"{"name":"Runtime","type":"string","jsonPath":".spec.runtime"}"#,
    printcolumn = r#"{"name":"Ready","type":"integer","jsonPath":".status.readyPods"}"#,
    printcolumn = r#"{"name":"Busy","type":"integer","jsonPath":".status.busyAgents"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct SandboxPoolSpec {
    /// How many agent pods, and how many idle ones to keep.
    pub capacity: PoolCapacity,
    /// Sandboxes one agent pod holds at once.
    #[serde(default = "default_per_pod")]
    #[schemars(range(min = 1))]
    pub max_sandboxes_per_pod: u32,
    /// OCI runtime of the pool's sandboxes; cannot change.
    #[x_kube(validation = kube::core::Rule::new("self == oldSelf").message("runtime is immutable"))]
    pub runtime: RuntimeName,
    /// Images to keep warm instances of, per agent.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warm_images: Vec<WarmImage>,
    /// Pod template of the agents (container image, resources, node selection).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_template: Option<k8s_openapi::api::core::v1::PodTemplateSpec>,
    /// Hardening of the pool's sandboxes beyond the defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox_security: Option<SandboxSecurity>,
}

/// `SandboxPool.spec.sandboxSecurity`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, JsonSchema)]
pub struct SandboxSecurity {
    /// Capabilities of the pool's sandboxes: containerd's default set (less
    /// `CAP_NET_RAW` in the agent's shared network namespace), less `drop`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<CapabilityPolicy>,
}

/// `sandboxSecurity.capabilities`: shaped like a container's
/// `securityContext.capabilities`, but only `drop` is honoured.
#[derive(KubeSchema, Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct CapabilityPolicy {
    /// Capabilities taken away from every sandbox of the pool: Linux capability names
    /// with or without `CAP_`, any case (`NET_RAW`, `CAP_CHOWN`), or `ALL`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(regex(pattern = crate::crd::capability_pattern())))]
    pub drop: Vec<String>,
    /// Refused when not empty: sandboxes never get more than the default set.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(validation = kube::core::Rule::new("size(self) == 0").message("sandboxes cannot gain capabilities beyond the default set; only drop is supported"))]
    pub add: Vec<String>,
}

/// The schema pattern of a `drop` entry: the names [`fsb_core::capability::canonical`]
/// accepts (without surrounding whitespace), case-insensitive.
pub fn capability_pattern() -> String {
    let names: Vec<&str> = fsb_core::capability::KNOWN_CAPABILITIES
        .iter()
        .filter_map(|c| c.strip_prefix("CAP_"))
        .collect();
    format!(
        "^(?i)({}|(CAP_)?({}))$",
        fsb_core::capability::ALL,
        names.join("|")
    )
}

fn default_per_pod() -> u32 {
    1
}

/// Pool sizing.
#[derive(KubeSchema, Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("self.poolMin <= self.poolMax").message("poolMin must not exceed poolMax"))]
#[x_kube(validation = kube::core::Rule::new("self.bufferMin <= self.bufferMax").message("bufferMin must not exceed bufferMax"))]
pub struct PoolCapacity {
    /// Fewest agent pods.
    #[schemars(range(min = 0))]
    pub pool_min: u32,
    /// Most agent pods.
    #[schemars(range(min = 0))]
    pub pool_max: u32,
    /// Fewest idle agents kept ready.
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub buffer_min: u32,
    /// Most idle agents before scaling down.
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub buffer_max: u32,
}

/// Warm instances of one image.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, JsonSchema)]
pub struct WarmImage {
    /// Image reference.
    #[schemars(length(min = 1))]
    pub image: String,
    /// Ready instances per agent.
    #[schemars(range(min = 0))]
    pub count: u32,
}

/// Counts of the pool's pods and agents (`SandboxPool.status`).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SandboxPoolStatus {
    /// Agent pods that exist.
    #[serde(default)]
    pub current_pods: u32,
    /// Agent pods ready.
    #[serde(default)]
    pub ready_pods: u32,
    /// Agents registered.
    #[serde(default)]
    pub total_agents: u32,
    /// Agents holding no sandbox.
    #[serde(default)]
    pub idle_agents: u32,
    /// Agents holding at least one.
    #[serde(default)]
    pub busy_agents: u32,
    /// Warm instances ready on the pool's agents (`warmImages`), from their last
    /// inventories.
    #[serde(default)]
    pub warm_ready: u32,
    /// Conditions (Ready, Scaling, ...).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>,
}

/// Both CRDs as one multi-document YAML, as `deploy/crds/crds.yaml` holds it.
pub fn crds_yaml() -> Result<String, serde_yaml::Error> {
    let mut out = String::from("# Generated from actors/controller/src/crd.rs; do not edit.\n");
    for crd in [Sandbox::crd(), SandboxPool::crd()] {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&crd)?);
    }
    Ok(out)
}

/// Labels of every agent pod of `pool`.
pub fn agent_pod_labels(pool: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_APP.to_owned(), "sandbox-agent".to_owned()),
        (fsb_pool_label().to_owned(), pool.to_owned()),
    ])
}

fn fsb_pool_label() -> &'static str {
    "fast-sandbox.io/pool"
}
