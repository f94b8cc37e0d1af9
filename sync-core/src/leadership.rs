//! Leadership that moves: the library's epoch, the move record, and the membership that
//! replicates to every member (see ARCHITECTURE.md, *Leadership*).
//!
//! Two kinds of log entries belong to sync-core itself, under reserved model ids that no
//! app model can take (ids starting `sync.`: the derive and `Registry::register` refuse
//! them):
//!
//! - [`MEMBER_MODEL`] (`sync.member`): one member's device id, key fingerprint, access,
//!   revocation and addresses ([`MemberRecord`]), record id = the device id. The leader
//!   writes one when it admits, revokes or announces a member, and all of them once
//!   (`members_logged.<library>` in `sync_local`) when the library first has a member
//!   besides itself. Followers apply them to `sync_device`, so every member knows every
//!   member's key and access.
//! - [`LEADER_MODEL`] (`sync.leader`): a [`MoveRecord`], record id = the new epoch. The
//!   last entry of an epoch: every follower learns the move by pulling it, and trusts it
//!   by its signature ([`crate::decide::epoch::verify_move`], one check for a handoff and
//!   a promotion).
//!
//! Followers apply reserved entries to the sync tables, never through the app's registry.

use std::sync::{Arc, RwLock};

use sea_orm::ActiveValue::Set;
use sea_orm::sea_query::OnConflict;
use sea_orm::{ColumnTrait, ConnectionTrait, DatabaseTransaction, DbErr, EntityTrait, QueryFilter};
use serde::{Deserialize, Serialize};

use crate::capture::CapturedChange;
use crate::decide::epoch::{self as decide_epoch, MoveContext, MoveVerdict, SignerMember};
use crate::follower::Position;
use crate::library::{get_local_value, set_local_value};
use crate::tables::{device, library};
use crate::{
    Access, ChangeOp, DeviceId, DeviceKey, Epoch, KeyFingerprint, Library, LibraryId, LogEntry,
    Role, Seq,
};

/// Model ids starting with this are sync-core's own; no app model may use one.
pub const RESERVED_MODEL_PREFIX: &str = "sync.";
/// The reserved model of membership entries ([`MemberRecord`]).
pub const MEMBER_MODEL: &str = "sync.member";
/// The reserved model of move records ([`MoveRecord`]).
pub const LEADER_MODEL: &str = "sync.leader";
/// The reserved model of taken marks a handoff passes on (`sync_taken` rows: which pushed
/// changes the leader took), so that the next leader takes none of them again.
pub const TAKEN_MODEL: &str = "sync.taken";
/// The reserved model of the open invites a handoff passes on to the new leader (the
/// hashes of their secrets and their terms), so an invite made before the move can be
/// redeemed after it.
pub const INVITE_MODEL: &str = "sync.invite";
/// The reserved model of the followers' positions a handoff passes on to the new leader.
pub const PEER_MODEL: &str = "sync.peer";
/// The reserved model of the pushed changes set aside (`sync_rejected`) that a handoff
/// passes on to the new leader, so that `Library::rejected` there still lists them.
pub const REJECTED_MODEL: &str = "sync.rejected";
/// The schema version of the reserved models' data.
pub const RESERVED_SCHEMA_VERSION: u32 = 1;

/// Whether a model id is reserved for sync-core.
pub fn is_reserved_model(model: &str) -> bool {
    model.starts_with(RESERVED_MODEL_PREFIX)
}

/// The `sync_local` mark saying the leader has logged every member once.
fn members_logged_key(library_id: LibraryId) -> String {
    format!("members_logged.{library_id}")
}

/// The `sync_local` key of the newer epoch a leader learnt it was replaced by.
pub(crate) fn superseded_key(library_id: LibraryId) -> String {
    format!("superseded_by.{library_id}")
}

/// The `sync_local` key that says this device applied the move record that makes it
/// leader and has not yet taken the log and its own outbox over (`take_over`).
pub(crate) fn taking_over_key(library_id: LibraryId) -> String {
    format!("taking_over.{library_id}")
}

