//! The request/reply example (`examples/rpc.rs`) end to end: two clients,
//! one server consuming through a group, replies matched by correlation id.

#[path = "../examples/rpc.rs"]
mod rpc;

#[test]
fn request_reply_matches_every_reply_by_correlation_id() {
    let dir = tempfile::tempdir().unwrap();
    let results = rpc::run(dir.path(), 25).unwrap();
    assert_eq!(results.len(), 2);
    let fib = |n: u64| (0..n).fold((0u64, 1u64), |(a, b), _| (b, a + b)).0;
    for answers in &results {
        assert_eq!(answers.len(), 25, "every request answered");
        for (&n, &f) in answers {
            assert_eq!(f, fib(n), "reply to request {n}");
        }
    }
    // The server acknowledged every request: nothing is left for the group.
    let requests = walq::Queue::open(dir.path().join("rpc_requests")).unwrap();
    let group = requests.group("rpc_server").open().unwrap();
    assert_eq!(group.info().ack_floor, 50);
    assert_eq!(group.info().unacked, 0);
}
