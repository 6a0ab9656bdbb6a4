//! The public [`Queue`]: opens and recovers a directory, appends through group
//! commit (`flush.rs`), hands out readers, and stops the background flusher
//! on close. It wires the modules together and has no algorithm of its own.

use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use crate::config::{Durability, QueueBuilder};
use crate::error::{Error, Result};
use crate::flush::{Flush, FlushConfig};
use crate::fs::DirLock;
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
    durability: Durability,
    report: RecoveryReport,
    _lock: Box<dyn DirLock>,
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
        };
        let flush = Arc::new(Flush::new(Writer::new(Arc::clone(&log), io_cfg, rec.active), flush_cfg));
        Ok(Queue { flush, log, durability: b.durability, report: rec.report, _lock: rec.lock })
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
        self.log.remove_before(offset)
    }

    /// Counters and watermarks.
    ///
    /// ```
    /// let dir = tempfile::tempdir()?;
    /// let queue = walq::Queue::open(dir.path())?;
    /// queue.append(b"x")?;
    /// let stats = queue.stats();
    /// assert_eq!((stats.appends, stats.durable_offset, stats.syncs), (1, 1, 1));
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
        }
    }

    /// Syncs everything pending, stops the background flusher and releases
    /// the directory lock. Dropping the queue does the same but cannot report
    /// an error. On a poisoned queue this is [`Error::Poisoned`]: what was
    /// appended without `Sync` since the failure may not be on disk.
    pub fn close(self) -> Result<()> {
        self.flush.stop_background();
        let result = self.flush.final_flush();
        drop(self);
        result
    }
}

impl Drop for Queue {
    fn drop(&mut self) {
        self.flush.stop_background();
        if !self.flush.is_poisoned()
            && let Err(e) = self.flush.final_flush()
        {
            tracing::error!(error = %e, "flush on drop failed; records appended without Sync may be lost");
        }
    }
}
