//! One change in a library's log, and the rolling checksum that chains them.

use serde::{Deserialize, Serialize};

use crate::{DeviceId, Hlc, LibraryId, Seq};

/// What a change does to its record.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChangeOp {
    /// The record exists with these synced fields (insert or update).
    Upsert,
    /// The record is gone.
    Delete,
}

impl ChangeOp {
    /// The word stored in the log.
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeOp::Upsert => "upsert",
            ChangeOp::Delete => "delete",
        }
    }

    /// Reads the word stored in the log.
    pub fn parse(word: &str) -> Option<ChangeOp> {
        match word {
            "upsert" => Some(ChangeOp::Upsert),
            "delete" => Some(ChangeOp::Delete),
            _ => None,
        }
    }
}

/// One entry of a library's log, exactly as the leader stored it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEntry {
    /// The library whose log this is.
    pub library_id: LibraryId,
    /// Position in the log: 1, 2, 3 … without gaps.
    pub seq: Seq,
    /// The model's sync id (`Syncable::SYNC_ID`).
    pub model: String,
    /// The record's primary key, as text.
    pub record_id: String,
    /// Upsert or delete.
    pub op: ChangeOp,
    /// The synced fields as a canonical JSON object (keys sorted); `None` for deletes.
    pub data: Option<String>,
    /// The synced fields this write set (all of them for an insert).
    pub changed: Vec<String>,
    /// The device that made the change.
    pub device_id: DeviceId,
    /// When the change was made, by the authoring device's hybrid logical clock.
    pub hlc: Hlc,
    /// The model's schema version on the authoring device.
    pub schema_version: u32,
    /// The rolling checksum of the log up to and including this entry.
    pub checksum: u64,
}

impl LogEntry {
    /// The rolling checksum this entry must carry when the entry before it carried `prev`.
    ///
    /// Every field but `checksum` goes in, each length-prefixed so that no two different
    /// entries hash the same bytes.
    pub fn chained_checksum(&self, prev: u64) -> u64 {
        // One contiguous buffer hashed at once: BLAKE3 over many tiny `update`s costs
        // several times more per entry than over the same bytes in one piece.
        let mut bytes = Vec::with_capacity(
            128 + self.model.len()
                + self.record_id.len()
                + self.data.as_ref().map_or(0, String::len)
                + self.changed.iter().map(|f| f.len() + 8).sum::<usize>(),
        );
        bytes.extend_from_slice(&prev.to_le_bytes());
        bytes.extend_from_slice(self.library_id.0.as_bytes());
        bytes.extend_from_slice(&self.seq.0.to_le_bytes());
        put_str(&mut bytes, &self.model);
        put_str(&mut bytes, &self.record_id);
        put_str(&mut bytes, self.op.as_str());
        match &self.data {
            Some(data) => {
                bytes.push(1);
                put_str(&mut bytes, data);
            }
            None => bytes.push(0),
        }
        bytes.extend_from_slice(&(self.changed.len() as u64).to_le_bytes());
        for field in &self.changed {
            put_str(&mut bytes, field);
        }
        bytes.extend_from_slice(self.device_id.0.as_bytes());
        bytes.extend_from_slice(&self.hlc.as_u64().to_le_bytes());
        bytes.extend_from_slice(&self.schema_version.to_le_bytes());
        let digest = blake3::hash(&bytes);
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest.as_bytes()[..8]);
        u64::from_le_bytes(first)
    }
}

fn put_str(bytes: &mut Vec<u8>, s: &str) {
    bytes.extend_from_slice(&(s.len() as u64).to_le_bytes());
    bytes.extend_from_slice(s.as_bytes());
}

/// Checks that `entries` continue a log whose last entry was `after` with checksum `prev`:
/// contiguous sequence numbers and an unbroken checksum chain. Returns the checksum of the
/// last entry.
pub fn verify_chain(after: Seq, prev: u64, entries: &[LogEntry]) -> Result<u64, ChainError> {
    let mut expected_seq = after.next();
    let mut prev = prev;
    for entry in entries {
        if entry.seq != expected_seq {
            return Err(ChainError::Gap {
                expected: expected_seq,
                found: entry.seq,
            });
        }
        let computed = entry.chained_checksum(prev);
        if computed != entry.checksum {
            return Err(ChainError::Mismatch {
                seq: entry.seq,
                expected: computed,
                found: entry.checksum,
            });
        }
        prev = entry.checksum;
        expected_seq = expected_seq.next();
    }
    Ok(prev)
}

/// Why a run of entries does not continue the log it claims to.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ChainError {
    /// The entries skip or repeat a sequence number.
    #[error("log entries are not contiguous: expected seq {expected}, found seq {found}")]
    Gap {
        /// The seq that should have come next.
        expected: Seq,
        /// The seq that came.
        found: Seq,
    },
    /// An entry's checksum does not follow from the entries before it: the two sides do
    /// not hold the same history.
    #[error(
        "checksum mismatch at seq {seq}: computed {expected:016x}, entry carries {found:016x}; this device's history differs from the leader's"
    )]
    Mismatch {
        /// The entry whose checksum is wrong.
        seq: Seq,
        /// What the chain says it should be.
        expected: u64,
        /// What the entry carries.
        found: u64,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The checksum as the first log format computed it: BLAKE3 fed field by field. Logs
    /// written then must still verify.
    fn incremental(entry: &LogEntry, prev: u64) -> u64 {
        let mut hasher = blake3::Hasher::new();
        let put = |hasher: &mut blake3::Hasher, s: &str| {
            hasher.update(&(s.len() as u64).to_le_bytes());
            hasher.update(s.as_bytes());
        };
        hasher.update(&prev.to_le_bytes());
        hasher.update(entry.library_id.0.as_bytes());
        hasher.update(&entry.seq.0.to_le_bytes());
        put(&mut hasher, &entry.model);
        put(&mut hasher, &entry.record_id);
        put(&mut hasher, entry.op.as_str());
        match &entry.data {
            Some(data) => {
                hasher.update(&[1]);
                put(&mut hasher, data);
            }
            None => {
                hasher.update(&[0]);
            }
        }
        hasher.update(&(entry.changed.len() as u64).to_le_bytes());
        for field in &entry.changed {
            put(&mut hasher, field);
        }
        hasher.update(entry.device_id.0.as_bytes());
        hasher.update(&entry.hlc.as_u64().to_le_bytes());
        hasher.update(&entry.schema_version.to_le_bytes());
        let mut first = [0u8; 8];
        first.copy_from_slice(&hasher.finalize().as_bytes()[..8]);
        u64::from_le_bytes(first)
    }

    #[test]
    fn checksum_is_unchanged_from_the_first_log_format() {
        let mut entry = LogEntry {
            library_id: LibraryId(uuid::Uuid::from_u128(7)),
            seq: Seq(42),
            model: "tag".into(),
            record_id: "0190a1b2-0000-7000-8000-000000000001".into(),
            op: ChangeOp::Upsert,
            data: Some(r#"{"color":null,"id":"x","name":"été"}"#.into()),
            changed: vec!["color".into(), "name".into()],
            device_id: DeviceId(uuid::Uuid::from_u128(9)),
            hlc: Hlc::from_u64(123_456_789),
            schema_version: 3,
            checksum: 0,
        };
        for prev in [0, 1, u64::MAX] {
            assert_eq!(entry.chained_checksum(prev), incremental(&entry, prev));
        }
        entry.op = ChangeOp::Delete;
        entry.data = None;
        entry.changed.clear();
        assert_eq!(entry.chained_checksum(5), incremental(&entry, 5));
    }
}
