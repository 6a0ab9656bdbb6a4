//! Heap memory does not grow with the log: opening costs a fixed amount plus
//! a few hundred bytes of metadata per segment file, and reading the whole log
//! holds no more heap for a large log than for a small one (maps are not heap,
//! and at most `CACHED_MAPS_MAX` sealed segments stay mapped between readers).
//!
//! Method: a counting global allocator; the same measurements on a log of 30
//! and of 600 segments. One test in this binary, so nothing else allocates
//! concurrently.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

use walq::{Durability, Queue};

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);
static PEAK: AtomicIsize = AtomicIsize::new(0);

#[allow(unsafe_code)]
// SAFETY: the test's own allocator (not the library's): it forwards every call
// to the system allocator unchanged and only counts bytes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let now = LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed) + layout.size() as isize;
        PEAK.fetch_max(now, Ordering::Relaxed);
        // SAFETY: same layout contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: `ptr` came from `alloc` above with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Writes a log of about `segments` 4 KiB segments into `dir`.
fn build(dir: &std::path::Path, segments: usize) {
    let q = Queue::builder(dir)
        .segment_bytes(4096)
        .preallocate_bytes(0)
        .write_buffer_bytes(1024)
        .durability(Durability::Os)
        .open()
        .unwrap();
    let v = vec![5u8; 200];
    while q.stats().segments < segments {
        q.append(&v).unwrap();
    }
    q.close().unwrap();
}

/// (heap held by an open queue, peak extra heap while reading every record).
fn measure(dir: &std::path::Path) -> (isize, isize) {
    let before = LIVE.load(Ordering::Relaxed);
    let q = Queue::builder(dir).segment_bytes(4096).preallocate_bytes(0).open().unwrap();
    let held = LIVE.load(Ordering::Relaxed) - before;
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let mut reader = q.read_from(0).unwrap();
    let mut n = 0u64;
    while let Some(r) = reader.next().unwrap() {
        n += r.value().len() as u64;
    }
    assert!(n > 0);
    let peak = PEAK.load(Ordering::Relaxed) - base;
    drop(reader);
    drop(q);
    (held, peak)
}

#[test]
fn heap_memory_does_not_grow_with_the_log() {
    let small = tempfile::tempdir().unwrap();
    let large = tempfile::tempdir().unwrap();
    build(small.path(), 30);
    build(large.path(), 600);
    let (held_small, peak_small) = measure(small.path());
    let (held_large, peak_large) = measure(large.path());
    let per_segment = (held_large - held_small) / 570;
    eprintln!(
        "open: {held_small} B for 30 segments, {held_large} B for 600 ({per_segment} B per segment); \
         reading everything: peak +{peak_small} B vs +{peak_large} B"
    );
    assert!(per_segment <= 512, "{per_segment} bytes of heap per segment");
    // The scan of the large log may cache at most CACHED_MAPS_MAX segment maps,
    // like the small one: its peak is bounded, not proportional.
    assert!(peak_large <= peak_small + 64 * 1024, "scan heap grew: {peak_small} -> {peak_large}");
}
