//! A model that never syncs may have any key.
use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, DeriveEntityModel, sync_core::Syncable)]
#[sea_orm(table_name = "cache")]
#[sync(local)]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    pub value: String,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

fn main() {
    use sync_core::Syncable;
    assert!(!Entity::ENABLED);
}
