//! Several writers on one store (and two connections on one file): no lost updates,
//! conflicts surface as Aborted.

mod common;

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

use common::record;
use fsb_core::{ErrorCode, HasErrorCode};
use fsb_store::{ListFilter, SandboxStore, SqliteStore};

const WRITERS: usize = 6;
const INCREMENTS: usize = 40;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_read_modify_write_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    // Half the writers use a second connection to the same file, like a second process.
    let stores = [
        SqliteStore::open(&path).unwrap(),
        SqliteStore::open(&path).unwrap(),
    ];
    let counter = stores[0]
        .create(record("a", "counter", None))
        .await
        .unwrap();
    let conflicts = Arc::new(AtomicUsize::new(0));

    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let store = stores[w % 2].clone();
        let conflicts = Arc::clone(&conflicts);
        let (ns, name) = (counter.namespace.clone(), counter.name.clone());
        tasks.push(tokio::spawn(async move {
            // Each writer also creates its own records.
            for i in 0..10 {
                store
                    .create(record(
                        "a",
                        &format!("w{w}-{i}"),
                        Some(&format!("w{w}-{i}")),
                    ))
                    .await
                    .unwrap();
            }
            let mut done = 0;
            while done < INCREMENTS {
                let mut rec = store.get(&ns, &name).await.unwrap().unwrap();
                rec.reset_revision += 1;
                match store.update(rec).await {
                    Ok(_) => done += 1,
                    Err(err) => {
                        assert_eq!(err.error_code(), ErrorCode::Aborted, "{err}");
                        conflicts.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let fin = stores[1]
        .get(&counter.namespace, &counter.name)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        fin.reset_revision,
        (WRITERS * INCREMENTS) as i64,
        "no lost updates"
    );
    let all = stores[0].list(&ListFilter::default()).await.unwrap();
    assert_eq!(all.len(), 1 + WRITERS * 10);
    // Versions are unique store-wide.
    let mut versions: Vec<u64> = all.iter().map(|r| r.resource_version).collect();
    versions.sort_unstable();
    versions.dedup();
    assert_eq!(versions.len(), all.len());
    eprintln!("conflicts retried: {}", conflicts.load(Ordering::Relaxed));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_creates_of_one_name_have_one_winner() {
    let store = SqliteStore::in_memory().unwrap();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            store.create(record("a", "same", None)).await
        }));
    }
    let mut wins = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => wins += 1,
            Err(err) => assert_eq!(err.error_code(), ErrorCode::AlreadyExists, "{err}"),
        }
    }
    assert_eq!(wins, 1);
}
