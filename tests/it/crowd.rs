//! A crowd of followers is load, not failure: many devices joining, pulling and being
//! admitted while the leader writes are all served, and all converge.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use example_app::{connect, net, ops, registry};
use sync_core::{Access, DeviceKey, FollowConfig, Library, Seq};
use tokio::sync::watch;

use crate::on_every_backend;
use crate::support::Fixture;

const DEADLINE: Duration = Duration::from_secs(120);

/// Followers in the QUIC crowd: enough that joins, pulls and the leader's writes overlap
/// on every run, few enough for a 2-core CI machine.
const FOLLOWERS: usize = 24;

/// Invites redeemed at once in process.
const REDEEMERS: usize = 64;

/// Writes tags on `leader` until told to stop; returns how many.
fn keep_writing(leader: &Library) -> (watch::Sender<bool>, tokio::task::JoinHandle<u64>) {
    let (stop, mut stopped) = watch::channel(false);
    let leader = leader.clone();
    let writer = tokio::spawn(async move {
        let mut written = 0u64;
        while !*stopped.borrow_and_update() {
            ops::put(&leader, "tag", &format!(r#"{{"name":"crowd {written}"}}"#))
                .await
                .expect("the leader's write");
            written += 1;
            tokio::task::yield_now().await;
        }
        written
    });
    (stop, writer)
}

/// Every invite redeemed at once while the leader writes admits its device: each
/// admission reads the invite and then writes, and on SQLite such a transaction must
/// hold the write lock from its start (a deferred one failed with a busy snapshot,
/// code 517, whenever another commit landed between its read and its write).
async fn invites_redeemed_at_once_while_the_leader_writes_all_admit(fixture: Fixture) -> Fixture {
    let leader = fixture.library.clone();
    let mut invites = Vec::with_capacity(REDEEMERS);
    for _ in 0..REDEEMERS {
        invites.push(
            leader
                .leader()
                .expect("the leader")
                .invite(Access::Read, Duration::from_secs(600))
                .await
                .expect("invite"),
        );
    }
    let (stop, writer) = keep_writing(&leader);
    let mut redeems = tokio::task::JoinSet::new();
    for invite in invites {
        let leader = leader.clone();
        let device = DeviceKey::generate().expect("key").fingerprint();
        redeems.spawn(async move {
            leader
                .leader()
                .expect("the leader")
                .redeem_invite(&invite.secret, Access::Read, device, None)
                .await
                .map_err(|e| e.to_string())
        });
    }
    let mut refused = Vec::new();
    while let Some(outcome) = redeems.join_next().await {
        if let Err(message) = outcome.expect("redeem task") {
            refused.push(message);
        }
    }
    stop.send(true).expect("writer");
    assert!(writer.await.expect("writer") > 0);
    assert_eq!(
        refused,
        Vec::<String>::new(),
        "every invite admits its device"
    );
    let members = leader.members().await.expect("members");
    assert_eq!(members.len(), REDEEMERS + 1);
    fixture
}

/// Followers' positions are noted in memory and written together: the leader shows them
/// at once, and another handle on its database once they are flushed.
async fn followers_positions_are_noted_then_written_together(fixture: Fixture) -> Fixture {
    let leader = fixture.library.clone();
    let mut devices = Vec::new();
    for _ in 0..REDEEMERS {
        let invite = leader
            .leader()
            .expect("the leader")
            .invite(Access::Read, Duration::from_secs(600))
            .await
            .expect("invite");
        let device = DeviceKey::generate().expect("key").fingerprint();
        leader
            .leader()
            .expect("the leader")
            .redeem_invite(&invite.secret, Access::Read, device, None)
            .await
            .expect("redeem");
        devices.push(device.device_id());
    }
    for (n, device) in devices.iter().enumerate() {
        leader
            .leader()
            .expect("the leader")
            .record_peer_position(*device, Seq(n as u64))
            .await
            .expect("record");
        // A newer position replaces the older one.
        leader
            .leader()
            .expect("the leader")
            .record_peer_position(*device, Seq(n as u64 + 1))
            .await
            .expect("record");
    }
    let expect = |members: Vec<sync_core::Member>| {
        for (n, device) in devices.iter().enumerate() {
            let member = members
                .iter()
                .find(|m| m.device_id == *device)
                .expect("member");
            assert_eq!(member.position, Some(Seq(n as u64 + 1)));
            assert!(member.last_seen_ms.is_some());
        }
    };
    expect(leader.members().await.expect("members"));
    leader
        .leader()
        .expect("the leader")
        .flush_peer_positions()
        .await
        .expect("flush");
    let other = Library::open(
        connect(&fixture.url).await.expect("connect"),
        leader.id(),
        registry(),
    )
    .await
    .expect("open");
    expect(other.members().await.expect("members"));
    other.db().clone().close().await.ok();
    fixture
}

/// A crowd of followers joins over QUIC at once while the leader writes, follows live,
/// and converges; not one is refused and no follow loop meets an error.
async fn a_crowd_joins_and_follows_over_quic_while_the_leader_writes(fixture: Fixture) -> Fixture {
    let leader = fixture.library.clone();
    let server = net::serve(&leader, "127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("serve");
    let dir = tempfile::tempdir().expect("dir");
    let mut tokens = Vec::with_capacity(FOLLOWERS);
    for _ in 0..FOLLOWERS {
        tokens.push(
            net::invite(&leader, Access::Read, Duration::from_secs(600), None)
                .await
                .expect("invite"),
        );
    }
    let (stop, writer) = keep_writing(&leader);
    let errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut joins = tokio::task::JoinSet::new();
    for (n, token) in tokens.into_iter().enumerate() {
        let url = format!(
            "sqlite://{}?mode=rwc",
            dir.path().join(format!("f{n}.db")).display()
        );
        joins.spawn(async move {
            let follower = net::join(&url, &token, Some(&format!("f{n}")))
                .await
                .map_err(|e| format!("f{n} join: {e:#}"))?;
            let transport = net::transport(&follower, None)
                .await
                .map_err(|e| format!("f{n} transport: {e:#}"))?;
            let config = FollowConfig {
                retry_delay_min: Duration::from_millis(20),
                retry_delay_max: Duration::from_millis(200),
                ..FollowConfig::default()
            };
            let follow = follower
                .follower()
                .expect("a follower")
                .start_following(transport, config);
            Ok::<_, String>((follower, follow))
        });
    }
    let mut followers = Vec::with_capacity(FOLLOWERS);
    let mut watchers = tokio::task::JoinSet::new();
    while let Some(joined) = joins.join_next().await {
        match joined.expect("join task") {
            Ok((follower, follow)) => {
                // Every error a follow loop reports, as it reports it.
                let mut status = follow.watch_status();
                let errors = Arc::clone(&errors);
                watchers.spawn(async move {
                    loop {
                        let error = status.borrow_and_update().last_error.clone();
                        if let Some(message) = error {
                            errors.lock().expect("errors").push(message);
                        }
                        if status.changed().await.is_err() {
                            return;
                        }
                    }
                });
                followers.push((follower, follow));
            }
            Err(message) => errors.lock().expect("errors").push(message),
        }
    }
    stop.send(true).expect("writer");
    assert!(writer.await.expect("writer") > 0);
    let latest = leader.latest_seq().await.expect("latest");
    for (_, follow) in &followers {
        follow
            .wait_for(DEADLINE, |s| s.position >= latest)
            .await
            .expect("every follower catches up");
    }
    watchers.abort_all();
    assert_eq!(
        *errors.lock().expect("errors"),
        Vec::<String>::new(),
        "no follower is refused or meets an error"
    );
    assert_eq!(followers.len(), FOLLOWERS);
    let dump = leader.dump().await.expect("dump");
    for (follower, _) in &followers {
        assert_eq!(follower.dump().await.expect("dump"), dump);
    }
    for (_, follow) in followers {
        follow.stop().await;
    }
    server.shutdown().await;
    fixture
}

on_every_backend!(
    invites_redeemed_at_once_while_the_leader_writes_all_admit,
    followers_positions_are_noted_then_written_together,
    a_crowd_joins_and_follows_over_quic_while_the_leader_writes,
);
