//! Between the store's records and the wire (`fastpath.v1`).

use std::{
    collections::BTreeMap,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use fsb_core::spec::{FailurePolicy, Runtime, ValidSpec};
use fsb_proto::fastpath::v1 as fp;
use fsb_registry::RegistrySnapshot;
use fsb_store::{Phase, StartPath, StartStage, StartTimeline, StoredSandbox};

/// Host that exposed ports are reached on: sandboxes share the agent's network
/// namespace, which in local mode is the host's.
pub const LOCAL_HOST: &str = "127.0.0.1";

/// Now, in Unix milliseconds.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Unix milliseconds as a protobuf timestamp.
pub fn timestamp(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: i32::try_from(ms.rem_euclid(1000) * 1_000_000).unwrap_or(0),
    }
}

/// A protobuf timestamp as Unix milliseconds.
pub fn millis(ts: &prost_types::Timestamp) -> i64 {
    ts.seconds
        .saturating_mul(1000)
        .saturating_add(i64::from(ts.nanos) / 1_000_000)
}

/// A protobuf duration as a std one; None if negative.
pub fn duration(d: &prost_types::Duration) -> Option<Duration> {
    let secs = u64::try_from(d.seconds).ok()?;
    let nanos = u32::try_from(d.nanos).ok()?;
    Some(Duration::new(secs, nanos))
}

/// The wire phase.
pub fn phase(p: Phase) -> fp::Phase {
    match p {
        Phase::Pending => fp::Phase::Pending,
        Phase::Bound => fp::Phase::Bound,
        Phase::Running => fp::Phase::Running,
        Phase::Terminating => fp::Phase::Terminating,
        Phase::Expired => fp::Phase::Expired,
        Phase::Failed => fp::Phase::Failed,
        Phase::Lost => fp::Phase::Lost,
        Phase::Succeeded => fp::Phase::Succeeded,
    }
}

/// The wire runtime.
pub fn runtime(r: Option<Runtime>) -> fp::Runtime {
    r.map_or(fp::Runtime::Unspecified, fsb_agent::server::wire_runtime)
}

/// The wire failure policy.
pub fn failure_policy(p: FailurePolicy) -> fp::FailurePolicy {
    match p {
        FailurePolicy::Manual => fp::FailurePolicy::Manual,
        FailurePolicy::AutoRecreate => fp::FailurePolicy::AutoRecreate,
    }
}

/// A validated spec back in wire form (what Get shows and what the agent is sent).
pub fn spec(s: &ValidSpec, expire_time_ms: Option<i64>, reset_revision: i64) -> fp::SandboxSpec {
    fp::SandboxSpec {
        pool_ref: s.pool.to_string(),
        image: s.image.as_str().to_owned(),
        command: s.command.clone(),
        args: s.args.clone(),
        envs: s
            .envs
            .iter()
            .map(|(name, value)| fp::EnvVar {
                name: name.clone(),
                value: value.clone(),
            })
            .collect(),
        working_dir: s.working_dir.clone().unwrap_or_default(),
        exposed_ports: s.ports.iter().map(|p| u32::from(p.get())).collect(),
        resources: Some(fp::Resources {
            cpu: s.cpu.map(|c| format!("{}m", c.0)).unwrap_or_default(),
            memory: s.memory.map(|m| m.0.to_string()).unwrap_or_default(),
            pids: s.pids.unwrap_or(0),
        }),
        runtime: runtime(s.runtime) as i32,
        failure_policy: failure_policy(s.failure_policy) as i32,
        recovery_timeout_seconds: s.recovery_timeout_seconds,
        expire_time: expire_time_ms.map(timestamp),
        reset_revision,
        read_only_rootfs: s.read_only_rootfs,
        user_namespace: s.user_namespace,
    }
}

/// A record as the API shows it. `recorded` is false while a FAST create's record is
/// still being written. Expired sandboxes show no agent and no sandbox id: their
/// container is gone.
pub fn sandbox(r: &StoredSandbox, recorded: bool) -> fp::Sandbox {
    let gone = matches!(r.phase, Phase::Expired);
    let holds = matches!(r.phase, Phase::Bound | Phase::Running);
    fp::Sandbox {
        namespace: r.namespace.to_string(),
        name: r.name.to_string(),
        uid: r.uid.clone(),
        labels: r
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        spec: Some(spec(&r.spec, r.expire_time_ms, r.reset_revision)),
        status: Some(fp::SandboxStatus {
            phase: phase(r.phase) as i32,
            assigned_agent: if gone {
                String::new()
            } else {
                r.agent
                    .as_ref()
                    .map(ToString::to_string)
                    .unwrap_or_default()
            },
            node_name: if gone {
                String::new()
            } else {
                r.node.as_ref().map(ToString::to_string).unwrap_or_default()
            },
            sandbox_id: if gone {
                String::new()
            } else {
                r.sandbox_id.to_string()
            },
            endpoints: if holds {
                r.spec
                    .ports
                    .iter()
                    .map(|p| fp::Endpoint {
                        host: LOCAL_HOST.to_owned(),
                        port: u32::from(p.get()),
                    })
                    .collect()
            } else {
                Vec::new()
            },
            conditions: Vec::new(),
            accepted_reset_revision: r.accepted_reset_revision,
            observed_generation: 0,
            timeline: r.timeline.as_ref().map(timeline),
            exit_code: r.exit_code,
            recorded,
        }),
        create_time: Some(timestamp(r.created_ms)),
    }
}

