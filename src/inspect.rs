//! Read-only inspection of a queue directory, for tools such as `walq
//! inspect`, `verify`, `dump`, `tail`, `consumer list` and `repair`: a survey
//! of the segments, the saved consumers and groups, a full verification with
//! pread (no maps), a record reader that needs no lock, and a repair plan.
//! Invariant: nothing here writes, creates or takes the directory lock,
//! except [`RepairPlan::apply`], which holds the lock.
//!
//! Everything works on a directory a live [`Queue`](crate::Queue) holds, too:
//! it then sees whatever the writer has handed to the OS so far, which may
//! include records a power cut could still take back.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::batch::{self, BATCH_HEADER_LEN, BatchHeader, DecodeError, RecordIter};
use crate::error::{Error, Result};
use crate::fs::{LOCK_FILE, RealFs, Storage, StorageFile, read_exact_at};
use crate::index::{self, INDEX_HEADER_LEN, IndexEntry, IndexProblem};
use crate::record::RecordRef;
use crate::recovery::LAST_RECOVERY_FILE;
use crate::recovery::Survey as Rest;
use crate::segment::{self, HeaderCheck, INDEX_EXT, SEGMENT_EXT, SEGMENT_HEADER_LEN, TEMP_SUFFIX};

/// Bytes read with one pread while walking batches (more for a larger batch).
const READ_CHUNK_BYTES: usize = 1 << 20;

/// Largest index file read into memory: one entry per 4 KiB of the largest
/// segment, twice over; anything longer is damaged anyway.
const INDEX_FILE_BYTES_MAX: u64 =
    INDEX_HEADER_LEN as u64 + (crate::config::SEGMENT_BYTES_MAX * 2 / index::INDEX_INTERVAL_BYTES) * 8;

/// Largest `last-recovery` file read; it is a dozen short lines.
const LAST_RECOVERY_BYTES_MAX: u64 = 64 << 10;

// ---------------------------------------------------------------------------
// The directory listing.

/// A file in a queue directory that is neither a segment nor its index.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct OtherFile {
    /// The file name.
    pub name: String,
    /// What walq makes of it.
    pub kind: OtherKind,
}

/// What walq makes of a file that is neither a segment nor its index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum OtherKind {
    /// `walq.lock`, the directory lock.
    Lock,
    /// `last-recovery`: what the last recovery that changed something did.
    LastRecovery,
    /// `consumers.journal` (named consumers' positions) or `dead-letters/`
    /// (consumer groups' dead-letter queues).
    Consumers,
    /// `{base}.tix`: a sealed segment's time index (a cache, rebuilt from
    /// the segment when missing or damaged).
    TimeIndex,
    /// A temporary file of an interrupted atomic write, or an index whose
    /// segment retention already removed: the next open removes it.
    Leftover,
    /// An index file without its segment, above the first segment: ignored.
    OrphanIndex,
    /// Not walq's: never read, never removed.
    Foreign,
}

impl OtherKind {
    /// A short lowercase name: `lock`, `last-recovery`, `consumers`, `time index`, `leftover`,
    /// `orphan index`, `foreign`.
    pub fn as_str(self) -> &'static str {
        match self {
            OtherKind::Lock => "lock",
            OtherKind::LastRecovery => "last-recovery",
            OtherKind::Consumers => "consumers",
            OtherKind::TimeIndex => "time index",
            OtherKind::Leftover => "leftover",
            OtherKind::OrphanIndex => "orphan index",
            OtherKind::Foreign => "foreign",
        }
    }
}

#[derive(Debug)]
struct Listing {
    bases: Vec<u64>,
    indexes: Vec<u64>,
    other: Vec<OtherFile>,
}

fn list(storage: &dyn Storage, dir: &Path) -> Result<Listing> {
    let names = match storage.list_dir(dir) {
        Ok(names) => names,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::NotFound { dir: dir.into() });
        }
        Err(e) => return Err(Error::io("list", dir, e)),
    };
    let mut bases = Vec::new();
    let mut indexes = Vec::new();
    let mut rest = Vec::new();
    for name in names {
        if let Some(base) = segment::parse_name(&name, SEGMENT_EXT) {
            bases.push(base);
        } else if let Some(base) = segment::parse_name(&name, INDEX_EXT) {
            indexes.push(base);
        } else {
            rest.push(name);
        }
    }
    bases.sort_unstable();
    indexes.sort_unstable();
    let first = bases.first().copied().unwrap_or(0);
    let mut other: Vec<OtherFile> = rest
        .into_iter()
        .map(|name| {
            let kind = if name == LOCK_FILE {
                OtherKind::Lock
            } else if name == LAST_RECOVERY_FILE {
                OtherKind::LastRecovery
            } else if name == crate::journal::JOURNAL_FILE || name == DEAD_LETTERS_DIR {
                OtherKind::Consumers
            } else if let Some(b) = segment::parse_name(&name, crate::timeindex::TIME_INDEX_EXT) {
                if b < first { OtherKind::Leftover } else { OtherKind::TimeIndex }
            } else if name.strip_suffix(TEMP_SUFFIX).is_some_and(|n| {
                segment::parse_name(n, INDEX_EXT).is_some()
                    || segment::parse_name(n, crate::timeindex::TIME_INDEX_EXT).is_some()
                    || n == LAST_RECOVERY_FILE
                    || n == crate::journal::JOURNAL_FILE
            }) {
                OtherKind::Leftover
            } else {
                OtherKind::Foreign
            };
            OtherFile { name, kind }
        })
        .collect();
    for &b in indexes.iter().filter(|b| bases.binary_search(b).is_err()) {
        let kind = if b < first { OtherKind::Leftover } else { OtherKind::OrphanIndex };
        other.push(OtherFile { name: segment::index_name(b), kind });
    }
    other.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Listing { bases, indexes, other })
}

/// Whether a live queue holds the directory lock. Probed with a shared
/// `flock` on `walq.lock` opened read-only, released at once; a missing lock
/// file means nobody holds it (and is not created).
///
/// ```
/// let dir = tempfile::tempdir()?;
/// let queue = walq::Queue::open(dir.path())?;
/// assert!(walq::inspect::is_locked(dir.path())?);
/// drop(queue);
/// assert!(!walq::inspect::is_locked(dir.path())?);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn is_locked(dir: &Path) -> Result<bool> {
    // The only file access outside `fs.rs`: `Storage` offers exclusive locks
    // only, and creates the lock file, which a read-only tool must not do.
    let path = dir.join(LOCK_FILE);
    let file = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if !dir.is_dir() {
                return Err(Error::NotFound { dir: dir.into() });
            }
            return Ok(false);
        }
        Err(e) => return Err(Error::io("open", &path, e)),
    };
    match file.try_lock_shared() {
        Ok(()) => Ok(false),
        Err(std::fs::TryLockError::WouldBlock) => Ok(true),
        Err(std::fs::TryLockError::Error(e)) => Err(Error::io("lock", &path, e)),
    }
}

// ---------------------------------------------------------------------------
// Reading batches with pread.

/// Reads and fully validates batches (records included) of one file with
/// pread, a chunk at a time.
struct BatchFile {
    file: Arc<dyn StorageFile>,
    path: PathBuf,
    len: u64,
    buf: Vec<u8>,
    buf_pos: u64,
}

impl BatchFile {
    fn open(storage: &dyn Storage, path: &Path) -> Result<BatchFile> {
        let file = storage.open_read(path).map_err(|e| Error::io("open", path, e))?;
        let len = file.len().map_err(|e| Error::io("stat", path, e))?;
        Ok(BatchFile { file, path: path.into(), len, buf: Vec::new(), buf_pos: 0 })
    }

    /// Re-reads the file's length (it grows while a live writer appends).
    fn refresh_len(&mut self) -> Result<()> {
        self.len = self.file.len().map_err(|e| Error::io("stat", &self.path, e))?;
        self.buf.clear();
        Ok(())
    }

    /// The valid batch at `pos` (its header and bytes), or why there is none.
    /// `Incomplete` with nothing left means the end of the file.
    fn batch(
        &mut self,
        pos: u64,
        expected: Option<u64>,
    ) -> Result<std::result::Result<(BatchHeader, &[u8]), DecodeError>> {
        let mut refilled = false;
        loop {
            let buf_end = self.buf_pos + self.buf.len() as u64;
            let outcome = if pos >= self.buf_pos && pos < buf_end {
                batch::validate_batch(&self.buf[(pos - self.buf_pos) as usize..], expected)
            } else {
                Err(DecodeError::Incomplete { needed: BATCH_HEADER_LEN })
            };
            match outcome {
                Ok(h) => {
                    let at = (pos - self.buf_pos) as usize;
                    return Ok(Ok((h, &self.buf[at..at + h.len()])));
                }
                Err(DecodeError::Incomplete { needed }) => {
                    let available = self.len.saturating_sub(pos);
                    if refilled || needed as u64 > available {
                        return Ok(Err(DecodeError::Incomplete { needed }));
                    }
                    let want = (needed.max(READ_CHUNK_BYTES) as u64).min(available) as usize;
                    self.buf.clear();
                    self.buf.resize(want, 0);
                    read_exact_at(self.file.as_ref(), &mut self.buf, pos)
                        .map_err(|e| Error::io("read", &self.path, e))?;
                    self.buf_pos = pos;
                    refilled = true;
                }
                Err(e) => return Ok(Err(e)),
            }
        }
    }

    /// The segment header, as recovery reads it.
    fn header(&self) -> Result<HeaderCheck> {
        segment::read_header(self.file.as_ref(), &self.path, self.len)
    }

