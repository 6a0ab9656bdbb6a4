//! The only `unsafe` in walq: [`Map`], a read-only view of the first `len`
//! bytes of a file — a real memory map, an owned snapshot (the simulated
//! disk), or empty. Invariant: a `Map` exposes only bytes that existed in its
//! file when it was made (or when it was [grown](Map::grown)), and those bytes
//! never change while it lives.
//!
//! # Why mapping is sound
//!
//! `memmap2` marks mapping unsafe because Rust assumes a `&[u8]` never changes
//! and stays readable, while another writer could rewrite or truncate the file
//! under the map (changed bytes, or SIGBUS). walq rules both out:
//!
//! - it maps only files it owns, in a queue directory it holds locked
//!   (`fs::Storage::lock_dir`), so no other walq instance writes them;
//! - files are append-only: bytes below the published watermark are never
//!   written again, and a map never exposes bytes past that watermark (the
//!   page holding the last exposed byte may still change, but only beyond
//!   `len`, which the slice never exposes);
//! - mapped files are never truncated: recovery cuts a torn tail before any
//!   map exists, and retention unlinks whole files, which stay readable
//!   through the maps that already exist;
//! - editing or truncating segment files from outside while walq has them
//!   mapped is out of scope, and the README says so.
//!
//! One gap is known and kept: a `Reader` (and a `RecordRef` it lent) may
//! outlive its queue, and the directory lock goes with the queue, its
//! consumers and groups, so that closing a queue and opening it again while
//! a reader is still in scope works (the quickstart does it). Should that
//! second opening, in the same process, find damage in records the old reader
//! had already read and cut the file there, reading those records again
//! through the old reader would touch pages past the new end of the file
//! (SIGBUS). A clean or crashed close never leads there: recovery cuts only
//! bytes no reader was shown (torn or never published).
//!
//! # Mapped ahead, exposed behind
//!
//! A real map covers the whole file as it is when mapped (an active segment's
//! written data plus the zeroed space preallocated ahead of it) but exposes
//! only `len` bytes. Growing the exposed part as the writer publishes more
//! ([`Map::grown`]) is then a new view of the same mapping: no `open`, `mmap`
//! or `munmap` per record for a reader at the tail. The bytes past `len` may
//! still be written while mapped; no reference to them exists until a later
//! view exposes them, and by then they are written and never change again.
//! They are only read through the raw pointer of a `memmap2::MmapRaw`, never
//! through a slice over the whole mapping.

use std::fmt;
use std::fs::File;
use std::io;
use std::ops::Deref;
use std::sync::Arc;

/// A read-only view of the first `len` bytes of a file: a real mmap, an owned
/// snapshot (simulated storage), or empty.
pub(crate) struct Map {
    bytes: Bytes,
}

enum Bytes {
    /// Mapping zero bytes is an error for mmap(2), and needs no syscall anyway.
    Empty,
    /// The whole file as it was when mapped; the first `len` bytes exposed.
    Mapped {
        raw: Arc<memmap2::MmapRaw>,
        len: usize,
    },
    Owned(Vec<u8>),
}

