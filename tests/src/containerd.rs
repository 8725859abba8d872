//! The private containerd that `tests/run.sh containerd` starts, as tests see it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use containerd_client::services::v1::container::Runtime;
use containerd_client::services::v1::containers_client::ContainersClient;
use containerd_client::services::v1::leases_client::LeasesClient;
use containerd_client::services::v1::snapshots::RemoveSnapshotRequest;
use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::tasks_client::TasksClient;
use containerd_client::services::v1::{
    CreateRequest as CreateLeaseRequest, DeleteContainerRequest,
    DeleteRequest as DeleteLeaseRequest, DeleteTaskRequest, KillRequest, WaitRequest,
};
use containerd_client::tonic::metadata::{Ascii, MetadataValue};
use containerd_client::tonic::transport::Channel;
use containerd_client::tonic::{Code, Request, Status};
use prost::Message;

/// Runtime name of the runc shim (`containerd-shim-runc-v2`). runc, crun and gVisor all
/// run through it; [`RuncOptions::binary_name`] picks the OCI runtime binary.
pub const RUNC_SHIM: &str = "io.containerd.runc.v2";

/// The only snapshotter the harness uses (`native` costs ~250 ms per create).
pub const SNAPSHOTTER: &str = "overlayfs";

/// gRPC metadata key carrying the containerd namespace of a request.
const NAMESPACE_HEADER: &str = "containerd-namespace";

/// gRPC metadata key putting the resources a request creates (snapshots, content)
/// under a lease, which keeps the garbage collector off them.
const LEASE_HEADER: &str = "containerd-lease";

/// Label after which containerd's GC drops a lease a crashed test left behind.
const LEASE_EXPIRE_LABEL: &str = "containerd.io/gc.expire";
const LEASE_LIFETIME: Duration = Duration::from_secs(3600);

/// Type URL containerd 1.6 resolves runc shim options by (gogo-registered name, no
/// `types.googleapis.com/` prefix).
const RUNC_OPTIONS_TYPE_URL: &str = "containerd.runc.v1.Options";

const HINT: &str = "run tests/run.sh containerd (it starts a private containerd and sets FSB_CONTAINERD_SOCKET, FSB_TEST_IMAGE, ...)";

/// The runc shim's options message (`containerd.runc.v1.Options`,
/// `api/types/runc/options/oci.proto`). containerd-client does not generate it, so
/// the fields the harness uses are declared here with their proto tags.
#[derive(Clone, PartialEq, Message)]
pub struct RuncOptions {
    /// Disable pivot_root when creating a container.
    #[prost(bool, tag = "1")]
    pub no_pivot_root: bool,
    /// Do not create a new session keyring.
    #[prost(bool, tag = "2")]
    pub no_new_keyring: bool,
    /// Cgroup to place the shim in.
    #[prost(string, tag = "3")]
    pub shim_cgroup: String,
    /// Uid owning the I/O pipes.
    #[prost(uint32, tag = "4")]
    pub io_uid: u32,
    /// Gid owning the I/O pipes.
    #[prost(uint32, tag = "5")]
    pub io_gid: u32,
    /// OCI runtime binary (name on PATH or absolute path): runc, crun, runsc.
    #[prost(string, tag = "6")]
    pub binary_name: String,
    /// The runtime's state root; the shim appends `/<namespace>`. Default
    /// `/run/containerd/runc`, shared with the system containerd, so always set it.
    #[prost(string, tag = "7")]
    pub root: String,
    /// Use systemd cgroups.
    #[prost(bool, tag = "9")]
    pub systemd_cgroup: bool,
}

impl RuncOptions {
    /// The options as the `Any` that `Container.runtime.options` carries.
    pub fn to_any(&self) -> prost_types::Any {
        prost_types::Any {
            type_url: RUNC_OPTIONS_TYPE_URL.to_owned(),
            value: self.encode_to_vec(),
        }
    }
}

