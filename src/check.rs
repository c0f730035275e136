//! `relay check`: everything in a config that would keep `relay serve` from starting, found by the construction
//! that serve itself runs (listener certificates, each account's credentials and upstreams, the token key and the
//! token files it must open), without writing anything. A sysadmin runs it before `systemctl reload relay`: it must
//! say what the daemon would say.
//!
//! Files that only the service can read are skipped: a `$CREDENTIALS_DIRECTORY/…` path outside the unit, and
//! `token_encryption = "systemd-creds"` there too. [`Config::credentials_at_start`] names them, and
//! [`Config::warnings`] says so for each.
//!
//! A listener's address taken by another program (on Debian, exim4 or Postfix on port 25) also keeps serve from
//! starting, but it is about the machine, not the config, and a running relay holds its own addresses: so it is a
//! warning ([`busy_addresses`]), looked for only while no relay runs on the config's state dir.

use crate::config::{Config, ConfigError};
use crate::smtp::BindError;
use crate::tokens::{StoreError, TokenStore};

/// The listeners' addresses that another program holds now, as warnings: `relay serve` would fail to listen on
/// them. Each is bound for a moment and let go; nothing is looked at while a relay runs on the state dir (its own
/// listeners hold their addresses), and an address only root may bind is left to the unit, whose
/// `AmbientCapabilities=CAP_NET_BIND_SERVICE` lets the service's user bind it.
pub fn busy_addresses(config: &Config) -> Vec<crate::config::Warning> {
    crate::queue::while_no_relay_runs(&config.state_dir, || look_for_busy(config))
        .unwrap_or_default()
}

/// Run as root (`sudo relay check`, as the README's install says), the files the config names and the state dir as
/// the service's user sees them: root reads everything, and a secret only root may read passed the check, then
/// stopped the service. Warnings, not errors: the unit's `User=` may be another (`RELAY_SERVICE_USER` names it).
pub fn service_user_access(config: &Config) -> Vec<crate::config::Warning> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Vec::new();
    }
    let name = std::env::var("RELAY_SERVICE_USER")
        .unwrap_or_else(|_| crate::access::SERVICE_USER.to_string());
    let Some(user) = crate::access::User::lookup(&name) else {
        return Vec::new();
    };
    let mut reads: Vec<(String, &std::path::Path)> =
        vec![("config".into(), std::path::Path::new(&config.source))];
    for (i, l) in config.listeners.iter().enumerate() {
        reads.extend(
            l.cert
                .as_deref()
                .map(|p| (format!("listener[{i}].cert"), p)),
        );
        reads.extend(l.key.as_deref().map(|p| (format!("listener[{i}].key"), p)));
    }
    for (i, a) in config.accounts.iter().enumerate() {
        for (key, path) in [
            ("client_secret_file", &a.client_secret_file),
            ("certificate_file", &a.certificate_file),
            ("private_key_file", &a.private_key_file),
            ("service_account_file", &a.service_account_file),
            ("password_file", &a.password_file),
            ("ca_file", &a.ca_file),
        ] {
            reads.extend(path.as_deref().map(|p| (format!("account[{i}].{key}"), p)));
        }
    }
    if let Some(crate::config::TokenEncryption::KeyFile(p)) = &config.token_encryption {
        reads.push(("token_encryption".into(), p));
    }
    let mut warnings: Vec<crate::config::Warning> = reads
        .into_iter()
        .filter_map(|(key, path)| {
            let why = user.may_read(path).err()?;
            Some(crate::config::Warning {
                key,
                text: format!("{why}: `relay serve` run by the unit would stop there (this check runs as root, which reads anything)"),
            })
        })
        .collect();
    if let Err(why) = user.may_write_dir(&config.state_dir) {
        warnings.push(crate::config::Warning {
            key: "state_dir".into(),
            text: format!("{why}: `relay serve` run by the unit would stop there (this check runs as root, which writes anywhere)"),
        });
    }
    warnings
}

fn look_for_busy(config: &Config) -> Vec<crate::config::Warning> {
    let mut warnings = Vec::new();
    for (i, l) in config.listeners.iter().enumerate() {
        let why = match std::net::TcpListener::bind(l.address) {
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => continue,
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => format!(
                "{} is in use by another program (or a relay on another state dir), so `relay serve` cannot listen on it: `ss -ltnp 'sport = :{}'` names it (on Debian often exim4 or Postfix); stop it, or choose another address",
                l.address,
                l.address.port()
            ),
            Err(e) => format!("{}: `relay serve` cannot listen on it: {e}", l.address),
        };
        warnings.push(crate::config::Warning {
            key: format!("listener[{i}].address"),
            text: why,
        });
    }
    warnings
}

/// The config, if serve would start on it; else every problem found, each with its file, key and reason.
/// The config as `relay check` prints it: each account with its provider's defaults filled in (the token
/// endpoint, the scope, the SMTP host and port, the HTTP APIs it uses), so that a sysadmin sees where mail and
/// tokens go without reading relay's source.
pub fn resolved_toml(config: &Config) -> String {
    use crate::config::Transport;
    let mut c = config.clone();
    for a in &mut c.accounts {
        let Ok(ep) = crate::oauth::provider::endpoints(a) else {
            continue;
        };
        a.token_url = Some(ep.token_url);
        a.device_authorization_url = ep.device_authorization_url;
        a.authorization_url = ep.authorization_url;
        a.scope = Some(ep.scope);
        if a.transport == Transport::Smtp {
            a.smtp_host = Some(ep.smtp_host);
            a.smtp_port = Some(ep.smtp_port);
            a.smtp_tls = Some(ep.smtp_tls);
        }
        if a.transport == Transport::Graph || a.fallback_transport == Some(Transport::Graph) {
            a.graph_url = Some(ep.graph_url);
        }
        if a.transport == Transport::GmailApi {
            a.gmail_api_url = Some(ep.gmail_api_url);
        }
    }
    c.to_toml()
}

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
        // Whoever runs this may not be the service's user, so only what is wrong for anyone: a file where the
        // directory should be.
        if config.state_dir.exists() && !config.state_dir.is_dir() {
            problem(
                "state_dir".into(),
                format!("{} is not a directory", config.state_dir.display()),
            );
        }
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
