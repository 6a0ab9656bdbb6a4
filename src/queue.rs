//! The public [`Queue`]: opens and recovers a directory, appends through group
//! commit (`flush.rs`), hands out readers, and stops the background flusher
//! on close. It wires the modules together and has no algorithm of its own.

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

use crate::clock::Clock;
use crate::config::{Durability, QueueBuilder, Retention, WhenFull};
use crate::consumer::{Consumer, ConsumerInfo, StartAt};
use crate::error::{Error, Result};
use crate::flush::{Flush, FlushConfig};
use crate::fs::DirLock;
use crate::group::{GroupBuilder, GroupInfo};
use crate::journal::{Entry, Journal, check_name};
use crate::log::Log;
use crate::reader::Reader;
use crate::record::Record;
use crate::recovery::{self, RecoveryReport};
use crate::writer::{Writer, WriterConfig};

/// A durable, append-only queue in one directory.
///
/// `Queue` is `Send + Sync`: share it behind an `Arc` among threads. Durable
/// appends from many threads (or async tasks) share each fdatasync (group
/// commit); readers never block appends and read straight out of read-only
/// maps of the segment files.
///
/// ```
/// let dir = tempfile::tempdir()?;
/// let queue = walq::Queue::open(dir.path())?;
/// let first = queue.append(b"hello")?;      // durable when this returns
/// queue.append(b"world")?;
/// let mut reader = queue.read_from(first)?;
/// while let Some(record) = reader.next()? {
///     println!("{} {:?}", record.offset(), record.value());
/// }
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct Queue {
    flush: Arc<Flush>,
    log: Arc<Log>,
    core: Arc<Core>,
    durability: Durability,
    report: RecoveryReport,
    /// The options it was opened with (dead-letter queues copy them).
    options: QueueBuilder,
}

/// What consumers and groups share with the queue, and outlive it with: the
/// directory lock is released when the queue and every consumer and group
/// of it are dropped.
#[derive(Debug)]
pub(crate) struct Core {
    pub log: Arc<Log>,
    pub journal: Journal,
    pub clock: Clock,
    pub retention: Retention,
    /// Names of the open consumers (one handle per name).
    pub open_consumers: Mutex<HashSet<String>>,
    /// Open groups (one shared state per name).
    pub groups: Mutex<HashMap<String, Weak<crate::group::Shared>>>,
    housekeeping: Arc<Housekeeping>,
    housekeeper: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// The queue handle plus open consumers and groups: the housekeeping
    /// thread runs until the last of them is dropped.
    users: std::sync::atomic::AtomicUsize,
    _lock: Box<dyn DirLock>,
}

/// Wakes the housekeeping thread (retention, syncing `Interval` commits and acks).
#[derive(Debug, Default)]
struct Housekeeping {
    state: Mutex<HousekeepingState>,
    cond: Condvar,
}

#[derive(Debug, Default)]
struct HousekeepingState {
    stop: bool,
    /// Journal entries were buffered: recompute when they are due.
    journal: bool,
    /// Positions moved or a segment rolled: apply retention now.
    retention: bool,
}

/// How often the housekeeping thread looks at retention with nothing else to do.
const RETENTION_TICK: Duration = Duration::from_secs(1);

impl Core {
    /// The offset a new consumer or group starts at.
    pub(crate) fn resolve_start(&self, start: StartAt) -> Result<u64> {
        let (first, next) = (self.log.first_offset(), self.log.visible());
        match start {
            StartAt::Earliest => Ok(first),
            StartAt::Latest => Ok(next),
            StartAt::Offset(o) if (first..=next).contains(&o) => Ok(o),
            StartAt::Offset(o) => Err(Error::OffsetOutOfRange { offset: o, first, next }),
            StartAt::Timestamp(ms) => self.offset_for_timestamp(ms),
        }
    }

    /// The first offset whose record's timestamp is at or after `ms` (the
    /// log's end if none is).
    pub(crate) fn offset_for_timestamp(&self, ms: u64) -> Result<u64> {
        let next = self.log.visible();
        let Some(start) = self.log.time_search_start(ms)? else { return Ok(next) };
        let mut reader =
            crate::reader::Reader::new(Arc::clone(&self.log), start.max(self.log.first_offset()));
        while let Some(r) = reader.next()? {
            if r.timestamp_ms() >= ms {
                return Ok(r.offset());
            }
        }
        Ok(next)
    }

    /// Tells the housekeeping thread there is work (a commit or ack to sync,
    /// a position that moved, a segment rolled).
    pub(crate) fn housekeeping_due(&self) {
        let mut st = self.housekeeping.state.lock().unwrap_or_else(|e| e.into_inner());
        if !st.journal {
            st.journal = true;
            self.housekeeping.cond.notify_one();
        }
    }

