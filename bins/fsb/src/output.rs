//! What commands print: CRD-shaped JSON/YAML documents (prost types have no serde,
//! so the conversion is written here) and aligned tables.
//!
//! The same document types parse `fsb run -f` manifests, so `fsb get -o yaml` output
//! can be fed back to `fsb run -f`.

#![allow(clippy::print_stdout)] // this module prints the commands' results

use std::{
    collections::BTreeMap,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use fsb_proto::fastpath::v1 as fp;
use serde::{Deserialize, Serialize};

use crate::{cli::OutputFormat, error::CliError};

/// The CRD's group/version.
pub(crate) const API_VERSION: &str = "sandbox.fast.io/v1alpha1";
/// The CRD's kind.
pub(crate) const KIND: &str = "Sandbox";

/// A sandbox as the CRD shows it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct SandboxDoc {
    #[serde(default)]
    pub(crate) api_version: String,
    #[serde(default)]
    pub(crate) kind: String,
    #[serde(default)]
    pub(crate) metadata: MetadataDoc,
    #[serde(default)]
    pub(crate) spec: SpecDoc,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) status: Option<StatusDoc>,
}

/// `metadata`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub(crate) struct MetadataDoc {
    pub(crate) namespace: String,
    pub(crate) name: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub(crate) uid: String,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub(crate) labels: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) creation_timestamp: Option<String>,
}

/// `spec`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub(crate) struct SpecDoc {
    pub(crate) image: String,
    pub(crate) pool_ref: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) command: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) args: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) envs: Vec<EnvDoc>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub(crate) working_dir: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) exposed_ports: Vec<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) resources: Option<ResourcesDoc>,
    /// runc, crun or gvisor.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub(crate) runtime: String,
    /// Manual or AutoRecreate.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub(crate) failure_policy: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) recovery_timeout_seconds: Option<u32>,
    /// RFC 3339.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) expire_time: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) reset_revision: Option<i64>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub(crate) read_only_rootfs: bool,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub(crate) user_namespace: bool,
}

/// `spec.envs[]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct EnvDoc {
    pub(crate) name: String,
    #[serde(default)]
    pub(crate) value: String,
}

/// `spec.resources`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct ResourcesDoc {
    #[serde(skip_serializing_if = "String::is_empty")]
    pub(crate) cpu: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub(crate) memory: String,
    #[serde(skip_serializing_if = "is_zero")]
    pub(crate) pids: u32,
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

/// `status`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub(crate) struct StatusDoc {
    /// Pending, Bound, Running, ...
    pub(crate) phase: String,
    pub(crate) assigned_agent: String,
    pub(crate) node_name: String,
    pub(crate) sandbox_id: String,
    pub(crate) endpoints: Vec<EndpointDoc>,
    pub(crate) exit_code: Option<i32>,
    pub(crate) recorded: bool,
    pub(crate) accepted_reset_revision: i64,
    pub(crate) observed_generation: i64,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) conditions: Vec<ConditionDoc>,
    pub(crate) timeline: Option<TimelineDoc>,
}

/// `status.endpoints[]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct EndpointDoc {
    pub(crate) host: String,
    pub(crate) port: u32,
}

/// `status.conditions[]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub(crate) struct ConditionDoc {
    #[serde(rename = "type")]
    pub(crate) type_: String,
    pub(crate) status: String,
    pub(crate) reason: String,
    pub(crate) message: String,
    pub(crate) last_transition_time: Option<String>,
}

/// `status.timeline`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub(crate) struct TimelineDoc {
    pub(crate) stages: Vec<StageDoc>,
    pub(crate) total_us: u64,
    /// cold or warm.
    pub(crate) path: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub(crate) note: String,
    /// When the user process started, Unix microseconds (agent's clock); 0: unknown.
    #[serde(skip_serializing_if = "is_zero_u64")]
    pub(crate) started_unix_us: u64,
}

fn is_zero_u64(v: &u64) -> bool {
    *v == 0
}

/// `status.timeline.stages[]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub(crate) struct StageDoc {
    pub(crate) name: String,
    pub(crate) start_us: u64,
    pub(crate) duration_us: u64,
}

