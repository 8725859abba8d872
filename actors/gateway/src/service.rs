//! The tonic services: `fastpath.v1.FastPath` over [`Gateway`], `fastpath.v1.Images`
//! over the local agent's image store, and the bearer-token check in front of both.

use std::{sync::Arc, time::Duration};

use fsb_agent::{AgentHandle, image::BlobKind, server::BoxStream};
use fsb_core::ImageRef;
use fsb_proto::fastpath::v1::{
    self as fp,
    fast_path_server::{FastPath, FastPathServer},
    images_server::{Images, ImagesServer},
};
use fsb_store::SandboxStore;
use futures::StreamExt;
use tonic::{Request, Response, Status, Streaming, service::interceptor::InterceptedService};
use tracing::Instrument;

use crate::{
    Gateway, GatewayError, RateLimit,
    auth::{Access, Authorizer, bearer},
};

/// Largest accepted request message (the Images Load chunks are 1 MiB).
pub const MAX_REQUEST_BYTES: usize = 4 * 1024 * 1024;

/// Checks `authorization: Bearer <token>` on every call (constant-time compare).
#[derive(Clone, Debug)]
pub struct TokenCheck {
    token: Option<Arc<str>>,
}

impl TokenCheck {
    /// Require `token`; `None` lets every call through (only for tests and when a
    /// proxy in front authenticates).
    pub fn new(token: Option<String>) -> Self {
        Self {
            token: token.map(Into::into),
        }
    }
}

impl tonic::service::Interceptor for TokenCheck {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let Some(want) = &self.token else {
            return Ok(req);
        };
        let got = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| {
                Status::unauthenticated(
                    "missing `authorization: Bearer <token>`; the token is in the data directory's `token` file",
                )
            })?;
        let (a, b) = (got.as_bytes(), want.as_bytes());
        let same =
            a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0;
        if same {
            Ok(req)
        } else {
            Err(Status::unauthenticated("invalid token"))
        }
    }
}

