//! What happened, for whatever watches besides the log: [`metrics`](crate::metrics) counts every event, alerts
//! turn some into incidents, and bounces answer mail that went to `dead/`.
//!
//! Each place that logs one of these events (delivery, the token refresher, the SMTP session) also calls
//! [`emit`], one line. The watchers are process-wide rather than handed down: the events come from deep in
//! delivery and token refresh, and a reload that rebuilds accounts and delivery keeps the same watchers. One relay
//! per process is what the daemon runs; in-process tests that start several share the metrics, and the last one
//! started with `[alerts]` or `bounce` receives the events.
//!
//! [`emit`] never blocks on I/O: watchers update memory and hand any slow work to their own tasks.

use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use crate::queue::QueueId;

#[derive(Debug, Clone, Copy)]
pub enum Event<'a> {
    /// A message was made durable; `latency` is from the final dot to the moment its 250 could be sent.
    Accepted {
        latency: Duration,
    },
    Delivered {
        id: QueueId,
        account: &'a str,
    },
    /// The upstream took the message for some recipients while others wait: mail went through the account (the
    /// message's own `Delivered` comes when it leaves the queue).
    PartlyDelivered {
        id: QueueId,
        account: &'a str,
    },
    /// An attempt failed for now; `account` when one was tried.
    Deferred {
        id: QueueId,
        account: Option<&'a str>,
    },
    /// The message was moved to `dead/`; `why` is its last error.
    Dead {
        id: QueueId,
        account: Option<&'a str>,
        why: &'a str,
        /// Recipients refused for good, each in its own words, by the last attempt (empty: `why` is for all).
        refused: &'a [(String, String)],
    },
    /// A queue file relay cannot deliver from (its bytes do not match its seal, its envelope is unreadable) was
    /// moved to `quarantine/`; `id` when its name gives one. Never bounced: the file cannot be trusted.
    Quarantined {
        id: Option<QueueId>,
        why: &'a str,
    },
    /// The upstream refused these recipients for good while it took the message for others, or while others wait
    /// (the message is still in `queue/` when this is emitted).
    RecipientsRefused {
        id: QueueId,
        account: &'a str,
        /// Each recipient refused for good, with the upstream's reply to its RCPT.
        refused: &'a [(String, String)],
    },
    TokenRefreshed {
        account: &'a str,
    },
    /// A refresh failed and may work later (network, the endpoint's trouble, a wrong secret).
    TokenRefreshFailed {
        account: &'a str,
        why: &'a str,
    },
    /// The grant is gone: only `relay authorize` helps.
    AuthorizationNeeded {
        account: &'a str,
        why: &'a str,
    },
    /// The upstream refused the account's freshly fetched token too (a mailbox without SMTP AUTH, a missing
    /// permission, a tenant that blocks the app): the account's mail waits, held, until a delivery through it
    /// works. `why`: the upstream's reply and its diagnosis.
    LoginRefused {
        account: &'a str,
        why: &'a str,
    },
}

/// Something that acts on events as they happen.
pub trait Watcher: Send + Sync {
    /// Called on the emitting thread (a runtime worker or the blocking pool): must not block.
    fn seen(&self, event: &Event<'_>);
}

static WATCHERS: RwLock<Vec<Arc<dyn Watcher>>> = RwLock::new(Vec::new());

/// Files quarantined before there were watchers (the start's recovery scan finds damaged files before the alerts
/// run): handed to the first watchers set, so that an alert says so. Bounded: past it, `relay status` and the
/// `quarantined` gauge still count them.
static EARLY_QUARANTINE: Mutex<Vec<(Option<QueueId>, String)>> = Mutex::new(Vec::new());
const MAX_EARLY: usize = 100;

/// Counts the event, and hands it to the watchers.
pub fn emit(event: Event<'_>) {
    crate::metrics::global().record(&event);
    let watchers = WATCHERS.read().unwrap_or_else(|p| p.into_inner());
    if watchers.is_empty()
        && let Event::Quarantined { id, why } = event
    {
        let mut early = EARLY_QUARANTINE.lock().unwrap_or_else(|p| p.into_inner());
        if early.len() < MAX_EARLY {
            early.push((id, why.to_string()));
        }
    }
    for w in watchers.iter() {
        w.seen(&event);
    }
}

/// Replaces the watchers (at start, and at a reload).
pub fn set_watchers(watchers: Vec<Arc<dyn Watcher>>) {
    let any = !watchers.is_empty();
    *WATCHERS.write().unwrap_or_else(|p| p.into_inner()) = watchers;
    if any {
        let early =
            std::mem::take(&mut *EARLY_QUARANTINE.lock().unwrap_or_else(|p| p.into_inner()));
        let watchers = WATCHERS.read().unwrap_or_else(|p| p.into_inner());
        for (id, why) in &early {
            for w in watchers.iter() {
                w.seen(&Event::Quarantined { id: *id, why });
            }
        }
    }
}
