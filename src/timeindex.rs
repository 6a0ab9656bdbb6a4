//! The sparse time index of a sealed segment (as Kafka's `.timeindex`), a
//! cache beside the segment in `{base:020}.tix`: the segment's newest record
//! timestamp, and entries `(ts, relative offset, position)` where `ts` is the
//! newest timestamp of the segment's records *before* that batch. Entries are
//! added at offset-index points (every 4 KiB of data) when that running
//! maximum grew, so they are nondecreasing in all three fields.
//!
//! Finding the first record at or after `t`: the first segment whose newest
//! timestamp is at least `t` holds it (every record before that segment is
//! older); in it, every record before the last entry with `ts < t` is older
//! too, and the next entry (or the segment's end) bounds the scan: one index
//! and about one index interval of the segment. Record timestamps set by the
//! caller may go backwards; the running maximum keeps the search correct.
//!
//! The active segment's entries live in memory (kept by the writer); a
//! segment that was active when the queue was opened has none until it is
//! sealed, and its time index is built from the segment on first use, like a
//! missing or damaged `.tix` file (rebuilt, and rewritten when possible).

use std::path::Path;

use crate::batch::{self, BATCH_HEADER_LEN};
use crate::error::Result;
use crate::fs::Storage;
use crate::segment::SEGMENT_HEADER_LEN;

/// File extension of time indexes.
pub(crate) const TIME_INDEX_EXT: &str = "tix";
const MAGIC: [u8; 4] = *b"WLQT";
const VERSION: u32 = 1;
/// Header: magic, version u32, base u64, newest timestamp u64, entry count
/// u32, CRC-32C u32 of bytes 0..28 followed by every entry.
pub(crate) const TIME_HEADER_LEN: usize = 32;
/// Entry: ts u64, relative offset u32, position u32.
pub(crate) const TIME_ENTRY_LEN: usize = 16;

/// `{base:020}.tix`
pub(crate) fn time_index_name(base: u64) -> String {
    format!("{base:020}.{TIME_INDEX_EXT}")
}

/// One time index point: every record of the segment before the batch at
/// (`relative`, `position`) is at most `ts`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TimeEntry {
    pub ts: u64,
    pub relative: u32,
    pub position: u32,
}

/// A segment's time index.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct TimeIndex {
    /// The newest timestamp of the segment's records (0 when it has none).
    pub newest: u64,
    pub entries: Vec<TimeEntry>,
}

impl TimeIndex {
    /// Notes a batch written at (`relative`, `position`) whose records' newest
    /// timestamp is `batch_newest`; `indexed` says whether the batch is at an
    /// offset-index point (the only places entries are added).
    pub(crate) fn note_batch(&mut self, relative: u32, position: u32, batch_newest: u64, indexed: bool) {
        let last = self.entries.last().map_or(0, |e| e.ts);
        if indexed && self.newest > last {
            self.entries.push(TimeEntry { ts: self.newest, relative, position });
        }
        self.newest = self.newest.max(batch_newest);
    }

    /// Where to start scanning for the first record at or after `t`: the
    /// (relative offset, position) of the last entry older than `t`, or the
    /// segment's start.
    pub(crate) fn start_for(&self, t: u64) -> (u32, u32) {
        let i = self.entries.partition_point(|e| e.ts < t);
        match i.checked_sub(1) {
            Some(j) => (self.entries[j].relative, self.entries[j].position),
            None => (0, SEGMENT_HEADER_LEN as u32),
        }
    }

