//! fsb-agent: where a sandbox becomes a process.
//!
//! Role: drive the node's containerd (namespace `fast-sandbox`) to create, run,
//! observe and remove sandboxes, and report them upward.
//!
//! - [`containerd`]: one connection, namespaced requests with deadlines, leases,
//!   runc-shim options (runc, crun and gVisor all run through the runc shim).
//! - [`error`]: [`AgentError`], mapped to gRPC codes in one place.
//! - [`image`]: [`image::ImageStore`]: load OCI archives, pull from registries, unpack, resolve.
//!
//! Invariants: every containerd call has a deadline; every container we create
//! carries the well-known labels (`fast-sandbox.io/managed`, `…/id`, ...), so state
//! can always be rebuilt from containerd.

pub mod containerd;
pub mod error;
pub mod image;

pub use error::AgentError;
