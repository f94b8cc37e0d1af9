//! Every metric sync-core and sync-transport record: names, types, labels and meaning, in
//! one place.
//!
//! The libraries record through the [`metrics`](https://docs.rs/metrics) facade only; an
//! application that wants them installs an exporter (the example app's `--metrics ADDR`
//! installs `metrics-exporter-prometheus`) and then calls [`describe`] so that the
//! exporter prints each metric's help text and unit. Without a recorder every call is a
//! no-op.
//!
//! **Labels.** `library` is a library id: one series per library a process serves or
//! follows, which is a handful. `device` (on the leader's push counters only) is a member
//! device id: one series per device that pushed, bounded by the library's membership;
//! a leader with thousands of write members should drop it with a relabelling rule.
//! `reason` takes a few fixed values (see [`PUSH_CHANGES_REJECTED`]). The transport's byte
//! counters carry no label: they count the whole process.
//!
//! Durations are in seconds (`_seconds`, Prometheus' base unit) with microsecond
//! resolution; counters end in `_total`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ::metrics::{Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge};

use crate::protocol::PushError;
use crate::{DeviceId, LibraryId, Seq};

// Follower.

/// Gauge, follower, `library`: the leader's latest seq, as of the last pull, minus this
/// follower's position. 0 when in sync.
pub const PULL_LAG_SEQ: &str = "sync_pull_lag_seq";
/// Gauge, follower, `library`: how long this follower has been behind, in seconds: the
/// time since a pull first showed a latest seq above its position, without reaching it
/// since. 0 when in sync. Measured on this device's clock alone (no clock skew between
/// devices enters it), and updated at each pull and each applied transaction.
pub const PULL_LAG_SECONDS: &str = "sync_pull_lag_seconds";
/// Counter, follower, `library`: log entries applied (skipped runs not counted).
pub const APPLY_ENTRIES: &str = "sync_apply_entries_total";
/// Histogram, follower, `library`: one apply transaction, from begin to commit, in seconds
/// (up to `APPLY_GROUP_ENTRIES` entries each). Failed transactions are not observed.
pub const APPLY_DURATION: &str = "sync_apply_duration_seconds";
/// Gauge, follower, `library`: changes in this follower's outbox, as of the follow loop's
/// last round.
pub const OUTBOX_CHANGES: &str = "sync_outbox_changes";
/// Histogram, follower, `library`: one push request's round trip to the leader and back
/// (sending, the leader taking it, the acknowledgement), in seconds. Failed pushes are not
/// observed.
pub const PUSH_DURATION: &str = "sync_push_duration_seconds";
/// Counter, follower, `library`: outbox changes the leader acknowledged (and that left the
/// outbox).
pub const PUSH_CHANGES_ACKNOWLEDGED: &str = "sync_push_changes_acknowledged_total";
/// Counter, follower, `library`: rounds of the follow loop that failed (a push or a pull;
/// the loop retries with backoff). While the leader cannot be reached the lag gauges keep
/// their last values, so this is the one that moves.
pub const FOLLOW_ERRORS: &str = "sync_follow_errors_total";

// Leader.

/// Counter, leader, `library`: log entries sent in answer to pulls (skipped runs not
/// counted).
pub const PULL_ENTRIES_SERVED: &str = "sync_pull_entries_served_total";
/// Counter, leader, `library`, `device`: pushed changes the leader took (merged and
/// logged). A change re-sent after a lost acknowledgement is not taken, nor counted, again.
/// Counted as the push's transaction finishes; were its commit to fail, the push is also
/// counted under [`PUSH_CHANGES_REJECTED`] with reason `database`.
pub const PUSH_CHANGES_TAKEN: &str = "sync_push_changes_taken_total";
/// Counter, leader, `library`, `device`, `reason`: pushed changes the leader refused. A
/// refused push counts each change it carried; a change that is sent again and refused
/// again counts again. `reason` is [`push_refusal_reason`] of the refusal
/// (`version_mismatch`, `not_leader`, `not_writer`, `bad_change`, `database`, `log`,
/// `bad_request`), `other_device` when a QUIC session pushed for another device, or
/// `set_aside` for a change of an accepted push that the leader could not store (recorded
/// in `Library::rejected`; counted once, when first taken).
pub const PUSH_CHANGES_REJECTED: &str = "sync_push_changes_rejected_total";
/// Gauge, follower, `library`: pulled entries parked (`FollowerView::park`) instead of applied,
/// and parking requests not reached yet, as of the follow loop's last round.
pub const PARKED_ENTRIES: &str = "sync_parked_entries";
/// Histogram, leader, `library`: the leader's side of one push (checks, merging and
/// logging its changes, commit), in seconds. Refused pushes are observed too.
pub const TAKE_DURATION: &str = "sync_take_duration_seconds";
/// Gauge, leader, `library`: followers' sessions open now (QUIC connections past `Hello`).
pub const CONNECTED_FOLLOWERS: &str = "sync_connected_followers";

