//! The storage seam: every file and directory operation of walq goes through
//! [`Storage`], implemented by the real file system ([`RealFs`], Unix only)
//! and by [`SimDisk`], a simulated disk that loses, tears and corrupts what was
//! not synced, the ways a power cut may.
//! Invariant: nothing outside this module touches a file or a directory.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::mmap::Map;

/// Name of the lock file that [`Storage::lock_dir`] keeps in a queue directory.
pub(crate) const LOCK_FILE: &str = "walq.lock";

/// Every file and directory operation walq performs; tests swap in [`SimDisk`].
pub(crate) trait Storage: Send + Sync + fmt::Debug + 'static {
    /// Creates `dir` and its missing parents.
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// File names (not paths) in `dir`, unsorted; NotFound if the directory is missing.
    fn list_dir(&self, dir: &Path) -> io::Result<Vec<String>>;
    /// Opens read-write; creates (empty) when `create` and missing (NotFound otherwise).
    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<dyn StorageFile>>;
    /// Opens read-only; NotFound if missing.
    fn open_read(&self, path: &Path) -> io::Result<Arc<dyn StorageFile>>;
    /// Unlinks a file; open handles and maps of it stay readable.
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    /// Renames atomically, replacing `to` if it exists.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Makes the creations, removals and renames of entries in `dir` durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    /// Takes the exclusive lock of a queue directory (a `walq.lock` file
    /// inside it, created if missing). Ok(None) when another holder has it —
    /// another process OR another open in this process. The lock is released
    /// when the returned guard drops, and by the kernel when a process dies.
    fn lock_dir(&self, dir: &Path) -> io::Result<Option<Box<dyn DirLock>>>;
}

/// Holds a queue directory's lock until dropped.
pub(crate) trait DirLock: Send + Sync + fmt::Debug {}

/// An open file: positioned I/O only, so one handle serves many threads.
pub(crate) trait StorageFile: Send + Sync + fmt::Debug {
    /// pread: reads at `pos`; may be short; 0 at EOF.
    fn read_at(&self, buf: &mut [u8], pos: u64) -> io::Result<usize>;
    /// pwrite: writes at `pos`; may be short.
    fn write_at(&self, buf: &[u8], pos: u64) -> io::Result<usize>;
    /// fdatasync: on success every byte written so far survives a power cut.
    fn sync_data(&self) -> io::Result<()>;
    /// Current length in bytes (synced or not).
    fn len(&self) -> io::Result<u64>;
    /// Truncates or extends (with zeros) to `len`.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Read-only view of bytes [0, len); len must be <= the file's length
    /// (error InvalidInput otherwise, never a map past EOF).
    fn map(&self, len: usize) -> io::Result<Map>;
}

/// Loops over short reads; UnexpectedEof if the file ends first. Retries Interrupted.
pub(crate) fn read_exact_at(f: &dyn StorageFile, mut buf: &mut [u8], mut pos: u64) -> io::Result<()> {
    while !buf.is_empty() {
        match f.read_at(buf, pos) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("file ended at {pos} with {} bytes still to read", buf.len()),
                ));
            }
            Ok(n) => {
                let rest = buf;
                buf = &mut rest[n..];
                pos += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Loops over short writes (a write of 0 bytes is an error WriteZero). Retries Interrupted.
pub(crate) fn write_all_at(f: &dyn StorageFile, mut buf: &[u8], mut pos: u64) -> io::Result<()> {
    while !buf.is_empty() {
        match f.write_at(buf, pos) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    format!("wrote 0 bytes at {pos} with {} still to write", buf.len()),
                ));
            }
            Ok(n) => {
                buf = &buf[n..];
                pos += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

// Linux errno values (the same on the BSDs and macOS). Errors carry them as
// raw OS errors so that callers classify them with `raw_os_error()`, exactly
// as they classify the real ones.
const EBADF: i32 = 9;
const EISDIR: i32 = 21;
const EFBIG: i32 = 27;
const ENOSPC: i32 = 28;
const EROFS: i32 = 30;
const EMFILE: i32 = 24;
const EIO: i32 = 5;

// ---------------------------------------------------------------------------
// The real file system.

/// The real file system through `std::fs`. Unix only: positioned I/O comes
/// from `std::os::unix::fs::FileExt`, and directories are fsynced by opening
/// them, which Windows does not allow.
#[cfg(unix)]
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct RealFs;

#[cfg(unix)]
struct RealFile {
    file: std::fs::File,
    path: PathBuf,
}

#[cfg(unix)]
impl fmt::Debug for RealFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RealFile").field("path", &self.path).finish()
    }
}

/// Holds the open lock file: `flock` locks belong to the open file, so
/// closing it (drop, or the kernel at process death) releases the lock.
#[cfg(unix)]
struct RealLock {
    _file: std::fs::File,
    path: PathBuf,
}

#[cfg(unix)]
impl fmt::Debug for RealLock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RealLock").field("path", &self.path).finish()
    }
}

#[cfg(unix)]
impl DirLock for RealLock {}

#[cfg(unix)]
impl Storage for RealFs {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        std::fs::create_dir_all(dir)
    }

    fn list_dir(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let name = entry?.file_name();
            match name.into_string() {
                Ok(name) => names.push(name),
                // walq names all its files in ASCII, so this one is foreign.
                Err(name) => tracing::debug!(dir = %dir.display(), ?name, "skipping non-UTF-8 file name"),
            }
        }
        Ok(names)
    }

    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<dyn StorageFile>> {
        let file = std::fs::OpenOptions::new().read(true).write(true).create(create).open(path)?;
        Ok(Arc::new(RealFile { file, path: path.to_path_buf() }))
    }

    fn open_read(&self, path: &Path) -> io::Result<Arc<dyn StorageFile>> {
        let file = std::fs::File::open(path)?;
        Ok(Arc::new(RealFile { file, path: path.to_path_buf() }))
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        std::fs::File::open(dir)?.sync_all()
    }

    fn lock_dir(&self, dir: &Path) -> io::Result<Option<Box<dyn DirLock>>> {
        let path = dir.join(LOCK_FILE);
        let file =
            std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path)?;
        match file.try_lock() {
            Ok(()) => Ok(Some(Box::new(RealLock { _file: file, path }))),
            Err(std::fs::TryLockError::WouldBlock) => Ok(None),
            Err(std::fs::TryLockError::Error(e)) => Err(e),
        }
    }
}

#[cfg(unix)]
impl StorageFile for RealFile {
    fn read_at(&self, buf: &mut [u8], pos: u64) -> io::Result<usize> {
        std::os::unix::fs::FileExt::read_at(&self.file, buf, pos)
    }

    fn write_at(&self, buf: &[u8], pos: u64) -> io::Result<usize> {
        std::os::unix::fs::FileExt::write_at(&self.file, buf, pos)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    fn map(&self, len: usize) -> io::Result<Map> {
        // Unwrapped, so that `raw_os_error()` still works; callers add the path.
        Map::map_file(&self.file, len)
    }
}

// ---------------------------------------------------------------------------
// The simulated disk.

/// Torn writes break at multiples of this; 4 KiB tears are among them.
const SECTOR_BYTES: usize = 512;

/// Simulated files live in memory; a write past this fails with EFBIG, so a
/// wild offset shows up as an error instead of a huge allocation.
const SIM_FILE_BYTES_MAX: u64 = 1 << 30;

/// Which part of one file's unsynced operations survives a simulated power cut.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    /// Only the durable content.
    LoseAll,
    /// Everything, as if the cut came right after a sync.
    KeepAll,
    /// The operations up to a random one, which is cut at a sector boundary.
    TornPrefix,
    /// A random subset, so that later writes land while earlier ones do not.
    Subset,
    /// The size changes land but the data does not: new bytes read as zeros.
    ZerosGrown,
    /// The size changes land and some written sectors hold random bytes.
    Garbage,
}

const OUTCOMES: [Outcome; 6] = [
    Outcome::LoseAll,
    Outcome::KeepAll,
    Outcome::TornPrefix,
    Outcome::Subset,
    Outcome::ZerosGrown,
    Outcome::Garbage,
];

impl Outcome {
    fn name(self) -> &'static str {
        match self {
            Outcome::LoseAll => "crash:lose_all",
            Outcome::KeepAll => "crash:keep_all",
            Outcome::TornPrefix => "crash:torn",
            Outcome::Subset => "crash:subset",
            Outcome::ZerosGrown => "crash:zeros",
            Outcome::Garbage => "crash:garbage",
        }
    }
}

/// Names of the [`SimDisk::fault_counts`] keys for directory entries at a crash.
const DIR_OP_KEPT: &str = "crash:dir_op_kept";
const DIR_OP_LOST: &str = "crash:dir_op_lost";

/// A file system call that [`SimDisk::inject`] can make fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum FaultOp {
    /// `write_at` on a file.
    Write,
    /// `sync_data` on a file.
    Sync,
    /// Syncing a directory.
    SyncDir,
    /// Any open of a file, read-only or not, including the lock file.
    Open,
    /// An open that would create a missing file (it also counts as an `Open`).
    Create,
    /// Renaming; `path_contains` matches either name.
    Rename,
    /// Removing a file.
    Remove,
    /// Truncating or extending a file.
    SetLen,
    /// `read_at` on a file. Maps are snapshots and never fail.
    Read,
}

