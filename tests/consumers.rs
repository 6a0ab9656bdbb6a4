//! Named consumers: positions that survive restarts and crashes, start
//! options, tail-following, the journal's fall-back on damage, listing and
//! deleting, retention and backpressure. Named after DESIGN.md's promises.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::sim_dir;
use walq::{
    Durability, Error, Fault, FaultKind, FaultOp, ManualClock, Queue, Record, Retention, SimDisk, StartAt,
    WhenFull,
};

fn values(records: &[walq::OwnedRecord]) -> Vec<Vec<u8>> {
    records.iter().map(|r| r.value.clone()).collect()
}

#[test]
fn consumers_resume_where_they_committed() {
    let dir = tempfile::tempdir().unwrap();
    {
        let queue = Queue::open(dir.path()).unwrap();
        for i in 0..10u8 {
            queue.append(&[i]).unwrap();
        }
        let mut c = queue.consumer("billing").unwrap();
        let got = c.poll(4, Duration::ZERO).unwrap();
        assert_eq!(values(&got), vec![vec![0], vec![1], vec![2], vec![3]]);
        c.commit(got[3].offset + 1).unwrap();
        // Read further without committing: read again after the restart.
        c.poll(3, Duration::ZERO).unwrap();
    }
    let queue = Queue::open(dir.path()).unwrap();
    let mut c = queue.consumer("billing").unwrap();
    assert_eq!((c.committed(), c.position()), (4, 4));
    assert_eq!(c.next_timeout(Duration::ZERO).unwrap().unwrap().value(), &[4]);
    assert_eq!(queue.consumers()[0].lag, 6);
}

#[test]
fn consumers_resume_after_a_power_cut() {
    // A Sync commit survives any power cut; an Os one may roll back, never forward.
    for seed in 0..50 {
        let disk = SimDisk::new(seed);
        {
            let queue = Queue::builder(sim_dir()).simulated(&disk).open().unwrap();
            queue.append_batch(&(0..20u8).map(|_| Record::new(b"r")).collect::<Vec<_>>()).unwrap();
            let mut c = queue.consumer("c").unwrap();
            c.commit(7).unwrap();
            c.commit_with(12, Durability::Os).unwrap();
            disk.crash();
        }
        let queue = Queue::builder(sim_dir()).simulated(&disk).open().unwrap();
        let pos = queue.consumer("c").unwrap().position();
        assert!(pos == 7 || pos == 12, "seed {seed}: position {pos}");
    }
}

#[test]
fn consumer_position_is_never_ahead_of_the_log() {
    let disk = SimDisk::new(1);
    {
        let queue = Queue::builder(sim_dir()).simulated(&disk).durability(Durability::Os).open().unwrap();
        queue.append_with(b"durable", Durability::Sync).unwrap();
        let mut c = queue.consumer("c").unwrap();
        assert!(matches!(c.commit(2), Err(Error::OffsetOutOfRange { offset: 2, .. })));
        // Records that a power cut takes back, and a durable commit past them.
        for _ in 0..5 {
            queue.append_with(b"lost", Durability::Os).unwrap();
        }
        std::thread::sleep(Duration::from_millis(20)); // written to the OS, not synced
        c.commit(6).unwrap();
        disk.crash_lose_unsynced();
    }
    let queue = Queue::builder(sim_dir()).simulated(&disk).open().unwrap();
    assert_eq!(queue.next_offset(), 1);
    assert_eq!(queue.consumers()[0].position, 1, "clamped to the log's end");
    let mut c = queue.consumer("c").unwrap();
    queue.append(b"new").unwrap();
    assert_eq!(c.next_timeout(Duration::ZERO).unwrap().unwrap().value(), b"new");
}

