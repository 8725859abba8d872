//! [`SqliteStore`]: the embedded store for local mode (`fsb up`).
//!
//! One writing connection behind a mutex: SQLite allows one writer at a time anyway,
//! and a single writer makes "commit, then publish the event" happen in commit order.
//! Reads of a database file go through a second connection: in WAL mode a reader sees
//! the last commit without waiting for the writer, so a create's lookups do not queue
//! behind other creates' commits and their fsyncs (an in-memory database has one
//! connection for both).
//! Every write runs in a `BEGIN IMMEDIATE` transaction, so a second process on the
//! same file waits (up to the busy timeout) instead of failing mid-transaction.
//!
//! Durability: WAL journal with `synchronous = FULL` by default: a commit has been
//! fsynced to the WAL before `create`/`update`/`delete` return, so an acknowledged
//! write survives both `kill -9` and power loss. [`Synchronous::Normal`] skips that
//! fsync (the WAL is synced only at checkpoints): still safe against `kill -9` of the
//! process (the written WAL pages sit in the OS page cache and the database is never
//! corrupted), but a power loss or kernel crash may lose the last commits.

use std::{
    path::Path,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use fsb_core::{NamespaceName, RequestId, SandboxId, SandboxName, spec::SpecDigest};
use rusqlite::{Connection, Row, ToSql, Transaction, TransactionBehavior, params};
use tokio::sync::broadcast;

use crate::{
    EventKind, ListFilter, Phase, SandboxStore, StoreError, StoreEvent, StoredSandbox, schema,
};

/// How hard a commit is pushed to disk before it is acknowledged.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Synchronous {
    /// fsync the WAL on every commit: survives power loss (the default).
    #[default]
    Full,
    /// fsync only at checkpoints: survives `kill -9`, may lose the last commits on
    /// power loss. Faster on slow disks.
    Normal,
}

/// Options for [`SqliteStore::open_with`].
#[derive(Clone, Debug)]
pub struct SqliteConfig {
    /// Commit durability.
    pub synchronous: Synchronous,
    /// How long a call waits for another process's write lock before `Busy`.
    pub busy_timeout: Duration,
    /// Events buffered per watcher before it lags (and must re-list).
    pub watch_capacity: usize,
}

impl Default for SqliteConfig {
    fn default() -> Self {
        Self {
            synchronous: Synchronous::Full,
            busy_timeout: Duration::from_secs(5),
            watch_capacity: 1024,
        }
    }
}

/// The SQLite-backed [`SandboxStore`]. Cheap to clone (shares one connection).
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("watchers", &self.inner.events.receiver_count())
            .finish_non_exhaustive()
    }
}

struct Inner {
    conn: Mutex<Connection>,
    /// Reads; `None` for an in-memory database (reads use `conn`).
    reader: Option<Mutex<Connection>>,
    events: broadcast::Sender<StoreEvent>,
}

