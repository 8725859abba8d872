//! Reading a sandbox's logs, and keeping their size bounded.
//!
//! The runc shim (for runc, crun and gVisor alike) writes the init process's stdout
//! and stderr into two plain files ([`LogPaths`]), so logs keep flowing while the agent
//! is down; this module only reads them. [`stream_logs`] reads both files from the
//! start (or from the last N lines of each), then, with `follow`, polls for growth
//! every [`POLL_INTERVAL`] until the caller drops the stream or the optional
//! "exited" signal fires, after which the remaining bytes are drained and the stream
//! ends.
//!
//! Ordering: each file's bytes arrive in order, in chunks of at most
//! [`MAX_CHUNK`] bytes (memory per stream is bounded by that). Interleaving between
//! stdout and stderr is best effort: the two files carry no common clock, so the
//! reader alternates between them, and lines written close together to different
//! streams may come out in either order.
//!
//! Size: [`enforce_limit`] shortens a file that exceeded its budget to its newest
//! half while the shim keeps writing (see there for what is guaranteed).

use std::{
    io::{Read, Seek, SeekFrom, Write},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    time::Duration,
};

use bytes::Bytes;
use fsb_core::SandboxId;
use futures::Stream;
use tokio::{
    io::{AsyncReadExt, AsyncSeekExt},
    sync::watch,
};

use crate::{error::AgentError, runtime::LogPaths};

/// Largest chunk one read produces (and the most a stream buffers).
pub const MAX_CHUNK: usize = 64 * 1024;
/// How often a following stream looks for new bytes.
pub const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Which of the sandbox's output streams a chunk came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LogStream {
    /// The process's stdout.
    Stdout,
    /// The process's stderr.
    Stderr,
}

/// Some bytes of one stream, in that stream's order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogChunk {
    /// Where they came from.
    pub stream: LogStream,
    /// The bytes (not necessarily whole lines).
    pub data: Bytes,
}

/// What to read.
#[derive(Clone, Debug, Default)]
pub struct LogOptions {
    /// Keep reading as the files grow.
    pub follow: bool,
    /// Start at the last N lines of each file (0: from the start).
    pub tail_lines: u64,
    /// With `follow`: once this turns `true` (the sandbox exited) or its sender is
    /// dropped, the remaining bytes are drained and the stream ends.
    pub until_exited: Option<watch::Receiver<bool>>,
}

/// Parse a sandbox id received from outside (a request, a path segment). Only 32
/// lowercase hex characters pass, so no id can name a path outside the log directory.
pub fn validate_sandbox_id(s: &str) -> Result<SandboxId, AgentError> {
    SandboxId::parse("sandbox_id", s).map_err(|e| AgentError::InvalidArgument(e.to_string()))
}

/// The sandbox's logs as a stream of chunks (see the module doc for ordering). The
/// first item is `NotFound` if the log files do not exist. Dropping the stream stops
/// all reading: no task is spawned.
pub fn stream_logs(
    paths: LogPaths,
    options: LogOptions,
) -> impl Stream<Item = Result<LogChunk, AgentError>> + Send + 'static {
    let state = Reader {
        cursors: [
            Cursor::new(LogStream::Stdout, paths.stdout),
            Cursor::new(LogStream::Stderr, paths.stderr),
        ],
        options,
        next: 0,
        phase: Phase::Opening,
        buf: vec![0; MAX_CHUNK],
    };
    futures::stream::unfold(state, |mut state| async move {
        let item = state.next_chunk().await?;
        Some((item, state))
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Opening,
    Reading,
    /// The exit signal fired: read until a quiet round, then once more after a pause
    /// for bytes the shim was still copying.
    Draining {
        quiet_rounds: u8,
    },
    Done,
}

#[derive(Debug)]
struct Cursor {
    stream: LogStream,
    path: PathBuf,
    file: Option<tokio::fs::File>,
    offset: u64,
}

impl Cursor {
    fn new(stream: LogStream, path: PathBuf) -> Self {
        Self {
            stream,
            path,
            file: None,
            offset: 0,
        }
    }

    async fn open(&mut self, tail_lines: u64) -> Result<(), AgentError> {
        let mut file = tokio::fs::File::open(&self.path).await.map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                AgentError::NotFound(format!("log file {}", self.path.display()))
            } else {
                io_error(&self.path, &e)
            }
        })?;
        let len = file
            .metadata()
            .await
            .map_err(|e| io_error(&self.path, &e))?
            .len();
        let mut start = tail_offset(&mut file, len, tail_lines)
            .await
            .map_err(|e| io_error(&self.path, &e))?;
        if self.stream == LogStream::Stdout {
            // A warm instance's first stdout line is fsb-init's start report, not the
            // process's output.
            let report = report_end(&mut file)
                .await
                .map_err(|e| io_error(&self.path, &e))?;
            start = start.max(report);
        }
        file.seek(SeekFrom::Start(start))
            .await
            .map_err(|e| io_error(&self.path, &e))?;
        self.offset = start;
        self.file = Some(file);
        Ok(())
    }

    /// Up to `buf.len()` new bytes, or `None` at the current end of the file.
    async fn read(&mut self, buf: &mut [u8]) -> Result<Option<Bytes>, AgentError> {
        let Some(file) = self.file.as_mut() else {
            return Ok(None);
        };
        let n = file.read(buf).await.map_err(|e| io_error(&self.path, &e))?;
        if n > 0 {
            self.offset += n as u64;
            return Ok(Some(Bytes::copy_from_slice(&buf[..n])));
        }
        // At the end: if the file is now shorter than what we read, it was shortened
        // by [`enforce_limit`]; start over from its (new) beginning.
        let len = file
            .metadata()
            .await
            .map_err(|e| io_error(&self.path, &e))?
            .len();
        if len < self.offset {
            file.seek(SeekFrom::Start(0))
                .await
                .map_err(|e| io_error(&self.path, &e))?;
            self.offset = 0;
        }
        Ok(None)
    }
}

