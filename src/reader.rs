//! Cursors over the log: they map segments read-only, verify each batch's
//! checksum once, and hand out records that borrow the map. Invariant: a
//! reader never decodes a byte at or past the visible watermark, and never
//! indexes past the end of its map.

use std::sync::Arc;

use crate::batch::{self, BATCH_HEADER_LEN, BatchHeader, DecodeError, RecordIter};
use crate::error::{Error, Result};
use crate::fs::StorageFile;
use crate::log::{Log, Segment};
use crate::mmap::Map;
use crate::record::RecordRef;

/// A cursor over the log from a starting offset, returned by
/// [`Queue::read_from`](crate::Queue::read_from).
///
/// [`next`](Reader::next) returns records whose slices point into a
/// read-only map of the segment file; each batch's checksum is verified
/// before any of its records is returned. A reader sees only records below
/// the visible watermark (with [`Durability::Sync`](crate::Durability::Sync),
/// only durable ones) and returns `Ok(None)` at the end; call `next` again
/// later to see what was appended since.
///
/// ```
/// let dir = tempfile::tempdir()?;
/// let queue = walq::Queue::open(dir.path())?;
/// queue.append(b"one")?;
/// let mut reader = queue.read_from(0)?;
/// assert_eq!(reader.next()?.map(|r| r.value().to_vec()), Some(b"one".to_vec()));
/// assert!(reader.next()?.is_none());
/// queue.append(b"two")?;
/// assert_eq!(reader.next()?.map(|r| r.offset()), Some(1));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct Reader {
    log: Arc<Log>,
    /// The offset `next` returns next.
    next_offset: u64,
    /// The segment holding `next_offset`, and a map of it.
    current: Option<(Arc<Segment>, Arc<Map>)>,
    /// A handle of the current segment while it is (or was, when mapped)
    /// active: remapping it as it grows must work even after retention
    /// unlinked it.
    file: Option<Arc<dyn StorageFile>>,
    /// The batch being read, when its records are not exhausted.
    batch: Option<BatchCursor>,
    /// Position of the next batch in the current segment, and its base offset.
    next_batch: Option<(u64, u64)>,
}

/// Where the reader is inside a verified batch.
#[derive(Debug, Clone, Copy)]
struct BatchCursor {
    header: BatchHeader,
    /// Map positions of the next record and of the end of the records.
    rec_pos: usize,
    records_end: usize,
    next_index: u32,
    /// Position of the batch after this one.
    end: u64,
}

impl Reader {
    pub(crate) fn new(log: Arc<Log>, offset: u64) -> Reader {
        Reader { log, next_offset: offset, current: None, file: None, batch: None, next_batch: None }
    }

    /// The offset the next record will have.
    pub fn position(&self) -> u64 {
        self.next_offset
    }

    /// Moves the reader to `offset` (it may lie past what is visible yet).
    ///
    /// ```
    /// let dir = tempfile::tempdir()?;
    /// let queue = walq::Queue::open(dir.path())?;
    /// queue.append_batch(&[walq::Record::new(b"a"), walq::Record::new(b"b")])?;
    /// let mut reader = queue.read_from(0)?;
    /// reader.seek(1);
    /// assert_eq!(reader.next()?.unwrap().value(), b"b");
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn seek(&mut self, offset: u64) {
        self.next_offset = offset;
        self.batch = None;
        self.next_batch = None;
    }

    /// The next record, `Ok(None)` at the visible end of the log, or an error
    /// if the bytes fail their checksum or the offset was removed.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Result<Option<RecordRef<'_>>> {
        if self.next_offset >= self.log.visible() {
            return Ok(None);
        }
        if self.batch.is_none() {
            self.load_batch()?;
        }
        let Some(cur) = self.batch.as_mut() else { return Ok(None) };
        let (seg, map) = self.current.as_ref().expect("a loaded batch has a segment");
        let mut it = RecordIter::resume(&map[cur.rec_pos..cur.records_end], cur.next_index, &cur.header);
        let raw = match it.next() {
            Some(Ok(raw)) => raw,
            Some(Err(e)) => {
                return Err(Error::corrupt(&seg.path, cur.rec_pos as u64, e.to_string()));
            }
            None => {
                return Err(Error::corrupt(
                    &seg.path,
                    cur.rec_pos as u64,
                    "batch has fewer records than its header says",
                ));
            }
        };
        cur.rec_pos = cur.records_end - it.rest_len();
        cur.next_index += 1;
        let offset = cur.header.base_offset + raw.offset_delta as u64;
        debug_assert_eq!(offset, self.next_offset);
        if cur.next_index >= cur.header.record_count {
            self.next_batch = Some((cur.end, cur.header.next_offset()));
            self.batch = None;
        }
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

