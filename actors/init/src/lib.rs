//! fsb-init: PID 1 of a warm instance.
//!
//! A warm instance is a container created and started before anyone asked for it;
//! its PID 1 is this program, injected read-only. At its start it forks the runner
//! ([`fork_runner`]), so that a claim costs no fork. The runner waits for one
//! [`InitSpec`] line on stdin (the task's stdin FIFO, which the shim manages: the one
//! channel that works for runc, crun and gVisor alike, where gVisor refuses host
//! FIFOs and sockets bind-mounted into the sandbox), then ([`exec_spec`]):
//! - creates the working directory if missing and becomes the process by exec, with
//!   exactly the given environment and user (stdout and stderr are the container's,
//!   so they land in the sandbox's log; stdin is `/dev/null`);
//! - writes one [`Started`] line on stdout, starting with [`REPORT_PREFIX`], just
//!   before its exec: the moment the process starts, and before any output of its
//!   own (the agent takes the line out of the log).
//!
//! PID 1 ([`supervise`]) forwards TERM, INT, HUP, QUIT, USR1, USR2 and WINCH to the
//! runner, reaps every zombie (it is a child subreaper even when not PID 1), and
//! returns the runner's exit status (`128 + signal` if a signal ended it) to exit
//! with. A signal before the spec arrives ends the runner (TERM: status 143) at once:
//! a warm instance nobody claimed is stopped without waiting out a grace period.
//!
//! Invariants: one spec, one process, never reused; nothing is read from stdin
//! after the spec line.

use std::{
    io::{BufRead, Read, Write},
    os::unix::process::CommandExt,
    path::Path,
    process::{Command, Stdio},
    time::{SystemTime, UNIX_EPOCH},
};

use rustix::process::{Pid, Signal, WaitOptions};
use serde::{Deserialize, Serialize};
use tokio::signal::unix::{SignalKind, signal};

/// First bytes of every line fsb-init writes on stdout (ASCII record separator, so
/// no ordinary log line starts with it).
pub const REPORT_PREFIX: &str = "\u{1e}fsb-init ";

/// Longest spec line accepted (argv + env of a create stay far below).
pub const MAX_SPEC_BYTES: usize = 1 << 20;

/// Exit status when the spec is unusable or the process cannot be started (as a
/// shell's "command not found").
pub const EXIT_CANNOT_START: i32 = 127;

/// Signals passed on to the child.
const FORWARDED: [SignalKind; 7] = [
    SignalKind::terminate(),
    SignalKind::interrupt(),
    SignalKind::hangup(),
    SignalKind::quit(),
    SignalKind::user_defined1(),
    SignalKind::user_defined2(),
    SignalKind::window_change(),
];

/// The process a warm instance runs, bound at claim time.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitSpec {
    /// Program and arguments (the program is looked up in the spec's `PATH`).
    pub argv: Vec<String>,
    /// The whole environment, `(name, value)` in order.
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// Working directory (absolute), created if missing.
    #[serde(default)]
    pub cwd: Option<String>,
    /// User id to run as (root if unset).
    #[serde(default)]
    pub uid: Option<u32>,
    /// Group id to run as (the uid's number if only `uid` is set).
    #[serde(default)]
    pub gid: Option<u32>,
}

/// Why fsb-init could not run the process.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// Reading stdin failed or it closed before a spec line.
    #[error("reading the spec: {0}")]
    Read(String),
    /// The spec line is not a valid spec.
    #[error("invalid spec: {0}")]
    Spec(String),
    /// The working directory could not be created.
    #[error("working directory {path}: {source}")]
    Cwd {
        /// Which.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The process could not be started.
    #[error("starting {program}: {source}")]
    Spawn {
        /// `argv[0]`.
        program: String,
        /// Why.
        source: std::io::Error,
    },
    /// Installing a signal handler failed.
    #[error("signal handler: {0}")]
    Signal(std::io::Error),
    /// The runner could not be forked.
    #[error("fork: {0}")]
    Fork(std::io::Error),
}

