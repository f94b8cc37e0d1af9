//! Changes that survive restores and copies, and changes the leader cannot store: set
//! aside, never wedging the rest, never lost without a word.

use sea_orm::ConnectionTrait;
use serde_json::json;
use sync_core::{InProcess, Library};

use crate::offline::{Three, assert_converged, entries_of, get, id_of, member, put, sync, three};
use crate::support::Backend;

/// Loses the leader's first answer to a push (after the leader acted on it).
struct LosesFirstAnswer {
    inner: InProcess,
    lost: std::sync::atomic::AtomicBool,
}

#[async_trait::async_trait]
impl sync_core::Transport for LosesFirstAnswer {
    async fn pull(
        &self,
        request: sync_core::PullRequest,
    ) -> Result<sync_core::PullResponse, sync_core::PullError> {
        self.inner.pull(request).await
    }

    async fn push(
        &self,
        request: sync_core::PushRequest,
    ) -> Result<sync_core::PushResponse, sync_core::PushError> {
        let answer = self.inner.push(request).await?;
        if !self.lost.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return Err(sync_core::PushError::Transport("answer lost".into()));
        }
        Ok(answer)
    }
}

/// A consistent copy of a SQLite follower's database, taken while it runs (`VACUUM INTO`).
async fn backup(library: &Library, to: &std::path::Path) {
    library
        .db()
        .execute_unprepared(&format!("VACUUM INTO '{}'", to.display()))
        .await
        .expect("backup");
}

/// Opens a copy made by `backup` as the same library.
async fn open_copy(path: &std::path::Path, leader: &Library) -> Library {
    let db = example_app::connect(&format!("sqlite://{}?mode=rw", path.display()))
        .await
        .expect("connect");
    Library::open(db, leader.id(), example_app::registry())
        .await
        .expect("open")
}

fn names(dump: &serde_json::Value) -> Vec<String> {
    let mut names: Vec<String> = dump["tag"]
        .as_array()
        .expect("tags")
        .iter()
        .map(|t| t["name"].as_str().unwrap_or_default().to_owned())
        .collect();
    names.sort();
    names
}

async fn dump_json(library: &Library) -> serde_json::Value {
    serde_json::to_value(library.dump().await.expect("dump")).expect("json")
}

/// A follower backed up with t1 and t2 in its outbox pushes them, is restored from the
/// backup, and writes t3: t3 reaches the leader (an earlier build reused outbox id 2 for
/// it, and the leader skipped it as taken), and t1, t2 are logged once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_restored_from_a_backup_loses_no_write() {
    let Some(Three { leader, a, b, dir }) = three(Backend::Sqlite, "set_aside::restored").await
    else {
        return;
    };
    let l = &leader.library;
    let t1 = put(&a, "tag", json!({"name": "t1"})).await;
    let t2 = put(&a, "tag", json!({"name": "t2"})).await;
    let saved = dir.path().join("a-backup.db");
    backup(&a, &saved).await;
    sync(&a, l).await;
    a.db().clone().close().await.expect("close");

    let restored = open_copy(&saved, l).await;
    assert_eq!(
        restored.outbox_len().await.expect("outbox"),
        2,
        "as backed up"
    );
    let t3 = put(&restored, "tag", json!({"name": "t3"})).await;
    sync(&restored, l).await;
    sync(&b, l).await;

    assert_eq!(restored.outbox_len().await.expect("outbox"), 0);
    assert_eq!(
        names(&dump_json(l).await),
        ["t1", "t2", "t3"],
        "t3 reached the leader"
    );
    for tag in [&t1, &t2, &t3] {
        assert_eq!(
            entries_of(l, &id_of(tag)).await.len(),
            1,
            "logged once: {tag}"
        );
    }
    assert_converged(&[l, &restored, &b]).await;
    leader.finish().await;
}

