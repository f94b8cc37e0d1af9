//! Who may sync a library: its members, the invites that admit new ones, and revocation.
//! (What the leader knows of each follower's progress is `peers.rs`.)

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use sea_orm::ActiveValue::Set;
use sea_orm::sea_query::{Expr, OnConflict};
use sea_orm::{ColumnTrait, DatabaseConnection, DbErr, EntityTrait, QueryFilter, QueryOrder};
use serde::{Deserialize, Serialize};

use crate::crowd::Coalescer;
use crate::library::{InsertInto, begin_write, get_local_value, set_local_value};
use crate::tables::{device, invite, peer};
use crate::{DeviceId, KeyFingerprint, Library, LibraryId, Seq};

/// Device ids per `IN (…)` when reading admissions together: bound values per statement
/// stay far below every backend's limit.
const ADMISSION_IDS_MAX: usize = 500;

/// Admission checks asked for together (sessions opening, every request, the periodic
/// recheck), read in one statement per round (`coalesce`).
pub(crate) type AdmissionReads = Coalescer<DeviceId, Result<Admission, Arc<DbErr>>>;

/// Reads the admission of each of `devices`.
async fn read_admissions(
    db: &DatabaseConnection,
    library_id: LibraryId,
    devices: Vec<DeviceId>,
) -> HashMap<DeviceId, Result<Admission, Arc<DbErr>>> {
    let mut admissions = HashMap::with_capacity(devices.len());
    for chunk in devices.chunks(ADMISSION_IDS_MAX) {
        let rows = device::Entity::find()
            .filter(device::Column::LibraryId.eq(library_id.to_string()))
            .filter(device::Column::DeviceId.is_in(chunk.iter().map(ToString::to_string)))
            .all(db)
            .await;
        match rows {
            Ok(rows) => {
                for row in rows {
                    let Ok(device) = row.device_id.parse::<DeviceId>() else {
                        // Not one of the ids asked for, which all parse.
                        continue;
                    };
                    let admission = match row.revoked_at_ms {
                        Some(at) => Ok(Admission::Revoked(at)),
                        None => parse_access(&row.access)
                            .map(Admission::Member)
                            .map_err(Arc::new),
                    };
                    admissions.insert(device, admission);
                }
                for device in chunk {
                    admissions
                        .entry(*device)
                        .or_insert(Ok(Admission::NotMember));
                }
            }
            Err(e) => {
                let e = Arc::new(e);
                for device in chunk {
                    admissions.insert(*device, Err(Arc::clone(&e)));
                }
            }
        }
    }
    admissions
}

/// What a member of a library may do.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Access {
    /// The leader: holds and sequences the log.
    Leader,
    /// Pulls the log and pushes its own changes.
    Write,
    /// Pulls the log only.
    Read,
}

impl Access {
    /// As stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            Access::Leader => "leader",
            Access::Write => "write",
            Access::Read => "read",
        }
    }

    /// Parses `as_str`'s output.
    pub fn parse(text: &str) -> Option<Access> {
        match text {
            "leader" => Some(Access::Leader),
            "write" => Some(Access::Write),
            "read" => Some(Access::Read),
            _ => None,
        }
    }
}

impl std::fmt::Display for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A device that takes part in a library, as its leader records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Member {
    /// The device.
    pub device_id: DeviceId,
    /// What it may do.
    pub access: Access,
    /// The name it gave when it joined.
    pub name: Option<String>,
    /// When it joined (ms since the epoch).
    pub added_at_ms: i64,
    /// When it was revoked, if it was.
    pub revoked_at_ms: Option<i64>,
    /// The position it last pulled from, if it pulled.
    pub position: Option<Seq>,
    /// When it last pulled.
    pub last_seen_ms: Option<i64>,
    /// Its key fingerprint, when known (the membership replicates it to every member).
    pub key: Option<KeyFingerprint>,
    /// Where it says it can be reached when it leads.
    pub addresses: Vec<String>,
}

/// Whether a device may sync a library now.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Admission {
    /// A member, with this access.
    Member(Access),
    /// Never a member.
    NotMember,
    /// A member once, revoked at this time (ms since the epoch).
    Revoked(i64),
}

/// An invite: the one-time secret a joining device presents, and what it grants.
#[derive(Clone, PartialEq, Eq)]
pub struct Invite {
    /// The one-time secret. The leader keeps only its hash.
    pub secret: [u8; 32],
    /// The library it admits to.
    pub library_id: LibraryId,
    /// What it grants.
    pub access: Access,
    /// When it stops working (ms since the epoch).
    pub expires_at_ms: i64,
}

