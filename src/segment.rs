//! One segment file: its name, its 32-byte header, and the pread-based scan
//! that recovery, index rebuilds and verification share. A scan stops at the
//! first batch that does not verify and says why; it never guesses past it.

use std::path::Path;

use crate::batch::{self, BatchHeader, DecodeError};
use crate::error::{Error, Result};
use crate::fs::{StorageFile, read_exact_at};
use crate::index::{INDEX_INTERVAL_BYTES, IndexEntry};

// Segment header, little-endian, 32 bytes:
//   0  [u8; 8]  magic  b"WALQSEG\0"
//   8  u32      format version (1)
//   12 u32      flags (0)
//   16 u64      base offset: the offset of the first record in the segment
//   24 u32      reserved (0)
//   28 u32      CRC-32C of bytes 0..28
pub(crate) const SEGMENT_HEADER_LEN: usize = 32;
const SEGMENT_MAGIC: [u8; 8] = *b"WALQSEG\0";
pub(crate) const SEGMENT_VERSION: u32 = 1;
const _: () = assert!(SEGMENT_HEADER_LEN.is_multiple_of(batch::BATCH_ALIGN));

/// Batches are read in chunks of this size during a scan.
const SCAN_CHUNK_BYTES: usize = 1 << 20;

/// File name extension of segments.
pub(crate) const SEGMENT_EXT: &str = "seg";
/// File name extension of offset indexes.
pub(crate) const INDEX_EXT: &str = "idx";
/// Suffix of files written before an atomic rename; leftovers are removed on open.
pub(crate) const TEMP_SUFFIX: &str = ".tmp";

/// `00000000000000001234.seg`: zero-padded to 20 digits so that `ls` sorts by offset.
pub(crate) fn segment_name(base: u64) -> String {
    format!("{base:020}.{SEGMENT_EXT}")
}

/// The index file beside the segment starting at `base`.
pub(crate) fn index_name(base: u64) -> String {
    format!("{base:020}.{INDEX_EXT}")
}

/// Parses `<20 digits>.<ext>`; anything else is not walq's.
pub(crate) fn parse_name(name: &str, ext: &str) -> Option<u64> {
    let (stem, e) = name.split_once('.')?;
    if e != ext || stem.len() != 20 || !stem.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    stem.parse().ok()
}

pub(crate) fn encode_header(base: u64) -> [u8; SEGMENT_HEADER_LEN] {
    let mut h = [0u8; SEGMENT_HEADER_LEN];
    h[0..8].copy_from_slice(&SEGMENT_MAGIC);
    h[8..12].copy_from_slice(&SEGMENT_VERSION.to_le_bytes());
    h[16..24].copy_from_slice(&base.to_le_bytes());
    let crc = crc32c::crc32c(&h[0..28]);
    h[28..32].copy_from_slice(&crc.to_le_bytes());
    h
}

/// What the first bytes of a segment file say.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum HeaderCheck {
    /// A valid v1 header with this base offset.
    Valid(u64),
    /// Shorter than a header, or all zeros: a segment whose creation a crash cut short.
    Unwritten,
}

/// Checks a segment header; a damaged header is `Corrupt`, a newer version `UnsupportedFormat`.
pub(crate) fn decode_header(buf: &[u8], path: &Path) -> Result<HeaderCheck> {
    if buf.len() < SEGMENT_HEADER_LEN || buf[..SEGMENT_HEADER_LEN].iter().all(|&b| b == 0) {
        return Ok(HeaderCheck::Unwritten);
    }
    let h = &buf[..SEGMENT_HEADER_LEN];
    let stored = u32::from_le_bytes([h[28], h[29], h[30], h[31]]);
    if crc32c::crc32c(&h[0..28]) != stored {
        return Err(Error::corrupt(path, 0, "segment header checksum mismatch"));
    }
    if h[0..8] != SEGMENT_MAGIC {
        return Err(Error::corrupt(path, 0, "not a walq segment (bad magic)"));
    }
    let version = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
    if version != SEGMENT_VERSION {
        return Err(Error::UnsupportedFormat {
            path: path.into(),
            found: version,
            supported: SEGMENT_VERSION,
        });
    }
    if h[12..16] != [0; 4] || h[24..28] != [0; 4] {
        return Err(Error::corrupt(path, 12, "segment header flags or reserved bytes are not zero"));
    }
    let mut base = [0u8; 8];
    base.copy_from_slice(&h[16..24]);
    Ok(HeaderCheck::Valid(u64::from_le_bytes(base)))
}

/// Reads and checks the header of an open segment file.
pub(crate) fn read_header(file: &dyn StorageFile, path: &Path, file_len: u64) -> Result<HeaderCheck> {
    if file_len < SEGMENT_HEADER_LEN as u64 {
        let mut buf = vec![0u8; file_len as usize];
        read_exact_at(file, &mut buf, 0).map_err(|e| Error::io("read", path, e))?;
        if buf.iter().any(|&b| b != 0) {
            return Err(Error::corrupt(path, 0, "segment shorter than its header"));
        }
        return Ok(HeaderCheck::Unwritten);
    }
    let mut buf = [0u8; SEGMENT_HEADER_LEN];
    read_exact_at(file, &mut buf, 0).map_err(|e| Error::io("read", path, e))?;
    decode_header(&buf, path)
}

