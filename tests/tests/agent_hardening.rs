//! Issue 8's sandbox hardening, seen from inside a default sandbox on the real
//! containerd of `tests/run.sh containerd`: the agent's own create path (its OCI spec:
//! capabilities, no-new-privileges, seccomp, namespaces, pids limit), then commands
//! run in the sandbox through exec, which inherits the sandbox's process settings.
//!
//! Each test checks that its probe ran and got the expected denial, and where it can
//! it shows the same probe succeeding (or failing differently) outside the sandbox,
//! so that a weaker default would make it fail. runc and crun share the host kernel
//! behind the same spec; gVisor puts its own kernel (the Sentry) in between.

#![allow(clippy::unwrap_used)] // helpers below are test code too

use std::time::Duration;

use fsb_agent::{
    AgentHandle, CreateSandbox,
    exec::{ExecRequest, exec},
    oci::{DEFAULT_PIDS_LIMIT, GVISOR_DEFAULT_NPROC},
    warm::WarmConfig,
};
use fsb_core::{
    SandboxId,
    capability::{self, CapabilityDrop},
    spec::{Runtime, SandboxSpec, SpecLimits},
};
use fsb_tests::{ContainerdEnv, ExecResult, wait_until};

const DEADLINE: Duration = Duration::from_secs(30);
const ALL: [Runtime; 3] = [Runtime::Runc, Runtime::Crun, Runtime::Gvisor];

/// Create `spec` under `id` directly on the agent (no gateway, no name).
async fn create(
    agent: &AgentHandle,
    id: &SandboxId,
    spec: fsb_core::spec::ValidSpec,
) -> Result<fsb_agent::CreatedSandbox, fsb_agent::AgentError> {
    agent
        .create(CreateSandbox {
            id: id.clone(),
            namespace: spec.namespace.to_string(),
            name: String::new(),
            claim_uid: String::new(),
            request_id: String::new(),
            spec,
        })
        .await
}

/// The main process of every sandbox here; it does nothing but keep the task running.
const MAIN: [&str; 2] = ["sleep", "86400"];

/// A running default sandbox (nothing in its spec but the image and command, unless
/// a test says otherwise) of one agent.
struct Sandbox {
    agent: AgentHandle,
    id: SandboxId,
    runtime: Runtime,
    /// Host pid of the sandbox's task (runc/crun: its main process).
    pid: u32,
    /// The create's timeline and note.
    stages: Vec<(&'static str, Duration)>,
    note: String,
}

impl Sandbox {
    async fn start(
        agent: &AgentHandle,
        env: &ContainerdEnv,
        runtime: Runtime,
        edit: impl FnOnce(&mut SandboxSpec),
    ) -> Self {
        Self::start_how(agent, env, runtime, SandboxId::generate(), edit)
            .await
            .0
    }

    /// [`Sandbox::start`] under `id` (a warm instance's id claims it, as the registry
    /// does), also saying whether a warm instance served the create.
    async fn start_how(
        agent: &AgentHandle,
        env: &ContainerdEnv,
        runtime: Runtime,
        id: SandboxId,
        edit: impl FnOnce(&mut SandboxSpec),
    ) -> (Self, bool) {
        let mut spec = SandboxSpec {
            namespace: "tenant-a".into(),
            pool_ref: "default".into(),
            image: env.image.clone(),
            command: MAIN.iter().map(|s| s.to_string()).collect(),
            runtime: format!("{runtime:?}").to_lowercase(),
            ..SandboxSpec::default()
        };
        edit(&mut spec);
        let spec = spec.validate(&SpecLimits::default()).unwrap();
        let created = create(agent, &id, spec)
            .await
            .unwrap_or_else(|e| panic!("{runtime:?}: create: {e}"));
        let warm = created.warm;
        (
            Self {
                agent: agent.clone(),
                id,
                runtime,
                pid: created.pid,
                stages: created.stages,
                note: created.note,
            },
            warm,
        )
    }

