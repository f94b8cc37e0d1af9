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
        "this database holds no sync library: create one (`Library::open_or_create`, `Library::create`) or join one"
    )]
    NoLibrary,
    /// `Library::create` on a database that already holds a library: a second one would
    /// become the default and leave every follower of the first behind.
    #[error(
        "this database already holds sync library {0}: open it (`Library::open_or_create` on every start, or `Library::open_default`) instead of creating another"
    )]
    AlreadyHasLibrary(LibraryId),
    /// The library asked for is not in this database.
    #[error("library {0} is not known on this device")]
    UnknownLibrary(LibraryId),
    /// A device cannot join a library it leads.
    #[error("this device leads library {0}; it cannot join it as a follower")]
    LeadsLibrary(LibraryId),
    /// A stored value could not be read back.
    #[error("corrupt sync state: {0}")]
    Corrupt(String),
    /// A join with read access on a database whose synced tables already hold rows that
    /// are not seeds: they exist on no other device, and a read member could never push
    /// them. Nothing was stored.
    #[error(
        "this database already holds {rows} row(s) of synced model `{model}` that exist on no other device, and a member with read access cannot push them: join with an empty database, join with write access (the rows are then pushed as this device's writes), or delete them before joining; rows seeded by a migration with `sync_core::seed_key` keys are allowed"
    )]
    RowsBeforeJoin {
        /// The first model found holding such rows.
        model: String,
        /// How many rows of it.
        rows: usize,
    },
    /// A model's sync key column (`#[sync(key)]`) has no unique index of its own: apply
    /// upserts on it, and would fail on every entry.
    #[error(
        "the sync key column `{column}` of table `{table}` (synced model `{model}`) has no unique index: add `#[sea_orm(unique)]` to the field and a unique index in the migration (`sync_migrations::add_sync_key` makes one)"
    )]
    SyncKeyNotUnique {
        /// The model's sync id.
        model: String,
        /// Its table.
        table: String,
        /// The sync key column.
        column: String,
    },
    /// Rows that predate the library could not be recorded.
    #[error("could not record the rows this database held before the library: {0}")]
    EarlierRows(#[from] LogError),
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
    /// `Library::audit` on a follower that applied part of the log before it kept the
    /// entries it applies (an earlier build): it cannot tell what those entries wrote.
    #[error(
        "this follower holds the log only after seq {seq}: it applied the entries up to it \
         before it kept them; call `FollowerView::fill_held_log` to fetch them from the \
         leader, then audit again"
    )]
    LogKeptOnlyAfter {
        /// The last seq it does not hold.
        seq: Seq,
    },
    /// The log this device holds does not chain (`Library::verify_held_log`).
    #[error("the log this device holds does not chain: {0}")]
    Chain(#[from] crate::ChainError),
    /// The log a follower holds ends elsewhere than its position
    /// (`Library::verify_held_log`).
    #[error("the log this follower holds ends at seq {held}, but its position is {position}")]
    HeldLogShort {
        /// Where the held log ends.
        held: Seq,
        /// The follower's position.
        position: Seq,
    },
}

/// Which of the library's refusals a write met, for an app that answers its own callers
/// (an HTTP status, say). SeaORM's hooks can return nothing but a `DbErr`, so the library
/// refuses a write with `DbErr::Custom` and a message that says what to do;
/// [`WriteRefusal::of`] tells which refusal it is. Errors of the database itself (a
/// foreign key or unique constraint) are SeaORM's: `DbErr::sql_err`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum WriteRefusal {
    /// This device has read access to the library: it changes no synced data.
    ReadOnly,
    /// The write refers to a record that does not exist (or whose sync key is not filled).
    MissingReference,
    /// A statement that runs no sync hooks writes a synced table (use the model's hooked
    /// writes or the handle's sync-aware bulk writes).
    Unrecorded,
}

/// The start of every read-access refusal.
const READ_ONLY: &str = "this device has read access to library ";
/// The start of every refusal of a statement that runs no hooks.
pub(crate) const UNRECORDED: &str = "refused: ";
/// In every refusal of a reference to a record that is not there.
pub(crate) const MISSING_REFERENCE: &str = "a synced reference must point at a stored record";

impl WriteRefusal {
    /// The refusal `e` reports, if it is one of the library's write refusals.
    pub fn of(e: &DbErr) -> Option<WriteRefusal> {
        let DbErr::Custom(message) = e else {
            return None;
        };
        if message.starts_with(READ_ONLY) {
            Some(WriteRefusal::ReadOnly)
        } else if message.contains(MISSING_REFERENCE) {
            Some(WriteRefusal::MissingReference)
        } else if message.starts_with(UNRECORDED) {
            Some(WriteRefusal::Unrecorded)
        } else {
            None
        }
    }
}

