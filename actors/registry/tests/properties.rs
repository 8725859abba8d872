//! Property tests: under any interleaving of allocate / create / exit / release /
//! report / agent loss / warm instance start, the registry never double-allocates a
//! port, never exceeds a capacity, releases idempotently, counts exactly the live
//! sandboxes, hands a warm instance to at most one live sandbox (reports may list
//! instances already claimed), prefers a fitting warm agent for claimable requests
//! and offers exactly the reported instances that are not allocated.
//! A small simulated world plays the agents: what it runs is what agents report.

#![allow(clippy::unwrap_used)] // test helpers below are not #[test] fns

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::*;
use fsb_core::{
    AgentId, RequestId, SandboxId,
    spec::{Runtime, SpecDigest},
};
use fsb_registry::{AgentInfo, AllocateOutcome, RegistryState, ReleaseOutcome, WarmInstance};
use proptest::prelude::*;

const AGENTS: [(&str, &str, &str, u32); 4] = [
    ("a0", "ns-a", "p", 2),
    ("a1", "ns-a", "p", 3),
    ("a2", "ns-a", "q", 1),
    ("a3", "ns-b", "p", 2),
];
const IMAGES: [&str; 2] = ["busybox", "alpine"];
const RUNTIMES: [Runtime; 2] = [Runtime::Runc, Runtime::Crun];
/// Default runtime of each agent of `AGENTS`.
const DEFAULTS: [Runtime; 4] = [Runtime::Runc, Runtime::Crun, Runtime::Runc, Runtime::Crun];

#[derive(Clone, Debug)]
enum Op {
    /// Allocate from group `group` with ports from a small range (to force clashes).
    Allocate {
        group: usize,
        image: usize,
        ports: Vec<u32>,
        request: u8,
        digest: u8,
        /// May take a warm instance.
        claimable: bool,
        /// Index in `RUNTIMES`; out of range means none named (the agent's default).
        runtime: usize,
    },
    /// The agent starts a warm instance of (`IMAGES[image]`, `RUNTIMES[runtime]`).
    Warm {
        agent: usize,
        image: usize,
        runtime: usize,
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
        4 => (
            (0..3usize, 0..2usize, proptest::collection::vec(1..5u32, 0..3), 0..12u8, 0..2u8),
            (proptest::bool::weighted(0.6), 0..3usize),
        )
            .prop_map(|((group, image, ports, request, digest), (claimable, runtime))| Op::Allocate {
                group, image, ports, request, digest, claimable, runtime,
            }),
        2 => (0..4usize, 0..2usize, 0..2usize)
            .prop_map(|(agent, image, runtime)| Op::Warm { agent, image, runtime }),
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
    /// Took a warm instance (its id is the instance's).
    warm: bool,
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
    /// Warm instances each agent holds, oldest first: what it reports. A claimed
    /// instance stays here until its create arrives (so reports go stale).
    warm: BTreeMap<usize, Vec<WarmInstance>>,
    /// What the registry must offer per agent, oldest-reported first: the last
    /// report's instances (earlier-known ones keep their place) minus ids live at
    /// that report, minus those handed out since.
    offered: BTreeMap<usize, Vec<WarmInstance>>,
    /// Health each agent last reported.
    healthy: BTreeMap<usize, bool>,
    /// Allocations that must have taken an instance / claimable ones that took none.
    warm_hits: u64,
    warm_misses: u64,
}

impl World {
    fn used(&self, a: usize) -> usize {
        self.live.values().filter(|l| l.agent == a).count()
    }

    fn ports_free(&self, a: usize, ports: &[u32]) -> bool {
        self.live
            .values()
            .filter(|l| l.agent == a)
            .all(|l| l.ports.iter().all(|p| !ports.contains(p)))
    }

