//! `Library`: the handle an app writes through.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::{mpsc, watch};

use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, DatabaseConnection, DatabaseTransaction, DbErr,
    EntityTrait, QueryFilter, QueryOrder, QuerySelect,
};
use serde::Serialize;

use crate::backend::postgres::Sequencer;
use crate::capture::{CaptureContext, CapturedChange};
use crate::connection::SyncTransaction;
use crate::entry::{ChangeOp, LogEntry};
use crate::error::{LogError, OpenError};
use crate::registry::Registry;
use crate::tables::{device, library, local, log, outbox, pending};
use crate::{DeviceId, DeviceKey, Hlc, HlcClock, LibraryId, Seq};

/// Rows per INSERT when appending to the log. Measured on PostgreSQL (BENCHMARKS.md):
/// statements of 8–32 rows are cheapest per row, and past ~60 rows (660 bound values) a
/// statement suddenly costs tens of milliseconds. 16 rows keep well inside the fast range.
pub(crate) const LOG_INSERT_ROWS_MAX: usize = 16;

pub(crate) const LOCAL_DEVICE_KEY: &str = "device_key";
pub(crate) const LOCAL_DEFAULT_LIBRARY: &str = "default_library";

/// A boxed future borrowing the transaction, as `Library::transaction` takes it.
pub type TxnFuture<'c, T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send + 'c>>;

/// The last committed entry of the log, as this handle knows it.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Tip {
    pub(crate) seq: Seq,
    pub(crate) checksum: u64,
}

/// A library's latest seq, watched: see `Library::watch_latest_seq`.
#[derive(Clone, Debug)]
pub struct LatestSeq(watch::Receiver<Tip>);

impl LatestSeq {
    /// The latest seq known now.
    pub fn get(&self) -> Seq {
        self.0.borrow().seq
    }

    /// Waits until the latest seq moves past what this watcher last saw, and returns it;
    /// `None` once the library's handles are all gone.
    pub async fn changed(&mut self) -> Option<Seq> {
        self.0.changed().await.ok()?;
        Some(self.0.borrow_and_update().seq)
    }
}

/// This device's part in a library.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Holds the log and sequences every change.
    Leader,
    /// Pulls the log; may write (push) or only read, as the leader granted.
    Follower,
}

/// One library's handle on this device: write through it, read its log.
#[derive(Clone, Debug)]
pub struct Library {
    pub(crate) db: DatabaseConnection,
    pub(crate) registry: Arc<Registry>,
    pub(crate) context: Arc<CaptureContext>,
    /// Who leads and in which epoch (the role follows from it); shared by clones, and
    /// changed at runtime by a move.
    pub(crate) leadership: crate::leadership::SharedLeadership,
    /// Shared by clones: the newest entry this handle has seen committed.
    pub(crate) tip: Arc<watch::Sender<Tip>>,
    /// Held (shared) by every transaction from its decision to sequence until its commit;
    /// a handoff takes it alone to stop sequencing with no such transaction in between.
    pub(crate) sequencing_gate: Arc<tokio::sync::RwLock<()>>,
    /// Leader: where followers' pulls showed them (a handoff waits on it).
    pub(crate) pulls_seen: Arc<crate::handoff::PullsSeen>,
    /// PostgreSQL only: numbers pending entries.
    sequencer: Option<Arc<Sequencer>>,
    /// PostgreSQL only: asks the background sequencer for a run. Capacity one, so kicks
    /// made while a run is due coalesce into it.
    kick: Option<mpsc::Sender<()>>,
    /// Bumped when this process admits or revokes a device, so live connections recheck.
    membership: Arc<watch::Sender<u64>>,
    /// Bumped when a write enters this follower's outbox, so the follow loop pushes.
    outbox_news: Arc<watch::Sender<u64>>,
    /// Follower: the highest latest seq its leader's answers announced (in this process),
    /// for what a promotion reports lost.
    pub(crate) leader_latest_seen: Arc<std::sync::atomic::AtomicU64>,
    /// Leader: followers' positions seen since the last write of `sync_peer`.
    pub(crate) peer_positions: Arc<crate::peers::PeerPositions>,
    /// Leader: admission checks asked for together, read together.
    pub(crate) admissions: Arc<crate::members::AdmissionReads>,
    /// Leader: the log ranges (and latest seq) that pulls ask for together, read once.
    pub(crate) pull_reads: Arc<crate::serve::PullReads>,
}

/// Moves a cached tip forward, never back, and tells its watchers.
pub(crate) fn advance(tip: &watch::Sender<Tip>, committed: Tip) {
    tip.send_if_modified(|tip| {
        let newer = committed.seq > tip.seq;
        if newer {
            *tip = committed;
        }
        newer
    });
}

/// What `append` did with a transaction's changes.
pub(crate) enum Appended {
    /// There were none.
    Nothing,
    /// Numbered into the log, up to this tip.
    Sequenced(Tip),
    /// Stored for the sequencer (PostgreSQL).
    Pending,
    /// Stored in a follower's outbox.
    Outbox,
}

/// What `Library::status` reports.
#[derive(Clone, Debug, Serialize)]
pub struct Status {
    /// Leader or follower.
    pub role: Role,
    /// The library.
    pub library_id: LibraryId,
    /// This device.
    pub device_id: DeviceId,
    /// The last seq in the log on this device.
    pub latest_seq: Seq,
}

