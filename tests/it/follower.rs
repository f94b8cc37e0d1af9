//! Followers: pull by seq, apply exactly once, refuse what they cannot apply.

use std::sync::atomic::{AtomicUsize, Ordering};

use example_app::load::{LoadOptions, load};
use example_app::models::volume;
use example_app::{Migrator, connect, fresh_database, registry};
use sea_orm::ActiveValue::{Set, Unchanged};
use sea_orm::{ActiveModelTrait, EntityTrait};
use sea_orm_migration::MigratorTrait;
use sync_core::{
    ApplyError, InProcess, Library, PROTOCOL_VERSION, PullError, PullRequest, PullResponse,
    PulledItem, Seq, SyncError, Transport,
};
use uuid::Uuid;

use crate::support::{Backend, Fixture, fixture};

/// A follower of `leader` on a fresh database of `backend` (SQLite unless a server is set).
async fn follower_of(leader: &Library, backend: Backend, dir: &std::path::Path) -> Option<Library> {
    follower_with_url(leader, backend, dir)
        .await
        .map(|(library, _)| library)
}

/// `follower_of`, and the follower database's URL (to drop it afterwards).
async fn follower_with_url(
    leader: &Library,
    backend: Backend,
    dir: &std::path::Path,
) -> Option<(Library, String)> {
    let server = crate::support::server_url(backend, "follower")?;
    let url = fresh_database(&server, dir).await.expect("fresh database");
    let db = connect(&url).await.expect("connect");
    Migrator::up(&db, None).await.expect("migrate");
    let library = Library::join(
        db,
        leader.id(),
        leader.device_id(),
        "follower",
        sync_core::Access::Read,
        registry(),
    )
    .await
    .expect("join");
    Some((library, url))
}

async fn write_load(leader: &Library, count: u64, seed: u64) {
    load(
        leader,
        &LoadOptions {
            count,
            concurrency: 2,
            seed,
            batch: 3,
            sync: true,
        },
    )
    .await
    .expect("load");
}

/// Fails every `every`-th pull (as a lost connection or a crash before commit would), but
/// never twice for one position: `catch_up` prefetches the next batch while it applies one,
/// so a fixed rhythm of failures could otherwise line up with the same batch forever.
struct Flaky {
    inner: InProcess,
    every: usize,
    calls: AtomicUsize,
    failed_at: std::sync::Mutex<std::collections::HashSet<Seq>>,
}

impl Flaky {
    fn new(inner: InProcess, every: usize) -> Self {
        Flaky {
            inner,
            every,
            calls: AtomicUsize::new(0),
            failed_at: Default::default(),
        }
    }
}

#[async_trait::async_trait]
impl Transport for Flaky {
    async fn pull(&self, request: PullRequest) -> Result<PullResponse, PullError> {
        let n = self.calls.fetch_add(1, Ordering::Relaxed) + 1;
        let after = request.after;
        let response = self.inner.pull(request).await?;
        let due = self.every > 0 && n.is_multiple_of(self.every);
        if due && self.failed_at.lock().expect("failed_at lock").insert(after) {
            // Corrupt the last entry: apply must refuse the whole batch and keep its position.
            let mut response = response;
            if let Some(PulledItem::Entry(entry)) = response.items.last_mut() {
                entry.checksum ^= 1;
            }
            return Ok(response);
        }
        Ok(response)
    }
}

async fn converge(leader: &Library, follower: &Library, transport: &dyn Transport, limit: u32) {
    let target = leader.latest_seq().await.expect("latest");
    for _ in 0..10_000 {
        match follower
            .follower()
            .expect("a follower")
            .catch_up(transport, limit)
            .await
        {
            Ok(position) if position.seq >= target => break,
            Ok(_) => continue,
            Err(SyncError::Apply(ApplyError::Chain(_))) => continue,
            Err(e) => panic!("sync failed: {e}"),
        }
    }
    assert_eq!(follower.position().await.expect("position").seq, target);
    assert_eq!(
        follower.dump().await.expect("dump"),
        leader.dump().await.expect("dump"),
        "follower converged"
    );
}

