//! The batch byte format: encode ([`BatchBuilder`]), verify ([`verify_batch`]) and decode
//! ([`records`]). Pure functions over byte slices, fuzzed: no input bytes may panic,
//! overflow or allocate. One CRC-32C covers a whole batch of records; docs/format.md
//! is the long form of the tables below.

use std::fmt;

// Batch header, little-endian, 48 bytes:
//   off size field
//   0   4    length            header + records + padding; multiple of 8; 48..=BATCH_BYTES_MAX
//   4   4    crc               CRC-32C (Castagnoli) of bytes [8, length)
//   8   4    magic             b"WLQB"
//   12  1    version           FORMAT_VERSION
//   13  1    flags             0, or FLAG_SECTOR_PADDED
//   14  2    reserved          0
//   16  8    base_offset       offset of the first record
//   24  8    base_timestamp    ms since the Unix epoch of the first record
//   32  4    record_count      >= 1
//   36  4    records_len       bytes of records after the header
//   40  8    durable_position  segment position already fdatasync'd when this batch was written
// then records_len bytes of records, then zero bytes of padding up to `length`:
// 0..=7 of them, or with FLAG_SECTOR_PADDED up to SECTOR_BYTES - 1, so that the
// batch ends on a sector boundary of its file and no later write shares a
// sector with it (for disks that may tear a sector rewrite).

/// The batch format version this build writes and reads.
pub(crate) const FORMAT_VERSION: u8 = 1;
/// Size of the fixed batch header.
pub(crate) const BATCH_HEADER_LEN: usize = 48;
/// Every batch length is a multiple of this, so the next header starts aligned.
pub(crate) const BATCH_ALIGN: usize = 8;
/// Flag: the padding runs to the next [`SECTOR_BYTES`] boundary of the file.
pub(crate) const FLAG_SECTOR_PADDED: u8 = 1;
/// The sector size sector padding aligns to: the largest common one (4Kn
/// disks, and the page size the kernel writes back).
pub(crate) const SECTOR_BYTES: usize = 4096;
const _: () = assert!(SECTOR_BYTES.is_multiple_of(BATCH_ALIGN));
/// `b"WLQB"` read as a little-endian u32.
pub(crate) const BATCH_MAGIC: u32 = u32::from_le_bytes(*b"WLQB");
/// Hard limit on one batch, header and padding included.
pub(crate) const BATCH_BYTES_MAX: usize = 64 << 20;
/// Largest [`BatchBuilder::record_len`] that fits in an empty batch: the limit to report
/// for a record that is too large.
pub(crate) const RECORD_BYTES_MAX: usize = BATCH_BYTES_MAX - BATCH_HEADER_LEN;

const LENGTH_AT: usize = 0;
const CRC_AT: usize = 4;
const MAGIC_AT: usize = 8;
const VERSION_AT: usize = 12;
const FLAGS_AT: usize = 13;
const RESERVED_AT: usize = 14;
const BASE_OFFSET_AT: usize = 16;
const BASE_TIMESTAMP_AT: usize = 24;
const RECORD_COUNT_AT: usize = 32;
const RECORDS_LEN_AT: usize = 36;
const DURABLE_POSITION_AT: usize = 40;
/// The checksum covers everything after the length and crc fields.
const CRC_START: usize = MAGIC_AT;

/// The smallest record: a one-byte varint for body_len, offset_delta, timestamp_delta,
/// key_len_plus_1, header_count and value_len. Bounds record_count by records_len.
const RECORD_LEN_MIN: usize = 6;
/// A LEB128 u64 takes at most ten bytes (9 * 7 + 1 bits).
const VARINT_LEN_MAX: usize = 10;
/// An offset_delta is below record_count, a u32: at most five varint bytes.
const OFFSET_DELTA_LEN_MAX: usize = 5;

const _: () = assert!(DURABLE_POSITION_AT + 8 == BATCH_HEADER_LEN);
// length and crc are the first 8 bytes: the Zeroed check reads exactly them, and the checksum
// cannot cover them (it is stored in one, and the other fixes its range).
const _: () = assert!(LENGTH_AT == 0 && CRC_AT == 4 && CRC_START == 8);
const _: () = assert!(BATCH_HEADER_LEN.is_multiple_of(BATCH_ALIGN));
const _: () = assert!(BATCH_BYTES_MAX.is_multiple_of(BATCH_ALIGN));
// `length` and `records_len` are u32 fields.
const _: () = assert!(BATCH_BYTES_MAX <= u32::MAX as usize);
// Every offset_delta and header_count of a valid batch fits a u32.
const _: () = assert!(BATCH_BYTES_MAX / RECORD_LEN_MIN <= u32::MAX as usize);

/// The fixed fields of a batch header. `flags`, `reserved` and `magic` are checked by
/// [`verify_batch`] but not kept: in v1 they hold a single valid value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BatchHeader {
    /// Total batch length: header + records + padding.
    pub length: u32,
    /// Stored CRC-32C of bytes `[8, length)`.
    pub crc: u32,
    /// Format version byte (only [`FORMAT_VERSION`] passes [`verify_batch`]).
    pub version: u8,
    /// Offset of the first record.
    pub base_offset: u64,
    /// Timestamp (ms since the Unix epoch) of the first record.
    pub base_timestamp: u64,
    /// Number of records, at least 1.
    pub record_count: u32,
    /// Bytes of record data after the header.
    pub records_len: u32,
    /// Segment position that was already durable when this batch was written.
    pub durable_position: u64,
}

impl BatchHeader {
    /// Offset one past the last record. Saturates, although a verified batch never needs to.
    pub fn next_offset(&self) -> u64 {
        self.base_offset.saturating_add(u64::from(self.record_count))
    }

    /// Total batch length in bytes (header + records + padding).
    #[allow(clippy::len_without_is_empty)] // a batch is never empty
    pub fn len(&self) -> usize {
        self.length as usize
    }
}

/// Why bytes are not a valid batch. Only [`DecodeError::Incomplete`] and
/// [`DecodeError::Zeroed`] describe data that may simply not be written yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum DecodeError {
    /// The buffer ends before the header or before `length`; `needed` counts from the batch start.
    Incomplete { needed: usize },
    /// The length and crc fields are zero: the end of written data (preallocated space).
    Zeroed,
    /// The length field is below the header size, unaligned, or above [`BATCH_BYTES_MAX`].
    BadLength { length: u64 },
    /// The CRC-32C over the batch does not match the stored one.
    Checksum { stored: u32, computed: u32 },
    /// The checksum matched but the magic is not `b"WLQB"`.
    BadMagic { found: u32 },
    /// The checksum matched but the batch was written by a newer (or unknown) format.
    UnsupportedVersion { found: u8 },
    /// The checksum matched but a header field is inconsistent.
    BadHeader { reason: &'static str },
    /// The batch is intact but does not start at the expected offset.
    UnexpectedOffset { expected: u64, found: u64 },
    /// Record `index` (0-based within the batch) is malformed.
    BadRecord { index: u32, reason: &'static str },
}

impl DecodeError {
    /// True if more bytes could turn this into a valid batch.
    #[cfg(test)]
    pub fn is_incomplete(&self) -> bool {
        matches!(self, DecodeError::Incomplete { .. })
    }
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Incomplete { needed } => {
                write!(f, "batch is incomplete: {needed} bytes needed from its start")
            }
            DecodeError::Zeroed => f.write_str("no batch: the header is zeroed (end of written data)"),
            DecodeError::BadLength { length } => write!(
                f,
                "batch length {length} is invalid: it must be a multiple of {BATCH_ALIGN} \
                 from {BATCH_HEADER_LEN} to {BATCH_BYTES_MAX}"
            ),
            DecodeError::Checksum { stored, computed } => {
                write!(f, "batch checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")
            }
            DecodeError::BadMagic { found } => {
                write!(f, "bad batch magic {found:#010x}, expected {BATCH_MAGIC:#010x}")
            }
            DecodeError::UnsupportedVersion { found } => write!(
                f,
                "unsupported batch format version {found}: this build reads version {FORMAT_VERSION}"
            ),
            DecodeError::BadHeader { reason } => write!(f, "bad batch header: {reason}"),
            DecodeError::UnexpectedOffset { expected, found } => {
                write!(f, "batch starts at offset {found}, expected {expected}")
            }
            DecodeError::BadRecord { index, reason } => {
                write!(f, "bad record {index} in batch: {reason}")
            }
        }
    }
}

