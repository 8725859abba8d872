//! The OCI runtime spec (`config.json`) we write ourselves for a sandbox, instead of
//! asking containerd's Go helpers for one: the inputs are the validated sandbox spec,
//! the image's config, and what the agent decided (runtime, network, cgroup, user,
//! injected files); the output is the JSON document containerd stores and the runtime
//! reads.
//!
//! Why `serde_json::Value` built with `json!` rather than typed structs: the document is
//! produced once per sandbox and handed to containerd as JSON bytes; written as `json!`
//! it reads like the `config.json` it produces, with field names spelled exactly as the
//! runtime spec spells them, and "omit what is unset" is just not inserting a key. The
//! tests read it back by JSON pointer, the way runc does. Nothing here needs to parse a
//! spec, so typed structs would only add a second vocabulary.
//!
//! What it encodes, and where each default comes from:
//! - process: args with Kubernetes command/args semantics ([`process_args`]), env
//!   merged image-then-spec ([`process_env`]), cwd, user, containerd's default
//!   capabilities less `CAP_NET_RAW` in a shared network namespace and less what the
//!   pool drops ([`capabilities`]), `noNewPrivileges`, `RLIMIT_NOFILE` 1024 and under
//!   gVisor `RLIMIT_NPROC` at the pids limit ([`rlimits`]);
//! - root `rootfs` (read-only on request), hostname, containerd's default mounts plus a
//!   read-only `/sys/fs/cgroup` and the injected files ([`crate::inject`]);
//! - linux: pid/ipc/uts/mount namespaces plus the network per [`NetworkMode`], cgroups
//!   path, resources (cpu, memory, pids with a default; see [`host_pids_limit`] for
//!   gVisor), containerd's masked and
//!   read-only paths, and the default seccomp profile ([`crate::seccomp`]) except under
//!   gVisor (see [`build_spec`]).

use std::path::PathBuf;

use fsb_core::{
    SandboxId, ValidSpec, capability::CapabilityDrop, labels, quantity::MilliCpu, spec::Runtime,
};
use serde_json::{Value, json};

use crate::{error::AgentError, inject::InjectedMount, seccomp, userns::IdMapping};

/// Runtime-spec version we write: the one runc 1.1, crun 1.8 and runsc on our nodes
/// all report.
pub const OCI_VERSION: &str = "1.0.2-dev";
/// `PATH` when neither the image nor the spec sets one (containerd's default).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// CFS period in microseconds; the quota is derived from the CPU limit against it.
pub const CPU_PERIOD_US: u64 = 100_000;
/// Smallest CFS quota the kernel accepts (1 ms); smaller CPU limits are rounded up to it,
/// as the kubelet does.
pub const MIN_CPU_QUOTA_US: i64 = 1_000;
/// Process limit when the spec sets none: a fork bomb in one sandbox must not exhaust
/// the node's pid space, and 4096 is far above what a code-execution sandbox needs.
pub const DEFAULT_PIDS_LIMIT: u32 = 4096;
/// Under gVisor, the process bound ([`rlimits`]) when the spec sets none. Lower than
/// [`DEFAULT_PIDS_LIMIT`] because under gVisor the host pids cgroup counts the Sentry's
/// host threads and, on the ptrace platform, a stub process and threads per sandbox
/// process (measured with runsc 20221219: ~40 at rest plus ~9 per process), and a
/// Sentry that cannot make a thread dies (Go `fatal error: newosproc`): the rlimit must
/// be reached first, as a clean `EAGAIN`.
pub const GVISOR_DEFAULT_NPROC: u32 = 256;
// The rlimit comes first: the Sentry needs ~40 + 9 per process of the default cgroup.
const _: () = assert!(40 + 9 * GVISOR_DEFAULT_NPROC < DEFAULT_PIDS_LIMIT);
/// Under gVisor, host pids allowed per sandbox process in the cgroup (see
/// [`GVISOR_DEFAULT_NPROC`]); never below [`DEFAULT_PIDS_LIMIT`].
pub const GVISOR_HOST_PIDS_PER_PROCESS: u32 = 16;
/// `RLIMIT_NOFILE`, soft and hard (containerd's default).
pub const NOFILE_LIMIT: u64 = 1024;

/// containerd's default capability set, given as bounding, effective and permitted.
/// (For a non-root user the kernel clears effective and permitted at `execve`, as no
/// ambient set is given; the bounding set still limits what the process can regain.)
pub const DEFAULT_CAPABILITIES: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// Capabilities of a sandbox's process: [`DEFAULT_CAPABILITIES`], less `CAP_NET_RAW`
/// when the sandbox joins a shared network namespace ([`NetworkMode::Join`]), less what
/// the pool drops (`drop`, which can only remove). In a shared namespace a raw or
/// packet socket would see and forge every packet of that namespace: other tenants'
/// sandboxes and the agent's own traffic. (Cost: `ping` as root needs it.)
pub fn capabilities(network: &NetworkMode, drop: &CapabilityDrop) -> Vec<&'static str> {
    drop.apply(
        DEFAULT_CAPABILITIES
            .iter()
            .copied()
            .filter(|c| !(matches!(network, NetworkMode::Join(_)) && *c == "CAP_NET_RAW")),
    )
}

/// `process.rlimits`: `RLIMIT_NOFILE` ([`NOFILE_LIMIT`]) for every runtime, and under
/// gVisor also `RLIMIT_NPROC` at the process limit ([`process_limit`]). There the pids
/// cgroup holds the Sentry's host threads, not the sandbox's processes, and reaching it
/// kills the whole sandbox; the Sentry enforces `RLIMIT_NPROC` itself (per uid, inside
/// that sandbox's kernel: fork fails with `EAGAIN`; tested in `agent_hardening`). Not
/// on runc or crun: without a user namespace the host kernel counts `RLIMIT_NPROC` per
/// host uid across the node, so root in one sandbox would share a count with every
/// root process of the host; the pids cgroup bounds them.
pub fn rlimits(runtime: Runtime, pids_limit: u32) -> Value {
    let mut limits =
        vec![json!({ "type": "RLIMIT_NOFILE", "hard": NOFILE_LIMIT, "soft": NOFILE_LIMIT })];
    if runtime == Runtime::Gvisor {
        limits.push(json!({ "type": "RLIMIT_NPROC", "hard": pids_limit, "soft": pids_limit }));
    }
    Value::Array(limits)
}

