//! A real Prometheus (Debian's `prometheus` package) for the metrics tests: started
//! with a generated config that scrapes the given targets every second, its own TSDB
//! directory and a free loopback port, queried through its HTTP API, killed (by pid)
//! when dropped.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use anyhow::{Context, Result, bail};
use tokio::process::{Child, Command};

use crate::{local::free_port, wait_until};

/// The prometheus binary: `FSB_PROMETHEUS_BIN`, else Debian's `/usr/bin/prometheus`
/// (installed by `tests/run.sh`).
pub fn prometheus_bin() -> PathBuf {
    std::env::var_os("FSB_PROMETHEUS_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/prometheus"))
}

/// One sample of an instant query.
#[derive(Clone, Debug)]
pub struct Sample {
    /// Its labels (`__name__` included when the expression keeps it).
    pub labels: BTreeMap<String, String>,
    /// Its value (NaN is a value: a ratio of zero rates).
    pub value: f64,
}

/// A running Prometheus.
#[derive(Debug)]
pub struct Prometheus {
    child: Child,
    /// Its HTTP API, `http://127.0.0.1:PORT`.
    pub url: String,
    dir: PathBuf,
    http: reqwest::Client,
}

impl Prometheus {
    /// Start Prometheus in `dir` (config, TSDB and log there) scraping `targets`
    /// (`/metrics`) every second as job `job`; returns once it is ready.
    pub async fn start(dir: &Path, job: &str, targets: &[SocketAddr]) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let targets = targets
            .iter()
            .map(|t| format!("\"{t}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: {job}\n    static_configs:\n      - targets: [{targets}]\n"
            ),
        )?;
        let port = free_port()?;
        let log = std::fs::File::create(dir.join("prometheus.log"))?;
        let child = Command::new(prometheus_bin())
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", prometheus_bin().display()))?;
        let mut prom = Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
            dir: dir.to_owned(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()?,
        };
        let ready = wait_until("prometheus to be ready", Duration::from_secs(60), || {
            let (http, url) = (prom.http.clone(), prom.url.clone());
            async move {
                let resp = http.get(format!("{url}/-/ready")).send().await?;
                Ok(resp.status().is_success().then_some(()))
            }
        })
        .await;
        if let Err(e) = ready {
            let log = prom.log();
            let _ = prom.child.start_kill();
            bail!("{e}; prometheus log:\n{log}");
        }
        Ok(prom)
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    /// An instant query (`/api/v1/query`); an error for a failed or non-vector answer.
    pub async fn query(&self, expr: &str) -> Result<Vec<Sample>> {
        let resp = self
            .http
            .get(format!("{}/api/v1/query", self.url))
            .query(&[("query", expr)])
            .send()
            .await?;
        let status = resp.status();
        let body: serde_json::Value = serde_json::from_str(&resp.text().await?)?;
        if !status.is_success() || body["status"] != "success" {
            bail!("query {expr:?}: HTTP {status}: {body}");
        }
        let data = &body["data"];
        let samples = match data["resultType"].as_str() {
            Some("vector") => data["result"].as_array().cloned().unwrap_or_default(),
            Some("scalar") => vec![serde_json::json!({"metric": {}, "value": data["result"]})],
            other => bail!("query {expr:?}: result type {other:?}"),
        };
        samples
            .into_iter()
            .map(|s| {
                let labels = s["metric"]
                    .as_object()
                    .map(|m| {
                        m.iter()
                            .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                            .collect()
                    })
                    .unwrap_or_default();
                let value = s["value"][1]
                    .as_str()
                    .with_context(|| format!("query {expr:?}: sample without value: {s}"))?;
                let value = match value {
                    "NaN" => f64::NAN,
                    "+Inf" => f64::INFINITY,
                    "-Inf" => f64::NEG_INFINITY,
                    v => v.parse()?,
                };
                Ok(Sample { labels, value })
            })
            .collect()
    }

    /// The sum of an instant query's values (0 when it returns nothing).
    pub async fn sum(&self, expr: &str) -> Result<f64> {
        Ok(self.query(expr).await?.iter().map(|s| s.value).sum())
    }

    /// Wait until `sum(expr)` is at least `min` (Prometheus has scraped it).
    pub async fn wait_for(&self, expr: &str, min: f64, timeout: Duration) -> Result<f64> {
        wait_until(
            &format!("prometheus: {expr} >= {min}"),
            timeout,
            || async move {
                let v = self.sum(expr).await?;
                Ok((v >= min).then_some(v))
            },
        )
        .await
    }

    /// Kill it (SIGKILL, by pid) and reap it.
    pub async fn kill(&mut self) -> Result<()> {
        self.child.start_kill()?;
        self.child.wait().await?;
        Ok(())
    }
}
