//! How long mail that failed for good stays in `dead/`: `[queue] dead_max_age` (30 days), for `relay queue
//! show` and `relay queue retry`, then it is removed. Without a bound, a device that keeps sending to an address
//! the upstream refuses fills the disk over the months, until `min_free_space` refuses all new mail.
//!
//! A message's time in `dead/` counts from its move there: its state file is written then (its mtime), and the
//! rename into `dead/` changes the message file's ctime, for one without a state file.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::QueueId;
use super::layout::{self, FileKind, msg_path, state_path};

/// How often `dead/` is looked at.
pub const SWEEP_EVERY: Duration = Duration::from_secs(3600);

/// At most this many messages removed by one sweep: a month of a mass failure goes over a few hours, each
/// sweep a bounded piece of work on the blocking pool.
const PER_SWEEP: usize = 10_000;

/// [`sweep`], said in the log: one line for what was removed (its first ids), one for a failure.
pub fn tidy(dead: &Path, keep: Duration) {
    match sweep(dead, keep, SystemTime::now()) {
        Ok(removed) if removed.is_empty() => {}
        Ok(removed) => {
            let shown: Vec<String> = removed.iter().take(10).map(QueueId::to_string).collect();
            let more = match removed.len() {
                n if n > 10 => format!(" and {} more", n - 10),
                _ => String::new(),
            };
            tracing::info!(relay_event = "dead_removed", count = removed.len(), ids = %format!("{}{more}", shown.join(", ")), "removed from dead/ after {} there ([queue] dead_max_age)", humantime::format_duration(keep));
        }
        Err(e) => {
            tracing::warn!(dir = %dead.display(), error = %e, "cannot look through dead/ for mail past dead_max_age; tried again in an hour");
        }
    }
}

/// Removes from `dead` the messages (and stray state files) that have been there longer than `keep`; zero keeps
/// everything. Returns the ids removed. A message locked by `relay queue delete` or `retry` at that moment is
/// left for the next sweep.
pub fn sweep(dead: &Path, keep: Duration, now: SystemTime) -> std::io::Result<Vec<QueueId>> {
    let mut removed = Vec::new();
    if keep.is_zero() {
        return Ok(removed);
    }
    let Some(before) = now.checked_sub(keep) else {
        return Ok(removed);
    };
    let files = match layout::files(dead) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(removed),
        Err(e) => return Err(e),
    };
    for file in files {
        if removed.len() >= PER_SWEEP {
            break;
        }
        let (id, kind) = file?;
        let gone = match kind {
            FileKind::Message => remove_message(dead, id, before)?,
            // A state file whose message is gone (a crash between the two removals, a message deleted by hand).
            FileKind::State => {
                let state = state_path(dead, id);
                if !msg_path(dead, id).exists() && modified(&state).is_some_and(|t| t < before) {
                    ignore_missing(std::fs::remove_file(&state))?;
                }
                false
            }
        };
        if gone {
            removed.push(id);
        }
    }
    Ok(removed)
}

/// Removes message `id` if it came to `dead/` before `before`: its state file first, so that a crash between the
/// two leaves the message (found again by the next sweep), never a state file taken for another's.
fn remove_message(dead: &Path, id: QueueId, before: SystemTime) -> std::io::Result<bool> {
    let msg = msg_path(dead, id);
    let state = state_path(dead, id);
    let died = modified(&state).or_else(|| changed(&msg));
    if died.is_none_or(|t| t >= before) {
        return Ok(false);
    }
    let file = match std::fs::File::open(&msg) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    // `relay queue delete` and `retry` hold this lock while they act on the message.
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => return Ok(false),
        // A filesystem without locks: removed all the same.
        Err(std::fs::TryLockError::Error(_)) => {}
    }
    ignore_missing(std::fs::remove_file(&state))?;
    match std::fs::remove_file(&msg) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

fn ignore_missing(r: std::io::Result<()>) -> std::io::Result<()> {
    match r {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).ok()?.modified().ok()
}

/// The file's ctime: when it was last renamed (or its mode or owner changed).
fn changed(path: &Path) -> Option<SystemTime> {
    let m = std::fs::metadata(path).ok()?;
    let secs = u64::try_from(m.ctime()).ok()?;
    Some(UNIX_EPOCH + Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(dir: &Path, name: &str, when: SystemTime) {
        let path = dir.join(name);
        std::fs::write(&path, "x").unwrap();
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(when)
            .unwrap();
    }

    #[test]
    fn mail_past_its_time_in_dead_goes_and_the_rest_stays() {
        let dir = tempfile::tempdir().unwrap();
        let now = SystemTime::now();
        let day = Duration::from_secs(86400);
        let (old, young, bare, stray) = (
            QueueId::new(),
            QueueId::new(),
            QueueId::new(),
            QueueId::new(),
        );
        for (id, died) in [(old, now - 31 * day), (young, now - 29 * day)] {
            at(dir.path(), &format!("{id}.msg"), now - 40 * day);
            at(dir.path(), &format!("{id}.state"), died);
        }
        // No state file: its ctime (just now) counts.
        at(dir.path(), &format!("{bare}.msg"), now - 40 * day);
        at(dir.path(), &format!("{stray}.state"), now - 31 * day);
        std::fs::write(dir.path().join("notes.txt"), "kept").unwrap();

        assert!(sweep(dir.path(), Duration::ZERO, now).unwrap().is_empty());
        let removed = sweep(dir.path(), 30 * day, now).unwrap();
        assert_eq!(removed, vec![old]);
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        let mut want = vec![
            format!("{young}.msg"),
            format!("{young}.state"),
            format!("{bare}.msg"),
            "notes.txt".to_string(),
        ];
        want.sort();
        assert_eq!(left, want);
        assert!(
            sweep(&dir.path().join("none"), 30 * day, now)
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn a_message_someone_holds_is_left_for_the_next_sweep() {
        let dir = tempfile::tempdir().unwrap();
        let now = SystemTime::now();
        let id = QueueId::new();
        at(dir.path(), &format!("{id}.msg"), now);
        at(
            dir.path(),
            &format!("{id}.state"),
            now - Duration::from_secs(7200),
        );
        let held = std::fs::File::open(msg_path(dir.path(), id)).unwrap();
        held.lock().unwrap();
        let hour = Duration::from_secs(3600);
        assert!(sweep(dir.path(), hour, now).unwrap().is_empty());
        drop(held);
        assert_eq!(sweep(dir.path(), hour, now).unwrap(), vec![id]);
    }
}
