//! Hostile input against the real fast path (issue 8, item 4): path traversal in
//! names, logs and exec; a 1 MiB env; 10,000 ports; invalid UTF-8 in protobuf string
//! fields; a flood from one client. Each is refused with the right gRPC code naming
//! the field, and nothing is lost or leaked: a refused request reserves no name,
//! request id, slot or port, and after each test no container, record or allocation
//! is left.
//!
//! The first four run the gateway as `fsb up` wires it (`fsb_tests::gateway`: real
//! agent, containerd, registry, SQLite store and tonic server). The flood runs the
//! real `fsb up` binary with a small `--rate-limit`, so the flag and the interceptor
//! are the ones users get.

#![allow(clippy::unwrap_used)] // helpers below are test code too

use std::{collections::BTreeSet, time::Duration};

use fsb_proto::fastpath::v1 as fp;
use fsb_tests::{
    ContainerdEnv, GatewayFixture,
    gateway::{Client, POOL, exec, logs},
    local::LocalUp,
    local::free_port,
    unique_id, wait_until,
};
use tonic::{Code, Status};

const DEADLINE: Duration = Duration::from_secs(30);

fn namespace(test: &str) -> String {
    format!("{test}-{}", &unique_id()[..6])
}

fn sleeper(image: &str) -> fp::SandboxSpec {
    fp::SandboxSpec {
        pool_ref: POOL.into(),
        image: image.into(),
        command: vec!["sleep".into(), "600".into()],
        ..fp::SandboxSpec::default()
    }
}

fn create(request_id: &str, ns: &str, name: &str, spec: fp::SandboxSpec) -> fp::CreateRequest {
    fp::CreateRequest {
        request_id: request_id.into(),
        namespace: ns.into(),
        name: name.into(),
        spec: Some(spec),
        ..fp::CreateRequest::default()
    }
}

/// `r` failed with `code` and a message naming `field`.
fn refused<T: std::fmt::Debug>(r: Result<T, Status>, code: Code, field: &str) -> Status {
    let e = r.expect_err(&format!("expected {code:?} naming {field:?}"));
    assert_eq!(e.code(), code, "{e:?}");
    assert!(
        e.message().contains(field),
        "{:?} should name {field:?}",
        e.message()
    );
    e
}

fn start(ns: &str, name: &str, argv: &[&str]) -> fp::ExecStart {
    fp::ExecStart {
        namespace: ns.into(),
        name: name.into(),
        command: argv.iter().map(|s| s.to_string()).collect(),
        ..fp::ExecStart::default()
    }
}

async fn delete(c: &mut Client, ns: &str, name: &str) -> Result<(), Status> {
    c.delete(fp::DeleteRequest {
        namespace: ns.into(),
        name: name.into(),
        grace_period_seconds: Some(0),
    })
    .await
    .map(|_| ())
}

const TRAVERSALS: [&str; 6] = [
    "../../etc",
    "..",
    "a/../../b",
    "/etc/passwd",
    "..%2f..%2fetc",
    "a\\..\\..\\b",
];

