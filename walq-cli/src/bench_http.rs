//! `walq bench --http`: the HTTP sidecar (`walq serve`) under load from
//! keep-alive HTTP/1.1 clients on loopback, beside the disk's own limits
//! measured in the same run (`bench::disk_limits`, the library bench's probe)
//! and the performance targets, each with pass or fail.
//!
//! Method. By default the bench starts its own server: this very binary as
//! `walq serve` on a data directory in the scratch directory (so on the disk
//! the probe measured), on ephemeral loopback ports (read from the line it
//! prints). Every client is one TCP connection (`TCP_NODELAY`) with hyper's
//! low-level HTTP/1.1 client, doing request after request (closed loop) on a
//! tokio runtime in this process. Records per fdatasync come from the
//! server's `/metrics`: the queue's `walq_appends_total` and
//! `walq_flushes_total` before and after the workload. Each workload uses a
//! queue of its own, named `bench-<pid>-<workload>`. Workloads:
//!
//! - durable produce: `POST /v1/queues/{q}/records` of `--record-size`
//!   bytes from 1, 8 and 64 clients (`--clients`);
//! - batch produce: `POST /v1/queues/{q}/batch` of `--batch-records` records
//!   from `--batch-clients` clients;
//! - produce to group fetch: one client produces values stamped with the
//!   time they were sent; one worker long-polls the group's fetch and acks;
//!   latency is from the produce being sent to the fetch returning it;
//! - request/reply: one client produces a request with `Walq-Reply-To` and
//!   `Walq-Correlation-Id`, then long-polls its reply queue until the reply
//!   with its id arrives; one worker fetches through a group of prefetch 1,
//!   produces the reply (durable, as the request) and acks;
//! - cold start: from spawning `walq serve` to `/readyz` answering 200, on
//!   an empty data directory, then on one holding a log of
//!   `--startup-log-bytes` (written with the library, `os` durability, then
//!   closed; the page cache is warm), median of three starts each;
//! - memory: the server's VmRSS (`/proc/<pid>/status`) once
//!   `--idle-long-polls` connections each wait in a read of an empty queue.
//!
//! The server and the load generator share the machine. `--cpus pinned`
//! (the default) runs the server under `taskset -c 0` and moves this
//! process to CPU 1 (`taskset -a -p`, before its runtime starts, so that
//! every thread inherits it): the bench's own work never preempts the
//! server, whose latency tails are then its own (on a 2-core machine they
//! were several times steadier so), at the price of confining the server's
//! request threads, flusher and fdatasync calls to one core. `--cpus
//! shared` leaves both to the scheduler, as a sidecar and its application
//! run in a pod. The split is printed, and each workload shows the CPU
//! time the server and the bench used (from `/proc/<pid>/stat`), per record. Every server the bench starts is stopped (SIGTERM, then
//! SIGKILL after ten seconds) when it is no longer needed, on error and panic
//! paths too (a guard's `Drop`).

use std::fmt::Display;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::{Args, ValueEnum};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use walq::{Durability, Queue, Record};

use crate::bench::{BenchArgs, Summary, summarize};
use crate::write::DurabilityArg;
use crate::{CmdResult, Failure, output};

/// Options of `walq bench --http` (ignored without it).
#[derive(Debug, Args)]
pub struct HttpOptions {
    /// With --http: drive the running server whose data plane is at this URL
    /// (http://HOST:PORT) instead of starting one; the cold-start and memory
    /// workloads are then skipped. Queues named bench-<pid>-... are left on it.
    #[arg(long, value_name = "URL", requires = "http")]
    url: Option<String>,
    /// With --url: that server's admin listener (http://HOST:PORT), for the
    /// records per fdatasync (from /metrics); without it they are not shown.
    #[arg(long, value_name = "URL", requires = "url")]
    admin_url: Option<String>,
    /// With --http: concurrent clients of the durable produce workloads, one run each.
    #[arg(long, value_name = "N,...", value_delimiter = ',', default_values_t = [1, 8, 64])]
    clients: Vec<usize>,
    /// With --http: concurrent clients of the batch workload.
    #[arg(long, value_name = "N", default_value_t = 8)]
    batch_clients: usize,
    /// With --http: records per batch of the batch workload.
    #[arg(long, value_name = "N", default_value_t = 100)]
    batch_records: usize,
    /// With --http: bytes of the log the second cold start recovers (0 skips it).
    #[arg(long, value_name = "BYTES", default_value_t = 1 << 30)]
    startup_log_bytes: u64,
    /// With --http: idle long-polls open while the server's memory is measured (0 skips it).
    #[arg(long, value_name = "N", default_value_t = 1000)]
    idle_long_polls: usize,
    /// With --http: how the server and the load generator share the CPUs.
    #[arg(long, value_enum, value_name = "SPLIT", default_value_t = CpuSplit::Pinned)]
    cpus: CpuSplit,
    /// With --http: the workloads to run (default: all), e.g. `--workloads request-reply`
    /// to repeat one while tuning.
    #[arg(long, value_enum, value_name = "NAME,...", value_delimiter = ',',
          default_values_t = Workload::ALL)]
    workloads: Vec<Workload>,
}

/// One workload of `walq bench --http`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Workload {
    /// Durable produce, one run per `--clients` entry.
    Produce,
    /// Batch produce.
    Batch,
    /// Produce → group fetch (long-poll) → ack.
    EndToEnd,
    /// Request/reply through a group of prefetch 1.
    RequestReply,
    /// Cold starts to /readyz (empty, and a `--startup-log-bytes` log).
    ColdStart,
    /// Resident memory with `--idle-long-polls` idle long-polls.
    Memory,
}

impl Workload {
    const ALL: [Workload; 6] = [
        Workload::Produce,
        Workload::Batch,
        Workload::EndToEnd,
        Workload::RequestReply,
        Workload::ColdStart,
        Workload::Memory,
    ];
}

impl Display for Workload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let v = self.to_possible_value().ok_or(std::fmt::Error)?;
        f.write_str(v.get_name())
    }
}

/// How the spawned server and the load generator share the CPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CpuSplit {
    /// The server on CPU 0 (taskset -c 0), the load generator on CPU 1 (needs taskset and two CPUs).
    Pinned,
    /// Neither pinned: the scheduler runs both on every CPU.
    Shared,
}

type Res<T> = Result<T, Failure>;

