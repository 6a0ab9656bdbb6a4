//! The server's configuration (flags, `WALQ_*` variables and a TOML file all
//! fill this one struct), per-queue and per-group options, and the small
//! text grammars of durability modes and start positions. Invariant: every
//! value is validated by [`Config::validate`] before anything is bound or opened.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Default data-plane address: the pod's loopback only.
pub const LISTEN_DEFAULT: &str = "127.0.0.1:3600";
/// Default admin address (probes and metrics), reachable by the kubelet and Prometheus.
pub const ADMIN_LISTEN_DEFAULT: &str = "0.0.0.0:9600";
/// Default bound on a request body (a batch of records, or one record).
pub const BODY_BYTES_DEFAULT: usize = 8 << 20;
/// Default bound on the request line's headers, summed (names and values).
pub const HEADER_BYTES_DEFAULT: usize = 64 << 10;
/// Default and hard bound on a long-poll's wait.
pub const LONG_POLL_MAX_MS_DEFAULT: u64 = 30_000;
/// Default number of requests that may wait (long-poll) at once.
pub const LONG_POLLS_DEFAULT: usize = 256;
/// Default most records one read or fetch returns.
pub const READ_RECORDS_DEFAULT: usize = 1000;
/// Default bound on the values one read returns, summed (at least one record is returned).
pub const READ_BYTES_DEFAULT: usize = 4 << 20;
/// Default drain time after SIGTERM: below Kubernetes' default grace of 30 s.
pub const SHUTDOWN_GRACE_MS_DEFAULT: u64 = 25_000;
/// Default most queues one server holds open.
pub const QUEUES_DEFAULT: usize = 1024;
/// Default most consumer groups one queue may have.
pub const GROUPS_PER_QUEUE_DEFAULT: usize = 100;
/// Default most named consumers one queue may have.
pub const CONSUMERS_PER_QUEUE_DEFAULT: usize = 1000;
/// Default time a client has to send a request's head (also how long an idle
/// keep-alive connection stays open).
pub const HEADER_READ_TIMEOUT_MS_DEFAULT: u64 = 30_000;
/// Default time a client has to send a request's whole body, from its head.
pub const BODY_READ_TIMEOUT_MS_DEFAULT: u64 = 30_000;
/// The interval of `interval` without a number.
pub const INTERVAL_DEFAULT: Duration = Duration::from_millis(100);

/// Everything `walq serve` can be told. Every field has a default; a TOML
/// file may set any subset (unknown keys are an error), and flags or
/// `WALQ_*` variables override the file.
///
/// ```
/// let config = walq_server::Config::from_toml("data_dir = '/var/lib/walq'\nmax_long_polls = 64").unwrap();
/// assert_eq!(config.max_long_polls, 64);
/// assert_eq!(config.listen.to_string(), "127.0.0.1:3600");
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The directory of named queues: one subdirectory per queue.
    pub data_dir: PathBuf,
    /// The data plane's address (produce, read, consumers, groups).
    pub listen: SocketAddr,
    /// The admin address: `/livez`, `/readyz`, `/metrics`.
    pub admin_listen: SocketAddr,
    /// Largest request body accepted (413 above it), in bytes.
    pub max_body_bytes: usize,
    /// Largest sum of request header names and values (431 above it), in bytes.
    pub max_header_bytes: usize,
    /// Longest wait a read or fetch may ask for (`wait_ms` is clamped to it).
    pub long_poll_max_ms: u64,
    /// Requests that may wait at once; more get 429 with `Retry-After`.
    pub max_long_polls: usize,
    /// Most records one read or fetch returns (`max` is clamped to it).
    pub max_records_per_read: usize,
    /// Bound on the summed values one read returns (at least one record is).
    pub max_read_bytes: usize,
    /// How long a shutdown waits for in-flight requests before it stops them.
    pub shutdown_grace_ms: u64,
    /// Most queues the server holds; creating another is 409 `queue_limit`.
    pub max_queues: usize,
    /// Most consumer groups per queue; creating another is 409 `group_limit`.
    pub max_groups_per_queue: usize,
    /// Most named consumers per queue; creating another is 409 `consumer_limit`.
    pub max_consumers_per_queue: usize,
    /// How long a client may take to send a request's head, and how long an
    /// idle keep-alive connection stays open; then the connection is closed.
    pub header_read_timeout_ms: u64,
    /// How long a client may take to send a request's whole body, counted
    /// from its head; then the request fails with 408 `body_timeout`.
    pub body_read_timeout_ms: u64,
    /// Options of queues created without options of their own.
    pub queue_defaults: QueueOptions,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            data_dir: PathBuf::from("walq-data"),
            listen: LISTEN_DEFAULT.parse().expect("a valid default address"),
            admin_listen: ADMIN_LISTEN_DEFAULT.parse().expect("a valid default address"),
            max_body_bytes: BODY_BYTES_DEFAULT,
            max_header_bytes: HEADER_BYTES_DEFAULT,
            long_poll_max_ms: LONG_POLL_MAX_MS_DEFAULT,
            max_long_polls: LONG_POLLS_DEFAULT,
            max_records_per_read: READ_RECORDS_DEFAULT,
            max_read_bytes: READ_BYTES_DEFAULT,
            shutdown_grace_ms: SHUTDOWN_GRACE_MS_DEFAULT,
            max_queues: QUEUES_DEFAULT,
            max_groups_per_queue: GROUPS_PER_QUEUE_DEFAULT,
            max_consumers_per_queue: CONSUMERS_PER_QUEUE_DEFAULT,
            header_read_timeout_ms: HEADER_READ_TIMEOUT_MS_DEFAULT,
            body_read_timeout_ms: BODY_READ_TIMEOUT_MS_DEFAULT,
            queue_defaults: QueueOptions::default(),
        }
    }
}

