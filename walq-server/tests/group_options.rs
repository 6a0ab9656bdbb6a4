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

/// Spelling out a default is the same as leaving it unset: no conflict.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn options_are_compared_as_they_act_so_explicit_defaults_are_no_conflict() -> TestResult {
    let dir = tempfile::tempdir()?;
    let s = start(dir.path()).await;
    s.produce("q", "x").await;
    let (st, v) = s.post_json("/v1/queues/q/groups/g/fetch?max=1", json!(null)).await;
    assert_eq!(st, 200, "{v}");
    let (st, v) = s.put_json("/v1/queues/q/groups/g", json!({"max_deliver": 5, "prefetch": 256})).await;
    assert_eq!(st, 200, "the defaults, spelled out: {v}");
    let (st, v) = s.put_json("/v1/queues/q/groups/g", json!({"start": "latest"})).await;
    assert_eq!(st, 200, "start only matters at creation: {v}");
    let (st, v) = s.put_json("/v1/queues/q/groups/g", json!({"max_deliver": 6})).await;
    assert_eq!((st, code(&v)), (409, "group_exists"), "{v}");
    s.stop().await;
    Ok(())
}

/// The options reach the disk before the group exists: a failed save leaves
/// no group behind, and a retry makes it with its options, which a restart keeps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_options_save_creates_no_group_and_a_retry_keeps_the_options() -> TestResult {
    let dir = tempfile::tempdir()?;
    let s = start(dir.path()).await;
    s.produce("q", "x").await;
    let tmp = dir.path().join("q").join("serve-options.json.tmp");
    std::fs::create_dir(&tmp)?; // the next save fails (EISDIR)
    let opts = json!({"max_deliver": 1, "prefetch": 3});
    let (st, v) = s.put_json("/v1/queues/q/groups/g", opts.clone()).await;
    assert!(st >= 500, "{st} {v}");
    let (st, v) = s.get("/v1/queues/q/groups/g").await;
    assert_eq!((st, code(&v)), (404, "unknown_group"), "a group without its options: {v}");
    std::fs::remove_dir(&tmp)?;
    let (st, v) = s.put_json("/v1/queues/q/groups/g", opts.clone()).await;
    assert_eq!(st, 201, "{v}");
    s.stop().await;
    let s = start(dir.path()).await;
    let (st, v) = s.put_json("/v1/queues/q/groups/g", opts.clone()).await;
    assert_eq!(st, 200, "after a restart: {v}");
    assert_eq!(v["options"]["max_deliver"], 1, "{v}");
    // Options walq refuses are not kept either.
    let (st, v) = s.put_json("/v1/queues/q/groups/h", json!({"prefetch": 0})).await;
    assert_eq!(st, 400, "{v}");
    let saved: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("q").join("serve-options.json"))?)?;
    assert!(saved["groups"].get("h").is_none(), "{saved}");
    s.stop().await;
    Ok(())
}

/// An options file the server cannot read stops the start (naming the file
/// and what to do) and is left exactly as it was: never replaced by defaults.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_options_file_stops_the_start_and_is_left_alone() -> TestResult {
    let dir = tempfile::tempdir()?;
    let s = start(dir.path()).await;
    let (st, v) = s.put_json("/v1/queues/q", json!({"durability": "os"})).await;
    assert_eq!(st, 201, "{v}");
    s.stop().await;
    let file = dir.path().join("q").join("serve-options.json");
    let mut saved: serde_json::Value = serde_json::from_slice(&std::fs::read(&file)?)?;
    saved["queue"]["a_field_from_a_newer_version"] = json!(1);
    let edited = serde_json::to_vec_pretty(&saved)?;
    std::fs::write(&file, &edited)?;
    let config = walq_server::Config {
        data_dir: dir.path().to_path_buf(),
        listen: "127.0.0.1:0".parse()?,
        admin_listen: "127.0.0.1:0".parse()?,
        ..Default::default()
    };
    let server = walq_server::Server::bind(config).await?;
    match server.run().await {
        Err(walq_server::ServeError::Open { queue, source }) => {
            assert_eq!(queue, "q");
            let m = source.to_string();
            assert!(m.contains("serve-options.json") && m.contains("remove it"), "{m}");
        }
        other => panic!("expected the start to stop, got {other:?}"),
    }
    assert_eq!(std::fs::read(&file)?, edited, "the options file was rewritten");
    Ok(())
}

/// A delivery id of a deleted group never settles a delivery of the group
/// made again under the same name (ids carry the opening's incarnation).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_id_from_a_deleted_group_never_settles_a_delivery_of_the_new_one() -> TestResult {
    let dir = tempfile::tempdir()?;
    let s = start(dir.path()).await;
    s.produce("q", "job").await;
    let (_, v) = s.post_json("/v1/queues/q/groups/g/fetch", json!(null)).await;
    let old = v["deliveries"][0]["id"].as_str().unwrap().to_string();
    let r = s.http.delete(s.url("/v1/queues/q/groups/g")).send().await?;
    assert_eq!(r.status(), 204);
    let (_, v) = s.post_json("/v1/queues/q/groups/g/fetch", json!(null)).await;
    let new = v["deliveries"][0]["id"].as_str().unwrap().to_string();
    assert_ne!(old, new);
    for action in ["term", "ack", "nack", "in-progress"] {
        let (st, v) =
            s.post_json(&format!("/v1/queues/q/groups/g/deliveries/{old}/{action}"), json!(null)).await;
        assert_eq!((st, code(&v)), (409, "delivery_not_pending"), "{action}: {v}");
    }
    let (st, v) = s.post_json(&format!("/v1/queues/q/groups/g/deliveries/{new}/nack"), json!(null)).await;
    assert_eq!(st, 200, "the owner's nack: {v}");
    s.stop().await;
    Ok(())
}