#[test]
fn new_consumers_start_where_their_options_say() {
    let clock = ManualClock::new(1_000);
    let dir = tempfile::tempdir().unwrap();
    let queue =
        Queue::builder(dir.path()).segment_bytes(4096).batch_bytes_max(512).clock(&clock).open().unwrap();
    for i in 0..200u64 {
        queue.append_with(&[i as u8; 100], Durability::Os).unwrap();
        clock.advance(Duration::from_millis(10));
    }
    queue.flush().unwrap();
    assert!(queue.stats().segments > 3);
    assert_eq!(queue.consumer_from("a", StartAt::Earliest).unwrap().position(), 0);
    assert_eq!(queue.consumer_from("b", StartAt::Latest).unwrap().position(), 200);
    assert_eq!(queue.consumer_from("c", StartAt::Offset(57)).unwrap().position(), 57);
    // Record i has timestamp 1000 + 10 i.
    assert_eq!(queue.consumer_from("d", StartAt::Timestamp(1_000 + 1_234)).unwrap().position(), 124);
    assert_eq!(queue.consumer_from("e", StartAt::Timestamp(0)).unwrap().position(), 0);
    assert_eq!(queue.consumer_from("f", StartAt::Timestamp(u64::MAX)).unwrap().position(), 200);
    assert!(matches!(
        queue.consumer_from("g", StartAt::Offset(201)),
        Err(Error::OffsetOutOfRange { offset: 201, .. })
    ));
    // An existing consumer ignores the start option.
    drop(queue.consumer_from("z", StartAt::Offset(5)).unwrap());
    assert_eq!(queue.consumer_from("z", StartAt::Latest).unwrap().position(), 5);
    // Seek by timestamp after every possible boundary.
    for i in (0..200u64).step_by(7) {
        assert_eq!(queue.offset_for_timestamp(1_000 + 10 * i).unwrap(), i);
        assert_eq!(queue.offset_for_timestamp(1_000 + 10 * i - 5).unwrap(), i);
    }
}

#[test]
fn consumer_waits_for_the_next_append() {
    let dir = tempfile::tempdir().unwrap();
    let queue = Arc::new(Queue::open(dir.path()).unwrap());
    let mut c = queue.consumer("tail").unwrap();
    let started = Instant::now();
    assert!(c.next_timeout(Duration::from_millis(30)).unwrap().is_none());
    assert!(started.elapsed() >= Duration::from_millis(30));
    let q = Arc::clone(&queue);
    let producer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        q.append(b"late").unwrap();
    });
    let started = Instant::now();
    let got = c.poll(10, Duration::from_secs(10)).unwrap();
    assert_eq!(values(&got), vec![b"late".to_vec()]);
    assert!(started.elapsed() < Duration::from_secs(5), "woken by the append, not the timeout");
    producer.join().unwrap();
}

#[test]
fn no_lost_wakeups_between_many_producers_and_consumers() {
    let dir = tempfile::tempdir().unwrap();
    let queue = Arc::new(Queue::builder(dir.path()).durability(Durability::Os).open().unwrap());
    const PER: u64 = 2_000;
    let consumers: Vec<_> = (0..3)
        .map(|i| {
            let mut c = queue.consumer(&format!("c{i}")).unwrap();
            std::thread::spawn(move || {
                let mut seen = 0;
                while seen < 2 * PER {
                    match c.next_timeout(Duration::from_secs(10)).unwrap() {
                        Some(r) => {
                            assert_eq!(r.offset(), seen);
                            seen += 1;
                        }
                        None => panic!("a wake-up was lost at offset {seen}"),
                    }
                }
            })
        })
        .collect();
    let producers: Vec<_> = (0..2)
        .map(|_| {
            let q = Arc::clone(&queue);
            std::thread::spawn(move || {
                for _ in 0..PER {
                    q.append(b"x").unwrap();
                }
            })
        })
        .collect();
    for t in producers.into_iter().chain(consumers) {
        t.join().unwrap();
    }
}

