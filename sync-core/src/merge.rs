//! The leader's merge decision for one pushed change: pure, no I/O.
//!
//! The leader is the only sequencer, so what a follower knew when it wrote is one number:
//! its position in the log (`PushedChange::base`). An entry of the same record by another
//! device with a seq above that base was made without the follower having seen it: the two
//! are concurrent, and the model's rule merges them. With no such entry the pushed change
//! simply comes later and is taken as it is. (A version vector reduces to this with one
//! sequencer: every device's knowledge of others is a prefix of the log, plus its own
//! unpushed writes, which the outbox keeps in order.)
//!
//! Outcomes, per combination (the leader's current record is "local", the push "remote"):
//!
//! | local \ pushed      | upsert                                   | delete                      |
//! | ---                 | ---                                      | ---                         |
//! | record exists       | by the model's rule (below)              | the later HLC wins          |
//! | record gone         | the later HLC wins (a win re-creates it) | nothing to do               |
//!
//! Upsert against upsert (this includes two devices creating one id):
//! - `LastWriteWins`: the whole record of the later HLC (ties: the greater device id).
//! - `FieldLevel`: per field the pushed change set — a field no concurrent entry touched
//!   takes the pushed value; otherwise `LastWriteWins` fields go by HLC, `Union` fields
//!   keep both sides' elements (local order, then the pushed side's new ones), `Manual`
//!   fields keep the local value and record a conflict holding both.
//! - `Custom`: the model's `merge_custom(local, remote)`; `None` falls back to HLC.
//! - `Manual`: the local record stays and a conflict records both sides.
//!
//! A delete that loses leaves the record as it is; an upsert that loses is not taken. In
//! either case, and wherever the merged outcome differs from what the pushing device holds
//! (a field kept by a manual conflict, a union, a lost last-write-wins field), the leader
//! still logs the record's outcome for the fields the change touched: the pushing device
//! may already have pulled the entries that beat it (and edited on top of them), so
//! waiting for it to pull those again would leave it diverged.

use serde_json::{Map, Value};

use crate::{ChangeOp, DeviceId, FieldMerge, FieldSpec, Hlc, MergeRule};

/// Synced fields of one record, as JSON.
pub(crate) type Fields = Map<String, Value>;

/// An entry of another device that the pushing device had not seen.
#[derive(Clone, Debug)]
pub(crate) struct Concurrent {
    pub(crate) op: ChangeOp,
    pub(crate) changed: Vec<String>,
    pub(crate) hlc: Hlc,
    pub(crate) device: DeviceId,
}

/// The pushed change.
#[derive(Clone, Debug)]
pub(crate) struct Pushed<'a> {
    pub(crate) op: ChangeOp,
    pub(crate) data: Option<&'a Fields>,
    pub(crate) changed: &'a [String],
    pub(crate) hlc: Hlc,
    pub(crate) device: DeviceId,
}

/// What the leader writes (and logs) for a pushed change.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Write {
    pub(crate) op: ChangeOp,
    /// The whole record's synced fields after the write; `None` for a delete.
    pub(crate) data: Option<Fields>,
    /// The synced fields the write sets (what a `FieldLevel` follower updates).
    pub(crate) changed: Vec<String>,
    pub(crate) hlc: Hlc,
}

/// Both sides of a manual conflict: the kept value and the one set aside.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Conflict {
    pub(crate) local: Fields,
    pub(crate) remote: Fields,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Decision {
    pub(crate) write: Option<Write>,
    pub(crate) conflict: Option<Conflict>,
}

/// A model's `merge_custom(local, remote)` on synced fields.
pub(crate) type CustomMerge<'a> =
    dyn Fn(&Fields, &Fields) -> Result<Option<Fields>, String> + Sync + 'a;

/// The model as the merge sees it.
pub(crate) struct ModelRules<'a> {
    pub(crate) rule: MergeRule,
    pub(crate) fields: &'static [FieldSpec],
    pub(crate) key_field: &'static str,
    /// `merge_custom(local, remote)` for `MergeRule::Custom`.
    pub(crate) custom: &'a CustomMerge<'a>,
}

impl ModelRules<'_> {
    fn synced(&self) -> impl Iterator<Item = &'static FieldSpec> + '_ {
        self.fields
            .iter()
            .filter(|f| f.synced && f.name != self.key_field)
    }
}

