//! The single writer of the active segment: the pending batch, writing it with
//! one syscall, preallocation, index entries, rolling to a new segment, and the
//! fdatasync that moves the durable watermark. Invariant: `durable <= written
//! <= pending base`, and a failed write or sync poisons the writer for good.

use std::ops::Range;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::batch::{BATCH_BYTES_MAX, BatchBuilder};
use crate::config::{Durability, OS_WRITE_DELAY};
use crate::error::{Error, Result};
use crate::fs::{StorageFile, write_all_at};
use crate::index::{self, INDEX_ENTRY_LEN, INDEX_HEADER_LEN, INDEX_INTERVAL_BYTES, IndexEntry};
use crate::log::{self, Log, Segment};
use crate::record::Record;
use crate::segment::{self, SEGMENT_HEADER_LEN};

/// Zeros written per preallocation call, at most (bounds one write's buffer).
const ZERO_CHUNK_BYTES: usize = 256 << 10;

/// What the writer needs from the options.
#[derive(Debug, Clone)]
pub(crate) struct WriterConfig {
    pub segment_bytes: u64,
    pub max_record_bytes: usize,
    pub preallocate_bytes: u64,
    pub write_buffer_bytes: usize,
    /// Readers see only synced records (the queue's default is `Sync`).
    pub publish_durable_only: bool,
}

/// The active segment as recovery left it.
#[derive(Debug)]
pub(crate) struct ActiveState {
    pub segment: Arc<Segment>,
    pub file: Arc<dyn StorageFile>,
    pub index_file: Arc<dyn StorageFile>,
    /// End of the last valid batch.
    pub pos: u64,
    pub file_len: u64,
    pub next_offset: u64,
    pub last_indexed: u64,
    pub index_entries: u64,
}

/// Counters the queue reports.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct WriterCounters {
    pub appends: u64,
    pub bytes: u64,
    pub batches: u64,
    pub syncs: u64,
    pub rolls: u64,
}

#[derive(Debug)]
pub(crate) struct Writer {
    log: Arc<Log>,
    cfg: WriterConfig,
    active: Arc<Segment>,
    file: Arc<dyn StorageFile>,
    index_file: Arc<dyn StorageFile>,
    index_len: u64,
    /// End of written data in the active segment.
    pos: u64,
    /// The active file's length (written data plus zeroed space ahead).
    file_len: u64,
    /// Position in the active segment that the last fdatasync covered.
    synced_pos: u64,
    last_indexed: u64,
    /// Offset after the last record written to the file.
    written: u64,
    /// Offset after the last record an fdatasync covered.
    durable: u64,
    pending: BatchBuilder,
    /// When the oldest record in `pending` arrived (for `Os` appends).
    write_due: Option<Instant>,
    /// When written-or-pending records must be synced (for `Interval` appends).
    sync_due: Option<Instant>,
    poisoned: bool,
    /// Set when an append gave the background writer a new deadline.
    pub wake_background: bool,
    pub counters: WriterCounters,
}

impl Writer {
    pub(crate) fn new(log: Arc<Log>, cfg: WriterConfig, a: ActiveState) -> Writer {
        let mut pending = BatchBuilder::new();
        pending.reset(a.next_offset);
        Writer {
            log,
            cfg,
            active: a.segment,
            file: a.file,
            index_file: a.index_file,
            index_len: INDEX_HEADER_LEN as u64 + a.index_entries * INDEX_ENTRY_LEN as u64,
            pos: a.pos,
            file_len: a.file_len,
            synced_pos: a.pos,
            last_indexed: a.last_indexed,
            written: a.next_offset,
            durable: a.next_offset,
            pending,
            write_due: None,
            sync_due: None,
            poisoned: false,
            wake_background: false,
            counters: WriterCounters::default(),
        }
    }

    /// Offset the next append gets.
    pub(crate) fn next_offset(&self) -> u64 {
        self.pending.next_offset()
    }

    pub(crate) fn durable(&self) -> u64 {
        self.durable
    }

    pub(crate) fn written(&self) -> u64 {
        self.written
    }

    pub(crate) fn is_poisoned(&self) -> bool {
        self.poisoned
    }