/// One member as the log carries it (the data of a [`MEMBER_MODEL`] entry).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberRecord {
    /// The device.
    pub device_id: DeviceId,
    /// Its key fingerprint, when the leader knows it (members admitted by earlier builds
    /// may lack it).
    #[serde(default)]
    pub key: Option<KeyFingerprint>,
    /// What it may do.
    pub access: Access,
    /// The name it gave when it joined.
    #[serde(default)]
    pub name: Option<String>,
    /// When it joined (ms since the Unix epoch).
    pub added_at_ms: i64,
    /// When it was revoked, if it was.
    #[serde(default)]
    pub revoked_at_ms: Option<i64>,
    /// Where it says it can be reached when it leads (`host:port`).
    #[serde(default)]
    pub addresses: Vec<String>,
}

impl MemberRecord {
    pub(crate) fn from_row(row: &device::Model) -> Result<MemberRecord, DbErr> {
        let bad = |what: &str, e: &dyn std::fmt::Display| {
            DbErr::Custom(format!("sync_device row {}: {what}: {e}", row.device_id))
        };
        Ok(MemberRecord {
            device_id: row.device_id.parse().map_err(|e| bad("device id", &e))?,
            key: row
                .key
                .as_deref()
                .map(str::parse)
                .transpose()
                .map_err(|e| bad("key", &e))?,
            access: Access::parse(&row.access).ok_or_else(|| bad("access", &row.access))?,
            name: row.name.clone(),
            added_at_ms: row.added_at_ms,
            revoked_at_ms: row.revoked_at_ms,
            addresses: parse_addresses(row.addresses.as_deref())?,
        })
    }

    fn to_row(&self, library_id: LibraryId) -> device::ActiveModel {
        device::ActiveModel {
            library_id: Set(library_id.to_string()),
            device_id: Set(self.device_id.to_string()),
            access: Set(self.access.as_str().to_owned()),
            name: Set(self.name.clone()),
            added_at_ms: Set(self.added_at_ms),
            revoked_at_ms: Set(self.revoked_at_ms),
            key: Set(self.key.map(|k| k.to_string())),
            addresses: Set(addresses_text(&self.addresses)),
        }
    }
}

/// A member's addresses as `sync_device.addresses` stores them.
pub(crate) fn addresses_text(addresses: &[String]) -> Option<String> {
    // A list of strings always serialises.
    (!addresses.is_empty()).then(|| serde_json::to_string(addresses).unwrap_or_default())
}

/// `sync_device.addresses` read back: nothing for NULL, an error naming the text when it
/// is not a JSON list of strings (a row written by something other than this library).
pub(crate) fn parse_addresses(text: Option<&str>) -> Result<Vec<String>, DbErr> {
    match text {
        None => Ok(Vec::new()),
        Some(t) => serde_json::from_str(t).map_err(|e| {
            DbErr::Custom(format!(
                "sync_device.addresses `{t}` is not a JSON list of addresses: {e}"
            ))
        }),
    }
}

/// How a leadership move came about.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MoveKind {
    /// The leader handed leadership on: signed by the old leader's key.
    Handoff,
    /// A write member took leadership over from a leader that is gone: signed by the new
    /// leader's own key, trusted because the replicated membership holds that key with
    /// write access.
    Promotion,
}

/// The record of one leadership move: the last entry of an epoch (the data of a
/// [`LEADER_MODEL`] entry). Followers learn the move by pulling it and trust it by its
/// signature.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoveRecord {
    /// The library.
    pub library_id: LibraryId,
    /// The epoch that begins with this record.
    pub epoch: Epoch,
    /// How the move came about (which key must have signed it).
    pub kind: MoveKind,
    /// The new leader.
    pub leader: DeviceId,
    /// The new leader's key fingerprint: followers pin it from now on.
    pub key: KeyFingerprint,
    /// Where the new leader listens (`host:port`), as far as it is known.
    #[serde(default)]
    pub addresses: Vec<String>,
    /// The seq the new epoch starts after: the entry before this record.
    pub after: Seq,
    /// The log's rolling checksum at `after`.
    pub after_checksum: u64,
    /// The signer's public key, a DER SubjectPublicKeyInfo in hex.
    pub signer_key: String,
    /// The Ed25519 signature of [`MoveRecord::signed_bytes`] by the signer's key, in hex.
    pub signature: String,
    /// A promotion made without a majority of the write members' votes, by a person's
    /// explicit choice (`force`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub forced: bool,
}

