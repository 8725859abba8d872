//! `fsb up`: build the `UpConfig` and run local mode inside an actix system until
//! SIGTERM or Ctrl-C.

use std::{net::SocketAddr, time::Duration};

use fsb_core::spec::Runtime;
use fsb_local::{DefaultMode, UpConfig, WarmConfig};

use crate::{
    cli::{ModeArg, RuntimeArg, UpArgs},
    config::Settings,
    error::{CliError, exit},
};

/// `value` of `--flag` as a loopback address (local mode has no TLS and one token: it
/// serves this machine only).
fn loopback(flag: &str, value: &str) -> Result<SocketAddr, CliError> {
    let addr: SocketAddr = value.parse().map_err(|_| {
        CliError::BadConfig(format!(
            "--{flag} {value:?} is not an address; use 127.0.0.1:PORT"
        ))
    })?;
    if !addr.ip().is_loopback() {
        return Err(CliError::BadConfig(format!(
            "--{flag} {addr} is not a loopback address; `fsb up` serves this machine only, use 127.0.0.1:{}",
            addr.port()
        )));
    }
    Ok(addr)
}

/// The `UpConfig` for these flags; a non-loopback `--listen` or `--metrics-listen` is
/// refused.
pub(crate) fn up_config(args: &UpArgs, settings: &Settings) -> Result<UpConfig, CliError> {
    let listen = loopback("listen", &args.listen)?;
    let metrics_listen = loopback("metrics-listen", &args.metrics_listen)?;
    let mut config = UpConfig::new(settings.data_dir.clone());
    config.listen = listen;
    config.metrics_listen = metrics_listen;
    config.rate_limit = fsb_gateway::RateLimitConfig {
        rate: args.rate_limit,
        burst: args.rate_burst,
    };
    config.containerd_socket = args.containerd_socket.clone();
    if let Some(c) = args.capacity {
        config.capacity = c;
    }
    if let Some(r) = settings.runtime(args.runtime) {
        config.default_runtime = match r {
            RuntimeArg::Runc => Runtime::Runc,
            RuntimeArg::Crun => Runtime::Crun,
            RuntimeArg::Gvisor => Runtime::Gvisor,
        };
    }
    if let Some(m) = settings.mode(args.mode) {
        config.default_mode = match m {
            ModeArg::Fast => DefaultMode::Fast,
            ModeArg::Strong => DefaultMode::Strong,
        };
    }
    if let Some(secs) = args.stop_grace {
        config.stop_grace = Duration::from_secs(secs);
    }
    config.keep_sandboxes = !args.stop_sandboxes_on_exit;
    config.agent_id = args.agent_id.clone();
    config.busybox = args.busybox.clone();
    for w in args.warm.iter().filter(|w| !w.is_empty()) {
        let target = WarmConfig::parse_target(w, config.default_runtime)
            .map_err(|e| CliError::BadConfig(format!("--{e}")))?;
        config.warm.targets.push(target);
    }
    config.warm.init = args.init_binary.clone().or_else(|| {
        std::env::current_exe()
            .ok()
            .and_then(|exe| exe.parent().map(|d| d.join("fsb-init")))
    });
    config.warm.limits.max_starting = args.warm_max_starting.max(1);
    config.warm.limits.memory_budget = args.warm_memory_mib << 20;
    config.drop_capabilities = fsb_core::capability::CapabilityDrop::parse(
        args.drop_capabilities
            .iter()
            .filter(|c| !c.trim().is_empty()),
    )
    .map_err(|e| CliError::BadConfig(format!("--drop-capability: {e}")))?;
    Ok(config)
}

