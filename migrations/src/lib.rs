//! The sync tables, as sea-orm-migration migrations. Add them to your app's `Migrator`:
//!
//! ```text
//! impl MigratorTrait for Migrator {
//!     fn migrations() -> Vec<Box<dyn MigrationTrait>> {
//!         let mut all = sync_migrations::migrations();
//!         all.push(Box::new(m20260101_000001_my_tables::Migration));
//!         all
//!     }
//! }
//! ```
//!
//! Migration names start with `sync_core_`, so they cannot collide with an app's own
//! (`m2026…` by sea-orm-cli's convention).
#![warn(missing_docs)]

use sea_orm_migration::prelude::*;

mod m0001_sync_tables;
mod m0002_invites_and_peers;
mod m0003_outbox_and_conflicts;
mod m0004_change_ids_rejected_parked;
mod m0005_epochs_and_members;
mod m0006_follower_log;
mod m0007_rewound;
mod sync_key;

pub use sync_key::add_sync_key;

/// Every sync migration, oldest first.
pub fn migrations() -> Vec<Box<dyn MigrationTrait>> {
    vec![
        Box::new(m0001_sync_tables::Migration),
        Box::new(m0002_invites_and_peers::Migration),
        Box::new(m0003_outbox_and_conflicts::Migration),
        Box::new(m0004_change_ids_rejected_parked::Migration),
        Box::new(m0005_epochs_and_members::Migration),
        Box::new(m0006_follower_log::Migration),
        Box::new(m0007_rewound::Migration),
    ]
}

/// A migrator holding only the sync tables, for apps that keep them apart.
#[derive(Debug)]
pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        migrations()
    }
}
