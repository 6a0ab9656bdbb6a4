//! Append throughput of one thread, per durability mode and record size, and
//! the per-append latency distribution of durable (`Sync`) 1 KiB appends.
//!
//! Groups: `append/sync/{100B,1KiB,64KiB}`, `append/os/{100B,1KiB,64KiB}`,
//! `append/producers/{1,4,8,16,64}/{100B,1KiB,64KiB}` (durable appends from
//! that many threads: group commit), `append/producers_dedicated_flusher/*`
//! (the same with the background thread always flushing),
//! `append/producers_sector_padded/*` (batches padded to 4 KiB), `append/batch/1MiB`
//! (bytes/s), `append/async_tasks/{64,256}/1KiB` (feature `async`),
//! (records/s), and `append/sync_latency/1KiB`, which prints p50, p99 and
//! mean latency, throughput and their product (Little's law: the mean number
//! of records in flight) from the very samples criterion measured.
//!
//! Queues live under cargo's target tmp dir (on the real disk, not a tmpfs)
//! with the default 64 MiB segments, so segment rolls (and the fdatasync each
//! roll does) happen inside the timed loops as they would in production.
//! Between samples, outside the timing, sealed segments are removed so a long
//! run does not fill the disk.

// `criterion_group!` generates an undocumented `pub fn`.
#![allow(missing_docs)]

use std::cell::RefCell;
use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};

mod common;
use common::{bench_dir, measured_calls, quantile};
use walq::{Durability, Queue};

const SIZES: [(&str, usize); 3] = [("100B", 100), ("1KiB", 1 << 10), ("64KiB", 64 << 10)];

/// A value of `size` bytes that is not all one byte.
fn value(size: usize) -> Vec<u8> {
    (0..size).map(|i| (i.wrapping_mul(31) ^ (i >> 8)) as u8).collect()
}

/// Outside the timing, after a sample: drop every sealed segment so the disk
/// holds at most about one segment per queue. Nothing is flushed here: `Os`
/// appends carry their buffer into the next sample, as a steady stream would.
fn trim(queue: &Queue) {
    queue.remove_before(queue.next_offset()).expect("remove sealed segments");
}

fn append_throughput(c: &mut Criterion) {
    // `sync_growing`: the same durable appends without preallocation, so every
    // sync also commits the file's growth (the measured case for pre-zeroing).
    for (mode, durability, prealloc, sizes) in [
        ("sync", Durability::Sync, walq::PREALLOCATE_BYTES_DEFAULT, &SIZES[..]),
        ("os", Durability::Os, walq::PREALLOCATE_BYTES_DEFAULT, &SIZES[..]),
        ("sync_growing", Durability::Sync, 0, &SIZES[1..2]),
    ] {
        let mut group = c.benchmark_group(format!("append/{mode}"));
        group.throughput(Throughput::Elements(1));
        for &(label, size) in sizes {
            let dir = bench_dir("append");
            let queue = Queue::builder(dir.path())
                .durability(durability)
                .preallocate_bytes(prealloc)
                .open()
                .expect("open");
            let value = value(size);
            // One element = one `append` call. In `Os` mode most calls only
            // copy into the write buffer; every 64 KiB (the default write buffer) the call that fills it
            // writes the batch, and the background writer writes a partial
            // buffer after about 1 ms: both are inside the timed loop.
            group.bench_function(label, |b| {
                b.iter_custom(|iters| {
                    let start = Instant::now();
                    for _ in 0..iters {
                        black_box(queue.append(black_box(&value)).expect("append"));
                    }
                    let elapsed = start.elapsed();
                    trim(&queue);
                    elapsed
                })
            });
            queue.close().expect("close");
        }
        group.finish();
    }
}

