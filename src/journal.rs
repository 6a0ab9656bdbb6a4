//! The consumer journal: named consumers' committed positions and consumer
//! groups' acknowledgement state, in one small append-only checksummed file,
//! `consumers.journal`, beside the segments (format in docs/format.md).
//!
//! Every change is an entry appended to the file; the state is the replay of
//! the entries (the [`Image`]). Reading stops at the first entry that fails
//! its length or checksum, so a damaged journal falls back to the last valid
//! entry and never jumps ahead. The file is preallocated with zeros (so a
//! commit on a full disk still has room) and compacted (a snapshot of the
//! image written to a temp file, synced, renamed over, directory synced)
//! when the room runs out or when bytes past the valid end must not be
//! appended after. Invariants: an entry is applied to the image in the same
//! order it is written; nothing is appended after bytes that are not zeros.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::config::Durability;
use crate::error::{Error, Result};
use crate::fs::{Storage, StorageFile, write_all_at};
use crate::segment::TEMP_SUFFIX;

/// The journal's file name in a queue directory.
pub(crate) const JOURNAL_FILE: &str = "consumers.journal";
const MAGIC: &[u8; 8] = b"walqjrnl";
/// Journal format version this build writes and reads.
pub(crate) const JOURNAL_VERSION: u32 = 1;
/// Header: magic, version u32, CRC-32C of the 12 bytes before it.
pub(crate) const JOURNAL_HEADER_LEN: usize = 16;
/// Entry framing: body length u32, CRC-32C of the body u32.
const ENTRY_HEADER_LEN: usize = 8;
/// Longest entry body accepted (a longer length field is damage).
pub(crate) const ENTRY_BODY_MAX: usize = 1 << 20;
/// Zeroed room kept ahead of the last entry, at least.
const PREALLOCATE_MIN: u64 = 64 << 10;
/// After a failed write, the housekeeping thread retries the rewrite this soon.
const RETRY_AFTER_FAILURE: std::time::Duration = std::time::Duration::from_millis(100);
/// Longest consumer or group name, in bytes.
pub(crate) const NAME_MAX: usize = 128;
/// Offsets per `Delivered`/`Done` entry, at most (keeps entries far below the bound).
const OFFSETS_PER_ENTRY: usize = 4096;

const KIND_COMMIT: u8 = 1;
const KIND_DELETE_CONSUMER: u8 = 2;
const KIND_GROUP_CREATE: u8 = 3;
const KIND_DELIVERED: u8 = 4;
const KIND_DONE: u8 = 5;
const KIND_DELETE_GROUP: u8 = 6;
const KIND_SKIP: u8 = 7;

/// One change of consumer state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Entry {
    /// A named consumer's position: the next offset it reads.
    Commit {
        name: String,
        offset: u64,
    },
    DeleteConsumer {
        name: String,
    },
    /// Creates (or resets) a group starting at `floor`.
    GroupCreate {
        name: String,
        floor: u64,
    },
    /// Records handed out, with their delivery counts.
    Delivered {
        name: String,
        items: Vec<(u64, u32)>,
    },
    /// Records acknowledged or dead-lettered: never delivered again.
    Done {
        name: String,
        offsets: Vec<u64>,
    },
    DeleteGroup {
        name: String,
    },
    /// Everything below `to` is gone (retention removed it, or a reset).
    Skip {
        name: String,
        to: u64,
    },
}

/// A group's persisted state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct GroupImage {
    /// Every offset below is done.
    pub floor: u64,
    /// One past the highest offset delivered or done (at least `floor`).
    /// Not stored as such: a replay derives it from the entries, and an
    /// offset at or past it is simply undelivered.
    pub next: u64,
    /// Done offsets at or above `floor`.
    pub done: BTreeSet<u64>,
    /// Delivery counts of delivered offsets that are not done.
    pub counts: BTreeMap<u64, u32>,
}

