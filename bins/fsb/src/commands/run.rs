//! `fsb run`: build a CreateRequest from a manifest (`-f`), flags, environment and the
//! config file; create; with `--rm`, follow the process to its exit.
//!
//! Precedence per field: command-line flag > manifest > FSB_* environment > config
//! file > default. (The environment stands for "my usual settings", a manifest for
//! "this sandbox", a flag for "this time".)

use std::{io::Write, path::Path, time::Duration};

use fsb_proto::fastpath::v1 as fp;
use tokio_stream::StreamExt;

use crate::{
    cli::{ModeArg, RunArgs, RuntimeArg},
    client::{Conn, FastPath},
    config::{DEFAULT_IMAGE, DEFAULT_NAMESPACE, DEFAULT_POOL, Settings},
    error::{CliError, exit},
    output::{self, API_VERSION, KIND, SandboxDoc},
};

/// Which `run` settings were given on the command line itself (not through FSB_*
/// variables): only those beat a manifest.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Explicit {
    pub(crate) image: bool,
    pub(crate) pool: bool,
    pub(crate) namespace: bool,
    pub(crate) mode: bool,
    pub(crate) runtime: bool,
}

/// After the process exits, how long the log stream may take to drain.
const LOG_DRAIN: Duration = Duration::from_secs(5);

/// flag (command line) > manifest > environment > config.
fn layer<T>(flag: Option<T>, explicit: bool, manifest: Option<T>, config: Option<T>) -> Option<T> {
    if explicit && flag.is_some() {
        return flag;
    }
    manifest.or(flag).or(config)
}

fn non_empty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_owned())
}

/// Read a Sandbox manifest (`-` is stdin).
pub(crate) fn load_manifest(path: &Path) -> Result<SandboxDoc, CliError> {
    let text = if path == Path::new("-") {
        std::io::read_to_string(std::io::stdin())
    } else {
        std::fs::read_to_string(path)
    }
    .map_err(|e| CliError::BadConfig(format!("manifest {}: {e}", path.display())))?;
    parse_manifest(&path.display().to_string(), &text)
}

/// Parse a manifest in the CRD shape; `status` is accepted and ignored, so
/// `fsb get -o yaml` output can be replayed.
pub(crate) fn parse_manifest(origin: &str, text: &str) -> Result<SandboxDoc, CliError> {
    let doc: SandboxDoc = serde_yaml::from_str(text).map_err(|e| {
        CliError::BadConfig(format!(
            "manifest {origin}: {e}; see `fsb get NAME -o yaml` for the shape"
        ))
    })?;
    if !doc.api_version.is_empty() && doc.api_version != API_VERSION {
        return Err(CliError::BadConfig(format!(
            "manifest {origin}: apiVersion {:?} is not {API_VERSION}",
            doc.api_version
        )));
    }
    if !doc.kind.is_empty() && doc.kind != KIND {
        return Err(CliError::BadConfig(format!(
            "manifest {origin}: kind {:?} is not {KIND}",
            doc.kind
        )));
    }
    Ok(doc)
}

fn manifest_runtime(s: &str) -> Result<Option<RuntimeArg>, CliError> {
    match s {
        "" => Ok(None),
        "runc" => Ok(Some(RuntimeArg::Runc)),
        "crun" => Ok(Some(RuntimeArg::Crun)),
        "gvisor" | "runsc" => Ok(Some(RuntimeArg::Gvisor)),
        other => Err(CliError::BadConfig(format!(
            "manifest: spec.runtime {other:?} is not runc, crun or gvisor"
        ))),
    }
}

fn manifest_failure_policy(s: &str) -> Result<fp::FailurePolicy, CliError> {
    match s {
        "" => Ok(fp::FailurePolicy::Unspecified),
        "Manual" => Ok(fp::FailurePolicy::Manual),
        "AutoRecreate" => Ok(fp::FailurePolicy::AutoRecreate),
        other => Err(CliError::BadConfig(format!(
            "manifest: spec.failurePolicy {other:?} is not Manual or AutoRecreate"
        ))),
    }
}

