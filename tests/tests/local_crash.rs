//! Crash safety of local mode: `kill -9` of `fsb up` at random points while 1,000
//! creates (FAST and STRONG alternating, 8 in flight, each asking for one of 500
//! ports) and deletes run, restarting it each time on the same port and data
//! directory. The client retries a failed call with the same request id, as a real
//! client would. Afterwards:
//! - every create the client saw acknowledged (and did not delete) is recorded,
//!   with the acknowledged sandbox id, and Running;
//! - every delete the client saw acknowledged is gone;
//! - no container of this agent exists that the store does not know;
//! - no two running sandboxes hold the same port (nothing double-allocated).
//!
//! Runs the real `fsb` binary against the harness's containerd.

#![allow(clippy::unwrap_used)] // helpers below are test code too

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, SystemTime},
};

use fsb_proto::fastpath::v1::{
    ConsistencyMode, CreateRequest, DeleteRequest, ListRequest, Phase, SandboxSpec,
};
use fsb_tests::{
    ContainerdEnv,
    local::{Client, LocalUp, free_port},
    wait_until,
};
use tonic::Code;

const TOTAL: usize = 1000;
const CONCURRENCY: usize = 8;
const KILLS: usize = 4;
/// Ports are drawn from this many, so creates compete for them.
const PORTS: usize = 500;
/// Live sandboxes per worker before it deletes its oldest (bounds shim memory).
const WINDOW: usize = 16;
const NAMESPACE: &str = "crash";

/// Tiny deterministic PRNG (xorshift), seeded from the clock and printed, so a failing
/// run can be repeated.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[derive(Default)]
struct Ledger {
    /// Acknowledged creates still expected to exist: name -> sandbox id.
    live: BTreeMap<String, String>,
    /// Acknowledged deletes.
    deleted: HashSet<String>,
    /// Creates refused for a port in use (never acknowledged).
    refused: usize,
}

fn create_request(i: usize) -> CreateRequest {
    CreateRequest {
        request_id: format!("crash-{i}"),
        namespace: NAMESPACE.into(),
        name: format!("c-{i}"),
        spec: Some(SandboxSpec {
            pool_ref: "default".into(),
            image: ContainerdEnv::from_env().image,
            command: vec!["sleep".into(), "3600".into()],
            exposed_ports: vec![20000 + (i % PORTS) as u32],
            ..SandboxSpec::default()
        }),
        mode: if i.is_multiple_of(2) {
            ConsistencyMode::Fast
        } else {
            ConsistencyMode::Strong
        } as i32,
        ..CreateRequest::default()
    }
}

/// Whether an error means "the server is down or restarting": retry the same call.
fn retryable(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable | Code::Unknown | Code::Cancelled | Code::Internal | Code::Aborted
    )
}

async fn worker(client: Client, next: Arc<AtomicUsize>, ledger: Arc<Mutex<Ledger>>) {
    let mut mine: Vec<String> = Vec::new();
    loop {
        let i = next.fetch_add(1, Ordering::SeqCst);
        if i >= TOTAL {
            return;
        }
        let req = create_request(i);
        loop {
            match client.clone().create(req.clone()).await {
                Ok(resp) => {
                    let sb = resp.into_inner().sandbox.unwrap();
                    let id = sb.status.unwrap().sandbox_id;
                    ledger.lock().unwrap().live.insert(sb.name.clone(), id);
                    mine.push(sb.name);
                    break;
                }
                Err(s) if s.code() == Code::ResourceExhausted => {
                    ledger.lock().unwrap().refused += 1;
                    break;
                }
                Err(s) if retryable(s.code()) => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(s) => panic!("create {i}: unexpected {s:?}"),
            }
        }
        if mine.len() > WINDOW {
            let name = mine.remove(0);
            delete(&client, &name, &ledger).await;
        }
    }
}

async fn delete(client: &Client, name: &str, ledger: &Mutex<Ledger>) {
    loop {
        let r = client
            .clone()
            .delete(DeleteRequest {
                namespace: NAMESPACE.into(),
                name: name.into(),
                grace_period_seconds: Some(0),
            })
            .await;
        match r {
            // NotFound after a retry: the first attempt's delete finished before the crash.
            Ok(_) => break,
            Err(s) if s.code() == Code::NotFound => break,
            Err(s) if retryable(s.code()) => tokio::time::sleep(Duration::from_millis(20)).await,
            Err(s) => panic!("delete {name}: unexpected {s:?}"),
        }
    }
    let mut l = ledger.lock().unwrap();
    l.live.remove(name);
    l.deleted.insert(name.to_owned());
}

