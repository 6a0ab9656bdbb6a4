//! Consumer groups: competing workers share one stream with per-record
//! acknowledgements, as in RabbitMQ (prefetch, nack with requeue, dead-letter
//! queues) and NATS JetStream (ack wait, max deliver, nak with delay, in
//! progress, term).
//!
//! State: everything below the ack `floor` is done; above it the group knows
//! which offsets are done (acked or dead-lettered), which are in flight (with
//! a delivery deadline), which wait for redelivery (with a time), and how
//! often each was delivered. The journal (`journal.rs`) persists the floor,
//! the done offsets and the delivery counts; deliveries in flight and nack
//! delays live only in memory, so after a restart every delivered record that
//! is not done is redelivered at once. Invariant: an offset is in at most one
//! of done / in flight / ready, and a done offset is never delivered again.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::config::Durability;
use crate::consumer::StartAt;
use crate::error::{Error, Result};
use crate::journal::{Entry, GroupImage, check_name};
use crate::queue::{Core, Queue};
use crate::reader::Reader;
use crate::record::{OwnedRecord, Record};

/// Header names walq adds to a dead-lettered record.
pub mod dead_letter_headers {
    /// The record's offset in the original queue (decimal).
    pub const ORIGINAL_OFFSET: &str = "walq-original-offset";
    /// How many times the record was delivered (decimal).
    pub const DELIVERY_COUNT: &str = "walq-delivery-count";
    /// Why: `max_deliver` or `term` (or the reason given to `term_with_reason`).
    pub const REASON: &str = "walq-dead-letter-reason";
    /// The group that gave up on it.
    pub const GROUP: &str = "walq-group";
    /// The original record's timestamp (milliseconds, decimal).
    pub const ORIGINAL_TIMESTAMP: &str = "walq-original-timestamp";
}

/// Default time a delivery may stay unacknowledged before it is redelivered.
pub const ACK_WAIT_DEFAULT: Duration = Duration::from_secs(30);
/// Default number of deliveries before a record goes to the dead letters.
pub const MAX_DELIVER_DEFAULT: u32 = 5;
/// Default most unacknowledged deliveries per worker.
pub const PREFETCH_DEFAULT: usize = 256;
/// Default durability of acknowledgements.
pub const ACK_DURABILITY_DEFAULT: Durability = Durability::Interval(Duration::from_millis(100));

/// Options of a consumer group, from [`Queue::group`].
///
/// ```
/// use std::time::Duration;
/// let dir = tempfile::tempdir()?;
/// let queue = walq::Queue::open(dir.path())?;
/// let group = queue
///     .group("emails")
///     .ack_wait(Duration::from_secs(60))
///     .max_deliver(3)
///     .prefetch(16)
///     .open()?;
/// # drop(group);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct GroupBuilder<'q> {
    queue: &'q Queue,
    name: String,
    opts: GroupOptions,
}

#[derive(Debug, Clone)]
struct GroupOptions {
    start: StartAt,
    ack_wait: Duration,
    max_deliver: u32,
    prefetch: usize,
    ack_durability: Durability,
    dead_letters: bool,
}

