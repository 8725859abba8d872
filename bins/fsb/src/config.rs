//! Settings: flags > FSB_* environment (both through clap) > config file > defaults.
//!
//! The binary reads the process environment once ([`ProcessEnv`]); everything below
//! takes it as a value, so the precedence is unit-testable.

use std::path::{Path, PathBuf};

use fsb_local::DataDir;
use serde::Deserialize;

use crate::{
    cli::{GlobalArgs, ModeArg, OutputFormat, RuntimeArg},
    error::CliError,
};

/// Image `fsb run` uses when nothing names one: the offline busybox `fsb up` loads.
pub(crate) const DEFAULT_IMAGE: &str = "fsb.local/busybox:latest";
/// Pool when nothing names one.
pub(crate) const DEFAULT_POOL: &str = "default";
/// Namespace when nothing names one.
pub(crate) const DEFAULT_NAMESPACE: &str = "default";

/// What the binary read from its environment (besides clap's FSB_* flags).
#[derive(Debug, Clone, Default)]
pub(crate) struct ProcessEnv {
    pub(crate) uid: u32,
    pub(crate) xdg_data_home: Option<String>,
    pub(crate) home: Option<String>,
    /// `FSB_TOKEN`.
    pub(crate) token: Option<String>,
    /// Whether stderr is a terminal (progress rendering).
    pub(crate) stderr_is_tty: bool,
}

impl ProcessEnv {
    /// Read it (the only place the client reads the environment outside clap).
    pub(crate) fn read() -> Self {
        use std::io::IsTerminal;
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        Self {
            uid: rustix::process::getuid().as_raw(),
            xdg_data_home: var("XDG_DATA_HOME"),
            home: var("HOME"),
            token: var("FSB_TOKEN"),
            stderr_is_tty: std::io::stderr().is_terminal(),
        }
    }
}

/// The config file (`--config`, else `<data-dir>/config.yaml`). Unknown keys are an
/// error: a typo must not silently fall back to a default.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FileConfig {
    pub(crate) endpoint: Option<String>,
    pub(crate) namespace: Option<String>,
    pub(crate) pool: Option<String>,
    pub(crate) image: Option<String>,
    pub(crate) mode: Option<ModeArg>,
    pub(crate) runtime: Option<RuntimeArg>,
    pub(crate) output: Option<OutputFormat>,
}

impl FileConfig {
    /// Parse YAML (an empty file is an empty config).
    pub(crate) fn parse(path: &Path, text: &str) -> Result<Self, CliError> {
        if text.trim().is_empty() {
            return Ok(Self::default());
        }
        serde_yaml::from_str(text).map_err(|e| {
            CliError::BadConfig(format!(
                "config {}: {e}; fix it or point --config elsewhere",
                path.display()
            ))
        })
    }

    /// The explicit file (must exist), else `<data-dir>/config.yaml` if it exists.
    pub(crate) fn load(explicit: Option<&Path>, data_dir: &DataDir) -> Result<Self, CliError> {
        let (path, required) = match explicit {
            Some(p) => (p.to_owned(), true),
            None => (data_dir.root().join("config.yaml"), false),
        };
        match std::fs::read_to_string(&path) {
            Ok(text) => Self::parse(&path, &text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => Ok(Self::default()),
            Err(e) => Err(CliError::BadConfig(format!(
                "config {}: {e}; create it or point --config elsewhere",
                path.display()
            ))),
        }
    }
}

/// The first value set: flag or env (clap already merged those), then the config file.
pub(crate) fn pick<T>(cli: Option<T>, file: Option<T>) -> Option<T> {
    cli.or(file)
}

/// Effective settings shared by the client commands.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) data_dir: DataDir,
    /// Explicit endpoint (flag, env or config); `None` reads the endpoint file.
    pub(crate) endpoint: Option<String>,
    /// `FSB_TOKEN`; `None` reads the token file.
    pub(crate) token: Option<String>,
    /// Trust root of an `https://` endpoint (None: the system's).
    pub(crate) ca_file: Option<std::path::PathBuf>,
    pub(crate) output: OutputFormat,
    pub(crate) file: FileConfig,
    pub(crate) stderr_is_tty: bool,
}

impl Settings {
    /// Resolve the global flags against the environment and the config file.
    pub(crate) fn resolve(global: &GlobalArgs, env: &ProcessEnv) -> Result<Self, CliError> {
        let data_dir = match &global.data_dir {
            Some(dir) => DataDir::new(dir),
            None => {
                DataDir::default_for(env.uid, env.xdg_data_home.as_deref(), env.home.as_deref())
            }
        };
        let file = FileConfig::load(global.config.as_deref(), &data_dir)?;
        Ok(Self::with_file(global, env, data_dir, file))
    }

    fn with_file(
        global: &GlobalArgs,
        env: &ProcessEnv,
        data_dir: DataDir,
        file: FileConfig,
    ) -> Self {
        Self {
            endpoint: pick(global.endpoint.clone(), file.endpoint.clone()),
            output: pick(global.output, file.output).unwrap_or(OutputFormat::Table),
            token: env.token.clone(),
            ca_file: global.ca_file.clone(),
            stderr_is_tty: env.stderr_is_tty,
            data_dir,
            file,
        }
    }

