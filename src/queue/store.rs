//! Reading and acting on the queue from outside the daemon (`relay queue …`, `relay status`). Safe while the
//! daemon runs: a message still arriving has no seal yet and is not listed, a file that vanishes between the
//! listing and the read (delivered, deleted) is simply gone, and nothing here ever fails a whole listing
//! because of one file.
//!
//! Messages in `dead/` are part of what this shows and acts on: a sysadmin lists, shows and deletes them as queued
//! ones, and `requeue` moves one back into `queue/` for a fresh attempt.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::Serialize;

use super::QueueId;
use super::file::{self, FileError, QueuedMessage};
use super::layout::{FileKind, SpoolPaths, msg_path, parse_file_name, state_path};
use super::state::{DeliveryState, read_state, try_read_state, write_state};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("no message {0} in the queue (nor in dead/)")]
    NotFound(String),
    /// The state dir itself is missing: most often the wrong one (another user's default, another config).
    #[error(
        "no message {id}: the state dir {} does not exist (nothing was ever queued there: is it the one the daemon uses? `relay status` names it)",
        path.display()
    )]
    NoStateDir { id: String, path: PathBuf },
    /// Moved to `quarantine/`: relay could not deliver from it, and does not touch it again.
    #[error(
        "message {id} is in quarantine/ ({}): relay moved it there because it could not deliver from it (the log's `quarantined` line says why); it is not delivered until a person looks at it and moves it back to queue/",
        path.display()
    )]
    Quarantined { id: String, path: PathBuf },
    /// Only a crash or a hand-made copy puts one id in both places; which copy is right is for a person to say.
    #[error(
        "message {0} is both in queue/ and in dead/: delete or move one of the two by hand, then try again"
    )]
    InBoth(String),
    /// A delivery attempt holds the message's lock: deleted now, it would be reported gone while the upstream takes
    /// it; moved back from dead/ now, the attempt's move to dead/ could still be finishing.
    #[error(
        "message {id} is in a delivery attempt right now: not {what}. If the upstream takes it, it leaves the queue by itself; run the command again in a moment (`relay queue show {id}` says where it is then)"
    )]
    Busy { id: String, what: &'static str },
    /// A dead message whose state file cannot be read is not moved back: the state names the recipients it already
    /// reached, who would get it again.
    #[error(
        "{path}: cannot read the message's delivery state ({source}); moved back as it is, it would go again to the recipients it already reached: fix or remove that file, then retry"
    )]
    State { path: PathBuf, source: io::Error },
    #[error("`{0}` is not a queue id (32 hex digits, as `relay queue list` prints them)")]
    BadId(String),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error(transparent)]
    File(#[from] FileError),
    /// Asked to act on a file that is not a message relay can read.
    #[error(
        "{0}; left as it is (the daemon moves such a file to quarantine/ when it meets it: look at it there)"
    )]
    Unreadable(FileError),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A directory's messages in the order `relay queue list` prints them: see [`QueueStore::order`].
pub struct Order {
    place: Place,
    ids: Vec<(SystemTime, QueueId)>,
    unreadable: usize,
}

/// Where a message is: waiting in `queue/` (deferred ones included: they have attempts), or failed for good and
/// kept in `dead/`. JSON `"state": "queued"` or `"dead"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Place {
    Queued,
    Dead,
}

/// A message with where its delivery stands (from `ID.state`), as `relay queue list` and `show` print it.
/// Never tried: no attempts, no next try (it is due), no error. Dead: its attempts and last error, no next try.
#[derive(Debug, Clone, Serialize)]
pub struct QueueEntry {
    #[serde(flatten)]
    pub message: QueuedMessage,
    pub state: Place,
    pub attempts: u32,
    #[serde(with = "humantime_serde::option")]
    pub next_attempt: Option<SystemTime>,
    pub last_error: Option<String>,
    /// Recipients an earlier attempt finished with (the upstream took it for them, or refused them for good):
    /// the next attempts go to the others only.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub finished: Vec<String>,
    /// When `relay queue retry` last moved it back from `dead/`.
    #[serde(
        with = "humantime_serde::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub requeued_at: Option<SystemTime>,
    /// Until when the account's sending limits (or a pause its provider asked for) hold it, as the daemon last
    /// said: a long hold only (a day's limit), not the seconds of a per-minute one.
    #[serde(
        with = "humantime_serde::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub held_until: Option<SystemTime>,
    /// A delivery attempt holds it right now: its next try and last error are from before this attempt.
    pub sending: bool,
}

