//! The old leader's return, decided without I/O: given the entries a device holds after
//! the fork point (the seq a newer epoch's move record says it starts after), what becomes
//! an outbox change for the new leader, what is set aside and why, and which records go
//! back to their state at the fork.
//!
//! Every app entry after the fork becomes one outbox change, in seq order, whoever wrote
//! it (this device, or a follower that pushed it here). Its change id is derived from the
//! entry itself (library, seq, checksum), so that every device that holds the same
//! abandoned entry (the old leader and those of its followers that pulled it) makes the
//! same change of it, and the new leader's `sync_taken` takes it once. Its base is the fork:
//! the new leader's entries after the fork are concurrent with it, and merge by the
//! model's rules.
//!
//! Reserved entries (`sync.*`) are not app changes and are never pushed: taken marks stay
//! in this device's `sync_taken` (where applying or taking them put them already),
//! membership entries of the abandoned branch are set aside (the new leader's membership
//! stands; a member admitted or revoked on the abandoned branch must be admitted or
//! revoked again there), and a move record of the abandoned branch is set aside (that
//! move never happened on the surviving history). Each is recorded where the user sees it.

use uuid::Uuid;

use crate::follower::Position;
use crate::leadership::{LEADER_MODEL, MEMBER_MODEL, TAKEN_MODEL, is_reserved_model};
use crate::{ChainError, LibraryId, LogEntry, Seq};

/// What happens to one entry after the fork.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(crate) enum Disposition {
    /// An app change: pushed to the new leader under this change id.
    Outbox(Uuid),
    /// Taken marks: kept in this device's `sync_taken`, not pushed.
    TakenMarks,
    /// A membership change of the abandoned branch: set aside.
    Membership,
    /// A move record of the abandoned branch: set aside.
    MoveRecord,
    /// A reserved model this build does not know: set aside.
    UnknownReserved,
    /// An app change on a device with read access, which pushes nothing: recorded, not
    /// pushed (the writer that sequenced it, or another write member holding it, pushes
    /// the same change).
    NotPushed,
}

impl Disposition {
    /// The word `sync_rewound.disposition` stores.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Disposition::Outbox(_) => "outbox",
            Disposition::TakenMarks => "taken_marks",
            Disposition::Membership => "membership",
            Disposition::MoveRecord => "move_record",
            Disposition::UnknownReserved => "unknown_reserved",
            Disposition::NotPushed => "not_pushed",
        }
    }

    /// The change id, for an entry that becomes an outbox change.
    pub(crate) fn change_id(self) -> Option<Uuid> {
        match self {
            Disposition::Outbox(id) => Some(id),
            _ => None,
        }
    }
}

/// A record of the app that an entry after the fork touched.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct RecordKey {
    /// The model's sync id.
    pub model: String,
    /// The record's key.
    pub record_id: String,
}

/// What to do with the entries after the fork.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct RewindPlan {
    /// Every entry after the fork, in seq order, with what becomes of it.
    pub entries: Vec<(LogEntry, Disposition)>,
    /// The records the abandoned entries touched, in the order to restore them: reverse
    /// order of each one's last abandoned entry (a child made after its parent goes back
    /// first, a parent deleted after its child comes back first).
    pub restore: Vec<RecordKey>,
}

impl RewindPlan {
    /// The entries that become outbox changes, with their change ids.
    pub(crate) fn outbox(&self) -> impl Iterator<Item = (&LogEntry, Uuid)> {
        self.entries
            .iter()
            .filter_map(|(entry, d)| d.change_id().map(|id| (entry, id)))
    }
}

/// Why the entries after the fork cannot be rewound as they are.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum RewindRefusal {
    /// This device's log does not continue from the fork point the move record names: the
    /// histories differ before the fork, and nothing can be rewound onto it.
    #[error("the entries after seq {fork} do not continue the fork point: {source}")]
    NotFromFork {
        /// The fork.
        fork: Seq,
        /// What is wrong with the chain.
        source: ChainError,
    },
}

/// The change id of an abandoned entry: the same on every device that holds the entry.
pub(crate) fn change_id_of(library: LibraryId, entry: &LogEntry) -> Uuid {
    let name = format!("rewound:{}:{:016x}", entry.seq, entry.checksum);
    Uuid::new_v5(&library.0, name.as_bytes())
}

