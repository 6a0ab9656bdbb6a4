//! Regressions (review): an independent review of consumers, groups, the
//! journal and retention found each of these bugs with the test that now
//! guards it (each failed on the code as reviewed). `control_*` tests show
//! that the harness itself is sound.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::Duration;

use common::sim_dir;
use walq::{Durability, Fault, FaultKind, FaultOp, ManualClock, Queue, Record, SimDisk};

const Z: Duration = Duration::ZERO;

fn sim(disk: &SimDisk) -> Queue {
    Queue::builder(sim_dir()).simulated(disk).open().unwrap()
}

fn fill(queue: &Queue, n: u64) {
    for chunk in (0..n).collect::<Vec<_>>().chunks(10_000) {
        let values: Vec<Vec<u8>> = chunk.iter().map(|i| format!("job {i}").into_bytes()).collect();
        let records: Vec<Record<'_>> = values.iter().map(|v| Record::new(v)).collect();
        queue.append_batch(&records).unwrap();
    }
}

/// Queue::groups() holds the journal mutex (with_image) while Group::info
/// takes the group mutex; fetch/ack hold the group mutex and then take the
/// journal mutex. Opposite orders: a deadlock.
#[test]
fn listing_groups_never_deadlocks_with_fetch_and_ack() {
    let disk = SimDisk::new(1);
    let queue = Arc::new(sim(&disk));
    fill(&queue, 200_000);
    let group = queue.group("g").prefetch(64).ack_durability(Durability::Os).open().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel::<&'static str>();
    {
        let (group, stop, tx) = (group.clone(), Arc::clone(&stop), tx.clone());
        std::thread::spawn(move || {
            let mut w = group.worker();
            loop {
                let ds = w.fetch(64, Z).unwrap();
                if ds.is_empty() {
                    break;
                }
                for d in ds {
                    w.ack(d.id()).unwrap();
                }
            }
            stop.store(true, Ordering::SeqCst);
            tx.send("worker").unwrap();
        });
    }
    {
        let (queue, stop, tx) = (Arc::clone(&queue), Arc::clone(&stop), tx.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let _ = queue.groups();
            }
            tx.send("lister").unwrap();
        });
    }
    for _ in 0..2 {
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(_) => {}
            Err(_) => panic!(
                "deadlock: Queue::groups() (journal -> group mutex) vs fetch/ack (group -> journal mutex)"
            ),
        }
    }
}

/// The same fetch/ack loop without `Queue::groups()` beside it finishes.
#[test]
fn control_fetch_ack_loop_finishes_without_listing() {
    let disk = SimDisk::new(1);
    let queue = sim(&disk);
    fill(&queue, 200_000);
    let group = queue.group("g").prefetch(64).ack_durability(Durability::Os).open().unwrap();
    let started = std::time::Instant::now();
    let mut w = group.worker();
    loop {
        let ds = w.fetch(64, Z).unwrap();
        if ds.is_empty() {
            break;
        }
        for d in ds {
            w.ack(d.id()).unwrap();
        }
    }
    assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
}

/// A position past the recovered log end is clamped only in memory; if
/// nothing writes the journal before the next restart, the old (too high)
/// position comes back, now pointing into *new* records, which are skipped.
#[test]
fn positions_lowered_at_open_stay_lowered_after_the_next_restart() {
    let disk = SimDisk::new(1);
    {
        let queue = Queue::builder(sim_dir()).simulated(&disk).durability(Durability::Os).open().unwrap();
        queue.append_with(b"durable", Durability::Sync).unwrap();
        let mut c = queue.consumer("c").unwrap();
        let group = queue.group("g").ack_durability(Durability::Sync).open().unwrap();
        for _ in 0..5 {
            queue.append_with(b"lost", Durability::Os).unwrap();
        }
        std::thread::sleep(Duration::from_millis(50)); // written to the OS, not synced
        c.commit(6).unwrap();
        let mut w = group.worker();
        let ds = w.fetch(10, Z).unwrap();
        assert_eq!(ds.len(), 6);
        for d in ds {
            w.ack(d.id()).unwrap();
        }
        disk.crash_lose_unsynced();
    }
    {
        let queue = sim(&disk);
        assert_eq!(queue.next_offset(), 1);
        assert_eq!(queue.consumers()[0].position, 1, "clamped (in memory)");
        assert_eq!(queue.groups()[0].ack_floor, 1, "clamped (in memory)");
        for i in 0..5 {
            queue.append(format!("new {i}").as_bytes()).unwrap(); // offsets 1..=5
        }
        queue.close().unwrap(); // clean close; nobody read or committed
    }
    let queue = sim(&disk);
    let position = queue.consumer("c").unwrap().position();
    let group = queue.group("g").open().unwrap();
    let delivered = group.worker().fetch(10, Z).unwrap().len();
    assert!(
        position == 1 && delivered == 5,
        "new records 1..=5 were never read, yet the consumer resumes at {position} \
         (expected 1) and the group delivers {delivered} of them (expected 5)"
    );
}