/// What [`QueueStore::delete_where`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Deleted {
    pub deleted: usize,
    /// Held by a delivery attempt at that moment: left.
    pub busy: usize,
    /// Files that cannot be read as messages: not looked at, not removed.
    pub unreadable: usize,
    /// Messages that could not be removed, and the first reason.
    pub failed: usize,
    pub first_error: Option<String>,
}

/// The queue as seen from the state dir.
pub struct QueueStore {
    paths: SpoolPaths,
}

impl QueueStore {
    pub fn new(state_dir: &Path) -> QueueStore {
        QueueStore {
            paths: SpoolPaths::new(state_dir),
        }
    }

    pub fn paths(&self) -> &SpoolPaths {
        &self.paths
    }

    /// The state dir, when it does not exist: every listing is then empty, and saying so tells a wrong state dir
    /// (another user's default, another config) from an empty queue.
    pub fn missing_state_dir(&self) -> Option<&Path> {
        let dir = self.paths.state_dir();
        (!dir.exists()).then_some(dir)
    }

    /// Every message of `place` with its delivery state, oldest first, and how many files there could not be
    /// read (left out of the list, so that the one who reads it must be told).
    #[cfg(test)]
    pub fn entries(&self, place: Place) -> Result<(Vec<QueueEntry>, usize), StoreError> {
        let mut entries = Vec::new();
        let unreadable = self.each_entry(self.order(place)?, |e| {
            entries.push(e);
            Ok::<(), StoreError>(())
        })?;
        Ok((entries, unreadable))
    }

    /// The messages of `place`, oldest first, by arrival time and id only (32 bytes each): listing a backlog of
    /// any size costs little memory. Read before anything is printed, so that a directory that cannot be read
    /// fails the command before any output.
    pub fn order(&self, place: Place) -> Result<Order, StoreError> {
        let mut ids = Vec::new();
        let unreadable = self.each(self.dir(place), |m| {
            ids.push((m.envelope.received_at, m.envelope.id))
        })?;
        ids.sort_unstable();
        Ok(Order {
            place,
            ids,
            unreadable,
        })
    }

    /// Each message of `order` with its delivery state, read again as it is handed to `seen`; says how many
    /// files could not be read, then or now. A message gone since (delivered, deleted) is left out.
    pub fn each_entry<E: From<StoreError>>(
        &self,
        order: Order,
        mut seen: impl FnMut(QueueEntry) -> Result<(), E>,
    ) -> Result<usize, E> {
        let dir = self.dir(order.place);
        let mut unreadable = order.unreadable;
        let locked = match order.place {
            Place::Queued => locked_files(),
            Place::Dead => HashSet::new(),
        };
        for (_, id) in order.ids {
            let path = msg_path(dir, id);
            match read_sealed(&path) {
                Ok(Some(m)) => seen(self.with_state(m, order.place, is_locked(&locked, &path)))?,
                Ok(None) => {}
                Err(_) => unreadable += 1,
            }
        }
        Ok(unreadable)
    }

