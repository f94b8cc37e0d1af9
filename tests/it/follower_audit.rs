//! Followers keep the log they applied (`held.rs`): it moves with the position and its
//! chain verifies; `audit` on a follower names what was written past the hooks, and
//! `repair` there puts it in the outbox (issue 12 part 7).

use std::time::Duration;

use example_app::models::tag;
use example_app::{Migrator, registry};
use sea_orm::sea_query::Expr;
use sea_orm::{ColumnTrait, ConnectionTrait, DbBackend, EntityTrait, QueryFilter};
use sea_orm_migration::MigratorTrait;
use serde_json::json;
use sync_core::{
    Access, Drift, DriftKind, InProcess, Library, LogError, PullRequest, Transport, WriteRefusal,
};

use crate::offline::{assert_converged, get, id_of, put, sync};
use crate::support::{Backend, Fixture, server_url};

/// A member on a fresh database of the leader's backend, and that database's URL.
async fn member_here(
    f: &Fixture,
    dir: &std::path::Path,
    name: &str,
    access: Access,
) -> (Library, String) {
    let backend = match f.library.db().get_database_backend() {
        DbBackend::Postgres => Backend::Postgres,
        DbBackend::MySql => Backend::Mysql,
        _ => Backend::Sqlite,
    };
    let server = server_url(backend, name).expect("the leader's server");
    let url = example_app::fresh_database(&server, dir)
        .await
        .expect("fresh database");
    let db = example_app::connect(&url).await.expect("connect");
    Migrator::up(&db, None).await.expect("migrate");
    let key = Library::device_key_of(&db).await.expect("device key");
    let leader = f.library.leader().expect("the leader");
    let invite = leader
        .invite(access, Duration::from_secs(600))
        .await
        .expect("invite");
    leader
        .redeem_invite(&invite.secret, access, key.fingerprint(), Some(name))
        .await
        .expect("redeem");
    let library = Library::join(
        db,
        f.library.id(),
        f.library.device_id(),
        "test",
        access,
        registry(),
    )
    .await
    .expect("join");
    (library, url)
}

async fn drop_member(library: Library, url: String) {
    let _ = library.db().clone().close().await;
    let _ = example_app::drop_database(&url).await;
}

fn transport(leader: &Library) -> InProcess {
    InProcess::new(leader.leader().expect("the leader"))
}

/// The held log covers 1..=position and chains, ending where the position is.
async fn assert_held_at_position(follower: &Library) {
    let position = follower.position().await.expect("position");
    assert_eq!(
        follower
            .verify_held_log()
            .await
            .expect("the held log verifies"),
        position
    );
}

fn uuid(id: &str) -> uuid::Uuid {
    uuid::Uuid::parse_str(id).expect("uuid")
}

async fn a_follower_audit_names_exactly_what_was_written_past_the_hooks(f: Fixture) -> Fixture {
    let leader = &f.library;
    let dir = tempfile::tempdir().expect("dir");
    let (writer, writer_url) = member_here(&f, dir.path(), "writer", Access::Write).await;
    let (reader, reader_url) = member_here(&f, dir.path(), "reader", Access::Read).await;
    // Records written twice before the followers pull: the first entries are superseded,
    // so pulls leave them out as skipped runs.
    let mut ids = Vec::new();
    for n in 0..4 {
        let id = id_of(&put(leader, "tag", json!({"name": format!("t{n}")})).await);
        put(
            leader,
            "tag",
            json!({"id": id, "name": format!("t{n} again")}),
        )
        .await;
        ids.push(id);
    }
    sync(&writer, leader).await;
    sync(&reader, leader).await;
    for device in [&writer, &reader] {
        assert_held_at_position(device).await;
        let gaps = device.held_log_gaps().await.expect("gaps");
        assert!(
            !gaps.is_empty() && gaps.iter().all(|g| !g.not_held),
            "superseded entries are held as skipped runs: {gaps:?}"
        );
        assert_eq!(device.audit().await.expect("audit"), vec![]);
    }

    // Offline writes through the hooks wait in the outbox: not drift.
    let own = id_of(&put(&writer, "tag", json!({"name": "offline"})).await);
    put(
        &writer,
        "tag",
        json!({"id": ids[0], "name": "edited offline"}),
    )
    .await;
    assert_eq!(writer.audit().await.expect("audit"), vec![]);
    // Pushed and acknowledged, not yet pulled back: still not drift.
    let pushed = writer
        .follower()
        .expect("a follower")
        .push_outbox(&transport(leader))
        .await
        .expect("push");
    assert_eq!(pushed.acknowledged, 2);
    assert_eq!(writer.outbox_len().await.expect("outbox"), 0);
    assert!(writer.position().await.expect("position").seq < pushed.latest_seq);
    assert_eq!(writer.audit().await.expect("audit"), vec![]);

    // A write past the hooks, on the bare connection.
    tag::Entity::update_many()
        .col_expr(tag::Column::Name, Expr::value("past the hooks"))
        .filter(tag::Column::Id.eq(uuid(&ids[1])))
        .exec(writer.db())
        .await
        .expect("update_many");
    let drift = vec![Drift {
        model: "tag".into(),
        record_id: ids[1].clone(),
        kind: DriftKind::Unlogged,
    }];
    assert_eq!(writer.audit().await.expect("audit"), drift);
    // The pull brings the acknowledged changes back: still exactly that record.
    writer
        .follower()
        .expect("a follower")
        .catch_up(&transport(leader), 1_000)
        .await
        .expect("pull");
    assert_held_at_position(&writer).await;
    assert_eq!(writer.audit().await.expect("audit"), drift);

    // A read member cannot repair: the read-access refusal.
    let refused = reader.repair(&drift).await.expect_err("read access");
    assert_eq!(WriteRefusal::of(&refused), Some(WriteRefusal::ReadOnly));

    assert_eq!(writer.repair(&drift).await.expect("repair"), 1);
    assert_eq!(writer.outbox_len().await.expect("outbox"), 1);
    assert_eq!(writer.audit().await.expect("audit"), vec![]);
    sync(&writer, leader).await;
    assert_eq!(
        get(leader, "tag", &ids[1]).await.map(|t| t["name"].clone()),
        Some(json!("past the hooks"))
    );
    assert!(get(leader, "tag", &own).await.is_some());
    sync(&reader, leader).await;
    assert_converged(&[leader, &writer, &reader]).await;
    for device in [leader, &writer, &reader] {
        assert_eq!(device.audit().await.expect("audit"), vec![]);
    }
    assert_held_at_position(&writer).await;
    assert_held_at_position(&reader).await;
    drop_member(writer, writer_url).await;
    drop_member(reader, reader_url).await;
    f
}

