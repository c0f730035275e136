//! `relay serve` as a systemd service (`Type=notify`): readiness, status, the watchdog, reload and stop.
//!
//! - `READY=1` is sent once the listeners are bound (the kernel queues connections from then on) and the queue is
//!   recovered, with a `STATUS=` line of queue counts; `STATUS=` is sent again whenever the counts change.
//! - `WATCHDOG=1` is sent at half the watchdog interval, but only while the accept loops and the delivery
//!   scheduler have all beaten their heartbeats within the interval (`health.rs`): a stuck loop stops the pings,
//!   and systemd restarts relay.
//! - SIGHUP rereads the config (`RELOADING=1`, then `READY=1` again); a config that fails validation, or that
//!   names files relay cannot use, is refused and logged, and the running one stays (`reload.rs`).
//! - SIGTERM and SIGINT send `STOPPING=1`, stop the pings, and drain.

use std::sync::Arc;
use std::time::Duration;

use sd_notify::NotifyState;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::task::JoinSet;

use crate::config::{Config, ConfigError};
use crate::health::Health;
use crate::queue::layout::SpoolPaths;
use crate::reload::{ReloadError, Reloader};
use crate::{Relay, RunError};

/// How often the queue counts are read for `STATUS=`.
const STATUS_EVERY: Duration = Duration::from_secs(5);

/// Runs relay on `config` until SIGTERM or SIGINT; `load` reads the config again on SIGHUP.
pub async fn serve<L>(config: Config, load: L) -> Result<(), RunError>
where
    L: Fn() -> Result<Config, ConfigError> + Send + Sync + 'static,
{
    tracing::info!(config = %config.source, state_dir = %config.state_dir.display(), "starting");
    match crate::open_files::raise() {
        Ok((now, Some(was))) => tracing::debug!("open-file limit raised from {was} to {now}"),
        Ok((_, None)) => {}
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
    }
    let mut warned = Warned::default();
    warned.log(daemon_warnings(&config));
    // Installed before READY=1: from then on systemd may send SIGHUP, whose default action would end relay.
    let signals = Signals::install();
    let relay = Relay::start(&config).await?;
    // Once the state dir is this daemon's (`Relay::start` took its lock).
    let report = Arc::new(crate::running::Report::started(&config));
    if config.accounts.is_empty() {
        tracing::warn!(
            "no [[account]] is configured: mail is accepted and queued, but not delivered"
        );
    }
    // WATCHDOG_USEC=0 (or garbage that parses to it) means no watchdog, not an interval of nothing.
    let watchdog = sd_notify::watchdog_enabled().filter(|d| !d.is_zero());
    let health = relay.health();
    if let Some(interval) = watchdog {
        // A healthy loop beats at least four times per interval, so that a late tick is never taken for a hang.
        health.set_every(interval / 4);
    }
    let status = StatusLine::new(SpoolPaths::new(&config.state_dir));
    let _ = sd_notify::notify(&[
        NotifyState::Ready,
        NotifyState::Status(&status.text().await),
    ]);
    let mut background = JoinSet::new();
    if let Some(interval) = watchdog {
        background.spawn(ping_watchdog(health, interval));
    }
    background.spawn(report_status(status.clone()));
    background.spawn(crate::memory::trim_now_and_then());
    let loads = Loads {
        load: Arc::new(load),
        report,
        warned,
    };
    let until_stopped = signals.until_stopped(relay.reloader(), loads, status, background);
    relay.run(until_stopped).await?;
    tracing::info!("stopped");
    Ok(())
}

/// The signals relay acts on; `None` where a handler could not be installed.
struct Signals {
    term: Option<Signal>,
    int: Option<Signal>,
    hup: Option<Signal>,
}

async fn recv(signal: &mut Option<Signal>) {
    match signal {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending().await,
    }
}

