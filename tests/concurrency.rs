//! Group commit under concurrency: many producers share each fdatasync, get
//! unique contiguous offsets, lose nothing acknowledged to a crash taken
//! right after, are never left waiting (no lost wake-up), fail together and
//! then stay failed when a sync fails (the latch), and keep filling the next
//! batch while a slow sync is in flight.
//!
//! Method: threads appending on the simulated disk (with injected sync
//! delays and sync errors), a watchdog that fails a test instead of letting
//! it hang, and a power cut followed by a reopen checked against every
//! acknowledgement the producers collected.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{read_all, sim_dir, value_for};
use walq::{Durability, Error, Fault, FaultKind, FaultOp, Queue, SimDisk};

/// Runs `f` on its own thread and fails the test if it takes longer than
/// `limit`: a lost wake-up shows up as a timeout, not a hung CI job.
fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit).expect("timed out: a producer was never woken")
}

/// `threads` producers each append `per_thread` records with `durability`;
/// returns every acknowledged (offset, value) and every error.
fn produce(
    queue: &Arc<Queue>,
    threads: u64,
    per_thread: u64,
    durability: Durability,
) -> (BTreeMap<u64, Vec<u8>>, Vec<Error>) {
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let queue = Arc::clone(queue);
            std::thread::spawn(move || {
                let mut acked = Vec::new();
                for i in 0..per_thread {
                    let v = value_for(t * 1_000_000 + i, t, 40 + (i % 300) as usize);
                    match queue.append_with(&v, durability) {
                        Ok(o) => acked.push((o, v)),
                        Err(e) => return (acked, Some(e)),
                    }
                }
                (acked, None)
            })
        })
        .collect();
    let mut all = BTreeMap::new();
    let mut errors = Vec::new();
    for h in handles {
        let (acked, err) = h.join().expect("producer panicked");
        for (o, v) in acked {
            assert!(all.insert(o, v).is_none(), "offset {o} given twice");
        }
        errors.extend(err);
    }
    (all, errors)
}

#[test]
fn sixteen_producers_get_unique_contiguous_offsets_and_survive_a_crash_right_after() {
    within(Duration::from_secs(120), || {
        for seed in 0..4 {
            let disk = SimDisk::new(seed);
            disk.set_sync_delay(Duration::from_micros(300));
            let queue =
                Arc::new(Queue::builder(sim_dir()).simulated(&disk).segment_bytes(64 << 10).open().unwrap());
            let (acked, errors) = produce(&queue, 16, 150, Durability::Sync);
            assert!(errors.is_empty(), "{errors:?}");
            let n = acked.len() as u64;
            assert_eq!(acked.keys().copied().collect::<Vec<_>>(), (0..n).collect::<Vec<_>>(), "contiguous");
            let stats = queue.stats();
            assert!(stats.records_per_sync_mean > 2.0, "syncs were not shared: {stats:?}");
            // Power cut right after the last acknowledgement: nothing unsynced survives.
            disk.crash_lose_unsynced();
            drop(queue);
            let queue = Queue::builder(sim_dir()).simulated(&disk).segment_bytes(64 << 10).open().unwrap();
            let got: BTreeMap<u64, Vec<u8>> = read_all(&queue).into_iter().collect();
            assert_eq!(got, acked, "seed {seed}: every acknowledged record, and only those");
        }
    });
}

#[test]
fn sixty_four_producers_mixing_modes_and_flushes_are_never_left_waiting() {
    within(Duration::from_secs(120), || {
        for producers_lead in [true, false] {
            let disk = SimDisk::new(7);
            let queue = Arc::new(
                Queue::builder(sim_dir())
                    .simulated(&disk)
                    .segment_bytes(32 << 10)
                    .producers_lead(producers_lead)
                    .open()
                    .unwrap(),
            );
            let handles: Vec<_> = (0..64u64)
                .map(|t| {
                    let queue = Arc::clone(&queue);
                    std::thread::spawn(move || {
                        for i in 0..60u64 {
                            let v = value_for(i, t, 30);
                            match (t + i) % 5 {
                                0 => drop(queue.append_with(&v, Durability::Os).unwrap()),
                                1 => queue.flush().unwrap(),
                                2 => drop(
                                    queue
                                        .append_with(&v, Durability::Interval(Duration::from_millis(2)))
                                        .unwrap(),
                                ),
                                _ => drop(queue.append_with(&v, Durability::Sync).unwrap()),
                            }
                        }
                    })
                })
                .collect();
            for h in handles {
                h.join().unwrap();
            }
            queue.flush().unwrap();
            let stats = queue.stats();
            assert_eq!(stats.durable_offset, stats.next_offset, "{stats:?}");
            assert_eq!(read_all(&queue).len() as u64, stats.next_offset);
        }
    });
}