    /// One message, queued or dead, with its delivery state.
    pub fn entry(&self, id: QueueId) -> Result<QueueEntry, StoreError> {
        // queue/ before dead/, the way the daemon moves messages: one moved meanwhile is still found.
        match self.get(id) {
            Ok(m) => {
                let sending = is_locked(&locked_files(), &m.path);
                return Ok(self.with_state(m, Place::Queued, sending));
            }
            Err(
                StoreError::NotFound(_)
                | StoreError::NoStateDir { .. }
                | StoreError::Quarantined { .. },
            ) => {}
            Err(e) => return Err(e),
        }
        match read_sealed(&msg_path(&self.paths.dead, id))? {
            Some(m) => Ok(self.with_state(m, Place::Dead, false)),
            None => Err(self.not_found(id)),
        }
    }

    pub fn dir(&self, place: Place) -> &Path {
        match place {
            Place::Queued => &self.paths.queue,
            Place::Dead => &self.paths.dead,
        }
    }

    fn with_state(&self, message: QueuedMessage, place: Place, sending: bool) -> QueueEntry {
        let state = read_state(self.dir(place), message.envelope.id);
        QueueEntry {
            message,
            state: place,
            attempts: state.attempts,
            next_attempt: match place {
                Place::Queued => state.next_attempt,
                Place::Dead => None,
            },
            last_error: state.last_error,
            finished: state.finished,
            requeued_at: state.requeued_at,
            held_until: match place {
                Place::Queued => state.held_until.filter(|t| *t > SystemTime::now()),
                Place::Dead => None,
            },
            sending,
        }
    }

    /// Not found: in a state dir that exists, or because it does not.
    fn not_found(&self, id: QueueId) -> StoreError {
        let quarantined = msg_path(&self.paths.quarantine, id);
        match self.missing_state_dir() {
            Some(dir) => StoreError::NoStateDir {
                id: id.to_string(),
                path: dir.to_path_buf(),
            },
            None if fs::symlink_metadata(&quarantined).is_ok() => StoreError::Quarantined {
                id: id.to_string(),
                path: quarantined,
            },
            None => StoreError::NotFound(id.to_string()),
        }
    }

