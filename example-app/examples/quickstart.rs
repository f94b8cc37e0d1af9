//! An app's start-up with seaorm-sync: a synced model in the app's `Migrator`, the library
//! opened on every start (created on the first), a write, a leader serving over QUIC, and
//! a follower on another database that joins and follows it. Both connect the usual way,
//! `Database::connect(url)`.
//!
//! Dependencies (sync-core, sync-transport and sync-migrations are this repository's
//! crates, as path or git dependencies):
//!
//! ```toml
//! [dependencies]
//! sync-core = { path = "../seaorm-sync/sync-core" }
//! sync-transport = { path = "../seaorm-sync/sync-transport" }
//! sync-migrations = { path = "../seaorm-sync/migrations" }
//! sea-orm = { version = "2.0.4", features = ["macros", "with-uuid", "runtime-tokio-rustls", "sqlx-sqlite"] }
//! sea-orm-migration = { version = "2.0.4", features = ["runtime-tokio-rustls", "sqlx-sqlite"] }
//! tokio = { version = "1", features = ["rt-multi-thread", "macros"] }
//! serde = { version = "1", features = ["derive"] }
//! async-trait = "0.1"
//! anyhow = "1"
//! ```
//!
//! Run it (`cargo run -p example-app --example quickstart [DIR]`) twice: the second run
//! opens the library and the membership the first one made.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use sea_orm::{ActiveModelTrait, ActiveValue::Set, Database, DbErr, EntityTrait, PaginatorTrait};
use sea_orm_migration::{MigrationName, MigrationTrait, MigratorTrait, SchemaManager};
use sync_core::{Access, FollowConfig, Library, OpenError, Registry};
use sync_transport::{Client, ClientConfig, JoinToken, QuicTransport, Server, ServerConfig};

/// The app's synced model.
pub mod note {
    use sea_orm::entity::prelude::*;
    use serde::{Deserialize, Serialize};

    #[derive(
        Clone, Debug, PartialEq, Eq, DeriveEntityModel, Serialize, Deserialize, sync_core::Syncable,
    )]
    #[sea_orm(table_name = "note")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid, // globally unique keys only: a UUID v7, filled on insert
        pub text: String,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}
    // No `impl ActiveModelBehavior`: the derive wires the capture hooks.
}

/// The app's `Migrator`: the sync tables, then the app's own.
pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        let mut all = sync_migrations::migrations();
        all.push(Box::new(CreateNote));
        all
    }
}

struct CreateNote;

impl MigrationName for CreateNote {
    fn name(&self) -> &str {
        "m20260101_000001_create_note"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for CreateNote {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let schema = sea_orm::Schema::new(manager.get_database_backend());
        let table = schema
            .create_table_from_entity(note::Entity)
            .if_not_exists()
            .to_owned();
        manager.create_table(table).await
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let dir = match std::env::args_os().nth(1) {
        Some(dir) => PathBuf::from(dir),
        None => std::env::temp_dir().join("seaorm-sync-quickstart"),
    };
    run(&dir).await
}

/// The leader's database is `DIR/leader.db`, the follower's `DIR/follower.db`.
pub async fn run(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let url = |file: &str| format!("sqlite://{}?mode=rwc", dir.join(file).display());
    let registry = Registry::new().register::<note::Entity>()?;

    // The leader: migrate, then open the library, which the first run creates.
    let db = Database::connect(url("leader.db")).await?;
    Migrator::up(&db, None).await?;
    let leader = Library::open_or_create(db, "Notes", registry.clone()).await?;

    // Write through the library's connection handle, kept where an app keeps its
    // `DatabaseConnection`: each write to a synced model commits with its log entry
    // (`conn.begin()` / `conn.transaction(…)` group several).
    let conn = leader.connection();
    note::ActiveModel {
        text: Set("hello".into()),
        ..Default::default()
    }
    .insert(&conn)
    .await?;

    // Serving over QUIC (a real leader listens on a known address, e.g. 0.0.0.0:7447).
    let key = leader.device_key().await?;
    let server = Server::bind(
        "127.0.0.1:0".parse()?,
        &key,
        vec![leader.clone()],
        ServerConfig::default(),
    )
    .await?;
    let address = server.local_addr().to_string();

    // A follower: another database (another device, in a real app).
    let db = Database::connect(url("follower.db")).await?;
    Migrator::up(&db, None).await?;
    let client = Client::new(Library::device_key_of(&db).await?, ClientConfig::default());
    let follower = match Library::open_default(db.clone(), registry.clone()).await {
        Ok(follower) => follower, // joined on an earlier run
        Err(OpenError::NoLibrary) => {
            // The leader invites; the token travels to the new device as text
            // (`token.encode()`, then `JoinToken::decode`), and it joins with it.
            let invite = leader
                .leader()?
                .invite(Access::Write, Duration::from_secs(600))
                .await?;
            let token = JoinToken::new(&invite, &address, key.fingerprint());
            let joined = client.join(&token, Some("laptop")).await?;
            Library::join(
                db,
                joined.library_id,
                joined.leader_device_id,
                &joined.library_name,
                joined.access,
                registry,
            )
            .await?
        }
        Err(e) => return Err(e.into()),
    };
    let transport = Arc::new(QuicTransport::new(
        client,
        &address,
        key.fingerprint(),
        follower.id(),
    ));
    let follow = follower
        .follower()?
        .start_following(transport, FollowConfig::default());

    let latest = leader.latest_seq().await?;
    follow
        .wait_for(Duration::from_secs(30), |status| status.position >= latest)
        .await
        .context("the follower did not catch up within 30 s")?;
    let notes = note::Entity::find().count(follower.db()).await?;
    println!(
        "library {}: the follower has caught up, {notes} notes",
        follower.id()
    );

    follow.stop().await;
    server.shutdown().await;
    Ok(())
}
