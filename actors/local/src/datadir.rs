//! The data directory of `fsb up`: where state, logs, the endpoint and the token live.
//!
//! Layout (all under the root):
//! - `endpoint`: the gateway's URL (`http://127.0.0.1:PORT`), written once listening;
//! - `metrics`: the address of the Prometheus endpoint (`127.0.0.1:PORT`, path
//!   `/metrics`), written once it listens;
//! - `token`: the access token, mode 0600 (only the owner may use the API);
//! - `sandboxes.db`: the SQLite store;
//! - `logs/`: sandbox log files; `containerd/`: the private containerd, if started.

use std::{
    io::Write,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

/// Errors of local mode.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    /// A file or directory of local mode could not be used.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Something local mode needs is missing or wrong; the message says what to do.
    #[error("{0}")]
    Setup(String),
    /// containerd refused or failed an image operation of local mode.
    #[error("{0}")]
    Agent(#[from] fsb_agent::AgentError),
}

impl LocalError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_owned(),
            source,
        }
    }
}

/// Mode of the directories on the way to a sandbox's rootfs: the owner's, and
/// traversable (not listable) by the unprivileged uids of user-namespaced sandboxes.
pub const TRAVERSE_ONLY: u32 = 0o711;

/// Length of a generated token in bytes (hex-encoded: twice as many characters).
const TOKEN_BYTES: usize = 32;

/// The data directory. Cheap to clone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataDir {
    root: PathBuf,
}

impl DataDir {
    /// The directory at `root` (not created until [`Self::create`]).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The default for this user: `/var/lib/fast-sandbox` for root, else
    /// `$XDG_DATA_HOME/fast-sandbox` or `~/.local/share/fast-sandbox`. The caller passes
    /// the environment (libraries never read it): `uid`, `xdg_data_home`, `home`.
    pub fn default_for(uid: u32, xdg_data_home: Option<&str>, home: Option<&str>) -> Self {
        if uid == 0 {
            return Self::new("/var/lib/fast-sandbox");
        }
        match (xdg_data_home.filter(|s| !s.is_empty()), home) {
            (Some(xdg), _) => Self::new(Path::new(xdg).join("fast-sandbox")),
            (None, Some(home)) => Self::new(Path::new(home).join(".local/share/fast-sandbox")),
            (None, None) => Self::new("/tmp/fast-sandbox"),
        }
    }

    /// The root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The gateway URL file.
    pub fn endpoint_file(&self) -> PathBuf {
        self.root.join("endpoint")
    }

    /// The metrics address file.
    pub fn metrics_file(&self) -> PathBuf {
        self.root.join("metrics")
    }

    /// The access token file (mode 0600).
    pub fn token_file(&self) -> PathBuf {
        self.root.join("token")
    }

    /// The SQLite store.
    pub fn store_file(&self) -> PathBuf {
        self.root.join("sandboxes.db")
    }

    /// Sandbox log files.
    pub fn logs_dir(&self) -> PathBuf {
        self.root.join("logs")
    }

    /// The private containerd's config, root, state and socket.
    pub fn containerd_dir(&self) -> PathBuf {
        self.root.join("containerd")
    }

