//! Role views: the operations only a library's leader, or only its followers, can do are
//! reached through [`Library::leader`] and [`Library::follower`]. The role is checked
//! there, once, and a call for the wrong role gets one answer, [`WrongRole`]. A view
//! derefs to its [`Library`] for everything both roles do.
//!
//! Access is checked here too: a member with read access changes no synced data. Its own
//! writes are refused before they reach its database ([`refuse_read_access`], called by
//! the hooks and by the connection handle's statements), and the leader takes pushes only
//! from members with write access ([`may_push`]).

use std::sync::Arc;
use std::time::Duration;

use sea_orm::DbErr;

use crate::follow_loop::{Follow, FollowConfig};
use crate::follower::{Applied, ApplyError, Position, SyncError};
use crate::members::{Admission, Invite, InviteError, MemberError};
use crate::outbox::PushOutcome;
use crate::parked::{ParkError, Retried};
use crate::protocol::{PullError, PullRequest, PullResponse, PushError, PushRequest, PushResponse};
use crate::{Access, DeviceId, KeyFingerprint, Library, LibraryId, Role, Seq, Transport};

/// Refuses a write of synced model `model` on a device with read access to `library`.
pub(crate) fn refuse_read_access(
    read_only: bool,
    library: LibraryId,
    model: &str,
) -> Result<(), DbErr> {
    if read_only {
        return Err(crate::error::read_only(library, model));
    }
    Ok(())
}

/// Whether a device the leader admitted as `admission` may push; if not, why.
pub(crate) fn may_push(admission: Admission) -> Result<(), &'static str> {
    match admission {
        Admission::Member(Access::Write | Access::Leader) => Ok(()),
        Admission::Member(Access::Read) => Err("it has read access only"),
        Admission::Revoked(_) => Err("it was revoked"),
        Admission::NotMember => Err("it is not a member"),
    }
}

/// An operation for one role was asked of a library this device holds in the other.
#[derive(Copy, Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}", match wanted {
    Role::Leader => format!(
        "this device follows library {library}; `Library::leader` operations (serving, \
         invites, revocations) are for the device that leads it"
    ),
    Role::Follower => format!(
        "this device leads library {library}; `Library::follower` operations (pulling, \
         pushing, following, parking) are for the devices that follow it"
    ),
})]
pub struct WrongRole {
    /// The library.
    pub library: LibraryId,
    /// The role the operation needs.
    pub wanted: Role,
}

impl Library {
    /// This library as its leader: serving pulls and pushes, invites, revocations.
    /// [`WrongRole`] on a follower.
    pub fn leader(&self) -> Result<LeaderView, WrongRole> {
        match self.role() {
            Role::Leader => Ok(LeaderView(self.clone())),
            Role::Follower => Err(WrongRole {
                library: self.id(),
                wanted: Role::Leader,
            }),
        }
    }

    /// This library as a server sees it, whatever this device's role now: a server
    /// that keeps running while leadership moves holds it. Each request is checked against
    /// the leadership when it arrives: while this device does not lead, pulls and pushes
    /// are answered `Moved`, naming the leader (a device that handed leadership on still
    /// serves its log up to the move record), and invites are not redeemed
    /// (`InviteError::NotLeading`); once it leads, it serves.
    pub fn server_view(&self) -> LeaderView {
        LeaderView(self.clone())
    }

    /// This library as a follower: pulling, applying, pushing the outbox, the follow loop,
    /// parking. [`WrongRole`] on the leader.
    pub fn follower(&self) -> Result<FollowerView, WrongRole> {
        match self.role() {
            Role::Follower => Ok(FollowerView(self.clone())),
            Role::Leader => Err(WrongRole {
                library: self.id(),
                wanted: Role::Follower,
            }),
        }
    }
}

/// A library this device leads ([`Library::leader`]).
#[derive(Clone, Debug)]
pub struct LeaderView(Library);

/// A library this device follows ([`Library::follower`]).
#[derive(Clone, Debug)]
pub struct FollowerView(Library);

