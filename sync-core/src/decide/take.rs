//! The leader's plan for a push: pure. The shell (`take.rs`, `take_push`) loads what a
//! change is decided on — whether its identity was taken, whether the leader's row is
//! local, the current record, the entries concurrent with it — and executes the plan:
//! writes the outcome, logs it, records a conflict or a rejection.

use crate::merge::{self, Concurrent, Decision, Fields, ModelRules, Pushed};
use crate::protocol::{PROTOCOL_VERSION, PUSH_CHANGES_MAX, PushError, PushRequest, PushedChange};
use crate::{ChangeOp, DeviceId, Hlc, LibraryId, RECORD_BYTES_MAX};

/// Checks a push's envelope: the protocol version, and that it is for this library.
pub(crate) fn check_envelope(request: &PushRequest, library: LibraryId) -> Result<(), PushError> {
    if request.protocol_version != PROTOCOL_VERSION {
        return Err(PushError::VersionMismatch {
            ours: PROTOCOL_VERSION,
            theirs: request.protocol_version,
        });
    }
    if request.library_id != library {
        return Err(PushError::NotLeader(request.library_id));
    }
    Ok(())
}

/// Checks a push's changes as a whole: their number, their order, and that this build
/// can read every one (`schema_version` of a model, `None` when unknown). A change this
/// leader's app cannot read is not rejected (nothing is wrong with it): the push waits
/// until the older app is updated.
pub(crate) fn check_changes(
    changes: &[PushedChange],
    schema_version: &dyn Fn(&str) -> Option<u32>,
) -> Result<(), PushError> {
    if changes.len() > PUSH_CHANGES_MAX {
        return Err(PushError::Transport(format!(
            "a push carries at most {PUSH_CHANGES_MAX} changes, this one {}",
            changes.len()
        )));
    }
    if let Some(pair) = changes.windows(2).find(|w| w[0].id >= w[1].id) {
        return Err(PushError::BadChange {
            id: pair[1].id,
            model: pair[1].model.clone(),
            reason: "outbox ids must ascend within a push".into(),
        });
    }
    for change in changes {
        let bad = |reason: String| PushError::BadChange {
            id: change.id,
            model: change.model.clone(),
            reason,
        };
        match schema_version(&change.model) {
            None => {
                return Err(bad(
                    "the leader's app does not know this model: update the leader's app".into(),
                ));
            }
            Some(ours) if ours != change.schema_version => {
                return Err(bad(format!(
                    "schema version {} on the follower, {ours} on the leader: update the older app",
                    change.schema_version
                )));
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// A change whose own content is fine to decide on: its data parsed, its timestamp capped.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Checked {
    /// The synced fields, for an upsert.
    pub data: Option<Fields>,
    /// The change's timestamp, capped at the leader's `drift_limit`.
    pub hlc: Hlc,
    /// Whether it was capped (a device whose clock runs far ahead).
    pub capped: bool,
}

/// Checks one change's content against `RECORD_BYTES_MAX` and parses its data; caps its
/// timestamp at `drift_limit` (a device whose clock runs far ahead must not win every
/// later merge, nor drag every clock forward). `Err` is the reason to reject it.
pub(crate) fn check_change(change: &PushedChange, drift_limit: Hlc) -> Result<Checked, String> {
    if let Some(text) = &change.data
        && text.len() > RECORD_BYTES_MAX
    {
        return Err(format!(
            "{} bytes of synced data; a record may hold at most {RECORD_BYTES_MAX} \
             (`sync_core::RECORD_BYTES_MAX`)",
            text.len(),
        ));
    }
    let data = match (&change.op, &change.data) {
        (ChangeOp::Upsert, Some(text)) => Some(
            serde_json::from_str::<Fields>(text)
                .map_err(|e| format!("data is not a JSON object: {e}"))?,
        ),
        (ChangeOp::Upsert, None) => return Err("an upsert without data".into()),
        (ChangeOp::Delete, _) => None,
    };
    let capped = change.hlc > drift_limit;
    Ok(Checked {
        data,
        hlc: if capped { drift_limit } else { change.hlc },
        capped,
    })
}

/// What the leader holds of a pushed change's record, loaded in the push's transaction.
#[derive(Debug, Clone, Default)]
pub(crate) struct Loaded {
    /// The leader's row is local (its model's filter excludes it).
    pub local: bool,
    /// The leader's current synced fields, `None` when the record does not exist.
    pub current: Option<Fields>,
    /// Entries of the record by other devices after the change's base.
    pub concurrent: Vec<Concurrent>,
}

/// What to do with one pushed change.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Plan {
    /// The leader's row is local: it is never overwritten. A pushed upsert is answered
    /// with a delete in the author's name (to every other device the record is gone), so
    /// that its author converges; a pushed delete leaves it alone.
    LocalRow { answer_with_delete: bool },
    /// The merge's outcome: the write to make and log, the conflict to record.
    Merge(Decision),
}

/// Decides one change the leader has not taken yet. `Err` is the reason to reject it.
pub(crate) fn plan(
    rules: &ModelRules<'_>,
    change: &PushedChange,
    checked: &Checked,
    device: DeviceId,
    loaded: &Loaded,
) -> Result<Plan, String> {
    if loaded.local {
        return Ok(Plan::LocalRow {
            answer_with_delete: change.op == ChangeOp::Upsert,
        });
    }
    let pushed = Pushed {
        op: change.op,
        data: checked.data.as_ref(),
        changed: &change.changed,
        hlc: checked.hlc,
        device,
    };
    merge::decide(rules, loaded.current.as_ref(), &pushed, &loaded.concurrent).map(Plan::Merge)
}

/// Whether a change of an outbox row written before change identities existed was taken
/// by then (at or below the device's acknowledged outbox id in `sync_pushed`, under the identity derived
/// from the device and the outbox id).
pub(crate) fn taken_before_identities(
    change: &PushedChange,
    device: DeviceId,
    acknowledged: i64,
) -> bool {
    acknowledged >= change.id as i64
        && change.change_id == legacy_change_id(device, change.id as i64)
}

/// The identity of an outbox row written by a build that made none: derived from the
/// device and the outbox id, so that every push of that row carries the same one.
pub(crate) fn legacy_change_id(device: DeviceId, outbox_id: i64) -> uuid::Uuid {
    let digest = blake3::hash(format!("{device}/{outbox_id}").as_bytes());
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest.as_bytes()[..16]);
    uuid::Builder::from_custom_bytes(bytes).into_uuid()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{FieldMerge, FieldSpec, MergeRule, Seq};

    const FIELDS: &[FieldSpec] = &[
        FieldSpec {
            name: "id",
            column: "id",
            synced: true,
            merge: FieldMerge::LastWriteWins,
        },
        FieldSpec {
            name: "name",
            column: "name",
            synced: true,
            merge: FieldMerge::LastWriteWins,
        },
    ];

    fn no_custom(_: &Fields, _: &Fields) -> Result<Option<Fields>, String> {
        Ok(None)
    }

    fn rules() -> ModelRules<'static> {
        ModelRules {
            rule: MergeRule::LastWriteWins,
            fields: FIELDS,
            key_field: "id",
            custom: &no_custom,
        }
    }

    fn device(n: u128) -> DeviceId {
        DeviceId(uuid::Uuid::from_u128(n))
    }

    fn change(id: u64, op: ChangeOp, data: Option<&str>, hlc: u64) -> PushedChange {
        PushedChange {
            id,
            change_id: uuid::Uuid::from_u128(u128::from(id) + 100),
            model: "tag".into(),
            record_id: "r".into(),
            op,
            data: data.map(str::to_owned),
            changed: vec!["name".into()],
            hlc: Hlc::new(hlc, 0),
            schema_version: 1,
            base: Seq(0),
        }
    }

    #[test]
    fn a_change_that_cannot_be_read_is_rejected_with_the_reason() {
        let limit = Hlc::new(10_000, 0);
        let no_data = check_change(&change(1, ChangeOp::Upsert, None, 1), limit);
        assert_eq!(no_data, Err("an upsert without data".into()));
        let not_json = check_change(&change(1, ChangeOp::Upsert, Some("[1]"), 1), limit);
        assert!(not_json.is_err_and(|r| r.contains("not a JSON object")));
        let huge = format!(r#"{{"name":"{}"}}"#, "x".repeat(RECORD_BYTES_MAX));
        let too_big = check_change(&change(1, ChangeOp::Upsert, Some(&huge), 1), limit);
        assert!(too_big.is_err_and(|r| r.contains("RECORD_BYTES_MAX")));
        // A delete carries no data to read.
        assert!(check_change(&change(1, ChangeOp::Delete, None, 1), limit).is_ok());
    }

    #[test]
    fn a_timestamp_far_ahead_is_capped_at_the_limit() {
        let limit = Hlc::new(10_000, 0);
        let ahead = check_change(&change(1, ChangeOp::Delete, None, 20_000), limit);
        assert_eq!(
            ahead,
            Ok(Checked {
                data: None,
                hlc: limit,
                capped: true
            })
        );
        let behind = check_change(&change(1, ChangeOp::Delete, None, 5), limit);
        assert_eq!(
            behind.map(|c| (c.hlc, c.capped)),
            Ok((Hlc::new(5, 0), false))
        );
    }

    #[test]
    fn a_local_row_is_never_overwritten_and_an_upsert_is_answered_with_a_delete() {
        let loaded = Loaded {
            local: true,
            current: Some(Fields::new()),
            concurrent: Vec::new(),
        };
        let upsert = change(1, ChangeOp::Upsert, Some(r#"{"id":"r","name":"x"}"#), 5);
        let checked = check_change(&upsert, Hlc::new(10_000, 0)).expect("readable");
        assert_eq!(
            plan(&rules(), &upsert, &checked, device(1), &loaded),
            Ok(Plan::LocalRow {
                answer_with_delete: true
            })
        );
        let delete = change(2, ChangeOp::Delete, None, 5);
        let checked = check_change(&delete, Hlc::new(10_000, 0)).expect("readable");
        assert_eq!(
            plan(&rules(), &delete, &checked, device(1), &loaded),
            Ok(Plan::LocalRow {
                answer_with_delete: false
            })
        );
    }

    #[test]
    fn a_change_nothing_concurrent_with_is_written_as_pushed() {
        let upsert = change(1, ChangeOp::Upsert, Some(r#"{"id":"r","name":"x"}"#), 5);
        let checked = check_change(&upsert, Hlc::new(10_000, 0)).expect("readable");
        let Ok(Plan::Merge(decision)) =
            plan(&rules(), &upsert, &checked, device(1), &Loaded::default())
        else {
            panic!("a merge");
        };
        let write = decision.write.expect("a write");
        assert_eq!(write.op, ChangeOp::Upsert);
        assert_eq!(write.hlc, Hlc::new(5, 0));
        assert_eq!(decision.conflict, None);
    }

    #[test]
    fn a_push_is_checked_whole_before_anything_is_taken() {
        let known = |model: &str| (model == "tag").then_some(1);
        let a = change(1, ChangeOp::Delete, None, 1);
        let b = change(2, ChangeOp::Delete, None, 1);
        assert!(check_changes(&[a.clone(), b.clone()], &known).is_ok());
        assert!(matches!(
            check_changes(&[b.clone(), a.clone()], &known),
            Err(PushError::BadChange { id: 1, .. })
        ));
        let unknown = PushedChange {
            model: "other".into(),
            ..a.clone()
        };
        assert!(matches!(
            check_changes(&[unknown], &known),
            Err(PushError::BadChange { reason, .. }) if reason.contains("does not know")
        ));
        let newer = PushedChange {
            schema_version: 2,
            ..a.clone()
        };
        assert!(matches!(
            check_changes(&[newer], &known),
            Err(PushError::BadChange { reason, .. }) if reason.contains("schema version 2")
        ));
        let many: Vec<_> = (1..=PUSH_CHANGES_MAX as u64 + 1)
            .map(|id| change(id, ChangeOp::Delete, None, 1))
            .collect();
        assert!(matches!(
            check_changes(&many, &known),
            Err(PushError::Transport(_))
        ));
    }

    #[test]
    fn a_push_for_another_library_or_version_is_refused() {
        let library = LibraryId(uuid::Uuid::from_u128(1));
        let request = PushRequest {
            protocol_version: PROTOCOL_VERSION,
            library_id: library,
            device_id: device(1),
            epoch: crate::Epoch::UNSTATED,
            changes: Vec::new(),
        };
        assert!(check_envelope(&request, library).is_ok());
        let other = LibraryId(uuid::Uuid::from_u128(2));
        assert!(matches!(
            check_envelope(&request, other),
            Err(PushError::NotLeader(_))
        ));
        let newer = PushRequest {
            protocol_version: PROTOCOL_VERSION + 1,
            ..request
        };
        assert!(matches!(
            check_envelope(&newer, library),
            Err(PushError::VersionMismatch { .. })
        ));
    }

    #[test]
    fn outbox_rows_from_before_identities_are_taken_once_up_to_the_mark() {
        let mut old = change(7, ChangeOp::Delete, None, 1);
        old.change_id = legacy_change_id(device(1), 7);
        assert!(taken_before_identities(&old, device(1), 7));
        assert!(!taken_before_identities(&old, device(1), 6));
        // Another device's row 7 has another identity.
        assert!(!taken_before_identities(&old, device(2), 7));
        // A change with an identity of its own is never taken by the acknowledged outbox id.
        assert!(!taken_before_identities(
            &change(7, ChangeOp::Delete, None, 1),
            device(1),
            9
        ));
    }
}
