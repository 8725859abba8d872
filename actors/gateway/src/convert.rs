//! Between the store's records and the wire (`fastpath.v1`).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fsb_core::spec::{FailurePolicy, Runtime, ValidSpec};
use fsb_proto::fastpath::v1 as fp;
use fsb_store::{Phase, StoredSandbox};

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
    }
}

/// A record as the API shows it. `recorded` is false while a FAST create's record is
/// still being written. Expired sandboxes show no agent and no sandbox id: their
/// container is gone.
pub fn sandbox(r: &StoredSandbox, recorded: bool, timeline: Option<fp::Timeline>) -> fp::Sandbox {
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
            timeline,
            exit_code: r.exit_code,
            recorded,
        }),
        create_time: Some(timestamp(r.created_ms)),
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
}