/// A create's timeline as the record keeps it (bounded).
pub fn stored_timeline(t: &fp::Timeline) -> StartTimeline {
    StartTimeline {
        path: StartPath::parse(&t.path),
        note: t.note.clone(),
        total_us: t.total_us,
        started_unix_us: t.started_unix_us,
        stages: t
            .stages
            .iter()
            .map(|s| StartStage {
                name: s.name.clone(),
                start_us: s.start_us,
                duration_us: s.duration_us,
            })
            .collect(),
    }
    .bounded()
}

/// A stored timeline on the wire.
pub fn timeline(t: &StartTimeline) -> fp::Timeline {
    fp::Timeline {
        stages: t
            .stages
            .iter()
            .map(|s| fp::Stage {
                name: s.name.clone(),
                start_us: s.start_us,
                duration_us: s.duration_us,
            })
            .collect(),
        total_us: t.total_us,
        path: t.path.as_str().to_owned(),
        note: t.note.clone(),
        started_unix_us: t.started_unix_us,
    }
}

fn count(n: impl TryInto<u32>) -> u32 {
    n.try_into().unwrap_or(u32::MAX)
}

/// Whether an agent of `namespace`/`pool` passes the filters (empty: any).
fn selected(namespace: &str, pool: &str, want_namespace: &str, want_pool: &str) -> bool {
    (want_namespace.is_empty() || namespace == want_namespace)
        && (want_pool.is_empty() || pool == want_pool)
}

/// Ready warm instances per (namespace, pool, image, runtime) over healthy agents,
/// after the namespace and pool filters (empty: any), sorted.
pub fn warm_levels(snapshot: &RegistrySnapshot, namespace: &str, pool: &str) -> Vec<fp::WarmLevel> {
    snapshot
        .warm_levels()
        .into_iter()
        .filter(|((ns, p, _, _), _)| selected(ns, p, namespace, pool))
        .map(|((ns, p, image, rt), ready)| fp::WarmLevel {
            namespace: ns.to_owned(),
            pool_ref: p.to_owned(),
            image: image.to_owned(),
            runtime: runtime(Some(rt)) as i32,
            ready: count(ready),
        })
        .collect()
}

