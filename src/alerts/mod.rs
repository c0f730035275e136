//! `[alerts]`: one notice when an incident opens and one when it recovers, by webhook and/or mail.
//!
//! Events reach the [`Tracker`] synchronously, under a lock, from [`events`](crate::events): no event is lost and
//! the counts are exact. The notices it returns go into a bounded channel to the alerts' task, which hands each
//! to one sender per channel (`outbox.rs`: a notice a channel could not take is tried again later, in order);
//! when they are too far behind, a notice is dropped and counted (`relay_alerts_dropped_total`) rather than ever
//! holding up the delivery or token refresh that emitted it.
//! Open incidents are kept in `STATE_DIR/alerts.json`, so that a restart does not announce them again.
//!
//! What alerts take from the config (the `[alerts]` settings, the host's name, the accounts alert mail may go
//! through and their dated credentials) is a [`Setup`] that a reload replaces whole ([`Alerts::follow`]): the
//! sending task reads the current one for each notice and each look, so that no task is restarted and nothing of
//! an old config is kept.

pub mod incidents;
pub mod notify;
mod outbox;

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, watch};

use crate::config::AlertsConfig;
use crate::events::{Event, Watcher};
use crate::metrics::StateReader;
use crate::oauth::expiry::Expiry;
use crate::queue::room::DiskReport;
pub use incidents::{Incident, Kind, Notice, State, Tracker};
pub use notify::{MailAccount, Notifier};
use outbox::{Channel, Outbox};

/// Notices waiting for the sender; past this they are dropped (and counted).
const BACKLOG: usize = 64;
/// How long a stop waits for notices still waiting to be sent.
const DRAIN: Duration = Duration::from_secs(5);

pub struct Alerts {
    tracker: Mutex<Tracker>,
    tx: mpsc::Sender<Notice>,
    file: PathBuf,
    setup: watch::Sender<Arc<Setup>>,
}

/// What alerts follow from the running config; replaced whole at a reload.
pub struct Setup {
    pub config: AlertsConfig,
    /// Named in every notice (the webhook's `host`, the mail's subject).
    pub hostname: String,
    /// Every configured account, in config order: alert mail may go through any healthy one.
    pub accounts: Vec<MailAccount>,
    /// The configured accounts' dated credentials (client secrets, certificates).
    pub expiries: Vec<(String, Expiry)>,
    /// `[queue] min_free_space`: the `disk_full` incident's threshold.
    pub min_free_space: u64,
}

impl Setup {
    fn account_names(&self) -> HashSet<String> {
        self.accounts
            .iter()
            .map(|m| m.account.name.clone())
            .collect()
    }
}

pub fn incidents_path(state_dir: &Path) -> PathBuf {
    state_dir.join("alerts.json")
}

/// The incidents a previous run left open. A file that cannot be read is said, not silently replaced: what it held
/// is announced again as it happens (an open incident's recovery would otherwise never come).
fn earlier_incidents(file: &Path) -> Vec<Incident> {
    let read = crate::small_files::read_own(file, crate::small_files::SMALL).and_then(|bytes| {
        serde_json::from_slice(&bytes)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    });
    match read {
        Ok(open) => open,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => {
            tracing::warn!(file = %file.display(), error = %e, "cannot read the incidents the last run left open: they are forgotten (the file is replaced at the next change), and an incident still going on is announced again");
            Vec::new()
        }
    }
}

impl Alerts {
    /// The tracker, with the incidents a previous run left open (but none about an account or credential no
    /// longer configured).
    pub fn new(setup: Setup, state_dir: &Path) -> (Arc<Alerts>, mpsc::Receiver<Notice>) {
        let file = incidents_path(state_dir);
        let open = earlier_incidents(&file);
        let mut tracker = Tracker::new((&setup.config).into(), open);
        // A previous run's incidents about accounts this config no longer has are closed with a notice.
        let closed = tracker.follow(setup.account_names(), &setup.expiries, SystemTime::now());
        let (tx, rx) = mpsc::channel(BACKLOG);
        let alerts = Alerts {
            tracker: Mutex::new(tracker),
            tx,
            file,
            setup: watch::channel(Arc::new(setup)).0,
        };
        alerts.announce(closed);
        (Arc::new(alerts), rx)
    }

