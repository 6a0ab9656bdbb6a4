//! The only `unsafe` in walq: [`Map`], a read-only view of the first `len`
//! bytes of a file — a real memory map, an owned snapshot (the simulated
//! disk), or empty. Invariant: a `Map` never covers bytes past the end of its
//! file at the moment it is made, and those bytes never change while it lives.
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
//!   written again, and a map never reaches past that watermark (the page
//!   holding the last mapped byte may still change, but only beyond `len`,
//!   which the slice never exposes);
//! - mapped files are never truncated: recovery cuts a torn tail before any
//!   map exists, and retention unlinks whole files, which stay readable
//!   through the maps that already exist;
//! - editing or truncating segment files from outside while walq has them
//!   mapped is out of scope, and the README says so.

use std::fmt;
use std::fs::File;
use std::io;
use std::ops::Deref;

/// A read-only view of the first `len` bytes of a file: a real mmap, an owned
/// snapshot (simulated storage), or empty.
pub(crate) struct Map {
    bytes: Bytes,
}

enum Bytes {
    /// Mapping zero bytes is an error for mmap(2), and needs no syscall anyway.
    Empty,
    Mapped(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Map {
    /// Maps the first `len` bytes of `file` read-only; `len == 0` gives an
    /// empty map without calling mmap. Fails with `InvalidInput` when `len`
    /// exceeds the file's current length: touching a page past the end of
    /// the file would kill the process with SIGBUS.
    pub(crate) fn map_file(file: &File, len: usize) -> io::Result<Map> {
        if len == 0 {
            return Ok(Map { bytes: Bytes::Empty });
        }
        let file_len = file.metadata()?.len();
        if u64::try_from(len).map_or(true, |len| len > file_len) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("cannot map {len} bytes of a file of {file_len} bytes"),
            ));
        }
        // SAFETY: per the module docs, the file is owned by this locked queue
        // directory, the mapped range [0, len) lies within the file (checked
        // above) and is never rewritten nor truncated while the map lives.
        let map = unsafe { memmap2::MmapOptions::new().len(len).map(file)? };
        Ok(Map { bytes: Bytes::Mapped(map) })
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
            Bytes::Mapped(map) => map,
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
    fn empty_and_owned_maps() -> io::Result<()> {
        let file = tempfile::tempfile()?;
        let empty = Map::map_file(&file, 0)?;
        assert!(empty.is_empty());
        let owned = Map::from_vec(vec![1, 2, 3]);
        assert_eq!(&*owned, &[1, 2, 3]);
        Ok(())
    }

    #[test]
    fn map_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Map>();
    }
}
