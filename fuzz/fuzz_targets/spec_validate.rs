//! Spec validation: never panics, every rejection is InvalidArgument naming a field,
//! and an accepted spec keeps its invariants (ports sorted, unique, in range, never
//! the agent's; env names unique; bounded sizes; image normalized for good; the
//! stored form round-trips). Half the inputs run against tiny limits so the bounds
//! themselves are exercised. Also exec starts and label patches, and CRD-style JSON.
#![no_main]

use std::collections::BTreeMap;

use arbitrary::Arbitrary;
use fsb_core::spec::{
    EnvVar, ResourcesSpec, SandboxSpec, SpecError, SpecLimits, ValidSpec, validate_exec,
    validate_labels,
};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input {
    namespace: String,
    name: String,
    pool_ref: String,
    image: String,
    command: Vec<String>,
    args: Vec<String>,
    envs: Vec<(String, String)>,
    working_dir: String,
    exposed_ports: Vec<u32>,
    cpu: String,
    memory: String,
    pids: u32,
    runtime: String,
    failure_policy: String,
    recovery_timeout_seconds: u32,
    labels: Vec<(String, String)>,
    agent_port: Option<u16>,
    tiny_limits: bool,
    json: Vec<u8>,
}

fn limits(i: &Input) -> SpecLimits {
    let base = SpecLimits {
        agent_port: i.agent_port,
        ..SpecLimits::default()
    };
    if i.tiny_limits {
        SpecLimits {
            max_envs: 2,
            max_env_bytes: 16,
            max_argv: 3,
            max_argv_bytes: 16,
            max_ports: 3,
            max_labels: 2,
            max_pids: 100,
            ..base
        }
    } else {
        base
    }
}

fn check_error(e: &SpecError) {
    assert!(!e.field().is_empty(), "an error names its field: {e}");
    let status = fsb_core::error::to_status(e);
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status.message().starts_with(e.field()),
        "{}",
        status.message()
    );
}

fn check_valid(spec: &SandboxSpec, v: &ValidSpec, limits: &SpecLimits) {
    assert!(
        v.ports.windows(2).all(|w| w[0] < w[1]),
        "ports sorted and unique"
    );
    assert!(v.ports.len() <= limits.max_ports);
    assert!(
        v.ports
            .iter()
            .all(|p| p.get() != 0 && Some(p.get()) != limits.agent_port)
    );
    assert!(v.envs.len() <= limits.max_envs);
    let bytes: usize = v.envs.iter().map(|(n, val)| n.len() + val.len()).sum();
    assert!(bytes <= limits.max_env_bytes);
    let mut names: Vec<_> = v.envs.iter().map(|(n, _)| n).collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), v.envs.len(), "env names unique");
    assert!(v.command.len() + v.args.len() <= limits.max_argv);
    assert!(v.recovery_timeout_seconds >= 1);
    assert!(v.labels.len() <= limits.max_labels);
    if let Some(d) = &v.working_dir {
        assert!(d.starts_with('/') && !d.contains('\0'));
    }

    // The normalized image is a fixed point: same spec, same digest.
    let renormalized = SandboxSpec {
        image: v.image.as_str().to_owned(),
        ..spec.clone()
    };
    let again = renormalized
        .validate(limits)
        .expect("normalized spec validates");
    assert_eq!(again.digest(), v.digest());

    // What the store keeps reads back the same.
    let json = serde_json::to_vec(v).expect("serializes");
    let back: ValidSpec = serde_json::from_slice(&json).expect("stored spec reads back");
    assert_eq!(&back, v);
}

fn run(spec: &SandboxSpec, limits: &SpecLimits) {
    match spec.validate(limits) {
        Ok(v) => check_valid(spec, &v, limits),
        Err(e) => check_error(&e),
    }
}

fuzz_target!(|i: Input| {
    let limits = limits(&i);
    let envs: Vec<EnvVar> = i
        .envs
        .iter()
        .map(|(name, value)| EnvVar {
            name: name.clone(),
            value: value.clone(),
        })
        .collect();
    let labels: BTreeMap<String, String> = i.labels.iter().cloned().collect();
    let spec = SandboxSpec {
        namespace: i.namespace.clone(),
        name: i.name.clone(),
        pool_ref: i.pool_ref.clone(),
        image: i.image.clone(),
        command: i.command.clone(),
        args: i.args.clone(),
        envs: envs.clone(),
        working_dir: i.working_dir.clone(),
        exposed_ports: i.exposed_ports.clone(),
        resources: ResourcesSpec {
            cpu: i.cpu.clone(),
            memory: i.memory.clone(),
            pids: i.pids,
        },
        runtime: i.runtime.clone(),
        failure_policy: i.failure_policy.clone(),
        recovery_timeout_seconds: i.recovery_timeout_seconds,
        labels: labels.clone(),
    };
    run(&spec, &limits);

    if let Err(e) = validate_exec(&i.command, &envs, &i.working_dir, &limits) {
        check_error(&e);
    }
    match validate_labels(&labels, &limits) {
        Ok(l) => assert_eq!(l, labels),
        Err(e) => check_error(&e),
    }
    if let Ok(from_json) = serde_json::from_slice::<SandboxSpec>(&i.json) {
        run(&from_json, &limits);
    }
});