    /// What `[from, len)` holds: where its last non-zero byte ends (`None`:
    /// all zeros) and every valid batch at an 8-aligned position, any offset.
    /// The same survey recovery makes, so that inspect predicts its verdict.
    fn rest(&mut self, from: u64) -> Result<Rest> {
        crate::recovery::survey(self.file.as_ref(), &self.path, from, self.len)
    }
}

/// The timestamp of a valid batch's last record.
fn last_timestamp(bytes: &[u8], h: &BatchHeader) -> Option<u64> {
    batch::records(bytes, h).filter_map(|r| r.ok()).last().map(|r| r.timestamp_ms)
}

fn first_timestamp(bytes: &[u8], h: &BatchHeader) -> Option<u64> {
    batch::records(bytes, h).next().and_then(|r| r.ok()).map(|r| r.timestamp_ms)
}

/// Walks valid batches from `start` (expecting `expected` there) until one
/// fails; calls `each` with every valid batch's position, header and bytes.
fn walk(
    f: &mut BatchFile,
    start: u64,
    expected: u64,
    mut each: impl FnMut(u64, &BatchHeader, &[u8]),
) -> Result<Walk> {
    let mut w = Walk { end: start, next_offset: expected, batches: 0, last: None, stop: None };
    loop {
        if w.end >= f.len {
            return Ok(w);
        }
        match f.batch(w.end, Some(w.next_offset))? {
            Ok((h, bytes)) => {
                each(w.end, &h, bytes);
                w.last = Some((w.end, h));
                w.batches += 1;
                w.end += h.length as u64;
                w.next_offset = h.next_offset();
            }
            Err(e) => {
                w.stop = Some((w.end, e));
                return Ok(w);
            }
        }
    }
}

#[derive(Debug)]
struct Walk {
    end: u64,
    next_offset: u64,
    batches: u64,
    last: Option<(u64, BatchHeader)>,
    stop: Option<(u64, DecodeError)>,
}

/// Classifies what follows the last valid batch of a segment.
fn classify_end(f: &mut BatchFile, w: &Walk) -> Result<SegmentEnd> {
    let Some((pos, err)) = &w.stop else { return Ok(SegmentEnd::Clean) };
    let rest = f.rest(*pos)?;
    let Some(garbage_end) = rest.garbage_end else { return Ok(SegmentEnd::Clean) };
    let synced_batch_after = rest.valid.iter().find(|(_, h)| h.durable_position > *pos).map(|(q, _)| *q);
    let records_after = rest.valid.iter().filter(|(q, _)| q > pos).map(|(_, h)| h.record_count as u64).sum();
    Ok(SegmentEnd::Damaged(Damage {
        position: *pos,
        reason: err.to_string(),
        garbage_end,
        records_after,
        synced_batch_after,
    }))
}

// ---------------------------------------------------------------------------
// Survey.

/// What a segment's index file is, as far as a survey looked.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum IndexStatus {
    /// A sealed index whose checksum matches, with this many entries.
    Sealed {
        /// Entries in the index.
        entries: u32,
    },
    /// An active index (the last segment's), with this many entries, and a
    /// synced mark (position, next offset) if it has an intact one.
    Active {
        /// Entries in the index.
        entries: usize,
        /// The synced mark: everything below this byte position was synced.
        synced_mark: Option<u64>,
    },
    /// No index file: it is rebuilt when first needed.
    Missing,
    /// An index walq will not use as it is (it is rebuilt), and why.
    Unusable(String),
}

impl fmt::Display for IndexStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IndexStatus::Sealed { entries } => write!(f, "sealed, {entries} entries"),
            IndexStatus::Active { entries, synced_mark: Some(p) } => {
                write!(f, "active, {entries} entries, synced to byte {p}")
            }
            IndexStatus::Active { entries, synced_mark: None } => write!(f, "active, {entries} entries"),
            IndexStatus::Missing => f.write_str("missing (rebuilt when needed)"),
            IndexStatus::Unusable(why) => write!(f, "unusable ({why}; rebuilt when needed)"),
        }
    }
}

/// How a segment's valid data ends.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SegmentEnd {
    /// At the end of the file, or where zeros (preallocated space) begin.
    Clean,
    /// At bytes that are neither zeros nor a valid batch.
    Damaged(Damage),
}

/// Bytes past a segment's last valid batch that are not zeros.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Damage {
    /// Where the valid data stops: the position of the first bad batch.
    pub position: u64,
    /// Why the batch there is not valid.
    pub reason: String,
    /// One past the last non-zero byte of the file.
    pub garbage_end: u64,
    /// Records in valid batches found further on (any offset), which a cut
    /// at `position` would drop.
    pub records_after: u64,
    /// The position of a valid batch further on whose `durable_position`
    /// says the damaged bytes had been synced: then the damage is corruption
    /// (recovery refuses to open), not a torn tail (recovery cuts it).
    pub synced_batch_after: Option<u64>,
}

impl Damage {
    /// True when a crash explains the damage in the last segment: recovery
    /// would cut it on the next open (the `durable_position` rule of the
    /// on-disk format).
    pub fn is_torn_tail(&self) -> bool {
        self.synced_batch_after.is_none()
    }
}

/// One segment, as [`survey`] found it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SegmentInfo {
    /// The offset of its first record (from its name).
    pub base: u64,
    /// Its path.
    pub path: PathBuf,
    /// The file's length, preallocated zeros included.
    pub file_bytes: u64,
    /// Where its valid data ends (the segment header is 32 bytes).
    pub data_bytes: u64,
    /// The offset after its last valid record.
    pub next_offset: u64,
    /// The first record's timestamp (ms since the Unix epoch), if any record.
    pub first_timestamp_ms: Option<u64>,
    /// The last record's timestamp.
    pub last_timestamp_ms: Option<u64>,
    /// What is wrong with its 32-byte header, if anything.
    pub header_problem: Option<String>,
    /// Its index file.
    pub index: IndexStatus,
    /// How its valid data ends, as seen from where the survey started reading.
    pub end: SegmentEnd,
    /// The last segment, the one a writer appends to.
    pub active: bool,
}

impl SegmentInfo {
    /// Records in the segment.
    pub fn records(&self) -> u64 {
        self.next_offset - self.base
    }
}

/// What the last recovery that cut, rebuilt or removed something did, from
/// the directory's `last-recovery` file (`key=value` lines, written
/// atomically by recovery only when it changed something).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct LastRecovery {
    /// When it ran, ms since the Unix epoch.
    pub unix_time_ms: u64,
    /// The offset the log ended at after it.
    pub next_offset: u64,
    /// Bytes of a torn tail it cut.
    pub bytes_cut: u64,
    /// Records in that tail, as far as their headers were readable.
    pub records_cut: u64,
    /// The segment file name and byte position of the cut.
    pub cut_at: Option<(String, u64)>,
    /// Indexes it rewrote.
    pub indexes_rebuilt: u64,
    /// Segments whose interrupted creation it removed.
    pub unfinished_segments_removed: u64,
    /// Leftover files it removed.
    pub temp_files_removed: u64,
}

impl LastRecovery {
    /// Parses the `key=value` lines of a `last-recovery` file; unknown keys
    /// and `#` comments are skipped, so a newer walq may add keys.
    ///
    /// ```
    /// let r = walq::inspect::LastRecovery::parse("bytes_cut=12\ncut_file=x.seg\ncut_position=96\n");
    /// assert_eq!(r.bytes_cut, 12);
    /// assert_eq!(r.cut_at, Some(("x.seg".to_string(), 96)));
    /// ```
    pub fn parse(text: &str) -> LastRecovery {
        let mut r = LastRecovery::default();
        let (mut file, mut position) = (None, None);
        for line in text.lines().map(str::trim).filter(|l| !l.starts_with('#')) {
            let Some((key, value)) = line.split_once('=') else { continue };
            let n = value.parse::<u64>().ok();
            match key {
                "unix_time_ms" => r.unix_time_ms = n.unwrap_or(0),
                "next_offset" => r.next_offset = n.unwrap_or(0),
                "bytes_cut" => r.bytes_cut = n.unwrap_or(0),
                "records_cut" => r.records_cut = n.unwrap_or(0),
                "cut_file" => file = Some(value.to_string()),
                "cut_position" => position = n,
                "indexes_rebuilt" => r.indexes_rebuilt = n.unwrap_or(0),
                "unfinished_segments_removed" => r.unfinished_segments_removed = n.unwrap_or(0),
                "temp_files_removed" => r.temp_files_removed = n.unwrap_or(0),
                _ => {}
            }
        }
        r.cut_at = file.zip(position);
        r
    }
}

/// A quick look at a queue directory, from [`survey`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Survey {
    /// The directory.
    pub dir: PathBuf,
    /// A live queue holds the directory lock (see [`is_locked`]).
    pub locked: bool,
    /// The segments, oldest first.
    pub segments: Vec<SegmentInfo>,
    /// Every other file in the directory.
    pub other_files: Vec<OtherFile>,
    /// What the last recovery that changed something did, if one did.
    pub last_recovery: Option<LastRecovery>,
}

impl Survey {
    /// The first offset the log holds.
    pub fn first_offset(&self) -> u64 {
        self.segments.first().map_or(0, |s| s.base)
    }

    /// The offset after the last valid record.
    pub fn next_offset(&self) -> u64 {
        self.segments.last().map_or(0, |s| s.next_offset)
    }

    /// Bytes of the segment files, preallocated space included.
    pub fn file_bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.file_bytes).sum()
    }

    /// What the next open would cut: the last segment's damage, when a crash
    /// explains it. Damage a crash cannot explain is an `Error::Corrupt` on
    /// open instead (see [`plan_repair`]).
    pub fn torn_tail(&self) -> Option<&Damage> {
        match &self.segments.last()?.end {
            SegmentEnd::Damaged(d) if d.is_torn_tail() => Some(d),
            _ => None,
        }
    }
}

