//! Agent create -> task running, against the same sequence made with `containerd-client`
//! directly ("raw"), for runc, crun and gVisor, measured in one run (issue 3: ours at
//! p50 within 1.10x of raw for runc).
//!
//! Per runtime, the two paths alternate iteration by iteration (raw, ours, then ours,
//! raw, ...), so drift and containerd's background work hit both alike. Both use the
//! same connection, image, runtime options and OCI spec (built by
//! `fsb_agent::oci::build_spec` for each container id, outside the timed span):
//!
//! - raw: create lease, prepare snapshot (leased), create container (leased), create
//!   task, start task: the minimal sequence; timed from the first call until Start
//!   returns. Removal is not timed.
//! - ours: `ContainerdRuntime::create(&plan)` (log files, lease, prepare, container,
//!   lease delete, task with stdout/stderr to the log files, start), timed the same
//!   way; removal (`remove(id, 0)`) is not timed.
//!
//! Needs the private containerd of `tests/scripts/with-containerd.sh`; run it with
//! `benches/run.sh agent_create [--count N] [--warmup N] [--runtimes runc,crun,gvisor]
//! [--raw-logs] [--json]`.

#![allow(clippy::print_stdout)] // the table is this benchmark's report

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use containerd_client::{
    services::v1::{
        Container, CreateContainerRequest, CreateRequest as CreateLeaseRequest, CreateTaskRequest,
        StartRequest,
        containers_client::ContainersClient,
        leases_client::LeasesClient,
        snapshots::{PrepareSnapshotRequest, snapshots_client::SnapshotsClient},
        tasks_client::TasksClient,
    },
    tonic::transport::Channel,
};
use fsb_agent::{
    ImageConfig, NetworkMode, SpecInput, build_spec,
    containerd::{Containerd, ContainerdConfig, DEFAULT_CALL_TIMEOUT, SNAPSHOTTER},
    image::{ImageStore, RegistryOptions, ResolvedImage},
    runtime::{ContainerPlan, ContainerdRuntime},
};
use fsb_benches::percentiles_ms;
use fsb_core::{
    ImageRef, SandboxId,
    spec::{Runtime, SandboxSpec, SpecLimits, ValidSpec},
};
use fsb_tests::{ContainerdEnv, TestRuntime};
use serde_json::{Value, json};

const SPEC_TYPE_URL: &str = "types.containerd.io/opencontainers/runtime-spec/1/Spec";
const LEASE_EXPIRE_LABEL: &str = "containerd.io/gc.expire";
const LEASE_LIFETIME: Duration = Duration::from_secs(600);

#[derive(Debug)]
struct Args {
    count: usize,
    warmup: usize,
    runtimes: Vec<Runtime>,
    raw_logs: bool,
    json: bool,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        count: 50,
        warmup: 3,
        runtimes: vec![Runtime::Runc, Runtime::Crun, Runtime::Gvisor],
        raw_logs: false,
        json: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().with_context(|| format!("{name} needs a value"));
        match arg.as_str() {
            // cargo bench passes --bench to every bench binary.
            "--bench" => {}
            "--count" => args.count = value("--count")?.parse().context("--count")?,
            "--warmup" => args.warmup = value("--warmup")?.parse().context("--warmup")?,
            "--runtimes" => {
                args.runtimes = value("--runtimes")?
                    .split(',')
                    .map(|r| match r.trim() {
                        "runc" => Ok(Runtime::Runc),
                        "crun" => Ok(Runtime::Crun),
                        "gvisor" | "runsc" => Ok(Runtime::Gvisor),
                        other => bail!("unknown runtime {other:?} (runc, crun, gvisor)"),
                    })
                    .collect::<Result<_>>()?;
            }
            "--raw-logs" => args.raw_logs = true,
            "--json" => args.json = true,
            other => bail!(
                "unknown argument {other:?}; usage: agent_create [--count N] [--warmup N] \
                 [--runtimes runc,crun,gvisor] [--raw-logs] [--json]"
            ),
        }
    }
    ensure!(args.count > 0, "--count must be at least 1");
    Ok(args)
}

