//! The data plane: produce, read with long-poll, named consumers, consumer
//! groups, queue list and info, `POST /v1/shutdown`, and `GET /openapi.json`.
//! Handlers never block a runtime thread: appends are awaited
//! (`append_batch_async_with`), and file I/O, syncs and group fetches run in
//! `spawn_blocking`. The one read on a runtime thread is a long-poll's read of
//! the few small records that just woke it (`INLINE_READ_RECORDS`,
//! `INLINE_READ_BYTES`): just written, so read from the page cache through
//! the tail's cached map. Invariant: a produce answers with an offset only after
//! the record is as durable as the request asked.
//!
//! Each handler carries its `#[utoipa::path]` (method, path, parameters, the
//! request headers it reads, its body, every status it answers), and the
//! router registers each route from that attribute (`utoipa_axum::routes!`):
//! the OpenAPI document and the routes come from the same place.

use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, OpenApi, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use walq::{DeliveryId, OwnedRecord, Queue, Record};

use crate::config::{DurabilitySpec, GroupOptions, QueueOptions, StartSpec};
use crate::error::{
    ApiError, BadRequest, BodyTimeout, Conflict, DiskFull, ErrorBody, ErrorCode, HeadersTooLarge, NotFound,
    OutOfRange, ServerError, TooLarge, TooMany, Unavailable,
};
use crate::json::{
    BatchProduced, BatchResult, Consumer, ConsumerCreated, ConsumerRecords, Consumers, Deliveries,
    DeliveryOut, Draining, EntryError, Group, GroupCreated, Groups, InBytes, InHeaders, Produced,
    QueueCreated, QueueDetail, QueueSummary, Queues, RecordOut, Records, SettleAction, Settled,
};
use crate::registry::{Entry, blocking};
use crate::server::App;

/// How long one blocking group fetch waits before it checks for shutdown.
const FETCH_SLICE: Duration = Duration::from_millis(100);
/// A long-poll woken by new records reads them on the runtime thread when at
/// most this many are visible past its offset (else on the blocking pool)...
const INLINE_READ_RECORDS: u64 = 64;
/// ...and answers with at most this many bytes of them (at least the first
/// record, if it is no larger; a larger first record is read on the blocking
/// pool). The checksum of the batch holding them is verified there too, so
/// the runtime thread spends at most one batch's CRC-32C and a 256 KiB copy.
const INLINE_READ_BYTES: usize = 256 << 10;
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

/// The document's frame: what no handler says (title, tags, the shared
/// error responses). The paths come from the handlers, through [`documented`].
#[derive(OpenApi)]
#[openapi(
    info(
        title = "walq-server",
        description = "The HTTP API of `walq serve`: a directory of named walq queues (produce with \
                       the durability asked, read with long-poll, named consumers, consumer groups). \
                       Bytes are a JSON string when they are UTF-8, else `{\"hex\": \"...\"}`. Every \
                       error is `{\"error\": {\"code\", \"message\"}}`; match on the code. The admin \
                       listener (`/livez`, `/readyz`, `/metrics`) is not part of this document.",
        license(name = "MIT OR Apache-2.0"),
    ),
    components(
        schemas(ErrorBody, ErrorCode),
        responses(
            BadRequest, NotFound, Conflict, BodyTimeout, TooLarge, OutOfRange, TooMany, HeadersTooLarge,
            ServerError, Unavailable, DiskFull
        )
    ),
    tags(
        (name = "queues", description = "Queues: list, create, inspect."),
        (name = "produce", description = "Append records (created queues on first produce)."),
        (name = "read", description = "Read from an offset, with long-poll."),
        (name = "consumers", description = "Named consumers: a saved position per consumer."),
        (name = "groups", description = "Consumer groups: competing consumers with per-record acks."),
        (name = "server", description = "The server itself."),
    )
)]
struct ApiDoc;

/// Every data-plane route, each registered from its handler's
/// `#[utoipa::path]`, with the document they make.
fn documented() -> OpenApiRouter<Arc<App>> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(list_queues))
        .routes(routes!(queue_info, create_queue))
        .routes(routes!(produce, read))
        .routes(routes!(produce_batch))
        .routes(routes!(list_consumers))
        .routes(routes!(consumer_info, create_consumer, delete_consumer))
        .routes(routes!(consumer_read))
        .routes(routes!(commit))
        .routes(routes!(list_groups))
        .routes(routes!(group_info, create_group, delete_group))
        .routes(routes!(fetch))
        .routes(routes!(settle))
        .routes(routes!(dead_letters))
        .routes(routes!(shutdown))
        .routes(routes!(openapi_json))
}

/// The OpenAPI 3.1 document of the data plane, as `GET /openapi.json` serves it.
pub fn openapi() -> serde_json::Value {
    let mut doc = serde_json::to_value(documented().into_openapi()).expect("the OpenAPI document serializes");
    link_keys_in_camel_case(&mut doc);
    doc
}

/// utoipa 5 writes a Link object's fields in snake case (`operation_id`);
/// OpenAPI spells them `operationId`, `operationRef`, `requestBody`.
fn link_keys_in_camel_case(doc: &mut serde_json::Value) {
    let responses = doc["paths"]
        .as_object_mut()
        .into_iter()
        .flat_map(|paths| paths.values_mut())
        .filter_map(serde_json::Value::as_object_mut)
        .flat_map(|item| item.values_mut())
        .filter_map(|op| op.get_mut("responses").and_then(serde_json::Value::as_object_mut))
        .flat_map(|responses| responses.values_mut());
    for response in responses {
        let Some(links) = response.get_mut("links").and_then(serde_json::Value::as_object_mut) else {
            continue;
        };
        for link in links.values_mut().filter_map(serde_json::Value::as_object_mut) {
            for (snake, camel) in [
                ("operation_id", "operationId"),
                ("operation_ref", "operationRef"),
                ("request_body", "requestBody"),
            ] {
                if let Some(v) = link.remove(snake) {
                    link.insert(camel.to_string(), v);
                }
            }
        }
    }
}

/// The document, rendered once.
static OPENAPI_JSON: LazyLock<Bytes> = LazyLock::new(|| {
    Bytes::from(serde_json::to_vec_pretty(&openapi()).expect("the OpenAPI document serializes"))
});

