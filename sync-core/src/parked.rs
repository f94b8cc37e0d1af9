//! Pulled entries a follower cannot store: found, named, and set aside only when a person
//! says so.
//!
//! When this device's database refuses a pulled entry (a value it cannot store, a
//! constraint), the follower stops at it with `ApplyError::Stuck`, which names the seq,
//! the model, the record and the database's reason (`pinpoint` finds the entry when a
//! transaction of many fails). Nothing is skipped on its own. `FollowerView::park(seq)` records
//! the operator's decision; the next apply that reaches that seq stores the entry in
//! `sync_parked` instead of applying it, and moves on. Later entries of the same record
//! are parked behind it (applied out of order they would be overwritten by the parked one
//! on retry), so every record still sees its own entries in log order.
//! `FollowerView::retry_parked` applies the parked entries in seq order once the cause is fixed;
//! `FollowerView::drop_parked` forgets one for good.

use std::collections::{HashMap, HashSet};

use sea_orm::ActiveValue::Set;
use sea_orm::sea_query::OnConflict;
use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseTransaction, DbBackend, DbErr, EntityTrait,
    PaginatorTrait, QueryFilter, QueryOrder, QueryTrait, Statement,
};
use serde::Serialize;

use crate::follower::ApplyError;
use crate::protocol::{PROTOCOL_VERSION, PullRequest, PullResponse, PulledItem, Transport};
use crate::registry::ApplyFailure;
use crate::tables::parked;
use crate::{LibraryId, LogEntry, Seq};

/// The reason stored for an entry an operator parked.
const PARKED_BY_REQUEST: &str = "parked on request";

/// What the apply of one transaction parks instead of applying: the seqs an operator
/// asked for, and the records that already have a parked entry.
#[derive(Debug, Default)]
pub(crate) struct Parking {
    seqs: HashSet<u64>,
    records: HashMap<(String, String), u64>,
}

impl Parking {
    /// The library's parking requests and parked records, as `txn` sees them.
    pub(crate) async fn load(
        txn: &DatabaseTransaction,
        library: LibraryId,
        position: Seq,
    ) -> Result<Parking, DbErr> {
        let rows = parked::Entity::find()
            .filter(parked::Column::LibraryId.eq(library.to_string()))
            .all(txn)
            .await?;
        let mut parking = Parking::default();
        let mut stale = Vec::new();
        for row in rows {
            match (row.entry, row.model, row.record_id) {
                (Some(_), Some(model), Some(record)) => {
                    parking
                        .records
                        .entry((model, record))
                        .or_insert(row.seq as u64);
                }
                // A request made while an apply was passing that seq: the entry was
                // applied, and the request can never be met.
                _ if row.seq as u64 <= position.0 => stale.push(row.seq),
                _ => {
                    parking.seqs.insert(row.seq as u64);
                }
            }
        }
        if !stale.is_empty() {
            parked::Entity::delete_many()
                .filter(parked::Column::LibraryId.eq(library.to_string()))
                .filter(parked::Column::Seq.is_in(stale))
                .exec(txn)
                .await?;
        }
        Ok(parking)
    }

    /// Why `entry` is parked rather than applied, if it is; a parked entry's record then
    /// parks its later entries too.
    pub(crate) fn parks(&mut self, entry: &LogEntry) -> Option<String> {
        if self.seqs.is_empty() && self.records.is_empty() {
            return None;
        }
        let key = (entry.model.clone(), entry.record_id.clone());
        let reason = if self.seqs.remove(&entry.seq.0) {
            PARKED_BY_REQUEST.to_owned()
        } else if let Some(first) = self.records.get(&key) {
            format!("waits behind parked entry {first} of the same record")
        } else {
            return None;
        };
        self.records.entry(key).or_insert(entry.seq.0);
        Some(reason)
    }
}

/// The statement that stores `entry` as parked.
pub(crate) fn park_statement(
    backend: DbBackend,
    library: LibraryId,
    entry: &LogEntry,
    reason: &str,
) -> Result<Statement, ApplyError> {
    let text = serde_json::to_string(entry).map_err(|e| ApplyError::BadPayload {
        seq: entry.seq,
        model: entry.model.clone(),
        reason: format!("cannot park the entry: {e}"),
    })?;
    let row = parked::ActiveModel {
        library_id: Set(library.to_string()),
        seq: Set(entry.seq.0 as i64),
        model: Set(Some(entry.model.clone())),
        record_id: Set(Some(entry.record_id.clone())),
        entry: Set(Some(text)),
        reason: Set(reason.to_owned()),
        parked_at_ms: Set(chrono::Utc::now().timestamp_millis()),
    };
    Ok(parked::Entity::insert(row)
        .on_conflict(
            OnConflict::columns([parked::Column::LibraryId, parked::Column::Seq])
                .update_columns([
                    parked::Column::Model,
                    parked::Column::RecordId,
                    parked::Column::Entry,
                ])
                .to_owned(),
        )
        .build(backend))
}

