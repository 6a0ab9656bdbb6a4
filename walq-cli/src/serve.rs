//! `walq serve`: the HTTP sidecar (the `walq-server` crate) on a tokio
//! runtime, configured by flags, `WALQ_*` variables and an optional TOML
//! file (flags and variables override the file). The first SIGTERM or
//! SIGINT drains; a second one exits at once.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use walq_server::{Config, DurabilitySpec, ServeError, Server, Signals};

use crate::{CmdResult, Failure, exit};

pub const SERVE_HELP: &str = "\
Every flag can also be set by the WALQ_* variable shown, or by the key of the
same name (with _ for -) in the --config TOML file; flags and variables
override the file. Queue defaults go in the file's [queue_defaults] table.

Endpoints: the data plane (default 127.0.0.1:3600) serves /v1/queues/...,
the admin listener (default 0.0.0.0:9600) /livez, /readyz and /metrics; see
docs/http-api.md for every endpoint (and GET /openapi.json on the data plane).

Shutdown: SIGTERM, SIGINT or POST /v1/shutdown drains: /readyz turns 503,
new produces get 503, in-flight requests finish, long-polls return, every
queue is synced and closed. A second signal exits at once (records
acknowledged as sync are on disk all the same).

Exit codes: 0 drained and closed; 1 the grace period ran out, or a second
signal forced the exit; 2 usage (a bad flag, file or value); 4 the data
directory or a queue is locked by another process; 5 corrupt data stopped
recovery; 6 I/O error (an address in use included); 7 a newer format.";

/// `walq serve` options. Defaults are walq-server's (shown in brackets).
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// A TOML file of settings (keys as the flags, with _ for -).
    #[arg(long, env = "WALQ_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// The directory of named queues, one subdirectory each [walq-data].
    #[arg(long, env = "WALQ_DATA_DIR", value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// The data plane's address (keep it on loopback in a pod) [127.0.0.1:3600].
    #[arg(long, env = "WALQ_LISTEN", value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// The admin address: /livez, /readyz, /metrics [0.0.0.0:9600].
    #[arg(long, env = "WALQ_ADMIN_LISTEN", value_name = "ADDR")]
    admin_listen: Option<SocketAddr>,
    /// Largest request body; larger ones get 413 [8388608].
    #[arg(long, env = "WALQ_MAX_BODY_BYTES", value_name = "BYTES")]
    max_body_bytes: Option<usize>,
    /// Largest sum of request header names and values; more gets 431 [65536].
    #[arg(long, env = "WALQ_MAX_HEADER_BYTES", value_name = "BYTES")]
    max_header_bytes: Option<usize>,
    /// Longest wait a read or fetch may ask for (wait_ms is clamped) [30000].
    #[arg(long, env = "WALQ_LONG_POLL_MAX_MS", value_name = "MS")]
    long_poll_max_ms: Option<u64>,
    /// Requests that may wait at once; more get 429 [256].
    #[arg(long, env = "WALQ_MAX_LONG_POLLS", value_name = "N")]
    max_long_polls: Option<usize>,
    /// Most records one read or fetch returns [1000].
    #[arg(long, env = "WALQ_MAX_RECORDS_PER_READ", value_name = "N")]
    max_records_per_read: Option<usize>,
    /// Bound on the values one read returns, summed (one record always fits) [4194304].
    #[arg(long, env = "WALQ_MAX_READ_BYTES", value_name = "BYTES")]
    max_read_bytes: Option<usize>,
    /// How long a shutdown waits for in-flight requests [25000].
    #[arg(long, env = "WALQ_SHUTDOWN_GRACE_MS", value_name = "MS")]
    shutdown_grace_ms: Option<u64>,
    /// Most queues the server holds [1024].
    #[arg(long, env = "WALQ_MAX_QUEUES", value_name = "N")]
    max_queues: Option<usize>,
    /// Most consumer groups per queue; more get 409 [100].
    #[arg(long, env = "WALQ_MAX_GROUPS_PER_QUEUE", value_name = "N")]
    max_groups_per_queue: Option<usize>,
    /// Most named consumers per queue; more get 409 [1000].
    #[arg(long, env = "WALQ_MAX_CONSUMERS_PER_QUEUE", value_name = "N")]
    max_consumers_per_queue: Option<usize>,
    /// Time to send a request's head, and the idle keep-alive timeout [30000].
    #[arg(long, env = "WALQ_HEADER_READ_TIMEOUT_MS", value_name = "MS")]
    header_read_timeout_ms: Option<u64>,
    /// Time to send a request's whole body, from its head; then 408 [30000].
    #[arg(long, env = "WALQ_BODY_READ_TIMEOUT_MS", value_name = "MS")]
    body_read_timeout_ms: Option<u64>,
    /// Default durability of new queues: sync, os, interval, interval:MS [sync].
    #[arg(long, env = "WALQ_DURABILITY", value_name = "MODE")]
    durability: Option<DurabilitySpec>,
    /// Default segment size of new queues [67108864].
    #[arg(long, env = "WALQ_SEGMENT_BYTES", value_name = "BYTES")]
    segment_bytes: Option<u64>,
    /// Default record size limit of new queues [1048576].
    #[arg(long, env = "WALQ_MAX_RECORD_BYTES", value_name = "BYTES")]
    max_record_bytes: Option<usize>,
    /// Default retention of new queues: keep at most this many bytes [none].
    #[arg(long, env = "WALQ_RETENTION_MAX_BYTES", value_name = "BYTES")]
    retention_max_bytes: Option<u64>,
    /// Default retention of new queues: remove segments older than this [none].
    #[arg(long, env = "WALQ_RETENTION_MAX_AGE_MS", value_name = "MS")]
    retention_max_age_ms: Option<u64>,
    /// Default retention of new queues: remove what every consumer and group finished [false].
    #[arg(long, env = "WALQ_QUEUE_MODE", value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    queue_mode: Option<bool>,
    /// Default backpressure of new queues: produces beyond this many bytes get 429 [none].
    #[arg(long, env = "WALQ_MAX_BYTES", value_name = "BYTES")]
    max_bytes: Option<u64>,
}

