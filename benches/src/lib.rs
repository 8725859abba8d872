//! Shared fixtures for the benchmarks in `benches/benches/` (and later `fsb bench`).

use std::num::NonZeroU32;

use fsb_core::{
    AgentId, HostPort, ImageRef, NamespaceName, NodeName, PoolName, RequestId, SandboxId,
    spec::SpecDigest,
};
use fsb_registry::{AgentInfo, AgentReport, AllocateRequest, RegistryState};

/// Slots per agent in the registry benchmarks.
pub const BENCH_CAPACITY: u32 = 16;
const IMAGES: [&str; 4] = ["busybox", "alpine", "python:3.12", "node:22"];

/// Agent `i` of a benchmark pool: two of four images, 16 slots.
pub fn bench_agent(i: usize) -> AgentReport {
    let image = |s: &str| ImageRef::parse("image", s).expect("static image reference");
    AgentReport {
        agent: AgentInfo {
            id: AgentId::from(format!("agent-{i:06}")),
            pool: pool(),
            namespace: namespace(),
            node: NodeName::from(format!("node-{:04}", i / 8)),
            capacity: NonZeroU32::new(BENCH_CAPACITY).unwrap_or(NonZeroU32::MIN),
            images: vec![image(IMAGES[i % 4]), image(IMAGES[(i + 1) % 4])],
            healthy: true,
            default_runtime: fsb_core::spec::Runtime::Runc,
            warm: Vec::new(),
        },
        sandboxes: Vec::new(),
    }
}

/// `n` requests, cycling images and ports, each with its own request and sandbox id.
pub fn bench_requests(n: usize) -> Vec<AllocateRequest> {
    (0..n)
        .map(|i| AllocateRequest {
            request_id: RequestId::parse("request_id", &format!("bench-{i}")).expect("valid id"),
            sandbox_id: SandboxId::generate(),
            namespace: namespace(),
            pool: pool(),
            image: ImageRef::parse("image", IMAGES[i % 4]).expect("static image reference"),
            ports: vec![HostPort::parse("port", 10_000 + (i % 1000) as u32).expect("in range")],
            digest: SpecDigest([7; 32]),
            runtime: None,
            claimable: false,
        })
        .collect()
}

/// A registry with `agents` agents, each already holding `preload` sandboxes, so the
/// indexes hold agents at several loads as in a busy cluster.
pub fn populated_registry(agents: usize, preload: usize) -> RegistryState {
    let mut state = RegistryState::new();
    for i in 0..agents {
        state.report(bench_agent(i));
    }
    for req in bench_requests(agents * preload) {
        // Every preload allocation fits: agents * preload slots exist and ports cycle.
        let _ = state.allocate(&AllocateRequest {
            request_id: RequestId::parse("request_id", &format!("pre-{}", req.sandbox_id))
                .expect("valid id"),
            ports: Vec::new(),
            ..req
        });
    }
    state
}

fn pool() -> PoolName {
    PoolName::parse("pool", "bench").expect("static name")
}

fn namespace() -> NamespaceName {
    NamespaceName::parse("namespace", "default").expect("static name")
}

/// p50/p90/p99 of `samples` (sorted in place); the figures the README reports.
pub fn percentiles(samples: &mut [f64]) -> (f64, f64, f64) {
    samples.sort_by(f64::total_cmp);
    let at = |q: f64| {
        let i = ((samples.len() as f64 - 1.0) * q).round() as usize;
        samples.get(i).copied().unwrap_or(f64::NAN)
    };
    (at(0.50), at(0.90), at(0.99))
}

/// p50/p90/p99 of `durations` in milliseconds (see [`percentiles`]).
pub fn percentiles_ms(durations: &[std::time::Duration]) -> (f64, f64, f64) {
    let mut ms: Vec<f64> = durations.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    percentiles(&mut ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_pick_the_nearest_rank() {
        let mut samples: Vec<f64> = (1..=101).rev().map(f64::from).collect();
        assert_eq!(percentiles(&mut samples), (51.0, 91.0, 100.0));
        assert!(percentiles(&mut []).0.is_nan());
        let ms = percentiles_ms(&[std::time::Duration::from_micros(1500)]);
        assert_eq!(ms, (1.5, 1.5, 1.5));
    }
}
