//! Change capture: the `ActiveModelBehavior` hooks and the per-transaction buffer they fill.
//!
//! `Library::transaction` opens a transaction and runs the app's closure inside a capture
//! scope (a tokio task-local). The hooks of synced models note each write in the scope's
//! buffer; when the closure succeeds, `Library::append` turns the buffer into log entries
//! (numbered, or pending for the sequencer on PostgreSQL) in the same transaction, right
//! before it commits. A closure that fails rolls back, and its
//! buffer is dropped with it: a rolled-back write leaves no entry.
//!
//! The connection handle's `SyncTransaction` owns a scope the same way, found by asking
//! the connection (`connection::probe`); a lone write on a `SyncConnection` is armed here
//! and recorded by the handle with its statement (see `connection.rs`).
//!
//! A write to a synced model outside such a scope, or through a connection other than the
//! transaction the scope belongs to, is refused by `before_save`/`before_delete` before it
//! reaches the database. That is the rule that keeps writes from escaping the log.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use sea_orm::{ConnectionTrait, DatabaseTransaction, DbErr, QuerySelect};

use crate::entry::ChangeOp;
use crate::protocol::RECORD_BYTES_MAX;
use crate::{DeviceId, Hlc, HlcClock, LibraryId, Syncable};

tokio::task_local! {
    static SCOPE: Arc<CaptureScope>;
}

/// What every write in one library shares: who writes, and the clock.
#[derive(Debug)]
pub(crate) struct CaptureContext {
    pub(crate) library_id: LibraryId,
    pub(crate) device_id: DeviceId,
    pub(crate) clock: Arc<HlcClock>,
    /// A follower with read access: its synced writes are refused before they happen.
    pub(crate) read_only: bool,
    /// The library's models: the hooks translate references to models with a sync key.
    pub(crate) registry: Arc<crate::registry::Registry>,
}

/// The capture state of one `Library::transaction` call.
pub(crate) struct CaptureScope {
    pub(crate) context: Arc<CaptureContext>,
    /// Address of the transaction the scope belongs to; hooks compare the connection they
    /// are handed against it.
    txn_address: usize,
    /// False inside `Library::unrecorded`.
    pub(crate) recording: bool,
    buffer: Mutex<Buffer>,
    /// The synced table a hook armed for its own next write statement: the guard of a
    /// `SyncTransaction` lets that one statement through (see `connection.rs`).
    armed: Mutex<Option<&'static str>>,
}

#[derive(Default)]
struct Buffer {
    /// Saves whose `before_save` ran but whose `after_save` has not (yet): the changed
    /// fields wait here for the model. Left over at flush, they were
    /// `update_without_returning` calls, and the row is read back.
    pending_saves: HashMap<(&'static str, String), PendingSave>,
    /// Deletes whose `before_delete` found the row; `after_delete` records only these.
    pending_deletes: HashMap<(&'static str, String), PendingDelete>,
    changes: Vec<CapturedChange>,
}

/// A delete whose row `before_delete` found.
struct PendingDelete {
    /// Whether the row synced (its filter let it): only then is its delete recorded.
    syncs: bool,
    /// What the database's cascades will do to other synced rows (`cascade::on_delete`),
    /// recorded before the delete itself.
    cascade: Vec<CapturedChange>,
}

struct PendingSave {
    changed: Vec<&'static str>,
    schema_version: u32,
    reload: ReloadFn,
}

pub(crate) type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;
pub(crate) type ReloadFn = for<'a> fn(
    &'a DatabaseTransaction,
    &'a CaptureContext,
    &'a str,
) -> BoxFuture<'a, Result<Option<String>, DbErr>>;

/// A change noted by the hooks, not yet sequenced.
#[derive(Debug, Clone)]
pub(crate) struct CapturedChange {
    pub(crate) model: &'static str,
    pub(crate) record_id: String,
    pub(crate) op: ChangeOp,
    pub(crate) data: Option<String>,
    pub(crate) changed: Vec<&'static str>,
    pub(crate) hlc: Hlc,
    pub(crate) schema_version: u32,
    /// The device that made the change, when not this one (a follower's pushed change,
    /// sequenced by the leader).
    pub(crate) author: Option<DeviceId>,
}

impl CapturedChange {
    /// A delete of `record_id`, made at `hlc`.
    pub(crate) fn delete(
        model: &'static str,
        record_id: String,
        hlc: Hlc,
        schema_version: u32,
        author: Option<DeviceId>,
    ) -> CapturedChange {
        CapturedChange {
            model,
            record_id,
            op: ChangeOp::Delete,
            data: None,
            changed: Vec::new(),
            hlc,
            schema_version,
            author,
        }
    }
}

impl CaptureScope {
    pub(crate) fn new(
        context: Arc<CaptureContext>,
        txn: &DatabaseTransaction,
        recording: bool,
    ) -> Arc<Self> {
        Arc::new(CaptureScope {
            context,
            txn_address: address_of(txn),
            recording,
            buffer: Mutex::new(Buffer::default()),
            armed: Mutex::new(None),
        })
    }