/// A list of sandboxes (`fsb ls -o json`).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct SandboxListDoc {
    pub(crate) api_version: &'static str,
    pub(crate) kind: &'static str,
    pub(crate) items: Vec<SandboxDoc>,
    /// Ready warm instances of the pools listed.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) warm: Vec<WarmLevelDoc>,
}

/// Ready warm instances of one image and runtime in one pool (`fsb ls`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct WarmLevelDoc {
    pub(crate) namespace: String,
    pub(crate) pool_ref: String,
    pub(crate) image: String,
    pub(crate) runtime: &'static str,
    pub(crate) ready: u32,
}

impl From<&fp::WarmLevel> for WarmLevelDoc {
    fn from(w: &fp::WarmLevel) -> Self {
        Self {
            namespace: w.namespace.clone(),
            pool_ref: w.pool_ref.clone(),
            image: w.image.clone(),
            runtime: runtime_name(w.runtime),
            ready: w.ready,
        }
    }
}

/// Pool and agent usage (`fsb top -o json|yaml`).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct UsageDoc {
    pub(crate) kind: &'static str,
    pub(crate) pools: Vec<PoolUsageDoc>,
    pub(crate) agents: Vec<AgentUsageDoc>,
    pub(crate) warm: Vec<WarmLevelDoc>,
}

/// `pools[]` of [`UsageDoc`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct PoolUsageDoc {
    pub(crate) namespace: String,
    pub(crate) pool_ref: String,
    pub(crate) agents: u32,
    pub(crate) healthy_agents: u32,
    pub(crate) slots_used: u32,
    pub(crate) slots_capacity: u32,
    pub(crate) slots_free: u32,
    pub(crate) warm_ready: u32,
}

/// `agents[]` of [`UsageDoc`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct AgentUsageDoc {
    pub(crate) agent_id: String,
    pub(crate) namespace: String,
    pub(crate) pool_ref: String,
    pub(crate) node_name: String,
    pub(crate) healthy: bool,
    pub(crate) slots_used: u32,
    pub(crate) slots_capacity: u32,
    pub(crate) warm_ready: u32,
    pub(crate) ports_used: u32,
}

impl From<&fp::UsageResponse> for UsageDoc {
    fn from(u: &fp::UsageResponse) -> Self {
        Self {
            kind: "Usage",
            pools: u
                .pools
                .iter()
                .map(|p| PoolUsageDoc {
                    namespace: p.namespace.clone(),
                    pool_ref: p.pool_ref.clone(),
                    agents: p.agents,
                    healthy_agents: p.healthy_agents,
                    slots_used: p.slots_used,
                    slots_capacity: p.slots_capacity,
                    slots_free: p.slots_free,
                    warm_ready: p.warm_ready,
                })
                .collect(),
            agents: u
                .agents
                .iter()
                .map(|a| AgentUsageDoc {
                    agent_id: a.agent_id.clone(),
                    namespace: a.namespace.clone(),
                    pool_ref: a.pool_ref.clone(),
                    node_name: a.node_name.clone(),
                    healthy: a.healthy,
                    slots_used: a.slots_used,
                    slots_capacity: a.slots_capacity,
                    warm_ready: a.warm_ready,
                    ports_used: a.ports_used,
                })
                .collect(),
            warm: u.warm.iter().map(WarmLevelDoc::from).collect(),
        }
    }
}

/// A protobuf timestamp as RFC 3339 (UTC, seconds), `None` if unset or before 1970.
pub(crate) fn rfc3339(ts: Option<&prost_types::Timestamp>) -> Option<String> {
    system_time(ts?).map(|t| humantime::format_rfc3339_seconds(t).to_string())
}

pub(crate) fn system_time(ts: &prost_types::Timestamp) -> Option<SystemTime> {
    let secs = u64::try_from(ts.seconds).ok()?;
    let nanos = u32::try_from(ts.nanos).ok()?;
    UNIX_EPOCH.checked_add(Duration::new(secs, nanos))
}

pub(crate) fn phase_name(phase: i32) -> &'static str {
    match fp::Phase::try_from(phase).unwrap_or_default() {
        fp::Phase::Unspecified => "",
        fp::Phase::Pending => "Pending",
        fp::Phase::Bound => "Bound",
        fp::Phase::Running => "Running",
        fp::Phase::Terminating => "Terminating",
        fp::Phase::Expired => "Expired",
        fp::Phase::Failed => "Failed",
        fp::Phase::Lost => "Lost",
        fp::Phase::Succeeded => "Succeeded",
    }
}

