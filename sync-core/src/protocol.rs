//! The pull protocol: what a follower asks the leader and what it gets back. Transport-
//! agnostic: sync-transport carries these over QUIC; tests call the leader in process.

use serde::{Deserialize, Serialize};

use crate::{ChangeOp, DeviceId, Epoch, Hlc, KeyFingerprint, LibraryId, LogEntry, Position, Seq};

/// The protocol this build speaks. A peer speaking another version is refused, not misread.
///
/// 3: requests and answers state their epoch, and logs hold sync-core's reserved entries
/// (`sync.member`, `sync.leader`), which a build speaking 2 would take for an unknown
/// app model.
pub const PROTOCOL_VERSION: u32 = 3;

/// Entries per pull response, whatever the follower asks for: bounds the leader's memory
/// per request and the follower's per batch.
pub const PULL_ENTRIES_MAX: u32 = 5_000;

/// Bytes of entry payload per pull response (a response holds at least one entry, however
/// large): keeps frames well under the transport's frame limit.
pub const PULL_BYTES_MAX: u32 = 4 * 1024 * 1024;

pub use crate::limits::RECORD_BYTES_MAX;

/// A follower asks for the entries after `after`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PullRequest {
    /// The follower's `PROTOCOL_VERSION`.
    pub protocol_version: u32,
    /// The library the request is about.
    pub library_id: LibraryId,
    /// The follower's position: it has everything up to here.
    pub after: Seq,
    /// The log's rolling checksum at `after` as the follower holds it (0 at `Seq::ZERO`).
    /// The leader serves only a follower whose history is its own: it refuses with
    /// [`PullError::HistoryDiverged`] when its log does not reach `after` or has another
    /// checksum there.
    #[serde(default)]
    pub after_checksum: u64,
    /// At most this many entries (clamped to `PULL_ENTRIES_MAX`).
    pub limit: u32,
    /// At most about this many payload bytes (clamped to `PULL_BYTES_MAX`).
    pub max_bytes: u32,
    /// Only these models (selective sync); `None` for all. sync-core's reserved entries
    /// (membership, move records) are served whatever the request names.
    pub models: Option<Vec<String>>,
    /// The epoch the follower knows (`Epoch::UNSTATED`: none yet). A leader whose own epoch
    /// is older has been replaced: it refuses with [`PullError::Superseded`].
    #[serde(default)]
    pub epoch: Epoch,
    /// The device asking, as it says (over QUIC the server puts the authenticated device
    /// here): a leader handing off learns from it where its target stands.
    #[serde(default)]
    pub device: Option<DeviceId>,
    /// Every entry as it is logged: nothing collapsed, every model (a new leader taking
    /// over the log it must serve).
    #[serde(default)]
    pub full: bool,
    /// Where the asking device serves the library should it lead (its server processes'
    /// addresses, `host:port`): a leader handing off to it names them in the move record.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub serves_at: Vec<String>,
}

impl PullRequest {
    /// A request for everything after `position`, with the protocol's bounds.
    pub fn from_position(library_id: LibraryId, position: Position) -> PullRequest {
        PullRequest {
            protocol_version: PROTOCOL_VERSION,
            library_id,
            after: position.seq,
            after_checksum: position.checksum,
            limit: PULL_ENTRIES_MAX,
            max_bytes: PULL_BYTES_MAX,
            models: None,
            epoch: Epoch::UNSTATED,
            device: None,
            full: false,
            serves_at: Vec::new(),
        }
    }

    /// The same request, stating the epoch the follower knows.
    pub fn with_epoch(mut self, epoch: Epoch) -> PullRequest {
        self.epoch = epoch;
        self
    }

    /// A request for everything after `after`, stating checksum 0: right for `Seq::ZERO`
    /// (the whole log); a later seq needs its checksum ([`PullRequest::from_position`]),
    /// or the leader refuses it as another history.
    pub fn after(library_id: LibraryId, after: Seq) -> PullRequest {
        PullRequest::from_position(
            library_id,
            Position {
                seq: after,
                checksum: 0,
            },
        )
    }
}

/// One item of a pull response, in seq order. Externally tagged (`{"entry": {…}}`): an
/// internally tagged item would be buffered and parsed twice.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PulledItem {
    /// An entry to apply.
    Entry(LogEntry),
    /// Entries up to `through` the follower needs not apply: of models it did not ask for,
    /// or superseded by a later entry of this response for the same record. `checksum` is
    /// the log's rolling checksum at `through`.
    Skipped {
        /// The last seq skipped.
        through: Seq,
        /// The rolling checksum at `through`.
        checksum: u64,
    },
}

