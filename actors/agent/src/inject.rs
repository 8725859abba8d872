//! Files injected into a sandbox (helper binaries, an init, certificates): seed-review
//! item 5. The original mounted whatever path it was given. Here a source is accepted
//! only if, after resolving every symlink to the real path, it still lies inside one of
//! the allow-listed directories, exists, and is a regular file; the destination must be
//! a clean absolute path; and [`crate::oci`] mounts it read-only, `nosuid`, `nodev`.
//!
//! The mount uses the resolved real path, never the path the caller gave, so a symlink
//! swapped in after the check does not redirect the mount. What remains trusted: the
//! allow-listed directories themselves must be writable only by the agent's operator
//! (someone who can replace a file inside them can change what sandboxes run).

use std::path::{Path, PathBuf};

use crate::error::AgentError;

/// Container directories a file may not be injected into: the runtime mounts its own
/// filesystems there, and a bind mount on top would be shadowed or would shadow them.
const RESERVED_DESTINATIONS: &[&str] = &["/proc", "/sys", "/dev"];

/// A file to bind-mount into a sandbox, already checked by [`InjectionPolicy::resolve`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InjectedMount {
    /// The real path on the host (symlinks resolved), inside an allowed directory.
    pub source: PathBuf,
    /// Absolute clean path inside the container.
    pub destination: String,
}

/// The directories injected files may come from.
#[derive(Clone, Debug)]
pub struct InjectionPolicy {
    allowed_dirs: Vec<PathBuf>,
}

impl InjectionPolicy {
    /// A policy allowing files under `dirs`. Each directory is canonicalized now (so a
    /// symlinked directory is compared by its real path) and must exist.
    pub fn new<I, P>(dirs: I) -> Result<Self, AgentError>
    where
        I: IntoIterator<Item = P>,
        P: AsRef<Path>,
    {
        let mut allowed_dirs = Vec::new();
        for dir in dirs {
            let dir = dir.as_ref();
            let real = std::fs::canonicalize(dir).map_err(|e| {
                AgentError::InvalidArgument(format!("injection allowed dir {}: {e}", dir.display()))
            })?;
            if !real.is_dir() {
                return Err(AgentError::InvalidArgument(format!(
                    "injection allowed dir {}: not a directory",
                    dir.display()
                )));
            }
            allowed_dirs.push(real);
        }
        Ok(Self { allowed_dirs })
    }

    /// The canonical allowed directories.
    pub fn allowed_dirs(&self) -> &[PathBuf] {
        &self.allowed_dirs
    }

    /// Check that `source` may be injected at `destination`, returning the mount to make.
    pub fn resolve(&self, source: &Path, destination: &str) -> Result<InjectedMount, AgentError> {
        let invalid = |reason: String| {
            AgentError::InvalidArgument(format!("injection source {}: {reason}", source.display()))
        };
        if !source.is_absolute() {
            return Err(invalid("must be an absolute path".into()));
        }
        check_destination(destination)?;

        // Resolve symlinks and `..` to the real path, then check THAT path: the path as
        // given may sit inside an allowed dir and still point anywhere.
        let real = std::fs::canonicalize(source).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => invalid("does not exist".into()),
            _ => invalid(e.to_string()),
        })?;
        if !self.allowed_dirs.iter().any(|dir| real.starts_with(dir)) {
            return Err(invalid(format!(
                "resolves to {}, outside the allowed directories",
                real.display()
            )));
        }
        let meta = std::fs::symlink_metadata(&real).map_err(|e| invalid(e.to_string()))?;
        if !meta.file_type().is_file() {
            return Err(invalid("is not a regular file".into()));
        }
        Ok(InjectedMount {
            source: real,
            destination: destination.to_owned(),
        })
    }
}

