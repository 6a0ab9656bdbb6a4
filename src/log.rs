//! The ordered list of segments that readers and the writer share: find the
//! segment holding an offset, map it, seek through its index, and remove old
//! segments. Invariant: segments are contiguous (each one's base is the
//! previous one's end) and only the last one is ever written.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use crate::error::{Error, Result};
use crate::fs::{Storage, StorageFile, write_all_at};
use crate::index::{self, INDEX_HEADER_LEN, IndexEntry};
use crate::mmap::Map;
use crate::segment::{self, SEGMENT_HEADER_LEN, TEMP_SUFFIX};
use crate::timeindex::{self, TimeIndex};

/// `end` of a segment that is still being written.
pub(crate) const OPEN_END: u64 = u64::MAX;

/// One segment as the log sees it: where it is, how far it reaches, and its
/// cached read-only map. Readers hold an `Arc`, so a segment removed by
/// retention stays readable through the map they already have.
#[derive(Debug)]
pub(crate) struct Segment {
    pub base: u64,
    pub path: PathBuf,
    pub index_path: PathBuf,
    /// Offset after the last record once sealed; [`OPEN_END`] while active.
    end: AtomicU64,
    /// Retention removed it: readers still inside may map it, nothing caches it.
    removed: std::sync::atomic::AtomicBool,
    /// Bytes of the file that hold written data: the only bytes a map ever
    /// exposes, so no slice covers bytes the writer may still change (grows
    /// while active; the preallocated zeros past it are mapped, to be exposed
    /// by a wider view once written, but never read before).
    data_len: AtomicU64,
    map: Mutex<Option<Arc<Map>>>,
    /// A read handle of the file while active, shared by the readers at the
    /// tail (each new reader would otherwise open the file); dropped at seal.
    handle: Mutex<Option<Arc<dyn StorageFile>>>,
    /// File length once sealed and counted in [`Log::total_bytes`] (0: not counted).
    size: AtomicU64,
    /// The time index: kept by the writer while active, loaded (or rebuilt)
    /// on first use once sealed.
    time: Mutex<TimeSlot>,
    /// Index entries of the active segment (readers seek with them).
    active_index: RwLock<Vec<IndexEntry>>,
    /// The index of a sealed segment, checked (and if need be rebuilt) on
    /// first use, not at open: opening costs nothing per sealed segment.
    sealed_index: Mutex<Option<Arc<SealedIndex>>>,
}

/// Where a segment's time index is.
#[derive(Debug)]
enum TimeSlot {
    /// Not loaded (sealed), or not known (the segment was active at open).
    Unknown,
    /// Kept by the writer as batches are written.
    Active(TimeIndex),
    /// Sealed, and its newest timestamp read from the time index (the
    /// entries are read from the file when a search needs them).
    Sealed(u64),
}

#[derive(Debug)]
enum SealedIndex {
    /// The index file, mapped (header included) and verified.
    Mapped(Map),
    /// Rebuilt from the segment because the file was unusable.
    Built(Vec<IndexEntry>),
}

impl Segment {
    pub(crate) fn new(
        dir: &Path,
        base: u64,
        end: u64,
        data_len: u64,
        active_index: Vec<IndexEntry>,
    ) -> Segment {
        Segment {
            base,
            path: dir.join(segment::segment_name(base)),
            index_path: dir.join(segment::index_name(base)),
            end: AtomicU64::new(end),
            removed: std::sync::atomic::AtomicBool::new(false),
            data_len: AtomicU64::new(data_len),
            map: Mutex::new(None),
            handle: Mutex::new(None),
            size: AtomicU64::new(0),
            time: Mutex::new(TimeSlot::Unknown),
            active_index: RwLock::new(active_index),
            sealed_index: Mutex::new(None),
        }
    }

    /// Offset after the last record, or [`OPEN_END`] while active.
    pub(crate) fn end(&self) -> u64 {
        self.end.load(Ordering::Acquire)
    }

    pub(crate) fn seal(&self, end: u64) {
        *self.active_index.write().unwrap_or_else(|e| e.into_inner()) = Vec::new();
        self.end.store(end, Ordering::Release);
        // Readers keep the maps they hold; the next one maps the sealed file
        // afresh and goes through the bounded cache.
        self.map.lock().unwrap_or_else(|e| e.into_inner()).take();
        self.handle.lock().unwrap_or_else(|e| e.into_inner()).take();
    }

