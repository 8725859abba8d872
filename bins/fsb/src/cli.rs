//! The command line: clap types only, no behaviour.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Exit codes, shown by `fsb --help` and documented in bins/README.md; scripts rely
/// on them, so they only ever grow.
pub(crate) const EXIT_CODES: &str = "\
Exit codes:
  0   ok
  1   generic failure
  2   usage (bad flags, or the server rejected an argument)
  3   not found
  4   already exists
  5   unavailable: `fsb up` is not running or not reachable
  6   resource exhausted (no free slot or port)
  7   permission denied or unauthenticated (token)
  64  bad configuration (config file, manifest, --listen)
  130 interrupted (Ctrl-C) after cleaning up (`run --rm`, `bench`)
  `run --rm` and `exec` exit with the process's exit code.

Settings come from flags, then FSB_* environment variables, then the config file
(--config, default <data-dir>/config.yaml: keys endpoint, namespace, pool, image,
mode, runtime, output), then defaults. The token comes from FSB_TOKEN, else
<data-dir>/token (written by `fsb up`, mode 0600).";

/// fsb: start sandboxes in milliseconds.
#[derive(Debug, Parser)]
#[command(
    name = "fsb",
    version,
    about = "fast-sandbox: run `fsb up`, then `fsb run -- CMD` to start sandboxes in milliseconds",
    after_long_help = EXIT_CODES
)]
pub(crate) struct Cli {
    #[command(flatten)]
    pub(crate) global: GlobalArgs,
    #[command(subcommand)]
    pub(crate) command: Command,
}

/// Flags every command takes.
#[derive(Debug, Clone, Default, Args)]
pub(crate) struct GlobalArgs {
    /// Data directory of `fsb up` (endpoint, token, state) [default: /var/lib/fast-sandbox
    /// for root, else $XDG_DATA_HOME/fast-sandbox or ~/.local/share/fast-sandbox].
    #[arg(long, global = true, env = "FSB_DATA_DIR", value_name = "DIR")]
    pub(crate) data_dir: Option<PathBuf>,
    /// Gateway URL (http://127.0.0.1:7370); overrides the data directory's endpoint file.
    #[arg(long, global = true, env = "FSB_ENDPOINT", value_name = "URL")]
    pub(crate) endpoint: Option<String>,
    /// CA certificate (PEM) an `https://` endpoint's certificate must chain to
    /// [default: the system's roots].
    #[arg(long, global = true, env = "FSB_CA_FILE", value_name = "FILE")]
    pub(crate) ca_file: Option<PathBuf>,
    /// Config file (YAML) [default: <data-dir>/config.yaml if present].
    #[arg(long, global = true, env = "FSB_CONFIG", value_name = "FILE")]
    pub(crate) config: Option<PathBuf>,
    /// Output format.
    #[arg(short = 'o', long, global = true, env = "FSB_OUTPUT", value_enum)]
    pub(crate) output: Option<OutputFormat>,
}

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum OutputFormat {
    /// Human tables.
    Table,
    /// JSON (CRD-shaped for sandboxes).
    Json,
    /// YAML (CRD-shaped for sandboxes).
    Yaml,
}

/// OCI runtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum RuntimeArg {
    /// runc.
    Runc,
    /// crun.
    Crun,
    /// gVisor (runsc).
    #[value(alias = "runsc")]
    Gvisor,
}

/// Consistency mode of Create.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum ModeArg {
    /// Container first, record written asynchronously.
    Fast,
    /// Record first.
    Strong,
}

/// Failure policy of a sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum FailurePolicyArg {
    /// Stay Lost when the agent is lost.
    Manual,
    /// Recreate elsewhere after the recovery timeout.
    AutoRecreate,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Run local mode: gateway, registry and one agent in this process.
    Up(UpArgs),
    /// Create a sandbox (and with --rm, wait for it, stream its logs and delete it).
    Run(Box<RunArgs>),
    /// List sandboxes.
    Ls(LsArgs),
    /// Show one sandbox, with its startup timeline.
    Get(GetArgs),
    /// Show live slot and warm-instance usage per pool and agent.
    Top(TopArgs),
    /// Print a sandbox's logs.
    Logs(LogsArgs),
    /// Run a command in a running sandbox.
    Exec(ExecArgs),
    /// Delete sandboxes.
    Rm(RmArgs),
    /// Change a sandbox's expiry, labels or failure policy.
    Update(UpdateArgs),
    /// Restart a sandbox (bump its reset revision).
    Reset(ResetArgs),
    /// Load, pull and list images.
    #[command(subcommand)]
    Image(ImageCommand),
    /// Measure create latency through the gateway (and against raw containerd).
    Bench(BenchArgs),
    /// Print the client version and the server's health.
    Version,
    /// Print a shell completion script.
    Completion(CompletionArgs),
}