impl SqliteStore {
    /// Open (or create) the database at `path` with [`SqliteConfig::default`].
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        Self::open_with(path, &SqliteConfig::default())
    }

    /// Open (or create) the database at `path`: WAL, the configured durability, busy
    /// timeout, schema migrated to the current version.
    pub fn open_with(path: impl AsRef<Path>, config: &SqliteConfig) -> Result<Self, StoreError> {
        let path = path.as_ref();
        let conn = Connection::open(path)?;
        let mode: String =
            conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Task(format!(
                "sqlite refused WAL journal mode (got {mode})"
            )));
        }
        let mut store = Self::setup(conn, config)?;
        // Opened after the schema is migrated; WAL mode is a property of the file.
        let reader = Connection::open(path)?;
        reader.busy_timeout(config.busy_timeout)?;
        if let Some(inner) = Arc::get_mut(&mut store.inner) {
            inner.reader = Some(Mutex::new(reader));
        }
        Ok(store)
    }

    /// A private in-memory database, for tests and fakes.
    pub fn in_memory() -> Result<Self, StoreError> {
        Self::setup(Connection::open_in_memory()?, &SqliteConfig::default())
    }

    fn setup(mut conn: Connection, config: &SqliteConfig) -> Result<Self, StoreError> {
        conn.busy_timeout(config.busy_timeout)?;
        let sync = match config.synchronous {
            Synchronous::Full => "FULL",
            Synchronous::Normal => "NORMAL",
        };
        conn.pragma_update(None, "synchronous", sync)?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        schema::migrate(&tx)?;
        tx.commit()?;
        let (events, _) = broadcast::channel(config.watch_capacity.max(1));
        Ok(Self {
            inner: Arc::new(Inner {
                conn: Mutex::new(conn),
                reader: None,
                events,
            }),
        })
    }

    /// The schema version this binary writes.
    pub fn schema_version() -> i64 {
        schema::SCHEMA_VERSION
    }

    async fn run<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> Result<T, StoreError> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| StoreError::Task(e.to_string()))?
    }
}

impl SandboxStore for SqliteStore {
    async fn create(&self, record: StoredSandbox) -> Result<StoredSandbox, StoreError> {
        self.run(move |s| s.create(record)).await
    }

    async fn get(
        &self,
        namespace: &NamespaceName,
        name: &SandboxName,
    ) -> Result<Option<StoredSandbox>, StoreError> {
        let (ns, n) = (namespace.clone(), name.clone());
        self.run(move |s| {
            select_one(
                &s.read(),
                "namespace = ?1 AND name = ?2",
                &[Some(ns.as_str()), Some(n.as_str())],
            )
        })
        .await
    }

    async fn get_by_request_id(
        &self,
        request_id: &RequestId,
    ) -> Result<Option<StoredSandbox>, StoreError> {
        let id = request_id.clone();
        self.run(move |s| select_one(&s.read(), "request_id = ?1", &[Some(id.as_str())]))
            .await
    }

    async fn get_by_sandbox_id(
        &self,
        sandbox_id: &SandboxId,
    ) -> Result<Option<StoredSandbox>, StoreError> {
        let id = sandbox_id.clone();
        self.run(move |s| select_one(&s.read(), "sandbox_id = ?1", &[Some(id.as_str())]))
            .await
    }

    async fn list(&self, filter: &ListFilter) -> Result<Vec<StoredSandbox>, StoreError> {
        let filter = filter.clone();
        self.run(move |s| {
            let ns = filter.namespace.as_ref().map(|n| n.as_str().to_owned());
            let pool = filter.pool.as_ref().map(|p| p.as_str().to_owned());
            let rows = select(
                &s.read(),
                "(?1 IS NULL OR namespace = ?1) AND (?2 IS NULL OR pool = ?2)",
                &[ns.as_deref(), pool.as_deref()],
            )?;
            Ok(rows.into_iter().filter(|r| filter.matches(r)).collect())
        })
        .await
    }

    async fn update(&self, record: StoredSandbox) -> Result<StoredSandbox, StoreError> {
        self.run(move |s| s.update(record)).await
    }

    async fn delete(
        &self,
        namespace: &NamespaceName,
        name: &SandboxName,
        expected_version: Option<u64>,
    ) -> Result<StoredSandbox, StoreError> {
        let (ns, n) = (namespace.clone(), name.clone());
        self.run(move |s| s.delete(ns, n, expected_version)).await
    }

    fn watch(&self) -> broadcast::Receiver<StoreEvent> {
        self.inner.events.subscribe()
    }
}

