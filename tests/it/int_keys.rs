//! Models with integer primary keys sync by a sync key (`#[sync(key)]`), and their integer
//! foreign keys travel as the referenced record's sync key: the same record may have
//! another integer id on each device, and every reference still points at the right row.

use std::collections::BTreeMap;

use sea_orm::ActiveValue::Set;
use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectionTrait, DatabaseConnection, DbErr, EntityTrait,
    IntoActiveModel, QueryFilter, Schema,
};
use sync_core::{Access, InProcess, Library, Registry, Syncable};
use uuid::Uuid;

use crate::support::{Backend, server_url};

/// A parent in SeaORM 2's dense format, with an `i32` auto-increment key.
pub mod shelf {
    use sea_orm::entity::prelude::*;

    #[sea_orm::model]
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel, sync_core::Syncable)]
    #[sea_orm(table_name = "int_shelf")]
    #[sync(id = "shelf")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i32,
        #[sync(key)]
        #[sea_orm(unique)]
        pub sync_key: Uuid,
        pub name: String,
        #[sea_orm(has_many)]
        pub labels: HasMany<super::label::Entity>,
    }
}

/// A child in the classic format, with an `i64` auto-increment key and an integer foreign
/// key to a shelf (nullable: a book may be on no shelf).
pub mod book {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel, sync_core::Syncable)]
    #[sea_orm(table_name = "int_book")]
    #[sync(id = "book")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i64,
        #[sync(key)]
        #[sea_orm(unique)]
        pub sync_key: Uuid,
        pub title: String,
        pub shelf_id: Option<i32>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {
        #[sea_orm(
            belongs_to = "super::shelf::Entity",
            from = "Column::ShelfId",
            to = "super::shelf::Column::Id"
        )]
        Shelf,
    }

    impl Related<super::shelf::Entity> for Entity {
        fn to() -> RelationDef {
            Relation::Shelf.def()
        }
    }
}

/// A dense-format child whose reference is required (`NOT NULL`).
pub mod label {
    use sea_orm::entity::prelude::*;

    #[sea_orm::model]
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel, sync_core::Syncable)]
    #[sea_orm(table_name = "int_label")]
    #[sync(id = "label")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i32,
        #[sync(key)]
        #[sea_orm(unique)]
        pub sync_key: Uuid,
        pub shelf_id: i32,
        pub text: String,
        #[sea_orm(belongs_to, from = "shelf_id", to = "id")]
        pub shelf: HasOne<super::shelf::Entity>,
    }
}

/// A join table: its composite key's members are references, and it syncs by its own
/// sync key.
pub mod shelf_book {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel, sync_core::Syncable)]
    #[sea_orm(table_name = "int_shelf_book")]
    #[sync(id = "shelf_book")]
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
    pub enum Relation {
        #[sea_orm(
            belongs_to = "super::shelf::Entity",
            from = "Column::ShelfId",
            to = "super::shelf::Column::Id"
        )]
        Shelf,
        #[sea_orm(
            belongs_to = "super::book::Entity",
            from = "Column::BookId",
            to = "super::book::Column::Id"
        )]
        Book,
    }
}

/// A tree: a reference to a record of the same model.
pub mod category {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel, sync_core::Syncable)]
    #[sea_orm(table_name = "int_category")]
    #[sync(id = "category")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i32,
        #[sync(key)]
        #[sea_orm(unique)]
        pub sync_key: Uuid,
        pub name: String,
        pub parent_id: Option<i32>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {
        #[sea_orm(belongs_to = "Entity", from = "Column::ParentId", to = "Column::Id")]
        Parent,
    }
}

fn registry() -> Registry {
    Registry::new()
        .register::<shelf::Entity>()
        .and_then(|r| r.register::<book::Entity>())
        .and_then(|r| r.register::<label::Entity>())
        .and_then(|r| r.register::<shelf_book::Entity>())
        .and_then(|r| r.register::<category::Entity>())
        .expect("distinct sync ids")
}

