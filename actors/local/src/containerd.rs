//! A containerd for `fsb up`: the one the user names, else a private one of this data
//! directory that is already running, else the system's if it answers, else a private
//! containerd started here (Debian's `containerd` binary with a config, root, state and
//! socket of its own under `<data-dir>/containerd`, as `tests/scripts/containerd.sh`
//! does for the tests).
//!
//! Host preparation done every time (idempotent): the hugetlb cgroup v1 hierarchy is
//! mounted when missing on a hybrid-cgroup machine (crun needs it), and the gVisor
//! wrapper `<data-dir>/bin/runsc-netnone` (`runsc --network=none "$@"`) is written,
//! because the runc shim cannot pass runsc flags and gVisor's netstack refuses the root
//! network namespace on kernels >= 6.11.
//!
//! Invariants: a system (or user-named) containerd is never stopped; a private one is
//! stopped by [`LocalContainerd::stop`] (SIGTERM, then SIGKILL after a deadline) while
//! its shims keep running, so sandboxes kept across an `fsb up` restart are adopted by
//! the next one; the runtimes' state root is always `<data-dir>/runtime`, never the
//! system default another containerd may share.

use std::{
    fs::OpenOptions,
    io::Write,
    os::unix::{
        fs::{OpenOptionsExt, PermissionsExt},
        process::CommandExt,
    },
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use containerd_client::services::v1::version_client::VersionClient;
use fsb_agent::containerd::{ContainerdConfig, DEFAULT_CALL_TIMEOUT};

use crate::{DataDir, LocalError, datadir::TRAVERSE_ONLY};

/// The system containerd's socket.
pub const SYSTEM_SOCKET: &str = "/run/containerd/containerd.sock";
/// How long "does it answer" may take (connect + Version).
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a private containerd may take to answer after it is started.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Time between SIGTERM and SIGKILL when stopping a private containerd.
pub const STOP_GRACE: Duration = Duration::from_secs(10);

/// Longest unix socket path (`sun_path` is 108 bytes with the trailing NUL).
const MAX_SOCKET_PATH: usize = 107;
/// Log lines quoted when a private containerd does not start.
const LOG_TAIL_LINES: usize = 30;
/// Polling interval while waiting for a process or a socket.
const POLL: Duration = Duration::from_millis(50);
/// Where Debian and friends install binaries (libraries never read `PATH`).
const BIN_DIRS: [&str; 6] = [
    "/usr/local/sbin",
    "/usr/local/bin",
    "/usr/sbin",
    "/usr/bin",
    "/sbin",
    "/bin",
];
const HUGETLB: &str = "/sys/fs/cgroup/hugetlb";
const CGROUP_UNIFIED: &str = "/sys/fs/cgroup/unified";

/// Which containerd `fsb up` uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ContainerdSource {
    /// The socket the user named.
    Given,
    /// The system containerd at [`SYSTEM_SOCKET`].
    System,
    /// A private containerd of this data directory: started now (`started`), or left
    /// running by an earlier `fsb up` and adopted.
    Private {
        /// Its pid.
        pid: u32,
        /// Started by this call (false: adopted).
        started: bool,
    },
}

/// Options of [`ensure_containerd_with`]; [`ensure_containerd`] uses the defaults.
#[derive(Clone, Debug)]
pub struct ContainerdOptions {
    /// Use this socket and nothing else.
    pub socket: Option<PathBuf>,
    /// The runsc binary the gVisor wrapper runs (default: found in the usual bin dirs).
    pub runsc: Option<PathBuf>,
    /// The system containerd's socket ([`SYSTEM_SOCKET`]).
    pub system_socket: PathBuf,
    /// The containerd binary for a private containerd (default: found in the usual
    /// bin dirs).
    pub containerd_binary: Option<PathBuf>,
    /// How long a started containerd may take to answer.
    pub start_timeout: Duration,
    /// Time between SIGTERM and SIGKILL in [`LocalContainerd::stop`].
    pub stop_grace: Duration,
}

