//! Promise 2: nothing half-written is ever delivered, a torn tail is cut and
//! the cut reported, and corruption that a crash cannot explain is an error
//! naming file and position, never a silent cut.
//!
//! Method: write records durably, damage the bytes at the tail of the last
//! segment the ways a power cut does (truncated mid-batch, garbage, zeros,
//! stale batches, unsynced batches landing out of order) and the ways rot does
//! (a flipped bit with synced data after it), reopen, and check what recovery
//! cut, what it reported, and what readers see.

mod common;

use std::path::Path;

use common::{batch_starts, data_end, read_all, segment_files, sim_dir};
use walq::{Durability, Error, Queue, SimDisk};

fn value(i: u64) -> Vec<u8> {
    format!("record {i:04} {}", "x".repeat(40 + (i as usize % 7) * 13)).into_bytes()
}

/// A queue with `n` records, each its own synced batch, left as a crash
/// leaves it: the active index (never synced while running) is gone, so
/// there is no synced mark and recovery verifies the whole tail. Returns the
/// last segment's path.
fn written(dir: &Path, n: u64) -> std::path::PathBuf {
    let q = Queue::open(dir).unwrap();
    for i in 0..n {
        assert_eq!(q.append(&value(i)).unwrap(), i);
    }
    q.close().unwrap();
    let seg = segment_files(dir).pop().unwrap();
    std::fs::remove_file(seg.with_extension("idx")).unwrap();
    seg
}

/// Bytes up to and including the last non-zero one.
fn nonzero_len(b: &[u8]) -> u64 {
    b.iter().rposition(|&x| x != 0).map_or(0, |i| i as u64 + 1)
}

fn expect_records(q: &Queue, n: u64) {
    let got = read_all(q);
    assert_eq!(got.len() as u64, n);
    for (i, (o, v)) in got.iter().enumerate() {
        assert_eq!((*o, v), (i as u64, &value(i as u64)));
    }
}

#[test]
fn a_torn_last_batch_is_cut_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    let seg = written(dir.path(), 10);
    let bytes = std::fs::read(&seg).unwrap();
    let last = *batch_starts(&bytes).last().unwrap();
    // Power cut mid-write: the file ends 60 bytes into the last batch (its header whole).
    std::fs::write(&seg, &bytes[..last + 60]).unwrap();
    let q = Queue::open(dir.path()).unwrap();
    let r = q.recovery_report().clone();
    assert_eq!(r.next_offset, 9);
    // Counted to the last non-zero byte: trailing zeros are indistinguishable from free space.
    assert_eq!(r.bytes_cut, nonzero_len(&bytes[last..last + 60]));
    assert_eq!(r.records_cut, 1, "the torn batch's header still says how many records it held");
    assert_eq!(r.cut_at, Some((seg.clone(), last as u64)));
    expect_records(&q, 9);
    // Appending goes on at the cut, and a second open finds nothing to cut.
    assert_eq!(q.append(&value(9)).unwrap(), 9);
    drop(q);
    let q = Queue::open(dir.path()).unwrap();
    assert_eq!(q.recovery_report().bytes_cut, 0);
    expect_records(&q, 10);
}

#[test]
fn garbage_past_the_last_batch_is_cut_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    let seg = written(dir.path(), 5);
    let mut bytes = std::fs::read(&seg).unwrap();
    let end = data_end(&bytes);
    for (i, b) in bytes[end..end + 777].iter_mut().enumerate() {
        *b = (i * 31 % 251) as u8 | 1;
    }
    std::fs::write(&seg, &bytes).unwrap();
    let q = Queue::open(dir.path()).unwrap();
    let r = q.recovery_report();
    assert_eq!((r.next_offset, r.bytes_cut), (5, 777));
    assert_eq!(r.cut_at, Some((seg, end as u64)));
    expect_records(&q, 5);
}

#[test]
fn a_last_batch_read_back_as_zeros_is_a_clean_end() {
    // Power loss kept the file size but not the data: zeros are never a batch.
    let dir = tempfile::tempdir().unwrap();
    let seg = written(dir.path(), 6);
    let mut bytes = std::fs::read(&seg).unwrap();
    let last = *batch_starts(&bytes).last().unwrap();
    let end = data_end(&bytes);
    bytes[last..end].fill(0);
    std::fs::write(&seg, &bytes).unwrap();
    let q = Queue::open(dir.path()).unwrap();
    assert_eq!((q.recovery_report().next_offset, q.recovery_report().bytes_cut), (5, 0));
    expect_records(&q, 5);
}

