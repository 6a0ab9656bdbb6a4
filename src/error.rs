//! The one error type of walq. Every variant says what happened, where, and
//! what the caller can do about it; `source()` gives the underlying I/O error.

use std::io;
use std::path::PathBuf;

/// A `Result` whose error is walq's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in walq.
///
/// Matching on the variant (never on the message) tells a program what to do;
/// the message tells a person. Every variant leaves the data on disk as it
/// was, except where its docs say otherwise.
///
/// ```
/// let dir = tempfile::tempdir()?;
/// let queue = walq::Queue::open(dir.path())?;
/// match walq::Queue::open(dir.path()) {
///     Err(walq::Error::Locked { .. }) => {} // the first handle still holds the directory
///     other => panic!("expected Locked, got {other:?}"),
/// }
/// # drop(queue);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Another `Queue` (in this process or another) has the directory open.
    /// Close it first; a lock left by a process that died is released by the
    /// kernel, so this never needs manual cleanup.
    #[error(
        "queue directory {dir} is locked by another open queue; close that one first (a crashed process releases its lock by itself)"
    )]
    Locked {
        /// The queue directory.
        dir: PathBuf,
    },
    /// The file system is full. Nothing was acknowledged by the failed call,
    /// and the queue is poisoned like after any failed write: free space (or
    /// remove old segments), then reopen. Reads keep working meanwhile.
    #[error(
        "disk full while writing {path}: free space or remove old segments, then reopen the queue (a failed write poisons it)"
    )]
    DiskFull {
        /// The file being written.
        path: PathBuf,
    },
    /// An earlier write or sync failed, so walq can no longer tell what reached
    /// the disk. Every append fails with this until the queue is reopened,
    /// which recovers from what is actually on disk.
    #[error("the queue is poisoned by an earlier failed write or sync; drop it and reopen the directory")]
    Poisoned,
    /// A record (or a batch) is larger than the configured limit.
    #[error(
        "record of {len} bytes exceeds the limit of {max} bytes; split it or raise QueueBuilder::max_record_bytes"
    )]
    RecordTooLarge {
        /// The encoded size of the record or batch.
        len: usize,
        /// The limit it exceeded.
        max: usize,
    },
    /// The offset asked for is not in the log: retention removed it, or it has
    /// not been written yet.
    #[error("offset {offset} is out of range: the log holds offsets {first}..{next}")]
    OffsetOutOfRange {
        /// The offset asked for.
        offset: u64,
        /// The first offset still held.
        first: u64,
        /// The offset the next append will get.
        next: u64,
    },
    /// A file was written by a newer version of walq. Upgrade walq; the file
    /// was not modified.
    #[error(
        "{path} uses format version {found}, this walq reads versions up to {supported}; upgrade walq (the file was not modified)"
    )]
    UnsupportedFormat {
        /// The file.
        path: PathBuf,
        /// The version found in the file.
        found: u32,
        /// The newest version this build reads.
        supported: u32,
    },
    /// Bytes on disk fail their checksum or structure, in a place where a
    /// crash cannot explain it (valid data follows, or the segment is sealed).
    /// walq refuses to cut acknowledged data; restore the file from a backup.
    #[error(
        "corrupt data in {path} at byte {position}: {reason}; walq will not cut data that may have been acknowledged; restore the file from a backup"
    )]
    Corrupt {
        /// The damaged file.
        path: PathBuf,
        /// The byte position of the damage within the file.
        position: u64,
        /// What check failed.
        reason: String,
    },
    /// An option has a value walq cannot work with.
    #[error("invalid option {name}: {reason}")]
    InvalidOption {
        /// The option's name, as in [`QueueBuilder`](crate::QueueBuilder)'s methods.
        name: &'static str,
        /// Why the value is rejected and what range is accepted.
        reason: String,
    },
    /// The queue directory does not exist and the options did not ask to create it.
    #[error("queue directory {dir} does not exist; create it or use QueueBuilder::create(true)")]
    NotFound {
        /// The directory.
        dir: PathBuf,
    },
    /// The queue holds its configured maximum of bytes
    /// ([`QueueBuilder::max_bytes`](crate::QueueBuilder::max_bytes)) and the
    /// append could not wait (or waited as long as it was allowed). Nothing
    /// was appended; the queue is not poisoned.
    #[error(
        "the queue is full ({max_bytes} bytes): let consumers move on so that retention can remove segments, or raise QueueBuilder::max_bytes"
    )]
    Full {
        /// The configured maximum.
        max_bytes: u64,
    },
    /// No consumer or group of this name exists (it was never committed, or
    /// was deleted).
    #[error("no {kind} named {name:?} exists; list them with Queue::consumers / Queue::groups")]
    UnknownConsumer {
        /// "consumer" or "group".
        kind: &'static str,
        /// The name asked for.
        name: String,
    },
    /// A consumer of this name is already open on this queue; one handle per
    /// name, so that two cannot commit over each other. Drop the other first,
    /// or share work through a group.
    #[error("consumer {name:?} is already open on this queue; drop the other handle or use a consumer group")]
    InUse {
        /// The consumer's name.
        name: String,
    },
    /// The delivery is no longer the pending one: it was acknowledged,
    /// terminated, or redelivered after its ack wait ran out. Its outcome is
    /// already decided; drop it.
    #[error(
        "delivery of offset {offset} is no longer pending (acknowledged, terminated, or redelivered after its ack wait); drop it"
    )]
    DeliveryNotPending {
        /// The record's offset.
        offset: u64,
    },
    /// An I/O error walq has no more specific variant for.
    #[error("{op} {path}: {source}")]
    Io {
        /// What walq was doing ("write", "fdatasync", "open", ...).
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
}