impl Default for ContainerdOptions {
    fn default() -> Self {
        Self {
            socket: None,
            runsc: None,
            system_socket: PathBuf::from(SYSTEM_SOCKET),
            containerd_binary: None,
            start_timeout: START_TIMEOUT,
            stop_grace: STOP_GRACE,
        }
    }
}

/// The containerd `fsb up` uses, and how to stop it.
#[derive(Debug)]
pub struct LocalContainerd {
    config: ContainerdConfig,
    source: ContainerdSource,
    version: String,
    private: Option<PrivateProcess>,
}

#[derive(Debug)]
struct PrivateProcess {
    pid: u32,
    config_file: PathBuf,
    pid_file: PathBuf,
    /// Present when we started it (to reap it); absent when adopted.
    child: Option<Child>,
    stop_grace: Duration,
}

impl LocalContainerd {
    /// What the agent needs: socket, namespace `fast-sandbox`, call timeout, runtime
    /// root `<data-dir>/runtime`, the runsc wrapper.
    pub fn config(&self) -> &ContainerdConfig {
        &self.config
    }

    /// containerd's gRPC socket.
    pub fn socket(&self) -> &Path {
        &self.config.socket
    }

    /// Which containerd this is.
    pub fn source(&self) -> ContainerdSource {
        self.source
    }

    /// True for a private containerd of the data directory (the one [`Self::stop`] stops).
    pub fn is_private(&self) -> bool {
        self.private.is_some()
    }

    /// The private containerd's pid.
    pub fn pid(&self) -> Option<u32> {
        self.private.as_ref().map(|p| p.pid)
    }

    /// containerd's version, as it answered.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Stop a private containerd (SIGTERM, SIGKILL after the grace period) and remove
    /// its pid file. Its shims, and so the sandboxes, keep running. A system or
    /// user-named containerd is left alone.
    pub async fn stop(self) -> Result<(), LocalError> {
        let Some(mut private) = self.private else {
            return Ok(());
        };
        let pid = private.pid;
        // An adopted pid is checked again: it may have exited and been reused since.
        if private.child.is_some() || is_our_containerd(pid, &private.config_file) {
            terminate(pid, &mut private.child, private.stop_grace).await?;
        }
        // Only remove the pid file if it still names this process.
        if read_pid(&private.pid_file) == Some(pid) {
            let _ = std::fs::remove_file(&private.pid_file);
        }
        tracing::info!(pid, config = %private.config_file.display(), "private containerd stopped");
        Ok(())
    }
}

/// Make a containerd available for `fsb up` (see the module docs for the order).
/// `socket`: use this one or fail, saying what to do; `runsc`: the runsc binary the
/// gVisor wrapper runs.
pub async fn ensure_containerd(
    data_dir: &DataDir,
    socket: Option<&Path>,
    runsc: Option<&Path>,
) -> Result<LocalContainerd, LocalError> {
    let options = ContainerdOptions {
        socket: socket.map(Path::to_owned),
        runsc: runsc.map(Path::to_owned),
        ..ContainerdOptions::default()
    };
    ensure_containerd_with(data_dir, &options).await
}

