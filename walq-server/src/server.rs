//! The server's life: bind both listeners, open every queue (recovery) while
//! the admin port already answers (`/readyz` 503), serve, then drain on
//! shutdown: readiness off, new produces and fetches refused, in-flight
//! requests finished and long-polls returned within the grace period, every
//! queue synced and closed (its directory lock released). Invariant: a
//! queue is closed only after the data plane stopped answering, so no
//! record is acknowledged after its queue's final sync.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{MatchedPath, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body::{Frame, SizeHint};
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;

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
/// path) and, on the data plane, refuses oversized heads (431: header names
/// and values plus the path and query, summed) and puts a deadline on the
/// body (`body_read_timeout_ms`, then 408 `body_timeout`).
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
    let head_bytes = req.headers().iter().map(|(n, v)| n.as_str().len() + v.len()).sum::<usize>()
        + req.uri().path_and_query().map_or(0, |p| p.as_str().len());
    let response = if listener == "data" && head_bytes > app.config.max_header_bytes {
        ApiError::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "headers_too_large",
            format!(
                "the request headers exceed the server's max_header_bytes ({})",
                app.config.max_header_bytes
            ),
        )
        .into_response()
    } else if listener == "data" && !http_body::Body::is_end_stream(req.body()) {
        let limit = app.config.body_read_timeout();
        next.run(req.map(|body| Body::new(Deadline::new(body, limit)))).await
    } else {
        next.run(req).await
    };
    app.http.observe(listener, &method, &route, response.status().as_u16(), started.elapsed());
    response
}

/// The error a request body gives once its deadline passed; the handlers
/// answer it with 408 `body_timeout`.
#[derive(Debug)]
pub(crate) struct BodyTimeout(pub Duration);

impl std::fmt::Display for BodyTimeout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the request body did not arrive within the server's body_read_timeout_ms ({} ms)",
            self.0.as_millis()
        )
    }
}

impl std::error::Error for BodyTimeout {}

/// A request body that fails once `limit` has passed since the request's
/// head: a client that stalls or trickles its body cannot hold a request
/// (or a drain) for longer than that.
struct Deadline {
    body: Body,
    sleep: Pin<Box<tokio::time::Sleep>>,
    limit: Duration,
}

impl Deadline {
    fn new(body: Body, limit: Duration) -> Deadline {
        Deadline { body, sleep: Box::pin(tokio::time::sleep(limit)), limit }
    }
}