impl<'q> GroupBuilder<'q> {
    pub(crate) fn new(queue: &'q Queue, name: &str) -> GroupBuilder<'q> {
        GroupBuilder {
            queue,
            name: name.to_string(),
            opts: GroupOptions {
                start: StartAt::Earliest,
                ack_wait: ACK_WAIT_DEFAULT,
                max_deliver: MAX_DELIVER_DEFAULT,
                prefetch: PREFETCH_DEFAULT,
                ack_durability: ACK_DURABILITY_DEFAULT,
                dead_letters: true,
            },
        }
    }

    /// Where a new group starts (default [`StartAt::Earliest`]); ignored when
    /// the group exists.
    pub fn start(mut self, start: StartAt) -> Self {
        self.opts.start = start;
        self
    }

    /// How long a delivery may stay unacknowledged before it is redelivered
    /// (default 30 s); [`Worker::in_progress`] extends it.
    pub fn ack_wait(mut self, wait: Duration) -> Self {
        self.opts.ack_wait = wait;
        self
    }

    /// Deliveries before a record goes to the dead letters (default 5; 0 for
    /// no limit).
    pub fn max_deliver(mut self, n: u32) -> Self {
        self.opts.max_deliver = n;
        self
    }

    /// Most unacknowledged deliveries one worker may hold (default 256;
    /// RabbitMQ's `basic_qos` prefetch count).
    pub fn prefetch(mut self, n: usize) -> Self {
        self.opts.prefetch = n;
        self
    }

    /// How durable an acknowledgement is when `ack` returns (default
    /// `Interval(100 ms)`). An ack lost in a crash means one more delivery of
    /// that record, never a lost record: see ARCHITECTURE.md.
    pub fn ack_durability(mut self, durability: Durability) -> Self {
        self.opts.ack_durability = durability;
        self
    }

    /// Whether records that reach `max_deliver` or are terminated go to a
    /// dead-letter queue (default `true`); if not, they are dropped (logged).
    pub fn dead_letters(mut self, on: bool) -> Self {
        self.opts.dead_letters = on;
        self
    }

    /// Opens the group (creating it, saved at once, if new). Opening a group
    /// that is already open on this queue returns another handle to it.
    pub fn open(self) -> Result<Group> {
        check_name("group", &self.name)?;
        if self.opts.prefetch == 0 {
            return Err(Error::InvalidOption { name: "prefetch", reason: "must be at least 1".into() });
        }
        if self.opts.ack_wait.is_zero() {
            return Err(Error::InvalidOption { name: "ack_wait", reason: "must be above zero".into() });
        }
        if let Durability::Interval(d) = self.opts.ack_durability
            && d.is_zero()
        {
            return Err(Error::InvalidOption {
                name: "ack_durability",
                reason: "Interval(0) would sync continuously; use Durability::Sync".into(),
            });
        }
        let core = self.queue.core();
        let mut open = core.groups.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(shared) = open.get(&self.name).and_then(std::sync::Weak::upgrade) {
            return Ok(Group { shared });
        }
        let image = core.journal.with_image(|img| img.groups.get(&self.name).cloned());
        let image = match image {
            Some(img) => img,
            None => {
                let floor = core.resolve_start(self.opts.start)?;
                core.journal
                    .record(&[Entry::GroupCreate { name: self.name.clone(), floor }], Durability::Sync)?;
                GroupImage { floor, next: floor, ..Default::default() }
            }
        };
        let dead_letters =
            if self.opts.dead_letters { Some(self.queue.open_dead_letters(&self.name)?) } else { None };
        if matches!(self.opts.ack_durability, Durability::Interval(_)) {
            core.ensure_housekeeping()?;
        }
        let state = State::from_image(&image, Reader::new(Arc::clone(&core.log), image.next));
        core.add_user();
        let shared = Arc::new(Shared {
            core: Arc::clone(core),
            name: self.name.clone(),
            opts: self.opts,
            dead_letters,
            state: Mutex::new(state),
            generation: std::sync::atomic::AtomicU64::new(0),
        });
        open.insert(self.name, Arc::downgrade(&shared));
        Ok(Group { shared })
    }
}

/// A consumer group: competing workers share its records, each acknowledged
/// on its own. Cheap to clone (a shared handle); `Send + Sync`.
///
/// ```
/// use std::time::Duration;
/// let dir = tempfile::tempdir()?;
/// let queue = walq::Queue::open(dir.path())?;
/// queue.append(b"job 1")?;
/// let group = queue.group("workers").open()?;
/// let mut worker = group.worker();
/// for delivery in worker.fetch(10, Duration::from_millis(100))? {
///     println!("{:?}", delivery.record().value);
///     worker.ack(delivery.id())?;
/// }
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone)]
pub struct Group {
    shared: Arc<Shared>,
}

#[derive(Debug)]
pub(crate) struct Shared {
    core: Arc<Core>,
    name: String,
    opts: GroupOptions,
    dead_letters: Option<Queue>,
    state: Mutex<State>,
    /// Bumped when a record becomes deliverable by something other than an
    /// append (a nack, an ack that frees a full worker): fetchers wait on it.
    generation: std::sync::atomic::AtomicU64,
}

