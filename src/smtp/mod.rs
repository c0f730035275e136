//! Inbound SMTP: the session state machine (`session`, `data`, `reply`), password checks (`auth`), and the
//! I/O around them (`listener` accepts, `connection` drives one client, `tls` loads certificates; `tls_legacy`
//! is the OpenSSL acceptor for `tls_compat = "legacy"` listeners).

pub mod auth;
mod connection;
pub mod data;
mod listener;
mod log_budget;
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

use crate::config::{Config, ListenerConfig, ListenerTls};
use crate::queue::Spool;
use connection::ListenerCtx;
use listener::ListenerControl;
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

/// The listeners a relay runs, and what a reload (SIGHUP) does to them.
pub struct Listeners {
    controls: Vec<ListenerControl>,
    users: Vec<(String, String, Option<String>)>,
    auth: Arc<auth::Authenticator>,
    spool: Spool,
    shutdown: watch::Receiver<bool>,
    abandon: watch::Receiver<bool>,
}

/// A reload's listeners, bound and loaded but not yet in use: dropping it changes nothing.
pub struct Prepared {
    /// Kept listeners (by index into the running ones) and their new settings.
    updates: Vec<(usize, ListenerCtx)>,
    opened: Vec<(Listener, ListenerControl)>,
    closed: Vec<usize>,
    /// Kept listeners whose settings changed (their addresses).
    changed: Vec<std::net::SocketAddr>,
    users: Vec<(String, String, Option<String>)>,
    auth: Arc<auth::Authenticator>,
}

/// What a reload did to the listeners.
#[derive(Debug, Default)]
pub struct ListenerChanges {
    pub kept: usize,
    /// Kept, with new settings (limits, TLS, policy).
    pub changed: Vec<std::net::SocketAddr>,
    pub opened: Vec<std::net::SocketAddr>,
    pub closed: Vec<std::net::SocketAddr>,
}

fn users_of(config: &Config) -> Vec<(String, String, Option<String>)> {
    config
        .users
        .iter()
        .map(|u| (u.name.clone(), u.password_hash.clone(), u.account.clone()))
        .collect()
}

impl Listeners {
    /// Binds every configured listener; the returned ones accept once run.
    pub async fn bind(
        config: &Config,
        spool: &Spool,
        shutdown: &watch::Receiver<bool>,
        abandon: &watch::Receiver<bool>,
    ) -> Result<(Listeners, Vec<Listener>), BindError> {
        let auth = Arc::new(auth::Authenticator::new(&config.users));
        let mut set = Listeners {
            controls: Vec::new(),
            users: users_of(config),
            auth,
            spool: spool.clone(),
            shutdown: shutdown.clone(),
            abandon: abandon.clone(),
        };
        let mut out = Vec::new();
        for (index, cfg) in config.listeners.iter().enumerate() {
            let (listener, control) = set.open(config, index, cfg, &set.auth).await?;
            set.controls.push(control);
            out.push(listener);
        }
        Ok((set, out))
    }

    /// The bound addresses, in config order (port 0 resolved).
    pub fn local_addrs(&self) -> Vec<std::net::SocketAddr> {
        self.controls.iter().map(|c| c.local).collect()
    }

    /// Makes ready what `config` asks for: a listener whose address is already bound keeps its socket and gets
    /// new settings (its certificate and key read again); a new address is bound now. Nothing changes for the
    /// running listeners until [`commit`](Self::commit); an error (a certificate that cannot be read, an address
    /// that cannot be bound) leaves them as they are.
    pub async fn prepare(&self, config: &Config) -> Result<Prepared, BindError> {
        let users = users_of(config);
        // Unchanged users keep their remembered logins and their blocked addresses.
        let auth = if users == self.users {
            self.auth.clone()
        } else {
            Arc::new(auth::Authenticator::new(&config.users))
        };
        let mut taken = vec![false; self.controls.len()];
        let mut updates = Vec::new();
        let mut changed = Vec::new();
        let mut opened = Vec::new();
        for (index, cfg) in config.listeners.iter().enumerate() {
            let running = self
                .controls
                .iter()
                .enumerate()
                .position(|(i, c)| !taken[i] && c.cfg().address == cfg.address);
            match running {
                Some(i) => {
                    taken[i] = true;
                    let local = self.controls[i].local;
                    if serde_json::to_value(self.controls[i].cfg()).ok()
                        != serde_json::to_value(cfg).ok()
                    {
                        changed.push(local);
                    }
                    updates.push((i, self.context(config, index, cfg, local, &auth)?));
                }
                None => opened.push(
                    self.open(config, index, cfg, &auth)
                        .await
                        .map_err(|e| self.held_by_itself(e))?,
                ),
            }
        }
        let closed = (0..self.controls.len()).filter(|i| !taken[*i]).collect();
        Ok(Prepared {
            updates,
            opened,
            closed,
            changed,
            users,
            auth,
        })
    }

