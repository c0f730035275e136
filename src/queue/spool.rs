//! Writing messages into the queue durably.
//!
//! A message is one file, `queue/ID.msg`: its envelope line (with a seal, see `seal.rs`), then the message. A
//! session streams the body into an [`Incoming`]: small messages stay in a bounded buffer, larger ones spill to
//! the file as they arrive. At the final dot the session calls [`Incoming::commit`], which hands the message to
//! the committer thread. The committer takes every message waiting at that moment as one batch (group commit),
//! plus those whose final dot arrives within a moment while they are still being received ([`LINGER`]): it
//! writes them out with their seals, flushes them with one disk flush, and only then answers each session,
//! which then says 250 to its client.
//!
//! One file and one flush per batch are the two costs that matter here: creating a file is the costliest step of
//! accepting a message, and a disk flush is the longest wait. A lone message is flushed on its own (fdatasync of
//! the file, and at the same time of `queue/` where the filesystem needs it: [`LoneFlush`]), so a quiet relay never waits on
//! other programs' data.
//!
//! The seal is the last thing written before the flush (`file.rs`). At start-up, a file in `queue/` whose seal
//! slot still holds the placeholder is removed: it was still arriving when relay stopped, and its client never
//! heard 250. A file that is not what relay writes goes to `quarantine/`, never away.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::file::{self, FileError, SEAL_AT};
use super::layout::{FileKind, SpoolPaths, msg_path, parse_file_name};
use super::{Envelope, QueueId};

/// In-memory part of a message before it spills to its file. Most device mail (a scan, an alert) fits.
const SPILL_AT: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("cannot write to the spool at {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("the spool's committer has stopped")]
    Stopped,
    #[error("another relay is already running on this state dir ({path} is locked)")]
    Locked { path: PathBuf },
    #[error(
        "{path}: the file was removed while it was being written (is another relay using this state dir?)"
    )]
    Unlinked { path: PathBuf },
}

