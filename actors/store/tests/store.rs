//! Every operation and error of the SQLite store.

mod common;

use std::collections::BTreeMap;

use common::record;
use fsb_core::{ErrorCode, HasErrorCode, NamespaceName, PoolName, RequestId, SandboxName};
use fsb_store::{
    EventKind, ListFilter, Phase, SandboxStore, SqliteConfig, SqliteStore, StartPath, StartStage,
    StartTimeline, StoreError,
};

fn ns(s: &str) -> NamespaceName {
    NamespaceName::parse("ns", s).expect("namespace")
}
fn nm(s: &str) -> SandboxName {
    SandboxName::parse("name", s).expect("name")
}

#[tokio::test]
async fn create_then_get_by_every_key() {
    let store = SqliteStore::in_memory().unwrap();
    let mut rec = record("team-a", "web-1", Some("req-1"));
    rec.agent = Some("local".into());
    rec.node = Some("node-1".into());
    rec.exit_code = Some(3);
    rec.expire_time_ms = Some(42);
    rec.phase = Phase::Running;
    rec.timeline = Some(timeline());
    let stored = store.create(rec.clone()).await.unwrap();
    assert!(stored.resource_version > 0);
    let expected = fsb_store::StoredSandbox {
        resource_version: stored.resource_version,
        ..rec.clone()
    };
    assert_eq!(stored, expected);
    assert_eq!(
        store.get(&ns("team-a"), &nm("web-1")).await.unwrap(),
        Some(expected.clone())
    );
    let req = RequestId::parse("r", "req-1").unwrap();
    assert_eq!(
        store.get_by_request_id(&req).await.unwrap(),
        Some(expected.clone())
    );
    assert_eq!(
        store.get_by_sandbox_id(&rec.sandbox_id).await.unwrap(),
        Some(expected)
    );
    assert_eq!(store.get(&ns("team-a"), &nm("nope")).await.unwrap(), None);
    let other = RequestId::parse("r", "req-2").unwrap();
    assert_eq!(store.get_by_request_id(&other).await.unwrap(), None);
}

#[tokio::test]
async fn create_rejects_taken_name_request_id_and_sandbox_id() {
    let store = SqliteStore::in_memory().unwrap();
    let first = store
        .create(record("a", "one", Some("req-1")))
        .await
        .unwrap();

    let err = store.create(record("a", "one", None)).await.unwrap_err();
    assert!(matches!(err, StoreError::AlreadyExists { .. }), "{err}");
    assert_eq!(err.error_code(), ErrorCode::AlreadyExists);

    let err = store
        .create(record("a", "two", Some("req-1")))
        .await
        .unwrap_err();
    match &err {
        StoreError::RequestIdTaken {
            namespace, name, ..
        } => {
            assert_eq!((namespace.as_str(), name.as_str()), ("a", "one"));
        }
        other => panic!("wrong error {other}"),
    }
    assert_eq!(err.error_code(), ErrorCode::AlreadyExists);

    let mut dup = record("a", "three", None);
    dup.sandbox_id = first.sandbox_id.clone();
    let err = store.create(dup).await.unwrap_err();
    assert!(matches!(err, StoreError::SandboxIdTaken { .. }), "{err}");
    assert_eq!(err.error_code(), ErrorCode::AlreadyExists);

    // Nothing half-written.
    assert_eq!(store.list(&ListFilter::default()).await.unwrap().len(), 1);
}