/// The data-plane router.
pub(crate) fn router(app: Arc<App>) -> axum::Router {
    let body_limit = app.config.max_body_bytes;
    let (routes, _document) = documented().split_for_parts();
    routes
        .fallback(no_route)
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(axum::middleware::from_fn_with_state((Arc::clone(&app), "data"), crate::server::track))
        .with_state(app)
}

type ApiResult = Result<Response, ApiError>;

/// The queue in the path.
#[derive(IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)]
struct QueuePath {
    /// The queue's name: 1 to 128 characters of `A-Z a-z 0-9 . _ -`, not starting with `.`.
    #[param(pattern = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$")]
    queue: String,
}

/// The named consumer in the path.
#[derive(IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)]
struct ConsumerPath {
    /// The consumer's name (the same rule as a queue's).
    #[param(pattern = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$")]
    consumer: String,
}

/// The consumer group in the path.
#[derive(IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)]
struct GroupPath {
    /// The group's name (the same rule as a queue's).
    #[param(pattern = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$")]
    group: String,
}

/// The delivery and what to do with it.
#[derive(IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)]
struct DeliveryPath {
    /// A delivery id, as a fetch returned it.
    #[param(pattern = "^[0-9]{1,20}\\.[0-9]{1,10}\\.[0-9]{1,10}$")]
    id: String,
    /// `ack`: done; `nack`: redeliver after `delay_ms`; `in-progress`: restart
    /// the ack wait; `term`: straight to the dead letters.
    action: SettleAction,
}

/// The request headers a produce reads.
#[derive(IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)]
struct ProduceHeaderParams {
    /// The record's key (its bytes as sent).
    #[param(rename = "walq-key", nullable = false)]
    key: Option<String>,
    /// A record header, `name=value`; repeat the header for several (order
    /// and repeats are kept).
    #[param(rename = "walq-header", nullable = false, pattern = "^[^=]+=.*$")]
    header: Option<String>,
    /// The record's timestamp, milliseconds since the Unix epoch (default: now).
    #[param(rename = "walq-timestamp", nullable = false)]
    timestamp: Option<u64>,
    /// Shorthand for the record header `reply_to` (request/reply).
    #[param(rename = "walq-reply-to", nullable = false)]
    reply_to: Option<String>,
    /// Shorthand for the record header `correlation_id` (request/reply).
    #[param(rename = "walq-correlation-id", nullable = false)]
    correlation_id: Option<String>,
}

/// The durability a produce asks for.
#[derive(IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)]
struct DurabilityHeaderParam {
    /// `sync`, `os`, `interval` (100 ms) or `interval:MS`; default: the
    /// queue's mode. The answer comes once the records are that durable.
    #[param(rename = "walq-durability", nullable = false)]
    durability: Option<DurabilitySpec>,
}

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

/// A JSON body, or the default when the body is empty (for an `Option`,
/// JSON null is `None` too).
fn json_body<T: serde::de::DeserializeOwned + Default>(b: &Bytes) -> Result<T, ApiError> {
    if b.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(b).map_err(|e| ApiError::bad_request(format!("the JSON body: {e}")))
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn ok<T: Serialize>(status: StatusCode, v: T) -> ApiResult {
    Ok((status, Json(v)).into_response())
}

async fn no_route() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "no_route", "no such endpoint; see walq-server/README.md")
}

/// Starts the drain, as SIGTERM does: new produces and fetches get 503
/// `shutting_down`, requests under way finish, every queue is synced and
/// closed, the process exits.
#[utoipa::path(
    post,
    path = "/v1/shutdown",
    tag = "server",
    responses(
        (status = 202, description = "The drain started", body = Draining),
        (status = 431, response = HeadersTooLarge),
    )
)]
async fn shutdown(State(app): State<Arc<App>>) -> ApiResult {
    tracing::info!("shutdown requested over HTTP");
    app.start_shutdown();
    ok(StatusCode::ACCEPTED, Draining { status: "draining" })
}

/// This document: the data plane's API in OpenAPI 3.1.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "server",
    responses(
        (status = 200, description = "The OpenAPI document", body = Object, content_type = "application/json"),
        (status = 431, response = HeadersTooLarge),
    )
)]
async fn openapi_json() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI_JSON.clone()).into_response()
}

// ---- queues ----

fn queue_summary(e: &Entry) -> QueueSummary {
    let s = e.queue.stats();
    let options = e.options.clone();
    QueueSummary {
        name: e.name.clone(),
        first_offset: s.first_offset,
        next_offset: s.next_offset,
        durable_offset: s.durable_offset,
        visible_offset: s.visible_offset,
        segments: s.segments as u64,
        appends: s.appends,
        bytes: s.bytes,
        flushes: s.syncs,
        records_per_flush_mean: s.records_per_sync_mean,
        poisoned: s.poisoned,
        options,
    }
}

/// Every queue with its offsets and counters, by name.
#[utoipa::path(
    get,
    path = "/v1/queues",
    tag = "queues",
    responses(
        (status = 200, description = "Every queue", body = Queues),
        (status = 431, response = HeadersTooLarge),
    )
)]
async fn list_queues(State(app): State<Arc<App>>) -> ApiResult {
    // Stats read the journal's damage flag under its lock: off the runtime.
    let registry = Arc::clone(&app.registry);
    let queues = blocking(move || Ok(registry.list().iter().map(|e| queue_summary(e)).collect())).await?;
    ok(StatusCode::OK, Queues { queues })
}

/// One queue, with its consumers and groups.
#[utoipa::path(
    get,
    path = "/v1/queues/{queue}",
    tag = "queues",
    params(QueuePath),
    responses(
        (status = 200, description = "The queue", body = QueueDetail),
        (status = 400, response = BadRequest),
        (status = 404, response = NotFound),
        (status = 431, response = HeadersTooLarge),
        (status = 503, response = Unavailable),
    )
)]
async fn queue_info(State(app): State<Arc<App>>, p: Result<Path<String>, PathRejection>) -> ApiResult {
    let e = app.registry.existing(&path(p)?)?;
    let detail = blocking(move || {
        Ok(QueueDetail { queue: queue_summary(&e), consumers: consumers_of(&e.queue), groups: groups_of(&e) })
    })
    .await?;
    ok(StatusCode::OK, detail)
}