/// A failure of the bench itself (exit code 6, as an I/O error).
fn fail(msg: impl Display) -> Failure {
    Failure::Walq(walq::Error::Io {
        op: "bench",
        path: PathBuf::from("--http"),
        source: std::io::Error::other(msg.to_string()),
    })
}

/// Resident memory is read from here.
const PROC: &str = "/proc";
/// Starts per cold-start figure (the median is reported).
const COLD_STARTS: usize = 3;
/// How long a spawned server may take to answer `/readyz` 200.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// `wait_ms` of the workers' fetches and of the idle long-polls.
const FETCH_WAIT_MS: u64 = 200;
const IDLE_WAIT_MS: u64 = 120_000;
/// Grace of the spawned servers' drain (a quarter of it is the drain's linger).
const SERVER_GRACE_MS: &str = "2000";
/// A stamp in the value: nanoseconds since the workload's start, zero-padded.
const STAMP_LEN: usize = 20;

/// The server the workloads drive.
struct Target {
    /// `HOST:PORT` of the data plane.
    data: String,
    /// `HOST:PORT` of the admin listener, if known.
    admin: Option<String>,
    /// The server's process, if the bench started it (for its CPU time).
    pid: Option<u32>,
}

fn authority(url: &str) -> Res<String> {
    let a = url.strip_prefix("http://").unwrap_or(url).trim_end_matches('/');
    if a.is_empty() || a.contains('/') || url.starts_with("https://") {
        return Err(Failure::Usage(format!("{url:?} is not http://HOST:PORT")));
    }
    Ok(a.to_string())
}

