//! Kubernetes-mode fixtures over the harness's API server (`tests/run.sh k8s`): a kube
//! client, the controller run in-process, agent pods (Pod objects owned by a pool,
//! with a real `fsb-agent` process standing in for the kubelet's container).

use std::{net::SocketAddr, path::PathBuf, process::Stdio, time::Duration};

use anyhow::{Context, Result, bail};
use fsb_controller::{
    crd::{PoolCapacity, RuntimeName, SandboxPool, SandboxPoolSpec},
    run::{Addresses, ControllerConfig, Shared, run},
};
use k8s_openapi::{
    api::core::v1::{Namespace, Pod},
    apimachinery::pkg::apis::meta::v1::OwnerReference,
};
use kube::{
    Api, Client,
    api::{DeleteParams, ObjectMeta, PostParams},
};
use serde_json::json;

use crate::containerd::ContainerdEnv;
use fsb_agent::tls::TlsMaterial;
use k8s_openapi::api::core::v1::Secret;

/// A client of the test API server with the admin token (from FSB_KUBECONFIG).
pub async fn kube_client() -> Result<Client> {
    let path =
        std::env::var("FSB_KUBECONFIG").context("FSB_KUBECONFIG is set by tests/run.sh k8s")?;
    let kubeconfig = kube::config::Kubeconfig::read_from(&path)?;
    let config = kube::Config::from_custom_kubeconfig(
        kubeconfig,
        &kube::config::KubeConfigOptions::default(),
    )
    .await?;
    Ok(Client::try_from(config)?)
}

/// Install (or update) the Sandbox and SandboxPool CRDs as the code generates them and
/// wait until both are Established. Idempotent; safe from concurrent tests.
pub async fn install_crds(client: &Client) -> Result<()> {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::{
        CustomResourceExt,
        api::{Patch, PatchParams},
    };
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in [
        fsb_controller::crd::Sandbox::crd(),
        fsb_controller::crd::SandboxPool::crd(),
    ] {
        let name = crd.metadata.name.clone().unwrap_or_default();
        api.patch(
            &name,
            &PatchParams::apply("fsb-tests").force(),
            &Patch::Apply(&crd),
        )
        .await?;
        crate::wait::wait_until(
            &format!("CRD {name} Established"),
            Duration::from_secs(30),
            || {
                let api = api.clone();
                let name = name.clone();
                async move {
                    let c = api.get(&name).await?;
                    let ok = c
                        .status
                        .iter()
                        .flat_map(|s| s.conditions.iter().flatten())
                        .any(|c| c.type_ == "Established" && c.status == "True");
                    Ok(ok.then_some(()))
                }
            },
        )
        .await?;
    }
    Ok(())
}

