//! Reloading the config while relay runs (SIGHUP): the parts of a running relay that a new config changes, and
//! how each changes without dropping mail.
//!
//! A reload is all or nothing: the new accounts are built and the new listeners bound and loaded first, and only
//! when all of that has worked is anything swapped in. Then:
//! - an account whose settings and files (secret, key, certificate) are unchanged is kept as it is (its
//!   connections, tokens and refresher); a changed one is rebuilt, keeping its sending counts (and tokens it
//!   could not save); the scheduler takes a new delivery (accounts, routes, retry schedule) for the attempts
//!   that start from then on, while attempts in flight finish on the old one;
//! - a listener whose address is unchanged keeps its socket and takes the new settings (TLS files read again,
//!   users, limits) for new connections; a new address is bound; a listener no longer configured stops accepting;
//!   sessions already open finish as they began;
//! - the token refresher runs for the new and changed accounts, and stops for the removed ones;
//! - metrics and alerts follow the new accounts (their series, token expiry, credential dates, the accounts alert
//!   mail goes through) and forget the removed ones; changed `[alerts]` settings take effect. Adding or removing
//!   `[alerts]` or `[metrics]` as a whole, or moving the metrics address, needs a restart.
//!
//! Queued mail is never touched: it is on disk, and the scheduler keeps its schedule.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;

use crate::accounts::{self, AccountError};
use crate::config::{AccountConfig, Config};
use crate::health::Health;
use crate::observers::Following;
use crate::queue::delivery::{Account, Delivery};
use crate::smtp::{BindError, Listener, ListenerChanges, Listeners};

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(
        "{file}: {key}: changing it needs a restart (systemctl restart relay); nothing was changed"
    )]
    NeedsRestart { file: String, key: &'static str },
    #[error("{0}; nothing was changed")]
    Account(#[from] AccountError),
    #[error("{0}; nothing was changed")]
    Bind(#[from] BindError),
    #[error("relay is stopping")]
    Stopping,
}

impl ReloadError {
    /// Whether the new config itself is at fault (rather than relay stopping).
    pub fn is_config(&self) -> bool {
        !matches!(self, ReloadError::Stopping)
    }

    /// The config key at fault and why, as `relay check` names them (`accounts`: the new config's account names,
    /// for an account's index), for the refusal's `key` and `reason` fields.
    pub fn key_and_reason(&self, accounts: &[String]) -> Option<(String, String)> {
        match self {
            ReloadError::NeedsRestart { key, .. } => Some((
                key.to_string(),
                "changing it needs a restart (systemctl restart relay)".into(),
            )),
            ReloadError::Bind(BindError::Bind {
                index,
                address,
                source,
            }) => Some((
                format!("listener[{index}].address"),
                format!("{address}: cannot listen: {source}"),
            )),
            ReloadError::Bind(BindError::Tls { index, source }) => Some((
                format!("listener[{index}].{}", source.config_key()),
                source.to_string(),
            )),
            ReloadError::Account(a) => {
                let key = match accounts.iter().position(|n| *n == a.account) {
                    Some(i) => format!("account[{i}]"),
                    None => "account".into(),
                };
                Some((key, a.reason.clone()))
            }
            ReloadError::Stopping => None,
        }
    }
}

/// What a reload changed, for the log.
#[derive(Debug, Default)]
pub struct Reloaded {
    pub accounts_added: Vec<String>,
    pub accounts_changed: Vec<String>,
    pub accounts_removed: Vec<String>,
    /// Accounts kept as they run, with new sending limits.
    pub limits_changed: Vec<String>,
    pub listeners: ListenerChanges,
    /// `[[user]]`s by name: added, changed (password or account), removed.
    pub users: [Vec<String>; 3],
    /// The `[[route]]`s or `default_account` changed (a user's own account is said with the users).
    pub routes_changed: bool,
}

impl std::fmt::Display for Reloaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names = |v: &[String]| {
            if v.is_empty() {
                "none".to_string()
            } else {
                v.join(", ")
            }
        };
        let addrs = |v: &[std::net::SocketAddr]| {
            names(&v.iter().map(ToString::to_string).collect::<Vec<_>>())
        };
        write!(
            f,
            "accounts added: {}; changed: {}; removed: {}; sending limits changed: {}; listeners kept: {} (settings changed: {}), opened: {}, closed: {}; users added: {}, changed: {}, removed: {}; routes {}",
            names(&self.accounts_added),
            names(&self.accounts_changed),
            names(&self.accounts_removed),
            names(&self.limits_changed),
            self.listeners.kept,
            addrs(&self.listeners.changed),
            addrs(&self.listeners.opened),
            addrs(&self.listeners.closed),
            names(&self.users[0]),
            names(&self.users[1]),
            names(&self.users[2]),
            if self.routes_changed {
                "changed"
            } else {
                "unchanged"
            },
        )
    }
}

