//! Rows that were in a database before it took part in a library: seeds, and the rest.
//!
//! A database can hold rows of synced models before any library exists: a migration
//! seeded them, or the app ran without sync until now. Each of them must end up either
//! everywhere or recorded where a person sees it, never silently on one device only:
//!
//! - **Seeds** are rows whose key is a [`seed_key`] (a UUID v5 of the model and a name).
//!   The same migration makes the same rows with the same keys on every device, so a seed
//!   is one record everywhere: the leader records its seeds with its initial state, and a
//!   follower's seeds are overwritten (or deleted) by the leader's entries for those keys.
//!   A seed the leader never had stays only on the follower that has it: seed migrations
//!   must be the same on every device.
//! - **The initial state.** A library created on a database whose synced tables hold rows
//!   records every one of them (seeds too) as its first entries. `Library::open` does it for
//!   a leader whose log is empty, so a crash between creating the library and recording
//!   them is repaired by the next start.
//! - **Other rows on a joining device** exist nowhere else. With write access they become
//!   this device's offline writes: the join stores a mark in the same transaction as the
//!   membership, and `Library::open` moves the rows into the outbox and removes the mark in
//!   one transaction, so they are pushed and merged like any offline write. With read
//!   access they could never leave the device: the join is refused
//!   ([`OpenError::RowsBeforeJoin`](crate::OpenError::RowsBeforeJoin)) and nothing is stored.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use sea_orm::DbErr;
use uuid::Uuid;

use crate::library::{get_local_value, set_local_value};
use crate::registry::{ModelOps, ModelRows, Registry};
use crate::tables::{local, log, pending};
use crate::{Library, LibraryId, Seq};

/// The namespace of seed keys (a fixed, random UUID).
const SEED_NAMESPACE: Uuid = Uuid::from_u128(0x6b1d_43f2_9e5a_4c8e_b0a7_2f35_81d9_c4e6);

/// The key of seed row `name` of model `sync_id`: a UUID v5, the same on every device and
/// in every build. A migration that seeds a synced table gives each row such a key (its
/// primary key, or its `#[sync(key)]` column), so that every device's copy is one record.
///
/// The library recognises seeds by their version alone: any UUID v5 key counts as a seed,
/// and a joining device neither pushes such rows nor is refused for them. Do not key an
/// app's own rows with UUID v5 (use v7, which the hooks fill in).
pub fn seed_key(sync_id: &str, name: &str) -> Uuid {
    let mut text = String::with_capacity(sync_id.len() + 1 + name.len());
    text.push_str(sync_id);
    text.push('\0');
    text.push_str(name);
    Uuid::new_v5(&SEED_NAMESPACE, text.as_bytes())
}

/// True for a record key made by [`seed_key`] (any UUID v5).
pub(crate) fn is_seed(record_id: &str) -> bool {
    Uuid::parse_str(record_id).is_ok_and(|key| key.get_version_num() == 5)
}

/// The `sync_local` key of the mark "rows before the join wait to enter the outbox".
fn adopt_key(library_id: LibraryId) -> String {
    format!("adopt_rows.{library_id}")
}

/// Synced rows of this database other than seeds, counted per model.
pub(crate) async fn unshared_rows(
    db: &sea_orm::DatabaseConnection,
    registry: &Registry,
) -> Result<BTreeMap<&'static str, usize>, DbErr> {
    let mut found = BTreeMap::new();
    for ops in registry.iter_synced() {
        let rows = ops.rows(db).await?;
        let count = rows.iter().filter(|(key, _)| !is_seed(key)).count();
        if count > 0 {
            found.insert(ops.sync_id(), count);
        }
    }
    Ok(found)
}

/// Marks, inside the join's transaction, that the rows found before it are to be adopted.
pub(crate) async fn mark_for_adoption(
    txn: &sea_orm::DatabaseTransaction,
    library_id: LibraryId,
) -> Result<(), DbErr> {
    set_local_value(txn, &adopt_key(library_id), "1").await
}

/// The synced models, each after the models it refers to (its belongs-to relations), so
/// that recorded rows apply in an order the database accepts. A cycle is broken anywhere.
fn models_parents_first(registry: &Registry) -> Vec<Arc<dyn ModelOps>> {
    let models: Vec<Arc<dyn ModelOps>> = registry.iter_synced().cloned().collect();
    let mut order = Vec::with_capacity(models.len());
    let mut state: HashMap<&'static str, bool> = HashMap::new(); // false: visiting
    fn visit(
        at: usize,
        models: &[Arc<dyn ModelOps>],
        state: &mut HashMap<&'static str, bool>,
        order: &mut Vec<Arc<dyn ModelOps>>,
    ) {
        let model = &models[at];
        if state.contains_key(model.sync_id()) {
            return;
        }
        state.insert(model.sync_id(), false);
        for (_, table, _) in model.belongs_to() {
            if let Some(parent) = models
                .iter()
                .position(|m| m.table_name() == table && m.sync_id() != model.sync_id())
            {
                visit(parent, models, state, order);
            }
        }
        state.insert(model.sync_id(), true);
        order.push(Arc::clone(model));
    }
    for at in 0..models.len() {
        visit(at, &models, &mut state, &mut order);
    }
    order
}

