//! The default seccomp profile for runc and crun sandboxes: the allow-list that
//! containerd and Docker ship (written out here from reading their reference, as one
//! table), rendered as the OCI `linux.seccomp` JSON object.
//!
//! Shape of the profile:
//! - default action `SCMP_ACT_ERRNO` with `defaultErrnoRet` 1 (EPERM): anything not
//!   listed fails with "Operation not permitted";
//! - architectures: the host's family (x86_64 + x86 + x32, or aarch64 + arm), so
//!   32-bit binaries get the same filter;
//! - [`ALLOWED`]: syscalls allowed unconditionally;
//! - `personality` allowed only for the five harmless personas;
//! - arch-specific extras ([`ARCH_EXTRAS`]);
//! - [`CAPABILITY_GATED`]: syscalls allowed only when the capability that governs them
//!   is in the process's bounding set;
//! - without `CAP_SYS_ADMIN`: `clone` allowed only when it creates no namespace, and
//!   `clone3` answering ENOSYS (its flags live in memory seccomp cannot inspect; ENOSYS
//!   makes libc fall back to `clone`, EPERM would not).
//!
//! One deliberate difference from containerd: containerd allows `ptrace` on kernels
//! 4.8 and newer. We allow it only with `CAP_SYS_PTRACE` (not in our default set). Sandboxes
//! run untrusted code, and a profile that depends on probing the host kernel is not a
//! pure function of its input. The cost: `strace`/`gdb` inside a sandbox fail with EPERM.

use serde_json::{Value, json};

/// errno for everything the profile does not allow: EPERM.
pub const DEFAULT_ERRNO: u32 = 1;
/// errno for `clone3` without `CAP_SYS_ADMIN`: ENOSYS, so libc falls back to `clone`.
const ENOSYS: u32 = 38;
/// Namespace-creating `clone` flags: NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER |
/// NEWPID | NEWNET.
const CLONE_NAMESPACE_FLAGS: u64 =
    0x0002_0000 | 0x0200_0000 | 0x0400_0000 | 0x0800_0000 | 0x1000_0000 | 0x2000_0000 | 0x4000_0000;
/// `personality(2)` arguments allowed: PER_LINUX, PER_LINUX32, UNAME26,
/// UNAME26|PER_LINUX32, and 0xffffffff (query the current persona).
const PERSONALITIES: [u64; 5] = [0x0, 0x0008, 0x2_0000, 0x2_0008, 0xffff_ffff];

