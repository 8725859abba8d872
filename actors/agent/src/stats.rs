//! Resource usage of a sandbox, read from its cgroup (`/fast-sandbox/<id>`, the
//! `cgroupsPath` every spec gets). cgroup v1 controllers first (this hybrid machine),
//! then the unified v2 hierarchy. Missing files read as 0: a sandbox that exited has
//! no cgroup left.

use std::path::{Path, PathBuf};

use fsb_core::SandboxId;

const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// Usage counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// CPU time consumed.
    pub cpu_usage_ns: u64,
    /// Memory in use.
    pub memory_bytes: u64,
    /// Processes.
    pub pids: u32,
}

/// Read the counters of sandbox `id`.
pub async fn read(id: &SandboxId) -> Usage {
    read_under(Path::new(CGROUP_ROOT), id).await
}

async fn read_under(root: &Path, id: &SandboxId) -> Usage {
    let rel = PathBuf::from("fast-sandbox").join(id.as_str());
    let v1 = |ctrl: &str, file: &str| root.join(ctrl).join(&rel).join(file);
    let v2 = |file: &str| root.join("unified").join(&rel).join(file);
    let cpu = first_number(&[
        v1("cpuacct", "cpuacct.usage"),
        v1("cpu,cpuacct", "cpuacct.usage"),
    ])
    .await;
    let cpu = match cpu {
        Some(ns) => ns,
        // v2 reports microseconds in cpu.stat's usage_usec.
        None => read_key(&v2("cpu.stat"), "usage_usec")
            .await
            .unwrap_or(0)
            .saturating_mul(1000),
    };
    let memory = first_number(&[v1("memory", "memory.usage_in_bytes"), v2("memory.current")])
        .await
        .unwrap_or(0);
    let pids = first_number(&[v1("pids", "pids.current"), v2("pids.current")])
        .await
        .unwrap_or(0);
    Usage {
        cpu_usage_ns: cpu,
        memory_bytes: memory,
        pids: u32::try_from(pids).unwrap_or(u32::MAX),
    }
}

async fn first_number(paths: &[PathBuf]) -> Option<u64> {
    for p in paths {
        if let Ok(s) = tokio::fs::read_to_string(p).await
            && let Ok(n) = s.trim().parse()
        {
            return Some(n);
        }
    }
    None
}

async fn read_key(path: &Path, key: &str) -> Option<u64> {
    let s = tokio::fs::read_to_string(path).await.ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(key)?.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reads_v1_then_v2_and_missing_is_zero() {
        let root = tempfile::tempdir().unwrap();
        let id = SandboxId::generate();
        assert_eq!(read_under(root.path(), &id).await, Usage::default());
        let dir = |c: &str| root.path().join(c).join("fast-sandbox").join(id.as_str());
        for (ctrl, file, value) in [
            ("cpuacct", "cpuacct.usage", "1500\n"),
            ("memory", "memory.usage_in_bytes", "4096\n"),
            ("pids", "pids.current", "3\n"),
        ] {
            std::fs::create_dir_all(dir(ctrl)).unwrap();
            std::fs::write(dir(ctrl).join(file), value).unwrap();
        }
        assert_eq!(
            read_under(root.path(), &id).await,
            Usage {
                cpu_usage_ns: 1500,
                memory_bytes: 4096,
                pids: 3
            }
        );

        let v2 = tempfile::tempdir().unwrap();
        let d = v2
            .path()
            .join("unified")
            .join("fast-sandbox")
            .join(id.as_str());
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("cpu.stat"), "usage_usec 7\nuser_usec 5\n").unwrap();
        std::fs::write(d.join("memory.current"), "100\n").unwrap();
        assert_eq!(
            read_under(v2.path(), &id).await,
            Usage {
                cpu_usage_ns: 7000,
                memory_bytes: 100,
                pids: 0
            }
        );
    }
}
