//! The metrics sync-core records (`sync_core::metrics`), read back through a debugging
//! recorder installed for this thread only.

use std::collections::HashMap;
use std::time::Duration;

use example_app::{Migrator, ops, registry};
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use sea_orm_migration::MigratorTrait;
use sync_core::metrics as names;
use sync_core::{Access, InProcess, Library, PushError, PushRequest};

use crate::support::{Backend, fixture};

/// One snapshot: per metric name, its samples with their labels. Counters and gauges
/// read back as what was recorded since the previous snapshot (the recorder swaps them
/// to 0), histograms as the values observed since.
struct Shown(HashMap<String, Vec<Sample>>);

/// A sample's labels (key, value) and its value.
type Sample = (Vec<(String, String)>, DebugValue);

impl Shown {
    fn take(snapshotter: &Snapshotter) -> Shown {
        let mut shown: HashMap<_, Vec<_>> = HashMap::new();
        for (key, unit, description, value) in snapshotter.snapshot().into_vec() {
            let name = key.key().name().to_owned();
            assert!(
                unit.is_some() && description.is_some(),
                "{name} is recorded but not described by sync_core::metrics::describe()"
            );
            let labels = key
                .key()
                .labels()
                .map(|l| (l.key().to_owned(), l.value().to_owned()))
                .collect();
            shown.entry(name).or_default().push((labels, value));
        }
        Shown(shown)
    }

    /// The one sample of `name`, which must carry exactly `labels`.
    fn one(&self, name: &str, labels: &[(&str, &str)]) -> &DebugValue {
        let samples = self
            .0
            .get(name)
            .unwrap_or_else(|| panic!("{name} not recorded"));
        assert_eq!(samples.len(), 1, "{name}: {samples:?}");
        let (found, value) = &samples[0];
        let expected: Vec<(String, String)> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        assert_eq!(found, &expected, "{name}'s labels");
        value
    }

    fn counter(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        match self.one(name, labels) {
            DebugValue::Counter(n) => *n,
            other => panic!("{name} is not a counter: {other:?}"),
        }
    }

    fn gauge(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        match self.one(name, labels) {
            DebugValue::Gauge(v) => v.0,
            other => panic!("{name} is not a gauge: {other:?}"),
        }
    }

    fn observations(&self, name: &str, labels: &[(&str, &str)]) -> Vec<f64> {
        match self.one(name, labels) {
            DebugValue::Histogram(values) => values.iter().map(|v| v.0).collect(),
            other => panic!("{name} is not a histogram: {other:?}"),
        }
    }
}

/// A follower with write access on its own SQLite file, admitted by `leader`.
async fn follower_of(leader: &Library, dir: &std::path::Path) -> Library {
    let url = format!("sqlite://{}?mode=rwc", dir.join("follower.db").display());
    let db = example_app::connect(&url).await.expect("connect");
    Migrator::up(&db, None).await.expect("migrate");
    let key = Library::device_key_of(&db).await.expect("device key");
    let invite = leader
        .leader()
        .expect("the leader")
        .invite(Access::Write, Duration::from_secs(600))
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
        "test",
        Access::Write,
        registry(),
    )
    .await
    .expect("join")
}