/// Surveys a queue directory without modifying anything, and without the
/// lock: its segments (offsets, sizes, time range, index), its other files,
/// and what the last recovery cut. Reads each segment's header, its index
/// and the batches after its last usable index entry (about 4 KiB plus a
/// batch, and the first batch for the first timestamp), so it stays quick on
/// a large log; [`verify`] reads everything.
///
/// ```
/// let dir = tempfile::tempdir()?;
/// let queue = walq::Queue::open(dir.path())?;
/// queue.append(b"one")?;
/// queue.append(b"two")?;
/// drop(queue);
/// let survey = walq::inspect::survey(dir.path())?;
/// assert_eq!((survey.first_offset(), survey.next_offset()), (0, 2));
/// assert_eq!(survey.segments.len(), 1);
/// assert!(survey.torn_tail().is_none());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn survey(dir: &Path) -> Result<Survey> {
    let storage = RealFs;
    let listing = list(&storage, dir)?;
    let locked = is_locked(dir)?;
    let mut segments = Vec::with_capacity(listing.bases.len());
    for (i, &base) in listing.bases.iter().enumerate() {
        let active = i + 1 == listing.bases.len();
        let has_index = listing.indexes.binary_search(&base).is_ok();
        segments.push(survey_segment(&storage, dir, base, active, has_index)?);
    }
    let last_recovery = if listing.other.iter().any(|f| f.kind == OtherKind::LastRecovery) {
        read_small(&storage, &dir.join(LAST_RECOVERY_FILE), LAST_RECOVERY_BYTES_MAX)?
            .map(|b| LastRecovery::parse(&String::from_utf8_lossy(&b)))
    } else {
        None
    };
    Ok(Survey { dir: dir.into(), locked, segments, other_files: listing.other, last_recovery })
}

/// A whole small file, `None` if it is missing.
fn read_small(storage: &dyn Storage, path: &Path, max: u64) -> Result<Option<Vec<u8>>> {
    let f = match storage.open_read(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io("open", path, e)),
    };
    let len = f.len().map_err(|e| Error::io("stat", path, e))?;
    let mut buf = vec![0u8; len.min(max) as usize];
    read_exact_at(f.as_ref(), &mut buf, 0).map_err(|e| Error::io("read", path, e))?;
    Ok(Some(buf))
}

/// An index file, read and classified.
struct IndexFile {
    status: IndexStatus,
    /// Entries (of a usable index only), in order as stored.
    entries: Vec<IndexEntry>,
    sealed: Option<index::SealedInfo>,
}

fn read_index(storage: &dyn Storage, dir: &Path, base: u64, active: bool, exists: bool) -> Result<IndexFile> {
    let missing = IndexFile { status: IndexStatus::Missing, entries: Vec::new(), sealed: None };
    if !exists {
        return Ok(missing);
    }
    let path = dir.join(segment::index_name(base));
    let Some(buf) = read_small(storage, &path, INDEX_FILE_BYTES_MAX)? else { return Ok(missing) };
    let unusable =
        |why: String| IndexFile { status: IndexStatus::Unusable(why), entries: Vec::new(), sealed: None };
    let problem = |p: IndexProblem| match p {
        IndexProblem::Short => "shorter than its header".to_string(),
        IndexProblem::BadMagic => "bad magic or version".to_string(),
        IndexProblem::WrongBase => "base offset differs from the segment's".to_string(),
        IndexProblem::NotSealed => "not sealed".to_string(),
        IndexProblem::Checksum => "checksum mismatch or entries out of order".to_string(),
        IndexProblem::BadLength => "length differs from its entry count".to_string(),
        IndexProblem::NewerVersion(v) => format!("format version {v}"),
    };
    if active {
        return Ok(match index::check_header(&buf, base) {
            Ok(None) => {
                let entries = index::decode_entries(&buf[INDEX_HEADER_LEN..]);
                let mark = index::synced_mark(&buf).map(|m| m.position as u64);
                IndexFile {
                    status: IndexStatus::Active { entries: entries.len(), synced_mark: mark },
                    entries,
                    sealed: None,
                }
            }
            Ok(Some(_)) => unusable("sealed, on the last segment (a roll was interrupted)".into()),
            Err(p) => unusable(problem(p)),
        });
    }
    Ok(match index::check_sealed(&buf, base, &path) {
        Ok(Ok(info)) => IndexFile {
            status: IndexStatus::Sealed { entries: info.entries },
            entries: index::decode_entries(&buf[INDEX_HEADER_LEN..]),
            sealed: Some(info),
        },
        Ok(Err(p)) => unusable(problem(p)),
        Err(e) => unusable(e.to_string()),
    })
}

fn header_problem(f: &BatchFile, base: u64) -> Option<String> {
    match f.header() {
        Ok(HeaderCheck::Valid(b)) if b == base => None,
        Ok(HeaderCheck::Valid(b)) => Some(format!("header says base offset {b}, file name says {base}")),
        Ok(HeaderCheck::Unwritten) => Some("unwritten (a creation a crash interrupted)".into()),
        Err(Error::Corrupt { position, reason, .. }) => Some(format!("at byte {position}: {reason}")),
        Err(e) => Some(e.to_string()),
    }
}

fn survey_segment(
    storage: &dyn Storage,
    dir: &Path,
    base: u64,
    active: bool,
    has_index: bool,
) -> Result<SegmentInfo> {
    let path = dir.join(segment::segment_name(base));
    let mut f = BatchFile::open(storage, &path)?;
    let header_problem = header_problem(&f, base);
    let idx = read_index(storage, dir, base, active, has_index)?;
    let header_end = SEGMENT_HEADER_LEN as u64;

    // Start at the last entry whose batch is valid with its offset.
    let (mut start, mut expected) = (header_end, base);
    let ordered = idx.entries.iter().enumerate().take_while(|(i, e)| {
        *i == 0 || (idx.entries[i - 1].relative < e.relative && idx.entries[i - 1].position < e.position)
    });
    let candidates: Vec<IndexEntry> =
        ordered.map(|(_, e)| *e).filter(|e| (e.position as u64) < f.len).collect();
    for e in candidates.iter().rev() {
        let (pos, off) = (e.position as u64, base + e.relative as u64);
        if f.batch(pos, Some(off))?.is_ok() {
            (start, expected) = (pos, off);
            break;
        }
    }
    let mut first_timestamp_ms = None;
    let w = walk(&mut f, start, expected, |pos, h, bytes| {
        if pos == header_end {
            first_timestamp_ms = first_timestamp(bytes, h);
        }
    })?;
    if start != header_end
        && let Ok((h, bytes)) = f.batch(header_end, Some(base))?
    {
        first_timestamp_ms = first_timestamp(bytes, &h);
    }
    let last_timestamp_ms = match w.last {
        Some((pos, _)) => match f.batch(pos, None)? {
            Ok((h, bytes)) => last_timestamp(bytes, &h),
            Err(_) => None,
        },
        None => None,
    };
    let end = classify_end(&mut f, &w)?;
    Ok(SegmentInfo {
        base,
        path,
        file_bytes: f.len,
        data_bytes: w.end,
        next_offset: w.next_offset,
        first_timestamp_ms,
        last_timestamp_ms,
        header_problem,
        index: idx.status,
        end,
        active,
    })
}

// ---------------------------------------------------------------------------
// Consumers and groups, from the consumer journal.

/// Largest consumer journal read. The journal is compacted to a snapshot of
/// the state whenever its preallocated room runs out, so even a group with
/// millions of acknowledged offsets above its floor stays far below this.
const JOURNAL_BYTES_MAX: u64 = 1 << 30;

/// Reads of a live queue's journal when it looks damaged: an entry being
/// written at that instant looks like a torn one, so read again, briefly.
const JOURNAL_READ_ATTEMPTS: u32 = 3;

/// The name of the directory holding the groups' dead-letter queues.
const DEAD_LETTERS_DIR: &str = "dead-letters";

/// A named consumer's saved position, from [`consumers`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SavedConsumer {
    /// The consumer's name.
    pub name: String,
    /// The committed position: the offset it reads next after a restart.
    pub position: u64,
    /// Records at or after the position: the log's next offset − `position`.
    pub lag: u64,
}

/// A consumer group's saved acknowledgement state, from [`consumers`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SavedGroup {
    /// The group's name.
    pub name: String,
    /// Every record below this offset is done (acknowledged or dead-lettered).
    pub ack_floor: u64,
    /// One past the highest offset the group delivered or finished: records
    /// from here on were never delivered.
    pub delivered_to: u64,
    /// Records delivered and not done. The journal does not say which of
    /// them a worker holds and which wait for redelivery (a group that is
    /// not open redelivers all of them first), so this is not
    /// [`GroupInfo::pending`](crate::GroupInfo::pending), which counts only
    /// deliveries in flight.
    pub delivered_not_done: u64,
    /// Records at or above the ack floor that are done (acknowledged out of
    /// order, or dead-lettered), up to the log's end.
    pub done_above_floor: u64,
    /// Records appended and not done: the log's next offset − `ack_floor` −
    /// `done_above_floor`.
    pub unacked: u64,
    /// Records held by its dead-letter queue (`dead-letters/<group>/`), if
    /// that directory exists.
    pub dead_letters: Option<u64>,
}

/// Where and why reading the consumer journal stopped early.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct JournalDamage {
    /// The byte position of the first entry (or header) that is not valid.
    pub position: u64,
    /// What is wrong there.
    pub reason: String,
}

