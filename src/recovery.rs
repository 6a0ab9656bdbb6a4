//! Opening a queue directory: take the lock, list the segments, check sealed
//! segments by their index headers only, verify the tail of the last segment
//! batch by batch, cut an unsynced torn tail, and report what was cut.
//! Invariant: every step is idempotent, so a crash during recovery is safe.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::batch::{self, BATCH_ALIGN, BATCH_HEADER_LEN, BatchHeader, DecodeError};
use crate::error::{Error, Result};
use crate::fs::{DirLock, LOCK_FILE, Storage, StorageFile, read_exact_at};
use crate::index::{self, INDEX_HEADER_LEN, INDEX_INTERVAL_BYTES, IndexEntry};
use crate::log::{self, Segment};
use crate::segment::{self, HeaderCheck, INDEX_EXT, SEGMENT_EXT, SEGMENT_HEADER_LEN, TEMP_SUFFIX};
use crate::timeindex::{TIME_INDEX_EXT, time_index_name};
use crate::writer::ActiveState;

/// Largest index file read into memory: one entry per interval of the largest
/// segment (plus one oversized batch), so any longer file is damaged anyway.
const INDEX_FILE_BYTES_MAX: u64 =
    INDEX_HEADER_LEN as u64 + (crate::config::SEGMENT_BYTES_MAX * 2 / INDEX_INTERVAL_BYTES) * 8;

/// Bytes read at a time while checking the space past the tail.
const TAIL_CHUNK_BYTES: usize = 1 << 20;

/// What opening a queue found and did. Also logged with `tracing` at info
/// level (warn when something was cut).
///
/// ```
/// let dir = tempfile::tempdir()?;
/// let queue = walq::Queue::open(dir.path())?;
/// let report = queue.recovery_report();
/// assert_eq!(report.bytes_cut, 0);
/// assert_eq!(report.next_offset, 0);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RecoveryReport {
    /// Segments in the log after recovery.
    pub segments: usize,
    /// The first offset held.
    pub first_offset: u64,
    /// The offset the next append gets.
    pub next_offset: u64,
    /// Bytes of an unsynced torn tail that were cut off, counted up to the last
    /// non-zero byte (trailing zeros are free space, not data); 0 on a clean open.
    pub bytes_cut: u64,
    /// Records in the cut tail, as far as its headers could still be read.
    pub records_cut: u64,
    /// The file and position where the cut was made, if any.
    pub cut_at: Option<(PathBuf, u64)>,
    /// Bytes of the last segment that were verified batch by batch.
    pub bytes_scanned: u64,
    /// Indexes that were rebuilt because they were missing, short, stale or corrupt.
    pub indexes_rebuilt: usize,
    /// Segment files removed because a crash interrupted their creation.
    pub unfinished_segments_removed: usize,
    /// Leftover files removed: temporary files of an interrupted atomic write,
    /// and indexes whose segment was already deleted.
    pub temp_files_removed: usize,
    /// How long recovery took.
    pub duration: Duration,
}

/// Everything the queue needs after a successful open.
#[derive(Debug)]
pub(crate) struct Recovered {
    pub lock: Box<dyn DirLock>,
    pub segments: Vec<Arc<Segment>>,
    pub active: ActiveState,
    pub report: RecoveryReport,
}

