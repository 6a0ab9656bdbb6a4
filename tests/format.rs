//! On-disk format v1: directories written by walq today must open, unchanged,
//! in every later version.
//!
//! Goal: the committed golden queue in `tests/data/v1/` (several 4 KiB
//! segments, about 200 records with keys, repeated headers, fixed timestamps
//! and values from empty to larger than a segment) opens without cutting or
//! rewriting any segment byte, and reads back exactly the records listed in
//! `tests/data/v1/expected.txt`; and its bytes follow docs/format.md, checked
//! by a decoder written here from the document alone (its own CRC-32C,
//! varints and zigzag), not by walq's code.
//!
//! Method: the normal tests copy the golden directory to a temp dir and work
//! on the copy. The golden set is made by `regenerate_golden_v1`, an ignored
//! test that runs a deterministic workload; run it by hand only when a new
//! format version is introduced (it then belongs in a new `vN` directory,
//! never over `v1`):
//! `cargo test --release --test format -- --ignored regenerate_golden_v1`.

mod common;

use common::crc32c;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use walq::{Queue, Record};

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// Where the golden queue lives in the source tree.
fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/v1")
}

const EXPECTED_FILE: &str = "expected.txt";
const LOCK_FILE: &str = "walq.lock";

// ---------------------------------------------------------------------------
// The expected-records listing.

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// One line of expected.txt: `offset timestamp key headers value`, where key
/// is `-` (none) or `k:<hex>` (so an empty key is `k:`), headers is `-`
/// (none) or comma-separated `<name hex>:<value hex>` pairs in order, and
/// value is `v:<hex>`.
fn line_for(
    offset: u64,
    timestamp_ms: u64,
    key: Option<&[u8]>,
    headers: &[(Vec<u8>, Vec<u8>)],
    value: &[u8],
) -> String {
    let key = key.map_or_else(|| "-".to_string(), |k| format!("k:{}", hex(k)));
    let headers = if headers.is_empty() {
        "-".to_string()
    } else {
        headers.iter().map(|(n, v)| format!("{}:{}", hex(n), hex(v))).collect::<Vec<_>>().join(",")
    };
    format!("{offset} {timestamp_ms} {key} {headers} v:{}", hex(value))
}

const EXPECTED_HEADER: &str = "\
# walq golden queue, format v1: every record, one per line, in offset order.
# offset timestamp_ms key headers value
# key: - (no key) or k:<hex> (k: alone is the empty key)
# headers: - (none) or <name hex>:<value hex>,... in order
# value: v:<hex>
";

/// The record lines of expected.txt (comments skipped).
fn expected_lines(dir: &Path) -> Vec<String> {
    let path = dir.join(EXPECTED_FILE);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!("{}: {e}; the golden set is missing (see regenerate_golden_v1)", path.display())
    });
    text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()).map(str::to_string).collect()
}

// ---------------------------------------------------------------------------
// The deterministic workload.

/// splitmix64.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}

/// One record of the workload.
struct Spec {
    key: Option<Vec<u8>>,
    headers: Vec<(Vec<u8>, Vec<u8>)>,
    value: Vec<u8>,
    timestamp_ms: u64,
}

impl Spec {
    fn record(&self) -> Record<'_> {
        let mut r = Record::new(&self.value).timestamp_ms(self.timestamp_ms);
        if let Some(k) = &self.key {
            r = r.key(k);
        }
        for (n, v) in &self.headers {
            r = r.header(n, v);
        }
        r
    }
}

const GOLDEN_RECORDS: usize = 200;
/// The record that gets a value larger than a segment.
const OVERSIZED_AT: usize = 120;