/// [`ensure_containerd`] with every knob.
pub async fn ensure_containerd_with(
    data_dir: &DataDir,
    options: &ContainerdOptions,
) -> Result<LocalContainerd, LocalError> {
    let runtime_root = runtime_root(data_dir);
    create_dir(&runtime_root)?;
    let runsc_wrapper = write_runsc_wrapper(data_dir, options.runsc.as_deref())?;
    ensure_hugetlb();
    let config_for = |socket: &Path| ContainerdConfig {
        socket: socket.to_owned(),
        namespace: fsb_core::labels::CONTAINERD_NAMESPACE.to_owned(),
        call_timeout: DEFAULT_CALL_TIMEOUT,
        runtime_root: runtime_root.clone(),
        runsc_binary: runsc_wrapper.clone(),
    };

    if let Some(socket) = &options.socket {
        let version = version(socket, ANSWER_TIMEOUT).await.map_err(|why| {
            LocalError::Setup(format!(
                "containerd at {} does not answer ({why}): start it (e.g. `systemctl start \
                 containerd`) or leave out --containerd-socket so fsb up starts a private one",
                socket.display()
            ))
        })?;
        tracing::info!(socket = %socket.display(), %version, "using the given containerd");
        return Ok(LocalContainerd {
            config: config_for(socket),
            source: ContainerdSource::Given,
            version,
            private: None,
        });
    }

    let paths = PrivatePaths::new(data_dir);
    // A private containerd left running by an earlier `fsb up` holds the sandboxes it
    // kept: prefer it even if a system containerd has appeared since.
    let running = running_private(&paths);
    if let [pid] = running.as_slice()
        && let Ok(version) = version(&paths.socket, ANSWER_TIMEOUT).await
    {
        write_pid_file(&paths.pid_file, *pid)?;
        tracing::info!(pid, socket = %paths.socket.display(), %version, "adopting the running private containerd");
        return Ok(LocalContainerd {
            config: config_for(&paths.socket),
            source: ContainerdSource::Private {
                pid: *pid,
                started: false,
            },
            version,
            private: Some(PrivateProcess {
                pid: *pid,
                config_file: paths.config.clone(),
                pid_file: paths.pid_file.clone(),
                child: None,
                stop_grace: options.stop_grace,
            }),
        });
    }

    if running.is_empty()
        && let Ok(version) = version(&options.system_socket, ANSWER_TIMEOUT).await
    {
        tracing::info!(socket = %options.system_socket.display(), %version, "using the system containerd");
        return Ok(LocalContainerd {
            config: config_for(&options.system_socket),
            source: ContainerdSource::System,
            version,
            private: None,
        });
    }

    // Private containerds of ours that do not answer (or several): stop them first,
    // two containerds on one root would wait on each other's lock forever.
    for pid in running {
        tracing::warn!(pid, "private containerd does not answer; restarting it");
        terminate(pid, &mut None, options.stop_grace).await?;
    }
    start_private(&paths, options, &runtime_root, &runsc_wrapper)
        .await
        .map(|(pid, child, version)| LocalContainerd {
            config: config_for(&paths.socket),
            source: ContainerdSource::Private { pid, started: true },
            version,
            private: Some(PrivateProcess {
                pid,
                config_file: paths.config.clone(),
                pid_file: paths.pid_file.clone(),
                child: Some(child),
                stop_grace: options.stop_grace,
            }),
        })
}

/// The OCI runtimes' state root: `<data-dir>/runtime` (`runc`, `crun`, `runsc` below it).
pub fn runtime_root(data_dir: &DataDir) -> PathBuf {
    data_dir.root().join("runtime")
}

/// The gVisor wrapper: `<data-dir>/bin/runsc-netnone`.
pub fn runsc_wrapper(data_dir: &DataDir) -> PathBuf {
    data_dir.root().join("bin").join("runsc-netnone")
}

/// The private containerd's socket: `<data-dir>/containerd/containerd.sock`.
pub fn private_socket(data_dir: &DataDir) -> PathBuf {
    PrivatePaths::new(data_dir).socket
}

/// containerd's version if it answers at `socket` within `timeout` (connect +
/// Version), else why not.
pub async fn version(socket: &Path, timeout: Duration) -> Result<String, String> {
    let ask = async {
        let channel = containerd_client::connect(socket)
            .await
            .map_err(|e| format!("connect: {}", error_chain(&e)))?;
        let resp = VersionClient::new(channel)
            .version(())
            .await
            .map_err(|s| format!("version: {}", s.message()))?;
        Ok::<_, String>(resp.into_inner().version)
    };
    match tokio::time::timeout(timeout, ask).await {
        Ok(result) => result,
        Err(_) => Err(format!("no answer within {} ms", timeout.as_millis())),
    }
}

