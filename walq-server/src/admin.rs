//! The admin listener: `/livez` (the process answers), `/readyz` (200 once
//! recovery is done, 503 before and while draining) and `/metrics`
//! (Prometheus text). Nothing here reads or changes a queue's data.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::server::App;

/// The admin router.
pub(crate) fn router(app: Arc<App>) -> axum::Router {
    axum::Router::new()
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .layer(axum::middleware::from_fn_with_state((Arc::clone(&app), "admin"), crate::server::track))
        .with_state(app)
}

async fn livez() -> &'static str {
    "ok\n"
}

async fn readyz(State(app): State<Arc<App>>) -> Response {
    if app.is_ready() {
        (StatusCode::OK, "ready\n").into_response()
    } else if app.is_draining() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "recovering\n").into_response()
    }
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    // Rendering reads every queue's consumers and groups, whose locks a
    // commit may hold across an fdatasync: off the runtime threads, so that
    // /livez stays answerable whatever the disk does.
    let rendered = tokio::task::spawn_blocking(move || {
        crate::metrics::render(
            &app.registry,
            &app.http,
            app.is_ready(),
            app.is_draining(),
            app.long_polls_waiting(),
        )
    })
    .await;
    match rendered {
        Ok(body) => {
            ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], body).into_response()
        }
        Err(e) => (axum::http::StatusCode::INTERNAL_SERVER_ERROR, format!("rendering metrics failed: {e}\n"))
            .into_response(),
    }
}
