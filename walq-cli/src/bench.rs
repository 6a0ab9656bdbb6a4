//! `walq bench`: the standard workloads on a scratch queue, beside the disk's
//! own limits measured in the same run, so that each walq figure can be read
//! against the ceiling it is up against. `walq bench --http` runs the HTTP
//! sidecar's workloads instead (see `bench_http`), beside the same disk probe.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::Args;
use serde_json::{Value, json};
use walq::{Durability, Queue, Record};

use crate::write::DurabilityArg;
use crate::{CmdResult, Failure, output};

/// Bytes the bulk workload writes at most, so that a fast disk does not fill
/// the scratch directory; the log it leaves is the one reopened.
const BULK_BYTES_MAX: u64 = 512 << 20;
/// Bytes of one `append_batch` call in the bulk workload.
const BULK_CALL_BYTES: usize = 1 << 20;
/// Bytes written per fdatasync when measuring the disk's bandwidth.
const DISK_BLOCK_BYTES: usize = 1 << 20;
/// Bytes of the disk's bandwidth probe, at most.
const DISK_PROBE_BYTES_MAX: u64 = 256 << 20;

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Where to make the scratch queue directories (a fresh subdirectory, removed afterwards).
    #[arg(long, value_name = "DIR")]
    pub(crate) dir: Option<PathBuf>,
    /// Threads in the many-producers workload (the library bench only).
    #[arg(long, default_value_t = 8)]
    pub(crate) producers: usize,
    /// Bytes of each record's value.
    #[arg(long, default_value_t = 1024)]
    pub(crate) record_size: usize,
    /// Seconds each workload runs (the whole run takes about seven times this;
    /// with --http about eight times this, plus the cold starts).
    #[arg(long, default_value_t = 2.0)]
    pub(crate) duration: f64,
    /// Durability of the appends (and of the reads' visibility); with --http,
    /// sent as the Walq-Durability header of every produce.
    #[arg(long, value_enum, default_value_t = DurabilityArg::Sync)]
    pub(crate) durability: DurabilityArg,
    /// Print JSON instead of the table.
    #[arg(long)]
    pub(crate) json: bool,
    /// Bench the HTTP sidecar instead of the library: durable produces from
    /// 1, 8 and 64 keep-alive clients, batch produces, produce to group fetch,
    /// request/reply, cold start and memory with idle long-polls, each beside
    /// the disk's limits and the performance targets (pass/fail). It starts
    /// its own `walq serve` on loopback unless --url is given.
    #[arg(long)]
    pub(crate) http: bool,
    #[command(flatten)]
    pub(crate) http_options: crate::bench_http::HttpOptions,
}

/// Latencies in nanoseconds, summarized.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Summary {
    pub(crate) count: u64,
    pub(crate) per_sec: f64,
    pub(crate) p50_us: f64,
    pub(crate) p99_us: f64,
}

pub(crate) fn summarize(mut nanos: Vec<u64>, elapsed: Duration) -> Summary {
    nanos.sort_unstable();
    let at = |p: f64| {
        if nanos.is_empty() {
            0.0
        } else {
            nanos[((nanos.len() - 1) as f64 * p).round() as usize] as f64 / 1e3
        }
    };
    Summary {
        count: nanos.len() as u64,
        per_sec: nanos.len() as f64 / elapsed.as_secs_f64().max(1e-9),
        p50_us: at(0.50),
        p99_us: at(0.99),
    }
}

/// One row of the result table.
struct Row {
    name: String,
    walq: String,
    limit: String,
    ratio: String,
    json: Value,
}

