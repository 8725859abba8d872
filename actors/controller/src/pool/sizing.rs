//! The pool's sizing decision: pure, synchronous, one call per reconcile pass.
//!
//! [`plan`] looks at the pool's pods, its registered agents and its waiting sandboxes
//! and says which pods to create, which agents to drain and which pods to delete. The
//! rule is documented on [`crate::pool`]; this module only carries it out, so every
//! corner (busy agents, starting pods, template roll-outs) is unit-tested without an
//! API server.

use std::collections::HashMap;

use super::AgentLoad;

/// Pool sizes from `SandboxPool.spec`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    /// Fewest pods.
    pub pool_min: u32,
    /// Most pods (a template roll-out may surge one beyond it).
    pub pool_max: u32,
    /// Fewest idle agents kept beyond demand.
    pub buffer_min: u32,
    /// Most idle agents before scaling down.
    pub buffer_max: u32,
    /// Sandboxes one pod holds.
    pub per_pod: u32,
}

/// Lifecycle phase of a pod, as `status.phase` says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PodPhase {
    /// Not bound or not started yet.
    Pending,
    /// Started.
    Running,
    /// Exited successfully; never restarted.
    Succeeded,
    /// Exited with an error or was killed; never restarted.
    Failed,
    /// The node stopped reporting it.
    Unknown,
}

impl PodPhase {
    /// `status.phase` (absent or unknown strings are `Pending`/`Unknown`).
    pub fn parse(phase: Option<&str>) -> Self {
        match phase {
            None | Some("Pending") => Self::Pending,
            Some("Running") => Self::Running,
            Some("Succeeded") => Self::Succeeded,
            Some("Failed") => Self::Failed,
            Some(_) => Self::Unknown,
        }
    }

    fn terminated(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed)
    }
}

/// What the planner needs of one pod of the pool.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodView {
    /// Pod name.
    pub name: String,
    /// Pod UID (the agent's id).
    pub uid: String,
    /// Phase.
    pub phase: PodPhase,
    /// Ready condition is True.
    pub ready: bool,
    /// deletionTimestamp is set: already going away.
    pub deleting: bool,
    /// Its template hash is the pool's current one.
    pub current: bool,
}

/// Why a pod is deleted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeleteReason {
    /// Failed or Succeeded: it will never run again; a new pod replaces it.
    Terminated,
    /// Its agent was drained on an earlier pass and is still idle.
    DrainedIdle,
    /// An old-template pod that never started (Pending, no agent): it holds nothing.
    OldNotStarted,
}

/// One pod to delete.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Deletion {
    /// Pod name.
    pub name: String,
    /// Pod UID (a precondition of the delete).
    pub uid: String,
    /// Why.
    pub reason: DeleteReason,
}

/// Demand as the rule computes it; also the source of the status conditions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Demand {
    /// Sandboxes held by the pool's live agents.
    pub used: u32,
    /// Sandboxes waiting for a slot.
    pub pending: u32,
    /// Pods needed for `used + pending` sandboxes.
    pub busy_needed: u32,
    /// Pods the pool scales up to.
    pub desired: u32,
    /// Pods above which the pool scales down.
    pub upper: u32,
    /// `busy_needed + bufferMin` exceeds poolMax: demand is capped.
    pub limited: bool,
}

/// What one reconcile pass does.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// New pods with the current template.
    pub create: u32,
    /// Pod UIDs whose agents stop taking sandboxes (deleted on a later pass if idle).
    pub drain: Vec<String>,
    /// Pods to delete now.
    pub delete: Vec<Deletion>,
    /// The numbers behind it.
    pub demand: Demand,
}

fn clamp(v: u64, lo: u32, hi: u32) -> u32 {
    let hi = hi.max(lo);
    u32::try_from(v.clamp(u64::from(lo), u64::from(hi))).unwrap_or(hi)
}

