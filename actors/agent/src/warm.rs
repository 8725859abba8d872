//! Warm instances, the bookkeeping: which (image, runtime) pairs the agent keeps ready
//! and how many, which instances are ready or starting, what a claim takes, what to
//! start next. Pure and synchronous; the actor does the containerd work and reports
//! back ([`WarmState::started`], [`WarmState::failed`]).
//!
//! Rules:
//! - an instance is claimed at most once (it leaves the table when claimed) and the
//!   oldest ready one goes first;
//! - refills never exceed the target per key, the number of starts in flight, or the
//!   memory budget (every ready or starting instance is charged its estimate);
//! - while claims are arriving, refills yield to them ([`ClaimPace`]): at a trickle one
//!   start in flight at a time, during a burst none, unless a key has fallen below its
//!   low-water mark ([`low_water`]). A start costs tens of milliseconds of CPU (shim,
//!   `runc create`), a claim about one; on a small node, starts during a burst slow
//!   every claim of the burst, and one start at a time cannot replace a burst's claims
//!   anyway: the pool is topped up when it ends, at full width.
//! - lowering a target makes the extra ready instances surplus, to be removed; an
//!   instance still starting is never surplus (it is counted, then trimmed once ready).

use std::collections::{BTreeMap, HashMap, VecDeque};

use fsb_core::{
    ImageRef, SandboxId,
    spec::{Runtime, ValidSpec},
};
use fsb_init::InitSpec;

use crate::{
    error::AgentError,
    oci::{ImageConfig, process_args, process_cwd, process_env},
};

/// Why a create takes the cold path (named in its timeline).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ColdReason {
    /// No ready instance of its image and runtime.
    NoInstance,
    /// cpu, memory or pids limits under gVisor: applied to a running instance
    /// (task update) only on runc and crun so far.
    Limits,
    /// A read-only root filesystem: instances start with a writable one.
    ReadOnlyRootfs,
    /// A user namespace: instances run in the host's, on the image's own snapshot.
    UserNamespace,
}

impl ColdReason {
    /// The timeline's word for it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NoInstance => "cold: no warm instance",
            Self::Limits => "cold: resource limits under gvisor",
            Self::ReadOnlyRootfs => "cold: read-only root filesystem",
            Self::UserNamespace => "cold: user namespace",
        }
    }
}

/// The instances a create could take: its image under its runtime (`default` when
/// the spec names none).
pub fn key_of(spec: &ValidSpec, default: Runtime) -> WarmKey {
    WarmKey {
        image: spec.image.clone(),
        runtime: spec.runtime.unwrap_or(default),
    }
}

/// Whether a create may take a warm instance of `runtime` at all: command, args, env,
/// working directory and user are bound at claim time (fsb-init), resource limits by
/// a task update ([`crate::runtime::ContainerdRuntime::update_limits`]) on runc and
/// crun (tested); under gVisor a create with limits goes cold.
pub fn claimable(spec: &ValidSpec, runtime: Runtime) -> Result<(), ColdReason> {
    if spec.read_only_rootfs {
        Err(ColdReason::ReadOnlyRootfs)
    } else if spec.user_namespace {
        Err(ColdReason::UserNamespace)
    } else if spec.warm_claimable(Some(runtime)) {
        Ok(())
    } else {
        Err(ColdReason::Limits)
    }
}

/// The process a claimed instance runs: the same argv, environment and working
/// directory a cold create's OCI spec gets (`crate::oci`), as `user` (resolved from
/// the image as for a cold create).
pub fn init_spec(
    spec: &ValidSpec,
    image: &ImageConfig,
    user: (u32, u32),
) -> Result<InitSpec, AgentError> {
    let env = process_env(&image.env, &spec.envs)
        .into_iter()
        .map(|e| match e.split_once('=') {
            Some((n, v)) => (n.to_owned(), v.to_owned()),
            None => (e, String::new()),
        })
        .collect();
    Ok(InitSpec {
        argv: process_args(&spec.command, &spec.args, image)?,
        env,
        cwd: Some(process_cwd(spec, image)?),
        uid: Some(user.0),
        gid: Some(user.1),
    })
}

