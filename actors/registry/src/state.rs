//! The registry's pure state: which agents exist, what each holds, and where the next
//! sandbox goes. Synchronous, no I/O, no clocks: the actor serializes calls, tests and
//! benches drive it directly.
//!
//! Placement order: agents of the request's (namespace, pool) group that are healthy,
//! have a free slot and have every requested port free; among them, for a claimable
//! request, those holding an available warm instance of its (image, runtime) first;
//! then those holding the image; then the least loaded, then the lowest registry slot
//! (agents get slots in registration order; a deterministic tie-break that never flaps).
//! Three ordered indexes per group (`free`, `by_image`, `by_warm`) keyed by
//! (load, slot) make the usual allocation O(log n) with integer comparisons; only port
//! conflicts make it walk further. Internal maps use foldhash (seeded per process, so
//! still resistant to hash flooding) because SipHash was a third of the allocation cost.
//!
//! Warm instances: an agent starts containers ahead of time, each under its own sandbox
//! id, and lists the ready ones in its reports. A claimable allocation that lands on
//! such an agent takes its oldest-reported matching instance and is made under the
//! instance's id (the agent recognizes that id on create and hands the ready container
//! the process). The registry is the only place that hands instances out, so it alone
//! guarantees that one instance serves one sandbox: an instance id leaves the available
//! list when it is allocated, a report never re-offers an id that is allocated, and a
//! released id comes back only when a later report lists it again.
//!
//! Invariants (checked by [`RegistryState::verify`] in the property tests):
//! - a port is held by at most one sandbox per agent;
//! - the registry never allocates beyond an agent's capacity;
//! - agent sandbox sets, the sandbox table, the request table and the indexes agree;
//! - an available warm instance id is never an allocated sandbox id, and is offered by
//!   one agent only; the warm indexes agree with the agents' lists;
//! - nothing is kept for finished sandboxes, lost agents or empty groups.

use std::{
    collections::{BTreeMap, BTreeSet},
    num::NonZeroU32,
};

use fsb_core::{
    AgentId, HostPort, ImageRef, NamespaceName, NodeName, PoolName, RequestId, SandboxId,
    spec::{Runtime, SpecDigest},
};

use crate::{error::RegistryError, metrics::RegistryMetrics};

/// What an agent says about itself in every report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentInfo {
    /// The agent.
    pub id: AgentId,
    /// Pool it belongs to.
    pub pool: PoolName,
    /// Namespace of its pool; it serves sandboxes of this namespace only.
    pub namespace: NamespaceName,
    /// Node it runs on.
    pub node: NodeName,
    /// Sandboxes it may hold at once (>= 1: there is no "unlimited").
    pub capacity: NonZeroU32,
    /// Images in its content store (normalized).
    pub images: Vec<ImageRef>,
    /// Whether it may receive new sandboxes.
    pub healthy: bool,
    /// Runtime it uses for specs that name none: a request without a runtime can only
    /// take an instance started with this one.
    pub default_runtime: Runtime,
    /// Its ready warm instances, as of the report, oldest first. In the registry's
    /// copy (and in snapshots) this is the list still available: instances already
    /// handed out are gone from it.
    pub warm: Vec<WarmInstance>,
}

/// A container an agent created and started ahead of time for one (image, runtime),
/// waiting for a sandbox: a create under its id gets it in about a millisecond.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WarmInstance {
    /// Sandbox id the instance was created under (chosen by the agent); a sandbox that
    /// takes the instance has this id.
    pub id: SandboxId,
    /// Image it runs (normalized).
    pub image: ImageRef,
    /// Runtime it was started with.
    pub runtime: Runtime,
}

/// A sandbox an agent reports as present (running or still being cleaned up).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReportedSandbox {
    /// The sandbox.
    pub id: SandboxId,
    /// Ports it holds.
    pub ports: Vec<HostPort>,
}

/// An agent's full inventory: the source of truth for what runs on it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentReport {
    /// Who is reporting.
    pub agent: AgentInfo,
    /// Everything it holds.
    pub sandboxes: Vec<ReportedSandbox>,
}

/// A request for one slot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllocateRequest {
    /// Idempotency key chosen by the client.
    pub request_id: RequestId,
    /// Id the new sandbox will have.
    pub sandbox_id: SandboxId,
    /// Namespace of the sandbox.
    pub namespace: NamespaceName,
    /// Pool to place it in.
    pub pool: PoolName,
    /// Normalized image, for affinity.
    pub image: ImageRef,
    /// Ports it needs exclusively on the agent.
    pub ports: Vec<HostPort>,
    /// Digest of the full spec, to tell a replay from a reuse of the request id.
    pub digest: SpecDigest,
    /// The spec's runtime; `None` means the chosen agent's default.
    pub runtime: Option<Runtime>,
    /// Whether the spec may be late-bound onto a warm instance (the gateway decides).
    /// If it is, the sandbox gets the instance's id instead of `sandbox_id`.
    pub claimable: bool,
}

/// Where a sandbox was placed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    /// The sandbox.
    pub sandbox_id: SandboxId,
    /// Agent holding its slot.
    pub agent: AgentId,
    /// Node of that agent.
    pub node: NodeName,
    /// Ports reserved for it.
    pub ports: Vec<HostPort>,
    /// Whether the agent already had the image (no pull needed).
    pub image_cached: bool,
    /// Whether the sandbox took a warm instance; `sandbox_id` is then the instance's
    /// id, not the request's.
    pub warm: bool,
    /// The runtime it runs with: the request's, else the agent's default.
    pub runtime: Runtime,
}

/// Why no slot was found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExhaustedReason {
    /// No agent of that pool in that namespace.
    NoAgents,
    /// Agents exist, none healthy.
    NoHealthyAgent,
    /// Every healthy agent is at capacity.
    NoFreeSlot,
    /// Agents with free slots all use one of the requested ports.
    PortsInUse,
}

/// Why the request clashes with an existing allocation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConflictReason {
    /// The request id holds a slot for a different spec.
    RequestIdReused {
        /// Sandbox of the earlier request.
        existing: SandboxId,
    },
    /// The sandbox id is already allocated under another request.
    SandboxIdInUse,
}

/// Result of an allocation: every case is distinct, none is silently "ok".
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AllocateOutcome {
    /// A new slot was reserved.
    Allocated(Placement),
    /// This request id already holds a slot for the same spec: here it is again.
    AlreadyYours(Placement),
    /// Nothing fits right now.
    Exhausted(ExhaustedReason),
    /// The request clashes with another allocation.
    Conflict(ConflictReason),
}

impl AllocateOutcome {
    /// The placement, or the error a caller should return for `req`.
    pub fn into_result(self, req: &AllocateRequest) -> Result<Placement, RegistryError> {
        match self {
            Self::Allocated(p) | Self::AlreadyYours(p) => Ok(p),
            Self::Exhausted(ExhaustedReason::NoAgents) => Err(RegistryError::NoAgents {
                pool: req.pool.clone(),
                namespace: req.namespace.clone(),
            }),
            Self::Exhausted(ExhaustedReason::NoHealthyAgent) => {
                Err(RegistryError::NoHealthyAgent {
                    pool: req.pool.clone(),
                })
            }
            Self::Exhausted(ExhaustedReason::NoFreeSlot) => Err(RegistryError::NoFreeSlot {
                pool: req.pool.clone(),
            }),
            Self::Exhausted(ExhaustedReason::PortsInUse) => {
                Err(RegistryError::ports_in_use(req.pool.clone(), &req.ports))
            }
            Self::Conflict(ConflictReason::RequestIdReused { existing }) => {
                Err(RegistryError::RequestIdReused { existing })
            }
            Self::Conflict(ConflictReason::SandboxIdInUse) => {
                Err(RegistryError::SandboxIdInUse(req.sandbox_id.clone()))
            }
        }
    }
}