    /// Lets the next write statement on `table` through the guard (a hook is writing).
    pub(crate) fn arm(&self, table: &'static str) {
        *self.armed.lock().unwrap_or_else(|p| p.into_inner()) = Some(table);
    }

    /// Forgets an armed write that did not happen (the hook's write ended).
    pub(crate) fn disarm(&self) {
        *self.armed.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Takes the armed write if it is for `table`: true when a hook armed this statement.
    pub(crate) fn take_armed(&self, table: &str) -> bool {
        let mut armed = self.armed.lock().unwrap_or_else(|p| p.into_inner());
        if armed.is_some_and(|t| t == table) {
            *armed = None;
            true
        } else {
            false
        }
    }

    /// Adds a change to the buffer (the sync-aware bulk writes record here).
    pub(crate) fn push(&self, change: CapturedChange) {
        self.buffer().changes.push(change);
    }

    /// The number of changes recorded so far: a savepoint's mark.
    pub(crate) fn mark(&self) -> usize {
        self.buffer().changes.len()
    }

    /// Forgets the changes after `mark` (their savepoint was rolled back). Pending saves
    /// stay: one from before the savepoint (`update_without_returning`) must still be read
    /// back at drain, and one from inside it reads back the rolled-back row's state as it
    /// is now, or nothing if it is gone — over-reporting, never losing.
    pub(crate) fn truncate(&self, mark: usize) {
        self.buffer().changes.truncate(mark);
        self.disarm();
    }

    /// Runs `fut` with this scope installed for the hooks.
    pub(crate) async fn run<F: Future>(self: &Arc<Self>, fut: F) -> F::Output {
        SCOPE.scope(Arc::clone(self), fut).await
    }

    fn buffer(&self) -> std::sync::MutexGuard<'_, Buffer> {
        // A panic while holding the lock cannot leave the buffer half-updated in a way that
        // matters: the transaction it belongs to is rolled back by the panic anyway.
        self.buffer
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Turns the buffer into the transaction's changes, in write order. Saves whose
    /// `after_save` never ran are read back from the transaction.
    pub(crate) async fn drain(
        &self,
        txn: &DatabaseTransaction,
    ) -> Result<Vec<CapturedChange>, DbErr> {
        let (mut changes, leftovers) = {
            let mut buffer = self.buffer();
            let leftovers: Vec<_> = buffer.pending_saves.drain().collect();
            buffer.pending_deletes.clear();
            (std::mem::take(&mut buffer.changes), leftovers)
        };
        for ((model, record_id), pending) in leftovers {
            if pending.changed.is_empty() {
                continue;
            }
            if let Some(data) = (pending.reload)(txn, &self.context, &record_id).await? {
                changes.push(CapturedChange {
                    model,
                    record_id,
                    op: ChangeOp::Upsert,
                    data: Some(data),
                    changed: pending.changed,
                    hlc: self.context.clock.now(),
                    schema_version: pending.schema_version,
                    author: None,
                });
            }
        }
        Ok(changes)
    }
}

fn address_of<T>(value: &T) -> usize {
    value as *const T as *const () as usize
}

/// Why a hook refused a write. Hooks must return `DbErr`, so these travel as
/// `DbErr::Custom` with a message that says what to do.
fn refuse(message: String) -> DbErr {
    DbErr::Custom(message)
}

/// Where a hook's write goes: into a capture scope's transaction, or (a lone write on a
/// `SyncConnection`) into a transaction of its own that the handle opens for the statement.
pub(crate) enum Target {
    Scope(Arc<CaptureScope>),
    Lone(Arc<crate::connection::Shared>),
}

/// The scope a hook of model `E` runs in, checked against the connection it was handed.
///
/// A `Library::transaction` scope is found by the task-local and the transaction's address.
/// Otherwise the connection is asked (`connection::probe`): a `SyncTransaction` answers
/// with its scope, a `SyncConnection` with itself, and any other connection is refused.
async fn target_for<E: Syncable, C: ConnectionTrait>(db: &C) -> Result<Target, DbErr> {
    let task_scope = SCOPE.try_with(Arc::clone).ok();
    let target = match task_scope {
        Some(scope) if address_of(db) == scope.txn_address => Target::Scope(scope),
        task_scope => match crate::connection::probe(db).await {
            Some(target) => target,
            None if task_scope.is_some() => {
                return Err(refuse(format!(
                    "write to synced model `{}` through a connection other than the \
                     transaction that `Library::transaction` handed out: pass that \
                     transaction to the write (other connections would commit the change \
                     apart from its log entry)",
                    E::SYNC_ID
                )));
            }
            None => {
                return Err(refuse(format!(
                    "write to synced model `{}` outside a sync transaction: write through \
                     the library's connection handle (`Library::connection`) or inside \
                     `Library::transaction` (or `Library::unrecorded` for local-only \
                     maintenance) so that the change and its log entry commit together",
                    E::SYNC_ID
                )));
            }
        },
    };
    let (recording, context) = match &target {
        Target::Scope(scope) => (scope.recording, &scope.context),
        Target::Lone(shared) => (true, &shared.library.context),
    };
    if recording && context.read_only {
        return Err(crate::error::read_only(context.library_id, E::SYNC_ID));
    }
    Ok(target)
}

/// The scope of a `Library::transaction` a hook runs in (the internal paths), checked
/// against the connection it was handed.
async fn scope_for<E: Syncable, C: ConnectionTrait>(db: &C) -> Result<Arc<CaptureScope>, DbErr> {
    match target_for::<E, C>(db).await? {
        Target::Scope(scope) => Ok(scope),
        Target::Lone(_) => Err(refuse(format!(
            "internal: `{}` recorded outside a sync transaction",
            E::SYNC_ID
        ))),
    }
}

/// Adds a change to the current recorded scope's buffer: how the leader logs what it takes
/// from a push, in the push's transaction.
pub(crate) fn record(change: CapturedChange) -> Result<(), DbErr> {
    let scope = SCOPE.try_with(Arc::clone).map_err(|_| {
        DbErr::Custom("internal: a pushed change was taken outside a sync transaction".into())
    })?;
    scope.buffer().changes.push(change);
    Ok(())
}

/// Marks the current recorded scope's buffer, for `rollback_to` after a savepoint of the
/// transaction is rolled back.
pub(crate) fn savepoint() -> Result<usize, DbErr> {
    let scope = SCOPE.try_with(Arc::clone).map_err(|_| {
        DbErr::Custom("internal: a savepoint was taken outside a sync transaction".into())
    })?;
    let len = scope.buffer().changes.len();
    Ok(len)
}

/// Forgets what the current scope recorded after `mark` (the writes were rolled back to a
/// savepoint): a rolled-back write leaves no entry.
pub(crate) fn rollback_to(mark: usize) -> Result<(), DbErr> {
    let scope = SCOPE.try_with(Arc::clone).map_err(|_| {
        DbErr::Custom("internal: a savepoint was rolled back outside a sync transaction".into())
    })?;
    let mut buffer = scope.buffer();
    buffer.changes.truncate(mark);
    // Saves and deletes under way at the savepoint's rollback never finished.
    buffer.pending_saves.clear();
    buffer.pending_deletes.clear();
    Ok(())
}

/// The table of model `E`, as its statements name it.
pub(crate) fn table_of<E: Syncable>() -> &'static str {
    sea_orm::EntityName::table_name(&E::default())
}

/// The record's synced fields as canonical JSON text, references to models with a sync
/// key translated to that key (read in `db`, the write's transaction).
pub(crate) fn synced_json<'a, E: Syncable, C: ConnectionTrait>(
    model: &E::Model,
    db: &'a C,
    context: &'a CaptureContext,
) -> impl Future<Output = Result<String, DbErr>> + Send + 'a {
    // Read the model before the first await: the future must not hold it (not `Sync`).
    let map = crate::canonical::sync_json::<E>(model).map_err(|e| {
        DbErr::Json(format!(
            "cannot serialise synced fields of `{}`: {e}",
            E::SYNC_ID
        ))
    });
    let record = E::record_key(model);
    synced_text::<E, C>(map, record, db, context)
}

