//! Error types, one per operation.

use sea_orm::DbErr;

use crate::{LibraryId, Seq};

/// Why a library could not be created or opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// The database failed.
    #[error("database error: {0}")]
    Db(#[from] DbErr),
    /// The sync tables are missing.
    #[error(
        "the sync tables are missing: add `sync_migrations::Migrator`'s migrations to your app's Migrator and run them ({0})"
    )]
    NotMigrated(DbErr),
    /// This database has no library yet.
    #[error("this database holds no sync library: create one first (example-app: `init`)")]
    NoLibrary,
    /// The library asked for is not in this database.
    #[error("library {0} is not known on this device")]
    UnknownLibrary(LibraryId),
    /// A stored value could not be read back.
    #[error("corrupt sync state: {0}")]
    Corrupt(String),
}

/// Why the log could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LogError {
    /// The database failed.
    #[error("database error: {0}")]
    Db(#[from] DbErr),
    /// A stored entry is not readable: the log was altered outside this library.
    #[error("log entry {seq} is corrupt: {reason}")]
    Corrupt {
        /// The entry.
        seq: Seq,
        /// What is wrong with it.
        reason: String,
    },
}

impl LogError {
    /// The same error for another caller of a shared read (`coalesce`): database errors
    /// are not `Clone`, so one is restated by its message.
    pub(crate) fn to_owned_error(&self) -> LogError {
        match self {
            LogError::Db(e) => LogError::Db(DbErr::Custom(e.to_string())),
            LogError::Corrupt { seq, reason } => LogError::Corrupt {
                seq: *seq,
                reason: reason.clone(),
            },
        }
    }
}