/// Creates a queue with options (all optional; an empty body takes the
/// server's `queue_defaults`). A queue that exists keeps its options.
#[utoipa::path(
    put,
    path = "/v1/queues/{queue}",
    tag = "queues",
    params(QueuePath),
    request_body(
        content = Option<QueueOptions>,
        content_type = "application/json",
        description = "The queue's options; an empty body (or null) takes the server's `queue_defaults`",
    ),
    responses(
        (status = 200, description = "The queue existed (its options are unchanged)", body = QueueCreated, links(
            ("Produce" = (operation_id = "produce", parameters(("queue" = "$request.path.queue")))),
            ("Read" = (operation_id = "read", parameters(("queue" = "$request.path.queue")))),
        )),
        (status = 201, description = "Created", body = QueueCreated, links(
            ("Produce" = (operation_id = "produce", parameters(("queue" = "$request.path.queue")))),
            ("Read" = (operation_id = "read", parameters(("queue" = "$request.path.queue")))),
        )),
        (status = 400, response = BadRequest),
        (status = 409, response = Conflict),
        (status = 408, response = BodyTimeout),
        (status = 413, response = TooLarge),
        (status = 431, response = HeadersTooLarge),
        (status = 500, response = ServerError),
        (status = 503, response = Unavailable),
        (status = 507, response = DiskFull),
    )
)]
async fn create_queue(
    State(app): State<Arc<App>>,
    p: Result<Path<String>, PathRejection>,
    b: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let name = path(p)?;
    let b = body(b)?;
    // An empty body, or JSON null: the defaults.
    let options: Option<QueueOptions> = json_body(&b)?;
    let (e, created) = app.registry.get_or_create(&name, options).await?;
    let status = if created { StatusCode::CREATED } else { StatusCode::OK };
    ok(status, QueueCreated { queue: queue_summary(&e), created })
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
    asked.unwrap_or(e.options.durability.0)
}

/// Produces one record: the raw body is its value. Creates the queue if it
/// does not exist. The answer comes once the record is as durable as asked.
#[utoipa::path(
    post,
    path = "/v1/queues/{queue}/records",
    tag = "produce",
    params(QueuePath, ProduceHeaderParams, DurabilityHeaderParam),
    request_body(
        content = inline(RawValue),
        content_type = "application/octet-stream",
        description = "The record's value, as raw bytes (may be empty)",
    ),
    responses(
        (status = 200, description = "Appended, as durable as asked", body = Produced, links(
            ("ReadIt" = (operation_id = "read", parameters(
                ("queue" = "$request.path.queue"), ("offset" = "$response.body#/offset")
            ))),
            ("QueueInfo" = (operation_id = "queue_info", parameters(("queue" = "$request.path.queue")))),
            ("FetchIt" = (operation_id = "fetch", parameters(("queue" = "$request.path.queue"), ("group" = "workers")))),
            ("ConsumeIt" = (operation_id = "consumer_read", parameters(
                ("queue" = "$request.path.queue"), ("consumer" = "reader")
            ))),
        )),
        (status = 400, response = BadRequest),
        (status = 409, response = Conflict),
        (status = 408, response = BodyTimeout),
        (status = 413, response = TooLarge),
        (status = 429, response = TooMany),
        (status = 431, response = HeadersTooLarge),
        (status = 500, response = ServerError),
        (status = 503, response = Unavailable),
        (status = 507, response = DiskFull),
    )
)]
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
    ok(StatusCode::OK, Produced { offset: range.start, timestamp_ms, durability: DurabilitySpec(durability) })
}

/// A record's value as raw bytes.
#[derive(ToSchema)]
#[schema(value_type = String, format = Binary)]
#[allow(dead_code)]
struct RawValue(Vec<u8>);

/// A batch of records to produce.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = BatchRequest)]
struct BatchIn {
    /// For the whole batch (else the `Walq-Durability` header, else the queue's mode).
    #[serde(default)]
    durability: Option<DurabilitySpec>,
    /// 1 to 10,000 records (an empty or missing list is 400 `bad_request`).
    #[serde(default)]
    #[schema(required = true, min_items = 1, max_items = 10_000)]
    records: Vec<RecordIn>,
}

/// One record of a batch.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = RecordIn)]
struct RecordIn {
    /// The value.
    value: InBytes,
    /// The key, if any.
    #[serde(default)]
    key: Option<InBytes>,
    /// The headers, if any.
    #[serde(default)]
    headers: Option<InHeaders>,
    /// Milliseconds since the Unix epoch (default: now).
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

/// Produces a batch: each entry is checked on its own, the good ones are
/// appended together (one fdatasync, contiguous offsets); one result per
/// entry, in order. Creates the queue if it does not exist.
#[utoipa::path(
    post,
    path = "/v1/queues/{queue}/batch",
    tag = "produce",
    params(QueuePath, DurabilityHeaderParam),
    request_body(content = BatchIn, content_type = "application/json"),
    responses(
        (status = 200, description = "One result per entry; the appended ones are as durable as asked", body = BatchProduced),
        (status = 400, response = BadRequest),
        (status = 409, response = Conflict),
        (status = 408, response = BodyTimeout),
        (status = 413, response = TooLarge),
        (status = 429, response = TooMany),
        (status = 431, response = HeadersTooLarge),
        (status = 500, response = ServerError),
        (status = 503, response = Unavailable),
        (status = 507, response = DiskFull),
    )
)]
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
    let limit = e.options.record_limit();
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
    let results: Vec<BatchResult> = results
        .into_iter()
        .map(|r| match r {
            Ok(rec) => {
                let offset = next.map(|n| n + appended).expect("an appended record has an offset");
                appended += 1;
                BatchResult::Appended { offset, timestamp_ms: rec.timestamp_ms }
            }
            Err(err) => BatchResult::Refused { error: EntryError { code: err.code, message: err.message } },
        })
        .collect();
    ok(StatusCode::OK, BatchProduced { results, appended, durability: DurabilitySpec(durability) })
}

