//! The directory of named queues: each `<data-dir>/<name>/` is one walq
//! queue, opened once and shared (`Arc<Queue>`); its options and its groups'
//! options are saved beside it in `serve-options.json`. Open consumer groups
//! are kept here too. Invariant: a name reaches the file system only after
//! [`check_queue_name`] accepted it, so no request can name a path outside
//! the data directory.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use walq::{Group, Queue};

use crate::config::{GroupOptions, QueueOptions};
use crate::error::ApiError;
use crate::server::ServeError;

/// The file beside a queue's segments that holds what it was created with.
pub const OPTIONS_FILE: &str = "serve-options.json";
/// The data directory's lock: one server per data directory.
pub const LOCK_FILE: &str = ".walq-serve.lock";
/// Longest name of a queue (as walq's consumer and group names).
pub const NAME_MAX: usize = 128;

/// Accepts `[A-Za-z0-9._-]`, 1 to 128 characters, not starting with a dot
/// (so never `.`, `..` or a hidden file), else 400 `invalid_name`.
pub fn check_queue_name(name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= NAME_MAX
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_name",
            format!(
                "{name:?} is not a queue name: 1 to {NAME_MAX} characters of A-Z, a-z, 0-9, '.', '_', '-', not starting with '.'"
            ),
        ))
    }
}

/// What `serve-options.json` holds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct Saved {
    pub queue: QueueOptions,
    pub groups: BTreeMap<String, GroupOptions>,
}

/// One open queue and what the server keeps beside it.
#[derive(Debug)]
pub(crate) struct Entry {
    pub name: String,
    pub dir: PathBuf,
    pub queue: Arc<Queue>,
    /// The queue's options: fixed once it is open, so read without a lock
    /// (the `saved` lock is held across the options file's fsyncs).
    pub options: QueueOptions,
    pub saved: Mutex<Saved>,
    /// Open groups, with the options each was opened with.
    pub groups: Mutex<HashMap<String, (Group, GroupOptions)>>,
    /// Serializes consumer creation, commits and deletes of this queue.
    pub consumers: tokio::sync::Mutex<()>,
    limits: Limits,
}

/// How many queues, and groups and consumers per queue, clients may create.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub queues: usize,
    pub groups_per_queue: usize,
    pub consumers_per_queue: usize,
}

