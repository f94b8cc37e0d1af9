//! The old leader's return (issue 13 part 4): a device that sequenced (or applied) entries
//! on a branch of the log that a newer epoch did not keep rewinds onto the surviving
//! history. `decide::rewind` decides what becomes of each entry after the fork; this shell
//! loads them, and in one transaction: turns every app entry into an outbox change for the
//! new leader (a change id derived from the entry, so every device holding it makes the
//! same change and the new leader takes it once), records every entry and what became of
//! it in `sync_rewound` (`Library::rewound`), restores the records they touched to their
//! state at the fork, truncates its log after the fork, and takes the move record's epoch
//! and leader. Pulling from the new leader then brings the new epoch's entries; pushing
//! brings the rewound writes to it, merged by the models' rules.

use sea_orm::ActiveValue::Set;
use sea_orm::{ColumnTrait, DbErr, EntityTrait, QueryFilter, QueryOrder};

use crate::decide::epoch::{self as decide_epoch, MoveVerdict};
use crate::decide::promote::outranks;
use crate::decide::rewind::{self as decide_rewind, RecordKey};
use crate::follower::Position;
use crate::leadership::{LEADER_MODEL, Leadership, MoveRecord, superseded_key};
use crate::library::{Tip, changed_text, committed_tip, entry_from_row, read_log};
use crate::protocol::{PullError, PullRequest, PulledItem, Transport};
use crate::tables::{local, log, outbox, rewound};
use crate::{ChangeOp, DeviceId, Epoch, Library, LogEntry, Seq};

/// Entries read per page while looking for the move record.
const FIND_MOVE_PULL_ENTRIES: u32 = 1_000;

/// What a rewind did.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Rewind {
    /// The epoch this device now follows in.
    pub epoch: Epoch,
    /// Its leader.
    pub leader: DeviceId,
    /// The seq the surviving history shares with the abandoned branch.
    pub fork: Seq,
    /// Entries turned into outbox changes for the new leader.
    pub to_outbox: usize,
    /// Reserved entries set aside (taken marks, membership, move records).
    pub set_aside: usize,
    /// Records restored to their state at the fork.
    pub restored: usize,
}

/// One entry of an abandoned branch and what became of it (`Library::rewound`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct RewoundEntry {
    /// The epoch rewound onto.
    pub epoch: Epoch,
    /// The entry's seq on the abandoned branch.
    pub seq: Seq,
    /// The fork point.
    pub fork: Seq,
    /// The model.
    pub model: String,
    /// The record.
    pub record_id: String,
    /// Upsert or delete.
    pub op: ChangeOp,
    /// The entry's author.
    pub device_id: DeviceId,
    /// `outbox` (pushed to the new leader under `change_id`), `taken_marks`,
    /// `membership`, `move_record` or `unknown_reserved` (set aside), `not_pushed` (an app
    /// change on a device with read access).
    pub disposition: String,
    /// The change id it is pushed under, for an outbox change.
    pub change_id: Option<uuid::Uuid>,
}

