//! Each write path and the log entry it leaves (or, by rule, does not).

use example_app::models::{location, tag, temp_file, user_metadata, volume};
use sea_orm::ActiveValue::{Set, Unchanged};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectionTrait, DbErr, EntityTrait, QueryFilter,
    sea_query::Expr,
};
use sync_core::{ChangeOp, DriftKind, LogEntry, Seq, verify_chain};
use uuid::Uuid;

use crate::support::Fixture;

async fn whole_log(f: &Fixture) -> Vec<LogEntry> {
    let entries = f
        .library
        .read_log(Seq::ZERO, 1_000_000)
        .await
        .expect("read log");
    // Every test's log must be contiguous from 1 and chain correctly.
    verify_chain(Seq::ZERO, 0, &entries).expect("log chains");
    entries
}

fn data(entry: &LogEntry) -> serde_json::Value {
    serde_json::from_str(entry.data.as_deref().expect("upsert carries data")).expect("data is JSON")
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

async fn insert_update_delete_each_leave_one_entry(f: Fixture) -> Fixture {
    let id = Uuid::now_v7();
    f.library
        .transaction(|txn| Box::pin(async move { new_volume(id).insert(txn).await }))
        .await
        .expect("insert");
    f.library
        .transaction(|txn| {
            Box::pin(async move {
                volume::ActiveModel {
                    id: Unchanged(id),
                    color: Set(Some("red".into())),
                    ..Default::default()
                }
                .update(txn)
                .await
            })
        })
        .await
        .expect("update");
    f.library
        .transaction(|txn| {
            Box::pin(async move {
                volume::ActiveModel {
                    id: Set(id),
                    ..Default::default()
                }
                .delete(txn)
                .await
            })
        })
        .await
        .expect("delete");

    let log = whole_log(&f).await;
    let ops: Vec<_> = log
        .iter()
        .map(|e| (e.seq.0, e.op, e.model.as_str()))
        .collect();
    assert_eq!(
        ops,
        [
            (1, ChangeOp::Upsert, "volume"),
            (2, ChangeOp::Upsert, "volume"),
            (3, ChangeOp::Delete, "volume")
        ]
    );
    assert!(
        log.iter()
            .all(|e| e.record_id == id.to_string() && e.device_id == f.library.device_id())
    );
    assert_eq!(
        log[0].changed,
        [
            "id",
            "name",
            "total_capacity",
            "is_tracked",
            "display_name",
            "color",
            "icon"
        ]
    );
    assert_eq!(
        log[1].changed,
        ["color"],
        "an update records only the fields it set"
    );
    assert_eq!(data(&log[1])["color"], "red");
    assert_eq!(
        data(&log[1])["name"],
        "Disk",
        "the entry carries every synced field"
    );
    assert!(log[2].data.is_none() && log[2].changed.is_empty());
    assert!(log[0].hlc < log[1].hlc && log[1].hlc < log[2].hlc);
    assert_eq!(f.library.latest_seq().await.expect("latest"), Seq(3));
    f
}

async fn local_fields_never_reach_the_log(f: Fixture) -> Fixture {
    let id = Uuid::now_v7();
    f.library
        .transaction(|txn| Box::pin(async move { new_volume(id).insert(txn).await }))
        .await
        .expect("insert");
    // An update of local fields only has nothing to tell other devices.
    f.library
        .transaction(|txn| {
            Box::pin(async move {
                volume::ActiveModel {
                    id: Unchanged(id),
                    mount_point: Set("/media/x".into()),
                    is_mounted: Set(false),
                    ..Default::default()
                }
                .update(txn)
                .await
            })
        })
        .await
        .expect("update local fields");
    let log = whole_log(&f).await;
    assert_eq!(log.len(), 1);
    let fields = data(&log[0]);
    for local in ["mount_point", "available_space", "is_mounted"] {
        assert!(
            fields.get(local).is_none(),
            "{local} is local but was logged"
        );
        assert!(!log[0].changed.iter().any(|c| c == local));
    }
    f
}

async fn unsynced_models_and_filtered_records_never_reach_the_log(f: Fixture) -> Fixture {
    f.library
        .transaction(|txn| {
            Box::pin(async move {
                temp_file::ActiveModel {
                    id: Set(Uuid::now_v7()),
                    path: Set("/tmp/a".into()),
                    size: Set(1),
                }
                .insert(txn)
                .await?;
                tag::ActiveModel {
                    id: Set(Uuid::now_v7()),
                    name: Set(".mine".into()),
                    color: Set(None),
                }
                .insert(txn)
                .await?;
                Ok::<_, DbErr>(())
            })
        })
        .await
        .expect("writes");
    assert!(whole_log(&f).await.is_empty());
    let dump = f.library.dump().await.expect("dump");
    assert!(dump.get("temp_file").is_none());
    assert_eq!(dump["tag"], serde_json::json!([]));
    f
}

async fn rollback_leaves_no_entry(f: Fixture) -> Fixture {
    let id = Uuid::now_v7();
    let result: Result<(), DbErr> = f
        .library
        .transaction(|txn| {
            Box::pin(async move {
                new_volume(id).insert(txn).await?;
                Err(DbErr::Custom("the app changed its mind".into()))
            })
        })
        .await;
    assert!(result.is_err());
    assert!(whole_log(&f).await.is_empty());
    assert!(
        volume::Entity::find_by_id(id)
            .one(f.library.db())
            .await
            .expect("read")
            .is_none()
    );
    assert_eq!(f.library.latest_seq().await.expect("latest"), Seq(0));
    // A failing write in the middle of a transaction rolls its neighbours' entries back too.
    let dup = Uuid::now_v7();
    let result: Result<(), DbErr> = f
        .library
        .transaction(|txn| {
            Box::pin(async move {
                new_volume(dup).insert(txn).await?;
                new_volume(dup).insert(txn).await?;
                Ok(())
            })
        })
        .await;
    assert!(result.is_err(), "a duplicate key must fail");
    assert!(whole_log(&f).await.is_empty());
    f
}

async fn phantom_deletes_are_not_logged(f: Fixture) -> Fixture {
    let missing = Uuid::now_v7();
    f.library
        .transaction(|txn| {
            Box::pin(async move {
                tag::ActiveModel {
                    id: Set(missing),
                    ..Default::default()
                }
                .delete(txn)
                .await
            })
        })
        .await
        .expect("delete of nothing succeeds in SeaORM");
    assert!(
        whole_log(&f).await.is_empty(),
        "after_delete ran, but nothing was deleted"
    );
    f
}

async fn save_and_update_without_returning_are_captured(f: Fixture) -> Fixture {
    // save() with no key inserts; the hook gives it a UUID v7.
    let saved = f
        .library
        .transaction(|txn| {
            Box::pin(async move {
                tag::ActiveModel {
                    name: Set("holiday".into()),
                    color: Set(None),
                    ..Default::default()
                }
                .save(txn)
                .await
            })
        })
        .await
        .expect("save");
    let id = saved.id.clone().unwrap();
    assert_eq!(id.get_version_num(), 7);
    f.library
        .transaction(|txn| {
            Box::pin(async move {
                tag::ActiveModel {
                    id: Unchanged(id),
                    color: Set(Some("blue".into())),
                    ..Default::default()
                }
                .update_without_returning(txn)
                .await
            })
        })
        .await
        .expect("update_without_returning");
    let log = whole_log(&f).await;
    assert_eq!(log.len(), 2);
    assert_eq!(log[1].changed, ["color"]);
    assert_eq!(
        data(&log[1])["color"],
        "blue",
        "after_save did not run; the row was read back"
    );
    f
}

async fn app_behavior_runs_and_the_model_still_syncs(f: Fixture) -> Fixture {
    let stored = f
        .library
        .transaction(|txn| {
            Box::pin(async move {
                location::ActiveModel {
                    name: Set("  Photos  ".into()),
                    path: Set("/p".into()),
                    indexed_files: Set(0),
                    ..Default::default()
                }
                .insert(txn)
                .await
            })
        })
        .await
        .expect("insert");
    assert_eq!(
        stored.name, "Photos",
        "the app's own before_save trimmed the name"
    );
    let log = whole_log(&f).await;
    assert_eq!(log.len(), 1);
    assert_eq!(data(&log[0])["name"], "Photos");
    // The app's refusal still refuses.
    let refused = f
        .library
        .transaction(|txn| {
            Box::pin(async move {
                location::ActiveModel {
                    name: Set("   ".into()),
                    path: Set("/q".into()),
                    indexed_files: Set(0),
                    ..Default::default()
                }
                .insert(txn)
                .await
            })
        })
        .await;
    assert!(refused.is_err());
    assert_eq!(whole_log(&f).await.len(), 1);
    f
}

async fn writes_outside_the_sync_transaction_are_refused(f: Fixture) -> Fixture {
    let db = f.library.db().clone();
    // No transaction at all.
    let err = tag::ActiveModel {
        id: Set(Uuid::now_v7()),
        name: Set("x".into()),
        color: Set(None),
    }
    .insert(&db)
    .await
    .expect_err("a write outside Library::transaction must be refused");
    assert!(
        err.to_string().contains("outside a sync transaction"),
        "{err}"
    );
    // Inside the scope, but through another connection: would commit apart from its entry.
    let outside = db.clone();
    let err = f
        .library
        .transaction(move |_txn| {
            Box::pin(async move {
                tag::ActiveModel {
                    id: Set(Uuid::now_v7()),
                    name: Set("y".into()),
                    color: Set(None),
                }
                .insert(&outside)
                .await
            })
        })
        .await
        .expect_err("a write through another connection must be refused");
    assert!(
        err.to_string().contains("other than the transaction"),
        "{err}"
    );
    assert!(
        tag::Entity::find().all(&db).await.expect("read").is_empty(),
        "refused writes wrote nothing"
    );
    assert!(whole_log(&f).await.is_empty());
    // Models that never sync are not the library's business.
    temp_file::ActiveModel {
        id: Set(Uuid::now_v7()),
        path: Set("/t".into()),
        size: Set(0),
    }
    .insert(&db)
    .await
    .expect("unsynced models write anywhere");
    f
}

async fn unrecorded_scope_and_record_again(f: Fixture) -> Fixture {
    let id = Uuid::now_v7();
    f.library
        .unrecorded(|txn| Box::pin(async move { new_volume(id).insert(txn).await }))
        .await
        .expect("maintenance write");
    assert!(whole_log(&f).await.is_empty());
    let op = f
        .library
        .record_again("volume", &id.to_string())
        .await
        .expect("record again");
    assert_eq!(op, ChangeOp::Upsert);
    let log = whole_log(&f).await;
    assert_eq!(log.len(), 1);
    assert_eq!(data(&log[0])["name"], "Disk");
    f
}

async fn writes_that_skip_hooks_are_found_by_audit_and_repaired(f: Fixture) -> Fixture {
    let db = f.library.db().clone();
    let (a, b, c) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    for id in [a, b, c] {
        f.library
            .transaction(move |txn| {
                Box::pin(async move {
                    tag::ActiveModel {
                        id: Set(id),
                        name: Set(format!("t{id}")),
                        color: Set(None),
                    }
                    .insert(txn)
                    .await
                })
            })
            .await
            .expect("insert");
    }
    assert!(f.library.audit().await.expect("audit").is_empty());

    let d = Uuid::now_v7();
    // Each path SeaORM runs without hooks.
    tag::Entity::insert(tag::ActiveModel {
        id: Set(d),
        name: Set("raw insert".into()),
        color: Set(None),
    })
    .exec_without_returning(&db)
    .await
    .expect("Entity::insert");
    tag::Entity::update_many()
        .col_expr(tag::Column::Color, Expr::value("green"))
        .filter(tag::Column::Id.eq(a))
        .exec(&db)
        .await
        .expect("update_many");
    tag::Entity::delete_by_id(b)
        .exec(&db)
        .await
        .expect("delete_by_id");
    db.execute_unprepared(&format!("DELETE FROM tag WHERE name = 't{c}'"))
        .await
        .expect("raw SQL");
    let (e, g) = (Uuid::now_v7(), Uuid::now_v7());
    tag::Entity::insert_many([
        tag::ActiveModel {
            id: Set(e),
            name: Set("many e".into()),
            color: Set(None),
        },
        tag::ActiveModel {
            id: Set(g),
            name: Set("many g".into()),
            color: Set(None),
        },
    ])
    .exec_without_returning(&db)
    .await
    .expect("insert_many");
    f.library
        .transaction(move |txn| {
            Box::pin(async move {
                tag::ActiveModel {
                    id: Set(g),
                    ..Default::default()
                }
                .delete(txn)
                .await
            })
        })
        .await
        .expect("a logged delete of a record the log never saw");
    let h = Uuid::now_v7();
    f.library
        .transaction(move |txn| {
            Box::pin(async move {
                tag::ActiveModel {
                    id: Set(h),
                    name: Set("h".into()),
                    color: Set(None),
                }
                .insert(txn)
                .await
            })
        })
        .await
        .expect("insert");
    tag::Entity::delete_many()
        .filter(tag::Column::Id.eq(h))
        .exec(&db)
        .await
        .expect("delete_many");

    let drift = f.library.audit().await.expect("audit");
    let found: Vec<_> = drift
        .iter()
        .map(|d| (d.record_id.clone(), d.kind))
        .collect();
    let mut expected = vec![
        (a.to_string(), DriftKind::Unlogged),
        (b.to_string(), DriftKind::Vanished),
        (c.to_string(), DriftKind::Vanished),
        (d.to_string(), DriftKind::Unlogged),
        (e.to_string(), DriftKind::Unlogged),
        (h.to_string(), DriftKind::Vanished),
    ];
    expected.sort();
    let mut found_sorted = found.clone();
    found_sorted.sort();
    assert_eq!(found_sorted, expected);

    f.library.repair(&drift).await.expect("repair");
    assert!(
        f.library.audit().await.expect("audit").is_empty(),
        "repair records every drifted record"
    );
    // Three inserts, the delete of g, the insert of h, then one repair entry per drift.
    let log = whole_log(&f).await;
    assert_eq!(log.len(), 3 + 2 + 6);
    f
}

async fn bulk_writes_in_one_transaction_get_consecutive_seqs(f: Fixture) -> Fixture {
    let ids: Vec<Uuid> = (0..120).map(|_| Uuid::now_v7()).collect();
    let ids_for_txn = ids.clone();
    f.library
        .transaction(move |txn| {
            Box::pin(async move {
                for id in ids_for_txn {
                    user_metadata::ActiveModel {
                        id: Set(id),
                        tags: Set(serde_json::json!(["a"])),
                        notes: Set(None),
                        favorite: Set(false),
                    }
                    .insert(txn)
                    .await?;
                }
                Ok::<_, DbErr>(())
            })
        })
        .await
        .expect("bulk");
    let log = whole_log(&f).await;
    assert_eq!(log.len(), ids.len());
    let logged: Vec<String> = log.iter().map(|e| e.record_id.clone()).collect();
    let written: Vec<String> = ids.iter().map(Uuid::to_string).collect();
    assert_eq!(logged, written, "entries follow write order");
    f
}

/// Two handles on one database (say the CLI beside a running server) each cache the log's
/// tip; a handle whose cache is stale loses its claim and reads the committed tip.
async fn two_handles_on_one_database_interleave(f: Fixture) -> Fixture {
    let other = sync_core::Library::open(
        f.library.db().clone(),
        f.library.id(),
        example_app::registry(),
    )
    .await
    .expect("second handle");
    for round in 0..6 {
        let handle = if round % 2 == 0 { &f.library } else { &other };
        handle
            .transaction(|txn| {
                Box::pin(async move { new_volume(Uuid::now_v7()).insert(txn).await })
            })
            .await
            .expect("insert");
    }
    let log = whole_log(&f).await;
    assert_eq!(
        log.iter().map(|e| e.seq.0).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5, 6]
    );
    f
}

