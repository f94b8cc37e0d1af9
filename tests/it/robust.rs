//! Issue 14's findings: what operators hit with the release build, each pinned by a test.

use sync_core::Seq;

use crate::support::Backend;

/// `read_log` takes any position and limit: seqs end at `i64::MAX`, so nothing lies past
/// it, and a limit above it is no limit (the drivers refuse larger numbers, SQLite's by
/// panicking).
#[tokio::test]
async fn read_log_clamps_positions_and_limits_past_the_stored_range() {
    let test = "robust::read_log_clamps_positions_and_limits_past_the_stored_range";
    let Some(f) = crate::support::fixture(Backend::Sqlite, test).await else {
        return;
    };
    example_app::ops::put(&f.library, "tag", r#"{"name":"one"}"#)
        .await
        .expect("put");
    let all = f.library.read_log(Seq::ZERO, u64::MAX).await.expect("read");
    assert_eq!(all.len(), 1);
    for after in [
        Seq(i64::MAX as u64),
        Seq(i64::MAX as u64 + 1),
        Seq(u64::MAX),
    ] {
        let none = f.library.read_log(after, u64::MAX).await.expect("read");
        assert!(none.is_empty(), "nothing after {after}");
    }
    assert!(
        f.library
            .read_log(Seq::ZERO, 0)
            .await
            .expect("read")
            .is_empty()
    );
    f.finish().await;
}

fn sqlite_url(dir: &std::path::Path, name: &str) -> String {
    format!("sqlite://{}?mode=rwc", dir.join(name).display())
}

async fn put_tags(library: &sync_core::Library, count: usize) -> Seq {
    for i in 0..count {
        example_app::ops::put(library, "tag", &format!(r#"{{"name":"tag {i}"}}"#))
            .await
            .expect("put");
    }
    library.latest_seq().await.expect("latest")
}

/// A consistent copy of a SQLite library's database, as an operator's backup would be.
async fn backup(library: &sync_core::Library, to: &std::path::Path) {
    use sea_orm::ConnectionTrait;
    library
        .db()
        .execute_unprepared(&format!("VACUUM INTO '{}'", to.display()))
        .await
        .expect("vacuum into");
}

async fn serve(library: &sync_core::Library) -> sync_transport::Server {
    let key = library.device_key().await.expect("key");
    let server = sync_transport::Server::bind(
        "127.0.0.1:0".parse().expect("addr"),
        &key,
        vec![library.clone()],
        sync_transport::ServerConfig::default(),
    )
    .await
    .expect("bind");
    library
        .set_local_setting(
            example_app::net::SERVE_ADDRESS,
            &server.local_addr().to_string(),
        )
        .await
        .expect("address");
    server
}

/// A leader whose database is restored from an older copy has lost entries its followers
/// have. Followers ahead of it must not report "in sync" (nor later fail on a checksum
/// mismatch once its log grows past them): its refusal says what happened, over QUIC as
/// typed as in process, and the follow loop shows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_restored_from_an_older_copy_refuses_followers_ahead_of_it() {
    use std::sync::Arc;
    use sync_core::{InProcess, PullError, SyncError};

    let dir = tempfile::tempdir().expect("dir");
    let db = example_app::connect(&sqlite_url(dir.path(), "leader.db"))
        .await
        .expect("connect");
    <example_app::Migrator as sea_orm_migration::MigratorTrait>::up(&db, None)
        .await
        .expect("migrate");
    let leader = sync_core::Library::create(db, "restored", example_app::registry())
        .await
        .expect("create");
    let server = serve(&leader).await;
    let token = example_app::net::invite(
        &leader,
        sync_core::Access::Write,
        std::time::Duration::from_secs(600),
        None,
    )
    .await
    .expect("invite");
    let follower = example_app::net::join(
        &sqlite_url(dir.path(), "follower.db"),
        &token,
        Some("ahead"),
    )
    .await
    .expect("join");
    let backed_up = put_tags(&leader, 3).await;
    // The operator's backup, with the follower a member already.
    let copy = dir.path().join("backup.db");
    backup(&leader, &copy).await;
    let latest = put_tags(&leader, 2).await;
    let transport = example_app::net::transport(&follower, None)
        .await
        .expect("transport");
    let position = follower
        .follower()
        .expect("a follower")
        .catch_up(&*transport, 1_000)
        .await
        .expect("sync");
    assert_eq!(position.seq, latest);
    server.shutdown().await;

    // The leader's disk is lost; it comes back from the backup.
    let restored = sync_core::Library::open_default(
        example_app::connect(&format!("sqlite://{}?mode=rw", copy.display()))
            .await
            .expect("connect"),
        example_app::registry(),
    )
    .await
    .expect("open the copy");
    assert_eq!(restored.latest_seq().await.expect("latest"), backed_up);
    let server = serve(&restored).await;
    let address = server.local_addr().to_string();
    let transport = example_app::net::transport(&follower, Some(&address))
        .await
        .expect("transport");
    let refused = follower
        .follower()
        .expect("a follower")
        .catch_up(&*transport, 1_000)
        .await;
    let Err(SyncError::Pull(PullError::HistoryDiverged(divergence))) = refused else {
        panic!("a follower ahead of its leader must be refused, typed: {refused:?}");
    };
    assert_eq!(divergence.position, latest);
    assert_eq!(divergence.checksum, position.checksum);
    assert_eq!(divergence.leader_latest_seq, backed_up);
    assert_eq!(divergence.leader_checksum, None);
    let message = divergence.to_string();
    assert!(
        message.contains("restored from an older copy") && message.contains("not built yet"),
        "{message}"
    );
    assert_eq!(follower.position().await.expect("position"), position);

    // The restored leader's log grows past the follower's position: another history at
    // that seq, still refused as one (not a checksum mismatch half-way through a batch).
    let grown = put_tags(&restored, 4).await;
    assert!(grown > latest);
    let refused = follower
        .follower()
        .expect("a follower")
        .catch_up(&*transport, 1_000)
        .await;
    let Err(SyncError::Pull(PullError::HistoryDiverged(divergence))) = refused else {
        panic!("another history at the follower's position must be refused: {refused:?}");
    };
    assert_eq!(divergence.leader_latest_seq, grown);
    assert!(
        divergence
            .leader_checksum
            .is_some_and(|c| c != position.checksum)
    );
    assert!(
        divergence
            .to_string()
            .contains("differs from this follower's at seq")
    );

    // In process as well, and the follow loop shows it as its last error.
    let follow = follower.follower().expect("a follower").start_following(
        Arc::new(InProcess::new(restored.leader().expect("the leader"))),
        sync_core::FollowConfig::default(),
    );
    let status = follow
        .wait_for(std::time::Duration::from_secs(30), |s| {
            s.last_error
                .as_deref()
                .is_some_and(|e| e.contains("restored from an older copy"))
        })
        .await;
    assert!(status.is_some(), "{:?}", follow.status());
    follow.stop().await;
    assert_eq!(follower.position().await.expect("position"), position);

    // A follower that starts from the beginning states no history: it is served.
    let fresh =
        example_app::bench::in_process_follower(&sqlite_url(dir.path(), "fresh.db"), &restored)
            .await
            .expect("fresh follower");
    let reached = fresh
        .follower()
        .expect("a follower")
        .catch_up(
            &InProcess::new(restored.leader().expect("the leader")),
            1_000,
        )
        .await
        .expect("sync from zero");
    assert_eq!(reached.seq, grown);
    server.shutdown().await;
}

/// `join_with_settings` stores the app's settings with the library, in one transaction;
/// joining again (after a join an older build left half-done) keeps the position; a
/// leader cannot join its own library.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_stores_its_settings_with_the_library_and_can_be_made_again() {
    use sync_core::{Access, InProcess, Library, OpenError};

    let test = "robust::join_stores_its_settings_with_the_library_and_can_be_made_again";
    let Some(f) = crate::support::fixture(Backend::Sqlite, test).await else {
        return;
    };
    let latest = put_tags(&f.library, 2).await;
    let dir = tempfile::tempdir().expect("dir");
    let db = example_app::connect(&sqlite_url(dir.path(), "follower.db"))
        .await
        .expect("connect");
    <example_app::Migrator as sea_orm_migration::MigratorTrait>::up(&db, None)
        .await
        .expect("migrate");
    let join = |settings: &'static [(&'static str, &'static str)]| {
        Library::join_with_settings(
            db.clone(),
            f.library.id(),
            f.library.device_id(),
            "joined",
            Access::Read,
            settings,
            example_app::registry(),
        )
    };
    let follower = join(&[("leader_address", "leader.local:7447")])
        .await
        .expect("join");
    assert_eq!(
        follower
            .local_setting("leader_address")
            .await
            .expect("read"),
        Some("leader.local:7447".to_owned())
    );
    let position = follower
        .follower()
        .expect("a follower")
        .catch_up(
            &InProcess::new(f.library.leader().expect("the leader")),
            1_000,
        )
        .await
        .expect("sync");
    assert_eq!(position.seq, latest);

    let again = join(&[("leader_key", "pinned")]).await.expect("join again");
    assert_eq!(again.position().await.expect("position"), position);
    assert_eq!(
        again.local_setting("leader_key").await.expect("read"),
        Some("pinned".to_owned())
    );

    let own = Library::join_with_settings(
        f.library.db().clone(),
        f.library.id(),
        sync_core::DeviceId::new_random(),
        "mine",
        Access::Write,
        &[],
        example_app::registry(),
    )
    .await;
    assert!(
        matches!(own, Err(OpenError::LeadsLibrary(id)) if id == f.library.id()),
        "{own:?}"
    );
    f.finish().await;
}
