//! Read paths and the checksum they pay for.
//!
//! - `read/scan/100B`: a reader walks a log of one million 100-byte records
//!   from the first offset to the last, touching every value; each batch's
//!   CRC-32C is verified by the reader before its records are returned.
//! - `read/random/{read_from,seek}`: one lookup per iteration at an offset
//!   drawn from a fixed-seed xorshift, either with a new reader
//!   (`read_from` + `next`) or by moving one reader (`seek` + `next`).
//! - `checksum/{crc32c,crc32fast}/{100B,4KiB,64KiB}`: CRC-32C (what walq
//!   uses) against crc32fast's CRC-32 (IEEE) on the same buffers, in bytes/s.
//!
//! The log is written once (with `Os` appends and a flush) before anything is
//! timed, under cargo's target tmp dir on the real disk; it was just written,
//! so reads are served from a warm page cache.

// `criterion_group!` generates an undocumented `pub fn`.
#![allow(missing_docs)]

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use walq::{Durability, Queue};

const RECORDS: u64 = 1_000_000;
const RECORD_BYTES: usize = 100;

/// xorshift64 (Marsaglia): deterministic offsets without a dependency.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

struct Fixture {
    queue: Queue,
    _dir: tempfile::TempDir,
}

fn fixture() -> Fixture {
    let dir = tempfile::Builder::new()
        .prefix("walq-bench-read-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("create a bench directory under the target dir");
    let queue = Queue::builder(dir.path()).durability(Durability::Os).open().expect("open");
    let mut value = [0u8; RECORD_BYTES];
    for i in 0..RECORDS {
        value[..8].copy_from_slice(&i.to_le_bytes());
        queue.append(&value).expect("append");
    }
    queue.flush().expect("flush");
    let stats = queue.stats();
    assert_eq!(stats.next_offset, RECORDS);
    // A lookup verifies and walks the whole batch holding its offset, so the
    // batch size (set by the write buffer in `Os` mode) drives its cost.
    println!(
        "read fixture: {RECORDS} records of {RECORD_BYTES} B in {} batches ({} records per batch on average), {} segments",
        stats.batches,
        RECORDS / stats.batches.max(1),
        stats.segments
    );
    Fixture { queue, _dir: dir }
}

fn read(c: &mut Criterion) {
    let f = fixture();
    let queue = &f.queue;
    let first = queue.first_offset();

    let mut group = c.benchmark_group("read/scan");
    group.throughput(Throughput::Elements(RECORDS)).sampling_mode(SamplingMode::Flat).sample_size(10);
    group.bench_function("100B", |b| {
        b.iter(|| {
            let mut reader = queue.read_from(first).expect("read_from");
            let (mut count, mut sum) = (0u64, 0u64);
            while let Some(record) = reader.next().expect("next") {
                let value = black_box(record.value());
                sum += value.len() as u64 + value[0] as u64;
                count += 1;
            }
            assert_eq!(count, RECORDS);
            black_box(sum)
        })
    });
    group.finish();

    let mut group = c.benchmark_group("read/random");
    group.throughput(Throughput::Elements(1));
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
    group.bench_function("read_from", |b| {
        b.iter(|| {
            let offset = rng.next() % RECORDS;
            let mut reader = queue.read_from(offset).expect("read_from");
            let record = reader.next().expect("next").expect("a record below the end");
            assert_eq!(record.offset(), offset);
            black_box(record.value()[0])
        })
    });
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
    let mut reader = queue.read_from(first).expect("read_from");
    group.bench_function("seek", |b| {
        b.iter(|| {
            let offset = rng.next() % RECORDS;
            reader.seek(offset);
            let record = reader.next().expect("next").expect("a record below the end");
            assert_eq!(record.offset(), offset);
            black_box(record.value()[0])
        })
    });
    group.finish();
    drop(reader);
    f.queue.close().expect("close");
}

fn checksum(c: &mut Criterion) {
    let mut group = c.benchmark_group("checksum");
    for (label, size) in [("100B", 100usize), ("4KiB", 4 << 10), ("64KiB", 64 << 10)] {
        let mut rng = XorShift(0x2545_F491_4F6C_DD1D);
        let buf: Vec<u8> = (0..size).map(|_| rng.next() as u8).collect();
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_with_input(BenchmarkId::new("crc32c", label), &buf, |b, buf| {
            b.iter(|| crc32c::crc32c(black_box(buf)))
        });
        group.bench_with_input(BenchmarkId::new("crc32fast", label), &buf, |b, buf| {
            b.iter(|| crc32fast::hash(black_box(buf)))
        });
    }
    group.finish();
}

criterion_group!(benches, read, checksum);
criterion_main!(benches);