impl std::ops::Deref for LeaderView {
    type Target = Library;
    fn deref(&self) -> &Library {
        &self.0
    }
}

impl std::ops::Deref for FollowerView {
    type Target = Library;
    fn deref(&self) -> &Library {
        &self.0
    }
}

impl LeaderView {
    /// The library.
    pub fn library(&self) -> &Library {
        &self.0
    }

    /// Answers a follower's pull: the entries after its position, if its history is the
    /// leader's (`PullError::HistoryDiverged` otherwise), bounded, collapsed.
    pub async fn serve_pull(&self, request: &PullRequest) -> Result<PullResponse, PullError> {
        self.0.serve_pull(request).await
    }

    /// Takes a write member's push: each change once by identity, merged, logged; a change
    /// the leader cannot store is set aside and listed in the answer.
    pub async fn serve_push(&self, request: &PushRequest) -> Result<PushResponse, PushError> {
        self.0.serve_push(request).await
    }

    /// Issues a one-time invite with `access`, valid for `ttl`.
    pub async fn invite(&self, access: Access, ttl: Duration) -> Result<Invite, MemberError> {
        self.0.invite(access, ttl).await
    }

    /// Redeems an invite's secret for the device whose key has fingerprint `key` (the
    /// device id derives from it): admits it with the access issued, once. The member's
    /// key replicates to every member with the membership.
    pub async fn redeem_invite(
        &self,
        secret: &[u8; 32],
        claimed: Access,
        key: KeyFingerprint,
        name: Option<&str>,
    ) -> Result<Access, InviteError> {
        self.0.redeem_invite(secret, claimed, key, name).await
    }

    /// Revokes a member: nothing more is served to it.
    pub async fn revoke(&self, device: DeviceId) -> Result<(), MemberError> {
        self.0.revoke(device).await
    }

    /// Notes a follower's position (in memory; written in the background at most once a
    /// second).
    pub async fn record_peer_position(&self, device: DeviceId, position: Seq) -> Result<(), DbErr> {
        self.0.record_peer_position(device, position).await
    }

    /// Hands leadership to `to`, a write member whose key the membership holds, within
    /// `within`: stops sequencing (this device's writes go to its outbox, pushes are
    /// refused as `PushError::Moving`), waits until `to` shows the whole log (same seq and
    /// checksum), appends the taken marks and the signed move record (epoch + 1) as the
    /// last entries of this epoch, and waits until `to` has pulled them. This device then
    /// follows `to`. If `to` does not catch up in time nothing moves and this device
    /// sequences again ([`crate::HandOffError::NotCaughtUp`]).
    pub async fn hand_off(
        &self,
        to: DeviceId,
        within: Duration,
    ) -> Result<crate::HandOff, crate::HandOffError> {
        self.0.hand_off(to, within).await
    }

    /// On a device that has just become the leader (it applied the move record naming it,
    /// `Leadership::taking_over`): takes the log over from the old leader through `from`,
    /// then sequences. Nothing to do otherwise. A follow loop does this by itself.
    pub async fn take_over(&self, from: &dyn Transport) -> Result<(), crate::SyncError> {
        if self.0.leadership().taking_over {
            self.0.take_over(from).await?;
        }
        Ok(())
    }

    /// Writes every noted follower position now.
    pub async fn flush_peer_positions(&self) -> Result<(), DbErr> {
        self.0.flush_peer_positions().await
    }
}

impl FollowerView {
    /// The library.
    pub fn library(&self) -> &Library {
        &self.0
    }

    /// Applies a pull response that answers a request from `after`, with the new position,
    /// in one transaction: all of it or none of it, exactly once.
    pub async fn apply(&self, after: Seq, response: PullResponse) -> Result<Applied, ApplyError> {
        self.0.apply(after, response).await
    }

    /// Applies consecutive pull responses, the first answering a request from `after`;
    /// responses share a transaction up to `APPLY_GROUP_ENTRIES` entries.
    pub async fn apply_all<I>(&self, after: Seq, responses: I) -> Result<Applied, ApplyError>
    where
        I: IntoIterator<Item = PullResponse>,
        I::IntoIter: Send,
    {
        self.0.apply_all(after, responses).await
    }