/// Why a device could not rewind onto a newer epoch.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RewindError {
    /// The move record does not begin an epoch that outranks the one this device is in.
    #[error(
        "the move record begins epoch {record} led by {leader}, which does not outrank epoch \
         {known} led by {known_leader} (a higher epoch wins, a tie goes to the higher device \
         id); nothing to rewind"
    )]
    NotNewer {
        /// The record's epoch.
        record: Epoch,
        /// Its leader.
        leader: DeviceId,
        /// The epoch this device is in.
        known: Epoch,
        /// Its leader.
        known_leader: DeviceId,
    },
    /// The move record fails its check.
    #[error("the move record of epoch {epoch} is not to be trusted: {reason}")]
    Untrusted {
        /// Its epoch.
        epoch: Epoch,
        /// Why.
        reason: String,
    },
    /// This device's history differs from the new epoch's before the fork: there is no
    /// common point to rewind onto.
    #[error(
        "this device's log differs from epoch {epoch}'s before its fork point (seq {fork}): \
         it cannot rewind onto it; join the library again"
    )]
    Diverged {
        /// The new epoch.
        epoch: Epoch,
        /// The fork.
        fork: Seq,
    },
    /// This device applied entries after the fork that its log does not hold, so it cannot
    /// tell which records to restore.
    #[error(
        "this device applied the log up to seq {position} but holds it only up to seq \
         {held}: it cannot restore what it applied after the fork (seq {fork}); join the \
         library again"
    )]
    LogMissing {
        /// Its position.
        position: Seq,
        /// The end of the log it holds.
        held: Seq,
        /// The fork.
        fork: Seq,
    },
    /// The log this device holds has a run without entries before the fork (left out by
    /// its pulls): what a record was at the fork is not known here.
    #[error(
        "this device holds no entries of seqs {from}..={through}, before the fork (seq \
         {fork}): rewind with a transport to the new leader (`Library::rewind_with`), which \
         fetches them first"
    )]
    HeldLogGaps {
        /// The run's first seq.
        from: Seq,
        /// Its last.
        through: Seq,
        /// The fork.
        fork: Seq,
    },
    /// An abandoned entry is of a model this app does not register: its record cannot be
    /// restored.
    #[error(
        "entry {seq} after the fork is of model `{model}`, which this app does not register; \
         register it, then rewind again"
    )]
    UnknownModel {
        /// The entry.
        seq: Seq,
        /// Its model.
        model: String,
    },
    /// A record could not be restored to its state at the fork.
    #[error("record {record_id} of `{model}` could not be restored to the fork: {reason}")]
    Restore {
        /// The model.
        model: String,
        /// The record.
        record_id: String,
        /// Why.
        reason: String,
    },
    /// The member asked holds no move record newer than the epoch this device knows.
    #[error(
        "the member asked holds no move record newer than epoch {known} (its log ends at seq \
         {latest}); ask the current leader"
    )]
    NoMoveRecord {
        /// The epoch this device knows.
        known: Epoch,
        /// The end of the member's log.
        latest: Seq,
    },
    /// Pulling from the new leader failed.
    #[error(transparent)]
    Pull(#[from] PullError),
    /// Following the new leader afterwards failed (the rewind itself is done).
    #[error("rewound, but following the new leader failed: {0}")]
    Follow(#[from] crate::SyncError),
    /// The log could not be read.
    #[error(transparent)]
    Log(#[from] crate::LogError),
    /// The database failed.
    #[error("database error: {0}")]
    Db(#[from] DbErr),
}

impl Library {
    /// Rewinds this device onto the epoch `record` begins (see the module docs): the entries
    /// it holds after the record's fork point become outbox changes for the record's leader
    /// (its own writes and those its followers pushed to it alike), each recorded in
    /// [`Library::rewound`]; the records they touched go back to their state at the fork;
    /// the log after the fork is truncated; and this device follows the record's leader.
    /// Pull from it, then push ([`crate::FollowerView::sync_round`]), to finish.
    ///
    /// Refused when the record does not outrank the epoch this device is in, fails its
    /// check, or its fork point is not in this device's history.
    pub async fn rewind_onto(&self, record: &MoveRecord) -> Result<Rewind, RewindError> {
        let current = self.leadership();
        let ours = (current.epoch, current.leader);
        if !outranks((record.epoch, record.leader), ours) {
            return Err(RewindError::NotNewer {
                record: record.epoch,
                leader: record.leader,
                known: current.epoch,
                known_leader: current.leader,
            });
        }
        // Stop sequencing: no transaction is between deciding to sequence and its commit
        // once the gate is ours, and from now on this device's writes go to its outbox.
        {
            let _gate = self.sequencing_gate.write().await;
            self.stop_sequencing_for(record.epoch).await?;
        }
        // Entries committed before that and still pending (PostgreSQL) join the branch.
        self.sequence().await?;

        let _gate = self.sequencing_gate.write().await;
        let txn = self.begin_write().await?;
        crate::backend::take_turns(&txn, self.id()).await?;
        let fork = record.after_position();
        let held = committed_tip(&txn, self.id(), true).await?;
        let fork_checksum = if fork.seq == Seq::ZERO {
            Some(0)
        } else {
            log::Entity::find_by_id((self.id().to_string(), fork.seq.0 as i64))
                .one(&txn)
                .await?
                .map(|row| row.checksum as u64)
        };
        match fork_checksum {
            Some(checksum) if checksum != fork.checksum => {
                return Err(RewindError::Diverged {
                    epoch: record.epoch,
                    fork: fork.seq,
                });
            }
            // This device's log ends before the fork: nothing of it is abandoned. Its
            // position cannot be past what it holds, unless its log is incomplete.
            None if held.seq > fork.seq => {
                return Err(RewindError::Diverged {
                    epoch: record.epoch,
                    fork: fork.seq,
                });
            }
            _ => {}
        }
        // The history up to the fork must be whole here to know what each record was at
        // the fork (`rewind_with` fills it from the new leader first).
        if let Some(run) = crate::held::runs(&txn, self.id())
            .await?
            .into_iter()
            .find(|run| run.from <= fork.seq)
        {
            return Err(RewindError::HeldLogGaps {
                from: run.from,
                through: run.through,
                fork: fork.seq,
            });
        }
        let position = self.position_in(&txn).await?;
        if position.seq > held.seq.max(fork.seq) && current.leader != self.device_id() {
            return Err(RewindError::LogMissing {
                position: position.seq,
                held: held.seq,
                fork: fork.seq,
            });
        }

        // The record itself, as a follower applying it after the fork would check it.
        let before_epoch = Leadership {
            epoch: current.epoch.min(Epoch(record.epoch.0.saturating_sub(1))),
            ..current.clone()
        };
        let entry = LogEntry {
            library_id: self.id(),
            seq: fork.seq.next(),
            model: LEADER_MODEL.to_owned(),
            record_id: record.epoch.to_string(),
            op: ChangeOp::Upsert,
            data: Some(record.to_data()),
            changed: Vec::new(),
            device_id: record.leader,
            hlc: crate::Hlc::default(),
            schema_version: crate::leadership::RESERVED_SCHEMA_VERSION,
            checksum: 0,
        };
        let context =
            crate::leadership::move_context(&txn, self.id(), &before_epoch, record, &entry, fork)
                .await?;
        match decide_epoch::verify_move(record, &context) {
            Ok(MoveVerdict::Accept) => {}
            Ok(MoveVerdict::Historical) => {
                return Err(RewindError::NotNewer {
                    record: record.epoch,
                    leader: record.leader,
                    known: current.epoch,
                    known_leader: current.leader,
                });
            }
            Err(refusal) => {
                return Err(RewindError::Untrusted {
                    epoch: record.epoch,
                    reason: refusal.to_string(),
                });
            }
        }

        let suffix = read_log(&txn, self.id(), fork.seq, u64::MAX).await?;
        let plan =
            decide_rewind::plan(self.id(), fork, &suffix, !self.is_read_only()).map_err(|_| {
                RewindError::Diverged {
                    epoch: record.epoch,
                    fork: fork.seq,
                }
            })?;

        // The records the branch touched, back to the fork.
        for key in &plan.restore {
            self.restore_record(&txn, key, fork.seq).await?;
        }

        // The outbox: the branch's app entries first (they came first), then whatever
        // waited there already (writes made once this device stopped sequencing), every
        // one based at most on the fork.
        let waiting = outbox::Entity::find()
            .filter(outbox::Column::LibraryId.eq(self.id().to_string()))
            .order_by_asc(outbox::Column::Id)
            .all(&txn)
            .await?;
        outbox::Entity::delete_many()
            .filter(outbox::Column::LibraryId.eq(self.id().to_string()))
            .exec(&txn)
            .await?;
        let mut rows = Vec::new();
        for (entry, change_id) in plan.outbox() {
            rows.push(outbox::ActiveModel {
                library_id: Set(self.id().to_string()),
                model: Set(entry.model.clone()),
                record_id: Set(entry.record_id.clone()),
                op: Set(entry.op.as_str().to_owned()),
                data: Set(entry.data.clone()),
                changed: Set(changed_text(&entry.changed)),
                hlc: Set(entry.hlc.as_u64() as i64),
                schema_version: Set(entry.schema_version as i32),
                base_seq: Set(fork.seq.0 as i64),
                change_id: Set(Some(change_id.to_string())),
                ..Default::default()
            });
        }
        for row in waiting {
            rows.push(outbox::ActiveModel {
                library_id: Set(row.library_id),
                model: Set(row.model),
                record_id: Set(row.record_id),
                op: Set(row.op),
                data: Set(row.data),
                changed: Set(row.changed),
                hlc: Set(row.hlc),
                schema_version: Set(row.schema_version),
                base_seq: Set(row.base_seq.min(fork.seq.0 as i64)),
                change_id: Set(row.change_id),
                ..Default::default()
            });
        }
        // One row per statement: the ids must follow this order on every backend.
        for row in rows {
            outbox::Entity::insert(row)
                .exec_without_returning(&txn)
                .await?;
        }

        // What became of every entry, where the user sees it.
        let now_ms = chrono::Utc::now().timestamp_millis();
        for (entry, disposition) in &plan.entries {
            rewound::Entity::insert(rewound::ActiveModel {
                library_id: Set(self.id().to_string()),
                epoch: Set(record.epoch.0 as i64),
                seq: Set(entry.seq.0 as i64),
                fork_seq: Set(fork.seq.0 as i64),
                model: Set(entry.model.clone()),
                record_id: Set(entry.record_id.clone()),
                op: Set(entry.op.as_str().to_owned()),
                data: Set(entry.data.clone()),
                device_id: Set(entry.device_id.to_string()),
                hlc: Set(entry.hlc.as_u64() as i64),
                disposition: Set(disposition.as_str().to_owned()),
                change_id: Set(disposition.change_id().map(|id| id.to_string())),
                rewound_at_ms: Set(now_ms),
            })
            .exec_without_returning(&txn)
            .await?;
        }

        // The log after the fork, the epoch, the leader, and this device's position.
        log::Entity::delete_many()
            .filter(log::Column::LibraryId.eq(self.id().to_string()))
            .filter(log::Column::Seq.gt(fork.seq.0 as i64))
            .exec(&txn)
            .await?;
        crate::leadership::accept_move(&txn, self.id(), record, fork.seq.next()).await?;
        local::Entity::delete_by_id(superseded_key(self.id()))
            .exec(&txn)
            .await?;
        let at = if held.seq < fork.seq {
            Position {
                seq: held.seq.max(position.seq),
                checksum: if held.seq >= position.seq {
                    held.checksum
                } else {
                    position.checksum
                },
            }
        } else {
            fork
        };
        crate::follower::write_position(&txn, self.id(), at).await?;
        txn.commit().await?;

        self.tip.send_replace(Tip {
            seq: fork.seq.min(held.seq),
            checksum: if held.seq < fork.seq {
                held.checksum
            } else {
                fork.checksum
            },
        });
        let leadership = self.refresh_leadership().await?;
        self.membership_changed();
        self.outbox_changed();
        let to_outbox = plan.outbox().count();
        tracing::warn!(
            library = %self.id(),
            epoch = %leadership.epoch,
            leader = %leadership.leader,
            fork = %fork.seq,
            abandoned = plan.entries.len(),
            to_outbox,
            "rewound onto a newer epoch: the entries after the fork are outbox changes for \
             the new leader (see Library::rewound)"
        );
        Ok(Rewind {
            epoch: leadership.epoch,
            leader: leadership.leader,
            fork: fork.seq,
            to_outbox,
            set_aside: plan.entries.len() - to_outbox,
            restored: plan.restore.len(),
        })
    }

    /// Finds the move record of the newer epoch that `transport`'s leader leads in, rewinds
    /// onto it ([`Library::rewind_onto`]), then follows that leader: pulls its log and
    /// pushes the rewound changes. The call for an old leader that learnt it was replaced
    /// (`Library::superseded_by`, a `PushError::Superseded` or `StaleEpoch` answer).
    pub async fn rewind_with(&self, transport: &dyn Transport) -> Result<Rewind, RewindError> {
        let record = self.find_move_record(transport).await?;
        // The shared history, whole: what each record was at the fork is then known.
        self.fill_held_log_through(transport, record.after).await?;
        let rewind = self.rewind_onto(&record).await?;
        let follower = self
            .follower()
            .map_err(|e| DbErr::Custom(format!("after the rewind: {e}")))?;
        follower
            .sync_round(transport, FIND_MOVE_PULL_ENTRIES, |_, _| {})
            .await?;
        Ok(rewind)
    }

    /// The entries this device abandoned in rewinds, and what became of each, oldest first.
    pub async fn rewound(&self) -> Result<Vec<RewoundEntry>, DbErr> {
        let rows = rewound::Entity::find()
            .filter(rewound::Column::LibraryId.eq(self.id().to_string()))
            .order_by_asc(rewound::Column::Epoch)
            .order_by_asc(rewound::Column::Seq)
            .all(&self.db)
            .await?;
        rows.into_iter()
            .map(|row| {
                let bad =
                    |what: &str| DbErr::Custom(format!("sync_rewound row {}: bad {what}", row.seq));
                Ok(RewoundEntry {
                    epoch: Epoch(row.epoch as u64),
                    seq: Seq(row.seq as u64),
                    fork: Seq(row.fork_seq as u64),
                    op: ChangeOp::parse(&row.op).ok_or_else(|| bad("op"))?,
                    device_id: row.device_id.parse().map_err(|_| bad("device id"))?,
                    change_id: row
                        .change_id
                        .as_deref()
                        .map(str::parse)
                        .transpose()
                        .map_err(|_| bad("change id"))?,
                    model: row.model,
                    record_id: row.record_id,
                    disposition: row.disposition,
                })
            })
            .collect()
    }

    /// Notes that epoch `newer` exists so that nothing more is sequenced here (a leader),
    /// before a rewind.
    async fn stop_sequencing_for(&self, newer: Epoch) -> Result<(), DbErr> {
        if self.role() == crate::Role::Leader {
            let current = self.leadership();
            if newer > current.epoch {
                self.note_superseded(newer).await?;
            } else {
                // A tie lost to a higher device id: stop all the same.
                self.set_leadership(Leadership {
                    superseded_by: Some(newer),
                    ..current
                });
            }
        }
        Ok(())
    }

    /// Puts one record back to its state at the fork: its last entry at or before it, or
    /// deleted when it had none.
    async fn restore_record(
        &self,
        txn: &sea_orm::DatabaseTransaction,
        key: &RecordKey,
        fork: Seq,
    ) -> Result<(), RewindError> {
        let ops =
            self.registry
                .get(&key.model)
                .cloned()
                .ok_or_else(|| RewindError::UnknownModel {
                    seq: fork,
                    model: key.model.clone(),
                })?;
        let at_fork = log::Entity::find()
            .filter(log::Column::LibraryId.eq(self.id().to_string()))
            .filter(log::Column::Model.eq(key.model.as_str()))
            .filter(log::Column::RecordId.eq(key.record_id.as_str()))
            .filter(log::Column::Seq.lte(fork.0 as i64))
            .order_by_desc(log::Column::Seq)
            .one(txn)
            .await?
            .map(entry_from_row)
            .transpose()?;
        let entry = decide_rewind::restore_entry(self.id(), key, at_fork.as_ref(), fork);
        crate::registry::apply_entries(ops.as_ref(), txn, &[&entry])
            .await
            .map_err(|(_, failure)| RewindError::Restore {
                model: key.model.clone(),
                record_id: key.record_id.clone(),
                reason: format!("{failure:?}"),
            })
    }

    /// Finds where this device's log and `transport`'s leader's part (the fork), then
    /// pulls from there until the first move record of an epoch that outranks this
    /// device's.
    ///
    /// The fork is found by bisection over this device's log: a pull from a position
    /// the leader holds (same seq, same checksum) is served, one from past the fork is
    /// refused as another history; about log2(entries) pulls of one entry each.
    async fn find_move_record(&self, transport: &dyn Transport) -> Result<MoveRecord, RewindError> {
        let current = self.leadership();
        let held = committed_tip(&self.db, self.id(), false).await?;
        // Invariant: the leader serves `low`; it refuses every position above `high`.
        let (mut low, mut high) = (Position::default(), held.seq);
        while low.seq < high {
            let middle = Seq(low.seq.0 + (high.0 - low.seq.0).div_ceil(2));
            let Some(row) = log::Entity::find_by_id((self.id().to_string(), middle.0 as i64))
                .one(&self.db)
                .await?
            else {
                // Not held here (a run its pulls left out): try below it.
                high = Seq(middle.0 - 1);
                continue;
            };
            let probe = Position {
                seq: middle,
                checksum: row.checksum as u64,
            };
            let mut request =
                PullRequest::from_position(self.id(), probe).with_epoch(current.epoch);
            request.full = true;
            request.limit = 1;
            request.device = Some(self.device_id());
            match transport.pull(request).await {
                Ok(_) => low = probe,
                Err(PullError::HistoryDiverged(_)) => high = Seq(middle.0 - 1),
                Err(e) => return Err(e.into()),
            }
        }
        self.find_move_record_from(transport, low, &current).await
    }

    async fn find_move_record_from(
        &self,
        transport: &dyn Transport,
        start: Position,
        current: &Leadership,
    ) -> Result<MoveRecord, RewindError> {
        let mut from = start;
        loop {
            let mut request = PullRequest::from_position(self.id(), from).with_epoch(current.epoch);
            request.full = true;
            request.limit = FIND_MOVE_PULL_ENTRIES;
            request.device = Some(self.device_id());
            let response = transport.pull(request).await?;
            let entries: Vec<LogEntry> = response
                .items
                .into_iter()
                .filter_map(|item| match item {
                    PulledItem::Entry(entry) => Some(entry),
                    PulledItem::Skipped { .. } => None,
                })
                .collect();
            crate::entry::verify_chain(from.seq, from.checksum, &entries).map_err(|e| {
                RewindError::Pull(PullError::Transport(format!(
                    "the member's log does not chain: {e}"
                )))
            })?;
            for entry in &entries {
                if let Some(record) = MoveRecord::from_entry(entry)
                    && outranks(
                        (record.epoch, record.leader),
                        (current.epoch, current.leader),
                    )
                {
                    return Ok(record);
                }
            }
            let Some(last) = entries.last() else {
                return Err(RewindError::NoMoveRecord {
                    known: current.epoch,
                    latest: response.latest_seq,
                });
            };
            from = Position {
                seq: last.seq,
                checksum: last.checksum,
            };
            if from.seq >= response.latest_seq {
                return Err(RewindError::NoMoveRecord {
                    known: current.epoch,
                    latest: response.latest_seq,
                });
            }
        }
    }
}
