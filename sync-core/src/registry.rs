//! The registry: from a model's sync id to the app's typed model.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use sea_orm::{
    ConnectionTrait, DatabaseConnection, DatabaseTransaction, DbBackend, DbErr, QueryTrait,
    Statement,
};

use std::collections::HashSet;

use sea_orm::sea_query::OnConflict;
use sea_orm::{ActiveModelTrait, IdenStatic, IntoActiveModel, Iterable, QuerySelect, TryIntoModel};

use crate::{ChangeOp, FieldSpec, LogEntry, MergeRule, Seq, Syncable};

/// Keys per read when looking for rows local to this device.
const LOCAL_KEYS_PER_READ: usize = 500;

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Rows of one model as `(record_id, synced fields)`, sorted by record id.
pub type ModelRows = Vec<(String, serde_json::Map<String, serde_json::Value>)>;

/// What the library needs to do with a model without knowing its type.
pub(crate) trait ModelOps: Send + Sync {
    fn sync_id(&self) -> &'static str;
    fn schema_version(&self) -> u32;
    fn enabled(&self) -> bool;
    fn merge(&self) -> MergeRule;
    fn fields(&self) -> &'static [FieldSpec];
    fn rows<'a>(&'a self, db: &'a DatabaseConnection) -> BoxFuture<'a, Result<ModelRows, DbErr>>;
    fn record_again<'a>(
        &'a self,
        txn: &'a DatabaseTransaction,
        key: &'a str,
    ) -> BoxFuture<'a, Result<bool, DbErr>>;
    /// Turns a run of checked leader entries of this model into the statements that write
    /// them, handing each to `emit` as soon as it is built. Stops early (with `Ok`) when
    /// `emit` returns false: the writer has stopped.
    fn prepare(
        &self,
        backend: DbBackend,
        entries: &[&LogEntry],
        emit: &mut dyn FnMut(Statement) -> bool,
    ) -> Result<(), (Seq, ApplyFailure)>;
    fn key_field(&self) -> &'static str;
    /// The record's synced fields, read with a row lock; `None` if it does not exist (or
    /// the model's filter excludes it).
    fn current<'a>(
        &'a self,
        txn: &'a DatabaseTransaction,
        key: &'a str,
    ) -> BoxFuture<'a, Result<Option<Fields>, DbErr>>;
    /// `Syncable::merge_custom` on two versions of a record's synced fields.
    fn merge_custom(
        &self,
        key: &str,
        local: &Fields,
        remote: &Fields,
    ) -> Result<Option<Fields>, String>;
    /// `Syncable::FILTERED`.
    fn filtered(&self) -> bool;
    /// Whether `key` is a key of this model (`Syncable::parse_key`).
    fn parses_key(&self, key: &str) -> bool;
    /// Those of `keys` whose row exists here and is local to this device (the model's
    /// filter excludes it). Empty at once for a model without a filter.
    fn local_only<'a>(
        &'a self,
        txn: &'a DatabaseTransaction,
        keys: Vec<String>,
    ) -> BoxFuture<'a, Result<std::collections::HashSet<String>, DbErr>>;
    /// Sets synced fields of an existing record through the model's hooks (so the write is
    /// recorded). A missing record is left missing.
    fn set_fields<'a>(
        &'a self,
        txn: &'a DatabaseTransaction,
        key: &'a str,
        values: &'a Fields,
    ) -> BoxFuture<'a, Result<(), ApplyFailure>>;
}

type Fields = serde_json::Map<String, serde_json::Value>;

/// Why one entry could not be applied.
#[derive(Debug)]
pub(crate) enum ApplyFailure {
    /// The entry does not fit this build's model.
    BadPayload(String),
    /// The database refused.
    Db(DbErr),
}

impl From<DbErr> for ApplyFailure {
    fn from(e: DbErr) -> Self {
        ApplyFailure::Db(e)
    }
}

struct Typed<E> {
    /// SQL texts of the apply statements built so far, by shape: built once by SeaORM,
    /// reused with new values by every later statement of that shape.
    shapes: Shapes,
    model: std::marker::PhantomData<fn() -> E>,
}

impl<E> Typed<E> {
    fn new() -> Typed<E> {
        Typed {
            shapes: Shapes::default(),
            model: std::marker::PhantomData,
        }
    }
}

/// Shapes kept at most per model.
const SHAPES_MAX: usize = 64;

