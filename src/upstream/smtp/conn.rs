//! One upstream SMTP connection: connect (TCP_NODELAY), TLS, EHLO, AUTH XOAUTH2 (or OAUTHBEARER), then messages with their
//! commands pipelined and their bodies streamed. Replies are parsed in `reply.rs`, DATA's transparency is
//! `dot.rs`; this file only moves bytes and says what happened.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use rustls_pki_types::ServerName;
use secrecy::{ExposeSecret, SecretString};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use super::dot::DotStuffer;
use super::reply::{self, Offers, Reply};
use crate::config::TlsMode;
use crate::upstream::MailFlags;
use crate::upstream::outgoing::Outgoing;
use crate::upstream::transcript::TranscriptHandle;

/// Body bytes gathered before a write: large writes, few system calls, and TLS records of full size.
const WRITE: usize = 256 << 10;
/// A slow but live link: the body's deadline allows this rate.
const SLOW_RATE: u64 = 32 << 10;

/// How to reach one account's upstream.
pub struct Settings {
    pub host: String,
    pub port: u16,
    pub tls: TlsMode,
    pub tls_config: Arc<rustls::ClientConfig>,
    /// Per step: connecting, each reply.
    pub timeout: Duration,
    /// The wait for the reply to the final dot (see `smtp::FINAL_REPLY`).
    pub final_reply: Duration,
    /// The name relay gives in EHLO.
    pub helo: String,
}

/// Why a connection or a message failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// Connecting, TLS, a broken or silent connection, or the queue file: nothing is known to have arrived.
    Connection(String),
    /// The server refused a command or the message.
    Refused(Reply),
    /// The server took MAIL and refused every recipient (or, `after_data`, refused some for good at RCPT and then
    /// the message): each recipient (its index in those given) with its own reply, so that each can have its own
    /// outcome, or its own reason in a bounce. `standing` is the one reply that stands for them all where one is
    /// needed (as [`Failure::Refused`] would carry it).
    EachRefused {
        standing: Reply,
        each: Vec<(usize, Reply)>,
        /// Some recipients were taken at RCPT and the message itself was then refused for good (`standing`, to
        /// DATA, the final dot or a BDAT): it failed for every recipient, each named with its own RCPT refusal
        /// where it had one, the others with `standing`.
        after_data: bool,
    },
    /// The server refused AUTH XOAUTH2.
    Auth(Reply),
    /// The message needs an extension the server does not offer; nothing was sent.
    Unsupported(String),
    /// The server refused the session before any message (its greeting, EHLO, STARTTLS): about this host and
    /// this connection, not about a message, so never a reason to fail one for good.
    Session(Reply),
    /// The server offered CHUNKING, took MAIL and RCPT, and then did not know BDAT (500, 502, 504), or hung up
    /// during the upload, before the whole message was sent, without answering any BDAT (such a server reads the
    /// chunk as commands and drops the connection after too many errors; the reset can destroy its replies on
    /// the way): a server or a middlebox that lies in its EHLO. DATA will do. `definite`: BDAT was refused in
    /// words; a hang-up may also have been a network fault.
    ChunkingRefused { why: String, definite: bool },
    /// The server closed or reset the connection (a timeout is a `Connection` failure).
    Dropped(String),
    /// The server closed or reset the connection after the whole message went through BDAT, before answering any
    /// BDAT: as `Dropped`, and the upstream is on DATA for a while (see [`Failure::ChunkingRefused`]).
    DroppedAfterBdat(String),
}

impl Failure {
    /// The same failure, saying that it came after the whole message was sent: the server may have taken it and
    /// lost only its answer (RFC 1047), so sent again it may arrive twice. Sysadmins asking why a scan came twice
    /// find the answer in the deferral's line.
    fn after_whole_message(self) -> Failure {
        const MAYBE_TAKEN: &str = "after the whole message was sent: the upstream may have taken it, so it may arrive twice";
        match self {
            Failure::Connection(why) => Failure::Connection(format!("{why}, {MAYBE_TAKEN}")),
            Failure::Dropped(why) => Failure::Dropped(format!("{why}, {MAYBE_TAKEN}")),
            other => other,
        }
    }

    /// The same failure with the credentials cut out of its words, whole or in pieces (see
    /// [`crate::upstream::transcript::cut_quoted`]).
    fn cut_quoted(self, secrets: &[&str]) -> Failure {
        let cut = |text: String| crate::upstream::transcript::cut_quoted(&text, secrets);
        let reply = |mut r: Reply| {
            r.text = cut(r.text);
            r
        };
        match self {
            Failure::Connection(why) => Failure::Connection(cut(why)),
            Failure::Refused(r) => Failure::Refused(reply(r)),
            Failure::EachRefused {
                standing,
                each,
                after_data,
            } => Failure::EachRefused {
                standing: reply(standing),
                each: each.into_iter().map(|(i, r)| (i, reply(r))).collect(),
                after_data,
            },
            Failure::Auth(r) => Failure::Auth(reply(r)),
            Failure::Unsupported(why) => Failure::Unsupported(cut(why)),
            Failure::Session(r) => Failure::Session(reply(r)),
            Failure::ChunkingRefused { why, definite } => Failure::ChunkingRefused {
                why: cut(why),
                definite,
            },
            Failure::Dropped(why) => Failure::Dropped(cut(why)),
            Failure::DroppedAfterBdat(why) => Failure::DroppedAfterBdat(cut(why)),
        }
    }
}

/// A fresh connection that failed before its greeting, and whether the server answered at all (see
/// `reach.rs`: no answer is what makes an upstream down).
#[derive(Debug)]
pub struct ConnectFailure {
    pub failure: Failure,
    pub answered: bool,
}

impl ConnectFailure {
    fn answered(failure: Failure) -> ConnectFailure {
        ConnectFailure {
            failure,
            answered: true,
        }
    }
}

/// A message that did not go, and what that says about the connection.
#[derive(Debug)]
pub struct SendFailure {
    pub failure: Failure,
    /// The server answered none of this message's commands: on a reused connection, the connection was dead
    /// before the message began, and a fresh one may try it at once.
    pub unanswered: bool,
    /// The connection is in a known state (the transaction was reset) and may carry the next message.
    pub reusable: bool,
}

/// A message the server took, for all its recipients or some.
#[derive(Debug)]
pub struct Sent {
    /// The reply to the final dot.
    pub reply: Reply,
    /// The recipients it refused (index in the recipients given), with the reply to each one's RCPT.
    pub refused: Vec<(usize, Reply)>,
}

/// What the replies to MAIL, RCPT… and DATA say to do.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// DATA was accepted for at least one recipient: send the body. The others were refused.
    Data { refused: Vec<(usize, Reply)> },
    /// No transaction: the message was refused for every recipient, with this reply.
    Refused(Reply),
}

/// Decides from the replies to `MAIL`, each `RCPT` and `DATA`, in that order; a list cut short (commands sent
/// one at a time stop at a refused MAIL, a 421, or no accepted recipient before DATA) is read as far as it goes.
/// Pure.
fn judge(replies: &[Reply], recipients: usize) -> Verdict {
    let refused = match judge_envelope(replies, recipients) {
        Ok(refused) => refused,
        Err(reply) => return Verdict::Refused(reply),
    };
    match replies.get(recipients + 1) {
        Some(data) if data.code == 354 => Verdict::Data { refused },
        Some(data) => Verdict::Refused(data.clone()),
        None => Verdict::Refused(replies[0].clone()),
    }
}

/// The part of [`judge`] that MAIL and the RCPTs decide: the recipients refused (by index) when at least one was
/// taken, else the one reply that refuses the whole transaction. A 421 anywhere in `replies` ends it. Pure.
fn judge_envelope(replies: &[Reply], recipients: usize) -> Result<Vec<(usize, Reply)>, Reply> {
    let Some(mail) = replies.first() else {
        return Err(Reply {
            code: 421,
            status: None,
            text: "no reply to MAIL".into(),
        });
    };
    if !mail.is_positive() {
        return Err(mail.clone());
    }
    let rcpts = &replies[1..replies.len().min(recipients + 1)];
    // The server is going away: whatever it accepted, the rest of this transaction will not happen.
    if let Some(closing) = replies.iter().find(|r| r.code == 421) {
        return Err(closing.clone());
    }
    let refused: Vec<(usize, Reply)> = rcpts
        .iter()
        .enumerate()
        .filter(|(_, r)| !r.is_positive())
        .map(|(i, r)| (i, r.clone()))
        .collect();
    if refused.len() == rcpts.len() {
        // One reply stands for all: one that asks to try again, if any does, so that a recipient refused only for
        // now is not bounced with the others.
        let first_transient = refused.iter().position(|(_, r)| !r.is_permanent());
        return Err(refused
            .into_iter()
            .nth(first_transient.unwrap_or(0))
            .map_or_else(|| mail.clone(), |(_, r)| r));
    }
    Ok(refused)
}

