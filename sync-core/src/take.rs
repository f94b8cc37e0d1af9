//! The leader's side of a push: it takes the changes it has not taken yet, in one
//! transaction — merging each against what the follower had not seen (the plan is
//! `decide::take`'s, the merge `merge.rs`'s), writing the result to its own tables and
//! appending it to the log, and recording the identity of every change it took.
//!
//! A change the leader's database cannot store (a value its backend refuses, a
//! constraint) is *rejected*: set aside with its reason on the leader and on its author,
//! while the rest of the push goes on; the leader logs its current state of the record, so
//! the author's copy converges to it.

use sea_orm::ActiveValue::Set;
use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectionTrait, DatabaseTransaction, DbErr, EntityTrait,
    PaginatorTrait, QueryFilter, QueryOrder, QuerySelect,
};
use serde::Serialize;

use crate::backend;
use crate::capture::{self, CapturedChange};
use crate::decide::take;
use crate::library::{draft_from_pending, entry_from_row};
use crate::merge::{Concurrent, Fields, ModelRules};
use crate::protocol::{
    PROTOCOL_VERSION, PushError, PushRequest, PushResponse, PushedChange, RejectedChange,
};
use crate::tables::{conflict, log, pending, pushed, rejected, taken};
use crate::{ChangeOp, DeviceId, Hlc, Library, LogEntry, Seq};

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

impl Library {
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
        if let Some(epoch) = self.fenced_by(request.epoch).await? {
            return Err(PushError::Superseded { epoch });
        }
        let leadership = self.leadership();
        if let Some(to) = leadership.moving_to {
            return Err(PushError::Moving { to });
        }
        if leadership.taking_over {
            return Err(PushError::Moving {
                to: self.device_id(),
            });
        }
        if leadership.leader != self.device_id() {
            return Err(PushError::Moved {
                epoch: leadership.epoch,
                leader: leadership.leader,
            });
        }
        let device = request.device_id;
        let refuse = |reason: &str| PushError::NotWriter {
            device,
            library: self.id(),
            reason: reason.to_owned(),
        };
        crate::roles::may_push(self.admission(device).await?).map_err(refuse)?;
        take::check_changes(&request.changes, &|model| {
            self.registry.get(model).map(|ops| ops.schema_version())
        })?;
        let this = self.clone();
        let request = request.clone();
        let taken = self
            .transaction(move |txn| {
                Box::pin(async move { this.take_push(txn.unguarded(), &request).await })
            })
            .await?;
        Ok(PushResponse {
            protocol_version: PROTOCOL_VERSION,
            library_id: self.id(),
            taken: taken.taken,
            already_taken: taken.already_taken,
            rejected: taken.rejected,
            latest_seq: self.latest_seq().await?,
            epoch: self.epoch(),
        })
    }

    async fn take_push(
        &self,
        txn: &DatabaseTransaction,
        request: &PushRequest,
    ) -> Result<Taken, PushError> {
        if backend::of_connection(txn).push_takes_turns {
            // Two devices creating one id must see each other's entry (`backend/` says
            // why per backend).
            backend::take_turns(txn, self.id()).await?;
        }
        let mut outcome = Taken::default();
        let mut newly_rejected = 0u64;
        // Outbox rows written before change identities were taken up to the outbox id acknowledged per device.
        let acknowledged =
            pushed::Entity::find_by_id((self.id().to_string(), request.device_id.to_string()))
                .one(txn)
                .await?
                .map_or(0, |m| m.acknowledged);
        for change in &request.changes {
            let key = change.change_id.to_string();
            if take::taken_before_identities(change, request.device_id, acknowledged) {
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
            if write.op == ChangeOp::Delete {
                // What the leader's database will cascade goes into the log first.
                for cascaded in crate::cascade::on_delete(
                    txn,
                    &self.context,
                    ops.sync_id(),
                    vec![change.record_id.clone()],
                )
                .await?
                {
                    capture::record(cascaded)?;
                }
            }
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
    if backend::of_connection(txn).pending_entries {
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
    let waiting = if backend::of_connection(txn).pending_entries {
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