/// A follower's database copied to a second machine: both copies write, both push, and
/// every write of either reaches the leader and the other devices.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_copied_to_a_second_machine_loses_no_write() {
    let Some(Three { leader, a, b, dir }) = three(Backend::Sqlite, "set_aside::copied").await
    else {
        return;
    };
    let l = &leader.library;
    put(&a, "tag", json!({"name": "before the copy"})).await;
    let copied = dir.path().join("a-copy.db");
    backup(&a, &copied).await;
    let copy = open_copy(&copied, l).await;
    put(&a, "tag", json!({"name": "on the original"})).await;
    put(&copy, "tag", json!({"name": "on the copy"})).await;
    sync(&a, l).await;
    sync(&copy, l).await;
    sync(&a, l).await;
    sync(&b, l).await;
    assert_eq!(
        names(&dump_json(l).await),
        ["before the copy", "on the copy", "on the original"]
    );
    assert_converged(&[l, &a, &copy, &b]).await;
    leader.finish().await;
}

/// The leader's database refuses one pushed change (here a unique index only the leader
/// has): that change is set aside, recorded on the leader and on its author with the
/// reason, the changes before and after it in the same push are taken, and the author's
/// record converges to the leader's state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_the_leader_cannot_store_is_set_aside_and_the_rest_goes_on() {
    let Some(Three {
        leader,
        a,
        b,
        dir: _dir,
    }) = three(Backend::Sqlite, "set_aside::refused").await
    else {
        return;
    };
    let l = &leader.library;
    l.db()
        .execute_unprepared("CREATE UNIQUE INDEX tag_name_unique ON tag (name)")
        .await
        .expect("index");
    put(l, "tag", json!({"name": "taken"})).await;
    let before = put(&a, "tag", json!({"name": "before"})).await;
    let refused = put(&a, "tag", json!({"name": "taken"})).await;
    let after = put(&a, "tag", json!({"name": "after"})).await;
    let transport = InProcess::new(l.leader().expect("the leader"));
    // The first answer is lost: the leader has taken (and rejected) the changes, the
    // follower does not know. Pushed again, the rejection is reported again.
    let losing = LosesFirstAnswer {
        inner: InProcess::new(l.leader().expect("the leader")),
        lost: std::sync::atomic::AtomicBool::new(false),
    };
    assert!(
        a.follower()
            .expect("a follower")
            .push_outbox(&losing)
            .await
            .is_err()
    );
    assert_eq!(a.outbox_len().await.expect("outbox"), 3);
    let pushed = a
        .follower()
        .expect("a follower")
        .push_outbox(&losing)
        .await
        .expect("push");
    assert_eq!((pushed.acknowledged, pushed.rejected), (3, 1));
    assert_eq!(a.outbox_len().await.expect("outbox"), 0, "nothing wedged");
    assert!(get(l, "tag", &id_of(&before)).await.is_some());
    assert!(get(l, "tag", &id_of(&after)).await.is_some());
    assert!(get(l, "tag", &id_of(&refused)).await.is_none());

    for device in [l, &a] {
        let listed = device.rejected().await.expect("rejected");
        assert_eq!(listed.len(), 1, "{listed:?}");
        assert_eq!(listed[0].record_id, id_of(&refused));
        assert_eq!(listed[0].device_id, a.device_id().to_string());
        assert!(listed[0].reason.contains("UNIQUE"), "{}", listed[0].reason);
        assert!(
            listed[0]
                .data
                .as_deref()
                .unwrap_or_default()
                .contains("taken")
        );
    }
    // The author pulls the leader's state of the record: it no longer holds it.
    a.follower()
        .expect("a follower")
        .catch_up(&transport, 1_000)
        .await
        .expect("pull");
    assert!(get(&a, "tag", &id_of(&refused)).await.is_none());
    sync(&b, l).await;
    assert_converged(&[l, &a, &b]).await;
    assert_eq!(l.rejected_count().await.expect("count"), 1);
    assert!(
        l.dismiss_rejected(&l.rejected().await.expect("list")[0].change_id)
            .await
            .expect("dismiss")
    );
    assert_eq!(l.rejected_count().await.expect("count"), 0);
    leader.finish().await;
}