/// A record whose table row and log disagree: it was written by a path that skips the hooks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Drift {
    /// The model's sync id.
    pub model: String,
    /// The record.
    pub record_id: String,
    /// How they disagree.
    pub kind: DriftKind,
}

/// How a table row and the log disagree.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DriftKind {
    /// The row exists, and the log has no entry for it or an older value.
    Unlogged,
    /// The log says the record exists, but the row is gone.
    Vanished,
}

impl Library {
    /// Opens the database's library, creating it (led by this device, named `name`) on the
    /// first start: call it on every start. `name` is used only when creating.
    ///
    /// It opens the default library, the one `create` made or a join stored, so a device
    /// that joined a library opens that one. Two processes starting at once on a fresh
    /// SQLite database open the same library.
    pub async fn open_or_create(
        db: DatabaseConnection,
        name: &str,
        registry: Registry,
    ) -> Result<Library, OpenError> {
        let library_id = match default_library_id(&db).await? {
            Some(library_id) => library_id,
            None => match new_library(&db, name).await {
                Ok(library_id) => library_id,
                // Another process created it meanwhile.
                Err(OpenError::AlreadyHasLibrary(library_id)) => library_id,
                Err(e) => return Err(e),
            },
        };
        Library::open(db, library_id, registry).await
    }

    /// Creates a library led by this device (creating this device's identity on first use)
    /// and makes it the database's default library.
    ///
    /// A database holds one library: on a database that already holds one (made here or
    /// joined) this is refused with [`OpenError::AlreadyHasLibrary`]. To open it on every
    /// start and create it on the first, use [`Library::open_or_create`].
    pub async fn create(
        db: DatabaseConnection,
        name: &str,
        registry: Registry,
    ) -> Result<Library, OpenError> {
        let library_id = new_library(&db, name).await?;
        Library::open(db, library_id, registry).await
    }

    /// Opens the database's default library (the one `create` made, or a join stored).
    pub async fn open_default(
        db: DatabaseConnection,
        registry: Registry,
    ) -> Result<Library, OpenError> {
        let library_id = default_library_id(&db).await?.ok_or(OpenError::NoLibrary)?;
        Library::open(db, library_id, registry).await
    }

    /// Opens a library this device takes part in.
    pub async fn open(
        db: DatabaseConnection,
        library_id: LibraryId,
        registry: Registry,
    ) -> Result<Library, OpenError> {
        let device_id = ensure_device_id(&db).await?;
        if library::Entity::find_by_id(library_id.to_string())
            .one(&db)
            .await?
            .is_none()
        {
            return Err(OpenError::UnknownLibrary(library_id));
        }
        let leadership = crate::leadership::load_leadership(&db, library_id, device_id).await?;
        let role = if leadership.leader == device_id {
            Role::Leader
        } else {
            Role::Follower
        };
        // The clock starts above the newest entry so that a wall clock set back across a
        // restart cannot order new changes before old ones.
        let last = log::Entity::find()
            .filter(log::Column::LibraryId.eq(library_id.to_string()))
            .order_by_desc(log::Column::Seq)
            .one(&db)
            .await?;
        let floor = last
            .as_ref()
            .map(|e| Hlc::from_u64(e.hlc as u64))
            .unwrap_or_default();
        let tip = last
            .map(|e| Tip {
                seq: Seq(e.seq as u64),
                checksum: e.checksum as u64,
            })
            .unwrap_or_default();
        let tip = Arc::new(watch::Sender::new(tip));
        let (sequencer, kick) = if crate::backend::of_connection(&db).sequences_in_background {
            let (sequencer, kick) = Sequencer::start(db.clone(), library_id, Arc::clone(&tip));
            (Some(sequencer), Some(kick))
        } else {
            (None, None)
        };
        // A follower's own writes wait in its outbox: the clock starts above them too.
        let floor = match outbox::Entity::find()
            .filter(outbox::Column::LibraryId.eq(library_id.to_string()))
            .order_by_desc(outbox::Column::Hlc)
            .one(&db)
            .await?
        {
            Some(row) => floor.max(Hlc::from_u64(row.hlc as u64)),
            None => floor,
        };
        // Timestamps observed from other devices (pulled, or taken from pushes) may be above
        // anything this database logged or queued: their maximum is kept as a floor.
        let floor = match get_local_value(&db, &clock_floor_key(library_id))
            .await?
            .and_then(|v| v.parse::<u64>().ok())
        {
            Some(raw) => floor.max(Hlc::from_u64(raw)),
            None => floor,
        };
        let own = device::Entity::find_by_id((library_id.to_string(), device_id.to_string()))
            .one(&db)
            .await?;
        let read_only = role == Role::Follower && own.is_none_or(|d| d.access == "read");
        let registry = Arc::new(registry.with_internal_models().resolved());
        // Apply upserts on a sync key: without a unique index there it would fail on every
        // entry, on a device that may be far from the one who can fix the schema.
        for ops in registry.iter_synced() {
            if let Some(column) = ops.local_key_column()
                && !crate::backend::has_unique_index(&db, ops.table_name(), column).await?
            {
                return Err(OpenError::SyncKeyNotUnique {
                    model: ops.sync_id().to_owned(),
                    table: ops.table_name().to_owned(),
                    column: column.to_owned(),
                });
            }
        }
        let context = Arc::new(CaptureContext {
            library_id,
            device_id,
            clock: Arc::new(HlcClock::new(floor)),
            read_only,
            registry: Arc::clone(&registry),
        });
        let library = Library {
            db,
            registry,
            context,
            leadership: Arc::new(std::sync::RwLock::new(leadership)),
            tip,
            sequencing_gate: Arc::default(),
            pulls_seen: Arc::default(),
            sequencer,
            kick,
            membership: Arc::new(watch::Sender::new(0)),
            outbox_news: Arc::new(watch::Sender::new(0)),
            leader_latest_seen: Arc::new(std::sync::atomic::AtomicU64::new(0)),
            peer_positions: Arc::default(),
            admissions: Arc::default(),
            pull_reads: Arc::default(),
        };
        library.note_not_held().await?;
        library.adopt_earlier_rows().await?;
        library.log_membership_once().await?;
        Ok(library)
    }

