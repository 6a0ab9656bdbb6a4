//! The API's one error type: every failure is a stable JSON code, an HTTP
//! status and a message, `{"error": {"code": "...", "message": "..."}}`,
//! with `Retry-After` on the statuses a client should retry (429, 503).
//! Invariant: each `walq::Error` variant maps to exactly one code.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

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
        let message = e.to_string();
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