pub(crate) fn recover(
    storage: &dyn Storage,
    dir: &Path,
    create: bool,
    preallocate: u64,
) -> Result<Recovered> {
    let started = Instant::now();
    let mut report = RecoveryReport::default();
    match storage.list_dir(dir) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if !create {
                return Err(Error::NotFound { dir: dir.into() });
            }
            storage.create_dir_all(dir).map_err(|e| Error::io("create directory", dir, e))?;
            // The new directory's own entry must survive a power cut too.
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                storage.sync_dir(parent).map_err(|e| Error::io("fsync", parent, e))?;
            }
        }
        Err(e) => return Err(Error::io("list", dir, e)),
    }
    let lock = lock_dir(storage, dir)?;

    let mut bases = Vec::new();
    let mut temps = Vec::new();
    let mut indexes = Vec::new();
    let mut time_indexes = Vec::new();
    for name in storage.list_dir(dir).map_err(|e| Error::io("list", dir, e))? {
        if let Some(base) = segment::parse_name(&name, SEGMENT_EXT) {
            bases.push(base);
        } else if let Some(base) = segment::parse_name(&name, INDEX_EXT) {
            indexes.push(base);
        } else if let Some(base) = segment::parse_name(&name, TIME_INDEX_EXT) {
            time_indexes.push(base);
        } else if name.strip_suffix(TEMP_SUFFIX).is_some_and(|n| {
            segment::parse_name(n, INDEX_EXT).is_some() || segment::parse_name(n, TIME_INDEX_EXT).is_some()
        }) || name.strip_suffix(TEMP_SUFFIX) == Some(LAST_RECOVERY_FILE)
        {
            // A write-then-rename of ours interrupted by a crash; the rename never happened.
            temps.push(dir.join(&name));
        } else if name != LOCK_FILE && name != LAST_RECOVERY_FILE {
            tracing::debug!(file = %name, "ignoring a file walq does not own");
        }
    }
    bases.sort_unstable();
    // An index below the first segment lost its segment to retention (which
    // deletes the index first, but a crash can still separate them).
    let first = bases.first().copied().unwrap_or(0);
    temps.extend(indexes.iter().filter(|&&b| b < first).map(|&b| dir.join(segment::index_name(b))));
    temps.extend(time_indexes.iter().filter(|&&b| b < first).map(|&b| dir.join(time_index_name(b))));

    // The last segment: drop it while a crash left it unwritten (mid-roll).
    let (active_file, active_len) = loop {
        let Some(&base) = bases.last() else {
            log::create_segment(storage, dir, 0, preallocate)?;
            bases.push(0);
            continue;
        };
        let path = dir.join(segment::segment_name(base));
        let file = storage.open(&path, false).map_err(|e| Error::io("open", &path, e))?;
        let len = file.len().map_err(|e| Error::io("stat", &path, e))?;
        let header = match segment::read_header(file.as_ref(), &path, len) {
            // A damaged header on the last segment is a creation the crash tore,
            // unless a valid batch is anywhere in the file: a header is synced
            // before any record in its segment is written, so then it is rot.
            Err(e @ Error::Corrupt { .. }) => {
                if !survey(file.as_ref(), &path, SEGMENT_HEADER_LEN as u64, len)?.valid.is_empty() {
                    return Err(e);
                }
                HeaderCheck::Unwritten
            }
            other => other?,
        };
        match header {
            HeaderCheck::Valid(b) if b == base => break (file, len),
            HeaderCheck::Valid(b) => {
                return Err(Error::corrupt(
                    &path,
                    16,
                    format!("header says base offset {b}, file name says {base}"),
                ));
            }
            HeaderCheck::Unwritten => {
                if !survey(file.as_ref(), &path, SEGMENT_HEADER_LEN as u64, len)?.valid.is_empty() {
                    return Err(Error::corrupt(&path, 0, "segment without a header holds data"));
                }
                drop(file);
                if bases.len() == 1 {
                    log::create_segment(storage, dir, base, preallocate)?;
                    continue;
                }
                remove_segment_files(storage, dir, base)?;
                report.unfinished_segments_removed += 1;
                bases.pop();
            }
        }
    };

    // Sealed segments are trusted by name here and checked on first use (their
    // header when mapped, their index when a reader seeks in them), so that
    // opening costs nothing per sealed segment: a log of any size opens in
    // the time its tail takes. A damaged sealed segment is an error then.
    let mut segments: Vec<Arc<Segment>> =
        bases.windows(2).map(|w| Arc::new(Segment::new(dir, w[0], w[1], 0, Vec::new()))).collect();

    let base = *bases.last().unwrap_or(&0);
    let (active, rebuilt) = recover_active(storage, dir, base, active_file, active_len, &mut report)?;
    // The active segment's directory entry may be as unsynced as its data was
    // (a crash between creating it and syncing the directory): records are
    // about to be acknowledged in it.
    storage.sync_dir(dir).map_err(|e| Error::io("fsync", dir, e))?;
    // Leftovers go last, so that an error above leaves them as they were.
    for p in temps {
        match storage.remove_file(&p) {
            Ok(()) => report.temp_files_removed += 1,
            // Recovery's own rewrite of the active index used (and renamed) the same temp name.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io("remove", &p, e)),
        }
    }
    report.indexes_rebuilt += rebuilt as usize;
    segments.push(Arc::clone(&active.segment));

    report.segments = segments.len();
    report.first_offset = segments[0].base;
    report.next_offset = active.next_offset;
    report.duration = started.elapsed();
    if report.bytes_cut > 0 || report.indexes_rebuilt > 0 || report.unfinished_segments_removed > 0 {
        write_last_recovery(storage, dir, &report)?;
    }
    if report.bytes_cut > 0 {
        tracing::warn!(?report, "recovery cut an unsynced torn tail");
    } else {
        tracing::info!(?report, "queue opened");
    }
    Ok(Recovered { lock, segments, active, report })
}