/// The SQL text of an apply statement by its shape: the backend, the row count and the
/// columns its conflict clause updates.
#[derive(Default)]
struct Shapes(std::sync::Mutex<Vec<Shape>>);

struct Shape {
    backend: DbBackend,
    rows: usize,
    updates: Vec<String>,
    sql: Arc<str>,
}

impl Shapes {
    fn get(&self, backend: DbBackend, rows: usize, updates: &[&str]) -> Option<Arc<str>> {
        let shapes = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        shapes
            .iter()
            .find(|s| {
                s.backend == backend
                    && s.rows == rows
                    && s.updates
                        .iter()
                        .map(String::as_str)
                        .eq(updates.iter().copied())
            })
            .map(|s| Arc::clone(&s.sql))
    }

    fn insert(&self, backend: DbBackend, rows: usize, updates: &[&str], sql: &str) {
        let mut shapes = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if shapes.len() >= SHAPES_MAX {
            // Field-level models can have many column sets; keep the cache bounded.
            shapes.clear();
        }
        shapes.push(Shape {
            backend,
            rows,
            updates: updates.iter().map(|u| (*u).to_owned()).collect(),
            sql: Arc::from(sql),
        });
    }
}

impl<E> ModelOps for Typed<E>
where
    E: Syncable,
    E::Model: IntoActiveModel<E::ActiveModel>,
    E::ActiveModel: Send + TryIntoModel<E::Model>,
{
    fn sync_id(&self) -> &'static str {
        E::SYNC_ID
    }
    fn schema_version(&self) -> u32 {
        E::SCHEMA_VERSION
    }
    fn enabled(&self) -> bool {
        E::ENABLED
    }
    fn merge(&self) -> MergeRule {
        E::MERGE
    }
    fn fields(&self) -> &'static [FieldSpec] {
        E::FIELDS
    }
    fn rows<'a>(&'a self, db: &'a DatabaseConnection) -> BoxFuture<'a, Result<ModelRows, DbErr>> {
        Box::pin(rows_of::<E, _>(db))
    }
    fn record_again<'a>(
        &'a self,
        txn: &'a DatabaseTransaction,
        key: &'a str,
    ) -> BoxFuture<'a, Result<bool, DbErr>> {
        Box::pin(crate::capture::record_again::<E>(txn, key))
    }
    fn prepare(
        &self,
        backend: DbBackend,
        entries: &[&LogEntry],
        emit: &mut dyn FnMut(Statement) -> bool,
    ) -> Result<(), (Seq, ApplyFailure)> {
        prepare_entries::<E>(backend, &self.shapes, entries, emit)
    }
    fn key_field(&self) -> &'static str {
        E::KEY_FIELD
    }
    fn current<'a>(
        &'a self,
        txn: &'a DatabaseTransaction,
        key: &'a str,
    ) -> BoxFuture<'a, Result<Option<Fields>, DbErr>> {
        Box::pin(async move {
            let Some(pk) = E::parse_key(key) else {
                return Ok(None);
            };
            match E::find_by_id(pk).lock_exclusive().one(txn).await? {
                Some(model) if E::should_sync(&model) => crate::canonical::sync_json::<E>(&model)
                    .map(Some)
                    .map_err(|e| DbErr::Json(format!("`{}`: {e}", E::SYNC_ID))),
                _ => Ok(None),
            }
        })
    }
    fn filtered(&self) -> bool {
        E::FILTERED
    }
    fn parses_key(&self, key: &str) -> bool {
        E::parse_key(key).is_some()
    }
    fn local_only<'a>(
        &'a self,
        txn: &'a DatabaseTransaction,
        keys: Vec<String>,
    ) -> BoxFuture<'a, Result<std::collections::HashSet<String>, DbErr>> {
        Box::pin(async move {
            let mut local = std::collections::HashSet::new();
            if !E::FILTERED {
                return Ok(local);
            }
            // One read per chunk of keys (keys are single columns: the derive refuses
            // composite ones), not one per key: apply calls this for every response.
            use sea_orm::sea_query::{IntoValueTuple, ValueTuple};
            use sea_orm::{ColumnTrait, PrimaryKeyToColumn, QueryFilter};
            let Some(column) = E::PrimaryKey::iter().next().map(|k| k.into_column()) else {
                return Ok(local);
            };
            let values: Vec<sea_orm::Value> = keys
                .iter()
                .filter_map(|key| match E::parse_key(key)?.into_value_tuple() {
                    ValueTuple::One(value) => Some(value),
                    _ => None,
                })
                .collect();
            for chunk in values.chunks(LOCAL_KEYS_PER_READ) {
                for model in E::find()
                    .filter(column.is_in(chunk.iter().cloned()))
                    .all(txn)
                    .await?
                {
                    if !E::should_sync(&model) {
                        local.insert(E::record_key(&model));
                    }
                }
            }
            Ok(local)
        })
    }
    fn merge_custom(
        &self,
        key: &str,
        local: &Fields,
        remote: &Fields,
    ) -> Result<Option<Fields>, String> {
        let model_of = |fields: &Fields| {
            let pk = E::parse_key(key).ok_or_else(|| format!("`{key}` is not a key"))?;
            let mut active = E::new_active(pk);
            E::apply_json(&mut active, fields, None).map_err(|e| e.to_string())?;
            active.try_into_model().map_err(|e| e.to_string())
        };
        let merged = E::merge_custom(&model_of(local)?, &model_of(remote)?);
        merged
            .map(|m| E::sync_json(&m).map_err(|e| e.to_string()))
            .transpose()
    }
    fn set_fields<'a>(
        &'a self,
        txn: &'a DatabaseTransaction,
        key: &'a str,
        values: &'a Fields,
    ) -> BoxFuture<'a, Result<(), ApplyFailure>> {
        Box::pin(async move {
            let Some(pk) = E::parse_key(key) else {
                return Err(ApplyFailure::BadPayload(format!("`{key}` is not a key")));
            };
            let Some(model) = E::find_by_id(pk).one(txn).await? else {
                return Ok(());
            };
            let mut active = model.into_active_model();
            E::apply_json(&mut active, values, None)
                .map_err(|e| ApplyFailure::BadPayload(format!("a field does not fit: {e}")))?;
            active.update(txn).await?;
            Ok(())
        })
    }
}