#[test]
fn corrupted_consumer_journal_falls_back_never_forward() {
    let disk = SimDisk::new(3);
    let journal = sim_dir().join("consumers.journal");
    {
        let queue = Queue::builder(sim_dir()).simulated(&disk).open().unwrap();
        queue.append_batch(&(0..100u8).map(|_| Record::new(b"r")).collect::<Vec<_>>()).unwrap();
        let mut c = queue.consumer("c").unwrap();
        for pos in [10, 20, 30, 40] {
            c.commit(pos).unwrap();
        }
    }
    let clean = disk.read_file(&journal).unwrap();
    // Flip every bit of the used part, one at a time.
    let used = clean.iter().rposition(|&b| b != 0).unwrap() + 1;
    let mut outcomes = std::collections::BTreeSet::new();
    for byte in 0..used as u64 {
        for bit in [0, 5] {
            disk.write_file(&journal, &clean);
            disk.flip_bit(&journal, byte, bit);
            let queue = Queue::builder(sim_dir()).simulated(&disk).open().unwrap();
            let pos = queue.consumers().first().map(|c| c.position);
            assert!(pos.is_none_or(|p| p <= 40), "byte {byte}: jumped ahead to {pos:?}");
            if pos != Some(40) {
                assert!(queue.stats().consumer_journal_damaged, "byte {byte}: damage not reported");
            }
            outcomes.insert(pos);
            // The queue keeps working and the next commit lands.
            let mut c = queue.consumer("c").unwrap();
            c.commit(41).unwrap();
            drop(c);
            drop(queue);
            let queue = Queue::builder(sim_dir()).simulated(&disk).open().unwrap();
            assert_eq!(queue.consumers()[0].position, 41, "byte {byte}");
        }
    }
    assert!(outcomes.contains(&Some(30)) && outcomes.contains(&None), "{outcomes:?}");
}

#[test]
fn consumer_commit_on_a_full_disk() {
    let disk = SimDisk::new(4);
    let queue = Queue::builder(sim_dir()).simulated(&disk).open().unwrap();
    queue.append_batch(&[Record::new(b"a"), Record::new(b"b"), Record::new(b"c")]).unwrap();
    let mut c = queue.consumer("c").unwrap();
    c.commit(1).unwrap();
    // The journal has zero-filled room: commits overwrite it, the file never grows.
    let journal = sim_dir().join("consumers.journal");
    let len = disk.read_file(&journal).unwrap().len();
    c.commit(2).unwrap();
    assert_eq!(disk.read_file(&journal).unwrap().len(), len);
    // A failing journal write is a typed error; the position is old or new.
    disk.inject(Fault {
        path_contains: Some("journal".into()),
        ..Fault::new(FaultOp::Write, FaultKind::NoSpace)
    });
    assert!(matches!(c.commit(3), Err(Error::DiskFull { .. })));
    drop(c);
    drop(queue);
    disk.crash();
    let queue = Queue::builder(sim_dir()).simulated(&disk).open().unwrap();
    let pos = queue.consumers()[0].position;
    assert!(pos == 2 || pos == 3, "{pos}");
}

#[test]
fn unknown_consumers_and_second_handles_are_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let queue = Queue::open(dir.path()).unwrap();
    let c = queue.consumer("one").unwrap();
    assert!(matches!(queue.consumer("one"), Err(Error::InUse { .. })));
    assert!(matches!(queue.delete_consumer("one"), Err(Error::InUse { .. })));
    assert!(matches!(queue.delete_consumer("nobody"), Err(Error::UnknownConsumer { .. })));
    assert!(matches!(queue.consumer("bad/name"), Err(Error::InvalidOption { .. })));
    drop(c);
    queue.consumer("two").unwrap();
    let names: Vec<_> = queue.consumers().into_iter().map(|c| c.name).collect();
    assert_eq!(names, ["one", "two"]);
    queue.delete_consumer("one").unwrap();
    drop(queue);
    let queue = Queue::open(dir.path()).unwrap();
    let names: Vec<_> = queue.consumers().into_iter().map(|c| c.name).collect();
    assert_eq!(names, ["two"]);
    assert_eq!(queue.reset_consumer("two", StartAt::Latest).unwrap(), 0);
}

