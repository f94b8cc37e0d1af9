//! The leader's side of a pull: a bounded range of the log, filtered and compressed.

use std::sync::Arc;

use sea_orm::DbErr;

use crate::crowd::Coalescer;
use crate::decide::collapse;
use crate::protocol::{
    Divergence, PROTOCOL_VERSION, PULL_BYTES_MAX, PULL_ENTRIES_MAX, PullError, PullRequest,
    PullResponse, PulledItem,
};
use crate::{Library, LogEntry, LogError, Seq};

/// A range of the log after a seq, at most so many entries, and the latest seq read after
/// it; or why the read failed. Shared by every pull that asked for it in one round.
type PullRead = Result<(Arc<Vec<LogEntry>>, Seq), Arc<LogError>>;

/// The log ranges that pulls ask for together (key: after, limit), read once per round.
pub(crate) type PullReads = Coalescer<(Seq, u64), PullRead>;

/// Bytes an entry is counted as beyond its payload (ids, clock, checksum, framing).
const ENTRY_OVERHEAD_BYTES: usize = 128;

impl Library {
    /// Answers a follower's pull: the entries after `request.after`, at most
    /// `request.limit` of them and about `request.max_bytes` of payload (both clamped to
    /// the protocol's bounds, at least one entry), with entries of unrequested models and
    /// superseded entries replaced by `Skipped` runs.
    ///
    /// A request from a position this log does not hold — past its latest seq, or with
    /// another checksum there — is refused with [`PullError::HistoryDiverged`] (and logged
    /// at warn): this leader's database was restored from an older copy, or the
    /// follower's history is another log's.
    #[tracing::instrument(
        name = "serve_pull",
        skip_all,
        fields(library = %self.id(), after = request.after.0, through)
    )]
    pub(crate) async fn serve_pull(
        &self,
        request: &PullRequest,
    ) -> Result<PullResponse, PullError> {
        if request.protocol_version != PROTOCOL_VERSION {
            return Err(PullError::VersionMismatch {
                ours: PROTOCOL_VERSION,
                theirs: request.protocol_version,
            });
        }
        if request.library_id != self.id() {
            return Err(PullError::NotLeader(request.library_id));
        }
        if let Some(epoch) = self
            .fenced_by(request.epoch)
            .await
            .map_err(LogError::from)?
        {
            return Err(PullError::Superseded { epoch });
        }
        let leadership = self.leadership();
        if leadership.taking_over {
            return Err(PullError::Log(LogError::Db(DbErr::Custom(
                "this device has just become the leader and is taking the log over from the \
                 old leader; pull again shortly"
                    .into(),
            ))));
        }
        let handed_on = leadership.leader != self.device_id()
            && (request.after >= leadership.epoch_start_seq
                || crate::library::committed_tip(&self.db, self.id(), false)
                    .await
                    .map_err(LogError::from)?
                    .seq
                    < leadership.epoch_start_seq);
        if handed_on {
            // Handed on (this log ends with the move record), or never led: a follower
            // serving nothing until it leads.
            let addresses = self
                .members()
                .await
                .map_err(LogError::from)?
                .into_iter()
                .find(|m| m.device_id == leadership.leader)
                .map(|m| m.addresses)
                .unwrap_or_default();
            return Err(PullError::Moved {
                epoch: leadership.epoch,
                leader: leadership.leader,
                addresses,
            });
        }
        let limit = request.limit.clamp(1, PULL_ENTRIES_MAX);
        let max_bytes = request.max_bytes.clamp(1, PULL_BYTES_MAX) as usize;
        // From a position past the start, the entry at the position is read too: the
        // follower's history must be this log's (same seq, same checksum there).
        let stated = request.after > Seq::ZERO;
        let from = if stated {
            Seq(request.after.0 - 1)
        } else {
            Seq::ZERO
        };
        let (read, latest_seq) = self
            .read_for_pull(from, u64::from(limit) + u64::from(stated))
            .await?;
        let mut entries = read.iter().peekable();
        if stated {
            let at = entries.next_if(|e| e.seq == request.after);
            if at.map(|e| e.checksum) != Some(request.after_checksum) {
                return Err(self.diverged(request, at.map(|e| e.checksum)).await);
            }
        }
        if let Some(device) = request.device {
            self.note_serves_at(device, &request.serves_at);
            // Its history is this log's up to its position (checked just above).
            self.note_pull_seen(
                device,
                crate::Position {
                    seq: request.after,
                    checksum: request.after_checksum,
                },
            );
        }
        let mut bytes = 0;
        let mut taken = Vec::with_capacity(read.len());
        for entry in entries {
            let size = ENTRY_OVERHEAD_BYTES
                + entry.record_id.len()
                + entry.data.as_ref().map_or(0, String::len);
            if !taken.is_empty() && bytes + size > max_bytes {
                break;
            }
            bytes += size;
            taken.push(entry.clone());
        }
        let through = taken.last().map_or(request.after, |e| e.seq);
        tracing::Span::current().record("through", through.0);
        if let (Some(device), Some(last)) = (request.device, taken.last()) {
            self.note_pull_seen(
                device,
                crate::Position {
                    seq: last.seq,
                    checksum: last.checksum,
                },
            );
        }
        let items = if request.full {
            taken.into_iter().map(PulledItem::Entry).collect()
        } else {
            collapse::select(taken, request.models.as_deref(), &self.registry)
        };
        let served = items
            .iter()
            .filter(|i| matches!(i, PulledItem::Entry(_)))
            .count();
        crate::metrics::record_served(self.id(), served);
        Ok(PullResponse {
            protocol_version: PROTOCOL_VERSION,
            library_id: self.id(),
            items,
            latest_seq,
            epoch: self.epoch(),
        })
    }

    /// Whether this leader must refuse a request stating `stated`: it has been replaced
    /// (the request, or an earlier one, stated a newer epoch). The newer epoch, if so.
    pub(crate) async fn fenced_by(
        &self,
        stated: crate::Epoch,
    ) -> Result<Option<crate::Epoch>, DbErr> {
        let leadership = self.leadership();
        match crate::decide::epoch::on_request(leadership.epoch, leadership.superseded_by, stated) {
            crate::decide::epoch::OnRequest::Serve => Ok(None),
            crate::decide::epoch::OnRequest::Superseded(newer) => {
                self.note_superseded(newer).await?;
                Ok(Some(newer))
            }
        }
    }
}