/// How an injected fault fails its call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum FaultKind {
    /// EIO (raw OS error 5); the call has no effect. Any operation.
    Eio,
    /// ENOSPC (raw OS error 28); the call has no effect. Any operation.
    NoSpace,
    /// `write_at` writes at least one byte but not all of them and returns
    /// `Ok(n)`. [`FaultOp::Write`] only; writes of fewer than 2 bytes cannot
    /// be short, so they pass without counting toward `nth`.
    ShortWrite,
    /// `sync_data` returns EIO *and* the file's unsynced writes are dropped
    /// from the page cache (reads return the last durable content), so that a
    /// retried sync reports success without the data: Linux's "fsyncgate".
    /// [`FaultOp::Sync`] only.
    SyncFailDropPages,
    /// EROFS (raw OS error 30); the call has no effect. Any operation.
    ReadOnly,
    /// EMFILE (raw OS error 24): the process has too many open files; the
    /// call has no effect. Meant for [`FaultOp::Open`] and [`FaultOp::Create`].
    TooManyFiles,
}

/// One fault for [`SimDisk::inject`]: the `nth` next call of kind `op`
/// (optionally only on paths containing `path_contains`) fails as `kind`.
/// Faults are one-shot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fault {
    /// Which calls the fault watches.
    pub op: FaultOp,
    /// Which matching call fails: 1 is the next one.
    pub nth: u64,
    /// What the failing call does.
    pub kind: FaultKind,
    /// Only calls on a path whose text contains this match (for files, the
    /// path the handle was opened with).
    pub path_contains: Option<String>,
}

impl Fault {
    /// The next call of kind `op`, on any path, fails as `kind`.
    pub fn new(op: FaultOp, kind: FaultKind) -> Fault {
        Fault { op, nth: 1, kind, path_contains: None }
    }
}

/// A simulated disk for crash and fault testing: it fails the ways real disks
/// and file systems do, deterministically for a given seed.
///
/// Files live in memory and keep two images: the *durable* content, which
/// survives a power cut, and the *current* content (the page cache), which
/// reads see, plus the ordered list of writes and size changes made since the
/// file was last synced. Directory entries (create, remove, rename) become
/// durable only when their directory is synced. Then:
///
/// - [`crash`](SimDisk::crash) cuts the power: for each file, a seeded random
///   choice keeps none, all, a torn prefix, or a random subset of the unsynced
///   operations, or keeps the new sizes with zeros or garbage in place of the
///   data; each unsynced directory entry is kept or lost independently (a
///   rename is atomic: the new or the old name, never both);
/// - [`crash_keep_all`](SimDisk::crash_keep_all) kills the process: the page
///   cache survives; [`crash_lose_unsynced`](SimDisk::crash_lose_unsynced)
///   keeps exactly what was synced;
/// - [`halt_after`](SimDisk::halt_after) makes every call fail from a chosen
///   point on, to stop a workload between any two storage calls;
/// - [`inject`](SimDisk::inject) makes one chosen call fail (EIO, ENOSPC,
///   EROFS, a short write, or a failed sync that drops the dirty pages).
///
/// After any crash, every handle opened before it fails and every directory
/// lock is released, so the test reopens the queue as a restarted process
/// would. Everything is deterministic for a given seed and call sequence.
/// Simplifications: directories are durable as soon as they are created, and
/// a write never damages bytes that were already durable ("power-safe
/// overwrite"), even in a sector it shares with them.
///
/// Cloning is cheap; all clones are the same disk.
///
/// ```
/// use walq::{Queue, SimDisk};
///
/// /// Appends five `Sync` records on `disk` (paths on a `SimDisk` are just
/// /// keys); returns how many were acknowledged before a call failed.
/// fn run_workload(disk: &SimDisk) -> u64 {
///     let Ok(queue) = Queue::builder("/q").simulated(disk).open() else { return 0 };
///     (0..5u8).take_while(|&i| queue.append(&[i; 100]).is_ok()).count() as u64
/// }
///
/// // Count the storage calls of the workload, then stop it after each one in
/// // turn, cut the power and check what recovery finds.
/// let calls = {
///     let disk = SimDisk::new(7);
///     assert_eq!(run_workload(&disk), 5);
///     disk.ops()
/// };
/// for k in 0..=calls {
///     let disk = SimDisk::new(k);
///     disk.halt_after(k);
///     let acked = run_workload(&disk);
///     disk.crash();
///     let queue = Queue::builder("/q").simulated(&disk).open()?;
///     assert!(queue.next_offset() >= acked, "seed {k}: an acknowledged record was lost");
///     let mut reader = queue.read_from(0)?;
///     for i in 0..acked {
///         assert_eq!(reader.next()?.map(|r| r.value().to_vec()), Some(vec![i as u8; 100]));
///     }
/// }
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone)]
pub struct SimDisk {
    state: Arc<Mutex<State>>,
}

struct State {
    seed: u64,
    rng: Rng,
    /// Storage calls made so far.
    ops: u64,
    /// Calls numbered above this fail.
    halt_at: Option<u64>,
    /// Bumped by each crash; handles from an older epoch are dead.
    epoch: u64,
    dirs: BTreeSet<PathBuf>,
    /// What `list_dir` and `open` see.
    names: BTreeMap<PathBuf, u64>,
    /// What a power cut would leave if every unsynced entry were lost.
    durable_names: BTreeMap<PathBuf, u64>,
    /// Entry changes not yet covered by a directory sync, oldest first.
    pending: Vec<DirOp>,
    inodes: BTreeMap<u64, Inode>,
    next_ino: u64,
    /// Locked directory -> id of the guard holding it.
    locks: BTreeMap<PathBuf, u64>,
    next_lock: u64,
    faults: Vec<Armed>,
    fired: BTreeMap<String, u64>,
    /// How long every `sync_data` takes (a slow disk), slept outside the lock.
    sync_delay: std::time::Duration,
    /// When false, a power cut may also ruin durable bytes that share a
    /// 4 KiB sector with an unsynced write (a torn sector rewrite).
    power_safe_overwrite: bool,
}

#[derive(Default)]
struct Inode {
    durable: Vec<u8>,
    current: Vec<u8>,
    /// Replaying these over `durable` gives `current`.
    unsynced: Vec<FileOp>,
    open_handles: usize,
}

#[derive(Clone, Debug)]
enum FileOp {
    Write { pos: usize, data: Vec<u8> },
    SetLen(usize),
}

#[derive(Clone, Debug)]
enum DirOp {
    Create { path: PathBuf, ino: u64 },
    Remove { path: PathBuf },
    Rename { from: PathBuf, to: PathBuf },
}

struct Armed {
    fault: Fault,
    /// Matching calls left until the fault fires (1: the next one).
    remaining: u64,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum CrashMode {
    Power,
    Process,
    LoseUnsynced,
}

impl DirOp {
    /// A cross-directory rename lands whole when either directory is synced,
    /// which keeps it atomic in the simulation.
    fn touches(&self, dir: &Path) -> bool {
        match self {
            DirOp::Create { path, .. } | DirOp::Remove { path } => path.parent() == Some(dir),
            DirOp::Rename { from, to } => from.parent() == Some(dir) || to.parent() == Some(dir),
        }
    }

    fn apply(&self, names: &mut BTreeMap<PathBuf, u64>) {
        match self {
            DirOp::Create { path, ino } => {
                names.insert(path.clone(), *ino);
            }
            DirOp::Remove { path } => {
                names.remove(path);
            }
            // Applied in order, so a rename whose source never became durable
            // is a no-op: it cannot conjure a file whose creation was lost.
            DirOp::Rename { from, to } => {
                if let Some(ino) = names.remove(from) {
                    names.insert(to.clone(), ino);
                }
            }
        }
    }
}

/// splitmix64: tiny, fast, and good enough to pick crash outcomes.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, n); the modulo bias is irrelevant for the small n used here.
    fn below(&mut self, n: usize) -> usize {
        assert!(n > 0, "empty range");
        (self.next() % n as u64) as usize
    }

    fn coin(&mut self) -> bool {
        self.next() & 1 == 1
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let word = self.next().to_le_bytes();
            chunk.copy_from_slice(&word[..chunk.len()]);
        }
    }
}

fn apply_op(content: &mut Vec<u8>, op: &FileOp) {
    match op {
        FileOp::Write { pos, data } => write_into(content, *pos, data),
        FileOp::SetLen(len) => content.resize(*len, 0),
    }
}

fn write_into(content: &mut Vec<u8>, pos: usize, data: &[u8]) {
    let end = pos + data.len();
    if content.len() < end {
        content.resize(end, 0);
    }
    content[pos..end].copy_from_slice(data);
}

/// The sector a disk without power-safe overwrite may tear as a whole.
const TORN_SECTOR_BYTES: usize = 4096;

/// Splits [pos, pos + len) at sector boundaries.
fn sector_pieces(pos: usize, len: usize) -> Vec<std::ops::Range<usize>> {
    let end = pos + len;
    let mut pieces = Vec::with_capacity(len / SECTOR_BYTES + 2);
    let mut start = pos;
    while start < end {
        let stop = ((start / SECTOR_BYTES + 1) * SECTOR_BYTES).min(end);
        pieces.push(start..stop);
        start = stop;
    }
    pieces
}