// ---- reading ----

/// Where to read from and how much.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct ReadQuery {
    /// The first offset to read (default: the first held; a consumer's
    /// committed position).
    #[param(nullable = false)]
    offset: Option<u64>,
    /// Most records (default 100, at most the server's `max_records_per_read`).
    #[param(nullable = false, value_type = Option<u64>)]
    max: Option<usize>,
    /// Wait up to this many milliseconds for a first record (default 0, at
    /// most the server's `long_poll_max_ms`).
    #[param(nullable = false)]
    wait_ms: Option<u64>,
    /// The records' bytes (keys, headers, values) sum to at most this (but
    /// one record is always returned if there is one).
    #[param(nullable = false, value_type = Option<u64>)]
    max_bytes: Option<usize>,
    /// Consumers only: where a consumer that does not exist yet starts
    /// (default `earliest`).
    #[param(ignore)]
    start: Option<StartSpec>,
}

/// Where a consumer that does not exist yet starts.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
struct StartParam {
    /// `earliest` (default), `latest`, `offset:N` or `timestamp:MS`: only
    /// for a consumer that does not exist yet.
    #[param(nullable = false)]
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

/// The bytes a record takes in a response's budget, counted on the map
/// before anything is copied.
fn ref_bytes(r: &walq::RecordRef<'_>) -> usize {
    r.key().map_or(0, <[u8]>::len)
        + r.headers().map(|(n, v)| n.len() + v.len()).sum::<usize>()
        + r.value().len()
}

/// Up to `max` records from `from` (records summing to at most `max_bytes`,
/// but always one if there is one); the offset to read next. Blocking.
fn read_some(
    queue: &Queue,
    from: u64,
    max: usize,
    max_bytes: usize,
) -> walq::Result<(Vec<OwnedRecord>, u64)> {
    Ok(read_bounded(queue, from, max, max_bytes, usize::MAX)?.unwrap_or_else(|| (Vec::new(), from)))
}

/// [`read_some`], giving up (`None`, nothing copied) when the first record
/// alone is over `first_max` bytes.
fn read_bounded(
    queue: &Queue,
    from: u64,
    max: usize,
    max_bytes: usize,
    first_max: usize,
) -> walq::Result<Option<(Vec<OwnedRecord>, u64)>> {
    let mut reader = queue.read_from(from)?;
    let (mut out, mut bytes) = (Vec::new(), 0usize);
    while out.len() < max {
        let Some(r) = reader.next()? else { break };
        let size = ref_bytes(&r);
        if out.is_empty() && size > first_max {
            return Ok(None);
        }
        if !out.is_empty() && bytes + size > max_bytes {
            break;
        }
        bytes += size;
        out.push(r.to_owned_record());
    }
    let next = out.last().map_or(from, |r| r.offset + 1);
    Ok(Some((out, next)))
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
    let mut woken = false;
    loop {
        let (max, max_bytes) = (limits.max, limits.max_bytes);
        // Woken for records that just became visible: they were written
        // moments ago (in the page cache, through the tail's cached map), so
        // a few small ones are read right here, sparing the wake-up a hop
        // through the blocking pool; anything else (a first read, which may
        // touch cold segments, a long run of records, a large record) goes
        // to the blocking pool.
        let fresh = queue.visible_offset().saturating_sub(from);
        let inline = if woken && fresh <= INLINE_READ_RECORDS {
            let n = usize::try_from(fresh).unwrap_or(1).clamp(1, max);
            let cap = max_bytes.min(INLINE_READ_BYTES);
            read_bounded(&queue, from, n, cap, INLINE_READ_BYTES).map_err(ApiError::from)?
        } else {
            None
        };
        let got = match inline {
            Some(got) => got,
            None => {
                let q = Arc::clone(&queue);
                blocking(move || read_some(&q, from, max, max_bytes).map_err(ApiError::from)).await?
            }
        };
        let now = Instant::now();
        if !got.0.is_empty() || now >= deadline || app.is_draining() {
            return Ok(got);
        }
        if permit.is_none() {
            permit = Some(app.long_poll_permit()?);
        }
        // Woken exactly when a record at `from` becomes visible (by any
        // append: through this server or not, `sync`, `os` or `interval`).
        woken = tokio::select! {
            _ = queue.wait_visible_async(from) => true,
            _ = tokio::time::sleep(deadline - now) => false,
            _ = shutdown.wait_for(|s| *s) => false,
        };
    }
}

/// Reads from an offset, waiting up to `wait_ms` for a first record
/// (long-poll). A reader of a `sync` queue sees a record only once it is durable.
#[utoipa::path(
    get,
    path = "/v1/queues/{queue}/records",
    tag = "read",
    params(QueuePath, ReadQuery),
    responses(
        (status = 200, description = "The records (empty if none came within the wait)", body = Records),
        (status = 400, response = BadRequest),
        (status = 404, response = NotFound),
        (status = 416, response = OutOfRange),
        (status = 429, response = TooMany),
        (status = 431, response = HeadersTooLarge),
        (status = 500, response = ServerError),
        (status = 503, response = Unavailable),
    )
)]
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
    ok(StatusCode::OK, Records { records: records.iter().map(RecordOut::of).collect(), next_offset: next })
}

// ---- named consumers ----

// `Queue::consumers()` and `groups()` read the journal's image under the
// journal's lock, which a commit holds across an fdatasync: they run on the
// blocking pool, so that a slow disk never stalls the runtime (and /livez).

