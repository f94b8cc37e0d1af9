//! Several handles (as several server processes would) on one leader's database: what
//! each keeps for itself must stay correct when the others write too (issue 13 part 5).
//! The end-to-end case, three `serve` processes on one PostgreSQL with one killed under
//! load, is `example-app/tests/cli.rs`'s
//! `three_serve_processes_on_one_postgres_and_one_killed_under_load`.

use std::time::Duration;

use example_app::load::{LoadOptions, load};
use example_app::{connect, registry};
use sync_core::{Access, DeviceKey, Library, Seq, verify_chain};

use crate::support::Fixture;

/// Another handle on the fixture's database: what a second process opens.
async fn second_handle(f: &Fixture) -> Library {
    let db = connect(&f.url).await.expect("connect");
    Library::open_default(db, registry())
        .await
        .expect("open the library")
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// A follower that moved from one server process to another is noted by both; the one
/// that saw it last wins, whichever writes its notes last. Before, the later write won:
/// a process flushing an older sighting set the follower's position back.
async fn the_newest_sighting_of_a_follower_wins_across_handles(f: Fixture) -> Fixture {
    let first = f.library.clone();
    let second = second_handle(&f).await;
    let invite = first
        .leader()
        .expect("the leader")
        .invite(Access::Read, Duration::from_secs(600))
        .await
        .expect("invite");
    let key = DeviceKey::generate().expect("key").fingerprint();
    let device = key.device_id();
    first
        .leader()
        .expect("the leader")
        .redeem_invite(&invite.secret, Access::Read, key, None)
        .await
        .expect("redeem");
    // Seen by the first process at 10, then (a later millisecond) by the second at 20.
    first
        .leader()
        .expect("the leader")
        .record_peer_position(device, Seq(10))
        .await
        .expect("note");
    let noted = now_ms();
    while now_ms() == noted {
        tokio::task::yield_now().await;
    }
    second
        .leader()
        .expect("the leader")
        .record_peer_position(device, Seq(20))
        .await
        .expect("note");
    // The newer sighting is written first, the older one after it.
    second
        .leader()
        .expect("the leader")
        .flush_peer_positions()
        .await
        .expect("flush");
    first
        .leader()
        .expect("the leader")
        .flush_peer_positions()
        .await
        .expect("flush");
    let third = second_handle(&f).await;
    let member = third
        .members()
        .await
        .expect("members")
        .into_iter()
        .find(|m| m.device_id == device)
        .expect("member");
    assert_eq!(member.position, Some(Seq(20)), "{member:?}");
    // A newer sighting from the first process still moves it.
    first
        .leader()
        .expect("the leader")
        .record_peer_position(device, Seq(25))
        .await
        .expect("note");
    first
        .leader()
        .expect("the leader")
        .flush_peer_positions()
        .await
        .expect("flush");
    let member = third
        .members()
        .await
        .expect("members")
        .into_iter()
        .find(|m| m.device_id == device)
        .expect("member");
    assert_eq!(member.position, Some(Seq(25)), "{member:?}");
    f
}

/// Three handles, each with its own writers (and on PostgreSQL its own sequencer), write
/// one log at once: it stays gap-free and its chain verifies.
async fn writers_of_three_handles_leave_one_gap_free_log(f: Fixture) -> Fixture {
    let handles = [
        f.library.clone(),
        second_handle(&f).await,
        second_handle(&f).await,
    ];
    let mut loads = tokio::task::JoinSet::new();
    for (i, library) in handles.iter().enumerate() {
        let library = library.clone();
        loads.spawn(async move {
            load(
                &library,
                &LoadOptions {
                    count: 300,
                    concurrency: 4,
                    seed: 7 + 10 * i as u64,
                    batch: 2,
                    sync: true,
                },
            )
            .await
            .expect("load")
        });
    }
    while let Some(done) = loads.join_next().await {
        done.expect("load task");
    }
    let latest = handles[2].latest_seq().await.expect("latest");
    let entries = handles[1]
        .read_log(Seq::ZERO, 10_000)
        .await
        .expect("read the log");
    assert_eq!(entries.len() as u64, latest.0);
    verify_chain(Seq::ZERO, 0, &entries).expect("one chain");
    // Most writes are synced (temp files are not); all three loads are in it.
    assert!(latest.0 > 450, "latest {latest}");
    assert!(f.library.audit().await.expect("audit").is_empty());
    f
}

/// Server processes sharing one database are one device: several of them making its key
/// at once all end up with the same one.
async fn processes_making_the_device_key_at_once_share_it(f: Fixture) -> Fixture {
    // The fixture's database has a key; a fresh one of the same backend has none.
    let dir = tempfile::tempdir().expect("dir");
    let base = if f.url.starts_with("sqlite:") {
        "sqlite".to_owned()
    } else {
        // Any database on the server will do to make another.
        f.url.clone()
    };
    let url = example_app::fresh_database(&base, dir.path())
        .await
        .expect("fresh");
    let db = connect(&url).await.expect("connect");
    use sea_orm_migration::MigratorTrait;
    example_app::Migrator::up(&db, None).await.expect("migrate");
    let mut makers = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let url = url.clone();
        makers.spawn(async move {
            let db = connect(&url).await.expect("connect");
            let key = Library::device_key_of(&db).await.expect("key");
            let _ = db.close().await;
            key.fingerprint()
        });
    }
    let mut keys = std::collections::HashSet::new();
    while let Some(key) = makers.join_next().await {
        keys.insert(key.expect("maker"));
    }
    assert_eq!(keys.len(), 1, "one device key: {keys:?}");
    let again = Library::device_key_of(&db).await.expect("key");
    assert!(keys.contains(&again.fingerprint()));
    let _ = db.close().await;
    let _ = example_app::drop_database(&url).await;
    f
}