/// Bound values per apply statement. SQLite handles long statements well (and its
/// per-statement cost is a round trip to its connection's worker thread); PostgreSQL and
/// MySQL measured fastest around 400 (see `LOG_INSERT_ROWS_MAX`).
fn apply_values_max(backend: DbBackend) -> usize {
    match backend {
        DbBackend::Sqlite => 1_000,
        _ => 400,
    }
}

/// Builds the statements that apply a run of leader entries of one model, in order. The
/// leader's log is the order of truth: an upsert writes the synced fields it carries
/// (under `FieldLevel`, on an existing record only those it changed), local fields keep
/// this device's values (and start at their `Default` on a new record), and a delete of a
/// missing record is a no-op.
///
/// Consecutive upserts become one `INSERT … ON CONFLICT (key) DO UPDATE` of the synced
/// columns, split where a key repeats (a statement may touch a row once) or where the
/// columns to update differ. Building needs no database: the caller runs it beside the
/// writer, which executes each statement as it arrives.
fn prepare_entries<E>(
    backend: DbBackend,
    shapes: &Shapes,
    entries: &[&LogEntry],
    emit: &mut dyn FnMut(Statement) -> bool,
) -> Result<(), (Seq, ApplyFailure)>
where
    E: Syncable,
    E::Model: IntoActiveModel<E::ActiveModel>,
    E::ActiveModel: Send,
{
    let columns: Vec<(&'static str, E::Column)> = E::FIELDS
        .iter()
        .filter_map(|f| {
            E::Column::iter()
                .find(|c| c.as_str() == f.column)
                .map(|c| (f.name, c))
        })
        .collect();
    let column_of = |name: &str| columns.iter().find(|(n, _)| *n == name).map(|(_, c)| *c);
    let Some(key_column) = column_of(E::KEY_FIELD) else {
        return Err((
            Seq::ZERO,
            ApplyFailure::BadPayload(format!("`{}` has no key column", E::SYNC_ID)),
        ));
    };
    let synced = E::synced_fields();
    let whole_record: Vec<&'static str> = synced
        .iter()
        .copied()
        .filter(|f| *f != E::KEY_FIELD)
        .collect();
    let rows_max = (apply_values_max(backend) / E::FIELDS.len().max(1)).max(1);
    let build = |rows: Vec<E::ActiveModel>, updates: &[&str]| {
        let mut on_conflict = OnConflict::column(key_column);
        let update_columns: Vec<E::Column> = updates.iter().filter_map(|f| column_of(f)).collect();
        if update_columns.is_empty() {
            on_conflict.do_nothing_on([key_column]);
        } else {
            on_conflict.update_columns(update_columns);
        }
        E::insert_many(rows).on_conflict(on_conflict).build(backend)
    };
    // Statements of one shape (row count, columns to update) share their SQL text: SeaORM
    // builds the first, later ones only collect their rows' values, in the order SeaORM
    // binds them (row by row, each row's columns in `Column::iter()` order).
    let upsert = |rows: Vec<E::ActiveModel>, updates: &[&str]| {
        let every_column_set = |row: &E::ActiveModel| E::Column::iter().all(|c| !row.is_not_set(c));
        let reusable = rows.iter().all(every_column_set);
        match shapes.get(backend, rows.len(), updates) {
            Some(sql) if reusable => {
                let values = rows
                    .into_iter()
                    .flat_map(row_values::<E>)
                    .collect::<Vec<_>>();
                Statement::from_sql_and_values(backend, &*sql, values)
            }
            _ => {
                #[cfg(debug_assertions)]
                let expected: Vec<sea_orm::Value> =
                    rows.iter().cloned().flat_map(row_values::<E>).collect();
                let rows_len = rows.len();
                let statement = build(rows, updates);
                #[cfg(debug_assertions)]
                if reusable {
                    let built = statement.values.as_ref().map(|v| v.0.as_slice());
                    debug_assert_eq!(
                        built,
                        Some(expected.as_slice()),
                        "apply binds values as SeaORM does"
                    );
                }
                if reusable {
                    shapes.insert(backend, rows_len, updates, &statement.sql);
                }
                statement
            }
        }
    };

    let mut run: Vec<E::ActiveModel> = Vec::new();
    let mut run_keys: HashSet<&str> = HashSet::new();
    let mut run_updates: Vec<&str> = Vec::new();
    // The first statement of a batch is kept short: the writer waits for it, while the
    // later ones are built as the earlier ones execute.
    let mut statement_rows = (rows_max / 8).max(1);
    for entry in entries {
        let fail = |failure: ApplyFailure| (entry.seq, failure);
        let key = E::parse_key(&entry.record_id).ok_or_else(|| {
            fail(ApplyFailure::BadPayload(format!(
                "`{}` is not a key of `{}`",
                entry.record_id,
                E::SYNC_ID
            )))
        })?;
        let row = match entry.op {
            ChangeOp::Delete => {
                if !run.is_empty() && !emit(upsert(std::mem::take(&mut run), &run_updates)) {
                    return Ok(());
                }
                run_keys.clear();
                if !emit(E::delete_by_id(key).build(backend)) {
                    return Ok(());
                }
                continue;
            }
            ChangeOp::Upsert => {
                let data = entry.data.as_deref().ok_or_else(|| {
                    fail(ApplyFailure::BadPayload("an upsert without data".into()))
                })?;
                E::decode_upsert(key, data).map_err(|e| {
                    fail(ApplyFailure::BadPayload(format!(
                        "its data does not fit this build's `{}`: {e}",
                        E::SYNC_ID
                    )))
                })?
            }
        };
        // The columns this upsert writes over an existing row.
        let same_updates = if E::MERGE == MergeRule::FieldLevel {
            run_updates.iter().copied().eq(changed_columns::<E>(entry))
        } else {
            run_updates == whole_record
        };
        if !run.is_empty()
            && (!same_updates
                || run.len() >= statement_rows
                || run_keys.contains(entry.record_id.as_str()))
        {
            if !emit(upsert(std::mem::take(&mut run), &run_updates)) {
                return Ok(());
            }
            run_keys.clear();
            statement_rows = rows_max;
        }
        if run.is_empty() && !same_updates {
            run_updates = if E::MERGE == MergeRule::FieldLevel {
                changed_columns::<E>(entry).collect()
            } else {
                whole_record.clone()
            };
        }
        run_keys.insert(entry.record_id.as_str());
        run.push(row);
    }
    if !run.is_empty() {
        emit(upsert(run, &run_updates));
    }
    Ok(())
}

/// The fields a field-level upsert writes over an existing row: those it changed, but the key.
fn changed_columns<E: Syncable>(entry: &LogEntry) -> impl Iterator<Item = &str> {
    entry
        .changed
        .iter()
        .map(String::as_str)
        .filter(|f| *f != E::KEY_FIELD)
}

/// A row's values, one per column in `Column::iter()` order (every column is set).
fn row_values<E: Syncable>(mut row: E::ActiveModel) -> impl Iterator<Item = sea_orm::Value> {
    E::Column::iter().filter_map(move |column| row.take(column).into_value())
}

/// Applies a run of entries of one model in `txn` at once (the leader writing the outcome
/// of a pushed change).
pub(crate) async fn apply_entries(
    ops: &dyn ModelOps,
    txn: &DatabaseTransaction,
    entries: &[&LogEntry],
) -> Result<(), (Seq, ApplyFailure)> {
    let mut statements = Vec::new();
    ops.prepare(txn.get_database_backend(), entries, &mut |statement| {
        statements.push(statement);
        true
    })?;
    let last = entries.last().map_or(Seq::ZERO, |e| e.seq);
    for statement in statements {
        txn.execute_raw(statement)
            .await
            .map_err(|e| (last, e.into()))?;
    }
    Ok(())
}

async fn rows_of<E: Syncable, C: ConnectionTrait>(db: &C) -> Result<ModelRows, DbErr> {
    let mut rows = Vec::new();
    for model in E::find().all(db).await? {
        if !E::should_sync(&model) {
            continue;
        }
        let fields = crate::canonical::sync_json::<E>(&model).map_err(|e| {
            DbErr::Json(format!(
                "cannot serialise synced fields of `{}`: {e}",
                E::SYNC_ID
            ))
        })?;
        rows.push((E::record_key(&model), fields));
    }
    rows.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(rows)
}

/// The app's synced models, by sync id. Build it once at start-up and hand it to `Library`.
#[derive(Clone, Default)]
pub struct Registry {
    models: BTreeMap<&'static str, Arc<dyn ModelOps>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.models.keys()).finish()
    }
}

