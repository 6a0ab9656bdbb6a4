//! The API's one error type: every failure is a stable JSON code, an HTTP
//! status and a message, `{"error": {"code": "...", "message": "..."}}`,
//! with `Retry-After` on the statuses a client should retry (429, 503).
//! Invariant: each `walq::Error` variant maps to exactly one code, and every
//! code the server gives is listed in [`CODES`] (which the OpenAPI document
//! shows; a test reads the sources to hold it).

use std::borrow::Cow;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;
use utoipa::openapi::RefOr;
use utoipa::openapi::schema::{ObjectBuilder, Schema, SchemaType, Type};
use utoipa::{PartialSchema, ToResponse, ToSchema};

/// Every error code with its HTTP status and when it is given.
pub(crate) const CODES: &[(&str, u16, &str)] = &[
    (
        "bad_request",
        400,
        "a header, query parameter or JSON body the API cannot read; a bad entry of a batch",
    ),
    (
        "invalid_name",
        400,
        "a queue name outside the rule (1 to 128 of A-Z a-z 0-9 . _ -, not starting with .)",
    ),
    ("invalid_option", 400, "a bad consumer or group name, or option value"),
    ("invalid_delivery_id", 400, "a delivery id no fetch made"),
    ("queue_not_found", 404, "no such queue (reads do not create queues)"),
    ("unknown_consumer", 404, "no such consumer"),
    ("unknown_group", 404, "no such group"),
    ("no_route", 404, "no such endpoint"),
    ("delivery_not_pending", 409, "the delivery is settled already or was redelivered"),
    ("locked", 409, "the queue directory is held by another process"),
    ("in_use", 409, "the consumer is open elsewhere"),
    ("queue_limit", 409, "the server holds max_queues queues"),
    ("group_limit", 409, "the queue has max_groups_per_queue consumer groups"),
    ("group_exists", 409, "the group exists with other options (a group's options are fixed at creation)"),
    ("consumer_limit", 409, "the queue has max_consumers_per_queue named consumers"),
    ("body_timeout", 408, "the body did not arrive within body_read_timeout_ms"),
    ("body_too_large", 413, "the body exceeds max_body_bytes"),
    ("record_too_large", 413, "the record exceeds the queue's max_record_bytes"),
    ("offset_out_of_range", 416, "the offset is below the first one held or past the end"),
    ("queue_full", 429, "the queue holds its max_bytes (retry later)"),
    ("too_many_long_polls", 429, "max_long_polls requests are already waiting"),
    ("headers_too_large", 431, "the request headers exceed max_header_bytes"),
    ("corrupt", 500, "damaged data: see walq verify"),
    ("unsupported_format", 500, "a file from a newer walq"),
    ("internal", 500, "a request's task failed (see the server log)"),
    ("shutting_down", 503, "the server is draining: no new produces or fetches"),
    ("poisoned", 503, "a write or sync failed: the queue refuses appends until the server restarts"),
    ("io_error", 503, "an I/O error"),
    ("internal", 503, "an error the API has no code for yet (see the server log)"),
    ("disk_full", 507, "the disk is full (the queue is poisoned too)"),
];

/// The error codes, as an OpenAPI string enum (the schema of `error.code`).
pub(crate) struct ErrorCode;

impl PartialSchema for ErrorCode {
    fn schema() -> RefOr<Schema> {
        let mut codes: Vec<&str> = Vec::new();
        for (code, _, _) in CODES {
            if !codes.contains(code) {
                codes.push(code);
            }
        }
        let mut description = String::from("A stable error code; match on it, never on the message:\n");
        for (code, status, when) in CODES {
            description.push_str(&format!("\n- `{code}` ({status}): {when}"));
        }
        ObjectBuilder::new()
            .schema_type(SchemaType::Type(Type::String))
            .enum_values(Some(codes))
            .description(Some(description))
            .into()
    }
}

impl ToSchema for ErrorCode {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("ErrorCode")
    }
}

/// Every error's body (the schema of what [`ApiError::into_response`]
/// writes; the tests read answers into it).
#[derive(Debug, Deserialize, ToSchema)]
#[allow(dead_code)]
#[serde(deny_unknown_fields)]
pub(crate) struct ErrorBody {
    /// What went wrong.
    pub error: ErrorDetail,
}

