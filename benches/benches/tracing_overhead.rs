//! What exporting traces costs a create: full-path creates (client -> gRPC -> gateway
//! -> registry -> agent -> containerd, FAST, cold, runc, timed client-side from send to
//! answer) through `fsb up` (release build) with `FSB_OTLP_ENDPOINT` set to a real
//! OTLP/gRPC receiver, against the same `fsb up` without it, in one run.
//!
//! The two variants alternate in rounds on the same data directory and containerd
//! (`fsb up` restarted between them, which variant goes first alternating too), so
//! drift of the machine lands on both. Each sandbox is removed untimed. The receiver
//! counts the `gateway.create` spans it got, so a traced round that exported nothing
//! fails the bench instead of flattering it. Run it through `benches/run.sh tracing`.
//!
//! Arguments: `--rounds N` (default 6), `--per-round N` (default 40), `--json`.

#![allow(clippy::print_stdout)] // the table is this benchmark's report

use std::{path::PathBuf, time::Duration};

use anyhow::{Context, Result};
use fsb_local::bench::Summary;
use fsb_proto::fastpath::v1 as fp;
use fsb_tests::{
    containerd::ContainerdEnv,
    local::{LocalUp, free_port, sleeper_request},
    otlp::OtlpReceiver,
    wait::wait_until,
};
use tokio::time::Instant;

struct Args {
    rounds: usize,
    per_round: usize,
    json: bool,
}

fn args() -> Result<Args> {
    let mut a = Args {
        rounds: 6,
        per_round: 40,
        json: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut number = |name: &str| -> Result<usize> {
            it.next()
                .with_context(|| format!("{name} needs a value"))?
                .parse()
                .with_context(|| format!("{name}: not a number"))
        };
        match arg.as_str() {
            "--rounds" => a.rounds = number("--rounds")?,
            "--per-round" => a.per_round = number("--per-round")?,
            "--json" => a.json = true,
            // cargo bench passes --bench.
            "--bench" => {}
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    anyhow::ensure!(
        a.rounds > 0 && a.per_round > 0,
        "--rounds and --per-round must be > 0"
    );
    Ok(a)
}

/// `per_round` sequential creates through `up`, each removed after it is timed.
async fn round(
    up: &LocalUp,
    env: &ContainerdEnv,
    tag: &str,
    per_round: usize,
) -> Result<Vec<Duration>> {
    let mut client = up.client()?;
    let mut samples = Vec::with_capacity(per_round);
    for i in 0..per_round {
        let name = format!("{tag}-{i}");
        let req = sleeper_request(&env.image, &name, fp::ConsistencyMode::Fast);
        let t = Instant::now();
        client
            .create(req)
            .await
            .with_context(|| format!("create {name}"))?;
        samples.push(t.elapsed());
        client
            .delete(fp::DeleteRequest {
                namespace: "default".into(),
                name,
                grace_period_seconds: Some(0),
            })
            .await?;
    }
    Ok(samples)
}

async fn bench(a: Args) -> Result<()> {
    let env = ContainerdEnv::from_env();
    let receiver = OtlpReceiver::start().await?;
    let data = PathBuf::from(std::env::var("FSB_TEST_RUN_DIR").unwrap_or_else(|_| "/tmp".into()))
        .join(format!("tracing-overhead-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    let port = free_port()?;
    let traced_env = [
        ("FSB_OTLP_ENDPOINT", receiver.endpoint.as_str()),
        ("RUST_LOG", "warn"),
    ];
    let plain_env = [("RUST_LOG", "warn")];
    let (mut off, mut on) = (Vec::new(), Vec::new());
    let mut traced_creates = 0usize;
    for r in 0..a.rounds {
        // Alternate which variant goes first.
        let order = if r % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for traced in order {
            let vars: &[(&str, &str)] = if traced { &traced_env } else { &plain_env };
            let up = LocalUp::start_with_env(
                &env,
                &data,
                "overhead",
                port,
                &["--stop-sandboxes-on-exit"],
                vars,
            )
            .await?;
            // One untimed create first: the image is resolved and cached.
            round(&up, &env, &format!("warmup-{r}-{traced}"), 1).await?;
            let tag = format!("r{r}-{}", if traced { "on" } else { "off" });
            let s = round(&up, &env, &tag, a.per_round).await?;
            if traced {
                traced_creates += s.len() + 1;
                on.extend(s);
            } else {
                off.extend(s);
            }
            let mut up = up;
            up.terminate(Duration::from_secs(60)).await?;
        }
    }
    // Every traced create was exported (the guard flushes on exit).
    let exported = wait_until("the traced creates' spans", Duration::from_secs(30), || {
        let n = receiver
            .spans()
            .iter()
            .filter(|s| s.name == "gateway.create")
            .count();
        async move { Ok((n >= traced_creates).then_some(n)) }
    })
    .await?;
    let (s_off, s_on) = (
        Summary::of(&off).context("no samples")?,
        Summary::of(&on).context("no samples")?,
    );
    let ratio = s_on.p50_ms / s_off.p50_ms;
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "rounds": a.rounds,
                "per_round": a.per_round,
                "off": { "count": off.len(), "latency": s_off },
                "on": { "count": on.len(), "latency": s_on, "exported_gateway_spans": exported },
                "p50_ratio_on_off": (ratio * 1e4).round() / 1e4,
            })
        );
    } else {
        println!("full-path create, FAST, cold, runc, concurrency 1 (ms)");
        println!("| tracing | count | p50 | p90 | p99 | max |");
        for (name, n, s) in [("off", off.len(), s_off), ("exported", on.len(), s_on)] {
            println!(
                "| {name} | {n} | {:.2} | {:.2} | {:.2} | {:.2} |",
                s.p50_ms, s.p90_ms, s.p99_ms, s.max_ms
            );
        }
        println!("p50 ratio exported / off: {ratio:.4} ({exported} gateway.create spans received)");
    }
    let _ = std::fs::remove_dir_all(&data);
    Ok(())
}

fn main() -> Result<()> {
    let a = args()?;
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(bench(a))
}
