//! `/metrics` in the Prometheus text format (version 0.0.4), written by hand:
//! per-queue figures from `Queue::stats` (the flush latency histogram with
//! walq's own bucket bounds), consumer lag, group state, and the HTTP
//! requests this server answered. Invariant: histogram buckets are cumulative
//! and end with `+Inf` equal to `_count`.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::Duration;

use crate::registry::Registry;

/// Upper bounds (seconds) of the HTTP request latency buckets.
const HTTP_BUCKETS_SECONDS: [f64; 14] =
    [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 30.0];

#[derive(Debug, Default)]
struct RouteLatency {
    buckets: [u64; HTTP_BUCKETS_SECONDS.len()],
    count: u64,
    sum_seconds: f64,
}

/// (listener, method, matched route, status).
type RequestKey = (&'static str, String, String, u16);

/// Counters of the HTTP requests answered, by listener, method, route and status.
#[derive(Debug, Default)]
pub(crate) struct HttpMetrics {
    requests: Mutex<BTreeMap<RequestKey, u64>>,
    latency: Mutex<BTreeMap<(&'static str, String), RouteLatency>>,
}

impl HttpMetrics {
    /// Counts one answered request. `route` is the matched route pattern
    /// (never the raw path, so that the label set stays bounded).
    pub(crate) fn observe(
        &self,
        listener: &'static str,
        method: &str,
        route: &str,
        status: u16,
        took: Duration,
    ) {
        let key = (listener, method.to_string(), route.to_string(), status);
        *self.requests.lock().unwrap_or_else(|e| e.into_inner()).entry(key).or_default() += 1;
        let secs = took.as_secs_f64();
        let mut lat = self.latency.lock().unwrap_or_else(|e| e.into_inner());
        let l = lat.entry((listener, route.to_string())).or_default();
        if let Some(i) = HTTP_BUCKETS_SECONDS.iter().position(|&b| secs <= b) {
            l.buckets[i] += 1;
        }
        l.count += 1;
        l.sum_seconds += secs;
    }
}

/// Escapes a label value (backslash, quote, newline).
fn label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Everything `/metrics` shows, rendered now.
pub(crate) fn render(
    registry: &Registry,
    http: &HttpMetrics,
    ready: bool,
    draining: bool,
    long_polls: usize,
) -> String {
    let mut out = String::new();
    let o = &mut out;
    let head = |o: &mut String, name: &str, kind: &str, help: &str| {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
    };
    head(o, "walq_ready", "gauge", "1 when recovery is done and the server is not draining.");
    let _ = writeln!(o, "walq_ready {}", u8::from(ready && !draining));
    head(o, "walq_draining", "gauge", "1 while the server shuts down.");
    let _ = writeln!(o, "walq_draining {}", u8::from(draining));
    head(o, "walq_long_polls", "gauge", "Requests waiting for records now.");
    let _ = writeln!(o, "walq_long_polls {long_polls}");

    let queues = registry.list();
    let stats: Vec<_> = queues.iter().map(|e| (label(&e.name), e.queue.stats())).collect();
    let per_queue =
        |o: &mut String, name: &str, kind: &str, help: &str, f: &dyn Fn(&walq::Stats) -> String| {
            head(o, name, kind, help);
            for (q, s) in &stats {
                let _ = writeln!(o, "{name}{{queue=\"{q}\"}} {}", f(s));
            }
        };
    per_queue(o, "walq_appends_total", "counter", "Records appended since the queue was opened.", &|s| {
        s.appends.to_string()
    });
    per_queue(
        o,
        "walq_append_bytes_total",
        "counter",
        "Value bytes appended since the queue was opened.",
        &|s| s.bytes.to_string(),
    );
    per_queue(
        o,
        "walq_flushes_total",
        "counter",
        "fdatasync calls on segment data (group-commit rounds).",
        &|s| s.syncs.to_string(),
    );
    per_queue(
        o,
        "walq_records_per_flush",
        "gauge",
        "Records one fdatasync covered, on average since open.",
        &|s| format!("{}", s.records_per_sync_mean),
    );
    per_queue(o, "walq_next_offset", "gauge", "The offset the next append gets.", &|s| {
        s.next_offset.to_string()
    });
    per_queue(o, "walq_first_offset", "gauge", "The first offset the log holds.", &|s| {
        s.first_offset.to_string()
    });
    per_queue(
        o,
        "walq_durable_offset",
        "gauge",
        "Offset after the last record an fdatasync covered.",
        &|s| s.durable_offset.to_string(),
    );
    per_queue(o, "walq_segments", "gauge", "Segment files in the log.", &|s| s.segments.to_string());
    per_queue(o, "walq_poisoned", "gauge", "1 if a failed write or sync poisoned the queue.", &|s| {
        u8::from(s.poisoned).to_string()
    });

    head(
        o,
        "walq_flush_duration_seconds",
        "histogram",
        "Latency of flush rounds (writes and fdatasync) since open.",
    );
    for (q, s) in &stats {
        // One bucket per bound plus the last, above every bound: that one is `+Inf`.
        let mut cumulative = 0u64;
        for (i, n) in s.sync_histogram.iter().enumerate() {
            cumulative += n;
            let le = match walq::SYNC_HISTOGRAM_BOUNDS_MICROS.get(i) {
                Some(&micros) => format!("{}", f64::from(micros) / 1e6),
                None => "+Inf".to_string(),
            };
            let _ =
                writeln!(o, "walq_flush_duration_seconds_bucket{{queue=\"{q}\",le=\"{le}\"}} {cumulative}");
        }
        let sum = s.sync_micros_total as f64 / 1e6;
        let _ = writeln!(o, "walq_flush_duration_seconds_sum{{queue=\"{q}\"}} {sum}");
        let _ = writeln!(o, "walq_flush_duration_seconds_count{{queue=\"{q}\"}} {cumulative}");
    }

    head(
        o,
        "walq_consumer_lag",
        "gauge",
        "Records from a named consumer's committed position to the end of the log.",
    );
    let mut positions = String::new();
    for e in &queues {
        let q = label(&e.name);
        for c in e.queue.consumers() {
            let _ =
                writeln!(o, "walq_consumer_lag{{queue=\"{q}\",consumer=\"{}\"}} {}", label(&c.name), c.lag);
            let _ = writeln!(
                positions,
                "walq_consumer_position{{queue=\"{q}\",consumer=\"{}\"}} {}",
                label(&c.name),
                c.position
            );
        }
    }
    head(o, "walq_consumer_position", "gauge", "A named consumer's committed position.");
    o.push_str(&positions);

    let mut groups = Vec::new();
    for e in &queues {
        let open = e.groups.lock().unwrap_or_else(|e| e.into_inner()).clone();
        for info in e.queue.groups() {
            let dead = open
                .get(&info.name)
                .and_then(|(g, _)| g.dead_letters().map(|d| d.next_offset() - d.first_offset()));
            groups.push((label(&e.name), label(&info.name), info, dead));
        }
    }
    type GroupFigure = fn(&walq::GroupInfo) -> u64;
    let figures: [(&str, &str, &str, GroupFigure); 5] = [
        ("walq_group_pending", "gauge", "Deliveries in flight (handed out, not acknowledged).", |g| {
            g.pending
        }),
        ("walq_group_waiting_redelivery", "gauge", "Records waiting for redelivery.", |g| {
            g.waiting_redelivery
        }),
        ("walq_group_unacked", "gauge", "Records appended and not yet done.", |g| g.unacked),
        ("walq_group_ack_floor", "gauge", "Every record below this offset is done.", |g| g.ack_floor),
        (
            "walq_group_dead_lettered_total",
            "counter",
            "Records sent to the dead letters since the group was opened.",
            |g| g.stats.dead_lettered,
        ),
    ];
    for (name, kind, help, f) in figures {
        head(o, name, kind, help);
        for (q, g, info, _) in &groups {
            let _ = writeln!(o, "{name}{{queue=\"{q}\",group=\"{g}\"}} {}", f(info));
        }
    }
    head(
        o,
        "walq_group_dead_letters",
        "gauge",
        "Records in a group's dead-letter queue (groups open in this server).",
    );
    for (q, g, _, dead) in &groups {
        if let Some(n) = dead {
            let _ = writeln!(o, "walq_group_dead_letters{{queue=\"{q}\",group=\"{g}\"}} {n}");
        }
    }

    head(
        o,
        "walq_http_requests_total",
        "counter",
        "HTTP requests answered, by listener, method, route and status.",
    );
    for ((listener, method, route, status), n) in
        http.requests.lock().unwrap_or_else(|e| e.into_inner()).iter()
    {
        let _ = writeln!(
            o,
            "walq_http_requests_total{{listener=\"{listener}\",method=\"{}\",route=\"{}\",status=\"{status}\"}} {n}",
            label(method),
            label(route)
        );
    }
    head(o, "walq_http_request_duration_seconds", "histogram", "Time to answer an HTTP request, by route.");
    for ((listener, route), l) in http.latency.lock().unwrap_or_else(|e| e.into_inner()).iter() {
        let labels = format!("listener=\"{listener}\",route=\"{}\"", label(route));
        let mut cumulative = 0;
        for (b, n) in HTTP_BUCKETS_SECONDS.iter().zip(l.buckets) {
            cumulative += n;
            let _ =
                writeln!(o, "walq_http_request_duration_seconds_bucket{{{labels},le=\"{b}\"}} {cumulative}");
        }
        let _ = writeln!(o, "walq_http_request_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {}", l.count);
        let _ = writeln!(o, "walq_http_request_duration_seconds_sum{{{labels}}} {}", l.sum_seconds);
        let _ = writeln!(o, "walq_http_request_duration_seconds_count{{{labels}}} {}", l.count);
    }
    out
}
