//! The registry's pure state: which agents exist, what each holds, and where the next
//! sandbox goes. Synchronous, no I/O, no clocks: the actor serializes calls, tests and
//! benches drive it directly.
//!
//! Placement order: agents of the request's (namespace, pool) group that are healthy,
//! have a free slot and have every requested port free; among them those holding the
//! image first, then the least loaded, then the lowest registry slot (agents get
//! slots in registration order; a deterministic tie-break that never flaps).
//! Two ordered indexes per group (`free`, `by_image`) keyed by (load, slot) make the
//! usual allocation O(log n) with integer comparisons; only port conflicts make it
//! walk further. Internal maps use foldhash (seeded per process, so still resistant
//! to hash flooding) because SipHash was a third of the allocation cost.
//!
//! Invariants (checked by [`RegistryState::verify`] in the property tests):
//! - a port is held by at most one sandbox per agent;
//! - the registry never allocates beyond an agent's capacity;
//! - agent sandbox sets, the sandbox table, the request table and the indexes agree;
//! - nothing is kept for finished sandboxes, lost agents or empty groups.

use std::{collections::BTreeSet, num::NonZeroU32};

use fsb_core::{
    AgentId, HostPort, ImageRef, NamespaceName, NodeName, PoolName, RequestId, SandboxId,
    spec::SpecDigest,
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

type Map<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
type Set<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;

/// Dense index of an agent in the registry's slab.
type Slot = u32;
type LoadKey = (u32, Slot);

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
}

#[derive(Debug)]
struct AgentEntry {
    info: AgentInfo,
    slot: Slot,
    group: GroupKey,
    images: Set<ImageRef>,
    sandboxes: Set<SandboxId>,
    ports: Map<HostPort, SandboxId>,
    /// Whether the entry is in its group's indexes under `load_key()`.
    indexed: bool,
}

impl AgentEntry {
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
            indexed: false,
        }
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
    metrics: RegistryMetrics,
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
                    image_cached: agent.images.contains(&req.image),
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

        self.unindex(slot);
        let Some(agent) = self.agent_mut(slot) else {
            return AllocateOutcome::Exhausted(ExhaustedReason::NoAgents);
        };
        agent.sandboxes.insert(req.sandbox_id.clone());
        for p in &req.ports {
            agent.ports.insert(*p, req.sandbox_id.clone());
        }
        let placement = Placement {
            sandbox_id: req.sandbox_id.clone(),
            agent: agent.info.id.clone(),
            node: agent.info.node.clone(),
            ports: req.ports.clone(),
            image_cached,
        };
        self.index(slot);
        self.sandboxes.insert(
            req.sandbox_id.clone(),
            Allocation {
                agent: slot,
                ports: req.ports.clone(),
                request: Some((req.request_id.clone(), req.digest)),
                confirmed: false,
            },
        );
        self.requests
            .insert(req.request_id.clone(), req.sandbox_id.clone());
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
    /// what it holds, free what it no longer holds, and drop in-flight allocations
    /// that reality leaves no room for.
    pub fn report(&mut self, report: AgentReport) -> ReportOutcome {
        let AgentReport {
            agent: info,
            sandboxes: reported,
        } = report;
        let mut out = ReportOutcome::default();

        let slot = match self.slots.get(&info.id) {
            Some(&slot) => {
                self.unindex(slot);
                if let Some(entry) = self.agent_mut(slot) {
                    entry.group = GroupKey {
                        namespace: info.namespace.clone(),
                        pool: info.pool.clone(),
                    };
                    entry.images = info.images.iter().cloned().collect();
                    entry.info = info;
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
            let request = self.remove_sandbox(&r.id).and_then(|a| a.request);
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
            self.sandboxes.insert(
                r.id,
                Allocation {
                    agent: slot,
                    ports: r.ports,
                    request,
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

        self.index(slot);
        out
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
            group.free.insert(key);
        }
    }
}