/// The client's deadline from its `grpc-timeout` header, if any.
pub fn grpc_timeout<T>(req: &Request<T>) -> Option<Duration> {
    let v = req.metadata().get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// `fastpath.v1.FastPath` over a gateway.
#[derive(Debug)]
pub struct FastPathService<S: SandboxStore> {
    gateway: Gateway<S>,
    /// Kubernetes mode: RBAC per call; None: the token check is all (local mode).
    authz: Option<Arc<dyn Authorizer>>,
}

impl<S: SandboxStore> FastPathService<S> {
    /// The tonic server, behind the per-client rate limit and then the token check
    /// (a flood is refused before any other work, unauthenticated or not); `authz`,
    /// when given, decides each call before the gateway sees it.
    pub fn server(
        gateway: Gateway<S>,
        auth: TokenCheck,
        authz: Option<Arc<dyn Authorizer>>,
        limit: RateLimit,
    ) -> InterceptedService<InterceptedService<FastPathServer<Self>, TokenCheck>, RateLimit> {
        let server = FastPathServer::new(Self { gateway, authz })
            .max_decoding_message_size(MAX_REQUEST_BYTES);
        InterceptedService::new(InterceptedService::new(server, auth), limit)
    }

    /// Whether this call's caller may do `access` (always, without an authorizer).
    async fn allow(
        &self,
        metadata: &tonic::metadata::MetadataMap,
        access: Access,
    ) -> Result<(), Status> {
        match &self.authz {
            None => Ok(()),
            Some(a) => a.authorize(bearer(metadata), access).await,
        }
    }
}

fn status(e: GatewayError) -> Status {
    e.into()
}

#[tonic::async_trait]
impl<S: SandboxStore> FastPath for FastPathService<S> {
    async fn create(
        &self,
        request: Request<fp::CreateRequest>,
    ) -> Result<Response<fp::CreateResponse>, Status> {
        let deadline = grpc_timeout(&request);
        self.allow(
            request.metadata(),
            Access::create(&request.get_ref().namespace),
        )
        .await?;
        let span = tracing::info_span!(
            "gateway.create",
            otel.kind = "server",
            request_id = %request.get_ref().request_id,
            namespace = %request.get_ref().namespace,
            name = %request.get_ref().name,
            trace_id = tracing::field::Empty,
        );
        fsb_telemetry::trace::set_remote_parent(&span, request.metadata());
        if let Some(id) = fsb_telemetry::trace::trace_id(&span) {
            span.record("trace_id", id);
        }
        // Instrument the future: `let _ = span.enter()` dropped the guard at once, and
        // an entered guard must not be held across awaits anyway.
        self.gateway
            .create(request.into_inner(), deadline)
            .instrument(span)
            .await
            .map(Response::new)
            .map_err(status)
    }

    async fn delete(
        &self,
        request: Request<fp::DeleteRequest>,
    ) -> Result<Response<fp::DeleteResponse>, Status> {
        let access = Access::sandbox(
            "delete",
            &request.get_ref().namespace,
            &request.get_ref().name,
        );
        self.allow(request.metadata(), access).await?;
        let r = request.into_inner();
        self.gateway
            .delete(&r.namespace, &r.name, r.grace_period_seconds)
            .await
            .map(|()| Response::new(fp::DeleteResponse {}))
            .map_err(status)
    }

    async fn get(&self, request: Request<fp::GetRequest>) -> Result<Response<fp::Sandbox>, Status> {
        let access = Access::sandbox("get", &request.get_ref().namespace, &request.get_ref().name);
        self.allow(request.metadata(), access).await?;
        let r = request.into_inner();
        self.gateway
            .get(&r.namespace, &r.name)
            .await
            .map(Response::new)
            .map_err(status)
    }

    async fn list(
        &self,
        request: Request<fp::ListRequest>,
    ) -> Result<Response<fp::ListResponse>, Status> {
        let access = Access::collection("list", "sandboxes", &request.get_ref().namespace);
        self.allow(request.metadata(), access).await?;
        let req = request.into_inner();
        let warm = self.gateway.warm_levels(&req).await.map_err(status)?;
        let sandboxes = self.gateway.list(req).await.map_err(status)?;
        Ok(Response::new(fp::ListResponse { sandboxes, warm }))
    }

    async fn update(
        &self,
        request: Request<fp::UpdateRequest>,
    ) -> Result<Response<fp::Sandbox>, Status> {
        let access = Access::sandbox(
            "update",
            &request.get_ref().namespace,
            &request.get_ref().name,
        );
        self.allow(request.metadata(), access).await?;
        self.gateway
            .update(request.into_inner())
            .await
            .map(Response::new)
            .map_err(status)
    }

    type WatchStream = BoxStream<fp::WatchEvent>;

    async fn watch(
        &self,
        request: Request<fp::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let access = Access::collection("watch", "sandboxes", &request.get_ref().namespace);
        self.allow(request.metadata(), access).await?;
        self.gateway
            .watch(request.into_inner())
            .await
            .map(Response::new)
            .map_err(status)
    }

    type ExecStream = BoxStream<fp::ExecResponse>;

    async fn exec(
        &self,
        request: Request<Streaming<fp::ExecRequest>>,
    ) -> Result<Response<Self::ExecStream>, Status> {
        let (metadata, _, mut input) = request.into_parts();
        let start = match input.message().await? {
            Some(fp::ExecRequest {
                msg: Some(fp::exec_request::Msg::Start(start)),
            }) => start,
            _ => {
                return Err(Status::invalid_argument(
                    "exec: the first message must be `start`",
                ));
            }
        };
        self.allow(&metadata, Access::exec(&start.namespace, &start.name))
            .await?;
        self.gateway
            .exec(start, Box::pin(input))
            .await
            .map(Response::new)
            .map_err(status)
    }

    type LogsStream = BoxStream<fp::LogChunk>;

    async fn logs(
        &self,
        request: Request<fp::LogsRequest>,
    ) -> Result<Response<Self::LogsStream>, Status> {
        let access = Access::logs(&request.get_ref().namespace, &request.get_ref().name);
        self.allow(request.metadata(), access).await?;
        self.gateway
            .logs(request.into_inner())
            .await
            .map(Response::new)
            .map_err(status)
    }

    async fn usage(
        &self,
        request: Request<fp::UsageRequest>,
    ) -> Result<Response<fp::UsageResponse>, Status> {
        // Usage shows pools and their agents: list on sandboxpools.
        let access = Access::collection("list", "sandboxpools", &request.get_ref().namespace);
        self.allow(request.metadata(), access).await?;
        self.gateway
            .usage(request.get_ref())
            .await
            .map(Response::new)
            .map_err(status)
    }
}

/// `fastpath.v1.Images` over the local agent's image store (local mode).
#[derive(Debug)]
pub struct LocalImages {
    agent: AgentHandle,
    /// Where uploaded archives are staged before loading.
    staging: std::path::PathBuf,
}

impl LocalImages {
    /// The tonic server, behind the rate limit (shared with the fast path: one budget
    /// per client) and the token check. Uploads are staged in `staging`.
    pub fn server(
        agent: AgentHandle,
        staging: std::path::PathBuf,
        auth: TokenCheck,
        limit: RateLimit,
    ) -> InterceptedService<InterceptedService<ImagesServer<Self>, TokenCheck>, RateLimit> {
        let server =
            ImagesServer::new(Self { agent, staging }).max_decoding_message_size(MAX_REQUEST_BYTES);
        InterceptedService::new(InterceptedService::new(server, auth), limit)
    }
}

fn info(i: &fsb_agent::image::ImageRecord) -> fp::ImageInfo {
    fp::ImageInfo {
        name: i.name.clone(),
        digest: i.target_digest.clone(),
        size_bytes: i.size,
        in_use: false,
    }
}

fn kind(k: BlobKind) -> &'static str {
    match k {
        BlobKind::Index => "index",
        BlobKind::Manifest => "manifest",
        BlobKind::Config => "config",
        BlobKind::Layer => "layer",
    }
}

fn agent_status(e: &fsb_agent::AgentError) -> Status {
    fsb_core::error::to_status(e)
}

