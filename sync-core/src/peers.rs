//! What the leader knows of each follower's progress: positions noted in memory on every
//! pull and written together, at most once a second, in one transaction. Several server
//! processes on one database each write the positions of their own sessions; a stored
//! position is only ever replaced by a newer sighting, whichever process writes last.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use sea_orm::ActiveValue::Set;
use sea_orm::sea_query::{Expr, OnConflict};
use sea_orm::{DatabaseConnection, DbBackend, DbErr, EntityTrait};

use crate::crowd::begin_write;
use crate::tables::peer;
use crate::{DeviceId, Library, LibraryId, Seq};

/// How long the leader gathers followers' positions before it writes them, all in one
/// transaction. A thousand followers pulling would otherwise each take SQLite's write lock
/// (or a PostgreSQL commit) per pull, for figures only `status` reads. `members` shows
/// gathered positions at once; another process (the CLI's `status` beside `serve`) sees
/// them up to this much later.
const PEER_POSITIONS_FLUSH_MS: u64 = 1_000;

/// Rows per statement when writing positions: 4 bound values each, far below every
/// backend's limit on bound values per statement.
const PEER_POSITIONS_ROWS_MAX: usize = 250;

/// Followers' positions as the leader last saw them, not yet written to `sync_peer`. One
/// entry per follower (its newest), so memory is bounded by the number of members.
#[derive(Debug, Default)]
pub(crate) struct PeerPositions {
    gathered: std::sync::Mutex<Gathered>,
    /// Held while positions are taken and written, so two writes never reorder.
    writing: tokio::sync::Mutex<()>,
}

#[derive(Debug, Default)]
struct Gathered {
    /// Each follower's position and when it was seen (ms since the epoch).
    seen: HashMap<DeviceId, (Seq, i64)>,
    /// A task is due to write `seen`; it keeps going until nothing new arrives.
    flush_due: bool,
}

impl PeerPositions {
    fn gathered(&self) -> std::sync::MutexGuard<'_, Gathered> {
        // The map is plain data; a panic elsewhere cannot leave it half-updated.
        self.gathered.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Notes a position; true when the caller must start the task that writes it.
    fn note(&self, device: DeviceId, position: Seq, seen_at_ms: i64) -> bool {
        let mut gathered = self.gathered();
        gathered.seen.insert(device, (position, seen_at_ms));
        !std::mem::replace(&mut gathered.flush_due, true)
    }

    pub(crate) fn get(&self, device: DeviceId) -> Option<(Seq, i64)> {
        self.gathered().seen.get(&device).copied()
    }

    /// Every position noted and not yet written.
    pub(crate) fn snapshot(&self) -> Vec<(DeviceId, (Seq, i64))> {
        self.gathered()
            .seen
            .iter()
            .map(|(device, seen)| (*device, *seen))
            .collect()
    }

    /// Writes what was gathered, in one transaction.
    async fn write(&self, db: &DatabaseConnection, library_id: LibraryId) -> Result<(), DbErr> {
        let _writing = self.writing.lock().await;
        let seen = std::mem::take(&mut self.gathered().seen);
        if seen.is_empty() {
            return Ok(());
        }
        let rows: Vec<peer::ActiveModel> = seen
            .into_iter()
            .map(|(device, (position, seen_at_ms))| peer::ActiveModel {
                library_id: Set(library_id.to_string()),
                device_id: Set(device.to_string()),
                position: Set(position.0 as i64),
                last_seen_ms: Set(seen_at_ms),
            })
            .collect();
        let newer = newer_sighting_wins(db.get_database_backend());
        let txn = begin_write(db).await?;
        for chunk in rows.chunks(PEER_POSITIONS_ROWS_MAX) {
            peer::Entity::insert_many(chunk.iter().cloned())
                .on_conflict(
                    OnConflict::columns([peer::Column::LibraryId, peer::Column::DeviceId])
                        .values(newer.clone())
                        .to_owned(),
                )
                .exec_without_returning(&txn)
                .await?;
        }
        txn.commit().await
    }
}

