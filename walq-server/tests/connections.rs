//! Connection-level bounds of the data plane (issue 8's "bounded before they
//! are read", review findings R3, R4 and B6): header count and size, the
//! header and body read timeouts, the per-queue caps on groups and
//! consumers, and a drain that a stalled client cannot stretch past its
//! grace period.

use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

mod common;

use common::{TestResult, code, start_with};

/// Sends `request` on a fresh connection and reads until the server closes it
/// (or `within` passes); returns what came back.
async fn exchange(base: &str, request: &[u8], within: Duration) -> (String, Duration) {
    let started = Instant::now();
    let mut c = tokio::net::TcpStream::connect(base.trim_start_matches("http://")).await.expect("connect");
    c.write_all(request).await.expect("write");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(within, c.read_to_end(&mut answer)).await;
    (String::from_utf8_lossy(&answer).into_owned(), started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_body_gets_408_body_timeout_after_body_read_timeout() -> TestResult {
    let dir = tempfile::tempdir()?;
    let s = start_with(dir.path(), |c| c.body_read_timeout_ms = 300).await;
    let (answer, took) = exchange(
        &s.base,
        b"POST /v1/queues/q/records HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nabc",
        Duration::from_secs(5),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
    assert!(answer.contains("\"body_timeout\""), "{answer:?}");
    assert!(took >= Duration::from_millis(250) && took < Duration::from_secs(3), "{took:?}");
    // Nothing was appended, and the queue answers as before.
    let (st, v) = s.get("/v1/queues/q").await;
    assert!(st == 404 || v["next_offset"] == 0, "{st} {v}");
    s.produce("q", "after").await;
    s.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_arrives_in_time_is_not_cut_by_the_deadline() -> TestResult {
    let dir = tempfile::tempdir()?;
    let s = start_with(dir.path(), |c| c.body_read_timeout_ms = 2_000).await;
    let mut c = tokio::net::TcpStream::connect(s.base.trim_start_matches("http://")).await?;
    c.write_all(
        b"POST /v1/queues/q/records HTTP/1.1\r\nHost: t\r\nContent-Length: 6\r\nConnection: close\r\n\r\nabc",
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.write_all(b"def").await?;
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(5), c.read_to_string(&mut answer)).await??;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    let (_, v) = s.get("/v1/queues/q/records?offset=0").await;
    assert_eq!(v["records"][0]["value"], "abcdef", "{v}");
    s.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_head_closes_the_connection_after_header_read_timeout() -> TestResult {
    let dir = tempfile::tempdir()?;
    let s = start_with(dir.path(), |c| c.header_read_timeout_ms = 300).await;
    let (answer, took) =
        exchange(&s.base, b"GET /v1/queues HTTP/1.1\r\nHost: t\r\n", Duration::from_secs(5)).await;
    // hyper closes the connection (with a bare 408, or without an answer).
    assert!(answer.is_empty() || answer.starts_with("HTTP/1.1 408"), "{answer:?}");
    assert!(took >= Duration::from_millis(250) && took < Duration::from_secs(3), "closed after {took:?}");
    s.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_header_fields_get_the_json_431() -> TestResult {
    let dir = tempfile::tempdir()?;
    let s = start_with(dir.path(), |c| c.max_header_bytes = 2_000).await;
    // 200 small fields: more than hyper's default of 100, fewer than walq's
    // MAX_HEADER_FIELDS, over max_header_bytes in all.
    let mut req = String::from("POST /v1/queues/q/records HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\n");
    for i in 0..200 {
        req.push_str(&format!("x-h{i}: value\r\n"));
    }
    req.push_str("\r\nx");
    let (answer, _) = exchange(&s.base, req.as_bytes(), Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer:?}");
    assert!(answer.contains("\"headers_too_large\""), "{answer:?}");
    // A long query string counts too.
    let long = "a".repeat(3_000);
    let (st, v) = s.get(&format!("/v1/queues/q/records?offset=0&{long}=1")).await;
    assert_eq!((st, code(&v)), (431, "headers_too_large"), "{v}");
    // 200 fields within the byte bound are served.
    let mut req = String::from("GET /v1/queues HTTP/1.1\r\nHost: t\r\nConnection: close\r\n");
    for i in 0..200 {
        req.push_str(&format!("x{i}: v\r\n"));
    }
    req.push_str("\r\n");
    let s2_dir = tempfile::tempdir()?;
    let s2 = start_with(s2_dir.path(), |c| c.max_header_bytes = 64 << 10).await;
    let (answer, _) = exchange(&s2.base, req.as_bytes(), Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    s.stop().await;
    s2.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_per_queue_are_capped_with_409_group_limit() -> TestResult {
    let dir = tempfile::tempdir()?;
    let s = start_with(dir.path(), |c| c.max_groups_per_queue = 3).await;
    s.produce("q", "x").await;
    for i in 0..3 {
        let (st, v) = s.post_json(&format!("/v1/queues/q/groups/g{i}/fetch"), json!(null)).await;
        assert_eq!(st, 200, "{v}");
    }
    let (st, v) = s.post_json("/v1/queues/q/groups/g3/fetch", json!(null)).await;
    assert_eq!((st, code(&v)), (409, "group_limit"), "{v}");
    let (st, v) = s.put_json("/v1/queues/q/groups/g4", json!({})).await;
    assert_eq!((st, code(&v)), (409, "group_limit"), "{v}");
    // The existing ones keep working.
    let (st, v) = s.post_json("/v1/queues/q/groups/g0/fetch", json!(null)).await;
    assert_eq!(st, 200, "{v}");
    let (_, v) = s.get("/v1/queues/q/groups").await;
    assert_eq!(v["groups"].as_array().map(Vec::len), Some(3), "{v}");
    s.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_per_queue_are_capped_with_409_consumer_limit() -> TestResult {
    let dir = tempfile::tempdir()?;
    let s = start_with(dir.path(), |c| c.max_consumers_per_queue = 2).await;
    s.produce("q", "x").await;
    for name in ["a", "b"] {
        let (st, v) = s.get(&format!("/v1/queues/q/consumers/{name}/records")).await;
        assert_eq!(st, 200, "{v}");
    }
    let (st, v) = s.get("/v1/queues/q/consumers/c/records").await;
    assert_eq!((st, code(&v)), (409, "consumer_limit"), "{v}");
    let (st, v) = s.put_json("/v1/queues/q/consumers/c", json!({})).await;
    assert_eq!((st, code(&v)), (409, "consumer_limit"), "{v}");
    // An existing consumer is not new: reading and committing still work.
    let (st, v) = s.post_json("/v1/queues/q/consumers/a/commit", json!({"offset": 1})).await;
    assert_eq!(st, 200, "{v}");
    // Deleting one makes room.
    let r = s.http.delete(s.url("/v1/queues/q/consumers/b")).send().await?;
    assert_eq!(r.status(), 204);
    let (st, v) = s.put_json("/v1/queues/q/consumers/c", json!({})).await;
    assert_eq!(st, 201, "{v}");
    s.stop().await;
    Ok(())
}

/// A client that stalls its body during a drain is cut off when the grace
/// period ends: `run()` returns within the grace (plus the close), not when
/// the client gives up, and the queue it named is closed (its lock free).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_client_cannot_stretch_the_drain_past_its_grace() -> TestResult {
    let dir = tempfile::tempdir()?;
    let s = start_with(dir.path(), |c| {
        c.shutdown_grace_ms = 600;
        c.body_read_timeout_ms = 60_000;
        c.header_read_timeout_ms = 60_000;
    })
    .await;
    s.produce("q", "before").await;
    let mut stalled_body = tokio::net::TcpStream::connect(s.base.trim_start_matches("http://")).await?;
    stalled_body
        .write_all(b"POST /v1/queues/q/records HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\nabc")
        .await?;
    let mut stalled_head = tokio::net::TcpStream::connect(s.base.trim_start_matches("http://")).await?;
    stalled_head.write_all(b"GET /v1/queues HTTP/1.1\r\nHost: t\r\n").await?;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    s.handle.shutdown();
    let outcome = tokio::time::timeout(Duration::from_secs(10), s.task).await???;
    let took = started.elapsed();
    assert!(!outcome.drained_in_time);
    assert!(took < Duration::from_millis(600) + Duration::from_secs(3), "the drain took {took:?}");
    // Both connections were closed by the server.
    for c in [&mut stalled_body, &mut stalled_head] {
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(2), c.read_to_end(&mut rest)).await;
        assert!(read.is_ok(), "connection still open after run() returned");
    }
    let q = walq::Queue::open(dir.path().join("q"))?;
    assert_eq!(q.next_offset(), 1);
    Ok(())
}

/// An embedder that drops `Server::run` (a `select!`, an aborted task) stops
/// the server: the listeners close and open connections are cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_run_stops_the_listeners_and_their_connections() -> TestResult {
    let dir = tempfile::tempdir()?;
    let s = start_with(dir.path(), |_| {}).await;
    s.produce("q", "x").await;
    let addr = s.base.trim_start_matches("http://").to_string();
    let mut open = tokio::net::TcpStream::connect(&addr).await?;
    open.write_all(b"GET /v1/queues HTTP/1.1\r\nHost: t\r\n").await?;
    tokio::time::sleep(Duration::from_millis(100)).await;
    s.task.abort();
    let _ = s.task.await;
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(3), open.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "a connection outlived the dropped server");
    let deadline = Instant::now() + Duration::from_secs(3);
    while tokio::net::TcpStream::connect(&addr).await.is_ok() {
        assert!(Instant::now() < deadline, "the listener still accepts after run() was dropped");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}
