//! Async appends (feature `async`): tasks await durability without blocking
//! a runtime thread, share fdatasyncs through the background flusher, lose
//! nothing acknowledged to a power cut right after, and all fail (then stay
//! failed) when a sync fails.
//!
//! Method: tokio runtimes, multi-threaded and single-threaded, over the
//! simulated disk with slow syncs and injected errors.
#![cfg(feature = "async")]

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::{read_all, sim_dir, value_for};
use walq::{Error, Fault, FaultKind, FaultOp, Queue, SimDisk};

fn queue(disk: &SimDisk) -> Arc<Queue> {
    Arc::new(Queue::builder(sim_dir()).simulated(disk).segment_bytes(64 << 10).open().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundreds_of_tasks_share_syncs_and_survive_a_crash_right_after() {
    let disk = SimDisk::new(1);
    disk.set_sync_delay(Duration::from_micros(500));
    let q = queue(&disk);
    let tasks: Vec<_> = (0..256u64)
        .map(|t| {
            let q = Arc::clone(&q);
            tokio::spawn(async move {
                let mut acked = Vec::new();
                for i in 0..10 {
                    let v = value_for(i, t, 64);
                    let o = q.append_async(&v).await.unwrap();
                    acked.push((o, v));
                }
                acked
            })
        })
        .collect();
    let mut acked = BTreeMap::new();
    for t in tasks {
        for (o, v) in t.await.unwrap() {
            assert!(acked.insert(o, v).is_none(), "offset {o} twice");
        }
    }
    assert_eq!(acked.keys().copied().collect::<Vec<_>>(), (0..2560).collect::<Vec<_>>());
    let stats = q.stats();
    assert!(stats.records_per_sync_mean > 4.0, "{stats:?}");
    disk.crash_lose_unsynced();
    drop(q);
    let q = queue(&disk);
    assert_eq!(read_all(&q).into_iter().collect::<BTreeMap<_, _>>(), acked);
}

#[tokio::test(flavor = "current_thread")]
async fn awaiting_durability_does_not_block_a_single_threaded_runtime() {
    // With one runtime thread, a blocking append would stall the ticker.
    let disk = SimDisk::new(2);
    disk.set_sync_delay(Duration::from_millis(2));
    let q = queue(&disk);
    let ticks = Arc::new(AtomicU64::new(0));
    let ticker = {
        let ticks = Arc::clone(&ticks);
        tokio::spawn(async move {
            loop {
                ticks.fetch_add(1, Ordering::Relaxed);
                tokio::task::yield_now().await;
            }
        })
    };
    let appends: Vec<_> = (0..20u64)
        .map(|i| {
            let q = Arc::clone(&q);
            tokio::spawn(async move { q.append_async(&value_for(i, 0, 10)).await.unwrap() })
        })
        .collect();
    let mut offsets = Vec::new();
    for a in appends {
        offsets.push(a.await.unwrap());
    }
    ticker.abort();
    offsets.sort_unstable();
    assert_eq!(offsets, (0..20).collect::<Vec<_>>());
    assert!(ticks.load(Ordering::Relaxed) > 100, "the runtime thread was blocked while syncs ran");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_sync_fails_every_waiting_task_and_poisons_the_queue() {
    let disk = SimDisk::new(3);
    disk.set_sync_delay(Duration::from_micros(300));
    let q = queue(&disk);
    q.append_async(b"before").await.unwrap();
    disk.inject(Fault::new(FaultOp::Sync, FaultKind::Eio));
    let tasks: Vec<_> = (0..32u64)
        .map(|i| {
            let q = Arc::clone(&q);
            tokio::spawn(async move { q.append_async(&value_for(i, 1, 10)).await })
        })
        .collect();
    let mut original = 0;
    for t in tasks {
        match t.await.unwrap() {
            Err(Error::Io { source, .. }) if source.raw_os_error() == Some(5) => original += 1,
            Err(Error::Poisoned) => {}
            other => panic!("a task was acknowledged after a failed sync: {other:?}"),
        }
    }
    assert!(original >= 1);
    assert!(matches!(q.append_async(b"after").await, Err(Error::Poisoned)));
}
