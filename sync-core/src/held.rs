//! The log a follower holds: every entry it applied (the app's, parked ones and reserved
//! `sync.*` entries alike), stored in its own `sync_log` in the apply transaction that
//! writes the rows and moves the position, and every run a pull left out (`Skipped`:
//! superseded or unrequested entries) in `sync_log_skipped` with the log's checksum at its
//! end. Entries and runs cover 1..=position with no gap, so the chain is checkable
//! (`Library::verify_held_log`) and `audit` has a log to compare the tables with.
//!
//! A follower that applied entries before it kept them (a build before this one) holds a
//! *not held* run from where its held log ends to its position, noted when it opens.
//! `FollowerView::fill_held_log` pulls every skipped or not-held run in full from the
//! leader, verifies it against the chain and stores it: the follower is then a full copy
//! of the log up to its position (a new leader's `take_over` does it before it serves).

use sea_orm::ActiveValue::Set;
use sea_orm::sea_query::OnConflict;
use sea_orm::{
    ColumnTrait, ConnectionTrait, DbBackend, DbErr, EntityTrait, QueryFilter, QueryOrder,
    QuerySelect, Statement, Value,
};
use serde::Serialize;

use crate::error::LogError;
use crate::follower::{ApplyError, Position, SyncError};
use crate::library::{LOG_INSERT_ROWS_MAX, changed_text, entry_from_row};
use crate::protocol::{PullError, PullRequest, PulledItem, Transport};
use crate::tables::{log, skipped};
use crate::{ChainError, Library, LibraryId, LogEntry, Seq};

/// A run of seqs a follower holds no entries of.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SkippedRun {
    /// The first seq of the run.
    pub from: Seq,
    /// The last.
    pub through: Seq,
    /// The log's rolling checksum at `through`.
    pub checksum: u64,
    /// Applied before this device kept its log: its entries were never stored here (rather
    /// than left out by a pull as superseded or unrequested).
    pub not_held: bool,
}

/// Columns of a `sync_log` row, in the order `entry_values` gives them.
const LOG_COLUMNS: &str = "library_id, seq, model, record_id, op, data, changed, device_id, hlc, schema_version, checksum";
const LOG_COLUMN_COUNT: usize = 11;

/// `INSERT INTO sync_log (…) VALUES (…), …` for `rows` rows, with the backend's placeholders.
fn insert_sql(
    backend: DbBackend,
    table: &str,
    columns: &str,
    per_row: usize,
    rows: usize,
) -> String {
    let mut sql = String::with_capacity(64 + rows * per_row * 5);
    sql.push_str("INSERT INTO ");
    sql.push_str(table);
    sql.push_str(" (");
    sql.push_str(columns);
    sql.push_str(") VALUES ");
    let mut n = 0;
    for row in 0..rows {
        if row > 0 {
            sql.push_str(", ");
        }
        sql.push('(');
        for column in 0..per_row {
            if column > 0 {
                sql.push_str(", ");
            }
            n += 1;
            match backend {
                DbBackend::Postgres => {
                    sql.push('$');
                    sql.push_str(&n.to_string());
                }
                _ => sql.push('?'),
            }
        }
        sql.push(')');
    }
    sql
}

/// Held-log rows per INSERT. SQLite: about the 1,000 values apply's own statements carry
/// (fewer, larger statements; no planner cost to speak of). Elsewhere the leader's append
/// size, [`LOG_INSERT_ROWS_MAX`] (PostgreSQL slows sharply past ~60 rows).
fn rows_per_insert(backend: DbBackend) -> usize {
    match backend {
        DbBackend::Sqlite => 1_000 / LOG_COLUMN_COUNT,
        _ => LOG_INSERT_ROWS_MAX,
    }
}

fn entry_values(entry: &LogEntry, values: &mut Vec<Value>) {
    values.extend([
        Value::from(entry.library_id.to_string()),
        Value::from(entry.seq.0 as i64),
        Value::from(entry.model.clone()),
        Value::from(entry.record_id.clone()),
        Value::from(entry.op.as_str().to_owned()),
        Value::from(entry.data.clone()),
        Value::from(changed_text(&entry.changed)),
        Value::from(entry.device_id.to_string()),
        Value::from(entry.hlc.as_u64() as i64),
        Value::from(entry.schema_version as i32),
        Value::from(entry.checksum as i64),
    ]);
}

