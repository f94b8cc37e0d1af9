//! The backend seam: what differs between SQLite, PostgreSQL and MySQL in sequencing and
//! locking, one file per backend. The rest of the library asks [`of`] for a backend's
//! [`Policy`], appends through [`append`], and takes turns on a library through
//! [`take_turns`]; it does not branch on `DbBackend` for these. (Other backend-specific
//! code: statement text in `registry.rs`, the commit watchers in `commits.rs`, error
//! inspection in `error.rs`, SQLite's `BEGIN IMMEDIATE` in `library::begin_write`.)

pub(crate) mod mysql;
pub(crate) mod postgres;
pub(crate) mod sqlite;

use sea_orm::{ConnectionTrait, DatabaseTransaction, DbBackend, DbErr, EntityTrait, QuerySelect};

use crate::library::{Appended, Tip};
use crate::tables::library;
use crate::{LibraryId, LogEntry};

/// What a backend does differently, as flags the shells read.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Policy {
    /// A leader's appends leave their entries pending, numbered after commit by a
    /// background `postgres::Sequencer` (reads run it first).
    pub(crate) sequences_in_background: bool,
    /// A follower's outbox appends take turns on the library's row until commit, so that
    /// outbox ids ascend in commit order.
    pub(crate) outbox_takes_turns: bool,
    /// A push's transaction takes turns on the library's row before anything else.
    pub(crate) push_takes_turns: bool,
    /// Committed entries may wait unnumbered in `sync_pending`: they count as the
    /// newest entries of their records.
    pub(crate) pending_entries: bool,
}

/// The policy of `backend`.
pub(crate) fn of(backend: DbBackend) -> &'static Policy {
    match backend {
        DbBackend::Postgres => &postgres::POLICY,
        DbBackend::MySql => &mysql::POLICY,
        _ => &sqlite::POLICY,
    }
}

/// The policy of the backend `db` talks to.
pub(crate) fn of_connection(db: &impl ConnectionTrait) -> &'static Policy {
    of(db.get_database_backend())
}

/// Appends a leader transaction's entries (without seq and checksum): numbered into the
/// log (SQLite: after `cached_tip`, claiming; MySQL: after the committed tip, taking
/// turns) or left pending for the sequencer (PostgreSQL).
pub(crate) async fn append(
    txn: &DatabaseTransaction,
    library_id: LibraryId,
    cached_tip: Tip,
    drafts: &[LogEntry],
) -> Result<Appended, DbErr> {
    match txn.get_database_backend() {
        DbBackend::Postgres => postgres::append(txn, drafts).await,
        DbBackend::MySql => mysql::append(txn, library_id, drafts).await,
        _ => sqlite::append(txn, library_id, cached_tip, drafts).await,
    }
}

/// Takes turns on a library: locks its `sync_library` row (`SELECT … FOR UPDATE`) until
/// the transaction ends, across handles and processes. SQLite has no row locks (its
/// writers take turns at `BEGIN IMMEDIATE`), and sea-orm leaves the clause out there.
pub(crate) async fn take_turns(
    txn: &DatabaseTransaction,
    library_id: LibraryId,
) -> Result<(), DbErr> {
    library::Entity::find_by_id(library_id.to_string())
        .lock_exclusive()
        .one(txn)
        .await?;
    Ok(())
}

/// Whether `table` has a unique index (or constraint) on `column` alone: what a sync key
/// needs, since apply upserts on it (`ON CONFLICT (column)`, MySQL's duplicate key).
pub(crate) async fn has_unique_index<C: ConnectionTrait>(
    db: &C,
    table: &str,
    column: &str,
) -> Result<bool, DbErr> {
    use sea_orm::Statement;
    let backend = db.get_database_backend();
    let (sql, values): (&str, Vec<sea_orm::Value>) = match backend {
        DbBackend::Sqlite => (
            "SELECT 1 FROM pragma_index_list(?) AS il \
             WHERE il.\"unique\" = 1 \
             AND (SELECT count(*) FROM pragma_index_info(il.name)) = 1 \
             AND (SELECT ii.name FROM pragma_index_info(il.name) AS ii) = ?",
            vec![table.into(), column.into()],
        ),
        DbBackend::Postgres => (
            "SELECT 1 FROM pg_index i \
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0] \
             WHERE i.indrelid = to_regclass(quote_ident($1)) \
             AND i.indisunique AND i.indnatts = 1 AND a.attname = $2",
            vec![table.into(), column.into()],
        ),
        DbBackend::MySql => (
            "SELECT 1 FROM information_schema.STATISTICS s \
             WHERE s.TABLE_SCHEMA = DATABASE() AND s.TABLE_NAME = ? AND s.COLUMN_NAME = ? \
             AND s.NON_UNIQUE = 0 \
             AND (SELECT count(*) FROM information_schema.STATISTICS t \
                  WHERE t.TABLE_SCHEMA = s.TABLE_SCHEMA AND t.TABLE_NAME = s.TABLE_NAME \
                  AND t.INDEX_NAME = s.INDEX_NAME) = 1",
            vec![table.into(), column.into()],
        ),
        // A backend this library does not know: its upserts will tell.
        _ => return Ok(true),
    };
    let found = db
        .query_one_raw(Statement::from_sql_and_values(backend, sql, values))
        .await?;
    Ok(found.is_some())
}