crate::on_every_backend!(
    the_newest_sighting_of_a_follower_wins_across_handles,
    writers_of_three_handles_leave_one_gap_free_log,
    processes_making_the_device_key_at_once_share_it,
);

/// `invite` names the addresses of the server processes alive now: a registered process
/// is named, one whose heartbeat is stale (it died without removing its entry) is not,
/// and its entry is removed; one that stopped cleanly removed its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invites_name_the_live_server_processes_only() {
    use example_app::net::{Registration, SERVING_PREFIX, serving_addresses};
    let Some(f) = crate::support::fixture(
        crate::support::Backend::Sqlite,
        "scaleout::invites_name_the_live_server_processes_only",
    )
    .await
    else {
        return;
    };
    let library = f.library.clone();
    let first = Registration::start_at(&library, "127.0.0.1:7001")
        .await
        .expect("register");
    let second = Registration::start_at(&library, "127.0.0.1:7002")
        .await
        .expect("register");
    let dead = format!("{SERVING_PREFIX}127.0.0.1:7003");
    let long_ago = now_ms() - 60_000;
    library
        .set_local_setting(&dead, &long_ago.to_string())
        .await
        .expect("a dead process's entry");
    let mut named = serving_addresses(&library).await.expect("addresses");
    named.sort();
    assert_eq!(named, ["127.0.0.1:7001", "127.0.0.1:7002"]);
    assert_eq!(library.local_setting(&dead).await.expect("read"), None);
    second.end().await.expect("stop");
    assert_eq!(
        serving_addresses(&library).await.expect("addresses"),
        ["127.0.0.1:7001"]
    );
    let token = example_app::net::invite(&library, Access::Read, Duration::from_secs(60), None)
        .await
        .expect("invite");
    let token = sync_transport::JoinToken::decode(&token).expect("token");
    assert_eq!(token.addresses(), ["127.0.0.1:7001"]);
    drop(first);
    f.finish().await;
}