async fn synced_text<E: Syncable, C: ConnectionTrait>(
    map: Result<serde_json::Map<String, serde_json::Value>, DbErr>,
    record: String,
    db: &C,
    context: &CaptureContext,
) -> Result<String, DbErr> {
    let mut map = map?;
    let refs = context.registry.references(E::SYNC_ID);
    if !refs.is_empty() {
        crate::registry::references_out(db, refs, &mut map, &mut HashMap::new()).await?;
    }
    // serde_json's default map is ordered by key, so this text is canonical.
    let text = serde_json::to_string(&map).map_err(|e| {
        DbErr::Json(format!(
            "cannot serialise synced fields of `{}`: {e}",
            E::SYNC_ID
        ))
    })?;
    if text.len() > RECORD_BYTES_MAX {
        return Err(refuse(format!(
            "record `{}` of synced model `{}` holds {} bytes of synced data; a record may \
             hold at most {RECORD_BYTES_MAX} (`sync_core::RECORD_BYTES_MAX`) so that every \
             device can receive it: keep large content out of synced fields (a \
             `#[sync(local)]` field, or a file the record names)",
            record,
            E::SYNC_ID,
            text.len()
        )));
    }
    Ok(text)
}

/// Refuses, before they reach the database, values of synced fields that some backend a
/// library may run on cannot store, where the model says enough to know: text with a NUL
/// character (PostgreSQL refuses it in `text` and `jsonb`), and text longer than the
/// column's declared length (`String(StringLen::N(n))`, `Char(Some(n))`), which
/// PostgreSQL and MySQL refuse and SQLite stores. Caught here, the writer learns it at
/// once; caught on another device, the change would have to be set aside there.
pub(crate) fn check_values<E: Syncable>(active: &E::ActiveModel) -> Result<(), DbErr> {
    use sea_orm::sea_query::StringLen;
    use sea_orm::{ActiveModelTrait, ActiveValue, ColumnTrait, ColumnType, Iterable, Value};
    // What the values set now add up to: a record over the limit is refused before the
    // database sees it (after the write, `synced_json` checks the whole record).
    let mut bytes = 0usize;
    let too_large = |bytes: usize| {
        refuse(format!(
            "a write of synced model `{}` sets {bytes} bytes of synced data; a record may \
             hold at most {RECORD_BYTES_MAX} (`sync_core::RECORD_BYTES_MAX`) so that every \
             device can receive it: keep large content out of synced fields (a \
             `#[sync(local)]` field, or a file the record names)",
            E::SYNC_ID
        ))
    };
    for column in E::Column::iter() {
        let name = sea_orm::IdenStatic::as_str(&column);
        let Some(field) = E::FIELDS.iter().find(|f| f.column == name) else {
            continue;
        };
        if !field.synced {
            continue;
        }
        let ActiveValue::Set(value) = active.get(column) else {
            continue;
        };
        let text = match &value {
            Value::String(Some(text)) => text.as_str(),
            Value::Bytes(Some(blob)) => {
                bytes += blob.len();
                if bytes > RECORD_BYTES_MAX {
                    return Err(too_large(bytes));
                }
                continue;
            }
            Value::Json(Some(json)) => {
                let json = json.to_string();
                bytes += json.len();
                if bytes > RECORD_BYTES_MAX {
                    return Err(too_large(bytes));
                }
                if json.contains("\\u0000") {
                    return Err(refuse(format!(
                        "field `{}` of synced model `{}` holds a NUL character (\\u0000) in \
                         JSON, which PostgreSQL cannot store: remove it before saving",
                        field.name,
                        E::SYNC_ID
                    )));
                }
                continue;
            }
            _ => continue,
        };
        bytes += text.len();
        if bytes > RECORD_BYTES_MAX {
            return Err(too_large(bytes));
        }
        if text.contains('\0') {
            return Err(refuse(format!(
                "field `{}` of synced model `{}` holds a NUL character, which PostgreSQL \
                 cannot store in text: remove it before saving (store binary data in a \
                 `Vec<u8>` field)",
                field.name,
                E::SYNC_ID
            )));
        }
        let limit = match column.def().get_column_type() {
            ColumnType::String(StringLen::N(n)) => Some(*n as usize),
            ColumnType::Char(Some(n)) => Some(*n as usize),
            _ => None,
        };
        if let Some(limit) = limit {
            let length = text.chars().count();
            if length > limit {
                return Err(refuse(format!(
                    "field `{}` of synced model `{}` is {length} characters long; its column \
                     holds at most {limit}: shorten the value (PostgreSQL and MySQL refuse \
                     it, so other devices could not store it)",
                    field.name,
                    E::SYNC_ID
                )));
            }
        }
    }
    Ok(())
}

