//! Schema and migrations. `schema_version` holds one row; each migration moves it
//! from `n - 1` to `n` inside the caller's transaction, so a crash mid-migration
//! leaves the previous version intact.

use rusqlite::{OptionalExtension, Transaction};

use crate::StoreError;

/// Migrations in order; `MIGRATIONS[i]` takes the schema from version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    // 1: sandboxes, a store-wide resource version counter, lookup indexes.
    "CREATE TABLE sandboxes (
        namespace TEXT NOT NULL,
        name TEXT NOT NULL,
        uid TEXT NOT NULL,
        sandbox_id TEXT NOT NULL,
        request_id TEXT,
        spec_digest TEXT NOT NULL,
        pool TEXT NOT NULL,
        spec_json TEXT NOT NULL,
        labels_json TEXT NOT NULL,
        phase TEXT NOT NULL,
        agent TEXT,
        node TEXT,
        exit_code INTEGER,
        expire_time_ms INTEGER,
        reset_revision INTEGER NOT NULL,
        accepted_reset_revision INTEGER NOT NULL,
        created_ms INTEGER NOT NULL,
        resource_version INTEGER NOT NULL,
        PRIMARY KEY (namespace, name)
    ) WITHOUT ROWID;
    CREATE UNIQUE INDEX sandboxes_request_id ON sandboxes (request_id)
        WHERE request_id IS NOT NULL;
    CREATE UNIQUE INDEX sandboxes_sandbox_id ON sandboxes (sandbox_id);
    CREATE INDEX sandboxes_pool ON sandboxes (pool);
    CREATE TABLE revision (id INTEGER PRIMARY KEY CHECK (id = 0), last INTEGER NOT NULL);
    INSERT INTO revision (id, last) VALUES (0, 0);",
    // 2: the create's start timeline (JSON); NULL for rows written before.
    "ALTER TABLE sandboxes ADD COLUMN timeline_json TEXT;",
];

/// The version this binary writes.
pub(crate) const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// Bring the schema to [`SCHEMA_VERSION`]; refuse a newer database.
pub(crate) fn migrate(tx: &Transaction<'_>) -> Result<i64, StoreError> {
    tx.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_version (
            id INTEGER PRIMARY KEY CHECK (id = 0), version INTEGER NOT NULL)",
    )?;
    let found: i64 = tx
        .query_row("SELECT version FROM schema_version WHERE id = 0", [], |r| {
            r.get(0)
        })
        .optional()?
        .unwrap_or(0);
    if found > SCHEMA_VERSION {
        return Err(StoreError::SchemaTooNew {
            found,
            supported: SCHEMA_VERSION,
        });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        tracing::info!(from = i, to = i + 1, "migrating store schema");
        tx.execute_batch(sql)?;
    }
    tx.execute(
        "INSERT INTO schema_version (id, version) VALUES (0, ?1)
         ON CONFLICT (id) DO UPDATE SET version = excluded.version",
        [SCHEMA_VERSION],
    )?;
    Ok(found)
}
