//! STRONG vs FAST in Kubernetes mode, measured by `fsb bench --mode fast,strong` in one
//! run against the real `fsb-controller` (Sandbox objects on a real kube-apiserver +
//! etcd) and a real `fsb-agent` pod, beside raw containerd creates on the same
//! containerd.
//!
//! This binary only sets the stage (CRDs, a namespace, a one-agent pool run by the
//! kubelet fixture, the controller process) and then runs the `fsb` binary's own
//! bench with the arguments it was given, so the figures are exactly what a user gets
//! from `fsb bench --endpoint <controller>`. Run it through `benches/run.sh k8s_modes`,
//! which builds release binaries and starts the API server and a private containerd.

use std::{process::Stdio, time::Duration};

use anyhow::{Context, Result};
use fsb_proto::fastpath::v1::{self as fp, fast_path_client::FastPathClient};
use fsb_tests::{
    cluster::{free_port, install_crds, namespace, pool, strong_sleeper},
    containerd::ContainerdEnv,
    k8s::kube_client,
    kubelet::Kubelet,
    wait::wait_until,
};

/// Slots of the single agent: room for `--concurrency` up to 32.
const SLOTS: u32 = 64;
/// What runs when no arguments are given.
const DEFAULT_ARGS: [&str; 6] = [
    "--mode",
    "fast,strong",
    "--compare-raw",
    "--count",
    "100",
    "--runtime=runc",
];

fn bin(var: &str) -> Result<String> {
    std::env::var(var).with_context(|| format!("{var} is set by benches/run.sh k8s_modes"))
}

/// One STRONG create and delete through the controller: it answers only once the
/// agent has registered and the whole path works.
async fn probe(url: &str, ns: &str, image: &str) -> Result<Option<()>> {
    if strong_sleeper(url, ns, "probe", "p", image)
        .await?
        .is_none()
    {
        return Ok(None);
    }
    FastPathClient::connect(url.to_owned())
        .await?
        .delete(fp::DeleteRequest {
            namespace: ns.into(),
            name: "probe".into(),
            grace_period_seconds: Some(0),
        })
        .await?;
    Ok(Some(()))
}

async fn bench(args: &[String]) -> Result<i32> {
    let env = ContainerdEnv::try_from_env()?;
    let client = kube_client().await?;
    install_crds(&client).await?;
    let ns = format!("bench-{}", &fsb_tests::unique_id()[..8]);
    namespace(&client, &ns).await?;
    let kubelet = Kubelet::start(client.clone(), &ns).await?;
    let (fast, agents) = (free_port()?, free_port()?);
    let url = format!("http://127.0.0.1:{fast}");
    let mut controller = tokio::process::Command::new(bin("FSB_CONTROLLER_BIN")?)
        .env("KUBECONFIG", bin("FSB_KUBECONFIG")?)
        .env("RUST_LOG", "warn")
        .args(["--watch-namespace", &ns, "--no-leader-election"])
        .args(["--listen", &format!("127.0.0.1:{fast}")])
        .args(["--agent-listen", &format!("127.0.0.1:{agents}")])
        .args(["--agent-url", &format!("http://127.0.0.1:{agents}")])
        .kill_on_drop(true)
        .spawn()?;
    pool(&client, &ns, "p", SLOTS, 1).await?;
    wait_until(
        "the controller to serve creates",
        Duration::from_secs(120),
        || probe(&url, &ns, &env.image),
    )
    .await?;

    let data_dir = tempfile::tempdir()?;
    let socket = env.socket.display().to_string();
    let mut cmd = tokio::process::Command::new(bin("FSB_BIN")?);
    cmd.arg("--data-dir")
        .arg(data_dir.path())
        .args(["--endpoint", &url, "bench", "--namespace", &ns])
        .args(["--pool", "p", "--image", &env.image])
        .args(["--containerd-socket", &socket])
        .arg("--runtime-root")
        .arg(env.runtime_root.join("bench-raw"))
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit());
    if args.is_empty() {
        cmd.args(DEFAULT_ARGS);
    } else {
        cmd.args(args);
    }
    eprintln!(
        "k8s_modes: fsb-controller {url} (namespace {ns}, one agent pod, {SLOTS} slots); running fsb bench {}",
        if args.is_empty() {
            DEFAULT_ARGS.join(" ")
        } else {
            args.join(" ")
        }
    );
    let status = cmd.status().await?;

    let _ = controller.start_kill();
    let _ = controller.wait().await;
    drop(kubelet);
    Ok(status.code().unwrap_or(1))
}

fn main() -> Result<()> {
    // `cargo bench` passes `--bench`; everything else goes to `fsb bench`.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let code = actix_rt::System::new().block_on(bench(&args))?;
    std::process::exit(code)
}