/// Result of a release.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReleaseOutcome {
    /// The slot and ports are free again.
    Released,
    /// Nothing was held under that id: a repeated release is a no-op.
    AlreadyReleased,
    /// Another agent holds the sandbox; nothing changed.
    NotOwner {
        /// The agent that does hold it.
        owner: AgentId,
    },
}

/// What a report changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReportOutcome {
    /// Reported sandboxes the registry did not know (e.g. after a controller restart).
    pub adopted: Vec<SandboxId>,
    /// Confirmed sandboxes no longer reported: they finished and their slots are free.
    pub finished: Vec<SandboxId>,
    /// In-flight allocations dropped because reported reality leaves no room for them
    /// (a port or the capacity is taken); their creates must fail.
    pub evicted: Vec<SandboxId>,
    /// Sandboxes recorded on another agent that this agent reports holding.
    pub moved: Vec<SandboxId>,
}

/// One agent as seen in a snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentView {
    /// What it reported.
    pub info: AgentInfo,
    /// Slots in use.
    pub used: u32,
    /// Ports in use, sorted.
    pub ports: Vec<HostPort>,
    /// Warm instances still available (`info.warm.len()`).
    pub warm: usize,
}

/// A consistent copy of the registry for status pages and tests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegistrySnapshot {
    /// Agents, sorted by id.
    pub agents: Vec<AgentView>,
    /// Sandboxes holding a slot.
    pub sandboxes: usize,
    /// Request ids remembered (one per live allocation made through `allocate`).
    pub requests: usize,
    /// Decision counters.
    pub metrics: RegistryMetrics,
}

impl RegistrySnapshot {
    /// Ready warm instances per (namespace, pool, image, runtime), summed over the
    /// healthy agents (what `fsb ls` and the metrics show).
    pub fn warm_levels(&self) -> BTreeMap<(&str, &str, &str, Runtime), u64> {
        let mut levels = BTreeMap::new();
        for a in self.agents.iter().filter(|a| a.info.healthy) {
            for w in &a.info.warm {
                let key = (
                    a.info.namespace.as_str(),
                    a.info.pool.as_str(),
                    w.image.as_str(),
                    w.runtime,
                );
                *levels.entry(key).or_default() += 1;
            }
        }
        levels
    }
}

type Map<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
type Set<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;

/// Dense index of an agent in the registry's slab.
type Slot = u32;
type LoadKey = (u32, Slot);
/// Agents holding an available instance, per image, then per requested runtime.
///
/// The runtime key is the request's `Option<Runtime>`. `None` ("the agent's default")
/// means a different runtime on each agent, so an agent is indexed under
/// `(image, Some(rt))` for every runtime it holds instances of, and also under
/// `(image, None)` for instances of its own default runtime. A lookup is then one
/// exact key whatever the request says, and the index holds at most two entries per
/// (agent, image, runtime).
type WarmIndex = Map<ImageRef, BTreeMap<Option<Runtime>, BTreeSet<LoadKey>>>;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct GroupKey {
    namespace: NamespaceName,
    pool: PoolName,
}

/// Agents of one (namespace, pool), indexed for placement.
#[derive(Debug, Default)]
struct Group {
    agents: usize,
    healthy: usize,
    /// Healthy agents with a free slot, least loaded first.
    free: BTreeSet<LoadKey>,
    /// Same, per image the agent holds.
    by_image: Map<ImageRef, BTreeSet<LoadKey>>,
    /// Same, per (image, requested runtime) the agent has an available instance of.
    by_warm: WarmIndex,
}

#[derive(Debug)]
struct AgentEntry {
    info: AgentInfo,
    slot: Slot,
    group: GroupKey,
    images: Set<ImageRef>,
    sandboxes: Set<SandboxId>,
    ports: Map<HostPort, SandboxId>,
    /// Number of available instances (`info.warm`) per (image, runtime): the keys it
    /// is indexed under in `by_warm`, without walking the list on every load change.
    warm_keys: Map<(ImageRef, Runtime), u32>,
    /// Whether the entry is in its group's indexes under `load_key()`.
    indexed: bool,
}

impl AgentEntry {
    /// A new entry; `info.warm` must be empty (report() fills it).
    fn new(info: AgentInfo, slot: Slot) -> Self {
        let group = GroupKey {
            namespace: info.namespace.clone(),
            pool: info.pool.clone(),
        };
        let images = info.images.iter().cloned().collect();
        Self {
            info,
            slot,
            group,
            images,
            sandboxes: Set::default(),
            ports: Map::default(),
            warm_keys: Map::default(),
            indexed: false,
        }
    }

    /// Add an instance to the available list (the caller keeps `RegistryState::offers`).
    fn push_warm(&mut self, w: WarmInstance) {
        *self
            .warm_keys
            .entry((w.image.clone(), w.runtime))
            .or_default() += 1;
        self.info.warm.push(w);
    }

    /// Remove the instance at `i` of the available list.
    fn remove_warm(&mut self, i: usize) -> WarmInstance {
        let w = self.info.warm.remove(i);
        let key = (w.image.clone(), w.runtime);
        if let Some(n) = self.warm_keys.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                self.warm_keys.remove(&key);
            }
        }
        w
    }

    fn used(&self) -> u32 {
        u32::try_from(self.sandboxes.len()).unwrap_or(u32::MAX)
    }

    fn has_free_slot(&self) -> bool {
        self.used() < self.info.capacity.get()
    }

    fn ports_free(&self, ports: &[HostPort]) -> bool {
        ports.iter().all(|p| !self.ports.contains_key(p))
    }

    fn load_key(&self) -> LoadKey {
        (self.used(), self.slot)
    }
}

#[derive(Debug)]
struct Allocation {
    agent: Slot,
    ports: Vec<HostPort>,
    request: Option<(RequestId, SpecDigest)>,
    /// Took a warm instance (its id is the instance's); replays say so again.
    warm: bool,
    /// Seen in a report of its agent. Unconfirmed allocations are in flight: a report
    /// that lacks them does not end them (the create may not have reached the agent).
    confirmed: bool,
}

/// The registry: agents, their slots and ports, and live allocations.
#[derive(Debug, Default)]
pub struct RegistryState {
    slots: Map<AgentId, Slot>,
    /// Agents by slot; `None` marks a slot free for reuse.
    agents: Vec<Option<AgentEntry>>,
    vacant: Vec<Slot>,
    groups: Map<GroupKey, Group>,
    sandboxes: Map<SandboxId, Allocation>,
    requests: Map<RequestId, SandboxId>,
    /// Available warm instances: id -> the agent offering it (whose `info.warm` lists
    /// it). Lets an id that becomes allocated leave any agent's list in O(1).
    offers: Map<SandboxId, Slot>,
    metrics: RegistryMetrics,
}

/// What [`RegistryState::take_instance`] found on the chosen agent.
enum Take {
    /// The instance to use.
    Taken(SandboxId),
    /// Only instances already allocated matched; they were dropped from the list.
    Dropped,
    /// Nothing matched: the index disagreed with the agent's list.
    Nothing,
}

