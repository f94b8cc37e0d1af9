//! Offline writes on followers: the outbox, pushes, and concurrent edits that converge.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use example_app::ops;
use example_app::{Migrator, registry};
use sea_orm_migration::MigratorTrait;
use serde_json::{Value, json};
use sync_core::{
    Access, InProcess, Library, PullError, PullRequest, PullResponse, PushError, PushRequest,
    PushResponse, Resolution, Transport,
};

use crate::support::{Backend, fixture};

/// A follower on its own SQLite file, admitted by `leader` with `access`.
pub(crate) async fn member(
    leader: &Library,
    dir: &std::path::Path,
    name: &str,
    access: Access,
) -> Library {
    let url = format!(
        "sqlite://{}?mode=rwc",
        dir.join(format!("{name}.db")).display()
    );
    let db = example_app::connect(&url).await.expect("connect");
    Migrator::up(&db, None).await.expect("migrate");
    let key = Library::device_key_of(&db).await.expect("device key");
    let invite = leader
        .leader()
        .expect("the leader")
        .invite(access, Duration::from_secs(600))
        .await
        .expect("invite");
    leader
        .leader()
        .expect("the leader")
        .redeem_invite(&invite.secret, access, key.fingerprint(), Some(name))
        .await
        .expect("redeem");
    Library::join(
        db,
        leader.id(),
        leader.device_id(),
        "test",
        access,
        registry(),
    )
    .await
    .expect("join")
}

/// One sync round of `device`: push its outbox, then pull until caught up.
pub(crate) async fn sync(device: &Library, leader: &Library) {
    let transport = InProcess::new(leader.leader().expect("the leader"));
    device
        .follower()
        .expect("a follower")
        .push_outbox(&transport)
        .await
        .expect("push");
    device
        .follower()
        .expect("a follower")
        .catch_up(&transport, 1_000)
        .await
        .expect("pull");
}

pub(crate) async fn put(library: &Library, model: &str, value: Value) -> Value {
    ops::put(library, model, &value.to_string())
        .await
        .expect("put")
}

pub(crate) async fn get(library: &Library, model: &str, id: &str) -> Option<Value> {
    ops::get(library, model, id).await.expect("get")
}

/// Waits until the wall clock has moved to the next millisecond, so that the next write's
/// HLC is greater than every earlier write's on any device (HLCs order by milliseconds,
/// then by a per-device counter: two devices' writes in one millisecond tie).
pub(crate) async fn tick() {
    let start = chrono::Utc::now().timestamp_millis();
    let deadline = std::time::Instant::now() + Duration::from_secs(1);
    while chrono::Utc::now().timestamp_millis() <= start {
        assert!(
            std::time::Instant::now() < deadline,
            "the clock does not move"
        );
        tokio::task::yield_now().await;
    }
}

pub(crate) fn id_of(record: &Value) -> String {
    record["id"].as_str().expect("an id").to_owned()
}

/// Every device holds the same synced data, and nothing waits in an outbox.
pub(crate) async fn assert_converged(devices: &[&Library]) {
    let first = devices[0].dump().await.expect("dump");
    for device in &devices[1..] {
        assert_eq!(device.dump().await.expect("dump"), first, "devices differ");
        assert_eq!(device.outbox_len().await.expect("outbox"), 0);
    }
}

/// Entries of one record in the leader's log.
pub(crate) async fn entries_of(leader: &Library, record_id: &str) -> Vec<sync_core::LogEntry> {
    leader
        .read_log(sync_core::Seq::ZERO, 100_000)
        .await
        .expect("log")
        .into_iter()
        .filter(|e| e.record_id == record_id)
        .collect()
}

/// A leader and two followers with write access, synced with a few shared records.
pub(crate) struct Three {
    pub(crate) leader: crate::support::Fixture,
    pub(crate) a: Library,
    pub(crate) b: Library,
    pub(crate) dir: tempfile::TempDir,
}

impl Three {
    /// `first` syncs, then the other follower, then `first` again (to pull what the other
    /// pushed); then all three must hold the same data.
    pub(crate) async fn settle(&self, first: &Library) {
        let leader = &self.leader.library;
        let other = if first.device_id() == self.a.device_id() {
            &self.b
        } else {
            &self.a
        };
        sync(first, leader).await;
        sync(other, leader).await;
        sync(first, leader).await;
        assert_converged(&[leader, &self.a, &self.b]).await;
    }

    /// Both followers pull what the leader has.
    pub(crate) async fn pull_both(&self) {
        sync(&self.a, &self.leader.library).await;
        sync(&self.b, &self.leader.library).await;
    }
}

pub(crate) async fn three(backend: Backend, test: &str) -> Option<Three> {
    let leader = fixture(backend, test).await?;
    let dir = tempfile::tempdir().expect("dir");
    let a = member(&leader.library, dir.path(), "a", Access::Write).await;
    let b = member(&leader.library, dir.path(), "b", Access::Write).await;
    Some(Three { leader, a, b, dir })
}

