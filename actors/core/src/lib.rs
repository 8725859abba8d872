//! fsb-core: the vocabulary every other crate speaks.
//!
//! - [`capability`]: Linux capability names and a pool's capability drop list.
//! - [`ids`]: newtypes for every identifier that crosses a crate boundary (never bare strings).
//! - [`image`]: image references, parsed and normalized so `busybox` equals
//!   `docker.io/library/busybox:latest` everywhere (placement affinity, inventory, pulls).
//! - [`spec`]: the sandbox spec and its validation; every error names the offending field.
//! - [`quantity`]: Kubernetes-style resource quantities (`500m`, `256Mi`).
//! - [`error`]: the one place where error codes become `tonic::Status`.
//! - [`labels`]: well-known label keys, finalizer and namespace names shared with operators.
//!
//! Invariant: a value of a validated type (`ImageRef`, `HostPort`, `SandboxName`, a
//! `ValidSpec`) is valid by construction; code downstream never re-checks it.

pub mod capability;
pub mod error;
pub mod ids;
pub mod image;
pub mod labels;
pub mod quantity;
pub mod spec;

pub use error::{ErrorCode, HasErrorCode};
pub use ids::{AgentId, NamespaceName, NodeName, PoolName, RequestId, SandboxId, SandboxName};
pub use image::ImageRef;
pub use spec::{HostPort, SandboxSpec, SpecError, ValidSpec};