/// Two models claim the same sync id.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "two models are registered with the sync id `{0}`: give one of them `#[sync(id = \"...\")]`"
)]
pub struct DuplicateSyncId(pub &'static str);

impl Registry {
    /// An empty registry.
    pub fn new() -> Registry {
        Registry::default()
    }

    /// Adds a model. Models with `#[sync(local)]` may be registered too; they are ignored.
    pub fn register<E>(mut self) -> Result<Registry, DuplicateSyncId>
    where
        E: Syncable,
        E::Model: IntoActiveModel<E::ActiveModel>,
        E::ActiveModel: Send + TryIntoModel<E::Model>,
    {
        if self.models.contains_key(E::SYNC_ID) {
            return Err(DuplicateSyncId(E::SYNC_ID));
        }
        self.models.insert(E::SYNC_ID, Arc::new(Typed::<E>::new()));
        Ok(self)
    }

    /// The sync ids of the models that sync, sorted.
    pub fn synced_models(&self) -> Vec<&'static str> {
        self.models
            .values()
            .filter(|m| m.enabled())
            .map(|m| m.sync_id())
            .collect()
    }

    /// The schema version this build has for a model, if it knows the model.
    pub fn schema_version(&self, sync_id: &str) -> Option<u32> {
        self.models
            .get(sync_id)
            .filter(|m| m.enabled())
            .map(|m| m.schema_version())
    }

    /// The merge rule and fields of a model, if this build knows it.
    pub fn describe(&self, sync_id: &str) -> Option<(MergeRule, &'static [FieldSpec])> {
        self.models
            .get(sync_id)
            .filter(|m| m.enabled())
            .map(|m| (m.merge(), m.fields()))
    }

    /// With sync-core's own synced models (conflicts) added.
    pub(crate) fn with_internal_models(mut self) -> Registry {
        let conflict = <crate::tables::conflict::Entity as Syncable>::SYNC_ID;
        self.models
            .entry(conflict)
            .or_insert_with(|| Arc::new(Typed::<crate::tables::conflict::Entity>::new()));
        self
    }

    pub(crate) fn get(&self, sync_id: &str) -> Option<&Arc<dyn ModelOps>> {
        self.models.get(sync_id).filter(|m| m.enabled())
    }

    pub(crate) fn iter_synced(&self) -> impl Iterator<Item = &Arc<dyn ModelOps>> {
        self.models.values().filter(|m| m.enabled())
    }
}