/// Syscalls every sandbox may make, whatever its capabilities.
#[rustfmt::skip]
pub const ALLOWED: &[&str] = &[
    "accept", "accept4", "access", "adjtimex", "alarm", "bind", "brk", "capget", "capset",
    "chdir", "chmod", "chown", "chown32", "clock_adjtime", "clock_adjtime64",
    "clock_getres", "clock_getres_time64", "clock_gettime", "clock_gettime64",
    "clock_nanosleep", "clock_nanosleep_time64", "close", "close_range", "connect",
    "copy_file_range", "creat", "dup", "dup2", "dup3", "epoll_create", "epoll_create1",
    "epoll_ctl", "epoll_ctl_old", "epoll_pwait", "epoll_pwait2", "epoll_wait",
    "epoll_wait_old", "eventfd", "eventfd2", "execve", "execveat", "exit", "exit_group",
    "faccessat", "faccessat2", "fadvise64", "fadvise64_64", "fallocate", "fanotify_mark",
    "fchdir", "fchmod", "fchmodat", "fchown", "fchown32", "fchownat", "fcntl", "fcntl64",
    "fdatasync", "fgetxattr", "flistxattr", "flock", "fork", "fremovexattr", "fsetxattr",
    "fstat", "fstat64", "fstatat64", "fstatfs", "fstatfs64", "fsync", "ftruncate",
    "ftruncate64", "futex", "futex_time64", "futex_waitv", "futimesat", "getcpu", "getcwd",
    "getdents", "getdents64", "getegid", "getegid32", "geteuid", "geteuid32", "getgid",
    "getgid32", "getgroups", "getgroups32", "getitimer", "getpeername", "getpgid",
    "getpgrp", "getpid", "getppid", "getpriority", "getrandom", "getresgid", "getresgid32",
    "getresuid", "getresuid32", "getrlimit", "get_robust_list", "getrusage", "getsid",
    "getsockname", "getsockopt", "get_thread_area", "gettid", "gettimeofday", "getuid",
    "getuid32", "getxattr", "inotify_add_watch", "inotify_init", "inotify_init1",
    "inotify_rm_watch", "io_cancel", "ioctl", "io_destroy", "io_getevents",
    "io_pgetevents", "io_pgetevents_time64", "ioprio_get", "ioprio_set", "io_setup",
    "io_submit", "io_uring_enter", "io_uring_register", "io_uring_setup", "ipc", "kill",
    "landlock_add_rule", "landlock_create_ruleset", "landlock_restrict_self", "lchown",
    "lchown32", "lgetxattr", "link", "linkat", "listen", "listxattr", "llistxattr",
    "_llseek", "lremovexattr", "lseek", "lsetxattr", "lstat", "lstat64", "madvise",
    "membarrier", "memfd_create", "memfd_secret", "mincore", "mkdir", "mkdirat", "mknod",
    "mknodat", "mlock", "mlock2", "mlockall", "mmap", "mmap2", "mprotect", "mq_getsetattr",
    "mq_notify", "mq_open", "mq_timedreceive", "mq_timedreceive_time64", "mq_timedsend",
    "mq_timedsend_time64", "mq_unlink", "mremap", "msgctl", "msgget", "msgrcv", "msgsnd",
    "msync", "munlock", "munlockall", "munmap", "nanosleep", "newfstatat", "_newselect",
    "open", "openat", "openat2", "pause", "pidfd_open", "pidfd_send_signal", "pipe",
    "pipe2", "poll", "ppoll", "ppoll_time64", "prctl", "pread64", "preadv", "preadv2",
    "prlimit64", "process_mrelease", "pselect6", "pselect6_time64", "pwrite64", "pwritev",
    "pwritev2", "read", "readahead", "readlink", "readlinkat", "readv", "recv", "recvfrom",
    "recvmmsg", "recvmmsg_time64", "recvmsg", "remap_file_pages", "removexattr", "rename",
    "renameat", "renameat2", "restart_syscall", "rmdir", "rseq", "rt_sigaction",
    "rt_sigpending", "rt_sigprocmask", "rt_sigqueueinfo", "rt_sigreturn", "rt_sigsuspend",
    "rt_sigtimedwait", "rt_sigtimedwait_time64", "rt_tgsigqueueinfo", "sched_getaffinity",
    "sched_getattr", "sched_getparam", "sched_get_priority_max", "sched_get_priority_min",
    "sched_getscheduler", "sched_rr_get_interval", "sched_rr_get_interval_time64",
    "sched_setaffinity", "sched_setattr", "sched_setparam", "sched_setscheduler",
    "sched_yield", "seccomp", "select", "semctl", "semget", "semop", "semtimedop",
    "semtimedop_time64", "send", "sendfile", "sendfile64", "sendmmsg", "sendmsg", "sendto",
    "setfsgid", "setfsgid32", "setfsuid", "setfsuid32", "setgid", "setgid32", "setgroups",
    "setgroups32", "setitimer", "setpgid", "setpriority", "setregid", "setregid32",
    "setresgid", "setresgid32", "setresuid", "setresuid32", "setreuid", "setreuid32",
    "setrlimit", "set_robust_list", "setsid", "setsockopt", "set_thread_area",
    "set_tid_address", "setuid", "setuid32", "setxattr", "shmat", "shmctl", "shmdt",
    "shmget", "shutdown", "sigaltstack", "signalfd", "signalfd4", "sigprocmask",
    "sigreturn", "socket", "socketcall", "socketpair", "splice", "stat", "stat64", "statfs",
    "statfs64", "statx", "symlink", "symlinkat", "sync", "sync_file_range", "syncfs",
    "sysinfo", "tee", "tgkill", "time", "timer_create", "timer_delete", "timer_getoverrun",
    "timer_gettime", "timer_gettime64", "timer_settime", "timer_settime64",
    "timerfd_create", "timerfd_gettime", "timerfd_gettime64", "timerfd_settime",
    "timerfd_settime64", "times", "tkill", "truncate", "truncate64", "ugetrlimit", "umask",
    "uname", "unlink", "unlinkat", "utime", "utimensat", "utimensat_time64", "utimes",
    "vfork", "vmsplice", "wait4", "waitid", "waitpid", "write", "writev",
];