#[test]
fn journal_compaction_keeps_every_position() {
    let dir = tempfile::tempdir().unwrap();
    let queue = Queue::builder(dir.path()).durability(Durability::Os).open().unwrap();
    queue.append_batch(&(0..10).map(|_| Record::new(b"r")).collect::<Vec<_>>()).unwrap();
    queue.flush().unwrap();
    let mut cs: Vec<_> = (0..5).map(|i| queue.consumer(&format!("c{i}")).unwrap()).collect();
    // Far more commits than the journal's room: it is rewritten many times.
    for round in 0..3_000u64 {
        let i = (round % 5) as usize;
        cs[i].commit_with(round % 11, Durability::Os).unwrap();
    }
    let expect: Vec<u64> = cs.iter().map(|c| c.committed()).collect();
    drop(cs);
    queue.close().unwrap();
    let len = std::fs::metadata(dir.path().join("consumers.journal")).unwrap().len();
    assert!(len < 256 << 10, "journal grew to {len}");
    let queue = Queue::open(dir.path()).unwrap();
    let got: Vec<u64> = queue.consumers().iter().map(|c| c.position).collect();
    assert_eq!(got, expect);
}

#[test]
fn retention_by_size_and_age_removes_oldest_segments() {
    let clock = ManualClock::new(0);
    let dir = tempfile::tempdir().unwrap();
    let queue = Queue::builder(dir.path())
        .segment_bytes(4096)
        .batch_bytes_max(512)
        .preallocate_bytes(0)
        .clock(&clock)
        .retention(Retention::default().max_bytes(16 << 10).max_age(Duration::from_secs(3600)))
        .open()
        .unwrap();
    for _ in 0..400 {
        queue.append_with(&[7u8; 100], Durability::Os).unwrap();
    }
    queue.flush().unwrap();
    queue.apply_retention().unwrap();
    let s = queue.stats();
    assert!(s.bytes_on_disk <= (16 << 10) + 4096, "{s:?}");
    assert!(s.segments_removed > 0 && queue.first_offset() > 0);
    // Readers still find every record that is left.
    let mut r = queue.read_from(queue.first_offset()).unwrap();
    let mut n = 0;
    while r.next().unwrap().is_some() {
        n += 1;
    }
    assert_eq!(n, 400 - queue.first_offset());
    // By age: nothing is an hour old yet; then everything sealed is.
    let before = queue.stats().segments;
    assert_eq!(queue.apply_retention().unwrap(), 0);
    clock.advance(Duration::from_secs(3601));
    queue.apply_retention().unwrap();
    assert!(queue.stats().segments < before);
    assert_eq!(queue.stats().segments, 1);
}

#[test]
fn retention_in_queue_mode_keeps_what_consumers_need() {
    let dir = tempfile::tempdir().unwrap();
    let queue = Queue::builder(dir.path())
        .segment_bytes(4096)
        .batch_bytes_max(512)
        .retention(Retention::default().queue_mode(true).max_bytes(4096))
        .open()
        .unwrap();
    let mut slow = queue.consumer("slow").unwrap();
    let mut fast = queue.consumer("fast").unwrap();
    for _ in 0..200 {
        queue.append_with(&[1u8; 100], Durability::Os).unwrap();
    }
    queue.flush().unwrap();
    fast.commit(200).unwrap();
    slow.commit(50).unwrap();
    queue.apply_retention().unwrap();
    // The slow consumer's next record is still there, even over the size limit.
    assert!(queue.first_offset() <= 50 && queue.first_offset() > 0, "{}", queue.first_offset());
    slow.seek(50);
    assert_eq!(slow.next_timeout(Duration::ZERO).unwrap().unwrap().offset(), 50);
    slow.commit(200).unwrap();
    queue.apply_retention().unwrap();
    assert_eq!(queue.stats().segments, 1);
}