impl Entry {
    /// The group `name`, opened with its saved options (or `options`, which
    /// are then saved) if it is not open yet. Blocking (the journal is synced
    /// when a group is created): call from `spawn_blocking`. `create: false`
    /// makes an unknown group [`walq::Error::UnknownConsumer`].
    pub(crate) fn group(
        &self,
        name: &str,
        options: Option<GroupOptions>,
        create: bool,
    ) -> Result<(Group, GroupOptions, bool), ApiError> {
        let mut groups = self.groups.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((g, o)) = groups.get(name) {
            same_options(name, options.as_ref(), o)?;
            return Ok((g.clone(), o.clone(), false));
        }
        let existing = self.queue.groups();
        let exists = existing.iter().any(|g| g.name == name);
        if !exists && !create {
            return Err(walq::Error::UnknownConsumer { kind: "group", name: name.to_string() }.into());
        }
        if !exists && existing.len() >= self.limits.groups_per_queue {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "group_limit",
                format!(
                    "queue {:?} has its maximum of {} consumer groups (max_groups_per_queue); delete one or raise the limit",
                    self.name, self.limits.groups_per_queue
                ),
            ));
        }
        let saved = self.saved.lock().unwrap_or_else(|e| e.into_inner()).groups.get(name).cloned();
        // A group's options are fixed when it is created: an existing group
        // opens with what was saved then (the defaults if nothing was).
        let opts = if exists {
            let opts = saved.unwrap_or_default();
            same_options(name, options.as_ref(), &opts)?;
            opts
        } else {
            options.clone().or(saved).unwrap_or_default()
        };
        // The options reach the disk before the group exists: a failed save
        // (or a crash) never leaves a group that reopens with the defaults.
        let before = match options.filter(|_| !exists) {
            Some(o) => {
                let mut saved = self.saved.lock().unwrap_or_else(|e| e.into_inner());
                let mut next = saved.clone();
                next.groups.insert(name.to_string(), o);
                save(&self.dir, &next)?;
                Some(std::mem::replace(&mut *saved, next))
            }
            None => None,
        };
        let group = match opts.open(&self.queue, name) {
            Ok(g) => g,
            Err(e) => {
                // Options walq refuses (or a failed creation) are not kept.
                if let Some(before) = before {
                    let mut saved = self.saved.lock().unwrap_or_else(|e| e.into_inner());
                    if save(&self.dir, &before).is_ok() {
                        *saved = before;
                    }
                }
                return Err(e.into());
            }
        };
        groups.insert(name.to_string(), (group.clone(), opts.clone()));
        Ok((group, opts, !exists))
    }

    /// Deletes group `name`: its handle here, its saved state (durably) and
    /// its saved options; its dead-letter queue stays on disk. A fetch still
    /// running holds the group: then 409 `in_use` and nothing changes.
    /// Blocking (a synced journal write): call from `spawn_blocking`.
    pub(crate) fn delete_group(&self, name: &str) -> Result<(), ApiError> {
        // Under the map's lock, so that no request opens the group meanwhile.
        // Our handle goes first: the library refuses while any is alive. If a
        // fetch still holds one, the next request finds the live group again.
        let mut groups = self.groups.lock().unwrap_or_else(|e| e.into_inner());
        drop(groups.remove(name));
        self.queue.delete_group(name)?;
        // Still under the map's lock: a new group of the same name cannot
        // save its options in between and lose them here.
        let mut saved = self.saved.lock().unwrap_or_else(|e| e.into_inner());
        if saved.groups.contains_key(name) {
            let mut next = saved.clone();
            next.groups.remove(name);
            save(&self.dir, &next)?;
            *saved = next;
        }
        drop(groups);
        Ok(())
    }

    /// 409 `consumer_limit` when creating consumer `name` would pass
    /// `max_consumers_per_queue` (an existing name is always fine). Blocking
    /// (reads the journal's image): call from `spawn_blocking`.
    pub(crate) fn check_consumer_room(&self, name: &str) -> Result<(), ApiError> {
        let consumers = self.queue.consumers();
        if consumers.len() < self.limits.consumers_per_queue || consumers.iter().any(|c| c.name == name) {
            Ok(())
        } else {
            Err(ApiError::new(
                StatusCode::CONFLICT,
                "consumer_limit",
                format!(
                    "queue {:?} has its maximum of {} named consumers (max_consumers_per_queue); delete one or raise the limit",
                    self.name, self.limits.consumers_per_queue
                ),
            ))
        }
    }
}

/// 409 `group_exists` when a request names options for an existing group
/// that differ from the ones it was created with (as RabbitMQ refuses to
/// redeclare a queue with other arguments): never a silent change, nor a
/// silent no-op.
fn same_options(name: &str, asked: Option<&GroupOptions>, current: &GroupOptions) -> Result<(), ApiError> {
    match asked {
        Some(asked) if asked.in_effect() != current.in_effect() => Err(ApiError::new(
            StatusCode::CONFLICT,
            "group_exists",
            format!(
                "group {name:?} exists with other options ({}); a group's options are fixed when it is created",
                serde_json::to_string(current).unwrap_or_default()
            ),
        )),
        _ => Ok(()),
    }
}

/// The named queues of one data directory.
#[derive(Debug)]
pub(crate) struct Registry {
    dir: PathBuf,
    defaults: QueueOptions,
    limits: Limits,
    queues: RwLock<HashMap<String, Arc<Entry>>>,
    /// Serializes queue creation (opening is blocking and must happen once per name).
    creating: tokio::sync::Mutex<()>,
    /// Set by `close_all`: no queue is opened (or reopened) after it, so a
    /// request cut off by the end of the grace period cannot append.
    closed: std::sync::atomic::AtomicBool,
    _lock: std::fs::File,
}

