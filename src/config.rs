//! Options and durability modes: what a caller can choose, and the limits
//! every choice is checked against before any file is touched.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::clock::{Clock, ManualClock};
use crate::error::{Error, Result};
use crate::fs::{RealFs, Storage};
use crate::queue::Queue;

/// Default size at which the active segment is sealed and a new one started.
pub const SEGMENT_BYTES_DEFAULT: u64 = 64 << 20;
/// Smallest accepted segment size (small segments are for tests).
pub const SEGMENT_BYTES_MIN: u64 = 4 << 10;
/// Largest accepted segment size: index positions are 32-bit, and one batch
/// may overshoot the limit by up to [`RECORD_BYTES_MAX`].
pub const SEGMENT_BYTES_MAX: u64 = 2 << 30;
/// Default limit on one encoded record (Kafka's default is also about 1 MB).
pub const RECORD_BYTES_DEFAULT: usize = 1 << 20;
/// Hard limit on one encoded record: a batch must fit in 64 MiB.
pub const RECORD_BYTES_MAX: usize = 32 << 20;
const _: () = assert!(RECORD_BYTES_MAX <= crate::batch::RECORD_BYTES_MAX);
/// Default bytes zero-filled ahead of the tail of the active segment
/// (overwriting allocated space syncs faster than growing the file).
pub const PREALLOCATE_BYTES_DEFAULT: u64 = 1 << 20;
/// Default bytes of records buffered in memory by `Os` and `Interval` appends
/// before they are written (in batches of at most `batch_bytes_max`).
pub const WRITE_BUFFER_BYTES_DEFAULT: usize = 64 << 10;
/// Default bound on one batch: a group-commit round writes its records as
/// batches of at most this size (one write each), and one fdatasync.
pub const BATCH_BYTES_DEFAULT: usize = 1 << 20;
/// How long `Os` appends may sit in the write buffer before the background
/// writer hands them to the OS.
pub const OS_WRITE_DELAY: Duration = Duration::from_millis(1);

/// How durable an append is when the call returns.
///
/// Chosen per queue ([`QueueBuilder::durability`]) and overridable per call
/// ([`Queue::append_with`]). The default, [`Durability::Sync`], is the only
/// mode in which an acknowledged record survives a power cut.
///
/// ```
/// use std::time::Duration;
/// use walq::{Durability, Queue};
/// let dir = tempfile::tempdir()?;
/// let queue = Queue::builder(dir.path()).durability(Durability::Interval(Duration::from_millis(50))).open()?;
/// queue.append(b"metrics sample")?;            // may be lost by a crash within ~50 ms
/// queue.append_with(b"payment", Durability::Sync)?; // on stable storage when this returns
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// The call returns after an fdatasync covers the record. Survives a
    /// process crash and a power cut. Does **not** protect against a disk that
    /// acknowledges flushes it has not done, or against losing the disk.
    #[default]
    Sync,
    /// The call returns once the record is in walq's write buffer; a
    /// background thread writes and fdatasyncs at least every interval. A
    /// process crash loses records still in the buffer (up to about one
    /// interval); a power cut loses up to one interval of records. Never loses
    /// a record that an earlier sync covered.
    Interval(Duration),
    /// The call returns once the record is in walq's write buffer; it is
    /// handed to the OS (the page cache) within about a millisecond or when the
    /// buffer fills, and synced only when something else syncs (a `Sync`
    /// append, [`Queue::flush`], closing the queue, or a segment roll). A
    /// process crash loses what is still in the buffer; a power cut can lose
    /// everything not yet synced.
    Os,
}