/// What went wrong: a code, a message and, for some codes, details.
#[derive(Debug, Deserialize, ToSchema)]
#[allow(dead_code)]
#[serde(deny_unknown_fields)]
pub(crate) struct ErrorDetail {
    /// The stable code clients match on.
    #[schema(value_type = ErrorCode)]
    pub code: String,
    /// For people: what happened and what to do.
    pub message: String,
    /// `offset_out_of_range`: the offset asked.
    #[serde(default)]
    pub offset: Option<u64>,
    /// `offset_out_of_range`: the first offset held.
    #[serde(default)]
    pub first_offset: Option<u64>,
    /// `offset_out_of_range`: the offset the next record gets.
    #[serde(default)]
    pub next_offset: Option<u64>,
    /// `record_too_large`: the record's encoded length.
    #[serde(default)]
    pub len: Option<u64>,
    /// `record_too_large`: the queue's limit.
    #[serde(default)]
    pub max: Option<u64>,
}

/// `bad_request`, `invalid_name`, `invalid_option` or `invalid_delivery_id`.
#[derive(ToResponse)]
#[allow(dead_code)]
pub(crate) struct BadRequest(ErrorBody);

/// `queue_not_found`, `unknown_consumer`, `unknown_group` or `no_route`.
#[derive(ToResponse)]
#[allow(dead_code)]
pub(crate) struct NotFound(ErrorBody);

/// `delivery_not_pending`, `locked`, `in_use`, `queue_limit`, `group_limit`,
/// `group_exists` or `consumer_limit`.
#[derive(ToResponse)]
#[allow(dead_code)]
pub(crate) struct Conflict(ErrorBody);

/// `body_timeout`: the body did not arrive within `body_read_timeout_ms`.
#[derive(ToResponse)]
#[allow(dead_code)]
pub(crate) struct BodyTimeout(ErrorBody);

/// `body_too_large` (the body exceeds `max_body_bytes`) or
/// `record_too_large` (the record exceeds the queue's `max_record_bytes`).
#[derive(ToResponse)]
#[allow(dead_code)]
pub(crate) struct TooLarge(ErrorBody);

/// `offset_out_of_range`: the offset is below the first one held or past the end.
#[derive(ToResponse)]
#[allow(dead_code)]
pub(crate) struct OutOfRange(ErrorBody);

/// `queue_full` or `too_many_long_polls`: retry after `Retry-After` seconds.
#[derive(ToResponse)]
#[response(headers(("Retry-After" = u32, description = "Seconds to wait before a retry")))]
#[allow(dead_code)]
pub(crate) struct TooMany(ErrorBody);

/// `headers_too_large`: the request headers exceed `max_header_bytes`.
#[derive(ToResponse)]
#[allow(dead_code)]
pub(crate) struct HeadersTooLarge(ErrorBody);

/// `corrupt`, `unsupported_format` (see `walq verify`) or `internal` (see the server log).
#[derive(ToResponse)]
#[allow(dead_code)]
pub(crate) struct ServerError(ErrorBody);

/// `shutting_down` (the server is draining), `poisoned` or `io_error` (a
/// write or sync failed), `internal`: retry after `Retry-After` seconds.
#[derive(ToResponse)]
#[response(headers(("Retry-After" = u32, description = "Seconds to wait before a retry")))]
#[allow(dead_code)]
pub(crate) struct Unavailable(ErrorBody);

/// `disk_full`: the disk is full (the queue is poisoned too).
#[derive(ToResponse)]
#[allow(dead_code)]
pub(crate) struct DiskFull(ErrorBody);

/// An error answer of the API.
#[derive(Debug)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// The stable code clients match on (never the message).
    pub code: &'static str,
    /// For people: what happened and what to do.
    pub message: String,
    /// Seconds for `Retry-After` (429 and 503).
    pub retry_after: Option<u32>,
    /// Extra fields for the error object (offsets of a range error).
    pub details: Option<serde_json::Value>,
}

impl ApiError {
    /// An error with no `Retry-After`.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { status, code, message: message.into(), retry_after: None, details: None }
    }

    /// 400 `bad_request`: a header, query or body the API cannot read.
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    /// 503 `shutting_down`: the server is draining; retry elsewhere or later.
    pub fn shutting_down() -> ApiError {
        ApiError {
            retry_after: Some(1),
            ..ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "shutting_down",
                "the server is shutting down and takes no new work; retry after it restarts",
            )
        }
    }

    /// 404 `queue_not_found`.
    pub fn queue_not_found(name: &str) -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "queue_not_found",
            format!("no queue named {name:?}; produce to it or PUT /v1/queues/{name} to create it"),
        )
    }

    fn retry(mut self, secs: u32) -> ApiError {
        self.retry_after = Some(secs);
        self
    }
}