impl std::error::Error for DecodeError {}

fn u32_at(bytes: &[u8; BATCH_HEADER_LEN], at: usize) -> u32 {
    let mut le = [0; 4];
    le.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(le)
}

fn u64_at(bytes: &[u8; BATCH_HEADER_LEN], at: usize) -> u64 {
    let mut le = [0; 8];
    le.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(le)
}

/// Reads the fixed header fields without verifying the checksum, for scanning.
/// Checks, in order: at least 48 bytes (else `Incomplete`), not `Zeroed`, a sane length.
pub(crate) fn peek_header(buf: &[u8]) -> Result<BatchHeader, DecodeError> {
    let Some(bytes) = buf.first_chunk::<BATCH_HEADER_LEN>() else {
        return Err(DecodeError::Incomplete { needed: BATCH_HEADER_LEN });
    };
    let length = u32_at(bytes, LENGTH_AT);
    let crc = u32_at(bytes, CRC_AT);
    if length == 0 && crc == 0 {
        return Err(DecodeError::Zeroed);
    }
    let len = length as usize;
    if len < BATCH_HEADER_LEN || !len.is_multiple_of(BATCH_ALIGN) || len > BATCH_BYTES_MAX {
        return Err(DecodeError::BadLength { length: u64::from(length) });
    }
    Ok(BatchHeader {
        length,
        crc,
        version: bytes[VERSION_AT],
        base_offset: u64_at(bytes, BASE_OFFSET_AT),
        base_timestamp: u64_at(bytes, BASE_TIMESTAMP_AT),
        record_count: u32_at(bytes, RECORD_COUNT_AT),
        records_len: u32_at(bytes, RECORDS_LEN_AT),
        durable_position: u64_at(bytes, DURABLE_POSITION_AT),
    })
}

/// Verifies the batch at the start of `buf` (which may extend past it) without parsing
/// records: sane length, whole batch present (else `Incomplete`), checksum, magic, version,
/// flags/reserved/count/padding, then `base_offset == expected_base` when given.
/// The hot path of a sequential scan: one CRC pass, no allocation.
pub(crate) fn verify_batch(buf: &[u8], expected_base: Option<u64>) -> Result<BatchHeader, DecodeError> {
    let header = peek_header(buf)?;
    let Some(batch) = buf.get(..header.len()) else {
        return Err(DecodeError::Incomplete { needed: header.len() });
    };
    // Everything after this point is covered by the checksum, so it is checked first: a
    // field read from a torn or corrupt batch would only produce a misleading error.
    let computed = crc32c::crc32c(&batch[CRC_START..]);
    if computed != header.crc {
        return Err(DecodeError::Checksum { stored: header.crc, computed });
    }
    let Some(fixed) = batch.first_chunk::<BATCH_HEADER_LEN>() else {
        return Err(DecodeError::Incomplete { needed: BATCH_HEADER_LEN });
    };
    let magic = u32_at(fixed, MAGIC_AT);
    if magic != BATCH_MAGIC {
        return Err(DecodeError::BadMagic { found: magic });
    }
    if header.version != FORMAT_VERSION {
        return Err(DecodeError::UnsupportedVersion { found: header.version });
    }
    check_header_fields(fixed, &header, batch)?;
    match expected_base {
        Some(expected) if expected != header.base_offset => {
            Err(DecodeError::UnexpectedOffset { expected, found: header.base_offset })
        }
        _ => Ok(header),
    }
}

/// The header rules that only make sense once the checksum matched.
fn check_header_fields(
    fixed: &[u8; BATCH_HEADER_LEN],
    header: &BatchHeader,
    batch: &[u8],
) -> Result<(), DecodeError> {
    let bad = |reason| Err(DecodeError::BadHeader { reason });
    let padded = match fixed[FLAGS_AT] {
        0 => false,
        FLAG_SECTOR_PADDED => true,
        _ => return bad("unknown flags"),
    };
    if fixed[RESERVED_AT] != 0 || fixed[RESERVED_AT + 1] != 0 {
        return bad("reserved bytes are not zero");
    }
    if header.record_count == 0 {
        return bad("record_count is zero");
    }
    let records_len = header.records_len as usize;
    // peek_header guaranteed length >= BATCH_HEADER_LEN.
    let room = header.len() - BATCH_HEADER_LEN;
    if records_len > room {
        return bad("records_len runs past the batch length");
    }
    let padding = &batch[BATCH_HEADER_LEN + records_len..];
    if padding.len() >= if padded { SECTOR_BYTES } else { BATCH_ALIGN } {
        return bad("padding is 8 bytes or more");
    }
    if padding.iter().any(|&b| b != 0) {
        return bad("padding is not zero");
    }
    // Both factors are below 2^32, so the product fits a u64.
    if u64::from(header.record_count) * RECORD_LEN_MIN as u64 > u64::from(header.records_len) {
        return bad("record_count is more than records_len can hold");
    }
    if header.base_offset.checked_add(u64::from(header.record_count)).is_none() {
        return bad("offsets of the records overflow u64");
    }
    Ok(())
}

/// [`verify_batch`] plus parsing every record: exactly `record_count` records with offset
/// deltas `0..record_count`, each body consumed exactly, and `records_len` consumed exactly.
pub(crate) fn validate_batch(buf: &[u8], expected_base: Option<u64>) -> Result<BatchHeader, DecodeError> {
    let header = verify_batch(buf, expected_base)?;
    let mut iter = records(buf, &header);
    for record in iter.by_ref() {
        record?;
    }
    if !iter.rest.is_empty() {
        return Err(DecodeError::BadHeader { reason: "records_len has bytes after the last record" });
    }
    Ok(header)
}

/// One record, borrowed from its batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RawRecord<'a> {
    /// Position within the batch: the record's offset is `base_offset + offset_delta`.
    pub offset_delta: u32,
    /// Record timestamp minus the batch's base_timestamp, wrapping (see `timestamp_ms`).
    pub timestamp_delta: i64,
    /// The record's timestamp: `base_timestamp.wrapping_add_signed(timestamp_delta)`.
    pub timestamp_ms: u64,
    /// `None` when the record has no key; `Some(&[])` is an empty key.
    pub key: Option<&'a [u8]>,
    /// Number of (name, value) pairs in `headers`.
    pub header_count: u32,
    /// The encoded header pairs; iterate them with [`header_pairs`].
    pub headers: &'a [u8],
    /// The record's value.
    pub value: &'a [u8],
}

/// Iterator over the records of a batch, from [`records`]. Fused after the first error.
#[derive(Debug, Clone)]
pub(crate) struct RecordIter<'a> {
    /// Record bytes not yet parsed.
    rest: &'a [u8],
    next_index: u32,
    record_count: u32,
    base_timestamp: u64,
    /// Set if `batch` was shorter than its records; reported by the first `next`.
    short: bool,
}