/// Namespace selection shared by the sandbox commands.
#[derive(Debug, Clone, Default, Args)]
pub(crate) struct NamespaceArg {
    /// Namespace [default: config file's, else `default`].
    #[arg(short = 'n', long, env = "FSB_NAMESPACE")]
    pub(crate) namespace: Option<String>,
}

/// `fsb up`.
#[derive(Debug, Args)]
pub(crate) struct UpArgs {
    /// Gateway address (loopback only).
    #[arg(long, env = "FSB_LISTEN", default_value = fsb_local::DEFAULT_LISTEN)]
    pub(crate) listen: String,
    /// containerd socket [default: the system one if it answers, else a private one].
    #[arg(long, env = "FSB_CONTAINERD_SOCKET", value_name = "PATH")]
    pub(crate) containerd_socket: Option<PathBuf>,
    /// Sandboxes held at once.
    #[arg(long, env = "FSB_CAPACITY", value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) capacity: Option<u32>,
    /// Runtime when a request names none [default: runc].
    #[arg(long, env = "FSB_RUNTIME", value_enum)]
    pub(crate) runtime: Option<RuntimeArg>,
    /// Consistency mode when a request names none [default: fast].
    #[arg(long, env = "FSB_MODE", value_enum)]
    pub(crate) mode: Option<ModeArg>,
    /// Seconds between SIGTERM and SIGKILL when deleting [default: 10].
    #[arg(long, env = "FSB_STOP_GRACE", value_name = "SECS")]
    pub(crate) stop_grace: Option<u64>,
    /// Stop every sandbox when `fsb up` exits (default: keep them for the next `fsb up`).
    #[arg(long, env = "FSB_STOP_SANDBOXES_ON_EXIT")]
    pub(crate) stop_sandboxes_on_exit: bool,
    /// The local agent's id: containers carry it, so two `fsb up` sharing one
    /// containerd need different ids.
    #[arg(long, env = "FSB_AGENT_ID", default_value = fsb_local::LOCAL_AGENT)]
    pub(crate) agent_id: String,
    /// Debian's busybox-static, from which the offline image fsb.local/busybox is built.
    #[arg(
        long,
        env = "FSB_BUSYBOX",
        default_value = "/bin/busybox",
        value_name = "PATH"
    )]
    pub(crate) busybox: PathBuf,
    /// Keep N warm instances of IMAGE ready (`IMAGE=N` or `IMAGE=N:RUNTIME`; repeat the
    /// flag): creates of that image then hand their process to a running container.
    #[arg(long, env = "FSB_WARM", value_delimiter = ',', value_name = "IMAGE=N")]
    pub(crate) warm: Vec<String>,
    /// The static fsb-init warm instances run as PID 1 [default: fsb-init beside fsb].
    #[arg(long, env = "FSB_INIT_BINARY", value_name = "PATH")]
    pub(crate) init_binary: Option<PathBuf>,
    /// Warm instances started at once while refilling.
    #[arg(long, env = "FSB_WARM_MAX_STARTING", default_value_t = 2)]
    pub(crate) warm_max_starting: usize,
    /// Memory budget of all warm instances in MiB (each counted at 4 MiB).
    #[arg(long, env = "FSB_WARM_MEMORY_MIB", default_value_t = 1024)]
    pub(crate) warm_memory_mib: u64,
    /// Take a capability away from every sandbox (`CHOWN`, `CAP_CHOWN`, `ALL`; repeat
    /// the flag): containerd's default set less these, never more.
    #[arg(
        long = "drop-capability",
        env = "FSB_DROP_CAPABILITIES",
        value_delimiter = ',',
        value_name = "CAP"
    )]
    pub(crate) drop_capabilities: Vec<String>,
    /// Where Prometheus metrics are served (`GET /metrics`; loopback only; the address
    /// is written to `<data-dir>/metrics`).
    #[arg(
        long,
        env = "FSB_METRICS_LISTEN",
        default_value = "127.0.0.1:0",
        value_name = "ADDR"
    )]
    pub(crate) metrics_listen: String,
    /// Fast-path requests per second per client connection, beyond which calls get
    /// ResourceExhausted (0: no limit).
    #[arg(long, env = "FSB_RATE_LIMIT", default_value_t = fsb_gateway::RateLimitConfig::DEFAULT.rate)]
    pub(crate) rate_limit: u32,
    /// Requests a client may send at once before the rate applies.
    #[arg(long, env = "FSB_RATE_BURST", default_value_t = fsb_gateway::RateLimitConfig::DEFAULT.burst, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) rate_burst: u32,
}

