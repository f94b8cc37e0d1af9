//! Changes that survive restores and copies, and changes the leader cannot store: set
//! aside, never wedging the rest, never lost without a word.

use sea_orm::ConnectionTrait;
use serde_json::json;
use sync_core::{InProcess, Library};

use crate::offline::{Three, assert_converged, entries_of, get, id_of, member, put, sync, three};
use crate::support::Backend;

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
    let transport = InProcess::new(l.clone());
    let pushed = a.push_outbox(&transport).await.expect("push");
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
    a.catch_up(&transport, 1_000).await.expect("pull");
    assert!(get(&a, "tag", &id_of(&refused)).await.is_none());
    // Pushed again (a lost acknowledgement), it is not taken twice nor rejected twice.
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