/// The refusal of a write to synced model `model` on a device with read access.
pub(crate) fn read_only(library: LibraryId, model: &str) -> DbErr {
    DbErr::Custom(format!(
        "{READ_ONLY}{library}: it cannot change synced model `{model}`; write on the \
         leader, or join with an invite that grants write access"
    ))
}

/// Whether a database error is about the data a statement carried: a value the database
/// cannot store (SQLSTATE class 22), a failed constraint (class 23), or SQLite's
/// equivalents (TOOBIG, CONSTRAINT, MISMATCH, RANGE). Such an error fails again however
/// often the same change is tried, so the change is set aside (a pushed change) or named
/// (a pulled entry); so is a record an applied entry refers to that is missing here. Anything
/// else — a lost connection, a full disk, a read-only database,
/// a deadlock, a timeout — is about the moment, not the change, and is retried.
pub(crate) fn is_data_error(e: &DbErr) -> bool {
    // Apply's check that the records an entry refers to are here (`registry::Step`).
    if matches!(e, DbErr::RecordNotFound(_)) {
        return true;
    }
    #[cfg(any(feature = "sqlite", feature = "postgres", feature = "mysql"))]
    {
        sqlx_data_error(e)
    }
    // sea-orm has sqlx errors only when a driver feature is on.
    #[cfg(not(any(feature = "sqlite", feature = "postgres", feature = "mysql")))]
    {
        let _ = e;
        false
    }
}

#[cfg(any(feature = "sqlite", feature = "postgres", feature = "mysql"))]
fn sqlx_data_error(e: &DbErr) -> bool {
    use sea_orm::RuntimeErr;
    let (DbErr::Exec(RuntimeErr::SqlxError(err)) | DbErr::Query(RuntimeErr::SqlxError(err))) = e
    else {
        return false;
    };
    let sea_orm::sqlx::Error::Database(db) = err.as_ref() else {
        return false;
    };
    #[cfg(feature = "sqlite")]
    if db
        .try_downcast_ref::<sea_orm::sqlx::sqlite::SqliteError>()
        .is_some()
    {
        // SQLite's code is its extended result code; the primary one is its low byte.
        let code = db
            .code()
            .and_then(|c| c.parse::<i32>().ok())
            .unwrap_or_default();
        return matches!(code & 0xff, 18 | 19 | 20 | 25);
    }
    #[cfg(feature = "mysql")]
    if let Some(mysql) = db.try_downcast_ref::<sea_orm::sqlx::mysql::MySqlDatabaseError>() {
        return matches!(
            mysql.number(),
            // Data too long, out of range, incorrect value, duplicate key, foreign key
            // (child, parent), column cannot be null, truncated, no default.
            1406 | 1264 | 1366 | 1062 | 1452 | 1451 | 1048 | 1292 | 1265 | 1364
        ) || mysql
            .code()
            .is_some_and(|state| state.starts_with("22") || state.starts_with("23"));
    }
    db.code().is_some_and(|state| {
        state.len() == 5 && (state.starts_with("22") || state.starts_with("23"))
    })
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
            LogError::LogKeptOnlyAfter { seq } => LogError::LogKeptOnlyAfter { seq: *seq },
            LogError::Chain(e) => LogError::Chain(e.clone()),
            LogError::HeldLogShort { held, position } => LogError::HeldLogShort {
                held: *held,
                position: *position,
            },
        }
    }
}

#[cfg(test)]
mod write_refusal_tests {
    use super::*;

    #[test]
    fn each_refusal_is_told_by_its_message() {
        let library = LibraryId(uuid::Uuid::nil());
        assert_eq!(
            WriteRefusal::of(&read_only(library, "tag")),
            Some(WriteRefusal::ReadOnly)
        );
        assert_eq!(
            WriteRefusal::of(&DbErr::Custom(format!(
                "field `shelf_id` refers to `shelf` record 7, which does not exist: \
                 {MISSING_REFERENCE}"
            ))),
            Some(WriteRefusal::MissingReference)
        );
        assert_eq!(
            WriteRefusal::of(&DbErr::Custom(format!("{UNRECORDED}raw SQL writes"))),
            Some(WriteRefusal::Unrecorded)
        );
        assert_eq!(
            WriteRefusal::of(&DbErr::Custom("something else".into())),
            None
        );
        assert_eq!(WriteRefusal::of(&DbErr::RecordNotFound("x".into())), None);
    }
}