/// The workload: groups of records, each group one append call (a single
/// `append_record`, or one `append_batch`).
fn workload() -> Vec<Vec<Spec>> {
    const SIZES: [usize; 11] = [0, 1, 2, 7, 8, 30, 50, 100, 127, 128, 300];
    const LARGE: [usize; 3] = [1000, 2000, 3000];
    const NAMES: [&[u8]; 4] = [b"trace", b"content-type", b"", b"trace"];
    let mut rng = Rng(0x5EED_0001);
    let mut groups = Vec::new();
    let mut n = 0;
    while n < GOLDEN_RECORDS {
        let size = if rng.below(10) < 7 { 1 } else { 2 + rng.below(4) as usize };
        let size = size.min(GOLDEN_RECORDS - n);
        let mut group = Vec::new();
        for k in 0..size {
            let i = n + k;
            let len = if i == OVERSIZED_AT {
                6000
            } else if rng.below(15) == 0 {
                LARGE[rng.below(LARGE.len() as u64) as usize]
            } else {
                SIZES[rng.below(SIZES.len() as u64) as usize]
            };
            let key = match rng.below(4) {
                0 => None,
                1 => Some(Vec::new()),
                2 => Some(format!("user-{}", rng.below(10)).into_bytes()),
                _ => {
                    let len = 1 + rng.below(20) as usize;
                    Some(rng.bytes(len))
                }
            };
            let headers = (0..rng.below(4))
                .map(|_| {
                    let name = NAMES[rng.below(NAMES.len() as u64) as usize].to_vec();
                    let len = rng.below(17) as usize;
                    (name, rng.bytes(len))
                })
                .collect();
            let timestamp_ms = match rng.below(20) {
                0 => 0,
                1 => u64::MAX,
                2 => 1_700_000_000_000 - 86_400_000, // a day earlier than its neighbours
                _ => 1_700_000_000_000 + i as u64 * 37,
            };
            group.push(Spec { key, headers, value: rng.bytes(len), timestamp_ms });
        }
        n += size;
        groups.push(group);
    }
    groups
}

/// Writes the golden queue and expected.txt into `dir` (which must not exist).
fn generate(dir: &Path) -> TestResult {
    let queue = Queue::builder(dir).segment_bytes(4096).open()?;
    let mut lines = String::from(EXPECTED_HEADER);
    for group in workload() {
        let records: Vec<Record<'_>> = group.iter().map(Spec::record).collect();
        let range = if let [one] = records.as_slice() {
            let o = queue.append_record(one)?;
            o..o + 1
        } else {
            queue.append_batch(&records)?
        };
        for (offset, spec) in range.zip(&group) {
            lines.push_str(&line_for(
                offset,
                spec.timestamp_ms,
                spec.key.as_deref(),
                &spec.headers,
                &spec.value,
            ));
            lines.push('\n');
        }
    }
    let stats = queue.stats();
    assert_eq!(stats.next_offset, GOLDEN_RECORDS as u64);
    assert!(stats.segments >= 5, "only {} segments", stats.segments);
    queue.close()?;
    // The lock file is not part of the format: each open creates it.
    let lock = dir.join(LOCK_FILE);
    if lock.exists() {
        std::fs::remove_file(lock)?;
    }
    std::fs::write(dir.join(EXPECTED_FILE), lines)?;
    Ok(())
}

#[test]
#[ignore = "writes tests/data/v1 in the source tree; run by hand to make the golden set"]
fn regenerate_golden_v1() -> TestResult {
    let dir = golden_dir();
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    generate(&dir)?;
    println!("wrote {}", dir.display());
    Ok(())
}

// ---------------------------------------------------------------------------
// Helpers.

/// Copies the golden directory's files into a fresh temp dir.
fn golden_copy() -> Result<tempfile::TempDir, Box<dyn std::error::Error>> {
    let src = golden_dir();
    let tmp = tempfile::tempdir()?;
    let mut copied = 0;
    for entry in std::fs::read_dir(&src).map_err(|e| format!("{}: {e}", src.display()))? {
        let entry = entry?;
        let name = entry.file_name();
        if name == EXPECTED_FILE || name == LOCK_FILE {
            continue;
        }
        std::fs::copy(entry.path(), tmp.path().join(&name))?;
        copied += 1;
    }
    assert!(copied > 0, "the golden directory {} is empty", src.display());
    Ok(tmp)
}

