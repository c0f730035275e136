//! Where queued mail lives under the state dir, and what its files are called. Every part of the queue (and the
//! command line) finds files through here, so the layout is written down once.

use std::path::{Path, PathBuf};

use super::QueueId;

/// The directories under the state dir that hold mail.
#[derive(Debug, Clone)]
pub struct SpoolPaths {
    /// Waiting for delivery: `ID.msg`, and `ID.state` once an attempt has failed.
    pub queue: PathBuf,
    /// Failed for good, kept with the last error.
    pub dead: PathBuf,
    /// Files relay could not read or whose seal did not match: kept for a person to look at, never delivered
    /// and never deleted by relay.
    pub quarantine: PathBuf,
}

impl SpoolPaths {
    pub fn new(state_dir: &Path) -> SpoolPaths {
        SpoolPaths {
            queue: state_dir.join("queue"),
            dead: state_dir.join("dead"),
            quarantine: state_dir.join("quarantine"),
        }
    }

    /// The state dir these live in.
    pub fn state_dir(&self) -> &Path {
        self.queue.parent().unwrap_or(Path::new("."))
    }
}

/// Where a message lives in `dir` (`queue/`, `dead/` or `quarantine/`).
pub fn msg_path(dir: &Path, id: QueueId) -> PathBuf {
    dir.join(format!("{id}.msg"))
}

/// A message's delivery state beside it in `dir`.
pub fn state_path(dir: &Path, id: QueueId) -> PathBuf {
    dir.join(format!("{id}.state"))
}

/// The queue id a file in a queue directory belongs to, and whether it is the message (`.msg`) or its state.
pub fn parse_file_name(path: &Path) -> Option<(QueueId, FileKind)> {
    let kind = match path.extension()?.to_str()? {
        "msg" => FileKind::Message,
        "state" => FileKind::State,
        _ => return None,
    };
    let id = QueueId::parse(path.file_stem()?.to_str()?)?;
    Some((id, kind))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    Message,
    State,
}
