//! A pause a provider asked an account for: a sending quota used up (Gmail's 550 5.4.5, Exchange Online's
//! `SubmissionQuotaExceeded`), or HTTP 429 with `Retry-After`. Until it ends no message of the account goes.
//!
//! Kept in memory for the scheduler, and in `STATE_DIR/rate/ACCOUNT.pause` (a report, not fsynced) so that
//! `relay status` can say why the account's mail waits and until when, and so that a restart does not try the
//! account again at once only to be refused the same way. (`.pause`, not `.json`: account names may hold dots,
//! and `rate/ACCOUNT.json` is the counters' file, so no account's pause file can be another's counters.)

use super::lock;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

/// A pause read back longer than this is not believed (a clock set back, a hand-edited file): the longest a
/// provider asks for is a day's quota (an hour at a time) or a capped `Retry-After` (6 h).
const LONGEST: Duration = Duration::from_secs(24 * 3600);

/// What the pause file holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PauseReport {
    #[serde(with = "humantime_serde")]
    pub until: SystemTime,
    /// The provider's words that asked for it.
    pub reply: String,
}

pub fn pause_path(state_dir: &Path, account: &str) -> PathBuf {
    state_dir.join("rate").join(format!("{account}.pause"))
}

/// The account's pause, if one is on file and still ahead of `now` (and believable).
pub fn read_pause(state_dir: &Path, account: &str, now: SystemTime) -> Option<PauseReport> {
    let report: PauseReport = crate::small_files::report(&pause_path(state_dir, account))?;
    let ahead = report.until.duration_since(now).ok()?;
    (!ahead.is_zero() && ahead <= LONGEST).then_some(report)
}

/// Removes every account's pause file (`relay queue retry`, from outside the daemon).
pub fn forget_all(state_dir: &Path) -> Result<(), (PathBuf, std::io::Error)> {
    let dir = state_dir.join("rate");
    let entries = match std::fs::read_dir(&dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        entries => entries.map_err(|e| (dir.clone(), e))?,
    };
    for entry in entries {
        let path = entry.map_err(|e| (dir.clone(), e))?.path();
        if path.extension().is_some_and(|x| x == "pause") {
            match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err((path, e)),
                _ => {}
            }
        }
    }
    Ok(())
}

/// One account's pause.
#[derive(Debug)]
pub struct ProviderPause {
    /// `None`: in memory only (an account built without a state dir).
    path: Option<PathBuf>,
    now: Mutex<Option<PauseReport>>,
}

impl ProviderPause {
    pub fn unpersisted() -> ProviderPause {
        ProviderPause {
            path: None,
            now: Mutex::new(None),
        }
    }

    /// The account's pause from the state dir: one still ahead goes on (and is said in the log, since nothing
    /// else in this run's log would explain why the account's mail waits).
    pub fn load(state_dir: &Path, account: &str, now: SystemTime) -> ProviderPause {
        let report = read_pause(state_dir, account, now);
        let pause = ProviderPause {
            path: Some(pause_path(state_dir, account)),
            now: Mutex::new(report.clone()),
        };
        match &report {
            Some(r) => tracing::warn!(
                relay_account = %account,
                relay_upstream_reply = %r.reply,
                "the provider asked for a pause until {} (on file in rate/): the account's mail is held until then; `relay queue retry` ends every account's pause early",
                humantime::format_rfc3339_seconds(r.until)
            ),
            // Over, or not believable: `relay status` must not show it either.
            None => pause.forget(),
        }
        pause
    }

    /// No message of the account goes before `until` (a later pause already asked for stays). Whether the
    /// account was not paused before.
    pub fn extend(&self, until: SystemTime, reply: &str) -> bool {
        let now = SystemTime::now();
        let mut p = lock(&self.now);
        let was = p.as_ref().map(|r| r.until).filter(|&at| at > now);
        if was.is_some_and(|at| at >= until) {
            return false;
        }
        let report = p.insert(PauseReport {
            until,
            reply: reply.to_string(),
        });
        // Written under the lock, so that two pauses asked at once leave the later one on file.
        if let Some(path) = &self.path {
            let bytes = serde_json::to_vec_pretty(report).unwrap_or_default();
            if let Err(e) = crate::state_files::replace(path, &bytes) {
                // The pause holds all the same; only `relay status` and a restart will not know of it.
                tracing::warn!(path = %path.display(), error = %e, "cannot record the pause");
            }
        }
        was.is_none()
    }

