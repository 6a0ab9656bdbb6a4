//! The server's life: bind both listeners, open every queue (recovery) while
//! the admin port already answers (`/readyz` 503), serve, then drain on
//! shutdown: readiness off, new produces and fetches refused, in-flight
//! requests finished and long-polls returned within the grace period, every
//! queue synced and closed (its directory lock released). Invariant: a
//! queue is closed only after the data plane stopped answering, so no
//! record is acknowledged after its queue's final sync.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

use crate::config::Config;
use crate::error::ApiError;
use crate::metrics::HttpMetrics;
use crate::registry::Registry;

/// What the handlers share.
#[derive(Debug)]
pub(crate) struct App {
    pub config: Config,
    pub registry: Arc<Registry>,
    pub http: HttpMetrics,
    ready: AtomicBool,
    draining: Arc<AtomicBool>,
    /// Turns true once, when the shutdown starts.
    pub shutdown: watch::Sender<bool>,
    /// Turns true when the queues are closed (the admin port then stops).
    stopped: watch::Sender<bool>,
    long_polls: Arc<Semaphore>,
}

impl App {
    /// 503 `shutting_down` while draining.
    pub(crate) fn accepting(&self) -> Result<(), ApiError> {
        if self.is_draining() { Err(ApiError::shutting_down()) } else { Ok(()) }
    }

    pub(crate) fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// The flag blocking tasks poll to return early.
    pub(crate) fn draining_flag(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.draining)
    }

    pub(crate) fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire) && !self.is_draining()
    }

    /// A slot for a request that waits; 429 when `max_long_polls` are waiting.
    pub(crate) fn long_poll_permit(&self) -> Result<OwnedSemaphorePermit, ApiError> {
        Arc::clone(&self.long_polls).try_acquire_owned().map_err(|_| ApiError {
            retry_after: Some(1),
            ..ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_long_polls",
                format!(
                    "{} requests are already waiting (max_long_polls); retry shortly",
                    self.config.max_long_polls
                ),
            )
        })
    }

    pub(crate) fn long_polls_waiting(&self) -> usize {
        self.config.max_long_polls - self.long_polls.available_permits()
    }

    /// Starts the drain (idempotent).
    pub(crate) fn start_shutdown(&self) {
        if !self.draining.swap(true, Ordering::AcqRel) {
            tracing::info!("draining: readiness off, new produces refused, waiting for in-flight requests");
        }
        self.shutdown.send_replace(true);
    }
}

/// Counts every request for `/metrics` (by matched route, never the raw
/// path) and, on the data plane, refuses oversized headers (431).
pub(crate) async fn track(
    State((app, listener)): State<(Arc<App>, &'static str)>,
    req: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    // A fixed set of label values: a client inventing methods must not
    // grow the metrics without bound.
    let method = match req.method().as_str() {
        m @ ("GET" | "POST" | "PUT" | "DELETE" | "HEAD" | "PATCH" | "OPTIONS") => m,
        _ => "other",
    }
    .to_string();
    let route = req.extensions().get::<MatchedPath>().map_or("unmatched", |m| m.as_str()).to_string();
    let header_bytes: usize = req.headers().iter().map(|(n, v)| n.as_str().len() + v.len()).sum();
    let response = if listener == "data" && header_bytes > app.config.max_header_bytes {
        ApiError::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "headers_too_large",
            format!(
                "the request headers exceed the server's max_header_bytes ({})",
                app.config.max_header_bytes
            ),
        )
        .into_response()
    } else {
        next.run(req).await
    };
    app.http.observe(listener, &method, &route, response.status().as_u16(), started.elapsed());
    response
}

/// Why the server could not start or stop cleanly.
#[derive(Debug)]
#[non_exhaustive]
pub enum ServeError {
    /// A configuration value is out of range.
    Config(String),
    /// The data directory cannot be created or is held by another server.
    DataDir(String),
    /// A listener could not be bound.
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// A queue could not be opened at startup.
    Open {
        /// The queue's name.
        queue: String,
        /// Why (`Locked`, `Corrupt`, `UnsupportedFormat`, ...).
        source: walq::Error,
    },
    /// The server's task failed.
    Internal(String),
    /// A queue could not be synced and closed at shutdown.
    Close(String),
}

