//! PostgreSQL: many concurrent writers. Writers insert their entries unnumbered into
//! `sync_pending` and never wait for each other; the background `Sequencer` numbers the
//! committed ones in the order it sees them commit, taking turns on the library's row.

use std::sync::Arc;

use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseConnection, DatabaseTransaction, DbBackend, DbErr,
    EntityTrait, QueryFilter, QueryOrder, QuerySelect, TransactionTrait,
};
use tokio::sync::{mpsc, watch};

use super::Policy;
use crate::library::{
    Appended, LOG_INSERT_ROWS_MAX, Library, Tip, advance, committed_tip, draft_from_pending,
    pending_row,
};
use crate::tables::{log, pending};
use crate::{LibraryId, LogEntry};

pub(crate) const POLICY: Policy = Policy {
    sequences_in_background: true,
    // Outbox ids must ascend in commit order; with concurrent writers, outbox appends take
    // turns on the library's row until commit.
    outbox_takes_turns: true,
    // Two devices creating one id must see each other's entry, and a record that does not
    // exist yet has no row to lock: pushes take turns.
    push_takes_turns: true,
    pending_entries: true,
};

/// Pending entries numbered per sequencer transaction: bounds its memory and lock time.
const SEQUENCE_BATCH_MAX: u64 = 2_000;

/// How long the background sequencer waits after a kick before it runs, so that one run
/// takes the entries of every writer that commits meanwhile. It adds at most this much to
/// the time from commit to a numbered entry.
const SEQUENCE_COALESCE_MS: u64 = 2;

/// Ids per `DELETE … WHERE id IN (…)` when clearing sequenced pending entries.
const PENDING_DELETE_IDS_MAX: usize = 500;

/// Stores a leader transaction's entries for the sequencer, which runs once the
/// transaction has committed.
pub(crate) async fn append(
    txn: &DatabaseTransaction,
    drafts: &[LogEntry],
) -> Result<Appended, DbErr> {
    let mut rows = drafts.iter().map(pending_row).peekable();
    while rows.peek().is_some() {
        let chunk: Vec<_> = rows.by_ref().take(LOG_INSERT_ROWS_MAX).collect();
        pending::Entity::insert_many(chunk)
            .exec_without_returning(txn)
            .await?;
    }
    Ok(Appended::Pending)
}

/// Numbers the entries PostgreSQL writers leave in `sync_pending` (see `Library::append`).
#[derive(Debug)]
pub(crate) struct Sequencer {
    db: DatabaseConnection,
    library_id: LibraryId,
    tip: Arc<watch::Sender<Tip>>,
    /// One run at a time per handle: the background task and readers take turns.
    running: tokio::sync::Mutex<()>,
}

impl Sequencer {
    /// Moves committed pending entries (PostgreSQL) into the log, numbered in the order the
    /// sequencer sees them commit.
    ///
    /// Runs serialise on the library's row (`FOR UPDATE`), across handles and processes.
    /// A pending row becomes visible only when its transaction commits, so every run
    /// numbers only committed entries, after all the entries earlier runs numbered: a
    /// reader that has seen seq N never later finds an entry below N, and a transaction
    /// that commits late simply gets later seqs.
    pub(crate) async fn run(&self) -> Result<(), DbErr> {
        // One run per handle at a time; a writer that waited here usually finds its entries
        // already numbered by the run it waited for.
        let _single_flight = self.running.lock().await;
        // Nearly every reader's run, and many writers', find nothing to number. A plain
        // read says so without the library's row lock and a commit (each `FOR UPDATE`
        // writes WAL), so a crowd of followers pulling does not queue here. An entry
        // committed after this read is one a later run numbers, as if it came later.
        let waiting = pending::Entity::find()
            .filter(pending::Column::LibraryId.eq(self.library_id.to_string()))
            .one(&self.db)
            .await?;
        if waiting.is_none() {
            return Ok(());
        }
        loop {
            let txn = self.db.begin().await?;
            let library_key = self.library_id.to_string();
            super::take_turns(&txn, self.library_id).await?;
            let waiting = pending::Entity::find()
                .filter(pending::Column::LibraryId.eq(library_key))
                .order_by_asc(pending::Column::Id)
                .limit(SEQUENCE_BATCH_MAX)
                .all(&txn)
                .await?;
            if waiting.is_empty() {
                txn.commit().await?;
                return Ok(());
            }
            let full_batch = waiting.len() as u64 == SEQUENCE_BATCH_MAX;
            let ids: Vec<i64> = waiting.iter().map(|p| p.id).collect();
            let drafts = waiting
                .into_iter()
                .map(draft_from_pending)
                .collect::<Result<Vec<_>, _>>()?;
            let tip = committed_tip(&txn, self.library_id, false).await?;
            let (rows, last) = Library::number(&drafts, tip);
            let mut rows = rows.into_iter().peekable();
            while rows.peek().is_some() {
                let chunk: Vec<_> = rows.by_ref().take(LOG_INSERT_ROWS_MAX).collect();
                log::Entity::insert_many(chunk)
                    .exec_without_returning(&txn)
                    .await?;
            }
            for chunk in ids.chunks(PENDING_DELETE_IDS_MAX) {
                pending::Entity::delete_many()
                    .filter(pending::Column::Id.is_in(chunk.iter().copied()))
                    .exec(&txn)
                    .await?;
            }
            // Delivered at commit: leaders serving this library from other processes
            // learn of the new entries at once (see `Library::watch_commits`).
            txn.execute_raw(sea_orm::Statement::from_sql_and_values(
                DbBackend::Postgres,
                "SELECT pg_notify($1, $2)",
                [
                    crate::commits::NOTIFY_CHANNEL.into(),
                    self.library_id.to_string().into(),
                ],
            ))
            .await?;
            txn.commit().await?;
            advance(&self.tip, last);
            if !full_batch {
                return Ok(());
            }
        }
    }
}

impl Sequencer {
    /// A sequencer for `library_id`'s pending entries, with its background task and the
    /// channel that kicks it (capacity one, so kicks made while a run is due coalesce).
    pub(crate) fn start(
        db: DatabaseConnection,
        library_id: LibraryId,
        tip: Arc<watch::Sender<Tip>>,
    ) -> (Arc<Sequencer>, mpsc::Sender<()>) {
        let sequencer = Arc::new(Sequencer {
            db,
            library_id,
            tip,
            running: tokio::sync::Mutex::new(()),
        });
        let (kick, kicks) = mpsc::channel(1);
        tokio::spawn(sequence_in_background(Arc::clone(&sequencer), kicks));
        (sequencer, kick)
    }
}

/// Runs the sequencer whenever a writer kicks it, until every handle is gone.
async fn sequence_in_background(sequencer: Arc<Sequencer>, mut kicks: mpsc::Receiver<()>) {
    while kicks.recv().await.is_some() {
        // Let the commits that land meanwhile join this run: one sequencer transaction
        // (and one WAL flush) then numbers many writers' entries.
        tokio::time::sleep(std::time::Duration::from_millis(SEQUENCE_COALESCE_MS)).await;
        if let Err(e) = sequencer.run().await {
            // The entries stay pending; the next kick or read numbers them.
            tracing::warn!(library = %sequencer.library_id, %e, "sequencing failed; will retry");
        }
    }
}