/// Named consumers and consumer groups of a queue directory, as its
/// `consumers.journal` saves them, from [`consumers`] or [`Survey::consumers`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConsumerState {
    /// The journal's path.
    pub journal: PathBuf,
    /// Whether the journal exists (it is created by the first consumer or group).
    pub journal_exists: bool,
    /// Valid journal entries read.
    pub entries: u64,
    /// Damage that stopped the reading: the state is then the one of the
    /// last valid entry before it, which is what the next open uses too.
    pub damage: Option<JournalDamage>,
    /// The log's next offset, which lags and counts are measured against.
    pub next_offset: u64,
    /// Some saved position was past the log's end (a crash took records
    /// back): shown at the end, where the next open moves it (never set
    /// while a live queue holds the directory).
    pub clamped: bool,
    /// The consumers, by name.
    pub consumers: Vec<SavedConsumer>,
    /// The groups, by name.
    pub groups: Vec<SavedGroup>,
}

impl ConsumerState {
    /// The consumer called `name`, if it exists.
    ///
    /// ```
    /// let dir = tempfile::tempdir()?;
    /// let queue = walq::Queue::open(dir.path())?;
    /// queue.append(b"x")?;
    /// queue.consumer_from("billing", walq::StartAt::Latest)?;
    /// drop(queue);
    /// let state = walq::inspect::consumers(dir.path())?;
    /// assert_eq!(state.consumer("billing").map(|c| c.position), Some(1));
    /// assert!(state.consumer("nobody").is_none());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn consumer(&self, name: &str) -> Option<&SavedConsumer> {
        self.consumers.iter().find(|c| c.name == name)
    }

    /// The group called `name`, if it exists.
    ///
    /// ```
    /// let dir = tempfile::tempdir()?;
    /// let queue = walq::Queue::open(dir.path())?;
    /// queue.append(b"job")?;
    /// drop(queue.group("workers").open()?);
    /// drop(queue);
    /// let state = walq::inspect::consumers(dir.path())?;
    /// assert_eq!(state.group("workers").map(|g| g.unacked), Some(1));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn group(&self, name: &str) -> Option<&SavedGroup> {
        self.groups.iter().find(|g| g.name == name)
    }
}

/// Reads the named consumers and consumer groups of a queue directory from
/// its `consumers.journal`, without modifying anything and without the
/// lock: each consumer's position and lag, each group's ack floor and
/// counts, the record count of each group's dead-letter queue, and journal
/// damage if any. Lags are measured against the log's next offset as
/// [`survey`] finds it. A directory without a journal has none of either.
///
/// ```
/// let dir = tempfile::tempdir()?;
/// let queue = walq::Queue::open(dir.path())?;
/// queue.append_batch(&[walq::Record::new(b"a"), walq::Record::new(b"b")])?;
/// let mut consumer = queue.consumer("billing")?;
/// consumer.commit(1)?;
/// let state = walq::inspect::consumers(dir.path())?; // works while the queue is open
/// assert_eq!(state.consumers[0].name, "billing");
/// assert_eq!((state.consumers[0].position, state.consumers[0].lag), (1, 1));
/// assert!(state.damage.is_none());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn consumers(dir: &Path) -> Result<ConsumerState> {
    // The journal before the log: a live queue then cannot commit a position
    // past the end the survey finds.
    let journal = read_journal(&RealFs, dir)?;
    let s = survey(dir)?;
    consumer_state(&s, journal)
}

impl Survey {
    /// The directory's named consumers and groups ([`consumers`]), measured
    /// against this survey's next offset.
    ///
    /// ```
    /// let dir = tempfile::tempdir()?;
    /// let queue = walq::Queue::open(dir.path())?;
    /// queue.append(b"x")?;
    /// drop(queue.consumer("c")?);
    /// drop(queue);
    /// let survey = walq::inspect::survey(dir.path())?;
    /// let state = survey.consumers()?;
    /// assert_eq!((state.consumers[0].position, state.consumers[0].lag), (0, 1));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn consumers(&self) -> Result<ConsumerState> {
        let journal = read_journal(&RealFs, &self.dir)?;
        consumer_state(self, journal)
    }
}

/// The journal's bytes, replayed; `None` if there is no journal.
fn read_journal(storage: &dyn Storage, dir: &Path) -> Result<Option<crate::journal::Parsed>> {
    let path = dir.join(crate::journal::JOURNAL_FILE);
    let mut attempt = 1;
    loop {
        let f = match storage.open_read(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                list(storage, dir)?; // a missing directory is NotFound
                return Ok(None);
            }
            Err(e) => return Err(Error::io("open", &path, e)),
        };
        let len = f.len().map_err(|e| Error::io("stat", &path, e))?;
        if len > JOURNAL_BYTES_MAX {
            return Err(Error::corrupt(
                &path,
                0,
                format!("{len} bytes, more than a journal ever holds ({JOURNAL_BYTES_MAX})"),
            ));
        }
        let mut data = vec![0u8; len as usize];
        read_exact_at(f.as_ref(), &mut data, 0).map_err(|e| Error::io("read", &path, e))?;
        let parsed = crate::journal::parse(&data, &path)?;
        if parsed.damage.is_none() || attempt >= JOURNAL_READ_ATTEMPTS || !is_locked(dir)? {
            return Ok(Some(parsed));
        }
        attempt += 1;
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

fn consumer_state(s: &Survey, journal: Option<crate::journal::Parsed>) -> Result<ConsumerState> {
    let next = s.next_offset();
    let journal_exists = journal.is_some();
    let parsed = journal.unwrap_or_default();
    let mut image = parsed.image;
    // What the next open does; a live queue never saves a position past the
    // log, so there a position past the survey's end is a commit since.
    let clamped = !s.locked && image.clamp_to(next);
    let consumers = image
        .consumers
        .iter()
        .map(|(name, &position)| SavedConsumer {
            name: name.clone(),
            position,
            lag: next.saturating_sub(position),
        })
        .collect();
    let mut groups = Vec::with_capacity(image.groups.len());
    for (name, g) in &image.groups {
        let done_above_floor = g.done.range(g.floor..next.max(g.floor)).count() as u64;
        let dl_dir = s.dir.join(DEAD_LETTERS_DIR).join(name);
        let dead_letters = if dl_dir.is_dir() {
            let dl = survey(&dl_dir)?;
            Some(dl.next_offset() - dl.first_offset())
        } else {
            None
        };
        groups.push(SavedGroup {
            name: name.clone(),
            ack_floor: g.floor,
            delivered_to: g.next,
            delivered_not_done: g.counts.len() as u64,
            done_above_floor,
            unacked: next.saturating_sub(g.floor).saturating_sub(done_above_floor),
            dead_letters,
        });
    }
    Ok(ConsumerState {
        journal: s.dir.join(crate::journal::JOURNAL_FILE),
        journal_exists,
        entries: parsed.entries,
        damage: parsed.damage.map(|(position, reason)| JournalDamage { position, reason }),
        next_offset: next,
        clamped,
        consumers,
        groups,
    })
}

// ---------------------------------------------------------------------------
// Verification.

/// What kind of problem [`verify`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProblemKind {
    /// A segment's 32-byte header is damaged or names another base offset.
    SegmentHeader,
    /// A batch fails a check (checksum, structure, records) where valid data
    /// was expected: corruption a crash cannot explain.
    Batch,
    /// An unsynced torn tail on the last segment, which the next open cuts.
    TornTail,
    /// A segment does not start at the offset where the previous one ends.
    OffsetGap,
    /// An index file is missing, damaged, or has an entry that is not at the
    /// start of a batch with that offset. Indexes are caches, rebuilt by
    /// walq when needed, so this loses no data.
    Index,
    /// A file from a newer walq.
    UnsupportedFormat,
}

impl ProblemKind {
    /// A short lowercase name: `segment header`, `batch`, `torn tail`, `offset gap`, `index`, `unsupported format`.
    pub fn as_str(self) -> &'static str {
        match self {
            ProblemKind::SegmentHeader => "segment header",
            ProblemKind::Batch => "batch",
            ProblemKind::TornTail => "torn tail",
            ProblemKind::OffsetGap => "offset gap",
            ProblemKind::Index => "index",
            ProblemKind::UnsupportedFormat => "unsupported format",
        }
    }
}

/// One problem [`verify`] found: the file, the byte position and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Problem {
    /// The file.
    pub path: PathBuf,
    /// The byte position in the file.
    pub position: u64,
    /// What kind of problem.
    pub kind: ProblemKind,
    /// What is wrong, for a person.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} at byte {}: {}: {}",
            self.path.display(),
            self.position,
            self.kind.as_str(),
            self.message
        )
    }
}

/// What [`verify`] read and found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct VerifyReport {
    /// Segments read.
    pub segments: usize,
    /// Valid batches read, every checksum and record checked.
    pub batches: u64,
    /// Records in them.
    pub records: u64,
    /// Bytes of segment files read.
    pub bytes: u64,
    /// The first offset and the offset after the last valid record.
    pub offsets: (u64, u64),
    /// A live queue held the directory while it was read: a damaged tail of
    /// the last segment may be a write in progress and is not reported.
    pub locked: bool,
    /// Every problem found, in file order.
    pub problems: Vec<Problem>,
}

