//! Delivery to Microsoft 365 / Gmail over SMTP with AUTH XOAUTH2.
//!
//! Our own client rather than lettre's, because delivery speed hangs on what lettre does not do: it sends a
//! NOOP before every message on a pooled connection, one command per round trip, and the body and the final
//! dot in two writes on a socket without TCP_NODELAY (so the dot waits for the peer's delayed ACK); and it needs
//! the whole message in memory. Here (`conn.rs`) MAIL, RCPT… and DATA go in one write when the server offers
//! PIPELINING, and the body is streamed from the queue file in large writes with the terminator in the last.
//! Replies are parsed with smtp-proto (`reply.rs`), DATA's transparency is `dot.rs`, and which certificates are
//! trusted `trust.rs`.
//!
//! Connections are pooled per account, at most `max_connections` (the delivery slots of the account bound how
//! many are in use). An idle connection is reused as it is, with no NOOP first: a NOOP costs a round trip per
//! message and tells nothing the first command's reply does not. A reused connection found dead before the
//! server answered anything (closed, reset, 421) is replaced by a fresh one for the same attempt: nothing of
//! the message was taken, and it is not the message's failure, so it is not counted as one.

mod conn;
mod dial;
mod dot;
mod reach;
mod reply;
mod trust;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use secrecy::{ExposeSecret, SecretString};

use super::outgoing::Outgoing;
use super::transcript::TranscriptHandle;
use super::{MailFlags, Outcome, Refusal};
use crate::oauth::Endpoints;
use conn::{Conn, Failure, SendFailure, Sent, Settings};
pub use reach::Reachability;
use reach::{Before, CameBack, Reach, Try, WentDown};
pub use reply::Reply;

/// Default for `smtp_timeout`: per step (connect, each reply), not for the whole message.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// The wait for the reply to the final dot unless `smtp_timeout` is set: RFC 5321 section 4.5.3.2.6 asks for 10
/// minutes, because a client that gives up while the server is still taking the message (scanning a large one)
/// sends it again, a duplicate.
pub const FINAL_REPLY: Duration = Duration::from_secs(600);
/// An idle connection older than this is closed rather than reused (servers drop idle ones after a minute or
/// so, Microsoft's after about ten).
const STALE: Duration = Duration::from_secs(60);

/// One account's SMTP upstream.
/// Only reached if DATA, tried after a refused BDAT, is somehow refused as BDAT was.
const BDAT_THEN_DATA_FAILED: &str = "the upstream did not know BDAT, and then failed through DATA";

pub struct SmtpUpstream {
    /// The account's name, for the journal's `RELAY_ACCOUNT`.
    account: String,
    mailbox: String,
    settings: Settings,
    /// Idle connections, the most recently used last, with the hash of the token each authenticated with.
    idle: Mutex<Vec<(blake3::Hash, Conn)>>,
    max_idle: usize,
    /// Whether BDAT may be used, after the server offered CHUNKING and then did not take it.
    chunking: Mutex<Chunking>,
    /// Connections open now (connected, logging in, in use or idle in the pool): what the server counts against
    /// its limits.
    open: Arc<std::sync::atomic::AtomicUsize>,
    /// Whether it answers connections (`reach.rs`).
    reach: Reach,
    /// Set when it answers again after it did not: since when it did not (taken by the delivery, which has the
    /// mail deferred meanwhile tried at once).
    came_back: Mutex<Option<Instant>>,
    /// While it is down and idle: when [`Self::check_reach`] may try it next, and the pause that was.
    idle_check: Mutex<Option<(Instant, Duration)>>,
}

/// The first pause between checks of a down upstream that no mail tries, and the longest.
const IDLE_CHECK_FIRST: Duration = Duration::from_secs(10);
const IDLE_CHECK_MAX: Duration = Duration::from_secs(300);

/// What BDAT has shown on this upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunking {
    /// Used wherever offered.
    Usable,
    /// Refused in words (500, 502, 504): DATA until a restart or a reload.
    Refused,
    /// A hang-up during a BDAT upload, which may have been a network fault rather than a server that reads the
    /// chunk as commands: DATA until then, then BDAT again.
    DoubtfulUntil(Instant),
}

/// How long a hang-up during a BDAT upload keeps an upstream on DATA: long enough that a server that really does
/// not know BDAT costs a failed upload an hour (one per delivery in flight when the hour ends; such a server read
/// the chunk as commands, so nothing arrives twice), short enough that one network fault does not cost the rest
/// of the daemon's life an extra round trip per message.
const CHUNKING_DOUBT: Duration = Duration::from_secs(3600);

/// Puts an upstream on DATA for [`chunking_doubt`], said once.
fn doubt(chunking: &mut Chunking, mailbox: &str, why: &str) {
    let doubt = chunking_doubt();
    let until = Instant::now().checked_add(doubt);
    *chunking = until.map_or(Chunking::Refused, Chunking::DoubtfulUntil);
    tracing::warn!(relay_account_mailbox = %mailbox, relay_upstream_reply = %why, "sending with DATA for the next {}", humantime::format_duration(doubt));
}

/// [`CHUNKING_DOUBT`]; `RELAY_TEST_CHUNKING_DOUBT_MS` in a test, so that it sees BDAT come back.
fn chunking_doubt() -> Duration {
    crate::test_hooks::duration("RELAY_TEST_CHUNKING_DOUBT_MS", CHUNKING_DOUBT)
}

