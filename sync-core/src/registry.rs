//! The registry: from a model's sync id to the app's typed model.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use sea_orm::sea_query::SelectStatement;
use sea_orm::{
    ConnectionTrait, DatabaseConnection, DatabaseTransaction, DbBackend, DbErr, QueryResult,
    QueryTrait, Statement,
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
    /// The model's table.
    fn table_name(&self) -> &'static str;
    /// The primary key's column, when it is one column.
    fn pk_column(&self) -> Option<&'static str>;
    /// The sync key's column, when the primary key is local (`#[sync(key)]`): other
    /// models' references to this one travel as this column's value.
    fn local_key_column(&self) -> Option<&'static str>;
    /// The model's belongs-to relations of one column: `(column, parent table, parent
    /// column)`.
    fn belongs_to(&self) -> Vec<(String, String, String)>;
    /// The model's belongs-to relations of one column whose `on_delete` is `Cascade` or
    /// `SetNull`: `(column, parent table, parent column, action)` (see `cascade.rs`).
    fn on_delete(&self) -> Vec<(String, String, String, crate::cascade::Action)>;
    /// `SELECT column FROM` this model's table `WHERE` its key is one of `keys` (keys that
    /// do not parse are left out): the values its dependents' references hold.
    fn select_column_of(&self, column: &str, keys: &[String]) -> SelectStatement;
    /// The `SELECT` of this model's rows (every column, as SeaORM reads them) whose `column`
    /// is one of the values `parents` selects, locked where the backend has row locks.
    fn select_referring(
        &self,
        backend: DbBackend,
        column: &str,
        parents: SelectStatement,
    ) -> Statement;
    /// Rows that `select_referring` read: each one's record key, whether its filter lets
    /// it sync, and its synced fields in canonical form (references not yet translated).
    fn decode_rows(&self, rows: Vec<QueryResult>) -> Result<Vec<crate::cascade::Row>, DbErr>;
    /// The references to translate, found by `Registry::resolved`.
    fn references(&self) -> &[ForeignRef];
    /// The same model with these references.
    fn with_references(&self, refs: Vec<ForeignRef>) -> Arc<dyn ModelOps>;
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
        emit: &mut dyn FnMut(Step) -> bool,
    ) -> Result<(), (Seq, ApplyFailure)>;
    fn key_field(&self) -> &'static str;
    /// The rows `select` (a `SELECT * FROM` this model's table) reads, in `txn`: each one's
    /// record key and whether the model's filter lets it sync. The `*` is replaced by the
    /// columns as SeaORM selects them (a PostgreSQL enum column is read as text). How the
    /// handle captures a plain `DELETE` statement (`connection.rs`).
    fn keys_where<'a>(
        &'a self,
        txn: &'a DatabaseTransaction,
        select: Statement,
    ) -> BoxFuture<'a, Result<Vec<(String, bool)>, DbErr>>;
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
    /// This model's integer references to models with a sync key.
    refs: Vec<ForeignRef>,
    model: std::marker::PhantomData<fn() -> E>,
}

impl<E> Typed<E> {
    fn new() -> Typed<E> {
        Typed {
            shapes: Shapes::default(),
            refs: Vec::new(),
            model: std::marker::PhantomData,
        }
    }
}

/// A column of a synced model that holds the local primary key of a record of another
/// synced model whose primary key is local (it has a `#[sync(key)]`). In the log, the
/// column's JSON field holds the referenced record's sync key (its text, or null); each
/// device translates it to and from its own integer.
#[derive(Clone, Debug)]
pub(crate) struct ForeignRef {
    /// The field (JSON key) and its column.
    pub(crate) field: &'static str,
    pub(crate) column: &'static str,
    /// The referenced model's sync id, table, primary key column and sync key column.
    pub(crate) parent: &'static str,
    pub(crate) parent_table: &'static str,
    pub(crate) parent_pk: &'static str,
    pub(crate) parent_key: &'static str,
}