impl RegistryState {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    fn agent(&self, slot: Slot) -> &AgentEntry {
        match self.agents.get(slot as usize) {
            Some(Some(a)) => a,
            // Slots in indexes and allocations always name live agents (verify() checks).
            _ => unreachable!("registry slot {slot} is vacant"),
        }
    }

    fn agent_mut(&mut self, slot: Slot) -> Option<&mut AgentEntry> {
        self.agents.get_mut(slot as usize).and_then(Option::as_mut)
    }

    fn live_agents(&self) -> impl Iterator<Item = &AgentEntry> {
        self.agents.iter().flatten()
    }

    /// Reserve a slot (and ports) for `req`, or say precisely why not.
    ///
    /// A claimable request first looks for an agent with an available warm instance
    /// of its (image, runtime) and, if one fits, is allocated under that instance's id
    /// (`Placement::warm`); otherwise it is placed like any other request.
    pub fn allocate(&mut self, req: &AllocateRequest) -> AllocateOutcome {
        if let Some(existing) = self.requests.get(&req.request_id) {
            let alloc = &self.sandboxes[existing];
            let same_spec = alloc
                .request
                .as_ref()
                .is_some_and(|(_, d)| *d == req.digest);
            if same_spec {
                self.metrics.already_yours += 1;
                let agent = self.agent(alloc.agent);
                return AllocateOutcome::AlreadyYours(Placement {
                    sandbox_id: existing.clone(),
                    agent: agent.info.id.clone(),
                    node: agent.info.node.clone(),
                    ports: alloc.ports.clone(),
                    image_cached: alloc.warm || agent.images.contains(&req.image),
                    warm: alloc.warm,
                    runtime: req.runtime.unwrap_or(agent.info.default_runtime),
                });
            }
            self.metrics.conflicts += 1;
            return AllocateOutcome::Conflict(ConflictReason::RequestIdReused {
                existing: existing.clone(),
            });
        }
        if self.sandboxes.contains_key(&req.sandbox_id) {
            self.metrics.conflicts += 1;
            return AllocateOutcome::Conflict(ConflictReason::SandboxIdInUse);
        }

        let key = GroupKey {
            namespace: req.namespace.clone(),
            pool: req.pool.clone(),
        };
        if req.claimable {
            if let Some((slot, instance)) = self.claim_warm(&key, req) {
                self.metrics.warm_hits += 1;
                // The instance's container exists, so its image is in the store.
                return self.place(slot, instance, req, true, true);
            }
            self.metrics.warm_misses += 1;
        }
        let Some(group) = self.groups.get(&key) else {
            self.metrics.exhausted += 1;
            return AllocateOutcome::Exhausted(ExhaustedReason::NoAgents);
        };
        let fits = |(_, slot): &&LoadKey| self.agent(*slot).ports_free(&req.ports);
        let with_image = group
            .by_image
            .get(&req.image)
            .and_then(|set| set.iter().find(fits));
        let (slot, image_cached) = match with_image {
            Some((_, slot)) => (*slot, true),
            None => match group.free.iter().find(fits) {
                Some((_, slot)) => (*slot, false),
                None => {
                    self.metrics.exhausted += 1;
                    let reason = if group.healthy == 0 {
                        ExhaustedReason::NoHealthyAgent
                    } else if group.free.is_empty() {
                        ExhaustedReason::NoFreeSlot
                    } else {
                        ExhaustedReason::PortsInUse
                    };
                    return AllocateOutcome::Exhausted(reason);
                }
            },
        };
        self.place(slot, req.sandbox_id.clone(), req, image_cached, false)
    }

    /// The agent and instance a claimable request takes, if any fits: the least
    /// loaded (then lowest slot) healthy agent of the group with a free slot, the
    /// requested ports free and an available matching instance; its oldest-reported
    /// matching instance. The instance is already off the agent's list on return.
    fn claim_warm(&mut self, key: &GroupKey, req: &AllocateRequest) -> Option<(Slot, SandboxId)> {
        loop {
            let slot = {
                let set = self
                    .groups
                    .get(key)?
                    .by_warm
                    .get(&req.image)?
                    .get(&req.runtime)?;
                set.iter()
                    .find(|(_, slot)| self.agent(*slot).ports_free(&req.ports))
                    .map(|(_, slot)| *slot)?
            };
            match self.take_instance(slot, &req.image, req.runtime) {
                Take::Taken(id) => return Some((slot, id)),
                // The agent is no longer indexed under this key: look again.
                Take::Dropped => {}
                // Cannot happen while the index agrees with the lists (verify() checks);
                // never loop on it.
                Take::Nothing => return None,
            }
        }
    }

    /// Take the oldest-reported instance of (`image`, `runtime` or the agent's
    /// default) off the agent at `slot`. Instances whose id is already allocated (the
    /// tables say that cannot be, but an instance must never serve two sandboxes) are
    /// dropped on the way. On `Taken` the agent is left out of its group's indexes for
    /// the caller to re-index after placing; otherwise it is re-indexed here.
    fn take_instance(&mut self, slot: Slot, image: &ImageRef, runtime: Option<Runtime>) -> Take {
        self.unindex(slot);
        let Some(Some(agent)) = self.agents.get_mut(slot as usize) else {
            return Take::Nothing;
        };
        let want = runtime.unwrap_or(agent.info.default_runtime);
        let mut found = Take::Nothing;
        let mut i = 0;
        while i < agent.info.warm.len() {
            let w = &agent.info.warm[i];
            if w.image != *image || w.runtime != want {
                i += 1;
                continue;
            }
            let w = agent.remove_warm(i);
            self.offers.remove(&w.id);
            if self.sandboxes.contains_key(&w.id) {
                found = Take::Dropped;
                continue;
            }
            found = Take::Taken(w.id);
            break;
        }
        if !matches!(found, Take::Taken(_)) {
            self.index(slot);
        }
        found
    }

    /// Allocate `sandbox` for `req` on the agent at `slot` (chosen by the caller).
    fn place(
        &mut self,
        slot: Slot,
        sandbox: SandboxId,
        req: &AllocateRequest,
        image_cached: bool,
        warm: bool,
    ) -> AllocateOutcome {
        // An id that becomes allocated is no longer available as an instance anywhere.
        self.withdraw_offer(&sandbox);
        self.unindex(slot);
        let Some(agent) = self.agent_mut(slot) else {
            return AllocateOutcome::Exhausted(ExhaustedReason::NoAgents);
        };
        agent.sandboxes.insert(sandbox.clone());
        for p in &req.ports {
            agent.ports.insert(*p, sandbox.clone());
        }
        let placement = Placement {
            sandbox_id: sandbox.clone(),
            agent: agent.info.id.clone(),
            node: agent.info.node.clone(),
            ports: req.ports.clone(),
            image_cached,
            warm,
            runtime: req.runtime.unwrap_or(agent.info.default_runtime),
        };
        self.index(slot);
        self.sandboxes.insert(
            sandbox.clone(),
            Allocation {
                agent: slot,
                ports: req.ports.clone(),
                request: Some((req.request_id.clone(), req.digest)),
                warm,
                confirmed: false,
            },
        );
        self.requests.insert(req.request_id.clone(), sandbox);
        self.metrics.allocated += 1;
        AllocateOutcome::Allocated(placement)
    }