/// The content one file has after a power cut, given its durable content,
/// its current content and the unsynced operations between them.
fn settle(
    mut durable: Vec<u8>,
    current: Vec<u8>,
    ops: &[FileOp],
    outcome: Outcome,
    rng: &mut Rng,
) -> Vec<u8> {
    match outcome {
        Outcome::LoseAll => durable,
        Outcome::KeepAll => current,
        Outcome::TornPrefix => {
            let torn = rng.below(ops.len());
            for op in &ops[..torn] {
                apply_op(&mut durable, op);
            }
            // A torn size change simply did not happen; a torn write kept
            // its first sectors, fewer than all of them.
            if let FileOp::Write { pos, data } = &ops[torn] {
                let pieces = sector_pieces(*pos, data.len());
                let kept = rng.below(pieces.len());
                if kept > 0 {
                    let end = pieces[kept - 1].end;
                    write_into(&mut durable, *pos, &data[..end - pos]);
                }
            }
            durable
        }
        Outcome::Subset => {
            for op in ops {
                if rng.coin() {
                    apply_op(&mut durable, op);
                }
            }
            durable
        }
        Outcome::ZerosGrown => {
            for op in ops {
                match op {
                    FileOp::Write { pos, data } => {
                        let end = pos + data.len();
                        if durable.len() < end {
                            durable.resize(end, 0);
                        }
                    }
                    FileOp::SetLen(len) => durable.resize(*len, 0),
                }
            }
            debug_assert_eq!(durable.len(), current.len());
            durable
        }
        Outcome::Garbage => {
            let mut content = current;
            let len = content.len();
            let mut pieces: Vec<_> = ops
                .iter()
                .filter_map(|op| match op {
                    FileOp::Write { pos, data } => Some(sector_pieces(*pos, data.len())),
                    FileOp::SetLen(_) => None,
                })
                .flatten()
                .filter(|piece| piece.start < len)
                .map(|piece| piece.start..piece.end.min(len))
                .collect();
            // Each written sector is either intact or garbage; at least one
            // is garbage, or this would be KeepAll.
            let forced = if pieces.is_empty() { 0 } else { rng.below(pieces.len()) };
            for (i, piece) in pieces.drain(..).enumerate() {
                if i == forced || rng.coin() {
                    rng.fill(&mut content[piece]);
                }
            }
            content
        }
    }
}

/// Drops any trailing separator and `.` so that equal paths are equal keys.
fn key(path: &Path) -> PathBuf {
    path.components().filter(|c| *c != Component::CurDir).collect()
}

fn parent_of(path: &Path) -> PathBuf {
    path.parent().map(Path::to_path_buf).unwrap_or_default()
}

fn not_found(what: &str, path: &Path) -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, format!("{what} {}: not found", path.display()))
}

fn halted() -> io::Error {
    io::Error::other("simulated halt")
}

fn dead_handle() -> io::Error {
    io::Error::other("simulated crash: handle invalid")
}

fn errno(kind: FaultKind) -> io::Error {
    match kind {
        FaultKind::NoSpace => io::Error::from_raw_os_error(ENOSPC),
        FaultKind::ReadOnly => io::Error::from_raw_os_error(EROFS),
        FaultKind::TooManyFiles => io::Error::from_raw_os_error(EMFILE),
        FaultKind::Eio | FaultKind::ShortWrite | FaultKind::SyncFailDropPages => {
            io::Error::from_raw_os_error(EIO)
        }
    }
}

fn to_sim_len(n: u64) -> io::Result<usize> {
    if n > SIM_FILE_BYTES_MAX {
        return Err(io::Error::from_raw_os_error(EFBIG));
    }
    usize::try_from(n).map_err(|_| io::Error::from_raw_os_error(EFBIG))
}

impl State {
    /// Counts a storage call and refuses it once halted.
    fn begin(&mut self) -> io::Result<()> {
        self.ops += 1;
        match self.halt_at {
            Some(halt) if self.ops > halt => Err(halted()),
            _ => Ok(()),
        }
    }

    /// The fault, if any, that fires on this call. `eligible` tells whether a
    /// fault of that kind can apply to this very call.
    fn fault(
        &mut self,
        op: FaultOp,
        paths: &[&Path],
        eligible: impl Fn(FaultKind) -> bool,
    ) -> Option<FaultKind> {
        if self.faults.is_empty() {
            return None;
        }
        let mut chosen = None;
        for (i, armed) in self.faults.iter_mut().enumerate() {
            let fault = &armed.fault;
            let path_matches = match &fault.path_contains {
                None => true,
                Some(part) => paths.iter().any(|path| path.to_string_lossy().contains(part.as_str())),
            };
            if fault.op != op || !path_matches || !eligible(fault.kind) {
                continue;
            }
            // Two faults due on the same call: the older fires, the younger
            // waits for the next matching call rather than vanish uncounted.
            if armed.remaining > 1 {
                armed.remaining -= 1;
            } else if chosen.is_none() {
                chosen = Some(i);
            }
        }
        let armed = self.faults.remove(chosen?);
        *self.fired.entry(format!("{:?}", armed.fault.kind)).or_default() += 1;
        Some(armed.fault.kind)
    }

    fn check_dir(&self, dir: &Path) -> io::Result<()> {
        if self.dirs.contains(dir) { Ok(()) } else { Err(not_found("directory", dir)) }
    }

    fn inode(&mut self, ino: u64) -> &mut Inode {
        self.inodes.get_mut(&ino).expect("an inode outlives its names and open handles")
    }