impl std::fmt::Debug for Invite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret.
        f.debug_struct("Invite")
            .field("library_id", &self.library_id)
            .field("access", &self.access)
            .field("expires_at_ms", &self.expires_at_ms)
            .finish_non_exhaustive()
    }
}

/// Why a membership change was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MemberError {
    /// An invite grants read or write.
    #[error("an invite grants `read` or `write`, not `{0}`")]
    BadAccess(Access),
    /// No such member.
    #[error("device {device} is not a member of library {library}; `Library::members` lists them")]
    UnknownDevice {
        /// The device.
        device: DeviceId,
        /// The library.
        library: LibraryId,
    },
    /// The leader cannot revoke itself.
    #[error("device {0} leads this library and cannot be revoked; move leadership first")]
    IsLeader(DeviceId),
    /// The database failed.
    #[error("database error: {0}")]
    Db(#[from] DbErr),
}

/// Why an invite was not redeemed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InviteError {
    /// The leader has no invite with this secret.
    #[error(
        "the leader of library {0} knows no such invite: the token was altered or made by \
         another leader; ask the leader for a new one (`LeaderView::invite`)"
    )]
    Unknown(LibraryId),
    /// The invite expired.
    #[error("this invite expired at {0}; ask the leader for a new one (`LeaderView::invite`)")]
    Expired(String),
    /// The invite admitted a device already.
    #[error(
        "this invite was already used (an invite admits one device); ask the leader for a new one"
    )]
    AlreadyUsed,
    /// The token claims other terms than the leader issued.
    #[error(
        "this invite was altered: the leader issued it for `{issued}` access, the token \
         claims `{claimed}`; ask the leader for a new one"
    )]
    Altered {
        /// What the leader issued.
        issued: Access,
        /// What the token claims.
        claimed: Access,
    },
    /// This device handed leadership on (or was replaced): it admits no one.
    #[error(
        "this device no longer leads library {library}: device {leader} does; redeem the invite \
         there (an invite made before a handoff is passed on to the new leader)"
    )]
    NotLeading {
        /// The library.
        library: LibraryId,
        /// The leader as this device knows it.
        leader: DeviceId,
    },
    /// Membership could not be recorded.
    #[error(transparent)]
    Member(#[from] MemberError),
}

impl From<DbErr> for InviteError {
    fn from(e: DbErr) -> Self {
        InviteError::Member(MemberError::Db(e))
    }
}

impl Library {
    /// Whether `device` may sync this library now. Checks asked for at the same time are
    /// read together, each from a read that began after it was asked: a revocation
    /// committed before the call is always seen.
    pub async fn admission(&self, device: DeviceId) -> Result<Admission, DbErr> {
        let db = self.db.clone();
        let library_id = self.id();
        let read = move |devices: Vec<DeviceId>| {
            let db = db.clone();
            async move { read_admissions(&db, library_id, devices).await }
        };
        match self.admissions.get(device, read).await {
            Some(Ok(admission)) => Ok(admission),
            Some(Err(e)) => Err(DbErr::Custom(e.to_string())),
            None => Err(DbErr::Custom(format!(
                "the admission check of device {device} was dropped; try again"
            ))),
        }
    }

    /// This device's own access to the library.
    pub async fn access(&self) -> Result<Access, DbErr> {
        match self.admission(self.device_id()).await? {
            Admission::Member(access) => Ok(access),
            // A device's own row is written when it creates or joins the library.
            _ => Ok(Access::Read),
        }
    }

    /// Every device that is or was a member, the leader first, with what the leader knows
    /// of its progress.
    pub async fn members(&self) -> Result<Vec<Member>, DbErr> {
        let rows = device::Entity::find()
            .filter(device::Column::LibraryId.eq(self.id().to_string()))
            .order_by_asc(device::Column::AddedAtMs)
            .all(&self.db)
            .await?;
        let peers = peer::Entity::find()
            .filter(peer::Column::LibraryId.eq(self.id().to_string()))
            .all(&self.db)
            .await?;
        let mut members = Vec::with_capacity(rows.len());
        for row in rows {
            let device_id: DeviceId = row
                .device_id
                .parse()
                .map_err(|e| DbErr::Custom(format!("sync_device id `{}`: {e}", row.device_id)))?;
            // A position gathered but not yet written is the newer one.
            let seen = self.peer_positions.get(device_id).or_else(|| {
                peers
                    .iter()
                    .find(|p| p.device_id == row.device_id)
                    .map(|p| (Seq(p.position as u64), p.last_seen_ms))
            });
            members.push(Member {
                device_id,
                access: parse_access(&row.access)?,
                name: row.name,
                added_at_ms: row.added_at_ms,
                revoked_at_ms: row.revoked_at_ms,
                position: seen.map(|(position, _)| position),
                last_seen_ms: seen.map(|(_, at)| at),
                key: row.key.as_deref().and_then(|k| k.parse().ok()),
                addresses: crate::leadership::parse_addresses(row.addresses.as_deref())?,
            });
        }
        members.sort_by_key(|m| m.access != Access::Leader);
        Ok(members)
    }