pub(crate) fn proto_runtime(r: Option<RuntimeArg>) -> fp::Runtime {
    match r {
        None => fp::Runtime::Unspecified,
        Some(RuntimeArg::Runc) => fp::Runtime::Runc,
        Some(RuntimeArg::Crun) => fp::Runtime::Crun,
        Some(RuntimeArg::Gvisor) => fp::Runtime::Gvisor,
    }
}

pub(crate) fn proto_mode(m: Option<ModeArg>) -> fp::ConsistencyMode {
    match m {
        None => fp::ConsistencyMode::Unspecified,
        Some(ModeArg::Fast) => fp::ConsistencyMode::Fast,
        Some(ModeArg::Strong) => fp::ConsistencyMode::Strong,
    }
}

/// A `SystemTime` as a protobuf timestamp.
pub(crate) fn timestamp(t: std::time::SystemTime) -> prost_types::Timestamp {
    prost_types::Timestamp::from(t)
}

/// The CreateRequest `fsb run` sends.
pub(crate) fn build_request(
    args: &RunArgs,
    explicit: Explicit,
    settings: &Settings,
    manifest: Option<SandboxDoc>,
) -> Result<fp::CreateRequest, CliError> {
    let m = manifest.unwrap_or_default();
    let file = &settings.file;
    let namespace = layer(
        args.ns.namespace.clone(),
        explicit.namespace,
        non_empty(&m.metadata.namespace),
        file.namespace.clone(),
    )
    .unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned());
    let image = layer(
        args.image.clone(),
        explicit.image,
        non_empty(&m.spec.image),
        file.image.clone(),
    )
    .unwrap_or_else(|| DEFAULT_IMAGE.to_owned());
    let pool = layer(
        args.pool.clone(),
        explicit.pool,
        non_empty(&m.spec.pool_ref),
        file.pool.clone(),
    )
    .unwrap_or_else(|| DEFAULT_POOL.to_owned());
    let runtime = layer(
        args.runtime,
        explicit.runtime,
        manifest_runtime(&m.spec.runtime)?,
        file.runtime,
    );
    let mode = layer(args.mode, explicit.mode, None, file.mode);

    // `-- CMD ARGS...` replaces both; without it the manifest's stay.
    let (command, cmd_args) = match args.command.split_first() {
        Some((first, rest)) => (vec![first.clone()], rest.to_vec()),
        None => (m.spec.command.clone(), m.spec.args.clone()),
    };
    // Flags override manifest entries of the same name, in the manifest's order.
    let mut envs: Vec<fp::EnvVar> = m
        .spec
        .envs
        .iter()
        .map(|e| fp::EnvVar {
            name: e.name.clone(),
            value: e.value.clone(),
        })
        .collect();
    for (k, v) in &args.envs {
        match envs.iter_mut().find(|e| &e.name == k) {
            Some(e) => e.value = v.clone(),
            None => envs.push(fp::EnvVar {
                name: k.clone(),
                value: v.clone(),
            }),
        }
    }
    let mut labels = m.metadata.labels.clone();
    labels.extend(args.labels.iter().cloned());
    let res = m.spec.resources.clone().unwrap_or_default();
    let resources = fp::Resources {
        cpu: args.cpu.clone().unwrap_or(res.cpu),
        memory: args.memory.clone().unwrap_or(res.memory),
        pids: args.pids.unwrap_or(res.pids),
    };
    let expire_time = match &m.spec.expire_time {
        Some(s) => Some(timestamp(humantime::parse_rfc3339_weak(s).map_err(
            |e| {
                CliError::BadConfig(format!(
                    "manifest: spec.expireTime {s:?}: {e} (RFC 3339 in UTC)"
                ))
            },
        )?)),
        None => None,
    };
    let spec = fp::SandboxSpec {
        pool_ref: pool,
        image,
        command,
        args: cmd_args,
        envs,
        working_dir: args
            .workdir
            .clone()
            .unwrap_or_else(|| m.spec.working_dir.clone()),
        exposed_ports: if args.ports.is_empty() {
            m.spec.exposed_ports.clone()
        } else {
            args.ports.clone()
        },
        resources: (resources != fp::Resources::default()).then_some(resources),
        runtime: proto_runtime(runtime) as i32,
        failure_policy: manifest_failure_policy(&m.spec.failure_policy)? as i32,
        recovery_timeout_seconds: m.spec.recovery_timeout_seconds.unwrap_or(0),
        expire_time,
        reset_revision: 0,
        read_only_rootfs: args.read_only_rootfs || m.spec.read_only_rootfs,
        user_namespace: args.userns || m.spec.user_namespace,
    };
    let ttl = args
        .ttl
        .map(prost_types::Duration::try_from)
        .transpose()
        .map_err(|e| CliError::BadConfig(format!("--ttl: {e}")))?;
    Ok(fp::CreateRequest {
        request_id: args
            .request_id
            .clone()
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
        namespace,
        name: args.name.clone().unwrap_or_else(|| m.metadata.name.clone()),
        spec: Some(spec),
        labels: labels.into_iter().collect(),
        mode: proto_mode(mode) as i32,
        ttl,
    })
}