impl Registry {
    /// Takes the data directory (creating it) and its lock; opens nothing yet.
    pub(crate) fn new(dir: &Path, defaults: QueueOptions, limits: Limits) -> Result<Registry, ServeError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| ServeError::DataDir(format!("creating data directory {}: {e}", dir.display())))?;
        let lock_path = dir.join(LOCK_FILE);
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| ServeError::DataDir(format!("opening {}: {e}", lock_path.display())))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(ServeError::Locked(format!(
                    "data directory {} is in use by another walq serve (it holds {LOCK_FILE})",
                    dir.display()
                )));
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(ServeError::DataDir(format!("locking {}: {e}", lock_path.display())));
            }
        }
        Ok(Registry {
            dir: dir.to_path_buf(),
            defaults,
            limits,
            queues: RwLock::new(HashMap::new()),
            creating: tokio::sync::Mutex::new(()),
            closed: std::sync::atomic::AtomicBool::new(false),
            _lock: lock,
        })
    }

    /// Opens every queue of the data directory (recovery runs here); blocking.
    pub(crate) fn open_all(&self) -> Result<usize, ServeError> {
        let mut names = Vec::new();
        let listing = |e: std::io::Error| ServeError::DataDir(format!("listing {}: {e}", self.dir.display()));
        for item in std::fs::read_dir(&self.dir).map_err(listing)? {
            let item = item.map_err(listing)?;
            let Ok(name) = item.file_name().into_string() else { continue };
            if check_queue_name(&name).is_ok() && item.file_type().is_ok_and(|t| t.is_dir()) {
                names.push(name);
            } else if !name.starts_with('.') {
                tracing::warn!(entry = %name, "not a queue (not a directory, or not a valid queue name); left alone");
            }
        }
        names.sort();
        for name in &names {
            let entry = self
                .open_entry(name, None, false)
                .map_err(|source| ServeError::Open { queue: name.clone(), source })?;
            let report = entry.queue.recovery_report().clone();
            tracing::info!(queue = %name, next_offset = entry.queue.next_offset(), ?report, "queue opened");
            self.queues.write().unwrap_or_else(|e| e.into_inner()).insert(name.clone(), entry);
        }
        Ok(names.len())
    }

    fn open_entry(
        &self,
        name: &str,
        options: Option<QueueOptions>,
        create: bool,
    ) -> Result<Arc<Entry>, walq::Error> {
        let dir = self.dir.join(name);
        // An options file that cannot be read or parsed (a newer version's
        // field, a hand edit, an I/O error) stops the open: the queue's
        // durability must not silently change, and the file is left alone.
        let mut saved = load(&dir).map_err(|reason| walq::Error::InvalidOption {
            name: OPTIONS_FILE,
            reason: format!(
                "{reason}; fix the file, or remove it to open the queue with the server's defaults"
            ),
        })?;
        let explicit = options.is_some();
        let opts = match (options, &saved) {
            (Some(o), _) => o,
            (None, Some(s)) => s.queue.clone(),
            (None, None) => self.defaults.clone(),
        };
        let queue = opts.builder(&dir).create(create).open()?;
        if explicit {
            let s = saved.get_or_insert_with(Saved::default);
            s.queue = opts.clone();
            save(&dir, s)?;
        } else if saved.is_none() {
            // A queue created by a produce (or made before options were saved)
            // keeps the defaults it was opened with, whatever the defaults
            // of a later start: its durability never changes behind its users.
            let s = Saved { queue: opts.clone(), groups: BTreeMap::new() };
            match save(&dir, &s) {
                Ok(()) => saved = Some(s),
                Err(e) => {
                    tracing::warn!(queue = %name, error = %e, "could not save the queue's options; it follows the server's defaults until they are saved")
                }
            }
        }
        let saved = saved.unwrap_or(Saved { queue: opts, groups: BTreeMap::new() });
        Ok(Arc::new(Entry {
            name: name.to_string(),
            dir,
            queue: Arc::new(queue),
            options: saved.queue.clone(),
            saved: Mutex::new(saved),
            groups: Mutex::new(HashMap::new()),
            consumers: tokio::sync::Mutex::new(()),
            limits: self.limits,
        }))
    }

    /// The open queue `name`, if any.
    pub(crate) fn get(&self, name: &str) -> Option<Arc<Entry>> {
        self.queues.read().unwrap_or_else(|e| e.into_inner()).get(name).cloned()
    }

    /// The open queue `name`, or 404 `queue_not_found` (400 for a bad name).
    pub(crate) fn existing(&self, name: &str) -> Result<Arc<Entry>, ApiError> {
        check_queue_name(name)?;
        self.refuse_if_closed()?;
        self.get(name).ok_or_else(|| ApiError::queue_not_found(name))
    }

    /// 503 `shutting_down` once the queues were closed.
    fn refuse_if_closed(&self) -> Result<(), ApiError> {
        if self.closed.load(std::sync::atomic::Ordering::Acquire) {
            Err(ApiError::shutting_down())
        } else {
            Ok(())
        }
    }

    /// The queue `name`, created (with `options`, or the defaults) if it does
    /// not exist; `true` if this call created it.
    pub(crate) async fn get_or_create(
        self: &Arc<Self>,
        name: &str,
        options: Option<QueueOptions>,
    ) -> Result<(Arc<Entry>, bool), ApiError> {
        check_queue_name(name)?;
        self.refuse_if_closed()?;
        if let Some(e) = self.get(name) {
            return Ok((e, false));
        }
        let _creating = self.creating.lock().await;
        self.refuse_if_closed()?;
        if let Some(e) = self.get(name) {
            return Ok((e, false));
        }
        if self.queues.read().unwrap_or_else(|e| e.into_inner()).len() >= self.limits.queues {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "queue_limit",
                format!("the server holds its maximum of {} queues (max_queues)", self.limits.queues),
            ));
        }
        let (this, n) = (Arc::clone(self), name.to_string());
        let entry = blocking(move || this.open_entry(&n, options, true).map_err(ApiError::from)).await?;
        tracing::info!(queue = %name, "queue created");
        self.queues.write().unwrap_or_else(|e| e.into_inner()).insert(name.to_string(), Arc::clone(&entry));
        Ok((entry, true))
    }

    /// Every open queue, by name.
    pub(crate) fn list(&self) -> Vec<Arc<Entry>> {
        let mut v: Vec<_> = self.queues.read().unwrap_or_else(|e| e.into_inner()).values().cloned().collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// The names of the queues a failed write or sync poisoned, and of the
    /// open groups whose dead-letter queue is (`<queue>/dead-letters/<group>`:
    /// its terms and dead letters fail until a restart).
    pub(crate) fn poisoned(&self) -> Vec<String> {
        let mut names = Vec::new();
        for e in self.list() {
            if e.queue.is_poisoned() {
                names.push(e.name.clone());
            }
            let groups = e.groups.lock().unwrap_or_else(|e| e.into_inner());
            for (g, (group, _)) in groups.iter() {
                if group.dead_letters().is_some_and(Queue::is_poisoned) {
                    names.push(format!("{}/dead-letters/{g}", e.name));
                }
            }
        }
        names.sort();
        names
    }

    /// Syncs every queue's pending records now (blocking).
    pub(crate) fn flush_all(&self) -> Result<(), walq::Error> {
        let mut result = Ok(());
        for e in self.list() {
            if let Err(err) = e.queue.flush() {
                tracing::error!(queue = %e.name, error = %err, "flush failed");
                result = Err(err);
            }
        }
        result
    }

    /// Closes every queue: groups first (their acks are synced), then each
    /// queue (pending records synced, the directory lock released). A queue
    /// still referenced by a request that outlived the drain is flushed and
    /// released when that request ends. Blocking. Returns the first error.
    pub(crate) fn close_all(&self) -> Result<(), String> {
        // Under the creation lock: a creation under way finishes first, and
        // none starts after this (it checks `closed` under the same lock).
        let creating = self.creating.blocking_lock();
        self.closed.store(true, std::sync::atomic::Ordering::Release);
        drop(creating);
        let entries: Vec<Arc<Entry>> =
            self.queues.write().unwrap_or_else(|e| e.into_inner()).drain().map(|(_, e)| e).collect();
        let mut first_error = None;
        // A blocking task of a request that was cut off (a fetch slice, a
        // sync) may hold an entry a moment longer: wait for such tasks at most
        // one second in all, not per queue.
        let deadline = Instant::now() + Duration::from_secs(1);
        for entry in entries {
            let name = entry.name.clone();
            entry.groups.lock().unwrap_or_else(|e| e.into_inner()).clear();
            let mut entry = entry;
            let queue = loop {
                match Arc::try_unwrap(entry) {
                    Ok(e) => match Arc::try_unwrap(e.queue) {
                        Ok(q) => break Ok(q),
                        Err(q) => break Err(q),
                    },
                    Err(e) if Instant::now() < deadline => {
                        entry = e;
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(e) => break Err(Arc::clone(&e.queue)),
                }
            };
            let result = match queue {
                Ok(q) => q.close(),
                Err(shared) => {
                    tracing::warn!(queue = %name, "queue still in use at close; flushing it, its lock is released when the last request ends");
                    shared.flush()
                }
            };
            if let Err(e) = result {
                tracing::error!(queue = %name, error = %e, "closing the queue failed");
                first_error.get_or_insert_with(|| format!("closing queue {name:?}: {e}"));
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// Runs blocking work (file I/O, syncs, waits) off the runtime threads.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "a blocking task failed");
            Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "the request's task failed; see the server log",
            ))
        }
    }
}