/// The statements that store what a response applied, from `start` through `through`:
/// its entries into `sync_log` (multi-row statements, `rows_per_insert`) and its
/// skipped runs into `sync_log_skipped`. Run in the apply transaction, so the held log and
/// the position move together.
pub(crate) fn statements(
    backend: DbBackend,
    library_id: LibraryId,
    start: Seq,
    through: Seq,
    items: &[PulledItem],
) -> Vec<Statement> {
    let mut at = start;
    let mut entries: Vec<&LogEntry> = Vec::with_capacity(items.len());
    let mut runs = Vec::new();
    for item in items {
        if item.last_seq() > through {
            break;
        }
        match item {
            PulledItem::Entry(entry) => entries.push(entry),
            PulledItem::Skipped { through, checksum } => runs.push(SkippedRun {
                from: at.next(),
                through: *through,
                checksum: *checksum,
                not_held: false,
            }),
        }
        at = item.last_seq();
    }
    let mut out = Vec::with_capacity(entries.len() / LOG_INSERT_ROWS_MAX + 2);
    for chunk in entries.chunks(rows_per_insert(backend)) {
        let mut values = Vec::with_capacity(chunk.len() * LOG_COLUMN_COUNT);
        for entry in chunk {
            entry_values(entry, &mut values);
        }
        out.push(Statement::from_sql_and_values(
            backend,
            insert_sql(
                backend,
                "sync_log",
                LOG_COLUMNS,
                LOG_COLUMN_COUNT,
                chunk.len(),
            ),
            values,
        ));
    }
    for chunk in runs.chunks(LOG_INSERT_ROWS_MAX) {
        let mut values = Vec::with_capacity(chunk.len() * 5);
        for run in chunk {
            values.extend([
                Value::from(library_id.to_string()),
                Value::from(run.from.0 as i64),
                Value::from(run.through.0 as i64),
                Value::from(run.checksum as i64),
                Value::from(false),
            ]);
        }
        out.push(Statement::from_sql_and_values(
            backend,
            insert_sql(
                backend,
                "sync_log_skipped",
                "library_id, from_seq, through_seq, checksum, not_held",
                5,
                chunk.len(),
            ),
            values,
        ));
    }
    out
}

fn run_of(row: skipped::Model) -> SkippedRun {
    SkippedRun {
        from: Seq(row.from_seq as u64),
        through: Seq(row.through_seq as u64),
        checksum: row.checksum as u64,
        not_held: row.not_held,
    }
}

/// A library's skipped and not-held runs, in seq order.
pub(crate) async fn runs<C: ConnectionTrait>(
    db: &C,
    library_id: LibraryId,
) -> Result<Vec<SkippedRun>, DbErr> {
    Ok(skipped::Entity::find()
        .filter(skipped::Column::LibraryId.eq(library_id.to_string()))
        .order_by_asc(skipped::Column::FromSeq)
        .all(db)
        .await?
        .into_iter()
        .map(run_of)
        .collect())
}

/// Whether a library's held log has a run this device holds no entries of.
pub(crate) async fn has_runs<C: ConnectionTrait>(
    db: &C,
    library_id: LibraryId,
) -> Result<bool, DbErr> {
    Ok(skipped::Entity::find()
        .filter(skipped::Column::LibraryId.eq(library_id.to_string()))
        .one(db)
        .await?
        .is_some())
}

/// Where a library's held log ends: its last entry or skipped run.
async fn held_end<C: ConnectionTrait>(db: &C, library_id: LibraryId) -> Result<Seq, DbErr> {
    let entry = crate::library::committed_tip(db, library_id, false)
        .await?
        .seq;
    let run = skipped::Entity::find()
        .filter(skipped::Column::LibraryId.eq(library_id.to_string()))
        .order_by_desc(skipped::Column::ThroughSeq)
        .one(db)
        .await?
        .map_or(Seq::ZERO, |r| Seq(r.through_seq as u64));
    Ok(entry.max(run))
}