/// A parked entry, as `Library::parked` lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Parked {
    /// The entry's seq.
    pub seq: Seq,
    /// Its model, once the entry has arrived.
    pub model: Option<String>,
    /// Its record, once the entry has arrived.
    pub record_id: Option<String>,
    /// False while the parked seq has not been pulled yet.
    pub arrived: bool,
    /// Why it is parked.
    pub reason: String,
}

/// What `FollowerView::retry_parked` did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Retried {
    /// Parked entries applied now (and no longer parked).
    pub applied: u64,
    /// Parked entries still parked, with the first failure's reason.
    pub still_parked: u64,
    /// Why the first entry that still fails does.
    pub first_failure: Option<String>,
}

/// Why parking was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ParkError {
    /// The seq is applied already.
    #[error(
        "entry {seq} is applied already (this follower's position is {position}); only entries after the position can be parked"
    )]
    Applied {
        /// The seq asked for.
        seq: Seq,
        /// The follower's position.
        position: Seq,
    },
    /// The database failed.
    #[error("database error: {0}")]
    Db(#[from] DbErr),
}

impl crate::Library {
    /// Sets the entry at `seq` aside: the next apply that reaches it stores it as parked
    /// instead of applying it, and later entries of the same record wait behind it. For an
    /// entry this device cannot store (`ApplyError::Stuck`), once a person has decided so.
    pub(crate) async fn park(&self, seq: Seq) -> Result<(), ParkError> {
        let position = self.position().await?.seq;
        if seq <= position {
            return Err(ParkError::Applied { seq, position });
        }
        let existing = parked::Entity::find_by_id((self.id().to_string(), seq.0 as i64))
            .one(&self.db)
            .await?;
        if existing.is_none() {
            parked::Entity::insert(parked::ActiveModel {
                library_id: Set(self.id().to_string()),
                seq: Set(seq.0 as i64),
                model: Set(None),
                record_id: Set(None),
                entry: Set(None),
                reason: Set(PARKED_BY_REQUEST.to_owned()),
                parked_at_ms: Set(chrono::Utc::now().timestamp_millis()),
            })
            .exec_without_returning(&self.db)
            .await?;
        }
        Ok(())
    }

    /// The parked entries (and parking requests not reached yet), by seq.
    pub async fn parked(&self) -> Result<Vec<Parked>, DbErr> {
        let rows = parked::Entity::find()
            .filter(parked::Column::LibraryId.eq(self.id().to_string()))
            .order_by_asc(parked::Column::Seq)
            .all(&self.db)
            .await?;
        Ok(rows
            .into_iter()
            .map(|r| Parked {
                seq: Seq(r.seq as u64),
                arrived: r.entry.is_some(),
                model: r.model,
                record_id: r.record_id,
                reason: r.reason,
            })
            .collect())
    }

    /// Parked entries and requests, counted.
    pub async fn parked_count(&self) -> Result<u64, DbErr> {
        parked::Entity::find()
            .filter(parked::Column::LibraryId.eq(self.id().to_string()))
            .count(&self.db)
            .await
    }

    /// Forgets the parked entry (or request) at `seq` for good: the record keeps what it
    /// has on this device. Returns whether there was one.
    pub(crate) async fn drop_parked(&self, seq: Seq) -> Result<bool, DbErr> {
        let result = parked::Entity::delete_many()
            .filter(parked::Column::LibraryId.eq(self.id().to_string()))
            .filter(parked::Column::Seq.eq(seq.0 as i64))
            .exec(&self.db)
            .await?;
        Ok(result.rows_affected > 0)
    }