impl Error {
    /// Wraps an I/O error, turning ENOSPC/EDQUOT into [`Error::DiskFull`].
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Error {
        const ENOSPC: i32 = 28;
        const EDQUOT: i32 = 122;
        let path = path.into();
        match source.raw_os_error() {
            Some(ENOSPC) | Some(EDQUOT) => Error::DiskFull { path },
            _ => Error::Io { op, path, source },
        }
    }

    /// Copies the error for every waiter of a failed flush; `io::Error` is not
    /// `Clone`, so its kind, OS code and message are kept.
    pub(crate) fn duplicate(&self) -> Error {
        match self {
            Error::Locked { dir } => Error::Locked { dir: dir.clone() },
            Error::DiskFull { path } => Error::DiskFull { path: path.clone() },
            Error::Poisoned => Error::Poisoned,
            Error::RecordTooLarge { len, max } => Error::RecordTooLarge { len: *len, max: *max },
            Error::OffsetOutOfRange { offset, first, next } => {
                Error::OffsetOutOfRange { offset: *offset, first: *first, next: *next }
            }
            Error::UnsupportedFormat { path, found, supported } => {
                Error::UnsupportedFormat { path: path.clone(), found: *found, supported: *supported }
            }
            Error::Corrupt { path, position, reason } => {
                Error::Corrupt { path: path.clone(), position: *position, reason: reason.clone() }
            }
            Error::InvalidOption { name, reason } => Error::InvalidOption { name, reason: reason.clone() },
            Error::NotFound { dir } => Error::NotFound { dir: dir.clone() },
            Error::Full { max_bytes } => Error::Full { max_bytes: *max_bytes },
            Error::UnknownConsumer { kind, name } => Error::UnknownConsumer { kind, name: name.clone() },
            Error::InUse { name } => Error::InUse { name: name.clone() },
            Error::DeliveryNotPending { offset } => Error::DeliveryNotPending { offset: *offset },
            Error::Io { op, path, source } => {
                let source = match source.raw_os_error() {
                    Some(code) => io::Error::from_raw_os_error(code),
                    None => io::Error::new(source.kind(), source.to_string()),
                };
                Error::Io { op, path: path.clone(), source }
            }
        }
    }

    /// A corruption error.
    pub(crate) fn corrupt(path: impl Into<PathBuf>, position: u64, reason: impl Into<String>) -> Error {
        Error::Corrupt { path: path.into(), position, reason: reason.into() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_is_send_sync_static() {
        fn check<T: Send + Sync + 'static + std::error::Error>() {}
        check::<Error>();
    }

    #[test]
    fn duplicate_keeps_the_os_code() {
        let e = Error::io("fdatasync", "/x", io::Error::from_raw_os_error(5));
        match e.duplicate() {
            Error::Io { source, op, .. } => assert_eq!((source.raw_os_error(), op), (Some(5), "fdatasync")),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            Error::io("w", "/x", io::Error::from_raw_os_error(28)).duplicate(),
            Error::DiskFull { .. }
        ));
    }

    #[test]
    fn enospc_becomes_disk_full() {
        let e = Error::io("write", "/x", io::Error::from_raw_os_error(28));
        assert!(matches!(e, Error::DiskFull { .. }));
        let e = Error::io("write", "/x", io::Error::from_raw_os_error(5));
        assert!(matches!(e, Error::Io { .. }));
        assert!(std::error::Error::source(&e).is_some());
    }
}
