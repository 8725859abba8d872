//! Placement, idempotency and release rules on the pure state.

mod common;

use common::*;
use fsb_core::{AgentId, spec::SpecDigest};
use fsb_registry::{
    AllocateOutcome, ConflictReason, ExhaustedReason, Placement, RegistryState, ReleaseOutcome,
};

fn allocated(out: AllocateOutcome) -> Placement {
    match out {
        AllocateOutcome::Allocated(p) => p,
        other => panic!("expected Allocated, got {other:?}"),
    }
}

#[test]
fn image_affinity_uses_normalized_references() {
    let mut r = RegistryState::new();
    r.report(report(agent("a", "default", "p", 10, &[]), &[]));
    r.report(report(
        agent(
            "b",
            "default",
            "p",
            10,
            &["docker.io/library/busybox:latest"],
        ),
        &[],
    ));
    // "a" is as loaded and sorts first, but only "b" has the image.
    let p = allocated(r.allocate(&req("r1", "default", "p", "busybox", &[])));
    assert_eq!(p.agent, AgentId::from("b"));
    assert!(p.image_cached);
    let p = allocated(r.allocate(&req("r2", "default", "p", "alpine", &[])));
    assert_eq!(p.agent, AgentId::from("a"), "no affinity: least loaded");
    assert!(!p.image_cached);
    r.verify().unwrap();
}

#[test]
fn least_loaded_then_stable_tie_break() {
    let mut r = RegistryState::new();
    for id in ["c", "a", "b"] {
        r.report(report(agent(id, "default", "p", 10, &[]), &[]));
    }
    let order: Vec<String> = (0..6)
        .map(|i| {
            allocated(r.allocate(&req(&format!("r{i}"), "default", "p", "busybox", &[])))
                .agent
                .to_string()
        })
        .collect();
    // Equal load: registration order decides, the same way every time.
    assert_eq!(order, ["c", "a", "b", "c", "a", "b"]);
}

#[test]
fn pools_serve_only_their_namespace() {
    let mut r = RegistryState::new();
    r.report(report(agent("a", "team-a", "shared", 10, &[]), &[]));
    assert_eq!(
        r.allocate(&req("r1", "team-b", "shared", "busybox", &[])),
        AllocateOutcome::Exhausted(ExhaustedReason::NoAgents)
    );
    allocated(r.allocate(&req("r2", "team-a", "shared", "busybox", &[])));
}

#[test]
fn same_port_lands_on_different_agents_then_exhausts() {
    let mut r = RegistryState::new();
    r.report(report(agent("a", "default", "p", 10, &[]), &[]));
    r.report(report(agent("b", "default", "p", 10, &[]), &[]));
    let first = allocated(r.allocate(&req("r1", "default", "p", "busybox", &[8080])));
    let second = allocated(r.allocate(&req("r2", "default", "p", "busybox", &[8080])));
    assert_ne!(first.agent, second.agent);
    assert_eq!(
        r.allocate(&req("r3", "default", "p", "busybox", &[9090, 8080])),
        AllocateOutcome::Exhausted(ExhaustedReason::PortsInUse)
    );
    allocated(r.allocate(&req("r4", "default", "p", "busybox", &[9090])));
    r.verify().unwrap();
}

#[test]
fn capacity_is_respected_and_released_slots_are_reused() {
    let mut r = RegistryState::new();
    r.report(report(agent("a", "default", "p", 2, &[]), &[]));
    let one = allocated(r.allocate(&req("r1", "default", "p", "busybox", &[])));
    allocated(r.allocate(&req("r2", "default", "p", "busybox", &[])));
    assert_eq!(
        r.allocate(&req("r3", "default", "p", "busybox", &[])),
        AllocateOutcome::Exhausted(ExhaustedReason::NoFreeSlot)
    );
    assert_eq!(
        r.release(&one.sandbox_id, &one.agent),
        ReleaseOutcome::Released
    );
    allocated(r.allocate(&req("r3", "default", "p", "busybox", &[])));
    r.verify().unwrap();
}

#[test]
fn unhealthy_agents_get_nothing() {
    let mut r = RegistryState::new();
    let mut info = agent("a", "default", "p", 2, &[]);
    info.healthy = false;
    r.report(report(info.clone(), &[]));
    assert_eq!(
        r.allocate(&req("r1", "default", "p", "busybox", &[])),
        AllocateOutcome::Exhausted(ExhaustedReason::NoHealthyAgent)
    );
    info.healthy = true;
    r.report(report(info, &[]));
    allocated(r.allocate(&req("r1", "default", "p", "busybox", &[])));
}

#[test]
fn request_ids_replay_or_conflict() {
    let mut r = RegistryState::new();
    r.report(report(agent("a", "default", "p", 5, &[]), &[]));
    let first_req = req("same", "default", "p", "busybox", &[80]);
    let first = allocated(r.allocate(&first_req));

    let mut retry = req("same", "default", "p", "busybox", &[80]);
    assert_ne!(
        retry.sandbox_id, first.sandbox_id,
        "a retry may carry a new sandbox id"
    );
    match r.allocate(&retry) {
        AllocateOutcome::AlreadyYours(p) => assert_eq!(p, first),
        other => panic!("expected AlreadyYours, got {other:?}"),
    }
    retry.digest = SpecDigest([2; 32]);
    assert_eq!(
        r.allocate(&retry),
        AllocateOutcome::Conflict(ConflictReason::RequestIdReused {
            existing: first.sandbox_id.clone()
        })
    );
    let mut stolen = req("other", "default", "p", "busybox", &[]);
    stolen.sandbox_id = first.sandbox_id.clone();
    assert_eq!(
        r.allocate(&stolen),
        AllocateOutcome::Conflict(ConflictReason::SandboxIdInUse)
    );
    assert_eq!(
        r.snapshot().sandboxes,
        1,
        "replays and conflicts take no slot"
    );
    let err = r.allocate(&retry).into_result(&retry).unwrap_err();
    assert_eq!(
        fsb_core::error::to_status(&err).code(),
        tonic::Code::AlreadyExists
    );
}

