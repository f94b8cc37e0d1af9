//! The leader served over QUIC on loopback: joining, live sync, and every refusal.

use std::sync::Arc;
use std::time::Duration;

use example_app::{connect, net, ops, registry};
use sync_core::{Access, FollowConfig, Library, PROTOCOL_VERSION, Seq};
use sync_transport::frame::{self, Request, Response};
use sync_transport::{
    Client, ClientConfig, JoinToken, Refusal, Server, ServerConfig, TransportError,
};

const DEADLINE: Duration = Duration::from_secs(30);

fn sqlite_url(dir: &std::path::Path, name: &str) -> String {
    format!("sqlite://{}?mode=rwc", dir.join(name).display())
}

/// A leader on SQLite serving over loopback QUIC.
struct Leader {
    library: Library,
    server: Server,
    url: String,
}

async fn leader(dir: &std::path::Path, config: ServerConfig) -> Leader {
    let url = sqlite_url(dir, "leader.db");
    let db = connect(&url).await.expect("connect");
    <example_app::Migrator as sea_orm_migration::MigratorTrait>::up(&db, None)
        .await
        .expect("migrate");
    let library = Library::create(db, "quic", registry())
        .await
        .expect("create");
    let key = library.device_key().await.expect("key");
    let server = Server::bind(
        "127.0.0.1:0".parse().expect("addr"),
        &key,
        vec![library.clone()],
        config,
    )
    .await
    .expect("bind");
    library
        .set_local_setting(net::SERVE_ADDRESS, &server.local_addr().to_string())
        .await
        .expect("address");
    Leader {
        library,
        server,
        url,
    }
}

async fn token(leader: &Leader, access: Access) -> String {
    net::invite(&leader.library, access, Duration::from_secs(600), None)
        .await
        .expect("invite")
}

async fn joined_follower(leader: &Leader, dir: &std::path::Path, name: &str) -> Library {
    let token = token(leader, Access::Write).await;
    net::join(&sqlite_url(dir, name), &token, Some(name))
        .await
        .expect("join")
}

fn live_config() -> FollowConfig {
    FollowConfig {
        // Long enough that only live notices (or sync_now) explain a quick apply.
        poll_interval: Duration::from_secs(3_600),
        retry_delay_min: Duration::from_millis(20),
        retry_delay_max: Duration::from_millis(200),
        ..FollowConfig::default()
    }
}

