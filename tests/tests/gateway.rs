//! Scenario tests of the fast-path gateway (`fastpath.v1` over gRPC) against the real
//! containerd of `tests/run.sh containerd`: a real agent, the registry actor, a SQLite
//! store and the tonic server with its token check (see `fsb_tests::gateway`).
//!
//! Each test has its own agent id, namespace, store and registry, so the tests run in
//! parallel on the shared containerd; each removes what it made and then asserts that
//! no container of its agent, no record, no registry allocation and no unwritten FAST
//! record is left. No fixed sleeps: Watch streams, or polling with a deadline.
//!
//! One fake: `FlakyStore` (test 12) wraps the real SQLite store at the `SandboxStore`
//! seam and fails its first N creates, to inject the record-write failures of
//! seed-review item 4. Everything else is real.

#![allow(clippy::unwrap_used)] // helpers below are test code too

use std::{
    collections::BTreeMap,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use fsb_agent::CreateSandbox;
use fsb_core::{
    NamespaceName, RequestId, SandboxId, SandboxName,
    spec::{SandboxSpec, SpecLimits},
};
use fsb_gateway::{LABEL_ADOPTED, ReconcileReport};
use fsb_proto::fastpath::v1 as fp;
use fsb_store::{
    ListFilter, Phase, SandboxStore, SqliteStore, StoreError, StoreEvent, StoredSandbox,
};
use fsb_tests::{
    GatewayFixture, GatewayParts, Leftovers, gateway::Client, gateway::POOL, unique_id, wait_until,
};
use futures::StreamExt;
use tonic::{Code, Status};

const DEADLINE: Duration = Duration::from_secs(30);

// ---- helpers ---------------------------------------------------------------------

/// A namespace unique to this test run.
fn namespace(test: &str) -> String {
    format!("{test}-{}", &unique_id()[..6])
}

/// A spec running `sh -c script` from the test image in the fixture's pool.
fn shell(fx: &GatewayFixture<impl SandboxStore>, script: &str) -> fp::SandboxSpec {
    command(fx, &["sh", "-c", script])
}

fn command(fx: &GatewayFixture<impl SandboxStore>, argv: &[&str]) -> fp::SandboxSpec {
    fp::SandboxSpec {
        pool_ref: POOL.into(),
        image: fx.parts.env.image.clone(),
        command: argv.iter().map(|s| s.to_string()).collect(),
        ..fp::SandboxSpec::default()
    }
}

/// A create request with a fresh request id.
fn create(ns: &str, name: &str, spec: fp::SandboxSpec) -> fp::CreateRequest {
    fp::CreateRequest {
        request_id: unique_id(),
        namespace: ns.into(),
        name: name.into(),
        spec: Some(spec),
        ..fp::CreateRequest::default()
    }
}

fn status(s: &fp::Sandbox) -> &fp::SandboxStatus {
    s.status.as_ref().expect("a sandbox has a status")
}

fn phase(s: &fp::Sandbox) -> fp::Phase {
    status(s).phase()
}

async fn get(c: &mut Client, ns: &str, name: &str) -> Result<fp::Sandbox, Status> {
    c.get(fp::GetRequest {
        namespace: ns.into(),
        name: name.into(),
    })
    .await
    .map(tonic::Response::into_inner)
}

async fn delete(c: &mut Client, ns: &str, name: &str, grace: Option<u32>) -> Result<(), Status> {
    c.delete(fp::DeleteRequest {
        namespace: ns.into(),
        name: name.into(),
        grace_period_seconds: grace,
    })
    .await
    .map(|_| ())
}

/// Poll Get until `ok` holds.
async fn wait_for(
    c: &Client,
    ns: &str,
    name: &str,
    what: &str,
    ok: impl Fn(&fp::Sandbox) -> bool,
) -> fp::Sandbox {
    wait_until(what, DEADLINE, || {
        let mut c = c.clone();
        let ok = &ok;
        async move {
            let s = get(&mut c, ns, name).await?;
            Ok(ok(&s).then_some(s))
        }
    })
    .await
    .unwrap()
}

/// The whole log (stdout then stderr chunks as they come), not following.
async fn logs(c: &mut Client, ns: &str, name: &str) -> anyhow::Result<String> {
    let mut stream = c
        .logs(fp::LogsRequest {
            namespace: ns.into(),
            name: name.into(),
            follow: false,
            tail_lines: 0,
        })
        .await?
        .into_inner();
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        out.extend_from_slice(&chunk?.data);
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// Poll the logs until `needle` shows; returns them.
async fn wait_log(c: &Client, ns: &str, name: &str, needle: &str) -> String {
    wait_until(
        &format!("{needle:?} in the log of {name}"),
        DEADLINE,
        || {
            let mut c = c.clone();
            async move {
                let text = logs(&mut c, ns, name).await?;
                Ok(text.contains(needle).then_some(text))
            }
        },
    )
    .await
    .unwrap()
}

fn assert_code<T: std::fmt::Debug>(r: Result<T, Status>, code: Code, mention: &str) -> Status {
    let e = r.expect_err(&format!("expected {code:?} mentioning {mention:?}"));
    assert_eq!(e.code(), code, "{e:?}");
    assert!(
        e.message().contains(mention),
        "message {:?} should name {mention:?}",
        e.message()
    );
    e
}

/// Until a create of `name` with a fresh request id succeeds: proves that whatever
/// held the name before (a cancelled create, its cleanup) has finished. Returns the
/// new sandbox.
async fn create_when_free(c: &Client, ns: &str, name: &str, spec: &fp::SandboxSpec) -> fp::Sandbox {
    wait_until(
        &format!("{ns}/{name} to be creatable again"),
        DEADLINE,
        || {
            let mut c = c.clone();
            let req = create(ns, name, spec.clone());
            async move {
                match c.create(req).await {
                    Ok(r) => Ok(r.into_inner().sandbox),
                    // Held (busy) or still recorded (its cleanup not done yet).
                    Err(s) if matches!(s.code(), Code::Unavailable | Code::AlreadyExists) => {
                        Err(anyhow::anyhow!("{s:?}"))
                    }
                    Err(s) => panic!("unexpected {s:?}"),
                }
            }
        },
    )
    .await
    .unwrap()
}

// ---- 1. FAST create ----------------------------------------------------------------

#[actix_rt::test]
async fn fast_create_runs_is_recorded_and_deletes() {
    let fx = GatewayFixture::start("gw-fast", 4).await.unwrap();
    let mut c = fx.client().await.unwrap();
    let ns = namespace("fast");
    let mut spec = shell(&fx, "echo \"$GREETING from $(pwd)\"; sleep 600");
    spec.envs = vec![fp::EnvVar {
        name: "GREETING".into(),
        value: "hello".into(),
    }];
    spec.working_dir = "/work/not/yet/there".into();

    let resp = c
        .create(create(&ns, "greeter", spec))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.mode(), fp::ConsistencyMode::Fast, "server default");
    assert!(!resp.replayed);
    let sandbox = resp.sandbox.unwrap();
    assert_eq!(phase(&sandbox), fp::Phase::Running);
    assert!(!status(&sandbox).sandbox_id.is_empty());
    assert_eq!(status(&sandbox).assigned_agent, fx.parts.agent_id.as_str());
    let stages: Vec<String> = resp
        .timeline
        .unwrap()
        .stages
        .into_iter()
        .map(|s| s.name)
        .filter(|n| !n.starts_with("runtime."))
        .collect();
    assert_eq!(stages, ["validate", "allocate", "agent", "runtime"]);

    let got = wait_for(&c, &ns, "greeter", "the FAST record to land", |s| {
        status(s).recorded
    })
    .await;
    assert_eq!(phase(&got), fp::Phase::Running);
    assert_eq!(got.uid, sandbox.uid);
    let log = wait_log(&c, &ns, "greeter", "hello from").await;
    assert_eq!(
        log.trim(),
        "hello from /work/not/yet/there",
        "env and the created working directory reach the process"
    );

    delete(&mut c, &ns, "greeter", Some(0)).await.unwrap();
    assert_code(get(&mut c, &ns, "greeter").await, Code::NotFound, "greeter");
    assert_code(
        delete(&mut c, &ns, "greeter", Some(0)).await,
        Code::NotFound,
        "greeter",
    );
    fx.assert_nothing_left().await.unwrap();
}

// ---- 2. STRONG -----------------------------------------------------------------

#[actix_rt::test]
async fn strong_create_is_recorded_when_it_returns() {
    let fx = GatewayFixture::start("gw-strong", 2).await.unwrap();
    let mut c = fx.client().await.unwrap();
    let ns = namespace("strong");
    let mut req = create(&ns, "durable", shell(&fx, "sleep 600"));
    req.set_mode(fp::ConsistencyMode::Strong);
    let resp = c.create(req).await.unwrap().into_inner();
    // Straight from the store, before anything else runs.
    let rec = fx
        .gateway
        .store()
        .get(
            &NamespaceName::parse("ns", &ns).unwrap(),
            &SandboxName::parse("name", "durable").unwrap(),
        )
        .await
        .unwrap()
        .expect("recorded when Create returned");
    assert_eq!(rec.phase, Phase::Running);
    assert_eq!(resp.mode(), fp::ConsistencyMode::Strong);
    let sandbox = resp.sandbox.unwrap();
    assert!(status(&sandbox).recorded);
    assert_eq!(rec.sandbox_id.as_str(), status(&sandbox).sandbox_id);
    assert_eq!(rec.uid, sandbox.uid);

    delete(&mut c, &ns, "durable", Some(0)).await.unwrap();
    fx.assert_nothing_left().await.unwrap();
}

// ---- 3. idempotency ------------------------------------------------------------

#[actix_rt::test]
async fn request_ids_replay_and_concurrent_duplicates_make_one_sandbox() {
    let fx = GatewayFixture::start("gw-idem", 8).await.unwrap();
    let mut c = fx.client().await.unwrap();
    let ns = namespace("idem");
    let req = create(&ns, "once", shell(&fx, "sleep 600"));
    let first = c.create(req.clone()).await.unwrap().into_inner();
    let again = c.create(req.clone()).await.unwrap().into_inner();
    assert!(!first.replayed);
    assert!(again.replayed);
    let (a, b) = (first.sandbox.unwrap(), again.sandbox.unwrap());
    assert_eq!((&a.uid, &a.name), (&b.uid, &b.name));
    assert_eq!(status(&a).sandbox_id, status(&b).sandbox_id);
    assert_eq!(fx.containers().await.unwrap().len(), 1);

    // Same request id, another spec.
    let mut other = req.clone();
    other.spec = Some(shell(&fx, "sleep 601"));
    assert_code(c.create(other).await, Code::AlreadyExists, "request_id");
    // ... also once the record has landed (answered from the store).
    wait_for(&c, &ns, "once", "the record to land", |s| {
        status(s).recorded
    })
    .await;
    assert!(c.create(req.clone()).await.unwrap().into_inner().replayed);
    let mut other = req.clone();
    other.spec = Some(shell(&fx, "sleep 601"));
    assert_code(c.create(other).await, Code::AlreadyExists, "request_id");
    assert_eq!(fx.containers().await.unwrap().len(), 1);

    // Ten identical creates at once.
    let req = create(&ns, "racer", shell(&fx, "sleep 600"));
    let results = futures::future::join_all((0..10).map(|_| {
        let mut c = c.clone();
        let req = req.clone();
        async move { c.create(req).await.map(tonic::Response::into_inner) }
    }))
    .await;
    let answers: Vec<fp::CreateResponse> = results
        .into_iter()
        .map(|r| r.expect("every duplicate is answered"))
        .collect();
    assert_eq!(answers.iter().filter(|r| !r.replayed).count(), 1);
    let uids: std::collections::HashSet<&str> = answers
        .iter()
        .map(|r| r.sandbox.as_ref().unwrap().uid.as_str())
        .collect();
    assert_eq!(uids.len(), 1, "one sandbox for ten duplicates");
    assert_eq!(fx.containers().await.unwrap().len(), 2);

    delete(&mut c, &ns, "once", Some(0)).await.unwrap();
    delete(&mut c, &ns, "racer", Some(0)).await.unwrap();
    fx.assert_nothing_left().await.unwrap();
}

// ---- 4. bad input ----------------------------------------------------------------

#[actix_rt::test]
async fn bad_requests_are_refused_and_leave_nothing() {
    let fx = GatewayFixture::start("gw-bad", 4).await.unwrap();
    let mut c = fx.client().await.unwrap();
    let ns = namespace("bad");
    let ok = || shell(&fx, "sleep 600");

    let mut r = create(&ns, "a", ok());
    r.request_id.clear();
    assert_code(c.create(r).await, Code::InvalidArgument, "request_id");

    let mut s = ok();
    s.image.clear();
    assert_code(
        c.create(create(&ns, "a", s)).await,
        Code::InvalidArgument,
        "image",
    );

    assert_code(
        c.create(create(&ns, "Bad_Name", ok())).await,
        Code::InvalidArgument,
        "name",
    );

    for port in [0, 65536] {
        let mut s = ok();
        s.exposed_ports = vec![port];
        assert_code(
            c.create(create(&ns, "a", s)).await,
            Code::InvalidArgument,
            "spec.exposedPorts[0]",
        );
    }
    let mut s = ok();
    s.exposed_ports = vec![u32::from(fx.parts.port)];
    let e = assert_code(
        c.create(create(&ns, "a", s)).await,
        Code::InvalidArgument,
        "spec.exposedPorts[0]",
    );
    assert!(e.message().contains("agent"), "{e:?}");

    let mut s = ok();
    s.pool_ref = "no-such-pool".into();
    assert_code(
        c.create(create(&ns, "a", s)).await,
        Code::FailedPrecondition,
        "no-such-pool",
    );

    let mut s = ok();
    s.envs = vec![fp::EnvVar {
        name: "BIG".into(),
        value: "x".repeat(1 << 20),
    }];
    assert_code(
        c.create(create(&ns, "a", s)).await,
        Code::InvalidArgument,
        "spec.envs",
    );

    // Over the server's 4 MiB message limit: refused by tonic before the gateway.
    let mut s = ok();
    s.envs = vec![fp::EnvVar {
        name: "HUGE".into(),
        value: "x".repeat(5 << 20),
    }];
    let e = c.create(create(&ns, "a", s)).await.unwrap_err();
    assert_ne!(e.code(), Code::Ok);

    // Authentication.
    let mut anonymous = fx.client_with(None).await.unwrap();
    assert_code(
        anonymous.create(create(&ns, "a", ok())).await,
        Code::Unauthenticated,
        "authorization",
    );
    assert_code(
        get(&mut anonymous, &ns, "a").await,
        Code::Unauthenticated,
        "authorization",
    );
    let mut wrong = fx.client_with(Some("not-the-token")).await.unwrap();
    assert_code(
        wrong.create(create(&ns, "a", ok())).await,
        Code::Unauthenticated,
        "token",
    );

    // Nothing was made by any of them.
    assert_eq!(fx.leftovers().await.unwrap(), Leftovers::default());
    assert_code(get(&mut c, &ns, "a").await, Code::NotFound, "a");

    // Port 65535 is fine.
    let mut s = ok();
    s.exposed_ports = vec![65535];
    c.create(create(&ns, "top-port", s)).await.unwrap();
    delete(&mut c, &ns, "top-port", Some(0)).await.unwrap();
    fx.assert_nothing_left().await.unwrap();
}

// ---- 5. same-name recreate -----------------------------------------------------

#[actix_rt::test]
async fn same_name_recreated_three_times_leaves_no_snapshot_or_container() {
    let fx = GatewayFixture::start("gw-again", 2).await.unwrap();
    let mut c = fx.client().await.unwrap();
    let ns = namespace("again");
    let mut seen = Vec::new();
    for _ in 0..3 {
        let resp = c
            .create(create(&ns, "again", shell(&fx, "sleep 600")))
            .await
            .unwrap()
            .into_inner();
        let id = status(resp.sandbox.as_ref().unwrap()).sandbox_id.clone();
        assert!(!seen.contains(&id), "a new sandbox id each time");
        assert!(fx.snapshot_exists(&id).await.unwrap());
        delete(&mut c, &ns, "again", Some(0)).await.unwrap();
        assert!(
            fx.containers().await.unwrap().is_empty(),
            "container of {id} left"
        );
        assert!(
            !fx.snapshot_exists(&id).await.unwrap(),
            "snapshot {id} left"
        );
        seen.push(id);
    }
    fx.assert_nothing_left().await.unwrap();
}

// ---- 6. expiry -------------------------------------------------------------------

#[actix_rt::test]
async fn a_sandbox_expires_its_record_stays_and_can_be_deleted() {
    let fx = GatewayFixture::start("gw-expire", 2).await.unwrap();
    let mut c = fx.client().await.unwrap();
    let ns = namespace("expire");
    let mut req = create(&ns, "short", shell(&fx, "sleep 600"));
    req.ttl = Some(prost_types::Duration {
        seconds: 2,
        nanos: 0,
    });
    let created = c.create(req).await.unwrap().into_inner().sandbox.unwrap();
    assert!(created.spec.as_ref().unwrap().expire_time.is_some());
    let expired = wait_for(&c, &ns, "short", "phase Expired", |s| {
        phase(s) == fp::Phase::Expired
    })
    .await;
    let st = status(&expired);
    assert!(st.sandbox_id.is_empty(), "{st:?}");
    assert!(st.assigned_agent.is_empty(), "{st:?}");
    assert!(st.endpoints.is_empty());
    assert!(fx.containers().await.unwrap().is_empty(), "container gone");
    assert_eq!(fx.parts.registry.snapshot().await.unwrap().sandboxes, 0);

    delete(&mut c, &ns, "short", None).await.unwrap();
    assert_code(get(&mut c, &ns, "short").await, Code::NotFound, "short");
    fx.assert_nothing_left().await.unwrap();
}

// ---- 7. reset --------------------------------------------------------------------

#[actix_rt::test]
async fn reset_restarts_the_process_in_the_same_sandbox() {
    let fx = GatewayFixture::start("gw-reset", 2).await.unwrap();
    let mut c = fx.client().await.unwrap();
    let ns = namespace("reset");
    let created = c
        .create(create(
            &ns,
            "phoenix",
            shell(
                &fx,
                "echo boot-$(cat /proc/sys/kernel/random/uuid); sleep 600",
            ),
        ))
        .await
        .unwrap()
        .into_inner()
        .sandbox
        .unwrap();
    let id = status(&created).sandbox_id.clone();
    let first_log = wait_log(&c, &ns, "phoenix", "boot-").await;
    let pid =
        |inv: &[fsb_agent::SandboxRecord]| inv.iter().find(|r| r.id.as_str() == id).map(|r| r.pid);
    let first_pid = pid(&fx.parts.agent.inventory().await.unwrap()).unwrap();

    c.update(fp::UpdateRequest {
        namespace: ns.clone(),
        name: "phoenix".into(),
        reset_revision: Some(1),
        ..fp::UpdateRequest::default()
    })
    .await
    .unwrap();
    let after = wait_for(&c, &ns, "phoenix", "the reset to be accepted", |s| {
        status(s).accepted_reset_revision == 1 && phase(s) == fp::Phase::Running
    })
    .await;
    assert_eq!(status(&after).sandbox_id, id, "same sandbox");
    let second_log = wait_until("a new boot line", DEADLINE, || {
        let mut c = c.clone();
        let (ns, first) = (&ns, &first_log);
        async move {
            let text = logs(&mut c, ns, "phoenix").await?;
            Ok((text.contains("boot-") && text != *first).then_some(text))
        }
    })
    .await
    .unwrap();
    assert_ne!(first_log.trim(), second_log.trim());
    let second_pid = pid(&fx.parts.agent.inventory().await.unwrap()).unwrap();
    assert_ne!(first_pid, second_pid, "the process ran again");
    assert_eq!(fx.containers().await.unwrap().len(), 1);

    delete(&mut c, &ns, "phoenix", Some(0)).await.unwrap();
    fx.assert_nothing_left().await.unwrap();
}

// ---- 8. logs, following --------------------------------------------------------

#[actix_rt::test]
async fn followed_logs_show_both_lines_in_order() {
    let fx = GatewayFixture::start("gw-logs", 2).await.unwrap();
    let mut c = fx.client().await.unwrap();
    let ns = namespace("logs");
    c.create(create(
        &ns,
        "talker",
        shell(&fx, "echo Log-Line-1; sleep 1; echo Log-Line-2"),
    ))
    .await
    .unwrap();
    let mut stream = c
        .logs(fp::LogsRequest {
            namespace: ns.clone(),
            name: "talker".into(),
            follow: true,
            tail_lines: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let text = tokio::time::timeout(DEADLINE, async {
        let mut out = Vec::new();
        while let Some(chunk) = stream.next().await {
            out.extend_from_slice(&chunk.unwrap().data);
        }
        String::from_utf8_lossy(&out).into_owned()
    })
    .await
    .expect("the followed stream ends when the process exits");
    assert_eq!(text, "Log-Line-1\nLog-Line-2\n");

    delete(&mut c, &ns, "talker", Some(0)).await.unwrap();
    fx.assert_nothing_left().await.unwrap();
}

// ---- 9. capacity -----------------------------------------------------------------

#[actix_rt::test]
async fn capacity_is_released_by_deletes() {
    let fx = GatewayFixture::start("gw-cap", 5).await.unwrap();
    let mut c = fx.client().await.unwrap();
    let ns = namespace("cap");
    for i in 0..5 {
        c.create(create(&ns, &format!("s{i}"), shell(&fx, "sleep 600")))
            .await
            .unwrap();
    }
    assert_code(
        c.create(create(&ns, "s5", shell(&fx, "sleep 600"))).await,
        Code::ResourceExhausted,
        "",
    );
    assert_code(get(&mut c, &ns, "s5").await, Code::NotFound, "s5");
    for i in 0..3 {
        delete(&mut c, &ns, &format!("s{i}"), Some(0))
            .await
            .unwrap();
    }
    let started = Instant::now();
    c.create(create(&ns, "s5", shell(&fx, "sleep 600")))
        .await
        .expect("a freed slot is used at once");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(fx.containers().await.unwrap().len(), 3);
    for name in ["s3", "s4", "s5"] {
        delete(&mut c, &ns, name, Some(0)).await.unwrap();
    }
    fx.assert_nothing_left().await.unwrap();
}

// ---- 10. graceful delete -------------------------------------------------------

#[actix_rt::test]
async fn delete_sends_sigterm_and_the_watch_sees_terminating_then_deleted() {
    let fx = GatewayFixture::start("gw-term", 2).await.unwrap();
    let mut c = fx.client().await.unwrap();
    let ns = namespace("term");
    c.create(create(
        &ns,
        "trapper",
        shell(
            &fx,
            "trap 'echo got-term; exit 0' TERM; echo ready; while :; do sleep 0.1; done",
        ),
    ))
    .await
    .unwrap();
    wait_for(&c, &ns, "trapper", "the record to land", |s| {
        status(s).recorded
    })
    .await;
    let mut watch = c
        .watch(fp::WatchRequest {
            namespace: ns.clone(),
            name: "trapper".into(),
            send_initial: false,
        })
        .await
        .unwrap()
        .into_inner();
    let mut log = c
        .logs(fp::LogsRequest {
            namespace: ns.clone(),
            name: "trapper".into(),
            follow: true,
            tail_lines: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut text = String::new();
    tokio::time::timeout(DEADLINE, async {
        while !text.contains("ready") {
            let chunk = log.next().await.expect("log open").unwrap();
            text.push_str(&String::from_utf8_lossy(&chunk.data));
        }
    })
    .await
    .expect("the process started");

    let started = Instant::now();
    let deleting = {
        let mut c = c.clone();
        let ns = ns.clone();
        tokio::spawn(async move { delete(&mut c, &ns, "trapper", Some(10)).await })
    };
    tokio::time::timeout(DEADLINE, async {
        while let Some(chunk) = log.next().await {
            text.push_str(&String::from_utf8_lossy(&chunk.unwrap().data));
        }
    })
    .await
    .expect("the followed log ends when the process exits");
    assert!(text.contains("got-term"), "{text:?}");
    deleting.await.unwrap().unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "the process exited on SIGTERM; the delete did not wait out the grace period"
    );

    let mut seen = Vec::new();
    tokio::time::timeout(DEADLINE, async {
        while let Some(ev) = watch.next().await {
            let ev = ev.unwrap();
            let kind = ev.r#type();
            seen.push((kind, phase(ev.sandbox.as_ref().unwrap())));
            if kind == fp::watch_event::Type::Deleted {
                break;
            }
        }
    })
    .await
    .expect("the watch saw the delete");
    use fp::watch_event::Type;
    assert_eq!(
        seen,
        [
            (Type::Modified, fp::Phase::Terminating),
            (Type::Deleted, fp::Phase::Terminating)
        ],
        "MODIFIED(Terminating) then DELETED"
    );
    fx.assert_nothing_left().await.unwrap();
}

// ---- 11. cancellation ----------------------------------------------------------

#[actix_rt::test]
async fn a_create_past_its_grpc_deadline_leaves_nothing() {
    let fx = GatewayFixture::start("gw-deadline", 4).await.unwrap();
    let mut c = fx.client().await.unwrap();
    let ns = namespace("deadline");
    let spec = shell(&fx, "sleep 600");
    let mut req = tonic::Request::new(create(&ns, "late", spec.clone()));
    req.set_timeout(Duration::from_millis(1));
    let e = c.create(req).await.unwrap_err();
    assert!(
        matches!(e.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{e:?}"
    );
    fx.assert_nothing_left().await.unwrap();
    // The name is free again (nothing of the cancelled create still holds it) and
    // the only sandbox is the new one.
    let again = create_when_free(&c, &ns, "late", &spec).await;
    let containers = fx.containers().await.unwrap();
    assert_eq!(containers.len(), 1);
    assert_eq!(containers[0].id.as_str(), status(&again).sandbox_id);
    delete(&mut c, &ns, "late", Some(0)).await.unwrap();
    fx.assert_nothing_left().await.unwrap();
}

#[actix_rt::test]
async fn a_create_dropped_by_its_client_leaves_nothing() {
    let fx = GatewayFixture::start("gw-dropped", 16).await.unwrap();
    let mut c = fx.client().await.unwrap();
    let ns = namespace("dropped");
    let spec = shell(&fx, "sleep 600");
    // Different points of the create: before, during and after the reservation, the
    // allocation and the agent call. Capacity 16: a cancelled create holds its slot
    // until its cleanup has removed the container.
    let cuts = [1u64, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144];
    for (i, ms) in cuts.iter().enumerate() {
        let name = format!("cut-{i}");
        let req = create(&ns, &name, spec.clone());
        match tokio::time::timeout(Duration::from_millis(*ms), c.create(req)).await {
            // Fast enough: the client has its answer, so the sandbox is its to delete.
            Ok(Ok(_)) => delete(&mut c, &ns, &name, Some(0)).await.unwrap(),
            Ok(Err(e)) => panic!("{name}: {e:?}"),
            Err(_) => {}
        }
    }
    fx.assert_nothing_left().await.unwrap();
    for i in 0..cuts.len() {
        let name = format!("cut-{i}");
        let again = create_when_free(&c, &ns, &name, &spec).await;
        let ids: Vec<String> = fx
            .containers()
            .await
            .unwrap()
            .into_iter()
            .map(|o| o.id.to_string())
            .collect();
        assert_eq!(ids, [status(&again).sandbox_id.clone()], "{name}");
        delete(&mut c, &ns, &name, Some(0)).await.unwrap();
    }
    fx.assert_nothing_left().await.unwrap();
}

#[actix_rt::test]
async fn a_delete_cancelled_by_its_client_is_finished_by_the_gateway() {
    let fx = GatewayFixture::start("gw-deldrop", 2).await.unwrap();
    let mut c = fx.client().await.unwrap();
    let ns = namespace("deldrop");
    c.create(create(&ns, "victim", shell(&fx, "sleep 600")))
        .await
        .unwrap();
    wait_for(&c, &ns, "victim", "the record to land", |s| {
        status(s).recorded
    })
    .await;
    // The client gives up long before the container is gone (SIGTERM is ignored by
    // `sleep` as pid 1, so the agent waits out the grace period before SIGKILL).
    let mut req = tonic::Request::new(fp::DeleteRequest {
        namespace: ns.clone(),
        name: "victim".into(),
        grace_period_seconds: Some(1),
    });
    req.set_timeout(Duration::from_millis(20));
    let e = c.delete(req).await.unwrap_err();
    assert!(
        matches!(e.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{e:?}"
    );
    // The delete was accepted, so it finishes (or the sweeper finishes it).
    wait_until("the cancelled delete to finish", DEADLINE, || {
        let mut c = c.clone();
        let ns = &ns;
        async move {
            match get(&mut c, ns, "victim").await {
                Err(s) if s.code() == Code::NotFound => Ok(Some(())),
                Ok(_) => Ok(None),
                Err(s) => Err(s.into()),
            }
        }
    })
    .await
    .unwrap();
    fx.assert_nothing_left().await.unwrap();
    // And the name is usable again.
    create_when_free(&c, &ns, "victim", &shell(&fx, "sleep 600")).await;
    delete(&mut c, &ns, "victim", Some(0)).await.unwrap();
    fx.assert_nothing_left().await.unwrap();
}

// ---- 12. FAST record failures (seed-review item 4) ------------------------------

/// The real store with failing creates: the first `fail` calls of `create` return a
/// retryable error (`u32::MAX`: every call). A fake at the `SandboxStore` seam, to
/// inject what the real store cannot be made to do on demand.
#[derive(Debug)]
struct FlakyStore {
    inner: SqliteStore,
    fail: u32,
    calls: AtomicU32,
}

impl FlakyStore {
    fn new(inner: SqliteStore, fail: u32) -> Self {
        Self {
            inner,
            fail,
            calls: AtomicU32::new(0),
        }
    }
}

impl SandboxStore for FlakyStore {
    async fn create(&self, record: StoredSandbox) -> Result<StoredSandbox, StoreError> {
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        if n < self.fail {
            return Err(StoreError::Task(format!("injected failure {}", n + 1)));
        }
        self.inner.create(record).await
    }

    async fn get(
        &self,
        namespace: &NamespaceName,
        name: &SandboxName,
    ) -> Result<Option<StoredSandbox>, StoreError> {
        self.inner.get(namespace, name).await
    }

    async fn get_by_request_id(
        &self,
        request_id: &RequestId,
    ) -> Result<Option<StoredSandbox>, StoreError> {
        self.inner.get_by_request_id(request_id).await
    }

    async fn get_by_sandbox_id(
        &self,
        sandbox_id: &SandboxId,
    ) -> Result<Option<StoredSandbox>, StoreError> {
        self.inner.get_by_sandbox_id(sandbox_id).await
    }

    async fn list(&self, filter: &ListFilter) -> Result<Vec<StoredSandbox>, StoreError> {
        self.inner.list(filter).await
    }

    async fn update(&self, record: StoredSandbox) -> Result<StoredSandbox, StoreError> {
        self.inner.update(record).await
    }

    async fn delete(
        &self,
        namespace: &NamespaceName,
        name: &SandboxName,
        expected_version: Option<u64>,
    ) -> Result<StoredSandbox, StoreError> {
        self.inner.delete(namespace, name, expected_version).await
    }

    fn watch(&self) -> tokio::sync::broadcast::Receiver<StoreEvent> {
        self.inner.watch()
    }
}

async fn flaky(name: &str, fail: u32) -> GatewayFixture<FlakyStore> {
    let parts = GatewayParts::start(name, 2).await.unwrap();
    let store = FlakyStore::new(parts.store.clone(), fail);
    let gateway = parts.gateway(parts.config(), store);
    GatewayFixture::serve(parts, gateway).await.unwrap().0
}

#[actix_rt::test]
async fn a_fast_record_that_fails_three_times_lands_after_retries() {
    let fx = flaky("gw-flaky3", 3).await;
    let mut c = fx.client().await.unwrap();
    let ns = namespace("flaky");
    let resp = c
        .create(create(&ns, "persistent", shell(&fx, "sleep 600")))
        .await
        .unwrap()
        .into_inner();
    assert!(!status(resp.sandbox.as_ref().unwrap()).recorded);
    let got = wait_for(&c, &ns, "persistent", "the record to land", |s| {
        status(s).recorded
    })
    .await;
    assert_eq!(phase(&got), fp::Phase::Running);
    assert_eq!(fx.gateway.store().calls.load(Ordering::SeqCst), 4);
    assert_eq!(fx.containers().await.unwrap().len(), 1);
    delete(&mut c, &ns, "persistent", Some(0)).await.unwrap();
    fx.assert_nothing_left().await.unwrap();
}

#[actix_rt::test]
async fn a_fast_record_that_never_lands_removes_the_sandbox() {
    let fx = flaky("gw-flakyall", u32::MAX).await;
    let mut c = fx.client().await.unwrap();
    let ns = namespace("flaky");
    let resp = c
        .create(create(&ns, "doomed", shell(&fx, "sleep 600")))
        .await
        .unwrap()
        .into_inner();
    let id = status(resp.sandbox.as_ref().unwrap()).sandbox_id.clone();
    assert!(fx.snapshot_exists(&id).await.unwrap());
    // Removed after the bounded retries: container, slot, and the pending answer.
    fx.assert_nothing_left().await.unwrap();
    assert_code(get(&mut c, &ns, "doomed").await, Code::NotFound, "doomed");
    assert!(!fx.snapshot_exists(&id).await.unwrap());
    assert!(
        fx.gateway.store().calls.load(Ordering::SeqCst) > 1,
        "retried"
    );
}

// ---- 13. exec --------------------------------------------------------------------

async fn exec(c: &mut Client, ns: &str, name: &str, argv: &[&str]) -> (String, Option<i32>) {
    use fp::exec_response::Msg;
    let start = fp::ExecRequest {
        msg: Some(fp::exec_request::Msg::Start(fp::ExecStart {
            namespace: ns.into(),
            name: name.into(),
            command: argv.iter().map(|s| s.to_string()).collect(),
            ..fp::ExecStart::default()
        })),
    };
    let mut out = c
        .exec(tokio_stream::iter(vec![start]))
        .await
        .unwrap()
        .into_inner();
    let (mut stdout, mut code) = (Vec::new(), None);
    tokio::time::timeout(DEADLINE, async {
        while let Some(m) = out.next().await {
            match m.unwrap().msg {
                Some(Msg::Stdout(b)) => stdout.extend_from_slice(&b),
                Some(Msg::ExitCode(c)) => code = Some(c),
                Some(Msg::Stderr(_)) | None => {}
            }
        }
    })
    .await
    .expect("exec ends");
    (String::from_utf8_lossy(&stdout).into_owned(), code)
}

#[actix_rt::test]
async fn exec_returns_output_and_exit_codes() {
    let fx = GatewayFixture::start("gw-exec", 2).await.unwrap();
    let mut c = fx.client().await.unwrap();
    let ns = namespace("exec");
    c.create(create(&ns, "box", shell(&fx, "sleep 600")))
        .await
        .unwrap();
    assert_eq!(
        exec(&mut c, &ns, "box", &["echo", "hi"]).await,
        ("hi\n".to_owned(), Some(0))
    );
    assert_eq!(
        exec(&mut c, &ns, "box", &["sh", "-c", "exit 3"]).await,
        (String::new(), Some(3))
    );
    delete(&mut c, &ns, "box", Some(0)).await.unwrap();
    fx.assert_nothing_left().await.unwrap();
}

// ---- 14. startup reconcile -----------------------------------------------------

fn record(
    parts: &GatewayParts,
    ns: &str,
    name: &str,
    phase: Phase,
    id: SandboxId,
) -> StoredSandbox {
    let spec = SandboxSpec {
        namespace: ns.into(),
        name: name.into(),
        pool_ref: POOL.into(),
        image: parts.env.image.clone(),
        command: vec!["sh".into(), "-c".into(), "sleep 600".into()],
        ..SandboxSpec::default()
    }
    .validate(&SpecLimits::default())
    .unwrap();
    StoredSandbox {
        namespace: spec.namespace.clone(),
        name: spec.name.clone().unwrap(),
        uid: unique_id(),
        sandbox_id: id,
        request_id: Some(RequestId::parse("request_id", &unique_id()).unwrap()),
        spec_digest: spec.digest(),
        spec,
        labels: BTreeMap::new(),
        phase,
        agent: Some(parts.agent_id.clone()),
        node: Some(parts.node.clone()),
        exit_code: None,
        expire_time_ms: None,
        reset_revision: 0,
        accepted_reset_revision: 0,
        timeline: None,
        created_ms: 0,
        resource_version: 0,
    }
}

async fn container(parts: &GatewayParts, rec: &StoredSandbox) {
    parts
        .agent
        .create(CreateSandbox {
            id: rec.sandbox_id.clone(),
            namespace: rec.namespace.to_string(),
            name: rec.name.to_string(),
            claim_uid: rec.uid.clone(),
            request_id: String::new(),
            spec: rec.spec.clone(),
        })
        .await
        .unwrap();
}

#[actix_rt::test]
async fn startup_reconcile_confirms_loses_adopts_and_removes() {
    let parts = GatewayParts::start("gw-reconcile", 4).await.unwrap();
    let ns = namespace("reconcile");
    let store = &parts.store;
    // Running with its container: confirmed.
    let kept = record(&parts, &ns, "kept", Phase::Running, SandboxId::generate());
    container(&parts, &kept).await;
    store.create(kept.clone()).await.unwrap();
    // Running, container gone: Lost.
    let lost = record(&parts, &ns, "lost", Phase::Running, SandboxId::generate());
    store.create(lost).await.unwrap();
    // Bound, no container (a create that never finished): removed.
    let half = record(&parts, &ns, "half", Phase::Bound, SandboxId::generate());
    store.create(half).await.unwrap();
    // A container without a record (a FAST create whose record never landed): adopted.
    let orphan = record(&parts, &ns, "orphan", Phase::Running, SandboxId::generate());
    container(&parts, &orphan).await;

    let gateway = parts.gateway(parts.config(), parts.store.clone());
    let (fx, report) = GatewayFixture::serve(parts, gateway).await.unwrap();
    assert_eq!(
        report,
        ReconcileReport {
            confirmed: 1,
            lost: 1,
            removed_records: 1,
            adopted: 1,
            removed_containers: 0,
        }
    );
    let mut c = fx.client().await.unwrap();
    assert_eq!(
        phase(&get(&mut c, &ns, "kept").await.unwrap()),
        fp::Phase::Running
    );
    assert_eq!(
        phase(&get(&mut c, &ns, "lost").await.unwrap()),
        fp::Phase::Lost
    );
    assert_code(get(&mut c, &ns, "half").await, Code::NotFound, "half");
    let adopted = get(&mut c, &ns, "orphan").await.unwrap();
    assert_eq!(phase(&adopted), fp::Phase::Running);
    assert_eq!(status(&adopted).sandbox_id, orphan.sandbox_id.as_str());
    assert_eq!(
        adopted.labels.get(LABEL_ADOPTED).map(String::as_str),
        Some("true")
    );
    assert!(status(&adopted).recorded);
    // Both containers hold their slot in the registry.
    assert_eq!(fx.parts.registry.snapshot().await.unwrap().sandboxes, 2);

    for name in ["kept", "lost", "orphan"] {
        delete(&mut c, &ns, name, Some(0)).await.unwrap();
    }
    fx.assert_nothing_left().await.unwrap();
}

// ---- 15. exit events -------------------------------------------------------------

#[actix_rt::test]
async fn exits_become_failed_or_succeeded_with_the_exit_code() {
    let fx = GatewayFixture::start("gw-exit", 2).await.unwrap();
    let mut c = fx.client().await.unwrap();
    let ns = namespace("exit");
    c.create(create(&ns, "fails", shell(&fx, "exit 5")))
        .await
        .unwrap();
    c.create(create(&ns, "succeeds", command(&fx, &["true"])))
        .await
        .unwrap();
    let failed = wait_for(&c, &ns, "fails", "phase Failed", |s| {
        phase(s) == fp::Phase::Failed && status(s).recorded
    })
    .await;
    assert_eq!(status(&failed).exit_code, Some(5));
    let ok = wait_for(&c, &ns, "succeeds", "phase Succeeded", |s| {
        phase(s) == fp::Phase::Succeeded && status(s).recorded
    })
    .await;
    assert_eq!(status(&ok).exit_code, Some(0));
    for name in ["fails", "succeeds"] {
        delete(&mut c, &ns, name, Some(0)).await.unwrap();
    }
    fx.assert_nothing_left().await.unwrap();
}
