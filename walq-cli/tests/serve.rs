//! `walq serve` as a process: SIGTERM while producers are busy drains it,
//! it exits 0, and every record it acknowledged is on disk.
//!
//! Method: the built binary (`CARGO_BIN_EXE_walq`) serves a temporary
//! directory on ephemeral ports (its first stdout line names them); four
//! threads produce over plain HTTP/1.1 until the server stops answering; a
//! SIGTERM (`kill -TERM`) arrives mid-stream; then the queue is opened with
//! the walq library (the lock must be free) and every acknowledged offset
//! must hold the value that was acknowledged for it.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One request on a fresh connection; the status and the body.
fn http(addr: &str, method: &str, path: &str, body: &[u8]) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    s.write_all(body)?;
    let mut answer = Vec::new();
    s.read_to_end(&mut answer)?;
    let text = String::from_utf8_lossy(&answer).to_string();
    let status =
        text.get(9..12).and_then(|c| c.parse().ok()).ok_or_else(|| std::io::Error::other(text.clone()))?;
    let body = text.split_once("\r\n\r\n").map_or(String::new(), |(_, b)| b.to_string());
    Ok((status, body))
}

/// Kills the server if the test fails before it exits, so that no process outlives the test.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

#[test]
fn sigterm_drains_and_keeps_every_acknowledged_record() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let child = Command::new(env!("CARGO_BIN_EXE_walq"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--shutdown-grace-ms",
            "10000",
        ])
        .env("WALQ_DATA_DIR", dir.path()) // the environment variable, not a flag
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut child = KillOnDrop(child);
    let mut first = String::new();
    BufReader::new(child.0.stdout.take().expect("stdout")).read_line(&mut first)?;
    // "walq serve: listening on A, admin on B"
    let words: Vec<&str> = first.split_whitespace().collect();
    let (data, admin) = (words[4].trim_end_matches(',').to_string(), words[7].to_string());
    let deadline = Instant::now() + Duration::from_secs(10);
    while http(&admin, "GET", "/readyz", b"").map(|r| r.0).unwrap_or(0) != 200 {
        assert!(Instant::now() < deadline, "not ready: {first}");
        std::thread::sleep(Duration::from_millis(10));
    }

    let acked = Arc::new(Mutex::new(BTreeMap::new()));
    let producers: Vec<_> = (0..4)
        .map(|t| {
            let (data, acked) = (data.clone(), Arc::clone(&acked));
            std::thread::spawn(move || {
                for i in 0.. {
                    let value = format!("t{t}-{i}");
                    match http(&data, "POST", "/v1/queues/q/records", value.as_bytes()) {
                        Ok((200, body)) => {
                            let v: serde_json::Value = serde_json::from_str(&body).expect("JSON");
                            let offset = v["offset"].as_u64().expect("an offset");
                            assert!(
                                acked.lock().unwrap().insert(offset, value).is_none(),
                                "offset {offset} twice"
                            );
                        }
                        Ok((503, _)) | Err(_) => return i, // draining, or gone
                        Ok((status, body)) => panic!("{status} {body}"),
                    }
                }
                unreachable!()
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let kill = Command::new("kill").args(["-TERM", &child.0.id().to_string()]).status()?;
    assert!(kill.success());
    for p in producers {
        p.join().expect("producer");
    }
    let status = child.0.wait()?;
    let mut stderr = String::new();
    child.0.stderr.take().expect("stderr").read_to_string(&mut stderr)?;
    assert_eq!(status.code(), Some(0), "stderr: {stderr}");

    let acked = acked.lock().unwrap();
    assert!(acked.len() > 10, "only {} records were acknowledged", acked.len());
    let queue = walq::Queue::open(dir.path().join("q"))?; // the lock was released
    let mut reader = queue.read_from(0)?;
    let mut on_disk = BTreeMap::new();
    while let Some(r) = reader.next()? {
        on_disk.insert(r.offset(), String::from_utf8(r.value().to_vec())?);
    }
    for (offset, value) in acked.iter() {
        assert_eq!(on_disk.get(offset), Some(value), "acknowledged offset {offset} lost");
    }
    Ok(())
}