// --- the private containerd ------------------------------------------------------------

#[derive(Debug)]
struct PrivatePaths {
    dir: PathBuf,
    config: PathBuf,
    socket: PathBuf,
    pid_file: PathBuf,
    log: PathBuf,
}

impl PrivatePaths {
    fn new(data_dir: &DataDir) -> Self {
        let dir = data_dir.containerd_dir();
        Self {
            config: dir.join("config.toml"),
            socket: dir.join("containerd.sock"),
            pid_file: dir.join("containerd.pid"),
            log: dir.join("containerd.log"),
            dir,
        }
    }
}

async fn start_private(
    paths: &PrivatePaths,
    options: &ContainerdOptions,
    runtime_root: &Path,
    runsc_wrapper: &Path,
) -> Result<(u32, Child, String), LocalError> {
    let ttrpc = PathBuf::from(format!("{}.ttrpc", paths.socket.display()));
    if ttrpc.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(LocalError::Setup(format!(
            "{}: socket path longer than {MAX_SOCKET_PATH} bytes; use a shorter data directory",
            ttrpc.display()
        )));
    }
    let binary = match &options.containerd_binary {
        Some(b) => b.clone(),
        None => find_binary("containerd").ok_or_else(|| {
            LocalError::Setup(
                "containerd not found and none answers: apt-get install containerd \
                 (or pass --containerd-socket)"
                    .to_owned(),
            )
        })?,
    };
    for dir in ["root", "state", "opt"] {
        create_dir(&paths.dir.join(dir))?;
    }
    std::fs::set_permissions(&paths.dir, std::fs::Permissions::from_mode(TRAVERSE_ONLY))
        .map_err(|e| LocalError::io(&paths.dir, e))?;
    write_atomic(
        &paths.config,
        config_toml(&paths.dir, &paths.socket, runtime_root, runsc_wrapper).as_bytes(),
        0o600,
    )?;
    for stale in [&paths.socket, &ttrpc] {
        match std::fs::remove_file(stale) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(LocalError::io(stale, e));
            }
            _ => {}
        }
    }
    if paths.log.exists() {
        let old = paths.log.with_extension("log.1");
        std::fs::rename(&paths.log, &old).map_err(|e| LocalError::io(&old, e))?;
    }
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&paths.log)
        .map_err(|e| LocalError::io(&paths.log, e))?;
    let log_err = log.try_clone().map_err(|e| LocalError::io(&paths.log, e))?;
    // Its own process group: a Ctrl-C to `fsb up` must not reach containerd before
    // `fsb up` has used it to stop (or keep) the sandboxes.
    let mut child = Command::new(&binary)
        .arg("--config")
        .arg(&paths.config)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        .process_group(0)
        .spawn()
        .map_err(|e| LocalError::io(&binary, e))?;
    let pid = child.id();
    write_pid_file(&paths.pid_file, pid)?;
    tracing::info!(pid, socket = %paths.socket.display(), "starting a private containerd");

    let deadline = Instant::now() + options.start_timeout;
    loop {
        match version(&paths.socket, ANSWER_TIMEOUT).await {
            Ok(version) => {
                tracing::info!(pid, %version, "private containerd answers");
                return Ok((pid, child, version));
            }
            Err(why) => {
                if let Ok(Some(status)) = child.try_wait() {
                    let _ = std::fs::remove_file(&paths.pid_file);
                    return Err(start_failed(
                        paths,
                        &format!("containerd exited during start ({status})"),
                    ));
                }
                if Instant::now() >= deadline {
                    let mut child = Some(child);
                    let _ = terminate(pid, &mut child, options.stop_grace).await;
                    let _ = std::fs::remove_file(&paths.pid_file);
                    return Err(start_failed(
                        paths,
                        &format!(
                            "containerd did not answer on {} within {} s ({why})",
                            paths.socket.display(),
                            options.start_timeout.as_secs()
                        ),
                    ));
                }
            }
        }
        tokio::time::sleep(POLL).await;
    }
}