impl Signals {
    fn install() -> Signals {
        let install = |kind: SignalKind, name: &str| match signal(kind) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::error!(error = %e, "cannot handle {name}");
                None
            }
        };
        Signals {
            term: install(SignalKind::terminate(), "SIGTERM"),
            int: install(SignalKind::interrupt(), "SIGINT"),
            hup: install(SignalKind::hangup(), "SIGHUP"),
        }
    }

    /// Reloads on each SIGHUP; returns at SIGTERM or SIGINT, once systemd knows relay is stopping and the
    /// background tasks (watchdog pings among them) have stopped.
    async fn until_stopped<L>(
        mut self,
        reloader: Reloader,
        mut loads: Loads<L>,
        status: StatusLine,
        mut background: JoinSet<()>,
    ) where
        L: Fn() -> Result<Config, ConfigError> + Send + Sync + 'static,
    {
        loop {
            tokio::select! {
                _ = recv(&mut self.term) => {
                    tracing::info!("SIGTERM received");
                    break;
                }
                _ = recv(&mut self.int) => {
                    tracing::info!("SIGINT received");
                    break;
                }
                _ = recv(&mut self.hup) => reload(&reloader, &mut loads, &status).await,
            }
        }
        background.abort_all();
        let _ = sd_notify::notify(&[
            NotifyState::Stopping,
            NotifyState::Status("stopping: waiting for messages in flight"),
        ]);
    }
}

/// The config's warnings, and those only the daemon can judge (its own open-file limit, which a shell's
/// `relay check` does not share).
fn daemon_warnings(config: &Config) -> Vec<crate::config::Warning> {
    let mut warnings = config.warnings();
    warnings.extend(crate::open_files::warning(config));
    warnings
}

/// How the config is read again on SIGHUP, and what is remembered of the loads before.
struct Loads<L> {
    load: Arc<L>,
    /// `STATE_DIR/daemon.json`, for `relay status`.
    report: Arc<crate::running::Report>,
    warned: Warned,
}

impl<L> Loads<L> {
    /// `daemon.json` rewritten on the blocking pool: a small file, but a stalled disk must not hold a runtime
    /// worker (the sessions and deliveries on it). Awaited, so that the file is written before the log line that
    /// a sysadmin runs `relay status` after; a SIGTERM meanwhile waits for it.
    async fn report_off_thread(&self, f: impl FnOnce(&crate::running::Report) + Send + 'static) {
        let report = self.report.clone();
        let _ = tokio::task::spawn_blocking(move || f(&report)).await;
    }
}

/// The config warnings already logged: a reload logs only new ones, so that a SIGHUP from a log rotation or a
/// certificate renewal does not repeat every warning the sysadmin has already read (`relay check` lists them all).
#[derive(Default)]
struct Warned(Vec<crate::config::Warning>);

impl Warned {
    /// What the config may say but a sysadmin probably did not mean, at start and after each reload. The metrics
    /// endpoint says its own when it binds, and the expiry watch a listener certificate's dates (`.cert`, "the
    /// certificate in …"), with `relay_event = credential_expiring`; a chain clients cannot build is said here
    /// (it was said by `relay check` alone, and a deploy hook reloading with cert.pem left no sign).
    fn log(&mut self, warnings: Vec<crate::config::Warning>) {
        let warnings: Vec<_> = warnings
            .into_iter()
            .filter(|w| {
                w.key != "metrics.address"
                    && !(w.key.ends_with(".cert") && w.text.starts_with("the certificate in "))
            })
            .collect();
        let mut same = 0;
        for w in &warnings {
            if self.0.contains(w) {
                same += 1;
            } else {
                tracing::warn!(key = %w.key, "{}", w.text);
            }
        }
        if same > 0 {
            tracing::info!(
                "{same} config warning(s) as before, not repeated (`relay check` lists them)"
            );
        }
        self.0 = warnings;
    }
}