pub(crate) struct Request {
    pub config: Config,
    pub reply: oneshot::Sender<Result<Reloaded, ReloadError>>,
}

/// Asks a running relay to take a new config. Cloned freely; each reload is applied in turn.
#[derive(Clone)]
pub struct Reloader(pub(crate) mpsc::Sender<Request>);

impl Reloader {
    /// Applies `config` to the running relay, or leaves it as it was and says why.
    pub async fn reload(&self, config: Config) -> Result<Reloaded, ReloadError> {
        let (reply, answer) = oneshot::channel();
        self.0
            .send(Request { config, reply })
            .await
            .map_err(|_| ReloadError::Stopping)?;
        answer.await.map_err(|_| ReloadError::Stopping)?
    }
}

/// An account as it runs: its config, what delivery uses, and the stop of its token refresher.
struct RunningAccount {
    config: AccountConfig,
    account: Arc<Account>,
    refresher: watch::Sender<bool>,
}

/// The parts of a running relay that a reload replaces.
pub(crate) struct Running {
    config: Config,
    accounts: Vec<RunningAccount>,
    listeners: Listeners,
    deliveries: watch::Sender<Arc<Delivery>>,
    expiries: watch::Sender<bool>,
    shutdown: watch::Receiver<bool>,
    sessions: watch::Sender<usize>,
    health: Arc<Health>,
    following: Following,
}

/// Two account configs that build the same account; the sending limits are left out, since a kept account takes
/// new ones in place.
fn same_account(a: &AccountConfig, b: &AccountConfig) -> bool {
    let without_rate = |a: &AccountConfig| {
        let mut a = a.clone();
        a.rate = None;
        serde_json::to_value(a).ok()
    };
    without_rate(a) == without_rate(b)
}

