//! Real file-system edges on a small loop-mounted ext4: a genuinely full disk
//! (ENOSPC from the kernel, not from the simulated disk) and a read-only
//! remount (EROFS). Each must be a typed error, lose nothing acknowledged,
//! keep the queue readable, and leave a directory that reopens cleanly once
//! the disk is writable again. A consumer commit on the full disk still lands
//! (the journal writes into room it zero-filled beforehand).
//!
//! Needs root and loop devices (`mkfs.ext4`, `mount -o loop`); elsewhere each
//! test prints why it is skipped and passes.

use std::path::{Path, PathBuf};
use std::process::Command;

use walq::{Durability, Error, Queue};

/// A small ext4 mounted on a temp directory; unmounted on drop.
struct LoopFs {
    image: PathBuf,
    mount: PathBuf,
    _dir: tempfile::TempDir,
}

fn run(cmd: &str, args: &[&str]) -> bool {
    Command::new(cmd).args(args).output().map(|o| o.status.success()).unwrap_or(false)
}

impl LoopFs {
    /// Mounts a fresh `mib` MiB ext4, or says why it cannot.
    fn new(mib: u64) -> Result<LoopFs, String> {
        let uid = Command::new("id").arg("-u").output().map_err(|e| format!("id: {e}"))?;
        if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
            return Err("not running as root".into());
        }
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let image = dir.path().join("fs.img");
        let mount = dir.path().join("mnt");
        std::fs::create_dir(&mount).map_err(|e| e.to_string())?;
        let size = format!("{mib}M");
        if !run("truncate", &["-s", &size, image.to_str().unwrap()]) {
            return Err("truncate failed".into());
        }
        if !run("mkfs.ext4", &["-q", "-F", image.to_str().unwrap()]) {
            return Err("mkfs.ext4 is missing or failed".into());
        }
        let fs = LoopFs { image, mount, _dir: dir };
        fs.mount()?;
        Ok(fs)
    }

    fn mount(&self) -> Result<(), String> {
        let (image, mount) = (self.image.to_str().unwrap(), self.mount.to_str().unwrap());
        if run("mount", &["-o", "loop,errors=remount-ro", image, mount]) {
            Ok(())
        } else {
            Err("mount -o loop failed (no loop devices, or no CAP_SYS_ADMIN)".into())
        }
    }

    /// The kernel's own read-only switch: ext4 turns the file system read-only
    /// on an error (`errors=remount-ro`), here one triggered through sysfs,
    /// even while files are open for writing. `Err` if the knob is missing.
    fn force_read_only(&self) -> Result<(), String> {
        let out = Command::new("findmnt").args(["-n", "-o", "SOURCE"]).arg(&self.mount).output();
        let source = out.map_err(|e| e.to_string())?;
        let dev = String::from_utf8_lossy(&source.stdout).trim().rsplit('/').next().unwrap_or("").to_string();
        let knob = format!("/sys/fs/ext4/{dev}/trigger_fs_error");
        std::fs::write(&knob, b"1").map_err(|e| format!("{knob}: {e}"))
    }

    /// Unmounts, repairs the error flag (`e2fsck -fy`), mounts again read-write.
    fn remount_fresh(&self) {
        assert!(run("umount", &[self.mount.to_str().unwrap()]), "umount");
        // e2fsck exits 1 when it fixed something: either is fine.
        let _ = Command::new("e2fsck").args(["-fy"]).arg(&self.image).output();
        self.mount().expect("mount again");
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        let _ = run("umount", &[self.mount.to_str().unwrap()]);
        let _ = std::fs::remove_file(&self.image);
    }
}

macro_rules! loop_fs_or_skip {
    ($mib:expr) => {
        match LoopFs::new($mib) {
            Ok(fs) => fs,
            Err(why) => {
                eprintln!("SKIPPED: this test needs a loop-mounted ext4: {why}");
                return;
            }
        }
    };
}