    /// The database connection (for reads; synced writes go through `transaction`).
    pub fn db(&self) -> &DatabaseConnection {
        &self.db
    }

    /// The registry of synced models.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// This library's id.
    pub fn id(&self) -> LibraryId {
        self.context.library_id
    }

    /// This device's id.
    pub fn device_id(&self) -> DeviceId {
        self.context.device_id
    }

    /// This device's key pair (for its TLS identity). The private key stays on the device.
    pub async fn device_key(&self) -> Result<DeviceKey, OpenError> {
        ensure_device_key(&self.db).await
    }

    /// The key pair of the device whose database `db` is, made on first use: a device
    /// needs it before it holds a library (to join one).
    pub async fn device_key_of(db: &DatabaseConnection) -> Result<DeviceKey, OpenError> {
        ensure_device_key(db).await
    }

    /// Leader or follower: whether this device is the library's current leader (see
    /// [`Library::leadership`]; it changes when leadership moves).
    pub fn role(&self) -> Role {
        self.role_of(&self.leadership())
    }

    /// Runs `work` in a transaction whose writes to synced models are recorded in the log,
    /// committing the writes and their entries together. An `Err` from `work` (or a failure
    /// to record) rolls everything back.
    ///
    /// Pass the transaction `work` receives to every write: the hooks refuse writes to
    /// synced models made through any other connection, and statements that write a
    /// synced table without hooks (`Entity::insert_many(..).exec`, raw SQL) are refused
    /// (use `SyncTransaction::insert_many`, `update_many`, `delete_many`). The same as
    /// `self.connection().transaction(…)`; the handle (`Library::connection`) is the
    /// recommended way.
    ///
    /// ```no_run
    /// # use sea_orm::{ActiveModelTrait, DbErr};
    /// # async fn example(library: &sync_core::Library) -> Result<(), DbErr> {
    /// library
    ///     .transaction(|txn| Box::pin(async move {
    ///         // e.g. tag::ActiveModel { name: Set("holiday".into()), ..Default::default() }.insert(txn).await?;
    ///         let _ = txn;
    ///         Ok::<_, DbErr>(())
    ///     }))
    ///     .await
    /// # }
    /// ```
    pub async fn transaction<T, E, F>(&self, work: F) -> Result<T, E>
    where
        F: for<'c> FnOnce(&'c SyncTransaction) -> TxnFuture<'c, T, E>,
        E: From<DbErr>,
    {
        self.run(work, true).await
    }

    /// Like `transaction`, but its writes are not recorded: for local-only maintenance
    /// (rebuilding a cache column, say). Followers will not see these writes.
    pub async fn unrecorded<T, E, F>(&self, work: F) -> Result<T, E>
    where
        F: for<'c> FnOnce(&'c SyncTransaction) -> TxnFuture<'c, T, E>,
        E: From<DbErr>,
    {
        self.run(work, false).await
    }

    async fn run<T, E, F>(&self, work: F, recording: bool) -> Result<T, E>
    where
        F: for<'c> FnOnce(&'c SyncTransaction) -> TxnFuture<'c, T, E>,
        E: From<DbErr>,
    {
        let txn = SyncTransaction::begin_for(self, recording).await?;
        let scope = txn.scope();
        let outcome = scope.run(work(&txn)).await;
        let txn = txn.into_inner();
        match outcome {
            Ok(value) => {
                let changes = scope.drain(&txn).await?;
                self.commit_changes(*txn, changes).await?;
                Ok(value)
            }
            Err(e) => {
                // Dropping an open transaction rolls it back too; an explicit rollback
                // returns the connection sooner. Its own failure adds nothing to `e`.
                if let Err(rollback) = txn.rollback().await {
                    tracing::warn!(%rollback, "rollback after a failed sync transaction failed");
                }
                Err(e)
            }
        }
    }

    /// Appends a transaction's captured changes and commits it, then tells whoever waits
    /// for them (`run`, and the connection handle's transactions and lone writes).
    pub(crate) async fn commit_changes(
        &self,
        txn: DatabaseTransaction,
        changes: Vec<CapturedChange>,
    ) -> Result<(), DbErr> {
        // Shared: a handoff waits for this transaction's commit before it stops sequencing.
        let _gate = self.sequencing_gate.read().await;
        let appended = self.append(&txn, changes).await?;
        txn.commit().await?;
        match appended {
            Appended::Nothing => {}
            Appended::Sequenced(tip) => self.advance_tip(tip),
            // The write has committed, whatever happens next: a failure to number
            // its entries now leaves them for the next sequencer run (any write or
            // log read of this library), so it must not look like a failed write.
            Appended::Outbox => self.outbox_news.send_modify(|n| *n = n.wrapping_add(1)),
            Appended::Pending => {
                if let Some(kick) = &self.kick {
                    // Full means a run is already due, which will take these too.
                    let _ = kick.try_send(());
                }
            }
        }
        Ok(())
    }

    /// A transaction that will write. SQLite: it takes the write lock at BEGIN. A deferred
    /// transaction that reads first and writes later fails with SQLITE_BUSY when another
    /// connection wrote in between; an immediate one waits its turn (busy_timeout) instead.
    ///
    /// Writes through the hooks in it are refused (it has no capture scope): it is for
    /// statements that bypass them, such as the follower's apply.
    pub(crate) async fn begin_write(&self) -> Result<DatabaseTransaction, DbErr> {
        begin_write(&self.db).await
    }

    /// Records the current state of a record again, on purpose: an upsert of its synced
    /// fields if it exists, a delete if not. Runs in its own recorded transaction.
    pub async fn record_again(&self, model: &str, record_id: &str) -> Result<ChangeOp, DbErr> {
        let ops =
            self.registry.get(model).cloned().ok_or_else(|| {
                DbErr::Custom(format!("`{model}` is not a synced model of this app"))
            })?;
        let record_id = record_id.to_owned();
        let upsert = self
            .transaction(move |txn| {
                Box::pin(async move { ops.record_again(txn.unguarded(), &record_id).await })
            })
            .await?;
        Ok(if upsert {
            ChangeOp::Upsert
        } else {
            ChangeOp::Delete
        })
    }

    /// Sequences `changes` after the library's last entry and appends them, in `txn`.
    /// Returns the new tip, for `advance_tip` once `txn` has committed.
    ///
    /// The first entry *claims* the next seq: it is inserted with `ON CONFLICT DO NOTHING`
    /// on the log's key `(library_id, seq)`. The seq comes from the in-memory tip, which
    /// only ever holds committed entries; when another writer (another handle, another
    /// process) got there first, the claim inserts nothing (on PostgreSQL and MySQL after
    /// waiting for that writer to finish) and the committed tip is read back. So a writer
    /// inserts seq N+1 only once seq N is committed and visible: seqs are gap-free and in
    /// commit order, and a reader that has seen N never later finds an entry below N.
    async fn append(
        &self,
        txn: &DatabaseTransaction,
        changes: Vec<CapturedChange>,
    ) -> Result<Appended, DbErr> {
        if changes.is_empty() {
            return Ok(Appended::Nothing);
        }
        if !self.sequences() {
            if self.role() == Role::Leader && changes.iter().any(|c| c.author.is_some()) {
                // A push reached a leader that stopped sequencing meanwhile (a handoff):
                // nothing of it is taken; its author pushes it again to the new leader.
                return Err(DbErr::Custom(
                    "this leader stopped sequencing during the push (leadership is moving); \
                     push again"
                        .into(),
                ));
            }
            // A follower's writes wait in its outbox for the leader to sequence them (so do
            // those of a leader that is handing off or was replaced).
            self.append_outbox(txn, changes).await?;
            return Ok(Appended::Outbox);
        }
        let drafts: Vec<LogEntry> = changes.into_iter().map(|c| self.draft(c)).collect();
        crate::backend::append(txn, self.context.library_id, self.cached_tip(), &drafts).await
    }

    /// Numbers `drafts` after `tip` and chains their checksums; returns the rows and the
    /// new tip.
    pub(crate) fn number(drafts: &[LogEntry], tip: Tip) -> (Vec<log::ActiveModel>, Tip) {
        let mut seq = tip.seq;
        let mut checksum = tip.checksum;
        let rows = drafts
            .iter()
            .map(|draft| {
                seq = seq.next();
                let mut entry = draft.clone();
                entry.seq = seq;
                entry.checksum = entry.chained_checksum(checksum);
                checksum = entry.checksum;
                entry_row(&entry)
            })
            .collect();
        (rows, Tip { seq, checksum })
    }

    /// A change as a log entry without its seq and checksum.
    pub(crate) fn draft(&self, change: CapturedChange) -> LogEntry {
        LogEntry {
            library_id: self.context.library_id,
            seq: Seq::ZERO,
            model: change.model.to_owned(),
            record_id: change.record_id,
            op: change.op,
            data: change.data,
            changed: change.changed.iter().map(|f| (*f).to_owned()).collect(),
            device_id: change.author.unwrap_or(self.context.device_id),
            hlc: change.hlc,
            schema_version: change.schema_version,
            checksum: 0,
        }
    }

    /// Moves committed pending entries (PostgreSQL) into the log now; a no-op on other
    /// backends. Writers only ask for this in the background, and reads do it first.
    pub async fn sequence(&self) -> Result<(), DbErr> {
        match &self.sequencer {
            Some(sequencer) => sequencer.run().await,
            None => Ok(()),
        }
    }

    fn cached_tip(&self) -> Tip {
        *self.tip.borrow()
    }

    /// Watches membership changes made through this process (admissions, revocations);
    /// other processes' changes show on the next membership check.
    pub fn watch_membership(&self) -> watch::Receiver<u64> {
        self.membership.subscribe()
    }

    /// Watches writes entering this follower's outbox (made through this process).
    pub fn watch_outbox(&self) -> watch::Receiver<u64> {
        self.outbox_news.subscribe()
    }

    /// Reads the wall time from `wall` from now on, for every timestamp this handle (and
    /// its clones) makes: a simulated clock, so that time is an input of the protocol.
    pub fn set_wall_clock(&self, wall: crate::hlc::WallClock) {
        self.context.clock.set_wall_clock(wall);
    }

    /// True for a follower that may not change synced models (read access).
    pub fn is_read_only(&self) -> bool {
        self.context.read_only
    }

    /// Wakes the follow loop to push (a write entered the outbox). Said before the write
    /// commits, it makes the loop push at most once too early; the next wake-up or poll
    /// pushes the change.
    pub(crate) fn outbox_changed(&self) {
        self.outbox_news.send_modify(|n| *n = n.wrapping_add(1));
    }

    pub(crate) fn membership_changed(&self) {
        self.membership.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Watches this library's latest seq as this process sees it: moved by its own
    /// commits at once, and by other processes' commits once something reads the log's
    /// tip (`latest_seq`, or a `CommitWatcher`).
    pub fn watch_latest_seq(&self) -> LatestSeq {
        LatestSeq(self.tip.subscribe())
    }

    /// Moves the cached tip forward (never back) after a commit.
    fn advance_tip(&self, committed: Tip) {
        advance(&self.tip, committed);
    }

    /// The last seq of this library's log.
    pub async fn latest_seq(&self) -> Result<Seq, LogError> {
        self.sequence().await?;
        let tip = committed_tip(&self.db, self.context.library_id, false).await?;
        self.advance_tip(tip);
        Ok(tip.seq)
    }

    /// Up to `limit` entries with seq greater than `after`, in seq order. Any `after` and
    /// `limit` are fine: seqs end at `i64::MAX`, so nothing lies beyond it.
    pub async fn read_log(&self, after: Seq, limit: u64) -> Result<Vec<LogEntry>, LogError> {
        self.sequence().await?;
        read_log(&self.db, self.context.library_id, after, limit).await
    }

    /// Leader or follower, ids and the latest seq.
    pub async fn status(&self) -> Result<Status, LogError> {
        Ok(Status {
            role: self.role(),
            library_id: self.context.library_id,
            device_id: self.context.device_id,
            latest_seq: self.latest_seq().await?,
        })
    }

    /// Every synced model's rows, synced fields only, sorted: identical on devices that
    /// have converged.
    pub async fn dump(&self) -> Result<serde_json::Value, DbErr> {
        let mut out = serde_json::Map::new();
        for ops in self.registry.iter_synced() {
            let rows = ops.rows(&self.db).await?;
            let rows = rows
                .into_iter()
                .map(|(_, fields)| serde_json::Value::Object(fields))
                .collect();
            out.insert(ops.sync_id().to_owned(), serde_json::Value::Array(rows));
        }
        Ok(serde_json::Value::Object(out))
    }

    /// Compares every synced table with the log and lists the records that disagree:
    /// those written by a path that skips SeaORM's hooks (`Entity::insert(..).exec`,
    /// `insert_many`, `update_many`, `delete_many`, `delete_by_id`, raw SQL). `repair`
    /// records them.
    ///
    /// On the leader a record's expected state is its last entry in the log. On a
    /// follower it is its last entry in the log the follower holds (`held.rs`, up to its
    /// position), or one of the follower's own changes not yet back from the leader: the
    /// newest in its outbox, one the leader acknowledged whose entry it has not pulled yet,
    /// or one the leader rejected (listed by `Library::rejected`). Records with a parked
    /// entry are left out: `Library::parked` lists them. A follower that applied part of
    /// the log before it kept it is refused with [`LogError::LogKeptOnlyAfter`] until
    /// `FollowerView::fill_held_log` has fetched that part.
    pub async fn audit(&self) -> Result<Vec<Drift>, LogError> {
        use crate::tables::{acknowledged, parked, rejected};
        let follower = self.role() == Role::Follower;
        let library_id = self.context.library_id.to_string();
        // Every state a record may rightly have, by (model, record id).
        let mut expected: HashMap<(String, String), Vec<Option<String>>> = HashMap::new();
        let mut left_out = std::collections::HashSet::new();
        let position = if follower {
            if let Some(run) = crate::held::runs(&self.db, self.id())
                .await?
                .into_iter()
                .rfind(|run| run.not_held)
            {
                return Err(LogError::LogKeptOnlyAfter { seq: run.through });
            }
            Some(self.position().await?.seq)
        } else {
            None
        };
        // The last logged data of every record, read page by page.
        let mut after = Seq::ZERO;
        'pages: loop {
            let page = match position {
                None => self.read_log(after, 10_000).await?,
                // The held log has gaps where pulls skipped entries.
                Some(_) => log::Entity::find()
                    .filter(log::Column::LibraryId.eq(library_id.as_str()))
                    .filter(log::Column::Seq.gt(after.0 as i64))
                    .order_by_asc(log::Column::Seq)
                    .limit(10_000)
                    .all(&self.db)
                    .await?
                    .into_iter()
                    .map(entry_from_row)
                    .collect::<Result<_, _>>()?,
            };
            let Some(last) = page.last() else { break };
            after = last.seq;
            for entry in page {
                if position.is_some_and(|p| entry.seq > p) {
                    break 'pages;
                }
                if !crate::leadership::is_reserved_model(&entry.model) {
                    expected.insert((entry.model, entry.record_id), vec![entry.data]);
                }
            }
        }
        if let Some(position) = position {
            let mut own = |model: String, record_id: String, data: Option<String>| {
                expected.entry((model, record_id)).or_default().push(data);
            };
            let mut newest = HashMap::new();
            for row in outbox::Entity::find()
                .filter(outbox::Column::LibraryId.eq(library_id.as_str()))
                .order_by_asc(outbox::Column::Id)
                .all(&self.db)
                .await?
            {
                newest.insert((row.model, row.record_id), row.data);
            }
            for ((model, record_id), data) in newest {
                own(model, record_id, data);
            }
            for row in acknowledged::Entity::find()
                .filter(acknowledged::Column::LibraryId.eq(library_id.as_str()))
                .filter(acknowledged::Column::ThroughSeq.gt(position.0 as i64))
                .all(&self.db)
                .await?
            {
                own(row.model, row.record_id, row.data);
            }
            for row in rejected::Entity::find()
                .filter(rejected::Column::LibraryId.eq(library_id.as_str()))
                .all(&self.db)
                .await?
            {
                own(row.model, row.record_id, row.data);
            }
            for row in parked::Entity::find()
                .filter(parked::Column::LibraryId.eq(library_id.as_str()))
                .all(&self.db)
                .await?
            {
                if let (Some(model), Some(record_id)) = (row.model, row.record_id) {
                    left_out.insert((model, record_id));
                }
            }
        }
        let mut drift = Vec::new();
        for ops in self.registry.iter_synced() {
            let model = ops.sync_id().to_owned();
            for (record_id, fields) in ops.rows(&self.db).await? {
                let data =
                    serde_json::to_string(&fields).map_err(|e| DbErr::Json(e.to_string()))?;
                let key = (model.clone(), record_id);
                let states = expected.remove(&key).unwrap_or_default();
                if left_out.contains(&key) || states.iter().any(|s| s.as_deref() == Some(&data)) {
                    continue;
                }
                drift.push(Drift {
                    model: key.0,
                    record_id: key.1,
                    kind: DriftKind::Unlogged,
                });
            }
        }
        // Records expected to exist whose row is gone (or is local to this device).
        let mut vanished: HashMap<String, Vec<String>> = HashMap::new();
        for ((model, record_id), states) in expected {
            if states.iter().all(Option::is_some)
                && !left_out.contains(&(model.clone(), record_id.clone()))
                && self.registry.get(&model).is_some()
            {
                vanished.entry(model).or_default().push(record_id);
            }
        }
        for (model, records) in vanished {
            let local = match self.registry.get(&model) {
                Some(ops) if ops.filtered() => {
                    let txn = sea_orm::TransactionTrait::begin(&self.db).await?;
                    let local = ops.local_only(&txn, records.clone()).await?;
                    txn.rollback().await?;
                    local
                }
                _ => Default::default(),
            };
            drift.extend(
                records
                    .into_iter()
                    .filter(|r| !local.contains(r))
                    .map(|record_id| Drift {
                        model: model.clone(),
                        record_id,
                        kind: DriftKind::Vanished,
                    }),
            );
        }
        drift.sort_by(|a, b| (&a.model, &a.record_id).cmp(&(&b.model, &b.record_id)));
        Ok(drift)
    }

    /// Records every drifted record's current state (see `audit`), in one transaction. On a
    /// write-role follower the changes go to its outbox and reach the leader with the next
    /// push (a record gone from the table is recorded as a delete, whatever the drift's kind).
    ///
    /// A follower with read access changes no synced data: it is refused (the read-access
    /// refusal, `WriteRefusal::ReadOnly`).
    pub async fn repair(&self, drift: &[Drift]) -> Result<usize, DbErr> {
        if let Some(first) = drift.first() {
            crate::roles::refuse_read_access(self.is_read_only(), self.id(), &first.model)?;
        }
        let mut targets = Vec::with_capacity(drift.len());
        for d in drift {
            let ops = self.registry.get(&d.model).cloned().ok_or_else(|| {
                DbErr::Custom(format!("`{}` is not a synced model of this app", d.model))
            })?;
            targets.push((ops, d.record_id.clone()));
        }
        let count = targets.len();
        self.transaction(move |txn| {
            Box::pin(async move {
                for (ops, record_id) in &targets {
                    ops.record_again(txn.unguarded(), record_id).await?;
                }
                Ok::<_, DbErr>(())
            })
        })
        .await?;
        Ok(count)
    }
}