    /// Applies the parked entries that have arrived, in seq order, each on its own (a
    /// savepoint), in one transaction: those that now apply leave the parking; one that
    /// still fails stays, and so do the later entries of its record.
    pub(crate) async fn retry_parked(&self) -> Result<Retried, ApplyError> {
        let txn = self.begin_write().await?;
        let rows = parked::Entity::find()
            .filter(parked::Column::LibraryId.eq(self.id().to_string()))
            .filter(parked::Column::Entry.is_not_null())
            .order_by_asc(parked::Column::Seq)
            .all(&txn)
            .await?;
        let mut outcome = Retried::default();
        let mut blocked: HashSet<(String, String)> = HashSet::new();
        for row in rows {
            let Some(text) = row.entry.as_deref() else {
                continue;
            };
            let entry: LogEntry = serde_json::from_str(text).map_err(|e| {
                ApplyError::Db(DbErr::Json(format!(
                    "parked entry {} is corrupt: {e}",
                    row.seq
                )))
            })?;
            let key = (entry.model.clone(), entry.record_id.clone());
            if blocked.contains(&key) {
                outcome.still_parked += 1;
                continue;
            }
            txn.execute_unprepared("SAVEPOINT sync_retry_parked")
                .await?;
            match self.apply_parked(&txn, &entry).await {
                Ok(()) => {
                    txn.execute_unprepared("RELEASE SAVEPOINT sync_retry_parked")
                        .await?;
                    parked::Entity::delete_many()
                        .filter(parked::Column::LibraryId.eq(self.id().to_string()))
                        .filter(parked::Column::Seq.eq(row.seq))
                        .exec(&txn)
                        .await?;
                    outcome.applied += 1;
                }
                Err(reason) => {
                    txn.execute_unprepared("ROLLBACK TO SAVEPOINT sync_retry_parked")
                        .await?;
                    outcome.first_failure.get_or_insert(format!(
                        "entry {} (`{}` record {}): {reason}",
                        entry.seq, entry.model, entry.record_id
                    ));
                    outcome.still_parked += 1;
                    blocked.insert(key);
                }
            }
        }
        txn.commit().await?;
        Ok(outcome)
    }

    async fn apply_parked(
        &self,
        txn: &DatabaseTransaction,
        entry: &LogEntry,
    ) -> Result<(), String> {
        let ops = self
            .registry
            .get(&entry.model)
            .ok_or_else(|| format!("this app does not know model `{}`", entry.model))?;
        if ops.schema_version() != entry.schema_version {
            return Err(format!(
                "schema version {} in the entry, {} in this app",
                entry.schema_version,
                ops.schema_version()
            ));
        }
        if ops.filtered()
            && !ops
                .local_only(txn, vec![entry.record_id.clone()])
                .await
                .map_err(|e| e.to_string())?
                .is_empty()
        {
            // The row became local to this device meanwhile: entries from elsewhere never
            // touch it (as in apply).
            return Ok(());
        }
        crate::registry::apply_entries(ops.as_ref(), txn, &[entry])
            .await
            .map_err(|(_, failure)| match failure {
                ApplyFailure::BadPayload(reason) => reason,
                ApplyFailure::Db(e) => e.to_string(),
            })
    }

    /// After a transaction of many entries failed with `error` from the database, finds
    /// the entry the database refuses: pulls the range again from `at` and applies it
    /// in halves, committing what applies, until one entry alone fails. Returns
    /// `ApplyError::Stuck` naming it, or `error` when no single entry reproduces it.
    pub(crate) async fn pinpoint(
        &self,
        transport: &dyn Transport,
        at: crate::Position,
        limit: u32,
        error: ApplyError,
    ) -> ApplyError {
        let ApplyError::Db(db) = &error else {
            return error;
        };
        if !crate::error::is_data_error(db) {
            // Not about an entry (a full disk, a lost connection): retried as it is.
            return error;
        }
        let mut request = PullRequest::from_position(self.id(), at).with_epoch(self.epoch());
        request.limit = limit;
        let Ok(response) = self.pull_from(transport, request).await else {
            return error;
        };
        let latest_seq = response.latest_seq;
        let epoch = response.epoch;
        let part = |items: Vec<PulledItem>| PullResponse {
            protocol_version: PROTOCOL_VERSION,
            library_id: self.id(),
            items,
            latest_seq,
            epoch,
        };
        let mut position = at.seq;
        let mut items = response.items;
        while !items.is_empty() {
            let half = items.len().div_ceil(2);
            let first: Vec<PulledItem> = items.drain(..half).collect();
            let single = match first.as_slice() {
                [PulledItem::Entry(entry)] => Some(entry.clone()),
                _ => None,
            };
            let alone = first.len() == 1;
            match self.apply(position, part(first.clone())).await {
                Ok(applied) => position = applied.position.seq,
                Err(ApplyError::Db(e)) if crate::error::is_data_error(&e) => match single {
                    Some(entry) => {
                        return ApplyError::Stuck {
                            seq: entry.seq,
                            model: entry.model,
                            record_id: entry.record_id,
                            reason: e.to_string(),
                        };
                    }
                    // A lone skipped run cannot be the cause: nothing to pin down.
                    None if alone => return error,
                    // The failure is in this half: look only there.
                    None => items = first,
                },
                Err(other) => return other,
            }
        }
        error
    }
}
