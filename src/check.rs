//! `relay check`: everything in a config that would keep `relay serve` from starting, found by the construction
//! that serve itself runs (listener certificates, each account's credentials and upstreams, the token key and the
//! token files it must open), without binding a port or writing anything. A sysadmin runs it before `systemctl
//! reload relay`: it must say what the daemon would say.
//!
//! Files that only the service can read are skipped: a `$CREDENTIALS_DIRECTORY/…` path outside the unit, and
//! `token_encryption = "systemd-creds"` there too. [`Config::credentials_at_start`] names them, and
//! [`Config::warnings`] says so for each.

use crate::config::{Config, ConfigError};
use crate::smtp::BindError;
use crate::tokens::{StoreError, TokenStore};

/// The config, if serve would start on it; else every problem found, each with its file, key and reason.
pub fn check(config: Config) -> Result<Config, ConfigError> {
    // rustls loads nothing until a crypto provider is chosen (two are compiled in through dependencies).
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let mut problems = Vec::new();
    {
        let at_start = |key: &str| config.credentials_at_start.iter().any(|k| k == key);
        let mut problem = |key: String, reason: String| {
            if !at_start(&key) {
                problems.push(ConfigError::new(&config.source, key, reason));
            }
        };
        for (i, l) in config.listeners.iter().enumerate() {
            // A certificate that only the service can read leaves its key unusable here, and the other way round.
            if at_start(&format!("listener[{i}].cert")) || at_start(&format!("listener[{i}].key")) {
                continue;
            }
            if let Err(BindError::Tls { index, source }) = crate::smtp::acceptor(i, l) {
                problem(
                    format!("listener[{index}].{}", source.config_key()),
                    source.to_string(),
                );
            }
        }
        let store = if at_start("token_encryption") {
            None
        } else {
            match TokenStore::for_config(&config) {
                Ok(store) => Some(store),
                Err(StoreError::Key(e)) => {
                    problem("token_encryption".into(), e.reason().to_string());
                    None
                }
                Err(e) => {
                    problem("token_encryption".into(), e.to_string());
                    None
                }
            }
        };
        let http = crate::accounts::shared_http()
            .map_err(|e| problem("account".into(), e.reason))
            .ok();
        for (i, a) in config.accounts.iter().enumerate() {
            if let Some(http) = &http
                && let Err(found) = crate::accounts::parts(&config, a, http)
            {
                for (key, reason) in found {
                    problem(format!("account[{i}].{key}"), reason);
                }
            }
            // Read only: the daemon's own check also seals a plain file, which is the daemon's to do.
            if let Some(store) = &store
                && let Err(reason) =
                    crate::accounts::tokens_open(&a.name, store.load(&a.name).map(drop))
            {
                problem("token_encryption".into(), reason);
            }
        }
    }
    let mut problems = problems.into_iter();
    match problems.next() {
        None => Ok(config),
        Some(mut first) => {
            first.more = problems.collect();
            Err(first)
        }
    }
}
