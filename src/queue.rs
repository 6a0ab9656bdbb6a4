//! The public [`Queue`]: opens and recovers a directory, appends through the
//! single writer, hands out readers, and runs the background writer that
//! `Os` and `Interval` appends rely on. It wires the modules together and
//! has no algorithm of its own.

use std::ops::Range;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Instant;

use crate::config::{Durability, QueueBuilder};
use crate::error::{Error, Result};
use crate::fs::DirLock;
use crate::log::Log;
use crate::reader::Reader;
use crate::record::Record;
use crate::recovery::{self, RecoveryReport};
use crate::writer::{Writer, WriterConfig};

/// A durable, append-only queue in one directory.
///
/// `Queue` is `Send + Sync`: share it behind an `Arc` among threads. Appends
/// are serialized through one writer; readers never block it and read
/// straight out of read-only maps of the segment files.
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
    core: Arc<Core>,
    log: Arc<Log>,
    durability: Durability,
    report: RecoveryReport,
    background: Mutex<Option<JoinHandle<()>>>,
    background_started: AtomicBool,
    _lock: Box<dyn DirLock>,
}

/// What the background writer shares with the queue.
#[derive(Debug)]
struct Core {
    writer: Mutex<Writer>,
    wake: Condvar,
    shutdown: AtomicBool,
}

impl Core {
    fn writer(&self) -> MutexGuard<'_, Writer> {
        // A panic while holding the lock cannot leave bytes half-acknowledged:
        // the writer's state only advances after a write or sync succeeded.
        self.writer.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Figures about a queue at one instant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
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
        let cfg = WriterConfig {
            segment_bytes: b.segment_bytes,
            max_record_bytes: b.max_record_bytes,
            preallocate_bytes: b.preallocate_bytes,
            write_buffer_bytes: b.write_buffer_bytes,
            publish_durable_only: b.durability == Durability::Sync,
        };
        let writer = Writer::new(Arc::clone(&log), cfg, rec.active);
        let core = Arc::new(Core {
            writer: Mutex::new(writer),
            wake: Condvar::new(),
            shutdown: AtomicBool::new(false),
        });
        Ok(Queue {
            core,
            log,
            durability: b.durability,
            report: rec.report,
            background: Mutex::new(None),
            background_started: AtomicBool::new(false),
            _lock: rec.lock,
        })
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
        let (range, wake) = {
            let mut w = self.core.writer();
            let range = w.append(records, durability)?;
            (range, std::mem::take(&mut w.wake_background))
        };
        if wake {
            self.ensure_background();
        }
        Ok(range)
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
        self.core.writer().flush()
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
        self.core.writer().next_offset()
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
    pub fn stats(&self) -> Stats {
        let w = self.core.writer();
        let c = w.counters;
        Stats {
            appends: c.appends,
            bytes: c.bytes,
            batches: c.batches,
            syncs: c.syncs,
            rolls: c.rolls,
            first_offset: self.log.first_offset(),
            next_offset: w.next_offset(),
            written_offset: w.written(),
            durable_offset: w.durable(),
            visible_offset: self.log.visible(),
            segments: self.log.segment_count(),
            poisoned: w.is_poisoned(),
        }
    }

    /// Syncs everything pending, stops the background writer and releases
    /// the directory lock. Dropping the queue does the same but cannot report
    /// an error. On a poisoned queue this is [`Error::Poisoned`]: what was
    /// appended without `Sync` since the failure may not be on disk.
    pub fn close(self) -> Result<()> {
        self.stop_background();
        let result = {
            let mut w = self.core.writer();
            w.flush()
        };
        drop(self);
        result
    }

    fn ensure_background(&self) {
        if self.background_started.load(Ordering::Acquire) {
            self.core.wake.notify_one();
            return;
        }
        let mut slot = self.background.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            let core = Arc::clone(&self.core);
            match std::thread::Builder::new().name("walq-writer".into()).spawn(move || background(&core)) {
                Ok(handle) => *slot = Some(handle),
                Err(e) => tracing::error!(error = %e, "could not start the background writer; call flush()"),
            }
            self.background_started.store(true, Ordering::Release);
        }
    }

    fn stop_background(&self) {
        {
            // Under the writer lock, so the background thread is either before its
            // shutdown check or already waiting: the notify below cannot be lost.
            let _w = self.core.writer();
            self.core.shutdown.store(true, Ordering::Release);
        }
        self.core.wake.notify_all();
        let handle = self.background.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(h) = handle {
            let _ = h.join();
        }
    }
}

impl Drop for Queue {
    fn drop(&mut self) {
        self.stop_background();
        let mut w = self.core.writer();
        if !w.is_poisoned()
            && let Err(e) = w.flush()
        {
            tracing::error!(error = %e, "flush on drop failed; records appended without Sync may be lost");
        }
    }
}

/// The background writer: writes `Os` records after a short delay and syncs
/// `Interval` records by their deadline.
fn background(core: &Core) {
    let mut w = core.writer();
    while !core.shutdown.load(Ordering::Acquire) {
        let next = match w.tick(Instant::now()) {
            Ok(next) => next,
            Err(e) => {
                tracing::error!(error = %e, "background write failed");
                None
            }
        };
        w = match next {
            Some(t) => {
                let wait = t.saturating_duration_since(Instant::now());
                core.wake.wait_timeout(w, wait).map_or_else(|e| e.into_inner().0, |r| r.0)
            }
            None => core.wake.wait(w).unwrap_or_else(|e| e.into_inner()),
        };
    }
}
