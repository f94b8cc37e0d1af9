//! Offline writes: a follower's outbox, the push that empties it, the leader's side that
//! sequences (and merges) what it receives, and the conflicts a manual merge leaves.
//!
//! On a write-role follower, `Library::append` stores a transaction's changes in
//! `sync_outbox`, in the same transaction as the write, each with the follower's position
//! as its base. `push_outbox` sends the oldest changes to the leader; the leader takes them
//! in one transaction — merging each against what the follower had not seen (see
//! `merge.rs`), writing the result to its own tables and appending it to the log, and
//! recording the identity of every change it took — and acknowledges the request. Only
//! then does the follower delete those outbox rows. Each change carries an identity (UUID
//! v7) made when it was written: a push repeated after a lost acknowledgement, or by a
//! database restored from a backup or copied to another machine, is recognised change by
//! change, and nothing is logged twice or mistaken for another change.
//!
//! A change the leader's database cannot store (a value its backend refuses, a
//! constraint) is *rejected*: set aside with its reason on the leader and on its author,
//! while the rest of the push goes on; the leader logs its current state of the record, so
//! the author's copy converges to it.

use sea_orm::ActiveValue::Set;
use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectionTrait, DatabaseTransaction, DbBackend, DbErr,
    EntityTrait, IntoActiveModel, PaginatorTrait, QueryFilter, QueryOrder, QuerySelect,
    TransactionTrait,
};
use serde::Serialize;

use crate::capture::{self, CapturedChange};
use crate::decide::take;
use crate::follower::SyncError;
use crate::library::{changed_text, draft_from_pending, entry_from_row};
use crate::merge::{Concurrent, Fields, ModelRules};
use crate::protocol::{
    PROTOCOL_VERSION, PUSH_BYTES_MAX, PUSH_CHANGES_MAX, PushError, PushRequest, PushResponse,
    PushedChange, RejectedChange, Transport,
};
use crate::tables::{conflict, library, log, outbox, pending, pushed, rejected, taken};
use crate::{Access, Admission, ChangeOp, DeviceId, Hlc, Library, LogEntry, Seq};

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

/// An open conflict, as `Library::conflicts` lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Conflict {
    /// Its id, for `Library::resolve`.
    pub id: String,
    /// The record's model.
    pub model: String,
    /// The record's key.
    pub record_id: String,
    /// The value the library kept (the conflicting synced fields).
    pub local: serde_json::Value,
    /// The concurrent value set aside.
    pub remote: serde_json::Value,
    /// The device that wrote the value set aside.
    pub remote_device: String,
}

/// A change the leader could not store, as `Library::rejected` lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Rejected {
    /// The change's identity.
    pub change_id: String,
    /// The device that wrote it.
    pub device_id: String,
    /// Its model.
    pub model: String,
    /// Its record.
    pub record_id: String,
    /// `upsert` or `delete`.
    pub op: String,
    /// The synced fields it carried (JSON object text), for upserts.
    pub data: Option<String>,
    /// Why the leader could not store it.
    pub reason: String,
    /// When it was rejected (milliseconds since the Unix epoch, by this device's clock).
    pub rejected_at_ms: i64,
}

/// How to settle a conflict.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resolution {
    /// Keep the value the library kept.
    TakeLocal,
    /// Take the value that was set aside.
    TakeRemote,
    /// Set these synced fields (a JSON object).
    Value(serde_json::Map<String, serde_json::Value>),
}

/// Why a conflict could not be resolved.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ResolveError {
    /// No open conflict has this id (resolved already, here or elsewhere).
    #[error("no open conflict has id `{0}`; `Library::conflicts` lists the open ones")]
    NotFound(String),
    /// The conflict names a model this app does not know.
    #[error("conflict `{id}` is about model `{model}`, which this app does not know")]
    UnknownModel {
        /// The conflict.
        id: String,
        /// Its model.
        model: String,
    },
    /// The value does not fit the model.
    #[error("the value does not fit `{model}`: {reason}")]
    BadValue {
        /// The model.
        model: String,
        /// What does not fit.
        reason: String,
    },
    /// The database failed, or the write was refused (a read-role device, say).
    #[error(transparent)]
    Db(#[from] DbErr),
}

