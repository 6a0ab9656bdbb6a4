//! Every `walq::Error` variant the public API can produce, and what each one
//! leaves behind.
//!
//! Goal: each error is reachable, is the documented variant with the right
//! fields, has a message that starts lowercase and names the path it is about,
//! and leaves the queue directory exactly as it was: an error never writes,
//! cuts or rewrites a byte. After a failed write or sync the queue is
//! poisoned, still readable, never acknowledges a record whose sync failed,
//! and a reopen finds every acknowledged record.
//!
//! Method: real directories (`tempfile`) for options, locks, offsets and
//! on-disk damage (segments patched by hand, with a CRC-32C computed here);
//! a second process, made by re-running this test binary on an ignored
//! helper test, for the cross-process lock and `kill -9`; `SimDisk` fault
//! injection for ENOSPC and failed fdatasyncs. Before every failing call the
//! test snapshots every file of the directory (names and bytes) and compares
//! the snapshot after it.

mod common;

use common::{crc32c, segment_bases, segment_name};

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use walq::{
    Durability, Error, Fault, FaultKind, FaultOp, Queue, RECORD_BYTES_MAX, Record, SEGMENT_BYTES_MAX,
    SEGMENT_BYTES_MIN, SimDisk,
};

type TestResult = Result<(), Box<dyn std::error::Error>>;

// ---------------------------------------------------------------------------
// Helpers.

/// Every file of a real directory: name → bytes.
fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(dir).expect("list the queue directory") {
        let entry = entry.expect("directory entry");
        let name = entry.file_name().into_string().expect("utf-8 file name");
        let bytes = std::fs::read(entry.path()).expect("read a queue file");
        files.insert(name, bytes);
    }
    files
}

/// Every file of a simulated directory: path → bytes (what reads see).
fn sim_snapshot(disk: &SimDisk, dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    disk.files()
        .into_iter()
        .filter(|p| p.starts_with(dir))
        .map(|p| {
            let bytes = disk.read_file(&p).expect("a listed file exists");
            (p, bytes)
        })
        .collect()
}

/// Asserts two snapshots are equal, naming the first file that differs.
fn assert_unchanged<K: Ord + std::fmt::Debug>(before: &BTreeMap<K, Vec<u8>>, after: &BTreeMap<K, Vec<u8>>) {
    let names_before: Vec<_> = before.keys().collect();
    let names_after: Vec<_> = after.keys().collect();
    assert_eq!(names_before, names_after, "the set of files changed");
    for (name, bytes) in before {
        let now = &after[name];
        assert_eq!(bytes.len(), now.len(), "{name:?} changed length");
        if let Some(i) = bytes.iter().zip(now.iter()).position(|(a, b)| a != b) {
            panic!("{name:?} changed at byte {i}");
        }
    }
}

