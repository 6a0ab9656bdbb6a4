//! A model-based test of consumers and groups: random operation sequences
//! (appends, consumer reads and commits, group fetches, acks, nacks, terms,
//! clock jumps) on the simulated disk, with the process halted between any
//! two storage calls and power cuts or process crashes, checked against a
//! model after every step and every restart:
//!
//! - the log: every acknowledged record present and intact, no phantoms;
//! - a consumer's position after a restart is its last durable commit or a
//!   later one attempted, never past the log's end;
//! - a group never delivers a record whose ack (or term) was durable, never
//!   delivers a record more than `max_deliver` times, delivers every record's
//!   true value, raises the delivery count on every redelivery across
//!   process crashes, and dead-letters only records that were terminated or
//!   reached `max_deliver`;
//! - drained at the end, every record is done: nothing is lost.
//!
//! `WALQ_SEED` replays one seed; `WALQ_ITERS` scales the number of seeds.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::{Model, Rng, sim_dir, value_for};
use walq::{Delivery, Durability, ManualClock, Queue, Record, SimDisk, dead_letter_headers as h};

const MAX_DELIVER: u32 = 4;
const ACK_WAIT: Duration = Duration::from_secs(10);
const Z: Duration = Duration::ZERO;

struct World {
    disk: SimDisk,
    clock: ManualClock,
    log: Model,
    generation: u64,
    ack_durability: Durability,
    /// Positions the consumer may have after a restart (the last durable
    /// commit, then every commit attempted since).
    commits: Vec<u64>,
    /// Acked or termed, durably: never delivered again.
    done_sure: BTreeSet<u64>,
    /// Terminated (term is always durable once it returns).
    termed: BTreeSet<u64>,
    /// Highest delivery count seen per offset, and whether a power cut
    /// happened since (counts are written to the OS, synced with acks).
    counts: BTreeMap<u64, u32>,
    /// Deliveries the current process holds.
    held: Vec<Delivery>,
    crashes: u64,
}

fn open(w: &World) -> walq::Result<Queue> {
    Queue::builder(sim_dir())
        .simulated(&w.disk)
        .clock(&w.clock)
        .segment_bytes(4096)
        .preallocate_bytes(1024)
        .open()
}

impl World {
    fn check_delivery(&mut self, d: &Delivery, ctx: &str) {
        let o = d.offset();
        assert!(!self.done_sure.contains(&o), "{ctx}: offset {o} delivered after a durable ack");
        assert!(
            d.delivery_count() <= MAX_DELIVER,
            "{ctx}: offset {o} delivered {} times",
            d.delivery_count()
        );
        assert_eq!(d.record().value, self.log.attempted[o as usize], "{ctx}: offset {o} has the wrong value");
        let last = self.counts.get(&o).copied().unwrap_or(0);
        assert!(d.delivery_count() > last, "{ctx}: offset {o} count {} after {last}", d.delivery_count());
        self.counts.insert(o, d.delivery_count());
    }

    /// After a restart: forget what only the dead process held, and which
    /// non-durable facts a power cut may have taken back.
    fn restarted(&mut self, power_cut: bool) {
        self.held.clear();
        self.crashes += 1;
        if power_cut {
            // Delivery counts reach the OS at once but the disk only with a
            // later sync: after a power cut a count may repeat.
            self.counts.clear();
        }
    }
}

