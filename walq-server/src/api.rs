//! The data plane: produce, read with long-poll, named consumers, consumer
//! groups, queue list and info, and `POST /v1/shutdown`. Handlers never block
//! a runtime thread: appends are awaited (`append_batch_async_with`), and
//! file I/O, syncs and group fetches run in `spawn_blocking`. Invariant: a
//! produce answers with an offset only after the record is as durable as
//! the request asked.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};
use walq::{DeliveryId, OwnedRecord, Queue, Record};

use crate::config::{DurabilitySpec, GroupOptions, QueueOptions, StartSpec};
use crate::error::ApiError;
use crate::json::{self, InBytes, InHeaders};
use crate::registry::{Entry, blocking};
use crate::server::App;

/// How long one blocking group fetch waits before it checks for shutdown.
const FETCH_SLICE: Duration = Duration::from_millis(100);
/// Most records in one batch request.
pub const BATCH_RECORDS_MAX: usize = 10_000;

/// Request headers of a produce.
pub mod headers {
    /// The record's key (raw header bytes).
    pub const KEY: &str = "walq-key";
    /// A record header, `name=value`; repeat it for several.
    pub const HEADER: &str = "walq-header";
    /// `sync` (the queue's default unless it says otherwise), `os`, `interval`, `interval:MS`.
    pub const DURABILITY: &str = "walq-durability";
    /// The record's timestamp, milliseconds since the Unix epoch (default: now).
    pub const TIMESTAMP: &str = "walq-timestamp";
    /// Shorthand for the record header `reply_to` (request/reply).
    pub const REPLY_TO: &str = "walq-reply-to";
    /// Shorthand for the record header `correlation_id` (request/reply).
    pub const CORRELATION_ID: &str = "walq-correlation-id";
}

/// The data-plane router.
pub(crate) fn router(app: Arc<App>) -> axum::Router {
    let body_limit = app.config.max_body_bytes;
    axum::Router::new()
        .route("/v1/queues", get(list_queues))
        .route("/v1/queues/{queue}", get(queue_info).put(create_queue))
        .route("/v1/queues/{queue}/records", post(produce).get(read))
        .route("/v1/queues/{queue}/batch", post(produce_batch))
        .route("/v1/queues/{queue}/consumers", get(list_consumers))
        .route(
            "/v1/queues/{queue}/consumers/{consumer}",
            get(consumer_info).put(create_consumer).delete(delete_consumer),
        )
        .route("/v1/queues/{queue}/consumers/{consumer}/records", get(consumer_read))
        .route("/v1/queues/{queue}/consumers/{consumer}/commit", post(commit))
        .route("/v1/queues/{queue}/groups", get(list_groups))
        .route("/v1/queues/{queue}/groups/{group}", get(group_info).put(create_group))
        .route("/v1/queues/{queue}/groups/{group}/fetch", post(fetch))
        .route("/v1/queues/{queue}/groups/{group}/deliveries/{id}/{action}", post(settle))
        .route("/v1/queues/{queue}/groups/{group}/dead-letters", get(dead_letters))
        .route("/v1/shutdown", post(shutdown))
        .fallback(no_route)
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(axum::middleware::from_fn_with_state((Arc::clone(&app), "data"), crate::server::track))
        .with_state(app)
}

type ApiResult = Result<Response, ApiError>;

/// Refuses new work while draining: checked when the request's head has
/// arrived, before its body is read, so that a request already under way
/// when the drain starts completes.
struct Accepting;

impl axum::extract::FromRequestParts<Arc<App>> for Accepting {
    type Rejection = ApiError;
    async fn from_request_parts(
        _parts: &mut axum::http::request::Parts,
        app: &Arc<App>,
    ) -> Result<Accepting, ApiError> {
        app.accepting().map(|()| Accepting)
    }
}

fn query<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    q.map(|Query(t)| t).map_err(|e| ApiError::bad_request(e.body_text()))
}

fn path<T>(p: Result<Path<T>, PathRejection>) -> Result<T, ApiError> {
    p.map(|Path(t)| t).map_err(|e| ApiError::bad_request(e.body_text()))
}

fn body(b: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    b.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                "the request body exceeds the server's max_body_bytes",
            )
        } else if let Some(t) = body_timeout(&e) {
            ApiError::new(StatusCode::REQUEST_TIMEOUT, "body_timeout", t.to_string())
        } else {
            ApiError::bad_request(e.body_text())
        }
    })
}