/// Decides what becomes of `suffix`, the entries this device holds after `fork` (in seq
/// order, every one of them).
pub(crate) fn plan(
    library: LibraryId,
    fork: Position,
    suffix: &[LogEntry],
    pushes: bool,
) -> Result<RewindPlan, RewindRefusal> {
    crate::entry::verify_chain(fork.seq, fork.checksum, suffix).map_err(|source| {
        RewindRefusal::NotFromFork {
            fork: fork.seq,
            source,
        }
    })?;
    let mut entries = Vec::with_capacity(suffix.len());
    // Each touched record once, at the index of its last abandoned entry.
    let mut last: Vec<(usize, RecordKey)> = Vec::new();
    for (index, entry) in suffix.iter().enumerate() {
        let disposition = if is_reserved_model(&entry.model) {
            match entry.model.as_str() {
                TAKEN_MODEL => Disposition::TakenMarks,
                MEMBER_MODEL => Disposition::Membership,
                LEADER_MODEL => Disposition::MoveRecord,
                _ => Disposition::UnknownReserved,
            }
        } else {
            let key = RecordKey {
                model: entry.model.clone(),
                record_id: entry.record_id.clone(),
            };
            last.retain(|(_, k)| *k != key);
            last.push((index, key));
            if pushes {
                Disposition::Outbox(change_id_of(library, entry))
            } else {
                Disposition::NotPushed
            }
        };
        entries.push((entry.clone(), disposition));
    }
    let restore = last.into_iter().rev().map(|(_, key)| key).collect();
    Ok(RewindPlan { entries, restore })
}

