//! A folder the library indexes. Its own `ActiveModelBehavior` trims names, and still syncs.

use sea_orm::entity::prelude::*;
use serde::{Deserialize, Serialize};
use sync_core::Syncable;

#[derive(
    Clone, Debug, Default, PartialEq, Eq, DeriveEntityModel, Serialize, Deserialize, Syncable,
)]
#[sea_orm(table_name = "location")]
#[serde(default)]
#[sync(merge = "field", custom_behavior)]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    /// Concurrent renames are a conflict for a person to settle.
    #[sync(manual)]
    pub name: String,
    #[sync(manual)]
    pub path: String,
    pub indexed_files: i64,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

#[async_trait::async_trait]
impl ActiveModelBehavior for ActiveModel {
    async fn before_save<C>(mut self, db: &C, insert: bool) -> Result<Self, DbErr>
    where
        C: ConnectionTrait,
    {
        // The app's own rule, before the sync hook sees the write.
        if let sea_orm::ActiveValue::Set(name) = &self.name {
            let trimmed = name.trim().to_owned();
            if trimmed.is_empty() {
                return Err(DbErr::Custom("a location needs a name".into()));
            }
            self.name = sea_orm::ActiveValue::Set(trimmed);
        }
        sync_core::hooks::before_save::<Entity, C>(self, db, insert).await
    }

    async fn after_save<C>(model: Model, db: &C, insert: bool) -> Result<Model, DbErr>
    where
        C: ConnectionTrait,
    {
        sync_core::hooks::after_save::<Entity, C>(model, db, insert).await
    }

    async fn before_delete<C>(self, db: &C) -> Result<Self, DbErr>
    where
        C: ConnectionTrait,
    {
        sync_core::hooks::before_delete::<Entity, C>(self, db).await
    }

    async fn after_delete<C>(self, db: &C) -> Result<Self, DbErr>
    where
        C: ConnectionTrait,
    {
        sync_core::hooks::after_delete::<Entity, C>(self, db).await
    }
}