impl SpoolError {
    /// The filesystem is out of space or inodes (or the user's quota): the reply says storage, not an error.
    pub fn is_full(&self) -> bool {
        // By kind too: a flush's error is rebuilt from its kind and text, without the errno.
        matches!(self, SpoolError::Io { source, .. }
            if matches!(source.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT))
                || matches!(source.kind(), io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded))
    }

    fn io(path: &Path, source: io::Error) -> SpoolError {
        SpoolError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// The queue's write side, shared by every session.
#[derive(Clone)]
pub struct Spool {
    inner: Arc<Inner>,
}

struct Inner {
    paths: SpoolPaths,
    owner: Owner,
    jobs: mpsc::Sender<Job>,
    /// Messages between DATA and their commit, for the committer's wait ([`LINGER`]).
    arriving: Arc<AtomicUsize>,
    /// Whether a new message may begin (the queue filesystem's free space).
    room: super::room::Room,
    /// `STATE_DIR/.lock` and the state dir itself, held (flock) while the spool is open: a second daemon on the
    /// same state dir would take unsealed files of this one's sessions for leftovers and remove them.
    _lock: (File, Option<File>),
}

struct Job {
    id: QueueId,
    /// The file, if the body spilled; its envelope line still holds the placeholder.
    file: Option<File>,
    /// The bytes not yet in the file (all of them, envelope line first, if the body never spilled).
    tail: Vec<u8>,
    seal: String,
    done: oneshot::Sender<Result<(), SpoolError>>,
}

impl Spool {
    /// Creates the queue directories if needed, removes what an interrupted run left unsealed, and starts the
    /// committer. Each message made durable is announced on `committed`, for delivery. `progress` is told how
    /// many files have been looked at, every [`PROGRESS_EVERY`], while the queue is checked.
    pub fn open(
        state_dir: &Path,
        committed: Option<super::announce::Announcer>,
        progress: &mut dyn FnMut(u64),
    ) -> Result<Spool, SpoolError> {
        let paths = SpoolPaths::new(state_dir);
        // Made by root (`sudo relay serve`), they go to the state dir's owner, so that the service's user can
        // still use them afterwards.
        for dir in [state_dir, &paths.queue, &paths.dead, &paths.quarantine] {
            crate::state_files::create_dir_all(dir).map_err(|e| SpoolError::io(dir, e))?;
        }
        // The directories' own entries, made durable once: a message flushed into a `queue/` that the first start
        // just created must not vanish with its directory at a power cut. (The state dir's parent may not be
        // ours to open; systemd's StateDirectory= made it long ago.)
        for dir in [state_dir.parent(), Some(state_dir)].into_iter().flatten() {
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        let lock = lock_state_dir(state_dir)?;
        can_write(&paths.queue)?;
        let owner = owner_for_root(&paths.queue);
        recover(&paths, progress)?;
        let (tx, rx) = mpsc::channel();
        let committer_paths = paths.clone();
        let arriving = Arc::new(AtomicUsize::new(0));
        let committer_arriving = arriving.clone();
        let room = super::room::Room::new(
            File::open(&paths.queue).map_err(|e| SpoolError::io(&paths.queue, e))?,
        );
        let lone = LoneFlush::for_dir(&paths.queue);
        tracing::debug!(queue = %paths.queue.display(), ?lone, "how a lone message is flushed");
        std::thread::Builder::new()
            .name("relay-commit".into())
            .spawn(move || {
                committer(
                    committer_paths,
                    owner,
                    lone,
                    committer_arriving,
                    rx,
                    committed,
                )
            })
            .map_err(|e| SpoolError::io(&paths.queue, e))?;
        Ok(Spool {
            inner: Arc::new(Inner {
                paths,
                owner,
                jobs: tx,
                arriving,
                room,
                _lock: lock,
            }),
        })
    }

    pub fn paths(&self) -> &SpoolPaths {
        &self.inner.paths
    }

    /// Whether a message of `size` bytes (0: not declared) may begin, leaving `reserve` bytes free.
    pub fn has_room(&self, size: u64, reserve: u64) -> super::room::Admission {
        self.inner.room.admits(size, reserve)
    }

    /// Queues a whole message that relay wrote itself (a delivery status notification), without waiting: the
    /// committer makes it durable with the next batch, and the returned receiver says how that went. For callers
    /// that must not wait (delivery's blocking work, which may run while the runtime shuts down).
    pub fn submit(
        &self,
        envelope: &Envelope,
        message: &[u8],
    ) -> Result<oneshot::Receiver<Result<(), SpoolError>>, SpoolError> {
        let mut tail = file::unsealed_line(envelope);
        tail.extend_from_slice(message);
        let (done, wait) = oneshot::channel();
        let job = Job {
            id: envelope.id,
            file: None,
            tail,
            seal: file::seal_for(message.len() as u64, &blake3::hash(message)),
            done,
        };
        self.inner.jobs.send(job).map_err(|_| SpoolError::Stopped)?;
        Ok(wait)
    }

    /// Starts a new message: its envelope goes first, the message bytes follow with [`Incoming::write`].
    pub fn begin(&self, envelope: &Envelope) -> Incoming {
        let mut buf = Vec::with_capacity(8192);
        buf.extend_from_slice(&file::unsealed_line(envelope));
        Incoming {
            arriving: Some(Arriving::new(&self.inner.arriving)),
            spool: self.inner.clone(),
            id: envelope.id,
            buf,
            file: None,
            len: 0,
            hash: blake3::Hasher::new(),
        }
    }
}

/// A message being received. Dropping it without [`commit`](Incoming::commit) discards it.
pub struct Incoming {
    /// Counted among the arriving until it is handed to the committer (or dropped).
    arriving: Option<Arriving>,
    spool: Arc<Inner>,
    id: QueueId,
    buf: Vec<u8>,
    file: Option<File>,
    len: u64,
    hash: blake3::Hasher,
}

impl Incoming {
    pub fn id(&self) -> QueueId {
        self.id
    }

    /// Message bytes taken so far (the envelope line not counted).
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub async fn write(&mut self, data: &[u8]) -> Result<(), SpoolError> {
        self.buf.extend_from_slice(data);
        self.hash.update(data);
        self.len += data.len() as u64;
        if self.buf.len() >= SPILL_AT {
            self.spill().await?;
        }
        Ok(())
    }

    /// Moves the buffer to the file on the blocking pool, so the runtime's threads never wait on disk.
    async fn spill(&mut self) -> Result<(), SpoolError> {
        let path = msg_path(&self.spool.paths.queue, self.id);
        let owner = self.spool.owner;
        let mut file = self.file.take();
        let buf = std::mem::take(&mut self.buf);
        let (file, mut buf, result) = tokio::task::spawn_blocking(move || {
            let result = (|| {
                if file.is_none() {
                    let made = create_new(&path)?;
                    give(owner, &made);
                    file = Some(made);
                }
                match file.as_mut() {
                    Some(f) => f.write_all(&buf),
                    None => Ok(()),
                }
            })();
            (file, buf, result.map_err(|e| SpoolError::io(&path, e)))
        })
        .await
        .map_err(|_| SpoolError::Stopped)?;
        self.file = file;
        buf.clear();
        self.buf = buf;
        result
    }

    /// Gives the message up (refused while it arrives): its partial file, if it spilled to one, is removed on the
    /// blocking pool. Freeing a large file's blocks (and sending their discards) takes milliseconds, and the
    /// runtime may have one worker for every session (`runtime.rs`); a client can send 35 MiB to be refused
    /// again and again. Returns once the file is gone, so that the refusal is answered after it.
    pub async fn discard(mut self) {
        // No longer arriving: the committer's linger must not wait for it.
        self.arriving = None;
        let Some(file) = self.file.take() else {
            return;
        };
        let path = msg_path(&self.spool.paths.queue, self.id);
        // Not run only when the runtime stops first: the file, still unsealed, goes at the next start.
        let _ = tokio::task::spawn_blocking(move || {
            drop(file);
            let _ = fs::remove_file(path);
        })
        .await;
    }

    /// Makes the message durable in `queue/`. Returns once it is on disk, or with the reason it is not.
    pub async fn commit(mut self) -> Result<QueueId, SpoolError> {
        let seal = file::seal_for(self.len, &self.hash.finalize());
        let (done, wait) = oneshot::channel();
        let job = Job {
            id: self.id,
            file: self.file.take(),
            tail: std::mem::take(&mut self.buf),
            seal,
            done,
        };
        // No longer counted before it is sent: a committer that already holds it must not wait for it. (One that
        // stops waiting just before it is sent takes it in the next batch.)
        self.arriving = None;
        // From here the committer owns the file, and removes it if it fails.
        self.spool.jobs.send(job).map_err(|_| SpoolError::Stopped)?;
        wait.await.map_err(|_| SpoolError::Stopped)??;
        Ok(self.id)
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            // A connection that ended in the middle of a message: removed here, since it must not be forgotten
            // (a refused message goes through `discard`, off the runtime's thread).
            let _ = fs::remove_file(msg_path(&self.spool.paths.queue, self.id));
        }
    }
}

/// One message counted among those arriving; the count goes down on drop.
struct Arriving(Arc<AtomicUsize>);

impl Arriving {
    fn new(count: &Arc<AtomicUsize>) -> Arriving {
        count.fetch_add(1, Ordering::AcqRel);
        Arriving(count.clone())
    }
}

impl Drop for Arriving {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Whether a relay (`serve`) holds the state dir now, as far as can be told without writing: its lock is taken.
/// A lock file that cannot be opened (another user's) may be held: `true`.
pub fn relay_runs_on(state_dir: &Path) -> bool {
    while_no_relay_runs(state_dir, || ()).is_none()
}

/// Runs `f` while holding the state dir's lock shared, if no relay holds it: a serve starting meanwhile waits for
/// it (see [`lock_state_dir`]) instead of meeting what `f` does (`relay check` binding the listeners' addresses
/// for a moment). `None`: a relay runs (or may: a lock file that cannot be opened).
pub fn while_no_relay_runs<T>(state_dir: &Path, f: impl FnOnce() -> T) -> Option<T> {
    let file = match File::open(state_dir.join(".lock")) {
        Ok(f) => Some(f),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(_) => return None,
    };
    if file
        .as_ref()
        .is_some_and(|f| flock(f, libc::LOCK_SH).is_err())
    {
        return None;
    }
    // The directory's own lock: a relay whose `.lock` was removed under it (a clean-up, by hand) still holds it.
    let dir = File::open(state_dir).ok();
    if dir.as_ref().is_some_and(|d| {
        flock(d, libc::LOCK_SH).is_err_and(|e| e.kind() == io::ErrorKind::WouldBlock)
    }) {
        return None;
    }
    let done = f();
    drop((file, dir));
    Some(done)
}

/// `flock(2)` without waiting: `op` is `LOCK_SH` or `LOCK_EX`.
fn flock(file: &File, op: libc::c_int) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: the descriptor is open for the duration of the call.
    if unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A queue relay cannot write to (a read-only filesystem, a directory the service's user may not write) would
/// take no mail while the daemon looked healthy: refused at start instead, with the path and the reason.
/// A full disk is not such a queue: the daemon must start and deliver what is queued (MAIL is answered 452 meanwhile).
fn can_write(queue: &Path) -> Result<(), SpoolError> {
    // Not a queue file's name (no `.msg`/`.state`): nothing that reads the queue takes it for mail.
    let probe = queue.join(".write-check");
    // One a crash left (or anything put in its place) goes first; then a new file, never through a symlink: under
    // `sudo relay serve` a link planted here must not make root write elsewhere.
    let _ = fs::remove_file(&probe);
    let made = OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(0o600)
        .open(&probe)
        .and_then(|mut f| f.write_all(b"relay"));
    let removed = match fs::remove_file(&probe) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    };
    match made.and(removed).map_err(|e| SpoolError::io(&probe, e)) {
        Err(e) if e.is_full() => {
            tracing::warn!(error = %e, "the state dir's filesystem is full: queued mail is delivered, new mail is refused until space is freed");
            let _ = fs::remove_file(&probe);
            Ok(())
        }
        other => other,
    }
}

/// Takes `STATE_DIR/.lock` for this process (released by the kernel however it ends). Held for a moment by
/// another command (`relay status`, `relay check` looking whether a relay runs), it is tried again for a while.
fn lock_state_dir(state_dir: &Path) -> Result<(File, Option<File>), SpoolError> {
    let path = state_dir.join(".lock");
    // Opened read-only when it exists (flock needs no more); one root creates is given to the state dir's
    // owner, so that it does not stop the service's user.
    let file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let file = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .mode(0o640)
                .open(&path)
                .map_err(|e| SpoolError::io(&path, e))?;
            crate::state_files::give_file_to_parent_owner(&path, &file);
            file
        }
        Err(e) => return Err(SpoolError::io(&path, e)),
    };
    // Another serve holds it for good; a command's shared look lasts milliseconds.
    const PATIENCE: std::time::Duration = std::time::Duration::from_millis(500);
    let started = std::time::Instant::now();
    loop {
        match flock(&file, libc::LOCK_EX) {
            Ok(()) => break,
            Err(e) if e.kind() != io::ErrorKind::WouldBlock => {
                return Err(SpoolError::io(&path, e));
            }
            Err(_) if started.elapsed() >= PATIENCE => return Err(SpoolError::Locked { path }),
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(10)),
        }
    }
    // The directory too: `.lock` removed under a running relay (a clean-up of dot files, by hand) let a second
    // one start here. A filesystem whose directories take no lock (some network ones) has `.lock`'s alone.
    // (A state dir its user may write and search but not read (0730) cannot be opened: `.lock`'s alone then.)
    let Ok(dir) = File::open(state_dir) else {
        return Ok((file, None));
    };
    loop {
        match flock(&dir, libc::LOCK_EX) {
            Ok(()) => return Ok((file, Some(dir))),
            Err(e) if e.kind() != io::ErrorKind::WouldBlock => {
                tracing::debug!(error = %e, "the state dir itself cannot be locked; its .lock is");
                return Ok((file, None));
            }
            Err(_) if started.elapsed() >= PATIENCE => {
                return Err(SpoolError::Locked {
                    path: state_dir.to_path_buf(),
                });
            }
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(10)),
        }
    }
}