/// What a warm instance is made of: an image under a runtime.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WarmKey {
    /// The image.
    pub image: ImageRef,
    /// The OCI runtime.
    pub runtime: Runtime,
}

/// Limits of the refill.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WarmLimits {
    /// Instance starts in flight at once.
    pub max_starting: usize,
    /// Memory all warm instances may hold, in bytes.
    pub memory_budget: u64,
    /// What one instance is charged against the budget, in bytes.
    pub instance_bytes: u64,
}

impl Default for WarmLimits {
    /// 2 starts at a time; 64 instances' worth of 4 MiB.
    fn default() -> Self {
        Self {
            max_starting: 2,
            memory_budget: 256 << 20,
            instance_bytes: 4 << 20,
        }
    }
}

/// What an agent keeps warm.
#[derive(Clone, Debug, Default)]
pub struct WarmConfig {
    /// Instances to keep ready, per image and runtime.
    pub targets: Vec<(WarmKey, usize)>,
    /// Refill limits.
    pub limits: WarmLimits,
    /// The static fsb-init on the host, mounted read-only as each instance's PID 1
    /// (checked by the injection rules at start). Required when any target is set.
    pub init: Option<std::path::PathBuf>,
}

impl WarmConfig {
    /// Parse `IMAGE=N` or `IMAGE=N:RUNTIME` (the `--warm` flag; `default` when no
    /// runtime is named). Image references never contain `=`, so the last one splits.
    pub fn parse_target(s: &str, default: Runtime) -> Result<(WarmKey, usize), AgentError> {
        let bad = |why: &str| AgentError::InvalidArgument(format!("warm: {s:?}: {why}"));
        let (image, rest) = s
            .rsplit_once('=')
            .ok_or_else(|| bad("expected IMAGE=N or IMAGE=N:RUNTIME"))?;
        let (count, runtime) = match rest.split_once(':') {
            Some((n, r)) => (
                n,
                Runtime::parse("runtime", r).map_err(|e| bad(&e.to_string()))?,
            ),
            None => (rest, default),
        };
        let count = count
            .parse::<usize>()
            .map_err(|_| bad("the count must be a non-negative integer"))?;
        let image = ImageRef::parse("image", image).map_err(|e| bad(&e.to_string()))?;
        Ok((WarmKey { image, runtime }, count))
    }
}

/// Below this many ready instances a key refills at full width even while claims
/// arrive: a quarter of its target, at least one.
pub fn low_water(target: usize) -> usize {
    target.div_ceil(4).max(1)
}

/// How recently claims are counted for [`ClaimPace`].
pub const CLAIM_WINDOW: std::time::Duration = std::time::Duration::from_millis(200);

/// Claims within [`CLAIM_WINDOW`] from which on they are a burst: 4 in 200 ms is 20 a
/// second, about what one start at a time (~50 ms each) can replace.
pub const BURST_CLAIMS: usize = 4;

/// How fast claims are arriving, as the refill sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClaimPace {
    /// None within the window: refills go at full width.
    Quiet,
    /// Fewer than [`BURST_CLAIMS`]: one start in flight at a time.
    Trickle,
    /// [`BURST_CLAIMS`] or more: no new starts until it ends.
    Burst,
}

impl ClaimPace {
    /// The pace of `recent` claims within [`CLAIM_WINDOW`].
    pub fn of(recent: usize) -> Self {
        match recent {
            0 => Self::Quiet,
            n if n < BURST_CLAIMS => Self::Trickle,
            _ => Self::Burst,
        }
    }
}

/// Ready and wanted instances of one key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WarmLevel {
    /// Ready to be claimed.
    pub ready: usize,
    /// Being started.
    pub starting: usize,
    /// Wanted.
    pub target: usize,
}

/// The warm instances of one agent.
#[derive(Debug, Default)]
pub struct WarmState {
    limits: WarmLimits,
    targets: BTreeMap<WarmKey, usize>,
    ready: HashMap<WarmKey, VecDeque<SandboxId>>,
    starting: HashMap<SandboxId, WarmKey>,
}

impl WarmState {
    /// No targets yet.
    pub fn new(limits: WarmLimits) -> Self {
        Self {
            limits,
            ..Self::default()
        }
    }