async fn follower_converges_on(backend: Backend, test: &str) {
    let Some(f) = fixture(Backend::Sqlite, test).await else {
        return;
    };
    let dir = tempfile::tempdir().expect("dir");
    let Some((follower, follower_url)) = follower_with_url(&f.library, backend, dir.path()).await
    else {
        return;
    };
    write_load(&f.library, 300, 11).await;
    converge(
        &f.library,
        &follower,
        &InProcess::new(f.library.leader().expect("the leader")),
        17,
    )
    .await;
    // More writes, and the follower continues from its position.
    write_load(&f.library, 100, 12).await;
    converge(
        &f.library,
        &follower,
        &InProcess::new(f.library.leader().expect("the leader")),
        1000,
    )
    .await;
    let _ = follower.db().clone().close().await;
    let _ = example_app::drop_database(&follower_url).await;
    f.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_follower_converges() {
    follower_converges_on(Backend::Sqlite, "follower::sqlite_follower_converges").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_follower_converges() {
    follower_converges_on(Backend::Postgres, "follower::postgres_follower_converges").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_follower_converges() {
    follower_converges_on(Backend::Mysql, "follower::mysql_follower_converges").await;
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 8, .. proptest::prelude::ProptestConfig::default() })]
    /// Random writes, pulled in random batch sizes, with failures (a batch refused before
    /// commit, as a crash during apply would leave it) at random points: the follower ends
    /// with exactly the leader's synced data.
    #[test]
    fn random_writes_batches_and_crashes_converge(seed in 0u64..1_000_000, count in 20u64..200, limit in 1u32..60, every in proptest::prop_oneof![proptest::strategy::Just(0usize), 2usize..5]) {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
        runtime.block_on(async move {
            let Some(f) = fixture(Backend::Sqlite, "follower::proptest").await else { return };
            let dir = tempfile::tempdir().expect("dir");
            let follower = follower_of(&f.library, Backend::Sqlite, dir.path()).await.expect("follower");
            write_load(&f.library, count, seed).await;
            let flaky = Flaky::new(InProcess::new(f.library.leader().expect("the leader")), every);
            converge(&f.library, &follower, &flaky, limit).await;
            f.finish().await;
        });
    }

    /// The same on a PostgreSQL follower (fewer cases: each makes a database).
    #[test]
    fn random_writes_batches_and_crashes_converge_on_postgres(seed in 0u64..1_000_000, count in 20u64..150, limit in 1u32..60, every in proptest::prop_oneof![proptest::strategy::Just(0usize), 2usize..5]) {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
        runtime.block_on(async move {
            let Some(f) = fixture(Backend::Sqlite, "follower::proptest_postgres").await else { return };
            let dir = tempfile::tempdir().expect("dir");
            let Some((follower, url)) = follower_with_url(&f.library, Backend::Postgres, dir.path()).await else { return };
            write_load(&f.library, count, seed).await;
            let flaky = Flaky::new(InProcess::new(f.library.leader().expect("the leader")), every);
            converge(&f.library, &follower, &flaky, limit).await;
            let _ = follower.db().clone().close().await;
            let _ = example_app::drop_database(&url).await;
            f.finish().await;
        });
    }
}

