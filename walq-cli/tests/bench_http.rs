//! `walq bench --http` as a process: a very short run (small startup log,
//! few idle long-polls) completes, reports every workload in its JSON with
//! plausible non-zero figures, removes its scratch directory and leaves no
//! server running; with --url it drives a server started here and skips
//! the workloads that need a server of its own.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};

use serde_json::Value;

fn walq(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_walq")).args(args).stdin(Stdio::null()).output().expect("run walq")
}

fn json(o: &Output) -> Value {
    assert_eq!(o.status.code(), Some(0), "stderr: {}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&o.stdout)))
}

fn workload<'a>(v: &'a Value, name: &str) -> &'a Value {
    v["workloads"]
        .as_array()
        .and_then(|w| w.iter().find(|w| w["name"] == name))
        .unwrap_or_else(|| panic!("no workload {name} in {v:#}"))
}

fn positive(w: &Value, field: &str) -> f64 {
    let x = w[field].as_f64().unwrap_or_else(|| panic!("{field} missing in {w}"));
    assert!(x > 0.0 && x.is_finite(), "{field} = {x} in {w}");
    x
}

/// Processes whose command line mentions `dir` (a server the bench left behind would).
fn processes_using(dir: &Path) -> Vec<String> {
    let needle = dir.to_string_lossy().to_string();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        if let Ok(cmd) = std::fs::read(entry.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(&needle) {
                found.push(cmd);
            }
        }
    }
    found
}

#[test]
fn bench_http_runs_briefly_and_reports_every_workload() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = walq(&[
        "bench",
        "--http",
        "--duration",
        "0.2",
        "--startup-log-bytes",
        "4000000",
        "--idle-long-polls",
        "50",
        "--json",
        "--dir",
        tmp.path().to_str().expect("a UTF-8 path"),
    ]);
    let v = json(&out);
    assert!(v["disk"]["fdatasync_4k_p50_us"].as_f64().is_some_and(|x| x > 0.0), "{v:#}");
    assert!(v["config"]["cpu_split"].as_str().is_some_and(|s| s.contains("CPU")), "{v:#}");
    for clients in [1, 8, 64] {
        let w = workload(&v, &format!("produce_{clients}"));
        assert_eq!(w["clients"], clients);
        positive(w, "records_per_sec");
        let (p50, p99) = (positive(w, "p50_us"), positive(w, "p99_us"));
        assert!(p50 <= p99, "{w}");
        // Every produce is durable: at least one record per fdatasync, at most all of them.
        let per_flush = positive(w, "records_per_fdatasync");
        assert!(per_flush >= 1.0 && per_flush <= w["requests"].as_f64().unwrap_or(0.0), "{w}");
        // The CPU time of the server the bench started, and of the bench.
        assert!(w["cpu"]["server_us_per_record"].is_number() && w["cpu"]["bench_cores"].is_number(), "{w}");
    }
    let batch = workload(&v, "batch_produce");
    assert!(positive(batch, "records_per_sec") >= 100.0, "{batch}");
    positive(batch, "p50_us");
    positive(batch, "records_per_fdatasync");
    for name in ["end_to_end_group", "request_reply"] {
        let w = workload(&v, name);
        positive(w, "p50_us");
        positive(w, "p99_us");
    }
    positive(workload(&v, "end_to_end_group"), "records");
    positive(workload(&v, "request_reply"), "round_trips");
    let cold = workload(&v, "cold_start_empty");
    assert!(positive(cold, "ms") < 60_000.0);
    let log = workload(&v, "cold_start_log");
    positive(log, "ms");
    assert!(log["records"].as_u64().is_some_and(|n| n >= 3900), "{log}");
    let memory = workload(&v, "idle_long_polls_memory");
    assert_eq!(memory["long_polls"], 50);
    assert!(positive(memory, "rss_kib") >= memory["idle_rss_kib"].as_f64().unwrap_or(f64::MAX), "{memory}");
    // Every target is reported with its verdict.
    let targets: Vec<&Value> = v["workloads"]
        .as_array()
        .expect("workloads")
        .iter()
        .flat_map(|w| w["targets"].as_array().expect("targets"))
        .collect();
    assert_eq!(targets.len(), 9, "{v:#}");
    assert!(targets.iter().all(|t| t["pass"].is_boolean() && t["target"].is_string()));
    assert_eq!(std::fs::read_dir(tmp.path()).expect("list").count(), 0, "the scratch directory is removed");
    assert_eq!(processes_using(tmp.path()), Vec::<String>::new(), "a server outlived the bench");
}

/// Kills the server if the test fails before it is stopped.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn bench_http_drives_a_running_server_with_url() {
    let dir = tempfile::tempdir().expect("tempdir");
    let child = Command::new(env!("CARGO_BIN_EXE_walq"))
        .args(["serve", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn walq serve");
    let mut server = KillOnDrop(child);
    let mut first = String::new();
    BufReader::new(server.0.stdout.take().expect("stdout")).read_line(&mut first).expect("read");
    // "walq serve: listening on A, admin on B"
    let words: Vec<&str> = first.split_whitespace().collect();
    let (data, admin) = (words[4].trim_end_matches(','), words[7]);
    let out = walq(&[
        "bench",
        "--http",
        "--url",
        &format!("http://{data}"),
        "--admin-url",
        &format!("http://{admin}/"),
        "--duration",
        "0.1",
        "--clients",
        "2",
        "--json",
    ]);
    let v = json(&out);
    let names: Vec<&str> =
        v["workloads"].as_array().expect("workloads").iter().filter_map(|w| w["name"].as_str()).collect();
    assert_eq!(names, ["produce_2", "batch_produce", "end_to_end_group", "request_reply"]);
    assert_eq!(
        v["skipped"],
        serde_json::json!(["cold_start_empty", "cold_start_log", "idle_long_polls_memory"])
    );
    positive(workload(&v, "produce_2"), "records_per_fdatasync");
    // The bench's queues are on the server it drove.
    assert_eq!(v["config"]["server"], format!("http://{data}"));
    assert!(std::fs::read_dir(dir.path()).expect("list").flatten().any(|e| {
        e.file_name().to_string_lossy().starts_with("bench-")
            && e.file_name().to_string_lossy().ends_with("-produce-2")
    }));
}
