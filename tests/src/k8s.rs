//! The harness's API server as the Kubernetes tests reach it (`tests/run.sh k8s`
//! exports FSB_K8S_SERVER, FSB_K8S_CA, FSB_K8S_TOKEN, FSB_KUBECONFIG): a REST client
//! with the admin token, returning status code and JSON body, so tests assert on both;
//! and [`kube_config`], the same server for code that takes a `kube::Client`.

use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::Value;

/// An authenticated client of the test API server.
#[derive(Debug)]
pub struct KubeApi {
    http: reqwest::Client,
    server: String,
    token: String,
}

impl KubeApi {
    /// From the environment `tests/run.sh k8s` sets.
    pub fn from_env() -> Result<Self> {
        let var =
            |k: &str| std::env::var(k).with_context(|| format!("{k} is set by tests/run.sh k8s"));
        let ca = std::fs::read(var("FSB_K8S_CA")?)?;
        let http = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(&ca)?)
            .timeout(Duration::from_secs(30))
            .build()?;
        Ok(Self {
            http,
            server: var("FSB_K8S_SERVER")?,
            token: var("FSB_K8S_TOKEN")?,
        })
    }

    /// `method path` with an optional JSON body: (HTTP status, JSON body or null).
    pub async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(u16, Value)> {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.server))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            req = req
                .header("content-type", "application/json")
                .body(serde_json::to_vec(b)?);
        }
        let resp = req.send().await?;
        let code = resp.status().as_u16();
        let bytes = resp.bytes().await?;
        Ok((code, serde_json::from_slice(&bytes).unwrap_or(Value::Null)))
    }

    /// POST `body` to `path`.
    pub async fn post(&self, path: &str, body: &Value) -> Result<(u16, Value)> {
        self.send(reqwest::Method::POST, path, Some(body)).await
    }
}

/// The admin's `kube::Config` for the test API server, from FSB_KUBECONFIG. Tests may
/// change `cluster_url` (e.g. to a proxy on 127.0.0.1: the server certificate names
/// that address).
pub async fn kube_config() -> Result<kube::Config> {
    let path =
        std::env::var("FSB_KUBECONFIG").context("FSB_KUBECONFIG is set by tests/run.sh k8s")?;
    let kubeconfig =
        kube::config::Kubeconfig::read_from(&path).with_context(|| format!("reading {path}"))?;
    Ok(kube::Config::from_custom_kubeconfig(
        kubeconfig,
        &kube::config::KubeConfigOptions::default(),
    )
    .await?)
}

/// A `kube::Client` of the test API server (the admin context of FSB_KUBECONFIG).
pub async fn kube_client() -> Result<kube::Client> {
    Ok(kube::Client::try_from(kube_config().await?)?)
}