#[tokio::test]
async fn update_checks_version_and_bumps_it() {
    let store = SqliteStore::in_memory().unwrap();
    let v1 = store.create(record("a", "one", None)).await.unwrap();
    let mut change = v1.clone();
    change.phase = Phase::Bound;
    change.labels.insert("tier".into(), "gold".into());
    change.uid = "ignored".into();
    change.created_ms = 1;
    let v2 = store.update(change).await.unwrap();
    assert!(v2.resource_version > v1.resource_version);
    assert_eq!(v2.phase, Phase::Bound);
    assert_eq!(v2.uid, v1.uid, "uid is immutable");
    assert_eq!(v2.created_ms, v1.created_ms, "created_ms is immutable");
    assert_eq!(
        store.get(&v1.namespace, &v1.name).await.unwrap(),
        Some(v2.clone())
    );

    // Stale version: Aborted, nothing changed.
    let mut stale = v1.clone();
    stale.phase = Phase::Failed;
    let err = store.update(stale).await.unwrap_err();
    assert!(err.is_conflict(), "{err}");
    assert_eq!(err.error_code(), ErrorCode::Aborted);
    assert_eq!(store.get(&v1.namespace, &v1.name).await.unwrap(), Some(v2));

    // Gone: NotFound.
    let err = store.update(record("a", "ghost", None)).await.unwrap_err();
    assert!(matches!(err, StoreError::NotFound { .. }), "{err}");
    assert_eq!(err.error_code(), ErrorCode::NotFound);
}

#[tokio::test]
async fn update_cannot_steal_another_records_ids() {
    let store = SqliteStore::in_memory().unwrap();
    let one = store
        .create(record("a", "one", Some("req-1")))
        .await
        .unwrap();
    let two = store.create(record("a", "two", None)).await.unwrap();
    let mut steal = two.clone();
    steal.request_id = one.request_id.clone();
    let err = store.update(steal).await.unwrap_err();
    assert!(matches!(err, StoreError::RequestIdTaken { .. }), "{err}");
    let mut steal = two.clone();
    steal.sandbox_id = one.sandbox_id.clone();
    let err = store.update(steal).await.unwrap_err();
    assert!(matches!(err, StoreError::SandboxIdTaken { .. }), "{err}");
    // Keeping its own ids is fine.
    let mut same = one.clone();
    same.phase = Phase::Running;
    store.update(same).await.unwrap();
}

#[tokio::test]
async fn delete_with_and_without_version() {
    let store = SqliteStore::in_memory().unwrap();
    let one = store
        .create(record("a", "one", Some("req-1")))
        .await
        .unwrap();
    let two = store.create(record("a", "two", None)).await.unwrap();

    let err = store
        .delete(&one.namespace, &one.name, Some(one.resource_version + 100))
        .await
        .unwrap_err();
    assert_eq!(err.error_code(), ErrorCode::Aborted, "{err}");
    assert!(
        store
            .get(&one.namespace, &one.name)
            .await
            .unwrap()
            .is_some()
    );

    let gone = store
        .delete(&one.namespace, &one.name, Some(one.resource_version))
        .await
        .unwrap();
    assert_eq!(gone.uid, one.uid);
    assert!(gone.resource_version > two.resource_version);
    assert_eq!(store.get(&one.namespace, &one.name).await.unwrap(), None);
    let req = RequestId::parse("r", "req-1").unwrap();
    assert_eq!(store.get_by_request_id(&req).await.unwrap(), None);

    store.delete(&two.namespace, &two.name, None).await.unwrap();
    let err = store
        .delete(&two.namespace, &two.name, None)
        .await
        .unwrap_err();
    assert_eq!(err.error_code(), ErrorCode::NotFound, "{err}");

    // The name and the request id are free again.
    store
        .create(record("a", "one", Some("req-1")))
        .await
        .unwrap();
}