pub fn run(args: &BenchArgs, d: Duration) -> CmdResult {
    let o = &args.http_options;
    if o.clients.is_empty() || o.clients.iter().any(|&c| c == 0 || c > 4096) {
        return Err(Failure::Usage("--clients must list 1 to 4096 clients per run".into()));
    }
    if o.batch_clients == 0 || o.batch_clients > 4096 || o.batch_records == 0 || o.batch_records > 10_000 {
        return Err(Failure::Usage("--batch-clients must be 1 to 4096, --batch-records 1 to 10000".into()));
    }
    if o.idle_long_polls > 10_000 {
        return Err(Failure::Usage("--idle-long-polls must be at most 10000".into()));
    }
    let target = match &o.url {
        Some(url) => Some(Target {
            data: authority(url)?,
            admin: o.admin_url.as_deref().map(authority).transpose()?,
            pid: None,
        }),
        None => None,
    };
    let say = |what: &str| {
        if !args.json {
            eprintln!("  {what} ...");
        }
    };

    // The CPU split first: the runtime's threads inherit this process's affinity.
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut notes = Vec::new();
    let pinned = o.cpus == CpuSplit::Pinned && {
        let ok = cpus >= 2 && target.is_none() && pin_self(1);
        if !ok {
            notes.push(if target.is_some() {
                "--cpus pinned applies to a server the bench starts; both are left unpinned".to_string()
            } else {
                format!("could not pin ({cpus} CPUs visible, taskset needed); both are left unpinned")
            });
        }
        ok
    };
    let load_threads = if pinned { 1 } else { cpus };
    let hz = clock_ticks();
    let split = match (&target, pinned) {
        (Some(t), _) => format!(
            "{cpus} CPUs; the server at {} is not the bench's (its CPUs unknown); load generator unpinned, {load_threads} runtime threads",
            t.data
        ),
        (None, true) => format!(
            "{cpus} CPUs; server pinned to CPU 0 (taskset -c 0), load generator pinned to CPU 1 (1 runtime thread)"
        ),
        (None, false) => format!(
            "{cpus} CPUs; server and load generator unpinned, sharing them (load generator: {load_threads} runtime threads)"
        ),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(load_threads)
        .enable_all()
        .thread_name("walq-bench-http")
        .build()
        .map_err(|e| fail(format!("starting the runtime: {e}")))?;

    let parent = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    let scratch = tempfile::Builder::new().prefix("walq-bench-http-").tempdir_in(&parent).map_err(|e| {
        Failure::Walq(walq::Error::Io { op: "create directory", path: parent.clone(), source: e })
    })?;
    let root = scratch.path();
    let durability_header = match args.durability {
        DurabilityArg::Sync => "sync",
        DurabilityArg::Os => "os",
    };
    let sync = args.durability == DurabilityArg::Sync;
    if !args.json {
        eprintln!(
            "walq bench --http in {}: {} B records, durability {durability_header}, {:.1} s per workload",
            root.display(),
            args.record_size,
            args.duration
        );
        eprintln!("  CPUs: {split}");
        for n in &notes {
            eprintln!("  note: {n}");
        }
    }

    say("the disk: 4 KiB write + fdatasync, then 1 MiB writes + fdatasync");
    let disk = crate::bench::disk_limits(&root.join("disk-probe"), d / 2)?;
    let fsync_p50 = disk.sync.p50_us;

    let exe = std::env::current_exe().map_err(|e| fail(format!("finding this executable: {e}")))?;
    let mut server = None;
    let target = match target {
        Some(t) => t,
        None => {
            say("starting walq serve");
            let (s, started) =
                Spawned::start(&exe, &root.join("serve"), &[], pinned, &root.join("serve.log"))?;
            rt.block_on(wait_ready(&s.admin, started))?;
            let t = Target { data: s.data.clone(), admin: Some(s.admin.clone()), pid: Some(s.pid()) };
            server = Some(s);
            t
        }
    };
    let prefix = format!("bench-{}", std::process::id());
    let value = Bytes::from(vec![b'x'; args.record_size]);
    let mut rows: Vec<Row> = Vec::new();
    let dh = durability_header;
    let runs = |w: Workload| o.workloads.contains(&w);

    for &clients in o.clients.iter().filter(|_| runs(Workload::Produce)) {
        say(&format!("durable produce, {clients} client{}", plural(clients)));
        let q = format!("{prefix}-produce-{clients}");
        let (s, per_flush, cpu) = rt.block_on(async {
            create_queue(&target, &q).await?;
            let before = counters(&target, &q).await?;
            let cpu = CpuMeter::start(&target, hz);
            let s = closed_loop(
                &target.data,
                clients,
                d,
                format!("/v1/queues/{q}/records"),
                vec![("walq-durability", dh.to_string())],
                value.clone(),
                |_| Ok(()),
            )
            .await?;
            let cpu = cpu.stop(s.count);
            let after = counters(&target, &q).await?;
            Ok::<_, Failure>((s, per_flush_of(before, after), cpu))
        })?;
        let mut targets = Vec::new();
        if sync {
            match clients {
                1 => {
                    let limit = fsync_p50 + 150.0;
                    targets.push(Check::new(
                        format!("p50 ≤ fdatasync p50 + 150 µs = {limit:.0} µs"),
                        s.p50_us <= limit,
                    ));
                }
                8 => targets.push(Check::new("≥ 25,000 records/s", s.per_sec >= 25_000.0)),
                64 => {
                    targets.push(Check::new("≥ 50,000 records/s", s.per_sec >= 50_000.0));
                    targets.push(Check::new("p99 ≤ 5 ms", s.p99_us <= 5_000.0));
                }
                _ => {}
            }
        }
        let one_sync_each = 1e6 / fsync_p50.max(1e-9);
        rows.push(Row {
            name: format!("durable produce, {clients} client{}", plural(clients)),
            figure: format!(
                "{:.0} records/s, p50 {:.0} µs, p99 {:.0} µs, {} records/fdatasync",
                s.per_sec,
                s.p50_us,
                s.p99_us,
                opt(per_flush)
            ),
            limit: if clients == 1 {
                format!("fdatasync p50 {fsync_p50:.0} µs")
            } else {
                format!("1 fdatasync each: {one_sync_each:.0}/s")
            },
            json: json!({ "name": format!("produce_{clients}"), "clients": clients, "requests": s.count,
                          "records_per_sec": s.per_sec, "p50_us": s.p50_us, "p99_us": s.p99_us,
                          "records_per_fdatasync": per_flush, "disk_fdatasync_p50_us": fsync_p50,
                          "latency_ratio": s.p50_us / fsync_p50.max(1e-9),
                          "throughput_ratio": s.per_sec / one_sync_each, "cpu": cpu.json() }),
            cpu: Some(cpu),
            targets,
        });
    }

    if runs(Workload::Batch) {
        let (clients, per_batch) = (o.batch_clients, o.batch_records);
        say(&format!("batch produce, {clients} clients × {per_batch} records"));
        let q = format!("{prefix}-batch");
        let text = String::from_utf8(value.to_vec()).unwrap_or_default();
        let entries: Vec<Value> = (0..per_batch).map(|_| json!({ "value": text })).collect();
        let body = Bytes::from(json!({ "durability": dh, "records": entries }).to_string());
        let (s, per_flush, cpu) = rt.block_on(async {
            create_queue(&target, &q).await?;
            let before = counters(&target, &q).await?;
            let cpu = CpuMeter::start(&target, hz);
            let s = closed_loop(
                &target.data,
                clients,
                d,
                format!("/v1/queues/{q}/batch"),
                vec![("content-type", "application/json".to_string())],
                body,
                // Every entry must have been appended (an entry's error is a 200 too).
                |b| {
                    if b.windows(8).any(|w| w == b"\"error\":") {
                        Err(fail(format!("an entry failed: {}", String::from_utf8_lossy(b))))
                    } else {
                        Ok(())
                    }
                },
            )
            .await?;
            let cpu = cpu.stop(s.count * per_batch as u64);
            let after = counters(&target, &q).await?;
            Ok::<_, Failure>((s, per_flush_of(before, after), cpu))
        })?;
        let records_per_sec = s.per_sec * per_batch as f64;
        let mib = records_per_sec * args.record_size as f64 / (1u64 << 20) as f64;
        rows.push(Row {
            name: format!("batch produce, {clients} clients × {per_batch}"),
            figure: format!(
                "{records_per_sec:.0} records/s ({mib:.0} MiB/s), per batch p50 {:.0} µs, p99 {:.0} µs, {} records/fdatasync",
                s.p50_us,
                s.p99_us,
                opt(per_flush)
            ),
            limit: format!("{:.0} MiB/s sequential", disk.mib_per_sec),
            json: json!({ "name": "batch_produce", "clients": clients, "records_per_batch": per_batch,
                          "batches": s.count, "records_per_sec": records_per_sec, "mib_per_sec": mib,
                          "p50_us": s.p50_us, "p99_us": s.p99_us, "records_per_fdatasync": per_flush,
                          "disk_mib_per_sec": disk.mib_per_sec,
                          "throughput_ratio": mib / disk.mib_per_sec.max(1e-9), "cpu": cpu.json() }),
            targets: Vec::new(),
            cpu: Some(cpu),
        });
    }

    if runs(Workload::EndToEnd) {
        say("produce → group fetch (long-poll) → ack");
        let q = format!("{prefix}-e2e");
        let size = args.record_size.max(STAMP_LEN + 1);
        let (s, per_flush, cpu) = rt.block_on(async {
            let before = counters(&target, &q).await?;
            let cpu = CpuMeter::start(&target, hz);
            let s = end_to_end(&target, &q, size, d, dh).await?;
            let cpu = cpu.stop(s.count);
            let after = counters(&target, &q).await?;
            Ok::<_, Failure>((s, per_flush_of(before, after), cpu))
        })?;
        rows.push(Row {
            name: "produce → group fetch".into(),
            figure: format!(
                "p50 {:.0} µs, p99 {:.0} µs ({} records, {} records/fdatasync)",
                s.p50_us,
                s.p99_us,
                s.count,
                opt(per_flush)
            ),
            limit: format!("fdatasync p50 {fsync_p50:.0} µs"),
            targets: if sync { vec![Check::new("p50 ≤ 1 ms", s.p50_us <= 1_000.0)] } else { Vec::new() },
            json: json!({ "name": "end_to_end_group", "records": s.count, "p50_us": s.p50_us, "p99_us": s.p99_us,
                          "records_per_fdatasync": per_flush, "disk_fdatasync_p50_us": fsync_p50,
                          "latency_ratio": s.p50_us / fsync_p50.max(1e-9), "cpu": cpu.json() }),
            cpu: Some(cpu),
        });
    }

    if runs(Workload::RequestReply) {
        say("request/reply (a group of prefetch 1 answers)");
        let (s, cpu) = rt.block_on(async {
            let cpu = CpuMeter::start(&target, hz);
            let s = request_reply(&target, &prefix, &value, d, dh).await?;
            Ok::<_, Failure>((s, cpu.stop(s.count)))
        })?;
        let limit = 2.0 * fsync_p50 + 300.0;
        rows.push(Row {
            name: "request/reply round trip".into(),
            figure: format!("{:.0}/s, p50 {:.0} µs, p99 {:.0} µs", s.per_sec, s.p50_us, s.p99_us),
            limit: format!("2 fdatasyncs: {:.0} µs", 2.0 * fsync_p50),
            targets: if sync {
                vec![Check::new(
                    format!("p50 ≤ 2 × fdatasync p50 + 300 µs = {limit:.0} µs"),
                    s.p50_us <= limit,
                )]
            } else {
                Vec::new()
            },
            json: json!({ "name": "request_reply", "round_trips": s.count, "per_sec": s.per_sec,
                          "p50_us": s.p50_us, "p99_us": s.p99_us, "disk_fdatasync_p50_us": fsync_p50,
                          "latency_ratio": s.p50_us / (2.0 * fsync_p50).max(1e-9), "cpu": cpu.json() }),
            cpu: Some(cpu),
        });
    }

    // The workloads' server is no longer needed: stop it before the others start.
    if let Some(mut s) = server.take() {
        say("stopping walq serve");
        s.stop()?;
    }

    let mut skipped = Vec::new();
    if o.url.is_some() {
        skipped.extend(["cold_start_empty", "cold_start_log", "idle_long_polls_memory"]);
        if !args.json {
            eprintln!("  skipped with --url: cold start and memory (they need a server the bench starts)");
        }
    } else {
        if !runs(Workload::ColdStart) {
            skipped.extend(["cold_start_empty", "cold_start_log"]);
        } else {
            say(&format!("cold start, empty data directory ({COLD_STARTS} starts)"));
            let starts =
                cold_starts(&rt, &exe, &root.join("cold-empty"), pinned, &root.join("cold-empty.log"))?;
            let ms = median(&starts);
            rows.push(Row {
                name: "cold start, empty".into(),
                figure: format!("{ms:.1} ms to /readyz 200 (median of {COLD_STARTS})"),
                limit: "-".into(),
                targets: vec![Check::new("≤ 50 ms", ms <= 50.0)],
                json: json!({ "name": "cold_start_empty", "ms": ms, "starts_ms": starts }),
                cpu: None,
            });

            if o.startup_log_bytes == 0 {
                skipped.push("cold_start_log");
            } else {
                let bytes = o.startup_log_bytes;
                say(&format!("writing a {} log with the library (os durability)", output::size(bytes)));
                let data_dir = root.join("cold-log");
                let (records, write_secs) = make_log(&data_dir.join("log"), bytes, args.record_size.max(1))?;
                say(&format!("cold start, {} log ({COLD_STARTS} starts)", output::size(bytes)));
                let starts = cold_starts(&rt, &exe, &data_dir, pinned, &root.join("cold-log.log"))?;
                let ms = median(&starts);
                rows.push(Row {
                    name: format!("cold start, {} log", output::size(bytes)),
                    figure: format!("{ms:.1} ms to /readyz 200 (median of {COLD_STARTS}; {records} records)"),
                    limit: "-".into(),
                    targets: vec![Check::new(
                        if bytes == 1 << 30 {
                            "≤ 100 ms (1 GiB)".to_string()
                        } else {
                            format!("≤ 100 ms (the target is for 1 GiB; this log is {})", output::size(bytes))
                        },
                        ms <= 100.0,
                    )],
                    json: json!({ "name": "cold_start_log", "ms": ms, "starts_ms": starts, "log_bytes": bytes,
                                  "records": records, "log_write_secs": write_secs }),
                    cpu: None,
                });
                std::fs::remove_dir_all(&data_dir).map_err(|e| fail(format!("removing the log: {e}")))?;
            }
        }

        if o.idle_long_polls == 0 || !runs(Workload::Memory) {
            skipped.push("idle_long_polls_memory");
        } else {
            let n = o.idle_long_polls;
            say(&format!("resident memory with {n} idle long-polls"));
            let m = idle_memory(&rt, &exe, &root.join("idle"), pinned, &root.join("idle.log"), n)?;
            let mib = m.loaded_kib as f64 / 1024.0;
            rows.push(Row {
                name: format!("memory, {n} idle long-polls"),
                figure: format!(
                    "VmRSS {mib:.1} MiB ({:.1} MiB ready and idle; {:.1} KiB per long-poll)",
                    m.idle_kib as f64 / 1024.0,
                    (m.loaded_kib.saturating_sub(m.idle_kib)) as f64 / n as f64
                ),
                limit: "-".into(),
                targets: vec![Check::new(
                    if n == 1000 {
                        "< 64 MiB (1,000 long-polls)".to_string()
                    } else {
                        format!("< 64 MiB (the target is for 1,000 long-polls; these are {n})")
                    },
                    mib < 64.0,
                )],
                json: json!({ "name": "idle_long_polls_memory", "long_polls": n, "rss_kib": m.loaded_kib,
                              "rss_mib": mib, "idle_rss_kib": m.idle_kib }),
                cpu: None,
            });
        }
    }

    let total = rows.iter().map(|r| r.targets.len()).sum::<usize>();
    let met = rows.iter().flat_map(|r| &r.targets).filter(|c| c.pass).count();
    if args.json {
        let v = json!({
            "config": { "mode": "http", "record_size": args.record_size, "duration_secs": args.duration,
                        "durability": dh, "clients": o.clients, "batch_clients": o.batch_clients,
                        "batch_records": o.batch_records, "startup_log_bytes": o.startup_log_bytes,
                        "idle_long_polls": o.idle_long_polls, "workloads": o.workloads.iter().map(ToString::to_string).collect::<Vec<_>>(), "server": o.url.clone().unwrap_or_else(|| "spawned".into()),
                        "cpus": cpus, "pinned": pinned, "cpu_split": split, "notes": notes },
            "disk": { "fdatasync_4k_p50_us": disk.sync.p50_us, "fdatasync_4k_p99_us": disk.sync.p99_us,
                      "sequential_mib_per_sec": disk.mib_per_sec },
            "workloads": rows.iter().map(|r| {
                let mut j = r.json.clone();
                j["targets"] = r.targets.iter().map(|c| json!({ "target": c.what, "pass": c.pass })).collect();
                j
            }).collect::<Vec<_>>(),
            "skipped": skipped,
            "targets": { "met": met, "missed": total - met },
        });
        return crate::bench::print_json(&v);
    }
    let mut out = std::io::stdout().lock();
    use std::io::Write as _;
    writeln!(out, "\n{}", disk.summary_line())?;
    writeln!(out, "CPUs: {split}\n")?;
    let mut table = vec![
        ["workload", "walq over HTTP", "the disk's limit", "CPU: server / bench (cores)", "target", "result"]
            .map(String::from)
            .to_vec(),
    ];
    for r in rows {
        let (what, verdict) = if r.targets.is_empty() {
            ("-".to_string(), "-".to_string())
        } else {
            (
                r.targets.iter().map(|c| c.what.as_str()).collect::<Vec<_>>().join("; "),
                r.targets.iter().map(|c| if c.pass { "pass" } else { "fail" }).collect::<Vec<_>>().join(", "),
            )
        };
        let cpu = r.cpu.map_or_else(|| "-".to_string(), |c| c.text());
        table.push(vec![r.name, r.figure, r.limit, cpu, what, verdict]);
    }
    output::table(&mut out, &table, &[])?;
    if !sync {
        writeln!(
            out,
            "\nthe latency and throughput targets are for sync produces; not checked with --durability os"
        )?;
    }
    writeln!(out, "\nperformance targets met: {met} of {total}")?;
    Ok(())
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

fn opt(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.1}"))
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// One target and whether the figure met it.
struct Check {
    what: String,
    pass: bool,
}

impl Check {
    fn new(what: impl Into<String>, pass: bool) -> Check {
        Check { what: what.into(), pass }
    }
}

/// One row of the result table.
struct Row {
    name: String,
    figure: String,
    limit: String,
    targets: Vec<Check>,
    json: Value,
    cpu: Option<CpuUse>,
}

/// CPU seconds (user + system) a process has used, from `/proc/<pid>/stat`.
fn cpu_secs(pid: u32, hz: f64) -> Option<f64> {
    let text = std::fs::read_to_string(format!("{PROC}/{pid}/stat")).ok()?;
    // The fields after the command's closing parenthesis start at the 3rd;
    // utime and stime are the 14th and 15th.
    let fields: Vec<&str> = text[text.rfind(')')? + 1..].split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / hz)
}

/// Clock ticks per second of `/proc/<pid>/stat` (`getconf CLK_TCK`; 100 almost everywhere).
fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .stderr(Stdio::null())
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .filter(|&hz: &f64| hz > 0.0)
        .unwrap_or(100.0)
}