/// Paths hidden from the sandbox (containerd's defaults): kernel memory, keys, timers.
pub const MASKED_PATHS: &[&str] = &[
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/sys/firmware",
    "/proc/scsi",
];

/// Paths visible but read-only (containerd's defaults).
pub const READONLY_PATHS: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// The parts of an OCI image config that shape the process.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImageConfig {
    /// `config.Entrypoint`.
    pub entrypoint: Vec<String>,
    /// `config.Cmd`.
    pub cmd: Vec<String>,
    /// `config.Env`, `NAME=value` entries in order.
    pub env: Vec<String>,
    /// `config.WorkingDir` (empty if unset).
    pub working_dir: String,
    /// `config.User` (empty if unset): `uid`, `uid:gid`, `name`, `name:group`.
    pub user: String,
}

/// The OCI image config document, reduced to what we read. `null` and missing fields
/// both become empty.
#[derive(serde::Deserialize)]
struct ImageConfigDoc {
    #[serde(default)]
    config: Option<ImageConfigSection>,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ImageConfigSection {
    #[serde(default)]
    entrypoint: Option<Vec<String>>,
    #[serde(default)]
    cmd: Option<Vec<String>>,
    #[serde(default)]
    env: Option<Vec<String>>,
    #[serde(default)]
    working_dir: Option<String>,
    #[serde(default)]
    user: Option<String>,
}

impl ImageConfig {
    /// Read the OCI image config JSON (`application/vnd.oci.image.config.v1+json`).
    pub fn from_oci_config_json(bytes: &[u8]) -> Result<Self, AgentError> {
        let doc: ImageConfigDoc = serde_json::from_slice(bytes)
            .map_err(|e| AgentError::InvalidArgument(format!("image config: invalid json: {e}")))?;
        let Some(c) = doc.config else {
            return Ok(Self::default());
        };
        Ok(Self {
            entrypoint: c.entrypoint.unwrap_or_default(),
            cmd: c.cmd.unwrap_or_default(),
            env: c.env.unwrap_or_default(),
            working_dir: c.working_dir.unwrap_or_default(),
            user: c.user.unwrap_or_default(),
        })
    }
}

/// The process argv, with Kubernetes semantics:
///
/// | command | args | argv |
/// |---|---|---|
/// | -   | -   | image ENTRYPOINT + image CMD |
/// | set | -   | command (image CMD ignored) |
/// | -   | set | image ENTRYPOINT + args |
/// | set | set | command + args |
pub fn process_args(
    command: &[String],
    args: &[String],
    image: &ImageConfig,
) -> Result<Vec<String>, AgentError> {
    let argv: Vec<String> = match (command.is_empty(), args.is_empty()) {
        (true, true) => [&image.entrypoint[..], &image.cmd[..]].concat(),
        (false, true) => command.to_vec(),
        (true, false) => [&image.entrypoint[..], args].concat(),
        (false, false) => [command, args].concat(),
    };
    if argv.is_empty() {
        return Err(AgentError::InvalidArgument(
            "spec.command: image has no entrypoint or cmd; give a command".into(),
        ));
    }
    Ok(argv)
}

/// The process environment: a default `PATH` first, then the image's entries, then the
/// spec's, each in order; an entry whose name is already present replaces it in place.
/// So the order is stable (`PATH`, image names, new spec names) and a spec value wins.
pub fn process_env(image_env: &[String], spec_env: &[(String, String)]) -> Vec<String> {
    let mut out: Vec<(String, String)> = vec![("PATH".into(), DEFAULT_PATH.into())];
    let mut set = |name: &str, value: &str| match out.iter_mut().find(|(n, _)| n == name) {
        Some(slot) => slot.1 = value.to_owned(),
        None => out.push((name.to_owned(), value.to_owned())),
    };
    for entry in image_env {
        // An image entry without '=' is kept as a name with an empty value.
        let (name, value) = entry.split_once('=').unwrap_or((entry.as_str(), ""));
        set(name, value);
    }
    for (name, value) in spec_env {
        set(name, value);
    }
    out.into_iter().map(|(n, v)| format!("{n}={v}")).collect()
}

/// The working directory: the spec's, else the image's, else `/`.
pub fn process_cwd(spec: &ValidSpec, image: &ImageConfig) -> Result<String, AgentError> {
    if let Some(dir) = &spec.working_dir {
        return Ok(dir.clone());
    }
    match image.working_dir.as_str() {
        "" => Ok("/".into()),
        d if d.starts_with('/') => Ok(d.to_owned()),
        d => Err(AgentError::InvalidArgument(format!(
            "image config WorkingDir: {d:?} must be an absolute path"
        ))),
    }
}

/// Resolve an image `User` (`""`, `uid`, `uid:gid`, `name`, `name:group`, mixed forms
/// too) to numeric ids, reading names from the image's `/etc/passwd` and `/etc/group`
/// (their contents, read by the caller from the rootfs; `None` if absent).
///
/// Without an explicit group the user's primary group from passwd is used; a numeric
/// uid missing from passwd gets gid 0 (as Docker and containerd do).
pub fn resolve_user(
    user: &str,
    passwd: Option<&str>,
    group: Option<&str>,
) -> Result<(u32, u32), AgentError> {
    let invalid =
        |reason: String| AgentError::InvalidArgument(format!("image config User: {reason}"));
    if user.is_empty() {
        return Ok((0, 0));
    }
    let (user_part, group_part) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    if user_part.is_empty() || group_part == Some("") {
        return Err(invalid(format!(
            "{user:?} is not user, user:group, uid or uid:gid"
        )));
    }
    let passwd_entries = || passwd.into_iter().flat_map(|p| parse_db(p, 4));
    let (uid, primary_gid) = match user_part.parse::<u32>() {
        Ok(uid) => {
            let gid = passwd_entries()
                .find(|f| f[2].parse::<u32>().ok() == Some(uid))
                .and_then(|f| f[3].parse().ok())
                .unwrap_or(0);
            (uid, gid)
        }
        Err(_) => {
            let fields = passwd_entries()
                .find(|f| f[0] == user_part)
                .ok_or_else(|| invalid(format!("user {user_part:?} not found in /etc/passwd")))?;
            let uid = fields[2]
                .parse()
                .map_err(|_| invalid(format!("user {user_part:?} has a bad uid in /etc/passwd")))?;
            let gid = fields[3]
                .parse()
                .map_err(|_| invalid(format!("user {user_part:?} has a bad gid in /etc/passwd")))?;
            (uid, gid)
        }
    };
    let gid = match group_part {
        None => primary_gid,
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => {
                let fields = group
                    .into_iter()
                    .flat_map(|p| parse_db(p, 3))
                    .find(|f| f[0] == g)
                    .ok_or_else(|| invalid(format!("group {g:?} not found in /etc/group")))?;
                fields[2]
                    .parse()
                    .map_err(|_| invalid(format!("group {g:?} has a bad gid in /etc/group")))?
            }
        },
    };
    Ok((uid, gid))
}

