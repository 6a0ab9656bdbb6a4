//! Consumer groups: competing workers, acks, nacks with delay, in-progress,
//! term, redelivery after the ack wait, dead letters after max_deliver,
//! prefetch, and group state across restarts and power cuts. Every
//! time-driven behaviour runs on a ManualClock, so these take milliseconds.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use common::sim_dir;
use walq::{Durability, Error, ManualClock, Queue, Record, SimDisk, StartAt, dead_letter_headers as h};

fn open(dir: &std::path::Path, clock: &ManualClock) -> Queue {
    Queue::builder(dir).clock(clock).open().unwrap()
}

fn fill(queue: &Queue, n: u64) {
    let values: Vec<Vec<u8>> = (0..n).map(|i| format!("job {i}").into_bytes()).collect();
    let records: Vec<Record<'_>> = values.iter().map(|v| Record::new(v)).collect();
    queue.append_batch(&records).unwrap();
}

const Z: Duration = Duration::ZERO;

#[test]
fn competing_workers_share_the_records_and_acks_are_final() {
    let clock = ManualClock::new(0);
    let dir = tempfile::tempdir().unwrap();
    let queue = open(dir.path(), &clock);
    fill(&queue, 100);
    let group = queue.group("g").prefetch(10).open().unwrap();
    let (mut a, mut b) = (group.worker(), group.worker());
    let mut seen = BTreeSet::new();
    loop {
        let da = a.fetch(7, Z).unwrap();
        let db = b.fetch(7, Z).unwrap();
        if da.is_empty() && db.is_empty() {
            break;
        }
        for d in da {
            assert_eq!(d.delivery_count(), 1);
            assert!(seen.insert(d.offset()), "delivered twice: {}", d.offset());
            a.ack(d.id()).unwrap();
        }
        for d in db {
            assert!(seen.insert(d.offset()));
            b.ack(d.id()).unwrap();
        }
    }
    assert_eq!(seen, (0..100).collect());
    let info = group.info();
    assert_eq!((info.ack_floor, info.pending, info.unacked), (100, 0, 0));
    // Acknowledged records never come back, even after the ack wait.
    clock.advance(Duration::from_secs(3600));
    assert!(a.fetch(100, Z).unwrap().is_empty());
    drop((a, b, group));
    drop(queue);
    let queue = open(dir.path(), &clock);
    let group = queue.group("g").open().unwrap();
    assert!(group.worker().fetch(100, Z).unwrap().is_empty(), "acks survive a restart");
}

#[test]
fn prefetch_limits_unacknowledged_deliveries_per_worker() {
    let clock = ManualClock::new(0);
    let dir = tempfile::tempdir().unwrap();
    let queue = open(dir.path(), &clock);
    fill(&queue, 50);
    let group = queue.group("g").prefetch(5).open().unwrap();
    let mut w = group.worker();
    let first = w.fetch(100, Z).unwrap();
    assert_eq!(first.len(), 5);
    assert!(w.fetch(100, Z).unwrap().is_empty(), "prefetch full");
    assert_eq!(w.outstanding(), 5);
    w.ack(first[0].id()).unwrap();
    assert_eq!(w.fetch(100, Z).unwrap().len(), 1);
    let mut other = group.worker_with_prefetch(20);
    assert_eq!(other.fetch(100, Z).unwrap().len(), 20);
}

#[test]
fn unacknowledged_deliveries_come_back_after_the_ack_wait_with_their_count_raised() {
    let clock = ManualClock::new(0);
    let dir = tempfile::tempdir().unwrap();
    let queue = open(dir.path(), &clock);
    fill(&queue, 3);
    let group = queue.group("g").ack_wait(Duration::from_secs(30)).open().unwrap();
    let mut crashed = group.worker();
    let held = crashed.fetch(10, Z).unwrap();
    assert_eq!(held.len(), 3);
    drop(crashed); // a worker that died: nothing comes back before the deadline
    let mut w = group.worker();
    clock.advance(Duration::from_secs(29));
    assert!(w.fetch(10, Z).unwrap().is_empty());
    clock.advance(Duration::from_secs(2));
    let again = w.fetch(10, Z).unwrap();
    assert_eq!(
        again.iter().map(|d| (d.offset(), d.delivery_count())).collect::<Vec<_>>(),
        [(0, 2), (1, 2), (2, 2)]
    );
    // A late ack of the first delivery still counts; a nack of it is refused.
    assert!(matches!(w.nack(held[1].id(), Z), Err(Error::DeliveryNotPending { offset: 1 })));
    w.ack(held[0].id()).unwrap();
    w.ack(again[0].id()).unwrap(); // no-op: already done
    // in_progress restarts the wait.
    clock.advance(Duration::from_secs(20));
    w.in_progress(again[1].id()).unwrap();
    clock.advance(Duration::from_secs(20));
    let back = w.fetch(10, Z).unwrap();
    assert_eq!(back.iter().map(|d| d.offset()).collect::<Vec<_>>(), [2], "offset 1 was extended");
    assert_eq!(group.info().stats.expired, 4);
}

