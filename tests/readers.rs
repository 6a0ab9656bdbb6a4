//! Readers: zero-copy, never past the watermark, correct across segments,
//! unharmed by retention, and never handing out damaged bytes.
//!
//! Goal: a `Reader` returns exactly the records that were appended, in order,
//! from any start offset and across any segment boundary; its slices point
//! into the segment's shared read-only map (no copy); it never returns a
//! record at or past the visible watermark (only synced records on a `Sync`
//! queue); a segment removed by retention stays readable by a reader already
//! inside it; a damaged batch gives a typed `Error::Corrupt`, never a panic
//! and never wrong data; and readers following the tail of a live writer see
//! every record once.
//!
//! Method: real directories (`tempfile`) for the map and pointer checks,
//! retention and watermarks; `segment_bytes(4096)` for many segments; a
//! `SimDisk` to flip a bit in a sealed segment at rest; a writer thread and
//! two reader threads for the concurrent case. Every record's value names its
//! offset, so a mix-up cannot pass.

mod common;

use common::{segment_bases, segment_name};

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use walq::{Durability, Error, OwnedRecord, Queue, Record, SimDisk};

type TestResult = Result<(), Box<dyn std::error::Error>>;

// ---------------------------------------------------------------------------
// Helpers.

/// A value that names its offset, of length `len` (at least the name).
fn value(i: u64, len: usize) -> Vec<u8> {
    let mut v = format!("v{i}.").into_bytes();
    let fill = b'a' + (i % 26) as u8;
    v.resize(len.max(v.len()), fill);
    v
}

/// A deterministic value length between 1 and 300 bytes.
fn len_for(i: u64) -> usize {
    1 + ((i * 7919) % 300) as usize
}

/// Every record a reader returns from `from` until `Ok(None)`.
fn read_owned(queue: &Queue, from: u64) -> Result<Vec<OwnedRecord>, Error> {
    let mut reader = queue.read_from(from)?;
    let mut out = Vec::new();
    while let Some(r) = reader.next()? {
        out.push(r.to_owned_record());
    }
    Ok(out)
}

/// `(position, length)` of every batch in a segment file's bytes.
fn batches(segment: &[u8]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut pos = 32;
    while pos + 48 <= segment.len() {
        let length = u32::from_le_bytes(segment[pos..pos + 4].try_into().expect("4 bytes")) as usize;
        if length == 0 {
            break;
        }
        out.push((pos, length));
        pos += length;
    }
    out
}

/// Polls `cond` until it holds, for at most five seconds.
fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

// ---------------------------------------------------------------------------
// Zero copy

#[test]
fn values_of_one_batch_lie_at_increasing_addresses_of_one_map() -> TestResult {
    let dir = tempfile::tempdir()?;
    let queue = Queue::open(dir.path())?;
    queue.append(b"first batch")?;
    let values: Vec<Vec<u8>> = (0..8).map(|i| format!("value-{i:04}").into_bytes()).collect();
    assert!(values.iter().all(|v| v.len() == 10));
    let records: Vec<Record<'_>> = values.iter().map(|v| Record::new(v).timestamp_ms(1_000)).collect();
    let range = queue.append_batch(&records)?;

    let mut reader = queue.read_from(range.start)?;
    let mut addresses = Vec::new();
    while let Some(r) = reader.next()? {
        assert_eq!(r.value(), values[(r.offset() - range.start) as usize]);
        addresses.push(r.value().as_ptr() as usize);
    }
    assert_eq!(addresses.len(), 8);
    // Each record after the first: body_len, offset_delta, timestamp_delta
    // (0), key_len_plus_1 (0), header_count (0), value_len: one byte each,
    // then the 10-byte value. A copy per record would land anywhere.
    for pair in addresses.windows(2) {
        assert_eq!(pair[1].wrapping_sub(pair[0]), 16, "values are not back to back in one region");
    }
    Ok(())
}