/// The failure for a transaction refused whole with `standing`: when MAIL was taken and every one of the
/// `recipients` refused, each recipient's own refusal (the caller decides whether they differ enough to matter);
/// when some were taken at RCPT and the message was then refused for good, every recipient's reason for its
/// bounce (its own RCPT refusal, or `standing`: see [`Failure::EachRefused`]); else `standing` alone. Pure.
fn refused_whole(replies: &[Reply], recipients: usize, standing: Reply) -> Failure {
    let taken = replies.first().is_some_and(Reply::is_positive);
    let Some(rcpts) = replies
        .get(1..=recipients)
        .filter(|_| taken && recipients > 0)
    else {
        return Failure::Refused(standing);
    };
    if rcpts.iter().any(|r| r.code == 421) {
        return Failure::Refused(standing);
    }
    if rcpts.iter().all(|r| !r.is_positive()) {
        return Failure::EachRefused {
            standing,
            each: rcpts.iter().cloned().enumerate().collect(),
            after_data: false,
        };
    }
    // (A refusal for now of the message is the message's, and all of it waits, as before.) A recipient refused
    // only for now at RCPT fails with the message, for the message's reason: its own 4xx would read as a
    // permanent status of its own in the bounce (a busy mailbox's 4.2.1 as 5.2.1, "mailbox disabled").
    if standing.is_permanent() && rcpts.iter().any(|r| r.is_permanent()) {
        let each = rcpts
            .iter()
            .map(|r| if r.is_permanent() { r } else { &standing })
            .cloned()
            .enumerate()
            .collect();
        return Failure::EachRefused {
            standing,
            each,
            after_data: true,
        };
    }
    Failure::Refused(standing)
}

/// A wait in whole seconds, rounded up: what is timed is often what was left of a longer wait (29.958 s of 30 was
/// printed as "29s 958ms 374us 348ns").
fn whole_seconds(wait: Duration) -> humantime::FormattedDuration {
    humantime::format_duration(Duration::from_secs(
        wait.as_secs() + u64::from(wait.subsec_nanos() > 0),
    ))
}

/// Whether a reply to RCPT refuses that recipient for good. A 552 there is "too many recipients" as RFC 821
/// used it, to be taken as temporary (RFC 5321 section 4.5.3.1.10).
pub fn refused_for_good(rcpt: &Reply) -> bool {
    rcpt.is_permanent() && rcpt.code != 552
}

/// The replies to a BDAT transaction as they come: those to MAIL and each RCPT kept, of those to the chunks only
/// the first refusal and the last (so a message of many chunks holds a few replies, not one per chunk).
struct Replies {
    envelope: Vec<Reply>,
    commands: usize,
    /// BDAT commands sent so far.
    chunks: usize,
    /// Replies read so far.
    seen: usize,
    refused_chunk: Option<Reply>,
    last: Option<Reply>,
}

impl Replies {
    fn new(commands: usize) -> Replies {
        Replies {
            envelope: Vec::with_capacity(commands),
            commands,
            chunks: 0,
            seen: 0,
            refused_chunk: None,
            last: None,
        }
    }

    fn push(&mut self, r: Reply) {
        self.seen += 1;
        if self.envelope.len() < self.commands {
            self.envelope.push(r);
            return;
        }
        if !r.is_positive() && self.refused_chunk.is_none() {
            self.refused_chunk = Some(r.clone());
        }
        self.last = Some(r);
    }

    fn complete(&self) -> bool {
        self.seen >= self.commands + self.chunks
    }

    /// Whether the only reply was a 421 to MAIL: a reused connection the server was closing.
    fn closing_at_once(&self) -> bool {
        self.seen == 1 && self.envelope.first().is_some_and(|r| r.code == 421)
    }

    /// A BDAT the server did not know, after it took MAIL and a recipient (see [`Failure::ChunkingRefused`]).
    fn chunking_refused(&self) -> Option<String> {
        let chunk = self.refused_chunk.as_ref()?;
        let envelope_taken = self.envelope.len() == self.commands
            && self.envelope.first().is_some_and(Reply::is_positive)
            && self.envelope.iter().skip(1).any(Reply::is_positive);
        (envelope_taken && matches!(chunk.code, 500 | 502 | 504)).then(|| chunk.to_string())
    }

    /// BDAT refused in words, or else `failure` a hang-up before any BDAT was answered (see
    /// [`Failure::ChunkingRefused`]).
    fn chunking_failure(&self, failure: &Failure) -> Option<Failure> {
        if let Some(r) = self.chunking_refused() {
            return Some(refused_in_words(r));
        }
        self.dropped_unanswered(failure)
            .map(|why| Failure::ChunkingRefused {
                why,
                definite: false,
            })
    }

    /// `failure` ended an upload before any BDAT was answered, by a close or a reset, and nothing refused the
    /// envelope: what a server that does not know BDAT does (see [`Failure::ChunkingRefused`]). Only while the
    /// message is not yet sent whole: the server cannot have taken it.
    fn dropped_unanswered(&self, failure: &Failure) -> Option<String> {
        let Failure::Dropped(why) = failure else {
            return None;
        };
        (self.seen <= self.commands && self.refusal().is_none()).then(|| {
            format!(
                "the upstream offers CHUNKING but hung up during a BDAT upload without answering it ({why}), before the whole message was sent; sent again with DATA"
            )
        })
    }

    /// The failure for `refusal` (see [`refused_whole`]).
    fn refused(&self, refusal: Reply) -> Failure {
        refused_whole(&self.envelope, self.commands - 1, refusal)
    }

    /// What refuses the message so far: a refused MAIL, a 421, every recipient refused (once all their replies
    /// are in), or a refused chunk.
    fn refusal(&self) -> Option<Reply> {
        let mail_refused = self.envelope.first().filter(|m| !m.is_positive());
        let closing = self
            .envelope
            .iter()
            .chain(self.refused_chunk.iter())
            .find(|r| r.code == 421);
        if let Some(r) = mail_refused.or(closing) {
            return Some(r.clone());
        }
        if self.envelope.len() == self.commands
            && let Err(r) = judge_envelope(&self.envelope, self.commands - 1)
        {
            return Some(r);
        }
        self.refused_chunk.clone()
    }
}

enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

pub struct Conn {
    stream: Stream,
    buf: Vec<u8>,
    pos: usize,
    offers: Offers,
    /// Whether the EHLO reply offered CHUNKING (`offers.chunking` is what is used, see [`Conn::allow_chunking`]).
    ehlo_chunking: bool,
    timeout: Duration,
    final_reply: Duration,
    transcript: Option<TranscriptHandle>,
    /// When it last finished a message (or was opened).
    pub last_used: Instant,
    /// Counted among its upstream's open connections while it lives ([`Conn::count_in`]).
    live: Option<Live>,
}

/// One open connection in its upstream's count, taken off when the connection goes.
struct Live(std::sync::Arc<std::sync::atomic::AtomicUsize>);

impl Drop for Live {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Conn {
    /// Counts this connection in `open` for as long as it lives.
    fn count_in(&mut self, open: &std::sync::Arc<std::sync::atomic::AtomicUsize>) {
        if self.live.is_none() {
            open.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.live = Some(Live(open.clone()));
        }
    }

    /// Connects, says EHLO (again after STARTTLS) and authenticates as `user` with `token`. Counted in `open`
    /// from the moment it is connected (as the server counts it) for as long as it lives.
    pub async fn open(
        s: &Settings,
        user: &str,
        token: &SecretString,
        transcript: Option<TranscriptHandle>,
        open: Option<&std::sync::Arc<std::sync::atomic::AtomicUsize>>,
    ) -> Result<Conn, Failure> {
        Conn::connect(s, transcript, open)
            .await
            .map_err(|f| f.failure)?
            .login(s, user, token)
            .await
    }

