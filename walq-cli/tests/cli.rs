//! The `walq` binary, end to end: every subcommand on real directories,
//! `verify` and `repair` on deliberately damaged ones (a flipped bit in a
//! middle batch, a truncated segment, a garbage tail), a locked directory, a
//! missing one, a closed pipe, JSON output parsed back, and named consumers
//! and groups made with the library, then listed, reset and deleted.
//!
//! Method: directories are written with the walq library (small segments, so
//! there are several), damaged by hand, then the built binary runs on them
//! (`CARGO_BIN_EXE_walq`); exit codes are the documented ones, and read
//! commands must leave every byte of the directory as it was.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use walq::{Queue, Record};

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn walq(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_walq"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run the walq binary")
}

fn code(o: &Output) -> i32 {
    o.status.code().expect("exited, not killed")
}

fn json(o: &Output) -> Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {}\nstderr: {}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    })
}

fn json_lines(o: &Output) -> Vec<Value> {
    o.stdout
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).expect("a JSON line"))
        .collect()
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Every file of a directory and its subdirectories (dead-letter queues):
/// relative path → bytes.
fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        for e in std::fs::read_dir(dir).expect("list").map(|e| e.expect("entry")) {
            let path = e.path();
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                let name = path.strip_prefix(root).expect("inside").to_string_lossy().into_owned();
                out.insert(name, std::fs::read(&path).expect("read"));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// A closed queue of `n` records of ~100 bytes in 4 KiB segments.
fn queue_dir(n: u64) -> Result<tempfile::TempDir, Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let queue = Queue::builder(dir.path()).segment_bytes(4096).preallocate_bytes(4096).open()?;
    for i in 0..n {
        let v = format!("value {i:04} {}", "x".repeat(80));
        queue
            .append_record(&Record::new(v.as_bytes()).key(b"k").header(b"h", b"v").timestamp_ms(1_000 + i))?;
    }
    queue.close()?;
    Ok(dir)
}

/// The segment files, oldest first.
fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("list")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    v.sort();
    v
}

/// Byte positions of the batches of a segment (a 48-byte header whose first
/// u32 is the batch length; zeros end the data).
fn batches(seg: &[u8]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut pos = 32;
    while pos + 48 <= seg.len() {
        let len = u32::from_le_bytes(seg[pos..pos + 4].try_into().expect("4 bytes")) as usize;
        if len == 0 {
            break;
        }
        out.push((pos, len));
        pos += len;
    }
    out
}