/// The deadline error of [`crate::server::track`]'s body wrapper, if that
/// is why the body could not be read.
fn body_timeout(e: &BytesRejection) -> Option<&crate::server::BodyTimeout> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(err) = source {
        if let Some(t) = err.downcast_ref::<crate::server::BodyTimeout>() {
            return Some(t);
        }
        source = err.source();
    }
    None
}

/// A JSON body, or the default when the body is empty.
fn json_body<T: serde::de::DeserializeOwned + Default>(b: &Bytes) -> Result<T, ApiError> {
    if b.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(b).map_err(|e| ApiError::bad_request(format!("the JSON body: {e}")))
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn ok(status: StatusCode, v: Value) -> ApiResult {
    Ok((status, Json(v)).into_response())
}

async fn no_route() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "no_route", "no such endpoint; see walq-server/README.md")
}

async fn shutdown(State(app): State<Arc<App>>) -> ApiResult {
    tracing::info!("shutdown requested over HTTP");
    app.start_shutdown();
    ok(StatusCode::ACCEPTED, json!({"status": "draining"}))
}

// ---- queues ----

fn queue_json(e: &Entry) -> Value {
    let s = e.queue.stats();
    let opts = e.saved.lock().unwrap_or_else(|e| e.into_inner()).queue.clone();
    json!({
        "name": e.name,
        "first_offset": s.first_offset,
        "next_offset": s.next_offset,
        "durable_offset": s.durable_offset,
        "visible_offset": s.visible_offset,
        "segments": s.segments,
        "appends": s.appends,
        "bytes": s.bytes,
        "flushes": s.syncs,
        "records_per_flush_mean": s.records_per_sync_mean,
        "poisoned": s.poisoned,
        "options": opts,
    })
}

async fn list_queues(State(app): State<Arc<App>>) -> ApiResult {
    // Stats read the journal's damage flag under its lock: off the runtime.
    let registry = Arc::clone(&app.registry);
    let queues: Vec<Value> =
        blocking(move || Ok(registry.list().iter().map(|e| queue_json(e)).collect())).await?;
    ok(StatusCode::OK, json!({ "queues": queues }))
}

async fn queue_info(State(app): State<Arc<App>>, p: Result<Path<String>, PathRejection>) -> ApiResult {
    let e = app.registry.existing(&path(p)?)?;
    let v = blocking(move || {
        let mut v = queue_json(&e);
        v["consumers"] = consumers_json(&e.queue);
        v["groups"] = groups_json(&e);
        Ok(v)
    })
    .await?;
    ok(StatusCode::OK, v)
}

async fn create_queue(
    State(app): State<Arc<App>>,
    p: Result<Path<String>, PathRejection>,
    b: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let name = path(p)?;
    let b = body(b)?;
    let options: Option<QueueOptions> =
        if b.iter().all(u8::is_ascii_whitespace) { None } else { Some(json_body(&b)?) };
    let (e, created) = app.registry.get_or_create(&name, options).await?;
    let status = if created { StatusCode::CREATED } else { StatusCode::OK };
    let mut v = queue_json(&e);
    v["created"] = json!(created);
    ok(status, v)
}

// ---- produce ----

/// What the produce headers say about the record.
struct ProduceHeaders {
    key: Option<Vec<u8>>,
    headers: Vec<(Vec<u8>, Vec<u8>)>,
    durability: Option<walq::Durability>,
    timestamp_ms: Option<u64>,
}

fn header_text<'a>(h: &'a axum::http::HeaderValue, name: &str) -> Result<&'a str, ApiError> {
    h.to_str().map_err(|_| ApiError::bad_request(format!("header {name} must be visible ASCII")))
}

fn durability_header(map: &HeaderMap) -> Result<Option<walq::Durability>, ApiError> {
    match map.get(headers::DURABILITY) {
        Some(v) => {
            let d: DurabilitySpec =
                header_text(v, headers::DURABILITY)?.parse().map_err(ApiError::bad_request)?;
            Ok(Some(d.0))
        }
        None => Ok(None),
    }
}

