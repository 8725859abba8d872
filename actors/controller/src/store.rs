//! [`KubeStore`]: the gateway's [`SandboxStore`] over `Sandbox` objects, so Kubernetes
//! mode runs the same fast path as local mode with the API server as the durable
//! record.
//!
//! Mapping (one object per record, key = namespace/name):
//! - `spec` is the sandbox spec; `status` holds phase, agent (`agentUID`, plus
//!   `assignedPod` for people), node, sandbox id, exit code, accepted reset revision
//!   and `phaseTime` (when the phase last changed), and the create's `timeline`.
//! - Labels: the user's, plus `fast-sandbox.io/id` (sandbox id, for lookups by id),
//!   `fast-sandbox.io/claim-uid` (the record's uid, which the janitor compares with the
//!   container's) and `fast-sandbox.io/request-id-hash` (request ids may hold
//!   characters a label value cannot; the full id is the annotation
//!   `sandbox.fast.io/request-id`). The spec digest and millisecond creation time are
//!   annotations.
//! - Every object carries the finalizer `sandbox.fast.io/cleanup`; [`KubeStore::delete`]
//!   removes it, which the gateway calls only once the container is proven gone
//!   (seed-review item 1). An object being deleted (deletionTimestamp set, e.g. by
//!   kubectl) reads as `Terminating`, so the gateway's sweeper finishes its cleanup.
//! - A Sandbox created with kubectl has no status yet: it reads as `Pending`, its
//!   claim uid is its `metadata.uid` and its sandbox id is that uid without dashes, so
//!   the id is stable before it is placed.
//! - `resource_version` is the object's resourceVersion (etcd's revision: strictly
//!   increasing across the store, as the trait asks); writes are conditional on it,
//!   so a stale update fails with `Conflict`.
//!
//! Objects whose spec does not validate are not records: `list` skips them and `get`
//! answers `Corrupt`; the Sandbox reconciler marks them Failed with the reason.

use std::{collections::BTreeMap, sync::Arc};

use fsb_core::{
    AgentId, NamespaceName, NodeName, PoolName, RequestId, SandboxId, SandboxName, ValidSpec,
    labels::{LABEL_CLAIM_UID, LABEL_ID, SANDBOX_FINALIZER},
    spec::{self, SpecDigest, SpecLimits},
};
use fsb_store::{
    EventKind, ListFilter, Phase, SandboxStore, StartPath, StartStage, StartTimeline, StoreError,
    StoreEvent, StoredSandbox,
};
use futures::StreamExt;
use k8s_openapi::{
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time},
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions},
    runtime::watcher,
};
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::sync::broadcast;

use crate::crd::{
    EnvVar, FailurePolicy, Resources, RuntimeName, Sandbox, SandboxPhase, SandboxSpec,
    SandboxStatus, Stage, Timeline,
};

/// Label holding a hash of the request id (label values are limited to 63 characters
/// of `[A-Za-z0-9._-]`; request ids are not).
pub const LABEL_REQUEST_ID_HASH: &str = "fast-sandbox.io/request-id-hash";
/// Annotation holding the full request id.
pub const ANNOTATION_REQUEST_ID: &str = "sandbox.fast.io/request-id";
/// Annotation holding the spec digest (hex) a replay compares.
pub const ANNOTATION_SPEC_DIGEST: &str = "sandbox.fast.io/spec-digest";
/// Annotation holding the status a fast-path create meant to write right after the
/// object (read when the status write never happened).
pub const ANNOTATION_INITIAL_STATUS: &str = "sandbox.fast.io/initial-status";
/// Annotation holding the creation time in Unix milliseconds.
pub const ANNOTATION_CREATED_MS: &str = "sandbox.fast.io/created-ms";

/// Labels the store manages; never shown as user labels.
const RESERVED_LABELS: [&str; 3] = [LABEL_ID, LABEL_CLAIM_UID, LABEL_REQUEST_ID_HASH];

/// Sandbox records as `Sandbox` objects. Cheap to clone.
#[derive(Clone)]
pub struct KubeStore {
    client: Client,
    /// Only this namespace's Sandboxes (None: every namespace).
    scope: Option<String>,
    limits: Arc<SpecLimits>,
    events: broadcast::Sender<StoreEvent>,
    /// Pod names of agents, for `status.assignedPod` (filled as agents register).
    pods: Arc<dashmap::DashMap<AgentId, String>>,
}