impl Config {
    /// Reads a configuration from TOML text (missing keys keep their defaults).
    pub fn from_toml(text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    /// Reads a configuration from a TOML file.
    pub fn from_file(path: &std::path::Path) -> Result<Config, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
        Config::from_toml(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Checks every value; the error names the option and the accepted range.
    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("max_body_bytes", self.max_body_bytes as u64),
            ("max_header_bytes", self.max_header_bytes as u64),
            ("max_long_polls", self.max_long_polls as u64),
            ("max_records_per_read", self.max_records_per_read as u64),
            ("max_read_bytes", self.max_read_bytes as u64),
            ("max_queues", self.max_queues as u64),
            ("max_groups_per_queue", self.max_groups_per_queue as u64),
            ("max_consumers_per_queue", self.max_consumers_per_queue as u64),
            ("header_read_timeout_ms", self.header_read_timeout_ms),
            ("body_read_timeout_ms", self.body_read_timeout_ms),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(format!("{name} must be at least 1"));
            }
        }
        if self.long_poll_max_ms > 600_000 {
            return Err("long_poll_max_ms must be at most 600000 (10 minutes)".into());
        }
        for (name, v) in [
            ("header_read_timeout_ms", self.header_read_timeout_ms),
            ("body_read_timeout_ms", self.body_read_timeout_ms),
        ] {
            if v > 3_600_000 {
                return Err(format!("{name} must be at most 3600000 (an hour)"));
            }
        }
        // The defaults of new queues are checked now, not at the first produce.
        self.queue_defaults
            .builder(std::path::Path::new("."))
            .validate()
            .map_err(|e| format!("the queue defaults: {e}"))?;
        if self.data_dir.as_os_str().is_empty() {
            return Err("data_dir must not be empty".into());
        }
        Ok(())
    }

    /// The long-poll bound as a duration.
    pub fn long_poll_max(&self) -> Duration {
        Duration::from_millis(self.long_poll_max_ms)
    }

    /// The header read timeout as a duration.
    pub fn header_read_timeout(&self) -> Duration {
        Duration::from_millis(self.header_read_timeout_ms)
    }

    /// The body read timeout as a duration.
    pub fn body_read_timeout(&self) -> Duration {
        Duration::from_millis(self.body_read_timeout_ms)
    }

    /// The shutdown grace period as a duration.
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_millis(self.shutdown_grace_ms)
    }
}

/// Options of one queue, given when it is created (`PUT /v1/queues/{name}`)
/// or taken from [`Config::queue_defaults`]; saved beside the queue in
/// `serve-options.json` so that a restart opens it the same way.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QueueOptions {
    /// The queue's durability mode (what a produce without `Walq-Durability`
    /// gets, and what readers see): `sync` (default), `os`, `interval[:MS]`.
    pub durability: DurabilitySpec,
    /// Segment size (walq's default if unset).
    pub segment_bytes: Option<u64>,
    /// Largest encoded record (walq's default, 1 MiB, if unset).
    pub max_record_bytes: Option<usize>,
    /// Retention: remove the oldest segments above this many bytes.
    pub retention_max_bytes: Option<u64>,
    /// Retention: remove segments whose newest record is older than this.
    pub retention_max_age_ms: Option<u64>,
    /// Retention in queue mode: remove what every consumer and group has finished.
    pub queue_mode: bool,
    /// Backpressure: produces beyond this many bytes get 429 `queue_full`.
    pub max_bytes: Option<u64>,
}