#[actix_rt::test]
async fn kill9_during_a_thousand_creates_loses_and_leaks_nothing() {
    let env = ContainerdEnv::from_env();
    let seed = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    eprintln!("crash test seed {seed}");
    let mut rng = Rng(seed);
    let agent_id = format!("crash-{}", &fsb_tests::unique_id()[..8]);
    let data_dir = env.run_dir.join(format!("up-{agent_id}"));
    let port = free_port().unwrap();
    let mut up = LocalUp::start(&env, &data_dir, &agent_id, port, &[])
        .await
        .unwrap();
    let client = up.client().unwrap();

    let next = Arc::new(AtomicUsize::new(0));
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let workers: Vec<_> = (0..CONCURRENCY)
        .map(|_| tokio::spawn(worker(client.clone(), next.clone(), ledger.clone())))
        .collect();

    // Kill at random points spread over the run, restart at once each time.
    for k in 0..KILLS {
        let at = (k + 1) * TOTAL / (KILLS + 1) + (rng.next() % 60) as usize;
        wait_until("creates progress", Duration::from_secs(300), || {
            let next = next.clone();
            async move { Ok((next.load(Ordering::SeqCst) >= at).then_some(())) }
        })
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(rng.next() % 40)).await;
        up.kill9().await.unwrap();
        up = LocalUp::start(&env, &data_dir, &agent_id, port, &[])
            .await
            .unwrap();
    }
    for w in workers {
        w.await.unwrap();
    }
    // One more crash right after the last answers (FAST records may be in flight).
    up.kill9().await.unwrap();
    up = LocalUp::start(&env, &data_dir, &agent_id, port, &[])
        .await
        .unwrap();

    let listed = client
        .clone()
        .list(ListRequest {
            namespace: NAMESPACE.into(),
            ..ListRequest::default()
        })
        .await
        .unwrap()
        .into_inner()
        .sandboxes;
    let by_name: HashMap<String, _> = listed.iter().map(|s| (s.name.clone(), s)).collect();
    let ledger = std::mem::take(&mut *ledger.lock().unwrap());
    eprintln!(
        "acknowledged live {}, deleted {}, refused {}, listed {}",
        ledger.live.len(),
        ledger.deleted.len(),
        ledger.refused,
        listed.len()
    );
    assert!(ledger.live.len() >= 100, "too few creates got through");
    for (name, id) in &ledger.live {
        let sb = by_name
            .get(name)
            .unwrap_or_else(|| panic!("acknowledged sandbox {name} ({id}) is missing"));
        let status = sb.status.as_ref().unwrap();
        assert_eq!(&status.sandbox_id, id, "{name}: sandbox id changed");
        assert_eq!(status.phase(), Phase::Running, "{name}: {status:?}");
    }
    for name in &ledger.deleted {
        assert!(
            !by_name.contains_key(name),
            "deleted sandbox {name} is back"
        );
    }
    for s in &listed {
        assert!(
            ledger.live.contains_key(&s.name),
            "{} is recorded but was never acknowledged (or was deleted)",
            s.name
        );
    }
    // Nothing runs that the store does not know.
    let recorded: HashSet<&str> = listed
        .iter()
        .map(|s| s.status.as_ref().unwrap().sandbox_id.as_str())
        .collect();
    let runtime = fsb_tests::container_runtime(&env).await.unwrap();
    let containers = runtime.list(Some(&agent_id)).await.unwrap();
    for c in &containers {
        assert!(
            recorded.contains(c.id.as_str()),
            "container {} is not in the store",
            c.id
        );
    }
    assert_eq!(containers.len(), listed.len());
    // No port is held twice.
    let mut ports = HashSet::new();
    for s in &listed {
        for p in &s.spec.as_ref().unwrap().exposed_ports {
            assert!(ports.insert(*p), "port {p} is held by two sandboxes");
        }
    }

    // Clean up through the API and stop fsb up gracefully.
    let names: Vec<String> = ledger.live.keys().cloned().collect();
    let scratch = Mutex::new(Ledger::default());
    for chunk in names.chunks(16) {
        futures::future::join_all(chunk.iter().map(|n| delete(&client, n, &scratch))).await;
    }
    let status = up.terminate(Duration::from_secs(60)).await.unwrap();
    assert!(status.success(), "fsb up exited with {status}");
    assert!(runtime.list(Some(&agent_id)).await.unwrap().is_empty());
}