/// Offline edits on both followers and the leader — to the same records and to different
/// ones — synced in `order`; every device ends with the same data, nothing lost.
async fn offline_edits_converge(backend: Backend, test: &str, a_first: bool) {
    let Some(t) = three(backend, test).await else {
        return;
    };
    let leader = &t.leader.library;
    let shared_tag = put(leader, "tag", json!({"name": "shared"})).await;
    let location = put(
        leader,
        "location",
        json!({"name": "Photos", "path": "/photos", "indexed_files": 1}),
    )
    .await;
    let meta = put(
        leader,
        "user_metadata",
        json!({"tags": ["a"], "notes": null, "favorite": false}),
    )
    .await;
    t.pull_both().await;

    // Offline: each device writes without seeing the others.
    let a_only = put(&t.a, "tag", json!({"name": "from a"})).await;
    let b_only = put(&t.b, "volume", json!({"name": "B's disk"})).await;
    let leader_only = put(leader, "tag", json!({"name": "from the leader"})).await;
    put(
        &t.a,
        "tag",
        json!({"id": id_of(&shared_tag), "name": "renamed by a"}),
    )
    .await;
    tick().await;
    put(
        &t.b,
        "tag",
        json!({"id": id_of(&shared_tag), "name": "renamed by b"}),
    )
    .await;
    put(
        &t.a,
        "user_metadata",
        json!({"id": id_of(&meta), "tags": ["a", "x"]}),
    )
    .await;
    put(
        &t.b,
        "user_metadata",
        json!({"id": id_of(&meta), "tags": ["a", "y"], "favorite": true}),
    )
    .await;
    put(
        &t.a,
        "location",
        json!({"id": id_of(&location), "name": "Pictures"}),
    )
    .await;
    put(
        &t.b,
        "location",
        json!({"id": id_of(&location), "name": "Images", "indexed_files": 9}),
    )
    .await;
    assert_eq!(t.a.outbox_len().await.expect("outbox"), 4);

    let (first, second) = if a_first { (&t.a, &t.b) } else { (&t.b, &t.a) };
    sync(first, leader).await;
    sync(second, leader).await;
    sync(first, leader).await;
    assert_converged(&[leader, &t.a, &t.b]).await;

    // Nothing lost: every device's own records arrived everywhere.
    for (model, record) in [("tag", &a_only), ("volume", &b_only), ("tag", &leader_only)] {
        assert!(
            get(leader, model, &id_of(record)).await.is_some(),
            "{record} lost"
        );
    }
    // The same tag renamed twice: the later write (b's) wins on every device.
    let tag = get(leader, "tag", &id_of(&shared_tag)).await.expect("tag");
    assert_eq!(tag["name"], "renamed by b");
    // Field level: both tag sets are kept, b's favorite survives.
    let meta = get(leader, "user_metadata", &id_of(&meta))
        .await
        .expect("meta");
    let mut tags: Vec<String> = serde_json::from_value(meta["tags"].clone()).expect("tags");
    tags.sort();
    assert_eq!(tags, ["a", "x", "y"]);
    assert_eq!(meta["favorite"], true);
    // Concurrent renames of a location are a manual conflict: the first to reach the
    // leader is kept, b's indexed_files (no conflict) is taken.
    let location = get(leader, "location", &id_of(&location))
        .await
        .expect("location");
    let (kept, aside) = if a_first {
        ("Pictures", "Images")
    } else {
        ("Images", "Pictures")
    };
    assert_eq!(location["name"], kept);
    assert_eq!(location["indexed_files"], 9);
    for device in [leader, &t.a, &t.b] {
        let conflicts = device.conflicts().await.expect("conflicts");
        assert_eq!(conflicts.len(), 1, "the conflict replicates");
        assert_eq!(conflicts[0].local, json!({"name": kept}));
        assert_eq!(conflicts[0].remote, json!({"name": aside}));
    }
    t.leader.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_devices_converge_a_first() {
    offline_edits_converge(
        Backend::Sqlite,
        "offline::three_devices_converge_a_first",
        true,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_devices_converge_b_first() {
    offline_edits_converge(
        Backend::Sqlite,
        "offline::three_devices_converge_b_first",
        false,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_devices_converge_on_a_postgres_leader() {
    offline_edits_converge(
        Backend::Postgres,
        "offline::three_devices_converge_on_a_postgres_leader",
        true,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_devices_converge_on_a_mysql_leader() {
    offline_edits_converge(
        Backend::Mysql,
        "offline::three_devices_converge_on_a_mysql_leader",
        false,
    )
    .await;
}

/// A manual conflict is listed on a follower, resolved there, and the resolution reaches
/// every device.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conflict_resolved_on_a_follower_reaches_every_device() {
    let Some(t) = three(Backend::Sqlite, "offline::conflict_resolved_on_a_follower").await else {
        return;
    };
    let leader = &t.leader.library;
    let location = put(leader, "location", json!({"name": "Photos", "path": "/p"})).await;
    t.pull_both().await;
    put(
        &t.a,
        "location",
        json!({"id": id_of(&location), "path": "/a"}),
    )
    .await;
    put(
        &t.b,
        "location",
        json!({"id": id_of(&location), "path": "/b"}),
    )
    .await;
    t.pull_both().await;
    let conflicts = t.b.conflicts().await.expect("conflicts");
    assert_eq!(conflicts.len(), 1);
    assert_eq!(conflicts[0].remote, json!({"path": "/b"}));
    t.b.resolve(&conflicts[0].id, Resolution::TakeRemote)
        .await
        .expect("resolve");
    assert_eq!(
        t.b.outbox_len().await.expect("outbox"),
        2,
        "record and conflict"
    );
    sync(&t.b, leader).await;
    sync(&t.a, leader).await;
    assert_converged(&[leader, &t.a, &t.b]).await;
    for device in [leader, &t.a, &t.b] {
        assert!(device.conflicts().await.expect("conflicts").is_empty());
        let record = get(device, "location", &id_of(&location))
            .await
            .expect("location");
        assert_eq!(record["path"], "/b");
    }
    // A resolution with a value of one's own; a stale id is a clear error.
    put(
        &t.a,
        "location",
        json!({"id": id_of(&location), "name": "A"}),
    )
    .await;
    put(
        &t.b,
        "location",
        json!({"id": id_of(&location), "name": "B"}),
    )
    .await;
    t.pull_both().await;
    let id = t.b.conflicts().await.expect("conflicts")[0].id.clone();
    let mut value = serde_json::Map::new();
    value.insert("name".into(), json!("Both"));
    t.b.resolve(&id, Resolution::Value(value))
        .await
        .expect("resolve");
    let again = t.b.resolve(&id, Resolution::TakeLocal).await;
    assert!(
        matches!(again, Err(sync_core::ResolveError::NotFound(_))),
        "{again:?}"
    );
    sync(&t.b, leader).await;
    sync(&t.a, leader).await;
    assert_converged(&[leader, &t.a, &t.b]).await;
    let record = get(&t.a, "location", &id_of(&location))
        .await
        .expect("location");
    assert_eq!(record["name"], "Both");
    t.leader.finish().await;
}

/// Each combination of concurrent operations on one record, with its documented outcome
/// (ARCHITECTURE.md, "Offline writes and conflicts").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_combination_has_its_documented_outcome() {
    let Some(t) = three(Backend::Sqlite, "offline::combinations").await else {
        return;
    };
    let leader = &t.leader.library;

    // create/create of one id: last writer (b) wins everywhere.
    let id = uuid::Uuid::now_v7().to_string();
    put(&t.a, "tag", json!({"id": id, "name": "a's"})).await;
    tick().await;
    put(&t.b, "tag", json!({"id": id, "name": "b's"})).await;
    t.settle(&t.a).await;
    assert_eq!(get(leader, "tag", &id).await.expect("tag")["name"], "b's");

    // update (earlier) / delete (later): the delete wins.
    put(&t.a, "tag", json!({"id": id, "name": "a's update"})).await;
    tick().await;
    ops::delete(&t.b, "tag", &id).await.expect("delete");
    t.settle(&t.a).await;
    assert!(get(leader, "tag", &id).await.is_none());

    // create after delete: a device that saw the delete creates the id again.
    put(&t.a, "tag", json!({"id": id, "name": "again"})).await;
    t.settle(&t.a).await;
    assert_eq!(get(&t.b, "tag", &id).await.expect("tag")["name"], "again");

    // delete (earlier) / update (later): the update wins and brings the record back.
    ops::delete(&t.a, "tag", &id).await.expect("delete");
    tick().await;
    put(&t.b, "tag", json!({"id": id, "name": "b's later update"})).await;
    t.settle(&t.a).await;
    assert_eq!(
        get(&t.a, "tag", &id).await.expect("tag")["name"],
        "b's later update"
    );

    // delete/delete: one delete in the log, not two.
    let before = entries_of(leader, &id).await.len();
    ops::delete(&t.a, "tag", &id).await.expect("delete");
    ops::delete(&t.b, "tag", &id).await.expect("delete");
    t.settle(&t.a).await;
    let after = entries_of(leader, &id).await;
    assert_eq!(after.len(), before + 1);
    assert_eq!(after[before].op, sync_core::ChangeOp::Delete);

    // update/update, last-write-wins: the later HLC wins even when it arrives first.
    let tag = put(leader, "tag", json!({"name": "base"})).await;
    t.pull_both().await;
    put(&t.a, "tag", json!({"id": id_of(&tag), "name": "earlier"})).await;
    tick().await;
    put(&t.b, "tag", json!({"id": id_of(&tag), "name": "later"})).await;
    t.settle(&t.b).await;
    assert_eq!(
        get(leader, "tag", &id_of(&tag)).await.expect("tag")["name"],
        "later"
    );

    // Field level, different fields: both edits survive.
    let meta = put(
        leader,
        "user_metadata",
        json!({"tags": [], "favorite": false}),
    )
    .await;
    t.pull_both().await;
    put(
        &t.a,
        "user_metadata",
        json!({"id": id_of(&meta), "notes": "from a"}),
    )
    .await;
    put(
        &t.b,
        "user_metadata",
        json!({"id": id_of(&meta), "favorite": true}),
    )
    .await;
    t.settle(&t.a).await;
    let meta = get(leader, "user_metadata", &id_of(&meta))
        .await
        .expect("meta");
    assert_eq!(
        (meta["notes"].clone(), meta["favorite"].clone()),
        (json!("from a"), json!(true))
    );
    t.leader.finish().await;
}

/// Loses the acknowledgement of the first push: the leader took it, the follower does not
/// know (a dropped connection, or the follower killed before it noted the answer).
struct LosesFirstAck {
    inner: InProcess,
    lost: AtomicBool,
}

#[async_trait::async_trait]
impl Transport for LosesFirstAck {
    async fn pull(&self, request: PullRequest) -> Result<PullResponse, PullError> {
        self.inner.pull(request).await
    }

    async fn push(&self, request: PushRequest) -> Result<PushResponse, PushError> {
        let response = self.inner.push(request).await?;
        if !self.lost.swap(true, Ordering::SeqCst) {
            return Err(PushError::Transport("connection lost".into()));
        }
        Ok(response)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_repeated_after_a_lost_acknowledgement_is_logged_once() {
    let Some(t) = three(Backend::Sqlite, "offline::lost_ack").await else {
        return;
    };
    let leader = &t.leader.library;
    let tag = put(&t.a, "tag", json!({"name": "once"})).await;
    put(&t.a, "tag", json!({"id": id_of(&tag), "name": "twice"})).await;
    let transport = LosesFirstAck {
        inner: InProcess::new(leader.leader().expect("the leader")),
        lost: AtomicBool::new(false),
    };
    let first =
        t.a.follower()
            .expect("a follower")
            .push_outbox(&transport)
            .await;
    assert!(first.is_err(), "the acknowledgement was lost");
    assert_eq!(
        t.a.outbox_len().await.expect("outbox"),
        2,
        "kept until acknowledged"
    );
    let second =
        t.a.follower()
            .expect("a follower")
            .push_outbox(&transport)
            .await
            .expect("push again");
    assert_eq!(second.acknowledged, 2);
    assert_eq!(t.a.outbox_len().await.expect("outbox"), 0);
    assert_eq!(
        entries_of(leader, &id_of(&tag)).await.len(),
        2,
        "nothing logged twice"
    );
    t.a.follower()
        .expect("a follower")
        .catch_up(&transport, 100)
        .await
        .expect("pull");
    assert_converged(&[leader, &t.a]).await;
    t.leader.finish().await;
}

/// A follower with read access cannot change synced models, and the leader refuses its pushes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_role_follower_cannot_write() {
    let Some(leader) = fixture(Backend::Sqlite, "offline::read_role").await else {
        return;
    };
    let dir = tempfile::tempdir().expect("dir");
    let reader = member(&leader.library, dir.path(), "reader", Access::Read).await;
    let refused = ops::put(&reader, "tag", r#"{"name":"nope"}"#).await;
    let message = format!("{:#}", refused.expect_err("refused"));
    assert!(message.contains("read access"), "{message}");
    assert_eq!(reader.outbox_len().await.expect("outbox"), 0);
    assert_eq!(reader.dump().await.expect("dump")["tag"], json!([]));
    // Nor can it push by going around its own library (a crafted request).
    let push = PushRequest {
        protocol_version: sync_core::PROTOCOL_VERSION,
        library_id: leader.library.id(),
        device_id: reader.device_id(),
        epoch: sync_core::Epoch::UNSTATED,
        changes: Vec::new(),
    };
    let refused = leader
        .library
        .leader()
        .expect("the leader")
        .serve_push(&push)
        .await;
    assert!(
        matches!(refused, Err(PushError::NotWriter { .. })),
        "{refused:?}"
    );
    leader.finish().await;
}

/// A model with a custom merge function: the larger count wins, whoever wrote later.
pub mod counter {
    use sea_orm::entity::prelude::*;
    use serde::{Deserialize, Serialize};

    #[derive(
        Clone,
        Debug,
        Default,
        PartialEq,
        Eq,
        DeriveEntityModel,
        Serialize,
        Deserialize,
        sync_core::Syncable,
    )]
    #[sea_orm(table_name = "merge_counter")]
    #[serde(default)]
    #[sync(merge_with = "keep_larger")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        pub count: i64,
        pub label: String,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    pub fn keep_larger(local: &Model, remote: &Model) -> Model {
        if remote.count > local.count {
            remote.clone()
        } else {
            local.clone()
        }
    }
}

async fn counter_library(dir: &std::path::Path, name: &str, leader: Option<&Library>) -> Library {
    use sea_orm::{ConnectionTrait, Schema};
    let url = format!("sqlite://{}?mode=rwc", dir.join(name).display());
    let db = example_app::connect(&url).await.expect("connect");
    <sync_migrations::Migrator as MigratorTrait>::up(&db, None)
        .await
        .expect("migrate");
    let schema = Schema::new(db.get_database_backend());
    db.execute(&schema.create_table_from_entity(counter::Entity))
        .await
        .expect("counter table");
    let registry = sync_core::Registry::new()
        .register::<counter::Entity>()
        .expect("registry");
    match leader {
        None => Library::create(db, "counters", registry)
            .await
            .expect("create"),
        Some(leader) => {
            let key = Library::device_key_of(&db).await.expect("key");
            let invite = leader
                .leader()
                .expect("the leader")
                .invite(Access::Write, Duration::from_secs(60))
                .await
                .expect("invite");
            leader
                .leader()
                .expect("the leader")
                .redeem_invite(&invite.secret, Access::Write, key.fingerprint(), None)
                .await
                .expect("redeem");
            Library::join(
                db,
                leader.id(),
                leader.device_id(),
                "counters",
                Access::Write,
                registry,
            )
            .await
            .expect("join")
        }
    }
}

async fn set_counter(library: &Library, id: uuid::Uuid, count: i64, label: &str, insert: bool) {
    use sea_orm::ActiveModelTrait;
    use sea_orm::ActiveValue::{Set, Unchanged};
    let label = label.to_owned();
    library
        .transaction(move |txn| {
            Box::pin(async move {
                let row = counter::ActiveModel {
                    id: if insert { Set(id) } else { Unchanged(id) },
                    count: Set(count),
                    label: Set(label),
                };
                if insert {
                    row.insert(txn).await?;
                } else {
                    row.update(txn).await?;
                }
                Ok::<_, sea_orm::DbErr>(())
            })
        })
        .await
        .expect("write counter");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_custom_merge_function_decides_concurrent_edits() {
    let dir = tempfile::tempdir().expect("dir");
    let leader = counter_library(dir.path(), "leader.db", None).await;
    let a = counter_library(dir.path(), "a.db", Some(&leader)).await;
    let b = counter_library(dir.path(), "b.db", Some(&leader)).await;
    let id = uuid::Uuid::now_v7();
    set_counter(&leader, id, 1, "start", true).await;
    sync(&a, &leader).await;
    sync(&b, &leader).await;
    set_counter(&a, id, 5, "a", false).await;
    tick().await;
    // Later, but smaller: last-write-wins would take it, keep_larger does not.
    set_counter(&b, id, 3, "b", false).await;
    sync(&a, &leader).await;
    sync(&b, &leader).await;
    sync(&a, &leader).await;
    assert_converged(&[&leader, &a, &b]).await;
    let rows = leader.dump().await.expect("dump");
    assert_eq!(rows["merge_counter"][0]["count"], 5);
    assert_eq!(rows["merge_counter"][0]["label"], "a");
    // And a larger later value does win.
    set_counter(&b, id, 8, "b again", false).await;
    sync(&b, &leader).await;
    sync(&a, &leader).await;
    assert_converged(&[&leader, &a, &b]).await;
    assert_eq!(
        a.dump().await.expect("dump")["merge_counter"][0]["count"],
        8
    );
}

/// One step of the random offline-editing proptest.
#[derive(Clone, Debug)]
enum Step {
    /// Device `.0` creates or renames tag `.1` (of three shared ids).
    PutTag(usize, usize, u8),
    /// Device `.0` deletes tag `.1` if it has it.
    DeleteTag(usize, usize),
    /// Device `.0` adds a tag word to the shared user_metadata.
    AddWord(usize, u8),
    /// Device `.0` renames the shared location (a manual field).
    Rename(usize, u8),
    /// Follower `.0` syncs (push, then pull).
    Sync(usize),
    /// Follower `.0` pulls only (its unpushed edits may be overwritten locally).
    Pull(usize),
}

fn step() -> impl proptest::strategy::Strategy<Value = Step> {
    use proptest::prelude::*;
    prop_oneof![
        (0usize..3, 0usize..3, 0u8..4).prop_map(|(d, t, n)| Step::PutTag(d, t, n)),
        (0usize..3, 0usize..3).prop_map(|(d, t)| Step::DeleteTag(d, t)),
        (0usize..3, 0u8..6).prop_map(|(d, w)| Step::AddWord(d, w)),
        (0usize..3, 0u8..3).prop_map(|(d, n)| Step::Rename(d, n)),
        (1usize..3).prop_map(Step::Sync),
        (1usize..3).prop_map(Step::Pull),
    ]
}

async fn random_offline_edits_converge(steps: Vec<Step>) {
    let Some(t) = three(Backend::Sqlite, "offline::proptest").await else {
        return;
    };
    let leader = &t.leader.library;
    let devices = [leader, &t.a, &t.b];
    let tags: Vec<String> = (0..3).map(|_| uuid::Uuid::now_v7().to_string()).collect();
    let meta = id_of(
        &put(
            leader,
            "user_metadata",
            json!({"tags": [], "favorite": false}),
        )
        .await,
    );
    let location = id_of(&put(leader, "location", json!({"name": "L", "path": "/l"})).await);
    t.pull_both().await;
    let mut acknowledged = [0u64; 3];
    let mut added = std::collections::BTreeSet::new();
    let transport = InProcess::new(leader.leader().expect("the leader"));
    let round = |device: usize| {
        let library = devices[device].clone();
        let transport = transport.clone();
        async move {
            let pushed = library
                .follower()
                .expect("a follower")
                .push_outbox(&transport)
                .await
                .expect("push");
            library
                .follower()
                .expect("a follower")
                .catch_up(&transport, 7)
                .await
                .expect("pull");
            pushed.acknowledged
        }
    };
    for step in steps {
        match step {
            Step::PutTag(d, tag, n) => {
                put(
                    devices[d],
                    "tag",
                    json!({"id": tags[tag], "name": format!("name {n}")}),
                )
                .await;
            }
            Step::DeleteTag(d, tag) => {
                if get(devices[d], "tag", &tags[tag]).await.is_some() {
                    ops::delete(devices[d], "tag", &tags[tag])
                        .await
                        .expect("delete");
                }
            }
            Step::AddWord(d, word) => {
                let current = get(devices[d], "user_metadata", &meta).await.expect("meta");
                let mut words: Vec<Value> =
                    serde_json::from_value(current["tags"].clone()).expect("tags");
                words.push(json!(format!("w{word}")));
                added.insert(format!("w{word}"));
                put(
                    devices[d],
                    "user_metadata",
                    json!({"id": meta, "tags": words}),
                )
                .await;
            }
            Step::Rename(d, n) => {
                put(
                    devices[d],
                    "location",
                    json!({"id": location, "name": format!("L{n}")}),
                )
                .await;
            }
            Step::Sync(d) => acknowledged[d] += round(d).await,
            Step::Pull(d) => {
                devices[d]
                    .follower()
                    .expect("a follower")
                    .catch_up(&transport, 7)
                    .await
                    .expect("pull");
            }
        }
    }
    for d in [1, 2, 1, 2] {
        acknowledged[d] += round(d).await;
    }
    assert_converged(&devices).await;
    // Nothing sequenced twice: each device's entries are at most its acknowledged changes.
    let log = leader
        .read_log(sync_core::Seq::ZERO, 1_000_000)
        .await
        .expect("log");
    for d in [1, 2] {
        let authored = log
            .iter()
            .filter(|e| e.device_id == devices[d].device_id())
            .count() as u64;
        assert!(
            authored <= acknowledged[d],
            "{authored} > {}",
            acknowledged[d]
        );
    }
    // Tags merge as a set union and no step removes one: every word any device added is
    // in the converged set, whatever the edits and sync order.
    let merged = get(leader, "user_metadata", &meta).await.expect("meta");
    let merged: Vec<String> = serde_json::from_value(merged["tags"].clone()).expect("tags");
    for word in &added {
        assert!(merged.contains(word), "`{word}` was lost: {merged:?}");
    }
    t.leader.finish().await;
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 16, .. proptest::prelude::ProptestConfig::default() })]
    /// Random offline edits on a leader and two followers with write access, synced in random
    /// order: every device ends with the same data, and nothing is sequenced twice.
    #[test]
    fn random_offline_edits_in_any_sync_order_converge(steps in proptest::collection::vec(step(), 1..40)) {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
        runtime.block_on(random_offline_edits_converge(steps));
    }
}

/// Writers on a server-backed follower commit in another order than they took outbox ids;
/// pushes run meanwhile. Every write must reach the leader: an id acknowledged past one
/// still uncommitted would be skipped when it commits.
async fn concurrent_follower_writers_lose_nothing(backend: Backend, test: &str) {
    let Some(server) = crate::support::server_url(backend, test) else {
        return;
    };
    let Some(leader) = fixture(Backend::Sqlite, test).await else {
        return;
    };
    let dir = tempfile::tempdir().expect("dir");
    let url = example_app::fresh_database(&server, dir.path())
        .await
        .expect("fresh database");
    let db = example_app::connect(&url).await.expect("connect");
    Migrator::up(&db, None).await.expect("migrate");
    let key = Library::device_key_of(&db).await.expect("key");
    let invite = leader
        .library
        .leader()
        .expect("the leader")
        .invite(Access::Write, Duration::from_secs(60))
        .await
        .expect("invite");
    leader
        .library
        .leader()
        .expect("the leader")
        .redeem_invite(&invite.secret, Access::Write, key.fingerprint(), None)
        .await
        .expect("redeem");
    let follower = Library::join(
        db,
        leader.library.id(),
        leader.library.device_id(),
        "test",
        Access::Write,
        registry(),
    )
    .await
    .expect("join");

    const WRITERS: usize = 4;
    const EACH: usize = 40;
    let done = std::sync::Arc::new(AtomicBool::new(false));
    let pusher = {
        let follower = follower.clone();
        let transport = InProcess::new(leader.library.leader().expect("the leader"));
        let done = std::sync::Arc::clone(&done);
        tokio::spawn(async move {
            while !done.load(Ordering::SeqCst) {
                follower
                    .follower()
                    .expect("a follower")
                    .push_outbox(&transport)
                    .await
                    .expect("push");
                tokio::task::yield_now().await;
            }
        })
    };
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let follower = follower.clone();
        writers.push(tokio::spawn(async move {
            for i in 0..EACH {
                put(&follower, "tag", json!({"name": format!("w{w} t{i}")})).await;
            }
        }));
    }
    for writer in writers {
        writer.await.expect("writer");
    }
    done.store(true, Ordering::SeqCst);
    pusher.await.expect("pusher");
    sync(&follower, &leader.library).await;
    let tags = leader.library.dump().await.expect("dump")["tag"]
        .as_array()
        .map_or(0, Vec::len);
    assert_eq!(
        tags,
        WRITERS * EACH,
        "every follower write reached the leader"
    );
    assert_converged(&[&leader.library, &follower]).await;
    let _ = follower.db().clone().close().await;
    let _ = example_app::drop_database(&url).await;
    leader.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_on_a_postgres_follower_lose_nothing() {
    concurrent_follower_writers_lose_nothing(
        Backend::Postgres,
        "offline::concurrent_writers_on_a_postgres_follower",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_on_a_mysql_follower_lose_nothing() {
    concurrent_follower_writers_lose_nothing(
        Backend::Mysql,
        "offline::concurrent_writers_on_a_mysql_follower",
    )
    .await;
}

/// A follower edits a record, pulls another device's edit of it (which overwrites its
/// unpushed edit locally), and edits it again on top: the second edit inherits the first
/// one's base, so the leader still merges both against the other device's edit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edit_made_after_pulling_over_an_unpushed_one_keeps_both() {
    let Some(t) = three(Backend::Sqlite, "offline::edit_after_pull").await else {
        return;
    };
    let leader = &t.leader.library;
    let meta = id_of(
        &put(
            leader,
            "user_metadata",
            json!({"tags": ["x"], "favorite": false}),
        )
        .await,
    );
    t.pull_both().await;
    put(
        &t.a,
        "user_metadata",
        json!({"id": meta, "tags": ["x", "f"]}),
    )
    .await;
    put(
        &t.b,
        "user_metadata",
        json!({"id": meta, "tags": ["x", "g"]}),
    )
    .await;
    sync(&t.b, leader).await;
    // a pulls without pushing: its "f" is overwritten locally by b's tags.
    t.a.follower()
        .expect("a follower")
        .catch_up(&InProcess::new(leader.leader().expect("the leader")), 100)
        .await
        .expect("pull");
    put(
        &t.a,
        "user_metadata",
        json!({"id": meta, "tags": ["x", "g", "f2"]}),
    )
    .await;
    t.pull_both().await;
    assert_converged(&[leader, &t.a, &t.b]).await;
    let record = get(leader, "user_metadata", &meta).await.expect("meta");
    let mut tags: Vec<String> = serde_json::from_value(record["tags"].clone()).expect("tags");
    tags.sort();
    assert_eq!(tags, ["f", "f2", "g", "x"], "a's first edit survives");
    t.leader.finish().await;
}

/// A change the leader refuses for good (here: of a model the leader does not know) stays
/// in the outbox with the reason shown, and the follower keeps pulling meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_push_does_not_stop_the_pulls() {
    use sea_orm::ConnectionTrait;
    let Some(t) = three(Backend::Sqlite, "offline::refused_push").await else {
        return;
    };
    let leader = &t.leader.library;
    t.a.db()
        .execute_unprepared(&format!(
            "INSERT INTO sync_outbox (library_id, model, record_id, op, data, changed, hlc, \
             schema_version, base_seq) VALUES ('{}', 'from_a_newer_app', 'r1', 'upsert', \
             '{{}}', '[]', 1, 1, 0)",
            leader.id()
        ))
        .await
        .expect("outbox row");
    let follow = t.a.follower().expect("a follower").start_following(
        std::sync::Arc::new(InProcess::new(leader.leader().expect("the leader"))),
        sync_core::FollowConfig {
            poll_interval: Duration::from_millis(50),
            retry_delay_min: Duration::from_millis(10),
            retry_delay_max: Duration::from_millis(50),
            ..sync_core::FollowConfig::default()
        },
    );
    let latest = {
        put(leader, "tag", json!({"name": "still arrives"})).await;
        leader.latest_seq().await.expect("latest")
    };
    let status = follow
        .wait_for(Duration::from_secs(30), |s| {
            s.position >= latest
                && s.last_error
                    .as_deref()
                    .is_some_and(|e| e.contains("from_a_newer_app"))
        })
        .await
        .expect("pulls go on, and the refusal is reported");
    assert!(
        status
            .last_error
            .as_deref()
            .unwrap_or_default()
            .contains("update the leader's app"),
        "{status:?}"
    );
    follow.stop().await;
    assert_eq!(
        t.a.outbox_len().await.expect("outbox"),
        1,
        "kept, not dropped"
    );
    t.leader.finish().await;
}

/// A device's clock never runs back across a restart: timestamps it observed by pulling
/// (here from a device whose clock runs two minutes ahead) stay below its next writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_follower_writes_after_what_it_pulled() {
    let Some(t) = three(Backend::Sqlite, "offline::clock_floor").await else {
        return;
    };
    let leader = &t.leader.library;
    let ahead = sync_core::Hlc::new(chrono::Utc::now().timestamp_millis() as u64 + 120_000, 0);
    let id = uuid::Uuid::now_v7().to_string();
    let pushed = leader
        .leader()
        .expect("the leader")
        .serve_push(&PushRequest {
            protocol_version: sync_core::PROTOCOL_VERSION,
            library_id: leader.id(),
            device_id: t.b.device_id(),
            epoch: sync_core::Epoch::UNSTATED,
            changes: vec![sync_core::PushedChange {
                id: 1,
                change_id: uuid::Uuid::now_v7(),
                model: "tag".into(),
                record_id: id.clone(),
                op: sync_core::ChangeOp::Upsert,
                data: Some(json!({"id": id, "name": "from the future", "color": null}).to_string()),
                changed: vec!["name".into(), "color".into()],
                hlc: ahead,
                schema_version: 1,
                base: sync_core::Seq::ZERO,
            }],
        })
        .await
        .expect("push");
    assert_eq!((pushed.taken, pushed.rejected.len()), (1, 0));
    sync(&t.a, leader).await;
    // Restart a: a new handle on the same database.
    let a = Library::open(t.a.db().clone(), leader.id(), registry())
        .await
        .expect("reopen");
    put(&a, "tag", json!({"id": id, "name": "after"})).await;
    sync(&a, leader).await;
    let last = leader
        .read_log(sync_core::Seq::ZERO, 1_000)
        .await
        .expect("log")
        .pop()
        .expect("an entry");
    assert_eq!(last.device_id, a.device_id());
    assert!(last.hlc > ahead, "{} <= {ahead}", last.hlc);
    assert_eq!(get(leader, "tag", &id).await.expect("tag")["name"], "after");
    t.leader.finish().await;
}

/// A follower holds the log it applied: `audit` names exactly the records it wrote past the
/// hooks (`update_many`, `delete_many`), and `repair` puts their current state in its
/// outbox, which reaches the leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_follower_repairs_what_it_wrote_past_the_hooks() {
    use example_app::models::tag;
    use sea_orm::sea_query::Expr;
    use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};
    use sync_core::{Drift, DriftKind};

    let test = "offline::a_write_follower_repairs_what_it_wrote_past_the_hooks";
    let Some(leader) = fixture(Backend::Sqlite, test).await else {
        return;
    };
    let dir = tempfile::tempdir().expect("dir");
    let follower = member(&leader.library, dir.path(), "f", Access::Write).await;
    let kept = id_of(&put(&follower, "tag", json!({"name": "kept"})).await);
    let gone = id_of(&put(&follower, "tag", json!({"name": "gone"})).await);
    sync(&follower, &leader.library).await;
    let uuid = |id: &str| uuid::Uuid::parse_str(id).expect("uuid");
    tag::Entity::update_many()
        .col_expr(tag::Column::Name, Expr::value("renamed"))
        .filter(tag::Column::Id.eq(uuid(&kept)))
        .exec(follower.db())
        .await
        .expect("update_many");
    tag::Entity::delete_many()
        .filter(tag::Column::Id.eq(uuid(&gone)))
        .exec(follower.db())
        .await
        .expect("delete_many");

    let drift = [
        Drift {
            model: "tag".into(),
            record_id: kept.clone(),
            kind: DriftKind::Unlogged,
        },
        Drift {
            model: "tag".into(),
            record_id: gone.clone(),
            kind: DriftKind::Vanished,
        },
    ];
    let mut expected = drift.to_vec();
    expected.sort_by(|a, b| a.record_id.cmp(&b.record_id));
    assert_eq!(follower.audit().await.expect("audit"), expected);
    assert_eq!(follower.repair(&drift).await.expect("repair"), 2);
    assert_eq!(follower.outbox_len().await.expect("outbox"), 2);
    sync(&follower, &leader.library).await;
    assert_converged(&[&leader.library, &follower]).await;
    assert_eq!(
        get(&leader.library, "tag", &kept)
            .await
            .map(|t| t["name"].clone()),
        Some(json!("renamed"))
    );
    assert_eq!(get(&leader.library, "tag", &gone).await, None);
    assert!(leader.library.audit().await.expect("audit").is_empty());
    assert!(follower.audit().await.expect("audit").is_empty());
    leader.finish().await;
}
