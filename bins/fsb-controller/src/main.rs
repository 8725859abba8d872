//! fsb-controller: parse the config, start logging, connect to the API server
//! (in-cluster config or KUBECONFIG) and run the controller until SIGTERM or Ctrl-C.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use clap::Parser;
use fsb_controller::{
    leader::LeaseConfig,
    rbac::AuthTtl,
    run::{AgentTlsConfig, ControllerConfig, FastPathAuth, run},
    serving::{
        FastPathTls, GeneratedCert, ServingSource, certified_key, check_name, gateway_names,
    },
};
use fsb_proto::fastpath::v1 as fp;

/// Kubernetes controller: fast-path gateway, registry, agent sessions, Sandbox loop.
#[derive(Debug, Parser)]
#[command(name = "fsb-controller", version)]
struct Config {
    /// Fast-path gRPC address.
    #[arg(long, env = "FSB_LISTEN", default_value = "0.0.0.0:7370")]
    listen: SocketAddr,
    /// Address agents register at (agent.v1.AgentControl).
    #[arg(long, env = "FSB_AGENT_LISTEN", default_value = "0.0.0.0:7371")]
    agent_listen: SocketAddr,
    /// The agents' own port (sandboxes may not use it).
    #[arg(long, env = "FSB_AGENT_PORT", default_value_t = 5758)]
    agent_port: u16,
    /// Consistency mode of creates that name none: fast or strong.
    #[arg(long, env = "FSB_DEFAULT_MODE", default_value = "fast", value_parser = ["fast", "strong"])]
    default_mode: String,
    /// Who may call the fast path: `kubernetes` (bearer tokens checked with
    /// TokenReview, each call with SubjectAccessReview on sandboxes.sandbox.fast.io),
    /// `token` (one shared token from --token-file, all rights) or `none`.
    #[arg(long, env = "FSB_AUTH", default_value = "kubernetes", value_parser = ["kubernetes", "token", "none"])]
    auth: String,
    /// The fast path's TLS certificate chain (PEM), e.g. `tls.crt` of a mounted
    /// kubernetes.io/tls Secret; with --tls-key-file. Re-read when it changes (every
    /// --tls-reload-seconds). Unset, and no --tls-generate: plaintext.
    #[arg(long, env = "FSB_TLS_CERT_FILE", requires = "tls_key_file")]
    tls_cert_file: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert-file.
    #[arg(long, env = "FSB_TLS_KEY_FILE", requires = "tls_cert_file")]
    tls_key_file: Option<PathBuf>,
    /// Serve the fast path over TLS with a certificate the controller issues from the
    /// gateway CA (Secret --gateway-ca-secret, created when missing; its certificate is
    /// published as `ca.crt` of the ConfigMap of the same name). Names: the Service's
    /// DNS names (--tls-service), localhost, 127.0.0.1, ::1 and --tls-san.
    #[arg(long, env = "FSB_TLS_GENERATE", conflicts_with = "tls_cert_file")]
    tls_generate: bool,
    /// More names (DNS names or IP addresses) of the generated certificate,
    /// comma-separated or repeated.
    #[arg(
        long,
        env = "FSB_TLS_SANS",
        value_delimiter = ',',
        requires = "tls_generate"
    )]
    tls_san: Vec<String>,
    /// The controller's Service, whose DNS names the generated certificate carries
    /// (<service>.<namespace>.svc[.cluster.local]; namespace: the controller's own).
    #[arg(long, env = "FSB_TLS_SERVICE", default_value = "fsb-controller")]
    tls_service: String,
    /// Secret holding the gateway CA (`ca.crt`, `ca.key`; created when missing, or
    /// create it beforehand with a CA of your own), and name of the ConfigMap that
    /// publishes `ca.crt`. In the controller's namespace.
    #[arg(long, env = "FSB_GATEWAY_CA_SECRET", default_value = fsb_controller::tls::DEFAULT_GATEWAY_CA)]
    gateway_ca_secret: String,
    /// How often the fast path's certificate is checked for renewal (changed files;
    /// a generated one close to expiry or whose CA changed), seconds.
    #[arg(long, env = "FSB_TLS_RELOAD_SECONDS", default_value_t = fsb_controller::serving::DEFAULT_CHECK_EVERY.as_secs(), value_parser = clap::value_parser!(u64).range(1..))]
    tls_reload_seconds: u64,
    /// File holding the bearer token of `--auth token`.
    #[arg(long, env = "FSB_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// Seconds an authenticated token and an allowed call are remembered (`--auth
    /// kubernetes`; refusals: 2 s at most).
    #[arg(long, env = "FSB_AUTH_CACHE_SECONDS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(0..=300))]
    auth_cache_seconds: u64,
    /// Longest wait for running agent pods to register before serving creates.
    #[arg(long, env = "FSB_STARTUP_WAIT_SECONDS", default_value_t = 15)]
    startup_wait_seconds: u64,
    /// A disconnected agent whose pod still exists is declared lost after this long.
    #[arg(long, env = "FSB_AGENT_LOST_AFTER_SECONDS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    agent_lost_after_seconds: u64,
    /// Only this namespace's Sandboxes, pools and agents (default: the whole cluster).
    #[arg(long, env = "FSB_WATCH_NAMESPACE")]
    watch_namespace: Option<String>,
    /// Image of agent pods for pools without an agentTemplate.
    #[arg(long, env = "FSB_AGENT_IMAGE", default_value = concat!("fast-sandbox/fsb-agent:", env!("CARGO_PKG_VERSION")))]
    agent_image: String,
    /// The AgentControl URL agent pods dial (default: http://<this pod's address>:<agent-listen port>,
    /// from FSB_POD_IP).
    #[arg(long, env = "FSB_AGENT_URL")]
    agent_url: Option<String>,
    /// Namespace of the leader Lease (default: FSB_POD_NAMESPACE, else the watched
    /// namespace, else fast-sandbox-system).
    #[arg(long, env = "FSB_LEASE_NAMESPACE")]
    lease_namespace: Option<String>,
    /// This replica's identity in the Lease (default: FSB_POD_NAME, else the hostname).
    #[arg(long, env = "FSB_IDENTITY")]
    identity: Option<String>,
    /// Seconds an unrenewed Lease stays valid.
    #[arg(long, env = "FSB_LEASE_DURATION_SECONDS", default_value_t = 15, value_parser = clap::value_parser!(u64).range(3..))]
    lease_duration_seconds: u64,
    /// Run without leader election (one replica only).
    #[arg(long, env = "FSB_NO_LEADER_ELECTION")]
    no_leader_election: bool,
    /// Heartbeat period agents are told to use, milliseconds.
    #[arg(long, env = "FSB_HEARTBEAT_MS", default_value_t = 5000, value_parser = clap::value_parser!(u64).range(100..))]
    heartbeat_ms: u64,
    /// Secret holding the agent CA (`ca.crt`, `ca.key`), created with a fresh CA when
    /// missing; create it beforehand to supply a CA of your own.
    #[arg(long, env = "FSB_AGENT_CA_SECRET", default_value = fsb_controller::tls::DEFAULT_CA_SECRET)]
    agent_ca_secret: String,
    /// Namespace of that Secret (default: as the Lease's).
    #[arg(long, env = "FSB_AGENT_CA_NAMESPACE")]
    agent_ca_namespace: Option<String>,
    /// Talk to agents in plaintext, unauthenticated (no mutual TLS). Only for a host
    /// where nothing else can reach the agents.
    #[arg(long, env = "FSB_AGENT_PLAINTEXT")]
    agent_plaintext: bool,
    /// Serve Prometheus metrics on this address (`GET /metrics`); off when unset.
    #[arg(long, env = "FSB_METRICS_LISTEN", value_name = "ADDR")]
    metrics_listen: Option<SocketAddr>,
    /// Fast-path requests per second per client host, beyond which calls get
    /// ResourceExhausted (0: no limit).
    #[arg(long, env = "FSB_RATE_LIMIT", default_value_t = fsb_gateway::RateLimitConfig::DEFAULT.rate)]
    rate_limit: u32,
    /// Requests a client may send at once before the rate applies.
    #[arg(long, env = "FSB_RATE_BURST", default_value_t = fsb_gateway::RateLimitConfig::DEFAULT.burst, value_parser = clap::value_parser!(u32).range(1..))]
    rate_burst: u32,
}