/// The OCI runtimes a test can ask for; all go through [`RUNC_SHIM`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TestRuntime {
    /// runc (the default).
    Runc,
    /// crun.
    Crun,
    /// gVisor: runsc through a wrapper that adds `--network=none` (see
    /// `tests/scripts/containerd.sh`).
    Gvisor,
}

impl TestRuntime {
    /// Every runtime, for tests that loop over them.
    pub const ALL: [TestRuntime; 3] = [TestRuntime::Runc, TestRuntime::Crun, TestRuntime::Gvisor];

    /// Short name, also the directory name of its state root.
    pub fn name(self) -> &'static str {
        match self {
            TestRuntime::Runc => "runc",
            TestRuntime::Crun => "crun",
            TestRuntime::Gvisor => "runsc",
        }
    }
}

/// The ready containerd and test image prepared by `tests/run.sh containerd`.
#[derive(Debug, Clone)]
pub struct ContainerdEnv {
    /// containerd's gRPC socket.
    pub socket: PathBuf,
    /// containerd namespace of every test container (`fast-sandbox`).
    pub namespace: String,
    /// Reference of the imported busybox test image, as containerd names it.
    pub image: String,
    /// The OCI archive the image was imported from, if known.
    pub image_archive: Option<PathBuf>,
    /// The harness run directory (containerd root/state live below it).
    pub run_dir: PathBuf,
    /// Parent of the runtimes' state roots (`<runtime_root>/<runc|crun|runsc>`).
    pub runtime_root: PathBuf,
    /// The runsc wrapper (`runsc --network=none "$@"`).
    pub runsc: PathBuf,
    namespace_header: MetadataValue<Ascii>,
}

impl ContainerdEnv {
    /// The environment from the variables `tests/run.sh` exports.
    ///
    /// # Panics
    /// When the harness did not set them, with a message saying to run
    /// `tests/run.sh containerd`.
    pub fn from_env() -> Self {
        match Self::try_from_env() {
            Ok(env) => env,
            Err(err) => panic!("{err:#}"),
        }
    }

    /// Like [`ContainerdEnv::from_env`], as an error.
    pub fn try_from_env() -> Result<Self> {
        let var = |name: &str| -> Result<String> {
            std::env::var(name)
                .ok()
                .filter(|v| !v.is_empty())
                .with_context(|| format!("{name} is not set: {HINT}"))
        };
        let socket = PathBuf::from(var("FSB_CONTAINERD_SOCKET")?);
        let image = var("FSB_TEST_IMAGE")?;
        let run_dir =
            PathBuf::from(var("FSB_TEST_RUN_DIR").unwrap_or_else(|_| "/tmp/fsb-test".into()));
        let runtime_root = var("FSB_RUNTIME_ROOT")
            .map(PathBuf::from)
            .unwrap_or_else(|_| run_dir.join("runtime"));
        let runsc = var("FSB_TEST_RUNSC")
            .map(PathBuf::from)
            .unwrap_or_else(|_| run_dir.join("bin/runsc-netnone"));
        let namespace = var("FSB_CONTAINERD_NAMESPACE")
            .unwrap_or_else(|_| fsb_core::labels::CONTAINERD_NAMESPACE.to_owned());
        let image_archive = var("FSB_TEST_IMAGE_ARCHIVE").ok().map(PathBuf::from);
        Self::new(
            socket,
            namespace,
            image,
            run_dir,
            runtime_root,
            runsc,
            image_archive,
        )
    }

    /// An environment from explicit values.
    pub fn new(
        socket: PathBuf,
        namespace: String,
        image: String,
        run_dir: PathBuf,
        runtime_root: PathBuf,
        runsc: PathBuf,
        image_archive: Option<PathBuf>,
    ) -> Result<Self> {
        if !socket.exists() {
            bail!(
                "containerd socket {} does not exist: {HINT}",
                socket.display()
            );
        }
        let namespace_header = namespace
            .parse::<MetadataValue<Ascii>>()
            .with_context(|| format!("namespace {namespace:?} is not a valid header value"))?;
        Ok(Self {
            socket,
            namespace,
            image,
            image_archive,
            run_dir,
            runtime_root,
            runsc,
            namespace_header,
        })
    }

