//! The agent's pure state: which sandboxes it holds and in what phase, and admission.
//!
//! Admission counts every sandbox the agent holds, whatever its phase (creating,
//! running, exited but not yet deleted, deleting): each one still owns a container,
//! a snapshot and maybe ports. Ports are exclusive per agent (sandboxes share its
//! network namespace), so admission checks them too, whatever the registry decided.

use std::collections::{BTreeMap, BTreeSet};

use fsb_core::{HostPort, SandboxId};

/// Lifecycle of a sandbox on this agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SandboxPhase {
    /// Being created.
    Creating,
    /// Its process runs.
    Running,
    /// Its process exited with 0.
    Succeeded,
    /// Its process exited non-zero (or the sandbox broke).
    Failed,
    /// Being removed.
    Deleting,
}

/// What the agent knows of one sandbox.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SandboxRecord {
    /// Its id.
    pub id: SandboxId,
    /// Kubernetes namespace.
    pub namespace: String,
    /// Sandbox name.
    pub name: String,
    /// Uid of the Sandbox object that claimed it (empty in local mode).
    pub claim_uid: String,
    /// Idempotency key of the create that made it (empty if unknown).
    pub request_id: String,
    /// Image reference.
    pub image: String,
    /// Ports it holds in the agent's network namespace.
    pub ports: Vec<HostPort>,
    /// Phase.
    pub phase: SandboxPhase,
    /// Exit code once exited.
    pub exit_code: Option<i32>,
    /// Host pid of its init process (0 until started).
    pub pid: u32,
}

/// Result of asking for a slot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Recorded as Creating; go ahead.
    Admitted,
    /// This id is already held (a retried create): its current record.
    AlreadyPresent(SandboxRecord),
    /// Every slot is taken.
    Full {
        /// Sandboxes held.
        used: u32,
    },
    /// Another sandbox on this agent holds one of the ports.
    PortsInUse(Vec<HostPort>),
}

/// A change worth reporting upward.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PhaseChange {
    /// The sandbox.
    pub id: SandboxId,
    /// Its new phase.
    pub phase: SandboxPhase,
    /// Its exit code, if it exited.
    pub exit_code: Option<i32>,
}

/// Sandboxes held by this agent.
#[derive(Debug)]
pub struct AgentState {
    capacity: u32,
    sandboxes: BTreeMap<SandboxId, SandboxRecord>,
}

impl AgentState {
    /// An empty agent with `capacity` slots.
    pub fn new(capacity: u32) -> Self {
        Self {
            capacity,
            sandboxes: BTreeMap::new(),
        }
    }

    /// Slots.
    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// Slots in use (every held sandbox, whatever its phase).
    pub fn used(&self) -> u32 {
        u32::try_from(self.sandboxes.len()).unwrap_or(u32::MAX)
    }

    /// The record of `id`.
    pub fn get(&self, id: &SandboxId) -> Option<&SandboxRecord> {
        self.sandboxes.get(id)
    }

    /// Every record, by id.
    pub fn records(&self) -> impl Iterator<Item = &SandboxRecord> {
        self.sandboxes.values()
    }

    /// Reserve a slot for `record` (whose phase is set to Creating).
    pub fn admit(&mut self, mut record: SandboxRecord) -> Admission {
        if let Some(existing) = self.sandboxes.get(&record.id) {
            return Admission::AlreadyPresent(existing.clone());
        }
        if self.used() >= self.capacity {
            return Admission::Full { used: self.used() };
        }
        let held: BTreeSet<HostPort> = self
            .sandboxes
            .values()
            .flat_map(|s| s.ports.iter().copied())
            .collect();
        let clash: Vec<HostPort> = record
            .ports
            .iter()
            .copied()
            .filter(|p| held.contains(p))
            .collect();
        if !clash.is_empty() {
            return Admission::PortsInUse(clash);
        }
        record.phase = SandboxPhase::Creating;
        record.exit_code = None;
        self.sandboxes.insert(record.id.clone(), record);
        Admission::Admitted
    }

