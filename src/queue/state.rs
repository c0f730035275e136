//! `ID.state`: a queued message's delivery state (attempts, next try, last error, the recipients already done
//! with), beside its `ID.msg`.
//!
//! Written atomically after each failed or partial attempt; the message file itself is never rewritten. A missing or
//! unreadable state file means "never tried", so the worst a damaged one can do is an early retry.

use std::io::Write;
use std::path::Path;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use super::QueueId;
use super::layout::state_path;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
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
}

impl DeliveryState {
    /// Counts a failed attempt and keeps its reason.
    pub fn failed(&mut self, why: &str) {
        self.attempts = self.attempts.saturating_add(1);
        self.last_error = Some(capped(why, MAX_ERROR).to_string());
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

pub fn read_state(dir: &Path, id: QueueId) -> DeliveryState {
    let path = state_path(dir, id);
    let Ok(file) = std::fs::File::open(path) else {
        return DeliveryState::default();
    };
    let mut bytes = Vec::new();
    let read = std::io::Read::read_to_end(&mut std::io::Read::take(file, MAX_STATE), &mut bytes);
    match read
        .map_err(|e| e.to_string())
        .and_then(|_| serde_json::from_slice(&bytes).map_err(|e| e.to_string()))
    {
        Ok(state) => state,
        Err(e) => {
            // Read as no state: the message goes to every recipient again (a duplicate for some, never a loss).
            tracing::error!(relay_queue_id = %id, error = %e, "cannot read the message's delivery state; it is sent as on its first attempt");
            DeliveryState::default()
        }
    }
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