    /// Free the slot of `sandbox` held by `agent`. Idempotent; refuses other owners.
    pub fn release(&mut self, sandbox: &SandboxId, agent: &AgentId) -> ReleaseOutcome {
        let Some(alloc) = self.sandboxes.get(sandbox) else {
            self.metrics.release_unknown += 1;
            return ReleaseOutcome::AlreadyReleased;
        };
        if self.slots.get(agent) != Some(&alloc.agent) {
            self.metrics.release_not_owner += 1;
            return ReleaseOutcome::NotOwner {
                owner: self.agent(alloc.agent).info.id.clone(),
            };
        }
        self.remove_sandbox(sandbox);
        self.metrics.released += 1;
        ReleaseOutcome::Released
    }

    /// Apply an agent's full report: register or update the agent, confirm and adopt
    /// what it holds, free what it no longer holds, drop in-flight allocations that
    /// reality leaves no room for, and replace its available warm instances with the
    /// reported ones minus any id allocated as a sandbox (the report may predate a
    /// claim: an instance already handed out is never offered again).
    pub fn report(&mut self, report: AgentReport) -> ReportOutcome {
        let AgentReport {
            agent: mut info,
            sandboxes: reported,
        } = report;
        let reported_warm = std::mem::take(&mut info.warm);
        let mut out = ReportOutcome::default();

        let mut previous_warm = Vec::new();
        let slot = match self.slots.get(&info.id) {
            Some(&slot) => {
                self.unindex(slot);
                if let Some(entry) = self.agents.get_mut(slot as usize).and_then(Option::as_mut) {
                    entry.group = GroupKey {
                        namespace: info.namespace.clone(),
                        pool: info.pool.clone(),
                    };
                    entry.images = info.images.iter().cloned().collect();
                    previous_warm = std::mem::replace(&mut entry.info, info).warm;
                    entry.warm_keys.clear();
                    for w in &previous_warm {
                        if self.offers.get(&w.id) == Some(&slot) {
                            self.offers.remove(&w.id);
                        }
                    }
                }
                slot
            }
            None => {
                let slot = match self.vacant.pop() {
                    Some(s) => s,
                    None => {
                        self.agents.push(None);
                        u32::try_from(self.agents.len() - 1).unwrap_or(u32::MAX)
                    }
                };
                self.slots.insert(info.id.clone(), slot);
                self.agents[slot as usize] = Some(AgentEntry::new(info, slot));
                slot
            }
        };

        // Confirmed sandboxes that are no longer reported have finished.
        let reported_ids: Set<&SandboxId> = reported.iter().map(|r| &r.id).collect();
        let mut finished: Vec<SandboxId> = self
            .agent(slot)
            .sandboxes
            .iter()
            .filter(|s| !reported_ids.contains(s) && self.sandboxes[*s].confirmed)
            .cloned()
            .collect();
        finished.sort();
        for s in &finished {
            self.remove_sandbox(s);
        }
        self.metrics.finished += finished.len() as u64;
        out.finished = finished;

        for r in reported {
            match self.sandboxes.get_mut(&r.id) {
                Some(a) if a.agent == slot && a.ports == r.ports => {
                    a.confirmed = true;
                    continue;
                }
                Some(a) if a.agent == slot => {}
                Some(_) => {
                    self.metrics.moved += 1;
                    out.moved.push(r.id.clone());
                }
                None => {
                    self.metrics.adopted += 1;
                    out.adopted.push(r.id.clone());
                }
            }
            // Reported reality wins: keep the request id if it was ours, re-seat ports.
            let (request, warm) = self
                .remove_sandbox(&r.id)
                .map_or((None, false), |a| (a.request, a.warm));
            let clashing: Vec<SandboxId> = {
                let agent = self.agent(slot);
                let mut c: Vec<_> = r
                    .ports
                    .iter()
                    .filter_map(|p| agent.ports.get(p).cloned())
                    .collect();
                c.sort();
                c.dedup();
                c
            };
            for victim in clashing {
                self.evict(&victim, &mut out);
            }
            if let Some(agent) = self.agent_mut(slot) {
                agent.sandboxes.insert(r.id.clone());
                for p in &r.ports {
                    agent.ports.insert(*p, r.id.clone());
                }
            }
            if let Some((rid, _)) = &request {
                self.requests.insert(rid.clone(), r.id.clone());
            }
            self.withdraw_offer(&r.id);
            self.sandboxes.insert(
                r.id,
                Allocation {
                    agent: slot,
                    ports: r.ports,
                    request,
                    warm,
                    confirmed: true,
                },
            );
        }

        // Over capacity (the agent holds more than we thought): in-flight ones yield,
        // highest id first so the choice is deterministic.
        let (used, capacity) = {
            let a = self.agent(slot);
            (a.used(), a.info.capacity.get())
        };
        if used > capacity {
            let mut pending: Vec<SandboxId> = self
                .agent(slot)
                .sandboxes
                .iter()
                .filter(|s| !self.sandboxes[*s].confirmed)
                .cloned()
                .collect();
            pending.sort_by(|a, b| b.cmp(a));
            for victim in pending.into_iter().take((used - capacity) as usize) {
                self.evict(&victim, &mut out);
            }
        }

        self.set_warm(slot, previous_warm, reported_warm);
        self.index(slot);
        out
    }

    /// Make `reported` the available instances of the (unindexed) agent at `slot`.
    /// Order: instances it already offered keep their place (oldest-reported first),
    /// new ones follow in report order. Left out: ids allocated as sandboxes, ids
    /// offered by another agent (first offer wins until that agent drops it) and
    /// repeats.
    fn set_warm(&mut self, slot: Slot, previous: Vec<WarmInstance>, reported: Vec<WarmInstance>) {
        if previous.is_empty() && reported.is_empty() {
            return;
        }
        let mut by_id: Map<SandboxId, WarmInstance> = Map::default();
        let mut order: Vec<SandboxId> = Vec::with_capacity(reported.len());
        for w in reported {
            if !by_id.contains_key(&w.id) {
                order.push(w.id.clone());
                by_id.insert(w.id.clone(), w);
            }
        }
        // Collected before chaining: both halves take from `by_id`.
        let ordered = previous
            .into_iter()
            .filter_map(|old| by_id.remove(&old.id))
            .collect::<Vec<_>>()
            .into_iter()
            .chain(order.into_iter().filter_map(|id| by_id.remove(&id)));
        let mut kept = Vec::new();
        for w in ordered {
            if self.sandboxes.contains_key(&w.id) || self.offers.contains_key(&w.id) {
                continue;
            }
            self.offers.insert(w.id.clone(), slot);
            kept.push(w);
        }
        if let Some(agent) = self.agent_mut(slot) {
            for w in kept {
                agent.push_warm(w);
            }
        }
    }

    /// An id became allocated: take it off the list of whichever agent offers it.
    fn withdraw_offer(&mut self, sandbox: &SandboxId) {
        let Some(slot) = self.offers.remove(sandbox) else {
            return;
        };
        let was_indexed = self.agent_mut(slot).is_some_and(|a| a.indexed);
        if was_indexed {
            self.unindex(slot);
        }
        if let Some(agent) = self.agent_mut(slot)
            && let Some(i) = agent.info.warm.iter().position(|w| w.id == *sandbox)
        {
            agent.remove_warm(i);
        }
        if was_indexed {
            self.index(slot);
        }
    }