/// The CPU time the server (if the bench started it) and this process use during a workload.
struct CpuMeter {
    server: Option<(u32, f64)>,
    bench: Option<f64>,
    started: Instant,
    hz: f64,
}

/// Cores busy on average during a workload, and CPU time per record.
#[derive(Clone, Copy)]
struct CpuUse {
    server_cores: Option<f64>,
    bench_cores: Option<f64>,
    server_us_per_record: Option<f64>,
    bench_us_per_record: Option<f64>,
}

impl CpuMeter {
    fn start(t: &Target, hz: f64) -> CpuMeter {
        CpuMeter {
            server: t.pid.and_then(|pid| Some((pid, cpu_secs(pid, hz)?))),
            bench: cpu_secs(std::process::id(), hz),
            started: Instant::now(),
            hz,
        }
    }

    /// Usage since `start`; `records` is what the workload moved.
    fn stop(self, records: u64) -> CpuUse {
        let wall = self.started.elapsed().as_secs_f64().max(1e-9);
        let server = self.server.and_then(|(pid, before)| Some(cpu_secs(pid, self.hz)? - before));
        let bench = self.bench.and_then(|before| Some(cpu_secs(std::process::id(), self.hz)? - before));
        let per = |secs: f64| secs * 1e6 / records.max(1) as f64;
        CpuUse {
            server_cores: server.map(|s| s / wall),
            bench_cores: bench.map(|s| s / wall),
            server_us_per_record: server.map(per),
            bench_us_per_record: bench.map(per),
        }
    }
}

