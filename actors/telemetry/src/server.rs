//! The `/metrics` endpoint: HTTP/1.1 (hyper), one task per connection.

use std::{
    convert::Infallible, future::Future, net::SocketAddr, pin::Pin, sync::Arc, time::Duration,
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Incoming, header};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::{Metrics, TelemetryError, metrics};

/// Longest a scrape hook may run; a slower one is abandoned for this scrape (the
/// families it feeds keep their previous values).
pub const HOOK_TIMEOUT: Duration = Duration::from_secs(5);

type BoxFuture = Pin<Box<dyn Future<Output = ()> + Send>>;
type Hook = Arc<dyn Fn() -> BoxFuture + Send + Sync>;

struct Shared {
    metrics: &'static Metrics,
    hooks: Vec<(&'static str, Hook)>,
    hook_timeout: Duration,
    /// One scrape at a time: hooks replace whole families (clear, then set).
    scrape: tokio::sync::Mutex<()>,
}

/// A bound `/metrics` endpoint; [`Self::run`] serves it.
pub struct MetricsServer {
    listener: TcpListener,
    addr: SocketAddr,
    shared: Shared,
}

impl std::fmt::Debug for MetricsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsServer")
            .field("addr", &self.addr)
            .field(
                "hooks",
                &self
                    .shared
                    .hooks
                    .iter()
                    .map(|(n, _)| *n)
                    .collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl MetricsServer {
    /// Bind `addr` (port 0 picks a free one) for the process-wide [`metrics`].
    pub async fn bind(addr: SocketAddr) -> Result<Self, TelemetryError> {
        Self::bind_with(addr, metrics()).await
    }

    /// Bind `addr` for another set of metrics (tests).
    pub async fn bind_with(
        addr: SocketAddr,
        metrics: &'static Metrics,
    ) -> Result<Self, TelemetryError> {
        let bind = |source| TelemetryError::Bind { addr, source };
        let listener = TcpListener::bind(addr).await.map_err(bind)?;
        let addr = listener.local_addr().map_err(bind)?;
        Ok(Self {
            listener,
            addr,
            shared: Shared {
                metrics,
                hooks: Vec::new(),
                hook_timeout: HOOK_TIMEOUT,
                scrape: tokio::sync::Mutex::new(()),
            },
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Run `hook` before each render (bounded by [`HOOK_TIMEOUT`]): it copies counts
    /// a component keeps itself into the metrics.
    pub fn on_scrape<F, Fut>(mut self, name: &'static str, f: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let hook: Hook = Arc::new(move || -> BoxFuture { Box::pin(f()) });
        self.shared.hooks.push((name, hook));
        self
    }

    /// Abandon a hook after `timeout` instead of [`HOOK_TIMEOUT`].
    pub fn hook_timeout(mut self, timeout: Duration) -> Self {
        self.shared.hook_timeout = timeout;
        self
    }

    /// Serve until `shutdown` resolves. Logs `metrics listening on ADDR` once.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let Self {
            listener,
            addr,
            shared,
        } = self;
        let shared = Arc::new(shared);
        tracing::info!("metrics listening on {addr}");
        let accept = async {
            loop {
                let stream = match listener.accept().await {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // Out of file descriptors and the like: try again shortly.
                        tracing::warn!(error = %e, "metrics listener accept");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let shared = shared.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let shared = shared.clone();
                        let (method, path) = (req.method().clone(), req.uri().path().to_owned());
                        async move { Ok::<_, Infallible>(answer(&shared, &method, &path).await) }
                    });
                    if let Err(e) = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await
                    {
                        tracing::debug!(error = %e, "metrics connection");
                    }
                });
            }
        };
        tokio::select! {
            _ = accept => {}
            () = shutdown => {}
        }
    }
}