/// Colon-separated database lines (passwd, group) with at least `min_fields` fields;
/// blank lines, comments and short lines are skipped.
fn parse_db(content: &str, min_fields: usize) -> impl Iterator<Item = Vec<&str>> {
    content
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.split(':').collect::<Vec<_>>())
        .filter(move |f| f.len() >= min_fields)
}

/// The sandbox's network namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NetworkMode {
    /// Join an existing namespace, e.g. `/proc/<agent pid>/ns/net`: the shared-netns
    /// design (seed-review item 6) where sandboxes listen on the agent's ports, no CNI.
    Join(PathBuf),
    /// A new, empty namespace (loopback only).
    Isolated,
}

/// Everything [`build_spec`] needs.
#[derive(Debug)]
pub struct SpecInput<'a> {
    /// The sandbox (written as an annotation).
    pub sandbox_id: &'a SandboxId,
    /// The validated spec.
    pub spec: &'a ValidSpec,
    /// The image's config.
    pub image: &'a ImageConfig,
    /// The runtime that will read the spec.
    pub runtime: Runtime,
    /// Network namespace.
    pub network: NetworkMode,
    /// `linux.cgroupsPath`.
    pub cgroups_path: String,
    /// Hostname inside the sandbox (empty: none set).
    pub hostname: String,
    /// uid and gid of the process (see [`resolve_user`]).
    pub user: (u32, u32),
    /// Files injected read-only (see [`crate::inject`]).
    pub mounts: Vec<InjectedMount>,
    /// Whether the root filesystem is read-only.
    pub read_only_rootfs: bool,
    /// A user namespace with this mapping (the rootfs must be owned by its host ids,
    /// see [`crate::userns`]); `None`: the host's.
    pub user_namespace: Option<IdMapping>,
    /// Capabilities the pool takes away (see [`capabilities`]).
    pub drop_capabilities: CapabilityDrop,
}

/// CFS quota in microseconds per [`CPU_PERIOD_US`] for a CPU limit, rounded up to
/// [`MIN_CPU_QUOTA_US`].
pub fn cpu_quota(cpu: MilliCpu) -> Result<i64, AgentError> {
    cpu.0
        .checked_mul(CPU_PERIOD_US)
        .map(|q| q / 1000)
        .and_then(|q| i64::try_from(q).ok())
        .map(|q| q.max(MIN_CPU_QUOTA_US))
        .ok_or_else(|| {
            AgentError::InvalidArgument(format!("spec.resources.cpu: {}m is too large", cpu.0))
        })
}

/// The most processes a sandbox may hold: the spec's pids limit, else
/// [`DEFAULT_PIDS_LIMIT`] ([`GVISOR_DEFAULT_NPROC`] under gVisor). runc and crun
/// enforce it with the pids cgroup, gVisor's Sentry with `RLIMIT_NPROC` ([`rlimits`]).
pub fn process_limit(spec: &ValidSpec, runtime: Runtime) -> u32 {
    match (spec.pids, runtime) {
        (Some(pids), _) => pids,
        (None, Runtime::Gvisor) => GVISOR_DEFAULT_NPROC,
        (None, _) => DEFAULT_PIDS_LIMIT,
    }
}

/// The host pids cgroup limit: the process limit on runc and crun; under gVisor a
/// backstop for the Sentry's host threads, [`GVISOR_HOST_PIDS_PER_PROCESS`] per allowed
/// process and at least [`DEFAULT_PIDS_LIMIT`] (a small limit must not keep the Sentry
/// from starting).
pub fn host_pids_limit(spec: &ValidSpec, runtime: Runtime) -> u32 {
    let limit = process_limit(spec, runtime);
    match runtime {
        Runtime::Gvisor => limit
            .saturating_mul(GVISOR_HOST_PIDS_PER_PROCESS)
            .max(DEFAULT_PIDS_LIMIT),
        _ => limit,
    }
}

/// The spec's cpu, memory and pids limits as OCI `linux.resources` for `runtime` (the
/// pids default when unset, see [`host_pids_limit`]): written into a cold create's
/// spec, or applied to a claimed warm instance with a task update.
pub fn limits(spec: &ValidSpec, runtime: Runtime) -> Result<Value, AgentError> {
    let mut resources = json!({
        "pids": { "limit": host_pids_limit(spec, runtime) },
    });
    if let Some(cpu) = spec.cpu {
        resources["cpu"] = json!({ "quota": cpu_quota(cpu)?, "period": CPU_PERIOD_US });
    }
    if let Some(memory) = spec.memory {
        let limit = i64::try_from(memory.0).map_err(|_| {
            AgentError::InvalidArgument(format!(
                "spec.resources.memory: {} bytes is too large",
                memory.0
            ))
        })?;
        resources["memory"] = json!({ "limit": limit });
    }
    Ok(resources)
}