/// The update of a follower's stored position: a sighting replaces the stored one only
/// if it is not older. Several server processes on one database each note and write the
/// positions of their own sessions; a follower that moved from one process to another is
/// written by both, and the process that saw it last must win whichever writes last.
pub(crate) fn newer_sighting_wins(backend: DbBackend) -> Vec<(peer::Column, Expr)> {
    let (position, seen) = match backend {
        // MySQL evaluates the assignments left to right, each seeing the ones before it:
        // the position is decided on the stored `last_seen_ms`, then that moves.
        DbBackend::MySql => (
            "IF(VALUES(last_seen_ms) >= last_seen_ms, VALUES(position), position)",
            "GREATEST(last_seen_ms, VALUES(last_seen_ms))",
        ),
        DbBackend::Postgres => (
            "CASE WHEN excluded.last_seen_ms >= sync_peer.last_seen_ms \
             THEN excluded.position ELSE sync_peer.position END",
            "GREATEST(sync_peer.last_seen_ms, excluded.last_seen_ms)",
        ),
        _ => (
            "CASE WHEN excluded.last_seen_ms >= sync_peer.last_seen_ms \
             THEN excluded.position ELSE sync_peer.position END",
            "MAX(sync_peer.last_seen_ms, excluded.last_seen_ms)",
        ),
    };
    vec![
        (peer::Column::Position, Expr::cust(position)),
        (peer::Column::LastSeenMs, Expr::cust(seen)),
    ]
}

/// Writes gathered positions every `PEER_POSITIONS_FLUSH_MS` until a round finds nothing
/// new, then ends (the next `record_peer_position` starts another).
async fn write_peer_positions(
    positions: Arc<PeerPositions>,
    db: DatabaseConnection,
    library_id: LibraryId,
) {
    loop {
        tokio::time::sleep(Duration::from_millis(PEER_POSITIONS_FLUSH_MS)).await;
        if let Err(e) = positions.write(&db, library_id).await {
            // Positions only inform `status`; the next pull of each follower brings its
            // position again.
            tracing::warn!(library = %library_id, %e, "writing followers' positions failed");
        }
        let mut gathered = positions.gathered();
        if gathered.seen.is_empty() {
            // Under the lock: a position noted after this starts a task of its own.
            gathered.flush_due = false;
            return;
        }
    }
}

impl Library {
    /// Records that `device` pulled from `position` (leader side, for status). It only
    /// notes the position: a background task writes every follower's newest position in
    /// one transaction at most once per `PEER_POSITIONS_FLUSH_MS`, off the request path.
    /// `members` shows noted positions at once; `flush_peer_positions` writes them now.
    pub(crate) async fn record_peer_position(
        &self,
        device: DeviceId,
        position: Seq,
    ) -> Result<(), DbErr> {
        let now_ms = chrono::Utc::now().timestamp_millis();
        if self.peer_positions.note(device, position, now_ms) {
            tokio::spawn(write_peer_positions(
                Arc::clone(&self.peer_positions),
                self.db.clone(),
                self.id(),
            ));
        }
        Ok(())
    }

    /// Writes the followers' positions noted so far now (a leader shutting down calls it
    /// so that `status` in another process sees where each follower stood).
    pub(crate) async fn flush_peer_positions(&self) -> Result<(), DbErr> {
        self.peer_positions.write(&self.db, self.id()).await
    }

    /// Every follower's position as this leader knows it: stored, or noted since (the
    /// newer). A handoff passes them on.
    pub(crate) async fn peer_positions_now<C: sea_orm::ConnectionTrait>(
        &self,
        db: &C,
    ) -> Result<Vec<(String, i64, i64)>, DbErr> {
        use sea_orm::{ColumnTrait, QueryFilter};
        let mut known: HashMap<String, (i64, i64)> = peer::Entity::find()
            .filter(peer::Column::LibraryId.eq(self.id().to_string()))
            .all(db)
            .await?
            .into_iter()
            .map(|row| (row.device_id, (row.position, row.last_seen_ms)))
            .collect();
        for (device, (position, seen_at_ms)) in self.peer_positions.snapshot() {
            let newer = known
                .get(&device.to_string())
                .is_none_or(|(_, stored_at)| seen_at_ms >= *stored_at);
            if newer {
                known.insert(device.to_string(), (position.0 as i64, seen_at_ms));
            }
        }
        let mut out: Vec<_> = known
            .into_iter()
            .map(|(device, (position, seen_at_ms))| (device, position, seen_at_ms))
            .collect();
        out.sort();
        Ok(out)
    }
}
