//! The `Syncable` trait: what `#[derive(Syncable)]` declares about a model.

use sea_orm::{ColumnTrait, EntityTrait, Iterable, QueryFilter, Select};

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
    /// The field that identifies the record on every device: the `#[sync(key)]` field, or
    /// else the primary key (a `Uuid` or a `String`).
    const KEY_FIELD: &'static str;

    /// True when the record is identified by a `#[sync(key)]` field: the primary key (an
    /// auto-increment integer, say) is then local to each device, never in the log and
    /// never written by apply.
    const LOCAL_PRIMARY_KEY: bool = false;

    /// The type of the `KEY_FIELD`.
    type Key: Clone + Send + Into<sea_orm::Value> + 'static;

    /// The record's key as text: the `record_id` of its log entries.
    fn record_key(model: &Self::Model) -> String;

    /// The key of an ActiveModel, when it is set.
    fn active_key(active: &Self::ActiveModel) -> Option<String>;

    /// Gives an insert without a key a fresh UUID v7 (a no-op for `String` keys).
    fn fill_key(active: &mut Self::ActiveModel);

    /// Parses a `record_id` back into a value of the `KEY_FIELD`.
    fn parse_key(key: &str) -> Option<Self::Key>;

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
    fn decode_upsert(key: Self::Key, data: &str) -> Result<Self::ActiveModel, serde_json::Error> {
        decode_upsert_via_map::<Self>(key, data)
    }

    /// A new record with this key: every local field at its type's `Default` (but a local
    /// primary key, which stays unset for the database to assign), every synced field
    /// unset (the caller applies them).
    fn new_active(key: Self::Key) -> Self::ActiveModel;

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
    key: E::Key,
    data: &str,
) -> Result<E::ActiveModel, serde_json::Error> {
    let fields: serde_json::Map<String, serde_json::Value> = serde_json::from_str(data)?;
    decode_fields::<E>(key, &fields)
}

/// `decode_upsert_via_map` of a parsed object.
pub(crate) fn decode_fields<E: Syncable>(
    key: E::Key,
    fields: &serde_json::Map<String, serde_json::Value>,
) -> Result<E::ActiveModel, serde_json::Error> {
    use serde::de::Error as _;
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
    E::apply_json(&mut active, fields, None)?;
    Ok(active)
}

/// The column of `E::KEY_FIELD`.
pub fn key_column<E: Syncable>() -> Option<E::Column> {
    let field = E::FIELDS.iter().find(|f| f.name == E::KEY_FIELD)?;
    E::Column::iter().find(|c| sea_orm::IdenStatic::as_str(c) == field.column)
}

/// A query for the record whose `record_id` is `key`, or `None` when `key` is not a key of
/// `E`. Works for every model, also one whose primary key is local (where `find_by_id`
/// would take the local integer).
pub fn find_by_key<E: Syncable>(key: &str) -> Option<Select<E>> {
    let value = E::parse_key(key)?;
    let column = key_column::<E>()?;
    Some(E::find().filter(column.eq(value)))
}
