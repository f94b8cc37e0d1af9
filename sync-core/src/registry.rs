//! The registry: from a model's sync id to the app's typed model.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use sea_orm::{ConnectionTrait, DatabaseConnection, DatabaseTransaction, DbErr};

use sea_orm::{ActiveModelTrait, IntoActiveModel};

use crate::{ChangeOp, FieldSpec, LogEntry, MergeRule, Syncable};

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
    fn apply<'a>(
        &'a self,
        txn: &'a DatabaseTransaction,
        entry: &'a LogEntry,
    ) -> BoxFuture<'a, Result<(), ApplyFailure>>;
}

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

struct Typed<E>(std::marker::PhantomData<fn() -> E>);

impl<E> ModelOps for Typed<E>
where
    E: Syncable,
    E::Model: IntoActiveModel<E::ActiveModel>,
    E::ActiveModel: Send,
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
    fn apply<'a>(
        &'a self,
        txn: &'a DatabaseTransaction,
        entry: &'a LogEntry,
    ) -> BoxFuture<'a, Result<(), ApplyFailure>> {
        Box::pin(apply_entry::<E>(txn, entry))
    }
}

/// Applies one leader entry to a typed model. The leader's log is the order of truth: an
/// upsert writes the synced fields it carries (under `FieldLevel`, only those it changed),
/// local fields keep this device's values, and a delete of a missing record is a no-op.
async fn apply_entry<E>(txn: &DatabaseTransaction, entry: &LogEntry) -> Result<(), ApplyFailure>
where
    E: Syncable,
    E::Model: IntoActiveModel<E::ActiveModel>,
    E::ActiveModel: Send,
{
    let parse_key = || {
        E::parse_key(&entry.record_id).ok_or_else(|| {
            ApplyFailure::BadPayload(format!(
                "`{}` is not a key of `{}`",
                entry.record_id,
                E::SYNC_ID
            ))
        })
    };
    match entry.op {
        ChangeOp::Delete => {
            E::delete_by_id(parse_key()?).exec(txn).await?;
        }
        ChangeOp::Upsert => {
            let text = entry
                .data
                .as_deref()
                .ok_or_else(|| ApplyFailure::BadPayload("an upsert without data".into()))?;
            let fields: serde_json::Map<String, serde_json::Value> = serde_json::from_str(text)
                .map_err(|e| ApplyFailure::BadPayload(format!("data is not a JSON object: {e}")))?;
            let synced = E::synced_fields();
            if let Some(unknown) = fields.keys().find(|k| !synced.contains(&k.as_str())) {
                return Err(ApplyFailure::BadPayload(format!(
                    "`{unknown}` is not a synced field of `{}` in this build",
                    E::SYNC_ID
                )));
            }
            if let Some(missing) = synced.iter().find(|f| !fields.contains_key(**f)) {
                return Err(ApplyFailure::BadPayload(format!(
                    "the entry lacks the synced field `{missing}`"
                )));
            }
            let bad = |e: serde_json::Error| {
                ApplyFailure::BadPayload(format!("a field does not fit: {e}"))
            };
            match E::find_by_id(parse_key()?).one(txn).await? {
                None => {
                    let mut active = E::new_active(parse_key()?);
                    E::apply_json(&mut active, &fields, None).map_err(bad)?;
                    active.insert(txn).await?;
                }
                Some(existing) => {
                    let mut active = existing.into_active_model();
                    let only =
                        (E::MERGE == MergeRule::FieldLevel).then_some(entry.changed.as_slice());
                    E::apply_json(&mut active, &fields, only).map_err(bad)?;
                    if active.is_changed() {
                        active.update(txn).await?;
                    }
                }
            }
        }
    }
    Ok(())
}

async fn rows_of<E: Syncable, C: ConnectionTrait>(db: &C) -> Result<ModelRows, DbErr> {
    let mut rows = Vec::new();
    for model in E::find().all(db).await? {
        if !E::should_sync(&model) {
            continue;
        }
        let fields = E::sync_json(&model).map_err(|e| {
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
        E::ActiveModel: Send,
    {
        if self.models.contains_key(E::SYNC_ID) {
            return Err(DuplicateSyncId(E::SYNC_ID));
        }
        self.models
            .insert(E::SYNC_ID, Arc::new(Typed::<E>(std::marker::PhantomData)));
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

    pub(crate) fn get(&self, sync_id: &str) -> Option<&Arc<dyn ModelOps>> {
        self.models.get(sync_id).filter(|m| m.enabled())
    }

    pub(crate) fn iter_synced(&self) -> impl Iterator<Item = &Arc<dyn ModelOps>> {
        self.models.values().filter(|m| m.enabled())
    }
}