impl Library {
    /// Stores a follower transaction's changes in the outbox, based on the follower's
    /// current position. Runs inside that transaction.
    pub(crate) async fn append_outbox(
        &self,
        txn: &DatabaseTransaction,
        changes: Vec<CapturedChange>,
    ) -> Result<(), DbErr> {
        if txn.get_database_backend() != DbBackend::Sqlite {
            // Outbox ids must ascend in commit order: the leader acknowledges "everything up
            // to id N", so an id taken before N that commits after N would be skipped. With
            // concurrent writers (PostgreSQL, MySQL), appends take turns on the library's
            // row until commit; SQLite has one writer anyway.
            library::Entity::find_by_id(self.id().to_string())
                .lock_exclusive()
                .one(txn)
                .await?;
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
            if response.library_id != self.id() {
                return Err(PushError::Transport(format!(
                    "the leader acknowledged for library {}, not {}",
                    response.library_id,
                    self.id()
                ))
                .into());
            }
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
        }
    }

    /// The leader's side of a push: takes the changes it has not taken yet, in one
    /// transaction, and acknowledges the last outbox id taken.
    #[tracing::instrument(
        name = "take",
        skip_all,
        fields(
            library = %self.id(),
            device = %request.device_id,
            changes = request.changes.len(),
            latest
        )
    )]
    pub(crate) async fn serve_push(
        &self,
        request: &PushRequest,
    ) -> Result<PushResponse, PushError> {
        let started = std::time::Instant::now();
        let outcome = self.serve_push_checked(request).await;
        if let Ok(response) = &outcome {
            tracing::Span::current().record("latest", response.latest_seq.0);
        }
        crate::metrics::record_take(self.id(), request, &outcome, started);
        outcome
    }

    async fn serve_push_checked(&self, request: &PushRequest) -> Result<PushResponse, PushError> {
        take::check_envelope(request, self.id())?;
        let device = request.device_id;
        let refuse = |reason: &str| PushError::NotWriter {
            device,
            library: self.id(),
            reason: reason.to_owned(),
        };
        match self.admission(device).await? {
            Admission::Member(Access::Write | Access::Leader) => {}
            Admission::Member(Access::Read) => return Err(refuse("it has read access only")),
            Admission::Revoked(_) => return Err(refuse("it was revoked")),
            Admission::NotMember => return Err(refuse("it is not a member")),
        }
        take::check_changes(&request.changes, &|model| {
            self.registry.get(model).map(|ops| ops.schema_version())
        })?;
        let this = self.clone();
        let request = request.clone();
        let taken = self
            .transaction(move |txn| Box::pin(async move { this.take_push(txn, &request).await }))
            .await?;
        Ok(PushResponse {
            protocol_version: PROTOCOL_VERSION,
            library_id: self.id(),
            taken: taken.taken,
            already_taken: taken.already_taken,
            rejected: taken.rejected,
            latest_seq: self.latest_seq().await?,
        })
    }

    async fn take_push(
        &self,
        txn: &DatabaseTransaction,
        request: &PushRequest,
    ) -> Result<Taken, PushError> {
        if txn.get_database_backend() == DbBackend::Postgres {
            // Pushes take turns on PostgreSQL: two devices creating one id must see each
            // other's entry, and a record that does not exist yet has no row to lock. (MySQL
            // appends lock the library's row after the records, as local writes do, so it is
            // not taken first there: that order could deadlock; InnoDB's gap locks keep two
            // creates of one id apart.)
            library::Entity::find_by_id(self.id().to_string())
                .lock_exclusive()
                .one(txn)
                .await?;
        }
        let mut outcome = Taken::default();
        let mut newly_rejected = 0u64;
        // Outbox rows written before change identities were taken up to a per-device mark.
        let legacy_mark =
            pushed::Entity::find_by_id((self.id().to_string(), request.device_id.to_string()))
                .one(txn)
                .await?
                .map_or(0, |m| m.through);
        for change in &request.changes {
            let key = change.change_id.to_string();
            if take::taken_before_identities(change, request.device_id, legacy_mark) {
                // Written and taken before this build: its acknowledgement was lost.
                outcome.already_taken += 1;
                continue;
            }
            if taken::Entity::find_by_id(key.clone())
                .lock_exclusive()
                .one(txn)
                .await?
                .is_some()
            {
                // Taken by an earlier push: its acknowledgement was lost, or this
                // device's database was restored from a backup or copied. A change set
                // aside then is reported again, so that its author learns it.
                outcome.already_taken += 1;
                if let Some(rejected) = rejected::Entity::find_by_id(key).one(txn).await? {
                    outcome.rejected.push(RejectedChange {
                        change_id: change.change_id,
                        model: rejected.model,
                        record_id: rejected.record_id,
                        reason: rejected.reason,
                    });
                }
                continue;
            }
            // Each change in a savepoint of its own: one the database refuses is undone
            // alone, and the rest of the push goes on.
            txn.execute_unprepared("SAVEPOINT sync_take_change").await?;
            let mark = capture::savepoint()?;
            match self.take_change(txn, request.device_id, change).await {
                Ok(()) => {
                    txn.execute_unprepared("RELEASE SAVEPOINT sync_take_change")
                        .await?;
                    outcome.taken += 1;
                }
                Err(e) => {
                    let Some(reason) = rejection_reason(&e) else {
                        // Not the change's fault (a lost connection, a deadlock): the
                        // whole push fails and is retried.
                        return Err(e);
                    };
                    txn.execute_unprepared("ROLLBACK TO SAVEPOINT sync_take_change")
                        .await?;
                    txn.execute_unprepared("RELEASE SAVEPOINT sync_take_change")
                        .await?;
                    capture::rollback_to(mark)?;
                    newly_rejected += 1;
                    self.reject(txn, request.device_id, change, &reason).await?;
                    outcome.rejected.push(RejectedChange {
                        change_id: change.change_id,
                        model: change.model.clone(),
                        record_id: change.record_id.clone(),
                        reason,
                    });
                }
            }
            taken::Entity::insert(taken::ActiveModel {
                change_id: Set(key),
                library_id: Set(self.id().to_string()),
                device_id: Set(request.device_id.to_string()),
                taken_at_ms: Set(chrono::Utc::now().timestamp_millis()),
            })
            .exec_without_returning(txn)
            .await?;
        }
        crate::library::save_clock_floor(txn, self.id(), &self.context.clock).await?;
        crate::metrics::record_taken(self.id(), request.device_id, outcome.taken);
        if newly_rejected > 0 {
            // Rejections reported again (after a lost answer) are not counted again.
            crate::metrics::record_rejected(
                self.id(),
                request.device_id,
                "set_aside",
                newly_rejected,
            );
        }
        Ok(outcome)
    }

    /// Sets a change aside: records it with its reason, and logs the leader's current
    /// state of its record in the author's name, so that the author's copy (which holds the
    /// rejected value) converges to it.
    async fn reject(
        &self,
        txn: &DatabaseTransaction,
        device: DeviceId,
        change: &PushedChange,
        reason: &str,
    ) -> Result<(), PushError> {
        tracing::warn!(
            library = %self.id(),
            %device,
            change = %change.change_id,
            model = %change.model,
            record = %change.record_id,
            %reason,
            "a pushed change was rejected and set aside"
        );
        rejected::Entity::insert(rejected::ActiveModel {
            change_id: Set(change.change_id.to_string()),
            library_id: Set(self.id().to_string()),
            device_id: Set(device.to_string()),
            model: Set(change.model.clone()),
            record_id: Set(change.record_id.clone()),
            op: Set(change.op.as_str().to_owned()),
            data: Set(change.data.clone()),
            reason: Set(reason.to_owned()),
            rejected_at_ms: Set(chrono::Utc::now().timestamp_millis()),
        })
        .exec_without_returning(txn)
        .await?;
        let Some(ops) = self.registry.get(&change.model).cloned() else {
            return Ok(());
        };
        if !ops.parses_key(&change.record_id) {
            // Not a key of this model: no record to restate, and an entry naming it
            // would stop every follower.
            return Ok(());
        }
        let current = ops.current(txn, &change.record_id).await?;
        let (op, data, changed) = match current {
            Some(fields) => (
                ChangeOp::Upsert,
                Some(serde_json::to_string(&fields).map_err(|e| {
                    PushError::Db(DbErr::Json(format!(
                        "cannot serialise `{}` {}: {e}",
                        change.model, change.record_id
                    )))
                })?),
                ops.fields()
                    .iter()
                    .filter(|f| f.synced)
                    .map(|f| f.name)
                    .collect(),
            ),
            None => (ChangeOp::Delete, None, Vec::new()),
        };
        capture::record(CapturedChange {
            model: ops.sync_id(),
            record_id: change.record_id.clone(),
            op,
            data,
            changed,
            // The time of the state it restates, not of the rejected change: a restatement
            // must not beat other devices' concurrent edits that are newer than that state.
            hlc: last_hlc(txn, self.id(), &change.model, &change.record_id).await?,
            schema_version: ops.schema_version(),
            author: Some(device),
        })?;
        Ok(())
    }

    /// The changes set aside because the leader could not store them: on the leader every
    /// device's, on a follower its own. Oldest first.
    pub async fn rejected(&self) -> Result<Vec<Rejected>, DbErr> {
        let rows = rejected::Entity::find()
            .filter(rejected::Column::LibraryId.eq(self.id().to_string()))
            .order_by_asc(rejected::Column::RejectedAtMs)
            .order_by_asc(rejected::Column::ChangeId)
            .all(&self.db)
            .await?;
        Ok(rows
            .into_iter()
            .map(|r| Rejected {
                change_id: r.change_id,
                device_id: r.device_id,
                model: r.model,
                record_id: r.record_id,
                op: r.op,
                data: r.data,
                reason: r.reason,
                rejected_at_ms: r.rejected_at_ms,
            })
            .collect())
    }

    /// Rejected changes, counted.
    pub async fn rejected_count(&self) -> Result<u64, DbErr> {
        rejected::Entity::find()
            .filter(rejected::Column::LibraryId.eq(self.id().to_string()))
            .count(&self.db)
            .await
    }

    /// Forgets a rejected change once a person has dealt with it (re-entered the value in
    /// a form the leader accepts, say). Returns whether it was listed.
    pub async fn dismiss_rejected(&self, change_id: &str) -> Result<bool, DbErr> {
        let result = rejected::Entity::delete_many()
            .filter(rejected::Column::LibraryId.eq(self.id().to_string()))
            .filter(rejected::Column::ChangeId.eq(change_id))
            .exec(&self.db)
            .await?;
        Ok(result.rows_affected > 0)
    }

    async fn take_change(
        &self,
        txn: &DatabaseTransaction,
        device: DeviceId,
        change: &PushedChange,
    ) -> Result<(), PushError> {
        let bad = |reason: String| PushError::BadChange {
            id: change.id,
            model: change.model.clone(),
            reason,
        };
        let ops = self.registry.get(&change.model).cloned().ok_or_else(|| {
            bad("the leader's app does not know this model: update the leader's app".into())
        })?;
        let checked = take::check_change(change, self.context.clock.drift_limit()).map_err(bad)?;
        if checked.capped {
            tracing::warn!(%device, pushed = %change.hlc, limit = %checked.hlc, "a pushed change's clock is far ahead; capped");
        }
        self.context.clock.observe(checked.hlc);
        // Load what the decision needs, decide, then execute.
        let local = ops.filtered()
            && !ops
                .local_only(txn, vec![change.record_id.clone()])
                .await?
                .is_empty();
        let loaded = if local {
            take::Loaded {
                local,
                ..take::Loaded::default()
            }
        } else {
            take::Loaded {
                local,
                current: ops.current(txn, &change.record_id).await?,
                concurrent: concurrent_entries(
                    txn,
                    self,
                    &change.model,
                    &change.record_id,
                    change.base,
                    device,
                )
                .await?,
            }
        };
        let custom =
            |local: &Fields, remote: &Fields| ops.merge_custom(&change.record_id, local, remote);
        let rules = ModelRules {
            rule: ops.merge(),
            fields: ops.fields(),
            key_field: ops.key_field(),
            custom: &custom,
        };
        let decision = match take::plan(&rules, change, &checked, device, &loaded).map_err(bad)? {
            take::Plan::LocalRow { answer_with_delete } => {
                if answer_with_delete {
                    capture::record(CapturedChange::delete(
                        ops.sync_id(),
                        change.record_id.clone(),
                        self.context.clock.now(),
                        change.schema_version,
                        Some(device),
                    ))?;
                }
                return Ok(());
            }
            take::Plan::Merge(decision) => decision,
        };
        if let Some(write) = decision.write {
            let data = write
                .data
                .as_ref()
                .map(serde_json::to_string)
                .transpose()
                .map_err(|e| bad(e.to_string()))?;
            let entry = LogEntry {
                library_id: self.id(),
                seq: Seq::ZERO,
                model: change.model.clone(),
                record_id: change.record_id.clone(),
                op: write.op,
                data: data.clone(),
                changed: write.changed.clone(),
                device_id: device,
                hlc: write.hlc,
                schema_version: change.schema_version,
                checksum: 0,
            };
            crate::registry::apply_entries(ops.as_ref(), txn, &[&entry])
                .await
                .map_err(|(_, failure)| match failure {
                    crate::registry::ApplyFailure::Db(e) => PushError::Db(e),
                    crate::registry::ApplyFailure::BadPayload(reason) => bad(reason),
                })?;
            let changed = write
                .changed
                .iter()
                .filter_map(|f| ops.fields().iter().find(|s| s.name == f).map(|s| s.name))
                .collect();
            capture::record(CapturedChange {
                model: ops.sync_id(),
                record_id: change.record_id.clone(),
                op: write.op,
                data,
                changed,
                hlc: write.hlc,
                schema_version: change.schema_version,
                author: Some(device),
            })?;
        }
        if let Some(conflict) = decision.conflict {
            let text =
                |fields: &Fields| serde_json::to_string(fields).map_err(|e| bad(e.to_string()));
            conflict::ActiveModel {
                id: Set(uuid::Uuid::now_v7().to_string()),
                model: Set(change.model.clone()),
                record_id: Set(change.record_id.clone()),
                local: Set(text(&conflict.local)?),
                remote: Set(text(&conflict.remote)?),
                remote_device: Set(device.to_string()),
            }
            .insert(txn)
            .await?;
        }
        Ok(())
    }

    /// The open conflicts of this library, oldest first.
    pub async fn conflicts(&self) -> Result<Vec<Conflict>, DbErr> {
        let rows = conflict::Entity::find()
            .order_by_asc(conflict::Column::Id)
            .all(&self.db)
            .await?;
        rows.into_iter()
            .map(|row| {
                let parse = |text: &str| {
                    serde_json::from_str(text).map_err(|e| {
                        DbErr::Json(format!("conflict `{}` holds bad JSON: {e}", row.id))
                    })
                };
                Ok(Conflict {
                    local: parse(&row.local)?,
                    remote: parse(&row.remote)?,
                    id: row.id,
                    model: row.model,
                    record_id: row.record_id,
                    remote_device: row.remote_device,
                })
            })
            .collect()
    }

    /// Open conflicts, counted.
    pub async fn conflict_count(&self) -> Result<u64, DbErr> {
        conflict::Entity::find().count(&self.db).await
    }

    /// Settles a conflict: writes the chosen value to the record (unless it keeps the local
    /// one) and closes the conflict, in one recorded transaction — on a follower that is an
    /// outbox change like any other, and it reaches every device.
    pub async fn resolve(&self, id: &str, resolution: Resolution) -> Result<(), ResolveError> {
        let row = conflict::Entity::find_by_id(id.to_owned())
            .one(&self.db)
            .await?
            .ok_or_else(|| ResolveError::NotFound(id.to_owned()))?;
        let ops =
            self.registry
                .get(&row.model)
                .cloned()
                .ok_or_else(|| ResolveError::UnknownModel {
                    id: row.id.clone(),
                    model: row.model.clone(),
                })?;
        let values: Option<Fields> = match resolution {
            Resolution::TakeLocal => None,
            Resolution::TakeRemote => {
                Some(
                    serde_json::from_str(&row.remote).map_err(|e| ResolveError::BadValue {
                        model: row.model.clone(),
                        reason: e.to_string(),
                    })?,
                )
            }
            Resolution::Value(map) => Some(map),
        };
        if let Some(values) = &values {
            let synced = ops.fields();
            if let Some(unknown) = values
                .keys()
                .find(|k| !synced.iter().any(|f| f.synced && f.name == k.as_str()))
            {
                return Err(ResolveError::BadValue {
                    model: row.model.clone(),
                    reason: format!("`{unknown}` is not a synced field"),
                });
            }
        }
        let id = id.to_owned();
        self.transaction(move |txn| {
            Box::pin(async move {
                // Deleted through the hooks, so the closing is a change that syncs.
                let open = conflict::Entity::find_by_id(id.clone())
                    .one(txn)
                    .await?
                    .ok_or_else(|| ResolveError::NotFound(id.clone()))?;
                if let Some(values) = values {
                    ops.set_fields(txn, &open.record_id, &values)
                        .await
                        .map_err(|e| match e {
                            crate::registry::ApplyFailure::Db(e) => ResolveError::Db(e),
                            crate::registry::ApplyFailure::BadPayload(reason) => {
                                ResolveError::BadValue {
                                    model: open.model.clone(),
                                    reason,
                                }
                            }
                        })?;
                }
                open.into_active_model().delete(txn).await?;
                Ok(())
            })
        })
        .await
    }
}