/// Every named consumer of the queue (blocking: the journal's lock).
fn consumers_of(queue: &Queue) -> Vec<Consumer> {
    queue.consumers().iter().map(Consumer::of).collect()
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

/// The queue's named consumers: committed position and lag.
#[utoipa::path(
    get,
    path = "/v1/queues/{queue}/consumers",
    tag = "consumers",
    params(QueuePath),
    responses(
        (status = 200, description = "The consumers", body = Consumers),
        (status = 400, response = BadRequest),
        (status = 404, response = NotFound),
        (status = 431, response = HeadersTooLarge),
        (status = 500, response = ServerError),
        (status = 503, response = Unavailable),
    )
)]
async fn list_consumers(State(app): State<Arc<App>>, p: Result<Path<String>, PathRejection>) -> ApiResult {
    let e = app.registry.existing(&path(p)?)?;
    let consumers = blocking(move || Ok(consumers_of(&e.queue))).await?;
    ok(StatusCode::OK, Consumers { consumers })
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

/// One named consumer: committed position and lag.
#[utoipa::path(
    get,
    path = "/v1/queues/{queue}/consumers/{consumer}",
    tag = "consumers",
    params(QueuePath, ConsumerPath),
    responses(
        (status = 200, description = "The consumer", body = Consumer),
        (status = 400, response = BadRequest),
        (status = 404, response = NotFound),
        (status = 431, response = HeadersTooLarge),
        (status = 500, response = ServerError),
        (status = 503, response = Unavailable),
    )
)]
async fn consumer_info(
    State(app): State<Arc<App>>,
    p: Result<Path<(String, String)>, PathRejection>,
) -> ApiResult {
    let (queue, name) = path(p)?;
    check_member_name("consumer", &name)?;
    let e = app.registry.existing(&queue)?;
    let c = find_consumer(&e.queue, &name).await?.ok_or_else(|| unknown_consumer(&name))?;
    ok(StatusCode::OK, Consumer::of(&c))
}

/// How to create a named consumer.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct CreateConsumer {
    /// Where it starts (default `earliest`); ignored if it exists.
    start: Option<StartSpec>,
}

/// Creates a named consumer at `start`; one that exists is left as it is.
#[utoipa::path(
    put,
    path = "/v1/queues/{queue}/consumers/{consumer}",
    tag = "consumers",
    params(QueuePath, ConsumerPath),
    request_body(
        content = Option<CreateConsumer>,
        content_type = "application/json",
        description = "Optional: an empty body (or null) starts a new consumer at `earliest`",
    ),
    responses(
        (status = 200, description = "It existed", body = ConsumerCreated, links(
            ("Commit" = (operation_id = "commit", parameters(
                ("queue" = "$request.path.queue"), ("consumer" = "$response.body#/name")
            ))),
            ("ConsumerRead" = (operation_id = "consumer_read", parameters(
                ("queue" = "$request.path.queue"), ("consumer" = "$response.body#/name")
            ))),
            ("Delete" = (operation_id = "delete_consumer", parameters(
                ("queue" = "$request.path.queue"), ("consumer" = "$response.body#/name")
            ))),
        )),
        (status = 201, description = "Created", body = ConsumerCreated, links(
            ("Commit" = (operation_id = "commit", parameters(
                ("queue" = "$request.path.queue"), ("consumer" = "$response.body#/name")
            ))),
            ("ConsumerRead" = (operation_id = "consumer_read", parameters(
                ("queue" = "$request.path.queue"), ("consumer" = "$response.body#/name")
            ))),
            ("Delete" = (operation_id = "delete_consumer", parameters(
                ("queue" = "$request.path.queue"), ("consumer" = "$response.body#/name")
            ))),
        )),
        (status = 400, response = BadRequest),
        (status = 404, response = NotFound),
        (status = 409, response = Conflict),
        (status = 408, response = BodyTimeout),
        (status = 413, response = TooLarge),
        (status = 416, response = OutOfRange),
        (status = 431, response = HeadersTooLarge),
        (status = 500, response = ServerError),
        (status = 503, response = Unavailable),
        (status = 507, response = DiskFull),
    )
)]
async fn create_consumer(
    State(app): State<Arc<App>>,
    p: Result<Path<(String, String)>, PathRejection>,
    b: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let (queue, name) = path(p)?;
    check_member_name("consumer", &name)?;
    let e = app.registry.existing(&queue)?;
    let req: CreateConsumer = json_body::<Option<CreateConsumer>>(&body(b)?)?.unwrap_or_default();
    let created = ensure_consumer(&e, &name, req.start.unwrap_or(StartSpec(walq::StartAt::Earliest))).await?;
    let c = find_consumer(&e.queue, &name).await?.ok_or_else(|| unknown_consumer(&name))?;
    let status = if created { StatusCode::CREATED } else { StatusCode::OK };
    ok(status, ConsumerCreated { consumer: Consumer::of(&c), created })
}

/// Deletes a named consumer and its position.
#[utoipa::path(
    delete,
    path = "/v1/queues/{queue}/consumers/{consumer}",
    tag = "consumers",
    params(QueuePath, ConsumerPath),
    responses(
        (status = 204, description = "Deleted"),
        (status = 400, response = BadRequest),
        (status = 404, response = NotFound),
        (status = 409, response = Conflict),
        (status = 431, response = HeadersTooLarge),
        (status = 500, response = ServerError),
        (status = 503, response = Unavailable),
        (status = 507, response = DiskFull),
    )
)]
async fn delete_consumer(
    State(app): State<Arc<App>>,
    p: Result<Path<(String, String)>, PathRejection>,
) -> ApiResult {
    let (queue, name) = path(p)?;
    check_member_name("consumer", &name)?;
    let e = app.registry.existing(&queue)?;
    let _serial = e.consumers.lock().await;
    let q = Arc::clone(&e.queue);
    blocking(move || q.delete_consumer(&name).map_err(ApiError::from)).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Deletes a consumer group: its ack floor, delivery counts and options
/// (durably). Its dead-letter queue stays on disk. 409 `in_use` while a fetch
/// of the group is still running.
#[utoipa::path(
    delete,
    path = "/v1/queues/{queue}/groups/{group}",
    tag = "groups",
    params(QueuePath, GroupPath),
    responses(
        (status = 204, description = "Deleted"),
        (status = 400, response = BadRequest),
        (status = 404, response = NotFound),
        (status = 409, response = Conflict),
        (status = 431, response = HeadersTooLarge),
        (status = 500, response = ServerError),
        (status = 503, response = Unavailable),
        (status = 507, response = DiskFull),
    )
)]
async fn delete_group(
    State(app): State<Arc<App>>,
    p: Result<Path<(String, String)>, PathRejection>,
) -> ApiResult {
    let (queue, name) = path(p)?;
    check_member_name("group", &name)?;
    let e = app.registry.existing(&queue)?;
    blocking(move || e.delete_group(&name)).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Reads from the consumer's committed position (or `offset`), with
/// long-poll; creates the consumer at `start` if it does not exist.
#[utoipa::path(
    get,
    path = "/v1/queues/{queue}/consumers/{consumer}/records",
    tag = "consumers",
    params(QueuePath, ConsumerPath, ReadQuery, StartParam),
    responses(
        (status = 200, description = "The records (empty if none came within the wait)", body = ConsumerRecords),
        (status = 400, response = BadRequest),
        (status = 404, response = NotFound),
        (status = 409, response = Conflict),
        (status = 416, response = OutOfRange),
        (status = 429, response = TooMany),
        (status = 431, response = HeadersTooLarge),
        (status = 500, response = ServerError),
        (status = 503, response = Unavailable),
        (status = 507, response = DiskFull),
    )
)]
async fn consumer_read(
    State(app): State<Arc<App>>,
    p: Result<Path<(String, String)>, PathRejection>,
    q: Result<Query<ReadQuery>, QueryRejection>,
) -> ApiResult {
    let (queue, name) = path(p)?;
    check_member_name("consumer", &name)?;
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
    let records = records.iter().map(RecordOut::of).collect();
    ok(StatusCode::OK, ConsumerRecords { records, next_offset: next, committed: c.position })
}

