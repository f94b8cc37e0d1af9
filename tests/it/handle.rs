//! The connection handle (`Library::connection`): plain SeaORM writes recorded, bulk writes
//! captured, hook-less writes refused.

use std::time::Duration;

use example_app::models::{tag, volume};
use example_app::{Migrator, connect, fresh_database, registry};
use sea_orm::ActiveValue::{Set, Unchanged};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, Condition, ConnectionTrait, Database, DbErr, EntityTrait,
    QueryFilter, TransactionError, TransactionSession, TransactionTrait,
};
use sea_orm_migration::MigratorTrait;
use sync_core::{ChangeOp, InProcess, Library, LogEntry, Seq, verify_chain};
use uuid::Uuid;

use crate::support::Fixture;

async fn whole_log(library: &Library) -> Vec<LogEntry> {
    let entries = library
        .read_log(Seq::ZERO, 1_000_000)
        .await
        .expect("read log");
    verify_chain(Seq::ZERO, 0, &entries).expect("log chains");
    // The app's entries: sync-core's own (membership) are not the writes under test.
    entries
        .into_iter()
        .filter(|e| !sync_core::is_reserved_model(&e.model))
        .collect()
}

fn new_tag(name: &str) -> tag::ActiveModel {
    tag::ActiveModel {
        id: Set(Uuid::now_v7()),
        name: Set(name.to_owned()),
        color: Set(None),
    }
}

fn new_volume(id: Uuid) -> volume::ActiveModel {
    volume::ActiveModel {
        id: Set(id),
        name: Set("Disk".into()),
        total_capacity: Set(1000),
        is_tracked: Set(true),
        display_name: Set(None),
        color: Set(None),
        icon: Set(None),
        mount_point: Set("/mnt/disk".into()),
        available_space: Set(10),
        is_mounted: Set(true),
    }
}

/// A read-access follower of `leader` on a fresh SQLite database in `dir`, caught up.
async fn caught_up_follower(leader: &Library, dir: &std::path::Path) -> Library {
    let url = fresh_database("sqlite", dir).await.expect("fresh database");
    let db = connect(&url).await.expect("connect");
    Migrator::up(&db, None).await.expect("migrate");
    let follower = Library::join(
        db,
        leader.id(),
        leader.device_id(),
        "follower",
        sync_core::Access::Read,
        registry(),
    )
    .await
    .expect("join");
    follower
        .follower()
        .expect("a follower")
        .catch_up(&InProcess::new(leader.leader().expect("the leader")), 1_000)
        .await
        .expect("catch up");
    follower
}

fn refused(e: &DbErr, table: &str) -> bool {
    let text = e.to_string();
    text.contains("refused") && text.contains(&format!("`{table}`"))
}