    /// Connects (with TLS on an implicit-TLS port) and reads the greeting, which must be a 220.
    pub async fn connect(
        s: &Settings,
        transcript: Option<TranscriptHandle>,
        open: Option<&std::sync::Arc<std::sync::atomic::AtomicUsize>>,
    ) -> Result<Conn, ConnectFailure> {
        let broken = |what: &str, e: &dyn std::fmt::Display| {
            Failure::Connection(format!("upstream {}:{}: {what}: {e}", s.host, s.port))
        };
        let unanswered = |failure| ConnectFailure {
            failure,
            answered: false,
        };
        if let Some(t) = &transcript
            && let Ok(mut t) = t.lock()
        {
            // The words of the config (`smtp_tls = "starttls"`), not Rust's.
            let tls = match s.tls {
                crate::config::TlsMode::None => "smtp_tls = none",
                crate::config::TlsMode::Starttls => "smtp_tls = starttls",
                crate::config::TlsMode::Implicit => "smtp_tls = implicit",
            };
            t.note(&format!("connecting to {}:{} ({tls})", s.host, s.port));
        }
        let tcp = match tokio::time::timeout(s.timeout, super::dial::connect(&s.host, s.port)).await
        {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(e)) => return Err(unanswered(broken("cannot connect", &e))),
            Err(_) => {
                return Err(unanswered(broken(
                    "cannot connect",
                    &"timed out (smtp_timeout)",
                )));
            }
        };
        // The final dot must not wait for the peer's delayed ACK (Nagle): that cost 40 ms a message.
        tcp.set_nodelay(true)
            .map_err(|e| ConnectFailure::answered(broken("TCP_NODELAY", &e)))?;
        let stream = match s.tls {
            // A handshake that timed out got no answer; one that failed did (a certificate, a protocol).
            TlsMode::Implicit => match handshake(s, tcp).await {
                Ok(tls) => Stream::Tls(Box::new(tls)),
                Err((failure, timed_out)) => {
                    return Err(ConnectFailure {
                        failure,
                        answered: !timed_out,
                    });
                }
            },
            _ => Stream::Plain(tcp),
        };
        let mut conn = Conn {
            stream,
            buf: Vec::with_capacity(4096),
            pos: 0,
            offers: Offers::default(),
            ehlo_chunking: false,
            timeout: s.timeout,
            final_reply: s.final_reply,
            transcript,
            last_used: Instant::now(),
            live: None,
        };
        if let Some(open) = open {
            conn.count_in(open);
        }
        let greeting = match conn.reply().await {
            Ok(r) => r,
            // Not a byte of a greeting (silent, or hung up at once): no answer; a garbled one is an answer.
            Err(failure) => {
                let answered = !conn.buf.is_empty();
                // Silent after the connection was taken: an SMTPS port (465) waits for a TLS hello and says
                // nothing, which read only as an upstream that cannot be reached. (Not on 25 or 587, which greet
                // first: silence there is a server that hangs.)
                let failure = match failure {
                    Failure::Connection(why)
                        if !answered
                            && s.tls != TlsMode::Implicit
                            && !matches!(s.port, 25 | 587)
                            && why.contains("did not answer within") =>
                    {
                        Failure::Connection(format!(
                            "{why}: it took the connection but sent no greeting; a server that expects TLS first (as on port 465) says nothing, and takes smtp_tls = \"implicit\""
                        ))
                    }
                    other => other,
                };
                return Err(ConnectFailure { failure, answered });
            }
        };
        if greeting.code != 220 {
            return Err(ConnectFailure::answered(Failure::Session(greeting)));
        }
        Ok(conn)
    }

    /// EHLO (again after STARTTLS) and AUTH as `user` with `token`, on a connection just made.
    pub async fn login(
        mut self,
        s: &Settings,
        user: &str,
        token: &SecretString,
    ) -> Result<Conn, Failure> {
        let broken = |what: &str, e: &dyn std::fmt::Display| {
            Failure::Connection(format!("upstream {}:{}: {what}: {e}", s.host, s.port))
        };
        self.ehlo(&s.helo).await?;
        if s.tls == TlsMode::Starttls {
            if !self.offers.starttls {
                return Err(broken(
                    "STARTTLS",
                    &"not offered; the access token is never sent in the clear",
                ));
            }
            let r = self.command("STARTTLS").await?;
            if r.code != 220 {
                return Err(Failure::Session(r));
            }
            let Stream::Plain(tcp) = self.stream else {
                return Err(broken("STARTTLS", &"already in TLS"));
            };
            self.stream = Stream::Tls(Box::new(handshake(s, tcp).await.map_err(|(f, _)| f)?));
            self.buf.clear();
            self.pos = 0;
            self.note("TLS established");
            self.ehlo(&s.helo).await?;
        }
        self.auth(s, user, token).await?;
        self.last_used = Instant::now();
        Ok(self)
    }

    async fn ehlo(&mut self, helo: &str) -> Result<(), Failure> {
        let r = self.command(&format!("EHLO {helo}")).await?;
        if r.code != 250 {
            return Err(Failure::Session(r));
        }
        self.offers = Offers::parse(&r);
        self.ehlo_chunking = self.offers.chunking;
        Ok(())
    }

    /// AUTH XOAUTH2, or OAUTHBEARER (RFC 7628) where a server offers only that (Dovecot, Stalwart and others
    /// offer both; Microsoft 365 and Gmail, XOAUTH2). A server that lists neither still gets XOAUTH2: some
    /// list their mechanisms only to some clients, and its refusal then says what is wrong. A bad token is
    /// answered with a 334 challenge (base64 JSON); the client's reply to it (an empty line for XOAUTH2, a
    /// single ^A for OAUTHBEARER) then brings the 535.
    async fn auth(
        &mut self,
        s: &Settings,
        user: &str,
        token: &SecretString,
    ) -> Result<(), Failure> {
        let bearer = self.offers.oauthbearer && !self.offers.xoauth2;
        let (mechanism, initial, after_challenge) = if bearer {
            // RFC 5801's gs2-header: `n,a=NAME,`, or `n,,` without an authorization identity.
            let authzid = match user {
                "" => String::new(),
                user => format!("a={}", sasl_name(user)),
            };
            let initial = format!(
                "n,{authzid},\x01host={}\x01port={}\x01auth=Bearer {}\x01\x01",
                s.host,
                s.port,
                token.expose_secret()
            );
            ("OAUTHBEARER", B64.encode(initial), B64.encode("\x01"))
        } else {
            let initial = format!(
                "user={user}\x01auth=Bearer {}\x01\x01",
                token.expose_secret()
            );
            ("XOAUTH2", B64.encode(initial), String::new())
        };
        // A server that does not know the command may quote it back ("500 Command unrecognized: AUTH XOAUTH2
        // dXNl…"), whole, cut, or over several lines, and its reply goes to the log, the queue's state and a
        // bounce: the token is cut out of it.
        let secrets = [initial.as_str(), token.expose_secret()];
        let unquote = |mut r: Reply| {
            r.text = crate::upstream::transcript::cut_quoted(&r.text, &secrets);
            r
        };
        if let Some(t) = &self.transcript
            && let Ok(mut t) = t.lock()
        {
            t.hide(&initial);
            t.hide(token.expose_secret());
        }
        let r = unquote(
            self.command(&format!("AUTH {mechanism} {initial}"))
                .await
                .map_err(|f| f.cut_quoted(&secrets))?,
        );
        match r.code {
            235 => Ok(()),
            334 => {
                let detail = B64
                    .decode(r.text.trim())
                    .map(|d| crate::terminal::printable(&d))
                    .unwrap_or_default();
                let mut last = self
                    .command(&after_challenge)
                    .await
                    .map_err(|f| f.cut_quoted(&secrets))?;
                if !detail.is_empty() {
                    last.text = format!("{} ({})", last.text, detail.trim());
                }
                Err(Failure::Auth(unquote(last)))
            }
            _ => Err(Failure::Auth(r)),
        }
    }

    /// Sends with DATA from now on, whatever the EHLO reply offered.
    pub fn forget_chunking(&mut self) {
        self.offers.chunking = false;
    }

    /// Sends with BDAT where the EHLO reply offered CHUNKING and `allowed`, else with DATA (a pooled connection
    /// outlives a spell on DATA).
    pub fn allow_chunking(&mut self, allowed: bool) {
        self.offers.chunking = self.ehlo_chunking && allowed;
    }

    /// Whether the server offered SMTPUTF8 (RFC 6531) in its EHLO reply.
    pub fn offers_smtputf8(&self) -> bool {
        self.offers.smtputf8
    }