/// Slots and warm instances per agent and per pool, after the namespace and pool
/// filters (empty: any), sorted by namespace, pool and agent.
pub fn usage(snapshot: &RegistrySnapshot, namespace: &str, pool: &str) -> fp::UsageResponse {
    let mut agents: Vec<fp::AgentUsage> = snapshot
        .agents
        .iter()
        .filter(|a| {
            selected(
                a.info.namespace.as_str(),
                a.info.pool.as_str(),
                namespace,
                pool,
            )
        })
        .map(|a| fp::AgentUsage {
            agent_id: a.info.id.to_string(),
            namespace: a.info.namespace.to_string(),
            pool_ref: a.info.pool.to_string(),
            node_name: a.info.node.to_string(),
            healthy: a.info.healthy,
            slots_used: a.used,
            slots_capacity: a.info.capacity.get(),
            warm_ready: count(a.warm),
            ports_used: count(a.ports.len()),
        })
        .collect();
    agents.sort_by(|a, b| {
        (&a.namespace, &a.pool_ref, &a.agent_id).cmp(&(&b.namespace, &b.pool_ref, &b.agent_id))
    });
    let mut pools: BTreeMap<(String, String), fp::PoolUsage> = BTreeMap::new();
    for a in &agents {
        let p = pools
            .entry((a.namespace.clone(), a.pool_ref.clone()))
            .or_insert_with(|| fp::PoolUsage {
                namespace: a.namespace.clone(),
                pool_ref: a.pool_ref.clone(),
                ..fp::PoolUsage::default()
            });
        p.agents += 1;
        p.slots_used = p.slots_used.saturating_add(a.slots_used);
        p.slots_capacity = p.slots_capacity.saturating_add(a.slots_capacity);
        if a.healthy {
            p.healthy_agents += 1;
            p.slots_free = p
                .slots_free
                .saturating_add(a.slots_capacity.saturating_sub(a.slots_used));
            p.warm_ready = p.warm_ready.saturating_add(a.warm_ready);
        }
    }
    fp::UsageResponse {
        agents,
        pools: pools.into_values().collect(),
        warm: warm_levels(snapshot, namespace, pool),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_round_trip_including_before_the_epoch() {
        for ms in [0, 1, 999, 1_000, 1_764_000_000_123, -1, -1_001] {
            assert_eq!(millis(&timestamp(ms)), ms, "{ms}");
        }
    }

    #[test]
    fn negative_durations_are_refused() {
        assert_eq!(
            duration(&prost_types::Duration {
                seconds: 2,
                nanos: 5
            }),
            Some(Duration::new(2, 5))
        );
        assert_eq!(
            duration(&prost_types::Duration {
                seconds: -1,
                nanos: 0
            }),
            None
        );
    }

    #[test]
    fn timelines_round_trip_through_the_record_within_bounds() {
        let wire = fp::Timeline {
            stages: vec![
                fp::Stage {
                    name: "validate".into(),
                    start_us: 0,
                    duration_us: 20,
                },
                fp::Stage {
                    name: "runtime.start".into(),
                    start_us: 900,
                    duration_us: 700,
                },
            ],
            total_us: 1_650,
            path: "warm".into(),
            note: "n".into(),
            started_unix_us: 1_700_000_000_000_000,
        };
        assert_eq!(timeline(&stored_timeline(&wire)), wire);
        let long = fp::Timeline {
            note: "x".repeat(10_000),
            stages: vec![fp::Stage::default(); 100],
            path: String::new(),
            ..wire
        };
        let back = timeline(&stored_timeline(&long));
        assert_eq!(back.note.len(), StartTimeline::MAX_NOTE);
        assert_eq!(back.stages.len(), StartTimeline::MAX_STAGES);
        assert_eq!(
            back.path, "cold",
            "an empty path is the agent's default, cold"
        );
    }

    fn agent(
        id: &str,
        pool: &str,
        healthy: bool,
        used: u32,
        warm: usize,
    ) -> fsb_registry::state::AgentView {
        use fsb_core::{AgentId, ImageRef, NamespaceName, PoolName, SandboxId};
        let image = ImageRef::parse("image", "busybox").unwrap();
        fsb_registry::state::AgentView {
            info: fsb_registry::AgentInfo {
                id: AgentId::from(id),
                pool: PoolName::parse("pool", pool).unwrap(),
                namespace: NamespaceName::parse("ns", "ns").unwrap(),
                node: "n1".into(),
                capacity: std::num::NonZeroU32::new(4).unwrap(),
                images: Vec::new(),
                healthy,
                default_runtime: Runtime::Runc,
                warm: (0..warm)
                    .map(|_| fsb_registry::WarmInstance {
                        id: SandboxId::generate(),
                        image: image.clone(),
                        runtime: Runtime::Runc,
                    })
                    .collect(),
            },
            used,
            ports: Vec::new(),
            warm,
        }
    }

    #[test]
    fn usage_sums_pools_over_their_agents_and_filters() {
        let snapshot = RegistrySnapshot {
            agents: vec![
                agent("a1", "p", true, 1, 2),
                agent("a2", "p", false, 3, 1),
                agent("b1", "q", true, 0, 0),
            ],
            sandboxes: 4,
            requests: 4,
            metrics: Default::default(),
        };
        let all = usage(&snapshot, "", "");
        let ids: Vec<&str> = all.agents.iter().map(|a| a.agent_id.as_str()).collect();
        assert_eq!(ids, ["a1", "a2", "b1"]);
        assert_eq!(
            (
                all.agents[1].healthy,
                all.agents[1].slots_used,
                all.agents[1].slots_capacity,
                all.agents[1].warm_ready
            ),
            (false, 3, 4, 1)
        );
        let p = &all.pools[0];
        assert_eq!(p.pool_ref, "p");
        assert_eq!(
            (p.agents, p.healthy_agents, p.slots_used, p.slots_capacity),
            (2, 1, 4, 8)
        );
        assert_eq!(p.slots_free, 3, "free slots only on healthy agents");
        assert_eq!(p.warm_ready, 2, "warm instances only on healthy agents");
        assert_eq!(all.warm.len(), 1);
        assert_eq!(all.warm[0].ready, 2);
        let q = usage(&snapshot, "", "q");
        assert_eq!(q.agents.len(), 1);
        assert_eq!(q.pools.len(), 1);
        assert!(q.warm.is_empty());
        assert!(usage(&snapshot, "other", "").agents.is_empty());
    }
}
