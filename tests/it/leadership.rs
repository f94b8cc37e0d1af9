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