/// Builds a [`Queue`] with options; every option is validated by
/// [`open`](QueueBuilder::open) before the directory is touched.
///
/// ```
/// let dir = tempfile::tempdir()?;
/// let queue = walq::Queue::builder(dir.path())
///     .segment_bytes(16 << 20)
///     .max_record_bytes(64 << 10)
///     .open()?;
/// assert_eq!(queue.next_offset(), 0);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone)]
pub struct QueueBuilder {
    pub(crate) dir: PathBuf,
    pub(crate) create: bool,
    pub(crate) segment_bytes: u64,
    pub(crate) max_record_bytes: usize,
    pub(crate) preallocate_bytes: u64,
    pub(crate) write_buffer_bytes: usize,
    pub(crate) durability: Durability,
    pub(crate) batch_bytes_max: usize,
    pub(crate) linger: Duration,
    pub(crate) producers_lead: bool,
    pub(crate) pad_to_sectors: bool,
    pub(crate) storage: Arc<dyn Storage>,
    pub(crate) clock: Clock,
    pub(crate) retention: Retention,
    pub(crate) max_bytes: Option<u64>,
    pub(crate) when_full: WhenFull,
}

impl QueueBuilder {
    pub(crate) fn new(dir: &Path) -> QueueBuilder {
        QueueBuilder {
            dir: dir.to_path_buf(),
            create: true,
            segment_bytes: SEGMENT_BYTES_DEFAULT,
            max_record_bytes: RECORD_BYTES_DEFAULT,
            preallocate_bytes: PREALLOCATE_BYTES_DEFAULT,
            write_buffer_bytes: WRITE_BUFFER_BYTES_DEFAULT,
            durability: Durability::Sync,
            batch_bytes_max: BATCH_BYTES_DEFAULT,
            linger: Duration::ZERO,
            producers_lead: true,
            pad_to_sectors: false,
            storage: Arc::new(RealFs),
            clock: Clock::System,
            retention: Retention::default(),
            max_bytes: None,
            when_full: WhenFull::Error,
        }
    }

    /// Whether to create the directory when it is missing (default `true`);
    /// when `false`, a missing directory is [`Error::NotFound`].
    pub fn create(mut self, create: bool) -> Self {
        self.create = create;
        self
    }

    /// Size at which the active segment is sealed and a new one started
    /// (default [`SEGMENT_BYTES_DEFAULT`], accepted
    /// [`SEGMENT_BYTES_MIN`]..=[`SEGMENT_BYTES_MAX`]). Retention removes whole
    /// segments, so this is also its granularity.
    pub fn segment_bytes(mut self, bytes: u64) -> Self {
        self.segment_bytes = bytes;
        self
    }

    /// Largest encoded record accepted (default [`RECORD_BYTES_DEFAULT`], at
    /// most [`RECORD_BYTES_MAX`]); larger ones get [`Error::RecordTooLarge`].
    pub fn max_record_bytes(mut self, bytes: usize) -> Self {
        self.max_record_bytes = bytes;
        self
    }

    /// Bytes zero-filled ahead of the tail of the active segment (default
    /// [`PREALLOCATE_BYTES_DEFAULT`]; 0 turns it off and grows the file with
    /// each write instead).
    pub fn preallocate_bytes(mut self, bytes: u64) -> Self {
        self.preallocate_bytes = bytes;
        self
    }

    /// Bytes of `Os`/`Interval` records buffered before they are written in
    /// one batch (default [`WRITE_BUFFER_BYTES_DEFAULT`]).
    pub fn write_buffer_bytes(mut self, bytes: usize) -> Self {
        self.write_buffer_bytes = bytes;
        self
    }

    /// The queue's default durability (default [`Durability::Sync`]). It also
    /// decides what readers see: with `Sync`, only records a sync covered;
    /// otherwise every record written to the OS.
    pub fn durability(mut self, durability: Durability) -> Self {
        self.durability = durability;
        self
    }

    /// Largest batch a flush writes with one syscall (default
    /// [`BATCH_BYTES_DEFAULT`]); a round with more pending bytes writes
    /// several batches, then syncs once.
    pub fn batch_bytes_max(mut self, bytes: usize) -> Self {
        self.batch_bytes_max = bytes;
        self
    }

    /// How long the producer that leads a flush waits for others to join it
    /// before writing (default zero: group commit already gathers everyone
    /// who arrived during the previous sync). A linger trades latency for
    /// fewer, larger syncs when producers are few and the disk is slow.
    pub fn linger(mut self, linger: Duration) -> Self {
        self.linger = linger;
        self
    }