/// How long a pooled connection may stay idle: [`STALE`]; `RELAY_TEST_IDLE_MS` in a test, so that it sees an
/// idle connection closed.
fn stale() -> Duration {
    crate::test_hooks::duration("RELAY_TEST_IDLE_MS", STALE)
}

impl SmtpUpstream {
    /// `ca`: PEM certificates to trust instead of the system's (tests, private upstreams). `hostname`: relay's
    /// own name (the config's `hostname`), given in EHLO.
    pub fn new(
        hostname: &str,
        account: &str,
        mailbox: String,
        endpoints: Endpoints,
        ca: Option<Vec<u8>>,
        smtp_timeout: Option<Duration>,
        max_connections: usize,
    ) -> Result<SmtpUpstream, String> {
        let tls_config = trust::client_config(ca.as_deref())?;
        // A zero timeout would fail every attempt; a huge one would hold a delivery slot for good.
        let clamp = |t: Duration| t.clamp(Duration::from_secs(1), Duration::from_secs(600));
        let timeout = clamp(smtp_timeout.unwrap_or(DEFAULT_TIMEOUT));
        Ok(SmtpUpstream {
            account: account.to_string(),
            mailbox,
            settings: Settings {
                host: endpoints.smtp_host,
                port: endpoints.smtp_port,
                tls: endpoints.smtp_tls,
                tls_config: Arc::new(tls_config),
                timeout,
                // An `smtp_timeout` set in the config is what the admin wants for every reply.
                final_reply: smtp_timeout.map_or(FINAL_REPLY, clamp),
                helo: helo_name(hostname),
            },
            idle: Mutex::new(Vec::new()),
            max_idle: max_connections.max(1),
            chunking: Mutex::new(Chunking::Usable),
            open: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
            reach: Reach::default(),
            came_back: Mutex::new(None),
            idle_check: Mutex::new(None),
        })
    }

    /// Sends the message (lines over 998 octets wrapped on the way, see `long_lines`) from `sender` to
    /// `recipients`. `offered` is set once MAIL goes out on a connection; a failure to connect or log in leaves it
    /// as it was (nothing was offered, for the sending limits).
    pub async fn send(
        &self,
        token: &SecretString,
        sender: &str,
        recipients: &[String],
        message: &Outgoing,
        flags: MailFlags,
        offered: &std::sync::atomic::AtomicBool,
    ) -> Outcome {
        let offering = || offered.store(true, std::sync::atomic::Ordering::Relaxed);
        let (sender, wire) = match envelope(sender, recipients) {
            Ok(e) => e,
            Err(reply) => return Outcome::Permanent(reply),
        };
        let key = blake3::hash(token.expose_secret().as_bytes());
        // With the task's cooperative budget used up, no pooled connection could be seen to be quiet
        // (`Conn::is_quiet`) and each would be dropped: a yield renews the budget.
        if !tokio::task::coop::has_budget_remaining() {
            tokio::task::yield_now().await;
        }
        // Set once BDAT failed in this attempt: the message goes again through DATA, whatever the upstream's
        // state says by then.
        let mut data_only = false;
        if let Some(mut conn) = self.reusable(key) {
            self.fit(&mut conn);
            offering();
            match send_fitted(&mut conn, &sender, &wire, message, flags).await {
                Ok(sent) => {
                    self.give_back(key, conn);
                    return delivered(sent, recipients);
                }
                // Dead before it answered anything: the message goes on a fresh connection, in this attempt. A
                // hang-up during a BDAT upload on a pooled connection is first of all that (the server closed an
                // idle connection meanwhile); a fresh one tells whether BDAT is at fault.
                Err(f)
                    if f.unanswered
                        || matches!(
                            f.failure,
                            Failure::ChunkingRefused {
                                definite: false,
                                ..
                            }
                        ) =>
                {
                    tracing::debug!(relay_account_mailbox = %self.mailbox, reason = ?f.failure, "a pooled upstream connection was dead; opening a fresh one");
                }
                Err(f) if self.chunking_refused(&f) => data_only = true,
                Err(f) => return self.failed(key, conn, f, recipients),
            }
        }
        // Twice at most: a BDAT the server did not know is sent again through DATA, in this attempt.
        for _ in 0..2 {
            let mut conn = match self.fresh(token).await {
                Ok(c) => c,
                Err(o) => return o,
            };
            self.fit(&mut conn);
            if data_only {
                conn.forget_chunking();
            }
            offering();
            match send_fitted(&mut conn, &sender, &wire, message, flags).await {
                Ok(sent) => {
                    self.give_back(key, conn);
                    return delivered(sent, recipients);
                }
                Err(f) if self.chunking_refused(&f) => data_only = true,
                Err(f) => return self.failed(key, conn, f, recipients),
            }
        }
        Outcome::Transient(BDAT_THEN_DATA_FAILED.into())
    }