/// A consumer's new position.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct CommitIn {
    /// The offset to read next: the last processed offset + 1, between the
    /// first offset held and the end of the log.
    offset: u64,
}

/// Saves the consumer's position (fdatasync'd before the answer).
#[utoipa::path(
    post,
    path = "/v1/queues/{queue}/consumers/{consumer}/commit",
    tag = "consumers",
    params(QueuePath, ConsumerPath),
    request_body(content = CommitIn, content_type = "application/json"),
    responses(
        (status = 200, description = "Saved", body = Consumer),
        (status = 400, response = BadRequest),
        (status = 404, response = NotFound),
        (status = 409, response = Conflict),
        (status = 408, response = BodyTimeout),
        (status = 413, response = TooLarge),
        (status = 416, response = OutOfRange),
        (status = 431, response = HeadersTooLarge),
        (status = 500, response = ServerError),
        (status = 503, response = Unavailable),
        (status = 507, response = DiskFull),
    )
)]
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
    ok(StatusCode::OK, Consumer::of(&c))
}

// ---- consumer groups ----

/// Every group of the queue (blocking: the journal's and the groups' locks).
fn groups_of(e: &Entry) -> Vec<Group> {
    let open = e.groups.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let saved = e.saved.lock().unwrap_or_else(|e| e.into_inner()).groups.clone();
    e.queue.groups().iter().map(|g| Group::of(g, open.get(&g.name), saved.get(&g.name))).collect()
}

/// Every consumer group of the queue.
#[utoipa::path(
    get,
    path = "/v1/queues/{queue}/groups",
    tag = "groups",
    params(QueuePath),
    responses(
        (status = 200, description = "The groups", body = Groups),
        (status = 400, response = BadRequest),
        (status = 404, response = NotFound),
        (status = 431, response = HeadersTooLarge),
        (status = 500, response = ServerError),
        (status = 503, response = Unavailable),
    )
)]
async fn list_groups(State(app): State<Arc<App>>, p: Result<Path<String>, PathRejection>) -> ApiResult {
    let e = app.registry.existing(&path(p)?)?;
    let groups = blocking(move || Ok(groups_of(&e))).await?;
    ok(StatusCode::OK, Groups { groups })
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

/// One consumer group: its state, options and dead-letter count.
#[utoipa::path(
    get,
    path = "/v1/queues/{queue}/groups/{group}",
    tag = "groups",
    params(QueuePath, GroupPath),
    responses(
        (status = 200, description = "The group", body = Group),
        (status = 400, response = BadRequest),
        (status = 404, response = NotFound),
        (status = 431, response = HeadersTooLarge),
        (status = 500, response = ServerError),
        (status = 503, response = Unavailable),
    )
)]
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
        let saved = e.saved.lock().unwrap_or_else(|e| e.into_inner()).groups.get(&name).cloned();
        Ok(Group::of(&info, open.as_ref(), saved.as_ref()))
    })
    .await?;
    ok(StatusCode::OK, v)
}

/// Creates a consumer group with options (all optional; saved beside the
/// queue). A group's options are fixed at creation: a PUT naming other
/// options for a group that exists is 409 `group_exists`.
#[utoipa::path(
    put,
    path = "/v1/queues/{queue}/groups/{group}",
    tag = "groups",
    params(QueuePath, GroupPath),
    request_body(
        content = Option<GroupOptions>,
        content_type = "application/json",
        description = "The group's options; an empty body (or null) takes walq's defaults",
    ),
    responses(
        (status = 200, description = "It existed, with these options (or the body named none)", body = GroupCreated, links(
            ("Fetch" = (operation_id = "fetch", parameters(
                ("queue" = "$request.path.queue"), ("group" = "$response.body#/name")
            ))),
            ("DeadLetters" = (operation_id = "dead_letters", parameters(
                ("queue" = "$request.path.queue"), ("group" = "$response.body#/name")
            ))),
        )),
        (status = 201, description = "Created", body = GroupCreated, links(
            ("Fetch" = (operation_id = "fetch", parameters(
                ("queue" = "$request.path.queue"), ("group" = "$response.body#/name")
            ))),
            ("DeadLetters" = (operation_id = "dead_letters", parameters(
                ("queue" = "$request.path.queue"), ("group" = "$response.body#/name")
            ))),
        )),
        (status = 400, response = BadRequest),
        (status = 404, response = NotFound),
        (status = 409, response = Conflict),
        (status = 408, response = BodyTimeout),
        (status = 413, response = TooLarge),
        (status = 416, response = OutOfRange),
        (status = 431, response = HeadersTooLarge),
        (status = 500, response = ServerError),
        (status = 503, response = Unavailable),
        (status = 507, response = DiskFull),
    )
)]
async fn create_group(
    State(app): State<Arc<App>>,
    p: Result<Path<(String, String)>, PathRejection>,
    b: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let (queue, name) = path(p)?;
    check_member_name("group", &name)?;
    let e = app.registry.existing(&queue)?;
    let b = body(b)?;
    // An empty body, or JSON null: the defaults.
    let options: Option<GroupOptions> = json_body(&b)?;
    let (g, opts, created) = open_group(&e, &name, options, true).await?;
    let group = Group::of(&g.info(), Some(&(g.clone(), opts)), None);
    ok(if created { StatusCode::CREATED } else { StatusCode::OK }, GroupCreated { group, created })
}

