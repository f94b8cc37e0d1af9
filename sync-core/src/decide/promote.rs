//! Promotion after a lost leader, decided without I/O: who may vote and how many votes a
//! promotion needs, how a member answers a vote request, which of two leaders that both
//! started an epoch wins, and what range of the log only the lost leader held.
//!
//! The rule (ARCHITECTURE.md, *Failover*): the electorate is the library's write members
//! (access `write` or `leader`, not revoked), the lost leader included; the lost leader
//! never votes (it is gone), so it counts as absent. A promotion to epoch `E + 1` needs
//! votes from more than half of the electorate, the candidate's own included. Each member
//! votes at most once per epoch, and stores its vote before answering, so two candidates
//! of the same epoch can never both gather a majority: two majorities of one electorate
//! share a member, who voted once. `force` skips the majority: a person's explicit act,
//! recorded as forced, for when too few members are reachable. Two leaders can then exist
//! at once; the one whose epoch is higher wins, a tie goes to the higher device id, and
//! the loser rewinds (`decide::rewind`): its sequenced writes return as outbox changes.

use crate::protocol::VoteRefusal;
use crate::{Access, DeviceId, Epoch, Seq};

/// A member as the tally sees it (its row in the replicated membership).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Elector {
    /// The device.
    pub device: DeviceId,
    /// Its access (`None`: unreadable).
    pub access: Option<Access>,
    /// Whether it was revoked.
    pub revoked: bool,
}

impl Elector {
    fn votes(&self) -> bool {
        !self.revoked && matches!(self.access, Some(Access::Write | Access::Leader))
    }
}

/// How a promotion stands after asking for votes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Tally {
    /// Write members, the lost leader included.
    pub electorate: usize,
    /// Votes needed: more than half the electorate.
    pub needed: usize,
    /// Granted votes of electors, the candidate's own included.
    pub granted: usize,
    /// Promoted without a majority, by a person's explicit choice.
    pub forced: bool,
}

/// Why a promotion may not go ahead.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum PromoteRefusal {
    /// The candidate is not a write member: only a write member may lead.
    #[error("device {0} is not a write member of the library (read access, revoked, or unknown)")]
    NotWriteMember(DeviceId),
    /// The candidate leads already.
    #[error("device {0} leads the library already")]
    LeadsAlready(DeviceId),
    /// Too few votes.
    #[error("{granted} of the {needed} votes needed (of {electorate} write members)")]
    NoMajority {
        /// Write members, the lost leader included.
        electorate: usize,
        /// Votes needed.
        needed: usize,
        /// Votes granted.
        granted: usize,
    },
}

/// Counts the votes for `candidate` replacing `lost`: `granted` are the devices that
/// granted (duplicates and non-electors are not counted; the candidate votes for itself).
pub(crate) fn tally(
    members: &[Elector],
    lost: DeviceId,
    candidate: DeviceId,
    granted: &[DeviceId],
    force: bool,
) -> Result<Tally, PromoteRefusal> {
    if candidate == lost {
        return Err(PromoteRefusal::LeadsAlready(candidate));
    }
    if !members.iter().any(|m| m.device == candidate && m.votes()) {
        return Err(PromoteRefusal::NotWriteMember(candidate));
    }
    let electorate = members.iter().filter(|m| m.votes()).count();
    let needed = electorate / 2 + 1;
    let mut counted: Vec<DeviceId> = Vec::new();
    for device in std::iter::once(&candidate).chain(granted) {
        let elector = members.iter().any(|m| m.device == *device && m.votes());
        if elector && *device != lost && !counted.contains(device) {
            counted.push(*device);
        }
    }
    let granted = counted.len();
    if granted < needed && !force {
        return Err(PromoteRefusal::NoMajority {
            electorate,
            needed,
            granted,
        });
    }
    Ok(Tally {
        electorate,
        needed,
        granted,
        forced: granted < needed,
    })
}

/// What the voter knows when asked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct VoterState {
    /// The epoch it knows.
    pub epoch: Epoch,
    /// The candidate it voted for in the asked epoch, if it voted.
    pub voted_for: Option<DeviceId>,
    /// Whether the candidate is a write member in its membership.
    pub candidate_may_lead: bool,
    /// Whether the voter leads itself (a leader that is alive does not vote itself out).
    pub leads: bool,
}

/// A voter's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Ballot {
    /// Granted: the voter stores the vote first (unless it is a repeat).
    Grant {
        /// Whether the vote is new (to be stored) or repeated to the same candidate.
        new: bool,
    },
    /// Refused, with the reason.
    Refuse(VoteRefusal),
}

/// How a member answers a request to vote for `candidate` in `epoch`.
pub(crate) fn on_vote(state: &VoterState, epoch: Epoch, candidate: DeviceId) -> Ballot {
    if state.leads {
        return Ballot::Refuse(VoteRefusal::LeaderIsAlive);
    }
    if !state.candidate_may_lead {
        return Ballot::Refuse(VoteRefusal::CandidateMayNotLead);
    }
    match state.voted_for {
        Some(voted) if voted == candidate => return Ballot::Grant { new: false },
        Some(voted) => return Ballot::Refuse(VoteRefusal::VotedForAnother(voted)),
        None => {}
    }
    if epoch <= state.epoch {
        return Ballot::Refuse(VoteRefusal::EpochNotNewer { known: state.epoch });
    }
    Ballot::Grant { new: true }
}

