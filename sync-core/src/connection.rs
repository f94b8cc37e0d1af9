//! The connection handle an app writes through with plain SeaORM calls.
//!
//! `Library::connection` hands out a `SyncConnection`: it implements SeaORM's
//! `ConnectionTrait` and `TransactionTrait`, so an app keeps it where it kept its
//! `DatabaseConnection` and writes as usual. Reads pass straight through.
//!
//! - `conn.begin()` / `conn.transaction(…)` give a `SyncTransaction`: a write transaction
//!   (SQLite: `BEGIN IMMEDIATE`) that owns a capture scope. The hooks of synced models
//!   record into it, and its `commit` appends the entries in the same database transaction,
//!   exactly like `Library::transaction` (which hands out a `SyncTransaction` too). A
//!   nested `begin()` is a savepoint: rolling it back drops the entries recorded since.
//! - A lone `model.insert(&conn)` (`update`, `save`, `delete`): the model's `before_*` hook
//!   arms the write for the current task; the handle runs the one statement that follows
//!   in a write transaction of its own, reads the row back (`capture::reload`), appends the
//!   entry and commits — all inside that one statement call, so nothing is left open when
//!   the caller's future is dropped or the statement fails.
//! - The guard: every statement of a `SyncTransaction` (and of the handle) is looked at
//!   (`written_tables`). A write to a synced table that no hook armed (SeaORM's
//!   `Entity::insert_many(..).exec`, `update_many`, `delete_many`, `delete_by_id`, raw
//!   SQL) is refused with an error naming the table and the sync-aware call to use, before
//!   it reaches the database. `SyncTransaction::insert_many`, `update_many` and
//!   `delete_many` are those calls: they record exactly the rows they change.
//!
//! How a hook finds its scope without knowing the connection's type (hooks are generic
//! over `C: ConnectionTrait`, not `'static`, and sync-core forbids `unsafe`): it asks the
//! connection (`probe`). The handle's types answer the probe statement without touching
//! the database, through a thread-local that the hook reads in the same poll; any other
//! connection is refused, as before (its type's name already rules it out, so it is
//! not asked; were it asked, it would run a `SELECT 1` and give no answer).

use std::cell::RefCell;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use sea_orm::{
    AccessMode, ActiveModelBehavior, ActiveModelTrait, ColumnTrait, Condition, ConnectionTrait,
    DatabaseTransaction, DbBackend, DbErr, EntityTrait, ExecResult, IntoActiveModel,
    IsolationLevel, Iterable, ModelTrait, PrimaryKeyToColumn, QueryFilter, QueryResult,
    QuerySelect, SqliteTransactionMode, Statement, TransactionError, TransactionOptions,
    TransactionSession, TransactionTrait, Value,
};

use crate::capture::{CaptureScope, CapturedChange, ReloadFn, Target};
use crate::entry::ChangeOp;
use crate::{Library, Syncable};

/// Rows per `… WHERE key IN (…)` statement of the bulk writes.
const BULK_KEYS_MAX: usize = 500;

/// The statement a hook sends to ask a connection which capture scope it belongs to.
const PROBE_SQL: &str = "SELECT 1 /* sync-core: which capture scope? */";
/// The answer of the handle's types (an error, so that no caller mistakes it for a result).
const PROBE_ANSWER: &str = "sync-core: capture scope probe answered";

thread_local! {
    /// Set by a handle answering a probe, read by the hook in the same poll.
    static PROBED: RefCell<Option<Target>> = const { RefCell::new(None) };
}

/// Asks `db` which capture scope it writes into: `Some` for the handle's types, `None` for
/// any other connection.
pub(crate) async fn probe<C: ConnectionTrait>(db: &C) -> Option<Target> {
    // Only the handle's types can answer: spare other connections the round trip (and a
    // wait for a pooled connection) before their hook is refused. The type's name only
    // narrows the probe; the answer below is what decides.
    let name = std::any::type_name::<C>();
    if !(name.contains("SyncTransaction") || name.contains("SyncConnection")) {
        return None;
    }
    PROBED.with(|p| p.borrow_mut().take());
    let answer = db.execute_unprepared(PROBE_SQL).await;
    // The handle answers without awaiting anything, so its answer was set on this thread
    // during this poll; another connection set nothing.
    let target = PROBED.with(|p| p.borrow_mut().take());
    match answer {
        Err(DbErr::Custom(message)) if message == PROBE_ANSWER => target,
        _ => None,
    }
}

fn answer_probe(target: Target) -> DbErr {
    PROBED.with(|p| *p.borrow_mut() = Some(target));
    DbErr::Custom(PROBE_ANSWER.to_owned())
}

/// What a lone write on the handle is.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(crate) enum LoneKind {
    Insert,
    Update,
    Delete,
}

/// A write a hook armed on the handle, for the task's next write statement.
pub(crate) struct LoneWrite {
    pub(crate) table: &'static str,
    pub(crate) model: &'static str,
    pub(crate) key: String,
    pub(crate) changed: Vec<&'static str>,
    pub(crate) schema_version: u32,
    pub(crate) reload: ReloadFn,
    pub(crate) kind: LoneKind,
}

/// The task (or, outside a tokio task, the thread) a lone write belongs to.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
enum TaskKey {
    Task(tokio::task::Id),
    Thread(std::thread::ThreadId),
}

fn current_task() -> TaskKey {
    match tokio::task::try_id() {
        Some(id) => TaskKey::Task(id),
        None => TaskKey::Thread(std::thread::current().id()),
    }
}