impl Library {
    /// On a follower whose held log ends below its position (it applied those entries
    /// before it kept them: an earlier build), records the rest up to the position as not
    /// held, once. Costs two reads when there is nothing to do.
    pub(crate) async fn note_not_held(&self) -> Result<(), DbErr> {
        if self.role() != crate::Role::Follower {
            return Ok(());
        }
        let position = self.position().await?;
        if position.seq == Seq::ZERO || held_end(&self.db, self.id()).await? >= position.seq {
            return Ok(());
        }
        let txn = self.begin_write().await?;
        // Read again under the write lock: an apply may have moved both meanwhile.
        let position = self.position_in(&txn).await?;
        let end = held_end(&txn, self.id()).await?;
        if end < position.seq {
            skipped::Entity::insert(skipped::ActiveModel {
                library_id: Set(self.id().to_string()),
                from_seq: Set(end.next().0 as i64),
                through_seq: Set(position.seq.0 as i64),
                checksum: Set(position.checksum as i64),
                not_held: Set(true),
            })
            .on_conflict(
                // Another handle noted the same run meanwhile.
                OnConflict::columns([skipped::Column::LibraryId, skipped::Column::FromSeq])
                    .update_column(skipped::Column::ThroughSeq)
                    .to_owned(),
            )
            .exec_without_returning(&txn)
            .await?;
            tracing::info!(
                library = %self.id(),
                from = %end.next(),
                through = %position.seq,
                "this follower applied entries before it kept its log: they are not held here \
                 (`FollowerView::fill_held_log` fetches them)"
            );
        }
        txn.commit().await
    }

    /// The runs of the log this device holds no entries of, in seq order: left out by its
    /// pulls (superseded or unrequested entries) or not held (applied before it kept its
    /// log). Empty on a leader and on a follower that holds every entry.
    pub async fn held_log_gaps(&self) -> Result<Vec<SkippedRun>, DbErr> {
        runs(&self.db, self.id()).await
    }

    /// Checks the log this device holds: its entries and skipped runs cover 1..=its end
    /// with no gap and every entry continues the checksum chain (a run carries the
    /// checksum at its end). Returns where it ends; on a follower that is its position.
    pub async fn verify_held_log(&self) -> Result<Position, LogError> {
        let runs = runs(&self.db, self.id()).await?;
        let mut runs = runs.into_iter().peekable();
        let mut at = Position::default();
        let mut after = Seq::ZERO;
        loop {
            let page = log::Entity::find()
                .filter(log::Column::LibraryId.eq(self.id().to_string()))
                .filter(log::Column::Seq.gt(after.0 as i64))
                .order_by_asc(log::Column::Seq)
                .limit(10_000)
                .all(&self.db)
                .await?;
            let Some(last) = page.last() else { break };
            after = Seq(last.seq as u64);
            for row in page {
                let entry = entry_from_row(row)?;
                while let Some(run) = runs.next_if(|run| run.from <= entry.seq) {
                    at = cover(at, &run)?;
                }
                at.checksum =
                    crate::entry::verify_chain(at.seq, at.checksum, std::slice::from_ref(&entry))?;
                at.seq = entry.seq;
            }
        }
        for run in runs {
            at = cover(at, &run)?;
        }
        if self.role() == crate::Role::Follower {
            let position = self.position().await?;
            if at != position {
                return Err(LogError::HeldLogShort {
                    held: at.seq,
                    position: position.seq,
                });
            }
        }
        Ok(at)
    }

    /// Pulls every run of the log this device holds no entries of in full from the
    /// leader (`transport`), verifies each against the chain it holds (the entries
    /// before it, the checksum at its end) and stores it: afterwards this device holds
    /// every entry up to its position. Returns the entries stored.
    ///
    /// Each run is stored in its own transaction, as far as one response reaches; an
    /// interruption keeps what was stored. Entries that do not continue the chain stop it
    /// with `ApplyError::Chain`, storing nothing of that response.
    pub(crate) async fn fill_held_log(&self, transport: &dyn Transport) -> Result<u64, SyncError> {
        self.fill_held_log_through(transport, Seq(u64::MAX)).await
    }