fn runtime_name(runtime: Runtime) -> &'static str {
    match runtime {
        Runtime::Runc => "runc",
        Runtime::Crun => "crun",
        Runtime::Gvisor => "gvisor",
    }
}

fn test_runtime(runtime: Runtime) -> TestRuntime {
    match runtime {
        Runtime::Runc => TestRuntime::Runc,
        Runtime::Crun => TestRuntime::Crun,
        Runtime::Gvisor => TestRuntime::Gvisor,
    }
}

/// What stays the same for every container of a run.
struct Fixture {
    env: ContainerdEnv,
    rt: ContainerdRuntime,
    /// The agent's connection; raw uses the same channel.
    channel: Channel,
    image: ResolvedImage,
    image_config: ImageConfig,
    spec: ValidSpec,
    /// The agent's network namespace: sandboxes join it (shared-netns design).
    netns: std::path::PathBuf,
    raw_logs: bool,
}

/// One container's spec and plan, built before the timed span.
struct Prepared {
    plan: ContainerPlan,
    /// `build_spec` + JSON encoding.
    build: Duration,
}

impl Fixture {
    async fn new(raw_logs: bool) -> Result<Self> {
        let env = ContainerdEnv::try_from_env()?;
        let cd = Containerd::connect(ContainerdConfig {
            socket: env.socket.clone(),
            namespace: env.namespace.clone(),
            call_timeout: DEFAULT_CALL_TIMEOUT,
            runtime_root: env.runtime_root.clone(),
            runsc_binary: env.runsc.clone(),
        })
        .await
        .context("connecting the agent's client")?;
        // Same runtime for both paths: the harness's runc options (raw) must encode
        // exactly what the agent sends.
        for runtime in [Runtime::Runc, Runtime::Crun, Runtime::Gvisor] {
            ensure!(
                cd.runtime_spec(runtime) == env.container_runtime(test_runtime(runtime)),
                "raw and agent runtime options differ for {runtime:?}"
            );
        }
        let images = ImageStore::new(cd.clone(), &RegistryOptions::default())?;
        let reference = ImageRef::parse("image", &env.image)?;
        // Once up front, as the agent does (it caches by digest).
        let image = images
            .resolve(&reference)
            .await
            .with_context(|| format!("resolving {}", env.image))?;
        let image_config = ImageConfig::from_oci_config_json(&image.config_json)?;
        let spec = SandboxSpec {
            namespace: "default".into(),
            pool_ref: "bench".into(),
            image: env.image.clone(),
            command: vec!["sleep".into(), "3600".into()],
            ..SandboxSpec::default()
        }
        .validate(&SpecLimits::default())?;
        let channel = cd.channel();
        let rt = ContainerdRuntime::new(cd, env.run_dir.join("bench-logs"));
        Ok(Self {
            netns: format!("/proc/{}/ns/net", std::process::id()).into(),
            env,
            rt,
            channel,
            image,
            image_config,
            spec,
            raw_logs,
        })
    }

    fn prepare(&self, runtime: Runtime) -> Result<Prepared> {
        let t = Instant::now();
        let id = SandboxId::generate();
        let doc = build_spec(&SpecInput {
            sandbox_id: &id,
            spec: &self.spec,
            image: &self.image_config,
            runtime,
            network: NetworkMode::Join(self.netns.clone()),
            cgroups_path: format!("/{}/{}", self.env.namespace, id.as_str()),
            hostname: id.as_str()[..12].to_owned(),
            user: (0, 0),
            mounts: Vec::new(),
            read_only_rootfs: false,
            user_namespace: None,
            drop_capabilities: Default::default(),
        })?;
        let spec_json = serde_json::to_vec(&doc)?;
        let build = t.elapsed();
        Ok(Prepared {
            plan: ContainerPlan {
                id,
                image: self.image.name.clone(),
                parent_snapshot: self.image.chain_id.clone(),
                labels: [("fast-sandbox.io/namespace".to_owned(), "default".to_owned())].into(),
                runtime,
                spec_json,
                warm: false,
            },
            build,
        })
    }

