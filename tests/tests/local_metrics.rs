//! Metrics end to end in local mode, read by a real Prometheus (Debian's package):
//! `fsb up` (with two warm instances) serves `/metrics` on a loopback port it writes
//! to `<data-dir>/metrics` and logs once; Prometheus scrapes it every second; creates
//! through the fast path (FAST warm and cold, STRONG, one invalid) move the create
//! histogram and the counters, a failed `fsb image pull` is counted, the registry's
//! slots and warm levels and the phase gauges show up; no sandbox id or name is ever a label; and every PromQL
//! expression of the Grafana dashboard (`deploy/dashboards/fast-sandbox.json`)
//! returns data. Real containerd, real `fsb up` binary, real Prometheus.

#![allow(clippy::unwrap_used)] // test code

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use fsb_proto::fastpath::v1 as fp;
use fsb_tests::{
    ContainerdEnv,
    local::{Client, LocalUp, free_port, sleeper_request},
    prometheus::Prometheus,
    wait_until,
};

const WARM: usize = 2;
const SCRAPED: Duration = Duration::from_secs(60);

/// Creates `names` one after the other; returns (name, sandbox id, path).
async fn create_all(
    client: &mut Client,
    env: &ContainerdEnv,
    names: &[(&str, fp::ConsistencyMode)],
) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for (name, mode) in names {
        let resp = client
            .create(sleeper_request(&env.image, name, *mode))
            .await
            .unwrap_or_else(|e| panic!("create {name}: {e}"))
            .into_inner();
        let id = resp.sandbox.unwrap().status.unwrap().sandbox_id;
        out.push(((*name).to_owned(), id, resp.timeline.unwrap().path));
    }
    out
}

