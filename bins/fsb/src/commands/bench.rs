//! `fsb bench`: the CLI side of `fsb_local::bench` (flags in, report out).

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use fsb_core::spec::Runtime;
use fsb_local::{
    DefaultMode,
    bench::{self, BenchConfig, BenchError, RawTarget},
};

use crate::{
    cli::{BenchArgs, ModeArg, RuntimeArg},
    client::Conn,
    config::Settings,
    error::{CliError, exit},
    output,
};

/// The library's configuration for these flags.
pub(crate) fn bench_config(args: &BenchArgs, settings: &Settings) -> Result<BenchConfig, CliError> {
    let int = |v: u64, flag: &str| {
        usize::try_from(v).map_err(|_| CliError::BadConfig(format!("{flag} {v} is too large")))
    };
    Ok(BenchConfig {
        count: int(args.count, "--count")?,
        concurrency: int(args.concurrency, "--concurrency")?,
        round: int(args.round.unwrap_or(0), "--round")?,
        warmup: int(args.warmup, "--warmup")?,
        image: settings.image(args.image.as_deref()),
        pool: settings.pool(args.pool.as_deref()),
        namespace: settings.namespace(args.ns.namespace.as_deref()),
        runtime: settings.runtime(args.runtime).map(|r| match r {
            RuntimeArg::Runc => Runtime::Runc,
            RuntimeArg::Crun => Runtime::Crun,
            RuntimeArg::Gvisor => Runtime::Gvisor,
        }),
        modes: if args.mode.is_empty() {
            settings.mode(None).into_iter().collect()
        } else {
            args.mode.clone()
        }
        .into_iter()
        .map(|m| match m {
            ModeArg::Fast => DefaultMode::Fast,
            ModeArg::Strong => DefaultMode::Strong,
        })
        .collect(),
        warm: args.warm,
        raw: args.compare_raw.then(|| RawTarget {
            runtime_root: args.runtime_root.clone(),
            runsc_binary: args
                .runsc
                .clone()
                .unwrap_or_else(|| bench::default_runsc(&settings.data_dir)),
            ..RawTarget::new(
                args.containerd_socket
                    .clone()
                    .unwrap_or_else(|| bench::default_containerd_socket(&settings.data_dir)),
            )
        }),
    })
}

/// `fsb bench`.
pub(crate) async fn bench(args: &BenchArgs, settings: &Settings) -> Result<u8, CliError> {
    let config = bench_config(args, settings)?;
    let conn = Conn::connect(settings).await?;
    // Ctrl-C ends the run after the current batch is removed, not half-way.
    let stop = Arc::new(AtomicBool::new(false));
    let on_signal = stop.clone();
    let watcher = tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("fsb bench: interrupted; removing the current batch");
            on_signal.store(true, Ordering::SeqCst);
        }
    });
    let result = bench::run(&config, conn.channel.clone(), conn.token.as_deref(), &stop).await;
    watcher.abort();
    let report = result.map_err(|e| match e {
        BenchError::FastPath { op, status } => CliError::grpc(format!("bench: {op}"))(status),
        BenchError::Config(m) => CliError::BadConfig(format!("bench: {m}")),
        e @ BenchError::Interrupted { .. } => CliError::Interrupted(format!("bench: {e}")),
        e @ BenchError::Raw { .. } => CliError::Other(anyhow::anyhow!(
            "bench: {e}; is --containerd-socket the containerd `fsb up` uses (and are you root)?"
        )),
    })?;
    if args.json {
        output::print(&format!("{}\n", report.to_json()));
    } else {
        output::print(&report.to_table());
    }
    Ok(exit::OK)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::{
        cli::{Cli, Command},
        config::ProcessEnv,
    };

    #[test]
    fn flags_reach_the_bench_config() {
        let cli = Cli::try_parse_from([
            "fsb",
            "--data-dir",
            "/nonexistent",
            "bench",
            "--count",
            "7",
            "--concurrency",
            "2",
            "--warmup",
            "0",
            "--compare-raw",
            "--runtime",
            "crun",
            "--mode",
            "strong,fast",
        ])
        .unwrap();
        let settings = Settings::resolve(&cli.global, &ProcessEnv::default()).unwrap();
        let Command::Bench(args) = cli.command else {
            panic!("not bench")
        };
        let c = bench_config(&args, &settings).unwrap();
        assert_eq!((c.count, c.concurrency, c.warmup), (7, 2, 0));
        assert_eq!(c.image, crate::config::DEFAULT_IMAGE);
        assert_eq!(c.runtime, Some(Runtime::Crun));
        assert_eq!(c.modes, [DefaultMode::Strong, DefaultMode::Fast]);
        let raw = c.raw.unwrap();
        assert_eq!(
            raw.socket,
            std::path::Path::new(bench::SYSTEM_CONTAINERD_SOCKET)
        );
        assert_eq!(raw.namespace, "fast-sandbox");
    }
}
