//! A planned handoff: the leader stops sequencing, waits until the target holds its whole
//! log, passes on the taken marks and the move record as the last entries of its epoch,
//! waits until the target has pulled them, and follows the new leader (see
//! ARCHITECTURE.md, *Leadership*).

use std::collections::HashMap;
use std::time::Duration;

use sea_orm::ActiveValue::Set;
use sea_orm::sea_query::{Expr, OnConflict};
use sea_orm::{ColumnTrait, ConnectionTrait, DbErr, EntityTrait, QueryFilter, QueryOrder};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::follower::Position;
use crate::leadership::{
    LEADER_MODEL, Leadership, MoveKind, MoveRecord, MoveTerms, RESERVED_SCHEMA_VERSION,
    TAKEN_MODEL, parse_addresses,
};
use crate::library::{Tip, committed_tip};
use crate::tables::{device, library, position, taken};
use crate::{Access, ChangeOp, DeviceId, Epoch, KeyFingerprint, Library, LibraryId, LogEntry, Seq};

/// Taken marks per `sync.taken` entry.
pub(crate) const TAKEN_PER_ENTRY: usize = 1_000;

/// The positions followers' pulls showed the leader: the position a pull stated (and the
/// leader verified: same seq, same checksum) or the end of what it was served, whichever is
/// later. A handoff waits on it.
pub(crate) type PullsSeen = watch::Sender<HashMap<DeviceId, Position>>;

/// One `sync.taken` entry's data: changes the leader took, by identity, with their author.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct TakenMarks {
    /// `(change id, device id)`.
    pub taken: Vec<(String, String)>,
}

/// What a finished handoff did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HandOff {
    /// The new leader.
    pub to: DeviceId,
    /// The epoch it leads in.
    pub epoch: Epoch,
    /// The seq of the move record (the last entry of the old epoch).
    pub record_seq: Seq,
    /// Taken marks passed on (`sync.taken` entries before the record).
    pub taken_marks: usize,
}

