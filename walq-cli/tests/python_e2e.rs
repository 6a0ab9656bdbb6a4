//! `walq serve` driven by a client in another language: the request/reply
//! pattern over HTTP from Python, through five `kill -9` restarts.
//!
//! Method: runs `python3 walq-server/tests/e2e_rpc.py --walq <the built
//! binary>` (standard library only; it starts and kills the server itself,
//! and never leaves one behind) and fails if the script does. The script
//! checks that every request acknowledged with a 200 gets a matching reply,
//! that no reply carries an unknown correlation id, and that requests a
//! worker had fetched but not acked when the server died are delivered
//! again; its last line is the summary (requests, kills, redeliveries,
//! duplicates). Without python3 the test fails: CI has it, and a test that
//! passes because it did not run would hide a regression.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

#[test]
fn python_request_reply_survives_kill_9() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../walq-server/tests/e2e_rpc.py");
    assert!(script.is_file(), "the script {} is missing", script.display());
    let started = Instant::now();
    let out = match Command::new("python3")
        .arg(&script)
        .args(["--walq", env!("CARGO_BIN_EXE_walq"), "--timeout", "60"])
        .stdin(Stdio::null())
        .output()
    {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "python3 is not installed (or not on PATH): install python3 to run this test \
             (it runs {}; the standard library is enough)",
            script.display()
        ),
        Err(e) => panic!("could not run python3 {}: {e}", script.display()),
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Shown by the test harness on failure, or with --nocapture.
    println!("{stdout}");
    eprintln!("{stderr}");
    assert!(
        out.status.success(),
        "{} failed ({}) after {:.1?}:\n{stdout}\n{stderr}",
        script.display(),
        out.status,
        started.elapsed()
    );
    let summary = stdout.lines().rev().find(|l| l.starts_with("e2e_rpc: OK"));
    assert!(summary.is_some(), "no summary line from {}:\n{stdout}\n{stderr}", script.display());
}