/// `fsb run`.
pub(crate) async fn run(
    args: &RunArgs,
    explicit: Explicit,
    settings: &Settings,
) -> Result<u8, CliError> {
    let manifest = args.file.as_deref().map(load_manifest).transpose()?;
    let req = build_request(args, explicit, settings, manifest)?;
    let conn = Conn::connect(settings).await?;
    let mut fast = conn.fast_path();
    let what = if req.name.is_empty() {
        format!("create in {}", req.namespace)
    } else {
        format!("create {}/{}", req.namespace, req.name)
    };
    let resp = fast
        .create(req)
        .await
        .map_err(CliError::grpc(what))?
        .into_inner();
    let sandbox = resp.sandbox.unwrap_or_default();
    if resp.replayed {
        eprintln!(
            "fsb: {}/{} was created earlier with this --request-id; showing that result",
            sandbox.namespace, sandbox.name
        );
    }
    if args.timings {
        let timeline = resp
            .timeline
            .as_ref()
            .or(sandbox.status.as_ref().and_then(|s| s.timeline.as_ref()));
        match timeline {
            Some(t) => eprint!("{}", output::timeline_text(t)),
            None => eprintln!("fsb: the server sent no timeline"),
        }
    }
    if !args.rm {
        output::print_sandbox_name_or_doc(settings.output, &sandbox)?;
        return Ok(exit::OK);
    }
    let ns = sandbox.namespace.clone();
    let name = sandbox.name.clone();
    let outcome = tokio::select! {
        r = follow_to_exit(&mut fast, &ns, &name) => r,
        _ = tokio::signal::ctrl_c() => Ok(exit::INTERRUPTED),
    };
    // Delete whatever happened, then report the first failure.
    let deleted = fast
        .delete(fp::DeleteRequest {
            namespace: ns.clone(),
            name: name.clone(),
            grace_period_seconds: Some(0),
        })
        .await;
    let code = outcome?;
    match deleted {
        Ok(_) => Ok(code),
        Err(s) if s.code() == tonic::Code::NotFound => Ok(code),
        Err(s) => Err(CliError::grpc(format!("delete {ns}/{name}"))(s)),
    }
}