/// Iterates the records of a batch that passed [`verify_batch`]; `batch` starts at the
/// header and may extend past the batch. Yields at most `header.record_count` items and
/// stops after the first `Err(BadRecord)`. On an unverified header it still never panics.
pub(crate) fn records<'a>(batch: &'a [u8], header: &BatchHeader) -> RecordIter<'a> {
    let end = BATCH_HEADER_LEN.checked_add(header.records_len as usize);
    let region = end.and_then(|end| batch.get(BATCH_HEADER_LEN..end));
    RecordIter {
        rest: region.unwrap_or_default(),
        next_index: 0,
        record_count: header.record_count,
        base_timestamp: header.base_timestamp,
        short: region.is_none(),
    }
}

impl<'a> Iterator for RecordIter<'a> {
    type Item = Result<RawRecord<'a>, DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.next_index >= self.record_count {
            return None;
        }
        let index = self.next_index;
        let parsed = if self.short {
            Err("the batch is shorter than its records_len")
        } else {
            self.parse_record(index)
        };
        match parsed {
            Ok(record) => {
                self.next_index += 1;
                Some(Ok(record))
            }
            Err(reason) => {
                self.next_index = self.record_count; // fused
                Some(Err(DecodeError::BadRecord { index, reason }))
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = (self.record_count - self.next_index) as usize;
        (0, Some(left))
    }
}

impl<'a> RecordIter<'a> {
    /// Continues iterating a verified batch: `rest` is the record bytes not yet
    /// parsed (ending where the batch's records end) and `next_index` the index
    /// of the next record. Lets a reader keep positions instead of a borrow.
    pub(crate) fn resume(rest: &'a [u8], next_index: u32, header: &BatchHeader) -> RecordIter<'a> {
        RecordIter {
            rest,
            next_index,
            record_count: header.record_count,
            base_timestamp: header.base_timestamp,
            short: false,
        }
    }

    /// Record bytes not yet parsed.
    pub(crate) fn rest_len(&self) -> usize {
        self.rest.len()
    }

    fn parse_record(&mut self, index: u32) -> Result<RawRecord<'a>, &'static str> {
        if self.rest.is_empty() {
            return Err("records_len ends before record_count records");
        }
        let mut outer = Cursor(self.rest);
        let body_len = outer.varint().ok_or("body_len is not a valid varint")?;
        let body = outer.bytes(body_len).ok_or("body_len runs past records_len")?;
        let mut c = Cursor(body);

        let offset_delta = c.varint().ok_or("offset_delta is not a valid varint")?;
        if offset_delta != u64::from(index) {
            return Err("offset_delta does not match the record's position in the batch");
        }
        let timestamp_delta = zigzag_decode(c.varint().ok_or("timestamp_delta is not a valid varint")?);
        let key = match c.varint().ok_or("key length is not a valid varint")? {
            0 => None,
            len_plus_1 => Some(c.bytes(len_plus_1 - 1).ok_or("key runs past the record body")?),
        };
        let header_count = c.varint().ok_or("header_count is not a valid varint")?;
        // Each pair takes at least two bytes (two empty lengths).
        if header_count > (c.0.len() / 2) as u64 {
            return Err("header_count is more than the record body can hold");
        }
        let headers_start = c.0;
        for _ in 0..header_count {
            let name_len = c.varint().ok_or("header name length is not a valid varint")?;
            c.bytes(name_len).ok_or("header name runs past the record body")?;
            let value_len = c.varint().ok_or("header value length is not a valid varint")?;
            c.bytes(value_len).ok_or("header value runs past the record body")?;
        }
        let headers = &headers_start[..headers_start.len() - c.0.len()];
        let value_len = c.varint().ok_or("value length is not a valid varint")?;
        let value = c.bytes(value_len).ok_or("value runs past the record body")?;
        if !c.0.is_empty() {
            return Err("the record body has bytes after the value");
        }

        self.rest = outer.0;
        Ok(RawRecord {
            offset_delta: index,
            timestamp_delta,
            timestamp_ms: self.base_timestamp.wrapping_add_signed(timestamp_delta),
            key,
            // header_count <= body length / 2 < BATCH_BYTES_MAX, so the cast is lossless.
            header_count: header_count as u32,
            headers,
            value,
        })
    }
}

/// Iterator over the (name, value) pairs of [`RawRecord::headers`], from [`header_pairs`].
#[derive(Debug, Clone)]
pub(crate) struct HeaderIter<'a> {
    rest: Cursor<'a>,
    left: u32,
}

/// Iterates `count` (name, value) pairs encoded in `raw`. The pairs were validated when
/// the record was parsed, so on malformed input this just stops.
pub(crate) fn header_pairs(raw: &[u8], count: u32) -> HeaderIter<'_> {
    HeaderIter { rest: Cursor(raw), left: count }
}

impl<'a> Iterator for HeaderIter<'a> {
    type Item = (&'a [u8], &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            return None;
        }
        let pair = (|| {
            let name_len = self.rest.varint()?;
            let name = self.rest.bytes(name_len)?;
            let value_len = self.rest.varint()?;
            let value = self.rest.bytes(value_len)?;
            Some((name, value))
        })();
        self.left = if pair.is_some() { self.left - 1 } else { 0 };
        pair
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (0, Some(self.left as usize))
    }
}

/// A read position over untrusted bytes; every read is bounds-checked.
#[derive(Debug, Clone)]
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    /// Reads a canonical unsigned LEB128 u64: at most ten bytes, no overlong encoding
    /// (a final zero byte after the first), no bits beyond 64.
    fn varint(&mut self) -> Option<u64> {
        let mut value = 0u64;
        for (i, &byte) in self.0.iter().enumerate().take(VARINT_LEN_MAX) {
            if i == VARINT_LEN_MAX - 1 && byte > 1 {
                return None; // bits past 2^63, or an 11th byte
            }
            value |= u64::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                if byte == 0 && i > 0 {
                    return None; // overlong: the same value has a shorter encoding
                }
                self.0 = self.0.get(i + 1..)?;
                return Some(value);
            }
        }
        None // truncated
    }

    /// Takes `len` bytes, if that many remain.
    fn bytes(&mut self, len: u64) -> Option<&'a [u8]> {
        let len = usize::try_from(len).ok()?;
        let (taken, rest) = self.0.split_at_checked(len)?;
        self.0 = rest;
        Some(taken)
    }
}

fn varint_len(value: u64) -> usize {
    // One byte per started group of 7 bits; zero still takes one byte.
    let bits = (u64::BITS - value.leading_zeros()).max(1) as usize;
    bits.div_ceil(7)
}

fn put_varint(buf: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        buf.push((value as u8) | 0x80);
        value >>= 7;
    }
    buf.push(value as u8);
}

fn zigzag_encode(value: i64) -> u64 {
    ((value as u64) << 1) ^ ((value >> 63) as u64)
}

fn zigzag_decode(value: u64) -> i64 {
    ((value >> 1) as i64) ^ -((value & 1) as i64)
}

fn padded(len: usize) -> usize {
    len.next_multiple_of(BATCH_ALIGN)
}

/// Encodes one batch into a reusable buffer: once warm, pushing allocates nothing.
/// Use: `reset`, then `push` while `fits`, then `seal`, write the bytes, `reset` again.
#[derive(Debug, Default)]
pub(crate) struct BatchBuilder {
    /// Header placeholder + records (+ padding once sealed); empty only before first use.
    buf: Vec<u8>,
    base_offset: u64,
    base_timestamp: u64,
    /// The newest record timestamp pushed (for the time index).
    max_timestamp: u64,
    record_count: u32,
    records_len: usize,
    sealed: bool,
}