/// Recovers the last segment: finds a verified starting point through its
/// index, scans forward, classifies whatever follows the last good batch, and
/// cuts it only if a crash can explain it. Returns the state and whether the
/// index file was rewritten.
fn recover_active(
    storage: &dyn Storage,
    dir: &Path,
    base: u64,
    file: Arc<dyn StorageFile>,
    file_len: u64,
    report: &mut RecoveryReport,
) -> Result<(ActiveState, bool)> {
    let path = dir.join(segment::segment_name(base));
    let index_path = dir.join(segment::index_name(base));
    let header_end = SEGMENT_HEADER_LEN as u64;

    // What the index file holds (it may be ahead of, behind, or unrelated to the data).
    let mut on_disk: Vec<IndexEntry> = Vec::new();
    let mut index_header_ok = false;
    let mut on_disk_mark = None;
    if let Ok(f) = storage.open_read(&index_path) {
        let len = f.len().map_err(|e| Error::io("stat", &index_path, e))?;
        // Bounded: an active index holds at most one entry per interval of a segment.
        let mut buf = vec![0u8; len.min(INDEX_FILE_BYTES_MAX) as usize];
        read_exact_at(f.as_ref(), &mut buf, 0).map_err(|e| Error::io("read", &index_path, e))?;
        match index::check_header(&buf, base) {
            Ok(sealed) => {
                // A sealed header on the last segment means a crash mid-roll: rewrite it as active.
                index_header_ok = sealed.is_none();
                on_disk = index::decode_entries(&buf[INDEX_HEADER_LEN..]);
                on_disk_mark = index::synced_mark(&buf);
            }
            // The active index has no checksum to tell a newer walq from damage;
            // it is a cache of a v1 segment, so it is rebuilt.
            Err(problem) => {
                tracing::warn!(index = %index_path.display(), ?problem, "rebuilding the active index")
            }
        }
    }

    // The longest ordered prefix inside the file, then walk back to an entry whose batch verifies.
    let mut valid = on_disk.len();
    for (i, e) in on_disk.iter().enumerate() {
        let ordered =
            i == 0 || (on_disk[i - 1].relative < e.relative && on_disk[i - 1].position < e.position);
        if !ordered || (e.position as u64) < header_end || e.position as u64 >= file_len {
            valid = i;
            break;
        }
    }
    let ordered_entries = &on_disk[..valid];
    let mut entries: Vec<IndexEntry> = ordered_entries.to_vec();
    let (mut start, mut expected) = (header_end, base);
    while let Some(e) = entries.last().copied() {
        let (pos, off) = (e.position as u64, base + e.relative as u64);
        if let Some(h) = batch_at(file.as_ref(), &path, pos, off, file_len)? {
            // That batch is whole, but unsynced batches before it may be torn
            // (writeback order is not write order). Only bytes below its
            // durable_position were synced: scan from the last entry there.
            entries.retain(|e| e.position as u64 <= h.durable_position);
            if let Some(e) = entries.last() {
                (start, expected) = (e.position as u64, base + e.relative as u64);
            }
            break;
        }
        entries.pop();
    }
    // A synced mark (written at a clean close, and after every recovery) is
    // a later safe start: everything below it was synced, and walq never
    // writes below a synced position again.
    if let Some(m) = on_disk_mark
        && (m.position as u64) > start
        && (m.position as u64) <= file_len
        && m.next_offset >= expected
    {
        (start, expected) = (m.position as u64, m.next_offset);
        entries = ordered_entries.iter().filter(|e| (e.position as u64) < start).copied().collect();
    }
    let last_indexed = entries.last().map_or(header_end, |e| e.position as u64);

    let scan = segment::scan(file.as_ref(), &path, base, start, expected, file_len, last_indexed)?;
    report.bytes_scanned = scan.end - start;
    entries.extend_from_slice(&scan.entries);
    let mut end = scan.end;
    if let Some((p, err)) = &scan.stop {
        if let DecodeError::UnsupportedVersion { found } = err {
            return Err(Error::UnsupportedFormat {
                path: path.clone(),
                found: *found as u32,
                supported: batch::FORMAT_VERSION as u32,
            });
        }
        match classify_tail(file.as_ref(), &path, *p, file_len)? {
            Tail::Clean => {}
            Tail::SyncedDataFollows { at } => {
                return Err(Error::corrupt(
                    &path,
                    *p,
                    format!(
                        "{err}, yet a batch at byte {at} that was written after this one had been synced follows it"
                    ),
                ));
            }
            Tail::Torn { garbage_end, records } => {
                file.set_len(*p).map_err(|e| Error::io("truncate", &path, e))?;
                file.sync_data().map_err(|e| Error::io("fdatasync", &path, e))?;
                report.bytes_cut = garbage_end - p;
                report.records_cut = records;
                report.cut_at = Some((path.clone(), *p));
                tracing::warn!(file = %path.display(), position = p, bytes = garbage_end - p, reason = %err, "cut an unsynced torn tail");
            }
        }
        end = *p;
    }
    // What survived a kill -9 may still be only in the page cache. Everything
    // kept from here on counts as durable (readers see it, and later batches'
    // durable_position vouches for it), so make it so.
    file.sync_data().map_err(|e| Error::io("fdatasync", &path, e))?;
    let file_len = file.len().map_err(|e| Error::io("stat", &path, e))?;

    // Rewrite the active index when it differs from what the data says, or
    // when its synced mark is not where the data, now all synced, ends.
    let rebuilt = !index_header_ok || entries.as_slice() != on_disk.as_slice();
    let mark =
        u32::try_from(end).ok().map(|position| index::SyncedMark { next_offset: scan.next_offset, position });
    if rebuilt || on_disk_mark != mark {
        let bytes = match mark {
            Some(m) => index::encode_active_file(base, &entries, m),
            None => index::encode_file(base, &entries, None),
        };
        log::write_file_atomic(storage, dir, &segment::index_name(base), &bytes)?;
    }
    let index_file = storage.open(&index_path, true).map_err(|e| Error::io("open", &index_path, e))?;
    let segment = Arc::new(Segment::new(dir, base, log::OPEN_END, end, entries.clone()));
    if scan.next_offset == base {
        // Empty: the writer keeps its time index from the first batch on.
        segment.start_time_index();
    }
    let active = ActiveState {
        segment,
        file,
        index_file,
        pos: end,
        file_len,
        next_offset: scan.next_offset,
        last_indexed: entries.last().map_or(header_end, |e| e.position as u64),
        index_entries: entries.len() as u64,
    };
    Ok((active, rebuilt))
}

