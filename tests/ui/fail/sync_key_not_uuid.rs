use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, DeriveEntityModel, sync_core::Syncable)]
#[sea_orm(table_name = "thing")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i32,
    #[sync(key)]
    pub sync_key: String,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

fn main() {}