/// Files with this extension in `dir`: name → bytes.
fn files_with_ext(dir: &Path, ext: &str) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .expect("list")
        .map(|e| e.expect("entry"))
        .filter(|e| e.path().extension().is_some_and(|x| x == ext))
        .map(|e| (e.file_name().into_string().expect("utf-8"), std::fs::read(e.path()).expect("read")))
        .collect()
}

fn base_of(name: &str) -> u64 {
    let stem = name.split('.').next().expect("a stem");
    assert_eq!(stem.len(), 20, "{name}: not a 20-digit name");
    stem.parse().expect("a numeric stem")
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

// ---------------------------------------------------------------------------
// Tests.

#[test]
fn golden_v1_opens_without_changes_and_reads_back_every_record_exactly() -> TestResult {
    let expected = expected_lines(&golden_dir());
    assert_eq!(expected.len(), GOLDEN_RECORDS);
    let dir = golden_copy()?;
    let segments_before = files_with_ext(dir.path(), "seg");
    let indexes_before = files_with_ext(dir.path(), "idx");
    assert!(segments_before.len() >= 5, "only {} golden segments", segments_before.len());

    let queue = Queue::open(dir.path())?;
    let report = queue.recovery_report().clone();
    assert_eq!(report.bytes_cut, 0, "{report:?}");
    assert_eq!(report.records_cut, 0, "{report:?}");
    assert_eq!(report.cut_at, None, "{report:?}");
    assert_eq!(report.unfinished_segments_removed, 0, "{report:?}");
    assert_eq!(report.temp_files_removed, 0, "{report:?}");
    assert_eq!(report.segments, segments_before.len());
    assert_eq!((report.first_offset, report.next_offset), (0, GOLDEN_RECORDS as u64));
    assert_eq!(queue.next_offset(), GOLDEN_RECORDS as u64);

    let mut got = Vec::new();
    let mut reader = queue.read_from(0)?;
    while let Some(r) = reader.next()? {
        let headers: Vec<(Vec<u8>, Vec<u8>)> = r.headers().map(|(n, v)| (n.to_vec(), v.to_vec())).collect();
        got.push(line_for(r.offset(), r.timestamp_ms(), r.key(), &headers, r.value()));
    }
    drop(reader);
    for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
        assert_eq!(g, e, "record {i} differs");
    }
    assert_eq!(got.len(), expected.len());
    drop(queue);

    let segments_after = files_with_ext(dir.path(), "seg");
    assert_eq!(segments_after.keys().collect::<Vec<_>>(), segments_before.keys().collect::<Vec<_>>());
    for (name, bytes) in &segments_before {
        assert!(segments_after[name] == *bytes, "opening and reading modified {name}");
    }
    // Index files are caches and may be rewritten, but each segment keeps one.
    let indexes_after = files_with_ext(dir.path(), "idx");
    assert_eq!(indexes_after.keys().collect::<Vec<_>>(), indexes_before.keys().collect::<Vec<_>>());
    for name in segments_before.keys() {
        assert!(indexes_after.contains_key(&name.replace(".seg", ".idx")), "{name} lost its index");
    }

    // A v1 directory also takes new appends, and keeps the old records.
    let queue = Queue::open(dir.path())?;
    assert_eq!(queue.append(b"appended by this build")?, GOLDEN_RECORDS as u64);
    drop(queue);
    let queue = Queue::open(dir.path())?;
    let mut reader = queue.read_from(0)?;
    let mut n = 0;
    while let Some(r) = reader.next()? {
        if r.offset() < GOLDEN_RECORDS as u64 {
            let headers: Vec<_> = r.headers().map(|(n, v)| (n.to_vec(), v.to_vec())).collect();
            assert_eq!(line_for(r.offset(), r.timestamp_ms(), r.key(), &headers, r.value()), expected[n]);
        } else {
            assert_eq!(r.value(), b"appended by this build");
        }
        n += 1;
    }
    assert_eq!(n, GOLDEN_RECORDS + 1);
    Ok(())
}

