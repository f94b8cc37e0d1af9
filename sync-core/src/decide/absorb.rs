//! How a follower absorbs pulled responses: pure. Given the position a response must
//! continue and its items, decide what applies (runs of one model, in log order), what is
//! parked, what passes over a local row, and the position reached — or the refusal that
//! stops the transaction. `follower.rs` loads the inputs and executes the plan.

use crate::entry::{ChainError, verify_chain};
use crate::follower::Position;
use crate::protocol::{PROTOCOL_VERSION, PullResponse, PulledItem};
use crate::{Hlc, LibraryId, LogEntry, Seq};

/// Why a response cannot be absorbed. The shell turns it into `ApplyError`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The leader speaks another protocol version.
    VersionMismatch { theirs: u32 },
    /// The response is about another library.
    WrongLibrary { found: LibraryId },
    /// The items do not continue the position (a gap, another checksum).
    Chain(ChainError),
    /// An entry of a model this build does not know.
    UnknownModel { seq: Seq, model: String },
    /// An entry of another schema version of its model.
    SchemaMismatch {
        seq: Seq,
        model: String,
        ours: u32,
        theirs: u32,
    },
}

/// Checks a response's envelope: protocol version and library.
pub(crate) fn check_response(library: LibraryId, response: &PullResponse) -> Result<(), Refusal> {
    if response.protocol_version != PROTOCOL_VERSION {
        return Err(Refusal::VersionMismatch {
            theirs: response.protocol_version,
        });
    }
    if response.library_id != library {
        return Err(Refusal::WrongLibrary {
            found: response.library_id,
        });
    }
    Ok(())
}

/// What absorbing one response's items does.
#[derive(Debug, Default)]
pub(crate) struct Plan<'a> {
    /// Runs of consecutive applied entries of one model, in log order (a parked or a
    /// local entry does not end a run; another model's entry does).
    pub runs: Vec<Vec<&'a LogEntry>>,
    /// Entries set aside instead of applied, with the reason.
    pub parked: Vec<(&'a LogEntry, String)>,
    /// Entries applied (the runs' lengths, summed).
    pub entries: usize,
    /// The position once everything before the refusal (if any) is absorbed.
    pub position: Position,
    /// Entries of sync-core's reserved models (membership, move records), in log order,
    /// each with the position right before it: applied to the sync tables, never through
    /// the app's registry, and never parked or passed over as local.
    pub reserved: Vec<(&'a LogEntry, Position)>,
    /// The newest HLC among applied entries: the clock observes it.
    pub observed: Option<Hlc>,
    /// What stopped the plan. The runs before it are kept (so that an execution error
    /// before the refusal is reported first, in log order); the run it interrupted is not.
    pub refusal: Option<Refusal>,
}

/// What the shell knows of this device, for [`absorb`].
pub(crate) struct Here<'a> {
    /// This build's schema version of a model, `None` for an unknown model.
    pub schema_version: &'a dyn Fn(&str) -> Option<u32>,
    /// Whether an entry's record is local to this device (applied nowhere here).
    pub is_local: &'a dyn Fn(&LogEntry) -> bool,
    /// Why an entry is parked, if it is (the parking requests; stateful: a parked
    /// record parks its later entries).
    pub parks: &'a mut dyn FnMut(&LogEntry) -> Option<String>,
}

/// Plans absorbing `items`, which must continue `from`.
pub(crate) fn absorb<'a>(from: Position, items: &'a [PulledItem], mut here: Here<'_>) -> Plan<'a> {
    let mut plan = Plan {
        position: from,
        ..Plan::default()
    };
    let mut expected = from.seq.next();
    let mut checksum = from.checksum;
    let mut run: Vec<&LogEntry> = Vec::new();
    for item in items {
        let refusal = match item {
            PulledItem::Skipped {
                through,
                checksum: at,
            } => {
                // Seqs are stored as i64: a run past that is no continuation either.
                if *through < expected || through.0 > i64::MAX as u64 {
                    Some(Refusal::Chain(ChainError::Gap {
                        expected,
                        found: *through,
                    }))
                } else {
                    checksum = *at;
                    expected = through.next();
                    None
                }
            }
            PulledItem::Entry(entry) => absorb_entry(
                entry,
                &mut expected,
                &mut checksum,
                &mut run,
                &mut plan,
                &mut here,
            ),
        };
        if let Some(refusal) = refusal {
            plan.refusal = Some(refusal);
            return plan;
        }
        plan.position = Position {
            seq: Seq(expected.0 - 1),
            checksum,
        };
    }
    if !run.is_empty() {
        plan.runs.push(run);
    }
    plan
}