impl QueueOptions {
    /// The walq builder for a queue in `dir` with these options.
    pub fn builder(&self, dir: &std::path::Path) -> walq::QueueBuilder {
        let mut b = walq::Queue::builder(dir).durability(self.durability.0);
        if let Some(n) = self.segment_bytes {
            b = b.segment_bytes(n);
        }
        if let Some(n) = self.max_record_bytes {
            b = b.max_record_bytes(n);
        }
        let mut r = walq::Retention::default().queue_mode(self.queue_mode);
        if let Some(n) = self.retention_max_bytes {
            r = r.max_bytes(n);
        }
        if let Some(ms) = self.retention_max_age_ms {
            r = r.max_age(Duration::from_millis(ms));
        }
        b = b.retention(r);
        if let Some(n) = self.max_bytes {
            b = b.max_bytes(n);
        }
        b
    }

    /// The record size limit the queue enforces.
    pub fn record_limit(&self) -> usize {
        self.max_record_bytes.unwrap_or(walq::RECORD_BYTES_DEFAULT)
    }
}

/// Options of one consumer group (`PUT /v1/queues/{q}/groups/{g}`); unset
/// fields take walq's defaults. Saved beside the queue like [`QueueOptions`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GroupOptions {
    /// Where a new group starts: `earliest` (default), `latest`, `offset:N`, `timestamp:MS`.
    pub start: Option<StartSpec>,
    /// Redelivery deadline of a delivery (default 30000).
    pub ack_wait_ms: Option<u64>,
    /// Deliveries before the dead letters (default 5; 0 for no limit).
    pub max_deliver: Option<u32>,
    /// Most deliveries one fetch hands out (default 256).
    pub prefetch: Option<usize>,
    /// Durability of acks: `sync`, `os`, `interval[:MS]` (default `interval:100`).
    pub ack_durability: Option<DurabilitySpec>,
    /// Whether given-up records go to the dead letters (default true).
    pub dead_letters: Option<bool>,
}

impl GroupOptions {
    /// Opens the group `name` of `queue` with these options.
    pub fn open(&self, queue: &walq::Queue, name: &str) -> walq::Result<walq::Group> {
        let mut b = queue.group(name);
        if let Some(s) = self.start {
            b = b.start(s.0);
        }
        if let Some(ms) = self.ack_wait_ms {
            b = b.ack_wait(Duration::from_millis(ms));
        }
        if let Some(n) = self.max_deliver {
            b = b.max_deliver(n);
        }
        if let Some(n) = self.prefetch {
            b = b.prefetch(n);
        }
        if let Some(d) = self.ack_durability {
            b = b.ack_durability(d.0);
        }
        if let Some(on) = self.dead_letters {
            b = b.dead_letters(on);
        }
        b.open()
    }

    /// These options as they act: walq's default wherever one is unset, and
    /// no `start` (it only matters when the group is created). Two requests
    /// for an existing group are compared by this, so spelling out a default
    /// is the same as leaving it unset.
    ///
    /// ```
    /// let unset = walq_server::GroupOptions::default();
    /// let spelled = walq_server::GroupOptions { prefetch: Some(walq::PREFETCH_DEFAULT), ..Default::default() };
    /// assert_eq!(unset.in_effect(), spelled.in_effect());
    /// ```
    pub fn in_effect(&self) -> GroupOptions {
        GroupOptions {
            start: None,
            ack_wait_ms: Some(
                self.ack_wait_ms
                    .unwrap_or(u64::try_from(walq::ACK_WAIT_DEFAULT.as_millis()).unwrap_or(u64::MAX)),
            ),
            max_deliver: Some(self.max_deliver.unwrap_or(walq::MAX_DELIVER_DEFAULT)),
            prefetch: Some(self.prefetch.unwrap_or(walq::PREFETCH_DEFAULT)),
            ack_durability: Some(self.ack_durability.unwrap_or(DurabilitySpec(walq::ACK_DURABILITY_DEFAULT))),
            dead_letters: Some(self.dead_letters.unwrap_or(true)),
        }
    }

    /// The most deliveries one fetch may hand out.
    pub fn prefetch(&self) -> usize {
        self.prefetch.unwrap_or(walq::PREFETCH_DEFAULT).max(1)
    }
}

/// A [`walq::Durability`] written as text: `sync`, `os`, `interval`
/// (100 ms) or `interval:MS` (an optional `ms` suffix is accepted).
///
/// ```
/// use walq_server::DurabilitySpec;
/// let d: DurabilitySpec = "interval:250ms".parse().unwrap();
/// assert_eq!(d.0, walq::Durability::Interval(std::time::Duration::from_millis(250)));
/// assert_eq!(d.to_string(), "interval:250");
/// assert!("fast".parse::<DurabilitySpec>().is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct DurabilitySpec(pub walq::Durability);

