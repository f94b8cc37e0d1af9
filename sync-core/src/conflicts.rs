//! Conflicts a manual merge leaves: listed, and resolved by a recorded transaction that
//! syncs like any other.

use sea_orm::{ActiveModelTrait, DbErr, EntityTrait, IntoActiveModel, PaginatorTrait, QueryOrder};
use serde::Serialize;

use crate::Library;
use crate::merge::Fields;
use crate::tables::conflict;

/// An open conflict, as `Library::conflicts` lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Conflict {
    /// Its id, for `Library::resolve`.
    pub id: String,
    /// The record's model.
    pub model: String,
    /// The record's key.
    pub record_id: String,
    /// The value the library kept (the conflicting synced fields).
    pub local: serde_json::Value,
    /// The concurrent value set aside.
    pub remote: serde_json::Value,
    /// The device that wrote the value set aside.
    pub remote_device: String,
}

/// How to settle a conflict.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resolution {
    /// Keep the value the library kept.
    TakeLocal,
    /// Take the value that was set aside.
    TakeRemote,
    /// Set these synced fields (a JSON object).
    Value(serde_json::Map<String, serde_json::Value>),
}

/// Why a conflict could not be resolved.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ResolveError {
    /// No open conflict has this id (resolved already, here or elsewhere).
    #[error("no open conflict has id `{0}`; `Library::conflicts` lists the open ones")]
    NotFound(String),
    /// The conflict names a model this app does not know.
    #[error("conflict `{id}` is about model `{model}`, which this app does not know")]
    UnknownModel {
        /// The conflict.
        id: String,
        /// Its model.
        model: String,
    },
    /// The value does not fit the model.
    #[error("the value does not fit `{model}`: {reason}")]
    BadValue {
        /// The model.
        model: String,
        /// What does not fit.
        reason: String,
    },
    /// The database failed, or the write was refused (a device with read access, say).
    #[error(transparent)]
    Db(#[from] DbErr),
}

impl Library {
    /// The open conflicts of this library, oldest first.
    pub async fn conflicts(&self) -> Result<Vec<Conflict>, DbErr> {
        let rows = conflict::Entity::find()
            .order_by_asc(conflict::Column::Id)
            .all(&self.db)
            .await?;
        rows.into_iter()
            .map(|row| {
                let parse = |text: &str| {
                    serde_json::from_str(text).map_err(|e| {
                        DbErr::Json(format!("conflict `{}` holds bad JSON: {e}", row.id))
                    })
                };
                Ok(Conflict {
                    local: parse(&row.local)?,
                    remote: parse(&row.remote)?,
                    id: row.id,
                    model: row.model,
                    record_id: row.record_id,
                    remote_device: row.remote_device,
                })
            })
            .collect()
    }

    /// Open conflicts, counted.
    pub async fn conflict_count(&self) -> Result<u64, DbErr> {
        conflict::Entity::find().count(&self.db).await
    }

    /// Settles a conflict: writes the chosen value to the record (unless it keeps the local
    /// one) and closes the conflict, in one recorded transaction — on a follower that is an
    /// outbox change like any other, and it reaches every device.
    pub async fn resolve(&self, id: &str, resolution: Resolution) -> Result<(), ResolveError> {
        let row = conflict::Entity::find_by_id(id.to_owned())
            .one(&self.db)
            .await?
            .ok_or_else(|| ResolveError::NotFound(id.to_owned()))?;
        let ops =
            self.registry
                .get(&row.model)
                .cloned()
                .ok_or_else(|| ResolveError::UnknownModel {
                    id: row.id.clone(),
                    model: row.model.clone(),
                })?;
        let values: Option<Fields> = match resolution {
            Resolution::TakeLocal => None,
            Resolution::TakeRemote => {
                Some(
                    serde_json::from_str(&row.remote).map_err(|e| ResolveError::BadValue {
                        model: row.model.clone(),
                        reason: e.to_string(),
                    })?,
                )
            }
            Resolution::Value(map) => Some(map),
        };
        if let Some(values) = &values {
            let synced = ops.fields();
            if let Some(unknown) = values
                .keys()
                .find(|k| !synced.iter().any(|f| f.synced && f.name == k.as_str()))
            {
                return Err(ResolveError::BadValue {
                    model: row.model.clone(),
                    reason: format!("`{unknown}` is not a synced field"),
                });
            }
        }
        let id = id.to_owned();
        self.transaction(move |txn| {
            Box::pin(async move {
                // Deleted through the hooks, so the closing is a change that syncs.
                let open = conflict::Entity::find_by_id(id.clone())
                    .one(txn)
                    .await?
                    .ok_or_else(|| ResolveError::NotFound(id.clone()))?;
                if let Some(values) = values {
                    ops.set_fields(txn.unguarded(), &open.record_id, &values)
                        .await
                        .map_err(|e| match e {
                            crate::registry::ApplyFailure::Db(e) => ResolveError::Db(e),
                            crate::registry::ApplyFailure::BadPayload(reason) => {
                                ResolveError::BadValue {
                                    model: open.model.clone(),
                                    reason,
                                }
                            }
                        })?;
                }
                open.into_active_model().delete(txn).await?;
                Ok(())
            })
        })
        .await
    }
}