async fn lone_writes_are_recorded_and_replicate(f: Fixture) -> Fixture {
    let conn = f.library.connection();
    let holiday = new_tag("holiday").insert(&conn).await.expect("insert");
    tag::ActiveModel {
        id: Unchanged(holiday.id),
        color: Set(Some("red".into())),
        ..Default::default()
    }
    .update(&conn)
    .await
    .expect("update");
    let volume_id = Uuid::now_v7();
    new_volume(volume_id).insert(&conn).await.expect("insert");
    // An update of local fields only records nothing.
    volume::ActiveModel {
        id: Unchanged(volume_id),
        available_space: Set(5),
        ..Default::default()
    }
    .update(&conn)
    .await
    .expect("local update");
    volume::ActiveModel {
        id: Set(volume_id),
        ..Default::default()
    }
    .delete(&conn)
    .await
    .expect("delete");
    // A delete of a row that is not there records nothing.
    volume::ActiveModel {
        id: Set(Uuid::now_v7()),
        ..Default::default()
    }
    .delete(&conn)
    .await
    .expect("delete of nothing");
    // A hidden tag stays local.
    new_tag(".mine").insert(&conn).await.expect("insert hidden");

    let log = whole_log(&f.library).await;
    let seen: Vec<_> = log
        .iter()
        .map(|e| (e.model.as_str(), e.op, e.changed.clone()))
        .collect();
    assert_eq!(
        seen,
        vec![
            (
                "tag",
                ChangeOp::Upsert,
                vec!["id".into(), "name".into(), "color".into()]
            ),
            ("tag", ChangeOp::Upsert, vec!["color".into()]),
            (
                "volume",
                ChangeOp::Upsert,
                vec![
                    "id".into(),
                    "name".into(),
                    "total_capacity".into(),
                    "is_tracked".into(),
                    "display_name".into(),
                    "color".into(),
                    "icon".into()
                ]
            ),
            ("volume", ChangeOp::Delete, vec![]),
        ]
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let follower = caught_up_follower(&f.library, dir.path()).await;
    assert_eq!(
        follower.dump().await.expect("dump"),
        f.library.dump().await.expect("dump")
    );
    let tags = tag::Entity::find().all(follower.db()).await.expect("read");
    assert_eq!(tags.len(), 1);
    assert_eq!(tags[0].color.as_deref(), Some("red"));
    f
}

async fn transactions_commit_with_their_entries_or_leave_nothing(f: Fixture) -> Fixture {
    let conn = f.library.connection();
    // begin / commit.
    let txn = conn.begin().await.expect("begin");
    let kept = new_tag("kept").insert(&txn).await.expect("insert");
    new_tag("kept too").insert(&txn).await.expect("insert");
    txn.commit().await.expect("commit");
    // begin / rollback, and begin / drop.
    let txn = conn.begin().await.expect("begin");
    let rolled = new_tag("rolled back").insert(&txn).await.expect("insert");
    txn.rollback().await.expect("rollback");
    let txn = conn.begin().await.expect("begin");
    let dropped = new_tag("dropped").insert(&txn).await.expect("insert");
    drop(txn);
    // SeaORM's closure form, both ways.
    let via_closure = conn
        .transaction::<_, _, DbErr>(|txn| {
            Box::pin(async move { new_tag("closure").insert(txn).await })
        })
        .await
        .expect("transaction");
    let failed: Result<(), TransactionError<DbErr>> = conn
        .transaction(|txn| {
            Box::pin(async move {
                new_tag("closure failed").insert(txn).await?;
                Err(DbErr::Custom("changed my mind".into()))
            })
        })
        .await;
    assert!(matches!(failed, Err(TransactionError::Transaction(_))));

    let log = whole_log(&f.library).await;
    let names: Vec<_> = log
        .iter()
        .map(|e| {
            serde_json::from_str::<serde_json::Value>(e.data.as_deref().expect("upsert"))
                .expect("json")["name"]
                .as_str()
                .expect("name")
                .to_owned()
        })
        .collect();
    assert_eq!(names, ["kept", "kept too", "closure"]);
    let stored: Vec<_> = tag::Entity::find()
        .all(&conn)
        .await
        .expect("read through the handle")
        .into_iter()
        .map(|t| t.id)
        .collect();
    assert!(stored.contains(&kept.id) && stored.contains(&via_closure.id));
    assert!(!stored.contains(&rolled.id) && !stored.contains(&dropped.id));
    assert_eq!(stored.len(), 3);
    f
}

async fn a_rolled_back_savepoint_leaves_no_entry(f: Fixture) -> Fixture {
    let conn = f.library.connection();
    let txn = conn.begin().await.expect("begin");
    new_tag("outer").insert(&txn).await.expect("insert");
    let savepoint = txn.begin().await.expect("savepoint");
    new_tag("undone").insert(&savepoint).await.expect("insert");
    savepoint.rollback().await.expect("rollback to savepoint");
    let savepoint = txn.begin().await.expect("savepoint");
    new_tag("released")
        .insert(&savepoint)
        .await
        .expect("insert");
    savepoint.commit().await.expect("release savepoint");
    let savepoint = txn.begin().await.expect("savepoint");
    new_tag("dropped").insert(&savepoint).await.expect("insert");
    drop(savepoint);
    txn.commit().await.expect("commit");
    // The same inside `Library::transaction`.
    f.library
        .transaction(|txn| {
            Box::pin(async move {
                let savepoint = txn.begin().await?;
                new_tag("undone in library").insert(&savepoint).await?;
                savepoint.rollback().await?;
                new_tag("library").insert(txn).await?;
                Ok::<_, DbErr>(())
            })
        })
        .await
        .expect("library transaction");

    let log = whole_log(&f.library).await;
    let names: Vec<_> = log
        .iter()
        .map(|e| {
            serde_json::from_str::<serde_json::Value>(e.data.as_deref().expect("upsert"))
                .expect("json")["name"]
                .as_str()
                .expect("name")
                .to_owned()
        })
        .collect();
    assert_eq!(names, ["outer", "released", "library"]);
    let mut stored: Vec<_> = tag::Entity::find()
        .all(f.library.db())
        .await
        .expect("read")
        .into_iter()
        .map(|t| t.name)
        .collect();
    stored.sort();
    assert_eq!(stored, ["library", "outer", "released"]);
    f
}

async fn bulk_writes_are_captured_and_replicate(f: Fixture) -> Fixture {
    let conn = f.library.connection();
    let txn = conn.begin().await.expect("begin");
    let inserted = txn
        .insert_many((0..5).map(|i| new_tag(&format!("bulk {i}"))))
        .await
        .expect("insert_many");
    assert_eq!(inserted.len(), 5);
    txn.commit().await.expect("commit");
    let updated = conn
        .update_many::<tag::Entity>(
            tag::ActiveModel {
                color: Set(Some("blue".into())),
                ..Default::default()
            },
            Condition::all().add(tag::Column::Name.is_in(["bulk 1", "bulk 2", "bulk 3"])),
        )
        .await
        .expect("update_many");
    assert_eq!(updated, 3);
    let deleted = conn
        .delete_many::<tag::Entity>(
            Condition::all().add(tag::Column::Name.is_in(["bulk 0", "bulk 3"])),
        )
        .await
        .expect("delete_many");
    assert_eq!(deleted, 2);
    // Matching nothing records nothing.
    let none = conn
        .delete_many::<tag::Entity>(Condition::all().add(tag::Column::Name.eq("absent")))
        .await
        .expect("delete_many of nothing");
    assert_eq!(none, 0);

    let log = whole_log(&f.library).await;
    let ops: Vec<_> = log.iter().map(|e| e.op).collect();
    assert_eq!(
        ops,
        [
            [ChangeOp::Upsert; 5].as_slice(),
            &[ChangeOp::Upsert; 3],
            &[ChangeOp::Delete; 2]
        ]
        .concat()
    );
    assert!(log[5..8].iter().all(|e| e.changed == ["color"]));
    let dir = tempfile::tempdir().expect("temp dir");
    let follower = caught_up_follower(&f.library, dir.path()).await;
    assert_eq!(
        follower.dump().await.expect("dump"),
        f.library.dump().await.expect("dump")
    );
    let mut names: Vec<_> = tag::Entity::find()
        .all(follower.db())
        .await
        .expect("read")
        .into_iter()
        .map(|t| (t.name, t.color))
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            ("bulk 1".to_owned(), Some("blue".to_owned())),
            ("bulk 2".to_owned(), Some("blue".to_owned())),
            ("bulk 4".to_owned(), None),
        ]
    );
    f
}