impl Map {
    /// Maps `file` read-only, exposing its first `len` bytes; `len == 0`
    /// gives an empty map without calling mmap. The mapping covers the whole
    /// file as it is now, so that [`Map::grown`] can expose more of it later.
    /// Fails with `InvalidInput` when `len` exceeds the file's current length:
    /// touching a page past the end of the file would kill the process with
    /// SIGBUS.
    pub(crate) fn map_file(file: &File, len: usize) -> io::Result<Map> {
        if len == 0 {
            return Ok(Map { bytes: Bytes::Empty });
        }
        let file_len = file.metadata()?.len();
        let capacity = usize::try_from(file_len).unwrap_or(usize::MAX);
        if len > capacity {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("cannot map {len} bytes of a file of {file_len} bytes"),
            ));
        }
        // A raw mapping is only an address range (safe to make); it covers
        // [0, capacity), which lies within the file (its length was just
        // read, and walq never truncates a file it maps, per the module
        // docs). `deref` exposes only [0, len) of it.
        let raw = memmap2::MmapOptions::new().len(capacity).map_raw_read_only(file)?;
        Ok(Map { bytes: Bytes::Mapped { raw: Arc::new(raw), len } })
    }

    /// The same mapping exposing its first `len` bytes, if the mapping
    /// covers them (an owned snapshot or an empty map never grows: the
    /// caller maps afresh). The caller guarantees that those bytes are
    /// written and never change again (below the writer's published length).
    pub(crate) fn grown(&self, len: usize) -> Option<Map> {
        match &self.bytes {
            Bytes::Mapped { raw, len: now } if len >= *now && len <= raw.len() => {
                Some(Map { bytes: Bytes::Mapped { raw: Arc::clone(raw), len } })
            }
            _ => None,
        }
    }

    /// A map over bytes the caller already owns; the simulated disk hands out
    /// snapshots like this, so readers cannot tell the two apart.
    pub(crate) fn from_vec(bytes: Vec<u8>) -> Map {
        Map { bytes: Bytes::Owned(bytes) }
    }

    /// Number of bytes visible through the map.
    pub(crate) fn len(&self) -> usize {
        self.deref().len()
    }
}

impl Deref for Map {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match &self.bytes {
            Bytes::Empty => &[],
            // SAFETY: `raw` maps at least `len` readable bytes (`len` is
            // checked against the mapping's length when a view is made), the
            // mapping lives as long as this view (the `Arc`), and per the
            // module docs the bytes [0, len) were written before this view
            // existed and are never written nor truncated while it lives.
            Bytes::Mapped { raw, len } => unsafe { std::slice::from_raw_parts(raw.as_ptr(), *len) },
            Bytes::Owned(bytes) => bytes,
        }
    }
}

impl fmt::Debug for Map {
    // The bytes are a whole segment: printing them would flood any log.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Map").field("len", &self.len()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn map_file_sees_the_prefix_and_refuses_past_eof() -> io::Result<()> {
        let mut file = tempfile::tempfile()?;
        file.write_all(b"hello, map")?;
        let map = Map::map_file(&file, 5)?;
        assert_eq!(&*map, b"hello");
        assert_eq!(map.len(), 5);
        assert_eq!(format!("{map:?}"), "Map { len: 5 }");
        let err = Map::map_file(&file, 11).expect_err("past EOF");
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert_eq!(Map::map_file(&file, 10)?.len(), 10);
        Ok(())
    }

    #[test]
    fn grown_views_share_the_mapping_and_see_later_writes() -> io::Result<()> {
        let mut file = tempfile::tempfile()?;
        // Written data, then zeros preallocated ahead of it.
        file.write_all(b"0123\0\0\0\0\0\0")?;
        let map = Map::map_file(&file, 4)?;
        assert_eq!(&*map, b"0123");
        // The writer fills the zeros after the map was made; a wider view sees them.
        std::os::unix::fs::FileExt::write_all_at(&file, b"abc", 4)?;
        let grown = map.grown(7).expect("within the mapping");
        assert_eq!(&*grown, b"0123abc");
        assert_eq!(grown.as_ptr(), map.as_ptr(), "the same mapping");
        assert_eq!(&*map, b"0123", "the old view is unchanged");
        assert!(map.grown(10).is_some(), "the whole file is mapped");
        assert!(map.grown(11).is_none(), "never past the end of the file as mapped");
        assert!(grown.grown(5).is_none(), "a view never shrinks");
        Ok(())
    }

    #[test]
    fn empty_and_owned_maps() -> io::Result<()> {
        let file = tempfile::tempfile()?;
        let empty = Map::map_file(&file, 0)?;
        assert!(empty.is_empty());
        let owned = Map::from_vec(vec![1, 2, 3]);
        assert_eq!(&*owned, &[1, 2, 3]);
        // Snapshots and empty maps never grow: the caller maps afresh.
        assert!(owned.grown(3).is_none());
        assert!(empty.grown(0).is_none());
        Ok(())
    }

    #[test]
    fn map_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Map>();
    }
}