    /// The create finished: the process runs (unless it already exited).
    pub fn created(&mut self, id: &SandboxId, pid: u32) -> Option<PhaseChange> {
        let rec = self.sandboxes.get_mut(id)?;
        rec.pid = pid;
        if rec.phase == SandboxPhase::Creating {
            rec.phase = SandboxPhase::Running;
        }
        Some(PhaseChange {
            id: id.clone(),
            phase: rec.phase,
            exit_code: rec.exit_code,
        })
    }

    /// The create failed and left nothing: free the slot.
    pub fn create_failed(&mut self, id: &SandboxId) {
        self.sandboxes.remove(id);
    }

    /// Like [`Self::exited`], but ignores the exit of another process than the one
    /// recorded: a reset reuses the sandbox id, and the old container's exit event may
    /// arrive after the new one runs. Unknown pids (0) are not compared.
    pub fn exited_pid(&mut self, id: &SandboxId, pid: u32, exit_code: i32) -> Option<PhaseChange> {
        let recorded = self.sandboxes.get(id)?.pid;
        if pid != 0 && recorded != 0 && pid != recorded {
            return None;
        }
        self.exited(id, exit_code)
    }

    /// The sandbox's process exited with `exit_code` (reported once).
    pub fn exited(&mut self, id: &SandboxId, exit_code: i32) -> Option<PhaseChange> {
        let rec = self.sandboxes.get_mut(id)?;
        if rec.phase == SandboxPhase::Deleting || rec.exit_code.is_some() {
            return None;
        }
        rec.exit_code = Some(exit_code);
        rec.phase = if exit_code == 0 {
            SandboxPhase::Succeeded
        } else {
            SandboxPhase::Failed
        };
        Some(PhaseChange {
            id: id.clone(),
            phase: rec.phase,
            exit_code: rec.exit_code,
        })
    }

    /// Mark `id` as being deleted; false if the agent does not hold it.
    pub fn begin_delete(&mut self, id: &SandboxId) -> bool {
        match self.sandboxes.get_mut(id) {
            Some(rec) => {
                rec.phase = SandboxPhase::Deleting;
                true
            }
            None => false,
        }
    }

    /// The sandbox is gone from containerd: free its slot.
    pub fn deleted(&mut self, id: &SandboxId) -> Option<SandboxRecord> {
        self.sandboxes.remove(id)
    }