async fn database(url: &str) -> DatabaseConnection {
    let db = example_app::connect(url).await.expect("connect");
    <sync_migrations::Migrator as sea_orm_migration::MigratorTrait>::up(&db, None)
        .await
        .expect("migrate");
    let schema = Schema::new(db.get_database_backend());
    db.execute(&schema.create_table_from_entity(shelf::Entity))
        .await
        .expect("shelf table");
    db.execute(&schema.create_table_from_entity(book::Entity))
        .await
        .expect("book table");
    db.execute(&schema.create_table_from_entity(label::Entity))
        .await
        .expect("label table");
    db.execute(&schema.create_table_from_entity(shelf_book::Entity))
        .await
        .expect("join table");
    db.execute(&schema.create_table_from_entity(category::Entity))
        .await
        .expect("category table");
    db
}

#[test]
fn the_integer_key_is_local_and_the_sync_key_identifies_the_record() {
    assert_eq!(shelf::Entity::KEY_FIELD, "sync_key");
    const { assert!(shelf::Entity::LOCAL_PRIMARY_KEY) };
    assert_eq!(shelf::Entity::synced_fields(), ["sync_key", "name"]);
    assert_eq!(
        book::Entity::synced_fields(),
        ["sync_key", "title", "shelf_id"]
    );
    assert_eq!(
        label::Entity::synced_fields(),
        ["sync_key", "shelf_id", "text"]
    );
    let key = Uuid::now_v7();
    let active = shelf::Entity::new_active(key);
    assert!(active.id.is_not_set(), "the database assigns the local key");
    assert_eq!(active.sync_key, Set(key));
}

/// Each synced book as `(title, its shelf's name)` and each label as `(text, its shelf's
/// name)`, by sync key, read through this device's own integer ids.
async fn view(db: &DatabaseConnection) -> BTreeMap<Uuid, (String, Option<String>)> {
    let shelves: BTreeMap<i32, shelf::Model> = shelf::Entity::find()
        .all(db)
        .await
        .expect("shelves")
        .into_iter()
        .map(|s| (s.id, s))
        .collect();
    let name = |id: i32| {
        shelves
            .get(&id)
            .map(|s| s.name.clone())
            .expect("a reference points at a stored shelf")
    };
    let mut out = BTreeMap::new();
    for b in book::Entity::find().all(db).await.expect("books") {
        if b.title.starts_with("local ") {
            // The follower's own unrecorded rows, there to offset its ids.
            continue;
        }
        out.insert(b.sync_key, (b.title, b.shelf_id.map(name)));
    }
    for l in label::Entity::find().all(db).await.expect("labels") {
        out.insert(l.sync_key, (l.text, Some(name(l.shelf_id))));
    }
    out
}

async fn shelf_id(db: &DatabaseConnection, key: Uuid) -> i32 {
    shelf::Entity::find()
        .filter(shelf::Column::SyncKey.eq(key))
        .one(db)
        .await
        .expect("read")
        .expect("the shelf is here")
        .id
}

async fn book_by_key(db: &DatabaseConnection, key: Uuid) -> Option<book::Model> {
    book::Entity::find()
        .filter(book::Column::SyncKey.eq(key))
        .one(db)
        .await
        .expect("read")
}

mod sqlite {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn integer_keyed_records_and_their_references_sync_both_ways() {
        super::both_ways(crate::support::Backend::Sqlite).await;
    }
}

mod postgres {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn integer_keyed_records_and_their_references_sync_both_ways() {
        super::both_ways(crate::support::Backend::Postgres).await;
    }
}

mod mysql {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn integer_keyed_records_and_their_references_sync_both_ways() {
        super::both_ways(crate::support::Backend::Mysql).await;
    }
}

