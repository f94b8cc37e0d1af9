//! Gap-free, commit-ordered sequencing under concurrent writers.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use example_app::load::{LoadOptions, load};
use sync_core::{Seq, verify_chain};

use crate::support::Fixture;

/// Reads that would catch a late-committing lower seq: a reader that has seen seq N asks
/// for entries above N, so an entry that committed later with a seq at or below N would
/// leave a gap in what it receives (or break the checksum chain).
async fn sixteen_writers_leave_a_contiguous_log_in_commit_order(f: Fixture) -> Fixture {
    const WRITES: u64 = 1_600;
    let done = Arc::new(AtomicBool::new(false));
    let reader = {
        let library = f.library.clone();
        let done = Arc::clone(&done);
        tokio::spawn(async move {
            let mut seen = Seq::ZERO;
            let mut checksum = 0;
            let mut reads = 0u64;
            let deadline = Instant::now() + Duration::from_secs(120);
            loop {
                let finished = done.load(Ordering::Acquire);
                let page = library.read_log(seen, 200).await.expect("read");
                reads += 1;
                if let Some(last) = page.last() {
                    checksum = verify_chain(seen, checksum, &page)
                        .unwrap_or_else(|e| panic!("after seq {seen}: {e}"));
                    seen = last.seq;
                } else if finished {
                    return (seen, reads);
                } else {
                    assert!(Instant::now() < deadline, "writers did not finish in time");
                    tokio::task::yield_now().await;
                }
            }
        })
    };
    let report = load(
        &f.library,
        &LoadOptions {
            count: WRITES,
            concurrency: 16,
            seed: 42,
            batch: 1,
            sync: true,
        },
    )
    .await
    .expect("load");
    done.store(true, Ordering::Release);
    let (seen, reads) = reader.await.expect("reader");
    assert_eq!(report.transactions, WRITES);
    let latest = f.library.latest_seq().await.expect("latest");
    assert_eq!(
        seen, latest,
        "the reader caught up with every committed entry"
    );
    assert!(reads > 1, "the reader ran alongside the writers");
    // Every synced write is in the log (temp_file writes are not synced, so fewer entries
    // than writes), and the tables agree with the log.
    assert!(
        latest.0 > WRITES / 2 && latest.0 <= WRITES,
        "latest {latest}"
    );
    assert!(f.library.audit().await.expect("audit").is_empty());
    f
}

crate::on_every_backend!(sixteen_writers_leave_a_contiguous_log_in_commit_order);

/// The hazard PostgreSQL sequences have: a transaction that took its number early and
/// commits late. Here writer A's entry is pending (inserted, uncommitted) while writer B
/// commits; B's entry is numbered first, and A's, once committed, comes after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_late_commit_gets_a_later_seq() {
    use sea_orm::{ConnectionTrait, TransactionTrait};
    let test = "ordering::postgres_late_commit_gets_a_later_seq";
    let Some(f) = crate::support::fixture(crate::support::Backend::Postgres, test).await else {
        return;
    };
    let late = f.library.db().begin().await.expect("begin");
    late.execute_unprepared(&format!(
        "INSERT INTO sync_pending (library_id, model, record_id, op, data, changed, device_id, hlc, schema_version) \
         VALUES ('{}', 'tag', '{}', 'upsert', '{{}}', '[]', '{}', 1, 1)",
        f.library.id(),
        uuid::Uuid::now_v7(),
        f.library.device_id()
    ))
    .await
    .expect("pending insert");

    f.library
        .transaction(|txn| {
            Box::pin(async move {
                use sea_orm::ActiveModelTrait;
                example_app::models::tag::ActiveModel {
                    id: sea_orm::Set(uuid::Uuid::now_v7()),
                    name: sea_orm::Set("early".into()),
                    color: sea_orm::Set(None),
                }
                .insert(txn)
                .await
            })
        })
        .await
        .expect("write");
    let first = f.library.read_log(Seq::ZERO, 10).await.expect("read");
    assert_eq!(
        first.len(),
        1,
        "the uncommitted entry is invisible, so not numbered"
    );
    assert_eq!(first[0].model, "tag");

    late.commit().await.expect("late commit");
    let rest = f.library.read_log(first[0].seq, 10).await.expect("read");
    assert_eq!(rest.len(), 1);
    assert_eq!(
        rest[0].seq,
        Seq(2),
        "the late transaction's entry comes after what readers saw"
    );
    verify_chain(first[0].seq, first[0].checksum, &rest).expect("chain continues");
    f.finish().await;
}
