//! A follower's offline writes: its outbox and the push that empties it.
//!
//! On a follower with write access, `Library::append` stores a transaction's changes in
//! `sync_outbox`, in the same transaction as the write, each with the follower's position
//! as its base. `push_outbox` sends the oldest changes to the leader (`take.rs` takes them)
//! and, once the leader acknowledged the request, deletes those outbox rows and keeps
//! the changes the leader rejected where the app can list them. Each change carries an
//! identity (UUID v7) made when it was written: a push repeated after a lost
//! acknowledgement, or by a database restored from a backup or copied to another machine,
//! is recognised change by change, and nothing is logged twice or mistaken for another.

use sea_orm::ActiveValue::Set;
use sea_orm::{
    ColumnTrait, DatabaseTransaction, DbErr, EntityTrait, PaginatorTrait, QueryFilter, QueryOrder,
    QuerySelect, TransactionTrait,
};
use serde::Serialize;

use crate::backend;
use crate::capture::CapturedChange;
use crate::decide::take;
use crate::follower::SyncError;
use crate::library::changed_text;
use crate::protocol::{
    PROTOCOL_VERSION, PUSH_BYTES_MAX, PUSH_CHANGES_MAX, PushError, PushRequest, PushedChange,
    Transport,
};
use crate::tables::{acknowledged, outbox, rejected};
use crate::{ChangeOp, DeviceId, Hlc, Library, Seq};

/// What one `push_outbox` did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PushOutcome {
    /// Outbox changes the leader acknowledged (and that left the outbox).
    pub acknowledged: u64,
    /// Of those, changes the leader could not store: set aside, listed by
    /// `Library::rejected`.
    pub rejected: u64,
    /// The leader's latest seq after the last push.
    pub latest_seq: Seq,
}

impl Library {
    /// Stores a follower transaction's changes in the outbox, based on the follower's
    /// current position. Runs inside that transaction.
    pub(crate) async fn append_outbox(
        &self,
        txn: &DatabaseTransaction,
        changes: Vec<CapturedChange>,
    ) -> Result<(), DbErr> {
        if backend::of_connection(txn).outbox_takes_turns {
            // Outbox ids must ascend in commit order, so that a device's changes are pushed
            // in the order they committed.
            backend::take_turns(txn, self.id()).await?;
        }
        let position = self.position_in(txn).await?.seq;
        let mut rows = Vec::with_capacity(changes.len());
        for c in changes {
            // A record with unpushed changes keeps their base: a pull since then may have
            // overwritten this device's earlier edit locally, and this write was made on top
            // of that; the leader must still see the earlier edit's concurrent entries as
            // concurrent with this one.
            let pending = outbox::Entity::find()
                .filter(outbox::Column::LibraryId.eq(self.id().to_string()))
                .filter(outbox::Column::Model.eq(c.model))
                .filter(outbox::Column::RecordId.eq(c.record_id.as_str()))
                .order_by_asc(outbox::Column::BaseSeq)
                .one(txn)
                .await?;
            let base = pending.map_or(position, |p| Seq(p.base_seq as u64));
            rows.push(outbox::ActiveModel {
                library_id: Set(self.id().to_string()),
                model: Set(c.model.to_owned()),
                record_id: Set(c.record_id),
                op: Set(c.op.as_str().to_owned()),
                data: Set(c.data),
                changed: Set(changed_text(&c.changed)),
                hlc: Set(c.hlc.as_u64() as i64),
                schema_version: Set(c.schema_version as i32),
                base_seq: Set(base.0 as i64),
                change_id: Set(Some(uuid::Uuid::now_v7().to_string())),
                ..Default::default()
            });
        }
        // One row per statement: the ids must follow write order on every backend.
        for row in rows {
            outbox::Entity::insert(row)
                .exec_without_returning(txn)
                .await?;
        }
        Ok(())
    }

    /// Changes waiting in this follower's outbox.
    pub async fn outbox_len(&self) -> Result<u64, DbErr> {
        outbox::Entity::find()
            .filter(outbox::Column::LibraryId.eq(self.id().to_string()))
            .count(&self.db)
            .await
    }

