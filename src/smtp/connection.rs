//! One client connection: moves bytes between the socket, the [`Session`] state machine and the spool.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::timeout;

use super::auth::{Authenticator, Verdict};
use super::data::Progress;
use super::log_budget::{SessionBudgets, may_log};
use super::occupancy::{STRESS_TIMEOUT, Seat};
use super::reply::Reply;
use super::session::{Policy, Session, Step, StoreFailed};
use super::tls::{ServerTls, TlsConn};
use crate::config::{ListenerConfig, ListenerTls};
use crate::queue::route::{Addressing, Routing};
use crate::queue::{Incoming, QueueId, Spool};

/// Read buffer; also the most body bytes handled per step.
const READ_BUF: usize = 64 * 1024;
/// Replies held before they are written out, mid-burst.
const MAX_PENDING_REPLIES: usize = 16 * 1024;

/// What every connection of one listener shares.
pub(crate) struct ListenerCtx {
    pub cfg: ListenerConfig,
    pub policy: Arc<Policy>,
    pub tls: Option<ServerTls>,
    pub spool: Spool,
    pub auth: Arc<Authenticator>,
    pub shutdown: watch::Receiver<bool>,
    /// Set when the shutdown's drain time is up: every session still open says 421 and closes, a message in
    /// the middle of DATA included (it was never acknowledged; its client sends it again).
    pub abandon: watch::Receiver<bool>,
    /// Where messages go, to refuse at DATA one that no account would take; `None` when no account is configured
    /// at all (mail is queued until one is).
    pub routing: Option<Arc<Routing>>,
    /// The largest message each account can send, where its transport says (`upstream::largest_message`).
    pub largest: Arc<HashMap<String, u64>>,
    /// `[queue] min_free_space`: the free space a new message must leave on the queue's filesystem.
    pub min_free_space: u64,
}

enum Outcome<S> {
    Closed,
    StartTls(S),
}

/// How long a `tls = "auto"` listener waits for a TLS client's first byte. A TLS client sends its ClientHello
/// right after the TCP handshake, while a plain SMTP client waits for the greeting; so silence means plain. One
/// second covers a lost first segment (Linux retransmits after 200 ms to 1 s) and delays a plain greeting by no
/// more than that.
const SNIFF_WAIT: Duration = Duration::from_secs(1);
/// The first byte of every TLS record that opens a handshake (content type 22).
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// Serves one accepted connection to its end. Errors are the client's problem (a reset, a timeout) and are
/// logged at debug level only.
pub(crate) async fn serve(
    ctx: Arc<ListenerCtx>,
    tcp: TcpStream,
    peer: SocketAddr,
    seat: &Seat,
    budgets: &SessionBudgets,
) {
    let mut session = Session::new(ctx.policy.clone(), peer, false);
    let result = async {
        let implicit_tls = match ctx.cfg.tls {
            ListenerTls::Implicit => true,
            ListenerTls::Auto => opens_with_tls(&tcp).await?,
            ListenerTls::None | ListenerTls::Starttls => false,
        };
        if implicit_tls {
            let tls = handshake(&ctx, tcp, seat, &budgets.handshakes, ctx.cfg.tls).await?;
            session.tls_started();
            let greeting = session.greeting();
            drive(&ctx, &mut session, tls, Some(greeting), seat, budgets).await?;
            return Ok(());
        }
        let greeting = session.greeting();
        if let Outcome::StartTls(tcp) =
            drive(&ctx, &mut session, tcp, Some(greeting), seat, budgets).await?
        {
            let tls =
                handshake(&ctx, tcp, seat, &budgets.handshakes, ListenerTls::Starttls).await?;
            session.tls_started();
            drive(&ctx, &mut session, tls, None, seat, budgets).await?;
        }
        Ok::<(), std::io::Error>(())
    }
    .await;
    if let Err(e) = result {
        tracing::debug!(relay_client = %peer, error = %e, "connection ended");
    }
}

/// Whether a client on a `tls = "auto"` listener starts with a TLS handshake. Peeked, so that a plain client's
/// early bytes stay in the socket for the session to read.
async fn opens_with_tls(tcp: &TcpStream) -> std::io::Result<bool> {
    let mut first = [0u8; 1];
    match timeout(SNIFF_WAIT, tcp.peek(&mut first)).await {
        Ok(Ok(0)) => Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "closed before saying anything",
        )),
        // A byte with the high bit set opens an SSLv2-format hello (very old clients); no SMTP command does.
        Ok(Ok(_)) => Ok(first[0] == TLS_HANDSHAKE_RECORD || first[0] >= 0x80),
        Ok(Err(e)) => Err(e),
        Err(_) => Ok(false),
    }
}