impl GroupImage {
    fn advance_floor(&mut self) {
        while self.floor < u64::MAX && self.done.remove(&self.floor) {
            self.floor += 1;
        }
        self.next = self.next.max(self.floor);
    }
}

/// The state the entries describe.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Image {
    pub consumers: BTreeMap<String, u64>,
    pub groups: BTreeMap<String, GroupImage>,
}

impl Image {
    pub(crate) fn apply(&mut self, e: &Entry) {
        match e {
            Entry::Commit { name, offset } => {
                self.consumers.insert(name.clone(), *offset);
            }
            Entry::DeleteConsumer { name } => {
                self.consumers.remove(name);
            }
            Entry::GroupCreate { name, floor } => {
                self.groups
                    .insert(name.clone(), GroupImage { floor: *floor, next: *floor, ..Default::default() });
            }
            Entry::Delivered { name, items } => {
                if let Some(g) = self.groups.get_mut(name) {
                    for &(o, c) in items {
                        if o >= g.floor && !g.done.contains(&o) {
                            let slot = g.counts.entry(o).or_insert(0);
                            *slot = (*slot).max(c);
                            g.next = g.next.max(o.saturating_add(1));
                        }
                    }
                }
            }
            Entry::Done { name, offsets } => {
                if let Some(g) = self.groups.get_mut(name) {
                    for &o in offsets {
                        if o >= g.floor {
                            g.counts.remove(&o);
                            g.done.insert(o);
                            g.next = g.next.max(o.saturating_add(1));
                        }
                    }
                    g.advance_floor();
                }
            }
            Entry::DeleteGroup { name } => {
                self.groups.remove(name);
            }
            Entry::Skip { name, to } => {
                if let Some(g) = self.groups.get_mut(name)
                    && *to > g.floor
                {
                    g.floor = *to;
                    g.done = g.done.split_off(to);
                    g.counts = g.counts.split_off(to);
                    g.advance_floor();
                }
            }
        }
    }

    /// Entries that rebuild this image from nothing.
    fn snapshot(&self) -> Vec<Entry> {
        let mut out = Vec::new();
        for (name, &offset) in &self.consumers {
            out.push(Entry::Commit { name: name.clone(), offset });
        }
        for (name, g) in &self.groups {
            out.push(Entry::GroupCreate { name: name.clone(), floor: g.floor });
            let items: Vec<(u64, u32)> = g.counts.iter().map(|(&o, &c)| (o, c)).collect();
            for chunk in items.chunks(OFFSETS_PER_ENTRY) {
                out.push(Entry::Delivered { name: name.clone(), items: chunk.to_vec() });
            }
            let done: Vec<u64> = g.done.iter().copied().collect();
            for chunk in done.chunks(OFFSETS_PER_ENTRY) {
                out.push(Entry::Done { name: name.clone(), offsets: chunk.to_vec() });
            }
        }
        out
    }

    /// Positions are never ahead of the log: clamp them to `next_offset`
    /// (a crash may have taken back records that were not durable).
    pub(crate) fn clamp_to(&mut self, next_offset: u64) -> bool {
        let mut changed = false;
        for pos in self.consumers.values_mut() {
            if *pos > next_offset {
                *pos = next_offset;
                changed = true;
            }
        }
        for g in self.groups.values_mut() {
            if g.next > next_offset || g.floor > next_offset {
                g.floor = g.floor.min(next_offset);
                g.next = g.next.min(next_offset).max(g.floor);
                g.done = g.done.range(..next_offset).copied().collect();
                g.counts = g.counts.range(..next_offset).map(|(&o, &c)| (o, c)).collect();
                changed = true;
            }
        }
        changed
    }
}

/// Checks a consumer or group name: 1 to 128 bytes of `[A-Za-z0-9._-]`, not
/// starting with a dot (names become directory names of dead-letter queues).
pub(crate) fn check_name(kind: &'static str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= NAME_MAX
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidOption {
            name: kind,
            reason: format!(
                "{name:?}: a name is 1 to {NAME_MAX} characters of A-Z, a-z, 0-9, '.', '_', '-', not starting with '.'"
            ),
        })
    }
}

