//! Real process death: a child process appends (durable single appends,
//! batches, cheap appends followed by a flush) and reports every
//! acknowledgement on its stdout pipe; the parent kills it with SIGKILL at a
//! random moment (sometimes while it is still opening, that is recovering),
//! reopens the directory, and checks the oracle: every acknowledged record
//! is present and intact, offsets are contiguous, and every record is one the
//! child really attempted at that offset.
//!
//! Method: the test binary re-runs itself as the child (`WALQ_KILL9_CHILD`).
//! `WALQ_SEED` replays a run; `WALQ_KILL9_CYCLES` scales it (CI: 1,000).

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::Rng;
use walq::{Durability, Queue, Record};

/// The value the child writes at `offset` in generation `generation`: it
/// names both, so a reader can tell which attempt a record came from.
fn value(offset: u64, generation: u64) -> Vec<u8> {
    let mut v = format!("o{offset}g{generation}|").into_bytes();
    let fill = (offset * 7 + generation) % 300;
    v.extend(std::iter::repeat_n(b'x', fill as usize));
    v
}

/// Parses a value back into (offset, generation).
fn parse(v: &[u8]) -> Option<(u64, u64)> {
    let s = std::str::from_utf8(v).ok()?;
    let head = s.strip_prefix('o')?.split('|').next()?;
    let (o, g) = head.split_once('g')?;
    Some((o.parse().ok()?, g.parse().ok()?))
}

fn open(dir: &Path) -> walq::Result<Queue> {
    Queue::builder(dir).segment_bytes(64 << 10).open()
}

/// The child: append until killed, printing `ack <first> <count>` after each
/// acknowledged append (or flushed group of cheap appends).
fn child(dir: &Path, generation: u64, seed: u64) {
    let q = open(dir).expect("child open");
    let mut out = std::io::stdout().lock();
    writeln!(out, "open {}", q.next_offset()).unwrap();
    out.flush().unwrap();
    let mut rng = Rng::new(seed);
    loop {
        let next = q.next_offset();
        match rng.below(10) {
            0..=5 => {
                let o = q.append(&value(next, generation)).expect("append");
                writeln!(out, "ack {o} 1").unwrap();
            }
            6..=7 => {
                let n = 1 + rng.below(8);
                let vals: Vec<Vec<u8>> = (0..n).map(|i| value(next + i, generation)).collect();
                let recs: Vec<Record<'_>> = vals.iter().map(|v| Record::new(v)).collect();
                let r = q.append_batch(&recs).expect("batch");
                writeln!(out, "ack {} {}", r.start, n).unwrap();
            }
            _ => {
                let n = 1 + rng.below(20);
                for i in 0..n {
                    q.append_with(&value(next + i, generation), Durability::Os).expect("os append");
                }
                q.flush().expect("flush");
                writeln!(out, "ack {next} {n}").unwrap();
            }
        }
        out.flush().unwrap();
    }
}

#[test]
#[ignore = "the child process of acknowledged_appends_survive_kill_9_at_random_moments"]
fn kill9_child_process() {
    if let (Ok(dir), Ok(generation), Ok(seed)) = (
        std::env::var("WALQ_KILL9_CHILD"),
        std::env::var("WALQ_KILL9_GENERATION"),
        std::env::var("WALQ_KILL9_SEED"),
    ) {
        child(Path::new(&dir), generation.parse().unwrap(), seed.parse().unwrap());
    }
}

#[test]
fn acknowledged_appends_survive_kill_9_at_random_moments() {
    let cycles = std::env::var("WALQ_KILL9_CYCLES").ok().and_then(|s| s.parse().ok()).unwrap_or(1000u64);
    let seed = common::seed(0x0C1_11ED);
    let mut rng = Rng::new(seed);
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    // offset -> generation of every acknowledged record.
    let mut acked: BTreeMap<u64, u64> = BTreeMap::new();
    let (mut killed_opening, mut acks) = (0u64, 0u64);
    let started = Instant::now();
    for generation in 0..cycles {
        let mut child = Command::new(&exe)
            .args(["--exact", "kill9_child_process", "--ignored", "--nocapture", "--test-threads=1"])
            .env("WALQ_KILL9_CHILD", dir.path())
            .env("WALQ_KILL9_GENERATION", generation.to_string())
            .env("WALQ_KILL9_SEED", rng.next_u64().to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        // Kill after a random number of acknowledgements (0: during the open).
        let target = rng.below(12);
        let mut lines = BufReader::new(stdout).lines();
        let mut seen = 0;
        if target == 0 {
            std::thread::sleep(Duration::from_micros(rng.below(3000)));
            killed_opening += 1;
        } else {
            while seen < target {
                let Some(Ok(line)) = lines.next() else { break };
                if record_ack(&line, generation, &mut acked) {
                    acks += 1;
                    seen += 1;
                }
            }
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        // Acknowledgements already in the pipe count too: the child made them.
        for line in lines.map_while(Result::ok) {
            record_ack(&line, generation, &mut acked);
        }
        if generation % 50 == 49 || generation + 1 == cycles {
            check(dir.path(), &acked, generation, seed);
        }
    }
    eprintln!(
        "{cycles} kill -9 cycles ({killed_opening} during open), {acks} acknowledgements seen, \
         {} acknowledged records checked, in {:.1?} (seed {seed}, WALQ_SEED replays)",
        acked.len(),
        started.elapsed()
    );
    assert!(acked.len() > cycles as usize, "the children acknowledged too little to prove anything");
}

/// Notes the records an `ack <first> <count>` line acknowledges; false for other lines.
fn record_ack(line: &str, generation: u64, acked: &mut BTreeMap<u64, u64>) -> bool {
    let mut parts = line.split_whitespace();
    if parts.next() != Some("ack") {
        return false;
    }
    let first: u64 = parts.next().and_then(|p| p.parse().ok()).expect("ack <first> <count>");
    let n: u64 = parts.next().and_then(|p| p.parse().ok()).expect("ack <first> <count>");
    for o in first..first + n {
        acked.insert(o, generation);
    }
    true
}

/// Reopens the directory and checks the oracle.
fn check(dir: &Path, acked: &BTreeMap<u64, u64>, generation: u64, seed: u64) {
    let q = open(dir).unwrap_or_else(|e| panic!("after cycle {generation} (seed {seed}): {e}"));
    let mut reader = q.read_from(0).unwrap();
    let mut expect = 0;
    let mut present = BTreeMap::new();
    while let Some(r) = reader.next().unwrap_or_else(|e| panic!("cycle {generation} read {expect}: {e}")) {
        assert_eq!(r.offset(), expect, "offsets contiguous");
        let (o, g) = parse(r.value()).unwrap_or_else(|| panic!("offset {expect}: a record nobody wrote"));
        assert_eq!(o, expect, "record at {expect} was written for offset {o}");
        assert_eq!(r.value(), value(o, g), "record at {expect} is damaged");
        present.insert(o, g);
        expect += 1;
    }
    for (o, g) in acked {
        assert_eq!(
            present.get(o),
            Some(g),
            "cycle {generation} (seed {seed}): acknowledged offset {o} lost or replaced"
        );
    }
}
