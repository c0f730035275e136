//! `relay queue retry` and `relay authorize` tell a running daemon to look at the queue again through a file,
//! `STATE_DIR/.retry`: it works without a control socket, and the daemon checks it every 2 s.

use std::path::Path;
use std::time::{Duration, SystemTime};

use super::file::{self, FileError};
use super::layout::{SpoolPaths, msg_path, state_path};
use super::state::{read_state, write_state};
use super::{QueueId, QueueStore, StoreError};

pub const RETRY_TRIGGER: &str = ".retry";
/// How often the daemon looks at the trigger.
pub const TRIGGER_CHECK: Duration = Duration::from_secs(2);

/// What `relay queue retry` is asked to try again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// One message: made due now if queued, moved back from `dead/` if dead.
    One(QueueId),
    /// Every queued message; with `dead`, every dead message too. Without it dead mail stays where it is: it was
    /// refused for good (an unknown recipient, a policy), and sending it all again would mostly bring the same
    /// refusals, and with `bounce = "sender"` a second report to each sender.
    All { dead: bool },
}

/// What a retry did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Retried {
    /// Queued messages made due now.
    pub due: usize,
    /// Messages moved back from `dead/` to the queue, due now.
    pub requeued: usize,
    /// Dead messages left where they are (`All { dead: false }`).
    pub dead_left: usize,
}

/// Makes messages due now, moves dead ones back as asked, and tells a running daemon. A state dir that does not
/// exist holds nothing to retry (and no daemon uses it): that is not an error, but for one message asked for.
pub fn retry(state_dir: &Path, what: Retry) -> Result<Retried, StoreError> {
    let store = QueueStore::new(state_dir);
    let done = act(&store, what);
    // Whatever failed above, what was already made due or moved back must reach a running daemon, which
    // rereads the queue only when told (or at its next start). It lifts the pauses providers asked for then;
    // their files go here too, so that a daemon started later does not hold the mail again.
    if store.missing_state_dir().is_none() {
        let lifted = super::pause::forget_all(state_dir)
            .map_err(|(path, source)| StoreError::Io { path, source });
        let path = state_dir.join(RETRY_TRIGGER);
        let told = write_trigger(&path).map_err(|source| StoreError::Io { path, source });
        return done.and_then(|d| lifted.and(told).map(|()| d));
    }
    done
}

/// The work of [`retry`]. For every message, one that fails (a message in both `queue/` and `dead/`, a state
/// file that cannot be read) does not stop the others: the first such error is returned once all were tried.
fn act(store: &QueueStore, what: Retry) -> Result<Retried, StoreError> {
    let mut done = Retried::default();
    match what {
        Retry::One(id) => {
            if make_due(store.paths(), id)? {
                done.due = 1;
            } else {
                store.requeue(id)?;
                done.requeued = 1;
            }
        }
        Retry::All { dead } => {
            // Each message as it is listed, none held: a backlog of any size costs no memory.
            let mut first_error = None;
            store.each(&store.paths().queue, |m| {
                match make_due(store.paths(), m.envelope.id) {
                    // In an attempt right now: tried already.
                    Ok(true) | Err(StoreError::Busy { .. }) => done.due += 1,
                    Ok(false) => {}
                    Err(e) => {
                        first_error.get_or_insert(e);
                    }
                }
            })?;
            store.each(&store.paths().dead, |m| {
                if !dead {
                    done.dead_left += 1;
                    return;
                }
                match store.requeue(m.envelope.id) {
                    Ok(()) => done.requeued += 1,
                    // Deleted or moved back by someone else since the listing.
                    Err(StoreError::NotFound(_) | StoreError::Quarantined { .. }) => {}
                    Err(e) => {
                        first_error.get_or_insert(e);
                    }
                }
            })?;
            if let Some(e) = first_error {
                return Err(e);
            }
        }
    }
    Ok(done)
}

/// Makes a queued message due now: `false` when it is not in `queue/`.
fn make_due(paths: &SpoolPaths, id: QueueId) -> Result<bool, StoreError> {
    // Read, not only looked for: a file that is not a message would be reported "due now", and never go.
    let path = msg_path(&paths.queue, id);
    let file = match file::read_open(&path) {
        Ok((_, file)) => file,
        Err(e) if e.is_not_found() => return Ok(false),
        // Still arriving: not in the queue yet.
        Err(FileError::Unsealed { .. }) => return Ok(false),
        Err(e @ FileError::Corrupt { .. }) => return Err(StoreError::Unreadable(e)),
        Err(e) => return Err(e.into()),
    };
    // An attempt holds the lock until it has written the outcome: a retry written meanwhile would be overwritten
    // by its deferral, and the message would wait its next slot after all.
    super::store::lock(&file, &path, id, "made due")?;
    let mut state = read_state(&paths.queue, id);
    // (A note that a sending limit holds it stays: a retry does not lift a limit, and the daemon, going by its
    // counts, holds it again. A provider's pause the retry ends frees it, and its attempt removes the note.)
    if state.next_attempt.take().is_some() {
        write_state(&paths.queue, id, &state).map_err(|source| StoreError::Io {
            path: state_path(&paths.queue, id),
            source,
        })?;
    }
    Ok(true)
}