/// What a handle and its transactions share.
pub(crate) struct Shared {
    pub(crate) library: Library,
    /// Lone writes armed by a hook, by task.
    lone: Mutex<HashMap<TaskKey, LoneWrite>>,
}

impl Shared {
    fn new(library: Library) -> Arc<Shared> {
        Arc::new(Shared {
            library,
            lone: Mutex::new(HashMap::new()),
        })
    }

    fn lone(&self) -> std::sync::MutexGuard<'_, HashMap<TaskKey, LoneWrite>> {
        // The map holds no invariant a panic could break half-way.
        self.lone.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Arms `write` for the current task's next write statement, replacing one left over by
    /// a write whose future was dropped.
    pub(crate) fn arm_lone(&self, write: LoneWrite) {
        self.lone().insert(current_task(), write);
    }

    /// Forgets the current task's armed write (its hook sequence ended).
    pub(crate) fn disarm_lone(&self) {
        self.lone().remove(&current_task());
    }

    fn take_lone(&self) -> Option<LoneWrite> {
        self.lone().remove(&current_task())
    }
}

/// The library's connection handle: keep it where the app kept its `DatabaseConnection`.
/// Cheap to clone.
///
/// Reads pass through. Writes to synced models through it (`model.insert(&conn)`, …) are
/// recorded, each committed with its log entry; `conn.begin()` and `conn.transaction(…)`
/// give a [`SyncTransaction`] whose writes commit with their entries together.
#[derive(Clone)]
pub struct SyncConnection {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for SyncConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncConnection")
            .field("library", &self.shared.library.id())
            .finish()
    }
}

impl Library {
    /// A connection handle whose writes to synced models are recorded (see
    /// [`SyncConnection`]): the recommended way to write.
    ///
    /// ```no_run
    /// # use sea_orm::{ActiveModelTrait, DbErr, TransactionTrait, TransactionSession};
    /// # async fn example(library: &sync_core::Library) -> Result<(), DbErr> {
    /// let conn = library.connection();
    /// // e.g. tag::ActiveModel { name: Set("holiday".into()), ..Default::default() }.insert(&conn).await?;
    /// let txn = conn.begin().await?;
    /// // … writes through &txn …
    /// txn.commit().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn connection(&self) -> SyncConnection {
        SyncConnection {
            shared: Shared::new(self.clone()),
        }
    }
}

/// A statement, by the `ConnectionTrait` method that runs it.
enum Stmt {
    Exec(Statement),
    One(Statement),
    All(Statement),
}

enum Out {
    Exec(ExecResult),
    One(Option<QueryResult>),
    All(Vec<QueryResult>),
}

impl Stmt {
    fn sql(&self) -> &str {
        match self {
            Stmt::Exec(s) | Stmt::One(s) | Stmt::All(s) => &s.sql,
        }
    }

    async fn run_on<C: ConnectionTrait>(self, db: &C) -> Result<Out, DbErr> {
        Ok(match self {
            Stmt::Exec(s) => Out::Exec(db.execute_raw(s).await?),
            Stmt::One(s) => Out::One(db.query_one_raw(s).await?),
            Stmt::All(s) => Out::All(db.query_all_raw(s).await?),
        })
    }
}

impl Out {
    /// Whether the statement touched a row.
    fn touched(&self) -> bool {
        match self {
            Out::Exec(r) => r.rows_affected() > 0,
            Out::One(r) => r.is_some(),
            Out::All(r) => !r.is_empty(),
        }
    }
}

fn mismatch() -> DbErr {
    DbErr::Custom("internal: a statement's result came back as another kind".into())
}

/// The refusal of a write statement no hook armed, naming the table and what to use.
fn refused_write(model: &str, table: &str, raw: bool) -> DbErr {
    let path = if raw {
        "raw SQL"
    } else {
        "a statement that runs no sync hooks (SeaORM's `Entity::insert_many(..).exec`, \
         `update_many`, `delete_many`, `delete_by_id`, or a raw statement)"
    };
    DbErr::Custom(format!(
        "{}{path} writes to table `{table}` of synced model `{model}`, and would not be \
         recorded in the sync log. Use the model's `insert`/`update`/`save`/`delete`, or the \
         sync-aware `SyncTransaction::insert_many` / `update_many` / `delete_many`; for a \
         deliberately local write, `Library::unrecorded`",
        crate::error::UNRECORDED
    ))
}

