//! The simulator's reference model: a plain in-memory ledger of every write the run made
//! (which device, which record, what it must leave behind, which outbox changes carried
//! it), checked against the library at the end of a run:
//!
//! - accounted: every change a follower wrote was taken by the leader, or is still in its
//!   author's outbox (allowed only for a revoked follower: nothing silently dropped);
//! - not lost: every acknowledged write's effect is in the final state, or a later write
//!   supersedes it under its model's rule — last-write-wins fields: its value is in the log,
//!   or another device's entry of the record is at least as late (its clock capped as the
//!   leader caps it); manual fields and manual models: its value is in the log, as the
//!   record's or inside a conflict; union fields: its element is in the final set; the
//!   custom counter: the final count is the largest acknowledged;
//! - not sequenced twice: no device authored more entries than the leader took changes of
//!   it (the leader: than it made writes);
//! - the log replayed (each record's last entry) is the leader's data, and the open
//!   conflicts are those the log leaves open.

use std::collections::{BTreeMap, HashMap, HashSet};

use anyhow::{Context, Result, bail};
use sea_orm::{ConnectionTrait, Statement};
use sync_core::{ChangeOp, DeviceId, Hlc, Library, LogEntry};

/// How far ahead of the leader's clock a pushed change's clock may run before the leader
/// caps it (sync-core's `DRIFT_MAX_MS`).
const DRIFT_MAX_MS: u64 = 5 * 60 * 1_000;

/// The sync id of sync-core's own conflict model.
const CONFLICT: &str = "sync_conflict";

/// What a write must leave behind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Check {
    /// A last-write-wins value.
    Lww { marker: String },
    /// A value of a manual field or a manual model: never merged away.
    Manual { marker: String },
    /// An element added to a union field.
    Union { element: String },
    /// The custom counter's count.
    Count { count: i64 },
    /// A delete (accounting only).
    Delete,
    /// A rename into the filter's private form (accounting only).
    Private,
    /// A conflict resolved (accounting only).
    Resolve,
}

/// One outbox row.
#[derive(Clone, Debug)]
pub(crate) struct Change {
    pub(crate) id: i64,
    pub(crate) change_id: String,
    pub(crate) hlc: u64,
}

/// One committed write.
#[derive(Clone, Debug)]
pub(crate) struct Write {
    /// Index of the device in the run.
    pub(crate) device: usize,
    pub(crate) model: &'static str,
    pub(crate) record: String,
    pub(crate) check: Check,
    /// The outbox changes it made (none on the leader).
    pub(crate) changes: Vec<Change>,
    /// The leader's clock when it was made: the leader's cap is at least this plus
    /// `DRIFT_MAX_MS` when it takes the change.
    pub(crate) leader_wall_ms: u64,
}