    /// The minimal containerd-client sequence; stage times in call order.
    async fn raw_create(&self, plan: &ContainerPlan) -> Result<Stages> {
        let env = &self.env;
        let id = plan.id.as_str();
        let ch = &self.channel;
        let (stdout, stderr) = if self.raw_logs {
            let dir = env.io_dir(id)?;
            for name in ["stdout.log", "stderr.log"] {
                std::fs::File::create(dir.join(name))?;
            }
            (
                dir.join("stdout.log").display().to_string(),
                dir.join("stderr.log").display().to_string(),
            )
        } else {
            (String::new(), String::new())
        };
        let mut stages = Stages::default();
        let t0 = Instant::now();

        let mut t = Instant::now();
        let expire = prost_types::Timestamp::from(std::time::SystemTime::now() + LEASE_LIFETIME);
        LeasesClient::new(ch.clone())
            .create(env.request(CreateLeaseRequest {
                id: id.to_owned(),
                labels: [(LEASE_EXPIRE_LABEL.to_owned(), expire.to_string())].into(),
            }))
            .await
            .context("raw: create lease")?;
        stages.lap("lease", &mut t);

        let rootfs = SnapshotsClient::new(ch.clone())
            .prepare(env.leased_request(
                PrepareSnapshotRequest {
                    snapshotter: SNAPSHOTTER.to_owned(),
                    key: id.to_owned(),
                    parent: plan.parent_snapshot.clone(),
                    labels: Default::default(),
                },
                id,
            )?)
            .await
            .context("raw: prepare snapshot")?
            .into_inner()
            .mounts;
        stages.lap("snapshot", &mut t);

        let container = Container {
            id: id.to_owned(),
            image: plan.image.clone(),
            runtime: Some(env.container_runtime(test_runtime(plan.runtime))),
            spec: Some(prost_types::Any {
                type_url: SPEC_TYPE_URL.to_owned(),
                value: plan.spec_json.clone(),
            }),
            snapshotter: SNAPSHOTTER.to_owned(),
            snapshot_key: id.to_owned(),
            ..Default::default()
        };
        ContainersClient::new(ch.clone())
            .create(env.leased_request(
                CreateContainerRequest {
                    container: Some(container),
                },
                id,
            )?)
            .await
            .context("raw: create container")?;
        stages.lap("container", &mut t);

        TasksClient::new(ch.clone())
            .create(env.request(CreateTaskRequest {
                container_id: id.to_owned(),
                rootfs,
                stdout,
                stderr,
                ..Default::default()
            }))
            .await
            .context("raw: create task")?;
        stages.lap("task", &mut t);

        TasksClient::new(ch.clone())
            .start(env.request(StartRequest {
                container_id: id.to_owned(),
                exec_id: String::new(),
            }))
            .await
            .context("raw: start task")?;
        stages.lap("start", &mut t);
        stages.total = t0.elapsed();
        Ok(stages)
    }

    /// Raw's container, whatever exists of it (kill, task, container, snapshot, lease).
    async fn raw_remove(&self, id: &SandboxId) -> Result<()> {
        self.env.remove_container(&self.channel, id.as_str()).await
    }

    async fn ours_create(&self, plan: &ContainerPlan) -> Result<Stages> {
        let t0 = Instant::now();
        let started = self.rt.create(plan).await.context("ours: create")?;
        let total = t0.elapsed();
        let t = started.timings;
        let staged = t.snapshot + t.container + t.task + t.start;
        let mut stages = Stages {
            total,
            ..Stages::default()
        };
        // Log files, lease and the call overhead around the stages.
        stages.push("pre+other", total.saturating_sub(staged));
        stages.push("snapshot", t.snapshot);
        stages.push("container", t.container);
        stages.push("task", t.task);
        stages.push("start", t.start);
        Ok(stages)
    }

    async fn ours_remove(&self, id: &SandboxId) -> Result<()> {
        self.rt
            .remove(id, Duration::ZERO)
            .await
            .context("ours: remove")?;
        Ok(())
    }
}