pub fn run(args: &BenchArgs) -> CmdResult {
    if !(args.duration > 0.0 && args.duration <= 3600.0) {
        return Err(Failure::Usage("--duration must be between 0 and 3600 seconds".into()));
    }
    if args.producers == 0 || args.producers > 4096 {
        return Err(Failure::Usage("--producers must be 1 to 4096".into()));
    }
    if args.record_size > BULK_CALL_BYTES {
        return Err(Failure::Usage(format!("--record-size must be at most {BULK_CALL_BYTES}")));
    }
    let d = Duration::from_secs_f64(args.duration);
    if args.http {
        return crate::bench_http::run(args, d);
    }
    let durability = Durability::from(args.durability);
    let parent = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    let scratch = tempfile::Builder::new().prefix("walq-bench-").tempdir_in(&parent).map_err(|e| {
        Failure::Walq(walq::Error::Io { op: "create directory", path: parent.clone(), source: e })
    })?;
    let root = scratch.path();
    let say = |what: &str| {
        if !args.json {
            eprintln!("  {what} ...");
        }
    };
    if !args.json {
        eprintln!(
            "walq bench in {}: {} B records, {:?}, {} producers, {:.1} s per workload",
            root.display(),
            args.record_size,
            durability,
            args.producers,
            args.duration
        );
    }

    say("the disk: 4 KiB write + fdatasync, then 1 MiB writes + fdatasync");
    let disk = disk_limits(&root.join("disk-probe"), d / 2)?;
    let sync_p50 = disk.sync.p50_us;
    let mut rows = Vec::new();
    let value = vec![b'x'; args.record_size];

    say("one durable producer");
    let q = Queue::builder(root.join("one")).durability(durability).open()?;
    let one = producers(&q, 1, &value, d)?;
    q.close()?;
    rows.push(Row {
        name: "one producer, append".into(),
        walq: format!("{:.0}/s, p50 {:.0} µs, p99 {:.0} µs", one.per_sec, one.p50_us, one.p99_us),
        limit: format!("fdatasync p50 {sync_p50:.0} µs"),
        ratio: ratio(one.p50_us, sync_p50, "latency"),
        json: json!({ "name": "one_producer", "appends_per_sec": one.per_sec, "p50_us": one.p50_us, "p99_us": one.p99_us,
                      "disk_fdatasync_p50_us": sync_p50, "latency_ratio": one.p50_us / sync_p50.max(1e-9) }),
    });

    say(&format!("{} durable producers", args.producers));
    let q = Queue::builder(root.join("many")).durability(durability).open()?;
    let many = producers(&q, args.producers, &value, d)?;
    let per_sync = q.stats().records_per_sync_mean;
    q.close()?;
    let one_sync_per_record = 1e6 / sync_p50.max(1e-9);
    rows.push(Row {
        name: format!("{} producers, append", args.producers),
        walq: format!(
            "{:.0}/s, p50 {:.0} µs, p99 {:.0} µs, {per_sync:.1} records/sync",
            many.per_sec, many.p50_us, many.p99_us
        ),
        limit: format!("1 fdatasync each: {one_sync_per_record:.0}/s"),
        ratio: ratio(many.per_sec, one_sync_per_record, "throughput"),
        json: json!({ "name": "many_producers", "producers": args.producers, "appends_per_sec": many.per_sec,
                      "p50_us": many.p50_us, "p99_us": many.p99_us, "records_per_sync": per_sync,
                      "one_fdatasync_per_record_per_sec": one_sync_per_record,
                      "throughput_ratio": many.per_sec / one_sync_per_record }),
    });

    say("bulk appends (append_batch, 1 MiB per call)");
    let bulk_dir = root.join("bulk");
    let q = Queue::builder(&bulk_dir).durability(durability).open()?;
    let per_call = (BULK_CALL_BYTES / args.record_size.max(1)).max(1);
    let records: Vec<Record<'_>> = (0..per_call).map(|_| Record::new(&value)).collect();
    let started = Instant::now();
    let mut written = 0u64;
    while started.elapsed() < d && written < BULK_BYTES_MAX {
        q.append_batch_with(&records, durability)?;
        written += (per_call * args.record_size) as u64;
    }
    q.flush()?;
    let bulk_secs = started.elapsed().as_secs_f64();
    let bulk_mib = written as f64 / (1u64 << 20) as f64 / bulk_secs;
    rows.push(Row {
        name: "bulk append_batch".into(),
        walq: format!("{bulk_mib:.0} MiB/s ({} written)", output::size(written)),
        limit: format!("{:.0} MiB/s sequential", disk.mib_per_sec),
        ratio: ratio(bulk_mib, disk.mib_per_sec, "throughput"),
        json: json!({ "name": "bulk_append_batch", "mib_per_sec": bulk_mib, "bytes": written,
                      "disk_mib_per_sec": disk.mib_per_sec, "throughput_ratio": bulk_mib / disk.mib_per_sec.max(1e-9) }),
    });

    say("sequential scan");
    let started = Instant::now();
    let (mut n, mut bytes) = (0u64, 0u64);
    let mut reader = q.read_from(q.first_offset())?;
    while let Some(r) = reader.next()? {
        n += 1;
        bytes += r.value().len() as u64;
        if n.is_multiple_of(4096) && started.elapsed() >= d {
            break;
        }
    }
    drop(reader);
    let scan_secs = started.elapsed().as_secs_f64().max(1e-9);
    let (scan_rate, scan_mib) = (n as f64 / scan_secs, bytes as f64 / (1u64 << 20) as f64 / scan_secs);
    rows.push(Row {
        name: "sequential scan".into(),
        walq: format!("{scan_rate:.0} records/s, {scan_mib:.0} MiB/s"),
        limit: "page cache (no disk read)".into(),
        ratio: "-".into(),
        json: json!({ "name": "sequential_scan", "records_per_sec": scan_rate, "mib_per_sec": scan_mib, "records": n }),
    });
    let bulk_records = q.next_offset();
    q.close()?;

    say("end-to-end latency to a named consumer");
    let e2e = end_to_end(&root.join("e2e"), durability, args.record_size.max(8), d)?;
    rows.push(Row {
        name: "append to consumer".into(),
        walq: format!("p50 {:.0} µs, p99 {:.0} µs ({} records)", e2e.p50_us, e2e.p99_us, e2e.count),
        limit: format!("fdatasync p50 {sync_p50:.0} µs"),
        ratio: ratio(e2e.p50_us, sync_p50, "latency"),
        json: json!({ "name": "end_to_end", "p50_us": e2e.p50_us, "p99_us": e2e.p99_us, "records": e2e.count,
                      "disk_fdatasync_p50_us": sync_p50, "latency_ratio": e2e.p50_us / sync_p50.max(1e-9) }),
    });

    say("reopening the bulk log");
    let started = Instant::now();
    let q = Queue::builder(&bulk_dir).durability(durability).open()?;
    let open_ms = started.elapsed().as_secs_f64() * 1e3;
    let segments = q.stats().segments;
    drop(q);
    rows.push(Row {
        name: "reopen a large log".into(),
        walq: format!("{open_ms:.2} ms ({} in {segments} segments)", output::size(written)),
        limit: "-".into(),
        ratio: "-".into(),
        json: json!({ "name": "reopen", "ms": open_ms, "bytes": written, "records": bulk_records, "segments": segments }),
    });

    if args.json {
        let v = json!({
            "config": { "record_size": args.record_size, "producers": args.producers,
                        "duration_secs": args.duration, "durability": format!("{durability:?}") },
            "disk": { "fdatasync_4k_p50_us": disk.sync.p50_us, "fdatasync_4k_p99_us": disk.sync.p99_us,
                      "sequential_mib_per_sec": disk.mib_per_sec },
            "workloads": rows.iter().map(|r| r.json.clone()).collect::<Vec<_>>(),
        });
        return print_json(&v);
    }
    let mut out = std::io::stdout().lock();
    use std::io::Write as _;
    writeln!(out, "\n{}\n", disk.summary_line())?;
    let mut table = vec![["workload", "walq", "the disk's limit", "ratio"].map(String::from).to_vec()];
    table.extend(rows.into_iter().map(|r| vec![r.name, r.walq, r.limit, r.ratio]));
    output::table(&mut out, &table, &[])?;
    writeln!(
        out,
        "\nratio: latency as a multiple of one fdatasync (lower is better); throughput as a multiple of the limit"
    )?;
    Ok(())
}