async fn the_held_log_moves_with_the_position(f: Fixture) -> Fixture {
    let leader = &f.library;
    let dir = tempfile::tempdir().expect("dir");
    let (follower, url) = member_here(&f, dir.path(), "f", Access::Write).await;
    for n in 0..10 {
        put(leader, "tag", json!({"name": format!("t{n}")})).await;
    }
    let view = follower.follower().expect("a follower");
    let to = transport(leader);
    // Small pulls, each its own transaction: after each the held log ends at the position.
    loop {
        let position = follower.position().await.expect("position");
        let mut request = PullRequest::from_position(follower.id(), position);
        request.limit = 3;
        let response = to.pull(request).await.expect("pull");
        let latest = response.latest_seq;
        view.apply(position.seq, response).await.expect("apply");
        assert_held_at_position(&follower).await;
        if follower.position().await.expect("position").seq >= latest {
            break;
        }
    }
    // A batch refused at its last entry stores nothing: neither rows, nor held log, nor
    // position.
    for n in 0..3 {
        put(leader, "tag", json!({"name": format!("late {n}")})).await;
    }
    let before = follower.position().await.expect("position");
    let held_before = follower.latest_seq().await.expect("held tip");
    let dump_before = follower.dump().await.expect("dump");
    let mut response = to
        .pull(PullRequest::from_position(follower.id(), before))
        .await
        .expect("pull");
    match response.items.last_mut() {
        Some(sync_core::PulledItem::Entry(entry)) => entry.checksum ^= 1,
        other => panic!("expected an entry last, got {other:?}"),
    }
    view.apply(before.seq, response)
        .await
        .expect_err("a broken chain is refused");
    assert_eq!(follower.position().await.expect("position"), before);
    assert_eq!(follower.latest_seq().await.expect("held tip"), held_before);
    assert_eq!(follower.dump().await.expect("dump"), dump_before);
    assert_held_at_position(&follower).await;
    sync(&follower, leader).await;
    assert_held_at_position(&follower).await;
    assert_eq!(
        follower.latest_seq().await.expect("held tip"),
        leader.latest_seq().await.expect("latest")
    );
    drop_member(follower, url).await;
    f
}

async fn a_follower_that_kept_no_log_is_told_to_fill_it(f: Fixture) -> Fixture {
    let leader = &f.library;
    let dir = tempfile::tempdir().expect("dir");
    let (follower, url) = member_here(&f, dir.path(), "f", Access::Write).await;
    for n in 0..5 {
        let id = id_of(&put(leader, "tag", json!({"name": format!("t{n}")})).await);
        put(
            leader,
            "tag",
            json!({"id": id, "name": format!("t{n} again")}),
        )
        .await;
    }
    sync(&follower, leader).await;
    let position = follower.position().await.expect("position");
    // As a follower of an earlier build left it: a position, no held log.
    for table in ["sync_log", "sync_log_skipped"] {
        follower
            .db()
            .execute_unprepared(&format!("DELETE FROM {table}"))
            .await
            .expect("forget the held log");
    }
    let follower = Library::open(follower.db().clone(), leader.id(), registry())
        .await
        .expect("reopen");
    let gaps = follower.held_log_gaps().await.expect("gaps");
    assert_eq!(gaps.len(), 1);
    assert!(
        gaps[0].not_held && gaps[0].through == position.seq,
        "{gaps:?}"
    );
    let refused = follower.audit().await.expect_err("not held");
    assert!(
        matches!(refused, LogError::LogKeptOnlyAfter { seq } if seq == position.seq),
        "{refused}"
    );
    assert!(refused.to_string().contains("fill_held_log"), "{refused}");

    let stored = follower
        .follower()
        .expect("a follower")
        .fill_held_log(&transport(leader))
        .await
        .expect("fill");
    assert_eq!(stored, position.seq.0);
    assert_eq!(follower.held_log_gaps().await.expect("gaps"), vec![]);
    assert_held_at_position(&follower).await;
    assert_eq!(follower.audit().await.expect("audit"), vec![]);
    // The held log is now the leader's, entry for entry.
    assert_eq!(
        follower
            .read_log(sync_core::Seq::ZERO, 1_000)
            .await
            .expect("held"),
        leader
            .read_log(sync_core::Seq::ZERO, position.seq.0)
            .await
            .expect("log")
    );
    drop_member(follower, url).await;
    f
}

crate::on_every_backend!(
    a_follower_audit_names_exactly_what_was_written_past_the_hooks,
    the_held_log_moves_with_the_position,
    a_follower_that_kept_no_log_is_told_to_fill_it,
);