/// One run of `ops` random operations; returns the number of restarts.
fn run(seed: u64, ops: u64) -> u64 {
    let mut rng = Rng::new(seed);
    let ack_durability = match rng.below(3) {
        0 => Durability::Sync,
        1 => Durability::Os,
        _ => Durability::Interval(Duration::from_millis(1)),
    };
    let mut w = World {
        disk: SimDisk::new(seed),
        clock: ManualClock::new(1_000_000),
        log: Model::default(),
        generation: 0,
        ack_durability,
        commits: vec![0],
        done_sure: BTreeSet::new(),
        termed: BTreeSet::new(),
        counts: BTreeMap::new(),
        held: Vec::new(),
        crashes: 0,
    };
    let mut op = 0;
    'process: while op < ops {
        // A new process: open, check everything against the model.
        let ctx = format!("seed {seed} op {op}");
        let Ok(queue) = open(&w) else {
            w.disk.crash();
            w.restarted(true);
            continue;
        };
        w.log.check(&queue, &ctx);
        let next = queue.next_offset();
        let Ok(mut consumer) = queue.consumer("c") else {
            drop(queue);
            w.disk.crash();
            w.restarted(true);
            continue;
        };
        let pos = consumer.position();
        assert!(pos <= next, "{ctx}: consumer position {pos} past the log end {next}");
        assert!(
            w.commits.iter().any(|&c| c.min(next) == pos),
            "{ctx}: consumer at {pos}, expected one of {:?}",
            w.commits
        );
        w.commits = vec![pos];
        let Ok(group) = queue
            .group("g")
            .max_deliver(MAX_DELIVER)
            .ack_wait(ACK_WAIT)
            .ack_durability(w.ack_durability)
            .open()
        else {
            drop((consumer, queue));
            w.disk.crash();
            w.restarted(true);
            continue;
        };
        let mut worker = group.worker_with_prefetch(8);
        if rng.chance(30) {
            // Die somewhere in the next few storage calls.
            w.disk.halt_after(rng.below(40));
        }
        while op < ops {
            op += 1;
            let ctx = format!("seed {seed} op {op}");
            let failed = match rng.below(100) {
                0..=24 => {
                    let offset = w.log.attempted.len() as u64;
                    let n = 1 + rng.below(3);
                    let values: Vec<Vec<u8>> = (0..n)
                        .map(|i| value_for(offset + i, w.generation, 20 + rng.below(300) as usize))
                        .collect();
                    let records: Vec<Record<'_>> = values.iter().map(|v| Record::new(v)).collect();
                    w.log.attempted.extend(values.iter().cloned());
                    match queue.append_batch(&records) {
                        Ok(r) => {
                            w.log.durable = r.end;
                            false
                        }
                        Err(_) => true,
                    }
                }
                25..=34 => {
                    let got = consumer.poll(1 + rng.below(5) as usize, Z);
                    match got {
                        Ok(records) => {
                            for r in records {
                                assert_eq!(
                                    r.value, w.log.attempted[r.offset as usize],
                                    "{ctx}: consumer read"
                                );
                            }
                            let to = consumer.position();
                            let durable = rng.chance(50);
                            w.commits.push(to);
                            let d = if durable { Durability::Sync } else { Durability::Os };
                            if std::env::var("WALQ_TRACE").is_ok() {
                                eprintln!("{ctx}: commit {to} {d:?}");
                            }
                            match consumer.commit_with(to, d) {
                                Ok(()) if durable => {
                                    w.commits = vec![to];
                                    false
                                }
                                Ok(()) => false,
                                Err(_) => true,
                            }
                        }
                        Err(_) => true,
                    }
                }
                35..=59 => match worker.fetch(1 + rng.below(4) as usize, Z) {
                    Ok(ds) => {
                        for d in &ds {
                            w.check_delivery(d, &ctx);
                        }
                        w.held.extend(ds);
                        false
                    }
                    Err(_) => true,
                },
                60..=89 if !w.held.is_empty() => {
                    let d = w.held.swap_remove(rng.below(w.held.len() as u64) as usize);
                    let o = d.offset();
                    match rng.below(10) {
                        0..=5 => match worker.ack(d.id()) {
                            Ok(()) => {
                                // Only a Sync ack is sure to survive a power cut.
                                if w.ack_durability == Durability::Sync {
                                    w.done_sure.insert(o);
                                }
                                false
                            }
                            Err(walq::Error::DeliveryNotPending { .. }) => false,
                            Err(_) => true,
                        },
                        6..=8 => match worker.nack(d.id(), Duration::from_secs(rng.below(3))) {
                            Ok(()) | Err(walq::Error::DeliveryNotPending { .. }) => false,
                            Err(_) => true,
                        },
                        _ => match worker.term(d.id()) {
                            Ok(()) => {
                                w.done_sure.insert(o);
                                w.termed.insert(o);
                                false
                            }
                            Err(walq::Error::DeliveryNotPending { .. }) => false,
                            Err(_) => {
                                w.termed.insert(o); // may have reached the dead letters
                                true
                            }
                        },
                    }
                }
                90..=94 => {
                    w.clock.advance(Duration::from_secs(rng.below(15)));
                    false
                }
                _ => {
                    // A restart: clean, a process crash, or a power cut.
                    let kind = rng.below(3);
                    if kind == 0 {
                        drop((worker, group, consumer));
                        let _ = queue.close();
                    }
                    // The process dies: its handles see a dead disk afterwards.
                    match kind {
                        0 | 1 => w.disk.crash_keep_all(),
                        _ => w.disk.crash(),
                    }
                    w.restarted(kind == 2);
                    w.generation += 1;
                    continue 'process;
                }
            };
            if std::env::var("WALQ_TRACE").is_ok() {
                eprintln!("{ctx}: failed={failed} commits={:?}", w.commits);
            }
            if failed {
                // The process "died" at the failure: a power cut or not.
                let power = rng.chance(50);
                if power {
                    w.disk.crash();
                } else {
                    w.disk.crash_keep_all();
                }
                drop((worker, group, consumer, queue));
                w.restarted(power);
                w.generation += 1;
                continue 'process;
            }
        }
        // The end: this process dies too (ending any halt still armed).
        w.disk.crash_keep_all();
        drop((worker, group, consumer, queue));
        w.restarted(false);
    }
    drain(&mut w, seed);
    w.crashes
}