    /// Message files in `quarantine/`.
    pub fn count_quarantined(&self) -> Result<usize, StoreError> {
        let entries = match fs::read_dir(&self.paths.quarantine) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(io_err(&self.paths.quarantine)(e)),
        };
        Ok(entries
            .flatten()
            .filter(|e| parse_file_name(&e.path()).is_some_and(|(_, k)| k == FileKind::Message))
            .count())
    }

    /// Hands each sealed message of `dir` to `seen` as it is read (nothing is held), and says how many files
    /// there could not be read.
    pub fn each(
        &self,
        dir: &Path,
        mut seen: impl FnMut(QueuedMessage),
    ) -> Result<usize, StoreError> {
        let entries = match fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(io_err(dir)(e)),
        };
        let mut unreadable = 0;
        for entry in entries {
            let path = entry.map_err(io_err(dir))?.path();
            if !parse_file_name(&path).is_some_and(|(_, k)| k == FileKind::Message) {
                continue;
            }
            match file::read(&path) {
                Ok(m) => seen(m),
                // Still arriving, or gone between the listing and the read.
                Err(FileError::Unsealed { .. }) => {}
                Err(e) if e.is_not_found() => {}
                Err(_) => unreadable += 1,
            }
        }
        Ok(unreadable)
    }

    pub fn parse_id(s: &str) -> Result<QueueId, StoreError> {
        QueueId::parse(s).ok_or_else(|| StoreError::BadId(s.to_string()))
    }

    /// A message in `queue/` (not `dead/`).
    pub fn get(&self, id: QueueId) -> Result<QueuedMessage, StoreError> {
        read_sealed(&msg_path(&self.paths.queue, id))?.ok_or_else(|| self.not_found(id))
    }

    /// Removes a message, queued or dead, for good; its state file after it (one left alone in `queue/` is
    /// cleaned up at start). Says where it was.
    pub fn delete(&self, id: QueueId) -> Result<Place, StoreError> {
        // queue/ before dead/, the way the daemon moves messages: one moved meanwhile is still found.
        for place in [Place::Queued, Place::Dead] {
            let dir = self.dir(place);
            let path = msg_path(dir, id);
            // A delivery attempt locks the file for its whole length (`delivery.rs`); held here until the file is
            // gone, so that an attempt starting meanwhile finds it locked, then gone.
            let file = match crate::small_files::open_regular(&path) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                other => other.map_err(io_err(&path))?,
            };
            lock(&file, &path, id, "deleted")?;
            match fs::remove_file(&path) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                other => other.map_err(io_err(&path))?,
            }
            let _ = fs::remove_file(state_path(dir, id));
            sync_dir(dir)?;
            return Ok(place);
        }
        Err(self.not_found(id))
    }

    /// Removes every message of `place` that `matches` (`relay queue delete --all`, `--dead`), as [`delete`]
    /// does one, with one flush of the directory at the end rather than one per message: a purge of a backlog of
    /// tens of thousands (a device that sent spam) takes seconds, not minutes. A message an attempt holds is left
    /// and counted; one still arriving (not sealed) is not seen.
    ///
    /// [`delete`]: Self::delete
    pub fn delete_where(
        &self,
        place: Place,
        matches: impl Fn(&super::Envelope) -> bool,
    ) -> Result<Deleted, StoreError> {
        let dir = self.dir(place);
        // Ids only (16 bytes each), read before anything is removed.
        let mut ids = Vec::new();
        let mut done = Deleted {
            unreadable: self.each(dir, |m| {
                if matches(&m.envelope) {
                    ids.push(m.envelope.id);
                }
            })?,
            ..Deleted::default()
        };
        // Past an error the others are still deleted, and the directory flushed for those that were: one
        // left behind by an early return could come back after a power cut, and be sent.
        for id in ids {
            let path = msg_path(dir, id);
            let removed = crate::small_files::open_regular(&path)
                .map_err(io_err(&path))
                .and_then(|file| {
                    lock(&file, &path, id, "deleted")?;
                    fs::remove_file(&path).map_err(io_err(&path))
                });
            match removed {
                Ok(()) => {
                    let _ = fs::remove_file(state_path(dir, id));
                    done.deleted += 1;
                }
                Err(StoreError::Busy { .. }) => done.busy += 1,
                Err(StoreError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    done.failed += 1;
                    done.first_error.get_or_insert_with(|| e.to_string());
                }
            }
        }
        if done.deleted > 0 {
            sync_dir(dir)?;
        }
        Ok(done)
    }

    /// Moves a dead message back into `queue/` for a fresh attempt, safe while the daemon runs: its new state
    /// (no attempts, no error, due now, `max_age` counted from now, and the recipients it already reached kept)
    /// is written into `queue/` first, then the message is renamed there, then its old state is removed from
    /// `dead/`. The daemon acts on message files only, so it never sees the message without its state (which
    /// would send it again to those recipients); a crash before the rename leaves it dead, with a spare state
    /// file in `queue/` that start-up removes, and one after it a spare state file in `dead/`, which nothing
    /// reads. The rename never replaces a file: the message is moved or left where it was, never lost. A message
    /// whose attempt is still finishing its move to `dead/` holds its lock, and is left (`Busy`). Tell the
    /// daemon afterwards ([`super::retry::touch_trigger`]).
    pub fn requeue(&self, id: QueueId) -> Result<(), StoreError> {
        let dead = msg_path(&self.paths.dead, id);
        // Only a message relay wrote and sealed goes back.
        let file = match file::read_open(&dead) {
            Ok((_, file)) => file,
            Err(e) if e.is_not_found() => return Err(self.not_found(id)),
            Err(FileError::Unsealed { .. }) => return Err(self.not_found(id)),
            Err(e) => return Err(e.into()),
        };
        // The attempt that moved it to dead/ holds this lock until it has dealt with the state files too: moved
        // back before then, its state (the recipients already reached) could be removed under it.
        lock(&file, &dead, id, "moved back")?;
        let queued = msg_path(&self.paths.queue, id);
        if fs::symlink_metadata(&queued).is_ok() {
            return Err(StoreError::InBoth(id.to_string()));
        }
        let old = try_read_state(&self.paths.dead, id).map_err(|source| StoreError::State {
            path: state_path(&self.paths.dead, id),
            source,
        })?;
        // The Graph drafts an attempt left go along: the next attempt asks them before it sends again.
        let (finished, drafts) = old.map(|s| (s.finished, s.drafts)).unwrap_or_default();
        let state = DeliveryState {
            finished,
            drafts,
            requeued_at: Some(SystemTime::now()),
            ..DeliveryState::default()
        };
        write_state(&self.paths.queue, id, &state)
            .map_err(io_err(&state_path(&self.paths.queue, id)))?;
        match rename_new(&dead, &queued) {
            Ok(()) => {}
            // Deleted or moved back by someone else meanwhile. The state just written stays: if the message is
            // in queue/ now, it is its state.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(self.not_found(id)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(StoreError::InBoth(id.to_string()));
            }
            Err(e) => return Err(io_err(&queued)(e)),
        }
        sync_dir(&self.paths.queue)?;
        let _ = fs::remove_file(state_path(&self.paths.dead, id));
        sync_dir(&self.paths.dead)
    }
}