/// Decides what the leader does with `pushed`, given its current record and the entries
/// concurrent with it.
pub(crate) fn decide(
    model: &ModelRules<'_>,
    current: Option<&Fields>,
    pushed: &Pushed<'_>,
    concurrent: &[Concurrent],
) -> Result<Decision, String> {
    let decision = merge(model, current, pushed, concurrent)?;
    let merged_hlc = concurrent.iter().map(|c| c.hlc).fold(pushed.hlc, Hlc::max);
    Ok(restate(model, current, pushed, decision, merged_hlc))
}

/// Makes the decision's entry carry the outcome of every field the pushed change touched
/// where the outcome differs from the pushed value, so that the pushing device converges.
fn restate(
    model: &ModelRules<'_>,
    current: Option<&Fields>,
    pushed: &Pushed<'_>,
    mut decision: Decision,
    hlc: Hlc,
) -> Decision {
    let after = match &decision.write {
        Some(write) if write.op == ChangeOp::Delete => None,
        Some(write) => write.data.as_ref(),
        None => current,
    };
    let touched: Vec<String> = if model.rule == MergeRule::FieldLevel {
        pushed
            .changed
            .iter()
            .filter(|f| f.as_str() != model.key_field)
            .cloned()
            .collect()
    } else {
        model.synced().map(|f| f.name.to_owned()).collect()
    };
    match (pushed.op, after) {
        // Gone on the leader, kept by the pushing device: say it is gone.
        (ChangeOp::Upsert, None) if decision.write.is_none() => {
            decision.write = Some(Write {
                op: ChangeOp::Delete,
                data: None,
                changed: Vec::new(),
                hlc,
            });
        }
        (ChangeOp::Upsert, Some(after)) => {
            let data = pushed.data.cloned().unwrap_or_default();
            let differ: Vec<String> = touched
                .into_iter()
                .filter(|f| after.get(f) != data.get(f))
                .collect();
            if differ.is_empty() {
                return decision;
            }
            let after = after.clone();
            let write = decision.write.get_or_insert_with(|| Write {
                op: ChangeOp::Upsert,
                data: Some(after),
                changed: Vec::new(),
                hlc,
            });
            for field in differ {
                if !write.changed.contains(&field) {
                    write.changed.push(field);
                }
            }
        }
        // Deleted by the pushing device, kept on the leader: restate the whole record.
        (ChangeOp::Delete, Some(after)) if decision.write.is_none() => {
            decision.write = Some(Write {
                op: ChangeOp::Upsert,
                data: Some(after.clone()),
                changed: model.synced().map(|f| f.name.to_owned()).collect(),
                hlc,
            });
        }
        _ => {}
    }
    decision
}

/// The merge proper: what the rules say, before restating.
fn merge(
    model: &ModelRules<'_>,
    current: Option<&Fields>,
    pushed: &Pushed<'_>,
    concurrent: &[Concurrent],
) -> Result<Decision, String> {
    let newest = concurrent.iter().map(|c| (c.hlc, c.device)).max();
    let pushed_wins = newest.is_none_or(|n| (pushed.hlc, pushed.device) > n);
    let merged_hlc = newest.map_or(pushed.hlc, |(h, _)| h.max(pushed.hlc));
    let all_fields = || {
        model
            .synced()
            .map(|f| f.name.to_owned())
            .collect::<Vec<_>>()
    };
    let write = |op, data: Option<Fields>, changed: Vec<String>, hlc| {
        Ok(Decision {
            write: Some(Write {
                op,
                data,
                changed,
                hlc,
            }),
            conflict: None,
        })
    };
    match (pushed.op, current) {
        (ChangeOp::Delete, None) => Ok(Decision::default()),
        (ChangeOp::Delete, Some(_)) if pushed_wins => {
            write(ChangeOp::Delete, None, Vec::new(), merged_hlc)
        }
        (ChangeOp::Delete, Some(_)) => Ok(Decision::default()),
        (ChangeOp::Upsert, current) => {
            let data = pushed
                .data
                .ok_or_else(|| "an upsert without data".to_owned())?;
            match current {
                None if pushed_wins => write(
                    ChangeOp::Upsert,
                    Some(data.clone()),
                    all_fields(),
                    merged_hlc,
                ),
                None => Ok(Decision::default()),
                Some(current) if concurrent.is_empty() => {
                    // Nothing it had not seen: the pushed change simply comes later.
                    if model.rule == MergeRule::FieldLevel {
                        let mut next = current.clone();
                        for field in pushed.changed {
                            if let Some(value) = data.get(field) {
                                next.insert(field.clone(), value.clone());
                            }
                        }
                        changed_write(current, next, pushed.hlc)
                    } else {
                        write(
                            ChangeOp::Upsert,
                            Some(data.clone()),
                            pushed.changed.to_vec(),
                            pushed.hlc,
                        )
                    }
                }
                Some(current) => merge_concurrent(
                    model,
                    current,
                    data,
                    pushed,
                    concurrent,
                    pushed_wins,
                    merged_hlc,
                ),
            }
        }
    }
}

