//! Inbound SMTP: the session state machine (`session`, `data`, `reply`), password checks (`auth`), and the
//! I/O around them (`listener` accepts, `connection` drives one client, `tls` loads certificates; `tls_legacy`
//! is the OpenSSL acceptor for `tls_compat = "legacy"` listeners).

pub mod auth;
mod connection;
pub mod data;
mod listener;
mod occupancy;
pub mod reply;
pub mod session;
pub mod tls;
#[cfg(feature = "legacy-tls")]
mod tls_legacy;

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;

pub use listener::Listener;

use crate::config::{Config, ListenerTls};
use crate::queue::Spool;
use connection::ListenerCtx;
use session::Policy;

#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("listener[{index}] ({address}): cannot listen: {source}")]
    Bind {
        index: usize,
        address: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("listener[{index}]: {source}")]
    Tls { index: usize, source: tls::TlsError },
}

/// Binds every configured listener.
pub async fn bind(
    config: &Config,
    spool: &Spool,
    shutdown: &watch::Receiver<bool>,
) -> Result<Vec<Listener>, BindError> {
    let auth = Arc::new(auth::Authenticator::new(&config.users));
    let mut out = Vec::new();
    for (index, cfg) in config.listeners.iter().enumerate() {
        let tls = match (&cfg.cert, &cfg.key) {
            (Some(cert), Some(key)) if cfg.tls != ListenerTls::None => Some(
                tls::acceptor(cert, key, cfg.tls_compat)
                    .map_err(|source| BindError::Tls { index, source })?,
            ),
            _ => None,
        };
        let tcp = TcpListener::bind(cfg.address)
            .await
            .map_err(|source| BindError::Bind {
                index,
                address: cfg.address,
                source,
            })?;
        let local = tcp.local_addr().unwrap_or(cfg.address);
        let policy = Arc::new(Policy {
            hostname: config.hostname.clone(),
            listener: local.to_string(),
            auth: cfg.auth,
            plaintext_auth: cfg.plaintext_auth,
            starttls: matches!(cfg.tls, ListenerTls::Starttls | ListenerTls::Auto),
            bare_lf: cfg.bare_lf,
            max_message_size: cfg.max_message_size.0,
            max_recipients: cfg.max_recipients,
        });
        out.push(Listener::new(
            tcp,
            ListenerCtx {
                cfg: cfg.clone(),
                policy,
                tls,
                spool: spool.clone(),
                auth: auth.clone(),
                shutdown: shutdown.clone(),
            },
        ));
    }
    Ok(out)
}