/// Entries of `model`/`record_id` by devices other than `device`, after `base`: those the
/// pushing device had not seen. On PostgreSQL, committed entries still waiting for the
/// sequencer are newer than every logged one, so they count too.
async fn concurrent_entries(
    txn: &DatabaseTransaction,
    library: &Library,
    model: &str,
    record_id: &str,
    base: Seq,
    device: DeviceId,
) -> Result<Vec<Concurrent>, PushError> {
    let library_id = library.id().to_string();
    let device_text = device.to_string();
    let logged = log::Entity::find()
        .filter(log::Column::LibraryId.eq(library_id.clone()))
        .filter(log::Column::Model.eq(model))
        .filter(log::Column::RecordId.eq(record_id))
        .filter(log::Column::Seq.gt(base.0 as i64))
        .filter(log::Column::DeviceId.ne(device_text.clone()))
        .all(txn)
        .await?;
    let mut out = logged
        .into_iter()
        .map(|row| entry_from_row(row).map(|e| concurrent(&e)))
        .collect::<Result<Vec<_>, _>>()?;
    if txn.get_database_backend() == DbBackend::Postgres {
        let waiting = pending::Entity::find()
            .filter(pending::Column::LibraryId.eq(library_id))
            .filter(pending::Column::Model.eq(model))
            .filter(pending::Column::RecordId.eq(record_id))
            .filter(pending::Column::DeviceId.ne(device_text))
            .all(txn)
            .await?;
        for row in waiting {
            out.push(concurrent(&draft_from_pending(row)?));
        }
    }
    Ok(out)
}

