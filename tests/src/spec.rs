//! A minimal but valid OCI runtime spec for tests that drive containerd without the
//! agent's own spec builder (the smoke test, runtime-level tests).

use fsb_agent::oci::{DEFAULT_CAPABILITIES, MASKED_PATHS, READONLY_PATHS};
use serde_json::{Value, json};

/// A minimal valid OCI runtime spec: new pid/ipc/uts/mount namespaces, the host
/// network (no network namespace yet), the usual /proc, /dev, /sys mounts.
pub fn minimal_oci_spec(
    id: &str,
    args: &[&str],
    env: &[String],
    cwd: &str,
    namespace: &str,
) -> Value {
    // The capability set containerd and Docker give by default, as the agent uses it.
    let caps = DEFAULT_CAPABILITIES;
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": { "uid": 0, "gid": 0 },
            "args": args,
            "env": env,
            "cwd": cwd,
            "capabilities": {
                "bounding": caps, "effective": caps, "permitted": caps
            },
            "rlimits": [{ "type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024 }],
            "noNewPrivileges": true
        },
        // Relative to the bundle: the shim mounts the task's rootfs mounts there.
        "root": { "path": "rootfs", "readonly": false },
        "hostname": &id[..12],
        "mounts": [
            { "destination": "/proc", "type": "proc", "source": "proc",
              "options": ["nosuid", "noexec", "nodev"] },
            { "destination": "/dev", "type": "tmpfs", "source": "tmpfs",
              "options": ["nosuid", "strictatime", "mode=755", "size=65536k"] },
            { "destination": "/dev/pts", "type": "devpts", "source": "devpts",
              "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"] },
            { "destination": "/dev/shm", "type": "tmpfs", "source": "shm",
              "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"] },
            { "destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
              "options": ["nosuid", "noexec", "nodev"] },
            { "destination": "/sys", "type": "sysfs", "source": "sysfs",
              "options": ["nosuid", "noexec", "nodev", "ro"] }
        ],
        "linux": {
            // No "network" entry: the container shares the host's network for now.
            "namespaces": [
                { "type": "pid" }, { "type": "ipc" }, { "type": "uts" }, { "type": "mount" }
            ],
            "cgroupsPath": format!("/{namespace}/{id}"),
            "resources": { "devices": [{ "allow": false, "access": "rwm" }] },
            "maskedPaths": MASKED_PATHS,
            "readonlyPaths": READONLY_PATHS
        }
    })
}