/// Reads every batch of every segment with pread and checks it: segment
/// headers, every batch's checksum and records, offset continuity within and
/// across segments, and every index entry (it must point at the start of a
/// batch with its offset; a sealed index must match its segment). Modifies
/// nothing and takes no lock.
///
/// ```
/// let dir = tempfile::tempdir()?;
/// let queue = walq::Queue::open(dir.path())?;
/// queue.append(b"one")?;
/// drop(queue);
/// let report = walq::inspect::verify(dir.path())?;
/// assert!(report.problems.is_empty());
/// assert_eq!(report.records, 1);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn verify(dir: &Path) -> Result<VerifyReport> {
    verify_with_progress(dir, &mut |_, _| {})
}

/// [`verify`], calling `progress(bytes_done, bytes_total)` as it goes.
///
/// ```
/// let dir = tempfile::tempdir()?;
/// walq::Queue::open(dir.path())?.append(b"one")?;
/// let mut last = (0, 0);
/// walq::inspect::verify_with_progress(dir.path(), &mut |done, total| last = (done, total))?;
/// assert_eq!(last.0, last.1);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn verify_with_progress(dir: &Path, progress: &mut dyn FnMut(u64, u64)) -> Result<VerifyReport> {
    let storage = RealFs;
    let listing = list(&storage, dir)?;
    let locked = is_locked(dir)?;
    let mut report = VerifyReport { locked, ..VerifyReport::default() };
    let mut files = Vec::new();
    for &base in &listing.bases {
        files.push(BatchFile::open(&storage, &dir.join(segment::segment_name(base)))?);
    }
    let total: u64 = files.iter().map(|f| f.len).sum();
    let mut done_before = 0u64;
    let mut expected_base: Option<Option<u64>> = None;
    report.offsets.0 = listing.bases.first().copied().unwrap_or(0);
    for (i, (mut f, &base)) in files.into_iter().zip(&listing.bases).enumerate() {
        let active = i + 1 == listing.bases.len();
        let has_index = listing.indexes.binary_search(&base).is_ok();
        let check = check_segment(&storage, dir, &mut f, base, active, has_index, &mut |p| {
            progress(done_before + p, total)
        })?;
        if let Some(Some(prev)) = expected_base
            && prev != base
        {
            report.problems.push(Problem {
                path: f.path.clone(),
                position: 0,
                kind: ProblemKind::OffsetGap,
                message: format!("segment starts at offset {base}, the previous one ends at {prev}"),
            });
        }
        // After damage the next segment's expected base is unknown.
        let damaged =
            check.problems.iter().any(|p| matches!(p.kind, ProblemKind::Batch | ProblemKind::TornTail));
        expected_base = Some((!damaged).then_some(check.walk.next_offset));
        report.offsets.1 = check.walk.next_offset;
        report.batches += check.walk.batches;
        report.records += check.walk.next_offset - base;
        report.problems.extend(
            check.problems.into_iter().filter(|p| !(locked && active && p.kind == ProblemKind::TornTail)),
        );
        done_before += f.len;
        report.bytes += f.len;
        progress(done_before, total);
        report.segments += 1;
    }
    Ok(report)
}

/// A full check of one segment.
struct SegmentCheck {
    walk: Walk,
    problems: Vec<Problem>,
}

#[allow(clippy::too_many_arguments)]
fn check_segment(
    storage: &dyn Storage,
    dir: &Path,
    f: &mut BatchFile,
    base: u64,
    active: bool,
    has_index: bool,
    progress: &mut dyn FnMut(u64),
) -> Result<SegmentCheck> {
    let mut problems = Vec::new();
    let path = f.path.clone();
    match f.header() {
        Ok(HeaderCheck::Valid(b)) if b == base => {}
        Ok(HeaderCheck::Valid(b)) => {
            problems.push(Problem {
                path: path.clone(),
                position: 16,
                kind: ProblemKind::SegmentHeader,
                message: format!("header says base offset {b}, file name says {base}"),
            });
        }
        Ok(HeaderCheck::Unwritten) => {
            problems.push(Problem {
                path: path.clone(),
                position: 0,
                kind: if active { ProblemKind::TornTail } else { ProblemKind::SegmentHeader },
                message: "unwritten header (a creation a crash interrupted; the next open removes it if it holds no data)"
                    .into(),
            });
        }
        Err(Error::Corrupt { position, reason, .. }) => {
            problems.push(Problem {
                path: path.clone(),
                position,
                kind: ProblemKind::SegmentHeader,
                message: reason,
            });
        }
        Err(Error::UnsupportedFormat { found, supported, .. }) => {
            problems.push(Problem {
                path: path.clone(),
                position: 8,
                kind: ProblemKind::UnsupportedFormat,
                message: format!("segment format version {found}, this walq reads up to {supported}"),
            });
        }
        Err(e) => return Err(e),
    }

    let idx = read_index(storage, dir, base, active, has_index)?;
    let index_path = dir.join(segment::index_name(base));
    let index_problem = |position: u64, message: String| Problem {
        path: index_path.clone(),
        position,
        kind: ProblemKind::Index,
        message,
    };
    match &idx.status {
        IndexStatus::Missing => problems.push(index_problem(0, "missing (rebuilt when needed)".into())),
        IndexStatus::Unusable(why) => problems.push(index_problem(0, format!("{why} (rebuilt when needed)"))),
        _ => {}
    }
    // Merge the (sorted) entries with the batches as they go by.
    let mut entries = idx.entries.iter().enumerate().peekable();
    let mut entry_problems = Vec::new();
    let mut check_entries = |upto: u64, batch: Option<(u64, &BatchHeader)>| {
        while let Some(&(i, e)) = entries.peek() {
            let at = (INDEX_HEADER_LEN + i * index::INDEX_ENTRY_LEN) as u64;
            if (e.position as u64) > upto {
                break;
            }
            entries.next();
            match batch {
                Some((pos, h)) if pos == e.position as u64 => {
                    if base + e.relative as u64 != h.base_offset {
                        entry_problems.push((
                            at,
                            format!(
                                "entry {i} says offset {} at byte {pos}, the batch there starts at {}",
                                base + e.relative as u64,
                                h.base_offset
                            ),
                        ));
                    }
                }
                _ => entry_problems
                    .push((at, format!("entry {i} points at byte {}, not the start of a batch", e.position))),
            }
        }
    };
    let w = walk(f, SEGMENT_HEADER_LEN as u64, base, |pos, h, _| {
        check_entries(pos, Some((pos, h)));
        progress(pos + h.length as u64);
    })?;
    let end = classify_end(f, &w)?;
    let damaged = matches!(end, SegmentEnd::Damaged(_));
    // Past damaged data the index cannot be checked: the damage is the problem.
    check_entries(if damaged { w.end } else { u64::MAX }, None);
    for (at, msg) in entry_problems {
        problems.push(index_problem(at, msg));
    }
    if let Some(info) = idx.sealed
        && !damaged
        && (info.next_offset != w.next_offset || info.data_len as u64 != w.end)
    {
        problems.push(index_problem(
            16,
            format!(
                "says the segment ends at offset {} (byte {}), it ends at offset {} (byte {})",
                info.next_offset, info.data_len, w.next_offset, w.end
            ),
        ));
    }
    if let IndexStatus::Active { synced_mark: Some(mark), .. } = idx.status
        && mark > w.end
    {
        problems.push(index_problem(
            24,
            format!("synced mark at byte {mark} lies past the valid data, which ends at byte {}", w.end),
        ));
    }

    if let SegmentEnd::Damaged(d) = &end {
        let (kind, message) = if let Some((_, DecodeError::UnsupportedVersion { found })) = &w.stop {
            (ProblemKind::UnsupportedFormat, format!("batch format version {found}"))
        } else if active && d.is_torn_tail() {
            (
                ProblemKind::TornTail,
                format!(
                    "{}; an unsynced torn tail of {} bytes that the next open cuts",
                    d.reason,
                    d.garbage_end - d.position
                ),
            )
        } else {
            let why = match d.synced_batch_after {
                Some(at) => format!("a batch at byte {at}, written after this one was synced, follows it"),
                None => "in a sealed segment".to_string(),
            };
            (ProblemKind::Batch, format!("{}; {why}; {} valid records lie beyond", d.reason, d.records_after))
        };
        problems.push(Problem { path: path.clone(), position: d.position, kind, message });
    }
    Ok(SegmentCheck { walk: w, problems })
}

// ---------------------------------------------------------------------------
// Reading records without the lock.

/// Reads records straight from the segment files with pread, without the
/// lock and without recovery: for tools reading a directory that may be in
/// use. Each batch is fully validated before any of its records is
/// returned. [`next`](LogReader::next) returns `Ok(None)` where the valid
/// data ends (at zeros, or at a torn tail of the last segment); call it again
/// later to see records a live writer appended since, across new segments
/// too. Damage in a segment that has a successor is an `Error::Corrupt`.
///
/// ```
/// let dir = tempfile::tempdir()?;
/// let queue = walq::Queue::open(dir.path())?;
/// queue.append(b"one")?;
/// queue.append(b"two")?;
/// let mut reader = walq::inspect::LogReader::open(dir.path(), 1)?;
/// assert_eq!(reader.next()?.map(|r| r.value().to_vec()), Some(b"two".to_vec()));
/// assert!(reader.next()?.is_none());
/// queue.append(b"three")?; // the queue is still open: no lock needed to read
/// assert_eq!(reader.next()?.map(|r| r.offset()), Some(2));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct LogReader {
    dir: PathBuf,
    storage: RealFs,
    /// The offset `next` returns next.
    next_offset: u64,
    /// The segment being read.
    segment: Option<OpenSegment>,
    /// The current batch's bytes and header, and where its next record is.
    batch: Vec<u8>,
    header: Option<BatchHeader>,
    rec_pos: usize,
    next_index: u32,
}

/// The segment a [`LogReader`] reads: the next batch's position and offset.
struct OpenSegment {
    base: u64,
    file: BatchFile,
    pos: u64,
    expect: u64,
}