/// A handshake counts as idle: a client that never finishes one may be evicted, under pressure it gets the short
/// timeout (also when the pressure begins during the handshake), and a shutdown drops it at once (there is no
/// session yet to say 421 in, and a port scanner's half-open handshake must not hold up a restart).
/// `mode`: how this handshake began, for a failure's hint: at connect (`Implicit`, or `Auto` having seen a
/// TLS-like first byte), or after STARTTLS.
async fn handshake(
    ctx: &ListenerCtx,
    tcp: TcpStream,
    seat: &Seat,
    logged: &std::sync::Mutex<super::log_budget::LogBudget>,
    mode: ListenerTls,
) -> std::io::Result<TlsConn> {
    let Some(acceptor) = &ctx.tls else {
        return Err(std::io::Error::other(
            "TLS requested on a listener without a certificate",
        ));
    };
    seat.set_idle(true);
    let started = tokio::time::Instant::now();
    let peer = tcp.peer_addr().ok();
    let mut stress = seat.stress();
    let mut shutdown = ctx.shutdown.clone();
    let accept = acceptor.accept(tcp);
    tokio::pin!(accept);
    let accepted = loop {
        let stressed = *stress.borrow_and_update();
        let limit = if stressed {
            ctx.cfg.command_timeout.min(STRESS_TIMEOUT)
        } else {
            ctx.cfg.command_timeout
        };
        tokio::select! {
            accepted = tokio::time::timeout_at(started + limit, &mut accept) => {
                break accepted.unwrap_or_else(|_| Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "the client did not finish the TLS handshake within {}{}",
                        humantime::format_duration(limit),
                        // A plain device on an implicit port sends nothing: it waits for a greeting.
                        if ctx.cfg.tls == ListenerTls::Implicit {
                            " (a plain SMTP device on a port with tls = \"implicit\" sends nothing and waits for a greeting: it needs a listener with tls = \"starttls\" or \"auto\")"
                        } else {
                            ""
                        }
                    ),
                )));
            }
            // Ended by relay, not by the client: nothing to log.
            _ = seat.evicted() => {
                seat.set_idle(false);
                return Err(std::io::Error::other("evicted during the TLS handshake: listener full"));
            }
            Ok(_) = shutdown.wait_for(|stop| *stop) => {
                seat.set_idle(false);
                return Err(std::io::Error::other("shutting down during the TLS handshake"));
            }
            // The listener came under pressure: the shorter limit, counted from the start.
            Ok(()) = stress.changed(), if !stressed => continue,
        }
    };
    seat.set_idle(false);
    // An old device that cannot agree on a TLS version or cipher fails here, before any SMTP: said at info, so
    // that "why does my scanner's mail never arrive" has an answer in the journal, within the listener's budget
    // (a scan of an implicit-TLS port fails a handshake per connection). A client that hangs up (a health
    // check's connect and close) is not news.
    if let (Err(e), Some(peer)) = (&accepted, peer) {
        match super::tls::handshake_failure(e, ctx.cfg.tls_compat, mode) {
            Some(reason) => {
                if may_log(logged, ctx.cfg.address) {
                    tracing::info!(relay_event = "tls_failed", relay_client = %peer, listener = %ctx.cfg.address, error = %reason, "TLS handshake failed");
                }
            }
            None => {
                tracing::debug!(relay_client = %peer, error = %e, "client hung up during the TLS handshake")
            }
        }
    }
    accepted
}

/// Refused commands logged per connection.
const MAX_REFUSALS_LOGGED: u32 = 10;

/// What a connection may still log of its refusals: [`MAX_REFUSALS_LOGGED`] of its own, within its listener's
/// budget (a flood of connections that each use up their ten would otherwise write hundreds of thousands of lines
/// a minute).
struct Refusals<'a> {
    logged: u32,
    budget: &'a std::sync::Mutex<super::log_budget::LogBudget>,
    listener: SocketAddr,
}