/// An `Os` journal write (every group fetch writes its `Delivered` entry so)
/// writes the buffered `Interval` acks too and clears their sync deadline:
/// the housekeeping thread then never fdatasyncs them.
#[test]
fn interval_acks_are_synced_even_after_an_os_journal_write() {
    let disk = SimDisk::new(1);
    let queue = sim(&disk);
    fill(&queue, 3);
    let group = queue.group("g").open().unwrap(); // acks: Interval(100 ms)
    let mut w = group.worker();
    let d0 = w.fetch(1, Z).unwrap().remove(0);
    w.ack(d0.id()).unwrap();
    let _d1 = w.fetch(1, Z).unwrap(); // writes Delivered (Os) and the buffered ack
    std::thread::sleep(Duration::from_millis(600)); // six ack intervals
    disk.crash_lose_unsynced();
    std::mem::forget((w, group, queue)); // a dead process runs no destructors
    let queue = sim(&disk);
    assert_eq!(
        queue.groups()[0].ack_floor,
        1,
        "an Interval(100ms) ack made 600 ms before the power cut was lost"
    );
}

#[test]
fn control_interval_acks_are_synced_by_the_housekeeping_thread() {
    let disk = SimDisk::new(1);
    let queue = sim(&disk);
    fill(&queue, 3);
    let group = queue.group("g").open().unwrap();
    let mut w = group.worker();
    let d0 = w.fetch(1, Z).unwrap().remove(0);
    w.ack(d0.id()).unwrap();
    std::thread::sleep(Duration::from_millis(600));
    disk.crash_lose_unsynced();
    std::mem::forget((w, group, queue));
    let queue = sim(&disk);
    assert_eq!(queue.groups()[0].ack_floor, 1);
}

/// Only an ack that moves the sync deadline earlier wakes the housekeeping
/// thread; the acks behind it ride on the deadline already pending. A steady
/// stream of acks is still synced within each interval, the last ones too.
#[test]
fn a_stream_of_interval_acks_is_synced_within_the_interval() {
    let disk = SimDisk::new(1);
    let queue = sim(&disk);
    fill(&queue, 40);
    let group = queue.group("g").open().unwrap(); // acks: Interval(100 ms)
    let mut w = group.worker();
    for _ in 0..40 {
        let d = w.fetch(1, Z).unwrap().remove(0);
        w.ack(d.id()).unwrap();
        std::thread::sleep(Duration::from_millis(7)); // ~14 acks per interval
    }
    std::thread::sleep(Duration::from_millis(600)); // the last ack's interval, with room
    disk.crash_lose_unsynced();
    std::mem::forget((w, group, queue)); // a dead process runs no destructors
    let queue = sim(&disk);
    assert_eq!(queue.groups()[0].ack_floor, 40, "acks made 600 ms before the power cut were lost");
}

/// The same for a consumer's `Interval` commits.
#[test]
fn a_stream_of_interval_commits_is_synced_within_the_interval() {
    let disk = SimDisk::new(1);
    let queue = sim(&disk);
    fill(&queue, 40);
    let mut c = queue.consumer("c").unwrap();
    for o in 1..=40 {
        c.commit_with(o, walq::Durability::Interval(Duration::from_millis(100))).unwrap();
        std::thread::sleep(Duration::from_millis(7));
    }
    std::thread::sleep(Duration::from_millis(600));
    disk.crash_lose_unsynced();
    std::mem::forget((c, queue));
    let queue = sim(&disk);
    assert_eq!(queue.consumers()[0].position, 40, "commits made 600 ms before the power cut were lost");
}