    /// Takes a reloaded config's setup: from now on, the new accounts' events and credentials are watched, the
    /// removed ones' incidents are closed (with a notice, and saved so before this returns), and notices go out with the new
    /// settings. The sending task looks at the credentials at once.
    pub async fn follow(self: &Arc<Self>, setup: Setup) {
        let closed = {
            // Swapped under the tracker's lock, which a look at the credentials holds too: no look can take the
            // old credentials to a tracker that has already forgotten them (and open their incidents again).
            let mut t = self.tracker();
            t.set_limits((&setup.config).into());
            let closed = t.follow(setup.account_names(), &setup.expiries, SystemTime::now());
            self.setup.send_replace(Arc::new(setup));
            closed
        };
        self.announce(closed);
        save(self).await;
    }

    fn current(&self) -> Arc<Setup> {
        self.setup.borrow().clone()
    }

    fn tracker(&self) -> std::sync::MutexGuard<'_, Tracker> {
        self.tracker.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn announce(&self, notices: Vec<Notice>) {
        for n in notices {
            let state = match n.state {
                State::Open => "open",
                State::Recovered => "recovered",
            };
            // The notice's text quotes an upstream's reply or an endpoint's error: a field of its own, quoted on a
            // plain line, never the message, where it could read as more fields.
            tracing::warn!(relay_event = "alert", incident = %n.incident, state, relay_account = %n.account.as_deref().unwrap_or(""), detail = %n.text, "alert {state}: {}", n.kind);
            if self.tx.try_send(n).is_err() {
                crate::metrics::global().alerts_dropped.inc();
                tracing::warn!("alert notice dropped: the alert sender is too far behind");
            }
        }
    }

    /// Accounts that alert mail should not go through: those with an open authorization, refresh, reach or login
    /// incident.
    fn unhealthy(&self) -> HashSet<String> {
        self.tracker()
            .open()
            .into_iter()
            .filter(|i| {
                matches!(
                    i.kind,
                    Kind::AuthorizationNeeded
                        | Kind::TokenRefreshFailed
                        | Kind::UpstreamUnreachable
                        | Kind::LoginRefused
                )
            })
            .map(|i| i.subject)
            .collect()
    }

    /// Saves the open incidents if they changed, atomically (a torn file would announce them all again).
    fn save(&self) {
        let open = {
            let mut t = self.tracker();
            if !t.take_changed() {
                return;
            }
            t.open()
        };
        let written = crate::state_files::atomic(&self.file).and_then(|mut f| {
            f.write_all(&serde_json::to_vec_pretty(&open).unwrap_or_default())?;
            f.commit()
        });
        if let Err(e) = written {
            tracing::warn!(path = %self.file.display(), error = %e, "cannot save the open alert incidents");
        }
    }
}

impl Watcher for Alerts {
    fn seen(&self, event: &Event<'_>) {
        if matches!(event, Event::Accepted { .. } | Event::Deferred { .. }) {
            return;
        }
        let notices = self.tracker().event(event, SystemTime::now());
        self.announce(notices);
    }
}

/// How often the queue's age, the credentials' dates and quiet dead-mail incidents are looked at: often enough
/// for the smaller threshold, at least once a minute, and not more than once a second.
pub fn tick_every(config: &AlertsConfig) -> Duration {
    (config.queue_age.min(config.dead_window) / 4)
        .clamp(Duration::from_secs(1), Duration::from_secs(60))
}

/// A tick every `every`, the first at once.
fn ticks(every: Duration) -> tokio::time::Interval {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick
}