fn append_sync_latency(c: &mut Criterion) {
    const SAMPLES: usize = 100;
    let (label, size) = SIZES[1];
    let dir = bench_dir("append-latency");
    let queue = Queue::builder(dir.path()).durability(Durability::Sync).open().expect("open");
    let value = value(size);
    // Per `iter_custom` call: the time criterion got, and each append's latency.
    let runs: RefCell<Vec<(Duration, Vec<Duration>)>> = RefCell::new(Vec::new());

    let mut group = c.benchmark_group("append/sync_latency");
    group.throughput(Throughput::Elements(1)).sample_size(SAMPLES);
    group.bench_function(label, |b| {
        b.iter_custom(|iters| {
            let mut latencies = Vec::with_capacity(iters as usize);
            let start = Instant::now();
            for _ in 0..iters {
                let t = Instant::now();
                black_box(queue.append(black_box(&value)).expect("append"));
                latencies.push(t.elapsed());
            }
            let elapsed = start.elapsed();
            trim(&queue);
            runs.borrow_mut().push((elapsed, latencies));
            elapsed
        })
    });
    group.finish();
    queue.close().expect("close");

    let runs = runs.into_inner();
    if runs.is_empty() {
        return; // filtered out
    }
    let measured = &runs[runs.len() - measured_calls(SAMPLES, runs.len())..];
    let wall: Duration = measured.iter().map(|(e, _)| *e).sum();
    let mut all: Vec<Duration> = measured.iter().flat_map(|(_, l)| l.iter().copied()).collect();
    all.sort_unstable();
    let n = all.len();
    let mean = all.iter().sum::<Duration>() / n as u32;
    let throughput = n as f64 / wall.as_secs_f64();
    println!(
        "append/sync_latency/{label}: {n} appends in {} samples: p50 {:.1?}  p99 {:.1?}  mean {:.1?}  \
         throughput {throughput:.0} records/s  in flight (throughput x mean) {:.3}",
        measured.len(),
        quantile(&all, 0.50),
        quantile(&all, 0.99),
        mean,
        throughput * mean.as_secs_f64(),
    );
}

/// Summary line of one multi-producer bench: per-append latency percentiles,
/// throughput, Little's-law concurrency, and how many records each sync covered.
fn report(name: &str, runs: &[Run], sample_size: usize) {
    if runs.is_empty() {
        return; // filtered out
    }
    let measured = &runs[runs.len() - measured_calls(sample_size, runs.len())..];
    let wall: Duration = measured.iter().map(|r| r.wall).sum();
    let mut all: Vec<Duration> = measured.iter().flat_map(|r| r.latencies.iter().copied()).collect();
    all.sort_unstable();
    let n = all.len();
    let mean = all.iter().sum::<Duration>() / n as u32;
    let throughput = n as f64 / wall.as_secs_f64();
    let syncs: u64 = measured.iter().map(|r| r.syncs).sum();
    println!(
        "{name}: {n} appends: p50 {:.1?}  p99 {:.1?}  mean {:.1?}  throughput {throughput:.0} records/s  \
         in flight {:.2}  records per sync {:.1}",
        quantile(&all, 0.50),
        quantile(&all, 0.99),
        mean,
        throughput * mean.as_secs_f64(),
        n as f64 / syncs.max(1) as f64,
    );
}

/// One `iter_custom` call of a multi-producer bench.
struct Run {
    wall: Duration,
    latencies: Vec<Duration>,
    syncs: u64,
}

/// `producers` threads share `iters` durable appends of `value`; returns the
/// run (wall time of the whole, each append's latency, syncs it took).
fn run_producers(queue: &Queue, producers: usize, iters: u64, value: &[u8]) -> Run {
    let per = (iters as usize).div_ceil(producers).max(1);
    let syncs_before = queue.stats().syncs;
    let start = Instant::now();
    let latencies: Vec<Duration> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..producers)
            .map(|_| {
                s.spawn(|| {
                    let mut lat = Vec::with_capacity(per);
                    for _ in 0..per {
                        let t = Instant::now();
                        black_box(queue.append(black_box(value)).expect("append"));
                        lat.push(t.elapsed());
                    }
                    lat
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().expect("producer")).collect()
    });
    let wall = start.elapsed();
    Run { wall, latencies, syncs: queue.stats().syncs - syncs_before }
}