/// Values some backend cannot store, and records too large to serve, are refused when
/// they are written: nothing of the transaction commits, and the error says what to do.
async fn values_other_backends_refuse_are_refused_when_written(f: Fixture) -> Fixture {
    let attempt = |volume: volume::ActiveModel| {
        let library = f.library.clone();
        async move {
            library
                .transaction(|txn| Box::pin(async move { volume.insert(txn).await }))
                .await
                .expect_err("refused")
                .to_string()
        }
    };
    let mut nul = new_volume(Uuid::now_v7());
    nul.name = Set("Disk\0one".into());
    let error = attempt(nul).await;
    assert!(error.contains("NUL") && error.contains("`name`"), "{error}");

    let mut long = new_volume(Uuid::now_v7());
    long.color = Set(Some("c".repeat(33)));
    let error = attempt(long).await;
    assert!(
        error.contains("33 characters") && error.contains("at most 32"),
        "{error}"
    );

    let mut huge = new_volume(Uuid::now_v7());
    huge.display_name = Set(Some("x".repeat(sync_core::RECORD_BYTES_MAX)));
    let error = attempt(huge).await;
    assert!(error.contains("RECORD_BYTES_MAX"), "{error}");

    // Local fields stay on the device: no other backend sees them.
    let mut local = new_volume(Uuid::now_v7());
    local.mount_point = Set("/mnt/\0odd".into());
    if f.url.starts_with("sqlite") {
        f.library
            .transaction(|txn| Box::pin(async move { local.insert(txn).await }))
            .await
            .expect("a local field is not checked");
    }
    let rows = volume::Entity::find()
        .filter(volume::Column::Name.ne("Disk"))
        .all(f.library.db())
        .await
        .expect("rows");
    assert!(rows.is_empty(), "nothing refused was written: {rows:?}");
    let logged = whole_log(&f).await.len();
    assert_eq!(logged, usize::from(f.url.starts_with("sqlite")));
    f
}

crate::on_every_backend!(
    values_other_backends_refuse_are_refused_when_written,
    two_handles_on_one_database_interleave,
    insert_update_delete_each_leave_one_entry,
    local_fields_never_reach_the_log,
    unsynced_models_and_filtered_records_never_reach_the_log,
    rollback_leaves_no_entry,
    phantom_deletes_are_not_logged,
    save_and_update_without_returning_are_captured,
    app_behavior_runs_and_the_model_still_syncs,
    writes_outside_the_sync_transaction_are_refused,
    unrecorded_scope_and_record_again,
    writes_that_skip_hooks_are_found_by_audit_and_repaired,
    bulk_writes_in_one_transaction_get_consecutive_seqs,
);
