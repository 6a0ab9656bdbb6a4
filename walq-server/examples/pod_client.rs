//! The application container of `deploy/pod-test.sh`: a small client of `walq serve`
//! that produces, consumes through a group and verifies, over the pod's loopback.
//!
//! HTTP/1.1 by hand over `std::net::TcpStream` (one connection per request, numeric
//! addresses: no DNS, no TLS), so the binary links statically and runs in a `FROM
//! scratch` image. Every request's outcome is one line on stdout (and in `--journal`,
//! a file on the volume the pod's containers share), so the script can check after the
//! fact that every acknowledged record is there:
//!
//! ```text
//! pod_client produce --queue q --acks 3000 --prefix kill    # ack <offset> <value> | status <code> <value> | refused <value> | dropped <value>
//! pod_client consume --queue q --group g --hold 20          # got <offset> <count> | held | acked | redelivered ...
//! pod_client verify --queue q --journal /shared/kill.log    # every "ack <offset> <value>" read back
//! pod_client probe --path /readyz                           # waits for 200 from the admin port
//! pod_client request PUT /v1/queues/q/groups/g '{"ack_durability":"sync"}'
//! pod_client pause                                          # holds the pod's network namespace
//! ```
//!
//! Build it static like `walq` itself:
//! `RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --target
//! x86_64-unknown-linux-gnu -p walq-server --example pod_client`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Connect bound: on loopback a connect either succeeds or is refused at once.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Read and write bound of one request beyond its own long-poll wait.
const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause after a failed request, so a restarting sidecar is not hammered.
const RETRY_PAUSE: Duration = Duration::from_millis(50);
/// The most response bytes read (a read returns at most 1000 small records).
const RESPONSE_BYTES_MAX: u64 = 64 << 20;

/// Why a request got no HTTP answer.
enum Failure {
    /// The connection was never made: nothing was sent.
    Refused(io::Error),
    /// The request was (maybe partly) sent and no complete answer came back.
    Dropped(io::Error),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Refused(e) => write!(f, "refused ({e})"),
            Failure::Dropped(e) => write!(f, "dropped ({e})"),
        }
    }
}

/// One HTTP request on a fresh connection (`Connection: close`: no keep-alive
/// race with a server that is closing idle connections).
fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    wait: Duration,
) -> Result<(u16, Vec<u8>), Failure> {
    let mut stream = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT).map_err(Failure::Refused)?;
    let exchange = |stream: &mut TcpStream| -> io::Result<(u16, Vec<u8>)> {
        stream.set_read_timeout(Some(IO_TIMEOUT + wait))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
            body.len()
        );
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        let mut request = head.into_bytes();
        request.extend_from_slice(body);
        stream.write_all(&request)?;
        let mut raw = Vec::new();
        stream.take(RESPONSE_BYTES_MAX).read_to_end(&mut raw)?;
        parse_response(&raw)
    };
    exchange(&mut stream).map_err(Failure::Dropped)
}

/// Status and body of a complete response (`Content-Length` or chunked).
fn parse_response(raw: &[u8]) -> io::Result<(u16, Vec<u8>)> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::UnexpectedEof, what.to_string());
    let end =
        raw.windows(4).position(|w| w == b"\r\n\r\n").ok_or_else(|| bad("no complete response head"))?;
    let head = std::str::from_utf8(&raw[..end]).map_err(|_| bad("response head is not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| bad("no status line"))?;
    let mut length = None;
    let mut chunked = false;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else { continue };
        let (name, value) = (name.trim().to_ascii_lowercase(), value.trim());
        if name == "content-length" {
            length = value.parse::<usize>().ok();
        } else if name == "transfer-encoding" && value.eq_ignore_ascii_case("chunked") {
            chunked = true;
        }
    }
    let rest = &raw[end + 4..];
    if chunked {
        return dechunk(rest).ok_or_else(|| bad("truncated chunked body")).map(|b| (status, b));
    }
    match length {
        Some(n) if rest.len() >= n => Ok((status, rest[..n].to_vec())),
        Some(_) => Err(bad("truncated body")),
        None => Ok((status, rest.to_vec())),
    }
}

fn dechunk(mut rest: &[u8]) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let eol = rest.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&rest[..eol]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        rest = &rest[eol + 2..];
        if size == 0 {
            return Some(body);
        }
        body.extend_from_slice(rest.get(..size)?);
        rest = rest.get(size + 2..)?;
    }
}

/// Lines to stdout and, if asked, to the journal file (on the shared volume).
struct Out {
    journal: Option<File>,
}