impl InitSpec {
    /// The line the agent writes to the instance's stdin.
    pub fn to_line(&self) -> String {
        // A struct of strings and integers always serializes.
        let mut line = serde_json::to_string(self).unwrap_or_default();
        line.push('\n');
        line
    }

    /// Parse and check one spec line.
    pub fn parse(line: &str) -> Result<Self, InitError> {
        let spec: Self =
            serde_json::from_str(line.trim_end()).map_err(|e| InitError::Spec(e.to_string()))?;
        spec.check()?;
        Ok(spec)
    }

    fn check(&self) -> Result<(), InitError> {
        let bad = |m: String| Err(InitError::Spec(m));
        match self.argv.first() {
            None => return bad("argv: empty".into()),
            Some(p) if p.is_empty() => return bad("argv[0]: empty".into()),
            Some(_) => {}
        }
        if let Some(i) = self.argv.iter().position(|a| a.contains('\0')) {
            return bad(format!("argv[{i}]: contains NUL"));
        }
        for (name, value) in &self.env {
            if name.is_empty() || name.contains('=') || name.contains('\0') {
                return bad(format!("env: invalid name {name:?}"));
            }
            if value.contains('\0') {
                return bad(format!("env {name}: value contains NUL"));
            }
        }
        if let Some(cwd) = &self.cwd
            && (!cwd.starts_with('/') || cwd.contains('\0'))
        {
            return bad(format!("cwd: {cwd:?} is not an absolute path"));
        }
        Ok(())
    }
}

/// What fsb-init reports once the process has been started.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Started {
    /// The process's pid (in the container's pid namespace).
    pub pid: u32,
    /// When it was started, microseconds since the Unix epoch.
    pub unix_us: u64,
    /// When fsb-init had read the spec (0 if not reported): splits a handover into
    /// delivery (agent -> init) and start (init -> process).
    pub spec_us: u64,
}

impl Started {
    /// `<REPORT_PREFIX>started pid=<pid> unix_us=<us> spec_us=<us>\n`.
    pub fn to_line(&self) -> String {
        format!(
            "{REPORT_PREFIX}started pid={} unix_us={} spec_us={}\n",
            self.pid, self.unix_us, self.spec_us
        )
    }

    /// The report in `line`, if it is one.
    pub fn parse(line: &str) -> Option<Self> {
        let rest = line.strip_prefix(REPORT_PREFIX)?.strip_prefix("started ")?;
        let mut pid = None;
        let mut unix_us = None;
        let mut spec_us = 0;
        for field in rest.split_whitespace() {
            match field.split_once('=') {
                Some(("pid", v)) => pid = v.parse().ok(),
                Some(("unix_us", v)) => unix_us = v.parse().ok(),
                Some(("spec_us", v)) => spec_us = v.parse().unwrap_or(0),
                _ => {}
            }
        }
        Some(Self {
            pid: pid?,
            unix_us: unix_us?,
            spec_us,
        })
    }
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Every signal fsb-init acts on (SIGCHLD and [`FORWARDED`]), as one stream.
fn signals() -> Result<tokio::sync::mpsc::UnboundedReceiver<SignalKind>, InitError> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    for kind in std::iter::once(SignalKind::child()).chain(FORWARDED) {
        let mut stream = signal(kind).map_err(InitError::Signal)?;
        let tx = tx.clone();
        tokio::spawn(async move {
            while stream.recv().await.is_some() {
                if tx.send(kind).is_err() {
                    return;
                }
            }
        });
    }
    Ok(rx)
}