impl std::fmt::Display for ServeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ServeError::Config(m) => write!(f, "invalid configuration: {m}"),
            ServeError::DataDir(m) => f.write_str(m),
            ServeError::Bind { addr, source } => write!(f, "cannot listen on {addr}: {source}"),
            ServeError::Open { queue, source } => write!(f, "opening queue {queue:?}: {source}"),
            ServeError::Internal(m) => write!(f, "internal error: {m}"),
            ServeError::Close(m) => write!(f, "shutdown: {m}"),
        }
    }
}

impl std::error::Error for ServeError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ServeError::Bind { source, .. } => Some(source),
            ServeError::Open { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Outcome {
    /// Every in-flight request finished within the grace period (else the
    /// rest were cut off; the queues were synced and closed all the same).
    pub drained_in_time: bool,
}

/// A bound, not yet running server: [`Server::bind`], then [`Server::run`].
///
/// ```no_run
/// # async fn demo() -> Result<(), walq_server::ServeError> {
/// let config = walq_server::Config { data_dir: "/var/lib/walq".into(), ..Default::default() };
/// let server = walq_server::Server::bind(config).await?;
/// let handle = server.handle(); // handle.shutdown() drains it from anywhere
/// let outcome = server.run().await?;
/// assert!(outcome.drained_in_time);
/// # drop(handle); Ok(()) }
/// ```
#[derive(Debug)]
pub struct Server {
    app: Arc<App>,
    data: tokio::net::TcpListener,
    admin: tokio::net::TcpListener,
}

impl Server {
    /// Validates the configuration, takes the data directory's lock and
    /// binds both listeners (port 0 picks a free port). No queue is opened yet.
    pub async fn bind(config: Config) -> Result<Server, ServeError> {
        config.validate().map_err(ServeError::Config)?;
        let registry = Registry::new(&config.data_dir, config.queue_defaults.clone(), config.max_queues)
            .map_err(ServeError::DataDir)?;
        let bind = |addr: SocketAddr| async move {
            tokio::net::TcpListener::bind(addr).await.map_err(|source| ServeError::Bind { addr, source })
        };
        let data = bind(config.listen).await?;
        let admin = bind(config.admin_listen).await?;
        let app = Arc::new(App {
            long_polls: Arc::new(Semaphore::new(config.max_long_polls)),
            config,
            registry: Arc::new(registry),
            http: HttpMetrics::default(),
            ready: AtomicBool::new(false),
            draining: Arc::new(AtomicBool::new(false)),
            shutdown: watch::Sender::new(false),
            stopped: watch::Sender::new(false),
        });
        Ok(Server { app, data, admin })
    }

    /// The data plane's bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.data.local_addr().expect("a bound listener has an address")
    }

    /// The admin listener's bound address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin.local_addr().expect("a bound listener has an address")
    }

    /// A handle to shut the server down and look at its state.
    pub fn handle(&self) -> ServerHandle {
        ServerHandle { app: Arc::clone(&self.app) }
    }

    /// Opens every queue, serves until [`ServerHandle::shutdown`] (or
    /// `POST /v1/shutdown`), then drains and closes everything.
    pub async fn run(self) -> Result<Outcome, ServeError> {
        let Server { app, data, admin } = self;
        let mut stopped = app.stopped.subscribe();
        let admin_server =
            axum::serve(admin, crate::admin::router(Arc::clone(&app))).with_graceful_shutdown(async move {
                let _ = stopped.wait_for(|s| *s).await;
            });
        let admin_task = tokio::spawn(async move { admin_server.await });

        let started = Instant::now();
        let registry = Arc::clone(&app.registry);
        let opened = tokio::task::spawn_blocking(move || registry.open_all()).await;
        let opened = match opened {
            Ok(Ok(n)) => n,
            Ok(Err(e)) => return Err(stop_after_failure(&app, admin_task, e).await),
            Err(e) => {
                return Err(stop_after_failure(&app, admin_task, ServeError::Internal(e.to_string())).await);
            }
        };
        app.ready.store(true, Ordering::Release);
        tracing::info!(
            queues = opened,
            took_ms = started.elapsed().as_millis() as u64,
            listen = %data.local_addr().map_or_else(|e| e.to_string(), |a| a.to_string()),
            "ready"
        );

        let mut shutdown = app.shutdown.subscribe();
        let mut graceful = app.shutdown.subscribe();
        // The listener keeps accepting for a short while after the drain
        // starts, so that clients get an answer (503 to produces and fetches;
        // acks, nacks and reads still served) instead of a reset connection.
        let linger = drain_linger(app.config.shutdown_grace());
        let data_server =
            axum::serve(data, crate::api::router(Arc::clone(&app))).with_graceful_shutdown(async move {
                let _ = graceful.wait_for(|s| *s).await;
                tokio::time::sleep(linger).await;
            });
        let mut data_task = tokio::spawn(async move { data_server.await });
        let finished = tokio::select! {
            _ = shutdown.wait_for(|s| *s) => false,
            r = &mut data_task => {
                if !app.is_draining() {
                    tracing::error!(result = ?r, "the data plane stopped by itself");
                }
                true
            }
        };
        app.start_shutdown();
        let grace = app.config.shutdown_grace();
        let drained_in_time = finished
            || match tokio::time::timeout(grace, &mut data_task).await {
                Ok(_) => true,
                Err(_) => {
                    tracing::warn!(
                        grace_ms = grace.as_millis() as u64,
                        "grace period over; cutting off the requests still running"
                    );
                    data_task.abort();
                    false
                }
            };
        let registry = Arc::clone(&app.registry);
        let closed = tokio::task::spawn_blocking(move || registry.close_all()).await;
        app.stopped.send_replace(true);
        let _ = admin_task.await;
        match closed {
            Ok(Ok(())) => {
                tracing::info!(drained_in_time, "stopped: every queue synced and closed");
                Ok(Outcome { drained_in_time })
            }
            Ok(Err(e)) => Err(ServeError::Close(e)),
            Err(e) => Err(ServeError::Close(e.to_string())),
        }
    }
}