/// Reopens, drains the group, and checks that nothing was lost and that the
/// dead letters hold only what belongs there.
fn drain(w: &mut World, seed: u64) {
    let ctx = format!("seed {seed} drain");
    let queue = open(w).unwrap_or_else(|e| panic!("{ctx}: {e}"));
    w.log.check(&queue, &ctx);
    let group = queue
        .group("g")
        .max_deliver(MAX_DELIVER)
        .ack_wait(ACK_WAIT)
        .ack_durability(w.ack_durability)
        .open()
        .unwrap_or_else(|e| panic!("{ctx}: {e}"));
    let mut worker = group.worker_with_prefetch(8);
    let next = queue.next_offset();
    for _round in 0..(MAX_DELIVER + 2) {
        w.clock.advance(ACK_WAIT + Duration::from_secs(5));
        loop {
            let ds = worker.fetch(8, Z).unwrap_or_else(|e| panic!("{ctx}: {e}"));
            if ds.is_empty() {
                break;
            }
            for d in &ds {
                w.check_delivery(d, &ctx);
                worker.ack(d.id()).unwrap();
            }
        }
    }
    let info = group.info();
    assert_eq!(info.ack_floor, next, "{ctx}: records never finished: {info:?}");
    // Dead letters: only terminated records or ones that reached max_deliver.
    let dlq = group.dead_letters().unwrap();
    let mut r = dlq.read_from(dlq.first_offset()).unwrap();
    while let Some(rec) = r.next().unwrap() {
        let get = |name: &str| -> String {
            String::from_utf8(rec.header(name.as_bytes()).unwrap().to_vec()).unwrap()
        };
        let o: u64 = get(h::ORIGINAL_OFFSET).parse().unwrap();
        let count: u32 = get(h::DELIVERY_COUNT).parse().unwrap();
        assert_eq!(rec.value(), &w.log.attempted[o as usize][..], "{ctx}: dead letter {o} value");
        match get(h::REASON).as_str() {
            "term" => assert!(w.termed.contains(&o), "{ctx}: {o} dead-lettered as termed, never termed"),
            "max_deliver" => assert!(count >= MAX_DELIVER, "{ctx}: {o} dead-lettered after {count}"),
            other => panic!("{ctx}: reason {other}"),
        }
    }
}

#[test]
fn consumer_and_group_model_with_crashes() {
    let seeds = common::iterations(2000);
    let first = common::seed(0);
    let mut restarts = 0;
    for seed in first..first + seeds {
        restarts += run(seed, 120);
    }
    eprintln!("consumer model: {seeds} seeds, {restarts} restarts (crashes and power cuts)");
    assert!(restarts > seeds, "the runs must restart");
}