/// A leader on `backend` and a write follower on SQLite whose integer ids are offset:
/// writes, updates and deletes both ways keep every reference on the right record.
async fn both_ways(backend: Backend) {
    let test =
        format!("int_keys::{backend:?}::integer_keyed_records_and_their_references_sync_both_ways");
    let Some(server) = server_url(backend, &test) else {
        return;
    };
    let dir = tempfile::tempdir().expect("dir");
    let leader_url = example_app::fresh_database(&server, dir.path())
        .await
        .expect("fresh database");
    let leader = Library::create(database(&leader_url).await, "ints", registry())
        .await
        .expect("leader");
    let follower_url = format!(
        "sqlite://{}?mode=rwc",
        dir.path().join("follower.db").display()
    );
    let follower_db = database(&follower_url).await;
    let device = Library::device_key_of(&follower_db)
        .await
        .expect("device key");
    let invite = leader
        .leader()
        .expect("the leader")
        .invite(Access::Write, std::time::Duration::from_secs(600))
        .await
        .expect("invite");
    leader
        .leader()
        .expect("the leader")
        .redeem_invite(
            &invite.secret,
            Access::Write,
            device.fingerprint(),
            Some("f"),
        )
        .await
        .expect("redeem");
    let follower = Library::join(
        follower_db,
        leader.id(),
        leader.device_id(),
        "ints",
        Access::Write,
        registry(),
    )
    .await
    .expect("join");
    let transport = InProcess::new(leader.leader().expect("the leader"));

    // Rows of the follower's own, never synced, so that its ids run ahead of the leader's.
    follower
        .unrecorded(|txn| {
            Box::pin(async move {
                for n in 0..3 {
                    shelf::ActiveModel {
                        name: Set(format!("local {n}")),
                        ..Default::default()
                    }
                    .insert(txn)
                    .await?;
                    book::ActiveModel {
                        title: Set(format!("local {n}")),
                        shelf_id: Set(None),
                        ..Default::default()
                    }
                    .insert(txn)
                    .await?;
                }
                Ok::<_, DbErr>(())
            })
        })
        .await
        .expect("local rows");

    // The leader writes a shelf, a book on it, a book on no shelf and a label.
    let (a, b1, b2, l1) = leader
        .transaction(|txn| {
            Box::pin(async move {
                let a = shelf::ActiveModel {
                    name: Set("A".into()),
                    ..Default::default()
                }
                .insert(txn)
                .await?;
                let b1 = book::ActiveModel {
                    title: Set("one".into()),
                    shelf_id: Set(Some(a.id)),
                    ..Default::default()
                }
                .insert(txn)
                .await?;
                let b2 = book::ActiveModel {
                    title: Set("two".into()),
                    shelf_id: Set(None),
                    ..Default::default()
                }
                .insert(txn)
                .await?;
                let l1 = label::ActiveModel {
                    text: Set("fiction".into()),
                    shelf_id: Set(a.id),
                    ..Default::default()
                }
                .insert(txn)
                .await?;
                shelf_book::ActiveModel {
                    shelf_id: Set(a.id),
                    book_id: Set(b1.id),
                    ..Default::default()
                }
                .insert(txn)
                .await?;
                Ok::<_, DbErr>((a.sync_key, b1.sync_key, b2.sync_key, l1.sync_key))
            })
        })
        .await
        .expect("leader writes");
    let entry = leader
        .read_log(sync_core::Seq::ZERO, 10)
        .await
        .expect("log");
    let b1_entry = entry
        .iter()
        .find(|e| e.record_id == b1.to_string())
        .expect("the book's entry");
    let data: serde_json::Value =
        serde_json::from_str(b1_entry.data.as_deref().expect("data")).expect("json");
    assert_eq!(
        data,
        serde_json::json!({"sync_key": b1.to_string(), "title": "one", "shelf_id": a.to_string()}),
        "the log holds the referenced shelf's sync key, and no integer id"
    );

    follower
        .follower()
        .expect("a follower")
        .catch_up(&transport, 1_000)
        .await
        .expect("pull");
    let (leader_a, follower_a) = (
        shelf_id(leader.db(), a).await,
        shelf_id(follower.db(), a).await,
    );
    assert_ne!(
        leader_a, follower_a,
        "the same shelf has another id on each device"
    );
    let mine = book_by_key(follower.db(), b1)
        .await
        .expect("the book arrived");
    assert_eq!(mine.shelf_id, Some(follower_a));
    assert_eq!(view(follower.db()).await, view(leader.db()).await);
    let link = shelf_book::Entity::find()
        .one(follower.db())
        .await
        .expect("read")
        .expect("the join row arrived");
    assert_eq!(
        (link.shelf_id, link.book_id),
        (follower_a, mine.id),
        "both members point at the follower's own ids"
    );
    assert_ne!(
        mine.id,
        book_by_key(leader.db(), b1).await.expect("b1").id,
        "the book has another id on each device"
    );
    assert_eq!(
        book_by_key(follower.db(), b2)
            .await
            .expect("arrived")
            .shelf_id,
        None,
        "no shelf stays no shelf"
    );

    // The follower, offline: a new shelf, a book on it, b1 moved there, b2 deleted.
    let c = follower
        .transaction(move |txn| {
            Box::pin(async move {
                let c = shelf::ActiveModel {
                    name: Set("C".into()),
                    ..Default::default()
                }
                .insert(txn)
                .await?;
                book::ActiveModel {
                    title: Set("three".into()),
                    shelf_id: Set(Some(c.id)),
                    ..Default::default()
                }
                .insert(txn)
                .await?;
                let mut one = book::Entity::find()
                    .filter(book::Column::SyncKey.eq(b1))
                    .one(txn)
                    .await?
                    .ok_or_else(|| DbErr::Custom("b1 is missing".into()))?
                    .into_active_model();
                one.shelf_id = Set(Some(c.id));
                one.update(txn).await?;
                let two = book::Entity::find()
                    .filter(book::Column::SyncKey.eq(b2))
                    .one(txn)
                    .await?
                    .ok_or_else(|| DbErr::Custom("b2 is missing".into()))?;
                two.into_active_model().delete(txn).await?;
                Ok::<_, DbErr>(c.sync_key)
            })
        })
        .await
        .expect("follower writes offline");
    let pushed = follower
        .follower()
        .expect("a follower")
        .push_outbox(&transport)
        .await
        .expect("push");
    assert_eq!(pushed.acknowledged, 4);
    let rejected = leader.rejected().await.expect("rejected");
    assert!(rejected.is_empty(), "nothing set aside: {rejected:?}");
    follower
        .follower()
        .expect("a follower")
        .catch_up(&transport, 1_000)
        .await
        .expect("pull");
    let leader_c = shelf_id(leader.db(), c).await;
    assert_ne!(leader_c, shelf_id(follower.db(), c).await);
    assert_eq!(
        book_by_key(leader.db(), b1).await.expect("b1").shelf_id,
        Some(leader_c),
        "the moved book points at the leader's own id of the follower's shelf"
    );
    assert!(book_by_key(leader.db(), b2).await.is_none(), "deleted");
    assert_eq!(view(follower.db()).await, view(leader.db()).await);
    assert_eq!(view(leader.db()).await.len(), 3);

    // The leader moves the label to C, then deletes b1 and shelf A.
    leader
        .transaction(move |txn| {
            Box::pin(async move {
                let mut lab = label::Entity::find()
                    .filter(label::Column::SyncKey.eq(l1))
                    .one(txn)
                    .await?
                    .ok_or_else(|| DbErr::Custom("l1 is missing".into()))?
                    .into_active_model();
                lab.shelf_id = Set(leader_c);
                lab.update(txn).await?;
                for link in shelf_book::Entity::find().all(txn).await? {
                    link.into_active_model().delete(txn).await?;
                }
                let one = book::Entity::find()
                    .filter(book::Column::SyncKey.eq(b1))
                    .one(txn)
                    .await?
                    .ok_or_else(|| DbErr::Custom("b1 is missing".into()))?;
                one.into_active_model().delete(txn).await?;
                let a = shelf::Entity::find()
                    .filter(shelf::Column::SyncKey.eq(a))
                    .one(txn)
                    .await?
                    .ok_or_else(|| DbErr::Custom("a is missing".into()))?;
                a.into_active_model().delete(txn).await?;
                Ok::<_, DbErr>(())
            })
        })
        .await
        .expect("leader edits");
    follower
        .follower()
        .expect("a follower")
        .catch_up(&transport, 1_000)
        .await
        .expect("pull");
    assert!(book_by_key(follower.db(), b1).await.is_none());
    assert!(
        shelf_book::Entity::find()
            .one(follower.db())
            .await
            .expect("read")
            .is_none(),
        "the join row's delete reached the follower"
    );
    assert!(
        shelf::Entity::find()
            .filter(shelf::Column::SyncKey.eq(a))
            .one(follower.db())
            .await
            .expect("read")
            .is_none(),
        "the shelf's delete reached the follower"
    );
    let view_here = view(follower.db()).await;
    assert_eq!(view_here, view(leader.db()).await);
    assert_eq!(view_here.get(&l1).and_then(|v| v.1.as_deref()), Some("C"));
    assert!(
        leader.audit().await.expect("audit").is_empty(),
        "the log agrees with the leader's rows"
    );
    let _ = leader.db().clone().close().await;
    let _ = example_app::drop_database(&leader_url).await;
}