    /// [`Library::fill_held_log`] for the runs up to `through` only (a device rewinding
    /// onto a newer epoch fills the history it shares with it, up to the fork).
    pub(crate) async fn fill_held_log_through(
        &self,
        transport: &dyn Transport,
        through: Seq,
    ) -> Result<u64, SyncError> {
        let upto = through;
        let mut stored = 0;
        loop {
            let Some(run) = runs(&self.db, self.id())
                .await
                .map_err(ApplyError::from)?
                .into_iter()
                .next()
                .filter(|run| run.from <= upto)
            else {
                return Ok(stored);
            };
            // Below the first run this device holds every entry.
            let before = match run.from.0.checked_sub(1).filter(|s| *s > 0) {
                None => Position::default(),
                Some(seq) => {
                    let row = log::Entity::find_by_id((self.id().to_string(), seq as i64))
                        .one(&self.db)
                        .await
                        .map_err(ApplyError::from)?
                        .ok_or(ApplyError::Chain(ChainError::Gap {
                            expected: Seq(seq),
                            found: run.from,
                        }))?;
                    Position {
                        seq: Seq(seq),
                        checksum: row.checksum as u64,
                    }
                }
            };
            let mut request =
                PullRequest::from_position(self.id(), before).with_epoch(self.epoch());
            request.full = true;
            let response = self.pull_from(transport, request).await?;
            let entries: Vec<LogEntry> = response
                .items
                .into_iter()
                .map_while(|item| match item {
                    PulledItem::Entry(entry) if entry.seq <= run.through.min(upto) => Some(entry),
                    _ => None,
                })
                .collect();
            let Some(last) = entries.last() else {
                return Err(PullError::Stalled {
                    position: before.seq,
                    latest: run.through,
                }
                .into());
            };
            let reached = Position {
                seq: last.seq,
                checksum: crate::entry::verify_chain(before.seq, before.checksum, &entries)
                    .map_err(ApplyError::from)?,
            };
            if reached.seq == run.through && reached.checksum != run.checksum {
                return Err(ApplyError::Chain(ChainError::Mismatch {
                    seq: run.through,
                    expected: run.checksum,
                    found: reached.checksum,
                })
                .into());
            }
            let txn = self.begin_write().await.map_err(ApplyError::from)?;
            let backend = txn.get_database_backend();
            let items: Vec<PulledItem> = entries.into_iter().map(PulledItem::Entry).collect();
            for statement in statements(backend, self.id(), before.seq, reached.seq, &items) {
                txn.execute_raw(statement).await.map_err(ApplyError::from)?;
            }
            let removed = skipped::Entity::delete_many()
                .filter(skipped::Column::LibraryId.eq(self.id().to_string()))
                .filter(skipped::Column::FromSeq.eq(run.from.0 as i64))
                .exec(&txn)
                .await
                .map_err(ApplyError::from)?;
            if removed.rows_affected != 1 {
                // Another handle filled it meanwhile: its rows stand, these roll back.
                continue;
            }
            if reached.seq < run.through {
                skipped::Entity::insert(skipped::ActiveModel {
                    library_id: Set(self.id().to_string()),
                    from_seq: Set(reached.seq.next().0 as i64),
                    through_seq: Set(run.through.0 as i64),
                    checksum: Set(run.checksum as i64),
                    not_held: Set(run.not_held),
                })
                .exec_without_returning(&txn)
                .await
                .map_err(ApplyError::from)?;
            }
            txn.commit().await.map_err(ApplyError::from)?;
            stored += items.len() as u64;
        }
    }
}

/// `at` moved over a skipped run, which must start right after it.
fn cover(at: Position, run: &SkippedRun) -> Result<Position, ChainError> {
    if run.from != at.seq.next() {
        return Err(ChainError::Gap {
            expected: at.seq.next(),
            found: run.from,
        });
    }
    Ok(Position {
        seq: run.through,
        checksum: run.checksum,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_follow_the_backend() {
        assert_eq!(
            insert_sql(DbBackend::Postgres, "t", "a, b", 2, 2),
            "INSERT INTO t (a, b) VALUES ($1, $2), ($3, $4)"
        );
        assert_eq!(
            insert_sql(DbBackend::Sqlite, "t", "a, b", 2, 1),
            "INSERT INTO t (a, b) VALUES (?, ?)"
        );
        assert_eq!(LOG_COLUMNS.split(", ").count(), LOG_COLUMN_COUNT);
    }
}