impl std::fmt::Debug for KubeStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeStore").finish_non_exhaustive()
    }
}

impl KubeStore {
    /// A store over `client`, of `scope`'s Sandboxes only if given; objects are
    /// validated with `limits` (the agent port among them). Starts a watch feeding
    /// [`SandboxStore::watch`] (needs a tokio runtime).
    pub fn new(client: Client, limits: SpecLimits, scope: Option<String>) -> Self {
        let (events, _) = broadcast::channel(4096);
        let store = Self {
            client,
            scope,
            limits: Arc::new(limits),
            events,
            pods: Arc::default(),
        };
        store.spawn_watch();
        store
    }

    /// Name agent `agent`'s pod in the records it holds from now on.
    pub fn set_pod_name(&self, agent: AgentId, pod: String) {
        self.pods.insert(agent, pod);
    }

    fn pod_name(&self, r: &StoredSandbox) -> Option<String> {
        r.agent
            .as_ref()
            .and_then(|a| self.pods.get(a).map(|p| p.clone()))
    }

    fn api(&self, namespace: &str) -> Api<Sandbox> {
        Api::namespaced(self.client.clone(), namespace)
    }

    fn all(&self) -> Api<Sandbox> {
        match &self.scope {
            Some(ns) => Api::namespaced(self.client.clone(), ns),
            None => Api::all(self.client.clone()),
        }
    }

    /// The record an object stands for.
    pub fn record(&self, obj: &Sandbox) -> Result<StoredSandbox, StoreError> {
        to_record(obj, &self.limits)
    }

    /// Feed watchers from the API server's watch; a dropped watch is resumed by the
    /// watcher (with a re-list, whose objects are sent as Modified).
    fn spawn_watch(&self) {
        let events = self.events.clone();
        let limits = self.limits.clone();
        let api = self.all();
        tokio::spawn(async move {
            let mut stream =
                std::pin::pin!(watcher(api, watcher::Config::default().any_semantic()));
            while let Some(event) = stream.next().await {
                if events.receiver_count() == 0 && events.is_empty() {
                    // Nobody listens; keep consuming so the watch stays current.
                }
                let (kind, obj) = match event {
                    Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) => {
                        (EventKind::Modified, o)
                    }
                    Ok(watcher::Event::Delete(o)) => (EventKind::Deleted, o),
                    Ok(watcher::Event::Init | watcher::Event::InitDone) => continue,
                    Err(e) => {
                        tracing::debug!(error = %e, "sandbox watch: retrying");
                        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                        continue;
                    }
                };
                if let Ok(record) = to_record(&obj, &limits) {
                    let kind = if kind == EventKind::Modified
                        && obj.status.is_none()
                        && obj.metadata.deletion_timestamp.is_none()
                    {
                        EventKind::Added
                    } else {
                        kind
                    };
                    let _ = events.send(StoreEvent { kind, record });
                }
            }
        });
    }

    async fn list_objects(&self, selector: Option<&str>) -> Result<Vec<Sandbox>, StoreError> {
        let mut params = ListParams::default();
        if let Some(s) = selector {
            params = params.labels(s);
        }
        Ok(self.all().list(&params).await.map_err(api_error)?.items)
    }

    async fn get_object(&self, ns: &str, name: &str) -> Result<Option<Sandbox>, StoreError> {
        self.api(ns).get_opt(name).await.map_err(api_error)
    }

    /// Write `status` (a merge patch of the fields we own) conditional on `version`.
    async fn patch_status(
        &self,
        ns: &NamespaceName,
        name: &SandboxName,
        version: &str,
        status: serde_json::Value,
    ) -> Result<Sandbox, StoreError> {
        let patch = json!({
            "metadata": { "resourceVersion": version },
            "status": status,
        });
        self.api(ns.as_str())
            .patch_status(
                name.as_str(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
            .map_err(|e| write_error(e, ns, name))
    }
}

/// The record of `obj`, validating its spec with `limits`.
pub fn to_record(obj: &Sandbox, limits: &SpecLimits) -> Result<StoredSandbox, StoreError> {
    let meta = &obj.metadata;
    let ns = meta.namespace.clone().unwrap_or_default();
    let name = meta.name.clone().unwrap_or_default();
    let corrupt = |column: &'static str, reason: String| StoreError::Corrupt {
        key: format!("{ns}/{name}"),
        column,
        reason,
    };
    let namespace = NamespaceName::parse("metadata.namespace", &ns)
        .map_err(|e| corrupt("namespace", e.to_string()))?;
    let sandbox_name =
        SandboxName::parse("metadata.name", &name).map_err(|e| corrupt("name", e.to_string()))?;
    let labels = meta.labels.clone().unwrap_or_default();
    let annotations = meta.annotations.clone().unwrap_or_default();
    let object_uid = meta.uid.clone().unwrap_or_default();
    let uid = labels
        .get(LABEL_CLAIM_UID)
        .cloned()
        .unwrap_or_else(|| object_uid.clone());
    let status = effective_status(obj);
    let sandbox_id = sandbox_id_of(obj).map_err(|(column, reason)| corrupt(column, reason))?;
    let spec = valid_spec(&namespace, &sandbox_name, &obj.spec, &labels, limits)
        .map_err(|e| corrupt("spec", e.to_string()))?;
    let spec_digest = annotations
        .get(ANNOTATION_SPEC_DIGEST)
        .and_then(|h| parse_digest(h))
        .unwrap_or_else(|| spec.digest());
    let phase = if meta.deletion_timestamp.is_some() {
        Phase::Terminating
    } else {
        status.phase.map_or(Phase::Pending, phase_from_crd)
    };
    let created_ms = annotations
        .get(ANNOTATION_CREATED_MS)
        .and_then(|s| s.parse().ok())
        .or_else(|| {
            meta.creation_timestamp
                .as_ref()
                .map(|t| t.0.as_millisecond())
        })
        .unwrap_or(0);
    let resource_version = meta
        .resource_version
        .as_deref()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Ok(StoredSandbox {
        namespace,
        name: sandbox_name,
        uid,
        sandbox_id,
        request_id: annotations
            .get(ANNOTATION_REQUEST_ID)
            .and_then(|r| RequestId::parse("request_id", r).ok()),
        spec_digest,
        labels: user_labels(&labels),
        spec,
        phase,
        agent: status.agent_uid.as_deref().map(AgentId::from),
        node: status.node_name.as_deref().map(NodeName::from),
        exit_code: status.exit_code,
        expire_time_ms: obj.spec.expire_time.as_ref().map(|t| t.0.as_millisecond()),
        reset_revision: obj.spec.reset_revision,
        accepted_reset_revision: status.accepted_reset_revision,
        timeline: status.timeline.as_ref().map(timeline_from_crd),
        created_ms,
        resource_version,
    })
}

