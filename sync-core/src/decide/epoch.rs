//! Epoch fencing and move records: pure. Whether an answer comes from an epoch this
//! device may listen to, what a leader does with a request that states a newer epoch,
//! and whether a move record is to be trusted — one check for a handoff (signed by the
//! old leader) and a promotion (signed by the new leader, a write member).

use crate::follower::Position;
use crate::identity::verify_signature;
use crate::leadership::{MoveKind, MoveRecord};
use crate::{Access, DeviceId, Epoch, KeyFingerprint, LibraryId, Seq};

/// An answer (a pull response, a push acknowledgement) from an epoch older than the one
/// this device knows: it comes from a replaced leader and must not be used.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(crate) struct Stale {
    /// The epoch this device knows.
    pub known: Epoch,
    /// The epoch the answer states.
    pub answered: Epoch,
}

/// Checks an answer's epoch against the one this device knows. A device that knows no
/// epoch yet (`UNSTATED`: it joined and has not heard one) takes any; an answer that
/// states none is of the first epoch.
pub(crate) fn check_answer(known: Epoch, answered: Epoch) -> Result<(), Stale> {
    let answered_as = answered.max(Epoch::FIRST);
    if known != Epoch::UNSTATED && answered_as < known {
        return Err(Stale { known, answered });
    }
    Ok(())
}

/// What a leader does with a request, given the epoch it states.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(crate) enum OnRequest {
    /// Serve it.
    Serve,
    /// The request states a newer epoch than this leader's: it has been replaced; it
    /// stops serving and sequencing and refuses, naming the newer epoch.
    Superseded(Epoch),
}

/// Decides a leader's answer to a request stating `stated` (`UNSTATED`: says nothing).
/// `superseded_by` is a newer epoch the leader learnt of before.
pub(crate) fn on_request(ours: Epoch, superseded_by: Option<Epoch>, stated: Epoch) -> OnRequest {
    let newest = superseded_by.unwrap_or(ours).max(ours);
    if stated > ours {
        OnRequest::Superseded(stated.max(newest))
    } else if newest > ours {
        OnRequest::Superseded(newest)
    } else {
        OnRequest::Serve
    }
}

/// A member as the verifier of a move record sees it: the signer's row in the replicated
/// membership.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SignerMember {
    /// Its access (`None`: not readable).
    pub access: Option<Access>,
    /// Whether it was revoked.
    pub revoked: bool,
    /// Its key fingerprint, when known.
    pub key: Option<KeyFingerprint>,
}

/// What a move record is checked against, as the applying device knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct MoveContext {
    /// This device's library.
    pub library_id: LibraryId,
    /// The epoch it knows.
    pub epoch: Epoch,
    /// The leader it knows.
    pub leader: DeviceId,
    /// That leader's key fingerprint, when the membership holds it.
    pub leader_key: Option<KeyFingerprint>,
    /// The seq of the record's entry.
    pub entry_seq: Seq,
    /// The position right before the entry (its seq and checksum).
    pub before: Position,
    /// The signer's row in the membership, if it is a member.
    pub signer: Option<SignerMember>,
}

/// A move record to act on, or one to pass over.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(crate) enum MoveVerdict {
    /// A move this device knew of already (a follower that joined in a later epoch pulls
    /// the moves before it): the chain vouches for it, nothing changes.
    Historical,
    /// A new, valid move: the leader and epoch change.
    Accept,
}