/// Whom the queue's files are given to when root writes them (`sudo relay serve` on the service's state dir):
/// `queue/`'s owner, where that is not root. `None`: they stay the writer's.
type Owner = Option<(u32, u32)>;

fn owner_for_root(queue: &Path) -> Owner {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    let meta = fs::metadata(queue).ok()?;
    (meta.uid() != 0).then(|| (meta.uid(), meta.gid()))
}

/// Best effort, like the state files' (`state_files.rs`): a root without CAP_CHOWN, or an owner its user
/// namespace does not map, must not stop mail from being taken. Said once.
fn give(owner: Owner, file: &File) {
    static SAID: std::sync::Once = std::sync::Once::new();
    if let Some((uid, gid)) = owner
        && let Err(e) = std::os::unix::fs::fchown(file, Some(uid), Some(gid))
    {
        SAID.call_once(|| {
            tracing::warn!(uid, error = %e, "cannot give queue files to the state dir's owner; the service's user may not be able to read what this run takes");
        });
    }
}

fn create_new(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o640)
        .open(path)
}

/// How often the start-up check reports its progress: about every 0.1 s on a cold cache (≈ 90 µs a file).
pub const PROGRESS_EVERY: u64 = 1000;

/// Start-up clean-up. A file whose seal slot holds the placeholder was still arriving when relay stopped and
/// was never acknowledged: removed. A file relay cannot read goes to `quarantine/` with a log line: it might
/// have been acknowledged, so it is never removed. A state file without its message is a leftover of a delivery
/// or deletion cut off between its two unlinks.
fn recover(paths: &SpoolPaths, progress: &mut dyn FnMut(u64)) -> Result<(), SpoolError> {
    let entries = fs::read_dir(&paths.queue).map_err(|e| SpoolError::io(&paths.queue, e))?;
    let mut states = false;
    let mut seen = 0u64;
    for entry in entries.flatten() {
        seen += 1;
        if seen.is_multiple_of(PROGRESS_EVERY) {
            progress(seen);
        }
        let path = entry.path();
        match parse_file_name(&path) {
            Some((_, FileKind::Message)) => match file::read(&path) {
                Ok(_) => {}
                Err(FileError::Unsealed { .. }) => {
                    tracing::info!(path = %path.display(), "removing a message that was never acknowledged (cut off by a stop or crash)");
                    let _ = fs::remove_file(&path);
                }
                Err(e) if e.is_not_found() => {}
                Err(e @ FileError::Corrupt { .. }) => quarantine(paths, &path, &e.to_string()),
                // Could not be opened or read just now (permissions, I/O): left in place, and said.
                Err(e) => {
                    tracing::error!(path = %path.display(), error = %e, "cannot read a queued message; it stays in the queue")
                }
            },
            Some((_, FileKind::State)) => states = true,
            // atomic-write-file's temporary files (`.NAME.RANDOM`), left by a crash mid-write.
            None if entry.file_name().to_string_lossy().starts_with('.') => {
                let _ = fs::remove_file(&path);
            }
            // An id spelt otherwise than relay names its files (renamed by hand, copied from elsewhere): never
            // delivered nor listed as it is, so kept aside where a person looks.
            None if path.extension().is_some_and(|e| e == "msg")
                && path
                    .file_stem()
                    .and_then(|s| s.to_str())
                    .and_then(QueueId::parse)
                    .is_some() =>
            {
                quarantine(
                    paths,
                    &path,
                    "not named as relay names its files (an id in lower case)",
                );
            }
            None => {}
        }
    }
    // A second listing rather than a list of the first's state files: a backlog costs no memory.
    if states {
        let files =
            super::layout::files(&paths.queue).map_err(|e| SpoolError::io(&paths.queue, e))?;
        for (id, kind) in files.flatten() {
            if kind == FileKind::State && !msg_path(&paths.queue, id).exists() {
                let _ = fs::remove_file(super::layout::state_path(&paths.queue, id));
            }
        }
    }
    // A move to dead/ cut off while its state file was being written leaves a temporary file there too; one cut
    // off before its rename, or a move back (`relay queue retry --dead`) cut off after its own, a state file
    // without its message (the message's recipients already done went with it, or it is still queued).
    if let Ok(entries) = fs::read_dir(&paths.dead) {
        for entry in entries.flatten() {
            let path = entry.path();
            let orphan = matches!(parse_file_name(&path), Some((id, FileKind::State))
                if fs::symlink_metadata(msg_path(&paths.dead, id))
                    .is_err_and(|e| e.kind() == io::ErrorKind::NotFound));
            if orphan || entry.file_name().to_string_lossy().starts_with('.') {
                let _ = fs::remove_file(&path);
            }
        }
    }
    Ok(())
}