pub(crate) struct Reference {
    records: Vec<(&'static str, Vec<String>)>,
    models: Vec<&'static str>,
    writes: Vec<Write>,
}

impl Reference {
    pub(crate) fn new(records: Vec<(&'static str, Vec<String>)>) -> Reference {
        Reference {
            models: records.iter().map(|(m, _)| *m).collect(),
            records,
            writes: Vec::new(),
        }
    }

    pub(crate) fn models(&self) -> &[&'static str] {
        &self.models
    }

    pub(crate) fn records(&self, model: &str) -> &[String] {
        self.records
            .iter()
            .find(|(m, _)| *m == model)
            .map_or(&[], |(_, r)| r.as_slice())
    }

    pub(crate) fn record(&mut self, write: Write) {
        self.writes.push(write);
    }

    /// Checks the healed library: `members[i]` is device `i` (its id, its handle, whether
    /// it was revoked); `log` is the leader's whole log, `dump` its data.
    pub(crate) async fn check(
        &self,
        leader: &Library,
        log: &[LogEntry],
        dump: &serde_json::Value,
        members: &[(DeviceId, Option<Library>, bool)],
    ) -> Result<()> {
        let taken = taken(leader).await?;
        let mut outboxes = Vec::with_capacity(members.len());
        for (_, library, _) in members {
            let ids: HashSet<String> = match library {
                Some(library) => outbox(library)
                    .await?
                    .into_iter()
                    .map(|c| c.change_id)
                    .collect(),
                None => HashSet::new(),
            };
            outboxes.push(ids);
        }

        // Accounted: taken, or (revoked only) still in the author's outbox.
        let mut acknowledged = Vec::with_capacity(self.writes.len());
        for write in &self.writes {
            let (author, _, revoked) = &members[write.device];
            let mut all_taken = true;
            for change in &write.changes {
                match taken.get(&change.change_id) {
                    Some(by) if by == &author.to_string() => {}
                    Some(by) => bail!(
                        "change {} of {author} was taken as {by}'s",
                        change.change_id
                    ),
                    None if *revoked && outboxes[write.device].contains(&change.change_id) => {
                        all_taken = false;
                    }
                    None => bail!(
                        "change {} ({} {} by {author}, {:?}) is lost: the leader did not take \
                         it and it is not in its author's outbox",
                        change.change_id,
                        write.model,
                        write.record,
                        write.check
                    ),
                }
            }
            acknowledged.push(all_taken);
        }

        // The log replayed: each record's last entry.
        let mut last: BTreeMap<(&str, &str), Option<serde_json::Value>> = BTreeMap::new();
        for entry in log {
            let data = match entry.op {
                ChangeOp::Upsert => Some(
                    serde_json::from_str(entry.data.as_deref().unwrap_or("null"))
                        .with_context(|| format!("entry {} holds bad JSON", entry.seq))?,
                ),
                ChangeOp::Delete => None,
            };
            last.insert((entry.model.as_str(), entry.record_id.as_str()), data);
        }
        let dump = dump
            .as_object()
            .context("the leader's dump is not an object")?;
        for (model, rows) in dump {
            let mut have: Vec<String> = rows
                .as_array()
                .context("a dump of rows is not an array")?
                .iter()
                .map(|r| r.to_string())
                .collect();
            let mut replayed: Vec<String> = last
                .iter()
                .filter(|((m, _), _)| *m == model.as_str())
                .filter_map(|(_, data)| data.as_ref().map(|d| d.to_string()))
                .collect();
            have.sort();
            replayed.sort();
            if have != replayed {
                bail!(
                    "the leader's `{model}` is not its log replayed:\n  data: {have:?}\n  log:  {replayed:?}"
                );
            }
        }
        let open: HashSet<String> = leader
            .conflicts()
            .await?
            .into_iter()
            .map(|c| c.id)
            .collect();
        let logged_open: HashSet<String> = last
            .iter()
            .filter(|((m, _), data)| *m == CONFLICT && data.is_some())
            .map(|((_, r), _)| (*r).to_owned())
            .collect();
        if open != logged_open {
            bail!("the open conflicts {open:?} are not those the log leaves open {logged_open:?}");
        }

        // Not lost.
        let mut counts: HashMap<&str, i64> = HashMap::new();
        for (write, acknowledged) in self.writes.iter().zip(&acknowledged) {
            if !acknowledged {
                continue;
            }
            let author = members[write.device].0;
            let of_record = || {
                log.iter()
                    .filter(|e| e.model == write.model && e.record_id == write.record)
            };
            let in_log = |marker: &str| {
                of_record().any(|e| e.data.as_deref().is_some_and(|d| d.contains(marker)))
            };
            match &write.check {
                Check::Lww { marker } => {
                    // A row private on some device (the tag filter) turns every other
                    // device's write of its id into a delete: by design, not a merge.
                    let private_somewhere = self.writes.iter().any(|w| {
                        w.check == Check::Private
                            && w.model == write.model
                            && w.record == write.record
                    });
                    if in_log(marker) || private_somewhere {
                        continue;
                    }
                    let Some(change) = write.changes.last() else {
                        bail!("the leader's write {marker} is not in its log");
                    };
                    let cap = Hlc::new(write.leader_wall_ms + DRIFT_MAX_MS, 0);
                    let at_least = Hlc::from_u64(change.hlc).min(cap);
                    if !of_record().any(|e| e.device_id != author && e.hlc >= at_least) {
                        bail!(
                            "{} {}: the write {marker} by {author} (clock {}) is lost: not in \
                             the log, and no other device's entry of the record is as late; \
                             the record's entries:\n{}",
                            write.model,
                            write.record,
                            Hlc::from_u64(change.hlc),
                            describe(of_record())
                        );
                    }
                }
                Check::Manual { marker } => {
                    let in_conflict = log.iter().any(|e| {
                        e.model == CONFLICT && e.data.as_deref().is_some_and(|d| d.contains(marker))
                    });
                    if !in_log(marker) && !in_conflict {
                        bail!(
                            "{} {}: the write {marker} by {author} is lost: neither in the \
                             log nor in a conflict",
                            write.model,
                            write.record
                        );
                    }
                }
                Check::Union { element } => {
                    let tags = last
                        .get(&(write.model, write.record.as_str()))
                        .and_then(|d| d.as_ref())
                        .and_then(|d| d.get("tags"))
                        .and_then(|t| t.as_array());
                    if !tags.is_some_and(|t| t.iter().any(|v| v.as_str() == Some(element))) {
                        bail!(
                            "{} {}: the element {element} added by {author} is lost: the final \
                             set is {tags:?}",
                            write.model,
                            write.record
                        );
                    }
                }
                Check::Count { count } => {
                    let max = counts.entry(write.record.as_str()).or_insert(*count);
                    *max = (*max).max(*count);
                }
                Check::Delete | Check::Private | Check::Resolve => {}
            }
        }
        for (record, max) in counts {
            let model = crate::sim::models::COUNTER;
            let count = last
                .get(&(model, record))
                .and_then(|d| d.as_ref())
                .and_then(|d| d.get("count"))
                .and_then(|c| c.as_i64());
            if count != Some(max) {
                bail!("{model} {record}: the count is {count:?}, the largest written {max}");
            }
        }

        // Not sequenced twice.
        let mut authored: HashMap<DeviceId, u64> = HashMap::new();
        // sync-core's own entries (membership) are not writes.
        for entry in log
            .iter()
            .filter(|e| e.model != CONFLICT && !sync_core::is_reserved_model(&e.model))
        {
            *authored.entry(entry.device_id).or_default() += 1;
        }
        let mut taken_by: HashMap<String, u64> = HashMap::new();
        for by in taken.values() {
            *taken_by.entry(by.clone()).or_default() += 1;
        }
        let leader_writes = self.writes.iter().filter(|w| w.device == 0).count() as u64;
        for (i, (id, _, _)) in members.iter().enumerate() {
            let entries = authored.get(id).copied().unwrap_or(0);
            let allowed = if i == 0 {
                leader_writes
            } else {
                taken_by.get(&id.to_string()).copied().unwrap_or(0)
            };
            if entries > allowed {
                bail!(
                    "device {i} ({id}) authored {entries} entries of the log, but {} only {allowed}",
                    if i == 0 {
                        "made writes"
                    } else {
                        "the leader took changes"
                    }
                );
            }
        }
        Ok(())
    }
}

async fn query(library: &Library, sql: &str) -> Result<Vec<sea_orm::QueryResult>> {
    let db = library.db();
    Ok(db
        .query_all_raw(Statement::from_string(db.get_database_backend(), sql))
        .await?)
}

/// This device's outbox, oldest first (read from its table: the library has no listing).
pub(crate) async fn outbox(library: &Library) -> Result<Vec<Change>> {
    let rows = query(
        library,
        "SELECT id, change_id, hlc FROM sync_outbox ORDER BY id",
    )
    .await?;
    rows.into_iter()
        .map(|row| {
            Ok(Change {
                id: row.try_get("", "id")?,
                change_id: row
                    .try_get::<Option<String>>("", "change_id")?
                    .context("an outbox change without identity")?,
                hlc: row.try_get::<i64>("", "hlc")? as u64,
            })
        })
        .collect()
}

/// The changes the leader took, by identity: their authors.
async fn taken(leader: &Library) -> Result<HashMap<String, String>> {
    query(leader, "SELECT change_id, device_id FROM sync_taken")
        .await?
        .into_iter()
        .map(|row| Ok((row.try_get("", "change_id")?, row.try_get("", "device_id")?)))
        .collect()
}

/// How many changes of `device` the leader took.
pub(crate) async fn taken_of(leader: &Library, device: DeviceId) -> Result<usize> {
    let device = device.to_string();
    Ok(taken(leader)
        .await?
        .values()
        .filter(|d| **d == device)
        .count())
}

/// A record's entries, one a line, for a failure's message.
fn describe<'a>(entries: impl Iterator<Item = &'a LogEntry>) -> String {
    entries
        .map(|e| {
            format!(
                "  seq {} {} by {} at {}: {}",
                e.seq.0,
                e.op.as_str(),
                e.device_id,
                e.hlc,
                e.data.as_deref().unwrap_or("-")
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}