impl Out {
    fn new(journal: Option<&str>) -> io::Result<Arc<Mutex<Out>>> {
        let journal = match journal {
            Some(path) => Some(OpenOptions::new().create(true).append(true).open(path)?),
            None => None,
        };
        Ok(Arc::new(Mutex::new(Out { journal })))
    }

    fn line(out: &Mutex<Out>, text: String) {
        let mut out = out.lock().unwrap_or_else(|p| p.into_inner());
        println!("{text}");
        if let Some(f) = out.journal.as_mut() {
            // The journal is the script's evidence: a failed write must not go unseen.
            writeln!(f, "{text}").expect("writing the journal");
        }
    }
}

/// `--name value` options after the subcommand.
struct Args(HashMap<String, String>, Vec<String>);

impl Args {
    fn parse(args: &[String]) -> Result<Args, String> {
        let (mut named, mut positional) = (HashMap::new(), Vec::new());
        let mut it = args.iter();
        while let Some(a) = it.next() {
            match a.strip_prefix("--") {
                Some(name) => {
                    let value = it.next().ok_or_else(|| format!("--{name} needs a value"))?;
                    named.insert(name.to_string(), value.clone());
                }
                None => positional.push(a.clone()),
            }
        }
        Ok(Args(named, positional))
    }

    fn str(&self, name: &str, default: &str) -> String {
        self.0.get(name).cloned().unwrap_or_else(|| default.to_string())
    }

    fn num(&self, name: &str, default: u64) -> Result<u64, String> {
        match self.0.get(name) {
            Some(v) => v.parse().map_err(|_| format!("--{name} {v}: not a number")),
            None => Ok(default),
        }
    }

    fn addr(&self, name: &str, default: &str) -> Result<SocketAddr, String> {
        let v = self.str(name, default);
        v.parse().map_err(|_| format!("--{name} {v}: not a numeric address"))
    }
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let Some((command, rest)) = argv.split_first() else {
        eprintln!("usage: pod_client produce|consume|verify|probe|request|pause [--option value ...]");
        return ExitCode::from(2);
    };
    let result = Args::parse(rest).and_then(|args| match command.as_str() {
        "produce" => produce(&args),
        "consume" => consume(&args),
        "verify" => verify(&args),
        "probe" => probe(&args),
        "request" => request(&args),
        "pause" => loop {
            // The pod's "pause" container: holds the network namespace the others join.
            std::thread::sleep(Duration::from_secs(3600));
        },
        other => Err(format!("unknown command {other:?}")),
    });
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("pod_client {command}: {e}");
            ExitCode::from(2)
        }
    }
}