fn produce_headers(map: &HeaderMap) -> Result<ProduceHeaders, ApiError> {
    let mut out = ProduceHeaders {
        key: map.get(headers::KEY).map(|v| v.as_bytes().to_vec()),
        headers: Vec::new(),
        durability: durability_header(map)?,
        timestamp_ms: None,
    };
    if let Some(v) = map.get(headers::TIMESTAMP) {
        let t = header_text(v, headers::TIMESTAMP)?;
        out.timestamp_ms = Some(t.trim().parse().map_err(|_| {
            ApiError::bad_request(format!(
                "{}: {t:?} is not milliseconds since the Unix epoch",
                headers::TIMESTAMP
            ))
        })?);
    }
    for v in map.get_all(headers::HEADER) {
        let raw = v.as_bytes();
        match raw.iter().position(|&b| b == b'=') {
            Some(i) if i > 0 => out.headers.push((raw[..i].to_vec(), raw[i + 1..].to_vec())),
            _ => {
                return Err(ApiError::bad_request(format!(
                    "{} must be name=value with a name",
                    headers::HEADER
                )));
            }
        }
    }
    if let Some(v) = map.get(headers::REPLY_TO) {
        out.headers.push((b"reply_to".to_vec(), v.as_bytes().to_vec()));
    }
    if let Some(v) = map.get(headers::CORRELATION_ID) {
        out.headers.push((b"correlation_id".to_vec(), v.as_bytes().to_vec()));
    }
    Ok(out)
}

/// The queue's durability unless the request named one.
fn durability_for(e: &Entry, asked: Option<walq::Durability>) -> walq::Durability {
    asked.unwrap_or_else(|| e.saved.lock().unwrap_or_else(|e| e.into_inner()).queue.durability.0)
}