#[tokio::test]
async fn list_filters_by_namespace_pool_and_labels() {
    let store = SqliteStore::in_memory().unwrap();
    store.create(record("a", "one", None)).await.unwrap();
    store.create(record("a", "two", None)).await.unwrap();
    store.create(record("b", "one", None)).await.unwrap();

    let all = store.list(&ListFilter::default()).await.unwrap();
    let keys: Vec<String> = all.iter().map(|r| r.key()).collect();
    assert_eq!(keys, ["a/one", "a/two", "b/one"]);

    let in_a = ListFilter {
        namespace: Some(ns("a")),
        ..Default::default()
    };
    assert_eq!(store.list(&in_a).await.unwrap().len(), 2);

    let by_label = ListFilter {
        labels: BTreeMap::from([("app".into(), "one".into())]),
        ..Default::default()
    };
    let keys: Vec<String> = store
        .list(&by_label)
        .await
        .unwrap()
        .iter()
        .map(|r| r.key())
        .collect();
    assert_eq!(keys, ["a/one", "b/one"]);

    let both = ListFilter {
        namespace: Some(ns("b")),
        labels: BTreeMap::from([("app".into(), "one".into())]),
        ..Default::default()
    };
    assert_eq!(store.list(&both).await.unwrap().len(), 1);

    let default_pool = ListFilter {
        pool: Some(PoolName::parse("pool", "default").unwrap()),
        ..Default::default()
    };
    assert_eq!(store.list(&default_pool).await.unwrap().len(), 3);
    let other_pool = ListFilter {
        pool: Some(PoolName::parse("pool", "gpu").unwrap()),
        ..Default::default()
    };
    assert!(store.list(&other_pool).await.unwrap().is_empty());
}

#[tokio::test]
async fn watch_sees_committed_changes_in_order() {
    let store = SqliteStore::in_memory().unwrap();
    let mut watch = store.watch();
    let v1 = store.create(record("a", "one", None)).await.unwrap();
    // A failed write publishes nothing.
    store.create(record("a", "one", None)).await.unwrap_err();
    let mut change = v1.clone();
    change.phase = Phase::Running;
    let v2 = store.update(change).await.unwrap();
    let v3 = store.delete(&v1.namespace, &v1.name, None).await.unwrap();

    let mut seen = Vec::new();
    for _ in 0..3 {
        let ev = watch.recv().await.unwrap();
        seen.push((ev.kind, ev.record));
    }
    assert_eq!(
        seen,
        vec![
            (EventKind::Added, v1),
            (EventKind::Modified, v2),
            (EventKind::Deleted, v3)
        ]
    );
    assert!(watch.try_recv().is_err(), "no extra events");
}

#[tokio::test]
async fn file_store_reopens_with_data_and_schema_version() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    let created = {
        let store = SqliteStore::open(&path).unwrap();
        store
            .create(record("a", "one", Some("req-1")))
            .await
            .unwrap()
    };
    let store = SqliteStore::open(&path).unwrap();
    assert_eq!(
        store.get(&created.namespace, &created.name).await.unwrap(),
        Some(created.clone())
    );
    // The revision counter continues: versions never repeat across restarts.
    let next = store.create(record("a", "two", None)).await.unwrap();
    assert!(next.resource_version > created.resource_version);

    let raw = rusqlite::Connection::open(&path).unwrap();
    let mode: String = raw
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    let version: i64 = raw
        .query_row("SELECT version FROM schema_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, SqliteStore::schema_version());
}

fn timeline() -> StartTimeline {
    StartTimeline {
        path: StartPath::Warm,
        note: "a note".into(),
        total_us: 1_500,
        started_unix_us: 1_700_000_000_000_000,
        stages: vec![StartStage {
            name: "runtime".into(),
            start_us: 100,
            duration_us: 1_400,
        }],
    }
}

#[tokio::test]
async fn a_version_1_database_gains_the_timeline_column_and_keeps_its_rows() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    let old = {
        let store = SqliteStore::open(&path).unwrap();
        store
            .create(record("a", "old", Some("req-1")))
            .await
            .unwrap()
    };
    // Schema 1 is schema 2 without the column: turn the file into a version 1 one.
    let raw = rusqlite::Connection::open(&path).unwrap();
    raw.execute_batch(
        "ALTER TABLE sandboxes DROP COLUMN timeline_json;
         UPDATE schema_version SET version = 1;",
    )
    .unwrap();
    drop(raw);

    let store = SqliteStore::open(&path).unwrap();
    let read = store.get(&old.namespace, &old.name).await.unwrap().unwrap();
    assert_eq!(read, old, "a row written before the column reads as it was");
    assert_eq!(read.timeline, None);
    let updated = store
        .update(fsb_store::StoredSandbox {
            timeline: Some(timeline()),
            ..read
        })
        .await
        .unwrap();
    drop(store);
    let store = SqliteStore::open(&path).unwrap();
    let read = store.get(&old.namespace, &old.name).await.unwrap().unwrap();
    assert_eq!(read, updated);
    assert_eq!(read.timeline, Some(timeline()));
    let raw = rusqlite::Connection::open(&path).unwrap();
    let version: i64 = raw
        .query_row("SELECT version FROM schema_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, 2);
}