/// `fsb run`.
#[derive(Debug, Args)]
pub(crate) struct RunArgs {
    /// Image [default: config file's, else fsb.local/busybox:latest].
    #[arg(long, env = "FSB_IMAGE")]
    pub(crate) image: Option<String>,
    /// Pool [default: config file's, else `default`].
    #[arg(long, env = "FSB_POOL")]
    pub(crate) pool: Option<String>,
    #[command(flatten)]
    pub(crate) ns: NamespaceArg,
    /// Sandbox name [default: chosen by the server].
    #[arg(long)]
    pub(crate) name: Option<String>,
    /// Environment variable K=V (repeatable).
    #[arg(long = "env", short = 'e', value_name = "K=V", value_parser = parse_key_value)]
    pub(crate) envs: Vec<(String, String)>,
    /// Working directory.
    #[arg(long)]
    pub(crate) workdir: Option<String>,
    /// Mount the image's root filesystem read-only (always a cold start).
    #[arg(long)]
    pub(crate) read_only_rootfs: bool,
    /// Run in a user namespace of its own: root inside is not root on the host
    /// (runc and crun; always a cold start).
    #[arg(long)]
    pub(crate) userns: bool,
    /// Port the sandbox listens on (repeatable).
    #[arg(long = "port", short = 'p', value_parser = clap::value_parser!(u32).range(1..=65535))]
    pub(crate) ports: Vec<u32>,
    /// Consistency mode [default: the server's].
    #[arg(long, env = "FSB_MODE", value_enum)]
    pub(crate) mode: Option<ModeArg>,
    /// Runtime [default: the pool's].
    #[arg(long, env = "FSB_RUNTIME", value_enum)]
    pub(crate) runtime: Option<RuntimeArg>,
    /// CPU limit, e.g. 500m or 1.5.
    #[arg(long)]
    pub(crate) cpu: Option<String>,
    /// Memory limit, e.g. 256Mi.
    #[arg(long)]
    pub(crate) memory: Option<String>,
    /// Process limit.
    #[arg(long)]
    pub(crate) pids: Option<u32>,
    /// Expire after this long (30s, 5m, 1h).
    #[arg(long, value_parser = parse_duration)]
    pub(crate) ttl: Option<std::time::Duration>,
    /// Label K=V (repeatable).
    #[arg(long = "label", short = 'l', value_name = "K=V", value_parser = parse_key_value)]
    pub(crate) labels: Vec<(String, String)>,
    /// Sandbox manifest (CRD shape; `-` reads stdin); flags override its fields.
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    pub(crate) file: Option<PathBuf>,
    /// Print the startup timeline (stages and durations) on stderr.
    #[arg(long)]
    pub(crate) timings: bool,
    /// Wait for the process, stream its logs, delete the sandbox, exit with its code.
    #[arg(long)]
    pub(crate) rm: bool,
    /// Idempotency key [default: a fresh UUID]; repeating it replays the first result.
    #[arg(long)]
    pub(crate) request_id: Option<String>,
    /// Command and arguments: the first word replaces the image's ENTRYPOINT, the rest its CMD.
    #[arg(last = true, value_name = "CMD")]
    pub(crate) command: Vec<String>,
}