    /// Issues an invite granting `access` for `ttl` (leader only).
    pub(crate) async fn invite(
        &self,
        access: Access,
        ttl: Duration,
    ) -> Result<Invite, MemberError> {
        if access == Access::Leader {
            return Err(MemberError::BadAccess(access));
        }
        let secret: [u8; 32] = rand::random();
        let now_ms = chrono::Utc::now().timestamp_millis();
        let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        let expires_at_ms = now_ms.saturating_add(ttl_ms);
        invite::ActiveModel {
            secret_hash: Set(secret_hash(&secret)),
            library_id: Set(self.id().to_string()),
            access: Set(access.as_str().to_owned()),
            created_at_ms: Set(now_ms),
            expires_at_ms: Set(expires_at_ms),
            used_at_ms: Set(None),
            used_by: Set(None),
        }
        .insert_into(&self.db)
        .await?;
        Ok(Invite {
            secret,
            library_id: self.id(),
            access,
            expires_at_ms,
        })
    }

    /// Admits `device` with the invite holding `secret`, once (leader only). `claimed` is
    /// the access the joining device's token states; it must be what the leader issued.
    /// A device revoked earlier is admitted again: the leader invited it anew.
    pub(crate) async fn redeem_invite(
        &self,
        secret: &[u8; 32],
        claimed: Access,
        key: KeyFingerprint,
        name: Option<&str>,
    ) -> Result<Access, InviteError> {
        if !self.sequences() {
            let leadership = self.leadership();
            return Err(InviteError::NotLeading {
                library: self.id(),
                leader: leadership.moving_to.unwrap_or(leadership.leader),
            });
        }
        let device = key.device_id();
        let hash = secret_hash(secret);
        let now_ms = chrono::Utc::now().timestamp_millis();
        // It reads the invite, then writes: the write lock is taken first (SQLite), or a
        // join racing any other write would fail with a busy snapshot.
        let txn = begin_write(&self.db).await?;
        let row = invite::Entity::find_by_id(hash.clone())
            .filter(invite::Column::LibraryId.eq(self.id().to_string()))
            .one(&txn)
            .await?
            .ok_or(InviteError::Unknown(self.id()))?;
        let issued = parse_access(&row.access)?;
        if issued != claimed {
            return Err(InviteError::Altered { issued, claimed });
        }
        if row.used_at_ms.is_some() {
            return Err(InviteError::AlreadyUsed);
        }
        if row.expires_at_ms <= now_ms {
            return Err(InviteError::Expired(format_ms(row.expires_at_ms)));
        }
        // Whoever marks the invite used first wins; a concurrent redeemer finds it used.
        let marked = invite::Entity::update_many()
            .col_expr(invite::Column::UsedAtMs, Expr::value(now_ms))
            .col_expr(invite::Column::UsedBy, Expr::value(device.to_string()))
            .filter(invite::Column::SecretHash.eq(hash))
            .filter(invite::Column::UsedAtMs.is_null())
            .exec(&txn)
            .await?;
        if marked.rows_affected != 1 {
            return Err(InviteError::AlreadyUsed);
        }
        device::Entity::insert(device::ActiveModel {
            library_id: Set(self.id().to_string()),
            device_id: Set(device.to_string()),
            access: Set(issued.as_str().to_owned()),
            name: Set(name.map(str::to_owned)),
            added_at_ms: Set(now_ms),
            revoked_at_ms: Set(None),
            key: Set(Some(key.to_string())),
            addresses: Set(None),
        })
        .on_conflict(
            OnConflict::columns([device::Column::LibraryId, device::Column::DeviceId])
                .update_columns([
                    device::Column::Access,
                    device::Column::Name,
                    device::Column::RevokedAtMs,
                    device::Column::Key,
                ])
                .to_owned(),
        )
        .exec_without_returning(&txn)
        .await?;
        // The membership replicates: the new member's entry (every member's, the first
        // time) is logged with the admission.
        let changes = self.membership_changes(&txn, &[device]).await?;
        self.commit_changes(txn, changes).await?;
        self.membership_changed();
        Ok(issued)
    }

