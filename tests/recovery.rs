//! Recovery: opening costs time proportional to the unsynced tail, not the
//! log; it is idempotent, also when a crash interrupts it; indexes are caches
//! rebuilt when missing, short, stale or corrupt; and a damaged log (a missing
//! or truncated sealed segment) is an error, never a silent repair.
//!
//! Method: build logs on a real directory or the simulated disk, damage them,
//! reopen, and compare every record (and every file) with what was written;
//! halt the simulated "process" after every storage call of an open, cut the
//! power, and check the next open reaches the same state.

mod common;

use std::path::Path;

use common::{Model, Rng, read_all, segment_files, sim_dir, sim_image, value_for};
use walq::{Error, Queue, Record, SimDisk};

fn small(dir: &Path) -> walq::QueueBuilder {
    Queue::builder(dir).segment_bytes(4096).preallocate_bytes(2048)
}

/// Fills a real queue with `n` records in batches of 7 (several segments).
fn fill(dir: &Path, n: u64) -> Vec<(u64, Vec<u8>)> {
    let q = small(dir).open().unwrap();
    let mut i = 0;
    while i < n {
        let vals: Vec<Vec<u8>> =
            (i..(i + 7).min(n)).map(|o| value_for(o, 1, 30 + (o % 50) as usize)).collect();
        let recs: Vec<Record<'_>> = vals.iter().map(|v| Record::new(v)).collect();
        q.append_batch(&recs).unwrap();
        i += vals.len() as u64;
    }
    let all = read_all(&q);
    q.close().unwrap();
    all
}

/// Reads every record through fresh readers started at many offsets, which
/// exercises the index of every segment.
fn check_everywhere(q: &Queue, expected: &[(u64, Vec<u8>)]) {
    assert_eq!(read_all(q), expected);
    for start in (0..expected.len()).step_by(13) {
        let mut r = q.read_from(start as u64).unwrap();
        let got = r.next().unwrap().unwrap();
        assert_eq!((got.offset(), got.value()), (expected[start].0, &expected[start].1[..]));
    }
}

#[test]
fn opening_a_large_log_scans_only_its_tail() {
    let dir = tempfile::tempdir().unwrap();
    let q = Queue::builder(dir.path()).durability(walq::Durability::Os).open().unwrap();
    let v = vec![7u8; 1000];
    for _ in 0..20_000 {
        q.append(&v).unwrap();
    }
    q.close().unwrap();
    let q = Queue::open(dir.path()).unwrap();
    let r = q.recovery_report();
    assert_eq!(r.next_offset, 20_000);
    // ~20 MB of log closed cleanly: the index's synced mark says where the
    // synced data ends, so the open verifies nothing before it.
    assert_eq!(r.bytes_scanned, 0);
    drop(q);
    // Without the mark (as after a crash that lost the index), the scan covers
    // the active segment; with it lost and the segment's batches all synced,
    // still never more than the segment.
    let idx = common::segment_files(dir.path()).pop().unwrap().with_extension("idx");
    std::fs::remove_file(idx).unwrap();
    let q = Queue::open(dir.path()).unwrap();
    assert_eq!(q.recovery_report().next_offset, 20_000);
    assert!(q.recovery_report().bytes_scanned <= walq::SEGMENT_BYTES_DEFAULT);
}

#[test]
fn a_second_open_finds_the_state_the_first_one_left() {
    for seed in 0..200u64 {
        let disk = SimDisk::new(seed);
        let mut rng = Rng::new(seed);
        let q = small(sim_dir()).simulated(&disk).open().unwrap();
        for o in 0..(20 + rng.below(60)) {
            q.append_with(&value_for(o, seed, 1 + rng.below(600) as usize), walq::Durability::Os).unwrap();
            if rng.chance(20) {
                q.flush().unwrap();
            }
        }
        disk.halt_after(rng.below(40));
        drop(q);
        disk.crash();
        let first = small(sim_dir()).simulated(&disk).open().unwrap();
        let records = read_all(&first);
        drop(first);
        let image = sim_image(&disk);
        let second = small(sim_dir()).simulated(&disk).open().unwrap();
        assert_eq!(second.recovery_report().bytes_cut, 0, "seed {seed}");
        assert_eq!(read_all(&second), records, "seed {seed}");
        drop(second);
        assert_eq!(sim_image(&disk), image, "seed {seed}: the second open changed files");
    }
}

/// Sync-only workload: deterministic, so the same seed rebuilds the same image.
fn crashed_image(seed: u64) -> (SimDisk, Model) {
    let disk = SimDisk::new(seed);
    let mut model = Model::default();
    let q = small(sim_dir()).simulated(&disk).open().unwrap();
    let mut rng = Rng::new(seed);
    disk.halt_after(40 + rng.below(200));
    for o in 0..200u64 {
        let v = value_for(o, seed, 1 + rng.below(900) as usize);
        model.attempted.push(v.clone());
        match q.append(&v) {
            Ok(_) => model.durable = o + 1,
            Err(_) => break,
        }
    }
    drop(q);
    disk.crash();
    (disk, model)
}

