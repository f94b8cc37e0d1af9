//! Leadership that moves (issue 13): epochs and fencing, replicated membership, the move
//! record.

use sea_orm::ConnectionTrait;
use serde_json::json;
use sync_core::{
    Access, Epoch, FollowState, InProcess, Library, PullError, PullRequest, PullResponse,
    PushError, PushRequest, PushResponse, RefusedFor, SyncError, Transport,
};

use crate::offline::{member, put, sync};
use crate::support::{Backend, Fixture, fixture};

/// What every member must know of every member, the same on each device.
fn membership(members: &[sync_core::Member]) -> Vec<serde_json::Value> {
    let mut out: Vec<_> = members
        .iter()
        .map(|m| {
            json!({
                "device": m.device_id.to_string(),
                "access": m.access.as_str(),
                "revoked": m.revoked_at_ms.is_some(),
                "key": m.key.map(|k| k.to_string()),
            })
        })
        .collect();
    out.sort_by_key(|v| v["device"].as_str().map(str::to_owned));
    out
}

async fn membership_replicates_to_every_member(f: Fixture) -> Fixture {
    let leader = &f.library;
    let dir = tempfile::tempdir().expect("temp dir");
    let writer = member(leader, dir.path(), "writer", Access::Write).await;
    let reader = member(leader, dir.path(), "reader", Access::Read).await;
    let gone = member(leader, dir.path(), "gone", Access::Write).await;
    leader
        .leader()
        .expect("the leader")
        .revoke(gone.device_id())
        .await
        .expect("revoke");
    for device in [&writer, &reader] {
        sync(device, leader).await;
    }
    let on_leader = membership(&leader.members().await.expect("members"));
    assert_eq!(on_leader.len(), 4);
    assert!(
        on_leader.iter().all(|m| m["key"].is_string()),
        "the leader knows every member's key: {on_leader:?}"
    );
    let leader_key = leader.device_key().await.expect("key").fingerprint();
    assert!(
        on_leader
            .iter()
            .any(|m| m["key"] == json!(leader_key.to_string()) && m["access"] == "leader")
    );
    for device in [&writer, &reader] {
        assert_eq!(
            membership(&device.members().await.expect("members")),
            on_leader,
            "a follower holds the whole membership, revocations included"
        );
        // Reserved entries are not app data: nothing of them in the follower's dump.
        assert_eq!(
            device.dump().await.expect("dump"),
            leader.dump().await.expect("dump")
        );
    }
    // Selective sync still delivers them: a fresh member asking for one model only.
    let picky = member(leader, dir.path(), "picky", Access::Read).await;
    let transport = InProcess::new(leader.leader().expect("the leader"));
    let mut request = PullRequest::from_position(leader.id(), Default::default());
    request.models = Some(vec!["volume".into()]);
    let response = transport.pull(request).await.expect("pull");
    picky
        .follower()
        .expect("a follower")
        .apply(sync_core::Seq::ZERO, response)
        .await
        .expect("apply");
    assert_eq!(
        membership(&picky.members().await.expect("members")),
        membership(&leader.members().await.expect("members")),
    );
    f
}

/// A transport that states no epoch in its requests (an old leader's view of a follower
/// that knows a newer one): the follower's own check must refuse the answer.
struct Unstated(InProcess);

#[async_trait::async_trait]
impl Transport for Unstated {
    async fn pull(&self, mut request: PullRequest) -> Result<PullResponse, PullError> {
        request.epoch = Epoch::UNSTATED;
        self.0.pull(request).await
    }

    async fn push(&self, mut request: PushRequest) -> Result<PushResponse, PushError> {
        request.epoch = Epoch::UNSTATED;
        self.0.push(request).await
    }
}

/// Makes `device` believe the library is in `epoch` (as if it had applied a move record).
async fn believe_epoch(device: &Library, epoch: u64) {
    device
        .db()
        .execute_unprepared(&format!("UPDATE sync_library SET epoch = {epoch}"))
        .await
        .expect("set epoch");
    assert_eq!(
        device.refresh_leadership().await.expect("refresh").epoch,
        Epoch(epoch)
    );
}

