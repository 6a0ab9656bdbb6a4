//! Named consumers: a reader whose position is saved in the consumer journal
//! (`journal.rs`) by `commit`, so that it resumes there after any restart.
//! Invariants: a committed position is never ahead of the log; one open
//! handle per name per queue.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::Durability;
use crate::error::{Error, Result};
use crate::journal::{Entry, check_name};
use crate::queue::Core;
use crate::reader::Reader;
use crate::record::{OwnedRecord, RecordRef};

/// Where a consumer (or group) that has no saved position starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StartAt {
    /// At the first record the log still holds.
    #[default]
    Earliest,
    /// After the last record appended so far: only new records.
    Latest,
    /// At this offset (it must be in the log, or its end).
    Offset(u64),
    /// At the first record whose timestamp is at or after this time
    /// (milliseconds since the Unix epoch); the end of the log if none is.
    Timestamp(u64),
}

/// A consumer's saved position, as [`Queue::consumers`](crate::Queue::consumers) lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConsumerInfo {
    /// The consumer's name.
    pub name: String,
    /// The committed position: the offset it reads next after a restart.
    pub position: u64,
    /// Records appended at or after the position (what it has yet to commit).
    pub lag: u64,
}

/// A named consumer: reads the log from its committed position and saves
/// its position with [`commit`](Consumer::commit). Created by
/// [`Queue::consumer`](crate::Queue::consumer).
///
/// A new consumer's starting position is saved at once, so it resumes there
/// even if it never commits. The position committed is the offset to read
/// next: after processing the record at offset `n`, commit `n + 1` (or call
/// [`commit_position`](Consumer::commit_position)). Delivery is therefore
/// at-least-once: records read after the last commit are read again after a
/// restart.
///
/// ```
/// use std::time::Duration;
/// let dir = tempfile::tempdir()?;
/// let queue = walq::Queue::open(dir.path())?;
/// queue.append(b"one")?;
/// queue.append(b"two")?;
/// let mut consumer = queue.consumer("billing")?;
/// let first = consumer.next_timeout(Duration::ZERO)?.unwrap().value().to_vec();
/// assert_eq!(first, b"one");
/// consumer.commit_position()?; // processed "one"
/// drop(consumer);
/// let mut again = queue.consumer("billing")?; // resumes after "one"
/// assert_eq!(again.next_timeout(Duration::ZERO)?.unwrap().value(), b"two");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct Consumer {
    core: Arc<Core>,
    name: String,
    reader: Reader,
    committed: u64,
}

impl Consumer {
    pub(crate) fn open(core: &Arc<Core>, name: &str, start: StartAt) -> Result<Consumer> {
        check_name("consumer", name)?;
        {
            let mut open = core.open_consumers.lock().unwrap_or_else(|e| e.into_inner());
            if !open.insert(name.to_string()) {
                return Err(Error::InUse { name: name.to_string() });
            }
        }
        // From here the name is ours: release it if anything fails.
        let guard = NameGuard { core, name };
        let saved = core.journal.with_image(|img| img.consumers.get(name).copied());
        let position = match saved {
            Some(p) => p,
            None => {
                let p = core.resolve_start(start)?;
                core.journal
                    .record(&[Entry::Commit { name: name.to_string(), offset: p }], Durability::Sync)?;
                p
            }
        };
        std::mem::forget(guard);
        core.add_user();
        Ok(Consumer {
            core: Arc::clone(core),
            name: name.to_string(),
            reader: Reader::new(Arc::clone(&core.log), position),
            committed: position,
        })
    }

    /// The consumer's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The offset the next read returns.
    pub fn position(&self) -> u64 {
        self.reader.position()
    }

    /// The last committed position.
    pub fn committed(&self) -> u64 {
        self.committed
    }

    /// Records appended at or after the read position.
    pub fn lag(&self) -> u64 {
        self.core.log.visible().saturating_sub(self.position())
    }

    /// Moves the read position (the committed one stays until the next commit).
    pub fn seek(&mut self, offset: u64) {
        self.reader.seek(offset);
    }