impl Refusals<'_> {
    /// Whether one more refusal on this connection is logged. Some refusals (530, 452, 552) do not count towards
    /// the session's error limit, and a refused message counts only until the limit closes the session: a
    /// client repeating one would otherwise fill the journal, whose rate limit would then drop relay's other
    /// lines.
    fn may_log(&mut self, peer: SocketAddr) -> bool {
        self.logged = self.logged.saturating_add(1);
        if self.logged > MAX_REFUSALS_LOGGED {
            if self.logged == MAX_REFUSALS_LOGGED + 1 && may_log(self.budget, self.listener) {
                tracing::warn!(relay_client = %peer, "more refusals on this connection; they are not logged");
            }
            return false;
        }
        may_log(self.budget, self.listener)
    }
}

/// Logs a refused MAIL, RCPT or DATA command (a refused message after DATA has its own line, with its queue id):
/// a device whose mail never arrives shows up in the journal. Addresses are client text, so they are written
/// escaped (`?`) and cut short.
fn log_refusal(session: &Session, reply: &Reply, logged: &mut Refusals<'_>) {
    if reply.is_positive() {
        return;
    }
    let Some((command, address, sender)) = session.last_mail_command() else {
        return;
    };
    if !logged.may_log(session.peer()) {
        return;
    }
    let shown = |a: &str| a.chars().take(256).collect::<String>();
    let text = reply.to_string();
    tracing::warn!(
        relay_event = "rejected",
        relay_client = %session.peer(),
        command,
        address = ?shown(address),
        // No transaction yet (a refused MAIL): no field, where `sender=""` read as the null sender `<>`.
        sender = sender.map(|s| tracing::field::debug(shown(s))),
        reply = %text.trim_end(),
        "command refused"
    );
}

/// The message being received, and its id for log lines even once its bytes are dropped.
struct Receiving {
    id: QueueId,
    incoming: Option<Incoming>,
    /// Why `incoming` is gone, when a write failed.
    failed: StoreFailed,
}

fn store_failed(e: &crate::queue::SpoolError) -> StoreFailed {
    if e.is_full() {
        StoreFailed::Full
    } else {
        StoreFailed::Other
    }
}