/// Fork the runner: the process that waits for the spec on stdin and then becomes the
/// user's process by exec. It is forked ahead of time so that a claim costs no fork
/// (in gVisor a fork is milliseconds). Returns its pid in the parent; never returns
/// in the runner, which exits 127 (saying why on stderr) if it cannot exec.
///
/// Call first thing in `main`, while the process has one thread: the runner then
/// allocates and reads stdin as any program would.
#[allow(unsafe_code)]
pub fn fork_runner() -> Result<Pid, InitError> {
    // Orphans of the process are reparented to us and reaped, PID 1 or not.
    let _ = rustix::process::set_child_subreaper(Some(rustix::process::getpid()));
    // SAFETY: no other thread exists (see above), so the child owns a consistent copy
    // of every lock and allocator state; it runs ordinary code, then exec or exit.
    match unsafe { libc::fork() } {
        -1 => Err(InitError::Fork(std::io::Error::last_os_error())),
        0 => {
            let err = exec_spec(std::io::stdin());
            eprintln!("fsb-init: {err}");
            std::process::exit(EXIT_CANNOT_START)
        }
        pid => Pid::from_raw(pid)
            .ok_or_else(|| InitError::Fork(std::io::Error::other(format!("fork returned {pid}")))),
    }
}

/// In the runner: read one spec line from `input`, create the working directory,
/// then exec the process (its start reported on stdout first). Returns only why
/// that failed.
pub fn exec_spec(input: impl Read) -> InitError {
    let mut line = String::new();
    let mut reader = std::io::BufReader::new(input.take(MAX_SPEC_BYTES as u64 + 1));
    let spec = match reader.read_line(&mut line) {
        Ok(0) => return InitError::Read("stdin closed before a spec".into()),
        Ok(n) if n > MAX_SPEC_BYTES => {
            return InitError::Spec(format!("longer than {MAX_SPEC_BYTES} bytes"));
        }
        Ok(_) => match InitSpec::parse(&line) {
            Ok(spec) => spec,
            Err(e) => return e,
        },
        Err(e) => return InitError::Read(e.to_string()),
    };
    let spec_us = now_us();

    if let Some(cwd) = &spec.cwd
        && let Err(source) = create_cwd(Path::new(cwd), &spec)
    {
        return InitError::Cwd {
            path: cwd.clone(),
            source,
        };
    }
    let mut cmd = Command::new(&spec.argv[0]);
    cmd.args(&spec.argv[1..])
        .env_clear()
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit());
    if let Some(cwd) = &spec.cwd {
        cmd.current_dir(cwd);
    }
    if let Some(gid) = spec.gid.or(spec.uid) {
        cmd.gid(gid);
    }
    if let Some(uid) = spec.uid {
        cmd.uid(uid);
    }
    report_before_exec(&mut cmd, spec_us);
    InitError::Spawn {
        program: spec.argv[0].clone(),
        source: cmd.exec(),
    }
}

/// In the parent: forward signals to `runner`, reap every zombie, and return the
/// runner's exit status (`128 + signal` if a signal ended it) to exit with. A TERM
/// before the spec arrived ends the runner at once (143): nobody claimed the
/// instance, so it stops without a grace period. Call inside a tokio runtime
/// (current-thread is enough).
pub async fn supervise(runner: Pid) -> Result<i32, InitError> {
    let mut signals = signals()?;
    loop {
        // Reap everything that has exited (also what exited before the handlers
        // were installed); the runner's status ends the wait.
        while let Ok(Some((reaped, status))) = rustix::process::wait(WaitOptions::NOHANG) {
            if reaped == runner {
                return Ok(status
                    .exit_status()
                    .or_else(|| status.terminating_signal().map(|s| 128 + s))
                    .unwrap_or(EXIT_CANNOT_START));
            }
        }
        match signals.recv().await {
            None => return Err(InitError::Read("signal handlers ended".into())),
            Some(kind) if kind == SignalKind::child() => {}
            Some(kind) => {
                if let Some(sig) = Signal::from_named_raw(kind.as_raw_value()) {
                    let _ = rustix::process::kill_process(runner, sig);
                }
            }
        }
    }
}

