//! The actor under concurrent callers: mailbox serialization alone prevents double
//! allocation (seed-review item 2, "port-mutual-exclusion").

#![allow(clippy::unwrap_used)] // test helpers below are not #[test] fns

mod common;

use std::collections::{HashMap, HashSet};

use common::*;
use fsb_registry::{AllocateOutcome, ExhaustedReason, RegistryHandle, ReleaseOutcome};
use futures::future::join_all;

async fn registry_with_agents(n: usize, capacity: u32) -> RegistryHandle {
    let registry = RegistryHandle::start();
    for i in 0..n {
        registry
            .report(report(
                agent(&format!("agent-{i:02}"), "default", "p", capacity, &[]),
                &[],
            ))
            .await
            .unwrap();
    }
    registry
}

#[actix_rt::test]
async fn a_thousand_concurrent_creates_for_one_port_never_share_it() {
    let registry = registry_with_agents(10, 500).await;
    let outcomes = join_all((0..1000).map(|i| {
        let registry = registry.clone();
        async move {
            registry
                .allocate(req(&format!("r{i}"), "default", "p", "busybox", &[8080]))
                .await
                .unwrap()
        }
    }))
    .await;

    let mut agents_with_port = HashSet::new();
    let mut exhausted = 0;
    for out in outcomes {
        match out {
            AllocateOutcome::Allocated(p) => {
                assert!(agents_with_port.insert(p.agent), "port 8080 given twice")
            }
            AllocateOutcome::Exhausted(ExhaustedReason::PortsInUse) => exhausted += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(agents_with_port.len(), 10, "exactly one holder per agent");
    assert_eq!(exhausted, 990);
}

#[actix_rt::test]
async fn a_thousand_concurrent_creates_never_exceed_capacity() {
    let registry = registry_with_agents(10, 50).await;
    let outcomes = join_all((0..1000).map(|i| {
        let registry = registry.clone();
        async move {
            registry
                .allocate(req(&format!("r{i}"), "default", "p", "busybox", &[]))
                .await
                .unwrap()
        }
    }))
    .await;
    let mut per_agent: HashMap<_, u32> = HashMap::new();
    let mut placements = Vec::new();
    for out in outcomes {
        match out {
            AllocateOutcome::Allocated(p) => {
                *per_agent.entry(p.agent.clone()).or_default() += 1;
                placements.push(p);
            }
            AllocateOutcome::Exhausted(ExhaustedReason::NoFreeSlot) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(placements.len(), 500);
    assert!(per_agent.values().all(|&n| n == 50), "{per_agent:?}");

    // Concurrent double releases: each slot is freed once, the repeat is a no-op.
    let releases = join_all(placements.iter().flat_map(|p| {
        let registry = registry.clone();
        [0, 1].map(move |_| {
            let (registry, sandbox, agent) =
                (registry.clone(), p.sandbox_id.clone(), p.agent.clone());
            async move { registry.release(sandbox, agent).await.unwrap() }
        })
    }))
    .await;
    let released = releases
        .iter()
        .filter(|r| **r == ReleaseOutcome::Released)
        .count();
    assert_eq!(released, 500);
    assert_eq!(releases.len() - released, 500);
    let snap = registry.snapshot().await.unwrap();
    assert_eq!(snap.sandboxes, 0);
    assert!(snap.agents.iter().all(|a| a.used == 0));
}

#[actix_rt::test]
async fn reset_restarts_empty_and_reports_rebuild() {
    let registry = registry_with_agents(2, 5).await;
    registry
        .allocate(req("r1", "default", "p", "busybox", &[]))
        .await
        .unwrap();
    registry.reset().await.unwrap();
    let snap = registry.snapshot().await.unwrap();
    assert_eq!(
        (snap.agents.len(), snap.sandboxes),
        (0, 0),
        "restarted empty under its supervisor"
    );
    registry
        .report(report(agent("agent-00", "default", "p", 5, &[]), &[]))
        .await
        .unwrap();
    assert!(matches!(
        registry
            .allocate(req("r2", "default", "p", "busybox", &[]))
            .await
            .unwrap(),
        AllocateOutcome::Allocated(_)
    ));
}