impl Inner {
    /// The connection for reads (see the module doc).
    fn read(&self) -> MutexGuard<'_, Connection> {
        match &self.reader {
            Some(r) => r.lock().unwrap_or_else(|e| e.into_inner()),
            None => self.lock(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock dropped its transaction (rolled back), so
        // the connection is consistent; keep using it.
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Commit `tx`, then publish: watchers see events in commit order because the
    /// connection lock is still held.
    fn commit(
        &self,
        tx: Transaction<'_>,
        kind: EventKind,
        record: &StoredSandbox,
    ) -> Result<(), StoreError> {
        tx.commit()?;
        // No receiver is fine: nobody is watching.
        let _ = self.events.send(StoreEvent {
            kind,
            record: record.clone(),
        });
        Ok(())
    }

    fn create(&self, mut record: StoredSandbox) -> Result<StoredSandbox, StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        if select_one(
            &tx,
            "namespace = ?1 AND name = ?2",
            &[Some(record.namespace.as_str()), Some(record.name.as_str())],
        )?
        .is_some()
        {
            return Err(StoreError::AlreadyExists {
                namespace: record.namespace,
                name: record.name,
            });
        }
        check_unique(&tx, &record)?;
        record.resource_version = next_revision(&tx)?;
        write_row(&tx, INSERT, &record)?;
        self.commit(tx, EventKind::Added, &record)?;
        Ok(record)
    }

    fn update(&self, mut record: StoredSandbox) -> Result<StoredSandbox, StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let current = current(&tx, &record.namespace, &record.name)?;
        if current.resource_version != record.resource_version {
            return Err(StoreError::Conflict {
                namespace: record.namespace,
                name: record.name,
                expected: record.resource_version,
                actual: current.resource_version,
            });
        }
        check_unique(&tx, &record)?;
        record.uid = current.uid;
        record.created_ms = current.created_ms;
        record.resource_version = next_revision(&tx)?;
        write_row(&tx, UPDATE, &record)?;
        self.commit(tx, EventKind::Modified, &record)?;
        Ok(record)
    }

    fn delete(
        &self,
        namespace: NamespaceName,
        name: SandboxName,
        expected: Option<u64>,
    ) -> Result<StoredSandbox, StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut record = current(&tx, &namespace, &name)?;
        if let Some(expected) = expected.filter(|v| *v != record.resource_version) {
            return Err(StoreError::Conflict {
                namespace,
                name,
                expected,
                actual: record.resource_version,
            });
        }
        tx.execute(
            "DELETE FROM sandboxes WHERE namespace = ?1 AND name = ?2",
            params![namespace.as_str(), name.as_str()],
        )?;
        record.resource_version = next_revision(&tx)?;
        self.commit(tx, EventKind::Deleted, &record)?;
        Ok(record)
    }
}

const COLUMNS: &str = "namespace, name, uid, sandbox_id, request_id, spec_digest, pool, \
    spec_json, labels_json, phase, agent, node, exit_code, expire_time_ms, reset_revision, \
    accepted_reset_revision, created_ms, resource_version, timeline_json";

const INSERT: &str = "INSERT INTO sandboxes (namespace, name, uid, sandbox_id, request_id, \
    spec_digest, pool, spec_json, labels_json, phase, agent, node, exit_code, expire_time_ms, \
    reset_revision, accepted_reset_revision, created_ms, resource_version, timeline_json) \
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19)";

const UPDATE: &str = "UPDATE sandboxes SET uid = ?3, sandbox_id = ?4, request_id = ?5, \
    spec_digest = ?6, pool = ?7, spec_json = ?8, labels_json = ?9, phase = ?10, agent = ?11, \
    node = ?12, exit_code = ?13, expire_time_ms = ?14, reset_revision = ?15, \
    accepted_reset_revision = ?16, created_ms = ?17, resource_version = ?18, \
    timeline_json = ?19 WHERE namespace = ?1 AND name = ?2";