    /// Replace everything with what containerd holds (after a restart or a
    /// containerd reconnect); returns the phase changes against the previous view.
    /// Sandboxes being created or deleted keep our record: their SandboxActor is
    /// mid-operation and containerd shows a transitional state (e.g. no task yet).
    pub fn recover(&mut self, observed: Vec<SandboxRecord>) -> Vec<PhaseChange> {
        let busy =
            |r: &SandboxRecord| matches!(r.phase, SandboxPhase::Creating | SandboxPhase::Deleting);
        let mut changes = Vec::new();
        let mut next: BTreeMap<SandboxId, SandboxRecord> = self
            .sandboxes
            .iter()
            .filter(|(_, r)| busy(r))
            .map(|(id, r)| (id.clone(), r.clone()))
            .collect();
        for rec in observed {
            if next.contains_key(&rec.id) {
                continue;
            }
            let changed = self
                .sandboxes
                .get(&rec.id)
                .is_none_or(|old| old.phase != rec.phase);
            if changed {
                changes.push(PhaseChange {
                    id: rec.id.clone(),
                    phase: rec.phase,
                    exit_code: rec.exit_code,
                });
            }
            next.insert(rec.id.clone(), rec);
        }
        self.sandboxes = next;
        changes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(ports: &[u32]) -> SandboxRecord {
        SandboxRecord {
            id: SandboxId::generate(),
            namespace: "default".into(),
            name: "s".into(),
            claim_uid: String::new(),
            request_id: String::new(),
            image: "docker.io/library/busybox:latest".into(),
            ports: ports
                .iter()
                .map(|p| HostPort::parse("port", *p).unwrap())
                .collect(),
            phase: SandboxPhase::Running,
            exit_code: None,
            pid: 0,
        }
    }

    #[test]
    fn admission_counts_every_phase_and_ports() {
        let mut s = AgentState::new(2);
        let a = rec(&[80]);
        assert_eq!(s.admit(a.clone()), Admission::Admitted);
        assert_eq!(s.get(&a.id).unwrap().phase, SandboxPhase::Creating);
        assert!(matches!(s.admit(a.clone()), Admission::AlreadyPresent(_)));
        assert_eq!(
            s.admit(rec(&[80, 81])),
            Admission::PortsInUse(vec![HostPort::parse("p", 80).unwrap()])
        );
        let b = rec(&[]);
        assert_eq!(s.admit(b.clone()), Admission::Admitted);
        assert_eq!(s.admit(rec(&[])), Admission::Full { used: 2 });
        // Exited and deleting sandboxes still hold their slot.
        s.created(&a.id, 10);
        s.exited(&a.id, 0);
        assert!(s.begin_delete(&b.id));
        assert_eq!(s.admit(rec(&[])), Admission::Full { used: 2 });
        s.deleted(&b.id);
        assert_eq!(s.admit(rec(&[])), Admission::Admitted);
    }

    #[test]
    fn exits_become_phases_once() {
        let mut s = AgentState::new(3);
        let (ok, bad) = (rec(&[]), rec(&[]));
        s.admit(ok.clone());
        s.admit(bad.clone());
        s.created(&ok.id, 1);
        s.created(&bad.id, 2);
        assert_eq!(s.exited(&ok.id, 0).unwrap().phase, SandboxPhase::Succeeded);
        assert_eq!(s.exited(&bad.id, 137).unwrap().phase, SandboxPhase::Failed);
        assert_eq!(s.exited(&bad.id, 1), None, "reported once");
        assert_eq!(s.exited(&SandboxId::generate(), 0), None);
    }

    #[test]
    fn an_exit_of_an_earlier_process_with_the_same_id_is_ignored() {
        let mut s = AgentState::new(1);
        let a = rec(&[]);
        s.admit(a.clone());
        s.created(&a.id, 42);
        assert_eq!(
            s.exited_pid(&a.id, 41, 137),
            None,
            "the reset's old process"
        );
        assert_eq!(s.get(&a.id).map(|r| r.phase), Some(SandboxPhase::Running));
        let change = s.exited_pid(&a.id, 42, 0).unwrap();
        assert_eq!(change.phase, SandboxPhase::Succeeded);
    }

    #[test]
    fn an_exit_before_create_returns_is_kept() {
        let mut s = AgentState::new(1);
        let a = rec(&[]);
        s.admit(a.clone());
        s.exited(&a.id, 3);
        let change = s.created(&a.id, 5).unwrap();
        assert_eq!(
            (change.phase, change.exit_code),
            (SandboxPhase::Failed, Some(3))
        );
    }

    #[test]
    fn recover_never_overrides_a_create_in_flight() {
        let mut s = AgentState::new(2);
        let flying = rec(&[]);
        s.admit(flying.clone());
        // containerd already has the container but no task yet.
        let mut seen = flying.clone();
        seen.phase = SandboxPhase::Failed;
        assert!(s.recover(vec![seen]).is_empty());
        assert_eq!(s.get(&flying.id).unwrap().phase, SandboxPhase::Creating);
    }

    #[test]
    fn recover_replaces_the_view_but_keeps_creates_in_flight() {
        let mut s = AgentState::new(5);
        let (gone, flying, kept) = (rec(&[]), rec(&[]), rec(&[]));
        for r in [&gone, &flying, &kept] {
            s.admit((*r).clone());
        }
        s.created(&gone.id, 1);
        s.created(&kept.id, 2);
        let mut observed = kept.clone();
        observed.phase = SandboxPhase::Succeeded;
        observed.exit_code = Some(0);
        let changes = s.recover(vec![observed]);
        assert_eq!(changes.len(), 1);
        assert!(s.get(&gone.id).is_none());
        assert_eq!(s.get(&flying.id).unwrap().phase, SandboxPhase::Creating);
        assert_eq!(s.get(&kept.id).unwrap().phase, SandboxPhase::Succeeded);
    }
}
