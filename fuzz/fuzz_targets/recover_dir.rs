//! Recovers an arbitrarily damaged queue directory: a small valid queue is
//! built on the simulated disk, the input drives edits to its files (bit
//! flips, overwritten bytes, truncations, removals, foreign files), then the
//! queue is opened and read to the end. Nothing may panic; an open that
//! succeeds must succeed again with the same next offset (recovery is
//! idempotent) and every offset below it must read as a record or as a
//! typed error.
#![no_main]

use std::path::{Path, PathBuf};

use libfuzzer_sys::fuzz_target;
use walq::{Durability, Queue, Record, SimDisk};

const DIR: &str = "/q";

fn build(disk: &SimDisk) {
    let q = Queue::builder(DIR).simulated(disk).segment_bytes(4096).preallocate_bytes(1024).open().unwrap();
    for i in 0..40u32 {
        let v = vec![(i % 251) as u8; 20 + (i as usize * 37) % 300];
        if i % 7 == 0 {
            q.append_batch(&[Record::new(&v).key(b"k"), Record::new(b"x").header(b"h", b"v")]).unwrap();
        } else if i % 3 == 0 {
            q.append_with(&v, Durability::Os).unwrap();
        } else {
            q.append(&v).unwrap();
        }
    }
    q.close().unwrap();
}

fn read_everything(q: &Queue) {
    let Ok(mut r) = q.read_from(q.first_offset()) else { return };
    loop {
        match r.next() {
            Ok(Some(rec)) => {
                let _ = (rec.key(), rec.value().len(), rec.headers().count());
            }
            Ok(None) => return,
            Err(_) => {
                // Skip past a damaged record and keep going, as a tool would.
                let next = r.position() + 1;
                if next >= q.next_offset() {
                    return;
                }
                r.seek(next);
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let disk = SimDisk::new(1);
    build(&disk);
    let files: Vec<PathBuf> = disk.files();
    let mut ops = data.chunks_exact(6);
    for op in &mut ops {
        let file = &files[op[1] as usize % files.len()];
        let len = disk.read_file(file).map_or(0, |b| b.len()) as u64;
        let at = u32::from_le_bytes([op[2], op[3], op[4], 0]) as u64 % len.max(1);
        match op[0] % 6 {
            0 | 1 if len > 0 => disk.flip_bit(file, at, op[5] % 8),
            2 if len > 0 => {
                let mut bytes = disk.read_file(file).unwrap_or_default();
                bytes[at as usize] = op[5];
                disk.write_file(file, &bytes);
            }
            3 if len > 0 => disk.truncate_file(file, at),
            4 if disk.read_file(file).is_some() => disk.remove(file),
            5 => disk.write_file(&Path::new(DIR).join(format!("{:020}.seg", op[5] as u64 * 50)), &op[2..]),
            _ => {}
        }
    }
    let first = Queue::builder(DIR).simulated(&disk).segment_bytes(4096).open();
    if let Ok(q) = first {
        let next = q.next_offset();
        read_everything(&q);
        drop(q);
        let again = Queue::builder(DIR).simulated(&disk).segment_bytes(4096).open();
        let again = again.unwrap_or_else(|e| panic!("the second open failed after the first succeeded: {e}"));
        assert_eq!(again.next_offset(), next, "recovery is not idempotent");
        read_everything(&again);
    }
});