    /// Records that bytes below `len` are written (before they are published).
    pub(crate) fn set_data_len(&self, len: u64) {
        self.data_len.fetch_max(len, Ordering::Release);
    }

    /// The active segment's index entries (empty once sealed).
    pub(crate) fn active_entries(&self) -> Vec<IndexEntry> {
        self.active_index.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The writer starts keeping this (empty, new) segment's time index.
    pub(crate) fn start_time_index(&self) {
        *self.time.lock().unwrap_or_else(|e| e.into_inner()) = TimeSlot::Active(TimeIndex::default());
    }

    /// The writer notes a batch it wrote (see [`TimeIndex::note_batch`]).
    pub(crate) fn note_batch_time(&self, relative: u32, position: u32, newest: u64, indexed: bool) {
        if let TimeSlot::Active(ti) = &mut *self.time.lock().unwrap_or_else(|e| e.into_inner()) {
            ti.note_batch(relative, position, newest, indexed);
        }
    }

    /// On sealing: the time index the writer kept, if it kept one (its
    /// newest timestamp stays known).
    pub(crate) fn seal_time_index(&self) -> Option<TimeIndex> {
        let mut slot = self.time.lock().unwrap_or_else(|e| e.into_inner());
        match std::mem::replace(&mut *slot, TimeSlot::Unknown) {
            TimeSlot::Active(ti) => {
                *slot = TimeSlot::Sealed(ti.newest);
                Some(ti)
            }
            other => {
                *slot = other;
                None
            }
        }
    }

    pub(crate) fn push_index_entry(&self, entry: IndexEntry) {
        self.active_index.write().unwrap_or_else(|e| e.into_inner()).push(entry);
    }
}

/// The segments and the visible watermark.
#[derive(Debug)]
pub(crate) struct Log {
    pub dir: PathBuf,
    pub storage: Arc<dyn Storage>,
    segments: RwLock<Vec<Arc<Segment>>>,
    /// Offset after the last record readers may see.
    visible: AtomicU64,
    /// Offset after the last record an fdatasync covered (set before `visible`).
    durable: AtomicU64,
    /// Sealed segments whose maps are cached, oldest first; bounded by
    /// [`CACHED_MAPS_MAX`] so that a scan of a huge log holds neither heap
    /// nor map count in proportion to it.
    cached: Mutex<std::collections::VecDeque<Arc<Segment>>>,
    /// Serializes `remove_before`.
    retention: Mutex<()>,
    /// Wakes readers waiting at the tail (and group fetchers).
    pub(crate) tail: TailNotify,
    /// Bytes of the segment files, when tracked (retention by size and
    /// backpressure need it): see [`Log::track_bytes`].
    bytes: AtomicU64,
    /// Segments retention removed since open.
    removed: AtomicU64,
    /// Whether `bytes` is kept (sealed segments' sizes were read at open).
    tracking: std::sync::atomic::AtomicBool,
    /// Called after every roll (wakes retention).
    roll_hook: Mutex<Option<RollHook>>,
}

/// A callback run after each roll.
struct RollHook(Box<dyn Fn() + Send + Sync>);

impl std::fmt::Debug for RollHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RollHook")
    }
}

/// Wake-ups for whoever waits for the log to grow (or for a group's state to
/// change): blocking waiters on a condvar, async ones by waker. Publishing
/// costs one atomic load while nobody waits.
#[derive(Debug, Default)]
pub(crate) struct TailNotify {
    /// Blocked threads plus registered wakers.
    waiting: std::sync::atomic::AtomicUsize,
    wakers: Mutex<Vec<std::task::Waker>>,
    cond: std::sync::Condvar,
}

impl TailNotify {
    /// Wakes everyone waiting.
    pub(crate) fn wake_all(&self) {
        let wakers = {
            let mut w = self.wakers.lock().unwrap_or_else(|e| e.into_inner());
            self.cond.notify_all();
            std::mem::take(&mut *w)
        };
        if !wakers.is_empty() {
            self.waiting.fetch_sub(wakers.len(), Ordering::SeqCst);
        }
        for w in wakers {
            w.wake();
        }
    }