impl BatchBuilder {
    /// An empty builder for a batch starting at offset 0.
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts an empty batch at `base_offset`, keeping the buffer's capacity. The first
    /// pushed record's timestamp becomes the batch's base_timestamp.
    pub fn reset(&mut self, base_offset: u64) {
        self.buf.clear();
        self.buf.resize(BATCH_HEADER_LEN, 0);
        self.base_offset = base_offset;
        self.base_timestamp = 0;
        self.max_timestamp = 0;
        self.record_count = 0;
        self.records_len = 0;
        self.sealed = false;
    }

    /// True before the first push.
    pub fn is_empty(&self) -> bool {
        self.record_count == 0
    }

    /// Records pushed so far.
    #[cfg(test)]
    pub fn record_count(&self) -> u32 {
        self.record_count
    }

    /// The newest timestamp among the records pushed.
    pub fn max_timestamp(&self) -> u64 {
        self.max_timestamp
    }

    /// Offset of the first record.
    pub fn base_offset(&self) -> u64 {
        self.base_offset
    }

    /// Offset the next pushed record gets: `base_offset + record_count`.
    pub fn next_offset(&self) -> u64 {
        self.base_offset.saturating_add(u64::from(self.record_count))
    }

    /// Bytes the sealed batch would take now (header + records + padding).
    pub fn encoded_len(&self) -> usize {
        BATCH_HEADER_LEN + padded(self.records_len)
    }

    /// Upper bound on the bytes [`push`](Self::push) adds for this record: exact except
    /// that offset_delta is counted as 5 bytes and timestamp_delta as 10 (their real
    /// sizes depend on the batch), so it may exceed the real size by up to 14 bytes.
    pub fn record_len(key: Option<&[u8]>, headers: &[(&[u8], &[u8])], value: &[u8]) -> usize {
        let body = record_body_len(OFFSET_DELTA_LEN_MAX, VARINT_LEN_MAX, key, headers, value);
        varint_len(body as u64).saturating_add(body)
    }

    /// True if a record of `record_len` bytes (from [`record_len`](Self::record_len))
    /// can be pushed without the batch exceeding [`BATCH_BYTES_MAX`].
    pub fn fits(&self, record_len: usize) -> bool {
        // BATCH_BYTES_MAX is aligned, so if the padded size plus the record fits, the
        // re-padded size does too.
        record_len <= BATCH_BYTES_MAX - self.encoded_len()
    }

    /// Appends a record and returns its offset.
    ///
    /// Panics if the builder is sealed, or if the record does not [`fits`](Self::fits):
    /// callers check sizes first, so either is a bug in the caller.
    pub fn push(
        &mut self,
        key: Option<&[u8]>,
        headers: &[(&[u8], &[u8])],
        value: &[u8],
        timestamp_ms: u64,
    ) -> u64 {
        assert!(!self.sealed, "push on a sealed batch: reset it first");
        if self.buf.is_empty() {
            self.reset(self.base_offset); // a Default builder that was never reset
        }
        let offset = self.base_offset.checked_add(u64::from(self.record_count));
        let offset = offset.expect("record offsets exhausted u64");
        if self.record_count == 0 {
            self.base_timestamp = timestamp_ms;
        }
        self.max_timestamp = self.max_timestamp.max(timestamp_ms);
        let offset_delta = u64::from(self.record_count);
        // Wrapping both ways makes every pair of u64 timestamps representable.
        let ts = zigzag_encode(timestamp_ms.wrapping_sub(self.base_timestamp) as i64);

        let body = record_body_len(varint_len(offset_delta), varint_len(ts), key, headers, value);
        let record = varint_len(body as u64).saturating_add(body);
        assert!(self.fits(record), "record of {record} bytes overflows the batch");

        let start = self.buf.len();
        self.buf.reserve(record);
        put_varint(&mut self.buf, body as u64);
        put_varint(&mut self.buf, offset_delta);
        put_varint(&mut self.buf, ts);
        match key {
            None => put_varint(&mut self.buf, 0),
            Some(key) => {
                put_varint(&mut self.buf, key.len() as u64 + 1);
                self.buf.extend_from_slice(key);
            }
        }
        put_varint(&mut self.buf, headers.len() as u64);
        for (name, value) in headers {
            put_varint(&mut self.buf, name.len() as u64);
            self.buf.extend_from_slice(name);
            put_varint(&mut self.buf, value.len() as u64);
            self.buf.extend_from_slice(value);
        }
        put_varint(&mut self.buf, value.len() as u64);
        self.buf.extend_from_slice(value);
        assert_eq!(self.buf.len() - start, record, "record_len disagrees with encoding");

        self.records_len += record;
        self.record_count += 1;
        offset
    }

    /// Fills in the header (length, counts, `durable_position`, padding, crc) and returns
    /// the complete batch. The builder stays sealed until [`reset`](Self::reset); sealing
    /// again just rewrites the header.
    ///
    /// Panics if no record was pushed: an empty batch is not a valid batch.
    pub fn seal(&mut self, durable_position: u64) -> &[u8] {
        self.seal_with(durable_position, None)
    }

    /// Bytes the sealed batch takes when padded to end on a sector boundary,
    /// starting at file position `pos` (8-aligned).
    pub fn padded_len(&self, pos: u64) -> usize {
        let end = (pos as usize).saturating_add(self.encoded_len()).next_multiple_of(SECTOR_BYTES);
        end.saturating_sub(pos as usize)
    }

    /// [`seal`](BatchBuilder::seal), padded with zeros so that a batch written
    /// at file position `pos` ends on a [`SECTOR_BYTES`] boundary.
    pub fn seal_padded(&mut self, durable_position: u64, pos: u64) -> &[u8] {
        self.seal_with(durable_position, Some(pos))
    }

