//! A disk. Its identity and labels sync; where it is mounted on this machine does not.

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
#[sea_orm(table_name = "volume")]
#[serde(default)]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    pub name: String,
    pub total_capacity: i64,
    pub is_tracked: bool,
    pub display_name: Option<String>,
    /// Declared with its length: the library refuses a longer value when it is written.
    #[sea_orm(column_type = "String(StringLen::N(32))", nullable)]
    pub color: Option<String>,
    pub icon: Option<String>,
    #[sync(local)]
    pub mount_point: String,
    #[sync(local)]
    pub available_space: i64,
    #[sync(local)]
    pub is_mounted: bool,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}
