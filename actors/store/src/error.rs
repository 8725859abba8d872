//! Store errors. Caller mistakes and races (`NotFound`, `AlreadyExists`, `Conflict`)
//! are answers; everything else means the store could not do its job.

use fsb_core::{ErrorCode, HasErrorCode, NamespaceName, RequestId, SandboxId, SandboxName};

/// Why a store call failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No record with that key.
    #[error("sandbox {namespace}/{name} not found")]
    NotFound {
        /// Namespace asked for.
        namespace: NamespaceName,
        /// Name asked for.
        name: SandboxName,
    },
    /// A record with that (namespace, name) exists.
    #[error("sandbox {namespace}/{name} already exists")]
    AlreadyExists {
        /// Namespace of the existing record.
        namespace: NamespaceName,
        /// Name of the existing record.
        name: SandboxName,
    },
    /// The request id is already held by another record.
    #[error("request_id: {request_id} is already used by sandbox {namespace}/{name}")]
    RequestIdTaken {
        /// The contested request id.
        request_id: RequestId,
        /// Namespace of the record holding it.
        namespace: NamespaceName,
        /// Name of the record holding it.
        name: SandboxName,
    },
    /// The sandbox id is already held by another record.
    #[error("sandbox id {sandbox_id} is already used by sandbox {namespace}/{name}")]
    SandboxIdTaken {
        /// The contested sandbox id.
        sandbox_id: SandboxId,
        /// Namespace of the record holding it.
        namespace: NamespaceName,
        /// Name of the record holding it.
        name: SandboxName,
    },
    /// Optimistic concurrency: the record changed since the caller read it.
    #[error(
        "sandbox {namespace}/{name} was modified concurrently: expected resource version {expected}, found {actual}"
    )]
    Conflict {
        /// Namespace of the record.
        namespace: NamespaceName,
        /// Name of the record.
        name: SandboxName,
        /// Version the caller read.
        expected: u64,
        /// Version stored now.
        actual: u64,
    },
    /// The database stayed locked (by another process) past the busy timeout.
    #[error("store is busy: database locked past the busy timeout")]
    Busy(#[source] rusqlite::Error),
    /// The database was written by a newer version of fsb.
    #[error("store schema version {found} is newer than this binary supports ({supported})")]
    SchemaTooNew {
        /// Version found in the database.
        found: i64,
        /// Highest version this binary knows.
        supported: i64,
    },
    /// A stored value does not parse: the database was edited or is corrupt.
    #[error("stored sandbox {key}: column {column}: {reason}")]
    Corrupt {
        /// `namespace/name` of the row.
        key: String,
        /// Column that failed.
        column: &'static str,
        /// What was wrong.
        reason: String,
    },
    /// Any other SQLite failure (I/O error, disk full, corruption).
    #[error("sqlite: {0}")]
    Sqlite(#[source] rusqlite::Error),
    /// The spec could not be serialized (a bug: the types are plain data).
    #[error("encoding sandbox record: {0}")]
    Encode(#[source] serde_json::Error),
    /// The remote store (the Kubernetes API server) did not answer or failed; the
    /// write may be retried.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The blocking task running the call panicked or was cancelled.
    #[error("store task failed: {0}")]
    Task(String),
}

impl StoreError {
    /// True for optimistic-concurrency conflicts: re-read and retry.
    pub fn is_conflict(&self) -> bool {
        matches!(self, Self::Conflict { .. })
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(err: rusqlite::Error) -> Self {
        match err.sqlite_error_code() {
            Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked) => {
                Self::Busy(err)
            }
            _ => Self::Sqlite(err),
        }
    }
}

impl HasErrorCode for StoreError {
    fn error_code(&self) -> ErrorCode {
        match self {
            Self::NotFound { .. } => ErrorCode::NotFound,
            Self::AlreadyExists { .. }
            | Self::RequestIdTaken { .. }
            | Self::SandboxIdTaken { .. } => ErrorCode::AlreadyExists,
            Self::Conflict { .. } => ErrorCode::Aborted,
            Self::Busy(_) | Self::Unavailable(_) => ErrorCode::Unavailable,
            Self::SchemaTooNew { .. } => ErrorCode::FailedPrecondition,
            Self::Corrupt { .. } | Self::Sqlite(_) | Self::Encode(_) | Self::Task(_) => {
                ErrorCode::Internal
            }
        }
    }
}