    /// Pulls one batch of at most `limit` entries and applies it. Returns what was applied
    /// and the leader's latest seq.
    pub async fn pull_once(
        &self,
        transport: &dyn Transport,
        limit: u32,
    ) -> Result<(Applied, Seq), SyncError> {
        self.0.pull_once(transport, limit).await
    }

    /// Pulls and applies until the position reaches the leader's latest seq as of the
    /// first answer.
    pub async fn catch_up(
        &self,
        transport: &dyn Transport,
        limit: u32,
    ) -> Result<Position, SyncError> {
        self.0.catch_up(transport, limit).await
    }

    /// [`FollowerView::catch_up`], calling `progress(applied, target)` after each
    /// transaction.
    pub async fn catch_up_with(
        &self,
        transport: &dyn Transport,
        limit: u32,
        progress: impl FnMut(&Applied, Seq),
    ) -> Result<Position, SyncError> {
        self.0.catch_up_with(transport, limit, progress).await
    }

    /// Sends the outbox to the leader until it is empty (as of the start).
    pub async fn push_outbox(&self, transport: &dyn Transport) -> Result<PushOutcome, SyncError> {
        self.0.push_outbox(transport).await
    }

    /// One sync round: push the outbox (unless read-only), then pull until caught up,
    /// calling `progress(applied, target)` after each transaction. A failed push does not
    /// stop the pull; the pull's error comes first, then the push's. Returns the position
    /// and the leader's latest seq as of the first answer.
    pub async fn sync_round(
        &self,
        transport: &dyn Transport,
        limit: u32,
        progress: impl FnMut(&Applied, Seq),
    ) -> Result<(Position, Seq), SyncError> {
        self.0.sync_round(transport, limit, progress).await
    }

    /// Starts this follower's follow loop over `transport`.
    pub fn start_following(&self, transport: Arc<dyn Transport>, config: FollowConfig) -> Follow {
        self.0.start_following(transport, config)
    }

    /// Sets the entry at `seq` aside (`ApplyError::Stuck` names it): the next apply that
    /// reaches it parks it, and later entries of its record wait behind it.
    pub async fn park(&self, seq: Seq) -> Result<(), ParkError> {
        self.0.park(seq).await
    }

    /// Applies the parked entries again, in seq order.
    pub async fn retry_parked(&self) -> Result<Retried, ApplyError> {
        self.0.retry_parked().await
    }

    /// Promotes this write member to leader of the next epoch, for a leader that is gone
    /// (see ARCHITECTURE.md, *Failover*): asks `members` (transports to the other members,
    /// not the lost leader) for their votes — a majority of the write members, the lost
    /// leader counted as absent, unless `options.force` — fetches from them the entries of
    /// the old epoch they hold beyond this device's, then logs a signed move record of
    /// promotion kind and leads. [`crate::Promotion::lost`] says what only the lost leader
    /// held.
    pub async fn promote(
        &self,
        members: &[&dyn Transport],
        options: crate::PromoteOptions,
    ) -> Result<crate::Promotion, crate::PromoteError> {
        self.0.promote(members, options).await
    }

    /// Forgets a parked entry for good. Returns whether it was parked.
    pub async fn drop_parked(&self, seq: Seq) -> Result<bool, DbErr> {
        self.0.drop_parked(seq).await
    }

    /// Makes this follower a full copy of the log up to its position: every run it holds
    /// no entries of (left out by its pulls, or applied before it kept its log; see
    /// `Library::held_log_gaps`) is pulled in full from the leader, checked against the
    /// chain it holds, and stored. Returns the entries stored. `audit` needs it on a
    /// follower that applied entries before it kept them (`LogError::LogKeptOnlyAfter`).
    pub async fn fill_held_log(&self, transport: &dyn Transport) -> Result<u64, SyncError> {
        self.0.fill_held_log(transport).await
    }
}