/// Have the child write its [`Started`] line on stdout (fd 1) right before its exec.
/// Written by the child so it precedes anything the process prints: written by us
/// after `spawn`, it could land after the process's first output.
#[allow(unsafe_code)]
fn report_before_exec(cmd: &mut Command, spec_us: u64) {
    // SAFETY: the hook runs in the forked child before exec. It does not allocate or
    // take locks: `getpid`, `clock_gettime` (SystemTime::now) and `write` are
    // async-signal-safe, and the line is formatted into a stack buffer.
    unsafe {
        cmd.pre_exec(move || {
            let mut buf = [0u8; 128];
            let len = {
                let mut w: &mut [u8] = &mut buf;
                let before = w.len();
                writeln!(
                    w,
                    "{REPORT_PREFIX}started pid={} unix_us={} spec_us={spec_us}",
                    std::process::id(),
                    now_us()
                )?;
                before - w.len()
            };
            let stdout = rustix::fd::BorrowedFd::borrow_raw(1);
            let mut line = &buf[..len];
            while !line.is_empty() {
                match rustix::io::write(stdout, line) {
                    Ok(n) => line = &line[n..],
                    Err(rustix::io::Errno::INTR) => {}
                    // Nowhere to report to: start the process all the same.
                    Err(_) => break,
                }
            }
            Ok(())
        });
    }
}

/// Create `cwd` and its missing parents; the ones created belong to the process's
/// user (a non-root process can write its own working directory).
fn create_cwd(cwd: &Path, spec: &InitSpec) -> std::io::Result<()> {
    let mut missing = Vec::new();
    let mut p = Some(cwd);
    while let Some(dir) = p {
        if dir.exists() {
            break;
        }
        missing.push(dir.to_path_buf());
        p = dir.parent();
    }
    std::fs::create_dir_all(cwd)?;
    if let Some(uid) = spec.uid {
        let owner = rustix::fs::Uid::from_raw(uid);
        let group = rustix::fs::Gid::from_raw(spec.gid.unwrap_or(uid));
        for dir in missing {
            rustix::fs::chown(&dir, Some(owner), Some(group))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spec_round_trips_through_its_line() {
        let spec = InitSpec {
            argv: vec!["sh".into(), "-c".into(), "echo hi".into()],
            env: vec![("PATH".into(), "/bin".into()), ("A".into(), "b c".into())],
            cwd: Some("/work/x".into()),
            uid: Some(1000),
            gid: None,
        };
        let line = spec.to_line();
        assert!(line.ends_with('\n') && line.matches('\n').count() == 1);
        assert_eq!(InitSpec::parse(&line).unwrap(), spec);
    }

    #[test]
    fn bad_specs_name_the_field() {
        let cases = [
            (r#"{"argv":[]}"#, "argv"),
            (r#"{"argv":[""]}"#, "argv[0]"),
            (r#"{"argv":["a"],"env":[["A=B","x"]]}"#, "env"),
            (r#"{"argv":["a"],"env":[["","x"]]}"#, "env"),
            (r#"{"argv":["a"],"cwd":"rel/dir"}"#, "cwd"),
            (r#"{"argv":["a\u0000b"]}"#, "argv[0]"),
            ("not json", "expected"),
        ];
        for (line, field) in cases {
            let err = InitSpec::parse(line).unwrap_err().to_string();
            assert!(err.contains(field), "{line}: {err}");
        }
    }

    #[test]
    fn the_start_report_parses_back_and_ordinary_lines_are_not_reports() {
        let s = Started {
            pid: 42,
            unix_us: 1_700_000_000_123_456,
            spec_us: 1_700_000_000_120_000,
        };
        assert_eq!(Started::parse(&s.to_line()), Some(s));
        assert_eq!(Started::parse("started pid=1 unix_us=2"), None);
        // An older fsb-init's report, without spec_us.
        assert_eq!(
            Started::parse(&format!("{REPORT_PREFIX}started pid=1 unix_us=2")),
            Some(Started {
                pid: 1,
                unix_us: 2,
                spec_us: 0
            })
        );
        assert_eq!(
            Started::parse(&format!("{REPORT_PREFIX}started pid=x")),
            None
        );
    }
}
