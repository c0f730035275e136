//! Accepting connections: the allow list, the connection caps, and one task per connection.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};

use super::connection::{ListenerCtx, serve};
use super::log_budget::{Counted, LogBudget, SessionBudgets};
use super::occupancy::{Occupancy, Slots};
use super::reply::Reply;
use crate::config::ListenerTls;
use crate::health::Health;

/// How long a new client waits for the place of an evicted idle session.
const EVICTION_WAIT: Duration = Duration::from_secs(5);
/// New clients waiting for an evicted session's place at once; beyond this they are refused.
const MAX_WAITING: usize = 32;
/// Refusals being written at once.
const MAX_REFUSING: usize = 256;
/// Refused clients (outside the allow list) waited on for their QUIT at once; beyond this they are closed
/// after the 554, so that a flood of them holds none of the refusals' places for long.
const MAX_LINGERING: usize = 32;

/// A bound listener, ready to accept.
pub struct Listener {
    tcp: TcpListener,
    /// What new connections get; a reload replaces it (see [`ListenerControl`]).
    admission: watch::Receiver<Arc<Admission>>,
    /// Turns true (or its sender goes) when a reload removes this listener.
    close: watch::Receiver<bool>,
    per_client: Arc<Mutex<HashMap<IpAddr, usize>>>,
    waiting: Arc<Semaphore>,
    refusing: Arc<Semaphore>,
    lingering: Arc<Semaphore>,
    refusals_logged: Mutex<LogBudget>,
    accept_errors_logged: Mutex<LogBudget>,
    /// Failed TLS handshakes are logged by their sessions, within this budget.
    session_budgets: Arc<SessionBudgets>,
}

/// A listener's settings and the places its connections take. Replaced whole by a reload, so that a session
/// keeps what it began with while new clients get the new settings.
pub(crate) struct Admission {
    ctx: Arc<ListenerCtx>,
    slots: Arc<Slots>,
    occupancy: Arc<Occupancy>,
}

/// Held by whoever runs a listener: what a reload does to it once it accepts.
pub(crate) struct ListenerControl {
    /// The bound address (a configured port 0 resolved).
    pub local: SocketAddr,
    admission: watch::Sender<Arc<Admission>>,
    close: watch::Sender<bool>,
}

impl ListenerControl {
    /// The listener's settings as given by the config.
    pub fn cfg(&self) -> crate::config::ListenerConfig {
        self.admission.borrow().ctx.cfg.clone()
    }

    /// New settings (TLS certificate, policy, users, limits) for the connections accepted from now on. The
    /// connection places carry over; a new `max_connections` resizes them, and the sessions already open count
    /// against it (lowered below them, no new client is taken until enough have ended).
    pub fn update(&self, ctx: ListenerCtx) {
        let current = self.admission.borrow().clone();
        let max = ctx.cfg.max_connections;
        if current.ctx.cfg.max_connections != max {
            current.slots.resize(max);
            current.occupancy.resize(max);
        }
        self.admission.send_replace(Arc::new(Admission {
            ctx: Arc::new(ctx),
            slots: current.slots.clone(),
            occupancy: current.occupancy.clone(),
        }));
    }

    /// Stops accepting; sessions already open finish.
    pub fn close(&self) {
        self.close.send_replace(true);
    }
}

impl Listener {
    pub(crate) fn new(tcp: TcpListener, ctx: ListenerCtx) -> (Listener, ListenerControl) {
        let local = tcp.local_addr().unwrap_or(ctx.cfg.address);
        let admission = Arc::new(Admission {
            slots: Slots::new(ctx.cfg.max_connections),
            occupancy: Occupancy::new(ctx.cfg.max_connections),
            ctx: Arc::new(ctx),
        });
        let (admission_tx, admission) = watch::channel(admission);
        let (close_tx, close) = watch::channel(false);
        let listener = Listener {
            tcp,
            admission,
            close,
            per_client: Arc::default(),
            waiting: Arc::new(Semaphore::new(MAX_WAITING)),
            refusing: Arc::new(Semaphore::new(MAX_REFUSING)),
            lingering: Arc::new(Semaphore::new(MAX_LINGERING)),
            refusals_logged: Mutex::new(LogBudget::new(
                Counted::RefusedConnections,
                std::time::Instant::now(),
            )),
            accept_errors_logged: Mutex::new(LogBudget::new(
                Counted::AcceptErrors,
                std::time::Instant::now(),
            )),
            session_budgets: Arc::new(SessionBudgets::new()),
        };
        let control = ListenerControl {
            local,
            admission: admission_tx,
            close: close_tx,
        };
        (listener, control)
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.tcp.local_addr()
    }