/// Syscalls allowed only when the capability is in the bounding set.
#[rustfmt::skip]
pub const CAPABILITY_GATED: &[(&str, &[&str])] = &[
    ("CAP_DAC_READ_SEARCH", &["open_by_handle_at"]),
    (
        "CAP_SYS_ADMIN",
        &[
            "bpf", "clone", "clone3", "fanotify_init", "fsconfig", "fsmount", "fsopen",
            "fspick", "lookup_dcookie", "mount", "mount_setattr", "move_mount",
            "name_to_handle_at", "open_tree", "perf_event_open", "quotactl", "quotactl_fd",
            "setdomainname", "sethostname", "setns", "syslog", "umount", "umount2", "unshare",
        ],
    ),
    ("CAP_SYS_BOOT", &["reboot"]),
    ("CAP_SYS_CHROOT", &["chroot"]),
    ("CAP_SYS_MODULE", &["delete_module", "init_module", "finit_module"]),
    ("CAP_SYS_PACCT", &["acct"]),
    (
        "CAP_SYS_PTRACE",
        &[
            "kcmp", "pidfd_getfd", "process_madvise", "process_vm_readv", "process_vm_writev",
            "ptrace",
        ],
    ),
    ("CAP_SYS_RAWIO", &["iopl", "ioperm"]),
    ("CAP_SYS_TIME", &["settimeofday", "stime", "clock_settime", "clock_settime64"]),
    ("CAP_SYS_TTY_CONFIG", &["vhangup"]),
    ("CAP_SYSLOG", &["syslog"]),
    ("CAP_BPF", &["bpf"]),
    ("CAP_PERFMON", &["perf_event_open"]),
];

/// A CPU family, which decides the seccomp architectures and a few extra syscalls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeccompArch {
    /// x86_64, also filtering its x86 and x32 ABIs.
    X86_64,
    /// aarch64, also filtering 32-bit arm.
    Aarch64,
    /// Anything else: no architecture list (libseccomp uses the native one) and no extras.
    Other,
}

/// Arch-specific syscalls allowed unconditionally.
#[rustfmt::skip]
pub const ARCH_EXTRAS: &[(SeccompArch, &[&str])] = &[
    (SeccompArch::X86_64, &["arch_prctl", "modify_ldt"]),
    (
        SeccompArch::Aarch64,
        &[
            "arm_fadvise64_64", "arm_sync_file_range", "sync_file_range2", "breakpoint",
            "cacheflush", "set_tls",
        ],
    ),
];

impl SeccompArch {
    /// The family this agent was built for.
    pub fn host() -> Self {
        if cfg!(target_arch = "x86_64") {
            Self::X86_64
        } else if cfg!(target_arch = "aarch64") {
            Self::Aarch64
        } else {
            Self::Other
        }
    }

    /// libseccomp architecture names filtered for this family.
    pub fn scmp_architectures(self) -> &'static [&'static str] {
        match self {
            Self::X86_64 => &["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
            Self::Aarch64 => &["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"],
            Self::Other => &[],
        }
    }
}

/// The default profile for this host's architecture and a process whose bounding set
/// is `capabilities` (names like `CAP_SYS_CHROOT`), as the `linux.seccomp` object.
pub fn default_profile(capabilities: &[&str]) -> Value {
    profile_for(SeccompArch::host(), capabilities)
}

