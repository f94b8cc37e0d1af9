//! The follow loop's state as data: offline (retried), refused for a version (not
//! retried), stuck on an entry (retried; parking gets past it). Revoked is in `quic.rs`.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use sea_orm::ConnectionTrait;
use serde_json::json;
use sync_core::{
    FollowConfig, FollowState, InProcess, PullError, PullRequest, PullResponse, PushError,
    PushRequest, PushResponse, RefusedFor, Transport,
};

use crate::offline::{Three, entries_of, id_of, put, three};
use crate::support::Backend;

const DEADLINE: Duration = Duration::from_secs(30);

/// Quick retries: a loop that retries makes many attempts in a fraction of a second.
fn quick() -> FollowConfig {
    FollowConfig {
        poll_interval: Duration::from_secs(3_600),
        retry_delay_min: Duration::from_millis(2),
        retry_delay_max: Duration::from_millis(5),
        ..FollowConfig::default()
    }
}

/// Counts pulls; `fail` decides what the leader seems to answer.
struct Scripted {
    inner: InProcess,
    pulls: AtomicUsize,
    fail: fn(PullResponse) -> Result<PullResponse, PullError>,
}

#[async_trait::async_trait]
impl Transport for Scripted {
    async fn pull(&self, request: PullRequest) -> Result<PullResponse, PullError> {
        self.pulls.fetch_add(1, Ordering::SeqCst);
        (self.fail)(self.inner.pull(request).await?)
    }

    async fn push(&self, request: PushRequest) -> Result<PushResponse, PushError> {
        self.inner.push(request).await
    }
}

/// Waits until `count` passes `above`, or the deadline; whether it did.
async fn passes(count: &AtomicUsize, above: usize, within: Duration) -> bool {
    tokio::time::timeout(within, async {
        while count.load(Ordering::SeqCst) <= above {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await
    .is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_leader_is_offline_and_retried() {
    let Some(t) = three(Backend::Sqlite, "follow_state::offline").await else {
        return;
    };
    let transport = Arc::new(Scripted {
        inner: InProcess::new(t.leader.library.leader().expect("the leader")),
        pulls: AtomicUsize::new(0),
        fail: |_| Err(PullError::Transport("connection refused".into())),
    });
    let follow =
        t.a.follower()
            .expect("a follower")
            .start_following(Arc::clone(&transport) as _, quick());
    let status = follow
        .wait_for(DEADLINE, |s| matches!(s.state, FollowState::Offline { .. }))
        .await
        .expect("offline");
    assert!(status.state.retries());
    let seen = transport.pulls.load(Ordering::SeqCst);
    assert!(
        passes(&transport.pulls, seen + 3, DEADLINE).await,
        "retried"
    );
    follow.stop().await;
    t.leader.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_of_another_protocol_version_is_refused_and_not_retried() {
    let Some(t) = three(Backend::Sqlite, "follow_state::version").await else {
        return;
    };
    put(&t.leader.library, "tag", json!({"name": "x"})).await;
    let transport = Arc::new(Scripted {
        inner: InProcess::new(t.leader.library.leader().expect("the leader")),
        pulls: AtomicUsize::new(0),
        fail: |mut response| {
            response.protocol_version += 1;
            Ok(response)
        },
    });
    let follow =
        t.a.follower()
            .expect("a follower")
            .start_following(Arc::clone(&transport) as _, quick());
    let status = follow
        .wait_for(DEADLINE, |s| matches!(s.state, FollowState::Refused { .. }))
        .await
        .expect("refused");
    assert!(
        matches!(
            status.state,
            FollowState::Refused {
                why: RefusedFor::ProtocolVersion,
                ..
            }
        ),
        "{status:?}"
    );
    assert!(!status.state.retries());
    let seen = transport.pulls.load(Ordering::SeqCst);
    assert!(
        !passes(&transport.pulls, seen + 3, Duration::from_millis(500)).await,
        "a refusal is not retried on its own"
    );
    // Asked to, it tries again.
    follow.sync_now();
    assert!(passes(&transport.pulls, seen, DEADLINE).await);
    follow.stop().await;
    t.leader.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_this_device_cannot_store_is_stuck_until_parked() {
    let Some(Three {
        leader,
        a,
        b: _b,
        dir: _dir,
    }) = three(Backend::Sqlite, "follow_state::stuck").await
    else {
        return;
    };
    let l = &leader.library;
    a.db()
        .execute_unprepared("CREATE UNIQUE INDEX tag_name_unique ON tag (name)")
        .await
        .expect("index");
    put(l, "tag", json!({"name": "same"})).await;
    let second = put(l, "tag", json!({"name": "same"})).await;
    let seq = entries_of(l, &id_of(&second)).await[0].seq;
    let follow = a.follower().expect("a follower").start_following(
        Arc::new(InProcess::new(l.leader().expect("the leader"))),
        quick(),
    );
    let status = follow
        .wait_for(DEADLINE, |s| matches!(s.state, FollowState::Stuck { .. }))
        .await
        .expect("stuck");
    match &status.state {
        FollowState::Stuck {
            seq: at,
            model,
            record_id,
            reason,
        } => {
            assert_eq!((*at, model.as_str()), (seq, "tag"));
            assert_eq!(*record_id, id_of(&second));
            assert!(reason.contains("UNIQUE"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    assert!(status.state.retries());
    a.follower()
        .expect("a follower")
        .park(seq)
        .await
        .expect("park");
    follow.sync_now();
    let status = follow
        .wait_for(DEADLINE, |s| s.state == FollowState::InSync)
        .await
        .expect("goes on once parked");
    assert_eq!(status.parked, 1);
    follow.stop().await;
    leader.finish().await;
}
