//! How long opening (recovering) a cleanly closed queue takes, by log size.
//!
//! `recovery/open/64MiB` and `recovery/open/1GiB` (and `recovery/open/4GiB`
//! when `WALQ_BENCH_4GIB=1`): a log holding that many bytes of 1 KiB record
//! values (64 Ki, 1 Mi and 4 Mi records; the files are slightly larger, by
//! the record and batch headers), written with `Os` appends and closed
//! cleanly before anything is timed, with the default 64 MiB segments. One
//! iteration is `Queue::open` then drop (the drop has nothing to sync).
//!
//! Page cache: `recovery/open/*` are warm-cache figures: the log was just
//! written, so the segment headers, indexes and the tail that recovery reads
//! come from memory. `recovery/open_cold/*` drops the page cache before every
//! open (outside the timing; needs root to write /proc/sys/vm/drop_caches,
//! and is skipped with a message otherwise), so each open pays the disk's
//! latency for every read, as after a reboot.
//!
//! Each log is deleted once its size is measured, so the disk holds one log
//! at a time (at most 1 GiB, or 4 GiB with `WALQ_BENCH_4GIB=1`).

// `criterion_group!` generates an undocumented `pub fn`.
#![allow(missing_docs)]

use std::path::Path;
use std::time::Instant;

use criterion::{Criterion, SamplingMode, criterion_group, criterion_main};
use walq::{Durability, Queue};

const RECORD_BYTES: usize = 1 << 10;

/// Writes `bytes` of 1 KiB record values and closes the queue cleanly.
fn write_log(dir: &Path, bytes: u64) {
    let started = Instant::now();
    let queue = Queue::builder(dir).durability(Durability::Os).open().expect("open");
    let value: Vec<u8> = (0..RECORD_BYTES).map(|i| (i * 7) as u8).collect();
    for _ in 0..bytes / RECORD_BYTES as u64 {
        queue.append(&value).expect("append");
    }
    let stats = queue.stats();
    assert_eq!(stats.bytes, bytes);
    queue.close().expect("close");
    let on_disk: u64 = std::fs::read_dir(dir)
        .expect("list")
        .map(|e| e.expect("entry").metadata().expect("stat").len())
        .sum();
    println!(
        "recovery setup: {} records, {} segments, {:.1} MiB of files, written in {:.1?}",
        stats.appends,
        stats.segments,
        on_disk as f64 / (1 << 20) as f64,
        started.elapsed()
    );
}

fn recovery(c: &mut Criterion) {
    let mut sizes = vec![("64MiB", 64u64 << 20), ("1GiB", 1 << 30)];
    if std::env::var("WALQ_BENCH_4GIB").is_ok_and(|v| v == "1") {
        sizes.push(("4GiB", 4 << 30));
    }
    let mut group = c.benchmark_group("recovery");
    group.sampling_mode(SamplingMode::Flat).sample_size(20);
    for (label, bytes) in sizes {
        let dir = tempfile::Builder::new()
            .prefix("walq-bench-recovery-")
            .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
            .expect("create a bench directory under the target dir");
        write_log(dir.path(), bytes);

        // What recovery itself says it did, once, outside the timing.
        let queue = Queue::open(dir.path()).expect("open");
        let r = queue.recovery_report();
        println!(
            "recovery/open/{label}: report: duration {:.1?}, bytes scanned {}, segments {}, \
             indexes rebuilt {}, bytes cut {}",
            r.duration, r.bytes_scanned, r.segments, r.indexes_rebuilt, r.bytes_cut
        );
        queue.close().expect("close");

        group.bench_function(format!("open/{label}"), |b| {
            b.iter(|| drop(Queue::open(dir.path()).expect("open")))
        });
        if drop_caches() {
            group.bench_function(format!("open_cold/{label}"), |b| {
                b.iter_custom(|iters| {
                    let mut total = std::time::Duration::ZERO;
                    for _ in 0..iters {
                        drop_caches();
                        let started = Instant::now();
                        drop(Queue::open(dir.path()).expect("open"));
                        total += started.elapsed();
                    }
                    total
                })
            });
        } else {
            println!("recovery/open_cold/{label}: skipped: dropping the page cache needs root");
        }
        dir.close().expect("delete the log");
    }
    group.finish();
}

/// Writes back dirty pages and drops the page cache; false when not permitted.
fn drop_caches() -> bool {
    let synced = std::process::Command::new("sync").status().is_ok_and(|s| s.success());
    synced && std::fs::write("/proc/sys/vm/drop_caches", "3").is_ok()
}

criterion_group!(benches, recovery);
criterion_main!(benches);