#[test]
fn two_readers_of_the_same_record_share_the_segment_map() -> TestResult {
    let dir = tempfile::tempdir()?;
    let queue = Queue::open(dir.path())?;
    for i in 0..10 {
        queue.append(&value(i, 50))?;
    }
    let mut first = queue.read_from(4)?;
    let a = first.next()?.expect("record 4");
    let (a_offset, a_ptr, a_value) = (a.offset(), a.value().as_ptr(), a.value().to_vec());
    let mut second = queue.read_from(4)?;
    let b = second.next()?.expect("record 4 again");
    assert_eq!((b.offset(), b.value()), (a_offset, &a_value[..]));
    assert_eq!(b.value().as_ptr(), a_ptr, "the second reader got a copy, not the shared map");
    // A reader that walks there from an earlier offset lands on the same bytes too.
    let mut third = queue.read_from(0)?;
    for _ in 0..4 {
        third.next()?;
    }
    assert_eq!(third.next()?.expect("record 4").value().as_ptr(), a_ptr);
    drop(first);
    Ok(())
}

// ---------------------------------------------------------------------------
// Watermark

#[test]
fn sync_queue_hides_an_os_append_until_flush() -> TestResult {
    let dir = tempfile::tempdir()?;
    let queue = Queue::open(dir.path())?; // Durability::Sync
    queue.append(b"durable")?;
    let mut reader = queue.read_from(0)?;
    assert_eq!(reader.next()?.map(|r| r.offset()), Some(0));
    assert!(reader.next()?.is_none());

    assert_eq!(queue.append_with(b"buffered", Durability::Os)?, 1);
    // The background writer hands it to the OS within about a millisecond...
    wait_until("the Os record is written", || queue.stats().written_offset == 2);
    let stats = queue.stats();
    assert_eq!((stats.durable_offset, stats.visible_offset), (1, 1));
    // ...but on a Sync queue readers see only what a sync covered.
    assert!(reader.next()?.is_none(), "a reader saw a record no sync covered");
    assert!(queue.read_from(1)?.next()?.is_none());
    assert_eq!(reader.position(), 1);

    queue.flush()?;
    assert_eq!(queue.stats().visible_offset, 2);
    let r = reader.next()?.expect("visible after flush");
    assert_eq!((r.offset(), r.value()), (1, &b"buffered"[..]));
    assert!(reader.next()?.is_none());
    Ok(())
}

#[test]
fn os_queue_shows_a_record_once_written_and_a_reader_at_the_end_sees_later_appends() -> TestResult {
    let dir = tempfile::tempdir()?;
    let queue = Queue::builder(dir.path()).durability(Durability::Os).open()?;
    queue.append(b"zero")?;
    queue.flush()?;
    let mut reader = queue.read_from(0)?;
    assert_eq!(reader.next()?.map(|r| r.value().to_vec()), Some(b"zero".to_vec()));
    assert!(reader.next()?.is_none());
    assert!(reader.next()?.is_none(), "Ok(None) is not sticky-wrong: it stays None");

    queue.append(b"one")?;
    queue.flush()?;
    assert_eq!(reader.next()?.map(|r| (r.offset(), r.value().to_vec())), Some((1, b"one".to_vec())));
    assert!(reader.next()?.is_none());

    // Without flush: visible once the background writer wrote it, not synced.
    queue.append(b"two")?;
    let mut got = None;
    wait_until("the Os record is visible", || match reader.next() {
        Ok(Some(r)) => {
            got = Some((r.offset(), r.value().to_vec()));
            true
        }
        Ok(None) => false,
        Err(e) => panic!("reader failed: {e}"),
    });
    assert_eq!(got, Some((2, b"two".to_vec())));
    let stats = queue.stats();
    assert_eq!(stats.visible_offset, 3);
    assert_eq!(stats.durable_offset, 2, "an Os append was synced without a flush");
    Ok(())
}

// ---------------------------------------------------------------------------
// Many segments

