//! Role views: leader-only and follower-only operations are reached through
//! `Library::leader` / `Library::follower`, and a call for the wrong role gets one answer.

use sync_core::{InProcess, Role, WrongRole};

use crate::offline::three;
use crate::support::Backend;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_for_the_wrong_role_gets_one_answer() {
    let Some(t) = three(Backend::Sqlite, "roles::wrong_role").await else {
        return;
    };
    let leader = &t.leader.library;
    let follower_error = leader.follower().expect_err("the leader is no follower");
    assert_eq!(
        follower_error,
        WrongRole {
            library: leader.id(),
            wanted: Role::Follower
        }
    );
    assert!(
        follower_error.to_string().contains("`Library::follower`"),
        "{follower_error}"
    );
    let leader_error = t.a.leader().expect_err("a follower is no leader");
    assert_eq!(
        leader_error,
        WrongRole {
            library: t.a.id(),
            wanted: Role::Leader
        }
    );
    assert!(
        leader_error.to_string().contains("`Library::leader`"),
        "{leader_error}"
    );
    // The right views work: the follower catches up through the leader's view.
    let view = t.a.follower().expect("a follower");
    let at = view
        .sync_round(
            &InProcess::new(leader.leader().expect("the leader")),
            100,
            |_, _| {},
        )
        .await
        .expect("a round");
    assert_eq!(at.0.seq, leader.latest_seq().await.expect("latest"));
    t.leader.finish().await;
}