#[test]
fn eio_on_the_kth_sync_fails_that_round_and_poisons_everything_after() {
    within(Duration::from_secs(60), || {
        for k in [1u64, 3, 10] {
            let disk = SimDisk::new(k);
            disk.set_sync_delay(Duration::from_micros(200));
            let queue = Arc::new(Queue::builder(sim_dir()).simulated(&disk).open().unwrap());
            disk.inject(Fault { nth: k, ..Fault::new(FaultOp::Sync, FaultKind::Eio) });
            let (acked, errors) = produce(&queue, 16, 100, Durability::Sync);
            assert_eq!(errors.len(), 16, "every producer saw the failure");
            let original = errors
                .iter()
                .filter(|e| matches!(e, Error::Io { source, .. } if source.raw_os_error() == Some(5)))
                .count();
            let poisoned = errors.iter().filter(|e| matches!(e, Error::Poisoned)).count();
            assert!(original >= 1, "the round's waiters get the original error: {errors:?}");
            assert_eq!(original + poisoned, 16, "{errors:?}");
            // Never retried and acknowledged: the latch holds until reopen.
            assert!(matches!(queue.append(b"after"), Err(Error::Poisoned)));
            assert!(matches!(queue.flush(), Err(Error::Poisoned)));
            assert!(queue.stats().poisoned);
            disk.crash_lose_unsynced();
            drop(queue);
            let queue = Queue::builder(sim_dir()).simulated(&disk).open().unwrap();
            let got: BTreeMap<u64, Vec<u8>> = read_all(&queue).into_iter().collect();
            for (o, v) in &acked {
                assert_eq!(got.get(o), Some(v), "k {k}: acknowledged offset {o} lost");
            }
        }
    });
}

#[test]
fn producers_keep_filling_the_next_batch_during_a_slow_sync() {
    within(Duration::from_secs(60), || {
        let disk = SimDisk::new(11);
        let delay = Duration::from_millis(20);
        disk.set_sync_delay(delay);
        let queue = Arc::new(Queue::builder(sim_dir()).simulated(&disk).open().unwrap());
        let started = Instant::now();
        let (acked, errors) = produce(&queue, 8, 20, Durability::Sync);
        let elapsed = started.elapsed();
        assert!(errors.is_empty());
        assert_eq!(acked.len(), 160);
        let stats = queue.stats();
        // One sync at a time would take 160 x 20 ms = 3.2 s; shared syncs take
        // about 20 rounds.
        assert!(stats.syncs <= 60, "{} syncs for 160 appends", stats.syncs);
        assert!(stats.records_per_sync_mean >= 3.0, "{stats:?}");
        assert!(elapsed < delay * 80, "took {elapsed:?}");
    });
}

#[test]
fn one_producer_leads_its_own_sync_without_a_background_thread() {
    let disk = SimDisk::new(3);
    let queue = Queue::builder(sim_dir()).simulated(&disk).open().unwrap();
    for i in 0..50 {
        assert_eq!(queue.append(b"solo").unwrap(), i);
    }
    let stats = queue.stats();
    assert_eq!((stats.syncs, stats.records_per_sync_last), (50, 1));
    assert!(stats.sync_micros_p50 <= stats.sync_micros_p99 && stats.sync_micros_p99 <= stats.sync_micros_max);
}

#[test]
fn concurrent_retention_removes_each_segment_once_and_never_the_active_one() {
    // Regression (review): two `remove_before` calls both chose the oldest
    // segment; the second removed whatever was first by then.
    for seed in 0..200u64 {
        let disk = SimDisk::new(seed);
        let q = Arc::new(
            Queue::builder(sim_dir())
                .segment_bytes(4096)
                .preallocate_bytes(0)
                .simulated(&disk)
                .open()
                .unwrap(),
        );
        while q.stats().segments < 2 {
            q.append(&[7; 200]).unwrap();
        }
        q.append(b"in the active segment").unwrap();
        let last = q.next_offset() - 1;
        let barrier = Arc::new(std::sync::Barrier::new(2));
        let results: Vec<usize> = (0..2)
            .map(|_| {
                let (q, b) = (Arc::clone(&q), Arc::clone(&barrier));
                std::thread::spawn(move || {
                    b.wait();
                    q.remove_before(last).unwrap()
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect();
        assert_eq!(results.iter().sum::<usize>(), 1, "seed {seed}: {results:?}");
        assert_eq!(q.stats().segments, 1);
        let mut r = q.read_from(last).unwrap();
        assert_eq!(r.next().unwrap().unwrap().value(), b"in the active segment");
    }
}

#[test]
fn a_sync_append_on_an_os_queue_waits_for_a_sync_that_covers_it() {
    let disk = SimDisk::new(21);
    let q = Queue::builder(sim_dir()).simulated(&disk).durability(Durability::Os).open().unwrap();
    for i in 0..10 {
        q.append(&value_for(i, 21, 20)).unwrap(); // Os: buffered
    }
    let o = q.append_with(b"must survive", Durability::Sync).unwrap();
    assert!(q.stats().durable_offset > o, "returned before a sync covered it");
    disk.crash_lose_unsynced();
    drop(q);
    let q = Queue::builder(sim_dir()).simulated(&disk).open().unwrap();
    let all = read_all(&q);
    assert_eq!(all.len() as u64, o + 1, "the Sync record and everything before it survive");
    assert_eq!(all[o as usize].1, b"must survive");
}
