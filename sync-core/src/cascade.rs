//! Database cascades as log entries.
//!
//! A relation declared with `on_delete = "Cascade"` or `"SetNull"` lets the database delete,
//! or null the reference of, the rows that refer to a deleted row. The database does that
//! without running a hook, so left alone the log would never learn of it: the leader's
//! tables would disagree with its log (`audit` drift), and a device whose schema lacks the
//! foreign key, or that received a child after the parent's delete, would keep rows the
//! others lost.
//!
//! So every path that records a delete (the hooks, the handle's captured `DELETE` and its
//! `delete_many`, the leader taking a pushed delete) first asks `on_delete` what the
//! database is about to do, in the same transaction, and records it before the delete
//! itself: each synced row the cascade removes as a delete (deepest first, so a child
//! always goes before the row it refers to), each synced row whose reference is set to
//! NULL as an upsert with that field null. Followers apply those entries first, so the
//! parent's delete leaves nothing for their database to cascade, and every device ends
//! with the same rows whatever its foreign keys say. Apply runs no hooks and records
//! nothing. Rows of unsynced models (and rows a model's filter keeps local) are left to the
//! database: they are this device's own.
//!
//! What the library knows of the schema is what the SeaORM relations declare: a foreign
//! key whose action the entity does not declare is not seen (`audit` finds the drift).

use std::collections::{BTreeMap, HashMap, HashSet};

use sea_orm::sea_query::LockType;
use sea_orm::{ConnectionTrait, DbBackend, DbErr};

use crate::capture::{CaptureContext, CapturedChange};
use crate::entry::ChangeOp;
use crate::registry::Registry;

/// Parent keys per read.
const KEYS_PER_READ: usize = 500;

/// How deep a cascade is followed: rows that refer to each other in a cycle would
/// otherwise be found deeper forever. Rows found are recorded either way.
const DEPTH_MAX: usize = 64;

/// What a relation's `on_delete` makes the database do to the rows that refer to a
/// deleted row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Action {
    /// `ON DELETE CASCADE`: they are deleted too.
    Cascade,
    /// `ON DELETE SET NULL`: their reference is set to NULL.
    SetNull,
}

/// A synced model whose rows refer, with a cascading action, to the rows of another.
#[derive(Clone, Debug)]
pub(crate) struct Dependent {
    /// The referring model's sync id and column.
    pub(crate) child: &'static str,
    pub(crate) column: String,
    /// The synced field stored in `column`; `None` when the column is a local field.
    pub(crate) field: Option<&'static str>,
    /// The referenced column of the parent's table.
    pub(crate) parent_column: String,
    pub(crate) action: Action,
}

/// A row found referring to a deleted one.
pub(crate) struct Row {
    pub(crate) key: String,
    /// Whether the model's filter lets it sync.
    pub(crate) syncs: bool,
    /// Its synced fields in canonical form, references not yet translated.
    pub(crate) fields: serde_json::Map<String, serde_json::Value>,
}

/// Every synced model's cascading belongs-to relations to another synced model, by the
/// parent's sync id (`Registry::resolved` keeps them).
pub(crate) fn dependents(registry: &Registry) -> BTreeMap<&'static str, Vec<Dependent>> {
    let mut out: BTreeMap<&'static str, Vec<Dependent>> = BTreeMap::new();
    for child in registry.iter_synced() {
        for (column, table, parent_column, action) in child.on_delete() {
            let Some(parent) = registry.model_of_table(&table) else {
                continue;
            };
            let field = child
                .fields()
                .iter()
                .find(|f| f.synced && f.column == column)
                .map(|f| f.name);
            out.entry(parent).or_default().push(Dependent {
                child: child.sync_id(),
                column,
                field,
                parent_column,
                action,
            });
        }
    }
    out
}