#[test]
fn pulls_applies_pushes_and_refusals_record_the_named_metrics() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    // A current-thread runtime: every task runs on this thread, inside the local recorder.
    metrics::with_local_recorder(&recorder, || {
        runtime.block_on(async {
            names::describe();
            let leader = fixture(Backend::Sqlite, "telemetry::named_metrics")
                .await
                .expect("sqlite fixture");
            let dir = tempfile::tempdir().expect("dir");
            let follower = follower_of(&leader.library, dir.path()).await;
            // The join's membership entries come first; past them the log holds only the
            // writes below, and what pulling them recorded is not under test.
            follower
                .follower()
                .expect("a follower")
                .catch_up(
                    &InProcess::new(leader.library.leader().expect("the leader")),
                    1_000,
                )
                .await
                .expect("catch up");
            let _ = Shown::take(&snapshotter);
            let library = leader.library.id().to_string();
            let device = follower.device_id().to_string();
            let by_library = [("library", library.as_str())];
            for name in ["a", "b", "c"] {
                ops::put(&leader.library, "tag", &format!(r#"{{"name":"{name}"}}"#))
                    .await
                    .expect("put");
            }
            let transport = InProcess::new(leader.library.leader().expect("the leader"));

            // One entry of three: behind by two.
            follower
                .follower()
                .expect("a follower")
                .pull_once(&transport, 1)
                .await
                .expect("pull");
            let shown = Shown::take(&snapshotter);
            assert_eq!(shown.gauge(names::PULL_LAG_SEQ, &by_library), 2.0);
            assert!(shown.gauge(names::PULL_LAG_SECONDS, &by_library) >= 0.0);
            assert_eq!(shown.counter(names::APPLY_ENTRIES, &by_library), 1);
            assert_eq!(shown.counter(names::PULL_ENTRIES_SERVED, &by_library), 1);
            assert_eq!(
                shown.observations(names::APPLY_DURATION, &by_library).len(),
                1
            );

            // A write of the follower's own, pushed; then the rest of the log.
            ops::put(&follower, "tag", r#"{"name":"mine"}"#)
                .await
                .expect("follower put");
            follower
                .follower()
                .expect("a follower")
                .push_outbox(&transport)
                .await
                .expect("push");
            follower
                .follower()
                .expect("a follower")
                .catch_up(&transport, 1_000)
                .await
                .expect("pull");
            let shown = Shown::take(&snapshotter);
            assert_eq!(shown.gauge(names::PULL_LAG_SEQ, &by_library), 0.0);
            assert_eq!(shown.gauge(names::PULL_LAG_SECONDS, &by_library), 0.0);
            assert_eq!(shown.counter(names::APPLY_ENTRIES, &by_library), 3);
            assert_eq!(
                shown.counter(names::PUSH_CHANGES_ACKNOWLEDGED, &by_library),
                1
            );
            assert_eq!(
                shown.counter(
                    names::PUSH_CHANGES_TAKEN,
                    &[("library", library.as_str()), ("device", device.as_str())]
                ),
                1
            );
            for histogram in [names::PUSH_DURATION, names::TAKE_DURATION] {
                let observed = shown.observations(histogram, &by_library);
                assert_eq!(observed.len(), 1, "{histogram}");
                assert!(observed[0] > 0.0, "{histogram}: {observed:?}");
            }

            // A device that is not a member pushes two changes: both are rejected.
            let mut outsider = PushRequest {
                protocol_version: sync_core::PROTOCOL_VERSION,
                library_id: leader.library.id(),
                device_id: sync_core::DeviceKey::generate().expect("key").device_id(),
                epoch: sync_core::Epoch::UNSTATED,
                changes: Vec::new(),
            };
            outsider.changes = vec![pushed(1), pushed(2)];
            let refused = leader
                .library
                .leader()
                .expect("the leader")
                .serve_push(&outsider)
                .await;
            assert!(
                matches!(refused, Err(PushError::NotWriter { .. })),
                "{refused:?}"
            );
            let shown = Shown::take(&snapshotter);
            let outsider_device = outsider.device_id.to_string();
            assert_eq!(
                shown.counter(
                    names::PUSH_CHANGES_REJECTED,
                    &[
                        ("library", library.as_str()),
                        ("device", outsider_device.as_str()),
                        ("reason", "not_writer"),
                    ]
                ),
                2
            );

            // A leader that cannot be reached: the follow loop's failed rounds count.
            let follow = follower.follower().expect("a follower").start_following(
                std::sync::Arc::new(Unreachable),
                sync_core::FollowConfig::default(),
            );
            let failed = follow
                .wait_for(Duration::from_secs(60), |s| s.last_error.is_some())
                .await;
            assert!(failed.is_some(), "the loop reports its failure");
            follow.stop().await;
            let shown = Shown::take(&snapshotter);
            assert!(shown.counter(names::FOLLOW_ERRORS, &by_library) >= 1);
            leader.finish().await;
        });
    });
}

/// A transport to a leader that is never there.
struct Unreachable;

#[async_trait::async_trait]
impl sync_core::Transport for Unreachable {
    async fn pull(
        &self,
        _: sync_core::PullRequest,
    ) -> Result<sync_core::PullResponse, sync_core::PullError> {
        Err(sync_core::PullError::Transport("no leader here".into()))
    }
}

/// A well-formed pushed change (the refusal comes before its content matters).
fn pushed(id: u64) -> sync_core::PushedChange {
    sync_core::PushedChange {
        id,
        change_id: uuid::Uuid::now_v7(),
        model: "tag".into(),
        record_id: uuid::Uuid::now_v7().to_string(),
        op: sync_core::ChangeOp::Upsert,
        data: Some(r#"{"name":"x"}"#.into()),
        changed: vec!["name".into()],
        hlc: sync_core::Hlc::new(1, 0),
        schema_version: 1,
        base: sync_core::Seq::ZERO,
    }
}
