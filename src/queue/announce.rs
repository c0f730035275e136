//! How the committer tells the scheduler of new mail: a bounded channel of queue ids, and a flag for the ids
//! that found it full. An announcement is only a hint, since the message is on disk either way: a scheduler that
//! falls behind (reading a large `queue/` again, say) finds the flag set and reads the directory, instead of the
//! channel growing with every message accepted meanwhile.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::mpsc;

use super::QueueId;

/// Announcements waiting for the scheduler at most (16 bytes each).
const HELD: usize = 4096;

/// The committer's side.
#[derive(Clone)]
pub struct Announcer {
    tx: mpsc::Sender<QueueId>,
    missed: Arc<AtomicBool>,
}

/// The scheduler's side.
pub struct Announcements {
    rx: mpsc::Receiver<QueueId>,
    missed: Arc<AtomicBool>,
}

pub fn channel() -> (Announcer, Announcements) {
    channel_holding(test_held().unwrap_or(HELD))
}

/// Test hook, compiled into debug builds only: `RELAY_TEST_ANNOUNCEMENTS_HELD` sets the bound, so that a test
/// through the binary fills it with a few messages. Not part of relay's interface.
fn test_held() -> Option<usize> {
    #[cfg(debug_assertions)]
    {
        std::env::var("RELAY_TEST_ANNOUNCEMENTS_HELD")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|n| *n > 0)
    }
    #[cfg(not(debug_assertions))]
    None
}

fn channel_holding(held: usize) -> (Announcer, Announcements) {
    let (tx, rx) = mpsc::channel(held);
    let missed = Arc::new(AtomicBool::new(false));
    (
        Announcer {
            tx,
            missed: missed.clone(),
        },
        Announcements { rx, missed },
    )
}

impl Announcer {
    /// Never waits: the committer's thread has sessions waiting on it.
    pub fn announce(&self, id: QueueId) {
        if let Err(mpsc::error::TrySendError::Full(_)) = self.tx.try_send(id) {
            self.missed.store(true, Ordering::Release);
        }
    }
}

impl Announcements {
    /// The next announced message; `None` once the committer is gone.
    pub async fn recv(&mut self) -> Option<QueueId> {
        self.rx.recv().await
    }

    /// Whether an announcement was dropped since the last call: then `queue/` must be read again, and the
    /// announcements still waiting are dropped too, since that reading finds them (else each would be scheduled
    /// twice).
    pub fn missed(&mut self) -> bool {
        if !self.missed.swap(false, Ordering::AcqRel) {
            return false;
        }
        while self.rx.try_recv().is_ok() {}
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_full_channel_is_remembered_not_grown() {
        let (tx, mut rx) = channel_holding(2);
        let ids: Vec<QueueId> = (0..3).map(|_| QueueId::new()).collect();
        for id in &ids {
            tx.announce(*id);
        }
        assert!(rx.missed());
        assert!(!rx.missed(), "said once");
        // What was waiting went with it: the reading of the directory finds those.
        tx.announce(ids[2]);
        assert_eq!(rx.recv().await, Some(ids[2]));
        assert!(!rx.missed());
    }
}