    /// The next record, waiting up to `timeout` for one to be appended;
    /// `Ok(None)` if none came. The record borrows the segment's map
    /// (zero-copy) until the next call.
    pub fn next_timeout(&mut self, timeout: Duration) -> Result<Option<RecordRef<'_>>> {
        self.skip_removed();
        let pos = self.reader.position();
        let log = &self.core.log;
        if log.visible() <= pos && !timeout.is_zero() {
            let deadline = Instant::now() + timeout;
            log.tail.wait_until(deadline, || log.visible() > pos);
        }
        self.reader.next()
    }

    /// Up to `max` records, waiting up to `timeout` for the first one; an
    /// empty vector if none came.
    ///
    /// ```
    /// use std::time::Duration;
    /// let dir = tempfile::tempdir()?;
    /// let queue = walq::Queue::open(dir.path())?;
    /// queue.append_batch(&[walq::Record::new(b"a"), walq::Record::new(b"b")])?;
    /// let mut consumer = queue.consumer("c")?;
    /// let records = consumer.poll(10, Duration::from_millis(100))?;
    /// assert_eq!(records.len(), 2);
    /// consumer.commit(records[1].offset + 1)?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn poll(&mut self, max: usize, timeout: Duration) -> Result<Vec<OwnedRecord>> {
        let mut out = Vec::new();
        if max == 0 {
            return Ok(out);
        }
        if let Some(r) = self.next_timeout(timeout)? {
            out.push(r.to_owned_record());
        }
        while out.len() < max && !out.is_empty() {
            match self.reader.next()? {
                Some(r) => out.push(r.to_owned_record()),
                None => break,
            }
        }
        Ok(out)
    }

    /// Saves `offset` as the position to resume at (the offset after the last
    /// record processed), durably: fdatasync'd before this returns. It must
    /// not be past the end of the log.
    pub fn commit(&mut self, offset: u64) -> Result<()> {
        self.commit_with(offset, Durability::Sync)
    }

    /// Commits the read position: everything returned so far is processed.
    pub fn commit_position(&mut self) -> Result<()> {
        self.commit(self.position())
    }

    /// [`commit`](Consumer::commit) with the durability given: `Os` survives
    /// a crash of the process but not a power cut; `Interval` is written and
    /// synced by the queue's background thread within the interval.
    pub fn commit_with(&mut self, offset: u64, durability: Durability) -> Result<()> {
        let next = self.core.log.visible();
        if offset > next {
            return Err(Error::OffsetOutOfRange { offset, first: self.core.log.first_offset(), next });
        }
        if matches!(durability, Durability::Interval(_)) {
            self.core.ensure_housekeeping()?;
        }
        let tell_housekeeper = self
            .core
            .journal
            .record_scheduling(&[Entry::Commit { name: self.name.clone(), offset }], durability)?;
        if tell_housekeeper {
            self.core.housekeeping_due();
        }
        self.core.retention_due();
        self.committed = offset;
        Ok(())
    }

    /// A record at or past the position may have been removed by retention
    /// (not in queue mode): continue at the first one held, and say so.
    fn skip_removed(&mut self) {
        let first = self.core.log.first_offset();
        let pos = self.reader.position();
        if pos < first {
            tracing::warn!(consumer = %self.name, from = pos, to = first, "retention removed records this consumer had not read; skipping them");
            self.reader.seek(first);
        }
    }

    /// The records from the read position on as an async
    /// [`Stream`](futures_core::Stream) (feature `async`): it waits for new
    /// appends without blocking a thread.
    ///
    /// ```
    /// # #[cfg(feature = "async")] {
    /// # let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    /// # rt.block_on(async {
    /// let dir = tempfile::tempdir().unwrap();
    /// let queue = walq::Queue::open(dir.path()).unwrap();
    /// queue.append(b"x").unwrap();
    /// let mut stream = queue.consumer("c").unwrap().into_stream();
    /// let first = std::future::poll_fn(|cx| std::pin::Pin::new(&mut stream).poll_next_record(cx)).await;
    /// assert_eq!(first.unwrap().unwrap().value, b"x");
    /// # });
    /// # }
    /// ```
    #[cfg(feature = "async")]
    pub fn into_stream(self) -> ConsumerStream {
        ConsumerStream { consumer: self }
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        self.core.open_consumers.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.name);
        self.core.release_user();
    }
}

/// Releases a consumer name whose open failed.
struct NameGuard<'a> {
    core: &'a Arc<Core>,
    name: &'a str,
}

impl Drop for NameGuard<'_> {
    fn drop(&mut self) {
        self.core.open_consumers.lock().unwrap_or_else(|e| e.into_inner()).remove(self.name);
    }
}

/// A [`Consumer`] as an async stream of records (feature `async`), from
/// [`Consumer::into_stream`]. Implements [`futures_core::Stream`]; the
/// consumer stays reachable to commit through [`consumer_mut`](ConsumerStream::consumer_mut).
#[cfg(feature = "async")]
#[derive(Debug)]
pub struct ConsumerStream {
    consumer: Consumer,
}

#[cfg(feature = "async")]
impl ConsumerStream {
    /// The consumer, to commit or seek.
    pub fn consumer_mut(&mut self) -> &mut Consumer {
        &mut self.consumer
    }

    /// Polls for the next record (what [`futures_core::Stream::poll_next`] does).
    pub fn poll_next_record(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<OwnedRecord>>> {
        let this = self.get_mut();
        let c = &mut this.consumer;
        c.skip_removed();
        let pos = c.reader.position();
        let log = Arc::clone(&c.core.log);
        if log.visible() <= pos && !log.tail.register(cx.waker(), || log.visible() > pos) {
            return std::task::Poll::Pending;
        }
        match c.reader.next() {
            Ok(Some(r)) => std::task::Poll::Ready(Some(Ok(r.to_owned_record()))),
            Ok(None) => {
                // Visible but not readable yet cannot happen; wake to retry.
                cx.waker().wake_by_ref();
                std::task::Poll::Pending
            }
            Err(e) => std::task::Poll::Ready(Some(Err(e))),
        }
    }
}

#[cfg(feature = "async")]
impl futures_core::Stream for ConsumerStream {
    type Item = Result<OwnedRecord>;
    fn poll_next(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.poll_next_record(cx)
    }
}
