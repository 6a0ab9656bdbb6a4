//! A tokio service appending durably from many tasks: each `append_async`
//! resolves once an fdatasync covers the record, without blocking a runtime
//! thread, and the tasks share syncs. Run with
//! `cargo run --release --features async --example tokio_producers [-- DIR]`.

use std::sync::Arc;
use std::time::Instant;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let tmp = tempfile::tempdir()?;
    let dir = std::env::args_os().nth(1).map_or_else(|| tmp.path().to_path_buf(), Into::into);
    let queue = Arc::new(walq::Queue::open(&dir)?);
    let (tasks, per_task) = (256, 100);
    let started = Instant::now();
    let handles: Vec<_> = (0..tasks)
        .map(|t| {
            let queue = Arc::clone(&queue);
            tokio::spawn(async move {
                for i in 0..per_task {
                    let body = format!("task {t} event {i}");
                    queue.append_async(body.as_bytes()).await?;
                }
                Ok::<_, walq::Error>(())
            })
        })
        .collect();
    for h in handles {
        h.await??;
    }
    let elapsed = started.elapsed();
    let stats = queue.stats();
    println!(
        "{} durable appends from {tasks} tasks in {elapsed:.2?}: {:.0}/s, {} syncs, {:.1} records per sync, \
         sync p50 {} us, p99 {} us",
        stats.appends,
        stats.appends as f64 / elapsed.as_secs_f64(),
        stats.syncs,
        stats.records_per_sync_mean,
        stats.sync_micros_p50,
        stats.sync_micros_p99,
    );
    Ok(())
}
