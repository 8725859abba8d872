//! `fsb up` as a child process for the local-mode tests: started against the
//! harness's containerd with its own data directory and agent id, reached through
//! the endpoint and token files it writes, killed with SIGKILL or stopped with SIGTERM.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use anyhow::{Context, Result};
use fsb_proto::fastpath::v1::fast_path_client::FastPathClient;
use tokio::process::{Child, Command};
use tonic::{
    Request, Status,
    service::{Interceptor, interceptor::InterceptedService},
    transport::Channel,
};

use crate::{ContainerdEnv, wait_until};

/// Adds `authorization: Bearer <token>`.
#[derive(Clone, Debug)]
pub struct Bearer(pub String);

impl Interceptor for Bearer {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        let value = format!("Bearer {}", self.0)
            .parse()
            .map_err(|_| Status::internal("token is not a header value"))?;
        req.metadata_mut().insert("authorization", value);
        Ok(req)
    }
}

/// A fast-path client with the token attached.
pub type Client = FastPathClient<InterceptedService<Channel, Bearer>>;

/// A create of `name` in namespace and pool `default` running `sleep 3600` from
/// `image`, in `mode`; its request id is derived from the name.
pub fn sleeper_request(
    image: &str,
    name: &str,
    mode: fsb_proto::fastpath::v1::ConsistencyMode,
) -> fsb_proto::fastpath::v1::CreateRequest {
    use fsb_proto::fastpath::v1 as fp;
    fp::CreateRequest {
        request_id: format!("req-{name}"),
        namespace: "default".into(),
        name: name.into(),
        mode: mode as i32,
        spec: Some(fp::SandboxSpec {
            image: image.into(),
            pool_ref: "default".into(),
            command: vec!["sleep".into(), "3600".into()],
            ..fp::SandboxSpec::default()
        }),
        ..fp::CreateRequest::default()
    }
}

/// The `fsb` binary built by `tests/run.sh` (env `FSB_BIN`).
pub fn fsb_bin() -> PathBuf {
    PathBuf::from(std::env::var("FSB_BIN").expect("FSB_BIN is set by tests/run.sh containerd"))
}

/// A free loopback port (kept across restarts so clients reconnect to the same place).
pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// One running `fsb up`.
#[derive(Debug)]
pub struct LocalUp {
    /// The process.
    pub child: Child,
    /// Its data directory.
    pub data_dir: PathBuf,
    /// Its gateway port.
    pub port: u16,
}

impl LocalUp {
    /// Start `fsb up` on `port` with `data_dir` and `agent_id` against the harness's
    /// containerd; returns once its endpoint file appears (it accepts creates then).
    pub async fn start(
        env: &ContainerdEnv,
        data_dir: &Path,
        agent_id: &str,
        port: u16,
        extra: &[&str],
    ) -> Result<Self> {
        Self::start_with_env(env, data_dir, agent_id, port, extra, &[]).await
    }

    /// [`LocalUp::start`] with extra environment variables for `fsb up`.
    pub async fn start_with_env(
        env: &ContainerdEnv,
        data_dir: &Path,
        agent_id: &str,
        port: u16,
        extra: &[&str],
        vars: &[(&str, &str)],
    ) -> Result<Self> {
        std::fs::create_dir_all(data_dir)?;
        let endpoint = data_dir.join("endpoint");
        let _ = std::fs::remove_file(&endpoint);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(data_dir.join("fsb-up.log"))?;
        let child = Command::new(fsb_bin())
            .arg("up")
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--containerd-socket")
            .arg(&env.socket)
            .arg("--agent-id")
            .arg(agent_id)
            .args(extra)
            .env("RUST_LOG", "info")
            .envs(vars.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .context("spawning fsb up")?;
        let mut up = Self {
            child,
            data_dir: data_dir.to_owned(),
            port,
        };
        let started = wait_until(
            "fsb up writes its endpoint",
            Duration::from_secs(60),
            || {
                let endpoint = endpoint.clone();
                async move { Ok(endpoint.exists().then_some(())) }
            },
        )
        .await;
        if let Err(e) = started {
            let _ = up.child.start_kill();
            let log = std::fs::read_to_string(data_dir.join("fsb-up.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            anyhow::bail!(
                "{e}; fsb up log tail:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        Ok(up)
    }

    /// A client for this `fsb up` (token from its data directory). The channel
    /// connects lazily, so it keeps working across a restart on the same port.
    pub fn client(&self) -> Result<Client> {
        let token = std::fs::read_to_string(self.data_dir.join("token"))?;
        let channel = Channel::from_shared(format!("http://127.0.0.1:{}", self.port))?
            .connect_timeout(Duration::from_secs(2))
            .connect_lazy();
        Ok(FastPathClient::with_interceptor(
            channel,
            Bearer(token.trim().to_owned()),
        ))
    }

    /// `fsb ARGS` against this `fsb up` (its data directory; no FSB_ENDPOINT or
    /// FSB_TOKEN from outside); its stdout, or an error with both streams if it failed.
    pub async fn cli(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(fsb_bin())
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(args)
            .env_remove("FSB_ENDPOINT")
            .env_remove("FSB_TOKEN")
            .output()
            .await
            .context("running fsb")?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        anyhow::ensure!(
            out.status.success(),
            "fsb {}: exit {:?}\nstdout: {stdout}\nstderr: {}",
            args.join(" "),
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(stdout)
    }

    /// [`Self::cli`] with `-o json`, parsed.
    pub async fn cli_json(&self, args: &[&str]) -> Result<serde_json::Value> {
        let out = self.cli(&[args, &["-o", "json"]].concat()).await?;
        serde_json::from_str(&out)
            .with_context(|| format!("fsb {}: not JSON: {out}", args.join(" ")))
    }

    /// SIGKILL and reap.
    pub async fn kill9(&mut self) -> Result<()> {
        self.child.start_kill()?;
        self.child.wait().await?;
        Ok(())
    }

    /// SIGTERM and wait for a clean exit (at most `timeout`); returns its exit status.
    pub async fn terminate(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let pid = self.child.id().context("fsb up already reaped")?;
        let status = std::process::Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status()?;
        anyhow::ensure!(status.success(), "kill -TERM {pid} failed");
        Ok(tokio::time::timeout(timeout, self.child.wait())
            .await
            .context("fsb up did not exit after SIGTERM")??)
    }
}