/// The last committed entry of a library's log: its seq and checksum (zero when empty).
///
/// The row lock (`FOR UPDATE`) matters on MySQL, whose repeatable-read snapshot would
/// otherwise hide an entry committed since the transaction began; a locking read sees it.
pub(crate) async fn committed_tip<C: ConnectionTrait>(
    db: &C,
    library_id: LibraryId,
    lock: bool,
) -> Result<Tip, DbErr> {
    let mut query = log::Entity::find()
        .filter(log::Column::LibraryId.eq(library_id.to_string()))
        .order_by_desc(log::Column::Seq);
    if lock {
        query = query.lock_exclusive();
    }
    let last = query.one(db).await?;
    Ok(last
        .map(|e| Tip {
            seq: Seq(e.seq as u64),
            checksum: e.checksum as u64,
        })
        .unwrap_or_default())
}

/// Reads up to `limit` entries of a library's log with seq greater than `after` (callers sequence first).
pub(crate) async fn read_log<C: ConnectionTrait>(
    db: &C,
    library_id: LibraryId,
    after: Seq,
    limit: u64,
) -> Result<Vec<LogEntry>, LogError> {
    // Seqs are stored as i64: no entry lies after i64::MAX, and a limit above it is no
    // limit (the database drivers refuse larger numbers, some by panicking).
    let Ok(after_stored) = i64::try_from(after.0) else {
        return Ok(Vec::new());
    };
    if limit == 0 || after_stored == i64::MAX {
        return Ok(Vec::new());
    }
    let rows = log::Entity::find()
        .filter(log::Column::LibraryId.eq(library_id.to_string()))
        .filter(log::Column::Seq.gt(after_stored))
        .order_by_asc(log::Column::Seq)
        .limit(limit.min(i64::MAX as u64))
        .all(db)
        .await?;
    // Serve only the contiguous run after `after`. Seqs are claimed gap-free, but InnoDB
    // can make a later writer's commit visible a moment before an earlier one's: a reader
    // must not move past a seq that it cannot see yet. It will be there on the next read.
    let mut expected = after.next();
    let mut entries = Vec::with_capacity(rows.len());
    for row in rows {
        if row.seq as u64 != expected.0 {
            tracing::debug!(%expected, found = row.seq, "log read stops at a seq not yet visible");
            break;
        }
        entries.push(entry_from_row(row)?);
        expected = expected.next();
    }
    Ok(entries)
}

