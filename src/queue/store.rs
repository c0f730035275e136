//! Reading and acting on the queue from outside the daemon (`relay queue …`, `relay status`). Safe while the
//! daemon runs: a message still arriving has no seal yet and is not listed, a file that vanishes between the
//! listing and the read (delivered, deleted) is simply gone, and nothing here ever fails a whole listing
//! because of one file.

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::Serialize;

use super::QueueId;
use super::file::{self, FileError, QueuedMessage};
use super::layout::{FileKind, SpoolPaths, msg_path, parse_file_name, state_path};
use super::state::read_state;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("no message {0} in the queue")]
    NotFound(String),
    #[error("`{0}` is not a queue id (32 hex digits, as `relay queue list` prints them)")]
    BadId(String),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error(transparent)]
    File(#[from] FileError),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A directory's messages: the readable ones, and how many could not be read.
#[derive(Debug, Default)]
pub struct Listing {
    /// Sealed messages, oldest first.
    pub messages: Vec<QueuedMessage>,
    /// Files that are not what relay writes (the daemon moves them to `quarantine/`).
    pub unreadable: usize,
}

/// A queued message with where its delivery stands (from `ID.state`), as `relay queue list` and `show` print it.
/// Never tried: no attempts, no next try (it is due), no error.
#[derive(Debug, Clone, Serialize)]
pub struct QueueEntry {
    #[serde(flatten)]
    pub message: QueuedMessage,
    pub attempts: u32,
    #[serde(with = "humantime_serde::option")]
    pub next_attempt: Option<SystemTime>,
    pub last_error: Option<String>,
    /// Recipients an earlier attempt finished with (the upstream took it for them, or refused them for good):
    /// the next attempts go to the others only.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub finished: Vec<String>,
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

    /// Every queued message, oldest first. A missing queue directory is an empty queue.
    pub fn list(&self) -> Result<Vec<QueuedMessage>, StoreError> {
        Ok(self.scan(&self.paths.queue)?.messages)
    }

    /// Every queued message with its delivery state, oldest first.
    pub fn entries(&self) -> Result<Vec<QueueEntry>, StoreError> {
        Ok(self
            .list()?
            .into_iter()
            .map(|m| self.with_state(m))
            .collect())
    }

    /// One queued message with its delivery state.
    pub fn entry(&self, id: QueueId) -> Result<QueueEntry, StoreError> {
        Ok(self.with_state(self.get(id)?))
    }

    fn with_state(&self, message: QueuedMessage) -> QueueEntry {
        let state = read_state(&self.paths.queue, message.envelope.id);
        QueueEntry {
            message,
            attempts: state.attempts,
            next_attempt: state.next_attempt,
            last_error: state.last_error,
            finished: state.finished,
        }
    }

    /// Every message in `dead/`, oldest first.
    pub fn list_dead(&self) -> Result<Vec<QueuedMessage>, StoreError> {
        Ok(self.scan(&self.paths.dead)?.messages)
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

    /// The sealed messages of `dir`, and how many files there could not be read.
    pub fn scan(&self, dir: &Path) -> Result<Listing, StoreError> {
        let entries = match fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Listing::default()),
            Err(e) => return Err(io_err(dir)(e)),
        };
        let mut out = Listing::default();
        for entry in entries {
            let path = entry.map_err(io_err(dir))?.path();
            if !parse_file_name(&path).is_some_and(|(_, k)| k == FileKind::Message) {
                continue;
            }
            match file::read(&path) {
                Ok(m) => out.messages.push(m),
                // Still arriving, or gone between the listing and the read.
                Err(FileError::Unsealed { .. }) => {}
                Err(e) if e.is_not_found() => {}
                Err(_) => out.unreadable += 1,
            }
        }
        out.messages
            .sort_by_key(|m| (m.envelope.received_at, m.envelope.id));
        Ok(out)
    }

    pub fn parse_id(s: &str) -> Result<QueueId, StoreError> {
        QueueId::parse(s).ok_or_else(|| StoreError::BadId(s.to_string()))
    }

    pub fn get(&self, id: QueueId) -> Result<QueuedMessage, StoreError> {
        match file::read(&msg_path(&self.paths.queue, id)) {
            Err(e) if e.is_not_found() => Err(StoreError::NotFound(id.to_string())),
            Err(FileError::Unsealed { .. }) => Err(StoreError::NotFound(id.to_string())),
            other => Ok(other?),
        }
    }

    /// Removes a message for good, its state file after it (a state file left alone is cleaned up at start).
    pub fn delete(&self, id: QueueId) -> Result<(), StoreError> {
        let path = msg_path(&self.paths.queue, id);
        match fs::remove_file(&path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StoreError::NotFound(id.to_string()));
            }
            other => other.map_err(io_err(&path))?,
        }
        let _ = fs::remove_file(state_path(&self.paths.queue, id));
        File::open(&self.paths.queue)
            .and_then(|d| d.sync_all())
            .map_err(io_err(&self.paths.queue))
    }
}