/// Appends `n` records to a queue with 4 KiB segments, mixing single appends
/// and batches, with keys and explicit timestamps; returns what was appended.
fn fill_many_segments(queue: &Queue, n: u64) -> Result<Vec<OwnedRecord>, Error> {
    let mut expected = Vec::new();
    let mut i = 0;
    while i < n {
        let count = if i % 5 == 0 { 4.min(n - i) } else { 1 };
        let values: Vec<Vec<u8>> = (i..i + count).map(|j| value(j, len_for(j))).collect();
        let keys: Vec<Vec<u8>> = (i..i + count).map(|j| format!("k{}", j % 7).into_bytes()).collect();
        let records: Vec<Record<'_>> = (0..count as usize)
            .map(|k| {
                let j = i + k as u64;
                let r = Record::new(&values[k]).timestamp_ms(1_600_000_000_000 + j * 3);
                if j.is_multiple_of(3) { r.key(&keys[k]) } else { r }
            })
            .collect();
        let range = queue.append_batch(&records)?;
        assert_eq!(range, i..i + count);
        for k in 0..records.len() {
            let j = i + k as u64;
            expected.push(OwnedRecord {
                offset: j,
                timestamp_ms: 1_600_000_000_000 + j * 3,
                key: j.is_multiple_of(3).then(|| keys[k].clone()),
                headers: Vec::new(),
                value: values[k].clone(),
            });
        }
        i += count;
    }
    queue.flush()?;
    Ok(expected)
}

/// From every start offset, a fresh reader returns exactly the suffix.
fn check_every_start(queue: &Queue, expected: &[OwnedRecord]) -> TestResult {
    for start in 0..expected.len() {
        let got = read_owned(queue, start as u64)?;
        if got != expected[start..] {
            let i = got
                .iter()
                .zip(&expected[start..])
                .position(|(a, b)| a != b)
                .unwrap_or(got.len().min(expected.len() - start));
            panic!(
                "from {start}: {} records instead of {}; first difference at index {i}: {:?} vs {:?}",
                got.len(),
                expected.len() - start,
                got.get(i),
                expected.get(start + i)
            );
        }
    }
    Ok(())
}

#[test]
fn reading_from_every_start_offset_crosses_segment_boundaries_exactly() -> TestResult {
    let dir = tempfile::tempdir()?;
    let open = || {
        Queue::builder(dir.path())
            .segment_bytes(4096)
            .durability(Durability::Os)
            .write_buffer_bytes(600)
            .open()
    };
    let queue = open()?;
    let expected = fill_many_segments(&queue, 400)?;
    let segments = segment_bases(dir.path());
    assert!(segments.len() >= 10, "only {} segments", segments.len());
    assert_eq!(queue.stats().segments, segments.len());
    // Live queue: sealed segments found through in-memory state.
    check_every_start(&queue, &expected)?;
    drop(queue);

    // Reopened: sealed segments found through their index files.
    let queue = open()?;
    assert_eq!(queue.next_offset(), 400);
    check_every_start(&queue, &expected)?;
    Ok(())
}

/// The queue, what was appended, and the segments' base offsets.
type ManySegments = (Queue, Vec<OwnedRecord>, Vec<u64>);

/// An `Os` queue of 300 records over at least 5 small segments.
fn many_segments(dir: &Path) -> Result<ManySegments, Box<dyn std::error::Error>> {
    let queue =
        Queue::builder(dir).segment_bytes(4096).durability(Durability::Os).write_buffer_bytes(600).open()?;
    let expected = fill_many_segments(&queue, 300)?;
    let bases = segment_bases(dir);
    assert!(bases.len() >= 5);
    Ok((queue, expected, bases))
}

