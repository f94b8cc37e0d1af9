//! The follower's side: apply pulled entries exactly once, with the position in the same
//! transaction.

use sea_orm::ActiveValue::Set;
use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseConnection, DbErr, EntityTrait, QueryFilter,
    TransactionTrait,
};
use serde::Serialize;

use crate::decide::{absorb, follow};
use crate::entry::ChainError;
use crate::error::OpenError;
use crate::library::{LOCAL_DEFAULT_LIBRARY, ensure_device_id, set_local_value};
use crate::members::local_setting_key;
use crate::parked::{Parking, park_statement};
use crate::protocol::{
    PROTOCOL_VERSION, PullError, PullRequest, PullResponse, PulledItem, Transport,
};
use crate::registry::ApplyFailure;
use crate::tables::{device, library, position};
use crate::{Access, DeviceId, Library, LibraryId, LogEntry, Registry, Role, Seq};

/// Where a follower stands in a library's log.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Position {
    /// Everything up to here is applied.
    pub seq: Seq,
    /// The log's rolling checksum at `seq`.
    pub checksum: u64,
}

/// What one `apply` did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Applied {
    /// Entries applied.
    pub entries: usize,
    /// The position afterwards.
    pub position: Position,
    /// `(model, record_id)` of every applied entry, for "changes applied" listeners.
    pub records: Vec<(String, String)>,
}

/// Why a batch was not applied. The position stays where it was: nothing of the batch is
/// applied.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApplyError {
    /// The leader speaks another protocol version.
    #[error(
        "protocol version mismatch: this follower speaks {ours}, the leader {theirs}; \
         update the older app"
    )]
    VersionMismatch {
        /// Ours.
        ours: u32,
        /// The leader's.
        theirs: u32,
    },
    /// The response is about another library.
    #[error("the leader answered for library {found}, but this follower follows {expected}")]
    WrongLibrary {
        /// Ours.
        expected: LibraryId,
        /// In the response.
        found: LibraryId,
    },
    /// The batch does not continue this follower's history.
    #[error("{0}; stopped before applying anything of this batch")]
    Chain(#[from] ChainError),
    /// An entry is for a model this build does not know: the leader runs a newer app.
    #[error(
        "entry {seq} is for model `{model}`, which this app does not know: the leader runs a \
         newer version; update this app, then sync again"
    )]
    UnknownModel {
        /// The entry.
        seq: Seq,
        /// Its model.
        model: String,
    },
    /// An entry was written with another schema version of its model.
    #[error(
        "entry {seq} of `{model}` has schema version {theirs}, this app has {ours}: \
         update the older app, then sync again"
    )]
    SchemaMismatch {
        /// The entry.
        seq: Seq,
        /// Its model.
        model: String,
        /// This build's version.
        ours: u32,
        /// The entry's.
        theirs: u32,
    },
    /// An entry does not fit the local schema.
    #[error("entry {seq} of `{model}` does not fit this app's model: {reason}")]
    BadPayload {
        /// The entry.
        seq: Seq,
        /// Its model.
        model: String,
        /// What does not fit.
        reason: String,
    },
    /// This device's database refuses an entry (a value it cannot store, a constraint): the
    /// follower cannot get past it until the cause is fixed or a person parks it.
    #[error(
        "entry {seq} (`{model}` record {record_id}) cannot be stored on this device: {reason}; \
         fix the cause (a schema change, say) and sync again, or set the entry aside with \
         `FollowerView::park({seq})`: the entries after it then go on, later entries of the same \
         record wait behind it, and `FollowerView::retry_parked` applies them once the cause is fixed"
    )]
    Stuck {
        /// The entry.
        seq: Seq,
        /// Its model.
        model: String,
        /// Its record.
        record_id: String,
        /// What the database said.
        reason: String,
    },
    /// A move record (a leadership move) in the log cannot be trusted: its signature, its
    /// signer or its place in the chain is wrong. Nothing of the batch is applied, and this
    /// device keeps following the leader it knows.
    #[error(
        "entry {seq} records a leadership move this device cannot trust: {reason}; it keeps \
         the leader it knows and applies nothing after it"
    )]
    BadMove {
        /// The entry.
        seq: Seq,
        /// What is wrong with it.
        reason: String,
    },
    /// Another apply moved the position meanwhile.
    #[error("the position moved from {expected} to {found} during this pull; pull again")]
    PositionMoved {
        /// Where this batch starts.
        expected: Seq,
        /// Where the position is.
        found: Seq,
    },
    /// The runtime shut down while the batch was being applied; nothing of it was.
    #[error(
        "applying was interrupted (the runtime is shutting down); nothing of the batch was applied"
    )]
    Interrupted,
    /// The database failed.
    #[error("database error: {0}")]
    Db(#[from] DbErr),
}

/// `(model, record_id)` of rows local to this device, among a response's entries.
type LocalRows = std::collections::HashSet<(String, String)>;

