//! Integer and composite primary keys sync by a `#[sync(key)]` column.

pub mod shelf {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel, sync_core::Syncable)]
    #[sea_orm(table_name = "shelf")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i32,
        #[sync(key)]
        #[sea_orm(unique)]
        pub sync_key: Uuid,
        pub name: String,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}
}

pub mod book {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel, sync_core::Syncable)]
    #[sea_orm(table_name = "book")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i64,
        #[sync(key)]
        #[sea_orm(unique)]
        pub sync_key: Uuid,
        pub title: String,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}
}

/// A join table: its key's members are references, and sync.
pub mod shelf_book {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel, sync_core::Syncable)]
    #[sea_orm(table_name = "shelf_book")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub shelf_id: i32,
        #[sea_orm(primary_key, auto_increment = false)]
        pub book_id: i64,
        #[sync(key)]
        #[sea_orm(unique)]
        pub sync_key: Uuid,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}
}

fn main() {
    use sync_core::Syncable;
    assert_eq!(shelf::Entity::KEY_FIELD, "sync_key");
    assert_eq!(shelf::Entity::synced_fields(), ["sync_key", "name"]);
    assert_eq!(book::Entity::synced_fields(), ["sync_key", "title"]);
    assert_eq!(
        shelf_book::Entity::synced_fields(),
        ["shelf_id", "book_id", "sync_key"]
    );
}