async fn a_follower_refuses_a_stale_epoch_leader(f: Fixture) -> Fixture {
    let leader = &f.library;
    let dir = tempfile::tempdir().expect("temp dir");
    let follower = member(leader, dir.path(), "f", Access::Write).await;
    sync(&follower, leader).await;
    assert_eq!(follower.epoch(), Epoch::FIRST);
    put(leader, "volume", json!({"name": "after the move"})).await;
    put(&follower, "volume", json!({"name": "for the new leader"})).await;
    let before = follower.position().await.expect("position");
    believe_epoch(&follower, 2).await;

    let stale = Unstated(InProcess::new(leader.leader().expect("the leader")));
    let view = follower.follower().expect("a follower");
    let pulled = view.catch_up(&stale, 1_000).await;
    match &pulled {
        Err(SyncError::Pull(PullError::StaleEpoch { known, answered })) => {
            assert_eq!((*known, *answered), (Epoch(2), Epoch(1)));
        }
        other => panic!("expected a stale-epoch refusal, got {other:?}"),
    }
    let state = FollowState::of(pulled.as_ref().expect_err("an error"));
    assert!(
        matches!(
            state,
            FollowState::Refused {
                why: RefusedFor::StaleEpoch,
                ..
            }
        ),
        "{state:?}"
    );
    assert_eq!(follower.position().await.expect("position"), before);
    // An acknowledgement from the old epoch is not taken either: the change stays in the
    // outbox for the current leader.
    let pushed = view.push_outbox(&stale).await;
    assert!(
        matches!(pushed, Err(SyncError::Push(PushError::StaleEpoch { .. }))),
        "{pushed:?}"
    );
    assert_eq!(follower.outbox_len().await.expect("outbox"), 1);
    f
}

async fn a_leader_asked_from_a_newer_epoch_stops_serving_and_sequencing(f: Fixture) -> Fixture {
    let leader = &f.library;
    let dir = tempfile::tempdir().expect("temp dir");
    let moved_on = member(leader, dir.path(), "moved-on", Access::Write).await;
    let other = member(leader, dir.path(), "other", Access::Write).await;
    sync(&moved_on, leader).await;
    sync(&other, leader).await;
    believe_epoch(&moved_on, 3).await;
    let latest = leader.latest_seq().await.expect("latest");

    let transport = InProcess::new(leader.leader().expect("the leader"));
    let refused = moved_on
        .follower()
        .expect("a follower")
        .catch_up(&transport, 1_000)
        .await;
    assert!(
        matches!(
            refused,
            Err(SyncError::Pull(PullError::Superseded { epoch: Epoch(3) }))
        ),
        "{refused:?}"
    );
    assert_eq!(leader.superseded_by(), Some(Epoch(3)));
    // It serves no one now, not even a follower of its own epoch, and takes no push.
    let refused = other
        .follower()
        .expect("a follower")
        .catch_up(&transport, 1_000)
        .await;
    assert!(
        matches!(
            refused,
            Err(SyncError::Pull(PullError::Superseded { epoch: Epoch(3) }))
        ),
        "{refused:?}"
    );
    put(&other, "volume", json!({"name": "pushed too late"})).await;
    let refused = other
        .follower()
        .expect("a follower")
        .push_outbox(&transport)
        .await;
    assert!(
        matches!(
            refused,
            Err(SyncError::Push(PushError::Superseded { epoch: Epoch(3) }))
        ),
        "{refused:?}"
    );
    assert_eq!(other.outbox_len().await.expect("outbox"), 1);
    // Its own new writes are not sequenced: they wait in its outbox.
    put(
        leader,
        "volume",
        json!({"name": "written after being replaced"}),
    )
    .await;
    assert_eq!(leader.latest_seq().await.expect("latest"), latest);
    assert_eq!(leader.outbox_len().await.expect("outbox"), 1);
    // Also after a restart.
    let again = Library::open(leader.db().clone(), leader.id(), example_app::registry())
        .await
        .expect("open");
    assert_eq!(again.superseded_by(), Some(Epoch(3)));
    let refused = again
        .leader()
        .expect("the leader")
        .serve_pull(&PullRequest::from_position(leader.id(), Default::default()))
        .await;
    assert!(
        matches!(refused, Err(PullError::Superseded { epoch: Epoch(3) })),
        "{refused:?}"
    );
    drop(again);
    f
}

crate::on_every_backend!(
    membership_replicates_to_every_member,
    a_follower_refuses_a_stale_epoch_leader,
    a_leader_asked_from_a_newer_epoch_stops_serving_and_sequencing,
    a_handoff_under_write_load_loses_nothing_and_takes_nothing_twice,
    a_handoff_passes_on_invites_positions_and_rejected_changes,
);

