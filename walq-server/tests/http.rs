//! The sidecar's HTTP API end to end: produce and read back, durability,
//! batches with per-entry results, long-poll, named consumers across a
//! restart, groups with dead letters, request/reply, every error mapping,
//! probes and metrics, and a drain over `POST /v1/shutdown`.
//!
//! Method: each test starts the server in-process on ephemeral ports
//! (127.0.0.1:0) over a fresh temporary directory and talks to it with a
//! real HTTP client (reqwest); after a shutdown the queue directories are
//! reopened with the walq library to check what is on disk.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use walq_server::{Config, ServeError, Server};

mod common;

use common::{TestResult, code, start, start_with};

/// Sends raw bytes on a new connection and returns the whole answer.
async fn raw(base: &str, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut c = tokio::net::TcpStream::connect(base.trim_start_matches("http://")).await.expect("connect");
    c.write_all(request.as_bytes()).await.expect("write");
    let mut answer = String::new();
    c.read_to_string(&mut answer).await.expect("read");
    answer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn produce_then_read_round_trip() -> TestResult {
    let dir = tempfile::tempdir()?;
    let s = start(dir.path()).await;
    let (status, v) = s
        .call(
            s.http
                .post(s.url("/v1/queues/orders/records"))
                .header("walq-key", "user-1")
                .header("walq-header", "trace=abc")
                .header("walq-header", "trace=def")
                .header("walq-timestamp", "1700000000000")
                .body("first"),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!((v["offset"].as_u64(), v["timestamp_ms"].as_u64()), (Some(0), Some(1_700_000_000_000)));
    assert_eq!(v["durability"], "sync");
    assert_eq!(s.produce("orders", "second").await, 1);
    let binary = s.call(s.http.post(s.url("/v1/queues/orders/records")).body(vec![0xffu8, 0])).await;
    assert_eq!(binary.0, 200);

    let (status, v) = s.get("/v1/queues/orders/records?offset=0&max=10").await;
    assert_eq!(status, 200, "{v}");
    let recs = v["records"].as_array().unwrap();
    assert_eq!(recs.len(), 3);
    assert_eq!(recs[0]["value"], "first");
    assert_eq!(recs[0]["key"], "user-1");
    assert_eq!(recs[0]["headers"], json!([["trace", "abc"], ["trace", "def"]]));
    assert_eq!(recs[0]["timestamp_ms"], 1_700_000_000_000u64);
    assert_eq!(recs[1]["key"], Value::Null);
    assert_eq!(recs[2]["value"], json!({"hex": "ff00"}));
    assert_eq!(v["next_offset"], 3);
    // From an offset, bounded by max.
    let (_, v) = s.get("/v1/queues/orders/records?offset=1&max=1").await;
    assert_eq!((v["records"][0]["offset"].as_u64(), v["next_offset"].as_u64()), (Some(1), Some(2)));
    // At the end: empty, no wait.
    let (_, v) = s.get("/v1/queues/orders/records?offset=3").await;
    assert_eq!(v["records"], json!([]));

    let (status, v) = s.get("/v1/queues").await;
    assert_eq!(status, 200);
    assert_eq!(v["queues"][0]["name"], "orders");
    assert_eq!(v["queues"][0]["next_offset"], 3);
    let (_, info) = s.get("/v1/queues/orders").await;
    assert_eq!(info["durable_offset"], 3);
    assert_eq!(info["consumers"], json!([]));
    s.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durability_header_is_honoured_and_checked() -> TestResult {
    let dir = tempfile::tempdir()?;
    let s = start(dir.path()).await;
    for (asked, answered) in
        [("os", "os"), ("interval:50", "interval:50"), ("sync", "sync"), ("interval", "interval:100")]
    {
        let (status, v) = s
            .call(s.http.post(s.url("/v1/queues/d/records")).header("walq-durability", asked).body("x"))
            .await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["durability"], answered);
    }
    // A sync produce syncs everything before it: all four are durable now.
    let (_, info) = s.get("/v1/queues/d").await;
    assert!(info["durable_offset"].as_u64().unwrap() >= 3, "{info}");
    let (status, v) = s
        .call(s.http.post(s.url("/v1/queues/d/records")).header("walq-durability", "whenever").body("x"))
        .await;
    assert_eq!((status, code(&v)), (400, "bad_request"));
    // A queue created os-durable: its produces default to os.
    let (status, v) = s.put_json("/v1/queues/cheap", json!({"durability": "os"})).await;
    assert_eq!((status, v["created"].as_bool()), (201, Some(true)), "{v}");
    let (_, v) = s.call(s.http.post(s.url("/v1/queues/cheap/records")).body("x")).await;
    assert_eq!(v["durability"], "os");
    let (status, v) = s.put_json("/v1/queues/cheap", json!({})).await;
    assert_eq!((status, v["created"].as_bool()), (200, Some(false)));
    s.stop().await;
    // Options were saved: the reopened queue is still os-durable.
    let s = start(dir.path()).await;
    let (_, v) = s.call(s.http.post(s.url("/v1/queues/cheap/records")).body("y")).await;
    assert_eq!(v["durability"], "os");
    assert_eq!(v["offset"], 1);
    s.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_answers_each_entry() -> TestResult {
    let dir = tempfile::tempdir()?;
    let s = start(dir.path()).await;
    let (status, _) = s.put_json("/v1/queues/b", json!({"max_record_bytes": 1024})).await;
    assert_eq!(status, 201);
    let big = "x".repeat(2000);
    let (status, v) = s
        .post_json(
            "/v1/queues/b/batch",
            json!({"records": [
                {"value": "a", "key": "k", "headers": {"reply_to": "r"}},
                {"value": big},
                {"value": {"hex": "zz"}},
                {"value": {"hex": "ff01"}, "headers": [["h", {"hex": "ff"}]], "timestamp_ms": 5},
            ]}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    let r = v["results"].as_array().unwrap();
    assert_eq!(r[0]["offset"], 0);
    assert_eq!(r[1]["error"]["code"], "record_too_large");
    assert_eq!(r[2]["error"]["code"], "bad_request");
    assert_eq!((r[3]["offset"].as_u64(), r[3]["timestamp_ms"].as_u64()), (Some(1), Some(5)));
    assert_eq!(v["appended"], 2);
    let (_, v) = s.get("/v1/queues/b/records").await;
    assert_eq!(v["records"][0]["headers"], json!([["reply_to", "r"]]));
    assert_eq!(v["records"][1]["value"], json!({"hex": "ff01"}));
    assert_eq!(v["records"][1]["headers"], json!([["h", {"hex": "ff"}]]));
    let (status, v) = s.post_json("/v1/queues/b/batch", json!({"records": []})).await;
    assert_eq!((status, code(&v)), (400, "bad_request"));
    let (status, v) = s.post_json("/v1/queues/b/batch", json!({"records": [{"nope": 1}]})).await;
    assert_eq!((status, code(&v)), (400, "bad_request"));
    s.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_poll_returns_when_a_record_arrives() -> TestResult {
    let dir = tempfile::tempdir()?;
    let s = start(dir.path()).await;
    s.produce("lp", "zero").await;
    let started = Instant::now();
    let url = s.url("/v1/queues/lp/records?offset=1&wait_ms=20000");
    let http = s.http.clone();
    let waiting = tokio::spawn(async move { http.get(url).send().await?.text().await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    s.produce("lp", "one").await;
    let body: Value = serde_json::from_str(&waiting.await??)?;
    assert_eq!(body["records"][0]["value"], "one");
    assert!(started.elapsed() < Duration::from_secs(5), "returned after {:?}", started.elapsed());
    // A wait that nothing ends returns empty after about its wait.
    let started = Instant::now();
    let (_, v) = s.get("/v1/queues/lp/records?offset=2&wait_ms=200").await;
    assert_eq!(v["records"], json!([]));
    assert!(started.elapsed() >= Duration::from_millis(180));
    // A named consumer waits the same way.
    let url = s.url("/v1/queues/lp/consumers/c/records?start=latest&wait_ms=20000");
    let http = s.http.clone();
    let waiting = tokio::spawn(async move { http.get(url).send().await?.text().await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    s.produce("lp", "two").await;
    let body: Value = serde_json::from_str(&waiting.await??)?;
    assert_eq!(body["records"][0]["value"], "two");
    s.stop().await;
    Ok(())
}

/// A long-poll woken by new records reads a few small ones on the runtime
/// thread and anything larger on the blocking pool: either way the answer
/// holds exactly the records appended, within the request's limits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn woken_long_polls_answer_large_records_and_long_runs_whole() -> TestResult {
    let dir = tempfile::tempdir()?;
    let s = start(dir.path()).await;
    s.produce("w", "zero").await;
    let wait_then = |offset: u64, extra: &str| {
        let url = s.url(&format!("/v1/queues/w/records?offset={offset}&wait_ms=20000{extra}"));
        let http = s.http.clone();
        tokio::spawn(async move { http.get(url).send().await?.text().await })
    };
    let batch = |n: usize, size: usize| {
        let records: Vec<Value> =
            (0..n).map(|i| json!({ "value": format!("{i:06}{}", "x".repeat(size - 6)) })).collect();
        json!({ "records": records })
    };
    // One record over the inline budget (256 KiB): read on the blocking pool, whole.
    let waiting = wait_then(1, "");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let big = "y".repeat(600 << 10);
    let (status, _) = s.call(s.http.post(s.url("/v1/queues/w/records")).body(big.clone())).await;
    assert_eq!(status, 200);
    let v: Value = serde_json::from_str(&waiting.await??)?;
    assert_eq!(v["records"].as_array().map(Vec::len), Some(1));
    assert_eq!(v["records"][0]["value"].as_str().map(str::len), Some(big.len()));
    assert_eq!(v["next_offset"], 2);
    // A run of 100 records (more than the 64 read inline): all of them.
    let waiting = wait_then(2, "");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(s.post_json("/v1/queues/w/batch", batch(100, 10)).await.0, 200);
    let v: Value = serde_json::from_str(&waiting.await??)?;
    assert_eq!(v["records"].as_array().map(Vec::len), Some(100));
    assert_eq!(v["next_offset"], 102);
    // 30 records of 20 KiB (600 KiB, fewer than 64): at most the inline
    // budget in this answer, in order; the next read has the rest.
    let waiting = wait_then(102, "");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(s.post_json("/v1/queues/w/batch", batch(30, 20 << 10)).await.0, 200);
    let v: Value = serde_json::from_str(&waiting.await??)?;
    let got = v["records"].as_array().cloned().unwrap_or_default();
    assert!(!got.is_empty() && got.len() < 30, "{} records", got.len());
    for (i, r) in got.iter().enumerate() {
        assert_eq!(r["offset"], 102 + i as u64);
        assert!(r["value"].as_str().is_some_and(|v| v.starts_with(&format!("{i:06}"))));
    }
    let next = v["next_offset"].as_u64().unwrap_or_default();
    assert_eq!(next, 102 + got.len() as u64);
    let (_, rest) = s.get(&format!("/v1/queues/w/records?offset={next}")).await;
    assert_eq!(rest["next_offset"], 132, "the rest in one read");
    s.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_commit_and_resume_across_a_restart() -> TestResult {
    let dir = tempfile::tempdir()?;
    let s = start(dir.path()).await;
    for i in 0..5 {
        s.produce("c", &format!("r{i}")).await;
    }
    let (status, v) = s.get("/v1/queues/c/consumers/billing/records?max=2").await;
    assert_eq!(status, 200, "{v}");
    assert_eq!((v["records"][0]["value"].as_str(), v["next_offset"].as_u64()), (Some("r0"), Some(2)));
    // Not committed: the next read starts at the committed position again.
    let (_, v) = s.get("/v1/queues/c/consumers/billing/records?max=2").await;
    assert_eq!(v["records"][0]["offset"], 0);
    // Reading ahead of the commits with offset=.
    let (_, v) = s.get("/v1/queues/c/consumers/billing/records?max=2&offset=2").await;
    assert_eq!(v["records"][0]["offset"], 2);
    let (status, v) = s.post_json("/v1/queues/c/consumers/billing/commit", json!({"offset": 2})).await;
    assert_eq!((status, v["committed"].as_u64(), v["lag"].as_u64()), (200, Some(2), Some(3)), "{v}");
    let (status, v) = s.put_json("/v1/queues/c/consumers/audit", json!({"start": "latest"})).await;
    assert_eq!((status, v["committed"].as_u64()), (201, Some(5)), "{v}");
    s.stop().await;

    let s = start(dir.path()).await;
    let (_, v) = s.get("/v1/queues/c/consumers/billing/records?max=10").await;
    let offsets: Vec<u64> =
        v["records"].as_array().unwrap().iter().map(|r| r["offset"].as_u64().unwrap()).collect();
    assert_eq!(offsets, [2, 3, 4]);
    let (status, v) = s.get("/v1/queues/c/consumers/billing").await;
    assert_eq!((status, v["committed"].as_u64(), v["lag"].as_u64()), (200, Some(2), Some(3)));
    let (_, v) = s.get("/v1/queues/c/consumers").await;
    assert_eq!(v["consumers"].as_array().unwrap().len(), 2);
    let (status, v) = s.post_json("/v1/queues/c/consumers/billing/commit", json!({"offset": 99})).await;
    assert_eq!((status, code(&v)), (416, "offset_out_of_range"));
    assert_eq!(v["error"]["next_offset"], 5);
    let r = s.http.delete(s.url("/v1/queues/c/consumers/audit")).send().await?;
    assert_eq!(r.status(), 204);
    let (status, v) = s.get("/v1/queues/c/consumers/audit").await;
    assert_eq!((status, code(&v)), (404, "unknown_consumer"));
    s.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_ack_nack_term_and_dead_letters() -> TestResult {
    let dir = tempfile::tempdir()?;
    let s = start(dir.path()).await;
    for v in ["ok", "flaky", "poison"] {
        s.produce("jobs", v).await;
    }
    let (status, v) =
        s.put_json("/v1/queues/jobs/groups/workers", json!({"max_deliver": 2, "ack_wait_ms": 60000})).await;
    assert_eq!(status, 201, "{v}");
    let (status, v) = s.post_json("/v1/queues/jobs/groups/workers/fetch?max=3", json!(null)).await;
    assert_eq!(status, 200, "{v}");
    let d = v["deliveries"].as_array().unwrap().clone();
    assert_eq!(d.len(), 3);
    assert_eq!(d[0]["delivery_count"], 1);
    let id = |i: usize| d[i]["id"].as_str().unwrap().to_string();
    let settle =
        |id: String, action: &str| format!("/v1/queues/jobs/groups/workers/deliveries/{id}/{action}");
    assert_eq!(s.post_json(&settle(id(0), "ack"), json!(null)).await.0, 200);
    assert_eq!(s.post_json(&settle(id(1), "in-progress"), json!(null)).await.0, 200);
    assert_eq!(s.post_json(&settle(id(1), "nack"), json!(null)).await.0, 200);
    assert_eq!(s.post_json(&(settle(id(2), "term") + "?reason=bad+input"), json!(null)).await.0, 200);
    // A settled delivery's id is no longer pending.
    let (status, v) = s.post_json(&settle(id(1), "nack"), json!(null)).await;
    assert_eq!((status, code(&v)), (409, "delivery_not_pending"));
    // The nacked one comes back, counted.
    let (_, v) = s.post_json("/v1/queues/jobs/groups/workers/fetch?max=3&wait_ms=2000", json!(null)).await;
    let again = &v["deliveries"][0];
    assert_eq!((again["value"].as_str(), again["delivery_count"].as_u64()), (Some("flaky"), Some(2)), "{v}");
    let again_id = again["id"].as_str().unwrap().to_string();
    assert_eq!(s.post_json(&settle(again_id, "nack"), json!(null)).await.0, 200);
    // Its second nack used up max_deliver: dead-lettered on the next fetch.
    let (_, v) = s.post_json("/v1/queues/jobs/groups/workers/fetch?max=3&wait_ms=300", json!(null)).await;
    assert_eq!(v["deliveries"], json!([]));
    let (_, v) = s.get("/v1/queues/jobs/groups/workers/dead-letters").await;
    let dead = v["records"].as_array().unwrap();
    assert_eq!(dead.len(), 2, "{v}");
    let header = |r: &Value, name: &str| {
        r["headers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h[0] == name)
            .map(|h| h[1].clone())
            .unwrap_or(Value::Null)
    };
    assert_eq!(
        (dead[0]["value"].as_str(), header(&dead[0], "walq-dead-letter-reason")),
        (Some("poison"), json!("bad input"))
    );
    assert_eq!(
        (dead[1]["value"].as_str(), header(&dead[1], "walq-dead-letter-reason")),
        (Some("flaky"), json!("max_deliver"))
    );
    let (_, info) = s.get("/v1/queues/jobs/groups/workers").await;
    assert_eq!(
        (info["dead_letters"].as_u64(), info["ack_floor"].as_u64(), info["pending"].as_u64()),
        (Some(2), Some(3), Some(0)),
        "{info}"
    );
    let (_, v) = s.get("/v1/queues/jobs/groups").await;
    assert_eq!(v["groups"][0]["name"], "workers");
    // Errors of the delivery API.
    let (status, v) = s.post_json(&settle("nonsense".into(), "ack"), json!(null)).await;
    assert_eq!((status, code(&v)), (400, "invalid_delivery_id"));
    let (status, v) = s.post_json("/v1/queues/jobs/groups/nobody/deliveries/0.1.1/ack", json!(null)).await;
    assert_eq!((status, code(&v)), (404, "unknown_group"));
    let (status, v) = s.post_json(&settle("0.1.1".into(), "explode"), json!(null)).await;
    assert_eq!((status, code(&v)), (404, "no_route"));
    let (status, v) = s.put_json("/v1/queues/jobs/groups/bad", json!({"prefetch": 0})).await;
    assert_eq!((status, code(&v)), (400, "invalid_option"));
    s.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_reply_through_the_api() -> TestResult {
    let dir = tempfile::tempdir()?;
    let s = start(dir.path()).await;
    // The responder: fetch a request through a group, reply to its
    // reply_to queue with its correlation id, then ack.
    let (base, http) = (s.base.clone(), s.http.clone());
    let responder = tokio::spawn(async move {
        let mut answered = 0;
        while answered < 3 {
            let r = http
                .post(format!("{base}/v1/queues/rpc_requests/groups/responders/fetch?max=10&wait_ms=2000"))
                .send()
                .await?;
            let v: Value = serde_json::from_slice(&r.bytes().await?)?;
            for d in v["deliveries"].as_array().cloned().unwrap_or_default() {
                let header = |name: &str| {
                    d["headers"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .find(|h| h[0] == name)
                        .and_then(|h| h[1].as_str())
                        .unwrap()
                        .to_string()
                };
                let n: u64 = d["value"].as_str().unwrap().parse()?;
                let reply_to = header("reply_to");
                http.post(format!("{base}/v1/queues/{reply_to}/records"))
                    .header("walq-correlation-id", header("correlation_id"))
                    .body((n * n).to_string())
                    .send()
                    .await?;
                let id = d["id"].as_str().unwrap();
                http.post(format!("{base}/v1/queues/rpc_requests/groups/responders/deliveries/{id}/ack"))
                    .send()
                    .await?;
                answered += 1;
            }
        }
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
    });
    for (i, n) in [3u64, 4, 5].into_iter().enumerate() {
        let r = s
            .http
            .post(s.url("/v1/queues/rpc_requests/records"))
            .header("walq-reply-to", "replies-client1")
            .header("walq-correlation-id", format!("req-{i}"))
            .body(n.to_string())
            .send()
            .await?;
        assert_eq!(r.status(), 200);
    }
    let mut replies = std::collections::BTreeMap::new();
    let mut next = 0;
    let deadline = Instant::now() + Duration::from_secs(20);
    while replies.len() < 3 && Instant::now() < deadline {
        let (status, v) =
            s.get(&format!("/v1/queues/replies-client1/records?offset={next}&wait_ms=1000")).await;
        if status == 404 {
            tokio::time::sleep(Duration::from_millis(20)).await; // the reply queue is made by the first reply
            continue;
        }
        for r in v["records"].as_array().unwrap() {
            let id = r["headers"].as_array().unwrap().iter().find(|h| h[0] == "correlation_id").unwrap()[1]
                .clone();
            replies.insert(id.as_str().unwrap().to_string(), r["value"].as_str().unwrap().to_string());
        }
        next = v["next_offset"].as_u64().unwrap();
    }
    responder.await?.map_err(|e| e.to_string())?;
    let expected: std::collections::BTreeMap<String, String> =
        [("req-0", "9"), ("req-1", "16"), ("req-2", "25")]
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
    assert_eq!(replies, expected);
    s.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_has_its_status_and_code() -> TestResult {
    let dir = tempfile::tempdir()?;
    let s = start_with(dir.path(), |c| {
        c.max_body_bytes = 4096;
        c.max_header_bytes = 2048;
        c.max_long_polls = 1;
        c.queue_defaults.max_record_bytes = Some(1024);
    })
    .await;
    s.produce("e", "x").await;
    let post = |path: &str, body: Vec<u8>| s.http.post(s.url(path)).body(body);
    // Bodies: over the server's limit, then over the queue's record limit.
    let (status, v) = s.call(post("/v1/queues/e/records", vec![b'a'; 8192])).await;
    assert_eq!((status, code(&v)), (413, "body_too_large"));
    let (status, v) = s.call(post("/v1/queues/e/records", vec![b'a'; 2048])).await;
    assert_eq!((status, code(&v)), (413, "record_too_large"));
    assert_eq!(v["error"]["max"], 1024);
    // Names: nothing outside the data directory, nothing hidden.
    for bad in [".hidden", "a%2Fb", "a%5Cb", "..a", &"n".repeat(129), "sp%20ace", "%C3%A9"] {
        let (status, v) = s.call(post(&format!("/v1/queues/{bad}/records"), b"x".to_vec())).await;
        assert_eq!((status, code(&v)), (400, "invalid_name"), "{bad}");
    }
    // Dot segments a client library would normalize away, sent raw.
    for bad in ["%2E%2E", "..", "%2e"] {
        let answer = raw(&s.base, &format!("POST /v1/queues/{bad}/records HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\nConnection: close\r\n\r\nx")).await;
        assert!(answer.starts_with("HTTP/1.1 400") || answer.starts_with("HTTP/1.1 404"), "{bad}: {answer}");
    }
    let names: Vec<String> =
        std::fs::read_dir(dir.path())?.map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    assert!(names.iter().all(|n| n == "e" || n == walq_server::LOCK_FILE), "{names:?}");
    // Offsets, unknown things, bad input.
    let (status, v) = s.get("/v1/queues/e/records?offset=7").await;
    assert_eq!((status, code(&v)), (416, "offset_out_of_range"));
    assert_eq!((v["error"]["first_offset"].as_u64(), v["error"]["next_offset"].as_u64()), (Some(0), Some(1)));
    let (status, v) = s.get("/v1/queues/nope/records").await;
    assert_eq!((status, code(&v)), (404, "queue_not_found"));
    let (status, v) = s.get("/v1/queues/e/consumers/ghost").await;
    assert_eq!((status, code(&v)), (404, "unknown_consumer"));
    let (status, v) = s.post_json("/v1/queues/e/consumers/ghost/commit", json!({"offset": 0})).await;
    assert_eq!((status, code(&v)), (404, "unknown_consumer"));
    let (status, v) = s.get("/v1/queues/e/groups/ghost").await;
    assert_eq!((status, code(&v)), (404, "unknown_group"));
    let (status, v) = s.get("/v1/queues/e/records?offset=minus-one").await;
    assert_eq!((status, code(&v)), (400, "bad_request"));
    let (status, v) = s.post_json("/v1/queues/e/consumers/c1/commit", json!({"offset": "x"})).await;
    assert_eq!((status, code(&v)), (400, "bad_request"));
    let (status, v) = s.get("/v1/queues/e/consumers/bad%2Fname/records").await;
    assert_eq!((status, code(&v)), (400, "invalid_option"));
    let (status, v) = s.get("/v1/nothing/here").await;
    assert_eq!((status, code(&v)), (404, "no_route"));
    let (status, v) =
        s.call(s.http.post(s.url("/v1/queues/e/records")).header("walq-header", "no-equals").body("x")).await;
    assert_eq!((status, code(&v)), (400, "bad_request"));
    let (status, v) = s
        .call(s.http.post(s.url("/v1/queues/e/records")).header("walq-timestamp", "yesterday").body("x"))
        .await;
    assert_eq!((status, code(&v)), (400, "bad_request"));
    // Headers over the bound.
    let (status, v) = s
        .call(s.http.post(s.url("/v1/queues/e/records")).header("walq-key", "k".repeat(4000)).body("x"))
        .await;
    assert_eq!((status, code(&v)), (431, "headers_too_large"));
    // One long-poll allowed: a second waiting request gets 429 and Retry-After.
    let url = s.url("/v1/queues/e/records?offset=1&wait_ms=3000");
    let http = s.http.clone();
    let first = tokio::spawn(async move { http.get(url).send().await.map(|r| r.status().as_u16()) });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = s.http.get(s.url("/v1/queues/e/records?offset=1&wait_ms=3000")).send().await?;
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "1");
    let v: Value = serde_json::from_slice(&r.bytes().await?)?;
    assert_eq!(code(&v), "too_many_long_polls");
    s.produce("e", "wake").await;
    assert_eq!(first.await??, 200);
    // A full queue: 429 queue_full with Retry-After.
    let (status, _) = s.put_json("/v1/queues/small", json!({"max_bytes": 8192, "segment_bytes": 4096})).await;
    assert_eq!(status, 201);
    let mut full = None;
    for _ in 0..100 {
        let r = s.http.post(s.url("/v1/queues/small/records")).body(vec![b'z'; 900]).send().await?;
        if r.status() != 200 {
            full = Some((r.status().as_u16(), r.headers().get("retry-after").cloned(), r.bytes().await?));
            break;
        }
    }
    let (status, retry, body) = full.expect("the queue filled up");
    assert_eq!((status, code(&serde_json::from_slice(&body)?)), (429, "queue_full"));
    assert!(retry.is_some());
    // Bad options of a queue.
    let (status, v) = s.put_json("/v1/queues/weird", json!({"segment_bytes": 1})).await;
    assert_eq!((status, code(&v)), (400, "invalid_option"));
    let (status, v) = s.put_json("/v1/queues/weird", json!({"no_such_option": 1})).await;
    assert_eq!((status, code(&v)), (400, "bad_request"));
    s.stop().await;
    Ok(())
}

/// Parses the Prometheus text format: every sample line is `name{labels} value`.
fn samples(text: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').unwrap_or_else(|| panic!("bad line {l:?}"));
            let v: f64 = value.parse().unwrap_or_else(|_| panic!("bad value in {l:?}"));
            assert!(series.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_'), "{l:?}");
            (series.to_string(), v)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_and_metrics() -> TestResult {
    let dir = tempfile::tempdir()?;
    let s = start(dir.path()).await;
    let admin = |p: &str| s.http.get(format!("{}{p}", s.admin)).send();
    assert_eq!(admin("/livez").await?.status(), 200);
    assert_eq!(admin("/readyz").await?.status(), 200);
    for i in 0..3 {
        s.produce("m", &format!("v{i}")).await;
    }
    s.get("/v1/queues/m/consumers/reader/records").await;
    s.put_json("/v1/queues/m/groups/g", json!({})).await;
    let r = admin("/metrics").await?;
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"].to_str()?.starts_with("text/plain; version=0.0.4"));
    let text = r.text().await?;
    let all = samples(&text);
    let get = |series: &str| all.iter().find(|(s, _)| s == series).map(|(_, v)| *v);
    assert_eq!(get("walq_appends_total{queue=\"m\"}"), Some(3.0), "{text}");
    assert_eq!(get("walq_append_bytes_total{queue=\"m\"}"), Some(6.0));
    let flushes = get("walq_flushes_total{queue=\"m\"}").unwrap();
    assert!(flushes >= 1.0);
    assert_eq!(get("walq_flush_duration_seconds_bucket{queue=\"m\",le=\"+Inf\"}"), Some(flushes));
    assert_eq!(get("walq_flush_duration_seconds_count{queue=\"m\"}"), Some(flushes));
    let buckets: Vec<f64> = all
        .iter()
        .filter(|(s, _)| s.starts_with("walq_flush_duration_seconds_bucket{queue=\"m\""))
        .map(|(_, v)| *v)
        .collect();
    assert_eq!(buckets.len(), walq::SYNC_HISTOGRAM_BOUNDS_MICROS.len() + 1);
    assert!(buckets.windows(2).all(|w| w[0] <= w[1]), "cumulative: {buckets:?}");
    assert!(get("walq_records_per_flush{queue=\"m\"}").unwrap() >= 1.0);
    assert_eq!(get("walq_consumer_lag{queue=\"m\",consumer=\"reader\"}"), Some(3.0));
    assert_eq!(get("walq_group_unacked{queue=\"m\",group=\"g\"}"), Some(3.0));
    assert_eq!(get("walq_group_pending{queue=\"m\",group=\"g\"}"), Some(0.0));
    assert_eq!(get("walq_group_dead_letters{queue=\"m\",group=\"g\"}"), Some(0.0));
    assert_eq!(
        get(
            "walq_http_requests_total{listener=\"data\",method=\"POST\",route=\"/v1/queues/{queue}/records\",status=\"200\"}"
        ),
        Some(3.0)
    );
    assert!(
        get(
            "walq_http_request_duration_seconds_count{listener=\"data\",route=\"/v1/queues/{queue}/records\"}"
        )
        .is_some()
    );
    assert_eq!(get("walq_ready"), Some(1.0));
    s.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_over_http_drains_and_releases_the_lock() -> TestResult {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir()?;
    let s = start(dir.path()).await;
    s.produce("drain", "before").await;
    // A produce under way when the drain starts: its head is in, half its body.
    let mut inflight = tokio::net::TcpStream::connect(s.base.trim_start_matches("http://")).await?;
    inflight
        .write_all(b"POST /v1/queues/drain/records HTTP/1.1\r\nHost: t\r\nContent-Length: 6\r\nConnection: close\r\n\r\nin-")
        .await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (status, v) = s.post_json("/v1/shutdown", json!(null)).await;
    assert_eq!((status, v["status"].as_str()), (202, Some("draining")));
    // Readiness is off while the request is in flight; the admin port still answers.
    let r = s.http.get(format!("{}/readyz", s.admin)).send().await?;
    assert_eq!(r.status(), 503);
    let metrics = s.http.get(format!("{}/metrics", s.admin)).send().await?.text().await?;
    assert!(metrics.contains("walq_draining 1"));
    // New produces get an answer, 503 with Retry-After, not a reset connection:
    // the listener keeps accepting for a while after the drain starts.
    let r = s.http.post(s.url("/v1/queues/drain/records")).body("late").send().await?;
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    let fresh = raw(
        &s.base,
        "POST /v1/queues/drain/records HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nConnection: close\r\n\r\nlate",
    )
    .await;
    assert!(fresh.starts_with("HTTP/1.1 503"), "a new connection is answered: {fresh}");
    // The request under way completes, acknowledged.
    inflight.write_all(b"fly").await?;
    let mut answer = String::new();
    inflight.read_to_string(&mut answer).await?;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("\"offset\":1"), "{answer}");
    let outcome = s.task.await??;
    assert!(outcome.drained_in_time);
    // The lock is released: the library opens the queue, with both records.
    let queue = walq::Queue::open(dir.path().join("drain"))?;
    let mut reader = queue.read_from(0)?;
    let mut values = Vec::new();
    while let Some(r) = reader.next()? {
        values.push(String::from_utf8(r.value().to_vec())?);
    }
    assert_eq!(values, ["before", "in-fly"]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_server_on_the_same_directory_is_refused() -> TestResult {
    let dir = tempfile::tempdir()?;
    let s = start(dir.path()).await;
    let config = Config {
        data_dir: dir.path().to_path_buf(),
        listen: "127.0.0.1:0".parse()?,
        admin_listen: "127.0.0.1:0".parse()?,
        ..Config::default()
    };
    match Server::bind(config).await {
        Err(ServeError::Locked(m)) => assert!(m.contains("in use"), "{m}"),
        other => panic!("expected Locked, got {other:?}"),
    }
    s.stop().await;
    Ok(())
}
