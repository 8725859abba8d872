//! Waiting for a claimed warm instance's start report ([`fsb_init::Started`]), which
//! fsb-init writes on stdout and the shim appends to the sandbox's stdout log.
//!
//! The log is watched with inotify, so it is read when written to: no polling loop
//! whose every read was a hop to the blocking pool and whose backoff added up to its
//! pause to each claim (under a burst of claims, both cost the claims themselves).
//! One inotify instance serves the process, read by a thread of its own: closing an
//! instance waits for a kernel grace period (tens of milliseconds on a busy machine),
//! where removing one watch takes microseconds. Without inotify (the per-user limit
//! reached), or if an event is missed, the log is read again every [`REREAD`].
//!
//! Reads are made in place, not on the blocking pool: the file is a local log a few
//! hundred bytes past the offset taken at the start.

use std::{
    collections::HashMap,
    fs::File,
    io::Read,
    mem::MaybeUninit,
    os::fd::OwnedFd,
    path::Path,
    sync::{Arc, Mutex, OnceLock},
    time::{Duration, Instant},
};

use rustix::fs::inotify;
use tokio::sync::Notify;

/// How often the log is read when no event says it changed.
const REREAD: Duration = Duration::from_millis(20);

/// The process's inotify instance and who waits on which watch.
struct Watcher {
    fd: OwnedFd,
    waiting: Mutex<HashMap<i32, Arc<Notify>>>,
}

impl Watcher {
    /// The process's watcher, started on first use; `None` if inotify is unavailable.
    fn get() -> Option<&'static Watcher> {
        static WATCHER: OnceLock<Option<&'static Watcher>> = OnceLock::new();
        *WATCHER.get_or_init(|| match Self::start() {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(error = %e, every = ?REREAD, "no inotify; warm claims read their logs periodically");
                None
            }
        })
    }

    fn start() -> std::io::Result<&'static Watcher> {
        let fd = inotify::init(inotify::CreateFlags::CLOEXEC)?;
        // Lives as long as the process, as its thread does.
        let watcher: &'static Watcher = Box::leak(Box::new(Watcher {
            fd,
            waiting: Mutex::default(),
        }));
        std::thread::Builder::new()
            .name("fsb-log-watch".into())
            .spawn(move || watcher.serve())?;
        Ok(watcher)
    }

    /// Wake the waiter of each watch an event names (all of them if events were lost).
    fn serve(&self) {
        let mut buf = [MaybeUninit::<u8>::uninit(); 4096];
        let mut events = inotify::Reader::new(&self.fd, &mut buf);
        loop {
            match events.next() {
                Ok(event) => {
                    let waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
                    if event.events().contains(inotify::ReadFlags::QUEUE_OVERFLOW) {
                        waiting.values().for_each(|n| n.notify_one());
                    } else if let Some(n) = waiting.get(&event.wd()) {
                        n.notify_one();
                    }
                }
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => {
                    tracing::warn!(error = %e, every = ?REREAD, "reading inotify events failed; warm claims read their logs periodically");
                    return;
                }
            }
        }
    }

    fn watch(&'static self, path: &Path) -> std::io::Result<Watch> {
        let wd = inotify::add_watch(&self.fd, path, inotify::WatchFlags::MODIFY)?;
        let changed = Arc::new(Notify::new());
        self.waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(wd, Arc::clone(&changed));
        Ok(Watch {
            watcher: self,
            wd,
            changed,
        })
    }
}

/// One log's watch; removed when dropped.
struct Watch {
    watcher: &'static Watcher,
    wd: i32,
    changed: Arc<Notify>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        let w = self.watcher;
        w.waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.wd);
        // Already gone if the file was removed; nothing else to undo.
        let _ = inotify::remove_watch(&w.fd, self.wd);
    }
}

/// A stdout log watched from its current end.
pub(crate) struct ReportWatch {
    log: File,
    /// What was appended since the watch began.
    fresh: Vec<u8>,
    changes: Option<Watch>,
}