#[tokio::test]
async fn a_fixture_is_a_library_in_its_first_epoch() {
    let Some(f) = fixture(Backend::Sqlite, "first_epoch").await else {
        return;
    };
    let leadership = f.library.leadership();
    assert_eq!(leadership.epoch, Epoch::FIRST);
    assert_eq!(leadership.leader, f.library.device_id());
    assert_eq!(leadership.superseded_by, None);
    f.finish().await;
}

/// One sync round of `device` with whichever of `devices` it knows as the leader (through
/// the view a server would have kept of it, when there is one: a leader that handed off
/// still serves its log up to the move record).
async fn round(
    device: &Library,
    devices: &[Library],
    kept: &[sync_core::LeaderView],
) -> Result<(), String> {
    let leader_id = device.leader_device_id();
    let view = match kept.iter().find(|v| v.device_id() == leader_id) {
        Some(view) => view.clone(),
        None => devices
            .iter()
            .find(|d| d.device_id() == leader_id)
            .ok_or("the leader is not one of the devices")?
            .leader()
            .map_err(|e| e.to_string())?,
    };
    let transport = InProcess::new(view);
    device
        .follower()
        .map_err(|e| e.to_string())?
        .sync_round(&transport, 1_000, |_, _| {})
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// The names of the `tag` records in `device`'s dump.
async fn tag_names(device: &Library) -> Vec<String> {
    let dump = device.dump().await.expect("dump");
    let mut names: Vec<String> = dump["tag"]
        .as_array()
        .expect("tags")
        .iter()
        .filter_map(|t| t["name"].as_str().map(str::to_owned))
        .collect();
    names.sort();
    names
}

async fn a_handoff_under_write_load_loses_nothing_and_takes_nothing_twice(f: Fixture) -> Fixture {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    let old = f.library.clone();
    let dir = tempfile::tempdir().expect("temp dir");
    let target = member(&old, dir.path(), "target", Access::Write).await;
    let other = member(&old, dir.path(), "other", Access::Write).await;
    let reader = member(&old, dir.path(), "reader", Access::Read).await;
    let devices = vec![old.clone(), target.clone(), other.clone(), reader.clone()];
    for device in &devices[1..] {
        sync(device, &old).await;
    }
    // A push the old leader acknowledges, to be repeated to the new one.
    put(&other, "tag", json!({"name": "acknowledged once"})).await;
    let change = {
        let transport = InProcess::new(old.leader().expect("the leader"));
        other
            .follower()
            .expect("a follower")
            .push_outbox(&transport)
            .await
            .expect("push");
        old.read_log(sync_core::Seq::ZERO, 1_000_000)
            .await
            .expect("log")
            .into_iter()
            .rev()
            .find(|e| e.model == "tag")
            .expect("the pushed tag")
    };
    let change_id = other_change_id(&old, &change).await;
    // Kept from before the move, as a server keeps its view of the libraries it serves.
    let old_view = old.leader().expect("the leader");

    // Writes on the leader and both write followers, and every follower syncing, all along.
    let writing = Arc::new(AtomicBool::new(true));
    let writes = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let syncing = Arc::new(AtomicBool::new(true));
    let mut writers = tokio::task::JoinSet::new();
    for (who, device) in [("old", &old), ("target", &target), ("other", &other)] {
        let device = device.clone();
        let writing = Arc::clone(&writing);
        let writes = Arc::clone(&writes);
        writers.spawn(async move {
            let mut n = 0;
            while writing.load(Ordering::SeqCst) && n < 400 {
                put(&device, "tag", json!({ "name": format!("{who}-{n}") })).await;
                n += 1;
                writes.fetch_add(1, Ordering::SeqCst);
                tokio::task::yield_now().await;
            }
            (0..n).map(|i| format!("{who}-{i}")).collect::<Vec<_>>()
        });
    }
    let mut syncers = tokio::task::JoinSet::new();
    for device in [&target, &other, &reader] {
        let device = device.clone();
        let devices = devices.clone();
        let kept = vec![old_view.clone()];
        let syncing = Arc::clone(&syncing);
        syncers.spawn(async move {
            while syncing.load(Ordering::SeqCst) {
                // Refusals during the move (moving, moved) are retried.
                let _ = round(&device, &devices, &kept).await;
                tokio::task::yield_now().await;
            }
        });
    }
    // Under load: writes before the handoff starts, during it, and after it.
    let under_load = |at_least: usize| {
        let writes = Arc::clone(&writes);
        async move {
            while writes.load(Ordering::SeqCst) < at_least {
                tokio::task::yield_now().await;
            }
        }
    };
    under_load(30).await;
    let handed = old
        .leader()
        .expect("the leader")
        .hand_off(target.device_id(), std::time::Duration::from_secs(120))
        .await
        .expect("hand off");
    assert_eq!(handed.to, target.device_id());
    assert_eq!(handed.epoch, Epoch(2));
    assert!(handed.taken_marks >= 1);
    under_load(writes.load(Ordering::SeqCst) + 30).await;
    writing.store(false, Ordering::SeqCst);
    let mut written = Vec::new();
    while let Some(names) = writers.join_next().await {
        written.extend(names.expect("writer"));
    }
    syncing.store(false, Ordering::SeqCst);
    while let Some(done) = syncers.join_next().await {
        done.expect("syncer");
    }

    // Everyone follows the new leader now; sync until at rest.
    let mut rounds = 0;
    loop {
        for device in [&old, &other, &reader] {
            let _ = round(device, &devices, &[]).await;
        }
        let latest = target.latest_seq().await.expect("latest");
        let mut at_rest = true;
        for device in [&old, &other, &reader] {
            at_rest &= device.position().await.expect("position").seq == latest
                && device.outbox_len().await.expect("outbox") == 0;
        }
        if at_rest {
            break;
        }
        rounds += 1;
        assert!(rounds < 50, "devices did not converge on the new leader");
    }
    assert_eq!(target.role(), sync_core::Role::Leader);
    for device in [&old, &other, &reader] {
        assert_eq!(device.role(), sync_core::Role::Follower);
        assert_eq!(device.leader_device_id(), target.device_id());
        assert_eq!(device.epoch(), Epoch(2));
    }
    assert_eq!(target.epoch(), Epoch(2));
    // Every device holds the log up to where it stands, chained; the new leader all of it.
    assert_eq!(target.held_log_gaps().await.expect("gaps"), vec![]);
    for device in [&target, &old, &other, &reader] {
        device
            .verify_held_log()
            .await
            .expect("the held log verifies");
    }
    // Converged, nothing lost: every write on every device is there, once.
    let names = tag_names(&target).await;
    for (who, device) in [("old", &old), ("other", &other), ("reader", &reader)] {
        let theirs = tag_names(device).await;
        let missing: Vec<_> = names.iter().filter(|n| !theirs.contains(n)).collect();
        let extra: Vec<_> = theirs.iter().filter(|n| !names.contains(n)).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "{who} differs from the new leader: missing {missing:?}, extra {extra:?}"
        );
        assert_eq!(
            device.dump().await.expect("dump"),
            target.dump().await.expect("dump")
        );
    }
    written.push("acknowledged once".into());
    written.sort();
    assert_eq!(names, written, "every write is in the library, once");
    // Nothing applied twice: one entry per record in the new leader's log.
    let log = target
        .read_log(sync_core::Seq::ZERO, 10_000_000)
        .await
        .expect("log");
    sync_core::verify_chain(sync_core::Seq::ZERO, 0, &log).expect("the log chains");
    let mut per_record = std::collections::HashMap::<&str, usize>::new();
    for entry in log.iter().filter(|e| e.model == "tag") {
        *per_record.entry(entry.record_id.as_str()).or_default() += 1;
    }
    assert!(
        per_record.values().all(|n| *n == 1),
        "a write was sequenced twice: {per_record:?}"
    );
    assert_eq!(per_record.len(), written.len());
    // The push the old leader acknowledged, repeated to the new one, is not taken again.
    let repeated = target
        .leader()
        .expect("the new leader")
        .serve_push(&PushRequest {
            protocol_version: sync_core::PROTOCOL_VERSION,
            library_id: target.id(),
            device_id: other.device_id(),
            epoch: Epoch(2),
            changes: vec![sync_core::PushedChange {
                id: 1,
                change_id,
                model: "tag".into(),
                record_id: change.record_id.clone(),
                op: sync_core::ChangeOp::Upsert,
                data: change.data.clone(),
                changed: change.changed.clone(),
                hlc: change.hlc,
                schema_version: change.schema_version,
                base: sync_core::Seq::ZERO,
            }],
        })
        .await
        .expect("push");
    assert_eq!((repeated.taken, repeated.already_taken), (0, 1));
    // The old leader answers pulls past its move record with where the leader went.
    let moved = old_view
        .serve_pull(
            &PullRequest::from_position(old.id(), old.position().await.expect("position"))
                .with_epoch(Epoch(2)),
        )
        .await;
    assert!(
        matches!(&moved, Err(PullError::Moved { leader, epoch: Epoch(2), .. }) if *leader == target.device_id()),
        "{moved:?}"
    );
    f
}