async fn produce(
    _accepting: Accepting,
    State(app): State<Arc<App>>,
    p: Result<Path<String>, PathRejection>,
    map: HeaderMap,
    b: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let name = path(p)?;
    let b = body(b)?;
    let h = produce_headers(&map)?;
    let (e, _) = app.registry.get_or_create(&name, None).await?;
    let durability = durability_for(&e, h.durability);
    let timestamp_ms = h.timestamp_ms.unwrap_or_else(now_ms);
    let mut record = Record::new(&b).timestamp_ms(timestamp_ms);
    if let Some(k) = &h.key {
        record = record.key(k);
    }
    for (n, v) in &h.headers {
        record = record.header(n, v);
    }
    // The records are copied into the pending batch by this call; the
    // future completes when they are as durable as asked (many concurrent
    // requests share one fdatasync).
    let pending = e.queue.append_batch_async_with(std::slice::from_ref(&record), durability);
    let range = pending.await?;
    ok(
        StatusCode::OK,
        json!({"offset": range.start, "timestamp_ms": timestamp_ms, "durability": DurabilitySpec(durability)}),
    )
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchIn {
    #[serde(default)]
    durability: Option<DurabilitySpec>,
    #[serde(default)]
    records: Vec<RecordIn>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RecordIn {
    value: InBytes,
    #[serde(default)]
    key: Option<InBytes>,
    #[serde(default)]
    headers: Option<InHeaders>,
    #[serde(default)]
    timestamp_ms: Option<u64>,
}

struct RecordOwned {
    value: Vec<u8>,
    key: Option<Vec<u8>>,
    headers: Vec<(Vec<u8>, Vec<u8>)>,
    timestamp_ms: u64,
}

impl RecordOwned {
    fn record(&self) -> Record<'_> {
        let mut r = Record::new(&self.value).timestamp_ms(self.timestamp_ms);
        if let Some(k) = &self.key {
            r = r.key(k);
        }
        for (n, v) in &self.headers {
            r = r.header(n, v);
        }
        r
    }
}

fn decode_record(r: RecordIn, now: u64) -> Result<RecordOwned, String> {
    Ok(RecordOwned {
        value: r.value.into_bytes().map_err(|e| format!("value: {e}"))?,
        key: r.key.map(|k| k.into_bytes().map_err(|e| format!("key: {e}"))).transpose()?,
        headers: r
            .headers
            .map(InHeaders::into_pairs)
            .transpose()
            .map_err(|e| format!("headers: {e}"))?
            .unwrap_or_default(),
        timestamp_ms: r.timestamp_ms.unwrap_or(now),
    })
}

async fn produce_batch(
    _accepting: Accepting,
    State(app): State<Arc<App>>,
    p: Result<Path<String>, PathRejection>,
    map: HeaderMap,
    b: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let name = path(p)?;
    let b = body(b)?;
    let batch: BatchIn = json_body(&b)?;
    if batch.records.is_empty() || batch.records.len() > BATCH_RECORDS_MAX {
        return Err(ApiError::bad_request(format!("a batch holds 1 to {BATCH_RECORDS_MAX} records")));
    }
    let asked = match batch.durability {
        Some(d) => Some(d.0),
        None => durability_header(&map)?,
    };
    let (e, _) = app.registry.get_or_create(&name, None).await?;
    let durability = durability_for(&e, asked);
    let limit = e.saved.lock().unwrap_or_else(|e| e.into_inner()).queue.record_limit();
    let now = now_ms();
    // Each entry is checked on its own: a bad one gets its error, the good
    // ones are appended together (one batch, one fdatasync).
    let mut results: Vec<Result<RecordOwned, ApiError>> = Vec::with_capacity(batch.records.len());
    for r in batch.records {
        let decoded = decode_record(r, now).map_err(ApiError::bad_request).and_then(|r| {
            let len = r.record().encoded_len();
            if len > limit { Err(walq::Error::RecordTooLarge { len, max: limit }.into()) } else { Ok(r) }
        });
        results.push(decoded);
    }
    let good: Vec<Record<'_>> =
        results.iter().filter_map(|r| r.as_ref().ok()).map(RecordOwned::record).collect();
    let mut next = None;
    if !good.is_empty() {
        let pending = e.queue.append_batch_async_with(&good, durability);
        drop(good);
        next = Some(pending.await?.start);
    }
    let mut appended = 0u64;
    let out: Vec<Value> = results
        .iter()
        .map(|r| match r {
            Ok(rec) => {
                let offset = next.map(|n| n + appended).expect("an appended record has an offset");
                appended += 1;
                json!({"offset": offset, "timestamp_ms": rec.timestamp_ms})
            }
            Err(err) => json!({"error": {"code": err.code, "message": err.message}}),
        })
        .collect();
    ok(
        StatusCode::OK,
        json!({"results": out, "appended": appended, "durability": DurabilitySpec(durability)}),
    )
}

// ---- reading ----

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReadQuery {
    offset: Option<u64>,
    max: Option<usize>,
    wait_ms: Option<u64>,
    max_bytes: Option<usize>,
    /// Consumers only: where a consumer that does not exist yet starts.
    start: Option<StartSpec>,
}

struct ReadLimits {
    max: usize,
    max_bytes: usize,
    wait: Duration,
}

impl ReadLimits {
    fn new(app: &App, q: &ReadQuery) -> ReadLimits {
        let c = &app.config;
        ReadLimits {
            max: q.max.unwrap_or(100).clamp(1, c.max_records_per_read),
            max_bytes: q.max_bytes.unwrap_or(c.max_read_bytes).clamp(1, c.max_read_bytes),
            wait: Duration::from_millis(q.wait_ms.unwrap_or(0)).min(c.long_poll_max()),
        }
    }
}

/// The bytes a record takes in a response's budget: key, headers and value.
fn record_bytes(r: &OwnedRecord) -> usize {
    r.key.as_ref().map_or(0, Vec::len)
        + r.headers.iter().map(|(n, v)| n.len() + v.len()).sum::<usize>()
        + r.value.len()
}

/// Up to `max` records from `from` (records summing to at most `max_bytes`,
/// but always one if there is one); the offset to read next. Blocking.
fn read_some(
    queue: &Queue,
    from: u64,
    max: usize,
    max_bytes: usize,
) -> walq::Result<(Vec<OwnedRecord>, u64)> {
    let mut reader = queue.read_from(from)?;
    let (mut out, mut bytes) = (Vec::new(), 0usize);
    while out.len() < max {
        let Some(r) = reader.next()? else { break };
        let size = record_bytes(&r.to_owned_record());
        if !out.is_empty() && bytes + size > max_bytes {
            break;
        }
        bytes += size;
        out.push(r.to_owned_record());
    }
    let next = out.last().map_or(from, |r| r.offset + 1);
    Ok((out, next))
}

/// Reads from `from`, waiting up to `limits.wait` for a first record: woken
/// by the library when a record at `from` becomes visible; returns early
/// (empty) when the server starts shutting down.
async fn read_waiting(
    app: &App,
    queue: Arc<Queue>,
    from: u64,
    limits: &ReadLimits,
) -> Result<(Vec<OwnedRecord>, u64), ApiError> {
    let deadline = Instant::now() + limits.wait;
    let mut permit = None;
    let mut shutdown = app.shutdown.subscribe();
    loop {
        let (q, max, max_bytes) = (Arc::clone(&queue), limits.max, limits.max_bytes);
        let got = blocking(move || read_some(&q, from, max, max_bytes).map_err(ApiError::from)).await?;
        let now = Instant::now();
        if !got.0.is_empty() || now >= deadline || app.is_draining() {
            return Ok(got);
        }
        if permit.is_none() {
            permit = Some(app.long_poll_permit()?);
        }
        // Woken exactly when a record at `from` becomes visible (by any
        // append: through this server or not, `sync`, `os` or `interval`).
        tokio::select! {
            _ = queue.wait_visible_async(from) => {}
            _ = tokio::time::sleep(deadline - now) => {}
            _ = shutdown.wait_for(|s| *s) => {}
        }
    }
}

async fn read(
    State(app): State<Arc<App>>,
    p: Result<Path<String>, PathRejection>,
    q: Result<Query<ReadQuery>, QueryRejection>,
) -> ApiResult {
    let e = app.registry.existing(&path(p)?)?;
    let q = query(q)?;
    if q.start.is_some() {
        return Err(ApiError::bad_request("start applies to consumers only; use offset"));
    }
    let limits = ReadLimits::new(&app, &q);
    let from = q.offset.unwrap_or_else(|| e.queue.first_offset());
    let (records, next) = read_waiting(&app, Arc::clone(&e.queue), from, &limits).await?;
    let records: Vec<Value> = records.iter().map(json::record).collect();
    ok(StatusCode::OK, json!({"records": records, "next_offset": next}))
}

// ---- named consumers ----

// `Queue::consumers()` and `groups()` read the journal's image under the
// journal's lock, which a commit holds across an fdatasync: they run on the
// blocking pool, so that a slow disk never stalls the runtime (and /livez).

fn consumers_json(queue: &Queue) -> Value {
    Value::Array(
        queue
            .consumers()
            .iter()
            .map(|c| json!({"name": c.name, "committed": c.position, "lag": c.lag}))
            .collect(),
    )
}

async fn find_consumer(queue: &Arc<Queue>, name: &str) -> Result<Option<walq::ConsumerInfo>, ApiError> {
    let (queue, name) = (Arc::clone(queue), name.to_string());
    blocking(move || Ok(queue.consumers().into_iter().find(|c| c.name == name))).await
}

fn unknown_consumer(name: &str) -> ApiError {
    walq::Error::UnknownConsumer { kind: "consumer", name: name.to_string() }.into()
}

/// Creates the consumer at `start` if it does not exist; true if created.
async fn ensure_consumer(e: &Arc<Entry>, name: &str, start: StartSpec) -> Result<bool, ApiError> {
    let _serial = e.consumers.lock().await;
    if find_consumer(&e.queue, name).await?.is_some() {
        return Ok(false);
    }
    let (e, n) = (Arc::clone(e), name.to_string());
    blocking(move || {
        e.check_consumer_room(&n)?;
        e.queue.reset_consumer(&n, start.0).map_err(ApiError::from)
    })
    .await?;
    Ok(true)
}

async fn list_consumers(State(app): State<Arc<App>>, p: Result<Path<String>, PathRejection>) -> ApiResult {
    let e = app.registry.existing(&path(p)?)?;
    let consumers = blocking(move || Ok(consumers_json(&e.queue))).await?;
    ok(StatusCode::OK, json!({"consumers": consumers}))
}

/// A consumer or group name the library would refuse: 400 `invalid_option`
/// (the library's error for it), before any lookup answers 404.
fn check_member_name(kind: &'static str, name: &str) -> Result<(), ApiError> {
    if crate::registry::check_queue_name(name).is_ok() {
        return Ok(());
    }
    Err(ApiError::from(walq::Error::InvalidOption {
        name: kind,
        reason: format!(
            "{name:?}: a name is 1 to 128 characters of A-Z, a-z, 0-9, '.', '_', '-', not starting with '.'"
        ),
    }))
}

async fn consumer_info(
    State(app): State<Arc<App>>,
    p: Result<Path<(String, String)>, PathRejection>,
) -> ApiResult {
    let (queue, name) = path(p)?;
    check_member_name("consumer", &name)?;
    let e = app.registry.existing(&queue)?;
    let c = find_consumer(&e.queue, &name).await?.ok_or_else(|| unknown_consumer(&name))?;
    ok(StatusCode::OK, json!({"name": c.name, "committed": c.position, "lag": c.lag}))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateConsumer {
    start: Option<StartSpec>,
}

async fn create_consumer(
    State(app): State<Arc<App>>,
    p: Result<Path<(String, String)>, PathRejection>,
    b: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let (queue, name) = path(p)?;
    let e = app.registry.existing(&queue)?;
    let req: CreateConsumer = json_body(&body(b)?)?;
    let created = ensure_consumer(&e, &name, req.start.unwrap_or(StartSpec(walq::StartAt::Earliest))).await?;
    let c = find_consumer(&e.queue, &name).await?.ok_or_else(|| unknown_consumer(&name))?;
    let status = if created { StatusCode::CREATED } else { StatusCode::OK };
    ok(status, json!({"name": c.name, "committed": c.position, "lag": c.lag, "created": created}))
}

async fn delete_consumer(
    State(app): State<Arc<App>>,
    p: Result<Path<(String, String)>, PathRejection>,
) -> ApiResult {
    let (queue, name) = path(p)?;
    let e = app.registry.existing(&queue)?;
    let _serial = e.consumers.lock().await;
    let q = Arc::clone(&e.queue);
    blocking(move || q.delete_consumer(&name).map_err(ApiError::from)).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn consumer_read(
    State(app): State<Arc<App>>,
    p: Result<Path<(String, String)>, PathRejection>,
    q: Result<Query<ReadQuery>, QueryRejection>,
) -> ApiResult {
    let (queue, name) = path(p)?;
    let e = app.registry.existing(&queue)?;
    let q = query(q)?;
    let limits = ReadLimits::new(&app, &q);
    ensure_consumer(&e, &name, q.start.unwrap_or(StartSpec(walq::StartAt::Earliest))).await?;
    let c = find_consumer(&e.queue, &name).await?.ok_or_else(|| unknown_consumer(&name))?;
    // From the committed position unless the client says where it is (a
    // client that reads ahead of its commits passes the last next_offset).
    // Records retention removed before the consumer read them are skipped.
    let from = q.offset.unwrap_or(c.position).max(e.queue.first_offset());
    let (records, next) = read_waiting(&app, Arc::clone(&e.queue), from, &limits).await?;
    let records: Vec<Value> = records.iter().map(json::record).collect();
    ok(StatusCode::OK, json!({"records": records, "next_offset": next, "committed": c.position}))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CommitIn {
    offset: u64,
}

async fn commit(
    State(app): State<Arc<App>>,
    p: Result<Path<(String, String)>, PathRejection>,
    b: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let (queue, name) = path(p)?;
    check_member_name("consumer", &name)?;
    let e = app.registry.existing(&queue)?;
    let b = body(b)?;
    let req: CommitIn =
        serde_json::from_slice(&b).map_err(|err| ApiError::bad_request(format!("the JSON body: {err}")))?;
    let _serial = e.consumers.lock().await;
    if find_consumer(&e.queue, &name).await?.is_none() {
        return Err(unknown_consumer(&name));
    }
    // Saves the position durably (fdatasync'd before the answer).
    let (q, n) = (Arc::clone(&e.queue), name.clone());
    blocking(move || q.reset_consumer(&n, walq::StartAt::Offset(req.offset)).map_err(ApiError::from)).await?;
    let c = find_consumer(&e.queue, &name).await?.ok_or_else(|| unknown_consumer(&name))?;
    ok(StatusCode::OK, json!({"name": c.name, "committed": c.position, "lag": c.lag}))
}

// ---- consumer groups ----

fn group_json(info: &walq::GroupInfo, open: Option<&(walq::Group, GroupOptions)>) -> Value {
    let s = info.stats;
    let mut v = json!({
        "name": info.name,
        "ack_floor": info.ack_floor,
        "pending": info.pending,
        "waiting_redelivery": info.waiting_redelivery,
        "unacked": info.unacked,
        "stats": {
            "delivered": s.delivered, "redelivered": s.redelivered, "acked": s.acked, "nacked": s.nacked,
            "expired": s.expired, "dead_lettered": s.dead_lettered, "skipped": s.skipped,
        },
    });
    if let Some((g, opts)) = open {
        v["options"] = json!(opts);
        v["dead_letters"] = json!(g.dead_letters().map(|d| d.next_offset() - d.first_offset()));
    }
    v
}

/// Every group of the queue (blocking: the journal's and the groups' locks).
fn groups_json(e: &Entry) -> Value {
    let open = e.groups.lock().unwrap_or_else(|e| e.into_inner()).clone();
    Value::Array(e.queue.groups().iter().map(|g| group_json(g, open.get(&g.name))).collect())
}

async fn list_groups(State(app): State<Arc<App>>, p: Result<Path<String>, PathRejection>) -> ApiResult {
    let e = app.registry.existing(&path(p)?)?;
    let groups = blocking(move || Ok(groups_json(&e))).await?;
    ok(StatusCode::OK, json!({"groups": groups}))
}

/// The group, opened in a blocking task (creating it only if `create`).
async fn open_group(
    e: &Arc<Entry>,
    name: &str,
    options: Option<GroupOptions>,
    create: bool,
) -> Result<(walq::Group, GroupOptions, bool), ApiError> {
    let (e, n) = (Arc::clone(e), name.to_string());
    blocking(move || e.group(&n, options, create)).await
}

async fn group_info(
    State(app): State<Arc<App>>,
    p: Result<Path<(String, String)>, PathRejection>,
) -> ApiResult {
    let (queue, name) = path(p)?;
    check_member_name("group", &name)?;
    let e = app.registry.existing(&queue)?;
    // The group's lock may be held across a dead-letter append: off the runtime.
    let v = blocking(move || {
        let open = e.groups.lock().unwrap_or_else(|e| e.into_inner()).get(&name).cloned();
        let info = match &open {
            Some((g, _)) => g.info(),
            None => e.queue.groups().into_iter().find(|g| g.name == name).ok_or_else(|| {
                ApiError::from(walq::Error::UnknownConsumer { kind: "group", name: name.clone() })
            })?,
        };
        Ok(group_json(&info, open.as_ref()))
    })
    .await?;
    ok(StatusCode::OK, v)
}

async fn create_group(
    State(app): State<Arc<App>>,
    p: Result<Path<(String, String)>, PathRejection>,
    b: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let (queue, name) = path(p)?;
    let e = app.registry.existing(&queue)?;
    let b = body(b)?;
    let options: Option<GroupOptions> =
        if b.iter().all(u8::is_ascii_whitespace) { None } else { Some(json_body(&b)?) };
    let (g, opts, created) = open_group(&e, &name, options, true).await?;
    let mut v = group_json(&g.info(), Some(&(g.clone(), opts)));
    v["created"] = json!(created);
    ok(if created { StatusCode::CREATED } else { StatusCode::OK }, v)
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FetchQuery {
    max: Option<usize>,
    wait_ms: Option<u64>,
}

/// Sets its flag when dropped (a handler future dropped: the client left).
struct CancelOnDrop(Arc<std::sync::atomic::AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Release);
    }
}

/// Fetches up to `max` deliveries whose records sum to at most `budget`
/// bytes (always one, if there is one), waiting up to `first_wait` for the
/// first. One record at a time, so that nothing beyond the budget is taken
/// (a taken record's delivery count has already risen). If `cancelled` is
/// set meanwhile, what was taken is handed back (nacked, no delay) and
/// nothing is returned. Blocking.
fn fetch_bounded(
    group: &walq::Group,
    max: usize,
    budget: usize,
    first_wait: Duration,
    cancelled: &std::sync::atomic::AtomicBool,
) -> Result<Vec<walq::Delivery>, ApiError> {
    let mut worker = group.worker_with_prefetch(max);
    let mut out: Vec<walq::Delivery> = Vec::new();
    let mut bytes = 0usize;
    while out.len() < max && bytes < budget {
        let wait = if out.is_empty() { first_wait } else { Duration::ZERO };
        let Some(d) = worker.fetch(1, wait).map_err(ApiError::from)?.pop() else { break };
        let size = record_bytes(d.record());
        if !out.is_empty() && bytes + size > budget {
            // Over the budget: give it back at once for the next fetch.
            let _ = worker.nack(d.id(), Duration::ZERO);
            break;
        }
        bytes += size;
        out.push(d);
    }
    if cancelled.load(std::sync::atomic::Ordering::Acquire) {
        for d in out.drain(..) {
            let _ = worker.nack(d.id(), Duration::ZERO);
        }
    }
    Ok(out)
}

fn delivery_json(d: &walq::Delivery) -> Value {
    let mut v = json::record(d.record());
    v["id"] = json!(d.id().to_token());
    v["delivery_count"] = json!(d.delivery_count());
    v
}

async fn fetch(
    _accepting: Accepting,
    State(app): State<Arc<App>>,
    p: Result<Path<(String, String)>, PathRejection>,
    q: Result<Query<FetchQuery>, QueryRejection>,
) -> ApiResult {
    let (queue, name) = path(p)?;
    let e = app.registry.existing(&queue)?;
    let q = query(q)?;
    let (group, opts, _) = open_group(&e, &name, None, true).await?;
    // One worker per request, whose prefetch is the request's max (at most
    // the group's prefetch): a delivery stays in flight until it is acked,
    // nacked, termed, or its ack wait runs out, whoever fetched it.
    let max = q.max.unwrap_or(1).clamp(1, app.config.max_records_per_read.min(opts.prefetch()));
    let wait = Duration::from_millis(q.wait_ms.unwrap_or(0)).min(app.config.long_poll_max());
    let budget = app.config.max_read_bytes;
    // Set when this handler is dropped (the client went away): the blocking
    // fetch stops within a slice and hands back what it took.
    let cancelled = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let _cancel_on_drop = CancelOnDrop(Arc::clone(&cancelled));
    let g = group.clone();
    let c = Arc::clone(&cancelled);
    let mut deliveries = blocking(move || fetch_bounded(&g, max, budget, Duration::ZERO, &c)).await?;
    if deliveries.is_empty() && !wait.is_zero() && !app.is_draining() {
        let _permit = app.long_poll_permit()?;
        let draining = app.draining_flag();
        let c = Arc::clone(&cancelled);
        deliveries = blocking(move || {
            let deadline = Instant::now() + wait;
            loop {
                let slice = deadline.saturating_duration_since(Instant::now()).min(FETCH_SLICE);
                let got = fetch_bounded(&group, max, budget, slice, &c)?;
                let stop = draining.load(std::sync::atomic::Ordering::Acquire)
                    || c.load(std::sync::atomic::Ordering::Acquire)
                    || Instant::now() >= deadline;
                if !got.is_empty() || stop || slice.is_zero() {
                    return Ok(got);
                }
            }
        })
        .await?;
    }
    let v: Vec<Value> = deliveries.iter().map(delivery_json).collect();
    ok(StatusCode::OK, json!({ "deliveries": v }))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SettleQuery {
    /// nack: redeliver after this many milliseconds (default 0).
    delay_ms: Option<u64>,
    /// term: the reason recorded in the dead letter (default `term`).
    reason: Option<String>,
}

async fn settle(
    State(app): State<Arc<App>>,
    p: Result<Path<(String, String, String, String)>, PathRejection>,
    q: Result<Query<SettleQuery>, QueryRejection>,
) -> ApiResult {
    let (queue, name, token, action) = path(p)?;
    let e = app.registry.existing(&queue)?;
    let q = query(q)?;
    let id = DeliveryId::from_token(&token).ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_delivery_id",
            format!("{token:?} is not a delivery id (use the id a fetch returned)"),
        )
    })?;
    if !matches!(action.as_str(), "ack" | "nack" | "in-progress" | "term") {
        return Err(no_route().await);
    }
    let (group, _, _) = open_group(&e, &name, None, false).await?;
    let act = action.clone();
    blocking(move || {
        match act.as_str() {
            "ack" => group.ack(id),
            "nack" => group.nack(id, Duration::from_millis(q.delay_ms.unwrap_or(0))),
            "in-progress" => group.in_progress(id),
            _ => group.term_with_reason(id, q.reason.as_deref().unwrap_or("term")),
        }
        .map_err(ApiError::from)
    })
    .await?;
    ok(StatusCode::OK, json!({"id": token, "done": action}))
}

async fn dead_letters(
    State(app): State<Arc<App>>,
    p: Result<Path<(String, String)>, PathRejection>,
    q: Result<Query<ReadQuery>, QueryRejection>,
) -> ApiResult {
    let (queue, name) = path(p)?;
    let e = app.registry.existing(&queue)?;
    let q = query(q)?;
    let (group, _, _) = open_group(&e, &name, None, false).await?;
    let limits = ReadLimits::new(&app, &q);
    let (records, next) = blocking(move || {
        let Some(dlq) = group.dead_letters() else { return Ok((Vec::new(), 0)) };
        let from = q.offset.unwrap_or_else(|| dlq.first_offset());
        read_some(dlq, from, limits.max, limits.max_bytes).map_err(ApiError::from)
    })
    .await?;
    let records: Vec<Value> = records.iter().map(json::record).collect();
    ok(StatusCode::OK, json!({"records": records, "next_offset": next}))
}