/// Why a handoff did not happen (or did not finish).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HandOffError {
    /// The target is this device.
    #[error("device {0} leads the library already")]
    ToItself(DeviceId),
    /// The target may not lead: not a member, read access, or revoked.
    #[error(
        "device {device} cannot take over library {library}: {reason}; hand leadership to a \
         member with write access"
    )]
    NotWriteMember {
        /// The target.
        device: DeviceId,
        /// The library.
        library: LibraryId,
        /// Why not.
        reason: String,
    },
    /// The leader does not know the target's key: followers could not pin it.
    #[error(
        "the membership holds no key for device {0} (it joined before keys were recorded); it \
         must join again with a new invite before it can lead"
    )]
    KeyUnknown(DeviceId),
    /// A handoff is under way already, or this leader has been replaced.
    #[error(
        "this device is not sequencing the library (a handoff is under way, or it was replaced)"
    )]
    NotSequencing,
    /// The target did not reach the leader's whole log in time. Nothing moved: the leader
    /// sequences again (its writes made meanwhile were sequenced from its outbox).
    #[error(
        "device {device} did not catch up within {waited:?} (it showed seq {shown:?}, the log \
         ends at seq {tip}); the leader goes on leading — make sure the target is online and \
         following, then try again"
    )]
    NotCaughtUp {
        /// The target.
        device: DeviceId,
        /// What it showed last.
        shown: Option<Seq>,
        /// The leader's last seq.
        tip: Seq,
        /// How long the leader waited.
        waited: Duration,
    },
    /// The move record is written, but the target had not pulled it before the deadline.
    /// The move stands: this device follows the new leader, and the target takes over
    /// once it pulls the record.
    #[error(
        "the move to device {device} is recorded (seq {record_seq}), but it had not pulled it \
         within {waited:?}; this device now follows it, and it leads once it pulls the record"
    )]
    NotPulled {
        /// The target.
        device: DeviceId,
        /// The move record's seq.
        record_seq: Seq,
        /// How long the leader waited.
        waited: Duration,
    },
    /// The key could not sign.
    #[error(transparent)]
    Key(#[from] crate::KeyError),
    /// The database failed.
    #[error("database error: {0}")]
    Db(#[from] DbErr),
}

impl Library {
    /// Notes where a follower's pull showed it (see [`PullsSeen`]).
    pub(crate) fn note_pull_seen(&self, device: DeviceId, at: Position) {
        self.pulls_seen.send_if_modified(|seen| {
            let newer = seen.get(&device).is_none_or(|known| at.seq > known.seq);
            if newer {
                seen.insert(device, at);
            }
            newer
        });
    }

    /// Waits until `device` shows a position that `done` accepts, or `deadline` passes.
    async fn wait_for_pull(
        &self,
        device: DeviceId,
        deadline: tokio::time::Instant,
        done: impl Fn(Position) -> bool,
    ) -> Result<(), Option<Seq>> {
        let mut seen = self.pulls_seen.subscribe();
        loop {
            let at = seen.borrow_and_update().get(&device).copied();
            if at.is_some_and(&done) {
                return Ok(());
            }
            match tokio::time::timeout_at(deadline, seen.changed()).await {
                Ok(Ok(())) => {}
                _ => return Err(at.map(|p| p.seq)),
            }
        }
    }

    /// The planned handoff (see [`crate::LeaderView::hand_off`]).
    pub(crate) async fn hand_off(
        &self,
        to: DeviceId,
        within: Duration,
    ) -> Result<HandOff, HandOffError> {
        let started = tokio::time::Instant::now();
        let deadline = started + within;
        if to == self.device_id() {
            return Err(HandOffError::ToItself(to));
        }
        let target = device::Entity::find_by_id((self.id().to_string(), to.to_string()))
            .one(&self.db)
            .await?;
        let refuse = |reason: &str| HandOffError::NotWriteMember {
            device: to,
            library: self.id(),
            reason: reason.to_owned(),
        };
        let target = match target {
            None => return Err(refuse("it is not a member")),
            Some(row) if row.revoked_at_ms.is_some() => return Err(refuse("it was revoked")),
            Some(row) if Access::parse(&row.access) != Some(Access::Write) => {
                return Err(refuse("it has read access"));
            }
            Some(row) => row,
        };
        let key: KeyFingerprint = target
            .key
            .as_deref()
            .and_then(|k| k.parse().ok())
            .ok_or(HandOffError::KeyUnknown(to))?;
        let addresses = parse_addresses(target.addresses.as_deref())?;
        let signer = self
            .device_key()
            .await
            .map_err(|e| DbErr::Custom(e.to_string()))?;

        // Stop sequencing: no transaction is between deciding to sequence and its commit
        // once the gate is ours, and from now on this device's writes go to its outbox.
        {
            let _gate = self.sequencing_gate.write().await;
            if !self.sequences() {
                return Err(HandOffError::NotSequencing);
            }
            let current = self.leadership();
            self.set_leadership(Leadership {
                moving_to: Some(to),
                ..current
            });
        }
        // Entries committed before the gate closed and still pending (PostgreSQL).
        self.sequence().await?;
        let tip = committed_tip(&self.db, self.id(), false).await?;
        // From here on this device's writes wait in its outbox, based on its log's end.
        write_own_position(&self.db, self.id(), tip).await?;
        tracing::info!(library = %self.id(), %to, tip = %tip.seq, "handoff: sequencing stopped");

        // The target must hold the whole log: same seq, same checksum.
        let whole = Position {
            seq: tip.seq,
            checksum: tip.checksum,
        };
        if let Err(shown) = self.wait_for_pull(to, deadline, |p| p == whole).await {
            self.resume_sequencing().await?;
            return Err(HandOffError::NotCaughtUp {
                device: to,
                shown,
                tip: tip.seq,
                waited: started.elapsed(),
            });
        }

        // The taken marks, then the move record: the last entries of this epoch.
        let txn = self.begin_write().await?;
        crate::backend::take_turns(&txn, self.id()).await?;
        let tip = committed_tip(&txn, self.id(), true).await?;
        let marks = taken::Entity::find()
            .filter(taken::Column::LibraryId.eq(self.id().to_string()))
            .order_by_asc(taken::Column::ChangeId)
            .all(&txn)
            .await?;
        let taken_marks = marks.len();
        let mut drafts: Vec<LogEntry> = Vec::new();
        for (n, chunk) in marks.chunks(TAKEN_PER_ENTRY).enumerate() {
            let data = TakenMarks {
                taken: chunk
                    .iter()
                    .map(|m| (m.change_id.clone(), m.device_id.clone()))
                    .collect(),
            };
            drafts.push(self.reserved_draft(
                TAKEN_MODEL,
                format!("{}.{n}", self.epoch().next()),
                serde_json::to_string(&data).map_err(|e| DbErr::Json(e.to_string()))?,
            ));
        }
        let (mut rows, before_record) = Library::number(&drafts, tip);
        let epoch = self.epoch().next();
        let record = MoveRecord::sign(
            MoveTerms {
                library_id: self.id(),
                epoch,
                kind: MoveKind::Handoff,
                leader: to,
                key,
                addresses,
                after: Position {
                    seq: before_record.seq,
                    checksum: before_record.checksum,
                },
                forced: false,
            },
            &signer,
        )?;
        let record_draft = self.reserved_draft(LEADER_MODEL, epoch.to_string(), record.to_data());
        let (record_rows, end) = Library::number(&[record_draft], before_record);
        rows.extend(record_rows);
        for chunk in rows.chunks(crate::library::LOG_INSERT_ROWS_MAX) {
            crate::tables::log::Entity::insert_many(chunk.to_vec())
                .exec_without_returning(&txn)
                .await?;
        }
        library::Entity::update_many()
            .col_expr(library::Column::LeaderDeviceId, Expr::value(to.to_string()))
            .col_expr(library::Column::Epoch, Expr::value(epoch.0 as i64))
            .col_expr(
                library::Column::EpochStartSeq,
                Expr::value(end.seq.0 as i64),
            )
            .filter(library::Column::Id.eq(self.id().to_string()))
            .exec(&txn)
            .await?;
        write_own_position(&txn, self.id(), end).await?;
        txn.commit().await?;
        crate::library::advance(&self.tip, end);
        self.set_leadership(Leadership {
            leader: to,
            epoch,
            epoch_start_seq: end.seq,
            superseded_by: None,
            moving_to: None,
            taking_over: false,
        });
        self.membership_changed();
        tracing::info!(library = %self.id(), %to, %epoch, record = %end.seq, "handoff: move recorded");

        if self
            .wait_for_pull(to, deadline, |p| p.seq >= end.seq)
            .await
            .is_err()
        {
            return Err(HandOffError::NotPulled {
                device: to,
                record_seq: end.seq,
                waited: started.elapsed(),
            });
        }
        Ok(HandOff {
            to,
            epoch,
            record_seq: end.seq,
            taken_marks,
        })
    }

    /// A handoff that did not happen: sequence again, and take this device's own writes
    /// made meanwhile (its outbox) into the log.
    async fn resume_sequencing(&self) -> Result<(), DbErr> {
        let _gate = self.sequencing_gate.write().await;
        let txn = self.begin_write().await?;
        let rows = crate::tables::outbox::Entity::find()
            .filter(crate::tables::outbox::Column::LibraryId.eq(self.id().to_string()))
            .order_by_asc(crate::tables::outbox::Column::Id)
            .all(&txn)
            .await?;
        let mut drafts = Vec::with_capacity(rows.len());
        for row in &rows {
            let as_log = crate::tables::log::Model {
                library_id: row.library_id.clone(),
                seq: 0,
                model: row.model.clone(),
                record_id: row.record_id.clone(),
                op: row.op.clone(),
                data: row.data.clone(),
                changed: row.changed.clone(),
                device_id: self.device_id().to_string(),
                hlc: row.hlc,
                schema_version: row.schema_version,
                checksum: 0,
            };
            drafts.push(
                crate::library::entry_from_row(as_log)
                    .map_err(|e| DbErr::Custom(format!("outbox row {}: {e}", row.id)))?,
            );
        }
        crate::tables::outbox::Entity::delete_many()
            .filter(crate::tables::outbox::Column::LibraryId.eq(self.id().to_string()))
            .exec(&txn)
            .await?;
        let current = self.leadership();
        self.set_leadership(Leadership {
            moving_to: None,
            ..current
        });
        let appended = crate::backend::append(&txn, self.id(), *self.tip.borrow(), &drafts).await?;
        txn.commit().await?;
        match appended {
            crate::library::Appended::Sequenced(tip) => crate::library::advance(&self.tip, tip),
            crate::library::Appended::Pending => self.sequence().await?,
            _ => {}
        }
        Ok(())
    }

    /// A reserved entry authored by this device now, without its seq and checksum.
    fn reserved_draft(&self, model: &str, record_id: String, data: String) -> LogEntry {
        LogEntry {
            library_id: self.id(),
            seq: Seq::ZERO,
            model: model.to_owned(),
            record_id,
            op: ChangeOp::Upsert,
            data: Some(data),
            changed: Vec::new(),
            device_id: self.device_id(),
            hlc: self.context.clock.now(),
            schema_version: RESERVED_SCHEMA_VERSION,
            checksum: 0,
        }
    }
}

/// This device's position in its own log (a leader that hands off becomes a follower
/// there; its outbox bases its writes on it).
async fn write_own_position<C: ConnectionTrait>(
    db: &C,
    library_id: LibraryId,
    at: Tip,
) -> Result<(), DbErr> {
    position::Entity::insert(position::ActiveModel {
        library_id: Set(library_id.to_string()),
        seq: Set(at.seq.0 as i64),
        checksum: Set(at.checksum as i64),
        updated_at_ms: Set(chrono::Utc::now().timestamp_millis()),
    })
    .on_conflict(
        OnConflict::column(position::Column::LibraryId)
            .update_columns([
                position::Column::Seq,
                position::Column::Checksum,
                position::Column::UpdatedAtMs,
            ])
            .to_owned(),
    )
    .exec_without_returning(db)
    .await
    .map(|_| ())
}

/// Records taken marks passed on by a handoff (on every member: any of them may lead
/// next), so that a push the old leader acknowledged is not taken twice.
pub(crate) async fn store_taken_marks<C: ConnectionTrait>(
    db: &C,
    library_id: LibraryId,
    marks: &TakenMarks,
) -> Result<(), DbErr> {
    let now_ms = chrono::Utc::now().timestamp_millis();
    for chunk in marks.taken.chunks(250) {
        let rows = chunk
            .iter()
            .map(|(change_id, device_id)| taken::ActiveModel {
                change_id: Set(change_id.clone()),
                library_id: Set(library_id.to_string()),
                device_id: Set(device_id.clone()),
                taken_at_ms: Set(now_ms),
            });
        taken::Entity::insert_many(rows)
            .on_conflict(
                OnConflict::column(taken::Column::ChangeId)
                    .do_nothing()
                    .to_owned(),
            )
            .exec_without_returning(db)
            .await
            .or_else(|e| match e {
                // Every mark of the chunk was stored already.
                DbErr::RecordNotInserted => Ok(0),
                e => Err(e),
            })?;
    }
    Ok(())
}