    /// Forget an agent and everything it held; returns the sandboxes it held, sorted.
    pub fn agent_lost(&mut self, agent: &AgentId) -> Vec<SandboxId> {
        let Some(slot) = self.slots.remove(agent) else {
            return Vec::new();
        };
        self.unindex(slot);
        let Some(entry) = self.agents.get_mut(slot as usize).and_then(Option::take) else {
            return Vec::new();
        };
        self.vacant.push(slot);
        self.metrics.agents_lost += 1;
        for w in &entry.info.warm {
            if self.offers.get(&w.id) == Some(&slot) {
                self.offers.remove(&w.id);
            }
        }
        let mut lost: Vec<SandboxId> = entry.sandboxes.into_iter().collect();
        lost.sort();
        for s in &lost {
            if let Some(a) = self.sandboxes.remove(s) {
                self.forget_request(s, a.request.as_ref());
            }
        }
        lost
    }

    /// The agent holding `sandbox`, if any.
    pub fn owner_of(&self, sandbox: &SandboxId) -> Option<&AgentId> {
        self.sandboxes
            .get(sandbox)
            .map(|a| &self.agent(a.agent).info.id)
    }

    /// Number of sandboxes holding a slot.
    pub fn sandbox_count(&self) -> usize {
        self.sandboxes.len()
    }

    /// Number of registered agents.
    pub fn agent_count(&self) -> usize {
        self.slots.len()
    }

    /// Decision counters.
    pub fn metrics(&self) -> RegistryMetrics {
        self.metrics
    }

    /// A consistent copy for status and tests.
    pub fn snapshot(&self) -> RegistrySnapshot {
        let mut agents: Vec<AgentView> = self
            .live_agents()
            .map(|a| {
                let mut ports: Vec<HostPort> = a.ports.keys().copied().collect();
                ports.sort();
                AgentView {
                    info: a.info.clone(),
                    used: a.used(),
                    ports,
                    warm: a.info.warm.len(),
                }
            })
            .collect();
        agents.sort_by(|a, b| a.info.id.cmp(&b.info.id));
        RegistrySnapshot {
            agents,
            sandboxes: self.sandboxes.len(),
            requests: self.requests.len(),
            metrics: self.metrics,
        }
    }

    /// Check every invariant listed in the module docs; `Err` says which broke.
    /// O(everything): for tests and debugging, not the hot path.
    pub fn verify(&self) -> Result<(), String> {
        if self.slots.len() != self.live_agents().count() {
            return Err("slot table and agent slab disagree".into());
        }
        let mut held = 0;
        let mut offered = 0;
        for a in self.live_agents() {
            let id = &a.info.id;
            if self.slots.get(id) != Some(&a.slot) || self.vacant.contains(&a.slot) {
                return Err(format!("agent {id} has a stale slot"));
            }
            if a.used() > a.info.capacity.get() {
                return Err(format!(
                    "agent {id} holds {} > capacity {}",
                    a.used(),
                    a.info.capacity
                ));
            }
            held += a.sandboxes.len();
            for s in &a.sandboxes {
                match self.sandboxes.get(s) {
                    Some(alloc) if alloc.agent == a.slot => {}
                    _ => return Err(format!("agent {id} lists {s} which is not allocated to it")),
                }
            }
            for (p, s) in &a.ports {
                let ok = self
                    .sandboxes
                    .get(s)
                    .is_some_and(|al| al.agent == a.slot && al.ports.contains(p));
                if !ok {
                    return Err(format!(
                        "agent {id} port {p} held by {s} which does not claim it"
                    ));
                }
            }
            if !a.indexed || !self.groups.contains_key(&a.group) {
                return Err(format!("agent {id} is missing from its group's indexes"));
            }
            offered += a.info.warm.len();
            let mut keys: Map<(ImageRef, Runtime), u32> = Map::default();
            for w in &a.info.warm {
                if self.sandboxes.contains_key(&w.id) {
                    return Err(format!(
                        "agent {id} offers warm instance {} which is allocated",
                        w.id
                    ));
                }
                if self.offers.get(&w.id) != Some(&a.slot) {
                    return Err(format!(
                        "agent {id} offers warm instance {} missing from the offer table",
                        w.id
                    ));
                }
                *keys.entry((w.image.clone(), w.runtime)).or_default() += 1;
            }
            if keys != a.warm_keys {
                return Err(format!("agent {id} warm instance counts are stale"));
            }
        }
        if offered != self.offers.len() {
            return Err(format!(
                "agents offer {offered} warm instances, offer table has {} (an id twice?)",
                self.offers.len()
            ));
        }
        if held != self.sandboxes.len() {
            return Err(format!(
                "agents hold {held} sandboxes, table has {}",
                self.sandboxes.len()
            ));
        }
        for (s, alloc) in &self.sandboxes {
            let agent = match self.agents.get(alloc.agent as usize) {
                Some(Some(a)) => a,
                _ => return Err(format!("{s} is allocated to vacant slot {}", alloc.agent)),
            };
            for p in &alloc.ports {
                if agent.ports.get(p) != Some(s) {
                    return Err(format!(
                        "{s} claims port {p} on {} but does not hold it",
                        agent.info.id
                    ));
                }
            }
            if let Some((rid, _)) = &alloc.request
                && self.requests.get(rid) != Some(s)
            {
                return Err(format!(
                    "request {rid} of {s} missing from the request table"
                ));
            }
        }
        for (rid, s) in &self.requests {
            let ok = self
                .sandboxes
                .get(s)
                .and_then(|a| a.request.as_ref())
                .is_some_and(|(r, _)| r == rid);
            if !ok {
                return Err(format!(
                    "request {rid} points at {s} which does not carry it"
                ));
            }
        }
        for (key, g) in &self.groups {
            let members: Vec<&AgentEntry> =
                self.live_agents().filter(|a| a.group == *key).collect();
            if members.is_empty() || g.agents != members.len() {
                return Err(format!(
                    "group {key:?} counts {} agents, has {}",
                    g.agents,
                    members.len()
                ));
            }
            if g.healthy != members.iter().filter(|a| a.info.healthy).count() {
                return Err(format!("group {key:?} healthy count is wrong"));
            }
            let want: BTreeSet<LoadKey> = members
                .iter()
                .filter(|a| a.info.healthy && a.has_free_slot())
                .map(|a| a.load_key())
                .collect();
            if g.free != want {
                return Err(format!("group {key:?} free index is stale"));
            }
            for (image, set) in &g.by_image {
                let want: BTreeSet<LoadKey> = want
                    .iter()
                    .filter(|(_, slot)| self.agent(*slot).images.contains(image))
                    .copied()
                    .collect();
                if *set != want || set.is_empty() {
                    return Err(format!("group {key:?} image index for {image} is stale"));
                }
            }
            let mut warm_want: BTreeMap<(ImageRef, Option<Runtime>), BTreeSet<LoadKey>> =
                BTreeMap::new();
            for (load, slot) in &want {
                let a = self.agent(*slot);
                for w in &a.info.warm {
                    for rt in warm_index_keys(w.runtime, a.info.default_runtime) {
                        warm_want
                            .entry((w.image.clone(), rt))
                            .or_default()
                            .insert((*load, *slot));
                    }
                }
            }
            let warm_have: BTreeMap<(ImageRef, Option<Runtime>), BTreeSet<LoadKey>> = g
                .by_warm
                .iter()
                .flat_map(|(image, by_runtime)| {
                    by_runtime
                        .iter()
                        .map(move |(rt, set)| ((image.clone(), *rt), set.clone()))
                })
                .collect();
            if warm_have != warm_want {
                return Err(format!("group {key:?} warm index is stale"));
            }
        }
        Ok(())
    }