/// The tables a statement writes to (`INSERT INTO`, `REPLACE INTO`, `UPDATE`, `DELETE
/// FROM`, `TRUNCATE`), unquoted (`"t"`, `` `t` ``, `[t]`), the last part of a qualified
/// name. `ON CONFLICT … DO UPDATE`, `ON DUPLICATE KEY UPDATE` and `ON DELETE/UPDATE`
/// clauses name no target. Literals and comments are skipped.
pub(crate) fn written_tables(sql: &str) -> Vec<String> {
    #[derive(PartialEq)]
    enum Tok {
        Word(String),
        Quoted(String),
        Dot,
        Other,
    }
    let mut toks = Vec::new();
    let chars: Vec<char> = sql.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if c == '-' && chars.get(i + 1) == Some(&'-') {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && chars.get(i + 1) == Some(&'*') {
            i += 2;
            while i < chars.len() && !(chars[i] == '*' && chars.get(i + 1) == Some(&'/')) {
                i += 1;
            }
            i += 2;
        } else if c == '\'' {
            i += 1;
            while i < chars.len() {
                if chars[i] == '\'' {
                    if chars.get(i + 1) == Some(&'\'') {
                        i += 2;
                        continue;
                    }
                    break;
                }
                if chars[i] == '\\' {
                    i += 1;
                }
                i += 1;
            }
            i += 1;
            toks.push(Tok::Other);
        } else if c == '"' || c == '`' || c == '[' {
            let close = if c == '[' { ']' } else { c };
            let mut name = String::new();
            i += 1;
            while i < chars.len() {
                if chars[i] == close {
                    if chars.get(i + 1) == Some(&close) && close != ']' {
                        name.push(close);
                        i += 2;
                        continue;
                    }
                    break;
                }
                name.push(chars[i]);
                i += 1;
            }
            i += 1;
            toks.push(Tok::Quoted(name));
        } else if c.is_alphanumeric() || c == '_' || c == '$' {
            let mut word = String::new();
            while i < chars.len()
                && (chars[i].is_alphanumeric() || chars[i] == '_' || chars[i] == '$')
            {
                word.push(chars[i]);
                i += 1;
            }
            toks.push(Tok::Word(word));
        } else if c == '.' {
            toks.push(Tok::Dot);
            i += 1;
        } else {
            toks.push(Tok::Other);
            i += 1;
        }
    }
    let keyword =
        |t: Option<&Tok>, k: &str| matches!(t, Some(Tok::Word(w)) if w.eq_ignore_ascii_case(k));
    let mut tables = Vec::new();
    for at in 0..toks.len() {
        let Tok::Word(word) = &toks[at] else { continue };
        let word = word.to_ascii_uppercase();
        let skip: &[&str] = match word.as_str() {
            "INSERT" | "REPLACE" => &[
                "OR",
                "REPLACE",
                "IGNORE",
                "ROLLBACK",
                "ABORT",
                "FAIL",
                "LOW_PRIORITY",
                "DELAYED",
                "HIGH_PRIORITY",
                "INTO",
            ],
            "UPDATE" => &[
                "OR",
                "REPLACE",
                "IGNORE",
                "ROLLBACK",
                "ABORT",
                "FAIL",
                "LOW_PRIORITY",
                "ONLY",
            ],
            "DELETE" => &["LOW_PRIORITY", "QUICK", "IGNORE", "FROM", "ONLY"],
            "TRUNCATE" => &["TABLE", "ONLY"],
            _ => continue,
        };
        let before = at.checked_sub(1).map(|b| &toks[b]);
        if keyword(before, "ON")
            || keyword(before, "DO")
            || keyword(before, "KEY")
            || keyword(before, "OR")
        {
            continue;
        }
        let mut next = at + 1;
        while let Some(Tok::Word(w)) = toks.get(next) {
            if skip.iter().any(|s| w.eq_ignore_ascii_case(s)) {
                next += 1;
            } else {
                break;
            }
        }
        let mut name = None;
        loop {
            match toks.get(next) {
                Some(Tok::Word(w)) if name.is_none() || toks.get(next - 1) == Some(&Tok::Dot) => {
                    if w.eq_ignore_ascii_case("SET") && name.is_none() {
                        break;
                    }
                    name = Some(w.clone());
                }
                Some(Tok::Quoted(w)) if name.is_none() || toks.get(next - 1) == Some(&Tok::Dot) => {
                    name = Some(w.clone());
                }
                Some(Tok::Dot) if name.is_some() => {}
                _ => break,
            }
            next += 1;
        }
        if let Some(name) = name {
            tables.push(name);
        }
    }
    tables
}

/// The synced models a statement writes to, with the table as written.
fn synced_writes(library: &Library, sql: &str) -> Vec<(&'static str, String)> {
    // Cheap test first: most statements are single reads.
    let head = sql.trim_start();
    let select = head.len() >= 6 && head[..6].eq_ignore_ascii_case("SELECT");
    if select && !sql.contains(';') {
        return Vec::new();
    }
    written_tables(sql)
        .into_iter()
        .filter_map(|table| {
            let model = library
                .registry
                .model_of_table(&table)
                .or_else(|| library.registry.model_of_table(&table.to_ascii_lowercase()))?;
            Some((model, table))
        })
        .collect()
}

/// `DELETE FROM t …` as the `SELECT * FROM t …` that reads the rows it would delete,
/// locking them where the backend has row locks; `None` for any other statement, and for a
/// `DELETE` whose form it does not know (`RETURNING`, `USING`, several tables).
fn select_of_delete(stmt: &Statement) -> Option<Statement> {
    let sql = stmt.sql.trim_start();
    let rest = sql
        .get(..11)
        .filter(|head| head.eq_ignore_ascii_case("DELETE FROM"))
        .map(|_| &sql[11..])?;
    let upper = rest.to_ascii_uppercase();
    if [" RETURNING ", " USING ", ";"]
        .iter()
        .any(|word| upper.contains(word))
    {
        return None;
    }
    let mut select = format!("SELECT * FROM{rest}");
    if stmt.db_backend != DbBackend::Sqlite {
        select.push_str(" FOR UPDATE");
    }
    Some(Statement {
        sql: select,
        values: stmt.values.clone(),
        db_backend: stmt.db_backend,
    })
}

/// The synced model a plain `DELETE` statement removes rows of, if it is one the handle can
/// capture (see `captured_delete`).
fn plain_delete(library: &Library, stmt: &Statement) -> Option<&'static str> {
    let writes = synced_writes(library, &stmt.sql);
    match writes.as_slice() {
        [(model, _)] if select_of_delete(stmt).is_some() => Some(*model),
        _ => None,
    }
}

