//! Reading and acting on the queue from outside the daemon (`relay queue …`, `relay status`). Safe while the
//! daemon runs: a message is visible once its `.json` is, and deletion removes the `.json` first.

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};

use super::spool::{SpoolPaths, queued_eml, queued_json};
use super::{Envelope, QueueId};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("no message {0} in the queue")]
    NotFound(String),
    #[error("`{0}` is not a queue id (32 hex digits, as `relay queue list` prints them)")]
    BadId(String),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: unreadable envelope: {source}")]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
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

    /// Every queued message, oldest first. A missing queue directory is an empty queue.
    pub fn list(&self) -> Result<Vec<Envelope>, StoreError> {
        list_dir(&self.paths.queue)
    }

    /// Every message in `dead/`, oldest first.
    pub fn list_dead(&self) -> Result<Vec<Envelope>, StoreError> {
        list_dir(&self.paths.dead)
    }

    pub fn parse_id(s: &str) -> Result<QueueId, StoreError> {
        QueueId::parse(s).ok_or_else(|| StoreError::BadId(s.to_string()))
    }

    /// The envelope and the path of the message bytes.
    pub fn get(&self, id: QueueId) -> Result<(Envelope, PathBuf), StoreError> {
        let json = queued_json(&self.paths.queue, id);
        match read_envelope(&json) {
            Err(StoreError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                Err(StoreError::NotFound(id.to_string()))
            }
            other => other.map(|e| (e, queued_eml(&self.paths.queue, id))),
        }
    }

    /// Removes a message for good.
    pub fn delete(&self, id: QueueId) -> Result<(), StoreError> {
        let json = queued_json(&self.paths.queue, id);
        match fs::remove_file(&json) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StoreError::NotFound(id.to_string()));
            }
            other => other.map_err(io_err(&json))?,
        }
        let eml = queued_eml(&self.paths.queue, id);
        match fs::remove_file(&eml) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(io_err(&eml)(e)),
            _ => {}
        }
        File::open(&self.paths.queue)
            .and_then(|d| d.sync_all())
            .map_err(io_err(&self.paths.queue))
    }
}

fn read_envelope(path: &Path) -> Result<Envelope, StoreError> {
    let bytes = fs::read(path).map_err(io_err(path))?;
    serde_json::from_slice(&bytes).map_err(|source| StoreError::Corrupt {
        path: path.to_path_buf(),
        source,
    })
}

fn list_dir(dir: &Path) -> Result<Vec<Envelope>, StoreError> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(dir)(e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let path = entry.map_err(io_err(dir))?.path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        match read_envelope(&path) {
            Ok(env) => out.push(env),
            // Deleted between the listing and the read: it is simply gone.
            Err(StoreError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    out.sort_by_key(|e| (e.received_at, e.id));
    Ok(out)
}
