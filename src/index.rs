//! The sparse offset index beside each segment: one entry per
//! [`INDEX_INTERVAL_BYTES`] of segment data. An index is a cache, never a
//! source of truth: every entry is checked against the batch it points at,
//! and a missing, short, stale or corrupt index is rebuilt from its segment.

use std::path::Path;

use crate::error::{Error, Result};

// Index file, little-endian:
//   header, 40 bytes:
//     0  [u8; 4] magic b"WLQI"
//     4  u32     format version (1)
//     8  u64     base offset of the segment
//     16 u64     sealed: offset after the segment's last record
//                active with a synced mark: offset after the last record synced
//                else 0
//     24 u32     sealed: segment data length (end of the last batch)
//                active with a synced mark: the byte position that sync reached
//                else 0
//     28 u32     sealed: entry count; else 0
//     32 u32     flags: bit 0 = sealed (complete, fields above valid);
//                bit 1 = synced mark (active only)
//     36 u32     sealed: CRC-32C of bytes 0..36 followed by every entry;
//                active with a synced mark: CRC-32C of bytes 0..36; else 0
//   then entries, 8 bytes each, strictly increasing in both fields:
//     0  u32     relative offset: the batch's base offset minus the segment's base
//     4  u32     byte position of the batch in the segment file
pub(crate) const INDEX_HEADER_LEN: usize = 40;
pub(crate) const INDEX_ENTRY_LEN: usize = 8;
const INDEX_MAGIC: [u8; 4] = *b"WLQI";
const INDEX_VERSION: u32 = 1;
const FLAG_SEALED: u32 = 1;
const FLAG_SYNCED_MARK: u32 = 2;
const _: () = assert!(INDEX_HEADER_LEN.is_multiple_of(INDEX_ENTRY_LEN));

/// One index entry per this many bytes of segment data (Kafka's default too):
/// a lookup reads at most this much past the entry it finds.
pub(crate) const INDEX_INTERVAL_BYTES: u64 = 4096;

/// Where a batch starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct IndexEntry {
    /// The batch's base offset minus the segment's base offset.
    pub relative: u32,
    /// The batch's byte position in the segment file.
    pub position: u32,
}

/// What a sealed index says about its segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SealedInfo {
    pub next_offset: u64,
    pub data_len: u32,
    pub entries: u32,
}

/// A point in the active segment known to be synced: every batch below
/// `position` was covered by an fdatasync before the mark was written, so
/// recovery may start scanning there. Written when a queue closes cleanly and
/// after recovery, so that the next open scans nothing it need not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SyncedMark {
    pub next_offset: u64,
    pub position: u32,
}

/// The header of an unsealed (active) index, with a synced mark or without.
pub(crate) fn encode_active_header(base: u64, mark: Option<SyncedMark>) -> [u8; INDEX_HEADER_LEN] {
    let mut h = [0u8; INDEX_HEADER_LEN];
    h[0..4].copy_from_slice(&INDEX_MAGIC);
    h[4..8].copy_from_slice(&INDEX_VERSION.to_le_bytes());
    h[8..16].copy_from_slice(&base.to_le_bytes());
    if let Some(m) = mark {
        h[16..24].copy_from_slice(&m.next_offset.to_le_bytes());
        h[24..28].copy_from_slice(&m.position.to_le_bytes());
        h[32..36].copy_from_slice(&FLAG_SYNCED_MARK.to_le_bytes());
        let crc = crc32c::crc32c(&h[0..36]);
        h[36..40].copy_from_slice(&crc.to_le_bytes());
    }
    h
}

/// The synced mark of an active index header, if it has an intact one.
pub(crate) fn synced_mark(buf: &[u8]) -> Option<SyncedMark> {
    let h = buf.get(..INDEX_HEADER_LEN)?;
    let flags = u32_at(h, 32);
    if flags != FLAG_SYNCED_MARK || crc32c::crc32c(&h[0..36]) != u32_at(h, 36) {
        return None;
    }
    Some(SyncedMark { next_offset: u64_at(h, 16), position: u32_at(h, 24) })
}

pub(crate) fn encode_entry(e: IndexEntry) -> [u8; INDEX_ENTRY_LEN] {
    let mut b = [0u8; INDEX_ENTRY_LEN];
    b[0..4].copy_from_slice(&e.relative.to_le_bytes());
    b[4..8].copy_from_slice(&e.position.to_le_bytes());
    b
}

/// A whole index file: sealed (with counts and checksum) or active.
pub(crate) fn encode_file(base: u64, entries: &[IndexEntry], sealed: Option<(u64, u32)>) -> Vec<u8> {
    encode_with_header(encode_active_header(base, None), entries, sealed)
}