#[derive(Debug)]
struct Reader {
    cursors: [Cursor; 2],
    options: LogOptions,
    /// Which cursor reads first next time (the two alternate).
    next: usize,
    phase: Phase,
    buf: Vec<u8>,
}

impl Reader {
    async fn next_chunk(&mut self) -> Option<Result<LogChunk, AgentError>> {
        loop {
            match self.phase {
                Phase::Done => return None,
                Phase::Opening => {
                    for cursor in &mut self.cursors {
                        if let Err(e) = cursor.open(self.options.tail_lines).await {
                            self.phase = Phase::Done;
                            return Some(Err(e));
                        }
                    }
                    self.phase = Phase::Reading;
                }
                Phase::Reading | Phase::Draining { .. } => {
                    for i in 0..2 {
                        let idx = (self.next + i) % 2;
                        let cursor = &mut self.cursors[idx];
                        match cursor.read(&mut self.buf).await {
                            Ok(Some(data)) => {
                                self.next = (idx + 1) % 2;
                                if let Phase::Draining { quiet_rounds } = &mut self.phase {
                                    *quiet_rounds = 0;
                                }
                                return Some(Ok(LogChunk {
                                    stream: cursor.stream,
                                    data,
                                }));
                            }
                            Ok(None) => {}
                            Err(e) => {
                                self.phase = Phase::Done;
                                return Some(Err(e));
                            }
                        }
                    }
                    // Both files are at their end for now.
                    if !self.options.follow {
                        self.phase = Phase::Done;
                        return None;
                    }
                    self.wait().await;
                }
            }
        }
    }

    /// Nothing to read: wait for growth, or move towards the end after the exit signal.
    async fn wait(&mut self) {
        match &mut self.phase {
            Phase::Draining { quiet_rounds } => {
                *quiet_rounds += 1;
                if *quiet_rounds >= 2 {
                    self.phase = Phase::Done;
                } else {
                    tokio::time::sleep(POLL_INTERVAL).await;
                }
            }
            _ => match self.options.until_exited.as_mut() {
                None => tokio::time::sleep(POLL_INTERVAL).await,
                Some(rx) => {
                    if *rx.borrow_and_update() {
                        self.phase = Phase::Draining { quiet_rounds: 0 };
                        return;
                    }
                    tokio::select! {
                        changed = rx.changed() => {
                            // A dropped sender will never tell us; treat it as exited.
                            if changed.is_err() || *rx.borrow_and_update() {
                                self.phase = Phase::Draining { quiet_rounds: 0 };
                            }
                        }
                        () = tokio::time::sleep(POLL_INTERVAL) => {}
                    }
                }
            },
        }
    }
}