/// One response's items as the builder takes them, with the rows among them that are
/// local to this device.
struct Batch {
    items: Vec<PulledItem>,
    local: LocalRows,
}

/// Reserved entries of a transaction's responses, each with the position before it.
type Reserved = Vec<(crate::LogEntry, Position)>;

/// Statements built ahead of the one executing: bounds what a batch holds twice.
const STATEMENTS_AHEAD: usize = 4;

/// Entries after which [`Library::apply_all`] commits before taking another response: a
/// few tens of milliseconds of SQLite's write lock, amortising each transaction's begin,
/// position and commit over many responses.
pub const APPLY_GROUP_ENTRIES: usize = 10_000;

/// Responses `catch_up` pulls ahead of the one being applied.
pub const PULLS_AHEAD: usize = 2;

/// Why a sync round failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SyncError {
    /// Pulling failed.
    #[error(transparent)]
    Pull(#[from] PullError),
    /// Applying failed.
    #[error(transparent)]
    Apply(#[from] ApplyError),
    /// Pushing the outbox failed.
    #[error(transparent)]
    Push(#[from] crate::protocol::PushError),
}

impl Library {
    /// Sets up this database as a follower of `library_id`, led by `leader`, with the
    /// `access` the leader granted, and makes it the default library.
    ///
    /// `join_with_settings` also stores the app's local settings (where the leader is,
    /// its pinned key) in the same transaction.
    pub async fn join(
        db: DatabaseConnection,
        library_id: LibraryId,
        leader: DeviceId,
        name: &str,
        access: Access,
        registry: Registry,
    ) -> Result<Library, OpenError> {
        Library::join_with_settings(db, library_id, leader, name, access, &[], registry).await
    }

    /// [`Library::join`], storing `settings` (`(key, value)`, read back with
    /// [`Library::local_setting`]) in the same transaction as the library, this device's
    /// membership and the default library: a join interrupted at any point leaves all of it
    /// or none of it.
    ///
    /// Joining a library this database already follows stores it again (an earlier join
    /// stored by a build without this transaction may have stopped half-way): the name,
    /// leader and access are replaced, the settings written, the position and outbox kept.
    /// A library this device leads cannot be joined ([`OpenError::LeadsLibrary`]).
    pub async fn join_with_settings(
        db: DatabaseConnection,
        library_id: LibraryId,
        leader: DeviceId,
        name: &str,
        access: Access,
        settings: &[(&str, &str)],
        registry: Registry,
    ) -> Result<Library, OpenError> {
        let device_id = ensure_device_id(&db).await?;
        if leader == device_id {
            return Err(OpenError::LeadsLibrary(library_id));
        }
        let adopt = Library::rows_to_adopt(&db, library_id, access, &registry).await?;
        let txn = db.begin().await?;
        store_joined(&txn, library_id, name, leader, device_id, access, settings).await?;
        if adopt {
            crate::adopt::mark_for_adoption(&txn, library_id).await?;
        } else if access == Access::Read {
            // A write join stopped before its rows entered the outbox, joined again with
            // read access: they can never be pushed now, and the mark would fail every open.
            crate::adopt::unmark_for_adoption(&txn, library_id).await?;
        }
        txn.commit().await?;
        Library::open(db, library_id, registry).await
    }

    /// Whether this database may join library `library_id` with `access`, checked before
    /// anything is spent on it: call it before redeeming an invite, so that a join that
    /// [`Library::join`] would refuse ([`OpenError::RowsBeforeJoin`]: a read member whose
    /// synced tables hold rows that exist on no other device) leaves the invite unused.
    /// `Library::join` checks the same.
    pub async fn check_join(
        db: &DatabaseConnection,
        library_id: LibraryId,
        access: Access,
        registry: &Registry,
    ) -> Result<(), OpenError> {
        Library::rows_to_adopt(db, library_id, access, registry)
            .await
            .map(|_| ())
    }

    /// Whether a join must adopt rows that predate it; refused for a read member.
    async fn rows_to_adopt(
        db: &DatabaseConnection,
        library_id: LibraryId,
        access: Access,
        registry: &Registry,
    ) -> Result<bool, OpenError> {
        // Rows of synced models that predate the first join exist on no other device (see
        // `adopt.rs`): a write member pushes them, a read member cannot have them.
        let first_join = library::Entity::find_by_id(library_id.to_string())
            .one(db)
            .await?
            .is_none();
        if !first_join {
            return Ok(false);
        }
        let found = crate::adopt::unshared_rows(db, registry).await?;
        match found.into_iter().next() {
            Some((model, rows)) if access == Access::Read => Err(OpenError::RowsBeforeJoin {
                model: model.to_owned(),
                rows,
            }),
            found => Ok(found.is_some()),
        }
    }

    /// This follower's position in the log.
    pub async fn position(&self) -> Result<Position, DbErr> {
        read_position(&self.db, self.id()).await
    }

    /// The position as a transaction sees it.
    pub(crate) async fn position_in(
        &self,
        txn: &sea_orm::DatabaseTransaction,
    ) -> Result<Position, DbErr> {
        read_position(txn, self.id()).await
    }

    /// Applies a pull response that answers a request from `after`, in one transaction
    /// together with the new position: all of it or none of it, exactly once.
    ///
    /// The batch must continue this follower's history: contiguous seqs from its position
    /// and an unbroken checksum chain. An entry of an unknown model, of another schema
    /// version, or that does not fit the local model stops the batch with an error.
    /// Applied entries are not recorded again by this device's hooks.
    ///
    /// Checking the entries and building their statements runs on a blocking thread beside
    /// the transaction, which executes each statement as it arrives; whatever fails rolls
    /// the whole transaction back.
    pub(crate) async fn apply(
        &self,
        after: Seq,
        response: PullResponse,
    ) -> Result<Applied, ApplyError> {
        self.apply_all(after, std::iter::once(response)).await
    }

    /// Applies consecutive pull responses: the first answers a request from `after`, each
    /// later one a request from where the one before it ends. Returns everything applied.
    ///
    /// Responses share a transaction (and its commit) until it holds
    /// [`APPLY_GROUP_ENTRIES`] entries; a response is never split. Each transaction moves
    /// the position with its data, so a failure keeps every transaction committed before
    /// it and nothing of its own, and the error says which entry stopped it.
    ///
    /// `responses` is advanced only for a response that will be applied, and the call ends
    /// at its first `None`: a source that answers `None` while nothing has arrived (a
    /// channel's `try_recv`) never makes this wait, nor hold the database's write lock,
    /// for the network.
    pub(crate) async fn apply_all<I>(&self, after: Seq, responses: I) -> Result<Applied, ApplyError>
    where
        I: IntoIterator<Item = PullResponse>,
        I::IntoIter: Send,
    {
        // Fused: a source that said `None` once is not asked again.
        let mut responses = responses.into_iter().fuse();
        let mut total = Applied::default();
        let mut position = None;
        while let Some(response) = responses.next() {
            self.check_response(&response)?;
            if response.items.is_empty() {
                continue;
            }
            let applied = self
                .apply_group(
                    position.map_or(after, |p: Position| p.seq),
                    response,
                    &mut responses,
                )
                .await?;
            total.entries += applied.entries;
            total.records.extend(applied.records);
            position = Some(applied.position);
        }
        total.position = match position {
            Some(position) => position,
            None => self.position().await?,
        };
        Ok(total)
    }

    fn check_response(&self, response: &PullResponse) -> Result<(), ApplyError> {
        absorb::check_response(self.id(), response).map_err(|r| self.refused(r))
    }

    /// The error for a refusal of the absorb plan.
    fn refused(&self, refusal: absorb::Refusal) -> ApplyError {
        match refusal {
            absorb::Refusal::VersionMismatch { theirs } => ApplyError::VersionMismatch {
                ours: PROTOCOL_VERSION,
                theirs,
            },
            absorb::Refusal::WrongLibrary { found } => ApplyError::WrongLibrary {
                expected: self.id(),
                found,
            },
            absorb::Refusal::Chain(e) => ApplyError::Chain(e),
            absorb::Refusal::UnknownModel { seq, model } => ApplyError::UnknownModel { seq, model },
            absorb::Refusal::SchemaMismatch {
                seq,
                model,
                ours,
                theirs,
            } => ApplyError::SchemaMismatch {
                seq,
                model,
                ours,
                theirs,
            },
        }
    }

    /// The records among `items` whose rows here are local to this device (their model's
    /// filter excludes them), which apply passes over. On a follower with write access an upsert
    /// that would have re-created such a record elsewhere is answered with a delete in the
    /// outbox: the record stays gone on the other devices and local here.
    async fn local_rows(
        &self,
        txn: &sea_orm::DatabaseTransaction,
        items: &[PulledItem],
    ) -> Result<LocalRows, DbErr> {
        let mut keys: std::collections::HashMap<&str, Vec<String>> = Default::default();
        for item in items {
            if let PulledItem::Entry(entry) = item
                && self
                    .registry
                    .get(&entry.model)
                    .is_some_and(|ops| ops.filtered())
            {
                keys.entry(entry.model.as_str())
                    .or_default()
                    .push(entry.record_id.clone());
            }
        }
        let mut local = LocalRows::new();
        for (model, keys) in keys {
            let Some(ops) = self.registry.get(model) else {
                continue;
            };
            for key in ops.local_only(txn, keys).await? {
                local.insert((model.to_owned(), key));
            }
        }
        if local.is_empty() || self.is_read_only() || self.role() != Role::Follower {
            return Ok(local);
        }
        let mut deletes = Vec::new();
        for item in items {
            if let PulledItem::Entry(entry) = item
                && entry.op == crate::ChangeOp::Upsert
                && local.contains(&(entry.model.clone(), entry.record_id.clone()))
                && let Some(ops) = self.registry.get(&entry.model)
            {
                // The answer orders after what it answers, whatever the clocks' skew.
                self.context.clock.observe(entry.hlc);
                deletes.push(crate::capture::CapturedChange::delete(
                    ops.sync_id(),
                    entry.record_id.clone(),
                    self.context.clock.now(),
                    ops.schema_version(),
                    None,
                ));
            }
        }
        if !deletes.is_empty() {
            self.append_outbox(txn, deletes).await?;
            self.outbox_changed();
        }
        Ok(local)
    }

    /// One transaction of `apply_all`: `first`, then responses taken from `more` while the
    /// transaction is under [`APPLY_GROUP_ENTRIES`], and the position they reach.
    ///
    /// A builder thread checks each response and turns it into statements; the writer here
    /// executes them as they arrive and hands the builder the next response as soon as it
    /// has finished the one before, so that neither waits on the other's tail.
    #[tracing::instrument(
        name = "apply",
        skip_all,
        fields(library = %self.id(), device = %self.device_id(), after = after.0, through)
    )]
    async fn apply_group(
        &self,
        after: Seq,
        first: PullResponse,
        more: &mut (dyn Iterator<Item = PullResponse> + Send),
    ) -> Result<Applied, ApplyError> {
        let started = std::time::Instant::now();
        let txn = self.begin_write().await?;
        match self.apply_group_in(&txn, after, first, more).await {
            Ok((applied, leadership_changed)) => {
                txn.commit().await?;
                if leadership_changed {
                    self.refresh_leadership().await?;
                }
                tracing::Span::current().record("through", applied.position.seq.0);
                crate::metrics::record_applied(self.id(), applied.entries, started);
                Ok(applied)
            }
            Err(e) => {
                // Dropping the transaction would roll it back too; this returns the
                // connection sooner. Its own failure adds nothing to `e`.
                if let Err(rollback) = txn.rollback().await {
                    tracing::warn!(%rollback, "rollback after a failed apply failed");
                }
                Err(e)
            }
        }
    }

    async fn apply_group_in(
        &self,
        txn: &sea_orm::DatabaseTransaction,
        after: Seq,
        first: PullResponse,
        more: &mut (dyn Iterator<Item = PullResponse> + Send),
    ) -> Result<(Applied, bool), ApplyError> {
        let start = read_position(txn, self.id()).await?;
        if start.seq != after {
            return Err(ApplyError::PositionMoved {
                expected: after,
                found: start.seq,
            });
        }
        let backend = txn.get_database_backend();
        // A follower that joined has not heard its leader's epoch yet: it takes the one its
        // pinned leader states (the moves before it are then history).
        let learnt =
            self.epoch() == crate::Epoch::UNSTATED && first.epoch != crate::Epoch::UNSTATED;
        if learnt {
            crate::leadership::learn_epoch(txn, self.id(), first.epoch).await?;
        }
        let parking = Parking::load(txn, self.id(), start.seq).await?;
        let (to_build, building) = std::sync::mpsc::channel::<Batch>();
        let (statements, mut ready) = tokio::sync::mpsc::channel(STATEMENTS_AHEAD);
        let (built_one, mut built) = tokio::sync::mpsc::unbounded_channel::<()>();
        let mut taken = first.items.len();
        // The builder stops when this sender is gone and it has built what it was given.
        let mut to_build = Some(to_build);
        let local = self.local_rows(txn, &first.items).await?;
        if let Some(sender) = &to_build {
            // Nothing can have failed yet: the builder is spawned below.
            let _ = sender.send(Batch {
                items: first.items,
                local,
            });
        }
        let preparing = tokio::task::spawn_blocking({
            let this = self.clone();
            move || this.build_responses(start, parking, building, backend, statements, built_one)
        });
        let mut written: Result<(), ApplyError> = Ok(());
        loop {
            tokio::select! {
                // The builder has finished the response it was given: hand it the next one
                // first, so that it builds while the writer works through what is queued.
                biased;
                Some(()) = built.recv(), if to_build.is_some() => {
                    match self.next_to_build(&mut taken, more) {
                        Ok(Some(items)) => {
                            let local = match self.local_rows(txn, &items).await {
                                Ok(local) => local,
                                Err(e) => {
                                    written = Err(e.into());
                                    break;
                                }
                            };
                            if let Some(sender) = &to_build {
                                // A builder that has gone has failed: its error comes below.
                                let _ = sender.send(Batch { items, local });
                            }
                        }
                        Ok(None) => to_build = None,
                        Err(e) => {
                            written = Err(e);
                            break;
                        }
                    }
                }
                statement = ready.recv() => match statement {
                    Some(statement) => {
                        if let Err(e) = statement.execute(txn).await {
                            written = Err(e.into());
                            break;
                        }
                    }
                    // The builder has finished (or failed): everything it built ran.
                    None => break,
                },
            }
        }
        // A builder still running stops at its next statement or response.
        drop(ready);
        drop(to_build);
        let prepared = match preparing.await {
            Ok(prepared) => prepared,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => return Err(ApplyError::Interrupted),
        };
        // Statements run in entry order: a failed one comes before any entry the builder
        // could refuse after it.
        written?;
        let (applied, reserved) = prepared?;
        // Membership and move records, in log order, after the app's statements (they
        // touch only the sync tables); a move record that does not verify stops the batch.
        let moved = self.apply_reserved(txn, &reserved).await?;
        write_position(txn, self.id(), applied.position).await?;
        crate::library::save_clock_floor(txn, self.id(), &self.context.clock).await?;
        // This device's acknowledged changes whose entries this apply has reached.
        crate::tables::acknowledged::Entity::delete_many()
            .filter(crate::tables::acknowledged::Column::LibraryId.eq(self.id().to_string()))
            .filter(
                crate::tables::acknowledged::Column::ThroughSeq.lte(applied.position.seq.0 as i64),
            )
            .exec(txn)
            .await?;
        Ok((applied, learnt || moved.is_some()))
    }

    /// The items of the next response a group takes from `more`, or `None` when the group
    /// is full or `more` has nothing. Empty responses are passed over: the next one starts
    /// where they do.
    fn next_to_build(
        &self,
        taken: &mut usize,
        more: &mut (dyn Iterator<Item = PullResponse> + Send),
    ) -> Result<Option<Vec<PulledItem>>, ApplyError> {
        while *taken < APPLY_GROUP_ENTRIES {
            let Some(response) = more.next() else {
                return Ok(None);
            };
            self.check_response(&response)?;
            if !response.items.is_empty() {
                *taken += response.items.len();
                return Ok(Some(response.items));
            }
        }
        Ok(None)
    }

    /// The builder thread of `apply_group_in`: checks each response it is handed against
    /// the position it must continue and turns it into statements, sent to the writer as
    /// they are built, then reports the response built. Returns what the responses apply
    /// once written.
    fn build_responses(
        &self,
        start: Position,
        mut parking: Parking,
        responses: std::sync::mpsc::Receiver<Batch>,
        backend: sea_orm::DbBackend,
        statements: tokio::sync::mpsc::Sender<crate::registry::Step>,
        built: tokio::sync::mpsc::UnboundedSender<()>,
    ) -> Result<(Applied, Reserved), ApplyError> {
        let mut emit = |statement| statements.blocking_send(statement).is_ok();
        let mut applied = Applied {
            position: start,
            ..Applied::default()
        };
        let mut reserved = Reserved::new();
        let writer_gone = || statements.is_closed();
        while let Ok(batch) = responses.recv() {
            self.prepare_batch(
                &mut applied,
                &mut reserved,
                batch,
                &mut parking,
                backend,
                &mut emit,
                &writer_gone,
            )?;
            if statements.is_closed() || built.send(()).is_err() {
                // The writer has stopped: what is built no longer matters.
                break;
            }
        }
        Ok((applied, reserved))
    }

    /// Absorbs one response's items from `applied.position` (the plan is
    /// `decide::absorb`'s) and turns the plan into statements; `applied` then holds the
    /// position the response reaches.
    #[allow(clippy::too_many_arguments)]
    fn prepare_batch(
        &self,
        applied: &mut Applied,
        reserved: &mut Reserved,
        Batch { items, local }: Batch,
        parking: &mut Parking,
        backend: sea_orm::DbBackend,
        emit: &mut dyn FnMut(crate::registry::Step) -> bool,
        writer_gone: &dyn Fn() -> bool,
    ) -> Result<(), ApplyError> {
        let schema_version = |model: &str| self.registry.get(model).map(|ops| ops.schema_version());
        let is_local = |entry: &crate::LogEntry| {
            !local.is_empty() && local.contains(&(entry.model.clone(), entry.record_id.clone()))
        };
        let mut parks = |entry: &crate::LogEntry| parking.parks(entry);
        let plan = absorb::absorb(
            applied.position,
            &items,
            absorb::Here {
                schema_version: &schema_version,
                is_local: &is_local,
                parks: &mut parks,
            },
        );
        if let Some(hlc) = plan.observed {
            self.context.clock.observe(hlc);
        }
        for (entry, reason) in &plan.parked {
            // Set aside, not applied: the position still moves past it.
            if writer_gone() || !emit(park_statement(backend, self.id(), entry, reason)?.into()) {
                return Err(ApplyError::Interrupted);
            }
        }
        for run in &plan.runs {
            if writer_gone() {
                // The writer has failed (its error is the one reported) or the runtime
                // is shutting down: nothing built now would run.
                return Err(ApplyError::Interrupted);
            }
            self.prepare_run(backend, run, emit)?;
        }
        if let Some(refusal) = plan.refusal {
            return Err(self.refused(refusal));
        }
        // The held log: every entry and skipped run of the response, in the same
        // transaction as the rows and the position (`held.rs`).
        for statement in crate::held::statements(
            backend,
            self.id(),
            applied.position.seq,
            plan.position.seq,
            &items,
        ) {
            if writer_gone() || !emit(statement.into()) {
                return Err(ApplyError::Interrupted);
            }
        }
        reserved.extend(
            plan.reserved
                .iter()
                .map(|(entry, before)| (LogEntry::clone(entry), *before)),
        );
        applied.entries += plan.entries;
        applied.position = plan.position;
        drop(plan);
        // The entries are done with: their names move into the listeners' list.
        applied
            .records
            .extend(items.into_iter().filter_map(|item| match item {
                PulledItem::Entry(entry) => Some((entry.model, entry.record_id)),
                PulledItem::Skipped { .. } => None,
            }));
        Ok(())
    }

    /// Builds the statements of a run of checked entries of one model.
    fn prepare_run(
        &self,
        backend: sea_orm::DbBackend,
        run: &[&crate::LogEntry],
        emit: &mut dyn FnMut(crate::registry::Step) -> bool,
    ) -> Result<(), ApplyError> {
        let model = &run[0].model;
        let Some(ops) = self.registry.get(model) else {
            return Err(ApplyError::UnknownModel {
                seq: run[0].seq,
                model: model.clone(),
            });
        };
        ops.prepare(backend, run, emit)
            .map_err(|(seq, failure)| match failure {
                ApplyFailure::BadPayload(reason) => ApplyError::BadPayload {
                    seq,
                    model: model.clone(),
                    reason,
                },
                ApplyFailure::Db(e) => ApplyError::Db(e),
            })
    }

    /// Sends a pull and refuses an answer from an older epoch than this device knows
    /// ([`PullError::StaleEpoch`]): a replaced leader feeds no one.
    pub(crate) async fn pull_from(
        &self,
        transport: &dyn Transport,
        mut request: PullRequest,
    ) -> Result<PullResponse, PullError> {
        request.device = Some(self.device_id());
        request.serves_at = self.serving_addresses();
        let response = transport.pull(request).await?;
        crate::decide::epoch::check_answer(self.epoch(), response.epoch).map_err(|stale| {
            PullError::StaleEpoch {
                known: stale.known,
                answered: stale.answered,
            }
        })?;
        self.leader_latest_seen
            .fetch_max(response.latest_seq.0, std::sync::atomic::Ordering::Relaxed);
        Ok(response)
    }

    /// Pulls one batch of at most `limit` entries from the leader and applies it. Returns
    /// what was applied and the leader's latest seq.
    #[tracing::instrument(
        name = "pull",
        skip_all,
        fields(library = %self.id(), device = %self.device_id(), after, latest)
    )]
    pub(crate) async fn pull_once(
        &self,
        transport: &dyn Transport,
        limit: u32,
    ) -> Result<(Applied, Seq), SyncError> {
        let position = self.position().await.map_err(ApplyError::from)?;
        let mut request = PullRequest::from_position(self.id(), position).with_epoch(self.epoch());
        request.limit = limit;
        let response = self.pull_from(transport, request).await?;
        let latest = response.latest_seq;
        tracing::Span::current()
            .record("after", position.seq.0)
            .record("latest", latest.0);
        crate::metrics::record_lag(self.id(), position.seq, latest);
        match self.apply(position.seq, response).await {
            Ok(applied) => {
                crate::metrics::record_lag(self.id(), applied.position.seq, latest);
                Ok((applied, latest))
            }
            Err(e) => Err(self.pinpoint(transport, position, limit, e).await.into()),
        }
    }

    /// Pulls and applies until the position reaches the leader's latest seq as of the
    /// first answer. Each batch commits on its own, so an interruption resumes from the
    /// last applied batch, not from zero.
    pub(crate) async fn catch_up(
        &self,
        transport: &dyn Transport,
        limit: u32,
    ) -> Result<Position, SyncError> {
        self.catch_up_with(transport, limit, |_, _| {}).await
    }

    /// `catch_up`, calling `progress(applied, target)` after each transaction.
    ///
    /// Pulling runs ahead of applying (up to [`PULLS_AHEAD`] responses wait), so the
    /// leader's reading and the network overlap the follower's writing; responses that
    /// have arrived when a transaction starts share it (`apply_all`). A failed pull stops
    /// the catch-up once what arrived before it is applied; a failed apply discards what
    /// was pulled after it.
    ///
    /// When this device's database refuses an entry, the error is `ApplyError::Stuck`,
    /// naming it (what applies before it is kept).
    #[tracing::instrument(
        name = "catch_up",
        skip_all,
        fields(library = %self.id(), device = %self.device_id(), after, latest)
    )]
    pub(crate) async fn catch_up_with(
        &self,
        transport: &dyn Transport,
        limit: u32,
        progress: impl FnMut(&Applied, Seq),
    ) -> Result<Position, SyncError> {
        let (position, _) = self.catch_up_to(transport, limit, progress).await?;
        Ok(position)
    }

    /// One sync round, the one place that orders it: this follower's own changes are
    /// pushed first (so that the pull brings back how the leader took them), then it pulls
    /// until caught up. A failed push does not stop the pull (the follower keeps receiving
    /// the library while its changes wait in the outbox); the pull's error is reported
    /// first, then the push's. Returns the position and the leader's latest seq as of
    /// the first answer.
    pub(crate) async fn sync_round(
        &self,
        transport: &dyn Transport,
        limit: u32,
        progress: impl FnMut(&Applied, Seq),
    ) -> Result<(Position, Seq), SyncError> {
        if self.leadership().taking_over {
            // It leads now: take the log over from the old leader (the transport's), then
            // there is nothing to push or pull.
            self.take_over(transport).await?;
            let at = self.position().await.map_err(ApplyError::from)?;
            return Ok((at, at.seq));
        }
        let pushed = if self.is_read_only() {
            Ok(())
        } else {
            self.push_outbox(transport).await.map(|pushed| {
                tracing::debug!(library = %self.id(), ?pushed, "pushed");
            })
        };
        let caught_up = self.catch_up_to(transport, limit, progress).await?;
        pushed?;
        Ok(caught_up)
    }

    /// `catch_up_with`, also returning the leader's latest seq as of the first answer.
    async fn catch_up_to(
        &self,
        transport: &dyn Transport,
        limit: u32,
        progress: impl FnMut(&Applied, Seq),
    ) -> Result<(Position, Seq), SyncError> {
        let caught_up = match self.catch_up_inner(transport, limit, progress).await {
            Err(SyncError::Apply(e @ ApplyError::Db(_))) => {
                let at = self.position().await.map_err(ApplyError::from)?;
                Err(self.pinpoint(transport, at, limit, e).await.into())
            }
            other => other,
        }?;
        if self.leadership().taking_over {
            self.take_over(transport).await?;
        }
        Ok(caught_up)
    }

    /// This device applied the move record that makes it leader: it takes over the log it
    /// must serve from the old leader (every entry, nothing collapsed), then sequences, and
    /// takes its own outbox (its writes made as a follower) as any pushed change.
    pub(crate) async fn take_over(&self, transport: &dyn Transport) -> Result<(), SyncError> {
        let position = self.position().await.map_err(ApplyError::from)?;
        // It holds the log it applied: what its pulls left out (or what it applied before
        // it kept its log) is pulled in full and checked against the chain.
        let filled = self.fill_held_log(transport).await?;
        tracing::debug!(library = %self.id(), filled, "filled the held log");
        let tip = crate::library::committed_tip(&self.db, self.id(), false)
            .await
            .map_err(ApplyError::from)?;
        if tip.seq != position.seq || tip.checksum != position.checksum {
            return Err(ApplyError::Chain(crate::ChainError::Mismatch {
                seq: position.seq,
                expected: position.checksum,
                found: tip.checksum,
            })
            .into());
        }
        crate::library::advance(&self.tip, tip);
        crate::tables::local::Entity::delete_by_id(crate::leadership::taking_over_key(self.id()))
            .exec(&self.db)
            .await
            .map_err(ApplyError::from)?;
        self.refresh_leadership().await.map_err(ApplyError::from)?;
        tracing::info!(library = %self.id(), epoch = %self.epoch(), tip = %tip.seq, "took the log over: this device leads");
        // Writes that chose the outbox before this device sequenced commit before the
        // outbox is read (they hold the gate from that choice to their commit).
        drop(self.sequencing_gate.write().await);
        if !self.is_read_only() {
            let leader = self
                .leader()
                .map_err(|e| ApplyError::Db(DbErr::Custom(e.to_string())))?;
            self.push_outbox(&crate::InProcess::new(leader)).await?;
        }
        Ok(())
    }

    async fn catch_up_inner(
        &self,
        transport: &dyn Transport,
        limit: u32,
        mut progress: impl FnMut(&Applied, Seq),
    ) -> Result<(Position, Seq), SyncError> {
        let request = |after: Position| {
            let mut request = PullRequest::from_position(self.id(), after).with_epoch(self.epoch());
            request.limit = limit;
            request
        };
        let start = self.position().await.map_err(ApplyError::from)?;
        let first = self.pull_from(transport, request(start)).await?;
        self.check_response(&first)?;
        let target = first.latest_seq;
        tracing::Span::current()
            .record("after", start.seq.0)
            .record("latest", target.0);
        crate::metrics::record_lag(self.id(), start.seq, target);
        if first.through(start.seq) == start.seq && target <= start.seq {
            return Ok((start, target));
        }
        let (arrived, mut to_apply) = tokio::sync::mpsc::channel::<PullResponse>(PULLS_AHEAD);
        let pulling = async move {
            let (mut from, mut response) = (start, first);
            let mut stall = follow::Stall::new(start.seq);
            loop {
                let through = response.end(from);
                if through.seq > from.seq
                    && (arrived.send(response).await.is_err() || through.seq >= target)
                {
                    // Done, or the applying side has stopped (its error decides).
                    return Ok(());
                }
                from = through;
                match stall.pulled(through.seq, target) {
                    follow::Next::Done => return Ok(()),
                    follow::Next::Again => {}
                    follow::Next::Stalled => {
                        return Err(SyncError::from(PullError::Stalled {
                            position: from.seq,
                            latest: target,
                        }));
                    }
                }
                response = self.pull_from(transport, request(from)).await?;
                self.check_response(&response)?;
            }
        };
        let applying = async move {
            let mut position = start;
            while let Some(response) = to_apply.recv().await {
                // One transaction: this response and whatever has arrived meanwhile.
                let mut arrived_meanwhile = std::iter::from_fn(|| to_apply.try_recv().ok());
                let applied = self
                    .apply_group(position.seq, response, &mut arrived_meanwhile)
                    .await?;
                progress(&applied, target);
                position = applied.position;
                crate::metrics::record_lag(self.id(), position.seq, target);
                if position.seq >= target {
                    break;
                }
            }
            Ok::<_, ApplyError>(position)
        };
        let mut pulling = std::pin::pin!(pulling);
        let mut applying = std::pin::pin!(applying);
        let position = tokio::select! {
            // A failed apply ends the catch-up at once, dropping a pull in flight.
            applied = &mut applying => {
                let position = applied?;
                if position.seq < target {
                    // The puller has stopped early: its error says why.
                    pulling.await?;
                }
                position
            }
            pulled = &mut pulling => {
                // What arrived before the puller stopped is applied first.
                let position = applying.await?;
                pulled?;
                position
            }
        };
        if position.seq < target {
            return Err(PullError::Stalled {
                position: position.seq,
                latest: target,
            }
            .into());
        }
        Ok((position, target))
    }
}