/// Upsert against a record that changed concurrently.
fn merge_concurrent(
    model: &ModelRules<'_>,
    current: &Fields,
    data: &Fields,
    pushed: &Pushed<'_>,
    concurrent: &[Concurrent],
    pushed_wins: bool,
    merged_hlc: Hlc,
) -> Result<Decision, String> {
    match model.rule {
        MergeRule::FieldLevel => {
            let mut next = current.clone();
            let mut local = Fields::new();
            let mut remote = Fields::new();
            for spec in model.synced() {
                let name = spec.name;
                if !pushed.changed.iter().any(|c| c == name) {
                    continue;
                }
                let Some(theirs) = data.get(name) else {
                    continue;
                };
                let touched = concurrent
                    .iter()
                    .filter(|c| c.op == ChangeOp::Delete || c.changed.iter().any(|f| f == name))
                    .map(|c| (c.hlc, c.device))
                    .max();
                let Some(touched) = touched else {
                    next.insert(name.to_owned(), theirs.clone());
                    continue;
                };
                let ours = current.get(name).cloned().unwrap_or(Value::Null);
                match spec.merge {
                    FieldMerge::LastWriteWins => {
                        if (pushed.hlc, pushed.device) > touched {
                            next.insert(name.to_owned(), theirs.clone());
                        }
                    }
                    FieldMerge::Union => {
                        next.insert(name.to_owned(), union(&ours, theirs));
                    }
                    FieldMerge::Manual => {
                        if &ours != theirs {
                            local.insert(name.to_owned(), ours);
                            remote.insert(name.to_owned(), theirs.clone());
                        }
                    }
                }
            }
            // Stamped with the pushed change's time: the fields it writes carry its values
            // (a union holds both sides; its elements are never lost to a later stamp).
            let mut decision = changed_write(current, next, pushed.hlc)?;
            if !remote.is_empty() {
                decision.conflict = Some(Conflict { local, remote });
            }
            Ok(decision)
        }
        MergeRule::Manual => {
            if without_key(current, model.key_field) == without_key(data, model.key_field) {
                return Ok(Decision::default());
            }
            Ok(Decision {
                write: None,
                conflict: Some(Conflict {
                    local: without_key(current, model.key_field),
                    remote: without_key(data, model.key_field),
                }),
            })
        }
        MergeRule::Custom => match (model.custom)(current, data)? {
            Some(merged) => changed_write(current, merged, merged_hlc),
            None if pushed_wins => changed_write(current, data.clone(), merged_hlc),
            None => Ok(Decision::default()),
        },
        // LastWriteWins, and any rule added later: the whole record of the later change.
        _ => {
            if pushed_wins {
                changed_write(current, data.clone(), merged_hlc)
            } else {
                Ok(Decision::default())
            }
        }
    }
}

/// An upsert of `next` over `current`, naming the fields that differ; nothing if none do.
fn changed_write(current: &Fields, next: Fields, hlc: Hlc) -> Result<Decision, String> {
    let changed: Vec<String> = next
        .iter()
        .filter(|(k, v)| current.get(*k) != Some(*v))
        .map(|(k, _)| k.clone())
        .collect();
    if changed.is_empty() {
        return Ok(Decision::default());
    }
    Ok(Decision {
        write: Some(Write {
            op: ChangeOp::Upsert,
            data: Some(next),
            changed,
            hlc,
        }),
        conflict: None,
    })
}

