//! The example app: a small media library that syncs with `sync-core`.
//!
//! The binary (`src/main.rs`) is a thin clap shell over this library, so that the tests
//! drive exactly what the CLI does.

pub mod bench;
pub mod database;
pub mod exporter;
pub mod load;
pub mod migrator;
pub mod models;
pub mod net;
pub mod ops;
pub mod web;

pub use database::{connect, drop_database, fresh_database};
pub use migrator::Migrator;

use sync_core::Registry;

/// Every model of the app, synced or not (`temp_file` is registered and ignored).
pub fn registry() -> Registry {
    use models::*;
    // Distinct sync ids are a property of this code, checked by the `declarations_follow_the_attributes` test.
    Registry::new()
        .register::<location::Entity>()
        .and_then(|r| r.register::<tag::Entity>())
        .and_then(|r| r.register::<volume::Entity>())
        .and_then(|r| r.register::<user_metadata::Entity>())
        .and_then(|r| r.register::<temp_file::Entity>())
        .unwrap_or_else(|e| unreachable!("{e}"))
}
