//! walq: an embedded, durable-by-default persistent message queue built on a
//! segmented write-ahead log.
//!
//! A [`Queue`] owns one directory of segment files. Appends get contiguous
//! offsets and, by default ([`Durability::Sync`]), return only after an
//! fdatasync covers them; readers ([`Reader`]) read records straight out of
//! read-only maps of the segments, checksums verified, never past the
//! durable watermark. Opening a queue recovers from any crash: it verifies
//! the tail of the last segment, cuts an unsynced torn tail and says so in a
//! [`RecoveryReport`], and refuses (with [`Error::Corrupt`]) to cut anything
//! a crash cannot explain.
//!
//! # Quick start
//!
//! ```
//! use walq::{Queue, Record};
//!
//! let dir = tempfile::tempdir()?;
//! let queue = Queue::open(dir.path())?;
//! queue.append(b"first")?;
//! queue.append_record(&Record::new(b"second").key(b"user-1").header(b"trace", b"abc"))?;
//!
//! let mut reader = queue.read_from(queue.first_offset())?;
//! while let Some(record) = reader.next()? {
//!     println!("{}: {}", record.offset(), String::from_utf8_lossy(record.value()));
//! }
//! drop(reader);
//! drop(queue);
//!
//! // Reopen: everything acknowledged is still there.
//! let queue = Queue::open(dir.path())?;
//! assert_eq!(queue.next_offset(), 2);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! See `ARCHITECTURE.md` for the design and `docs/format.md` for the bytes on disk.

mod batch;
mod clock;
mod config;
mod consumer;
mod error;
mod flush;
mod fs;
#[cfg(feature = "async")]
mod future;
mod group;
mod index;
pub mod inspect;
mod journal;
mod log;
#[allow(unsafe_code)]
mod mmap;
mod queue;
mod reader;
mod record;
mod recovery;
mod segment;
mod timeindex;
mod writer;

pub use clock::ManualClock;
pub use config::{
    BATCH_BYTES_DEFAULT, Durability, OS_WRITE_DELAY, PREALLOCATE_BYTES_DEFAULT, QueueBuilder,
    RECORD_BYTES_DEFAULT, RECORD_BYTES_MAX, Retention, SEGMENT_BYTES_DEFAULT, SEGMENT_BYTES_MAX,
    SEGMENT_BYTES_MIN, WRITE_BUFFER_BYTES_DEFAULT, WhenFull,
};
#[cfg(feature = "async")]
pub use consumer::ConsumerStream;
pub use consumer::{Consumer, ConsumerInfo, StartAt};
pub use error::{Error, Result};
pub use flush::SYNC_HISTOGRAM_BOUNDS_MICROS;
pub use fs::{Fault, FaultKind, FaultOp, SimDisk};
#[cfg(feature = "async")]
pub use future::{AppendFuture, VisibleFuture};
pub use group::{
    ACK_DURABILITY_DEFAULT, ACK_WAIT_DEFAULT, Delivery, DeliveryId, Group, GroupBuilder, GroupInfo,
    GroupStats, MAX_DELIVER_DEFAULT, PREFETCH_DEFAULT, Worker, dead_letter_headers,
};
pub use queue::{Queue, Stats};
pub use reader::Reader;
pub use record::{Headers, OwnedRecord, Record, RecordRef};
pub use recovery::RecoveryReport;

/// Entry points for the fuzz targets in `fuzz/`; not part of the API.
#[doc(hidden)]
pub mod __fuzz {
    /// Decodes arbitrary bytes as a batch every way walq does.
    pub fn decode_batch(data: &[u8]) {
        crate::batch::fuzz_decode(data);
    }

    /// Replays arbitrary bytes as a consumer journal and checks that a
    /// snapshot of the result replays to the same state.
    pub fn decode_journal(data: &[u8]) {
        crate::journal::fuzz_check(data);
    }
}