/// systemd's reload protocol: `RELOADING=1` (with the time, which newer systemd asks for), the work, then
/// `READY=1`. A refused config is logged with its file, key and reason, and `STATUS=` says so until a reload
/// succeeds.
async fn reload<L>(reloader: &Reloader, loads: &mut Loads<L>, status: &StatusLine)
where
    L: Fn() -> Result<Config, ConfigError> + Send + Sync + 'static,
{
    let mut reloading = vec![NotifyState::Reloading];
    if let Ok(now) = NotifyState::monotonic_usec_now() {
        reloading.push(now);
    }
    let _ = sd_notify::notify(&reloading);
    tracing::info!("SIGHUP received: reading the config again");
    let load = loads.load.clone();
    // The warnings read files (a listener's certificate dates): off the runtime's threads, with the load.
    let loaded = tokio::task::spawn_blocking(move || {
        load().map(|config| {
            let warnings = daemon_warnings(&config);
            let served = crate::running::served(&config);
            (config, warnings, served)
        })
    });
    let refused = match loaded.await {
        Ok(Ok((config, warnings, served))) => {
            let file = config.source.clone();
            let digest = config.digest.clone();
            let accounts: Vec<String> = config.accounts.iter().map(|a| a.name.clone()).collect();
            match reloader.reload(config).await {
                Ok(done) => {
                    // A renewal's reload is what confirms the deploy hook worked: its certificates are named.
                    let before = loads.report.certificates();
                    let renewed: Vec<String> = served
                        .iter()
                        .filter(|c| !before.contains(c))
                        .map(|c| {
                            let until = if c.not_after < std::time::SystemTime::now() {
                                "expired on"
                            } else {
                                "valid until"
                            };
                            format!(
                                "{} ({until} {})",
                                c.listener,
                                crate::certs::day(c.not_after)
                            )
                        })
                        .collect();
                    let renewed = if renewed.is_empty() {
                        String::new()
                    } else {
                        format!("; certificates loaded anew: {}", renewed.join(", "))
                    };
                    // Before the log line, which is what a sysadmin (or a test) runs `relay status` after.
                    let source = file.clone();
                    loads
                        .report_off_thread(move |r| r.reloaded(&source, &digest, served))
                        .await;
                    tracing::info!(relay_event = "reloaded", "config reloaded: {done}{renewed}");
                    // As at start: a renewed certificate that is already expired, a listener no one can use.
                    loads.warned.log(warnings);
                    None
                }
                Err(e) => {
                    // An account's or a listener's problem, said with the file it is in, as at start, and with
                    // the key and reason as fields, as a config that does not parse is.
                    let why = match e {
                        ReloadError::NeedsRestart { .. } => e.to_string(),
                        _ => format!("{file}: {e}"),
                    };
                    let (key, reason) = e.key_and_reason(&accounts).unzip();
                    {
                        let why = why.clone();
                        loads.report_off_thread(move |r| r.refused(&why)).await;
                    }
                    tracing::error!(
                        relay_event = "reload_refused",
                        file = %file,
                        key = key.as_deref(),
                        reason = reason.as_deref(),
                        "new config refused, the running one stays: {why}"
                    );
                    Some(why)
                }
            }
        }
        Ok(Err(e)) => {
            // One line, every problem in it (a journal entry per line would split one refusal into several).
            let all = e
                .problems()
                .map(|p| format!("{}: {}: {}", p.file, p.key, p.reason))
                .collect::<Vec<_>>()
                .join("; ");
            {
                let all = all.clone();
                loads.report_off_thread(move |r| r.refused(&all)).await;
            }
            tracing::error!(
                relay_event = "reload_refused",
                file = %e.file,
                key = %e.key,
                reason = %e.reason,
                problems = e.problems().count(),
                "new config refused, the running one stays: {all}"
            );
            Some(all)
        }
        Err(e) => {
            let why = format!("cannot read the config: {e}");
            {
                let why = why.clone();
                loads.report_off_thread(move |r| r.refused(&why)).await;
            }
            tracing::error!(relay_event = "reload_refused", error = %e, "cannot read the config; the running one stays");
            Some(why)
        }
    };
    status.set_refused(refused.map(|why| short_status(&why)));
    let _ = sd_notify::notify(&[
        NotifyState::Ready,
        NotifyState::Status(&status.text().await),
    ]);
}