    /// A fresh connection, logged in; not tried while the upstream did not answer a moment ago, and one at a
    /// time until it answers again (`reach.rs`).
    async fn fresh(&self, token: &SecretString) -> Result<Conn, Outcome> {
        // (The delivery asks before it takes the account; this is for attempts that raced another's failure.)
        let tried = match self.reach.before(Instant::now()) {
            Before::Connect(t) => t,
            Before::NotNow(reply, r) => {
                let until = match r {
                    Reachability::Held(until) => Some(until),
                    _ => None,
                };
                return Err(Outcome::Unreachable { reply, until });
            }
        };
        let conn = Conn::connect(&self.settings, None, Some(&self.open)).await;
        let now = Instant::now();
        let conn = match conn {
            Ok(c) => {
                self.answered(tried, now);
                c
            }
            Err(f) if f.answered => {
                self.answered(tried, now);
                return Err(outcome(f.failure));
            }
            Err(f) => {
                let failed = outcome(f.failure);
                let probe = tried.is_probe();
                if let Some(WentDown(why)) =
                    tried.unanswered(now, self.settings.timeout, failed.reply())
                {
                    tracing::warn!(relay_event = "upstream_unreachable", relay_account = %self.account, relay_account_mailbox = %self.mailbox, upstream = %self.endpoint(), reason = %why, "the upstream cannot be reached (its connection was refused, went unanswered or its name did not resolve: see reason); until it answers, one connection at a time tries it, and the account's other mail waits in the queue, untried, for as long as the last try took (a few seconds at least)");
                    return Err(failed);
                }
                // A probe of an upstream already known to be down, still down: the account's news, said when the
                // outage began, not the message's. It waits with the others (no attempt, no retry step, no line),
                // instead of one message after another being deferred every couple of seconds all outage long.
                if probe && let Reachability::Held(until) = self.reach.now(Instant::now()) {
                    tracing::debug!(relay_account = %self.account, reason = %failed.reply(), "the upstream still cannot be reached");
                    return Err(Outcome::Unreachable {
                        reply: failed.reply().to_string(),
                        until: Some(until),
                    });
                }
                return Err(failed);
            }
        };
        conn.login(&self.settings, &self.mailbox, token)
            .await
            .map_err(outcome)
    }

    /// While the upstream is down and no message is there to try it (its mail expired, was deleted, or went
    /// another way): one connection that only reads the greeting and says QUIT, when the hold is over and no
    /// other try is under way, so that its coming back is seen (and `relay status` stops saying it is down)
    /// without waiting for the next message. Nothing if it is up, held, or being tried.
    ///
    /// Not more often than [`IDLE_CHECK_FIRST`] at first, the pause doubling up to [`IDLE_CHECK_MAX`] while it
    /// stays down: a long outage of an idle relay costs a connection every few minutes.
    ///
    /// Whether it greeted with 220 (an answer that refuses, a 421 or 554 greeting or a failed TLS handshake, ends
    /// the outage too, but says nothing good about the upstream).
    pub async fn check_reach(&self) -> bool {
        let now = Instant::now();
        let next = match self.idle_check.lock() {
            Ok(c) => *c,
            Err(_) => return false,
        };
        if next.is_some_and(|(at, _)| now < at) {
            return false;
        }
        let tried = match self.reach.before(now) {
            Before::Connect(t) if t.is_probe() => t,
            _ => return false,
        };
        let (answered, greeted) = match Conn::connect(&self.settings, None, Some(&self.open)).await
        {
            Ok(conn) => {
                self.answered(tried, Instant::now());
                conn.quit().await;
                (true, true)
            }
            Err(f) if f.answered => {
                self.answered(tried, Instant::now());
                (true, false)
            }
            Err(f) => {
                let failed = outcome(f.failure);
                tracing::debug!(relay_account = %self.account, reason = %failed.reply(), "the upstream still cannot be reached");
                let _ = tried.unanswered(Instant::now(), self.settings.timeout, failed.reply());
                (false, false)
            }
        };
        if let Ok(mut c) = self.idle_check.lock() {
            *c = (!answered).then(|| {
                let pause = next.map_or(IDLE_CHECK_FIRST, |(_, p)| (p * 2).min(IDLE_CHECK_MAX));
                (Instant::now() + pause, pause)
            });
        }
        greeted
    }

    /// Whether a connection may be tried now (`reach.rs`).
    pub fn reachability(&self, now: Instant) -> Reachability {
        self.reach.now(now)
    }

    /// `host:port`, for reports.
    pub fn endpoint(&self) -> String {
        format!("{}:{}", self.settings.host, self.settings.port)
    }

    /// While it does not answer: for how long so far, and why its last connection failed.
    pub fn outage(&self, now: Instant) -> Option<(std::time::Duration, String)> {
        self.reach.outage(now)
    }

    /// `relay queue retry`: the next attempt tries the upstream instead of waiting for the hold after an
    /// unanswered connection to end. Whether there was a hold.
    pub fn lift_hold(&self) -> bool {
        if let Ok(mut c) = self.idle_check.lock() {
            *c = None;
        }
        self.reach.lift(Instant::now())
    }

    /// Since when it did not answer, if it answers again since this was last asked.
    pub fn take_came_back(&self) -> Option<Instant> {
        self.came_back.lock().ok()?.take()
    }

    fn answered(&self, tried: Try<'_>, now: Instant) {
        if let Ok(mut c) = self.idle_check.lock() {
            *c = None;
        }
        if let Some(CameBack(down)) = tried.answered(now) {
            if let Ok(mut c) = self.came_back.lock() {
                let since = now.checked_sub(down).unwrap_or(now);
                *c = Some(c.map_or(since, |s: Instant| s.min(since)));
            }
            tracing::warn!(relay_event = "upstream_reachable", relay_account = %self.account, relay_account_mailbox = %self.mailbox, upstream = %self.endpoint(), "the upstream can be reached again (a connection was answered), after {} without", humantime::format_duration(Duration::from_secs(down.as_secs())));
        }
    }