/// Decide one pass. `agents` are the registered agents of this pool (matched to pods by
/// pod UID; agents without a live pod are ignored), `pending` the sandboxes waiting.
pub fn plan(cap: &Capacity, pods: &[PodView], agents: &[AgentLoad], pending: u32) -> Plan {
    let per_pod = u64::from(cap.per_pod.max(1));
    let by_uid: HashMap<&str, &AgentLoad> =
        agents.iter().map(|a| (a.pod_uid.as_str(), a)).collect();
    let mut out = Plan::default();

    // Pods already going away are neither counted nor touched; terminated ones are
    // deleted and (by not counting) replaced in this same pass.
    let mut live = Vec::new();
    for pod in pods.iter().filter(|p| !p.deleting) {
        if pod.phase.terminated() {
            out.delete.push(Deletion {
                name: pod.name.clone(),
                uid: pod.uid.clone(),
                reason: DeleteReason::Terminated,
            });
        } else {
            live.push(pod);
        }
    }

    let used: u64 = live
        .iter()
        .filter_map(|p| by_uid.get(p.uid.as_str()))
        .map(|a| u64::from(a.used))
        .sum();
    let busy_needed = (used + u64::from(pending)).div_ceil(per_pod);
    let desired = clamp(
        busy_needed + u64::from(cap.buffer_min),
        cap.pool_min,
        cap.pool_max,
    );
    let upper = clamp(
        busy_needed + u64::from(cap.buffer_max.max(cap.buffer_min)),
        cap.pool_min,
        cap.pool_max,
    );
    out.demand = Demand {
        used: u32::try_from(used).unwrap_or(u32::MAX),
        pending,
        busy_needed: u32::try_from(busy_needed).unwrap_or(u32::MAX),
        desired,
        upper,
        limited: busy_needed + u64::from(cap.buffer_min) > u64::from(cap.pool_max),
    };

    // A drained agent that is still idle goes now: nothing can be placed on it any more,
    // so keeping it would only hold a pod. (No pass ever deletes a busy agent.)
    let mut keep = Vec::new();
    for pod in live {
        match by_uid.get(pod.uid.as_str()) {
            Some(a) if a.draining && a.used == 0 => out.delete.push(Deletion {
                name: pod.name.clone(),
                uid: pod.uid.clone(),
                reason: DeleteReason::DrainedIdle,
            }),
            _ => keep.push(pod),
        }
    }

    let n = keep.len() as u64;
    let old: Vec<&PodView> = keep.iter().copied().filter(|p| !p.current).collect();
    let current = n - old.len() as u64;
    let ready_current = keep.iter().filter(|p| p.current && p.ready).count() as u64;
    let rolling = !old.is_empty();

    // Scale up, and during a roll-out replace old pods first: the pool keeps its present
    // size (within [desired, upper]) in current pods, with one pod of surge over poolMax.
    let wanted_current = if rolling {
        u64::from(clamp(n, desired, upper))
    } else {
        u64::from(desired)
    };
    let cap_total = u64::from(cap.pool_max) + u64::from(rolling);
    let create = wanted_current
        .saturating_sub(current)
        .min(cap_total.saturating_sub(n));
    out.create = u32::try_from(create).unwrap_or(u32::MAX);

    let agent = |p: &PodView| by_uid.get(p.uid.as_str()).copied();
    let draining_busy = |pods: &mut dyn Iterator<Item = &&PodView>| -> u64 {
        pods.filter(|p| agent(p).is_some_and(|a| a.draining))
            .count() as u64
    };

    if rolling {
        // An old pod may leave once the ready current pods and the old pods staying
        // still cover the wanted size.
        let budget = (ready_current + old.len() as u64).saturating_sub(wanted_current);
        let mut budget = budget.saturating_sub(draining_busy(&mut old.iter()));
        // Old pods that never started hold nothing: they go first.
        for pod in &old {
            if budget == 0 {
                break;
            }
            if agent(pod).is_none() && pod.phase == PodPhase::Pending {
                out.delete.push(Deletion {
                    name: pod.name.clone(),
                    uid: pod.uid.clone(),
                    reason: DeleteReason::OldNotStarted,
                });
                budget -= 1;
            }
        }
        // Then registered ones: idle first (they go on the next pass), then the least
        // busy (they finish their sandboxes, take no new ones, and go once idle).
        let mut registered: Vec<(&PodView, &AgentLoad)> = old
            .iter()
            .filter_map(|p| agent(p).map(|a| (*p, a)))
            .filter(|(_, a)| !a.draining)
            .collect();
        registered.sort_by(|(pa, a), (pb, b)| a.used.cmp(&b.used).then(pa.name.cmp(&pb.name)));
        for (pod, _) in registered
            .into_iter()
            .take(usize::try_from(budget).unwrap_or(0))
        {
            out.drain.push(pod.uid.clone());
        }
    } else {
        // Scale down only above `upper`, only idle registered agents, drain first.
        let excess = n.saturating_sub(u64::from(upper));
        let budget = excess.saturating_sub(draining_busy(&mut keep.iter()));
        let mut idle: Vec<&PodView> = keep
            .iter()
            .copied()
            .filter(|p| agent(p).is_some_and(|a| a.used == 0 && !a.draining))
            .collect();
        // Not-ready ones first (they serve worst), then by name for a stable choice.
        idle.sort_by(|a, b| a.ready.cmp(&b.ready).then(a.name.cmp(&b.name)));
        for pod in idle.into_iter().take(usize::try_from(budget).unwrap_or(0)) {
            out.drain.push(pod.uid.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn cap(
        pool_min: u32,
        pool_max: u32,
        buffer_min: u32,
        buffer_max: u32,
        per_pod: u32,
    ) -> Capacity {
        Capacity {
            pool_min,
            pool_max,
            buffer_min,
            buffer_max,
            per_pod,
        }
    }

    fn pod(name: &str) -> PodView {
        PodView {
            name: name.into(),
            uid: format!("uid-{name}"),
            phase: PodPhase::Running,
            ready: true,
            deleting: false,
            current: true,
        }
    }

    fn old(name: &str) -> PodView {
        PodView {
            current: false,
            ..pod(name)
        }
    }

    fn agent(name: &str, used: u32) -> AgentLoad {
        AgentLoad {
            pod_uid: format!("uid-{name}"),
            used,
            capacity: 1,
            draining: false,
        }
    }

    fn drained(name: &str, used: u32) -> AgentLoad {
        AgentLoad {
            draining: true,
            ..agent(name, used)
        }
    }

    fn deleted(p: &Plan) -> Vec<&str> {
        p.delete.iter().map(|d| d.name.as_str()).collect()
    }

    #[test]
    fn an_empty_pool_grows_to_pool_min() {
        let p = plan(&cap(2, 5, 0, 0, 1), &[], &[], 0);
        assert_eq!(p.create, 2);
        assert!(p.drain.is_empty() && p.delete.is_empty());
        assert!(!p.demand.limited);
    }

    #[test]
    fn pending_sandboxes_grow_the_pool_one_pod_per_slot_group() {
        // perPod 1, two sandboxes' worth of demand: 1 -> 2 pods.
        let p = plan(&cap(1, 5, 0, 0, 1), &[pod("a")], &[agent("a", 1)], 1);
        assert_eq!(p.demand.busy_needed, 2);
        assert_eq!(p.create, 1);
        // perPod 4: five sandboxes need two pods, plus a buffer of one.
        let p = plan(&cap(0, 5, 1, 1, 4), &[pod("a")], &[agent("a", 4)], 1);
        assert_eq!(
            (p.demand.busy_needed, p.demand.desired, p.create),
            (2, 3, 2)
        );
    }

    #[test]
    fn demand_beyond_pool_max_is_capped_and_reported() {
        let p = plan(&cap(1, 3, 0, 0, 1), &[pod("a")], &[agent("a", 1)], 9);
        assert_eq!(p.demand.desired, 3);
        assert_eq!(p.create, 2);
        assert!(p.demand.limited);
        // The buffer counts as demand too.
        let p = plan(&cap(0, 2, 1, 1, 1), &[], &[], 2);
        assert!(p.demand.limited);
        let p = plan(&cap(0, 3, 1, 1, 1), &[], &[], 2);
        assert!(!p.demand.limited);
    }

    #[test]
    fn starting_pods_count_so_nothing_is_created_twice() {
        let starting = PodView {
            phase: PodPhase::Pending,
            ready: false,
            ..pod("b")
        };
        let p = plan(
            &cap(2, 5, 0, 0, 1),
            &[pod("a"), starting],
            &[agent("a", 0)],
            0,
        );
        assert_eq!(p.create, 0);
    }

    #[test]
    fn scale_down_only_above_the_upper_bound_and_drains_idle_agents_first() {
        let pods = [pod("a"), pod("b"), pod("c")];
        // busy_needed 1, bufferMax 2: upper 3, nothing to do.
        let agents = [agent("a", 1), agent("b", 0), agent("c", 0)];
        let p = plan(&cap(0, 5, 0, 2, 1), &pods, &agents, 0);
        assert_eq!((p.create, p.drain.len(), p.delete.len()), (0, 0, 0));
        // bufferMax 0: upper 1, two idle agents drained, the busy one untouched.
        let p = plan(&cap(0, 5, 0, 0, 1), &pods, &agents, 0);
        assert_eq!(p.drain, vec!["uid-b", "uid-c"]);
        assert!(p.delete.is_empty());
    }

    #[test]
    fn a_drained_agent_is_deleted_on_a_later_pass_only_while_idle() {
        let pods = [pod("a"), pod("b")];
        let p = plan(
            &cap(0, 5, 0, 0, 1),
            &pods,
            &[agent("a", 1), drained("b", 0)],
            0,
        );
        assert_eq!(deleted(&p), vec!["b"]);
        assert_eq!(p.delete[0].reason, DeleteReason::DrainedIdle);
        assert!(p.drain.is_empty());
        // A sandbox slipped in before the drain: it stays until idle.
        let p = plan(
            &cap(0, 5, 0, 0, 1),
            &pods,
            &[agent("a", 1), drained("b", 1)],
            0,
        );
        assert!(p.delete.is_empty());
        assert!(
            p.drain.is_empty(),
            "the draining pod already counts as leaving"
        );
    }

    #[test]
    fn busy_and_unregistered_pods_are_never_scaled_down() {
        let starting = PodView {
            phase: PodPhase::Pending,
            ready: false,
            ..pod("s")
        };
        let pods = [pod("a"), pod("b"), starting];
        let p = plan(
            &cap(0, 5, 0, 0, 1),
            &pods,
            &[agent("a", 1), agent("b", 1)],
            0,
        );
        assert!(p.drain.is_empty() && p.delete.is_empty());
    }

    #[test]
    fn pool_min_holds_even_when_idle() {
        let pods = [pod("a"), pod("b")];
        let p = plan(
            &cap(2, 5, 0, 0, 1),
            &pods,
            &[agent("a", 0), agent("b", 0)],
            0,
        );
        assert!(p.drain.is_empty() && p.delete.is_empty() && p.create == 0);
    }

    #[test]
    fn failed_pods_are_deleted_and_replaced_in_the_same_pass() {
        let failed = PodView {
            phase: PodPhase::Failed,
            ready: false,
            ..pod("b")
        };
        let p = plan(
            &cap(2, 2, 0, 0, 1),
            &[pod("a"), failed],
            &[agent("a", 0), agent("b", 0)],
            0,
        );
        assert_eq!(deleted(&p), vec!["b"]);
        assert_eq!(p.delete[0].reason, DeleteReason::Terminated);
        assert_eq!(p.create, 1);
    }

    #[test]
    fn pods_being_deleted_are_left_alone_and_not_counted() {
        let going = PodView {
            deleting: true,
            ..pod("b")
        };
        let p = plan(&cap(2, 2, 0, 0, 1), &[pod("a"), going], &[agent("b", 1)], 0);
        assert!(p.delete.is_empty());
        assert_eq!(p.create, 1);
    }

    #[test]
    fn a_template_change_surges_one_pod_and_drains_old_ones_once_new_ones_are_ready() {
        let c = cap(2, 2, 0, 0, 1);
        let agents = [agent("a", 0), agent("b", 0)];
        // Two old pods at poolMax: one surge pod.
        let p = plan(&c, &[old("a"), old("b")], &agents, 0);
        assert_eq!(p.create, 1);
        assert!(p.drain.is_empty() && p.delete.is_empty());
        // The new pod is not ready yet: nothing old goes.
        let starting = PodView {
            ready: false,
            phase: PodPhase::Pending,
            ..pod("n1")
        };
        let p = plan(&c, &[old("a"), old("b"), starting], &agents, 0);
        assert_eq!((p.create, p.drain.len()), (0, 0));
        // Ready: one old idle agent is drained ...
        let p = plan(&c, &[old("a"), old("b"), pod("n1")], &agents, 0);
        assert_eq!(p.drain, vec!["uid-a"]);
        // ... and deleted on the next pass, then the next new pod comes.
        let p = plan(
            &c,
            &[old("a"), old("b"), pod("n1")],
            &[drained("a", 0), agent("b", 0)],
            0,
        );
        assert_eq!(deleted(&p), vec!["a"]);
        assert_eq!(p.create, 1);
        let p = plan(&c, &[old("b"), pod("n1"), pod("n2")], &[agent("b", 0)], 0);
        assert_eq!(p.drain, vec!["uid-b"]);
        let p = plan(&c, &[pod("n1"), pod("n2")], &[], 0);
        assert_eq!(
            p,
            Plan {
                demand: p.demand,
                ..Plan::default()
            }
        );
    }

    #[test]
    fn a_roll_out_never_deletes_a_busy_old_agent() {
        let c = cap(1, 1, 0, 0, 1);
        let pods = [old("a"), pod("n1")];
        let p = plan(&c, &pods, &[agent("a", 1)], 0);
        // busy_needed 1: wanted 1 current pod... n is 2 though: keep the size, surge.
        assert!(p.delete.is_empty());
        let p = plan(&c, &pods, &[drained("a", 1)], 0);
        assert!(p.delete.is_empty(), "busy even though drained");
        let p = plan(&c, &pods, &[drained("a", 0)], 0);
        assert_eq!(deleted(&p), vec!["a"]);
    }

    #[test]
    fn an_old_pod_that_never_started_is_replaced_without_waiting() {
        let stuck = PodView {
            ready: false,
            phase: PodPhase::Pending,
            ..old("a")
        };
        let c = cap(1, 1, 0, 0, 1);
        let p = plan(&c, std::slice::from_ref(&stuck), &[], 0);
        assert_eq!(p.create, 1, "surge");
        let p = plan(&c, &[stuck, pod("n1")], &[], 0);
        assert_eq!(deleted(&p), vec!["a"]);
        assert_eq!(p.delete[0].reason, DeleteReason::OldNotStarted);
    }

    #[test]
    fn counts_never_overflow() {
        let p = plan(&cap(0, u32::MAX, u32::MAX, u32::MAX, 1), &[], &[], u32::MAX);
        assert_eq!(p.demand.desired, u32::MAX);
        assert!(
            p.demand.limited,
            "demand u32::MAX + bufferMin u32::MAX exceeds poolMax"
        );
    }
}