fn absorb_entry<'a>(
    entry: &'a LogEntry,
    expected: &mut Seq,
    checksum: &mut u64,
    run: &mut Vec<&'a LogEntry>,
    plan: &mut Plan<'a>,
    here: &mut Here<'_>,
) -> Option<Refusal> {
    if let Err(e) = verify_chain(Seq(expected.0 - 1), *checksum, std::slice::from_ref(entry)) {
        return Some(Refusal::Chain(e));
    }
    let before = Position {
        seq: Seq(expected.0 - 1),
        checksum: *checksum,
    };
    *checksum = entry.checksum;
    *expected = expected.next();
    if crate::leadership::is_reserved_model(&entry.model) {
        let known = matches!(
            entry.model.as_str(),
            crate::leadership::MEMBER_MODEL
                | crate::leadership::LEADER_MODEL
                | crate::leadership::TAKEN_MODEL
                | crate::leadership::INVITE_MODEL
                | crate::leadership::PEER_MODEL
                | crate::leadership::REJECTED_MODEL
        );
        if !known {
            return Some(Refusal::UnknownModel {
                seq: entry.seq,
                model: entry.model.clone(),
            });
        }
        if entry.schema_version != crate::leadership::RESERVED_SCHEMA_VERSION {
            return Some(Refusal::SchemaMismatch {
                seq: entry.seq,
                model: entry.model.clone(),
                ours: crate::leadership::RESERVED_SCHEMA_VERSION,
                theirs: entry.schema_version,
            });
        }
        plan.observed = plan.observed.max(Some(entry.hlc));
        plan.entries += 1;
        plan.reserved.push((entry, before));
        return None;
    }
    if let Some(reason) = (here.parks)(entry) {
        // Set aside, not applied: the position still moves past it.
        plan.parked.push((entry, reason));
        return None;
    }
    if (here.is_local)(entry) {
        // This device's row is local (its filter excludes it): entries from elsewhere
        // never touch it.
        return None;
    }
    match (here.schema_version)(&entry.model) {
        None => {
            return Some(Refusal::UnknownModel {
                seq: entry.seq,
                model: entry.model.clone(),
            });
        }
        Some(ours) if ours != entry.schema_version => {
            return Some(Refusal::SchemaMismatch {
                seq: entry.seq,
                model: entry.model.clone(),
                ours,
                theirs: entry.schema_version,
            });
        }
        Some(_) => {}
    }
    plan.observed = plan.observed.max(Some(entry.hlc));
    plan.entries += 1;
    if run.first().is_some_and(|first| first.model != entry.model) {
        plan.runs.push(std::mem::take(run));
    }
    run.push(entry);
    None
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::{ChangeOp, DeviceId};

    fn library() -> LibraryId {
        LibraryId(uuid::Uuid::from_u128(1))
    }

    /// Entries after `from` for `(model, record)` pairs, chained.
    fn chain(from: Position, records: &[(&str, &str)]) -> Vec<PulledItem> {
        let mut prev = from.checksum;
        let mut seq = from.seq;
        records
            .iter()
            .enumerate()
            .map(|(i, (model, record))| {
                seq = seq.next();
                let mut entry = LogEntry {
                    library_id: library(),
                    seq,
                    model: (*model).into(),
                    record_id: (*record).into(),
                    op: ChangeOp::Upsert,
                    data: Some("{}".into()),
                    changed: Vec::new(),
                    device_id: DeviceId(uuid::Uuid::from_u128(2)),
                    hlc: Hlc::new(1_000 + i as u64, 0),
                    schema_version: 1,
                    checksum: 0,
                };
                entry.checksum = entry.chained_checksum(prev);
                prev = entry.checksum;
                PulledItem::Entry(entry)
            })
            .collect()
    }

    fn known(model: &str) -> Option<u32> {
        matches!(model, "a" | "b").then_some(1)
    }

    fn plan(from: Position, items: &[PulledItem]) -> Plan<'_> {
        absorb(
            from,
            items,
            Here {
                schema_version: &known,
                is_local: &|_| false,
                parks: &mut |_| None,
            },
        )
    }

    fn seqs(run: &[&LogEntry]) -> Vec<u64> {
        run.iter().map(|e| e.seq.0).collect()
    }

    #[test]
    fn reserved_entries_go_to_the_sync_tables_with_their_position() {
        let items = chain(
            Position::default(),
            &[
                ("a", "1"),
                (crate::leadership::MEMBER_MODEL, "d"),
                ("a", "2"),
            ],
        );
        let plan = plan(Position::default(), &items);
        assert_eq!(plan.refusal, None);
        let reserved: Vec<_> = plan
            .reserved
            .iter()
            .map(|(entry, before)| (entry.seq.0, before.seq.0))
            .collect();
        assert_eq!(reserved, vec![(2, 1)]);
        assert_eq!(plan.entries, 3);
        // Not through the registry: the app's runs hold only its own models.
        let runs: Vec<_> = plan.runs.iter().map(|r| seqs(r)).collect();
        assert_eq!(runs, vec![vec![1, 3]]);
        // A reserved model this build does not know stops the batch.
        let items = chain(Position::default(), &[("a", "1"), ("sync.unknown", "x")]);
        assert!(matches!(
            plan_of(&items).refusal,
            Some(Refusal::UnknownModel { seq: Seq(2), .. })
        ));
    }

    fn plan_of(items: &[PulledItem]) -> Plan<'_> {
        plan(Position::default(), items)
    }

    #[test]
    fn runs_follow_the_model_and_the_position_the_last_item() {
        let items = chain(
            Position::default(),
            &[("a", "1"), ("a", "2"), ("b", "1"), ("a", "3")],
        );
        let plan = plan(Position::default(), &items);
        assert_eq!(plan.refusal, None);
        let runs: Vec<_> = plan.runs.iter().map(|r| seqs(r)).collect();
        assert_eq!(runs, vec![vec![1, 2], vec![3], vec![4]]);
        assert_eq!(plan.entries, 4);
        assert_eq!(plan.position.seq, Seq(4));
        assert_eq!(
            Some(plan.position.checksum),
            items.last().map(|i| match i {
                PulledItem::Entry(e) => e.checksum,
                PulledItem::Skipped { checksum, .. } => *checksum,
            })
        );
        assert_eq!(plan.observed, Some(Hlc::new(1_003, 0)));
    }

    #[test]
    fn a_skipped_run_moves_the_position_and_a_gap_is_refused() {
        let items = vec![PulledItem::Skipped {
            through: Seq(5),
            checksum: 77,
        }];
        let moved = plan(Position::default(), &items);
        assert_eq!(moved.refusal, None);
        assert_eq!(
            moved.position,
            Position {
                seq: Seq(5),
                checksum: 77
            }
        );
        assert_eq!(moved.entries, 0);
        // A skipped run that ends before the position is no continuation.
        let from = Position {
            seq: Seq(9),
            checksum: 1,
        };
        let refused = plan(from, &items);
        assert!(matches!(
            refused.refusal,
            Some(Refusal::Chain(ChainError::Gap { .. }))
        ));
        assert_eq!(refused.position, from);
    }

    #[test]
    fn another_history_is_refused_before_anything_of_it() {
        let items = chain(
            Position {
                seq: Seq(3),
                checksum: 5,
            },
            &[("a", "1"), ("a", "2")],
        );
        let plan = plan(
            Position {
                seq: Seq(3),
                checksum: 6,
            },
            &items,
        );
        assert!(matches!(
            plan.refusal,
            Some(Refusal::Chain(ChainError::Mismatch { seq: Seq(4), .. }))
        ));
        assert!(plan.runs.is_empty());
        assert_eq!(plan.position.seq, Seq(3));
    }

    #[test]
    fn unknown_models_and_schema_versions_are_refused_keeping_only_earlier_runs() {
        let items = chain(
            Position::default(),
            &[("a", "1"), ("b", "1"), ("b", "2"), ("z", "1")],
        );
        let plan = plan(Position::default(), &items);
        assert_eq!(
            plan.refusal,
            Some(Refusal::UnknownModel {
                seq: Seq(4),
                model: "z".into()
            })
        );
        // The run of `b` the refusal interrupted is not built.
        let runs: Vec<_> = plan.runs.iter().map(|r| seqs(r)).collect();
        assert_eq!(runs, vec![vec![1]]);
        assert_eq!(plan.position.seq, Seq(3));

        let newer = absorb(
            Position::default(),
            &items[..1],
            Here {
                schema_version: &|_| Some(2),
                is_local: &|_| false,
                parks: &mut |_| None,
            },
        );
        assert_eq!(
            newer.refusal,
            Some(Refusal::SchemaMismatch {
                seq: Seq(1),
                model: "a".into(),
                ours: 2,
                theirs: 1
            })
        );
    }

    #[test]
    fn parked_and_local_entries_are_passed_over_but_the_position_moves() {
        let items = chain(
            Position::default(),
            &[("a", "1"), ("a", "2"), ("a", "3"), ("z", "9")],
        );
        let mut parked_records = Vec::new();
        let plan = absorb(
            Position::default(),
            &items,
            Here {
                schema_version: &known,
                // `z` is unknown, but its row is local: never checked, never applied.
                is_local: &|e| e.model == "z",
                parks: &mut |e| {
                    (e.record_id == "2").then(|| {
                        parked_records.push(e.seq);
                        "asked".to_owned()
                    })
                },
            },
        );
        assert_eq!(plan.refusal, None);
        assert_eq!(
            plan.runs.iter().map(|r| seqs(r)).collect::<Vec<_>>(),
            vec![vec![1, 3]]
        );
        assert_eq!(plan.parked.len(), 1);
        assert_eq!(plan.parked[0].0.seq, Seq(2));
        assert_eq!(plan.entries, 2);
        assert_eq!(plan.position.seq, Seq(4));
        assert_eq!(parked_records, vec![Seq(2)]);
    }

    #[test]
    fn a_response_for_another_library_or_version_is_refused() {
        let response = PullResponse {
            protocol_version: PROTOCOL_VERSION,
            library_id: library(),
            latest_seq: Seq(0),
            items: Vec::new(),
            epoch: crate::Epoch::FIRST,
        };
        assert_eq!(check_response(library(), &response), Ok(()));
        let other = LibraryId(uuid::Uuid::from_u128(9));
        assert_eq!(
            check_response(other, &response),
            Err(Refusal::WrongLibrary { found: library() })
        );
        let newer = PullResponse {
            protocol_version: PROTOCOL_VERSION + 1,
            ..response
        };
        assert!(matches!(
            check_response(library(), &newer),
            Err(Refusal::VersionMismatch { .. })
        ));
    }

    proptest! {
        /// Absorbing a log in two responses reaches what absorbing it in one does, and
        /// every run holds one model, in log order, each entry once.
        #[test]
        fn split_responses_absorb_like_one(
            models in proptest::collection::vec(prop_oneof![Just("a"), Just("b")], 1..40),
            cut in 0usize..40,
        ) {
            let records: Vec<(&str, &str)> = models.iter().map(|m| (*m, "r")).collect();
            let items = chain(Position::default(), &records);
            let cut = cut.min(items.len());
            let whole = plan(Position::default(), &items);
            let first = plan(Position::default(), &items[..cut]);
            let second = plan(first.position, &items[cut..]);
            prop_assert_eq!(whole.refusal.clone(), None);
            prop_assert_eq!(second.refusal.clone(), None);
            prop_assert_eq!(second.position, whole.position);
            prop_assert_eq!(first.entries + second.entries, items.len());
            let applied: Vec<u64> = whole.runs.iter().flat_map(|r| seqs(r)).collect();
            prop_assert_eq!(applied, (1..=items.len() as u64).collect::<Vec<_>>());
            for run in &whole.runs {
                prop_assert!(run.iter().all(|e| e.model == run[0].model));
            }
            for pair in whole.runs.windows(2) {
                prop_assert_ne!(&pair[0][0].model, &pair[1][0].model);
            }
        }
    }
}