/// What a move record says, before it is signed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MoveTerms {
    /// The library.
    pub library_id: LibraryId,
    /// The new epoch.
    pub epoch: Epoch,
    /// Handoff or promotion.
    pub kind: MoveKind,
    /// The new leader.
    pub leader: DeviceId,
    /// Its key fingerprint.
    pub key: KeyFingerprint,
    /// Where it listens.
    pub addresses: Vec<String>,
    /// The position the new epoch starts after.
    pub after: Position,
    /// A promotion without a majority of votes (see [`MoveRecord::forced`]).
    pub forced: bool,
}

impl MoveRecord {
    /// Signs `terms` with `signer` (the old leader's key for a handoff, the new leader's for
    /// a promotion).
    pub fn sign(terms: MoveTerms, signer: &DeviceKey) -> Result<MoveRecord, crate::KeyError> {
        let mut record = MoveRecord {
            library_id: terms.library_id,
            epoch: terms.epoch,
            kind: terms.kind,
            leader: terms.leader,
            key: terms.key,
            addresses: terms.addresses,
            after: terms.after.seq,
            after_checksum: terms.after.checksum,
            signer_key: hex(&signer.public_key_der()),
            signature: String::new(),
            forced: terms.forced,
        };
        record.signature = hex(&signer.sign(&record.signed_bytes())?);
        Ok(record)
    }

    /// The bytes the signature covers: every field but the signature, length-prefixed,
    /// after a domain tag (a signature over anything else can never pass for one).
    pub fn signed_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(256);
        let mut field = |bytes: &[u8]| {
            out.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
            out.extend_from_slice(bytes);
        };
        field(b"seaorm-sync move record v1");
        field(self.library_id.0.as_bytes());
        field(&self.epoch.0.to_le_bytes());
        field(match self.kind {
            MoveKind::Handoff => b"handoff",
            MoveKind::Promotion => b"promotion",
        });
        field(self.leader.0.as_bytes());
        field(&self.key.0);
        field(&(self.addresses.len() as u64).to_le_bytes());
        for address in &self.addresses {
            field(address.as_bytes());
        }
        field(&self.after.0.to_le_bytes());
        field(&self.after_checksum.to_le_bytes());
        field(self.signer_key.as_bytes());
        if self.forced {
            // Only when set: records signed before the field existed keep their bytes.
            field(b"forced");
        }
        out
    }

    /// The signer's public key (DER), if the hex is well formed.
    pub fn signer_key_der(&self) -> Option<Vec<u8>> {
        unhex(&self.signer_key)
    }

    /// The signer's fingerprint, if its key is well formed.
    pub fn signer_fingerprint(&self) -> Option<KeyFingerprint> {
        self.signer_key_der()
            .map(|der| KeyFingerprint::of_public_key(&der))
    }

    /// The position the new epoch starts after.
    pub fn after_position(&self) -> Position {
        Position {
            seq: self.after,
            checksum: self.after_checksum,
        }
    }

    /// The record as the data of its log entry.
    pub fn to_data(&self) -> String {
        // Plain data: serialising it cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// A move record read from an entry's data.
    pub fn from_entry(entry: &LogEntry) -> Option<MoveRecord> {
        if entry.model != LEADER_MODEL {
            return None;
        }
        serde_json::from_str(entry.data.as_deref()?).ok()
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        out.push_str(&format!("{byte:02x}"));
    }
    out
}

pub(crate) fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Who leads a library and in which epoch, as this device knows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Leadership {
    /// The leader.
    pub leader: DeviceId,
    /// The epoch it leads in. `Epoch::UNSTATED` on a follower that joined and has not yet
    /// heard its leader's epoch.
    pub epoch: Epoch,
    /// The seq of the move record that began the epoch (0 in the first).
    pub epoch_start_seq: Seq,
    /// On a leader: the newer epoch a request stated. A superseded leader serves and
    /// sequences nothing more.
    pub superseded_by: Option<Epoch>,
    /// On a leader handing off: the target. It sequences nothing meanwhile (its writes
    /// wait in its outbox; pushes are refused as `PushError::Moving`).
    pub moving_to: Option<DeviceId>,
    /// On a device that has just become leader: its log does not yet reach the move
    /// record that made it leader. It sequences and serves nothing until it has taken the
    /// log over (`FollowerView::catch_up` does, from the old leader).
    pub taking_over: bool,
}

/// The leadership state shared by a library's handles in this process.
pub(crate) type SharedLeadership = Arc<RwLock<Leadership>>;

