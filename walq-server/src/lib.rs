//! walq-server: the HTTP sidecar of the walq queue, run by `walq serve`.
//!
//! It serves a directory of named queues (one walq [`Queue`](walq::Queue) per
//! subdirectory, created on first produce) over HTTP/1.1: produce with the
//! durability asked (the answer comes only once the record is that durable;
//! concurrent produces share one fdatasync), read from an offset with
//! long-poll, named consumers, consumer groups with ack, nack, in-progress
//! and term. A second listener answers `/livez`, `/readyz` and `/metrics`.
//! Shutdown drains: readiness off, in-flight requests finished, every queue
//! synced and closed. The HTTP API is documented in `walq-server/README.md`.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let config = walq_server::Config::from_toml("data_dir = '/var/lib/walq'")?;
//! let server = walq_server::Server::bind(config).await?;
//! println!("serving on {}", server.local_addr());
//! let outcome = server.run().await?; // until POST /v1/shutdown or handle.shutdown()
//! # let _ = outcome; Ok(()) }
//! ```

mod admin;
mod api;
mod config;
mod error;
mod json;
mod metrics;
mod registry;
mod server;

pub use api::{BATCH_RECORDS_MAX, headers, openapi};
pub use config::{
    ADMIN_LISTEN_DEFAULT, BODY_BYTES_DEFAULT, Config, DurabilitySpec, GroupOptions, HEADER_BYTES_DEFAULT,
    INTERVAL_DEFAULT, LISTEN_DEFAULT, LONG_POLL_MAX_MS_DEFAULT, LONG_POLLS_DEFAULT, QUEUES_DEFAULT,
    QueueOptions, READ_BYTES_DEFAULT, READ_RECORDS_DEFAULT, SHUTDOWN_GRACE_MS_DEFAULT, StartSpec,
};
pub use error::ApiError;
pub use registry::{LOCK_FILE, NAME_MAX, OPTIONS_FILE, check_queue_name};
pub use server::{CLOSE_BUDGET, MAX_HEADER_FIELDS, Outcome, ServeError, Server, ServerHandle, Signals};