mod migration {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite_add_sync_key_fills_the_rows_a_table_already_has() {
        super::add_sync_key(crate::support::Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_add_sync_key_fills_the_rows_a_table_already_has() {
        super::add_sync_key(crate::support::Backend::Postgres).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn mysql_add_sync_key_fills_the_rows_a_table_already_has() {
        super::add_sync_key(crate::support::Backend::Mysql).await;
    }
}

/// A shelf table of a deployed app, without a sync key and with rows, gets one.
async fn add_sync_key(backend: Backend) {
    use sea_orm::sea_query::{Alias, ColumnDef, Query, Table};
    let test = format!("int_keys::migration::{backend:?}_add_sync_key");
    let Some(server) = server_url(backend, &test) else {
        return;
    };
    let dir = tempfile::tempdir().expect("dir");
    let url = example_app::fresh_database(&server, dir.path())
        .await
        .expect("fresh database");
    let db = example_app::connect(&url).await.expect("connect");
    db.execute(
        &Table::create()
            .table(Alias::new("int_shelf"))
            .col(
                ColumnDef::new(Alias::new("id"))
                    .integer()
                    .not_null()
                    .auto_increment()
                    .primary_key(),
            )
            .col(ColumnDef::new(Alias::new("name")).string().not_null())
            .to_owned(),
    )
    .await
    .expect("the app's table");
    for name in ["a", "b", "c"] {
        db.execute(
            &Query::insert()
                .into_table(Alias::new("int_shelf"))
                .columns([Alias::new("name")])
                .values_panic([name.into()])
                .to_owned(),
        )
        .await
        .expect("a row");
    }
    let manager = sea_orm_migration::SchemaManager::new(&db);
    sync_migrations::add_sync_key(&manager, "int_shelf", "id", "sync_key")
        .await
        .expect("add the sync key");
    let shelves = shelf::Entity::find().all(&db).await.expect("read");
    assert_eq!(shelves.len(), 3);
    let keys: std::collections::BTreeSet<Uuid> = shelves.iter().map(|s| s.sync_key).collect();
    assert_eq!(keys.len(), 3, "every row has a key of its own");
    assert!(
        keys.iter().all(|k| k.get_version_num() == 7),
        "UUID v7, as the hooks make"
    );
    let twin = shelf::ActiveModel {
        sync_key: Set(shelves[0].sync_key),
        name: Set("twin".into()),
        ..Default::default()
    };
    assert!(
        shelf::Entity::insert(twin).exec(&db).await.is_err(),
        "the sync key is unique"
    );
    if backend != Backend::Sqlite {
        let nameless = Query::insert()
            .into_table(Alias::new("int_shelf"))
            .columns([Alias::new("name")])
            .values_panic(["no key".into()])
            .to_owned();
        assert!(
            db.execute(&nameless).await.is_err(),
            "the sync key is NOT NULL"
        );
    }
    let _ = db.close().await;
    let _ = example_app::drop_database(&url).await;
}

/// A reference to a record the follower does not have (its entry parked here) stops the
/// follower on the referring entry, named, rather than storing a NULL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reference_to_a_missing_record_is_named_not_nulled() {
    let dir = tempfile::tempdir().expect("dir");
    let url = |name: &str| format!("sqlite://{}?mode=rwc", dir.path().join(name).display());
    let leader = Library::create(database(&url("leader.db")).await, "ints", registry())
        .await
        .expect("leader");
    let follower = Library::join(
        database(&url("follower.db")).await,
        leader.id(),
        leader.device_id(),
        "ints",
        Access::Read,
        registry(),
    )
    .await
    .expect("join");
    let b = leader
        .transaction(|txn| {
            Box::pin(async move {
                let a = shelf::ActiveModel {
                    name: Set("A".into()),
                    ..Default::default()
                }
                .insert(txn)
                .await?;
                let b = book::ActiveModel {
                    title: Set("on A".into()),
                    shelf_id: Set(Some(a.id)),
                    ..Default::default()
                }
                .insert(txn)
                .await?;
                Ok::<_, DbErr>(b.sync_key)
            })
        })
        .await
        .expect("leader writes");
    // The shelf's entry (seq 1) is set aside on the follower before it arrives.
    follower
        .follower()
        .expect("a follower")
        .park(sync_core::Seq(1))
        .await
        .expect("park");
    let err = follower
        .follower()
        .expect("a follower")
        .catch_up(&InProcess::new(leader.leader().expect("the leader")), 1_000)
        .await
        .expect_err("the book's shelf is missing here");
    match err {
        sync_core::SyncError::Apply(sync_core::ApplyError::Stuck {
            seq,
            model,
            record_id,
            reason,
        }) => {
            assert_eq!(seq, sync_core::Seq(2));
            assert_eq!(model, "book");
            assert_eq!(record_id, b.to_string());
            assert!(reason.contains("does not have"), "{reason}");
        }
        other => panic!("expected the book's entry to be named: {other:?}"),
    }
    assert!(
        book_by_key(follower.db(), b).await.is_none(),
        "nothing stored"
    );
}

/// A pushed change that refers to a record the leader does not have (one the follower
/// keeps unrecorded) is set aside on the leader, with the reason, not stored with a NULL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pushed_reference_to_a_record_the_leader_lacks_is_rejected() {
    let dir = tempfile::tempdir().expect("dir");
    let url = |name: &str| format!("sqlite://{}?mode=rwc", dir.path().join(name).display());
    let leader = Library::create(database(&url("leader.db")).await, "ints", registry())
        .await
        .expect("leader");
    let follower_db = database(&url("follower.db")).await;
    let device = Library::device_key_of(&follower_db)
        .await
        .expect("device key");
    let invite = leader
        .leader()
        .expect("the leader")
        .invite(Access::Write, std::time::Duration::from_secs(600))
        .await
        .expect("invite");
    leader
        .leader()
        .expect("the leader")
        .redeem_invite(
            &invite.secret,
            Access::Write,
            device.fingerprint(),
            Some("f"),
        )
        .await
        .expect("redeem");
    let follower = Library::join(
        follower_db,
        leader.id(),
        leader.device_id(),
        "ints",
        Access::Write,
        registry(),
    )
    .await
    .expect("join");
    let shelf_here = follower
        .unrecorded(|txn| {
            Box::pin(async move {
                let s = shelf::ActiveModel {
                    name: Set("only here".into()),
                    ..Default::default()
                }
                .insert(txn)
                .await?;
                Ok::<_, DbErr>(s.id)
            })
        })
        .await
        .expect("a shelf of this device's own");
    let b = follower
        .transaction(move |txn| {
            Box::pin(async move {
                let b = book::ActiveModel {
                    title: Set("on a shelf the leader lacks".into()),
                    shelf_id: Set(Some(shelf_here)),
                    ..Default::default()
                }
                .insert(txn)
                .await?;
                Ok::<_, DbErr>(b.sync_key)
            })
        })
        .await
        .expect("follower writes");
    let pushed = follower
        .follower()
        .expect("a follower")
        .push_outbox(&InProcess::new(leader.leader().expect("the leader")))
        .await
        .expect("push");
    assert_eq!((pushed.acknowledged, pushed.rejected), (1, 1));
    let rejected = leader.rejected().await.expect("rejected");
    assert_eq!(rejected.len(), 1, "{rejected:?}");
    assert_eq!(rejected[0].record_id, b.to_string());
    assert!(
        rejected[0].reason.contains("does not have"),
        "{}",
        rejected[0].reason
    );
    assert!(
        book_by_key(leader.db(), b).await.is_none(),
        "nothing stored"
    );
}

/// A tree written in one transaction (a child right after its parent, in one run of
/// entries) arrives with every child under its own parent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tree_of_one_model_applies_in_one_run() {
    let dir = tempfile::tempdir().expect("dir");
    let url = |name: &str| format!("sqlite://{}?mode=rwc", dir.path().join(name).display());
    let leader = Library::create(database(&url("leader.db")).await, "ints", registry())
        .await
        .expect("leader");
    let follower = Library::join(
        database(&url("follower.db")).await,
        leader.id(),
        leader.device_id(),
        "ints",
        Access::Read,
        registry(),
    )
    .await
    .expect("join");
    leader
        .transaction(|txn| {
            Box::pin(async move {
                let mut parent = None;
                for depth in 0..4 {
                    let node = category::ActiveModel {
                        name: Set(format!("depth {depth}")),
                        parent_id: Set(parent),
                        ..Default::default()
                    }
                    .insert(txn)
                    .await?;
                    parent = Some(node.id);
                }
                Ok::<_, DbErr>(())
            })
        })
        .await
        .expect("leader writes");
    follower
        .follower()
        .expect("a follower")
        .catch_up(&InProcess::new(leader.leader().expect("the leader")), 1_000)
        .await
        .expect("pull");
    let paths = |rows: Vec<category::Model>| {
        let by_id: BTreeMap<i32, category::Model> =
            rows.iter().map(|c| (c.id, c.clone())).collect();
        rows.iter()
            .map(|c| {
                let parent = c.parent_id.map(|p| by_id[&p].name.clone());
                (c.name.clone(), parent)
            })
            .collect::<Vec<_>>()
    };
    let here = paths(
        category::Entity::find()
            .all(follower.db())
            .await
            .expect("read"),
    );
    assert_eq!(here.len(), 4);
    assert_eq!(
        here,
        paths(
            category::Entity::find()
                .all(leader.db())
                .await
                .expect("read")
        )
    );
    assert_eq!(here[3], ("depth 3".to_owned(), Some("depth 2".to_owned())));
}