    /// Opens `path`, creating it when `create`; faults as `Open`, and also as
    /// `Create` when the file is missing.
    fn open_inode(&mut self, path: &Path, create: bool) -> io::Result<u64> {
        if self.dirs.contains(path) {
            return Err(io::Error::from_raw_os_error(EISDIR));
        }
        if let Some(&ino) = self.names.get(path) {
            if let Some(kind) = self.fault(FaultOp::Open, &[path], |_| true) {
                return Err(errno(kind));
            }
            return Ok(ino);
        }
        if !create {
            return Err(not_found("file", path));
        }
        self.check_dir(&parent_of(path))?;
        let open = self.fault(FaultOp::Open, &[path], |_| true);
        let created = self.fault(FaultOp::Create, &[path], |_| true);
        if let Some(kind) = open.or(created) {
            return Err(errno(kind));
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        self.inodes.insert(ino, Inode::default());
        self.names.insert(path.to_path_buf(), ino);
        self.pending.push(DirOp::Create { path: path.to_path_buf(), ino });
        Ok(ino)
    }

    /// Frees the inodes nothing can reach any more: no name, current or
    /// durable, no pending creation, no open handle.
    fn sweep(&mut self) {
        let mut live: BTreeSet<u64> = self.names.values().copied().collect();
        live.extend(self.durable_names.values().copied());
        live.extend(self.pending.iter().filter_map(|op| match op {
            DirOp::Create { ino, .. } => Some(*ino),
            _ => None,
        }));
        self.inodes.retain(|ino, inode| inode.open_handles > 0 || live.contains(ino));
    }

    fn crash(&mut self, mode: CrashMode) {
        self.epoch += 1;
        self.locks.clear();
        self.halt_at = None;
        for inode in self.inodes.values_mut() {
            inode.open_handles = 0;
        }
        if mode == CrashMode::Process {
            // The kernel outlives the process: page cache and unsynced
            // entries stay as they are, still exposed to a later power cut.
            self.sweep();
            return;
        }
        let mut names = std::mem::take(&mut self.durable_names);
        for op in std::mem::take(&mut self.pending) {
            let keep = mode == CrashMode::Power && self.rng.coin();
            if mode == CrashMode::Power {
                let outcome = if keep { DIR_OP_KEPT } else { DIR_OP_LOST };
                *self.fired.entry(outcome.to_string()).or_default() += 1;
            }
            if keep {
                op.apply(&mut names);
            }
        }
        self.durable_names = names.clone();
        self.names = names;
        self.sweep();
        for inode in self.inodes.values_mut() {
            if inode.unsynced.is_empty() {
                continue;
            }
            let outcome = match mode {
                CrashMode::Power => OUTCOMES[self.rng.below(OUTCOMES.len())],
                _ => Outcome::LoseAll,
            };
            if mode == CrashMode::Power {
                *self.fired.entry(outcome.name().to_string()).or_default() += 1;
            }
            let ops = std::mem::take(&mut inode.unsynced);
            let durable = std::mem::take(&mut inode.durable);
            let current = std::mem::take(&mut inode.current);
            inode.durable = settle(durable, current, &ops, outcome, &mut self.rng);
            if mode == CrashMode::Power && !self.power_safe_overwrite {
                // Without power-safe overwrite a disk may tear the rewrite of a
                // whole 4 KiB sector: everything in it, durable bytes included.
                for op in &ops {
                    let FileOp::Write { pos, data } = op else { continue };
                    let first = pos / TORN_SECTOR_BYTES * TORN_SECTOR_BYTES;
                    let mut page = first;
                    while page < pos + data.len() {
                        let end = (page + TORN_SECTOR_BYTES).min(inode.durable.len());
                        if page < end && self.rng.coin() {
                            self.rng.fill(&mut inode.durable[page..end]);
                            *self.fired.entry("crash:torn_overwrite".to_string()).or_default() += 1;
                        }
                        page += TORN_SECTOR_BYTES;
                    }
                }
            }
            inode.current = inode.durable.clone();
        }
    }

    /// Forgets the unsynced entry changes that name `path`, so that an
    /// at-rest helper's change to it is what a crash keeps.
    fn settle_entry(&mut self, path: &Path) {
        self.pending.retain(|op| match op {
            DirOp::Create { path: p, .. } | DirOp::Remove { path: p } => p != path,
            DirOp::Rename { from, to } => from != path && to != path,
        });
    }

    fn existing(&self, path: &Path) -> u64 {
        *self.names.get(&key(path)).unwrap_or_else(|| panic!("SimDisk: no file {}", path.display()))
    }
}

impl SimDisk {
    /// An empty disk whose crash choices and short writes follow `seed`.
    pub fn new(seed: u64) -> SimDisk {
        let dirs = [PathBuf::new(), PathBuf::from("/")].into_iter().collect();
        SimDisk {
            state: Arc::new(Mutex::new(State {
                seed,
                rng: Rng(seed),
                ops: 0,
                halt_at: None,
                sync_delay: std::time::Duration::ZERO,
                power_safe_overwrite: true,
                epoch: 0,
                dirs,
                names: BTreeMap::new(),
                durable_names: BTreeMap::new(),
                pending: Vec::new(),
                inodes: BTreeMap::new(),
                next_ino: 1,
                locks: BTreeMap::new(),
                next_lock: 1,
                faults: Vec::new(),
                fired: BTreeMap::new(),
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking test thread must not hide the disk from the others.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The seed this disk was made with; print it so a failing run replays.
    pub fn seed(&self) -> u64 {
        self.lock().seed
    }

    /// Cuts the power. Every handle opened before dies (its calls fail with
    /// "simulated crash: handle invalid") and every lock is released. Each
    /// file keeps its durable content plus, chosen by the seeded generator,
    /// none, all, a prefix torn at a 512-byte sector, or a random subset of
    /// its unsynced writes and size changes, or the new size with zeros or
    /// partly garbage in place of the written data. Each directory entry
    /// change not covered by a directory sync is kept or lost independently;
    /// a file whose entry is lost disappears. Also ends a
    /// [`halt_after`](SimDisk::halt_after).
    ///
    /// ```
    /// use walq::{Durability, Queue, SimDisk};
    /// let disk = SimDisk::new(42);
    /// let queue = Queue::builder("/q").simulated(&disk).open()?;
    /// queue.append(b"acknowledged")?; // fdatasynced before it returns
    /// queue.append_with(b"unsynced", Durability::Os)?; // at most in the page cache
    /// disk.crash();
    /// drop(queue); // its handles died with the power: the final flush fails (logged)
    ///
    /// // Reopen as a restarted process would: every acknowledged record is there.
    /// let queue = Queue::builder("/q").simulated(&disk).open()?;
    /// let mut reader = queue.read_from(0)?;
    /// assert_eq!(reader.next()?.map(|r| r.value().to_vec()), Some(b"acknowledged".to_vec()));
    /// assert!(queue.next_offset() <= 2); // "unsynced" may or may not have survived
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn crash(&self) {
        self.lock().crash(CrashMode::Power);
    }

    /// Kills the process (`kill -9`) but not the machine: handles die and
    /// locks are released, while all written data and entry changes stay
    /// visible. They stay unsynced too: a later [`crash`](SimDisk::crash)
    /// can still lose them.
    pub fn crash_keep_all(&self) {
        self.lock().crash(CrashMode::Process);
    }

    /// Cuts the power and keeps exactly the durable state: every unsynced
    /// write, size change and directory entry change is lost.
    pub fn crash_lose_unsynced(&self) {
        self.lock().crash(CrashMode::LoseUnsynced);
    }

    /// After `ops` further storage calls, every call fails with an
    /// `io::Error` "simulated halt", as if the process had died there; the
    /// test then calls a crash method (which ends the halt) and reopens.
    pub fn halt_after(&self, ops: u64) {
        let mut state = self.lock();
        state.halt_at = Some(state.ops + ops);
    }

    /// Models a disk without "power-safe overwrite" when `false` (default
    /// `true`): at a power cut, an unsynced write may tear the whole 4 KiB
    /// sector it lands in, ruining bytes of that sector that were already
    /// durable. This is the hazard `QueueBuilder::pad_to_sectors` guards
    /// against; counted as `crash:torn_overwrite` in `fault_counts`.
    ///
    /// ```
    /// let disk = walq::SimDisk::new(1);
    /// disk.set_power_safe_overwrite(false);
    /// let queue = walq::Queue::builder("/q").simulated(&disk).pad_to_sectors(true).open()?;
    /// queue.append(b"kept whatever the next write does to its sector")?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn set_power_safe_overwrite(&self, on: bool) {
        self.lock().power_safe_overwrite = on;
    }

    /// Makes every later `sync_data` take `delay` (a slow disk), to test
    /// what producers do while a sync is in flight. The delay is spent
    /// without holding the disk's lock, so other calls proceed meanwhile.
    ///
    /// ```
    /// let disk = walq::SimDisk::new(1);
    /// disk.set_sync_delay(std::time::Duration::from_millis(1));
    /// let queue = walq::Queue::builder("/q").simulated(&disk).open()?;
    /// let started = std::time::Instant::now();
    /// queue.append(b"slow")?;
    /// assert!(started.elapsed() >= std::time::Duration::from_millis(1));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn set_sync_delay(&self, delay: std::time::Duration) {
        self.lock().sync_delay = delay;
    }

    /// Storage calls made so far: each method of the storage and file traits
    /// counts as one, whether it succeeds or not.
    pub fn ops(&self) -> u64 {
        self.lock().ops
    }

    /// Arms a one-shot fault.
    ///
    /// # Panics
    ///
    /// If `nth` is 0, or the kind cannot happen on that operation:
    /// `ShortWrite` is for [`FaultOp::Write`] and `SyncFailDropPages` for
    /// [`FaultOp::Sync`].
    ///
    /// ```
    /// use walq::{Error, Fault, FaultKind, FaultOp, Queue, SimDisk};
    /// let disk = SimDisk::new(1);
    /// let queue = Queue::builder("/q").simulated(&disk).open()?;
    /// queue.append(b"before")?;
    /// // The next fdatasync of a segment fails and drops its unsynced pages.
    /// disk.inject(Fault {
    ///     op: FaultOp::Sync,
    ///     nth: 1,
    ///     kind: FaultKind::SyncFailDropPages,
    ///     path_contains: Some(".seg".into()),
    /// });
    /// assert!(matches!(queue.append(b"lost"), Err(Error::Io { op: "fdatasync", .. })));
    /// // The queue refuses appends until it is reopened; reads keep working.
    /// assert!(matches!(queue.append(b"refused"), Err(Error::Poisoned)));
    /// assert_eq!(queue.read_from(0)?.next()?.map(|r| r.value().to_vec()), Some(b"before".to_vec()));
    /// drop(queue);
    ///
    /// let queue = Queue::builder("/q").simulated(&disk).open()?;
    /// assert_eq!(queue.next_offset(), 1); // the failed record was never acknowledged
    ///
    /// // Shorter, for the next call of a kind on any path:
    /// disk.inject(Fault::new(FaultOp::Sync, FaultKind::Eio));
    /// assert!(queue.append(b"also lost").is_err());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn inject(&self, fault: Fault) {
        assert!(fault.nth >= 1, "Fault::nth counts from 1 (the next call)");
        match fault.kind {
            FaultKind::ShortWrite => {
                assert!(fault.op == FaultOp::Write, "ShortWrite applies to FaultOp::Write only");
            }
            FaultKind::SyncFailDropPages => {
                assert!(fault.op == FaultOp::Sync, "SyncFailDropPages applies to FaultOp::Sync only");
            }
            FaultKind::Eio | FaultKind::NoSpace | FaultKind::ReadOnly | FaultKind::TooManyFiles => {}
        }
        let remaining = fault.nth;
        self.lock().faults.push(Armed { fault, remaining });
    }

    /// How often each fault fired, by name: the [`FaultKind`] variant names
    /// (`"Eio"`, `"ShortWrite"`, ...) for injected faults, and for the
    /// choices of [`crash`](SimDisk::crash) `"crash:lose_all"`,
    /// `"crash:keep_all"`, `"crash:torn"`, `"crash:subset"`, `"crash:zeros"`,
    /// `"crash:garbage"` (per file with unsynced data) and
    /// `"crash:dir_op_kept"`, `"crash:dir_op_lost"` (per unsynced entry). A
    /// randomized test asserts each is non-zero, so that a quiet run means
    /// safety and not an idle injector.
    pub fn fault_counts(&self) -> BTreeMap<String, u64> {
        self.lock().fired.clone()
    }

    /// Disarms every injected fault that has not fired yet.
    pub fn clear_faults(&self) {
        self.lock().faults.clear();
    }

    /// The current content of a file (what a read sees), if it exists.
    pub fn read_file(&self, path: &Path) -> Option<Vec<u8>> {
        let state = self.lock();
        let ino = state.names.get(&key(path))?;
        Some(state.inodes[ino].current.clone())
    }

    /// Creates or replaces a file with `bytes`, durable at once, entry
    /// included (its directory and parents too): for tests that plant
    /// corrupt, foreign or old-format files. Like the other at-rest helpers
    /// it is meant for a quiet disk, between a crash and the reopen.
    pub fn write_file(&self, path: &Path, bytes: &[u8]) {
        let path = key(path);
        let mut state = self.lock();
        let state = &mut *state;
        state.dirs.extend(path.ancestors().skip(1).map(Path::to_path_buf));
        let ino = match state.names.get(&path) {
            Some(&ino) => ino,
            None => {
                let ino = state.next_ino;
                state.next_ino += 1;
                state.inodes.insert(ino, Inode::default());
                state.names.insert(path.clone(), ino);
                ino
            }
        };
        state.settle_entry(&path);
        state.durable_names.insert(path, ino);
        let inode = state.inode(ino);
        inode.durable = bytes.to_vec();
        inode.current = bytes.to_vec();
        inode.unsynced.clear();
        state.sweep();
    }

    /// Flips one bit of a file at rest, in what reads see and in what a
    /// crash keeps alike.
    ///
    /// # Panics
    ///
    /// If the file does not exist, `byte` is past its end or `bit` > 7.
    pub fn flip_bit(&self, path: &Path, byte: u64, bit: u8) {
        assert!(bit < 8, "bit {bit} is not in a byte");
        let mut state = self.lock();
        let ino = state.existing(path);
        let inode = state.inode(ino);
        let at = usize::try_from(byte).unwrap_or(usize::MAX);
        assert!(at < inode.current.len(), "byte {byte} is past the end of {}", path.display());
        let mask = 1u8 << bit;
        inode.current[at] ^= mask;
        if let Some(b) = inode.durable.get_mut(at) {
            *b ^= mask;
        }
        // Unsynced copies too, or a crash that keeps them would undo the flip.
        for op in &mut inode.unsynced {
            if let FileOp::Write { pos, data } = op
                && let Some(b) = at.checked_sub(*pos).and_then(|i| data.get_mut(i))
            {
                *b ^= mask;
            }
        }
    }

    /// Truncates (or extends with zeros) a file at rest, as if by someone
    /// else: both what reads see and what a crash keeps.
    ///
    /// # Panics
    ///
    /// If the file does not exist.
    pub fn truncate_file(&self, path: &Path, len: u64) {
        let len = usize::try_from(len).expect("length fits in memory");
        let mut state = self.lock();
        let ino = state.existing(path);
        let inode = state.inode(ino);
        inode.current.resize(len, 0);
        inode.durable.resize(len, 0);
        if !inode.unsynced.is_empty() {
            // Keep "replaying `unsynced` over `durable` gives `current`".
            inode.unsynced.push(FileOp::SetLen(len));
        }
    }

    /// Deletes a file at rest, entry durably gone: the "missing file" case.
    /// Open handles still read it.
    ///
    /// # Panics
    ///
    /// If the file does not exist.
    pub fn remove(&self, path: &Path) {
        let mut state = self.lock();
        state.existing(path);
        let path = key(path);
        state.settle_entry(&path);
        state.names.remove(&path);
        state.durable_names.remove(&path);
        state.sweep();
    }

    /// Paths of all files, sorted (directories are not listed).
    pub fn files(&self) -> Vec<PathBuf> {
        self.lock().names.keys().cloned().collect()
    }

    fn handle(&self, state: &mut State, path: PathBuf, ino: u64, writable: bool) -> Arc<dyn StorageFile> {
        state.inode(ino).open_handles += 1;
        Arc::new(SimFile { state: Arc::clone(&self.state), epoch: state.epoch, ino, path, writable })
    }
}

impl fmt::Debug for SimDisk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = f.debug_struct("SimDisk");
        // try_lock: Debug may run while the disk is busy (a panic message).
        match self.state.try_lock() {
            Ok(state) => out
                .field("seed", &state.seed)
                .field("ops", &state.ops)
                .field("files", &state.names.len())
                .finish(),
            Err(_) => out.finish_non_exhaustive(),
        }
    }
}

impl Storage for SimDisk {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        let dir = key(dir);
        let mut state = self.lock();
        state.begin()?;
        if let Some(file) = dir.ancestors().find(|a| state.names.contains_key(*a)) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} is a file", file.display()),
            ));
        }
        state.dirs.extend(dir.ancestors().map(Path::to_path_buf));
        Ok(())
    }

    fn list_dir(&self, dir: &Path) -> io::Result<Vec<String>> {
        let dir = key(dir);
        let mut state = self.lock();
        state.begin()?;
        state.check_dir(&dir)?;
        let files = state.names.keys();
        let subdirs = state.dirs.iter().filter(|d| **d != dir);
        Ok(files
            .chain(subdirs)
            .filter(|path| path.parent() == Some(dir.as_path()))
            .filter_map(|path| path.file_name())
            .map(|name| name.to_string_lossy().into_owned())
            .collect())
    }

    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<dyn StorageFile>> {
        let path = key(path);
        let mut state = self.lock();
        state.begin()?;
        let ino = state.open_inode(&path, create)?;
        Ok(self.handle(&mut state, path, ino, true))
    }

    fn open_read(&self, path: &Path) -> io::Result<Arc<dyn StorageFile>> {
        let path = key(path);
        let mut state = self.lock();
        state.begin()?;
        let ino = state.open_inode(&path, false)?;
        Ok(self.handle(&mut state, path, ino, false))
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        let path = key(path);
        let mut state = self.lock();
        state.begin()?;
        if !state.names.contains_key(&path) {
            return Err(not_found("file", &path));
        }
        if let Some(kind) = state.fault(FaultOp::Remove, &[&path], |_| true) {
            return Err(errno(kind));
        }
        state.names.remove(&path);
        state.pending.push(DirOp::Remove { path });
        state.sweep();
        Ok(())
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let (from, to) = (key(from), key(to));
        let mut state = self.lock();
        state.begin()?;
        if !state.names.contains_key(&from) {
            return Err(not_found("file", &from));
        }
        state.check_dir(&parent_of(&to))?;
        if state.dirs.contains(&to) {
            return Err(io::Error::from_raw_os_error(EISDIR));
        }
        if let Some(kind) = state.fault(FaultOp::Rename, &[&from, &to], |_| true) {
            return Err(errno(kind));
        }
        if from == to {
            return Ok(());
        }
        let ino = state.names.remove(&from).expect("checked above");
        state.names.insert(to.clone(), ino);
        state.pending.push(DirOp::Rename { from, to });
        state.sweep();
        Ok(())
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let dir = key(dir);
        let mut state = self.lock();
        state.begin()?;
        state.check_dir(&dir)?;
        if let Some(kind) = state.fault(FaultOp::SyncDir, &[&dir], |_| true) {
            return Err(errno(kind));
        }
        let state = &mut *state;
        let (synced, pending): (Vec<_>, Vec<_>) =
            std::mem::take(&mut state.pending).into_iter().partition(|op| op.touches(&dir));
        for op in &synced {
            op.apply(&mut state.durable_names);
        }
        state.pending = pending;
        state.sweep();
        Ok(())
    }

    fn lock_dir(&self, dir: &Path) -> io::Result<Option<Box<dyn DirLock>>> {
        let dir = key(dir);
        let mut state = self.lock();
        state.begin()?;
        state.check_dir(&dir)?;
        state.open_inode(&dir.join(LOCK_FILE), true)?;
        if state.locks.contains_key(&dir) {
            return Ok(None);
        }
        let id = state.next_lock;
        state.next_lock += 1;
        state.locks.insert(dir.clone(), id);
        Ok(Some(Box::new(SimLock { state: Arc::clone(&self.state), dir, id })))
    }
}