/// The file in which a recovery that cut, rebuilt or removed something says
/// what it did, for `walq inspect` (the [`RecoveryReport`] of a later open
/// says only what that open did): `key=value` lines in ASCII, `#` comments,
/// keys as in [`RecoveryReport`] plus `unix_time_ms`, `cut_file` and
/// `cut_position`. Replaced atomically (`last-recovery.tmp`, a leftover of
/// which the next open removes); never read by recovery itself.
pub(crate) const LAST_RECOVERY_FILE: &str = "last-recovery";

/// Writes [`LAST_RECOVERY_FILE`] atomically (temp file, fdatasync, rename,
/// directory fsync). A failure fails the open like any failed storage call
/// of recovery (a rerun finds the cut already made and durable).
fn write_last_recovery(storage: &dyn Storage, dir: &Path, report: &RecoveryReport) -> Result<()> {
    use std::fmt::Write as _;
    let mut text = String::from("# what the last walq recovery that changed something did\n");
    let unix_ms =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis());
    let _ = writeln!(text, "unix_time_ms={unix_ms}");
    let _ = writeln!(text, "next_offset={}", report.next_offset);
    let _ = writeln!(text, "bytes_cut={}", report.bytes_cut);
    let _ = writeln!(text, "records_cut={}", report.records_cut);
    if let Some((path, position)) = &report.cut_at {
        let name =
            path.file_name().map_or_else(|| path.display().to_string(), |n| n.to_string_lossy().into());
        let _ = writeln!(text, "cut_file={name}");
        let _ = writeln!(text, "cut_position={position}");
    }
    let _ = writeln!(text, "indexes_rebuilt={}", report.indexes_rebuilt);
    let _ = writeln!(text, "unfinished_segments_removed={}", report.unfinished_segments_removed);
    let _ = writeln!(text, "temp_files_removed={}", report.temp_files_removed);
    log::write_file_atomic(storage, dir, LAST_RECOVERY_FILE, text.as_bytes())?;
    storage.sync_dir(dir).map_err(|e| Error::io("fsync", dir, e))
}