#[derive(Debug)]
struct State {
    /// Everything below is done.
    floor: u64,
    /// The next offset never delivered.
    next: u64,
    done: BTreeSet<u64>,
    counts: HashMap<u64, u32>,
    inflight: HashMap<u64, Inflight>,
    /// (deadline ms, offset) of deliveries in flight.
    deadlines: BTreeSet<(u64, u64)>,
    /// (due ms, offset) of records waiting for redelivery.
    ready: BTreeSet<(u64, u64)>,
    /// Drawn when the group is opened, part of every delivery id: an id of an
    /// earlier opening, or of a deleted group of the same name, never
    /// matches a delivery of this one.
    incarnation: u32,
    /// Unacknowledged deliveries and prefetch limit per worker.
    workers: HashMap<u64, (usize, usize)>,
    next_worker: u64,
    /// Reads fresh records in order.
    fresh: Reader,
    /// Reads redeliveries (random access).
    random: Option<Reader>,
    stats: GroupStats,
}

#[derive(Debug, Clone, Copy)]
struct Inflight {
    seq: u64,
    worker: u64,
    deadline: u64,
}

/// Counters of a group since it was opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct GroupStats {
    /// Deliveries handed out (first ones and redeliveries).
    pub delivered: u64,
    /// Redeliveries among them.
    pub redelivered: u64,
    /// Acknowledgements.
    pub acked: u64,
    /// Negative acknowledgements.
    pub nacked: u64,
    /// Deliveries whose ack wait ran out.
    pub expired: u64,
    /// Records sent to the dead letters (or dropped, without them).
    pub dead_lettered: u64,
    /// Records retention removed before the group was done with them.
    pub skipped: u64,
}

/// A group's state at one instant, from [`Group::info`] (or
/// [`Queue::groups`](crate::Queue::groups) for groups not open).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct GroupInfo {
    /// The group's name.
    pub name: String,
    /// Every record below this offset is done (acknowledged or dead-lettered).
    pub ack_floor: u64,
    /// Deliveries in flight (handed out, not yet acknowledged).
    pub pending: u64,
    /// Records waiting for redelivery (nacked, expired, or from before a restart).
    pub waiting_redelivery: u64,
    /// Records appended and not yet done.
    pub unacked: u64,
    /// Counters since the group was opened (zero for a group not open).
    pub stats: GroupStats,
}

/// Identifies one delivery: the record's offset and which delivery of it
/// this is (its [`Delivery::delivery_count`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DeliveryId {
    offset: u64,
    seq: u64,
}

impl GroupInfo {
    /// The info of a group that is not open, from its saved state.
    pub(crate) fn saved(name: &str, g: &GroupImage, visible: u64) -> GroupInfo {
        let done_above = g.done.range(g.floor..visible).count() as u64;
        GroupInfo {
            name: name.to_string(),
            ack_floor: g.floor,
            pending: 0,
            waiting_redelivery: (g.floor..g.next.min(visible)).filter(|o| !g.done.contains(o)).count() as u64,
            unacked: visible.saturating_sub(g.floor).saturating_sub(done_above),
            stats: GroupStats::default(),
        }
    }
}

impl DeliveryId {
    /// The record's offset.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The id as an opaque string, `<offset>.<n>.<incarnation>` for the
    /// record's nth delivery by one opening of the group, for programs that
    /// pass it on out of process (the `walq serve` API);
    /// [`from_token`](DeliveryId::from_token) reads it back. The incarnation
    /// is drawn at random when the group is opened, so a token from before a
    /// restart, or from a deleted group of the same name, never names a later
    /// delivery: it is [`Error::DeliveryNotPending`], for an ack too.
    ///
    /// ```
    /// let dir = tempfile::tempdir()?;
    /// let queue = walq::Queue::open(dir.path())?;
    /// queue.append(b"job")?;
    /// let group = queue.group("g").open()?;
    /// let delivery = group.worker().fetch(1, std::time::Duration::ZERO)?.remove(0);
    /// let token = delivery.id().to_token();
    /// let id = walq::DeliveryId::from_token(&token).expect("a token we made");
    /// group.ack(id)?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn to_token(&self) -> String {
        format!("{}.{}.{}", self.offset, self.seq & u64::from(u32::MAX), self.incarnation())
    }

    /// The opening of the group that made this delivery.
    fn incarnation(&self) -> u32 {
        (self.seq >> 32) as u32
    }

    /// Reads a token made by [`to_token`](DeliveryId::to_token); `None` for
    /// anything else (three decimal numbers joined by `.`, no signs, no
    /// spaces: an offset fitting a `u64`, then two numbers fitting a `u32`).
    pub fn from_token(token: &str) -> Option<DeliveryId> {
        let mut parts = token.split('.');
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        let offset = parts.next().filter(|s| digits(s))?.parse::<u64>().ok()?;
        let count = parts.next().filter(|s| digits(s))?.parse::<u32>().ok()?;
        let incarnation = parts.next().filter(|s| digits(s))?.parse::<u32>().ok()?;
        if parts.next().is_some() {
            return None;
        }
        Some(DeliveryId { offset, seq: (u64::from(incarnation) << 32) | u64::from(count) })
    }
}