    /// Sends the outbox to the leader until it is empty (as of the start: writes made
    /// meanwhile go with the next call). Each acknowledged batch leaves the outbox in its
    /// own transaction; an interruption resends at most the unacknowledged batch, which the
    /// leader recognises.
    #[tracing::instrument(
        name = "push",
        skip_all,
        fields(library = %self.id(), device = %self.device_id(), outbox_through, latest)
    )]
    pub(crate) async fn push_outbox(
        &self,
        transport: &dyn Transport,
    ) -> Result<PushOutcome, SyncError> {
        let last = outbox::Entity::find()
            .filter(outbox::Column::LibraryId.eq(self.id().to_string()))
            .order_by_desc(outbox::Column::Id)
            .one(&self.db)
            .await
            .map_err(PushError::from)?;
        let Some(last) = last else {
            return Ok(PushOutcome::default());
        };
        let mut outcome = PushOutcome::default();
        loop {
            let rows = outbox::Entity::find()
                .filter(outbox::Column::LibraryId.eq(self.id().to_string()))
                .filter(outbox::Column::Id.lte(last.id))
                .order_by_asc(outbox::Column::Id)
                .limit(PUSH_CHANGES_MAX as u64)
                .all(&self.db)
                .await
                .map_err(PushError::from)?;
            if rows.is_empty() {
                return Ok(outcome);
            }
            let mut bytes = 0;
            let changes = rows
                .into_iter()
                .take_while(|row| {
                    let first = bytes == 0;
                    bytes += row.data.as_ref().map_or(0, String::len) + row.record_id.len() + 64;
                    first || bytes <= PUSH_BYTES_MAX
                })
                .map(|row| pushed_change(row, self.device_id()))
                .collect::<Result<Vec<_>, _>>()?;
            let sent: Vec<i64> = changes.iter().map(|c| c.id as i64).collect();
            // What this push will have said, kept once acknowledged until the pull brings
            // back its entries: `audit` takes it as this device's, not as drift.
            let said: Vec<(uuid::Uuid, acknowledged::ActiveModel)> = changes
                .iter()
                .map(|c| {
                    (
                        c.change_id,
                        acknowledged::ActiveModel {
                            change_id: Set(c.change_id.to_string()),
                            library_id: Set(self.id().to_string()),
                            model: Set(c.model.clone()),
                            record_id: Set(c.record_id.clone()),
                            op: Set(c.op.as_str().to_owned()),
                            data: Set(c.data.clone()),
                            through_seq: Set(0),
                        },
                    )
                })
                .collect();
            // Which outbox row carried which change: a rejected one is read back from it.
            let row_of: std::collections::HashMap<uuid::Uuid, i64> =
                changes.iter().map(|c| (c.change_id, c.id as i64)).collect();
            tracing::Span::current().record("outbox_through", changes.last().map_or(0, |c| c.id));
            let started = std::time::Instant::now();
            let response = transport
                .push(PushRequest {
                    protocol_version: PROTOCOL_VERSION,
                    library_id: self.id(),
                    device_id: self.device_id(),
                    changes,
                    epoch: self.epoch(),
                })
                .await?;
            crate::metrics::record_push(self.id(), started);
            tracing::Span::current().record("latest", response.latest_seq.0);
            if response.protocol_version != PROTOCOL_VERSION {
                return Err(PushError::VersionMismatch {
                    ours: PROTOCOL_VERSION,
                    theirs: response.protocol_version,
                }
                .into());
            }
            if let Err(stale) = crate::decide::epoch::check_answer(self.epoch(), response.epoch) {
                // A replaced leader's acknowledgement: the changes stay for the current one.
                return Err(PushError::StaleEpoch {
                    known: stale.known,
                    answered: stale.answered,
                }
                .into());
            }
            if response.library_id != self.id() {
                return Err(PushError::Transport(format!(
                    "the leader acknowledged for library {}, not {}",
                    response.library_id,
                    self.id()
                ))
                .into());
            }
            let rejected_ids: std::collections::HashSet<uuid::Uuid> =
                response.rejected.iter().map(|r| r.change_id).collect();
            let through = response.latest_seq.0 as i64;
            let said: Vec<acknowledged::ActiveModel> = said
                .into_iter()
                .filter(|(id, _)| !rejected_ids.contains(id))
                .map(|(_, mut row)| {
                    row.through_seq = Set(through);
                    row
                })
                .collect();
            let mut rejected_rows = Vec::with_capacity(response.rejected.len());
            for r in &response.rejected {
                let Some(row) = row_of.get(&r.change_id) else {
                    return Err(PushError::Transport(format!(
                        "the leader rejected change {}, which this push did not carry",
                        r.change_id
                    ))
                    .into());
                };
                tracing::warn!(
                    library = %self.id(),
                    change = %r.change_id,
                    model = %r.model,
                    record = %r.record_id,
                    reason = %r.reason,
                    "the leader rejected a change of this device; set aside (`Library::rejected`)"
                );
                rejected_rows.push((*row, r.change_id.to_string(), r.reason.clone()));
            }
            // The whole request is taken: its rows leave the outbox, and the rejected ones
            // are kept where the app can list them, in one transaction.
            let library_id = self.id().to_string();
            let device_id = self.device_id().to_string();
            let removed = self
                .db
                .transaction::<_, u64, DbErr>(move |txn| {
                    Box::pin(async move {
                        for (row, change_id, reason) in rejected_rows {
                            // Listed once, also when an acknowledgement was lost before.
                            let known = rejected::Entity::find_by_id(change_id.clone())
                                .one(txn)
                                .await?;
                            let Some(sent) = outbox::Entity::find_by_id(row).one(txn).await? else {
                                continue;
                            };
                            if known.is_none() {
                                rejected::Entity::insert(rejected::ActiveModel {
                                    change_id: Set(change_id),
                                    library_id: Set(library_id.clone()),
                                    device_id: Set(device_id.clone()),
                                    model: Set(sent.model),
                                    record_id: Set(sent.record_id),
                                    op: Set(sent.op),
                                    data: Set(sent.data),
                                    reason: Set(reason),
                                    rejected_at_ms: Set(chrono::Utc::now().timestamp_millis()),
                                })
                                .exec_without_returning(txn)
                                .await?;
                            }
                        }
                        for chunk in said.chunks(crate::library::LOG_INSERT_ROWS_MAX) {
                            // A push repeated after a lost acknowledgement says it again.
                            acknowledged::Entity::insert_many(chunk.to_vec())
                                .on_conflict(
                                    sea_orm::sea_query::OnConflict::column(
                                        acknowledged::Column::ChangeId,
                                    )
                                    .update_column(acknowledged::Column::ThroughSeq)
                                    .to_owned(),
                                )
                                .exec_without_returning(txn)
                                .await?;
                        }
                        let removed = outbox::Entity::delete_many()
                            .filter(outbox::Column::LibraryId.eq(library_id))
                            .filter(outbox::Column::Id.is_in(sent))
                            .exec(txn)
                            .await?;
                        Ok(removed.rows_affected)
                    })
                })
                .await
                .map_err(|e| match e {
                    sea_orm::TransactionError::Connection(e)
                    | sea_orm::TransactionError::Transaction(e) => PushError::from(e),
                })?;
            outcome.acknowledged += removed;
            crate::metrics::record_acknowledged(self.id(), removed);
            outcome.rejected += response.rejected.len() as u64;
            outcome.latest_seq = response.latest_seq;
            // What the leader announced: a promotion reports what only it held.
            self.leader_latest_seen
                .fetch_max(response.latest_seq.0, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

fn pushed_change(row: outbox::Model, device: DeviceId) -> Result<PushedChange, PushError> {
    let corrupt = |what: &str| {
        PushError::Db(DbErr::Custom(format!(
            "outbox row {} holds a bad {what}",
            row.id
        )))
    };
    let change_id = match &row.change_id {
        Some(text) => text.parse().map_err(|_| corrupt("change id"))?,
        None => take::legacy_change_id(device, row.id),
    };
    Ok(PushedChange {
        id: row.id as u64,
        change_id,
        op: ChangeOp::parse(&row.op).ok_or_else(|| corrupt("op"))?,
        changed: serde_json::from_str(&row.changed).map_err(|_| corrupt("changed list"))?,
        hlc: Hlc::from_u64(row.hlc as u64),
        schema_version: row.schema_version as u32,
        base: Seq(row.base_seq as u64),
        model: row.model,
        record_id: row.record_id,
        data: row.data,
    })
}