impl ServeArgs {
    /// The file's settings (or the defaults), with every flag or variable given on top.
    fn to_config(&self) -> Result<Config, String> {
        let mut c = match &self.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        macro_rules! set {
            ($($field:ident),*) => { $(if let Some(v) = self.$field.clone() { c.$field = v; })* };
        }
        set!(
            data_dir,
            listen,
            admin_listen,
            max_body_bytes,
            max_header_bytes,
            long_poll_max_ms,
            max_long_polls,
            max_records_per_read,
            max_read_bytes,
            shutdown_grace_ms,
            max_queues,
            max_groups_per_queue,
            max_consumers_per_queue,
            header_read_timeout_ms,
            body_read_timeout_ms
        );
        let q = &mut c.queue_defaults;
        if let Some(d) = self.durability {
            q.durability = d;
        }
        if let Some(on) = self.queue_mode {
            q.queue_mode = on;
        }
        macro_rules! set_opt {
            ($($field:ident),*) => { $(if self.$field.is_some() { q.$field = self.$field; })* };
        }
        set_opt!(segment_bytes, max_record_bytes, retention_max_bytes, retention_max_age_ms, max_bytes);
        c.validate()?;
        Ok(c)
    }
}

fn failure(e: ServeError) -> Failure {
    let code = match &e {
        ServeError::Config(_) => exit::USAGE,
        ServeError::Locked(_) => exit::LOCKED,
        ServeError::Open { source, .. } => crate::walq_exit_code(source),
        _ => exit::IO,
    };
    Failure::Exit(e.to_string(), code)
}

/// Runs the server until it is shut down and drained.
pub fn serve(args: &ServeArgs) -> CmdResult {
    let config = args.to_config().map_err(Failure::Usage)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("walq-serve")
        .build()
        .map_err(|e| Failure::Exit(format!("starting the runtime: {e}"), exit::IO))?;
    let result = runtime.block_on(async {
        let mut signals = Signals::new()
            .map_err(|e| Failure::Exit(format!("installing signal handlers: {e}"), exit::IO))?;
        let server = Server::bind(config).await.map_err(failure)?;
        // One line on stdout, for scripts that asked for port 0.
        println!("walq serve: listening on {}, admin on {}", server.local_addr(), server.admin_addr());
        let handle = server.handle();
        tokio::spawn(async move {
            let first = signals.next().await;
            handle.shutdown();
            tracing::info!("{first}: draining (send it again to exit at once)");
            let second = signals.next().await;
            tracing::warn!("{second} again: exiting without draining");
            // Records acknowledged as `os` reach the OS first (sync ones are on disk already).
            let h = handle.clone();
            let _ = tokio::time::timeout(
                Duration::from_secs(2),
                tokio::task::spawn_blocking(move || h.flush_all()),
            )
            .await;
            std::process::exit(i32::from(exit::PROBLEMS));
        });
        let outcome = server.run().await.map_err(failure)?;
        if outcome.drained_in_time {
            Ok(())
        } else {
            Err(Failure::Exit(
                "the grace period ran out before every request finished; the queues were synced and closed"
                    .into(),
                exit::PROBLEMS,
            ))
        }
    });
    // A blocking task a stalled disk holds (a sync of a request that was cut
    // off) must not keep the process past its grace: stop waiting after 1 s.
    runtime.shutdown_timeout(Duration::from_secs(1));
    result
}