/// An open file of a [`SimDisk`]; it keeps its inode alive, like an fd.
struct SimFile {
    state: Arc<Mutex<State>>,
    epoch: u64,
    ino: u64,
    /// The path at open time, for fault matching and messages.
    path: PathBuf,
    writable: bool,
}

impl fmt::Debug for SimFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimFile")
            .field("path", &self.path)
            .field("ino", &self.ino)
            .field("writable", &self.writable)
            .finish()
    }
}

impl SimFile {
    /// Counts the call, then refuses it when halted or when a crash has
    /// happened since the open.
    fn begin(&self) -> io::Result<MutexGuard<'_, State>> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.begin()?;
        if state.epoch != self.epoch {
            return Err(dead_handle());
        }
        Ok(state)
    }

    fn check_writable(&self) -> io::Result<()> {
        if self.writable { Ok(()) } else { Err(io::Error::from_raw_os_error(EBADF)) }
    }
}

impl StorageFile for SimFile {
    fn read_at(&self, buf: &mut [u8], pos: u64) -> io::Result<usize> {
        let mut state = self.begin()?;
        if let Some(kind) = state.fault(FaultOp::Read, &[&self.path], |_| true) {
            return Err(errno(kind));
        }
        let content = &state.inode(self.ino).current;
        let start = usize::try_from(pos).unwrap_or(usize::MAX).min(content.len());
        let n = buf.len().min(content.len() - start);
        buf[..n].copy_from_slice(&content[start..start + n]);
        Ok(n)
    }

