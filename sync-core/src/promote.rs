//! Promotion after a lost leader (issue 13 part 3): a write member asks the other members
//! for their votes (`decide::promote`: a majority of the write members, each voting once
//! per epoch; or `force`), fetches from those that answered the entries of the old epoch
//! they hold beyond its own (the furthest verified prefix), reports what only the lost
//! leader held, and starts the next epoch with a signed move record of promotion kind.
//! Members answer votes here too (`Library::answer_vote`), and serve the log they hold
//! (`Library::serve_held_pull`) so that a candidate can fetch from them.

use std::sync::atomic::Ordering;

use sea_orm::sea_query::Expr;
use sea_orm::{ColumnTrait, DbErr, EntityTrait, QueryFilter};

use crate::decide::promote::{self as decide_promote, Ballot, Elector, PromoteRefusal, VoterState};
use crate::follower::Position;
use crate::leadership::{LEADER_MODEL, MoveKind, MoveRecord, MoveTerms, parse_addresses};
use crate::library::{committed_tip, get_local_value, read_log, set_local_value};
use crate::protocol::{
    PROTOCOL_VERSION, PULL_ENTRIES_MAX, PullError, PullRequest, PullResponse, PulledItem,
    Transport, VoteError, VoteRefusal, VoteRequest, VoteResponse,
};
use crate::tables::{device, library};
use crate::{Access, ChangeOp, DeviceId, Epoch, Library, LibraryId, LogEntry, Role, Seq};

/// How to promote.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PromoteOptions {
    /// Start the epoch without a majority of the write members' votes. A person's explicit
    /// act for when too few members are reachable: recorded as forced in the move record.
    /// If the old leader is in fact alive, or another member is promoted meanwhile, two
    /// leaders exist until one learns of the other; the lower one then rewinds.
    pub force: bool,
}

/// What a promotion did.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Promotion {
    /// The epoch this device now leads.
    pub epoch: Epoch,
    /// The device that led before (now counted as lost).
    pub replaced: DeviceId,
    /// The seq of the move record.
    pub record_seq: Seq,
    /// The write members (the lost leader included).
    pub electorate: usize,
    /// Votes needed.
    pub needed: usize,
    /// Votes granted, this device's own included.
    pub granted: usize,
    /// Promoted without a majority.
    pub forced: bool,
    /// Members that answered (granted or not).
    pub answered: Vec<DeviceId>,
    /// Members asked that did not answer, with why.
    pub unreachable: Vec<String>,
    /// Members that refused, with why.
    pub refused: Vec<(DeviceId, VoteRefusal)>,
    /// Entries fetched from other members before the epoch began.
    pub fetched: u64,
    /// The seqs only the lost leader held, as far as the members that answered know (the
    /// furthest held, up to the highest latest seq any of them saw announced).
    pub lost: Option<(Seq, Seq)>,
    /// Runs of the old epoch's log this device holds no entries of (left out by its pulls
    /// as superseded) and no member it asked could fill: followers behind one of them
    /// cannot be served across it (they join again).
    pub gaps: usize,
}