    /// Replace the targets (keys not named have target 0). Returns the ready
    /// instances now beyond their target, to remove.
    pub fn set_targets(
        &mut self,
        targets: impl IntoIterator<Item = (WarmKey, usize)>,
    ) -> Vec<SandboxId> {
        self.targets = targets.into_iter().filter(|(_, n)| *n > 0).collect();
        self.surplus()
    }

    /// Take the oldest ready instance of `key`, if any: it is the caller's from now
    /// on and never offered again.
    pub fn claim(&mut self, key: &WarmKey) -> Option<SandboxId> {
        self.ready.get_mut(key)?.pop_front()
    }

    /// Take the ready instance `id` if it is one: its key. Creates name the instance
    /// they want (the registry assigned it), so a claim is by id.
    pub fn claim_id(&mut self, id: &SandboxId) -> Option<WarmKey> {
        let (key, queue) = self.ready.iter_mut().find(|(_, q)| q.contains(id))?;
        queue.retain(|x| x != id);
        Some(key.clone())
    }

    /// Whether `key` has a target (a create of it that finds no instance is a miss).
    pub fn wanted(&self, key: &WarmKey) -> bool {
        self.targets.contains_key(key)
    }

    /// Ready instances, oldest first per key, for reports.
    pub fn ready(&self) -> impl Iterator<Item = (&WarmKey, &SandboxId)> {
        self.ready
            .iter()
            .flat_map(|(k, q)| q.iter().map(move |id| (k, id)))
    }

    /// Instances to start now (each with a new id), within every limit; they count as
    /// starting until [`Self::started`] or [`Self::failed`]. Keys at or above their
    /// low-water mark yield to claims at `pace`.
    pub fn refills(&mut self, pace: ClaimPace) -> Vec<(SandboxId, WarmKey)> {
        let mut out = Vec::new();
        let targets: Vec<(WarmKey, usize)> =
            self.targets.iter().map(|(k, n)| (k.clone(), *n)).collect();
        // Round-robin over the keys, one at a time, so one big target does not starve
        // the others of the shared start and memory limits.
        loop {
            let mut added = false;
            for (key, target) in &targets {
                if self.starting.len() >= self.limits.max_starting || !self.budget_allows_one() {
                    return out;
                }
                let ready = self.ready.get(key).map_or(0, VecDeque::len);
                let yields = match pace {
                    ClaimPace::Quiet => false,
                    ClaimPace::Trickle => !self.starting.is_empty(),
                    ClaimPace::Burst => true,
                };
                if yields && ready >= low_water(*target) {
                    continue;
                }
                if self.held(key) < *target {
                    let id = SandboxId::generate();
                    self.starting.insert(id.clone(), key.clone());
                    out.push((id, key.clone()));
                    added = true;
                }
            }
            if !added {
                return out;
            }
        }
    }

    /// `id` is running and waiting for its spec. Returns `false` if it is not one we
    /// were starting (then it is not added).
    pub fn started(&mut self, id: &SandboxId) -> bool {
        let Some(key) = self.starting.remove(id) else {
            return false;
        };
        self.ready.entry(key).or_default().push_back(id.clone());
        true
    }

    /// Instances being started.
    pub fn starting_count(&self) -> usize {
        self.starting.len()
    }

    /// Starting `id` failed (its container is the caller's to clean up); the next
    /// [`Self::refills`] tries again.
    pub fn failed(&mut self, id: &SandboxId) {
        self.starting.remove(id);
    }

    /// A ready instance found in containerd at startup (labelled warm, never claimed).
    pub fn adopt(&mut self, id: SandboxId, key: WarmKey) {
        self.ready.entry(key).or_default().push_back(id);
    }

    /// A ready instance that stopped by itself (exited, killed): forget it.
    pub fn lost(&mut self, id: &SandboxId) -> bool {
        self.ready.values_mut().any(|q| {
            let before = q.len();
            q.retain(|x| x != id);
            q.len() != before
        })
    }