impl From<walq::Error> for ApiError {
    fn from(e: walq::Error) -> ApiError {
        use walq::Error as E;
        let message = match &e {
            // The library's message points at its own API; say the HTTP one.
            E::UnknownConsumer { kind, name } => {
                format!(
                    "no {kind} named {name:?} exists in this queue; list them with GET /v1/queues/{{queue}}/{kind}s"
                )
            }
            _ => e.to_string(),
        };
        let (status, code) = match &e {
            E::Locked { .. } => (StatusCode::CONFLICT, "locked"),
            E::DiskFull { .. } => (StatusCode::INSUFFICIENT_STORAGE, "disk_full"),
            E::Poisoned => (StatusCode::SERVICE_UNAVAILABLE, "poisoned"),
            E::RecordTooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "record_too_large"),
            E::OffsetOutOfRange { .. } => (StatusCode::RANGE_NOT_SATISFIABLE, "offset_out_of_range"),
            E::UnsupportedFormat { .. } => (StatusCode::INTERNAL_SERVER_ERROR, "unsupported_format"),
            E::Corrupt { .. } => (StatusCode::INTERNAL_SERVER_ERROR, "corrupt"),
            E::InvalidOption { .. } => (StatusCode::BAD_REQUEST, "invalid_option"),
            E::NotFound { .. } => (StatusCode::NOT_FOUND, "queue_not_found"),
            E::Io { .. } => (StatusCode::SERVICE_UNAVAILABLE, "io_error"),
            E::Full { .. } => (StatusCode::TOO_MANY_REQUESTS, "queue_full"),
            E::UnknownConsumer { kind: "group", .. } => (StatusCode::NOT_FOUND, "unknown_group"),
            E::UnknownConsumer { .. } => (StatusCode::NOT_FOUND, "unknown_consumer"),
            E::InUse { .. } => (StatusCode::CONFLICT, "in_use"),
            E::DeliveryNotPending { .. } => (StatusCode::CONFLICT, "delivery_not_pending"),
            _ => (StatusCode::SERVICE_UNAVAILABLE, "internal"),
        };
        let mut err = ApiError::new(status, code, message);
        match e {
            E::OffsetOutOfRange { offset, first, next } => {
                err.details = Some(json!({"offset": offset, "first_offset": first, "next_offset": next}));
            }
            E::RecordTooLarge { len, max } => err.details = Some(json!({"len": len, "max": max})),
            E::Full { .. } => err = err.retry(1),
            E::Poisoned | E::Io { .. } => err = err.retry(5),
            _ if status == StatusCode::SERVICE_UNAVAILABLE => err = err.retry(5),
            _ => {}
        }
        err
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({"code": self.code, "message": self.message});
        if let (Some(serde_json::Value::Object(extra)), Some(obj)) = (self.details, body.as_object_mut()) {
            obj.extend(extra);
        }
        let mut response = (self.status, axum::Json(json!({ "error": body }))).into_response();
        if let Some(secs) = self.retry_after {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The crate's sources, where codes are given.
    const SOURCES: [(&str, &str); 6] = [
        ("api.rs", include_str!("api.rs")),
        ("error.rs", include_str!("error.rs")),
        ("registry.rs", include_str!("registry.rs")),
        ("server.rs", include_str!("server.rs")),
        ("admin.rs", include_str!("admin.rs")),
        ("config.rs", include_str!("config.rs")),
    ];

    /// `StatusCode::NAME` of a status, as the sources spell it.
    fn constant_name(status: u16) -> String {
        StatusCode::from_u16(status)
            .unwrap()
            .canonical_reason()
            .unwrap()
            .to_uppercase()
            .replace([' ', '-'], "_")
    }

    /// Every `(StatusCode::NAME, "code")` the sources give: the arguments of
    /// `ApiError::new(` and the arms of the `walq::Error` mapping.
    fn codes_in_sources() -> Vec<(String, String, &'static str)> {
        let mut found = Vec::new();
        for (file, text) in SOURCES {
            for (i, _) in text.match_indices("StatusCode::") {
                let line_start = text[..i].rfind('\n').map_or(0, |n| n + 1);
                if text[line_start..i].trim_start().starts_with("//") {
                    continue;
                }
                let rest = &text[i + "StatusCode::".len()..];
                let name: String = rest.chars().take_while(|c| c.is_ascii_uppercase() || *c == '_').collect();
                let after = rest[name.len()..].trim_start();
                let Some(after) = after.strip_prefix(',') else { continue };
                let after = after.trim_start();
                let Some(lit) = after.strip_prefix('"') else { continue };
                let code: String = lit.chars().take_while(|c| *c != '"').collect();
                if !code.is_empty() && code.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') {
                    found.push((name, code, file));
                }
            }
        }
        found
    }

