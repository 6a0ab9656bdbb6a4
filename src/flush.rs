//! Group commit. Producers copy records into the pending batches under a short
//! lock and get offsets. One flusher at a time (the first `Sync` producer that
//! finds no flush in flight, or the background thread for async waiters and
//! timers) takes every pending batch, writes each with one syscall, issues one
//! fdatasync, advances the durable watermark, and wakes exactly the waiters it
//! covered. If waiters remain, the next round is reserved for the background
//! flusher (or handed to the first waiting producer when that thread is not
//! running). Producers fill the next batches meanwhile. Invariant: at most one
//! round is in flight (`State::flushing`), and every waiter is completed
//! exactly once.

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::Arc;
use std::task::Waker;
use std::time::{Duration, Instant};
// The model check at the bottom of this file swaps in loom's locks, condvar
// and threads; everything else is the same code either way.
#[cfg(not(all(test, walq_loom)))]
use std::{
    sync::{Condvar, Mutex, MutexGuard},
    thread,
};
#[cfg(all(test, walq_loom))]
use {
    loom::sync::{Condvar, Mutex, MutexGuard},
    loom_model::thread,
};

use crate::batch::BatchBuilder;
use crate::config::{Durability, OS_WRITE_DELAY};
use crate::error::{Error, Result};
use crate::record::Record;
use crate::writer::Writer;

/// The longest a leader waits to gather the producers of the last round.
const GATHER_MAX: Duration = Duration::from_micros(200);

/// Upper bounds (inclusive, microseconds) of the buckets of
/// [`Stats::sync_histogram`](crate::Stats::sync_histogram); one more bucket
/// counts what lies above the last bound. Prometheus' `le` labels.
pub const SYNC_HISTOGRAM_BOUNDS_MICROS: [u32; 12] =
    [50, 100, 200, 300, 500, 750, 1_000, 2_500, 5_000, 10_000, 50_000, 250_000];
/// Buckets of the sync latency histogram: the bounds plus one.
pub(crate) const SYNC_HISTOGRAM_BUCKETS: usize = SYNC_HISTOGRAM_BOUNDS_MICROS.len() + 1;
const _: () = assert!(SYNC_HISTOGRAM_BUCKETS == 13, "Stats::sync_histogram has 13 buckets");

/// Async `Os`/`Interval` appends write inline (backpressure) only once this
/// many write buffers are pending; below, the background thread writes.
const ASYNC_INLINE_WRITE_FACTOR: usize = 8;

/// Sync latencies kept for the percentiles in [`crate::Stats`].
const SYNC_LATENCIES_KEPT: usize = 1024;

/// What the flusher needs from the options.
#[derive(Debug, Clone)]
pub(crate) struct FlushConfig {
    pub max_record_bytes: usize,
    /// `Os`/`Interval` records are written once this many bytes are pending.
    pub write_buffer_bytes: usize,
    /// A batch is closed (a new one started) before it grows past this.
    pub batch_bytes_max: usize,
    /// How long a leader waits for more producers before taking the batch.
    pub linger: Duration,
    /// Record timestamps come from here.
    pub clock: crate::clock::Clock,
    /// Whether a `Sync` producer leads a flush itself (the default) or waits
    /// for the background thread to do it (kept to measure the difference).
    pub producers_lead: bool,
}

/// What a round needs from the log's tail: the [`Writer`], or the loom
/// model's fake. The contract is the writer's: batches are written in offset
/// order, `sync` covers everything written, and after an error every call fails.
pub(crate) trait FlushIo: Send + 'static {
    /// Offset after the last record written.
    fn written(&self) -> u64;
    fn write_batch(&mut self, batch: &mut BatchBuilder) -> Result<()>;
    /// Returns the new durable offset.
    fn sync(&mut self) -> Result<u64>;
    /// Segment rolls so far (for [`crate::Stats`]).
    fn rolls(&self) -> u64;
    /// Best effort, on a clean close: see [`Writer::mark_synced`].
    fn mark_synced(&mut self);
}

impl FlushIo for Writer {
    fn written(&self) -> u64 {
        Writer::written(self)
    }
    fn write_batch(&mut self, batch: &mut BatchBuilder) -> Result<()> {
        Writer::write_batch(self, batch)
    }
    fn sync(&mut self) -> Result<u64> {
        Writer::sync(self)
    }
    fn rolls(&self) -> u64 {
        self.counters.rolls
    }
    fn mark_synced(&mut self) {
        Writer::mark_synced(self)
    }
}

/// The group-commit machinery shared by the queue and its background thread.
#[derive(Debug)]
pub(crate) struct Flush<W = Writer> {
    state: Mutex<State>,
    /// The active segment's I/O; held only by the flusher of the round.
    io: Mutex<W>,
    /// The background thread waits here for timers and async waiters.
    work: Condvar,
    /// A gathering leader waits here for the producers of the last round.
    gathered: Condvar,
    cfg: FlushConfig,
    background: Mutex<Option<thread::JoinHandle<()>>>,
}

