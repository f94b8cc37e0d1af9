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
    INVITE_MODEL, LEADER_MODEL, Leadership, MEMBER_MODEL, MemberRecord, MoveKind, MoveRecord,
    MoveTerms, PEER_MODEL, REJECTED_MODEL, RESERVED_SCHEMA_VERSION, TAKEN_MODEL, parse_addresses,
};
use crate::library::{Tip, committed_tip};
use crate::tables::{device, invite, library, peer, position, rejected, taken};
use crate::{Access, ChangeOp, DeviceId, Epoch, KeyFingerprint, Library, LibraryId, LogEntry, Seq};

/// Taken marks per `sync.taken` entry.
pub(crate) const TAKEN_PER_ENTRY: usize = 1_000;

/// What followers' pulls showed the leader, and what this device's own pulls state.
#[derive(Debug)]
pub(crate) struct PullsSeen {
    /// The position a pull stated (and the leader verified: same seq, same checksum) or the
    /// end of what it was served, whichever is later. A handoff waits on it.
    positions: watch::Sender<HashMap<DeviceId, Position>>,
    /// Where each follower said it serves (`PullRequest::serves_at`): a handoff names the
    /// target's addresses in the move record.
    serves_at: std::sync::Mutex<HashMap<DeviceId, Vec<String>>>,
    /// Where this device's server listens, stated in its own pulls.
    own: std::sync::RwLock<Vec<String>>,
}

impl Default for PullsSeen {
    fn default() -> Self {
        PullsSeen {
            positions: watch::Sender::new(HashMap::new()),
            serves_at: std::sync::Mutex::default(),
            own: std::sync::RwLock::default(),
        }
    }
}

/// One `sync.taken` entry's data: changes the leader took, by identity, with their author.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct TakenMarks {
    /// `(change id, device id)`.
    pub taken: Vec<(String, String)>,
}

/// What a leader holds that followers do not, passed on by a handoff as the data of
/// `sync.invite`, `sync.peer` and `sync.rejected` entries (each entry carries one kind, in
/// chunks). Only the device named `to` stores it: it is the next leader's.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct LeaderState {
    /// The device taking over.
    pub to: DeviceId,
    /// Invites not yet expired (used ones too, so a copy left open elsewhere is closed).
    #[serde(default)]
    pub invites: Vec<PassedInvite>,
    /// Followers' positions: `(device id, seq, last seen ms)`.
    #[serde(default)]
    pub peers: Vec<(String, i64, i64)>,
    /// Pushed changes set aside.
    #[serde(default)]
    pub rejected: Vec<PassedRejected>,
}

/// One invite as a handoff passes it on: only the hash of its secret, as the leader keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct PassedInvite {
    pub secret_hash: String,
    pub access: String,
    pub created_at_ms: i64,
    pub expires_at_ms: i64,
    #[serde(default)]
    pub used_at_ms: Option<i64>,
    #[serde(default)]
    pub used_by: Option<String>,
}

/// One `sync_rejected` row as a handoff passes it on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct PassedRejected {
    pub change_id: String,
    pub device_id: String,
    pub model: String,
    pub record_id: String,
    pub op: String,
    #[serde(default)]
    pub data: Option<String>,
    pub reason: String,
    pub rejected_at_ms: i64,
}

