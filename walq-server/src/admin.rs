//! The admin listener: `/livez` (the process answers and no queue is
//! poisoned), `/readyz` (200 once recovery is done, 503 before and while
//! draining) and `/metrics` (Prometheus text).
//! Nothing here reads or changes a queue's data.
//!
//! A poisoned queue (a write or fdatasync failed, so walq no longer knows
//! what reached the disk) refuses every produce until it is reopened, and
//! reopening means recovery. `/livez` then answers 503 so that the kubelet
//! restarts the container: the restart runs recovery, which finds out what
//! is really on disk. A disk that keeps failing shows as a crash loop.
//! `/readyz` stays as it is: walq runs beside the application, and the
//! pod's readiness is the application's too (its other work goes on).

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

async fn livez(State(app): State<Arc<App>>) -> Response {
    match poisoned(&app) {
        None => (StatusCode::OK, "ok\n").into_response(),
        Some(message) => (StatusCode::SERVICE_UNAVAILABLE, message).into_response(),
    }
}

/// What to say when a queue is poisoned (`None` when none is).
fn poisoned(app: &App) -> Option<String> {
    let names = app.registry.poisoned();
    (!names.is_empty()).then(|| {
        format!(
            "poisoned: {} (a write or sync failed; restart the server so that recovery checks the disk)\n",
            names.join(", ")
        )
    })
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

#[cfg(test)]
mod tests {
    use super::*;
    use walq::{Fault, FaultKind, FaultOp, SimDisk};

    /// A bound server's shared state, recovery marked done (nothing served).
    async fn ready_app(dir: &std::path::Path) -> Arc<App> {
        let config = crate::Config {
            data_dir: dir.to_path_buf(),
            listen: "127.0.0.1:0".parse().unwrap(),
            admin_listen: "127.0.0.1:0".parse().unwrap(),
            ..Default::default()
        };
        crate::Server::bind(config).await.unwrap().ready_app_for_test()
    }

    /// The status and body text of a probe's answer.
    async fn answer(response: Response) -> (StatusCode, String) {
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), 1 << 10).await.unwrap();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn a_poisoned_queue_fails_livez_so_that_a_restart_recovers_it_and_readyz_stays() {
        let dir = tempfile::tempdir().unwrap();
        let app = ready_app(dir.path()).await;
        let disk = SimDisk::new(7);
        let queue = walq::Queue::builder("/sim/orders").simulated(&disk).open().unwrap();
        queue.append(b"kept").unwrap();
        app.registry.insert_for_test("orders", queue);
        assert_eq!(livez(State(Arc::clone(&app))).await.status(), StatusCode::OK);
        assert_eq!(readyz(State(Arc::clone(&app))).await.status(), StatusCode::OK);

        disk.inject(Fault::new(FaultOp::Sync, FaultKind::Eio));
        let entry = app.registry.get("orders").unwrap();
        assert!(entry.queue.append(b"lost").is_err());
        assert!(entry.queue.is_poisoned());
        let (status, text) = answer(livez(State(Arc::clone(&app))).await).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(text.contains("poisoned: orders") && text.contains("restart"), "{text}");
        // The pod's readiness is the application's too: unchanged.
        assert_eq!(readyz(State(Arc::clone(&app))).await.status(), StatusCode::OK);
    }

    #[tokio::test]
    async fn a_poisoned_dead_letter_queue_fails_livez_too() {
        let dir = tempfile::tempdir().unwrap();
        let app = ready_app(dir.path()).await;
        let disk = SimDisk::new(8);
        let queue = walq::Queue::builder("/sim/jobs").simulated(&disk).open().unwrap();
        queue.append(b"poison").unwrap();
        app.registry.insert_for_test("jobs", queue);
        let entry = app.registry.get("jobs").unwrap();
        let (group, _, _) = entry.group("workers", None, true).unwrap();
        let delivery = group.worker().fetch(1, std::time::Duration::ZERO).unwrap().remove(0);
        disk.inject(Fault {
            op: FaultOp::Sync,
            nth: 1,
            kind: FaultKind::Eio,
            path_contains: Some("dead-letters".into()),
        });
        assert!(group.term(delivery.id()).is_err());
        assert!(group.dead_letters().unwrap().is_poisoned());
        assert!(!entry.queue.is_poisoned());
        let (status, text) = answer(livez(State(Arc::clone(&app))).await).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(text.contains("jobs/dead-letters/workers"), "{text}");
    }
}