#[test]
fn produce_then_every_read_command_sees_the_records() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("q");
    let mut child = Command::new(env!("CARGO_BIN_EXE_walq"))
        .args(["produce", s(&dir), "--key", "user-1", "--header", "src=test", "--json"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    child.stdin.take().expect("stdin").write_all(b"one\ntwo\r\n\xffbinary\n")?;
    let out = child.wait_with_output()?;
    assert_eq!(code(&out), 0);
    let produced = json(&out);
    assert_eq!((produced["records"].as_u64(), produced["next_offset"].as_u64()), (Some(3), Some(3)));

    let before = snapshot(&dir);
    let inspect = walq(&["inspect", s(&dir), "--json"]);
    assert_eq!(code(&inspect), 0);
    let v = json(&inspect);
    assert_eq!((v["first_offset"].as_u64(), v["next_offset"].as_u64()), (Some(0), Some(3)));
    assert_eq!(v["locked"], false);
    assert_eq!(v["segments"].as_array().map(Vec::len), Some(1));
    assert!(v["last_recovery"].is_null() && v["next_open_cuts"].is_null());
    let text = walq(&["inspect", s(&dir)]);
    assert!(String::from_utf8(text.stdout)?.contains("offsets     0..3 (3 records)"));

    let dump = walq(&["dump", s(&dir), "--format", "json"]);
    assert_eq!(code(&dump), 0);
    let records = json_lines(&dump);
    assert_eq!(records.len(), 3);
    assert_eq!(records[0]["value"], "one");
    assert_eq!(records[1]["value"], "two", "a CRLF line ending is not part of the record");
    assert_eq!(records[2]["value"]["hex"], "ff62696e617279");
    assert_eq!(records[0]["key"], "user-1");
    assert_eq!(records[0]["headers"][0], serde_json::json!(["src", "test"]));

    let raw = walq(&["dump", s(&dir), "--from", "1", "--to", "2", "--format", "raw"]);
    assert_eq!(raw.stdout, b"two\n");
    let hex = walq(&["dump", s(&dir), "--format", "hex", "--to", "1"]);
    assert!(String::from_utf8(hex.stdout)?.contains("6f 6e 65"));
    let tail = walq(&["tail", s(&dir), "-n", "1", "--json"]);
    assert_eq!(json_lines(&tail).iter().map(|r| r["offset"].as_u64()).collect::<Vec<_>>(), vec![Some(2)]);

    let verify = walq(&["verify", s(&dir), "--json"]);
    assert_eq!(code(&verify), 0);
    let v = json(&verify);
    assert_eq!((v["ok"].as_bool(), v["records"].as_u64()), (Some(true), Some(3)));
    assert_eq!(before, snapshot(&dir), "a read command changed the directory");

    // Appending again continues the offsets.
    let out =
        Command::new(env!("CARGO_BIN_EXE_walq")).args(["produce", s(&dir)]).stdin(Stdio::piped()).spawn()?;
    let mut out = out;
    out.stdin.take().expect("stdin").write_all(b"four\n")?;
    assert!(out.wait()?.success());
    assert_eq!(json_lines(&walq(&["dump", s(&dir), "--json", "--from", "3"]))[0]["offset"], 3);
    Ok(())
}

#[test]
fn a_flipped_bit_in_a_middle_batch_is_found_then_repaired() -> TestResult {
    let dir = queue_dir(150)?;
    let segs = segments(dir.path());
    assert!(segs.len() >= 4, "{} segments", segs.len());
    let seg = &segs[segs.len() / 2];
    let mut bytes = std::fs::read(seg)?;
    let all = batches(&bytes);
    let (pos, len) = all[all.len() / 2];
    bytes[pos + len / 2] ^= 0x04;
    std::fs::write(seg, &bytes)?;
    let before = snapshot(dir.path());

    let verify = walq(&["verify", s(dir.path()), "--json"]);
    assert_eq!(code(&verify), 1, "{}", String::from_utf8_lossy(&verify.stderr));
    let v = json(&verify);
    let problems = v["problems"].as_array().expect("problems");
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(problems[0]["file"], s(seg));
    assert_eq!(problems[0]["position"].as_u64(), Some(pos as u64));
    assert_eq!(problems[0]["kind"], "batch");
    let text = walq(&["verify", s(dir.path())]);
    assert_eq!(code(&text), 1);
    assert!(String::from_utf8(text.stdout)?.contains(&format!("{} at byte {pos}", seg.display())));

    // Reading stops at the damage with the corrupt exit code.
    let dump = walq(&["dump", s(dir.path()), "--format", "json"]);
    assert_eq!(code(&dump), 5);
    let read = json_lines(&dump).len();
    assert!(read > 0 && read < 150);
    assert_eq!(before, snapshot(dir.path()), "verify or dump changed the directory");

    // repair: without a terminal and without --yes, nothing is cut.
    let declined = walq(&["repair", s(dir.path())]);
    assert_eq!(code(&declined), 1);
    assert!(String::from_utf8(declined.stderr)?.contains("records beyond the damage"));
    assert_eq!(before, snapshot(dir.path()));
    let dry = walq(&["repair", s(dir.path()), "--dry-run", "--json"]);
    assert_eq!(code(&dry), 1);
    let plan = json(&dry)["plan"].clone();
    assert_eq!(plan["position"].as_u64(), Some(pos as u64));
    assert_eq!(plan["next_offset"].as_u64(), Some(read as u64));
    assert_eq!(before, snapshot(dir.path()));

    let report = dir.path().join("report.txt");
    let repaired = walq(&["repair", s(dir.path()), "--yes", "--report", s(&report)]);
    assert_eq!(code(&repaired), 0, "{}", String::from_utf8_lossy(&repaired.stderr));
    let written = std::fs::read_to_string(&report)?;
    assert!(
        written.contains(&format!("at byte {pos}")) && written.contains(&format!("offsets 0..{read}")),
        "{written}"
    );
    assert_eq!(code(&walq(&["verify", s(dir.path())])), 0);
    assert_eq!(Queue::open(dir.path())?.next_offset(), read as u64);
    Ok(())
}

#[test]
fn a_truncated_sealed_segment_is_found_and_repaired_with_the_default_report() -> TestResult {
    let dir = queue_dir(150)?;
    let segs = segments(dir.path());
    let seg = &segs[1];
    let bytes = std::fs::read(seg)?;
    let all = batches(&bytes);
    let (pos, len) = all[all.len() - 2];
    std::fs::OpenOptions::new().write(true).open(seg)?.set_len((pos + len / 2) as u64)?;

    let v = json(&walq(&["verify", s(dir.path()), "--json"]));
    assert_eq!(v["ok"], false);
    assert_eq!(v["problems"][0]["position"].as_u64(), Some(pos as u64));
    let repaired = walq(&["repair", s(dir.path()), "--yes", "--json"]);
    assert_eq!(code(&repaired), 0, "{}", String::from_utf8_lossy(&repaired.stderr));
    let r = json(&repaired);
    let report = PathBuf::from(r["report"].as_str().expect("a report path"));
    assert!(
        report.starts_with(dir.path())
            && report.file_name().is_some_and(|n| n.to_string_lossy().starts_with("repair-"))
    );
    assert!(report.exists());
    assert_eq!(r["plan"]["files_removed"].as_array().map(|a| a.iter().any(|f| f == s(&segs[2]))), Some(true));
    assert_eq!(code(&walq(&["verify", s(dir.path())])), 0);
    Ok(())
}

#[test]
fn a_garbage_tail_is_a_torn_tail_that_the_next_open_cuts_and_inspect_then_reports() -> TestResult {
    let dir = queue_dir(40)?;
    let last = segments(dir.path()).pop().expect("a segment");
    let mut bytes = std::fs::read(&last)?;
    let end = batches(&bytes).last().map_or(32, |(p, l)| p + l);
    bytes.resize(bytes.len().max(end + 64), 0);
    bytes[end..end + 64].fill(0xee);
    std::fs::write(&last, &bytes)?;

    let verify = walq(&["verify", s(dir.path()), "--json"]);
    assert_eq!(code(&verify), 1);
    assert_eq!(json(&verify)["problems"][0]["kind"], "torn tail");
    let v = json(&walq(&["inspect", s(dir.path()), "--json"]));
    assert_eq!(v["next_open_cuts"]["position"].as_u64(), Some(end as u64));
    assert_eq!(v["next_open_cuts"]["bytes"].as_u64(), Some(64));
    assert_eq!(code(&walq(&["dump", s(dir.path())])), 0, "a torn tail ends the dump cleanly");

    // Opening (here through produce) cuts it; inspect shows what the last recovery cut.
    let mut p = Command::new(env!("CARGO_BIN_EXE_walq"))
        .args(["produce", s(dir.path())])
        .stdin(Stdio::piped())
        .spawn()?;
    p.stdin.take().expect("stdin").write_all(b"after\n")?;
    assert!(p.wait()?.success());
    let v = json(&walq(&["inspect", s(dir.path()), "--json"]));
    assert_eq!(v["last_recovery"]["bytes_cut"].as_u64(), Some(64));
    assert_eq!(v["last_recovery"]["cut_position"].as_u64(), Some(end as u64));
    assert!(v["next_open_cuts"].is_null());
    assert_eq!(v["next_offset"].as_u64(), Some(41));
    let text = String::from_utf8(walq(&["inspect", s(dir.path())]).stdout)?;
    assert!(
        text.contains(&format!(
            "cut 64 bytes (0 records) of a torn tail at {}",
            last.file_name().unwrap().to_string_lossy()
        )),
        "{text}"
    );
    Ok(())
}

#[test]
fn a_locked_directory_refuses_writers_and_serves_readers() -> TestResult {
    let dir = queue_dir(20)?;
    let queue = Queue::open(dir.path())?;
    let before = snapshot(dir.path());
    let mut p = Command::new(env!("CARGO_BIN_EXE_walq"))
        .args(["produce", s(dir.path())])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    p.stdin.take().expect("stdin").write_all(b"x\n")?;
    let out = p.wait_with_output()?;
    assert_eq!(code(&out), 4, "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8(out.stderr)?.contains("locked"));
    assert_eq!(code(&walq(&["repair", s(dir.path()), "--yes"])), 4);

    let v = json(&walq(&["inspect", s(dir.path()), "--json"]));
    assert_eq!((v["locked"].as_bool(), v["next_offset"].as_u64()), (Some(true), Some(20)));
    assert_eq!(code(&walq(&["verify", s(dir.path())])), 0);
    assert_eq!(json_lines(&walq(&["dump", s(dir.path()), "--json"])).len(), 20);
    assert_eq!(before, snapshot(dir.path()), "a command changed a locked directory");
    drop(queue);
    Ok(())
}

#[test]
fn a_missing_directory_is_exit_code_3_and_is_not_created() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let gone = tmp.path().join("nope");
    for args in [
        vec!["inspect", s(&gone)],
        vec!["verify", s(&gone)],
        vec!["dump", s(&gone)],
        vec!["tail", s(&gone)],
        vec!["repair", s(&gone), "--yes"],
        vec!["consumer", "list", s(&gone)],
        vec!["consumer", "reset", s(&gone), "c", "--to", "earliest"],
        vec!["consumer", "delete", s(&gone), "c"],
        vec!["group", "list", s(&gone)],
        vec!["group", "delete", s(&gone), "g"],
        vec!["dump", s(&gone), "--consumer", "c"],
    ] {
        let out = walq(&args);
        assert_eq!(code(&out), 3, "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        assert!(String::from_utf8_lossy(&out.stderr).contains("does not exist"));
    }
    assert!(!gone.exists());
}

#[test]
fn usage_errors_are_exit_code_2() {
    assert_eq!(code(&walq(&["dump"])), 2);
    assert_eq!(code(&walq(&["nonsense"])), 2);
    assert_eq!(code(&walq(&["produce", "/tmp/x", "--header", "no-equals"])), 2);
    assert_eq!(code(&walq(&["consumer", "reset", "/tmp/x", "c"])), 2, "--to or --time is required");
    assert_eq!(code(&walq(&["consumer", "reset", "/tmp/x", "c", "--to", "1", "--time", "5"])), 2);
    assert_eq!(code(&walq(&["consumer", "reset", "/tmp/x", "c", "--to", "soon"])), 2);
    assert_eq!(code(&walq(&["consumer", "reset", "/tmp/x", "c", "--time", "2024-13-01T00:00:00Z"])), 2);
    assert_eq!(code(&walq(&["dump", "/tmp/x", "--consumer", "c", "--from", "3"])), 2);
    let help = walq(&["--help"]);
    assert_eq!(code(&help), 0);
    assert!(String::from_utf8_lossy(&help.stdout).contains("4  locked"));
    assert!(String::from_utf8_lossy(&help.stdout).contains("consumer or group does not exist"));
}

#[test]
fn a_closed_pipe_ends_the_output_quietly() -> TestResult {
    let dir = queue_dir(400)?;
    let mut child = Command::new(env!("CARGO_BIN_EXE_walq"))
        .args(["dump", s(dir.path())])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut stdout = child.stdout.take().expect("stdout");
    let mut first = [0u8; 16];
    stdout.read_exact(&mut first)?;
    drop(stdout); // like `| head -c 16`
    let out = child.wait_with_output()?;
    let stderr = String::from_utf8(out.stderr)?;
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(code_of(out.status), 0, "{stderr}");
    Ok(())
}

fn code_of(status: std::process::ExitStatus) -> i32 {
    status.code().expect("exited, not killed")
}

#[test]
fn tail_follow_prints_records_another_process_appends() -> TestResult {
    let dir = queue_dir(5)?;
    let mut child = Command::new(env!("CARGO_BIN_EXE_walq"))
        .args(["tail", s(dir.path()), "-n", "2", "-f", "--interval-ms", "10", "--json"])
        .stdout(Stdio::piped())
        .spawn()?;
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut offsets = Vec::new();
    for _ in 0..2 {
        let v: Value = serde_json::from_str(&lines.next().expect("a line")?)?;
        offsets.push(v["offset"].as_u64());
    }
    assert_eq!(offsets, vec![Some(3), Some(4)]);
    // A writer (this process) appends across segment rolls while tail follows.
    let queue = Queue::builder(dir.path()).segment_bytes(4096).open()?;
    for i in 0..60 {
        queue.append(format!("new {i} {}", "y".repeat(90)).as_bytes())?;
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut next = 5;
    while next < 65 && Instant::now() < deadline {
        let v: Value = serde_json::from_str(&lines.next().expect("a line")?)?;
        assert_eq!(v["offset"].as_u64(), Some(next));
        next += 1;
    }
    child.kill()?;
    child.wait()?;
    assert_eq!(next, 65);
    Ok(())
}

#[test]
fn bench_runs_briefly_and_reports_json() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = walq(&[
        "bench",
        "--duration",
        "0.1",
        "--producers",
        "2",
        "--record-size",
        "256",
        "--json",
        "--dir",
        s(tmp.path()),
    ]);
    assert_eq!(code(&out), 0, "{}", String::from_utf8_lossy(&out.stderr));
    let v = json(&out);
    let names: Vec<&str> =
        v["workloads"].as_array().expect("workloads").iter().filter_map(|w| w["name"].as_str()).collect();
    assert_eq!(
        names,
        ["one_producer", "many_producers", "bulk_append_batch", "sequential_scan", "end_to_end", "reopen"]
    );
    assert!(v["disk"]["fdatasync_4k_p50_us"].as_f64().is_some_and(|x| x > 0.0));
    assert!(v["workloads"][0]["appends_per_sec"].as_f64().is_some_and(|x| x > 0.0));
    assert_eq!(std::fs::read_dir(tmp.path()).expect("list").count(), 0, "the scratch directory is removed");
}

/// `queue_dir(50)` (timestamps 1000 + offset) plus, made with the library:
/// consumer "billing" committed at 20, "audit" started at the end (50), and
/// group "workers" that delivered 0..5, acknowledged 0 and 1, dead-lettered 2
/// (terminated) and left 3 and 4 delivered, not done.
fn consumers_dir() -> Result<tempfile::TempDir, Box<dyn std::error::Error>> {
    let dir = queue_dir(50)?;
    let queue = Queue::open(dir.path())?;
    queue.consumer("billing")?.commit(20)?;
    drop(queue.consumer_from("audit", walq::StartAt::Latest)?);
    let group = queue.group("workers").ack_durability(walq::Durability::Sync).open()?;
    let mut worker = group.worker();
    let got = worker.fetch(5, Duration::ZERO)?;
    assert_eq!(got.len(), 5);
    worker.ack(got[0].id())?;
    worker.ack(got[1].id())?;
    worker.term(got[2].id())?;
    drop((worker, group));
    queue.close()?;
    Ok(dir)
}

fn positions(dir: &Path) -> BTreeMap<String, u64> {
    let out = walq(&["consumer", "list", s(dir), "--json"]);
    assert_eq!(code(&out), 0, "{}", String::from_utf8_lossy(&out.stderr));
    let v = json(&out);
    v["consumers"]
        .as_array()
        .expect("a consumers array")
        .iter()
        .map(|c| (c["name"].as_str().expect("name").to_string(), c["position"].as_u64().expect("position")))
        .collect()
}

#[test]
fn consumer_and_group_lists_read_the_journal_without_changing_anything() -> TestResult {
    let dir = consumers_dir()?;
    let before = snapshot(dir.path());

    let out = walq(&["consumer", "list", s(dir.path()), "--json"]);
    assert_eq!(code(&out), 0, "{}", String::from_utf8_lossy(&out.stderr));
    let v = json(&out);
    assert_eq!(v["next_offset"], 50);
    assert_eq!(
        v["consumers"],
        serde_json::json!([
            { "name": "audit", "position": 50, "lag": 0 },
            { "name": "billing", "position": 20, "lag": 30 },
        ])
    );
    assert_eq!((v["journal"]["exists"].as_bool(), v["journal"]["damage"].is_null()), (Some(true), true));
    let text = String::from_utf8(walq(&["consumer", "list", s(dir.path())]).stdout)?;
    assert!(text.contains("billing") && text.contains("30"), "{text}");

    let v = json(&walq(&["group", "list", s(dir.path()), "--json"]));
    assert_eq!(
        v["groups"],
        serde_json::json!([{
            "name": "workers", "ack_floor": 3, "delivered_to": 5, "delivered_not_done": 2,
            "done_above_floor": 0, "unacked": 47, "dead_letters": 1,
        }])
    );
    let text = String::from_utf8(walq(&["group", "list", s(dir.path())]).stdout)?;
    assert!(text.contains("workers") && text.contains("47"), "{text}");

    // inspect: the same two sections.
    let v = json(&walq(&["inspect", s(dir.path()), "--json"]));
    assert_eq!(v["consumers"].as_array().map(Vec::len), Some(2));
    assert_eq!(v["groups"][0]["dead_letters"], 1);
    assert_eq!(v["consumer_journal"]["exists"], true);
    assert!(
        v["other_files"].as_array().expect("other files").iter().all(|f| f["kind"] != "foreign"),
        "{}",
        v["other_files"]
    );
    let text = String::from_utf8(walq(&["inspect", s(dir.path())]).stdout)?;
    assert!(text.contains("\nconsumers\n") && text.contains("\ngroups\n"), "{text}");
    assert!(text.contains("billing") && text.contains("workers"), "{text}");

    // dump --consumer starts at the committed position.
    let dump = walq(&["dump", s(dir.path()), "--consumer", "billing", "--json"]);
    assert_eq!(code(&dump), 0, "{}", String::from_utf8_lossy(&dump.stderr));
    let records = json_lines(&dump);
    assert_eq!((records.len(), records[0]["offset"].as_u64()), (30, Some(20)));
    assert_eq!(json_lines(&walq(&["dump", s(dir.path()), "--consumer", "audit", "--json"])).len(), 0);
    let out = walq(&["dump", s(dir.path()), "--consumer", "nobody"]);
    assert_eq!(code(&out), 3);
    assert!(String::from_utf8_lossy(&out.stderr).contains("no consumer named \"nobody\""));

    assert_eq!(before, snapshot(dir.path()), "a read command changed the directory");
    Ok(())
}

#[test]
fn consumer_reset_and_delete_and_group_delete_change_the_saved_state() -> TestResult {
    let dir = consumers_dir()?;
    let d = s(dir.path());
    let reset = |to: &[&str]| {
        let mut args = vec!["consumer", "reset", d, "billing"];
        args.extend_from_slice(to);
        let out = walq(&args);
        (code(&out), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    for (to, expect) in [
        (vec!["--to", "earliest"], 0),
        (vec!["--to", "42"], 42),
        (vec!["--to", "latest"], 50),
        (vec!["--time", "1010"], 10),
        (vec!["--time", "1970-01-01T00:00:01.025Z"], 25),
        (vec!["--time", "1970-01-01T01:00:01.030+01:00"], 30),
    ] {
        let (c, err) = reset(&to);
        assert_eq!(c, 0, "{to:?}: {err}");
        assert_eq!(positions(dir.path())["billing"], expect, "{to:?}");
    }
    let out = walq(&["consumer", "reset", d, "billing", "--to", "7", "--json"]);
    let v = json(&out);
    assert_eq!((v["previous"].as_u64(), v["position"].as_u64()), (Some(30), Some(7)));
    assert_eq!(reset(&["--to", "99"]).0, 2, "an offset past the end is a usage error");

    // Unknown names: exit 3, and nothing is created without --create.
    let out = walq(&["consumer", "reset", d, "nobody", "--to", "earliest"]);
    assert_eq!(code(&out), 3);
    assert!(String::from_utf8_lossy(&out.stderr).contains("walq consumer list"));
    assert!(!positions(dir.path()).contains_key("nobody"));
    assert_eq!(code(&walq(&["consumer", "reset", d, "nobody", "--to", "5", "--create"])), 0);
    assert_eq!(positions(dir.path())["nobody"], 5);

    assert_eq!(code(&walq(&["consumer", "delete", d, "billing"])), 0);
    assert!(!positions(dir.path()).contains_key("billing"));
    assert_eq!(code(&walq(&["consumer", "delete", d, "billing"])), 3);
    assert_eq!(code(&walq(&["group", "delete", d, "workers"])), 0);
    assert_eq!(json(&walq(&["group", "list", d, "--json"]))["groups"], serde_json::json!([]));
    assert_eq!(code(&walq(&["group", "delete", d, "workers"])), 3);
    assert!(dir.path().join("dead-letters").join("workers").is_dir(), "the dead-letter queue stays");

    // The library sees what the commands did.
    let queue = Queue::open(dir.path())?;
    let names: Vec<String> = queue.consumers().into_iter().map(|c| c.name).collect();
    assert_eq!(names, vec!["audit", "nobody"]);
    assert!(queue.groups().is_empty());
    Ok(())
}

#[test]
fn consumer_writes_on_a_locked_directory_are_exit_code_4_and_lists_still_work() -> TestResult {
    let dir = consumers_dir()?;
    let d = s(dir.path());
    let queue = Queue::open(dir.path())?;
    let before = snapshot(dir.path());
    for args in [
        vec!["consumer", "reset", d, "billing", "--to", "earliest"],
        vec!["consumer", "delete", d, "billing"],
        vec!["group", "delete", d, "workers"],
    ] {
        let out = walq(&args);
        assert_eq!(code(&out), 4, "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        assert!(String::from_utf8_lossy(&out.stderr).contains("locked"));
    }
    assert_eq!(positions(dir.path())["billing"], 20);
    assert_eq!(json(&walq(&["group", "list", d, "--json"]))["groups"][0]["ack_floor"], 3);
    assert_eq!(before, snapshot(dir.path()), "a command changed a locked directory");
    // A live commit shows up in the next list.
    queue.consumer("billing")?.commit(33)?;
    assert_eq!(positions(dir.path())["billing"], 33);
    drop(queue);
    Ok(())
}

#[test]
fn a_damaged_journal_is_listed_as_of_its_last_valid_entry_with_a_warning() -> TestResult {
    let dir = consumers_dir()?;
    let queue = Queue::open(dir.path())?;
    queue.consumer("billing")?.commit(44)?; // the journal's last entry
    queue.close()?;
    let path = dir.path().join("consumers.journal");
    let mut bytes = std::fs::read(&path)?;
    let last = bytes.iter().rposition(|&b| b != 0).expect("entries");
    bytes[last] ^= 0x10;
    std::fs::write(&path, &bytes)?;

    let out = walq(&["consumer", "list", s(dir.path()), "--json"]);
    assert_eq!(code(&out), 0);
    let v = json(&out);
    assert_eq!(v["consumers"][1], serde_json::json!({ "name": "billing", "position": 20, "lag": 30 }));
    assert!(v["journal"]["damage"]["position"].as_u64().is_some(), "{}", v["journal"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("damaged"));
    let text = String::from_utf8(walq(&["inspect", s(dir.path())]).stdout)?;
    assert!(text.contains("DAMAGED"), "{text}");
    Ok(())
}
