//! SQLite: one writer at a time (`BEGIN IMMEDIATE`). An append numbers its entries after
//! the handle's cached tip and *claims* the first seq; when another handle or process got
//! there first, the claim inserts nothing, the committed tip is read, and the entries are
//! numbered again.

use sea_orm::sea_query::OnConflict;
use sea_orm::{DatabaseTransaction, DbErr, EntityTrait};

use super::Policy;
use crate::library::{Appended, LOG_INSERT_ROWS_MAX, Library, Tip, committed_tip};
use crate::tables::log;
use crate::{LibraryId, LogEntry};

pub(crate) const POLICY: Policy = Policy {
    sequences_in_background: false,
    // One writer at a time: outbox ids ascend in commit order anyway.
    outbox_takes_turns: false,
    // One writer at a time: two pushes cannot interleave.
    push_takes_turns: false,
    pending_entries: false,
};

/// Claims of the next seq before giving up. Each failed claim means another writer
/// committed in between, so this bounds a pathological storm, not ordinary contention.
const CLAIM_ATTEMPTS_MAX: usize = 10_000;

/// Numbers a leader transaction's entries after `tip` (the handle's cached tip), claiming
/// the first seq, and inserts them.
pub(crate) async fn append(
    txn: &DatabaseTransaction,
    library_id: LibraryId,
    mut tip: Tip,
    drafts: &[LogEntry],
) -> Result<Appended, DbErr> {
    for _ in 0..CLAIM_ATTEMPTS_MAX {
        let (rows, last) = Library::number(drafts, tip);
        let mut rows = rows.into_iter().peekable();
        if let Some(first) = rows.next()
            && !claim(txn, first).await?
        {
            tip = committed_tip(txn, library_id, true).await?;
            continue;
        }
        while rows.peek().is_some() {
            let chunk: Vec<_> = rows.by_ref().take(LOG_INSERT_ROWS_MAX).collect();
            log::Entity::insert_many(chunk)
                .exec_without_returning(txn)
                .await?;
        }
        return Ok(Appended::Sequenced(last));
    }
    Err(DbErr::Custom(format!(
        "could not claim a seq in library {library_id} after {CLAIM_ATTEMPTS_MAX} attempts: other writers keep winning"
    )))
}

/// Inserts the first entry of an append if its seq is free; false if another writer holds
/// it. `ON CONFLICT DO NOTHING` (PostgreSQL, SQLite): its affected-row count says whether
/// the row went in, and unlike a failed insert it does not abort a PostgreSQL transaction.
/// Not used on MySQL, where sqlx's `CLIENT_FOUND_ROWS` would count the other writer's row.
async fn claim(txn: &DatabaseTransaction, first: log::ActiveModel) -> Result<bool, DbErr> {
    let insert = log::Entity::insert(first)
        .on_conflict(
            OnConflict::columns([log::Column::LibraryId, log::Column::Seq])
                .do_nothing()
                .to_owned(),
        )
        .exec_without_returning(txn)
        .await;
    match insert {
        Ok(affected) => Ok(affected == 1),
        Err(DbErr::RecordNotInserted) => Ok(false),
        Err(e) => Err(e),
    }
}