    /// Run `sh -c script` in the sandbox and wait for its end; it must exit (not fail
    /// to start).
    async fn sh(&self, script: &str) -> Probe {
        let session = exec(
            self.agent.runtime(),
            &self.id,
            ExecRequest {
                args: vec!["sh".into(), "-c".into(), script.into()],
                ..ExecRequest::default()
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{:?}: exec {script:?}: {e}", self.runtime));
        let ExecResult {
            stdout,
            stderr,
            exit,
        } = fsb_tests::exec_output(session, DEADLINE).await.unwrap();
        let code = exit.unwrap_or_else(|e| panic!("{:?}: exec {script:?}: {e}", self.runtime));
        Probe {
            stdout,
            stderr,
            code,
        }
    }

    async fn remove(self) {
        self.agent
            .delete(self.id.clone(), Some(Duration::ZERO))
            .await
            .unwrap_or_else(|e| panic!("{:?}: delete: {e}", self.runtime));
    }
}

#[derive(Debug)]
struct Probe {
    stdout: String,
    stderr: String,
    code: i32,
}

impl Probe {
    /// The value of the `key=value` line the probe printed.
    fn value(&self, key: &str) -> &str {
        let prefix = format!("{key}=");
        self.stdout
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .unwrap_or_else(|| panic!("no {key}= line in {self:#?}"))
    }
}

async fn agent(env: &ContainerdEnv, name: &str) -> AgentHandle {
    AgentHandle::start(fsb_tests::agent_config(env, name, 10))
        .await
        .unwrap()
}

/// A host process the sandbox must not see, and its marker argument.
struct HostProcess {
    child: std::process::Child,
    marker: String,
}

impl HostProcess {
    fn spawn() -> Self {
        // A sleep length no other process has: the marker to look for.
        let marker = format!("{}", 700_000 + std::process::id() % 100_000);
        let child = std::process::Command::new("sleep")
            .arg(&marker)
            .spawn()
            .unwrap();
        Self { child, marker }
    }
}

impl Drop for HostProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `pid argv…` for every process the sandbox's /proc lists (what `ps` reads), one
/// line each (the probe's own argv holds newlines).
const LIST_PROCESSES: &str = r#"for d in /proc/[0-9]*; do
  echo "${d#/proc/} $(tr '\0\n' '  ' < "$d/cmdline" 2>/dev/null)"
done"#;

#[actix_rt::test]
async fn a_sandbox_sees_only_its_own_processes() {
    let env = ContainerdEnv::from_env();
    let agent = agent(&env, "agent-hardening-ps").await;
    let host = HostProcess::spawn();
    let host_pid = host.child.id();
    let test_pid = std::process::id();
    // Control: the host's /proc shows the marker (once the child has exec'd), so a
    // listing that could see host processes would find it.
    let cmdline = format!("/proc/{host_pid}/cmdline");
    fsb_tests::wait_until("the host process runs sleep", DEADLINE, || async {
        let argv = tokio::fs::read(&cmdline).await?;
        Ok(String::from_utf8_lossy(&argv)
            .contains(&host.marker)
            .then_some(()))
    })
    .await
    .unwrap();

    for runtime in ALL {
        let sbx = Sandbox::start(&agent, &env, runtime, |_| {}).await;
        let p = sbx
            .sh(&format!(
                "{LIST_PROCESSES}
echo ---
ps
echo host_pid_dir=$(test -e /proc/{host_pid} && echo present || echo absent)
echo test_pid_dir=$(test -e /proc/{test_pid} && echo present || echo absent)
kill -0 {host_pid} 2>&1; echo kill_rc=$?"
            ))
            .await;
        assert_eq!(p.code, 0, "{runtime:?}: {p:#?}");
        let (listing, ps) = p.stdout.split_once("---\n").unwrap();
        let processes: Vec<(u32, &str)> = listing
            .lines()
            .map(|l| {
                let (pid, argv) = l.split_once(' ').unwrap_or((l, ""));
                let pid = pid
                    .parse()
                    .unwrap_or_else(|_| panic!("{runtime:?}: line {l:?} of {p:#?}"));
                (pid, argv.trim())
            })
            .collect();
        // The sandbox's main process is pid 1 of its own namespace...
        assert!(
            processes.contains(&(1, "sleep 86400")),
            "{runtime:?}: {processes:?}"
        );
        // ...and everything else listed is the probe itself (its shell, subshells, tr).
        for (pid, argv) in &processes {
            let ours = *argv == "sleep 86400"
                || argv.starts_with("sh -c")
                || argv.starts_with("tr ")
                || argv.is_empty(); // a subshell that ended while listed
            assert!(
                ours,
                "{runtime:?}: process {pid} {argv:?} is not the sandbox's"
            );
            assert!(*pid != host_pid && *pid != test_pid, "{runtime:?}: {pid}");
        }
        assert!(
            !p.stdout.contains(&host.marker),
            "{runtime:?}: the host's `sleep {}` is visible: {p:#?}",
            host.marker
        );
        assert!(ps.contains("sleep 86400"), "{runtime:?}: ps ran: {ps}");
        assert_eq!(p.value("host_pid_dir"), "absent", "{runtime:?}");
        assert_eq!(p.value("test_pid_dir"), "absent", "{runtime:?}");
        assert_ne!(p.value("kill_rc"), "0", "{runtime:?}: {p:#?}");
        sbx.remove().await;
    }
}

/// Each attempt prints `<name>=<exit code> <its output>`.
const MOUNT_ATTEMPTS: &str = r#"try() { name=$1; shift; out=$("$@" 2>&1); echo "$name=$? $out"; }
echo uid=$(id -u)
mkdir -p /tmp/m
try tmpfs mount -t tmpfs fsb-probe /tmp/m
try proc mount -t proc fsb-probe /tmp/m
try bind mount -o bind / /tmp/m
try remount_sys mount -o remount,rw /sys
try userns busybox unshare -U -m busybox mount -t tmpfs fsb-probe /tmp/m
echo mounted=$(grep -c fsb-probe /proc/mounts)
try core_pattern sh -c 'cat /proc/sys/kernel/core_pattern > /proc/sys/kernel/core_pattern'
echo timer_list=$(cat /proc/timer_list 2>/dev/null | wc -c)
echo keys=$(cat /proc/keys 2>/dev/null | wc -c)"#;

/// Also the kernel settings a mount would reach: masked /proc files read empty and
/// /proc/sys is read-only.
#[actix_rt::test]
async fn a_sandbox_cannot_mount() {
    let env = ContainerdEnv::from_env();
    let agent = agent(&env, "agent-hardening-mount").await;
    // Control: the host's kernel interfaces that the sandbox's are masked over.
    for masked in ["/proc/timer_list", "/proc/keys"] {
        assert!(!std::fs::read(masked).unwrap().is_empty(), "{masked}");
    }
    for runtime in ALL {
        let sbx = Sandbox::start(&agent, &env, runtime, |_| {}).await;
        let p = sbx.sh(MOUNT_ATTEMPTS).await;
        // Root inside: the denials come from the hardening, not from being a user.
        assert_eq!(p.value("uid"), "0", "{runtime:?}: {p:#?}");
        // Each attempt failed with EPERM ("permission denied" is busybox mount's
        // wording of it), not for some other reason. The user-namespace route: runc
        // and crun refuse the unshare (seccomp); gVisor creates the namespace but
        // refuses the first mount in it.
        for attempt in ["tmpfs", "proc", "bind", "remount_sys", "userns"] {
            let result = p.value(attempt);
            assert!(
                !result.starts_with("0 ")
                    && (result.contains("permission denied")
                        || result.contains("Operation not permitted")),
                "{runtime:?}: {attempt}: {result:?}"
            );
        }
        assert_eq!(p.value("mounted"), "0", "{runtime:?}: {p:#?}");
        assert_eq!(p.value("timer_list"), "0", "{runtime:?}: masked");
        assert_eq!(p.value("keys"), "0", "{runtime:?}: masked");
        // /proc/sys is read-only (gVisor's has no core_pattern at all).
        if runtime != Runtime::Gvisor {
            let result = p.value("core_pattern");
            assert!(
                !result.starts_with("0 ") && result.contains("Read-only file system"),
                "{runtime:?}: {result:?}"
            );
        }
        sbx.remove().await;
    }
}

/// A file that is no kernel module, and `insmod` on it; prints `insmod=<exit code>`.
const INSMOD: &str = "echo not-a-module > /tmp/fsb-probe.ko
busybox insmod /tmp/fsb-probe.ko; echo insmod=$?";

#[actix_rt::test]
async fn a_sandbox_cannot_load_kernel_modules() {
    let env = ContainerdEnv::from_env();
    let agent = agent(&env, "agent-hardening-insmod").await;
    // Control: the same call on the host reaches the kernel, which answers something
    // other than EPERM (ENOSYS where modules are compiled out, as on this machine's
    // kernel; a bad-format error where they are not).
    let host = tempfile::tempdir().unwrap();
    let module = host.path().join("fsb-probe.ko");
    std::fs::write(&module, "not-a-module\n").unwrap();
    let out = std::process::Command::new("busybox")
        .arg("insmod")
        .arg(&module)
        .output()
        .unwrap();
    let host_err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{host_err}");
    assert!(
        host_err.contains("can't insert") && !host_err.contains("Operation not permitted"),
        "host insmod: {host_err}"
    );

    for runtime in ALL {
        let sbx = Sandbox::start(&agent, &env, runtime, |_| {}).await;
        let p = sbx.sh(INSMOD).await;
        assert_ne!(p.value("insmod"), "0", "{runtime:?}: {p:#?}");
        // EPERM: under runc and crun from the seccomp profile, before the kernel is
        // asked; under gVisor from the Sentry, so the host kernel never sees the call.
        assert!(
            p.stderr
                .contains("can't insert '/tmp/fsb-probe.ko': Operation not permitted"),
            "{runtime:?}: {p:#?}"
        );
        sbx.remove().await;
    }
}

/// Starts up to 64 background sleeps, printing the count after each; the shell stops
/// at the first fork the kernel refuses.
const FORK_64: &str = "n=0
while [ $n -lt 64 ]; do sleep 86400 >/dev/null 2>&1 & n=$((n+1)); echo started=$n; done";

#[actix_rt::test]
async fn a_sandbox_cannot_exceed_its_pids_limit() {
    let env = ContainerdEnv::from_env();
    let agent = agent(&env, "agent-hardening-pids").await;
    const LIMIT: u32 = 16;
    // Not gVisor: there the cgroup holds the Sentry's host threads, not the sandbox's
    // processes (which the Sentry runs itself); see the gVisor test below.
    for runtime in [Runtime::Runc, Runtime::Crun] {
        // A default sandbox has a limit.
        let plain = Sandbox::start(&agent, &env, runtime, |_| {}).await;
        let max = fsb_tests::sandbox_cgroup_value("pids", "pids.max", "pids.max", &plain.id);
        assert_eq!(max.unwrap(), DEFAULT_PIDS_LIMIT.to_string(), "{runtime:?}");
        plain.remove().await;

        // A small one, so that the limit and not the loop's end stops the forks.
        let sbx = Sandbox::start(&agent, &env, runtime, |s| s.resources.pids = LIMIT).await;
        let p = sbx.sh(FORK_64).await;
        let started: u32 = p
            .stdout
            .lines()
            .filter_map(|l| l.strip_prefix("started="))
            .next_back()
            .map_or(0, |n| n.parse().unwrap());
        assert!(
            p.stderr.contains("can't fork") && p.stderr.contains("Resource temporarily"),
            "{runtime:?}: the kernel refused a fork: {p:#?}"
        );
        assert_ne!(p.code, 0, "{runtime:?}");
        // The sandbox's main process and the probe's shell hold two of the pids.
        assert!(
            (LIMIT / 2..=LIMIT - 2).contains(&started),
            "{runtime:?}: {started} sleeps started under a limit of {LIMIT}: {p:#?}"
        );
        let cgroup = |file: &str| {
            fsb_tests::sandbox_cgroup_value("pids", file, file, &sbx.id)
                .unwrap_or_else(|e| panic!("{runtime:?}: {e:#}"))
        };
        assert_eq!(cgroup("pids.max"), LIMIT.to_string(), "{runtime:?}");
        let current: u32 = cgroup("pids.current").parse().unwrap();
        assert!(
            current <= LIMIT && current > started,
            "{runtime:?}: pids.current {current}, started {started}"
        );
        let refused = cgroup("pids.events");
        assert_ne!(refused, "max 0", "{runtime:?}: the cgroup counted refusals");
        sbx.remove().await;
    }
}

/// Where a sandbox can write without any volume: its rootfs, tmpfs-backed /dev/shm.
const SECRET_DIRS: [&str; 5] = ["/root", "/tmp", "/var/tmp", "/run", "/dev/shm"];

/// Lists every file named `fsb-secret*` outside /proc and /sys.
const FIND_SECRETS: &str =
    "find / -path /proc -prune -o -path /sys -prune -o -name 'fsb-secret*' -print";

#[actix_rt::test]
async fn a_sandbox_cannot_read_another_sandboxs_files() {
    let env = ContainerdEnv::from_env();
    let agent = agent(&env, "agent-hardening-files").await;
    for runtime in ALL {
        let secret = format!("secret-{}", SandboxId::generate());
        let a = Sandbox::start(&agent, &env, runtime, |_| {}).await;
        let b = Sandbox::start(&agent, &env, runtime, |s| s.namespace = "tenant-b".into()).await;

        let write: String = SECRET_DIRS
            .iter()
            .map(|d| format!("echo {secret} > {d}/fsb-secret && "))
            .collect();
        let p = a.sh(&format!("{write}{FIND_SECRETS}")).await;
        assert_eq!(p.code, 0, "{runtime:?}: {p:#?}");
        let found: Vec<&str> = p.stdout.lines().collect();
        assert_eq!(
            found.len(),
            SECRET_DIRS.len(),
            "{runtime:?}: A finds its own: {p:#?}"
        );
        if runtime != Runtime::Gvisor {
            // Control from the host: the file is really in A's root filesystem.
            let on_host = std::fs::read_to_string(format!("/proc/{}/root/tmp/fsb-secret", a.pid));
            assert_eq!(on_host.unwrap().trim(), secret, "{runtime:?}");
        }

        let reads: String = SECRET_DIRS
            .iter()
            .map(|d| format!("cat {d}/fsb-secret; "))
            .collect();
        let p = b
            .sh(&format!(
                "{reads}
cat /proc/*/root/tmp/fsb-secret
echo ---
{FIND_SECRETS}
echo ---
grep -rl secret- /root /tmp /var /run /dev/shm; echo grep_rc=$?"
            ))
            .await;
        let sections: Vec<&str> = p.stdout.split("---\n").collect();
        assert_eq!(sections.len(), 3, "{runtime:?}: {p:#?}");
        assert_eq!(sections[0], "", "{runtime:?}: B read A's files: {p:#?}");
        assert_eq!(sections[1], "", "{runtime:?}: B finds A's files: {p:#?}");
        assert_eq!(
            p.value("grep_rc"),
            "1",
            "{runtime:?}: nothing matches: {p:#?}"
        );
        assert!(!p.stdout.contains(&secret), "{runtime:?}: {p:#?}");
        assert!(
            p.stderr.matches("No such file or directory").count() > SECRET_DIRS.len(),
            "{runtime:?}: every read failed for want of the file: {p:#?}"
        );
        a.remove().await;
        b.remove().await;
    }
}

/// `busybox arping` opens a packet socket (AF_PACKET) before anything else, then
/// refuses loopback as "not ARPable": so its message says which step stopped it.
const ARPING: [&str; 8] = ["busybox", "arping", "-c", "1", "-w", "1", "-I", "lo"];

#[actix_rt::test]
async fn a_sandbox_cannot_open_packet_sockets_in_the_shared_network_namespace() {
    let env = ContainerdEnv::from_env();
    let agent = agent(&env, "agent-hardening-netraw").await;
    // Control: on the host (CAP_NET_RAW) the socket opens and loopback is refused.
    let out = std::process::Command::new(ARPING[0])
        .args(&ARPING[1..])
        .arg("127.0.0.1")
        .output()
        .unwrap();
    let host_err = String::from_utf8_lossy(&out.stderr);
    assert!(host_err.contains("not ARPable"), "host arping: {host_err}");

    for runtime in ALL {
        let sbx = Sandbox::start(&agent, &env, runtime, |_| {}).await;
        let p = sbx.sh(&format!("{} 127.0.0.1", ARPING.join(" "))).await;
        assert_ne!(p.code, 0, "{runtime:?}: {p:#?}");
        // gVisor runs with its own netstack here (the harness's --network=none) and
        // drops CAP_NET_RAW itself; runc and crun share the agent's namespace.
        assert!(
            p.stderr.contains("arping: socket: Operation not permitted")
                || runtime == Runtime::Gvisor && p.stderr.contains("arping: socket: "),
            "{runtime:?}: {p:#?}"
        );
        sbx.remove().await;
    }
}

/// Writes a file at `/` and in `/tmp` (the image's root filesystem under runc and crun)
/// and one in `/dev/shm` (a tmpfs of the sandbox's own), printing each result.
const WRITE_ROOTFS: &str = "echo x > /fsb-probe 2>/dev/null; echo root=$?
echo x > /tmp/fsb-probe 2>/dev/null; echo tmp=$?
echo x > /dev/shm/fsb-probe 2>/dev/null; echo shm=$?
touch /fsb-probe2 2>&1 | head -1";

#[actix_rt::test]
async fn a_read_only_rootfs_refuses_writes_and_keeps_the_sandbox_running() {
    let env = ContainerdEnv::from_env();
    let agent = agent(&env, "agent-hardening-rofs").await;
    for runtime in ALL {
        // Control: the default root filesystem is writable.
        let rw = Sandbox::start(&agent, &env, runtime, |_| {}).await;
        let p = rw.sh(WRITE_ROOTFS).await;
        assert_eq!(
            (p.value("root"), p.value("tmp")),
            ("0", "0"),
            "{runtime:?}: {p:#?}"
        );
        rw.remove().await;

        let ro = Sandbox::start(&agent, &env, runtime, |s| s.read_only_rootfs = true).await;
        let p = ro.sh(WRITE_ROOTFS).await;
        assert_ne!(p.value("root"), "0", "{runtime:?}: {p:#?}");
        // gVisor mounts a tmpfs of its own (in the sandbox's memory) over /tmp when the
        // spec has no /tmp mount; under runc and crun /tmp is the read-only image.
        let tmp_writable = runtime == Runtime::Gvisor;
        assert_eq!(p.value("tmp") == "0", tmp_writable, "{runtime:?}: {p:#?}");
        assert_eq!(
            p.value("shm"),
            "0",
            "{runtime:?}: /dev/shm stays writable: {p:#?}"
        );
        assert!(
            p.stdout.contains("Read-only file system")
                || p.stderr.contains("Read-only file system"),
            "{runtime:?}: EROFS named: {p:#?}"
        );
        ro.remove().await;
    }
}

/// What a sandbox's root sees of its ids, and whether it can write its root
/// filesystem: a new file in `/` and an image file (`/etc/passwd`, 0644 root).
const USERNS_PROBE: &str = r#"echo uid=$(id -u)
echo "uid_map=$(echo $(cat /proc/self/uid_map))"
echo "gid_map=$(echo $(cat /proc/self/gid_map))"
echo "netns=$(readlink /proc/self/ns/net)"
echo image_owner=$(stat -c '%u:%g' /bin /etc/passwd | tr '\n' ' ')
touch /fsb-userns-probe; echo create_in_root=$?
echo fsb-probe:x:4242:4242::/:/bin/sh >> /etc/passwd; echo append_image_file=$?"#;

/// The host's view of a process: the `Uid:` and `Gid:` lines of `/proc/<pid>/status`
/// (real, effective, saved, filesystem).
fn host_ids(pid: u32) -> (String, String) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key} in {status}"))
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    };
    (line("Uid:"), line("Gid:"))
}

#[actix_rt::test]
async fn a_user_namespace_makes_the_sandboxs_root_an_unprivileged_host_uid() {
    use std::os::unix::fs::MetadataExt;
    let env = ContainerdEnv::from_env();
    let agent = agent(&env, "agent-hardening-userns").await;
    let base = fsb_agent::userns::HOST_BASE;
    let mapped = format!("{base} {base} {base} {base}");
    for runtime in [Runtime::Runc, Runtime::Crun] {
        // Control: without the option root is the host's root, in the host's mapping.
        let plain = Sandbox::start(&agent, &env, runtime, |_| {}).await;
        let p = plain.sh(USERNS_PROBE).await;
        assert_eq!(p.value("uid_map"), "0 0 4294967295", "{runtime:?}: {p:#?}");
        assert_eq!(
            host_ids(plain.pid),
            ("0 0 0 0".to_owned(), "0 0 0 0".to_owned()),
            "{runtime:?}"
        );
        plain.remove().await;

        let sbx = Sandbox::start(&agent, &env, runtime, |s| s.user_namespace = true).await;
        let p = sbx.sh(USERNS_PROBE).await;
        assert_eq!(p.code, 0, "{runtime:?}: {p:#?}");
        // Inside: root, in a namespace mapping 0..65536 to the agent's range.
        assert_eq!(p.value("uid"), "0", "{runtime:?}: {p:#?}");
        assert_eq!(p.value("uid_map"), format!("0 {base} 65536"), "{runtime:?}");
        assert_eq!(p.value("gid_map"), format!("0 {base} 65536"), "{runtime:?}");
        // The image's files are root's inside (remapped on disk), so root can write them.
        assert_eq!(p.value("image_owner"), "0:0 0:0", "{runtime:?}: {p:#?}");
        assert_eq!(p.value("create_in_root"), "0", "{runtime:?}: {p:#?}");
        assert_eq!(p.value("append_image_file"), "0", "{runtime:?}: {p:#?}");
        // Outside: the sandbox's process and the file its root made belong to the
        // range's first id, not to uid 0.
        assert_eq!(
            host_ids(sbx.pid),
            (mapped.clone(), mapped.clone()),
            "{runtime:?}: the sandbox's root is host uid 0"
        );
        let made =
            std::fs::symlink_metadata(format!("/proc/{}/root/fsb-userns-probe", sbx.pid)).unwrap();
        assert_eq!((made.uid(), made.gid()), (base, base), "{runtime:?}");
        // crun shares the agent's network namespace as usual; runc 1.1 could not exec
        // into it from the user namespace, so there the sandbox has its own.
        let agent_netns = std::fs::read_link("/proc/self/ns/net").unwrap();
        assert_eq!(
            p.value("netns") == agent_netns.to_str().unwrap(),
            runtime == Runtime::Crun,
            "{runtime:?}: {p:#?}"
        );
        assert!(
            sbx.stages.iter().any(|(stage, _)| *stage == "remap"),
            "{runtime:?}: {:?}",
            sbx.stages
        );
        sbx.remove().await;
    }
}

#[actix_rt::test]
async fn a_user_namespace_is_refused_under_gvisor_before_anything_is_created() {
    let env = ContainerdEnv::from_env();
    // Named in the spec: the spec does not validate.
    let spec = SandboxSpec {
        namespace: "tenant-a".into(),
        pool_ref: "default".into(),
        image: env.image.clone(),
        command: MAIN.iter().map(|s| s.to_string()).collect(),
        runtime: "gvisor".into(),
        user_namespace: true,
        ..SandboxSpec::default()
    };
    let err = spec.validate(&SpecLimits::default()).unwrap_err();
    assert_eq!(err.field(), "spec.userNamespace", "{err}");
    assert!(err.to_string().contains("user_namespace"), "{err}");
    // The agent's default runtime: refused by the agent with FailedPrecondition, and
    // containerd holds nothing under the id.
    let mut config = fsb_tests::agent_config(&env, "agent-hardening-userns-gvisor", 4);
    config.default_runtime = Runtime::Gvisor;
    let agent = AgentHandle::start(config).await.unwrap();
    let spec = SandboxSpec {
        runtime: String::new(),
        ..spec
    }
    .validate(&SpecLimits::default())
    .unwrap();
    let id = SandboxId::generate();
    let err = create(&agent, &id, spec).await.unwrap_err();
    assert!(
        matches!(err, fsb_agent::AgentError::FailedPrecondition(_)),
        "{err:?}"
    );
    assert!(err.to_string().contains("user_namespace"), "{err}");
    assert!(!agent.containers().await.unwrap().contains(&id));
    assert!(!snapshot_exists(&agent, id.as_str()).await, "{id}");
    assert!(agent.inventory().await.unwrap().is_empty());
}

#[actix_rt::test]
async fn exposed_ports_with_a_user_namespace_are_refused_under_runc() {
    let env = ContainerdEnv::from_env();
    let agent = agent(&env, "agent-hardening-userns-ports").await;
    let spec = SandboxSpec {
        namespace: "tenant-a".into(),
        pool_ref: "default".into(),
        image: env.image.clone(),
        command: MAIN.iter().map(|s| s.to_string()).collect(),
        runtime: "runc".into(),
        user_namespace: true,
        exposed_ports: vec![18_431],
        ..SandboxSpec::default()
    }
    .validate(&SpecLimits::default())
    .unwrap();
    let id = SandboxId::generate();
    let err = create(&agent, &id, spec).await.unwrap_err();
    assert!(
        matches!(err, fsb_agent::AgentError::FailedPrecondition(_)),
        "{err:?}"
    );
    assert!(err.to_string().contains("spec.exposedPorts"), "{err}");
    assert!(!agent.containers().await.unwrap().contains(&id));
    assert!(!snapshot_exists(&agent, id.as_str()).await, "{id}");
}

#[actix_rt::test]
async fn a_failed_user_namespace_create_leaves_only_the_remapped_image_behind() {
    let env = ContainerdEnv::from_env();
    let agent = agent(&env, "agent-hardening-userns-fail").await;
    let image = agent
        .images()
        .resolve(&fsb_core::ImageRef::parse("image", &env.image).unwrap())
        .await
        .unwrap();
    let remapped = fsb_agent::userns::MAPPING.remapped_key(&image.chain_id);
    for runtime in [Runtime::Runc, Runtime::Crun] {
        let spec = SandboxSpec {
            namespace: "tenant-a".into(),
            pool_ref: "default".into(),
            image: env.image.clone(),
            command: vec!["/no/such/program".into()],
            runtime: format!("{runtime:?}").to_lowercase(),
            user_namespace: true,
            ..SandboxSpec::default()
        }
        .validate(&SpecLimits::default())
        .unwrap();
        let id = SandboxId::generate();
        let err = create(&agent, &id, spec).await;
        assert!(err.is_err(), "{runtime:?}: {err:?}");
        assert!(
            !agent.containers().await.unwrap().contains(&id),
            "{runtime:?}"
        );
        assert!(!snapshot_exists(&agent, id.as_str()).await, "{runtime:?}");
        assert!(
            snapshot_exists(&agent, &remapped).await,
            "{runtime:?}: the remapped image is kept for the next create"
        );
    }
    // It survives containerd's garbage collector (kept by a GC label on the image's
    // config blob): a lease deleted with `sync` runs a collection before answering.
    collect_garbage(&agent).await;
    assert!(
        snapshot_exists(&agent, &remapped).await,
        "the remapped image is kept with the image"
    );
}

/// Run containerd's garbage collector now.
async fn collect_garbage(agent: &AgentHandle) {
    use containerd_client::services::v1::{
        CreateRequest, DeleteRequest, leases_client::LeasesClient,
    };
    let cd = agent.runtime().containerd();
    let id = format!("fsb-test-gc-{}", SandboxId::generate());
    let mut leases = LeasesClient::new(cd.channel());
    leases
        .create(cd.request(CreateRequest {
            id: id.clone(),
            labels: Default::default(),
        }))
        .await
        .unwrap();
    leases
        .delete(cd.request(DeleteRequest { id, sync: true }))
        .await
        .unwrap();
}

async fn snapshot_exists(agent: &AgentHandle, key: &str) -> bool {
    use containerd_client::services::v1::snapshots::{
        StatSnapshotRequest, snapshots_client::SnapshotsClient,
    };
    let cd = agent.runtime().containerd();
    let req = cd.request(StatSnapshotRequest {
        snapshotter: "overlayfs".into(),
        key: key.into(),
    });
    match SnapshotsClient::new(cd.channel()).stat(req).await {
        Ok(_) => true,
        Err(s) if s.code() == tonic::Code::NotFound => false,
        Err(s) => panic!("stat snapshot {key}: {s}"),
    }
}

/// What a user namespace costs a cold create (not a pass/fail test: run it with
/// `--ignored --nocapture`): creates with and without it, alternating, through the
/// agent, per runtime; the first user-namespace create of a fresh containerd also
/// remaps the image (its `remap` stage), which is printed apart.
#[actix_rt::test]
#[ignore = "a measurement; run explicitly"]
#[allow(clippy::print_stdout)]
async fn user_namespace_cold_create_cost() {
    let env = ContainerdEnv::from_env();
    let agent = agent(&env, "agent-hardening-userns-cost").await;
    let rounds: usize = std::env::var("FSB_USERNS_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    // The first create with a user namespace remaps the image: remove the remapped
    // image a previous run left (the test containerd's state is kept between runs).
    let image = agent
        .images()
        .resolve(&fsb_core::ImageRef::parse("image", &env.image).unwrap())
        .await
        .unwrap();
    let remapped = fsb_agent::userns::MAPPING.remapped_key(&image.chain_id);
    {
        use containerd_client::services::v1::snapshots::{
            RemoveSnapshotRequest, snapshots_client::SnapshotsClient,
        };
        let cd = agent.runtime().containerd();
        let removed = SnapshotsClient::new(cd.channel())
            .remove(cd.request(RemoveSnapshotRequest {
                snapshotter: "overlayfs".into(),
                key: remapped.clone(),
            }))
            .await;
        println!("removed {remapped}: {:?}", removed.map(|_| ()));
    }
    let first = Sandbox::start(&agent, &env, Runtime::Runc, |s| s.user_namespace = true).await;
    println!(
        "first user-namespace create: note {:?}, stages {:?}",
        first.note, first.stages
    );
    first.remove().await;
    let pct = |v: &mut Vec<Duration>| {
        v.sort();
        let at = |q: f64| v[((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1];
        (at(0.5), at(0.9), at(0.99))
    };
    for runtime in [Runtime::Runc, Runtime::Crun] {
        let (mut plain, mut userns) = (Vec::new(), Vec::new());
        for i in 0..rounds * 2 {
            let with = (i % 4 == 1) || (i % 4 == 2); // plain, userns, userns, plain, ...
            let t = std::time::Instant::now();
            let sbx = Sandbox::start(&agent, &env, runtime, |s| s.user_namespace = with).await;
            let took = t.elapsed();
            if with {
                userns.push(took);
            } else {
                plain.push(took);
            }
            sbx.remove().await;
        }
        let (p, u) = (pct(&mut plain), pct(&mut userns));
        println!(
            "{runtime:?}: {} creates each; p50/p90/p99 ms: plain {:.1}/{:.1}/{:.1}, userns {:.1}/{:.1}/{:.1}; p50 ratio {:.3}",
            plain.len(),
            p.0.as_secs_f64() * 1e3,
            p.1.as_secs_f64() * 1e3,
            p.2.as_secs_f64() * 1e3,
            u.0.as_secs_f64() * 1e3,
            u.1.as_secs_f64() * 1e3,
            u.2.as_secs_f64() * 1e3,
            u.0.as_secs_f64() / p.0.as_secs_f64()
        );
    }
}

/// Prints the probe's effective and bounding capabilities, the main process's
/// effective ones (written at its start by [`CAPS_MAIN`]), and chown's result.
const CAP_PROBE: &str =
    "sed -n 's/^CapEff:[[:space:]]*/eff=/p; s/^CapBnd:[[:space:]]*/bnd=/p' /proc/self/status
sed -n 's/^CapEff:[[:space:]]*/main=/p' /dev/shm/main-caps
touch /dev/shm/owned && chown 1:1 /dev/shm/owned; echo chown=$?";

/// The sandbox's main process: keeps its own /proc status (in /dev/shm, writable even
/// with a read-only root filesystem), then sleeps.
const CAPS_MAIN: &str = "cat /proc/self/status > /dev/shm/main-caps; exec sleep 86400";

fn caps_main(s: &mut SandboxSpec) {
    s.command = vec!["sh".into(), "-c".into(), CAPS_MAIN.into()];
}

/// A capability mask (hex, as /proc prints it) has the bit of `cap` (`CAP_*`).
fn has(mask: &str, cap: &str) -> bool {
    let mask = u64::from_str_radix(mask, 16).unwrap_or_else(|e| panic!("{mask:?}: {e}"));
    mask & (1 << capability::bit(cap).unwrap()) != 0
}

/// The probe's masks once the main process has written its status.
async fn cap_probe(sbx: &Sandbox) -> Probe {
    wait_until("the main process's status", DEADLINE, || async {
        let p = sbx.sh(CAP_PROBE).await;
        Ok(p.stdout.contains("main=").then_some(p))
    })
    .await
    .unwrap()
}

const DROPPED: [&str; 2] = ["CAP_CHOWN", "CAP_NET_BIND_SERVICE"];

#[actix_rt::test]
async fn a_pool_drop_list_takes_capabilities_from_cold_and_warm_sandboxes() {
    let env = ContainerdEnv::from_env();
    let plain = agent(&env, "agent-hardening-caps-default").await;
    // Names as users write them; the agent's flag and the pool's field parse the same way.
    let drop = CapabilityDrop::parse(["chown", "NET_BIND_SERVICE"]).unwrap();
    let mut config = fsb_tests::agent_config(&env, "agent-hardening-caps-drop", 10);
    config.drop_capabilities = drop.clone();
    // One warm instance per runtime, made ahead of time under the same policy.
    config.warm = WarmConfig {
        targets: ALL
            .iter()
            .map(|r| WarmConfig::parse_target(&format!("{}=1", env.image), *r).unwrap())
            .collect(),
        init: Some(std::env::var("FSB_INIT_BIN").unwrap().into()),
        ..WarmConfig::default()
    };
    let reduced = AgentHandle::start(config).await.unwrap();
    wait_until("a warm instance per runtime", DEADLINE, || async {
        Ok((reduced.warm_instances().await?.len() == ALL.len()).then_some(()))
    })
    .await
    .unwrap();

    for runtime in ALL {
        // Control: a default agent's sandbox has them, and chown works as root.
        let sbx = Sandbox::start(&plain, &env, runtime, caps_main).await;
        let p = cap_probe(&sbx).await;
        for cap in DROPPED.into_iter().chain(["CAP_KILL"]) {
            for key in ["eff", "bnd", "main"] {
                assert!(
                    has(p.value(key), cap),
                    "{runtime:?} default {key} {cap}: {p:#?}"
                );
            }
        }
        assert_eq!(p.value("chown"), "0", "{runtime:?}: {p:#?}");
        sbx.remove().await;

        // A create takes the warm instance; one with a read-only root filesystem is
        // always cold.
        for cold in [false, true] {
            let id = if cold {
                SandboxId::generate()
            } else {
                let ready = reduced.warm_instances().await.unwrap();
                ready
                    .into_iter()
                    .find(|(k, _)| k.runtime == runtime)
                    .unwrap_or_else(|| panic!("{runtime:?}: no warm instance"))
                    .1
            };
            let (sbx, warm) = Sandbox::start_how(&reduced, &env, runtime, id, |s| {
                caps_main(s);
                s.read_only_rootfs = cold;
            })
            .await;
            assert_eq!(warm, !cold, "{runtime:?}");
            let how = if warm { "warm" } else { "cold" };
            let p = cap_probe(&sbx).await;
            for key in ["eff", "bnd", "main"] {
                for cap in DROPPED {
                    assert!(
                        !has(p.value(key), cap),
                        "{runtime:?} {how} {key} has {cap}: {p:#?}"
                    );
                }
                // Only those: the rest of the default set is still there.
                assert!(
                    has(p.value(key), "CAP_KILL"),
                    "{runtime:?} {how} {key}: {p:#?}"
                );
                assert!(
                    has(p.value(key), "CAP_SETUID"),
                    "{runtime:?} {how} {key}: {p:#?}"
                );
            }
            assert_eq!(p.value("chown"), "1", "{runtime:?} {how}: {p:#?}");
            assert!(
                p.stderr.contains("Operation not permitted"),
                "{runtime:?} {how}: chown fails with EPERM: {p:#?}"
            );
            sbx.remove().await;
        }
    }
    reduced.stop_warm().await.unwrap();
}

/// Starts up to 400 background sleeps, printing the count after each, until a fork
/// fails; then says the shell is still alive.
const FORK_400: &str = "n=0
while [ $n -lt 400 ]; do sleep 86400 >/dev/null 2>&1 & n=$((n+1)); echo started=$n; done
echo alive";

#[actix_rt::test]
async fn a_gvisor_sandbox_cannot_fork_past_its_process_limit() {
    let env = ContainerdEnv::from_env();
    let agent = agent(&env, "agent-hardening-gvisor-nproc").await;
    // A default sandbox, then a small limit that the host cgroup alone could not even
    // start the Sentry under.
    for (pids, limit) in [(None, GVISOR_DEFAULT_NPROC), (Some(16), 16)] {
        let sbx = Sandbox::start(&agent, &env, Runtime::Gvisor, |s| {
            if let Some(p) = pids {
                s.resources.pids = p;
            }
        })
        .await;
        let p = sbx.sh(FORK_400).await;
        let started: u32 = p
            .stdout
            .lines()
            .filter_map(|l| l.strip_prefix("started="))
            .next_back()
            .map_or(0, |n| n.parse().unwrap());
        assert!(
            p.stderr.contains("can't fork") && p.stderr.contains("Resource temporarily"),
            "limit {limit}: the Sentry refused a fork: {p:#?}"
        );
        // The sandbox's main process and the probe's shell count too.
        assert!(
            (limit / 2..=limit - 2).contains(&started),
            "{started} sleeps started under a limit of {limit}: {p:#?}"
        );
        // The Sentry survived: the sandbox still answers, the host cgroup kept room.
        let again = sbx.sh("echo alive").await;
        assert_eq!(again.stdout.trim(), "alive", "limit {limit}: {again:#?}");
        let cgroup = |file: &str| {
            fsb_tests::sandbox_cgroup_value("pids", file, file, &sbx.id)
                .unwrap_or_else(|e| panic!("{e:#}"))
        };
        assert_eq!(cgroup("pids.max"), DEFAULT_PIDS_LIMIT.to_string());
        let current: u32 = cgroup("pids.current").parse().unwrap();
        assert!(current < DEFAULT_PIDS_LIMIT, "pids.current {current}");
        assert_eq!(
            cgroup("pids.events"),
            "max 0",
            "the host cgroup never refused"
        );
        // And the host can still fork.
        let host = std::process::Command::new("true").status().unwrap();
        assert!(host.success());
        sbx.remove().await;
    }
}