/// Sends notices as they come, and looks at the queue and the credentials now and then ([`tick_every`]), until
/// `stop`. A new [`Setup`] (a reload) is looked at at once.
pub async fn run(
    alerts: Arc<Alerts>,
    mut notices: mpsc::Receiver<Notice>,
    notifier: Notifier,
    reader: Arc<StateReader>,
    mut stop: watch::Receiver<bool>,
) {
    let mut setups = alerts.setup.subscribe();
    let mut tick = ticks(tick_every(&setups.borrow_and_update().config));
    let notifier = Arc::new(notifier);
    let outboxes = [Channel::Webhook, Channel::Mail]
        .map(|c| Outbox::start(c, alerts.clone(), notifier.clone()));
    enum Next {
        Notice(Notice),
        Tick,
        Setup,
        Stop,
    }
    loop {
        let next = tokio::select! {
            Some(n) = notices.recv() => Next::Notice(n),
            _ = tick.tick() => Next::Tick,
            Ok(()) = setups.changed() => Next::Setup,
            _ = stop.wait_for(|s| *s) => Next::Stop,
        };
        match next {
            Next::Notice(n) => {
                for outbox in &outboxes {
                    outbox.post(n.clone());
                }
                save(&alerts).await;
            }
            Next::Setup => {
                tick = ticks(tick_every(&setups.borrow_and_update().config));
            }
            Next::Tick => {
                let snapshot = reader.snapshot().await;
                let reports = unreachable_reports(&notifier.state_dir, &alerts.current()).await;
                let c = &snapshot.census;
                let found = {
                    let mut t = alerts.tracker();
                    let setup = alerts.current();
                    let now = SystemTime::now();
                    let disk = snapshot
                        .free
                        .map(|f| DiskReport::new(f, setup.min_free_space));
                    let mut found =
                        t.tick(now, c.oldest_age(), c.queued + c.deferred, &setup.expiries);
                    found.extend(t.disk(now, disk.as_ref()));
                    found.extend(t.unreachable(now, &reports));
                    found
                };
                alerts.announce(found);
                save(&alerts).await;
            }
            Next::Stop => break,
        }
    }
    while let Ok(n) = notices.try_recv() {
        for outbox in &outboxes {
            outbox.post(n.clone());
        }
    }
    // What waits is tried once more, for a few seconds at most; what a sender could not get to is counted here.
    let unsent: usize = outboxes.iter().map(Outbox::unsent).sum();
    let [webhook, mail] = outboxes;
    let closed = tokio::time::timeout(DRAIN, async {
        tokio::join!(webhook.close(), mail.close());
    })
    .await;
    if closed.is_err() && unsent > 0 {
        crate::metrics::global()
            .alerts_dropped
            .inc_by(unsent as u64);
        tracing::warn!(
            notices = unsent,
            "alert notices still being sent at the stop may be lost"
        );
    }
    save(&alerts).await;
}

/// Each configured account's unreachable report and last delivery (`relay status` reads the same files), on the
/// blocking pool.
async fn unreachable_reports(state_dir: &Path, setup: &Setup) -> Vec<incidents::UpstreamReport> {
    let names: Vec<String> = setup.account_names().into_iter().collect();
    let state_dir = state_dir.to_path_buf();
    tokio::task::spawn_blocking(move || {
        names
            .into_iter()
            .map(|account| {
                let down = crate::upstream::transports::read_unreachable(&state_dir, &account);
                let answered_at = crate::queue::delivery::read_last_delivery(&state_dir, &account)
                    .filter(|d| {
                        matches!(
                            d.outcome.as_str(),
                            "delivered" | "reachable" | "recipients_deferred"
                        )
                    })
                    .map(|d| d.at);
                incidents::UpstreamReport {
                    account,
                    down,
                    answered_at,
                }
            })
            .collect()
    })
    .await
    .unwrap_or_default()
}

/// [`Alerts::save`] on the blocking pool: the runtime's threads never wait on the disk.
async fn save(alerts: &Arc<Alerts>) {
    let alerts = alerts.clone();
    let _ = tokio::task::spawn_blocking(move || alerts.save()).await;
}