/// A record handed to a worker, to be acknowledged.
#[derive(Debug, Clone)]
pub struct Delivery {
    id: DeliveryId,
    count: u32,
    record: OwnedRecord,
}

impl Delivery {
    /// What to pass to [`Worker::ack`] and friends.
    pub fn id(&self) -> DeliveryId {
        self.id
    }
    /// The record's offset.
    pub fn offset(&self) -> u64 {
        self.id.offset
    }
    /// 1 for the first delivery, 2 for the first redelivery, and so on
    /// (counted across restarts).
    pub fn delivery_count(&self) -> u32 {
        self.count
    }
    /// The record.
    pub fn record(&self) -> &OwnedRecord {
        &self.record
    }
    /// The record, owned.
    pub fn into_record(self) -> OwnedRecord {
        self.record
    }
}

/// One of a group's competing workers: fetches up to its prefetch limit of
/// unacknowledged deliveries. From [`Group::worker`]. Dropping a worker does
/// not return its deliveries at once: they come back when their ack wait
/// runs out (as for a crashed worker).
#[derive(Debug)]
pub struct Worker {
    group: Group,
    id: u64,
    prefetch: usize,
}

/// A number for one opening of a group: random (std's per-process random
/// hash keys, mixed with the time), never 0.
fn incarnation() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()),
    );
    let n = h.finish();
    ((n ^ (n >> 32)) as u32).max(1)
}

impl State {
    fn from_image(img: &GroupImage, fresh: Reader) -> State {
        // Delivered and not done before the restart: redeliver at once.
        let ready = (img.floor..img.next).filter(|o| !img.done.contains(o)).map(|o| (0, o)).collect();
        State {
            floor: img.floor,
            next: img.next,
            done: img.done.clone(),
            counts: img.counts.iter().map(|(&o, &c)| (o, c)).collect(),
            inflight: HashMap::new(),
            deadlines: BTreeSet::new(),
            ready,
            incarnation: incarnation(),
            workers: HashMap::new(),
            next_worker: 0,
            fresh,
            random: None,
            stats: GroupStats::default(),
        }
    }

    fn mark_done(&mut self, offset: u64) {
        self.counts.remove(&offset);
        self.done.insert(offset);
        while self.done.remove(&self.floor) {
            self.floor += 1;
        }
    }

    /// One delivery of `worker` is settled; true if that freed a full worker.
    fn release(&mut self, worker: u64) -> bool {
        match self.workers.get_mut(&worker) {
            Some((held, prefetch)) => {
                let was_full = *held >= *prefetch;
                *held = held.saturating_sub(1);
                was_full
            }
            None => false,
        }
    }

    /// Takes the in-flight delivery `id` if it is the current one.
    fn take_inflight(&mut self, id: DeliveryId) -> Result<Inflight> {
        match self.inflight.get(&id.offset) {
            Some(f) if f.seq == id.seq => {
                let f = *f;
                self.inflight.remove(&id.offset);
                self.deadlines.remove(&(f.deadline, id.offset));
                self.release(f.worker);
                Ok(f)
            }
            _ => Err(Error::DeliveryNotPending { offset: id.offset }),
        }
    }
}