    /// Called after the state a waiter checks changed (and was stored SeqCst
    /// or followed by a SeqCst fence): wakes waiters, if any.
    pub(crate) fn notify(&self) {
        std::sync::atomic::fence(Ordering::SeqCst);
        if self.waiting.load(Ordering::SeqCst) > 0 {
            self.wake_all();
        }
    }

    /// Blocks until `ready()` is true (returns true) or `deadline` passes
    /// (returns false). `ready` is checked under the lock a notifier takes,
    /// so no wake-up is lost.
    pub(crate) fn wait_until(&self, deadline: std::time::Instant, mut ready: impl FnMut() -> bool) -> bool {
        if ready() {
            return true;
        }
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let mut guard = self.wakers.lock().unwrap_or_else(|e| e.into_inner());
        let result = loop {
            std::sync::atomic::fence(Ordering::SeqCst);
            if ready() {
                break true;
            }
            let now = std::time::Instant::now();
            if now >= deadline {
                break false;
            }
            guard = self.cond.wait_timeout(guard, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
        };
        drop(guard);
        self.waiting.fetch_sub(1, Ordering::SeqCst);
        result
    }

    /// Registers an async waker, then re-checks `ready` (so a change between
    /// the caller's check and the registration is not lost). Returns `ready()`.
    #[cfg_attr(not(feature = "async"), allow(dead_code))]
    pub(crate) fn register(&self, waker: &std::task::Waker, ready: impl FnOnce() -> bool) -> bool {
        {
            let mut w = self.wakers.lock().unwrap_or_else(|e| e.into_inner());
            if !w.iter().any(|x| x.will_wake(waker)) {
                w.push(waker.clone());
                self.waiting.fetch_add(1, Ordering::SeqCst);
            }
        }
        std::sync::atomic::fence(Ordering::SeqCst);
        ready()
    }
}

/// Sealed segments whose maps (segment and index) stay cached for new readers;
/// readers keep their own `Arc` to a map, so eviction never pulls one away.
pub(crate) const CACHED_MAPS_MAX: usize = 64;

impl Log {
    pub(crate) fn new(
        dir: PathBuf,
        storage: Arc<dyn Storage>,
        segments: Vec<Arc<Segment>>,
        visible: u64,
    ) -> Log {
        Log {
            dir,
            storage,
            segments: RwLock::new(segments),
            visible: AtomicU64::new(visible),
            durable: AtomicU64::new(visible),
            cached: Mutex::new(std::collections::VecDeque::new()),
            retention: Mutex::new(()),
            tail: TailNotify::default(),
            bytes: AtomicU64::new(0),
            removed: AtomicU64::new(0),
            tracking: std::sync::atomic::AtomicBool::new(false),
            roll_hook: Mutex::new(None),
        }
    }

    pub(crate) fn visible(&self) -> u64 {
        self.visible.load(Ordering::Acquire)
    }

    /// Offset after the last record an fdatasync covered.
    pub(crate) fn durable(&self) -> u64 {
        self.durable.load(Ordering::Acquire)
    }

    /// Records that offsets below `next` are durable (before publishing them).
    pub(crate) fn set_durable(&self, next: u64) {
        self.durable.fetch_max(next, Ordering::Release);
    }

    /// Makes offsets below `next` visible. Every byte of those records must
    /// already be in the file (Release pairs with readers' Acquire).
    pub(crate) fn publish(&self, next: u64) {
        if self.visible.fetch_max(next, Ordering::SeqCst) < next {
            self.tail.notify();
        }
    }

    fn read_segments(&self) -> std::sync::RwLockReadGuard<'_, Vec<Arc<Segment>>> {
        self.segments.read().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn first_offset(&self) -> u64 {
        self.read_segments().first().map_or(0, |s| s.base)
    }

    pub(crate) fn segment_count(&self) -> usize {
        self.read_segments().len()
    }

    /// The segment whose range holds `offset` (the last one with base <= offset).
    pub(crate) fn segment_for(&self, offset: u64) -> Option<Arc<Segment>> {
        let segs = self.read_segments();
        let i = segs.partition_point(|s| s.base <= offset);
        if i == 0 { None } else { Some(Arc::clone(&segs[i - 1])) }
    }