impl CpuUse {
    fn json(&self) -> Value {
        json!({ "server_cores": self.server_cores, "bench_cores": self.bench_cores,
                "server_us_per_record": self.server_us_per_record, "bench_us_per_record": self.bench_us_per_record })
    }

    fn text(&self) -> String {
        let f = |v: Option<f64>, digits: usize| v.map_or_else(|| "?".into(), |v| format!("{v:.digits$}"));
        format!(
            "{} / {} ({} / {} µs per record)",
            f(self.server_cores, 2),
            f(self.bench_cores, 2),
            f(self.server_us_per_record, 0),
            f(self.bench_us_per_record, 0)
        )
    }
}

/// Moves every thread of this process to `cpu` (threads started later inherit it).
fn pin_self(cpu: usize) -> bool {
    Command::new("taskset")
        .args(["-a", "-p", "-c", &cpu.to_string(), &std::process::id().to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

// ---------------------------------------------------------------------------
// The server process.

/// A `walq serve` this bench started. Dropping it stops the process (SIGTERM,
/// then SIGKILL after ten seconds), so that no server outlives the bench.
struct Spawned {
    child: Child,
    data: String,
    admin: String,
    log: PathBuf,
}

impl Spawned {
    /// Spawns `walq serve` on `data_dir` (ephemeral loopback ports, its log
    /// in `log`) and waits for the line naming its addresses. Also returns
    /// the instant just before the spawn.
    fn start(
        exe: &Path,
        data_dir: &Path,
        extra: &[String],
        pin: bool,
        log: &Path,
    ) -> Res<(Spawned, Instant)> {
        let log_file =
            std::fs::File::create(log).map_err(|e| fail(format!("creating {}: {e}", log.display())))?;
        let mut cmd = if pin {
            let mut c = Command::new("taskset");
            c.args(["-c", "0"]).arg(exe);
            c
        } else {
            Command::new(exe)
        };
        cmd.arg("serve")
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .args(["--shutdown-grace-ms", SERVER_GRACE_MS])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log_file);
        // The user's WALQ_* settings are not the bench's.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("WALQ_") {
                cmd.env_remove(k);
            }
        }
        let started = Instant::now();
        let mut child = cmd.spawn().map_err(|e| fail(format!("starting {} serve: {e}", exe.display())))?;
        let stdout = child.stdout.take();
        let mut s = Spawned { child, data: String::new(), admin: String::new(), log: log.to_path_buf() };
        // The first line names the addresses; a thread reads it (and whatever
        // follows, so that the server never writes into a full pipe).
        let (tx, rx) = std::sync::mpsc::channel();
        if let Some(stdout) = stdout {
            std::thread::spawn(move || {
                let mut r = BufReader::new(stdout);
                let mut line = String::new();
                let _ = r.read_line(&mut line);
                let _ = tx.send(line);
                let _ = std::io::copy(&mut r, &mut std::io::sink());
            });
        }
        let line = rx.recv_timeout(READY_TIMEOUT).unwrap_or_default();
        // "walq serve: listening on A, admin on B"
        let words: Vec<&str> = line.split_whitespace().collect();
        match (words.get(4), words.get(7)) {
            (Some(a), Some(b)) if line.starts_with("walq serve: listening on") => {
                s.data = a.trim_end_matches(',').to_string();
                s.admin = b.to_string();
                Ok((s, started))
            }
            _ => {
                s.stop_now();
                Err(fail(format!("walq serve did not start: {:?}; its log: {}", line.trim(), s.log_tail())))
            }
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log_tail(&self) -> String {
        let mut text = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut text);
        }
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(10)..].join("\n")
    }

    /// SIGTERM (a drain), then SIGKILL if it has not exited after ten seconds.
    fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        if let Ok(Some(status)) = self.child.try_wait() {
            return Some(status);
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        self.stop_now();
        None
    }

    fn stop_now(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Stops the server; an error unless it drained and exited 0.
    fn stop(&mut self) -> Res<()> {
        match self.terminate() {
            Some(s) if s.success() => Ok(()),
            Some(s) => {
                Err(fail(format!("walq serve exited with {s} after SIGTERM; its log: {}", self.log_tail())))
            }
            None => Err(fail("walq serve did not exit within 10 s of SIGTERM (killed)")),
        }
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        self.terminate();
    }
}

