//! Upstream transports. One module per transport (`smtp`, `graph`, `gmail`, with `http` for what the two HTTP
//! APIs share and `mime` for the little of a message's structure they need); `transports` picks one per account
//! and handles the fallback from SMTP to Graph. Each turns a delivery into an [`Outcome`] the queue acts on
//! without looking inside it.

// Not a transport: what an upstream's refusal means, and its fix.
pub mod diagnosis;
pub mod gmail;
pub mod graph;
mod http;
pub mod kept;
// Not a transport: makes lines over 998 octets fit the SMTP one.
pub mod long_lines;
pub mod mime;
// Not a transport: the queued message as every transport reads it, in pieces from its file.
pub mod outgoing;
// Not a transport: the sender and message every transport is given, per rewrite_from.
pub mod rewrite;
pub mod smtp;
// Not a transport: what `relay test` shows of a conversation.
pub mod transcript;
pub mod transports;

use std::time::Duration;

pub use transports::Transports;

/// The largest message an account's transport can send, where relay knows it (the HTTP APIs'; an SMTP upstream
/// says its own in EHLO's SIZE, which is not known when a device sends): larger mail is refused at its end of
/// data (552 5.3.4) rather than taken, then bounced or left in dead/ where the device never hears of it.
pub fn largest_message(account: &crate::config::AccountConfig) -> Option<u64> {
    match account.transport {
        crate::config::Transport::GmailApi => Some(gmail::MESSAGE_LIMIT as u64),
        crate::config::Transport::Graph => Some(graph::MESSAGE_LIMIT),
        crate::config::Transport::Smtp => None,
    }
}

/// How long an account pauses when its provider says a daily sending quota is used up and names no time.
pub const QUOTA_PAUSE: Duration = Duration::from_secs(3600);

/// Between an upstream's refusal of a token and why no new one could be had, in a deferral's words: what comes
/// after it is the cause to diagnose (the refusal alone read as Exchange's "tick Authenticated SMTP" while the
/// token endpoint was down).
pub const NO_NEW_TOKEN: &str = ", and a new one could not be had: ";

/// What became of one delivery attempt, and so what the queue does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Accepted upstream: remove from the queue. Carries the upstream reply.
    Delivered(String),
    /// Accepted for some recipients, refused for the others (SMTP only: the HTTP APIs take all or none).
    /// `reply` is the upstream's reply to the message; `refused` never holds every recipient.
    Partial {
        reply: String,
        refused: Vec<Refusal>,
    },
    /// Taken for none of its recipients, each refused with its own reply, at least one for good (SMTP only). Those
    /// refused for good are bounced, the others wait; all refused for good, the message is dead. `reply` stands
    /// for them all where one is needed (a refusal for now, if there is one).
    Refused {
        reply: String,
        refused: Vec<Refusal>,
    },
    /// Try again later (4xx, connection or TLS trouble, no token yet).
    Transient(String),
    /// MAIL was taken and every recipient refused for now (a full mailbox, "receiving mail too quickly"; SMTP
    /// only): deferred as [`Outcome::Transient`] is, but the upstream took the account's login and sender, so
    /// the account is not failing for it.
    RecipientsDeferred(String),
    /// The provider asked relay to wait (HTTP 429/503/504 with `Retry-After`): not before this long.
    Throttled(String, Duration),
    /// Refused for good (5xx): move to `dead/`.
    Permanent(String),
    /// The upstream refused the token (535, HTTP 401): refresh once and retry, then defer.
    AuthRejected(String),
    /// The upstream refused one more connection (a 421 to the session that says so, as servers answer past
    /// their per-client connection limit; Exchange Online's `432 4.3.2` concurrency limits): about how many
    /// connections the account has open, not about the message. With others of the account open, the message
    /// waits for one of them; with none, it is a deferral like any 4xx. `offered`: the message was sent (and
    /// refused whole), so that it counts toward the per-minute limit as an offered message does.
    Busy { reply: String, offered: bool },
    /// Not tried: the upstream could not be reached a moment ago (`smtp/reach.rs`; `reply` says why). Until
    /// `until` no connection to it is tried; `None`: another connection is trying it now. Not an attempt: the
    /// message waits for its account, as for a connection.
    Unreachable {
        reply: String,
        until: Option<std::time::Instant>,
    },
    /// Not tried: the upstream refused the account's freshly fetched token a moment ago (an app without the
    /// permission, a disabled mailbox), and the hold on it lasts until `until`. Not an attempt either: the
    /// message waits for the hold's end without using a step of its retry schedule.
    Held {
        reply: String,
        /// The message went out and was refused (with the account's token), rather than not being tried.
        tried: bool,
    },
}

impl Outcome {
    /// The upstream's words, whatever the outcome.
    pub fn reply(&self) -> &str {
        match self {
            Outcome::Delivered(r)
            | Outcome::Partial { reply: r, .. }
            | Outcome::Refused { reply: r, .. }
            | Outcome::Transient(r)
            | Outcome::RecipientsDeferred(r)
            | Outcome::Throttled(r, _)
            | Outcome::Permanent(r)
            | Outcome::AuthRejected(r)
            | Outcome::Busy { reply: r, .. }
            | Outcome::Unreachable { reply: r, .. }
            | Outcome::Held { reply: r, .. } => r,
        }
    }
}

/// A recipient the upstream refused while it took the message for others.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// As in the queued envelope (not as quoted on the wire).
    pub recipient: String,
    /// The reply to its RCPT, as logged.
    pub reply: String,
    /// 5xx: failed for good; else (4xx) it is tried again.
    pub permanent: bool,
}

/// What the SMTP upstream is told about a message beyond its addresses (the HTTP APIs need neither).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MailFlags {
    /// The body has 8-bit octets: `BODY=8BITMIME` where the server offers it. Declared by the client, or seen
    /// in the bytes: devices often send 8-bit text undeclared.
    pub eight_bit: bool,
    /// The client declared `SMTPUTF8` (RFC 6531): passed on where the server offers it. Non-ASCII addresses
    /// need it whatever the client said.
    pub smtputf8: bool,
}

impl MailFlags {
    /// For relay's own messages (tests, alerts): 8-bit where the server takes it, so that UTF-8 text in them
    /// needs no encoding.
    pub const OWN: MailFlags = MailFlags {
        eight_bit: true,
        smtputf8: false,
    };
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("upstream set-up: {0}")]
    Setup(String),
}
