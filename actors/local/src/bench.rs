//! `fsb bench`: create latency through the gateway, optionally against raw containerd
//! creates made in the same run.
//!
//! - fsb path: `FastPath.Create` timed client-side from send to response (the
//!   sandbox is running when Create returns); each sandbox is deleted afterwards,
//!   untimed.
//! - raw path (`--compare-raw`): the minimal `containerd-client` sequence against the
//!   same containerd: create lease, prepare the image's chain id as an overlayfs
//!   snapshot (leased), create the container with the OCI spec `fsb_agent::build_spec`
//!   writes, create the task, start it; timed from the first call until Start returns.
//!   The spec is built before the timed span, as the agent builds it before its
//!   containerd calls. Removal is untimed.
//!
//! - several modes (`--mode fast,strong`): one fsb path per consistency mode, each
//!   measured in the same run (STRONG writes the record before answering, FAST after).
//!
//! Rounds rotate between the paths (fsb then raw, then raw then fsb, ...), so drift
//! and containerd's background work (garbage collection after removals) hit all
//! alike. A round is `round` creates of one path with `concurrency` in flight at all
//! times (a new create starts as soon as one ends), then their untimed removal. With
//! the default round of `concurrency` creates, every round ends on its slowest
//! create; a longer round (`--round 100`) measures a sustained rate. Compare the
//! ratio, never absolute numbers from different runs.

use futures::StreamExt as _;
use std::{
    future::Future,
    path::PathBuf,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use containerd_client::services::v1::{
    Container, CreateContainerRequest, CreateTaskRequest, StartRequest,
    containers_client::ContainersClient,
    snapshots::{PrepareSnapshotRequest, snapshots_client::SnapshotsClient},
    tasks_client::TasksClient,
};
use fsb_agent::{
    AgentError, ImageConfig, NetworkMode, SpecInput, build_spec,
    containerd::{Containerd, ContainerdConfig, DEFAULT_CALL_TIMEOUT, SNAPSHOTTER},
    image::{ImageStore, RegistryOptions, ResolvedImage},
    runtime::ContainerdRuntime,
};
use fsb_core::{
    ImageRef, SandboxId,
    spec::{Runtime, SandboxSpec, SpecLimits, ValidSpec},
};
use fsb_proto::fastpath::v1 as fp;
use serde::Serialize;
use tonic::{metadata::MetadataValue, transport::Channel};

use crate::{DataDir, DefaultMode};

/// containerd namespace of every container fast-sandbox makes (raw ones too, so both
/// paths share containerd's per-namespace state).
pub const CONTAINERD_NAMESPACE: &str = "fast-sandbox";
/// The system containerd, used when the data directory has no private one.
pub const SYSTEM_CONTAINERD_SOCKET: &str = "/run/containerd/containerd.sock";
/// Command of every benchmarked sandbox: long enough to outlive the measurement.
pub const BENCH_COMMAND: [&str; 2] = ["sleep", "3600"];
/// Label on raw containers, so a leftover one is recognisable (no `managed` label:
/// the agent must not adopt them).
pub const LABEL_BENCH: &str = "fast-sandbox.io/bench";

const SPEC_TYPE_URL: &str = "types.containerd.io/opencontainers/runtime-spec/1/Spec";
/// A raw container's lease outlives the bench only if the bench dies mid-way.
const RAW_LEASE_LIFETIME: Duration = Duration::from_secs(600);

/// Errors of a benchmark run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The configuration cannot be run.
    #[error("{0}")]
    Config(String),
    /// A fast-path call failed.
    #[error("{op}: {status}", status = .status.message())]
    FastPath {
        /// Which call.
        op: &'static str,
        /// What the gateway said (its code decides the CLI's exit code).
        status: tonic::Status,
    },
    /// `stop` was set; everything created so far has been removed.
    #[error("interrupted after {done} creates per path; their sandboxes were removed")]
    Interrupted {
        /// Creates per path completed (warm-up included).
        done: usize,
    },
    /// A raw containerd step failed.
    #[error("raw containerd: {op}: {source}")]
    Raw {
        /// Which step.
        op: &'static str,
        /// Why.
        source: AgentError,
    },
}

impl BenchError {
    fn raw(op: &'static str) -> impl FnOnce(AgentError) -> Self {
        move |source| Self::Raw { op, source }
    }
}

/// The containerd socket `fsb bench --compare-raw` uses by default: the data
/// directory's private containerd if `fsb up` started one, else the system one.
pub fn default_containerd_socket(data_dir: &DataDir) -> PathBuf {
    let private = data_dir.containerd_dir().join("containerd.sock");
    if private.exists() {
        private
    } else {
        PathBuf::from(SYSTEM_CONTAINERD_SOCKET)
    }
}

/// The runsc `fsb bench --compare-raw --runtime gvisor` uses by default: the wrapper
/// `fsb up` wrote in the data directory (gVisor without its netstack, as the agent runs
/// it; plain runsc refuses to start in the host's network namespace), else `runsc`.
pub fn default_runsc(data_dir: &DataDir) -> PathBuf {
    let wrapper = crate::containerd::runsc_wrapper(data_dir);
    if wrapper.exists() {
        wrapper
    } else {
        PathBuf::from("runsc")
    }
}