/// `fsb ls`.
#[derive(Debug, Args)]
pub(crate) struct LsArgs {
    #[command(flatten)]
    pub(crate) ns: NamespaceArg,
    /// Every namespace.
    #[arg(short = 'A', long, conflicts_with = "namespace")]
    pub(crate) all_namespaces: bool,
    /// Only this pool.
    #[arg(long)]
    pub(crate) pool: Option<String>,
    /// Only sandboxes with these labels (k=v, repeatable or comma-separated).
    #[arg(short = 'l', long = "selector", value_name = "K=V")]
    pub(crate) selector: Vec<String>,
}

/// `fsb get`.
#[derive(Debug, Args)]
pub(crate) struct GetArgs {
    /// Sandbox name.
    pub(crate) name: String,
    #[command(flatten)]
    pub(crate) ns: NamespaceArg,
}

/// `fsb top`.
#[derive(Debug, Args)]
pub(crate) struct TopArgs {
    /// Only this namespace's agents [default: every namespace].
    #[arg(short = 'n', long)]
    pub(crate) namespace: Option<String>,
    /// Only this pool's agents.
    #[arg(long)]
    pub(crate) pool: Option<String>,
    /// Time between refreshes (500ms, 2s, 1m).
    #[arg(long, default_value = "1s", value_parser = parse_interval)]
    pub(crate) interval: std::time::Duration,
    /// Print one snapshot and exit (for scripts).
    #[arg(long)]
    pub(crate) once: bool,
}

/// `fsb logs`.
#[derive(Debug, Args)]
pub(crate) struct LogsArgs {
    /// Sandbox name.
    pub(crate) name: String,
    #[command(flatten)]
    pub(crate) ns: NamespaceArg,
    /// Keep streaming until the process exits.
    #[arg(short = 'f', long)]
    pub(crate) follow: bool,
    /// Only the last N lines.
    #[arg(long, value_name = "N")]
    pub(crate) tail: Option<u64>,
}

/// `fsb exec`.
#[derive(Debug, Args)]
pub(crate) struct ExecArgs {
    /// Sandbox name.
    pub(crate) name: String,
    #[command(flatten)]
    pub(crate) ns: NamespaceArg,
    /// Forward stdin.
    #[arg(short = 'i', long)]
    pub(crate) interactive: bool,
    /// Ask for a terminal (the local terminal is not switched to raw mode).
    #[arg(short = 't', long)]
    pub(crate) tty: bool,
    /// Command and arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub(crate) command: Vec<String>,
}

/// `fsb rm`.
#[derive(Debug, Args)]
pub(crate) struct RmArgs {
    /// Sandbox names.
    #[arg(required = true)]
    pub(crate) names: Vec<String>,
    #[command(flatten)]
    pub(crate) ns: NamespaceArg,
    /// Seconds between SIGTERM and SIGKILL [default: the server's].
    #[arg(long, value_name = "SECS")]
    pub(crate) grace: Option<u32>,
}

/// `fsb update`.
#[derive(Debug, Args)]
pub(crate) struct UpdateArgs {
    /// Sandbox name.
    pub(crate) name: String,
    #[command(flatten)]
    pub(crate) ns: NamespaceArg,
    /// Expire this long from now (30s, 5m, 1h).
    #[arg(long, value_parser = parse_duration, group = "expiry")]
    pub(crate) ttl: Option<std::time::Duration>,
    /// Expire at this time (RFC 3339, UTC: 2030-01-02T03:04:05Z).
    #[arg(long, value_parser = parse_rfc3339, group = "expiry")]
    pub(crate) expire_time: Option<std::time::SystemTime>,
    /// Never expire.
    #[arg(long, group = "expiry")]
    pub(crate) clear_expiry: bool,
    /// Set label K=V (repeatable).
    #[arg(long = "label", value_name = "K=V", value_parser = parse_key_value)]
    pub(crate) labels: Vec<(String, String)>,
    /// Remove label K (repeatable).
    #[arg(long = "remove-label", value_name = "K")]
    pub(crate) remove_labels: Vec<String>,
    /// What happens when the sandbox's agent is lost.
    #[arg(long, value_enum)]
    pub(crate) failure_policy: Option<FailurePolicyArg>,
    /// Seconds to wait for a lost agent before recreating.
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) recovery_timeout: Option<u32>,
}

