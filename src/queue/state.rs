//! `ID.state`: a queued message's delivery state (attempts, next try, last error, the recipients already done
//! with, a Gmail upload session begun), beside its `ID.msg`.
//!
//! Written atomically after each failed or partial attempt, and when a Gmail upload session begins; the message
//! file itself is never rewritten. A missing or
//! unreadable state file means "never tried", so the worst a damaged one can do is an early retry.

use std::io::Write;
use std::path::Path;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use super::QueueId;
use super::layout::state_path;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryState {
    pub attempts: u32,
    #[serde(
        default,
        with = "humantime_serde::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub next_attempt: Option<SystemTime>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Recipients finished with: the upstream accepted the message for them, or refused them for good. Later
    /// attempts go to the others only. (Absent from state files written before partial delivery.)
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub finished: Vec<String>,
    /// When `relay queue retry` moved the message back from `dead/`: its `max_age` counts from then, or a
    /// message that died of old age would go straight back to `dead/`.
    #[serde(
        default,
        with = "humantime_serde::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub requeued_at: Option<SystemTime>,
    /// The Gmail resumable upload an attempt began: the next attempt through the same account asks it first, since
    /// it may hold the whole message, sent. (Absent from state files written before sessions were kept.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upload: Option<KeptUpload>,
    /// The Graph drafts attempts made and did not see through, at most one per account (a route's accounts take
    /// turns): the next attempt through that account asks whether it was sent (else removes it) before it makes
    /// another. (Absent from state files written before.)
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub drafts: Vec<KeptDraft>,
    /// Until when a sending limit or a provider's pause holds the message, when that is long (a day's limit): for
    /// `relay queue` and `relay status`, which cannot see the daemon's schedule. The daemon goes by its live
    /// counts, never by this (a limit raised by a reload frees the message at once).
    #[serde(
        default,
        with = "humantime_serde::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub held_until: Option<SystemTime>,
}

/// A Gmail upload session kept between attempts. Its URL is a credential: the file is 0640 like every state
/// file, and the URL is never logged (nor shown by `Debug`).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeptUpload {
    /// The account it was begun through: another one's attempt (the route changed) begins its own.
    pub account: String,
    pub url: String,
    /// The bytes it was begun for.
    pub total: u64,
    /// A hash of what of those bytes can change between attempts (`upstream::gmail::fingerprint`). Absent from
    /// files written before: such a session is asked, never resumed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
    /// When it was begun: Google keeps a session a week, and one older is not asked. Absent from files written
    /// before: asked until the message's `max_age` (then bounced unasked: nothing would bound the wait; see
    /// [`KeptUpload::is_young`]).
    #[serde(
        default,
        with = "humantime_serde::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub begun_at: Option<SystemTime>,
}

/// A Graph draft kept between attempts: its id (immutable: the same in Drafts and, once sent, in Sent Items), and
/// the account whose mailbox holds it. Not a credential: reading it takes the account's token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeptDraft {
    pub account: String,
    pub id: String,
    /// When its `/send` was posted, if it was: Graph may take a while to move a sent draft to Sent Items.
    #[serde(
        default,
        with = "humantime_serde::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub sent_at: Option<SystemTime>,
}

impl KeptUpload {
    /// Whether Google still keeps it at `now`: begun within the week. Begun "later" than now (the clock stepped
    /// back) counts as young, as the transport takes it, for up to a week more than its time says; not known, as
    /// not young (nothing bounds how long it would be waited for).
    pub fn is_young(&self, now: SystemTime) -> bool {
        let lifetime = crate::upstream::gmail::SESSION_LIFETIME;
        self.begun_at
            .is_some_and(|at| match now.duration_since(at) {
                Ok(age) => age < lifetime,
                Err(ahead) => ahead.duration() < lifetime,
            })
    }
}

impl std::fmt::Debug for KeptUpload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeptUpload")
            .field("account", &self.account)
            .field("url", &"(not shown)")
            .field("total", &self.total)
            .field("fingerprint", &self.fingerprint)
            .field("begun_at", &self.begun_at)
            .finish()
    }
}

impl DeliveryState {
    /// Counts a failed attempt and keeps its reason.
    pub fn failed(&mut self, why: &str) {
        self.attempts = self.attempts.saturating_add(1);
        self.last_error = Some(capped(why, MAX_ERROR).to_string());
    }

    /// Keeps why the message waits, without counting an attempt (the account was refused, not the message).
    pub fn waits(&mut self, why: &str) {
        self.last_error = Some(capped(why, MAX_ERROR).to_string());
    }

    /// Whether this state may have come from a file (anything but "never tried"): a message delivered with it
    /// has a state file to remove, one moved back from `dead/` included (no attempts yet, but a file).
    pub fn may_have_file(&self) -> bool {
        *self != DeliveryState::default()
    }

    /// Where the message's `max_age` counts from: its arrival, or its move back from `dead/` if later.
    pub fn age_from(&self, received_at: SystemTime) -> SystemTime {
        self.requeued_at.map_or(received_at, |r| r.max(received_at))
    }

    /// The recipients of `all` not finished with, in their order.
    pub fn remaining(&self, all: &[String]) -> Vec<String> {
        all.iter()
            .filter(|r| !self.finished.contains(r))
            .cloned()
            .collect()
    }
}