/// A SQLite follower writes a 300-character name; the MariaDB leader's `varchar(255)`
/// refuses it: that change is rejected, the follower's next change still arrives, and
/// both end with the same data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_too_long_for_a_mysql_leader_is_rejected_not_wedging() {
    let Some(leader) = crate::support::fixture(Backend::Mysql, "set_aside::too_long").await else {
        return;
    };
    let l = &leader.library;
    let dir = tempfile::tempdir().expect("dir");
    let a = member(l, dir.path(), "a", sync_core::Access::Write).await;
    let long = put(&a, "tag", json!({"name": "x".repeat(300)})).await;
    let next = put(&a, "tag", json!({"name": "short"})).await;
    sync(&a, l).await;
    assert_eq!(a.outbox_len().await.expect("outbox"), 0);
    assert!(get(l, "tag", &id_of(&next)).await.is_some());
    assert!(
        get(&a, "tag", &id_of(&long)).await.is_none(),
        "converged to the leader"
    );
    let listed = a.rejected().await.expect("rejected");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].record_id, id_of(&long));
    assert_converged(&[l, &a]).await;
    leader.finish().await;
}

/// A follower's database refuses a pulled entry (here a unique index only the follower
/// has): the follower stops at it with an error naming seq, model and record, keeping what
/// applies before it; parked by a person, the entries after it go on, a later entry of
/// the same record waits behind it, and once the cause is fixed `retry_parked` applies
/// both and the follower matches the leader again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_a_follower_cannot_store_stops_it_until_parked() {
    let Some(Three {
        leader,
        a,
        b: _b,
        dir: _dir,
    }) = three(Backend::Sqlite, "set_aside::stuck").await
    else {
        return;
    };
    let l = &leader.library;
    a.db()
        .execute_unprepared("CREATE UNIQUE INDEX tag_name_unique ON tag (name)")
        .await
        .expect("index");
    let first = put(l, "tag", json!({"name": "same"})).await;
    let second = put(l, "tag", json!({"name": "same"})).await;
    let after = put(l, "tag", json!({"name": "after"})).await;
    let transport = InProcess::new(l.leader().expect("the leader"));
    let stuck_seq = entries_of(l, &id_of(&second)).await[0].seq;

    for _ in 0..2 {
        // It stays stuck at the same entry, however often it tries.
        let error = a
            .follower()
            .expect("a follower")
            .catch_up(&transport, 1_000)
            .await
            .expect_err("stuck");
        let text = error.to_string();
        assert!(
            matches!(
                &error,
                sync_core::SyncError::Apply(sync_core::ApplyError::Stuck { seq, model, record_id, .. })
                    if *seq == stuck_seq && model == "tag" && *record_id == id_of(&second)
            ),
            "{text}"
        );
        assert!(
            text.contains("UNIQUE") && text.contains("FollowerView::park"),
            "{text}"
        );
        assert!(
            get(&a, "tag", &id_of(&first)).await.is_some(),
            "the entry before it applied"
        );
        assert!(get(&a, "tag", &id_of(&after)).await.is_none());
    }

    a.follower()
        .expect("a follower")
        .park(stuck_seq)
        .await
        .expect("park");
    assert!(
        a.follower()
            .expect("a follower")
            .park(sync_core::Seq(1))
            .await
            .is_err(),
        "applied entries cannot be parked"
    );
    put(
        l,
        "tag",
        json!({"id": id_of(&second), "name": "same", "color": "red"}),
    )
    .await;
    a.follower()
        .expect("a follower")
        .catch_up(&transport, 1_000)
        .await
        .expect("goes on");
    assert!(get(&a, "tag", &id_of(&after)).await.is_some());
    assert!(get(&a, "tag", &id_of(&second)).await.is_none());
    let parked = a.parked().await.expect("parked");
    assert_eq!(
        parked.len(),
        2,
        "the stuck entry and the one behind it: {parked:?}"
    );
    assert!(
        parked
            .iter()
            .all(|p| p.arrived && p.record_id.as_deref() == Some(id_of(&second).as_str()))
    );

    // Still refused: nothing leaves the parking.
    let retried = a
        .follower()
        .expect("a follower")
        .retry_parked()
        .await
        .expect("retry");
    assert_eq!((retried.applied, retried.still_parked), (0, 2));
    assert!(retried.first_failure.unwrap_or_default().contains("UNIQUE"));

    // The cause fixed (the first tag renamed on the leader), both apply in order.
    put(l, "tag", json!({"id": id_of(&first), "name": "renamed"})).await;
    a.follower()
        .expect("a follower")
        .catch_up(&transport, 1_000)
        .await
        .expect("pull");
    let retried = a
        .follower()
        .expect("a follower")
        .retry_parked()
        .await
        .expect("retry");
    assert_eq!((retried.applied, retried.still_parked), (2, 0));
    assert_eq!(a.parked_count().await.expect("count"), 0);
    assert_eq!(
        get(&a, "tag", &id_of(&second)).await.expect("applied")["color"],
        "red"
    );
    assert_converged(&[l, &a]).await;
    leader.finish().await;
}

