//! Property tests: under any interleaving of allocate / create / exit / release /
//! report / agent loss, the registry never double-allocates a port, never exceeds a
//! capacity, releases idempotently and counts exactly the live sandboxes.
//! A small simulated world plays the agents: what it runs is what agents report.

#![allow(clippy::unwrap_used)] // test helpers below are not #[test] fns

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::*;
use fsb_core::{AgentId, RequestId, SandboxId, spec::SpecDigest};
use fsb_registry::{AgentInfo, AllocateOutcome, RegistryState, ReleaseOutcome};
use proptest::prelude::*;

const AGENTS: [(&str, &str, &str, u32); 4] = [
    ("a0", "ns-a", "p", 2),
    ("a1", "ns-a", "p", 3),
    ("a2", "ns-a", "q", 1),
    ("a3", "ns-b", "p", 2),
];
const IMAGES: [&str; 2] = ["busybox", "alpine"];

#[derive(Clone, Debug)]
enum Op {
    /// Allocate from group `group` with ports from a small range (to force clashes).
    Allocate {
        group: usize,
        image: usize,
        ports: Vec<u32>,
        request: u8,
        digest: u8,
    },
    /// The agent creates the k-th in-flight allocation.
    Create(usize),
    /// The k-th running sandbox exits on its own.
    Exit(usize),
    /// The k-th live sandbox is deleted and released, by its owner or an impostor.
    Release { k: usize, impostor: bool },
    /// Release an already released sandbox again.
    ReleaseAgain(usize),
    /// Agent sends its full report (re-registering if it was lost).
    Report { agent: usize, healthy: bool },
    /// Agent is declared lost; its pod and containers are gone.
    Lost(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..3usize, 0..2usize, proptest::collection::vec(1..5u32, 0..3), 0..12u8, 0..2u8)
            .prop_map(|(group, image, ports, request, digest)| Op::Allocate { group, image, ports, request, digest }),
        2 => any::<usize>().prop_map(Op::Create),
        1 => any::<usize>().prop_map(Op::Exit),
        2 => (any::<usize>(), proptest::bool::weighted(0.2)).prop_map(|(k, impostor)| Op::Release { k, impostor }),
        1 => any::<usize>().prop_map(Op::ReleaseAgain),
        2 => (0..4usize, proptest::bool::weighted(0.85)).prop_map(|(agent, healthy)| Op::Report { agent, healthy }),
        1 => (0..4usize).prop_map(Op::Lost),
    ]
}

/// What the registry should hold for one sandbox.
#[derive(Clone, Debug)]
struct Live {
    agent: usize,
    ports: Vec<u32>,
    request: RequestId,
    confirmed: bool,
}

#[derive(Default)]
struct World {
    /// Agents registered (reported at least once since last lost).
    registered: BTreeSet<usize>,
    /// What each agent actually runs.
    running: BTreeMap<usize, BTreeMap<SandboxId, Vec<u32>>>,
    /// What the registry must hold.
    live: BTreeMap<SandboxId, Live>,
    released: Vec<(SandboxId, usize)>,
}

fn info(i: usize, healthy: bool) -> AgentInfo {
    let (id, namespace, pool_name, cap) = AGENTS[i];
    let mut a = agent(id, namespace, pool_name, cap, &IMAGES[..=i % 2]);
    a.healthy = healthy;
    a
}

fn agent_index(id: &AgentId) -> usize {
    AGENTS
        .iter()
        .position(|(a, ..)| *a == id.as_str())
        .expect("known agent")
}

fn pick<T: Clone>(items: impl Iterator<Item = T>, k: usize) -> Option<T> {
    let v: Vec<T> = items.collect();
    (!v.is_empty()).then(|| v[k % v.len()].clone())
}