#[tokio::test]
async fn newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    drop(SqliteStore::open(&path).unwrap());
    let raw = rusqlite::Connection::open(&path).unwrap();
    raw.execute("UPDATE schema_version SET version = 99", [])
        .unwrap();
    drop(raw);
    let err = SqliteStore::open(&path).unwrap_err();
    assert!(
        matches!(err, StoreError::SchemaTooNew { found: 99, .. }),
        "{err}"
    );
    assert_eq!(err.error_code(), ErrorCode::FailedPrecondition);
}

#[tokio::test]
async fn corrupt_rows_are_internal_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    let store = SqliteStore::open(&path).unwrap();
    let rec = store.create(record("a", "one", None)).await.unwrap();
    let raw = rusqlite::Connection::open(&path).unwrap();
    raw.execute("UPDATE sandboxes SET phase = 'Exploded'", [])
        .unwrap();
    let err = store.get(&rec.namespace, &rec.name).await.unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Corrupt {
                column: "phase",
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(err.error_code(), ErrorCode::Internal);
}

#[tokio::test]
async fn locked_past_busy_timeout_is_unavailable() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    let config = SqliteConfig {
        busy_timeout: std::time::Duration::from_millis(50),
        ..Default::default()
    };
    let store = SqliteStore::open_with(&path, &config).unwrap();
    let raw = rusqlite::Connection::open(&path).unwrap();
    raw.execute_batch("BEGIN IMMEDIATE").unwrap();
    let err = store.create(record("a", "one", None)).await.unwrap_err();
    assert!(matches!(err, StoreError::Busy(_)), "{err}");
    assert_eq!(err.error_code(), ErrorCode::Unavailable);
    raw.execute_batch("ROLLBACK").unwrap();
    store.create(record("a", "one", None)).await.unwrap();
}

#[test]
fn phases_round_trip() {
    for phase in Phase::ALL {
        assert_eq!(Phase::parse(phase.as_str()), Some(phase));
    }
    assert_eq!(Phase::parse("running"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_of_a_file_store_do_not_wait_for_a_write_in_progress() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    let store = SqliteStore::open(&path).unwrap();
    let a = store.create(record("a", "one", None)).await.unwrap();
    // Another process holds SQLite's write lock, so the store's next write waits
    // (busy timeout) while holding the store's writer.
    let other = rusqlite::Connection::open(&path).unwrap();
    other.execute_batch("BEGIN IMMEDIATE").unwrap();
    let writer = store.clone();
    let write = tokio::spawn(async move { writer.create(record("a", "two", None)).await });
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert!(
        !write.is_finished(),
        "the write waits for the other process"
    );
    // A create's lookups meanwhile answer at once, with the last commit.
    let got = tokio::time::timeout(
        std::time::Duration::from_secs(1),
        store.get(&a.namespace, &a.name),
    )
    .await
    .expect("a read waited for the write in progress")
    .unwrap();
    assert_eq!(got, Some(a.clone()));
    let two = SandboxName::parse("name", "two").unwrap();
    assert_eq!(store.get(&a.namespace, &two).await.unwrap(), None);
    other.execute_batch("COMMIT").unwrap();
    let b = write.await.unwrap().unwrap();
    // And a read after a commit sees it.
    assert_eq!(store.get(&b.namespace, &b.name).await.unwrap(), Some(b));
}
