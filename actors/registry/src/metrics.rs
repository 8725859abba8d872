//! Counters of what the registry decided, and their export to the process-wide
//! metrics ([`export`], called at scrape time with a snapshot). Plain integers owned
//! by the state: the actor is the only writer, and the hot path never touches a
//! shared counter.

use std::collections::BTreeMap;

use fsb_core::spec::Runtime;
use fsb_telemetry::metrics::{AgentSlots, WarmLevel};

use crate::state::RegistrySnapshot;

/// Decision counters since start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RegistryMetrics {
    /// New allocations.
    pub allocated: u64,
    /// Replays of a request id that already holds a slot.
    pub already_yours: u64,
    /// Allocations refused for lack of agents, slots or ports.
    pub exhausted: u64,
    /// Allocations refused because the request id or sandbox id is taken.
    pub conflicts: u64,
    /// Successful releases.
    pub released: u64,
    /// Releases of an unknown (already released) sandbox: no-ops.
    pub release_unknown: u64,
    /// Releases refused because another agent holds the sandbox.
    pub release_not_owner: u64,
    /// Sandboxes learned from agent reports that the registry did not know.
    pub adopted: u64,
    /// Confirmed sandboxes that an agent no longer reports (they finished).
    pub finished: u64,
    /// In-flight allocations dropped because a report showed they cannot fit.
    pub evicted: u64,
    /// Sandboxes reported by an agent other than the one recorded.
    pub moved: u64,
    /// Agents declared lost.
    pub agents_lost: u64,
    /// Allocations that took a warm instance (also counted in `allocated`).
    pub warm_hits: u64,
    /// Claimable requests that found no warm instance to take (placed cold, or not at
    /// all).
    pub warm_misses: u64,
}

/// Copy `snapshot` into the process-wide metrics: the decision counters
/// (`fsb_registry_*_total`), slots used and free per agent (`fsb_agent_slots`) and
/// the warm instances still on offer per pool, image and runtime
/// (`fsb_warm_instances_ready`). The counters restart from zero with the actor.
pub fn export(snapshot: &RegistrySnapshot) {
    let m = fsb_telemetry::metrics();
    let c = &snapshot.metrics;
    for (result, n) in [
        ("allocated", c.allocated),
        ("already_yours", c.already_yours),
        ("exhausted", c.exhausted),
        ("conflict", c.conflicts),
    ] {
        m.registry_allocations.set(result, n);
    }
    for (result, n) in [
        ("released", c.released),
        ("unknown", c.release_unknown),
        ("not_owner", c.release_not_owner),
    ] {
        m.registry_releases.set(result, n);
    }
    m.registry_warm.set("hit", c.warm_hits);
    m.registry_warm.set("miss", c.warm_misses);
    for (event, n) in [
        ("adopted", c.adopted),
        ("finished", c.finished),
        ("evicted", c.evicted),
        ("moved", c.moved),
        ("agent_lost", c.agents_lost),
    ] {
        m.registry_events.set(event, n);
    }
    m.set_agent_slots(snapshot.agents.iter().map(|a| AgentSlots {
        agent: a.info.id.as_str(),
        pool: a.info.pool.as_str(),
        used: u64::from(a.used),
        capacity: u64::from(a.info.capacity.get()),
    }));
    // The metric has no namespace label: same-named pools are summed.
    let mut levels: BTreeMap<(&str, &str, Runtime), u64> = BTreeMap::new();
    for ((_, pool, image, runtime), ready) in snapshot.warm_levels() {
        *levels.entry((pool, image, runtime)).or_default() += ready;
    }
    m.set_warm_ready(
        levels
            .into_iter()
            .map(|((pool, image, runtime), ready)| WarmLevel {
                pool,
                image,
                runtime,
                ready,
            }),
    );
}
