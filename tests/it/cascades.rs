//! Database cascades (`ON DELETE CASCADE`, `SET NULL`) reach every device with the same
//! outcome: the device that deletes a parent records what its database cascades, children
//! first, so that followers (even one whose schema has no foreign keys) end with the same
//! rows, and the leader's log agrees with its tables.

use sea_orm::ActiveValue::Set;
use sea_orm::sea_query::TableCreateStatement;
use sea_orm::{
    ActiveModelTrait, ColumnTrait, Condition, ConnectionTrait, DatabaseConnection, EntityTrait,
    ModelTrait, PaginatorTrait, QueryFilter, Schema, TransactionSession, TransactionTrait,
};
use sync_core::{Access, ChangeOp, InProcess, Library, Registry};
use uuid::Uuid;

use crate::support::{Backend, server_url};

/// The parent, in SeaORM 2's dense format: `i32` auto-increment key and a sync key.
pub mod owner {
    use sea_orm::entity::prelude::*;

    #[sea_orm::model]
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel, sync_core::Syncable)]
    #[sea_orm(table_name = "cas_owner")]
    #[sync(id = "cas_owner")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i32,
        #[sync(key)]
        #[sea_orm(unique)]
        pub sync_key: Uuid,
        pub name: String,
        #[sea_orm(has_many)]
        pub items: HasMany<super::item::Entity>,
    }
}

/// A child deleted with its owner (`ON DELETE CASCADE`), in SeaORM 2's dense format.
pub mod item {
    use sea_orm::entity::prelude::*;

    #[sea_orm::model]
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel, sync_core::Syncable)]
    #[sea_orm(table_name = "cas_item")]
    #[sync(id = "cas_item")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i32,
        #[sync(key)]
        #[sea_orm(unique)]
        pub sync_key: Uuid,
        pub owner_id: i32,
        pub name: String,
        #[sea_orm(belongs_to, from = "owner_id", to = "id", on_delete = "Cascade")]
        pub owner: HasOne<super::owner::Entity>,
    }
}

/// A grandchild deleted with its item (`ON DELETE CASCADE`): a `Uuid`-keyed model with an
/// integer reference.
pub mod part {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel, sync_core::Syncable)]
    #[sea_orm(table_name = "cas_part")]
    #[sync(id = "cas_part")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        pub item_id: i32,
        pub name: String,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {
        #[sea_orm(
            belongs_to = "super::item::Entity",
            from = "Column::ItemId",
            to = "super::item::Column::Id",
            on_delete = "Cascade"
        )]
        Item,
    }
}

/// A child whose reference is set to NULL when its owner goes (`ON DELETE SET NULL`).
pub mod note {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel, sync_core::Syncable)]
    #[sea_orm(table_name = "cas_note")]
    #[sync(id = "cas_note")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i32,
        #[sync(key)]
        #[sea_orm(unique)]
        pub sync_key: Uuid,
        pub owner_id: Option<i32>,
        pub text: String,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {
        #[sea_orm(
            belongs_to = "super::owner::Entity",
            from = "Column::OwnerId",
            to = "super::owner::Column::Id",
            on_delete = "SetNull"
        )]
        Owner,
    }
}

/// A model that never syncs, deleted with its owner by the database alone: it is this
/// device's own.
pub mod mark {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel, sync_core::Syncable)]
    #[sea_orm(table_name = "cas_mark")]
    #[sync(local)]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i32,
        pub owner_id: i32,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {
        #[sea_orm(
            belongs_to = "super::owner::Entity",
            from = "Column::OwnerId",
            to = "super::owner::Column::Id",
            on_delete = "Cascade"
        )]
        Owner,
    }
}

fn registry() -> Registry {
    Registry::new()
        .register::<owner::Entity>()
        .and_then(|r| r.register::<item::Entity>())
        .and_then(|r| r.register::<part::Entity>())
        .and_then(|r| r.register::<note::Entity>())
        .and_then(|r| r.register::<mark::Entity>())
        .expect("distinct sync ids")
}

