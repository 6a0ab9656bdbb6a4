//! Helpers shared by the crash tests: a seeded RNG, a model of what was
//! acknowledged, and the check that a recovered queue agrees with it.
#![allow(dead_code)]

use std::path::Path;

use walq::{Queue, SimDisk};

/// The seed of a randomized test: `WALQ_SEED` replays one, else `default`.
pub fn seed(default: u64) -> u64 {
    std::env::var("WALQ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(default)
}

/// How many iterations a randomized test runs: `WALQ_ITERS` overrides.
pub fn iterations(default: u64) -> u64 {
    std::env::var("WALQ_ITERS").ok().and_then(|s| s.parse().ok()).unwrap_or(default)
}

/// splitmix64: small, seeded, good enough for choosing operations.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// The value written at `offset` in generation `gen`: recognizable, with a
/// length that varies so batches and segment rolls fall in different places.
pub fn value_for(offset: u64, generation: u64, len: usize) -> Vec<u8> {
    let mut v = format!("o{offset}g{generation}:").into_bytes();
    while v.len() < len {
        v.push(b'a' + (v.len() % 26) as u8);
    }
    v.truncate(len.max(8));
    v
}

/// What the test believes about the log.
#[derive(Debug, Default, Clone)]
pub struct Model {
    /// Value attempted at each offset (acknowledged or not).
    pub attempted: Vec<Vec<u8>>,
    /// Offsets below this were acknowledged durable (Sync append or flush).
    pub durable: u64,
}

impl Model {
    /// Checks a reopened queue: every durable record present and intact,
    /// offsets contiguous from the first, nothing that was never attempted.
    /// Returns the recovered next offset, and trims the model to it.
    pub fn check(&mut self, queue: &Queue, context: &str) -> u64 {
        let next = queue.next_offset();
        assert!(
            next >= self.durable,
            "{context}: acknowledged records lost: next offset {next} < durable {}",
            self.durable
        );
        assert!(
            next <= self.attempted.len() as u64,
            "{context}: phantom records: next offset {next} > attempted {}",
            self.attempted.len()
        );
        let mut reader =
            queue.read_from(queue.first_offset()).unwrap_or_else(|e| panic!("{context}: read_from: {e}"));
        let mut expected = queue.first_offset();
        while let Some(r) = reader.next().unwrap_or_else(|e| panic!("{context}: read at {expected}: {e}")) {
            assert_eq!(r.offset(), expected, "{context}: offsets not contiguous");
            assert_eq!(
                r.value(),
                &self.attempted[expected as usize][..],
                "{context}: record {expected} differs from what was appended"
            );
            expected += 1;
        }
        assert_eq!(expected, next, "{context}: reader stopped at {expected}, next offset is {next}");
        self.attempted.truncate(next as usize);
        self.durable = next;
        next
    }
}

/// Every file's name and bytes on a simulated disk, for before/after comparisons.
pub fn sim_image(disk: &SimDisk) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    disk.files()
        .into_iter()
        .map(|p| {
            let bytes = disk.read_file(&p).unwrap_or_default();
            (p, bytes)
        })
        .collect()
}

/// The queue directory used on simulated disks.
pub fn sim_dir() -> &'static Path {
    Path::new("/walq-sim/q")
}

/// Start positions of the batches of a segment file's bytes, following the
/// length fields from the 32-byte segment header (see docs/format.md).
pub fn batch_starts(bytes: &[u8]) -> Vec<usize> {
    let mut starts = Vec::new();
    let mut pos = 32;
    while pos + 48 <= bytes.len() {
        let len = u32::from_le_bytes(bytes[pos..pos + 4].try_into().unwrap()) as usize;
        if len < 48 || &bytes[pos + 8..pos + 12] != b"WLQB" || pos + len > bytes.len() {
            break;
        }
        starts.push(pos);
        pos += len;
    }
    starts
}

/// End of the last batch (the data end) of a segment file's bytes.
pub fn data_end(bytes: &[u8]) -> usize {
    match batch_starts(bytes).last() {
        Some(&p) => p + u32::from_le_bytes(bytes[p..p + 4].try_into().unwrap()) as usize,
        None => 32,
    }
}

/// The segment files of a real queue directory, in offset order.
pub fn segment_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    v.sort();
    v
}

/// Every record of a queue as (offset, value).
pub fn read_all(queue: &Queue) -> Vec<(u64, Vec<u8>)> {
    let mut reader = queue.read_from(queue.first_offset()).unwrap();
    let mut out = Vec::new();
    while let Some(r) = reader.next().unwrap() {
        out.push((r.offset(), r.value().to_vec()));
    }
    out
}

/// `00000000000000000042.seg`: a segment's file name (docs/format.md).
pub fn segment_name(base: u64) -> String {
    format!("{base:020}.seg")
}

/// Base offsets of the segment files in a real directory, sorted.
pub fn segment_bases(dir: &Path) -> Vec<u64> {
    let mut bases: Vec<u64> = std::fs::read_dir(dir)
        .expect("list")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter_map(|n| n.strip_suffix(".seg")?.parse().ok())
        .collect();
    bases.sort_unstable();
    bases
}

/// CRC-32C (Castagnoli), bitwise: reflected polynomial 0x82F63B78; written
/// from the definition, independent of the crate the library uses.
pub fn crc32c(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0x82F6_3B78 } else { crc >> 1 };
        }
    }
    !crc
}