pub(crate) fn entry_row(entry: &LogEntry) -> log::ActiveModel {
    log::ActiveModel {
        library_id: Set(entry.library_id.to_string()),
        seq: Set(entry.seq.0 as i64),
        model: Set(entry.model.clone()),
        record_id: Set(entry.record_id.clone()),
        op: Set(entry.op.as_str().to_owned()),
        data: Set(entry.data.clone()),
        // A list of field names always serialises.
        changed: Set(changed_text(&entry.changed)),
        device_id: Set(entry.device_id.to_string()),
        hlc: Set(entry.hlc.as_u64() as i64),
        schema_version: Set(entry.schema_version as i32),
        checksum: Set(entry.checksum as i64),
    }
}

pub(crate) fn pending_row(draft: &LogEntry) -> pending::ActiveModel {
    pending::ActiveModel {
        id: sea_orm::ActiveValue::NotSet,
        library_id: Set(draft.library_id.to_string()),
        model: Set(draft.model.clone()),
        record_id: Set(draft.record_id.clone()),
        op: Set(draft.op.as_str().to_owned()),
        data: Set(draft.data.clone()),
        changed: Set(changed_text(&draft.changed)),
        device_id: Set(draft.device_id.to_string()),
        hlc: Set(draft.hlc.as_u64() as i64),
        schema_version: Set(draft.schema_version as i32),
    }
}