#[derive(Debug)]
struct State {
    /// Pending batches in offset order; only the last one takes new records.
    pending: Vec<BatchBuilder>,
    /// Builders whose buffers are reused (no allocation per batch once warm).
    spare: Vec<BatchBuilder>,
    pending_bytes: usize,
    next_offset: u64,
    written: u64,
    durable: u64,
    /// A round is in flight: its batches are out of `pending`.
    flushing: bool,
    poisoned: bool,
    /// Waiting `Sync` appends (and flushes), in target order.
    waiters: VecDeque<Arc<Waiter>>,
    /// The background thread must lead the next round (an async waiter waits).
    background_lead: bool,
    /// The next round is reserved for the background thread (`flushing` is
    /// set on its behalf until it leads).
    reserved_for_background: bool,
    /// The background thread is in its loop (started and not stopped).
    background_running: bool,
    /// A leader is gathering: it starts its round once `next_offset` reaches this.
    gather_until: Option<u64>,
    write_due: Option<Instant>,
    sync_due: Option<Instant>,
    shutdown: bool,
    background_started: bool,
    stats: FlushStats,
}

/// Counters of the flusher, copied into [`crate::Stats`].
#[derive(Debug, Clone, Default)]
pub(crate) struct FlushStats {
    pub appends: u64,
    pub bytes: u64,
    pub batches: u64,
    pub syncs: u64,
    pub rolls: u64,
    pub records_synced: u64,
    pub last_records_per_sync: u64,
    /// The most recent sync latencies (µs), a ring.
    pub sync_micros: Vec<u32>,
    pub sync_micros_next: usize,
    /// Every flush round's latency since open, counted per bucket of
    /// [`crate::SYNC_HISTOGRAM_BOUNDS_MICROS`] (the last bucket: above all bounds).
    pub sync_histogram: [u64; SYNC_HISTOGRAM_BUCKETS],
    /// Sum of every round's latency since open (µs).
    pub sync_micros_total: u64,
    pub next_offset: u64,
    pub written: u64,
    pub durable: u64,
    pub poisoned: bool,
}

/// One producer (or `flush` call) waiting for a sync that covers `target`.
#[derive(Debug)]
pub(crate) struct Waiter {
    target: u64,
    slot: Mutex<Slot>,
}

#[derive(Debug)]
struct Slot {
    outcome: Outcome,
    wake: Wake,
}

#[derive(Debug)]
enum Outcome {
    Pending,
    Done(Result<()>),
    /// No round is in flight and this waiter is the first one uncovered: it leads.
    Lead,
}

#[derive(Debug)]
enum Wake {
    Thread(thread::Thread),
    #[cfg_attr(not(feature = "async"), allow(dead_code))]
    Task(Option<Waker>),
}

impl Waiter {
    fn new(target: u64, wake: Wake) -> Arc<Waiter> {
        Arc::new(Waiter { target, slot: Mutex::new(Slot { outcome: Outcome::Pending, wake }) })
    }

    fn slot(&self) -> MutexGuard<'_, Slot> {
        self.slot.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn is_thread(&self) -> bool {
        matches!(self.slot().wake, Wake::Thread(_))
    }

    /// Completes the waiter and wakes it; called once per waiter.
    fn finish(&self, outcome: Outcome) {
        let mut slot = self.slot();
        slot.outcome = outcome;
        match &mut slot.wake {
            Wake::Thread(t) => t.unpark(),
            Wake::Task(w) => {
                if let Some(w) = w.take() {
                    w.wake();
                }
            }
        }
    }

    /// Parks the calling thread until the waiter is completed.
    fn park(&self) -> Outcome {
        loop {
            {
                let mut slot = self.slot();
                if !matches!(slot.outcome, Outcome::Pending) {
                    return std::mem::replace(&mut slot.outcome, Outcome::Pending);
                }
            }
            thread::park();
        }
    }

    /// For futures: the outcome if there is one, else remembers the waker.
    #[cfg_attr(not(feature = "async"), allow(dead_code))]
    pub(crate) fn poll(&self, waker: &Waker) -> Option<Result<()>> {
        let mut slot = self.slot();
        match std::mem::replace(&mut slot.outcome, Outcome::Pending) {
            Outcome::Done(r) => Some(r),
            other => {
                slot.outcome = other;
                slot.wake = Wake::Task(Some(waker.clone()));
                None
            }
        }
    }
}