fn ratio(walq: f64, limit: f64, what: &str) -> String {
    if limit <= 0.0 { "-".into() } else { format!("{:.2}x {what}", walq / limit) }
}

/// `threads` producers append `value` until `d` has passed; every append's latency.
fn producers(q: &Queue, threads: usize, value: &[u8], d: Duration) -> Result<Summary, Failure> {
    let started = Instant::now();
    let results: Vec<Result<Vec<u64>, walq::Error>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let mut lat = Vec::new();
                    while started.elapsed() < d {
                        let t = Instant::now();
                        q.append(value)?;
                        lat.push(t.elapsed().as_nanos() as u64);
                    }
                    Ok(lat)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Ok(Vec::new()))).collect()
    });
    let elapsed = started.elapsed();
    let mut all = Vec::new();
    for r in results {
        all.extend(r?);
    }
    Ok(summarize(all, elapsed))
}

/// How long the end-to-end consumer waits in one `next_timeout` call; it
/// returns as soon as a record is visible, so this only bounds how late it
/// sees the producer finish.
const E2E_WAIT: Duration = Duration::from_millis(100);

/// A producer appends records stamped with the time since `t0` (the first 8
/// bytes of the value) before each append; a named consumer (`bench-e2e`)
/// on another thread receives them with `next_timeout`, which wakes when an
/// append makes a record visible, as a user's consumer would. Measured: from
/// before the (durable) append call to the consumer holding the record.
fn end_to_end(
    dir: &std::path::Path,
    durability: Durability,
    size: usize,
    d: Duration,
) -> Result<Summary, Failure> {
    let q = Queue::builder(dir).durability(durability).open()?;
    let t0 = Instant::now();
    let done = AtomicBool::new(false);
    let result = std::thread::scope(|s| -> Result<Vec<u64>, walq::Error> {
        // Created before the producer starts, so it begins at the first record.
        let mut consumer = q.consumer("bench-e2e")?;
        let done = &done;
        let consumer = s.spawn(move || -> Result<Vec<u64>, walq::Error> {
            let mut lat = Vec::new();
            loop {
                // Read before waiting: once the producer is done, everything
                // it appended is visible, so an empty wait then is the end.
                let finished = done.load(Ordering::Acquire);
                match consumer.next_timeout(E2E_WAIT)? {
                    Some(r) => {
                        let now = t0.elapsed().as_nanos() as u64;
                        let mut stamp = [0u8; 8];
                        stamp.copy_from_slice(&r.value()[..8]);
                        lat.push(now.saturating_sub(u64::from_le_bytes(stamp)));
                    }
                    None if finished => return Ok(lat),
                    None => {}
                }
            }
        });
        let mut value = vec![b'x'; size];
        let produced = (|| -> Result<(), walq::Error> {
            while t0.elapsed() < d {
                let stamp = t0.elapsed().as_nanos() as u64;
                value[..8].copy_from_slice(&stamp.to_le_bytes());
                q.append(&value)?;
            }
            q.flush()
        })();
        done.store(true, Ordering::Release);
        let lat = consumer.join().unwrap_or_else(|_| Ok(Vec::new()));
        produced?;
        lat
    });
    let lat = result?;
    let elapsed = t0.elapsed();
    q.close()?;
    Ok(summarize(lat, elapsed))
}

