//! Issue 14's findings: what operators hit with the release build, each pinned by a test.

use sync_core::Seq;

use crate::support::Backend;

/// `read_log` takes any position and limit: seqs end at `i64::MAX`, so nothing lies past
/// it, and a limit above it is no limit (the drivers refuse larger numbers, SQLite's by
/// panicking).
#[tokio::test]
async fn read_log_clamps_positions_and_limits_past_the_stored_range() {
    let test = "robust::read_log_clamps_positions_and_limits_past_the_stored_range";
    let Some(f) = crate::support::fixture(Backend::Sqlite, test).await else {
        return;
    };
    example_app::ops::put(&f.library, "tag", r#"{"name":"one"}"#)
        .await
        .expect("put");
    let all = f.library.read_log(Seq::ZERO, u64::MAX).await.expect("read");
    assert_eq!(all.len(), 1);
    for after in [
        Seq(i64::MAX as u64),
        Seq(i64::MAX as u64 + 1),
        Seq(u64::MAX),
    ] {
        let none = f.library.read_log(after, u64::MAX).await.expect("read");
        assert!(none.is_empty(), "nothing after {after}");
    }
    assert!(
        f.library
            .read_log(Seq::ZERO, 0)
            .await
            .expect("read")
            .is_empty()
    );
    f.finish().await;
}