/// Files under a `flock` of any process, as (device, inode), from `/proc/locks`: a delivery attempt holds its
/// message's lock for its whole length (`delivery.rs`), so this tells a message being sent. Read, not tried: a
/// lock this command took, even for an instant, would make an attempt starting then put the message off. Empty
/// where `/proc/locks` cannot be read: nothing is marked then.
///
/// By inode alone: /proc/locks names the superblock's device, which `stat` does not give on btrfs subvolumes or
/// overlay filesystems. Another file with the same inode number on another filesystem would only show a message
/// as being sent.
fn locked_files() -> HashSet<u64> {
    fs::read_to_string("/proc/locks")
        .map(|text| {
            text.lines()
                .filter_map(flock_of)
                .map(|(_, ino)| ino)
                .collect()
        })
        .unwrap_or_default()
}

/// `1: FLOCK  ADVISORY  WRITE 4242 fd:01:1234567 0 EOF` → (device, inode); a waiter's line (`1: -> FLOCK …`)
/// and POSIX locks are not attempts' locks.
fn flock_of(line: &str) -> Option<(u64, u64)> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    if fields.get(1) != Some(&"FLOCK") {
        return None;
    }
    let mut id = fields.get(5)?.split(':');
    let major = u32::from_str_radix(id.next()?, 16).ok()?;
    let minor = u32::from_str_radix(id.next()?, 16).ok()?;
    let inode = id.next()?.parse().ok()?;
    Some((libc::makedev(major, minor), inode))
}

fn is_locked(locked: &HashSet<u64>, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    !locked.is_empty() && fs::metadata(path).is_ok_and(|m| locked.contains(&m.ino()))
}

/// Takes a message file's lock, which a delivery attempt holds for its whole length (`delivery.rs`).
pub(super) fn lock(
    file: &File,
    path: &Path,
    id: QueueId,
    what: &'static str,
) -> Result<(), StoreError> {
    match file.try_lock() {
        Ok(()) => Ok(()),
        Err(fs::TryLockError::WouldBlock) => Err(StoreError::Busy {
            id: id.to_string(),
            what,
        }),
        Err(fs::TryLockError::Error(e)) => Err(io_err(path)(e)),
    }
}