    fn seal_with(&mut self, durable_position: u64, padded_at: Option<u64>) -> &[u8] {
        assert!(!self.is_empty(), "seal of an empty batch");
        let length = match padded_at {
            Some(pos) => self.padded_len(pos),
            None => self.encoded_len(),
        };
        assert!(length <= BATCH_BYTES_MAX, "a padded batch past BATCH_BYTES_MAX");
        self.buf.truncate(BATCH_HEADER_LEN + self.records_len);
        self.buf.resize(length, 0);

        let header = &mut self.buf[..BATCH_HEADER_LEN];
        // `fits` kept length <= BATCH_BYTES_MAX, which fits a u32.
        header[LENGTH_AT..LENGTH_AT + 4].copy_from_slice(&(length as u32).to_le_bytes());
        header[MAGIC_AT..MAGIC_AT + 4].copy_from_slice(&BATCH_MAGIC.to_le_bytes());
        header[VERSION_AT] = FORMAT_VERSION;
        header[FLAGS_AT] = if padded_at.is_some() { FLAG_SECTOR_PADDED } else { 0 };
        header[RESERVED_AT..RESERVED_AT + 2].fill(0);
        header[BASE_OFFSET_AT..BASE_OFFSET_AT + 8].copy_from_slice(&self.base_offset.to_le_bytes());
        header[BASE_TIMESTAMP_AT..BASE_TIMESTAMP_AT + 8].copy_from_slice(&self.base_timestamp.to_le_bytes());
        header[RECORD_COUNT_AT..RECORD_COUNT_AT + 4].copy_from_slice(&self.record_count.to_le_bytes());
        header[RECORDS_LEN_AT..RECORDS_LEN_AT + 4].copy_from_slice(&(self.records_len as u32).to_le_bytes());
        header[DURABLE_POSITION_AT..DURABLE_POSITION_AT + 8].copy_from_slice(&durable_position.to_le_bytes());
        let crc = crc32c::crc32c(&self.buf[CRC_START..]);
        self.buf[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
        self.sealed = true;

        // The writer checks what the reader will check (a second CRC pass: debug only).
        debug_assert_eq!(validate_batch(&self.buf, Some(self.base_offset)).map(|h| h.len()), Ok(length));
        &self.buf
    }
}

/// Bytes of a record body (everything after body_len), given the two batch-dependent
/// varint sizes.
fn record_body_len(
    offset_delta_len: usize,
    timestamp_len: usize,
    key: Option<&[u8]>,
    headers: &[(&[u8], &[u8])],
    value: &[u8],
) -> usize {
    let key = match key {
        None => 1,
        Some(key) => varint_len(key.len() as u64 + 1).saturating_add(key.len()),
    };
    let pairs = headers.iter().fold(0usize, |sum, (name, value)| {
        sum.saturating_add(varint_len(name.len() as u64) + name.len())
            .saturating_add(varint_len(value.len() as u64) + value.len())
    });
    (offset_delta_len + timestamp_len + key)
        .saturating_add(varint_len(headers.len() as u64))
        .saturating_add(pairs)
        .saturating_add(varint_len(value.len() as u64))
        .saturating_add(value.len())
}

/// Runs every decoder over arbitrary bytes and asserts that they agree with each other;
/// the body of the `decode_batch` fuzz target (through `walq::__fuzz`).
pub(crate) fn fuzz_decode(data: &[u8]) {
    let peeked = peek_header(data);
    let verified = verify_batch(data, None);
    let validated = validate_batch(data, None);
    let validated_at_0 = validate_batch(data, Some(0));
    let verified_at_0 = verify_batch(data, Some(0));

    if let Err(DecodeError::Incomplete { needed }) = &verified {
        assert!(*needed > data.len(), "incomplete although {needed} bytes are present");
    }
    // The record iterator must be safe on any peeked header, verified or not.
    if let Ok(header) = &peeked {
        for record in records(data, header).flatten() {
            header_pairs(record.headers, record.header_count).for_each(drop);
        }
    }
    let Ok(header) = verified else {
        assert!(validated.is_err() && verified_at_0.is_err() && validated_at_0.is_err());
        return;
    };
    assert_eq!(peeked, Ok(header));
    assert!(header.len() <= data.len() && header.len().is_multiple_of(BATCH_ALIGN));
    assert!(header.record_count >= 1 && header.next_offset() > header.base_offset);
    assert_eq!(verified_at_0.is_ok(), header.base_offset == 0);

    // The encoding is canonical: when the writer convention holds (the first record is at
    // base_timestamp), re-encoding the records must give back the same bytes. Otherwise the
    // timestamp deltas change, and with them the record sizes.
    // A sector-padded batch's padding depends on where it lay in its file, which a
    // lone batch does not tell: only unpadded batches are re-encoded.
    let unpadded = data.get(13) == Some(&0);
    let canonical =
        unpadded && matches!(records(data, &header).next(), Some(Ok(first)) if first.timestamp_delta == 0);
    let mut rebuilt = canonical.then(|| {
        let mut builder = BatchBuilder::new();
        builder.reset(header.base_offset);
        builder
    });
    let mut iter = records(data, &header);
    let mut ok = 0u32;
    let mut pairs = Vec::new();
    for record in iter.by_ref() {
        let Ok(record) = record else { break };
        assert_eq!(record.offset_delta, ok);
        pairs.clear();
        pairs.extend(header_pairs(record.headers, record.header_count));
        assert_eq!(pairs.len(), record.header_count as usize);
        if let Some(builder) = &mut rebuilt {
            let offset = builder.push(record.key, &pairs, record.value, record.timestamp_ms);
            assert_eq!(offset, header.base_offset + u64::from(ok));
        }
        ok += 1;
    }
    assert!(iter.next().is_none(), "the record iterator is not fused");

    match validated {
        Ok(valid) => {
            assert_eq!(valid, header);
            assert_eq!(ok, header.record_count);
            assert_eq!(validated_at_0.is_ok(), header.base_offset == 0);
            if let Some(builder) = &mut rebuilt {
                assert_eq!(builder.seal(header.durable_position), &data[..header.len()]);
            }
        }
        Err(err) => {
            assert!(matches!(err, DecodeError::BadRecord { .. } | DecodeError::BadHeader { .. }));
            assert!(validated_at_0.is_err());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Regression (CI fuzzing, `decode_batch`): a valid sector-padded batch made
    /// the fuzz oracle re-encode it unpadded and compare the bytes.
    #[test]
    fn fuzz_oracle_accepts_a_lone_sector_padded_batch() {
        let data: &[u8] = &[
            80, 0, 0, 0, 228, 181, 80, 232, 87, 76, 81, 66, 1, 1, 0, 0, 42, 0, 0, 0, 0, 0, 0, 0, 0, 104, 229,
            207, 139, 1, 0, 0, 2, 0, 0, 0, 26, 0, 0, 0, 0, 16, 0, 0, 0, 0, 0, 0, 16, 0, 0, 3, 107, 49, 1, 1,
            104, 1, 80, 5, 104, 101, 108, 108, 111, 8, 1, 19, 0, 0, 3, 98, 121, 101, 0, 0, 0, 0, 0, 0,
        ];
        assert_eq!(data[13], FLAG_SECTOR_PADDED);
        fuzz_decode(data);
    }

    type Header<'a> = (&'a [u8], &'a [u8]);

    /// An owned record for building expectations.
    #[derive(Debug, Clone, PartialEq, Eq)]
    struct Rec {
        key: Option<Vec<u8>>,
        headers: Vec<(Vec<u8>, Vec<u8>)>,
        value: Vec<u8>,
        timestamp_ms: u64,
    }

    fn rec(key: Option<&[u8]>, headers: &[Header<'_>], value: &[u8], ts: u64) -> Rec {
        Rec {
            key: key.map(<[u8]>::to_vec),
            headers: headers.iter().map(|(n, v)| (n.to_vec(), v.to_vec())).collect(),
            value: value.to_vec(),
            timestamp_ms: ts,
        }
    }

    fn encode(base: u64, recs: &[Rec], durable: u64) -> Vec<u8> {
        let mut b = BatchBuilder::new();
        b.reset(base);
        for (i, r) in recs.iter().enumerate() {
            let pairs: Vec<Header<'_>> =
                r.headers.iter().map(|(n, v)| (n.as_slice(), v.as_slice())).collect();
            let before = b.encoded_len();
            let bound = BatchBuilder::record_len(r.key.as_deref(), &pairs, &r.value);
            assert!(b.fits(bound));
            let offset = b.push(r.key.as_deref(), &pairs, &r.value, r.timestamp_ms);
            assert_eq!(offset, base + i as u64);
            assert!(b.encoded_len() <= padded(before + bound));
        }
        let expected_len = b.encoded_len();
        let out = b.seal(durable).to_vec();
        assert_eq!(out.len(), expected_len);
        out
    }

    fn decode(batch: &[u8]) -> (BatchHeader, Vec<Rec>) {
        let header = validate_batch(batch, None).expect("valid batch");
        let recs = records(batch, &header)
            .map(|r| {
                let r = r.expect("valid record");
                let headers: Vec<_> =
                    header_pairs(r.headers, r.header_count).map(|(n, v)| (n.to_vec(), v.to_vec())).collect();
                assert_eq!(headers.len(), r.header_count as usize);
                Rec {
                    key: r.key.map(<[u8]>::to_vec),
                    headers,
                    value: r.value.to_vec(),
                    timestamp_ms: r.timestamp_ms,
                }
            })
            .collect();
        (header, recs)
    }

    fn round_trip(base: u64, recs: &[Rec]) {
        let batch = encode(base, recs, 4096);
        let (header, decoded) = decode(&batch);
        assert_eq!(decoded, recs);
        assert_eq!(header.base_offset, base);
        assert_eq!(header.record_count as usize, recs.len());
        assert_eq!(header.next_offset(), base + recs.len() as u64);
        assert_eq!(header.durable_position, 4096);
        assert_eq!(header.len(), batch.len());
        fuzz_decode(&batch);
    }

    /// Recomputes the crc of a hand-edited batch so that only the edit is tested.
    fn reseal(batch: &mut [u8]) {
        let len = u32::from_le_bytes(batch[0..4].try_into().unwrap()) as usize;
        let crc = crc32c::crc32c(&batch[CRC_START..len]);
        batch[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
    }

    /// A batch around hand-written record bytes, with a correct header and crc.
    fn raw_batch(base: u64, record_count: u32, record_bytes: &[u8]) -> Vec<u8> {
        let length = padded(BATCH_HEADER_LEN + record_bytes.len());
        let mut b = vec![0; length];
        b[0..4].copy_from_slice(&(length as u32).to_le_bytes());
        b[8..12].copy_from_slice(b"WLQB");
        b[12] = FORMAT_VERSION;
        b[16..24].copy_from_slice(&base.to_le_bytes());
        b[24..32].copy_from_slice(&1_000u64.to_le_bytes());
        b[32..36].copy_from_slice(&record_count.to_le_bytes());
        b[36..40].copy_from_slice(&(record_bytes.len() as u32).to_le_bytes());
        b[48..48 + record_bytes.len()].copy_from_slice(record_bytes);
        reseal(&mut b);
        b
    }

    fn samples() -> Vec<Vec<u8>> {
        vec![
            encode(0, &[rec(None, &[], b"", 0)], 0),
            encode(7, &[rec(Some(b"k"), &[(b"h", b"v")], b"hello", 1_700_000_000_000)], 48),
            encode(
                1 << 40,
                &[
                    rec(Some(b""), &[], b"a", 500),
                    rec(None, &[(b"", b""), (b"trace", b"abc")], b"bb", 400),
                    rec(Some(b"key"), &[], &[0xff; 130], 90_000),
                ],
                123_456,
            ),
        ]
    }

    #[test]
    fn header_layout_and_magic() {
        assert_eq!(BATCH_MAGIC.to_le_bytes(), *b"WLQB");
        let batch = encode(5, &[rec(Some(b"k"), &[], b"v", 42)], 99);
        assert_eq!(&batch[8..12], b"WLQB");
        assert_eq!(batch[12], 1);
        assert_eq!(u64::from_le_bytes(batch[16..24].try_into().unwrap()), 5);
        assert_eq!(u64::from_le_bytes(batch[24..32].try_into().unwrap()), 42);
        assert_eq!(u64::from_le_bytes(batch[40..48].try_into().unwrap()), 99);
        assert_eq!(batch.len() % BATCH_ALIGN, 0);
    }

    #[test]
    fn round_trip_with_and_without_key() {
        round_trip(0, &[rec(Some(b"user-1"), &[], b"v1", 10), rec(None, &[], b"v2", 10)]);
    }

    #[test]
    fn empty_key_differs_from_no_key() {
        let none = encode(0, &[rec(None, &[], b"v", 0)], 0);
        let empty = encode(0, &[rec(Some(b""), &[], b"v", 0)], 0);
        assert_ne!(none, empty);
        assert_eq!(decode(&none).1[0].key, None);
        assert_eq!(decode(&empty).1[0].key, Some(vec![]));
    }

    #[test]
    fn headers_round_trip() {
        let headers: &[Header<'_>] =
            &[(b"content-type", b"json"), (b"", b""), (b"dup", b"1"), (b"dup", b"2")];
        round_trip(3, &[rec(None, headers, b"body", 1), rec(Some(b"k"), &[(b"x", &[0; 200])], b"", 1)]);
    }

    #[test]
    fn empty_value_and_minimal_record() {
        let batch = encode(0, &[rec(None, &[], b"", 0)], 0);
        // The smallest record is RECORD_LEN_MIN bytes.
        assert_eq!(validate_batch(&batch, None).unwrap().records_len as usize, RECORD_LEN_MIN);
        round_trip(0, &[rec(None, &[], b"", 0), rec(None, &[], b"", 0)]);
    }

    #[test]
    fn negative_and_extreme_timestamp_deltas() {
        round_trip(0, &[rec(None, &[], b"a", 1_000), rec(None, &[], b"b", 10), rec(None, &[], b"c", 0)]);
        round_trip(
            0,
            &[rec(None, &[], b"a", u64::MAX), rec(None, &[], b"b", 0), rec(None, &[], b"c", 1 << 63)],
        );
        let batch = encode(0, &[rec(None, &[], b"a", 1_000), rec(None, &[], b"b", 990)], 0);
        let header = verify_batch(&batch, None).unwrap();
        let deltas: Vec<i64> = records(&batch, &header).map(|r| r.unwrap().timestamp_delta).collect();
        assert_eq!(deltas, [0, -10]);
    }

    #[test]
    fn varints_are_canonical() {
        for v in [0, 1, 127, 128, 300, 16_383, 16_384, u64::from(u32::MAX), u64::MAX - 1, u64::MAX] {
            let mut buf = Vec::new();
            put_varint(&mut buf, v);
            assert_eq!(buf.len(), varint_len(v), "{v}");
            let mut c = Cursor(&buf);
            assert_eq!(c.varint(), Some(v));
            assert!(c.0.is_empty());
            assert_eq!(Cursor(&buf[..buf.len() - 1]).varint(), None, "truncated {v}");
        }
        assert_eq!(varint_len(u64::MAX), VARINT_LEN_MAX);
        assert_eq!(varint_len(u64::from(u32::MAX)), OFFSET_DELTA_LEN_MAX);
        let rejected: &[&[u8]] = &[
            &[0x80, 0x00],                                                       // overlong zero
            &[0xff, 0x00],                                                       // overlong 127
            &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02],       // 2^64
            &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x81, 0x00], // 11 bytes
            &[],
        ];
        for bytes in rejected {
            assert_eq!(Cursor(bytes).varint(), None, "{bytes:x?}");
        }
    }

    #[test]
    fn zigzag_round_trips() {
        for v in [0, 1, -1, 2, -2, i64::MAX, i64::MIN, -1_000, 1_000] {
            assert_eq!(zigzag_decode(zigzag_encode(v)), v);
        }
        assert_eq!(zigzag_encode(-1), 1);
        assert_eq!(zigzag_encode(1), 2);
        assert_eq!(zigzag_encode(i64::MIN), u64::MAX);
    }

    #[test]
    fn every_bit_flip_is_detected() {
        for batch in samples() {
            // Once alone and once followed by more data, where a longer length would fit.
            let mut followed = batch.clone();
            followed.extend_from_slice(&batch);
            followed.extend_from_slice(&[0; 256]);
            for buf in [batch.clone(), followed] {
                for bit in 0..batch.len() * 8 {
                    let mut bad = buf.clone();
                    bad[bit / 8] ^= 1 << (bit % 8);
                    assert!(verify_batch(&bad, None).is_err(), "bit {bit} of {batch:x?}");
                    assert!(validate_batch(&bad, None).is_err(), "bit {bit}");
                }
            }
        }
    }

    #[test]
    fn every_truncation_is_incomplete() {
        for batch in samples() {
            for cut in 0..batch.len() {
                let needed = if cut < BATCH_HEADER_LEN { BATCH_HEADER_LEN } else { batch.len() };
                let err = verify_batch(&batch[..cut], None).unwrap_err();
                assert_eq!(err, DecodeError::Incomplete { needed }, "cut at {cut}");
                assert!(err.is_incomplete());
                assert!(validate_batch(&batch[..cut], None).unwrap_err().is_incomplete());
            }
        }
    }

    #[test]
    fn trailing_bytes_after_the_batch_are_ignored() {
        let batch = samples().pop().unwrap();
        let mut buf = batch.clone();
        buf.extend_from_slice(&[0xaa; 100]);
        assert_eq!(validate_batch(&buf, None), validate_batch(&batch, None));
        assert_eq!(decode(&buf).1, decode(&batch).1);
    }

    #[test]
    fn length_claiming_gigabytes_is_rejected_without_allocating() {
        let mut batch = samples().remove(1);
        for length in [u32::MAX, 0xffff_fff8, (BATCH_BYTES_MAX + BATCH_ALIGN) as u32] {
            batch[0..4].copy_from_slice(&length.to_le_bytes());
            let err = DecodeError::BadLength { length: u64::from(length) };
            assert_eq!(peek_header(&batch), Err(err.clone()));
            assert_eq!(validate_batch(&batch, None), Err(err));
        }
        // The largest legal length is only asked for, never allocated or read.
        batch[0..4].copy_from_slice(&(BATCH_BYTES_MAX as u32).to_le_bytes());
        let needed = BATCH_BYTES_MAX;
        assert_eq!(verify_batch(&batch, None), Err(DecodeError::Incomplete { needed }));
        for length in [0, 8, 40, 49, 52] {
            batch[0..4].copy_from_slice(&(length as u32).to_le_bytes());
            let err = DecodeError::BadLength { length };
            assert_eq!(verify_batch(&batch, None), Err(err));
        }
    }

    #[test]
    fn zeros_are_zeroed() {
        assert_eq!(peek_header(&[0; 4096]), Err(DecodeError::Zeroed));
        assert_eq!(verify_batch(&[0; 48], None), Err(DecodeError::Zeroed));
        assert_eq!(validate_batch(&[0; 48], Some(0)), Err(DecodeError::Zeroed));
        // Shorter than a header: ask for the rest first.
        assert_eq!(peek_header(&[0; 47]), Err(DecodeError::Incomplete { needed: 48 }));
        // Zeroed is decided by the length and crc fields alone.
        let mut buf = [0xee; 64];
        buf[..8].fill(0);
        assert_eq!(verify_batch(&buf, None), Err(DecodeError::Zeroed));
        // Length 0 with a crc is not zeroed, but still never a batch.
        buf[4] = 1;
        assert_eq!(verify_batch(&buf, None), Err(DecodeError::BadLength { length: 0 }));
    }

    #[test]
    fn wrong_expected_offset_is_reported() {
        let batch = encode(10, &[rec(None, &[], b"v", 0)], 0);
        assert!(verify_batch(&batch, Some(10)).is_ok());
        let err = DecodeError::UnexpectedOffset { expected: 11, found: 10 };
        assert_eq!(verify_batch(&batch, Some(11)), Err(err.clone()));
        assert_eq!(validate_batch(&batch, Some(11)), Err(err));
    }

    #[test]
    fn newer_version_with_valid_checksum_is_unsupported() {
        let mut batch = samples().remove(1);
        batch[VERSION_AT] = 2;
        let stored = u32::from_le_bytes(batch[4..8].try_into().unwrap());
        assert!(
            matches!(verify_batch(&batch, None), Err(DecodeError::Checksum { stored: s, .. }) if s == stored)
        );
        reseal(&mut batch);
        assert_eq!(verify_batch(&batch, None), Err(DecodeError::UnsupportedVersion { found: 2 }));
    }

    #[test]
    fn sector_padded_batches_end_on_a_sector_boundary_and_verify() {
        for pos in [32u64, 40, 4088, 4096, 12_344] {
            let mut b = BatchBuilder::new();
            b.reset(7);
            b.push(Some(b"k"), &[(b"h", b"v")], b"value", 1_000);
            let len = b.padded_len(pos);
            let batch = b.seal_padded(0, pos).to_vec();
            assert_eq!(batch.len(), len);
            assert_eq!((pos as usize + len) % SECTOR_BYTES, 0, "at {pos}");
            assert_eq!(batch[FLAGS_AT], FLAG_SECTOR_PADDED);
            let h = validate_batch(&batch, Some(7)).unwrap();
            assert_eq!(h.len(), len);
            let got: Vec<_> = records(&batch, &h).map(|r| r.unwrap().value.to_vec()).collect();
            assert_eq!(got, vec![b"value".to_vec()]);
            if len - BATCH_HEADER_LEN - h.records_len as usize >= BATCH_ALIGN {
                // Without the flag, that much padding is damage.
                let mut unflagged = batch.clone();
                unflagged[FLAGS_AT] = 0;
                reseal(&mut unflagged);
                assert!(matches!(verify_batch(&unflagged, None), Err(DecodeError::BadHeader { .. })));
            }
            let mut dirty = batch.clone();
            let last = dirty.len() - 1;
            dirty[last] = 9;
            reseal(&mut dirty);
            assert_eq!(
                verify_batch(&dirty, None),
                Err(DecodeError::BadHeader { reason: "padding is not zero" })
            );
        }
    }

    #[test]
    fn bad_magic_with_valid_checksum() {
        let mut batch = samples().remove(0);
        batch[8..12].copy_from_slice(b"WLQA");
        reseal(&mut batch);
        let found = u32::from_le_bytes(*b"WLQA");
        assert_eq!(verify_batch(&batch, None), Err(DecodeError::BadMagic { found }));
    }

    #[test]
    fn inconsistent_header_fields_are_rejected() {
        let base = samples().remove(2);
        let records_len = u32::from_le_bytes(base[36..40].try_into().unwrap());
        // Each edit gets the batch and its records_len.
        type Edit = fn(&mut [u8], u32);
        let edits: [(&str, Edit); 8] = [
            ("unknown flags", |b, _| b[FLAGS_AT] = 2),
            ("reserved bytes are not zero", |b, _| b[RESERVED_AT + 1] = 1),
            ("record_count is zero", |b, _| b[32..36].fill(0)),
            ("records_len runs past the batch length", |b, _| {
                let room = (b.len() - BATCH_HEADER_LEN) as u32;
                b[36..40].copy_from_slice(&(room + 1).to_le_bytes());
            }),
            ("padding is 8 bytes or more", |b, records_len| {
                b[36..40].copy_from_slice(&(records_len - 8).to_le_bytes());
            }),
            ("padding is not zero", |b, _| {
                let last = b.len() - 1;
                b[last] = 1;
            }),
            ("record_count is more than records_len can hold", |b, records_len| {
                let count = records_len / RECORD_LEN_MIN as u32 + 1;
                b[32..36].copy_from_slice(&count.to_le_bytes());
            }),
            ("offsets of the records overflow u64", |b, _| {
                b[16..24].copy_from_slice(&(u64::MAX - 2).to_le_bytes());
            }),
        ];
        assert!(base.len() - BATCH_HEADER_LEN - records_len as usize > 0, "sample needs padding");
        for (reason, edit) in edits {
            let mut batch = base.clone();
            edit(&mut batch, records_len);
            reseal(&mut batch);
            assert_eq!(verify_batch(&batch, None), Err(DecodeError::BadHeader { reason }));
            fuzz_decode(&batch);
        }
        // A records_len one record short leaves bytes of the batch unexplained.
        let mut batch = raw_batch(0, 1, &[5, 0, 0, 0, 0, 0, 5, 1, 0, 0, 0, 0]);
        assert_eq!(
            validate_batch(&batch, None),
            Err(DecodeError::BadHeader { reason: "records_len has bytes after the last record" })
        );
        batch[32] = 2;
        reseal(&mut batch);
        assert!(validate_batch(&batch, None).is_ok());
    }

    #[test]
    fn malformed_records_are_rejected() {
        let cases: &[(u32, &[u8], u32, &str)] = &[
            (1, &[5, 1, 0, 0, 0, 0], 0, "offset_delta does not match the record's position in the batch"),
            (
                2,
                &[5, 0, 0, 0, 0, 0, 5, 0, 0, 0, 0, 0],
                1,
                "offset_delta does not match the record's position in the batch",
            ),
            (1, &[6, 0, 0, 0, 0, 0, 0], 0, "the record body has bytes after the value"),
            (1, &[5, 0, 0, 0, 0, 1], 0, "value runs past the record body"),
            (1, &[9, 0, 0, 0, 0, 0], 0, "body_len runs past records_len"),
            (1, &[0x80, 0x00, 0, 0, 0, 0], 0, "body_len is not a valid varint"),
            (1, &[6, 0x80, 0x00, 0, 0, 0, 0], 0, "offset_delta is not a valid varint"),
            (1, &[5, 0, 0, 5, 0, 0], 0, "key runs past the record body"),
            (1, &[5, 0, 0, 0, 3, 0], 0, "header_count is more than the record body can hold"),
            (1, &[6, 0, 0, 0, 1, 5, 0], 0, "header name runs past the record body"),
            (2, &[5, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], 1, "offset_delta is not a valid varint"),
            (1, &[5, 0, 0, 0, 0, 0, 0], 0, "records_len has bytes after the last record"),
            (2, &[11, 0, 0, 0, 0, 6, 1, 2, 3, 4, 5, 6], 1, "records_len ends before record_count records"),
        ];
        for &(count, bytes, index, reason) in cases {
            let batch = raw_batch(0, count, bytes);
            assert!(verify_batch(&batch, Some(0)).is_ok(), "{reason}: the header is fine");
            let err = validate_batch(&batch, Some(0)).unwrap_err();
            match err {
                DecodeError::BadRecord { index: i, reason: r } => {
                    assert_eq!((i, r), (index, reason), "{bytes:?}");
                }
                DecodeError::BadHeader { reason: r } => assert!(r.starts_with(reason), "{r}"),
                other => panic!("{reason}: {other}"),
            }
            // The iterator stops after the first error.
            let header = peek_header(&batch).unwrap();
            let items: Vec<_> = records(&batch, &header).collect();
            assert!(items.iter().filter(|r| r.is_err()).count() <= 1);
            assert!(items.iter().position(Result::is_err).is_none_or(|p| p == items.len() - 1));
            fuzz_decode(&batch);
        }
    }

    #[test]
    fn records_tolerates_a_header_that_lies() {
        let batch = samples().remove(1);
        let mut header = peek_header(&batch).unwrap();
        header.records_len = u32::MAX;
        header.record_count = u32::MAX;
        let items: Vec<_> = records(&batch, &header).collect();
        assert!(matches!(items[..], [Err(DecodeError::BadRecord { index: 0, .. })]));
        // A header pair count larger than the pairs just stops.
        assert_eq!(header_pairs(&[1, b'a', 1, b'b'], 5).count(), 1);
        assert_eq!(header_pairs(&[0x80], 1).count(), 0);
    }

    #[test]
    fn builder_reuse_and_reseal() {
        let mut b = BatchBuilder::new();
        assert!(b.is_empty());
        assert_eq!(b.encoded_len(), BATCH_HEADER_LEN);
        // A Default builder starts at offset 0 without a reset.
        assert_eq!(b.push(None, &[], b"x", 5), 0);
        let first = b.seal(1).to_vec();
        assert_eq!(validate_batch(&first, Some(0)).unwrap().durable_position, 1);
        // Sealing again rewrites the header only.
        let again = b.seal(2).to_vec();
        assert_eq!(again.len(), first.len());
        assert_eq!(validate_batch(&again, Some(0)).unwrap().durable_position, 2);

        let capacity = b.buf.capacity();
        b.reset(100);
        assert!(b.is_empty());
        assert_eq!((b.base_offset(), b.next_offset()), (100, 100));
        assert_eq!(b.push(Some(b"k"), &[], b"v", 7), 100);
        assert_eq!(b.push(Some(b"k"), &[], b"v", 8), 101);
        assert_eq!((b.record_count(), b.next_offset()), (2, 102));
        let batch = b.seal(0).to_vec();
        assert_eq!(b.buf.capacity(), capacity, "a warm builder does not reallocate");
        let (header, recs) = decode(&batch);
        assert_eq!((header.base_offset, header.base_timestamp), (100, 7));
        assert_eq!(recs[1].timestamp_ms, 8);
    }

    #[test]
    fn fits_respects_the_batch_limit() {
        let mut b = BatchBuilder::new();
        b.reset(0);
        assert!(b.fits(RECORD_BYTES_MAX));
        assert!(!b.fits(RECORD_BYTES_MAX + 1));
        b.push(None, &[], b"", 0);
        assert!(!b.fits(RECORD_BYTES_MAX));
        assert!(b.fits(RECORD_BYTES_MAX - BATCH_ALIGN));
        // A value of exactly the limit is never pushable; record_len says so.
        let big = vec![0; RECORD_BYTES_MAX];
        assert!(BatchBuilder::record_len(None, &[], &big) > RECORD_BYTES_MAX);
    }

    #[test]
    #[should_panic(expected = "seal of an empty batch")]
    fn sealing_an_empty_batch_is_a_bug() {
        BatchBuilder::new().seal(0);
    }

    #[test]
    #[should_panic(expected = "push on a sealed batch")]
    fn pushing_after_seal_is_a_bug() {
        let mut b = BatchBuilder::new();
        b.push(None, &[], b"", 0);
        b.seal(0);
        b.push(None, &[], b"", 0);
    }

    #[test]
    fn display_is_lowercase_and_specific() {
        let errors = [
            DecodeError::Incomplete { needed: 48 },
            DecodeError::Zeroed,
            DecodeError::BadLength { length: 3 },
            DecodeError::Checksum { stored: 1, computed: 2 },
            DecodeError::BadMagic { found: 0 },
            DecodeError::UnsupportedVersion { found: 2 },
            DecodeError::BadHeader { reason: "unknown flags" },
            DecodeError::UnexpectedOffset { expected: 1, found: 2 },
            DecodeError::BadRecord { index: 3, reason: "value runs past the record body" },
        ];
        for e in errors {
            let text = e.to_string();
            assert!(text.starts_with(|c: char| c.is_ascii_lowercase()), "{text}");
            assert!(!text.contains(&format!("{e:?}")), "{text}");
        }
        assert_eq!(
            DecodeError::BadMagic { found: 0 }.to_string(),
            "bad batch magic 0x00000000, expected 0x42514c57"
        );
    }

    fn arb_rec() -> impl Strategy<Value = Rec> {
        let bytes = |max| proptest::collection::vec(any::<u8>(), 0..max);
        (
            proptest::option::of(bytes(12)),
            proptest::collection::vec((bytes(6), bytes(6)), 0..3),
            bytes(150),
            prop_oneof![any::<u64>(), 1_700_000_000_000u64..1_700_000_100_000],
        )
            .prop_map(|(key, headers, value, timestamp_ms)| Rec {
                key,
                headers,
                value,
                timestamp_ms,
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn prop_round_trip(base in 0u64..u64::MAX / 2, recs in proptest::collection::vec(arb_rec(), 1..12)) {
            round_trip(base, &recs);
        }

        #[test]
        fn prop_arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            fuzz_decode(&bytes);
        }

        /// Random edits under a valid checksum reach the record parser.
        #[test]
        fn prop_resealed_edits_never_panic(
            recs in proptest::collection::vec(arb_rec(), 1..6),
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        ) {
            let mut batch = encode(0, &recs, 0);
            for (at, byte) in edits {
                let at = BATCH_HEADER_LEN + at.index(batch.len() - BATCH_HEADER_LEN);
                batch[at] = byte;
            }
            reseal(&mut batch);
            fuzz_decode(&batch);
        }
    }
}