/// Everything a join stores, in the caller's transaction; upserts, so that a join
/// interrupted by an older build can be made again.
async fn store_joined(
    txn: &sea_orm::DatabaseTransaction,
    library_id: LibraryId,
    name: &str,
    leader: DeviceId,
    this_device: DeviceId,
    access: Access,
    settings: &[(&str, &str)],
) -> Result<(), OpenError> {
    use sea_orm::sea_query::OnConflict;
    let existing = library::Entity::find_by_id(library_id.to_string())
        .one(txn)
        .await?;
    if existing.is_some_and(|row| row.leader_device_id == this_device.to_string()) {
        return Err(OpenError::LeadsLibrary(library_id));
    }
    let now_ms = chrono::Utc::now().timestamp_millis();
    library::Entity::insert(library::ActiveModel {
        id: Set(library_id.to_string()),
        name: Set(name.to_owned()),
        leader_device_id: Set(leader.to_string()),
        created_at_ms: Set(now_ms),
        // Not heard yet: the first answer of the pinned leader states it.
        epoch: Set(crate::Epoch::UNSTATED.0 as i64),
        epoch_start_seq: Set(0),
    })
    .on_conflict(
        OnConflict::column(library::Column::Id)
            .update_columns([library::Column::Name, library::Column::LeaderDeviceId])
            .to_owned(),
    )
    .exec_without_returning(txn)
    .await?;
    device::Entity::insert(device::ActiveModel {
        library_id: Set(library_id.to_string()),
        device_id: Set(this_device.to_string()),
        access: Set(access.as_str().to_owned()),
        name: Set(None),
        added_at_ms: Set(now_ms),
        revoked_at_ms: Set(None),
        key: Set(None),
        addresses: Set(None),
    })
    .on_conflict(
        OnConflict::columns([device::Column::LibraryId, device::Column::DeviceId])
            .update_columns([device::Column::Access, device::Column::RevokedAtMs])
            .to_owned(),
    )
    .exec_without_returning(txn)
    .await?;
    set_local_value(txn, LOCAL_DEFAULT_LIBRARY, &library_id.to_string()).await?;
    for (key, value) in settings {
        set_local_value(txn, &local_setting_key(library_id, key), value).await?;
    }
    Ok(())
}

async fn read_position<C: sea_orm::ConnectionTrait>(
    db: &C,
    library_id: LibraryId,
) -> Result<Position, DbErr> {
    Ok(position::Entity::find_by_id(library_id.to_string())
        .one(db)
        .await?
        .map(|p| Position {
            seq: Seq(p.seq as u64),
            checksum: p.checksum as u64,
        })
        .unwrap_or_default())
}

pub(crate) async fn write_position(
    txn: &sea_orm::DatabaseTransaction,
    library_id: LibraryId,
    at: Position,
) -> Result<(), DbErr> {
    use sea_orm::sea_query::OnConflict;
    let row = position::ActiveModel {
        library_id: Set(library_id.to_string()),
        seq: Set(at.seq.0 as i64),
        checksum: Set(at.checksum as i64),
        updated_at_ms: Set(chrono::Utc::now().timestamp_millis()),
    };
    position::Entity::insert(row)
        .on_conflict(
            OnConflict::column(position::Column::LibraryId)
                .update_columns([
                    position::Column::Seq,
                    position::Column::Checksum,
                    position::Column::UpdatedAtMs,
                ])
                .to_owned(),
        )
        .exec_without_returning(txn)
        .await
        .map(|_| ())
}