    /// Appends records as one unit of durability; returns their offsets.
    pub(crate) fn append(&mut self, records: &[Record<'_>], durability: Durability) -> Result<Range<u64>> {
        if self.poisoned {
            return Err(Error::Poisoned);
        }
        // Check every record before taking any, so a bad one leaves nothing behind.
        for r in records {
            let len = r.encoded_len();
            if len > self.cfg.max_record_bytes {
                return Err(Error::RecordTooLarge { len, max: self.cfg.max_record_bytes });
            }
        }
        let first = self.pending.next_offset();
        let mut now_ms = None;
        for r in records {
            let len = r.encoded_len();
            if !self.pending.is_empty() && self.pending.encoded_len() + len > self.batch_limit() {
                self.write_pending()?;
            }
            let ts = match r.timestamp_ms {
                Some(ts) => ts,
                None => *now_ms.get_or_insert_with(wall_clock_ms),
            };
            self.pending.push(r.key, &r.headers, r.value, ts);
            self.counters.appends += 1;
            self.counters.bytes += r.value.len() as u64;
        }
        let range = first..self.pending.next_offset();
        match durability {
            Durability::Sync => {
                self.write_pending()?;
                self.sync()?;
            }
            Durability::Interval(d) => {
                let due = Instant::now() + d;
                self.wake_background |= self.sync_due.is_none_or(|t| due < t);
                self.sync_due = Some(self.sync_due.map_or(due, |t| t.min(due)));
                if self.pending.encoded_len() >= self.cfg.write_buffer_bytes {
                    self.write_pending()?;
                }
            }
            Durability::Os => {
                if self.pending.encoded_len() >= self.cfg.write_buffer_bytes {
                    self.write_pending()?;
                } else if self.write_due.is_none() {
                    self.write_due = Some(Instant::now() + OS_WRITE_DELAY);
                    self.wake_background = true;
                }
            }
        }
        Ok(range)
    }

    fn batch_limit(&self) -> usize {
        self.cfg.write_buffer_bytes.min(BATCH_BYTES_MAX / 2)
    }

    /// Writes and syncs everything appended so far.
    pub(crate) fn flush(&mut self) -> Result<()> {
        if self.poisoned {
            return Err(Error::Poisoned);
        }
        self.write_pending()?;
        self.sync()
    }

    /// Background work that is due at `now`; returns when to look again.
    pub(crate) fn tick(&mut self, now: Instant) -> Result<Option<Instant>> {
        if self.poisoned {
            return Ok(None);
        }
        if self.write_due.is_some_and(|t| t <= now) {
            self.write_pending()?;
        }
        if self.sync_due.is_some_and(|t| t <= now) {
            self.write_pending()?;
            self.sync()?;
        }
        Ok(match (self.write_due, self.sync_due) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        })
    }

    fn poison<T>(&mut self, e: Error) -> Result<T> {
        self.poisoned = true;
        // Nothing pending was acknowledged by this failure; drop it.
        self.pending.reset(self.written);
        self.write_due = None;
        self.sync_due = None;
        tracing::error!(error = %e, "write or sync failed; the queue is poisoned until reopened");
        Err(e)
    }

    /// Seals the pending batch and writes it with one syscall (rolling first
    /// when it would overflow the segment). Acknowledges nothing by itself.
    fn write_pending(&mut self) -> Result<()> {
        self.write_due = None;
        if self.pending.is_empty() {
            return Ok(());
        }
        let len = self.pending.encoded_len() as u64;
        let relative_end = self.pending.next_offset() - self.active.base;
        let has_data = self.pos > SEGMENT_HEADER_LEN as u64;
        if has_data
            && (self.pos + len > self.cfg.segment_bytes || relative_end > u32::MAX as u64)
            && let Err(e) = self.roll()
        {
            return self.poison(e);
        }
        let end = self.pos + len;
        if end > self.file_len
            && let Err(e) = self.preallocate(end)
        {
            return self.poison(e);
        }
        let bytes = self.pending.seal(self.synced_pos);
        if let Err(e) = write_all_at(self.file.as_ref(), bytes, self.pos) {
            let e = Error::io("write", &self.active.path, e);
            return self.poison(e);
        }
        let batch_pos = self.pos;
        self.pos = end;
        self.file_len = self.file_len.max(end);
        self.active.set_data_len(end);
        self.written = self.pending.next_offset();
        self.counters.batches += 1;
        let base = self.pending.base_offset();
        self.pending.reset(self.written);
        if batch_pos >= self.last_indexed + INDEX_INTERVAL_BYTES {
            self.add_index_entry(base, batch_pos);
        }
        if !self.cfg.publish_durable_only {
            self.log.publish(self.written);
        }
        Ok(())
    }