/// Runs a plain `DELETE` of synced model `model` (SeaORM's `delete_many().exec`,
/// `delete_by_id`) in `txn`, and returns it with a delete for every row it removed whose
/// filter lets it sync. The rows are read first, with the statement's own condition (and
/// row locks where the backend has them); if the `DELETE` then removes another number of
/// rows (a row inserted between the two on PostgreSQL), it is undone and refused, so no row
/// is ever deleted without its entry.
async fn captured_delete(
    library: &Library,
    txn: &DatabaseTransaction,
    model: &'static str,
    stmt: Statement,
) -> Result<(ExecResult, Vec<CapturedChange>), DbErr> {
    crate::roles::refuse_read_access(library.context.read_only, library.context.library_id, model)?;
    let ops = library
        .registry
        .get(model)
        .cloned()
        .ok_or_else(|| DbErr::Custom(format!("`{model}` is not a synced model of this app")))?;
    let Some(select) = select_of_delete(&stmt) else {
        return Err(refused_write(model, model, false));
    };
    let savepoint = txn.begin().await?;
    let rows = ops.keys_where(&savepoint, select).await?;
    let read = rows.len() as u64;
    let mut changes = crate::cascade::on_delete(
        &savepoint,
        &library.context,
        model,
        rows.iter().map(|(key, _)| key.clone()).collect(),
    )
    .await?;
    let result = savepoint.execute_raw(stmt).await?;
    if result.rows_affected() != read {
        savepoint.rollback().await?;
        return Err(DbErr::Custom(format!(
            "a `DELETE` of synced model `{model}` would remove {} rows where {read} were read \
             just before it (another transaction inserted one meanwhile): nothing was \
             deleted; run it again",
            result.rows_affected()
        )));
    }
    savepoint.commit().await?;
    changes.extend(
        rows.into_iter()
            .filter(|(_, syncs)| *syncs)
            .map(|(key, _)| {
                CapturedChange::delete(
                    model,
                    key,
                    library.context.clock.now(),
                    ops.schema_version(),
                    None,
                )
            }),
    );
    Ok((result, changes))
}

impl SyncConnection {
    fn library(&self) -> &Library {
        &self.shared.library
    }

    async fn route(&self, stmt: Stmt) -> Result<Out, DbErr> {
        let writes = synced_writes(self.library(), stmt.sql());
        if writes.is_empty() {
            return stmt.run_on(&self.library().db).await;
        }
        match self.shared.take_lone() {
            Some(write) if writes.len() == 1 && writes[0].1 == write.table => {
                self.lone_write(write, stmt).await
            }
            _ => match stmt {
                Stmt::Exec(stmt) if plain_delete(self.library(), &stmt).is_some() => {
                    self.lone_delete(writes[0].0, stmt).await.map(Out::Exec)
                }
                _ => Err(refused_write(writes[0].0, &writes[0].1, false)),
            },
        }
    }

    /// A plain `DELETE` of a synced model's rows on the handle: run with its entries in a
    /// write transaction of its own (`captured_delete`).
    async fn lone_delete(&self, model: &'static str, stmt: Statement) -> Result<ExecResult, DbErr> {
        let library = self.library();
        let txn = crate::library::begin_write(&library.db).await?;
        match captured_delete(library, &txn, model, stmt).await {
            Ok((result, changes)) => {
                library.commit_changes(txn, changes).await?;
                Ok(result)
            }
            Err(e) => {
                if let Err(rollback) = txn.rollback().await {
                    tracing::warn!(%rollback, "rollback after a failed delete failed");
                }
                Err(e)
            }
        }
    }

    /// Runs the one statement of a lone write in a write transaction with its entry.
    async fn lone_write(&self, write: LoneWrite, stmt: Stmt) -> Result<Out, DbErr> {
        let library = self.library();
        let txn = crate::library::begin_write(&library.db).await?;
        let outcome = async {
            let (existed, cascade) = match write.kind {
                LoneKind::Delete => (
                    (write.reload)(&txn, &library.context, &write.key)
                        .await?
                        .is_some(),
                    crate::cascade::on_delete(
                        &txn,
                        &library.context,
                        write.model,
                        vec![write.key.clone()],
                    )
                    .await?,
                ),
                _ => (false, Vec::new()),
            };
            let out = stmt.run_on(&txn).await?;
            // One model's write touches one row. More means the armed write was not this
            // statement (a hook whose write never ran, then a bulk statement): refused.
            let rows = match &out {
                Out::Exec(r) => r.rows_affected(),
                Out::One(r) => u64::from(r.is_some()),
                Out::All(r) => r.len() as u64,
            };
            if rows > 1 {
                return Err(refused_write(write.model, write.table, false));
            }
            let hlc = || library.context.clock.now();
            let change = if !out.touched() {
                None
            } else if write.kind == LoneKind::Delete {
                existed.then(|| {
                    CapturedChange::delete(
                        write.model,
                        write.key.clone(),
                        hlc(),
                        write.schema_version,
                        None,
                    )
                })
            } else {
                match (write.reload)(&txn, &self.shared.library.context, &write.key).await? {
                    Some(data) => {
                        let changed = write.changed.clone();
                        (!changed.is_empty()).then(|| CapturedChange {
                            model: write.model,
                            record_id: write.key.clone(),
                            op: ChangeOp::Upsert,
                            data: Some(data),
                            changed,
                            hlc: hlc(),
                            schema_version: write.schema_version,
                            author: None,
                        })
                    }
                    // Filtered out: an update that turned the filter false leaves the
                    // other devices (as `after_save` records); an insert stays local.
                    None if write.kind == LoneKind::Update => Some(CapturedChange::delete(
                        write.model,
                        write.key.clone(),
                        hlc(),
                        write.schema_version,
                        None,
                    )),
                    None => None,
                }
            };
            Ok::<_, DbErr>((out, cascade.into_iter().chain(change).collect()))
        }
        .await;
        match outcome {
            Ok((out, changes)) => {
                library.commit_changes(txn, changes).await?;
                Ok(out)
            }
            Err(e) => {
                if let Err(rollback) = txn.rollback().await {
                    tracing::warn!(%rollback, "rollback after a failed lone write failed");
                }
                Err(e)
            }
        }
    }