async fn put_tag(library: &Library, name: &str) -> Seq {
    ops::put(library, "tag", &format!(r#"{{"name":"{name}"}}"#))
        .await
        .expect("put");
    library.latest_seq().await.expect("latest")
}

/// A client with a fresh device key (a device that never joined).
fn stranger() -> Client {
    Client::new(
        sync_core::DeviceKey::generate().expect("key"),
        ClientConfig::default(),
    )
}

async fn pin_of(leader: &Leader) -> sync_core::KeyFingerprint {
    leader
        .library
        .device_key()
        .await
        .expect("key")
        .fingerprint()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_joins_and_applies_live_writes_including_another_process_s() {
    let dir = tempfile::tempdir().expect("dir");
    let leader = leader(dir.path(), ServerConfig::default()).await;
    put_tag(&leader.library, "before join").await;
    let follower = joined_follower(&leader, dir.path(), "f.db").await;
    assert_eq!(follower.access().await.expect("access"), Access::Write);
    let transport = net::transport(&follower, None).await.expect("transport");
    let follow = follower
        .follower()
        .expect("a follower")
        .start_following(transport, live_config());

    // A write through this handle: announced at commit.
    let latest = put_tag(&leader.library, "live").await;
    follow
        .wait_for(DEADLINE, |s| s.position >= latest)
        .await
        .expect("live write applied");

    // A write through another handle on the same file (as another process would make):
    // the server's commit watcher notices it, not this handle's own commit.
    let other = Library::open_default(connect(&leader.url).await.expect("connect"), registry())
        .await
        .expect("open");
    let latest = put_tag(&other, "from another process").await;
    follow
        .wait_for(DEADLINE, |s| s.position >= latest)
        .await
        .expect("another process's write applied");
    assert_eq!(
        leader.library.dump().await.expect("dump"),
        follower.dump().await.expect("dump")
    );
    // The leader knows where its follower stands.
    let members = leader.library.members().await.expect("members");
    let member = members
        .iter()
        .find(|m| m.device_id == follower.device_id())
        .expect("follower is a member");
    assert_eq!(member.access, Access::Write);
    assert_eq!(member.name.as_deref(), Some("f.db"));
    assert!(member.position.is_some());
    follow.stop().await;
    leader.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_is_not_a_member_is_told_so() {
    let dir = tempfile::tempdir().expect("dir");
    let leader = leader(dir.path(), ServerConfig::default()).await;
    let (latest, _news) = tokio::sync::watch::channel(Seq::ZERO);
    let address = leader.server.local_addr().to_string();
    let err = stranger()
        .connect(&address, pin_of(&leader).await, leader.library.id(), latest)
        .await
        .expect_err("a stranger is refused");
    match err {
        TransportError::Refused { code, message } => {
            assert_eq!(code, Refusal::NotMember);
            assert!(message.contains("is not a member of library"), "{message}");
            assert!(message.contains("invite"), "{message}");
        }
        other => panic!("expected a refusal, got {other}"),
    }
    // An unknown library is refused too, with its own reason.
    let (latest, _news) = tokio::sync::watch::channel(Seq::ZERO);
    let err = stranger()
        .connect(
            &address,
            pin_of(&leader).await,
            sync_core::LibraryId::new_random(),
            latest,
        )
        .await
        .expect_err("unknown library");
    assert!(
        matches!(
            &err,
            TransportError::Refused {
                code: Refusal::UnknownLibrary,
                ..
            }
        ),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_device_is_cut_off_on_its_live_connection() {
    let dir = tempfile::tempdir().expect("dir");
    let config = ServerConfig {
        membership_recheck: Duration::from_millis(100),
        ..ServerConfig::default()
    };
    let leader = leader(dir.path(), config).await;
    let follower = joined_follower(&leader, dir.path(), "f.db").await;
    let transport = net::transport(&follower, None).await.expect("transport");
    let session = transport.session().await.expect("session");
    let follow = follower
        .follower()
        .expect("a follower")
        .start_following(Arc::clone(&transport) as _, live_config());
    let latest = put_tag(&leader.library, "before revoke").await;
    follow
        .wait_for(DEADLINE, |s| s.position >= latest)
        .await
        .expect("synced before the revocation");

    // Revoked through another handle (as the CLI's `revoke` beside `serve` would): the
    // session's periodic recheck finds it.
    let other = Library::open_default(connect(&leader.url).await.expect("connect"), registry())
        .await
        .expect("open");
    other
        .leader()
        .expect("the leader")
        .revoke(follower.device_id())
        .await
        .expect("revoke");
    // The leader closes the revoked device's session at its next membership recheck (a
    // session admitted before the revocation may be served until then, by design).
    tokio::time::timeout(DEADLINE, async {
        while !session.is_closed() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the session is closed");
    // From then on nothing reaches the revoked device.
    put_tag(&leader.library, "after revoke").await;
    let status = follow
        .wait_for(DEADLINE, |s| {
            matches!(s.state, sync_core::FollowState::Revoked { .. })
        })
        .await
        .expect("the follower learns it was revoked");
    assert!(
        status
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("revoked")),
        "{status:?}"
    );
    assert!(!status.state.retries(), "retrying cannot fix a revocation");
    assert!(status.position < leader.library.latest_seq().await.expect("latest"));
    // A new connection is refused too.
    let err = transport.session().await.expect_err("refused");
    assert!(
        matches!(
            &err,
            TransportError::Refused {
                code: Refusal::Revoked,
                ..
            }
        ),
        "{err}"
    );
    follow.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_refused_when_used_twice_altered_or_expired() {
    let dir = tempfile::tempdir().expect("dir");
    let leader = leader(dir.path(), ServerConfig::default()).await;
    let text = token(&leader, Access::Read).await;
    net::join(&sqlite_url(dir.path(), "a.db"), &text, None)
        .await
        .expect("first use");
    let err = net::join(&sqlite_url(dir.path(), "b.db"), &text, None)
        .await
        .expect_err("second use");
    assert!(format!("{err:#}").contains("already used"), "{err:#}");

    // Altered: the role edited and the check recomputed, so only the leader can tell.
    let mut forged = JoinToken::decode(&token(&leader, Access::Read).await).expect("decode");
    forged.access = Access::Write;
    let err = net::join(&sqlite_url(dir.path(), "c.db"), &forged.encode(), None)
        .await
        .expect_err("altered");
    assert!(format!("{err:#}").contains("altered"), "{err:#}");

    // Expired at the leader, whatever the token claims.
    let invite = leader
        .library
        .leader()
        .expect("the leader")
        .invite(Access::Read, Duration::ZERO)
        .await
        .expect("invite");
    let key = leader.library.device_key().await.expect("key");
    let mut stale = JoinToken::new(
        &invite,
        &leader.server.local_addr().to_string(),
        key.fingerprint(),
    );
    stale.expires_at_ms += 3_600_000;
    let err = net::join(&sqlite_url(dir.path(), "d.db"), &stale.encode(), None)
        .await
        .expect_err("expired");
    assert!(format!("{err:#}").contains("expired"), "{err:#}");
    // A token that says it expired is refused before dialing.
    let expired = JoinToken::new(&invite, "127.0.0.1:9", key.fingerprint()).encode();
    let err = net::join(&sqlite_url(dir.path(), "e.db"), &expired, None)
        .await
        .expect_err("expired token");
    assert!(format!("{err:#}").contains("expired"), "{err:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_with_another_key_is_refused_by_the_pin() {
    let dir = tempfile::tempdir().expect("dir");
    let leader = leader(dir.path(), ServerConfig::default()).await;
    let mut token = JoinToken::decode(&token(&leader, Access::Read).await).expect("decode");
    let impostor = sync_core::DeviceKey::generate().expect("key").fingerprint();
    token.leader_key = impostor.to_string();
    let err = net::join(&sqlite_url(dir.path(), "f.db"), &token.encode(), None)
        .await
        .expect_err("pinned key mismatch");
    let text = format!("{err:#}");
    assert!(text.contains("is not this library's leader"), "{text}");
    assert!(text.contains(&impostor.to_string()), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_and_other_versions_cost_only_their_connection() {
    let dir = tempfile::tempdir().expect("dir");
    let config = ServerConfig {
        handshake_timeout: Duration::from_millis(300),
        ..ServerConfig::default()
    };
    let leader = leader(dir.path(), config).await;
    let follower = joined_follower(&leader, dir.path(), "f.db").await;
    let address = leader.server.local_addr().to_string();
    let pin = pin_of(&leader).await;
    let client = stranger();

    // Another protocol version: refused with both versions named.
    let hello = frame::encode(&Request::Hello {
        protocol_version: PROTOCOL_VERSION + 1,
        library_id: leader.library.id(),
    })
    .expect("encode");
    let answer = client.send_raw(&address, pin, &hello).await;
    let Ok(Response::Refused { code, message, .. }) = answer else {
        panic!("expected a refusal, got {answer:?}");
    };
    assert_eq!(code, Refusal::VersionMismatch);
    assert!(
        message.contains(&format!("{}", PROTOCOL_VERSION + 1)),
        "{message}"
    );

    // A future message shape that still states its version.
    let future = frame::encode(&serde_json::json!({"type": "hello2", "protocol_version": 7}))
        .expect("encode");
    let answer = client.send_raw(&address, pin, &future).await;
    assert!(
        matches!(
            &answer,
            Ok(Response::Refused {
                code: Refusal::VersionMismatch,
                ..
            })
        ),
        "{answer:?}"
    );

    // Garbage, an unknown frame format, an oversized frame.
    for bytes in [
        b"GET / HTTP/1.1\r\n\r\n".to_vec(),
        vec![frame::FRAME_VERSION, 0, 0, 0, 0, 3, b'{', b'{', b'{'],
        vec![frame::FRAME_VERSION, 0, 0xff, 0xff, 0xff, 0xff],
    ] {
        let answer = client.send_raw(&address, pin, &bytes).await;
        assert!(
            matches!(
                &answer,
                Ok(Response::Refused {
                    code: Refusal::BadRequest,
                    ..
                })
            ),
            "{answer:?}"
        );
    }

    // Garbage datagrams at the port.
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
    for n in 0..100u8 {
        let junk: Vec<u8> = (0..(n as usize * 13 % 1200)).map(|i| i as u8 ^ n).collect();
        let _ = socket.send_to(&junk, leader.server.local_addr());
    }

    // A peer that connects and then says nothing is closed at the handshake deadline.
    let (_endpoint, stalled) = client.dial_raw(&address, pin).await.expect("dial");
    tokio::time::timeout(DEADLINE, stalled.closed())
        .await
        .expect("the stalled connection is closed");

    // Through all of that, the leader kept serving its member.
    let transport = net::transport(&follower, None).await.expect("transport");
    let latest = put_tag(&leader.library, "still serving").await;
    let position = net::sync_once(&follower, &transport, |_, _| {})
        .await
        .expect("sync");
    assert_eq!(position.seq, latest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_follower_survives_a_leader_restart() {
    let dir = tempfile::tempdir().expect("dir");
    let leader = leader(dir.path(), ServerConfig::default()).await;
    let follower = joined_follower(&leader, dir.path(), "f.db").await;
    let transport = net::transport(&follower, None).await.expect("transport");
    let follow = follower
        .follower()
        .expect("a follower")
        .start_following(transport, live_config());
    let latest = put_tag(&leader.library, "first").await;
    follow
        .wait_for(DEADLINE, |s| s.position >= latest)
        .await
        .expect("synced");

    let Leader {
        library, server, ..
    } = leader;
    let address = server.local_addr();
    server.shutdown().await;
    let latest = put_tag(&library, "while the leader is away").await;
    let key = library.device_key().await.expect("key");
    // The old endpoint's socket is released when its last connection task has ended,
    // which on a loaded machine may be a moment after `shutdown` returns: bind again until
    // the address is free.
    let rebind_deadline = tokio::time::Instant::now() + DEADLINE;
    let server = loop {
        match Server::bind(
            address,
            &key,
            vec![library.clone()],
            ServerConfig::default(),
        )
        .await
        {
            Ok(server) => break server,
            Err(_) if tokio::time::Instant::now() < rebind_deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("rebind the same address: {e}"),
        }
    };
    if follow
        .wait_for(DEADLINE, |s| s.position >= latest && s.last_error.is_none())
        .await
        .is_none()
    {
        panic!(
            "the follower did not reconnect and catch up: {:?}",
            follow.status()
        );
    }
    let latest = put_tag(&library, "after the restart").await;
    follow
        .wait_for(DEADLINE, |s| s.position >= latest)
        .await
        .expect("live again");
    assert_eq!(
        library.dump().await.expect("dump"),
        follower.dump().await.expect("dump")
    );
    follow.stop().await;
    server.shutdown().await;
}

/// A PostgreSQL leader: a write committed through another connection pool (as another
/// app process would make it) reaches a live follower through LISTEN/NOTIFY, sent in
/// the sequencer's transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_leader_announces_other_processes_commits() {
    let test = "a_postgres_leader_announces_other_processes_commits";
    let Some(fixture) = crate::support::fixture(crate::support::Backend::Postgres, test).await
    else {
        return;
    };
    let dir = tempfile::tempdir().expect("dir");
    let library = fixture.library.clone();
    let key = library.device_key().await.expect("key");
    let server = Server::bind(
        "127.0.0.1:0".parse().expect("addr"),
        &key,
        vec![library.clone()],
        ServerConfig::default(),
    )
    .await
    .expect("bind");
    let token = net::invite(
        &library,
        Access::Read,
        Duration::from_secs(600),
        Some(server.local_addr().to_string()),
    )
    .await
    .expect("invite");
    let follower = net::join(&sqlite_url(dir.path(), "f.db"), &token, None)
        .await
        .expect("join");
    let transport = net::transport(&follower, None).await.expect("transport");
    let follow = follower
        .follower()
        .expect("a follower")
        .start_following(transport, live_config());

    let other = Library::open_default(connect(&fixture.url).await.expect("connect"), registry())
        .await
        .expect("open");
    for i in 0..5 {
        let latest = put_tag(&other, &format!("from another pool {i}")).await;
        follow
            .wait_for(DEADLINE, |s| s.position >= latest)
            .await
            .expect("the other pool's write is announced and applied");
    }
    assert_eq!(
        library.dump().await.expect("dump"),
        follower.dump().await.expect("dump")
    );
    follow.stop().await;
    server.shutdown().await;
    let _ = other.db().clone().close().await;
    fixture.finish().await;
}

/// A follower with write access's offline writes reach the leader over QUIC as soon as its live
/// loop runs; a follower with read access's push is refused with the reason, and a device cannot
/// push for another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_follower_pushes_live_and_others_are_refused() {
    use sync_core::{PushError, PushRequest, Transport};
    let dir = tempfile::tempdir().expect("dir");
    let leader = leader(dir.path(), ServerConfig::default()).await;
    let writer = joined_follower(&leader, dir.path(), "writer.db").await;
    // Offline first: the write waits in the outbox.
    put_tag(&writer, "written offline").await;
    assert_eq!(writer.outbox_len().await.expect("outbox"), 1);
    // The log already holds what the join recorded (the membership); count from there.
    let base = leader.library.latest_seq().await.expect("latest").0;
    let transport = net::transport(&writer, None).await.expect("transport");
    let follow = writer
        .follower()
        .expect("a follower")
        .start_following(transport.clone(), live_config());
    let mut latest = leader.library.watch_latest_seq();
    tokio::time::timeout(DEADLINE, async {
        while latest.get() < Seq(base + 1) {
            latest.changed().await;
        }
    })
    .await
    .expect("the offline write reaches the leader");
    // A write while following is pushed at once (the loop wakes on the outbox).
    put_tag(&writer, "written live").await;
    tokio::time::timeout(DEADLINE, async {
        while latest.get() < Seq(base + 2) {
            latest.changed().await;
        }
    })
    .await
    .expect("the live write reaches the leader");
    follow
        .wait_for(DEADLINE, |s| s.position >= Seq(base + 2) && s.outbox == 0)
        .await
        .expect("the writer catches up with its own writes");
    follow.stop().await;
    assert_eq!(
        leader.library.dump().await.expect("dump"),
        writer.dump().await.expect("dump")
    );

    // A member with read access may pull but not push.
    let token = token(&leader, Access::Read).await;
    let reader = net::join(&sqlite_url(dir.path(), "reader.db"), &token, Some("reader"))
        .await
        .expect("join");
    let reader_transport = net::transport(&reader, None).await.expect("transport");
    let push = |device| PushRequest {
        protocol_version: PROTOCOL_VERSION,
        library_id: leader.library.id(),
        device_id: device,
        epoch: sync_core::Epoch::UNSTATED,
        changes: Vec::new(),
    };
    let refused = reader_transport.push(push(reader.device_id())).await;
    match refused {
        Err(PushError::Refused {
            kind: sync_core::Refused::ReadOnly,
            message,
        }) => {
            assert!(message.contains("read access only"), "{message}")
        }
        other => panic!("expected a typed refusal, got {other:?}"),
    }
    // Nor can it push in the writer's name: the session is bound to its own key.
    let refused = reader_transport.push(push(writer.device_id())).await;
    match refused {
        Err(PushError::Transport(message)) => {
            assert!(message.contains("cannot push for"), "{message}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// A planned handoff over QUIC: the target's server (bound while it followed) serves once
/// it leads, the other follower finds it by itself through the move record (its key from
/// the membership, its address from the record), and the old leader follows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followers_find_the_new_leader_after_a_handoff() {
    let dir = tempfile::tempdir().expect("dir");
    let old = leader(dir.path(), ServerConfig::default()).await;
    put_tag(&old.library, "before").await;
    let target = joined_follower(&old, dir.path(), "target.db").await;
    let other = joined_follower(&old, dir.path(), "other.db").await;
    // The target serves from now on; it serves nothing until it leads.
    let target_server = Server::bind(
        "127.0.0.1:0".parse().expect("addr"),
        &target.device_key().await.expect("key"),
        vec![target.clone()],
        ServerConfig::default(),
    )
    .await
    .expect("bind a follower's server");
    let target_address = target_server.local_addr().to_string();
    target.set_serving_addresses(vec![target_address.clone()]);
    let mut follows = Vec::new();
    for device in [&target, &other] {
        let transport = net::transport(device, None).await.expect("transport");
        follows.push(
            device
                .follower()
                .expect("a follower")
                .start_following(transport, live_config()),
        );
    }
    let latest = old.library.latest_seq().await.expect("latest");
    for follow in &follows {
        follow
            .wait_for(DEADLINE, |s| s.position >= latest)
            .await
            .expect("caught up before the handoff");
    }
    // Asked before it leads (it holds the membership now), it names the leader.
    let early = Client::new(
        other.device_key().await.expect("key"),
        ClientConfig::default(),
    )
    .connect(
        &target_address,
        target.device_key().await.expect("key").fingerprint(),
        other.id(),
        tokio::sync::watch::channel(Seq::ZERO).0,
    )
    .await
    .expect("a session with a follower's server")
    .pull(&sync_core::PullRequest::from_position(
        other.id(),
        Default::default(),
    ))
    .await;
    assert!(
        matches!(&early, Err(TransportError::Moved { leader, .. }) if *leader == old.library.device_id()),
        "{early:?}"
    );

    let handed = old
        .library
        .leader()
        .expect("the leader")
        .hand_off(target.device_id(), DEADLINE)
        .await
        .expect("hand off");
    assert_eq!(handed.epoch, sync_core::Epoch(2));
    follows[0]
        .wait_for(DEADLINE, |s| s.state == sync_core::FollowState::Leading)
        .await
        .expect("the target leads");
    assert_eq!(target.role(), sync_core::Role::Leader);

    // A write at the new leader reaches the other follower, which re-pointed by itself.
    let latest = put_tag(&target, "at the new leader").await;
    follows[1]
        .wait_for(DEADLINE, |s| s.position >= latest)
        .await
        .expect("the other follower follows the new leader");
    assert_eq!(other.leader_device_id(), target.device_id());
    // The old leader follows it too (its key and address from the membership), and its
    // write made after the move reaches the new leader.
    put_tag(&old.library, "written by the old leader").await;
    let transport = net::transport(&old.library, None)
        .await
        .expect("the old leader's transport to the new one");
    assert_eq!(transport.addresses_known(), vec![target_address.clone()]);
    let old_follow = old
        .library
        .follower()
        .expect("the old leader follows")
        .start_following(transport, live_config());
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let names = target.dump().await.expect("dump").to_string();
        if names.contains("written by the old leader") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the old leader's write did not reach the new leader"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let latest = target.latest_seq().await.expect("latest");
    for follow in follows.iter().skip(1).chain([&old_follow]) {
        follow
            .wait_for(DEADLINE, |s| s.position >= latest)
            .await
            .expect("every follower converges");
    }
    assert_eq!(
        other.dump().await.expect("dump"),
        target.dump().await.expect("dump")
    );
    assert_eq!(
        old.library.dump().await.expect("dump"),
        target.dump().await.expect("dump")
    );
    drop(old.server);
    drop(target_server);
}
