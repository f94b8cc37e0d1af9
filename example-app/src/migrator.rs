//! The app's `Migrator`: the sync tables, then the app's own.

use sea_orm::{EntityTrait, Schema};
use sea_orm_migration::prelude::*;

use crate::models::{location, tag, temp_file, user_metadata, volume};

/// Runs the sync migrations and the app's.
#[derive(Debug)]
pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        let mut all = sync_migrations::migrations();
        all.push(Box::new(MediaTables));
        all
    }
}

struct MediaTables;

impl MigrationName for MediaTables {
    fn name(&self) -> &str {
        "m20261121_000001_media_tables"
    }
}

async fn create<E: EntityTrait>(
    manager: &SchemaManager<'_>,
    schema: &Schema,
    entity: E,
) -> Result<(), DbErr> {
    manager
        .create_table(
            schema
                .create_table_from_entity(entity)
                .if_not_exists()
                .to_owned(),
        )
        .await
}

#[async_trait::async_trait]
impl MigrationTrait for MediaTables {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let schema = Schema::new(manager.get_database_backend());
        create(manager, &schema, location::Entity).await?;
        create(manager, &schema, tag::Entity).await?;
        create(manager, &schema, volume::Entity).await?;
        create(manager, &schema, user_metadata::Entity).await?;
        create(manager, &schema, temp_file::Entity).await?;
        Ok(())
    }
}
