//! fsb-store: where sandbox records live.
//!
//! Role: the durable source of truth for sandboxes in local mode (`fsb up`): the
//! gateway records each sandbox here (before the container in STRONG mode, after it in
//! FAST mode) and reconciles it with the agents' inventory at startup. The seam is
//! [`SandboxStore`]; [`SqliteStore`] is the embedded implementation, a Kubernetes
//! (CRD) implementation comes with the Kubernetes issue.
//!
//! Why an async trait: the Kubernetes store is network I/O, so the seam must be async
//! for it anyway. [`SqliteStore`] runs each call on tokio's blocking pool
//! (`spawn_blocking`): a call is microseconds plus, for writes, one fsync, which must
//! not stall a runtime worker. Callers therefore need a tokio runtime.
//!
//! Why SQLite (rusqlite, bundled) over redb: it needs only a C compiler, has WAL with
//! well-documented crash semantics, secondary unique indexes (request id, sandbox id)
//! and `BEGIN IMMEDIATE` to serialize writers across processes, and an operator can
//! inspect the file with the `sqlite3` shell.
//!
//! Invariants:
//! - (namespace, name) is the key; `request_id` (when set) and `sandbox_id` are unique
//!   across the store; a create or update that would break this fails with
//!   `AlreadyExists`, naming the record that holds the id.
//! - `resource_version` is assigned by the store from one store-wide counter on every
//!   write (create, update, delete), so it strictly increases in commit order. An
//!   update or a versioned delete whose version is stale fails with `Aborted`
//!   ([`StoreError::Conflict`]) and changes nothing: no lost updates.
//! - `uid` and `created_ms` are immutable: update keeps the stored values.
//! - An acknowledged write is durable (see [`sqlite`] for what each durability
//!   setting survives) and is published to watchers after its commit, in commit
//!   order. A watcher that falls behind gets `RecvError::Lagged` and must re-list.

pub mod error;
pub mod record;
mod schema;
pub mod sqlite;

use std::future::Future;

use fsb_core::{NamespaceName, RequestId, SandboxId, SandboxName};
use tokio::sync::broadcast;

pub use error::StoreError;
pub use record::{
    EventKind, ListFilter, Phase, StartPath, StartStage, StartTimeline, StoreEvent, StoredSandbox,
};
pub use sqlite::{SqliteConfig, SqliteStore, Synchronous};

/// The sandbox record store. Lookups return `Ok(None)` for a missing record; writes
/// return the record as stored (with its new `resource_version`).
pub trait SandboxStore: Send + Sync + 'static {
    /// Insert a new record; its `resource_version` is ignored and assigned.
    /// `AlreadyExists` if the key, the request id or the sandbox id is taken.
    fn create(
        &self,
        record: StoredSandbox,
    ) -> impl Future<Output = Result<StoredSandbox, StoreError>> + Send;

    /// The record with this key.
    fn get(
        &self,
        namespace: &NamespaceName,
        name: &SandboxName,
    ) -> impl Future<Output = Result<Option<StoredSandbox>, StoreError>> + Send;

    /// The record created with this request id.
    fn get_by_request_id(
        &self,
        request_id: &RequestId,
    ) -> impl Future<Output = Result<Option<StoredSandbox>, StoreError>> + Send;

    /// The record with this sandbox id.
    fn get_by_sandbox_id(
        &self,
        sandbox_id: &SandboxId,
    ) -> impl Future<Output = Result<Option<StoredSandbox>, StoreError>> + Send;

    /// Every record passing `filter`, ordered by (namespace, name).
    fn list(
        &self,
        filter: &ListFilter,
    ) -> impl Future<Output = Result<Vec<StoredSandbox>, StoreError>> + Send;

    /// Replace the record if its stored `resource_version` equals `record`'s
    /// (`Aborted` otherwise, `NotFound` if gone); assigns a new version.
    fn update(
        &self,
        record: StoredSandbox,
    ) -> impl Future<Output = Result<StoredSandbox, StoreError>> + Send;

    /// Remove the record, if `expected_version` (when given) still matches; returns
    /// the last state (with the delete's version).
    fn delete(
        &self,
        namespace: &NamespaceName,
        name: &SandboxName,
        expected_version: Option<u64>,
    ) -> impl Future<Output = Result<StoredSandbox, StoreError>> + Send;

    /// Changes committed from now on, in commit order.
    fn watch(&self) -> broadcast::Receiver<StoreEvent>;
}