/// Moves a file relay cannot deliver from to `quarantine/`, with a log line. Its state file goes with it.
pub(crate) fn quarantine(paths: &SpoolPaths, path: &Path, why: &str) {
    let Some(name) = path.file_name() else {
        return;
    };
    let _ = fs::DirBuilder::new()
        .recursive(true)
        .mode(0o750)
        .create(&paths.quarantine);
    let to = paths.quarantine.join(name);
    match fs::rename(path, &to) {
        Ok(()) => {
            let id = parse_file_name(path).map(|(id, _)| id);
            if let Some(id) = id {
                let state = super::layout::state_path(&paths.queue, id);
                let _ = fs::rename(&state, super::layout::state_path(&paths.quarantine, id));
            }
            let _ = File::open(&paths.quarantine).and_then(|d| d.sync_all());
            let _ = File::open(&paths.queue).and_then(|d| d.sync_all());
            // With its queue id, so that `journalctl RELAY_QUEUE_ID=…` finds where the message went.
            match id {
                Some(id) => {
                    tracing::error!(relay_event = "quarantined", relay_queue_id = %id, path = %to.display(), reason = %why, "queue file moved to quarantine/ (not delivered, not deleted): look at it, then move it back or remove it")
                }
                None => {
                    tracing::error!(relay_event = "quarantined", path = %to.display(), reason = %why, "queue file moved to quarantine/ (not delivered, not deleted): look at it, then move it back or remove it")
                }
            }
            crate::events::emit(crate::events::Event::Quarantined { id, why });
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::error!(path = %path.display(), reason = %why, error = %e, "cannot move an unreadable queue file to quarantine/");
        }
    }
}