/// One create's total and its stages, in order.
#[derive(Debug, Default)]
struct Stages {
    total: Duration,
    stages: Vec<(&'static str, Duration)>,
}

impl Stages {
    fn push(&mut self, name: &'static str, d: Duration) {
        self.stages.push((name, d));
    }

    fn lap(&mut self, name: &'static str, t: &mut Instant) {
        self.push(name, t.elapsed());
        *t = Instant::now();
    }
}

/// Every measured create of one path.
#[derive(Debug, Default)]
struct Samples {
    totals: Vec<Duration>,
    stages: BTreeMap<&'static str, Vec<Duration>>,
    order: Vec<&'static str>,
}

impl Samples {
    fn record(&mut self, s: Stages) {
        self.totals.push(s.total);
        for (name, d) in s.stages {
            if !self.order.contains(&name) {
                self.order.push(name);
            }
            self.stages.entry(name).or_default().push(d);
        }
    }

    fn stage_p50s(&self) -> Vec<(&'static str, f64)> {
        self.order
            .iter()
            .map(|name| {
                let p50 = self
                    .stages
                    .get(name)
                    .map_or(f64::NAN, |v| percentiles_ms(v).0);
                (*name, p50)
            })
            .collect()
    }

    fn json(&self) -> Value {
        let (p50, p90, p99) = percentiles_ms(&self.totals);
        let stages: serde_json::Map<String, Value> = self
            .stage_p50s()
            .into_iter()
            .map(|(n, v)| (n.to_owned(), json!(round3(v))))
            .collect();
        json!({
            "count": self.totals.len(),
            "p50_ms": round3(p50), "p90_ms": round3(p90), "p99_ms": round3(p99),
            "stages_p50_ms": stages,
        })
    }
}

fn round3(v: f64) -> f64 {
    (v * 1e3).round() / 1e3
}

/// Results of one runtime.
#[derive(Debug, Default)]
struct RuntimeResult {
    raw: Samples,
    ours: Samples,
    build: Vec<Duration>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    Raw,
    Ours,
}

impl Fixture {
    /// One create + removal on `path`; `Stages` of the create.
    async fn one(&self, path: Path, runtime: Runtime) -> Result<(Stages, Duration)> {
        let prepared = self.prepare(runtime)?;
        let id = prepared.plan.id.clone();
        match path {
            Path::Raw => {
                let created = self.raw_create(&prepared.plan).await;
                // Removed whether or not the create succeeded (not timed).
                let removed = self.raw_remove(&id).await;
                let stages = created?;
                removed?;
                Ok((stages, prepared.build))
            }
            Path::Ours => {
                // A failed create removes what it made itself.
                let stages = self.ours_create(&prepared.plan).await?;
                self.ours_remove(&id).await?;
                Ok((stages, prepared.build))
            }
        }
    }