    fn write_at(&self, buf: &[u8], pos: u64) -> io::Result<usize> {
        let mut state = self.begin()?;
        self.check_writable()?;
        let start = to_sim_len(pos)?;
        to_sim_len(pos.saturating_add(buf.len() as u64))?;
        let short_possible = buf.len() >= 2;
        let mut n = buf.len();
        match state
            .fault(FaultOp::Write, &[&self.path], |kind| kind != FaultKind::ShortWrite || short_possible)
        {
            None => {}
            Some(FaultKind::ShortWrite) => n = 1 + state.rng.below(buf.len() - 1),
            Some(kind) => return Err(errno(kind)),
        }
        if n == 0 {
            return Ok(0);
        }
        let inode = state.inode(self.ino);
        write_into(&mut inode.current, start, &buf[..n]);
        inode.unsynced.push(FileOp::Write { pos: start, data: buf[..n].to_vec() });
        Ok(n)
    }

    fn sync_data(&self) -> io::Result<()> {
        let mut state = self.begin()?;
        let fault = state.fault(FaultOp::Sync, &[&self.path], |_| true);
        let inode = state.inode(self.ino);
        match fault {
            None => {}
            Some(FaultKind::SyncFailDropPages) => {
                // The kernel marks the dirty pages clean without writing
                // them: the data is gone, and the next sync has nothing to
                // report.
                inode.current = inode.durable.clone();
                inode.unsynced.clear();
                return Err(errno(FaultKind::SyncFailDropPages));
            }
            Some(kind) => return Err(errno(kind)),
        }
        // Replaying costs what was written since the last sync, not the
        // whole file, which keeps many small synced appends linear.
        for op in std::mem::take(&mut inode.unsynced) {
            apply_op(&mut inode.durable, &op);
        }
        debug_assert_eq!(inode.durable.len(), inode.current.len());
        let delay = state.sync_delay;
        drop(state);
        if !delay.is_zero() {
            std::thread::sleep(delay);
        }
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        let mut state = self.begin()?;
        Ok(state.inode(self.ino).current.len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut state = self.begin()?;
        self.check_writable()?;
        let len = to_sim_len(len)?;
        if let Some(kind) = state.fault(FaultOp::SetLen, &[&self.path], |_| true) {
            return Err(errno(kind));
        }
        let inode = state.inode(self.ino);
        inode.current.resize(len, 0);
        inode.unsynced.push(FileOp::SetLen(len));
        Ok(())
    }

    fn map(&self, len: usize) -> io::Result<Map> {
        let mut state = self.begin()?;
        let content = &state.inode(self.ino).current;
        if len > content.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "cannot map {len} bytes of {}, which has {} bytes",
                    self.path.display(),
                    content.len()
                ),
            ));
        }
        Ok(Map::from_vec(content[..len].to_vec()))
    }
}

impl Drop for SimFile {
    fn drop(&mut self) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        // A crash already closed every handle of older epochs.
        if state.epoch == self.epoch {
            state.inode(self.ino).open_handles -= 1;
            state.sweep();
        }
    }
}

/// A [`SimDisk`] directory lock; a crash releases it, and a stale guard
/// dropped later must not release a newer holder's lock.
struct SimLock {
    state: Arc<Mutex<State>>,
    dir: PathBuf,
    id: u64,
}

impl fmt::Debug for SimLock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimLock").field("dir", &self.dir).finish()
    }
}

impl DirLock for SimLock {}

