//! Failover (issue 13 parts 3, 4): a write member promoted when the leader is lost, the lost
//! range reported, the old leader returning and rewinding its writes after the fork into
//! outbox changes, and two concurrent promotions.

use serde_json::json;
use sync_core::{
    Access, Epoch, InProcess, InProcessMember, Library, PromoteError, PromoteOptions, PullError,
    PullRequest, RewindError, Seq, Transport,
};

use crate::offline::{assert_converged, get, id_of, member, put, sync};
use crate::support::Fixture;

/// One push-then-pull round of `device` with `leader`.
async fn round(device: &Library, leader: &Library) {
    let transport = InProcess::new(leader.leader().expect("the leader"));
    device
        .follower()
        .expect("a follower")
        .sync_round(&transport, 1_000, |_, _| {})
        .await
        .expect("sync round");
}

fn names(dump: &serde_json::Value, model: &str) -> Vec<String> {
    let mut out: Vec<String> = dump[model]
        .as_array()
        .map(|rows| {
            rows.iter()
                .filter_map(|r| r["name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// The lost leader's log end, and the move record `leader` logged at `seq`.
async fn move_record_at(leader: &Library, seq: Seq) -> sync_core::MoveRecord {
    let entries = leader
        .read_log(Seq(seq.0 - 1), 1)
        .await
        .expect("the new leader's log");
    sync_core::MoveRecord::from_entry(&entries[0]).expect("a move record")
}

async fn a_lost_leader_is_replaced_and_returns_with_its_writes(f: Fixture) -> Fixture {
    let old = &f.library;
    let dir = tempfile::tempdir().expect("temp dir");
    let a = member(old, dir.path(), "a", Access::Write).await;
    let b = member(old, dir.path(), "b", Access::Write).await;
    put(old, "tag", json!({"name": "from the leader"})).await;
    put(&a, "tag", json!({"name": "from a"})).await;
    for device in [&a, &b, &a] {
        sync(device, old).await;
    }
    // Acknowledged and pulled by its author: it must survive.
    put(&b, "tag", json!({"name": "b acknowledged"})).await;
    sync(&b, old).await;
    sync(&a, old).await;
    let shared = a.position().await.expect("position");
    assert_eq!(b.position().await.expect("position"), shared);

    // Only the leader holds these: one of its own writes, and a push it acknowledged whose
    // author never pulled it. The author saw the leader announce them.
    put(old, "tag", json!({"name": "only on the old leader"})).await;
    put(&a, "tag", json!({"name": "acknowledged, never pulled"})).await;
    a.follower()
        .expect("a follower")
        .push_outbox(&InProcess::new(old.leader().expect("the leader")))
        .await
        .expect("push");
    // Not pushed before the leader is lost: it must reach the new leader.
    put(&a, "tag", json!({"name": "a unpushed"})).await;

    // The leader is gone. B asks A's vote; the majority of three write members is two.
    let voter = InProcessMember::new(a.clone());
    let alone = b
        .follower()
        .expect("a follower")
        .promote(&[], PromoteOptions::default())
        .await;
    assert!(
        matches!(&alone, Err(PromoteError::Refused { .. })),
        "one vote of three is no majority: {alone:?}"
    );
    let promotion = b
        .follower()
        .expect("a follower")
        .promote(&[&voter as &dyn Transport], PromoteOptions::default())
        .await
        .expect("promote");
    assert_eq!(promotion.epoch, Epoch(2));
    assert_eq!((promotion.granted, promotion.needed), (2, 2));
    assert!(!promotion.forced);
    assert_eq!(promotion.replaced, old.device_id());
    assert_eq!(
        promotion.lost,
        Some((shared.seq.next(), Seq(shared.seq.0 + 2))),
        "the two entries only the lost leader held"
    );
    assert_eq!(promotion.record_seq, shared.seq.next());
    assert_eq!(b.role(), sync_core::Role::Leader);
    // A member votes once per epoch: A will not vote for itself now.
    let again = a
        .follower()
        .expect("a follower")
        .promote(&[], PromoteOptions { force: true })
        .await;
    assert!(
        matches!(&again, Err(PromoteError::VotedForAnother(d)) if *d == b.device_id()),
        "{again:?}"
    );

    // A follows the new leader: applies the promotion record, pushes what it wrote.
    round(&a, &b).await;
    assert_eq!(a.epoch(), Epoch(2));
    assert_eq!(a.leader_device_id(), b.device_id());
    round(&a, &b).await;
    assert_eq!(a.outbox_len().await.expect("outbox"), 0);
    let on_new = names(&b.dump().await.expect("dump"), "tag");
    for name in ["from the leader", "from a", "b acknowledged", "a unpushed"] {
        assert!(on_new.contains(&name.to_owned()), "{name} in {on_new:?}");
    }
    // What only the lost leader held is in the lost range: its own write, and A's push it
    // acknowledged, which A (its author) still shows and nobody else holds.
    assert!(!on_new.contains(&"only on the old leader".to_owned()));
    assert!(!on_new.contains(&"acknowledged, never pulled".to_owned()));
    let on_a = names(&a.dump().await.expect("dump"), "tag");
    assert_eq!(
        on_a.iter()
            .filter(|n| !on_new.contains(n))
            .collect::<Vec<_>>(),
        ["acknowledged, never pulled"]
    );

    // The old leader comes back, with a write of its own made meanwhile. A member of the
    // new epoch pulling from it fences it.
    let comeback = put(old, "tag", json!({"name": "old leader, meanwhile"})).await;
    let fenced = old
        .leader()
        .expect("still leads, as far as it knows")
        .serve_pull(&PullRequest::from_position(old.id(), shared).with_epoch(Epoch(2)))
        .await;
    assert!(
        matches!(fenced, Err(PullError::Superseded { epoch: Epoch(2) })),
        "{fenced:?}"
    );
    assert_eq!(old.superseded_by(), Some(Epoch(2)));
    let record = move_record_at(&b, promotion.record_seq).await;
    // It finds the fork and the new epoch's move record by pulling from the new leader,
    // rewinds, and follows it.
    let rewind = old
        .rewind_with(&InProcess::new(b.leader().expect("the new leader")))
        .await
        .expect("rewind");
    assert_eq!(rewind.fork, shared.seq);
    assert_eq!(
        rewind.to_outbox, 3,
        "its own two writes and A's acknowledged one"
    );
    assert_eq!(old.role(), sync_core::Role::Follower);
    assert_eq!(old.epoch(), Epoch(2));
    let rewound = old.rewound().await.expect("rewound");
    assert_eq!(rewound.len(), 3);
    assert!(
        rewound
            .iter()
            .all(|r| r.disposition == "outbox" && r.change_id.is_some())
    );
    // Its write after the fork reached the new leader once and came back.
    assert!(get(&b, "tag", &id_of(&comeback)).await.is_some());
    assert!(get(old, "tag", &id_of(&comeback)).await.is_some());
    // A record that does not outrank the epoch it is in now is refused.
    assert!(matches!(
        old.rewind_onto(&record).await,
        Err(RewindError::NotNewer { .. })
    ));
    round(old, &b).await;
    round(&a, &b).await;
    assert_converged(&[&b, &a, old]).await;
    let on_new = names(&b.dump().await.expect("dump"), "tag");
    for name in [
        "only on the old leader",
        "acknowledged, never pulled",
        "old leader, meanwhile",
    ] {
        assert_eq!(
            on_new.iter().filter(|n| *n == name).count(),
            1,
            "{name} arrives once: {on_new:?}"
        );
    }
    // Pushed again (a repeated push after a lost answer), nothing is taken twice.
    let log_before = b.latest_seq().await.expect("latest");
    let again = old.rewound().await.expect("rewound");
    assert_eq!(again.len(), 3);
    round(old, &b).await;
    assert_eq!(b.latest_seq().await.expect("latest"), log_before);
    f
}

async fn two_forced_promotions_one_leads_and_the_other_rewinds(f: Fixture) -> Fixture {
    let old = &f.library;
    let dir = tempfile::tempdir().expect("temp dir");
    let a = member(old, dir.path(), "a", Access::Write).await;
    let b = member(old, dir.path(), "b", Access::Write).await;
    let c = member(old, dir.path(), "c", Access::Write).await;
    let reader = member(old, dir.path(), "reader", Access::Read).await;
    put(old, "tag", json!({"name": "before"})).await;
    for device in [&a, &b, &c, &reader] {
        sync(device, old).await;
    }
    let shared = a.position().await.expect("position");
    // Each promoted alone, by force: both start epoch 2.
    let pa = a
        .follower()
        .expect("a follower")
        .promote(&[], PromoteOptions { force: true })
        .await
        .expect("promote a");
    let pb = b
        .follower()
        .expect("a follower")
        .promote(&[], PromoteOptions { force: true })
        .await
        .expect("promote b");
    assert!(pa.forced && pb.forced);
    assert_eq!((pa.epoch, pb.epoch), (Epoch(2), Epoch(2)));
    put(&a, "tag", json!({"name": "written on a as leader"})).await;
    put(&b, "tag", json!({"name": "written on b as leader"})).await;

    // The tie goes to the higher device id; the other rewinds onto it.
    let (winner, loser, win_record) = if a.device_id().0 > b.device_id().0 {
        (&a, &b, pa.record_seq)
    } else {
        (&b, &a, pb.record_seq)
    };
    // C and the reader follow the loser meanwhile: they hold its write too.
    for device in [&c, &reader] {
        round(device, loser).await;
        assert_eq!(device.leader_device_id(), loser.device_id());
    }
    let loser_record = move_record_at(loser, loser.leadership().epoch_start_seq).await;
    assert!(matches!(
        winner.rewind_onto(&loser_record).await,
        Err(RewindError::NotNewer { .. })
    ));
    let record = move_record_at(winner, win_record).await;
    assert!(record.forced, "a forced promotion says so in its record");
    let rewind = loser.rewind_onto(&record).await.expect("rewind");
    assert_eq!(rewind.fork, shared.seq);
    assert_eq!(rewind.to_outbox, 1);
    assert_eq!(rewind.set_aside, 1, "its own move record");
    assert_eq!(loser.leader_device_id(), winner.device_id());
    // Restored to the fork until the winner has its write: not shown twice meanwhile.
    let loser_name = if loser.device_id() == a.device_id() {
        "written on a as leader"
    } else {
        "written on b as leader"
    };
    assert!(!names(&loser.dump().await.expect("dump"), "tag").contains(&loser_name.to_owned()));
    let rewound = loser.rewound().await.expect("rewound");
    assert_eq!(
        rewound
            .iter()
            .map(|r| r.disposition.as_str())
            .collect::<Vec<_>>(),
        ["move_record", "outbox"]
    );
    // C rewinds too: the same abandoned entry, the same change: the winner takes it once.
    let to_winner = InProcess::new(winner.leader().expect("the winner"));
    let c_rewind = c.rewind_with(&to_winner).await.expect("c rewinds");
    assert_eq!((c_rewind.fork, c_rewind.to_outbox), (shared.seq, 1));
    // The reader records it, and pushes nothing.
    let r_rewind = reader
        .rewind_with(&to_winner)
        .await
        .expect("the reader rewinds");
    assert_eq!(r_rewind.to_outbox, 0);
    assert!(
        reader
            .rewound()
            .await
            .expect("rewound")
            .iter()
            .any(|r| r.disposition == "not_pushed")
    );
    round(loser, winner).await;
    for device in [loser, &c, &reader, loser] {
        round(device, winner).await;
    }
    assert_converged(&[winner, loser, &c, &reader]).await;
    let on_winner = names(&winner.dump().await.expect("dump"), "tag");
    assert_eq!(
        on_winner,
        ["before", "written on a as leader", "written on b as leader"]
    );
    f
}

async fn a_promoted_member_first_fetches_what_another_member_holds(f: Fixture) -> Fixture {
    let old = &f.library;
    let dir = tempfile::tempdir().expect("temp dir");
    let a = member(old, dir.path(), "a", Access::Write).await;
    let b = member(old, dir.path(), "b", Access::Write).await;
    let c = member(old, dir.path(), "c", Access::Read).await;
    for device in [&a, &b, &c] {
        sync(device, old).await;
    }
    // A load on the leader; A pulls all of it, B and C none of it.
    for n in 0..40 {
        put(old, "tag", json!({"name": format!("load {n:02}")})).await;
    }
    put(&a, "tag", json!({"name": "a pushed"})).await;
    sync(&a, old).await;
    put(&b, "tag", json!({"name": "b offline"})).await;
    let held_by_a = a.position().await.expect("position");
    assert!(b.position().await.expect("position").seq < held_by_a.seq);

    // The leader is gone; B is promoted with A's vote and first takes what A holds.
    let voter = InProcessMember::new(a.clone());
    let promotion = b
        .follower()
        .expect("a follower")
        .promote(&[&voter as &dyn Transport], PromoteOptions::default())
        .await
        .expect("promote");
    assert!(promotion.fetched >= 41, "{promotion:?}");
    assert_eq!(promotion.lost, None, "A held all the leader announced");
    assert_eq!(promotion.gaps, 0, "every entry of the old epoch is held");
    assert_eq!(promotion.record_seq, held_by_a.seq.next());
    // The log the new leader serves is the old epoch's chain, whole, then its own entries
    // (the record, its offline write taken from its outbox).
    assert_eq!(
        b.verify_held_log().await.expect("the held log").seq,
        Seq(promotion.record_seq.0 + 1)
    );

    // Followers converge on the new leader: the reader from behind, A from where it was.
    for device in [&a, &c, &a] {
        round(device, &b).await;
    }
    assert_eq!(c.epoch(), Epoch(2));
    assert_converged(&[&b, &a, &c]).await;
    let on_new = names(&b.dump().await.expect("dump"), "tag");
    assert_eq!(on_new.len(), 42, "{on_new:?}");
    assert!(on_new.contains(&"b offline".to_owned()));
    f
}

crate::on_every_backend!(
    a_promoted_member_first_fetches_what_another_member_holds,
    a_lost_leader_is_replaced_and_returns_with_its_writes,
    two_forced_promotions_one_leads_and_the_other_rewinds,
);