impl PulledItem {
    /// The last seq this item covers.
    pub fn last_seq(&self) -> Seq {
        match self {
            PulledItem::Entry(entry) => entry.seq,
            PulledItem::Skipped { through, .. } => *through,
        }
    }
}

/// The leader's answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PullResponse {
    /// The leader's `PROTOCOL_VERSION`.
    pub protocol_version: u32,
    /// The library.
    pub library_id: LibraryId,
    /// The entries after the request's `after`, contiguous, in seq order.
    pub items: Vec<PulledItem>,
    /// The leader's latest seq when it answered: the follower is caught up once its
    /// position reaches it.
    pub latest_seq: Seq,
    /// The epoch the leader leads in. A follower that knows a newer one refuses the answer
    /// ([`PullError::StaleEpoch`]).
    #[serde(default)]
    pub epoch: Epoch,
}

impl PullResponse {
    /// The seq the follower has everything up to once it applied this response.
    pub fn through(&self, after: Seq) -> Seq {
        self.items.last().map_or(after, PulledItem::last_seq)
    }

    /// The position the follower reaches once it applied this response from `from`
    /// (the next request's, when pulling ahead of applying).
    pub fn end(&self, from: Position) -> Position {
        match self.items.last() {
            None => from,
            Some(PulledItem::Entry(entry)) => Position {
                seq: entry.seq,
                checksum: entry.checksum,
            },
            Some(PulledItem::Skipped { through, checksum }) => Position {
                seq: *through,
                checksum: *checksum,
            },
        }
    }
}

/// How a follower's history and its leader's log differ: the leader does not hold the
/// follower's position, or holds another entry there.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Divergence {
    /// The follower's position.
    pub position: Seq,
    /// The follower's checksum at `position`.
    pub checksum: u64,
    /// The leader's latest seq.
    pub leader_latest_seq: Seq,
    /// The leader's checksum at `position`; `None` when its log ends before it.
    pub leader_checksum: Option<u64>,
}

impl std::fmt::Display for Divergence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.leader_checksum {
            None => write!(
                f,
                "the leader's log ends at seq {}, but this follower has applied up to seq {}: \
                 the leader lost entries this follower has",
                self.leader_latest_seq, self.position
            )?,
            Some(theirs) => write!(
                f,
                "the leader's log differs from this follower's at seq {} (the leader's \
                 checksum there is {theirs:016x}, this follower's {:016x}; the leader's log \
                 ends at seq {})",
                self.position, self.checksum, self.leader_latest_seq
            )?,
        }
        f.write_str(
            ". The leader's database was probably restored from an older copy, or holds \
             another history of this library. This follower stops rather than apply a \
             history that is not its own. Taking the missing entries back from the \
             followers that have them is leadership work, not built yet: restore the \
             leader's newest database, or join this device again with a fresh database",
        )
    }
}