/// Bind `record` to the 19 parameters of [`INSERT`] or [`UPDATE`].
fn write_row(tx: &Transaction<'_>, sql: &str, r: &StoredSandbox) -> Result<(), StoreError> {
    let spec_json = serde_json::to_string(&r.spec).map_err(StoreError::Encode)?;
    let labels_json = serde_json::to_string(&r.labels).map_err(StoreError::Encode)?;
    let timeline_json = r
        .timeline
        .as_ref()
        .map(serde_json::to_string)
        .transpose()
        .map_err(StoreError::Encode)?;
    let version = i64::try_from(r.resource_version)
        .map_err(|_| corrupt(r, "resource_version", "over i64"))?;
    let changed = tx.execute(
        sql,
        params![
            r.namespace.as_str(),
            r.name.as_str(),
            r.uid,
            r.sandbox_id.as_str(),
            r.request_id.as_ref().map(|id| id.as_str()),
            r.spec_digest.to_string(),
            r.pool().as_str(),
            spec_json,
            labels_json,
            r.phase.as_str(),
            r.agent.as_ref().map(|a| a.as_str()),
            r.node.as_ref().map(|n| n.as_str()),
            r.exit_code,
            r.expire_time_ms,
            r.reset_revision,
            r.accepted_reset_revision,
            r.created_ms,
            version,
            timeline_json,
        ],
    )?;
    if changed == 1 {
        Ok(())
    } else {
        Err(corrupt(
            r,
            "namespace",
            &format!("write touched {changed} rows"),
        ))
    }
}

fn corrupt(r: &StoredSandbox, column: &'static str, reason: &str) -> StoreError {
    StoreError::Corrupt {
        key: r.key(),
        column,
        reason: reason.to_owned(),
    }
}

/// Bump and return the store-wide revision (inside the caller's transaction).
fn next_revision(tx: &Transaction<'_>) -> Result<u64, StoreError> {
    let last: i64 = tx.query_row(
        "UPDATE revision SET last = last + 1 WHERE id = 0 RETURNING last",
        [],
        |r| r.get(0),
    )?;
    u64::try_from(last).map_err(|_| StoreError::Corrupt {
        key: "revision".into(),
        column: "last",
        reason: format!("negative revision {last}"),
    })
}

fn current(
    tx: &Transaction<'_>,
    namespace: &NamespaceName,
    name: &SandboxName,
) -> Result<StoredSandbox, StoreError> {
    select_one(
        tx,
        "namespace = ?1 AND name = ?2",
        &[Some(namespace.as_str()), Some(name.as_str())],
    )?
    .ok_or_else(|| StoreError::NotFound {
        namespace: namespace.clone(),
        name: name.clone(),
    })
}

/// The request id and sandbox id of `record` must not be held by another key.
fn check_unique(tx: &Transaction<'_>, record: &StoredSandbox) -> Result<(), StoreError> {
    let other = |r: &StoredSandbox| r.namespace != record.namespace || r.name != record.name;
    if let Some(request_id) = &record.request_id
        && let Some(holder) = select_one(tx, "request_id = ?1", &[Some(request_id.as_str())])?
        && other(&holder)
    {
        return Err(StoreError::RequestIdTaken {
            request_id: request_id.clone(),
            namespace: holder.namespace,
            name: holder.name,
        });
    }
    if let Some(holder) = select_one(tx, "sandbox_id = ?1", &[Some(record.sandbox_id.as_str())])?
        && other(&holder)
    {
        return Err(StoreError::SandboxIdTaken {
            sandbox_id: record.sandbox_id.clone(),
            namespace: holder.namespace,
            name: holder.name,
        });
    }
    Ok(())
}

fn select(
    conn: &Connection,
    condition: &str,
    args: &[Option<&str>],
) -> Result<Vec<StoredSandbox>, StoreError> {
    let sql = format!("SELECT {COLUMNS} FROM sandboxes WHERE {condition} ORDER BY namespace, name");
    let mut stmt = conn.prepare_cached(&sql)?;
    let binds: Vec<&dyn ToSql> = args.iter().map(|b| b as &dyn ToSql).collect();
    let raws = stmt
        .query_map(binds.as_slice(), RawRow::read)?
        .collect::<Result<Vec<_>, _>>()?;
    raws.into_iter().map(RawRow::decode).collect()
}