async fn drive<S: AsyncRead + AsyncWrite + Unpin>(
    ctx: &ListenerCtx,
    session: &mut Session,
    mut stream: S,
    greeting: Option<Reply>,
    seat: &Seat,
    budgets: &SessionBudgets,
) -> std::io::Result<Outcome<S>> {
    let peer = session.peer();
    let tls = session.is_tls();
    // Read with read_buf into spare capacity: no zeroing of 64 KiB per connection.
    let mut buf: Vec<u8> = Vec::with_capacity(READ_BUF);
    let mut pos = 0;
    let mut out: Vec<u8> = greeting.map(|g| g.to_wire()).unwrap_or_default();
    // Taken at the first message's data, not before: an idle or command-only session (a flood of them included)
    // holds the read buffer alone.
    let mut body = Vec::new();
    let mut receiving_msg: Option<Receiving> = None;
    let mut refusals_logged = Refusals {
        logged: 0,
        budget: &budgets.commands,
        listener: ctx.cfg.address,
    };
    let mut shutdown = ctx.shutdown.clone();
    let mut abandon = ctx.abandon.clone();
    let mut stress = seat.stress();
    // A command must arrive whole within its timeout, however it trickles in: counted from the last reply.
    let mut waiting_since = std::time::Instant::now();
    // When the message being received began, and its bytes so far.
    let mut data_progress: Option<(std::time::Instant, u64)> = None;

    loop {
        // Replies to a long pipelined burst are sent as they pile up, so this buffer stays small (RFC 2920 lets
        // a server send them at any point).
        if out.len() >= MAX_PENDING_REPLIES {
            write_out(&mut stream, &mut out, write_limit(ctx, &stress)).await?;
        }
        let filled = buf.len();
        let mut input = &buf[pos..];
        if session.is_receiving_data() {
            body.clear();
            body.reserve(READ_BUF + 2);
            let progress = session.feed_data(&mut input, &mut body);
            pos = filled - input.len();
            let refused = session.refusal().is_some();
            if let Some(r) = receiving_msg.as_mut() {
                if refused {
                    // Stop storing at once (and remove the partial file), but read on to the final dot.
                    if let Some(incoming) = r.incoming.take() {
                        incoming.discard().await;
                    }
                } else if let Some(incoming) = r.incoming.as_mut()
                    && let Err(e) = incoming.write(&body).await
                {
                    tracing::error!(relay_event = "rejected", relay_queue_id = %r.id, relay_client = %peer, error = %e, "cannot spool message");
                    r.failed = store_failed(&e);
                    if let Some(incoming) = r.incoming.take() {
                        incoming.discard().await;
                    }
                }
            }
            if progress == Progress::Done {
                // An LF-only client's end of data on a `reject` listener: refused, and the connection closed,
                // because the bytes after it cannot be read as commands safely.
                let bare_end = session.data_ended_by_bare_lf();
                let reply =
                    finish_message(session, receiving_msg.take(), &mut refusals_logged).await;
                if bare_end {
                    return close(&mut stream, &mut out, reply, ctx, tls).await;
                }
                out.extend_from_slice(&reply.to_wire());
                // A client sending refused message after refused message is cut off as one sending bad
                // commands is: after its refusal, the session ends.
                if let Some(bye) = session.too_many_errors() {
                    return close(&mut stream, &mut out, bye, ctx, tls).await;
                }
                continue;
            }
        } else {
            let step = session.next(&mut input);
            pos = filled - input.len();
            if let Step::Reply(reply) | Step::Close(reply) = &step {
                log_refusal(session, reply, &mut refusals_logged);
            }
            match step {
                Step::Reply(reply) => {
                    out.extend_from_slice(&reply.to_wire());
                    continue;
                }
                Step::Authenticate(creds) => {
                    let client = super::listener::canonical(peer.ip());
                    let verdict = match creds.refused {
                        Some(_) => ctx.auth.refuse(client),
                        None => {
                            ctx.auth
                                .verify(client, &creds.username, &creds.password)
                                .await
                        }
                    };
                    let step = match verdict {
                        Verdict::Accepted => {
                            tracing::info!(relay_client = %peer, user = %creds.username, mechanism = creds.mechanism, "authenticated");
                            session.auth_succeeded(creds.username)
                        }
                        // The name a client gives is logged only when it is a configured user's: anything else is
                        // client text (line breaks and terminal escapes included), and devices sometimes send the
                        // password in the name's place.
                        Verdict::Refused if ctx.auth.knows(&creds.username) => {
                            let why = creds.refused.unwrap_or("wrong password");
                            tracing::warn!(relay_event = "auth_failed", relay_client = %peer, user = %creds.username, mechanism = creds.mechanism, reason = why, "authentication failed");
                            // Slows password guessing; the client waits, nothing else does.
                            tokio::time::sleep(ctx.cfg.auth_failure_delay).await;
                            session.auth_failed()
                        }
                        Verdict::Refused => {
                            let why = creds.refused.unwrap_or("no such user (the name given is not logged: it may be a password typed in the wrong field)");
                            tracing::warn!(relay_event = "auth_failed", relay_client = %peer, mechanism = creds.mechanism, reason = why, "authentication failed");
                            // Slows password guessing; the client waits, nothing else does.
                            tokio::time::sleep(ctx.cfg.auth_failure_delay).await;
                            session.auth_failed()
                        }
                        Verdict::Busy => session.auth_unavailable(),
                        // Logged once when the block began, not for every refused attempt.
                        Verdict::Throttled => session.auth_throttled(),
                    };
                    match step {
                        Step::Close(reply) => {
                            return close(&mut stream, &mut out, reply, ctx, tls).await;
                        }
                        Step::Reply(reply) => out.extend_from_slice(&reply.to_wire()),
                        _ => {}
                    }
                    continue;
                }
                Step::Room(size) => {
                    let room = ctx.spool.has_room(size, ctx.min_free_space);
                    let reply = session.room_checked(room);
                    log_refusal(session, &reply, &mut refusals_logged);
                    out.extend_from_slice(&reply.to_wire());
                    continue;
                }
                Step::StartTls(reply) => {
                    out.extend_from_slice(&reply.to_wire());
                    write_out(&mut stream, &mut out, ctx.cfg.command_timeout).await?;
                    // RFC 3207 section 4.2: anything pipelined after STARTTLS was sent in the clear and
                    // must not be executed inside TLS (CVE-2011-0411).
                    return Ok(Outcome::StartTls(stream));
                }
                Step::Data(reply) => {
                    let id = QueueId::new();
                    let now = SystemTime::now();
                    let envelope = session.envelope(id, now);
                    let decision = match (&ctx.routing, &envelope) {
                        (Some(routing), Some(env)) => Some(routing.route(Addressing::from(env))),
                        _ => None,
                    };
                    if let (Some(decision), Some(env)) = (&decision, &envelope)
                        && decision.as_ref().is_none_or(|d| d.accounts.is_empty())
                    {
                        // Queued, it would wait out the retry schedule and end in dead/: the device is told now,
                        // with a temporary code, so that nothing is lost while the config is fixed.
                        let reply = Reply::new(
                            451,
                            "4.3.5",
                            "No account is configured for this message; try again later",
                        );
                        // The fields of every refused command's line (README, Logs), the recipients as `address`.
                        let text = reply.to_string();
                        let recipients: String =
                            env.recipients.join(",").chars().take(256).collect();
                        tracing::warn!(relay_event = "rejected", relay_client = %peer, command = "DATA", address = ?recipients, sender = ?env.sender, user = env.user.as_deref().unwrap_or(""), reply = %text.trim_end(), "message refused at DATA: no route, user account or default_account names an account for it");
                        out.extend_from_slice(&session.cancel_data(reply).to_wire());
                        continue;
                    }
                    // The route's accounts may take less than the listener: the most any of them can send.
                    if let Some(Some(d)) = &decision {
                        let most = d
                            .accounts
                            .iter()
                            .map(|n| ctx.largest.get(n).copied().unwrap_or(u64::MAX))
                            .max();
                        if let Some(most) = most.filter(|&m| m < u64::MAX) {
                            session.limit_message(most);
                        }
                    }
                    out.extend_from_slice(&reply.to_wire());
                    let mut failed = StoreFailed::Other;
                    let incoming = match envelope {
                        Some(envelope) => {
                            let mut incoming = ctx.spool.begin(&envelope);
                            let header = session.received_header(id, now);
                            match incoming.write(header.as_bytes()).await {
                                Ok(()) => Some(incoming),
                                Err(e) => {
                                    tracing::error!(relay_event = "rejected", relay_queue_id = %id, relay_client = %peer, error = %e, "cannot spool message");
                                    failed = store_failed(&e);
                                    None
                                }
                            }
                        }
                        None => None,
                    };
                    receiving_msg = Some(Receiving {
                        id,
                        incoming,
                        failed,
                    });
                    data_progress = Some((std::time::Instant::now(), 0));
                    continue;
                }
                Step::Close(reply) => return close(&mut stream, &mut out, reply, ctx, tls).await,
                Step::NeedInput => {}
            }
        }

        // Every buffered byte is used: send the replies so far (RFC 2920 lets us hold them until now) and read.
        let replied = !out.is_empty();
        write_out(&mut stream, &mut out, write_limit(ctx, &stress)).await?;
        let receiving = session.is_receiving_data();
        // A message in the middle of DATA is allowed to finish, and a logged-in device is never evicted; an idle
        // session is told to come back when relay stops, or leaves when a new client needs its place.
        let idle = !receiving;
        seat.set_idle(idle && session.user().is_none());
        let stressed = *stress.borrow_and_update();
        if replied || receiving {
            waiting_since = std::time::Instant::now();
        }
        let limit = if receiving {
            ctx.cfg.data_timeout
        } else {
            ctx.cfg.command_timeout
        };
        let limit = if stressed {
            limit.min(STRESS_TIMEOUT)
        } else {
            limit
        };
        // Under pressure a message must also keep coming at a minimum rate: a trickle of a byte every few
        // seconds would otherwise hold a place for as long as the size limit allows.
        if receiving
            && stressed
            && let Some((started, bytes)) = data_progress
            && too_slow(started.elapsed(), bytes)
        {
            tracing::info!(relay_client = %peer, bytes, "message arriving too slowly while the listener is under pressure; closing");
            let reply = Reply::new(421, "4.4.2", "Connection too slow, closing connection");
            give_up(receiving_msg.take()).await;
            return close(&mut stream, &mut out, reply, ctx, tls).await;
        }
        let deadline = tokio::time::Instant::from_std(waiting_since + limit);
        enum Woke {
            Read(std::io::Result<usize>),
            TimedOut,
            Shutdown,
            Abandoned,
            Evicted,
            Stressed,
        }
        buf.clear();
        pos = 0;
        let woke = tokio::select! {
            // read_buf is cancel safe: a read cut short by another branch loses no bytes.
            read = tokio::time::timeout_at(deadline, stream.read_buf(&mut buf)) => {
                read.map_or(Woke::TimedOut, Woke::Read)
            }
            _ = shutdown.wait_for(|stop| *stop), if idle => Woke::Shutdown,
            _ = abandon.wait_for(|gone| *gone) => Woke::Abandoned,
            _ = seat.evicted(), if idle && session.user().is_none() => Woke::Evicted,
            _ = stress.changed(), if !stressed => Woke::Stressed,
        };
        let n = match woke {
            Woke::Read(r) => {
                // Busy from the first byte of a command until its reply is out: never evicted mid-command (a
                // login waiting for its password check, a message being committed).
                seat.set_idle(false);
                let n = match r {
                    Ok(n) => n,
                    Err(e) => {
                        // A reset says as much as a close: the message the client was sending is not taken.
                        if let Some(r) = &receiving_msg {
                            tracing::info!(relay_event = "discarded", relay_queue_id = %r.id, relay_client = %peer, error = %e, "connection lost during DATA; message discarded");
                        }
                        return Err(e);
                    }
                };
                if let Some((_, bytes)) = data_progress.as_mut() {
                    *bytes += n as u64;
                }
                n
            }
            Woke::TimedOut => {
                if let Some(r) = &receiving_msg {
                    // A device ending its data with `LF . LF` while its commands end with CRLF waits here: under
                    // lenient that is text, never its end (SMTP smuggling); its log line says so.
                    let hint = bare_hint(session);
                    tracing::info!(relay_event = "discarded", relay_queue_id = %r.id, relay_client = %peer, "no end of data within data_timeout; message discarded{hint}");
                }
                let reply = Reply::new(421, "4.4.2", "Timeout, closing connection");
                give_up(receiving_msg.take()).await;
                return close(&mut stream, &mut out, reply, ctx, tls).await;
            }
            Woke::Shutdown => {
                let reply = Reply::new(421, "4.3.2", "Service shutting down, try again later");
                return close(&mut stream, &mut out, reply, ctx, tls).await;
            }
            Woke::Abandoned => {
                if let Some(r) = &receiving_msg {
                    tracing::info!(relay_queue_id = %r.id, relay_client = %peer, "shutting down: the message being received is not taken (421; the client sends it again)");
                }
                give_up(receiving_msg.take()).await;
                let reply = Reply::new(421, "4.3.2", "Service shutting down, try again later");
                return close(&mut stream, &mut out, reply, ctx, tls).await;
            }
            Woke::Evicted => {
                if may_log(&budgets.evictions, ctx.cfg.address) {
                    tracing::info!(relay_event = "evicted", relay_client = %peer, listener = %ctx.cfg.address, "idle connection closed to make room for a new client");
                }
                let reply = Reply::new(
                    421,
                    "4.7.0",
                    "Server busy, closing idle connection; try again later",
                );
                return close(&mut stream, &mut out, reply, ctx, tls).await;
            }
            // The listener came under pressure: wait again, with the shorter timeout.
            Woke::Stressed => continue,
        };
        if n == 0 {
            if let Some(r) = receiving_msg {
                // A device that sent `LF . LF` and hung up without waiting for an answer ends here.
                let hint = bare_hint(session);
                tracing::info!(relay_event = "discarded", relay_queue_id = %r.id, relay_client = %peer, "connection closed during DATA; message discarded{hint}");
            }
            return Ok(Outcome::Closed);
        }
    }
}