#[tonic::async_trait]
impl Images for LocalImages {
    type PullStream = BoxStream<fp::PullImageProgress>;

    async fn pull(
        &self,
        request: Request<fp::PullImageRequest>,
    ) -> Result<Response<Self::PullStream>, Status> {
        let r = request.into_inner();
        let reference =
            ImageRef::parse("image", &r.image).map_err(|e| fsb_core::error::to_status(&e))?;
        let auth = (!r.username.is_empty()).then(|| fsb_agent::image::RegistryAuth {
            username: r.username.clone(),
            password: r.password.clone(),
        });
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let agent = self.agent.clone();
        tokio::spawn(async move {
            let progress = tx.clone();
            let result = agent
                .images()
                .pull(&reference, auth, move |p| {
                    let _ = progress.send(Ok(fp::PullImageProgress {
                        msg: Some(fp::pull_image_progress::Msg::Blob(fp::BlobProgress {
                            digest: p.digest,
                            kind: kind(p.kind).to_owned(),
                            done: p.done,
                            total: p.total,
                            cached: p.cached,
                        })),
                    }));
                })
                .await;
            let _ = tx.send(match result {
                Ok(rec) => Ok(fp::PullImageProgress {
                    msg: Some(fp::pull_image_progress::Msg::Done(info(&rec))),
                }),
                Err(e) => Err(agent_status(&e)),
            });
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::UnboundedReceiverStream::new(rx),
        )))
    }

    async fn load(
        &self,
        request: Request<Streaming<fp::LoadImageChunk>>,
    ) -> Result<Response<fp::ImageInfo>, Status> {
        use tokio::io::AsyncWriteExt;
        let mut input = request.into_inner();
        tokio::fs::create_dir_all(&self.staging)
            .await
            .map_err(|e| Status::internal(format!("{}: {e}", self.staging.display())))?;
        let path = self
            .staging
            .join(format!("upload-{}.tar", uuid::Uuid::new_v4()));
        let result = async {
            let mut file = tokio::fs::File::create(&path)
                .await
                .map_err(|e| Status::internal(format!("{}: {e}", path.display())))?;
            let mut name = None;
            let mut first = true;
            while let Some(chunk) = input.next().await {
                let chunk = chunk?;
                if first {
                    first = false;
                    if !chunk.name.is_empty() {
                        name = Some(
                            ImageRef::parse("name", &chunk.name)
                                .map_err(|e| fsb_core::error::to_status(&e))?,
                        );
                    }
                }
                file.write_all(&chunk.data)
                    .await
                    .map_err(|e| Status::internal(format!("{}: {e}", path.display())))?;
            }
            file.flush()
                .await
                .map_err(|e| Status::internal(format!("{}: {e}", path.display())))?;
            if first {
                return Err(Status::invalid_argument("load: no archive data was sent"));
            }
            let rec = self
                .agent
                .images()
                .load_archive(&path, name.as_ref())
                .await
                .map_err(|e| agent_status(&e))?;
            Ok(info(&rec))
        }
        .await;
        let _ = tokio::fs::remove_file(&path).await;
        result.map(Response::new)
    }

    async fn list(
        &self,
        _request: Request<fp::ListImagesRequest>,
    ) -> Result<Response<fp::ListImagesResponse>, Status> {
        let images = self
            .agent
            .images()
            .list()
            .await
            .map_err(|e| agent_status(&e))?;
        Ok(Response::new(fp::ListImagesResponse {
            images: images
                .into_iter()
                .map(|i| fp::ImageInfo {
                    name: i.name,
                    digest: i.digest,
                    size_bytes: i.size,
                    in_use: false,
                })
                .collect(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::service::Interceptor;

    fn with(header: Option<&str>) -> Request<()> {
        let mut r = Request::new(());
        if let Some(h) = header {
            r.metadata_mut().insert("authorization", h.parse().unwrap());
        }
        r
    }

    #[test]
    fn token_check() {
        let mut check = TokenCheck::new(Some("s3cret".into()));
        assert!(check.call(with(Some("Bearer s3cret"))).is_ok());
        for bad in [
            None,
            Some("Bearer s3cre"),
            Some("Bearer s3cretx"),
            Some("s3cret"),
        ] {
            let e = check.call(with(bad)).unwrap_err();
            assert_eq!(e.code(), tonic::Code::Unauthenticated, "{bad:?}");
        }
        assert!(TokenCheck::new(None).call(with(None)).is_ok());
    }

    #[test]
    fn grpc_timeout_units() {
        let mut r = Request::new(());
        for (v, d) in [
            ("5S", Duration::from_secs(5)),
            ("250m", Duration::from_millis(250)),
            ("2M", Duration::from_secs(120)),
            ("7u", Duration::from_micros(7)),
        ] {
            r.metadata_mut().insert("grpc-timeout", v.parse().unwrap());
            assert_eq!(grpc_timeout(&r), Some(d), "{v}");
        }
        r.metadata_mut()
            .insert("grpc-timeout", "5x".parse().unwrap());
        assert_eq!(grpc_timeout(&r), None);
    }
}