impl Group {
    pub(crate) fn from_shared(shared: Arc<Shared>) -> Group {
        Group { shared }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The group's name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// A new worker with the group's prefetch limit.
    pub fn worker(&self) -> Worker {
        self.worker_with_prefetch(self.shared.opts.prefetch)
    }

    /// A new worker with its own prefetch limit (at least 1).
    pub fn worker_with_prefetch(&self, prefetch: usize) -> Worker {
        let mut st = self.lock();
        let id = st.next_worker;
        st.next_worker += 1;
        st.workers.insert(id, (0, prefetch.max(1)));
        Worker { group: self.clone(), id, prefetch: prefetch.max(1) }
    }

    /// The dead-letter queue: records that reached `max_deliver` or were
    /// terminated, with the headers in [`dead_letter_headers`]. `None` when
    /// the group was opened with `dead_letters(false)`. It is a queue of its
    /// own, in `dead-letters/<group>/` inside the queue's directory.
    pub fn dead_letters(&self) -> Option<&Queue> {
        self.shared.dead_letters.as_ref()
    }

    /// The group's state now.
    pub fn info(&self) -> GroupInfo {
        let st = self.lock();
        let visible = self.shared.core.log.visible();
        let done_above = st.done.range(st.floor..visible).count() as u64;
        GroupInfo {
            name: self.shared.name.clone(),
            ack_floor: st.floor,
            pending: st.inflight.len() as u64,
            waiting_redelivery: st.ready.len() as u64,
            unacked: visible.saturating_sub(st.floor).saturating_sub(done_above),
            stats: st.stats,
        }
    }

    /// Writes and fdatasyncs every acknowledgement made so far, whatever the
    /// ack durability.
    pub fn sync(&self) -> Result<()> {
        self.shared.core.journal.flush(true)
    }

    /// Acknowledges a delivery: the record is done and never delivered again.
    /// Acknowledging a record already done is a no-op; so is a late ack of a
    /// delivery that was redelivered after its ack wait (the record counts
    /// as processed). [`Error::DeliveryNotPending`] for an offset never
    /// delivered, and for an id of another opening of the group (from before
    /// a reopen or a restart, or of a deleted group of the same name): its
    /// record is redelivered instead (at least once), never settled by a
    /// worker of another group.
    pub fn ack(&self, id: DeliveryId) -> Result<()> {
        let mut st = self.lock();
        let o = id.offset;
        if o < st.floor || st.done.contains(&o) {
            return Ok(());
        }
        if id.incarnation() != st.incarnation {
            return Err(Error::DeliveryNotPending { offset: o });
        }
        let mut freed = false;
        if let Some(f) = st.inflight.remove(&o) {
            st.deadlines.remove(&(f.deadline, o));
            freed = st.release(f.worker);
        } else if o >= st.next {
            return Err(Error::DeliveryNotPending { offset: o });
        } else {
            st.ready.retain(|&(_, x)| x != o);
        }
        st.mark_done(o);
        st.stats.acked += 1;
        let durability = self.shared.opts.ack_durability;
        let tell_housekeeper = self.shared.core.journal.record_scheduling(
            &[Entry::Done { name: self.shared.name.clone(), offsets: vec![o] }],
            durability,
        )?;
        drop(st);
        if freed {
            self.changed();
        }
        if tell_housekeeper {
            self.shared.core.housekeeping_due();
        }
        Ok(())
    }

    /// Wakes fetchers: something became deliverable.
    fn changed(&self) {
        self.shared.generation.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.shared.core.log.tail.wake_all();
    }

    /// Negative acknowledgement: redeliver the record after `delay` (zero for
    /// at once), to any worker. A record nacked `max_deliver` times in all
    /// goes to the dead letters instead.
    pub fn nack(&self, id: DeliveryId, delay: Duration) -> Result<()> {
        let mut st = self.lock();
        st.take_inflight(id)?;
        let due = self.shared.core.clock.now_ms().saturating_add(delay.as_millis() as u64);
        st.ready.insert((due, id.offset));
        st.stats.nacked += 1;
        drop(st);
        self.changed();
        Ok(())
    }

    /// The work is still going on: restart the delivery's ack wait.
    pub fn in_progress(&self, id: DeliveryId) -> Result<()> {
        let mut st = self.lock();
        let f = match st.inflight.get(&id.offset) {
            Some(f) if f.seq == id.seq => *f,
            _ => return Err(Error::DeliveryNotPending { offset: id.offset }),
        };
        let deadline = self.deadline();
        st.deadlines.remove(&(f.deadline, id.offset));
        st.deadlines.insert((deadline, id.offset));
        st.inflight.insert(id.offset, Inflight { deadline, ..f });
        Ok(())
    }

    /// Terminates a delivery: the record goes straight to the dead letters
    /// (reason `term`) and is never delivered again.
    pub fn term(&self, id: DeliveryId) -> Result<()> {
        self.term_with_reason(id, "term")
    }

    /// [`term`](Group::term) with the reason to record in the dead letter's
    /// `walq-dead-letter-reason` header.
    pub fn term_with_reason(&self, id: DeliveryId, reason: &str) -> Result<()> {
        let mut st = self.lock();
        st.take_inflight(id)?;
        let count = st.counts.get(&id.offset).copied().unwrap_or(1);
        let result = self.dead_letter(&mut st, id.offset, count, reason);
        if result.is_err() {
            // Not dead-lettered: it must not be stranded; redeliver it later.
            let due = self.shared.core.clock.now_ms().saturating_add(RETRY_AFTER_FAILURE_MS);
            st.ready.insert((due, id.offset));
        }
        result
    }

    fn deadline(&self) -> u64 {
        let wait = self.shared.opts.ack_wait.as_millis().min(u64::MAX as u128) as u64;
        self.shared.core.clock.now_ms().saturating_add(wait)
    }

    /// Sends a record to the dead letters and marks it done (journal first
    /// written after the dead letter is durable: a crash between the two
    /// duplicates the dead letter, never loses it).
    fn dead_letter(&self, st: &mut State, offset: u64, count: u32, reason: &str) -> Result<()> {
        if let Some(dlq) = &self.shared.dead_letters {
            match read_at(st, &self.shared.core, offset)? {
                Some(rec) => {
                    let (o, c, t) = (offset.to_string(), count.to_string(), rec.timestamp_ms.to_string());
                    let mut r = Record::new(&rec.value);
                    if let Some(k) = &rec.key {
                        r = r.key(k);
                    }
                    for (n, v) in &rec.headers {
                        r = r.header(n, v);
                    }
                    use dead_letter_headers as h;
                    r = r
                        .header(h::ORIGINAL_OFFSET.as_bytes(), o.as_bytes())
                        .header(h::DELIVERY_COUNT.as_bytes(), c.as_bytes())
                        .header(h::REASON.as_bytes(), reason.as_bytes())
                        .header(h::GROUP.as_bytes(), self.shared.name.as_bytes())
                        .header(h::ORIGINAL_TIMESTAMP.as_bytes(), t.as_bytes());
                    dlq.append_batch_with(std::slice::from_ref(&r), Durability::Sync)?;
                }
                None => st.stats.skipped += 1,
            }
        } else {
            tracing::warn!(group = %self.shared.name, offset, count, reason, "dropping a record (dead letters are off)");
        }
        st.ready.retain(|&(_, x)| x != offset);
        st.mark_done(offset);
        st.stats.dead_lettered += 1;
        self.shared.core.journal.record(
            &[Entry::Done { name: self.shared.name.clone(), offsets: vec![offset] }],
            Durability::Sync,
        )
    }

    fn fetch(&self, worker: u64, prefetch: usize, max: usize, timeout: Duration) -> Result<Vec<Delivery>> {
        let started = Instant::now();
        let core = &self.shared.core;
        loop {
            let mut st = self.lock();
            let now = core.clock.now_ms();
            self.skip_removed(&mut st)?;
            // Deliveries whose ack wait ran out wait for redelivery.
            while let Some(&(deadline, o)) = st.deadlines.first() {
                if deadline > now {
                    break;
                }
                st.deadlines.pop_first();
                if let Some(f) = st.inflight.remove(&o) {
                    st.release(f.worker);
                    st.ready.insert((deadline, o));
                    st.stats.expired += 1;
                }
            }
            let held = st.workers.get(&worker).map_or(0, |w| w.0);
            let room = prefetch.saturating_sub(held).min(max);
            let visible = core.log.visible();
            let mut out = Vec::new();
            let mut items = Vec::new();
            while out.len() < room {
                let (o, redelivery) = match st.ready.first() {
                    Some(&(due, o)) if due <= now => {
                        st.ready.pop_first();
                        (o, true)
                    }
                    _ if st.next < visible => {
                        let o = st.next;
                        st.next += 1;
                        (o, false)
                    }
                    _ => break,
                };
                if st.done.contains(&o) || o < st.floor {
                    continue;
                }
                let count = st.counts.get(&o).copied().unwrap_or(0);
                let max_deliver = self.shared.opts.max_deliver;
                if max_deliver > 0 && count >= max_deliver {
                    if let Err(e) = self.dead_letter(&mut st, o, count, "max_deliver") {
                        undo_fetch(&mut st, worker, &out, Some((o, now)));
                        return Err(e);
                    }
                    continue;
                }
                let record = if redelivery { read_at(&mut st, core, o) } else { read_fresh(&mut st, o) };
                let record = match record {
                    Ok(r) => r,
                    Err(e) => {
                        undo_fetch(&mut st, worker, &out, Some((o, now)));
                        return Err(e);
                    }
                };
                let Some(record) = record else {
                    // Removed by retention meanwhile.
                    st.stats.skipped += 1;
                    st.mark_done(o);
                    continue;
                };
                let count = count + 1;
                st.counts.insert(o, count);
                // The delivery count (saved, so it only grows for a record)
                // and this opening's incarnation: no two deliveries share an id.
                let seq = (u64::from(st.incarnation) << 32) | u64::from(count);
                let deadline = self.deadline();
                st.inflight.insert(o, Inflight { seq, worker, deadline });
                st.deadlines.insert((deadline, o));
                st.workers.entry(worker).or_insert((0, prefetch)).0 += 1;
                st.stats.delivered += 1;
                if redelivery {
                    st.stats.redelivered += 1;
                }
                items.push((o, count));
                out.push(Delivery { id: DeliveryId { offset: o, seq }, count, record });
            }
            if !items.is_empty() {
                // Delivery counts reach the OS before the records reach the
                // worker: a record that crashes its process still counts.
                let entry = Entry::Delivered { name: self.shared.name.clone(), items };
                if let Err(e) = core.journal.record(&[entry], Durability::Os) {
                    undo_fetch(&mut st, worker, &out, None);
                    return Err(e);
                }
                return Ok(out);
            }
            // Nothing to hand out: wait for an append, a nack, an ack that
            // frees prefetch room, or the next timer.
            let elapsed = started.elapsed();
            if elapsed >= timeout {
                return Ok(out);
            }
            // A due redelivery is no reason to wake a worker with no room.
            let ready_due = if room > 0 { st.ready.first().map(|r| r.0) } else { None };
            let timer = ready_due.into_iter().chain(st.deadlines.first().map(|d| d.0)).min();
            let mut deadline = started + timeout;
            if let Some(t) = timer {
                deadline = deadline.min(Instant::now() + Duration::from_millis(t.saturating_sub(now).max(1)));
            }
            let next = st.next;
            let generation = self.shared.generation.load(std::sync::atomic::Ordering::SeqCst);
            drop(st);
            let changed = core.log.tail.wait_until(deadline, || {
                (core.log.visible() > next && room > 0)
                    || self.shared.generation.load(std::sync::atomic::Ordering::SeqCst) != generation
            });
            if !changed && Instant::now() >= started + timeout {
                // One last look (a timer may have come due).
                if timer.is_none_or(|t| core.clock.now_ms() < t) {
                    return Ok(Vec::new());
                }
            }
        }
    }

    /// Moves the floor past records retention removed (not in queue mode).
    fn skip_removed(&self, st: &mut State) -> Result<()> {
        let first = self.shared.core.log.first_offset();
        if st.floor >= first {
            return Ok(());
        }
        let lost = (st.floor..first.min(st.next)).filter(|o| !st.done.contains(o)).count() as u64;
        tracing::warn!(group = %self.shared.name, from = st.floor, to = first, lost, "retention removed records this group had not finished");
        st.stats.skipped += lost;
        st.floor = first;
        st.done = st.done.split_off(&first);
        st.counts.retain(|&o, _| o >= first);
        let gone: Vec<u64> = st.inflight.keys().copied().filter(|&o| o < first).collect();
        for o in gone {
            if let Some(f) = st.inflight.remove(&o) {
                st.deadlines.remove(&(f.deadline, o));
                st.release(f.worker);
            }
        }
        st.ready.retain(|&(_, o)| o >= first);
        if st.next < first {
            st.next = first;
            st.fresh.seek(first);
        }
        self.shared
            .core
            .journal
            .record(&[Entry::Skip { name: self.shared.name.clone(), to: first }], Durability::Os)
    }
}

/// After a failed step, a record waits this long (ms, queue clock) before it
/// is tried again.
const RETRY_AFTER_FAILURE_MS: u64 = 1000;

/// Takes back the deliveries a failed fetch had prepared (the worker never
/// got them): not in flight, counts as before, ready at once; the record
/// whose step failed (`failed`, with the time) is retried after a pause.
fn undo_fetch(st: &mut State, worker: u64, out: &[Delivery], failed: Option<(u64, u64)>) {
    for d in out {
        let o = d.id.offset;
        if let Some(f) = st.inflight.remove(&o) {
            st.deadlines.remove(&(f.deadline, o));
            st.release(worker);
        }
        match d.count.checked_sub(1) {
            Some(c) if c > 0 => {
                st.counts.insert(o, c);
            }
            _ => {
                st.counts.remove(&o);
            }
        }
        st.stats.delivered = st.stats.delivered.saturating_sub(1);
        st.ready.insert((0, o));
    }
    if let Some((o, now)) = failed {
        st.ready.insert((now.saturating_add(RETRY_AFTER_FAILURE_MS), o));
    }
}

/// Reads the record at `offset` with the random-access reader; `None` if
/// retention removed it.
fn read_at(st: &mut State, core: &Core, offset: u64) -> Result<Option<OwnedRecord>> {
    let reader = st.random.get_or_insert_with(|| Reader::new(Arc::clone(&core.log), offset));
    reader.seek(offset);
    match reader.next() {
        Ok(Some(r)) => Ok(Some(r.to_owned_record())),
        Ok(None) => Ok(None),
        Err(Error::OffsetOutOfRange { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Reads the next fresh record, which must be at `offset`.
fn read_fresh(st: &mut State, offset: u64) -> Result<Option<OwnedRecord>> {
    if st.fresh.position() != offset {
        st.fresh.seek(offset);
    }
    match st.fresh.next() {
        Ok(Some(r)) => Ok(Some(r.to_owned_record())),
        Ok(None) => Ok(None),
        Err(Error::OffsetOutOfRange { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

impl Worker {
    /// Up to `max` deliveries (fewer if the prefetch limit would be passed),
    /// waiting up to `timeout` for the first; empty if none came. Records
    /// waiting for redelivery come first, then new ones in offset order.
    pub fn fetch(&mut self, max: usize, timeout: Duration) -> Result<Vec<Delivery>> {
        self.group.fetch(self.id, self.prefetch, max, timeout)
    }

    /// Unacknowledged deliveries this worker holds.
    pub fn outstanding(&self) -> usize {
        self.group.lock().workers.get(&self.id).map_or(0, |w| w.0)
    }

    /// See [`Group::ack`].
    pub fn ack(&mut self, id: DeliveryId) -> Result<()> {
        self.group.ack(id)
    }

    /// See [`Group::nack`].
    pub fn nack(&mut self, id: DeliveryId, delay: Duration) -> Result<()> {
        self.group.nack(id, delay)
    }

    /// See [`Group::in_progress`].
    pub fn in_progress(&mut self, id: DeliveryId) -> Result<()> {
        self.group.in_progress(id)
    }

    /// See [`Group::term`].
    pub fn term(&mut self, id: DeliveryId) -> Result<()> {
        self.group.term(id)
    }

    /// The worker's group.
    pub fn group(&self) -> &Group {
        &self.group
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.group.lock().workers.remove(&self.id);
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        if let Err(e) = self.core.journal.flush(true) {
            tracing::error!(group = %self.name, error = %e, "could not sync acknowledgements on close; they may be redelivered");
        }
        self.core.release_user();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivery_token_round_trips_and_rejects_anything_else() {
        for (offset, seq) in [(0, 0), (7, 1 << 32), (7, (9 << 32) | 2), (u64::MAX, u64::MAX)] {
            let id = DeliveryId { offset, seq };
            assert_eq!(DeliveryId::from_token(&id.to_token()), Some(id));
        }
        assert_eq!(DeliveryId { offset: 7, seq: (9 << 32) | 2 }.to_token(), "7.2.9");
        for bad in [
            "",
            ".",
            "1",
            "1.",
            ".1",
            "1.2",
            "1.2.3.4",
            "1.2.",
            "1..3",
            "1.4294967296",
            "1.2.4294967296",
            "+1.2",
            "1.-2",
            " 1.2",
            "1.2 ",
            "a.b",
            "18446744073709551616.0",
            "١.٢",
        ] {
            assert_eq!(DeliveryId::from_token(bad), None, "{bad:?}");
        }
    }
}