/// What a discarded message's log line adds when its body had bare line ends: which `bare_lf` the device needs.
fn bare_hint(session: &Session) -> &'static str {
    if !session.data_saw_bare() {
        ""
    } else if session.commands_end_with_lf() {
        "; this client ends its lines with LF alone, and so its data with LF . LF, which only bare_lf = \"lenient\" takes as the end (on a listener whose allow list holds only private addresses); elsewhere it is text, or refused under \"reject\""
    } else {
        "; the body had lines ended by a bare LF or CR: only CRLF . CRLF ends the data of a client whose commands end with CRLF"
    }
}

/// How long a client may take to read its replies: under pressure a client that does not read holds a place
/// too, so it gets the short timeout.
fn write_limit(ctx: &ListenerCtx, stress: &watch::Receiver<bool>) -> Duration {
    if *stress.borrow() {
        ctx.cfg.command_timeout.min(STRESS_TIMEOUT)
    } else {
        ctx.cfg.command_timeout
    }
}

/// Under pressure, a message in DATA for over [`SLOW_GRACE`] must average [`MIN_RATE`] bytes a second.
const SLOW_GRACE: Duration = Duration::from_secs(30);
const MIN_RATE: u64 = 1024;

fn too_slow(elapsed: Duration, bytes: u64) -> bool {
    elapsed > SLOW_GRACE && bytes < MIN_RATE.saturating_mul(elapsed.as_secs())
}