fn start_failed(paths: &PrivatePaths, what: &str) -> LocalError {
    let tail = std::fs::read_to_string(&paths.log)
        .map(|log| log_tail(&log, LOG_TAIL_LINES))
        .unwrap_or_default();
    let root_hint = if rustix::process::geteuid().is_root() {
        ""
    } else {
        " (not running as root: containerd needs root, run fsb up as root)"
    };
    LocalError::Setup(format!(
        "{what}{root_hint}; see {} (last lines below), or pass --containerd-socket to use \
         another containerd\n{tail}",
        paths.log.display()
    ))
}

/// The last `n` lines of `log`.
fn log_tail(log: &str, n: usize) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The private containerd's config, as `tests/scripts/containerd.sh` writes it:
/// overlayfs required, CRI and snapshotters that cannot work here disabled.
fn config_toml(dir: &Path, socket: &Path, runtime_root: &Path, runsc_wrapper: &Path) -> String {
    let q = |p: &Path| toml_string(&p.display().to_string());
    let ttrpc = toml_string(&format!("{}.ttrpc", socket.display()));
    format!(
        r#"# Generated by fast-sandbox (`fsb up`); rewritten on every start.
version = 2
root = {root}
state = {state}
required_plugins = ["io.containerd.snapshotter.v1.overlayfs"]
# No CRI: fast-sandbox drives containerd itself in its own namespace. Snapshotters that
# cannot work here are off too. (The v1 runtime stays: containerd 1.6's tasks service
# does not load without it.)
disabled_plugins = [
  "io.containerd.grpc.v1.cri",
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.internal.v1.tracing",
]

[grpc]
  address = {socket}

[ttrpc]
  address = {ttrpc}

[debug]
  address = ""
  level = "info"

[metrics]
  address = ""

[plugins]
  [plugins."io.containerd.internal.v1.opt"]
    path = {opt}
  [plugins."io.containerd.runtime.v1.linux"]
    runtime_root = {v1_root}
  [plugins."io.containerd.monitor.v1.cgroups"]
    no_prometheus = true

# runc, crun and gVisor all run through the runc shim, chosen per container by its
# runc options (BinaryName runc, crun or {runsc}), with Root under {runtime_root}.
"#,
        root = q(&dir.join("root")),
        state = q(&dir.join("state")),
        socket = q(socket),
        opt = q(&dir.join("opt")),
        v1_root = q(&runtime_root.join("v1")),
        runsc = runsc_wrapper.display(),
        runtime_root = runtime_root.display(),
    )
}

/// A TOML basic string.
fn toml_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Live containerd processes running with this data directory's config.
fn running_private(paths: &PrivatePaths) -> Vec<u32> {
    let mut pids: Vec<u32> = Vec::new();
    if let Some(pid) = read_pid(&paths.pid_file)
        && is_our_containerd(pid, &paths.config)
    {
        pids.push(pid);
    }
    // Strays whose pid file was lost.
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
                continue;
            };
            if !pids.contains(&pid) && is_our_containerd(pid, &paths.config) {
                pids.push(pid);
            }
        }
    }
    pids
}

fn read_pid(pid_file: &Path) -> Option<u32> {
    std::fs::read_to_string(pid_file).ok()?.trim().parse().ok()
}

fn write_pid_file(pid_file: &Path, pid: u32) -> Result<(), LocalError> {
    write_atomic(pid_file, format!("{pid}\n").as_bytes(), 0o644)
}

/// A live (not zombie) containerd whose command line is `... --config <config>`.
fn is_our_containerd(pid: u32, config: &Path) -> bool {
    if !alive(pid) {
        return false;
    }
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    cmdline_is_containerd_with(&cmdline, config)
}