/// Every `"expr"` string in the dashboard JSON.
fn dashboard_exprs() -> Vec<String> {
    fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    match (k.as_str(), v) {
                        ("expr", serde_json::Value::String(e)) => out.push(e.clone()),
                        _ => walk(v, out),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/dashboards/fast-sandbox.json");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut out = Vec::new();
    walk(&serde_json::from_str(&text).unwrap(), &mut out);
    out
}

#[tokio::test]
async fn prometheus_scrapes_fsb_up_and_every_dashboard_query_returns_data() {
    let env = ContainerdEnv::from_env();
    let init = std::env::var("FSB_INIT_BIN").expect("FSB_INIT_BIN is set by tests/run.sh");
    let dir = PathBuf::from(std::env::var("FSB_TEST_RUN_DIR").unwrap_or_else(|_| "/tmp".into()))
        .join(format!("local-metrics-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let agent = format!("metrics-{}", std::process::id());
    let warm_flag = format!("{}={WARM}", env.image);
    let mut up = LocalUp::start(
        &env,
        &dir.join("up"),
        &agent,
        free_port().unwrap(),
        &[
            "--warm",
            &warm_flag,
            "--init-binary",
            &init,
            "--metrics-listen",
            "127.0.0.1:0",
            "--stop-sandboxes-on-exit",
        ],
    )
    .await
    .unwrap();
    let mut client = up.client().unwrap();

    // Where /metrics is: the data directory's `metrics` file, and one log line.
    let metrics: SocketAddr = std::fs::read_to_string(dir.join("up/metrics"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(metrics.ip().is_loopback(), "{metrics}");
    assert_ne!(metrics.port(), 0);
    let log = std::fs::read_to_string(dir.join("up/fsb-up.log")).unwrap();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("metrics listening on"))
        .collect();
    assert_eq!(lines.len(), 1, "one line: {lines:?}");
    assert!(
        lines[0].contains(&format!("metrics listening on {metrics}")),
        "{lines:?}"
    );
    let http = reqwest::Client::new();
    let direct = http
        .get(format!("http://{metrics}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(direct.status(), 200);
    assert_eq!(
        http.get(format!("http://{metrics}/"))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );

    let mut prom = Prometheus::start(&dir.join("prometheus"), "fsb-up", &[metrics])
        .await
        .unwrap();
    // Scraped, with the pre-initialized counters at zero, before any create; and the
    // warm level as the registry sees it.
    prom.wait_for(r#"up{job="fsb-up"}"#, 1.0, SCRAPED)
        .await
        .unwrap();
    assert_eq!(
        prom.sum(r#"sum(fsb_creates_total{result="ok"})"#)
            .await
            .unwrap(),
        0.0
    );
    prom.wait_for(
        r#"sum(fsb_warm_instances_ready{pool="default",runtime="runc"})"#,
        WARM as f64,
        SCRAPED,
    )
    .await
    .unwrap();

    // First batch: FAST (warm, then cold once the instances are taken), STRONG, and
    // one invalid create.
    let mut created = create_all(
        &mut client,
        &env,
        &[
            ("m-fast-0", fp::ConsistencyMode::Fast),
            ("m-fast-1", fp::ConsistencyMode::Fast),
            ("m-fast-2", fp::ConsistencyMode::Fast),
            ("m-strong-0", fp::ConsistencyMode::Strong),
        ],
    )
    .await;
    let mut bad = sleeper_request(&env.image, "m-bad", fp::ConsistencyMode::Fast);
    bad.name = "Not_A_Valid_Name".into();
    let err = client.create(bad).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    prom.wait_for(r#"sum(fsb_creates_total{result="ok"})"#, 4.0, SCRAPED)
        .await
        .unwrap();

    // Second batch, so the histogram's series have moved between scrapes.
    created.extend(
        create_all(
            &mut client,
            &env,
            &[
                ("m-fast-3", fp::ConsistencyMode::Fast),
                ("m-fast-4", fp::ConsistencyMode::Fast),
            ],
        )
        .await,
    );
    let ok = created.len() as f64;
    prom.wait_for(
        r#"sum(fsb_create_stage_seconds_count{stage="total"})"#,
        ok,
        SCRAPED,
    )
    .await
    .unwrap();
    assert!(
        created.iter().any(|(_, _, path)| path == "warm"),
        "a warm instance was ready: {created:?}"
    );

    // The create histogram: every stage, by mode, runtime and path.
    let count = |sel: &'static str| {
        let prom = &prom;
        async move {
            prom.sum(&format!("sum(fsb_create_stage_seconds_count{{{sel}}})"))
                .await
                .unwrap()
        }
    };
    assert_eq!(count(r#"stage="total""#).await, ok);
    assert_eq!(count(r#"stage="total",mode="strong""#).await, 1.0);
    assert_eq!(count(r#"stage="record",mode="strong""#).await, 1.0);
    assert_eq!(
        count(r#"stage="record",mode="fast""#).await,
        0.0,
        "FAST records later"
    );
    for stage in ["validate", "allocate", "agent", "runtime"] {
        assert_eq!(
            prom.sum(&format!(
                r#"sum(fsb_create_stage_seconds_count{{stage="{stage}"}})"#
            ))
            .await
            .unwrap(),
            ok,
            "{stage}"
        );
    }
    let warm = created.iter().filter(|(_, _, p)| p == "warm").count() as f64;
    assert_eq!(
        count(r#"stage="total",path="warm",runtime="runc""#).await,
        warm
    );
    assert_eq!(
        count(r#"stage="total",path="cold",runtime="runc""#).await,
        ok - warm
    );
    // Observed values are seconds: a create took more than 0 and less than a minute.
    let total_sum = prom
        .sum(r#"sum(fsb_create_stage_seconds_sum{stage="total"})"#)
        .await
        .unwrap();
    assert!(total_sum > 0.0 && total_sum < 60.0 * ok, "{total_sum}");
    // It moved between the two batches (rates need two samples of a series).
    assert!(
        prom.sum(r#"sum(increase(fsb_create_stage_seconds_count{stage="total"}[5m]))"#)
            .await
            .unwrap()
            > 0.0
    );
    assert!(
        prom.sum(r#"sum(increase(fsb_creates_total{result="ok"}[5m]))"#)
            .await
            .unwrap()
            > 0.0
    );

    // Counters and gauges.
    assert_eq!(
        prom.sum(r#"sum(fsb_creates_total{result="ok"})"#)
            .await
            .unwrap(),
        ok
    );
    assert_eq!(
        prom.sum(r#"sum(fsb_creates_total{mode="fast",result="invalid_argument"})"#)
            .await
            .unwrap(),
        1.0
    );
    // A pull that cannot succeed (nothing listens on port 1) is counted as an error.
    let pull = tokio::process::Command::new(fsb_tests::local::fsb_bin())
        .arg("--data-dir")
        .arg(&up.data_dir)
        .args(["image", "pull", "127.0.0.1:1/fsb/none:1"])
        .output()
        .await
        .unwrap();
    assert!(!pull.status.success(), "{pull:?}");
    prom.wait_for(
        r#"sum(fsb_image_pulls_total{result="error"})"#,
        1.0,
        SCRAPED,
    )
    .await
    .unwrap();
    assert_eq!(
        prom.sum(r#"sum(fsb_image_pulls_total{result="ok"})"#)
            .await
            .unwrap(),
        0.0
    );
    let scraped = |expr: &'static str, min: f64| {
        let prom = &prom;
        async move { prom.wait_for(expr, min, SCRAPED).await.unwrap() }
    };
    scraped(
        r#"sum(fsb_registry_allocations_total{result="allocated"})"#,
        ok,
    )
    .await;
    scraped(r#"sum(fsb_registry_warm_total{result="hit"})"#, warm).await;
    scraped(r#"sum(fsb_sandboxes{phase="Running"})"#, ok).await;
    let used = format!(r#"sum(fsb_agent_slots{{agent="{agent}",state="used"}})"#);
    prom.wait_for(&used, ok, SCRAPED).await.unwrap();
    let capacity = prom
        .sum(&format!(r#"sum(fsb_agent_slots{{agent="{agent}"}})"#))
        .await
        .unwrap();
    assert_eq!(capacity, 256.0, "used + free = fsb up's default capacity");

    // No sandbox id or name is a label (nor anywhere in the exposition).
    let text = http
        .get(format!("http://{metrics}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for (name, id, _) in &created {
        assert!(!text.contains(id.as_str()), "sandbox id {id} in /metrics");
        assert!(
            !text.contains(&format!("\"{name}\"")),
            "sandbox name {name} in /metrics"
        );
    }

    // Every PromQL expression of the dashboard returns data.
    let exprs = dashboard_exprs();
    assert!(exprs.len() >= 10, "{exprs:?}");
    let mut empty = Vec::new();
    let queried = &prom;
    for expr in &exprs {
        let samples = wait_until(
            &format!("dashboard query {expr}"),
            Duration::from_secs(20),
            || async move {
                let s = queried.query(expr).await?;
                Ok((!s.is_empty()).then_some(s))
            },
        )
        .await;
        if let Err(e) = samples {
            empty.push(format!("{expr}: {e:#}"));
        }
    }
    assert!(
        empty.is_empty(),
        "dashboard queries without data: {empty:#?}"
    );

    prom.kill().await.unwrap();
    up.terminate(Duration::from_secs(60)).await.unwrap();
    assert!(
        !dir.join("up/metrics").exists(),
        "the metrics file goes with the process, like the endpoint file"
    );
    // --stop-sandboxes-on-exit: nothing of this agent is left in containerd.
    let rt = fsb_tests::container_runtime(&env).await.unwrap();
    let left = rt.list(Some(&agent)).await.unwrap();
    for o in &left {
        let _ = rt.remove(&o.id, Duration::ZERO).await;
    }
    assert!(
        left.is_empty(),
        "left behind: {:?}",
        left.iter().map(|o| &o.id).collect::<Vec<_>>()
    );
    let _ = std::fs::remove_dir_all(&dir);
}