/// The committer thread: one batch at a time, as many messages per batch as are waiting.
fn committer(
    paths: SpoolPaths,
    owner: Owner,
    lone: LoneFlush,
    arriving: Arc<AtomicUsize>,
    jobs: mpsc::Receiver<Job>,
    committed: Option<super::announce::Announcer>,
) {
    // Opened once: every batch flushes through it.
    let open = || File::open(&paths.queue).map(Arc::new);
    let mut dir = open();
    let mut beside = (lone == LoneFlush::FileAndDir).then(DirFlusher::start);
    while let Ok(first) = jobs.recv() {
        let mut batch = vec![first];
        batch.extend(jobs.try_iter());
        linger(&jobs, &arriving, &mut batch);
        if dir.is_err() {
            dir = open();
        }
        for id in commit_batch(&paths, owner, &dir, lone, &mut beside, batch) {
            if let Some(announcer) = &committed {
                announcer.announce(id);
            }
        }
    }
}

/// How long a batch waits for messages whose final dot is on its way.
///
/// Under load, half the batches held a single message (smtp-source, 20 sessions), and a lone message costs a
/// flush of its own: writing its inode, bitmap and directory blocks and flushing the disk cache for one file,
/// where a batch shares them. The next final dot is usually a few tens of microseconds away (the client has its
/// 354 and sends the body at once), so the committer waits for it, at most this long, while a message is
/// between DATA and its commit. A relay with one client at a time never waits.
const LINGER: Duration = Duration::from_micros(250);