    /// Tells the housekeeping thread that retention may have work (a
    /// position moved, a consumer went, a segment rolled).
    pub(crate) fn retention_due(&self) {
        if !self.retention.is_active() {
            return;
        }
        let mut st = self.housekeeping.state.lock().unwrap_or_else(|e| e.into_inner());
        if !st.retention {
            st.retention = true;
            self.housekeeping.cond.notify_one();
        }
    }

    /// The lowest position a consumer or group still needs (queue mode).
    fn needed(&self) -> Option<u64> {
        self.journal.with_image(|img| {
            img.consumers.values().copied().chain(img.groups.values().map(|g| g.floor)).min()
        })
    }

    /// Removes what the retention policy says may go; returns how many segments.
    pub(crate) fn apply_retention(&self) -> Result<usize> {
        let r = self.retention;
        if !r.is_active() {
            return Ok(0);
        }
        let needed = if r.queue_mode { self.needed() } else { None };
        let now = self.clock.now_ms();
        let log = &self.log;
        let removed = log.remove_oldest_while(|seg, total| {
            if let Some(n) = needed
                && seg.end() > n
            {
                return Ok(false); // a consumer or group still needs it
            }
            if r.queue_mode && needed.is_some() {
                return Ok(true); // every consumer and group is past it
            }
            if r.max_bytes.is_some_and(|max| total > max) {
                return Ok(true);
            }
            if let Some(age) = r.max_age {
                let newest = log.newest_timestamp(seg)?;
                return Ok(newest.saturating_add(age.as_millis() as u64) < now);
            }
            Ok(false)
        })?;
        if removed > 0 {
            tracing::info!(dir = %log.dir.display(), removed, first_offset = log.first_offset(), "retention removed segments");
        }
        Ok(removed)
    }

    /// Starts the housekeeping thread if it is not running (and the queue
    /// is not closing).
    pub(crate) fn ensure_housekeeping(self: &Arc<Self>) -> Result<()> {
        let mut slot = self.housekeeper.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_some() || self.housekeeping.state.lock().unwrap_or_else(|e| e.into_inner()).stop {
            return Ok(());
        }
        let (core, hk) = (Arc::downgrade(self), Arc::clone(&self.housekeeping));
        let handle = std::thread::Builder::new()
            .name("walq-housekeeping".into())
            .spawn(move || Core::housekeep(core, hk))
            .map_err(|e| Error::io("spawn housekeeping thread", &self.log.dir, e))?;
        *slot = Some(handle);
        Ok(())
    }

    /// A consumer or group starts using the core (see `users`).
    pub(crate) fn add_user(&self) {
        self.users.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }

    /// The queue, a consumer or a group is done with the core; the last one
    /// stops the housekeeping thread (and waits for it, so that it holds no
    /// reference that would keep the directory locked).
    pub(crate) fn release_user(&self) {
        if self.users.fetch_sub(1, std::sync::atomic::Ordering::AcqRel) == 1 {
            self.stop_housekeeping();
        }
    }

    /// Stops the housekeeping thread and waits for it (so that it holds no
    /// reference that would keep the directory locked).
    fn stop_housekeeping(&self) {
        {
            let mut st = self.housekeeping.state.lock().unwrap_or_else(|e| e.into_inner());
            st.stop = true;
            self.housekeeping.cond.notify_all();
        }
        let handle = self.housekeeper.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(h) = handle
            && h.thread().id() != std::thread::current().id()
        {
            let _ = h.join();
        }
    }

    /// The housekeeping thread: syncs `Interval` journal entries when due,
    /// and applies retention after rolls, commits and once a second. Holds
    /// the core only while working, never while waiting.
    fn housekeep(core: Weak<Core>, hk: Arc<Housekeeping>) {
        let mut next_retention = Instant::now();
        loop {
            let wake = {
                let Some(c) = core.upgrade() else { return };
                let journal_due = match c.journal.flush_due() {
                    Ok(due) => due,
                    Err(e) => {
                        tracing::error!(error = %e, "could not sync consumer commits or acks; retrying");
                        Some(Instant::now() + Duration::from_millis(100))
                    }
                };
                let now = Instant::now();
                if c.retention.is_active() && now >= next_retention {
                    if let Err(e) = c.apply_retention() {
                        tracing::error!(error = %e, "retention failed; retrying in a second");
                    }
                    next_retention = now + RETENTION_TICK;
                }
                let mut wake = if c.retention.is_active() { next_retention } else { now + RETENTION_TICK };
                if let Some(t) = journal_due {
                    wake = wake.min(t);
                }
                wake
            };
            let mut st = hk.state.lock().unwrap_or_else(|e| e.into_inner());
            while !st.stop && !st.journal && !st.retention {
                let now = Instant::now();
                if now >= wake {
                    break;
                }
                st = hk.cond.wait_timeout(st, wake - now).unwrap_or_else(|e| e.into_inner()).0;
            }
            if st.stop {
                return;
            }
            st.journal = false;
            if std::mem::take(&mut st.retention) {
                next_retention = Instant::now();
            }
        }
    }
}