/// Polls `/readyz` until it answers 200; the time since `started`, in ms.
async fn wait_ready(admin: &str, started: Instant) -> Res<f64> {
    let mut conn: Option<Conn> = None;
    loop {
        if started.elapsed() > READY_TIMEOUT {
            return Err(fail(format!("walq serve was not ready within {READY_TIMEOUT:?}")));
        }
        if conn.is_none() {
            conn = Conn::open(admin).await.ok();
        }
        if let Some(c) = conn.as_mut() {
            match c.call(Method::GET, "/readyz", &[], Bytes::new()).await {
                Ok((200, _)) => return Ok(started.elapsed().as_secs_f64() * 1e3),
                Ok(_) => {}
                Err(_) => conn = None,
            }
        }
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
}

/// `COLD_STARTS` starts of a server on `data_dir`, each stopped once ready: ms to `/readyz` 200.
fn cold_starts(
    rt: &tokio::runtime::Runtime,
    exe: &Path,
    data_dir: &Path,
    pin: bool,
    log: &Path,
) -> Res<Vec<f64>> {
    std::fs::create_dir_all(data_dir).map_err(|e| fail(format!("creating {}: {e}", data_dir.display())))?;
    let mut times = Vec::new();
    for _ in 0..COLD_STARTS {
        let (mut s, started) = Spawned::start(exe, data_dir, &[], pin, log)?;
        times.push(rt.block_on(wait_ready(&s.admin, started))?);
        s.stop()?;
    }
    Ok(times)
}

/// Writes about `bytes` of `record_size` records into a queue at `dir`
/// with the library (1 MiB `append_batch` calls, `os` durability), then
/// closes it (its final flush included). Records written and seconds taken.
fn make_log(dir: &Path, bytes: u64, record_size: usize) -> Res<(u64, f64)> {
    let started = Instant::now();
    let q = Queue::builder(dir).durability(Durability::Os).open()?;
    let per_call = ((1 << 20) / record_size).max(1);
    let value = vec![b'l'; record_size];
    let records: Vec<Record<'_>> = (0..per_call).map(|_| Record::new(&value)).collect();
    let mut written = 0u64;
    while written < bytes {
        q.append_batch(&records)?;
        written += (per_call * record_size) as u64;
    }
    let n = q.next_offset();
    q.close()?;
    Ok((n, started.elapsed().as_secs_f64()))
}

struct Memory {
    idle_kib: u64,
    loaded_kib: u64,
}

fn vm_rss_kib(pid: u32) -> Res<u64> {
    let path = format!("{PROC}/{pid}/status");
    let text = std::fs::read_to_string(&path).map_err(|e| fail(format!("reading {path}: {e}")))?;
    text.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| fail(format!("no VmRSS in {path}")))
}