    /// Inserts `models` (through their hooks) in one transaction with their entries.
    pub async fn insert_many<A>(
        &self,
        models: impl IntoIterator<Item = A> + Send,
    ) -> Result<Vec<<A::Entity as EntityTrait>::Model>, DbErr>
    where
        A: ActiveModelTrait + ActiveModelBehavior + Send,
        A::Entity: Syncable,
        <A::Entity as EntityTrait>::Model: IntoActiveModel<A>,
    {
        let txn = self.begin().await?;
        let inserted = txn.insert_many(models).await?;
        txn.commit().await?;
        Ok(inserted)
    }

    /// Updates the rows of `E` matching `filter` with `values`, recorded; see
    /// [`SyncTransaction::update_many`].
    pub async fn update_many<E: Syncable>(
        &self,
        values: E::ActiveModel,
        filter: Condition,
    ) -> Result<u64, DbErr>
    where
        E::ActiveModel: Send,
    {
        let txn = self.begin().await?;
        let updated = txn.update_many::<E>(values, filter).await?;
        txn.commit().await?;
        Ok(updated)
    }

    /// Deletes the rows of `E` matching `filter`, recorded; see
    /// [`SyncTransaction::delete_many`].
    pub async fn delete_many<E: Syncable>(&self, filter: Condition) -> Result<u64, DbErr> {
        let txn = self.begin().await?;
        let deleted = txn.delete_many::<E>(filter).await?;
        txn.commit().await?;
        Ok(deleted)
    }
}

#[async_trait::async_trait]
impl ConnectionTrait for SyncConnection {
    fn get_database_backend(&self) -> DbBackend {
        self.library().db.get_database_backend()
    }

    async fn execute_raw(&self, stmt: Statement) -> Result<ExecResult, DbErr> {
        match self.route(Stmt::Exec(stmt)).await? {
            Out::Exec(r) => Ok(r),
            _ => Err(mismatch()),
        }
    }

    async fn execute_unprepared(&self, sql: &str) -> Result<ExecResult, DbErr> {
        if sql == PROBE_SQL {
            return Err(answer_probe(Target::Lone(Arc::clone(&self.shared))));
        }
        if let Some((model, table)) = synced_writes(self.library(), sql).into_iter().next() {
            return Err(refused_write(model, &table, true));
        }
        self.library().db.execute_unprepared(sql).await
    }

    async fn query_one_raw(&self, stmt: Statement) -> Result<Option<QueryResult>, DbErr> {
        match self.route(Stmt::One(stmt)).await? {
            Out::One(r) => Ok(r),
            _ => Err(mismatch()),
        }
    }

    async fn query_all_raw(&self, stmt: Statement) -> Result<Vec<QueryResult>, DbErr> {
        match self.route(Stmt::All(stmt)).await? {
            Out::All(r) => Ok(r),
            _ => Err(mismatch()),
        }
    }

    fn support_returning(&self) -> bool {
        self.library().db.support_returning()
    }
}

type Callback<'c, T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send + 'c>>;

/// Runs `callback` in `txn`, committing on `Ok` and rolling back on `Err`.
async fn run_callback<F, T, E>(txn: SyncTransaction, callback: F) -> Result<T, TransactionError<E>>
where
    F: for<'c> FnOnce(&'c SyncTransaction) -> Callback<'c, T, E> + Send,
    T: Send,
    E: std::fmt::Display + std::fmt::Debug + Send,
{
    match callback(&txn).await {
        Ok(value) => {
            txn.commit().await.map_err(TransactionError::Connection)?;
            Ok(value)
        }
        Err(e) => {
            txn.rollback().await.map_err(TransactionError::Connection)?;
            Err(TransactionError::Transaction(e))
        }
    }
}

/// A write transaction of the library: the hooks of synced models record into it, and its
/// `commit` appends their entries before the database commits, so a change and its entry
/// commit together or not at all. Dropped or rolled back, it leaves neither.
///
/// Nested `begin()` is a savepoint; rolling it back (or dropping it) forgets the entries
/// recorded since it began. Statements that write to a synced table without its hooks are
/// refused (see the module docs); use [`SyncTransaction::insert_many`], `update_many`,
/// `delete_many` for bulk writes.
///
/// It does not dereference to SeaORM's `DatabaseTransaction`: that would let any statement
/// pass the guard unseen (`txn.deref().execute(..)`, `&*txn`). Code that must have one asks
/// for it by name, [`SyncTransaction::unguarded`].
pub struct SyncTransaction {
    /// Boxed, so that its address (which `Library::transaction`'s task-local scope
    /// compares against) stays put when the handle moves.
    inner: Box<DatabaseTransaction>,
    scope: Arc<CaptureScope>,
    shared: Arc<Shared>,
    /// Set for a savepoint: its entries are forgotten unless it commits.
    savepoint: Option<Savepoint>,
}

impl std::fmt::Debug for SyncTransaction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncTransaction")
            .field("library", &self.shared.library.id())
            .field("savepoint", &self.savepoint.is_some())
            .finish()
    }
}

