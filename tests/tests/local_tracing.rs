//! Traces end to end in local mode: `fsb up` with `FSB_OTLP_ENDPOINT` pointing at a
//! real OTLP/gRPC receiver (a tonic server of the collector's TraceService). One
//! create is one trace, continuing the client's W3C `traceparent`, with spans from
//! all four layers (gateway, registry, agent, containerd) whose parent links form one
//! tree under the gateway's span; a create without a `traceparent` starts its own
//! trace at the gateway; the create's log line carries its trace id. Real
//! containerd, real `fsb up` binary.

#![allow(clippy::unwrap_used)] // test code

use std::{collections::HashMap, path::PathBuf, time::Duration};

use fsb_proto::fastpath::v1 as fp;
use fsb_tests::{
    ContainerdEnv,
    local::{LocalUp, free_port, sleeper_request},
    otlp::{OtlpReceiver, ReceivedSpan},
};

const ARRIVES: Duration = Duration::from_secs(30);

fn random_hex(bytes: usize) -> String {
    let u = uuid::Uuid::new_v4().simple().to_string();
    u[..bytes * 2].to_owned()
}

/// Whether the four layers and the agent's start have arrived.
fn complete(spans: &[ReceivedSpan]) -> bool {
    [
        "gateway.create",
        "registry.allocate",
        "agent.create",
        "agent.start",
    ]
    .iter()
    .all(|n| spans.iter().any(|s| s.name == *n))
        && spans.iter().any(|s| s.name == "start task")
}

/// The one span named `name`.
fn one<'a>(spans: &'a [ReceivedSpan], name: &str) -> &'a ReceivedSpan {
    let found: Vec<_> = spans.iter().filter(|s| s.name == name).collect();
    assert_eq!(found.len(), 1, "exactly one {name}: {spans:#?}");
    found[0]
}

/// Checks the tree of one create's trace and returns the gateway span.
fn check_tree<'a>(spans: &'a [ReceivedSpan], sandbox: &str) -> &'a ReceivedSpan {
    let by_id: HashMap<&str, &ReceivedSpan> =
        spans.iter().map(|s| (s.span_id.as_str(), s)).collect();
    assert_eq!(by_id.len(), spans.len(), "span ids are unique: {spans:#?}");
    let gateway = one(spans, "gateway.create");
    // Every other span hangs off a span of this trace, up to the gateway's.
    let ancestors = |s: &ReceivedSpan| {
        let mut chain = Vec::new();
        let mut at = s;
        while let Some(p) = by_id.get(at.parent_span_id.as_str()) {
            chain.push(p.name.clone());
            at = p;
            assert!(chain.len() <= spans.len(), "a cycle in the parent links");
        }
        (chain, at.span_id == gateway.span_id)
    };
    for s in spans.iter().filter(|s| s.span_id != gateway.span_id) {
        let (chain, under_gateway) = ancestors(s);
        assert!(
            under_gateway,
            "{} ({}) is not under gateway.create: parents {chain:?}",
            s.name, s.span_id
        );
        assert_eq!(s.service, "fsb", "{s:?}");
    }
    // The layers nest in order.
    let registry = one(spans, "registry.allocate");
    assert_eq!(registry.parent_span_id, gateway.span_id);
    let agent = one(spans, "agent.create");
    assert_eq!(agent.attribute("sandbox"), Some(sandbox), "{agent:?}");
    assert!(ancestors(agent).0.contains(&"gateway.create".to_owned()));
    let start = one(spans, "agent.start");
    assert_eq!(start.attribute("how"), Some("cold"));
    assert!(
        ancestors(start).0.contains(&"agent.create".to_owned()),
        "agent.start under agent.create: {:?}",
        ancestors(start)
    );
    let containerd: Vec<_> = spans
        .iter()
        .filter(|s| ["create container", "create task", "start task"].contains(&s.name.as_str()))
        .collect();
    assert_eq!(containerd.len(), 3, "{spans:#?}");
    for c in containerd {
        assert_eq!(c.parent_span_id, start.span_id, "{c:?} under agent.start");
        assert_eq!(c.attribute("rpc.system"), Some("grpc"));
    }
    gateway
}

#[tokio::test]
async fn one_create_is_one_trace_across_gateway_registry_agent_and_containerd() {
    let env = ContainerdEnv::from_env();
    let receiver = OtlpReceiver::start().await.unwrap();
    let dir = PathBuf::from(std::env::var("FSB_TEST_RUN_DIR").unwrap_or_else(|_| "/tmp".into()))
        .join(format!("local-tracing-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut up = LocalUp::start_with_env(
        &env,
        &dir.join("up"),
        &format!("tracing-{}", std::process::id()),
        free_port().unwrap(),
        &["--stop-sandboxes-on-exit"],
        &[
            ("FSB_OTLP_ENDPOINT", receiver.endpoint.as_str()),
            // Export within a tenth of a second rather than the default five.
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    )
    .await
    .unwrap();
    let mut client = up.client().unwrap();

    // A client that is itself traced: its traceparent is continued.
    let trace_id = random_hex(16);
    let client_span = random_hex(8);
    let mut req = tonic::Request::new(sleeper_request(
        &env.image,
        "traced",
        fp::ConsistencyMode::Strong,
    ));
    req.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-{client_span}-01").parse().unwrap(),
    );
    let resp = client.create(req).await.unwrap().into_inner();
    let sandbox = resp.sandbox.unwrap().status.unwrap().sandbox_id;
    let spans = receiver.trace(&trace_id, ARRIVES, complete).await.unwrap();
    let gateway = check_tree(&spans, &sandbox);
    assert_eq!(
        gateway.parent_span_id, client_span,
        "the gateway's span is the client's child"
    );
    // One create, one trace: no span of this sandbox's create lands in another trace.
    for s in receiver.spans() {
        if s.name == "agent.create" && s.attribute("sandbox") == Some(sandbox.as_str()) {
            assert_eq!(s.trace_id, trace_id, "{s:?}");
        }
    }

    // Without a traceparent the gateway starts the trace.
    let resp = client
        .create(sleeper_request(
            &env.image,
            "untraced",
            fp::ConsistencyMode::Strong,
        ))
        .await
        .unwrap()
        .into_inner();
    let sandbox = resp.sandbox.unwrap().status.unwrap().sandbox_id;
    let agent = fsb_tests::wait_until("the second create's agent span", ARRIVES, || {
        let found = receiver
            .spans()
            .into_iter()
            .find(|s| s.name == "agent.create" && s.attribute("sandbox") == Some(sandbox.as_str()));
        async move { Ok(found) }
    })
    .await
    .unwrap();
    assert_ne!(agent.trace_id, trace_id);
    let spans = receiver
        .trace(&agent.trace_id, ARRIVES, complete)
        .await
        .unwrap();
    let gateway = check_tree(&spans, &sandbox);
    assert!(gateway.parent_span_id.is_empty(), "a root: {gateway:?}");

    // Logs carry the trace id (the create's span fields are on its log lines).
    let log = std::fs::read_to_string(dir.join("up/fsb-up.log")).unwrap();
    assert!(
        log.lines()
            .any(|l| l.contains(&trace_id) && l.contains("request_id=req-traced")),
        "no log line with trace id {trace_id}:\n{log}"
    );
    assert!(log.contains("exporting traces over OTLP"), "{log}");

    up.terminate(Duration::from_secs(30)).await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