/// A journal write that fails on a caller's thread sets a retry deadline
/// there and tells nobody; the next `Interval` commit, though its own
/// deadline is not sooner, must wake the housekeeping thread (found by review:
/// the commit waited for the thread's 1 s tick).
#[test]
fn an_interval_commit_after_a_failed_journal_write_is_synced_within_the_interval() {
    let disk = SimDisk::new(1);
    let queue = sim(&disk);
    fill(&queue, 5);
    let mut c = queue.consumer("c").unwrap();
    c.commit_with(1, Durability::Interval(Duration::from_millis(10))).unwrap();
    std::thread::sleep(Duration::from_millis(100)); // synced; the thread idles toward its tick
    disk.inject(Fault {
        path_contains: Some("consumers.journal".into()),
        ..Fault::new(FaultOp::Write, FaultKind::Eio)
    });
    assert!(c.commit_with(2, Durability::Os).is_err(), "the write fault fires");
    c.commit_with(3, Durability::Interval(Duration::from_millis(100))).unwrap();
    std::thread::sleep(Duration::from_millis(450));
    disk.crash_lose_unsynced();
    std::mem::forget((c, queue)); // a dead process runs no destructors
    let queue = sim(&disk);
    assert_eq!(
        queue.consumers()[0].position,
        3,
        "an Interval(100ms) commit made 450 ms before the power cut was lost"
    );
}

/// The same for an `Interval` ack after a group fetch's `Delivered` write failed.
#[test]
fn an_interval_ack_after_a_failed_delivered_write_is_synced_within_the_interval() {
    let disk = SimDisk::new(1);
    let queue = sim(&disk);
    fill(&queue, 5);
    let group = queue.group("g").open().unwrap(); // acks: Interval(100 ms)
    let mut w = group.worker();
    let d0 = w.fetch(1, Z).unwrap().remove(0);
    let d1 = w.fetch(1, Z).unwrap().remove(0);
    group.sync().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    disk.inject(Fault {
        path_contains: Some("consumers.journal".into()),
        ..Fault::new(FaultOp::Write, FaultKind::Eio)
    });
    assert!(w.fetch(1, Z).is_err(), "the Delivered write fails");
    w.ack(d0.id()).unwrap();
    w.ack(d1.id()).unwrap();
    std::thread::sleep(Duration::from_millis(450));
    disk.crash_lose_unsynced();
    std::mem::forget((w, group, queue));
    let queue = sim(&disk);
    assert_eq!(
        queue.groups()[0].ack_floor,
        2,
        "Interval(100ms) acks made 450 ms before the power cut were lost"
    );
}

/// Dropping the Queue stops the housekeeping thread while groups (and
/// consumers) live on: their `Interval` acks/commits are never synced (nor
/// even written) until the last handle goes.
#[test]
fn interval_acks_are_synced_after_the_queue_handle_is_dropped() {
    let disk = SimDisk::new(1);
    let queue = sim(&disk);
    fill(&queue, 3);
    let group = queue.group("g").open().unwrap();
    let mut w = group.worker();
    let d0 = w.fetch(1, Z).unwrap().remove(0);
    drop(queue); // the group keeps the core (and the directory lock) alive
    w.ack(d0.id()).unwrap();
    std::thread::sleep(Duration::from_millis(600));
    disk.crash_lose_unsynced();
    std::mem::forget((w, group));
    let queue = sim(&disk);
    assert_eq!(
        queue.groups()[0].ack_floor,
        1,
        "an Interval(100ms) ack made 600 ms before the power cut was lost"
    );
}