/// Why a pull was refused or failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PullError {
    /// The two sides speak different protocol versions.
    #[error(
        "protocol version mismatch: this side speaks {ours}, the peer speaks {theirs}; \
         update the older app so both run the same sync protocol"
    )]
    VersionMismatch {
        /// Ours.
        ours: u32,
        /// The peer's.
        theirs: u32,
    },
    /// The request names a library this leader does not lead.
    #[error("this device does not lead library {0}")]
    NotLeader(LibraryId),
    /// The leader claims entries up to `latest` but sends none after `position`.
    #[error(
        "the leader reports entries up to seq {latest} but sent none after seq {position}; its log may be damaged"
    )]
    Stalled {
        /// This follower's position.
        position: crate::Seq,
        /// What the leader claims.
        latest: crate::Seq,
    },
    /// The leader's log is not this follower's history: it does not reach the
    /// follower's position (a leader restored from an older copy), or has another entry
    /// there. Nothing is served; pulling again gets the same answer.
    #[error("{0}")]
    HistoryDiverged(Divergence),
    /// Reading the log failed.
    #[error(transparent)]
    Log(#[from] crate::LogError),
    /// The answer came from an older epoch than this follower knows: from a leader that
    /// has been replaced. Nothing of it is used.
    #[error(
        "the leader answered from epoch {answered}, but this device knows epoch {known}: that \
         leader has been replaced, and nothing it sends is used; follow the current leader"
    )]
    StaleEpoch {
        /// The epoch this device knows.
        known: Epoch,
        /// The epoch the answer stated.
        answered: Epoch,
    },
    /// This device was asked as the leader, but a newer epoch exists: it has been replaced
    /// and serves and sequences nothing more.
    #[error(
        "this device no longer leads the library: a member stated epoch {epoch}, newer than \
         its own; follow the current leader"
    )]
    Superseded {
        /// The newer epoch.
        epoch: Epoch,
    },
    /// The device asked handed leadership on: it serves its log only up to the move
    /// record. Pull from the new leader.
    #[error(
        "leadership of this library moved to device {leader} (epoch {epoch}{}); pull from it",
        if addresses.is_empty() { String::new() } else { format!(", at {}", addresses.join(", ")) }
    )]
    Moved {
        /// The epoch the move began.
        epoch: Epoch,
        /// The new leader.
        leader: DeviceId,
        /// Where it listens, as far as known.
        addresses: Vec<String>,
    },
    /// The leader refused this device: retrying the same request cannot help.
    #[error("{message}")]
    Refused {
        /// Why.
        kind: Refused,
        /// The leader's (or the transport's) explanation.
        message: String,
    },
    /// The transport failed: the leader is unreachable or the connection was lost.
    #[error("transport: {0}")]
    Transport(String),
}

/// Why a leader refused a device, as a transport reports it: each is something retrying
/// cannot fix (the follow loop stops retrying and says which).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Refused {
    /// The leader revoked this device's membership: a new invite is needed.
    Revoked,
    /// This device is not a member of the library.
    NotMember,
    /// This device has read access and pushed.
    ReadOnly,
    /// The device at the leader's address is not the pinned leader.
    WrongLeader,
    /// The leader does not lead this library.
    UnknownLibrary,
    /// The two sides speak different protocol versions.
    ProtocolVersion,
    /// A change is of a model the other side does not know, or of another schema version.
    SchemaVersion,
    /// The answer came from an older epoch than this device knows (a replaced leader).
    StaleEpoch,
    /// The device asked no longer leads: a newer epoch exists.
    Superseded,
}

/// Changes per push request: bounds the leader's transaction and the frame.
pub const PUSH_CHANGES_MAX: usize = 500;

/// Bytes of change payload per push request (a request holds at least one change, however
/// large): keeps frames well under the transport's frame limit.
pub const PUSH_BYTES_MAX: usize = 4 * 1024 * 1024;

/// A follower's own change, from its outbox, as it asks the leader to sequence it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushedChange {
    /// The outbox id: orders the device's changes within a push (ascending). A database
    /// restored from a backup may use an id again, so it never identifies a change.
    pub id: u64,
    /// The change's identity (UUID v7), made when it was written and kept through
    /// restores and copies of the database: the leader takes each identity once.
    pub change_id: uuid::Uuid,
    /// The model's sync id.
    pub model: String,
    /// The record's key, as text.
    pub record_id: String,
    /// Upsert or delete.
    pub op: ChangeOp,
    /// The synced fields after the write (canonical JSON); `None` for deletes.
    pub data: Option<String>,
    /// The synced fields the write set.
    pub changed: Vec<String>,
    /// When the follower made it, by its clock.
    pub hlc: Hlc,
    /// The model's schema version on the follower.
    pub schema_version: u32,
    /// What it was based on: the follower's position when it wrote. Entries of other
    /// devices after this seq are concurrent with it.
    pub base: Seq,
}

/// A follower asks the leader to sequence its outbox's oldest changes, in id order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushRequest {
    /// The follower's `PROTOCOL_VERSION`.
    pub protocol_version: u32,
    /// The library.
    pub library_id: LibraryId,
    /// The pushing device (over QUIC it must be the authenticated peer).
    pub device_id: DeviceId,
    /// At most `PUSH_CHANGES_MAX` changes, by ascending id.
    pub changes: Vec<PushedChange>,
    /// The epoch the follower knows (`Epoch::UNSTATED`: none yet), as in a pull.
    #[serde(default)]
    pub epoch: Epoch,
}