/// How long open keeps trying a busy directory lock before `Locked`: a lock
/// file descriptor briefly duplicated into a child that another thread of the
/// process is spawning (between fork and exec) holds the lock for a moment
/// after the queue that owned it was closed.
const LOCK_RETRY: Duration = Duration::from_millis(50);

fn lock_dir(storage: &dyn Storage, dir: &Path) -> Result<Box<dyn DirLock>> {
    let deadline = Instant::now() + LOCK_RETRY;
    loop {
        match storage.lock_dir(dir).map_err(|e| Error::io("lock", dir.join(LOCK_FILE), e))? {
            Some(lock) => return Ok(lock),
            None if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(2)),
            None => return Err(Error::Locked { dir: dir.into() }),
        }
    }
}

/// The header of the whole, valid batch with base offset `offset` (any, when
/// `None`) that starts at `pos`, if there is one.
fn batch_at(
    file: &dyn StorageFile,
    path: &Path,
    pos: u64,
    offset: impl Into<Option<u64>>,
    file_len: u64,
) -> Result<Option<BatchHeader>> {
    let offset = offset.into();
    if pos + BATCH_HEADER_LEN as u64 > file_len {
        return Ok(None);
    }
    let mut head = [0u8; BATCH_HEADER_LEN];
    read_exact_at(file, &mut head, pos).map_err(|e| Error::io("read", path, e))?;
    let Ok(h) = batch::peek_header(&head) else { return Ok(None) };
    if offset.is_some_and(|o| o != h.base_offset) || pos + h.length as u64 > file_len {
        return Ok(None);
    }
    let mut buf = vec![0u8; h.length as usize];
    read_exact_at(file, &mut buf, pos).map_err(|e| Error::io("read", path, e))?;
    Ok(batch::validate_batch(&buf, offset).ok())
}

/// What lies in a stretch of a segment: where its last non-zero byte ends
/// (`None`: all zeros), and the valid batches found at 8-aligned positions.
#[derive(Debug)]
pub(crate) struct Survey {
    pub(crate) garbage_end: Option<u64>,
    pub(crate) valid: Vec<(u64, BatchHeader)>,
}