/// Offset where the last `lines` lines of a file of length `len` start (0 for all).
/// A final newline ends the last line rather than starting an empty one.
/// Where the process's own output starts: after fsb-init's report line if the file
/// starts with one, else 0.
async fn report_end(file: &mut tokio::fs::File) -> std::io::Result<u64> {
    let prefix = fsb_init::REPORT_PREFIX.as_bytes();
    let mut head = [0u8; 256];
    file.seek(SeekFrom::Start(0)).await?;
    let mut n = 0;
    while n < head.len() {
        let got = file.read(&mut head[n..]).await?;
        if got == 0 {
            break;
        }
        n += got;
    }
    let head = &head[..n];
    if !head.starts_with(prefix) {
        return Ok(0);
    }
    Ok(head
        .iter()
        .position(|b| *b == b'\n')
        .map_or(0, |i| i as u64 + 1))
}

async fn tail_offset(file: &mut tokio::fs::File, len: u64, lines: u64) -> std::io::Result<u64> {
    if lines == 0 || len == 0 {
        return Ok(0);
    }
    let mut buf = vec![0u8; MAX_CHUNK];
    let mut last = [0u8; 1];
    file.seek(SeekFrom::Start(len - 1)).await?;
    file.read_exact(&mut last).await?;
    let mut pos = if last[0] == b'\n' { len - 1 } else { len };
    let mut seen = 0u64;
    while pos > 0 {
        let start = pos.saturating_sub(MAX_CHUNK as u64);
        // At most MAX_CHUNK, so the cast cannot truncate.
        let chunk = &mut buf[..(pos - start) as usize];
        file.seek(SeekFrom::Start(start)).await?;
        file.read_exact(chunk).await?;
        for (i, b) in chunk.iter().enumerate().rev() {
            if *b == b'\n' {
                seen += 1;
                if seen == lines {
                    return Ok(start + i as u64 + 1);
                }
            }
        }
        pos = start;
    }
    Ok(0)
}

fn io_error(path: &Path, e: &std::io::Error) -> AgentError {
    AgentError::Internal(format!("{}: {e}", path.display()))
}

/// Shorten each log file larger than `max_bytes` to (about) its newest half, while the
/// shim keeps writing to it. Returns the bytes dropped in total.
///
/// Why this is safe with the shim's open descriptor: containerd's runc shim
/// (`pkg/process/io.go`, `copyPipes`, containerd 1.6 included) opens a plain-file
/// stdout/stderr with `O_WRONLY|O_APPEND`. With `O_APPEND` every write goes to the
/// current end of the file, so shortening the file never leaves a sparse hole in
/// front of later writes (without `O_APPEND` it would: the shim's offset would stay
/// where it was, past the new end).
///
/// How, and what is guaranteed:
/// - Preferred: `fallocate(FALLOC_FL_COLLAPSE_RANGE)` removes the oldest whole
///   filesystem blocks in place (ext4 and xfs support it; tmpfs, overlayfs upper dirs
///   on other filesystems may not). The kernel does it under the inode lock, so an
///   append is either before or after it: **no byte is lost or reordered**. The kept
///   part is the newest half rounded up to a block (at most `max_bytes / 2` plus one
///   block) and may start mid-line.
/// - Fallback (collapse unsupported, or less than one block to cut): copy-truncate.
///   The newest half is copied aside, the file truncated to zero and the copy
///   appended back. Bytes the shim appends between the copy and the truncation are
///   **lost**, and bytes it appends between the truncation and the write-back come
///   **before** the restored half. Both windows are as long as copying `max_bytes / 2`.
/// - Readers: a [`stream_logs`] follower notices the file got shorter than its
///   position and starts over at the new beginning, so it may repeat up to the kept
///   half; if the file grows past its old position between two polls, the follower
///   misses the change and skips the bytes in between.
pub async fn enforce_limit(paths: &LogPaths, max_bytes: u64) -> Result<u64, AgentError> {
    let files = [paths.stdout.clone(), paths.stderr.clone()];
    tokio::task::spawn_blocking(move || {
        let mut dropped = 0;
        for path in &files {
            dropped += shorten(path, max_bytes).map_err(|e| io_error(path, &e))?;
        }
        Ok(dropped)
    })
    .await
    .map_err(|e| AgentError::Internal(format!("log rotation task: {e}")))?
}

