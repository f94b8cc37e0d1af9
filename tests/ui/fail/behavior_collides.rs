// Without `#[sync(custom_behavior)]` the derive writes `ActiveModelBehavior` itself; the
// compiler points at the app's second impl.
use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, DeriveEntityModel, sync_core::Syncable)]
#[sea_orm(table_name = "thing")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    pub name: String,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}

fn main() {}