/// Where the raw path creates its containers.
#[derive(Clone, Debug)]
pub struct RawTarget {
    /// containerd's socket (the one `fsb up` uses, or the comparison is meaningless).
    pub socket: PathBuf,
    /// containerd namespace ([`CONTAINERD_NAMESPACE`]).
    pub namespace: String,
    /// Parent of the OCI runtimes' state roots.
    pub runtime_root: PathBuf,
    /// runsc binary or wrapper, for `--runtime gvisor`.
    pub runsc_binary: PathBuf,
}

impl RawTarget {
    /// Defaults for `socket`: namespace `fast-sandbox`, runtime state under
    /// `/run/fast-sandbox/bench`, `runsc` from `PATH`.
    pub fn new(socket: PathBuf) -> Self {
        Self {
            socket,
            namespace: CONTAINERD_NAMESPACE.to_owned(),
            runtime_root: PathBuf::from("/run/fast-sandbox/bench"),
            runsc_binary: PathBuf::from("runsc"),
        }
    }
}

/// One benchmark run.
#[derive(Clone, Debug)]
pub struct BenchConfig {
    /// Measured creates per path.
    pub count: usize,
    /// Creates in flight at once.
    pub concurrency: usize,
    /// Creates per path and round, removed after the round; `0` is `concurrency`.
    pub round: usize,
    /// Creates per path discarded before measuring.
    pub warmup: usize,
    /// Image of every sandbox (must be present: the bench measures creates, not pulls).
    pub image: String,
    /// Pool of the fsb creates.
    pub pool: String,
    /// Namespace of the fsb creates.
    pub namespace: String,
    /// Runtime of both paths; `None` is the server's default for fsb and runc for raw.
    pub runtime: Option<Runtime>,
    /// Consistency modes of the fsb creates, one measured path each; empty is one
    /// path in the server's default mode.
    pub modes: Vec<DefaultMode>,
    /// Also measure raw containerd creates.
    pub raw: Option<RawTarget>,
    /// Measure fsb creates to the moment the user process started (the agent's
    /// report, on this machine's clock) instead of to the response, and count warm
    /// and cold creates: what warm instances change.
    pub warm: bool,
}

/// Latency summary of one path, in milliseconds (nearest-rank percentiles).
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Summary {
    /// Median.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Slowest sample.
    pub max_ms: f64,
}

impl Summary {
    /// The summary of `samples`; `None` when there are none.
    pub fn of(samples: &[Duration]) -> Option<Self> {
        let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        ms.sort_by(f64::total_cmp);
        Some(Self {
            p50_ms: round3(percentile(&ms, 50.0)?),
            p90_ms: round3(percentile(&ms, 90.0)?),
            p99_ms: round3(percentile(&ms, 99.0)?),
            max_ms: round3(*ms.last()?),
        })
    }
}

/// Nearest-rank percentile of sorted values: the smallest value with at least `p`
/// percent of the samples at or below it (no interpolation: every reported number is
/// a latency that happened).
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

fn round3(v: f64) -> f64 {
    (v * 1e3).round() / 1e3
}

/// What `fsb bench` reports; serializes exactly as `--json` prints it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BenchReport {
    /// Measured creates per path.
    pub count: usize,
    /// Creates in flight at once.
    pub concurrency: usize,
    /// Through the gateway, in the first mode asked for.
    pub fsb: Summary,
    /// Raw containerd, when compared.
    pub raw: Option<Summary>,
    /// fsb p50 / raw p50, when compared.
    pub ratio_p50: Option<f64>,
    /// Every fsb path, one per mode, in the order asked for.
    pub modes: Vec<ModeReport>,
    /// With `--warm`: `"process started"` (fsb latencies run from sending the create
    /// to the user process's start; raw ones end at the task's start, the same
    /// moment). Absent otherwise (latencies end at the response).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub measured_to: Option<&'static str>,
    /// p50 of each stage of the fsb paths (from the create timelines), in order; shown
    /// in the table, not in the JSON (whose shape is fixed).
    #[serde(skip)]
    pub fsb_stages: Vec<Vec<(String, f64)>>,
    /// p50 of each raw stage (lease, snapshot, container, task, start).
    #[serde(skip)]
    pub raw_stages: Vec<(String, f64)>,
    /// With `--warm`: each fsb path's times from sending to the answer (the stage
    /// `response`), which with creates kept in flight set the rate; shown in the table.
    #[serde(skip)]
    pub fsb_responses: Vec<Option<Summary>>,
}

/// One fsb path of the report.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ModeReport {
    /// `fast`, `strong`, or `default` (the server's).
    pub mode: String,
    /// Its latencies.
    #[serde(flatten)]
    pub summary: Summary,
    /// Its p50 / raw p50, when compared.
    pub ratio_p50: Option<f64>,
    /// With `--warm`: measured creates that took a warm instance.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warm: Option<usize>,
    /// With `--warm`: measured creates that went cold.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cold: Option<usize>,
    /// With `--warm`: measured creates per second of round wall time (creates only,
    /// the untimed removals excluded; the warmup runs in batches of its own first).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub creates_per_s: Option<f64>,
}

/// How a mode is named in the report.
fn mode_name(mode: Option<DefaultMode>) -> &'static str {
    match mode {
        None => "default",
        Some(DefaultMode::Fast) => "fast",
        Some(DefaultMode::Strong) => "strong",
    }
}

/// Per-stage durations of one create, in order.
pub type Stages = Vec<(String, Duration)>;