/// [`enforce_limit`] for one file.
fn shorten(path: &Path, max_bytes: u64) -> std::io::Result<u64> {
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let meta = file.metadata()?;
    let len = meta.len();
    if len <= max_bytes {
        return Ok(0);
    }
    let keep = max_bytes / 2;
    let block = meta.blksize().max(1);
    let cut = (len - keep) / block * block;
    // COLLAPSE_RANGE must leave at least one byte after the range.
    if cut > 0 && cut < len {
        match rustix::fs::fallocate(&file, rustix::fs::FallocateFlags::COLLAPSE_RANGE, 0, cut) {
            Ok(()) => return Ok(cut),
            Err(e) if e == rustix::io::Errno::OPNOTSUPP || e == rustix::io::Errno::INVAL => {}
            Err(e) => return Err(e.into()),
        }
    }
    copy_truncate(path, file, len, keep)
}

/// The fallback of [`shorten`]: keep the newest `keep` of `len` bytes via a side file.
fn copy_truncate(
    path: &Path,
    mut file: std::fs::File,
    len: u64,
    keep: u64,
) -> std::io::Result<u64> {
    let side = path.with_extension("log.rotating");
    let mut saved = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&side)?;
    let result = (|| {
        file.seek(SeekFrom::Start(len - keep))?;
        copy_chunked(&mut (&file).take(keep), &mut saved)?;
        file.set_len(0)?;
        saved.seek(SeekFrom::Start(0))?;
        let mut append = std::fs::OpenOptions::new().append(true).open(path)?;
        copy_chunked(&mut saved, &mut append)?;
        Ok(len - keep)
    })();
    std::fs::remove_file(&side)?;
    result
}

