//! fsb-agent: where a sandbox becomes a process.
//!
//! Role: drive the node's containerd (namespace `fast-sandbox`) to create, run,
//! observe and remove sandboxes, and report them upward.
//!
//! - [`containerd`]: one connection, namespaced requests with deadlines, leases,
//!   runc-shim options (runc, crun and gVisor all run through the runc shim).
//! - [`error`]: [`AgentError`], mapped to gRPC codes in one place.
//! - `AgentActor` ([`AgentHandle`]): admission and the sandbox table ([`state`]), one
//!   `SandboxActor` per sandbox (operations on a sandbox run in mailbox order), phase
//!   changes broadcast upward; rebuilt from containerd at start and on reconnect.
//! - [`server`]: `agent.v1.Agent` over the handle; [`request`]: its requests checked
//!   (ids, spec, exec, grace) before they reach an actor; [`stats`]: cgroup usage counters.
//! - [`tls`]: mutual TLS with the controller: identities (DNS names), the mounted
//!   certificate files, tonic TLS settings and the peer check.
//! - [`session`]: [`session::spawn_session`], the agent's side of
//!   `AgentControl/Session`: register, full inventories, heartbeats with jitter, phase
//!   events, reconnect with capped backoff.
//! - [`runtime`]: the container lifecycle on containerd (create + start with cleanup
//!   on failure, SIGTERM/grace/SIGKILL removal, exit events, listing for recovery).
//! - [`oci`]: the OCI runtime spec we write for a sandbox (Kubernetes command/args
//!   semantics, env merge, image user resolution, namespaces incl. the shared agent
//!   netns, resources, containerd's hardening defaults); pure, unit-tested.
//! - [`seccomp`]: the default seccomp profile (containerd/Docker allow-list, one table,
//!   capability-gated entries) as the `linux.seccomp` JSON object.
//! - [`inject`]: files injected into sandboxes (seed-review item 5): allow-listed
//!   directories, symlinks resolved and re-checked, regular files only, mounted
//!   read-only `nosuid,nodev`.
//! - [`image`]: [`image::ImageStore`]: load OCI archives, pull from registries, unpack, resolve.
//! - [`logs`]: [`logs::stream_logs`] reads the shim-written log files (tail, follow until
//!   exit, 64 KiB chunks); [`logs::enforce_limit`] bounds their size while the shim
//!   writes; [`logs::validate_sandbox_id`] for ids from outside.
//! - [`exec`]: [`exec::exec`] runs a process in a running sandbox through containerd's
//!   task Exec with agent-made FIFOs, streaming stdout/stderr and the exit code last;
//!   stdin and tty resize for interactive use.
//! - [`userns`]: the optional user namespace (`spec.user_namespace`): one fixed id
//!   mapping per node, and each image's rootfs remapped once (chowned into a committed
//!   snapshot kept with the image) for sandboxes to prepare from.
//! - [`warm`]: warm-instance bookkeeping (targets, ready and starting instances,
//!   claims, refills within start and memory limits) and late binding (the claimed
//!   process from spec + image; which creates must go cold); pure, unit-tested. The
//!   runtime side is [`runtime::ContainerdRuntime::hand_over`] and `update_limits`.
//!   Not wired into the actor yet.
//!
//! Invariants: every containerd call has a deadline; every container we create
//! carries the well-known labels (`fast-sandbox.io/managed`, `…/id`, ...), so state
//! can always be rebuilt from containerd.

mod actor;
pub mod containerd;
pub mod error;
pub mod exec;
mod handle;
pub mod image;
pub mod inject;
pub mod logs;
mod msg;
pub mod oci;
mod report;
pub mod request;
pub mod runtime;
mod sandbox;
pub mod seccomp;
pub mod server;
pub mod session;
pub mod state;
pub mod stats;
pub mod tls;
pub mod userns;
pub mod warm;

pub use actor::{LABEL_PORTS, LABEL_WARM, LABEL_WARM_DROP};
pub use error::AgentError;
pub use handle::{
    AgentConfig, AgentHandle, DEFAULT_LOG_MAX_BYTES, DEFAULT_STOP_GRACE, LOG_CHECK_INTERVAL,
};
pub use inject::{InjectedMount, InjectionPolicy};
pub use msg::{CreateSandbox, CreatedSandbox};
pub use oci::{ImageConfig, NetworkMode, SpecInput, build_spec};
pub use session::{SessionConfig, SessionTask, spawn_session};
pub use state::{PhaseChange, SandboxPhase, SandboxRecord};
pub use userns::IdMapping;
