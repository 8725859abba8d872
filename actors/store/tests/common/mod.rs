//! Record builders shared by the store tests.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::collections::BTreeMap;

use fsb_core::{NamespaceName, RequestId, SandboxId, SandboxName, SandboxSpec, spec::SpecLimits};
use fsb_store::{Phase, StoredSandbox};

pub fn record(ns: &str, name: &str, request_id: Option<&str>) -> StoredSandbox {
    let spec = SandboxSpec {
        namespace: ns.into(),
        name: name.into(),
        pool_ref: "default".into(),
        image: "busybox".into(),
        ..Default::default()
    }
    .validate(&SpecLimits::default())
    .expect("valid spec");
    StoredSandbox {
        namespace: NamespaceName::parse("ns", ns).unwrap(),
        name: SandboxName::parse("name", name).unwrap(),
        uid: format!("uid-{ns}-{name}"),
        sandbox_id: SandboxId::generate(),
        request_id: request_id.map(|r| RequestId::parse("request_id", r).unwrap()),
        spec_digest: spec.digest(),
        spec,
        labels: BTreeMap::from([("app".to_string(), name.to_string())]),
        phase: Phase::Pending,
        agent: None,
        node: None,
        exit_code: None,
        expire_time_ms: None,
        reset_revision: 0,
        accepted_reset_revision: 0,
        timeline: None,
        created_ms: 1_700_000_000_000,
        resource_version: 0,
    }
}