impl Drop for Core {
    fn drop(&mut self) {
        self.stop_housekeeping();
        if let Err(e) = self.journal.flush(true) {
            tracing::error!(error = %e, "could not sync consumer commits and acks on close");
        }
    }
}

/// Figures about a queue at one instant.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
#[non_exhaustive]
pub struct Stats {
    /// Records appended since the queue was opened.
    pub appends: u64,
    /// Value bytes appended since the queue was opened.
    pub bytes: u64,
    /// Batches written.
    pub batches: u64,
    /// fdatasync calls on segment data.
    pub syncs: u64,
    /// Segment rolls.
    pub rolls: u64,
    /// Records the syncs covered, on average (group commit at work).
    pub records_per_sync_mean: f64,
    /// Records the last sync covered.
    pub records_per_sync_last: u64,
    /// Latency of one flush round (writes and fdatasync) over the last
    /// 1024 syncs, in microseconds: p50, p99, max.
    pub sync_micros_p50: u32,
    /// See `sync_micros_p50`.
    pub sync_micros_p99: u32,
    /// See `sync_micros_p50`.
    pub sync_micros_max: u32,
    /// The first offset held.
    pub first_offset: u64,
    /// The offset the next append gets.
    pub next_offset: u64,
    /// Offset after the last record written to the OS.
    pub written_offset: u64,
    /// Offset after the last record an fdatasync covered.
    pub durable_offset: u64,
    /// Offset after the last record readers can see.
    pub visible_offset: u64,
    /// Segments in the log.
    pub segments: usize,
    /// Whether a failed write or sync poisoned the queue.
    pub poisoned: bool,
    /// Segments retention removed since open.
    pub segments_removed: u64,
    /// Bytes of the segment files (tracked when retention by size or
    /// `max_bytes` is set; 0 otherwise).
    pub bytes_on_disk: u64,
    /// Whether the consumer journal was damaged at open (positions fell back
    /// to its last valid entry; see the log).
    pub consumer_journal_damaged: bool,
    /// Every flush round (writes and fdatasync) since open, counted by
    /// latency: bucket `i` holds rounds of at most
    /// [`SYNC_HISTOGRAM_BOUNDS_MICROS`](crate::SYNC_HISTOGRAM_BOUNDS_MICROS)`[i]`
    /// microseconds (and above the previous bound); the last bucket, the rest.
    /// Not cumulative; a Prometheus exporter sums them.
    pub sync_histogram: [u64; 13],
    /// The sum of every flush round's latency since open, in microseconds
    /// (a histogram's `_sum`).
    pub sync_micros_total: u64,
}

impl Queue {
    /// Opens (creating if needed) the queue in `dir` with default options:
    /// durable appends, 64 MiB segments, records up to 1 MiB.
    pub fn open(dir: impl AsRef<Path>) -> Result<Queue> {
        QueueBuilder::new(dir.as_ref()).open()
    }

    /// Options for opening the queue in `dir`.
    pub fn builder(dir: impl AsRef<Path>) -> QueueBuilder {
        QueueBuilder::new(dir.as_ref())
    }

    pub(crate) fn open_with(b: QueueBuilder) -> Result<Queue> {
        let rec = recovery::recover(
            b.storage.as_ref(),
            &b.dir,
            b.create,
            b.preallocate_bytes.min(b.segment_bytes),
        )?;
        let next = rec.active.next_offset;
        let log = Arc::new(Log::new(b.dir.clone(), Arc::clone(&b.storage), rec.segments, next));
        let io_cfg = WriterConfig {
            segment_bytes: b.segment_bytes,
            preallocate_bytes: b.preallocate_bytes,
            pad_to_sectors: b.pad_to_sectors,
            publish_durable_only: b.durability == Durability::Sync,
        };
        let flush_cfg = FlushConfig {
            max_record_bytes: b.max_record_bytes,
            write_buffer_bytes: b.write_buffer_bytes,
            batch_bytes_max: b.batch_bytes_max,
            linger: b.linger,
            producers_lead: b.producers_lead,
            clock: b.clock.clone(),
        };
        let journal = Journal::load(Arc::clone(&b.storage), &b.dir, next)?;
        if journal.needs_persist() {
            // Positions above the recovered log end were lowered: save that
            // now, or a restart before the next commit would raise them again
            // over records appended meanwhile.
            journal.persist()?;
        }
        if b.retention.max_bytes.is_some() || b.max_bytes.is_some() {
            log.track_bytes()?;
        }
        let flush = Arc::new(Flush::new(Writer::new(Arc::clone(&log), io_cfg, rec.active), flush_cfg));
        let core = Arc::new(Core {
            log: Arc::clone(&log),
            journal,
            clock: b.clock.clone(),
            retention: b.retention,
            open_consumers: Mutex::new(HashSet::new()),
            groups: Mutex::new(HashMap::new()),
            housekeeping: Arc::new(Housekeeping::default()),
            housekeeper: Mutex::new(None),
            users: std::sync::atomic::AtomicUsize::new(1),
            _lock: rec.lock,
        });
        let queue = Queue { flush, log, core, durability: b.durability, report: rec.report, options: b };
        log_roll_hook(&queue.core);
        if queue.core.retention.is_active() {
            queue.core.ensure_housekeeping()?;
        }
        Ok(queue)
    }