/// The changes the database is about to make to other synced rows when the rows of
/// `model` keyed `keys` are deleted, in the order to record them: first an upsert, with
/// the reference null, of each row a `SET NULL` relation reaches (and no cascade deletes),
/// then a delete of each row a `CASCADE` relation reaches, recursively, deepest first. Only
/// rows that sync are recorded. Call it in the delete's transaction, before the `DELETE`
/// runs; the rows it reads are locked where the backend has row locks.
pub(crate) async fn on_delete<C: ConnectionTrait>(
    db: &C,
    context: &CaptureContext,
    model: &'static str,
    keys: Vec<String>,
) -> Result<Vec<CapturedChange>, DbErr> {
    let registry = &*context.registry;
    if keys.is_empty() || registry.dependents(model).is_empty() {
        return Ok(Vec::new());
    }
    let backend = db.get_database_backend();
    lock_roots(db, registry, backend, model, &keys).await?;
    let roots: HashSet<(&'static str, String)> = keys.iter().map(|k| (model, k.clone())).collect();

    // The rows the cascade deletes, each with its depth: the longest chain of references
    // from a deleted root found so far (a row found deeper again is moved deeper, with
    // the rows below it).
    let mut deleted: HashMap<(&'static str, String), (usize, Row)> = HashMap::new();
    let mut frontier: BTreeMap<&'static str, Vec<String>> = BTreeMap::from([(model, keys)]);
    let mut depth = 0;
    while !frontier.is_empty() {
        depth += 1;
        if depth > DEPTH_MAX {
            tracing::warn!(
                model,
                "rows refer to each other in a cycle of cascading deletes: recorded what was \
                 found, children not ordered below their parents past depth {DEPTH_MAX}"
            );
            break;
        }
        let mut next: BTreeMap<&'static str, Vec<String>> = BTreeMap::new();
        for (parent, parent_keys) in &frontier {
            for dependent in registry.dependents(parent) {
                if dependent.action != Action::Cascade {
                    continue;
                }
                for row in referring(db, registry, backend, parent, parent_keys, dependent).await? {
                    let id = (dependent.child, row.key.clone());
                    if roots.contains(&id) || deleted.get(&id).is_some_and(|(d, _)| *d >= depth) {
                        continue;
                    }
                    next.entry(dependent.child)
                        .or_default()
                        .push(row.key.clone());
                    deleted.insert(id, (depth, row));
                }
            }
        }
        frontier = next;
    }

    // Rows whose reference to any deleted row is set to NULL, unless deleted themselves.
    let mut gone: BTreeMap<&'static str, Vec<String>> = BTreeMap::new();
    for (model, key) in roots.iter().chain(deleted.keys()) {
        gone.entry(model).or_default().push(key.clone());
    }
    let mut nulled: Vec<((&'static str, String), Row, Vec<&'static str>)> = Vec::new();
    let mut nulled_at: HashMap<(&'static str, String), usize> = HashMap::new();
    for (parent, parent_keys) in &gone {
        for dependent in registry.dependents(parent) {
            if dependent.action != Action::SetNull {
                continue;
            }
            for row in referring(db, registry, backend, parent, parent_keys, dependent).await? {
                let id = (dependent.child, row.key.clone());
                if roots.contains(&id) || deleted.contains_key(&id) {
                    continue;
                }
                let at = *nulled_at.entry(id.clone()).or_insert_with(|| {
                    nulled.push((id, row, Vec::new()));
                    nulled.len() - 1
                });
                if let Some(field) = dependent.field {
                    let fields = &mut nulled[at].2;
                    if !fields.contains(&field) {
                        fields.push(field);
                    }
                }
            }
        }
    }

    let mut changes = Vec::new();
    let mut known = HashMap::new();
    for ((model, key), row, fields) in nulled {
        if !row.syncs || fields.is_empty() {
            continue;
        }
        let Some(ops) = registry.get(model) else {
            continue;
        };
        let mut data = row.fields;
        for field in &fields {
            data.insert((*field).to_owned(), serde_json::Value::Null);
        }
        crate::registry::references_out(db, ops.references(), &mut data, &mut known).await?;
        let text = serde_json::to_string(&data).map_err(|e| {
            DbErr::Json(format!("cannot serialise synced fields of `{model}`: {e}"))
        })?;
        changes.push(CapturedChange {
            model,
            record_id: key,
            op: ChangeOp::Upsert,
            data: Some(text),
            changed: fields,
            hlc: context.clock.now(),
            schema_version: ops.schema_version(),
            author: None,
        });
    }
    let mut deletes: Vec<((&'static str, String), usize)> = deleted
        .into_iter()
        .filter(|(_, (_, row))| row.syncs)
        .map(|(id, (depth, _))| (id, depth))
        .collect();
    // Deepest first: a row's delete comes before the delete of the row it refers to.
    deletes.sort_by(|(a, a_depth), (b, b_depth)| b_depth.cmp(a_depth).then_with(|| a.cmp(b)));
    for ((model, key), _) in deletes {
        let Some(ops) = registry.get(model) else {
            continue;
        };
        changes.push(CapturedChange::delete(
            model,
            key,
            context.clock.now(),
            ops.schema_version(),
            None,
        ));
    }
    Ok(changes)
}

/// Locks the rows about to be deleted, where the backend has row locks, so that no row
/// that refers to them can be added between the reads and the `DELETE` (its foreign key
/// check waits for the lock, then fails).
async fn lock_roots<C: ConnectionTrait>(
    db: &C,
    registry: &Registry,
    backend: DbBackend,
    model: &str,
    keys: &[String],
) -> Result<(), DbErr> {
    if backend == DbBackend::Sqlite {
        // One writer at a time: the transaction's write lock covers it.
        return Ok(());
    }
    let Some(ops) = registry.get(model) else {
        return Ok(());
    };
    let Some(column) = ops
        .fields()
        .iter()
        .find(|f| f.name == ops.key_field())
        .map(|f| f.column)
    else {
        return Ok(());
    };
    for chunk in keys.chunks(KEYS_PER_READ) {
        let mut select = ops.select_column_of(column, chunk);
        select.lock(LockType::Update);
        db.query_all_raw(backend.build(&select)).await?;
    }
    Ok(())
}

/// The rows of `dependent` that refer to the rows of `parent` keyed `keys`.
async fn referring<C: ConnectionTrait>(
    db: &C,
    registry: &Registry,
    backend: DbBackend,
    parent: &str,
    keys: &[String],
    dependent: &Dependent,
) -> Result<Vec<Row>, DbErr> {
    let (Some(parent_ops), Some(child_ops)) = (registry.get(parent), registry.get(dependent.child))
    else {
        return Ok(Vec::new());
    };
    let mut rows = Vec::new();
    for chunk in keys.chunks(KEYS_PER_READ) {
        let parents = parent_ops.select_column_of(&dependent.parent_column, chunk);
        let select = child_ops.select_referring(backend, &dependent.column, parents);
        rows.extend(child_ops.decode_rows(db.query_all_raw(select).await?)?);
    }
    Ok(rows)
}