/// Why a move record is not trusted. The follower stops before it, applying nothing of the
/// batch.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum MoveRefusal {
    #[error("it is about library {found}, not this one")]
    WrongLibrary { found: LibraryId },
    #[error(
        "it says the epoch starts after seq {after}, but the record is entry {entry} (the \
         entry before it is seq {before})"
    )]
    WrongPlace { after: Seq, entry: Seq, before: Seq },
    #[error("it says the epoch starts after checksum {stated:016x}, the log has {actual:016x}")]
    WrongChecksum { stated: u64, actual: u64 },
    #[error("its new leader {leader} is not the device of the key it names")]
    KeyNotLeader { leader: DeviceId },
    #[error("its signer's key is not a well-formed key")]
    BadSignerKey,
    #[error(
        "a handoff must be signed by the leader of epoch {epoch} ({leader}) with its known key"
    )]
    NotSignedByLeader { epoch: Epoch, leader: DeviceId },
    #[error("a handoff from epoch {epoch} must start epoch {expected}, not {found}")]
    HandoffSkipsEpochs {
        epoch: Epoch,
        expected: Epoch,
        found: Epoch,
    },
    #[error(
        "a promotion must be signed by the new leader itself, a write member of the library \
         whose key the membership holds"
    )]
    PromotionNotByWriteMember,
    #[error("its signature does not verify")]
    BadSignature,
}