/// Makes queued messages due now (`ids`, or every queued message) and tells a running daemon. Returns how many.
/// Dead messages among `ids` are moved back to the queue; `None` leaves dead mail alone (see [`Retry::All`]).
pub fn request_retry(state_dir: &Path, ids: Option<&[QueueId]>) -> std::io::Result<usize> {
    let err = |e: StoreError| std::io::Error::other(e.to_string());
    match ids {
        None => retry(state_dir, Retry::All { dead: false })
            .map(|r| r.due)
            .map_err(err),
        Some(ids) => ids.iter().try_fold(0, |n, id| {
            let r = retry(state_dir, Retry::One(*id)).map_err(err)?;
            Ok(n + r.due + r.requeued)
        }),
    }
}

/// What a trigger asks of the daemon besides rereading the schedule: every account's waits lifted (`relay queue
/// retry`, `relay authorize`), or only this account's (a `relay test` that went through it).
const ACCOUNT_LINE: &str = "account ";

/// A `relay test` went through `account`: its queued messages (those `routed` says it takes) are made due now,
/// and only its waits (a provider's pause, a refused token's minute, an unreachable upstream's hold) are lifted:
/// another account's pause (a used-up quota) or hold (a refused password, which lockout policies count) is not
/// the tester's to end. Returns how many were made due.
pub fn request_account_retry(
    state_dir: &Path,
    account: &str,
    routed: impl Fn(&super::Envelope) -> bool,
) -> Result<usize, StoreError> {
    let store = QueueStore::new(state_dir);
    if store.missing_state_dir().is_some() {
        return Ok(0);
    }
    let mut due = 0;
    store.each(&store.paths().queue, |m| {
        if routed(&m.envelope)
            && matches!(
                make_due(store.paths(), m.envelope.id),
                Ok(true) | Err(StoreError::Busy { .. })
            )
        {
            due += 1;
        }
    })?;
    let pause = super::pause::pause_path(state_dir, account);
    match std::fs::remove_file(&pause) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(StoreError::Io {
                path: pause,
                source: e,
            });
        }
        _ => {}
    }
    // A trigger the daemon may not have read yet (it looks every TRIGGER_CHECK) is added to, not replaced: a
    // `relay queue retry --all` just before would otherwise lift only this account's waits.
    let recent = trigger_mtime(state_dir)
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|age| age < TRIGGER_CHECK * 5);
    let mut accounts = vec![account.to_string()];
    if recent {
        match trigger_accounts(state_dir) {
            // Every account's: it stays so.
            None => accounts.clear(),
            Some(named) => accounts.extend(named.into_iter().filter(|n| n != account)),
        }
    }
    let path = state_dir.join(RETRY_TRIGGER);
    let mut text: String = accounts
        .iter()
        .map(|a| format!("{ACCOUNT_LINE}{a}\n"))
        .collect();
    text.push_str(&humantime::format_rfc3339_nanos(SystemTime::now()).to_string());
    crate::state_files::write(&path, text.as_bytes())
        .map_err(|source| StoreError::Io { path, source })?;
    Ok(due)
}

/// The accounts a trigger names (see [`request_account_retry`]); `None`: every account (a trigger that cannot
/// be read too).
pub fn trigger_accounts(state_dir: &Path) -> Option<Vec<String>> {
    let text =
        crate::small_files::read_to_string(&state_dir.join(RETRY_TRIGGER), 64 * 1024).ok()?;
    let named: Vec<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix(ACCOUNT_LINE))
        .map(str::to_string)
        .collect();
    (!named.is_empty()).then_some(named)
}

/// Tells a running daemon to reread the queue's schedule.
pub fn touch_trigger(state_dir: &Path) -> std::io::Result<()> {
    let path = state_dir.join(RETRY_TRIGGER);
    write_trigger(&path)
        .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

fn write_trigger(path: &Path) -> std::io::Result<()> {
    crate::state_files::write(
        path,
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A trigger the daemon may not have read yet is added to: a `relay queue retry --all` just before a
    /// `relay test` stays every account's; two tests name both accounts.
    #[test]
    fn an_account_trigger_adds_to_one_not_yet_read() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("queue")).unwrap();
        let none = |_: &super::super::Envelope| false;
        request_account_retry(dir.path(), "office", none).unwrap();
        assert_eq!(
            trigger_accounts(dir.path()),
            Some(vec!["office".to_string()])
        );
        request_account_retry(dir.path(), "gmail", none).unwrap();
        let mut both = trigger_accounts(dir.path()).unwrap();
        both.sort();
        assert_eq!(both, ["gmail", "office"]);
        touch_trigger(dir.path()).unwrap();
        request_account_retry(dir.path(), "office", none).unwrap();
        assert_eq!(
            trigger_accounts(dir.path()),
            None,
            "every account's, as retry --all asked"
        );
    }
}