    #[test]
    fn every_code_given_is_documented_with_its_status() {
        let found = codes_in_sources();
        assert!(found.len() >= 20, "the scan found too few codes: {found:?}");
        for (name, code, file) in &found {
            assert!(
                CODES.iter().any(|(c, status, _)| c == code && constant_name(*status) == *name),
                "{file} gives {code} with StatusCode::{name}, which CODES (the OpenAPI document) does not list"
            );
        }
        // And the table lists nothing the sources never give.
        for (code, status, _) in CODES {
            let name = constant_name(*status);
            assert!(
                found.iter().any(|(n, c, _)| c == code && *n == name),
                "CODES lists {code} ({status}), which no source gives"
            );
        }
    }

    #[test]
    fn every_error_body_has_the_documented_shape() {
        let io = || std::io::Error::from_raw_os_error(5);
        let errors = vec![
            ApiError::from(walq::Error::OffsetOutOfRange { offset: 9, first: 0, next: 1 }),
            ApiError::from(walq::Error::RecordTooLarge { len: 2, max: 1 }),
            ApiError::from(walq::Error::Io { op: "write", path: "/q".into(), source: io() }),
            ApiError::bad_request("x"),
            ApiError::shutting_down(),
        ];
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        for e in errors {
            let code = e.code;
            let body = rt.block_on(async {
                axum::body::to_bytes(e.into_response().into_body(), usize::MAX).await.unwrap()
            });
            let parsed: ErrorBody =
                serde_json::from_slice(&body).unwrap_or_else(|err| panic!("{code}: {err}"));
            assert_eq!(parsed.error.code, code);
        }
    }

    #[test]
    fn every_walq_error_has_one_code_and_status() {
        let io = || std::io::Error::from_raw_os_error(5);
        let cases: Vec<(walq::Error, u16, &str)> = vec![
            (walq::Error::Locked { dir: "/q".into() }, 409, "locked"),
            (walq::Error::DiskFull { path: "/q".into() }, 507, "disk_full"),
            (walq::Error::Poisoned, 503, "poisoned"),
            (walq::Error::RecordTooLarge { len: 2, max: 1 }, 413, "record_too_large"),
            (walq::Error::OffsetOutOfRange { offset: 9, first: 0, next: 1 }, 416, "offset_out_of_range"),
            (
                walq::Error::UnsupportedFormat { path: "/q".into(), found: 9, supported: 1 },
                500,
                "unsupported_format",
            ),
            (walq::Error::Corrupt { path: "/q".into(), position: 0, reason: "x".into() }, 500, "corrupt"),
            (walq::Error::InvalidOption { name: "x", reason: "y".into() }, 400, "invalid_option"),
            (walq::Error::NotFound { dir: "/q".into() }, 404, "queue_not_found"),
            (walq::Error::Io { op: "write", path: "/q".into(), source: io() }, 503, "io_error"),
            (walq::Error::Full { max_bytes: 1 }, 429, "queue_full"),
            (walq::Error::UnknownConsumer { kind: "consumer", name: "c".into() }, 404, "unknown_consumer"),
            (walq::Error::UnknownConsumer { kind: "group", name: "g".into() }, 404, "unknown_group"),
            (walq::Error::InUse { name: "c".into() }, 409, "in_use"),
            (walq::Error::DeliveryNotPending { offset: 1 }, 409, "delivery_not_pending"),
        ];
        for (e, status, code) in cases {
            let a = ApiError::from(e);
            assert_eq!((a.status.as_u16(), a.code), (status, code));
            assert_eq!(a.retry_after.is_some(), status == 503 || status == 429, "{code}");
        }
    }
}
