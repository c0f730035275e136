//! The delivery attempts that are looking for a connection, and the order in which they choose one.
//!
//! The scheduler starts attempts in order, oldest message first, but they do not choose in that order: tokio
//! polls the task spawned last first (its LIFO slot), several workers poll at once, and an attempt that reads a
//! large message off the runtime's thread arrives later. Mail over a sending limit waits oldest first, and a
//! newer message that fits the day's room must not go before an older one that does not (after a restart,
//! every message is due at once): so an attempt chooses its account only once the older attempts begun before
//! it have chosen theirs, or found that they wait, or ended. That costs nothing where attempts arrive in order;
//! the wait is bounded, so that an older attempt held up by its disk does not hold every delivery.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;

use super::QueueId;

/// The longest an attempt waits for older ones to choose before it chooses anyway.
const ORDER_WAIT: Duration = Duration::from_secs(1);

/// Shared by every [`Seeking`] of a delivery, and by the delivery a reload puts in its place.
#[derive(Debug, Default)]
pub struct Seekers {
    /// Attempts started that have not yet taken (or given up on) a connection.
    count: AtomicUsize,
    /// Of those, the ones that have not chosen yet.
    choosing: Mutex<BTreeSet<QueueId>>,
    chosen: Notify,
}

impl Seekers {
    /// How many attempts are looking for a connection now.
    pub fn count(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    /// Counts the attempt of `id`, about to start, among them.
    pub fn start(self: &Arc<Self>, id: QueueId) -> Seeking {
        self.count.fetch_add(1, Ordering::AcqRel);
        self.lock().insert(id);
        Seeking {
            seekers: self.clone(),
            id,
            choosing: true,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeSet<QueueId>> {
        self.choosing.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn has_older(&self, id: QueueId) -> bool {
        self.lock().first().is_some_and(|first| *first < id)
    }
}

/// One attempt among those looking for a connection, until it takes one or ends.
#[derive(Debug)]
pub struct Seeking {
    seekers: Arc<Seekers>,
    id: QueueId,
    choosing: bool,
}

impl Seeking {
    /// Resolves once no older attempt is still to choose (or after [`ORDER_WAIT`]).
    pub async fn after_older(&self) {
        let until = tokio::time::Instant::now() + ORDER_WAIT;
        loop {
            let chosen = self.seekers.chosen.notified();
            tokio::pin!(chosen);
            // Registered before the look, so that a choice made between the two is not missed.
            chosen.as_mut().enable();
            if !self.seekers.has_older(self.id) {
                return;
            }
            if tokio::time::timeout_at(until, chosen).await.is_err() {
                tracing::debug!(relay_queue_id = %self.id, "an older message's attempt is slow to choose its account; this one chooses without it");
                return;
            }
        }
    }

    /// This attempt has chosen (or found that it waits): newer ones may choose now.
    pub fn chosen(&mut self) {
        if std::mem::take(&mut self.choosing) {
            self.seekers.lock().remove(&self.id);
            self.seekers.chosen.notify_waiters();
        }
    }
}

impl Drop for Seeking {
    fn drop(&mut self) {
        self.chosen();
        self.seekers.count.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> QueueId {
        let mut hex = "0".repeat(32);
        hex.replace_range(30.., &format!("{n:02x}"));
        QueueId::parse(&hex).expect("a queue id")
    }

    #[tokio::test]
    async fn a_newer_attempt_chooses_after_the_older_ones() {
        let seekers = Arc::new(Seekers::default());
        let mut older = seekers.start(id(1));
        let newer = seekers.start(id(2));
        assert_eq!(seekers.count(), 2);
        // The newest is polled first (as tokio's LIFO slot does): it waits until the older one has chosen.
        let waiting = tokio::spawn(async move {
            newer.after_older().await;
            newer
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        older.chosen();
        let newer = tokio::time::timeout(Duration::from_millis(500), waiting)
            .await
            .expect("woken once the older one chose")
            .expect("no panic");
        // An older attempt that has chosen still counts among those seeking a connection until it ends.
        assert_eq!(seekers.count(), 2);
        drop(older);
        drop(newer);
        assert_eq!(seekers.count(), 0);
        assert!(seekers.lock().is_empty());
    }

    #[tokio::test]
    async fn an_older_attempt_that_ends_without_choosing_lets_the_newer_one_go() {
        let seekers = Arc::new(Seekers::default());
        let older = seekers.start(id(1));
        let newer = seekers.start(id(2));
        let waiting = tokio::spawn(async move { newer.after_older().await });
        tokio::task::yield_now().await;
        drop(older);
        tokio::time::timeout(Duration::from_millis(500), waiting)
            .await
            .expect("woken by the older one's end")
            .expect("no panic");
    }

    #[tokio::test]
    async fn an_older_attempt_that_never_chooses_holds_the_newer_one_a_bounded_time() {
        let seekers = Arc::new(Seekers::default());
        let _older = seekers.start(id(1));
        let newer = seekers.start(id(2));
        let began = tokio::time::Instant::now();
        tokio::time::timeout(ORDER_WAIT * 5, newer.after_older())
            .await
            .expect("bounded");
        assert!(began.elapsed() >= ORDER_WAIT);
        // The oldest one never waits.
        let oldest = seekers.start(id(0));
        oldest.after_older().await;
    }
}