/// The same table without its foreign keys.
fn without_foreign_keys(table: &TableCreateStatement) -> TableCreateStatement {
    let mut plain = TableCreateStatement::new();
    if let Some(name) = table.get_table_name() {
        plain.table(name.clone());
    }
    for column in table.get_columns() {
        plain.col(column.clone());
    }
    for index in table.get_indexes() {
        plain.index(&mut index.clone());
    }
    plain
}

/// A migrated database with the test's tables, with or without their foreign keys.
async fn database(url: &str, foreign_keys: bool) -> DatabaseConnection {
    let db = example_app::connect(url).await.expect("connect");
    <sync_migrations::Migrator as sea_orm_migration::MigratorTrait>::up(&db, None)
        .await
        .expect("migrate");
    let schema = Schema::new(db.get_database_backend());
    let tables = [
        schema.create_table_from_entity(owner::Entity),
        schema.create_table_from_entity(item::Entity),
        schema.create_table_from_entity(part::Entity),
        schema.create_table_from_entity(note::Entity),
        schema.create_table_from_entity(mark::Entity),
    ];
    for table in tables {
        let table = if foreign_keys {
            table
        } else {
            without_foreign_keys(&table)
        };
        db.execute(&table).await.expect("table");
    }
    db
}

/// Writes an owner with two items (each with two parts), a note and a local mark.
async fn family(conn: &sync_core::SyncConnection, name: &str) -> owner::Model {
    let txn = conn.begin().await.expect("begin");
    let owner = owner::ActiveModel {
        name: Set(name.to_owned()),
        ..Default::default()
    }
    .insert(&txn)
    .await
    .expect("owner");
    for i in 0..2 {
        let item = item::ActiveModel {
            owner_id: Set(owner.id),
            name: Set(format!("{name} item {i}")),
            ..Default::default()
        }
        .insert(&txn)
        .await
        .expect("item");
        for p in 0..2 {
            part::ActiveModel {
                id: Set(Uuid::now_v7()),
                item_id: Set(item.id),
                name: Set(format!("{name} part {i}.{p}")),
            }
            .insert(&txn)
            .await
            .expect("part");
        }
    }
    note::ActiveModel {
        owner_id: Set(Some(owner.id)),
        text: Set(format!("about {name}")),
        ..Default::default()
    }
    .insert(&txn)
    .await
    .expect("note");
    mark::ActiveModel {
        owner_id: Set(owner.id),
        ..Default::default()
    }
    .insert(&txn)
    .await
    .expect("mark");
    txn.commit().await.expect("commit");
    owner
}

async fn by_name(db: &DatabaseConnection, name: &str) -> owner::Model {
    owner::Entity::find()
        .filter(owner::Column::Name.eq(name))
        .one(db)
        .await
        .expect("read")
        .expect("the owner is here")
}

/// What is left of the owners named: items, parts, and notes still pointing at one.
async fn left_of(db: &DatabaseConnection, names: &[&str]) -> (u64, u64, u64) {
    let mut items = 0;
    let mut parts = 0;
    let mut notes = 0;
    for name in names {
        items += item::Entity::find()
            .filter(item::Column::Name.starts_with(format!("{name} ")))
            .count(db)
            .await
            .expect("items");
        parts += part::Entity::find()
            .filter(part::Column::Name.starts_with(format!("{name} ")))
            .count(db)
            .await
            .expect("parts");
        notes += note::Entity::find()
            .filter(note::Column::Text.eq(format!("about {name}")))
            .filter(note::Column::OwnerId.is_not_null())
            .count(db)
            .await
            .expect("notes");
    }
    (items, parts, notes)
}

mod sqlite {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cascades_reach_every_device_with_the_same_outcome() {
        super::cascades(crate::support::Backend::Sqlite).await;
    }
}

mod postgres {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cascades_reach_every_device_with_the_same_outcome() {
        super::cascades(crate::support::Backend::Postgres).await;
    }
}

mod mysql {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cascades_reach_every_device_with_the_same_outcome() {
        super::cascades(crate::support::Backend::Mysql).await;
    }
}