    pub(crate) fn encode(&self, base: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(TIME_HEADER_LEN + self.entries.len() * TIME_ENTRY_LEN);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&base.to_le_bytes());
        out.extend_from_slice(&self.newest.to_le_bytes());
        out.extend_from_slice(&(self.entries.len() as u32).to_le_bytes());
        out.extend_from_slice(&[0u8; 4]);
        for e in &self.entries {
            out.extend_from_slice(&e.ts.to_le_bytes());
            out.extend_from_slice(&e.relative.to_le_bytes());
            out.extend_from_slice(&e.position.to_le_bytes());
        }
        let mut crc = crc32c::crc32c(&out[..28]);
        crc = crc32c::crc32c_append(crc, &out[TIME_HEADER_LEN..]);
        out[28..32].copy_from_slice(&crc.to_le_bytes());
        out
    }

    /// Decodes a time index file; `None` if it is not an intact one for
    /// `base` (then it is rebuilt). Never panics on any bytes.
    pub(crate) fn decode(bytes: &[u8], base: u64) -> Option<TimeIndex> {
        let h = bytes.get(..TIME_HEADER_LEN)?;
        let u32_at = |at: usize| u32::from_le_bytes(h[at..at + 4].try_into().expect("4 bytes"));
        let u64_at = |at: usize| u64::from_le_bytes(h[at..at + 8].try_into().expect("8 bytes"));
        if h[..4] != MAGIC || u32_at(4) != VERSION || u64_at(8) != base {
            return None;
        }
        let count = u32_at(24) as usize;
        let body =
            bytes.get(TIME_HEADER_LEN..TIME_HEADER_LEN.checked_add(count.checked_mul(TIME_ENTRY_LEN)?)?)?;
        let crc = crc32c::crc32c_append(crc32c::crc32c(&h[..28]), body);
        if crc != u32_at(28) || bytes.len() != TIME_HEADER_LEN + body.len() {
            return None;
        }
        let entries: Vec<TimeEntry> = body
            .chunks_exact(TIME_ENTRY_LEN)
            .map(|c| TimeEntry {
                ts: u64::from_le_bytes(c[0..8].try_into().expect("8 bytes")),
                relative: u32::from_le_bytes(c[8..12].try_into().expect("4 bytes")),
                position: u32::from_le_bytes(c[12..16].try_into().expect("4 bytes")),
            })
            .collect();
        let ordered = entries.windows(2).all(|w| w[0].ts < w[1].ts && w[0].relative < w[1].relative);
        ordered.then_some(TimeIndex { newest: u64_at(16), entries })
    }

    /// Builds the time index of a segment's bytes (`data`, the whole file or
    /// a prefix of whole batches), stopping at the first batch that does not
    /// verify; also returns the offset after the last batch read (a sealed
    /// segment must reach its end, or it is damaged). Entry points follow
    /// the offset index's rule (a batch at least `interval` bytes after the
    /// last indexed one).
    pub(crate) fn build(data: &[u8], base: u64, interval: u64) -> (TimeIndex, u64) {
        let mut ti = TimeIndex::default();
        let mut pos = SEGMENT_HEADER_LEN;
        let mut expected = base;
        let mut last_indexed = pos as u64;
        while let Some(slice) = data.get(pos..) {
            let Ok(header) = batch::verify_batch(slice, Some(expected)) else { break };
            let mut newest = 0u64;
            for r in batch::records(slice, &header) {
                match r {
                    Ok(r) => newest = newest.max(r.timestamp_ms),
                    Err(_) => return (ti, expected),
                }
            }
            let indexed = pos as u64 >= last_indexed + interval;
            if indexed {
                last_indexed = pos as u64;
            }
            let (Ok(rel), Ok(p)) = (u32::try_from(expected - base), u32::try_from(pos)) else { break };
            ti.note_batch(rel, p, newest, indexed);
            expected = header.next_offset();
            pos += header.length as usize;
            if (header.length as usize) < BATCH_HEADER_LEN {
                break; // cannot happen for a verified batch; never loop forever
            }
        }
        (ti, expected)
    }
}

/// Writes a sealed segment's time index: temp file, fdatasync, rename (a
/// cache: the directory is not synced; a lost file is rebuilt).
pub(crate) fn write(storage: &dyn Storage, dir: &Path, base: u64, ti: &TimeIndex) -> Result<()> {
    crate::log::write_file_atomic(storage, dir, &time_index_name(base), &ti.encode(base))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> TimeIndex {
        let mut ti = TimeIndex::default();
        // (relative, position, newest ts of the batch, at an index point)
        for (rel, pos, ts, indexed) in [
            (0, 32, 100, false),
            (5, 4200, 90, true),
            (9, 8400, 300, true),
            (12, 12600, 250, true),
            (20, 16800, 400, true),
        ] {
            ti.note_batch(rel, pos, ts, indexed);
        }
        ti
    }

    #[test]
    fn entries_hold_the_running_maximum_before_each_point() {
        let ti = sample();
        assert_eq!(ti.newest, 400);
        let got: Vec<(u64, u32)> = ti.entries.iter().map(|e| (e.ts, e.relative)).collect();
        // At rel 5 the max before is 100; at 9 still 100 (no growth: no entry);
        // at 12 it is 300; at 20 still 300.
        assert_eq!(got, [(100, 5), (300, 12)]);
        assert_eq!(ti.start_for(50), (0, 32));
        assert_eq!(ti.start_for(100), (0, 32));
        assert_eq!(ti.start_for(101), (5, 4200));
        assert_eq!(ti.start_for(301), (12, 12600));
    }

    #[test]
    fn encode_decode_round_trip_and_damage_is_rejected() {
        let ti = sample();
        let bytes = ti.encode(7);
        assert_eq!(TimeIndex::decode(&bytes, 7), Some(ti.clone()));
        assert_eq!(TimeIndex::decode(&bytes, 8), None, "another segment's");
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 1;
            assert_eq!(TimeIndex::decode(&bad, 7), None, "flip at {i}");
        }
        assert_eq!(TimeIndex::decode(&bytes[..bytes.len() - 1], 7), None);
        assert_eq!(TimeIndex::decode(&[], 7), None);
    }
}
