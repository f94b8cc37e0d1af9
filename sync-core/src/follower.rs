//! The follower's side: apply pulled entries exactly once, with the position in the same
//! transaction.

use sea_orm::ActiveValue::Set;
use sea_orm::{ConnectionTrait, DatabaseConnection, DbErr, EntityTrait};
use serde::Serialize;

use crate::entry::ChainError;
use crate::error::OpenError;
use crate::library::{add_library, ensure_device_id};
use crate::protocol::{
    PROTOCOL_VERSION, PullError, PullRequest, PullResponse, PulledItem, Transport,
};
use crate::registry::ApplyFailure;
use crate::tables::position;
use crate::{Access, DeviceId, Library, LibraryId, Registry, Role, Seq};

/// Where a follower stands in a library's log.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Serialize)]
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

/// Statements built ahead of the one executing: bounds what a batch holds twice.
const STATEMENTS_AHEAD: usize = 4;

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
    pub async fn join(
        db: DatabaseConnection,
        library_id: LibraryId,
        leader: DeviceId,
        name: &str,
        access: Access,
        registry: Registry,
    ) -> Result<Library, OpenError> {
        let device_id = ensure_device_id(&db).await?;
        add_library(&db, library_id, name, leader, device_id, access.as_str()).await?;
        Library::open(db, library_id, registry).await
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
    pub async fn apply(&self, after: Seq, response: PullResponse) -> Result<Applied, ApplyError> {
        if response.protocol_version != PROTOCOL_VERSION {
            return Err(ApplyError::VersionMismatch {
                ours: PROTOCOL_VERSION,
                theirs: response.protocol_version,
            });
        }
        if response.library_id != self.id() {
            return Err(ApplyError::WrongLibrary {
                expected: self.id(),
                found: response.library_id,
            });
        }
        if response.items.is_empty() {
            return Ok(Applied {
                position: self.position().await?,
                ..Applied::default()
            });
        }
        let this = self.clone();
        let items = response.items;
        self.unrecorded(move |txn| {
            Box::pin(async move {
                let start = read_position(txn, this.id()).await?;
                if start.seq != after {
                    return Err(ApplyError::PositionMoved {
                        expected: after,
                        found: start.seq,
                    });
                }
                let backend = txn.get_database_backend();
                let (statements, mut ready) = tokio::sync::mpsc::channel(STATEMENTS_AHEAD);
                let preparing = tokio::task::spawn_blocking({
                    let this = this.clone();
                    move || this.prepare_batch(start, &items, backend, statements)
                });
                let mut written = Ok(());
                while let Some(statement) = ready.recv().await {
                    if let Err(e) = txn.execute_raw(statement).await {
                        written = Err(e);
                        break;
                    }
                }
                // A preparer still running stops at its next statement.
                drop(ready);
                let prepared = match preparing.await {
                    Ok(prepared) => prepared,
                    Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                    Err(_) => return Err(ApplyError::Interrupted),
                };
                // Statements run in entry order: a failed one comes before any entry the
                // preparer could refuse after it.
                written?;
                let applied = prepared?;
                write_position(txn, this.id(), applied.position).await?;
                crate::library::save_clock_floor(txn, this.id(), &this.context.clock).await?;
                Ok(applied)
            })
        })
        .await
    }

    /// Checks a batch against the position it must continue and turns it into statements,
    /// sent to the writer as they are built. Returns what the batch applies once written.
    fn prepare_batch(
        &self,
        start: Position,
        items: &[PulledItem],
        backend: sea_orm::DbBackend,
        statements: tokio::sync::mpsc::Sender<sea_orm::Statement>,
    ) -> Result<Applied, ApplyError> {
        let mut emit = |statement| statements.blocking_send(statement).is_ok();
        let mut expected = start.seq.next();
        let mut checksum = start.checksum;
        let mut applied = Applied::default();
        let mut run: Vec<&crate::LogEntry> = Vec::new();
        for item in items {
            match item {
                PulledItem::Skipped {
                    through,
                    checksum: at,
                } => {
                    if *through < expected {
                        return Err(ChainError::Gap {
                            expected,
                            found: *through,
                        }
                        .into());
                    }
                    checksum = *at;
                    expected = through.next();
                }
                PulledItem::Entry(entry) => {
                    crate::verify_chain(
                        Seq(expected.0 - 1),
                        checksum,
                        std::slice::from_ref(entry),
                    )?;
                    self.check_entry(entry)?;
                    self.context.clock.observe(entry.hlc);
                    checksum = entry.checksum;
                    expected = expected.next();
                    applied.entries += 1;
                    applied
                        .records
                        .push((entry.model.clone(), entry.record_id.clone()));
                    if run.first().is_some_and(|first| first.model != entry.model) {
                        self.prepare_run(backend, &run, &mut emit)?;
                        run.clear();
                    }
                    run.push(entry);
                }
            }
        }
        if !run.is_empty() {
            self.prepare_run(backend, &run, &mut emit)?;
        }
        applied.position = Position {
            seq: Seq(expected.0 - 1),
            checksum,
        };
        Ok(applied)
    }

    /// Refuses an entry this build cannot apply: an unknown model or another schema version.
    fn check_entry(&self, entry: &crate::LogEntry) -> Result<(), ApplyError> {
        let Some(ops) = self.registry.get(&entry.model) else {
            return Err(ApplyError::UnknownModel {
                seq: entry.seq,
                model: entry.model.clone(),
            });
        };
        if ops.schema_version() != entry.schema_version {
            return Err(ApplyError::SchemaMismatch {
                seq: entry.seq,
                model: entry.model.clone(),
                ours: ops.schema_version(),
                theirs: entry.schema_version,
            });
        }
        Ok(())
    }

    /// Builds the statements of a run of checked entries of one model.
    fn prepare_run(
        &self,
        backend: sea_orm::DbBackend,
        run: &[&crate::LogEntry],
        emit: &mut dyn FnMut(sea_orm::Statement) -> bool,
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

    /// Pulls one batch of at most `limit` entries from the leader and applies it. Returns
    /// what was applied and the leader's latest seq.
    pub async fn pull_once(
        &self,
        transport: &dyn Transport,
        limit: u32,
    ) -> Result<(Applied, Seq), SyncError> {
        if self.role() != Role::Follower {
            return Err(PullError::NotFollower(self.id()).into());
        }
        let after = self.position().await.map_err(ApplyError::from)?.seq;
        let mut request = PullRequest::after(self.id(), after);
        request.limit = limit;
        let response = transport.pull(request).await?;
        let latest = response.latest_seq;
        let applied = self.apply(after, response).await?;
        Ok((applied, latest))
    }

    /// Pulls and applies until the position reaches the leader's latest seq as of the
    /// first answer. Each batch commits on its own, so an interruption resumes from the
    /// last applied batch, not from zero.
    pub async fn catch_up(
        &self,
        transport: &dyn Transport,
        limit: u32,
    ) -> Result<Position, SyncError> {
        self.catch_up_with(transport, limit, |_, _| {}).await
    }

    /// `catch_up`, calling `progress(applied, target)` after each batch.
    ///
    /// The next batch is requested while the current one is applied (its start is known:
    /// where the current one ends), so the leader's reading and the network overlap the
    /// follower's writing. A batch that fails to apply discards the prefetched one.
    pub async fn catch_up_with(
        &self,
        transport: &dyn Transport,
        limit: u32,
        mut progress: impl FnMut(&Applied, Seq),
    ) -> Result<Position, SyncError> {
        if self.role() != Role::Follower {
            return Err(PullError::NotFollower(self.id()).into());
        }
        let request = |after: Seq| {
            let mut request = PullRequest::after(self.id(), after);
            request.limit = limit;
            request
        };
        let mut after = self.position().await.map_err(ApplyError::from)?.seq;
        let mut response = transport.pull(request(after)).await?;
        let target = response.latest_seq;
        let mut stalled = false;
        loop {
            let through = response.through(after);
            let (applied, next) = if through < target && through > after {
                let (applied, next) = tokio::join!(
                    self.apply(after, response),
                    transport.pull(request(through))
                );
                (applied?, Some(next))
            } else {
                (self.apply(after, response).await?, None)
            };
            progress(&applied, target);
            let position = applied.position;
            if position.seq >= target {
                return Ok(position);
            }
            after = position.seq;
            response = match next {
                Some(next) => next?,
                // Nothing new although the leader claims more: an entry may not be
                // visible to its reader yet (MySQL), so ask once more. A leader that
                // answers twice with nothing would otherwise keep this loop spinning.
                None if !stalled => {
                    stalled = true;
                    transport.pull(request(after)).await?
                }
                None => {
                    return Err(PullError::Stalled {
                        position: position.seq,
                        latest: target,
                    }
                    .into());
                }
            };
            if response.through(after) > after {
                stalled = false;
            }
        }
    }
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

async fn write_position(
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