    /// Whether a `Sync` append leads the flush itself when none is in flight
    /// (default `true`), or always hands the records to the background
    /// flusher thread and waits. Leading saves a thread hand-off per sync;
    /// the other mode exists to measure that choice (`benches/append.rs`).
    #[doc(hidden)]
    pub fn producers_lead(mut self, lead: bool) -> Self {
        self.producers_lead = lead;
        self
    }

    /// Pads every batch with zeros to end on a 4 KiB boundary, so that no
    /// later write ever shares a disk sector with an acknowledged record
    /// (default `false`). Turn it on for disks that may tear a sector rewrite
    /// on power loss; by default walq assumes, like SQLite and redb, that
    /// rewriting a sector does not damage its bytes that were already durable
    /// ("power-safe overwrite"). Costs up to 4 KiB of disk per batch: about
    /// one sector per sync with group commit. See ARCHITECTURE.md for the
    /// measurements behind the default.
    pub fn pad_to_sectors(mut self, pad: bool) -> Self {
        self.pad_to_sectors = pad;
        self
    }

    /// Runs the queue on a [`SimDisk`](crate::SimDisk) instead of the real
    /// file system, for crash and fault-injection tests.
    pub fn simulated(mut self, disk: &crate::SimDisk) -> Self {
        self.storage = Arc::new(disk.clone());
        self
    }

    /// Reads time from `clock` instead of the system clock: record
    /// timestamps, ack deadlines, nack delays and retention by age then move
    /// only when the test moves the clock.
    pub fn clock(mut self, clock: &ManualClock) -> Self {
        self.clock = Clock::Manual(clock.clone());
        self
    }

    /// Which old segments walq removes by itself (default: none; see
    /// [`Retention`]). Retention runs in a background thread after segment
    /// rolls and once a second, and on [`Queue::apply_retention`].
    pub fn retention(mut self, retention: Retention) -> Self {
        self.retention = retention;
        self
    }

    /// Backpressure: the most bytes the queue's segment files may hold
    /// (default: no limit). An append that would go past it waits for
    /// retention to make room or fails with [`Error::Full`], as
    /// [`when_full`](QueueBuilder::when_full) says. At least twice
    /// `segment_bytes` (retention frees whole segments).
    pub fn max_bytes(mut self, bytes: u64) -> Self {
        self.max_bytes = Some(bytes);
        self
    }

    /// What an append does when the queue is full (default [`WhenFull::Error`]).
    pub fn when_full(mut self, when_full: WhenFull) -> Self {
        self.when_full = when_full;
        self
    }

    /// Validates the options, then opens (and recovers) the queue.
    pub fn open(self) -> Result<Queue> {
        self.validate()?;
        Queue::open_with(self)
    }

