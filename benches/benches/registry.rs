//! Registry allocation cost on the success path: allocate + release pairs, in the pure
//! state and through the actor mailbox with many concurrent senders, at 100, 1,000 and
//! 10,000 agents. Ends with a p50/p90/p99 summary and the 10,000 / 1,000 ratio measured
//! in the same run.
//!
//! Run: `cargo bench -p fsb-benches --bench registry`

#![allow(clippy::print_stdout)] // the summary table is this benchmark's report

use std::{
    hint::black_box,
    time::{Duration, Instant},
};

use criterion::{BenchmarkId, Criterion, Throughput};
use fsb_benches::{bench_requests, percentiles, populated_registry};
use fsb_registry::{AllocateOutcome, AllocateRequest, RegistryHandle, RegistryState};
use futures::future::join_all;

const SIZES: [usize; 3] = [100, 1_000, 10_000];
/// Sandboxes already placed per agent before measuring (of 16 slots).
const PRELOAD: usize = 4;
/// Concurrent senders in the mailbox benchmark.
const SENDERS: usize = 64;

fn pair(state: &mut RegistryState, req: &AllocateRequest) {
    match state.allocate(req) {
        AllocateOutcome::Allocated(p) => {
            black_box(state.release(&p.sandbox_id, &p.agent));
        }
        other => panic!("benchmark must measure the success path, got {other:?}"),
    }
}

fn bench_state(c: &mut Criterion) {
    let mut group = c.benchmark_group("registry/state/allocate+release");
    group.throughput(Throughput::Elements(1));
    for n in SIZES {
        let mut state = populated_registry(n, PRELOAD);
        let reqs = bench_requests(1024);
        let mut i = 0;
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| {
                pair(&mut state, &reqs[i % reqs.len()]);
                i += 1;
            })
        });
    }
    group.finish();
}

/// Run `pairs` allocate+release pairs through the mailbox from `SENDERS` tasks.
async fn mailbox_pairs(
    registry: &RegistryHandle,
    reqs: &[AllocateRequest],
    pairs: u64,
) -> Duration {
    let start = Instant::now();
    join_all((0..SENDERS).map(|k| {
        let registry = registry.clone();
        async move {
            let mut i = k as u64;
            while i < pairs {
                let req = reqs[i as usize % reqs.len()].clone();
                match registry.allocate(req).await {
                    Ok(AllocateOutcome::Allocated(p)) => {
                        black_box(registry.release(p.sandbox_id, p.agent).await.ok());
                    }
                    other => panic!("benchmark must measure the success path, got {other:?}"),
                }
                i += SENDERS as u64;
            }
        }
    }))
    .await;
    start.elapsed()
}

fn start_registry(sys: &actix_rt::SystemRunner, n: usize) -> RegistryHandle {
    sys.block_on(async {
        let registry = RegistryHandle::start();
        for i in 0..n {
            registry
                .report(fsb_benches::bench_agent(i))
                .await
                .expect("registry running");
        }
        registry
    })
}

fn bench_mailbox(c: &mut Criterion) {
    let sys = actix_rt::System::new();
    let mut group = c.benchmark_group("registry/mailbox/allocate+release");
    group.throughput(Throughput::Elements(1));
    for n in SIZES {
        let registry = start_registry(&sys, n);
        let reqs = bench_requests(1024);
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter_custom(|iters| sys.block_on(mailbox_pairs(&registry, &reqs, iters)))
        });
    }
    group.finish();
}

/// Per-pair latency percentiles from batches, and the scaling ratio, in one run.
fn summary() {
    const BATCHES: usize = 300;
    const PER_BATCH: usize = 1_000;
    println!(
        "\nregistry summary (per allocate+release pair; {BATCHES} batches x {PER_BATCH} pairs each)"
    );
    println!(
        "{:<10} {:>8} {:>10} {:>10} {:>10}",
        "agents", "count", "p50 ns", "p90 ns", "p99 ns"
    );
    let reqs = bench_requests(1024);
    let mut p50s = Vec::new();
    for n in SIZES {
        let mut state = populated_registry(n, PRELOAD);
        let mut samples = Vec::with_capacity(BATCHES);
        for b in 0..BATCHES {
            let start = Instant::now();
            for i in 0..PER_BATCH {
                pair(&mut state, &reqs[(b * PER_BATCH + i) % reqs.len()]);
            }
            samples.push(start.elapsed().as_nanos() as f64 / PER_BATCH as f64);
        }
        let (p50, p90, p99) = percentiles(&mut samples);
        p50s.push(p50);
        println!(
            "{n:<10} {:>8} {p50:>10.0} {p90:>10.0} {p99:>10.0}",
            BATCHES * PER_BATCH
        );
    }
    println!(
        "ratio p50 10,000 / 1,000 agents: {:.2} (linear growth would be 10.00)",
        p50s[2] / p50s[1]
    );

    let sys = actix_rt::System::new();
    for n in SIZES {
        let registry = start_registry(&sys, n);
        let pairs = 200_000;
        let elapsed = sys.block_on(mailbox_pairs(&registry, &reqs, pairs));
        println!(
            "mailbox, {n} agents, {SENDERS} senders: {pairs} pairs in {:.0} ms = {:.0} pairs/s",
            elapsed.as_secs_f64() * 1e3,
            pairs as f64 / elapsed.as_secs_f64()
        );
    }
}

fn main() {
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(20)
        .configure_from_args();
    bench_state(&mut c);
    bench_mailbox(&mut c);
    c.final_summary();
    summary();
}
