//! `agent.v1` requests checked and turned into what the agent's actors take. Every
//! field is checked here, at the agent's trust boundary, with the same bounds the
//! gateway applies: a sandbox id is 32 hex characters (no path can be built from
//! anything else), a spec passes `SandboxSpec::validate`, an exec start passes
//! [`validate_exec`], a grace period is bounded. Pure, so it is fuzzed
//! (`fuzz/fuzz_targets/agent_request.rs`).

use std::time::Duration;

use fsb_core::{
    SandboxId,
    error::to_status,
    spec::{SpecError, SpecLimits, validate_exec, validate_grace},
};
use fsb_proto::agent::v1::{
    CreateSandboxRequest, DeleteSandboxRequest, ExecStart, LogsRequest, StatsRequest,
};
use tonic::Status;

use crate::{CreateSandbox, exec};

/// A create: the id, the validated spec, and the labels it keeps.
pub fn create(req: CreateSandboxRequest, limits: &SpecLimits) -> Result<CreateSandbox, Status> {
    let id = SandboxId::parse("sandbox_id", &req.sandbox_id).map_err(|e| to_status(&e))?;
    let runtime = req.runtime();
    let Some(spec) = req.spec else {
        return Err(Status::invalid_argument("spec: required"));
    };
    let spec = crate::server::core_spec(&req.namespace, &req.name, spec, runtime)
        .validate(limits)
        .map_err(|e| to_status(&e))?;
    // Kept as container labels: bounded like the names they come next to.
    for (field, value) in [
        ("claim_uid", &req.claim_uid),
        ("request_id", &req.request_id),
    ] {
        if value.len() > 128 || value.contains('\0') {
            let e = SpecError::new(field, "must be at most 128 bytes without NUL");
            return Err(to_status(&e));
        }
    }
    Ok(CreateSandbox {
        id,
        namespace: req.namespace,
        name: req.name,
        claim_uid: req.claim_uid,
        request_id: req.request_id,
        spec,
    })
}

/// An exec's first message: the sandbox and the process to run in it.
pub fn exec_start(
    start: ExecStart,
    limits: &SpecLimits,
) -> Result<(SandboxId, exec::ExecRequest), Status> {
    let id = SandboxId::parse("start.sandbox_id", &start.sandbox_id).map_err(|e| to_status(&e))?;
    let envs: Vec<_> = start
        .envs
        .into_iter()
        .map(|e| fsb_core::spec::EnvVar {
            name: e.name,
            value: e.value,
        })
        .collect();
    validate_exec(&start.command, &envs, &start.working_dir, limits).map_err(|e| to_status(&e))?;
    Ok((
        id,
        exec::ExecRequest {
            args: start.command,
            env: envs
                .into_iter()
                .map(|e| format!("{}={}", e.name, e.value))
                .collect(),
            cwd: (!start.working_dir.is_empty()).then_some(start.working_dir),
            tty: start.tty,
            stdin: start.stdin,
            timeout: None,
        },
    ))
}

/// A delete: the sandbox and its grace period (`None`: the agent's default).
pub fn delete(
    req: &DeleteSandboxRequest,
    limits: &SpecLimits,
) -> Result<(SandboxId, Option<Duration>), Status> {
    let id = SandboxId::parse("sandbox_id", &req.sandbox_id).map_err(|e| to_status(&e))?;
    validate_grace("grace_period_seconds", req.grace_period_seconds, limits)
        .map_err(|e| to_status(&e))?;
    Ok((
        id,
        req.grace_period_seconds
            .map(|s| Duration::from_secs(u64::from(s))),
    ))
}

/// The sandbox whose logs are read (its id names the log directory).
pub fn logs(req: &LogsRequest) -> Result<SandboxId, Status> {
    SandboxId::parse("sandbox_id", &req.sandbox_id).map_err(|e| to_status(&e))
}

/// The sandboxes whose counters are read (empty: all).
pub fn stats(req: &StatsRequest) -> Result<Vec<SandboxId>, Status> {
    req.sandbox_ids
        .iter()
        .enumerate()
        .map(|(i, s)| SandboxId::parse(&format!("sandbox_ids[{i}]"), s).map_err(|e| to_status(&e)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use fsb_proto::fastpath::v1 as fp;

    fn spec() -> fp::SandboxSpec {
        fp::SandboxSpec {
            pool_ref: "default".into(),
            image: "busybox".into(),
            ..Default::default()
        }
    }

    fn id() -> String {
        SandboxId::generate().to_string()
    }

    #[test]
    fn every_bad_field_is_named() {
        let limits = SpecLimits::default();
        let create_with = |edit: fn(&mut CreateSandboxRequest)| {
            let mut req = CreateSandboxRequest {
                sandbox_id: id(),
                namespace: "default".into(),
                name: "a".into(),
                spec: Some(spec()),
                ..Default::default()
            };
            edit(&mut req);
            create(req, &limits).map(|_| ()).unwrap_err()
        };
        let cases = [
            (
                "sandbox_id",
                create_with(|r| r.sandbox_id = "../../etc".into()),
            ),
            ("metadata.name", create_with(|r| r.name = "../x".into())),
            ("spec: required", create_with(|r| r.spec = None)),
            (
                "request_id",
                create_with(|r| r.request_id = "r".repeat(200)),
            ),
            (
                "spec.exposedPorts",
                create_with(|r| {
                    if let Some(s) = r.spec.as_mut() {
                        s.exposed_ports = (1..=10_000).collect();
                    }
                }),
            ),
            (
                "start.working_dir",
                exec_start(
                    ExecStart {
                        sandbox_id: id(),
                        command: vec!["sh".into()],
                        working_dir: "../..".into(),
                        ..Default::default()
                    },
                    &limits,
                )
                .map(|_| ())
                .unwrap_err(),
            ),
            (
                "start.sandbox_id",
                exec_start(
                    ExecStart {
                        sandbox_id: "../../x".into(),
                        command: vec!["sh".into()],
                        ..Default::default()
                    },
                    &limits,
                )
                .map(|_| ())
                .unwrap_err(),
            ),
            (
                "grace_period_seconds",
                delete(
                    &DeleteSandboxRequest {
                        sandbox_id: id(),
                        grace_period_seconds: Some(u32::MAX),
                    },
                    &limits,
                )
                .map(|_| ())
                .unwrap_err(),
            ),
            (
                "sandbox_ids[1]",
                stats(&StatsRequest {
                    sandbox_ids: vec![id(), "..".into()],
                })
                .map(|_| ())
                .unwrap_err(),
            ),
        ];
        for (field, status) in cases {
            assert_eq!(status.code(), tonic::Code::InvalidArgument, "{field}");
            assert!(
                status.message().starts_with(field),
                "{field}: {}",
                status.message()
            );
        }
    }

    #[test]
    fn a_good_exec_keeps_its_env_order() {
        let (_, req) = exec_start(
            ExecStart {
                sandbox_id: id(),
                command: vec!["env".into()],
                envs: vec![
                    fp::EnvVar {
                        name: "B".into(),
                        value: "2".into(),
                    },
                    fp::EnvVar {
                        name: "A".into(),
                        value: "1=x".into(),
                    },
                ],
                working_dir: "/tmp".into(),
                ..Default::default()
            },
            &SpecLimits::default(),
        )
        .unwrap();
        assert_eq!(req.env, vec!["B=2".to_string(), "A=1=x".to_string()]);
        assert_eq!(req.cwd.as_deref(), Some("/tmp"));
    }
}