#[test]
fn recovery_killed_after_any_storage_call_then_rerun_reaches_the_same_state() {
    let mut runs = 0;
    for seed in 0..12u64 {
        // The reference: one uninterrupted recovery.
        let (disk, mut model) = crashed_image(seed);
        let before = disk.ops();
        let q = small(sim_dir()).simulated(&disk).open().unwrap();
        let calls = disk.ops() - before;
        let reference = read_all(&q);
        model.check(&q, &format!("seed {seed} reference"));
        drop(q);
        for k in 0..calls {
            let (disk, _) = crashed_image(seed);
            disk.halt_after(k);
            assert!(
                small(sim_dir()).simulated(&disk).open().is_err(),
                "seed {seed}: open survived a halt at {k}"
            );
            disk.crash();
            let q =
                small(sim_dir()).simulated(&disk).open().unwrap_or_else(|e| panic!("seed {seed} k {k}: {e}"));
            assert_eq!(read_all(&q), reference, "seed {seed}: recovery halted after call {k} of {calls}");
            runs += 1;
        }
    }
    eprintln!("{runs} recoveries interrupted and rerun");
    assert!(runs > 100);
}

#[test]
fn a_missing_index_is_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let expected = fill(dir.path(), 600);
    let segs = segment_files(dir.path());
    assert!(segs.len() >= 4);
    for s in &segs {
        std::fs::remove_file(s.with_extension("idx")).unwrap();
    }
    let q = small(dir.path()).open().unwrap();
    // The active index at open; sealed ones when a reader first seeks in them.
    assert_eq!(q.recovery_report().indexes_rebuilt, 1);
    check_everywhere(&q, &expected);
    for s in &segs {
        assert!(s.with_extension("idx").exists(), "{} rebuilt on disk", s.display());
    }
}

#[test]
fn short_stale_and_corrupt_indexes_are_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let expected = fill(dir.path(), 400);
    let segs = segment_files(dir.path());
    // Short: a sealed index cut mid-entry.
    let idx0 = segs[0].with_extension("idx");
    let len = std::fs::metadata(&idx0).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&idx0).unwrap().set_len(len - 3).unwrap();
    // Corrupt entries with an intact header: found on first use, not at open.
    let idx1 = segs[1].with_extension("idx");
    let mut b = std::fs::read(&idx1).unwrap();
    let n = b.len();
    b[n - 2] ^= 0xFF;
    std::fs::write(&idx1, &b).unwrap();
    // Stale active index: entries pointing far past the data.
    let active = segs.last().unwrap().with_extension("idx");
    let mut a = std::fs::read(&active).unwrap();
    a.extend_from_slice(&[0xFF, 0xFF, 0, 0, 0xF0, 0xFF, 0, 0]);
    std::fs::write(&active, &a).unwrap();
    let q = small(dir.path()).open().unwrap();
    assert_eq!(q.recovery_report().indexes_rebuilt, 1, "the active one at open, sealed ones on first use");
    check_everywhere(&q, &expected);
    let idx0_len = std::fs::metadata(&idx0).unwrap().len();
    assert_eq!((idx0_len - 40) % 8, 0, "the short index was rewritten whole");
    assert_ne!(std::fs::read(&idx1).unwrap(), b, "the corrupt index was rewritten");
}

/// Reads from `from` until an error; returns it (panics if the log reads whole).
fn first_read_error(q: &Queue, from: u64) -> Error {
    let mut reader = q.read_from(from).unwrap();
    loop {
        match reader.next() {
            Ok(Some(_)) => {}
            Ok(None) => panic!("read to the end without an error"),
            Err(e) => return e,
        }
    }
}

