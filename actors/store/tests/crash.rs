//! Crash safety: a child process (this test binary, re-run in writer mode) creates
//! records and reports each acknowledged create on stdout; the parent SIGKILLs it
//! mid-way, reopens the database and checks every acknowledged record is there.

mod common;

use std::{
    io::{BufRead, BufReader, Write},
    process::{Command, Stdio},
};

use common::record;
use fsb_core::{NamespaceName, SandboxName};
use fsb_store::{ListFilter, SandboxStore, SqliteStore};

const WRITER_DB: &str = "FSB_STORE_CRASH_WRITER_DB";
const WRITER_START: &str = "FSB_STORE_CRASH_WRITER_START";

/// Writer mode: only does something when the parent sets [`WRITER_DB`].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_writer_child() {
    let Ok(path) = std::env::var(WRITER_DB) else {
        return;
    };
    let start: usize = std::env::var(WRITER_START).unwrap().parse().unwrap();
    let store = SqliteStore::open(&path).unwrap();
    let mut out = std::io::stdout().lock();
    for i in start..start + 100_000 {
        let name = format!("sbx-{i}");
        store
            .create(record("crash", &name, Some(&format!("req-{i}"))))
            .await
            .unwrap();
        writeln!(out, "acked {i}").unwrap();
        out.flush().unwrap();
    }
}

/// The create an `acked N` line acknowledges. Not only at the line's start: with
/// `--nocapture` libtest prints `test crash_writer_child ... ` without a newline
/// before the test runs, so the first ack shares its line (missing it made the bound
/// below fail whenever a kill also caught a create in flight).
fn ack(line: &str) -> Option<usize> {
    let (_, n) = line.split_once("acked ")?;
    Some(n.trim().parse().expect("an ack names a number"))
}

#[tokio::test]
async fn acknowledged_creates_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    let mut acked: Vec<usize> = Vec::new();
    let mut next = 0;
    // Kill at a different point each round; reopen the same file between rounds.
    for (round_no, kill_after) in [7usize, 31, 64].into_iter().enumerate() {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "crash_writer_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(WRITER_DB, &path)
            .env(WRITER_START, next.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut round = 0;
        while round < kill_after {
            let line = lines.next().expect("writer exited early").unwrap();
            if let Some(i) = ack(&line) {
                acked.push(i);
                round += 1;
            }
        }
        // Child::kill is SIGKILL on Unix: no destructors, no checkpoint.
        child.kill().unwrap();
        // Acks the child printed before it died still count.
        for line in lines {
            if let Some(i) = ack(&line.unwrap()) {
                acked.push(i);
            }
        }
        child.wait().unwrap();

        let store = SqliteStore::open(&path).expect("database opens cleanly after SIGKILL");
        let ns = NamespaceName::parse("ns", "crash").unwrap();
        for i in &acked {
            let name = SandboxName::parse("name", &format!("sbx-{i}")).unwrap();
            assert!(
                store.get(&ns, &name).await.unwrap().is_some(),
                "acknowledged create {i} lost"
            );
        }
        let all = store.list(&ListFilter::default()).await.unwrap();
        // Each kill may leave one create committed but not yet acknowledged.
        assert!(
            all.len() >= acked.len() && all.len() <= acked.len() + round_no + 1,
            "{} stored, {} acknowledged",
            all.len(),
            acked.len()
        );
        next = all.len() + 1000 * (acked.len() + 1);
        drop(store);

        let raw = rusqlite::Connection::open(&path).unwrap();
        let check: String = raw
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(check, "ok");
    }
    assert!(acked.len() >= 7 + 31 + 64);
}