    /// Remove a sandbox from the tables and its agent; returns its allocation.
    fn remove_sandbox(&mut self, sandbox: &SandboxId) -> Option<Allocation> {
        let alloc = self.sandboxes.remove(sandbox)?;
        self.forget_request(sandbox, alloc.request.as_ref());
        let slot = alloc.agent;
        let was_indexed = self.agent_mut(slot).is_some_and(|a| a.indexed);
        if was_indexed {
            self.unindex(slot);
        }
        if let Some(agent) = self.agent_mut(slot) {
            agent.sandboxes.remove(sandbox);
            for p in &alloc.ports {
                if agent.ports.get(p) == Some(sandbox) {
                    agent.ports.remove(p);
                }
            }
        }
        if was_indexed {
            self.index(slot);
        }
        Some(alloc)
    }

    fn evict(&mut self, sandbox: &SandboxId, out: &mut ReportOutcome) {
        if self.remove_sandbox(sandbox).is_some() {
            self.metrics.evicted += 1;
            out.evicted.push(sandbox.clone());
        }
    }

    fn forget_request(&mut self, sandbox: &SandboxId, request: Option<&(RequestId, SpecDigest)>) {
        if let Some((rid, _)) = request
            && self.requests.get(rid) == Some(sandbox)
        {
            self.requests.remove(rid);
        }
    }

    /// Take an agent out of its group's indexes (before its load or info changes).
    fn unindex(&mut self, slot: Slot) {
        let Some(Some(agent)) = self.agents.get_mut(slot as usize) else {
            return;
        };
        if !agent.indexed {
            return;
        }
        agent.indexed = false;
        let Some(group) = self.groups.get_mut(&agent.group) else {
            return;
        };
        group.agents -= 1;
        if agent.info.healthy {
            group.healthy -= 1;
        }
        let key = agent.load_key();
        if group.free.remove(&key) {
            for image in &agent.images {
                if let Some(set) = group.by_image.get_mut(image) {
                    set.remove(&key);
                    if set.is_empty() {
                        group.by_image.remove(image);
                    }
                }
            }
            for (image, runtime) in agent.warm_keys.keys() {
                let Some(by_runtime) = group.by_warm.get_mut(image) else {
                    continue;
                };
                for rt in warm_index_keys(*runtime, agent.info.default_runtime) {
                    if let Some(set) = by_runtime.get_mut(&rt) {
                        set.remove(&key);
                        if set.is_empty() {
                            by_runtime.remove(&rt);
                        }
                    }
                }
                if by_runtime.is_empty() {
                    group.by_warm.remove(image);
                }
            }
        }
        if group.agents == 0 {
            self.groups.remove(&agent.group);
        }
    }

    /// Put an agent back into its group's indexes under its current load.
    fn index(&mut self, slot: Slot) {
        let Some(Some(agent)) = self.agents.get_mut(slot as usize) else {
            return;
        };
        if agent.indexed {
            return;
        }
        agent.indexed = true;
        let group = self.groups.entry(agent.group.clone()).or_default();
        group.agents += 1;
        if agent.info.healthy {
            group.healthy += 1;
        }
        if agent.info.healthy && agent.has_free_slot() {
            let key = agent.load_key();
            for image in &agent.images {
                group.by_image.entry(image.clone()).or_default().insert(key);
            }
            for (image, runtime) in agent.warm_keys.keys() {
                let by_runtime = group.by_warm.entry(image.clone()).or_default();
                for rt in warm_index_keys(*runtime, agent.info.default_runtime) {
                    by_runtime.entry(rt).or_default().insert(key);
                }
            }
            group.free.insert(key);
        }
    }
}