/// One fsb create: its latency, stages, and (name, whether it was warm).
type FsbSample = (Duration, Stages, (String, bool));

/// The p50 (ms) of every stage name, in first-seen order.
fn stage_p50s(samples: &[Stages]) -> Vec<(String, f64)> {
    let mut order: Vec<String> = Vec::new();
    let mut by_name: std::collections::HashMap<String, Vec<f64>> = Default::default();
    for stages in samples {
        for (name, d) in stages {
            if !by_name.contains_key(name) {
                order.push(name.clone());
            }
            by_name
                .entry(name.clone())
                .or_default()
                .push(d.as_secs_f64() * 1000.0);
        }
    }
    order
        .into_iter()
        .filter_map(|name| {
            let mut v = by_name.remove(&name)?;
            v.sort_by(f64::total_cmp);
            Some((name, round3(percentile(&v, 50.0)?)))
        })
        .collect()
}

impl BenchReport {
    /// The report of the fsb paths' samples (one set per mode, at least one) and the
    /// raw path's when compared.
    pub fn from_samples(
        concurrency: usize,
        fsb: &[(Option<DefaultMode>, Vec<Duration>)],
        raw: Option<&[Duration]>,
    ) -> Option<Self> {
        let raw = match raw {
            Some(samples) => Some(Summary::of(samples)?),
            None => None,
        };
        let ratio = |s: &Summary| {
            raw.filter(|r| r.p50_ms > 0.0)
                .map(|r| round3(s.p50_ms / r.p50_ms))
        };
        let modes = fsb
            .iter()
            .map(|(mode, samples)| {
                let summary = Summary::of(samples)?;
                Some(ModeReport {
                    mode: mode_name(*mode).to_owned(),
                    ratio_p50: ratio(&summary),
                    summary,
                    warm: None,
                    cold: None,
                    creates_per_s: None,
                })
            })
            .collect::<Option<Vec<_>>>()?;
        let first = modes.first()?;
        Some(Self {
            fsb_stages: Vec::new(),
            fsb_responses: Vec::new(),
            raw_stages: Vec::new(),
            count: fsb.first()?.1.len(),
            concurrency,
            fsb: first.summary,
            ratio_p50: first.ratio_p50,
            raw,
            modes,
            measured_to: None,
        })
    }

    /// The `--json` document (one line).
    pub fn to_json(&self) -> String {
        // Serializing plain numbers and options cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// The human report.
    pub fn to_table(&self) -> String {
        let mut out = format!(
            "{:<10} {:>6} {:>11} {:>10} {:>10} {:>10} {:>10}\n",
            "path", "count", "concurrency", "p50 ms", "p90 ms", "p99 ms", "max ms"
        );
        let several = self.modes.len() > 1;
        let label = |m: &ModeReport| {
            if several {
                format!("fsb {}", m.mode)
            } else {
                "fsb".to_owned()
            }
        };
        let mut row = |name: &str, s: &Summary| {
            out.push_str(&format!(
                "{name:<10} {:>6} {:>11} {:>10.2} {:>10.2} {:>10.2} {:>10.2}\n",
                self.count, self.concurrency, s.p50_ms, s.p90_ms, s.p99_ms, s.max_ms
            ));
        };
        for m in &self.modes {
            row(&label(m), &m.summary);
        }
        if let Some(raw) = &self.raw {
            row("raw", raw);
        }
        for m in &self.modes {
            if let Some(ratio) = m.ratio_p50 {
                out.push_str(&format!(
                    "ratio_p50 ({} / raw, same run): {ratio:.3}\n",
                    label(m)
                ));
            }
        }
        if let [first, rest @ ..] = self.modes.as_slice() {
            for m in rest.iter().filter(|_| first.summary.p50_ms > 0.0) {
                out.push_str(&format!(
                    "ratio_p50 ({} / {}, same run): {:.3}\n",
                    label(m),
                    label(first),
                    m.summary.p50_ms / first.summary.p50_ms
                ));
            }
        }
        if let Some(to) = self.measured_to {
            out.push_str(&format!("fsb latencies run from the create to the {to}\n"));
        }
        for m in &self.modes {
            if let (Some(w), Some(c)) = (m.warm, m.cold) {
                out.push_str(&format!("{}: {w} warm, {c} cold", label(m)));
                if let Some(rate) = m.creates_per_s {
                    out.push_str(&format!(", {rate:.1} creates/s"));
                }
                out.push('\n');
            }
        }
        for (m, r) in self.modes.iter().zip(&self.fsb_responses) {
            if let Some(r) = r {
                out.push_str(&format!(
                    "{} answered in ms: p50 {:.2}, p90 {:.2}, p99 {:.2}, max {:.2}\n",
                    label(m),
                    r.p50_ms,
                    r.p90_ms,
                    r.p99_ms,
                    r.max_ms
                ));
            }
        }
        for (m, stages) in self.modes.iter().zip(&self.fsb_stages) {
            stage_line(&mut out, &label(m), stages);
        }
        stage_line(&mut out, "raw", &self.raw_stages);
        out
    }
}

/// `PATH stage p50 ms: a 1.00, b 2.00` (nothing when there are no stages).
fn stage_line(out: &mut String, path: &str, stages: &[(String, f64)]) {
    if !stages.is_empty() {
        let parts: Vec<String> = stages
            .iter()
            .map(|(n, ms)| format!("{n} {ms:.2}"))
            .collect();
        out.push_str(&format!("{path} stage p50 ms: {}\n", parts.join(", ")));
    }
}

/// The fast path as the bench drives it: one HTTP/2 connection, the bearer token on
/// every request.
#[derive(Clone, Debug)]
struct FsbPath {
    client: fp::fast_path_client::FastPathClient<Channel>,
    auth: Option<MetadataValue<tonic::metadata::Ascii>>,
    create: fp::CreateRequest,
    /// Time to the process start rather than to the response.
    to_started: bool,
}

impl FsbPath {
    fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        if let Some(auth) = &self.auth {
            req.metadata_mut().insert("authorization", auth.clone());
        }
        req
    }