#[test]
fn release_checks_owner_and_is_idempotent() {
    let mut r = RegistryState::new();
    r.report(report(agent("a", "default", "p", 5, &[]), &[]));
    r.report(report(agent("b", "default", "p", 5, &[]), &[]));
    let p = allocated(r.allocate(&req("r1", "default", "p", "busybox", &[80])));
    let other = if p.agent == AgentId::from("a") {
        AgentId::from("b")
    } else {
        AgentId::from("a")
    };

    assert_eq!(
        r.release(&p.sandbox_id, &other),
        ReleaseOutcome::NotOwner {
            owner: p.agent.clone()
        }
    );
    assert_eq!(r.snapshot().sandboxes, 1, "a refused release frees nothing");
    assert_eq!(r.release(&p.sandbox_id, &p.agent), ReleaseOutcome::Released);
    assert_eq!(
        r.release(&p.sandbox_id, &p.agent),
        ReleaseOutcome::AlreadyReleased
    );
    let m = r.metrics();
    assert_eq!(
        (m.released, m.release_not_owner, m.release_unknown),
        (1, 1, 1)
    );
    // The request id is forgotten with the sandbox: the port is free, the id reusable.
    allocated(r.allocate(&req("r1", "default", "p", "busybox", &[80])));
    r.verify().unwrap();
}

#[test]
fn reports_confirm_finish_adopt_and_keep_in_flight() {
    let mut r = RegistryState::new();
    let info = agent("a", "default", "p", 3, &[]);
    r.report(report(info.clone(), &[]));
    let done = allocated(r.allocate(&req("r1", "default", "p", "busybox", &[80])));
    let flying = allocated(r.allocate(&req("r2", "default", "p", "busybox", &[81])));
    let stranger = fsb_core::SandboxId::generate();

    // The agent holds `done` and a sandbox we never allocated; `flying` is in flight.
    let out = r.report(report(
        info.clone(),
        &[(&done.sandbox_id, &[80]), (&stranger, &[90])],
    ));
    assert_eq!(out.adopted, vec![stranger.clone()]);
    assert!(out.finished.is_empty() && out.evicted.is_empty());
    assert_eq!(r.snapshot().sandboxes, 3);

    // `done` exited: the next report lacks it, so its slot and port come back.
    let out = r.report(report(info, &[(&stranger, &[90])]));
    assert_eq!(out.finished, vec![done.sandbox_id.clone()]);
    assert_eq!(
        r.owner_of(&flying.sandbox_id),
        Some(&AgentId::from("a")),
        "in flight survives"
    );
    allocated(r.allocate(&req("r3", "default", "p", "busybox", &[80])));
    r.verify().unwrap();
}

#[test]
fn reported_reality_evicts_clashing_in_flight_allocations() {
    let mut r = RegistryState::new();
    let info = agent("a", "default", "p", 2, &[]);
    r.report(report(info.clone(), &[]));
    let flying = allocated(r.allocate(&req("r1", "default", "p", "busybox", &[80])));
    let stranger = fsb_core::SandboxId::generate();
    let out = r.report(report(info, &[(&stranger, &[80])]));
    assert_eq!(out.evicted, vec![flying.sandbox_id.clone()]);
    assert_eq!(r.owner_of(&flying.sandbox_id), None);
    r.verify().unwrap();
}

#[test]
fn a_lost_agent_returns_its_sandboxes_and_leaves_nothing() {
    let mut r = RegistryState::new();
    r.report(report(agent("a", "default", "p", 3, &[]), &[]));
    let mut held: Vec<_> = (0..3)
        .map(|i| {
            allocated(r.allocate(&req(&format!("r{i}"), "default", "p", "busybox", &[]))).sandbox_id
        })
        .collect();
    held.sort();
    assert_eq!(r.agent_lost(&AgentId::from("a")), held);
    let snap = r.snapshot();
    assert_eq!(
        (snap.agents.len(), snap.sandboxes, snap.requests),
        (0, 0, 0)
    );
    assert!(
        r.agent_lost(&AgentId::from("a")).is_empty(),
        "losing it twice is a no-op"
    );
    r.verify().unwrap();
}

/// Seed-review item 14: 100,000 create/delete cycles leave the registry's size flat.
#[test]
fn finished_sandboxes_leave_no_records() {
    let mut r = RegistryState::new();
    for i in 0..4 {
        r.report(report(
            agent(&format!("a{i}"), "default", "p", 8, &["busybox"]),
            &[],
        ));
    }
    let before = r.snapshot();
    for i in 0..100_000u32 {
        let p = allocated(r.allocate(&req(
            &format!("req-{i}"),
            "default",
            "p",
            "busybox",
            &[1 + i % 1000],
        )));
        assert_eq!(r.release(&p.sandbox_id, &p.agent), ReleaseOutcome::Released);
    }
    let after = r.snapshot();
    assert_eq!((after.sandboxes, after.requests), (0, 0));
    assert_eq!(
        after.agents, before.agents,
        "agents back to their idle view"
    );
    r.verify().unwrap();
}