    /// Connections to this upstream open now, in use or idle.
    pub fn open_connections(&self) -> usize {
        self.open.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// What this server has shown it cannot do, applied to a connection before a message.
    fn fit(&self, conn: &mut Conn) {
        let Ok(mut chunking) = self.chunking.lock() else {
            return;
        };
        let allowed = match *chunking {
            Chunking::Usable => true,
            Chunking::DoubtfulUntil(until) if Instant::now() >= until => {
                *chunking = Chunking::Usable;
                tracing::info!(relay_account_mailbox = %self.mailbox, "trying CHUNKING (BDAT) again after the hang-up during a BDAT upload that put this upstream on DATA");
                true
            }
            Chunking::Refused | Chunking::DoubtfulUntil(_) => false,
        };
        conn.allow_chunking(allowed);
    }

    /// Whether `f` is a BDAT the server did not know, noted (and said once) so that DATA is used from now on (for
    /// an hour only after a hang-up, which may have been a network fault).
    fn chunking_refused(&self, f: &SendFailure) -> bool {
        let Failure::ChunkingRefused { why, definite } = &f.failure else {
            return false;
        };
        let Ok(mut chunking) = self.chunking.lock() else {
            return true;
        };
        let was = *chunking;
        match (was, definite) {
            (Chunking::Refused, _) => {}
            (_, true) => {
                *chunking = Chunking::Refused;
                tracing::warn!(relay_account_mailbox = %self.mailbox, relay_upstream_reply = %why, "the upstream offers CHUNKING but did not know BDAT (a middlebox rewriting SMTP?); sending with DATA from now on");
            }
            (Chunking::DoubtfulUntil(_), false) => {}
            (Chunking::Usable, false) => doubt(&mut chunking, &self.mailbox, why),
        }
        true
    }

    /// A hang-up after a whole message went through BDAT, unanswered ([`Failure::DroppedAfterBdat`]): the message
    /// is deferred, and its next attempt, like the account's other mail for a while, goes through DATA, so that a
    /// server (or a middlebox) that silently drops BDAT does not refuse every attempt of every message for good.
    fn doubt_after(&self, f: &SendFailure) {
        let Failure::DroppedAfterBdat(why) = &f.failure else {
            return;
        };
        if let Ok(mut chunking) = self.chunking.lock()
            && *chunking == Chunking::Usable
        {
            doubt(&mut chunking, &self.mailbox, why);
        }
    }

    /// `relay test`: one message on a fresh connection that is not pooled, every line into `transcript`.
    pub async fn send_traced(
        &self,
        token: &SecretString,
        sender: &str,
        recipients: &[String],
        message: &Outgoing,
        transcript: TranscriptHandle,
    ) -> Outcome {
        let (sender, wire) = match envelope(sender, recipients) {
            Ok(e) => e,
            Err(reply) => return Outcome::Permanent(reply),
        };
        // As a delivery does: a BDAT the server did not know is sent again through DATA, on a fresh connection,
        // so that the test shows what the daemon would do rather than a failure it would get past.
        for data_only in [false, true] {
            let mut conn = match Conn::open(
                &self.settings,
                &self.mailbox,
                token,
                Some(transcript.clone()),
                None,
            )
            .await
            {
                Ok(c) => c,
                Err(f) => return outcome(f),
            };
            if data_only {
                conn.forget_chunking();
            }
            let (out, in_step) = match send_fitted(
                &mut conn,
                &sender,
                &wire,
                message,
                MailFlags::OWN,
            )
            .await
            {
                Ok(sent) => (delivered(sent, recipients), true),
                Err(f) if !data_only && matches!(f.failure, Failure::ChunkingRefused { .. }) => {
                    if let Ok(mut t) = transcript.lock() {
                        t.note("the upstream offers CHUNKING but did not know BDAT: sending again with DATA, as relay serve does");
                    }
                    continue;
                }
                Err(f) => (outcome(f.failure), f.reusable),
            };
            // As a delivery does: a connection that is not where a command may follow (a server that said 354
            // with every recipient refused waits for data, not for QUIT) is closed without a word.
            if in_step {
                conn.quit().await;
            }
            return out;
        }
        Outcome::Transient(BDAT_THEN_DATA_FAILED.into())
    }

    /// The most recently used idle connection for this token; older ones and those of another token are
    /// closed.
    fn reusable(&self, key: blake3::Hash) -> Option<Conn> {
        // Still no budget: the pool is left as it is for the next message.
        if !tokio::task::coop::has_budget_remaining() {
            return None;
        }
        loop {
            let (k, mut conn) = self.idle.lock().ok()?.pop()?;
            // A new token means the old one is being replaced (refreshed, or refused): its sessions go too.
            if k == key && conn.last_used.elapsed() <= stale() {
                if conn.is_quiet() {
                    return Some(conn);
                }
                tracing::debug!(relay_account_mailbox = %self.mailbox, "a pooled upstream connection was closed or sent something unasked while idle; not used again");
                continue;
            }
            tokio::spawn(conn.quit());
        }
    }

    /// Closes the pooled connections idle for longer than [`STALE`] (QUIT, in a task of its own) and drops those
    /// the server closed meanwhile: called every couple of seconds, so that an account with nothing to send holds
    /// no session the upstream counts against it (Exchange Online allows few per mailbox) and no socket the
    /// server has closed. Before, they were closed only when the next message came, beside the fresh ones it
    /// opened.
    pub fn close_idle(&self) {
        // Without budget no connection could be seen to be quiet, and each would be dropped.
        if !tokio::task::coop::has_budget_remaining() {
            return;
        }
        let mut closing = Vec::new();
        if let Ok(mut idle) = self.idle.lock() {
            let before = idle.len();
            // In their order: the last is the one used last, which `reusable` takes first.
            for (key, mut conn) in std::mem::take(&mut *idle) {
                if conn.last_used.elapsed() > stale() {
                    closing.push(conn);
                } else if !tokio::task::coop::has_budget_remaining() || conn.is_quiet() {
                    // (Each look at a socket uses budget: once it is gone, the rest are kept unlooked-at.)
                    idle.push((key, conn));
                }
            }
            if idle.len() < before {
                tracing::debug!(relay_account_mailbox = %self.mailbox, closed = before - idle.len(), "idle upstream connections closed");
            }
        }
        for conn in closing {
            tokio::spawn(conn.quit());
        }
    }

    fn give_back(&self, key: blake3::Hash, conn: Conn) {
        // Bytes the server sent beyond its last reply would be read as the answers to the next commands.
        if !conn.is_clean() {
            return;
        }
        if let Ok(mut idle) = self.idle.lock()
            && idle.len() < self.max_idle
        {
            idle.push((key, conn));
        }
    }

    /// `recipients`: as the queue gave them, for a refusal of each ([`each_refused`]).
    fn failed(
        &self,
        key: blake3::Hash,
        conn: Conn,
        f: SendFailure,
        recipients: &[String],
    ) -> Outcome {
        self.doubt_after(&f);
        if f.reusable {
            self.give_back(key, conn);
        }
        match f.failure {
            Failure::EachRefused {
                standing,
                each,
                after_data,
            } => each_refused(standing, each, after_data, recipients),
            other => outcome(other),
        }
    }
}

/// Sends on `conn`, the envelope fitted to a server without SMTPUTF8 where needed (RFC 6531 section 3.2): a
/// Unicode domain goes in its ASCII form (IDNA), a recipient whose local part is not ASCII is refused for good
/// (`553 5.6.7`, in relay's words) while the others get the message, and a sender whose local part is not ASCII
/// fails the whole message, unsent.
async fn send_fitted(
    conn: &mut Conn,
    sender: &str,
    wire: &[String],
    message: &Outgoing,
    flags: MailFlags,
) -> Result<Sent, SendFailure> {
    if conn.offers_smtputf8() || (sender.is_ascii() && wire.iter().all(|r| r.is_ascii())) {
        return conn.send(sender, wire, message, flags).await;
    }
    const WHY: &str = "needs SMTPUTF8, which the upstream server does not offer (RFC 6531)";
    let unsendable = |what: String| SendFailure {
        failure: Failure::Unsupported(format!("5.6.7 {what} {WHY}")),
        unanswered: false,
        reusable: true,
    };
    let Some(ascii_sender) = ascii_address(sender) else {
        return Err(unsendable(format!(
            "the sender <{sender}> has a non-ASCII local part, which"
        )));
    };
    let mut sendable = Vec::new();
    let mut index = Vec::new();
    let mut refused = Vec::new();
    for (i, r) in wire.iter().enumerate() {
        match ascii_address(r) {
            Some(a) => {
                sendable.push(a);
                index.push(i);
            }
            None => refused.push((
                i,
                reply::Reply {
                    code: 553,
                    status: Some([5, 6, 7]),
                    text: format!("a non-ASCII local part {WHY}"),
                },
            )),
        }
    }
    if sendable.is_empty() {
        return Err(unsendable(
            "every recipient has a non-ASCII local part, which".into(),
        ));
    }
    let renumbered = |each: Vec<(usize, reply::Reply)>, refused| {
        each.into_iter()
            .filter_map(|(j, r)| Some((*index.get(j)?, r)))
            .chain(refused)
            .collect()
    };
    match conn.send(&ascii_sender, &sendable, message, flags).await {
        Ok(mut sent) => {
            sent.refused = renumbered(sent.refused, refused);
            Ok(sent)
        }
        Err(SendFailure {
            failure:
                Failure::EachRefused {
                    standing,
                    each,
                    after_data,
                },
            unanswered,
            reusable,
        }) => Err(SendFailure {
            failure: Failure::EachRefused {
                standing,
                each: renumbered(each, refused),
                after_data,
            },
            unanswered,
            reusable,
        }),
        Err(f) => Err(f),
    }
}

/// `a` with its domain in ASCII (IDNA); `None` when its local part is not ASCII, which only SMTPUTF8 can carry.
fn ascii_address(a: &str) -> Option<String> {
    if a.is_ascii() {
        return Some(a.to_string());
    }
    let (local, domain) = a.rsplit_once('@')?;
    if !local.is_ascii() {
        return None;
    }
    let domain = idna::domain_to_ascii(domain).ok()?;
    Some(format!("{local}@{domain}"))
}

/// A message the server took: for every recipient, or for some (`recipients` as the queue gave them, so that
/// the refused ones are named as in the envelope, not as quoted on the wire).
fn delivered(sent: Sent, recipients: &[String]) -> Outcome {
    let reply = sent.reply.to_string();
    if sent.refused.is_empty() {
        return Outcome::Delivered(reply);
    }
    let refused = sent
        .refused
        .into_iter()
        .filter_map(|(i, r)| {
            Some(Refusal {
                recipient: recipients.get(i)?.clone(),
                // A quota refusal of some recipients: they wait for the retry schedule, as for a 4xx.
                permanent: conn::refused_for_good(&r) && !quota_used_up(&r),
                reply: r.to_string(),
            })
        })
        .collect();
    Outcome::Partial { reply, refused }
}

/// Every recipient refused. Where any is refused for good, each gets its own outcome: those refused for good are
/// bounced now, each with its own reply, and the others wait (they all waited, for days until `max_age`, on one
/// 4xx). Otherwise one reply decides for the whole message, as it always did: all refused for now (deferred, as
/// the recipients' trouble), or a refusal about the account rather than a recipient (a login, a quota, a
/// concurrency limit), which is then the one that decides. `after_data`: the message itself was refused for good
/// after some recipients were taken, and fails for all of them, each with its own reason (see
/// [`Failure::EachRefused`]).
fn each_refused(
    standing: reply::Reply,
    each: Vec<(usize, reply::Reply)>,
    after_data: bool,
    recipients: &[String],
) -> Outcome {
    let about_the_account =
        |r: &reply::Reply| r.code == 530 || quota_used_up(r) || concurrency_limit(r);
    if let Some((_, r)) = each.iter().find(|(_, r)| about_the_account(r)) {
        return outcome(Failure::Refused(r.clone()));
    }
    // The message refused for good after some recipients were taken: it failed for all of them, as it always
    // did; each is bounced with its own reason.
    if after_data {
        let refused = each
            .into_iter()
            .filter_map(|(i, r)| {
                Some(Refusal {
                    recipient: recipients.get(i)?.clone(),
                    permanent: true,
                    reply: r.to_string(),
                })
            })
            .collect();
        return Outcome::Refused {
            reply: standing.to_string(),
            refused,
        };
    }
    if each.len() != recipients.len() {
        return outcome(Failure::Refused(standing));
    }
    if !each.iter().any(|(_, r)| conn::refused_for_good(r)) {
        return Outcome::RecipientsDeferred(standing.to_string());
    }
    let refused = each
        .into_iter()
        .filter_map(|(i, r)| {
            Some(Refusal {
                recipient: recipients.get(i)?.clone(),
                permanent: conn::refused_for_good(&r),
                reply: r.to_string(),
            })
        })
        .collect();
    Outcome::Refused {
        reply: standing.to_string(),
        refused,
    }
}

/// How long an account pauses after its provider said its sending quota is used up: the quotas count the last 24
/// hours, so an hour later some of it has usually come back; the account's mail then goes again.
const QUOTA_PAUSE: Duration = crate::upstream::QUOTA_PAUSE;

/// Gmail's `550 5.4.5 Daily user sending limit exceeded` (and its relay and quota variants), Exchange Online's
/// `554 5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException` and `550 5.1.90 … your daily
/// limit for message recipients`.
fn quota_used_up(r: &reply::Reply) -> bool {
    let text = r.text.to_ascii_lowercase();
    let status = r.status.map(|[a, b, c]| (a, b, c));
    (matches!(status, Some((5, 4, 5) | (5, 1, 90))) && text.contains("daily"))
        || text.contains("submissionquotaexceeded")
}

/// A 421 to the greeting, EHLO or STARTTLS that says the server takes no more connections from this client:
/// Postfix's "too many connections from …", Exim's "Too many concurrent SMTP connections", Sendmail's "Too many
/// open connections", Microsoft's "The maximum number of concurrent server connections has exceeded a limit".
/// Not any 421 (a server going down for maintenance says 421 too, and then fewer connections would not help).
fn connection_limit(r: &reply::Reply) -> bool {
    let text = r.text.to_ascii_lowercase();
    // "connections", or "connection" with "limit": Exchange's "421 4.7.0 Too many errors on this connection" is
    // about this session's errors, not how many there are.
    r.code == 421
        && (text.contains("connections") || (text.contains("connection") && text.contains("limit")))
        && ["too many", "concurrent", "limit", "maximum"]
            .iter()
            .any(|w| text.contains(w))
}

/// Exchange Online's limits on a mailbox's sessions at once: `432 4.3.2 STOREDRV.ClientSubmit; sender thread limit
/// exceeded` and `432 4.3.2 Concurrent connections limit exceeded`.
fn concurrency_limit(r: &reply::Reply) -> bool {
    let text = r.text.to_ascii_lowercase();
    r.code == 432
        && r.status == Some([4, 3, 2])
        && (text.contains("concurrent") || text.contains("thread limit"))
}

/// What the queue does with a failure.
fn outcome(f: Failure) -> Outcome {
    match f {
        Failure::Connection(why)
        | Failure::Dropped(why)
        | Failure::DroppedAfterBdat(why)
        | Failure::ChunkingRefused { why, .. } => Outcome::Transient(why),
        Failure::Unsupported(why) => Outcome::Permanent(why),
        // Past the server's connection limit for this client, said to the session or the login (Exchange Online's
        // 432 may come at either): nothing of the message was offered.
        Failure::Session(r) | Failure::Auth(r) if connection_limit(&r) || concurrency_limit(&r) => {
            Outcome::Busy {
                reply: r.to_string(),
                offered: false,
            }
        }
        // A 554 greeting (this host's address on a block list) or a refused EHLO would otherwise send every queued
        // message to dead/: they wait, and the log says why, until the cause is fixed or `max_age` runs out.
        Failure::Session(r) => Outcome::Transient(r.to_string()),
        // XOAUTH2 refused: the token may be stale or revoked (Google and Microsoft both answer 535, Gmail 534
        // for a token without the mail scope).
        Failure::Auth(r) if r.code == 535 || r.code == 534 => Outcome::AuthRejected(r.to_string()),
        // "530 5.7.57 Client not authenticated to send mail" to MAIL after a 235 (Microsoft 365): about the
        // account's login, never about the message, which would otherwise go to dead/ with every other one.
        Failure::Refused(r) if r.code == 530 => Outcome::AuthRejected(r.to_string()),
        // Any other refused login (504 unknown mechanism, 530 STARTTLS first, 550 5.7.30 without a Graph
        // fallback) is about the account's settings, not a message: the mail waits, the log and status say why.
        Failure::Auth(r) => Outcome::Transient(r.to_string()),
        // A sending quota used up (Gmail's daily limit, Exchange Online's recipient rate limit) is answered with a
        // 5xx, but it is about the account's last 24 hours, not this message: it goes later, not to dead/.
        Failure::Refused(r) if quota_used_up(&r) => Outcome::Throttled(r.to_string(), QUOTA_PAUSE),
        // (To MAIL or the final dot, where Exchange Online answers it: counted as offered, refused whole.)
        Failure::Refused(r) if concurrency_limit(&r) => Outcome::Busy {
            reply: r.to_string(),
            offered: true,
        },
        Failure::Refused(r) if r.is_permanent() => Outcome::Permanent(r.to_string()),
        Failure::Refused(r) => Outcome::Transient(r.to_string()),
        Failure::EachRefused { standing, .. } => outcome(Failure::Refused(standing)),
    }
}

/// relay's name for EHLO, the same as in its own greeting and `Received:` lines; `localhost` when it is neither a
/// plain domain name nor an address literal (the system's name, when the config gives none, may be anything).
fn helo_name(hostname: &str) -> String {
    let plain = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
    };
    let literal = hostname
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .is_some_and(|inner| match inner.strip_prefix("IPv6:") {
            Some(v6) => v6.parse::<std::net::Ipv6Addr>().is_ok(),
            None => inner.parse::<std::net::Ipv4Addr>().is_ok(),
        });
    if plain(hostname) || literal {
        hostname.to_string()
    } else {
        "localhost".into()
    }
}