/// A leader and a write follower on `backend` (foreign keys with their actions), a read
/// follower on SQLite without foreign keys. Parents are deleted on the leader by
/// `model.delete(&conn)`, by SeaORM's `delete_many().exec(&conn)`, inside `conn.begin()`
/// and by the handle's `delete_many`, and on the write follower (pushed, while the leader
/// holds a child the follower has not seen). Every device ends with the same dump, the
/// leader's audit is empty, and the log records each child before its parent.
async fn cascades(backend: Backend) {
    let test = format!("cascades::{backend:?}::cascades_reach_every_device_with_the_same_outcome");
    let Some(server) = server_url(backend, &test) else {
        return;
    };
    let dir = tempfile::tempdir().expect("dir");
    let leader_url = example_app::fresh_database(&server, dir.path())
        .await
        .expect("fresh database");
    let leader = Library::create(database(&leader_url, true).await, "cascades", registry())
        .await
        .expect("leader");
    let writer_url = example_app::fresh_database(&server, dir.path())
        .await
        .expect("fresh database");
    let reader_url = example_app::fresh_database("sqlite", dir.path())
        .await
        .expect("fresh database");
    let mut followers = Vec::new();
    for (url, foreign_keys, access) in [
        (&writer_url, true, Access::Write),
        (&reader_url, false, Access::Read),
    ] {
        let db = database(url, foreign_keys).await;
        let device = Library::device_key_of(&db).await.expect("device key");
        let view = leader.leader().expect("the leader");
        let invite = view
            .invite(access, std::time::Duration::from_secs(600))
            .await
            .expect("invite");
        view.redeem_invite(&invite.secret, access, device.fingerprint(), None)
            .await
            .expect("redeem");
        followers.push(
            Library::join(
                db,
                leader.id(),
                leader.device_id(),
                "cascades",
                access,
                registry(),
            )
            .await
            .expect("join"),
        );
    }
    let transport = InProcess::new(leader.leader().expect("the leader"));
    let catch_up = |follower: &Library| {
        let transport = &transport;
        let follower = follower.clone();
        async move {
            follower
                .follower()
                .expect("a follower")
                .sync_round(transport, 1_000, |_, _| {})
                .await
                .expect("sync round");
        }
    };

    let conn = leader.connection();
    let names = ["lone", "plain", "txn", "bulk", "kept"];
    for name in names {
        family(&conn, name).await;
    }
    for follower in &followers {
        catch_up(follower).await;
    }
    let (writer, reader) = (&followers[0], &followers[1]);
    assert_eq!(left_of(reader.db(), &names).await, (10, 20, 5));

    let before = leader.latest_seq().await.expect("latest seq");
    // 1. A lone delete on the handle.
    by_name(leader.db(), "lone")
        .await
        .delete(&conn)
        .await
        .expect("lone delete");
    // 2. SeaORM's own `delete_many` on the handle (a captured `DELETE`).
    let removed = owner::Entity::delete_many()
        .filter(owner::Column::Name.eq("plain"))
        .exec(&conn)
        .await
        .expect("plain delete");
    assert_eq!(removed.rows_affected, 1);
    // 3. Through the hooks, in a transaction.
    let txn = conn.begin().await.expect("begin");
    by_name(leader.db(), "txn")
        .await
        .delete(&txn)
        .await
        .expect("delete in a transaction");
    txn.commit().await.expect("commit");
    // 4. The handle's bulk delete.
    let removed = conn
        .delete_many::<owner::Entity>(Condition::all().add(owner::Column::Name.eq("bulk")))
        .await
        .expect("bulk delete");
    assert_eq!(removed, 1);

    let log = leader.read_log(before, 1_000).await.expect("log");
    let count = |model: &str, op: ChangeOp| {
        log.iter()
            .filter(|e| e.model == model && e.op == op)
            .count()
    };
    assert_eq!(count("cas_owner", ChangeOp::Delete), 4);
    assert_eq!(count("cas_item", ChangeOp::Delete), 8);
    assert_eq!(count("cas_part", ChangeOp::Delete), 16);
    assert_eq!(
        count("cas_note", ChangeOp::Upsert),
        4,
        "SET NULL is an upsert"
    );
    for entry in log.iter().filter(|e| e.model == "cas_note") {
        let data: serde_json::Value =
            serde_json::from_str(entry.data.as_deref().expect("data")).expect("json");
        assert_eq!(data["owner_id"], serde_json::Value::Null);
        assert_eq!(entry.changed, vec!["owner_id".to_owned()]);
    }
    // Each owner's delete comes after its items', each item's after its parts'.
    let (mut items, mut parts) = (0, 0);
    for entry in log.iter().filter(|e| e.op == ChangeOp::Delete) {
        match entry.model.as_str() {
            "cas_part" => parts += 1,
            "cas_item" => {
                assert!(parts >= 2, "an item's parts are deleted before it");
                parts -= 2;
                items += 1;
            }
            "cas_owner" => {
                assert_eq!((items, parts), (2, 0), "an owner's items go before it");
                items = 0;
            }
            other => panic!("unexpected delete of {other}"),
        }
    }
    // The local marks went with their owners, and nothing logged them.
    assert_eq!(
        mark::Entity::find()
            .count(leader.db())
            .await
            .expect("marks"),
        1
    );

    // 5. The write follower deletes an owner of no items (as far as it knows) while the
    // leader adds one: the leader cascades it when it takes the pushed delete, so the
    // item's creation and its delete are adjacent in the log (and collapse for followers).
    let bare = owner::ActiveModel {
        name: Set("pushed".into()),
        ..Default::default()
    }
    .insert(&conn)
    .await
    .expect("bare owner");
    for follower in &followers {
        catch_up(follower).await;
    }
    let late = item::ActiveModel {
        owner_id: Set(bare.id),
        name: Set("pushed late".into()),
        ..Default::default()
    }
    .insert(&conn)
    .await
    .expect("late item");
    by_name(writer.db(), "pushed")
        .await
        .delete(&writer.connection())
        .await
        .expect("delete on the follower");
    let before_push = leader.latest_seq().await.expect("latest seq");
    for follower in &followers {
        catch_up(follower).await;
    }
    let taken: Vec<(String, ChangeOp, String)> = leader
        .read_log(before_push, 1_000)
        .await
        .expect("log")
        .into_iter()
        .map(|e| (e.model, e.op, e.record_id))
        .collect();
    assert_eq!(
        taken,
        vec![
            (
                "cas_item".into(),
                ChangeOp::Delete,
                late.sync_key.to_string()
            ),
            (
                "cas_owner".into(),
                ChangeOp::Delete,
                bare.sync_key.to_string()
            ),
        ],
        "the leader records the item its database cascades, before the pushed delete"
    );

    let dump = leader.dump().await.expect("dump");
    assert_eq!(writer.dump().await.expect("dump"), dump, "write follower");
    assert_eq!(
        reader.dump().await.expect("dump"),
        dump,
        "follower without foreign keys"
    );
    assert!(leader.audit().await.expect("audit").is_empty(), "no drift");
    let gone = ["lone", "plain", "txn", "bulk", "pushed"];
    for db in [leader.db(), writer.db(), reader.db()] {
        assert_eq!(left_of(db, &gone).await, (0, 0, 0));
        assert_eq!(left_of(db, &["kept"]).await, (2, 4, 1));
        assert_eq!(
            note::Entity::find().count(db).await.expect("notes"),
            5,
            "notes stay, without their owner"
        );
    }

    for library in [leader, followers.remove(0), followers.remove(0)] {
        let _ = library.db().clone().close().await;
    }
    for url in [leader_url, writer_url] {
        let _ = example_app::drop_database(&url).await;
    }
}