impl Library {
    /// Who leads this library, in which epoch, as this device knows it.
    pub fn leadership(&self) -> Leadership {
        self.leadership
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The library's current epoch as this device knows it.
    pub fn epoch(&self) -> Epoch {
        self.leadership().epoch
    }

    /// The current leader as this device knows it.
    pub fn leader_device_id(&self) -> DeviceId {
        self.leadership().leader
    }

    /// On a leader: the newer epoch it learnt of (it has been replaced), if any.
    pub fn superseded_by(&self) -> Option<Epoch> {
        self.leadership().superseded_by
    }

    pub(crate) fn set_leadership(&self, next: Leadership) {
        let mut state = self.leadership.write().unwrap_or_else(|p| p.into_inner());
        *state = next;
    }

    /// The role that follows from the leadership state.
    pub(crate) fn role_of(&self, leadership: &Leadership) -> Role {
        if leadership.leader == self.device_id() {
            Role::Leader
        } else {
            Role::Follower
        }
    }

    /// Whether this device numbers new writes into the log now: it leads, and has not
    /// learnt of a newer epoch.
    pub(crate) fn sequences(&self) -> bool {
        let leadership = self.leadership();
        self.role_of(&leadership) == Role::Leader
            && leadership.superseded_by.is_none()
            && leadership.moving_to.is_none()
            && !leadership.taking_over
    }

    /// Reads the leadership state from the database again (another process may have
    /// applied a move) and returns it.
    pub async fn refresh_leadership(&self) -> Result<Leadership, DbErr> {
        let state = load_leadership(&self.db, self.id(), self.device_id()).await?;
        self.set_leadership(state.clone());
        Ok(state)
    }

    /// A leader learnt from a request that a newer epoch exists: it has been replaced. It
    /// stops serving and sequencing this library from now on (also after a restart:
    /// `superseded_by.<library>` in `sync_local`). Returns whether this was news.
    pub(crate) async fn note_superseded(&self, newer: Epoch) -> Result<bool, DbErr> {
        let current = self.leadership();
        if current.superseded_by.is_some_and(|known| known >= newer) || newer <= current.epoch {
            return Ok(false);
        }
        set_local_value(&self.db, &superseded_key(self.id()), &newer.0.to_string()).await?;
        self.set_leadership(Leadership {
            superseded_by: Some(newer),
            ..current
        });
        tracing::warn!(
            library = %self.id(),
            epoch = %current.epoch,
            newer = %newer,
            "a member stated a newer epoch: this device no longer leads the library and \
             stops serving and sequencing it"
        );
        Ok(true)
    }

    /// The membership entries a leader logs, in `txn`: the members named, or, the first
    /// time, every member (the mark is set in `txn` too). Nothing until the library has a
    /// member besides the leader, unless `devices` names one.
    pub(crate) async fn membership_changes(
        &self,
        txn: &DatabaseTransaction,
        devices: &[DeviceId],
    ) -> Result<Vec<CapturedChange>, DbErr> {
        let mark = members_logged_key(self.id());
        let logged = get_local_value(txn, &mark).await?.is_some();
        let rows = device::Entity::find()
            .filter(device::Column::LibraryId.eq(self.id().to_string()))
            .all(txn)
            .await?;
        let others = rows
            .iter()
            .any(|row| row.device_id != self.device_id().to_string());
        let wanted: Vec<&device::Model> = if logged {
            rows.iter()
                .filter(|row| devices.iter().any(|d| d.to_string() == row.device_id))
                .collect()
        } else if others || !devices.is_empty() {
            set_local_value(txn, &mark, "1").await?;
            rows.iter().collect()
        } else {
            Vec::new()
        };
        let mut changes = Vec::with_capacity(wanted.len());
        for row in wanted {
            let record = MemberRecord::from_row(row)?;
            changes.push(self.reserved_change(
                MEMBER_MODEL,
                record.device_id.to_string(),
                serde_json::to_string(&record).map_err(|e| DbErr::Json(e.to_string()))?,
            ));
        }
        Ok(changes)
    }

    /// A change of a reserved model, authored by this device now.
    pub(crate) fn reserved_change(
        &self,
        model: &'static str,
        record_id: String,
        data: String,
    ) -> CapturedChange {
        CapturedChange {
            model,
            record_id,
            op: ChangeOp::Upsert,
            data: Some(data),
            changed: Vec::new(),
            hlc: self.context.clock.now(),
            schema_version: RESERVED_SCHEMA_VERSION,
            author: None,
        }
    }

    /// On a leader opening the library: its own key fingerprint on its member row, and
    /// every member logged once if the library already has others (a library made by an
    /// earlier build).
    pub(crate) async fn log_membership_once(&self) -> Result<(), DbErr> {
        if self.role() != Role::Leader {
            return Ok(());
        }
        let key = crate::library::ensure_device_key(&self.db)
            .await
            .map_err(|e| DbErr::Custom(e.to_string()))?
            .fingerprint();
        device::Entity::update_many()
            .col_expr(
                device::Column::Key,
                sea_orm::sea_query::Expr::value(key.to_string()),
            )
            .filter(device::Column::LibraryId.eq(self.id().to_string()))
            .filter(device::Column::DeviceId.eq(self.device_id().to_string()))
            .filter(device::Column::Key.is_null())
            .exec(&self.db)
            .await?;
        if get_local_value(&self.db, &members_logged_key(self.id()))
            .await?
            .is_some()
        {
            return Ok(());
        }
        let txn = self.begin_write().await?;
        let changes = self.membership_changes(&txn, &[]).await?;
        self.commit_changes(txn, changes).await
    }

    /// Applies the reserved entries of an applied batch to the sync tables, in log order,
    /// inside the apply transaction: membership rows, and move records (verified first).
    /// Returns the leadership state once they are applied, if a move record changed it.
    pub(crate) async fn apply_reserved(
        &self,
        txn: &DatabaseTransaction,
        entries: &[(LogEntry, Position)],
    ) -> Result<Option<Leadership>, crate::ApplyError> {
        let mut moved = None;
        for (entry, before) in entries {
            match entry.model.as_str() {
                MEMBER_MODEL => {
                    let record: MemberRecord = entry
                        .data
                        .as_deref()
                        .ok_or_else(|| "no data".to_owned())
                        .and_then(|d| serde_json::from_str(d).map_err(|e| e.to_string()))
                        .map_err(|why| crate::ApplyError::BadPayload {
                            seq: entry.seq,
                            model: entry.model.clone(),
                            reason: format!("not a member record: {why}"),
                        })?;
                    upsert_member(txn, self.id(), &record).await?;
                }
                LEADER_MODEL => {
                    let record = MoveRecord::from_entry(entry).ok_or_else(|| {
                        crate::ApplyError::BadPayload {
                            seq: entry.seq,
                            model: entry.model.clone(),
                            reason: "not a move record".into(),
                        }
                    })?;
                    let current = match &moved {
                        Some(state) => Leadership::clone(state),
                        None => load_leadership(txn, self.id(), self.device_id()).await?,
                    };
                    let context =
                        move_context(txn, self.id(), &current, &record, entry, *before).await?;
                    match decide_epoch::verify_move(&record, &context) {
                        Ok(MoveVerdict::Historical) => {}
                        Ok(MoveVerdict::Accept) => {
                            accept_move(txn, self.id(), &record, entry.seq).await?;
                            if record.leader == self.device_id() {
                                // Its held log may already reach the record: the mark keeps
                                // it taking over until its outbox is taken too.
                                crate::library::set_local_value(
                                    txn,
                                    &taking_over_key(self.id()),
                                    &record.epoch.0.to_string(),
                                )
                                .await?;
                            }
                            moved = Some(Leadership {
                                leader: record.leader,
                                epoch: record.epoch,
                                epoch_start_seq: entry.seq,
                                superseded_by: None,
                                moving_to: None,
                                taking_over: record.leader == self.device_id(),
                            });
                        }
                        Err(refusal) => {
                            return Err(crate::ApplyError::BadMove {
                                seq: entry.seq,
                                reason: refusal.to_string(),
                            });
                        }
                    }
                }
                TAKEN_MODEL => {
                    let marks: crate::handoff::TakenMarks = entry
                        .data
                        .as_deref()
                        .ok_or_else(|| "no data".to_owned())
                        .and_then(|d| serde_json::from_str(d).map_err(|e| e.to_string()))
                        .map_err(|why| crate::ApplyError::BadPayload {
                            seq: entry.seq,
                            model: entry.model.clone(),
                            reason: format!("not a list of taken changes: {why}"),
                        })?;
                    crate::handoff::store_taken_marks(txn, self.id(), &marks).await?;
                }
                INVITE_MODEL | PEER_MODEL | REJECTED_MODEL => {
                    let state: crate::handoff::LeaderState = entry
                        .data
                        .as_deref()
                        .ok_or_else(|| "no data".to_owned())
                        .and_then(|d| serde_json::from_str(d).map_err(|e| e.to_string()))
                        .map_err(|why| crate::ApplyError::BadPayload {
                            seq: entry.seq,
                            model: entry.model.clone(),
                            reason: format!("not a leader's state passed on by a handoff: {why}"),
                        })?;
                    // Only the device the handoff names takes it: it is what a leader holds.
                    if state.to == self.device_id() {
                        crate::handoff::store_leader_state(txn, self.id(), &state).await?;
                    }
                }
                other => {
                    return Err(crate::ApplyError::UnknownModel {
                        seq: entry.seq,
                        model: other.to_owned(),
                    });
                }
            }
        }
        Ok(moved)
    }
}

/// A member's row from its record (an upsert: the record is the whole row).
pub(crate) async fn upsert_member<C: ConnectionTrait>(
    db: &C,
    library_id: LibraryId,
    record: &MemberRecord,
) -> Result<(), DbErr> {
    device::Entity::insert(record.to_row(library_id))
        .on_conflict(
            OnConflict::columns([device::Column::LibraryId, device::Column::DeviceId])
                .update_columns([
                    device::Column::Access,
                    device::Column::Name,
                    device::Column::AddedAtMs,
                    device::Column::RevokedAtMs,
                    device::Column::Key,
                    device::Column::Addresses,
                ])
                .to_owned(),
        )
        .exec_without_returning(db)
        .await
        .map(|_| ())
}

/// What `verify_move` needs to know, loaded in the apply transaction.
pub(crate) async fn move_context<C: ConnectionTrait>(
    db: &C,
    library_id: LibraryId,
    current: &Leadership,
    record: &MoveRecord,
    entry: &LogEntry,
    before: Position,
) -> Result<MoveContext, DbErr> {
    let member = |device: DeviceId| {
        device::Entity::find_by_id((library_id.to_string(), device.to_string())).one(db)
    };
    let leader_key = member(current.leader)
        .await?
        .and_then(|row| row.key)
        .and_then(|k| k.parse().ok());
    let signer = match record.signer_fingerprint() {
        Some(fingerprint) => member(fingerprint.device_id())
            .await?
            .map(|row| SignerMember {
                access: Access::parse(&row.access),
                revoked: row.revoked_at_ms.is_some(),
                key: row.key.and_then(|k| k.parse().ok()),
            }),
        None => None,
    };
    Ok(MoveContext {
        library_id,
        epoch: current.epoch,
        leader: current.leader,
        leader_key,
        entry_seq: entry.seq,
        before,
        signer,
    })
}

/// Records an accepted move: the library's leader, epoch and where it began; the new
/// leader's key and addresses on its member row.
pub(crate) async fn accept_move<C: ConnectionTrait>(
    db: &C,
    library_id: LibraryId,
    record: &MoveRecord,
    seq: Seq,
) -> Result<(), DbErr> {
    library::Entity::update_many()
        .col_expr(
            library::Column::LeaderDeviceId,
            sea_orm::sea_query::Expr::value(record.leader.to_string()),
        )
        .col_expr(
            library::Column::Epoch,
            sea_orm::sea_query::Expr::value(record.epoch.0 as i64),
        )
        .col_expr(
            library::Column::EpochStartSeq,
            sea_orm::sea_query::Expr::value(seq.0 as i64),
        )
        .filter(library::Column::Id.eq(library_id.to_string()))
        .exec(db)
        .await?;
    let mut update = device::Entity::update_many()
        .col_expr(
            device::Column::Key,
            sea_orm::sea_query::Expr::value(record.key.to_string()),
        )
        .filter(device::Column::LibraryId.eq(library_id.to_string()))
        .filter(device::Column::DeviceId.eq(record.leader.to_string()));
    if let Some(addresses) = addresses_text(&record.addresses) {
        update = update.col_expr(
            device::Column::Addresses,
            sea_orm::sea_query::Expr::value(addresses),
        );
    }
    update.exec(db).await?;
    Ok(())
}

/// The leadership state as the database holds it.
pub(crate) async fn load_leadership<C: ConnectionTrait>(
    db: &C,
    library_id: LibraryId,
    this_device: DeviceId,
) -> Result<Leadership, DbErr> {
    let row = library::Entity::find_by_id(library_id.to_string())
        .one(db)
        .await?
        .ok_or_else(|| DbErr::RecordNotFound(format!("library {library_id}")))?;
    let leader = row.leader_device_id.parse().map_err(|e| {
        DbErr::Custom(format!(
            "sync_library leader `{}`: {e}",
            row.leader_device_id
        ))
    })?;
    let superseded_by = match get_local_value(db, &superseded_key(library_id)).await? {
        None => None,
        Some(text) => Some(text.parse::<u64>().map(Epoch).map_err(|e| {
            DbErr::Custom(format!(
                "sync_local `{}` holds `{text}`, not an epoch: {e}",
                superseded_key(library_id)
            ))
        })?),
    }
    .filter(|newer| newer.0 > row.epoch as u64);
    Ok(Leadership {
        leader,
        epoch: Epoch(row.epoch.max(0) as u64),
        epoch_start_seq: Seq(row.epoch_start_seq.max(0) as u64),
        superseded_by,
        moving_to: None,
        // Its held log (`held.rs`) must hold every entry up to the move record: what its
        // pulls left out is taken over too.
        taking_over: leader == this_device
            && row.epoch_start_seq > 0
            && (crate::library::committed_tip(db, library_id, false)
                .await?
                .seq
                .0
                < row.epoch_start_seq as u64
                || crate::held::has_runs(db, library_id).await?
                || get_local_value(db, &taking_over_key(library_id))
                    .await?
                    .is_some()),
    })
}

/// A follower that has not heard its leader's epoch yet (a fresh join) takes the one its
/// pinned leader states, in `txn`.
pub(crate) async fn learn_epoch(
    txn: &DatabaseTransaction,
    library_id: LibraryId,
    stated: Epoch,
) -> Result<(), DbErr> {
    library::Entity::update_many()
        .col_expr(
            library::Column::Epoch,
            sea_orm::sea_query::Expr::value(stated.0 as i64),
        )
        .filter(library::Column::Id.eq(library_id.to_string()))
        .filter(library::Column::Epoch.eq(0))
        .exec(txn)
        .await
        .map(|_| ())
}

impl serde::Serialize for KeyFingerprint {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for KeyFingerprint {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn reserved_ids_are_recognised() {
        assert!(is_reserved_model(MEMBER_MODEL));
        assert!(is_reserved_model(LEADER_MODEL));
        assert!(!is_reserved_model("sync_conflict"));
        assert!(!is_reserved_model("volume"));
    }