    /// Sends one message: MAIL, RCPT… and DATA in one write when the server offers PIPELINING (RFC 2920), then
    /// the body in large writes with the terminator in the last one. The message goes to the recipients the
    /// server accepted; those it refused come back in [`Sent::refused`] (by their index in `recipients`).
    pub async fn send(
        &mut self,
        sender: &str,
        recipients: &[String],
        message: &Outgoing,
        flags: MailFlags,
    ) -> Result<Sent, SendFailure> {
        let utf8_address = !sender.is_ascii() || recipients.iter().any(|r| !r.is_ascii());
        if utf8_address && !self.offers.smtputf8 {
            // RFC 6531 section 3.2: a non-ASCII address cannot go to a server without SMTPUTF8. Said in relay's
            // words rather than left to the server's refusal of an address it cannot read.
            return Err(SendFailure {
                failure: Failure::Unsupported(
                    "5.6.7 a non-ASCII address needs SMTPUTF8, which the upstream server does not offer (RFC 6531)"
                        .into(),
                ),
                unanswered: false,
                reusable: true,
            });
        }
        let mut mail = format!("MAIL FROM:<{sender}>");
        // Not for a message whose long lines are re-encoded on the way (`long_lines.rs`): what goes is larger than
        // what is queued, up to three times for 8-bit text made quoted-printable, and a SIZE below what comes
        // would be wrong (RFC 1870); counting it exactly would mean reading the message twice.
        if self.offers.size.is_some() && !message.has_long_lines() {
            mail.push_str(&format!(" SIZE={}", message.len()));
        }
        if flags.eight_bit && self.offers.eight_bit_mime {
            mail.push_str(" BODY=8BITMIME");
        }
        // A client's SMTPUTF8 with ASCII addresses (UTF-8 only in the header fields) is dropped where the
        // server does not offer it, as Postfix does: the server then sees 8-bit header text, which Microsoft's
        // and Google's take.
        if (utf8_address || flags.smtputf8) && self.offers.smtputf8 {
            mail.push_str(" SMTPUTF8");
        }
        let mut commands = vec![mail];
        commands.extend(recipients.iter().map(|r| format!("RCPT TO:<{r}>")));
        if self.offers.pipelining && self.offers.chunking {
            return self.send_chunked(commands, message).await;
        }
        commands.push("DATA".into());
        let fail = |failure, unanswered, reusable| SendFailure {
            failure,
            unanswered,
            reusable,
        };
        let mut replies = Vec::with_capacity(commands.len());
        if self.offers.pipelining {
            let mut batch = String::with_capacity(commands.iter().map(|c| c.len() + 2).sum());
            for c in &commands {
                self.client_line(c);
                batch.push_str(c);
                batch.push_str("\r\n");
            }
            if let Err(f) = self.write(batch.as_bytes(), self.timeout).await {
                return Err(fail(f, true, false));
            }
            for _ in &commands {
                match self.reply().await {
                    // The server is closing the connection (a reused one it had timed out): nothing of this
                    // message was taken, and the rest of the replies will not come.
                    Ok(r) if replies.is_empty() && r.code == 421 => {
                        return Err(fail(Failure::Refused(r), true, false));
                    }
                    // Closing in the middle: no more replies will come, and the 421's words say why.
                    Ok(r) if r.code == 421 => {
                        replies.push(r);
                        break;
                    }
                    Ok(r) => replies.push(r),
                    Err(f) => return Err(fail(f, replies.is_empty(), false)),
                }
            }
        } else {
            // One at a time: a refused MAIL or a 421 ends it; a refused RCPT does not, the others may be taken;
            // DATA only once one was.
            for (i, c) in commands.iter().enumerate() {
                let is_data = i == commands.len() - 1;
                if is_data && !replies.iter().skip(1).any(Reply::is_positive) {
                    break;
                }
                match self.command(c).await {
                    Ok(r) => {
                        let stop = r.code == 421 || (i == 0 && !r.is_positive());
                        replies.push(r);
                        if stop {
                            break;
                        }
                    }
                    Err(f) => return Err(fail(f, replies.is_empty(), false)),
                }
            }
        }
        let refused = match judge(&replies, recipients.len()) {
            // More replies than commands: the server is out of step, and a stray 250 would be read as its answer
            // to the final dot. Nothing is sent; the connection is dropped.
            Verdict::Data { .. } if !self.is_clean() => {
                return Err(fail(
                    Failure::Connection(
                        "the upstream sent more replies than commands; the connection was dropped"
                            .into(),
                    ),
                    false,
                    false,
                ));
            }
            Verdict::Data { refused } => refused,
            Verdict::Refused(reply) => {
                // A 421 to the first command of a reused connection: the server was closing it.
                let unanswered = replies.first().is_some_and(|r| r.code == 421);
                let data_started =
                    replies.len() == commands.len() && replies[replies.len() - 1].code == 354;
                if data_started {
                    // DATA was accepted although no recipient was: ending the data would make an empty
                    // transaction. Dropping the connection abandons it (RFC 5321 section 4.1.1.4).
                    return Err(fail(
                        refused_whole(&replies, recipients.len(), reply),
                        false,
                        false,
                    ));
                }
                let reusable = reply.code != 421 && self.rset().await;
                return Err(fail(
                    refused_whole(&replies, recipients.len(), reply),
                    unanswered,
                    reusable,
                ));
            }
        };
        if let Err(f) = self.body(message).await {
            // A server refusing the message while it comes (Microsoft 365's 552 past its size limit) answers and
            // hangs up before the body is sent whole: its words say why, and whether sending it again can help.
            // Without them the message went again and again until max_age, "connection reset" each time.
            if let Failure::Dropped(_) = f
                && let Ok(r) = self.reply_within(Duration::from_secs(2)).await
                && !r.is_positive()
            {
                return Err(fail(Failure::Refused(r), false, false));
            }
            return Err(fail(f, false, false));
        }
        match self.reply_within(self.final_reply).await {
            Ok(reply) if reply.is_positive() => {
                self.last_used = Instant::now();
                Ok(Sent { reply, refused })
            }
            Ok(r) => {
                let reusable = r.code != 421 && self.rset().await;
                Err(fail(
                    refused_whole(&replies, recipients.len(), r),
                    false,
                    reusable,
                ))
            }
            Err(f) => Err(fail(f.after_whole_message(), false, false)),
        }
    }