impl Drop for SimLock {
    fn drop(&mut self) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if state.locks.get(&self.dir) == Some(&self.id) {
            state.locks.remove(&self.dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> &Path {
        Path::new(s)
    }

    /// A disk with directory `/q` and a file `/q/f` holding `synced`, durable
    /// entry and content, and an open handle to it.
    fn disk_with_file(seed: u64, synced: &[u8]) -> (SimDisk, Arc<dyn StorageFile>) {
        let disk = SimDisk::new(seed);
        disk.create_dir_all(p("/q")).unwrap();
        let f = disk.open(p("/q/f"), true).unwrap();
        write_all_at(&*f, synced, 0).unwrap();
        f.sync_data().unwrap();
        disk.sync_dir(p("/q")).unwrap();
        (disk, f)
    }

    fn counts_delta(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>) -> Vec<String> {
        after
            .iter()
            .filter(|(k, v)| before.get(*k).copied().unwrap_or(0) < **v)
            .map(|(k, _)| k.clone())
            .collect()
    }

    #[cfg(unix)]
    #[test]
    fn real_fs_round_trip() -> io::Result<()> {
        let tmp = tempfile::tempdir()?;
        let fs = RealFs;
        let dir = tmp.path().join("q");
        fs.create_dir_all(&dir)?;
        let path = dir.join("a.log");
        assert_eq!(fs.open(&path, false).unwrap_err().kind(), io::ErrorKind::NotFound);
        let f = fs.open(&path, true)?;
        write_all_at(&*f, b"hello world", 0)?;
        f.sync_data()?;
        fs.sync_dir(&dir)?;
        assert_eq!(f.len()?, 11);
        let mut buf = [0; 5];
        read_exact_at(&*f, &mut buf, 6)?;
        assert_eq!(&buf, b"world");
        assert_eq!(read_exact_at(&*f, &mut buf, 8).unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
        assert_eq!(&*f.map(5)?, b"hello");
        assert_eq!(f.map(12).unwrap_err().kind(), io::ErrorKind::InvalidInput);
        f.set_len(5)?;
        assert_eq!(f.len()?, 5);
        let r = fs.open_read(&path)?;
        assert!(r.write_at(b"x", 0).is_err());
        fs.rename(&path, &dir.join("b.log"))?;
        assert_eq!(fs.list_dir(&dir)?, vec!["b.log".to_string()]);
        fs.remove_file(&dir.join("b.log"))?;
        // The unlinked file stays readable through handles and maps.
        assert_eq!(&*r.map(5)?, b"hello");
        assert!(fs.list_dir(&dir)?.is_empty());
        assert_eq!(fs.list_dir(&dir.join("nope")).unwrap_err().kind(), io::ErrorKind::NotFound);
        Ok(())
    }

    #[cfg(unix)]
    #[test]
    fn real_fs_lock_conflict_within_one_process() -> io::Result<()> {
        let tmp = tempfile::tempdir()?;
        let fs = RealFs;
        let first = fs.lock_dir(tmp.path())?.expect("free");
        assert!(tmp.path().join(LOCK_FILE).exists());
        assert!(fs.lock_dir(tmp.path())?.is_none(), "second holder refused");
        drop(first);
        assert!(fs.lock_dir(tmp.path())?.is_some(), "released on drop");
        Ok(())
    }

    #[test]
    fn sim_lock_conflict_and_crash_release() {
        let disk = SimDisk::new(0);
        disk.create_dir_all(p("/q")).unwrap();
        let first = disk.lock_dir(p("/q")).unwrap().expect("free");
        assert!(disk.lock_dir(p("/q/")).unwrap().is_none());
        assert!(disk.list_dir(p("/q")).unwrap().contains(&LOCK_FILE.to_string()));
        drop(first);
        let second = disk.lock_dir(p("/q")).unwrap().expect("released on drop");
        disk.crash_keep_all();
        let third = disk.lock_dir(p("/q")).unwrap().expect("released by the crash");
        drop(second); // a stale guard must not release the new holder's lock
        assert!(disk.lock_dir(p("/q")).unwrap().is_none());
        drop(third);
        assert_eq!(disk.lock_dir(p("/nope")).unwrap_err().kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn unsynced_data_is_lost_and_synced_data_kept() {
        let (disk, f) = disk_with_file(0, b"synced");
        write_all_at(&*f, b"+unsynced", 6).unwrap();
        assert_eq!(disk.read_file(p("/q/f")).unwrap(), b"synced+unsynced");
        disk.crash_lose_unsynced();
        assert_eq!(disk.read_file(p("/q/f")).unwrap(), b"synced");
        assert_eq!(f.len().unwrap_err().to_string(), "simulated crash: handle invalid");
    }

    #[test]
    fn process_death_keeps_the_page_cache_but_not_durability() {
        let (disk, f) = disk_with_file(0, b"synced");
        write_all_at(&*f, b"+cached", 6).unwrap();
        let g = disk.open(p("/q/new"), true).unwrap();
        drop(g);
        disk.crash_keep_all();
        assert!(f.read_at(&mut [0; 1], 0).is_err(), "handles die with the process");
        assert_eq!(disk.read_file(p("/q/f")).unwrap(), b"synced+cached");
        assert!(disk.files().contains(&PathBuf::from("/q/new")));
        disk.crash_lose_unsynced();
        assert_eq!(disk.read_file(p("/q/f")).unwrap(), b"synced");
        assert!(!disk.files().contains(&PathBuf::from("/q/new")));
    }

    #[test]
    fn a_new_entry_needs_a_directory_sync() {
        let disk = SimDisk::new(0);
        disk.create_dir_all(p("/q")).unwrap();
        let f = disk.open(p("/q/a"), true).unwrap();
        write_all_at(&*f, b"data", 0).unwrap();
        f.sync_data().unwrap();
        disk.crash_lose_unsynced();
        assert_eq!(disk.files(), Vec::<PathBuf>::new(), "synced data, lost entry");

        let f = disk.open(p("/q/a"), true).unwrap();
        write_all_at(&*f, b"data", 0).unwrap();
        f.sync_data().unwrap();
        disk.sync_dir(p("/q")).unwrap();
        disk.remove_file(p("/q/a")).unwrap();
        assert!(disk.read_file(p("/q/a")).is_none());
        disk.crash_lose_unsynced();
        assert_eq!(disk.read_file(p("/q/a")).unwrap(), b"data", "unsynced unlink undone");
    }

    #[test]
    fn rename_is_atomic_across_crashes() {
        let mut seen = BTreeSet::new();
        for seed in 0..300 {
            let (disk, f) = disk_with_file(seed, b"old state");
            drop(f);
            let tmp = disk.open(p("/q/f.tmp"), true).unwrap();
            write_all_at(&*tmp, b"new state", 0).unwrap();
            tmp.sync_data().unwrap();
            disk.rename(p("/q/f.tmp"), p("/q/f")).unwrap();
            assert_eq!(disk.files(), vec![PathBuf::from("/q/f")]);
            disk.crash();
            let state = disk.read_file(p("/q/f")).expect("never neither");
            let tmp = disk.read_file(p("/q/f.tmp"));
            match (&state[..], tmp.as_deref()) {
                (b"old state", None) => seen.insert("old"),
                (b"old state", Some(b"new state")) => seen.insert("old+tmp"),
                (b"new state", None) => seen.insert("new"),
                other => panic!("seed {seed}: torn rename {other:?}"),
            };
        }
        assert_eq!(seen.len(), 3, "{seen:?}");
    }

    #[test]
    fn rename_made_durable_by_a_directory_sync() {
        let (disk, f) = disk_with_file(0, b"v1");
        drop(f);
        disk.rename(p("/q/f"), p("/q/g")).unwrap();
        disk.sync_dir(p("/q")).unwrap();
        disk.crash_lose_unsynced();
        assert_eq!(disk.files(), vec![PathBuf::from("/q/g")]);
        assert_eq!(disk.read_file(p("/q/g")).unwrap(), b"v1");
    }

    #[test]
    fn sync_fail_drop_pages_loses_the_data_and_the_next_sync_succeeds() {
        let (disk, f) = disk_with_file(0, b"durable");
        disk.inject(Fault::new(FaultOp::Sync, FaultKind::SyncFailDropPages));
        write_all_at(&*f, b"+dirty", 7).unwrap();
        let err = f.sync_data().unwrap_err();
        assert_eq!(err.raw_os_error(), Some(EIO));
        assert_eq!(disk.read_file(p("/q/f")).unwrap(), b"durable");
        assert_eq!(f.len().unwrap(), 7);
        f.sync_data().expect("fsyncgate: the retry reports success");
        disk.crash_keep_all();
        assert_eq!(disk.read_file(p("/q/f")).unwrap(), b"durable");
        assert_eq!(disk.fault_counts()["SyncFailDropPages"], 1);
    }

    #[test]
    fn halt_after_stops_every_call_until_a_crash() {
        let disk = SimDisk::new(0);
        disk.create_dir_all(p("/q")).unwrap();
        let f = disk.open(p("/q/f"), true).unwrap();
        assert_eq!(disk.ops(), 2);
        disk.halt_after(2);
        write_all_at(&*f, b"a", 0).unwrap();
        f.sync_data().unwrap();
        let err = f.write_at(b"b", 1).unwrap_err();
        assert_eq!(err.to_string(), "simulated halt");
        assert!(disk.list_dir(p("/q")).is_err());
        assert!(disk.open(p("/q/g"), true).is_err());
        assert_eq!(disk.ops(), 7, "failed calls count too");
        disk.crash_lose_unsynced();
        // Entry never synced: the file is gone, and the disk works again.
        assert!(disk.list_dir(p("/q")).unwrap().is_empty());
        assert_eq!(f.sync_data().unwrap_err().to_string(), "simulated crash: handle invalid");
    }

    #[test]
    fn each_fault_kind_fires_once_and_is_counted() {
        let (disk, f) = disk_with_file(3, b"0123456789");

        disk.inject(Fault::new(FaultOp::Write, FaultKind::Eio));
        assert_eq!(f.write_at(b"xx", 0).unwrap_err().raw_os_error(), Some(EIO));
        assert_eq!(f.write_at(b"ab", 0).unwrap(), 2, "one-shot");

        disk.inject(Fault { nth: 2, ..Fault::new(FaultOp::Write, FaultKind::NoSpace) });
        f.write_at(b"c", 2).unwrap();
        assert_eq!(f.write_at(b"d", 3).unwrap_err().raw_os_error(), Some(ENOSPC));

        disk.inject(Fault::new(FaultOp::Write, FaultKind::ShortWrite));
        assert_eq!(f.write_at(b"z", 10).unwrap(), 1, "1 byte cannot be short");
        let n = f.write_at(&[7; 100], 0).unwrap();
        assert!((1..100).contains(&n), "short write of {n}");
        disk.inject(Fault::new(FaultOp::Write, FaultKind::ShortWrite));
        write_all_at(&*f, &[9; 100], 0).unwrap();
        assert_eq!(disk.read_file(p("/q/f")).unwrap(), vec![9; 100]);

        disk.inject(Fault::new(FaultOp::Sync, FaultKind::Eio));
        assert_eq!(f.sync_data().unwrap_err().raw_os_error(), Some(EIO));
        assert_eq!(disk.read_file(p("/q/f")).unwrap(), vec![9; 100], "EIO alone keeps the pages");
        f.sync_data().unwrap();

        disk.inject(Fault {
            path_contains: Some("other".into()),
            ..Fault::new(FaultOp::Create, FaultKind::ReadOnly)
        });
        disk.open(p("/q/x"), true).unwrap();
        drop(disk.open(p("/q/x"), true).unwrap()); // exists: not a Create
        let err = disk.open(p("/q/other"), true).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(EROFS));
        assert!(!disk.files().contains(&PathBuf::from("/q/other")));

        let cases = [
            (FaultOp::SyncDir, FaultKind::Eio),
            (FaultOp::Open, FaultKind::Eio),
            (FaultOp::Rename, FaultKind::NoSpace),
            (FaultOp::Remove, FaultKind::ReadOnly),
            (FaultOp::SetLen, FaultKind::NoSpace),
            (FaultOp::Read, FaultKind::Eio),
        ];
        for (op, kind) in cases {
            disk.inject(Fault::new(op, kind));
        }
        assert!(disk.sync_dir(p("/q")).is_err());
        assert!(disk.open_read(p("/q/x")).is_err());
        assert!(disk.rename(p("/q/x"), p("/q/y")).is_err());
        assert!(disk.remove_file(p("/q/x")).is_err());
        assert!(f.set_len(0).is_err());
        assert!(f.read_at(&mut [0; 4], 0).is_err());
        assert_eq!(f.len().unwrap(), 100, "failed calls have no effect");
        assert!(disk.files().contains(&PathBuf::from("/q/x")));
        disk.sync_dir(p("/q")).unwrap();

        let expected: BTreeMap<String, u64> =
            [("Eio", 5), ("NoSpace", 3), ("ReadOnly", 2), ("ShortWrite", 2)]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect();
        assert_eq!(disk.fault_counts(), expected);
    }

    #[test]
    #[should_panic(expected = "ShortWrite applies to FaultOp::Write only")]
    fn inject_refuses_a_fault_that_cannot_happen() {
        SimDisk::new(0).inject(Fault::new(FaultOp::Read, FaultKind::ShortWrite));
    }

    /// Three unaligned, multi-sector appends after a synced base; every
    /// byte is non-zero so that zeros mean "not written".
    const BASE: usize = 300;
    const APPENDS: [usize; 3] = [700, 1100, 450];

    fn pattern(len: usize, tag: u8) -> Vec<u8> {
        (0..len).map(|i| (i % 200) as u8 + tag).collect()
    }

    /// Checks the settled content against what its outcome promises.
    fn check_outcome(outcome: &str, got: &[u8], current: &[u8], bounds: &[usize]) {
        assert_eq!(&got[..BASE], &current[..BASE], "{outcome}: synced bytes damaged");
        match outcome {
            "crash:lose_all" => assert_eq!(got.len(), BASE),
            "crash:keep_all" => assert_eq!(got, current),
            "crash:torn" => {
                assert_eq!(got, &current[..got.len()], "torn: a prefix");
                assert!(bounds.contains(&got.len()) || got.len().is_multiple_of(SECTOR_BYTES));
            }
            "crash:subset" => {
                for w in bounds.windows(2) {
                    let range = w[0]..w[1].min(got.len());
                    if range.is_empty() {
                        continue;
                    }
                    let part = &got[range.clone()];
                    assert!(
                        part == &current[range] || part.iter().all(|b| *b == 0),
                        "subset: each write whole or absent"
                    );
                }
                assert!(bounds.contains(&got.len()));
            }
            "crash:zeros" => {
                assert_eq!(got.len(), current.len());
                assert!(got[BASE..].iter().all(|b| *b == 0));
            }
            "crash:garbage" => {
                assert_eq!(got.len(), current.len());
                assert_ne!(got, current);
            }
            other => panic!("unknown outcome {other}"),
        }
    }

    #[test]
    fn crash_outcomes_cover_every_kind_and_keep_their_promises() {
        let mut seen: BTreeMap<String, u64> = BTreeMap::new();
        for seed in 0..600 {
            let (disk, f) = disk_with_file(seed, &pattern(BASE, 1));
            let mut bounds = vec![BASE];
            for (i, len) in APPENDS.into_iter().enumerate() {
                let at = *bounds.last().unwrap();
                write_all_at(&*f, &pattern(len, 1 + i as u8 * 3), at as u64).unwrap();
                bounds.push(at + len);
            }
            // An unsynced entry too, to count kept and lost entries.
            drop(disk.open(p("/q/extra"), true).unwrap());
            let current = disk.read_file(p("/q/f")).unwrap();
            let before = disk.fault_counts();
            disk.crash();
            let after = disk.fault_counts();
            let fired = counts_delta(&before, &after);
            let outcome = fired.iter().find(|k| !k.starts_with("crash:dir")).expect("one outcome");
            let got = disk.read_file(p("/q/f")).unwrap();
            check_outcome(outcome, &got, &current, &bounds);
            // After a crash the result is durable: a second crash changes nothing.
            disk.crash();
            assert_eq!(disk.read_file(p("/q/f")).unwrap(), got, "seed {seed}");
            for key in fired {
                *seen.entry(key).or_default() += 1;
            }
        }
        let names: Vec<&str> = OUTCOMES.iter().map(|o| o.name()).collect();
        for name in names.iter().chain(&[DIR_OP_KEPT, DIR_OP_LOST]) {
            assert!(seen.get(*name).copied().unwrap_or(0) > 10, "{name} rare: {seen:?}");
        }
    }

    #[test]
    fn settle_handles_overwrites_and_size_changes() {
        let durable = vec![1u8; 1000];
        let ops = vec![
            FileOp::Write { pos: 100, data: vec![2; 600] },
            FileOp::SetLen(400),
            FileOp::Write { pos: 900, data: vec![3; 50] },
        ];
        let mut current = durable.clone();
        for op in &ops {
            apply_op(&mut current, op);
        }
        assert_eq!(current.len(), 950);
        let mut rng = Rng(5);
        for outcome in OUTCOMES {
            for _ in 0..50 {
                let got = settle(durable.clone(), current.clone(), &ops, outcome, &mut rng);
                match outcome {
                    Outcome::LoseAll => assert_eq!(got, durable),
                    Outcome::KeepAll => assert_eq!(got, current),
                    Outcome::ZerosGrown => {
                        // Sizes land, data does not: old bytes below 400, zeros after.
                        assert_eq!(&got[..400], &durable[..400]);
                        assert!(got[400..].iter().all(|b| *b == 0));
                        assert_eq!(got.len(), 950);
                    }
                    Outcome::Garbage => assert_eq!(got.len(), 950),
                    Outcome::TornPrefix | Outcome::Subset => {
                        assert!(got.iter().all(|b| (1..=3).contains(b) || *b == 0));
                    }
                }
            }
        }
    }

    #[test]
    fn crashes_replay_from_the_seed() {
        let run = |seed| {
            let (disk, f) = disk_with_file(seed, b"base");
            for i in 0..20u8 {
                write_all_at(&*f, &[i; 300], 4 + u64::from(i) * 300).unwrap();
                drop(disk.open(Path::new(&format!("/q/s{i}")), true).unwrap());
            }
            disk.crash();
            let files = disk.files();
            let contents: Vec<_> = files.iter().map(|f| disk.read_file(f)).collect();
            (files, contents)
        };
        assert_eq!(run(11), run(11));
        assert_ne!(run(11), run(12));
    }

    #[test]
    fn map_never_reaches_past_the_end() {
        let (disk, f) = disk_with_file(0, b"0123456789");
        assert_eq!(&*f.map(4).unwrap(), b"0123");
        assert!(f.map(0).unwrap().is_empty());
        assert_eq!(f.map(11).unwrap_err().kind(), io::ErrorKind::InvalidInput);
        f.set_len(3).unwrap();
        assert_eq!(f.map(4).unwrap_err().kind(), io::ErrorKind::InvalidInput);
        // A map is a snapshot: later writes do not show through it.
        let map = f.map(3).unwrap();
        write_all_at(&*f, b"abc", 0).unwrap();
        assert_eq!(&*map, b"012");
        drop(disk);
    }

    #[test]
    fn unlinked_files_stay_readable_through_open_handles() {
        let (disk, f) = disk_with_file(0, b"segment");
        let r = disk.open_read(p("/q/f")).unwrap();
        disk.remove_file(p("/q/f")).unwrap();
        disk.sync_dir(p("/q")).unwrap();
        drop(f);
        assert_eq!(&*r.map(7).unwrap(), b"segment");
        assert_eq!(r.write_at(b"x", 0).unwrap_err().raw_os_error(), Some(EBADF));
        assert!(disk.files().is_empty());
        drop(r);
        assert!(disk.lock().inodes.is_empty(), "the last close frees the inode");
    }

    #[test]
    fn list_dir_sees_files_and_subdirectories_of_one_directory() {
        let disk = SimDisk::new(0);
        disk.create_dir_all(p("/q/sub")).unwrap();
        drop(disk.open(p("/q/a"), true).unwrap());
        drop(disk.open(p("/q/sub/b"), true).unwrap());
        let mut names = disk.list_dir(p("/q")).unwrap();
        names.sort();
        assert_eq!(names, ["a", "sub"]);
        assert_eq!(disk.list_dir(p("/r")).unwrap_err().kind(), io::ErrorKind::NotFound);
        assert_eq!(disk.open(p("/r/a"), true).unwrap_err().kind(), io::ErrorKind::NotFound);
        assert_eq!(disk.open(p("/q/c"), false).unwrap_err().kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn at_rest_helpers_damage_both_images() {
        let disk = SimDisk::new(0);
        disk.write_file(p("/q/seg"), &[0u8; 8]);
        disk.flip_bit(p("/q/seg"), 3, 1);
        disk.crash_lose_unsynced();
        assert_eq!(disk.read_file(p("/q/seg")).unwrap(), [0, 0, 0, 2, 0, 0, 0, 0]);
        disk.truncate_file(p("/q/seg"), 5);
        disk.crash_lose_unsynced();
        assert_eq!(disk.read_file(p("/q/seg")).unwrap().len(), 5);
        // With unsynced writes pending, a flip survives a crash that keeps them.
        let f = disk.open(p("/q/seg"), false).unwrap();
        write_all_at(&*f, &[0; 10], 0).unwrap();
        disk.flip_bit(p("/q/seg"), 7, 0);
        disk.crash_keep_all();
        assert_eq!(disk.read_file(p("/q/seg")).unwrap()[7], 1);
        disk.remove(p("/q/seg"));
        disk.crash_lose_unsynced();
        assert!(disk.files().is_empty());
        assert_eq!(disk.seed(), 0);
    }

    #[derive(Debug)]
    struct Stuttering {
        calls: Mutex<u32>,
    }

    impl StorageFile for Stuttering {
        fn read_at(&self, buf: &mut [u8], _pos: u64) -> io::Result<usize> {
            let mut calls = self.calls.lock().unwrap();
            *calls += 1;
            match *calls {
                1 => Err(io::ErrorKind::Interrupted.into()),
                2 => {
                    buf[0] = 1;
                    Ok(1)
                }
                _ => Ok(0),
            }
        }
        fn write_at(&self, buf: &[u8], _pos: u64) -> io::Result<usize> {
            let mut calls = self.calls.lock().unwrap();
            *calls += 1;
            match *calls {
                1 => Err(io::ErrorKind::Interrupted.into()),
                2 => Ok(buf.len().min(1)),
                _ => Ok(0),
            }
        }
        fn sync_data(&self) -> io::Result<()> {
            Ok(())
        }
        fn len(&self) -> io::Result<u64> {
            Ok(0)
        }
        fn set_len(&self, _len: u64) -> io::Result<()> {
            Ok(())
        }
        fn map(&self, _len: usize) -> io::Result<Map> {
            Ok(Map::from_vec(Vec::new()))
        }
    }

    #[test]
    fn exact_helpers_retry_interrupted_and_refuse_zero_progress() {
        let f = Stuttering { calls: Mutex::new(0) };
        let err = read_exact_at(&f, &mut [0; 3], 0).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        assert_eq!(*f.calls.lock().unwrap(), 3);
        let f = Stuttering { calls: Mutex::new(0) };
        let err = write_all_at(&f, &[0; 3], 0).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WriteZero);
        assert_eq!(*f.calls.lock().unwrap(), 3);
    }
}