impl fmt::Debug for OpenSegment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenSegment").field("path", &self.file.path).field("pos", &self.pos).finish()
    }
}

impl LogReader {
    /// A reader starting at `offset`, or at the first offset held if that is
    /// later (retention may have removed older segments). Errors when the
    /// directory does not exist.
    pub fn open(dir: &Path, offset: u64) -> Result<LogReader> {
        let storage = RealFs;
        list(&storage, dir)?;
        Ok(LogReader {
            dir: dir.into(),
            storage,
            next_offset: offset,
            segment: None,
            batch: Vec::new(),
            header: None,
            rec_pos: 0,
            next_index: 0,
        })
    }

    /// The offset the next record will have.
    pub fn position(&self) -> u64 {
        self.next_offset
    }

    /// The next record, or `Ok(None)` where the valid data ends for now.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Result<Option<RecordRef<'_>>> {
        loop {
            if let Some(h) = self.header {
                if self.next_index < h.record_count {
                    break;
                }
                self.header = None;
            }
            if !self.load_batch()? {
                return Ok(None);
            }
        }
        let Some(h) = self.header else { return Ok(None) };
        let records_end = BATCH_HEADER_LEN + h.records_len as usize;
        let mut it = RecordIter::resume(&self.batch[self.rec_pos..records_end], self.next_index, &h);
        let raw = match it.next() {
            Some(Ok(raw)) => raw,
            // validate_batch parsed every record of this batch already.
            _ => {
                let path = self.segment.as_ref().map_or_else(|| self.dir.clone(), |s| s.file.path.clone());
                return Err(Error::corrupt(path, h.base_offset, "a validated batch failed to parse"));
            }
        };
        self.rec_pos = records_end - it.rest_len();
        self.next_index += 1;
        let offset = h.base_offset + raw.offset_delta as u64;
        self.next_offset = offset + 1;
        Ok(Some(RecordRef {
            offset,
            timestamp_ms: raw.timestamp_ms,
            key: raw.key,
            headers: raw.headers,
            header_count: raw.header_count,
            value: raw.value,
        }))
    }

    /// Opens the segment holding `next_offset` (or the first one, if it is
    /// older than the log) and seeks with its index; false if there is none.
    fn open_segment(&mut self) -> Result<bool> {
        let listing = list(&self.storage, &self.dir)?;
        let Some(&first) = listing.bases.first() else { return Ok(false) };
        if self.next_offset < first {
            self.next_offset = first;
        }
        let i = listing.bases.partition_point(|&b| b <= self.next_offset) - 1;
        let base = listing.bases[i];
        let active = i + 1 == listing.bases.len();
        let has_index = listing.indexes.binary_search(&base).is_ok();
        let mut file = BatchFile::open(&self.storage, &self.dir.join(segment::segment_name(base)))?;
        let idx = read_index(&self.storage, &self.dir, base, active, has_index)?;
        let (mut pos, mut expect) = (SEGMENT_HEADER_LEN as u64, base);
        let target = u32::try_from(self.next_offset - base).unwrap_or(u32::MAX);
        if index::is_ordered(&idx.entries)
            && let Some(e) = index::floor_in(&idx.entries, target)
            && file.batch(e.position as u64, Some(base + e.relative as u64))?.is_ok()
        {
            (pos, expect) = (e.position as u64, base + e.relative as u64);
        }
        self.segment = Some(OpenSegment { base, file, pos, expect });
        Ok(true)
    }

    /// Loads the next batch holding `next_offset` or later; false at the end
    /// of the valid data.
    fn load_batch(&mut self) -> Result<bool> {
        if self.segment.is_none() && !self.open_segment()? {
            return Ok(false);
        }
        loop {
            let Some(seg) = self.segment.as_mut() else { return Ok(false) };
            let mut outcome = seg.file.batch(seg.pos, Some(seg.expect))?.map(|(h, _)| h);
            if outcome.is_err() {
                // A live writer may have appended since the length was read.
                seg.file.refresh_len()?;
                outcome = seg.file.batch(seg.pos, Some(seg.expect))?.map(|(h, _)| h);
            }
            let h = match outcome {
                Ok(h) => h,
                Err(e) => {
                    if self.next_segment(e)? {
                        continue;
                    }
                    return Ok(false);
                }
            };
            let at = seg.pos;
            seg.pos += h.length as u64;
            seg.expect = h.next_offset();
            if h.next_offset() <= self.next_offset {
                continue; // entirely before the offset asked for
            }
            let Ok((_, bytes)) = seg.file.batch(at, Some(h.base_offset))? else { continue };
            self.batch.clear();
            self.batch.extend_from_slice(bytes);
            self.header = Some(h);
            self.rec_pos = BATCH_HEADER_LEN;
            self.next_index = 0;
            let skip = self.next_offset.saturating_sub(h.base_offset);
            if skip > 0 {
                let records_end = BATCH_HEADER_LEN + h.records_len as usize;
                let mut it = RecordIter::resume(&self.batch[BATCH_HEADER_LEN..records_end], 0, &h);
                for _ in 0..skip {
                    let _ = it.next();
                }
                self.rec_pos = records_end - it.rest_len();
                self.next_index = skip as u32;
            }
            return Ok(true);
        }
    }

    /// At the end of the valid data of the current segment (stopped by
    /// `why`): moves to the next segment if there is one and returns true.
    /// Damage before a later segment is an `Error::Corrupt`.
    fn next_segment(&mut self, why: DecodeError) -> Result<bool> {
        let Some(seg) = self.segment.as_mut() else { return Ok(false) };
        let listing = list(&self.storage, &self.dir)?;
        let Some(&next) = listing.bases.iter().find(|&&b| b > seg.base) else { return Ok(false) };
        // A sealed segment: its data must end cleanly, where the next begins.
        if seg.file.rest(seg.pos)?.garbage_end.is_some() {
            return Err(Error::corrupt(&seg.file.path, seg.pos, why.to_string()));
        }
        if next != seg.expect {
            return Err(Error::corrupt(
                &seg.file.path,
                seg.pos,
                format!("segment ends at offset {}, the next one starts at {next}", seg.expect),
            ));
        }
        let file = BatchFile::open(&self.storage, &self.dir.join(segment::segment_name(next)))?;
        *seg = OpenSegment { base: next, file, pos: SEGMENT_HEADER_LEN as u64, expect: next };
        Ok(true)
    }
}

// ---------------------------------------------------------------------------
// Repair.

/// What [`plan_repair`] found and what [`apply`](RepairPlan::apply) would do:
/// cut the log at the first damage, dropping everything after it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RepairPlan {
    /// The queue directory.
    pub dir: PathBuf,
    /// The segment that is cut (it becomes the last one).
    pub segment: PathBuf,
    /// The byte position it is cut at: the end of the last valid batch
    /// before the damage.
    pub position: u64,
    /// What is wrong there.
    pub reason: String,
    /// True when a crash explains the damage (an unsynced torn tail of the
    /// last segment): opening the queue would cut the same bytes by itself.
    pub torn_tail: bool,
    /// The offset the log ends at after the repair.
    pub next_offset: u64,
    /// Valid records beyond the cut that the repair drops (found in the
    /// damaged segment past the damage, and in every later segment).
    pub records_dropped: u64,
    /// Offsets of the later segments' records that are dropped, if any.
    pub offsets_dropped: Option<std::ops::Range<u64>>,
    /// Non-zero bytes the repair drops.
    pub bytes_dropped: u64,
    /// Files removed: later segments and their indexes, and the cut
    /// segment's index (rebuilt on open).
    pub files_removed: Vec<PathBuf>,
}