/// A server with room for `n` long-polls; its VmRSS when ready (one empty
/// queue), then once `n` connections each wait in a read of that queue.
fn idle_memory(
    rt: &tokio::runtime::Runtime,
    exe: &Path,
    data_dir: &Path,
    pin: bool,
    log: &Path,
    n: usize,
) -> Res<Memory> {
    let extra = [
        "--max-long-polls".to_string(),
        (n + 16).to_string(),
        "--long-poll-max-ms".to_string(),
        IDLE_WAIT_MS.to_string(),
    ];
    let (mut s, started) = Spawned::start(exe, data_dir, &extra, pin, log)?;
    let target = Target { data: s.data.clone(), admin: Some(s.admin.clone()), pid: Some(s.pid()) };
    let pid = s.pid();
    let result = rt.block_on(async {
        wait_ready(&s.admin, started).await?;
        create_queue(&target, "idle").await?;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let idle_kib = vm_rss_kib(pid)?;
        let mut waiting = Vec::with_capacity(n);
        for _ in 0..n {
            let mut c = Conn::open(&target.data).await?;
            waiting.push(Task(tokio::spawn(async move {
                c.call(
                    Method::GET,
                    &format!("/v1/queues/idle/records?offset=0&wait_ms={IDLE_WAIT_MS}"),
                    &[],
                    Bytes::new(),
                )
                .await
            })));
        }
        // Every one must be waiting in the server, not only sent.
        let admin = target.admin.as_deref().unwrap_or_default();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let text = Conn::open(admin).await?.ok(Method::GET, "/metrics", &[], Bytes::new()).await?;
            let text = String::from_utf8_lossy(&text);
            let now = text
                .lines()
                .find_map(|l| l.strip_prefix("walq_long_polls "))
                .and_then(|v| v.trim().parse().ok());
            if now.is_some_and(|w: usize| w >= n) {
                break;
            }
            if Instant::now() > deadline || waiting.iter().any(|t| t.0.is_finished()) {
                return Err(fail(format!(
                    "{n} long-polls did not all wait (the server counts {}); a finished one: {}",
                    now.map_or("?".into(), |w| w.to_string()),
                    waiting.iter().any(|t| t.0.is_finished())
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let loaded_kib = vm_rss_kib(pid)?;
        Ok::<_, Failure>((Memory { idle_kib, loaded_kib }, waiting))
    });
    // Stop the server while the long-polls wait (the drain answers them), then drop them.
    let stopped = s.stop();
    let (m, waiting) = result?;
    drop(waiting);
    stopped?;
    Ok(m)
}

// ---------------------------------------------------------------------------
// The HTTP client.

/// A spawned task, aborted when dropped (so that an error path leaves no client running).
struct Task<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for Task<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl<T> Task<T> {
    async fn join(mut self) -> Res<T> {
        (&mut self.0).await.map_err(|e| fail(format!("a client task: {e}")))
    }
}

/// One keep-alive HTTP/1.1 connection.
struct Conn {
    send: SendRequest<Full<Bytes>>,
    host: String,
}

impl Conn {
    async fn open(addr: &str) -> Res<Conn> {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| fail(format!("connecting to {addr}: {e}")))?;
        stream.set_nodelay(true).map_err(|e| fail(format!("TCP_NODELAY: {e}")))?;
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| fail(format!("HTTP/1.1 handshake with {addr}: {e}")))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Conn { send, host: addr.to_string() })
    }

    /// One request; the status and the whole body.
    async fn call(
        &mut self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Res<(u16, Bytes)> {
        let err = |e: &dyn Display| fail(format!("{method} {path}: {e}"));
        self.send.ready().await.map_err(|e| err(&e))?;
        let mut req =
            Request::builder().method(method.clone()).uri(path).header(hyper::header::HOST, &self.host);
        for (n, v) in headers {
            req = req.header(*n, *v);
        }
        let req = req.body(Full::new(body)).map_err(|e| err(&e))?;
        let resp = self.send.send_request(req).await.map_err(|e| err(&e))?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.map_err(|e| err(&e))?.to_bytes();
        Ok((status, body))
    }

    /// One request that must succeed (2xx); its body.
    async fn ok(&mut self, method: Method, path: &str, headers: &[(&str, &str)], body: Bytes) -> Res<Bytes> {
        let (status, b) = self.call(method.clone(), path, headers, body).await?;
        if (200..300).contains(&status) {
            Ok(b)
        } else {
            Err(fail(format!("{method} {path}: {status} {}", String::from_utf8_lossy(&b))))
        }
    }

    async fn json(
        &mut self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Res<Value> {
        let b = self.ok(method.clone(), path, headers, body).await?;
        serde_json::from_slice(&b).map_err(|e| fail(format!("{method} {path}: not JSON: {e}")))
    }
}

async fn create_queue(t: &Target, q: &str) -> Res<()> {
    Conn::open(&t.data).await?.ok(Method::PUT, &format!("/v1/queues/{q}"), &[], Bytes::new()).await?;
    Ok(())
}

/// The queue's `walq_appends_total` and `walq_flushes_total` (0 for a queue
/// the server does not show yet); `None` without an admin address.
async fn counters(t: &Target, q: &str) -> Res<Option<(f64, f64)>> {
    let Some(admin) = &t.admin else { return Ok(None) };
    let text = Conn::open(admin).await?.ok(Method::GET, "/metrics", &[], Bytes::new()).await?;
    let text = String::from_utf8_lossy(&text);
    let metric = |name: &str| {
        let prefix = format!("{name}{{queue=\"{q}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    Ok(Some((metric("walq_appends_total"), metric("walq_flushes_total"))))
}

/// Records per fdatasync between two readings of `counters`.
fn per_flush_of(before: Option<(f64, f64)>, after: Option<(f64, f64)>) -> Option<f64> {
    let ((a0, f0), (a1, f1)) = (before?, after?);
    (f1 > f0).then(|| (a1 - a0) / (f1 - f0))
}

/// `clients` connections each POST `body` to `path` again and again until
/// `d` has passed; every request's latency. `check` looks at each answer's
/// body (the status must be 200).
async fn closed_loop(
    addr: &str,
    clients: usize,
    d: Duration,
    path: String,
    headers: Vec<(&'static str, String)>,
    body: Bytes,
    check: fn(&[u8]) -> Res<()>,
) -> Res<Summary> {
    let mut conns = Vec::with_capacity(clients);
    for _ in 0..clients {
        conns.push(Conn::open(addr).await?);
    }
    let (path, headers) = (Arc::new(path), Arc::new(headers));
    let started = Instant::now();
    let deadline = started + d;
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|mut c| {
            let (path, headers, body) = (Arc::clone(&path), Arc::clone(&headers), body.clone());
            Task(tokio::spawn(async move {
                let h: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
                let mut lat = Vec::with_capacity(4096);
                while Instant::now() < deadline {
                    let t = Instant::now();
                    let answer = c.ok(Method::POST, &path, &h, body.clone()).await?;
                    lat.push(t.elapsed().as_nanos() as u64);
                    check(&answer)?;
                }
                Ok::<_, Failure>(lat)
            }))
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.join().await??);
    }
    Ok(summarize(all, started.elapsed()))
}

fn stamped(size: usize, nanos: u64) -> Bytes {
    let mut v = format!("{nanos:0STAMP_LEN$}").into_bytes();
    v.resize(size.max(STAMP_LEN), b'x');
    Bytes::from(v)
}

fn stamp_of(delivery: &Value) -> Res<u64> {
    delivery["value"]
        .as_str()
        .and_then(|v| v.get(..STAMP_LEN))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| fail(format!("a delivery without a stamp: {delivery}")))
}

/// A record's header `name`, as a string.
fn header<'a>(record: &'a Value, name: &str) -> Option<&'a str> {
    record["headers"].as_array()?.iter().find(|h| h[0] == name).and_then(|h| h[1].as_str())
}

/// One producer (one connection) produces stamped records back to back for
/// `d`; one worker (another connection) long-polls the group's fetch, takes
/// the time each record arrives, and acks them. From the produce being sent
/// to the fetch returning the record.
async fn end_to_end(t: &Target, q: &str, size: usize, d: Duration, durability: &str) -> Res<Summary> {
    let mut setup = Conn::open(&t.data).await?;
    setup.ok(Method::PUT, &format!("/v1/queues/{q}"), &[], Bytes::new()).await?;
    // Created before the first produce, so that it starts at offset 0.
    setup.ok(Method::PUT, &format!("/v1/queues/{q}/groups/workers"), &[], Bytes::new()).await?;
    let mut producer = Conn::open(&t.data).await?;
    let mut worker = Conn::open(&t.data).await?;
    let t0 = Instant::now();
    let produced = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let fetch = format!("/v1/queues/{q}/groups/workers/fetch?max=100&wait_ms={FETCH_WAIT_MS}");
    let ack = format!("/v1/queues/{q}/groups/workers/deliveries");
    let task = {
        let (produced, done) = (Arc::clone(&produced), Arc::clone(&done));
        Task(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut empty_after_done = 0;
            loop {
                // Read before fetching: once the producer is done, all it produced is durable.
                let finished = done.load(Ordering::Acquire);
                if finished && lat.len() as u64 >= produced.load(Ordering::Acquire) {
                    return Ok(lat);
                }
                let v = worker.json(Method::POST, &fetch, &[], Bytes::new()).await?;
                let now = t0.elapsed().as_nanos() as u64;
                let deliveries = v["deliveries"].as_array().cloned().unwrap_or_default();
                for dl in &deliveries {
                    lat.push(now.saturating_sub(stamp_of(dl)?));
                }
                for dl in &deliveries {
                    let id = dl["id"].as_str().unwrap_or_default();
                    worker.ok(Method::POST, &format!("{ack}/{id}/ack"), &[], Bytes::new()).await?;
                }
                if finished && deliveries.is_empty() {
                    empty_after_done += 1;
                    if empty_after_done * FETCH_WAIT_MS > 10_000 {
                        return Err(fail(format!(
                            "the group fetched {} of the {} records produced",
                            lat.len(),
                            produced.load(Ordering::Acquire)
                        )));
                    }
                }
            }
        }))
    };
    let path = format!("/v1/queues/{q}/records");
    let h = [("walq-durability", durability)];
    let mut n = 0u64;
    let result = async {
        while t0.elapsed() < d {
            let body = stamped(size, t0.elapsed().as_nanos() as u64);
            producer.ok(Method::POST, &path, &h, body).await?;
            n += 1;
        }
        Ok::<_, Failure>(())
    }
    .await;
    produced.store(n, Ordering::Release);
    done.store(true, Ordering::Release);
    result?;
    let lat = task.join().await??;
    Ok(summarize(lat, t0.elapsed()))
}