fn main() -> ExitCode {
    let config = match Config::try_parse() {
        Ok(c) => c,
        Err(e)
            if matches!(
                e.kind(),
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion
            ) =>
        {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!(
                "fsb-controller: {}",
                e.render()
                    .to_string()
                    .lines()
                    .next()
                    .unwrap_or("invalid configuration")
            );
            return ExitCode::from(64);
        }
    };
    let auth = match (config.auth.as_str(), &config.token_file) {
        ("token", Some(path)) => match std::fs::read_to_string(path) {
            Ok(t) if !t.trim().is_empty() => FastPathAuth::Token(t.trim().to_owned()),
            Ok(_) => {
                eprintln!("fsb-controller: --token-file {}: empty", path.display());
                return ExitCode::from(64);
            }
            Err(e) => {
                eprintln!("fsb-controller: --token-file {}: {e}", path.display());
                return ExitCode::from(64);
            }
        },
        ("token", None) => {
            eprintln!("fsb-controller: --auth token needs --token-file");
            return ExitCode::from(64);
        }
        (_, Some(_)) => {
            eprintln!("fsb-controller: --token-file is only used with --auth token");
            return ExitCode::from(64);
        }
        ("none", None) => FastPathAuth::None,
        _ => {
            let allowed = Duration::from_secs(config.auth_cache_seconds);
            FastPathAuth::Kubernetes(AuthTtl {
                allowed,
                denied: allowed.min(Duration::from_secs(2)),
                ..AuthTtl::default()
            })
        }
    };
    let _tracing = match fsb_telemetry::trace::init("fsb-controller", Default::default()) {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("fsb-controller: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The controller's own namespace: where its Lease and the agent CA live.
    let own_namespace = config
        .lease_namespace
        .clone()
        .or_else(|| std::env::var("FSB_POD_NAMESPACE").ok())
        .or_else(|| config.watch_namespace.clone())
        .unwrap_or_else(|| "fast-sandbox-system".into());
    let fast_path_source = match (&config.tls_cert_file, &config.tls_key_file) {
        (Some(cert), Some(key)) => {
            // Checked now, so that a bad pair is a configuration error, said in one line.
            let read = |flag: &str, path: &PathBuf| {
                std::fs::read(path).map_err(|e| format!("{flag} {}: {e}", path.display()))
            };
            match (read("--tls-cert-file", cert), read("--tls-key-file", key)) {
                (Ok(c), Ok(k)) => {
                    if let Err(e) = certified_key(&c, &k) {
                        eprintln!(
                            "fsb-controller: --tls-cert-file {} / --tls-key-file {}: {e}",
                            cert.display(),
                            key.display()
                        );
                        return ExitCode::from(64);
                    }
                    Some(ServingSource::Files {
                        cert: cert.clone(),
                        key: key.clone(),
                    })
                }
                (Err(e), _) | (_, Err(e)) => {
                    eprintln!("fsb-controller: {e}");
                    return ExitCode::from(64);
                }
            }
        }
        _ if config.tls_generate => {
            let names = gateway_names(&config.tls_service, &own_namespace, &config.tls_san);
            if let Some(e) = names.iter().find_map(|n| check_name(n).err()) {
                eprintln!("fsb-controller: --tls-san/--tls-service: {e}");
                return ExitCode::from(64);
            }
            Some(ServingSource::Generated(GeneratedCert {
                namespace: own_namespace.clone(),
                ca_secret: config.gateway_ca_secret.clone(),
                names,
            }))
        }
        _ => None,
    };
    let fast_path_tls = fast_path_source.map(|source| FastPathTls {
        source,
        check_every: Duration::from_secs(config.tls_reload_seconds),
    });
    let agent_tls = (!config.agent_plaintext).then(|| AgentTlsConfig {
        ca_secret: config.agent_ca_secret.clone(),
        ca_namespace: Some(
            config
                .agent_ca_namespace
                .clone()
                .unwrap_or_else(|| own_namespace.clone()),
        ),
    });
    let lease = (!config.no_leader_election).then(|| LeaseConfig {
        namespace: own_namespace.clone(),
        name: "fsb-controller".into(),
        identity: config
            .identity
            .clone()
            .or_else(|| std::env::var("FSB_POD_NAME").ok())
            .unwrap_or_else(|| {
                std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .map(|h| h.trim().to_owned())
                    .unwrap_or_else(|_| "fsb-controller".into())
            }),
        duration: Duration::from_secs(config.lease_duration_seconds),
    });
    let controller = ControllerConfig {
        lease,
        agent_tls,
        listen: config.listen,
        agent_listen: config.agent_listen,
        agent_port: config.agent_port,
        default_mode: if config.default_mode == "strong" {
            fp::ConsistencyMode::Strong
        } else {
            fp::ConsistencyMode::Fast
        },
        auth,
        fast_path_tls,
        startup_wait: Duration::from_secs(config.startup_wait_seconds),
        agent_lost_after: Duration::from_secs(config.agent_lost_after_seconds),
        heartbeat: Duration::from_millis(config.heartbeat_ms),
        namespace: config.watch_namespace,
        agent_image: config.agent_image,
        agent_url: config.agent_url.or_else(|| {
            std::env::var("FSB_POD_IP")
                .ok()
                .map(|ip| format!("http://{ip}:{}", config.agent_listen.port()))
        }),
        metrics_listen: config.metrics_listen,
        rate_limit: fsb_gateway::RateLimitConfig {
            rate: config.rate_limit,
            burst: config.rate_burst,
        },
        ..ControllerConfig::default()
    };
    let system = actix_rt::System::with_tokio_rt(|| {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("cannot start the tokio runtime: {e}"))
    });
    let result = system.block_on(async move {
        let client = kube::Client::try_default()
            .await
            .map_err(|e| format!("connecting to the API server: {e}"))?;
        run(client, controller, shutdown(), |addrs, _| {
            tracing::info!(fast_path = %addrs.fast_path, agents = %addrs.agents, "controller ready");
        })
        .await
        .map_err(|e| e.to_string())
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fsb-controller: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn shutdown() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