    async fn measure(&self, runtime: Runtime, args: &Args) -> Result<RuntimeResult> {
        let mut result = RuntimeResult::default();
        for i in 0..args.warmup + args.count {
            // ABBA: which path goes first alternates, so neither always follows the
            // other's removal (and the garbage collection it triggers).
            let order = if i % 2 == 0 {
                [Path::Raw, Path::Ours]
            } else {
                [Path::Ours, Path::Raw]
            };
            for path in order {
                let (stages, build) = self
                    .one(path, runtime)
                    .await
                    .with_context(|| format!("{} iteration {i}", runtime_name(runtime)))?;
                if i < args.warmup {
                    continue;
                }
                match path {
                    Path::Raw => result.raw.record(stages),
                    Path::Ours => {
                        result.ours.record(stages);
                        result.build.push(build);
                    }
                }
            }
        }
        Ok(result)
    }
}

fn print_report(args: &Args, results: &[(Runtime, RuntimeResult)]) {
    println!(
        "\nagent create -> task running vs raw containerd-client ({} per path and runtime, \
         {} warm-up discarded, paths interleaved{})",
        args.count,
        args.warmup,
        if args.raw_logs {
            "; raw also logs to files"
        } else {
            ""
        }
    );
    println!(
        "{:<8} {:<5} {:>6} {:>9} {:>9} {:>9}",
        "runtime", "path", "count", "p50 ms", "p90 ms", "p99 ms"
    );
    for (runtime, r) in results {
        for (name, s) in [("raw", &r.raw), ("ours", &r.ours)] {
            let (p50, p90, p99) = percentiles_ms(&s.totals);
            println!(
                "{:<8} {:<5} {:>6} {p50:>9.2} {p90:>9.2} {p99:>9.2}",
                runtime_name(*runtime),
                name,
                s.totals.len()
            );
        }
    }
    println!("\nratio ours / raw (same run)");
    println!("{:<8} {:>9} {:>9}", "runtime", "p50", "p99");
    for (runtime, r) in results {
        let (raw50, _, raw99) = percentiles_ms(&r.raw.totals);
        let (ours50, _, ours99) = percentiles_ms(&r.ours.totals);
        let target = if *runtime == Runtime::Runc {
            if ours50 / raw50 <= 1.10 {
                "  (target <= 1.10: met)"
            } else {
                "  (target <= 1.10: MISSED)"
            }
        } else {
            ""
        };
        println!(
            "{:<8} {:>9.3} {:>9.3}{target}",
            runtime_name(*runtime),
            ours50 / raw50,
            ours99 / raw99
        );
    }
    println!("\nstages at p50, ms (each stage's own p50; they need not add up to the total's)");
    for (runtime, r) in results {
        for (name, s) in [("raw", &r.raw), ("ours", &r.ours)] {
            let stages: Vec<String> = s
                .stage_p50s()
                .into_iter()
                .map(|(n, v)| format!("{n} {v:.2}"))
                .collect();
            println!(
                "{:<8} {:<5} {}",
                runtime_name(*runtime),
                name,
                stages.join(" | ")
            );
        }
        let (b50, _, _) = percentiles_ms(&r.build);
        println!(
            "{:<8} {:<5} build_spec + JSON (before the timed span) {b50:.3}",
            runtime_name(*runtime),
            "ours"
        );
    }
}

fn report_json(args: &Args, results: &[(Runtime, RuntimeResult)]) -> Value {
    let runtimes: Vec<Value> = results
        .iter()
        .map(|(runtime, r)| {
            let (raw50, _, raw99) = percentiles_ms(&r.raw.totals);
            let (ours50, _, ours99) = percentiles_ms(&r.ours.totals);
            json!({
                "runtime": runtime_name(*runtime),
                "raw": r.raw.json(),
                "ours": r.ours.json(),
                "ratio_p50": round3(ours50 / raw50),
                "ratio_p99": round3(ours99 / raw99),
                "build_spec_p50_ms": round3(percentiles_ms(&r.build).0),
            })
        })
        .collect();
    json!({
        "bench": "agent_create",
        "count": args.count,
        "warmup": args.warmup,
        "raw_logs": args.raw_logs,
        "runtimes": runtimes,
    })
}

async fn run(args: Args) -> Result<()> {
    let fixture = Fixture::new(args.raw_logs).await?;
    let mut results = Vec::new();
    let mut failures = Vec::new();
    for &runtime in &args.runtimes {
        eprintln!(
            "agent_create: {} x {} creates per path ({} warm-up)",
            runtime_name(runtime),
            args.count,
            args.warmup
        );
        match fixture.measure(runtime, &args).await {
            Ok(r) => results.push((runtime, r)),
            // Report the other runtimes, then fail.
            Err(e) => {
                eprintln!("agent_create: {e:#}");
                failures.push(runtime_name(runtime));
            }
        }
    }
    print_report(&args, &results);
    if args.json {
        println!("{}", report_json(&args, &results));
    }
    ensure!(failures.is_empty(), "failed: {}", failures.join(", "));
    Ok(())
}

fn main() -> Result<()> {
    let args = parse_args()?;
    // The agent runs on actix, a current-thread runtime per arbiter; so does this.
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the tokio runtime")?
        .block_on(run(args))
}
