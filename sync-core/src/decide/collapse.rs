//! Collapsing and selective sync, without I/O: which entries of a range a follower needs,
//! and `Skipped` runs for the rest. The leader's `serve_pull` (`serve.rs`) reads the range
//! and calls [`select`]; the answer never changes what the follower ends with.

use std::collections::{HashMap, HashSet};

use crate::protocol::PulledItem;
use crate::{ChangeOp, LogEntry, MergeRule, Registry};

/// Turns a range of entries into response items: entries the follower needs, and `Skipped`
/// runs for the rest.
///
/// An entry is skipped when its model was not asked for, or when the entries right after
/// it, of the same record, overwrite everything it wrote: a delete of the record, an
/// upsert of a whole-record model, or upserts of a field-level model whose changed fields
/// cover its own. Applied in order, the remaining entries leave the follower exactly as
/// all of them would.
///
/// Only a run of consecutive entries of one record collapses: no other record's entry may
/// lie between an entry and what supersedes it. Other records can reference this one
/// (foreign keys); skipping its creation, or an update that moved its own reference,
/// would show them a state the leader never had, which the follower's database can
/// refuse (`foreign_keys::parents_and_children_apply_in_an_order_the_database_accepts`).
pub(crate) fn select(
    entries: Vec<LogEntry>,
    models: Option<&[String]>,
    registry: &Registry,
) -> Vec<PulledItem> {
    // sync-core's reserved entries (membership, move records) reach every follower,
    // whatever models it asked for.
    let wanted = |model: &str| {
        crate::leadership::is_reserved_model(model)
            || models.is_none_or(|m| m.iter().any(|w| w == model))
    };
    // Walking backwards: per record, which fields later entries overwrite (None: all).
    let mut covered: HashMap<(&str, &str), Option<HashSet<&str>>> = HashMap::new();
    let mut keep = vec![false; entries.len()];
    let mut run_of = None;
    for (i, entry) in entries.iter().enumerate().rev() {
        if !wanted(&entry.model) {
            continue;
        }
        let key = (entry.model.as_str(), entry.record_id.as_str());
        if run_of != Some(key) {
            // Another record's entry ends the run: nothing before it is superseded.
            covered.clear();
            run_of = Some(key);
        }
        let superseded = match covered.get(&key) {
            Some(None) => true,
            Some(Some(fields)) => {
                entry.op == ChangeOp::Upsert
                    && entry.changed.iter().all(|f| fields.contains(f.as_str()))
            }
            None => false,
        };
        keep[i] = !superseded;
        let rule = registry.describe(&entry.model).map(|(rule, _)| rule);
        let reserved = crate::leadership::is_reserved_model(&entry.model);
        let this_covers = match entry.op {
            ChangeOp::Delete => None,
            // A reserved entry is its record whole (a member's row; a move record's
            // record id is its epoch, never written twice).
            ChangeOp::Upsert if reserved => None,
            // A whole-record upsert of a model this build knows rewrites every field.
            ChangeOp::Upsert if rule.is_some_and(|r| r != MergeRule::FieldLevel) => None,
            ChangeOp::Upsert => Some(
                entry
                    .changed
                    .iter()
                    .map(String::as_str)
                    .collect::<HashSet<_>>(),
            ),
        };
        match (covered.get_mut(&key), this_covers) {
            (Some(None), _) => {}
            (Some(slot), None) => *slot = None,
            (Some(Some(fields)), Some(more)) => fields.extend(more),
            (None, cover) => {
                covered.insert(key, cover);
            }
        }
    }
    let mut items: Vec<PulledItem> = Vec::with_capacity(entries.len());
    for (entry, keep) in entries.into_iter().zip(keep) {
        if keep {
            items.push(PulledItem::Entry(entry));
        } else if let Some(PulledItem::Skipped { through, checksum }) = items.last_mut() {
            *through = entry.seq;
            *checksum = entry.checksum;
        } else {
            items.push(PulledItem::Skipped {
                through: entry.seq,
                checksum: entry.checksum,
            });
        }
    }
    items
}