fn cmdline_is_containerd_with(cmdline: &[u8], config: &Path) -> bool {
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    let is_containerd = args
        .first()
        .and_then(|a0| Path::new(std::str::from_utf8(a0).ok()?).file_name())
        .is_some_and(|name| name == "containerd");
    let config = config.as_os_str().as_encoded_bytes();
    is_containerd
        && args
            .windows(2)
            .any(|w| matches!(w[0], b"--config" | b"-c") && w[1] == config)
}

/// The process exists and is not a zombie.
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat_state(&stat).is_some_and(|s| s != 'Z' && s != 'X'),
        Err(_) => false,
    }
}

/// The state letter of a `/proc/<pid>/stat` line (after the parenthesised comm).
fn stat_state(stat: &str) -> Option<char> {
    let (_, rest) = stat.rsplit_once(')')?;
    rest.trim_start().chars().next()
}

/// SIGTERM `pid`, wait up to `grace`, then SIGKILL and wait a little more. `child`
/// reaps it when we are its parent.
async fn terminate(pid: u32, child: &mut Option<Child>, grace: Duration) -> Result<(), LocalError> {
    let gone = |child: &mut Option<Child>| match child {
        Some(c) => !matches!(c.try_wait(), Ok(None)),
        None => !alive(pid),
    };
    let raw = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
        .ok_or_else(|| LocalError::Setup(format!("invalid pid {pid}")))?;
    for (signal, wait) in [
        (rustix::process::Signal::TERM, grace),
        (rustix::process::Signal::KILL, Duration::from_secs(5)),
    ] {
        if gone(child) {
            return Ok(());
        }
        match rustix::process::kill_process(raw, signal) {
            Ok(()) => {}
            Err(rustix::io::Errno::SRCH) => return Ok(()),
            Err(e) => {
                return Err(LocalError::Setup(format!(
                    "cannot signal containerd (pid {pid}): {e}"
                )));
            }
        }
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline {
            if gone(child) {
                return Ok(());
            }
            tokio::time::sleep(POLL).await;
        }
    }
    if gone(child) {
        Ok(())
    } else {
        Err(LocalError::Setup(format!(
            "containerd (pid {pid}) survived SIGKILL"
        )))
    }
}

// --- host preparation -----------------------------------------------------------------

/// The runsc wrapper; if runsc is not installed, a wrapper that says how to install it.
fn write_runsc_wrapper(data_dir: &DataDir, runsc: Option<&Path>) -> Result<PathBuf, LocalError> {
    let path = runsc_wrapper(data_dir);
    if let Some(dir) = path.parent() {
        create_dir(dir)?;
    }
    let runsc = runsc
        .map(Path::to_owned)
        .or_else(|| find_binary("runsc"))
        .unwrap_or_else(|| PathBuf::from("/usr/bin/runsc"));
    write_atomic(&path, runsc_wrapper_script(&runsc).as_bytes(), 0o755)?;
    Ok(path)
}

