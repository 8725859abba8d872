//! Counters of what the registry decided; exported by the telemetry crate later.
//! Plain integers owned by the state: the actor is the only writer.

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