/// What a record goes back to: its last entry at or before the fork (upserted as it was),
/// or, when it had none, nothing (it did not exist at the fork: deleted).
pub(crate) fn restore_entry(
    library: LibraryId,
    key: &RecordKey,
    at_fork: Option<&LogEntry>,
    fork: Seq,
) -> LogEntry {
    match at_fork {
        Some(entry) if entry.op == crate::ChangeOp::Upsert => entry.clone(),
        // Deleted at the fork, or made after it: it must not exist.
        other => LogEntry {
            library_id: library,
            seq: other.map_or(fork, |e| e.seq),
            model: key.model.clone(),
            record_id: key.record_id.clone(),
            op: crate::ChangeOp::Delete,
            data: None,
            changed: Vec::new(),
            device_id: other.map_or(crate::DeviceId(Uuid::nil()), |e| e.device_id),
            hlc: other.map_or(crate::Hlc::default(), |e| e.hlc),
            schema_version: other.map_or(0, |e| e.schema_version),
            checksum: 0,
        },
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::{ChangeOp, DeviceId, Hlc};

    fn library() -> LibraryId {
        LibraryId(Uuid::from_u128(9))
    }

    /// A chain of entries after `fork`: `(model, record, op)` each.
    fn chain(fork: Position, specs: &[(&str, &str, ChangeOp)]) -> Vec<LogEntry> {
        let mut prev = fork.checksum;
        let mut seq = fork.seq;
        specs
            .iter()
            .map(|(model, record, op)| {
                seq = seq.next();
                let mut entry = LogEntry {
                    library_id: library(),
                    seq,
                    model: (*model).to_owned(),
                    record_id: (*record).to_owned(),
                    op: *op,
                    data: (*op == ChangeOp::Upsert).then(|| format!("{{\"n\":{}}}", seq.0)),
                    changed: vec!["n".into()],
                    device_id: DeviceId(Uuid::from_u128(1)),
                    hlc: Hlc::default(),
                    schema_version: 1,
                    checksum: 0,
                };
                entry.checksum = entry.chained_checksum(prev);
                prev = entry.checksum;
                entry
            })
            .collect()
    }

    fn fork() -> Position {
        Position {
            seq: Seq(10),
            checksum: 0xabc,
        }
    }

    #[test]
    fn every_app_entry_becomes_one_outbox_change_and_reserved_ones_are_set_aside() {
        let suffix = chain(
            fork(),
            &[
                ("volume", "a", ChangeOp::Upsert),
                (MEMBER_MODEL, "d", ChangeOp::Upsert),
                ("volume", "a", ChangeOp::Upsert),
                (TAKEN_MODEL, "2.0", ChangeOp::Upsert),
                ("tag", "t", ChangeOp::Delete),
                (LEADER_MODEL, "2", ChangeOp::Upsert),
                ("sync.future", "x", ChangeOp::Upsert),
            ],
        );
        let plan = plan(library(), fork(), &suffix, true).unwrap();
        let kinds: Vec<&str> = plan.entries.iter().map(|(_, d)| d.as_str()).collect();
        assert_eq!(
            kinds,
            [
                "outbox",
                "membership",
                "outbox",
                "taken_marks",
                "outbox",
                "move_record",
                "unknown_reserved"
            ]
        );
        let outbox: Vec<Seq> = plan.outbox().map(|(e, _)| e.seq).collect();
        assert_eq!(outbox, [Seq(11), Seq(13), Seq(15)]);
        // No reserved record is restored: only app records.
        assert_eq!(
            plan.restore,
            [
                RecordKey {
                    model: "tag".into(),
                    record_id: "t".into()
                },
                RecordKey {
                    model: "volume".into(),
                    record_id: "a".into()
                },
            ]
        );
    }

    #[test]
    fn a_device_that_pushes_nothing_records_but_does_not_push() {
        let suffix = chain(fork(), &[("volume", "a", ChangeOp::Upsert)]);
        let plan = plan(library(), fork(), &suffix, false).unwrap();
        assert_eq!(plan.entries[0].1, Disposition::NotPushed);
        assert_eq!(plan.outbox().count(), 0);
        // Its record still goes back to the fork.
        assert_eq!(plan.restore.len(), 1);
    }

    #[test]
    fn change_ids_are_the_same_on_every_device_and_distinct_per_entry() {
        let suffix = chain(
            fork(),
            &[
                ("volume", "a", ChangeOp::Upsert),
                ("volume", "a", ChangeOp::Upsert),
            ],
        );
        let one = plan(library(), fork(), &suffix, true).unwrap();
        let again = plan(library(), fork(), &suffix, true).unwrap();
        assert_eq!(one, again);
        let ids: Vec<Uuid> = one.outbox().map(|(_, id)| id).collect();
        assert_ne!(ids[0], ids[1]);
        // Another library's entry at the same place is another change.
        let other = LibraryId(Uuid::from_u128(10));
        assert_ne!(change_id_of(other, &suffix[0]), ids[0]);
    }

    #[test]
    fn records_are_restored_in_reverse_order_of_their_last_entry() {
        // A parent then its child made after the fork: the child goes first.
        let suffix = chain(
            fork(),
            &[
                ("parent", "p", ChangeOp::Upsert),
                ("child", "c", ChangeOp::Upsert),
            ],
        );
        let order: Vec<String> = plan(library(), fork(), &suffix, true)
            .unwrap()
            .restore
            .into_iter()
            .map(|k| k.model)
            .collect();
        assert_eq!(order, ["child", "parent"]);
        // A child then its parent deleted after the fork: the parent comes back first.
        let suffix = chain(
            fork(),
            &[
                ("child", "c", ChangeOp::Delete),
                ("parent", "p", ChangeOp::Delete),
            ],
        );
        let order: Vec<String> = plan(library(), fork(), &suffix, true)
            .unwrap()
            .restore
            .into_iter()
            .map(|k| k.model)
            .collect();
        assert_eq!(order, ["parent", "child"]);
    }

    #[test]
    fn a_suffix_that_does_not_continue_the_fork_is_refused() {
        let suffix = chain(fork(), &[("volume", "a", ChangeOp::Upsert)]);
        let elsewhere = Position {
            seq: Seq(10),
            checksum: 1,
        };
        assert!(matches!(
            plan(library(), elsewhere, &suffix, true),
            Err(RewindRefusal::NotFromFork { .. })
        ));
        let later = Position {
            seq: Seq(11),
            checksum: 0xabc,
        };
        assert!(matches!(
            plan(library(), later, &suffix, true),
            Err(RewindRefusal::NotFromFork { .. })
        ));
        // Nothing after the fork: nothing to do.
        let empty = plan(library(), fork(), &[], true).unwrap();
        assert!(empty.entries.is_empty() && empty.restore.is_empty());
    }

    #[test]
    fn a_record_goes_back_to_its_state_at_the_fork() {
        let key = RecordKey {
            model: "volume".into(),
            record_id: "a".into(),
        };
        let before = chain(
            Position::default(),
            &[
                ("volume", "a", ChangeOp::Upsert),
                ("volume", "a", ChangeOp::Delete),
            ],
        );
        assert_eq!(
            restore_entry(library(), &key, Some(&before[0]), Seq(10)),
            before[0]
        );
        let deleted = restore_entry(library(), &key, Some(&before[1]), Seq(10));
        assert_eq!(deleted.op, ChangeOp::Delete);
        assert_eq!(deleted.record_id, "a");
        let never = restore_entry(library(), &key, None, Seq(10));
        assert_eq!((never.op, never.data), (ChangeOp::Delete, None));
    }
}
