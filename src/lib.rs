//! relay: an SMTP relay that lets legacy devices send through Microsoft 365 and Gmail with OAuth2.
//!
//! A message's path: [`smtp`] receives it, [`queue`] makes it durable before the client hears 250, the queue's
//! scheduler hands it to [`upstream`] with a token from [`tokens`] (obtained through [`oauth`]).

pub mod access;
pub mod accounts;
pub mod alerts;
pub mod authorize;
pub mod bounce;
pub mod certs;
pub mod check;
pub mod config;
pub mod events;
pub mod health;
pub mod logging;
pub mod mailgen;
pub mod memory;
pub mod metrics;
pub mod oauth;
pub mod observers;
pub mod open_files;
pub mod probe;
pub mod queue;
pub mod reload;
pub mod running;
pub mod runtime;
pub mod service;
pub mod small_files;
pub mod smtp;
pub mod state_files;
pub mod status;
pub mod terminal;
pub mod test_hooks;
pub mod tokens;
pub mod upstream;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use config::Config;
use health::Health;
use queue::{Spool, SpoolError};
use reload::{Reloader, Running};
use smtp::{BindError, Listener, Listeners};

/// How long a shutdown waits for sessions in the middle of a message to finish.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the sessions still open at the drain timeout get to write their 421 (to a client that reads).
const ABANDON_GRACE: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{source}{hint}")]
    Spool {
        source: SpoolError,
        /// What to do, for a state dir this user cannot write.
        hint: &'static str,
    },
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error(transparent)]
    Account(#[from] accounts::AccountError),
    #[error(transparent)]
    Observer(#[from] observers::ObserverError),
}

impl RunError {
    /// The config names something relay cannot use (a certificate, a secret, an account's settings): fixing the
    /// config is the cure, so restarting would not help.
    pub fn is_config(&self) -> bool {
        matches!(
            self,
            RunError::Bind(BindError::Tls { .. }) | RunError::Account(_)
        )
    }
}

/// A started relay: listeners bound, spool open. Tests start one on port 0 and ask for its addresses.
pub struct Relay {
    listeners: Listeners,
    /// Bound, not yet accepting.
    bound: Vec<Listener>,
    scheduler: queue::scheduler::Scheduler,
    committed: queue::announce::Announcements,
    accounts: Vec<Arc<queue::delivery::Account>>,
    config: Config,
    addrs: Vec<SocketAddr>,
    stop: watch::Sender<bool>,
    /// Set when the drain's time is up: the sessions still open say 421 and close.
    abandon: watch::Sender<bool>,
    sessions: watch::Sender<usize>,
    health: Arc<Health>,
    reloads: (
        mpsc::Sender<reload::Request>,
        mpsc::Receiver<reload::Request>,
    ),
    observers: observers::Observers,
}

impl Relay {
    pub async fn start(config: &Config) -> Result<Relay, RunError> {
        let (committed_tx, committed) = queue::announce::channel();
        // Every message file is looked at before the listeners open: a backlog of a million, after a reboot (a
        // cold cache, ≈ 90 µs a file), takes longer than systemd's start timeout (90 s), which would kill relay
        // and start it again, for ever. Each thousand files asks systemd for more time, and says how far it is.
        let mut progress = |seen: u64| {
            let status = format!("checking the queue before accepting mail: {seen} files so far");
            let _ = sd_notify::notify(&[
                sd_notify::NotifyState::ExtendTimeoutUsec(30_000_000),
                sd_notify::NotifyState::Status(&status),
            ]);
        };
        let spool = Spool::open(&config.state_dir, Some(committed_tx), &mut progress).map_err(
            |source| RunError::Spool {
                hint: match &source {
                    SpoolError::Io { source: e, .. }
                        if e.kind() == std::io::ErrorKind::PermissionDenied =>
                    {
                        " (set state_dir in the config to a directory this user may write, or run as the user that owns it; without state_dir relay uses $STATE_DIRECTORY, /var/lib/relay for root, else $XDG_STATE_HOME/relay or ~/.local/state/relay)"
                    }
                    _ => "",
                },
                source,
            },
        )?;
        // After the spool, which takes the state dir's lock: building reads (sending counters, pauses) and may write
        // (sealing a plain token file) under the state dir, which is only this daemon's to do; and a state dir that
        // cannot be used is then said as that, not as counters that cannot be read.
        let accounts = accounts::build(config)?;
        // With the state dir locked (this is the only daemon on it): directories an older relay left open, and
        // reports that an upstream could not be reached (every upstream counts as reachable until a connection
        // says otherwise).
        state_files::tighten(&config.state_dir);
        let token_files = tokens::TokenStore::new(&config.state_dir);
        for a in &config.accounts {
            upstream::transports::forget_unreachable(&config.state_dir, &a.name);
            token_files.unsaved_lost(&a.name);
        }
        let observers = observers::Observers::start(config, &spool, &accounts).await?;
        // Each grant is read before relay says it listens, not whenever its refresher first runs: from
        // `listening` on, the daemon holds the file as it was at the start, so what it does after does not hang on
        // the scheduling of a task (a test that rewrites the file after `listening` relies on it). It changes
        // little otherwise: a file rewritten later is read at the refresher's next look either way; one that
        // becomes unreadable now finds a grant to keep. After the observers, so that an alert it raised would
        // reach them. A file that cannot be read is the refresher's to report.
        for a in &accounts {
            let _ = a.tokens.next_due().await;
        }
        let (stop, stop_rx) = watch::channel(false);
        let (abandon, abandon_rx) = watch::channel(false);
        let (listeners, bound) = Listeners::bind(config, &spool, &stop_rx, &abandon_rx).await?;
        let addrs = listeners.local_addrs();
        Ok(Relay {
            listeners,
            bound,
            scheduler: queue::scheduler::Scheduler::new(config, accounts.clone()),
            committed,
            accounts,
            config: config.clone(),
            addrs,
            stop,
            abandon,
            sessions: watch::channel(0).0,
            health: Health::new(),
            reloads: mpsc::channel(1),
            observers,
        })
    }

    /// The heartbeats of the accept loops and the scheduler, for a watchdog.
    pub fn health(&self) -> Arc<Health> {
        self.health.clone()
    }

    /// Where to send a new config while this relay runs.
    pub fn reloader(&self) -> Reloader {
        Reloader(self.reloads.0.clone())
    }

    /// The addresses actually bound (port 0 resolved), in config order.
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// Finished delivery attempts so far; a test can wait for a count.
    pub fn delivery_attempts(&self) -> watch::Receiver<u64> {
        self.scheduler.attempts.subscribe()
    }

    /// Live SMTP connections; a test can wait for this to reach 0.
    pub fn sessions(&self) -> watch::Receiver<usize> {
        self.sessions.subscribe()
    }

    /// Serves until `shutdown` completes, then stops accepting, lets messages in flight finish, and returns.
    /// A new config sent through [`reloader`](Self::reloader) meanwhile is applied (or refused) in turn.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), RunError> {
        let mut tasks = tokio::task::JoinSet::new();
        let mut running = Running::new(
            self.config,
            self.accounts,
            self.listeners,
            self.scheduler.deliveries(),
            self.stop.subscribe(),
            self.sessions.clone(),
            self.health.clone(),
            self.observers.following(),
        );
        running.start(self.bound, &mut tasks);
        tasks.spawn(
            self.scheduler
                .run(self.committed, self.stop.subscribe(), self.health.clone()),
        );
        // Metrics and alerts are not restarted by a reload: `running` tells them the new accounts.
        tasks.spawn(self.observers.run(self.stop.subscribe()));
        for addr in &self.addrs {
            tracing::info!(relay_event = "listening", address = %addr, "listening");
        }
        let (_, mut reloads) = self.reloads;
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                Some(request) = reloads.recv() => {
                    let result = running.apply(request.config, &mut tasks).await;
                    let _ = request.reply.send(result);
                }
                // Tasks a reload ended (closed listeners, replaced refreshers) are reaped as they finish.
                Some(Err(e)) = tasks.join_next() => {
                    if e.is_panic() {
                        tracing::error!(error = %e, "a relay task panicked");
                    }
                }
            }
        }
        drop(reloads);
        tracing::info!("shutting down: no new connections; waiting for messages in flight");
        let _ = self.stop.send(true);
        running.stop();
        // Deliveries (up to the scheduler's own 20 s) and sessions in the middle of a message drain at the same
        // time, within one bound that stays under systemd's TimeoutStopSec.
        let deadline = tokio::time::Instant::now() + DRAIN_TIMEOUT;
        let _ = tokio::time::timeout_at(deadline, async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        let mut live = self.sessions.subscribe();
        if tokio::time::timeout_at(deadline, live.wait_for(|n| *n == 0))
            .await
            .is_err()
        {
            // RFC 5321 section 3.8: a server that must stop says 421 first. Nothing of these sessions was
            // acknowledged (a message whose final dot arrived is committed before its session looks again).
            tracing::warn!(
                sessions = *live.borrow(),
                "sessions still open after the drain timeout; those waiting for the client are told 421 and closed"
            );
            let _ = self.abandon.send(true);
            let _ = tokio::time::timeout(ABANDON_GRACE, live.wait_for(|n| *n == 0)).await;
        }
        Ok(())
    }
}

/// Starts relay on `config` and serves until `shutdown` completes.
pub async fn run(config: &Config, shutdown: impl Future<Output = ()>) -> Result<(), RunError> {
    Relay::start(config).await?.run(shutdown).await
}
