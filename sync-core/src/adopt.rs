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

use std::collections::BTreeMap;

use sea_orm::DbErr;
use uuid::Uuid;

use crate::library::{get_local_value, set_local_value};
use crate::registry::Registry;
use crate::tables::local;
use crate::{Library, LibraryId, Seq};

/// The namespace of seed keys (a fixed, random UUID).
const SEED_NAMESPACE: Uuid = Uuid::from_u128(0x6b1d_43f2_9e5a_4c8e_b0a7_2f35_81d9_c4e6);

/// The key of seed row `name` of model `sync_id`: a UUID v5, the same on every device and
/// in every build. A migration that seeds a synced table gives each row such a key (its
/// primary key, or its `#[sync(key)]` column), so that every device's copy is one record.
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

impl Library {
    /// Brings rows that predate the library into it, once: a leader with an empty log
    /// records every synced row as its initial state; a follower whose join found rows
    /// of its own moves them into its outbox. Runs at every open; costs one read when
    /// there is nothing to do.
    pub(crate) async fn adopt_earlier_rows(&self) -> Result<usize, crate::LogError> {
        if self.role() == crate::Role::Leader {
            if self.latest_seq().await? != Seq::ZERO {
                return Ok(0);
            }
            let drift = self.audit().await?;
            return Ok(self.repair(&drift).await?);
        }
        let key = adopt_key(self.id());
        if get_local_value(self.db(), &key).await?.is_none() {
            return Ok(0);
        }
        // The keys to adopt, read before the transaction; each is recorded as it is at
        // commit (`record_again` reads the row in the transaction).
        let mut targets = Vec::new();
        for ops in self.registry().iter_synced() {
            for (record_id, _) in ops.rows(self.db()).await? {
                if !is_seed(&record_id) {
                    targets.push((std::sync::Arc::clone(ops), record_id));
                }
            }
        }
        let adopted = self
            .transaction(move |txn| {
                Box::pin(async move {
                    use sea_orm::EntityTrait;
                    // Another handle may have adopted them meanwhile: the mark decides.
                    if get_local_value(txn, &key).await?.is_none() {
                        return Ok::<_, DbErr>(0);
                    }
                    for (ops, record_id) in &targets {
                        ops.record_again(txn, record_id).await?;
                    }
                    local::Entity::delete_by_id(key).exec(txn).await?;
                    Ok(targets.len())
                })
            })
            .await?;
        if adopted > 0 {
            tracing::info!(
                library = %self.id(),
                rows = adopted,
                "rows this database held before joining were moved to the outbox"
            );
        }
        Ok(adopted)
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