/// The envelope as it goes on the wire. Addresses are checked only for what could break the command line:
/// relay has acknowledged the message, and providers take local parts that stricter checks refuse (over 64
/// octets, say).
fn envelope(sender: &str, recipients: &[String]) -> Result<(String, Vec<String>), String> {
    let from = if sender.is_empty() {
        String::new()
    } else {
        address(sender).map_err(|e| format!("sender <{sender}> not accepted: {e}"))?
    };
    let to = recipients
        .iter()
        .map(|r| address(r).map_err(|e| format!("recipient <{r}> not accepted: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    if to.is_empty() {
        return Err("no recipients".into());
    }
    Ok((from, to))
}

fn address(a: &str) -> Result<String, &'static str> {
    if a.bytes().any(|b| b.is_ascii_control()) {
        return Err("control characters");
    }
    let (user, domain) = a.rsplit_once('@').ok_or("no @domain")?;
    // Anything else in the local part is quoted on the way out; the domain has no quoting.
    if user.is_empty() || domain.is_empty() || domain.contains([' ', '<', '>', '"']) {
        return Err("empty local part or bad domain");
    }
    Ok(format!("{}@{domain}", super::mime::local_part(user)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server's per-client connection limit (a 421 to the session) and Exchange Online's concurrency limits
    /// (432 4.3.2) are about the account's connections, not the message; other 4xx and session refusals are the
    /// message's deferral.
    #[test]
    fn connection_limits_are_busy_not_the_messages_failure() {
        let r = |text: &[u8]| reply::parse(text).unwrap().unwrap().0;
        for busy in [
            Failure::Session(r(b"421 4.7.0 mx.example Error: too many connections from 192.0.2.1\r\n")),
            Failure::Refused(r(b"432 4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded [Hostname=AM0PR02MB1234]\r\n")),
            Failure::Refused(r(b"432 4.3.2 Concurrent connections limit exceeded. Visit https://aka.ms/concurrent_sending for more information.\r\n")),
            Failure::Session(r(b"421 4.3.2 The maximum number of concurrent server connections has exceeded a limit, closing transmission channel\r\n")),
            Failure::Session(r(b"421 mx.example Too many concurrent SMTP connections; please try again later.\r\n")),
            Failure::Session(r(b"432 4.3.2 Concurrent connections limit exceeded. Visit https://aka.ms/concurrent_sending for more information. [Hostname=DM4PR18MB4126.namprd18.prod.outlook.com]\r\n")),
            Failure::Auth(r(b"432 4.3.2 Concurrent connections limit exceeded. Visit https://aka.ms/concurrent_sending for more information.\r\n")),
        ] {
            assert!(matches!(outcome(busy), Outcome::Busy { .. }));
        }
        for other in [
            Failure::Refused(r(b"451 4.3.0 try again later\r\n")),
            Failure::Refused(r(b"432 4.7.12 A password transition is needed\r\n")),
            Failure::Session(r(b"554 5.7.1 your address is on a block list\r\n")),
            Failure::Session(r(b"421 4.3.0 mx.example going down for maintenance\r\n")),
            Failure::Session(r(
                b"421 4.7.0 Too many errors on this connection, closing transmission channel\r\n",
            )),
        ] {
            assert!(matches!(outcome(other), Outcome::Transient(_)));
        }
    }

    #[test]
    fn local_parts_are_quoted_only_when_they_must_be() {
        assert_eq!(
            super::super::mime::local_part("scanner.3f+{x}"),
            "scanner.3f+{x}"
        );
        assert_eq!(
            super::super::mime::local_part(&"0".repeat(80)),
            "0".repeat(80)
        );
        assert_eq!(
            super::super::mime::local_part("john smith"),
            "\"john smith\""
        );
        assert_eq!(super::super::mime::local_part("a\"b\\c"), r#""a\"b\\c""#);
        assert_eq!(super::super::mime::local_part("a@b"), "\"a@b\"");
        assert_eq!(super::super::mime::local_part("a..b"), "\"a..b\"");
        assert_eq!(address("a@b@example.com").unwrap(), "\"a@b\"@example.com");
        assert!(address("a\r\nRCPT TO:<x>@example.com").is_err());
        assert_eq!(address("a<b>@example.com").unwrap(), "\"a<b>\"@example.com");
        assert!(address("a@exa>mple.com").is_err());
    }

    /// A refused session (a 554 greeting from a block list, a refused EHLO) defers the mail; a refused message
    /// fails it for good; an address only SMTPUTF8 could carry fails it, unsent.
    #[test]
    fn every_recipient_refused_is_decided_per_recipient_only_where_it_matters() {
        let r = |text: &str| {
            reply::parse(format!("{text}\r\n").as_bytes())
                .unwrap()
                .unwrap()
                .0
        };
        let to = ["a@x".to_string(), "b@x".to_string()];
        let decide = |a: &str, b: &str| each_refused(r(b), vec![(0, r(a)), (1, r(b))], false, &to);
        let unknown = "550 5.1.1 user unknown";
        // Taken at RCPT for b, then the message refused for good (a 552 to the data is final): both fail, a with
        // its own reason; not a full mailbox's wait for a.
        let data = "552 5.7.0 This message was blocked because its content presents a potential security issue";
        for a in [unknown, "550 5.7.1 not allowed"] {
            match each_refused(r(data), vec![(0, r(a)), (1, r(data))], true, &to) {
                Outcome::Refused { refused, .. } => {
                    assert!(refused.iter().all(|r| r.permanent), "{refused:?}");
                    assert_eq!(refused[0].reply, a);
                    assert_eq!(refused[1].reply, data);
                }
                other => panic!("{other:?}"),
            }
        }
        match decide(unknown, "451 4.2.0 busy") {
            Outcome::Refused { refused, .. } => {
                assert_eq!(
                    refused.iter().map(|r| r.permanent).collect::<Vec<_>>(),
                    [true, false]
                );
                assert_eq!(refused[0].recipient, "a@x");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            decide(unknown, "550 5.7.1 not authorized"),
            Outcome::Refused { .. }
        ));
        assert!(matches!(decide(unknown, unknown), Outcome::Refused { .. }));
        // One reply decides for all: all for now (the recipients', not the account's), or about the account
        // (whichever recipient it came to).
        assert!(matches!(
            decide("450 4.2.0 later", "451 4.3.0 later"),
            Outcome::RecipientsDeferred(_)
        ));
        let quota = "550 5.4.5 Daily user sending limit exceeded";
        assert!(matches!(decide(quota, unknown), Outcome::Throttled(..)));
        assert!(matches!(
            decide(unknown, "530 5.7.57 Client not authenticated"),
            Outcome::AuthRejected(_)
        ));
    }

    #[test]
    fn only_what_is_about_the_message_fails_it_for_good() {
        let reply = |code, text: &str| Reply {
            code,
            status: Some([5, 7, 1]),
            text: text.into(),
        };
        assert!(matches!(
            outcome(Failure::Session(reply(
                554,
                "Service unavailable; Client host blocked"
            ))),
            Outcome::Transient(_)
        ));
        assert!(matches!(
            outcome(Failure::Refused(reply(550, "rejected"))),
            Outcome::Permanent(_)
        ));
        assert!(matches!(
            outcome(Failure::Unsupported("5.6.7 …".into())),
            Outcome::Permanent(_)
        ));
        assert_eq!(helo_name("relay.example.lan"), "relay.example.lan");
        assert_eq!(helo_name("[192.0.2.1]"), "[192.0.2.1]");
        assert_eq!(helo_name("[IPv6:2001:db8::1]"), "[IPv6:2001:db8::1]");
        for odd in ["[foo]", "[1.2.3]", "[IPv6:zz]", "host name", "a\r\nb", ""] {
            assert_eq!(helo_name(odd), "localhost", "{odd:?}");
        }
    }
}
