//! MySQL/MariaDB: claims do not work there (sqlx sets `CLIENT_FOUND_ROWS`, so
//! `ON DUPLICATE KEY UPDATE` reports another writer's row as inserted, and racing
//! duplicate-key inserts deadlock on InnoDB's next-key locks). Appends take turns on the
//! library's row, read the tip with a locking read, and insert.

use sea_orm::{DatabaseTransaction, DbErr, EntityTrait};

use super::Policy;
use crate::library::{Appended, LOG_INSERT_ROWS_MAX, Library, committed_tip};
use crate::tables::log;
use crate::{LibraryId, LogEntry};

pub(crate) const POLICY: Policy = Policy {
    sequences_in_background: false,
    // Outbox ids must ascend in commit order; with concurrent writers, outbox appends take
    // turns on the library's row until commit.
    outbox_takes_turns: true,
    // Not first: appends lock the library's row after the records, as local writes do, and
    // taking it first could deadlock; InnoDB's gap locks keep two creates of one id apart.
    push_takes_turns: false,
    pending_entries: false,
};

/// Numbers a leader transaction's entries after the committed tip, read with the
/// library's row held until commit, and inserts them.
pub(crate) async fn append(
    txn: &DatabaseTransaction,
    library_id: LibraryId,
    drafts: &[LogEntry],
) -> Result<Appended, DbErr> {
    super::take_turns(txn, library_id).await?;
    let tip = committed_tip(txn, library_id, true).await?;
    let (rows, last) = Library::number(drafts, tip);
    let mut rows = rows.into_iter().peekable();
    while rows.peek().is_some() {
        let chunk: Vec<_> = rows.by_ref().take(LOG_INSERT_ROWS_MAX).collect();
        log::Entity::insert_many(chunk)
            .exec_without_returning(txn)
            .await?;
    }
    Ok(Appended::Sequenced(last))
}