#[test]
fn seek_moves_forward_and_backward_within_and_across_segments() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (queue, expected, bases) = many_segments(dir.path())?;
    let mut reader = queue.read_from(0)?;
    for want in 0..5 {
        assert_eq!(reader.next()?.expect("record").offset(), want);
    }
    let targets = [
        7,            // forward, same segment
        3,            // backward, same segment
        bases[3] + 1, // forward, three segments on
        bases[3] - 1, // backward across one boundary
        bases[1],     // backward to a segment's first record
        299,          // the last record
        0,            // all the way back
        bases[4],     // forward to a segment's first record
        bases[2] - 1, // backward to a segment's last record
    ];
    for target in targets {
        reader.seek(target);
        assert_eq!(reader.position(), target);
        for k in 0..3 {
            let want = target + k;
            match reader.next()? {
                Some(r) => assert_eq!(r.to_owned_record(), expected[want as usize], "after seek({target})"),
                None => {
                    assert_eq!(want, 300, "early end after seek({target})");
                    break;
                }
            }
        }
    }
    // At and past the end: nothing, until records get there.
    reader.seek(300);
    assert!(reader.next()?.is_none());
    reader.seek(303);
    assert!(reader.next()?.is_none());
    for j in 300..304 {
        queue.append(&value(j, 10))?;
    }
    queue.flush()?;
    let r = reader.next()?.expect("record 303 after it was appended");
    assert_eq!((r.offset(), r.value()), (303, &value(303, 10)[..]));
    Ok(())
}

// ---------------------------------------------------------------------------
// Retention under a live reader

#[test]
fn a_reader_inside_a_removed_segment_keeps_reading_it_and_beyond() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (queue, expected, bases) = many_segments(dir.path())?;

    // A reader inside segment 0 (it has mapped it).
    let mut inside = queue.read_from(1)?;
    assert_eq!(inside.next()?.expect("record 1").offset(), 1);
    assert_eq!(queue.remove_before(bases[1])?, 1);
    assert_eq!(queue.first_offset(), bases[1]);
    let seg0 = dir.path().join(segment_name(0));
    assert!(!seg0.exists(), "segment 0 is still on disk");
    assert!(!dir.path().join(format!("{:020}.idx", 0)).exists(), "the index of segment 0 is still on disk");

    // It reads the rest of segment 0 from its map, then on into segment 1 and to the end.
    let mut got = Vec::new();
    while let Some(r) = inside.next()? {
        got.push(r.to_owned_record());
    }
    assert_eq!(got, expected[2..]);

    // New readers below the first offset: out of range, at read_from and after a seek.
    for offset in [0, bases[1] - 1] {
        match queue.read_from(offset) {
            Err(Error::OffsetOutOfRange { offset: o, first, .. }) => {
                assert_eq!((o, first), (offset, bases[1]))
            }
            other => panic!("read_from({offset}) gave {:?}", other.map(|r| r.position())),
        }
    }
    let mut late = queue.read_from(bases[1])?;
    late.seek(0);
    assert!(matches!(late.next(), Err(Error::OffsetOutOfRange { offset: 0, .. })));

    // A reader inside segment 1 when segments 1 and 2 go: it finishes segment
    // 1, then the removed segment 2 is a typed error, not a panic or a skip.
    let mut reader = queue.read_from(bases[1])?;
    assert_eq!(reader.next()?.expect("first of segment 1").offset(), bases[1]);
    assert_eq!(queue.remove_before(bases[3])?, 2);
    for want in bases[1] + 1..bases[2] {
        let r = reader.next()?.expect("segment 1 stays readable");
        assert_eq!(r.to_owned_record(), expected[want as usize]);
    }
    match reader.next() {
        Err(Error::OffsetOutOfRange { offset, first, .. }) => {
            assert_eq!((offset, first), (bases[2], bases[3]))
        }
        other => panic!("past the removed segments: {:?}", other.map(|r| r.map(|r| r.offset()))),
    }
    assert_eq!(read_owned(&queue, bases[3])?, expected[bases[3] as usize..]);
    Ok(())
}

// ---------------------------------------------------------------------------
// Checksums on read