fn u32_le(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

/// `(position, length)` of every batch in a segment file's bytes, walking the
/// documented layout: a 32-byte segment header, then batches whose first u32
/// is their length, up to zeros or the end of the file.
fn batches(segment: &[u8]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut pos = 32;
    while pos + 48 <= segment.len() {
        let length = u32_le(segment, pos) as usize;
        let crc = u32_le(segment, pos + 4);
        if length == 0 && crc == 0 {
            break;
        }
        assert!(
            length >= 48 && length.is_multiple_of(8) && pos + length <= segment.len(),
            "bad batch at {pos}"
        );
        out.push((pos, length));
        pos += length;
    }
    out
}

/// A value that names its index, so that a mix-up shows.
fn value(i: u64, len: usize) -> Vec<u8> {
    let mut v = format!("value-{i}-").into_bytes();
    v.resize(len.max(v.len()), b'a' + (i % 26) as u8);
    v
}

/// Every record a fresh reader returns from the first offset: (offset, value).
fn read_all(queue: &Queue) -> Result<Vec<(u64, Vec<u8>)>, Error> {
    let mut reader = queue.read_from(queue.first_offset())?;
    let mut out = Vec::new();
    while let Some(r) = reader.next()? {
        out.push((r.offset(), r.value().to_vec()));
    }
    Ok(out)
}

/// The checks every error's message passes: it starts lowercase (not with a
/// capital letter), and names the file or directory when the variant has one.
fn check_display(err: &Error) {
    let msg = err.to_string();
    let first = msg.chars().next().expect("a non-empty message");
    assert!(!first.is_uppercase(), "message starts with a capital: {msg}");
    let path = match err {
        Error::Locked { dir } | Error::NotFound { dir } => Some(dir),
        Error::DiskFull { path }
        | Error::UnsupportedFormat { path, .. }
        | Error::Corrupt { path, .. }
        | Error::Io { path, .. } => Some(path),
        _ => None,
    };
    if let Some(path) = path {
        let shown = path.display().to_string();
        assert!(msg.contains(&shown), "message does not name {shown}: {msg}");
    }
}

// ---------------------------------------------------------------------------
// RecordTooLarge

#[test]
fn record_too_large_is_rejected_and_leaves_the_directory_unchanged() -> TestResult {
    let dir = tempfile::tempdir()?;
    let queue = Queue::builder(dir.path()).max_record_bytes(1000).open()?;
    queue.append(b"before")?;
    let before = snapshot(dir.path());

    let big = vec![7u8; 1000];
    let expected_len = Record::new(&big).encoded_len();
    assert!(expected_len > 1000);
    let err = queue.append(&big).unwrap_err();
    assert!(matches!(err, Error::RecordTooLarge { len, max: 1000 } if len == expected_len), "got {err:?}");
    check_display(&err);
    assert!(err.to_string().contains("1000"), "the limit is not in: {err}");
    assert_unchanged(&before, &snapshot(dir.path()));

    // Not poisoned: the queue goes on, and the rejected record took no offset.
    assert!(!queue.stats().poisoned);
    assert_eq!(queue.append(b"after")?, 1);
    assert_eq!(read_all(&queue)?, vec![(0, b"before".to_vec()), (1, b"after".to_vec())]);
    Ok(())
}

#[test]
fn record_too_large_counts_key_and_headers_and_accepts_the_exact_limit() -> TestResult {
    let dir = tempfile::tempdir()?;
    let queue = Queue::builder(dir.path()).max_record_bytes(500).open()?;
    // A small value whose key and headers push the record over the limit.
    let key = [1u8; 300];
    let record = Record::new(b"v").key(&key).header(b"h", &[2u8; 300]);
    let err = queue.append_record(&record).unwrap_err();
    assert!(matches!(err, Error::RecordTooLarge { max: 500, .. }), "got {err:?}");

    // The largest value whose encoded record is exactly the limit is accepted.
    let mut n = 0;
    while Record::new(&vec![0u8; n + 1]).encoded_len() <= 500 {
        n += 1;
    }
    assert_eq!(Record::new(&vec![0u8; n]).encoded_len(), 500, "no value encodes to exactly 500");
    queue.append(&vec![3u8; n])?;
    assert!(matches!(queue.append(&vec![3u8; n + 1]), Err(Error::RecordTooLarge { .. })));
    Ok(())
}

#[test]
fn record_too_large_inside_a_batch_appends_nothing_of_the_batch() -> TestResult {
    for durability in [Durability::Sync, Durability::Os] {
        let dir = tempfile::tempdir()?;
        let queue = Queue::builder(dir.path()).max_record_bytes(1000).open()?;
        queue.append_batch(&[Record::new(b"a"), Record::new(b"b")])?;
        let next = queue.next_offset();
        let before = snapshot(dir.path());

        let big = vec![9u8; 2000];
        let batch = [Record::new(b"c"), Record::new(&big), Record::new(b"d")];
        let err = queue.append_batch_with(&batch, durability).unwrap_err();
        assert!(matches!(err, Error::RecordTooLarge { max: 1000, .. }), "got {err:?}");
        assert_eq!(queue.next_offset(), next, "{durability:?}: the batch took offsets");
        assert_eq!(queue.stats().appends, 2, "{durability:?}: the batch was counted");
        queue.flush()?;
        assert_unchanged(&before, &snapshot(dir.path()));
        assert_eq!(read_all(&queue)?, vec![(0, b"a".to_vec()), (1, b"b".to_vec())]);
        drop(queue);

        let queue = Queue::open(dir.path())?;
        assert_eq!(queue.next_offset(), next, "{durability:?}: part of the batch reached the disk");
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Locked

#[test]
fn locked_by_a_second_open_in_the_same_process() -> TestResult {
    let dir = tempfile::tempdir()?;
    let queue = Queue::open(dir.path())?;
    queue.append(b"x")?;
    let before = snapshot(dir.path());
    for attempt in [Queue::open(dir.path()), Queue::builder(dir.path()).create(false).open()] {
        let err = attempt.unwrap_err();
        assert!(matches!(&err, Error::Locked { dir: d } if d == dir.path()), "got {err:?}");
        check_display(&err);
    }
    assert_unchanged(&before, &snapshot(dir.path()));
    // The first handle is unaffected, and closing it frees the directory.
    assert_eq!(queue.append(b"y")?, 1);
    queue.close()?;
    let queue = Queue::open(dir.path())?;
    assert_eq!(queue.next_offset(), 2);
    Ok(())
}

#[test]
fn locked_on_a_simulated_disk_too() -> TestResult {
    let disk = SimDisk::new(3);
    let dir = Path::new("/q");
    let queue = Queue::builder(dir).simulated(&disk).open()?;
    queue.append(b"x")?;
    let before = sim_snapshot(&disk, dir);
    let err = Queue::builder(dir).simulated(&disk).open().unwrap_err();
    assert!(matches!(&err, Error::Locked { dir: d } if d == dir), "got {err:?}");
    assert_unchanged(&before, &sim_snapshot(&disk, dir));
    drop(queue);
    Queue::builder(dir).simulated(&disk).open()?;
    Ok(())
}

/// Environment variable naming the directory the helper child process locks.
const CHILD_DIR_ENV: &str = "WALQ_ERRORS_TEST_LOCK_DIR";
/// The line the child prints once it holds the lock.
const CHILD_READY: &str = "walq-child-holds-the-lock";

/// Not a test: the child process of `locked_by_another_process_...`. It opens
/// the queue named by the environment, says so, and sleeps until killed (at
/// most a minute, so that an orphan cannot linger). Without the variable it
/// does nothing.
#[test]
#[ignore = "helper: run as a child process by locked_by_another_process_until_it_is_killed"]
fn child_process_holds_the_lock() {
    let Some(dir) = std::env::var_os(CHILD_DIR_ENV) else { return };
    let queue = Queue::open(&dir).expect("the child opens the queue");
    queue.append(b"from the child").expect("the child appends");
    println!("{CHILD_READY}");
    std::thread::sleep(Duration::from_secs(60));
    drop(queue);
}

/// Kills the child on drop, so that a failing assertion leaves no process behind.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn locked_by_another_process_until_it_is_killed() -> TestResult {
    let dir = tempfile::tempdir()?;
    let exe = std::env::current_exe()?;
    let child = Command::new(exe)
        .args(["--exact", "child_process_holds_the_lock", "--ignored", "--nocapture", "--test-threads=1"])
        .env(CHILD_DIR_ENV, dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let mut child = KillOnDrop(child);
    let stdout = child.0.stdout.take().expect("piped stdout");
    let mut ready = false;
    for line in BufReader::new(stdout).lines() {
        // libtest prints the test's name on the same line, before the marker.
        if line?.contains(CHILD_READY) {
            ready = true;
            break;
        }
    }
    assert!(ready, "the child exited without taking the lock");

    let before = snapshot(dir.path());
    let err = Queue::open(dir.path()).unwrap_err();
    assert!(matches!(&err, Error::Locked { dir: d } if d == dir.path()), "got {err:?}");
    check_display(&err);
    assert_unchanged(&before, &snapshot(dir.path()));

    // kill -9: the kernel releases the flock, no cleanup needed.
    child.0.kill()?;
    let status = child.0.wait()?;
    assert!(!status.success(), "the child was not killed: {status}");
    let queue = Queue::open(dir.path())?;
    assert_eq!(read_all(&queue)?, vec![(0, b"from the child".to_vec())]);
    assert_eq!(queue.recovery_report().bytes_cut, 0);
    Ok(())
}

// ---------------------------------------------------------------------------
// DiskFull

#[test]
fn disk_full_on_append_poisons_writes_keeps_reads_and_loses_nothing_acknowledged() -> TestResult {
    let disk = SimDisk::new(11);
    let dir = Path::new("/q");
    let seg0 = dir.join(segment_name(0));
    let queue = Queue::builder(dir).simulated(&disk).open()?;
    let mut acked = Vec::new();
    for i in 0..5 {
        let v = value(i, 40);
        acked.push((queue.append(&v)?, v));
    }
    let before = sim_snapshot(&disk, dir);

    disk.inject(Fault {
        op: FaultOp::Write,
        nth: 1,
        kind: FaultKind::NoSpace,
        path_contains: Some(".seg".into()),
    });
    let err = queue.append(b"does not fit").unwrap_err();
    assert!(matches!(&err, Error::DiskFull { path } if *path == seg0), "got {err:?}");
    check_display(&err);
    assert_eq!(disk.fault_counts().get("NoSpace"), Some(&1), "the fault did not fire");
    assert_unchanged(&before, &sim_snapshot(&disk, dir));

    // Poisoned for writes, never an Ok.
    assert!(queue.stats().poisoned);
    assert!(matches!(queue.append(b"later"), Err(Error::Poisoned)));
    assert!(matches!(queue.append_batch(&[Record::new(b"l1"), Record::new(b"l2")]), Err(Error::Poisoned)));
    assert!(matches!(queue.append_with(b"later", Durability::Os), Err(Error::Poisoned)));
    assert!(matches!(queue.flush(), Err(Error::Poisoned)));
    assert_unchanged(&before, &sim_snapshot(&disk, dir));

    // Still readable: exactly the acknowledged records.
    assert_eq!(read_all(&queue)?, acked);
    drop(queue);
    assert_unchanged(&before, &sim_snapshot(&disk, dir));

    let queue = Queue::builder(dir).simulated(&disk).open()?;
    assert_eq!(queue.next_offset(), acked.len() as u64);
    assert_eq!(read_all(&queue)?, acked);
    assert_eq!(queue.append(b"after reopen")?, acked.len() as u64);
    Ok(())
}

#[test]
fn disk_full_while_rolling_to_a_new_segment_loses_nothing_acknowledged() -> TestResult {
    let disk = SimDisk::new(12);
    let dir = Path::new("/q");
    let queue = Queue::builder(dir).simulated(&disk).segment_bytes(4096).open()?;
    let mut acked = Vec::new();
    // Fill the first segment until the next append must roll.
    let mut i = 0;
    while queue.stats().rolls == 0 && i < 100 {
        let v = value(i, 200);
        acked.push((queue.append(&v)?, v));
        i += 1;
    }
    assert_eq!(queue.stats().rolls, 1, "the workload did not roll");
    let rolls = queue.stats().rolls;
    // The segment the next roll creates starts at the offset the roll happens at.
    // Fail every write into segments not yet created, from the next one on.
    let mut next = queue.next_offset();
    let mut failed = None;
    for _ in 0..100 {
        disk.inject(Fault {
            op: FaultOp::Write,
            nth: 1,
            kind: FaultKind::NoSpace,
            path_contains: Some(segment_name(next)),
        });
        let v = value(next, 200);
        match queue.append(&v) {
            Ok(o) => {
                acked.push((o, v));
                next = queue.next_offset();
            }
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
    }
    let err = failed.expect("a roll happened and failed");
    assert!(matches!(&err, Error::DiskFull { path } if *path == dir.join(segment_name(next))), "got {err:?}");
    assert_eq!(queue.stats().rolls, rolls, "the failed roll was counted");
    assert!(queue.stats().poisoned);
    assert!(matches!(queue.append(b"x"), Err(Error::Poisoned)));
    assert_eq!(read_all(&queue)?, acked);
    drop(queue);

    let queue = Queue::builder(dir).simulated(&disk).segment_bytes(4096).open()?;
    assert_eq!(read_all(&queue)?, acked);
    assert_eq!(queue.next_offset(), acked.len() as u64);
    let report = queue.recovery_report();
    assert_eq!(report.bytes_cut, 0);
    // The segment whose header could not be written is an unfinished roll.
    assert_eq!(report.unfinished_segments_removed, 1, "{report:?}");
    // The queue goes on past the spot where the roll failed.
    for j in 0..40 {
        queue.append(&value(1000 + j, 200))?;
    }
    assert!(queue.stats().rolls > 0);
    Ok(())
}

// ---------------------------------------------------------------------------
// Poisoned

/// Acknowledged records: (offset, value).
type Acked = Vec<(u64, Vec<u8>)>;

/// A queue on a simulated disk with `n` acknowledged (synced) records.
fn sim_queue_with(disk: &SimDisk, dir: &Path, n: u64) -> Result<(Queue, Acked), Error> {
    let queue = Queue::builder(dir).simulated(disk).open()?;
    let mut acked = Vec::new();
    for i in 0..n {
        let v = value(i, 30);
        acked.push((queue.append(&v)?, v));
    }
    Ok((queue, acked))
}

/// The calls a poisoned queue must refuse, each with `Poisoned`; the
/// directory must not change under them.
fn assert_poisoned(queue: &Queue, disk: &SimDisk, dir: &Path) {
    let before = sim_snapshot(disk, dir);
    assert!(queue.stats().poisoned);
    for (what, result) in [
        ("append", queue.append(b"refused").map(|_| ())),
        ("append_with(Sync)", queue.append_with(b"refused", Durability::Sync).map(|_| ())),
        ("append_with(Os)", queue.append_with(b"refused", Durability::Os).map(|_| ())),
        ("append_batch", queue.append_batch(&[Record::new(b"r")]).map(|_| ())),
        ("flush", queue.flush()),
    ] {
        match result {
            Err(e @ Error::Poisoned) => check_display(&e),
            other => panic!("{what} on a poisoned queue gave {other:?}"),
        }
    }
    assert_unchanged(&before, &sim_snapshot(disk, dir));
}

#[test]
fn poisoned_after_fdatasync_eio_and_the_failed_record_is_never_acknowledged() -> TestResult {
    let disk = SimDisk::new(21);
    let dir = Path::new("/q");
    let (queue, acked) = sim_queue_with(&disk, dir, 3)?;
    disk.inject(Fault {
        op: FaultOp::Sync,
        nth: 1,
        kind: FaultKind::Eio,
        path_contains: Some(".seg".into()),
    });
    let err = queue.append(b"sync fails").unwrap_err();
    assert!(
        matches!(&err, Error::Io { op: "fdatasync", path, .. } if *path == dir.join(segment_name(0))),
        "got {err:?}"
    );
    assert_eq!(disk.fault_counts().get("Eio"), Some(&1));
    assert_poisoned(&queue, &disk, dir);
    // Readers see only what a sync covered: not the failed record.
    assert_eq!(read_all(&queue)?, acked);
    assert_eq!(queue.stats().durable_offset, 3);
    drop(queue);

    // A power cut now: the failed record was never durable, so it is gone,
    // and every acknowledged record is intact.
    disk.crash_lose_unsynced();
    let queue = Queue::builder(dir).simulated(&disk).open()?;
    assert_eq!(read_all(&queue)?, acked);
    assert_eq!(queue.next_offset(), 3);
    Ok(())
}

#[test]
fn poisoned_after_fdatasync_eio_reopen_without_a_crash_keeps_every_acknowledged_record() -> TestResult {
    let disk = SimDisk::new(22);
    let dir = Path::new("/q");
    let (queue, acked) = sim_queue_with(&disk, dir, 4)?;
    disk.inject(Fault::new(FaultOp::Sync, FaultKind::Eio));
    assert!(matches!(queue.append(b"unacknowledged"), Err(Error::Io { .. })));
    assert_poisoned(&queue, &disk, dir);
    drop(queue);

    // Without a crash the written bytes are still in the page cache; the
    // failed record may be there (at least once) but nothing else may be.
    let queue = Queue::builder(dir).simulated(&disk).open()?;
    let got = read_all(&queue)?;
    assert_eq!(&got[..acked.len()], &acked[..]);
    match &got[acked.len()..] {
        [] => {}
        [(4, v)] => assert_eq!(v, b"unacknowledged"),
        rest => panic!("unexpected records after reopen: {rest:?}"),
    }
    Ok(())
}

#[test]
fn poisoned_after_sync_fail_drop_pages_and_a_retried_sync_is_never_ok() -> TestResult {
    let disk = SimDisk::new(23);
    let dir = Path::new("/q");
    let (queue, acked) = sim_queue_with(&disk, dir, 3)?;
    let before = sim_snapshot(&disk, dir);
    disk.inject(Fault {
        op: FaultOp::Sync,
        nth: 1,
        kind: FaultKind::SyncFailDropPages,
        path_contains: Some(".seg".into()),
    });
    let err = queue.append(b"pages dropped").unwrap_err();
    assert!(matches!(&err, Error::Io { op: "fdatasync", .. }), "got {err:?}");
    check_display(&err);
    assert_eq!(disk.fault_counts().get("SyncFailDropPages"), Some(&1));
    // The dropped pages take the page cache back to the synced state.
    assert_unchanged(&before, &sim_snapshot(&disk, dir));
    // A second fdatasync would now "succeed" with the data gone: walq must
    // not try it and acknowledge.
    assert_poisoned(&queue, &disk, dir);
    assert_eq!(read_all(&queue)?, acked);
    drop(queue);

    let queue = Queue::builder(dir).simulated(&disk).open()?;
    assert_eq!(read_all(&queue)?, acked);
    assert_eq!(queue.next_offset(), acked.len() as u64);
    assert_eq!(queue.recovery_report().bytes_cut, 0);
    Ok(())
}

#[test]
fn poisoned_by_a_failed_flush_of_os_appends() -> TestResult {
    let disk = SimDisk::new(24);
    let dir = Path::new("/q");
    let queue = Queue::builder(dir).simulated(&disk).durability(Durability::Os).open()?;
    let mut acked = Vec::new();
    for i in 0..3 {
        let v = value(i, 20);
        acked.push((queue.append(&v)?, v));
    }
    queue.flush()?;
    queue.append(b"os 3")?;
    queue.append(b"os 4")?;
    disk.inject(Fault::new(FaultOp::Sync, FaultKind::SyncFailDropPages));
    let err = queue.flush().unwrap_err();
    assert!(matches!(&err, Error::Io { op: "fdatasync", .. }), "got {err:?}");
    assert_poisoned(&queue, &disk, dir);
    drop(queue);
    let queue = Queue::builder(dir).simulated(&disk).open()?;
    assert_eq!(read_all(&queue)?, acked);
    Ok(())
}

#[test]
fn close_of_a_poisoned_queue_does_not_report_success() -> TestResult {
    let disk = SimDisk::new(25);
    let dir = Path::new("/q");
    let queue = Queue::builder(dir).simulated(&disk).durability(Durability::Os).open()?;
    queue.append(b"synced")?;
    queue.flush()?;
    queue.append(b"never synced")?;
    disk.inject(Fault::new(FaultOp::Sync, FaultKind::SyncFailDropPages));
    assert!(queue.flush().is_err());
    // close() promises "syncs everything pending"; "never synced" was not.
    assert!(matches!(queue.close(), Err(Error::Poisoned)), "close acknowledged an unsynced record");
    Ok(())
}

// ---------------------------------------------------------------------------
// UnsupportedFormat

/// Rewrites the segment header's version (bytes 8..12) and its CRC (28..32).
fn patch_segment_version(path: &Path, version: u32) -> TestResult {
    let mut bytes = std::fs::read(path)?;
    assert_eq!(&bytes[0..8], b"WALQSEG\0");
    assert_eq!(crc32c(&bytes[0..28]), u32_le(&bytes, 28), "the test's CRC-32C disagrees with walq's");
    bytes[8..12].copy_from_slice(&version.to_le_bytes());
    let crc = crc32c(&bytes[0..28]);
    bytes[28..32].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(path, bytes)?;
    Ok(())
}

#[test]
fn unsupported_format_for_a_newer_segment_header_leaves_the_file_alone() -> TestResult {
    let dir = tempfile::tempdir()?;
    let queue = Queue::open(dir.path())?;
    for i in 0..3 {
        queue.append(&value(i, 50))?;
    }
    queue.close()?;
    let seg = dir.path().join(segment_name(0));
    patch_segment_version(&seg, 2)?;
    let before = snapshot(dir.path());

    let err = Queue::open(dir.path()).unwrap_err();
    assert!(
        matches!(&err, Error::UnsupportedFormat { path, found: 2, supported: 1 } if *path == seg),
        "got {err:?}"
    );
    check_display(&err);
    assert_unchanged(&before, &snapshot(dir.path()));
    Ok(())
}

#[test]
fn unsupported_format_in_a_sealed_segment_header() -> TestResult {
    let dir = tempfile::tempdir()?;
    let queue = Queue::builder(dir.path()).segment_bytes(4096).open()?;
    for i in 0..120 {
        queue.append(&value(i, 100))?;
    }
    queue.close()?;
    let bases = segment_bases(dir.path());
    assert!(bases.len() >= 3, "only {} segments", bases.len());
    let seg = dir.path().join(segment_name(bases[1]));
    patch_segment_version(&seg, 2)?;
    let before = snapshot(dir.path());
    // Sealed segments are checked on first use, so that opening costs nothing per segment.
    let queue = Queue::open(dir.path())?;
    let mut reader = queue.read_from(bases[1])?;
    let err = reader.next().unwrap_err();
    assert!(matches!(&err, Error::UnsupportedFormat { path, found: 2, .. } if *path == seg), "got {err:?}");
    drop(reader);
    drop(queue);
    assert_unchanged(&before, &snapshot(dir.path()));
    Ok(())
}

#[test]
fn unsupported_format_for_a_newer_last_batch_is_reported_not_cut() -> TestResult {
    let dir = tempfile::tempdir()?;
    let queue = Queue::open(dir.path())?;
    for i in 0..5 {
        queue.append(&value(i, 60))?;
    }
    queue.close()?;
    // As after a crash: no synced mark, so the open verifies the whole tail.
    std::fs::remove_file(dir.path().join(format!("{:020}.idx", 0)))?;
    let seg = dir.path().join(segment_name(0));
    let mut bytes = std::fs::read(&seg)?;
    let all = batches(&bytes);
    assert_eq!(all.len(), 5);
    let (pos, len) = *all.last().expect("five batches");
    assert_eq!(&bytes[pos + 8..pos + 12], b"WLQB");
    assert_eq!(crc32c(&bytes[pos + 8..pos + len]), u32_le(&bytes, pos + 4), "batch CRC disagrees");
    bytes[pos + 12] = 2;
    let crc = crc32c(&bytes[pos + 8..pos + len]);
    bytes[pos + 4..pos + 8].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(&seg, &bytes)?;
    let before = snapshot(dir.path());

    let err = Queue::open(dir.path()).unwrap_err();
    assert!(
        matches!(&err, Error::UnsupportedFormat { path, found: 2, supported: 1 } if *path == seg),
        "got {err:?}"
    );
    check_display(&err);
    // Not cut: a crash cannot write a batch with a valid checksum.
    assert_unchanged(&before, &snapshot(dir.path()));
    Ok(())
}

/// A closed queue with several segments, so that the first ones have sealed indexes.
fn sealed_segments_dir() -> Result<(tempfile::TempDir, Acked), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let queue = Queue::builder(dir.path()).segment_bytes(4096).open()?;
    let mut acked = Vec::new();
    for i in 0..120 {
        let v = value(i, 100);
        acked.push((queue.append(&v)?, v));
    }
    queue.close()?;
    assert!(segment_bases(dir.path()).len() >= 3);
    Ok((dir, acked))
}

/// Rewrites a sealed index's version (bytes 4..8) and, when asked, its
/// checksum (36..40: CRC-32C of bytes 0..36 followed by the entries).
fn patch_sealed_index_version(path: &Path, version: u32, fix_crc: bool) -> TestResult {
    let mut b = std::fs::read(path)?;
    assert_eq!(&b[0..4], b"WLQI");
    assert_eq!(u32_le(&b, 32) & 1, 1, "not a sealed index");
    let crc_of = |b: &[u8]| crc32c(&[&b[0..36], &b[40..]].concat());
    assert_eq!(crc_of(&b), u32_le(&b, 36), "the test's index CRC disagrees with walq's");
    b[4..8].copy_from_slice(&version.to_le_bytes());
    if fix_crc {
        let crc = crc_of(&b);
        b[36..40].copy_from_slice(&crc.to_le_bytes());
    }
    std::fs::write(path, b)?;
    Ok(())
}

#[test]
fn unsupported_format_for_a_newer_sealed_index() -> TestResult {
    let (dir, _) = sealed_segments_dir()?;
    let idx = dir.path().join(format!("{:020}.idx", 0));
    patch_sealed_index_version(&idx, 2, true)?;
    let before = snapshot(dir.path());
    // Checked when a reader first seeks in the segment, not at open.
    let queue = Queue::open(dir.path())?;
    let err = queue.read_from(0)?.next().map(|r| r.map(|r| r.offset())).unwrap_err();
    assert!(matches!(&err, Error::UnsupportedFormat { path, found: 2, .. } if *path == idx), "got {err:?}");
    check_display(&err);
    drop(queue);
    assert_unchanged(&before, &snapshot(dir.path()));
    Ok(())
}

#[test]
fn a_bit_flip_in_a_sealed_index_version_is_rebuilt_not_unsupported_format() -> TestResult {
    let (dir, acked) = sealed_segments_dir()?;
    let idx = dir.path().join(format!("{:020}.idx", 0));
    // Version 1 -> 3: one flipped bit, the checksum left as it was.
    patch_sealed_index_version(&idx, 3, false)?;
    let queue = Queue::open(dir.path())?;
    assert_eq!(read_all(&queue)?, acked);
    // Rebuilt on first use, and written back as a version 1 index.
    assert_eq!(u32_le(&std::fs::read(&idx)?, 4), 1);
    Ok(())
}

// ---------------------------------------------------------------------------
// Corrupt

#[test]
fn corrupt_middle_batch_of_the_active_segment_is_reported_with_file_and_position() -> TestResult {
    let dir = tempfile::tempdir()?;
    let queue = Queue::open(dir.path())?;
    for i in 0..5 {
        queue.append_with(&value(i, 100), Durability::Sync)?;
    }
    queue.close()?;
    // As after a crash: the (never synced) active index is gone, so the open
    // scans the whole active segment. (After a clean close the index marks
    // the segment synced and the damage is reported when read instead.)
    std::fs::remove_file(dir.path().join(format!("{:020}.idx", 0)))?;
    let seg = dir.path().join(segment_name(0));
    let mut bytes = std::fs::read(&seg)?;
    let all = batches(&bytes);
    assert_eq!(all.len(), 5);
    let (pos, len) = all[2];
    let at = pos + len / 2;
    bytes[at] ^= 0x10;
    std::fs::write(&seg, &bytes)?;
    let before = snapshot(dir.path());

    let err = Queue::open(dir.path()).unwrap_err();
    match &err {
        Error::Corrupt { path, position, reason } => {
            assert_eq!(*path, seg);
            assert_eq!(*position, pos as u64, "the position is not the damaged batch's: {reason}");
            assert!(!reason.is_empty());
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    check_display(&err);
    assert!(err.to_string().contains(&pos.to_string()), "no position in: {err}");
    // Nothing cut: valid, synced batches follow the damage.
    assert_unchanged(&before, &snapshot(dir.path()));
    // And it stays refused: opening again gives the same error.
    assert!(matches!(Queue::open(dir.path()), Err(Error::Corrupt { .. })));
    assert_unchanged(&before, &snapshot(dir.path()));
    Ok(())
}

// ---------------------------------------------------------------------------
// OffsetOutOfRange

#[test]
fn offset_out_of_range_past_the_end_and_below_the_first_offset() -> TestResult {
    let dir = tempfile::tempdir()?;
    let queue = Queue::builder(dir.path()).segment_bytes(4096).open()?;
    for i in 0..100 {
        queue.append(&value(i, 100))?;
    }
    let next = queue.next_offset();
    assert_eq!(next, 100);
    let before = snapshot(dir.path());

    for offset in [next + 1, next + 1000, u64::MAX] {
        let err = queue.read_from(offset).unwrap_err();
        assert!(
            matches!(err, Error::OffsetOutOfRange { offset: o, first: 0, next: n } if o == offset && n == next),
            "got {err:?}"
        );
        check_display(&err);
    }
    // The end itself is a valid position: nothing there yet.
    assert!(queue.read_from(next)?.next()?.is_none());
    assert_unchanged(&before, &snapshot(dir.path()));

    assert!(queue.remove_before(50)? > 0);
    let first = queue.first_offset();
    assert!(first > 0 && first <= 50);
    let before = snapshot(dir.path());
    for offset in [0, first - 1] {
        let err = queue.read_from(offset).unwrap_err();
        assert!(
            matches!(err, Error::OffsetOutOfRange { offset: o, first: f, next: n } if o == offset && f == first && n == next),
            "got {err:?}"
        );
        check_display(&err);
    }
    assert_eq!(queue.read_from(first)?.next()?.map(|r| r.offset()), Some(first));
    assert_unchanged(&before, &snapshot(dir.path()));
    Ok(())
}

// ---------------------------------------------------------------------------
// InvalidOption

#[test]
fn invalid_options_are_rejected_before_the_directory_is_created() -> TestResult {
    let parent = tempfile::tempdir()?;
    let dir = parent.path().join("q");
    type Build = fn(walq::QueueBuilder) -> walq::QueueBuilder;
    let cases: [(&str, Build); 9] = [
        ("segment_bytes", |b| b.segment_bytes(0)),
        ("segment_bytes", |b| b.segment_bytes(SEGMENT_BYTES_MIN - 1)),
        ("segment_bytes", |b| b.segment_bytes(SEGMENT_BYTES_MAX + 1)),
        ("max_record_bytes", |b| b.max_record_bytes(0)),
        ("max_record_bytes", |b| b.max_record_bytes(RECORD_BYTES_MAX + 1)),
        ("durability", |b| b.durability(Durability::Interval(Duration::ZERO))),
        ("write_buffer_bytes", |b| b.write_buffer_bytes(0)),
        ("preallocate_bytes", |b| b.preallocate_bytes(SEGMENT_BYTES_MAX + 1)),
        // Several bad options: the first one checked is named.
        ("segment_bytes", |b| b.segment_bytes(0).max_record_bytes(0)),
    ];
    for (i, (name, build)) in cases.into_iter().enumerate() {
        let err = build(Queue::builder(&dir)).open().unwrap_err();
        match &err {
            Error::InvalidOption { name: n, reason } => {
                assert_eq!(*n, name, "case {i}");
                assert!(!reason.is_empty(), "case {i}");
            }
            other => panic!("case {i}: expected InvalidOption, got {other:?}"),
        }
        check_display(&err);
        assert!(err.to_string().contains(name), "case {i}: {err}");
        assert!(!dir.exists(), "case {i} created the directory");
    }
    // Same on a simulated disk: no file appears.
    let disk = SimDisk::new(5);
    let err = Queue::builder("/q").simulated(&disk).max_record_bytes(0).open().unwrap_err();
    assert!(matches!(err, Error::InvalidOption { name: "max_record_bytes", .. }));
    assert!(disk.files().is_empty());
    assert_eq!(disk.ops(), 0, "an invalid option touched the disk");
    Ok(())
}

#[test]
fn option_limits_themselves_are_accepted() -> TestResult {
    let parent = tempfile::tempdir()?;
    let q = Queue::builder(parent.path().join("a"))
        .segment_bytes(SEGMENT_BYTES_MIN)
        .max_record_bytes(RECORD_BYTES_MAX)
        .durability(Durability::Interval(Duration::from_millis(1)))
        .open()?;
    q.append(b"x")?;
    drop(q);
    let q = Queue::builder(parent.path().join("b"))
        .segment_bytes(SEGMENT_BYTES_MAX)
        .max_record_bytes(1)
        .open()?;
    assert!(matches!(q.append(b"x"), Err(Error::RecordTooLarge { max: 1, .. })));
    Ok(())
}

// ---------------------------------------------------------------------------
// NotFound

#[test]
fn not_found_when_the_directory_is_missing_and_create_is_off() -> TestResult {
    let parent = tempfile::tempdir()?;
    let dir = parent.path().join("missing");
    let err = Queue::builder(&dir).create(false).open().unwrap_err();
    assert!(matches!(&err, Error::NotFound { dir: d } if *d == dir), "got {err:?}");
    check_display(&err);
    assert!(!dir.exists(), "the directory was created");

    let disk = SimDisk::new(6);
    let err = Queue::builder("/nowhere").simulated(&disk).create(false).open().unwrap_err();
    assert!(matches!(&err, Error::NotFound { .. }), "got {err:?}");
    assert!(disk.files().is_empty());

    // With create on (the default) the same call succeeds.
    Queue::builder(&dir).open()?;
    assert!(dir.is_dir());
    Ok(())
}

// ---------------------------------------------------------------------------
// Io, Display, traits

#[test]
fn io_errors_name_the_operation_and_path_and_have_a_source() -> TestResult {
    // Real file system: the "directory" is a regular file.
    let parent = tempfile::tempdir()?;
    let file = parent.path().join("not-a-dir");
    std::fs::write(&file, b"foreign")?;
    let err = Queue::open(&file).unwrap_err();
    match &err {
        Error::Io { path, source, .. } => {
            assert!(path.starts_with(&file), "Io names {} instead", path.display());
            assert!(source.raw_os_error().is_some());
        }
        other => panic!("expected Io, got {other:?}"),
    }
    check_display(&err);
    assert!(std::error::Error::source(&err).is_some(), "Io has no source()");
    assert_eq!(std::fs::read(&file)?, b"foreign");

    // Simulated EIO on fdatasync: the source is the OS error, EIO.
    let disk = SimDisk::new(7);
    let (queue, _) = sim_queue_with(&disk, Path::new("/q"), 1)?;
    disk.inject(Fault::new(FaultOp::Sync, FaultKind::Eio));
    let err = queue.append(b"x").unwrap_err();
    let source = std::error::Error::source(&err).expect("Io has a source");
    let io = source.downcast_ref::<std::io::Error>().expect("the source is an io::Error");
    assert_eq!(io.raw_os_error(), Some(5));
    assert!(err.to_string().starts_with("fdatasync "), "{err}");
    check_display(&err);
    Ok(())
}

#[test]
fn errors_without_an_underlying_error_have_no_source() -> TestResult {
    let dir = tempfile::tempdir()?;
    let queue = Queue::builder(dir.path()).max_record_bytes(10).open()?;
    let errors = [
        queue.append(&[0u8; 100]).unwrap_err(),
        queue.read_from(5).map(|_| ()).unwrap_err(),
        Queue::open(dir.path()).map(|_| ()).unwrap_err(),
    ];
    for err in &errors {
        check_display(err);
        assert!(std::error::Error::source(err).is_none(), "{err:?} has a source");
    }
    Ok(())
}

#[test]
fn error_is_send_sync_static_and_crosses_threads() {
    fn assert_traits<T: Send + Sync + 'static + std::error::Error>() {}
    assert_traits::<Error>();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("missing");
    let err = std::thread::spawn(move || Queue::builder(&path).create(false).open().map(|_| ()))
        .join()
        .expect("the thread ran");
    assert!(matches!(err, Err(Error::NotFound { .. })));
    let boxed: Box<dyn std::error::Error + Send + Sync> = Box::new(err.unwrap_err());
    assert!(boxed.to_string().contains("does not exist"));
}

#[test]
fn crc32c_helper_matches_the_standard_check_value() {
    // The CRC-32C check value from the Castagnoli catalogue; the tests above
    // trust this helper to forge valid headers.
    assert_eq!(crc32c(b"123456789"), 0xE306_9283);
}