/// A failed journal write clears the buffer and the deadline; the entries
/// live only in the image with `rewrite` set, and nothing rewrites the file
/// unless another entry is recorded: `close()` returns Ok and the commit is gone.
#[test]
fn an_interval_commit_whose_write_failed_is_rewritten_not_lost() {
    let disk = SimDisk::new(1);
    {
        let queue = sim(&disk);
        fill(&queue, 10);
        let mut c = queue.consumer("c").unwrap(); // creates the journal (position 0)
        disk.inject(Fault {
            op: FaultOp::Write,
            nth: 1,
            kind: FaultKind::Eio,
            path_contains: Some("consumers.journal".into()),
        });
        c.commit_with(5, Durability::Interval(Duration::from_millis(10))).unwrap();
        std::thread::sleep(Duration::from_millis(300)); // housekeeping: write fails, "retrying"
        drop(c);
        queue.close().unwrap();
    }
    let queue = sim(&disk);
    assert_eq!(queue.consumers()[0].position, 5, "close() returned Ok but the commit never reached the file");
}

/// `fetch` writes one `Delivered` entry for the whole fetch, unchunked: with
/// a large prefetch its body passes ENTRY_BODY_MAX (1 MiB), so the next open
/// reads it as damage and drops it and every later entry.
#[test]
fn a_large_fetch_is_journaled_in_entries_the_next_open_accepts() {
    let n = 100_000u64;
    let disk = SimDisk::new(1);
    {
        let queue = sim(&disk);
        fill(&queue, n);
        let mut c = queue.consumer("c").unwrap();
        let group = queue
            .group("g")
            .prefetch(n as usize)
            .max_deliver(2)
            .dead_letters(false)
            .ack_durability(Durability::Sync)
            .open()
            .unwrap();
        let mut w = group.worker();
        let first = w.fetch(n as usize, Z).unwrap(); // too big for the room: a (chunked) rewrite
        assert_eq!(first.len() as u64, n);
        for d in &first {
            w.nack(d.id(), Z).unwrap();
        }
        let second = w.fetch(n as usize, Z).unwrap(); // appended in place: one 1.2 MB entry
        assert_eq!(second[0].delivery_count(), 2);
        c.commit(10).unwrap(); // a durable commit after it
        drop((second, first, w, group, c));
        queue.close().unwrap();
    }
    let queue = sim(&disk);
    let damaged = queue.stats().consumer_journal_damaged;
    let position = queue.consumers()[0].position;
    assert!(
        !damaged && position == 10,
        "journal damaged at open: {damaged}; durable commit 10 came back as {position}"
    );
}

/// An error in the middle of `fetch` (here: the dead-letter append fails)
/// returns Err after earlier records of the same fetch were made in flight:
/// the worker holds a delivery it never received, and the record that
/// failed to dead-letter is in no set at all (not ready, not in flight, not
/// done) until the process restarts.
#[test]
fn an_error_mid_fetch_leaves_no_phantom_or_stranded_record() {
    let clock = ManualClock::new(1_000);
    let disk = SimDisk::new(1);
    let queue = Queue::builder(sim_dir()).simulated(&disk).clock(&clock).open().unwrap();
    fill(&queue, 2);
    let group = queue.group("g").max_deliver(2).open().unwrap();
    let mut w = group.worker();
    let ds = w.fetch(2, Z).unwrap();
    assert_eq!(ds.len(), 2);
    w.nack(ds[1].id(), Z).unwrap();
    let again = w.fetch(1, Z).unwrap();
    assert_eq!((again[0].offset(), again[0].delivery_count()), (1, 2));
    w.nack(again[0].id(), Z).unwrap(); // offset 1: next time it goes to the dead letters
    w.nack(ds[0].id(), Z).unwrap(); // offset 0: deliverable once more
    disk.inject(Fault {
        op: FaultOp::Write,
        nth: 1,
        kind: FaultKind::Eio,
        path_contains: Some("dead-letters".into()),
    });
    assert!(w.fetch(2, Z).is_err());
    disk.clear_faults();
    let info = group.info();
    assert!(
        w.outstanding() == 0 && info.pending + info.waiting_redelivery == 2,
        "after a failed fetch the worker holds {} deliveries it never received; \
         in flight {}, waiting {} (expected 0 held and 2 records accounted for)",
        w.outstanding(),
        info.pending,
        info.waiting_redelivery
    );
}