/// Create a namespace named `name` (fresh per test).
pub async fn namespace(client: &Client, name: &str) -> Result<()> {
    let api: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name}}))?;
    match api.create(&PostParams::default(), &ns).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        Err(e) => return Err(e.into()),
    }
    // No controller-manager runs, so nothing makes the `default` ServiceAccount pods
    // need: make it.
    let sas: Api<k8s_openapi::api::core::v1::ServiceAccount> =
        Api::namespaced(client.clone(), name);
    let sa = serde_json::from_value(json!({"metadata": {"name": "default"}}))?;
    match sas.create(&PostParams::default(), &sa).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Create a SandboxPool of exactly `pods` agent pods (poolMin = poolMax, no buffer:
/// tests decide the capacity) with `per_pod` slots each.
pub async fn pool(
    client: &Client,
    ns: &str,
    name: &str,
    per_pod: u32,
    pods: u32,
) -> Result<SandboxPool> {
    let api: Api<SandboxPool> = Api::namespaced(client.clone(), ns);
    let pool = SandboxPool::new(
        name,
        SandboxPoolSpec {
            capacity: PoolCapacity {
                pool_min: pods,
                pool_max: pods,
                buffer_min: 0,
                buffer_max: 0,
            },
            max_sandboxes_per_pod: per_pod,
            runtime: RuntimeName::Runc,
            warm_images: Vec::new(),
            agent_template: None,
            sandbox_security: None,
        },
    );
    Ok(api.create(&PostParams::default(), &pool).await?)
}

/// The controller, in this process.
#[derive(Debug)]
pub struct ControllerUnderTest {
    /// Where it listens.
    pub addrs: Addresses,
    /// Its shared state.
    pub shared: Shared,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl ControllerUnderTest {
    /// Start a controller of namespace `ns` on loopback ports with short loops. Call
    /// from inside an actix system (`#[actix_rt::test]`).
    pub async fn start(
        client: Client,
        ns: &str,
        tweak: impl FnOnce(&mut ControllerConfig),
    ) -> Result<Self> {
        // The controller's log, shown with a failing test's output.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "warn,fsb_controller=info,fsb_gateway=info".into()),
            )
            .with_test_writer()
            .try_init();
        let mut config = ControllerConfig {
            namespace: Some(ns.to_owned()),
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            agent_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            startup_wait: Duration::from_secs(2),
            agent_lost_after: Duration::from_secs(5),
            sandbox_interval: Duration::from_millis(200),
            heartbeat: Duration::from_millis(500),
            ..ControllerConfig::default()
        };
        config.gateway.sweep_interval = Duration::from_millis(300);
        tweak(&mut config);
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        // actix actors (the gateway's) start on the system's local task set.
        let task = actix_rt::spawn(async move {
            let result = run(
                client,
                config,
                async {
                    let _ = stop_rx.await;
                },
                move |addrs, shared| {
                    let _ = ready_tx.send((addrs, shared));
                },
            )
            .await;
            if let Err(e) = result {
                eprintln!("controller: {e}");
            }
        });
        let (addrs, shared) = tokio::time::timeout(Duration::from_secs(30), ready_rx)
            .await
            .context("controller did not start within 30 s")??;
        Ok(Self {
            addrs,
            shared,
            stop: Some(stop_tx),
            task: Some(task),
        })
    }

    /// The fast path's URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addrs.fast_path)
    }

    /// The AgentControl URL agents dial (TLS unless the test turned it off).
    pub fn agent_url(&self) -> String {
        format!("https://{}", self.addrs.agents)
    }

    /// Stop gracefully and wait.
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(30), t).await;
        }
    }
}

impl Drop for ControllerUnderTest {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// The agent certificate the pool reconciler issued for pool `pool` (its Secret
/// `<pool>-agent-tls`), once it exists.
pub async fn pool_tls(client: &Client, ns: &str, pool: &str) -> Result<TlsMaterial> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let name = fsb_controller::pool::tls_secret_name(pool);
    crate::wait::wait_until(
        &format!("secret {ns}/{name}"),
        Duration::from_secs(30),
        || {
            let secrets = secrets.clone();
            let name = name.clone();
            async move {
                Ok(secrets
                    .get_opt(&name)
                    .await?
                    .as_ref()
                    .and_then(fsb_controller::tls::material_of))
            }
        },
    )
    .await
}

/// A certificate with the controller's identity, signed by the agent CA of namespace
/// `ns` (Secret `fsb-agent-ca`, as an in-process controller of `ns` keeps it): what the
/// controller presents to agents.
pub async fn controller_tls(client: &Client, ns: &str) -> Result<TlsMaterial> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let secret = secrets.get(fsb_controller::tls::DEFAULT_CA_SECRET).await?;
    let text = |k: &str| {
        fsb_controller::tls::secret_text(&secret, k)
            .with_context(|| format!("CA secret has no {k}"))
    };
    let ca = fsb_controller::tls::Ca::from_pem(
        &text(fsb_agent::tls::CA_FILE)?,
        &text(fsb_controller::tls::CA_KEY)?,
    )?;
    Ok(ca.issue(fsb_agent::tls::CONTROLLER_NAME)?)
}

/// An agent pod: a Pod object owned by a pool (left Pending: no kubelet runs) and a
/// real `fsb-agent` process with that pod's identity. Killed on drop.
#[derive(Debug)]
pub struct AgentPod {
    /// Pod name.
    pub name: String,
    /// Pod uid (= agent id).
    pub uid: String,
    /// The agent's own port.
    pub port: u16,
    child: Option<tokio::process::Child>,
    log_dir: PathBuf,
}

