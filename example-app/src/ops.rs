//! The record commands of the CLI: `put`, `get`, `delete`.

use anyhow::{Context, Result, anyhow, bail};
use sea_orm::{ActiveModelBehavior, ActiveModelTrait, DbErr, IntoActiveModel, Iterable};
use serde::Serialize;
use serde::de::DeserializeOwned;
use sync_core::{Library, Syncable};

use crate::models::{location, tag, temp_file, user_metadata, volume};

/// The models the CLI knows, by the name users type (the sync id).
pub const MODELS: &[&str] = &["location", "tag", "volume", "user_metadata", "temp_file"];

/// Calls `$body` with `E` bound to the entity named `$name`.
macro_rules! with_entity {
    ($name:expr, $f:ident ( $($arg:expr),* )) => {
        match $name {
            "location" => $f::<location::Entity>($($arg),*).await,
            "tag" => $f::<tag::Entity>($($arg),*).await,
            "volume" => $f::<volume::Entity>($($arg),*).await,
            "user_metadata" => $f::<user_metadata::Entity>($($arg),*).await,
            "temp_file" => $f::<temp_file::Entity>($($arg),*).await,
            other => Err(anyhow!("unknown model `{other}`: expected one of {}", MODELS.join(", "))),
        }
    };
}

/// Inserts a record, or updates it when `json` carries the `id` of an existing one.
/// Returns the stored record.
pub async fn put(library: &Library, model: &str, json: &str) -> Result<serde_json::Value> {
    let value: serde_json::Value =
        serde_json::from_str(json).context("the record is not valid JSON")?;
    let serde_json::Value::Object(fields) = value else {
        bail!("the record must be a JSON object, like {{\"name\": \"Photos\"}}");
    };
    with_entity!(model, put_typed(library, fields))
}

/// The record with this id, as JSON (every field, local ones included), if it exists.
pub async fn get(library: &Library, model: &str, id: &str) -> Result<Option<serde_json::Value>> {
    with_entity!(model, get_typed(library, id))
}

/// Deletes a record; an error if there is none.
pub async fn delete(library: &Library, model: &str, id: &str) -> Result<()> {
    with_entity!(model, delete_typed(library, id))
}

fn parse_id<E: Syncable>(id: &str) -> Result<sea_orm::Select<E>> {
    sync_core::find_by_key::<E>(id).ok_or_else(|| {
        anyhow!(
            "`{id}` is not a valid id for `{}` (expected a UUID)",
            E::SYNC_ID
        )
    })
}

async fn get_typed<E>(library: &Library, id: &str) -> Result<Option<serde_json::Value>>
where
    E: Syncable,
    E::Model: Serialize,
{
    let found = parse_id::<E>(id)?.one(library.db()).await?;
    found
        .map(|m| serde_json::to_value(&m).context("cannot serialise the record"))
        .transpose()
}

async fn delete_typed<E>(library: &Library, id: &str) -> Result<()>
where
    E: Syncable,
    E::Model: IntoActiveModel<E::ActiveModel>,
    E::ActiveModel: ActiveModelBehavior + Send,
{
    let query = parse_id::<E>(id)?;
    let deleted = library
        .transaction(move |txn| {
            Box::pin(async move {
                let Some(model) = query.one(txn).await? else {
                    return Ok::<_, DbErr>(false);
                };
                model.into_active_model().delete(txn).await?;
                Ok(true)
            })
        })
        .await?;
    if !deleted {
        bail!("no {} with id {id}", E::SYNC_ID);
    }
    Ok(())
}

async fn put_typed<E>(
    library: &Library,
    mut fields: serde_json::Map<String, serde_json::Value>,
) -> Result<serde_json::Value>
where
    E: Syncable,
    E::Model: Serialize + DeserializeOwned + IntoActiveModel<E::ActiveModel>,
    E::ActiveModel: ActiveModelBehavior + Send,
{
    let existing = match fields.get(E::KEY_FIELD) {
        Some(serde_json::Value::String(id)) => parse_id::<E>(id)?.one(library.db()).await?,
        Some(other) => bail!("`{}` must be a string, not {other}", E::KEY_FIELD),
        None => {
            fields.insert(
                E::KEY_FIELD.to_owned(),
                serde_json::Value::String(uuid::Uuid::now_v7().to_string()),
            );
            None
        }
    };
    let stored = match existing {
        Some(current) => {
            // Overlay the given fields on the stored record; only those are written.
            let mut merged = match serde_json::to_value(&current)? {
                serde_json::Value::Object(map) => map,
                _ => bail!("cannot read the stored record"),
            };
            let given: Vec<String> = fields.keys().cloned().collect();
            merged.extend(fields);
            let model: E::Model = serde_json::from_value(serde_json::Value::Object(merged))
                .map_err(|e| anyhow!("the record does not fit `{}`: {e}", E::SYNC_ID))?;
            let mut active = model.into_active_model();
            for column in E::Column::iter() {
                let name = sea_orm::IdenStatic::as_str(&column);
                if given.iter().any(|g| g == name)
                    && name != E::KEY_FIELD
                    && let Some(value) = active.get(column).into_value()
                {
                    active.set(column, value);
                }
            }
            library
                .transaction(move |txn| Box::pin(async move { active.update(txn).await }))
                .await?
        }
        None => {
            let model: E::Model = serde_json::from_value(serde_json::Value::Object(fields))
                .map_err(|e| anyhow!("the record does not fit `{}`: {e}", E::SYNC_ID))?;
            let active = model.into_active_model().reset_all();
            library
                .transaction(move |txn| Box::pin(async move { active.insert(txn).await }))
                .await?
        }
    };
    Ok(serde_json::to_value(&stored)?)
}