/// Stream logs while watching for the exit; the process's exit code (masked to 8 bits
/// as a shell would).
async fn follow_to_exit(fast: &mut FastPath, ns: &str, name: &str) -> Result<u8, CliError> {
    let mut watch = fast
        .watch(fp::WatchRequest {
            namespace: ns.to_owned(),
            name: name.to_owned(),
            send_initial: true,
        })
        .await
        .map_err(CliError::grpc(format!("watch {ns}/{name}")))?
        .into_inner();
    let logs = fast
        .logs(fp::LogsRequest {
            namespace: ns.to_owned(),
            name: name.to_owned(),
            follow: true,
            tail_lines: 0,
        })
        .await
        .map_err(CliError::grpc(format!("logs {ns}/{name}")))?
        .into_inner();
    let mut log_task = tokio::spawn(copy_logs(logs));
    let code = loop {
        let Some(ev) = watch.next().await else {
            return Err(CliError::Other(anyhow::anyhow!(
                "watch {ns}/{name} ended before the process exited; see `fsb get {name}`"
            )));
        };
        let ev = ev.map_err(CliError::grpc(format!("watch {ns}/{name}")))?;
        let Some(sb) = ev.sandbox else { continue };
        if ev.r#type == fp::watch_event::Type::Deleted as i32 {
            return Err(CliError::Other(anyhow::anyhow!(
                "{ns}/{name} was deleted before its process exited"
            )));
        }
        let status = sb.status.unwrap_or_default();
        match fp::Phase::try_from(status.phase).unwrap_or_default() {
            fp::Phase::Succeeded => break status.exit_code.unwrap_or(0),
            fp::Phase::Failed => break status.exit_code.unwrap_or(1),
            p @ (fp::Phase::Expired | fp::Phase::Lost) => {
                return Err(CliError::Other(anyhow::anyhow!(
                    "{ns}/{name} went {} before its process exited",
                    output::phase_name(p as i32)
                )));
            }
            _ => {}
        }
    };
    // The log stream ends at exit; give it a moment to deliver the tail.
    match tokio::time::timeout(LOG_DRAIN, &mut log_task).await {
        Ok(Ok(r)) => r?,
        Ok(Err(e)) => return Err(CliError::Other(anyhow::anyhow!("log stream: {e}"))),
        Err(_) => log_task.abort(),
    }
    Ok((code & 0xff) as u8)
}

/// Copy log chunks to our stdout/stderr until the stream ends.
pub(crate) async fn copy_logs(mut logs: tonic::Streaming<fp::LogChunk>) -> Result<(), CliError> {
    while let Some(chunk) = logs.next().await {
        let chunk = chunk.map_err(CliError::grpc("logs"))?;
        write_chunk(chunk.stream, &chunk.data)?;
    }
    Ok(())
}