/// Of two leaders that each started an epoch, whether `a` outranks `b`: the higher epoch,
/// and for one epoch the higher device id.
pub(crate) fn outranks(a: (Epoch, DeviceId), b: (Epoch, DeviceId)) -> bool {
    a.0 > b.0 || (a.0 == b.0 && a.1.0 > b.1.0)
}

/// The seqs only the lost leader held, as far as the surviving members can know:
/// after the furthest entry any of them holds, up to the highest latest seq any of them
/// saw the lost leader announce. `None` when nothing is known to be lost.
pub(crate) fn lost_range(furthest_held: Seq, highest_announced: Seq) -> Option<(Seq, Seq)> {
    (highest_announced > furthest_held).then(|| (furthest_held.next(), highest_announced))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn device(n: u128) -> DeviceId {
        DeviceId(uuid::Uuid::from_u128(n))
    }

    fn elector(n: u128, access: Access) -> Elector {
        Elector {
            device: device(n),
            access: Some(access),
            revoked: false,
        }
    }

    /// A lost leader (1), two write members (2, 3), a reader (4), a revoked writer (5).
    fn members() -> Vec<Elector> {
        vec![
            elector(1, Access::Leader),
            elector(2, Access::Write),
            elector(3, Access::Write),
            elector(4, Access::Read),
            Elector {
                revoked: true,
                ..elector(5, Access::Write)
            },
        ]
    }

    #[test]
    fn a_majority_of_write_members_counts_the_lost_leader_as_absent() {
        // Electorate 3 (1, 2, 3): two votes needed; the candidate's own is one.
        let refused = tally(&members(), device(1), device(2), &[], false);
        assert_eq!(
            refused,
            Err(PromoteRefusal::NoMajority {
                electorate: 3,
                needed: 2,
                granted: 1
            })
        );
        let won = tally(&members(), device(1), device(2), &[device(3)], false).unwrap();
        assert_eq!((won.granted, won.needed, won.forced), (2, 2, false));
        // The reader, the revoked member, the lost leader and repeats do not count.
        let refused = tally(
            &members(),
            device(1),
            device(2),
            &[device(4), device(5), device(1), device(2), device(9)],
            false,
        );
        assert!(matches!(
            refused,
            Err(PromoteRefusal::NoMajority { granted: 1, .. })
        ));
    }

    #[test]
    fn force_skips_the_majority_and_says_so() {
        let forced = tally(&members(), device(1), device(2), &[], true).unwrap();
        assert!(forced.forced);
        assert_eq!(forced.granted, 1);
        let with_majority = tally(&members(), device(1), device(2), &[device(3)], true).unwrap();
        assert!(!with_majority.forced);
    }

    #[test]
    fn only_a_write_member_may_be_promoted() {
        for candidate in [4, 5, 9] {
            assert_eq!(
                tally(&members(), device(1), device(candidate), &[], true),
                Err(PromoteRefusal::NotWriteMember(device(candidate)))
            );
        }
        assert_eq!(
            tally(&members(), device(1), device(1), &[], true),
            Err(PromoteRefusal::LeadsAlready(device(1)))
        );
    }

    fn voter() -> VoterState {
        VoterState {
            epoch: Epoch(1),
            voted_for: None,
            candidate_may_lead: true,
            leads: false,
        }
    }

    #[test]
    fn a_member_votes_once_per_epoch() {
        assert_eq!(
            on_vote(&voter(), Epoch(2), device(2)),
            Ballot::Grant { new: true }
        );
        let voted = VoterState {
            voted_for: Some(device(2)),
            ..voter()
        };
        // The same candidate asking again gets the same answer; another is refused.
        assert_eq!(
            on_vote(&voted, Epoch(2), device(2)),
            Ballot::Grant { new: false }
        );
        assert_eq!(
            on_vote(&voted, Epoch(2), device(3)),
            Ballot::Refuse(VoteRefusal::VotedForAnother(device(2)))
        );
    }

    #[test]
    fn a_vote_is_refused_for_an_old_epoch_a_reader_or_by_a_living_leader() {
        assert_eq!(
            on_vote(&voter(), Epoch(1), device(2)),
            Ballot::Refuse(VoteRefusal::EpochNotNewer { known: Epoch(1) })
        );
        let reader = VoterState {
            candidate_may_lead: false,
            ..voter()
        };
        assert_eq!(
            on_vote(&reader, Epoch(2), device(4)),
            Ballot::Refuse(VoteRefusal::CandidateMayNotLead)
        );
        let leader = VoterState {
            leads: true,
            ..voter()
        };
        assert_eq!(
            on_vote(&leader, Epoch(2), device(2)),
            Ballot::Refuse(VoteRefusal::LeaderIsAlive)
        );
    }

    #[test]
    fn the_higher_epoch_wins_and_a_tie_goes_to_the_higher_device() {
        assert!(outranks((Epoch(3), device(1)), (Epoch(2), device(9))));
        assert!(!outranks((Epoch(2), device(9)), (Epoch(3), device(1))));
        assert!(outranks((Epoch(2), device(9)), (Epoch(2), device(1))));
        assert!(!outranks((Epoch(2), device(1)), (Epoch(2), device(9))));
        assert!(!outranks((Epoch(2), device(1)), (Epoch(2), device(1))));
    }

    #[test]
    fn the_lost_range_is_what_was_announced_beyond_the_furthest_held() {
        assert_eq!(lost_range(Seq(10), Seq(10)), None);
        assert_eq!(lost_range(Seq(10), Seq(7)), None);
        assert_eq!(lost_range(Seq(10), Seq(14)), Some((Seq(11), Seq(14))));
    }
}