/// A pending entry as a log entry without its seq and checksum: the same columns, read by
/// the same parser.
pub(crate) fn draft_from_pending(row: pending::Model) -> Result<LogEntry, DbErr> {
    let id = row.id;
    let as_log = log::Model {
        library_id: row.library_id,
        seq: 0,
        model: row.model,
        record_id: row.record_id,
        op: row.op,
        data: row.data,
        changed: row.changed,
        device_id: row.device_id,
        hlc: row.hlc,
        schema_version: row.schema_version,
        checksum: 0,
    };
    entry_from_row(as_log).map_err(|e| DbErr::Custom(format!("pending sync entry {id}: {e}")))
}

/// A list of field names, as the log stores it.
pub(crate) fn changed_text(changed: &[impl serde::Serialize]) -> String {
    // Serialising a list of strings cannot fail.
    serde_json::to_string(changed).unwrap_or_else(|_| "[]".to_owned())
}

pub(crate) fn entry_from_row(row: log::Model) -> Result<LogEntry, LogError> {
    let seq = Seq(row.seq as u64);
    let corrupt = |reason: String| LogError::Corrupt { seq, reason };
    Ok(LogEntry {
        library_id: row
            .library_id
            .parse()
            .map_err(|e| corrupt(format!("library id: {e}")))?,
        seq,
        op: ChangeOp::parse(&row.op).ok_or_else(|| corrupt(format!("unknown op `{}`", row.op)))?,
        changed: serde_json::from_str(&row.changed)
            .map_err(|e| corrupt(format!("changed fields: {e}")))?,
        device_id: row
            .device_id
            .parse()
            .map_err(|e| corrupt(format!("device id: {e}")))?,
        hlc: Hlc::from_u64(row.hlc as u64),
        schema_version: u32::try_from(row.schema_version)
            .map_err(|e| corrupt(format!("schema version: {e}")))?,
        checksum: row.checksum as u64,
        model: row.model,
        record_id: row.record_id,
        data: row.data,
    })
}