    /// Create the root and its subdirectories. The root is 0711, not 0700: the root of a
    /// user-namespaced sandbox is an unprivileged host uid that must traverse it to reach
    /// its rootfs under `containerd/`. Nothing in it can be listed, and what holds
    /// secrets or sandbox output is the owner's alone: `logs/` 0700, the store 0600
    /// (SQLite gives its WAL files the store's mode), the token 0600. Modes are set on
    /// every start, so a data directory of an older version is brought in line.
    pub fn create(&self) -> Result<(), LocalError> {
        for dir in [self.root.clone(), self.logs_dir()] {
            std::fs::create_dir_all(&dir).map_err(|e| LocalError::io(&dir, e))?;
        }
        let store = self.store_file();
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&store)
            .map_err(|e| LocalError::io(&store, e))?;
        for (path, mode) in [
            (self.root.clone(), TRAVERSE_ONLY),
            (self.logs_dir(), 0o700),
            (store, 0o600),
        ] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
                .map_err(|e| LocalError::io(&path, e))?;
        }
        Ok(())
    }

    /// The token, creating it (random, mode 0600) if missing. A token file readable by
    /// others is refused: anyone who can read it can run containers as us.
    pub fn ensure_token(&self) -> Result<String, LocalError> {
        let path = self.token_file();
        match self.read_token() {
            Ok(token) => return Ok(token),
            Err(LocalError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            }
            Err(e) => return Err(e),
        }
        let mut bytes = [0u8; TOKEN_BYTES];
        rand::fill(&mut bytes);
        let token = hex::encode(bytes);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| LocalError::io(&path, e))?;
        file.write_all(token.as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(|e| LocalError::io(&path, e))?;
        Ok(token)
    }

    /// The token written by `fsb up`.
    pub fn read_token(&self) -> Result<String, LocalError> {
        let path = self.token_file();
        let meta = std::fs::metadata(&path).map_err(|e| LocalError::io(&path, e))?;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(LocalError::Setup(format!(
                "{}: mode {:o} lets others read the token; run `chmod 600 {}`",
                path.display(),
                meta.permissions().mode() & 0o777,
                path.display()
            )));
        }
        let token = std::fs::read_to_string(&path).map_err(|e| LocalError::io(&path, e))?;
        Ok(token.trim().to_owned())
    }

    /// Record where the gateway listens (atomically: write then rename).
    pub fn write_endpoint(&self, url: &str) -> Result<(), LocalError> {
        self.write_line(&self.endpoint_file(), url)
    }

    /// Record where `/metrics` is served (`127.0.0.1:PORT`).
    pub fn write_metrics(&self, addr: std::net::SocketAddr) -> Result<(), LocalError> {
        self.write_line(&self.metrics_file(), &addr.to_string())
    }

    /// Forget the metrics address (on shutdown).
    pub fn remove_metrics(&self) {
        let _ = std::fs::remove_file(self.metrics_file());
    }

    /// Write `line` to `path` atomically (a reader sees the whole line or no file).
    fn write_line(&self, path: &Path, line: &str) -> Result<(), LocalError> {
        let name = path
            .file_name()
            .map_or_else(|| "file".into(), |n| n.to_string_lossy().into_owned());
        let tmp = self.root.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, format!("{line}\n")).map_err(|e| LocalError::io(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| LocalError::io(path, e))
    }

    /// The gateway URL written by a running `fsb up`.
    pub fn read_endpoint(&self) -> Result<String, LocalError> {
        let path = self.endpoint_file();
        let url = std::fs::read_to_string(&path).map_err(|e| LocalError::io(&path, e))?;
        Ok(url.trim().to_owned())
    }

    /// Forget the endpoint (on shutdown), so clients say "not running" rather than
    /// "connection refused".
    pub fn remove_endpoint(&self) {
        let _ = std::fs::remove_file(self.endpoint_file());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_the_user() {
        assert_eq!(
            DataDir::default_for(0, Some("/x"), Some("/root")).root(),
            Path::new("/var/lib/fast-sandbox")
        );
        assert_eq!(
            DataDir::default_for(1000, Some("/x"), Some("/home/a")).root(),
            Path::new("/x/fast-sandbox")
        );
        assert_eq!(
            DataDir::default_for(1000, Some(""), Some("/home/a")).root(),
            Path::new("/home/a/.local/share/fast-sandbox")
        );
    }

    #[test]
    fn token_is_created_once_with_mode_0600() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DataDir::new(tmp.path().join("d"));
        dir.create().unwrap();
        let t1 = dir.ensure_token().unwrap();
        assert_eq!(t1.len(), TOKEN_BYTES * 2);
        let mode = std::fs::metadata(dir.token_file())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(dir.ensure_token().unwrap(), t1);
        assert_eq!(dir.read_token().unwrap(), t1);
    }

    #[test]
    fn the_root_is_traversable_and_what_it_holds_is_private() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DataDir::new(tmp.path().join("d"));
        // An older version's layout: root 0700, a store readable by others.
        std::fs::create_dir_all(dir.root()).unwrap();
        std::fs::write(dir.store_file(), b"").unwrap();
        std::fs::set_permissions(dir.store_file(), std::fs::Permissions::from_mode(0o644)).unwrap();
        dir.create().unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(dir.root()), 0o711);
        assert_eq!(mode(&dir.logs_dir()), 0o700);
        assert_eq!(mode(&dir.store_file()), 0o600);
        // A new store file is empty (SQLite's empty database) and private from birth.
        let fresh = DataDir::new(tmp.path().join("fresh"));
        fresh.create().unwrap();
        assert_eq!(std::fs::metadata(fresh.store_file()).unwrap().len(), 0);
        assert_eq!(mode(&fresh.store_file()), 0o600);
    }

    #[test]
    fn a_token_readable_by_others_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DataDir::new(tmp.path());
        dir.ensure_token().unwrap();
        std::fs::set_permissions(dir.token_file(), std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = dir.read_token().unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");
    }

    #[test]
    fn endpoint_round_trips_and_is_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DataDir::new(tmp.path());
        dir.write_endpoint("http://127.0.0.1:7370").unwrap();
        assert_eq!(dir.read_endpoint().unwrap(), "http://127.0.0.1:7370");
        dir.remove_endpoint();
        assert!(dir.read_endpoint().is_err());
    }
}