    /// Namespace: flag/env, config, `default`.
    pub(crate) fn namespace(&self, cli: Option<&str>) -> String {
        pick(cli, self.file.namespace.as_deref())
            .unwrap_or(DEFAULT_NAMESPACE)
            .to_owned()
    }

    /// Pool: flag/env, config, `default`.
    pub(crate) fn pool(&self, cli: Option<&str>) -> String {
        pick(cli, self.file.pool.as_deref())
            .unwrap_or(DEFAULT_POOL)
            .to_owned()
    }

    /// Image: flag/env, config, the offline busybox.
    pub(crate) fn image(&self, cli: Option<&str>) -> String {
        pick(cli, self.file.image.as_deref())
            .unwrap_or(DEFAULT_IMAGE)
            .to_owned()
    }

    /// Runtime: flag/env, config, none (the server's).
    pub(crate) fn runtime(&self, cli: Option<RuntimeArg>) -> Option<RuntimeArg> {
        pick(cli, self.file.runtime)
    }

    /// Mode: flag/env, config, none (the server's).
    pub(crate) fn mode(&self, cli: Option<ModeArg>) -> Option<ModeArg> {
        pick(cli, self.file.mode)
    }

    /// Where the endpoint file is (for "not running" messages).
    pub(crate) fn endpoint_file(&self) -> PathBuf {
        self.data_dir.endpoint_file()
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::Cli;

    fn file() -> FileConfig {
        FileConfig::parse(
            Path::new("c.yaml"),
            "endpoint: http://from-file:1\nnamespace: filens\npool: filepool\nimage: fileimg\n\
             mode: strong\nruntime: crun\noutput: yaml\n",
        )
        .unwrap()
    }

    fn settings(args: &[&str], file: FileConfig) -> Settings {
        let cli = Cli::try_parse_from(args).unwrap();
        Settings::with_file(
            &cli.global,
            &ProcessEnv::default(),
            DataDir::new("/nonexistent"),
            file,
        )
    }

    #[test]
    fn config_file_beats_defaults() {
        let s = settings(&["fsb", "ls"], file());
        assert_eq!(s.endpoint.as_deref(), Some("http://from-file:1"));
        assert_eq!(s.output, OutputFormat::Yaml);
        assert_eq!(s.namespace(None), "filens");
        assert_eq!(s.pool(None), "filepool");
        assert_eq!(s.image(None), "fileimg");
        assert_eq!(s.mode(None), Some(ModeArg::Strong));
        assert_eq!(s.runtime(None), Some(RuntimeArg::Crun));
    }

    #[test]
    fn flags_beat_the_config_file() {
        let s = settings(
            &["fsb", "ls", "--endpoint", "http://flag:2", "-o", "json"],
            file(),
        );
        assert_eq!(s.endpoint.as_deref(), Some("http://flag:2"));
        assert_eq!(s.output, OutputFormat::Json);
        assert_eq!(s.namespace(Some("flagns")), "flagns");
        assert_eq!(
            s.runtime(Some(RuntimeArg::Gvisor)),
            Some(RuntimeArg::Gvisor)
        );
    }

    #[test]
    fn defaults_apply_without_a_config_file() {
        let s = settings(&["fsb", "ls"], FileConfig::default());
        assert_eq!(s.endpoint, None);
        assert_eq!(s.output, OutputFormat::Table);
        assert_eq!(s.namespace(None), DEFAULT_NAMESPACE);
        assert_eq!(s.pool(None), DEFAULT_POOL);
        assert_eq!(s.image(None), DEFAULT_IMAGE);
        assert_eq!(s.mode(None), None);
    }

    #[test]
    fn bad_config_files_exit_64() {
        for text in ["endpont: x\n", "mode: quick\n", "- a list\n"] {
            let err = FileConfig::parse(Path::new("c.yaml"), text).unwrap_err();
            assert_eq!(err.exit_code(), 64, "{text}");
        }
        assert_eq!(
            FileConfig::parse(Path::new("c.yaml"), "\n").unwrap(),
            FileConfig::default()
        );
    }

    #[test]
    fn config_file_location() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DataDir::new(tmp.path());
        // Missing default file: fine. Missing explicit file: bad config.
        assert_eq!(FileConfig::load(None, &dir).unwrap(), FileConfig::default());
        let missing = tmp.path().join("nope.yaml");
        assert_eq!(
            FileConfig::load(Some(&missing), &dir)
                .unwrap_err()
                .exit_code(),
            64
        );
        std::fs::write(tmp.path().join("config.yaml"), "pool: p\n").unwrap();
        assert_eq!(
            FileConfig::load(None, &dir).unwrap().pool.as_deref(),
            Some("p")
        );
    }

    #[test]
    fn data_dir_flag_beats_the_user_default() {
        let cli = Cli::try_parse_from(["fsb", "--data-dir", "/d", "ls"]).unwrap();
        let s = Settings::resolve(&cli.global, &ProcessEnv::default()).unwrap();
        assert_eq!(s.data_dir.root(), Path::new("/d"));
        let cli = Cli::try_parse_from(["fsb", "ls"]).unwrap();
        let env = ProcessEnv {
            uid: 1000,
            home: Some("/home/u".into()),
            ..ProcessEnv::default()
        };
        if cli.global.data_dir.is_none() {
            let s = Settings::resolve(&cli.global, &env).unwrap();
            assert_eq!(
                s.data_dir.root(),
                Path::new("/home/u/.local/share/fast-sandbox")
            );
        }
    }
}