/// The outcome of scanning batches forward from a known-good position.
#[derive(Debug)]
pub(crate) struct Scan {
    /// Position just after the last batch that verified.
    pub end: u64,
    /// Offset after the last record that verified.
    pub next_offset: u64,
    /// Batches that verified.
    pub batches: u64,
    /// The header of the last batch that verified.
    pub last_header: Option<BatchHeader>,
    /// Where and why the scan stopped, when it did not stop at the file's end.
    pub stop: Option<(u64, DecodeError)>,
    /// Index entries for the verified batches (when asked for).
    pub entries: Vec<IndexEntry>,
}

/// Scans batches in `[start, file_len)` with pread, expecting contiguous offsets
/// from `expected`, fully validating each batch (records included). Collects an
/// index entry every [`INDEX_INTERVAL_BYTES`], counting
/// from `last_indexed` (the position of the last entry already known, or the
/// segment header's end: the segment's start needs no entry).
pub(crate) fn scan(
    file: &dyn StorageFile,
    path: &Path,
    base: u64,
    start: u64,
    expected: u64,
    file_len: u64,
    mut last_indexed: u64,
) -> Result<Scan> {
    let mut scan = Scan {
        end: start,
        next_offset: expected,
        batches: 0,
        last_header: None,
        stop: None,
        entries: Vec::new(),
    };
    let mut buf: Vec<u8> = Vec::new();
    let mut buf_pos = start; // file position of buf[0]
    loop {
        let pos = scan.end;
        if pos >= file_len {
            return Ok(scan);
        }
        let rel = (pos - buf_pos) as usize;
        let result = batch::validate_batch(&buf[rel.min(buf.len())..], Some(scan.next_offset));
        match result {
            Ok(h) => {
                if pos >= last_indexed + INDEX_INTERVAL_BYTES {
                    let relative = h.base_offset - base;
                    if let (Ok(relative), Ok(position)) = (u32::try_from(relative), u32::try_from(pos)) {
                        scan.entries.push(IndexEntry { relative, position });
                        last_indexed = pos;
                    }
                }
                scan.end = pos + h.length as u64;
                scan.next_offset = h.next_offset();
                scan.batches += 1;
                scan.last_header = Some(h);
            }
            Err(DecodeError::Incomplete { needed }) => {
                let available = file_len - pos;
                if needed as u64 > available {
                    // The batch claims more bytes than the file holds.
                    scan.stop = Some((pos, DecodeError::Incomplete { needed }));
                    return Ok(scan);
                }
                // Refill from `pos`: at least a chunk, at least the whole batch.
                let want = (needed.max(SCAN_CHUNK_BYTES) as u64).min(available) as usize;
                buf.clear();
                buf.resize(want, 0);
                read_exact_at(file, &mut buf, pos).map_err(|e| Error::io("read", path, e))?;
                buf_pos = pos;
                if needed > want {
                    scan.stop = Some((pos, DecodeError::Incomplete { needed }));
                    return Ok(scan);
                }
            }
            Err(e) => {
                scan.stop = Some((pos, e));
                return Ok(scan);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_sort_and_parse() {
        assert_eq!(segment_name(42), "00000000000000000042.seg");
        assert_eq!(parse_name(&segment_name(42), SEGMENT_EXT), Some(42));
        assert_eq!(parse_name(&index_name(u64::MAX), INDEX_EXT), Some(u64::MAX));
        assert_eq!(parse_name("42.seg", SEGMENT_EXT), None);
        assert_eq!(parse_name("0000000000000000004x.seg", SEGMENT_EXT), None);
        assert_eq!(parse_name("00000000000000000042.seg.tmp", SEGMENT_EXT), None);
    }

    #[test]
    fn header_round_trip_and_damage() {
        let p = Path::new("x.seg");
        let h = encode_header(7);
        assert_eq!(decode_header(&h, p).unwrap(), HeaderCheck::Valid(7));
        assert_eq!(decode_header(&[0u8; 32], p).unwrap(), HeaderCheck::Unwritten);
        for bit in 0..SEGMENT_HEADER_LEN * 8 {
            let mut d = h;
            d[bit / 8] ^= 1 << (bit % 8);
            assert!(decode_header(&d, p).is_err(), "flip of bit {bit} went unnoticed");
        }
        let mut newer = h;
        newer[8] = 2;
        let crc = crc32c::crc32c(&newer[0..28]);
        newer[28..32].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(decode_header(&newer, p), Err(Error::UnsupportedFormat { found: 2, .. })));
    }
}