/// A model with a PostgreSQL enum column (`CREATE TYPE … AS ENUM`), deleted with its owner.
pub mod feeling {
    use sea_orm::entity::prelude::*;
    use serde::{Deserialize, Serialize};

    #[derive(
        Clone, Copy, Debug, PartialEq, Eq, EnumIter, DeriveActiveEnum, Serialize, Deserialize,
    )]
    #[sea_orm(rs_type = "String", db_type = "Enum", enum_name = "cas_mood")]
    pub enum Mood {
        #[sea_orm(string_value = "calm")]
        Calm,
        #[sea_orm(string_value = "glad")]
        Glad,
    }

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel, sync_core::Syncable)]
    #[sea_orm(table_name = "cas_feeling")]
    #[sync(id = "cas_feeling")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        pub owner_id: i32,
        pub mood: Mood,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {
        #[sea_orm(
            belongs_to = "super::owner::Entity",
            from = "Column::OwnerId",
            to = "super::owner::Column::Id",
            on_delete = "Cascade"
        )]
        Owner,
    }
}

/// On PostgreSQL, rows with a native enum column are read as SeaORM reads them (the enum
/// cast to text) by a captured plain `DELETE` and by a cascade; `SELECT *` could not
/// decode them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_enum_columns_are_read_by_captured_deletes_and_cascades() {
    let test = "cascades::postgres_enum_columns_are_read_by_captured_deletes_and_cascades";
    let Some(server) = server_url(Backend::Postgres, test) else {
        return;
    };
    let dir = tempfile::tempdir().expect("dir");
    let url = example_app::fresh_database(&server, dir.path())
        .await
        .expect("fresh database");
    let db = example_app::connect(&url).await.expect("connect");
    <sync_migrations::Migrator as sea_orm_migration::MigratorTrait>::up(&db, None)
        .await
        .expect("migrate");
    let schema = Schema::new(db.get_database_backend());
    for mood in schema.create_enum_from_entity(feeling::Entity) {
        db.execute(&mood).await.expect("enum type");
    }
    db.execute(&schema.create_table_from_entity(owner::Entity))
        .await
        .expect("owner table");
    db.execute(&schema.create_table_from_entity(feeling::Entity))
        .await
        .expect("feeling table");
    let registry = Registry::new()
        .register::<owner::Entity>()
        .and_then(|r| r.register::<feeling::Entity>())
        .expect("distinct sync ids");
    let library = Library::create(db, "moods", registry)
        .await
        .expect("library");
    let conn = library.connection();
    let owner = owner::ActiveModel {
        name: Set("moody".into()),
        ..Default::default()
    }
    .insert(&conn)
    .await
    .expect("owner");
    let mut ids = Vec::new();
    for mood in [
        feeling::Mood::Calm,
        feeling::Mood::Glad,
        feeling::Mood::Glad,
    ] {
        let row = feeling::ActiveModel {
            id: Set(Uuid::now_v7()),
            owner_id: Set(owner.id),
            mood: Set(mood),
        }
        .insert(&conn)
        .await
        .expect("feeling");
        ids.push(row.id);
    }
    let before = library.latest_seq().await.expect("latest seq");
    let removed = feeling::Entity::delete_many()
        .filter(feeling::Column::Mood.eq(feeling::Mood::Calm))
        .exec(&conn)
        .await
        .expect("a plain delete of rows with an enum column");
    assert_eq!(removed.rows_affected, 1);
    owner.clone().delete(&conn).await.expect("delete the owner");
    let log: Vec<(String, ChangeOp, String)> = library
        .read_log(before, 100)
        .await
        .expect("log")
        .into_iter()
        .map(|e| (e.model, e.op, e.record_id))
        .collect();
    assert_eq!(
        log,
        vec![
            ("cas_feeling".into(), ChangeOp::Delete, ids[0].to_string()),
            ("cas_feeling".into(), ChangeOp::Delete, ids[1].to_string()),
            ("cas_feeling".into(), ChangeOp::Delete, ids[2].to_string()),
            (
                "cas_owner".into(),
                ChangeOp::Delete,
                owner.sync_key.to_string()
            ),
        ]
    );
    assert!(library.audit().await.expect("audit").is_empty());
    let _ = library.db().clone().close().await;
    let _ = example_app::drop_database(&url).await;
}
