//! fsb-janitor: one per node; finds containers whose sandbox is gone and removes them.
//!
//! Role: the last line against leaks. A FAST create whose record never landed, a
//! Sandbox deleted while its agent was away, a same-name Sandbox recreated over an old
//! container, an agent pod that vanished with its sandboxes: each leaves a container
//! in the node's containerd that nothing else will remove. Every `interval` the
//! janitor lists the node's containers, asks the API server about the old ones and
//! removes the orphans through [`fsb_agent::runtime::ContainerdRuntime::remove`]
//! (SIGTERM, grace, SIGKILL, then task, container, snapshot, lease and logs). It never
//! writes to the API server.
//!
//! # Rules
//!
//! 1. Only containers labelled `fast-sandbox.io/managed=true` are considered.
//! 2. Nothing younger than the orphan timeout (containerd's `created_at`) is removed,
//!    whatever the API server says: this covers FAST creates whose Sandbox record is
//!    still on its way. Containers without a creation time are kept.
//! 3. The Sandbox is looked up in the namespace named by the container's
//!    `fast-sandbox.io/namespace` label (never `default`, seed-review item 8), by its
//!    `fast-sandbox.io/sandbox-name` label. Its claim uid is its metadata label
//!    `fast-sandbox.io/claim-uid` if present (the fast path writes it), else its
//!    `metadata.uid` (kubectl-created objects).
//! 4. Every answer is three-valued ([`state::Existence`], seed-review item 9): GET 200 is
//!    *exists*; the API server's own `404 NotFound` for that object is *gone*; anything
//!    else (other codes, a bare 404 page such as a missing CRD, transport errors, no
//!    answer within the call timeout) is *unknown*.
//! 5. An old managed container is removed when
//!    - its Sandbox is gone; or
//!    - its Sandbox exists but its claim uid differs from the container's
//!      `fast-sandbox.io/claim-uid` label (a recreated same-name object; an empty or
//!      missing label is not compared); or
//!    - its Sandbox exists with the same claim uid but states another sandbox id than
//!      the container's (`fast-sandbox.io/id` label, else the container id). A Sandbox
//!      states its id in `status.sandboxID`, or, before that status is written, in the
//!      intended status or id label its create wrote with it, read as the store reads
//!      it (`fsb_controller::store::stated_sandbox_id`). So a same-name leftover of an
//!      earlier attempt is not taken for the container of a Sandbox whose status
//!      write was cut; or
//!    - its agent pod is gone: the `fast-sandbox.io/agent-uid` label is the agent
//!      pod's UID, and a successful list of pods labelled `app=sandbox-agent` in all
//!      namespaces (one per scan) does not contain it. A failed list is unknown for
//!      every container.
//! 6. Anything else keeps the container. An unknown answer never removes: when no
//!    other answer proves the container an orphan, it is kept, counted in
//!    [`JanitorStats::unknown`] and asked about again next scan.
//!
//! # Invariants
//!
//! - The decision ([`state::decide`]) is pure and separate from I/O; it is unit-tested
//!   over every combination of a small domain and property-tested.
//! - At most one scan in flight; ticks missed during a slow scan are skipped.
//! - A failed removal is counted ([`JanitorStats::failed`]) and retried next scan;
//!   removal is idempotent. A failed containerd list fails the scan
//!   ([`JanitorStats::scan_errors`]) and nothing is decided.
//! - Every removal is logged with its reason.
//!
//! Seams: [`ClusterView`] (API server; [`KubeCluster`] is the real one) and
//! [`NodeContainers`] (containerd; implemented by `ContainerdRuntime`).

pub mod cluster;
pub mod error;
pub mod janitor;
pub mod state;

pub use cluster::{ClusterView, KubeCluster};
pub use error::JanitorError;
pub use janitor::{
    DEFAULT_GRACE, DEFAULT_INTERVAL, DEFAULT_ORPHAN_TIMEOUT, Janitor, JanitorConfig, JanitorStats,
    NodeContainers, ScanReport,
};
pub use state::{
    ContainerFacts, Existence, KeepReason, OrphanReason, SandboxFacts, Verdict, decide,
};