/// What `[from, file_len)` holds: where its last non-zero byte ends (None:
/// all zeros), and every valid batch that starts at an 8-aligned position in
/// it, whatever its offset.
pub(crate) fn survey(file: &dyn StorageFile, path: &Path, from: u64, file_len: u64) -> Result<Survey> {
    /// Bytes a magic check needs past a candidate position.
    const MAGIC_END: u64 = 12;
    let mut garbage_end = None;
    let mut candidates = Vec::new();
    let mut chunk = vec![0u8; TAIL_CHUNK_BYTES + MAGIC_END as usize];
    let mut at = from;
    while at < file_len {
        let n = ((file_len - at) as usize).min(TAIL_CHUNK_BYTES);
        // Read a little past the chunk, so a candidate at its very end is seen whole.
        let read = ((file_len - at) as usize).min(n + MAGIC_END as usize);
        read_exact_at(file, &mut chunk[..read], at).map_err(|e| Error::io("read", path, e))?;
        if let Some(last) = chunk[..n].iter().rposition(|&b| b != 0) {
            garbage_end = Some(at + last as u64 + 1);
        }
        // Batch starts are 8-aligned (relative to the segment start).
        let mut q = at.next_multiple_of(BATCH_ALIGN as u64);
        while q < at + n as u64 && q + MAGIC_END <= at + read as u64 {
            let i = (q - at) as usize;
            if chunk[i + 8..i + 12] == batch::BATCH_MAGIC.to_le_bytes() {
                candidates.push(q);
            }
            q += BATCH_ALIGN as u64;
        }
        at += n as u64;
    }
    let mut valid = Vec::new();
    for q in candidates {
        if let Some(h) = batch_at(file, path, q, None, file_len)? {
            valid.push((q, h));
        }
    }
    Ok(Survey { garbage_end, valid })
}

/// What lies past the last batch that verified.
#[derive(Debug, PartialEq, Eq)]
enum Tail {
    /// Only zeros (preallocated space) or nothing.
    Clean,
    /// Bytes that no acknowledged write can own: an unsynced write the crash tore.
    Torn { garbage_end: u64, records: u64 },
    /// A valid batch written after the failing position had been synced:
    /// the failure is corruption, not a crash.
    SyncedDataFollows { at: u64 },
}

/// Reads `[from, file_len)`: all zeros is a clean end; a valid batch whose
/// `durable_position` says `from` was synced makes the damage corruption;
/// anything else is a torn unsynced tail.
fn classify_tail(file: &dyn StorageFile, path: &Path, from: u64, file_len: u64) -> Result<Tail> {
    let Survey { garbage_end, valid } = survey(file, path, from, file_len)?;
    let Some(garbage_end) = garbage_end else { return Ok(Tail::Clean) };
    if let Some(&(at, _)) = valid.iter().find(|(_, h)| h.durable_position > from) {
        return Ok(Tail::SyncedDataFollows { at });
    }
    // Records lost with the cut: the failing batch's, if its header is still
    // readable, and those of valid but unsynced batches after it.
    let mut records: u64 = valid.iter().map(|(_, h)| h.record_count as u64).sum();
    if !valid.iter().any(|(q, _)| *q == from) {
        let mut head = [0u8; BATCH_HEADER_LEN];
        if from + BATCH_HEADER_LEN as u64 <= file_len {
            read_exact_at(file, &mut head, from).map_err(|e| Error::io("read", path, e))?;
            if let Ok(h) = batch::peek_header(&head) {
                records += h.record_count as u64;
            }
        }
    }
    Ok(Tail::Torn { garbage_end, records })
}

fn remove_segment_files(storage: &dyn Storage, dir: &Path, base: u64) -> Result<()> {
    for name in [segment::segment_name(base), segment::index_name(base)] {
        let p = dir.join(name);
        match storage.remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io("remove", &p, e)),
        }
    }
    storage.sync_dir(dir).map_err(|e| Error::io("fsync", dir, e))
}