#[test]
fn a_flipped_bit_in_a_sealed_segment_is_a_typed_corrupt_error_on_read() -> TestResult {
    let disk = SimDisk::new(42);
    let dir = Path::new("/q");
    let open = || Queue::builder(dir).simulated(&disk).segment_bytes(4096).open();
    let queue = open()?;
    let mut expected = Vec::new();
    for i in 0..120 {
        let v = value(i, 90);
        expected.push((queue.append(&v)?, v));
    }
    assert!(queue.stats().segments >= 4);
    drop(queue);

    // Damage the middle batch of the second segment, at rest.
    let mut bases: Vec<u64> = disk
        .files()
        .iter()
        .filter_map(|p| p.file_name()?.to_str()?.strip_suffix(".seg")?.parse().ok())
        .collect();
    bases.sort_unstable();
    let seg = dir.join(segment_name(bases[1]));
    let bytes = disk.read_file(&seg).expect("segment 1");
    let all = batches(&bytes);
    let (pos, len) = all[all.len() / 2];
    let damaged_base = u64::from_le_bytes(bytes[pos + 16..pos + 24].try_into()?);
    assert!(damaged_base > bases[1] && damaged_base < bases[2]);
    disk.flip_bit(&seg, (pos + len / 2) as u64, 5);

    // Open checks only the tail: it succeeds and cuts nothing.
    let queue = open()?;
    assert_eq!(queue.recovery_report().bytes_cut, 0);
    assert_eq!(queue.next_offset(), 120);

    let mut reader = queue.read_from(0)?;
    for (offset, v) in &expected[..damaged_base as usize] {
        let r = reader.next()?.expect("records before the damage");
        assert_eq!((r.offset(), r.value()), (*offset, &v[..]));
    }
    for _ in 0..2 {
        match reader.next() {
            Err(Error::Corrupt { path, position, .. }) => {
                assert_eq!(path, seg);
                assert_eq!(position, pos as u64);
            }
            other => panic!(
                "expected Corrupt at the damaged batch, got {:?}",
                other.map(|r| r.map(|r| r.offset()))
            ),
        }
    }
    assert!(matches!(queue.read_from(damaged_base)?.next(), Err(Error::Corrupt { .. })));
    // The damage stays in its segment: the next one reads whole.
    let mut reader = queue.read_from(bases[2])?;
    for (offset, v) in &expected[bases[2] as usize..] {
        let r = reader.next()?.expect("records after the damaged segment");
        assert_eq!((r.offset(), r.value()), (*offset, &v[..]));
    }
    assert!(reader.next()?.is_none());
    Ok(())
}

// ---------------------------------------------------------------------------
// Keys, headers, timestamps

/// The inputs of one record, kept so that both the `Record` to append and the
/// `OwnedRecord` to expect are built from them (`Record`'s fields are private).
struct Spec {
    key: Option<Vec<u8>>,
    headers: Vec<(Vec<u8>, Vec<u8>)>,
    value: Vec<u8>,
    timestamp_ms: u64,
}

impl Spec {
    fn new(value: &[u8], timestamp_ms: u64) -> Spec {
        Spec { key: None, headers: Vec::new(), value: value.to_vec(), timestamp_ms }
    }

    fn key(mut self, key: &[u8]) -> Spec {
        self.key = Some(key.to_vec());
        self
    }

    fn header(mut self, name: &[u8], value: &[u8]) -> Spec {
        self.headers.push((name.to_vec(), value.to_vec()));
        self
    }

    fn record(&self) -> Record<'_> {
        let mut r = Record::new(&self.value).timestamp_ms(self.timestamp_ms);
        if let Some(k) = &self.key {
            r = r.key(k);
        }
        for (n, v) in &self.headers {
            r = r.header(n, v);
        }
        r
    }

    fn expected(&self, offset: u64) -> OwnedRecord {
        OwnedRecord {
            offset,
            timestamp_ms: self.timestamp_ms,
            key: self.key.clone(),
            headers: self.headers.clone(),
            value: self.value.clone(),
        }
    }
}