    #[test]
    fn stored_addresses_that_are_not_a_list_are_an_error_not_nothing() {
        assert_eq!(parse_addresses(None).unwrap(), Vec::<String>::new());
        assert_eq!(
            parse_addresses(Some(r#"["10.0.0.1:4433","[::1]:4433"]"#)).unwrap(),
            vec!["10.0.0.1:4433".to_owned(), "[::1]:4433".to_owned()]
        );
        let refused = parse_addresses(Some("10.0.0.1:4433")).unwrap_err();
        assert!(refused.to_string().contains("10.0.0.1:4433"), "{refused}");
    }

    #[test]
    fn hex_round_trips() {
        let bytes = [0u8, 1, 0xab, 0xff];
        assert_eq!(unhex(&hex(&bytes)).unwrap(), bytes);
        assert!(unhex("abc").is_none());
        assert!(unhex("zz").is_none());
    }

    #[test]
    fn a_move_record_round_trips_through_its_entry_data() {
        let key = DeviceKey::generate().unwrap();
        let record = MoveRecord::sign(
            MoveTerms {
                library_id: LibraryId(uuid::Uuid::from_u128(1)),
                epoch: Epoch(2),
                kind: MoveKind::Handoff,
                leader: key.device_id(),
                key: key.fingerprint(),
                addresses: vec!["127.0.0.1:4433".into()],
                after: Position {
                    seq: Seq(7),
                    checksum: 99,
                },
                forced: false,
            },
            &key,
        )
        .unwrap();
        let again: MoveRecord = serde_json::from_str(&record.to_data()).unwrap();
        assert_eq!(again, record);
        assert_eq!(record.signer_fingerprint(), Some(key.fingerprint()));
    }
}
