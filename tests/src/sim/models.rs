//! Test-only models for the merge rules the example app has no model for: `Custom`
//! (`counter`, the larger count wins) and `Manual` (`note`, concurrent edits are a
//! conflict), with a migrator that adds their tables to the example app's and a registry
//! of both apps' models.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::Schema;
use sync_core::Registry;

/// `MergeRule::Custom`: concurrent edits keep the record with the larger `count`.
pub mod counter {
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
    #[sea_orm(table_name = "sim_counter")]
    #[serde(default)]
    #[sync(merge_with = "keep_larger")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        pub count: i64,
        pub label: String,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    /// The custom merge: the larger count wins, whole record (ties: the local one).
    pub fn keep_larger(local: &Model, remote: &Model) -> Model {
        if remote.count > local.count {
            remote.clone()
        } else {
            local.clone()
        }
    }
}

/// `MergeRule::Manual`: a concurrent edit is kept as a conflict for a person to resolve.
pub mod note {
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
    #[sea_orm(table_name = "sim_note")]
    #[serde(default)]
    #[sync(merge = "manual")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        pub text: String,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}
}

/// The example app's migrations, then the simulator's own tables.
#[derive(Debug)]
pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        let mut all = example_app::Migrator::migrations();
        all.push(Box::new(SimTables));
        all
    }
}

struct SimTables;

impl MigrationName for SimTables {
    fn name(&self) -> &str {
        "m20261201_000001_sim_tables"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for SimTables {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let schema = Schema::new(manager.get_database_backend());
        for statement in [
            schema.create_table_from_entity(counter::Entity),
            schema.create_table_from_entity(note::Entity),
        ] {
            manager.create_table(statement).await?;
        }
        Ok(())
    }
}

/// The example app's models and the simulator's.
pub fn registry() -> Result<Registry, sync_core::DuplicateSyncId> {
    example_app::registry()
        .register::<counter::Entity>()?
        .register::<note::Entity>()
}

/// The sync ids of the two models, as the log names them.
pub const COUNTER: &str = <counter::Entity as sync_core::Syncable>::SYNC_ID;
/// See [`COUNTER`].
pub const NOTE: &str = <note::Entity as sync_core::Syncable>::SYNC_ID;