    /// One channel to containerd; clone it for every service client.
    pub async fn connect(&self) -> Result<Channel> {
        containerd_client::connect(&self.socket)
            .await
            .with_context(|| format!("connecting to containerd at {}", self.socket.display()))
    }

    /// `msg` as a request in the test namespace (containerd rejects requests without
    /// the `containerd-namespace` header for namespaced services).
    pub fn request<T>(&self, msg: T) -> Request<T> {
        let mut req = Request::new(msg);
        req.metadata_mut()
            .insert(NAMESPACE_HEADER, self.namespace_header.clone());
        req
    }

    /// `msg` as a request in the test namespace under lease `lease`.
    pub fn leased_request<T>(&self, msg: T, lease: &str) -> Result<Request<T>> {
        let mut req = self.request(msg);
        let value = lease
            .parse::<MetadataValue<Ascii>>()
            .with_context(|| format!("lease id {lease:?} is not a valid header value"))?;
        req.metadata_mut().insert(LEASE_HEADER, value);
        Ok(req)
    }

    /// Creates lease `id` (expiring in an hour, should the test never delete it).
    ///
    /// A snapshot prepared through the snapshots API belongs to nothing until a
    /// container names it, and containerd's GC (which runs right after any deletion)
    /// removes unreferenced snapshots: without a lease a concurrent deletion can make
    /// the snapshot vanish between Prepare and Tasks.Create ("failed to mount rootfs
    /// component ... no such file or directory"). [`ContainerdEnv::remove_container`]
    /// deletes the lease named after the container.
    pub async fn create_lease(&self, channel: &Channel, id: &str) -> Result<()> {
        let expire = prost_types::Timestamp::from(std::time::SystemTime::now() + LEASE_LIFETIME);
        LeasesClient::new(channel.clone())
            .create(self.request(CreateLeaseRequest {
                id: id.to_owned(),
                labels: [(LEASE_EXPIRE_LABEL.to_owned(), expire.to_string())].into(),
            }))
            .await
            .with_context(|| format!("creating lease {id}"))?;
        Ok(())
    }

    /// The state root handed to `runtime` (the shim appends `/<namespace>`).
    pub fn runtime_state_root(&self, runtime: TestRuntime) -> PathBuf {
        self.runtime_root.join(runtime.name())
    }

    /// Where `runtime` keeps the state of this namespace's containers while they exist
    /// (`<id>/state.json` for runc, `<id>/status` for crun, `<id>_sandbox:<id>.state` for
    /// runsc): lets a test prove which runtime ran a container.
    pub fn runtime_state_dir(&self, runtime: TestRuntime) -> PathBuf {
        self.runtime_state_root(runtime).join(&self.namespace)
    }

    /// The runc shim options selecting `runtime`.
    pub fn runc_options(&self, runtime: TestRuntime) -> RuncOptions {
        let binary_name = match runtime {
            TestRuntime::Runc => "runc".to_owned(),
            TestRuntime::Crun => "crun".to_owned(),
            TestRuntime::Gvisor => self.runsc.display().to_string(),
        };
        RuncOptions {
            binary_name,
            root: self.runtime_state_root(runtime).display().to_string(),
            ..RuncOptions::default()
        }
    }

    /// `Container.runtime` for `runtime`.
    pub fn container_runtime(&self, runtime: TestRuntime) -> Runtime {
        Runtime {
            name: RUNC_SHIM.to_owned(),
            options: Some(self.runc_options(runtime).to_any()),
        }
    }

    /// Directory for a container's stdio files (`<run_dir>/io/<id>`), created empty.
    pub fn io_dir(&self, id: &str) -> Result<PathBuf> {
        let dir = self.run_dir.join("io").join(id);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(dir)
    }

