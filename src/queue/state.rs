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
        self.last_error = Some(why.to_string());
    }

    /// The recipients of `all` not finished with, in their order.
    pub fn remaining(&self, all: &[String]) -> Vec<String> {
        all.iter()
            .filter(|r| !self.finished.contains(r))
            .cloned()
            .collect()
    }
}

/// Longest state file read: a few hundred bytes in practice.
const MAX_STATE: u64 = 64 * 1024;

pub fn read_state(dir: &Path, id: QueueId) -> DeliveryState {
    let path = state_path(dir, id);
    let Ok(file) = std::fs::File::open(path) else {
        return DeliveryState::default();
    };
    let mut bytes = Vec::new();
    let _ = std::io::Read::read_to_end(&mut std::io::Read::take(file, MAX_STATE), &mut bytes);
    serde_json::from_slice(&bytes).unwrap_or_default()
}

pub fn write_state(dir: &Path, id: QueueId, state: &DeliveryState) -> std::io::Result<()> {
    let mut f = atomic_write_file::AtomicWriteFile::open(state_path(dir, id))?;
    f.write_all(&serde_json::to_vec_pretty(state).unwrap_or_default())?;
    f.commit()
}

#[cfg(test)]
mod tests {
    use super::*;

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