#[test]
fn nack_with_delay_redelivers_after_the_delay() {
    let clock = ManualClock::new(0);
    let dir = tempfile::tempdir().unwrap();
    let queue = open(dir.path(), &clock);
    fill(&queue, 2);
    let group = queue.group("g").open().unwrap();
    let mut w = group.worker();
    let d = w.fetch(10, Z).unwrap();
    w.nack(d[0].id(), Duration::from_secs(10)).unwrap();
    w.nack(d[1].id(), Z).unwrap();
    let now = w.fetch(10, Z).unwrap();
    assert_eq!(now.iter().map(|d| d.offset()).collect::<Vec<_>>(), [1]);
    clock.advance(Duration::from_secs(10));
    let later = w.fetch(10, Z).unwrap();
    assert_eq!(later.iter().map(|d| (d.offset(), d.delivery_count())).collect::<Vec<_>>(), [(0, 2)]);
}

#[test]
fn dead_letters_after_max_deliver_and_on_term() {
    let clock = ManualClock::new(5_000);
    let dir = tempfile::tempdir().unwrap();
    let queue = open(dir.path(), &clock);
    queue.append_record(&Record::new(b"poison").key(b"k").header(b"trace", b"t1")).unwrap();
    queue.append(b"bad input").unwrap();
    queue.append(b"fine").unwrap();
    let group = queue.group("g").max_deliver(3).open().unwrap();
    let mut w = group.worker();
    for attempt in 1..=3 {
        let ds = w.fetch(10, Z).unwrap();
        let poison = ds.iter().find(|d| d.offset() == 0).unwrap();
        assert_eq!(poison.delivery_count(), attempt);
        for d in &ds {
            match d.offset() {
                0 => w.nack(d.id(), Z).unwrap(),
                1 => w.term(d.id()).unwrap(),
                _ => w.ack(d.id()).unwrap(),
            }
        }
    }
    assert!(w.fetch(10, Z).unwrap().is_empty(), "the third nack was the last delivery");
    let info = group.info();
    assert_eq!((info.ack_floor, info.stats.dead_lettered), (3, 2));
    let dlq = group.dead_letters().unwrap();
    let mut r = dlq.read_from(0).unwrap();
    let term = r.next().unwrap().unwrap().to_owned_record();
    let poison = r.next().unwrap().unwrap();
    assert_eq!(term.value, b"bad input");
    let header = |name: &str| poison.header(name.as_bytes()).map(|v| String::from_utf8(v.to_vec()).unwrap());
    assert_eq!(poison.value(), b"poison");
    assert_eq!(poison.key(), Some(&b"k"[..]));
    assert_eq!(header("trace").as_deref(), Some("t1"));
    assert_eq!(header(h::ORIGINAL_OFFSET).as_deref(), Some("0"));
    assert_eq!(header(h::DELIVERY_COUNT).as_deref(), Some("3"));
    assert_eq!(header(h::REASON).as_deref(), Some("max_deliver"));
    assert_eq!(header(h::GROUP).as_deref(), Some("g"));
    assert_eq!(header(h::ORIGINAL_TIMESTAMP).as_deref(), Some("5000"));
    let term_reason = term.headers.iter().find(|(n, _)| n == h::REASON.as_bytes()).unwrap();
    assert_eq!(term_reason.1, b"term");
    assert!(dir.path().join("dead-letters/g").is_dir());
}

#[test]
fn after_a_restart_unacknowledged_deliveries_come_back_and_acknowledged_ones_do_not() {
    for durability in [Durability::Sync, Durability::Os, Durability::Interval(Duration::from_millis(5))] {
        let clock = ManualClock::new(0);
        let dir = tempfile::tempdir().unwrap();
        {
            let queue = open(dir.path(), &clock);
            fill(&queue, 10);
            let group = queue.group("g").ack_durability(durability).open().unwrap();
            let mut w = group.worker();
            for d in w.fetch(6, Z).unwrap() {
                if d.offset() % 2 == 0 {
                    w.ack(d.id()).unwrap();
                }
            }
            // Dropping the queue and the group syncs the acks.
        }
        let queue = open(dir.path(), &clock);
        let group = queue.group("g").open().unwrap();
        assert_eq!(group.info().waiting_redelivery, 3);
        let mut w = group.worker();
        let got: Vec<(u64, u32)> =
            w.fetch(100, Z).unwrap().iter().map(|d| (d.offset(), d.delivery_count())).collect();
        assert_eq!(got, [(1, 2), (3, 2), (5, 2), (6, 1), (7, 1), (8, 1), (9, 1)], "{durability:?}");
    }
}

