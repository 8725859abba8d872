//! The agent's connection to containerd: every request carries our namespace and a
//! deadline, and [`Containerd::call`] enforces that deadline locally too, so no
//! containerd call can hang an actor (seed-review items 7 and 10).

use std::{future::Future, path::PathBuf, time::Duration};

use containerd_client::{
    services::v1::{
        CreateRequest as CreateLeaseRequest, DeleteRequest as DeleteLeaseRequest,
        container::Runtime as ContainerRuntimeSpec, leases_client::LeasesClient,
    },
    tonic::{
        Request, Response, Status,
        metadata::{Ascii, MetadataValue},
        transport::Channel,
    },
};
use fsb_core::spec::Runtime;
use prost::Message;
use tracing::Instrument;

use crate::error::AgentError;

/// Shim every runtime goes through; [`RuncOptions::binary_name`] picks runc, crun or runsc.
pub const RUNC_SHIM: &str = "io.containerd.runc.v2";
/// Snapshotter for every sandbox (`native` costs ~250 ms per create).
pub const SNAPSHOTTER: &str = "overlayfs";
/// Default deadline of one containerd call.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(30);

const NAMESPACE_HEADER: &str = "containerd-namespace";
const LEASE_HEADER: &str = "containerd-lease";
const LEASE_EXPIRE_LABEL: &str = "containerd.io/gc.expire";
/// containerd 1.6 resolves runc options by this gogo name (no `types.googleapis.com/`).
const RUNC_OPTIONS_TYPE_URL: &str = "containerd.runc.v1.Options";

/// Where containerd is and how the agent talks to it.
#[derive(Clone, Debug)]
pub struct ContainerdConfig {
    /// containerd's gRPC socket.
    pub socket: PathBuf,
    /// containerd namespace of our containers (`fast-sandbox`).
    pub namespace: String,
    /// Deadline of one call.
    pub call_timeout: Duration,
    /// Parent of the OCI runtimes' state roots (`<root>/runc`, `<root>/crun`, `<root>/runsc`);
    /// never the system default, which another containerd may share.
    pub runtime_root: PathBuf,
    /// runsc binary or wrapper (adds `--network=host` or `--network=none`, which the runc
    /// shim cannot pass).
    pub runsc_binary: PathBuf,
}

/// The runc shim's options (`containerd.runc.v1.Options`); containerd-client does not
/// generate it, so the fields we set are declared with their proto tags.
#[derive(Clone, PartialEq, Message)]
pub struct RuncOptions {
    /// OCI runtime binary: runc, crun, or the runsc wrapper.
    #[prost(string, tag = "6")]
    pub binary_name: String,
    /// The runtime's state root (the shim appends `/<namespace>`).
    #[prost(string, tag = "7")]
    pub root: String,
}

/// A live, namespaced connection to containerd. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Containerd {
    channel: Channel,
    namespace: MetadataValue<Ascii>,
    config: ContainerdConfig,
}

impl Containerd {
    /// Connect to the socket (fails fast if nothing listens there).
    pub async fn connect(config: ContainerdConfig) -> Result<Self, AgentError> {
        let namespace = config
            .namespace
            .parse::<MetadataValue<Ascii>>()
            .map_err(|_| {
                AgentError::InvalidArgument(format!(
                    "namespace {:?} is not a valid header",
                    config.namespace
                ))
            })?;
        let connect = containerd_client::connect(&config.socket);
        let channel = match tokio::time::timeout(config.call_timeout, connect).await {
            Ok(Ok(channel)) => channel,
            Ok(Err(e)) => {
                return Err(AgentError::Unavailable(format!(
                    "{}: {e}",
                    config.socket.display()
                )));
            }
            Err(_) => {
                return Err(AgentError::Timeout {
                    op: "connect",
                    secs: config.call_timeout.as_secs(),
                });
            }
        };
        Ok(Self {
            channel,
            namespace,
            config,
        })
    }

    /// The underlying channel, for building service clients.
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    /// The configuration this connection was made with.
    pub fn config(&self) -> &ContainerdConfig {
        &self.config
    }

    /// `msg` as a request in our namespace with the default deadline.
    pub fn request<T>(&self, msg: T) -> Request<T> {
        self.request_with_timeout(msg, self.config.call_timeout)
    }

    /// `msg` as a request in our namespace with deadline `timeout`.
    pub fn request_with_timeout<T>(&self, msg: T, timeout: Duration) -> Request<T> {
        let mut req = Request::new(msg);
        req.metadata_mut()
            .insert(NAMESPACE_HEADER, self.namespace.clone());
        req.set_timeout(timeout);
        fsb_telemetry::trace::inject(req.metadata_mut());
        req
    }