/// The object's status as meant. Creating an object and writing its status are two
/// requests: a controller killed between them leaves an object without status. Its
/// intended status was written with the object (annotation), so it reads as meant,
/// not as a kubectl Pending.
fn effective_status(obj: &Sandbox) -> SandboxStatus {
    match &obj.status {
        Some(s) if s.phase.is_some() => s.clone(),
        _ => obj
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(ANNOTATION_INITIAL_STATUS))
            .and_then(|j| serde_json::from_str::<SandboxStatus>(j).ok())
            .unwrap_or_default(),
    }
}

/// The sandbox id an object stands for, placed or not: its stated id
/// ([`stated_sandbox_id`]), else the id derived from its claim uid that placing it
/// will use. The error names the bad column.
pub fn sandbox_id_of(obj: &Sandbox) -> Result<SandboxId, (&'static str, String)> {
    if let Some(id) = stated_sandbox_id(obj) {
        return id;
    }
    let uid = obj
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(LABEL_CLAIM_UID))
        .or(obj.metadata.uid.as_ref())
        .cloned()
        .unwrap_or_default();
    derived_id(&uid).ok_or_else(|| ("uid", format!("{uid:?} is not a UUID")))
}

/// The sandbox id an object states: `status.sandboxID`, else the intended status
/// written with it, else the id label of a fast-path create. The janitor reads ids
/// this way too, so a same-name leftover of an earlier attempt is not taken for the
/// container of a Sandbox whose status write was cut.
pub fn stated_sandbox_id(obj: &Sandbox) -> Option<Result<SandboxId, (&'static str, String)>> {
    let written = obj.status.as_ref().and_then(|s| s.sandbox_id.clone());
    let id = written
        .or_else(|| effective_status(obj).sandbox_id)
        .filter(|s| !s.is_empty())
        .or_else(|| obj.metadata.labels.as_ref()?.get(LABEL_ID).cloned())?;
    Some(SandboxId::parse("status.sandboxID", &id).map_err(|e| ("sandbox_id", e.to_string())))
}