/// Resolves on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            // Without a SIGTERM handler, Ctrl-C still works.
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = term => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// `fsb up` (blocking: owns the actix system).
pub(crate) fn up(args: &UpArgs, settings: &Settings) -> Result<u8, CliError> {
    let config = up_config(args, settings)?;
    let dir = settings.data_dir.root().display().to_string();
    // Actors stay on the system's thread; everything spawned with tokio (gRPC
    // connections, the gateway's create tasks, store writes) runs on a multi-threaded
    // runtime, so the agent's containerd calls do not queue behind them.
    let system = actix_rt::System::with_tokio_rt(|| {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("cannot start the tokio runtime: {e}"))
    });
    let result = system.block_on(fsb_local::run(config, shutdown_signal(), move |addr| {
        eprintln!("fsb up: listening on {addr} (data dir {dir})")
    }));
    match result {
        Ok(()) => Ok(exit::OK),
        Err(e) => {
            let e = e.to_string();
            // Local mode's messages may already name themselves.
            let e = e.strip_prefix("fsb up: ").unwrap_or(&e);
            Err(CliError::Other(anyhow::anyhow!(
                "fsb up failed: {e}; see the log above (RUST_LOG=debug for more)"
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::{
        cli::{Cli, Command},
        config::ProcessEnv,
    };

    fn config(argv: &[&str]) -> Result<UpConfig, CliError> {
        let cli = Cli::try_parse_from(argv).unwrap();
        let settings = Settings::resolve(&cli.global, &ProcessEnv::default()).unwrap();
        let Command::Up(up) = cli.command else {
            panic!("not up")
        };
        up_config(&up, &settings)
    }

    #[test]
    fn flags_reach_the_up_config() {
        let c = config(&[
            "fsb",
            "--data-dir",
            "/d",
            "up",
            "--listen",
            "127.0.0.1:0",
            "--capacity",
            "8",
            "--runtime",
            "crun",
            "--mode",
            "strong",
            "--stop-grace",
            "3",
            "--stop-sandboxes-on-exit",
            "--containerd-socket",
            "/c.sock",
        ])
        .unwrap();
        assert_eq!(c.listen.port(), 0);
        assert_eq!(c.capacity, 8);
        assert_eq!(c.default_runtime, Runtime::Crun);
        assert_eq!(c.default_mode, DefaultMode::Strong);
        assert_eq!(c.stop_grace, Duration::from_secs(3));
        assert!(!c.keep_sandboxes);
        assert_eq!(
            c.containerd_socket.as_deref(),
            Some(std::path::Path::new("/c.sock"))
        );
        assert_eq!(c.data_dir.root(), std::path::Path::new("/d"));
    }

    #[test]
    fn drop_capabilities_are_parsed_and_unknown_names_refused() {
        let c = config(&[
            "fsb",
            "--data-dir",
            "/d",
            "up",
            "--drop-capability",
            "chown",
            "--drop-capability",
            "CAP_NET_BIND_SERVICE",
        ])
        .unwrap();
        assert_eq!(
            c.drop_capabilities.to_arg(),
            "CAP_CHOWN,CAP_NET_BIND_SERVICE"
        );
        assert!(
            config(&["fsb", "--data-dir", "/d", "up"])
                .unwrap()
                .drop_capabilities
                .is_empty()
        );
        let err = config(&["fsb", "--data-dir", "/d", "up", "--drop-capability", "NOPE"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--drop-capability") && err.contains("\"NOPE\""),
            "{err}"
        );
    }

    #[test]
    fn defaults_keep_sandboxes_on_loopback() {
        let c = config(&["fsb", "--data-dir", "/d", "up"]).unwrap();
        assert!(c.keep_sandboxes);
        assert!(c.listen.ip().is_loopback());
        assert_eq!(c.listen.to_string(), fsb_local::DEFAULT_LISTEN);
    }

    #[test]
    fn rate_limit_defaults_and_can_be_turned_off() {
        let c = config(&["fsb", "--data-dir", "/d", "up"]).unwrap();
        assert_eq!(c.rate_limit, fsb_gateway::RateLimitConfig::DEFAULT);
        let c = config(&[
            "fsb",
            "--data-dir",
            "/d",
            "up",
            "--rate-limit",
            "0",
            "--rate-burst",
            "7",
        ])
        .unwrap();
        assert_eq!(c.rate_limit.rate, 0);
        assert_eq!(c.rate_limit.burst, 7);
        assert!(
            Cli::try_parse_from(["fsb", "--data-dir", "/d", "up", "--rate-burst", "0"]).is_err()
        );
    }

    #[test]
    fn non_loopback_listen_is_bad_config() {
        for listen in ["0.0.0.0:7370", "192.168.1.1:7370", "localhost"] {
            let err = config(&["fsb", "--data-dir", "/d", "up", "--listen", listen]).unwrap_err();
            assert_eq!(err.exit_code(), 64, "{listen}");
        }
        assert!(config(&["fsb", "--data-dir", "/d", "up", "--listen", "[::1]:7370"]).is_ok());
    }

    #[test]
    fn metrics_listen_defaults_to_a_free_loopback_port_and_must_be_loopback() {
        let c = config(&["fsb", "--data-dir", "/d", "up"]).unwrap();
        assert_eq!(c.metrics_listen.to_string(), "127.0.0.1:0");
        let c = config(&[
            "fsb",
            "--data-dir",
            "/d",
            "up",
            "--metrics-listen",
            "127.0.0.1:9370",
        ])
        .unwrap();
        assert_eq!(c.metrics_listen.port(), 9370);
        for bad in ["0.0.0.0:9370", "nowhere"] {
            let err =
                config(&["fsb", "--data-dir", "/d", "up", "--metrics-listen", bad]).unwrap_err();
            assert_eq!(err.exit_code(), 64, "{bad}");
        }
    }
}