/// The record ids of `rows` (of one model), each after the row of the same model it refers
/// to (a tree), when that row is among them.
fn rows_parents_first(ops: &dyn ModelOps, rows: ModelRows) -> Vec<String> {
    let self_fields: Vec<&'static str> = ops
        .belongs_to()
        .into_iter()
        .filter(|(_, table, _)| table == ops.table_name())
        .filter_map(|(column, _, _)| {
            ops.fields()
                .iter()
                .find(|f| f.synced && f.column == column)
                .map(|f| f.name)
        })
        .collect();
    if self_fields.is_empty() {
        return rows.into_iter().map(|(id, _)| id).collect();
    }
    // A reference holds the parent's record id (its UUID key, or its sync key).
    let parents: HashMap<String, Vec<String>> = rows
        .iter()
        .map(|(id, fields)| {
            let of = self_fields
                .iter()
                .filter_map(|f| fields.get(*f).and_then(|v| v.as_str()).map(str::to_owned))
                .collect();
            (id.clone(), of)
        })
        .collect();
    let mut done = HashSet::new();
    // On the stack, not yet emitted: a parent found among them is a cycle, broken there.
    let mut open = HashSet::new();
    let mut order = Vec::with_capacity(rows.len());
    for (id, _) in &rows {
        // Depth first, without recursion: a deep tree must not overflow the stack.
        let mut stack = vec![(id.as_str(), false)];
        while let Some((at, expanded)) = stack.pop() {
            if expanded {
                open.remove(at);
                if done.insert(at) {
                    order.push(at.to_owned());
                }
                continue;
            }
            if done.contains(at) || !open.insert(at) {
                continue;
            }
            stack.push((at, true));
            for parent in parents.get(at).into_iter().flatten() {
                if parents.contains_key(parent.as_str()) && !done.contains(parent.as_str()) {
                    stack.push((parent.as_str(), false));
                }
            }
        }
    }
    order
}

/// Removes the mark of `mark_for_adoption`, inside a join's transaction.
pub(crate) async fn unmark_for_adoption(
    txn: &sea_orm::DatabaseTransaction,
    library_id: LibraryId,
) -> Result<(), DbErr> {
    use sea_orm::EntityTrait;
    local::Entity::delete_by_id(adopt_key(library_id))
        .exec(txn)
        .await
        .map(|_| ())
}

impl Library {
    /// Brings rows that predate the library into it, once: a leader with an empty log
    /// records every synced row as its initial state; a follower whose join found rows
    /// of its own moves them into its outbox (not seeds). Parents are recorded before the
    /// rows that refer to them. Runs at every open; costs one read when there is nothing
    /// to do.
    pub(crate) async fn adopt_earlier_rows(&self) -> Result<usize, crate::LogError> {
        let leader = self.role() == crate::Role::Leader;
        let key = adopt_key(self.id());
        if leader {
            if self.latest_seq().await? != Seq::ZERO {
                return Ok(0);
            }
        } else if get_local_value(self.db(), &key).await?.is_none() {
            return Ok(0);
        }
        // The records to record, read before the transaction; each is recorded as it is
        // at commit (`record_again` reads the row in the transaction).
        let mut targets = Vec::new();
        for ops in models_parents_first(self.registry()) {
            let rows = ops.rows(self.db()).await?;
            for record_id in rows_parents_first(ops.as_ref(), rows) {
                if leader || !is_seed(&record_id) {
                    targets.push((Arc::clone(&ops), record_id));
                }
            }
        }
        if leader && targets.is_empty() {
            return Ok(0);
        }
        let library_id = self.id();
        let recorded = self
            .transaction(move |txn| {
                Box::pin(async move {
                    use sea_orm::{ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter};
                    if leader {
                        // One initial state, also when two processes open at once: the
                        // second waits for the first here, then finds its entries.
                        if txn.get_database_backend() != sea_orm::DbBackend::Sqlite {
                            crate::backend::take_turns(txn.unguarded(), library_id).await?;
                        }
                        let logged = log::Entity::find()
                            .filter(log::Column::LibraryId.eq(library_id.to_string()))
                            .one(txn)
                            .await?
                            .is_some()
                            || pending::Entity::find()
                                .filter(pending::Column::LibraryId.eq(library_id.to_string()))
                                .one(txn)
                                .await?
                                .is_some();
                        if logged {
                            return Ok::<_, DbErr>(0);
                        }
                    } else {
                        // The mark decides, once: a handle that opened meanwhile removed it.
                        let removed = local::Entity::delete_by_id(key).exec(txn).await?;
                        if removed.rows_affected == 0 {
                            return Ok(0);
                        }
                    }
                    for (ops, record_id) in &targets {
                        ops.record_again(txn.unguarded(), record_id).await?;
                    }
                    Ok(targets.len())
                })
            })
            .await?;
        if recorded > 0 {
            tracing::info!(
                library = %self.id(),
                rows = recorded,
                "rows this database held before the library were recorded ({})",
                if leader { "the initial state" } else { "moved to the outbox" }
            );
        }
        Ok(recorded)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_keys_are_stable_distinct_and_recognised() {
        let a = seed_key("post", "welcome");
        assert_eq!(a, seed_key("post", "welcome"));
        assert_ne!(a, seed_key("post", "welcome2"));
        assert_ne!(a, seed_key("tag", "welcome"));
        // The separator keeps ("ab", "c") and ("a", "bc") apart.
        assert_ne!(seed_key("ab", "c"), seed_key("a", "bc"));
        assert!(is_seed(&a.to_string()));
        assert!(!is_seed(&Uuid::now_v7().to_string()));
        assert!(!is_seed("42"));
    }
}
