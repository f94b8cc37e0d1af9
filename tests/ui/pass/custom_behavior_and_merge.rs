use sea_orm::entity::prelude::*;
use sync_core::{MergeRule, Syncable};

#[derive(Clone, Debug, PartialEq, DeriveEntityModel, Syncable)]
#[sea_orm(table_name = "note")]
#[sync(id = "notes", schema_version = 3, merge_with = "keep_longer", custom_behavior, filter = "not_draft")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    pub body: String,
    pub draft: bool,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

fn keep_longer(local: &Model, remote: &Model) -> Model {
    if local.body.len() >= remote.body.len() { local.clone() } else { remote.clone() }
}

fn not_draft(model: &Model) -> bool {
    !model.draft
}

#[async_trait::async_trait]
impl ActiveModelBehavior for ActiveModel {
    async fn after_save<C: ConnectionTrait>(model: Model, db: &C, insert: bool) -> Result<Model, DbErr> {
        sync_core::hooks::after_save::<Entity, C>(model, db, insert).await
    }
}

fn main() {
    assert_eq!(<Entity as Syncable>::SYNC_ID, "notes");
    assert_eq!(<Entity as Syncable>::SCHEMA_VERSION, 3);
    assert_eq!(<Entity as Syncable>::MERGE, MergeRule::Custom);
}