#[test]
fn golden_v1_segments_start_with_the_documented_magics() -> TestResult {
    let segments = files_with_ext(&golden_dir(), "seg");
    assert!(!segments.is_empty(), "no golden segments");
    for (name, b) in &segments {
        let base = base_of(name);
        assert!(b.len() >= 32 + 48, "{name} is too short");
        assert_eq!(&b[0..8], b"WALQSEG\0", "{name}: segment magic");
        assert_eq!(u32_at(b, 8), 1, "{name}: segment format version");
        assert_eq!(u32_at(b, 12), 0, "{name}: flags");
        assert_eq!(u64_at(b, 16), base, "{name}: base offset");
        assert_eq!(u32_at(b, 24), 0, "{name}: reserved");
        assert_eq!(u32_at(b, 28), crc32c(&b[0..28]), "{name}: header CRC-32C");
        // The first batch starts right after the 32-byte header; its magic is at 8.
        assert_eq!(&b[32 + 8..32 + 12], b"WLQB", "{name}: first batch magic");
        assert_eq!(b[32 + 12], 1, "{name}: first batch version");
        assert_eq!(u64_at(b, 32 + 16), base, "{name}: first batch base offset");
    }
    for (name, b) in files_with_ext(&golden_dir(), "idx") {
        assert_eq!(&b[0..4], b"WLQI", "{name}: index magic");
        assert_eq!(u32_at(&b, 4), 1, "{name}: index version");
        assert_eq!(u64_at(&b, 8), base_of(&name), "{name}: index base offset");
    }
    Ok(())
}

/// A LEB128 varint as docs/format.md defines it: at most 10 bytes, canonical.
fn varint(b: &[u8], pos: &mut usize) -> u64 {
    let mut v = 0u64;
    for i in 0..10 {
        let byte = b[*pos];
        *pos += 1;
        assert!(i < 9 || byte <= 1, "10th varint byte above 1");
        v |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            assert!(i == 0 || byte != 0, "overlong varint");
            return v;
        }
    }
    panic!("varint longer than 10 bytes");
}

fn take<'a>(b: &'a [u8], pos: &mut usize, len: u64) -> &'a [u8] {
    let len = usize::try_from(len).expect("length fits");
    let out = &b[*pos..*pos + len];
    *pos += len;
    out
}

