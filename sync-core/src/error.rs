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
    #[error(
        "this database holds no sync library: create one first (`Library::create`) or join one (`Library::join`)"
    )]
    NoLibrary,
    /// The library asked for is not in this database.
    #[error("library {0} is not known on this device")]
    UnknownLibrary(LibraryId),
    /// A device cannot join a library it leads.
    #[error("this device leads library {0}; it cannot join it as a follower")]
    LeadsLibrary(LibraryId),
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

/// MySQL/MariaDB: deadlock (1213) or lock wait timeout (1205), by error number.
#[cfg(feature = "mysql")]
fn is_transient_mysql(db: &dyn sea_orm::sqlx::error::DatabaseError) -> bool {
    db.try_downcast_ref::<sea_orm::sqlx::mysql::MySqlDatabaseError>()
        .is_some_and(|m| matches!(m.number(), 1205 | 1213))
}

/// Without the MySQL driver there are no MySQL errors.
#[cfg(all(not(feature = "mysql"), any(feature = "sqlite", feature = "postgres")))]
fn is_transient_mysql(_: &dyn sea_orm::sqlx::error::DatabaseError) -> bool {
    false
}

/// Whether a database error may pass on a retry of the same work: a lost or unavailable
/// connection, a deadlock or serialization failure, a lock wait that timed out, a busy
/// database. Anything else (a value the database refuses, a failed constraint) is about
/// the data and fails again.
pub(crate) fn is_transient(e: &DbErr) -> bool {
    match e {
        DbErr::Conn(_) | DbErr::ConnectionAcquire(_) => true,
        // sea-orm has sqlx errors only when a driver feature is on.
        #[cfg(any(feature = "sqlite", feature = "postgres", feature = "mysql"))]
        DbErr::Exec(sea_orm::RuntimeErr::SqlxError(err))
        | DbErr::Query(sea_orm::RuntimeErr::SqlxError(err)) => {
            match err.as_ref() {
                sea_orm::sqlx::Error::Database(db) => {
                    let code = db.code();
                    matches!(
                        code.as_deref(),
                        // PostgreSQL: serialization failure, deadlock, lock not available,
                        // connection exceptions, admin shutdown.
                        Some("40001" | "40P01" | "55P03" | "57P01" | "08000" | "08003" | "08006")
                        // MySQL/MariaDB: deadlock, lock wait timeout (SQLSTATE of 1213
                        // is 40001; 1205 is HY000, so the number is matched below).
                        // SQLite: BUSY, LOCKED, BUSY_SNAPSHOT, BUSY_RECOVERY.
                        | Some("5" | "6" | "261" | "517" | "262")
                    ) || is_transient_mysql(db.as_ref())
                }
                sea_orm::sqlx::Error::Io(_)
                | sea_orm::sqlx::Error::PoolTimedOut
                | sea_orm::sqlx::Error::PoolClosed
                | sea_orm::sqlx::Error::WorkerCrashed
                | sea_orm::sqlx::Error::Protocol(_)
                | sea_orm::sqlx::Error::Tls(_) => true,
                _ => false,
            }
        }
        _ => false,
    }
}