/// The default profile for `arch` and bounding set `capabilities`.
pub fn profile_for(arch: SeccompArch, capabilities: &[&str]) -> Value {
    let allow = |names: &[&str]| json!({ "names": names, "action": "SCMP_ACT_ALLOW" });
    let mut syscalls = vec![allow(ALLOWED)];
    for persona in PERSONALITIES {
        syscalls.push(json!({
            "names": ["personality"],
            "action": "SCMP_ACT_ALLOW",
            "args": [{ "index": 0, "value": persona, "valueTwo": 0, "op": "SCMP_CMP_EQ" }],
        }));
    }
    for (a, names) in ARCH_EXTRAS {
        if *a == arch {
            syscalls.push(allow(names));
        }
    }
    for (cap, names) in CAPABILITY_GATED {
        if capabilities.contains(cap) {
            syscalls.push(allow(names));
        }
    }
    if !capabilities.contains(&"CAP_SYS_ADMIN") {
        syscalls.push(json!({
            "names": ["clone"],
            "action": "SCMP_ACT_ALLOW",
            // Allowed when (flags & CLONE_NAMESPACE_FLAGS) == 0: no new namespaces.
            "args": [{
                "index": 0,
                "value": CLONE_NAMESPACE_FLAGS,
                "valueTwo": 0,
                "op": "SCMP_CMP_MASKED_EQ",
            }],
        }));
        syscalls.push(json!({
            "names": ["clone3"],
            "action": "SCMP_ACT_ERRNO",
            "errnoRet": ENOSYS,
        }));
    }
    json!({
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": DEFAULT_ERRNO,
        "architectures": arch.scmp_architectures(),
        "syscalls": syscalls,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// How `profile` treats `syscall`: `Some(true)` allowed without conditions,
    /// `Some(false)` allowed only with argument conditions, `None` not allowed.
    pub(crate) fn allowance(profile: &Value, syscall: &str) -> Option<bool> {
        let mut found = None;
        for rule in profile["syscalls"].as_array().unwrap() {
            let named = rule["names"]
                .as_array()
                .unwrap()
                .iter()
                .any(|n| n == syscall);
            if !named || rule["action"] != "SCMP_ACT_ALLOW" {
                continue;
            }
            let unconditional = rule["args"].as_array().is_none_or(|a| a.is_empty());
            found = Some(found.unwrap_or(false) || unconditional);
        }
        found
    }

    const DEFAULT_CAPS: &[&str] = &["CAP_CHOWN", "CAP_KILL", "CAP_SYS_CHROOT", "CAP_SETUID"];

    #[test]
    fn dangerous_syscalls_are_not_allowed() {
        for arch in [SeccompArch::X86_64, SeccompArch::Aarch64] {
            let p = profile_for(arch, DEFAULT_CAPS);
            for sc in [
                "mount",
                "umount2",
                "kexec_load",
                "init_module",
                "finit_module",
                "ptrace",
                "bpf",
                "unshare",
                "setns",
                "reboot",
                "open_by_handle_at",
                "keyctl",
                "add_key",
                "perf_event_open",
                "process_vm_readv",
                "userfaultfd",
            ] {
                assert_eq!(allowance(&p, sc), None, "{sc} must be denied on {arch:?}");
            }
        }
    }

    #[test]
    fn everyday_syscalls_are_allowed() {
        let p = profile_for(SeccompArch::X86_64, DEFAULT_CAPS);
        for sc in [
            "read",
            "write",
            "execve",
            "openat",
            "mmap",
            "exit_group",
            "futex",
        ] {
            assert_eq!(allowance(&p, sc), Some(true), "{sc}");
        }
        // clone is allowed, but only without namespace flags (no CAP_SYS_ADMIN).
        assert_eq!(allowance(&p, "clone"), Some(false));
        let clone = p["syscalls"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["names"][0] == "clone")
            .unwrap();
        assert_eq!(clone["args"][0]["value"], 0x7E02_0000_u64);
        assert_eq!(clone["args"][0]["op"], "SCMP_CMP_MASKED_EQ");
        // clone3 answers ENOSYS so libc falls back to clone.
        assert!(
            p["syscalls"]
                .as_array()
                .unwrap()
                .iter()
                .any(|r| r["names"][0] == "clone3"
                    && r["action"] == "SCMP_ACT_ERRNO"
                    && r["errnoRet"] == 38)
        );
        // Our default set has CAP_SYS_CHROOT, so chroot is allowed.
        assert_eq!(allowance(&p, "chroot"), Some(true));
        assert_eq!(allowance(&p, "arch_prctl"), Some(true));
        assert_eq!(allowance(&p, "personality"), Some(false));
    }

    #[test]
    fn header_and_architectures() {
        let p = profile_for(SeccompArch::X86_64, DEFAULT_CAPS);
        assert_eq!(p["defaultAction"], "SCMP_ACT_ERRNO");
        assert_eq!(p["defaultErrnoRet"], 1);
        assert_eq!(
            p["architectures"],
            json!(["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"])
        );
        let p = profile_for(SeccompArch::Aarch64, DEFAULT_CAPS);
        assert_eq!(
            p["architectures"],
            json!(["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"])
        );
        assert_eq!(allowance(&p, "set_tls"), Some(true));
        assert_eq!(allowance(&p, "arch_prctl"), None);
    }

    #[test]
    fn capabilities_open_their_syscalls() {
        let p = profile_for(SeccompArch::X86_64, &["CAP_SYS_ADMIN", "CAP_SYS_PTRACE"]);
        assert_eq!(allowance(&p, "mount"), Some(true));
        assert_eq!(allowance(&p, "clone"), Some(true));
        assert_eq!(allowance(&p, "ptrace"), Some(true));
        assert!(
            !p["syscalls"]
                .as_array()
                .unwrap()
                .iter()
                .any(|r| r["action"] == "SCMP_ACT_ERRNO"),
            "with CAP_SYS_ADMIN clone3 is allowed, not ENOSYS"
        );
    }

    #[test]
    fn the_table_has_no_duplicates() {
        let mut names: Vec<&str> = ALLOWED.to_vec();
        names.sort_unstable();
        let len = names.len();
        names.dedup();
        assert_eq!(names.len(), len);
        for (_, gated) in CAPABILITY_GATED {
            for g in *gated {
                assert!(!ALLOWED.contains(g), "{g} is both gated and always allowed");
            }
        }
    }
}