fn read_values(queue: &Queue) -> Vec<Vec<u8>> {
    let mut r = queue.read_from(queue.first_offset()).unwrap();
    let mut out = Vec::new();
    while let Some(rec) = r.next().unwrap() {
        out.push(rec.value().to_vec());
    }
    out
}

fn value(i: u64) -> Vec<u8> {
    let mut v = format!("record {i} ").into_bytes();
    v.resize(3000, b'a' + (i % 26) as u8);
    v
}

#[test]
fn a_really_full_disk_is_disk_full_loses_nothing_and_still_takes_commits() {
    let fs = loop_fs_or_skip!(16);
    let dir = fs.mount.join("q");
    // Room to free later: the test's own filler file.
    let filler = fs.mount.join("filler");
    std::fs::write(&filler, vec![1u8; 2 << 20]).unwrap();
    let queue = Queue::builder(&dir).segment_bytes(1 << 20).open().unwrap();
    let mut consumer = queue.consumer("c").unwrap();
    let mut acked = Vec::new();
    let err = loop {
        let v = value(acked.len() as u64);
        match queue.append(&v) {
            Ok(o) => {
                assert_eq!(o, acked.len() as u64);
                acked.push(v);
            }
            Err(e) => break e,
        }
        assert!(acked.len() < 100_000, "the disk never filled");
    };
    assert!(matches!(err, Error::DiskFull { .. }), "got {err:?}");
    assert!(err.to_string().contains("disk full"), "{err}");
    assert!(queue.stats().poisoned);
    assert!(matches!(queue.append(b"x"), Err(Error::Poisoned)));
    // Reads keep working, and a consumer can still commit on the full disk.
    assert_eq!(read_values(&queue), acked);
    consumer.commit(acked.len() as u64 / 2).unwrap();
    drop(consumer);
    drop(queue);
    // Free space, reopen: everything acknowledged, and appends work again.
    std::fs::remove_file(&filler).unwrap();
    let queue = Queue::builder(&dir).segment_bytes(1 << 20).open().unwrap();
    assert_eq!(read_values(&queue), acked);
    assert_eq!(queue.consumers()[0].position, acked.len() as u64 / 2);
    queue.append(b"after").unwrap();
    eprintln!("{} records of 3000 B acknowledged before the 16 MiB ext4 filled", acked.len());
}

#[test]
fn a_read_only_remount_is_a_typed_error_and_loses_nothing() {
    let fs = loop_fs_or_skip!(16);
    let dir = fs.mount.join("q");
    let queue = Queue::open(&dir).unwrap();
    let acked: Vec<Vec<u8>> = (0..20).map(value).collect();
    for v in &acked {
        queue.append(v).unwrap();
    }
    queue.append_with(&value(99), Durability::Os).unwrap(); // buffered, not yet written
    if let Err(why) = fs.force_read_only() {
        eprintln!("SKIPPED: cannot make ext4 read-only under a writer: {why}");
        return;
    }
    let err = queue.append(&value(100)).unwrap_err();
    match &err {
        Error::Io { source, .. } => assert_eq!(source.raw_os_error(), Some(30), "EROFS: {err}"),
        other => panic!("expected an EROFS Io error, got {other:?}"),
    }
    assert!(queue.stats().poisoned);
    assert_eq!(&read_values(&queue)[..20], &acked[..], "still readable");
    drop(queue);
    // Opening a queue on a read-only file system is a typed error too, and changes nothing.
    let reopen = Queue::open(&dir).unwrap_err();
    assert!(matches!(reopen, Error::Io { .. }), "{reopen:?}");
    fs.remount_fresh();
    let queue = Queue::open(&dir).unwrap();
    assert_eq!(&read_values(&queue)[..20], &acked[..]);
    queue.append(b"after").unwrap();
}

#[test]
fn loop_fs_helper_mounts_a_real_ext4() {
    let fs = loop_fs_or_skip!(8);
    let probe: &Path = &fs.mount;
    std::fs::write(probe.join("f"), b"x").unwrap();
    assert_eq!(std::fs::read(probe.join("f")).unwrap(), b"x");
}
