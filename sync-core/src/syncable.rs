//! The `Syncable` trait: what `#[derive(Syncable)]` declares about a model.

use sea_orm::{EntityTrait, PrimaryKeyTrait};

/// How concurrent changes to one record are merged. Declared per model; the follower and
/// conflict machinery implement it.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum MergeRule {
    /// The change with the greater hybrid logical clock wins, whole record (the default).
    LastWriteWins,
    /// Each change replaces only the fields it set; per field, the later change wins,
    /// except fields marked `union` (set union) or `manual` (a recorded conflict).
    FieldLevel,
    /// The model's own function `(local, remote) -> merged` decides.
    Custom,
    /// Concurrent changes are kept as a conflict for a person to resolve.
    Manual,
}

/// How one field merges when the model's rule is `FieldLevel`.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum FieldMerge {
    /// The later change wins.
    LastWriteWins,
    /// The field is a JSON array treated as a set: both sides' elements are kept.
    Union,
    /// Concurrent changes become a recorded conflict.
    Manual,
}

/// One field of a synced model, as the derive saw it.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct FieldSpec {
    /// The Rust field name, also the key in the change's JSON.
    pub name: &'static str,
    /// The database column.
    pub column: &'static str,
    /// False for fields kept local to each device (`#[sync(local)]`).
    pub synced: bool,
    /// How the field merges under `MergeRule::FieldLevel`.
    pub merge: FieldMerge,
}

/// A SeaORM entity whose changes are recorded in the library's log and replicated.
///
/// Implement it with `#[derive(Syncable)]` on the entity's `Model`; the derive also wires
/// the `ActiveModelBehavior` hooks unless the model asks for `#[sync(custom_behavior)]`.
pub trait Syncable: EntityTrait {
    /// The model's stable name on the wire and in the log (default: the table name).
    const SYNC_ID: &'static str;
    /// Bumped by the app when the synced fields change shape, so that a peer running
    /// another version is recognised rather than misread.
    const SCHEMA_VERSION: u32;
    /// False for a model that never syncs (`#[sync(local)]` on the struct).
    const ENABLED: bool;
    /// The model's merge rule.
    const MERGE: MergeRule;
    /// Every field, synced or not, in declaration order.
    const FIELDS: &'static [FieldSpec];
    /// The primary key field.
    const KEY_FIELD: &'static str;

    /// The record's key as text: the `record_id` of its log entries.
    fn record_key(model: &Self::Model) -> String;

    /// The key of an ActiveModel, when it is set.
    fn active_key(active: &Self::ActiveModel) -> Option<String>;

    /// Gives an insert without a key a fresh UUID v7 (a no-op for non-UUID keys).
    fn fill_key(active: &mut Self::ActiveModel);

    /// Parses a `record_id` back into the primary key.
    fn parse_key(key: &str) -> Option<<Self::PrimaryKey as PrimaryKeyTrait>::ValueType>;

    /// The synced fields this ActiveModel sets (those an update will write).
    fn set_fields(active: &Self::ActiveModel) -> Vec<&'static str>;

    /// The synced fields of a record as a JSON object.
    fn sync_json(
        model: &Self::Model,
    ) -> Result<serde_json::Map<String, serde_json::Value>, serde_json::Error>;

    /// Sets the synced fields present in `fields` (only those named in `only`, when given)
    /// on `active`. The key is never touched.
    fn apply_json(
        active: &mut Self::ActiveModel,
        fields: &serde_json::Map<String, serde_json::Value>,
        only: Option<&[String]>,
    ) -> Result<(), serde_json::Error>;

    /// A new record with this key and the synced fields of an upsert's `data`: the JSON text
    /// of an object that holds exactly the synced fields (a missing or an unknown field is
    /// an error). Local fields start at their `Default`. The key in `data` is not read.
    ///
    /// The derive generates a decoder that reads `data` straight into the fields; this
    /// default goes through a `serde_json::Map` and `apply_json`, to the same effect but
    /// for one case: a field given twice, which the derive's decoder refuses and the `Map`
    /// takes the last of (logs written by this library never hold one).
    fn decode_upsert(
        key: <Self::PrimaryKey as PrimaryKeyTrait>::ValueType,
        data: &str,
    ) -> Result<Self::ActiveModel, serde_json::Error> {
        decode_upsert_via_map::<Self>(key, data)
    }

    /// A new record with this key: every local field at its type's `Default`, every synced
    /// field unset (the caller applies them).
    fn new_active(key: <Self::PrimaryKey as PrimaryKeyTrait>::ValueType) -> Self::ActiveModel;

    /// True when the model has a per-record filter (`#[sync(filter = "…")]`): apply then
    /// looks for rows that are local to this device before it writes.
    const FILTERED: bool = false;

    /// The per-record filter: a record for which this is false is local to this device.
    /// When an update makes it false, the record leaves the other devices (a delete is
    /// recorded) and stays here; entries pulled or pushed for it never touch this row.
    fn should_sync(_model: &Self::Model) -> bool {
        true
    }

    /// The custom merge function, for `MergeRule::Custom`.
    fn merge_custom(_local: &Self::Model, _remote: &Self::Model) -> Option<Self::Model> {
        None
    }

    /// The names of the synced fields.
    fn synced_fields() -> Vec<&'static str> {
        Self::FIELDS
            .iter()
            .filter(|f| f.synced)
            .map(|f| f.name)
            .collect()
    }
}

/// `Syncable::decode_upsert` by way of a `serde_json::Map`: the reference the derive's
/// direct decoder is tested against.
pub fn decode_upsert_via_map<E: Syncable>(
    key: <E::PrimaryKey as PrimaryKeyTrait>::ValueType,
    data: &str,
) -> Result<E::ActiveModel, serde_json::Error> {
    use serde::de::Error as _;
    let fields: serde_json::Map<String, serde_json::Value> = serde_json::from_str(data)?;
    let synced = E::synced_fields();
    if let Some(unknown) = fields.keys().find(|k| !synced.contains(&k.as_str())) {
        return Err(serde_json::Error::custom(format_args!(
            "unknown field `{unknown}`: not a synced field of `{}` in this build",
            E::SYNC_ID
        )));
    }
    if let Some(missing) = synced.iter().find(|f| !fields.contains_key(**f)) {
        return Err(serde_json::Error::custom(format_args!(
            "missing field `{missing}`"
        )));
    }
    let mut active = E::new_active(key);
    E::apply_json(&mut active, &fields, None)?;
    Ok(active)
}