struct Savepoint {
    scope: Arc<CaptureScope>,
    mark: usize,
    open: bool,
}

impl Drop for Savepoint {
    fn drop(&mut self) {
        if self.open {
            self.scope.truncate(self.mark);
        }
    }
}

impl SyncTransaction {
    /// Begins a write transaction of `library` with a capture scope of its own.
    pub(crate) async fn begin_for(
        library: &Library,
        recording: bool,
    ) -> Result<SyncTransaction, DbErr> {
        SyncTransaction::begin_shared(Shared::new(library.clone()), recording, None).await
    }

    async fn begin_shared(
        shared: Arc<Shared>,
        recording: bool,
        options: Option<TransactionOptions>,
    ) -> Result<SyncTransaction, DbErr> {
        let inner = match options {
            None => crate::library::begin_write(&shared.library.db).await?,
            Some(mut options) => {
                options.sqlite_transaction_mode = Some(SqliteTransactionMode::Immediate);
                shared.library.db.begin_with_options(options).await?
            }
        };
        let inner = Box::new(inner);
        let scope = CaptureScope::new(Arc::clone(&shared.library.context), &inner, recording);
        Ok(SyncTransaction {
            inner,
            scope,
            shared,
            savepoint: None,
        })
    }

    /// The SeaORM transaction inside, without the guard: the escape hatch for code that
    /// must have a `&DatabaseTransaction`. Statements run on it are not checked: a write
    /// to a synced table that runs no hooks (`Entity::insert(..).exec`, `update_many`,
    /// `delete_many`, raw SQL) is not recorded and reaches no other device;
    /// `Library::audit` finds it on the leader and `Library::repair` records it. Hooked
    /// writes handed it (`model.insert(txn.unguarded())`) still record inside
    /// `Library::transaction` and are refused elsewhere. Prefer the `SyncTransaction`
    /// itself, which implements SeaORM's `ConnectionTrait`.
    pub fn unguarded(&self) -> &DatabaseTransaction {
        &self.inner
    }

    /// The capture scope (for `Library::run`, which installs it as the task-local too).
    pub(crate) fn scope(&self) -> Arc<CaptureScope> {
        Arc::clone(&self.scope)
    }

    /// The database transaction, for `Library::run` to append and commit.
    pub(crate) fn into_inner(self) -> Box<DatabaseTransaction> {
        self.inner
    }

    async fn nested(&self, options: Option<TransactionOptions>) -> Result<SyncTransaction, DbErr> {
        let inner = match options {
            None => self.inner.begin().await?,
            Some(options) => self.inner.begin_with_options(options).await?,
        };
        Ok(SyncTransaction {
            inner: Box::new(inner),
            scope: Arc::clone(&self.scope),
            shared: Arc::clone(&self.shared),
            savepoint: Some(Savepoint {
                scope: Arc::clone(&self.scope),
                mark: self.scope.mark(),
                open: true,
            }),
        })
    }

    /// Refuses anything that writes to a synced table without a hook having armed it.
    fn guard(&self, sql: &str, raw: bool) -> Result<(), DbErr> {
        if !self.scope.recording {
            return Ok(());
        }
        for (model, table) in synced_writes(&self.shared.library, sql) {
            if !raw && self.scope.take_armed(&table) {
                continue;
            }
            return Err(refused_write(model, &table, raw));
        }
        Ok(())
    }

    /// The scope, when it records; refused on a read-only follower.
    fn recording_scope<E: Syncable>(&self) -> Result<Option<&Arc<CaptureScope>>, DbErr> {
        if !self.scope.recording {
            return Ok(None);
        }
        let context = &self.scope.context;
        crate::roles::refuse_read_access(context.read_only, context.library_id, E::SYNC_ID)?;
        Ok(Some(&self.scope))
    }

    /// Inserts `models`, each through its hooks, recorded in this transaction.
    pub async fn insert_many<A>(
        &self,
        models: impl IntoIterator<Item = A> + Send,
    ) -> Result<Vec<<A::Entity as EntityTrait>::Model>, DbErr>
    where
        A: ActiveModelTrait + ActiveModelBehavior + Send,
        A::Entity: Syncable,
        <A::Entity as EntityTrait>::Model: IntoActiveModel<A>,
    {
        let mut inserted = Vec::new();
        for model in models {
            inserted.push(model.insert(self).await?);
        }
        Ok(inserted)
    }

    /// Sets `values` on every row of `E` matching `filter`, and records each changed row.
    /// The rows are selected first (locked where the backend has row locks), then updated
    /// by key and read back: a row that appears meanwhile is neither updated nor missed.
    /// Returns the number of rows updated.
    pub async fn update_many<E: Syncable>(
        &self,
        values: E::ActiveModel,
        filter: Condition,
    ) -> Result<u64, DbErr>
    where
        E::ActiveModel: Send,
    {
        let scope = self.recording_scope::<E>()?;
        if scope.is_some() {
            crate::limits::check_values::<E>(&values)?;
        }
        let key = key_column::<E>()?;
        let keys = self.locked_keys::<E>(key, filter).await?;
        let changed = E::set_fields(&values);
        let mut updated = 0;
        for chunk in keys.chunks(BULK_KEYS_MAX) {
            updated += E::update_many()
                .set(values.clone())
                .filter(key.is_in(chunk.iter().cloned()))
                .exec(&*self.inner)
                .await?
                .rows_affected;
            let Some(scope) = scope else { continue };
            if changed.is_empty() {
                continue;
            }
            let rows = E::find()
                .filter(key.is_in(chunk.iter().cloned()))
                .all(&*self.inner)
                .await?;
            for model in rows {
                let record_id = E::record_key(&model);
                let hlc = scope.context.clock.now();
                if E::should_sync(&model) {
                    scope.push(CapturedChange {
                        model: E::SYNC_ID,
                        record_id,
                        op: ChangeOp::Upsert,
                        data: Some(
                            crate::capture::synced_json::<E, _>(
                                &model,
                                &*self.inner,
                                &scope.context,
                            )
                            .await?,
                        ),
                        changed: changed.clone(),
                        hlc,
                        schema_version: E::SCHEMA_VERSION,
                        author: None,
                    });
                } else {
                    scope.push(CapturedChange::delete(
                        E::SYNC_ID,
                        record_id,
                        hlc,
                        E::SCHEMA_VERSION,
                        None,
                    ));
                }
            }
        }
        Ok(updated)
    }