/// A message given up before its final dot (the connection is closed with a 421): its partial file is removed
/// before the reply, off the runtime's thread.
async fn give_up(receiving: Option<Receiving>) {
    if let Some(incoming) = receiving.and_then(|r| r.incoming) {
        incoming.discard().await;
    }
}

/// The final dot has arrived: store the message, or say why not.
async fn finish_message(
    session: &mut Session,
    receiving: Option<Receiving>,
    logged: &mut Refusals<'_>,
) -> Reply {
    let peer = session.peer();
    let Some(Receiving {
        id,
        incoming,
        failed,
    }) = receiving
    else {
        return session.data_stored(Err(StoreFailed::Other));
    };
    if let Some(refusal) = session.refusal() {
        if logged.may_log(peer) {
            // Refused for bare line ends (a listener under `reject`): the line says what a device that needs them
            // can be given.
            let hint = if session.refused_for_bare_line_ends() {
                "; a trusted device that needs bare line ends can be given its own listener with bare_lf = \"lenient\" or \"normalize\" (see relay.example.toml)"
            } else {
                ""
            };
            tracing::warn!(relay_event = "rejected", relay_queue_id = %id, relay_client = %peer, reply = %refusal.to_string().trim_end(), "message refused{hint}");
        }
        if let Some(incoming) = incoming {
            incoming.discard().await;
        }
        return session.data_refused();
    }
    let Some(incoming) = incoming else {
        // Already logged where the write failed.
        return session.data_stored(Err(failed));
    };
    let (size, user) = (incoming.len(), session.user().unwrap_or("").to_string());
    let committing = std::time::Instant::now();
    match incoming.commit().await {
        Ok(id) => {
            let latency = committing.elapsed();
            crate::events::emit(crate::events::Event::Accepted { latency });
            tracing::info!(
                relay_event = "accepted",
                relay_queue_id = %id,
                relay_client = %peer,
                size,
                user = %user,
                "message queued"
            );
            session.data_stored(Ok(id))
        }
        Err(e) => {
            tracing::error!(relay_event = "rejected", relay_queue_id = %id, relay_client = %peer, error = %e, "cannot queue message");
            session.data_stored(Err(store_failed(&e)))
        }
    }
}