    pub(crate) fn core(&self) -> &Arc<Core> {
        &self.core
    }

    /// Opens the dead-letter queue of group `name`: `dead-letters/<name>/`
    /// in this queue's directory, with this queue's storage and clock.
    pub(crate) fn open_dead_letters(&self, name: &str) -> Result<Queue> {
        let mut b = self.options.clone();
        b.dir = self.options.dir.join("dead-letters").join(name);
        b.create = true;
        b.durability = Durability::Sync;
        b.retention = Retention::default();
        b.max_bytes = None;
        // Dead letters are rare: no zero-filled room ahead (a group costs a
        // few small files until its first dead letter, not a megabyte).
        b.preallocate_bytes = 0;
        Queue::open_with(b)
    }

    /// Checks backpressure before an append of `len` encoded bytes; waits
    /// for room only if `may_wait` (async appends never block their thread).
    fn admit(&self, len: usize, may_wait: bool) -> Result<()> {
        let Some(max) = self.options.max_bytes else { return Ok(()) };
        let fits = || self.log.total_bytes() + self.flush.pending_bytes() as u64 + len as u64 <= max;
        if fits() {
            return Ok(());
        }
        self.core.retention_due();
        match self.options.when_full {
            WhenFull::Wait(d) if may_wait => {
                if self.log.tail.wait_until(Instant::now() + d, fits) {
                    Ok(())
                } else {
                    Err(Error::Full { max_bytes: max })
                }
            }
            _ => Err(Error::Full { max_bytes: max }),
        }
    }