fn apply(r: &mut RegistryState, w: &mut World, op: &Op) -> Result<(), TestCaseError> {
    match op {
        Op::Allocate {
            group,
            image,
            ports,
            request,
            digest,
        } => {
            let (namespace, pool_name) = [("ns-a", "p"), ("ns-a", "q"), ("ns-b", "p")][*group];
            let mut rq = req(
                &format!("req-{request}"),
                namespace,
                pool_name,
                IMAGES[*image],
                &[],
            );
            let mut ports = ports.clone();
            ports.sort_unstable();
            ports.dedup();
            rq.ports = ports.iter().map(|p| port(*p)).collect();
            rq.digest = SpecDigest([*digest; 32]);
            match r.allocate(&rq) {
                AllocateOutcome::Allocated(p) => {
                    let a = agent_index(&p.agent);
                    prop_assert!(
                        w.registered.contains(&a),
                        "allocated on an unregistered agent"
                    );
                    prop_assert_eq!(
                        (AGENTS[a].1, AGENTS[a].2),
                        (namespace, pool_name),
                        "wrong group"
                    );
                    prop_assert!(
                        !w.live.values().any(|l| l.request == rq.request_id),
                        "request id reused"
                    );
                    w.live.insert(
                        p.sandbox_id,
                        Live {
                            agent: a,
                            ports,
                            request: rq.request_id.clone(),
                            confirmed: false,
                        },
                    );
                }
                AllocateOutcome::AlreadyYours(p) => {
                    let l = &w.live[&p.sandbox_id];
                    prop_assert_eq!(&l.request, &rq.request_id);
                }
                AllocateOutcome::Exhausted(_) | AllocateOutcome::Conflict(_) => {}
            }
        }
        Op::Create(k) => {
            let flying = w.live.iter().filter(|(id, l)| {
                w.registered.contains(&l.agent)
                    && !w.running.get(&l.agent).is_some_and(|m| m.contains_key(*id))
            });
            if let Some((id, l)) = pick(flying.map(|(id, l)| (id.clone(), l.clone())), *k) {
                w.running.entry(l.agent).or_default().insert(id, l.ports);
            }
        }
        Op::Exit(k) => {
            let all = w
                .running
                .iter()
                .flat_map(|(a, m)| m.keys().map(move |id| (*a, id.clone())));
            if let Some((a, id)) = pick(all, *k) {
                w.running.entry(a).or_default().remove(&id);
            }
        }
        Op::Release { k, impostor } => {
            if let Some((id, l)) = pick(w.live.iter().map(|(id, l)| (id.clone(), l.clone())), *k) {
                let owner = AgentId::from(AGENTS[l.agent].0);
                if *impostor {
                    let other = AgentId::from(AGENTS[(l.agent + 1) % AGENTS.len()].0);
                    prop_assert_eq!(r.release(&id, &other), ReleaseOutcome::NotOwner { owner });
                } else {
                    w.running.entry(l.agent).or_default().remove(&id);
                    prop_assert_eq!(r.release(&id, &owner), ReleaseOutcome::Released);
                    w.live.remove(&id);
                    w.released.push((id, l.agent));
                }
            }
        }
        Op::ReleaseAgain(k) => {
            if let Some((id, a)) = pick(w.released.iter().cloned(), *k)
                && !w.live.contains_key(&id)
            {
                let owner = AgentId::from(AGENTS[a].0);
                prop_assert_eq!(r.release(&id, &owner), ReleaseOutcome::AlreadyReleased);
            }
        }
        Op::Report { agent: a, healthy } => {
            let running = w.running.entry(*a).or_default().clone();
            let entries: Vec<(&SandboxId, Vec<u32>)> =
                running.iter().map(|(id, p)| (id, p.clone())).collect();
            let refs: Vec<(&SandboxId, &[u32])> =
                entries.iter().map(|(id, p)| (*id, p.as_slice())).collect();
            let out = r.report(report(info(*a, *healthy), &refs));
            w.registered.insert(*a);
            prop_assert!(
                out.adopted.is_empty() && out.moved.is_empty(),
                "world only runs allocated sandboxes"
            );
            prop_assert!(
                out.evicted.is_empty(),
                "reality never clashes in this world"
            );
            for (id, l) in w.live.iter_mut().filter(|(_, l)| l.agent == *a) {
                if running.contains_key(id) {
                    l.confirmed = true;
                }
            }
            let finished: Vec<SandboxId> = w
                .live
                .iter()
                .filter(|(id, l)| l.agent == *a && l.confirmed && !running.contains_key(*id))
                .map(|(id, _)| id.clone())
                .collect();
            let mut got = out.finished.clone();
            got.sort();
            prop_assert_eq!(&got, &finished);
            for id in finished {
                w.live.remove(&id);
            }
        }
        Op::Lost(a) => {
            let mut expect: Vec<SandboxId> = w
                .live
                .iter()
                .filter(|(_, l)| l.agent == *a)
                .map(|(id, _)| id.clone())
                .collect();
            expect.sort();
            prop_assert_eq!(r.agent_lost(&AgentId::from(AGENTS[*a].0)), expect);
            w.live.retain(|_, l| l.agent != *a);
            w.running.remove(a);
            w.registered.remove(a);
        }
    }
    Ok(())
}

fn check(r: &RegistryState, w: &World) -> Result<(), TestCaseError> {
    r.verify().map_err(TestCaseError::fail)?;
    // Counts equal live sandboxes, each on the right agent.
    prop_assert_eq!(r.sandbox_count(), w.live.len());
    for (id, l) in &w.live {
        prop_assert_eq!(r.owner_of(id).map(|a| a.as_str()), Some(AGENTS[l.agent].0));
    }
    let snap = r.snapshot();
    for view in &snap.agents {
        let a = agent_index(&view.info.id);
        // Capacity never exceeded; no port twice on an agent.
        prop_assert!(view.used <= AGENTS[a].3);
        let mut ports: Vec<u32> = w
            .live
            .values()
            .filter(|l| l.agent == a)
            .flat_map(|l| l.ports.iter().copied())
            .collect();
        let total = ports.len();
        ports.sort_unstable();
        ports.dedup();
        prop_assert_eq!(
            total,
            ports.len(),
            "a port is held twice on {}",
            view.info.id
        );
        prop_assert_eq!(
            view.ports
                .iter()
                .map(|p| u32::from(p.get()))
                .collect::<Vec<_>>(),
            ports
        );
    }
    prop_assert_eq!(
        snap.requests,
        w.live.len(),
        "one request id per live allocation"
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 10_000, ..ProptestConfig::default() })]

    #[test]
    fn registry_invariants_hold_under_any_interleaving(
        ops in proptest::collection::vec(op(), 1..60)
    ) {
        let mut r = RegistryState::new();
        let mut w = World::default();
        // Start with every agent registered so allocations usually succeed.
        for a in 0..AGENTS.len() {
            apply(&mut r, &mut w, &Op::Report { agent: a, healthy: true })?;
        }
        for op in &ops {
            apply(&mut r, &mut w, op)?;
            check(&r, &w)?;
        }
    }
}