#[test]
fn keys_headers_empty_values_and_timestamps_round_trip() -> TestResult {
    let dir = tempfile::tempdir()?;
    let queue = Queue::open(dir.path())?;
    let mut specs = vec![
        Spec::new(b"", 0),
        Spec::new(b"with empty key", 1).key(b""),
        Spec::new(b"no key", 2),
        Spec::new(b"", u64::MAX)
            .key(b"k")
            .header(b"h", b"1")
            .header(b"h", b"2")
            .header(b"", b"")
            .header(b"big", &[0xAB; 300]),
        // From here on one batch, timestamps going backward and forward.
        Spec::new(b"x", 1_700_000_000_000).header(b"only", b""),
        Spec::new(b"earlier", 5),
        Spec::new(b"latest", u64::MAX).key(b"\0\xff"),
    ];
    // Varint boundaries of the value length.
    for n in [127usize, 128, 16_383, 16_384] {
        specs.push(Spec::new(&vec![n as u8; n], n as u64).key(&[n as u8; 3]));
    }
    let expected: Vec<OwnedRecord> = specs.iter().enumerate().map(|(i, s)| s.expected(i as u64)).collect();
    for s in &specs[..4] {
        queue.append_record(&s.record())?;
    }
    let batch: Vec<Record<'_>> = specs[4..].iter().map(Spec::record).collect();
    assert_eq!(queue.append_batch(&batch)?, 4..specs.len() as u64);

    let check = |queue: &Queue| -> TestResult {
        assert_eq!(read_owned(queue, 0)?, expected);
        let mut reader = queue.read_from(0)?;
        let r = reader.next()?.expect("0");
        assert_eq!((r.key(), r.value(), r.headers().count()), (None, &b""[..], 0));
        let r = reader.next()?.expect("1");
        assert_eq!(r.key(), Some(&b""[..]), "an empty key came back as no key");
        let r = reader.next()?.expect("2");
        assert_eq!(r.key(), None, "no key came back as an empty key");
        let r = reader.next()?.expect("3");
        assert_eq!(r.header(b"h"), Some(&b"1"[..]), "header() is not the first of repeated names");
        assert_eq!(r.header(b""), Some(&b""[..]));
        assert_eq!(r.header(b"missing"), None);
        let names: Vec<&[u8]> = r.headers().map(|(n, _)| n).collect();
        assert_eq!(names, [&b"h"[..], b"h", b"", b"big"]);
        assert_eq!(r.timestamp_ms(), u64::MAX);
        Ok(())
    };
    check(&queue)?;
    drop(queue);
    check(&Queue::open(dir.path())?)?;
    Ok(())
}

// ---------------------------------------------------------------------------
// Concurrency

/// One writer appends `COUNT` records (`Os`, with a flush every 100) while two
/// readers follow the tail; each reader must see every record exactly once,
/// in order, with the right value, and never past the visible watermark.
fn follow_the_tail(queue_durability: Durability) -> TestResult {
    const COUNT: u64 = 10_000;
    let dir = tempfile::tempdir()?;
    let queue =
        Arc::new(Queue::builder(dir.path()).segment_bytes(64 << 10).durability(queue_durability).open()?);
    let done = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..2)
        .map(|id| {
            let queue = Arc::clone(&queue);
            let done = Arc::clone(&done);
            std::thread::spawn(move || -> Result<u64, String> {
                let deadline = Instant::now() + Duration::from_secs(60);
                let mut reader = queue.read_from(0).map_err(|e| e.to_string())?;
                let mut want = 0;
                while want < COUNT {
                    match reader.next().map_err(|e| format!("reader {id}: {e}"))? {
                        Some(r) => {
                            let (offset, ok) =
                                (r.offset(), r.value() == value(r.offset(), 10 + (r.offset() % 50) as usize));
                            if offset != want || !ok {
                                return Err(format!(
                                    "reader {id}: got offset {offset} (value ok: {ok}), wanted {want}"
                                ));
                            }
                            let stats = queue.stats();
                            if offset >= stats.visible_offset {
                                return Err(format!(
                                    "reader {id}: offset {offset} >= visible {}",
                                    stats.visible_offset
                                ));
                            }
                            if queue_durability == Durability::Sync && offset >= stats.durable_offset {
                                return Err(format!(
                                    "reader {id}: offset {offset} >= durable {}",
                                    stats.durable_offset
                                ));
                            }
                            want += 1;
                        }
                        None if Instant::now() > deadline => {
                            return Err(format!(
                                "reader {id}: timed out at {want} (writer done: {})",
                                done.load(Ordering::Acquire)
                            ));
                        }
                        None => std::thread::yield_now(),
                    }
                }
                if reader.next().map_err(|e| e.to_string())?.is_some() {
                    return Err(format!("reader {id}: a record past the last one"));
                }
                Ok(want)
            })
        })
        .collect();
    for i in 0..COUNT {
        assert_eq!(queue.append_with(&value(i, 10 + (i % 50) as usize), Durability::Os)?, i);
        if i % 100 == 99 {
            queue.flush()?;
        }
    }
    queue.flush()?;
    done.store(true, Ordering::Release);
    for handle in readers {
        let seen = handle.join().expect("reader thread panicked")?;
        assert_eq!(seen, COUNT);
    }
    assert!(queue.stats().rolls > 0, "the test did not cross a segment boundary");
    Ok(())
}