pub(crate) fn reload<'a, E: Syncable>(
    txn: &'a DatabaseTransaction,
    context: &'a CaptureContext,
    key: &'a str,
) -> BoxFuture<'a, Result<Option<String>, DbErr>> {
    Box::pin(async move {
        let Some(query) = crate::syncable::find_by_key::<E>(key) else {
            return Ok(None);
        };
        match query.one(txn).await? {
            Some(model) if E::should_sync(&model) => {
                Ok(Some(synced_json::<E, _>(&model, txn, context).await?))
            }
            _ => Ok(None),
        }
    })
}

/// The `before_save` hook of a synced model. `#[derive(Syncable)]` calls it; an app with
/// its own `ActiveModelBehavior` (`#[sync(custom_behavior)]`) calls it from its hook.
pub async fn before_save<E, C>(
    mut active: E::ActiveModel,
    db: &C,
    insert: bool,
) -> Result<E::ActiveModel, DbErr>
where
    E: Syncable,
    C: ConnectionTrait,
{
    if !E::ENABLED {
        return Ok(active);
    }
    let target = target_for::<E, C>(db).await?;
    if insert {
        E::fill_key(&mut active);
    }
    let recording = match &target {
        Target::Scope(scope) => scope.recording,
        Target::Lone(_) => true,
    };
    if !recording {
        return Ok(active);
    }
    crate::canonical::canonicalise_active::<E>(&mut active).map_err(refuse)?;
    check_values::<E>(&active)?;
    let Some(key) = E::active_key(&active) else {
        return Err(refuse(format!(
            "synced model `{}` written without a value for its key `{}`: set it before saving",
            E::SYNC_ID,
            E::KEY_FIELD
        )));
    };
    let changed = if insert {
        E::synced_fields()
    } else {
        E::set_fields(&active)
    };
    let scope = match target {
        Target::Scope(scope) => scope,
        Target::Lone(shared) => {
            shared.arm_lone(crate::connection::LoneWrite {
                table: table_of::<E>(),
                model: E::SYNC_ID,
                key,
                changed,
                schema_version: E::SCHEMA_VERSION,
                reload: reload::<E>,
                kind: if insert {
                    crate::connection::LoneKind::Insert
                } else {
                    crate::connection::LoneKind::Update
                },
            });
            return Ok(active);
        }
    };
    scope.arm(table_of::<E>());
    scope.buffer().pending_saves.insert(
        (E::SYNC_ID, key),
        PendingSave {
            changed,
            schema_version: E::SCHEMA_VERSION,
            reload: reload::<E>,
        },
    );
    Ok(active)
}