#[test]
fn backpressure_full_queue_errors_or_waits() {
    let dir = tempfile::tempdir().unwrap();
    let queue = Queue::builder(dir.path())
        .segment_bytes(4096)
        .preallocate_bytes(0)
        .max_bytes(3 * 4096)
        .open()
        .unwrap();
    let mut n = 0u64;
    let err = loop {
        match queue.append(&[1u8; 200]) {
            Ok(_) => n += 1,
            Err(e) => break e,
        }
        assert!(n < 1000, "never full");
    };
    assert!(matches!(err, Error::Full { max_bytes: 12288 }), "{err}");
    assert!(!queue.stats().poisoned);
    // Nothing is corrupted: every appended record reads back, and the queue reopens.
    assert_eq!(queue.next_offset(), n);
    drop(queue);
    let queue = Arc::new(
        Queue::builder(dir.path())
            .segment_bytes(4096)
            .preallocate_bytes(0)
            .max_bytes(3 * 4096)
            .when_full(WhenFull::Wait(Duration::from_secs(10)))
            .open()
            .unwrap(),
    );
    assert_eq!(queue.next_offset(), n);
    let q = Arc::clone(&queue);
    let waiting = std::thread::spawn(move || q.append(&[2u8; 200]));
    std::thread::sleep(Duration::from_millis(50));
    assert!(!waiting.is_finished(), "the append waits for room");
    queue.remove_before(n).unwrap();
    assert_eq!(waiting.join().unwrap().unwrap(), n);
}

#[cfg(feature = "async")]
#[test]
fn consumer_stream_yields_records_as_they_come() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let queue = Arc::new(Queue::open(dir.path()).unwrap());
    let mut stream = queue.consumer("s").unwrap().into_stream();
    let q = Arc::clone(&queue);
    rt.block_on(async move {
        let producer = tokio::spawn(async move {
            for i in 0..50u8 {
                q.append_async(&[i]).await.unwrap();
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        });
        for i in 0..50u8 {
            let r = std::future::poll_fn(|cx| std::pin::Pin::new(&mut stream).poll_next_record(cx))
                .await
                .unwrap()
                .unwrap();
            assert_eq!((r.offset, r.value), (i as u64, vec![i]));
        }
        stream.consumer_mut().commit_position().unwrap();
        producer.await.unwrap();
    });
    assert_eq!(queue.consumers()[0].position, 50);
}

/// The first offset whose timestamp is at or after `t`, by reading everything.
fn brute_force_offset_for(queue: &Queue, t: u64) -> u64 {
    let mut r = queue.read_from(queue.first_offset()).unwrap();
    while let Some(rec) = r.next().unwrap() {
        if rec.timestamp_ms() >= t {
            return rec.offset();
        }
    }
    queue.next_offset()
}