    /// The first instance agent `a` must offer for (image, runtime or its default).
    fn first_offer(&self, a: usize, image: &str, runtime: Option<Runtime>) -> Option<&SandboxId> {
        let want = runtime.unwrap_or(DEFAULTS[a]);
        self.offered
            .get(&a)?
            .iter()
            .find(|w| w.image == common::image(image) && w.runtime == want)
            .map(|w| &w.id)
    }
}

fn info(i: usize, healthy: bool) -> AgentInfo {
    let (id, namespace, pool_name, cap) = AGENTS[i];
    let mut a = agent(id, namespace, pool_name, cap, &IMAGES[..=i % 2]);
    a.healthy = healthy;
    a.default_runtime = DEFAULTS[i];
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
            claimable,
            runtime,
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
            rq.claimable = *claimable;
            rq.runtime = RUNTIMES.get(*runtime).copied();
            // Agents that must win a claimable request: in the group, healthy, a free
            // slot, the ports free and an offered instance of (image, runtime).
            let warm_fits: BTreeMap<usize, SandboxId> = (0..AGENTS.len())
                .filter(|a| {
                    (AGENTS[*a].1, AGENTS[*a].2) == (namespace, pool_name)
                        && w.registered.contains(a)
                        && w.healthy.get(a) == Some(&true)
                        && w.used(*a) < AGENTS[*a].3 as usize
                        && w.ports_free(*a, &ports)
                })
                .filter_map(|a| {
                    w.first_offer(a, IMAGES[*image], rq.runtime)
                        .map(|id| (a, id.clone()))
                })
                .collect();
            let replay = w.live.values().any(|l| l.request == rq.request_id);
            let out = r.allocate(&rq);
            let took_warm = matches!(&out, AllocateOutcome::Allocated(p) if p.warm);
            if rq.claimable && !replay && !took_warm {
                w.warm_misses += 1;
            }
            match out {
                AllocateOutcome::Allocated(p) => {
                    let a = agent_index(&p.agent);
                    let expect_warm = rq.claimable && !warm_fits.is_empty();
                    prop_assert_eq!(p.warm, expect_warm, "warm preference");
                    if p.warm {
                        prop_assert_eq!(
                            Some(&p.sandbox_id),
                            warm_fits.get(&a),
                            "not the agent's oldest matching offered instance"
                        );
                        let least = warm_fits.keys().map(|b| w.used(*b)).min();
                        prop_assert_eq!(Some(w.used(a)), least, "not the least loaded");
                        prop_assert!(
                            !w.live.contains_key(&p.sandbox_id),
                            "instance handed out while allocated"
                        );
                        w.offered
                            .entry(a)
                            .or_default()
                            .retain(|i| i.id != p.sandbox_id);
                        w.warm_hits += 1;
                    } else {
                        prop_assert_eq!(&p.sandbox_id, &rq.sandbox_id);
                    }
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
                            warm: p.warm,
                        },
                    );
                }
                AllocateOutcome::AlreadyYours(p) => {
                    let l = &w.live[&p.sandbox_id];
                    prop_assert_eq!(&l.request, &rq.request_id);
                    prop_assert_eq!(l.warm, p.warm);
                }
                AllocateOutcome::Exhausted(_) | AllocateOutcome::Conflict(_) => {
                    prop_assert!(
                        replay || !rq.claimable || warm_fits.is_empty(),
                        "a fitting warm agent was refused"
                    );
                }
            }
        }
        Op::Warm {
            agent: a,
            image,
            runtime,
        } => {
            if w.registered.contains(a) {
                w.warm.entry(*a).or_default().push(WarmInstance {
                    id: SandboxId::generate(),
                    image: common::image(IMAGES[*image]),
                    runtime: RUNTIMES[*runtime],
                });
            }
        }
        Op::Create(k) => {
            let flying = w.live.iter().filter(|(id, l)| {
                w.registered.contains(&l.agent)
                    && !w.running.get(&l.agent).is_some_and(|m| m.contains_key(*id))
            });
            if let Some((id, l)) = pick(flying.map(|(id, l)| (id.clone(), l.clone())), *k) {
                // A create under a warm instance's id turns the instance into it.
                w.warm.entry(l.agent).or_default().retain(|i| i.id != id);
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
            let warm = w.warm.get(a).cloned().unwrap_or_default();
            let mut agent_info = info(*a, *healthy);
            agent_info.warm = warm.clone();
            let out = r.report(report(agent_info, &refs));
            w.registered.insert(*a);
            w.healthy.insert(*a, *healthy);
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
            // Offered: known ones keep their place, new ones follow; live ids never.
            let previous = w.offered.remove(a).unwrap_or_default();
            let mut offered: Vec<WarmInstance> = previous
                .iter()
                .filter_map(|old| warm.iter().find(|i| i.id == old.id).cloned())
                .collect();
            for i in &warm {
                if !previous.iter().any(|old| old.id == i.id) {
                    offered.push(i.clone());
                }
            }
            offered.retain(|i| !w.live.contains_key(&i.id));
            w.offered.insert(*a, offered);
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
            w.warm.remove(a);
            w.offered.remove(a);
            w.healthy.remove(a);
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
        // Offers: exactly the modelled ones, oldest-reported first; none allocated.
        let offered = w.offered.get(&a).cloned().unwrap_or_default();
        prop_assert_eq!(view.warm, offered.len());
        prop_assert_eq!(&view.info.warm, &offered);
        for i in &view.info.warm {
            prop_assert!(
                r.owner_of(&i.id).is_none(),
                "offered id {} is allocated",
                i.id
            );
        }
    }
    let m = r.metrics();
    prop_assert_eq!((m.warm_hits, m.warm_misses), (w.warm_hits, w.warm_misses));
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
