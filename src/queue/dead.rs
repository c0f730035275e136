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

/// The first look after start: not at once, so that a clock not yet set at boot (ahead, from a bad RTC) has been
/// put right by then; `RELAY_TEST_DEAD_SWEEP_MS` in a test.
pub fn first_sweep() -> Duration {
    crate::test_hooks::duration("RELAY_TEST_DEAD_SWEEP_MS", Duration::from_secs(600))
}

/// How soon the next sweep comes when one stopped at [`PER_SWEEP`]: a backlog goes in bounded pieces, not one
/// piece an hour.
pub const SWEEP_AGAIN: Duration = Duration::from_secs(60);

/// At most this many messages removed by one sweep: each sweep a bounded piece of work on the blocking pool.
const PER_SWEEP: usize = 10_000;

/// What a sweep did: the ids removed, whether it stopped at [`PER_SWEEP`] with more to look at, and the first
/// error met (a file that could not be looked at or removed is left, and the sweep goes on).
#[derive(Debug, Default)]
pub struct Swept {
    pub removed: Vec<QueueId>,
    pub more: bool,
    pub error: Option<std::io::Error>,
}

/// [`sweep`], said in the log: one line for what was removed (its first ids), one for the first error. Whether
/// more is left for a sweep soon.
pub fn tidy(dead: &Path, keep: Duration) -> bool {
    let swept = sweep(dead, keep, SystemTime::now());
    if !swept.removed.is_empty() {
        let shown: Vec<String> = swept
            .removed
            .iter()
            .take(10)
            .map(QueueId::to_string)
            .collect();
        let more = match swept.removed.len() {
            n if n > 10 => format!(" and {} more", n - 10),
            _ => String::new(),
        };
        tracing::info!(relay_event = "dead_removed", count = swept.removed.len(), ids = %format!("{}{more}", shown.join(", ")), "removed from dead/ after {} there ([queue] dead_max_age)", humantime::format_duration(keep));
    }
    if let Some(e) = &swept.error {
        tracing::warn!(dir = %dead.display(), error = %e, "cannot look at or remove some of dead/'s mail past dead_max_age; it is left, and looked at again at the next sweep");
    }
    swept.more
}

/// Removes from `dead` the messages (and stray state files) that have been there longer than `keep`; zero keeps
/// everything. A message locked by `relay queue delete` or `retry` at that moment is left for the next sweep.
pub fn sweep(dead: &Path, keep: Duration, now: SystemTime) -> Swept {
    let mut swept = Swept::default();
    if keep.is_zero() {
        return swept;
    }
    let Some(before) = now.checked_sub(keep) else {
        return swept;
    };
    let files = match layout::files(dead) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return swept,
        Err(e) => {
            swept.error = Some(e);
            return swept;
        }
    };
    for file in files {
        if swept.removed.len() >= PER_SWEEP {
            swept.more = true;
            break;
        }
        let done = file.and_then(|(id, kind)| match kind {
            FileKind::Message => remove_message(dead, id, before).map(|gone| gone.then_some(id)),
            // A state file whose message is gone (a crash between the two removals, a message deleted by hand).
            FileKind::State => {
                let state = state_path(dead, id);
                if !msg_path(dead, id).exists() && modified(&state).is_some_and(|t| t < before) {
                    ignore_missing(std::fs::remove_file(&state))?;
                }
                Ok(None)
            }
        });
        match done {
            Ok(Some(id)) => swept.removed.push(id),
            Ok(None) => {}
            Err(e) => {
                swept.error.get_or_insert(e);
            }
        }
    }
    swept
}

/// When message `id` came to `dead/`: its state file's mtime (written then), else the message file's ctime (the
/// rename into `dead/`).
fn died(dead: &Path, id: QueueId) -> Option<SystemTime> {
    modified(&state_path(dead, id)).or_else(|| changed(&msg_path(dead, id)))
}

/// Removes message `id` if it came to `dead/` before `before`: the message first, then its state file (a crash
/// between the two leaves a stray state file, which the next sweep removes).
fn remove_message(dead: &Path, id: QueueId, before: SystemTime) -> std::io::Result<bool> {
    if died(dead, id).is_none_or(|t| t >= before) {
        return Ok(false);
    }
    let msg = msg_path(dead, id);
    // Never a FIFO or a device by that name, which would block the open.
    let file = match crate::small_files::open_regular(&msg) {
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
    // Looked at again under the lock: moved back by a retry and dead again meanwhile, it is young.
    if died(dead, id).is_none_or(|t| t >= before) {
        return Ok(false);
    }
    match std::fs::remove_file(&msg) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    }
    ignore_missing(std::fs::remove_file(state_path(dead, id)))?;
    Ok(true)
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

        assert!(sweep(dir.path(), Duration::ZERO, now).removed.is_empty());
        let swept = sweep(dir.path(), 30 * day, now);
        assert_eq!(swept.removed, vec![old]);
        assert!(!swept.more && swept.error.is_none(), "{swept:?}");
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
        let none = sweep(&dir.path().join("none"), 30 * day, now);
        assert!(none.removed.is_empty() && none.error.is_none());
    }

    /// A file that cannot be looked at (a directory by a message's name) is said, and the sweep goes on.
    #[test]
    fn a_file_that_cannot_be_removed_does_not_stop_the_sweep() {
        let dir = tempfile::tempdir().unwrap();
        let now = SystemTime::now();
        let day = Duration::from_secs(86400);
        let (odd, old) = (QueueId::new(), QueueId::new());
        std::fs::create_dir(msg_path(dir.path(), odd)).unwrap();
        at(dir.path(), &format!("{odd}.state"), now - 31 * day);
        at(dir.path(), &format!("{old}.msg"), now);
        at(dir.path(), &format!("{old}.state"), now - 31 * day);
        let swept = sweep(dir.path(), 30 * day, now);
        assert_eq!(swept.removed, vec![old]);
        assert!(swept.error.is_some(), "{swept:?}");
        assert!(msg_path(dir.path(), odd).is_dir());
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
        assert!(sweep(dir.path(), hour, now).removed.is_empty());
        drop(held);
        assert_eq!(sweep(dir.path(), hour, now).removed, vec![id]);
    }
}