fn without_key(fields: &Fields, key: &str) -> Fields {
    let mut fields = fields.clone();
    fields.remove(key);
    fields
}

/// Set union of two JSON arrays: `ours` in its order, then `theirs`' elements it lacks.
/// Anything but two arrays is not a set: the pushed value wins.
fn union(ours: &Value, theirs: &Value) -> Value {
    match (ours, theirs) {
        (Value::Array(ours), Value::Array(theirs)) => {
            let mut out = ours.clone();
            for item in theirs {
                if !out.contains(item) {
                    out.push(item.clone());
                }
            }
            Value::Array(out)
        }
        (_, theirs) => theirs.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            merge: FieldMerge::Manual,
        },
        FieldSpec {
            name: "tags",
            column: "tags",
            synced: true,
            merge: FieldMerge::Union,
        },
        FieldSpec {
            name: "notes",
            column: "notes",
            synced: true,
            merge: FieldMerge::LastWriteWins,
        },
    ];

    fn no_custom(_: &Fields, _: &Fields) -> Result<Option<Fields>, String> {
        Ok(None)
    }

    fn rules(rule: MergeRule) -> ModelRules<'static> {
        ModelRules {
            rule,
            fields: FIELDS,
            key_field: "id",
            custom: &no_custom,
        }
    }

    fn fields(json: serde_json::Value) -> Fields {
        match json {
            Value::Object(map) => map,
            _ => Fields::new(),
        }
    }

    fn device(n: u8) -> DeviceId {
        DeviceId(uuid::Uuid::from_bytes([n; 16]))
    }

    /// The leader's record stays as it was, and the decision restates it to the pushing
    /// device: every field the losing change touched is in the entry.
    fn keeps(decision: &Decision, current: &Fields) -> bool {
        decision.write.as_ref().is_some_and(|w| {
            w.op == ChangeOp::Upsert && w.data.as_ref() == Some(current) && !w.changed.is_empty()
        })
    }

    /// An upsert pushed by device 2 at wall time `hlc`.
    fn upsert<'a>(data: &'a Fields, changed: &'a [String], hlc: u64) -> Pushed<'a> {
        Pushed {
            op: ChangeOp::Upsert,
            data: Some(data),
            changed,
            hlc: Hlc::new(hlc, 0),
            device: device(2),
        }
    }

    fn theirs(changed: &[&str], hlc: u64) -> Concurrent {
        Concurrent {
            op: ChangeOp::Upsert,
            changed: changed.iter().map(|s| (*s).to_owned()).collect(),
            hlc: Hlc::new(hlc, 0),
            device: device(1),
        }
    }

    #[test]
    fn field_level_merges_each_field_by_its_own_rule() {
        let current =
            fields(serde_json::json!({"id": "r", "name": "A", "tags": ["x"], "notes": "old"}));
        let data =
            fields(serde_json::json!({"id": "r", "name": "B", "tags": ["y"], "notes": "new"}));
        let changed = ["name".to_owned(), "tags".to_owned(), "notes".to_owned()];
        let pushed = upsert(&data, &changed, 5);
        // Another device renamed and retagged later; nobody else touched the notes.
        let decision = decide(
            &rules(MergeRule::FieldLevel),
            Some(&current),
            &pushed,
            &[theirs(&["name", "tags"], 9)],
        )
        .expect("decide");
        let write = decision.write.expect("a write");
        assert_eq!(
            Value::Object(write.data.expect("data")),
            serde_json::json!({"id": "r", "name": "A", "tags": ["x", "y"], "notes": "new"})
        );
        let conflict = decision.conflict.expect("a conflict on name");
        assert_eq!(
            Value::Object(conflict.local),
            serde_json::json!({"name": "A"})
        );
        assert_eq!(
            Value::Object(conflict.remote),
            serde_json::json!({"name": "B"})
        );
    }

    #[test]
    fn last_write_wins_by_hlc_then_device() {
        let current =
            fields(serde_json::json!({"id": "r", "name": "A", "tags": [], "notes": null}));
        let data = fields(serde_json::json!({"id": "r", "name": "B", "tags": [], "notes": null}));
        let changed = ["name".to_owned()];
        let at = |hlc| upsert(&data, &changed, hlc);
        let lww = rules(MergeRule::LastWriteWins);
        let earlier =
            decide(&lww, Some(&current), &at(3), &[theirs(&["name"], 4)]).expect("decide");
        assert!(keeps(&earlier, &current), "{earlier:?}");
        let later = decide(&lww, Some(&current), &at(5), &[theirs(&["name"], 4)]).expect("decide");
        assert_eq!(later.write.expect("write").changed, vec!["name".to_owned()]);
        // Equal HLCs: the greater device id (2 > 1) wins, the same on every device.
        let tie = decide(&lww, Some(&current), &at(4), &[theirs(&["name"], 4)]).expect("decide");
        assert!(tie.write.is_some());
    }

    #[test]
    fn delete_against_update_goes_by_hlc() {
        let current =
            fields(serde_json::json!({"id": "r", "name": "A", "tags": [], "notes": null}));
        let delete = |hlc| Pushed {
            op: ChangeOp::Delete,
            data: None,
            changed: &[],
            hlc: Hlc::new(hlc, 0),
            device: device(2),
        };
        let lww = rules(MergeRule::LastWriteWins);
        let lost =
            decide(&lww, Some(&current), &delete(1), &[theirs(&["name"], 4)]).expect("decide");
        assert!(keeps(&lost, &current), "{lost:?}");
        let won =
            decide(&lww, Some(&current), &delete(9), &[theirs(&["name"], 4)]).expect("decide");
        assert_eq!(won.write.expect("write").op, ChangeOp::Delete);
        // Deleting what is already gone does nothing.
        let gone = decide(&lww, None, &delete(9), &[]).expect("decide");
        assert_eq!(gone, Decision::default());
    }

    #[test]
    fn a_manual_model_keeps_the_local_record_and_records_both() {
        let current = fields(serde_json::json!({"id": "r", "name": "A", "tags": [], "notes": "n"}));
        let data = fields(serde_json::json!({"id": "r", "name": "B", "tags": [], "notes": "n"}));
        let changed = ["name".to_owned()];
        let pushed = upsert(&data, &changed, 9);
        let decision = decide(
            &rules(MergeRule::Manual),
            Some(&current),
            &pushed,
            &[theirs(&["name"], 4)],
        )
        .expect("decide");
        assert!(
            keeps(&decision, &current),
            "the local record stays, although the push is later"
        );
        let conflict = decision.conflict.expect("a conflict");
        assert_eq!(conflict.local.get("name"), Some(&serde_json::json!("A")));
        assert_eq!(conflict.remote.get("name"), Some(&serde_json::json!("B")));
        assert!(conflict.local.get("id").is_none(), "the key is not a side");
        // The same value on both sides is no conflict.
        let same = decide(
            &rules(MergeRule::Manual),
            Some(&current),
            &Pushed {
                data: Some(&current),
                ..pushed
            },
            &[theirs(&["name"], 4)],
        )
        .expect("decide");
        assert_eq!(same, Decision::default());
    }

    #[test]
    fn a_custom_rule_asks_the_function_and_falls_back_to_hlc() {
        fn longer_name(local: &Fields, remote: &Fields) -> Result<Option<Fields>, String> {
            let len = |f: &Fields| f.get("name").and_then(Value::as_str).map_or(0, str::len);
            Ok(Some(if len(remote) > len(local) {
                remote.clone()
            } else {
                local.clone()
            }))
        }
        let current =
            fields(serde_json::json!({"id": "r", "name": "Longer", "tags": [], "notes": null}));
        let data = fields(serde_json::json!({"id": "r", "name": "B", "tags": [], "notes": null}));
        let changed = ["name".to_owned()];
        let pushed = upsert(&data, &changed, 9);
        let custom = ModelRules {
            custom: &longer_name,
            ..rules(MergeRule::Custom)
        };
        let kept =
            decide(&custom, Some(&current), &pushed, &[theirs(&["name"], 4)]).expect("decide");
        assert!(
            keeps(&kept, &current),
            "the function kept the longer local name"
        );
        // A function that declines (None) leaves it to the later HLC: the push.
        let declined = decide(
            &rules(MergeRule::Custom),
            Some(&current),
            &pushed,
            &[theirs(&["name"], 4)],
        )
        .expect("decide");
        assert_eq!(
            declined
                .write
                .expect("write")
                .data
                .expect("data")
                .get("name"),
            Some(&serde_json::json!("B"))
        );
    }
}