    /// Ends a pause early (`relay queue retry`: the sysadmin says the cause is gone); whether there was one.
    pub fn lift(&self, now: SystemTime) -> bool {
        let mut p = lock(&self.now);
        let was = p.take();
        if was.is_some() {
            self.forget();
        }
        was.is_some_and(|r| r.until > now)
    }

    /// Until when the account is paused, if that is still ahead.
    pub fn until(&self, now: SystemTime) -> Option<SystemTime> {
        self.report(now).map(|r| r.until)
    }

    /// The pause, with the provider's words that asked for it, if it is still ahead.
    pub fn report(&self, now: SystemTime) -> Option<PauseReport> {
        let mut p = lock(&self.now);
        match &*p {
            Some(r) if r.until > now => Some(r.clone()),
            Some(_) => {
                *p = None;
                self.forget();
                None
            }
            None => None,
        }
    }

    fn forget(&self) {
        if let Some(path) = &self.path
            && let Err(e) = std::fs::remove_file(path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(path = %path.display(), error = %e, "cannot remove the pause's file: `relay status` and a restart will still see the pause");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pause is on file while it lasts, read back by a new run, and gone once lifted or over.
    #[test]
    fn a_pause_is_kept_in_its_file_until_it_ends() {
        let dir = tempfile::tempdir().unwrap();
        let now = SystemTime::now();
        let hour = now + Duration::from_secs(3600);
        let pause = ProviderPause::load(dir.path(), "a.b", now);
        assert!(pause.extend(hour, "550 5.4.5 Daily user sending limit exceeded"));
        assert!(!pause.extend(now + Duration::from_secs(60), "429"));
        let report = read_pause(dir.path(), "a.b", now).unwrap();
        assert_eq!(report.until, hour);
        assert!(report.reply.starts_with("550 5.4.5"), "{report:?}");

        let again = ProviderPause::load(dir.path(), "a.b", now);
        assert_eq!(again.until(now), Some(hour));
        assert_eq!(again.until(hour), None, "over");
        assert!(read_pause(dir.path(), "a.b", now).is_none());

        assert!(
            again.extend(hour, "429"),
            "a new pause once the last is over"
        );
        assert!(pause_path(dir.path(), "a.b").exists());
        assert!(again.lift(now));
        assert!(!again.lift(now));
        assert!(!pause_path(dir.path(), "a.b").exists());
    }

    /// `relay queue retry` removes every pause file, and nothing else of `rate/`.
    #[test]
    fn a_retry_forgets_every_pause() {
        let dir = tempfile::tempdir().unwrap();
        let now = SystemTime::now();
        assert!(forget_all(dir.path()).is_ok(), "no rate/ yet");
        for name in ["a", "b.pause"] {
            ProviderPause::load(dir.path(), name, now).extend(now + Duration::from_secs(60), "429");
        }
        std::fs::write(dir.path().join("rate/a.json"), b"{}").unwrap();
        forget_all(dir.path()).unwrap();
        let left: Vec<_> = std::fs::read_dir(dir.path().join("rate"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, ["a.json"]);
    }

    /// A pause far beyond anything a provider asks for (a clock set back) is not believed.
    #[test]
    fn an_unbelievable_pause_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let now = SystemTime::now();
        let pause = ProviderPause::load(dir.path(), "a", now);
        pause.extend(now + Duration::from_secs(3 * 24 * 3600), "x");
        assert!(read_pause(dir.path(), "a", now).is_none());
        assert_eq!(ProviderPause::load(dir.path(), "a", now).until(now), None);
        assert!(!pause_path(dir.path(), "a").exists(), "removed at load");
    }
}