/// How many deliveries and how long to wait.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct FetchQuery {
    /// Most deliveries (default 1, at most the group's `prefetch` and the
    /// server's `max_records_per_read`).
    #[param(nullable = false, value_type = Option<u64>)]
    max: Option<usize>,
    /// Wait up to this many milliseconds for a first delivery (default 0,
    /// at most the server's `long_poll_max_ms`).
    #[param(nullable = false)]
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
    if cancelled.load(std::sync::atomic::Ordering::Acquire) {
        return Ok(Vec::new()); // nobody to hand deliveries to: take none
    }
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

/// One fetch request, blocking, in one trip to the blocking pool: a first
/// look, then (if nothing was there and the request waits) the long-poll in
/// `FETCH_SLICE` slices, with a long-poll slot (`take_slot`: 429 when none is
/// left) taken only then. Returns early, empty, when the client went away
/// (`cancelled`: what was taken is handed back once, never fetched again) or
/// the server drains.
fn fetch_waiting<S>(
    group: &walq::Group,
    max: usize,
    budget: usize,
    wait: Duration,
    cancelled: &std::sync::atomic::AtomicBool,
    draining: &std::sync::atomic::AtomicBool,
    take_slot: impl FnOnce() -> Result<S, ApiError>,
) -> Result<Vec<walq::Delivery>, ApiError> {
    use std::sync::atomic::Ordering::Acquire;
    let got = fetch_bounded(group, max, budget, Duration::ZERO, cancelled)?;
    if !got.is_empty() || wait.is_zero() || draining.load(Acquire) || cancelled.load(Acquire) {
        return Ok(got);
    }
    let _slot = take_slot()?;
    let deadline = Instant::now() + wait;
    loop {
        let slice = deadline.saturating_duration_since(Instant::now()).min(FETCH_SLICE);
        let got = fetch_bounded(group, max, budget, slice, cancelled)?;
        let stop = draining.load(Acquire) || cancelled.load(Acquire) || Instant::now() >= deadline;
        if !got.is_empty() || stop || slice.is_zero() {
            return Ok(got);
        }
    }
}

fn delivery_out(d: &walq::Delivery) -> DeliveryOut {
    DeliveryOut {
        record: RecordOut::of(d.record()),
        id: d.id().to_token(),
        delivery_count: d.delivery_count(),
    }
}

/// Fetches up to `max` deliveries, waiting up to `wait_ms` for a first
/// (long-poll); creates the group with the defaults if it does not exist.
/// Each stays in flight until acked, nacked, termed or its ack wait runs out.
#[utoipa::path(
    post,
    path = "/v1/queues/{queue}/groups/{group}/fetch",
    tag = "groups",
    params(QueuePath, GroupPath, FetchQuery),
    responses(
        (status = 200, description = "The deliveries (empty if none came within the wait)", body = Deliveries, links(
            ("Settle" = (operation_id = "settle", parameters(
                ("queue" = "$request.path.queue"),
                ("group" = "$request.path.group"),
                ("id" = "$response.body#/deliveries/0/id")
            ))),
            ("GroupInfo" = (operation_id = "group_info", parameters(
                ("queue" = "$request.path.queue"), ("group" = "$request.path.group")
            ))),
        )),
        (status = 400, response = BadRequest),
        (status = 404, response = NotFound),
        (status = 409, response = Conflict),
        (status = 429, response = TooMany),
        (status = 431, response = HeadersTooLarge),
        (status = 500, response = ServerError),
        (status = 503, response = Unavailable),
        (status = 507, response = DiskFull),
    )
)]
async fn fetch(
    _accepting: Accepting,
    State(app): State<Arc<App>>,
    p: Result<Path<(String, String)>, PathRejection>,
    q: Result<Query<FetchQuery>, QueryRejection>,
) -> ApiResult {
    let (queue, name) = path(p)?;
    check_member_name("group", &name)?;
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
    let c = Arc::clone(&cancelled);
    let app2 = Arc::clone(&app);
    let deliveries = blocking(move || {
        let draining = app2.draining_flag();
        fetch_waiting(&group, max, budget, wait, &c, &draining, || app2.long_poll_permit())
    })
    .await?;
    ok(StatusCode::OK, Deliveries { deliveries: deliveries.iter().map(delivery_out).collect() })
}

/// Details of a nack or term.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct SettleQuery {
    /// nack: redeliver after this many milliseconds (default 0).
    #[param(nullable = false)]
    delay_ms: Option<u64>,
    /// term: the reason recorded in the dead letter (default `term`).
    #[param(nullable = false)]
    reason: Option<String>,
}