    /// Checks the options without opening anything (what [`open`](QueueBuilder::open)
    /// checks first): [`Error::InvalidOption`] names the option and the rule.
    /// For a program that takes options from its users and wants to refuse bad
    /// ones at startup, before any queue is created.
    ///
    /// ```
    /// let ok = walq::Queue::builder("/nowhere").segment_bytes(1 << 20).max_bytes(4 << 20);
    /// assert!(ok.validate().is_ok());
    /// let bad = walq::Queue::builder("/nowhere").segment_bytes(1 << 20).max_bytes(1 << 20);
    /// assert!(matches!(bad.validate(), Err(walq::Error::InvalidOption { name: "max_bytes", .. })));
    /// ```
    pub fn validate(&self) -> Result<()> {
        if !(SEGMENT_BYTES_MIN..=SEGMENT_BYTES_MAX).contains(&self.segment_bytes) {
            return Err(Error::InvalidOption {
                name: "segment_bytes",
                reason: format!(
                    "{} is outside {SEGMENT_BYTES_MIN}..={SEGMENT_BYTES_MAX}",
                    self.segment_bytes
                ),
            });
        }
        if !(1..=RECORD_BYTES_MAX).contains(&self.max_record_bytes) {
            return Err(Error::InvalidOption {
                name: "max_record_bytes",
                reason: format!("{} is outside 1..={RECORD_BYTES_MAX}", self.max_record_bytes),
            });
        }
        if self.preallocate_bytes > SEGMENT_BYTES_MAX {
            return Err(Error::InvalidOption {
                name: "preallocate_bytes",
                reason: format!("{} is above {SEGMENT_BYTES_MAX}", self.preallocate_bytes),
            });
        }
        if !(1..=RECORD_BYTES_MAX).contains(&self.write_buffer_bytes) {
            return Err(Error::InvalidOption {
                name: "write_buffer_bytes",
                reason: format!("{} is outside 1..={RECORD_BYTES_MAX}", self.write_buffer_bytes),
            });
        }
        if !(1..=RECORD_BYTES_MAX).contains(&self.batch_bytes_max) {
            return Err(Error::InvalidOption {
                name: "batch_bytes_max",
                reason: format!("{} is outside 1..={RECORD_BYTES_MAX}", self.batch_bytes_max),
            });
        }
        if self.linger > Duration::from_secs(1) {
            return Err(Error::InvalidOption {
                name: "linger",
                reason: format!("{:?} is above one second; use Durability::Interval for that", self.linger),
            });
        }
        if let Some(max) = self.max_bytes
            && max < 2 * self.segment_bytes
        {
            return Err(Error::InvalidOption {
                name: "max_bytes",
                reason: format!(
                    "{max} is below twice segment_bytes ({}): retention frees whole segments, so the limit must hold at least two",
                    self.segment_bytes
                ),
            });
        }
        if let Some(max) = self.retention.max_bytes
            && max < self.segment_bytes
        {
            return Err(Error::InvalidOption {
                name: "retention.max_bytes",
                reason: format!("{max} is below segment_bytes ({})", self.segment_bytes),
            });
        }
        if let Durability::Interval(d) = self.durability
            && d.is_zero()
        {
            return Err(Error::InvalidOption {
                name: "durability",
                reason: "Interval(0) would sync continuously; use Durability::Sync".into(),
            });
        }
        Ok(())
    }
}

/// Which sealed segments walq removes by itself, oldest first and whole
/// segments only (the active segment is never removed). Every limit is
/// optional; the default keeps everything. Removals are counted in
/// [`Stats::segments_removed`](crate::Stats::segments_removed) and logged.
///
/// ```
/// use std::time::Duration;
/// use walq::{Queue, Retention};
/// let dir = tempfile::tempdir()?;
/// let queue = Queue::builder(dir.path())
///     .retention(Retention::default().max_bytes(10 << 30).max_age(Duration::from_secs(7 * 86_400)))
///     .open()?;
/// # drop(queue);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Retention {
    pub(crate) max_bytes: Option<u64>,
    pub(crate) max_age: Option<Duration>,
    pub(crate) queue_mode: bool,
}

impl Retention {
    /// Removes the oldest sealed segments while the log holds more than
    /// `bytes` (as Kafka's `retention.bytes`).
    pub fn max_bytes(mut self, bytes: u64) -> Self {
        self.max_bytes = Some(bytes);
        self
    }

    /// Removes a sealed segment once its newest record is older than `age`
    /// by the queue's clock (as Kafka's `retention.ms`).
    pub fn max_age(mut self, age: Duration) -> Self {
        self.max_age = Some(age);
        self
    }

    /// Queue mode: removes a sealed segment once every named consumer has
    /// committed past it and every group has acknowledged all of it; and
    /// never removes, for any limit above, a segment that a consumer or a
    /// group still needs. With no consumer and no group, queue mode removes
    /// nothing.
    pub fn queue_mode(mut self, on: bool) -> Self {
        self.queue_mode = on;
        self
    }

    pub(crate) fn is_active(&self) -> bool {
        self.max_bytes.is_some() || self.max_age.is_some() || self.queue_mode
    }
}

/// What an append does when the queue holds
/// [`max_bytes`](QueueBuilder::max_bytes).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum WhenFull {
    /// Fail at once with [`Error::Full`].
    #[default]
    Error,
    /// Wait up to this long for retention to make room, then fail with
    /// [`Error::Full`]. Async appends never block their thread: they fail at
    /// once.
    Wait(Duration),
}