impl ReportWatch {
    /// Watch `stdout` from its current end: a report already in it (a spent
    /// instance's) does not count. Set up before the spec is sent, so the report cannot
    /// land unseen.
    pub(crate) fn new(stdout: &Path) -> std::io::Result<Self> {
        let mut log = File::open(stdout)?;
        let changes = Watcher::get().and_then(|w| {
            w.watch(stdout)
                .inspect_err(
                    |e| tracing::debug!(error = %e, every = ?REREAD, "no watch on a log; reading it periodically"),
                )
                .ok()
        });
        // Skip what is there: reading to the end leaves the position past it.
        std::io::copy(&mut log, &mut std::io::sink())?;
        Ok(Self {
            log,
            fresh: Vec::new(),
            changes,
        })
    }

    /// The first report appended since [`Self::new`], or `None` if none came by
    /// `deadline`.
    pub(crate) async fn wait(
        mut self,
        deadline: Instant,
    ) -> std::io::Result<Option<fsb_init::Started>> {
        loop {
            self.log.read_to_end(&mut self.fresh)?;
            // Whole lines only: a report caught half-written would parse to a cut
            // number.
            let whole = self
                .fresh
                .iter()
                .rposition(|&b| b == b'\n')
                .map_or(0, |i| i + 1);
            if let Some(started) = String::from_utf8_lossy(&self.fresh[..whole])
                .lines()
                .find_map(fsb_init::Started::parse)
            {
                return Ok(Some(started));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            let pause = left.min(REREAD);
            match &self.changes {
                // Either way, read again: a timeout is the net for a missed event.
                Some(w) => {
                    let _ = tokio::time::timeout(pause, w.changed.notified()).await;
                }
                None => tokio::time::sleep(pause).await,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::io::Write;

    use super::*;

    fn report_line(unix_us: u64) -> String {
        fsb_init::Started {
            pid: 1,
            unix_us,
            spec_us: 0,
        }
        .to_line()
    }

    #[tokio::test]
    async fn a_report_appended_later_is_seen_and_an_earlier_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stdout.log");
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap();
        log.write_all(report_line(1).as_bytes()).unwrap();

        let watch = ReportWatch::new(&path).unwrap();
        let writer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(30)).await;
            // The report may arrive in pieces, after output that is not one.
            log.write_all(b"hello\n").unwrap();
            // Cut inside the number: the first piece alone reads as a shorter one.
            let line = report_line(1_764_000_000_123_456);
            let (a, b) = line.split_at(line.find("123456").unwrap());
            log.write_all(a.as_bytes()).unwrap();
            tokio::time::sleep(Duration::from_millis(10)).await;
            log.write_all(b.as_bytes()).unwrap();
        });
        let started = watch
            .wait(Instant::now() + Duration::from_secs(10))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(started.unix_us, 1_764_000_000_123_456);
        writer.await.unwrap();
    }

    #[tokio::test]
    async fn a_write_to_the_log_wakes_its_watch_and_only_its_watch() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.log"), dir.path().join("b.log"));
        std::fs::write(&a, "").unwrap();
        std::fs::write(&b, "").unwrap();
        let watch_a = ReportWatch::new(&a)
            .unwrap()
            .changes
            .expect("inotify is available here");
        let watch_b = ReportWatch::new(&b)
            .unwrap()
            .changes
            .expect("inotify is available here");
        std::fs::write(&a, "x").unwrap();
        tokio::time::timeout(Duration::from_secs(10), watch_a.changed.notified())
            .await
            .expect("the write to a woke a's watch");
        // b was not written to: no permit waits for it.
        let b_woken = tokio::time::timeout(Duration::from_millis(100), watch_b.changed.notified());
        assert!(b_woken.await.is_err());
        // A dropped watch is gone from the map (its events have no one to wake).
        let wd = watch_a.wd;
        drop(watch_a);
        let waiting = Watcher::get().unwrap().waiting.lock().unwrap();
        assert!(!waiting.contains_key(&wd));
        assert!(waiting.contains_key(&watch_b.wd));
    }

    #[tokio::test]
    async fn no_report_by_the_deadline_is_none() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stdout.log");
        std::fs::write(&path, report_line(1)).unwrap();
        let watch = ReportWatch::new(&path).unwrap();
        let waited = Instant::now();
        let got = watch
            .wait(Instant::now() + Duration::from_millis(50))
            .await
            .unwrap();
        assert!(got.is_none());
        assert!(waited.elapsed() >= Duration::from_millis(50));
    }
}
