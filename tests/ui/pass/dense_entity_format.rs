// SeaORM 2's dense entity format, as `sea-orm-cli generate entity` writes it, with the derive
// added and nothing else changed: `#[sea_orm::model]` copies the derives onto `ModelEx`,
// where the derive must expand to nothing.
use sync_core::{MergeRule, Registry, Syncable};

pub mod author {
    use sea_orm::entity::prelude::*;

    #[sea_orm::model]
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel, sync_core::Syncable)]
    #[sea_orm(table_name = "author")]
    #[sync(merge = "field")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        pub name: String,
        #[sync(local)]
        pub draft_note: Option<String>,
        #[sea_orm(has_many)]
        pub posts: HasMany<super::post::Entity>,
    }
}

pub mod post {
    use sea_orm::entity::prelude::*;

    #[sea_orm::model]
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel, sync_core::Syncable)]
    #[sea_orm(table_name = "post")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        pub author_id: Uuid,
        pub title: String,
        #[sea_orm(belongs_to, from = "author_id", to = "id")]
        pub author: HasOne<super::author::Entity>,
    }
}

// The compact format with `#[sea_orm::compact_model]`: a `Relation` enum of its own, and
// the app's own `ActiveModelBehavior` (which the derive then leaves alone).
pub mod comment {
    use sea_orm::entity::prelude::*;

    #[sea_orm::compact_model]
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel, sync_core::Syncable)]
    #[sea_orm(table_name = "comment")]
    #[sync(id = "comments", custom_behavior)]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        pub post_id: Uuid,
        pub body: String,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {
        #[sea_orm(
            belongs_to = "super::post::Entity",
            from = "Column::PostId",
            to = "super::post::Column::Id"
        )]
        Post,
    }

    #[async_trait::async_trait]
    impl ActiveModelBehavior for ActiveModel {
        async fn after_save<C: ConnectionTrait>(model: Model, db: &C, insert: bool) -> Result<Model, DbErr> {
            sync_core::hooks::after_save::<Entity, C>(model, db, insert).await
        }
    }
}

fn main() {
    assert_eq!(<author::Entity as Syncable>::SYNC_ID, "author");
    assert_eq!(<author::Entity as Syncable>::MERGE, MergeRule::FieldLevel);
    assert_eq!(<author::Entity as Syncable>::synced_fields(), ["id", "name"]);
    assert_eq!(<post::Entity as Syncable>::synced_fields(), ["id", "author_id", "title"]);
    assert_eq!(<comment::Entity as Syncable>::SYNC_ID, "comments");
    let registry = Registry::new()
        .register::<author::Entity>()
        .and_then(|r| r.register::<post::Entity>())
        .and_then(|r| r.register::<comment::Entity>())
        .expect("distinct sync ids");
    assert_eq!(registry.synced_models(), ["author", "comments", "post"]);
}
