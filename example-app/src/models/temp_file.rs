//! Scratch files: never synced.

use sea_orm::entity::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(
    Clone,
    Debug,
    Default,
    PartialEq,
    Eq,
    DeriveEntityModel,
    Serialize,
    Deserialize,
    sync_core::Syncable,
)]
#[sea_orm(table_name = "temp_file")]
#[serde(default)]
#[sync(local)]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    pub path: String,
    pub size: i64,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}
