//! Operation sequences with crash points, against a model: the fuzzer's bytes
//! choose appends (durable, cheap, batches), flushes, consumer reads and
//! commits, group fetches, acks, nacks and terms, clock jumps, retention,
//! halts between storage calls, process crashes, power cuts and clean
//! reopens, on the simulated disk. After every reopen: every acknowledged
//! record present and intact, no phantom, offsets contiguous; the consumer at
//! its last durable commit or a later one; no durably acknowledged record
//! delivered again; every delivery carries the value appended at its offset.
#![no_main]

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use walq::{Delivery, Durability, ManualClock, Queue, Record, SimDisk};

struct Model {
    /// Value attempted at each offset.
    attempted: Vec<Vec<u8>>,
    /// Offsets below are acknowledged durable.
    durable: u64,
    commits: Vec<u64>,
    acked: BTreeSet<u64>,
    generation: u64,
}

struct Live {
    queue: Queue,
    consumer: walq::Consumer,
    group: walq::Group,
    worker: walq::Worker,
    held: Vec<Delivery>,
}

fn value(offset: u64, generation: u64, len: usize) -> Vec<u8> {
    let mut v = format!("o{offset}g{generation}:").into_bytes();
    v.resize(len.max(v.len()), b'v');
    v
}

fn open(disk: &SimDisk, clock: &ManualClock, m: &mut Model, ack: Durability) -> Option<Live> {
    let dir = Path::new("/q");
    let queue = Queue::builder(dir).simulated(disk).clock(clock).segment_bytes(4096).preallocate_bytes(512).open().ok()?;
    // The log: every acknowledged record, nothing else.
    let next = queue.next_offset();
    assert!(next >= m.durable, "acknowledged records lost: next {next} < {}", m.durable);
    assert!(next <= m.attempted.len() as u64, "phantom records");
    let first = queue.first_offset();
    let mut r = queue.read_from(first).expect("read_from the first offset");
    let mut at = first;
    while let Some(rec) = r.next().expect("a recovered log reads") {
        assert_eq!(rec.offset(), at, "offsets contiguous");
        assert_eq!(rec.value(), &m.attempted[at as usize][..], "record {at} intact");
        at += 1;
    }
    assert_eq!(at, next);
    drop(r);
    m.attempted.truncate(next as usize);
    m.durable = next;
    let consumer = queue.consumer("c").ok()?;
    let pos = consumer.position();
    assert!(pos <= next, "consumer ahead of the log");
    assert!(m.commits.iter().any(|&c| c.min(next) == pos), "consumer at {pos}, allowed {:?}", m.commits);
    m.commits = vec![pos];
    let group = queue.group("g").max_deliver(3).ack_wait(Duration::from_secs(5)).ack_durability(ack).open().ok()?;
    let worker = group.worker_with_prefetch(8);
    Some(Live { queue, consumer, group, worker, held: Vec::new() })
}