async fn hookless_writes_are_refused_and_plain_deletes_captured(f: Fixture) -> Fixture {
    let conn = f.library.connection();
    let txn = conn.begin().await.expect("begin");
    new_tag("kept").insert(&txn).await.expect("insert");
    new_tag("gone").insert(&txn).await.expect("insert");
    let e = tag::Entity::insert_many([new_tag("a"), new_tag("b")])
        .exec(&txn)
        .await
        .expect_err("insert_many refused");
    assert!(refused(&e, "tag"), "{e}");
    assert!(
        e.to_string().contains("SyncTransaction::insert_many"),
        "{e}"
    );
    // SeaORM's plain `delete_many` is captured: each row it removes gets its entry.
    let deleted = tag::Entity::delete_many()
        .filter(tag::Column::Name.eq("gone"))
        .exec(&txn)
        .await
        .expect("delete_many captured");
    assert_eq!(deleted.rows_affected, 1);
    let e = txn
        .execute_unprepared("DELETE FROM tag")
        .await
        .expect_err("raw SQL refused");
    assert!(refused(&e, "tag"), "{e}");
    // The transaction is still usable: nothing reached the database.
    txn.commit().await.expect("commit");
    // A lone one on the handle.
    let e = tag::Entity::insert_many([new_tag("c")])
        .exec(&conn)
        .await
        .expect_err("insert_many refused on the handle");
    assert!(refused(&e, "tag"), "{e}");
    // Inside `Library::transaction`.
    let e = f
        .library
        .transaction(|txn| {
            Box::pin(async move {
                tag::Entity::insert_many([new_tag("d")]).exec(txn).await?;
                Ok::<_, DbErr>(())
            })
        })
        .await
        .expect_err("insert_many refused in Library::transaction");
    assert!(refused(&e, "tag"), "{e}");
    let deleted = f
        .library
        .transaction(|txn| Box::pin(async move { volume::Entity::delete_many().exec(txn).await }))
        .await
        .expect("delete_many captured in Library::transaction");
    assert_eq!(deleted.rows_affected, 0);
    // Writes of unsynced tables pass.
    f.library
        .transaction(|txn| {
            Box::pin(async move {
                txn.execute_unprepared("DELETE FROM temp_file").await?;
                Ok::<_, DbErr>(())
            })
        })
        .await
        .expect("unsynced table");
    // `Library::unrecorded` may write synced tables by any path, on purpose.
    f.library
        .unrecorded(|txn| {
            Box::pin(async move {
                tag::Entity::insert_many([new_tag("local")])
                    .exec(txn)
                    .await?;
                Ok::<_, DbErr>(())
            })
        })
        .await
        .expect("unrecorded");

    let log = whole_log(&f.library).await;
    let ops: Vec<_> = log.iter().map(|e| e.op).collect();
    assert_eq!(ops, [ChangeOp::Upsert, ChangeOp::Upsert, ChangeOp::Delete]);
    assert_eq!(
        log[1].record_id, log[2].record_id,
        "the delete is of `gone`"
    );
    let mut names: Vec<_> = tag::Entity::find()
        .all(&conn)
        .await
        .expect("read")
        .into_iter()
        .map(|t| t.name)
        .collect();
    names.sort();
    assert_eq!(names, ["kept", "local"]);
    f
}

