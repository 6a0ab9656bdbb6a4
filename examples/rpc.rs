//! Request/reply over walq queues, the pattern of RabbitMQ's RPC tutorial:
//! a client appends requests carrying `reply_to` (the reply queue's name) and
//! `correlation_id` headers to the `rpc_requests` queue; a server consumes
//! them through a consumer group, computes the answer, appends it to the
//! reply queue with the same correlation id, and acknowledges the request;
//! the client matches replies to its requests by correlation id.
//!
//! ```text
//! cargo run --release --example rpc            # on a temporary directory
//! cargo run --release --example rpc -- /tmp/r  # or on this one
//! ```
//!
//! Every queue is a directory under the base directory; one process holds
//! each queue open, so client and server share them through a small
//! registry (what a broker, or `walq serve`, does for many processes).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use walq::{Queue, Record, StartAt};

/// Opens each named queue once and hands out shared handles.
pub struct Registry {
    base: PathBuf,
    open: Mutex<HashMap<String, Arc<Queue>>>,
}

impl Registry {
    /// A registry of the queues under `base`.
    pub fn new(base: &Path) -> Registry {
        Registry { base: base.to_path_buf(), open: Mutex::new(HashMap::new()) }
    }

    /// The queue `name` (a directory under the base), opened on first use.
    pub fn queue(&self, name: &str) -> walq::Result<Arc<Queue>> {
        let mut open = self.open.lock().expect("registry lock");
        if let Some(q) = open.get(name) {
            return Ok(Arc::clone(q));
        }
        let q = Arc::new(Queue::open(self.base.join(name))?);
        open.insert(name.to_string(), Arc::clone(&q));
        Ok(q)
    }
}

/// The work the server does: Fibonacci numbers, as in the tutorial.
fn fib(n: u64) -> u64 {
    let (mut a, mut b) = (0u64, 1u64);
    for _ in 0..n {
        (a, b) = (b, a.wrapping_add(b));
    }
    a
}

/// Serves requests until `stop` is set: fetch through the group, reply,
/// then acknowledge (a crash between the two replies twice: at-least-once,
/// so clients ignore a correlation id they already have).
pub fn serve(registry: &Registry, stop: &std::sync::atomic::AtomicBool) -> walq::Result<u64> {
    let requests = registry.queue("rpc_requests")?;
    let group = requests.group("rpc_server").open()?;
    let mut worker = group.worker();
    let mut served = 0;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        for d in worker.fetch(32, Duration::from_millis(20))? {
            let rec = d.record();
            let header =
                |name: &str| rec.headers.iter().find(|(n, _)| n == name.as_bytes()).map(|(_, v)| v.clone());
            let (Some(reply_to), Some(correlation_id)) = (header("reply_to"), header("correlation_id"))
            else {
                worker.term(d.id())?; // malformed: to the dead letters
                continue;
            };
            let n: u64 = std::str::from_utf8(&rec.value).ok().and_then(|s| s.parse().ok()).unwrap_or(0);
            let answer = fib(n.min(90)).to_string();
            let reply_to = String::from_utf8_lossy(&reply_to).into_owned();
            registry
                .queue(&reply_to)?
                .append_record(&Record::new(answer.as_bytes()).header(b"correlation_id", &correlation_id))?;
            worker.ack(d.id())?;
            served += 1;
        }
    }
    Ok(served)
}

/// Sends `n` requests (fib(0..n)) and waits for every reply; returns the
/// answers by request.
pub fn call_many(registry: &Registry, client: &str, n: u64) -> walq::Result<BTreeMap<u64, u64>> {
    let reply_queue = format!("rpc_replies_{client}");
    let replies = registry.queue(&reply_queue)?;
    // Only replies from now on; resume here if the client restarts.
    let mut inbox = replies.consumer_from(client, StartAt::Latest)?;
    let requests = registry.queue("rpc_requests")?;
    let mut pending: HashMap<String, u64> = HashMap::new();
    for i in 0..n {
        let correlation_id = format!("{client}-{i}");
        let value = i.to_string();
        requests.append_record(
            &Record::new(value.as_bytes())
                .header(b"reply_to", reply_queue.as_bytes())
                .header(b"correlation_id", correlation_id.as_bytes()),
        )?;
        pending.insert(correlation_id, i);
    }
    let mut answers = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !pending.is_empty() && Instant::now() < deadline {
        for reply in inbox.poll(64, Duration::from_millis(100))? {
            let id = reply.headers.iter().find(|(k, _)| k == b"correlation_id").map(|(_, v)| v.clone());
            let Some(request) = id.and_then(|id| pending.remove(&String::from_utf8_lossy(&id).into_owned()))
            else {
                continue; // a duplicate, or not ours
            };
            let answer = String::from_utf8_lossy(&reply.value).parse().unwrap_or(u64::MAX);
            answers.insert(request, answer);
        }
        inbox.commit_position()?;
    }
    Ok(answers)
}

/// Runs a server thread and two clients against the queues under `base`.
pub fn run(base: &Path, requests_per_client: u64) -> walq::Result<Vec<BTreeMap<u64, u64>>> {
    let registry = Arc::new(Registry::new(base));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let server = {
        let (registry, stop) = (Arc::clone(&registry), Arc::clone(&stop));
        std::thread::spawn(move || serve(&registry, &stop))
    };
    let clients: Vec<_> = ["alice", "bob"]
        .into_iter()
        .map(|name| {
            let registry = Arc::clone(&registry);
            std::thread::spawn(move || call_many(&registry, name, requests_per_client))
        })
        .collect();
    let mut results = Vec::new();
    for c in clients {
        results.push(c.join().expect("client thread")?);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    server.join().expect("server thread")?;
    Ok(results)
}

#[allow(dead_code)]
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let temp;
    let base = match std::env::args_os().nth(1) {
        Some(dir) => PathBuf::from(dir),
        None => {
            temp = tempfile::tempdir()?;
            temp.path().to_path_buf()
        }
    };
    let started = Instant::now();
    let results = run(&base, 30)?;
    for (client, answers) in ["alice", "bob"].iter().zip(&results) {
        let shown: Vec<String> = answers.iter().take(10).map(|(n, f)| format!("fib({n})={f}")).collect();
        println!("{client}: {} replies matched by correlation id: {} ...", answers.len(), shown.join(" "));
    }
    println!("60 durable request/reply round trips in {:.1?}, in {}", started.elapsed(), base.display());
    Ok(())
}