fn load(dir: &Path) -> Result<Option<Saved>, String> {
    let path = dir.join(OPTIONS_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// Writes `serve-options.json` durably: temp file, fsync, rename, fsync the directory.
fn save(dir: &Path, saved: &Saved) -> Result<(), walq::Error> {
    use std::io::Write;
    let io = |op: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| walq::Error::Io { op, path, source }
    };
    let path = dir.join(OPTIONS_FILE);
    let tmp = dir.join(format!("{OPTIONS_FILE}.tmp"));
    let bytes = serde_json::to_vec_pretty(saved).expect("options serialize");
    let mut f = std::fs::File::create(&tmp).map_err(io("create", &tmp))?;
    f.write_all(&bytes).map_err(io("write", &tmp))?;
    f.sync_all().map_err(io("fsync", &tmp))?;
    std::fs::rename(&tmp, &path).map_err(io("rename", &path))?;
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io("fsync", dir))?;
    Ok(())
}

#[cfg(test)]
impl Registry {
    /// Puts an already open queue (a simulated one, say) under `name`.
    pub(crate) fn insert_for_test(&self, name: &str, queue: Queue) {
        let entry = Entry {
            name: name.to_string(),
            dir: self.dir.join(name),
            queue: Arc::new(queue),
            options: QueueOptions::default(),
            saved: Mutex::new(Saved::default()),
            groups: Mutex::new(HashMap::new()),
            consumers: tokio::sync::Mutex::new(()),
            limits: self.limits,
        };
        self.queues.write().unwrap_or_else(|e| e.into_inner()).insert(name.to_string(), Arc::new(entry));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_names_cannot_leave_the_data_directory() {
        for ok in ["a", "orders", "a.b_c-D9", &"x".repeat(NAME_MAX)] {
            assert!(check_queue_name(ok).is_ok(), "{ok}");
        }
        for bad in
            ["", ".", "..", ".hidden", "a/b", "../x", "a\\b", "a b", "é", "a\0", &"x".repeat(NAME_MAX + 1)]
        {
            assert_eq!(check_queue_name(bad).unwrap_err().code, "invalid_name", "{bad:?}");
        }
    }
}