/// A MariaDB follower of a SQLite leader cannot store a 300-character name in its
/// `varchar(255)`: it stops at that entry naming it; parked, the rest goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mysql_follower_stops_at_a_value_too_long_and_goes_on_once_parked() {
    let Some(server) = crate::support::server_url(Backend::Mysql, "set_aside::mysql_follower")
    else {
        return;
    };
    let Some(leader) = crate::support::fixture(Backend::Sqlite, "set_aside::mysql_follower").await
    else {
        return;
    };
    let l = &leader.library;
    let dir = tempfile::tempdir().expect("dir");
    let url = example_app::fresh_database(&server, dir.path())
        .await
        .expect("database");
    let db = example_app::connect(&url).await.expect("connect");
    <example_app::Migrator as sea_orm_migration::MigratorTrait>::up(&db, None)
        .await
        .expect("migrate");
    let key = Library::device_key_of(&db).await.expect("key");
    let invite = l
        .leader()
        .expect("the leader")
        .invite(sync_core::Access::Read, std::time::Duration::from_secs(60))
        .await
        .expect("invite");
    l.leader()
        .expect("the leader")
        .redeem_invite(
            &invite.secret,
            sync_core::Access::Read,
            key.fingerprint(),
            Some("m"),
        )
        .await
        .expect("redeem");
    let m = Library::join(
        db,
        l.id(),
        l.device_id(),
        "test",
        sync_core::Access::Read,
        example_app::registry(),
    )
    .await
    .expect("join");
    let long = put(l, "tag", json!({"name": "x".repeat(300)})).await;
    let next = put(l, "tag", json!({"name": "short"})).await;
    let transport = InProcess::new(l.leader().expect("the leader"));
    let error = m
        .follower()
        .expect("a follower")
        .catch_up(&transport, 1_000)
        .await
        .expect_err("stuck");
    let seq = match &error {
        sync_core::SyncError::Apply(sync_core::ApplyError::Stuck { seq, record_id, .. }) => {
            assert_eq!(*record_id, id_of(&long));
            *seq
        }
        other => panic!("{other}"),
    };
    m.follower()
        .expect("a follower")
        .park(seq)
        .await
        .expect("park");
    m.follower()
        .expect("a follower")
        .catch_up(&transport, 1_000)
        .await
        .expect("goes on");
    assert!(get(&m, "tag", &id_of(&next)).await.is_some());
    assert_eq!(m.parked_count().await.expect("parked"), 1);
    let _ = m.db().clone().close().await;
    let _ = example_app::drop_database(&url).await;
    leader.finish().await;
}

/// The leader renames a shared tag into its private form (`.name`: the filter keeps it on
/// this device): the followers see it deleted, and a follower's later edit of it does not
/// overwrite the leader's private row; every dump is the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_the_leader_makes_local_leaves_the_others_and_stays_private() {
    let Some(t) = three(Backend::Sqlite, "set_aside::leader_filter").await else {
        return;
    };
    let l = &t.leader.library;
    let tag = put(l, "tag", json!({"name": "shared"})).await;
    let id = id_of(&tag);
    t.pull_both().await;
    put(l, "tag", json!({"id": id, "name": ".private"})).await;
    crate::offline::tick().await;
    // a edits it before it has heard of the rename.
    put(&t.a, "tag", json!({"id": id, "color": "red"})).await;
    t.settle(&t.a).await;
    let kept = get(l, "tag", &id).await.expect("the leader keeps its row");
    assert_eq!(kept["name"], ".private");
    assert!(
        kept["color"].is_null(),
        "not overwritten by the push: {kept}"
    );
    assert!(get(&t.a, "tag", &id).await.is_none());
    assert!(get(&t.b, "tag", &id).await.is_none());
    t.leader.finish().await;
}