/// `fsb reset`.
#[derive(Debug, Args)]
pub(crate) struct ResetArgs {
    /// Sandbox name.
    pub(crate) name: String,
    #[command(flatten)]
    pub(crate) ns: NamespaceArg,
}

/// `fsb image ...`.
#[derive(Debug, Subcommand)]
pub(crate) enum ImageCommand {
    /// Upload an OCI image archive (tar of an OCI layout).
    Load {
        /// The archive.
        file: PathBuf,
        /// Name of the image [default: the archive's ref.name annotation].
        #[arg(long)]
        name: Option<String>,
        /// Pool whose agents get it [default: the default pool].
        #[arg(long)]
        pool: Option<String>,
    },
    /// Pull an image from a registry.
    Pull {
        /// Image reference.
        reference: String,
        /// Registry user name.
        #[arg(long, requires = "password_stdin")]
        username: Option<String>,
        /// Read the registry password from stdin.
        #[arg(long, requires = "username")]
        password_stdin: bool,
        /// Pool whose agents pull it [default: the default pool].
        #[arg(long)]
        pool: Option<String>,
    },
    /// List images.
    Ls {
        /// Pool [default: the default pool].
        #[arg(long)]
        pool: Option<String>,
    },
}

/// `fsb bench`.
#[derive(Debug, Args)]
pub(crate) struct BenchArgs {
    /// Measured creates per path.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) count: u64,
    /// Creates in flight at once.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) concurrency: u64,
    /// Creates per path in each round, --concurrency of them in flight at all times,
    /// removed after the round [default: --concurrency: every round ends on its
    /// slowest create]; a longer round measures a sustained rate.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) round: Option<u64>,
    /// Creates per path discarded before measuring.
    #[arg(long, default_value_t = 3)]
    pub(crate) warmup: u64,
    /// Image [default: config file's, else fsb.local/busybox:latest].
    #[arg(long, env = "FSB_IMAGE")]
    pub(crate) image: Option<String>,
    /// Pool [default: config file's, else `default`].
    #[arg(long, env = "FSB_POOL")]
    pub(crate) pool: Option<String>,
    #[command(flatten)]
    pub(crate) ns: NamespaceArg,
    /// Runtime of both paths.
    #[arg(long, env = "FSB_RUNTIME", value_enum)]
    pub(crate) runtime: Option<RuntimeArg>,
    /// Consistency modes of the fsb creates, one measured path each, in the same run
    /// (`--mode fast,strong` compares them).
    #[arg(long, env = "FSB_MODE", value_enum, value_delimiter = ',')]
    pub(crate) mode: Vec<ModeArg>,
    /// Also measure raw containerd creates in the same run.
    #[arg(long)]
    pub(crate) compare_raw: bool,
    /// Time each create to the moment its process started (not to the response) and
    /// count warm and cold creates: for servers keeping warm instances (`fsb up --warm`).
    #[arg(long)]
    pub(crate) warm: bool,
    /// containerd of the raw path [default: <data-dir>/containerd/containerd.sock if
    /// present, else /run/containerd/containerd.sock].
    #[arg(long, env = "FSB_CONTAINERD_SOCKET", value_name = "PATH")]
    pub(crate) containerd_socket: Option<PathBuf>,
    /// Parent of the raw path's OCI runtime state roots.
    #[arg(
        long,
        env = "FSB_RUNTIME_ROOT",
        value_name = "DIR",
        default_value = "/run/fast-sandbox/bench"
    )]
    pub(crate) runtime_root: PathBuf,
    /// runsc binary or wrapper for the raw path under gVisor [default: the wrapper
    /// `fsb up` wrote in the data directory, else runsc].
    #[arg(long, env = "FSB_RUNSC", value_name = "PATH")]
    pub(crate) runsc: Option<PathBuf>,
    /// Print one JSON document instead of the table.
    #[arg(long)]
    pub(crate) json: bool,
}