pub(crate) fn runtime_name(runtime: i32) -> &'static str {
    match fp::Runtime::try_from(runtime).unwrap_or_default() {
        fp::Runtime::Unspecified => "",
        fp::Runtime::Runc => "runc",
        fp::Runtime::Crun => "crun",
        fp::Runtime::Gvisor => "gvisor",
    }
}

pub(crate) fn failure_policy_name(policy: i32) -> &'static str {
    match fp::FailurePolicy::try_from(policy).unwrap_or_default() {
        fp::FailurePolicy::Unspecified => "",
        fp::FailurePolicy::Manual => "Manual",
        fp::FailurePolicy::AutoRecreate => "AutoRecreate",
    }
}

impl From<&fp::Timeline> for TimelineDoc {
    fn from(t: &fp::Timeline) -> Self {
        Self {
            stages: t
                .stages
                .iter()
                .map(|s| StageDoc {
                    name: s.name.clone(),
                    start_us: s.start_us,
                    duration_us: s.duration_us,
                })
                .collect(),
            total_us: t.total_us,
            path: t.path.clone(),
            note: t.note.clone(),
            started_unix_us: t.started_unix_us,
        }
    }
}

impl From<&fp::SandboxSpec> for SpecDoc {
    fn from(s: &fp::SandboxSpec) -> Self {
        Self {
            image: s.image.clone(),
            pool_ref: s.pool_ref.clone(),
            command: s.command.clone(),
            args: s.args.clone(),
            envs: s
                .envs
                .iter()
                .map(|e| EnvDoc {
                    name: e.name.clone(),
                    value: e.value.clone(),
                })
                .collect(),
            working_dir: s.working_dir.clone(),
            exposed_ports: s.exposed_ports.clone(),
            resources: s
                .resources
                .as_ref()
                .map(|r| ResourcesDoc {
                    cpu: r.cpu.clone(),
                    memory: r.memory.clone(),
                    pids: r.pids,
                })
                .filter(|r| r != &ResourcesDoc::default()),
            runtime: runtime_name(s.runtime).to_owned(),
            failure_policy: failure_policy_name(s.failure_policy).to_owned(),
            recovery_timeout_seconds: Some(s.recovery_timeout_seconds).filter(|v| *v != 0),
            expire_time: rfc3339(s.expire_time.as_ref()),
            reset_revision: Some(s.reset_revision).filter(|v| *v != 0),
            read_only_rootfs: s.read_only_rootfs,
            user_namespace: s.user_namespace,
        }
    }
}

impl From<&fp::SandboxStatus> for StatusDoc {
    fn from(s: &fp::SandboxStatus) -> Self {
        Self {
            phase: phase_name(s.phase).to_owned(),
            assigned_agent: s.assigned_agent.clone(),
            node_name: s.node_name.clone(),
            sandbox_id: s.sandbox_id.clone(),
            endpoints: s
                .endpoints
                .iter()
                .map(|e| EndpointDoc {
                    host: e.host.clone(),
                    port: e.port,
                })
                .collect(),
            exit_code: s.exit_code,
            recorded: s.recorded,
            accepted_reset_revision: s.accepted_reset_revision,
            observed_generation: s.observed_generation,
            conditions: s
                .conditions
                .iter()
                .map(|c| ConditionDoc {
                    type_: c.r#type.clone(),
                    status: c.status.clone(),
                    reason: c.reason.clone(),
                    message: c.message.clone(),
                    last_transition_time: rfc3339(c.last_transition_time.as_ref()),
                })
                .collect(),
            timeline: s.timeline.as_ref().map(TimelineDoc::from),
        }
    }
}

impl From<&fp::Sandbox> for SandboxDoc {
    fn from(s: &fp::Sandbox) -> Self {
        Self {
            api_version: API_VERSION.to_owned(),
            kind: KIND.to_owned(),
            metadata: MetadataDoc {
                namespace: s.namespace.clone(),
                name: s.name.clone(),
                uid: s.uid.clone(),
                labels: s
                    .labels
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
                creation_timestamp: rfc3339(s.create_time.as_ref()),
            },
            spec: s.spec.as_ref().map(SpecDoc::from).unwrap_or_default(),
            status: Some(s.status.as_ref().map(StatusDoc::from).unwrap_or_default()),
        }
    }
}