    /// Ready instances beyond their key's target, newest first (the oldest stay: they
    /// are claimed first). They leave the table.
    pub fn surplus(&mut self) -> Vec<SandboxId> {
        let mut out = Vec::new();
        for (key, queue) in &mut self.ready {
            let target = self.targets.get(key).copied().unwrap_or(0);
            while queue.len() > target {
                if let Some(id) = queue.pop_back() {
                    out.push(id);
                }
            }
        }
        out
    }

    /// Levels of every key that has a target or instances, in key order.
    pub fn levels(&self) -> BTreeMap<WarmKey, WarmLevel> {
        let mut out: BTreeMap<WarmKey, WarmLevel> = self
            .targets
            .iter()
            .map(|(k, n)| {
                (
                    k.clone(),
                    WarmLevel {
                        ready: 0,
                        starting: 0,
                        target: *n,
                    },
                )
            })
            .collect();
        let zero = WarmLevel {
            ready: 0,
            starting: 0,
            target: 0,
        };
        for (k, q) in &self.ready {
            if !q.is_empty() {
                out.entry(k.clone()).or_insert(zero).ready = q.len();
            }
        }
        for k in self.starting.values() {
            out.entry(k.clone()).or_insert(zero).starting += 1;
        }
        out
    }

    /// Ready plus starting instances of `key`.
    fn held(&self, key: &WarmKey) -> usize {
        self.ready.get(key).map_or(0, VecDeque::len)
            + self.starting.values().filter(|k| *k == key).count()
    }

    fn budget_allows_one(&self) -> bool {
        let held = self.ready.values().map(VecDeque::len).sum::<usize>() + self.starting.len();
        let used = (held as u64).saturating_mul(self.limits.instance_bytes);
        used.saturating_add(self.limits.instance_bytes) <= self.limits.memory_budget
    }
}

#[cfg(test)]
mod tests {
    use fsb_core::spec::EnvVar;

    use super::*;

    use crate::oci::tests::valid_spec as valid;

    #[test]
    fn a_claim_binds_what_a_cold_create_would() {
        let image = ImageConfig {
            entrypoint: vec!["/bin/entry".into()],
            cmd: vec!["default-arg".into()],
            env: vec!["PATH=/image/bin".into(), "LANG=C".into()],
            working_dir: "/srv".into(),
            user: String::new(),
        };
        let plain = init_spec(&valid(|_| {}), &image, (0, 0)).unwrap();
        assert_eq!(plain.argv, ["/bin/entry", "default-arg"], "image defaults");
        assert_eq!(plain.cwd.as_deref(), Some("/srv"));
        assert_eq!(
            plain.env,
            [
                ("PATH".to_owned(), "/image/bin".to_owned()),
                ("LANG".to_owned(), "C".to_owned())
            ]
        );
        let bound = init_spec(
            &valid(|s| {
                s.args = vec!["x".into()];
                s.envs = vec![
                    EnvVar {
                        name: "LANG".into(),
                        value: "fr".into(),
                    },
                    EnvVar {
                        name: "A".into(),
                        value: "1".into(),
                    },
                ];
                s.working_dir = "/work/new".into();
            }),
            &image,
            (65534, 65534),
        )
        .unwrap();
        assert_eq!(bound.argv, ["/bin/entry", "x"], "entrypoint + args");
        assert_eq!(bound.env[1], ("LANG".to_owned(), "fr".to_owned()));
        assert_eq!(bound.env[2], ("A".to_owned(), "1".to_owned()));
        assert_eq!(bound.cwd.as_deref(), Some("/work/new"));
        assert_eq!((bound.uid, bound.gid), (Some(65534), Some(65534)));
        // What fsb-init accepts.
        assert_eq!(InitSpec::parse(&bound.to_line()).unwrap(), bound);
    }

