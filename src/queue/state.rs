//! `ID.state`: a queued message's delivery state (attempts, next try, last error), beside its `ID.msg`.
//!
//! Written atomically after each failed attempt; the message file itself is never rewritten. A missing or
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
}

impl DeliveryState {
    /// Counts a failed attempt and keeps its reason.
    pub fn failed(&mut self, why: &str) {
        self.attempts = self.attempts.saturating_add(1);
        self.last_error = Some(why.to_string());
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