/// Serve the process-wide metrics on `addr` (no hooks) for the rest of the process:
/// the `--metrics-listen` of binaries whose counters are all kept in place. Returns
/// the bound address.
pub async fn serve_in_background(addr: SocketAddr) -> Result<SocketAddr, TelemetryError> {
    let server = MetricsServer::bind(addr).await?;
    let bound = server.local_addr();
    tokio::spawn(server.run(std::future::pending()));
    Ok(bound)
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

async fn answer(shared: &Shared, method: &Method, path: &str) -> Response<Full<Bytes>> {
    if path != "/metrics" {
        return text(
            StatusCode::NOT_FOUND,
            "not found; metrics are at /metrics\n",
        );
    }
    let head = *method == Method::HEAD;
    if !head && *method != Method::GET {
        let mut resp = text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n");
        resp.headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return resp;
    }
    let body = {
        let _one = shared.scrape.lock().await;
        for (name, hook) in &shared.hooks {
            if tokio::time::timeout(shared.hook_timeout, hook())
                .await
                .is_err()
            {
                tracing::warn!(hook = *name, "metrics hook timed out; its values are stale");
            }
        }
        shared.metrics.render()
    };
    let mut resp = text(StatusCode::OK, if head { String::new() } else { body });
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
    );
    resp
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;

    fn leaked() -> &'static Metrics {
        Box::leak(Box::new(Metrics::new()))
    }

    async fn start(
        metrics: &'static Metrics,
        hooks: impl FnOnce(MetricsServer) -> MetricsServer,
    ) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
        let server = MetricsServer::bind_with(SocketAddr::from(([127, 0, 0, 1], 0)), metrics)
            .await
            .unwrap();
        let server = hooks(server);
        let addr = server.local_addr();
        assert_ne!(addr.port(), 0);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(server.run(async {
            let _ = rx.await;
        }));
        (addr, tx)
    }

    #[tokio::test]
    async fn serves_metrics_runs_hooks_and_404s_other_paths() {
        let metrics = leaked();
        let scrapes = Arc::new(AtomicU64::new(0));
        let counted = scrapes.clone();
        let (addr, stop) = start(metrics, |s| {
            s.on_scrape("test", move || {
                let counted = counted.clone();
                async move {
                    // A hook copying a count kept elsewhere, as the registry's does.
                    let n = counted.fetch_add(1, Ordering::Relaxed) + 1;
                    metrics.registry_events.set("moved", n * 10);
                }
            })
        })
        .await;
        metrics.count_create("strong", Ok(()));
        let client = reqwest::Client::new();
        let resp = client
            .get(format!("http://{addr}/metrics"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(
            resp.headers()["content-type"],
            "text/plain; version=0.0.4; charset=utf-8"
        );
        let body = resp.text().await.unwrap();
        assert!(
            body.contains("fsb_creates_total{mode=\"strong\",result=\"ok\"} 1\n"),
            "{body}"
        );
        assert!(
            body.contains("fsb_registry_events_total{event=\"moved\"} 10\n"),
            "the hook ran before the render: {body}"
        );

        for path in ["/", "/metric", "/metrics/x", "/favicon.ico"] {
            let resp = client
                .get(format!("http://{addr}{path}"))
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 404, "{path}");
        }
        let resp = client
            .post(format!("http://{addr}/metrics"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 405);
        assert_eq!(
            scrapes.load(Ordering::Relaxed),
            1,
            "only GET /metrics scrapes"
        );

        stop.send(()).unwrap();
        let refused = async {
            while tokio::net::TcpStream::connect(addr).await.is_ok() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), refused)
            .await
            .expect("the listener closes after shutdown");
    }

    #[tokio::test]
    async fn a_stuck_hook_is_abandoned_and_the_scrape_answers() {
        let (addr, _stop) = start(leaked(), |s| {
            s.on_scrape("stuck", std::future::pending::<()>)
                .hook_timeout(Duration::from_millis(50))
        })
        .await;
        let resp = tokio::time::timeout(
            Duration::from_secs(5),
            reqwest::Client::new()
                .get(format!("http://{addr}/metrics"))
                .send(),
        )
        .await
        .expect("answered within the hook timeout, not never")
        .unwrap();
        assert_eq!(resp.status(), 200);
        assert!(resp.text().await.unwrap().contains("fsb_creates_total"));
    }

    #[tokio::test]
    async fn bind_error_names_the_address() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let err = MetricsServer::bind(addr).await.unwrap_err();
        assert!(
            err.to_string()
                .starts_with(&format!("metrics listener {addr}: ")),
            "{err}"
        );
    }
}