/// The change id under which the old leader took `entry` (its `sync_taken` mark).
async fn other_change_id(old: &Library, entry: &sync_core::LogEntry) -> uuid::Uuid {
    let rows = old
        .db()
        .query_all_raw(sea_orm::Statement::from_string(
            old.db().get_database_backend(),
            format!(
                "SELECT change_id FROM sync_taken WHERE device_id = '{}'",
                entry.device_id
            ),
        ))
        .await
        .expect("taken marks");
    let ids: Vec<String> = rows
        .iter()
        .map(|row| row.try_get::<String>("", "change_id").expect("change id"))
        .collect();
    assert_eq!(ids.len(), 1, "one change of that device was pushed");
    ids[0].parse().expect("a uuid")
}

/// Rounds of `devices` (each with whoever it knows as the leader) until every follower
/// holds the leader's whole log and has nothing waiting in its outbox.
async fn settle(devices: &[Library], kept: &[sync_core::LeaderView]) {
    for _ in 0..100 {
        for device in devices {
            if device.role() == sync_core::Role::Follower {
                let _ = round(device, devices, kept).await;
            } else if device.leadership().taking_over {
                // It applied the record naming it: it takes the log over from the old leader.
                if let Some(old) = kept.iter().find(|v| v.device_id() != device.device_id()) {
                    let from = InProcess::new(old.clone());
                    let _ = device
                        .leader()
                        .expect("the new leader")
                        .take_over(&from)
                        .await;
                }
            }
        }
        let Some(leader) = devices.iter().find(|d| d.role() == sync_core::Role::Leader) else {
            continue;
        };
        let latest = leader.latest_seq().await.expect("latest");
        let mut at_rest = !leader.leadership().taking_over;
        for device in devices
            .iter()
            .filter(|d| d.device_id() != leader.device_id())
        {
            at_rest &= device.position().await.expect("position").seq == latest
                && device.outbox_len().await.expect("outbox") == 0
                && device.leader_device_id() == leader.device_id();
        }
        if at_rest {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("the devices did not settle on one leader");
}

/// Each member's access as `device`'s membership holds it.
async fn access_of(device: &Library) -> std::collections::HashMap<sync_core::DeviceId, Access> {
    device
        .members()
        .await
        .expect("members")
        .into_iter()
        .map(|m| (m.device_id, m.access))
        .collect()
}

async fn a_handoff_passes_on_invites_positions_and_rejected_changes(f: Fixture) -> Fixture {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    let old = f.library.clone();
    let dir = tempfile::tempdir().expect("temp dir");
    let target = member(&old, dir.path(), "target", Access::Write).await;
    let other = member(&old, dir.path(), "other", Access::Write).await;
    let devices = vec![old.clone(), target.clone(), other.clone()];
    for device in &devices[1..] {
        sync(device, &old).await;
    }
    // A change the old leader cannot store: set aside there. (Not on MySQL: its upsert's
    // `ON DUPLICATE KEY UPDATE` answers any unique index, so the same name updates the
    // other row instead of failing.)
    let mysql = old.db().get_database_backend() == sea_orm::DbBackend::MySql;
    let refused = if mysql {
        None
    } else {
        old.db()
            .execute_unprepared("CREATE UNIQUE INDEX tag_name_unique ON tag (name)")
            .await
            .expect("index");
        put(&old, "tag", json!({"name": "taken"})).await;
        let refused = put(&other, "tag", json!({"name": "taken"})).await;
        sync(&other, &old).await;
        assert_eq!(old.rejected().await.expect("rejected").len(), 1);
        Some(refused)
    };
    // An invite made before the move, redeemed after it at the new leader.
    let invite = old
        .leader()
        .expect("the leader")
        .invite(Access::Read, std::time::Duration::from_secs(600))
        .await
        .expect("invite");
    // Positions the old leader saw (its server notes each pull's; in process, by hand).
    sync(&other, &old).await;
    let other_at = other.position().await.expect("position").seq;
    old.leader()
        .expect("the leader")
        .record_peer_position(other.device_id(), other_at)
        .await
        .expect("position noted");

    let old_view = old.leader().expect("the leader");
    let syncing = Arc::new(AtomicBool::new(true));
    let follower = {
        let (target, devices, kept) = (target.clone(), devices.clone(), vec![old_view.clone()]);
        let syncing = Arc::clone(&syncing);
        tokio::spawn(async move {
            while syncing.load(Ordering::SeqCst) {
                let _ = round(&target, &devices, &kept).await;
                tokio::task::yield_now().await;
            }
        })
    };
    let handed = old_view
        .hand_off(target.device_id(), std::time::Duration::from_secs(60))
        .await
        .expect("hand off");
    syncing.store(false, Ordering::SeqCst);
    follower.await.expect("syncer");
    assert_eq!(handed.epoch, Epoch(2));
    settle(&devices, std::slice::from_ref(&old_view)).await;
    assert_eq!(target.role(), sync_core::Role::Leader);

    // Every device's membership says who leads now, and that the old leader writes.
    for device in &devices {
        let access = access_of(device).await;
        assert_eq!(
            access.get(&old.device_id()),
            Some(&Access::Write),
            "on {}",
            device.device_id()
        );
        assert_eq!(
            access.get(&target.device_id()),
            Some(&Access::Leader),
            "on {}",
            device.device_id()
        );
        assert_eq!(access.get(&other.device_id()), Some(&Access::Write));
    }
    // The set-aside change is listed at the new leader.
    if let Some(refused) = refused {
        let listed = target.rejected().await.expect("rejected");
        assert_eq!(listed.len(), 1, "{listed:?}");
        assert_eq!(listed[0].record_id, crate::offline::id_of(&refused));
        assert_eq!(listed[0].device_id, other.device_id().to_string());
    }
    // The followers' positions are known to the new leader before it served them.
    let seen = target
        .members()
        .await
        .expect("members")
        .into_iter()
        .find(|m| m.device_id == other.device_id())
        .and_then(|m| m.position)
        .expect("the other follower's position");
    assert!(seen >= other_at, "{seen:?} < {other_at:?}");
    // The invite admits a device at the new leader, once.
    let url = format!("sqlite://{}?mode=rwc", dir.path().join("late.db").display());
    let db = example_app::connect(&url).await.expect("connect");
    <example_app::Migrator as sea_orm_migration::MigratorTrait>::up(&db, None)
        .await
        .expect("migrate");
    let key = Library::device_key_of(&db).await.expect("device key");
    let new_leader = target.leader().expect("the new leader");
    new_leader
        .redeem_invite(
            &invite.secret,
            Access::Read,
            key.fingerprint(),
            Some("late"),
        )
        .await
        .expect("an invite made before the handoff is redeemed at the new leader");
    let again = new_leader
        .redeem_invite(
            &invite.secret,
            Access::Read,
            key.fingerprint(),
            Some("late"),
        )
        .await;
    assert!(
        matches!(again, Err(sync_core::InviteError::AlreadyUsed)),
        "{again:?}"
    );
    let late = Library::join(
        db,
        target.id(),
        target.device_id(),
        "test",
        Access::Read,
        example_app::registry(),
    )
    .await
    .expect("join");
    sync(&late, &target).await;
    assert_eq!(
        late.dump().await.expect("dump"),
        target.dump().await.expect("dump")
    );
    // The old leader admits no one any more: an invite it made is redeemed where the
    // library is led.
    let key = DeviceKeyOf::fresh(dir.path(), "later").await;
    let stale = old_view
        .redeem_invite(&invite.secret, Access::Read, key, Some("later"))
        .await;
    assert!(
        matches!(stale, Err(sync_core::InviteError::NotLeading { leader, .. }) if leader == target.device_id()),
        "{stale:?}"
    );
    drop(late);
    f
}

/// A device key of a fresh database.
struct DeviceKeyOf;

impl DeviceKeyOf {
    async fn fresh(dir: &std::path::Path, name: &str) -> sync_core::KeyFingerprint {
        let url = format!(
            "sqlite://{}?mode=rwc",
            dir.join(format!("{name}.db")).display()
        );
        let db = example_app::connect(&url).await.expect("connect");
        <example_app::Migrator as sea_orm_migration::MigratorTrait>::up(&db, None)
            .await
            .expect("migrate");
        Library::device_key_of(&db)
            .await
            .expect("device key")
            .fingerprint()
    }
}