/// One step of an apply: a statement to execute, or a check that the records an upsert
/// refers to are here (so that a missing one is an error, not a silent NULL).
pub(crate) enum Step {
    Run(Statement),
    Require {
        /// `SELECT COUNT(*)` of the referenced records.
        count: Statement,
        expected: i64,
        missing: String,
    },
}

impl From<Statement> for Step {
    fn from(statement: Statement) -> Step {
        Step::Run(statement)
    }
}

impl Step {
    pub(crate) async fn execute(self, txn: &DatabaseTransaction) -> Result<(), DbErr> {
        match self {
            Step::Run(statement) => txn.execute_raw(statement).await.map(|_| ()),
            Step::Require {
                count,
                expected,
                missing,
            } => {
                let found = match txn.query_one_raw(count).await? {
                    Some(row) => row.try_get_by_index::<i64>(0)?,
                    None => 0,
                };
                if found == expected {
                    Ok(())
                } else {
                    // A data error (`error::is_data_error`): the entry is named as stuck.
                    Err(DbErr::RecordNotFound(missing))
                }
            }
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
        Box::pin(rows_of::<E, _>(db, &self.refs))
    }
    fn table_name(&self) -> &'static str {
        sea_orm::EntityName::table_name(&E::default())
    }
    fn pk_column(&self) -> Option<&'static str> {
        use sea_orm::PrimaryKeyToColumn;
        let mut keys = E::PrimaryKey::iter();
        match (keys.next(), keys.next()) {
            (Some(key), None) => Some(IdenStatic::as_str(&key.into_column())),
            _ => None,
        }
    }
    fn local_key_column(&self) -> Option<&'static str> {
        if !E::LOCAL_PRIMARY_KEY {
            return None;
        }
        crate::syncable::key_column::<E>().map(|c| IdenStatic::as_str(&c))
    }
    fn belongs_to(&self) -> Vec<(String, String, String)> {
        use sea_orm::{Identity, RelationTrait, RelationType};
        E::Relation::iter()
            .map(|r| r.def())
            // A belongs-to relation: SeaORM marks it `HasOne` and not the owner.
            .filter(|def| def.rel_type == RelationType::HasOne && !def.is_owner)
            .filter_map(|def| match (&def.from_col, &def.to_col) {
                (Identity::Unary(from), Identity::Unary(to)) => Some((
                    from.inner().into_owned(),
                    def.to_tbl.sea_orm_table().inner().into_owned(),
                    to.inner().into_owned(),
                )),
                _ => None,
            })
            .collect()
    }
    fn on_delete(&self) -> Vec<(String, String, String, crate::cascade::Action)> {
        use sea_orm::sea_query::ForeignKeyAction;
        use sea_orm::{Identity, RelationTrait, RelationType};
        E::Relation::iter()
            .map(|r| r.def())
            .filter(|def| def.rel_type == RelationType::HasOne && !def.is_owner)
            .filter_map(|def| {
                let action = match def.on_delete {
                    Some(ForeignKeyAction::Cascade) => crate::cascade::Action::Cascade,
                    Some(ForeignKeyAction::SetNull) => crate::cascade::Action::SetNull,
                    _ => return None,
                };
                match (&def.from_col, &def.to_col) {
                    (Identity::Unary(from), Identity::Unary(to)) => Some((
                        from.inner().into_owned(),
                        def.to_tbl.sea_orm_table().inner().into_owned(),
                        to.inner().into_owned(),
                        action,
                    )),
                    _ => None,
                }
            })
            .collect()
    }
    fn select_column_of(&self, column: &str, keys: &[String]) -> SelectStatement {
        use sea_orm::sea_query::{Alias, Expr, ExprTrait, Query};
        let key_column =
            crate::syncable::key_column::<E>().map_or(E::KEY_FIELD, |c| IdenStatic::as_str(&c));
        let values: Vec<sea_orm::Value> = keys
            .iter()
            .filter_map(|key| E::parse_key(key).map(Into::into))
            .collect();
        Query::select()
            .column(Alias::new(column))
            .from(E::default())
            .and_where(Expr::col(Alias::new(key_column)).is_in(values))
            .to_owned()
    }
    fn select_referring(
        &self,
        backend: DbBackend,
        column: &str,
        parents: SelectStatement,
    ) -> Statement {
        use sea_orm::QueryFilter;
        use sea_orm::sea_query::{Alias, Expr, ExprTrait};
        E::find()
            .filter(Expr::col((E::default(), Alias::new(column))).in_subquery(parents))
            .lock_exclusive()
            .build(backend)
    }
    fn decode_rows(&self, rows: Vec<QueryResult>) -> Result<Vec<crate::cascade::Row>, DbErr> {
        use sea_orm::FromQueryResult;
        rows.iter()
            .map(|row| {
                let model = E::Model::from_query_result(row, "")?;
                let fields = crate::canonical::sync_json::<E>(&model).map_err(|e| {
                    DbErr::Json(format!(
                        "cannot serialise synced fields of `{}`: {e}",
                        E::SYNC_ID
                    ))
                })?;
                Ok(crate::cascade::Row {
                    key: E::record_key(&model),
                    syncs: E::should_sync(&model),
                    fields,
                })
            })
            .collect()
    }
    fn references(&self) -> &[ForeignRef] {
        &self.refs
    }
    fn with_references(&self, refs: Vec<ForeignRef>) -> Arc<dyn ModelOps> {
        Arc::new(Typed::<E> {
            shapes: Shapes::default(),
            refs,
            model: std::marker::PhantomData,
        })
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
        emit: &mut dyn FnMut(Step) -> bool,
    ) -> Result<(), (Seq, ApplyFailure)> {
        prepare_entries::<E>(backend, &self.shapes, &self.refs, entries, emit)
    }
    fn key_field(&self) -> &'static str {
        E::KEY_FIELD
    }
    fn keys_where<'a>(
        &'a self,
        txn: &'a DatabaseTransaction,
        select: Statement,
    ) -> BoxFuture<'a, Result<Vec<(String, bool)>, DbErr>> {
        Box::pin(async move {
            let mut select = select;
            if let Some(rest) = select.sql.strip_prefix("SELECT * ") {
                // SeaORM's own column list: `SELECT *` would read a PostgreSQL enum column
                // as its enum type, which the model's `String`-backed field cannot decode.
                let columns = E::find().build(select.db_backend).sql;
                if let Some(list) = columns
                    .strip_prefix("SELECT ")
                    .and_then(|c| c.rfind(" FROM ").map(|at| &c[..at]))
                {
                    select.sql = format!("SELECT {list} {rest}");
                }
            }
            let rows = E::find().from_raw_sql(select).all(txn).await?;
            Ok(rows
                .iter()
                .map(|m| (E::record_key(m), E::should_sync(m)))
                .collect())
        })
    }
    fn current<'a>(
        &'a self,
        txn: &'a DatabaseTransaction,
        key: &'a str,
    ) -> BoxFuture<'a, Result<Option<Fields>, DbErr>> {
        Box::pin(async move {
            let Some(query) = crate::syncable::find_by_key::<E>(key) else {
                return Ok(None);
            };
            match query.lock_exclusive().one(txn).await? {
                Some(model) if E::should_sync(&model) => {
                    let mut fields = crate::canonical::sync_json::<E>(&model)
                        .map_err(|e| DbErr::Json(format!("`{}`: {e}", E::SYNC_ID)))?;
                    references_out(txn, &self.refs, &mut fields, &mut HashMap::new()).await?;
                    Ok(Some(fields))
                }
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
            use sea_orm::{ColumnTrait, QueryFilter};
            let Some(column) = crate::syncable::key_column::<E>() else {
                return Ok(local);
            };
            let values: Vec<sea_orm::Value> = keys
                .iter()
                .filter_map(|key| E::parse_key(key).map(Into::into))
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
        // References travel as sync keys; the model holds integers. Each distinct sync key
        // stands in as a distinct number while the app's function runs, and goes back after.
        let mut stand_ins: Vec<serde_json::Value> = Vec::new();
        let mut stand_in = |fields: &Fields| {
            let mut fields = fields.clone();
            for r in &self.refs {
                if let Some(value) = fields.get_mut(r.field).filter(|v| !v.is_null()) {
                    let n = match stand_ins.iter().position(|s| s == value) {
                        Some(n) => n,
                        None => {
                            stand_ins.push(value.clone());
                            stand_ins.len() - 1
                        }
                    };
                    *value = serde_json::Value::from(n as i64 + 1);
                }
            }
            fields
        };
        let (local, remote) = (stand_in(local), stand_in(remote));
        let model_of = |fields: &Fields| {
            let pk = E::parse_key(key).ok_or_else(|| format!("`{key}` is not a key"))?;
            let mut active = E::new_active(pk);
            E::apply_json(&mut active, fields, None).map_err(|e| e.to_string())?;
            active.try_into_model().map_err(|e| e.to_string())
        };
        let merged = E::merge_custom(&model_of(&local)?, &model_of(&remote)?);
        let Some(merged) = merged else {
            return Ok(None);
        };
        let mut fields = E::sync_json(&merged).map_err(|e| e.to_string())?;
        for r in &self.refs {
            if let Some(value) = fields.get_mut(r.field).filter(|v| !v.is_null()) {
                let back = value
                    .as_i64()
                    .and_then(|n| stand_ins.get(usize::try_from(n - 1).ok()?))
                    .ok_or_else(|| {
                        format!(
                            "the merge function of `{}` set `{}` to a record neither side \
                             refers to",
                            E::SYNC_ID,
                            r.field
                        )
                    })?;
                *value = back.clone();
            }
        }
        Ok(Some(fields))
    }
    fn set_fields<'a>(
        &'a self,
        txn: &'a DatabaseTransaction,
        key: &'a str,
        values: &'a Fields,
    ) -> BoxFuture<'a, Result<(), ApplyFailure>> {
        Box::pin(async move {
            let Some(query) = crate::syncable::find_by_key::<E>(key) else {
                return Err(ApplyFailure::BadPayload(format!("`{key}` is not a key")));
            };
            let Some(model) = query.one(txn).await? else {
                return Ok(());
            };
            let mut active = model.into_active_model();
            let mut values = values.clone();
            references_in(txn, E::SYNC_ID, &self.refs, &mut values).await?;
            E::apply_json(&mut active, &values, None)
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
    refs: &[ForeignRef],
    entries: &[&LogEntry],
    emit: &mut dyn FnMut(Step) -> bool,
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
    let on_conflict = |updates: &[&str]| {
        let mut on_conflict = OnConflict::column(key_column);
        let update_columns: Vec<E::Column> = updates.iter().filter_map(|f| column_of(f)).collect();
        if update_columns.is_empty() {
            on_conflict.do_nothing_on([key_column]);
        } else {
            on_conflict.update_columns(update_columns);
        }
        on_conflict
    };
    let build = |rows: Vec<E::ActiveModel>, updates: &[&str]| {
        E::insert_many(rows)
            .on_conflict(on_conflict(updates))
            .build(backend)
    };
    // A local primary key is never written by apply: the database assigns it.
    let local_pk = |column: &E::Column| {
        E::LOCAL_PRIMARY_KEY
            && E::FIELDS
                .iter()
                .any(|f| f.column == column.as_str() && !f.synced)
            && {
                use sea_orm::PrimaryKeyToColumn;
                E::PrimaryKey::iter().any(|k| k.into_column().as_str() == column.as_str())
            }
    };
    // Statements of one shape (row count, columns to update) share their SQL text: SeaORM
    // builds the first, later ones only collect their rows' values, in the order SeaORM
    // binds them (row by row, each row's columns in `Column::iter()` order).
    let upsert = |rows: Vec<E::ActiveModel>, updates: &[&str]| -> Step {
        let every_column_set =
            |row: &E::ActiveModel| E::Column::iter().all(|c| row.is_not_set(c) == local_pk(&c));
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
        .into()
    };
    // With references, each row's referenced sync keys (per `refs`), and the statements
    // are built apart: their reference columns are subqueries.
    let mut run_parents: Vec<Vec<Option<uuid::Uuid>>> = Vec::new();
    let emit_run = |emit: &mut dyn FnMut(Step) -> bool,
                    rows: Vec<E::ActiveModel>,
                    parents: Vec<Vec<Option<uuid::Uuid>>>,
                    updates: &[&str]|
     -> bool {
        if refs.is_empty() {
            return emit(upsert(rows, updates));
        }
        let (check, statement) =
            upsert_with_references::<E>(backend, refs, rows, &parents, on_conflict(updates));
        check.into_iter().all(&mut *emit) && emit(statement.into())
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
        let (row, parents) = match entry.op {
            ChangeOp::Delete => {
                if !run.is_empty()
                    && !emit_run(
                        emit,
                        std::mem::take(&mut run),
                        std::mem::take(&mut run_parents),
                        &run_updates,
                    )
                {
                    return Ok(());
                }
                run_keys.clear();
                let delete = {
                    use sea_orm::{ColumnTrait, QueryFilter};
                    E::delete_many().filter(key_column.eq(key)).build(backend)
                };
                if !emit(delete.into()) {
                    return Ok(());
                }
                continue;
            }
            ChangeOp::Upsert => {
                let data = entry.data.as_deref().ok_or_else(|| {
                    fail(ApplyFailure::BadPayload("an upsert without data".into()))
                })?;
                let misfit = |e: serde_json::Error| {
                    fail(ApplyFailure::BadPayload(format!(
                        "its data does not fit this build's `{}`: {e}",
                        E::SYNC_ID
                    )))
                };
                if refs.is_empty() {
                    (E::decode_upsert(key, data).map_err(misfit)?, Vec::new())
                } else {
                    let mut fields: Fields = serde_json::from_str(data).map_err(misfit)?;
                    let parents = take_references(refs, &mut fields)
                        .map_err(|reason| fail(ApplyFailure::BadPayload(reason)))?;
                    (
                        crate::syncable::decode_fields::<E>(key, &fields).map_err(misfit)?,
                        parents,
                    )
                }
            }
        };
        // The columns this upsert writes over an existing row.
        let same_updates = if E::MERGE == MergeRule::FieldLevel {
            run_updates.iter().copied().eq(changed_columns::<E>(entry))
        } else {
            run_updates == whole_record
        };
        // A record that refers to one of its own model written earlier in this run (a
        // tree) goes in the next statement: a statement's subqueries and the check before
        // it see only rows already written.
        let refers_into_run = refs.iter().zip(&parents).any(|(r, key)| {
            r.parent == E::SYNC_ID
                && key.is_some_and(|key| run_keys.contains(key.to_string().as_str()))
        });
        if !run.is_empty()
            && (!same_updates
                || run.len() >= statement_rows
                || refers_into_run
                || run_keys.contains(entry.record_id.as_str()))
        {
            if !emit_run(
                emit,
                std::mem::take(&mut run),
                std::mem::take(&mut run_parents),
                &run_updates,
            ) {
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
        run_parents.push(parents);
    }
    if !run.is_empty() {
        emit_run(emit, run, run_parents, &run_updates);
    }
    Ok(())
}

/// Takes the referenced sync keys out of an upsert's fields (per `refs`), leaving a
/// stand-in number (0) that decodes into the model's integer column; a null stays null.
fn take_references(
    refs: &[ForeignRef],
    fields: &mut Fields,
) -> Result<Vec<Option<uuid::Uuid>>, String> {
    refs.iter()
        .map(|r| match fields.get_mut(r.field) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(value) => {
                let key = value
                    .as_str()
                    .and_then(|text| uuid::Uuid::parse_str(text).ok())
                    .ok_or_else(|| {
                        format!(
                            "field `{}` refers to a `{}` record by its sync key (a UUID), \
                             not {value}",
                            r.field, r.parent
                        )
                    })?;
                *value = serde_json::Value::from(0);
                Ok(Some(key))
            }
        })
        .collect()
}

/// The upsert of `rows` whose reference columns are subqueries that find each referenced
/// record's local primary key by its sync key (`parents`, per row, per `refs`), and the
/// checks, run first, that every referenced record is here.
fn upsert_with_references<E: Syncable>(
    backend: DbBackend,
    refs: &[ForeignRef],
    rows: Vec<E::ActiveModel>,
    parents: &[Vec<Option<uuid::Uuid>>],
    on_conflict: OnConflict,
) -> (Vec<Step>, Statement) {
    use sea_orm::ColumnTrait;
    use sea_orm::sea_query::{Alias, Expr, ExprTrait, Query, SubQueryStatement};
    let parent_id = |r: &ForeignRef, key: uuid::Uuid| {
        let select = Query::select()
            .column(Alias::new(r.parent_pk))
            .from(Alias::new(r.parent_table))
            .and_where(Expr::col(Alias::new(r.parent_key)).eq(key))
            .to_owned();
        Expr::SubQuery(None, Box::new(SubQueryStatement::SelectStatement(select)))
    };
    let columns: Vec<E::Column> = match rows.first() {
        Some(first) => E::Column::iter()
            .filter(|c| !first.is_not_set(*c))
            .collect(),
        None => Vec::new(),
    };
    let mut insert = Query::insert();
    insert.into_table(E::default().table_ref());
    insert.columns(columns.iter().copied());
    for (mut row, keys) in rows.into_iter().zip(parents) {
        let values = columns.iter().map(|column| {
            let referenced = refs
                .iter()
                .zip(keys)
                .find(|(r, _)| r.column == column.as_str());
            match referenced {
                Some((r, Some(key))) => parent_id(r, *key),
                _ => {
                    let value = row
                        .take(*column)
                        .into_value()
                        .unwrap_or(sea_orm::Value::Bool(None));
                    column.save_as(Expr::val(value))
                }
            }
        });
        insert.values_panic(values.collect::<Vec<_>>());
    }
    insert.on_conflict(on_conflict);
    let checks = refs
        .iter()
        .enumerate()
        .filter_map(|(i, r)| {
            let keys: std::collections::BTreeSet<uuid::Uuid> =
                parents.iter().filter_map(|p| p[i]).collect();
            if keys.is_empty() {
                return None;
            }
            let count = Query::select()
                .expr(Expr::col(Alias::new(r.parent_key)).count())
                .from(Alias::new(r.parent_table))
                .and_where(Expr::col(Alias::new(r.parent_key)).is_in(keys.iter().copied()))
                .to_owned();
            let listed: Vec<String> = keys.iter().map(ToString::to_string).collect();
            Some(Step::Require {
                count: backend.build(&count),
                expected: keys.len() as i64,
                missing: format!(
                    "a `{}` record refers through `{}` to a `{}` record this device does not \
                     have (one of {}): its entry comes after the referenced record's in the \
                     log, so that record was set aside here (see `Library::parked`) or never \
                     stored; retry once it is, or drop the entry",
                    E::SYNC_ID,
                    r.field,
                    r.parent,
                    listed.join(", ")
                ),
            })
        })
        .collect();
    (checks, backend.build(&insert))
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
        statement.execute(txn).await.map_err(|e| (last, e.into()))?;
    }
    Ok(())
}

async fn rows_of<E: Syncable, C: ConnectionTrait>(
    db: &C,
    refs: &[ForeignRef],
) -> Result<ModelRows, DbErr> {
    let mut rows = Vec::new();
    let mut known = HashMap::new();
    for model in E::find().all(db).await? {
        if !E::should_sync(&model) {
            continue;
        }
        let mut fields = crate::canonical::sync_json::<E>(&model).map_err(|e| {
            DbErr::Json(format!(
                "cannot serialise synced fields of `{}`: {e}",
                E::SYNC_ID
            ))
        })?;
        references_out(db, refs, &mut fields, &mut known).await?;
        rows.push((E::record_key(&model), fields));
    }
    rows.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(rows)
}

/// Replaces, in a record's synced fields, each reference's local primary key by the
/// referenced record's sync key (per `refs`): what the log holds. `known` keeps the keys
/// looked up so far.
pub(crate) async fn references_out<C: ConnectionTrait>(
    db: &C,
    refs: &[ForeignRef],
    fields: &mut Fields,
    known: &mut HashMap<(&'static str, String), String>,
) -> Result<(), DbErr> {
    use sea_orm::sea_query::{Alias, Expr, ExprTrait, Query};
    for r in refs {
        let Some(value) = fields.get_mut(r.field) else {
            continue;
        };
        if serde_json::Value::is_null(value) {
            continue;
        }
        let local = value.to_string();
        if let Some(key) = known.get(&(r.parent_table, local.clone())) {
            *value = serde_json::Value::String(key.clone());
            continue;
        }
        let Some(id) = value.as_i64() else {
            return Err(DbErr::Custom(format!(
                "field `{}` refers to a `{}` record and holds {value}, not an integer key",
                r.field, r.parent
            )));
        };
        let select = Query::select()
            .column(Alias::new(r.parent_key))
            .from(Alias::new(r.parent_table))
            .and_where(Expr::col(Alias::new(r.parent_pk)).eq(id))
            .to_owned();
        let backend = db.get_database_backend();
        let found = db.query_one_raw(backend.build(&select)).await?;
        let key = match found {
            Some(row) => row.try_get_by_index::<Option<uuid::Uuid>>(0)?,
            None => {
                return Err(DbErr::Custom(format!(
                    "field `{}` refers to `{}` record {id}, which does not exist: {}",
                    r.field,
                    r.parent,
                    crate::error::MISSING_REFERENCE
                )));
            }
        };
        let Some(key) = key else {
            return Err(DbErr::Custom(format!(
                "`{}` record {id} has no sync key (`{}` is NULL), and {}: fill it (see \
                 `sync_migrations::add_sync_key`) before syncing records that refer to it",
                r.parent,
                r.parent_key,
                crate::error::MISSING_REFERENCE
            )));
        };
        let key = key.to_string();
        known.insert((r.parent_table, local), key.clone());
        *value = serde_json::Value::String(key);
    }
    Ok(())
}

/// The reverse of `references_out`: each reference's sync key back to this device's local
/// primary key of the referenced record. A referenced record that is missing is an error.
pub(crate) async fn references_in<C: ConnectionTrait>(
    db: &C,
    model: &str,
    refs: &[ForeignRef],
    fields: &mut Fields,
) -> Result<(), ApplyFailure> {
    use sea_orm::sea_query::{Alias, Expr, ExprTrait, Query};
    let parents = take_references(refs, fields).map_err(ApplyFailure::BadPayload)?;
    for (r, key) in refs.iter().zip(parents) {
        let Some(key) = key else {
            continue;
        };
        let select = Query::select()
            .column(Alias::new(r.parent_pk))
            .from(Alias::new(r.parent_table))
            .and_where(Expr::col(Alias::new(r.parent_key)).eq(key))
            .to_owned();
        let backend = db.get_database_backend();
        let Some(row) = db.query_one_raw(backend.build(&select)).await? else {
            return Err(ApplyFailure::Db(DbErr::RecordNotFound(format!(
                "a `{model}` record refers through `{}` to `{}` record {key}, which this \
                 device does not have",
                r.field, r.parent
            ))));
        };
        let id: i64 = row.try_get_by_index(0)?;
        fields.insert(r.field.to_owned(), serde_json::Value::from(id));
    }
    Ok(())
}

/// The app's synced models, by sync id. Build it once at start-up and hand it to `Library`.
#[derive(Clone, Default)]
pub struct Registry {
    models: BTreeMap<&'static str, Arc<dyn ModelOps>>,
    /// Synced models by table name: the tables a `SyncTransaction` guards.
    tables: BTreeMap<&'static str, &'static str>,
    /// By parent model: the synced models whose rows the database deletes or nulls when a
    /// row of it is deleted (found by `resolved`; see `cascade.rs`).
    dependents: BTreeMap<&'static str, Vec<crate::cascade::Dependent>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.models.keys()).finish()
    }
}

/// Two models claim the same sync id, or a model claims one reserved for sync-core (ids
/// starting `sync.`).
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "the sync id `{0}` is taken (by another registered model, or reserved for sync-core's own \
     entries when it starts `sync.`): give the model `#[sync(id = \"...\")]`"
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
        // Ids starting `sync.` are sync-core's own log entries (membership, move records).
        if self.models.contains_key(E::SYNC_ID) || crate::leadership::is_reserved_model(E::SYNC_ID)
        {
            return Err(DuplicateSyncId(E::SYNC_ID));
        }
        self.models.insert(E::SYNC_ID, Arc::new(Typed::<E>::new()));
        if E::ENABLED {
            self.tables
                .insert(crate::capture::table_of::<E>(), E::SYNC_ID);
        }
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
        self.tables.insert(
            crate::capture::table_of::<crate::tables::conflict::Entity>(),
            conflict,
        );
        self
    }

    /// With each model's references to models with a sync key found (through SeaORM's
    /// relations), so that they travel as sync keys. `Library` calls it when it opens.
    pub(crate) fn resolved(mut self) -> Registry {
        let parents: Vec<(&'static str, &'static str, &'static str, &'static str)> = self
            .models
            .values()
            .filter(|m| m.enabled())
            .filter_map(|m| {
                Some((
                    m.sync_id(),
                    m.table_name(),
                    m.pk_column()?,
                    m.local_key_column()?,
                ))
            })
            .collect();
        for ops in self.models.values_mut() {
            if !ops.enabled() {
                continue;
            }
            let refs: Vec<ForeignRef> = ops
                .belongs_to()
                .into_iter()
                .filter_map(|(column, table, to)| {
                    let field = ops
                        .fields()
                        .iter()
                        .find(|f| f.synced && f.column == column)?;
                    let &(parent, parent_table, parent_pk, parent_key) = parents
                        .iter()
                        .find(|(_, t, pk, _)| *t == table && *pk == to)?;
                    Some(ForeignRef {
                        field: field.name,
                        column: field.column,
                        parent,
                        parent_table,
                        parent_pk,
                        parent_key,
                    })
                })
                .collect();
            if !refs.is_empty() || !ops.references().is_empty() {
                *ops = ops.with_references(refs);
            }
        }
        self.dependents = crate::cascade::dependents(&self);
        self
    }

    /// The models whose rows reference `parent`'s with `ON DELETE CASCADE` or `SET NULL`.
    pub(crate) fn dependents(&self, parent: &str) -> &[crate::cascade::Dependent] {
        self.dependents.get(parent).map_or(&[], Vec::as_slice)
    }

    /// The references of a model (see `resolved`).
    pub(crate) fn references(&self, sync_id: &str) -> &[ForeignRef] {
        self.get(sync_id).map_or(&[], |m| m.references())
    }

    /// The sync id of the synced model stored in `table`, if any.
    pub(crate) fn model_of_table(&self, table: &str) -> Option<&'static str> {
        self.tables.get(table).copied()
    }

    pub(crate) fn get(&self, sync_id: &str) -> Option<&Arc<dyn ModelOps>> {
        self.models.get(sync_id).filter(|m| m.enabled())
    }

    pub(crate) fn iter_synced(&self) -> impl Iterator<Item = &Arc<dyn ModelOps>> {
        self.models.values().filter(|m| m.enabled())
    }
}