#[test]
fn delivery_counts_survive_process_crashes_so_poison_records_reach_the_dead_letters() {
    // A record that kills its worker before the ack is delivered again after
    // every restart, its count raised each time, until it is dead-lettered.
    for seed in 0..30 {
        let disk = SimDisk::new(seed);
        let clock = ManualClock::new(0);
        {
            let queue = Queue::builder(sim_dir()).simulated(&disk).clock(&clock).open().unwrap();
            queue.append(b"poison").unwrap();
        }
        let mut deliveries = 0;
        for _restart in 0..10 {
            let queue = Queue::builder(sim_dir()).simulated(&disk).clock(&clock).open().unwrap();
            let group = queue.group("g").max_deliver(3).open().unwrap();
            let got = group.worker().fetch(1, Z).unwrap();
            if got.is_empty() {
                break;
            }
            deliveries += 1;
            // The worker dies with the delivery: a process crash (page cache
            // kept); its handles see a dead disk afterwards.
            disk.crash_keep_all();
            drop((group, queue));
        }
        assert_eq!(deliveries, 3, "seed {seed}");
        let queue = Queue::builder(sim_dir()).simulated(&disk).clock(&clock).open().unwrap();
        let group = queue.group("g").open().unwrap();
        assert_eq!(group.dead_letters().unwrap().next_offset(), 1, "seed {seed}");
    }
}

#[test]
fn group_start_options_and_listing() {
    let clock = ManualClock::new(0);
    let dir = tempfile::tempdir().unwrap();
    let queue = open(dir.path(), &clock);
    fill(&queue, 10);
    let late = queue.group("late").start(StartAt::Latest).open().unwrap();
    let mid = queue.group("mid").start(StartAt::Offset(4)).open().unwrap();
    assert!(late.worker().fetch(10, Z).unwrap().is_empty());
    assert_eq!(mid.worker().fetch(1, Z).unwrap()[0].offset(), 4);
    let again = queue.group("mid").open().unwrap();
    assert_eq!(again.info().pending, 1, "the same group, shared");
    let names: Vec<_> = queue.groups().into_iter().map(|g| (g.name, g.ack_floor)).collect();
    assert_eq!(names, [("late".to_string(), 10), ("mid".to_string(), 4)]);
    assert!(matches!(queue.delete_group("mid"), Err(Error::InUse { .. })));
    drop((late, mid, again));
    queue.delete_group("mid").unwrap();
    assert!(matches!(queue.delete_group("mid"), Err(Error::UnknownConsumer { kind: "group", .. })));
    assert_eq!(queue.groups().len(), 1);
}

#[test]
fn fetch_waits_for_appends_and_nacks() {
    let dir = tempfile::tempdir().unwrap();
    let queue = Arc::new(Queue::open(dir.path()).unwrap());
    let group = queue.group("g").open().unwrap();
    let q = Arc::clone(&queue);
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        q.append(b"x").unwrap();
    });
    let mut w = group.worker();
    let got = w.fetch(1, Duration::from_secs(10)).unwrap();
    assert_eq!(got.len(), 1);
    t.join().unwrap();
    // Another worker waiting is woken by a nack.
    let g2 = group.clone();
    let waiter = std::thread::spawn(move || g2.worker().fetch(1, Duration::from_secs(10)).unwrap());
    std::thread::sleep(Duration::from_millis(50));
    w.nack(got[0].id(), Z).unwrap();
    let redelivered = waiter.join().unwrap();
    assert_eq!(redelivered[0].delivery_count(), 2);
}

#[test]
fn a_delivery_token_from_before_a_reopen_never_names_a_later_delivery() {
    let clock = ManualClock::new(0);
    let dir = tempfile::tempdir().unwrap();
    let queue = open(dir.path(), &clock);
    fill(&queue, 2);
    let old = {
        let group = queue.group("g").open().unwrap();
        let d = group.worker().fetch(1, Z).unwrap().remove(0);
        assert_eq!((d.id().offset(), d.delivery_count()), (0, 1));
        d.id().to_token()
    };
    // Reopened: the record is redelivered at once, as its 2nd delivery.
    let group = queue.group("g").open().unwrap();
    let d = group.worker().fetch(1, Z).unwrap().remove(0);
    assert_eq!((d.id().offset(), d.delivery_count()), (0, 2));
    assert_ne!(d.id().to_token(), old, "the new delivery reuses the old token");
    let stale = walq::DeliveryId::from_token(&old).unwrap();
    assert!(matches!(group.nack(stale, Z), Err(Error::DeliveryNotPending { .. })));
    assert!(matches!(group.term(stale), Err(Error::DeliveryNotPending { .. })));
    // An ack too: the stale holder's work does not settle the new delivery.
    assert!(matches!(group.ack(stale), Err(Error::DeliveryNotPending { .. })));
    // The current delivery is untouched by the stale token and settles normally.
    assert_eq!(group.info().pending, 1);
    group.term(d.id()).unwrap();
}