    pub(crate) fn push_segment(&self, seg: Arc<Segment>) {
        self.segments.write().unwrap_or_else(|e| e.into_inner()).push(seg);
        if let Some(hook) = self.roll_hook.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            (hook.0)();
        }
    }

    /// Counts a just-sealed segment's file length in the tracked bytes.
    pub(crate) fn count_sealed(&self, seg: &Segment, file_len: u64) {
        if self.tracking.load(Ordering::Acquire) && seg.size.swap(file_len, Ordering::AcqRel) == 0 {
            self.bytes.fetch_add(file_len, Ordering::AcqRel);
        }
    }

    /// Starts keeping [`total_bytes`](Log::total_bytes): reads the length of
    /// every sealed segment (one stat each; only when retention by size or
    /// backpressure is configured).
    pub(crate) fn track_bytes(&self) -> Result<()> {
        let segs: Vec<Arc<Segment>> = self.read_segments().clone();
        for seg in segs.iter().filter(|s| s.end() != OPEN_END) {
            let len = self.open_segment(seg)?.len().map_err(|e| Error::io("stat", &seg.path, e))?;
            if seg.size.swap(len.max(1), Ordering::AcqRel) == 0 {
                self.bytes.fetch_add(len.max(1), Ordering::AcqRel);
            }
        }
        self.tracking.store(true, Ordering::Release);
        Ok(())
    }

    /// Bytes of the sealed segment files plus the active segment's written
    /// bytes (0 unless [`track_bytes`](Log::track_bytes) was called).
    pub(crate) fn total_bytes(&self) -> u64 {
        if !self.tracking.load(Ordering::Acquire) {
            return 0;
        }
        let active = self.read_segments().last().map_or(0, |s| s.data_len.load(Ordering::Acquire));
        self.bytes.load(Ordering::Acquire) + active
    }

    /// Segments retention removed since open.
    pub(crate) fn segments_removed(&self) -> u64 {
        self.removed.load(Ordering::Acquire)
    }

    pub(crate) fn set_roll_hook(&self, hook: Box<dyn Fn() + Send + Sync>) {
        *self.roll_hook.lock().unwrap_or_else(|e| e.into_inner()) = Some(RollHook(hook));
    }

    /// The newest record timestamp of a segment (0 when it has none), from
    /// its time index (kept in memory once read: 8 bytes per segment).
    pub(crate) fn newest_timestamp(&self, seg: &Arc<Segment>) -> Result<u64> {
        {
            let slot = seg.time.lock().unwrap_or_else(|e| e.into_inner());
            match &*slot {
                TimeSlot::Active(ti) => return Ok(ti.newest),
                TimeSlot::Sealed(newest) => return Ok(*newest),
                TimeSlot::Unknown => {}
            }
        }
        Ok(self.load_time_index(seg)?.newest)
    }

    /// Where in `seg` to start scanning for the first record at or after
    /// `ms`, as an offset.
    fn time_start_in(&self, seg: &Arc<Segment>, ms: u64) -> Result<u64> {
        let relative = {
            let slot = seg.time.lock().unwrap_or_else(|e| e.into_inner());
            match &*slot {
                TimeSlot::Active(ti) => Some(ti.start_for(ms).0),
                _ => None,
            }
        };
        let relative = match relative {
            Some(r) => r,
            None => self.load_time_index(seg)?.start_for(ms).0,
        };
        Ok(seg.base + relative as u64)
    }