/// One client, one worker. The client produces a request (durable) with
/// `Walq-Reply-To` and `Walq-Correlation-Id`, then long-polls its reply
/// queue until the reply with that id arrives; the worker fetches through a
/// group of prefetch 1, produces the reply (as durable) and acks.
async fn request_reply(
    t: &Target,
    prefix: &str,
    value: &Bytes,
    d: Duration,
    durability: &str,
) -> Res<Summary> {
    let (req_q, reply_q) = (format!("{prefix}-requests"), format!("{prefix}-replies"));
    let mut setup = Conn::open(&t.data).await?;
    for q in [&req_q, &reply_q] {
        setup.ok(Method::PUT, &format!("/v1/queues/{q}"), &[], Bytes::new()).await?;
    }
    setup
        .ok(
            Method::PUT,
            &format!("/v1/queues/{req_q}/groups/responders"),
            &[("content-type", "application/json")],
            Bytes::from_static(br#"{"prefetch": 1}"#),
        )
        .await?;
    let stop = Arc::new(AtomicBool::new(false));
    let mut w = Conn::open(&t.data).await?;
    let worker = {
        let stop = Arc::clone(&stop);
        let fetch = format!("/v1/queues/{req_q}/groups/responders/fetch?max=1&wait_ms={FETCH_WAIT_MS}");
        let ack = format!("/v1/queues/{req_q}/groups/responders/deliveries");
        let durability = durability.to_string();
        Task(tokio::spawn(async move {
            while !stop.load(Ordering::Acquire) {
                let v = w.json(Method::POST, &fetch, &[], Bytes::new()).await?;
                for dl in v["deliveries"].as_array().into_iter().flatten() {
                    let (Some(to), Some(id)) = (header(dl, "reply_to"), header(dl, "correlation_id")) else {
                        return Err(fail(format!("a request without reply_to or correlation_id: {dl}")));
                    };
                    let body = Bytes::from(dl["value"].as_str().unwrap_or_default().to_string());
                    let h = [("walq-correlation-id", id), ("walq-durability", durability.as_str())];
                    w.ok(Method::POST, &format!("/v1/queues/{to}/records"), &h, body).await?;
                    let delivery = dl["id"].as_str().unwrap_or_default();
                    w.ok(Method::POST, &format!("{ack}/{delivery}/ack"), &[], Bytes::new()).await?;
                }
            }
            Ok::<_, Failure>(())
        }))
    };
    let mut c = Conn::open(&t.data).await?;
    let produce = format!("/v1/queues/{req_q}/records");
    let mut lat = Vec::new();
    let mut next = 0u64;
    let t0 = Instant::now();
    let result = async {
        let mut i = 0u64;
        while t0.elapsed() < d {
            i += 1;
            let id = i.to_string();
            let started = Instant::now();
            let h = [
                ("walq-reply-to", reply_q.as_str()),
                ("walq-correlation-id", id.as_str()),
                ("walq-durability", durability),
            ];
            c.ok(Method::POST, &produce, &h, value.clone()).await?;
            'reply: loop {
                let read = format!("/v1/queues/{reply_q}/records?offset={next}&wait_ms=5000");
                let v = c.json(Method::GET, &read, &[], Bytes::new()).await?;
                next = v["next_offset"].as_u64().unwrap_or(next);
                for r in v["records"].as_array().into_iter().flatten() {
                    if header(r, "correlation_id") == Some(id.as_str()) {
                        break 'reply;
                    }
                }
                if started.elapsed() > Duration::from_secs(15) {
                    return Err(fail(format!("no reply to request {id} within 15 s")));
                }
            }
            lat.push(started.elapsed().as_nanos() as u64);
        }
        Ok::<_, Failure>(())
    }
    .await;
    stop.store(true, Ordering::Release);
    result?;
    worker.join().await??;
    Ok(summarize(lat, t0.elapsed()))
}