/// Adds to `batch` the messages that arrive while others are still being received, for at most [`LINGER`].
fn linger(jobs: &mpsc::Receiver<Job>, arriving: &AtomicUsize, batch: &mut Vec<Job>) {
    let deadline = Instant::now() + LINGER;
    while arriving.load(Ordering::Acquire) > 0 {
        let Some(left) = deadline.checked_duration_since(Instant::now()) else {
            break;
        };
        match jobs.recv_timeout(left) {
            Ok(job) => batch.push(job),
            Err(_) => break,
        }
        batch.extend(jobs.try_iter());
    }
    batch.extend(jobs.try_iter());
}

/// Returns the ids made durable.
fn commit_batch(
    paths: &SpoolPaths,
    owner: Owner,
    dir: &io::Result<Arc<File>>,
    lone: LoneFlush,
    beside: &mut Option<DirFlusher>,
    batch: Vec<Job>,
) -> Vec<QueueId> {
    let mut written = Vec::with_capacity(batch.len());
    for job in batch {
        match write_job(paths, owner, &job) {
            Ok(file) => written.push((job, file)),
            Err(e) => fail(paths, job, e),
        }
    }
    if written.is_empty() {
        return Vec::new();
    }
    let flushed = match dir {
        Ok(dir) => flush(dir, lone, beside, written.iter().map(|(_, f)| f)),
        Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
    };
    let mut durable = Vec::with_capacity(written.len());
    for (job, file) in written {
        // A file unlinked while it was written (by anything else) is not in the queue, whatever was flushed.
        let linked = file.metadata().map_or(true, |m| {
            use std::os::unix::fs::MetadataExt;
            m.nlink() > 0
        });
        match &flushed {
            Ok(()) if !linked => {
                let path = msg_path(&paths.queue, job.id);
                let _ = job.done.send(Err(SpoolError::Unlinked { path }));
            }
            Ok(()) => {
                durable.push(job.id);
                let _ = job.done.send(Ok(()));
            }
            Err(e) => {
                let e = io::Error::new(e.kind(), e.to_string());
                fail(paths, job, SpoolError::io(&paths.queue, e));
            }
        }
    }
    durable
}

/// Writes a job's remaining bytes, then its seal; returns its file, still to be flushed.
fn write_job(paths: &SpoolPaths, owner: Owner, job: &Job) -> Result<File, SpoolError> {
    let path = msg_path(&paths.queue, job.id);
    let io = |e| SpoolError::io(&path, e);
    let mut file = match &job.file {
        Some(f) => f.try_clone().map_err(io)?,
        None => create_new(&path).map_err(io)?,
    };
    give(owner, &file);
    file.write_all(&job.tail).map_err(io)?;
    // Last: a file with a seal is a whole file, even if relay is killed between these writes.
    file.write_all_at(job.seal.as_bytes(), SEAL_AT as u64)
        .map_err(io)?;
    Ok(file)
}

fn fail(paths: &SpoolPaths, job: Job, error: SpoolError) {
    // A name already taken is another message's file (acknowledged, perhaps), never this job's to remove.
    let taken = matches!(&error, SpoolError::Io { source, .. } if source.kind() == io::ErrorKind::AlreadyExists);
    if !taken {
        let _ = fs::remove_file(msg_path(&paths.queue, job.id));
    }
    let _ = job.done.send(Err(error));
}