#[test]
fn a_missing_middle_segment_is_corrupt_when_read() {
    // Sealed segments are checked on first use (open costs nothing per segment):
    // the reader that reaches the gap gets an error naming the segment that ends short.
    let dir = tempfile::tempdir().unwrap();
    let expected = fill(dir.path(), 600);
    let segs = segment_files(dir.path());
    assert!(segs.len() >= 4);
    std::fs::remove_file(&segs[2]).unwrap();
    let q = small(dir.path()).open().unwrap();
    match first_read_error(&q, 0) {
        Error::Corrupt { path, reason, .. } => {
            assert_eq!(path, segs[1], "names the segment that ends short: {reason}")
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    // Records before the gap were delivered intact, and the tail still reads.
    let tail_base: u64 = segs[3].file_stem().unwrap().to_str().unwrap().parse().unwrap();
    let mut r = q.read_from(tail_base).unwrap();
    assert_eq!(r.next().unwrap().unwrap().value(), &expected[tail_base as usize].1[..]);
}

#[test]
fn a_sealed_segment_truncated_externally_is_corrupt_when_read() {
    let dir = tempfile::tempdir().unwrap();
    fill(dir.path(), 600);
    let segs = segment_files(dir.path());
    let len = std::fs::metadata(&segs[1]).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&segs[1]).unwrap().set_len(len / 2).unwrap();
    let q = small(dir.path()).open().unwrap();
    assert!(matches!(first_read_error(&q, 0), Error::Corrupt { path, .. } if path == segs[1]));
}

#[test]
fn opening_costs_no_io_per_sealed_segment() {
    // The storage calls of an open do not grow with the number of sealed segments.
    let calls = |records: u64| {
        let disk = SimDisk::new(records);
        let q = small(sim_dir()).simulated(&disk).write_buffer_bytes(1024).open().unwrap();
        for o in 0..records {
            q.append_with(&value_for(o, 3, 200), walq::Durability::Os).unwrap();
        }
        let segments = q.stats().segments;
        drop(q);
        let before = disk.ops();
        drop(small(sim_dir()).simulated(&disk).open().unwrap());
        (segments, disk.ops() - before)
    };
    let (few, few_calls) = calls(100);
    let (many, many_calls) = calls(2000);
    assert!(many > few * 10, "{few} vs {many} segments");
    assert_eq!(
        few_calls, many_calls,
        "open made {few_calls} calls with {few} segments, {many_calls} with {many}"
    );
}

#[test]
fn a_segment_whose_creation_a_crash_interrupted_is_removed() {
    let dir = tempfile::tempdir().unwrap();
    let expected = fill(dir.path(), 100);
    let next = expected.len() as u64;
    let name = dir.path().join(format!("{next:020}.seg"));
    // Size grown, header never written: as a power cut mid-roll leaves it.
    std::fs::write(&name, vec![0u8; 4096]).unwrap();
    let q = small(dir.path()).open().unwrap();
    assert_eq!(q.recovery_report().unfinished_segments_removed, 1);
    assert!(!name.exists());
    check_everywhere(&q, &expected);
    assert_eq!(q.append(b"after").unwrap(), next);
}

#[test]
fn leftovers_are_cleaned_and_foreign_files_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let expected = fill(dir.path(), 50);
    let tmp = dir.path().join(format!("{:020}.idx.tmp", 0));
    let orphan = dir.path().join(format!("{:020}.idx", 0)).with_file_name("00000000000000000000.idx");
    let foreign = dir.path().join("notes.txt");
    let foreign_tmp = dir.path().join("upload.tmp");
    std::fs::write(&tmp, b"half-written").unwrap();
    std::fs::write(&foreign, b"mine").unwrap();
    std::fs::write(&foreign_tmp, b"also mine").unwrap();
    let q = small(dir.path()).open().unwrap();
    assert_eq!(q.recovery_report().temp_files_removed, 1);
    assert!(!tmp.exists() && orphan.exists());
    assert_eq!(std::fs::read(&foreign).unwrap(), b"mine");
    assert_eq!(std::fs::read(&foreign_tmp).unwrap(), b"also mine");
    check_everywhere(&q, &expected);
}

#[test]
fn an_index_left_by_interrupted_retention_is_removed() {
    let dir = tempfile::tempdir().unwrap();
    let expected = fill(dir.path(), 300);
    let q = small(dir.path()).open().unwrap();
    let cut = expected[150].0;
    assert!(q.remove_before(cut).unwrap() > 0);
    let first = q.first_offset();
    drop(q);
    // A crash between unlinking an index and its segment, reversed: put an index back.
    let stale = dir.path().join("00000000000000000000.idx");
    std::fs::write(&stale, b"stale").unwrap();
    let q = small(dir.path()).open().unwrap();
    assert!(!stale.exists());
    assert_eq!(q.first_offset(), first);
    let rest: Vec<_> = expected.iter().filter(|(o, _)| *o >= first).cloned().collect();
    assert_eq!(read_all(&q), rest);
}

#[test]
fn after_a_kill_9_recovery_scans_only_what_was_not_known_synced() {
    // Each batch records how far the segment was synced when it was written,
    // so a crash costs a scan of the unsynced tail, not of the segment.
    let disk = SimDisk::new(5);
    let q = Queue::builder(sim_dir()).simulated(&disk).open().unwrap();
    let v = vec![3u8; 1000];
    for _ in 0..3000 {
        q.append(&v).unwrap(); // Sync: each batch synced before the next
    }
    for _ in 0..50 {
        q.append_with(&v, walq::Durability::Os).unwrap(); // an unsynced tail
    }
    disk.halt_after(0);
    drop(q);
    disk.crash_keep_all();
    let q = Queue::builder(sim_dir()).simulated(&disk).open().unwrap();
    let r = q.recovery_report();
    assert!(r.next_offset >= 3000);
    // ~3 MB in the segment; the scan starts at the last index entry below the
    // last sync point: one index interval, plus the unsynced ~50 KB.
    assert!(r.bytes_scanned <= 4096 + 64 * 1024, "scanned {} bytes", r.bytes_scanned);
}
