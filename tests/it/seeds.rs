//! Rows that predate the library: a leader's initial state, seeds written by a migration
//! on every device, and a joining device's own rows.

use std::path::Path;
use std::time::Duration;

use example_app::models::tag;
use example_app::{Migrator, registry};
use sea_orm::{ActiveValue::Set, DatabaseConnection, EntityTrait};
use sea_orm_migration::MigratorTrait;
use serde_json::{Value, json};
use sync_core::{Access, Library, OpenError, Seq, seed_key};

use crate::offline::{put, sync};

/// A migrated SQLite database with no library yet.
async fn database(dir: &Path, name: &str) -> DatabaseConnection {
    let url = format!(
        "sqlite://{}?mode=rwc",
        dir.join(format!("{name}.db")).display()
    );
    let db = example_app::connect(&url).await.expect("connect");
    Migrator::up(&db, None).await.expect("migrate");
    db
}

/// What a seed migration does: plain SeaORM inserts (no library exists yet), each row
/// keyed by `seed_key` so that every device's copy is the same record.
async fn seed(db: &DatabaseConnection) {
    let rows = ["inbox", "archive", "later"].map(|name| tag::ActiveModel {
        id: Set(seed_key("tag", name)),
        name: Set(name.to_owned()),
        color: Set(None),
    });
    tag::Entity::insert_many(rows)
        .exec_without_returning(db)
        .await
        .expect("seed");
}

/// A row this database has and no other: written before any library, without hooks.
async fn own_row(db: &DatabaseConnection, name: &str) -> uuid::Uuid {
    let id = uuid::Uuid::now_v7();
    tag::Entity::insert(tag::ActiveModel {
        id: Set(id),
        name: Set(name.to_owned()),
        color: Set(None),
    })
    .exec_without_returning(db)
    .await
    .expect("insert");
    id
}

/// Joins `db` to `leader` with `access` (invited and redeemed in process).
async fn join(
    leader: &Library,
    db: DatabaseConnection,
    name: &str,
    access: Access,
) -> Result<Library, OpenError> {
    let key = Library::device_key_of(&db).await.expect("device key");
    let invite = leader
        .leader()
        .expect("the leader")
        .invite(access, Duration::from_secs(600))
        .await
        .expect("invite");
    leader
        .leader()
        .expect("the leader")
        .redeem_invite(&invite.secret, access, key.fingerprint(), Some(name))
        .await
        .expect("redeem");
    Library::join(
        db,
        leader.id(),
        leader.device_id(),
        "test",
        access,
        registry(),
    )
    .await
}

fn names(dump: &Value) -> Vec<String> {
    let mut names: Vec<String> = dump["tag"]
        .as_array()
        .expect("tags")
        .iter()
        .map(|t| t["name"].as_str().expect("name").to_owned())
        .collect();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_library_created_on_a_database_with_rows_records_them() {
    let dir = tempfile::tempdir().expect("dir");
    let db = database(dir.path(), "leader").await;
    own_row(&db, "kept from before").await;
    seed(&db).await;
    let leader = Library::open_or_create(db.clone(), "rows", registry())
        .await
        .expect("create");
    assert_eq!(leader.latest_seq().await.expect("seq"), Seq(4));
    assert!(leader.audit().await.expect("audit").is_empty());
    // Opening again records nothing more.
    let again = Library::open_or_create(db, "rows", registry())
        .await
        .expect("open");
    assert_eq!(again.latest_seq().await.expect("seq"), Seq(4));

    let follower = join(
        &leader,
        database(dir.path(), "follower").await,
        "follower",
        Access::Read,
    )
    .await
    .expect("join");
    sync(&follower, &leader).await;
    assert_eq!(
        follower.dump().await.expect("dump"),
        leader.dump().await.expect("dump")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeds_on_every_device_are_one_record_and_follow_the_leader() {
    let dir = tempfile::tempdir().expect("dir");
    let db = database(dir.path(), "leader").await;
    seed(&db).await;
    let leader = Library::open_or_create(db, "seeded", registry())
        .await
        .expect("create");
    // The leader edits one seed and deletes another before anyone joins.
    let inbox = seed_key("tag", "inbox").to_string();
    put(
        &leader,
        "tag",
        json!({"id": inbox, "name": "inbox", "color": "red"}),
    )
    .await;
    example_app::ops::delete(&leader, "tag", &seed_key("tag", "later").to_string())
        .await
        .expect("delete seed");

    // Both followers ran the same seed migration; seeds never stop a join, not even a
    // read member's.
    let mut followers = Vec::new();
    for (name, access) in [("reader", Access::Read), ("writer", Access::Write)] {
        let db = database(dir.path(), name).await;
        seed(&db).await;
        let follower = join(&leader, db, name, access).await.expect("join");
        assert_eq!(follower.outbox_len().await.expect("outbox"), 0, "{name}");
        sync(&follower, &leader).await;
        followers.push(follower);
    }
    let expected = leader.dump().await.expect("dump");
    assert_eq!(names(&expected), ["archive", "inbox"]);
    for follower in &followers {
        assert_eq!(follower.dump().await.expect("dump"), expected);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_member_s_own_rows_are_pushed_when_it_joins() {
    let dir = tempfile::tempdir().expect("dir");
    let leader = Library::open_or_create(database(dir.path(), "leader").await, "l", registry())
        .await
        .expect("create");
    put(&leader, "tag", json!({"name": "from the leader"})).await;

    let db = database(dir.path(), "writer").await;
    own_row(&db, "made offline before joining").await;
    own_row(&db, ".hidden stays local").await;
    let writer = join(&leader, db.clone(), "writer", Access::Write)
        .await
        .expect("join");
    // The filter keeps the dotted tag local: only the other row waits to be pushed.
    assert_eq!(writer.outbox_len().await.expect("outbox"), 1);
    // Opening again adopts nothing twice.
    let reopened = Library::open_default(db, registry()).await.expect("open");
    assert_eq!(reopened.outbox_len().await.expect("outbox"), 1);

    sync(&writer, &leader).await;
    assert_eq!(
        names(&leader.dump().await.expect("dump")),
        ["from the leader", "made offline before joining"]
    );
    assert_eq!(
        writer.dump().await.expect("dump"),
        leader.dump().await.expect("dump")
    );
    assert!(leader.audit().await.expect("audit").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_member_with_rows_of_its_own_is_refused_and_nothing_is_stored() {
    let dir = tempfile::tempdir().expect("dir");
    let leader = Library::open_or_create(database(dir.path(), "leader").await, "l", registry())
        .await
        .expect("create");
    let db = database(dir.path(), "reader").await;
    seed(&db).await;
    own_row(&db, "exists only here").await;
    match join(&leader, db.clone(), "reader", Access::Read).await {
        Err(OpenError::RowsBeforeJoin { model, rows }) => {
            assert_eq!((model.as_str(), rows), ("tag", 1));
        }
        other => panic!("expected RowsBeforeJoin, got {other:?}"),
    }
    assert!(matches!(
        Library::open_default(db, registry()).await,
        Err(OpenError::NoLibrary)
    ));
}