    /// Removes whatever exists of container `id`: kills and deletes its task, deletes
    /// the container, removes its snapshot (keyed by the id), its lease (named after
    /// the id) and its stdio directory.
    /// Missing pieces are fine, so it is safe to call after a partial setup or twice.
    pub async fn remove_container(&self, channel: &Channel, id: &str) -> Result<()> {
        let mut tasks = TasksClient::new(channel.clone());
        let kill = tasks
            .kill(self.request(KillRequest {
                container_id: id.to_owned(),
                exec_id: String::new(),
                signal: 9,
                all: true,
            }))
            .await;
        match kill {
            Ok(_) => {
                // The task must have exited before it can be deleted.
                let wait = tasks.wait(self.request(WaitRequest {
                    container_id: id.to_owned(),
                    exec_id: String::new(),
                }));
                let waited = tokio::time::timeout(Duration::from_secs(10), wait)
                    .await
                    .with_context(|| format!("task {id} did not exit within 10s of SIGKILL"))?;
                not_found_ok(waited).with_context(|| format!("waiting for task {id}"))?;
            }
            // NotFound: no task. FailedPrecondition: created or already stopped.
            Err(s) if matches!(s.code(), Code::NotFound | Code::FailedPrecondition) => {}
            Err(s) => return Err(s).with_context(|| format!("killing task {id}")),
        }
        let deleted = tasks
            .delete(self.request(DeleteTaskRequest {
                container_id: id.to_owned(),
            }))
            .await;
        not_found_ok(deleted).with_context(|| format!("deleting task {id}"))?;

        let deleted = ContainersClient::new(channel.clone())
            .delete(self.request(DeleteContainerRequest { id: id.to_owned() }))
            .await;
        not_found_ok(deleted).with_context(|| format!("deleting container {id}"))?;

        let removed = SnapshotsClient::new(channel.clone())
            .remove(self.request(RemoveSnapshotRequest {
                snapshotter: SNAPSHOTTER.to_owned(),
                key: id.to_owned(),
            }))
            .await;
        not_found_ok(removed).with_context(|| format!("removing snapshot {id}"))?;

        let deleted = LeasesClient::new(channel.clone())
            .delete(self.request(DeleteLeaseRequest {
                id: id.to_owned(),
                sync: false,
            }))
            .await;
        not_found_ok(deleted).with_context(|| format!("deleting lease {id}"))?;

        let io = self.run_dir.join("io").join(id);
        remove_dir_if_exists(&io)?;
        Ok(())
    }
}

/// Success, or NotFound (already gone), counts as done.
fn not_found_ok<T>(result: std::result::Result<T, Status>) -> std::result::Result<(), Status> {
    match result {
        Ok(_) => Ok(()),
        Err(s) if s.code() == Code::NotFound => Ok(()),
        Err(s) => Err(s),
    }
}

fn remove_dir_if_exists(dir: &Path) -> Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", dir.display()))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runc_options_encode_binary_name_and_root_with_their_proto_tags() {
        let opts = RuncOptions {
            binary_name: "crun".into(),
            root: "/r".into(),
            ..RuncOptions::default()
        };
        let any = opts.to_any();
        assert_eq!(any.type_url, "containerd.runc.v1.Options");
        // field 6 (binary_name), wire type 2: tag byte 0x32; field 7 (root): 0x3a.
        assert_eq!(any.value, b"\x32\x04crun\x3a\x02/r");
        assert_eq!(RuncOptions::decode(any.value.as_slice()).unwrap(), opts);
    }

    #[test]
    fn from_env_message_says_how_to_run_the_suite() {
        let err = ContainerdEnv::new(
            "/nonexistent/containerd.sock".into(),
            "fast-sandbox".into(),
            "img".into(),
            "/tmp".into(),
            "/tmp/runtime".into(),
            "/tmp/runsc".into(),
            None,
        )
        .unwrap_err();
        assert!(format!("{err:#}").contains("run tests/run.sh containerd"));
    }
}
