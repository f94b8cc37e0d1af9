//! Offline-first sync for SeaORM applications: a leader-follower replication log.
//!
//! Put `#[derive(Syncable)]` beside `DeriveEntityModel` on a model, write through
//! [`Library::transaction`], and every change lands in the library's sequenced log in the
//! same transaction as the write.
//!
//! ```text
//! use sea_orm::entity::prelude::*;
//!
//! #[derive(Clone, Debug, PartialEq, DeriveEntityModel, sync_core::Syncable)]
//! #[sea_orm(table_name = "tag")]
//! pub struct Model {
//!     #[sea_orm(primary_key, auto_increment = false)]
//!     pub id: Uuid,
//!     pub name: String,
//! }
//! // No `impl ActiveModelBehavior`: the derive wires the capture hooks.
//!
//! library.transaction(|txn| Box::pin(async move {
//!     ActiveModel { name: Set("holiday".into()), ..Default::default() }.insert(txn).await?;
//!     Ok::<_, DbErr>(())
//! })).await?;
//! ```
#![warn(missing_docs)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

mod adopt;
mod backend;
mod canonical;
mod capture;
mod cascade;
mod commits;
mod conflicts;
mod connection;
mod crowd;
mod decide;
mod entry;
mod error;
mod follow_loop;
mod follower;
mod handoff;
mod held;
mod hlc;
mod identity;
mod ids;
mod in_process;
mod leadership;
mod library;
mod limits;
mod members;
mod merge;
pub mod metrics;
mod outbox;
mod parked;
mod peers;
mod promote;
mod protocol;
mod registry;
mod rewind;
mod roles;
mod serve;
mod syncable;
mod tables;
mod take;

/// The hooks `#[derive(Syncable)]` wires into `ActiveModelBehavior`. Call them from your own
/// `impl ActiveModelBehavior` when the model says `#[sync(custom_behavior)]`.
pub mod hooks {
    pub use crate::capture::{after_delete, after_save, before_delete, before_save};
}

pub use adopt::seed_key;
pub use commits::CommitWatcher;
pub use conflicts::{Conflict, Resolution, ResolveError};
pub use connection::{SyncConnection, SyncTransaction};
pub use entry::{ChainError, ChangeOp, LogEntry, verify_chain};
pub use error::{LogError, OpenError, WriteRefusal};
pub use follow_loop::{
    ChangesApplied, Follow, FollowConfig, FollowState, FollowStatus, RefusedFor,
};
pub use follower::{APPLY_GROUP_ENTRIES, Applied, ApplyError, PULLS_AHEAD, Position, SyncError};
pub use handoff::{HandOff, HandOffError};
pub use held::SkippedRun;
pub use hlc::{Hlc, HlcClock, WallClock};
pub use identity::{BadFingerprint, DeviceKey, KeyError, KeyFingerprint, verify_signature};
pub use ids::{DeviceId, Epoch, LibraryId, Seq};
pub use in_process::{InProcess, InProcessMember};
pub use leadership::{
    INVITE_MODEL, LEADER_MODEL, Leadership, MEMBER_MODEL, MemberRecord, MoveKind, MoveRecord,
    MoveTerms, PEER_MODEL, REJECTED_MODEL, RESERVED_MODEL_PREFIX, RESERVED_SCHEMA_VERSION,
    TAKEN_MODEL, is_reserved_model,
};
pub use library::{Drift, DriftKind, LatestSeq, Library, Role, Status, TxnFuture};
pub use members::{Access, Admission, Invite, InviteError, Member, MemberError};
pub use outbox::PushOutcome;
pub use parked::{ParkError, Parked, Retried};
pub use promote::{PromoteError, PromoteOptions, Promotion};
pub use protocol::{
    Divergence, LeaderMoved, PROTOCOL_VERSION, PULL_BYTES_MAX, PULL_ENTRIES_MAX, PUSH_BYTES_MAX,
    PUSH_CHANGES_MAX, PullError, PullRequest, PullResponse, PulledItem, PushError, PushRequest,
    PushResponse, PushedChange, RECORD_BYTES_MAX, Refused, RejectedChange, Transport, VoteError,
    VoteRefusal, VoteRequest, VoteResponse,
};
pub use registry::{DuplicateSyncId, ModelRows, Registry};
pub use rewind::{Rewind, RewindError, RewoundEntry};
pub use roles::{FollowerView, LeaderView, WrongRole};
pub use sync_derive::Syncable;
pub use syncable::{FieldMerge, FieldSpec, MergeRule, Syncable, find_by_key, key_column};
pub use take::Rejected;

/// Items the derive's generated code names. Not part of the public API.
#[doc(hidden)]
pub mod __private {
    pub use async_trait;
    pub use sea_orm;
    pub use serde;
    pub use serde_json;
    pub use uuid;

    pub use crate::syncable::decode_upsert_via_map;

    /// `deserialize_with` for the derive's decoder: a field that must be present, also
    /// when its type is an `Option` (which serde would otherwise fill with `None`).
    pub fn required<'de, D, T>(deserializer: D) -> Result<T, D::Error>
    where
        D: serde::Deserializer<'de>,
        T: serde::Deserialize<'de>,
    {
        T::deserialize(deserializer)
    }
}