// Transport.

/// Counter, either side, no labels: bytes of frames written to QUIC streams (headers and
/// bodies, after compression; QUIC's and TLS's own overhead not included).
pub const TRANSPORT_BYTES_SENT: &str = "sync_transport_bytes_sent_total";
/// Counter, either side, no labels: bytes of whole frames read from QUIC streams.
pub const TRANSPORT_BYTES_RECEIVED: &str = "sync_transport_bytes_received_total";

/// Registers every metric's help text and unit with the installed recorder. Call it once,
/// after installing one (descriptions given to no recorder are lost).
pub fn describe() {
    describe_gauge!(
        PULL_LAG_SEQ,
        Unit::Count,
        "Follower: the leader's latest seq as of the last pull minus this follower's position"
    );
    describe_gauge!(
        PULL_LAG_SECONDS,
        Unit::Seconds,
        "Follower: how long it has been behind the leader's latest seq without catching up (0 when in sync)"
    );
    describe_counter!(APPLY_ENTRIES, Unit::Count, "Follower: log entries applied");
    describe_histogram!(
        APPLY_DURATION,
        Unit::Seconds,
        "Follower: one apply transaction, begin to commit"
    );
    describe_gauge!(
        OUTBOX_CHANGES,
        Unit::Count,
        "Follower: own changes waiting in the outbox to be pushed"
    );
    describe_histogram!(
        PUSH_DURATION,
        Unit::Seconds,
        "Follower: one push request's round trip to the leader"
    );
    describe_counter!(
        PUSH_CHANGES_ACKNOWLEDGED,
        Unit::Count,
        "Follower: outbox changes the leader acknowledged"
    );
    describe_counter!(
        FOLLOW_ERRORS,
        Unit::Count,
        "Follower: follow-loop rounds that failed (push or pull) and will be retried"
    );
    describe_counter!(
        PULL_ENTRIES_SERVED,
        Unit::Count,
        "Leader: log entries sent in answer to pulls"
    );
    describe_counter!(
        PUSH_CHANGES_TAKEN,
        Unit::Count,
        "Leader: pushed changes taken (merged and logged), per pushing device"
    );
    describe_counter!(
        PUSH_CHANGES_REJECTED,
        Unit::Count,
        "Leader: pushed changes refused, per pushing device and reason"
    );
    describe_gauge!(
        PARKED_ENTRIES,
        Unit::Count,
        "Leader: pushed changes parked instead of taken"
    );
    describe_histogram!(
        TAKE_DURATION,
        Unit::Seconds,
        "Leader: taking one push (checks, merge, log, commit)"
    );
    describe_gauge!(
        CONNECTED_FOLLOWERS,
        Unit::Count,
        "Leader: followers' sessions open now"
    );
    describe_counter!(
        TRANSPORT_BYTES_SENT,
        Unit::Bytes,
        "Bytes of sync frames written to QUIC streams by this process"
    );
    describe_counter!(
        TRANSPORT_BYTES_RECEIVED,
        Unit::Bytes,
        "Bytes of sync frames read from QUIC streams by this process"
    );
}

/// The `reason` label of [`PUSH_CHANGES_REJECTED`] for a refused push: one value per
/// `PushError` variant, so that the label's values stay few and stable.
pub fn push_refusal_reason(error: &PushError) -> &'static str {
    match error {
        PushError::VersionMismatch { .. } => "version_mismatch",
        PushError::NotLeader(_) => "not_leader",
        PushError::NotWriter { .. } => "not_writer",
        PushError::BadChange { .. } => "bad_change",
        PushError::Db(_) => "database",
        PushError::Log(_) => "log",
        PushError::Transport(_) => "bad_request",
        PushError::Refused { .. } => "not_writer",
        PushError::StaleEpoch { .. } => "stale_epoch",
        PushError::Superseded { .. } => "superseded",
        PushError::Moving { .. } | PushError::Moved { .. } => "moving",
    }
}