/// A free TCP port on loopback.
pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl AgentPod {
    /// Create the Pod object `name` owned by `owner` (None: owned by nobody, to test
    /// that such an agent is refused) and start its agent against `controller_url`.
    pub async fn start(
        client: &Client,
        ns: &str,
        name: &str,
        pool: &str,
        owner: Option<&SandboxPool>,
        capacity: u32,
        controller_url: &str,
    ) -> Result<Self> {
        let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
        let mut pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {
                "app": "sandbox-agent", "fast-sandbox.io/pool": pool}},
            "spec": {"containers": [{"name": "agent", "image": "fast-sandbox/agent:test"}]},
        }))?;
        if let Some(p) = owner {
            pod.metadata.owner_references = Some(vec![OwnerReference {
                api_version: "sandbox.fast.io/v1alpha1".into(),
                kind: "SandboxPool".into(),
                name: pool.to_owned(),
                uid: p.metadata.uid.clone().unwrap_or_default(),
                controller: Some(true),
                block_owner_deletion: Some(true),
            }]);
        }
        let pod = pods.create(&PostParams::default(), &pod).await?;
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let mut agent = Self::spawn(ns, name, &uid, pool, capacity, controller_url)?;
        agent.wait_listening().await?;
        Ok(agent)
    }

    fn spawn(
        ns: &str,
        name: &str,
        uid: &str,
        pool: &str,
        capacity: u32,
        controller_url: &str,
    ) -> Result<Self> {
        let env = ContainerdEnv::from_env();
        let bin = std::env::var("FSB_AGENT_BIN").context("FSB_AGENT_BIN is set by tests/run.sh")?;
        let port = free_port()?;
        let run_dir = std::env::var("FSB_TEST_RUN_DIR").unwrap_or_else(|_| "/tmp/fsb-test".into());
        let log_dir = PathBuf::from(run_dir).join("agent-logs").join(uid);
        std::fs::create_dir_all(&log_dir)?;
        let child = tokio::process::Command::new(bin)
            .env("FSB_AGENT_ID", uid)
            .env("FSB_POD_UID", uid)
            .env("FSB_POD_NAME", name)
            .env("FSB_NAMESPACE", ns)
            .env("FSB_POOL", pool)
            .env("FSB_NODE_NAME", "fsb-test-node")
            .env("FSB_CAPACITY", capacity.to_string())
            .env("FSB_CONTROLLER", controller_url)
            .env("FSB_LISTEN", format!("127.0.0.1:{port}"))
            .env("FSB_HEARTBEAT_MS", "500")
            .env("FSB_STOP_GRACE_SECONDS", "2")
            .env("FSB_CONTAINERD_SOCKET", &env.socket)
            .env("FSB_CONTAINERD_NAMESPACE", &env.namespace)
            .env("FSB_RUNTIME_ROOT", &env.runtime_root)
            .env("FSB_RUNSC", &env.runsc)
            .env("FSB_LOG_DIR", &log_dir)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()?;
        Ok(Self {
            name: name.to_owned(),
            uid: uid.to_owned(),
            port,
            child: Some(child),
            log_dir,
        })
    }

    async fn wait_listening(&mut self) -> Result<()> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
            {
                return Ok(());
            }
            if let Some(c) = self.child.as_mut()
                && let Some(status) = c.try_wait()?
            {
                bail!("agent {} exited: {status}", self.name);
            }
            if tokio::time::Instant::now() > deadline {
                bail!("agent {} did not listen within 20 s", self.name);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL the agent process (its containers keep running).
    pub async fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill().await;
        }
    }

    /// Delete the Pod object (as if the node lost it) with no grace.
    pub async fn delete_pod(&self, client: &Client, ns: &str) -> Result<()> {
        let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
        pods.delete(
            &self.name,
            &DeleteParams {
                grace_period_seconds: Some(0),
                ..DeleteParams::default()
            },
        )
        .await?;
        Ok(())
    }

    /// Where its sandboxes' logs go.
    pub fn log_dir(&self) -> &PathBuf {
        &self.log_dir
    }

    /// Build the metadata of a pod: for tests that create pods by hand.
    pub fn meta(name: &str) -> ObjectMeta {
        ObjectMeta {
            name: Some(name.to_owned()),
            ..ObjectMeta::default()
        }
    }
}

/// The `fsb-controller` binary (`FSB_CONTROLLER_BIN`) as a child process of namespace
/// `ns` on fixed loopback ports (agents dial the same address across restarts), with
/// leader election on (Lease in `ns`) and no fast-path authentication. Its log (warnings and errors) goes to the
/// test's output. Killed on drop.
#[derive(Debug)]
pub struct ControllerProcess {
    child: tokio::process::Child,
}

