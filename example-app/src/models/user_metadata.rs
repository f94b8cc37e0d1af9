//! What a person says about their files: tags merge as a set union across devices.

use sea_orm::entity::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(
    Clone, Debug, PartialEq, Eq, DeriveEntityModel, Serialize, Deserialize, sync_core::Syncable,
)]
#[sea_orm(table_name = "user_metadata")]
#[serde(default)]
#[sync(merge = "field")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    /// A JSON array of strings.
    #[sync(union)]
    pub tags: Json,
    pub notes: Option<String>,
    pub favorite: bool,
}

impl Default for Model {
    fn default() -> Self {
        Model {
            id: Uuid::nil(),
            tags: Json::Array(Vec::new()),
            notes: None,
            favorite: false,
        }
    }
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}