/// Writes on a follower's handle enter its outbox and reach the leader; a read-access
/// follower's handle refuses them.
async fn follower_writes_through_the_handle(f: Fixture) -> Fixture {
    let dir = tempfile::tempdir().expect("temp dir");
    let writer =
        crate::offline::member(&f.library, dir.path(), "writer", sync_core::Access::Write).await;
    let conn = writer.connection();
    let lone = new_tag("from follower")
        .insert(&conn)
        .await
        .expect("lone insert");
    let txn = conn.begin().await.expect("begin");
    txn.insert_many([new_tag("bulk a"), new_tag("bulk b")])
        .await
        .expect("insert_many");
    txn.commit().await.expect("commit");
    let e = tag::Entity::insert_many([new_tag("escaping")])
        .exec(&conn)
        .await
        .expect_err("hook-less write refused on a follower too");
    assert!(refused(&e, "tag"), "{e}");
    assert_eq!(writer.outbox_len().await.expect("outbox"), 3);
    crate::offline::sync(&writer, &f.library).await;
    assert_eq!(writer.outbox_len().await.expect("outbox"), 0);
    let log = whole_log(&f.library).await;
    assert_eq!(log.len(), 3);
    assert!(log.iter().any(|e| e.record_id == lone.id.to_string()));
    assert_eq!(
        writer.dump().await.expect("dump"),
        f.library.dump().await.expect("dump")
    );

    let reader =
        crate::offline::member(&f.library, dir.path(), "reader", sync_core::Access::Read).await;
    let e = new_tag("not allowed")
        .insert(&reader.connection())
        .await
        .expect_err("read access refuses");
    assert!(e.to_string().contains("read access"), "{e}");
    let txn = reader.connection().begin().await.expect("begin");
    let e = txn
        .insert_many([new_tag("not allowed")])
        .await
        .expect_err("read access refuses");
    assert!(e.to_string().contains("read access"), "{e}");
    f
}