/// Render `value` as JSON (pretty) or YAML.
pub(crate) fn render_doc<T: Serialize>(
    format: OutputFormat,
    value: &T,
) -> Result<String, CliError> {
    let text = match format {
        OutputFormat::Yaml => serde_yaml::to_string(value).map_err(anyhow::Error::from)?,
        OutputFormat::Json | OutputFormat::Table => {
            let mut s = serde_json::to_string_pretty(value).map_err(anyhow::Error::from)?;
            s.push('\n');
            s
        }
    };
    Ok(text)
}

/// `value` as one line of JSON (a stream of snapshots).
pub(crate) fn json_line<T: Serialize>(value: &T) -> Result<String, CliError> {
    let mut s = serde_json::to_string(value).map_err(anyhow::Error::from)?;
    s.push('\n');
    Ok(s)
}

/// Columns aligned on the widest cell, two spaces apart (kubectl's look).
pub(crate) fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut l = String::new();
        for (i, cell) in cells.enumerate() {
            let w = widths.get(i).copied().unwrap_or(0);
            l.push_str(&format!("{cell:<w$}  "));
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&mut headers.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
    out
}

/// kubectl-style age: 45s, 12m, 3h, 2d.
pub(crate) fn age(created: Option<&prost_types::Timestamp>, now: SystemTime) -> String {
    let Some(t) = created.and_then(system_time) else {
        return "<unknown>".to_owned();
    };
    let secs = now.duration_since(t).unwrap_or_default().as_secs();
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 2 * 3600 => format!("{}m", s / 60),
        s if s < 2 * 86_400 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

/// The `fsb ls` table.
pub(crate) fn sandbox_table(sandboxes: &[fp::Sandbox], now: SystemTime) -> String {
    let rows: Vec<Vec<String>> = sandboxes
        .iter()
        .map(|s| {
            let status = s.status.clone().unwrap_or_default();
            let spec = s.spec.clone().unwrap_or_default();
            let ports = if status.endpoints.is_empty() {
                spec.exposed_ports
                    .iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(",")
            } else {
                status
                    .endpoints
                    .iter()
                    .map(|e| format!("{}:{}", e.host, e.port))
                    .collect::<Vec<_>>()
                    .join(",")
            };
            vec![
                s.namespace.clone(),
                s.name.clone(),
                phase_name(status.phase).to_owned(),
                spec.image,
                status.assigned_agent,
                age(s.create_time.as_ref(), now),
                ports,
            ]
        })
        .collect();
    table(
        &[
            "NAMESPACE",
            "NAME",
            "PHASE",
            "IMAGE",
            "AGENT",
            "AGE",
            "PORTS",
        ],
        &rows,
    )
}

/// Ready warm instances per pool, image and runtime (below `fsb ls`'s sandboxes).
pub(crate) fn warm_table(levels: &[fp::WarmLevel]) -> String {
    let rows: Vec<Vec<String>> = levels
        .iter()
        .map(|w| {
            vec![
                w.namespace.clone(),
                w.pool_ref.clone(),
                w.image.clone(),
                runtime_name(w.runtime).to_owned(),
                w.ready.to_string(),
            ]
        })
        .collect();
    table(
        &["NAMESPACE", "POOL", "WARM_IMAGE", "RUNTIME", "READY"],
        &rows,
    )
}

/// The `fsb top` tables: pools, then agents, then warm levels if any.
pub(crate) fn usage_tables(u: &fp::UsageResponse) -> String {
    let pools: Vec<Vec<String>> = u
        .pools
        .iter()
        .map(|p| {
            vec![
                p.namespace.clone(),
                p.pool_ref.clone(),
                format!("{}/{}", p.healthy_agents, p.agents),
                format!("{}/{}", p.slots_used, p.slots_capacity),
                p.slots_free.to_string(),
                p.warm_ready.to_string(),
            ]
        })
        .collect();
    let agents: Vec<Vec<String>> = u
        .agents
        .iter()
        .map(|a| {
            vec![
                a.namespace.clone(),
                a.pool_ref.clone(),
                a.agent_id.clone(),
                a.node_name.clone(),
                if a.healthy { "healthy" } else { "unhealthy" }.to_owned(),
                format!("{}/{}", a.slots_used, a.slots_capacity),
                a.warm_ready.to_string(),
                a.ports_used.to_string(),
            ]
        })
        .collect();
    let mut out = table(
        &["NAMESPACE", "POOL", "HEALTHY", "SLOTS", "FREE", "WARM"],
        &pools,
    );
    out.push('\n');
    out.push_str(&table(
        &[
            "NAMESPACE",
            "POOL",
            "AGENT",
            "NODE",
            "STATE",
            "SLOTS",
            "WARM",
            "PORTS",
        ],
        &agents,
    ));
    if !u.warm.is_empty() {
        out.push('\n');
        out.push_str(&warm_table(&u.warm));
    }
    out
}

/// Stages with durations in milliseconds (for `run --timings` and `get`).
pub(crate) fn timeline_text(t: &fp::Timeline) -> String {
    let ms = |us: u64| us as f64 / 1000.0;
    let rows: Vec<Vec<String>> = t
        .stages
        .iter()
        .map(|s| {
            vec![
                s.name.clone(),
                format!("{:.3}", ms(s.start_us)),
                format!("{:.3}", ms(s.duration_us)),
            ]
        })
        .collect();
    let mut out = table(&["STAGE", "START_MS", "DURATION_MS"], &rows);
    out.push_str(&format!(
        "total {:.3} ms{}{}\n",
        ms(t.total_us),
        if t.path.is_empty() {
            String::new()
        } else {
            format!(" ({} path)", t.path)
        },
        if t.note.is_empty() {
            String::new()
        } else {
            format!("; {}", t.note)
        }
    ));
    out
}

/// The `fsb get` table: one field per line, then the timeline.
pub(crate) fn sandbox_detail(s: &fp::Sandbox) -> String {
    let doc = SandboxDoc::from(s);
    let status = doc.status.clone().unwrap_or_default();
    let mut fields: Vec<(&str, String)> = vec![
        ("Name", doc.metadata.name.clone()),
        ("Namespace", doc.metadata.namespace.clone()),
        ("UID", doc.metadata.uid.clone()),
        ("Phase", status.phase.clone()),
        ("Image", doc.spec.image.clone()),
        ("Pool", doc.spec.pool_ref.clone()),
        ("Command", shell_words(&doc.spec.command, &doc.spec.args)),
        ("Agent", status.assigned_agent.clone()),
        ("Node", status.node_name.clone()),
        ("Sandbox ID", status.sandbox_id.clone()),
        (
            "Endpoints",
            status
                .endpoints
                .iter()
                .map(|e| format!("{}:{}", e.host, e.port))
                .collect::<Vec<_>>()
                .join(", "),
        ),
        ("Recorded", status.recorded.to_string()),
        (
            "Created",
            doc.metadata.creation_timestamp.clone().unwrap_or_default(),
        ),
        ("Expires", doc.spec.expire_time.clone().unwrap_or_default()),
        (
            "Labels",
            doc.metadata
                .labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(","),
        ),
    ];
    if let Some(code) = status.exit_code {
        fields.push(("Exit code", code.to_string()));
    }
    for c in &status.conditions {
        fields.push((
            "Condition",
            format!("{}={} {} {}", c.type_, c.status, c.reason, c.message)
                .trim_end()
                .to_owned(),
        ));
    }
    let mut out = String::new();
    for (k, v) in fields {
        out.push_str(&format!("{:<12}{}\n", format!("{k}:"), v));
    }
    if let Some(t) = s.status.as_ref().and_then(|st| st.timeline.as_ref()) {
        out.push_str("Timeline:\n");
        for line in timeline_text(t).lines() {
            out.push_str("  ");
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

fn shell_words(command: &[String], args: &[String]) -> String {
    command
        .iter()
        .chain(args)
        .map(|w| {
            if w.is_empty() || w.contains(|c: char| c.is_whitespace() || c == '\'' || c == '"') {
                format!("{w:?}")
            } else {
                w.clone()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Print a command's result on stdout.
pub(crate) fn print(text: &str) {
    print!("{text}");
}

/// Print a sandbox in the requested format (table: its name only, for scripts).
pub(crate) fn print_sandbox_name_or_doc(
    format: OutputFormat,
    s: &fp::Sandbox,
) -> Result<(), CliError> {
    match format {
        OutputFormat::Table => println!("{}", s.name),
        f => print(&render_doc(f, &SandboxDoc::from(s))?),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> fp::Sandbox {
        fp::Sandbox {
            namespace: "default".into(),
            name: "web".into(),
            uid: "u-1".into(),
            labels: [("app".to_owned(), "x".to_owned())].into(),
            spec: Some(fp::SandboxSpec {
                pool_ref: "default".into(),
                image: "busybox".into(),
                command: vec!["sleep".into()],
                args: vec!["60".into()],
                exposed_ports: vec![8080],
                runtime: fp::Runtime::Crun as i32,
                failure_policy: fp::FailurePolicy::AutoRecreate as i32,
                ..Default::default()
            }),
            status: Some(fp::SandboxStatus {
                phase: fp::Phase::Running as i32,
                assigned_agent: "agent-1".into(),
                sandbox_id: "sbx-1".into(),
                endpoints: vec![fp::Endpoint {
                    host: "127.0.0.1".into(),
                    port: 8080,
                }],
                recorded: true,
                timeline: Some(fp::Timeline {
                    stages: vec![fp::Stage {
                        name: "runtime".into(),
                        start_us: 100,
                        duration_us: 2500,
                    }],
                    total_us: 2600,
                    path: "cold".into(),
                    note: String::new(),
                    started_unix_us: 0,
                }),
                ..Default::default()
            }),
            create_time: Some(prost_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 0,
            }),
        }
    }

    #[test]
    fn json_mirrors_the_crd() {
        let v: serde_json::Value = serde_json::from_str(
            &render_doc(OutputFormat::Json, &SandboxDoc::from(&sample())).unwrap(),
        )
        .unwrap();
        assert_eq!(v["apiVersion"], API_VERSION);
        assert_eq!(v["kind"], "Sandbox");
        assert_eq!(v["metadata"]["name"], "web");
        assert_eq!(v["metadata"]["creationTimestamp"], "2023-11-14T22:13:20Z");
        assert_eq!(v["metadata"]["labels"]["app"], "x");
        assert_eq!(v["spec"]["poolRef"], "default");
        assert_eq!(v["spec"]["exposedPorts"][0], 8080);
        assert_eq!(v["spec"]["runtime"], "crun");
        assert_eq!(v["spec"]["failurePolicy"], "AutoRecreate");
        assert_eq!(v["status"]["phase"], "Running");
        assert_eq!(v["status"]["assignedAgent"], "agent-1");
        assert_eq!(v["status"]["sandboxId"], "sbx-1");
        assert_eq!(v["status"]["exitCode"], serde_json::Value::Null);
        assert_eq!(v["status"]["timeline"]["stages"][0]["durationUs"], 2500);
        assert_eq!(v["status"]["timeline"]["totalUs"], 2600);
        assert_eq!(v["status"]["timeline"]["path"], "cold");
    }

    #[test]
    fn yaml_round_trips_through_the_document_type() {
        let doc = SandboxDoc::from(&sample());
        let yaml = render_doc(OutputFormat::Yaml, &doc).unwrap();
        assert!(yaml.contains("phase: Running"), "{yaml}");
        let back: SandboxDoc = serde_yaml::from_str(&yaml).unwrap();
        assert_eq!(back, doc);
    }

    #[test]
    fn ls_table_has_the_documented_columns() {
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000 + 300);
        let t = sandbox_table(&[sample()], now);
        let mut lines = t.lines();
        let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
        assert_eq!(
            header,
            [
                "NAMESPACE",
                "NAME",
                "PHASE",
                "IMAGE",
                "AGENT",
                "AGE",
                "PORTS"
            ]
        );
        let row: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
        assert_eq!(
            row,
            [
                "default",
                "web",
                "Running",
                "busybox",
                "agent-1",
                "5m",
                "127.0.0.1:8080"
            ]
        );
    }

    #[test]
    fn warm_levels_are_a_table_of_their_own() {
        let t = warm_table(&[fp::WarmLevel {
            namespace: "default".into(),
            pool_ref: "default".into(),
            image: "docker.io/library/busybox:latest".into(),
            runtime: fp::Runtime::Gvisor as i32,
            ready: 3,
        }]);
        let lines: Vec<Vec<&str>> = t.lines().map(|l| l.split_whitespace().collect()).collect();
        assert_eq!(
            lines,
            [
                vec!["NAMESPACE", "POOL", "WARM_IMAGE", "RUNTIME", "READY"],
                vec![
                    "default",
                    "default",
                    "docker.io/library/busybox:latest",
                    "gvisor",
                    "3"
                ]
            ]
        );
    }

    #[test]
    fn ages_read_like_kubectl() {
        let t0 = prost_types::Timestamp {
            seconds: 1000,
            nanos: 0,
        };
        let at = |s| UNIX_EPOCH + Duration::from_secs(s);
        assert_eq!(age(Some(&t0), at(1045)), "45s");
        assert_eq!(age(Some(&t0), at(1000 + 600)), "10m");
        assert_eq!(age(Some(&t0), at(1000 + 3 * 3600)), "3h");
        assert_eq!(age(Some(&t0), at(1000 + 3 * 86_400)), "3d");
        assert_eq!(age(None, at(0)), "<unknown>");
    }

    #[test]
    fn detail_includes_the_timeline() {
        let d = sandbox_detail(&sample());
        assert!(d.contains("Phase:      Running"), "{d}");
        assert!(d.contains("Command:    sleep 60"), "{d}");
        assert!(d.contains("runtime"), "{d}");
        assert!(d.contains("2.500"), "{d}");
        assert!(d.contains("total 2.600 ms (cold path)"), "{d}");
    }

    #[test]
    fn top_shows_unhealthy_agents_and_warm_levels_last() {
        let u = fp::UsageResponse {
            agents: vec![fp::AgentUsage {
                agent_id: "a2".into(),
                namespace: "ns".into(),
                pool_ref: "p".into(),
                node_name: "n".into(),
                healthy: false,
                slots_used: 1,
                slots_capacity: 2,
                warm_ready: 0,
                ports_used: 0,
            }],
            pools: vec![fp::PoolUsage {
                namespace: "ns".into(),
                pool_ref: "p".into(),
                agents: 1,
                slots_used: 1,
                slots_capacity: 2,
                ..Default::default()
            }],
            warm: vec![fp::WarmLevel {
                namespace: "ns".into(),
                pool_ref: "p".into(),
                image: "img".into(),
                runtime: fp::Runtime::Runc as i32,
                ready: 4,
            }],
        };
        let t = usage_tables(&u);
        let lines: Vec<Vec<&str>> = t.lines().map(|l| l.split_whitespace().collect()).collect();
        assert_eq!(lines[1], ["ns", "p", "0/1", "1/2", "0", "0"], "{t}");
        assert_eq!(
            lines[4],
            ["ns", "p", "a2", "n", "unhealthy", "1/2", "0", "0"],
            "{t}"
        );
        assert_eq!(
            lines.last().unwrap(),
            &["ns", "p", "img", "runc", "4"],
            "{t}"
        );
        let v: serde_json::Value =
            serde_json::from_str(&json_line(&UsageDoc::from(&u)).unwrap()).unwrap();
        assert_eq!(v["agents"][0]["healthy"], false);
        assert_eq!(v["warm"][0]["runtime"], "runc");
        assert!(
            !json_line(&UsageDoc::from(&u))
                .unwrap()
                .trim_end()
                .contains('\n')
        );
    }

    #[test]
    fn the_timeline_document_carries_the_note_and_process_start() {
        let mut s = sample();
        if let Some(t) = s.status.as_mut().and_then(|st| st.timeline.as_mut()) {
            t.note = "cold: no warm instance".into();
            t.started_unix_us = 1_700_000_000_000_000;
        }
        let v: serde_json::Value =
            serde_json::from_str(&render_doc(OutputFormat::Json, &SandboxDoc::from(&s)).unwrap())
                .unwrap();
        assert_eq!(v["status"]["timeline"]["note"], "cold: no warm instance");
        assert_eq!(
            v["status"]["timeline"]["startedUnixUs"],
            1_700_000_000_000_000u64
        );
        assert!(sandbox_detail(&s).contains("(cold path); cold: no warm instance"));
    }
}