    /// Reads `seg`'s time index: its file, or, when that is missing or
    /// unusable, one rebuilt from the segment (and rewritten). A segment that
    /// was active at open has no file: it is built from the written data.
    /// Remembers the newest timestamp of a sealed segment.
    fn load_time_index(&self, seg: &Arc<Segment>) -> Result<TimeIndex> {
        if seg.end() == OPEN_END {
            let len = seg.data_len.load(Ordering::Acquire);
            let map = self.map(seg, len, None)?;
            return Ok(TimeIndex::build(
                &map[..(len as usize).min(map.len())],
                seg.base,
                index::INDEX_INTERVAL_BYTES,
            )
            .0);
        }
        let path = self.dir.join(timeindex::time_index_name(seg.base));
        let from_file = self.storage.open_read(&path).ok().and_then(|file| {
            let len = usize::try_from(file.len().ok()?).ok()?;
            let mut bytes = vec![0u8; len];
            crate::fs::read_exact_at(file.as_ref(), &mut bytes, 0).ok()?;
            TimeIndex::decode(&bytes, seg.base)
        });
        let ti = match from_file {
            Some(ti) => ti,
            None => {
                tracing::debug!(segment = %seg.path.display(), "time index missing or unusable, rebuilding it");
                let map = self.map(seg, 0, None)?;
                let (ti, reached) = TimeIndex::build(&map, seg.base, index::INDEX_INTERVAL_BYTES);
                if reached != seg.end() {
                    // Never a confident wrong answer from a damaged segment.
                    return Err(Error::corrupt(
                        &seg.path,
                        0,
                        format!("sealed segment stops at offset {reached} before {}", seg.end()),
                    ));
                }
                if let Err(e) = timeindex::write(self.storage.as_ref(), &self.dir, seg.base, &ti) {
                    tracing::warn!(segment = %seg.path.display(), error = %e, "could not write the rebuilt time index");
                }
                ti
            }
        };
        *seg.time.lock().unwrap_or_else(|e| e.into_inner()) = TimeSlot::Sealed(ti.newest);
        Ok(ti)
    }

    /// The offset to start scanning at for the first record whose timestamp
    /// is at or after `ms`: in the first segment whose newest record is at
    /// least `ms` (every record before it is older), the point its time index
    /// gives. `None` if no record is that new. As Kafka does, the segments'
    /// newest timestamps are compared in order (correct even when timestamps
    /// go backwards); each is read once and then kept.
    pub(crate) fn time_search_start(&self, ms: u64) -> Result<Option<u64>> {
        let segs: Vec<Arc<Segment>> = self.read_segments().clone();
        for seg in &segs {
            if self.newest_timestamp(seg)? >= ms {
                return self.time_start_in(seg, ms).map(Some);
            }
        }
        Ok(None)
    }

    /// A map of at least `min_len` bytes of `seg` (remapping an active
    /// segment that grew). Never maps past what exists.
    ///
    /// `via` is the caller's own handle of the file, if it has one: it keeps
    /// working after retention unlinked the file, where opening by path fails.
    pub(crate) fn map(
        &self,
        seg: &Arc<Segment>,
        min_len: u64,
        via: Option<&Arc<dyn StorageFile>>,
    ) -> Result<Arc<Map>> {
        let mut cached = seg.map.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(m) = cached.as_ref() {
            if m.len() as u64 >= min_len {
                return Ok(Arc::clone(m));
            }
            // An active segment that grew within what the map already covers
            // (the file is mapped ahead, preallocated zeros included): a wider
            // view of the same mapping, no syscall.
            let written = seg.data_len.load(Ordering::Acquire);
            if seg.end() == OPEN_END
                && written >= min_len
                && let Some(g) = usize::try_from(written).ok().and_then(|w| m.grown(w))
            {
                let g = Arc::new(g);
                cached.replace(Arc::clone(&g));
                return Ok(g);
            }
        }
        let file = match via {
            Some(f) => Arc::clone(f),
            None if seg.end() == OPEN_END => self.active_handle(seg)?,
            None => self.open_segment(seg)?,
        };
        // A sealed segment is never written again: all of it may be mapped.
        let len = match seg.end() {
            OPEN_END => seg.data_len.load(Ordering::Acquire),
            _ => file.len().map_err(|e| Error::io("stat", &seg.path, e))?,
        };
        if len < min_len.max(SEGMENT_HEADER_LEN as u64) {
            return Err(Error::corrupt(&seg.path, len, format!("segment ends before byte {min_len}")));
        }
        let len =
            usize::try_from(len).map_err(|_| Error::corrupt(&seg.path, 0, "segment too large to map"))?;
        let map = Arc::new(file.map(len).map_err(|e| Error::io("mmap", &seg.path, e))?);
        // Sealed segments' headers are checked here, on first use, not at open.
        match segment::decode_header(&map, &seg.path)? {
            segment::HeaderCheck::Valid(b) if b == seg.base => {}
            _ => return Err(Error::corrupt(&seg.path, 0, "segment header missing or for another offset")),
        }
        if seg.removed.load(Ordering::Acquire) {
            return Ok(map);
        }
        let first_map = cached.replace(Arc::clone(&map)).is_none();
        drop(cached);
        if first_map && seg.end() != OPEN_END {
            self.remember(seg);
        }
        Ok(map)
    }