    /// Appends one value with the queue's durability; returns its offset.
    ///
    /// ```
    /// let dir = tempfile::tempdir()?;
    /// let queue = walq::Queue::open(dir.path())?;
    /// assert_eq!(queue.append(b"a")?, 0);
    /// assert_eq!(queue.append(b"b")?, 1);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn append(&self, value: &[u8]) -> Result<u64> {
        self.append_with(value, self.durability)
    }

    /// Appends one value with the durability given for this call.
    ///
    /// ```
    /// use walq::{Durability, Queue};
    /// let dir = tempfile::tempdir()?;
    /// let queue = Queue::builder(dir.path()).durability(Durability::Os).open()?;
    /// queue.append(b"cheap")?;
    /// queue.append_with(b"important", Durability::Sync)?; // also syncs "cheap"
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn append_with(&self, value: &[u8], durability: Durability) -> Result<u64> {
        Ok(self.append_batch_with(&[Record::new(value)], durability)?.start)
    }

    /// Appends a record with a key, headers or a timestamp; returns its offset.
    ///
    /// ```
    /// let dir = tempfile::tempdir()?;
    /// let queue = walq::Queue::open(dir.path())?;
    /// let offset = queue.append_record(&walq::Record::new(b"v").key(b"k").timestamp_ms(1_700_000_000_000))?;
    /// let mut reader = queue.read_from(offset)?;
    /// let record = reader.next()?.unwrap();
    /// assert_eq!((record.key(), record.timestamp_ms()), (Some(&b"k"[..]), 1_700_000_000_000));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn append_record(&self, record: &Record<'_>) -> Result<u64> {
        Ok(self.append_batch_with(std::slice::from_ref(record), self.durability)?.start)
    }

    /// Appends records together (one write, one sync in `Sync` mode); returns
    /// their offsets, which are contiguous.
    ///
    /// ```
    /// use walq::Record;
    /// let dir = tempfile::tempdir()?;
    /// let queue = walq::Queue::open(dir.path())?;
    /// let offsets = queue.append_batch(&[Record::new(b"a"), Record::new(b"b")])?;
    /// assert_eq!(offsets, 0..2);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn append_batch(&self, records: &[Record<'_>]) -> Result<Range<u64>> {
        self.append_batch_with(records, self.durability)
    }

    /// [`append_batch`](Queue::append_batch) with the durability given for this call.
    ///
    /// ```
    /// use walq::{Durability, Record};
    /// let dir = tempfile::tempdir()?;
    /// let queue = walq::Queue::open(dir.path())?;
    /// let offsets = queue.append_batch_with(&[Record::new(b"a")], Durability::Os)?;
    /// queue.flush()?;
    /// assert_eq!(offsets, 0..1);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn append_batch_with(&self, records: &[Record<'_>], durability: Durability) -> Result<Range<u64>> {
        if self.options.max_bytes.is_some() {
            self.admit(records.iter().map(Record::encoded_len).sum(), true)?;
        }
        self.flush.append(records, durability)
    }

    /// Appends one value and returns a future that resolves to its offset once
    /// it is as durable as the queue's default asks (feature `async`). The
    /// calling task is not blocked: the background flusher syncs and wakes
    /// it, many tasks sharing each sync. Works with any executor.
    ///
    /// ```
    /// # #[cfg(feature = "async")] {
    /// let dir = tempfile::tempdir().unwrap();
    /// let queue = walq::Queue::open(dir.path()).unwrap();
    /// let offset = futures_lite_block_on(queue.append_async(b"hello")).unwrap();
    /// assert_eq!(offset, 0);
    /// # fn futures_lite_block_on<F: std::future::Future>(f: F) -> F::Output {
    /// #     use std::task::{Context, Poll, Wake, Waker};
    /// #     struct T(std::thread::Thread);
    /// #     impl Wake for T { fn wake(self: std::sync::Arc<Self>) { self.0.unpark() } }
    /// #     let waker = Waker::from(std::sync::Arc::new(T(std::thread::current())));
    /// #     let mut f = std::pin::pin!(f);
    /// #     loop {
    /// #         if let Poll::Ready(v) = f.as_mut().poll(&mut Context::from_waker(&waker)) { return v; }
    /// #         std::thread::park();
    /// #     }
    /// # }
    /// # }
    /// ```
    #[cfg(feature = "async")]
    pub fn append_async(
        &self,
        value: &[u8],
    ) -> impl std::future::Future<Output = Result<u64>> + Send + 'static {
        let future = self.append_batch_async(&[Record::new(value)]);
        async move { future.await.map(|range| range.start) }
    }

    /// [`append_batch`](Queue::append_batch) as a future (feature `async`);
    /// see [`append_async`](Queue::append_async).
    #[cfg(feature = "async")]
    pub fn append_batch_async(&self, records: &[Record<'_>]) -> crate::AppendFuture {
        self.append_batch_async_with(records, self.durability)
    }

    /// [`append_batch_async`](Queue::append_batch_async) with the durability
    /// given for this call (feature `async`).
    #[cfg(feature = "async")]
    pub fn append_batch_async_with(
        &self,
        records: &[Record<'_>],
        durability: Durability,
    ) -> crate::AppendFuture {
        if self.options.max_bytes.is_some()
            && let Err(e) = self.admit(records.iter().map(Record::encoded_len).sum(), false)
        {
            return crate::AppendFuture::ready(Err(e));
        }
        match self.flush.append_waiter(records, durability) {
            Ok((range, Some(waiter))) => crate::AppendFuture::waiting(range, waiter),
            Ok((range, None)) => crate::AppendFuture::ready(Ok(range)),
            Err(e) => crate::AppendFuture::ready(Err(e)),
        }
    }

    /// Writes and fdatasyncs everything appended so far, whatever its durability.
    ///
    /// ```
    /// let dir = tempfile::tempdir()?;
    /// let queue = walq::Queue::builder(dir.path()).durability(walq::Durability::Os).open()?;
    /// queue.append(b"x")?;
    /// queue.flush()?; // now it survives a power cut
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn flush(&self) -> Result<()> {
        self.flush.flush()
    }

    /// A reader positioned at `offset`, which must lie between
    /// [`first_offset`](Queue::first_offset) and [`next_offset`](Queue::next_offset).
    ///
    /// ```
    /// let dir = tempfile::tempdir()?;
    /// let queue = walq::Queue::open(dir.path())?;
    /// for v in [b"a", b"b", b"c"] {
    ///     queue.append(v)?;
    /// }
    /// let mut reader = queue.read_from(1)?;
    /// assert_eq!(reader.next()?.unwrap().value(), b"b");
    /// assert!(matches!(queue.read_from(9), Err(walq::Error::OffsetOutOfRange { .. })));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn read_from(&self, offset: u64) -> Result<Reader> {
        let (first, next) = (self.first_offset(), self.next_offset());
        if offset < first || offset > next {
            return Err(Error::OffsetOutOfRange { offset, first, next });
        }
        Ok(Reader::new(Arc::clone(&self.log), offset))
    }

    /// The first offset the log still holds.
    pub fn first_offset(&self) -> u64 {
        self.log.first_offset()
    }

    /// The offset the next append will get.
    pub fn next_offset(&self) -> u64 {
        self.flush.next_offset()
    }

    /// The offset after the last record readers can see (with
    /// [`Durability::Sync`], the last durable one). One atomic load.
    pub fn visible_offset(&self) -> u64 {
        self.log.visible()
    }

    /// A future that resolves, to the visible watermark, once the record at
    /// `offset` is visible to readers (feature `async`): long-polls without a
    /// blocked thread. Woken by the append that publishes the record.
    ///
    /// ```
    /// # #[cfg(feature = "async")] {
    /// # let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    /// # rt.block_on(async {
    /// let dir = tempfile::tempdir().unwrap();
    /// let queue = std::sync::Arc::new(walq::Queue::open(dir.path()).unwrap());
    /// let q = queue.clone();
    /// let writer = std::thread::spawn(move || q.append(b"late").unwrap());
    /// let visible = queue.wait_visible_async(0).await;
    /// assert!(visible >= 1);
    /// writer.join().unwrap();
    /// # });
    /// # }
    /// ```
    #[cfg(feature = "async")]
    pub fn wait_visible_async(&self, offset: u64) -> crate::future::VisibleFuture {
        crate::future::VisibleFuture::new(Arc::clone(&self.log), offset)
    }

    /// What recovery found and did when this queue was opened.
    pub fn recovery_report(&self) -> &RecoveryReport {
        &self.report
    }

    /// Removes whole sealed segments whose records all lie below `offset`,
    /// oldest first; returns how many were removed. Readers already inside a
    /// removed segment keep reading it.
    ///
    /// ```
    /// let dir = tempfile::tempdir()?;
    /// let queue = walq::Queue::builder(dir.path()).segment_bytes(4096).open()?;
    /// for _ in 0..100 {
    ///     queue.append(&[7u8; 100])?;
    /// }
    /// let removed = queue.remove_before(50)?;
    /// assert!(removed > 0 && queue.first_offset() <= 50);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn remove_before(&self, offset: u64) -> Result<usize> {
        self.log.remove_oldest_while(|seg, _| Ok(seg.end() <= offset))
    }

    /// A named consumer: resumes at its committed position, or, if it has
    /// none, starts at the first record held ([`StartAt::Earliest`]) and saves
    /// that position at once. One handle per name: a second open of the same
    /// name while the first lives is [`Error::InUse`].
    ///
    /// ```
    /// let dir = tempfile::tempdir()?;
    /// let queue = walq::Queue::open(dir.path())?;
    /// queue.append(b"x")?;
    /// let mut c = queue.consumer("billing")?;
    /// assert_eq!(c.poll(10, std::time::Duration::ZERO)?.len(), 1);
    /// c.commit_position()?;
    /// assert_eq!(queue.consumers()[0].position, 1);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn consumer(&self, name: &str) -> Result<Consumer> {
        Consumer::open(&self.core, name, StartAt::Earliest)
    }

    /// A named consumer that, if it has no committed position yet, starts
    /// where `start` says (an existing consumer resumes where it was).
    ///
    /// ```
    /// use walq::StartAt;
    /// let dir = tempfile::tempdir()?;
    /// let queue = walq::Queue::open(dir.path())?;
    /// queue.append(b"old")?;
    /// let c = queue.consumer_from("new-only", StartAt::Latest)?;
    /// assert_eq!(c.position(), 1);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn consumer_from(&self, name: &str, start: StartAt) -> Result<Consumer> {
        Consumer::open(&self.core, name, start)
    }

    /// Every named consumer with its committed position and lag, by name.
    pub fn consumers(&self) -> Vec<ConsumerInfo> {
        let next = self.log.visible();
        self.core.journal.with_image(|img| {
            img.consumers
                .iter()
                .map(|(name, &position)| ConsumerInfo {
                    name: name.clone(),
                    position,
                    lag: next.saturating_sub(position),
                })
                .collect()
        })
    }

    /// Deletes a named consumer's saved position (durably). It must not be
    /// open ([`Error::InUse`]) and must exist ([`Error::UnknownConsumer`]).
    pub fn delete_consumer(&self, name: &str) -> Result<()> {
        check_name("consumer", name)?;
        // Held across the write, so that the consumer cannot be opened meanwhile.
        let open = self.core.open_consumers.lock().unwrap_or_else(|e| e.into_inner());
        if open.contains(name) {
            return Err(Error::InUse { name: name.to_string() });
        }
        if !self.core.journal.with_image(|img| img.consumers.contains_key(name)) {
            return Err(Error::UnknownConsumer { kind: "consumer", name: name.to_string() });
        }
        self.core.journal.record(&[Entry::DeleteConsumer { name: name.to_string() }], Durability::Sync)?;
        drop(open);
        self.core.retention_due();
        Ok(())
    }

    /// Sets a named consumer's saved position (it must not be open): what
    /// `walq consumer reset` does.
    pub fn reset_consumer(&self, name: &str, start: StartAt) -> Result<u64> {
        check_name("consumer", name)?;
        let open = self.core.open_consumers.lock().unwrap_or_else(|e| e.into_inner());
        if open.contains(name) {
            return Err(Error::InUse { name: name.to_string() });
        }
        let offset = self.core.resolve_start(start)?;
        self.core.journal.record(&[Entry::Commit { name: name.to_string(), offset }], Durability::Sync)?;
        drop(open);
        self.core.retention_due();
        Ok(offset)
    }

    /// A consumer group (competing workers with acks, redelivery and dead
    /// letters): options, then [`GroupBuilder::open`]. See [`crate::Group`].
    pub fn group(&self, name: &str) -> GroupBuilder<'_> {
        GroupBuilder::new(self, name)
    }

    /// Every group: open ones with their live state, others as saved.
    pub fn groups(&self) -> Vec<GroupInfo> {
        let next = self.log.visible();
        let open: HashMap<String, crate::Group> = {
            let g = self.core.groups.lock().unwrap_or_else(|e| e.into_inner());
            g.iter().filter_map(|(n, w)| Some((n.clone(), crate::Group::from_shared(w.upgrade()?)))).collect()
        };
        // A copy first: `info` takes a group's lock, which must never be
        // taken while holding the journal's (fetch and ack take them the
        // other way round).
        let saved = self.core.journal.with_image(|img| img.groups.clone());
        saved
            .iter()
            .map(|(name, g)| match open.get(name) {
                Some(live) => live.info(),
                None => GroupInfo::saved(name, g, next),
            })
            .collect()
    }

    /// Deletes a group's saved state (durably; its dead-letter queue stays).
    /// It must not be open ([`Error::InUse`]) and must exist.
    pub fn delete_group(&self, name: &str) -> Result<()> {
        check_name("group", name)?;
        let open = self.core.groups.lock().unwrap_or_else(|e| e.into_inner());
        if open.get(name).is_some_and(|w| w.strong_count() > 0) {
            return Err(Error::InUse { name: name.to_string() });
        }
        if !self.core.journal.with_image(|img| img.groups.contains_key(name)) {
            return Err(Error::UnknownConsumer { kind: "group", name: name.to_string() });
        }
        self.core.journal.record(&[Entry::DeleteGroup { name: name.to_string() }], Durability::Sync)?;
        drop(open);
        self.core.retention_due();
        Ok(())
    }

    /// The first offset whose record's timestamp is at or after `unix_ms`
    /// (the end of the log if none is).
    ///
    /// ```
    /// let dir = tempfile::tempdir()?;
    /// let queue = walq::Queue::open(dir.path())?;
    /// for ts in [1_000, 2_000, 3_000] {
    ///     queue.append_record(&walq::Record::new(b"x").timestamp_ms(ts))?;
    /// }
    /// assert_eq!(queue.offset_for_timestamp(1_500)?, 1);
    /// assert_eq!(queue.offset_for_timestamp(9_000)?, 3);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn offset_for_timestamp(&self, unix_ms: u64) -> Result<u64> {
        self.core.offset_for_timestamp(unix_ms)
    }

    /// Applies the retention policy now (the background thread also does,
    /// after rolls and once a second); returns how many segments went.
    ///
    /// ```
    /// use std::time::Duration;
    /// let clock = walq::ManualClock::new(0);
    /// let dir = tempfile::tempdir()?;
    /// let queue = walq::Queue::builder(dir.path())
    ///     .segment_bytes(4096)
    ///     .clock(&clock)
    ///     .retention(walq::Retention::default().max_age(Duration::from_secs(60)))
    ///     .open()?;
    /// for _ in 0..100 {
    ///     queue.append_with(&[1u8; 100], walq::Durability::Os)?;
    /// }
    /// queue.flush()?;
    /// clock.advance(Duration::from_secs(61));
    /// queue.apply_retention()?;
    /// assert_eq!(queue.stats().segments, 1); // only the active one is left
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn apply_retention(&self) -> Result<usize> {
        self.core.apply_retention()
    }

    /// Counters and watermarks.
    ///
    /// ```
    /// let dir = tempfile::tempdir()?;
    /// let queue = walq::Queue::open(dir.path())?;
    /// queue.append(b"x")?;
    /// let stats = queue.stats();
    /// assert_eq!((stats.appends, stats.durable_offset, stats.syncs), (1, 1, 1));
    /// assert_eq!(stats.sync_histogram.iter().sum::<u64>(), stats.syncs);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn stats(&self) -> Stats {
        let f = self.flush.stats();
        let mut micros = f.sync_micros.clone();
        micros.sort_unstable();
        let pct = |p: usize| {
            micros.get((micros.len() * p / 100).min(micros.len().saturating_sub(1))).copied().unwrap_or(0)
        };
        Stats {
            appends: f.appends,
            bytes: f.bytes,
            batches: f.batches,
            syncs: f.syncs,
            rolls: f.rolls,
            records_per_sync_mean: if f.syncs == 0 { 0.0 } else { f.records_synced as f64 / f.syncs as f64 },
            records_per_sync_last: f.last_records_per_sync,
            sync_micros_p50: pct(50),
            sync_micros_p99: pct(99),
            sync_micros_max: micros.last().copied().unwrap_or(0),
            first_offset: self.log.first_offset(),
            next_offset: f.next_offset,
            written_offset: f.written,
            durable_offset: self.log.durable(),
            visible_offset: self.log.visible(),
            segments: self.log.segment_count(),
            poisoned: f.poisoned,
            segments_removed: self.log.segments_removed(),
            bytes_on_disk: self.log.total_bytes(),
            consumer_journal_damaged: self.core.journal.damaged(),
            sync_histogram: f.sync_histogram,
            sync_micros_total: f.sync_micros_total,
        }
    }

    /// Whether a failed write or sync poisoned the queue ([`Stats::poisoned`],
    /// without computing the rest): appends then fail with [`Error::Poisoned`]
    /// until the queue is reopened, which runs recovery and finds out what
    /// really reached the disk. Cheap: for health checks.
    ///
    /// ```
    /// let dir = tempfile::tempdir()?;
    /// let queue = walq::Queue::open(dir.path())?;
    /// queue.append(b"x")?;
    /// assert!(!queue.is_poisoned());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn is_poisoned(&self) -> bool {
        self.flush.is_poisoned()
    }

    /// Syncs everything pending, stops the background flusher and releases
    /// the directory lock. Dropping the queue does the same but cannot report
    /// an error. On a poisoned queue this is [`Error::Poisoned`]: what was
    /// appended without `Sync` since the failure may not be on disk.
    pub fn close(self) -> Result<()> {
        self.flush.stop_background();
        let result = self.flush.final_flush();
        let journal = self.core.journal.flush(true);
        drop(self);
        result.and(journal)
    }
}