pub(crate) struct Disk {
    /// 4 KiB write + fdatasync.
    pub(crate) sync: Summary,
    /// 1 MiB writes + fdatasync.
    pub(crate) mib_per_sec: f64,
}

/// The disk's own limits, in the scratch directory: 4 KiB write + fdatasync
/// (latency), then 1 MiB writes + fdatasync (bandwidth), each for about `d`.
/// Prints `v` on stdout, pretty, with a final newline (the `--json` output).
pub(crate) fn print_json(v: &serde_json::Value) -> CmdResult {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, v).map_err(std::io::Error::from)?;
    std::io::Write::write_all(&mut out, b"\n")?;
    Ok(())
}

impl Disk {
    /// One line on what the disk measured, for the tables' heading.
    pub(crate) fn summary_line(&self) -> String {
        format!(
            "the disk: 4 KiB write + fdatasync p50 {:.0} µs, p99 {:.0} µs; 1 MiB writes + fdatasync {:.0} MiB/s",
            self.sync.p50_us, self.sync.p99_us, self.mib_per_sec
        )
    }
}

pub(crate) fn disk_limits(path: &std::path::Path, d: Duration) -> Result<Disk, Failure> {
    use std::io::Write;
    let io_err =
        |e: std::io::Error| Failure::Walq(walq::Error::Io { op: "disk probe", path: path.into(), source: e });
    let mut f = std::fs::File::create(path).map_err(io_err)?;
    let block = vec![0x5au8; 4096];
    let mut lat = Vec::new();
    let started = Instant::now();
    while started.elapsed() < d && lat.len() < 100_000 {
        let t = Instant::now();
        f.write_all(&block).map_err(io_err)?;
        f.sync_data().map_err(io_err)?;
        lat.push(t.elapsed().as_nanos() as u64);
    }
    let sync = summarize(lat, started.elapsed());
    drop(f);
    let mut f = std::fs::File::create(path).map_err(io_err)?;
    let block = vec![0xa5u8; DISK_BLOCK_BYTES];
    let started = Instant::now();
    let mut written = 0u64;
    while started.elapsed() < d && written < DISK_PROBE_BYTES_MAX {
        f.write_all(&block).map_err(io_err)?;
        f.sync_data().map_err(io_err)?;
        written += DISK_BLOCK_BYTES as u64;
    }
    let mib_per_sec = written as f64 / (1u64 << 20) as f64 / started.elapsed().as_secs_f64().max(1e-9);
    drop(f);
    std::fs::remove_file(path).map_err(io_err)?;
    Ok(Disk { sync, mib_per_sec })
}