    /// A read handle of a segment file.
    pub(crate) fn open_segment(&self, seg: &Segment) -> Result<Arc<dyn StorageFile>> {
        self.storage.open_read(&seg.path).map_err(|e| Error::io("open", &seg.path, e))
    }

    /// A read handle of the active segment's file, opened once and shared
    /// while the segment is active (a reader keeps its clone after the seal).
    pub(crate) fn active_handle(&self, seg: &Segment) -> Result<Arc<dyn StorageFile>> {
        let mut cached = seg.handle.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(h) = cached.as_ref() {
            return Ok(Arc::clone(h));
        }
        let h = self.open_segment(seg)?;
        if seg.end() == OPEN_END {
            cached.replace(Arc::clone(&h));
        }
        Ok(h)
    }

    /// Notes a newly cached sealed segment; evicts the oldest past the bound.
    fn remember(&self, seg: &Arc<Segment>) {
        let evicted = {
            let mut lru = self.cached.lock().unwrap_or_else(|e| e.into_inner());
            lru.push_back(Arc::clone(seg));
            if lru.len() > CACHED_MAPS_MAX { lru.pop_front() } else { None }
        };
        if let Some(old) = evicted {
            old.map.lock().unwrap_or_else(|e| e.into_inner()).take();
            old.sealed_index.lock().unwrap_or_else(|e| e.into_inner()).take();
        }
    }

    /// The position of the batch at or before `offset` in `seg` that the index
    /// knows of (the segment's first batch when none), with its base offset.
    /// A sealed segment's index fails only when rebuilding it shows that the
    /// segment itself is damaged (it ends before the next segment begins).
    pub(crate) fn seek_hint(&self, seg: &Segment, offset: u64) -> Result<(u64, u64)> {
        let start = (SEGMENT_HEADER_LEN as u64, seg.base);
        let Ok(relative) = u32::try_from(offset - seg.base) else { return Ok(start) };
        let found = if seg.end() == OPEN_END {
            index::floor_in(&seg.active_index.read().unwrap_or_else(|e| e.into_inner()), relative)
        } else {
            let sealed = {
                let mut slot = seg.sealed_index.lock().unwrap_or_else(|e| e.into_inner());
                match slot.as_ref() {
                    Some(s) => Arc::clone(s),
                    None => Arc::clone(slot.insert(Arc::new(self.load_sealed_index(seg)?))),
                }
            };
            match sealed.as_ref() {
                SealedIndex::Mapped(m) => index::floor_in_body(&m[INDEX_HEADER_LEN..], relative),
                SealedIndex::Built(v) => index::floor_in(v, relative),
            }
        };
        Ok(found.map_or(start, |e| (e.position as u64, seg.base + e.relative as u64)))
    }

    /// Maps and verifies a sealed index; rebuilds it from the segment when it
    /// is unusable (missing, short, stale, corrupt) and rewrites the file.
    /// The rebuild is where a damaged sealed segment (truncated, or followed
    /// by a missing one) is found: it is `Error::Corrupt`.
    fn load_sealed_index(&self, seg: &Segment) -> Result<SealedIndex> {
        let mapped = (|| -> Result<Option<Map>> {
            let f =
                self.storage.open_read(&seg.index_path).map_err(|e| Error::io("open", &seg.index_path, e))?;
            let len = f.len().map_err(|e| Error::io("stat", &seg.index_path, e))?;
            let map = f.map(len as usize).map_err(|e| Error::io("mmap", &seg.index_path, e))?;
            match index::check_sealed(&map, seg.base, &seg.index_path)? {
                Ok(info) if info.next_offset == seg.end() => Ok(Some(map)),
                _ => Ok(None),
            }
        })();
        match mapped {
            Ok(Some(map)) => return Ok(SealedIndex::Mapped(map)),
            Err(e @ Error::UnsupportedFormat { .. }) => return Err(e),
            _ => {}
        }
        tracing::warn!(index = %seg.index_path.display(), "index unusable, rebuilding it from its segment");
        let entries = rebuild_index(self.storage.as_ref(), &self.dir, seg.base, &seg.path, Some(seg.end()))?;
        Ok(SealedIndex::Built(entries))
    }

