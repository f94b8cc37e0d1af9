//! A label. Tags whose name starts with a dot are the device's own and never sync.

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
#[sea_orm(table_name = "tag")]
#[serde(default)]
#[sync(filter = "shared_tag")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    pub name: String,
    pub color: Option<String>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

/// The per-record filter: hidden tags (`.name`) stay on this device.
pub fn shared_tag(model: &Model) -> bool {
    !model.name.starts_with('.')
}