/// Makes a batch's files durable, directory entries included: the group commit.
///
/// One file is flushed on its own (fdatasync, and at the same time `queue/` where that is needed: see [`LoneFlush`]
/// and [`DirFlusher`]), so that a
/// quiet relay's 250 never waits for other programs' data. A batch is flushed with one syncfs, which writes every
/// file and directory block of the batch and flushes the disk cache once. Measured on the development machine
/// (ext4 without a journal, where each fdatasync writes its inode and flushes the disk cache separately):
/// per-file fdatasync managed 1,100 to 2,400 files/s from one thread, syncfs 5,700 to 6,800. The price is that
/// syncfs also writes out other dirty data of the same filesystem; it only runs when messages arrive faster than
/// one flush takes.
fn flush<'a>(
    dir: &Arc<File>,
    lone: LoneFlush,
    beside: &mut Option<DirFlusher>,
    mut files: impl ExactSizeIterator<Item = &'a File>,
) -> io::Result<()> {
    if files.len() == 1 {
        let Some(file) = files.next() else {
            return Ok(());
        };
        return match (lone, beside.as_ref()) {
            (LoneFlush::FileOnly, _) => file.sync_data(),
            (LoneFlush::FileAndDir, Some(b)) => {
                let (flushed, alive) = b.flush(dir, || file.sync_data());
                if !alive {
                    *beside = None;
                }
                flushed
            }
            (LoneFlush::FileAndDir, None) => file.sync_data().and_then(|()| dir.sync_all()),
        };
    }
    use std::os::fd::AsRawFd;
    // SAFETY: the descriptor is open for the duration of the call.
    if unsafe { libc::syncfs(dir.as_raw_fd()) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Flushes `queue/` on a thread of its own while the committer flushes a lone file, where the filesystem needs
/// both ([`LoneFlush::FileAndDir`]): the two are independent writes (the entry and the file's bytes were both
/// made before either flush starts, and the 250 waits for both), so they can be in flight together. On the
/// development machine (ext4 without a journal on a virtual disk) each took 100 µs to 1 ms, one after the other
/// most of a lone message's time to its 250.
struct DirFlusher {
    requests: mpsc::SyncSender<Arc<File>>,
    results: mpsc::Receiver<io::Result<()>>,
}

impl DirFlusher {
    fn start() -> DirFlusher {
        let (requests, jobs) = mpsc::sync_channel::<Arc<File>>(1);
        let (done, results) = mpsc::sync_channel(1);
        let spawned = std::thread::Builder::new()
            .name("relay-dir-flush".into())
            .spawn(move || {
                for dir in jobs {
                    if done.send(dir.sync_all()).is_err() {
                        break;
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the directory flush thread; a lone message's flushes run one after the other");
        }
        DirFlusher { requests, results }
    }

    /// Runs `file_flush` here and the directory's flush on the thread, and returns the first error of either, and
    /// whether the thread is still there. Without it, the directory is flushed here, after the file (the file's
    /// flush runs once only: a second one could report success for a write whose error the first one took).
    fn flush(
        &self,
        dir: &Arc<File>,
        file_flush: impl FnOnce() -> io::Result<()>,
    ) -> (io::Result<()>, bool) {
        if self.requests.send(dir.clone()).is_err() {
            return (file_flush().and_then(|()| dir.sync_all()), false);
        }
        let file = file_flush();
        match self.results.recv() {
            Ok(d) => (file.and(d), true),
            Err(_) => (file.and_then(|()| dir.sync_all()), false),
        }
    }
}

/// What makes a lone new file durable under its name in `queue/`.
///
/// POSIX asks for an fsync of the directory as well as of the file, and that is a second disk-cache flush on
/// the path to a lone message's 250 (about 30% of its time on the development machine). Where the file's own
/// fsync already makes the entry that created it durable, the directory's adds nothing. The file is created in
/// place (`O_CREAT | O_EXCL` in `queue/`, never renamed), which is the case these rest on:
/// - ext4 with a journal: the entry and the inode are made in one transaction (`ext4_create`), and fsync
///   commits the transaction the inode last changed in (`ext4_fsync_journal`; jbd2 commits in order), hence the
///   entry with it;
/// - XFS: the create is one logged transaction (inode and directory), and fsync forces the log up to the
///   inode's last change.
///
/// ext4 without a journal keeps the directory fsync: there the entry is written by `ext4_sync_parent`, which
/// before Linux 4.13 missed names added to an existing directory block (a busy, indexed `queue/`). So does
/// anything else (btrfs, ZFS, NFS, tmpfs, overlayfs, an unknown mount), and an ext4 whose journal cannot be seen
/// (an external journal device, on a kernel without ext4's `journal_task` in sysfs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LoneFlush {
    FileOnly,
    FileAndDir,
}

impl LoneFlush {
    fn for_dir(dir: &Path) -> LoneFlush {
        match mount_of(dir) {
            Some((fs, _)) if fs == "xfs" => LoneFlush::FileOnly,
            Some((fs, dev)) if fs == "ext4" && has_journal(dev) => LoneFlush::FileOnly,
            _ => LoneFlush::FileAndDir,
        }
    }
}

/// The filesystem type of the mount holding `path` and its device (major, minor), from /proc/self/mountinfo
/// (matched by device, so symlinks and bind mounts find the right line). `ext2`/`ext3` mounts say so even when
/// the ext4 driver serves them.
fn mount_of(path: &Path) -> Option<(String, (u32, u32))> {
    use std::os::unix::fs::MetadataExt;
    let dev = fs::metadata(path).ok()?.dev();
    let dev = (libc::major(dev), libc::minor(dev));
    let table = fs::read_to_string("/proc/self/mountinfo").ok()?;
    Some((
        mountinfo_type(&table, &format!("{}:{}", dev.0, dev.1))?,
        dev,
    ))
}

/// Whether the ext4 filesystem on device `(major, minor)` has a journal: its `journal_task` in sysfs names jbd2's
/// thread, or (kernels without that file) jbd2 lists it in /proc as `DEVNAME-8` (8: the journal's inode), the
/// device's kernel name coming from sysfs.
fn has_journal((major, minor): (u32, u32)) -> bool {
    let Ok(uevent) = fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/uevent")) else {
        return false;
    };
    let Some(name) = uevent
        .lines()
        .find_map(|l| l.strip_prefix("DEVNAME="))
        .filter(|name| !name.contains('/'))
    else {
        return false;
    };
    // sysfs first: the shipped unit's `ProcSubset=pid` hides /proc/fs, and every ext4 on a journal read as
    // without one (a second flush per lone message under systemd, and nowhere else).
    match fs::read_to_string(format!("/sys/fs/ext4/{name}/journal_task")) {
        Ok(task) => journal_task_runs(&task),
        Err(_) => Path::new("/proc/fs/jbd2")
            .join(format!("{name}-8"))
            .exists(),
    }
}

/// What ext4's `journal_task` (sysfs) says: the pid of the filesystem's jbd2 thread, or `<none>` without a journal.
fn journal_task_runs(task: &str) -> bool {
    task.trim().parse::<u32>().is_ok()
}

/// The filesystem type of the mount of device `dev` ("MAJOR:MINOR") in a mountinfo table: the third field, and
/// the first after the " - " separator (proc(5)).
fn mountinfo_type(table: &str, dev: &str) -> Option<String> {
    table.lines().find_map(|line| {
        let (mount, fs) = line.split_once(" - ")?;
        (mount.split(' ').nth(2)? == dev).then(|| fs.split(' ').next().map(str::to_string))?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The directory's flush beside the file's: both results count; without its thread, the file is flushed once
    /// and the directory after it.
    #[test]
    fn the_directory_flush_beside_the_file_reports_both_and_falls_back() {
        let dir = tempfile::tempdir().unwrap();
        let handle = Arc::new(File::open(dir.path()).unwrap());
        let beside = DirFlusher::start();
        assert!(matches!(beside.flush(&handle, || Ok(())), (Ok(()), true)));
        let (r, alive) = beside.flush(&handle, || Err(io::Error::other("file")));
        assert_eq!(r.unwrap_err().to_string(), "file");
        assert!(alive);

        let (requests, gone) = mpsc::sync_channel(1);
        let (_done, results) = mpsc::sync_channel(1);
        drop(gone);
        let orphan = DirFlusher { requests, results };
        let mut runs = 0;
        let (r, alive) = orphan.flush(&handle, || {
            runs += 1;
            Ok(())
        });
        assert!(r.is_ok() && !alive && runs == 1);
    }

    fn envelope() -> Envelope {
        Envelope::example("a@example.com", &["b@example.com"])
    }

    /// A count left behind would make every later batch wait its full LINGER.
    #[tokio::test]
    async fn a_message_stops_counting_as_arriving_when_committed_or_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), None, &mut |_| {}).unwrap();
        let arriving = || spool.inner.arriving.load(Ordering::Acquire);
        let mut kept = spool.begin(&envelope());
        let dropped = spool.begin(&envelope());
        assert_eq!(arriving(), 2);
        drop(dropped);
        assert_eq!(arriving(), 1);
        kept.write(b"Subject: x\r\n\r\nbody\r\n").await.unwrap();
        kept.commit().await.unwrap();
        assert_eq!(arriving(), 0);
    }

    #[test]
    fn a_journal_is_seen_by_its_thread() {
        assert!(journal_task_runs("30389\n"));
        assert!(!journal_task_runs("<none>\n"));
        assert!(!journal_task_runs(""));
    }

    #[test]
    fn mountinfo_type_is_found_by_device() {
        let table = "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n\
                     40 22 0:35 / /tmp rw,nosuid shared:20 - tmpfs tmpfs rw\n\
                     41 22 8:2 / /var/lib rw master:3 - xfs /dev/sda2 rw\n";
        assert_eq!(mountinfo_type(table, "8:1").as_deref(), Some("ext4"));
        assert_eq!(mountinfo_type(table, "0:35").as_deref(), Some("tmpfs"));
        assert_eq!(mountinfo_type(table, "8:2").as_deref(), Some("xfs"));
        assert_eq!(mountinfo_type(table, "8:3"), None);
        assert_eq!(mountinfo_type("garbage\n", "8:1"), None);
    }

    #[test]
    fn the_real_mountinfo_names_the_filesystem_of_a_path() {
        assert_eq!(
            mount_of(Path::new("/proc")).map(|(t, _)| t).as_deref(),
            Some("proc")
        );
        // Not a filesystem that is known to keep a new name with the file: the directory is flushed too.
        assert_eq!(
            LoneFlush::for_dir(Path::new("/proc")),
            LoneFlush::FileAndDir
        );
        assert_eq!(
            LoneFlush::for_dir(Path::new("/nonexistent/queue")),
            LoneFlush::FileAndDir
        );
        // Wherever the tests run: the file alone only on XFS or on an ext4 whose journal jbd2 lists.
        let dir = tempfile::tempdir().unwrap();
        if LoneFlush::for_dir(dir.path()) == LoneFlush::FileOnly {
            let fs = mount_of(dir.path()).map(|(t, _)| t);
            let journals = fs::read_dir("/proc/fs/jbd2").map_or(0, |d| d.count());
            assert!(
                fs.as_deref() == Some("xfs") || (fs.as_deref() == Some("ext4") && journals > 0),
                "{fs:?}"
            );
        }
    }
}