/// Rows a database held before its library (here written without hooks) are recorded as
/// the library's initial state parents first, whatever their models' names and keys: a
/// book before its shelf, or a child category before its parent, would stop a follower.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_that_predate_the_library_are_recorded_parents_first() {
    let dir = tempfile::tempdir().expect("dir");
    let url = |name: &str| format!("sqlite://{}?mode=rwc", dir.path().join(name).display());
    let db = database(&url("leader.db")).await;
    // Keys that sort children first.
    let (low, high) = (Uuid::from_u128(1), Uuid::from_u128(u128::MAX));
    let shelf = shelf::Entity::insert(shelf::ActiveModel {
        sync_key: Set(high),
        name: Set("top".to_owned()),
        ..Default::default()
    })
    .exec(&db)
    .await
    .expect("shelf")
    .last_insert_id;
    book::Entity::insert(book::ActiveModel {
        sync_key: Set(low),
        title: Set("on the top shelf".to_owned()),
        shelf_id: Set(Some(shelf)),
        ..Default::default()
    })
    .exec(&db)
    .await
    .expect("book");
    let root = category::Entity::insert(category::ActiveModel {
        sync_key: Set(high),
        name: Set("root".to_owned()),
        parent_id: Set(None),
        ..Default::default()
    })
    .exec(&db)
    .await
    .expect("root")
    .last_insert_id;
    category::Entity::insert(category::ActiveModel {
        sync_key: Set(low),
        name: Set("leaf".to_owned()),
        parent_id: Set(Some(root)),
        ..Default::default()
    })
    .exec(&db)
    .await
    .expect("leaf");

    let leader = Library::create(db, "ints", registry())
        .await
        .expect("leader");
    assert_eq!(leader.latest_seq().await.expect("seq"), sync_core::Seq(4));
    let follower = Library::join(
        database(&url("follower.db")).await,
        leader.id(),
        leader.device_id(),
        "ints",
        Access::Read,
        registry(),
    )
    .await
    .expect("join");
    follower
        .follower()
        .expect("a follower")
        .catch_up(&InProcess::new(leader.leader().expect("the leader")), 1_000)
        .await
        .expect("the initial state applies");
    assert_eq!(
        follower.dump().await.expect("dump"),
        leader.dump().await.expect("dump")
    );
}