impl std::str::FromStr for DurabilitySpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim().to_ascii_lowercase();
        let d = match t.as_str() {
            "sync" => walq::Durability::Sync,
            "os" => walq::Durability::Os,
            "interval" => walq::Durability::Interval(INTERVAL_DEFAULT),
            _ => {
                let ms = t
                    .strip_prefix("interval:")
                    .map(|n| n.strip_suffix("ms").unwrap_or(n))
                    .and_then(|n| n.parse::<u64>().ok())
                    .filter(|&ms| (1..=3_600_000).contains(&ms));
                match ms {
                    Some(ms) => walq::Durability::Interval(Duration::from_millis(ms)),
                    None => {
                        return Err(format!(
                            "{s:?} is not a durability: use sync, os, interval or interval:MS (1 to 3600000)"
                        ));
                    }
                }
            }
        };
        Ok(DurabilitySpec(d))
    }
}

impl std::fmt::Display for DurabilitySpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            walq::Durability::Sync => f.write_str("sync"),
            walq::Durability::Os => f.write_str("os"),
            walq::Durability::Interval(d) => write!(f, "interval:{}", d.as_millis()),
        }
    }
}

impl TryFrom<String> for DurabilitySpec {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<DurabilitySpec> for String {
    fn from(d: DurabilitySpec) -> String {
        d.to_string()
    }
}

/// A [`walq::StartAt`] written as text: `earliest`, `latest`, `offset:N`, `timestamp:MS`.
///
/// ```
/// use walq_server::StartSpec;
/// assert_eq!("offset:7".parse::<StartSpec>().unwrap().0, walq::StartAt::Offset(7));
/// assert!("first".parse::<StartSpec>().is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct StartSpec(pub walq::StartAt);

impl std::str::FromStr for StartSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim().to_ascii_lowercase();
        let number = |p: &str| t.strip_prefix(p).and_then(|n| n.parse::<u64>().ok());
        let start = match t.as_str() {
            "earliest" => walq::StartAt::Earliest,
            "latest" => walq::StartAt::Latest,
            _ => match (number("offset:"), number("timestamp:")) {
                (Some(o), _) => walq::StartAt::Offset(o),
                (_, Some(ms)) => walq::StartAt::Timestamp(ms),
                _ => {
                    return Err(format!(
                        "{s:?} is not a start position: use earliest, latest, offset:N or timestamp:MS"
                    ));
                }
            },
        };
        Ok(StartSpec(start))
    }
}

impl std::fmt::Display for StartSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            walq::StartAt::Earliest => f.write_str("earliest"),
            walq::StartAt::Latest => f.write_str("latest"),
            walq::StartAt::Offset(o) => write!(f, "offset:{o}"),
            walq::StartAt::Timestamp(ms) => write!(f, "timestamp:{ms}"),
        }
    }
}

impl TryFrom<String> for StartSpec {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<StartSpec> for String {
    fn from(s: StartSpec) -> String {
        s.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_a_file_overrides_some() {
        Config::default().validate().unwrap();
        let c = Config::from_toml(
            "listen = '127.0.0.1:0'\n[queue_defaults]\ndurability = 'os'\nsegment_bytes = 1048576\n",
        )
        .unwrap();
        assert_eq!(c.queue_defaults.durability.0, walq::Durability::Os);
        assert_eq!(c.admin_listen, Config::default().admin_listen);
        assert!(Config::from_toml("no_such_key = 1").is_err());
        let c = Config { max_long_polls: 0, ..Config::default() };
        assert!(c.validate().unwrap_err().contains("max_long_polls"));
    }

    #[test]
    fn bad_queue_defaults_are_refused_at_startup_not_at_the_first_produce() {
        let mut c = Config::default();
        c.queue_defaults.segment_bytes = Some(1 << 20);
        c.queue_defaults.max_bytes = Some(1 << 20);
        let e = c.validate().unwrap_err();
        assert!(e.contains("queue defaults") && e.contains("max_bytes"), "{e}");
        c.queue_defaults.max_bytes = Some(2 << 20);
        c.validate().unwrap();
    }

    #[test]
    fn durability_and_start_grammars_round_trip() {
        for s in ["sync", "os", "interval:100", "interval:5"] {
            assert_eq!(s.parse::<DurabilitySpec>().unwrap().to_string(), s);
        }
        for s in ["interval:0", "interval:x", "interval:", "sometimes"] {
            assert!(s.parse::<DurabilitySpec>().is_err(), "{s}");
        }
        for s in ["earliest", "latest", "offset:0", "timestamp:1700000000000"] {
            assert_eq!(s.parse::<StartSpec>().unwrap().to_string(), s);
        }
        assert!("offset:-1".parse::<StartSpec>().is_err());
    }
}