fn runsc_wrapper_script(runsc: &Path) -> String {
    let runsc = shell_quote(&runsc.display().to_string());
    format!(
        "#!/bin/sh\n\
         # Generated by fast-sandbox: gVisor through the runc shim, without gVisor's netstack.\n\
         [ -x {runsc} ] || {{ echo \"runsc not found at \"{runsc}\": apt-get install runsc\" >&2; exit 1; }}\n\
         exec {runsc} --network=none \"$@\"\n"
    )
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Mount the hugetlb cgroup v1 hierarchy when crun needs it (hybrid cgroups, hugetlb
/// known to the kernel, not mounted). Host-wide and left mounted. A failure is only a
/// warning: runc and gVisor work without it.
fn ensure_hugetlb() {
    let unified = Path::new(CGROUP_UNIFIED).is_dir();
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let cgroups = std::fs::read_to_string("/proc/cgroups").unwrap_or_default();
    if !needs_hugetlb_mount(unified, &mountinfo, &cgroups) {
        return;
    }
    let result = std::fs::create_dir_all(HUGETLB)
        .map_err(|e| e.to_string())
        .and_then(|()| {
            rustix::mount::mount(
                "cgroup",
                HUGETLB,
                "cgroup",
                rustix::mount::MountFlags::empty(),
                c"hugetlb",
            )
            .map_err(|e| e.to_string())
        });
    match result {
        Ok(()) => {
            tracing::info!("mounted the hugetlb cgroup v1 hierarchy at {HUGETLB} (crun needs it)")
        }
        Err(e) => tracing::warn!("could not mount {HUGETLB} ({e}); crun may fail"),
    }
}

fn needs_hugetlb_mount(unified_exists: bool, mountinfo: &str, proc_cgroups: &str) -> bool {
    let mounted = mountinfo
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(HUGETLB));
    let known = proc_cgroups
        .lines()
        .any(|l| l.split_whitespace().next() == Some("hugetlb"));
    unified_exists && known && !mounted
}

// --- small helpers ---------------------------------------------------------------------

fn find_binary(name: &str) -> Option<PathBuf> {
    BIN_DIRS.iter().map(|d| Path::new(d).join(name)).find(|p| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    })
}

fn create_dir(dir: &Path) -> Result<(), LocalError> {
    std::fs::create_dir_all(dir).map_err(|e| LocalError::io(dir, e))
}