/// Produces `--prefix-N` values with `Walq-Durability: sync` from `--conns` threads until
/// `--acks` of them were acknowledged or `--max-ms` passed. Each attempt is a new value;
/// a failed one is not retried (its value may or may not be in the queue: at-least-once).
fn produce(args: &Args) -> Result<bool, String> {
    let addr = args.addr("addr", "127.0.0.1:3600")?;
    let queue = args.str("queue", "orders");
    let prefix = args.str("prefix", "v");
    let target = args.num("acks", 1000)?;
    let conns = args.num("conns", 4)?.max(1);
    let deadline = Instant::now() + Duration::from_millis(args.num("max-ms", 120_000)?);
    let out = Out::new(args.0.get("journal").map(String::as_str)).map_err(|e| format!("journal: {e}"))?;
    let path = format!("/v1/queues/{queue}/records");
    let next = Arc::new(AtomicU64::new(0));
    let acked = Arc::new(AtomicU64::new(0));
    let counts = Arc::new(Mutex::new(BTreeMap::<String, u64>::new()));
    let started = Instant::now();
    let threads: Vec<_> = (0..conns)
        .map(|_| {
            let (next, acked, counts, out, path, prefix) =
                (next.clone(), acked.clone(), counts.clone(), out.clone(), path.clone(), prefix.clone());
            std::thread::spawn(move || {
                while acked.load(Ordering::SeqCst) < target && Instant::now() < deadline {
                    let value = format!("{prefix}-{}", next.fetch_add(1, Ordering::SeqCst));
                    let (kind, line) = produce_one(addr, &path, &value);
                    let failed = kind != "200";
                    if !failed {
                        acked.fetch_add(1, Ordering::SeqCst);
                    }
                    Out::line(&out, line);
                    *counts.lock().unwrap().entry(kind).or_default() += 1;
                    if failed {
                        std::thread::sleep(RETRY_PAUSE);
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().map_err(|_| "a producer thread panicked")?;
    }
    let counts = counts.lock().unwrap();
    let summary: Vec<String> = counts.iter().map(|(k, n)| format!("{k}={n}")).collect();
    let done = acked.load(Ordering::SeqCst);
    Out::line(
        &out,
        format!(
            "produce: attempts={} acked={done} {} in {} ms",
            next.load(Ordering::SeqCst),
            summary.join(" "),
            started.elapsed().as_millis()
        ),
    );
    Ok(done >= target)
}

/// One sync produce of `value`: the outcome's name (a status, `refused`, `dropped`) and
/// its journal line.
fn produce_one(addr: SocketAddr, path: &str, value: &str) -> (String, String) {
    let headers = [("Walq-Durability", "sync"), ("Content-Type", "application/octet-stream")];
    match http(addr, "POST", path, &headers, value.as_bytes(), Duration::ZERO) {
        Ok((200, body)) => {
            match serde_json::from_slice::<Value>(&body).ok().and_then(|v| v["offset"].as_u64()) {
                Some(offset) => ("200".into(), format!("ack {offset} {value}")),
                None => ("200-unreadable".into(), format!("status 200-unreadable {value}")),
            }
        }
        Ok((status, _)) => (status.to_string(), format!("status {status} {value}")),
        Err(Failure::Refused(_)) => ("refused".into(), format!("refused {value}")),
        Err(Failure::Dropped(e)) => ("dropped".into(), format!("dropped {value} {e}")),
    }
}

/// Consumes `--queue` through `--group`, acking each delivery at once, except the first
/// `--hold` whose offset is a multiple of `--hold-every`: those it keeps unacknowledged
/// (as a consumer that crashed with them would) and acks only when they come back. Ends
/// after `--idle` successive empty fetches (errors do not count) or at `--max-ms`.
fn consume(args: &Args) -> Result<bool, String> {
    let addr = args.addr("addr", "127.0.0.1:3600")?;
    let queue = args.str("queue", "orders");
    let group = args.str("group", "workers");
    let max = args.num("max", 20)?;
    let hold = args.num("hold", 0)?;
    let hold_every = args.num("hold-every", 7)?.max(1);
    let idle_needed = args.num("idle", 3)?;
    let deadline = Instant::now() + Duration::from_millis(args.num("max-ms", 120_000)?);
    let out = Out::new(args.0.get("journal").map(String::as_str)).map_err(|e| format!("journal: {e}"))?;
    let base = format!("/v1/queues/{queue}/groups/{group}");
    let (mut held, mut idle) = (HashSet::new(), 0);
    let mut counts = BTreeMap::<&str, u64>::new();
    let wait = Duration::from_millis(1000);
    while idle < idle_needed && Instant::now() < deadline {
        let fetched = http(addr, "POST", &format!("{base}/fetch?max={max}&wait_ms=1000"), &[], b"", wait);
        let deliveries = match fetched {
            Ok((200, body)) => serde_json::from_slice::<Value>(&body)
                .ok()
                .and_then(|v| v["deliveries"].as_array().cloned())
                .ok_or("a fetch answered 200 without deliveries")?,
            other => {
                let what = match other {
                    Ok((status, _)) => status.to_string(),
                    Err(e) => e.to_string(),
                };
                Out::line(&out, format!("fetch-error {what}"));
                *counts.entry("fetch_errors").or_default() += 1;
                idle = 0;
                std::thread::sleep(RETRY_PAUSE);
                continue;
            }
        };
        idle = if deliveries.is_empty() { idle + 1 } else { 0 };
        for d in deliveries {
            let (Some(offset), Some(id), count) =
                (d["offset"].as_u64(), d["id"].as_str(), d["delivery_count"].as_u64())
            else {
                return Err(format!("a delivery without offset or id: {d}"));
            };
            Out::line(&out, format!("got {offset} {}", count.unwrap_or(0)));
            *counts.entry("got").or_default() += 1;
            if held.contains(&offset) {
                Out::line(&out, format!("redelivered {offset} {}", count.unwrap_or(0)));
                *counts.entry("redelivered_held").or_default() += 1;
            } else if (held.len() as u64) < hold && offset % hold_every == 0 {
                held.insert(offset);
                Out::line(&out, format!("held {offset}"));
                *counts.entry("held").or_default() += 1;
                continue;
            }
            let line =
                match http(addr, "POST", &format!("{base}/deliveries/{id}/ack"), &[], b"", Duration::ZERO) {
                    Ok((200, _)) => {
                        *counts.entry("acked").or_default() += 1;
                        format!("acked {offset}")
                    }
                    Ok((status, _)) => {
                        *counts.entry("ack_errors").or_default() += 1;
                        format!("ack-status {offset} {status}")
                    }
                    Err(e) => {
                        *counts.entry("ack_errors").or_default() += 1;
                        format!("ack-error {offset} {e}")
                    }
                };
            Out::line(&out, line);
        }
    }
    let summary: Vec<String> = counts.iter().map(|(k, n)| format!("{k}={n}")).collect();
    Out::line(&out, format!("consume: {} idle={}", summary.join(" "), idle >= idle_needed));
    Ok(idle >= idle_needed)
}

/// Reads `--queue` from its first offset and checks every `ack <offset> <value>` line of
/// the journals (`--journal` files, comma-separated, or stdin): the record at that
/// offset must hold that value. Also says how many unanswered produces were kept anyway.
fn verify(args: &Args) -> Result<bool, String> {
    let addr = args.addr("addr", "127.0.0.1:3600")?;
    let queue = args.str("queue", "orders");
    let mut lines = Vec::new();
    match args.0.get("journal") {
        Some(paths) => {
            for path in paths.split(',') {
                let f = File::open(path).map_err(|e| format!("{path}: {e}"))?;
                lines.extend(BufReader::new(f).lines().map_while(Result::ok));
            }
        }
        None => lines.extend(io::stdin().lock().lines().map_while(Result::ok)),
    }
    let mut records = HashMap::<u64, String>::new();
    let mut offset = 0;
    loop {
        let path = format!("/v1/queues/{queue}/records?offset={offset}&max=1000");
        let body = match http(addr, "GET", &path, &[], b"", Duration::ZERO) {
            Ok((200, body)) => body,
            Ok((status, body)) => return Err(format!("{path}: {status} {}", String::from_utf8_lossy(&body))),
            Err(e) => return Err(format!("{path}: {e}")),
        };
        let v: Value = serde_json::from_slice(&body).map_err(|e| format!("{path}: {e}"))?;
        let batch = v["records"].as_array().ok_or("a read without records")?;
        if batch.is_empty() {
            break;
        }
        for r in batch {
            let o = r["offset"].as_u64().ok_or("a record without offset")?;
            records.insert(o, r["value"].as_str().unwrap_or("<not UTF-8>").to_string());
        }
        offset = v["next_offset"].as_u64().ok_or("a read without next_offset")?;
    }
    let values: HashSet<&str> = records.values().map(String::as_str).collect();
    let (mut acked, mut missing, mut unanswered, mut unanswered_kept) = (0, 0, 0, 0);
    for line in &lines {
        let words: Vec<&str> = line.split(' ').collect();
        match words.as_slice() {
            ["ack", o, value] => {
                acked += 1;
                let o: u64 = o.parse().map_err(|_| format!("bad journal line {line:?}"))?;
                if records.get(&o).map(String::as_str) != Some(*value) {
                    missing += 1;
                    println!("MISSING offset {o}: acknowledged {value:?}, found {:?}", records.get(&o));
                }
            }
            ["dropped", value, ..] | ["status", _, value] => {
                unanswered += 1;
                unanswered_kept += u64::from(values.contains(value));
            }
            _ => {}
        }
    }
    println!(
        "verify: records={} acked={acked} missing={missing} failed_or_dropped={unanswered} of_which_stored={unanswered_kept}",
        records.len()
    );
    Ok(missing == 0)
}

/// Waits up to `--timeout-ms` for `--path` on `--addr` (the admin port) to answer `--expect`.
fn probe(args: &Args) -> Result<bool, String> {
    let addr = args.addr("addr", "127.0.0.1:9600")?;
    let path = args.str("path", "/readyz");
    let expect = args.num("expect", 200)?;
    let deadline = Instant::now() + Duration::from_millis(args.num("timeout-ms", 30_000)?);
    loop {
        let last = match http(addr, "GET", &path, &[], b"", Duration::ZERO) {
            Ok((status, _)) if u64::from(status) == expect => {
                println!("probe {path}: {status}");
                return Ok(true);
            }
            Ok((status, body)) => format!("{status} {}", String::from_utf8_lossy(&body)),
            Err(e) => e.to_string(),
        };
        if Instant::now() >= deadline {
            println!("probe {path}: wanted {expect}, last answer {last}");
            return Ok(false);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `request METHOD PATH [BODY]`: one request; prints the status and body; true on 2xx.
fn request(args: &Args) -> Result<bool, String> {
    let addr = args.addr("addr", "127.0.0.1:3600")?;
    let [method, path, body @ ..] = args.1.as_slice() else {
        return Err("usage: request METHOD PATH [BODY]".into());
    };
    let body = body.first().map(String::as_bytes).unwrap_or_default();
    match http(addr, method, path, &[("Content-Type", "application/json")], body, Duration::ZERO) {
        Ok((status, body)) => {
            println!("{status} {}", String::from_utf8_lossy(&body));
            Ok((200..300).contains(&status))
        }
        Err(e) => Err(e.to_string()),
    }
}