/// A follower renames a shared tag into its private form: the leader and the other
/// follower see it deleted, and it stays on that follower, also when its own delete comes
/// back and when another device's later edit re-creates the record elsewhere (the
/// follower answers with a delete again). Renamed back, it is shared again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_a_follower_makes_local_leaves_the_others_and_stays_private() {
    let Some(t) = three(Backend::Sqlite, "set_aside::follower_filter").await else {
        return;
    };
    let l = &t.leader.library;
    let tag = put(l, "tag", json!({"name": "shared"})).await;
    let id = id_of(&tag);
    t.pull_both().await;
    put(&t.a, "tag", json!({"id": id, "name": ".mine"})).await;
    sync(&t.a, l).await;
    assert!(get(l, "tag", &id).await.is_none(), "gone from the leader");
    assert_eq!(get(&t.a, "tag", &id).await.expect("kept")["name"], ".mine");
    crate::offline::tick().await;
    // b edits it later, without having heard of the rename: it re-creates it on the leader.
    put(&t.b, "tag", json!({"id": id, "color": "blue"})).await;
    sync(&t.b, l).await;
    // a passes over the re-creation and answers with a delete, pushed on its next round.
    sync(&t.a, l).await;
    sync(&t.a, l).await;
    t.pull_both().await;
    assert_converged(&[l, &t.a, &t.b]).await;
    assert!(get(l, "tag", &id).await.is_none());
    assert_eq!(
        get(&t.a, "tag", &id).await.expect("still private")["name"],
        ".mine"
    );

    // Back to a shared name: it reaches every device again.
    put(&t.a, "tag", json!({"id": id, "name": "back"})).await;
    t.settle(&t.a).await;
    assert_eq!(
        get(&t.b, "tag", &id).await.expect("shared again")["name"],
        "back"
    );
    t.leader.finish().await;
}

/// Outbox rows written by a build before change identities carry none: those at or below
/// the device's old mark on the leader (`sync_pushed`) were taken then and are not taken
/// again; those above it are taken now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_rows_from_before_change_identities_are_taken_once() {
    let Some(Three {
        leader,
        a,
        b: _b,
        dir: _dir,
    }) = three(Backend::Sqlite, "set_aside::legacy").await
    else {
        return;
    };
    let l = &leader.library;
    let old = put(&a, "tag", json!({"name": "taken by the old build"})).await;
    let new = put(&a, "tag", json!({"name": "not taken yet"})).await;
    a.db()
        .execute_unprepared("UPDATE sync_outbox SET change_id = NULL")
        .await
        .expect("an old build's rows");
    let first: i64 = {
        use sea_orm::{FromQueryResult, Statement};
        #[derive(FromQueryResult)]
        struct Row {
            id: i64,
        }
        Row::find_by_statement(Statement::from_string(
            a.db().get_database_backend(),
            "SELECT MIN(id) AS id FROM sync_outbox",
        ))
        .one(a.db())
        .await
        .expect("query")
        .expect("a row")
        .id
    };
    l.db()
        .execute_unprepared(&format!(
            "INSERT INTO sync_pushed (library_id, device_id, through) VALUES ('{}', '{}', {first})",
            l.id(),
            a.device_id()
        ))
        .await
        .expect("the old mark");
    sync(&a, l).await;
    assert_eq!(a.outbox_len().await.expect("outbox"), 0);
    assert!(
        get(l, "tag", &id_of(&old)).await.is_none(),
        "not taken twice"
    );
    assert!(get(l, "tag", &id_of(&new)).await.is_some(), "taken");
    leader.finish().await;
}
