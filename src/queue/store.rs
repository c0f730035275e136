//! Reading and acting on the queue from outside the daemon (`relay queue …`, `relay status`). Safe while the
//! daemon runs: a message still arriving has no seal yet and is not listed.

use std::fs::{self, File};
use std::io::{self, BufRead, BufReader};
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::seal::is_sealed;
use super::spool::{SpoolPaths, msg_path};
use super::{Envelope, QueueId};

/// Longest envelope line we read: 100 recipients of 256 bytes fit many times over.
const MAX_ENVELOPE_LINE: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("no message {0} in the queue")]
    NotFound(String),
    #[error("`{0}` is not a queue id (32 hex digits, as `relay queue list` prints them)")]
    BadId(String),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: unreadable envelope line: {reason}")]
    Corrupt { path: PathBuf, reason: String },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A message in the queue: its envelope, and where its bytes are.
#[derive(Debug, Clone, Serialize)]
pub struct QueuedMessage {
    #[serde(flatten)]
    pub envelope: Envelope,
    /// Bytes of the message: relay's `Received:` line plus what the client sent.
    pub size: u64,
    #[serde(skip)]
    pub path: PathBuf,
    /// Where the message starts in the file (after the envelope line).
    #[serde(skip)]
    pub offset: u64,
    /// Length and hash of the message, or zeros while it is still arriving (`seal.rs`).
    #[serde(skip)]
    pub seal: String,
}

/// The first line of a queue file.
#[derive(Serialize, serde::Deserialize)]
struct Line<E> {
    #[serde(flatten)]
    envelope: E,
    seal: String,
}

impl QueuedMessage {
    /// The first line of a queue file: the envelope and the seal, as one line of JSON (compact JSON never
    /// holds a raw newline).
    pub(crate) fn line(envelope: &Envelope, seal: &str) -> Vec<u8> {
        let line = Line {
            envelope,
            seal: seal.to_string(),
        };
        let mut bytes = serde_json::to_vec(&line).unwrap_or_default();
        bytes.push(b'\n');
        bytes
    }

    /// Complete: not a message still arriving.
    pub fn is_sealed(&self) -> bool {
        is_sealed(&self.seal)
    }

    /// Reads the envelope line of a queue file.
    pub fn read(path: &Path) -> Result<QueuedMessage, StoreError> {
        let file = File::open(path).map_err(io_err(path))?;
        let len = file.metadata().map_err(io_err(path))?.len();
        let mut line = Vec::new();
        BufReader::new(io::Read::take(file, MAX_ENVELOPE_LINE))
            .read_until(b'\n', &mut line)
            .map_err(io_err(path))?;
        let corrupt = |reason: String| StoreError::Corrupt {
            path: path.to_path_buf(),
            reason,
        };
        if line.last() != Some(&b'\n') {
            return Err(corrupt("no complete first line".into()));
        }
        let parsed: Line<Envelope> =
            serde_json::from_slice(&line).map_err(|e| corrupt(e.to_string()))?;
        let offset = line.len() as u64;
        Ok(QueuedMessage {
            envelope: parsed.envelope,
            size: len.saturating_sub(offset),
            path: path.to_path_buf(),
            offset,
            seal: parsed.seal,
        })
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
    pub fn list(&self) -> Result<Vec<QueuedMessage>, StoreError> {
        list_dir(&self.paths.queue)
    }

    /// Every message in `dead/`, oldest first.
    pub fn list_dead(&self) -> Result<Vec<QueuedMessage>, StoreError> {
        list_dir(&self.paths.dead)
    }

    pub fn parse_id(s: &str) -> Result<QueueId, StoreError> {
        QueueId::parse(s).ok_or_else(|| StoreError::BadId(s.to_string()))
    }

    pub fn get(&self, id: QueueId) -> Result<QueuedMessage, StoreError> {
        match QueuedMessage::read(&msg_path(&self.paths.queue, id)) {
            Err(StoreError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                Err(StoreError::NotFound(id.to_string()))
            }
            Ok(m) if !m.is_sealed() => Err(StoreError::NotFound(id.to_string())),
            other => other,
        }
    }

    /// Removes a message for good.
    pub fn delete(&self, id: QueueId) -> Result<(), StoreError> {
        let path = msg_path(&self.paths.queue, id);
        match fs::remove_file(&path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StoreError::NotFound(id.to_string()));
            }
            other => other.map_err(io_err(&path))?,
        }
        File::open(&self.paths.queue)
            .and_then(|d| d.sync_all())
            .map_err(io_err(&self.paths.queue))
    }
}

fn list_dir(dir: &Path) -> Result<Vec<QueuedMessage>, StoreError> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(dir)(e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let path = entry.map_err(io_err(dir))?.path();
        if path.extension().is_none_or(|e| e != "msg") {
            continue;
        }
        match QueuedMessage::read(&path) {
            Ok(m) if m.is_sealed() => out.push(m),
            // Still arriving.
            Ok(_) => {}
            // Deleted between the listing and the read: it is simply gone.
            Err(StoreError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    out.sort_by_key(|m| (m.envelope.received_at, m.envelope.id));
    Ok(out)
}