/// The `after_save` hook of a synced model: records an upsert with the stored model.
pub async fn after_save<E, C>(model: E::Model, db: &C, insert: bool) -> Result<E::Model, DbErr>
where
    E: Syncable,
    C: ConnectionTrait,
{
    if !E::ENABLED {
        return Ok(model);
    }
    let scope = match target_for::<E, C>(db).await? {
        Target::Scope(scope) => scope,
        // The handle recorded the lone write with its statement.
        Target::Lone(shared) => {
            shared.disarm_lone();
            return Ok(model);
        }
    };
    scope.disarm();
    if !scope.recording {
        return Ok(model);
    }
    let key = E::record_key(&model);
    let pending = scope
        .buffer()
        .pending_saves
        .remove(&(E::SYNC_ID, key.clone()));
    if !E::should_sync(&model) {
        if !insert {
            // The filter turned false (or was false already): to the other devices the
            // record is gone, here it stays, local. (A record filtered all along is
            // "deleted" again: the leader logs nothing for a pushed delete of a record it
            // does not have, and followers delete nothing.)
            let hlc = scope.context.clock.now();
            scope.buffer().changes.push(CapturedChange::delete(
                E::SYNC_ID,
                key,
                hlc,
                E::SCHEMA_VERSION,
                None,
            ));
        }
        return Ok(model);
    }
    // Without a pending entry (a hook called by hand, out of order) claim every synced
    // field changed: over-reporting only makes a field-level merge take values that are
    // current anyway; under-reporting would lose edits.
    let changed = match pending {
        Some(p) if !insert => p.changed,
        _ => E::synced_fields(),
    };
    if changed.is_empty() {
        // An update of local fields only: nothing for other devices to learn.
        return Ok(model);
    }
    let change = CapturedChange {
        model: E::SYNC_ID,
        record_id: key,
        op: ChangeOp::Upsert,
        data: Some(synced_json::<E, C>(&model, db, &scope.context).await?),
        changed,
        hlc: scope.context.clock.now(),
        schema_version: E::SCHEMA_VERSION,
        author: None,
    };
    scope.buffer().changes.push(change);
    Ok(model)
}