fn check_delivery(m: &Model, d: &Delivery) {
    assert!(!m.acked.contains(&d.offset()), "offset {} delivered after a durable ack", d.offset());
    assert_eq!(d.record().value, m.attempted[d.offset() as usize], "delivered value of {}", d.offset());
    assert!(d.delivery_count() <= 3, "delivered more than max_deliver times");
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, ops)) = data.split_first() else { return };
    let ack = if first & 1 == 0 { Durability::Sync } else { Durability::Os };
    let disk = SimDisk::new(u64::from(first));
    let clock = ManualClock::new(1_000_000);
    let mut m = Model { attempted: Vec::new(), durable: 0, commits: vec![0], acked: BTreeSet::new(), generation: 0 };
    let mut live = open(&disk, &clock, &mut m, ack);
    let mut bytes = ops.iter().copied();
    while let Some(op) = bytes.next() {
        let arg = u64::from(bytes.next().unwrap_or(0));
        if std::env::var_os("WALQ_TRACE").is_some() {
            eprintln!("op {} arg {arg} live {} attempted {} durable {}", op % 16, live.is_some(), m.attempted.len(), m.durable);
        }
        let Some(l) = live.as_mut() else {
            // The last open failed (a halt or a crash mid-open): power cut, try again.
            disk.crash();
            m.generation += 1;
            live = open(&disk, &clock, &mut m, ack);
            continue;
        };
        match op % 16 {
            0 | 1 => {
                let at = m.attempted.len() as u64;
                let n = 1 + arg % 3;
                let values: Vec<Vec<u8>> = (0..n).map(|i| value(at + i, m.generation, 10 + (arg as usize * 7) % 600)).collect();
                m.attempted.extend(values.iter().cloned());
                let records: Vec<Record<'_>> = values.iter().map(|v| Record::new(v)).collect();
                let res = l.queue.append_batch(&records);
                if std::env::var_os("WALQ_TRACE").is_some() {
                    eprintln!("  append {n} -> {res:?} disk ops {} segs {:?}", disk.ops(), disk.files().iter().filter(|p| p.extension().is_some_and(|e| e == "seg")).collect::<Vec<_>>());
                }
                if let Ok(r) = res {
                    m.durable = r.end;
                }
            }
            2 => {
                let at = m.attempted.len() as u64;
                m.attempted.push(value(at, m.generation, 20));
                let _ = l.queue.append_with(&m.attempted[at as usize], Durability::Os);
            }
            3 => {
                let next = m.attempted.len() as u64;
                if l.queue.flush().is_ok() {
                    m.durable = m.durable.max(next.min(l.queue.next_offset()));
                }
            }
            4 | 5 => {
                if let Ok(records) = l.consumer.poll(1 + arg as usize % 4, Duration::ZERO) {
                    for r in records {
                        assert_eq!(r.value, m.attempted[r.offset as usize], "consumer read {}", r.offset);
                    }
                    let to = l.consumer.position();
                    m.commits.push(to);
                    let d = if op % 16 == 4 { Durability::Sync } else { Durability::Os };
                    if l.consumer.commit_with(to, d).is_ok() && d == Durability::Sync {
                        m.commits = vec![to];
                    }
                }
            }
            6 => {
                if let Ok(ds) = l.worker.fetch(1 + arg as usize % 4, Duration::ZERO) {
                    for d in &ds {
                        check_delivery(&m, d);
                    }
                    l.held.extend(ds);
                }
            }
            7..=9 if !l.held.is_empty() => {
                let d = l.held.remove(arg as usize % l.held.len());
                let o = d.offset();
                let r = match op % 16 {
                    7 => l.worker.ack(d.id()),
                    8 => l.worker.nack(d.id(), Duration::from_secs(arg % 3)),
                    _ => l.worker.term(d.id()),
                };
                if r.is_ok() && (op % 16 == 9 || (op % 16 == 7 && ack == Durability::Sync)) {
                    m.acked.insert(o);
                }
            }
            10 => clock.advance(Duration::from_secs(arg % 8)),
            11 => {
                let _ = l.queue.remove_before(l.queue.first_offset() + arg % 16);
            }
            12 | 13 | 15 => {
                // A power cut, a process crash, or a clean close; then reopen.
                let Live { queue, consumer, group, worker, .. } = live.take().expect("live");
                if op % 16 == 15 {
                    drop((worker, group, consumer));
                    let _ = queue.close();
                    disk.crash_keep_all();
                } else {
                    if op % 16 == 12 {
                        disk.crash();
                    } else {
                        disk.crash_keep_all();
                    }
                    drop((worker, group, consumer, queue));
                }
                m.generation += 1;
                live = open(&disk, &clock, &mut m, ack);
            }
            14 => {
                if std::env::var_os("WALQ_TRACE").is_some() {
                    eprintln!("  halt after {} more (at {})", arg % 24, disk.ops());
                }
                disk.halt_after(arg % 24)
            }
            _ => {}
        }
    }
    // The end: a power cut and a last check.
    if let Some(Live { queue, consumer, group, worker, .. }) = live.take() {
        disk.crash();
        drop((worker, group, consumer, queue));
    } else {
        disk.crash();
    }
    let _ = open(&disk, &clock, &mut m, ack);
});
