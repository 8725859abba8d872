//! fsb-tests: the harness side of the integration and scenario tests.
//!
//! `tests/run.sh containerd` starts a private containerd (its own socket, root and
//! state under `FSB_TEST_RUN_DIR`), imports the offline busybox OCI image into the
//! `fast-sandbox` namespace and runs this crate's tests with the environment below.
//! A test asks for that containerd with [`ContainerdEnv::from_env`] and drives it
//! through `containerd-client` only (no `ctr`).
//!
//! - [`containerd`]: [`ContainerdEnv`] (socket, namespace, image, runtimes), namespaced
//!   requests, runc-shim options for runc / crun / gVisor, container cleanup.
//! - [`gateway`]: [`GatewayFixture`], the fast-path gateway over a real agent, the
//!   registry and a SQLite store, served over gRPC with a token.
//! - [`image`]: resolve an image in containerd's store to its config and rootfs chain id.
//! - [`wait`]: [`wait_until`], polling with a deadline (tests never sleep a fixed time).
//! - [`unique_id`]: fixed-width container ids (runsc matches ids by prefix).
//! - `k8s` (feature `k8s`): `KubeApi`, a REST client of the harness's API server, and
//!   `kube_config`/`kube_client`, the same server for kube (from FSB_KUBECONFIG).
//! - `kubelet` (feature `k8s`): `Kubelet`, the kubelet and scheduler of agent pods (the
//!   test cluster runs neither): binds them and runs real `fsb-agent` processes.
//! - `cluster` (feature `k8s`): the controller in-process, CRD install, namespaces with
//!   their default ServiceAccount, agent pods started by hand (identity tests).
//! - [`local`]: `fsb up` as a child process ([`local::LocalUp`]) and an authenticated
//!   fast-path client.
//! - [`otlp`]: a real OTLP/gRPC trace receiver ([`otlp::OtlpReceiver`]).
//!
//! Environment read by [`ContainerdEnv::from_env`] (all set by `tests/run.sh`):
//! `FSB_CONTAINERD_SOCKET`, `FSB_TEST_IMAGE`, `FSB_TEST_IMAGE_ARCHIVE`,
//! `FSB_TEST_RUN_DIR`, `FSB_RUNTIME_ROOT`, `FSB_TEST_RUNSC`, `FSB_CONTAINERD_NAMESPACE`.
//!
//! Invariant: every helper returns errors (`anyhow`) instead of panicking, except
//! [`ContainerdEnv::from_env`], whose panic tells the reader how to run the suite.

pub mod agent;
#[cfg(feature = "k8s")]
pub mod cluster;
pub mod containerd;
pub mod gateway;
pub mod image;
#[cfg(feature = "k8s")]
pub mod k8s;
#[cfg(feature = "k8s")]
pub mod kubelet;
pub mod local;
pub mod otlp;
pub mod prometheus;
pub mod spec;
pub mod wait;

pub use agent::{
    ExecResult, agent_config, container_runtime, containerd_config, exec_output,
    sandbox_cgroup_value, shell_plan,
};
pub use containerd::{ContainerdEnv, RUNC_SHIM, RuncOptions, TestRuntime};
pub use gateway::{GatewayFixture, GatewayParts, Leftovers};
pub use image::{ResolvedImage, chain_id, read_content, resolve_image};
pub use spec::minimal_oci_spec;
pub use wait::wait_until;

/// A fresh container id: 32 lowercase hex characters. Fixed width matters: runsc
/// resolves ids by prefix, so ids of different lengths could match each other.
pub fn unique_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_ids_are_fixed_width_hex_and_distinct() {
        let a = unique_id();
        let b = unique_id();
        assert_eq!(a.len(), 32);
        assert!(
            a.bytes()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
        assert_ne!(a, b);
        assert!(!a.starts_with(&b) && !b.starts_with(&a));
    }
}