#[test]
fn golden_v1_bytes_decode_as_docs_format_md_describes() -> TestResult {
    let expected = expected_lines(&golden_dir());
    let mut lines = Vec::new();
    let mut next_offset = 0u64;
    let mut batches = 0;
    let mut multi_record_batches = 0;
    for (name, b) in files_with_ext(&golden_dir(), "seg") {
        assert_eq!(base_of(&name), next_offset, "{name}: segments are not contiguous");
        let mut pos = 32;
        while pos + 48 <= b.len() && !(u32_at(&b, pos) == 0 && u32_at(&b, pos + 4) == 0) {
            let at = |f: &str| format!("{name} batch at {pos}: {f}");
            let length = u32_at(&b, pos) as usize;
            assert!(length >= 48 && length.is_multiple_of(8) && pos + length <= b.len(), "{}", at("length"));
            let batch = &b[pos..pos + length];
            assert_eq!(u32_at(batch, 4), crc32c(&batch[8..]), "{}", at("crc over [8, length)"));
            assert_eq!(&batch[8..12], b"WLQB", "{}", at("magic"));
            assert_eq!(
                (batch[12], batch[13], u16::from_le_bytes([batch[14], batch[15]])),
                (1, 0, 0),
                "{}",
                at("version, flags, reserved")
            );
            let base_offset = u64_at(batch, 16);
            let base_timestamp = u64_at(batch, 24);
            let record_count = u32_at(batch, 32);
            let records_len = u32_at(batch, 36) as usize;
            let durable_position = u64_at(batch, 40);
            assert_eq!(base_offset, next_offset, "{}", at("base_offset"));
            assert!(record_count >= 1, "{}", at("record_count"));
            assert_eq!(length, (48 + records_len).div_ceil(8) * 8, "{}", at("padding rule"));
            assert!(batch[48 + records_len..].iter().all(|&x| x == 0), "{}", at("non-zero padding"));
            // Every golden append was synced before the next was written, so
            // each batch says its segment was durable up to its own start.
            assert_eq!(durable_position, pos as u64, "{}", at("durable_position"));

            let records = &batch[48..48 + records_len];
            let mut p = 0;
            for index in 0..u64::from(record_count) {
                let body_len = varint(records, &mut p);
                let body_end = p + usize::try_from(body_len)?;
                assert_eq!(varint(records, &mut p), index, "{}", at("offset_delta"));
                let zz = varint(records, &mut p);
                let delta = ((zz >> 1) as i64) ^ -((zz & 1) as i64);
                let timestamp = base_timestamp.wrapping_add(delta as u64);
                if index == 0 {
                    assert_eq!(delta, 0, "{}", at("first timestamp delta"));
                }
                let key = match varint(records, &mut p) {
                    0 => None,
                    n => Some(take(records, &mut p, n - 1)),
                };
                let header_count = varint(records, &mut p);
                let mut headers = Vec::new();
                for _ in 0..header_count {
                    let n = varint(records, &mut p);
                    let name = take(records, &mut p, n).to_vec();
                    let n = varint(records, &mut p);
                    headers.push((name, take(records, &mut p, n).to_vec()));
                }
                let n = varint(records, &mut p);
                let value = take(records, &mut p, n);
                assert_eq!(p, body_end, "{}", at("record body length"));
                lines.push(line_for(base_offset + index, timestamp, key, &headers, value));
            }
            assert_eq!(p, records_len, "{}", at("records_len"));
            next_offset = base_offset + u64::from(record_count);
            batches += 1;
            multi_record_batches += usize::from(record_count > 1);
            pos += length;
        }
        assert!(b[pos..].iter().all(|&x| x == 0), "{name}: bytes after the last batch are not zeros");
    }
    assert!(batches > 0 && multi_record_batches > 0, "the golden set lacks batches of several records");
    assert_eq!(lines.len(), expected.len());
    for (i, (got, want)) in lines.iter().zip(&expected).enumerate() {
        assert_eq!(got, want, "record {i}: the bytes disagree with expected.txt");
    }
    Ok(())
}

#[test]
fn golden_v1_covers_what_it_claims_to() {
    // Guards the golden set against a weaker regeneration: the cases the
    // module doc promises are in it.
    let lines = expected_lines(&golden_dir());
    let fields: Vec<Vec<&str>> = lines.iter().map(|l| l.split(' ').collect()).collect();
    assert!(fields.iter().all(|f| f.len() == 5));
    assert!(fields.iter().any(|f| f[2] == "-"), "no record without a key");
    assert!(fields.iter().any(|f| f[2] == "k:"), "no record with an empty key");
    assert!(fields.iter().any(|f| f[4] == "v:"), "no empty value");
    assert!(fields.iter().any(|f| f[4].len() > 2 + 2 * 4096), "no value larger than a segment");
    assert!(fields.iter().any(|f| f[1] == "0") && fields.iter().any(|f| f[1] == u64::MAX.to_string()));
    let repeated = fields.iter().any(|f| {
        let names: Vec<&str> = f[3].split(',').filter_map(|h| h.split(':').next()).collect();
        (1..names.len()).any(|i| names[..i].contains(&names[i]))
    });
    assert!(repeated, "no record with a repeated header name");
}

#[test]
fn crc32c_helper_matches_the_standard_check_value() {
    assert_eq!(crc32c(b"123456789"), 0xE306_9283);
}