/// Since when each followed library has been behind, for [`PULL_LAG_SECONDS`].
static BEHIND_SINCE: Mutex<Option<HashMap<LibraryId, Instant>>> = Mutex::new(None);

/// Records a follower's lag: `position` reached, `latest` the leader's latest seq as last
/// heard.
pub(crate) fn record_lag(library: LibraryId, position: Seq, latest: Seq) {
    let behind = latest.0.saturating_sub(position.0);
    let seconds = {
        let mut since = BEHIND_SINCE.lock().unwrap_or_else(|p| p.into_inner());
        let since = since.get_or_insert_with(HashMap::new);
        if behind == 0 {
            since.remove(&library);
            Duration::ZERO
        } else {
            since.entry(library).or_insert_with(Instant::now).elapsed()
        }
    };
    let library = library.to_string();
    gauge!(PULL_LAG_SEQ, "library" => library.clone()).set(behind as f64);
    gauge!(PULL_LAG_SECONDS, "library" => library).set(seconds.as_secs_f64());
}

/// Records one committed apply transaction of `entries` entries, begun at `started`.
pub(crate) fn record_applied(library: LibraryId, entries: usize, started: Instant) {
    let library = library.to_string();
    counter!(APPLY_ENTRIES, "library" => library.clone()).increment(entries as u64);
    histogram_seconds(APPLY_DURATION, library, started);
}

/// Records a follower's parked entries.
pub(crate) fn record_parked(library: LibraryId, entries: u64) {
    gauge!(PARKED_ENTRIES, "library" => library.to_string()).set(entries as f64);
}

/// Records a follower's outbox length.
pub(crate) fn record_outbox(library: LibraryId, changes: u64) {
    gauge!(OUTBOX_CHANGES, "library" => library.to_string()).set(changes as f64);
}

/// Records a failed round of the follow loop.
pub(crate) fn record_follow_error(library: LibraryId) {
    counter!(FOLLOW_ERRORS, "library" => library.to_string()).increment(1);
}

/// Records one push request's round trip, begun at `started`.
pub(crate) fn record_push(library: LibraryId, started: Instant) {
    histogram_seconds(PUSH_DURATION, library.to_string(), started);
}

/// Records outbox changes the leader acknowledged.
pub(crate) fn record_acknowledged(library: LibraryId, changes: u64) {
    counter!(PUSH_CHANGES_ACKNOWLEDGED, "library" => library.to_string()).increment(changes);
}

/// Records entries a leader served to a pull.
pub(crate) fn record_served(library: LibraryId, entries: usize) {
    counter!(PULL_ENTRIES_SERVED, "library" => library.to_string()).increment(entries as u64);
}

/// Records pushed changes the leader took from `device`.
pub(crate) fn record_taken(library: LibraryId, device: DeviceId, changes: u64) {
    counter!(
        PUSH_CHANGES_TAKEN,
        "library" => library.to_string(),
        "device" => device.to_string(),
    )
    .increment(changes);
}

/// Records pushed changes the leader refused from `device`, for `reason` (one of the
/// values listed at [`PUSH_CHANGES_REJECTED`]).
pub(crate) fn record_rejected(
    library: LibraryId,
    device: DeviceId,
    reason: &'static str,
    changes: u64,
) {
    counter!(
        PUSH_CHANGES_REJECTED,
        "library" => library.to_string(),
        "device" => device.to_string(),
        "reason" => reason,
    )
    .increment(changes);
}

/// Records the leader's answer to a push begun at `started`: the changes refused, if it
/// was refused, and how long it took.
pub(crate) fn record_take(
    library: LibraryId,
    request: &crate::PushRequest,
    outcome: &Result<crate::PushResponse, PushError>,
    started: Instant,
) {
    if let Err(error) = outcome {
        let reason = push_refusal_reason(error);
        record_rejected(
            library,
            request.device_id,
            reason,
            request.changes.len() as u64,
        );
    }
    histogram_seconds(TAKE_DURATION, library.to_string(), started);
}

fn histogram_seconds(name: &'static str, library: String, started: Instant) {
    ::metrics::histogram!(name, "library" => library).record(started.elapsed().as_secs_f64());
}
