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