/// How long the data listener keeps accepting once a drain starts: a quarter
/// of the grace period, at most two seconds.
fn drain_linger(grace: Duration) -> Duration {
    (grace / 4).min(Duration::from_secs(2))
}

async fn stop_after_failure(
    app: &App,
    admin_task: tokio::task::JoinHandle<std::io::Result<()>>,
    e: ServeError,
) -> ServeError {
    app.start_shutdown();
    let registry = Arc::clone(&app.registry);
    let _ = tokio::task::spawn_blocking(move || registry.close_all()).await;
    app.stopped.send_replace(true);
    let _ = admin_task.await;
    e
}

/// Shuts a running [`Server`] down, from any task or thread.
#[derive(Debug, Clone)]
pub struct ServerHandle {
    app: Arc<App>,
}

impl ServerHandle {
    /// Starts the drain (idempotent); [`Server::run`] returns when it is done.
    pub fn shutdown(&self) {
        self.app.start_shutdown();
    }

    /// Whether recovery is done and the server is not draining (`/readyz`).
    pub fn is_ready(&self) -> bool {
        self.app.is_ready()
    }

    /// Syncs every queue's pending records now (blocking: call it off the
    /// runtime). For a forced exit, so that records acknowledged as `os`
    /// reach the OS before the process ends.
    pub fn flush_all(&self) -> walq::Result<()> {
        self.app.registry.flush_all()
    }
}

/// SIGTERM and SIGINT, as a stream: the first starts the drain, a second
/// one (the caller decides) forces the exit.
#[derive(Debug)]
pub struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    /// Installs the handlers (inside a tokio runtime). From here on the
    /// signals no longer kill the process by themselves.
    pub fn new() -> std::io::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals { term: signal(SignalKind::terminate())?, int: signal(SignalKind::interrupt())? })
    }

    /// Waits for the next SIGTERM or SIGINT; returns its name.
    pub async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}
