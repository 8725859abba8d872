//! Property tests of the pool's sizing rule (`fsb_controller::pool::sizing::plan`):
//! whatever the pods, agents and demand, one pass never deletes a busy agent's pod,
//! never touches a pod being deleted, drains only registered agents (only idle ones
//! outside a roll-out) and never grows the pool beyond poolMax (+1 surge pod during a
//! roll-out); and repeated passes over a simulated pool converge to a pool of current
//! pods within [desired, upper], where a pass has nothing left to do.

#![allow(clippy::unwrap_used)] // test helpers

use std::collections::HashMap;

use fsb_controller::pool::AgentLoad;
use fsb_controller::pool::sizing::{Capacity, DeleteReason, PodPhase, PodView, plan};
use proptest::prelude::*;

#[derive(Clone, Debug)]
struct Sim {
    view: PodView,
    agent: Option<AgentLoad>,
}

fn capacity() -> impl Strategy<Value = Capacity> {
    (0u32..4, 0u32..5, 0u32..3, 0u32..3, 1u32..4).prop_map(|(min, extra, bmin, bextra, per)| {
        Capacity {
            pool_min: min,
            pool_max: min + extra,
            buffer_min: bmin,
            buffer_max: bmin + bextra,
            per_pod: per,
        }
    })
}

fn pods() -> impl Strategy<Value = Vec<Sim>> {
    let phase = prop_oneof![
        Just(PodPhase::Pending),
        Just(PodPhase::Running),
        Just(PodPhase::Running),
        Just(PodPhase::Failed),
        Just(PodPhase::Succeeded),
        Just(PodPhase::Unknown),
    ];
    let pod = (
        phase,
        any::<bool>(),
        prop::bool::weighted(0.15),
        any::<bool>(),
        any::<bool>(),
        0u32..4,
        prop::bool::weighted(0.3),
    );
    prop::collection::vec(pod, 0..8).prop_map(|pods| {
        pods.into_iter()
            .enumerate()
            .map(
                |(i, (phase, ready, deleting, current, registered, used, draining))| Sim {
                    view: PodView {
                        name: format!("p{i}"),
                        uid: format!("u{i}"),
                        phase,
                        ready,
                        deleting,
                        current,
                    },
                    agent: registered.then(|| AgentLoad {
                        pod_uid: format!("u{i}"),
                        used,
                        capacity: 4,
                        draining,
                    }),
                },
            )
            .collect()
    })
}

fn split(sims: &[Sim]) -> (Vec<PodView>, Vec<AgentLoad>) {
    (
        sims.iter().map(|s| s.view.clone()).collect(),
        sims.iter().filter_map(|s| s.agent.clone()).collect(),
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4000))]

    #[test]
    fn one_pass_is_safe(cap in capacity(), sims in pods(), pending in 0u32..12) {
        let (views, agents) = split(&sims);
        let p = plan(&cap, &views, &agents, pending);
        let by_uid: HashMap<&str, &Sim> = sims.iter().map(|s| (s.view.uid.as_str(), s)).collect();
        let live: Vec<&Sim> = sims
            .iter()
            .filter(|s| !s.view.deleting && !matches!(s.view.phase, PodPhase::Failed | PodPhase::Succeeded))
            .collect();
        let rolling = live.iter().any(|s| !s.view.current
            && !s.agent.as_ref().is_some_and(|a| a.draining && a.used == 0));
        for d in &p.delete {
            let s = by_uid[d.uid.as_str()];
            prop_assert!(!s.view.deleting, "a pod being deleted was deleted again");
            match d.reason {
                DeleteReason::Terminated => prop_assert!(matches!(s.view.phase, PodPhase::Failed | PodPhase::Succeeded)),
                DeleteReason::DrainedIdle => {
                    let a = s.agent.as_ref().unwrap();
                    prop_assert!(a.draining && a.used == 0, "deleted a busy or undrained agent");
                }
                DeleteReason::OldNotStarted => {
                    prop_assert!(!s.view.current && s.agent.is_none() && s.view.phase == PodPhase::Pending);
                }
            }
        }
        for uid in &p.drain {
            let s = by_uid[uid.as_str()];
            prop_assert!(!s.view.deleting);
            let a = s.agent.as_ref();
            prop_assert!(a.is_some_and(|a| !a.draining), "drained an unknown or draining agent");
            if !rolling {
                prop_assert!(a.is_some_and(|a| a.used == 0), "drained a busy agent outside a roll-out");
            } else {
                prop_assert!(!s.view.current, "a roll-out drains only old pods");
            }
        }
        let removed = p.delete.iter().filter(|d| d.reason != DeleteReason::Terminated).count();
        let kept = live.len() - removed;
        if p.create > 0 {
            prop_assert!(
                kept as u32 + p.create <= cap.pool_max + u32::from(rolling),
                "grew to {} beyond poolMax {} (rolling {rolling})", kept as u32 + p.create, cap.pool_max
            );
        }
        prop_assert!(p.demand.desired >= cap.pool_min.min(cap.pool_max) && p.demand.desired <= cap.pool_max.max(cap.pool_min));
        prop_assert!(p.demand.upper >= p.demand.desired);
    }

    #[test]
    fn passes_converge_to_a_current_pool_within_bounds(
        cap in capacity(),
        sims in pods(),
        pending in 0u32..12,
    ) {
        // Idle agents, fixed pending demand; the world reacts within a pass: every pod is
        // Running, Ready and registered by the next pass, deletions finish, drains hold.
        let mut sims: Vec<Sim> = sims
            .into_iter()
            .map(|mut s| {
                s.view.deleting = false;
                if let Some(a) = s.agent.as_mut() { a.used = 0; }
                s
            })
            .collect();
        let initial = sims.len() as u32;
        let mut next = sims.len();
        let mut last = None;
        for _ in 0..40 {
            let (views, agents) = split(&sims);
            let p = plan(&cap, &views, &agents, pending);
            let live = sims.iter().filter(|s| !matches!(s.view.phase, PodPhase::Failed | PodPhase::Succeeded)).count() as u32;
            prop_assert!(live <= initial.max(cap.pool_max + 1));
            let settled = sims.iter().all(|s| s.agent.is_some() && s.view.ready);
            if settled && p.create == 0 && p.drain.is_empty() && p.delete.is_empty() {
                last = Some(p);
                break;
            }
            sims.retain(|s| !p.delete.iter().any(|d| d.uid == s.view.uid));
            for s in sims.iter_mut() {
                if p.drain.contains(&s.view.uid) {
                    s.agent.as_mut().unwrap().draining = true;
                }
                // Starting pods start: Running, Ready, registered.
                s.view.phase = PodPhase::Running;
                s.view.ready = true;
                if s.agent.is_none() {
                    s.agent = Some(AgentLoad { pod_uid: s.view.uid.clone(), used: 0, capacity: 4, draining: false });
                }
            }
            for _ in 0..p.create {
                next += 1;
                sims.push(Sim {
                    view: PodView {
                        name: format!("n{next}"),
                        uid: format!("n{next}"),
                        phase: PodPhase::Pending,
                        ready: false,
                        deleting: false,
                        current: true,
                    },
                    agent: None,
                });
            }
        }
        let p = last.expect("no fixpoint within 40 passes");
        let n = sims.len() as u32;
        prop_assert!(sims.iter().all(|s| s.view.current), "old pods left: {sims:?}");
        prop_assert!(n >= p.demand.desired && n <= p.demand.upper, "{n} pods outside [{}, {}]", p.demand.desired, p.demand.upper);
    }
}