#[test]
fn two_readers_follow_a_live_writer_and_see_every_record_once_on_an_os_queue() -> TestResult {
    follow_the_tail(Durability::Os)
}

#[test]
fn two_readers_follow_a_live_writer_and_see_only_synced_records_on_a_sync_queue() -> TestResult {
    follow_the_tail(Durability::Sync)
}

// ---------------------------------------------------------------------------
// Simulated disk

/// On a `SimDisk` a map is a snapshot. The active segment is preallocated
/// with zeros, so a snapshot taken early covers zeros where later batches
/// land; a reader must not take those zeros for the end of the data.
#[test]
fn a_reader_on_a_simulated_disk_sees_records_appended_after_it_mapped_the_segment() -> TestResult {
    let disk = SimDisk::new(9);
    let queue = Queue::builder("/q").simulated(&disk).open()?;
    queue.append(b"a")?;
    let mut reader = queue.read_from(0)?;
    assert_eq!(reader.next()?.map(|r| r.offset()), Some(0));
    assert!(reader.next()?.is_none());
    queue.append(b"b")?;
    let got = reader.next().map(|r| r.map(|r| (r.offset(), r.value().to_vec())));
    assert!(matches!(&got, Ok(Some((1, v))) if v == b"b"), "the same reader: {got:?}");
    let mut fresh = queue.read_from(1)?;
    let got = fresh.next().map(|r| r.map(|r| (r.offset(), r.value().to_vec())));
    assert!(matches!(&got, Ok(Some((1, v))) if v == b"b"), "a fresh reader: {got:?}");
    Ok(())
}

#[test]
fn retention_frees_the_space_of_segments_readers_have_left() {
    // Regression (review): removed segments stayed in the map cache, so their
    // unlinked files kept their blocks until evicted.
    let dir = tempfile::tempdir().unwrap();
    let q = Queue::builder(dir.path()).segment_bytes(4096).preallocate_bytes(0).open().unwrap();
    for i in 0..400u32 {
        q.append(&[(i % 250) as u8; 200]).unwrap();
    }
    {
        let mut r = q.read_from(0).unwrap();
        while r.next().unwrap().is_some() {}
    }
    let removed = q.remove_before(q.next_offset()).unwrap();
    assert!(removed > 10);
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    let dir_name = dir.path().to_str().unwrap();
    let deleted = maps.lines().filter(|l| l.contains(dir_name) && l.contains("(deleted)")).count();
    assert_eq!(deleted, 0, "{removed} segments removed but {deleted} still mapped");
}