/// The sandbox id of an object not yet placed: its uid without dashes.
fn derived_id(uid: &str) -> Option<SandboxId> {
    let hex: String = uid.chars().filter(|c| *c != '-').collect();
    SandboxId::parse("uid", &hex.to_ascii_lowercase()).ok()
}

fn parse_digest(hex_digest: &str) -> Option<SpecDigest> {
    let bytes = hex::decode(hex_digest).ok()?;
    Some(SpecDigest(bytes.try_into().ok()?))
}

fn user_labels(labels: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    labels
        .iter()
        .filter(|(k, _)| !RESERVED_LABELS.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Validate a `Sandbox.spec` as the fast path validates a request.
pub fn valid_spec(
    namespace: &NamespaceName,
    name: &SandboxName,
    s: &SandboxSpec,
    labels: &BTreeMap<String, String>,
    limits: &SpecLimits,
) -> Result<ValidSpec, fsb_core::spec::SpecError> {
    let resources = s.resources.clone().unwrap_or_default();
    spec::SandboxSpec {
        namespace: namespace.to_string(),
        name: name.to_string(),
        pool_ref: s.pool_ref.clone(),
        image: s.image.clone(),
        command: s.command.clone(),
        args: s.args.clone(),
        envs: s
            .envs
            .iter()
            .map(|e| spec::EnvVar {
                name: e.name.clone(),
                value: e.value.clone(),
            })
            .collect(),
        working_dir: s.working_dir.clone().unwrap_or_default(),
        exposed_ports: s.exposed_ports.clone(),
        resources: spec::ResourcesSpec {
            cpu: resources.cpu.unwrap_or_default(),
            memory: resources.memory.unwrap_or_default(),
            pids: resources.pids.unwrap_or(0),
        },
        runtime: s
            .runtime
            .map(|r| match r {
                RuntimeName::Runc => "runc",
                RuntimeName::Crun => "crun",
                RuntimeName::Gvisor => "gvisor",
            })
            .unwrap_or_default()
            .to_owned(),
        failure_policy: match s.failure_policy {
            FailurePolicy::Manual => "Manual",
            FailurePolicy::AutoRecreate => "AutoRecreate",
        }
        .to_owned(),
        recovery_timeout_seconds: s.recovery_timeout_seconds,
        labels: user_labels(labels),
        read_only_rootfs: s.read_only_rootfs,
        user_namespace: s.user_namespace,
    }
    .validate(limits)
}

/// The `Sandbox.spec` of a record.
pub fn crd_spec(r: &StoredSandbox) -> SandboxSpec {
    let s = &r.spec;
    SandboxSpec {
        image: s.image.as_str().to_owned(),
        pool_ref: s.pool.to_string(),
        command: s.command.clone(),
        args: s.args.clone(),
        envs: s
            .envs
            .iter()
            .map(|(name, value)| EnvVar {
                name: name.clone(),
                value: value.clone(),
            })
            .collect(),
        working_dir: s.working_dir.clone(),
        exposed_ports: s.ports.iter().map(|p| u32::from(p.get())).collect(),
        expire_time: r.expire_time_ms.and_then(time_ms),
        failure_policy: match s.failure_policy {
            spec::FailurePolicy::Manual => FailurePolicy::Manual,
            spec::FailurePolicy::AutoRecreate => FailurePolicy::AutoRecreate,
        },
        recovery_timeout_seconds: s.recovery_timeout_seconds,
        reset_revision: r.reset_revision,
        resources: (s.cpu.is_some() || s.memory.is_some() || s.pids.is_some()).then(|| Resources {
            cpu: s.cpu.map(|c| format!("{}m", c.0)),
            memory: s.memory.map(|m| m.0.to_string()),
            pids: s.pids,
        }),
        runtime: s.runtime.map(|r| match r {
            spec::Runtime::Runc => RuntimeName::Runc,
            spec::Runtime::Crun => RuntimeName::Crun,
            spec::Runtime::Gvisor => RuntimeName::Gvisor,
        }),
        read_only_rootfs: s.read_only_rootfs,
        user_namespace: s.user_namespace,
    }
}

fn time_ms(ms: i64) -> Option<Time> {
    Timestamp::from_millisecond(ms).ok().map(Time)
}

/// A store phase as the CRD spells it.
pub fn phase_to_crd(p: Phase) -> SandboxPhase {
    match p {
        Phase::Pending => SandboxPhase::Pending,
        Phase::Bound => SandboxPhase::Bound,
        Phase::Running => SandboxPhase::Running,
        Phase::Terminating => SandboxPhase::Terminating,
        Phase::Expired => SandboxPhase::Expired,
        Phase::Failed => SandboxPhase::Failed,
        Phase::Lost => SandboxPhase::Lost,
        Phase::Succeeded => SandboxPhase::Succeeded,
    }
}

fn phase_from_crd(p: SandboxPhase) -> Phase {
    match p {
        SandboxPhase::Pending => Phase::Pending,
        SandboxPhase::Bound => Phase::Bound,
        SandboxPhase::Running => Phase::Running,
        SandboxPhase::Terminating => Phase::Terminating,
        SandboxPhase::Expired => Phase::Expired,
        SandboxPhase::Failed => Phase::Failed,
        SandboxPhase::Lost => Phase::Lost,
        SandboxPhase::Succeeded => Phase::Succeeded,
    }
}

/// A record's timeline as `status.timeline` spells it.
pub fn crd_timeline(t: &StartTimeline) -> Timeline {
    Timeline {
        stages: t
            .stages
            .iter()
            .map(|s| Stage {
                name: s.name.clone(),
                start_us: s.start_us,
                duration_us: s.duration_us,
            })
            .collect(),
        total_us: t.total_us,
        path: t.path.as_str().to_owned(),
        note: t.note.clone(),
        started_unix_us: t.started_unix_us,
    }
}

/// `status.timeline` as a record keeps it (bounded: anyone with write access to the
/// status may have written it).
fn timeline_from_crd(t: &Timeline) -> StartTimeline {
    StartTimeline {
        path: StartPath::parse(&t.path),
        note: t.note.clone(),
        total_us: t.total_us,
        started_unix_us: t.started_unix_us,
        stages: t
            .stages
            .iter()
            .take(StartTimeline::MAX_STAGES)
            .map(|s| StartStage {
                name: s.name.clone(),
                start_us: s.start_us,
                duration_us: s.duration_us,
            })
            .collect(),
    }
    .bounded()
}

/// The hash label value of a request id.
pub fn request_id_hash(id: &RequestId) -> String {
    hex::encode(&Sha256::digest(id.as_str().as_bytes())[..20])
}

/// Labels and annotations a record puts on its object.
fn metadata_maps(r: &StoredSandbox) -> (BTreeMap<String, String>, BTreeMap<String, String>) {
    let mut labels = r.labels.clone();
    labels.insert(LABEL_ID.to_owned(), r.sandbox_id.to_string());
    labels.insert(LABEL_CLAIM_UID.to_owned(), r.uid.clone());
    let mut annotations = BTreeMap::from([
        (
            ANNOTATION_SPEC_DIGEST.to_owned(),
            hex::encode(r.spec_digest.0),
        ),
        (ANNOTATION_CREATED_MS.to_owned(), r.created_ms.to_string()),
    ]);
    if let Some(id) = &r.request_id {
        labels.insert(LABEL_REQUEST_ID_HASH.to_owned(), request_id_hash(id));
        annotations.insert(ANNOTATION_REQUEST_ID.to_owned(), id.to_string());
    }
    (labels, annotations)
}

/// The status fields the store owns, as a merge patch (nulls clear).
fn status_patch(
    r: &StoredSandbox,
    previous: Option<&SandboxStatus>,
    pod: Option<&str>,
) -> serde_json::Value {
    let phase = phase_to_crd(r.phase);
    let changed = previous.and_then(|s| s.phase) != Some(phase);
    // An Expired sandbox has no container; a Pending one keeps the id reserved for it
    // (a recreated sandbox must not fall back to the id of its lost container).
    let container = r.phase != Phase::Expired;
    let mut v = json!({
        "phase": phase,
        "sandboxID": container.then(|| r.sandbox_id.as_str()),
        "agentUID": r.agent.as_ref().map(ToString::to_string),
        "nodeName": r.node.as_ref().map(ToString::to_string),
        "exitCode": r.exit_code,
        "acceptedResetRevision": r.accepted_reset_revision,
        "timeline": r.timeline.as_ref().map(crd_timeline),
    });
    if r.agent.is_none() {
        v["assignedPod"] = serde_json::Value::Null;
    } else if let Some(pod) = pod {
        v["assignedPod"] = json!(pod);
    }
    if changed {
        v["phaseTime"] = json!(Time(Timestamp::now()));
    }
    v
}

fn api_error(e: kube::Error) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// A write's error as the store trait spells it (409 from a resourceVersion
/// precondition is a conflict).
fn write_error(e: kube::Error, ns: &NamespaceName, name: &SandboxName) -> StoreError {
    match &e {
        kube::Error::Api(s) if s.code == 409 && s.reason == "AlreadyExists" => {
            StoreError::AlreadyExists {
                namespace: ns.clone(),
                name: name.clone(),
            }
        }
        kube::Error::Api(s) if s.code == 409 => StoreError::Conflict {
            namespace: ns.clone(),
            name: name.clone(),
            expected: 0,
            actual: 0,
        },
        kube::Error::Api(s) if s.code == 404 => not_found(ns, name),
        _ => StoreError::Unavailable(e.to_string()),
    }
}

fn not_found(ns: &NamespaceName, name: &SandboxName) -> StoreError {
    StoreError::NotFound {
        namespace: ns.clone(),
        name: name.clone(),
    }
}

fn version_of(obj: &Sandbox) -> u64 {
    obj.metadata
        .resource_version
        .as_deref()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

impl SandboxStore for KubeStore {
    async fn create(&self, record: StoredSandbox) -> Result<StoredSandbox, StoreError> {
        if let Some(id) = &record.request_id
            && let Some(other) = self.get_by_request_id(id).await?
        {
            return Err(StoreError::RequestIdTaken {
                request_id: id.clone(),
                namespace: other.namespace,
                name: other.name,
            });
        }
        let (key_ns, key_name) = (&record.namespace, &record.name);
        let (ns, name) = (key_ns.as_str(), key_name.as_str());
        let (labels, mut annotations) = metadata_maps(&record);
        annotations.insert(
            ANNOTATION_INITIAL_STATUS.to_owned(),
            status_patch(&record, None, self.pod_name(&record).as_deref()).to_string(),
        );
        let obj = Sandbox {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                namespace: Some(ns.to_owned()),
                labels: Some(labels),
                annotations: Some(annotations),
                finalizers: Some(vec![SANDBOX_FINALIZER.to_owned()]),
                ..ObjectMeta::default()
            },
            spec: crd_spec(&record),
            status: None,
        };
        let created = self
            .api(ns)
            .create(&PostParams::default(), &obj)
            .await
            .map_err(|e| write_error(e, key_ns, key_name))?;
        let version = created
            .metadata
            .resource_version
            .clone()
            .unwrap_or_default();
        let stored = self
            .patch_status(
                key_ns,
                key_name,
                &version,
                status_patch(&record, None, None),
            )
            .await?;
        self.record(&stored)
    }

    async fn get(
        &self,
        namespace: &NamespaceName,
        name: &SandboxName,
    ) -> Result<Option<StoredSandbox>, StoreError> {
        match self.get_object(namespace.as_str(), name.as_str()).await? {
            Some(o) => self.record(&o).map(Some),
            None => Ok(None),
        }
    }

    async fn get_by_request_id(
        &self,
        request_id: &RequestId,
    ) -> Result<Option<StoredSandbox>, StoreError> {
        let selector = format!("{LABEL_REQUEST_ID_HASH}={}", request_id_hash(request_id));
        Ok(self
            .list_objects(Some(&selector))
            .await?
            .iter()
            .filter(|o| {
                o.metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(ANNOTATION_REQUEST_ID))
                    .is_some_and(|r| r == request_id.as_str())
            })
            .find_map(|o| self.record(o).ok()))
    }

    async fn get_by_sandbox_id(
        &self,
        sandbox_id: &SandboxId,
    ) -> Result<Option<StoredSandbox>, StoreError> {
        let selector = format!("{LABEL_ID}={sandbox_id}");
        Ok(self
            .list_objects(Some(&selector))
            .await?
            .iter()
            .filter_map(|o| self.record(o).ok())
            .find(|r| r.sandbox_id == *sandbox_id))
    }

    async fn list(&self, filter: &ListFilter) -> Result<Vec<StoredSandbox>, StoreError> {
        let objects = match &filter.namespace {
            Some(ns) => {
                self.api(ns.as_str())
                    .list(&ListParams::default())
                    .await
                    .map_err(api_error)?
                    .items
            }
            None => self.list_objects(None).await?,
        };
        let mut out: Vec<StoredSandbox> = objects
            .iter()
            .filter_map(|o| self.record(o).ok())
            .filter(|r| filter.matches(r))
            .collect();
        out.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        Ok(out)
    }

    async fn update(&self, record: StoredSandbox) -> Result<StoredSandbox, StoreError> {
        let (key_ns, key_name) = (&record.namespace, &record.name);
        let (ns, name) = (key_ns.as_str(), key_name.as_str());
        let current = self
            .get_object(ns, name)
            .await?
            .ok_or_else(|| not_found(key_ns, key_name))?;
        let current_version = version_of(&current);
        if current_version != record.resource_version {
            return Err(StoreError::Conflict {
                namespace: key_ns.clone(),
                name: key_name.clone(),
                expected: record.resource_version,
                actual: current_version,
            });
        }
        let mut version = current
            .metadata
            .resource_version
            .clone()
            .unwrap_or_default();
        // Metadata and spec first (a separate write from the status subresource), only
        // if they change.
        let (mut labels, annotations) = metadata_maps(&record);
        let current_labels = current.metadata.labels.clone().unwrap_or_default();
        // A kubectl-created object keeps its own uid as the claim uid.
        if !current_labels.contains_key(LABEL_CLAIM_UID)
            && current.metadata.uid.as_deref() == Some(record.uid.as_str())
        {
            labels.remove(LABEL_CLAIM_UID);
        }
        let mut current_annotations = current.metadata.annotations.clone().unwrap_or_default();
        let spec = crd_spec(&record);
        let spec_changed = spec.expire_time != current.spec.expire_time
            || spec.failure_policy != current.spec.failure_policy
            || spec.recovery_timeout_seconds != current.spec.recovery_timeout_seconds
            || spec.reset_revision != current.spec.reset_revision;
        let annotations_changed = annotations
            .iter()
            .any(|(k, v)| current_annotations.get(k) != Some(v));
        // A Sandbox made with kubectl gets the finalizer with its first write (placement
        // writes Bound before the container exists), so deleting it waits for cleanup.
        let mut finalizers = current.metadata.finalizers.clone().unwrap_or_default();
        let add_finalizer = current.metadata.deletion_timestamp.is_none()
            && !finalizers.iter().any(|f| f == SANDBOX_FINALIZER);
        if add_finalizer {
            finalizers.push(SANDBOX_FINALIZER.to_owned());
        }
        if labels != current_labels || spec_changed || annotations_changed || add_finalizer {
            // Removed labels are nulled in the merge patch.
            let mut label_patch: serde_json::Map<String, serde_json::Value> = current_labels
                .keys()
                .filter(|k| !labels.contains_key(*k))
                .map(|k| (k.clone(), serde_json::Value::Null))
                .collect();
            for (k, v) in &labels {
                label_patch.insert(k.clone(), json!(v));
            }
            current_annotations.extend(annotations);
            let patch = json!({
                "metadata": {
                    "resourceVersion": version,
                    "labels": label_patch,
                    "annotations": current_annotations,
                    "finalizers": finalizers,
                },
                "spec": {
                    "expireTime": spec.expire_time,
                    "failurePolicy": spec.failure_policy,
                    "recoveryTimeoutSeconds": spec.recovery_timeout_seconds,
                    "resetRevision": spec.reset_revision,
                },
            });
            let written = self
                .api(ns)
                .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .map_err(|e| write_error(e, key_ns, key_name))?;
            version = written.metadata.resource_version.unwrap_or_default();
        }
        let stored = self
            .patch_status(
                key_ns,
                key_name,
                &version,
                status_patch(
                    &record,
                    current.status.as_ref(),
                    self.pod_name(&record).as_deref(),
                ),
            )
            .await?;
        self.record(&stored)
    }

    async fn delete(
        &self,
        namespace: &NamespaceName,
        name: &SandboxName,
        expected_version: Option<u64>,
    ) -> Result<StoredSandbox, StoreError> {
        let (key_ns, key_name) = (namespace, name);
        let (ns, name) = (namespace.as_str(), name.as_str());
        let mut obj = self
            .get_object(ns, name)
            .await?
            .ok_or_else(|| not_found(key_ns, key_name))?;
        let version = version_of(&obj);
        if let Some(expected) = expected_version
            && expected != version
        {
            return Err(StoreError::Conflict {
                namespace: key_ns.clone(),
                name: key_name.clone(),
                expected,
                actual: version,
            });
        }
        let api = self.api(ns);
        if obj.metadata.deletion_timestamp.is_none() {
            let params = DeleteParams {
                preconditions: Some(Preconditions {
                    uid: obj.metadata.uid.clone(),
                    resource_version: obj.metadata.resource_version.clone(),
                }),
                ..DeleteParams::default()
            };
            match api.delete(name, &params).await {
                Ok(answer) => match answer.left() {
                    Some(o) => obj = o,
                    // Gone at once: it carried no finalizer.
                    None => return self.record(&obj),
                },
                Err(e) => return Err(write_error(e, key_ns, key_name)),
            }
        }
        let last = self.record(&obj);
        let finalizers: Vec<String> = obj
            .metadata
            .finalizers
            .clone()
            .unwrap_or_default()
            .into_iter()
            .filter(|f| f != SANDBOX_FINALIZER)
            .collect();
        let patch = json!({
            "metadata": {
                "resourceVersion": obj.metadata.resource_version,
                "finalizers": finalizers,
            }
        });
        match api
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(write_error(e, key_ns, key_name)),
        }
        last
    }

    fn watch(&self) -> broadcast::Receiver<StoreEvent> {
        self.events.subscribe()
    }
}

