//! A consumer group's options are fixed when it is created: a PUT naming the
//! same options is idempotent, other options are 409 `group_exists` (open,
//! and after a restart alike), and nothing changes what was saved. A group
//! can be deleted, which makes room and lets the name start afresh.

use serde_json::json;

mod common;

use common::{TestResult, code, start};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_groups_options_are_fixed_at_creation_before_and_after_a_restart() -> TestResult {
    let dir = tempfile::tempdir()?;
    let s = start(dir.path()).await;
    s.produce("jobs", "x").await;
    let opts = json!({"prefetch": 4, "ack_wait_ms": 60000});
    let (st, v) = s.put_json("/v1/queues/jobs/groups/w", opts.clone()).await;
    assert_eq!(st, 201, "{v}");
    let (st, v) = s.put_json("/v1/queues/jobs/groups/w", opts.clone()).await;
    assert_eq!(st, 200, "the same options again: {v}");
    let (st, v) = s.put_json("/v1/queues/jobs/groups/w", json!({"prefetch": 9})).await;
    assert_eq!((st, code(&v)), (409, "group_exists"), "{v}");
    // A group made by a fetch has the defaults: other options are refused too.
    let (st, v) = s.post_json("/v1/queues/jobs/groups/f/fetch", json!(null)).await;
    assert_eq!(st, 200, "{v}");
    let (st, v) = s.put_json("/v1/queues/jobs/groups/f", json!({"prefetch": 2})).await;
    assert_eq!((st, code(&v)), (409, "group_exists"), "{v}");
    s.stop().await;

    let s = start(dir.path()).await;
    let (st, v) = s.put_json("/v1/queues/jobs/groups/w", json!({"prefetch": 9})).await;
    assert_eq!((st, code(&v)), (409, "group_exists"), "after a restart: {v}");
    let (st, v) = s.put_json("/v1/queues/jobs/groups/w", opts.clone()).await;
    assert_eq!(st, 200, "{v}");
    let (_, v) = s.get("/v1/queues/jobs/groups/w").await;
    assert_eq!(v["options"]["prefetch"], 4, "{v}");
    // An empty body names no options: always fine.
    let r = s.http.put(s.url("/v1/queues/jobs/groups/f")).send().await?;
    assert_eq!(r.status(), 200);
    s.stop().await;
    Ok(())
}

/// A queue created by a produce keeps the defaults it was created with: a
/// restart with other defaults does not change its durability behind its users.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_created_by_a_produce_keeps_its_options_across_restarts_with_other_defaults() -> TestResult {
    let dir = tempfile::tempdir()?;
    let s = common::start_with(dir.path(), |c| c.queue_defaults.durability = "os".parse().unwrap()).await;
    s.produce("auto", "x").await;
    s.stop().await;
    let s = start(dir.path()).await; // the defaults are `sync` now
    let (_, v) = s.get("/v1/queues/auto").await;
    assert_eq!(v["options"]["durability"], "os", "{v}");
    let (_, v) = s.post_json("/v1/queues/auto/batch", json!({"records": [{"value": "y"}]})).await;
    assert_eq!(v["durability"], "os", "{v}");
    s.stop().await;
    Ok(())
}

/// `DELETE .../groups/{g}` forgets a group (state and options) and makes room
/// under `max_groups_per_queue`; a group made again starts afresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_group_is_gone_makes_room_and_can_be_made_again() -> TestResult {
    let dir = tempfile::tempdir()?;
    let s = common::start_with(dir.path(), |c| c.max_groups_per_queue = 1).await;
    for i in 0..3 {
        s.produce("jobs", &format!("job {i}")).await;
    }
    let (st, v) = s.put_json("/v1/queues/jobs/groups/a", json!({"prefetch": 2})).await;
    assert_eq!(st, 201, "{v}");
    let (_, fetched) = s.post_json("/v1/queues/jobs/groups/a/fetch?max=2", json!(null)).await;
    let id = fetched["deliveries"][0]["id"].as_str().unwrap().to_string();
    let (st, _) = s.post_json(&format!("/v1/queues/jobs/groups/a/deliveries/{id}/ack"), json!(null)).await;
    assert_eq!(st, 200);
    let (st, v) = s.put_json("/v1/queues/jobs/groups/b", json!({})).await;
    assert_eq!((st, code(&v)), (409, "group_limit"), "{v}");

    let r = s.http.delete(s.url("/v1/queues/jobs/groups/a")).send().await?;
    assert_eq!(r.status(), 204);
    // The delivery still held by a worker is forgotten with the group.
    let held = fetched["deliveries"][1]["id"].as_str().unwrap().to_string();
    let (st, w) = s.post_json(&format!("/v1/queues/jobs/groups/a/deliveries/{held}/ack"), json!(null)).await;
    assert_eq!((st, code(&w)), (404, "unknown_group"), "{w}");
    let (st, v) = s.get("/v1/queues/jobs/groups/a").await;
    assert_eq!((st, code(&v)), (404, "unknown_group"), "{v}");
    let (st, v) = s.call(s.http.delete(s.url("/v1/queues/jobs/groups/a"))).await;
    assert_eq!((st, code(&v)), (404, "unknown_group"), "{v}");
    let (st, v) = s.call(s.http.delete(s.url("/v1/queues/jobs/groups/..bad"))).await;
    assert_eq!(st, 400, "{v}");
    // Room again; and `a` made again has new options and starts from the beginning.
    let (st, v) = s.put_json("/v1/queues/jobs/groups/a", json!({"prefetch": 3})).await;
    assert_eq!(st, 201, "{v}");
    assert_eq!(v["options"]["prefetch"], 3, "{v}");
    let (_, v) = s.post_json("/v1/queues/jobs/groups/a/fetch?max=3", json!(null)).await;
    assert_eq!(v["deliveries"].as_array().map(Vec::len), Some(3), "{v}");
    assert_eq!(v["deliveries"][0]["delivery_count"], 1, "{v}");
    s.stop().await;
    // After a restart the deleted state stays deleted (the new `a` is what is there).
    let s = start(dir.path()).await;
    let (_, v) = s.get("/v1/queues/jobs/groups").await;
    assert_eq!(v["groups"].as_array().map(Vec::len), Some(1), "{v}");
    assert_eq!(v["groups"][0]["options"]["prefetch"], 3, "{v}");
    s.stop().await;
    Ok(())
}
