//! Consumer benchmarks: `consume/e2e_latency/100B` (one producer appending
//! durably while a named consumer waits at the tail; the latency from the
//! `append` call to the consumer holding the record, printed as p50 and p99
//! from the samples criterion measured), `consume/named_consumer/100B`
//! (records per second one named consumer reads), and
//! `consume/group_fetch_ack/{1,4}_workers` (fetch + ack per record through a
//! consumer group, acks with the default `Interval(100 ms)` durability).
//!
//! Queues live under cargo's target tmp dir, on the real disk.

// `criterion_group!` generates an undocumented `pub fn`.
#![allow(missing_docs)]

use std::cell::RefCell;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};

mod common;
use common::{bench_dir, measured_calls, quantile};
use walq::{Durability, Queue, Record, StartAt};

/// Appends `n` 100-byte records cheaply and syncs them.
fn fill(queue: &Queue, n: u64) {
    let value = [7u8; 100];
    let records: Vec<Record<'_>> = (0..1000).map(|_| Record::new(&value)).collect();
    let mut left = n;
    while left > 0 {
        let k = left.min(1000) as usize;
        queue.append_batch_with(&records[..k], Durability::Os).expect("fill");
        left -= k as u64;
    }
    queue.flush().expect("flush");
}

fn e2e_latency(c: &mut Criterion) {
    const SAMPLES: usize = 50;
    let dir = bench_dir("e2e");
    let queue = Arc::new(Queue::open(dir.path()).expect("open"));
    let base = Instant::now();
    let runs: RefCell<Vec<Vec<Duration>>> = RefCell::new(Vec::new());
    let mut group = c.benchmark_group("consume/e2e_latency");
    group.throughput(Throughput::Elements(1)).sample_size(SAMPLES);
    group.bench_function("100B", |b| {
        b.iter_custom(|iters| {
            let mut consumer = queue.consumer_from("e2e", StartAt::Latest).expect("consumer");
            consumer.seek(queue.next_offset());
            let reader = std::thread::spawn(move || {
                let mut latencies = Vec::with_capacity(iters as usize);
                while (latencies.len() as u64) < iters {
                    let r = consumer.next_timeout(Duration::from_secs(10)).expect("read").expect("a record");
                    let sent = u64::from_le_bytes(r.value()[..8].try_into().expect("8 bytes"));
                    let now = base.elapsed().as_nanos() as u64;
                    latencies.push(Duration::from_nanos(now.saturating_sub(sent)));
                }
                latencies
            });
            let mut value = [0u8; 100];
            let start = Instant::now();
            for _ in 0..iters {
                let sent = base.elapsed().as_nanos() as u64;
                value[..8].copy_from_slice(&sent.to_le_bytes());
                queue.append(&value).expect("append");
            }
            let latencies = reader.join().expect("consumer thread");
            let elapsed = start.elapsed();
            queue.remove_before(queue.next_offset()).expect("trim");
            runs.borrow_mut().push(latencies);
            elapsed
        })
    });
    group.finish();
    let runs = runs.into_inner();
    if runs.is_empty() {
        return;
    }
    let measured = &runs[runs.len() - measured_calls(SAMPLES, runs.len())..];
    let mut all: Vec<Duration> = measured.iter().flatten().copied().collect();
    all.sort_unstable();
    println!(
        "consume/e2e_latency/100B: {} records, durable append to consumer: p50 {:.1?}  p99 {:.1?}  max {:.1?}",
        all.len(),
        quantile(&all, 0.50),
        quantile(&all, 0.99),
        all[all.len() - 1],
    );
}

fn named_consumer(c: &mut Criterion) {
    const FILL: u64 = 2_000_000;
    let dir = bench_dir("consumer");
    let queue = Queue::builder(dir.path()).durability(Durability::Os).open().expect("open");
    fill(&queue, FILL);
    let mut consumer = queue.consumer("scan").expect("consumer");
    let mut group = c.benchmark_group("consume/named_consumer");
    group.throughput(Throughput::Elements(1));
    group.bench_function("100B", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            let mut bytes = 0usize;
            for _ in 0..iters {
                if consumer.position() >= FILL {
                    consumer.seek(0);
                }
                let r = consumer.next_timeout(Duration::ZERO).expect("read").expect("a record");
                bytes += r.value().len();
            }
            std::hint::black_box(bytes);
            start.elapsed()
        })
    });
    group.finish();
}

fn group_fetch_ack(c: &mut Criterion) {
    let dir = bench_dir("group");
    let queue = Queue::builder(dir.path()).durability(Durability::Os).open().expect("open");
    let mut run = 0u64;
    let mut group = c.benchmark_group("consume/group_fetch_ack");
    group.throughput(Throughput::Elements(1));
    for workers in [1usize, 4] {
        group.bench_function(format!("{workers}_workers"), |b| {
            b.iter_custom(|iters| {
                // A fresh group over `iters` fresh records, outside the timing.
                let first = queue.next_offset();
                fill(&queue, iters);
                run += 1;
                let g = queue
                    .group(&format!("g{run}"))
                    .start(StartAt::Offset(first))
                    .dead_letters(false)
                    .open()
                    .expect("group");
                let done = AtomicU64::new(0);
                let start = Instant::now();
                std::thread::scope(|s| {
                    for _ in 0..workers {
                        let (g, done) = (&g, &done);
                        s.spawn(move || {
                            let mut w = g.worker_with_prefetch(256);
                            while done.load(Ordering::Relaxed) < iters {
                                let ds = w.fetch(64, Duration::from_millis(1)).expect("fetch");
                                for d in &ds {
                                    w.ack(d.id()).expect("ack");
                                }
                                done.fetch_add(ds.len() as u64, Ordering::Relaxed);
                            }
                        });
                    }
                });
                let elapsed = start.elapsed();
                drop(g);
                queue.remove_before(queue.next_offset()).expect("trim");
                elapsed
            })
        });
    }
    group.finish();
}

criterion_group!(benches, e2e_latency, named_consumer, group_fetch_ack);
criterion_main!(benches);