fn copy_chunked(from: &mut impl Read, to: &mut impl Write) -> std::io::Result<()> {
    let mut buf = vec![0u8; MAX_CHUNK];
    loop {
        let n = from.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        to.write_all(&buf[..n])?;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::io::Write;

    use futures::StreamExt;

    use super::*;

    fn paths(dir: &Path) -> LogPaths {
        let paths = LogPaths {
            dir: dir.to_owned(),
            stdout: dir.join("stdout.log"),
            stderr: dir.join("stderr.log"),
        };
        std::fs::write(&paths.stdout, b"").unwrap();
        std::fs::write(&paths.stderr, b"").unwrap();
        paths
    }

    fn append(path: &Path, data: &[u8]) {
        let mut f = std::fs::OpenOptions::new().append(true).open(path).unwrap();
        f.write_all(data).unwrap();
    }

    /// Everything a finished stream produced, per stream.
    async fn collect(s: impl Stream<Item = Result<LogChunk, AgentError>>) -> (Vec<u8>, Vec<u8>) {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let mut s = std::pin::pin!(s);
        while let Some(chunk) = s.next().await {
            let chunk = chunk.unwrap();
            match chunk.stream {
                LogStream::Stdout => out.extend_from_slice(&chunk.data),
                LogStream::Stderr => err.extend_from_slice(&chunk.data),
            }
        }
        (out, err)
    }

    #[tokio::test]
    async fn reads_both_files_from_the_start() {
        let dir = tempfile::tempdir().unwrap();
        let p = paths(dir.path());
        append(&p.stdout, b"a\nb\n");
        append(&p.stderr, b"e\n");
        let (out, err) = collect(stream_logs(p, LogOptions::default())).await;
        assert_eq!(out, b"a\nb\n");
        assert_eq!(err, b"e\n");
    }

    #[tokio::test]
    async fn a_warm_instance_start_report_is_not_part_of_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let p = paths(dir.path());
        let report = fsb_init::Started {
            pid: 7,
            unix_us: 1,
            spec_us: 1,
        }
        .to_line();
        append(&p.stdout, format!("{report}out-1\nout-2\n").as_bytes());
        append(&p.stderr, report.as_bytes());
        let (out, err) = collect(stream_logs(p.clone(), LogOptions::default())).await;
        assert_eq!(out, b"out-1\nout-2\n");
        assert_eq!(
            err,
            report.as_bytes(),
            "only fsb-init's stdout report is hidden"
        );
        let tail = LogOptions {
            tail_lines: 5,
            ..LogOptions::default()
        };
        assert_eq!(collect(stream_logs(p, tail)).await.0, b"out-1\nout-2\n");
    }

    #[tokio::test]
    async fn tail_keeps_the_last_lines_of_each_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = paths(dir.path());
        append(&p.stdout, b"one\ntwo\nthree\n");
        append(&p.stderr, b"x\ny\nno-newline");
        let opts = |n| LogOptions {
            tail_lines: n,
            ..LogOptions::default()
        };
        assert_eq!(
            collect(stream_logs(p.clone(), opts(1))).await,
            (b"three\n".to_vec(), b"no-newline".to_vec())
        );
        assert_eq!(
            collect(stream_logs(p.clone(), opts(2))).await,
            (b"two\nthree\n".to_vec(), b"y\nno-newline".to_vec())
        );
        assert_eq!(
            collect(stream_logs(p, opts(10))).await,
            (b"one\ntwo\nthree\n".to_vec(), b"x\ny\nno-newline".to_vec())
        );
    }

    #[tokio::test]
    async fn tail_across_chunk_boundaries() {
        let dir = tempfile::tempdir().unwrap();
        let p = paths(dir.path());
        let line = format!("{}\n", "z".repeat(1000));
        for _ in 0..200 {
            append(&p.stdout, line.as_bytes());
        }
        append(&p.stdout, b"last\n");
        let (out, _) = collect(stream_logs(
            p,
            LogOptions {
                tail_lines: 100,
                ..LogOptions::default()
            },
        ))
        .await;
        assert_eq!(out.len(), 99 * line.len() + 5);
        assert!(out.ends_with(b"last\n"));
    }

    #[tokio::test]
    async fn chunks_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let p = paths(dir.path());
        append(&p.stdout, &vec![b'q'; 3 * MAX_CHUNK + 7]);
        let mut s = std::pin::pin!(stream_logs(p, LogOptions::default()));
        let mut total = 0;
        while let Some(c) = s.next().await {
            let c = c.unwrap();
            assert!(c.data.len() <= MAX_CHUNK);
            total += c.data.len();
        }
        assert_eq!(total, 3 * MAX_CHUNK + 7);
    }

    #[tokio::test]
    async fn follow_sees_appended_lines_in_order_and_ends_after_exit() {
        let dir = tempfile::tempdir().unwrap();
        let p = paths(dir.path());
        append(&p.stdout, b"line-0\n");
        let (tx, rx) = watch::channel(false);
        let mut s = Box::pin(stream_logs(
            p.clone(),
            LogOptions {
                follow: true,
                tail_lines: 0,
                until_exited: Some(rx),
            },
        ));
        let first = s.next().await.unwrap().unwrap();
        assert_eq!(&first.data[..], b"line-0\n");
        let writer = {
            let p = p.clone();
            tokio::spawn(async move {
                for i in 1..=20 {
                    append(&p.stdout, format!("line-{i}\n").as_bytes());
                    append(&p.stderr, format!("err-{i}\n").as_bytes());
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                tx.send(true).unwrap();
            })
        };
        let (out, err) = tokio::time::timeout(Duration::from_secs(10), collect(s))
            .await
            .expect("the stream ends after the exit signal");
        writer.await.unwrap();
        let expected_out: String = (1..=20).map(|i| format!("line-{i}\n")).collect();
        let expected_err: String = (1..=20).map(|i| format!("err-{i}\n")).collect();
        assert_eq!(String::from_utf8(out).unwrap(), expected_out);
        assert_eq!(String::from_utf8(err).unwrap(), expected_err);
    }

    #[tokio::test]
    async fn a_dropped_exit_sender_ends_a_follower() {
        let dir = tempfile::tempdir().unwrap();
        let p = paths(dir.path());
        append(&p.stdout, b"x\n");
        let (tx, rx) = watch::channel(false);
        let s = stream_logs(
            p,
            LogOptions {
                follow: true,
                tail_lines: 0,
                until_exited: Some(rx),
            },
        );
        drop(tx);
        let (out, _) = tokio::time::timeout(Duration::from_secs(5), collect(s))
            .await
            .unwrap();
        assert_eq!(out, b"x\n");
    }

    #[tokio::test]
    async fn dropping_the_stream_stops_the_poller() {
        let dir = tempfile::tempdir().unwrap();
        let p = paths(dir.path());
        let (tx, rx) = watch::channel(false);
        let mut s = Box::pin(stream_logs(
            p.clone(),
            LogOptions {
                follow: true,
                tail_lines: 0,
                until_exited: Some(rx),
            },
        ));
        append(&p.stdout, b"hello\n");
        assert_eq!(&s.next().await.unwrap().unwrap().data[..], b"hello\n");
        // The stream holds the only receiver: dropping it is visible to the sender,
        // which shows nothing (no task, no poller) survives the stream.
        assert_eq!(tx.receiver_count(), 1);
        drop(s);
        assert_eq!(tx.receiver_count(), 0);
        assert!(tx.is_closed());
    }

    #[tokio::test]
    async fn missing_files_are_not_found() {
        let dir = tempfile::tempdir().unwrap();
        let p = LogPaths {
            dir: dir.path().to_owned(),
            stdout: dir.path().join("nope.log"),
            stderr: dir.path().join("nope2.log"),
        };
        let mut s = Box::pin(stream_logs(p, LogOptions::default()));
        let err = s.next().await.unwrap().unwrap_err();
        assert!(err.is_not_found(), "{err}");
        assert!(s.next().await.is_none());
    }

    #[test]
    fn ids_from_outside_are_validated() {
        for bad in [
            "../etc/passwd",
            "../../0123456789abcdef0123456789abcd",
            "0123456789abcdef0123456789abcdef/..",
            "",
            "0123456789ABCDEF0123456789ABCDEF",
        ] {
            let err = validate_sandbox_id(bad).unwrap_err();
            assert!(
                matches!(err, AgentError::InvalidArgument(_)),
                "{bad}: {err}"
            );
        }
        let id = validate_sandbox_id("0123456789abcdef0123456789abcdef").unwrap();
        assert_eq!(id.as_str(), "0123456789abcdef0123456789abcdef");
    }

    #[tokio::test]
    async fn enforce_limit_keeps_the_newest_half_with_a_live_appender() {
        let dir = tempfile::tempdir().unwrap();
        let p = paths(dir.path());
        // The shim's descriptor: O_WRONLY|O_APPEND, held open throughout.
        let mut shim = std::fs::OpenOptions::new()
            .append(true)
            .open(&p.stdout)
            .unwrap();
        let lines: Vec<String> = (0..20_000).map(|i| format!("line {i:06}\n")).collect();
        for l in &lines[..10_000] {
            shim.write_all(l.as_bytes()).unwrap();
        }
        let before = std::fs::metadata(&p.stdout).unwrap().len();
        let max = 64 * 1024;
        let dropped = enforce_limit(&p, max).await.unwrap();
        let after = std::fs::metadata(&p.stdout).unwrap().len();
        assert_eq!(before - dropped, after);
        assert!(after >= max / 2, "{after}");
        assert!(after <= max / 2 + 64 * 1024, "{after}");
        for l in &lines[10_000..] {
            shim.write_all(l.as_bytes()).unwrap();
        }
        let content = std::fs::read(&p.stdout).unwrap();
        assert!(!content.contains(&0), "no sparse hole");
        let all: String = lines.concat();
        assert!(
            all.ends_with(std::str::from_utf8(&content).unwrap()),
            "the file is a suffix of what was written, in order"
        );
        assert!(content.ends_with(lines[19_999].as_bytes()));
        // Under the limit: nothing happens.
        assert_eq!(enforce_limit(&p, u64::MAX).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn enforce_limit_falls_back_to_copy_truncate_below_a_block() {
        let dir = tempfile::tempdir().unwrap();
        let p = paths(dir.path());
        append(&p.stderr, &b"0123456789".repeat(100));
        let dropped = enforce_limit(&p, 100).await.unwrap();
        assert_eq!(dropped, 950);
        assert_eq!(std::fs::read(&p.stderr).unwrap(), b"0123456789".repeat(5));
        assert!(!p.stderr.with_extension("log.rotating").exists());
        // Appends after the fallback land at the end (O_APPEND), no hole.
        append(&p.stderr, b"!");
        let content = std::fs::read(&p.stderr).unwrap();
        assert_eq!(content.len(), 51);
        assert!(!content.contains(&0));
    }

    #[tokio::test]
    async fn a_follower_restarts_after_the_file_shrank() {
        let dir = tempfile::tempdir().unwrap();
        let p = paths(dir.path());
        append(&p.stdout, &b"a".repeat(1000));
        let mut s = Box::pin(stream_logs(
            p.clone(),
            LogOptions {
                follow: true,
                ..LogOptions::default()
            },
        ));
        assert_eq!(s.next().await.unwrap().unwrap().data.len(), 1000);
        enforce_limit(&p, 100).await.unwrap();
        let next = tokio::time::timeout(Duration::from_secs(5), s.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(&next.data[..], &b"a".repeat(50)[..]);
    }
}