impl ControllerProcess {
    /// Start one; `identity` is its Lease holder name, `extra` more flags.
    pub fn spawn(ns: &str, fast: u16, agents: u16, identity: &str, extra: &[&str]) -> Result<Self> {
        let bin = std::env::var("FSB_CONTROLLER_BIN")
            .context("FSB_CONTROLLER_BIN is set by tests/run.sh")?;
        let kubeconfig =
            std::env::var("FSB_KUBECONFIG").context("FSB_KUBECONFIG is set by tests/run.sh k8s")?;
        let child = tokio::process::Command::new(bin)
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "warn")
            .args(["--watch-namespace", ns])
            .args(["--listen", &format!("127.0.0.1:{fast}")])
            .args(["--agent-listen", &format!("127.0.0.1:{agents}")])
            .args(["--agent-url", &format!("http://127.0.0.1:{agents}")])
            .args(["--identity", identity, "--lease-namespace", ns])
            // These tests are about crashes and leadership; RBAC on the fast path is
            // k8s_auth's (the binary's default is `--auth kubernetes`).
            .args(["--auth", "none"])
            .args(extra)
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()?;
        Ok(Self { child })
    }

    /// `kill -9` and reap.
    pub async fn kill9(mut self) -> Result<()> {
        self.child.start_kill()?;
        self.child.wait().await?;
        Ok(())
    }

    /// Its exit status if it has exited.
    pub fn try_exit(&mut self) -> Result<Option<std::process::ExitStatus>> {
        Ok(self.child.try_wait()?)
    }
}

/// The request of [`strong_sleeper`]: STRONG, `sleep 3600`, request id `<ns>-<name>`.
pub fn strong_sleeper_request(
    ns: &str,
    name: &str,
    pool: &str,
    image: &str,
) -> fsb_proto::fastpath::v1::CreateRequest {
    use fsb_proto::fastpath::v1 as fp;
    fp::CreateRequest {
        request_id: format!("{ns}-{name}"),
        namespace: ns.into(),
        name: name.into(),
        mode: fp::ConsistencyMode::Strong as i32,
        spec: Some(fp::SandboxSpec {
            image: image.into(),
            pool_ref: pool.into(),
            command: vec!["sleep".into(), "3600".into()],
            ..fp::SandboxSpec::default()
        }),
        ..fp::CreateRequest::default()
    }
}

/// A STRONG create of a `sleep 3600` sandbox in pool `pool` through the fast path at
/// `url` (request id `<ns>-<name>`, so a retry replays): its sandbox id, or `None`
/// while nothing serves there yet (no listener, or `Unavailable`) — a probe for
/// [`crate::wait::wait_until`].
pub async fn strong_sleeper(
    url: &str,
    ns: &str,
    name: &str,
    pool: &str,
    image: &str,
) -> Result<Option<String>> {
    use fsb_proto::fastpath::v1::fast_path_client::FastPathClient;
    let Ok(mut c) = FastPathClient::connect(url.to_owned()).await else {
        return Ok(None);
    };
    let created = c
        .create(strong_sleeper_request(ns, name, pool, image))
        .await;
    match created {
        Ok(resp) => Ok(Some(
            resp.into_inner()
                .sandbox
                .and_then(|s| s.status)
                .map(|s| s.sandbox_id)
                .unwrap_or_default(),
        )),
        Err(s) if s.code() == tonic::Code::Unavailable => Ok(None),
        Err(s) => bail!("create {ns}/{name}: {s}"),
    }
}

/// The node's containers of one agent, for a janitor run by a test: the tests share
/// one containerd, so a test's janitor judges its own agents' containers only.
#[derive(Debug)]
pub struct AgentContainers {
    /// The containerd the agents use.
    pub runtime: fsb_agent::runtime::ContainerdRuntime,
    /// The agent (pod uid) whose containers these are.
    pub agent: String,
}

impl fsb_janitor::NodeContainers for AgentContainers {
    async fn list(&self) -> Result<Vec<fsb_janitor::ContainerFacts>, fsb_janitor::JanitorError> {
        Ok(self
            .runtime
            .list(Some(&self.agent))
            .await?
            .iter()
            .map(|o| fsb_janitor::ContainerFacts::from_labels(&o.id, &o.labels, o.created_at))
            .collect())
    }

    async fn remove(
        &self,
        id: &fsb_core::SandboxId,
        grace: Duration,
    ) -> Result<bool, fsb_janitor::JanitorError> {
        Ok(self.runtime.remove(id, grace).await?)
    }
}