/// Lone writes from many tasks at once on clones of one handle: each is recorded once.
async fn lone_writes_from_many_tasks(f: Fixture) -> Fixture {
    let conn = f.library.connection();
    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..8 {
        let conn = conn.clone();
        tasks.spawn(async move {
            for i in 0..10 {
                let tag = new_tag(&format!("t{task}-{i}")).insert(&conn).await?;
                tag::ActiveModel {
                    id: Unchanged(tag.id),
                    color: Set(Some(format!("c{i}"))),
                    ..Default::default()
                }
                .update(&conn)
                .await?;
            }
            Ok::<_, DbErr>(())
        });
    }
    while let Some(joined) = tasks.join_next().await {
        joined.expect("task").expect("writes");
    }
    let log = whole_log(&f.library).await;
    assert_eq!(log.len(), 160);
    let dir = tempfile::tempdir().expect("temp dir");
    let follower = caught_up_follower(&f.library, dir.path()).await;
    assert_eq!(
        follower.dump().await.expect("dump"),
        f.library.dump().await.expect("dump")
    );
    f
}

crate::on_every_backend!(
    follower_writes_through_the_handle,
    lone_writes_from_many_tasks,
    lone_writes_are_recorded_and_replicate,
    transactions_commit_with_their_entries_or_leave_nothing,
    a_rolled_back_savepoint_leaves_no_entry,
    bulk_writes_are_captured_and_replicate,
    hookless_writes_are_refused_and_plain_deletes_captured,
);

/// With SQLite's default pool of one connection, a transaction left open by a failed
/// write would make the next write wait for ever: each write is bounded by a deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_lone_write_leaves_no_open_transaction() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("one.db");
    let url = format!("sqlite://{}?mode=rwc", path.display());
    let db = Database::connect(&url).await.expect("connect");
    Migrator::up(&db, None).await.expect("migrate");
    let library = Library::create(db, "one connection", registry())
        .await
        .expect("create");
    let conn = library.connection();
    let deadline = Duration::from_secs(60);
    let first = new_tag("first");
    let id = first.id.clone().unwrap();
    tokio::time::timeout(deadline, first.insert(&conn))
        .await
        .expect("no deadlock")
        .expect("insert");
    // The same key again: a primary key violation.
    let again = tag::ActiveModel {
        id: Set(id),
        name: Set("again".into()),
        color: Set(None),
    };
    tokio::time::timeout(deadline, again.insert(&conn))
        .await
        .expect("no deadlock")
        .expect_err("duplicate key refused");
    // An update of a row that is not there.
    let missing = tag::ActiveModel {
        id: Unchanged(Uuid::now_v7()),
        name: Set("nobody".into()),
        ..Default::default()
    };
    tokio::time::timeout(deadline, missing.update(&conn))
        .await
        .expect("no deadlock")
        .expect_err("update of a missing row");
    // A write refused by the guard, in a transaction that is then dropped.
    let txn = tokio::time::timeout(deadline, conn.begin())
        .await
        .expect("no deadlock")
        .expect("begin");
    tag::Entity::insert_many([new_tag("x")])
        .exec(&txn)
        .await
        .expect_err("refused");
    drop(txn);
    // Reads and the next write still work.
    let count = tokio::time::timeout(deadline, tag::Entity::find().all(&conn))
        .await
        .expect("no deadlock")
        .expect("read")
        .len();
    assert_eq!(count, 1);
    tokio::time::timeout(deadline, new_tag("second").insert(&conn))
        .await
        .expect("no deadlock")
        .expect("insert");
    let log = whole_log(&library).await;
    assert_eq!(log.len(), 2);
    assert!(log.iter().all(|e| e.op == ChangeOp::Upsert));
}