/// The `before_delete` hook of a synced model: notes the delete if the row exists, so that
/// `after_delete` (which SeaORM runs even when nothing was deleted) records no phantom.
pub async fn before_delete<E, C>(active: E::ActiveModel, db: &C) -> Result<E::ActiveModel, DbErr>
where
    E: Syncable,
    C: ConnectionTrait,
{
    if !E::ENABLED {
        return Ok(active);
    }
    let scope = match target_for::<E, C>(db).await? {
        Target::Scope(scope) => scope,
        Target::Lone(shared) => {
            if let Some(key) = E::active_key(&active) {
                shared.arm_lone(crate::connection::LoneWrite {
                    table: table_of::<E>(),
                    model: E::SYNC_ID,
                    key,
                    changed: Vec::new(),
                    schema_version: E::SCHEMA_VERSION,
                    reload: reload::<E>,
                    kind: crate::connection::LoneKind::Delete,
                });
            }
            return Ok(active);
        }
    };
    if !scope.recording {
        return Ok(active);
    }
    scope.arm(table_of::<E>());
    let Some(key) = E::active_key(&active) else {
        return Ok(active);
    };
    let Some(query) = crate::syncable::find_by_key::<E>(&key) else {
        return Ok(active);
    };
    // The row lock (PostgreSQL, MySQL; SQLite has one writer anyway) makes a concurrent
    // delete of the same row wait, then find nothing: one delete entry, not two.
    let syncs = match query.lock_exclusive().one(db).await? {
        Some(model) => E::should_sync(&model),
        None => return Ok(active),
    };
    let cascade =
        crate::cascade::on_delete(db, &scope.context, E::SYNC_ID, vec![key.clone()]).await?;
    scope
        .buffer()
        .pending_deletes
        .insert((E::SYNC_ID, key), PendingDelete { syncs, cascade });
    Ok(active)
}

/// The `after_delete` hook of a synced model: records the delete noted by `before_delete`.
pub async fn after_delete<E, C>(active: E::ActiveModel, db: &C) -> Result<E::ActiveModel, DbErr>
where
    E: Syncable,
    C: ConnectionTrait,
{
    if !E::ENABLED {
        return Ok(active);
    }
    let scope = match target_for::<E, C>(db).await? {
        Target::Scope(scope) => scope,
        Target::Lone(shared) => {
            shared.disarm_lone();
            return Ok(active);
        }
    };
    scope.disarm();
    if !scope.recording {
        return Ok(active);
    }
    let Some(key) = E::active_key(&active) else {
        return Ok(active);
    };
    let pending = {
        let mut buffer = scope.buffer();
        buffer.pending_saves.remove(&(E::SYNC_ID, key.clone()));
        buffer.pending_deletes.remove(&(E::SYNC_ID, key.clone()))
    };
    let Some(pending) = pending else {
        return Ok(active);
    };
    scope.buffer().changes.extend(pending.cascade);
    if pending.syncs {
        let change = CapturedChange::delete(
            E::SYNC_ID,
            key,
            scope.context.clock.now(),
            E::SCHEMA_VERSION,
            None,
        );
        scope.buffer().changes.push(change);
    }
    Ok(active)
}

/// Records the current state of one record, as if it had just been written: an upsert if
/// it exists (and passes the model's filter), a delete otherwise. For repairing a record
/// written by a path that skipped the hooks (see `Library::audit`).
pub(crate) async fn record_again<E: Syncable>(
    txn: &DatabaseTransaction,
    key: &str,
) -> Result<bool, DbErr> {
    let scope = scope_for::<E, DatabaseTransaction>(txn).await?;
    let data = reload::<E>(txn, &scope.context, key).await?;
    let change = CapturedChange {
        model: E::SYNC_ID,
        record_id: key.to_owned(),
        op: if data.is_some() {
            ChangeOp::Upsert
        } else {
            ChangeOp::Delete
        },
        changed: if data.is_some() {
            E::synced_fields()
        } else {
            Vec::new()
        },
        data,
        hlc: scope.context.clock.now(),
        schema_version: E::SCHEMA_VERSION,
        author: None,
    };
    let upsert = change.op == ChangeOp::Upsert;
    scope.buffer().changes.push(change);
    Ok(upsert)
}
