//! The controller's metrics read by a real Prometheus (Debian's package): the
//! controller (in-process, `metrics_listen` on a loopback port) against the real API
//! server, a pool of one real `fsb-agent` run by the kubelet fixture, real containerd.
//! STRONG creates through the fast path move the create histogram and counters; the
//! registry's slots show the agent's used slots; the Sandbox phase gauge counts the
//! Running objects; the controller loops' error and restart counters exist from the
//! start. The same families as `fsb up` (tests/tests/local_metrics.rs), so the
//! dashboard works for both.
#![cfg(feature = "k8s")]

use std::{path::PathBuf, time::Duration};

use anyhow::Result;
use fsb_tests::{
    cluster::{ControllerUnderTest, install_crds, namespace, pool, strong_sleeper},
    containerd::ContainerdEnv,
    k8s::kube_client,
    kubelet::Kubelet,
    prometheus::Prometheus,
    wait::wait_until,
};

const DEADLINE: Duration = Duration::from_secs(60);
const CREATES: usize = 3;

#[actix_rt::test]
async fn prometheus_scrapes_the_controller_and_creates_move_its_metrics() -> Result<()> {
    let env = ContainerdEnv::from_env();
    let client = kube_client().await?;
    install_crds(&client).await?;
    let ns = format!("metrics-{}", &fsb_tests::unique_id()[..8]);
    namespace(&client, &ns).await?;
    let controller = ControllerUnderTest::start(client.clone(), &ns, |c| {
        c.metrics_listen = Some(([127, 0, 0, 1], 0).into());
    })
    .await?;
    let metrics = controller
        .addrs
        .metrics
        .expect("metrics_listen set: the controller serves /metrics");
    let kubelet = Kubelet::start(client.clone(), &ns).await?;
    pool(&client, &ns, "p", 8, 1).await?;

    let dir = PathBuf::from(std::env::var("FSB_TEST_RUN_DIR").unwrap_or_else(|_| "/tmp".into()))
        .join(format!("k8s-metrics-{ns}"));
    let _ = std::fs::remove_dir_all(&dir);
    let mut prom = Prometheus::start(&dir.join("prometheus"), "fsb-controller", &[metrics]).await?;
    prom.wait_for("up{job=\"fsb-controller\"}", 1.0, DEADLINE)
        .await?;

    // The agent registers; the first create that succeeds proves the path works.
    let url = controller.url();
    for i in 0..CREATES {
        let name = format!("s{i}");
        wait_until(&format!("STRONG create {name}"), DEADLINE, || {
            strong_sleeper(&url, &ns, &name, "p", &env.image)
        })
        .await?;
    }

    let n = CREATES as f64;
    prom.wait_for(
        "sum(fsb_creates_total{mode=\"strong\",result=\"ok\"})",
        n,
        DEADLINE,
    )
    .await?;
    prom.wait_for(
        "sum(fsb_create_stage_seconds_count{stage=\"total\",mode=\"strong\"})",
        n,
        DEADLINE,
    )
    .await?;
    // The histogram has the gateway's stages, including the agent's.
    for stage in ["validate", "allocate", "record", "agent"] {
        prom.wait_for(
            &format!("sum(fsb_create_stage_seconds_count{{stage=\"{stage}\"}})"),
            n,
            DEADLINE,
        )
        .await?;
    }
    prom.wait_for(
        "sum(fsb_agent_slots{state=\"used\",pool=\"p\"})",
        n,
        DEADLINE,
    )
    .await?;
    prom.wait_for("sum(fsb_sandboxes{phase=\"Running\"})", n, DEADLINE)
        .await?;
    prom.wait_for(
        "sum(fsb_registry_allocations_total{result=\"allocated\"})",
        n,
        DEADLINE,
    )
    .await?;
    // Counters with fixed outcomes exist before their first event.
    for family in [
        "fsb_reconcile_errors_total",
        "fsb_supervisor_restarts_total",
    ] {
        let samples = prom.query(family).await?;
        assert!(!samples.is_empty(), "{family} has no series");
    }
    // No sandbox id or name is ever a label value.
    for s in prom.query("{__name__=~\"fsb_.+\"}").await? {
        for (k, v) in &s.labels {
            assert!(
                !(v.starts_with(&ns) || v.len() == 32 && v.chars().all(|c| c.is_ascii_hexdigit())),
                "label {k}={v} looks like a sandbox name or id"
            );
        }
    }

    prom.kill().await?;
    controller.stop().await;
    drop(kubelet);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