    #[test]
    fn limits_go_cold_only_under_gvisor_read_only_always_and_the_key_follows_the_runtime() {
        assert_eq!(claimable(&valid(|_| {}), Runtime::Gvisor), Ok(()));
        let limited = valid(|s| s.resources.pids = 64);
        assert_eq!(claimable(&limited, Runtime::Runc), Ok(()));
        assert_eq!(claimable(&limited, Runtime::Crun), Ok(()));
        assert_eq!(
            claimable(&limited, Runtime::Gvisor),
            Err(ColdReason::Limits)
        );
        let ro = valid(|s| s.read_only_rootfs = true);
        for runtime in [Runtime::Runc, Runtime::Crun, Runtime::Gvisor] {
            assert_eq!(claimable(&ro, runtime), Err(ColdReason::ReadOnlyRootfs));
        }
        let userns = valid(|s| s.user_namespace = true);
        for runtime in [Runtime::Runc, Runtime::Crun] {
            assert_eq!(claimable(&userns, runtime), Err(ColdReason::UserNamespace));
        }
        let k = key_of(&valid(|_| {}), Runtime::Crun);
        assert_eq!(k.runtime, Runtime::Crun);
        let g = key_of(&valid(|s| s.runtime = "gvisor".into()), Runtime::Runc);
        assert_eq!(g.runtime, Runtime::Gvisor);
    }

    fn key(image: &str, runtime: Runtime) -> WarmKey {
        WarmKey {
            image: ImageRef::parse("image", image).unwrap(),
            runtime,
        }
    }

    fn start_all(s: &mut WarmState) -> Vec<SandboxId> {
        let mut ids = Vec::new();
        loop {
            let batch = s.refills(ClaimPace::Quiet);
            if batch.is_empty() {
                return ids;
            }
            for (id, _) in batch {
                assert!(s.started(&id));
                ids.push(id);
            }
        }
    }

    #[test]
    fn refills_up_to_the_target_within_the_starts_in_flight() {
        let mut s = WarmState::new(WarmLimits {
            max_starting: 2,
            ..WarmLimits::default()
        });
        let busybox = key("busybox", Runtime::Runc);
        assert!(s.set_targets([(busybox.clone(), 5)]).is_empty());
        let first = s.refills(ClaimPace::Quiet);
        assert_eq!(first.len(), 2, "two starts at a time");
        assert!(
            s.refills(ClaimPace::Quiet).is_empty(),
            "none more while two are starting"
        );
        for (id, _) in &first {
            assert!(s.started(id));
        }
        assert_eq!(start_all(&mut s).len(), 3);
        assert_eq!(
            s.levels()[&busybox],
            WarmLevel {
                ready: 5,
                starting: 0,
                target: 5
            }
        );
        assert!(s.refills(ClaimPace::Quiet).is_empty(), "full");
    }

    #[test]
    fn refills_yield_to_claims_by_their_pace_until_the_low_water_mark() {
        use ClaimPace::{Burst, Quiet, Trickle};
        let limits = WarmLimits {
            max_starting: 4,
            ..WarmLimits::default()
        };
        let k = key("busybox", Runtime::Runc);
        let mut s = WarmState::new(limits);
        s.set_targets([(k.clone(), 8)]);
        // None ready, so below the low-water mark (2 of 8): full width despite a burst.
        let first = s.refills(Burst);
        assert_eq!(first.len(), 4);
        for (id, _) in &first {
            assert!(s.started(id));
        }
        start_all(&mut s);
        assert_eq!(s.levels()[&k].ready, 8);
        // Claims take 4: 4 held, above the mark. During a burst nothing starts.
        for _ in 0..4 {
            s.claim(&k).unwrap();
        }
        assert!(s.refills(Burst).is_empty(), "a burst holds the refill");
        // At a trickle, one start at a time.
        let one = s.refills(Trickle);
        assert_eq!(one.len(), 1);
        assert!(
            s.refills(Trickle).is_empty(),
            "one start in flight is the limit"
        );
        // Once the claims stop, the rest start at full width.
        assert_eq!(s.refills(Quiet).len(), 3);
        // Claims that drain the key below its mark (1 ready < 2) lift the hold.
        let mut s = WarmState::new(limits);
        s.set_targets([(k.clone(), 8)]);
        start_all(&mut s);
        for _ in 0..7 {
            s.claim(&k).unwrap();
        }
        assert_eq!(s.refills(Burst).len(), 4);
        assert_eq!(low_water(1), 1);
        assert_eq!(low_water(600), 150);
        // The pace of the claims counted within the window.
        assert_eq!(ClaimPace::of(0), Quiet);
        assert_eq!(ClaimPace::of(BURST_CLAIMS - 1), Trickle);
        assert_eq!(ClaimPace::of(BURST_CLAIMS), Burst);
    }