async fn write_out<S: AsyncWrite + Unpin>(
    stream: &mut S,
    out: &mut Vec<u8>,
    limit: Duration,
) -> std::io::Result<()> {
    if out.is_empty() {
        return Ok(());
    }
    timeout(limit, async {
        stream.write_all(out).await?;
        stream.flush().await
    })
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "client stopped reading"))??;
    out.clear();
    Ok(())
}

/// Sends the last reply. TLS is closed with its close_notify; a plain connection is left to its close, which
/// sends the FIN as a `shutdown` would (a system call less per connection: most devices send one message per
/// connection). Unread input makes that close a reset either way.
async fn close<S: AsyncWrite + Unpin>(
    stream: &mut S,
    out: &mut Vec<u8>,
    reply: Reply,
    ctx: &ListenerCtx,
    tls: bool,
) -> std::io::Result<Outcome<S>> {
    out.extend_from_slice(&reply.to_wire());
    write_out(stream, out, ctx.cfg.command_timeout).await?;
    if tls {
        // A client that stopped reading must not hold its place (or a stop's drain) with the close_notify.
        let _ = timeout(
            ctx.cfg.command_timeout.min(STRESS_TIMEOUT),
            stream.shutdown(),
        )
        .await;
    }
    Ok(Outcome::Closed)
}