impl<W: FlushIo> Flush<W> {
    pub(crate) fn new(io: W, cfg: FlushConfig) -> Flush<W> {
        let next = io.written();
        Flush {
            state: Mutex::new(State {
                pending: Vec::new(),
                spare: Vec::new(),
                pending_bytes: 0,
                next_offset: next,
                written: next,
                durable: next,
                flushing: false,
                poisoned: false,
                waiters: VecDeque::new(),
                background_lead: false,
                reserved_for_background: false,
                background_running: false,
                gather_until: None,
                write_due: None,
                sync_due: None,
                shutdown: false,
                background_started: false,
                stats: FlushStats::default(),
            }),
            io: Mutex::new(io),
            work: Condvar::new(),
            gathered: Condvar::new(),
            cfg,
            background: Mutex::new(None),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state only changes in whole steps under the lock; a panic
        // elsewhere cannot leave it half-updated.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends records as one unit; returns their offsets once they are as
    /// durable as asked.
    pub(crate) fn append(
        self: &Arc<Self>,
        records: &[Record<'_>],
        durability: Durability,
    ) -> Result<Range<u64>> {
        let mut st = self.lock();
        let range = self.push(&mut st, records)?;
        match durability {
            Durability::Sync => self.wait_durable(st, range.end)?,
            Durability::Interval(d) => {
                let due = Instant::now() + d;
                let wake = st.sync_due.is_none_or(|t| due < t);
                st.sync_due = Some(st.sync_due.map_or(due, |t| t.min(due)));
                self.write_if_full(st, wake)?;
            }
            Durability::Os => {
                let wake = st.write_due.is_none();
                if wake {
                    st.write_due = Some(Instant::now() + OS_WRITE_DELAY);
                }
                self.write_if_full(st, wake)?;
            }
        }
        Ok(range)
    }

    /// Registers an async append: pushes the records now and returns what the
    /// future waits on (`None` when nothing needs waiting for).
    #[cfg_attr(not(feature = "async"), allow(dead_code))]
    pub(crate) fn append_waiter(
        self: &Arc<Self>,
        records: &[Record<'_>],
        durability: Durability,
    ) -> Result<(Range<u64>, Option<Arc<Waiter>>)> {
        if durability != Durability::Sync {
            // An async caller's thread is a runtime's: it does not write
            // here; the background thread does, when due (or at once when the
            // buffer is full). Only far past the buffer (producers outrunning
            // the disk) does it write inline, as backpressure.
            let mut st = self.lock();
            if st.pending_bytes >= ASYNC_INLINE_WRITE_FACTOR * self.cfg.write_buffer_bytes && !st.flushing {
                drop(st);
                return Ok((self.append(records, durability)?, None));
            }
            let range = self.push(&mut st, records)?;
            let now = Instant::now();
            match durability {
                Durability::Interval(d) => {
                    let due = now + d;
                    st.sync_due = Some(st.sync_due.map_or(due, |t| t.min(due)));
                }
                _ => {
                    if st.write_due.is_none() {
                        st.write_due = Some(now + OS_WRITE_DELAY);
                    }
                }
            }
            if st.pending_bytes >= self.cfg.write_buffer_bytes {
                st.write_due = Some(now);
            }
            drop(st);
            self.wake_background();
            return Ok((range, None));
        }
        let mut st = self.lock();
        let range = self.push(&mut st, records)?;
        let waiter = Waiter::new(range.end, Wake::Task(None));
        st.waiters.push_back(Arc::clone(&waiter));
        if !st.flushing {
            st.background_lead = true;
        }
        drop(st);
        self.wake_background();
        Ok((range, Some(waiter)))
    }

    /// Copies records into the pending batches; checks everything first so
    /// that a bad record leaves nothing behind.
    fn push(&self, st: &mut State, records: &[Record<'_>]) -> Result<Range<u64>> {
        if st.poisoned {
            return Err(Error::Poisoned);
        }
        for r in records {
            let len = r.encoded_len();
            if len > self.cfg.max_record_bytes {
                return Err(Error::RecordTooLarge { len, max: self.cfg.max_record_bytes });
            }
        }
        let first = st.next_offset;
        let mut now_ms = None;
        for r in records {
            let len = r.encoded_len();
            let full = st.pending.last().is_none_or(|b| b.encoded_len() + len > self.cfg.batch_bytes_max);
            if full {
                let mut b = st.spare.pop().unwrap_or_default();
                b.reset(st.next_offset);
                st.pending.push(b);
            }
            let ts = match r.timestamp_ms {
                Some(ts) => ts,
                None => *now_ms.get_or_insert_with(|| self.cfg.clock.now_ms()),
            };
            let State { pending, pending_bytes, next_offset, stats, .. } = st;
            let batch = pending.last_mut().expect("a pending batch was ensured above");
            let before = batch.encoded_len();
            batch.push(r.key, &r.headers, r.value, ts);
            *pending_bytes += batch.encoded_len() - before;
            *next_offset += 1;
            stats.appends += 1;
            stats.bytes += r.value.len() as u64;
        }
        if st.gather_until.is_some_and(|t| st.next_offset >= t) {
            self.gathered.notify_one();
        }
        Ok(first..st.next_offset)
    }

    /// `Os`/`Interval`: write (without a sync) once the buffer is full, unless
    /// a round is in flight (it or the background thread will take it).
    fn write_if_full(self: &Arc<Self>, st: MutexGuard<'_, State>, wake: bool) -> Result<()> {
        if st.pending_bytes >= self.cfg.write_buffer_bytes && !st.flushing {
            let (_st, result) = self.lead(st, false);
            return result;
        }
        drop(st);
        if wake {
            self.wake_background();
        }
        Ok(())
    }

    /// Returns once a sync covers offsets below `target`, leading the flush
    /// when nobody else is.
    fn wait_durable(self: &Arc<Self>, mut st: MutexGuard<'_, State>, target: u64) -> Result<()> {
        if st.durable >= target {
            return Ok(());
        }
        if st.poisoned {
            return Err(Error::Poisoned);
        }
        if !st.flushing && self.cfg.producers_lead {
            return self.lead(st, true).1;
        }
        let waiter = Waiter::new(target, Wake::Thread(thread::current()));
        st.waiters.push_back(Arc::clone(&waiter));
        let wake = !st.flushing;
        if wake {
            st.background_lead = true;
        }
        // Rounds after this one are the flusher thread's: make sure it runs.
        let start_background = !st.background_started;
        drop(st);
        if wake || start_background {
            self.wake_background();
        }
        match waiter.park() {
            Outcome::Done(result) => result,
            Outcome::Lead => self.lead(self.lock(), true).1,
            Outcome::Pending => unreachable!("park returns only a completed outcome"),
        }
    }

    /// Encoded bytes appended and not yet written.
    pub(crate) fn pending_bytes(&self) -> usize {
        self.lock().pending_bytes
    }

    /// Syncs everything appended so far.
    pub(crate) fn flush(self: &Arc<Self>) -> Result<()> {
        let st = self.lock();
        if st.poisoned {
            return Err(Error::Poisoned);
        }
        let target = st.next_offset;
        self.wait_durable(st, target)
    }

    /// One round: take every pending batch, write each, sync if asked, then
    /// complete the covered waiters and hand the lead on. The caller's own
    /// records are in the round (they were pending), so its result is the
    /// round's.
    /// The caller saw `flushing == false`, or was handed the lead (which
    /// reserved the round for it by leaving `flushing` set).
    fn lead<'a>(&'a self, mut st: MutexGuard<'a, State>, sync: bool) -> (MutexGuard<'a, State>, Result<()>) {
        st.flushing = true;
        if sync && !self.cfg.linger.is_zero() {
            // Let more producers join this round; `flushing` keeps others from leading.
            drop(st);
            pause(self.cfg.linger);
            st = self.lock();
        }
        if sync {
            st = self.gather(st);
        }
        let mut batches = std::mem::take(&mut st.pending);
        st.pending_bytes = 0;
        st.write_due = None;
        if sync {
            st.sync_due = None;
        }
        let end = st.next_offset;
        let durable_before = st.durable;
        drop(st);

        let started = Instant::now();
        let (result, written, rolls) = {
            let mut io = self.io.lock().unwrap_or_else(|e| e.into_inner());
            let mut result = batches.iter_mut().try_for_each(|b| io.write_batch(b));
            if result.is_ok() && sync {
                result = io.sync().map(|_| ());
            }
            (result, io.written(), io.rolls())
        };
        let micros = u32::try_from(started.elapsed().as_micros()).unwrap_or(u32::MAX);

        let mut st = self.lock();
        debug_assert!(st.flushing, "only the round in flight ends it");
        st.flushing = false;
        st.stats.batches += batches.len() as u64;
        st.stats.rolls = rolls;
        st.spare.append(&mut batches);
        // Waiters are woken after the lock is released: an unpark is a
        // syscall, and producers appending meanwhile need the lock.
        let mut done = Vec::new();
        let result = match result {
            Ok(()) => {
                st.written = end;
                if sync {
                    st.durable = end;
                    let covered = end - durable_before;
                    let stats = &mut st.stats;
                    stats.syncs += 1;
                    stats.records_synced += covered;
                    stats.last_records_per_sync = covered;
                    if stats.sync_micros.len() < SYNC_LATENCIES_KEPT {
                        stats.sync_micros.push(micros);
                    } else {
                        let i = stats.sync_micros_next;
                        stats.sync_micros[i] = micros;
                    }
                    stats.sync_micros_next = (stats.sync_micros_next + 1) % SYNC_LATENCIES_KEPT;
                    let bucket = SYNC_HISTOGRAM_BOUNDS_MICROS.partition_point(|&b| b < micros);
                    stats.sync_histogram[bucket] += 1;
                    stats.sync_micros_total += u64::from(micros);
                }
                while st.waiters.front().is_some_and(|w| w.target <= st.durable) {
                    if let Some(w) = st.waiters.pop_front() {
                        done.push((w, Outcome::Done(Ok(()))));
                    }
                }
                Ok(())
            }
            Err(e) => {
                // The latch: nothing pending is acknowledged, every waiter fails
                // (with the original error if its records were in this round),
                // and every later call gets `Poisoned` until the queue is reopened.
                st.poisoned = true;
                for w in std::mem::take(&mut st.waiters) {
                    let err = if w.target <= end { e.duplicate() } else { Error::Poisoned };
                    done.push((w, Outcome::Done(Err(err))));
                }
                let dropped = std::mem::take(&mut st.pending);
                st.spare.extend(dropped);
                st.pending_bytes = 0;
                st.next_offset = written;
                st.written = written;
                st.write_due = None;
                st.sync_due = None;
                Err(e)
            }
        };
        if let Some(next) = self.hand_off(&mut st) {
            done.push((next, Outcome::Lead));
        }
        if done.is_empty() {
            return (st, result);
        }
        drop(st);
        for (w, outcome) in done {
            w.finish(outcome);
        }
        (self.lock(), result)
    }

    /// Adaptive gathering. When the last sync covered several producers, they
    /// were woken together and are about to append again; a round started by
    /// the first of them alone would cover one record while the rest wait a
    /// whole sync for the next. So the leader waits (holding the round) until
    /// as many records as the last sync covered are pending, or half a recent
    /// sync's time has passed, whichever is first. One producer never waits.
    fn gather<'a>(&'a self, mut st: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        if cfg!(all(test, walq_loom)) {
            // A timing heuristic: loom's timed waits never time out, and the
            // protocol is the same without it.
            return st;
        }
        let expected = st.stats.last_records_per_sync;
        let pending = st.next_offset - st.written;
        // Only when the round would be much smaller than the last: under heavy
        // load producers keep arriving during each sync, and waiting for a
        // full round would only stop the pipeline (measured: 64 threads).
        if !self.cfg.producers_lead || expected <= 1 || pending * 2 >= expected {
            return st;
        }
        let last = st.stats.sync_micros.get(st.stats.sync_micros_next.wrapping_sub(1) % SYNC_LATENCIES_KEPT);
        let cap = Duration::from_micros(u64::from(last.copied().unwrap_or(0) / 2)).min(GATHER_MAX);
        let deadline = Instant::now() + cap;
        let target = st.written + expected;
        st.gather_until = Some(target);
        while st.next_offset < target {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            st = self.gathered.wait_timeout(st, deadline - now).map_or_else(|e| e.into_inner().0, |r| r.0);
        }
        st.gather_until = None;
        st
    }

    /// After a round: the first uncovered waiter leads the next one (a thread
    /// leads itself; for an async waiter the background thread does).
    /// Under load the flusher thread runs round after round: the next round
    /// is reserved for it (`flushing` stays set), so that no producer arriving
    /// in between starts a round with only its own record. Measured on this
    /// project's 2-core VM: handing the lead to a waiting producer instead
    /// gave ~120K appends/s with 64 threads against ~170K this way, since the
    /// flusher is already running while a parked producer must be scheduled.
    /// Falls back to handing the lead to a waiting producer if the thread is
    /// not running. Returns the waiter to hand the lead to (the caller wakes it).
    fn hand_off(&self, st: &mut State) -> Option<Arc<Waiter>> {
        let first = st.waiters.front()?;
        if st.background_running && !st.shutdown {
            st.flushing = true;
            st.reserved_for_background = true;
            self.work.notify_one();
            None
        } else if first.is_thread() {
            // Reserve the round for it: nobody else may lead until it does.
            st.flushing = true;
            st.waiters.pop_front()
        } else {
            st.background_lead = true;
            self.work.notify_one();
            None
        }
    }

    /// Starts the background thread on first need, and wakes it.
    fn wake_background(self: &Arc<Self>) {
        let mut st = self.lock();
        if !st.background_started && !st.shutdown {
            st.background_started = true;
            drop(st);
            let me = Arc::clone(self);
            match thread::Builder::new().name("walq-flusher".into()).spawn(move || me.background()) {
                Ok(handle) => *self.background.lock().unwrap_or_else(|e| e.into_inner()) = Some(handle),
                Err(e) => tracing::error!(error = %e, "could not start the background flusher; call flush()"),
            }
        } else {
            drop(st);
        }
        self.work.notify_one();
    }

    /// The background flusher: leads rounds for async waiters, writes `Os`
    /// records after a short delay, and syncs `Interval` records by their
    /// deadline.
    fn background(&self) {
        let mut st = self.lock();
        st.background_running = !st.shutdown;
        while !st.shutdown {
            if st.reserved_for_background {
                st.reserved_for_background = false;
                st = self.lead(st, true).0;
                continue;
            }
            let now = Instant::now();
            if !st.flushing && !st.poisoned {
                if st.background_lead {
                    st.background_lead = false;
                    if !st.waiters.is_empty() {
                        st = self.lead(st, true).0;
                        continue;
                    }
                }
                if st.sync_due.is_some_and(|t| t <= now) {
                    st = self.lead(st, true).0;
                    continue;
                }
                if st.write_due.is_some_and(|t| t <= now) {
                    st = self.lead(st, false).0;
                    continue;
                }
            }
            let next = match (st.write_due, st.sync_due) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            // While a round is in flight its leader hands off; timers are rechecked soon.
            let next = if st.flushing { Some(now + OS_WRITE_DELAY) } else { next };
            st = match next {
                Some(t) => {
                    let wait = t.saturating_duration_since(now);
                    self.work.wait_timeout(st, wait).map_or_else(|e| e.into_inner().0, |r| r.0)
                }
                None => self.work.wait(st).unwrap_or_else(|e| e.into_inner()),
            };
        }
        st.background_running = false;
        if st.reserved_for_background {
            // Release a round reserved for us; the closing flush takes it.
            st.reserved_for_background = false;
            st.flushing = false;
        }
    }

    /// The last flush of a queue being closed: leads a round itself (the
    /// background thread is stopped), after any round in flight.
    pub(crate) fn final_flush(&self) -> Result<()> {
        loop {
            let st = self.lock();
            if st.poisoned {
                return Err(Error::Poisoned);
            }
            if !st.flushing {
                let (st, result) = self.lead(st, true);
                if result.is_ok() {
                    // Still holding the state lock: no round can start meanwhile.
                    self.io.lock().unwrap_or_else(|e| e.into_inner()).mark_synced();
                }
                drop(st);
                return result;
            }
            drop(st);
            pause(Duration::from_micros(50));
        }
    }

    /// Stops the background thread (after it finishes its round).
    pub(crate) fn stop_background(&self) {
        // Under the state lock, so the thread is either before its shutdown
        // check or already waiting: the notify cannot be lost.
        self.lock().shutdown = true;
        self.work.notify_all();
        let handle = self.background.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(h) = handle {
            let _ = h.join();
        }
    }

    pub(crate) fn next_offset(&self) -> u64 {
        self.lock().next_offset
    }

    pub(crate) fn is_poisoned(&self) -> bool {
        self.lock().poisoned
    }

    /// A copy of the counters and watermarks.
    pub(crate) fn stats(&self) -> FlushStats {
        let st = self.lock();
        let mut s = st.stats.clone();
        s.next_offset = st.next_offset;
        s.written = st.written;
        s.durable = st.durable;
        s.poisoned = st.poisoned;
        s
    }
}

/// Sleeps; under loom, yields instead (its scheduler has no clock, and a
/// sleep there would spin without letting another thread run).
fn pause(d: Duration) {
    #[cfg(not(all(test, walq_loom)))]
    thread::sleep(d);
    #[cfg(all(test, walq_loom))]
    {
        let _ = d;
        thread::yield_now();
    }
}

/// A loom model check of the protocol above: the real `Flush`, on loom's
/// locks, condvar and threads, over a fake tail that checks every write and
/// sync. Loom runs each scenario in every interleaving (up to a preemption
/// bound) and fails on a broken assertion, a deadlock or a lost wake-up.
/// Run as `.ci/run` does (debug assertions on, for the one in `lead`):
/// `RUSTFLAGS="--cfg walq_loom -C debug-assertions" CARGO_TARGET_DIR=target/loom cargo test --release --lib loom_model`.
#[cfg(all(test, walq_loom))]
mod loom_model {
    use std::io;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// `std::thread` as the protocol uses it, on loom's threads. Parking is
    /// rebuilt on a loom mutex and condvar because loom's `Thread::unpark`
    /// also wakes a thread blocked on a mutex (tokio-rs/loom#249), which
    /// std's never does; this keeps std's token semantics.
    pub(super) mod thread {
        use std::sync::Arc;

        use loom::sync::{Condvar, Mutex};
        pub(crate) use loom::thread::{Builder, JoinHandle, spawn, yield_now};

        #[derive(Debug, Clone)]
        pub(crate) struct Thread(Arc<Token>);

        #[derive(Debug)]
        struct Token {
            available: Mutex<bool>,
            unparked: Condvar,
        }

        loom::thread_local! {
            static CURRENT: Thread =
                Thread(Arc::new(Token { available: Mutex::new(false), unparked: Condvar::new() }));
        }

        impl Thread {
            pub(crate) fn unpark(&self) {
                *self.0.available.lock().unwrap() = true;
                self.0.unparked.notify_one();
            }
        }

        pub(crate) fn current() -> Thread {
            CURRENT.with(Thread::clone)
        }

        pub(crate) fn park() {
            let me = current();
            let mut available = me.0.available.lock().unwrap();
            while !*available {
                available = me.0.unparked.wait(available).unwrap();
            }
            *available = false;
        }
    }

    /// The log's tail reduced to offsets: it asserts that every record is
    /// written exactly once and in order, and that a sync follows writes.
    #[derive(Debug, Default)]
    struct FakeIo {
        written: u64,
        durable: u64,
        /// Batches written since the last sync.
        unsynced: u32,
        syncs: u32,
        /// This sync (counting from 1) fails, and the fake is dead after it.
        fail_sync: Option<u32>,
        failed: bool,
    }

    impl FlushIo for FakeIo {
        fn written(&self) -> u64 {
            self.written
        }

        fn write_batch(&mut self, batch: &mut BatchBuilder) -> Result<()> {
            assert!(!self.failed, "a round started after a failed one");
            assert!(!batch.is_empty(), "a round wrote an empty batch");
            assert_eq!(batch.base_offset(), self.written, "records are written once each, in offset order");
            self.written = batch.next_offset();
            self.unsynced += 1;
            Ok(())
        }

        fn sync(&mut self) -> Result<u64> {
            assert!(!self.failed, "a round started after a failed one");
            assert!(self.unsynced > 0, "a round synced without writing");
            self.unsynced = 0;
            self.syncs += 1;
            if self.fail_sync == Some(self.syncs) {
                self.failed = true;
                return Err(Error::io("fdatasync", "model", io::Error::other("injected")));
            }
            self.durable = self.written;
            Ok(self.durable)
        }

        fn rolls(&self) -> u64 {
            0
        }

        fn mark_synced(&mut self) {}
    }

    /// The preemption bound of the scenarios with three or more threads,
    /// which are too many to run in every interleaving; keeps each to seconds.
    const PREEMPTIONS: Option<usize> = Some(4);

    /// Runs `scenario` in every interleaving with at most `preemptions`
    /// preemptions (`None`: all of them; `LOOM_MAX_PREEMPTIONS` overrides),
    /// and reports how many there were.
    fn check(name: &str, preemptions: Option<usize>, scenario: impl Fn() + Send + Sync + 'static) {
        let mut builder = loom::model::Builder::new();
        if std::env::var_os("LOOM_MAX_PREEMPTIONS").is_none() {
            builder.preemption_bound = preemptions;
        }
        let runs = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&runs);
        let started = Instant::now();
        builder.check(move || {
            counter.fetch_add(1, Ordering::Relaxed);
            scenario();
        });
        let runs = runs.load(Ordering::Relaxed);
        eprintln!("loom_model::{name}: {runs} interleavings in {:.1?}", started.elapsed());
    }

    fn new_flush(io: FakeIo, producers_lead: bool) -> Arc<Flush<FakeIo>> {
        let cfg = FlushConfig {
            max_record_bytes: 1 << 10,
            write_buffer_bytes: 1 << 20,
            // Every record opens its own batch, so a round writes several.
            batch_bytes_max: 0,
            linger: Duration::ZERO,
            producers_lead,
            clock: crate::clock::Clock::System,
        };
        Arc::new(Flush::new(io, cfg))
    }

    fn io(flush: &Flush<FakeIo>) -> MutexGuard<'_, FakeIo> {
        flush.io.lock().unwrap()
    }

    /// One `Sync` append of one record; an acknowledgement must find it durable.
    fn append_sync(flush: &Arc<Flush<FakeIo>>) -> Result<Range<u64>> {
        let result = flush.append(&[Record::new(b"m").timestamp_ms(0)], Durability::Sync);
        if let Ok(range) = &result {
            assert_eq!(range.end - range.start, 1);
            assert!(io(flush).durable >= range.end, "acknowledged {range:?} before it was durable");
        }
        result
    }

    /// `flush()`: everything appended before the call is durable when it returns.
    fn flush_all(flush: &Arc<Flush<FakeIo>>) -> Result<()> {
        let before = flush.next_offset();
        let result = flush.flush();
        if result.is_ok() {
            assert!(io(flush).durable >= before, "flush returned before offset {before} was durable");
        }
        result
    }

    /// After every call returned: no round in flight, nobody left waiting,
    /// and the watermarks agree with the fake.
    fn assert_quiet(flush: &Flush<FakeIo>) {
        let st = flush.lock();
        let io = io(flush);
        assert!(!st.flushing, "a round is left in flight");
        assert!(st.waiters.is_empty(), "a waiter was never completed");
        assert!(st.pending.is_empty() && st.pending_bytes == 0, "records are left pending");
        assert_eq!(st.written, io.written);
        assert_eq!(st.durable, io.durable);
        assert!(st.poisoned || st.next_offset == io.durable, "an appended record is not durable");
        assert_eq!(st.poisoned, io.failed);
    }

    /// `producers` threads each append one record with `Sync` (and, with
    /// `flush_too`, the main thread calls `flush()` meanwhile). Returns the
    /// appends' results in thread order.
    fn run_producers(
        flush: &Arc<Flush<FakeIo>>,
        producers: usize,
        flush_too: bool,
    ) -> (Vec<Result<Range<u64>>>, Option<Result<()>>) {
        let handles: Vec<_> = (0..producers)
            .map(|_| {
                let flush = Arc::clone(flush);
                thread::spawn(move || append_sync(&flush))
            })
            .collect();
        let flushed = flush_too.then(|| flush_all(flush));
        let appended = handles.into_iter().map(|h| h.join().expect("a producer panicked")).collect();
        // Contention starts the flusher thread; a model must end all its threads.
        flush.stop_background();
        (appended, flushed)
    }

    /// Every append succeeds, offsets are unique and contiguous, and every
    /// record is durable once all calls returned.
    fn all_acknowledged(producers: usize, flush_too: bool) {
        let flush = new_flush(FakeIo::default(), true);
        let (appended, flushed) = run_producers(&flush, producers, flush_too);
        let mut offsets: Vec<u64> = appended.into_iter().map(|r| r.expect("append failed").start).collect();
        offsets.sort_unstable();
        assert_eq!(offsets, (0..producers as u64).collect::<Vec<_>>());
        if let Some(r) = flushed {
            r.expect("flush failed");
        }
        assert_quiet(&flush);
        let io = io(&flush);
        assert_eq!(io.durable, producers as u64);
        assert!(io.syncs >= 1 && io.syncs as usize <= producers);
    }

    #[test]
    fn loom_two_sync_producers() {
        check("two_sync_producers", None, || all_acknowledged(2, false));
    }

    #[test]
    fn loom_three_sync_producers() {
        check("three_sync_producers", PREEMPTIONS, || all_acknowledged(3, false));
    }

    #[test]
    fn loom_two_sync_producers_and_a_flush() {
        check("two_sync_producers_and_a_flush", PREEMPTIONS, || all_acknowledged(2, true));
    }

    /// Sync number `fail_sync` fails: the appends whose records it covered
    /// get its error, every other unacknowledged call `Poisoned`, nobody
    /// hangs, and every later call is `Poisoned`.
    fn failure_latches(producers: usize, flush_too: bool, fail_sync: u32) {
        let flush = new_flush(FakeIo { fail_sync: Some(fail_sync), ..FakeIo::default() }, true);
        let (appended, flushed) = run_producers(&flush, producers, flush_too);
        assert_quiet(&flush);
        let (written, durable, failed) = {
            let io = io(&flush);
            (io.written, io.durable, io.failed)
        };
        let count =
            |wanted: fn(&Result<Range<u64>>) -> bool| appended.iter().filter(|r| wanted(r)).count() as u64;
        // One record per append: the acknowledged ones are exactly those made
        // durable before the failure, and the failed round's own get its error.
        assert_eq!(count(|r| r.is_ok()), durable);
        assert_eq!(
            count(|r| matches!(r, Err(Error::Io { .. }))),
            written - durable,
            "the failed round's error"
        );
        assert_eq!(count(|r| matches!(r, Err(Error::Poisoned))), producers as u64 - written, "Poisoned");
        match &flushed {
            None | Some(Ok(())) => {}
            Some(Err(e)) => assert!(failed && matches!(e, Error::Io { .. } | Error::Poisoned), "flush: {e}"),
        }
        assert!(failed || fail_sync > 1, "the first sync never happened");
        if failed {
            assert!(matches!(append_sync(&flush), Err(Error::Poisoned)));
            assert!(matches!(flush.flush(), Err(Error::Poisoned)));
        }
    }

    #[test]
    fn loom_first_sync_fails_two_producers() {
        check("first_sync_fails_two_producers", None, || failure_latches(2, false, 1));
    }

    #[test]
    fn loom_first_sync_fails_three_producers() {
        check("first_sync_fails_three_producers", PREEMPTIONS, || failure_latches(3, false, 1));
    }

    #[test]
    fn loom_second_sync_fails_two_producers_and_a_flush() {
        check("second_sync_fails_two_producers_and_a_flush", PREEMPTIONS, || failure_latches(2, true, 2));
    }

    /// `producers_lead = false`: the background thread leads every round.
    #[test]
    fn loom_background_leads() {
        check("background_leads", PREEMPTIONS, || {
            let flush = new_flush(FakeIo::default(), false);
            let (appended, _) = run_producers(&flush, 2, false);
            for r in appended {
                r.expect("append failed");
            }
            flush.stop_background();
            assert_quiet(&flush);
        });
    }

    /// A `Sync` producer and an async append (`append_waiter`, polled as a
    /// future would be), in every order: when the second joins the first
    /// one's round, the lead passes from a producer to the background thread
    /// or back, and the task is woken.
    fn sync_and_async(fail_sync: Option<u32>) {
        let flush = new_flush(FakeIo { fail_sync, ..FakeIo::default() }, true);
        let producer = {
            let flush = Arc::clone(&flush);
            thread::spawn(move || append_sync(&flush))
        };
        let records = [Record::new(b"a").timestamp_ms(0)];
        let awaited = flush.append_waiter(&records, Durability::Sync).and_then(|(range, waiter)| {
            let waiter = waiter.expect("a Sync append waits");
            loom::future::block_on(std::future::poll_fn(|cx| match waiter.poll(cx.waker()) {
                Some(r) => std::task::Poll::Ready(r),
                None => std::task::Poll::Pending,
            }))?;
            assert!(io(&flush).durable >= range.end, "acknowledged {range:?} before it was durable");
            Ok(range)
        });
        let produced = producer.join().expect("the producer panicked");
        flush.stop_background();
        assert_quiet(&flush);
        if fail_sync == Some(1) {
            assert!(awaited.is_err() && produced.is_err(), "a call succeeded although the first sync failed");
        } else {
            awaited.expect("async append failed");
            produced.expect("append failed");
        }
    }

    #[test]
    fn loom_sync_and_async() {
        check("sync_and_async", PREEMPTIONS, || sync_and_async(None));
    }

    #[test]
    fn loom_first_sync_fails_sync_and_async() {
        check("first_sync_fails_sync_and_async", PREEMPTIONS, || sync_and_async(Some(1)));
    }
}