    #[test]
    fn a_claim_takes_the_oldest_once_and_the_pool_refills() {
        let mut s = WarmState::new(WarmLimits::default());
        let k = key("busybox", Runtime::Runc);
        s.set_targets([(k.clone(), 2)]);
        let ids = start_all(&mut s);
        let claimed = s.claim(&k).unwrap();
        assert_eq!(claimed, ids[0], "oldest first");
        assert_eq!(s.claim(&k).unwrap(), ids[1]);
        assert_eq!(s.claim(&k), None, "exhausted: the cold path");
        let again = start_all(&mut s);
        assert_eq!(again.len(), 2);
        assert!(
            !again.contains(&claimed),
            "new instances, never the claimed one"
        );
        assert_eq!(s.claim(&key("busybox", Runtime::Crun)), None, "per runtime");
    }

    #[test]
    fn the_memory_budget_caps_every_key_together() {
        let mut s = WarmState::new(WarmLimits {
            max_starting: 100,
            memory_budget: 10 << 20,
            instance_bytes: 4 << 20,
        });
        let (a, b) = (key("a", Runtime::Runc), key("b", Runtime::Gvisor));
        s.set_targets([(a.clone(), 3), (b.clone(), 3)]);
        let ids = start_all(&mut s);
        assert_eq!(ids.len(), 2, "two instances of 4 MiB fit in 10 MiB");
        let l = s.levels();
        assert_eq!((l[&a].ready, l[&b].ready), (1, 1), "shared fairly");
    }

    #[test]
    fn a_lowered_target_returns_the_newest_as_surplus_and_failures_retry() {
        let mut s = WarmState::new(WarmLimits::default());
        let k = key("busybox", Runtime::Runc);
        s.set_targets([(k.clone(), 3)]);
        let ids = start_all(&mut s);
        let surplus = s.set_targets([(k.clone(), 1)]);
        assert_eq!(surplus, vec![ids[2].clone(), ids[1].clone()]);
        assert_eq!(s.claim(&k), Some(ids[0].clone()));
        s.set_targets([(k.clone(), 1)]);
        let (id, _) = s.refills(ClaimPace::Quiet).pop().unwrap();
        s.failed(&id);
        assert!(!s.started(&id), "a failed start is not ready");
        assert_eq!(s.refills(ClaimPace::Quiet).len(), 1, "tried again");
        assert_eq!(
            s.set_targets([]).len(),
            0,
            "starting instances are not surplus"
        );
    }

    #[test]
    fn adopted_and_lost_instances() {
        let mut s = WarmState::new(WarmLimits::default());
        let k = key("busybox", Runtime::Runc);
        let id = SandboxId::generate();
        s.adopt(id.clone(), k.clone());
        assert_eq!(s.set_targets([(k.clone(), 1)]).len(), 0);
        assert!(
            s.refills(ClaimPace::Quiet).is_empty(),
            "the adopted one counts"
        );
        assert!(s.lost(&id));
        assert!(!s.lost(&id));
        assert_eq!(s.refills(ClaimPace::Quiet).len(), 1);
    }

    #[test]
    fn warm_targets_parse_with_and_without_a_runtime() {
        let (key, n) =
            WarmConfig::parse_target("docker.io/library/busybox:latest=8", Runtime::Crun).unwrap();
        assert_eq!(
            (key.image.to_string().as_str(), key.runtime, n),
            ("docker.io/library/busybox:latest", Runtime::Crun, 8)
        );
        let (key, n) =
            WarmConfig::parse_target("127.0.0.1:5000/a/b:1=3:gvisor", Runtime::Runc).unwrap();
        assert_eq!(
            (key.image.to_string().as_str(), key.runtime, n),
            ("127.0.0.1:5000/a/b:1", Runtime::Gvisor, 3)
        );
        for bad in ["busybox", "busybox=x", "busybox=2:kata", "=2", "busybox=-1"] {
            let err = WarmConfig::parse_target(bad, Runtime::Runc).unwrap_err();
            assert!(err.to_string().starts_with("warm: "), "{bad}: {err}");
        }
    }
}
