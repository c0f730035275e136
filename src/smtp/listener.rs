//! Accepting connections: the allow list, the connection caps, and one task per connection.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};

use super::connection::{ListenerCtx, serve};
use super::reply::Reply;
use crate::config::TlsMode;

/// A bound listener, ready to accept.
pub struct Listener {
    tcp: TcpListener,
    ctx: Arc<ListenerCtx>,
    slots: Arc<Semaphore>,
    per_client: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl Listener {
    pub(crate) fn new(tcp: TcpListener, ctx: ListenerCtx) -> Listener {
        let slots = Arc::new(Semaphore::new(ctx.cfg.max_connections));
        Listener {
            tcp,
            ctx: Arc::new(ctx),
            slots,
            per_client: Arc::default(),
        }
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.tcp.local_addr()
    }

    /// Accepts until `shutdown` turns true. `sessions` counts live connections, for draining.
    pub(crate) async fn run(
        self,
        mut shutdown: watch::Receiver<bool>,
        sessions: watch::Sender<usize>,
    ) {
        loop {
            let (tcp, peer) = tokio::select! {
                accepted = self.tcp.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // EMFILE and friends: log and go on; the listener itself is fine.
                        tracing::warn!(error = %e, "accept failed");
                        continue;
                    }
                },
                _ = shutdown.wait_for(|stop| *stop) => return,
            };
            self.admit(tcp, peer, &sessions);
        }
    }

    fn admit(&self, tcp: TcpStream, peer: SocketAddr, sessions: &watch::Sender<usize>) {
        let cfg = &self.ctx.cfg;
        let ip = canonical(peer.ip());
        if !cfg.allow.iter().any(|net| net.contains(&ip)) {
            tracing::warn!(relay_event = "rejected", relay_client = %peer, listener = %cfg.address, "client not in the listener's allow list");
            self.refuse(tcp, Reply::new(554, "5.7.1", "Access denied"));
            return;
        }
        let Ok(slot) = self.slots.clone().try_acquire_owned() else {
            tracing::warn!(relay_event = "rejected", relay_client = %peer, listener = %cfg.address, "too many connections on this listener");
            self.refuse(
                tcp,
                Reply::new(421, "4.7.0", "Too many connections, try again later"),
            );
            return;
        };
        let Some(client_slot) =
            ClientSlot::take(&self.per_client, ip, cfg.max_connections_per_client)
        else {
            tracing::warn!(relay_event = "rejected", relay_client = %peer, listener = %cfg.address, "too many connections from this client");
            self.refuse(
                tcp,
                Reply::new(
                    421,
                    "4.7.0",
                    "Too many connections from your address, try again later",
                ),
            );
            return;
        };
        let _ = tcp.set_nodelay(true);
        let ctx = self.ctx.clone();
        let implicit = cfg.tls == TlsMode::Implicit;
        sessions.send_modify(|n| *n += 1);
        let sessions = sessions.clone();
        tokio::spawn(async move {
            serve(ctx, tcp, peer, implicit).await;
            drop((slot, client_slot));
            sessions.send_modify(|n| *n -= 1);
        });
    }

    /// Says why and hangs up, without holding up the accept loop. On an implicit-TLS port there is nobody to
    /// read a plain-text reply, so the connection is just closed.
    fn refuse(&self, mut tcp: TcpStream, reply: Reply) {
        if self.ctx.cfg.tls == TlsMode::Implicit {
            return;
        }
        tokio::spawn(async move {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), async {
                let _ = tcp.write_all(&reply.to_wire()).await;
                let _ = tcp.shutdown().await;
            })
            .await;
        });
    }
}

/// IPv4 clients on a dual-stack socket arrive as `::ffff:a.b.c.d`; allow lists are written in IPv4.
pub(crate) fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// One connection's share of its client address's cap; given back on drop.
struct ClientSlot {
    map: Arc<Mutex<HashMap<IpAddr, usize>>>,
    ip: IpAddr,
}

impl ClientSlot {
    fn take(
        map: &Arc<Mutex<HashMap<IpAddr, usize>>>,
        ip: IpAddr,
        max: usize,
    ) -> Option<ClientSlot> {
        let mut m = map.lock().ok()?;
        let n = m.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(ClientSlot {
            map: map.clone(),
            ip,
        })
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        if let Ok(mut m) = self.map.lock()
            && let Some(n) = m.get_mut(&self.ip)
        {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}