    /// One create, timed from send to response (or to the process start); the
    /// created sandbox's name and whether it was warm.
    async fn create(&self) -> Result<((String, bool), Duration, Stages), BenchError> {
        let mut msg = self.create.clone();
        msg.request_id = uuid::Uuid::new_v4().to_string();
        let req = self.request(msg);
        let mut client = self.client.clone();
        let sent_us = unix_us();
        let t = Instant::now();
        let resp = client
            .create(req)
            .await
            .map_err(|status| BenchError::FastPath {
                op: "create",
                status,
            })?;
        let responded = t.elapsed();
        let mut elapsed = responded;
        let resp = resp.into_inner();
        let timeline = resp.timeline.unwrap_or_default();
        let warm = timeline.path == "warm";
        if self.to_started {
            if timeline.started_unix_us == 0 {
                return Err(BenchError::Config(
                    "--warm: the server does not report process start times".to_owned(),
                ));
            }
            elapsed = Duration::from_micros(timeline.started_unix_us.saturating_sub(sent_us));
        }
        let mut stages: Stages = timeline
            .stages
            .into_iter()
            .map(|s| (s.name, Duration::from_micros(s.duration_us)))
            .collect();
        if self.to_started {
            // What the client waited for in all: with creates kept in flight, this,
            // not the time to the process start, sets the rate.
            stages.push(("response".to_owned(), responded));
        }
        let name = resp.sandbox.map(|s| s.name).unwrap_or_default();
        Ok(((name, warm), elapsed, stages))
    }

    async fn delete(&self, name: String) -> Result<(), BenchError> {
        let req = self.request(fp::DeleteRequest {
            namespace: self.create.namespace.clone(),
            name,
            grace_period_seconds: Some(0),
        });
        self.client
            .clone()
            .delete(req)
            .await
            .map(|_| ())
            .map_err(|status| BenchError::FastPath {
                op: "delete",
                status,
            })
    }
}

fn unix_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// The raw path: what stays the same for every container.
struct RawPath {
    cd: Containerd,
    rt: ContainerdRuntime,
    image: ResolvedImage,
    image_config: ImageConfig,
    spec: ValidSpec,
    runtime: Runtime,
    netns: PathBuf,
}

impl RawPath {
    async fn connect(
        target: &RawTarget,
        image: &str,
        runtime: Runtime,
    ) -> Result<Self, BenchError> {
        let cd = Containerd::connect(ContainerdConfig {
            socket: target.socket.clone(),
            namespace: target.namespace.clone(),
            call_timeout: DEFAULT_CALL_TIMEOUT,
            runtime_root: target.runtime_root.clone(),
            runsc_binary: target.runsc_binary.clone(),
        })
        .await
        .map_err(BenchError::raw("connect"))?;
        let reference = ImageRef::parse("image", image)
            .map_err(|e| BenchError::Config(format!("--image: {e}")))?;
        let images = ImageStore::new(cd.clone(), &RegistryOptions::default())
            .map_err(BenchError::raw("image store"))?;
        // Once up front, as the agent does (it caches by digest).
        let resolved = images
            .resolve(&reference)
            .await
            .map_err(BenchError::raw("resolve image"))?;
        let image_config = ImageConfig::from_oci_config_json(&resolved.config_json)
            .map_err(BenchError::raw("image config"))?;
        let spec = SandboxSpec {
            namespace: "default".into(),
            pool_ref: "bench".into(),
            image: image.to_owned(),
            command: BENCH_COMMAND.iter().map(|s| (*s).to_owned()).collect(),
            ..SandboxSpec::default()
        }
        .validate(&SpecLimits::default())
        .map_err(|e| BenchError::Config(e.to_string()))?;
        let rt = ContainerdRuntime::new(cd.clone(), target.runtime_root.join("bench-logs"));
        Ok(Self {
            cd,
            rt,
            image: resolved,
            image_config,
            spec,
            runtime,
            // The bench's own network namespace, as the agent joins its own.
            netns: PathBuf::from(format!("/proc/{}/ns/net", std::process::id())),
        })
    }

    fn spec_json(&self, id: &SandboxId) -> Result<Vec<u8>, BenchError> {
        let doc = build_spec(&SpecInput {
            sandbox_id: id,
            spec: &self.spec,
            image: &self.image_config,
            runtime: self.runtime,
            network: NetworkMode::Join(self.netns.clone()),
            cgroups_path: format!("/{}/{}", CONTAINERD_NAMESPACE, id.as_str()),
            hostname: id.as_str().chars().take(12).collect(),
            user: (0, 0),
            mounts: Vec::new(),
            read_only_rootfs: false,
            user_namespace: None,
            drop_capabilities: Default::default(),
        })
        .map_err(BenchError::raw("build spec"))?;
        serde_json::to_vec(&doc).map_err(|e| BenchError::Config(format!("spec json: {e}")))
    }