/// Settles a delivery. An ack settles the record (acking one already done
/// answers 200); nack, in-progress and term act on this exact delivery (409
/// `delivery_not_pending` if it is no longer the one in flight).
#[utoipa::path(
    post,
    path = "/v1/queues/{queue}/groups/{group}/deliveries/{id}/{action}",
    tag = "groups",
    params(QueuePath, GroupPath, DeliveryPath, SettleQuery),
    responses(
        (status = 200, description = "Done", body = Settled),
        (status = 400, response = BadRequest),
        (status = 404, response = NotFound),
        (status = 409, response = Conflict),
        (status = 431, response = HeadersTooLarge),
        (status = 500, response = ServerError),
        (status = 503, response = Unavailable),
        (status = 507, response = DiskFull),
    )
)]
async fn settle(
    State(app): State<Arc<App>>,
    p: Result<Path<(String, String, String, String)>, PathRejection>,
    q: Result<Query<SettleQuery>, QueryRejection>,
) -> ApiResult {
    let (queue, name, token, action) = path(p)?;
    check_member_name("group", &name)?;
    let e = app.registry.existing(&queue)?;
    let q = query(q)?;
    let id = DeliveryId::from_token(&token).ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_delivery_id",
            format!("{token:?} is not a delivery id (use the id a fetch returned)"),
        )
    })?;
    let done = match action.as_str() {
        "ack" => SettleAction::Ack,
        "nack" => SettleAction::Nack,
        "in-progress" => SettleAction::InProgress,
        "term" => SettleAction::Term,
        _ => return Err(no_route().await),
    };
    let (group, _, _) = open_group(&e, &name, None, false).await?;
    blocking(move || {
        match done {
            SettleAction::Ack => group.ack(id),
            SettleAction::Nack => group.nack(id, Duration::from_millis(q.delay_ms.unwrap_or(0))),
            SettleAction::InProgress => group.in_progress(id),
            SettleAction::Term => group.term_with_reason(id, q.reason.as_deref().unwrap_or("term")),
        }
        .map_err(ApiError::from)
    })
    .await?;
    ok(StatusCode::OK, Settled { id: token, done })
}

/// Where to read a group's dead letters from and how much.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct DeadLetterQuery {
    /// The first offset to read in the dead-letter queue (default: its first).
    #[param(nullable = false)]
    offset: Option<u64>,
    /// Most records (default 100, at most the server's `max_records_per_read`).
    #[param(nullable = false, value_type = Option<u64>)]
    max: Option<usize>,
    /// The records' bytes sum to at most this (but one record is always
    /// returned if there is one).
    #[param(nullable = false, value_type = Option<u64>)]
    max_bytes: Option<usize>,
}

/// Reads a group's dead letters: records given up on, each with
/// `walq-original-offset`, `walq-delivery-count`, `walq-dead-letter-reason`,
/// `walq-group` and `walq-original-timestamp` headers. No long-poll.
#[utoipa::path(
    get,
    path = "/v1/queues/{queue}/groups/{group}/dead-letters",
    tag = "groups",
    params(QueuePath, GroupPath, DeadLetterQuery),
    responses(
        (status = 200, description = "The dead letters", body = Records),
        (status = 400, response = BadRequest),
        (status = 404, response = NotFound),
        (status = 416, response = OutOfRange),
        (status = 431, response = HeadersTooLarge),
        (status = 500, response = ServerError),
        (status = 503, response = Unavailable),
    )
)]

async fn dead_letters(
    State(app): State<Arc<App>>,
    p: Result<Path<(String, String)>, PathRejection>,
    q: Result<Query<DeadLetterQuery>, QueryRejection>,
) -> ApiResult {
    let (queue, name) = path(p)?;
    check_member_name("group", &name)?;
    let e = app.registry.existing(&queue)?;
    let q = query(q)?;
    let (group, _, _) = open_group(&e, &name, None, false).await?;
    let q = ReadQuery { offset: q.offset, max: q.max, max_bytes: q.max_bytes, ..ReadQuery::default() };
    let limits = ReadLimits::new(&app, &q);
    let (records, next) = blocking(move || {
        let Some(dlq) = group.dead_letters() else { return Ok((Vec::new(), 0)) };
        let from = q.offset.unwrap_or_else(|| dlq.first_offset());
        read_some(dlq, from, limits.max, limits.max_bytes).map_err(ApiError::from)
    })
    .await?;
    ok(StatusCode::OK, Records { records: records.iter().map(RecordOut::of).collect(), next_offset: next })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    fn group_with(records: usize) -> (tempfile::TempDir, Queue, walq::Group) {
        let dir = tempfile::tempdir().expect("temp dir");
        let queue = Queue::open(dir.path()).expect("open");
        for i in 0..records {
            queue.append(format!("r{i}").as_bytes()).expect("append");
        }
        let group = queue.group("g").open().expect("group");
        (dir, queue, group)
    }

    fn no_slot() -> Result<(), ApiError> {
        panic!("a long-poll slot was taken")
    }

    /// Review finding: a gone client's fetch took the record, handed it back,
    /// then long-polled, took it again and handed it back again (delivery
    /// count 3 on the next real fetch). Now it takes nothing and no slot.
    #[test]
    fn a_gone_clients_fetch_takes_no_delivery_and_no_slot() {
        let (_dir, _queue, group) = group_with(1);
        let (cancelled, draining) = (AtomicBool::new(true), AtomicBool::new(false));
        let started = Instant::now();
        let got = fetch_waiting(&group, 1, 1 << 20, Duration::from_secs(5), &cancelled, &draining, no_slot)
            .expect("fetch");
        assert!(got.is_empty() && started.elapsed() < FETCH_SLICE, "returned at once, empty");
        let next = fetch_bounded(&group, 1, 1 << 20, Duration::ZERO, &AtomicBool::new(false)).expect("fetch");
        assert_eq!(next.len(), 1);
        assert_eq!(next[0].delivery_count(), 1, "the record was never delivered before");
    }

    #[test]
    fn a_fetch_takes_a_long_poll_slot_only_when_it_waits() {
        let (_dir, _queue, group) = group_with(1);
        let (cancelled, draining) = (AtomicBool::new(false), AtomicBool::new(false));
        let got = fetch_waiting(&group, 1, 1 << 20, Duration::from_secs(5), &cancelled, &draining, no_slot)
            .expect("a record there: no slot");
        assert_eq!(got.len(), 1);
        let mut slots = 0;
        let started = Instant::now();
        let got =
            fetch_waiting(&group, 1, 1 << 20, Duration::from_millis(150), &cancelled, &draining, || {
                slots += 1;
                Ok(())
            })
            .expect("nothing there: waits");
        assert!(got.is_empty() && started.elapsed() >= Duration::from_millis(150));
        assert_eq!(slots, 1);
        let refused =
            fetch_waiting(&group, 1, 1 << 20, Duration::from_secs(5), &cancelled, &draining, || {
                Err::<(), _>(ApiError::new(StatusCode::TOO_MANY_REQUESTS, "too_many_long_polls", "full"))
            });
        assert_eq!(refused.expect_err("no slot left").status, StatusCode::TOO_MANY_REQUESTS);
    }
}