/// Write `bytes` to `path` through a temporary file and a rename.
fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), LocalError> {
    let tmp = path.with_extension("tmp");
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(|e| LocalError::io(&tmp, e))?;
    file.write_all(bytes)
        .and_then(|()| file.set_permissions(std::fs::Permissions::from_mode(mode)))
        .map_err(|e| LocalError::io(&tmp, e))?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(|e| LocalError::io(path, e))
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hugetlb_is_mounted_only_on_hybrid_machines_that_lack_it() {
        let cgroups = "#subsys_name\thierarchy\tnum_cgroups\tenabled\nhugetlb\t0\t1\t1\n";
        let without = "25 30 0:22 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n";
        let with = "25 30 0:22 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n\
                    40 25 0:40 / /sys/fs/cgroup/hugetlb rw - cgroup cgroup rw,hugetlb\n";
        assert!(needs_hugetlb_mount(true, without, cgroups));
        assert!(!needs_hugetlb_mount(true, with, cgroups));
        assert!(!needs_hugetlb_mount(false, without, cgroups), "pure v2");
        assert!(
            !needs_hugetlb_mount(true, without, "#subsys_name\n"),
            "no hugetlb"
        );
    }

    #[test]
    fn only_containerd_with_our_config_is_ours() {
        let cfg = Path::new("/d/containerd/config.toml");
        assert!(cmdline_is_containerd_with(
            b"/usr/bin/containerd\0--config\0/d/containerd/config.toml\0",
            cfg
        ));
        assert!(cmdline_is_containerd_with(
            b"containerd\0-c\0/d/containerd/config.toml\0",
            cfg
        ));
        assert!(!cmdline_is_containerd_with(
            b"/usr/bin/containerd\0--config\0/other/config.toml\0",
            cfg
        ));
        assert!(!cmdline_is_containerd_with(
            b"vi\0--config\0/d/containerd/config.toml\0",
            cfg
        ));
        assert!(!cmdline_is_containerd_with(b"", cfg));
    }

    #[test]
    fn stat_state_reads_past_the_command_name() {
        assert_eq!(stat_state("42 (a) b) Z 1 2"), Some('Z'));
        assert_eq!(stat_state("42 (containerd) S 1 2"), Some('S'));
        assert!(alive(std::process::id()));
    }

    #[test]
    fn config_mirrors_the_test_harness() {
        let toml = config_toml(
            Path::new("/d/containerd"),
            Path::new("/d/containerd/containerd.sock"),
            Path::new("/d/runtime"),
            Path::new("/d/bin/runsc-netnone"),
        );
        for want in [
            "root = \"/d/containerd/root\"",
            "state = \"/d/containerd/state\"",
            "address = \"/d/containerd/containerd.sock\"",
            "address = \"/d/containerd/containerd.sock.ttrpc\"",
            "\"io.containerd.grpc.v1.cri\"",
            "required_plugins = [\"io.containerd.snapshotter.v1.overlayfs\"]",
            "runtime_root = \"/d/runtime/v1\"",
        ] {
            assert!(toml.contains(want), "{want} missing from\n{toml}");
        }
        assert_eq!(toml_string(r#"a"b\c"#), r#""a\"b\\c""#);
    }

    #[test]
    fn log_tail_keeps_the_last_lines() {
        assert_eq!(log_tail("a\nb\nc\n", 2), "b\nc");
        assert_eq!(log_tail("a", 5), "a");
    }

    #[test]
    fn runsc_wrapper_adds_network_none_and_says_how_to_install() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DataDir::new(tmp.path());
        let path = write_runsc_wrapper(&dir, Some(Path::new("/opt/it's/runsc"))).unwrap();
        assert_eq!(path, runsc_wrapper(&dir));
        let script = std::fs::read_to_string(&path).unwrap();
        assert!(
            script.contains(r#"exec '/opt/it'\''s/runsc' --network=none "$@""#),
            "{script}"
        );
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o755);
        let out = Command::new(&path).arg("--version").output().unwrap();
        assert!(!out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("apt-get install runsc"),
            "{out:?}"
        );
    }

    #[tokio::test]
    async fn a_socket_that_does_not_answer_is_named_with_what_to_do() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DataDir::new(tmp.path());
        let socket = tmp.path().join("nobody.sock");
        let err = ensure_containerd(&dir, Some(&socket), None)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains(&socket.display().to_string()), "{err}");
        assert!(err.contains("systemctl start containerd"), "{err}");
        // The agent's runtime root is under the data directory all the same.
        assert!(runtime_root(&dir).is_dir());
    }

    #[tokio::test]
    async fn a_containerd_that_fails_to_start_is_reported_with_its_log() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DataDir::new(tmp.path());
        let fake = tmp.path().join("fake-containerd");
        std::fs::write(
            &fake,
            "#!/bin/sh\necho \"starting with $*\"\necho 'overlayfs: not supported' >&2\nexit 3\n",
        )
        .unwrap();
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        let options = ContainerdOptions {
            system_socket: tmp.path().join("no-system.sock"),
            containerd_binary: Some(fake),
            start_timeout: Duration::from_secs(10),
            ..ContainerdOptions::default()
        };
        let err = ensure_containerd_with(&dir, &options)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("exited during start"), "{err}");
        assert!(err.contains("overlayfs: not supported"), "{err}");
        assert!(
            err.contains("config.toml"),
            "the log shows the arguments: {err}"
        );
        assert!(!dir.containerd_dir().join("containerd.pid").exists());
    }

    #[tokio::test]
    async fn a_containerd_that_never_answers_is_stopped_at_the_deadline() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DataDir::new(tmp.path());
        let fake = tmp.path().join("mute-containerd");
        std::fs::write(
            &fake,
            "#!/bin/sh
echo 'waiting for a lock'
exec sleep 600
",
        )
        .unwrap();
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        let options = ContainerdOptions {
            system_socket: tmp.path().join("no-system.sock"),
            containerd_binary: Some(fake),
            start_timeout: Duration::from_millis(300),
            stop_grace: Duration::from_secs(2),
            ..ContainerdOptions::default()
        };
        let err = ensure_containerd_with(&dir, &options)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("did not answer"), "{err}");
        assert!(err.contains("waiting for a lock"), "{err}");
        assert!(!dir.containerd_dir().join("containerd.pid").exists());
    }
}