impl Drop for Queue {
    fn drop(&mut self) {
        self.core.release_user();
        self.flush.stop_background();
        if !self.flush.is_poisoned()
            && let Err(e) = self.flush.final_flush()
        {
            tracing::error!(error = %e, "flush on drop failed; records appended without Sync may be lost");
        }
    }
}

/// Rolls wake the housekeeping thread (retention may have work).
fn log_roll_hook(core: &Arc<Core>) {
    if core.retention.is_active() {
        let hk = Arc::downgrade(&core.housekeeping);
        core.log.set_roll_hook(Box::new(move || {
            if let Some(hk) = hk.upgrade() {
                let mut st = hk.state.lock().unwrap_or_else(|e| e.into_inner());
                st.retention = true;
                hk.cond.notify_one();
            }
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Readers at the tail of the active segment see each new record through
    /// a wider view of the mapping they already share (the file is mapped
    /// ahead, preallocated zeros included): no open, mmap or munmap per record.
    #[test]
    fn tail_readers_reuse_the_active_segments_mapping() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("create directory", std::env::temp_dir(), e))?;
        let queue = Queue::builder(dir.path()).open()?;
        queue.append(b"first")?;
        let seg = queue.log.segment_for(0).expect("the active segment");
        let before = queue.log.map(&seg, 0, None)?;
        for i in 1..100u64 {
            let value = format!("record {i}");
            assert_eq!(queue.append(value.as_bytes())?, i);
            // A new reader per read, as the HTTP server makes one per request.
            let mut reader = queue.read_from(i)?;
            let r = reader.next()?.expect("the record just appended");
            assert_eq!((r.offset(), r.value()), (i, value.as_bytes()));
        }
        let after = queue.log.map(&seg, 0, None)?;
        assert!(after.len() > before.len(), "the view grew: {} -> {}", before.len(), after.len());
        assert_eq!(after.as_ptr(), before.as_ptr(), "the same mapping, not a new one");
        Ok(())
    }
}