/// An active index file with a synced mark.
pub(crate) fn encode_active_file(base: u64, entries: &[IndexEntry], mark: SyncedMark) -> Vec<u8> {
    encode_with_header(encode_active_header(base, Some(mark)), entries, None)
}

fn encode_with_header(
    header: [u8; INDEX_HEADER_LEN],
    entries: &[IndexEntry],
    sealed: Option<(u64, u32)>,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(INDEX_HEADER_LEN + entries.len() * INDEX_ENTRY_LEN);
    out.extend_from_slice(&header);
    for e in entries {
        out.extend_from_slice(&encode_entry(*e));
    }
    if let Some((next_offset, data_len)) = sealed {
        out[16..24].copy_from_slice(&next_offset.to_le_bytes());
        out[24..28].copy_from_slice(&data_len.to_le_bytes());
        let count = u32::try_from(entries.len()).unwrap_or(u32::MAX);
        out[28..32].copy_from_slice(&count.to_le_bytes());
        out[32..36].copy_from_slice(&FLAG_SEALED.to_le_bytes());
        let mut crc = crc32c::crc32c(&out[0..36]);
        crc = crc32c::crc32c_append(crc, &out[INDEX_HEADER_LEN..]);
        out[36..40].copy_from_slice(&crc.to_le_bytes());
    }
    out
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

/// Why an index cannot be used as it is (it is then rebuilt).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum IndexProblem {
    Short,
    BadMagic,
    WrongBase,
    NotSealed,
    Checksum,
    BadLength,
    /// A version this walq does not know: a newer walq's file, or a flipped
    /// bit. Only a sealed index whose checksum still matches is the former.
    NewerVersion(u32),
}

/// Checks an index header: magic, version, base, sealed or not.
pub(crate) fn check_header(buf: &[u8], base: u64) -> std::result::Result<Option<SealedInfo>, IndexProblem> {
    if buf.len() < INDEX_HEADER_LEN {
        return Err(IndexProblem::Short);
    }
    if buf[0..4] != INDEX_MAGIC {
        return Err(IndexProblem::BadMagic);
    }
    let version = u32_at(buf, 4);
    if version > INDEX_VERSION {
        return Err(IndexProblem::NewerVersion(version));
    }
    if version != INDEX_VERSION {
        return Err(IndexProblem::BadMagic);
    }
    if u64_at(buf, 8) != base {
        return Err(IndexProblem::WrongBase);
    }
    if u32_at(buf, 32) & FLAG_SEALED == 0 {
        return Ok(None);
    }
    Ok(Some(SealedInfo { next_offset: u64_at(buf, 16), data_len: u32_at(buf, 24), entries: u32_at(buf, 28) }))
}

/// Verifies a whole sealed index file (header, length, checksum, order).
pub(crate) fn check_sealed(
    buf: &[u8],
    base: u64,
    path: &Path,
) -> Result<std::result::Result<SealedInfo, IndexProblem>> {
    let info = match check_header(buf, base) {
        Ok(Some(info)) => info,
        Ok(None) => return Ok(Err(IndexProblem::NotSealed)),
        Err(IndexProblem::NewerVersion(found)) => {
            // Only an intact file from a newer walq is left alone with an error.
            let intact = buf.len() >= INDEX_HEADER_LEN
                && crc32c::crc32c_append(crc32c::crc32c(&buf[0..36]), &buf[INDEX_HEADER_LEN..])
                    == u32_at(buf, 36);
            if intact {
                return Err(Error::UnsupportedFormat { path: path.into(), found, supported: INDEX_VERSION });
            }
            return Ok(Err(IndexProblem::Checksum));
        }
        Err(p) => return Ok(Err(p)),
    };
    if (buf.len() - INDEX_HEADER_LEN) != info.entries as usize * INDEX_ENTRY_LEN {
        return Ok(Err(IndexProblem::BadLength));
    }
    let mut crc = crc32c::crc32c(&buf[0..36]);
    crc = crc32c::crc32c_append(crc, &buf[INDEX_HEADER_LEN..]);
    if crc != u32_at(buf, 36) {
        return Ok(Err(IndexProblem::Checksum));
    }
    let entries = decode_entries(&buf[INDEX_HEADER_LEN..]);
    if !is_ordered(&entries) || entries.last().is_some_and(|e| e.position >= info.data_len) {
        return Ok(Err(IndexProblem::Checksum));
    }
    Ok(Ok(info))
}