impl http_body::Body for Deadline {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::BoxError>>> {
        let this = &mut *self;
        if let Poll::Ready(frame) = Pin::new(&mut this.body).poll_frame(cx) {
            return Poll::Ready(frame.map(|r| r.map_err(Into::into)));
        }
        if this.sleep.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Some(Err(Box::new(BodyTimeout(this.limit)))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// Most header fields hyper parses in one request; a request with more gets
/// hyper's own bare 431 (no JSON body). Below it, `max_header_bytes` decides.
pub const MAX_HEADER_FIELDS: usize = 256;

/// Room in hyper's read buffer for a request's head: `max_header_bytes` plus
/// the request line and the separators. A head larger than this gets
/// hyper's bare 431 without being buffered further.
fn head_buffer(max_header_bytes: usize) -> usize {
    max_header_bytes.saturating_add(16 << 10).max(8192)
}

/// The HTTP/1 settings of every connection (both listeners).
fn http1_builder(config: &Config) -> http1::Builder {
    let mut b = http1::Builder::new();
    b.timer(TokioTimer::new())
        .header_read_timeout(config.header_read_timeout())
        .max_buf_size(head_buffer(config.max_header_bytes))
        .max_headers(MAX_HEADER_FIELDS)
        .keep_alive(true);
    b
}

/// The connections one listener accepted, each in its own task.
struct Connections {
    tasks: JoinSet<()>,
    graceful: GracefulShutdown,
}

impl Connections {
    /// Accepts connections on `listener` until `stop` resolves, serving each
    /// with `router`; then stops accepting (the listener is closed).
    async fn accept_until(
        listener: TcpListener,
        router: axum::Router,
        builder: http1::Builder,
        stop: impl Future<Output = ()>,
    ) -> Connections {
        let mut conns = Connections { tasks: JoinSet::new(), graceful: GracefulShutdown::new() };
        tokio::pin!(stop);
        loop {
            let accepted = tokio::select! {
                () = &mut stop => break,
                r = listener.accept() => r,
            };
            // Finished connections leave the set as they go.
            while conns.tasks.try_join_next().is_some() {}
            let stream = match accepted {
                Ok((stream, _)) => stream,
                Err(e) if is_per_connection(&e) => continue,
                Err(e) => {
                    // Out of file descriptors, say: wait a little, as axum does.
                    tracing::warn!(error = %e, "accepting a connection failed; retrying in a second");
                    tokio::select! {
                        () = &mut stop => break,
                        () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    }
                }
            };
            // Small answers (offsets, acks) go out at once, not after a delayed ACK.
            let _ = stream.set_nodelay(true);
            let conn =
                builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(router.clone()));
            let watched = conns.graceful.watch(conn);
            conns.tasks.spawn(async move {
                if let Err(e) = watched.await {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
            });
        }
        conns
    }

    /// Asks every connection to finish (idle ones close at once, busy ones
    /// after their response), waits at most `within`, then cuts off the rest.
    /// Returns whether every connection finished in time.
    async fn finish(self, within: Duration) -> bool {
        let Connections { mut tasks, graceful } = self;
        let in_time = tokio::time::timeout(within, graceful.shutdown()).await.is_ok();
        if !in_time {
            tasks.abort_all();
        }
        while tasks.join_next().await.is_some() {}
        in_time
    }
}

/// Accept errors that concern one connection only (the client gave up).
fn is_per_connection(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(e.kind(), ConnectionRefused | ConnectionAborted | ConnectionReset)
}

/// Why the server could not start or stop cleanly.
#[derive(Debug)]
#[non_exhaustive]
pub enum ServeError {
    /// A configuration value is out of range.
    Config(String),
    /// The data directory cannot be created, listed or locked.
    DataDir(String),
    /// Another server holds the data directory's lock.
    Locked(String),
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
            ServeError::DataDir(m) | ServeError::Locked(m) => f.write_str(m),
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
        let limits = crate::registry::Limits {
            queues: config.max_queues,
            groups_per_queue: config.max_groups_per_queue,
            consumers_per_queue: config.max_consumers_per_queue,
        };
        let registry = Registry::new(&config.data_dir, config.queue_defaults.clone(), limits)?;
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

    /// What the handlers share, with recovery marked done (for unit tests).
    #[cfg(test)]
    pub(crate) fn ready_app_for_test(&self) -> Arc<App> {
        self.app.ready.store(true, Ordering::Release);
        Arc::clone(&self.app)
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
    ///
    /// The drain takes at most the grace period, plus [`CLOSE_BUDGET`] for
    /// the final syncs: connections still busy when the grace ends are cut
    /// off (their handlers stop), and a close that a stalled disk holds up
    /// longer is reported as [`ServeError::Close`] (what was acknowledged
    /// as `sync` is on disk all the same).
    pub async fn run(self) -> Result<Outcome, ServeError> {
        let Server { app, data, admin } = self;
        let builder = http1_builder(&app.config);
        let mut stopped = app.stopped.subscribe();
        let admin_accept = AbortOnDrop(tokio::spawn(Connections::accept_until(
            admin,
            crate::admin::router(Arc::clone(&app)),
            builder.clone(),
            async move {
                let _ = stopped.wait_for(|s| *s).await;
            },
        )));

        let started = Instant::now();
        let registry = Arc::clone(&app.registry);
        let opened = tokio::task::spawn_blocking(move || registry.open_all()).await;
        let opened = match opened {
            Ok(Ok(n)) => n,
            Ok(Err(e)) => return Err(stop_after_failure(&app, admin_accept, e).await),
            Err(e) => {
                return Err(stop_after_failure(&app, admin_accept, ServeError::Internal(e.to_string())).await);
            }
        };
        app.ready.store(true, Ordering::Release);
        tracing::info!(
            queues = opened,
            took_ms = started.elapsed().as_millis() as u64,
            listen = %data.local_addr().map_or_else(|e| e.to_string(), |a| a.to_string()),
            "ready"
        );

        // The listener keeps accepting for a short while after the drain
        // starts, so that clients get an answer (503 to produces and fetches;
        // acks, nacks and reads still served) instead of a refused connection.
        let linger = drain_linger(app.config.shutdown_grace());
        let mut lingered = app.shutdown.subscribe();
        let mut data_accept = AbortOnDrop(tokio::spawn(Connections::accept_until(
            data,
            crate::api::router(Arc::clone(&app)),
            builder,
            async move {
                let _ = lingered.wait_for(|s| *s).await;
                tokio::time::sleep(linger).await;
            },
        )));
        let _ = app.shutdown.subscribe().wait_for(|s| *s).await;
        let drain_started = Instant::now();
        app.start_shutdown();
        let grace = app.config.shutdown_grace();
        let drained_in_time = match (&mut data_accept.0).await {
            Ok(conns) => {
                let in_time = conns.finish(grace.saturating_sub(drain_started.elapsed())).await;
                if !in_time {
                    tracing::warn!(
                        grace_ms = grace.as_millis() as u64,
                        "grace period over; the requests still running were cut off"
                    );
                }
                in_time
            }
            Err(e) => {
                tracing::error!(error = %e, "the data plane's task failed");
                false
            }
        };
        let closed = close_queues(&app).await;
        app.stopped.send_replace(true);
        finish_admin(admin_accept).await;
        match closed {
            Ok(()) => {
                tracing::info!(drained_in_time, "stopped: every queue synced and closed");
                Ok(Outcome { drained_in_time })
            }
            Err(e) => Err(e),
        }
    }
}

/// The most a shutdown spends syncing and closing the queues once the
/// requests are done (a healthy disk needs milliseconds); a close still
/// running then is left to the process exit.
pub const CLOSE_BUDGET: Duration = Duration::from_secs(3);

/// Syncs and closes every queue, within [`CLOSE_BUDGET`].
async fn close_queues(app: &App) -> Result<(), ServeError> {
    let registry = Arc::clone(&app.registry);
    let closing = tokio::task::spawn_blocking(move || registry.close_all());
    match tokio::time::timeout(CLOSE_BUDGET, closing).await {
        Ok(Ok(Ok(()))) => Ok(()),
        Ok(Ok(Err(e))) => Err(ServeError::Close(e)),
        Ok(Err(e)) => Err(ServeError::Close(e.to_string())),
        Err(_) => Err(ServeError::Close(format!(
            "syncing and closing the queues took longer than {} s (a stalled disk?); records acknowledged as sync are on disk, the rest may not be",
            CLOSE_BUDGET.as_secs()
        ))),
    }
}

/// Stops the admin listener (once the queues are closed: probes answer to the end).
async fn finish_admin(mut admin_accept: AbortOnDrop<Connections>) {
    if let Ok(conns) = (&mut admin_accept.0).await {
        conns.finish(Duration::from_millis(500)).await;
    }
}

/// A listener's task, aborted if [`Server::run`] is dropped before it ends
/// (an embedder's `select!`, say): its connections, in the task's
/// `JoinSet`, go with it, so nothing keeps serving a dropped server.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How long the data listener keeps accepting once a drain starts: a quarter
/// of the grace period, at most two seconds.
fn drain_linger(grace: Duration) -> Duration {
    (grace / 4).min(Duration::from_secs(2))
}

async fn stop_after_failure(app: &App, admin_accept: AbortOnDrop<Connections>, e: ServeError) -> ServeError {
    app.start_shutdown();
    let _ = close_queues(app).await;
    app.stopped.send_replace(true);
    finish_admin(admin_accept).await;
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