#[test]
fn a_reader_inside_a_removed_segment_remaps_it_through_its_own_handle() {
    // Regression (review): the reader mapped the segment while it was active
    // and short; after the roll and its removal, remapping by path failed.
    let disk = SimDisk::new(1);
    let q = Queue::builder("/q").segment_bytes(4096).preallocate_bytes(0).simulated(&disk).open().unwrap();
    q.append(&[1; 100]).unwrap();
    let mut r = q.read_from(0).unwrap();
    assert!(r.next().unwrap().is_some());
    while q.stats().rolls == 0 {
        q.append(&[2; 100]).unwrap();
    }
    assert_eq!(q.remove_before(q.next_offset() - 1).unwrap(), 1);
    let mut n = 1;
    while let Some(rec) = r.next().unwrap() {
        assert_eq!(rec.offset(), n);
        n += 1;
    }
    assert_eq!(n, q.next_offset());
}

/// A map covers the whole segment file as preallocated and exposes only the
/// written part; tail readers widen it as the writer goes on. On a real disk,
/// with preallocation steps smaller than a segment (so the writer outgrows
/// each mapping and readers map again) and rolls and removals on the way: a
/// new reader per record, a reader kept at the tail, and a reader left
/// behind inside a removed segment all read exactly what was appended.
#[test]
fn tail_readers_see_every_record_through_grown_maps_rolls_and_removals() -> TestResult {
    let dir = tempfile::tempdir()?;
    let q = Queue::builder(dir.path()).segment_bytes(16 << 10).preallocate_bytes(2048).open()?;
    let value = |i: u64| format!("record {i} {}", "x".repeat((i * 37 % 300) as usize)).into_bytes();
    let mut follower = q.read_from(0)?;
    let mut behind = q.read_from(0)?;
    let mut removed = 0;
    for i in 0..600u64 {
        assert_eq!(q.append(&value(i))?, i);
        if i == 0 {
            assert!(behind.next()?.is_some(), "behind sits inside the first segment");
        }
        let mut fresh = q.read_from(i)?;
        let r = fresh.next()?.ok_or("a new reader missed the record just appended")?;
        assert_eq!((r.offset(), r.value()), (i, value(i).as_slice()));
        let r = follower.next()?.ok_or("the follower missed a record")?;
        assert_eq!((r.offset(), r.value()), (i, value(i).as_slice()));
        assert!(follower.next()?.is_none(), "nothing past the watermark");
        if i % 150 == 149 {
            removed += q.remove_before(i - 20)?;
        }
    }
    assert!(q.stats().rolls >= 5 && removed >= 2, "rolls {}, removed {removed}", q.stats().rolls);
    // The reader left behind finishes its removed segment, then the log goes on
    // past it: whatever it returns is exact.
    let mut n = 1;
    loop {
        match behind.next() {
            Ok(Some(r)) => {
                assert_eq!((r.offset(), r.value()), (n, value(n).as_slice()));
                n += 1;
            }
            Ok(None) => break,
            Err(Error::OffsetOutOfRange { .. }) => break, // its next segment was removed too
            Err(e) => return Err(e.into()),
        }
    }
    assert!(n > 1, "the reader inside the removed segment read on");
    Ok(())
}

/// Closing a queue and opening it again while a reader of it is still in
/// scope works (the quickstart does it): the lock goes with the queue, and
/// the old reader still reads what it had.
#[test]
fn a_queue_reopens_while_a_reader_of_its_last_opening_is_alive() -> TestResult {
    let dir = tempfile::tempdir()?;
    let queue = Queue::open(dir.path())?;
    queue.append(b"one")?;
    let mut old = queue.read_from(0)?;
    queue.close()?;
    let queue = Queue::open(dir.path())?;
    assert_eq!(queue.append(b"two")?, 1);
    assert_eq!(old.next()?.map(|r| r.value().to_vec()), Some(b"one".to_vec()));
    let mut r = queue.read_from(0)?;
    assert_eq!(r.next()?.map(|r| r.offset()), Some(0));
    assert_eq!(r.next()?.map(|r| r.value().to_vec()), Some(b"two".to_vec()));
    Ok(())
}