pub(crate) async fn get_local<C: ConnectionTrait>(
    db: &C,
    key: &str,
) -> Result<Option<String>, OpenError> {
    match local::Entity::find_by_id(key.to_owned()).one(db).await {
        Ok(row) => Ok(row.map(|r| r.value)),
        Err(e) if is_missing_table(&e) => Err(OpenError::NotMigrated(e)),
        Err(e) => Err(e.into()),
    }
}

/// A `sync_local` value.
pub(crate) async fn get_local_value<C: ConnectionTrait>(
    db: &C,
    key: &str,
) -> Result<Option<String>, DbErr> {
    Ok(local::Entity::find_by_id(key.to_owned())
        .one(db)
        .await?
        .map(|r| r.value))
}

/// The `sync_local` key of a library's clock floor.
pub(crate) fn clock_floor_key(library_id: LibraryId) -> String {
    format!("clock_floor.{library_id}")
}

/// Persists the clock's latest timestamp as its floor after a restart, inside `txn`.
pub(crate) async fn save_clock_floor<C: ConnectionTrait>(
    db: &C,
    library_id: LibraryId,
    clock: &HlcClock,
) -> Result<(), DbErr> {
    set_local(
        db,
        &clock_floor_key(library_id),
        &clock.last().as_u64().to_string(),
    )
    .await
}