    /// Finds, verifies and positions at the batch holding `next_offset`
    /// (known to be below the visible watermark).
    fn load_batch(&mut self) -> Result<()> {
        let target = self.next_offset;
        // The right segment: the current one unless it ended before `target`.
        let switch = match &self.current {
            Some((seg, _)) => seg.base > target || seg.end() <= target,
            None => true,
        };
        if switch {
            let seg = self.log.segment_for(target).ok_or_else(|| self.out_of_range(target))?;
            if seg.end() <= target {
                return Err(self.out_of_range(target));
            }
            // Open first, map second: the handle then sees whatever the map saw.
            self.file =
                if seg.end() == crate::log::OPEN_END { Some(self.log.active_handle(&seg)?) } else { None };
            let map = self.log.map(&seg, 0, self.file.as_ref())?;
            self.current = Some((seg, map));
            self.next_batch = None;
        }
        let seg = Arc::clone(&self.current.as_ref().expect("set above").0);
        let (mut pos, mut base) = match self.next_batch {
            Some((pos, base)) if base <= target => (pos, base),
            _ => self.log.seek_hint(&seg, target)?,
        };
        let mut from_index = self.next_batch.is_none();
        loop {
            let header = match self.verify_at(&seg, pos, base) {
                Ok(h) => h,
                Err(e) if from_index && base != seg.base => {
                    // A stale index entry: fall back to the segment's first batch.
                    tracing::warn!(segment = %seg.path.display(), error = %e, "index entry did not match; scanning");
                    (pos, base) = (crate::segment::SEGMENT_HEADER_LEN as u64, seg.base);
                    from_index = false;
                    continue;
                }
                Err(e) => return Err(e),
            };
            let start = pos as usize + BATCH_HEADER_LEN;
            let records_end = start + header.records_len as usize;
            if header.next_offset() > target {
                let end = pos + header.length as u64;
                let mut cur = BatchCursor { header, rec_pos: start, records_end, next_index: 0, end };
                // Skip the records before `target` inside this batch.
                let map = &self.current.as_ref().expect("set above").1;
                let mut it = RecordIter::resume(&map[start..records_end], 0, &header);
                while header.base_offset + (cur.next_index as u64) < target {
                    match it.next() {
                        Some(Ok(_)) => cur.next_index += 1,
                        Some(Err(e)) => return Err(Error::corrupt(&seg.path, pos, e.to_string())),
                        None => return Err(Error::corrupt(&seg.path, pos, "batch ended early")),
                    }
                }
                cur.rec_pos = records_end - it.rest_len();
                self.batch = Some(cur);
                return Ok(());
            }
            pos += header.length as u64;
            base = header.next_offset();
        }
    }

    /// Verifies the batch at `pos` of `seg`, remapping a grown active segment.
    fn verify_at(&mut self, seg: &Arc<Segment>, pos: u64, base: u64) -> Result<BatchHeader> {
        for attempt in 0..2 {
            let map = &self.current.as_ref().expect("segment loaded").1;
            let slice = map.get(pos as usize..).unwrap_or_default();
            match batch::verify_batch(slice, Some(base)) {
                Ok(h) => return Ok(h),
                Err(DecodeError::Incomplete { needed }) if attempt == 0 => {
                    let map =
                        self.log.map(seg, pos + needed.max(BATCH_HEADER_LEN) as u64, self.file.as_ref())?;
                    self.current = Some((Arc::clone(seg), map));
                }
                Err(e) => return Err(Error::corrupt(&seg.path, pos, e.to_string())),
            }
        }
        Err(Error::corrupt(&seg.path, pos, "batch runs past the end of the segment"))
    }

    fn out_of_range(&self, offset: u64) -> Error {
        Error::OffsetOutOfRange { offset, first: self.log.first_offset(), next: self.log.visible() }
    }
}