/// Whether to trust `record`, the entry at `context.entry_seq`: where it stands in the
/// chain, who signed it (the old leader for a handoff, the new leader as a write member
/// for a promotion), with which key, and the signature itself.
pub(crate) fn verify_move(
    record: &MoveRecord,
    context: &MoveContext,
) -> Result<MoveVerdict, MoveRefusal> {
    if record.library_id != context.library_id {
        return Err(MoveRefusal::WrongLibrary {
            found: record.library_id,
        });
    }
    if record.after != context.before.seq || context.entry_seq != context.before.seq.next() {
        return Err(MoveRefusal::WrongPlace {
            after: record.after,
            entry: context.entry_seq,
            before: context.before.seq,
        });
    }
    if record.after_checksum != context.before.checksum {
        return Err(MoveRefusal::WrongChecksum {
            stated: record.after_checksum,
            actual: context.before.checksum,
        });
    }
    if context.epoch != Epoch::UNSTATED && record.epoch <= context.epoch {
        // In the chain this device verified, before its own epoch's start: vouched for by
        // the leader it pinned.
        return Ok(MoveVerdict::Historical);
    }
    if record.key.device_id() != record.leader {
        return Err(MoveRefusal::KeyNotLeader {
            leader: record.leader,
        });
    }
    let signer_key = record.signer_key_der().ok_or(MoveRefusal::BadSignerKey)?;
    let signer = KeyFingerprint::of_public_key(&signer_key);
    match record.kind {
        MoveKind::Handoff => {
            if signer.device_id() != context.leader || context.leader_key != Some(signer) {
                return Err(MoveRefusal::NotSignedByLeader {
                    epoch: context.epoch,
                    leader: context.leader,
                });
            }
            if context.epoch != Epoch::UNSTATED && record.epoch != context.epoch.next() {
                return Err(MoveRefusal::HandoffSkipsEpochs {
                    epoch: context.epoch,
                    expected: context.epoch.next(),
                    found: record.epoch,
                });
            }
        }
        MoveKind::Promotion => {
            let trusted = signer == record.key
                && context.signer.as_ref().is_some_and(|member| {
                    !member.revoked
                        && matches!(member.access, Some(Access::Write | Access::Leader))
                        && member.key == Some(signer)
                });
            if !trusted {
                return Err(MoveRefusal::PromotionNotByWriteMember);
            }
        }
    }
    if !verify_signature(
        &signer_key,
        &record.signed_bytes(),
        &crate::leadership::unhex(&record.signature).ok_or(MoveRefusal::BadSignature)?,
    ) {
        return Err(MoveRefusal::BadSignature);
    }
    Ok(MoveVerdict::Accept)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::DeviceKey;
    use crate::leadership::MoveTerms;

    fn library() -> LibraryId {
        LibraryId(uuid::Uuid::from_u128(7))
    }

    fn before() -> Position {
        Position {
            seq: Seq(41),
            checksum: 0xfeed,
        }
    }

    fn terms(kind: MoveKind, to: &DeviceKey, epoch: Epoch) -> MoveTerms {
        MoveTerms {
            library_id: library(),
            epoch,
            kind,
            leader: to.device_id(),
            key: to.fingerprint(),
            addresses: vec!["10.0.0.2:4433".into()],
            after: before(),
            forced: false,
        }
    }

    fn context(old: &DeviceKey, signer: Option<SignerMember>) -> MoveContext {
        MoveContext {
            library_id: library(),
            epoch: Epoch(1),
            leader: old.device_id(),
            leader_key: Some(old.fingerprint()),
            entry_seq: Seq(42),
            before: before(),
            signer,
        }
    }

    fn write_member(key: &DeviceKey) -> SignerMember {
        SignerMember {
            access: Some(Access::Write),
            revoked: false,
            key: Some(key.fingerprint()),
        }
    }

    #[test]
    fn answers_from_an_older_epoch_are_stale() {
        assert!(check_answer(Epoch(2), Epoch(2)).is_ok());
        assert!(check_answer(Epoch(2), Epoch(3)).is_ok());
        assert_eq!(
            check_answer(Epoch(2), Epoch(1)),
            Err(Stale {
                known: Epoch(2),
                answered: Epoch(1)
            })
        );
        // Unstated answers are of the first epoch.
        assert!(check_answer(Epoch(2), Epoch::UNSTATED).is_err());
        assert!(check_answer(Epoch(1), Epoch::UNSTATED).is_ok());
        // A device that knows no epoch yet takes any.
        assert!(check_answer(Epoch::UNSTATED, Epoch(5)).is_ok());
    }

    #[test]
    fn a_newer_epoch_in_a_request_supersedes_the_leader() {
        assert_eq!(on_request(Epoch(1), None, Epoch(1)), OnRequest::Serve);
        assert_eq!(
            on_request(Epoch(1), None, Epoch::UNSTATED),
            OnRequest::Serve
        );
        assert_eq!(
            on_request(Epoch(1), None, Epoch(2)),
            OnRequest::Superseded(Epoch(2))
        );
        // Once superseded, every request is refused, naming the newest epoch known.
        assert_eq!(
            on_request(Epoch(1), Some(Epoch(3)), Epoch(1)),
            OnRequest::Superseded(Epoch(3))
        );
        assert_eq!(
            on_request(Epoch(1), Some(Epoch(3)), Epoch(4)),
            OnRequest::Superseded(Epoch(4))
        );
    }

    #[test]
    fn a_handoff_signed_by_the_old_leader_is_accepted() {
        let old = DeviceKey::generate().unwrap();
        let new = DeviceKey::generate().unwrap();
        let record = MoveRecord::sign(terms(MoveKind::Handoff, &new, Epoch(2)), &old).unwrap();
        assert_eq!(
            verify_move(&record, &context(&old, None)),
            Ok(MoveVerdict::Accept)
        );
    }

    #[test]
    fn a_handoff_signed_by_anyone_else_is_refused() {
        let old = DeviceKey::generate().unwrap();
        let new = DeviceKey::generate().unwrap();
        // The new leader signing its own handoff.
        let record = MoveRecord::sign(terms(MoveKind::Handoff, &new, Epoch(2)), &new).unwrap();
        assert!(matches!(
            verify_move(&record, &context(&old, Some(write_member(&new)))),
            Err(MoveRefusal::NotSignedByLeader { .. })
        ));
        // The old leader's device id, but a key the membership does not hold for it.
        let mut known = context(&old, None);
        known.leader_key = Some(new.fingerprint());
        let record = MoveRecord::sign(terms(MoveKind::Handoff, &new, Epoch(2)), &old).unwrap();
        assert!(matches!(
            verify_move(&record, &known),
            Err(MoveRefusal::NotSignedByLeader { .. })
        ));
    }

    #[test]
    fn an_altered_record_does_not_verify() {
        let old = DeviceKey::generate().unwrap();
        let new = DeviceKey::generate().unwrap();
        let thief = DeviceKey::generate().unwrap();
        let mut record = MoveRecord::sign(terms(MoveKind::Handoff, &new, Epoch(2)), &old).unwrap();
        record.addresses = vec!["evil:1".into()];
        assert_eq!(
            verify_move(&record, &context(&old, None)),
            Err(MoveRefusal::BadSignature)
        );
        let mut record = MoveRecord::sign(terms(MoveKind::Handoff, &new, Epoch(2)), &old).unwrap();
        record.leader = thief.device_id();
        record.key = thief.fingerprint();
        assert_eq!(
            verify_move(&record, &context(&old, None)),
            Err(MoveRefusal::BadSignature)
        );
        let mut record = MoveRecord::sign(terms(MoveKind::Handoff, &new, Epoch(2)), &old).unwrap();
        record.key = thief.fingerprint();
        assert!(matches!(
            verify_move(&record, &context(&old, None)),
            Err(MoveRefusal::KeyNotLeader { .. })
        ));
    }

    #[test]
    fn a_record_must_stand_where_it_says() {
        let old = DeviceKey::generate().unwrap();
        let new = DeviceKey::generate().unwrap();
        let record = MoveRecord::sign(terms(MoveKind::Handoff, &new, Epoch(2)), &old).unwrap();
        let mut elsewhere = context(&old, None);
        elsewhere.entry_seq = Seq(43);
        elsewhere.before.seq = Seq(42);
        assert!(matches!(
            verify_move(&record, &elsewhere),
            Err(MoveRefusal::WrongPlace { .. })
        ));
        let mut other_history = context(&old, None);
        other_history.before.checksum = 1;
        assert!(matches!(
            verify_move(&record, &other_history),
            Err(MoveRefusal::WrongChecksum { .. })
        ));
        let record = MoveRecord::sign(terms(MoveKind::Handoff, &new, Epoch(3)), &old).unwrap();
        assert!(matches!(
            verify_move(&record, &context(&old, None)),
            Err(MoveRefusal::HandoffSkipsEpochs { .. })
        ));
    }

    #[test]
    fn a_promotion_needs_a_write_member_signing_for_itself() {
        let old = DeviceKey::generate().unwrap();
        let new = DeviceKey::generate().unwrap();
        let record = MoveRecord::sign(terms(MoveKind::Promotion, &new, Epoch(2)), &new).unwrap();
        assert_eq!(
            verify_move(&record, &context(&old, Some(write_member(&new)))),
            Ok(MoveVerdict::Accept)
        );
        // Not a member, a read member, a revoked one, or another key on record.
        assert_eq!(
            verify_move(&record, &context(&old, None)),
            Err(MoveRefusal::PromotionNotByWriteMember)
        );
        for member in [
            SignerMember {
                access: Some(Access::Read),
                ..write_member(&new)
            },
            SignerMember {
                revoked: true,
                ..write_member(&new)
            },
            SignerMember {
                key: Some(old.fingerprint()),
                ..write_member(&new)
            },
        ] {
            assert_eq!(
                verify_move(&record, &context(&old, Some(member))),
                Err(MoveRefusal::PromotionNotByWriteMember)
            );
        }
        // A promotion of another device, signed by a write member.
        let record = MoveRecord::sign(terms(MoveKind::Promotion, &new, Epoch(2)), &old).unwrap();
        assert_eq!(
            verify_move(&record, &context(&old, Some(write_member(&old)))),
            Err(MoveRefusal::PromotionNotByWriteMember)
        );
    }

    #[test]
    fn moves_before_the_known_epoch_are_historical() {
        let old = DeviceKey::generate().unwrap();
        let new = DeviceKey::generate().unwrap();
        let record = MoveRecord::sign(terms(MoveKind::Handoff, &new, Epoch(2)), &old).unwrap();
        let mut later = context(&new, None);
        later.epoch = Epoch(3);
        assert_eq!(verify_move(&record, &later), Ok(MoveVerdict::Historical));
    }
}