/// Why a promotion did not happen.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PromoteError {
    /// This device may not be promoted, or too few members voted for it.
    #[error("promotion refused: {reason}")]
    Refused {
        /// Why.
        reason: String,
        /// Members asked that did not answer, with why.
        unreachable: Vec<String>,
        /// Members that refused, with why.
        refused: Vec<(DeviceId, VoteRefusal)>,
    },
    /// This device voted for another candidate in the epoch it would start.
    #[error(
        "this device voted for device {0} to lead the next epoch; it cannot promote itself in \
         the same epoch"
    )]
    VotedForAnother(DeviceId),
    /// Fetching the missing entries from a member failed.
    #[error("fetching the old epoch's entries from device {device} failed: {source}")]
    Fetch {
        /// The member.
        device: DeviceId,
        /// Why.
        source: crate::SyncError,
    },
    /// The key could not sign.
    #[error(transparent)]
    Key(#[from] crate::KeyError),
    /// The log could not be read.
    #[error(transparent)]
    Log(#[from] crate::LogError),
    /// The database failed.
    #[error("database error: {0}")]
    Db(#[from] DbErr),
}

/// The `sync_local` key of this device's vote in `epoch`.
fn vote_key(library_id: LibraryId, epoch: Epoch) -> String {
    format!("vote.{library_id}.{epoch}")
}

impl Library {
    /// Promotes this write-role follower to leader of the next epoch (see
    /// [`crate::FollowerView::promote`]).
    pub(crate) async fn promote(
        &self,
        members: &[&dyn Transport],
        options: PromoteOptions,
    ) -> Result<Promotion, PromoteError> {
        let current = self.leadership();
        let epoch = current.epoch.max(Epoch::FIRST).next();
        let me = self.device_id();
        let electors = self.electors().await?;
        let refuse = |reason: String| PromoteError::Refused {
            reason,
            unreachable: Vec::new(),
            refused: Vec::new(),
        };
        // Is this device a candidate at all (before asking anyone)?
        if let Err(e @ PromoteRefusal::NotWriteMember(_) | e @ PromoteRefusal::LeadsAlready(_)) =
            decide_promote::tally(&electors, current.leader, me, &[], true)
        {
            return Err(refuse(e.to_string()));
        }
        // Its own vote, stored first: it votes for no other candidate in this epoch.
        self.cast_vote(epoch, me)
            .await?
            .map_or(Ok(()), |other| Err(PromoteError::VotedForAnother(other)))?;

        let request = VoteRequest {
            protocol_version: PROTOCOL_VERSION,
            library_id: self.id(),
            epoch,
            candidate: me,
        };
        let mut answers: Vec<(usize, VoteResponse)> = Vec::new();
        let mut unreachable = Vec::new();
        let mut refused = Vec::new();
        for (index, member) in members.iter().enumerate() {
            match member.vote(request.clone()).await {
                Ok(answer) if answer.library_id == self.id() => {
                    if let Some(why) = &answer.refused {
                        refused.push((answer.voter, why.clone()));
                    }
                    answers.push((index, answer));
                }
                Ok(answer) => unreachable.push(format!(
                    "device {} answered for library {}",
                    answer.voter, answer.library_id
                )),
                Err(e) => unreachable.push(e.to_string()),
            }
        }
        let granted: Vec<DeviceId> = answers
            .iter()
            .filter(|(_, a)| a.refused.is_none())
            .map(|(_, a)| a.voter)
            .collect();
        let tally = decide_promote::tally(&electors, current.leader, me, &granted, options.force)
            .map_err(|e| PromoteError::Refused {
            reason: format!(
                "{e}; bring more write members online, or promote with force if the \
                     leader is surely gone"
            ),
            unreachable: unreachable.clone(),
            refused: refused.clone(),
        })?;

        // The furthest verified prefix: fetch from whoever holds more than this device.
        let mut fetched = 0;
        let mut order: Vec<&(usize, VoteResponse)> = answers.iter().collect();
        order.sort_by_key(|(_, a)| std::cmp::Reverse(a.held.seq));
        for (index, answer) in order {
            let position = self.position().await?;
            if answer.held.seq <= position.seq {
                break;
            }
            let caught_up = self
                .catch_up_with(members[*index], PULL_ENTRIES_MAX, |_, _| {})
                .await
                .map_err(|source| PromoteError::Fetch {
                    device: answer.voter,
                    source,
                })?;
            fetched += caught_up.seq.0.saturating_sub(position.seq.0);
        }

        // Runs its pulls left out (collapsed entries): filled from whoever holds them, so
        // that it can serve every follower however far behind. What none holds stays a gap.
        for (index, _) in &answers {
            if self.held_log_gaps().await?.is_empty() {
                break;
            }
            if let Err(e) = self.fill_held_log(members[*index]).await {
                tracing::info!(library = %self.id(), %e, "a member could not fill the held log");
            }
        }
        let gaps = self.held_log_gaps().await?.len();
        let position = self.position().await?;
        let announced = answers
            .iter()
            .map(|(_, a)| a.latest_seen.max(a.held.seq))
            .chain([Seq(self.leader_latest_seen.load(Ordering::Relaxed))])
            .max()
            .unwrap_or(Seq::ZERO);
        let lost = decide_promote::lost_range(position.seq, announced);
        let record_seq = self.start_epoch(epoch, position, tally.forced).await?;
        tracing::warn!(
            library = %self.id(),
            %epoch,
            replaced = %current.leader,
            granted = tally.granted,
            needed = tally.needed,
            forced = tally.forced,
            ?lost,
            "promoted: this device leads the library"
        );
        // Its own writes made as a follower, taken as pushed changes.
        if !self.is_read_only()
            && let Ok(leader) = self.leader()
        {
            self.push_outbox(&crate::InProcess::new(leader))
                .await
                .map_err(|source| PromoteError::Fetch { device: me, source })?;
        }
        Ok(Promotion {
            epoch,
            replaced: current.leader,
            record_seq,
            electorate: tally.electorate,
            needed: tally.needed,
            granted: tally.granted,
            forced: tally.forced,
            answered: answers.iter().map(|(_, a)| a.voter).collect(),
            unreachable,
            refused,
            fetched,
            lost,
            gaps,
        })
    }

    /// The move record at `position + 1`, the library's row (this device leads `epoch`),
    /// in one transaction; then this device sequences.
    async fn start_epoch(
        &self,
        epoch: Epoch,
        position: Position,
        forced: bool,
    ) -> Result<Seq, PromoteError> {
        let key = self
            .device_key()
            .await
            .map_err(|e| DbErr::Custom(e.to_string()))?;
        let _gate = self.sequencing_gate.write().await;
        let txn = self.begin_write().await?;
        crate::backend::take_turns(&txn, self.id()).await?;
        let addresses =
            device::Entity::find_by_id((self.id().to_string(), self.device_id().to_string()))
                .one(&txn)
                .await?
                .map(|row| parse_addresses(row.addresses.as_deref()))
                .transpose()?
                .unwrap_or_default();
        let record = MoveRecord::sign(
            MoveTerms {
                library_id: self.id(),
                epoch,
                kind: MoveKind::Promotion,
                leader: self.device_id(),
                key: key.fingerprint(),
                addresses,
                after: position,
                forced,
            },
            &key,
        )?;
        let draft = LogEntry {
            library_id: self.id(),
            seq: Seq::ZERO,
            model: LEADER_MODEL.to_owned(),
            record_id: epoch.to_string(),
            op: ChangeOp::Upsert,
            data: Some(record.to_data()),
            changed: Vec::new(),
            device_id: self.device_id(),
            hlc: self.context.clock.now(),
            schema_version: crate::leadership::RESERVED_SCHEMA_VERSION,
            checksum: 0,
        };
        // Entries this device holds beyond its position are not of the surviving history.
        crate::tables::log::Entity::delete_many()
            .filter(crate::tables::log::Column::LibraryId.eq(self.id().to_string()))
            .filter(crate::tables::log::Column::Seq.gt(position.seq.0 as i64))
            .exec(&txn)
            .await?;
        let (rows, end) = Library::number(
            &[draft],
            crate::library::Tip {
                seq: position.seq,
                checksum: position.checksum,
            },
        );
        crate::tables::log::Entity::insert_many(rows)
            .exec_without_returning(&txn)
            .await?;
        library::Entity::update_many()
            .col_expr(
                library::Column::LeaderDeviceId,
                Expr::value(self.device_id().to_string()),
            )
            .col_expr(library::Column::Epoch, Expr::value(epoch.0 as i64))
            .col_expr(
                library::Column::EpochStartSeq,
                Expr::value(end.seq.0 as i64),
            )
            .filter(library::Column::Id.eq(self.id().to_string()))
            .exec(&txn)
            .await?;
        crate::follower::write_position(
            &txn,
            self.id(),
            Position {
                seq: end.seq,
                checksum: end.checksum,
            },
        )
        .await?;
        txn.commit().await?;
        self.tip.send_replace(end);
        self.refresh_leadership().await?;
        self.membership_changed();
        Ok(end.seq)
    }

    /// Stores this device's vote for `candidate` in `epoch`, unless it voted for another:
    /// then that one.
    async fn cast_vote(
        &self,
        epoch: Epoch,
        candidate: DeviceId,
    ) -> Result<Option<DeviceId>, DbErr> {
        let txn = self.begin_write().await?;
        let key = vote_key(self.id(), epoch);
        if let Some(voted) = stored_vote(&key, get_local_value(&txn, &key).await?)?
            && voted != candidate
        {
            return Ok(Some(voted));
        }
        set_local_value(&txn, &key, &candidate.to_string()).await?;
        txn.commit().await?;
        Ok(None)
    }

    /// The members as the tally sees them.
    async fn electors(&self) -> Result<Vec<Elector>, DbErr> {
        // A row that does not parse is an error, not a member left out: the electorate's
        // size decides what a majority is.
        device::Entity::find()
            .filter(device::Column::LibraryId.eq(self.id().to_string()))
            .all(&self.db)
            .await?
            .into_iter()
            .map(|row| {
                Ok(Elector {
                    device: row.device_id.parse().map_err(|e| {
                        DbErr::Custom(format!("sync_device row {}: device id: {e}", row.device_id))
                    })?,
                    access: Access::parse(&row.access),
                    revoked: row.revoked_at_ms.is_some(),
                })
            })
            .collect()
    }

    /// Answers a member's request to vote for its promotion: at most one candidate per
    /// epoch, the vote stored before the answer (`decide::promote::on_vote`).
    pub async fn answer_vote(&self, request: &VoteRequest) -> Result<VoteResponse, VoteError> {
        let held = committed_tip(&self.db, self.id(), false).await?;
        let position = self.position().await?;
        let held_position = if held.seq >= position.seq {
            Position {
                seq: held.seq,
                checksum: held.checksum,
            }
        } else {
            position
        };
        let leadership = self.leadership();
        let mut answer = VoteResponse {
            library_id: self.id(),
            voter: self.device_id(),
            refused: None,
            epoch: leadership.epoch,
            held: held_position,
            latest_seen: Seq(self.leader_latest_seen.load(Ordering::Relaxed)),
        };
        if request.library_id != self.id() {
            answer.library_id = request.library_id;
            answer.refused = Some(VoteRefusal::UnknownLibrary);
            return Ok(answer);
        }
        let candidate_may_lead = self.electors().await?.iter().any(|m| {
            m.device == request.candidate
                && !m.revoked
                && matches!(m.access, Some(Access::Write | Access::Leader))
        });
        let txn = self.begin_write().await?;
        let key = vote_key(self.id(), request.epoch);
        let voted_for = stored_vote(&key, get_local_value(&txn, &key).await?)?;
        let state = VoterState {
            epoch: leadership.epoch,
            voted_for,
            candidate_may_lead,
            leads: self.role_of(&leadership) == Role::Leader && leadership.superseded_by.is_none(),
        };
        match decide_promote::on_vote(&state, request.epoch, request.candidate) {
            Ballot::Grant { new } => {
                if new {
                    set_local_value(&txn, &key, &request.candidate.to_string()).await?;
                }
                txn.commit().await?;
                tracing::info!(library = %self.id(), epoch = %request.epoch, candidate = %request.candidate, "voted for a promotion");
            }
            Ballot::Refuse(why) => answer.refused = Some(why),
        }
        Ok(answer)
    }

    /// Serves a pull from the log this device holds (a member fetching before its
    /// promotion): every entry after the request's position, which must be in this log
    /// (same seq, same checksum), up to the position this device applied.
    pub async fn serve_held_pull(&self, request: &PullRequest) -> Result<PullResponse, PullError> {
        if request.library_id != self.id() {
            return Err(PullError::NotLeader(request.library_id));
        }
        let held = committed_tip(&self.db, self.id(), false)
            .await
            .map_err(crate::LogError::from)?;
        let checksum_there = if request.after == Seq::ZERO {
            Some(0)
        } else {
            crate::tables::log::Entity::find_by_id((self.id().to_string(), request.after.0 as i64))
                .one(&self.db)
                .await
                .map_err(crate::LogError::from)?
                .map(|row| row.checksum as u64)
        };
        if checksum_there != Some(request.after_checksum) {
            return Err(PullError::HistoryDiverged(crate::protocol::Divergence {
                position: request.after,
                checksum: request.after_checksum,
                leader_latest_seq: held.seq,
                leader_checksum: checksum_there,
            }));
        }
        let limit = u64::from(request.limit.clamp(1, PULL_ENTRIES_MAX));
        let entries = read_log(&self.db, self.id(), request.after, limit).await?;
        Ok(PullResponse {
            protocol_version: PROTOCOL_VERSION,
            library_id: self.id(),
            items: entries.into_iter().map(PulledItem::Entry).collect(),
            latest_seq: held.seq,
            epoch: self.epoch(),
        })
    }
}

/// A vote stored in `sync_local`: text that is not a device id is an error, never "no
/// vote" (which would let this member vote twice in one epoch).
fn stored_vote(key: &str, text: Option<String>) -> Result<Option<DeviceId>, DbErr> {
    text.map(|v| {
        v.parse::<DeviceId>().map_err(|e| {
            DbErr::Custom(format!(
                "sync_local `{key}` holds `{v}`, not a device id: {e}"
            ))
        })
    })
    .transpose()
}