    /// CHUNKING (RFC 3030) with PIPELINING: MAIL, RCPT… and the message as `BDAT n LAST` go in one write when the
    /// message fits one, so a message costs one round trip instead of two (no wait for a 354), and no
    /// dot-stuffing. Microsoft 365 and Gmail offer both. A larger message goes as several BDAT chunks of about
    /// [`WRITE`] bytes; replies that have already arrived are read between chunks, so they never pile up, and a
    /// refusal stops the upload (RFC 3030 section 4.2: no more chunks after a failed one). A server that refuses
    /// MAIL or every RCPT still reads the chunks and refuses them (section 2), but the connection is not used
    /// again after any refusal: one reconnect is cheap, a server out of step is not. `commands`: MAIL, then one
    /// RCPT per recipient.
    async fn send_chunked(
        &mut self,
        commands: Vec<String>,
        message: &Outgoing,
    ) -> Result<Sent, SendFailure> {
        let fail = |failure, unanswered| SendFailure {
            failure,
            unanswered,
            reusable: false,
        };
        let mut replies = Replies::new(commands.len());
        let deadline = self.timeout + Duration::from_secs(message.len() / SLOW_RATE);
        let started = Instant::now();
        let expected =
            usize::try_from(message.len()).map_or(WRITE, |n| n.saturating_add(n / 32 + 2));
        let mut body = Vec::with_capacity(expected.min(WRITE + WRITE / 4));
        let mut out = Vec::with_capacity(commands.iter().map(|c| c.len() + 2).sum::<usize>() + 32);
        for c in &commands {
            self.client_line(c);
            out.extend_from_slice(c.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        let mut chunks = message.chunks(true);
        let mut sent = 0u64;
        loop {
            let piece = chunks.next().await.map_err(|e| {
                // Not the connection's fault, but chunks may have gone: it is not used again.
                fail(
                    Failure::Connection(format!("cannot read the queue file while sending: {e}")),
                    false,
                )
            })?;
            let Some(piece) = piece else { break };
            // Sent only once more follows, so that the last chunk is the one marked LAST.
            if body.len() >= WRITE {
                self.chunk(&mut out, &body, false);
                replies.chunks += 1;
                let left = deadline.saturating_sub(started.elapsed());
                if let Err(f) = self.write(&out, left).await {
                    return Err(self.after_write_failure(f, replies).await);
                }
                sent += body.len() as u64;
                out.clear();
                body.clear();
                if let Err(f) = self.read_ready(&mut replies) {
                    // The replies read before it failed may say that BDAT was not known.
                    let failure = replies.chunking_failure(&f).unwrap_or(f);
                    return Err(fail(failure, false));
                }
                if let Some(r) = replies.chunking_refused() {
                    return Err(fail(refused_in_words(r), false));
                }
                if let Some(refusal) = replies.refusal() {
                    // Refused midway: the rest is not sent, and the transaction is abandoned with the connection.
                    return Err(fail(replies.refused(refusal), false));
                }
            }
            body.extend_from_slice(&piece);
        }
        // As through DATA, whose terminator supplies it: the message ends with a line end.
        if body.last().is_some_and(|b| *b != b'\n') {
            body.extend_from_slice(b"\r\n");
        }
        self.chunk(&mut out, &body, true);
        replies.chunks += 1;
        sent += body.len() as u64;
        self.note(&format!(
            "<message: {sent} bytes in {} BDAT chunk(s)>",
            replies.chunks
        ));
        let left = deadline.saturating_sub(started.elapsed());
        if let Err(f) = self.write(&out, left).await {
            return Err(self.after_write_failure(f, replies).await);
        }
        drop((out, body));

        // The server may hold every reply until it has dealt with the whole message (RFC 2920 lets it answer
        // once its input runs dry), so all of them get the final reply's wait, and a wait that runs out is not
        // "unanswered": the message may have been taken, and is not sent again at once.
        let until = tokio::time::Instant::now() + self.final_reply;
        while !replies.complete() {
            let left = until.saturating_duration_since(tokio::time::Instant::now());
            match self.reply_within(left).await {
                // The server is closing the connection (a reused one it had timed out): nothing was taken.
                Ok(r) if replies.seen == 0 && r.code == 421 => {
                    return Err(fail(Failure::Refused(r), true));
                }
                Ok(r) => {
                    let closing = r.code == 421;
                    replies.push(r);
                    if closing {
                        break;
                    }
                }
                Err(f) => {
                    // A hang-up now, with the whole message sent, is not taken for a server that does not know
                    // BDAT (one says so in words, read above, before it hangs up): it may have taken the message,
                    // which is not sent again at once, through DATA or on a fresh connection, but deferred, saying
                    // that it may arrive twice, as after DATA.
                    if let Some(r) = replies.chunking_refused() {
                        return Err(fail(refused_in_words(r), false));
                    }
                    if let Some(refusal) = replies.refusal() {
                        return Err(fail(replies.refused(refusal), false));
                    }
                    let timed_out = tokio::time::Instant::now() >= until;
                    // Bytes that did not parse were an answer of sorts: the message may have been taken.
                    let silent = self.buf.len() <= self.pos;
                    let unanswered = replies.seen == 0 && !timed_out && silent;
                    let failure = match f.after_whole_message() {
                        // No BDAT answered: a network fault, a server that crashed with the message, or one (a
                        // middlebox) that does not know BDAT after all; the next attempt uses DATA.
                        Failure::Dropped(why) if replies.seen <= replies.commands => {
                            Failure::DroppedAfterBdat(why)
                        }
                        other => other,
                    };
                    return Err(fail(failure, unanswered));
                }
            }
        }
        if let Some(r) = replies.chunking_refused() {
            return Err(fail(refused_in_words(r), false));
        }
        // More replies than commands (read between chunks, or already behind the last one, other than the 421 of
        // a server closing): the server is out of step, and which reply answered the message is not known. Sent
        // again rather than taken for delivered: a duplicate is better than a loss.
        let extra_buffered = matches!(
            reply::parse(&self.buf[self.pos..]),
            Ok(Some((ref r, _))) if r.code != 421
        );
        if replies.seen > replies.commands + replies.chunks || extra_buffered {
            return Err(fail(
                Failure::Connection(
                    "the upstream sent more replies than commands: whether it took the message is not known, so it is sent again (it may arrive twice)"
                        .into(),
                ),
                false,
            ));
        }
        let refused = match judge_envelope(&replies.envelope, commands.len() - 1) {
            Ok(refused) => refused,
            Err(reply) => return Err(fail(replies.refused(reply), false)),
        };
        if let Some(refusal) = replies.refusal() {
            return Err(fail(replies.refused(refusal), false));
        }
        match replies.last {
            // Taken. Anything the server sent after it (a 421 as it closes) keeps the connection out of the pool.
            Some(reply) if replies.complete() => {
                self.last_used = Instant::now();
                Ok(Sent { reply, refused })
            }
            _ => Err(fail(
                Failure::Connection(
                    "upstream stopped answering in the middle of the message".into(),
                ),
                false,
            )),
        }
    }

    /// A chunk could not be written (the server may have refused the transaction and closed): the replies that
    /// reached us say why, where there are any, rather than "connection lost".
    async fn after_write_failure(&mut self, failure: Failure, mut replies: Replies) -> SendFailure {
        let until = tokio::time::Instant::now() + Duration::from_secs(2);
        while replies.refusal().is_none() && !replies.complete() {
            let left = until.saturating_duration_since(tokio::time::Instant::now());
            match self.reply_within(left).await {
                Ok(r) => replies.push(r),
                Err(_) => break,
            }
        }
        // A server that does not know BDAT reads the chunk as commands and hangs up after too many errors.
        if let Some(failure) = replies.chunking_failure(&failure) {
            return SendFailure {
                failure,
                unanswered: false,
                reusable: false,
            };
        }
        match replies.refusal() {
            Some(r) => SendFailure {
                failure: replies.refused(r),
                unanswered: replies.closing_at_once(),
                reusable: false,
            },
            // LAST was not written whole: nothing can have been taken.
            None => SendFailure {
                failure,
                unanswered: replies.seen == 0,
                reusable: false,
            },
        }
    }

    /// The next whole reply already read, if there is one (into the transcript too).
    fn buffered_reply(&mut self) -> Result<Option<Reply>, Failure> {
        match reply::parse(&self.buf[self.pos..]) {
            Ok(Some((r, used))) => {
                self.pos += used;
                if let Some(t) = &self.transcript
                    && let Ok(mut t) = t.lock()
                {
                    t.server(&format_lines(&r));
                }
                Ok(Some(r))
            }
            Ok(None) => Ok(None),
            Err(e) => Err(Failure::Connection(format!(
                "upstream sent a malformed reply: {e}"
            ))),
        }
    }

    /// Parses the replies that have already arrived, without waiting (between chunks of a large message).
    fn read_ready(&mut self, replies: &mut Replies) -> Result<(), Failure> {
        let mut chunk = [0u8; 4096];
        loop {
            while let Some(r) = self.buffered_reply()? {
                replies.push(r);
            }
            self.buf.drain(..self.pos);
            self.pos = 0;
            let waker = std::task::Waker::noop();
            let mut cx = Context::from_waker(waker);
            let mut read = ReadBuf::new(&mut chunk);
            match Pin::new(&mut self.stream).poll_read(&mut cx, &mut read) {
                Poll::Ready(Ok(())) if !read.filled().is_empty() => {
                    self.buf.extend_from_slice(read.filled());
                }
                // Closed: the next write or read says so.
                Poll::Ready(Ok(())) | Poll::Pending => return Ok(()),
                Poll::Ready(Err(e)) => {
                    return Err(Failure::Dropped(format!("upstream connection lost: {e}")));
                }
            }
        }
    }

    /// Appends one BDAT command and its bytes to `out`.
    fn chunk(&self, out: &mut Vec<u8>, bytes: &[u8], last: bool) {
        let command = if last {
            format!("BDAT {} LAST", bytes.len())
        } else {
            format!("BDAT {}", bytes.len())
        };
        self.client_line(&command);
        out.reserve(command.len() + 2 + bytes.len());
        out.extend_from_slice(command.as_bytes());
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(bytes);
    }

    async fn body(&mut self, message: &Outgoing) -> Result<(), Failure> {
        let deadline = self.timeout + Duration::from_secs(message.len() / SLOW_RATE);
        let started = Instant::now();
        let mut chunks = message.chunks(true);
        let mut stuffer = DotStuffer::default();
        // Sized for the message (plus room for stuffing and the terminator) when it is smaller than a write.
        let expected =
            usize::try_from(message.len()).map_or(WRITE, |n| n.saturating_add(n / 32 + 8));
        let mut out = Vec::with_capacity(expected.min(WRITE + WRITE / 4));
        let mut sent = 0u64;
        loop {
            let piece = chunks.next().await.map_err(|e| {
                Failure::Connection(format!("cannot read the queue file while sending: {e}"))
            })?;
            let Some(piece) = piece else { break };
            // Written only once more follows, so that the terminator always goes with the last bytes.
            if out.len() >= WRITE {
                let left = deadline.saturating_sub(started.elapsed());
                self.write(&out, left).await?;
                sent += out.len() as u64;
                out.clear();
            }
            stuffer.feed(&piece, &mut out);
        }
        stuffer.finish(&mut out);
        sent += out.len() as u64;
        self.note(&format!(
            "<message: {sent} bytes, dot-stuffed, then CRLF.CRLF>"
        ));
        let left = deadline.saturating_sub(started.elapsed());
        self.write(&out, left).await
    }

    /// After a refused transaction: back to a clean state, or `false` when the connection is no good.
    async fn rset(&mut self) -> bool {
        matches!(self.command("RSET").await, Ok(r) if r.code == 250)
    }

    /// Says goodbye; errors do not matter any more.
    pub async fn quit(mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(5), self.command("QUIT")).await;
    }

    async fn command(&mut self, line: &str) -> Result<Reply, Failure> {
        self.client_line(line);
        let mut bytes = Vec::with_capacity(line.len() + 2);
        bytes.extend_from_slice(line.as_bytes());
        bytes.extend_from_slice(b"\r\n");
        self.write(&bytes, self.timeout).await?;
        self.reply().await
    }

    async fn write(&mut self, bytes: &[u8], within: Duration) -> Result<(), Failure> {
        let write = async {
            self.stream.write_all(bytes).await?;
            self.stream.flush().await
        };
        match tokio::time::timeout(within, write).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Failure::Dropped(format!(
                "upstream connection lost while sending: {e}"
            ))),
            Err(_) => Err(Failure::Connection(format!(
                "upstream took more than {} to take the data (smtp_timeout)",
                whole_seconds(within)
            ))),
        }
    }

    /// Whether nothing the server sent is left unread: only then do the next replies belong to the next
    /// commands.
    pub fn is_clean(&self) -> bool {
        self.pos >= self.buf.len()
    }

    /// Whether a connection back from the pool is as it was left: nothing unread, and nothing arrived since. A late
    /// reply would be read as the answer to the next command (a message refused with 554 would be taken for
    /// delivered); a close or a 421 says it is gone. Either way it is not used. Does not wait.
    pub fn is_quiet(&mut self) -> bool {
        // A task that has used up its cooperative budget gets Pending from tokio without a look at the socket:
        // that says nothing, so the connection is not taken for quiet.
        if !self.is_clean() || !tokio::task::coop::has_budget_remaining() {
            return false;
        }
        let mut chunk = [0u8; 512];
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut read = ReadBuf::new(&mut chunk);
        matches!(
            Pin::new(&mut self.stream).poll_read(&mut cx, &mut read),
            Poll::Pending
        )
    }

    /// The next reply, within the step's timeout.
    async fn reply(&mut self) -> Result<Reply, Failure> {
        self.reply_within(self.timeout).await
    }

    /// The next reply: from what is buffered, else read; the whole reply within `limit` (a server trickling a
    /// byte at a time does not get a new timeout for each).
    async fn reply_within(&mut self, limit: Duration) -> Result<Reply, Failure> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if self.buf.len() - self.pos > reply::MAX_REPLY
                && matches!(
                    reply::parse(&self.buf[self.pos..]),
                    Err(reply::ReplyError::TooLong)
                )
            {
                return self.skim(deadline, limit).await;
            }
            if let Some(r) = self.buffered_reply()? {
                return Ok(r);
            }
            // Whatever was parsed goes; an incomplete reply moves to the front.
            self.buf.drain(..self.pos);
            self.pos = 0;
            let mut chunk = [0u8; 4096];
            let Some(n) = self.read_by(&mut chunk, deadline).await? else {
                return Err(Failure::Connection(format!(
                    "upstream did not answer within {} (smtp_timeout)",
                    whole_seconds(limit)
                )));
            };
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// A reply too long to keep, read through to its end within the same time limit (see [`reply::Skim`]).
    async fn skim(
        &mut self,
        deadline: tokio::time::Instant,
        limit: Duration,
    ) -> Result<Reply, Failure> {
        let malformed = |e: reply::ReplyError| {
            Failure::Connection(format!("upstream sent a malformed reply: {e}"))
        };
        let mut skim = reply::Skim::default();
        let mut pending = std::mem::take(&mut self.buf).split_off(self.pos);
        self.pos = 0;
        loop {
            if let Some((r, used)) = skim.feed(&pending).map_err(malformed)? {
                // What came after it is the next reply's.
                self.buf = pending.split_off(used);
                if let Some(t) = &self.transcript
                    && let Ok(mut t) = t.lock()
                {
                    t.server(&format_lines(&r));
                }
                return Ok(r);
            }
            pending.clear();
            pending.resize(4096, 0);
            let Some(n) = self.read_by(&mut pending, deadline).await? else {
                return Err(Failure::Connection(format!(
                    "upstream's reply did not end within {} (smtp_timeout); it was over {} bytes",
                    whole_seconds(limit),
                    reply::MAX_REPLY
                )));
            };
            pending.truncate(n);
        }
    }

    /// One read by `deadline`: how many bytes, or `None` when the time ran out; a close is an error (a reply was
    /// expected).
    async fn read_by(
        &mut self,
        into: &mut [u8],
        deadline: tokio::time::Instant,
    ) -> Result<Option<usize>, Failure> {
        match tokio::time::timeout_at(deadline, self.stream.read(into)).await {
            Ok(Ok(0)) => Err(Failure::Dropped("upstream closed the connection".into())),
            Ok(Ok(n)) => Ok(Some(n)),
            Ok(Err(e)) => Err(Failure::Dropped(format!("upstream connection lost: {e}"))),
            Err(_) => Ok(None),
        }
    }

    fn client_line(&self, line: &str) {
        if let Some(t) = &self.transcript
            && let Ok(mut t) = t.lock()
        {
            t.client(line);
        }
    }

    fn note(&self, line: &str) {
        if let Some(t) = &self.transcript
            && let Ok(mut t) = t.lock()
        {
            t.note(line);
        }
    }
}