/// Pings at half the interval while every loop is making progress; says once when one stops, and when it moves
/// again.
async fn ping_watchdog(health: Arc<Health>, interval: Duration) {
    let mut tick = tokio::time::interval(interval / 2);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stuck = false;
    loop {
        tick.tick().await;
        let stalled = health.stalled(interval);
        if stalled.is_empty() {
            if std::mem::take(&mut stuck) {
                tracing::warn!("every loop is making progress again; watchdog pings resume");
            }
            let _ = sd_notify::notify(&[NotifyState::Watchdog]);
        } else if !stuck {
            stuck = true;
            let loops = stalled
                .iter()
                .map(|(name, silent)| format!("{name} ({} ms)", silent.as_millis()))
                .collect::<Vec<_>>()
                .join(", ");
            tracing::error!(relay_event = "stalled", loops = %loops, "no progress within the watchdog interval; no longer pinging systemd's watchdog, so that systemd restarts relay");
        }
    }
}

/// Sends `STATUS=` when the queue counts change.
async fn report_status(status: StatusLine) {
    let mut tick = tokio::time::interval(STATUS_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = String::new();
    loop {
        tick.tick().await;
        let text = status.text().await;
        if text != last {
            let _ = sd_notify::notify(&[NotifyState::Status(&text)]);
            last = text;
        }
    }
}

/// A refusal as `STATUS=` can carry it: systemd ignores a notification of 4096 bytes or more, READY=1 in it
/// included, which would leave the unit reloading. The journal line has it whole.
fn short_status(why: &str) -> String {
    const MAX: usize = 512;
    let one_line = why.replace(['\n', '\r'], " ");
    if one_line.len() <= MAX {
        return one_line;
    }
    let mut end = MAX;
    while !one_line.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… (the rest: journalctl -u relay)", &one_line[..end])
}

/// What `STATUS=` says (`systemctl status relay` shows it): the queue counts, and a refused reload until one
/// succeeds, since a sysadmin who reloaded looks there first.
#[derive(Clone)]
struct StatusLine {
    paths: SpoolPaths,
    refused: Arc<std::sync::Mutex<Option<String>>>,
}

impl StatusLine {
    fn new(paths: SpoolPaths) -> StatusLine {
        StatusLine {
            paths,
            refused: Arc::default(),
        }
    }

    fn set_refused(&self, why: Option<String>) {
        if let Ok(mut r) = self.refused.lock() {
            *r = why;
        }
    }

    async fn text(&self) -> String {
        let queue = status_text(&self.paths).await;
        match self.refused.lock().ok().and_then(|r| r.clone()) {
            Some(why) => {
                format!("{queue}; the last reload was refused, the running config stays: {why}")
            }
            None => queue,
        }
    }
}

/// `queue: 3 queued (1 deferred), 0 dead`, as `relay status` says it; from file names only.
async fn status_text(paths: &SpoolPaths) -> String {
    let (queue, dead) = (paths.queue.clone(), paths.dead.clone());
    let counted = tokio::task::spawn_blocking(move || {
        (
            crate::queue::layout::count_queue(&queue),
            crate::queue::layout::count_messages(&dead),
        )
    })
    .await;
    match counted {
        Ok((Ok(queued), Ok(dead))) => format!(
            "queue: {} queued ({} deferred), {dead} dead",
            queued.messages, queued.with_state
        ),
        Ok((Err(e), _) | (_, Err(e))) => format!("queue: cannot be read: {e}"),
        Err(e) => format!("queue: cannot be read: {e}"),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_long_refusal_is_cut_for_status() {
        let long = "x: y: z\n".repeat(1000);
        let short = super::short_status(&long);
        assert!(short.len() < 600 && !short.contains('\n'), "{short}");
        assert!(short.ends_with("(the rest: journalctl -u relay)"));
        assert_eq!(super::short_status("a: b: c"), "a: b: c");
    }
}