    /// Removes whole sealed segments, oldest first (so a crash midway never
    /// leaves a hole), while `remove(segment, total_bytes)` says so. Returns
    /// how many went. The active segment is never removed.
    pub(crate) fn remove_oldest_while(
        &self,
        mut remove: impl FnMut(&Arc<Segment>, u64) -> Result<bool>,
    ) -> Result<usize> {
        // One retention at a time: choosing and removing the oldest segment
        // must not interleave with another caller's.
        let _one = self.retention.lock().unwrap_or_else(|e| e.into_inner());
        let mut removed = 0;
        loop {
            let candidate = {
                let segs = self.read_segments();
                match segs.first() {
                    Some(s) if segs.len() > 1 && s.end() != OPEN_END => Arc::clone(s),
                    _ => break,
                }
            };
            // Decided without the list locked (it may read the segment).
            if !remove(&candidate, self.total_bytes())? {
                break;
            }
            {
                // Drop it from the list first: new readers stop finding it, old ones keep their map.
                let mut segs = self.segments.write().unwrap_or_else(|e| e.into_inner());
                if segs.first().is_none_or(|s| !Arc::ptr_eq(s, &candidate)) {
                    break;
                }
                segs.remove(0);
            }
            let victim = candidate;
            // Its cached maps would keep the deleted file's blocks allocated.
            victim.removed.store(true, Ordering::Release);
            self.cached.lock().unwrap_or_else(|e| e.into_inner()).retain(|s| !Arc::ptr_eq(s, &victim));
            victim.map.lock().unwrap_or_else(|e| e.into_inner()).take();
            victim.sealed_index.lock().unwrap_or_else(|e| e.into_inner()).take();
            if let Err(e) = self.remove_files(&victim) {
                // Still (partly) on disk: put it back at the front, so that the
                // next retention retries it before anything newer. Removing a
                // newer segment while this one stays would leave a hole.
                victim.removed.store(false, Ordering::Release);
                self.segments.write().unwrap_or_else(|e| e.into_inner()).insert(0, Arc::clone(&victim));
                return Err(e);
            }
            let size = victim.size.swap(0, Ordering::AcqRel);
            self.bytes.fetch_sub(size.min(self.bytes.load(Ordering::Acquire)), Ordering::AcqRel);
            self.removed.fetch_add(1, Ordering::AcqRel);
            removed += 1;
            // Appenders waiting for room (backpressure) look again.
            self.tail.wake_all();
        }
        Ok(removed)
    }
}

impl Log {
    /// Deletes a segment's files: the indexes first (a segment without them
    /// rebuilds them, an index without its segment is removed on the next
    /// open), then the segment, then syncs the directory.
    fn remove_files(&self, victim: &Segment) -> Result<()> {
        let storage = self.storage.as_ref();
        let tix = self.dir.join(timeindex::time_index_name(victim.base));
        // NotFound: an earlier attempt that failed later already removed it.
        for file in [&tix, &victim.index_path, &victim.path] {
            if let Err(e) = storage.remove_file(file)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                return Err(Error::io("remove", file, e));
            }
        }
        storage.sync_dir(&self.dir).map_err(|e| Error::io("fsync", &self.dir, e))
    }
}