/// Pool name of a record, for callers that only have the object.
pub fn pool_of(obj: &Sandbox) -> Option<PoolName> {
    PoolName::parse("spec.poolRef", &obj.spec.pool_ref).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An object as a fast-path create writes it, before its status write.
    fn created_object(status: Option<serde_json::Value>) -> Sandbox {
        let mut obj: Sandbox = serde_json::from_value(json!({
            "apiVersion": "sandbox.fast.io/v1alpha1",
            "kind": "Sandbox",
            "metadata": {
                "name": "s1",
                "namespace": "ns",
                "uid": "0b6f1c5e-0000-4000-8000-000000000001",
                "labels": {
                    LABEL_ID: "8da65084d2c64d90a576dc165b5e62c7",
                    LABEL_CLAIM_UID: "claim-1",
                },
                "annotations": {
                    ANNOTATION_INITIAL_STATUS: json!({
                        "phase": "Running",
                        "sandboxID": "8da65084d2c64d90a576dc165b5e62c7",
                        "agentUID": "agent-1",
                    }).to_string(),
                },
            },
            "spec": {"image": "busybox", "poolRef": "p"},
        }))
        .unwrap();
        obj.status = status.map(|s| serde_json::from_value(s).unwrap());
        obj
    }

    #[test]
    fn an_object_whose_status_write_never_happened_reads_as_it_was_created() {
        let rec = to_record(&created_object(None), &SpecLimits::default()).unwrap();
        assert_eq!(
            rec.phase,
            Phase::Running,
            "not a kubectl-made Pending object"
        );
        assert_eq!(rec.sandbox_id.as_str(), "8da65084d2c64d90a576dc165b5e62c7");
        assert_eq!(rec.agent, Some(AgentId::from("agent-1")));
    }

    #[test]
    fn a_written_status_wins_over_the_creation_annotation() {
        let obj = created_object(Some(json!({"phase": "Failed", "exitCode": 3})));
        let rec = to_record(&obj, &SpecLimits::default()).unwrap();
        assert_eq!(rec.phase, Phase::Failed);
        assert_eq!(rec.exit_code, Some(3));
        // The id still comes from the id label when the status has none.
        assert_eq!(rec.sandbox_id.as_str(), "8da65084d2c64d90a576dc165b5e62c7");
    }

    #[test]
    fn the_timeline_round_trips_through_the_status_and_its_patch() {
        let t = StartTimeline {
            path: StartPath::Warm,
            note: "n".into(),
            total_us: 900,
            started_unix_us: 7,
            stages: vec![StartStage {
                name: "runtime".into(),
                start_us: 10,
                duration_us: 800,
            }],
        };
        let mut rec = to_record(&created_object(None), &SpecLimits::default()).unwrap();
        rec.timeline = Some(t.clone());
        let patch = status_patch(&rec, None, None);
        assert_eq!(patch["timeline"]["path"], "warm");
        assert_eq!(patch["timeline"]["startedUnixUs"], 7);
        assert_eq!(patch["timeline"]["stages"][0]["durationUs"], 800);
        let obj = created_object(Some(patch));
        let back = to_record(&obj, &SpecLimits::default()).unwrap();
        assert_eq!(back.timeline, Some(t));
        // An empty note is written, so a merge patch cannot keep an old one.
        rec.timeline = Some(StartTimeline::default());
        assert_eq!(status_patch(&rec, None, None)["timeline"]["note"], "");
    }
}
