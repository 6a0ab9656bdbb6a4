//! Helpers the benchmarks share (a module of each bench target, not a target).
#![allow(dead_code)]

use std::time::Duration;

/// A queue directory under cargo's target tmp dir (on the real disk, not a tmpfs).
pub fn bench_dir(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("walq-bench-{name}-"))
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("create a bench directory under the target dir")
}

/// How many of the last `iter_custom` calls criterion measured (the others
/// were its warm-up), judging by the command line.
pub fn measured_calls(sample_size: usize, calls: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    let has = |flag: &str| args.iter().any(|a| a == flag);
    if has("--test") || has("--profile-time") {
        calls
    } else if has("--quick") {
        // Quick mode keeps the last two runs (n and 2n iterations).
        calls.min(2)
    } else {
        calls.min(sample_size)
    }
}

/// The value at quantile `q` of sorted `v` (nearest rank).
pub fn quantile(v: &[Duration], q: f64) -> Duration {
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}
