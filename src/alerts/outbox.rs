//! One sender per channel (webhook, mail), each with its own queue of notices.
//!
//! A notice a channel could not take for now (the webhook down, or alert mail not sent: it goes through the
//! accounts, and the incident may be that very account's) is tried again later, with a growing pause, and in
//! order: an incident's opening before its recovery. One the channel refuses for good (a webhook's 4xx, mail
//! refused for good) is not tried again. Each channel waits for itself only: a webhook that times out holds up
//! neither the mail nor the alerts' looks at the queue. Bounded: [`QUEUED`] notices wait per channel (past
//! that the oldest is dropped) and as many more may be handed over (past that the newest is), one that could not
//! be sent for [`GIVE_UP`] is dropped, and what still waits at a stop after one more try is dropped: each with a
//! line, and counted (`relay_alerts_dropped_total`).

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use tokio::sync::mpsc;

use super::{Alerts, Notice, Notifier};

/// Notices waiting per channel, those being retried included (and a few more handed over meanwhile).
const QUEUED: usize = 64;
/// Notices handed over and not yet taken by the sender (it takes them between tries, which may last minutes:
/// a burst, one incident per account at once, must fit).
const HANDED: usize = 64;
/// The pause before a failed notice is tried again, doubling up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_secs(5);
const RETRY_MAX: Duration = Duration::from_secs(15 * 60);
/// A notice not sent after this long is dropped: news of a day ago is no alert.
const GIVE_UP: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    Webhook,
    Mail,
}

impl Channel {
    pub fn name(self) -> &'static str {
        match self {
            Channel::Webhook => "webhook",
            Channel::Mail => "mail",
        }
    }
}

/// What became of one try of a notice on a channel.
#[derive(Debug, PartialEq, Eq)]
pub enum Sent {
    Yes,
    /// For now: tried again later.
    Failed,
    /// For good: not tried again.
    Refused,
    /// The channel is not configured (any more: a reload removed it): nothing to send, nothing to keep.
    Off,
}

/// A channel's sender: notices go in with [`Outbox::post`]; [`Outbox::close`] lets it try what waits once more,
/// then end.
pub struct Outbox {
    tx: mpsc::Sender<Notice>,
    task: tokio::task::JoinHandle<()>,
    /// Notices the sender holds, for the count of those a stop drops when the sender cannot finish in time.
    held: Arc<AtomicUsize>,
}

impl Outbox {
    pub fn start(channel: Channel, alerts: Arc<Alerts>, notifier: Arc<Notifier>) -> Outbox {
        let (tx, rx) = mpsc::channel(HANDED);
        let held = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn(sender(channel, rx, alerts, notifier, held.clone()));
        Outbox { tx, task, held }
    }

    /// Notices this channel has not sent yet: handed over, or waiting.
    pub fn unsent(&self) -> usize {
        self.held.load(Ordering::Relaxed) + (HANDED - self.tx.capacity())
    }

    /// Hands a notice over without waiting; a channel too far behind drops it (counted).
    pub fn post(&self, notice: Notice) {
        if self.tx.try_send(notice).is_err() {
            dropped("the alert sender is too far behind");
        }
    }

    /// No more notices: what waits is tried once more; returns when the sender has ended.
    pub async fn close(self) {
        drop(self.tx);
        let _ = self.task.await;
    }
}

fn dropped(why: &str) {
    crate::metrics::global().alerts_dropped.inc();
    tracing::warn!("alert notice dropped: {why}");
}

async fn sender(
    channel: Channel,
    mut rx: mpsc::Receiver<Notice>,
    alerts: Arc<Alerts>,
    notifier: Arc<Notifier>,
    held: Arc<AtomicUsize>,
) {
    let mut waiting: VecDeque<Notice> = VecDeque::new();
    let mut pause = RETRY_FIRST;
    let mut retry_at: Option<tokio::time::Instant> = None;
    let mut open = true;
    let take = |waiting: &mut VecDeque<Notice>, n: Notice| {
        if waiting.len() >= QUEUED {
            waiting.pop_front();
            dropped("too many notices wait for a channel that cannot take them");
        }
        waiting.push_back(n);
    };
    loop {
        while let Ok(n) = rx.try_recv() {
            take(&mut waiting, n);
        }
        held.store(waiting.len(), Ordering::Relaxed);
        let due = retry_at.is_none_or(|at| tokio::time::Instant::now() >= at);
        if let Some(front) = waiting.front()
            && (due || !open)
        {
            let sent = notifier
                .deliver(channel, front, &alerts.current(), alerts.unhealthy())
                .await;
            match sent {
                Sent::Yes | Sent::Off | Sent::Refused => {
                    waiting.pop_front();
                    pause = RETRY_FIRST;
                    retry_at = None;
                    continue;
                }
                Sent::Failed if !open => {
                    // Stopping: said and counted, not kept (nowhere to keep it).
                    let left = waiting.len();
                    crate::metrics::global().alerts_dropped.inc_by(left as u64);
                    tracing::warn!(
                        channel = channel.name(),
                        notices = left,
                        "alert notices not sent before the stop are dropped"
                    );
                    return;
                }
                Sent::Failed => {
                    let age = SystemTime::now()
                        .duration_since(front.at)
                        .unwrap_or_default();
                    if age >= GIVE_UP {
                        let incident = front.incident.clone();
                        waiting.pop_front();
                        dropped(&format!(
                            "{incident} could not be sent by {} for a day",
                            channel.name()
                        ));
                        continue;
                    }
                    tracing::info!(channel = channel.name(), incident = %front.incident, "the alert is tried again in {}", humantime::format_duration(pause));
                    retry_at = Some(tokio::time::Instant::now() + pause);
                    pause = (pause * 2).min(RETRY_MAX);
                }
            }
        }
        if !open && waiting.is_empty() {
            return;
        }
        let wait = retry_at.filter(|_| !waiting.is_empty());
        tokio::select! {
            n = rx.recv(), if open => match n {
                Some(n) => take(&mut waiting, n),
                None => open = false,
            },
            _ = sleep_until(wait), if wait.is_some() => {}
        }
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