/// The leader's acknowledgement: every change of the request is taken — sequenced, merged
/// away, recognised as taken before, or rejected and set aside (listed in `rejected`) —
/// and may leave the outbox.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushResponse {
    /// The leader's `PROTOCOL_VERSION`.
    pub protocol_version: u32,
    /// The library.
    pub library_id: LibraryId,
    /// Changes of the request taken now (not taken by an earlier push).
    pub taken: u64,
    /// Changes of the request the leader had taken before (a repeated push).
    pub already_taken: u64,
    /// Changes of the request the leader could not store: set aside, with the reason.
    pub rejected: Vec<RejectedChange>,
    /// The leader's latest seq after taking them.
    pub latest_seq: Seq,
    /// The epoch the leader took them in. A follower that knows a newer one does not take
    /// the acknowledgement: its changes stay in its outbox for the current leader.
    #[serde(default)]
    pub epoch: Epoch,
}

/// A pushed change the leader could not store (its database refused the value, a
/// constraint failed, the payload does not fit its model). It is recorded on the leader and
/// on its author; the record itself converges to the leader's state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RejectedChange {
    /// The change's identity.
    pub change_id: uuid::Uuid,
    /// Its model.
    pub model: String,
    /// Its record.
    pub record_id: String,
    /// Why the leader could not store it.
    pub reason: String,
}

/// Why a push was refused or failed. Nothing of a refused push is sequenced.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PushError {
    /// The two sides speak different protocol versions.
    #[error(
        "protocol version mismatch: this side speaks {ours}, the peer speaks {theirs}; \
         update the older app so both run the same sync protocol"
    )]
    VersionMismatch {
        /// Ours.
        ours: u32,
        /// The peer's.
        theirs: u32,
    },
    /// The request names a library this device does not lead.
    #[error("this device does not lead library {0}")]
    NotLeader(LibraryId),
    /// The device may not write to the library.
    #[error(
        "device {device} may not write to library {library}: {reason}; ask the leader for \
         an invite with write access"
    )]
    NotWriter {
        /// The device.
        device: DeviceId,
        /// The library.
        library: LibraryId,
        /// Read-only, revoked or not a member.
        reason: String,
    },
    /// A change cannot be taken as it is: unknown model, other schema version, bad payload.
    #[error("change {id} of `{model}` refused: {reason}")]
    BadChange {
        /// The outbox id.
        id: u64,
        /// Its model.
        model: String,
        /// What is wrong and what to do.
        reason: String,
    },
    /// The leader's database failed.
    #[error("database error on the leader: {0}")]
    Db(#[from] sea_orm::DbErr),
    /// The leader's log could not be read.
    #[error(transparent)]
    Log(#[from] crate::LogError),
    /// The acknowledgement came from an older epoch than this follower knows: the changes
    /// stay in the outbox, for the current leader.
    #[error(
        "the leader acknowledged from epoch {answered}, but this device knows epoch {known}: \
         that leader has been replaced; the changes stay in the outbox for the current leader"
    )]
    StaleEpoch {
        /// The epoch this device knows.
        known: Epoch,
        /// The epoch the answer stated.
        answered: Epoch,
    },
    /// This device was asked as the leader, but a newer epoch exists.
    #[error(
        "this device no longer leads the library: a member stated epoch {epoch}, newer than \
         its own; push to the current leader"
    )]
    Superseded {
        /// The newer epoch.
        epoch: Epoch,
    },
    /// The leader is handing leadership on and takes no push meanwhile: push again soon
    /// (to the new leader once the move is pulled). Nothing of the push was taken.
    #[error(
        "the leader is handing leadership to device {to} and takes no push meanwhile; the \
         changes stay in the outbox and are pushed again"
    )]
    Moving {
        /// The device taking over.
        to: DeviceId,
    },
    /// The device asked handed leadership on: push to the new leader.
    #[error("leadership of this library moved to device {leader} (epoch {epoch}); push to it")]
    Moved {
        /// The epoch the move began.
        epoch: Epoch,
        /// The new leader.
        leader: DeviceId,
    },
    /// The leader refused this device: retrying the same request cannot help.
    #[error("{message}")]
    Refused {
        /// Why.
        kind: Refused,
        /// The leader's (or the transport's) explanation.
        message: String,
    },
    /// The transport failed or cannot push.
    #[error("transport: {0}")]
    Transport(String),
}

