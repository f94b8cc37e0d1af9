//! Records that reference each other apply in an order the follower's database accepts.

use sea_orm::ActiveValue::Set;
use sea_orm::{ActiveModelTrait, ConnectionTrait, DbErr, EntityTrait, ModelTrait, Schema};
use sync_core::{Access, InProcess, Library, Registry, Seq};
use uuid::Uuid;

pub mod parent {
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
    #[sea_orm(table_name = "fk_parent")]
    #[serde(default)]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        pub name: String,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {
        #[sea_orm(has_many = "super::child::Entity")]
        Child,
    }

    impl Related<super::child::Entity> for Entity {
        fn to() -> RelationDef {
            Relation::Child.def()
        }
    }
}

pub mod child {
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
    #[sea_orm(table_name = "fk_child")]
    #[serde(default)]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        pub parent_id: Uuid,
        pub name: String,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {
        #[sea_orm(
            belongs_to = "super::parent::Entity",
            from = "Column::ParentId",
            to = "super::parent::Column::Id"
        )]
        Parent,
    }

    impl Related<super::parent::Entity> for Entity {
        fn to() -> RelationDef {
            Relation::Parent.def()
        }
    }
}

fn registry() -> Registry {
    Registry::new()
        .register::<parent::Entity>()
        .and_then(|r| r.register::<child::Entity>())
        .expect("distinct sync ids")
}

/// A SQLite database with the sync tables and the two tables (with their foreign key).
async fn database(dir: &std::path::Path, name: &str) -> sea_orm::DatabaseConnection {
    let url = format!("sqlite://{}?mode=rwc", dir.join(name).display());
    let db = example_app::connect(&url).await.expect("connect");
    <sync_migrations::Migrator as sea_orm_migration::MigratorTrait>::up(&db, None)
        .await
        .expect("migrate");
    let schema = Schema::new(db.get_database_backend());
    db.execute(&schema.create_table_from_entity(parent::Entity))
        .await
        .expect("parent table");
    db.execute(&schema.create_table_from_entity(child::Entity))
        .await
        .expect("child table");
    db
}

async fn put_parent(library: &Library, id: Uuid, name: &str) {
    let model = parent::ActiveModel {
        id: Set(id),
        name: Set(name.to_owned()),
    };
    library
        .transaction(|txn| {
            Box::pin(async move {
                let exists = parent::Entity::find_by_id(id).one(txn).await?.is_some();
                if exists {
                    model.update(txn).await?;
                } else {
                    model.insert(txn).await?;
                }
                Ok::<_, DbErr>(())
            })
        })
        .await
        .expect("put parent");
}

async fn put_child(library: &Library, id: Uuid, parent_id: Uuid, name: &str) {
    let model = child::ActiveModel {
        id: Set(id),
        parent_id: Set(parent_id),
        name: Set(name.to_owned()),
    };
    library
        .transaction(|txn| {
            Box::pin(async move {
                let exists = child::Entity::find_by_id(id).one(txn).await?.is_some();
                if exists {
                    model.update(txn).await?;
                } else {
                    model.insert(txn).await?;
                }
                Ok::<_, DbErr>(())
            })
        })
        .await
        .expect("put child");
}

async fn delete_parent(library: &Library, id: Uuid) {
    library
        .transaction(|txn| {
            Box::pin(async move {
                if let Some(found) = parent::Entity::find_by_id(id).one(txn).await? {
                    found.delete(txn).await?;
                }
                Ok::<_, DbErr>(())
            })
        })
        .await
        .expect("delete parent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parents_and_children_apply_in_an_order_the_database_accepts() {
    let dir = tempfile::tempdir().expect("dir");
    let leader = Library::create(database(dir.path(), "leader.db").await, "fk", registry())
        .await
        .expect("leader");
    let follower_db = database(dir.path(), "follower.db").await;
    // The follower's database enforces the foreign key: an orphan is refused.
    let orphan = child::ActiveModel {
        id: Set(Uuid::now_v7()),
        parent_id: Set(Uuid::now_v7()),
        name: Set("orphan".into()),
    };
    assert!(
        child::Entity::insert(orphan)
            .exec_without_returning(&follower_db)
            .await
            .is_err(),
        "foreign keys are enforced"
    );
    let follower = Library::join(
        follower_db,
        leader.id(),
        leader.device_id(),
        "fk",
        Access::Read,
        registry(),
    )
    .await
    .expect("join");

    // A parent created, a child of it, the parent edited (its creation is superseded
    // within one pull), a second parent, the child moved to it, the first parent deleted.
    let (p1, p2, c) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    put_parent(&leader, p1, "first").await;
    put_child(&leader, c, p1, "child").await;
    put_parent(&leader, p1, "first, renamed").await;
    put_parent(&leader, p2, "second").await;
    put_child(&leader, c, p2, "child, moved").await;
    delete_parent(&leader, p1).await;
    put_parent(&leader, p2, "second, renamed").await;

    // Everything in one pull, then entry by entry on a second follower: both accepted.
    follower
        .follower()
        .expect("a follower")
        .catch_up(&InProcess::new(leader.leader().expect("the leader")), 1_000)
        .await
        .expect("one batch applies");
    assert_eq!(follower.position().await.expect("position").seq, Seq(7));
    assert_eq!(
        follower.dump().await.expect("dump"),
        leader.dump().await.expect("dump")
    );
    let one_by_one = Library::join(
        database(dir.path(), "second.db").await,
        leader.id(),
        leader.device_id(),
        "fk",
        Access::Read,
        registry(),
    )
    .await
    .expect("join");
    one_by_one
        .follower()
        .expect("a follower")
        .catch_up(&InProcess::new(leader.leader().expect("the leader")), 1)
        .await
        .expect("entry by entry applies");
    assert_eq!(
        one_by_one.dump().await.expect("dump"),
        leader.dump().await.expect("dump")
    );
}