    /// An address a reload cannot bind because one of relay's own listeners holds its port on an overlapping
    /// address (127.0.0.1:25 becoming 0.0.0.0:25): that takes a restart, and the error says so (it said only
    /// "Address already in use").
    fn held_by_itself(&self, e: BindError) -> BindError {
        match e {
            BindError::Bind {
                index,
                address,
                source,
            } if source.kind() == std::io::ErrorKind::AddrInUse => {
                // The same port on an overlapping address: the same one, or a wildcard covering the other (0.0.0.0
                // covers IPv4; [::] may cover both, where IPv6 sockets take IPv4 too).
                let covers = |w: &std::net::SocketAddr, a: &std::net::SocketAddr| {
                    w.ip().is_unspecified() && (w.is_ipv6() || a.is_ipv4())
                };
                let own = self.controls.iter().map(|c| c.local).find(|l| {
                    l.port() == address.port()
                        && (l.ip() == address.ip() || covers(l, &address) || covers(&address, l))
                });
                let source = match own {
                    Some(own) => std::io::Error::new(
                        source.kind(),
                        format!(
                            "{source}: relay itself listens on {own}, which overlaps it; moving a listener between an address and 0.0.0.0 or [::] on the same port takes a restart (`systemctl restart relay`)"
                        ),
                    ),
                    None => source,
                };
                BindError::Bind {
                    index,
                    address,
                    source,
                }
            }
            other => other,
        }
    }

    /// Puts a prepared reload in place; returns the new listeners, to be run.
    pub fn commit(&mut self, prepared: Prepared) -> (Vec<Listener>, ListenerChanges) {
        let mut changes = ListenerChanges {
            kept: prepared.updates.len(),
            changed: prepared.changed,
            ..ListenerChanges::default()
        };
        for (i, ctx) in prepared.updates {
            self.controls[i].update(ctx);
        }
        let mut closed = prepared.closed;
        closed.sort_unstable();
        for i in closed.into_iter().rev() {
            let control = self.controls.remove(i);
            control.close();
            changes.closed.push(control.local);
        }
        let mut out = Vec::new();
        for (listener, control) in prepared.opened {
            changes.opened.push(control.local);
            self.controls.push(control);
            out.push(listener);
        }
        self.users = prepared.users;
        self.auth = prepared.auth;
        (out, changes)
    }

    /// Stops every listener from accepting (sessions already open finish).
    pub fn close_all(&self) {
        for c in &self.controls {
            c.close();
        }
    }

    async fn open(
        &self,
        config: &Config,
        index: usize,
        cfg: &ListenerConfig,
        auth: &Arc<auth::Authenticator>,
    ) -> Result<(Listener, ListenerControl), BindError> {
        // The certificate is loaded before binding, so that a bad one leaves nothing bound.
        let tls = acceptor(index, cfg)?;
        let tcp = TcpListener::bind(cfg.address)
            .await
            .map_err(|source| BindError::Bind {
                index,
                address: cfg.address,
                source,
            })?;
        let local = tcp.local_addr().unwrap_or(cfg.address);
        let ctx = self.context_with(config, cfg, local, auth, tls);
        Ok(Listener::new(tcp, ctx))
    }

    fn context(
        &self,
        config: &Config,
        index: usize,
        cfg: &ListenerConfig,
        local: std::net::SocketAddr,
        auth: &Arc<auth::Authenticator>,
    ) -> Result<ListenerCtx, BindError> {
        let tls = acceptor(index, cfg)?;
        Ok(self.context_with(config, cfg, local, auth, tls))
    }

    fn context_with(
        &self,
        config: &Config,
        cfg: &ListenerConfig,
        local: std::net::SocketAddr,
        auth: &Arc<auth::Authenticator>,
        tls: Option<tls::ServerTls>,
    ) -> ListenerCtx {
        let policy = Arc::new(Policy {
            hostname: config.hostname.clone(),
            listener: local.to_string(),
            auth: cfg.auth,
            plaintext_auth: cfg.plaintext_auth,
            starttls: matches!(cfg.tls, ListenerTls::Starttls | ListenerTls::Auto),
            bare_lf: cfg.bare_lf,
            max_message_size: cfg.max_message_size.0,
            max_recipients: cfg.max_recipients,
            postmaster: config.postmaster.clone(),
        });
        ListenerCtx {
            cfg: cfg.clone(),
            policy,
            tls,
            spool: self.spool.clone(),
            auth: auth.clone(),
            shutdown: self.shutdown.clone(),
            abandon: self.abandon.clone(),
            routing: (!config.accounts.is_empty())
                .then(|| Arc::new(crate::queue::route::Routing::new(config))),
            largest: Arc::new(
                config
                    .accounts
                    .iter()
                    .filter_map(|a| Some((a.name.clone(), crate::upstream::largest_message(a)?)))
                    .collect(),
            ),
            min_free_space: config.queue.min_free_space.0,
        }
    }
}

/// A listener's TLS acceptor, read from its certificate and key files (at start, at a reload, and by
/// `relay check`).
pub fn acceptor(index: usize, cfg: &ListenerConfig) -> Result<Option<tls::ServerTls>, BindError> {
    match (&cfg.cert, &cfg.key) {
        (Some(cert), Some(key)) if cfg.tls != ListenerTls::None => Some(
            tls::acceptor(cert, key, cfg.tls_compat)
                .map_err(|source| BindError::Tls { index, source }),
        )
        .transpose(),
        _ => Ok(None),
    }
}