/// The timestamp of the newest entry of a record (logged, or on PostgreSQL still waiting
/// for the sequencer); the clock's zero when it has none.
async fn last_hlc(
    txn: &DatabaseTransaction,
    library: crate::LibraryId,
    model: &str,
    record_id: &str,
) -> Result<Hlc, DbErr> {
    let logged = log::Entity::find()
        .filter(log::Column::LibraryId.eq(library.to_string()))
        .filter(log::Column::Model.eq(model))
        .filter(log::Column::RecordId.eq(record_id))
        .order_by_desc(log::Column::Seq)
        .one(txn)
        .await?
        .map_or(0, |row| row.hlc as u64);
    let waiting = if txn.get_database_backend() == DbBackend::Postgres {
        pending::Entity::find()
            .filter(pending::Column::LibraryId.eq(library.to_string()))
            .filter(pending::Column::Model.eq(model))
            .filter(pending::Column::RecordId.eq(record_id))
            .order_by_desc(pending::Column::Hlc)
            .one(txn)
            .await?
            .map_or(0, |row| row.hlc as u64)
    } else {
        0
    };
    Ok(Hlc::from_u64(logged.max(waiting)))
}

fn concurrent(entry: &LogEntry) -> Concurrent {
    Concurrent {
        op: entry.op,
        changed: entry.changed.clone(),
        hlc: entry.hlc,
        device: entry.device_id,
    }
}

/// What `take_push` did with a request's changes.
#[derive(Default)]
struct Taken {
    taken: u64,
    already_taken: u64,
    rejected: Vec<RejectedChange>,
}

/// The reason to set a change aside, for an error that is the change's own fault: its
/// payload, or a database refusing its values or constraints (`error::is_data_error`).
/// `None` for anything else (a lost connection, a full disk, a deadlock, a timeout): the
/// whole push fails and is retried, and nothing is set aside.
fn rejection_reason(e: &PushError) -> Option<String> {
    match e {
        PushError::BadChange { reason, .. } => Some(reason.clone()),
        PushError::Db(db) if crate::error::is_data_error(db) => Some(db.to_string()),
        _ => None,
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