impl Running {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: Config,
        accounts: Vec<Arc<Account>>,
        listeners: Listeners,
        deliveries: watch::Sender<Arc<Delivery>>,
        shutdown: watch::Receiver<bool>,
        sessions: watch::Sender<usize>,
        health: Arc<Health>,
        following: Following,
    ) -> Running {
        let accounts = config
            .accounts
            .iter()
            .cloned()
            .zip(accounts)
            .map(|(config, account)| RunningAccount {
                config,
                account,
                refresher: watch::channel(false).0,
            })
            .collect();
        Running {
            config,
            accounts,
            listeners,
            deliveries,
            expiries: watch::channel(false).0,
            shutdown,
            sessions,
            health,
            following,
        }
    }

    /// Starts the listeners, each account's token refresher and the expiry watch.
    pub fn start(&mut self, listeners: Vec<Listener>, tasks: &mut JoinSet<()>) {
        self.spawn_listeners(listeners, tasks);
        for a in &self.accounts {
            spawn_refresher(a, tasks);
        }
        self.restart_expiries(tasks);
    }

    fn spawn_listeners(&self, listeners: Vec<Listener>, tasks: &mut JoinSet<()>) {
        for l in listeners {
            tasks.spawn(l.run(
                self.shutdown.clone(),
                self.sessions.clone(),
                self.health.clone(),
            ));
        }
    }

    fn restart_expiries(&mut self, tasks: &mut JoinSet<()>) {
        self.expiries.send_replace(true);
        let (stop, stopped) = watch::channel(false);
        self.expiries = stop;
        tasks.spawn(accounts::watch_expiries(
            self.config.accounts.clone(),
            self.config.listeners.clone(),
            stopped,
        ));
    }

    /// Stops what the relay's own stop does not reach (the per-account refreshers, the expiry watch).
    pub fn stop(&self) {
        self.listeners.close_all();
        for a in &self.accounts {
            a.refresher.send_replace(true);
        }
        self.expiries.send_replace(true);
    }

    /// Applies a new config, or changes nothing and says why.
    pub async fn apply(
        &mut self,
        config: Config,
        tasks: &mut JoinSet<()>,
    ) -> Result<Reloaded, ReloadError> {
        if config.state_dir != self.config.state_dir {
            return Err(ReloadError::NeedsRestart {
                file: config.source.clone(),
                key: "state_dir",
            });
        }
        // What the daemon set up once at start: the token key (every account's store, and files sealed with it),
        // the metrics listener, the alert task (whose settings follow a reload; whether there is one does not)
        // and the bounces. A change is refused, not dropped silently.
        let json = |v: serde_json::Result<serde_json::Value>| v.ok();
        for (key, was, now) in [
            (
                "token_encryption",
                json(serde_json::to_value(&self.config.token_encryption)),
                json(serde_json::to_value(&config.token_encryption)),
            ),
            (
                "alerts",
                Some(serde_json::Value::Bool(self.config.alerts.is_some())),
                Some(serde_json::Value::Bool(config.alerts.is_some())),
            ),
            (
                "metrics",
                json(serde_json::to_value(&self.config.metrics)),
                json(serde_json::to_value(&config.metrics)),
            ),
            (
                "bounce",
                json(serde_json::to_value(self.config.bounce)),
                json(serde_json::to_value(config.bounce)),
            ),
        ] {
            if was != now {
                return Err(ReloadError::NeedsRestart {
                    file: config.source.clone(),
                    key,
                });
            }
        }
        let mut done = Reloaded::default();
        // Everything that can fail comes first.
        let http = accounts::shared_http()?;
        let store = accounts::token_store(&config)?;
        let mut next: Vec<(AccountConfig, Arc<Account>, Option<&RunningAccount>)> = Vec::new();
        let mut new_limits = Vec::new();
        for a in &config.accounts {
            let old = self.accounts.iter().find(|r| r.config.name == a.name);
            match old {
                // The hostname is an SMTP account's EHLO name too: a new one rebuilds those. So does a file that
                // changed (a secret rotated in place): the account holds what it read when it was built.
                Some(r)
                    if same_account(&r.config, a)
                        && (config.hostname == self.config.hostname
                            || a.transport != crate::config::Transport::Smtp)
                        && accounts::files_hash(a) == r.account.files =>
                {
                    // Only its sending limits changed: applied in place once nothing can fail, and said.
                    if r.account.rate.limits() != a.limits() {
                        new_limits.push((r.account.rate.clone(), a.limits()));
                        done.limits_changed.push(a.name.clone());
                    }
                    next.push((a.clone(), r.account.clone(), Some(r)));
                }
                _ => {
                    let rate = old.map(|r| r.account.rate.clone());
                    let account = accounts::build_one(&config, a, &http, &store, rate)?;
                    // Its counts are the old account's, shared with the mail in flight: their new limits too wait
                    // until nothing can fail (a listener that cannot bind).
                    if old.is_some() {
                        new_limits.push((account.rate.clone(), a.limits()));
                    }
                    match old {
                        Some(_) => done.accounts_changed.push(a.name.clone()),
                        None => done.accounts_added.push(a.name.clone()),
                    }
                    next.push((a.clone(), Arc::new(account), None));
                }
            }
        }
        let prepared = self.listeners.prepare(&config).await?;

        // From here on nothing fails.
        // An account added without tokens is said as at start, not first by its deferred mail.
        accounts::warn_unauthorized(
            config
                .accounts
                .iter()
                .filter(|a| done.accounts_added.contains(&a.name)),
            &store,
        );
        for (rate, limits) in new_limits {
            rate.set_limits(limits);
        }
        let state_dir = config.state_dir.clone();
        let mut accounts = Vec::new();
        for (config, account, kept) in next {
            let refresher = match kept {
                Some(r) => r.refresher.clone(),
                None => {
                    // Not read ahead as at start (`Relay::start`): a grant read here would stop `take_unsaved`
                    // from copying an unsaved one over a file rewritten with a failure.
                    if let Some(old) = self.accounts.iter().find(|r| r.config.name == config.name) {
                        account.tokens.copy_unsaved_from(&old.account.tokens).await;
                        account.tokens.carry_trouble_from(&old.account.tokens);
                    }
                    // Built anew, with an upstream that counts as reachable: an earlier report is not true of it.
                    crate::upstream::transports::forget_unreachable(&state_dir, &config.name);
                    watch::channel(false).0
                }
            };
            accounts.push(RunningAccount {
                config,
                account,
                refresher,
            });
        }
        for old in &self.accounts {
            let kept = accounts
                .iter()
                .any(|a| Arc::ptr_eq(&a.account, &old.account));
            if !kept {
                old.refresher.send_replace(true);
                if !accounts.iter().any(|a| a.config.name == old.config.name) {
                    done.accounts_removed.push(old.config.name.clone());
                    // Its counts since the scheduler's last write, kept for `relay status` and for the day it
                    // comes back.
                    let rate = old.account.rate.clone();
                    drop(tokio::task::spawn_blocking(move || rate.save_report()));
                }
            }
        }
        let built: Vec<Arc<Account>> = accounts.iter().map(|a| a.account.clone()).collect();
        self.following
            .follow(&config, &built, &done.accounts_removed)
            .await;
        for a in &accounts {
            if !self
                .accounts
                .iter()
                .any(|old| Arc::ptr_eq(&a.account, &old.account))
            {
                spawn_refresher(a, tasks);
            }
        }
        let delivery = self.deliveries.borrow().succeeded_by(&config, built);
        self.deliveries.send_replace(Arc::new(delivery));
        let (opened, changes) = self.listeners.commit(prepared);
        self.spawn_listeners(opened, tasks);
        for addr in &changes.opened {
            tracing::info!(relay_event = "listening", address = %addr, "listening");
        }
        done.listeners = changes;
        done.users = users_changed(&self.config.users, &config.users);
        done.routes_changed = serde_json::to_value(&self.config.routes).ok()
            != serde_json::to_value(&config.routes).ok()
            || self.config.default_account != config.default_account;
        self.accounts = accounts;
        self.config = config;
        self.restart_expiries(tasks);
        Ok(done)
    }
}

/// The users added, changed (password hash or account) and removed between two configs, by name.
fn users_changed(
    was: &[crate::config::UserConfig],
    now: &[crate::config::UserConfig],
) -> [Vec<String>; 3] {
    let mut changes: [Vec<String>; 3] = Default::default();
    for u in now {
        match was.iter().find(|old| old.name == u.name) {
            None => changes[0].push(u.name.clone()),
            Some(old) if old.password_hash != u.password_hash || old.account != u.account => {
                changes[1].push(u.name.clone())
            }
            Some(_) => {}
        }
    }
    changes[2].extend(
        was.iter()
            .filter(|u| !now.iter().any(|n| n.name == u.name))
            .map(|u| u.name.clone()),
    );
    changes
}

fn spawn_refresher(a: &RunningAccount, tasks: &mut JoinSet<()>) {
    tasks.spawn(crate::tokens::refresher(
        vec![a.account.tokens.clone()],
        a.refresher.subscribe(),
    ));
}