/// Entries of an index body; a torn last entry is ignored.
pub(crate) fn decode_entries(body: &[u8]) -> Vec<IndexEntry> {
    body.chunks_exact(INDEX_ENTRY_LEN)
        .map(|c| IndexEntry { relative: u32_at(c, 0), position: u32_at(c, 4) })
        .collect()
}

/// Entries strictly increase in both fields (the sparse index's shape).
pub(crate) fn is_ordered(entries: &[IndexEntry]) -> bool {
    entries.windows(2).all(|w| w[0].relative < w[1].relative && w[0].position < w[1].position)
}

/// The last entry at or before `relative`, by binary search over an encoded body.
pub(crate) fn floor_in_body(body: &[u8], relative: u32) -> Option<IndexEntry> {
    let n = body.len() / INDEX_ENTRY_LEN;
    let at = |i: usize| IndexEntry {
        relative: u32_at(body, i * INDEX_ENTRY_LEN),
        position: u32_at(body, i * INDEX_ENTRY_LEN + 4),
    };
    // partition point: first entry with relative > target
    let (mut lo, mut hi) = (0usize, n);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if at(mid).relative <= relative { lo = mid + 1 } else { hi = mid }
    }
    if lo == 0 { None } else { Some(at(lo - 1)) }
}

/// The last entry at or before `relative` in a decoded list.
pub(crate) fn floor_in(entries: &[IndexEntry], relative: u32) -> Option<IndexEntry> {
    let i = entries.partition_point(|e| e.relative <= relative);
    if i == 0 { None } else { Some(entries[i - 1]) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries() -> Vec<IndexEntry> {
        (0..10).map(|i| IndexEntry { relative: i * 10, position: 32 + i * 4096 }).collect()
    }

    #[test]
    fn sealed_round_trip_and_every_bit_flip_detected() {
        let p = Path::new("x.idx");
        let file = encode_file(100, &entries(), Some((200, 50_000)));
        let info = check_sealed(&file, 100, p).unwrap().unwrap();
        assert_eq!(info, SealedInfo { next_offset: 200, data_len: 50_000, entries: 10 });
        for bit in 0..file.len() * 8 {
            let mut d = file.clone();
            d[bit / 8] ^= 1 << (bit % 8);
            assert!(!matches!(check_sealed(&d, 100, p), Ok(Ok(_))), "flip of bit {bit} went unnoticed");
        }
        assert_eq!(check_sealed(&file[..file.len() - 8], 100, p).unwrap(), Err(IndexProblem::BadLength));
        assert_eq!(check_sealed(&file, 101, p).unwrap(), Err(IndexProblem::WrongBase));
    }

    #[test]
    fn newer_version_is_an_error_only_when_intact() {
        let p = Path::new("x");
        let mut file = encode_file(0, &entries(), Some((100, 50_000)));
        file[4] = 9;
        let crc = crc32c::crc32c_append(crc32c::crc32c(&file[0..36]), &file[INDEX_HEADER_LEN..]);
        file[36..40].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(check_sealed(&file, 0, p), Err(Error::UnsupportedFormat { found: 9, .. })));
        file[36] ^= 1; // the same version byte with a bad checksum is damage: rebuild
        assert_eq!(check_sealed(&file, 0, p).unwrap(), Err(IndexProblem::Checksum));
        assert_eq!(check_header(&encode_file(0, &[], None), 0), Ok(None));
    }

    #[test]
    fn synced_mark_round_trip_and_damage() {
        let mark = SyncedMark { next_offset: 77, position: 4096 };
        let file = encode_active_file(10, &entries(), mark);
        assert_eq!(synced_mark(&file), Some(mark));
        assert_eq!(check_header(&file, 10), Ok(None), "still an active index");
        for bit in 0..INDEX_HEADER_LEN * 8 {
            let mut d = file.clone();
            d[bit / 8] ^= 1 << (bit % 8);
            assert_ne!(synced_mark(&d), Some(mark), "flip of bit {bit} went unnoticed");
        }
        assert_eq!(synced_mark(&encode_file(10, &[], None)), None);
        assert_eq!(synced_mark(&encode_file(10, &[], Some((5, 100)))), None, "sealed headers carry no mark");
    }

    #[test]
    fn floor_lookups_agree() {
        let e = entries();
        let body: Vec<u8> = e.iter().flat_map(|x| encode_entry(*x)).collect();
        for r in 0..120 {
            assert_eq!(floor_in(&e, r), floor_in_body(&body, r), "at {r}");
        }
        assert_eq!(floor_in(&e, 0), Some(e[0]));
        assert_eq!(floor_in(&e, 15), Some(e[1]));
        assert_eq!(floor_in(&[], 15), None);
    }
}