fn put_name(buf: &mut Vec<u8>, name: &str) {
    debug_assert!(name.len() <= NAME_MAX);
    buf.push(name.len() as u8);
    buf.extend_from_slice(name.as_bytes());
}

/// Appends one framed entry to `buf`.
pub(crate) fn encode_entry(buf: &mut Vec<u8>, e: &Entry) {
    let start = buf.len();
    buf.extend_from_slice(&[0u8; ENTRY_HEADER_LEN]);
    match e {
        Entry::Commit { name, offset } => {
            buf.push(KIND_COMMIT);
            put_name(buf, name);
            buf.extend_from_slice(&offset.to_le_bytes());
        }
        Entry::DeleteConsumer { name } => {
            buf.push(KIND_DELETE_CONSUMER);
            put_name(buf, name);
        }
        Entry::GroupCreate { name, floor } => {
            buf.push(KIND_GROUP_CREATE);
            put_name(buf, name);
            buf.extend_from_slice(&floor.to_le_bytes());
        }
        Entry::Delivered { name, items } => {
            buf.push(KIND_DELIVERED);
            put_name(buf, name);
            buf.extend_from_slice(&(items.len() as u32).to_le_bytes());
            for &(o, c) in items {
                buf.extend_from_slice(&o.to_le_bytes());
                buf.extend_from_slice(&c.to_le_bytes());
            }
        }
        Entry::Done { name, offsets } => {
            buf.push(KIND_DONE);
            put_name(buf, name);
            buf.extend_from_slice(&(offsets.len() as u32).to_le_bytes());
            for &o in offsets {
                buf.extend_from_slice(&o.to_le_bytes());
            }
        }
        Entry::DeleteGroup { name } => {
            buf.push(KIND_DELETE_GROUP);
            put_name(buf, name);
        }
        Entry::Skip { name, to } => {
            buf.push(KIND_SKIP);
            put_name(buf, name);
            buf.extend_from_slice(&to.to_le_bytes());
        }
    }
    let body_len = buf.len() - start - ENTRY_HEADER_LEN;
    let crc = crc32c::crc32c(&buf[start + ENTRY_HEADER_LEN..]);
    buf[start..start + 4].copy_from_slice(&(body_len as u32).to_le_bytes());
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// A bounds-checked read position over an entry body.
struct Body<'a>(&'a [u8]);

impl<'a> Body<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (a, b) = self.0.split_at_checked(n)?;
        self.0 = b;
        Some(a)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4).map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }
    fn name(&mut self) -> Option<String> {
        let len = self.u8()? as usize;
        let name = std::str::from_utf8(self.take(len)?).ok()?.to_string();
        check_name("name", &name).ok()?;
        Some(name)
    }
    /// A count of items of `size` bytes each that must fit in what is left.
    fn count(&mut self, size: usize) -> Option<usize> {
        let n = self.u32()? as usize;
        (n <= self.0.len() / size).then_some(n)
    }
}

/// Decodes an entry body (framing already checked); `None` if malformed.
pub(crate) fn decode_body(body: &[u8]) -> Option<Entry> {
    let mut b = Body(body);
    let kind = b.u8()?;
    let name = b.name()?;
    let e = match kind {
        KIND_COMMIT => Entry::Commit { name, offset: b.u64()? },
        KIND_DELETE_CONSUMER => Entry::DeleteConsumer { name },
        KIND_GROUP_CREATE => Entry::GroupCreate { name, floor: b.u64()? },
        KIND_DELIVERED => {
            let n = b.count(12)?;
            let mut items = Vec::with_capacity(n);
            for _ in 0..n {
                items.push((b.u64()?, b.u32()?));
            }
            Entry::Delivered { name, items }
        }
        KIND_DONE => {
            let n = b.count(8)?;
            let mut offsets = Vec::with_capacity(n);
            for _ in 0..n {
                offsets.push(b.u64()?);
            }
            Entry::Done { name, offsets }
        }
        KIND_DELETE_GROUP => Entry::DeleteGroup { name },
        KIND_SKIP => Entry::Skip { name, to: b.u64()? },
        _ => return None,
    };
    b.0.is_empty().then_some(e)
}