/// Sets a `sync_local` value.
pub(crate) async fn set_local_value<C: ConnectionTrait>(
    db: &C,
    key: &str,
    value: &str,
) -> Result<(), DbErr> {
    set_local(db, key, value).await
}

async fn set_local<C: ConnectionTrait>(db: &C, key: &str, value: &str) -> Result<(), DbErr> {
    let row = local::ActiveModel {
        key: Set(key.to_owned()),
        value: Set(value.to_owned()),
    };
    local::Entity::insert(row)
        .on_conflict(
            sea_orm::sea_query::OnConflict::column(local::Column::Key)
                .update_column(local::Column::Value)
                .to_owned(),
        )
        .exec_without_returning(db)
        .await
        .map(|_| ())
}

pub(crate) use crate::crowd::begin_write;

/// The database's default library, if it has one.
async fn default_library_id(db: &DatabaseConnection) -> Result<Option<LibraryId>, OpenError> {
    let Some(value) = get_local(db, LOCAL_DEFAULT_LIBRARY).await? else {
        return Ok(None);
    };
    value
        .parse()
        .map(Some)
        .map_err(|e| OpenError::Corrupt(format!("default library id `{value}`: {e}")))
}

/// Records a new library led by this device and makes it the database's default library;
/// refused when the database already holds a library.
async fn new_library(db: &DatabaseConnection, name: &str) -> Result<LibraryId, OpenError> {
    let key = ensure_device_key(db).await?.fingerprint();
    let device_id = key.device_id();
    let library_id = LibraryId(uuid::Uuid::now_v7());
    let now_ms = chrono::Utc::now().timestamp_millis();
    // SQLite: the write lock from BEGIN on, so that of two processes creating at once the
    // second sees the first's library.
    let txn = begin_write(db).await?;
    if let Some(existing) = library::Entity::find()
        .order_by_asc(library::Column::CreatedAtMs)
        .one(&txn)
        .await?
    {
        let existing = match get_local(&txn, LOCAL_DEFAULT_LIBRARY).await? {
            Some(value) => value,
            None => existing.id,
        };
        let existing = existing
            .parse()
            .map_err(|e| OpenError::Corrupt(format!("library id `{existing}`: {e}")))?;
        return Err(OpenError::AlreadyHasLibrary(existing));
    }
    library::ActiveModel {
        id: Set(library_id.to_string()),
        name: Set(name.to_owned()),
        leader_device_id: Set(device_id.to_string()),
        created_at_ms: Set(now_ms),
        epoch: Set(crate::Epoch::FIRST.0 as i64),
        epoch_start_seq: Set(0),
    }
    .insert_into(&txn)
    .await?;
    device::ActiveModel {
        library_id: Set(library_id.to_string()),
        device_id: Set(device_id.to_string()),
        access: Set("leader".to_owned()),
        name: Set(None),
        added_at_ms: Set(now_ms),
        revoked_at_ms: Set(None),
        key: Set(Some(key.to_string())),
        addresses: Set(None),
    }
    .insert_into(&txn)
    .await?;
    set_local(&txn, LOCAL_DEFAULT_LIBRARY, &library_id.to_string()).await?;
    txn.commit().await?;
    Ok(library_id)
}

/// This device's id, derived from its key pair, which is made on first use.
pub(crate) async fn ensure_device_id(db: &DatabaseConnection) -> Result<DeviceId, OpenError> {
    Ok(ensure_device_key(db).await?.device_id())
}

pub(crate) use crate::identity::ensure_device_key;

fn is_missing_table(e: &DbErr) -> bool {
    let text = e.to_string();
    text.contains("no such table")
        || text.contains("does not exist")
        || text.contains("doesn't exist")
}

/// Inserting an ActiveModel of an internal table without reading it back.
pub(crate) trait InsertInto {
    async fn insert_into<C: ConnectionTrait>(self, db: &C) -> Result<(), DbErr>;
}

impl<A> InsertInto for A
where
    A: sea_orm::ActiveModelTrait + Send,
{
    async fn insert_into<C: ConnectionTrait>(self, db: &C) -> Result<(), DbErr> {
        <A::Entity as EntityTrait>::insert(self)
            .exec_without_returning(db)
            .await
            .map(|_| ())
    }
}