/// A reply's lines as the server wrote them (for the transcript).
fn format_lines(r: &Reply) -> String {
    let status = r
        .status
        .map(|[a, b, c]| format!("{a}.{b}.{c} "))
        .unwrap_or_default();
    let lines: Vec<&str> = r.text.split('\n').collect();
    let last = lines.len() - 1;
    lines
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let sep = if i == last { ' ' } else { '-' };
            format!("{}{sep}{status}{}", r.code, l.trim_end_matches('\r'))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The TLS session, or why not and whether it timed out.
async fn handshake(s: &Settings, tcp: TcpStream) -> Result<TlsStream<TcpStream>, (Failure, bool)> {
    let name = ServerName::try_from(s.host.clone()).map_err(|e| {
        (
            Failure::Connection(format!("upstream {}: not a TLS server name: {e}", s.host)),
            false,
        )
    })?;
    let connector = tokio_rustls::TlsConnector::from(s.tls_config.clone());
    match tokio::time::timeout(s.timeout, connector.connect(name, tcp)).await {
        Ok(Ok(tls)) => Ok(tls),
        Ok(Err(e)) => Err((
            Failure::Connection(format!("upstream {}:{}: TLS: {e}", s.host, s.port)),
            false,
        )),
        Err(_) => Err((
            Failure::Connection(format!(
                "upstream {}:{}: TLS handshake timed out (smtp_timeout)",
                s.host, s.port
            )),
            true,
        )),
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// A BDAT the server answered as a command it does not know.
fn refused_in_words(reply: String) -> Failure {
    Failure::ChunkingRefused {
        why: reply,
        definite: true,
    }
}

/// A SASL authorization identity as RFC 5801's gs2-header writes it: `=` and `,` escaped.
fn sasl_name(user: &str) -> String {
    user.replace('=', "=3D").replace(',', "=2C")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(code: u16) -> Reply {
        Reply {
            code,
            status: None,
            text: format!("reply {code}"),
        }
    }

    #[test]
    fn sasl_names_escape_what_the_gs2_header_uses() {
        assert_eq!(sasl_name("relay@example.com"), "relay@example.com");
        assert_eq!(sasl_name("a,b=c@d"), "a=2Cb=3Dc@d");
    }

    #[test]
    fn every_recipient_refused_is_refused_each() {
        let each =
            |replies: &[Reply], n, standing: u16| match refused_whole(replies, n, r(standing)) {
                Failure::EachRefused {
                    standing: s,
                    each,
                    after_data,
                } => {
                    assert_eq!(s, r(standing));
                    Some((each, after_data))
                }
                Failure::Refused(s) => {
                    assert_eq!(s, r(standing));
                    None
                }
                other => panic!("{other:?}"),
            };
        assert_eq!(
            each(&[r(250), r(550), r(451), r(554)], 2, 451),
            Some((vec![(0, r(550)), (1, r(451))], false))
        );
        assert_eq!(
            each(&[r(250), r(550), r(550), r(554)], 2, 550),
            Some((vec![(0, r(550)), (1, r(550))], false))
        );
        assert_eq!(
            each(&[r(250), r(550), r(354)], 1, 550),
            Some((vec![(0, r(550))], false))
        );
        // Every recipient refused, then DATA answered with a 421: each still its own.
        assert_eq!(
            each(&[r(250), r(550), r(550), r(421)], 2, 421),
            Some((vec![(0, r(550)), (1, r(550))], false))
        );
        // Some recipients refused at RCPT and the message refused for good: each its own, the others the
        // message's (a 552 among them: to the message it is final, whatever it means to a RCPT).
        assert_eq!(
            each(&[r(250), r(550), r(250), r(354)], 2, 552),
            Some((vec![(0, r(550)), (1, r(552))], true))
        );
        assert_eq!(
            each(&[r(250), r(550), r(450), r(250), r(354)], 3, 554),
            Some((vec![(0, r(550)), (1, r(554)), (2, r(554))], true))
        );
        // Only refused for now at RCPT, then the message refused for good: one reason for all, the message's.
        assert_eq!(each(&[r(250), r(450), r(250), r(354)], 2, 554), None);
        // The message refused for now: all of it waits, one reply.
        assert_eq!(each(&[r(250), r(550), r(250), r(354)], 2, 451), None);
        // No recipient refused, MAIL refused, a 421 among the RCPTs, replies cut short: not this.
        assert_eq!(each(&[r(250), r(250), r(250), r(354)], 2, 554), None);
        assert_eq!(each(&[r(550), r(550), r(451)], 2, 550), None);
        assert_eq!(each(&[r(250), r(550), r(421)], 2, 421), None);
        assert_eq!(each(&[r(250), r(550)], 2, 550), None);
    }

    #[test]
    fn all_accepted_sends_the_data() {
        let v = judge(&[r(250), r(250), r(250), r(354)], 2);
        assert_eq!(v, Verdict::Data { refused: vec![] });
    }

    #[test]
    fn some_refused_still_sends_to_the_others() {
        let v = judge(&[r(250), r(250), r(550), r(451), r(354)], 3);
        assert_eq!(
            v,
            Verdict::Data {
                refused: vec![(1, r(550)), (2, r(451))]
            }
        );
        // 452 too many recipients: one more refused recipient, no more.
        let v = judge(&[r(250), r(452), r(250), r(354)], 2);
        assert_eq!(
            v,
            Verdict::Data {
                refused: vec![(0, r(452))]
            }
        );
    }

    #[test]
    fn no_transaction_is_a_refusal_with_the_reply_that_ended_it() {
        // (replies to MAIL, RCPT… and DATA; recipients; the reply the message is refused with)
        let cases: [(&[u16], usize, u16); 9] = [
            // None accepted: a refusal for now if there is one (the message waits, nobody is bounced for a
            // recipient that could still take it), else the first.
            (&[250, 550, 451, 554], 2, 451),
            (&[250, 550, 553, 554], 2, 550),
            // Cut short (one at a time): no DATA was sent.
            (&[250, 550, 451], 2, 451),
            // A server that says 354 all the same: still refused (the caller drops the connection).
            (&[250, 550, 354], 1, 550),
            (&[550, 503, 503], 1, 550),
            // DATA refused although a recipient was accepted.
            (&[250, 250, 451], 1, 451),
            // The server is closing: whatever it accepted.
            (&[250, 250, 421], 2, 421),
            (&[250, 250, 421, 421], 2, 421),
            (&[], 1, 421),
        ];
        for (codes, n, refused) in cases {
            let replies: Vec<Reply> = codes.iter().map(|&c| r(c)).collect();
            match judge(&replies, n) {
                Verdict::Refused(reply) => assert_eq!(reply.code, refused, "{codes:?}"),
                v => panic!("{codes:?}: {v:?}"),
            }
        }
    }

    /// A scripted upstream on a loopback port: `answer` gives the reply to each command (EHLO and AUTH included;
    /// the data lines are not shown to it). Returns the port and, once the client quits, the commands seen after
    /// AUTH.
    async fn scripted(
        answer: fn(&str) -> &'static [u8],
    ) -> (u16, tokio::task::JoinHandle<Vec<String>>) {
        use tokio::io::{AsyncBufReadExt, AsyncReadExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut s = tokio::io::BufReader::new(tcp);
            s.get_mut().write_all(b"220 hi\r\n").await.unwrap();
            let mut seen = Vec::new();
            let mut line = String::new();
            let mut in_data = false;
            while s.read_line(&mut line).await.unwrap_or(0) > 0 {
                let cmd = line.trim_end().to_string();
                line.clear();
                if in_data && cmd != "." {
                    continue;
                }
                in_data = cmd == "DATA";
                if let Some(n) = cmd.strip_prefix("BDAT ") {
                    let n: usize = n.split(' ').next().unwrap().parse().unwrap();
                    let mut bytes = vec![0u8; n];
                    s.read_exact(&mut bytes).await.unwrap();
                    seen.push(cmd.clone());
                    seen.push(if n <= 100 {
                        String::from_utf8_lossy(&bytes).into_owned()
                    } else {
                        format!("<{n} bytes>")
                    });
                    if s.get_mut().write_all(answer(&cmd)).await.is_err() {
                        break;
                    }
                    continue;
                }
                if cmd == "QUIT" {
                    break;
                }
                if !cmd.starts_with("AUTH") && !cmd.starts_with("EHLO") {
                    seen.push(cmd.clone());
                }
                if s.get_mut().write_all(answer(&cmd)).await.is_err() {
                    break;
                }
            }
            seen
        });
        (port, server)
    }

    /// EHLO replies: a server that offers no more than XOAUTH2, one with PIPELINING, one with CHUNKING too.
    const ONE_AT_A_TIME: &[u8] = b"250-hi\r\n250 AUTH XOAUTH2\r\n";
    const PIPELINING: &[u8] = b"250-hi\r\n250-PIPELINING\r\n250 AUTH XOAUTH2\r\n";
    const CHUNKING: &[u8] = b"250-hi\r\n250-PIPELINING\r\n250-CHUNKING\r\n250 AUTH XOAUTH2\r\n";

    /// A connection, logged in, to a [`scripted`] server; and the commands the server saw.
    async fn connected(
        answer: fn(&str) -> &'static [u8],
    ) -> (Conn, tokio::task::JoinHandle<Vec<String>>) {
        let (port, server) = scripted(answer).await;
        (connect(port).await, server)
    }

    /// `message` from me@x.test to `to`, with no MAIL parameters.
    async fn send(conn: &mut Conn, to: &[&str], message: Vec<u8>) -> Result<Sent, SendFailure> {
        let to: Vec<String> = to.iter().map(|t| t.to_string()).collect();
        conn.send(
            "me@x.test",
            &to,
            &Outgoing::from_bytes(message),
            MailFlags::default(),
        )
        .await
    }

    async fn connect(port: u16) -> Conn {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let tls_config = rustls::ClientConfig::builder()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let settings = Settings {
            host: "127.0.0.1".into(),
            port,
            tls: TlsMode::None,
            tls_config: Arc::new(tls_config),
            timeout: Duration::from_secs(10),
            final_reply: Duration::from_secs(10),
            helo: "test".into(),
        };
        let token = SecretString::from("t");
        Conn::open(&settings, "me@x.test", &token, None, None)
            .await
            .unwrap()
    }

    /// A reply that arrived while the connection was idle is seen even by a task that has used up its
    /// cooperative budget (tokio then answers Pending without looking at the socket).
    #[tokio::test]
    async fn a_connection_with_something_unread_is_never_quiet() {
        let (mut conn, _server) = connected(|cmd| match cmd {
            c if c.starts_with("EHLO") => ONE_AT_A_TIME,
            c if c.starts_with("AUTH") => b"235 ok\r\n",
            _ => b"250 2.0.0 OK\r\n",
        })
        .await;
        assert!(conn.is_quiet(), "nothing unread");
        // A command whose reply is not read: bytes wait in the socket, as a late reply would.
        conn.write(b"RSET\r\n", Duration::from_secs(10))
            .await
            .unwrap();
        let Stream::Plain(tcp) = &conn.stream else {
            unreachable!("plain TCP")
        };
        tokio::time::timeout(Duration::from_secs(10), tcp.readable())
            .await
            .unwrap()
            .unwrap();
        // Use up the budget: each ready receive takes one unit.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for _ in 0..1000 {
            tx.send(()).unwrap();
        }
        while tokio::task::coop::has_budget_remaining() {
            let _ = rx.recv().await;
        }
        assert!(!conn.is_quiet(), "something arrived");
    }

    async fn seen(server: tokio::task::JoinHandle<Vec<String>>) -> Vec<String> {
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .unwrap()
            .unwrap()
    }

    /// A server without PIPELINING, one command at a time: a refused RCPT does not end the transaction, and the
    /// message goes to the others.
    #[tokio::test]
    async fn one_at_a_time_a_refused_recipient_does_not_stop_the_others() {
        let (mut conn, server) = connected(|cmd| match cmd {
            c if c.starts_with("EHLO") => ONE_AT_A_TIME,
            c if c.starts_with("AUTH") => b"235 ok\r\n",
            "RCPT TO:<b@x.test>" => b"550 5.1.1 unknown\r\n",
            "DATA" => b"354 go\r\n",
            "." => b"250 2.0.0 queued\r\n",
            _ => b"250 ok\r\n",
        })
        .await;
        let to = ["a@x.test", "b@x.test", "c@x.test"];
        let sent = send(&mut conn, &to, b"Subject: x\r\n\r\nhi\r\n".to_vec())
            .await
            .unwrap();
        assert_eq!(sent.reply.code, 250);
        assert_eq!(sent.refused.len(), 1);
        assert_eq!((sent.refused[0].0, sent.refused[0].1.code), (1, 550));
        conn.quit().await;
        assert_eq!(
            seen(server).await[..5],
            [
                "MAIL FROM:<me@x.test>",
                "RCPT TO:<a@x.test>",
                "RCPT TO:<b@x.test>",
                "RCPT TO:<c@x.test>",
                "DATA"
            ]
        );
    }

    /// A pipelining server out of step (a reply too many): nothing is sent, since the stray reply would be taken
    /// for the answer to the final dot, and the connection is not kept.
    #[tokio::test]
    async fn a_reply_too_many_drops_the_connection_before_the_body() {
        let (mut conn, server) = connected(|cmd| match cmd {
            c if c.starts_with("EHLO") => PIPELINING,
            c if c.starts_with("AUTH") => b"235 ok\r\n",
            "DATA" => b"354 go\r\n250 2.0.0 stray\r\n",
            "." => b"250 2.0.0 queued\r\n",
            _ => b"250 ok\r\n",
        })
        .await;
        let failed = send(
            &mut conn,
            &["a@x.test"],
            b"Subject: x\r\n\r\nhi\r\n".to_vec(),
        )
        .await
        .unwrap_err();
        assert!(!failed.reusable);
        assert!(matches!(failed.failure, Failure::Connection(_)));
        drop(conn);
        assert!(!seen(server).await.iter().any(|c| c == "."), "no body went");
    }

    /// CHUNKING with PIPELINING: MAIL, RCPT and `BDAT n LAST` with the message, as it is (no dot-stuffing; a
    /// missing last line end added, as DATA's terminator would); a large message in several chunks, the last one
    /// marked LAST; and the connection carries the next message.
    #[tokio::test]
    async fn chunking_sends_the_message_as_it_is_in_bdat_chunks() {
        let (mut conn, server) = connected(|cmd| match cmd {
            c if c.starts_with("EHLO") => CHUNKING,
            c if c.starts_with("AUTH") => b"235 ok\r\n",
            c if c.starts_with("BDAT") && c.ends_with("LAST") => b"250 2.0.0 queued\r\n",
            _ => b"250 ok\r\n",
        })
        .await;
        let sent = send(&mut conn, &["a@x.test"], b"Subject: x\r\n\r\n.hi".to_vec())
            .await
            .unwrap();
        assert_eq!(sent.reply.code, 250);
        let mut big = b"Subject: big\r\n\r\n".to_vec();
        while big.len() < 3 * WRITE {
            big.extend_from_slice(&[b'x'; 76]);
            big.extend_from_slice(b"\r\n");
        }
        let big_len = big.len();
        let sent = send(&mut conn, &["a@x.test"], big).await.unwrap();
        assert_eq!(sent.reply.code, 250);
        conn.quit().await;
        let seen = seen(server).await;
        assert_eq!(
            seen[..4],
            [
                "MAIL FROM:<me@x.test>",
                "RCPT TO:<a@x.test>",
                "BDAT 19 LAST",
                "Subject: x\r\n\r\n.hi\r\n"
            ]
        );
        let chunks: Vec<usize> = seen[6..]
            .iter()
            .filter_map(|c| c.strip_prefix("BDAT "))
            .map(|c| c.trim_end_matches(" LAST").parse().unwrap())
            .collect();
        assert!(chunks.len() > 1, "{seen:?}");
        assert_eq!(chunks.iter().sum::<usize>(), big_len);
        let bdats: Vec<&String> = seen.iter().filter(|c| c.starts_with("BDAT ")).collect();
        assert!(bdats.last().unwrap().ends_with(" LAST"), "{seen:?}");
        assert_eq!(bdats.iter().filter(|c| c.ends_with(" LAST")).count(), 2);
    }

    /// Every recipient refused: the server still reads the chunk and refuses it; the RCPT's reply is the
    /// message's, and the connection is not used again (one reconnect costs less than a server out of step).
    #[tokio::test]
    async fn chunking_with_every_recipient_refused_says_the_recipients_reply() {
        let (mut conn, server) = connected(|cmd| match cmd {
            c if c.starts_with("EHLO") => CHUNKING,
            c if c.starts_with("AUTH") => b"235 ok\r\n",
            "RCPT TO:<gone@x.test>" => b"550 5.1.1 unknown\r\n",
            c if c.starts_with("BDAT") => b"554 5.5.1 no valid recipients\r\n",
            _ => b"250 ok\r\n",
        })
        .await;
        let failed = send(
            &mut conn,
            &["gone@x.test"],
            b"Subject: x\r\n\r\nhi\r\n".to_vec(),
        )
        .await
        .unwrap_err();
        assert!(
            matches!(&failed.failure, Failure::EachRefused { standing, each, .. } if standing.code == 550 && each.len() == 1),
            "{failed:?}"
        );
        assert!(!failed.reusable && !failed.unanswered, "{failed:?}");
        drop(conn);
        assert!(seen(server).await.iter().any(|c| c == "BDAT 18 LAST"));
    }

    /// A large message whose MAIL is refused (its SIZE, say): the refusal is what the send says, however far the
    /// upload got, and the connection is not used again.
    #[tokio::test]
    async fn chunking_a_refused_large_message_says_the_refusal() {
        let (mut conn, server) = connected(|cmd| match cmd {
            c if c.starts_with("EHLO") => CHUNKING,
            c if c.starts_with("AUTH") => b"235 ok\r\n",
            c if c.starts_with("MAIL") => b"552 5.3.4 message too big\r\n",
            c if c.starts_with("BDAT") => b"503 5.5.1 no transaction\r\n",
            _ => b"250 ok\r\n",
        })
        .await;
        let big = vec![b'x'; 4 * WRITE]
            .chunks(78)
            .flat_map(|l| l.iter().copied().chain(*b"\r\n"))
            .collect::<Vec<u8>>();
        let failed = send(&mut conn, &["a@x.test"], big).await.unwrap_err();
        assert!(
            matches!(&failed.failure, Failure::Refused(r) if r.code == 552),
            "{failed:?}"
        );
        assert!(!failed.reusable && !failed.unanswered, "{failed:?}");
        drop(conn);
        let seen = seen(server).await;
        assert!(
            seen.iter().filter(|c| c.ends_with(" LAST")).count() <= 1,
            "{seen:?}"
        );
    }
}