/// A sync key whose column its app forgot to make unique.
pub mod loose {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel, sync_core::Syncable)]
    #[sea_orm(table_name = "int_loose")]
    #[sync(id = "loose")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i32,
        #[sync(key)]
        pub sync_key: Uuid,
        pub name: String,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}
}

mod unique_index {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite() {
        super::sync_key_needs_a_unique_index(crate::support::Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres() {
        super::sync_key_needs_a_unique_index(crate::support::Backend::Postgres).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn mysql() {
        super::sync_key_needs_a_unique_index(crate::support::Backend::Mysql).await;
    }
}

/// A library does not open on a sync key without a unique index (apply would fail on every
/// entry, far from whoever can fix the schema), and opens once the index is there.
async fn sync_key_needs_a_unique_index(backend: Backend) {
    let test = format!("int_keys::unique_index::{backend:?}");
    let Some(server) = server_url(backend, &test) else {
        return;
    };
    let dir = tempfile::tempdir().expect("dir");
    let url = example_app::fresh_database(&server, dir.path())
        .await
        .expect("fresh database");
    let db = example_app::connect(&url).await.expect("connect");
    <sync_migrations::Migrator as sea_orm_migration::MigratorTrait>::up(&db, None)
        .await
        .expect("sync tables");
    let schema = Schema::new(db.get_database_backend());
    db.execute(&schema.create_table_from_entity(loose::Entity))
        .await
        .expect("table");
    let registry = || {
        Registry::new()
            .register::<loose::Entity>()
            .expect("one model")
    };
    match Library::create(db.clone(), "loose", registry()).await {
        Err(sync_core::OpenError::SyncKeyNotUnique {
            model,
            table,
            column,
        }) => {
            assert_eq!(
                (model.as_str(), table.as_str(), column.as_str()),
                ("loose", "int_loose", "sync_key")
            );
        }
        other => panic!("expected SyncKeyNotUnique, got {other:?}"),
    }
    db.execute_unprepared("CREATE UNIQUE INDEX int_loose_sync_key ON int_loose (sync_key)")
        .await
        .expect("the index");
    Library::open_or_create(db.clone(), "loose", registry())
        .await
        .expect("opens once the sync key is unique");
    let _ = db.close().await;
    let _ = example_app::drop_database(&url).await;
}