#[actix_rt::test]
async fn path_traversal_in_names_logs_and_exec_is_refused() {
    let fx = GatewayFixture::start("hostile-path", 2).await.unwrap();
    let mut c = fx.client().await.unwrap();
    let ns = namespace("path");
    let image = fx.parts.env.image.clone();
    c.create(create(&unique_id(), &ns, "target", sleeper(&image)))
        .await
        .unwrap();

    for bad in TRAVERSALS {
        refused(
            c.create(create(&unique_id(), &ns, bad, sleeper(&image)))
                .await,
            Code::InvalidArgument,
            "name",
        );
        refused(
            c.create(create(&unique_id(), bad, "x", sleeper(&image)))
                .await,
            Code::InvalidArgument,
            "namespace",
        );
        let get = c
            .get(fp::GetRequest {
                namespace: ns.clone(),
                name: bad.into(),
            })
            .await;
        refused(get, Code::InvalidArgument, "name");
        refused(logs(&mut c, &ns, bad).await, Code::InvalidArgument, "name");
        refused(
            logs(&mut c, bad, "target").await,
            Code::InvalidArgument,
            "namespace",
        );
        refused(
            delete(&mut c, &ns, bad).await,
            Code::InvalidArgument,
            "name",
        );
        refused(
            exec(&mut c, start(&ns, bad, &["cat", "/etc/passwd"])).await,
            Code::InvalidArgument,
            "name",
        );
        let mut s = sleeper(&image);
        s.working_dir = bad.trim_start_matches('/').into();
        refused(
            c.create(create(&unique_id(), &ns, "wd", s)).await,
            Code::InvalidArgument,
            "spec.workingDir",
        );
        let mut s = start(&ns, "target", &["pwd"]);
        s.working_dir = bad.trim_start_matches('/').into();
        refused(
            exec(&mut c, s).await,
            Code::InvalidArgument,
            "start.working_dir",
        );
    }
    let mut s = start(&ns, "target", &["env"]);
    s.envs = vec![fp::EnvVar {
        name: "../x".into(),
        value: "x".into(),
    }];
    refused(
        exec(&mut c, s).await,
        Code::InvalidArgument,
        "start.envs[0].name",
    );
    // An absolute working directory climbing with `..` stays in the sandbox's root.
    let mut s = start(&ns, "target", &["pwd"]);
    s.working_dir = "/../../../../..".into();
    assert_eq!(exec(&mut c, s).await.unwrap(), ("/\n".into(), Some(0)));

    // Nothing but the target was made, and it still works.
    let listed = c
        .list(fp::ListRequest {
            namespace: ns.clone(),
            ..fp::ListRequest::default()
        })
        .await
        .unwrap()
        .into_inner()
        .sandboxes;
    assert_eq!(listed.len(), 1);
    assert_eq!(fx.containers().await.unwrap().len(), 1);
    delete(&mut c, &ns, "target").await.unwrap();
    fx.assert_nothing_left().await.unwrap();
}

#[actix_rt::test]
async fn a_1_mib_env_is_refused_and_reserves_nothing() {
    let fx = GatewayFixture::start("hostile-env", 2).await.unwrap();
    let mut c = fx.client().await.unwrap();
    let ns = namespace("env");
    let image = fx.parts.env.image.clone();
    let big = vec![fp::EnvVar {
        name: "BIG".into(),
        value: "x".repeat(1 << 20),
    }];

    let mut s = sleeper(&image);
    s.envs = big.clone();
    refused(
        c.create(create("env-1", &ns, "box", s)).await,
        Code::InvalidArgument,
        "spec.envs",
    );
    // Many small entries: the count is bounded as well as the bytes.
    let mut s = sleeper(&image);
    s.envs = (0..100_000)
        .map(|i| fp::EnvVar {
            name: format!("V{i}"),
            value: String::new(),
        })
        .collect();
    refused(
        c.create(create("env-1", &ns, "box", s)).await,
        Code::InvalidArgument,
        "spec.envs",
    );
    // Past the 4 MiB message bound, tonic refuses before decoding.
    let mut s = sleeper(&image);
    s.envs = vec![fp::EnvVar {
        name: "HUGE".into(),
        value: "x".repeat(5 << 20),
    }];
    refused(
        c.create(create("env-1", &ns, "box", s)).await,
        Code::OutOfRange,
        "too large",
    );
    assert_eq!(fx.leftovers().await.unwrap(), Default::default());

    // The refusals reserved neither the request id nor the name.
    let made = c
        .create(create("env-1", &ns, "box", sleeper(&image)))
        .await
        .unwrap()
        .into_inner();
    assert!(!made.replayed);
    let mut s = start(&ns, "box", &["env"]);
    s.envs = big;
    refused(exec(&mut c, s).await, Code::InvalidArgument, "start.envs");

    delete(&mut c, &ns, "box").await.unwrap();
    fx.assert_nothing_left().await.unwrap();
}