    /// `msg` under lease `lease`: what it creates (content, snapshots) is safe from the
    /// garbage collector until the lease is deleted.
    pub fn leased_request<T>(&self, msg: T, lease: &str) -> Result<Request<T>, AgentError> {
        let mut req = self.request(msg);
        let value = lease.parse::<MetadataValue<Ascii>>().map_err(|_| {
            AgentError::InvalidArgument(format!("lease id {lease:?} is not a valid header"))
        })?;
        req.metadata_mut().insert(LEASE_HEADER, value);
        Ok(req)
    }

    /// Await a containerd call with the default deadline enforced locally as well.
    pub async fn call<T>(
        &self,
        op: &'static str,
        fut: impl Future<Output = Result<Response<T>, Status>>,
    ) -> Result<T, AgentError> {
        self.call_with_timeout(op, self.config.call_timeout, fut)
            .await
    }

    /// Await a containerd call, giving up after `timeout`.
    pub async fn call_with_timeout<T>(
        &self,
        op: &'static str,
        timeout: Duration,
        fut: impl Future<Output = Result<Response<T>, Status>>,
    ) -> Result<T, AgentError> {
        // One client span per containerd call: the innermost layer of a create's trace.
        let span = tracing::info_span!(
            "containerd",
            otel.name = op,
            otel.kind = "client",
            rpc.system = "grpc"
        );
        match tokio::time::timeout(timeout, fut).instrument(span).await {
            Ok(Ok(resp)) => Ok(resp.into_inner()),
            Ok(Err(status)) if status.code() == tonic::Code::DeadlineExceeded => {
                Err(AgentError::Timeout {
                    op,
                    secs: timeout.as_secs(),
                })
            }
            Ok(Err(status)) => Err(AgentError::containerd(op, status)),
            Err(_) => Err(AgentError::Timeout {
                op,
                secs: timeout.as_secs(),
            }),
        }
    }

    /// Create lease `id`, expiring after `lifetime` should we never delete it.
    pub async fn create_lease(&self, id: &str, lifetime: Duration) -> Result<(), AgentError> {
        let expire = humantime_rfc3339(std::time::SystemTime::now() + lifetime);
        let req = self.request(CreateLeaseRequest {
            id: id.to_owned(),
            labels: [(LEASE_EXPIRE_LABEL.to_owned(), expire)].into(),
        });
        let result: Result<containerd_client::services::v1::CreateResponse, AgentError> = self
            .call(
                "create lease",
                LeasesClient::new(self.channel()).create(req),
            )
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(e) if e.is_already_exists() => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Delete lease `id`; a missing lease is fine.
    pub async fn delete_lease(&self, id: &str) -> Result<(), AgentError> {
        let req = self.request(DeleteLeaseRequest {
            id: id.to_owned(),
            sync: false,
        });
        match self
            .call(
                "delete lease",
                LeasesClient::new(self.channel()).delete(req),
            )
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// The `Container.runtime` for `runtime`: the runc shim with the right binary and a
    /// state root of our own.
    pub fn runtime_spec(&self, runtime: Runtime) -> ContainerRuntimeSpec {
        let (binary, dir) = match runtime {
            Runtime::Runc => ("runc".to_owned(), "runc"),
            Runtime::Crun => ("crun".to_owned(), "crun"),
            Runtime::Gvisor => (self.config.runsc_binary.display().to_string(), "runsc"),
        };
        let options = RuncOptions {
            binary_name: binary,
            root: self.config.runtime_root.join(dir).display().to_string(),
        };
        ContainerRuntimeSpec {
            name: RUNC_SHIM.to_owned(),
            options: Some(prost_types::Any {
                type_url: RUNC_OPTIONS_TYPE_URL.to_owned(),
                value: options.encode_to_vec(),
            }),
        }
    }
}

/// RFC 3339 UTC timestamp (seconds precision), as containerd's GC labels expect.
fn humantime_rfc3339(t: std::time::SystemTime) -> String {
    let secs = t
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (h, m, s) = (rem / 3600, (rem % 3600) / 60, rem % 60);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(mo <= 2);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{m:02}:{s:02}Z")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_dates() {
        let t = std::time::UNIX_EPOCH + Duration::from_secs(1_795_000_000);
        assert_eq!(humantime_rfc3339(t), "2026-11-18T11:06:40Z");
        assert_eq!(
            humantime_rfc3339(std::time::UNIX_EPOCH),
            "1970-01-01T00:00:00Z"
        );
    }

    #[test]
    fn runc_options_use_their_proto_tags() {
        let bytes = RuncOptions {
            binary_name: "crun".into(),
            root: "/r".into(),
        }
        .encode_to_vec();
        // tag 6, wire type 2 = 0x32; tag 7 = 0x3a
        assert_eq!(bytes, [&[0x32, 4][..], b"crun", &[0x3a, 2], b"/r"].concat());
    }
}