/// A destination must be absolute and clean: no empty, `.` or `..` components, no NUL,
/// not `/` itself and not under a runtime-managed directory.
fn check_destination(destination: &str) -> Result<(), AgentError> {
    let invalid = |reason: &str| {
        AgentError::InvalidArgument(format!("injection destination {destination:?}: {reason}"))
    };
    let Some(rest) = destination.strip_prefix('/') else {
        return Err(invalid("must be an absolute path"));
    };
    if rest.is_empty() {
        return Err(invalid("must name a file, not /"));
    }
    if destination.contains('\0') || destination.len() > 4096 {
        return Err(invalid("must be at most 4096 bytes without NUL"));
    }
    if rest
        .split('/')
        .any(|seg| seg.is_empty() || seg == "." || seg == "..")
    {
        return Err(invalid(
            "must be a clean path (no empty, '.' or '..' components)",
        ));
    }
    if RESERVED_DESTINATIONS
        .iter()
        .any(|r| Path::new(destination).starts_with(r))
    {
        return Err(invalid("must not be under /proc, /sys or /dev"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    struct Fixture {
        _tmp: tempfile::TempDir,
        allowed: PathBuf,
        outside: PathBuf,
        policy: InjectionPolicy,
    }

    fn fixture() -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        let allowed = tmp.path().join("allowed");
        let outside = tmp.path().join("outside");
        std::fs::create_dir_all(allowed.join("bin")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(allowed.join("bin/helper"), b"#!/bin/sh\n").unwrap();
        std::fs::write(outside.join("secret"), b"host secret").unwrap();
        let policy = InjectionPolicy::new([&allowed]).unwrap();
        Fixture {
            _tmp: tmp,
            allowed,
            outside,
            policy,
        }
    }

    fn message(err: AgentError) -> String {
        assert!(matches!(err, AgentError::InvalidArgument(_)), "{err:?}");
        err.to_string()
    }

    #[test]
    fn a_regular_file_inside_is_accepted_by_its_real_path() {
        let f = fixture();
        let m = f
            .policy
            .resolve(&f.allowed.join("bin/helper"), "/.fsb/helper")
            .unwrap();
        assert_eq!(
            m.source,
            f.allowed.canonicalize().unwrap().join("bin/helper")
        );
        assert_eq!(m.destination, "/.fsb/helper");
    }

    /// Seed-review item 5: a symlink inside the allow-list pointing outside is refused.
    /// Checking the path as given (before resolving it) would accept this one.
    #[test]
    fn a_symlink_escaping_the_allow_list_is_refused() {
        let f = fixture();
        let link = f.allowed.join("bin/escape");
        symlink(f.outside.join("secret"), &link).unwrap();
        assert!(link.starts_with(&f.allowed), "the link itself is inside");
        let msg = message(f.policy.resolve(&link, "/.fsb/helper").unwrap_err());
        assert!(msg.contains("outside the allowed directories"), "{msg}");
        assert!(msg.starts_with("injection source"), "{msg}");

        // A symlinked directory on the way out is caught the same way.
        symlink(&f.outside, f.allowed.join("dir-escape")).unwrap();
        let via_dir = f.allowed.join("dir-escape/secret");
        assert!(f.policy.resolve(&via_dir, "/x").is_err());
        // And so is `..`.
        let dotdot = f.allowed.join("../outside/secret");
        assert!(f.policy.resolve(&dotdot, "/x").is_err());
    }

    #[test]
    fn a_symlink_staying_inside_resolves_to_its_target() {
        let f = fixture();
        let link = f.allowed.join("alias");
        symlink(f.allowed.join("bin/helper"), &link).unwrap();
        let m = f.policy.resolve(&link, "/helper").unwrap();
        assert_eq!(
            m.source,
            f.allowed.canonicalize().unwrap().join("bin/helper")
        );
    }

    #[test]
    fn a_sibling_with_the_same_prefix_is_not_inside() {
        let f = fixture();
        let sibling = f.allowed.with_file_name("allowed-evil");
        std::fs::create_dir_all(&sibling).unwrap();
        std::fs::write(sibling.join("x"), b"x").unwrap();
        assert!(f.policy.resolve(&sibling.join("x"), "/x").is_err());
    }

    #[test]
    fn directories_missing_files_and_relative_sources_are_refused() {
        let f = fixture();
        let msg = message(
            f.policy
                .resolve(&f.allowed.join("bin"), "/bin2")
                .unwrap_err(),
        );
        assert!(msg.contains("not a regular file"), "{msg}");
        let msg = message(
            f.policy
                .resolve(&f.allowed.join("bin/missing"), "/m")
                .unwrap_err(),
        );
        assert!(msg.contains("does not exist"), "{msg}");
        let msg = message(f.policy.resolve(Path::new("bin/helper"), "/m").unwrap_err());
        assert!(msg.contains("absolute"), "{msg}");
    }

    #[test]
    fn unclean_destinations_are_refused() {
        let f = fixture();
        let src = f.allowed.join("bin/helper");
        for dest in [
            "../etc/passwd",
            "/../etc/passwd",
            "/a/../../etc",
            "/a/./b",
            "/a//b",
            "/a/",
            "relative",
            "/",
            "",
            "/proc/self/exe",
            "/sys/x",
            "/dev/null",
        ] {
            let msg = message(f.policy.resolve(&src, dest).unwrap_err());
            assert!(msg.starts_with("injection destination"), "{dest}: {msg}");
        }
        // A name that merely starts with a reserved word is fine.
        assert!(f.policy.resolve(&src, "/processes/helper").is_ok());
        assert!(f.policy.resolve(&src, "/usr/local/bin/..helper").is_ok());
    }

    #[test]
    fn allowed_dirs_must_exist_and_are_canonical() {
        let f = fixture();
        assert!(InjectionPolicy::new([f.allowed.join("nope")]).is_err());
        assert!(InjectionPolicy::new([f.allowed.join("bin/helper")]).is_err());
        // An allowed dir given through a symlink accepts files by their real path.
        let link = f.outside.join("allowed-link");
        symlink(&f.allowed, &link).unwrap();
        let policy = InjectionPolicy::new([&link]).unwrap();
        assert_eq!(policy.allowed_dirs(), &[f.allowed.canonicalize().unwrap()]);
        assert!(policy.resolve(&link.join("bin/helper"), "/h").is_ok());
    }
}