/// Finds the first damage in the log (reading every batch, as [`verify`]
/// does) and plans the cut that removes it and everything after it; `None`
/// when the log's data is intact. Index problems need no repair (indexes are
/// rebuilt by walq itself). Modifies nothing.
///
/// ```
/// let dir = tempfile::tempdir()?;
/// walq::Queue::open(dir.path())?.append(b"one")?;
/// assert_eq!(walq::inspect::plan_repair(dir.path())?, None);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn plan_repair(dir: &Path) -> Result<Option<RepairPlan>> {
    let storage = RealFs;
    let listing = list(&storage, dir)?;
    let bases = &listing.bases;
    // (index in bases, position, reason, torn tail, bytes after the cut, records after it)
    let mut cut: Option<(usize, u64, String, bool, u64, u64)> = None;
    let mut prev: Option<(u64, u64)> = None; // previous segment's data end and next offset
    for (i, &base) in bases.iter().enumerate() {
        let active = i + 1 == bases.len();
        let mut f = BatchFile::open(&storage, &dir.join(segment::segment_name(base)))?;
        let header = header_problem(&f, base);
        let gap = prev.is_some_and(|(_, next)| next != base);
        if header.is_some() || gap {
            let w = walk(&mut f, SEGMENT_HEADER_LEN as u64, base, |_, _, _| {})?;
            let rest = f.rest(SEGMENT_HEADER_LEN as u64)?;
            if active && !gap && w.batches == 0 && rest.valid.is_empty() {
                break; // an interrupted creation: the next open removes it
            }
            let why = match header {
                Some(h) => format!("{}: segment header: {h}", f.path.display()),
                None => format!(
                    "{} starts at offset {base}, the previous segment ends at {}",
                    f.path.display(),
                    prev.map_or(0, |p| p.1)
                ),
            };
            let Some((end, _)) = prev else {
                return Err(Error::corrupt(&f.path, 0, format!("{why}; the first segment cannot be kept")));
            };
            cut = Some((i - 1, end, why, false, 0, 0));
            break;
        }
        let w = walk(&mut f, SEGMENT_HEADER_LEN as u64, base, |_, _, _| {})?;
        if let SegmentEnd::Damaged(d) = classify_end(&mut f, &w)? {
            let torn = active && d.is_torn_tail();
            cut = Some((i, d.position, d.reason, torn, d.garbage_end - d.position, d.records_after));
            break;
        }
        prev = Some((w.end, w.next_offset));
    }
    let Some((at, position, reason, torn_tail, mut bytes_dropped, mut records_dropped)) = cut else {
        return Ok(None);
    };
    let base = bases[at];
    let segment = dir.join(segment::segment_name(base));
    let mut f = BatchFile::open(&storage, &segment)?;
    let kept = walk(&mut f, SEGMENT_HEADER_LEN as u64, base, |_, _, _| {})?;
    let next_offset = if kept.end >= position { kept.next_offset } else { base };
    let mut files_removed = Vec::new();
    if listing.indexes.binary_search(&base).is_ok() {
        files_removed.push(dir.join(segment::index_name(base)));
    }
    let mut offsets_dropped: Option<std::ops::Range<u64>> = None;
    for &later in &bases[at + 1..] {
        let path = dir.join(segment::segment_name(later));
        let mut f = BatchFile::open(&storage, &path)?;
        let w = walk(&mut f, SEGMENT_HEADER_LEN as u64, later, |_, _, _| {})?;
        records_dropped += w.next_offset - later;
        bytes_dropped += w.end.saturating_sub(SEGMENT_HEADER_LEN as u64);
        if w.next_offset > later {
            let start = offsets_dropped.as_ref().map_or(later, |r| r.start);
            offsets_dropped = Some(start..w.next_offset);
        }
        files_removed.push(path);
        if listing.indexes.binary_search(&later).is_ok() {
            files_removed.push(dir.join(segment::index_name(later)));
        }
    }
    Ok(Some(RepairPlan {
        dir: dir.into(),
        segment,
        position,
        reason,
        torn_tail,
        next_offset,
        records_dropped,
        offsets_dropped,
        bytes_dropped,
        files_removed,
    }))
}

impl RepairPlan {
    /// Carries out the plan: takes the directory lock (`Error::Locked` if a
    /// queue holds it), checks that the directory still matches the plan,
    /// removes the later segments (newest first, each index before its
    /// segment) and the cut segment's index, truncates the cut segment at
    /// [`position`](RepairPlan::position), fdatasyncs it and fsyncs the
    /// directory. A crash part-way leaves a directory that a new plan
    /// finishes. Open the queue afterwards to rebuild the index.
    ///
    /// ```
    /// let dir = tempfile::tempdir()?;
    /// walq::Queue::open(dir.path())?.append(b"one")?;
    /// // Garbage where the next batch would go: a torn tail.
    /// let seg = dir.path().join("00000000000000000000.seg");
    /// let data_end = walq::inspect::survey(dir.path())?.segments[0].data_bytes;
    /// let mut bytes = std::fs::read(&seg)?;
    /// bytes[data_end as usize..data_end as usize + 4].copy_from_slice(b"junk");
    /// std::fs::write(&seg, &bytes)?;
    /// let plan = walq::inspect::plan_repair(dir.path())?.expect("damage found");
    /// assert!(plan.torn_tail);
    /// plan.apply()?;
    /// assert_eq!(walq::Queue::open(dir.path())?.next_offset(), 1);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn apply(&self) -> Result<()> {
        let storage = RealFs;
        let dir = &self.dir;
        let _lock = storage
            .lock_dir(dir)
            .map_err(|e| Error::io("lock", dir.join(LOCK_FILE), e))?
            .ok_or_else(|| Error::Locked { dir: dir.clone() })?;
        if plan_repair(dir)?.as_ref() != Some(self) {
            return Err(Error::io(
                "repair",
                dir,
                std::io::Error::other("the directory changed since the repair was planned; plan it again"),
            ));
        }
        // Newest first, so that a crash part-way never leaves a hole.
        let mut removals: Vec<&PathBuf> = self.files_removed.iter().collect();
        removals.sort_by(|a, b| {
            let key = |p: &Path| {
                let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
                let seg = segment::parse_name(name, SEGMENT_EXT);
                (seg.or_else(|| segment::parse_name(name, INDEX_EXT)).unwrap_or(0), seg.is_some())
            };
            key(b).cmp(&key(a))
        });
        for path in removals {
            match storage.remove_file(path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io("remove", path, e)),
            }
        }
        let file = storage.open(&self.segment, false).map_err(|e| Error::io("open", &self.segment, e))?;
        file.set_len(self.position).map_err(|e| Error::io("truncate", &self.segment, e))?;
        file.sync_data().map_err(|e| Error::io("fdatasync", &self.segment, e))?;
        storage.sync_dir(dir).map_err(|e| Error::io("fsync", dir, e))?;
        tracing::warn!(segment = %self.segment.display(), position = self.position, records_dropped = self.records_dropped, "repair cut the log");
        Ok(())
    }
}