/// A write member asks another member to vote for its promotion to leader of `epoch`
/// (see ARCHITECTURE.md, *Failover*).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VoteRequest {
    /// The candidate's `PROTOCOL_VERSION`.
    pub protocol_version: u32,
    /// The library.
    pub library_id: LibraryId,
    /// The epoch the candidate would start.
    pub epoch: Epoch,
    /// The candidate (over QUIC it must be the authenticated peer).
    pub candidate: DeviceId,
}

/// A member's answer to a vote request: granted or refused, and what it holds, so the
/// candidate knows whom to fetch missing entries from and what the lost leader announced.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VoteResponse {
    /// The library.
    pub library_id: LibraryId,
    /// The member that answered.
    pub voter: DeviceId,
    /// Why the vote was refused; `None`: granted (and stored before this answer).
    pub refused: Option<VoteRefusal>,
    /// The epoch the member knows.
    pub epoch: Epoch,
    /// The end of the log the member holds (a verified prefix of the old epoch's chain).
    pub held: Position,
    /// The highest latest seq the member saw its leader announce.
    pub latest_seen: Seq,
}

/// Why a vote is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[non_exhaustive]
pub enum VoteRefusal {
    /// The voter already knows an epoch at least as new as the one asked for.
    #[error("the member knows epoch {known}; a promotion must start a newer one")]
    EpochNotNewer {
        /// The epoch it knows.
        known: Epoch,
    },
    /// The voter voted for another candidate in that epoch.
    #[error("the member voted for device {0} in that epoch")]
    VotedForAnother(DeviceId),
    /// The candidate may not lead.
    #[error("the candidate is not a write member in this member's membership")]
    CandidateMayNotLead,
    /// The voter leads the library and is alive.
    #[error("the member asked leads the library itself and is reachable: it was not lost")]
    LeaderIsAlive,
    /// The voter does not hold the library.
    #[error("the member asked does not hold this library")]
    UnknownLibrary,
}

/// Why a vote request got no answer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VoteError {
    /// The member's database failed.
    #[error("database error on the member: {0}")]
    Db(#[from] sea_orm::DbErr),
    /// The transport failed or cannot carry votes.
    #[error("transport: {0}")]
    Transport(String),
}

/// Where a library's leader is now, as a follower learnt it (a move record it applied, or
/// a `Moved` answer): the follow loop hands it to its transport
/// ([`Transport::leader_moved`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaderMoved {
    /// The library.
    pub library_id: LibraryId,
    /// The epoch the leader leads in, as far as known.
    pub epoch: Epoch,
    /// The leader.
    pub leader: DeviceId,
    /// Its key fingerprint, from the replicated membership: pin it from now on.
    pub key: KeyFingerprint,
    /// Where it listens (`host:port`), from the move record, the membership or the answer.
    pub addresses: Vec<String>,
}

/// Carries pull requests to a leader. sync-transport implements it over QUIC;
/// `InProcess` (`in_process.rs`) calls a leader `Library` directly.
#[async_trait::async_trait]
pub trait Transport: Send + Sync {
    /// Sends `request` and waits for the answer.
    async fn pull(&self, request: PullRequest) -> Result<PullResponse, PullError>;

    /// Sends a follower's outbox changes to the leader and waits for its acknowledgement.
    /// Transports that only pull refuse.
    async fn push(&self, request: PushRequest) -> Result<PushResponse, PushError> {
        let _ = request;
        Err(PushError::Transport(
            "this transport does not carry pushes".into(),
        ))
    }

    /// Asks the member at the other end to vote for a promotion (member to member).
    /// Transports that do not carry votes refuse.
    async fn vote(&self, request: VoteRequest) -> Result<VoteResponse, VoteError> {
        let _ = request;
        Err(VoteError::Transport(
            "this transport does not carry votes".into(),
        ))
    }

    /// Completes when the leader announces news (a new latest seq, or that something
    /// changed about the session): the follow loop then pulls at once instead of waiting
    /// for its next poll. Transports without announcements never complete.
    async fn news(&self) {
        std::future::pending::<()>().await;
    }

    /// The library's leader moved: point at `to` from now on (its key, its addresses).
    /// Returns whether the transport now does; one that cannot re-point (the default, and
    /// `InProcess`, which holds one leader) returns false, and the follow loop reports the
    /// move as a refusal (`RefusedFor::Moved`) for the app to act on.
    async fn leader_moved(&self, to: &LeaderMoved) -> bool {
        let _ = to;
        false
    }
}
