//! What watches the relay from beside the mail path, started with it: the metrics endpoint (`[metrics]`),
//! alerts (`[alerts]`) and bounces (`bounce = "sender"`). Each is fed by [`events`](crate::events).
//!
//! A reload hands them the new accounts through [`Following`]: the metrics' per-account series and token reading,
//! the alerts' accounts, credentials and settings, and the bounces' hostname follow the running config without a
//! task restarted.

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use crate::alerts::{Alerts, MailAccount, Notice, Notifier, Setup};
use crate::config::{AlertsConfig, Bounce, Config};
use crate::events::Watcher;
use crate::metrics::StateReader;
use crate::queue::Spool;
use crate::queue::delivery::Account;

#[derive(Debug, thiserror::Error)]
pub enum ObserverError {
    #[error("metrics address {address}: {source}")]
    Metrics {
        address: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("alerts: cannot set up the HTTP client: {0}")]
    Http(#[from] reqwest::Error),
}

struct AlertTask {
    alerts: Arc<Alerts>,
    notices: mpsc::Receiver<Notice>,
    notifier: Notifier,
}

/// What a reload tells the observers: the accounts (and `[alerts]` settings) to follow from now on.
#[derive(Clone)]
pub struct Following {
    reader: Arc<StateReader>,
    alerts: Option<Arc<Alerts>>,
    bouncer: Option<Arc<crate::bounce::Bouncer>>,
}

impl Following {
    /// Follows `config` and its built `accounts` (in config order) from now on; `removed`: the accounts it no
    /// longer has. Called before the new accounts' refreshers start, so that their first events are counted.
    pub async fn follow(&self, config: &Config, accounts: &[Arc<Account>], removed: &[String]) {
        let names = account_names(config);
        if let Some(bouncer) = &self.bouncer {
            bouncer.follow_hostname(&config.hostname);
        }
        let metrics = crate::metrics::global();
        metrics.forget_accounts(removed);
        metrics.know_accounts(&names);
        self.reader.follow(names);
        if let (Some(alerts), Some(c)) = (&self.alerts, &config.alerts) {
            // A certificate's date is read from its file: on the blocking pool.
            let (config, accounts) = (config.clone(), accounts.to_vec());
            let c = c.clone();
            let setup =
                tokio::task::spawn_blocking(move || alert_setup(&config, &c, &accounts)).await;
            match setup {
                Ok(setup) => alerts.follow(setup).await,
                Err(e) => tracing::error!(error = %e, "alerts cannot follow the reloaded accounts"),
            }
        }
    }
}

fn account_names(config: &Config) -> Vec<String> {
    config.accounts.iter().map(|a| a.name.clone()).collect()
}

/// What alerts take from `config`: its `[alerts]` (`c`), its hostname, and its accounts, built (`accounts`).
fn alert_setup(config: &Config, c: &AlertsConfig, accounts: &[Arc<Account>]) -> Setup {
    Setup {
        config: c.clone(),
        hostname: config.hostname.clone(),
        min_free_space: config.queue.min_free_space.0,
        accounts: accounts
            .iter()
            .filter_map(|a| {
                let cfg = config.accounts.iter().find(|c| c.name == a.name)?;
                Some(MailAccount {
                    account: a.clone(),
                    mailbox: cfg.mailbox.clone(),
                })
            })
            .collect(),
        expiries: config
            .accounts
            .iter()
            .flat_map(|a| {
                crate::oauth::expiry::expiries(a)
                    .into_iter()
                    .map(|e| (a.name.clone(), e))
            })
            .collect(),
    }
}

pub struct Observers {
    reader: Arc<StateReader>,
    metrics: Option<TcpListener>,
    alerts: Option<AlertTask>,
    bouncer: Option<Arc<crate::bounce::Bouncer>>,
}

impl Observers {
    /// Binds the metrics address and installs the watchers the config asks for. With none asked for, the
    /// process's watchers are left as they are (in-process tests run several relays).
    pub async fn start(
        config: &Config,
        spool: &Spool,
        accounts: &[Arc<Account>],
    ) -> Result<Observers, ObserverError> {
        let names = account_names(config);
        crate::metrics::global().know_accounts(&names);
        // A key that cannot be loaded has already stopped the start (accounts::build); plain, then.
        let tokens = crate::tokens::TokenStore::for_config(config)
            .unwrap_or_else(|_| crate::tokens::TokenStore::new(&config.state_dir));
        let reader = Arc::new(StateReader::new(&config.state_dir, tokens.clone(), names));
        let metrics = match &config.metrics {
            Some(m) => Some(crate::metrics::bind(m.address).await.map_err(|source| {
                ObserverError::Metrics {
                    address: m.address,
                    source,
                }
            })?),
            None => None,
        };
        let mut watchers: Vec<Arc<dyn Watcher>> = Vec::new();
        let http = match &config.alerts {
            // The same client as the token endpoints: rustls, and no redirects (a redirect would post the notice
            // somewhere the config does not name).
            Some(_) => Some(crate::accounts::http_client()?),
            None => None,
        };
        let alerts = config.alerts.as_ref().zip(http).map(|(c, http)| {
            let (alerts, notices) =
                Alerts::new(alert_setup(config, c, accounts), &config.state_dir);
            watchers.push(alerts.clone());
            AlertTask {
                alerts,
                notices,
                notifier: Notifier {
                    http,
                    state_dir: config.state_dir.clone(),
                    tokens: tokens.clone(),
                },
            }
        });
        let bouncer = (config.bounce == Bounce::Sender)
            .then(|| Arc::new(crate::bounce::Bouncer::new(spool.clone(), &config.hostname)));
        if let Some(b) = &bouncer {
            watchers.push(b.clone());
        }
        if !watchers.is_empty() {
            crate::events::set_watchers(watchers);
        }
        Ok(Observers {
            reader,
            metrics,
            alerts,
            bouncer,
        })
    }

    /// Where a reload tells these observers about the new accounts.
    pub fn following(&self) -> Following {
        Following {
            reader: self.reader.clone(),
            alerts: self.alerts.as_ref().map(|t| t.alerts.clone()),
            bouncer: self.bouncer.clone(),
        }
    }

    /// Serves metrics and sends alerts until `stop`.
    pub async fn run(self, stop: watch::Receiver<bool>) {
        let metrics = async {
            if let Some(listener) = self.metrics {
                crate::metrics::serve(listener, self.reader.clone(), stop.clone()).await;
            }
        };
        let alerts = async {
            if let Some(t) = self.alerts {
                crate::alerts::run(
                    t.alerts,
                    t.notices,
                    t.notifier,
                    self.reader.clone(),
                    stop.clone(),
                )
                .await;
            }
        };
        tokio::join!(metrics, alerts);
    }
}