    /// Accepts until `shutdown` turns true or a reload closes it. `sessions` counts live connections, for
    /// draining; the loop beats `health` from its own ticker, for the watchdog.
    pub(crate) async fn run(
        mut self,
        mut shutdown: watch::Receiver<bool>,
        sessions: watch::Sender<usize>,
        health: Arc<Health>,
    ) {
        let name = match self.tcp.local_addr() {
            Ok(a) => format!("accept loop {a}"),
            Err(_) => "accept loop".to_string(),
        };
        let heartbeat = health.register(name);
        let mut tick = health.ticker();
        loop {
            let accepted = tokio::select! {
                accepted = self.tcp.accept() => accepted,
                _ = tick.tick() => {
                    heartbeat.beat();
                    continue;
                }
                _ = shutdown.wait_for(|stop| *stop) => break,
                // A dropped sender (its relay is gone) closes it too.
                _ = self.close.wait_for(|close| *close) => break,
            };
            match accepted {
                Ok((tcp, peer)) => {
                    let admission = self.admission.borrow().clone();
                    self.admit(&admission, tcp, peer, &sessions);
                }
                Err(e) => {
                    // EMFILE and friends: log (within a budget: it fails again at every try until a descriptor
                    // is free) and go on after a pause (retrying in a tight loop would take a core).
                    let listener = self.admission.borrow().ctx.cfg.address;
                    if super::log_budget::may_log(&self.accept_errors_logged, listener) {
                        let hint = if e.raw_os_error() == Some(libc::EMFILE) {
                            "; the process's open-file limit is reached: new connections wait in the kernel's queue until a session ends (raise LimitNOFILE= in the unit, or lower max_connections)"
                        } else {
                            ""
                        };
                        tracing::warn!(relay_event = "accept_failed", error = %e, listener = %listener, "accept failed{hint}");
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        heartbeat.retire();
    }

    /// Whether a refused connection gets its own log line: a scan of the port, or a flood past the caps, would
    /// otherwise write one per connection, and journald's rate limit would then drop relay's other lines.
    fn may_log_refusal(&self, listener: SocketAddr) -> bool {
        self.refusals_logged
            .lock()
            .map_or(true, |mut b| b.take(std::time::Instant::now(), listener))
    }

    fn admit(
        &self,
        admission: &Admission,
        tcp: TcpStream,
        peer: SocketAddr,
        sessions: &watch::Sender<usize>,
    ) {
        let cfg = &admission.ctx.cfg;
        let implicit = cfg.tls == ListenerTls::Implicit;
        let ip = canonical(peer.ip());
        if !cfg.allow.iter().any(|net| net.contains(&ip)) {
            if self.may_log_refusal(cfg.address) {
                tracing::warn!(relay_event = "rejected", relay_client = %peer, listener = %cfg.address, "client not in the listener's allow list");
            }
            self.refuse(tcp, implicit, Reply::new(554, "5.7.1", "Access denied"));
            return;
        }
        let Some(client_slot) =
            ClientSlot::take(&self.per_client, ip, cfg.max_connections_per_client)
        else {
            if self.may_log_refusal(cfg.address) {
                tracing::warn!(relay_event = "rejected", relay_client = %peer, listener = %cfg.address, "too many connections from this client");
            }
            self.refuse(
                tcp,
                implicit,
                Reply::new(
                    421,
                    "4.7.0",
                    "Too many connections from your address, try again later",
                ),
            );
            return;
        };
        // Every slot taken: an idle, logged-out session (from the address holding the most) makes room for each
        // new client waiting, beyond those already leaving; after a reload lowered `max_connections` below the
        // sessions open, as many more as places are owed.
        let slot = admission.slots.try_take();
        let waiting = match slot {
            Some(_) => None,
            None => match self.waiting.clone().try_acquire_owned() {
                Ok(w)
                    if admission.occupancy.make_room(
                        admission.slots.owed(),
                        MAX_WAITING - self.waiting.available_permits(),
                    ) =>
                {
                    Some(w)
                }
                _ => {
                    if self.may_log_refusal(cfg.address) {
                        tracing::warn!(relay_event = "rejected", relay_client = %peer, listener = %cfg.address, "too many connections on this listener");
                    }
                    self.refuse(
                        tcp,
                        implicit,
                        Reply::new(421, "4.7.0", "Too many connections, try again later"),
                    );
                    return;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let live = LiveSession::new(sessions);
        let (ctx, slots, occupancy, budgets) = (
            admission.ctx.clone(),
            admission.slots.clone(),
            admission.occupancy.clone(),
            self.session_budgets.clone(),
        );
        tokio::spawn(async move {
            let slot = match slot {
                Some(s) => s,
                None => match tokio::time::timeout(EVICTION_WAIT, slots.take()).await {
                    Ok(Some(s)) => s,
                    _ => {
                        tracing::warn!(relay_event = "rejected", relay_client = %peer, "too many connections on this listener");
                        refuse_now(
                            tcp,
                            implicit,
                            Reply::new(421, "4.7.0", "Too many connections, try again later"),
                        )
                        .await;
                        return;
                    }
                },
            };
            drop(waiting);
            let seat = occupancy.seat(ip);
            serve(ctx, tcp, peer, &seat, &budgets).await;
            // Whatever way the session ended (a panic included), these give back its places on drop.
            drop((seat, slot, client_slot, live));
        });
    }

    /// Says why and hangs up, without holding up the accept loop. During a flood of refusals, beyond
    /// [`MAX_REFUSING`] at once the connection is just closed.
    fn refuse(&self, tcp: TcpStream, implicit: bool, reply: Reply) {
        let Ok(permit) = self.refusing.clone().try_acquire_owned() else {
            return;
        };
        let linger = match reply.code {
            554 => self.lingering.clone().try_acquire_owned().ok(),
            _ => None,
        };
        tokio::spawn(async move {
            let tcp = refuse_now(tcp, implicit, reply).await;
            drop(permit);
            if let (Some(mut tcp), Some(_linger)) = (tcp, linger) {
                let _ = tokio::time::timeout(LINGER, wait_for_quit(&mut tcp)).await;
                let _ = tcp.shutdown().await;
            }
        });
    }
}

/// How long a refused client outside the allow list is waited on for its QUIT.
const LINGER: Duration = Duration::from_secs(5);

/// On an implicit-TLS port there is nobody to read a plain-text reply, so the connection is just closed. On an
/// `auto` port the client is more likely a plain one (TLS clients there are rarer and fail either way).
/// The connection back once the reply is written and the connection is still open for a 554's wait for QUIT
/// (closed otherwise).
async fn refuse_now(mut tcp: TcpStream, implicit_tls: bool, reply: Reply) -> Option<TcpStream> {
    if implicit_tls {
        return None;
    }
    let written =
        tokio::time::timeout(Duration::from_secs(5), tcp.write_all(&reply.to_wire())).await;
    if matches!(written, Ok(Ok(()))) && reply.code == 554 {
        return Some(tcp);
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), tcp.shutdown()).await;
    None
}

/// RFC 5321 section 3.1: after a 554 greeting the server waits for the client's QUIT, answering anything else
/// with 503, rather than close at once. For [`LINGER`], ten commands at most, [`MAX_LINGERING`] clients at
/// once: a refused client gets no more of relay than that.
async fn wait_for_quit(tcp: &mut TcpStream) {
    use tokio::io::AsyncReadExt;
    let mut chunk = [0u8; 512];
    let mut line = Vec::new();
    let mut answered = 0;
    loop {
        let n = match tcp.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        for &b in &chunk[..n] {
            if b != b'\n' {
                // Only a short line can be QUIT; the rest of a long one is not kept.
                if line.len() < 16 {
                    line.push(b);
                }
                continue;
            }
            let quit = line.trim_ascii().eq_ignore_ascii_case(b"QUIT");
            let answer: &[u8] = if quit {
                b"221 2.0.0 Bye\r\n"
            } else {
                b"503 5.5.1 Access denied: only QUIT is taken\r\n"
            };
            answered += 1;
            if tcp.write_all(answer).await.is_err() || quit || answered >= 10 {
                return;
            }
            line.clear();
        }
    }
}

/// Counts a live connection for draining; the count goes down when this drops, even in a panicking session.
struct LiveSession(watch::Sender<usize>);

impl LiveSession {
    fn new(sessions: &watch::Sender<usize>) -> LiveSession {
        sessions.send_modify(|n| *n += 1);
        LiveSession(sessions.clone())
    }
}

impl Drop for LiveSession {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panicking_session_still_gives_back_its_count() {
        let (sessions, mut live) = watch::channel(0usize);
        let guard = LiveSession::new(&sessions);
        assert_eq!(*live.borrow(), 1);
        let task = tokio::spawn(async move {
            let _guard = guard;
            panic!("a session's bug");
        });
        assert!(task.await.is_err());
        tokio::time::timeout(Duration::from_secs(5), live.wait_for(|n| *n == 0))
            .await
            .expect("count back to 0")
            .expect("sender alive");
    }
}
