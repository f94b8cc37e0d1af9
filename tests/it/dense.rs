//! SeaORM 2's dense entity format (`#[sea_orm::model]`, what `sea-orm-cli generate entity`
//! writes) with `#[derive(Syncable)]`: registered, written through `Library::transaction`,
//! and pulled by a follower like a classic `DeriveEntityModel` model.

use sea_orm::ActiveValue::Set;
use sea_orm::{ActiveModelTrait, ConnectionTrait, DbErr, EntityTrait, Schema};
use sync_core::{Access, InProcess, Library, Registry, Syncable};
use uuid::Uuid;

use crate::support::{Backend, server_url};

pub mod author {
    use sea_orm::entity::prelude::*;

    #[sea_orm::model]
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel, sync_core::Syncable)]
    #[sea_orm(table_name = "dense_author")]
    #[sync(id = "author")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        pub name: String,
        #[sea_orm(has_many)]
        pub posts: HasMany<super::post::Entity>,
    }
}

pub mod post {
    use sea_orm::entity::prelude::*;

    #[sea_orm::model]
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel, sync_core::Syncable)]
    #[sea_orm(table_name = "dense_post")]
    #[sync(id = "post", merge = "field")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        pub author_id: Uuid,
        pub title: String,
        /// Stays on the device that wrote it.
        #[sync(local)]
        pub draft_note: Option<String>,
        #[sea_orm(belongs_to, from = "author_id", to = "id")]
        pub author: HasOne<super::author::Entity>,
    }
}

fn registry() -> Registry {
    Registry::new()
        .register::<author::Entity>()
        .and_then(|r| r.register::<post::Entity>())
        .expect("distinct sync ids")
}

/// `url`'s database with the sync tables and the two dense-format tables.
async fn database(url: &str) -> sea_orm::DatabaseConnection {
    let db = example_app::connect(url).await.expect("connect");
    <sync_migrations::Migrator as sea_orm_migration::MigratorTrait>::up(&db, None)
        .await
        .expect("migrate");
    let schema = Schema::new(db.get_database_backend());
    db.execute(&schema.create_table_from_entity(author::Entity))
        .await
        .expect("author table");
    db.execute(&schema.create_table_from_entity(post::Entity))
        .await
        .expect("post table");
    db
}

#[test]
fn dense_models_declare_what_their_attributes_say() {
    assert_eq!(author::Entity::SYNC_ID, "author");
    assert_eq!(post::Entity::MERGE, sync_core::MergeRule::FieldLevel);
    assert_eq!(
        post::Entity::synced_fields(),
        ["id", "author_id", "title"],
        "the relation field lives on ModelEx only, and the local field does not sync"
    );
    assert_eq!(registry().synced_models(), ["author", "post"]);
}

mod sqlite {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dense_format_models_sync_from_leader_to_follower() {
        super::leader_to_follower(crate::support::Backend::Sqlite).await;
    }
}

mod postgres {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dense_format_models_sync_from_leader_to_follower() {
        super::leader_to_follower(crate::support::Backend::Postgres).await;
    }
}

mod mysql {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dense_format_models_sync_from_leader_to_follower() {
        super::leader_to_follower(crate::support::Backend::Mysql).await;
    }
}

/// A leader on `backend` writes dense-format models; a follower on SQLite pulls them.
async fn leader_to_follower(backend: Backend) {
    let test = format!("dense::{backend:?}::dense_format_models_sync_from_leader_to_follower");
    let Some(server) = server_url(backend, &test) else {
        return;
    };
    let dir = tempfile::tempdir().expect("dir");
    let leader_url = example_app::fresh_database(&server, dir.path())
        .await
        .expect("fresh database");
    let leader = Library::create(database(&leader_url).await, "dense", registry())
        .await
        .expect("leader");
    let follower_url = format!(
        "sqlite://{}?mode=rwc",
        dir.path().join("follower.db").display()
    );
    let follower = Library::join(
        database(&follower_url).await,
        leader.id(),
        leader.device_id(),
        "dense",
        Access::Read,
        registry(),
    )
    .await
    .expect("join");

    let (author_id, post_id) = (Uuid::now_v7(), Uuid::now_v7());
    leader
        .transaction(|txn| {
            Box::pin(async move {
                author::ActiveModel {
                    id: Set(author_id),
                    name: Set("Ada".into()),
                }
                .insert(txn)
                .await?;
                post::ActiveModel {
                    id: Set(post_id),
                    author_id: Set(author_id),
                    title: Set("Notes".into()),
                    draft_note: Set(Some("leader only".into())),
                }
                .insert(txn)
                .await?;
                Ok::<_, DbErr>(())
            })
        })
        .await
        .expect("write through the library");
    leader
        .transaction(|txn| {
            Box::pin(async move {
                post::ActiveModel {
                    id: Set(post_id),
                    title: Set("Notes, edited".into()),
                    ..Default::default()
                }
                .update(txn)
                .await?;
                Ok::<_, DbErr>(())
            })
        })
        .await
        .expect("edit through the library");

    follower
        .follower()
        .expect("a follower")
        .catch_up(&InProcess::new(leader.leader().expect("the leader")), 1_000)
        .await
        .expect("pull");

    let db = follower.db();
    let author = author::Entity::find_by_id(author_id)
        .one(db)
        .await
        .expect("read")
        .expect("the author reached the follower");
    assert_eq!(author.name, "Ada");
    let post = post::Entity::find_by_id(post_id)
        .one(db)
        .await
        .expect("read")
        .expect("the post reached the follower");
    assert_eq!(post.author_id, author_id);
    assert_eq!(post.title, "Notes, edited");
    assert_eq!(post.draft_note, None, "a local field stays on its device");
    assert_eq!(
        follower.dump().await.expect("dump"),
        leader.dump().await.expect("dump")
    );
    let _ = leader.db().clone().close().await;
    // Best effort: a leftover test database is untidy, not wrong.
    let _ = example_app::drop_database(&leader_url).await;
}