/// The sealed message at `path`, or `None` when there is none (or one still arriving, not yet acknowledged).
fn read_sealed(path: &Path) -> Result<Option<QueuedMessage>, StoreError> {
    match file::read(path) {
        Ok(m) => Ok(Some(m)),
        Err(e) if e.is_not_found() => Ok(None),
        Err(FileError::Unsealed { .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

/// `rename` that fails with `AlreadyExists` rather than replace `to` (Linux's `RENAME_NOREPLACE`).
fn rename_new(from: &Path, to: &Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes());
    let (from_c, to_c) = (c(from)?, c(to)?);
    // SAFETY: two NUL-terminated paths that live across the call, relative to the working directory.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            from_c.as_ptr(),
            libc::AT_FDCWD,
            to_c.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        // A kernel or filesystem without it: checked, then renamed. Only another `relay queue retry` of the same
        // message could come in between, and it would move the same bytes.
        Some(libc::ENOSYS | libc::EINVAL) => {
            if fs::symlink_metadata(to).is_ok() {
                return Err(io::ErrorKind::AlreadyExists.into());
            }
            fs::rename(from, to)
        }
        _ => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::Envelope;
    use crate::queue::retry::{Retried, Retry, retry};

    /// A sealed message in `dir`, as the spool writes it; its id.
    fn write_message(dir: &Path, recipients: &[&str]) -> QueueId {
        let envelope = Envelope {
            helo: Some("device.lan".into()),
            ..Envelope::example("a@example.com", recipients)
        };
        let body = b"Subject: x\r\n\r\nhi\r\n";
        let mut bytes = file::unsealed_line(&envelope);
        let seal = file::seal_for(body.len() as u64, &blake3::hash(body));
        bytes[file::SEAL_AT..file::SEAL_AT + seal.len()].copy_from_slice(seal.as_bytes());
        bytes.extend_from_slice(body);
        fs::create_dir_all(dir).unwrap();
        fs::write(msg_path(dir, envelope.id), bytes).unwrap();
        envelope.id
    }

    fn store() -> (tempfile::TempDir, QueueStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = QueueStore::new(dir.path());
        fs::create_dir_all(&store.paths().queue).unwrap();
        fs::create_dir_all(&store.paths().dead).unwrap();
        (dir, store)
    }

    #[test]
    fn a_dead_message_goes_back_with_a_fresh_state_that_keeps_its_finished_recipients() {
        let (_dir, store) = store();
        let paths = store.paths().clone();
        let id = write_message(&paths.dead, &["a@x", "b@x"]);
        let mut dead = DeliveryState {
            finished: vec!["a@x".into()],
            ..DeliveryState::default()
        };
        dead.failed("554 5.7.1 refused");
        write_state(&paths.dead, id, &dead).unwrap();
        let entry = store.entry(id).unwrap();
        assert_eq!(entry.state, Place::Dead);
        assert_eq!(entry.last_error.as_deref(), Some("554 5.7.1 refused"));

        store.requeue(id).unwrap();
        assert!(!msg_path(&paths.dead, id).exists());
        assert!(!state_path(&paths.dead, id).exists());
        let state = try_read_state(&paths.queue, id).unwrap().unwrap();
        assert_eq!((state.attempts, state.next_attempt), (0, None));
        assert_eq!(state.last_error, None);
        assert_eq!(state.finished, ["a@x"]);
        assert!(state.requeued_at.is_some());
        let entry = store.entry(id).unwrap();
        assert_eq!(entry.state, Place::Queued);
        assert_eq!(entry.message.envelope.recipients, ["a@x", "b@x"]);
        assert!(matches!(store.requeue(id), Err(StoreError::NotFound(_))));
    }

    #[test]
    fn a_dead_message_is_never_moved_over_a_queued_one_nor_without_its_state() {
        let (_dir, store) = store();
        let paths = store.paths().clone();
        let id = write_message(&paths.dead, &["a@x"]);
        fs::copy(msg_path(&paths.dead, id), msg_path(&paths.queue, id)).unwrap();
        assert!(matches!(store.requeue(id), Err(StoreError::InBoth(_))));
        assert!(msg_path(&paths.dead, id).exists());
        fs::remove_file(msg_path(&paths.queue, id)).unwrap();

        fs::write(state_path(&paths.dead, id), "{ garbage").unwrap();
        let e = store.requeue(id).unwrap_err();
        assert!(matches!(e, StoreError::State { .. }), "{e}");
        assert!(e.to_string().contains(".state"), "{e}");
        assert!(msg_path(&paths.dead, id).exists(), "left where it was");
        assert!(!state_path(&paths.queue, id).exists());

        // Without a state file at all it goes back as never tried.
        fs::remove_file(state_path(&paths.dead, id)).unwrap();
        store.requeue(id).unwrap();
        assert!(msg_path(&paths.queue, id).exists());
    }

    #[test]
    fn the_renaming_never_replaces_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        fs::write(&a, "a").unwrap();
        fs::write(&b, "b").unwrap();
        assert_eq!(
            rename_new(&a, &b).unwrap_err().kind(),
            io::ErrorKind::AlreadyExists
        );
        assert_eq!(fs::read_to_string(&b).unwrap(), "b");
        fs::remove_file(&b).unwrap();
        rename_new(&a, &b).unwrap();
        assert_eq!(fs::read_to_string(&b).unwrap(), "a");
        assert!(!a.exists());
    }

    #[test]
    fn delete_finds_a_message_queued_or_dead_and_removes_its_state() {
        let (_dir, store) = store();
        let paths = store.paths().clone();
        let queued = write_message(&paths.queue, &["a@x"]);
        let dead = write_message(&paths.dead, &["a@x"]);
        write_state(&paths.dead, dead, &DeliveryState::default()).unwrap();
        assert_eq!(store.delete(queued).unwrap(), Place::Queued);
        assert_eq!(store.delete(dead).unwrap(), Place::Dead);
        assert!(!state_path(&paths.dead, dead).exists());
        assert!(matches!(store.delete(dead), Err(StoreError::NotFound(_))));
        assert!(matches!(store.entry(dead), Err(StoreError::NotFound(_))));
    }

    #[test]
    fn delete_and_requeue_leave_a_message_whose_attempt_holds_its_lock() {
        let (_dir, store) = store();
        let paths = store.paths().clone();
        let id = write_message(&paths.queue, &["a@x"]);
        let attempt = File::open(msg_path(&paths.queue, id)).unwrap();
        attempt.try_lock().unwrap();
        assert!(matches!(store.delete(id), Err(StoreError::Busy { .. })));
        assert!(msg_path(&paths.queue, id).exists());
        drop(attempt);
        assert_eq!(store.delete(id).unwrap(), Place::Queued);

        let dead = write_message(&paths.dead, &["a@x"]);
        let attempt = File::open(msg_path(&paths.dead, dead)).unwrap();
        attempt.try_lock().unwrap();
        assert!(matches!(store.requeue(dead), Err(StoreError::Busy { .. })));
        assert!(!state_path(&paths.queue, dead).exists(), "nothing written");
        drop(attempt);
        store.requeue(dead).unwrap();
        assert!(msg_path(&paths.queue, dead).exists());
    }

    #[test]
    fn a_message_an_attempt_holds_is_listed_as_being_sent() {
        let (_dir, store) = store();
        let paths = store.paths().clone();
        let id = write_message(&paths.queue, &["a@x"]);
        let other = write_message(&paths.queue, &["b@x"]);
        let attempt = File::open(msg_path(&paths.queue, id)).unwrap();
        attempt.try_lock().unwrap();
        let (entries, _) = store.entries(Place::Queued).unwrap();
        let sending = |i| {
            entries
                .iter()
                .find(|e| e.message.envelope.id == i)
                .unwrap()
                .sending
        };
        assert!(sending(id) && !sending(other));
        assert!(store.entry(id).unwrap().sending);
        drop(attempt);
        assert!(!store.entry(id).unwrap().sending);
    }

    #[test]
    fn delete_where_removes_the_matching_messages_and_leaves_one_being_sent() {
        let (_dir, store) = store();
        let paths = store.paths().clone();
        let spam: Vec<QueueId> = (0..3)
            .map(|_| write_message(&paths.queue, &["a@x"]))
            .collect();
        let kept = write_message(&paths.queue, &["keep@x"]);
        write_state(&paths.queue, spam[0], &DeliveryState::default()).unwrap();
        let attempt = File::open(msg_path(&paths.queue, spam[2])).unwrap();
        attempt.try_lock().unwrap();
        let done = store
            .delete_where(Place::Queued, |e| e.recipients == ["a@x"])
            .unwrap();
        assert_eq!((done.deleted, done.busy), (2, 1));
        assert!(!msg_path(&paths.queue, spam[0]).exists());
        assert!(!state_path(&paths.queue, spam[0]).exists());
        assert!(
            msg_path(&paths.queue, spam[2]).exists(),
            "held by its attempt"
        );
        assert!(msg_path(&paths.queue, kept).exists());
        assert_eq!(
            store.delete_where(Place::Dead, |_| true).unwrap(),
            Deleted::default()
        );
    }

    #[test]
    fn proc_locks_lines_are_read_as_flocks_only() {
        let dev = libc::makedev(0xfd, 0x01);
        assert_eq!(
            flock_of("1: FLOCK  ADVISORY  WRITE 4242 fd:01:1234567 0 EOF"),
            Some((dev, 1234567))
        );
        assert_eq!(
            flock_of("1: -> FLOCK  ADVISORY  WRITE 4243 fd:01:1234567 0 EOF"),
            None
        );
        assert_eq!(flock_of("2: POSIX  ADVISORY  WRITE 99 fd:01:7 0 EOF"), None);
        assert_eq!(flock_of("3: FLOCK  ADVISORY  WRITE 1 garbage 0 EOF"), None);
        assert_eq!(flock_of(""), None);
    }

    #[test]
    fn retry_all_moves_dead_mail_only_when_asked() {
        let (dir, store) = store();
        let paths = store.paths().clone();
        let queued = write_message(&paths.queue, &["a@x"]);
        write_state(
            &paths.queue,
            queued,
            &DeliveryState {
                attempts: 1,
                next_attempt: Some(SystemTime::now() + std::time::Duration::from_secs(600)),
                ..DeliveryState::default()
            },
        )
        .unwrap();
        write_message(&paths.dead, &["a@x"]);
        let done = retry(dir.path(), Retry::All { dead: false }).unwrap();
        assert_eq!(
            done,
            Retried {
                due: 1,
                requeued: 0,
                dead_left: 1
            }
        );
        assert_eq!(read_state(&paths.queue, queued).next_attempt, None);
        let done = retry(dir.path(), Retry::All { dead: true }).unwrap();
        assert_eq!((done.due, done.requeued, done.dead_left), (1, 1, 0));
        assert_eq!(store.entries(Place::Queued).unwrap().0.len(), 2);
        assert!(store.entries(Place::Dead).unwrap().0.is_empty());
    }

    #[test]
    fn a_missing_state_dir_is_an_empty_queue_and_no_message() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nowhere");
        let store = QueueStore::new(&missing);
        assert_eq!(store.missing_state_dir(), Some(missing.as_path()));
        assert!(store.entries(Place::Queued).unwrap().0.is_empty());
        assert!(store.entries(Place::Dead).unwrap().0.is_empty());
        assert_eq!(
            retry(&missing, Retry::All { dead: true }).unwrap(),
            Retried::default()
        );
        let id = QueueId::new();
        for e in [
            store.entry(id).unwrap_err(),
            store.delete(id).unwrap_err(),
            store.requeue(id).unwrap_err(),
            retry(&missing, Retry::One(id)).unwrap_err(),
        ] {
            assert!(matches!(e, StoreError::NoStateDir { .. }), "{e}");
            assert!(e.to_string().contains("nowhere"), "{e}");
        }
        assert!(!missing.exists());
    }
}