#[test]
fn a_flipped_bit_in_the_last_batch_is_cut_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    let seg = written(dir.path(), 4);
    let mut bytes = std::fs::read(&seg).unwrap();
    let last = *batch_starts(&bytes).last().unwrap();
    bytes[last + 60] ^= 0x10;
    std::fs::write(&seg, &bytes).unwrap();
    let q = Queue::open(dir.path()).unwrap();
    let r = q.recovery_report();
    assert_eq!(r.next_offset, 3);
    assert!(r.bytes_cut > 0 && r.records_cut == 1);
    expect_records(&q, 3);
}

#[test]
fn a_flipped_bit_followed_by_synced_batches_is_corrupt_not_cut() {
    let dir = tempfile::tempdir().unwrap();
    let seg = written(dir.path(), 10);
    let mut bytes = std::fs::read(&seg).unwrap();
    let fifth = batch_starts(&bytes)[4];
    bytes[fifth + 50] ^= 0x01;
    std::fs::write(&seg, &bytes).unwrap();
    match Queue::open(dir.path()) {
        Err(Error::Corrupt { path, position, .. }) => {
            assert_eq!((path, position), (seg.clone(), fifth as u64))
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    assert_eq!(std::fs::read(&seg).unwrap(), bytes, "the damaged file is left as it was");
}

#[test]
fn a_zeroed_synced_batch_followed_by_synced_batches_is_corrupt_not_cut() {
    let dir = tempfile::tempdir().unwrap();
    let seg = written(dir.path(), 8);
    let mut bytes = std::fs::read(&seg).unwrap();
    let starts = batch_starts(&bytes);
    bytes[starts[3]..starts[4]].fill(0);
    std::fs::write(&seg, &bytes).unwrap();
    assert!(
        matches!(Queue::open(dir.path()), Err(Error::Corrupt { position, .. }) if position == starts[3] as u64)
    );
    assert_eq!(std::fs::read(&seg).unwrap(), bytes);
}

#[test]
fn a_length_field_claiming_gigabytes_is_cut_without_allocating() {
    let dir = tempfile::tempdir().unwrap();
    let seg = written(dir.path(), 3);
    let mut bytes = std::fs::read(&seg).unwrap();
    let last = *batch_starts(&bytes).last().unwrap();
    bytes[last..last + 4].copy_from_slice(&0xFFFF_FFF8u32.to_le_bytes());
    std::fs::write(&seg, &bytes).unwrap();
    let q = Queue::open(dir.path()).unwrap();
    assert_eq!(q.recovery_report().next_offset, 2);
    expect_records(&q, 2);
}

#[test]
fn stale_valid_batches_past_the_tail_never_pass_as_records() {
    // Bytes of an older batch (valid checksum, old offsets) past the tail, as
    // recycled or preallocated space could hold: rejected by their offset.
    let dir = tempfile::tempdir().unwrap();
    let seg = written(dir.path(), 6);
    let mut bytes = std::fs::read(&seg).unwrap();
    let starts = batch_starts(&bytes);
    let end = data_end(&bytes);
    let stale = bytes[starts[1]..starts[2]].to_vec();
    bytes[end..end + stale.len()].copy_from_slice(&stale);
    std::fs::write(&seg, &bytes).unwrap();
    let q = Queue::open(dir.path()).unwrap();
    let r = q.recovery_report();
    assert_eq!((r.next_offset, r.bytes_cut), (6, nonzero_len(&stale)));
    expect_records(&q, 6);
}

/// On the simulated disk: one synced batch, then a second batch with the
/// given durability, then a third written but not synced; the process dies
/// and the page cache survives.
fn unsynced_pair(disk: &SimDisk, middle: Durability) -> (std::path::PathBuf, Vec<u8>) {
    let q = Queue::builder(sim_dir())
        .simulated(disk)
        .durability(Durability::Os)
        .write_buffer_bytes(1) // every Os append is written at once, without a sync
        .open()
        .unwrap();
    q.append_with(&value(0), Durability::Sync).unwrap();
    q.append_with(&value(1), middle).unwrap();
    q.append_with(&value(2), Durability::Os).unwrap();
    disk.halt_after(0);
    drop(q);
    disk.crash_keep_all();
    let seg = disk.files().into_iter().find(|p| p.extension().is_some_and(|e| e == "seg")).unwrap();
    let bytes = disk.read_file(&seg).unwrap();
    (seg, bytes)
}

#[test]
fn unsynced_batches_landing_out_of_order_are_cut_not_called_corrupt() {
    let disk = SimDisk::new(1);
    let (seg, mut bytes) = unsynced_pair(&disk, Durability::Os);
    let starts = batch_starts(&bytes);
    assert_eq!(starts.len(), 3);
    // Writeback reached the third batch but not the second.
    bytes[starts[1]..starts[2]].fill(0);
    disk.write_file(&seg, &bytes);
    let q = Queue::builder(sim_dir()).simulated(&disk).open().unwrap();
    let r = q.recovery_report();
    assert_eq!(r.next_offset, 1, "only the synced record is kept");
    assert_eq!(r.records_cut, 1, "the valid but unsynced third batch is counted as cut");
    assert!(r.bytes_cut > 0);
    expect_records(&q, 1);
}

#[test]
fn a_lost_batch_before_one_written_after_its_sync_is_corrupt() {
    // The same shape, but the second batch was synced before the third was
    // written: the third's durable_position vouches for it, so losing it is rot.
    let disk = SimDisk::new(2);
    let (seg, mut bytes) = unsynced_pair(&disk, Durability::Sync);
    let starts = batch_starts(&bytes);
    bytes[starts[1]..starts[2]].fill(0);
    disk.write_file(&seg, &bytes);
    let err = Queue::builder(sim_dir()).simulated(&disk).open().unwrap_err();
    assert!(matches!(err, Error::Corrupt { position, .. } if position == starts[1] as u64), "{err}");
    assert_eq!(disk.read_file(&seg).unwrap(), bytes);
}

#[test]
fn a_torn_unsynced_batch_before_a_surviving_index_entry_is_cut_not_kept() {
    // Regression (review): writeback kept a later unsynced batch and its index
    // entry but tore an earlier one; recovery must not start scanning past the
    // tear. It starts at the last entry below the surviving batch's
    // durable_position, finds the tear, and cuts from there.
    for seed in 0..300u64 {
        let disk = SimDisk::new(seed);
        let open = || {
            Queue::builder(sim_dir())
                .durability(Durability::Os)
                .write_buffer_bytes(1024)
                .simulated(&disk)
                .open()
        };
        let q = open().unwrap();
        q.append(b"synced").unwrap();
        q.flush().unwrap();
        let values: Vec<Vec<u8>> = (0..200u32).map(|i| vec![(i % 251) as u8; 90]).collect();
        let records: Vec<walq::Record<'_>> = values.iter().map(|v| walq::Record::new(v)).collect();
        q.append_batch(&records).unwrap();
        disk.crash();
        drop(q);
        let q = open().unwrap();
        let got = read_all(&q);
        assert_eq!(got.len() as u64, q.next_offset(), "seed {seed}: every offset below next_offset reads");
        assert_eq!(got[0].1, b"synced");
        for (o, v) in &got[1..] {
            assert_eq!(v, &values[*o as usize - 1], "seed {seed}");
        }
    }
}

#[test]
fn damage_below_the_synced_mark_of_a_clean_close_is_corrupt_on_read_never_cut() {
    // A clean close marks the active segment synced: a flipped bit in the last
    // batch then cannot be a torn write, so nothing is cut and the reader that
    // reaches it gets an error naming file and position.
    let dir = tempfile::tempdir().unwrap();
    let q = Queue::open(dir.path()).unwrap();
    for i in 0..4 {
        q.append(&value(i)).unwrap();
    }
    q.close().unwrap();
    let seg = segment_files(dir.path()).pop().unwrap();
    let mut bytes = std::fs::read(&seg).unwrap();
    let last = *batch_starts(&bytes).last().unwrap();
    bytes[last + 60] ^= 0x10;
    std::fs::write(&seg, &bytes).unwrap();
    let q = Queue::open(dir.path()).unwrap();
    assert_eq!((q.recovery_report().next_offset, q.recovery_report().bytes_cut), (4, 0));
    let mut r = q.read_from(3).unwrap();
    match r.next() {
        Err(Error::Corrupt { path, position, .. }) => {
            assert_eq!((path, position), (seg.clone(), last as u64))
        }
        other => panic!("expected Corrupt, got {:?}", other.map(|r| r.map(|r| r.offset()))),
    }
    drop(r);
    drop(q);
    assert_eq!(std::fs::read(&seg).unwrap(), bytes, "nothing was cut");
}