/// stdout chunks to stdout, stderr chunks to stderr, flushed so interleaving holds.
pub(crate) fn write_chunk(stream: i32, data: &[u8]) -> Result<(), CliError> {
    let written = if stream == fp::LogStream::Stderr as i32 {
        let mut e = std::io::stderr().lock();
        e.write_all(data).and_then(|()| e.flush())
    } else {
        let mut o = std::io::stdout().lock();
        o.write_all(data).and_then(|()| o.flush())
    };
    match written {
        Ok(()) => Ok(()),
        // A closed pipe (`fsb logs x | head`) is the reader's choice, not a failure.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(CliError::Other(anyhow::anyhow!("writing output: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::{
        cli::{Cli, Command},
        config::{FileConfig, ProcessEnv},
    };

    fn run_args(argv: &[&str]) -> (RunArgs, Settings) {
        let cli = Cli::try_parse_from(argv).unwrap();
        let settings = Settings::resolve(&cli.global, &ProcessEnv::default()).unwrap();
        let Command::Run(run) = cli.command else {
            panic!("not run")
        };
        (*run, settings)
    }

    const MANIFEST: &str = "\
apiVersion: sandbox.fast.io/v1alpha1
kind: Sandbox
metadata:
  name: from-file
  namespace: team
  labels: {app: web, tier: a}
spec:
  image: python:3.12
  poolRef: pyfile
  command: [python]
  args: [-m, http.server]
  envs: [{name: A, value: '1'}, {name: B, value: '2'}]
  workingDir: /srv
  exposedPorts: [8000]
  resources: {cpu: 500m, memory: 256Mi, pids: 64}
  runtime: gvisor
  failurePolicy: AutoRecreate
  recoveryTimeoutSeconds: 30
  expireTime: 2030-01-02T03:04:05Z
";

    #[test]
    fn defaults_without_manifest_or_config() {
        let (args, s) = run_args(&[
            "fsb",
            "--data-dir",
            "/nonexistent",
            "run",
            "--",
            "echo",
            "hi",
        ]);
        let req = build_request(&args, Explicit::default(), &s, None).unwrap();
        let spec = req.spec.unwrap();
        assert_eq!(spec.image, DEFAULT_IMAGE);
        assert_eq!(spec.pool_ref, "default");
        assert_eq!(req.namespace, "default");
        assert_eq!(spec.command, ["echo"]);
        assert_eq!(spec.args, ["hi"]);
        assert!(uuid::Uuid::parse_str(&req.request_id).is_ok());
        assert_eq!(req.mode, fp::ConsistencyMode::Unspecified as i32);
        assert!(spec.resources.is_none());
    }

    #[test]
    fn manifest_fields_land_in_the_request() {
        let (args, s) = run_args(&["fsb", "--data-dir", "/nonexistent", "run"]);
        let m = parse_manifest("m.yaml", MANIFEST).unwrap();
        let req = build_request(&args, Explicit::default(), &s, Some(m)).unwrap();
        assert_eq!(req.name, "from-file");
        assert_eq!(req.namespace, "team");
        assert_eq!(req.labels.get("tier").map(String::as_str), Some("a"));
        let spec = req.spec.unwrap();
        assert_eq!(spec.image, "python:3.12");
        assert_eq!(spec.pool_ref, "pyfile");
        assert_eq!(spec.command, ["python"]);
        assert_eq!(spec.args, ["-m", "http.server"]);
        assert_eq!(spec.working_dir, "/srv");
        assert_eq!(spec.exposed_ports, [8000]);
        let r = spec.resources.unwrap();
        assert_eq!(
            (r.cpu.as_str(), r.memory.as_str(), r.pids),
            ("500m", "256Mi", 64)
        );
        assert_eq!(spec.runtime, fp::Runtime::Gvisor as i32);
        assert_eq!(spec.failure_policy, fp::FailurePolicy::AutoRecreate as i32);
        assert_eq!(spec.recovery_timeout_seconds, 30);
        assert_eq!(spec.expire_time.unwrap().seconds, 1_893_553_445);
    }

    #[test]
    fn flags_override_manifest_fields() {
        let (args, s) = run_args(&[
            "fsb",
            "--data-dir",
            "/nonexistent",
            "run",
            "--image",
            "alpine",
            "-n",
            "flagns",
            "--name",
            "flagname",
            "-e",
            "B=3",
            "-e",
            "C=4",
            "--label",
            "app=api",
            "--port",
            "9000",
            "--memory",
            "1Gi",
            "--runtime",
            "runc",
            "--workdir",
            "/w",
            "--",
            "sh",
            "-c",
            "true",
        ]);
        let m = parse_manifest("m.yaml", MANIFEST).unwrap();
        let explicit = Explicit {
            image: true,
            namespace: true,
            runtime: true,
            ..Explicit::default()
        };
        let req = build_request(&args, explicit, &s, Some(m)).unwrap();
        assert_eq!(req.name, "flagname");
        assert_eq!(req.namespace, "flagns");
        assert_eq!(req.labels.get("app").map(String::as_str), Some("api"));
        assert_eq!(req.labels.get("tier").map(String::as_str), Some("a"));
        let spec = req.spec.unwrap();
        assert_eq!(spec.image, "alpine");
        assert_eq!(spec.pool_ref, "pyfile");
        assert_eq!(spec.command, ["sh"]);
        assert_eq!(spec.args, ["-c", "true"]);
        let envs: Vec<(String, String)> =
            spec.envs.into_iter().map(|e| (e.name, e.value)).collect();
        assert_eq!(
            envs,
            [("A", "1"), ("B", "3"), ("C", "4")].map(|(a, b)| (a.to_owned(), b.to_owned()))
        );
        assert_eq!(spec.exposed_ports, [9000]);
        let r = spec.resources.unwrap();
        assert_eq!((r.cpu.as_str(), r.memory.as_str()), ("500m", "1Gi"));
        assert_eq!(spec.runtime, fp::Runtime::Runc as i32);
        assert_eq!(spec.working_dir, "/w");
    }

    #[test]
    fn manifest_beats_environment_which_beats_config() {
        // A value clap took from FSB_IMAGE is not explicit: the manifest wins.
        assert_eq!(
            layer(Some("env"), false, Some("file"), Some("cfg")),
            Some("file")
        );
        assert_eq!(layer(Some("env"), false, None, Some("cfg")), Some("env"));
        assert_eq!(layer(None, false, None, Some("cfg")), Some("cfg"));
        assert_eq!(
            layer(Some("flag"), true, Some("file"), Some("cfg")),
            Some("flag")
        );
        assert_eq!(layer::<&str>(None, false, None, None), None);
    }

    #[test]
    fn config_file_supplies_run_defaults() {
        let (args, mut s) = run_args(&["fsb", "--data-dir", "/nonexistent", "run"]);
        s.file = FileConfig {
            image: Some("cfgimg".into()),
            pool: Some("cfgpool".into()),
            namespace: Some("cfgns".into()),
            mode: Some(ModeArg::Strong),
            ..FileConfig::default()
        };
        let req = build_request(&args, Explicit::default(), &s, None).unwrap();
        assert_eq!(req.namespace, "cfgns");
        assert_eq!(req.mode, fp::ConsistencyMode::Strong as i32);
        let spec = req.spec.unwrap();
        assert_eq!(
            (spec.image.as_str(), spec.pool_ref.as_str()),
            ("cfgimg", "cfgpool")
        );
    }

    #[test]
    fn bad_manifests_are_bad_config() {
        for text in [
            "apiVersion: v1\nkind: Sandbox\n",
            "kind: Pod\n",
            "spec: {imag: x}\n",
            "spec: {image: [1]}\n",
        ] {
            assert_eq!(
                parse_manifest("m", text).unwrap_err().exit_code(),
                64,
                "{text}"
            );
        }
        let (args, s) = run_args(&["fsb", "--data-dir", "/nonexistent", "run"]);
        for text in [
            "spec: {runtime: kata}\n",
            "spec: {failurePolicy: Sometimes}\n",
            "spec: {expireTime: tomorrow}\n",
        ] {
            let m = parse_manifest("m", text).unwrap();
            let err = build_request(&args, Explicit::default(), &s, Some(m)).unwrap_err();
            assert_eq!(err.exit_code(), 64, "{text}");
        }
    }

    #[test]
    fn get_output_replays_as_a_manifest() {
        let sb = fp::Sandbox {
            namespace: "default".into(),
            name: "web".into(),
            spec: Some(fp::SandboxSpec {
                image: "busybox".into(),
                pool_ref: "default".into(),
                command: vec!["sleep".into(), "1".into()],
                ..Default::default()
            }),
            status: Some(fp::SandboxStatus {
                phase: fp::Phase::Running as i32,
                ..Default::default()
            }),
            ..Default::default()
        };
        let yaml =
            output::render_doc(crate::cli::OutputFormat::Yaml, &SandboxDoc::from(&sb)).unwrap();
        let m = parse_manifest("get", &yaml).unwrap();
        let (args, s) = run_args(&["fsb", "--data-dir", "/nonexistent", "run"]);
        let req = build_request(&args, Explicit::default(), &s, Some(m)).unwrap();
        assert_eq!(req.name, "web");
        assert_eq!(req.spec.unwrap().command, ["sleep", "1"]);
    }
}