#[actix_rt::test]
async fn ten_thousand_ports_are_refused_and_hold_no_port() {
    let fx = GatewayFixture::start("hostile-ports", 2).await.unwrap();
    let mut c = fx.client().await.unwrap();
    let ns = namespace("ports");
    let image = fx.parts.env.image.clone();
    // Below Linux's ephemeral range, where the fixture's own port lies.
    let base = 21_000u32;

    let mut s = sleeper(&image);
    s.exposed_ports = (base..base + 10_000).collect();
    let e = refused(
        c.create(create("ports-1", &ns, "box", s)).await,
        Code::InvalidArgument,
        "spec.exposedPorts",
    );
    assert!(e.message().contains("64"), "{e:?}");
    assert_eq!(fx.leftovers().await.unwrap(), Default::default());

    // Every port of the refused request is free: a create takes the first and the last.
    let mut s = sleeper(&image);
    s.exposed_ports = vec![base, base + 9_999];
    c.create(create("ports-1", &ns, "box", s)).await.unwrap();
    let snapshot = fx.parts.registry.snapshot().await.unwrap();
    assert_eq!(snapshot.sandboxes, 1);
    delete(&mut c, &ns, "box").await.unwrap();
    fx.assert_nothing_left().await.unwrap();
}

/// `fastpath.v1.CreateRequest` with its string fields as bytes (same tags and wire
/// types), so a test can send what no well-behaved client can: invalid UTF-8.
#[derive(Clone, PartialEq, prost::Message)]
struct RawCreate {
    #[prost(bytes = "vec", tag = "1")]
    request_id: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    namespace: Vec<u8>,
    #[prost(bytes = "vec", tag = "3")]
    name: Vec<u8>,
    #[prost(message, optional, tag = "4")]
    spec: Option<RawSpec>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct RawSpec {
    #[prost(bytes = "vec", tag = "1")]
    pool_ref: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    image: Vec<u8>,
    #[prost(bytes = "vec", repeated, tag = "3")]
    command: Vec<Vec<u8>>,
    #[prost(message, repeated, tag = "5")]
    envs: Vec<RawEnv>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct RawEnv {
    #[prost(bytes = "vec", tag = "1")]
    name: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    value: Vec<u8>,
}

async fn raw_create(
    fx: &GatewayFixture<fsb_store::SqliteStore>,
    msg: RawCreate,
) -> Result<fp::CreateResponse, Status> {
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", fx.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let mut req = tonic::Request::new(msg);
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", fsb_tests::gateway::TOKEN)
            .parse()
            .unwrap(),
    );
    grpc.unary(
        req,
        tonic::codegen::http::uri::PathAndQuery::from_static("/fastpath.v1.FastPath/Create"),
        fsb_proto::codec::Codec::<RawCreate, fp::CreateResponse>::default(),
    )
    .await
    .map(tonic::Response::into_inner)
}

#[actix_rt::test]
async fn invalid_utf8_in_string_fields_is_invalid_argument() {
    let fx = GatewayFixture::start("hostile-utf8", 2).await.unwrap();
    let ns = namespace("utf8");
    let good = RawCreate {
        request_id: b"utf8-1".to_vec(),
        namespace: ns.clone().into_bytes(),
        name: b"box".to_vec(),
        spec: Some(RawSpec {
            pool_ref: POOL.into(),
            image: fx.parts.env.image.clone().into_bytes(),
            command: vec![b"sleep".to_vec(), b"600".to_vec()],
            envs: vec![],
        }),
    };
    let not_utf8 = b"\xff\xfe../\xc3\x28".to_vec();
    type Edit = fn(&mut RawCreate, Vec<u8>);
    let cases: [(&str, Edit); 5] = [
        ("CreateRequest.request_id", |m, b| m.request_id = b),
        ("CreateRequest.name", |m, b| m.name = b),
        ("SandboxSpec.image", |m, b| {
            m.spec.as_mut().unwrap().image = b;
        }),
        ("SandboxSpec.command", |m, b| {
            m.spec.as_mut().unwrap().command[1] = b;
        }),
        ("EnvVar.value", |m, b| {
            m.spec.as_mut().unwrap().envs = vec![RawEnv {
                name: b"X".to_vec(),
                value: b,
            }];
        }),
    ];
    for (field, edit) in cases {
        let mut msg = good.clone();
        edit(&mut msg, not_utf8.clone());
        refused(raw_create(&fx, msg).await, Code::InvalidArgument, field);
    }
    assert_eq!(fx.leftovers().await.unwrap(), Default::default());

    // The same request, well formed, is served: nothing was reserved or broken.
    let made = raw_create(&fx, good).await.unwrap();
    assert!(!made.replayed);
    let mut c = fx.client().await.unwrap();
    delete(&mut c, &ns, "box").await.unwrap();
    fx.assert_nothing_left().await.unwrap();
}

/// Retry `call` while it is refused for the rate limit (a polite client).
async fn patiently<T, F, Fut>(what: &str, mut call: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, Status>>,
{
    wait_until(what, DEADLINE, || {
        let fut = call();
        async move {
            match fut.await {
                Ok(v) => Ok(Some(v)),
                Err(s) if s.code() == Code::ResourceExhausted => Ok(None),
                Err(s) => Err(anyhow::anyhow!("{what}: {s:?}")),
            }
        }
    })
    .await
    .unwrap()
}

#[actix_rt::test]
async fn a_flood_from_one_client_is_throttled_and_others_are_served() {
    const FLOOD: usize = 40;
    let env = ContainerdEnv::from_env();
    let agent_id = format!("flood-{}", &unique_id()[..8]);
    let data_dir = env.run_dir.join(format!("up-{agent_id}"));
    let mut up = LocalUp::start(
        &env,
        &data_dir,
        &agent_id,
        free_port().unwrap(),
        &["--rate-limit", "2", "--rate-burst", "5"],
    )
    .await
    .unwrap();
    // Two clients: two channels, so two connections.
    let flooder = up.client().unwrap();
    let mut other = up.client().unwrap();
    let ns = "flood";

    let answers = futures::future::join_all((0..FLOOD).map(|i| {
        let mut c = flooder.clone();
        let req = create(
            &format!("flood-{i}"),
            ns,
            &format!("f-{i}"),
            sleeper(&env.image),
        );
        async move { (i, c.create(req).await) }
    }))
    .await;
    let mut served = BTreeSet::new();
    let mut throttled = 0;
    for (i, answer) in answers {
        match answer {
            Ok(_) => {
                served.insert(format!("f-{i}"));
            }
            Err(s) => {
                assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
                assert!(s.message().contains("rate limit"), "{s:?}");
                throttled += 1;
            }
        }
    }
    assert!(!served.is_empty(), "the burst is served");
    assert!(throttled > 0, "the flood is throttled");

    // Another client is served meanwhile.
    other
        .create(create("other-1", ns, "other", sleeper(&env.image)))
        .await
        .unwrap();

    // Nothing lost: exactly the served creates exist (FAST records land shortly after
    // the answer), with containers; none of the throttled ones does.
    let mut expected = served.clone();
    expected.insert("other".into());
    let listed = || {
        let mut c = other.clone();
        async move {
            let names = c
                .list(fp::ListRequest {
                    namespace: ns.into(),
                    ..fp::ListRequest::default()
                })
                .await?
                .into_inner()
                .sandboxes
                .into_iter()
                .map(|s| s.name)
                .collect::<BTreeSet<String>>();
            Ok::<_, Status>(names)
        }
    };
    let last = std::sync::Mutex::new(BTreeSet::new());
    let converged = wait_until("exactly the served sandboxes listed", DEADLINE, || {
        let fut = listed();
        let (expected, last) = (&expected, &last);
        async move {
            match fut.await {
                Ok(names) => {
                    let done = names == *expected;
                    *last.lock().unwrap() = names;
                    Ok(done.then_some(()))
                }
                Err(s) if s.code() == Code::ResourceExhausted => Ok(None),
                Err(s) => Err(anyhow::anyhow!("list: {s:?}")),
            }
        }
    })
    .await;
    assert!(
        converged.is_ok(),
        "listed {:?}, served {expected:?}",
        last.lock().unwrap()
    );
    let runtime = fsb_tests::container_runtime(&env).await.unwrap();
    assert_eq!(
        runtime.list(Some(&agent_id)).await.unwrap().len(),
        expected.len()
    );

    // Clean up through the API, waiting out the limit, and leave nothing.
    for name in &expected {
        patiently(&format!("delete {name}"), || {
            let mut c = other.clone();
            let name = name.clone();
            async move {
                c.delete(fp::DeleteRequest {
                    namespace: ns.into(),
                    name,
                    grace_period_seconds: Some(0),
                })
                .await
            }
        })
        .await;
    }
    let left = patiently("list after deletes", listed).await;
    assert!(left.is_empty(), "{left:?}");
    assert!(runtime.list(Some(&agent_id)).await.unwrap().is_empty());
    let status = up.terminate(Duration::from_secs(60)).await.unwrap();
    assert!(status.success(), "fsb up exited with {status}");
}