    /// Zero-fills the active segment ahead of `end`, so that later syncs
    /// overwrite allocated blocks instead of growing the file.
    fn preallocate(&mut self, end: u64) -> Result<()> {
        let chunk = self.cfg.preallocate_bytes;
        if chunk == 0 {
            return Ok(());
        }
        let cap = self.cfg.segment_bytes.max(end);
        let target = end.div_ceil(chunk).saturating_mul(chunk).min(cap).max(end);
        // The batch itself covers [pos, end); zero only what lies beyond it.
        let mut at = self.file_len.max(end);
        let zeros = vec![0u8; ZERO_CHUNK_BYTES.min((target - at.min(target)) as usize)];
        while at < target {
            let n = ((target - at) as usize).min(zeros.len());
            match write_all_at(self.file.as_ref(), &zeros[..n], at) {
                Ok(()) => at += n as u64,
                Err(e) if e.raw_os_error() == Some(28) => {
                    // Full disk: stop preallocating; the data write will say if it fits.
                    tracing::warn!(segment = %self.active.path.display(), "disk full while preallocating; continuing without");
                    break;
                }
                Err(e) => return Err(Error::io("preallocate", &self.active.path, e)),
            }
        }
        self.file_len = self.file_len.max(at);
        Ok(())
    }

    fn add_index_entry(&mut self, base: u64, position: u64) {
        let (Ok(relative), Ok(position32)) =
            (u32::try_from(base - self.active.base), u32::try_from(position))
        else {
            return;
        };
        let entry = IndexEntry { relative, position: position32 };
        self.active.push_index_entry(entry);
        self.last_indexed = position;
        // The index is a cache: a failed write is logged and repaired by the next open.
        match write_all_at(self.index_file.as_ref(), &index::encode_entry(entry), self.index_len) {
            Ok(()) => self.index_len += INDEX_ENTRY_LEN as u64,
            Err(e) => {
                tracing::warn!(index = %self.active.index_path.display(), error = %e, "index write failed")
            }
        }
    }

    /// fdatasync of the active segment; advances the durable watermark.
    fn sync(&mut self) -> Result<()> {
        self.sync_due = None;
        if self.synced_pos == self.pos && self.durable == self.written {
            return Ok(());
        }
        if let Err(e) = self.file.sync_data() {
            let e = Error::io("fdatasync", &self.active.path, e);
            return self.poison(e);
        }
        self.counters.syncs += 1;
        self.synced_pos = self.pos;
        self.durable = self.written;
        self.log.publish(self.durable);
        Ok(())
    }

    /// Seals the active segment and starts the next one. The old segment is
    /// synced and its index written before the new segment exists; the new one
    /// and its directory entry are synced before any record in it is written.
    fn roll(&mut self) -> Result<()> {
        self.sync()?;
        let storage = self.log.storage.as_ref();
        let dir = &self.log.dir;
        let entries = self.active.active_entries();
        let data_len = u32::try_from(self.pos)
            .map_err(|_| Error::corrupt(&self.active.path, self.pos, "segment too long"))?;
        log::write_sealed_index(storage, dir, self.active.base, &entries, self.written, data_len)?;

        let base = self.written;
        let seg_path = dir.join(segment::segment_name(base));
        let idx_path = dir.join(segment::index_name(base));
        let prealloc = self.cfg.preallocate_bytes.min(self.cfg.segment_bytes);
        let (file, file_len) = log::create_segment(storage, dir, base, prealloc)?;
        let index_file = storage.open(&idx_path, false).map_err(|e| Error::io("open", &idx_path, e))?;
        let old = std::mem::replace(
            &mut self.active,
            Arc::new(Segment::new(dir, base, log::OPEN_END, 0, Vec::new())),
        );
        self.file = file;
        self.index_file = index_file;
        self.index_len = INDEX_HEADER_LEN as u64;
        self.pos = SEGMENT_HEADER_LEN as u64;
        self.last_indexed = self.pos;
        self.file_len = file_len;
        self.synced_pos = self.pos;
        self.active.set_data_len(self.pos);
        // Readers learn the old segment's end before any offset of the new one is visible.
        old.seal(base);
        self.log.push_segment(Arc::clone(&self.active));
        self.counters.rolls += 1;
        tracing::debug!(segment = %seg_path.display(), "rolled to a new segment");
        Ok(())
    }
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub(crate) fn wall_clock_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}