    /// One create: the spec is built first, then timed from the lease to Start.
    async fn create(&self) -> Result<(SandboxId, Duration, Stages), BenchError> {
        let id = SandboxId::generate();
        let spec_json = self.spec_json(&id)?;
        let sid = id.as_str();
        let cd = &self.cd;
        let t = Instant::now();
        let mut stages: Stages = Vec::with_capacity(5);
        let mut mark = Instant::now();
        let mut stage = |name: &str| {
            let now = Instant::now();
            stages.push((name.to_owned(), now - mark));
            mark = now;
        };
        let created = async {
            cd.create_lease(sid, RAW_LEASE_LIFETIME)
                .await
                .map_err(BenchError::raw("create lease"))?;
            stage("lease");
            let prepare = PrepareSnapshotRequest {
                snapshotter: SNAPSHOTTER.to_owned(),
                key: sid.to_owned(),
                parent: self.image.chain_id.clone(),
                labels: Default::default(),
            };
            let rootfs = cd
                .call(
                    "prepare snapshot",
                    SnapshotsClient::new(cd.channel()).prepare(
                        cd.leased_request(prepare, sid)
                            .map_err(BenchError::raw("prepare snapshot"))?,
                    ),
                )
                .await
                .map_err(BenchError::raw("prepare snapshot"))?
                .mounts;
            stage("snapshot");
            let container = Container {
                id: sid.to_owned(),
                image: self.image.name.clone(),
                labels: [(LABEL_BENCH.to_owned(), "raw".to_owned())].into(),
                runtime: Some(cd.runtime_spec(self.runtime)),
                spec: Some(prost_types::Any {
                    type_url: SPEC_TYPE_URL.to_owned(),
                    value: spec_json,
                }),
                snapshotter: SNAPSHOTTER.to_owned(),
                snapshot_key: sid.to_owned(),
                ..Default::default()
            };
            let create = CreateContainerRequest {
                container: Some(container),
            };
            cd.call(
                "create container",
                ContainersClient::new(cd.channel()).create(
                    cd.leased_request(create, sid)
                        .map_err(BenchError::raw("create container"))?,
                ),
            )
            .await
            .map_err(BenchError::raw("create container"))?;
            stage("container");
            cd.call(
                "create task",
                TasksClient::new(cd.channel()).create(cd.request(CreateTaskRequest {
                    container_id: sid.to_owned(),
                    rootfs,
                    ..Default::default()
                })),
            )
            .await
            .map_err(BenchError::raw("create task"))?;
            stage("task");
            cd.call(
                "start task",
                TasksClient::new(cd.channel()).start(cd.request(StartRequest {
                    container_id: sid.to_owned(),
                    exec_id: String::new(),
                })),
            )
            .await
            .map_err(BenchError::raw("start task"))?;
            stage("start");
            Ok::<_, BenchError>(())
        }
        .await;
        let elapsed = t.elapsed();
        match created {
            Ok(()) => Ok((id, elapsed, stages)),
            Err(e) => {
                // Whatever was made of it goes; the create's error is the one to report.
                let _ = self.remove(id).await;
                Err(e)
            }
        }
    }

    async fn remove(&self, id: SandboxId) -> Result<(), BenchError> {
        self.rt
            .remove(&id, Duration::ZERO)
            .await
            .map(|_| ())
            .map_err(BenchError::raw("remove"))
    }
}