impl Library {
    /// The refusal of a pull whose position is not in this log's history, logged: the
    /// operator of this leader must hear of it, not only the follower.
    async fn diverged(&self, request: &PullRequest, leader_checksum: Option<u64>) -> PullError {
        let leader_latest_seq = match self.latest_seq().await {
            Ok(seq) => seq,
            Err(e) => return e.into(),
        };
        let divergence = Divergence {
            position: request.after,
            checksum: request.after_checksum,
            leader_latest_seq,
            leader_checksum,
        };
        tracing::warn!(library = %self.id(), %divergence, "refused a pull from another history");
        PullError::HistoryDiverged(divergence)
    }

    /// Up to `limit` entries after `after`, then the latest seq: read once for every pull
    /// that asks for the same range in the same round (`coalesce`). A crowd of followers
    /// told of the same new entry asks for the same range at once.
    async fn read_for_pull(
        &self,
        after: Seq,
        limit: u64,
    ) -> Result<(Arc<Vec<LogEntry>>, Seq), LogError> {
        let library = self.clone();
        let read = move |ranges: Vec<(Seq, u64)>| {
            let library = library.clone();
            async move {
                let mut reads = Vec::with_capacity(ranges.len());
                for (after, limit) in ranges {
                    reads.push(((after, limit), library.read_log(after, limit).await));
                }
                // Once per round, after the ranges, as each pull read it before.
                let latest = library.latest_seq().await.map_err(Arc::new);
                reads
                    .into_iter()
                    .map(|(range, read)| {
                        let value = match (read, &latest) {
                            (Ok(entries), Ok(latest)) => Ok((Arc::new(entries), *latest)),
                            (Err(e), _) => Err(Arc::new(e)),
                            (Ok(_), Err(e)) => Err(Arc::clone(e)),
                        };
                        (range, value)
                    })
                    .collect()
            }
        };
        match self.pull_reads.get((after, limit), read).await {
            Some(Ok(read)) => Ok(read),
            Some(Err(e)) => Err(e.to_owned_error()),
            None => Err(LogError::Db(DbErr::Custom(
                "the leader dropped this pull's read; pull again".to_owned(),
            ))),
        }
    }
}