/// A leader with two entries and a follower at position 0, for the refusal cases.
async fn refusal_setup(test: &str) -> Option<(Fixture, Library, tempfile::TempDir, PullResponse)> {
    let f = fixture(Backend::Sqlite, test).await?;
    let dir = tempfile::tempdir().expect("dir");
    let follower = follower_of(&f.library, Backend::Sqlite, dir.path()).await?;
    for name in ["a", "b"] {
        example_app::ops::put(&f.library, "tag", &format!(r#"{{"name":"{name}"}}"#))
            .await
            .expect("put");
    }
    let response = f
        .library
        .leader()
        .expect("the leader")
        .serve_pull(&PullRequest::after(f.library.id(), Seq::ZERO))
        .await
        .expect("pull");
    assert_eq!(response.items.len(), 2);
    Some((f, follower, dir, response))
}

/// Recomputes every entry's checksum, so that a test's edit is refused for what it is and
/// not for breaking the chain.
fn rechain(response: &mut PullResponse) {
    let mut prev = 0;
    for item in &mut response.items {
        if let PulledItem::Entry(entry) = item {
            entry.checksum = entry.chained_checksum(prev);
            prev = entry.checksum;
        }
    }
}

fn last_entry(response: &mut PullResponse) -> &mut sync_core::LogEntry {
    match response.items.last_mut() {
        Some(PulledItem::Entry(entry)) => entry,
        other => panic!("expected an entry, got {other:?}"),
    }
}

async fn assert_refused_and_unmoved(
    follower: &Library,
    response: &PullResponse,
    check: impl Fn(&ApplyError) -> bool,
) {
    let err = follower
        .follower()
        .expect("a follower")
        .apply(Seq::ZERO, response.clone())
        .await
        .expect_err("must be refused");
    assert!(check(&err), "unexpected error: {err}");
    assert!(!err.to_string().is_empty());
    assert_eq!(
        follower.position().await.expect("position").seq,
        Seq::ZERO,
        "position kept"
    );
    assert_eq!(
        follower.dump().await.expect("dump")["tag"],
        serde_json::json!([]),
        "nothing applied: not half a batch"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_model_is_refused() {
    let Some((f, follower, _dir, mut response)) =
        refusal_setup("follower::unknown_model_is_refused").await
    else {
        return;
    };
    last_entry(&mut response).model = "playlist".into();
    rechain(&mut response);
    assert_refused_and_unmoved(
        &follower,
        &response,
        |e| matches!(e, ApplyError::UnknownModel { model, .. } if model == "playlist"),
    )
    .await;
    f.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_payload_is_refused() {
    let Some((f, follower, _dir, mut response)) =
        refusal_setup("follower::bad_payload_is_refused").await
    else {
        return;
    };
    last_entry(&mut response).data = Some(r#"{"id":"x","name":"a"}"#.into());
    assert_refused_and_unmoved(&follower, &response, |e| matches!(e, ApplyError::Chain(_))).await;
    // With a checksum that matches, the payload itself is refused.
    rechain(&mut response);
    assert_refused_and_unmoved(&follower, &response, |e| {
        matches!(e, ApplyError::BadPayload { .. })
    })
    .await;
    f.finish().await;
}

/// A refusal deep in a batch, after the writer has executed the statements of the entries
/// before it: the whole batch is rolled back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusal_late_in_a_large_batch_applies_nothing() {
    let Some(f) = fixture(
        Backend::Sqlite,
        "follower::refusal_late_in_a_large_batch_applies_nothing",
    )
    .await
    else {
        return;
    };
    let dir = tempfile::tempdir().expect("dir");
    let Some(follower) = follower_of(&f.library, Backend::Sqlite, dir.path()).await else {
        return;
    };
    f.library
        .transaction(|txn| {
            Box::pin(async move {
                for i in 0..600 {
                    example_app::models::tag::ActiveModel {
                        id: Set(Uuid::now_v7()),
                        name: Set(format!("tag {i}")),
                        color: Set(None),
                    }
                    .insert(txn)
                    .await?;
                }
                Ok::<_, sea_orm::DbErr>(())
            })
        })
        .await
        .expect("write");
    let mut response = f
        .library
        .leader()
        .expect("the leader")
        .serve_pull(&PullRequest::after(f.library.id(), Seq::ZERO))
        .await
        .expect("pull");
    assert_eq!(response.items.len(), 600);
    last_entry(&mut response).data = Some(r#"{"id":"x","name":"a"}"#.into());
    rechain(&mut response);
    assert_refused_and_unmoved(
        &follower,
        &response,
        |e| matches!(e, ApplyError::BadPayload { seq, .. } if *seq == Seq(600)),
    )
    .await;
    // The same batch intact applies whole.
    let response = f
        .library
        .leader()
        .expect("the leader")
        .serve_pull(&PullRequest::after(f.library.id(), Seq::ZERO))
        .await
        .expect("pull");
    let applied = follower
        .follower()
        .expect("a follower")
        .apply(Seq::ZERO, response)
        .await
        .expect("apply");
    assert_eq!(applied.position.seq, Seq(600));
    assert_eq!(
        follower.dump().await.expect("dump"),
        f.library.dump().await.expect("dump")
    );
    f.finish().await;
}

/// Responses continuing one another from seq 1, of `sizes[i]` new tags each: clones
/// of `template` (an upsert of a tag) with their own ids, chained.
fn fabricated(template: &sync_core::LogEntry, sizes: &[usize]) -> Vec<PullResponse> {
    let latest = Seq(sizes.iter().sum::<usize>() as u64);
    let (mut seq, mut prev) = (0, 0);
    sizes
        .iter()
        .map(|size| PullResponse {
            protocol_version: PROTOCOL_VERSION,
            library_id: template.library_id,
            epoch: sync_core::Epoch::FIRST,
            items: (0..*size)
                .map(|_| {
                    seq += 1;
                    let id = Uuid::now_v7();
                    let mut entry = template.clone();
                    entry.seq = Seq(seq);
                    entry.record_id = id.to_string();
                    entry.data = Some(
                        serde_json::json!({"id": id, "name": format!("tag {seq}"), "color": null})
                            .to_string(),
                    );
                    entry.checksum = entry.chained_checksum(prev);
                    prev = entry.checksum;
                    PulledItem::Entry(entry)
                })
                .collect(),
            latest_seq: latest,
        })
        .collect()
}

fn first_entry(response: &PullResponse) -> sync_core::LogEntry {
    match response.items.first() {
        Some(PulledItem::Entry(entry)) => entry.clone(),
        other => panic!("expected an entry, got {other:?}"),
    }
}

/// Gives the last entry of `response` a payload that does not fit, keeping the chain intact.
fn spoil_last(response: &mut PullResponse) {
    let prev = match response.items.iter().rev().nth(1) {
        Some(PulledItem::Entry(entry)) => entry.checksum,
        other => panic!("expected an entry, got {other:?}"),
    };
    let entry = last_entry(response);
    entry.data = Some(r#"{"id":"x","name":"a"}"#.into());
    entry.checksum = entry.chained_checksum(prev);
}

async fn tags_on(library: &Library) -> u64 {
    use sea_orm::PaginatorTrait;
    example_app::models::tag::Entity::find()
        .count(library.db())
        .await
        .expect("count")
}

/// `apply_all`: consecutive responses share one transaction. An entry refused in the third
/// takes the first two with it; a response that does not continue the one before is
/// refused; intact, the three apply in one call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_applied_together_commit_together() {
    let Some((f, follower, _dir, template)) =
        refusal_setup("follower::responses_applied_together_commit_together").await
    else {
        return;
    };
    let template = first_entry(&template);
    let intact = fabricated(&template, &[10, 10, 10]);

    let mut spoilt = intact.clone();
    spoil_last(&mut spoilt[2]);
    let err = follower
        .follower()
        .expect("a follower")
        .apply_all(Seq::ZERO, spoilt)
        .await
        .expect_err("entry 30 does not fit");
    assert!(
        matches!(err, ApplyError::BadPayload { seq, .. } if seq == Seq(30)),
        "unexpected error: {err}"
    );
    assert_eq!(follower.position().await.expect("position").seq, Seq::ZERO);
    assert_eq!(
        tags_on(&follower).await,
        0,
        "the first two went with the third"
    );

    let err = follower
        .follower()
        .expect("a follower")
        .apply_all(Seq::ZERO, [intact[0].clone(), intact[2].clone()])
        .await
        .expect_err("a gap");
    assert!(
        matches!(err, ApplyError::Chain(_)),
        "unexpected error: {err}"
    );
    assert_eq!(tags_on(&follower).await, 0);

    let applied = follower
        .follower()
        .expect("a follower")
        .apply_all(Seq::ZERO, intact)
        .await
        .expect("apply");
    assert_eq!(applied.position.seq, Seq(30));
    assert_eq!(applied.entries, 30);
    assert_eq!(applied.records.len(), 30);
    assert_eq!(
        follower.position().await.expect("position"),
        applied.position
    );
    assert_eq!(tags_on(&follower).await, 30);
    f.finish().await;
}

/// A transaction takes responses until it holds `APPLY_GROUP_ENTRIES`; a refusal in a later
/// transaction keeps the earlier ones, and the position says how far they got.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_keeps_the_transactions_before_it() {
    let Some((f, follower, _dir, template)) =
        refusal_setup("follower::a_refusal_keeps_the_transactions_before_it").await
    else {
        return;
    };
    let template = first_entry(&template);
    let half = sync_core::APPLY_GROUP_ENTRIES / 2 + 1;
    let mut responses = fabricated(&template, &[half, half, 10]);
    spoil_last(&mut responses[2]);
    let err = follower
        .follower()
        .expect("a follower")
        .apply_all(Seq::ZERO, responses)
        .await
        .expect_err("the last entry does not fit");
    assert!(
        matches!(err, ApplyError::BadPayload { seq, .. } if seq.0 == 2 * half as u64 + 10),
        "unexpected error: {err}"
    );
    let first_group = 2 * half as u64;
    assert_eq!(
        follower.position().await.expect("position").seq,
        Seq(first_group)
    );
    assert_eq!(tags_on(&follower).await, first_group);
    f.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_checksum_is_refused() {
    let Some((f, follower, _dir, mut response)) =
        refusal_setup("follower::bad_checksum_is_refused").await
    else {
        return;
    };
    last_entry(&mut response).checksum ^= 0xff;
    assert_refused_and_unmoved(&follower, &response, |e| matches!(e, ApplyError::Chain(_))).await;
    f.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_mismatch_and_protocol_version_are_refused() {
    let Some((f, follower, _dir, mut response)) = refusal_setup("follower::schema_mismatch").await
    else {
        return;
    };
    let mut other_version = response.clone();
    other_version.protocol_version = PROTOCOL_VERSION + 1;
    assert_refused_and_unmoved(&follower, &other_version, |e| {
        matches!(e, ApplyError::VersionMismatch { .. })
    })
    .await;
    let mut request = PullRequest::after(f.library.id(), Seq::ZERO);
    request.protocol_version = PROTOCOL_VERSION + 1;
    let err = f
        .library
        .leader()
        .expect("the leader")
        .serve_pull(&request)
        .await
        .expect_err("leader refuses");
    assert!(matches!(err, PullError::VersionMismatch { .. }), "{err}");

    last_entry(&mut response).schema_version = 2;
    rechain(&mut response);
    assert_refused_and_unmoved(&follower, &response, |e| {
        matches!(e, ApplyError::SchemaMismatch { theirs: 2, .. })
    })
    .await;
    f.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn selective_sync_pulls_only_the_models_asked_for() {
    let Some(f) = fixture(Backend::Sqlite, "follower::selective").await else {
        return;
    };
    let dir = tempfile::tempdir().expect("dir");
    let follower = follower_of(&f.library, Backend::Sqlite, dir.path())
        .await
        .expect("follower");
    write_load(&f.library, 120, 5).await;
    let latest = f.library.latest_seq().await.expect("latest");
    let mut request = PullRequest::after(f.library.id(), Seq::ZERO);
    request.models = Some(vec!["tag".into()]);
    let response = f
        .library
        .leader()
        .expect("the leader")
        .serve_pull(&request)
        .await
        .expect("pull");
    let applied = follower
        .follower()
        .expect("a follower")
        .apply(Seq::ZERO, response)
        .await
        .expect("apply");
    assert_eq!(
        applied.position.seq, latest,
        "skipped entries still move the position"
    );
    assert!(applied.records.iter().all(|(model, _)| model == "tag"));
    let (leader, mine) = (
        f.library.dump().await.expect("dump"),
        follower.dump().await.expect("dump"),
    );
    assert_eq!(leader["tag"], mine["tag"]);
    assert_eq!(mine["volume"], serde_json::json!([]));
    f.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn superseded_changes_are_collapsed_without_changing_the_outcome() {
    let Some(f) = fixture(Backend::Sqlite, "follower::compression").await else {
        return;
    };
    let dir = tempfile::tempdir().expect("dir");
    let follower = follower_of(&f.library, Backend::Sqlite, dir.path())
        .await
        .expect("follower");
    let stored = example_app::ops::put(&f.library, "volume", r#"{"name":"v0","mount_point":"/m"}"#)
        .await
        .expect("put");
    let id = stored["id"].as_str().expect("id").to_owned();
    for i in 1..=20 {
        example_app::ops::put(
            &f.library,
            "volume",
            &format!(r#"{{"id":"{id}","name":"v{i}"}}"#),
        )
        .await
        .expect("put");
    }
    let response = f
        .library
        .leader()
        .expect("the leader")
        .serve_pull(&PullRequest::after(f.library.id(), Seq::ZERO))
        .await
        .expect("pull");
    let entries = response
        .items
        .iter()
        .filter(|i| matches!(i, PulledItem::Entry(_)))
        .count();
    assert_eq!(
        entries, 1,
        "twenty whole-record upserts of one record collapse into the last"
    );
    follower
        .follower()
        .expect("a follower")
        .apply(Seq::ZERO, response)
        .await
        .expect("apply");
    assert_eq!(
        follower.dump().await.expect("dump"),
        f.library.dump().await.expect("dump")
    );
    f.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_fields_keep_the_followers_values_and_applies_are_not_recorded() {
    let Some(f) = fixture(Backend::Sqlite, "follower::local_fields").await else {
        return;
    };
    let dir = tempfile::tempdir().expect("dir");
    let follower = follower_of(&f.library, Backend::Sqlite, dir.path())
        .await
        .expect("follower");
    let stored = example_app::ops::put(
        &f.library,
        "volume",
        r#"{"name":"Disk","mount_point":"/leader"}"#,
    )
    .await
    .expect("put");
    let id: Uuid = stored["id"].as_str().expect("id").parse().expect("uuid");
    let transport = InProcess::new(f.library.leader().expect("the leader"));
    follower
        .follower()
        .expect("a follower")
        .catch_up(&transport, 100)
        .await
        .expect("sync");
    let mine = volume::Entity::find_by_id(id)
        .one(follower.db())
        .await
        .expect("read")
        .expect("applied");
    assert_eq!(
        mine.mount_point, "",
        "a new record's local fields start at their default"
    );
    follower
        .unrecorded(move |txn| {
            Box::pin(async move {
                volume::ActiveModel {
                    id: Unchanged(id),
                    mount_point: Set("/follower".into()),
                    ..Default::default()
                }
                .update(txn)
                .await
            })
        })
        .await
        .expect("local write");
    example_app::ops::put(
        &f.library,
        "volume",
        &format!(r#"{{"id":"{id}","name":"Renamed"}}"#),
    )
    .await
    .expect("put");
    follower
        .follower()
        .expect("a follower")
        .catch_up(&transport, 100)
        .await
        .expect("sync");
    let mine = volume::Entity::find_by_id(id)
        .one(follower.db())
        .await
        .expect("read")
        .expect("present");
    assert_eq!(
        (mine.name.as_str(), mine.mount_point.as_str()),
        ("Renamed", "/follower")
    );
    // The follower holds the leader's entries as they were logged, and recorded nothing.
    assert_eq!(
        follower.read_log(Seq::ZERO, 10).await.expect("log"),
        f.library.read_log(Seq::ZERO, 10).await.expect("log"),
        "applied changes are held, not logged again"
    );
    assert_eq!(follower.outbox_len().await.expect("outbox"), 0);
    f.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pull_loop_reports_status_and_applied_changes() {
    use std::time::Duration;
    let Some(f) = fixture(Backend::Sqlite, "follower::pull_loop").await else {
        return;
    };
    let dir = tempfile::tempdir().expect("dir");
    let follower = follower_of(&f.library, Backend::Sqlite, dir.path())
        .await
        .expect("follower");
    let config = sync_core::FollowConfig {
        poll_interval: Duration::from_millis(20),
        ..Default::default()
    };
    let follow = follower.follower().expect("a follower").start_following(
        std::sync::Arc::new(InProcess::new(f.library.leader().expect("the leader"))),
        config,
    );
    let mut events = follow.subscribe();

    let stored = example_app::ops::put(&f.library, "tag", r#"{"name":"live"}"#)
        .await
        .expect("put");
    let id = stored["id"].as_str().expect("id").to_owned();
    follow.sync_now();
    let event = tokio::time::timeout(Duration::from_secs(10), events.recv())
        .await
        .expect("event in time")
        .expect("event");
    assert_eq!(event.records, [("tag".to_owned(), id.clone())]);
    let status = follow
        .wait_for(Duration::from_secs(10), |s| {
            s.position == Seq(1) && s.lag == 0
        })
        .await
        .expect("caught up in time");
    assert_eq!(status.latest_seq, Seq(1));
    assert!(status.last_error.is_none());
    assert!(
        example_app::ops::get(&follower, "tag", &id)
            .await
            .expect("get")
            .is_some()
    );
    follow.stop().await;
    f.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multi_model_backfill_interrupted_midway_resumes_without_losing_a_model() {
    // Spacedrive's shipped sync moved one shared watermark past models not yet sent when a
    // backfill was cut. Here the position covers every model in seq order: cut after two
    // small batches, the follower has exactly the log's prefix, and resuming completes it.
    let Some(f) = fixture(Backend::Sqlite, "follower::interrupted_backfill").await else {
        return;
    };
    let dir = tempfile::tempdir().expect("dir");
    let follower = follower_of(&f.library, Backend::Sqlite, dir.path())
        .await
        .expect("follower");
    write_load(&f.library, 150, 77).await;
    let transport = InProcess::new(f.library.leader().expect("the leader"));
    for _ in 0..2 {
        follower
            .follower()
            .expect("a follower")
            .pull_once(&transport, 10)
            .await
            .expect("batch");
    }
    let position = follower.position().await.expect("position");
    assert!(position.seq.0 > 0 && position.seq < f.library.latest_seq().await.expect("latest"));
    // Every model touched by the prefix is present on the follower as of that prefix: replay
    // the prefix into a third database and compare.
    let dir2 = tempfile::tempdir().expect("dir");
    let replay = follower_of(&f.library, Backend::Sqlite, dir2.path())
        .await
        .expect("replay");
    let mut request = PullRequest::after(f.library.id(), Seq::ZERO);
    request.limit = position.seq.0 as u32;
    let prefix = f
        .library
        .leader()
        .expect("the leader")
        .serve_pull(&request)
        .await
        .expect("prefix");
    replay
        .follower()
        .expect("a follower")
        .apply(Seq::ZERO, prefix)
        .await
        .expect("apply prefix");
    assert_eq!(
        follower.dump().await.expect("dump"),
        replay.dump().await.expect("dump")
    );
    // Resuming starts from the position, not from zero, and completes every model.
    converge(&f.library, &follower, &transport, 10).await;
    f.finish().await;
}