/// Every file of the directory and its subdirectories (dead-letter
/// queues), for tests: relative path → bytes.
#[cfg(test)]
fn snapshot(dir: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut std::collections::BTreeMap<String, Vec<u8>>) {
        for e in std::fs::read_dir(dir).expect("list").map(|e| e.expect("entry")) {
            let path = e.path();
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                let name = path.strip_prefix(root).expect("inside").to_string_lossy().into_owned();
                out.insert(name, std::fs::read(&path).expect("read"));
            }
        }
    }
    let mut out = std::collections::BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Queue, Record};

    type TestResult = std::result::Result<(), Box<dyn std::error::Error>>;

    /// A closed queue of `n` records of ~100 bytes in 4 KiB segments (several).
    fn queue_dir(n: u64) -> std::result::Result<tempfile::TempDir, Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let queue = Queue::builder(dir.path()).segment_bytes(4096).preallocate_bytes(4096).open()?;
        for i in 0..n {
            let v = format!("value {i:04} {}", "x".repeat(80));
            queue.append_record(&Record::new(v.as_bytes()).key(b"k").timestamp_ms(1_000 + i))?;
        }
        queue.close()?;
        Ok(dir)
    }

    /// Batch positions of a segment file.
    fn batches(path: &Path, base: u64) -> Vec<(u64, BatchHeader)> {
        let mut f = BatchFile::open(&RealFs, path).expect("open");
        let mut out = Vec::new();
        walk(&mut f, SEGMENT_HEADER_LEN as u64, base, |p, h, _| out.push((p, *h))).expect("walk");
        out
    }

    fn flip(path: &Path, at: u64) {
        let mut b = std::fs::read(path).expect("read");
        b[at as usize] ^= 0x10;
        std::fs::write(path, b).expect("write");
    }

    #[test]
    fn survey_reports_segments_offsets_and_time_range() -> TestResult {
        let dir = queue_dir(120)?;
        let before = snapshot(dir.path());
        let s = survey(dir.path())?;
        assert!(s.segments.len() >= 3, "{}", s.segments.len());
        assert_eq!((s.first_offset(), s.next_offset()), (0, 120));
        assert_eq!(s.segments[0].first_timestamp_ms, Some(1_000));
        assert_eq!(s.segments.last().unwrap().last_timestamp_ms, Some(1_119));
        assert_eq!(s.segments.iter().map(SegmentInfo::records).sum::<u64>(), 120);
        assert!(s.segments.windows(2).all(|w| w[0].next_offset == w[1].base));
        assert!(matches!(s.segments[0].index, IndexStatus::Sealed { .. }), "{:?}", s.segments[0].index);
        assert!(matches!(s.segments.last().unwrap().index, IndexStatus::Active { synced_mark: Some(_), .. }));
        assert!(!s.locked && s.torn_tail().is_none() && s.last_recovery.is_none());
        assert!(s.other_files.iter().any(|f| f.kind == OtherKind::Lock));
        assert!(s.other_files.iter().all(|f| f.kind != OtherKind::Foreign), "{:?}", s.other_files);
        assert_eq!(before, snapshot(dir.path()), "a survey changed the directory");
        Ok(())
    }

    #[test]
    fn verify_finds_nothing_on_a_clean_log_and_changes_nothing() -> TestResult {
        let dir = queue_dir(120)?;
        let before = snapshot(dir.path());
        let r = verify(dir.path())?;
        assert_eq!(r.problems, vec![]);
        assert_eq!((r.records, r.offsets), (120, (0, 120)));
        assert_eq!(before, snapshot(dir.path()));
        Ok(())
    }

    #[test]
    fn a_flipped_bit_in_a_sealed_segment_is_found_read_around_and_repaired() -> TestResult {
        let dir = queue_dir(120)?;
        let s = survey(dir.path())?;
        let seg = &s.segments[1];
        let all = batches(&seg.path, seg.base);
        let (pos, h) = all[all.len() / 2];
        flip(&seg.path, pos + h.length as u64 / 2);

        let r = verify(dir.path())?;
        assert_eq!(r.problems.len(), 1, "{:?}", r.problems);
        let p = &r.problems[0];
        assert_eq!((p.path.as_path(), p.position, p.kind), (seg.path.as_path(), pos, ProblemKind::Batch));

        // The lock-free reader returns every record before the damage, then the error.
        let mut reader = LogReader::open(dir.path(), 0)?;
        let mut n = 0;
        let err = loop {
            match reader.next() {
                Ok(Some(r)) => {
                    assert_eq!(r.offset(), n);
                    n += 1;
                }
                Ok(None) => panic!("read past the damage"),
                Err(e) => break e,
            }
        };
        assert_eq!(n, h.base_offset);
        assert!(matches!(err, Error::Corrupt { position, .. } if position == pos));

        let before = snapshot(dir.path());
        let plan = plan_repair(dir.path())?.expect("a plan");
        assert_eq!(before, snapshot(dir.path()), "planning changed the directory");
        assert_eq!((plan.segment.as_path(), plan.position, plan.torn_tail), (seg.path.as_path(), pos, false));
        assert_eq!(plan.next_offset, h.base_offset);
        assert_eq!(plan.records_dropped, 120 - h.next_offset());
        assert!(plan.files_removed.contains(&s.segments[2].path));
        plan.apply()?;
        assert_eq!(plan_repair(dir.path())?, None);
        let queue = Queue::open(dir.path())?;
        assert_eq!(queue.next_offset(), h.base_offset);
        Ok(())
    }

    #[test]
    fn a_torn_tail_is_reported_and_the_reader_stops_cleanly_before_it() -> TestResult {
        let dir = queue_dir(30)?;
        let s = survey(dir.path())?;
        let last = s.segments.last().unwrap().clone();
        let mut bytes = std::fs::read(&last.path)?;
        let end = last.data_bytes as usize;
        bytes.resize(bytes.len().max(end + 100), 0);
        bytes[end..end + 100].fill(0xAB);
        std::fs::write(&last.path, &bytes)?;

        let s = survey(dir.path())?;
        let torn = s.torn_tail().expect("a torn tail");
        assert_eq!((torn.position, torn.garbage_end), (last.data_bytes, last.data_bytes + 100));
        let r = verify(dir.path())?;
        assert_eq!(r.problems.iter().map(|p| p.kind).collect::<Vec<_>>(), vec![ProblemKind::TornTail]);

        let mut reader = LogReader::open(dir.path(), 0)?;
        let mut n = 0;
        while reader.next()?.is_some() {
            n += 1;
        }
        assert_eq!(n, 30);

        // Opening cuts it and records the cut for `survey`.
        drop(Queue::open(dir.path())?);
        let s = survey(dir.path())?;
        assert!(s.torn_tail().is_none());
        let lr = s.last_recovery.expect("last-recovery written");
        assert_eq!(lr.bytes_cut, 100);
        assert_eq!(lr.cut_at.map(|c| c.1), Some(last.data_bytes));
        assert!(s.other_files.iter().any(|f| f.kind == OtherKind::LastRecovery));
        // ... and the file is walq's: a clean reopen neither removes nor rewrites it.
        let before = snapshot(dir.path());
        drop(Queue::open(dir.path())?);
        assert_eq!(before.get(LAST_RECOVERY_FILE), snapshot(dir.path()).get(LAST_RECOVERY_FILE));
        Ok(())
    }

    #[test]
    fn a_bad_index_entry_is_an_index_problem() -> TestResult {
        let dir = tempfile::tempdir()?;
        let queue = Queue::open(dir.path())?;
        for i in 0..300u64 {
            queue.append(format!("{i:0100}").as_bytes())?;
        }
        queue.close()?;
        let s = survey(dir.path())?;
        let idx = dir.path().join(segment::index_name(s.segments.last().unwrap().base));
        let mut b = std::fs::read(&idx)?;
        assert!(b.len() > INDEX_HEADER_LEN, "the active index has an entry");
        b[INDEX_HEADER_LEN + 4] ^= 8; // entry 0's position, now mid-batch
        std::fs::write(&idx, &b)?;
        let r = verify(dir.path())?;
        assert_eq!(r.problems.len(), 1, "{:?}", r.problems);
        assert_eq!(
            (r.problems[0].kind, r.problems[0].position),
            (ProblemKind::Index, INDEX_HEADER_LEN as u64)
        );
        assert_eq!(plan_repair(dir.path())?, None, "an index needs no repair");
        Ok(())
    }

    #[test]
    fn the_reader_follows_a_live_queue_across_segments_and_seeks() -> TestResult {
        let dir = tempfile::tempdir()?;
        let queue = Queue::builder(dir.path()).segment_bytes(4096).open()?;
        assert!(is_locked(dir.path())?);
        let mut reader = LogReader::open(dir.path(), 0)?;
        assert!(reader.next()?.is_none());
        for i in 0..200u64 {
            queue.append(format!("{i:0100}").as_bytes())?;
        }
        let mut n = 0;
        while let Some(r) = reader.next()? {
            assert_eq!((r.offset(), r.value()), (n, format!("{n:0100}").as_bytes()));
            n += 1;
        }
        assert_eq!(n, 200);
        let mut seek = LogReader::open(dir.path(), 150)?;
        assert_eq!(seek.next()?.map(|r| r.offset()), Some(150));
        drop(queue);
        assert!(!is_locked(dir.path())?);
        Ok(())
    }

    /// A closed queue of 10 records with consumer "c" at 4 (then 7, the
    /// journal's last entry) and group "g": offsets 0, 1, 3 acknowledged, 4
    /// dead-lettered, 2 and 5 delivered and not done.
    fn consumers_dir() -> std::result::Result<tempfile::TempDir, Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let queue = Queue::open(dir.path())?;
        for i in 0..10u64 {
            queue.append(format!("record {i}").as_bytes())?;
        }
        let group = queue.group("g").ack_durability(crate::Durability::Sync).open()?;
        let mut worker = group.worker();
        let got = worker.fetch(6, std::time::Duration::ZERO)?;
        assert_eq!(got.iter().map(|d| d.offset()).collect::<Vec<_>>(), vec![0, 1, 2, 3, 4, 5]);
        for i in [0, 1, 3] {
            worker.ack(got[i].id())?;
        }
        worker.term(got[4].id())?;
        drop((worker, group));
        let mut c = queue.consumer("c")?;
        c.commit(4)?;
        c.commit(7)?;
        drop(c);
        queue.close()?;
        Ok(dir)
    }

    #[test]
    fn consumers_and_groups_are_read_from_the_journal_without_changing_anything() -> TestResult {
        let dir = consumers_dir()?;
        let before = snapshot(dir.path());
        let state = consumers(dir.path())?;
        assert_eq!(before, snapshot(dir.path()), "reading the journal changed the directory");
        assert!(state.journal_exists && state.damage.is_none() && !state.clamped);
        assert_eq!(state.next_offset, 10);
        assert_eq!(state.consumers, vec![SavedConsumer { name: "c".into(), position: 7, lag: 3 }]);
        let g = SavedGroup {
            name: "g".into(),
            ack_floor: 2,
            delivered_to: 6,
            delivered_not_done: 2,
            done_above_floor: 2,
            unacked: 6,
            dead_letters: Some(1),
        };
        assert_eq!(state.groups, vec![g]);
        // The library agrees on what the two views share.
        let queue = Queue::open(dir.path())?;
        let info = &queue.groups()[0];
        assert_eq!((info.ack_floor, info.waiting_redelivery, info.unacked), (2, 2, 6));
        assert_eq!(queue.consumers()[0].position, 7);
        // A survey taken while the queue is open gives the same state.
        assert_eq!(survey(dir.path())?.consumers()?, state);
        Ok(())
    }

    #[test]
    fn a_damaged_journal_falls_back_to_its_last_valid_entry_as_the_queue_does() -> TestResult {
        let dir = consumers_dir()?;
        let path = dir.path().join(crate::journal::JOURNAL_FILE);
        let bytes = std::fs::read(&path)?;
        // The last non-zero byte is in the last entry: the commit of 7.
        let last = bytes.iter().rposition(|&b| b != 0).expect("entries") as u64;
        flip(&path, last);
        let before = snapshot(dir.path());
        let state = consumers(dir.path())?;
        assert_eq!(before, snapshot(dir.path()));
        let damage = state.damage.clone().expect("damage reported");
        assert!(damage.position < last && last - damage.position < 64, "{damage:?} vs byte {last}");
        assert_eq!(state.consumer("c").map(|c| (c.position, c.lag)), Some((4, 6)));
        assert_eq!(state.group("g").map(|g| g.ack_floor), Some(2), "earlier entries still count");
        // The queue falls back to the same entry.
        let queue = Queue::open(dir.path())?;
        assert_eq!(queue.consumers()[0].position, 4);

        // A journal that is all garbage: damage at byte 0, no consumers.
        drop(queue);
        std::fs::write(&path, b"not a journal at all")?;
        let state = consumers(dir.path())?;
        assert_eq!(state.damage.map(|d| d.position), Some(0));
        assert!(state.consumers.is_empty() && state.groups.is_empty());
        Ok(())
    }

    #[test]
    fn no_journal_is_no_consumers_and_a_missing_directory_is_not_found() -> TestResult {
        let dir = queue_dir(5)?;
        let state = consumers(dir.path())?;
        assert!(!state.journal_exists && state.consumers.is_empty() && state.groups.is_empty());
        assert_eq!((state.next_offset, state.entries), (5, 0));
        assert!(!dir.path().join(crate::journal::JOURNAL_FILE).exists(), "created the journal");
        let gone = dir.path().join("nope");
        assert!(matches!(consumers(&gone), Err(Error::NotFound { .. })));
        assert!(!gone.exists());
        Ok(())
    }

    #[test]
    fn a_missing_directory_is_not_found() {
        let dir = tempfile::tempdir().expect("tempdir");
        let gone = dir.path().join("nope");
        assert!(matches!(survey(&gone), Err(Error::NotFound { .. })));
        assert!(matches!(verify(&gone), Err(Error::NotFound { .. })));
        assert!(matches!(LogReader::open(&gone, 0), Err(Error::NotFound { .. })));
        assert!(!gone.exists());
    }
}