fn encode_header() -> [u8; JOURNAL_HEADER_LEN] {
    let mut h = [0u8; JOURNAL_HEADER_LEN];
    h[..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&JOURNAL_VERSION.to_le_bytes());
    let crc = crc32c::crc32c(&h[..12]);
    h[12..].copy_from_slice(&crc.to_le_bytes());
    h
}

/// What reading a journal file found.
#[derive(Debug, Default)]
pub(crate) struct Parsed {
    pub image: Image,
    /// Bytes of header and valid entries.
    pub valid_end: u64,
    /// Valid entries read.
    pub entries: u64,
    /// Why reading stopped before the zeros (or the end): damage, a torn
    /// write, or a header that is not a journal's. `None` when clean.
    pub damage: Option<(u64, String)>,
    /// Bytes after `valid_end` are not all zeros: never append after them.
    pub dirty_tail: bool,
}

/// Replays a journal's bytes. Errors only for a newer format version.
pub(crate) fn parse(data: &[u8], path: &Path) -> Result<Parsed> {
    let mut p = Parsed::default();
    let header_ok = data.len() >= JOURNAL_HEADER_LEN
        && &data[..8] == MAGIC
        && crc32c::crc32c(&data[..12]) == u32::from_le_bytes(data[12..16].try_into().expect("4 bytes"));
    if !header_ok {
        if data.is_empty() {
            return Ok(p);
        }
        p.damage = Some((0, "journal header is damaged or not a walq journal".into()));
        if data.len() < JOURNAL_HEADER_LEN {
            p.dirty_tail = data.iter().any(|&b| b != 0);
            return Ok(p);
        }
        // A damaged header does not damage the entries: each has its own
        // checksum, so the state is still read (as version 1) rather than lost.
    }
    let version = u32::from_le_bytes(data[8..12].try_into().expect("4 bytes"));
    if header_ok && version > JOURNAL_VERSION {
        return Err(Error::UnsupportedFormat {
            path: path.into(),
            found: version,
            supported: JOURNAL_VERSION,
        });
    }
    let mut pos = JOURNAL_HEADER_LEN;
    while let Some(frame) = data.get(pos..pos + ENTRY_HEADER_LEN) {
        let len = u32::from_le_bytes(frame[..4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(frame[4..].try_into().expect("4 bytes"));
        if len == 0 && crc == 0 {
            break; // the preallocated zeros: the end
        }
        let body =
            (len <= ENTRY_BODY_MAX).then(|| data.get(pos + ENTRY_HEADER_LEN..pos + ENTRY_HEADER_LEN + len));
        let entry = match body.flatten() {
            Some(body) if crc32c::crc32c(body) == crc => decode_body(body),
            _ => None,
        };
        let Some(entry) = entry else {
            if p.damage.is_none() {
                p.damage = Some((pos as u64, "journal entry fails its length, checksum or structure".into()));
            }
            break;
        };
        p.image.apply(&entry);
        p.entries += 1;
        pos += ENTRY_HEADER_LEN + len;
    }
    p.valid_end = pos as u64;
    p.dirty_tail = data[pos.min(data.len())..].iter().any(|&b| b != 0);
    Ok(p)
}

/// The journal of one queue directory.
#[derive(Debug)]
pub(crate) struct Journal {
    storage: Arc<dyn Storage>,
    dir: PathBuf,
    path: PathBuf,
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// The open file; `None` until the first write (or after a failure).
    file: Option<Arc<dyn StorageFile>>,
    /// End of the valid entries written.
    end: u64,
    /// Length of the file (zeros from `end` up to it).
    room: u64,
    /// Entries encoded but not written yet (`Interval` durability).
    buf: Vec<u8>,
    /// When buffered (`Interval`) entries must be written and synced by
    /// (real time: it bounds the window a crash can lose).
    due: Option<std::time::Instant>,
    /// The housekeeping thread knows `due` (it read it, or whoever set it
    /// was told to wake it). False after a caller's failed write set a retry
    /// deadline on the caller's own thread, which tells nobody.
    due_told: bool,
    /// Written since the last fdatasync.
    unsynced: bool,
    /// The next write must rewrite the whole file (first write after damage,
    /// or after a failed write left the file in an unknown state).
    rewrite: bool,
    /// The image holds entries the file may lack (a write failed): the file
    /// must be rewritten even if nothing new is recorded.
    dirty: bool,
    image: Image,
    /// Entries dropped at load because of damage (reported in stats).
    damaged: bool,
}

impl Journal {
    /// Loads the journal of `dir` (none yet is an empty one). Writes nothing;
    /// positions above `next_offset` are clamped in memory (and on the first
    /// write, which rewrites the file then).
    pub(crate) fn load(storage: Arc<dyn Storage>, dir: &Path, next_offset: u64) -> Result<Journal> {
        let path = dir.join(JOURNAL_FILE);
        let (parsed, len, file) = match storage.open(&path, false) {
            Ok(f) => {
                let len = f.len().map_err(|e| Error::io("stat", &path, e))?;
                let len_usize =
                    usize::try_from(len).map_err(|_| Error::corrupt(&path, 0, "journal too large"))?;
                let mut data = vec![0u8; len_usize];
                crate::fs::read_exact_at(f.as_ref(), &mut data, 0)
                    .map_err(|e| Error::io("read", &path, e))?;
                // What this open saw must be what the next one sees, even
                // after a power cut: the entries a crashed process left in
                // the page cache become durable now (as the log's tail does).
                f.sync_data().map_err(|e| Error::io("fdatasync", &path, e))?;
                (parse(&data, &path)?, len, Some(f))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (Parsed::default(), 0, None),
            Err(e) => return Err(Error::io("open", &path, e)),
        };
        if let Some((pos, why)) = &parsed.damage {
            tracing::warn!(
                journal = %path.display(), position = pos, entries_kept = parsed.entries, reason = %why,
                "consumer journal damaged: positions fall back to the last valid entry"
            );
        }
        let mut image = parsed.image;
        let clamped = image.clamp_to(next_offset);
        if clamped {
            tracing::warn!(journal = %path.display(), next_offset, "consumer positions past the log end were moved back to it");
        }
        let rewrite = file.is_none() || parsed.dirty_tail || clamped || parsed.damage.is_some();
        let dirty = clamped;
        Ok(Journal {
            storage,
            dir: dir.to_path_buf(),
            path,
            inner: Mutex::new(Inner {
                file,
                end: parsed.valid_end,
                room: len,
                buf: Vec::new(),
                due: None,
                due_told: true,
                unsynced: false,
                rewrite,
                dirty,
                image,
                damaged: parsed.damage.is_some(),
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads the state under the lock.
    pub(crate) fn with_image<T>(&self, f: impl FnOnce(&Image) -> T) -> T {
        f(&self.lock().image)
    }

    /// Whether loading changed the state (positions above the log's end
    /// lowered): the caller persists it before anything else happens.
    pub(crate) fn needs_persist(&self) -> bool {
        self.lock().dirty
    }

    /// Whether loading found damage.
    pub(crate) fn damaged(&self) -> bool {
        self.lock().damaged
    }

    /// Applies `entries` and makes them as durable as asked: `Sync` writes and
    /// fdatasyncs before returning, `Os` writes, `Interval` buffers (the
    /// queue's maintenance thread writes and syncs it within the interval).
    pub(crate) fn record(&self, entries: &[Entry], durability: Durability) -> Result<()> {
        debug_assert!(
            !matches!(durability, Durability::Interval(_)),
            "Interval entries must go through record_scheduling, whose answer wakes the housekeeping thread"
        );
        self.record_scheduling(entries, durability).map(|_| ())
    }

    /// [`record`](Journal::record), saying whether the maintenance thread
    /// must be told: true when `Interval` entries moved the sync deadline
    /// earlier (none was pending, or this one is sooner), or when the pending
    /// one was set by a failed write on a caller's thread that told nobody.
    /// Any other pending deadline was seen by the thread, or told by whoever
    /// set it, so an ack per delivery wakes that thread once per interval,
    /// not once per ack.
    pub(crate) fn record_scheduling(&self, entries: &[Entry], durability: Durability) -> Result<bool> {
        let mut inner = self.lock();
        for e in entries {
            inner.image.apply(e);
            // Long lists go in several entries, each far below ENTRY_BODY_MAX.
            match e {
                Entry::Delivered { name, items } if items.len() > OFFSETS_PER_ENTRY => {
                    for chunk in items.chunks(OFFSETS_PER_ENTRY) {
                        encode_entry(
                            &mut inner.buf,
                            &Entry::Delivered { name: name.clone(), items: chunk.to_vec() },
                        );
                    }
                }
                Entry::Done { name, offsets } if offsets.len() > OFFSETS_PER_ENTRY => {
                    for chunk in offsets.chunks(OFFSETS_PER_ENTRY) {
                        encode_entry(
                            &mut inner.buf,
                            &Entry::Done { name: name.clone(), offsets: chunk.to_vec() },
                        );
                    }
                }
                e => encode_entry(&mut inner.buf, e),
            }
        }
        match durability {
            Durability::Sync => self.write_out(&mut inner, true).map(|()| false),
            Durability::Os => self.write_out(&mut inner, false).map(|()| false),
            Durability::Interval(d) => {
                let due = std::time::Instant::now() + d;
                let sooner = inner.due.is_none_or(|t| due < t);
                if sooner {
                    inner.due = Some(due);
                }
                let tell = sooner || !inner.due_told;
                inner.due_told = true;
                Ok(tell)
            }
        }
    }

    /// Writes buffered entries, and syncs if asked (or if anything written
    /// is unsynced and `sync`).
    pub(crate) fn flush(&self, sync: bool) -> Result<()> {
        let mut inner = self.lock();
        self.write_out(&mut inner, sync)
    }

    /// Writes and syncs buffered entries that are due (the maintenance
    /// thread's tick). Returns when the next ones are due, if any are buffered.
    pub(crate) fn flush_due(&self) -> Result<Option<std::time::Instant>> {
        let mut inner = self.lock();
        // Only the housekeeping thread calls this: from here on it knows `due`.
        inner.due_told = true;
        match inner.due {
            Some(t) if t <= std::time::Instant::now() => self.write_out(&mut inner, true).map(|()| None),
            other => Ok(other),
        }
    }

    fn write_out(&self, inner: &mut Inner, sync: bool) -> Result<()> {
        if inner.buf.is_empty() && !inner.dirty && !(sync && inner.unsynced) {
            return Ok(()); // nothing to write: never create or rewrite the file for nothing
        }
        let result = (|| {
            if inner.rewrite || inner.dirty || inner.end + inner.buf.len() as u64 > inner.room {
                return self.rewrite(inner);
            }
            if !inner.buf.is_empty() {
                let file = self.file(inner)?;
                write_all_at(file.as_ref(), &inner.buf, inner.end)
                    .map_err(|e| Error::io("write", &self.path, e))?;
                inner.end += inner.buf.len() as u64;
                inner.buf.clear();
                // `due` stays: written is not synced; `Interval` entries
                // still need the fdatasync their deadline promises.
                inner.unsynced = true;
            }
            if sync && inner.unsynced {
                let file = self.file(inner)?;
                file.sync_data().map_err(|e| Error::io("fdatasync", &self.path, e))?;
                inner.unsynced = false;
                inner.due = None;
            }
            Ok(())
        })();
        if result.is_err() {
            // What reached the file is unknown: rewrite it from the image
            // (which already holds these entries), at the next write or when
            // the housekeeping thread retries, and at close.
            inner.rewrite = true;
            inner.dirty = true;
            inner.file = None;
            inner.buf.clear();
            inner.due = Some(std::time::Instant::now() + RETRY_AFTER_FAILURE);
            inner.due_told = false;
        }
        result
    }

    /// Writes the image now (temp file, fdatasync, rename, directory fsync):
    /// used when opening changed the state (positions clamped to the log).
    pub(crate) fn persist(&self) -> Result<()> {
        let mut inner = self.lock();
        inner.dirty = true;
        self.write_out(&mut inner, true)
    }

    fn file(&self, inner: &mut Inner) -> Result<Arc<dyn StorageFile>> {
        if let Some(f) = &inner.file {
            return Ok(Arc::clone(f));
        }
        let f = self.storage.open(&self.path, false).map_err(|e| Error::io("open", &self.path, e))?;
        inner.file = Some(Arc::clone(&f));
        Ok(f)
    }

    /// Replaces the file with a snapshot of the image and fresh zeroed room:
    /// temp file, fdatasync, rename, directory fsync.
    fn rewrite(&self, inner: &mut Inner) -> Result<()> {
        let mut bytes = encode_header().to_vec();
        for e in inner.image.snapshot() {
            encode_entry(&mut bytes, &e);
        }
        let end = bytes.len() as u64;
        let room = end + PREALLOCATE_MIN.max(end);
        bytes.resize(room as usize, 0);
        let tmp = self.dir.join(format!("{JOURNAL_FILE}{TEMP_SUFFIX}"));
        let f = self.storage.open(&tmp, true).map_err(|e| Error::io("create", &tmp, e))?;
        f.set_len(0).map_err(|e| Error::io("truncate", &tmp, e))?;
        write_all_at(f.as_ref(), &bytes, 0).map_err(|e| Error::io("write", &tmp, e))?;
        f.sync_data().map_err(|e| Error::io("fdatasync", &tmp, e))?;
        self.storage.rename(&tmp, &self.path).map_err(|e| Error::io("rename", &self.path, e))?;
        self.storage.sync_dir(&self.dir).map_err(|e| Error::io("fsync", &self.dir, e))?;
        inner.file = Some(f);
        inner.end = end;
        inner.room = room;
        inner.buf.clear();
        inner.due = None;
        inner.unsynced = false;
        inner.rewrite = false;
        inner.dirty = false;
        Ok(())
    }
}

/// For the fuzz target: replays arbitrary bytes as a journal (no panic, no
/// allocation from an unchecked length), then checks that a snapshot of what
/// it read replays to the same state.
pub(crate) fn fuzz_check(data: &[u8]) {
    let Ok(parsed) = parse(data, Path::new("fuzz")) else { return };
    let mut bytes = encode_header().to_vec();
    for e in parsed.image.snapshot() {
        encode_entry(&mut bytes, &e);
    }
    let again = parse(&bytes, Path::new("fuzz")).expect("a snapshot parses");
    assert!(again.damage.is_none() && !again.dirty_tail, "a snapshot is clean");
    let norm = |mut img: Image| {
        for g in img.groups.values_mut() {
            g.next = 0; // derived, see GroupImage::next
        }
        img
    };
    assert_eq!(norm(again.image), norm(parsed.image), "a snapshot replays to the same state");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_kinds() -> Vec<Entry> {
        vec![
            Entry::Commit { name: "billing".into(), offset: 42 },
            Entry::GroupCreate { name: "g".into(), floor: 10 },
            Entry::Delivered { name: "g".into(), items: vec![(10, 1), (11, 1), (12, 2)] },
            Entry::Done { name: "g".into(), offsets: vec![10, 12] },
            Entry::Skip { name: "g".into(), to: 5 },
            Entry::Commit { name: "x".into(), offset: 1 },
            Entry::DeleteConsumer { name: "x".into() },
            Entry::GroupCreate { name: "h".into(), floor: 0 },
            Entry::DeleteGroup { name: "h".into() },
        ]
    }

    #[test]
    fn entries_round_trip_and_replay() {
        let mut buf = encode_header().to_vec();
        for e in all_kinds() {
            let start = buf.len();
            encode_entry(&mut buf, &e);
            assert_eq!(decode_body(&buf[start + ENTRY_HEADER_LEN..]), Some(e));
        }
        let p = parse(&buf, Path::new("j")).unwrap();
        assert!(p.damage.is_none() && !p.dirty_tail);
        assert_eq!(p.entries, 9);
        assert_eq!(p.image.consumers, BTreeMap::from([("billing".to_string(), 42)]));
        let g = &p.image.groups["g"];
        assert_eq!((g.floor, g.next), (11, 13));
        assert_eq!(g.counts, BTreeMap::from([(11, 1)]));
        assert_eq!(g.done, BTreeSet::from([12]));
    }

    #[test]
    fn snapshot_rebuilds_the_same_image() {
        let mut img = Image::default();
        for e in all_kinds() {
            img.apply(&e);
        }
        let mut again = Image::default();
        for e in img.snapshot() {
            again.apply(&e);
        }
        assert_eq!(img, again);
    }

    #[test]
    fn damage_falls_back_to_the_last_valid_entry() {
        let mut buf = encode_header().to_vec();
        encode_entry(&mut buf, &Entry::Commit { name: "c".into(), offset: 5 });
        let second = buf.len();
        encode_entry(&mut buf, &Entry::Commit { name: "c".into(), offset: 9 });
        for flip in second..buf.len() {
            let mut bad = buf.clone();
            bad[flip] ^= 0x10;
            let p = parse(&bad, Path::new("j")).unwrap();
            assert_eq!(p.image.consumers["c"], 5, "flip at {flip}");
            assert!(p.damage.is_some() && p.dirty_tail);
        }
        // A torn (zero) tail is the clean end.
        let mut torn = buf.clone();
        torn.truncate(second);
        torn.resize(buf.len() + 100, 0);
        let p = parse(&torn, Path::new("j")).unwrap();
        assert!(p.damage.is_none() && !p.dirty_tail);
    }

    #[test]
    fn newer_version_is_refused() {
        let mut h = encode_header();
        h[8] = 2;
        let crc = crc32c::crc32c(&h[..12]);
        h[12..].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(parse(&h, Path::new("j")), Err(Error::UnsupportedFormat { found: 2, .. })));
    }

    #[test]
    fn clamp_moves_positions_back_to_the_log_end() {
        let mut img = Image::default();
        img.apply(&Entry::Commit { name: "c".into(), offset: 50 });
        img.apply(&Entry::GroupCreate { name: "g".into(), floor: 0 });
        img.apply(&Entry::Delivered { name: "g".into(), items: vec![(0, 1), (40, 1)] });
        img.apply(&Entry::Done { name: "g".into(), offsets: vec![0] });
        assert!(img.clamp_to(30));
        assert_eq!(img.consumers["c"], 30);
        let g = &img.groups["g"];
        assert_eq!((g.floor, g.next, g.counts.len()), (1, 30, 0));
        assert!(!img.clamp_to(30));
    }

    #[test]
    fn names_are_checked() {
        for ok in ["a", "billing-v2", "x.y_z", &"n".repeat(128)] {
            check_name("consumer", ok).unwrap();
        }
        for bad in ["", ".hidden", "a/b", "a b", "é", &"n".repeat(129)] {
            assert!(check_name("consumer", bad).is_err(), "{bad}");
        }
    }
}