    /// Revokes `device` (leader only): it is refused from now on, on live connections too.
    pub(crate) async fn revoke(&self, device: DeviceId) -> Result<(), MemberError> {
        if device == self.device_id() {
            return Err(MemberError::IsLeader(device));
        }
        let now_ms = chrono::Utc::now().timestamp_millis();
        let txn = begin_write(&self.db).await?;
        let updated = device::Entity::update_many()
            .col_expr(device::Column::RevokedAtMs, Expr::value(now_ms))
            .filter(device::Column::LibraryId.eq(self.id().to_string()))
            .filter(device::Column::DeviceId.eq(device.to_string()))
            .filter(device::Column::RevokedAtMs.is_null())
            .exec(&txn)
            .await?;
        // Every member learns of the revocation (a revoked device can never be promoted).
        let changes = if updated.rows_affected == 0 {
            Vec::new()
        } else {
            self.membership_changes(&txn, &[device]).await?
        };
        self.commit_changes(txn, changes).await?;
        if updated.rows_affected == 0 {
            // Revoked already is fine; unknown is an error.
            if self.admission(device).await? == Admission::NotMember {
                return Err(MemberError::UnknownDevice {
                    device,
                    library: self.id(),
                });
            }
        }
        self.membership_changed();
        Ok(())
    }

    /// The library's name.
    pub async fn name(&self) -> Result<String, DbErr> {
        Ok(
            crate::tables::library::Entity::find_by_id(self.id().to_string())
                .one(&self.db)
                .await?
                .map(|row| row.name)
                .unwrap_or_default(),
        )
    }

    /// A value this app keeps on this device (not synced), such as where the leader was
    /// last reached.
    pub async fn local_setting(&self, key: &str) -> Result<Option<String>, DbErr> {
        get_local_value(&self.db, &self.setting_key(key)).await
    }

    /// Stores a local setting (see `local_setting`).
    pub async fn set_local_setting(&self, key: &str, value: &str) -> Result<(), DbErr> {
        set_local_value(&self.db, &self.setting_key(key), value).await
    }

    /// Every local setting whose key starts with `prefix`, as `(key, value)` in key order:
    /// for settings an app keeps one of per something, such as one per server process of
    /// a leader that serves from several processes on one database.
    pub async fn local_settings_starting_with(
        &self,
        prefix: &str,
    ) -> Result<Vec<(String, String)>, DbErr> {
        let stored_prefix = self.setting_key(prefix);
        let rows = crate::tables::local::Entity::find()
            .filter(crate::tables::local::Column::Key.starts_with(&stored_prefix))
            .order_by_asc(crate::tables::local::Column::Key)
            .all(&self.db)
            .await?;
        let own = self.setting_key("");
        Ok(rows
            .into_iter()
            // LIKE's wildcards (`_`, `%`) may match more than the prefix itself.
            .filter(|row| row.key.starts_with(&stored_prefix))
            .map(|row| (row.key[own.len()..].to_owned(), row.value))
            .collect())
    }

    /// Removes a local setting; whether there was one.
    pub async fn remove_local_setting(&self, key: &str) -> Result<bool, DbErr> {
        let removed = crate::tables::local::Entity::delete_by_id(self.setting_key(key))
            .exec(&self.db)
            .await?;
        Ok(removed.rows_affected > 0)
    }

    fn setting_key(&self, key: &str) -> String {
        local_setting_key(self.id(), key)
    }
}

/// Where a library's local setting is kept in `sync_local`.
pub(crate) fn local_setting_key(library_id: LibraryId, key: &str) -> String {
    format!("{library_id}/{key}")
}

fn parse_access(text: &str) -> Result<Access, DbErr> {
    Access::parse(text)
        .ok_or_else(|| DbErr::Custom(format!("unknown access `{text}` in a membership row")))
}

fn secret_hash(secret: &[u8; 32]) -> String {
    blake3::hash(secret).to_hex().to_string()
}

fn format_ms(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms).map_or_else(|| ms.to_string(), |t| t.to_rfc3339())
}
