//! `relay queue retry` and `relay authorize` tell a running daemon to look at the queue again through a file,
//! `STATE_DIR/.retry`: it works without a control socket, and the daemon checks it every 2 s.

use std::path::Path;
use std::time::{Duration, SystemTime};

use super::layout::SpoolPaths;
use super::state::{read_state, write_state};
use super::{QueueId, QueueStore};

pub const RETRY_TRIGGER: &str = ".retry";
/// How often the daemon looks at the trigger.
pub const TRIGGER_CHECK: Duration = Duration::from_secs(2);

/// Makes messages due now (`ids`, or every queued message) and tells a running daemon. Returns how many.
pub fn request_retry(state_dir: &Path, ids: Option<&[QueueId]>) -> std::io::Result<usize> {
    let paths = SpoolPaths::new(state_dir);
    let all: Vec<QueueId> = match ids {
        Some(ids) => ids.to_vec(),
        None => QueueStore::new(state_dir)
            .list()
            .map_err(|e| std::io::Error::other(e.to_string()))?
            .into_iter()
            .map(|m| m.envelope.id)
            .collect(),
    };
    for id in &all {
        let mut state = read_state(&paths.queue, *id);
        if state.next_attempt.take().is_some() {
            write_state(&paths.queue, *id, &state)?;
        }
    }
    touch_trigger(state_dir)?;
    Ok(all.len())
}

/// Tells a running daemon to reread the queue's schedule.
pub fn touch_trigger(state_dir: &Path) -> std::io::Result<()> {
    let path = state_dir.join(RETRY_TRIGGER);
    crate::state_files::write(
        &path,
        humantime::format_rfc3339_nanos(SystemTime::now())
            .to_string()
            .as_bytes(),
    )
}

/// When the trigger last changed.
pub fn trigger_mtime(state_dir: &Path) -> Option<SystemTime> {
    std::fs::metadata(state_dir.join(RETRY_TRIGGER))
        .and_then(|m| m.modified())
        .ok()
}
