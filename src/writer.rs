//! The I/O half of the log's tail: writing a sealed batch with one syscall,
//! preallocation, index entries, rolling to a new segment, and the fdatasync
//! that moves the durable watermark. Only the flusher of the moment holds it
//! (see `flush.rs`). Invariant: `durable <= written`, and a failed write or
//! sync poisons the writer for good.

use std::sync::Arc;

use crate::batch::{self, BatchBuilder};
use crate::error::{Error, Result};
use crate::fs::{StorageFile, write_all_at};
use crate::index::{self, INDEX_ENTRY_LEN, INDEX_HEADER_LEN, INDEX_INTERVAL_BYTES, IndexEntry};
use crate::log::{self, Log, Segment};
use crate::segment::{self, SEGMENT_HEADER_LEN};
use crate::timeindex;

/// Zeros written per preallocation call, at most (bounds one write's buffer).
const ZERO_CHUNK_BYTES: usize = 256 << 10;

/// What the writer needs from the options.
#[derive(Debug, Clone)]
pub(crate) struct WriterConfig {
    pub segment_bytes: u64,
    pub preallocate_bytes: u64,
    /// Pad every batch to end on a sector boundary (see `batch::SECTOR_BYTES`).
    pub pad_to_sectors: bool,
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
    poisoned: bool,
    pub counters: WriterCounters,
}

impl Writer {
    pub(crate) fn new(log: Arc<Log>, cfg: WriterConfig, a: ActiveState) -> Writer {
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
            poisoned: false,
            counters: WriterCounters::default(),
        }
    }

    pub(crate) fn written(&self) -> u64 {
        self.written
    }

    fn poison<T>(&mut self, e: Error) -> Result<T> {
        self.poisoned = true;
        tracing::error!(error = %e, "write or sync failed; the queue is poisoned until reopened");
        Err(e)
    }

    /// Seals `batch` and writes it with one syscall, rolling first when it
    /// would overflow the segment. Acknowledges nothing by itself.
    pub(crate) fn write_batch(&mut self, batch: &mut BatchBuilder) -> Result<()> {
        if self.poisoned {
            return Err(Error::Poisoned);
        }
        if batch.is_empty() {
            return Ok(());
        }
        debug_assert_eq!(batch.base_offset(), self.written, "batches are written in offset order");
        let pad = self.cfg.pad_to_sectors;
        // With padding, the length depends on where the batch lands; bound it for the roll check.
        let len = batch.encoded_len() as u64 + if pad { batch::SECTOR_BYTES as u64 } else { 0 };
        let relative_end = batch.next_offset() - self.active.base;
        let has_data = self.pos > SEGMENT_HEADER_LEN as u64;
        if has_data
            && (self.pos + len > self.cfg.segment_bytes || relative_end > u32::MAX as u64)
            && let Err(e) = self.roll()
        {
            return self.poison(e);
        }
        let len = if pad { batch.padded_len(self.pos) as u64 } else { batch.encoded_len() as u64 };
        let end = self.pos + len;
        if end > self.file_len
            && let Err(e) = self.preallocate(end)
        {
            return self.poison(e);
        }
        let bytes =
            if pad { batch.seal_padded(self.synced_pos, self.pos) } else { batch.seal(self.synced_pos) };
        if let Err(e) = write_all_at(self.file.as_ref(), bytes, self.pos) {
            let e = Error::io("write", &self.active.path, e);
            return self.poison(e);
        }
        let batch_pos = self.pos;
        self.pos = end;
        self.file_len = self.file_len.max(end);
        self.active.set_data_len(end);
        self.written = batch.next_offset();
        self.counters.batches += 1;
        let indexed = batch_pos >= self.last_indexed + INDEX_INTERVAL_BYTES;
        if indexed {
            self.add_index_entry(batch.base_offset(), batch_pos);
        }
        if let (Ok(rel), Ok(pos)) =
            (u32::try_from(batch.base_offset() - self.active.base), u32::try_from(batch_pos))
        {
            self.active.note_batch_time(rel, pos, batch.max_timestamp(), indexed);
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

    /// fdatasync of the active segment; advances the durable watermark to
    /// everything written. Returns the new durable offset.
    pub(crate) fn sync(&mut self) -> Result<u64> {
        if self.poisoned {
            return Err(Error::Poisoned);
        }
        if self.synced_pos == self.pos && self.durable == self.written {
            return Ok(self.durable);
        }
        if let Err(e) = self.file.sync_data() {
            let e = Error::io("fdatasync", &self.active.path, e);
            return self.poison(e);
        }
        self.counters.syncs += 1;
        self.synced_pos = self.pos;
        self.durable = self.written;
        self.log.set_durable(self.durable);
        self.log.publish(self.durable);
        Ok(self.durable)
    }

    /// Records in the active index's header that everything written so far
    /// is synced, so the next open starts its scan there (a clean close).
    /// Best effort: the index is a cache, and without the mark the next open
    /// only scans more.
    pub(crate) fn mark_synced(&mut self) {
        if self.poisoned || self.synced_pos != self.pos {
            return;
        }
        let Ok(position) = u32::try_from(self.pos) else { return };
        let mark = index::SyncedMark { next_offset: self.durable, position };
        let header = index::encode_active_header(self.active.base, Some(mark));
        let result =
            write_all_at(self.index_file.as_ref(), &header, 0).and_then(|()| self.index_file.sync_data());
        if let Err(e) = result {
            tracing::warn!(index = %self.active.index_path.display(), error = %e, "could not mark the index synced");
        }
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
        // The time index is a cache: one the writer did not keep (a segment
        // already active at open) is built on first use; a stale file goes.
        let tix = dir.join(timeindex::time_index_name(self.active.base));
        match self.active.seal_time_index() {
            Some(ti) => {
                if let Err(e) = timeindex::write(storage, dir, self.active.base, &ti) {
                    tracing::warn!(segment = %self.active.path.display(), error = %e, "could not write the time index");
                }
            }
            None => {
                if let Err(e) = storage.remove_file(&tix)
                    && e.kind() != std::io::ErrorKind::NotFound
                {
                    tracing::warn!(file = %tix.display(), error = %e, "could not remove a stale time index");
                }
            }
        }

        let base = self.written;
        let old_len = self.file_len;
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
        self.active.start_time_index();
        // Readers learn the old segment's end before any offset of the new one is visible.
        old.seal(base);
        self.log.count_sealed(&old, old_len);
        self.log.push_segment(Arc::clone(&self.active));
        self.counters.rolls += 1;
        tracing::debug!(segment = %seg_path.display(), "rolled to a new segment");
        Ok(())
    }
}