/// Durable appends from 1..64 producer threads (group commit), and the same
/// with the dedicated flusher thread instead of a leading producer, to
/// measure that design choice.
fn append_producers(c: &mut Criterion) {
    const SAMPLES: usize = 10;
    for (mode, lead, pad, counts, sizes) in [
        ("producers", true, false, &[1usize, 4, 8, 16, 64][..], &SIZES[..]),
        ("producers_dedicated_flusher", false, false, &[1usize, 8, 64][..], &SIZES[1..2]),
        ("producers_sector_padded", true, true, &[1usize, 8, 64][..], &SIZES[..2]),
    ] {
        let mut group = c.benchmark_group(format!("append/{mode}"));
        group.throughput(Throughput::Elements(1)).sample_size(SAMPLES);
        for &producers in counts {
            for &(label, size) in sizes {
                let dir = bench_dir("append-producers");
                let queue =
                    Queue::builder(dir.path()).producers_lead(lead).pad_to_sectors(pad).open().expect("open");
                let value = value(size);
                let runs: RefCell<Vec<Run>> = RefCell::new(Vec::new());
                let id = format!("{producers}/{label}");
                group.bench_function(&id, |b| {
                    b.iter_custom(|iters| {
                        let run = run_producers(&queue, producers, iters, &value);
                        let done = run.latencies.len() as u64;
                        // Criterion wants the time of `iters` appends; the threads did `done` >= iters.
                        let scaled = run.wall.mul_f64(iters as f64 / done as f64);
                        trim(&queue);
                        runs.borrow_mut().push(run);
                        scaled
                    })
                });
                report(&format!("append/{mode}/{id}"), &runs.into_inner(), SAMPLES);
                queue.close().expect("close");
            }
        }
        group.finish();
    }
}

/// Durable `append_batch` of 1 MiB (1024 records of 1 KiB) per call, in bytes/s.
fn append_batch_1mib(c: &mut Criterion) {
    let dir = bench_dir("append-batch");
    let queue = Queue::open(dir.path()).expect("open");
    let value = value(1 << 10);
    let records: Vec<walq::Record<'_>> = (0..1024).map(|_| walq::Record::new(&value)).collect();
    let mut group = c.benchmark_group("append/batch");
    group.throughput(Throughput::Bytes(1 << 20)).sample_size(20);
    group.bench_function("1MiB", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            for _ in 0..iters {
                black_box(queue.append_batch(black_box(&records)).expect("append_batch"));
            }
            let elapsed = start.elapsed();
            trim(&queue);
            elapsed
        })
    });
    group.finish();
    queue.close().expect("close");
}

/// Async tasks on a 2-thread tokio runtime awaiting durable appends: the
/// flusher thread syncs and wakes them, no worker thread blocks.
#[cfg(feature = "async")]
fn append_async_tasks(c: &mut Criterion) {
    const SAMPLES: usize = 10;
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let mut group = c.benchmark_group("append/async_tasks");
    group.throughput(Throughput::Elements(1)).sample_size(SAMPLES);
    for tasks in [64usize, 256] {
        let dir = bench_dir("append-async");
        let queue = std::sync::Arc::new(Queue::open(dir.path()).expect("open"));
        let value = std::sync::Arc::new(value(1 << 10));
        let runs: RefCell<Vec<Run>> = RefCell::new(Vec::new());
        let id = format!("{tasks}/1KiB");
        group.bench_function(&id, |b| {
            b.iter_custom(|iters| {
                let per = (iters as usize).div_ceil(tasks).max(1);
                let syncs_before = queue.stats().syncs;
                let start = Instant::now();
                let latencies: Vec<Duration> = rt.block_on(async {
                    let handles: Vec<_> = (0..tasks)
                        .map(|_| {
                            let (queue, value) = (queue.clone(), value.clone());
                            tokio::spawn(async move {
                                let mut lat = Vec::with_capacity(per);
                                for _ in 0..per {
                                    let t = Instant::now();
                                    black_box(queue.append_async(&value).await.expect("append"));
                                    lat.push(t.elapsed());
                                }
                                lat
                            })
                        })
                        .collect();
                    let mut all = Vec::new();
                    for h in handles {
                        all.extend(h.await.expect("task"));
                    }
                    all
                });
                let run = Run { wall: start.elapsed(), latencies, syncs: queue.stats().syncs - syncs_before };
                let scaled = run.wall.mul_f64(iters as f64 / run.latencies.len() as f64);
                trim(&queue);
                runs.borrow_mut().push(run);
                scaled
            })
        });
        report(&format!("append/async_tasks/{id}"), &runs.into_inner(), SAMPLES);
    }
    group.finish();
}

#[cfg(not(feature = "async"))]
fn append_async_tasks(_: &mut Criterion) {
    println!("append/async_tasks: skipped: build with --features async");
}

criterion_group!(
    benches,
    append_throughput,
    append_sync_latency,
    append_producers,
    append_batch_1mib,
    append_async_tasks
);
criterion_main!(benches);