    /// Deletes every row of `E` matching `filter`, and records each deleted row that
    /// synced. Returns the number of rows deleted.
    pub async fn delete_many<E: Syncable>(&self, filter: Condition) -> Result<u64, DbErr> {
        let scope = self.recording_scope::<E>()?;
        let key = key_column::<E>()?;
        let rows = E::find()
            .filter(filter)
            .lock_exclusive()
            .all(&*self.inner)
            .await?;
        let mut deleted = 0;
        for chunk in rows.chunks(BULK_KEYS_MAX) {
            if let Some(scope) = scope {
                // What the database's cascades will do, recorded before these deletes.
                let keys = chunk.iter().map(E::record_key).collect();
                for change in
                    crate::cascade::on_delete(&*self.inner, &scope.context, E::SYNC_ID, keys)
                        .await?
                {
                    scope.push(change);
                }
            }
            deleted += E::delete_many()
                .filter(key.is_in(chunk.iter().map(|m| m.get(key))))
                .exec(&*self.inner)
                .await?
                .rows_affected;
            let Some(scope) = scope else { continue };
            for model in chunk.iter().filter(|m| E::should_sync(m)) {
                scope.push(CapturedChange::delete(
                    E::SYNC_ID,
                    E::record_key(model),
                    scope.context.clock.now(),
                    E::SCHEMA_VERSION,
                    None,
                ));
            }
        }
        Ok(deleted)
    }

    /// The keys of the rows of `E` matching `filter`, locked where the backend can.
    async fn locked_keys<E: Syncable>(
        &self,
        key: E::Column,
        filter: Condition,
    ) -> Result<Vec<Value>, DbErr> {
        let rows = E::find()
            .filter(filter)
            .lock_exclusive()
            .all(&*self.inner)
            .await?;
        Ok(rows.iter().map(|m| m.get(key)).collect())
    }
}

/// The single key column of a synced model.
fn key_column<E: Syncable>() -> Result<E::Column, DbErr> {
    let mut keys = E::PrimaryKey::iter();
    match (keys.next(), keys.next()) {
        (Some(key), None) => Ok(key.into_column()),
        _ => Err(DbErr::Custom(format!(
            "synced model `{}` needs a single-column primary key for bulk writes",
            E::SYNC_ID
        ))),
    }
}

#[async_trait::async_trait]
impl ConnectionTrait for SyncTransaction {
    fn get_database_backend(&self) -> DbBackend {
        self.inner.get_database_backend()
    }

    async fn execute_raw(&self, stmt: Statement) -> Result<ExecResult, DbErr> {
        let refusal = match self.guard(&stmt.sql, false) {
            Ok(()) => return self.inner.execute_raw(stmt).await,
            Err(refusal) => refusal,
        };
        // A plain `DELETE` (SeaORM's `delete_many().exec`) is captured rather than refused.
        let library = &self.shared.library;
        match plain_delete(library, &stmt) {
            Some(model) => {
                let (result, changes) = captured_delete(library, &self.inner, model, stmt).await?;
                for change in changes {
                    self.scope.push(change);
                }
                Ok(result)
            }
            None => Err(refusal),
        }
    }

    async fn execute_unprepared(&self, sql: &str) -> Result<ExecResult, DbErr> {
        if sql == PROBE_SQL {
            return Err(answer_probe(Target::Scope(Arc::clone(&self.scope))));
        }
        self.guard(sql, true)?;
        self.inner.execute_unprepared(sql).await
    }

    async fn query_one_raw(&self, stmt: Statement) -> Result<Option<QueryResult>, DbErr> {
        self.guard(&stmt.sql, false)?;
        self.inner.query_one_raw(stmt).await
    }

    async fn query_all_raw(&self, stmt: Statement) -> Result<Vec<QueryResult>, DbErr> {
        self.guard(&stmt.sql, false)?;
        self.inner.query_all_raw(stmt).await
    }

    fn support_returning(&self) -> bool {
        self.inner.support_returning()
    }
}

#[async_trait::async_trait]
impl TransactionSession for SyncTransaction {
    /// Commits: a savepoint releases (its entries stay with the enclosing transaction); the
    /// outermost transaction appends its entries and commits them with its writes.
    async fn commit(self) -> Result<(), DbErr> {
        let SyncTransaction {
            inner,
            scope,
            shared,
            savepoint,
        } = self;
        match savepoint {
            Some(mut savepoint) => {
                inner.commit().await?;
                savepoint.open = false;
                Ok(())
            }
            None => {
                let changes = scope.drain(&inner).await?;
                shared.library.commit_changes(*inner, changes).await
            }
        }
    }