/// Invites per `sync.invite` entry and positions per `sync.peer` entry.
const STATE_ROWS_PER_ENTRY: usize = 1_000;
/// Rejected changes per `sync.rejected` entry, at most, and the bytes of their data: each
/// holds a record's data (up to `RECORD_BYTES_MAX`), and an entry must stay servable.
const REJECTED_PER_ENTRY: usize = 100;
const REJECTED_BYTES_PER_ENTRY: usize = 1024 * 1024;

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
        self.pulls_seen.positions.send_if_modified(|seen| {
            let newer = seen.get(&device).is_none_or(|known| at.seq > known.seq);
            if newer {
                seen.insert(device, at);
            }
            newer
        });
    }

    /// Notes where a follower says it serves the library (its pulls' `serves_at`).
    pub(crate) fn note_serves_at(&self, device: DeviceId, addresses: &[String]) {
        if addresses.is_empty() {
            return;
        }
        let mut heard = self
            .pulls_seen
            .serves_at
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if heard.get(&device).is_none_or(|known| known != addresses) {
            heard.insert(device, addresses.to_vec());
        }
    }

    fn heard_serves_at(&self, device: DeviceId) -> Vec<String> {
        self.pulls_seen
            .serves_at
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&device)
            .cloned()
            .unwrap_or_default()
    }

    /// Where this device's server processes listen (`host:port`), stated in its pulls so
    /// that a leader handing off to it can tell the other followers where to find it.
    /// A server that serves the library whatever its role calls it once it listens.
    pub fn set_serving_addresses(&self, addresses: Vec<String>) {
        *self
            .pulls_seen
            .own
            .write()
            .unwrap_or_else(|p| p.into_inner()) = addresses;
    }

    /// What [`Library::set_serving_addresses`] set.
    pub fn serving_addresses(&self) -> Vec<String> {
        self.pulls_seen
            .own
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Waits until `device` shows a position that `done` accepts, or `deadline` passes.
    async fn wait_for_pull(
        &self,
        device: DeviceId,
        deadline: tokio::time::Instant,
        done: impl Fn(Position) -> bool,
    ) -> Result<(), Option<Seq>> {
        let mut seen = self.pulls_seen.positions.subscribe();
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
        let mut addresses = parse_addresses(target.addresses.as_deref())?;
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

        // Where the target serves, as its pulls said (else as the membership holds it).
        let heard = self.heard_serves_at(to);
        if !heard.is_empty() {
            addresses = heard;
        }
        // The taken marks, what else only the leader holds, the two members' new access,
        // then the move record: the last entries of this epoch.
        self.flush_peer_positions().await?;
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
        let epoch = self.epoch().next();
        drafts.extend(self.leader_state_drafts(&txn, to, epoch).await?);
        drafts.extend(self.new_access_drafts(&txn, to, &addresses).await?);
        let (mut rows, before_record) = Library::number(&drafts, tip);
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
        // Copied out: the watch's guard must not be held across the append (the handoff's
        // future is sent between threads, as a server's task).
        let tip = *self.tip.borrow();
        let appended = crate::backend::append(&txn, self.id(), tip, &drafts).await?;
        txn.commit().await?;
        match appended {
            crate::library::Appended::Sequenced(tip) => crate::library::advance(&self.tip, tip),
            crate::library::Appended::Pending => self.sequence().await?,
            _ => {}
        }
        Ok(())
    }

    /// The `sync.invite`, `sync.peer` and `sync.rejected` entries of a handoff to `to`
    /// (read in `txn`, which takes turns on the library's row).
    async fn leader_state_drafts<C: ConnectionTrait>(
        &self,
        txn: &C,
        to: DeviceId,
        epoch: Epoch,
    ) -> Result<Vec<LogEntry>, DbErr> {
        let now_ms = chrono::Utc::now().timestamp_millis();
        let invites: Vec<PassedInvite> = invite::Entity::find()
            .filter(invite::Column::LibraryId.eq(self.id().to_string()))
            .filter(invite::Column::ExpiresAtMs.gt(now_ms))
            .order_by_asc(invite::Column::SecretHash)
            .all(txn)
            .await?
            .into_iter()
            .map(|row| PassedInvite {
                secret_hash: row.secret_hash,
                access: row.access,
                created_at_ms: row.created_at_ms,
                expires_at_ms: row.expires_at_ms,
                used_at_ms: row.used_at_ms,
                used_by: row.used_by,
            })
            .collect();
        let peers: Vec<(String, i64, i64)> = self
            .peer_positions_now(txn)
            .await?
            .into_iter()
            .filter(|(device, _, _)| *device != to.to_string())
            .collect();
        let rejected: Vec<PassedRejected> = rejected::Entity::find()
            .filter(rejected::Column::LibraryId.eq(self.id().to_string()))
            .order_by_asc(rejected::Column::ChangeId)
            .all(txn)
            .await?
            .into_iter()
            .map(|row| PassedRejected {
                change_id: row.change_id,
                device_id: row.device_id,
                model: row.model,
                record_id: row.record_id,
                op: row.op,
                data: row.data,
                reason: row.reason,
                rejected_at_ms: row.rejected_at_ms,
            })
            .collect();
        let empty = LeaderState {
            to,
            invites: Vec::new(),
            peers: Vec::new(),
            rejected: Vec::new(),
        };
        let mut states: Vec<(&str, LeaderState)> = Vec::new();
        for chunk in invites.chunks(STATE_ROWS_PER_ENTRY) {
            states.push((
                INVITE_MODEL,
                LeaderState {
                    invites: chunk.to_vec(),
                    ..empty.clone()
                },
            ));
        }
        for chunk in peers.chunks(STATE_ROWS_PER_ENTRY) {
            states.push((
                PEER_MODEL,
                LeaderState {
                    peers: chunk.to_vec(),
                    ..empty.clone()
                },
            ));
        }
        let mut chunk: Vec<PassedRejected> = Vec::new();
        let mut bytes = 0;
        for row in rejected {
            let size = row.data.as_ref().map_or(0, String::len) + row.reason.len();
            if !chunk.is_empty()
                && (chunk.len() >= REJECTED_PER_ENTRY || bytes + size > REJECTED_BYTES_PER_ENTRY)
            {
                states.push((
                    REJECTED_MODEL,
                    LeaderState {
                        rejected: std::mem::take(&mut chunk),
                        ..empty.clone()
                    },
                ));
                bytes = 0;
            }
            bytes += size;
            chunk.push(row);
        }
        if !chunk.is_empty() {
            states.push((
                REJECTED_MODEL,
                LeaderState {
                    rejected: chunk,
                    ..empty.clone()
                },
            ));
        }
        let mut drafts = Vec::with_capacity(states.len());
        for (n, (model, state)) in states.into_iter().enumerate() {
            drafts.push(self.reserved_draft(
                model,
                format!("{epoch}.{n}"),
                serde_json::to_string(&state).map_err(|e| DbErr::Json(e.to_string()))?,
            ));
        }
        Ok(drafts)
    }

    /// The handoff's change to the membership: this device's row becomes a write member's,
    /// the target's the leader's, in `txn` and as `sync.member` entries for every member.
    async fn new_access_drafts<C: ConnectionTrait>(
        &self,
        txn: &C,
        to: DeviceId,
        addresses: &[String],
    ) -> Result<Vec<LogEntry>, DbErr> {
        let mut drafts = Vec::with_capacity(2);
        for (device, access) in [(self.device_id(), Access::Write), (to, Access::Leader)] {
            let mut update = device::Entity::update_many()
                .col_expr(device::Column::Access, Expr::value(access.as_str()));
            if device == to
                && let Some(text) = crate::leadership::addresses_text(addresses)
            {
                update = update.col_expr(device::Column::Addresses, Expr::value(text));
            }
            update
                .filter(device::Column::LibraryId.eq(self.id().to_string()))
                .filter(device::Column::DeviceId.eq(device.to_string()))
                .exec(txn)
                .await?;
            let row = device::Entity::find_by_id((self.id().to_string(), device.to_string()))
                .one(txn)
                .await?
                .ok_or_else(|| {
                    DbErr::RecordNotFound(format!("the membership row of device {device}"))
                })?;
            let record = MemberRecord::from_row(&row)?;
            drafts.push(self.reserved_draft(
                MEMBER_MODEL,
                device.to_string(),
                serde_json::to_string(&record).map_err(|e| DbErr::Json(e.to_string()))?,
            ));
        }
        Ok(drafts)
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

/// Stores what a handoff passed on to this device, the new leader: open invites (so a
/// token made before the move is redeemed here), followers' positions, rejected changes.
pub(crate) async fn store_leader_state<C: ConnectionTrait>(
    db: &C,
    library_id: LibraryId,
    state: &LeaderState,
) -> Result<(), DbErr> {
    let nothing_new = |e: DbErr| match e {
        // Every row of the chunk was stored already.
        DbErr::RecordNotInserted => Ok(()),
        e => Err(e),
    };
    for chunk in state.invites.chunks(250) {
        let rows = chunk.iter().map(|i| invite::ActiveModel {
            secret_hash: Set(i.secret_hash.clone()),
            library_id: Set(library_id.to_string()),
            access: Set(i.access.clone()),
            created_at_ms: Set(i.created_at_ms),
            expires_at_ms: Set(i.expires_at_ms),
            used_at_ms: Set(i.used_at_ms),
            used_by: Set(i.used_by.clone()),
        });
        invite::Entity::insert_many(rows)
            .on_conflict(
                OnConflict::column(invite::Column::SecretHash)
                    .update_columns([invite::Column::UsedAtMs, invite::Column::UsedBy])
                    .to_owned(),
            )
            .exec_without_returning(db)
            .await
            .map(|_| ())
            .or_else(nothing_new)?;
    }
    let newer = crate::peers::newer_sighting_wins(db.get_database_backend());
    for chunk in state.peers.chunks(250) {
        let rows = chunk
            .iter()
            .map(|(device, position, seen_at_ms)| peer::ActiveModel {
                library_id: Set(library_id.to_string()),
                device_id: Set(device.clone()),
                position: Set(*position),
                last_seen_ms: Set(*seen_at_ms),
            });
        peer::Entity::insert_many(rows)
            .on_conflict(
                OnConflict::columns([peer::Column::LibraryId, peer::Column::DeviceId])
                    .values(newer.clone())
                    .to_owned(),
            )
            .exec_without_returning(db)
            .await
            .map(|_| ())
            .or_else(nothing_new)?;
    }
    for chunk in state.rejected.chunks(50) {
        let rows = chunk.iter().map(|r| rejected::ActiveModel {
            change_id: Set(r.change_id.clone()),
            library_id: Set(library_id.to_string()),
            device_id: Set(r.device_id.clone()),
            model: Set(r.model.clone()),
            record_id: Set(r.record_id.clone()),
            op: Set(r.op.clone()),
            data: Set(r.data.clone()),
            reason: Set(r.reason.clone()),
            rejected_at_ms: Set(r.rejected_at_ms),
        });
        rejected::Entity::insert_many(rows)
            .on_conflict(
                OnConflict::column(rejected::Column::ChangeId)
                    .do_nothing()
                    .to_owned(),
            )
            .exec_without_returning(db)
            .await
            .map(|_| ())
            .or_else(nothing_new)?;
    }
    Ok(())
}
