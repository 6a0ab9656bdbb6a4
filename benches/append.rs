//! Append throughput of one thread, per durability mode and record size, and
//! the per-append latency distribution of durable (`Sync`) 1 KiB appends.
//!
//! Groups: `append/sync/{100B,1KiB,64KiB}`, `append/os/{100B,1KiB,64KiB}`
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
use walq::{Durability, Queue};

const SIZES: [(&str, usize); 3] = [("100B", 100), ("1KiB", 1 << 10), ("64KiB", 64 << 10)];

fn bench_dir(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("walq-bench-{name}-"))
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("create a bench directory under the target dir")
}

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
    for (mode, durability) in [("sync", Durability::Sync), ("os", Durability::Os)] {
        let mut group = c.benchmark_group(format!("append/{mode}"));
        group.throughput(Throughput::Elements(1));
        for (label, size) in SIZES {
            let dir = bench_dir("append");
            let queue = Queue::builder(dir.path()).durability(durability).open().expect("open");
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

/// How many of the last `iter_custom` calls criterion measured (the others
/// were its warm-up), judging by the command line.
fn measured_calls(sample_size: usize, calls: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    let has = |flag: &str| args.iter().any(|a| a == flag);
    if has("--test") || has("--profile-time") {
        calls
    } else if has("--quick") {
        // Quick mode keeps the last two runs (n and 2n iterations).
        calls.min(2)
    } else {
        calls.min(sample_size)
    }
}

/// The value at quantile `q` of sorted `v` (nearest rank).
fn quantile(v: &[Duration], q: f64) -> Duration {
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
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

criterion_group!(benches, append_throughput, append_sync_latency);
criterion_main!(benches);