/// Scans a whole segment to rebuild its index, writes it as a sealed index
/// (temp file, sync, rename) and returns the entries. `expected_end`, when
/// known, is the offset the segment must reach; falling short is corruption.
pub(crate) fn rebuild_index(
    storage: &dyn Storage,
    dir: &Path,
    base: u64,
    path: &Path,
    expected_end: Option<u64>,
) -> Result<Vec<IndexEntry>> {
    let file = storage.open_read(path).map_err(|e| Error::io("open", path, e))?;
    let len = file.len().map_err(|e| Error::io("stat", path, e))?;
    let scan = segment::scan(
        file.as_ref(),
        path,
        base,
        SEGMENT_HEADER_LEN as u64,
        base,
        len,
        SEGMENT_HEADER_LEN as u64,
    )?;
    if let Some(end) = expected_end
        && scan.next_offset != end
    {
        let (pos, why) = match &scan.stop {
            Some((p, e)) => (*p, e.to_string()),
            None => (scan.end, "segment ends early".to_string()),
        };
        return Err(Error::corrupt(
            path,
            pos,
            format!("sealed segment stops at offset {} before {end}: {why}", scan.next_offset),
        ));
    }
    let data_len = u32::try_from(scan.end).map_err(|_| Error::corrupt(path, scan.end, "segment too long"))?;
    // The entries are good whether or not the cache file can be written now.
    if let Err(e) = write_sealed_index(storage, dir, base, &scan.entries, scan.next_offset, data_len) {
        tracing::warn!(segment = %path.display(), error = %e, "could not write the rebuilt index");
    }
    Ok(scan.entries)
}

/// Writes a sealed index atomically: temp file, fdatasync, rename. The caller
/// syncs the directory when the rename must be durable (an index is a cache,
/// so usually it need not be).
pub(crate) fn write_sealed_index(
    storage: &dyn Storage,
    dir: &Path,
    base: u64,
    entries: &[IndexEntry],
    next_offset: u64,
    data_len: u32,
) -> Result<()> {
    let bytes = index::encode_file(base, entries, Some((next_offset, data_len)));
    write_file_atomic(storage, dir, &segment::index_name(base), &bytes)
}

/// Replaces `dir/name` with `bytes` through a synced temp file and a rename.
pub(crate) fn write_file_atomic(storage: &dyn Storage, dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    let tmp = dir.join(format!("{name}{TEMP_SUFFIX}"));
    let dest = dir.join(name);
    let f = storage.open(&tmp, true).map_err(|e| Error::io("create", &tmp, e))?;
    f.set_len(0).map_err(|e| Error::io("truncate", &tmp, e))?;
    write_all_at(f.as_ref(), bytes, 0).map_err(|e| Error::io("write", &tmp, e))?;
    f.sync_data().map_err(|e| Error::io("fdatasync", &tmp, e))?;
    drop(f);
    storage.rename(&tmp, &dest).map_err(|e| Error::io("rename", &dest, e))
}

/// Creates an empty segment (header, then `preallocate` zeroed bytes) and its
/// index, and syncs both and the directory: nothing may be acknowledged in a
/// segment whose directory entry could still vanish. Returns the segment file
/// and its length.
pub(crate) fn create_segment(
    storage: &dyn Storage,
    dir: &Path,
    base: u64,
    preallocate: u64,
) -> Result<(Arc<dyn StorageFile>, u64)> {
    /// Zeros written per call, at most.
    const ZERO_CHUNK_BYTES: u64 = 1 << 20;
    let path = dir.join(segment::segment_name(base));
    let file = storage.open(&path, true).map_err(|e| Error::io("create", &path, e))?;
    file.set_len(0).map_err(|e| Error::io("truncate", &path, e))?;
    write_all_at(file.as_ref(), &segment::encode_header(base), 0)
        .map_err(|e| Error::io("write", &path, e))?;
    let mut at = SEGMENT_HEADER_LEN as u64;
    let end = at + preallocate;
    let zeros = vec![0u8; preallocate.min(ZERO_CHUNK_BYTES) as usize];
    while at < end {
        let n = (end - at).min(ZERO_CHUNK_BYTES);
        write_all_at(file.as_ref(), &zeros[..n as usize], at)
            .map_err(|e| Error::io("preallocate", &path, e))?;
        at += n;
    }
    file.sync_data().map_err(|e| Error::io("fdatasync", &path, e))?;
    let bytes = index::encode_file(base, &[], None);
    write_file_atomic(storage, dir, &segment::index_name(base), &bytes)?;
    storage.sync_dir(dir).map_err(|e| Error::io("fsync", dir, e))?;
    Ok((file, end))
}