/// containerd's default mounts (without its `/run` tmpfs) plus a read-only cgroupfs.
fn default_mounts() -> Vec<Value> {
    let mount = |dest: &str, typ: &str, src: &str, opts: &[&str]| json!({ "destination": dest, "type": typ, "source": src, "options": opts });
    vec![
        mount("/proc", "proc", "proc", &["nosuid", "noexec", "nodev"]),
        mount(
            "/dev",
            "tmpfs",
            "tmpfs",
            &["nosuid", "strictatime", "mode=755", "size=65536k"],
        ),
        mount(
            "/dev/pts",
            "devpts",
            "devpts",
            &[
                "nosuid",
                "noexec",
                "newinstance",
                "ptmxmode=0666",
                "mode=0620",
                "gid=5",
            ],
        ),
        mount(
            "/dev/shm",
            "tmpfs",
            "shm",
            &["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        ),
        mount(
            "/dev/mqueue",
            "mqueue",
            "mqueue",
            &["nosuid", "noexec", "nodev"],
        ),
        mount(
            "/sys",
            "sysfs",
            "sysfs",
            &["nosuid", "noexec", "nodev", "ro"],
        ),
        mount(
            "/sys/fs/cgroup",
            "cgroup",
            "cgroup",
            &["nosuid", "noexec", "nodev", "relatime", "ro"],
        ),
    ]
}

/// Build the runtime spec for one sandbox.
///
/// For [`Runtime::Gvisor`] the seccomp profile is left out: runsc ignores
/// `linux.seccomp` unless started with `--oci-seccomp` (off by default), and its
/// Sentry, not a host filter, is the syscall boundary there. Everything else is the
/// same: runsc validates and accepts the rest of this document (capabilities it does
/// not model, such as `CAP_NET_RAW` without `--net-raw`, it drops itself).
pub fn build_spec(input: &SpecInput<'_>) -> Result<Value, AgentError> {
    let spec = input.spec;
    let args = process_args(&spec.command, &spec.args, input.image)?;
    let env = process_env(&input.image.env, &spec.envs);
    let cwd = process_cwd(spec, input.image)?;
    if input.hostname.len() > 64 || input.hostname.contains('\0') {
        return Err(AgentError::InvalidArgument(format!(
            "hostname: {:?} must be at most 64 bytes without NUL",
            input.hostname
        )));
    }

    let mut mounts = default_mounts();
    if input.user_namespace.is_some() && matches!(input.network, NetworkMode::Join(_)) {
        // sysfs can only be mounted by the user namespace owning the network
        // namespace, and a joined one is the host's (runc fails with EPERM; crun falls
        // back to this itself): the host's /sys, bound read-only (recursively: a user
        // namespace may not bind a mount without the mounts under it), as runc's
        // rootless spec does. Its files stay the host's (nobody inside), so root in
        // the sandbox cannot write them.
        for m in &mut mounts {
            if m["destination"] == "/sys" {
                *m = json!({
                    "destination": "/sys",
                    "type": "bind",
                    "source": "/sys",
                    "options": ["rbind", "nosuid", "noexec", "nodev", "ro"],
                });
            }
        }
    }
    for m in &input.mounts {
        let source = m.source.to_str().ok_or_else(|| {
            AgentError::InvalidArgument(format!(
                "injection source {}: not valid UTF-8",
                m.source.display()
            ))
        })?;
        mounts.push(json!({
            "destination": m.destination,
            "type": "bind",
            "source": source,
            "options": ["bind", "ro", "nosuid", "nodev"],
        }));
    }

    let network = match &input.network {
        NetworkMode::Join(path) => {
            let path = path.to_str().ok_or_else(|| {
                AgentError::InvalidArgument(format!(
                    "network namespace {}: not valid UTF-8",
                    path.display()
                ))
            })?;
            json!({ "type": "network", "path": path })
        }
        NetworkMode::Isolated => json!({ "type": "network" }),
    };

    let mut resources = limits(spec, input.runtime)?;
    // Deny every device node except those the runtime always allows
    // (null, zero, full, random, urandom, tty, ptmx, pts), as containerd does.
    resources["devices"] = json!([{ "allow": false, "access": "rwm" }]);

    let mut linux = json!({
        "namespaces": [
            { "type": "pid" },
            { "type": "ipc" },
            { "type": "uts" },
            { "type": "mount" },
            network,
        ],
        "cgroupsPath": input.cgroups_path,
        "resources": resources,
        "maskedPaths": MASKED_PATHS,
        "readonlyPaths": READONLY_PATHS,
    });
    let caps = capabilities(&input.network, &input.drop_capabilities);
    if input.runtime != Runtime::Gvisor {
        linux["seccomp"] = seccomp::default_profile(&caps);
    }
    if let Some(m) = input.user_namespace {
        if input.runtime == Runtime::Gvisor {
            // runsc accepts the mappings and ignores them.
            return Err(AgentError::FailedPrecondition(format!(
                "spec.userNamespace: user_namespace {}",
                fsb_core::spec::USER_NAMESPACE_GVISOR
            )));
        }
        let map = json!([{ "containerID": 0, "hostID": m.host, "size": m.size }]);
        if let Some(namespaces) = linux["namespaces"].as_array_mut() {
            namespaces.push(json!({ "type": "user" }));
        }
        linux["uidMappings"] = map.clone();
        linux["gidMappings"] = map;
    }

    let mut annotations = serde_json::Map::new();
    annotations.insert(labels::LABEL_ID.into(), input.sandbox_id.as_str().into());

    let mut doc = json!({
        "ociVersion": OCI_VERSION,
        "process": {
            "terminal": false,
            "user": { "uid": input.user.0, "gid": input.user.1 },
            "args": args,
            "env": env,
            "cwd": cwd,
            "capabilities": { "bounding": caps, "effective": caps, "permitted": caps },
            "rlimits": rlimits(input.runtime, process_limit(spec, input.runtime)),
            "noNewPrivileges": true,
        },
        "root": { "path": "rootfs", "readonly": input.read_only_rootfs },
        "mounts": mounts,
        "annotations": annotations,
        "linux": linux,
    });
    if !input.hostname.is_empty() {
        doc["hostname"] = json!(input.hostname);
    }
    Ok(doc)
}

#[cfg(test)]
pub(crate) mod tests {
    use fsb_core::spec::{EnvVar, ResourcesSpec, SandboxSpec, SpecLimits};

    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| (*x).to_owned()).collect()
    }

    fn image() -> ImageConfig {
        ImageConfig {
            entrypoint: s(&["/entry"]),
            cmd: s(&["--serve", "8080"]),
            env: s(&["HOME=/root", "LANG=C.UTF-8"]),
            working_dir: "/app".into(),
            user: String::new(),
        }
    }

    // --- process args: the four Kubernetes cases -------------------------------------

    #[test]
    fn no_command_no_args_runs_entrypoint_and_cmd() {
        let argv = process_args(&[], &[], &image()).unwrap();
        assert_eq!(argv, s(&["/entry", "--serve", "8080"]));
    }

    #[test]
    fn command_only_replaces_entrypoint_and_drops_cmd() {
        let argv = process_args(&s(&["sh", "-c", "true"]), &[], &image()).unwrap();
        assert_eq!(
            argv,
            s(&["sh", "-c", "true"]),
            "image CMD must not be appended"
        );
    }

    #[test]
    fn args_only_keep_entrypoint_and_replace_cmd() {
        let argv = process_args(&[], &s(&["--port", "9"]), &image()).unwrap();
        assert_eq!(argv, s(&["/entry", "--port", "9"]));
    }

    #[test]
    fn command_and_args_replace_both() {
        let argv = process_args(&s(&["sh", "-c"]), &s(&["echo hi"]), &image()).unwrap();
        assert_eq!(argv, s(&["sh", "-c", "echo hi"]));
    }

    #[test]
    fn nothing_to_run_is_invalid_argument_naming_spec_command() {
        let err = process_args(&[], &[], &ImageConfig::default()).unwrap_err();
        assert!(matches!(err, AgentError::InvalidArgument(_)));
        assert_eq!(
            err.to_string(),
            "spec.command: image has no entrypoint or cmd; give a command"
        );
        // CMD alone (no ENTRYPOINT) is enough, and args alone run as the command.
        let cmd_only = ImageConfig {
            cmd: s(&["sh"]),
            ..ImageConfig::default()
        };
        assert_eq!(process_args(&[], &[], &cmd_only).unwrap(), s(&["sh"]));
        assert_eq!(
            process_args(&[], &s(&["ls"]), &ImageConfig::default()).unwrap(),
            s(&["ls"])
        );
    }

    // --- env ----------------------------------------------------------------------

    #[test]
    fn env_is_path_then_image_then_spec_with_in_place_overrides() {
        let image_env = s(&["HOME=/root", "PATH=/opt/bin", "LANG=C", "EMPTY"]);
        let spec_env = vec![
            ("ZED".to_string(), "1".to_string()),
            ("LANG".to_string(), "de_DE".to_string()),
            ("ALPHA".to_string(), "a=b".to_string()),
        ];
        let env = process_env(&image_env, &spec_env);
        assert_eq!(
            env,
            s(&[
                "PATH=/opt/bin",
                "HOME=/root",
                "LANG=de_DE",
                "EMPTY=",
                "ZED=1",
                "ALPHA=a=b"
            ])
        );
        // Same input, same output: stable.
        assert_eq!(env, process_env(&image_env, &spec_env));
    }

    #[test]
    fn path_defaults_only_when_nobody_sets_it() {
        let env = process_env(&s(&["A=1"]), &[]);
        assert_eq!(env, vec![format!("PATH={DEFAULT_PATH}"), "A=1".into()]);
        let env = process_env(&[], &[("PATH".into(), "/x".into())]);
        assert_eq!(env, s(&["PATH=/x"]));
    }

    // --- image config ---------------------------------------------------------------

    #[test]
    fn image_config_reads_the_oci_fields() {
        let json = br#"{"architecture":"amd64","os":"linux",
            "config":{"Entrypoint":["/bin/app"],"Cmd":["-v"],"Env":["PATH=/bin","X=1"],
                      "WorkingDir":"/srv","User":"app:staff","ExposedPorts":{"80/tcp":{}}},
            "rootfs":{"type":"layers","diff_ids":[]}}"#;
        let c = ImageConfig::from_oci_config_json(json).unwrap();
        assert_eq!(c.entrypoint, s(&["/bin/app"]));
        assert_eq!(c.cmd, s(&["-v"]));
        assert_eq!(c.env, s(&["PATH=/bin", "X=1"]));
        assert_eq!(c.working_dir, "/srv");
        assert_eq!(c.user, "app:staff");
    }

    #[test]
    fn missing_or_null_image_fields_are_empty() {
        let c =
            ImageConfig::from_oci_config_json(br#"{"config":{"Cmd":null,"Env":["A=1"]}}"#).unwrap();
        assert_eq!(
            c,
            ImageConfig {
                env: s(&["A=1"]),
                ..ImageConfig::default()
            }
        );
        let c = ImageConfig::from_oci_config_json(br#"{"os":"linux"}"#).unwrap();
        assert_eq!(c, ImageConfig::default());
        let err = ImageConfig::from_oci_config_json(b"not json").unwrap_err();
        assert!(err.to_string().starts_with("image config: "), "{err}");
    }

    // --- user -------------------------------------------------------------------------

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
                          # comment\n\
                          \n\
                          app:x:1000:1001::/home/app:/bin/sh\n\
                          broken\n\
                          nobody:x:65534:65534:nobody:/:/sbin/nologin\n";
    const GROUP: &str = "root:x:0:\nstaff:x:50:app\napp:x:1001:\n";

    #[test]
    fn users_resolve_by_number_and_name() {
        let r = |u: &str| resolve_user(u, Some(PASSWD), Some(GROUP));
        assert_eq!(r("").unwrap(), (0, 0));
        assert_eq!(r("0").unwrap(), (0, 0));
        assert_eq!(r("1000").unwrap(), (1000, 1001), "primary gid from passwd");
        assert_eq!(
            r("4242").unwrap(),
            (4242, 0),
            "uid not in passwd gets gid 0"
        );
        assert_eq!(r("4242:7").unwrap(), (4242, 7));
        assert_eq!(r("app").unwrap(), (1000, 1001));
        assert_eq!(r("nobody").unwrap(), (65534, 65534));
        assert_eq!(r("app:staff").unwrap(), (1000, 50));
        assert_eq!(r("app:9").unwrap(), (1000, 9));
        assert_eq!(r("1000:staff").unwrap(), (1000, 50));
        // Numbers work without any database.
        assert_eq!(resolve_user("12:34", None, None).unwrap(), (12, 34));
    }

    #[test]
    fn unknown_names_are_invalid_argument_naming_the_user() {
        let err = resolve_user("bob", Some(PASSWD), Some(GROUP)).unwrap_err();
        assert!(matches!(err, AgentError::InvalidArgument(_)));
        assert_eq!(
            err.to_string(),
            "image config User: user \"bob\" not found in /etc/passwd"
        );
        let err = resolve_user("app:wheel", Some(PASSWD), Some(GROUP)).unwrap_err();
        assert!(err.to_string().contains("group \"wheel\""), "{err}");
        let err = resolve_user("app", None, None).unwrap_err();
        assert!(err.to_string().contains("user \"app\""), "{err}");
        for bad in [":", "app:", ":staff"] {
            let err = resolve_user(bad, Some(PASSWD), Some(GROUP)).unwrap_err();
            assert!(err.to_string().starts_with("image config User: "), "{err}");
        }
    }

    // --- the whole spec ----------------------------------------------------------------

    /// A valid spec (default namespace, pool `pool`, busybox) after `edit`.
    pub(crate) fn valid_spec(edit: impl FnOnce(&mut SandboxSpec)) -> ValidSpec {
        let mut spec = SandboxSpec {
            namespace: "default".into(),
            pool_ref: "pool".into(),
            image: "busybox".into(),
            ..SandboxSpec::default()
        };
        edit(&mut spec);
        spec.validate(&SpecLimits::default()).unwrap()
    }

    fn sandbox_id() -> SandboxId {
        SandboxId::parse("id", "0123456789abcdef0123456789abcdef").unwrap()
    }

    fn build(
        spec: &ValidSpec,
        image: &ImageConfig,
        edit: impl FnOnce(&mut SpecInput<'_>),
    ) -> Result<Value, AgentError> {
        let id = sandbox_id();
        let mut input = SpecInput {
            sandbox_id: &id,
            spec,
            image,
            runtime: Runtime::Runc,
            network: NetworkMode::Join("/proc/4242/ns/net".into()),
            cgroups_path: "/fast-sandbox/0123456789abcdef0123456789abcdef".into(),
            hostname: "sbx-0123".into(),
            user: (1000, 1001),
            mounts: vec![],
            read_only_rootfs: false,
            user_namespace: None,
            drop_capabilities: CapabilityDrop::default(),
        };
        edit(&mut input);
        build_spec(&input)
    }

    #[test]
    fn the_spec_has_the_process_we_asked_for() {
        let spec = valid_spec(|s| {
            s.args = vec!["--port".into(), "1".into()];
            s.envs = vec![EnvVar {
                name: "LANG".into(),
                value: "C".into(),
            }];
        });
        let doc = build(&spec, &image(), |_| {}).unwrap();
        assert_eq!(doc["ociVersion"], OCI_VERSION);
        let p = &doc["process"];
        assert_eq!(p["args"], json!(["/entry", "--port", "1"]));
        assert_eq!(
            p["env"],
            json!([format!("PATH={DEFAULT_PATH}"), "HOME=/root", "LANG=C"])
        );
        assert_eq!(p["cwd"], "/app", "image WorkingDir when the spec has none");
        assert_eq!(p["user"], json!({ "uid": 1000, "gid": 1001 }));
        assert_eq!(p["terminal"], false);
        assert_eq!(p["noNewPrivileges"], true);
        let shared = capabilities(
            &NetworkMode::Join("/proc/4242/ns/net".into()),
            &CapabilityDrop::default(),
        );
        assert_eq!(p["capabilities"]["bounding"], json!(shared));
        assert_eq!(p["capabilities"]["effective"], json!(shared));
        assert_eq!(p["capabilities"]["permitted"], json!(shared));
        assert!(p["capabilities"].get("inheritable").is_none());
        assert_eq!(
            p["rlimits"],
            json!([{ "type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024 }])
        );
        assert_eq!(doc["root"], json!({ "path": "rootfs", "readonly": false }));
        assert_eq!(doc["hostname"], "sbx-0123");
        assert_eq!(
            doc["annotations"][labels::LABEL_ID],
            "0123456789abcdef0123456789abcdef"
        );
    }

    #[test]
    fn cwd_prefers_spec_then_image_then_root() {
        let with_dir = valid_spec(|s| s.working_dir = "/work".into());
        let doc = build(&with_dir, &image(), |_| {}).unwrap();
        assert_eq!(doc["process"]["cwd"], "/work");
        let plain = valid_spec(|_| {});
        let bare = ImageConfig {
            cmd: s(&["sh"]),
            ..ImageConfig::default()
        };
        assert_eq!(build(&plain, &bare, |_| {}).unwrap()["process"]["cwd"], "/");
        let relative = ImageConfig {
            working_dir: "app".into(),
            ..bare
        };
        let err = build(&plain, &relative, |_| {}).unwrap_err();
        assert!(
            err.to_string().starts_with("image config WorkingDir: "),
            "{err}"
        );
    }

    #[test]
    fn network_namespace_follows_the_mode() {
        let spec = valid_spec(|_| {});
        let doc = build(&spec, &image(), |_| {}).unwrap();
        let ns = doc["linux"]["namespaces"].as_array().unwrap();
        let types: Vec<&str> = ns.iter().map(|n| n["type"].as_str().unwrap()).collect();
        assert_eq!(types, ["pid", "ipc", "uts", "mount", "network"]);
        assert_eq!(
            ns[4],
            json!({ "type": "network", "path": "/proc/4242/ns/net" })
        );
        for n in &ns[..4] {
            assert!(n.get("path").is_none(), "{n}: only the network is joined");
        }

        let doc = build(&spec, &image(), |i| i.network = NetworkMode::Isolated).unwrap();
        assert_eq!(doc["linux"]["namespaces"][4], json!({ "type": "network" }));
    }

    #[test]
    fn net_raw_is_dropped_only_in_a_shared_network_namespace() {
        let spec = valid_spec(|_| {});
        let caps = |doc: &Value| doc["process"]["capabilities"]["bounding"].clone();
        let shared = build(&spec, &image(), |_| {}).unwrap();
        let mut expected: Vec<&str> = DEFAULT_CAPABILITIES.to_vec();
        expected.retain(|c| *c != "CAP_NET_RAW");
        assert_eq!(caps(&shared), json!(expected));
        let own = build(&spec, &image(), |i| i.network = NetworkMode::Isolated).unwrap();
        assert_eq!(caps(&own), json!(DEFAULT_CAPABILITIES));
    }

    #[test]
    fn a_pool_drop_list_only_removes_and_tightens_seccomp() {
        let spec = valid_spec(|_| {});
        let drop = CapabilityDrop::parse(["chown", "SYS_CHROOT", "SYS_ADMIN"]).unwrap();
        let doc = build(&spec, &image(), |i| {
            i.network = NetworkMode::Isolated;
            i.drop_capabilities = drop.clone();
        })
        .unwrap();
        let mut expected: Vec<&str> = DEFAULT_CAPABILITIES.to_vec();
        expected.retain(|c| !["CAP_CHOWN", "CAP_SYS_CHROOT"].contains(c));
        for set in ["bounding", "effective", "permitted"] {
            assert_eq!(
                doc["process"]["capabilities"][set],
                json!(expected),
                "{set}"
            );
        }
        // The seccomp profile follows the set: chroot is allowed only with its capability.
        assert_eq!(
            crate::seccomp::tests::allowance(&doc["linux"]["seccomp"], "chroot"),
            None
        );
        // In a shared network namespace NET_RAW goes too; ALL leaves nothing.
        let shared = build(&spec, &image(), |i| i.drop_capabilities = drop.clone()).unwrap();
        expected.retain(|c| *c != "CAP_NET_RAW");
        assert_eq!(
            shared["process"]["capabilities"]["bounding"],
            json!(expected)
        );
        let all = CapabilityDrop::parse(["ALL"]).unwrap();
        let none = build(&spec, &image(), |i| i.drop_capabilities = all.clone()).unwrap();
        for set in ["bounding", "effective", "permitted"] {
            assert_eq!(none["process"]["capabilities"][set], json!([]), "{set}");
        }
    }

    #[test]
    fn gvisor_bounds_processes_with_rlimit_nproc_at_the_pids_limit() {
        let nproc = |doc: &Value| {
            doc["process"]["rlimits"]
                .as_array()
                .unwrap()
                .iter()
                .find(|r| r["type"] == "RLIMIT_NPROC")
                .cloned()
        };
        let plain = valid_spec(|_| {});
        let limited = valid_spec(|s| s.resources.pids = 64);
        let gvisor =
            |spec: &ValidSpec| build(spec, &image(), |i| i.runtime = Runtime::Gvisor).unwrap();
        let host_pids = |doc: &Value| doc["linux"]["resources"]["pids"]["limit"].clone();
        let plain_doc = gvisor(&plain);
        assert_eq!(
            nproc(&plain_doc),
            Some(
                json!({ "type": "RLIMIT_NPROC", "hard": GVISOR_DEFAULT_NPROC, "soft": GVISOR_DEFAULT_NPROC })
            )
        );
        assert_eq!(host_pids(&plain_doc), json!(DEFAULT_PIDS_LIMIT));
        let limited_doc = gvisor(&limited);
        assert_eq!(
            nproc(&limited_doc),
            Some(json!({ "type": "RLIMIT_NPROC", "hard": 64, "soft": 64 }))
        );
        assert_eq!(
            host_pids(&limited_doc),
            json!(DEFAULT_PIDS_LIMIT),
            "a small limit still lets the Sentry start"
        );
        let large = valid_spec(|s| s.resources.pids = 1000);
        assert_eq!(host_pids(&gvisor(&large)), json!(16_000));
        for runtime in [Runtime::Runc, Runtime::Crun] {
            let doc = build(&limited, &image(), |i| i.runtime = runtime).unwrap();
            assert_eq!(nproc(&doc), None, "{runtime:?}: host-wide per uid there");
            assert_eq!(host_pids(&doc), json!(64), "{runtime:?}");
        }
    }

    #[test]
    fn resources_are_set_only_when_asked_with_a_default_pids_limit() {
        let spec = valid_spec(|_| {});
        let doc = build(&spec, &image(), |_| {}).unwrap();
        let r = &doc["linux"]["resources"];
        assert!(r.get("cpu").is_none());
        assert!(r.get("memory").is_none());
        assert_eq!(r["pids"]["limit"], DEFAULT_PIDS_LIMIT);
        assert_eq!(r["devices"], json!([{ "allow": false, "access": "rwm" }]));

        let spec = valid_spec(|s| {
            s.resources = ResourcesSpec {
                cpu: "1500m".into(),
                memory: "256Mi".into(),
                pids: 64,
            }
        });
        let doc = build(&spec, &image(), |_| {}).unwrap();
        let r = &doc["linux"]["resources"];
        assert_eq!(r["cpu"], json!({ "quota": 150_000, "period": 100_000 }));
        assert_eq!(r["memory"], json!({ "limit": 256 << 20 }));
        assert_eq!(r["pids"]["limit"], 64);
        assert_eq!(
            doc["linux"]["cgroupsPath"],
            "/fast-sandbox/0123456789abcdef0123456789abcdef"
        );
    }

    #[test]
    fn cpu_quota_is_rounded_up_to_the_kernel_minimum_and_checked() {
        assert_eq!(cpu_quota(MilliCpu(500)).unwrap(), 50_000);
        assert_eq!(cpu_quota(MilliCpu(1)).unwrap(), MIN_CPU_QUOTA_US);
        assert_eq!(cpu_quota(MilliCpu(4000)).unwrap(), 400_000);
        let err = cpu_quota(MilliCpu(u64::MAX)).unwrap_err();
        assert!(err.to_string().starts_with("spec.resources.cpu: "), "{err}");
    }

    #[test]
    fn mounts_are_the_defaults_plus_injected_files_read_only() {
        let spec = valid_spec(|_| {});
        let injected = InjectedMount {
            source: "/opt/fsb/bin/fsb-init".into(),
            destination: "/.fsb/init".into(),
        };
        let doc = build(&spec, &image(), |i| {
            i.mounts = vec![injected];
            i.read_only_rootfs = true;
        })
        .unwrap();
        assert_eq!(doc["root"]["readonly"], true);
        let mounts = doc["mounts"].as_array().unwrap();
        let dests: Vec<&str> = mounts
            .iter()
            .map(|m| m["destination"].as_str().unwrap())
            .collect();
        assert_eq!(
            dests,
            [
                "/proc",
                "/dev",
                "/dev/pts",
                "/dev/shm",
                "/dev/mqueue",
                "/sys",
                "/sys/fs/cgroup",
                "/.fsb/init"
            ]
        );
        let opts = |i: usize| mounts[i]["options"].as_array().unwrap().clone();
        assert!(opts(5).contains(&json!("ro")), "/sys is read-only");
        assert!(
            opts(6).contains(&json!("ro")),
            "/sys/fs/cgroup is read-only"
        );
        assert_eq!(
            mounts[7],
            json!({
                "destination": "/.fsb/init",
                "type": "bind",
                "source": "/opt/fsb/bin/fsb-init",
                "options": ["bind", "ro", "nosuid", "nodev"],
            })
        );
    }

    #[test]
    fn hardening_defaults_are_present() {
        let spec = valid_spec(|_| {});
        let doc = build(&spec, &image(), |_| {}).unwrap();
        assert_eq!(doc["linux"]["maskedPaths"], json!(MASKED_PATHS));
        assert_eq!(doc["linux"]["readonlyPaths"], json!(READONLY_PATHS));
        let seccomp = &doc["linux"]["seccomp"];
        assert_eq!(seccomp["defaultAction"], "SCMP_ACT_ERRNO");
        assert_eq!(
            crate::seccomp::tests::allowance(seccomp, "chroot"),
            Some(true),
            "CAP_SYS_CHROOT is in the default set"
        );
        assert_eq!(crate::seccomp::tests::allowance(seccomp, "mount"), None);
    }

    #[test]
    fn runtimes_differ_only_in_seccomp_and_nproc() {
        let spec = valid_spec(|_| {});
        let runc = build(&spec, &image(), |_| {}).unwrap();
        let crun = build(&spec, &image(), |i| i.runtime = Runtime::Crun).unwrap();
        let mut gvisor = build(&spec, &image(), |i| i.runtime = Runtime::Gvisor).unwrap();
        assert_eq!(runc, crun);
        assert!(gvisor["linux"].get("seccomp").is_none(), "runsc ignores it");
        gvisor["linux"]["seccomp"] = runc["linux"]["seccomp"].clone();
        // ... and RLIMIT_NPROC, gVisor's process bound.
        gvisor["process"]["rlimits"] = runc["process"]["rlimits"].clone();
        gvisor["linux"]["resources"] = runc["linux"]["resources"].clone();
        assert_eq!(runc, gvisor);
    }

    #[test]
    fn a_user_namespace_maps_root_and_binds_the_hosts_sys_in_a_joined_network_namespace() {
        let spec = valid_spec(|s| s.user_namespace = true);
        let plain = build(&spec, &image(), |_| {}).unwrap();
        assert!(plain["linux"].get("uidMappings").is_none());
        let m = crate::userns::MAPPING;
        let doc = build(&spec, &image(), |i| i.user_namespace = Some(m)).unwrap();
        let namespaces = doc["linux"]["namespaces"].as_array().unwrap();
        assert!(
            namespaces.contains(&json!({ "type": "user" })),
            "{namespaces:?}"
        );
        let map = json!([{ "containerID": 0, "hostID": 1u32 << 30, "size": 65536 }]);
        assert_eq!(doc["linux"]["uidMappings"], map);
        assert_eq!(doc["linux"]["gidMappings"], map);
        let sys = |d: &Value| {
            d["mounts"]
                .as_array()
                .unwrap()
                .iter()
                .find(|m| m["destination"] == "/sys")
                .cloned()
                .unwrap()
        };
        assert_eq!(sys(&doc)["type"], "bind");
        assert_eq!(
            sys(&doc)["options"],
            json!(["rbind", "nosuid", "noexec", "nodev", "ro"])
        );
        // A namespace of its own (created inside the user namespace) mounts sysfs.
        let isolated = build(&spec, &image(), |i| {
            i.user_namespace = Some(m);
            i.network = NetworkMode::Isolated;
        })
        .unwrap();
        assert_eq!(sys(&isolated)["type"], "sysfs");
        // Everything else is the spec without it.
        let mut stripped = doc.clone();
        stripped["linux"]
            .as_object_mut()
            .unwrap()
            .remove("uidMappings");
        stripped["linux"]
            .as_object_mut()
            .unwrap()
            .remove("gidMappings");
        stripped["linux"]["namespaces"]
            .as_array_mut()
            .unwrap()
            .retain(|n| n["type"] != "user");
        stripped["mounts"] = plain["mounts"].clone();
        assert_eq!(stripped, plain);
        // gVisor would ignore the mappings: refused.
        let err = build(&spec, &image(), |i| {
            i.user_namespace = Some(m);
            i.runtime = Runtime::Gvisor;
        })
        .unwrap_err();
        assert!(matches!(err, AgentError::FailedPrecondition(_)), "{err:?}");
        assert!(err.to_string().contains("user_namespace"), "{err}");
    }

    #[test]
    fn bad_inputs_name_their_field() {
        let spec = valid_spec(|_| {});
        let err = build(&spec, &ImageConfig::default(), |_| {}).unwrap_err();
        assert!(err.to_string().starts_with("spec.command: "), "{err}");
        let err = build(&spec, &image(), |i| i.hostname = "h".repeat(65)).unwrap_err();
        assert!(err.to_string().starts_with("hostname: "), "{err}");
        let doc = build(&spec, &image(), |i| i.hostname = String::new()).unwrap();
        assert!(doc.get("hostname").is_none());
    }

    #[test]
    fn the_document_is_valid_json_bytes() {
        let spec = valid_spec(|_| {});
        let doc = build(&spec, &image(), |_| {}).unwrap();
        let bytes = serde_json::to_vec(&doc).unwrap();
        let back: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(back, doc);
    }
}