/// `fsb completion`.
#[derive(Debug, Args)]
pub(crate) struct CompletionArgs {
    /// Shell.
    #[arg(value_enum)]
    pub(crate) shell: clap_complete::Shell,
}

/// `K=V` (the value may contain `=`; the key may not be empty).
pub(crate) fn parse_key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

/// `30s`, `5m`, `1h`, `1h30m`.
pub(crate) fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e} (e.g. 30s, 5m, 1h)"))
}

/// A refresh interval: a duration of at least 100 ms (faster only loads the server).
pub(crate) fn parse_interval(s: &str) -> Result<std::time::Duration, String> {
    let d = parse_duration(s)?;
    if d < std::time::Duration::from_millis(100) {
        return Err(format!("{s:?}: must be at least 100ms"));
    }
    Ok(d)
}

/// RFC 3339 in UTC (`2030-01-02T03:04:05Z`).
pub(crate) fn parse_rfc3339(s: &str) -> Result<std::time::SystemTime, String> {
    humantime::parse_rfc3339_weak(s)
        .map_err(|e| format!("{s:?}: {e} (RFC 3339 in UTC, e.g. 2030-01-02T03:04:05Z)"))
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn top_refreshes_every_second_unless_told_and_refuses_tiny_intervals() {
        let top = |argv: &[&str]| match Cli::try_parse_from(argv).map(|c| c.command) {
            Ok(Command::Top(t)) => Ok(t),
            Ok(_) => panic!("not top"),
            Err(e) => Err(e),
        };
        let t = top(&["fsb", "top"]).unwrap();
        assert_eq!(t.interval, std::time::Duration::from_secs(1));
        assert!(!t.once);
        let t = top(&["fsb", "top", "--once", "--interval", "250ms", "--pool", "p"]).unwrap();
        assert!(t.once);
        assert_eq!(t.interval, std::time::Duration::from_millis(250));
        assert_eq!(t.pool.as_deref(), Some("p"));
        for bad in ["0s", "10ms", "soon"] {
            assert!(top(&["fsb", "top", "--interval", bad]).is_err(), "{bad}");
        }
    }

    #[test]
    fn run_takes_the_command_after_double_dash() {
        let cli = Cli::try_parse_from([
            "fsb",
            "run",
            "--rm",
            "-e",
            "A=b=c",
            "--port",
            "8080",
            "--ttl",
            "5m",
            "--",
            "echo",
            "hello",
            "--not-a-flag",
        ])
        .unwrap();
        let Command::Run(run) = cli.command else {
            panic!("not run")
        };
        assert!(run.rm);
        assert_eq!(run.envs, vec![("A".to_owned(), "b=c".to_owned())]);
        assert_eq!(run.ports, vec![8080]);
        assert_eq!(run.ttl, Some(std::time::Duration::from_secs(300)));
        assert_eq!(run.command, ["echo", "hello", "--not-a-flag"]);
    }

    #[test]
    fn bad_values_are_usage_errors() {
        for args in [
            &["fsb", "run", "--port", "0"][..],
            &["fsb", "run", "--port", "65536"],
            &["fsb", "run", "--env", "=x"],
            &["fsb", "run", "--ttl", "soon"],
            &["fsb", "update", "x", "--ttl", "5m", "--clear-expiry"],
            &["fsb", "ls", "-A", "-n", "x"],
            &["fsb", "image", "pull", "r", "--username", "u"],
            &["fsb", "exec", "x"],
        ] {
            let err = Cli::try_parse_from(args).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{args:?}");
        }
    }

    #[test]
    fn global_flags_go_anywhere() {
        let cli =
            Cli::try_parse_from(["fsb", "get", "x", "-o", "json", "--endpoint", "http://h:1"])
                .unwrap();
        assert_eq!(cli.global.output, Some(OutputFormat::Json));
        assert_eq!(cli.global.endpoint.as_deref(), Some("http://h:1"));
    }

    #[test]
    fn help_documents_exit_codes() {
        let help = Cli::command().render_long_help().to_string();
        assert!(help.contains("3   not found"), "{help}");
        assert!(help.contains("64  bad configuration"), "{help}");
    }
}