fn select_one(
    conn: &Connection,
    condition: &str,
    args: &[Option<&str>],
) -> Result<Option<StoredSandbox>, StoreError> {
    Ok(select(conn, condition, args)?.into_iter().next())
}

/// A row as SQLite returns it, before the typed checks.
struct RawRow {
    namespace: String,
    name: String,
    uid: String,
    sandbox_id: String,
    request_id: Option<String>,
    spec_digest: String,
    spec_json: String,
    labels_json: String,
    phase: String,
    agent: Option<String>,
    node: Option<String>,
    exit_code: Option<i32>,
    expire_time_ms: Option<i64>,
    reset_revision: i64,
    accepted_reset_revision: i64,
    created_ms: i64,
    resource_version: i64,
    timeline_json: Option<String>,
}

impl RawRow {
    fn read(row: &Row<'_>) -> rusqlite::Result<Self> {
        Ok(Self {
            namespace: row.get(0)?,
            name: row.get(1)?,
            uid: row.get(2)?,
            sandbox_id: row.get(3)?,
            request_id: row.get(4)?,
            spec_digest: row.get(5)?,
            // 6 is pool, derived from the spec.
            spec_json: row.get(7)?,
            labels_json: row.get(8)?,
            phase: row.get(9)?,
            agent: row.get(10)?,
            node: row.get(11)?,
            exit_code: row.get(12)?,
            expire_time_ms: row.get(13)?,
            reset_revision: row.get(14)?,
            accepted_reset_revision: row.get(15)?,
            created_ms: row.get(16)?,
            resource_version: row.get(17)?,
            timeline_json: row.get(18)?,
        })
    }

    fn decode(self) -> Result<StoredSandbox, StoreError> {
        let key = format!("{}/{}", self.namespace, self.name);
        let bad = |column: &'static str, reason: String| StoreError::Corrupt {
            key: key.clone(),
            column,
            reason,
        };
        let mut digest = [0u8; 32];
        hex::decode_to_slice(&self.spec_digest, &mut digest)
            .map_err(|e| bad("spec_digest", e.to_string()))?;
        Ok(StoredSandbox {
            namespace: NamespaceName::parse("namespace", &self.namespace)
                .map_err(|e| bad("namespace", e.to_string()))?,
            name: SandboxName::parse("name", &self.name).map_err(|e| bad("name", e.to_string()))?,
            uid: self.uid,
            sandbox_id: SandboxId::parse("sandbox_id", &self.sandbox_id)
                .map_err(|e| bad("sandbox_id", e.to_string()))?,
            request_id: self
                .request_id
                .map(|id| RequestId::parse("request_id", &id))
                .transpose()
                .map_err(|e| bad("request_id", e.to_string()))?,
            spec_digest: SpecDigest(digest),
            spec: serde_json::from_str(&self.spec_json)
                .map_err(|e| bad("spec_json", e.to_string()))?,
            labels: serde_json::from_str(&self.labels_json)
                .map_err(|e| bad("labels_json", e.to_string()))?,
            phase: Phase::parse(&self.phase)
                .ok_or_else(|| bad("phase", format!("unknown phase {:?}", self.phase)))?,
            agent: self.agent.map(Into::into),
            node: self.node.map(Into::into),
            exit_code: self.exit_code,
            expire_time_ms: self.expire_time_ms,
            reset_revision: self.reset_revision,
            accepted_reset_revision: self.accepted_reset_revision,
            timeline: self
                .timeline_json
                .map(|j| serde_json::from_str(&j))
                .transpose()
                .map_err(|e| bad("timeline_json", e.to_string()))?,
            created_ms: self.created_ms,
            resource_version: u64::try_from(self.resource_version)
                .map_err(|e| bad("resource_version", e.to_string()))?,
        })
    }
}
