//! Writing messages into the queue durably.
//!
//! A session streams the body into an [`Incoming`]: small messages stay in a bounded buffer, larger ones spill
//! to `tmp/ID.msg` as they arrive. At the final dot the session calls [`Incoming::commit`], which hands the
//! message to the committer thread. The committer takes every message waiting at that moment as one batch
//! (group commit): it writes them out, flushes the filesystem once, renames them into `queue/`, flushes the
//! `queue/` directory once, and only then answers each session, which then says 250 to its client.
//!
//! One file per message, envelope line first (see `envelope.rs`): creating a file is the costliest step here
//! (on ext4 the inode allocator can take hundreds of microseconds), so one create per message, not two.
//!
//! Ordering inside a batch is what makes a crash safe: nothing is renamed into `queue/` before its bytes are
//! on disk, and no session hears "queued" before the renames are. `tmp/` is cleared at start-up, so a message
//! cut off by a crash or a dropped connection leaves nothing behind.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, mpsc};

use tokio::sync::oneshot;

use super::{Envelope, QueueId};

/// In-memory part of a message before it spills to its temp file. Most device mail (a scan, an alert) fits.
const SPILL_AT: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("cannot write to the spool at {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("the spool's committer has stopped")]
    Stopped,
}

impl SpoolError {
    fn io(path: &Path, source: io::Error) -> SpoolError {
        SpoolError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// The directories under the state dir that hold mail.
#[derive(Debug, Clone)]
pub struct SpoolPaths {
    pub queue: PathBuf,
    pub dead: PathBuf,
    pub tmp: PathBuf,
}

impl SpoolPaths {
    pub fn new(state_dir: &Path) -> SpoolPaths {
        SpoolPaths {
            queue: state_dir.join("queue"),
            dead: state_dir.join("dead"),
            tmp: state_dir.join("tmp"),
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
    jobs: mpsc::Sender<Job>,
}

struct Job {
    id: QueueId,
    /// The temp file, if the body spilled.
    file: Option<File>,
    tail: Vec<u8>,
    done: oneshot::Sender<Result<(), SpoolError>>,
}

impl Spool {
    /// Creates the queue directories if needed, clears what a crash left in `tmp/`, and starts the committer.
    pub fn open(state_dir: &Path) -> Result<Spool, SpoolError> {
        let paths = SpoolPaths::new(state_dir);
        for dir in [state_dir, &paths.queue, &paths.dead, &paths.tmp] {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o750)
                .create(dir)
                .map_err(|e| SpoolError::io(dir, e))?;
        }
        recover(&paths)?;
        let (tx, rx) = mpsc::channel();
        let committer_paths = paths.clone();
        std::thread::Builder::new()
            .name("relay-commit".into())
            .spawn(move || committer(committer_paths, rx))
            .map_err(|e| SpoolError::io(&paths.tmp, e))?;
        Ok(Spool {
            inner: Arc::new(Inner { paths, jobs: tx }),
        })
    }

    pub fn paths(&self) -> &SpoolPaths {
        &self.inner.paths
    }

    /// Starts a new message: its envelope goes first, the message bytes follow with [`Incoming::write`].
    pub fn begin(&self, envelope: &Envelope) -> Incoming {
        let mut buf = Vec::with_capacity(8192);
        buf.extend_from_slice(&envelope.to_line());
        Incoming {
            spool: self.inner.clone(),
            id: envelope.id,
            buf,
            file: None,
            len: 0,
        }
    }
}

/// A message being received. Dropping it without [`commit`](Incoming::commit) discards it.
pub struct Incoming {
    spool: Arc<Inner>,
    id: QueueId,
    buf: Vec<u8>,
    file: Option<File>,
    len: u64,
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
        self.len += data.len() as u64;
        if self.buf.len() >= SPILL_AT {
            self.spill().await?;
        }
        Ok(())
    }

    /// Moves the buffer to the temp file on the blocking pool, so the runtime's threads never wait on disk.
    async fn spill(&mut self) -> Result<(), SpoolError> {
        let path = tmp_msg(&self.spool.paths, self.id);
        let mut file = self.file.take();
        let buf = std::mem::take(&mut self.buf);
        let (file, mut buf, result) = tokio::task::spawn_blocking(move || {
            let result = (|| {
                if file.is_none() {
                    file = Some(create_new(&path)?);
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

    /// Makes the message durable in `queue/`. Returns once it is on disk, or with the reason it is not.
    pub async fn commit(mut self) -> Result<QueueId, SpoolError> {
        let (done, wait) = oneshot::channel();
        let job = Job {
            id: self.id,
            file: self.file.take(),
            tail: std::mem::take(&mut self.buf),
            done,
        };
        // From here the committer owns the temp file, and removes it if it fails.
        self.spool.jobs.send(job).map_err(|_| SpoolError::Stopped)?;
        wait.await.map_err(|_| SpoolError::Stopped)??;
        Ok(self.id)
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            // A single unlink: cheap enough to do inline, and it must not be forgotten.
            let _ = fs::remove_file(tmp_msg(&self.spool.paths, self.id));
        }
    }
}

fn tmp_msg(paths: &SpoolPaths, id: QueueId) -> PathBuf {
    paths.tmp.join(format!("{id}.msg"))
}

/// Where a message lives in `dir` (`queue/` or `dead/`).
pub(crate) fn msg_path(dir: &Path, id: QueueId) -> PathBuf {
    dir.join(format!("{id}.msg"))
}

fn create_new(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o640)
        .open(path)
}

/// Start-up clean-up: anything in `tmp/` was never acknowledged.
fn recover(paths: &SpoolPaths) -> Result<(), SpoolError> {
    let entries = fs::read_dir(&paths.tmp).map_err(|e| SpoolError::io(&paths.tmp, e))?;
    for entry in entries.flatten() {
        let _ = fs::remove_file(entry.path());
    }
    Ok(())
}

/// The committer thread: one batch at a time, as many messages per batch as are waiting.
fn committer(paths: SpoolPaths, jobs: mpsc::Receiver<Job>) {
    while let Ok(first) = jobs.recv() {
        let mut batch = vec![first];
        batch.extend(jobs.try_iter());
        commit_batch(&paths, batch);
    }
}

fn commit_batch(paths: &SpoolPaths, batch: Vec<Job>) {
    let mut written = Vec::with_capacity(batch.len());
    for job in batch {
        match write_job(paths, &job) {
            Ok(file) => written.push((job, file)),
            Err(e) => fail(paths, job, e),
        }
    }
    // Group commit. Writeback is started for every file of the batch first, so that the first fdatasync
    // commits one journal transaction holding all their block allocations; the fdatasyncs after it find their
    // data on disk and return at once. An fdatasync per file without this commits the journal once per file.
    for (_, file) in &written {
        start_writeback(file);
    }
    let mut renamed = Vec::with_capacity(written.len());
    for (job, file) in written {
        let durable = file
            .sync_data()
            .and_then(|()| fs::rename(tmp_msg(paths, job.id), msg_path(&paths.queue, job.id)));
        match durable {
            Ok(()) => renamed.push(job),
            Err(e) => fail(paths, job, SpoolError::io(&paths.queue, e)),
        }
    }
    if renamed.is_empty() {
        return;
    }
    let dir_synced = File::open(&paths.queue).and_then(|d| d.sync_all());
    for job in renamed {
        let result = match &dir_synced {
            Ok(()) => Ok(()),
            Err(e) => {
                // The renames may or may not survive a crash; the client must not be told "queued", so take
                // the message back out. It is then refused with 452 and the client retries.
                let _ = fs::remove_file(msg_path(&paths.queue, job.id));
                Err(SpoolError::io(
                    &paths.queue,
                    io::Error::new(e.kind(), e.to_string()),
                ))
            }
        };
        let _ = job.done.send(result);
    }
}

/// Writes a job's remaining bytes; returns its file, still to be flushed.
fn write_job(paths: &SpoolPaths, job: &Job) -> Result<File, SpoolError> {
    let path = tmp_msg(paths, job.id);
    let mut file = match &job.file {
        Some(f) => f.try_clone().map_err(|e| SpoolError::io(&path, e))?,
        None => create_new(&path).map_err(|e| SpoolError::io(&path, e))?,
    };
    file.write_all(&job.tail)
        .map_err(|e| SpoolError::io(&path, e))?;
    Ok(file)
}

fn fail(paths: &SpoolPaths, job: Job, error: SpoolError) {
    let _ = fs::remove_file(tmp_msg(paths, job.id));
    let _ = job.done.send(Err(error));
}

/// Asks the kernel to start writing the file out now, without waiting. Only a hint: errors surface in the
/// fdatasync that follows.
fn start_writeback(f: &File) {
    use std::os::fd::AsRawFd;
    // SAFETY: the descriptor is open for the duration of the call; the call only starts I/O.
    unsafe { libc::sync_file_range(f.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
}