#[test]
fn seek_by_timestamp_uses_a_time_index_per_segment_rebuilt_when_damaged() {
    let disk = SimDisk::new(9);
    let open = || {
        Queue::builder(sim_dir()).simulated(&disk).segment_bytes(8192).batch_bytes_max(600).open().unwrap()
    };
    let mut rng = common::Rng::new(9);
    {
        let queue = open();
        // Mostly increasing timestamps, some going backwards (set by the caller).
        let mut ts = 10_000u64;
        for _ in 0..1500 {
            ts = if rng.chance(10) { ts.saturating_sub(rng.below(500)) } else { ts + rng.below(40) };
            queue.append_record(&Record::new(&[3u8; 60]).timestamp_ms(ts)).unwrap();
        }
        assert!(queue.stats().segments > 8);
    }
    let tix = |disk: &SimDisk| -> Vec<std::path::PathBuf> {
        disk.files().into_iter().filter(|p| p.extension().is_some_and(|e| e == "tix")).collect()
    };
    let written = tix(&disk);
    assert!(written.len() > 8, "a time index per sealed segment: {written:?}");
    let targets: Vec<u64> = (0..60).map(|_| 9_000 + rng.below(40_000)).chain([0, 10_000, u64::MAX]).collect();
    let check = |queue: &Queue| {
        for &t in &targets {
            assert_eq!(queue.offset_for_timestamp(t).unwrap(), brute_force_offset_for(queue, t), "t = {t}");
        }
    };
    let queue = open();
    check(&queue);
    // Once each segment's newest timestamp is known, a search reads one time
    // index and about one index interval of one segment.
    let before = disk.ops();
    let t = targets[7];
    queue.offset_for_timestamp(t).unwrap();
    let ops = disk.ops() - before;
    assert!(ops <= 6, "a warm search took {ops} storage calls");
    drop(queue);
    // Damaged, missing and stale time indexes are rebuilt and give the same answers.
    disk.flip_bit(&written[1], 40, 2);
    disk.remove(&written[2]);
    disk.truncate_file(&written[3], 20);
    let queue = open();
    check(&queue);
    assert_eq!(tix(&disk).len(), written.len(), "rebuilt files written back");
    // Retention removes a segment's time index with it.
    queue.remove_before(queue.next_offset()).unwrap();
    assert!(tix(&disk).len() <= 1, "{:?}", tix(&disk));
}

#[test]
fn seek_by_timestamp_in_a_damaged_sealed_segment_is_corrupt_not_a_wrong_answer() {
    let disk = SimDisk::new(10);
    let open = || {
        Queue::builder(sim_dir()).simulated(&disk).segment_bytes(8192).batch_bytes_max(600).open().unwrap()
    };
    {
        let queue = open();
        for i in 0..400u64 {
            queue.append_record(&Record::new(&[5u8; 60]).timestamp_ms(1_000 + i)).unwrap();
        }
        assert!(queue.stats().segments > 3);
    }
    let mut segs: Vec<_> =
        disk.files().into_iter().filter(|p| p.extension().is_some_and(|e| e == "seg")).collect();
    segs.sort();
    // The second segment: its time index gone, a bit flipped in the middle of its data.
    let seg = &segs[1];
    disk.remove(&seg.with_extension("tix"));
    let len = disk.read_file(seg).unwrap().len() as u64;
    disk.flip_bit(seg, len / 2, 3);
    let queue = open();
    // Its first record's time: the search must read (rebuild) its time index.
    let base: u64 = seg.file_stem().unwrap().to_str().unwrap().parse().unwrap();
    let err = queue.offset_for_timestamp(1_000 + base + 1).unwrap_err();
    assert!(matches!(err, walq::Error::Corrupt { .. }), "{err:?}");
    assert!(
        !disk.files().contains(&seg.with_extension("tix")),
        "no time index written from a damaged segment"
    );
}

#[cfg(feature = "async")]
#[test]
fn many_tasks_waiting_for_offsets_are_all_woken() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let queue = Arc::new(Queue::builder(dir.path()).durability(Durability::Os).open().unwrap());
    rt.block_on(async {
        let waiters: Vec<_> = (0..200u64)
            .map(|i| {
                let q = Arc::clone(&queue);
                tokio::spawn(async move { q.wait_visible_async(i).await })
            })
            .collect();
        let q = Arc::clone(&queue);
        let producer = std::thread::spawn(move || {
            for _ in 0..200 {
                q.append(b"x").unwrap();
                std::thread::sleep(Duration::from_micros(200));
            }
        });
        for (i, w) in waiters.into_iter().enumerate() {
            let visible = tokio::time::timeout(Duration::from_secs(10), w).await.expect("woken").unwrap();
            assert!(visible > i as u64);
        }
        producer.join().unwrap();
    });
}