/// Run `n` creates, `in_flight` at a time (the next starts as soon as one ends), then
/// remove what was created (untimed); the timings, each with what its create
/// returned, and the wall time of the creates.
async fn batch<C, CF, R, RF, K>(
    n: usize,
    in_flight: usize,
    create: C,
    remove: R,
) -> Result<(Vec<(Duration, Stages, K)>, Duration), BenchError>
where
    C: Fn() -> CF,
    CF: Future<Output = Result<(K, Duration, Stages), BenchError>>,
    R: Fn(K) -> RF,
    RF: Future<Output = Result<(), BenchError>>,
    K: Clone,
{
    let wall = Instant::now();
    let results: Vec<_> = futures::stream::iter((0..n).map(|_| create()))
        .buffer_unordered(in_flight.max(1))
        .collect()
        .await;
    let wall = wall.elapsed();
    let mut timings = Vec::with_capacity(n);
    let mut created = Vec::with_capacity(n);
    let mut first_error = None;
    for r in results {
        match r {
            Ok((key, d, stages)) => {
                created.push(key.clone());
                timings.push((d, stages, key));
            }
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    let removed = futures::future::join_all(created.into_iter().map(remove)).await;
    if let Some(e) = first_error {
        return Err(e);
    }
    removed.into_iter().collect::<Result<Vec<()>, _>>()?;
    Ok((timings, wall))
}

/// The batches of a run, in order, as (creates, measured): the warmup first, in
/// batches of its own (never timed, so no measured batch mixes in a warmup create and
/// none is cut short by one), then `count` in batches of `round` (the last one
/// shorter if `round` does not divide it).
fn batch_sizes(warmup: usize, count: usize, round: usize) -> Vec<(usize, bool)> {
    let round = round.max(1);
    let chunks = |total: usize, measured: bool| {
        (0..total.div_ceil(round)).map(move |i| ((total - i * round).min(round), measured))
    };
    chunks(warmup, false).chain(chunks(count, true)).collect()
}

/// Which path a batch measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Lane {
    /// The fsb path of the `i`th mode.
    Fsb(usize),
    Raw,
}

/// The batch order of round `round`: the paths rotated by one each round, so each
/// goes first equally often and none always follows another's removals.
fn round_order(round: usize, fsb_paths: usize, compare_raw: bool) -> Vec<Lane> {
    let mut lanes: Vec<Lane> = (0..fsb_paths).map(Lane::Fsb).collect();
    if compare_raw {
        lanes.push(Lane::Raw);
    }
    let len = lanes.len().max(1);
    lanes.rotate_left(round % len);
    lanes
}

/// Measure. `channel` is a connection to the gateway; `token` goes in every
/// request's `authorization: Bearer` header. `stop` is checked between batches: once
/// set, the run ends with [`BenchError::Interrupted`] after the current batch is
/// removed (never dropped half-way, which would leave sandboxes behind).
pub async fn run(
    config: &BenchConfig,
    channel: Channel,
    token: Option<&str>,
    stop: &AtomicBool,
) -> Result<BenchReport, BenchError> {
    if config.count == 0 || config.concurrency == 0 {
        return Err(BenchError::Config(
            "--count and --concurrency must be at least 1".to_owned(),
        ));
    }
    let auth = token
        .map(|t| {
            format!("Bearer {t}")
                .parse::<MetadataValue<tonic::metadata::Ascii>>()
                .map_err(|_| BenchError::Config("the token is not a valid header".to_owned()))
        })
        .transpose()?;
    let modes: Vec<Option<DefaultMode>> = if config.modes.is_empty() {
        vec![None]
    } else {
        config.modes.iter().copied().map(Some).collect()
    };
    let template = FsbPath {
        client: fp::fast_path_client::FastPathClient::new(channel),
        auth,
        to_started: config.warm,
        create: fp::CreateRequest {
            request_id: String::new(),
            namespace: config.namespace.clone(),
            name: String::new(),
            spec: Some(fp::SandboxSpec {
                pool_ref: config.pool.clone(),
                image: config.image.clone(),
                command: BENCH_COMMAND.iter().map(|s| (*s).to_owned()).collect(),
                runtime: config
                    .runtime
                    .map_or(fp::Runtime::Unspecified, fsb_agent::server::wire_runtime)
                    as i32,
                ..Default::default()
            }),
            labels: [(LABEL_BENCH.to_owned(), "fsb".to_owned())].into(),
            mode: fp::ConsistencyMode::Unspecified as i32,
            ttl: None,
        },
    };
    let paths: Vec<FsbPath> = modes
        .iter()
        .map(|mode| {
            let mut path = template.clone();
            path.create.mode = match mode {
                None => fp::ConsistencyMode::Unspecified,
                Some(DefaultMode::Fast) => fp::ConsistencyMode::Fast,
                Some(DefaultMode::Strong) => fp::ConsistencyMode::Strong,
            } as i32;
            path
        })
        .collect();
    let raw = match &config.raw {
        Some(target) => Some(
            RawPath::connect(
                target,
                &config.image,
                config.runtime.unwrap_or(Runtime::Runc),
            )
            .await?,
        ),
        None => None,
    };
    let round_size = if config.round == 0 {
        config.concurrency
    } else {
        config.round
    };
    let total = config.warmup + config.count;
    let mut fsb_samples: Vec<Vec<FsbSample>> = vec![Vec::new(); paths.len()];
    // Creates and the wall time they took, over measured batches only.
    let mut fsb_walls: Vec<(usize, Duration)> = vec![(0, Duration::ZERO); paths.len()];
    let mut raw_samples = Vec::new();
    let mut done = 0;
    for (round, (n, measured)) in batch_sizes(config.warmup, config.count, round_size)
        .into_iter()
        .enumerate()
    {
        if stop.load(Ordering::SeqCst) {
            return Err(BenchError::Interrupted { done });
        }
        for lane in round_order(round, paths.len(), raw.is_some()) {
            match (lane, &raw) {
                (Lane::Fsb(i), _) => {
                    let fsb = &paths[i];
                    let (t, wall) = batch(
                        n,
                        config.concurrency,
                        || fsb.create(),
                        |(name, _)| fsb.delete(name),
                    )
                    .await?;
                    if measured {
                        fsb_walls[i].0 += n;
                        fsb_walls[i].1 += wall;
                        fsb_samples[i].extend(t);
                    }
                }
                (Lane::Raw, Some(raw)) => {
                    let (t, _) =
                        batch(n, config.concurrency, || raw.create(), |id| raw.remove(id)).await?;
                    if measured {
                        raw_samples.extend(t.into_iter().map(|(d, s, _)| (d, s)));
                    }
                }
                (Lane::Raw, None) => {}
            }
        }
        done += n;
        tracing::debug!(done, total, "bench batch done");
    }
    let mut fsb_times = Vec::with_capacity(paths.len());
    let mut fsb_stages = Vec::with_capacity(paths.len());
    let mut fsb_responses = Vec::with_capacity(paths.len());
    let mut warm_counts = Vec::with_capacity(paths.len());
    for (mode, samples) in modes.iter().zip(fsb_samples) {
        let warm = samples.iter().filter(|(_, _, (_, w))| *w).count();
        warm_counts.push((warm, samples.len() - warm));
        let (times, stages): (Vec<Duration>, Vec<Stages>) =
            samples.into_iter().map(|(d, s, _)| (d, s)).unzip();
        fsb_times.push((*mode, times));
        let responses: Vec<Duration> = stages
            .iter()
            .filter_map(|st| st.iter().find(|(n, _)| n == "response").map(|(_, d)| *d))
            .collect();
        fsb_responses.push(Summary::of(&responses));
        fsb_stages.push(stage_p50s(&stages));
    }
    let (raw_times, raw_stages): (Vec<Duration>, Vec<Stages>) = raw_samples.into_iter().unzip();
    let mut report = BenchReport::from_samples(
        config.concurrency,
        &fsb_times,
        raw.as_ref().map(|_| raw_times.as_slice()),
    )
    .ok_or_else(|| BenchError::Config("no samples".to_owned()))?;
    report.fsb_stages = fsb_stages;
    report.fsb_responses = fsb_responses;
    report.raw_stages = stage_p50s(&raw_stages);
    if config.warm {
        report.measured_to = Some("process started");
        for ((m, (warm, cold)), (n, wall)) in
            report.modes.iter_mut().zip(warm_counts).zip(fsb_walls)
        {
            m.warm = Some(warm);
            m.cold = Some(cold);
            m.creates_per_s =
                (wall > Duration::ZERO).then(|| round3(n as f64 / wall.as_secs_f64()));
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: &[u64]) -> Vec<Duration> {
        v.iter().map(|&m| Duration::from_millis(m)).collect()
    }

    #[test]
    fn the_warmup_runs_in_batches_of_its_own_before_the_measured_rounds() {
        assert_eq!(
            batch_sizes(3, 500, 100),
            [
                (3, false),
                (100, true),
                (100, true),
                (100, true),
                (100, true),
                (100, true)
            ]
        );
        assert_eq!(
            batch_sizes(10, 20, 8),
            [(8, false), (2, false), (8, true), (8, true), (4, true)]
        );
        assert_eq!(batch_sizes(0, 2, 0), [(1, true), (1, true)]);
    }

    #[test]
    fn nearest_rank_percentiles() {
        let sorted: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&sorted, 50.0), Some(50.0));
        assert_eq!(percentile(&sorted, 90.0), Some(90.0));
        assert_eq!(percentile(&sorted, 99.0), Some(99.0));
        assert_eq!(percentile(&sorted, 100.0), Some(100.0));
        assert_eq!(percentile(&[7.0], 99.0), Some(7.0));
        assert_eq!(percentile(&[1.0, 2.0, 3.0, 4.0], 50.0), Some(2.0));
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn summary_sorts_and_keeps_the_max() {
        let s = Summary::of(&ms(&[30, 10, 20, 100, 40])).unwrap();
        assert_eq!(s.p50_ms, 30.0);
        assert_eq!(s.p90_ms, 100.0);
        assert_eq!(s.max_ms, 100.0);
        assert!(Summary::of(&[]).is_none());
        let sub = Summary::of(&[Duration::from_micros(1234)]).unwrap();
        assert_eq!(sub.p50_ms, 1.234);
    }

    #[test]
    fn json_has_exactly_the_documented_shape() {
        let r = BenchReport::from_samples(
            2,
            &[(Some(DefaultMode::Fast), ms(&[10, 20]))],
            Some(&ms(&[5, 10])),
        )
        .unwrap();
        assert_eq!(
            r.to_json(),
            r#"{"count":2,"concurrency":2,"fsb":{"p50_ms":10.0,"p90_ms":20.0,"p99_ms":20.0,"max_ms":20.0},"raw":{"p50_ms":5.0,"p90_ms":10.0,"p99_ms":10.0,"max_ms":10.0},"ratio_p50":2.0,"modes":[{"mode":"fast","p50_ms":10.0,"p90_ms":20.0,"p99_ms":20.0,"max_ms":20.0,"ratio_p50":2.0}]}"#
        );
        let alone = BenchReport::from_samples(1, &[(None, ms(&[10]))], None).unwrap();
        let v: serde_json::Value = serde_json::from_str(&alone.to_json()).unwrap();
        assert!(v["raw"].is_null());
        assert!(v["ratio_p50"].is_null());
        assert_eq!(v["count"], 1);
    }

    #[test]
    fn a_warm_run_says_what_it_measured_and_counts_warm_and_cold() {
        let mut r = BenchReport::from_samples(1, &[(None, ms(&[2, 3]))], None).unwrap();
        let plain: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        assert!(plain.get("measured_to").is_none(), "absent unless --warm");
        assert!(plain["modes"][0].get("warm").is_none());
        r.measured_to = Some("process started");
        r.modes[0].warm = Some(1);
        r.modes[0].cold = Some(1);
        let table = r.to_table();
        assert!(
            table.contains("from the create to the process started"),
            "{table}"
        );
        assert!(table.contains("fsb: 1 warm, 1 cold"), "{table}");
        let v: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(v["measured_to"], "process started");
        assert_eq!(
            (
                v["modes"][0]["warm"].as_u64(),
                v["modes"][0]["cold"].as_u64()
            ),
            (Some(1), Some(1))
        );
    }

    #[test]
    fn table_shows_both_paths_and_the_ratio() {
        let r =
            BenchReport::from_samples(1, &[(None, ms(&[12, 14]))], Some(&ms(&[10, 10]))).unwrap();
        let t = r.to_table();
        assert!(
            t.lines()
                .any(|l| l.starts_with("fsb") && l.contains("12.00")),
            "{t}"
        );
        assert!(
            t.lines()
                .any(|l| l.starts_with("raw") && l.contains("10.00")),
            "{t}"
        );
        assert!(t.contains("ratio_p50 (fsb / raw, same run): 1.200"), "{t}");
        let alone = BenchReport::from_samples(1, &[(None, ms(&[12]))], None)
            .unwrap()
            .to_table();
        assert!(!alone.contains("raw"), "{alone}");
    }

    #[test]
    fn several_modes_are_one_path_each_with_their_ratios() {
        let r = BenchReport::from_samples(
            1,
            &[
                (Some(DefaultMode::Fast), ms(&[10, 10])),
                (Some(DefaultMode::Strong), ms(&[15, 15])),
            ],
            Some(&ms(&[5, 5])),
        )
        .unwrap();
        assert_eq!(r.fsb.p50_ms, 10.0, "fsb is the first mode");
        assert_eq!(r.ratio_p50, Some(2.0));
        assert_eq!(r.modes[1].mode, "strong");
        assert_eq!(r.modes[1].ratio_p50, Some(3.0));
        let t = r.to_table();
        assert!(t.contains("fsb fast"), "{t}");
        assert!(t.contains("fsb strong"), "{t}");
        assert!(
            t.contains("ratio_p50 (fsb strong / raw, same run): 3.000"),
            "{t}"
        );
        assert!(
            t.contains("ratio_p50 (fsb strong / fsb fast, same run): 1.500"),
            "{t}"
        );
    }

    #[test]
    fn rounds_alternate_which_path_goes_first() {
        assert_eq!(round_order(0, 1, true), [Lane::Fsb(0), Lane::Raw]);
        assert_eq!(round_order(1, 1, true), [Lane::Raw, Lane::Fsb(0)]);
        assert_eq!(round_order(1, 1, false), [Lane::Fsb(0)]);
        assert_eq!(
            round_order(2, 2, true),
            [Lane::Raw, Lane::Fsb(0), Lane::Fsb(1)]
        );
    }

    #[test]
    fn default_socket_prefers_the_private_containerd() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DataDir::new(tmp.path());
        assert_eq!(
            default_containerd_socket(&dir),
            PathBuf::from(SYSTEM_CONTAINERD_SOCKET)
        );
        std::fs::create_dir_all(dir.containerd_dir()).unwrap();
        std::fs::write(dir.containerd_dir().join("containerd.sock"), b"").unwrap();
        assert_eq!(
            default_containerd_socket(&dir),
            dir.containerd_dir().join("containerd.sock")
        );
    }

    #[tokio::test]
    async fn a_set_stop_flag_ends_the_run_before_any_create() {
        let channel = tonic::transport::Endpoint::from_static("http://127.0.0.1:1").connect_lazy();
        let config = BenchConfig {
            count: 3,
            concurrency: 1,
            round: 0,
            warmup: 0,
            image: "busybox".into(),
            pool: "default".into(),
            namespace: "default".into(),
            runtime: None,
            modes: Vec::new(),
            raw: None,
            warm: false,
        };
        let err = run(&config, channel, None, &AtomicBool::new(true))
            .await
            .unwrap_err();
        assert!(matches!(err, BenchError::Interrupted { done: 0 }), "{err}");
    }

    #[tokio::test]
    async fn a_round_keeps_exactly_its_concurrency_in_flight() {
        use std::sync::atomic::AtomicUsize;
        let (now, peak, made) = (
            AtomicUsize::new(0),
            AtomicUsize::new(0),
            AtomicUsize::new(0),
        );
        let (timings, _) = batch(
            20,
            4,
            || async {
                let i = made.fetch_add(1, Ordering::SeqCst);
                let running = now.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(running, Ordering::SeqCst);
                // Uneven durations: a new create must start as soon as any one ends.
                tokio::time::sleep(Duration::from_millis(1 + (i as u64 % 3) * 5)).await;
                now.fetch_sub(1, Ordering::SeqCst);
                Ok((i, Duration::from_millis(1), Vec::new()))
            },
            |_| async { Ok(()) },
        )
        .await
        .unwrap();
        assert_eq!(timings.len(), 20);
        assert_eq!(peak.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn batches_remove_what_they_created_even_when_one_create_fails() {
        use std::sync::atomic::AtomicUsize;
        let made = AtomicUsize::new(0);
        let removed = AtomicUsize::new(0);
        let result = batch(
            3,
            3,
            || async {
                let i = made.fetch_add(1, Ordering::SeqCst);
                if i == 1 {
                    Err(BenchError::Config("boom".into()))
                } else {
                    Ok((i, Duration::from_millis(1), Vec::new()))
                }
            },
            |_| async {
                removed.fetch_add(1, Ordering::SeqCst);
                Ok(())
            },
        )
        .await;
        assert!(result.is_err());
        assert_eq!(removed.load(Ordering::SeqCst), 2);
    }
}