/// Longest state file read: a few hundred bytes in practice; up to a few MiB for a message to a thousand
/// recipients of which some were finished with (`finished` holds their addresses). A longer file would read as
/// no state at all (every recipient again), so this is well above what relay writes.
const MAX_STATE: u64 = 16 << 20;

/// The longest `last_error` kept: upstream replies can be long, and one per refused recipient adds up.
const MAX_ERROR: usize = 4096;

/// `text` cut to at most `max` bytes, at a character boundary.
fn capped(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// The message's state, or no state (never tried) when its file is missing or cannot be read; the daemon's way.
pub fn read_state(dir: &Path, id: QueueId) -> DeliveryState {
    match try_read_state(dir, id) {
        Ok(state) => state.unwrap_or_default(),
        // For a look at the message (when it is due, what `relay queue list` shows). An attempt, which writes
        // the state back, reads it through `try_read_state` and says what it does (`delivery.rs`).
        Err(e) => {
            tracing::debug!(relay_queue_id = %id, error = %e, "cannot read the message's delivery state; taken as never tried");
            DeliveryState::default()
        }
    }
}

/// The message's state: `Ok(None)` when it has no state file, an error when it has one that cannot be read (for
/// those who must not take a damaged file for "never tried", such as a move back from `dead/`).
pub fn try_read_state(dir: &Path, id: QueueId) -> std::io::Result<Option<DeliveryState>> {
    let file = match crate::small_files::open_regular(&state_path(dir, id)) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut std::io::Read::take(file, MAX_STATE), &mut bytes)?;
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

pub fn write_state(dir: &Path, id: QueueId, state: &DeliveryState) -> std::io::Result<()> {
    let mut f = crate::state_files::atomic(&state_path(dir, id))?;
    f.write_all(&serde_json::to_vec_pretty(state).unwrap_or_default())?;
    f.commit()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A thousand long refusals must not make a state file too long to read back (it would read as no state,
    /// and every recipient would get the message again).
    #[test]
    fn a_long_reason_is_cut_and_the_file_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let id = QueueId::new();
        let mut state = DeliveryState::default();
        state.failed(&"é 452 4.5.3 too many recipients; ".repeat(10_000));
        assert!(state.last_error.as_ref().unwrap().len() <= MAX_ERROR);
        state.finished = (0..1000)
            .map(|i| format!("{}{i}@example.com", "x".repeat(200)))
            .collect();
        write_state(dir.path(), id, &state).unwrap();
        let back = read_state(dir.path(), id);
        assert_eq!((back.attempts, back.finished.len()), (1, 1000));
    }

    #[test]
    fn max_age_counts_from_a_move_back_from_dead() {
        let received = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000);
        let later = received + std::time::Duration::from_secs(86_400);
        let mut state = DeliveryState::default();
        assert_eq!(state.age_from(received), received);
        state.requeued_at = Some(later);
        assert_eq!(state.age_from(received), later);
        // A clock set back when it was moved does not make the message older than it is.
        state.requeued_at = Some(SystemTime::UNIX_EPOCH);
        assert_eq!(state.age_from(received), received);
    }

    /// State files from before upload sessions were kept read as having none; one that has one keeps it, at
    /// 0640, and its URL is not in the state's `Debug`.
    #[test]
    fn upload_sessions_are_kept_and_old_files_read_without() {
        use std::os::unix::fs::PermissionsExt;
        let old: DeliveryState = serde_json::from_str(
            r#"{"attempts": 1, "next_attempt": "2030-01-01T00:00:00Z", "last_error": "Gmail API: timed out", "finished": ["a@x"]}"#,
        )
        .unwrap();
        assert_eq!((old.attempts, old.upload.as_ref()), (1, None));
        assert!(!serde_json::to_string(&old).unwrap().contains("upload"));
        let dir = tempfile::tempdir().unwrap();
        let id = QueueId::new();
        let state = DeliveryState {
            upload: Some(KeptUpload {
                account: "gmail".into(),
                url: "https://www.googleapis.com/upload/gmail/v1/users/me/messages/send?uploadType=resumable&upload_id=SECRET".into(),
                total: 6_000_000,
                fingerprint: Some("ab".repeat(32)),
                begun_at: Some(SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_900_000_000)),
            }),
            ..old
        };
        write_state(dir.path(), id, &state).unwrap();
        assert_eq!(read_state(dir.path(), id), state);
        let mode = std::fs::metadata(state_path(dir.path(), id))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, crate::state_files::FILE_MODE);
        assert!(!format!("{state:?}").contains("SECRET"));
    }

    #[test]
    fn old_state_files_read_and_finished_recipients_are_skipped() {
        let old: DeliveryState =
            serde_json::from_str(r#"{"attempts": 2, "last_error": "451 later"}"#).unwrap();
        assert_eq!(old.attempts, 2);
        assert!(old.finished.is_empty());
        let all = ["a@x".to_string(), "b@x".to_string(), "c@x".to_string()];
        assert_eq!(old.remaining(&all), all);
        let s = DeliveryState {
            finished: vec!["b@x".into()],
            ..old
        };
        let back: DeliveryState = serde_json::from_slice(&serde_json::to_vec(&s).unwrap()).unwrap();
        assert_eq!(back.remaining(&all), ["a@x", "c@x"]);
    }
}