/// The `by_warm` runtime keys an instance of `runtime` is indexed under on an agent
/// whose default is `default`: its own runtime, and "no runtime named" if it is the
/// default (see [`WarmIndex`]).
fn warm_index_keys(runtime: Runtime, default: Runtime) -> impl Iterator<Item = Option<Runtime>> {
    std::iter::once(Some(runtime)).chain((runtime == default).then_some(None))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn agent(id: &str, capacity: u32, default_runtime: Runtime) -> AgentInfo {
        AgentInfo {
            id: AgentId::from(id),
            pool: PoolName::parse("pool", "p").unwrap(),
            namespace: NamespaceName::parse("namespace", "default").unwrap(),
            node: NodeName::from(format!("node-of-{id}")),
            capacity: NonZeroU32::new(capacity).unwrap(),
            images: Vec::new(),
            healthy: true,
            default_runtime,
            warm: Vec::new(),
        }
    }

    fn image(s: &str) -> ImageRef {
        ImageRef::parse("image", s).unwrap()
    }

    fn instance(img: &str, runtime: Runtime) -> WarmInstance {
        WarmInstance {
            id: SandboxId::generate(),
            image: image(img),
            runtime,
        }
    }

    fn with_warm(mut info: AgentInfo, warm: &[&WarmInstance]) -> AgentInfo {
        info.warm = warm.iter().map(|w| (*w).clone()).collect();
        info
    }

    fn report(info: AgentInfo, sandboxes: &[&SandboxId]) -> AgentReport {
        AgentReport {
            agent: info,
            sandboxes: sandboxes
                .iter()
                .map(|id| ReportedSandbox {
                    id: (*id).clone(),
                    ports: Vec::new(),
                })
                .collect(),
        }
    }

    fn req(request: &str, img: &str, ports: &[u32]) -> AllocateRequest {
        AllocateRequest {
            request_id: RequestId::parse("request_id", request).unwrap(),
            sandbox_id: SandboxId::generate(),
            namespace: NamespaceName::parse("namespace", "default").unwrap(),
            pool: PoolName::parse("pool", "p").unwrap(),
            image: image(img),
            ports: ports
                .iter()
                .map(|p| HostPort::parse("port", *p).unwrap())
                .collect(),
            digest: SpecDigest([1; 32]),
            runtime: None,
            claimable: false,
        }
    }

    fn claimable(request: &str, img: &str, runtime: Option<Runtime>) -> AllocateRequest {
        AllocateRequest {
            runtime,
            claimable: true,
            ..req(request, img, &[])
        }
    }

    fn allocated(r: &mut RegistryState, rq: &AllocateRequest) -> Placement {
        let out = r.allocate(rq);
        r.verify().unwrap();
        match out {
            AllocateOutcome::Allocated(p) => p,
            other => panic!("expected Allocated, got {other:?}"),
        }
    }

    fn warm_count(r: &RegistryState, id: &str) -> usize {
        r.snapshot()
            .agents
            .iter()
            .find(|a| a.info.id.as_str() == id)
            .unwrap()
            .warm
    }

    /// Registers `a` (capacity 10, no instances) and `b`, then loads `b` with `load`
    /// cold sandboxes.
    fn two_agents(b: AgentInfo, load: usize) -> RegistryState {
        let mut r = RegistryState::new();
        r.report(report(agent("a", 10, Runtime::Runc), &[]));
        r.report(report(b, &[]));
        for i in 0..load {
            // An image only "b" holds: affinity puts the load on "b", not on the
            // emptier "a".
            let p = allocated(&mut r, &req(&format!("load-{i}"), "load-only-on-b", &[]));
            assert_eq!(p.agent, AgentId::from("b"));
        }
        r
    }

    #[test]
    fn a_warm_agent_wins_over_a_less_loaded_cold_one() {
        let busy = instance("busybox", Runtime::Runc);
        let mut b = with_warm(agent("b", 10, Runtime::Runc), &[&busy]);
        b.images = vec![image("load-only-on-b")];
        let mut r = two_agents(b, 3);

        let rq = claimable("r1", "busybox", Some(Runtime::Runc));
        let p = allocated(&mut r, &rq);
        assert_eq!(p.agent, AgentId::from("b"), "the instance beats load 0");
        assert!(p.warm && p.image_cached);
        assert_eq!(p.sandbox_id, busy.id, "the sandbox takes the instance's id");
        assert_ne!(p.sandbox_id, rq.sandbox_id);
        assert_eq!(r.owner_of(&busy.id), Some(&AgentId::from("b")));
        assert_eq!(warm_count(&r, "b"), 0);
        assert_eq!(r.metrics().warm_hits, 1);
        assert_eq!(r.metrics().allocated, 4);
    }

    #[test]
    fn a_request_that_is_not_claimable_never_takes_an_instance() {
        let busy = instance("busybox", Runtime::Runc);
        let mut b = with_warm(agent("b", 10, Runtime::Runc), &[&busy]);
        b.images = vec![image("load-only-on-b")];
        let mut r = two_agents(b, 3);

        let rq = req("r1", "busybox", &[]);
        let p = allocated(&mut r, &rq);
        assert_eq!(p.agent, AgentId::from("a"), "least loaded");
        assert!(!p.warm);
        assert_eq!(p.sandbox_id, rq.sandbox_id);
        assert_eq!(warm_count(&r, "b"), 1);
        assert_eq!(r.metrics().warm_misses, 0, "only claimable requests count");
    }

    #[test]
    fn runtimes_must_match_and_none_means_the_agents_default() {
        // "a" defaults to runc and holds a crun instance; "b" defaults to crun and
        // holds a crun instance. Both "a" and "b" are equally loaded; "a" sorts first.
        let mut r = RegistryState::new();
        let on_a = instance("busybox", Runtime::Crun);
        let on_b = instance("busybox", Runtime::Crun);
        r.report(report(
            with_warm(agent("a", 10, Runtime::Runc), &[&on_a]),
            &[],
        ));
        r.report(report(
            with_warm(agent("b", 10, Runtime::Crun), &[&on_b]),
            &[],
        ));

        // No runtime named: only "b"'s instance is of its agent's default runtime.
        let p = allocated(&mut r, &claimable("r1", "busybox", None));
        assert_eq!((p.agent.as_str(), p.warm), ("b", true));
        assert_eq!(p.sandbox_id, on_b.id);

        // runc named: no runc instance anywhere, so cold (least loaded: "a").
        let rq = claimable("r2", "busybox", Some(Runtime::Runc));
        let p = allocated(&mut r, &rq);
        assert_eq!((p.agent.as_str(), p.warm), ("a", false));
        assert_eq!(p.sandbox_id, rq.sandbox_id);

        // crun named: "a"'s instance matches although crun is not its default.
        let p = allocated(&mut r, &claimable("r3", "busybox", Some(Runtime::Crun)));
        assert_eq!((p.agent.as_str(), p.warm), ("a", true));
        assert_eq!(p.sandbox_id, on_a.id);

        // Another image never matches.
        let p = allocated(&mut r, &claimable("r4", "alpine", Some(Runtime::Crun)));
        assert!(!p.warm);
        assert_eq!(r.metrics().warm_hits, 2);
        assert_eq!(r.metrics().warm_misses, 2);
    }

    #[test]
    fn a_changed_default_runtime_reindexes_the_agent() {
        let mut r = RegistryState::new();
        let w = instance("busybox", Runtime::Crun);
        r.report(report(with_warm(agent("a", 10, Runtime::Runc), &[&w]), &[]));
        let p = allocated(&mut r, &claimable("r1", "busybox", None));
        assert!(!p.warm, "crun is not a's default yet");
        r.report(report(
            with_warm(agent("a", 10, Runtime::Crun), &[&w]),
            &[&p.sandbox_id],
        ));
        r.verify().unwrap();
        let p = allocated(&mut r, &claimable("r2", "busybox", None));
        assert_eq!(p.sandbox_id, w.id);
    }

    #[test]
    fn an_instance_is_handed_out_once_even_when_a_stale_report_lists_it() {
        let mut r = RegistryState::new();
        let w = instance("busybox", Runtime::Runc);
        let info = with_warm(agent("a", 10, Runtime::Runc), &[&w]);
        r.report(report(info.clone(), &[]));
        let first = allocated(&mut r, &claimable("r1", "busybox", None));
        assert_eq!(first.sandbox_id, w.id);

        // Snapshotted before the create arrived: still lists the instance as warm.
        r.report(report(info.clone(), &[]));
        r.verify().unwrap();
        assert_eq!(warm_count(&r, "a"), 0, "an allocated id is not offered");
        let rq = claimable("r2", "busybox", None);
        let second = allocated(&mut r, &rq);
        assert!(!second.warm);
        assert_eq!(second.sandbox_id, rq.sandbox_id);

        // The create failed and the slot was released: not offered until reported.
        assert_eq!(r.release(&w.id, &info.id), ReleaseOutcome::Released);
        assert_eq!(warm_count(&r, "a"), 0);
        let third = allocated(&mut r, &claimable("r3", "busybox", None));
        assert!(!third.warm);
        r.verify().unwrap();

        // The agent still holds it and says so: it is available again.
        r.report(report(info, &[&second.sandbox_id, &third.sandbox_id]));
        assert_eq!(warm_count(&r, "a"), 1);
        let fourth = allocated(&mut r, &claimable("r4", "busybox", None));
        assert_eq!(fourth.sandbox_id, w.id);
    }

    #[test]
    fn a_report_listing_an_instance_as_both_warm_and_running_does_not_offer_it() {
        let mut r = RegistryState::new();
        let w = instance("busybox", Runtime::Runc);
        let info = with_warm(agent("a", 10, Runtime::Runc), &[&w]);
        // Adopted as a sandbox (e.g. after a registry restart) in the same report.
        let out = r.report(report(info, &[&w.id]));
        assert_eq!(out.adopted, vec![w.id.clone()]);
        r.verify().unwrap();
        assert_eq!(warm_count(&r, "a"), 0);
        assert!(!allocated(&mut r, &claimable("r1", "busybox", None)).warm);
    }

    #[test]
    fn an_id_allocated_elsewhere_leaves_the_offering_agents_list() {
        let mut r = RegistryState::new();
        let w = instance("busybox", Runtime::Runc);
        r.report(report(with_warm(agent("a", 10, Runtime::Runc), &[&w]), &[]));
        // Another agent reports a sandbox under that id: it is allocated now.
        let out = r.report(report(agent("b", 10, Runtime::Runc), &[&w.id]));
        assert_eq!(out.adopted, vec![w.id.clone()]);
        r.verify().unwrap();
        assert_eq!(warm_count(&r, "a"), 0);
        assert!(!allocated(&mut r, &claimable("r1", "busybox", None)).warm);
    }

    #[test]
    fn an_id_offered_by_two_agents_is_offered_by_the_first_only() {
        let mut r = RegistryState::new();
        let w = instance("busybox", Runtime::Runc);
        r.report(report(with_warm(agent("a", 10, Runtime::Runc), &[&w]), &[]));
        r.report(report(with_warm(agent("b", 10, Runtime::Runc), &[&w]), &[]));
        r.verify().unwrap();
        assert_eq!((warm_count(&r, "a"), warm_count(&r, "b")), (1, 0));
        assert!(allocated(&mut r, &claimable("r1", "busybox", None)).warm);
        assert!(!allocated(&mut r, &claimable("r2", "busybox", None)).warm);
    }

    #[test]
    fn a_replay_returns_the_instance_id() {
        let mut r = RegistryState::new();
        let w = instance("busybox", Runtime::Runc);
        r.report(report(with_warm(agent("a", 10, Runtime::Runc), &[&w]), &[]));
        let rq = claimable("r1", "busybox", None);
        let first = allocated(&mut r, &rq);
        assert_eq!(first.sandbox_id, w.id);
        // The retry carries a fresh sandbox id of its own; the request id decides.
        let retry = AllocateRequest {
            sandbox_id: SandboxId::generate(),
            ..rq.clone()
        };
        assert_eq!(r.allocate(&retry), AllocateOutcome::AlreadyYours(first));
        // Confirmed by a report, it is still the instance's allocation.
        r.report(report(agent("a", 10, Runtime::Runc), &[&w.id]));
        match r.allocate(&rq) {
            AllocateOutcome::AlreadyYours(p) => assert_eq!((p.sandbox_id, p.warm), (w.id, true)),
            other => panic!("expected AlreadyYours, got {other:?}"),
        }
        assert_eq!(r.snapshot().requests, 1);
        r.verify().unwrap();
    }

    #[test]
    fn when_instances_run_out_requests_go_cold_under_their_own_id() {
        let mut r = RegistryState::new();
        let w = instance("busybox", Runtime::Runc);
        r.report(report(with_warm(agent("a", 10, Runtime::Runc), &[&w]), &[]));
        assert!(allocated(&mut r, &claimable("r1", "busybox", None)).warm);
        let rq = claimable("r2", "busybox", None);
        let p = allocated(&mut r, &rq);
        assert!(!p.warm);
        assert_eq!(p.sandbox_id, rq.sandbox_id);
        assert_eq!(r.metrics().warm_hits, 1);
        assert_eq!(r.metrics().warm_misses, 1);
    }

    #[test]
    fn the_oldest_reported_instance_goes_first() {
        let mut r = RegistryState::new();
        let old = instance("busybox", Runtime::Runc);
        let young = instance("busybox", Runtime::Runc);
        let other = instance("alpine", Runtime::Runc);
        r.report(report(
            with_warm(agent("a", 10, Runtime::Runc), &[&other, &old]),
            &[],
        ));
        // The next report lists the newer one first: the known one keeps its place.
        r.report(report(
            with_warm(agent("a", 10, Runtime::Runc), &[&young, &old, &other]),
            &[],
        ));
        let first = allocated(&mut r, &claimable("r1", "busybox", None));
        let second = allocated(&mut r, &claimable("r2", "busybox", None));
        assert_eq!(first.sandbox_id, old.id);
        assert_eq!(second.sandbox_id, young.id);
        assert_eq!(warm_count(&r, "a"), 1);
    }

    #[test]
    fn a_full_warm_agent_sends_the_request_elsewhere_cold() {
        let mut r = RegistryState::new();
        let w = instance("busybox", Runtime::Runc);
        r.report(report(with_warm(agent("a", 1, Runtime::Runc), &[&w]), &[]));
        r.report(report(agent("b", 10, Runtime::Runc), &[]));
        // Fill "a" (least loaded and first) with a cold sandbox.
        assert_eq!(
            allocated(&mut r, &req("fill", "alpine", &[])).agent,
            AgentId::from("a")
        );
        let rq = claimable("r1", "busybox", None);
        let p = allocated(&mut r, &rq);
        assert_eq!((p.agent.as_str(), p.warm), ("b", false));
        assert_eq!(p.sandbox_id, rq.sandbox_id);
        assert_eq!(warm_count(&r, "a"), 1, "the instance stays for later");
    }

    #[test]
    fn a_warm_agent_whose_ports_clash_sends_the_request_elsewhere_cold() {
        let mut r = RegistryState::new();
        let w = instance("busybox", Runtime::Runc);
        r.report(report(with_warm(agent("a", 10, Runtime::Runc), &[&w]), &[]));
        r.report(report(agent("b", 10, Runtime::Runc), &[]));
        r.report(report(agent("c", 10, Runtime::Runc), &[]));
        let holder = allocated(&mut r, &req("holder", "alpine", &[8080]));
        assert_eq!(holder.agent, AgentId::from("a"));

        let rq = AllocateRequest {
            ports: vec![HostPort::parse("port", 8080).unwrap()],
            ..claimable("r1", "busybox", None)
        };
        let p = allocated(&mut r, &rq);
        assert_eq!((p.agent.as_str(), p.warm), ("b", false));
        assert_eq!(p.sandbox_id, rq.sandbox_id);
        // With no other agent free of the port, it is refused rather than put on "a".
        r.agent_lost(&AgentId::from("c"));
        let rq = AllocateRequest {
            ports: vec![HostPort::parse("port", 8080).unwrap()],
            ..claimable("r2", "busybox", None)
        };
        assert_eq!(
            r.allocate(&rq),
            AllocateOutcome::Exhausted(ExhaustedReason::PortsInUse)
        );
        assert_eq!(warm_count(&r, "a"), 1);
        r.verify().unwrap();
    }

    #[test]
    fn an_unhealthy_agents_instances_are_not_taken() {
        let mut r = RegistryState::new();
        let w = instance("busybox", Runtime::Runc);
        let mut info = with_warm(agent("a", 10, Runtime::Runc), &[&w]);
        info.healthy = false;
        r.report(report(info, &[]));
        r.report(report(agent("b", 10, Runtime::Runc), &[]));
        let p = allocated(&mut r, &claimable("r1", "busybox", None));
        assert_eq!((p.agent.as_str(), p.warm), ("b", false));
    }

    #[test]
    fn a_lost_agents_instances_are_forgotten() {
        let mut r = RegistryState::new();
        let w = instance("busybox", Runtime::Runc);
        r.report(report(with_warm(agent("a", 10, Runtime::Runc), &[&w]), &[]));
        r.agent_lost(&AgentId::from("a"));
        r.verify().unwrap();
        // Re-registered without it: nothing to take.
        r.report(report(agent("a", 10, Runtime::Runc), &[]));
        r.verify().unwrap();
        assert!(!allocated(&mut r, &claimable("r1", "busybox", None)).warm);
    }

    #[test]
    fn placements_name_their_runtime_and_snapshots_export_to_metrics() {
        let mut r = RegistryState::new();
        r.report(report(agent("export-a", 4, Runtime::Crun), &[]));
        let p = allocated(&mut r, &req("export-r1", "busybox", &[]));
        assert_eq!(p.runtime, Runtime::Crun, "the agent's default");
        let gvisor = AllocateRequest {
            runtime: Some(Runtime::Gvisor),
            ..req("export-r2", "busybox", &[])
        };
        assert_eq!(allocated(&mut r, &gvisor).runtime, Runtime::Gvisor);
        crate::metrics::export(&r.snapshot());
        let m = fsb_telemetry::metrics();
        let text = m.render();
        for line in [
            "fsb_agent_slots{agent=\"export-a\",pool=\"p\",state=\"used\"} 2\n",
            "fsb_agent_slots{agent=\"export-a\",pool=\"p\",state=\"free\"} 2\n",
            "fsb_registry_allocations_total{result=\"allocated\"} 2\n",
        ] {
            assert!(text.contains(line), "{line}: {text}");
        }
        assert_eq!(m.registry_allocations.get("exhausted"), 0);
    }
}