    /// Rolls back: the writes and their entries are gone.
    async fn rollback(self) -> Result<(), DbErr> {
        // The savepoint's mark, dropped with `self`, forgets its entries.
        self.inner.rollback().await
    }
}

#[async_trait::async_trait]
impl TransactionTrait for SyncTransaction {
    type Transaction = SyncTransaction;

    async fn begin(&self) -> Result<SyncTransaction, DbErr> {
        self.nested(None).await
    }

    async fn begin_with_config(
        &self,
        isolation_level: Option<IsolationLevel>,
        access_mode: Option<AccessMode>,
    ) -> Result<SyncTransaction, DbErr> {
        self.nested(Some(TransactionOptions {
            isolation_level,
            access_mode,
            ..TransactionOptions::default()
        }))
        .await
    }

    async fn begin_with_options(
        &self,
        options: TransactionOptions,
    ) -> Result<SyncTransaction, DbErr> {
        self.nested(Some(options)).await
    }

    async fn transaction<F, T, E>(&self, callback: F) -> Result<T, TransactionError<E>>
    where
        F: for<'c> FnOnce(&'c SyncTransaction) -> Callback<'c, T, E> + Send,
        T: Send,
        E: std::fmt::Display + std::fmt::Debug + Send,
    {
        let txn = self.begin().await.map_err(TransactionError::Connection)?;
        run_callback(txn, callback).await
    }

    async fn transaction_with_config<F, T, E>(
        &self,
        callback: F,
        isolation_level: Option<IsolationLevel>,
        access_mode: Option<AccessMode>,
    ) -> Result<T, TransactionError<E>>
    where
        F: for<'c> FnOnce(&'c SyncTransaction) -> Callback<'c, T, E> + Send,
        T: Send,
        E: std::fmt::Display + std::fmt::Debug + Send,
    {
        let txn = self
            .begin_with_config(isolation_level, access_mode)
            .await
            .map_err(TransactionError::Connection)?;
        run_callback(txn, callback).await
    }
}

#[async_trait::async_trait]
impl TransactionTrait for SyncConnection {
    type Transaction = SyncTransaction;

    async fn begin(&self) -> Result<SyncTransaction, DbErr> {
        SyncTransaction::begin_shared(Arc::clone(&self.shared), true, None).await
    }

    async fn begin_with_config(
        &self,
        isolation_level: Option<IsolationLevel>,
        access_mode: Option<AccessMode>,
    ) -> Result<SyncTransaction, DbErr> {
        let options = TransactionOptions {
            isolation_level,
            access_mode,
            ..TransactionOptions::default()
        };
        SyncTransaction::begin_shared(Arc::clone(&self.shared), true, Some(options)).await
    }

    async fn begin_with_options(
        &self,
        options: TransactionOptions,
    ) -> Result<SyncTransaction, DbErr> {
        SyncTransaction::begin_shared(Arc::clone(&self.shared), true, Some(options)).await
    }

    async fn transaction<F, T, E>(&self, callback: F) -> Result<T, TransactionError<E>>
    where
        F: for<'c> FnOnce(&'c SyncTransaction) -> Callback<'c, T, E> + Send,
        T: Send,
        E: std::fmt::Display + std::fmt::Debug + Send,
    {
        let txn = self.begin().await.map_err(TransactionError::Connection)?;
        run_callback(txn, callback).await
    }

    async fn transaction_with_config<F, T, E>(
        &self,
        callback: F,
        isolation_level: Option<IsolationLevel>,
        access_mode: Option<AccessMode>,
    ) -> Result<T, TransactionError<E>>
    where
        F: for<'c> FnOnce(&'c SyncTransaction) -> Callback<'c, T, E> + Send,
        T: Send,
        E: std::fmt::Display + std::fmt::Debug + Send,
    {
        let txn = self
            .begin_with_config(isolation_level, access_mode)
            .await
            .map_err(TransactionError::Connection)?;
        run_callback(txn, callback).await
    }
}

#[cfg(test)]
mod tests {
    use super::written_tables;

    #[test]
    fn finds_the_tables_statements_write() {
        assert_eq!(
            written_tables(r#"INSERT INTO "tag" ("id") VALUES ($1)"#),
            ["tag"]
        );
        assert_eq!(
            written_tables("insert into `tag` (`id`) values (?)"),
            ["tag"]
        );
        assert_eq!(
            written_tables(r#"UPDATE "public"."tag" SET "name" = $1 WHERE "id" = $2"#),
            ["tag"]
        );
        assert_eq!(
            written_tables(r#"DELETE FROM "tag" WHERE "id" = $1"#),
            ["tag"]
        );
        assert_eq!(written_tables("REPLACE INTO tag VALUES (1)"), ["tag"]);
        assert_eq!(
            written_tables("INSERT OR REPLACE INTO tag VALUES (1)"),
            ["tag"]
        );
        assert_eq!(
            written_tables(
                r#"INSERT INTO "a" ("id") VALUES ($1) ON CONFLICT ("id") DO UPDATE SET "x" = 1"#
            ),
            ["a"]
        );
        assert_eq!(
            written_tables("INSERT INTO a (id) VALUES (1) ON DUPLICATE KEY UPDATE tag = 1"),
            ["a"]
        );
        assert_eq!(
            written_tables("update tag set name = 'x'; delete from volume"),
            ["tag", "volume"]
        );
        assert!(
            written_tables(r#"SELECT "update" FROM "tag" WHERE name = 'delete from x'"#).is_empty()
        );
        assert!(written_tables("SELECT REPLACE(name, 'a', 'b') FROM tag").is_empty());
    }
}
