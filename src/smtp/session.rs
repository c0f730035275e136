//! One SMTP session as a state machine: bytes in, steps out. No sockets, no files, no clocks, so every reply
//! code and every odd input is a unit test (and a fuzz target).
//!
//! The connection code asks [`Session::next`] what to do with the bytes it has; a [`Step`] either carries a
//! reply to send or asks it to do something only it can (check a password, start TLS, receive a body).

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use secrecy::SecretString;
use smtp_proto::{
    AUTH_LOGIN, AUTH_PLAIN, Error as ParseError, MAIL_BODY_8BITMIME, MAIL_BODY_BINARYMIME,
    MAIL_SMTPUTF8, Request,
};

use super::data::{DataReceiver, Progress};
use super::reply::Reply;
use crate::config::{AuthPolicy, BareLineEndings};
use crate::queue::room::Admission;
use crate::queue::{Envelope, QueueId};

/// MAIL, RCPT or DATA at the start of a command line that did not parse, for the refusal's log line.
fn mail_verb(line: &[u8]) -> Option<&'static str> {
    let verb = line.get(..4)?;
    ["MAIL", "RCPT", "DATA"]
        .into_iter()
        .find(|v| verb.eq_ignore_ascii_case(v.as_bytes()))
}

/// What a MAIL or RCPT line that did not parse gave as its address (the first word after the colon, bytes that are
/// not UTF-8 as U+FFFD), for the refusal's log line, which escapes it: "address=\"\"" says nothing to the admin.
fn raw_path(line: &[u8]) -> String {
    let Some(colon) = line.iter().position(|&b| b == b':') else {
        return String::new();
    };
    let rest = line[colon + 1..].trim_ascii_start();
    // A bracketed path to its `>`, spaces and all (`<bad address@@>` was named `<bad`); else up to a space.
    let end = match rest.first() {
        Some(b'<') => rest
            .iter()
            .position(|&b| b == b'>')
            .map_or(rest.len(), |i| i + 1),
        _ => rest
            .iter()
            .position(|b| b.is_ascii_whitespace())
            .unwrap_or(rest.len()),
    };
    String::from_utf8_lossy(&rest[..end.min(256)]).into_owned()
}

/// Longest command line we accept; RFC 5321 asks for 512, AUTH lines and extensions need more.
pub const MAX_LINE: usize = 4096;
/// Unrecognised or malformed commands before we hang up (a client that is not speaking SMTP).
const MAX_ERRORS: u32 = 10;
/// NOOP, RSET, VRFY and HELP a client may send between two messages (Postfix's `smtpd_junk_command_limit`);
/// past it each counts as an error, so that a client cannot hold a connection forever without sending mail.
const MAX_JUNK: u32 = 100;
/// Failed AUTH attempts before we hang up; each one is also delayed by the connection code.
const MAX_AUTH_FAILURES: u32 = 3;
/// Recipients given again or past `max_recipients` (answered 452) in one transaction before each further one
/// counts as an error, so that a RCPT loop ends too. Far above Postfix's `smtpd_recipient_overshoot_limit` (1000,
/// with 20 errors after it): a long list sent in one go (the union of overlapping lists) must never be cut off.
const RECIPIENT_SURPLUS: u32 = 10_000;

/// What a listener allows; shared by all its sessions.
#[derive(Debug, Clone)]
pub struct Policy {
    pub hostname: String,
    pub listener: String,
    pub auth: AuthPolicy,
    pub plaintext_auth: bool,
    /// STARTTLS is offered (a `starttls` listener that has not started TLS yet).
    pub starttls: bool,
    pub bare_lf: BareLineEndings,
    pub max_message_size: u64,
    pub max_recipients: usize,
    /// Where mail to `<postmaster>` goes (RFC 5321 section 4.5.1); `None`: refused, with the key to set.
    pub postmaster: Option<String>,
}

/// Credentials a client presented; the connection code checks them and calls [`Session::auth_succeeded`]
/// or [`Session::auth_failed`].
#[derive(Debug)]
pub struct Credentials {
    pub mechanism: &'static str,
    pub username: String,
    pub password: SecretString,
    /// Refused before any password check, and why: the connection code still counts, delays and logs it as a
    /// failed login, so that such attempts are no faster and no quieter than a wrong password.
    pub refused: Option<&'static str>,
}

#[derive(Debug)]
pub enum Step {
    /// Send this reply; then ask again.
    Reply(Reply),
    /// Check these credentials, then call [`Session::auth_succeeded`] or [`Session::auth_failed`].
    Authenticate(Credentials),
    /// Send this reply, throw away any input already buffered (RFC 3207 section 4.2), start TLS and call
    /// [`Session::tls_started`].
    StartTls(Reply),
    /// Send this 354 reply; the body follows: feed it to [`Session::feed_data`].
    Data(Reply),
    /// A MAIL command passed every check of the session: see whether the queue has room for a message of this
    /// many bytes (0 when the client declared no SIZE), then call [`Session::room_checked`].
    Room(u64),
    /// Send this reply and close the connection.
    Close(Reply),
    /// Every buffered byte is used up: read more.
    NeedInput,
}

/// The envelope of the message being received.
#[derive(Debug, Clone, Default)]
pub struct Transaction {
    pub sender: String,
    pub recipients: Vec<String>,
    pub body_8bit: bool,
    pub smtputf8: bool,
}

#[derive(Debug)]
enum Mode {
    Command,
    AuthPlain,
    AuthLoginUser,
    AuthLoginPassword { username: String },
    Data,
}

/// Why a message could not be stored: the client hears a temporary reply either way, and keeps the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreFailed {
    /// No space or inodes left (ENOSPC, EDQUOT).
    Full,
    /// Anything else: a read-only filesystem, a queue directory removed or not writable, an I/O error.
    Other,
}

/// RFC 3463: 4.3.1 "mail system full"; the client keeps the message and tries again.
fn full() -> Reply {
    Reply::new(452, "4.3.1", "Insufficient system storage, try again later")
}

/// RFC 3463: 4.3.0, a mail system trouble other than space; saying "storage" would send the sysadmin to `df`.
fn local_error() -> Reply {
    Reply::new(
        451,
        "4.3.0",
        "Local error: the message cannot be stored, try again later",
    )
}

pub struct Session {
    policy: Arc<Policy>,
    peer: SocketAddr,
    tls: bool,
    helo: Option<String>,
    esmtp: bool,
    user: Option<String>,
    txn: Option<Transaction>,
    mode: Mode,
    line: Vec<u8>,
    line_too_long: bool,
    errors: u32,
    auth_failures: u32,
    data: Option<DataState>,
    /// The last MAIL, RCPT or DATA command and its address, for the log line of a refusal.
    last: Option<(&'static str, String)>,
    /// A command line of this session ended with CRLF: the client frames with CRLF, so under `lenient` an
    /// `LF . LF` in its body is text (a bare LF in content it passed on), not its end of data.
    crlf_client: bool,
    /// Junk commands since the last message (see [`MAX_JUNK`]).
    junk: u32,
    /// Recipients given again or refused as too many in this transaction (see [`RECIPIENT_SURPLUS`]).
    surplus: u32,
    /// The transaction's recipients, their domains in lower case, to find one given again in constant time: the list may be as
    /// long as `max_recipients` allows, and a client may send RCPT after RCPT.
    given: std::collections::HashSet<String>,
}

struct DataState {
    receiver: DataReceiver,
    len: u64,
    /// relay's own `Received:` line, which the stored message also holds: `max_message_size` is the most that
    /// is queued and sent, as a provider counts it (Gmail's 35 MiB is the default's, to the byte).
    reserved: u64,
    /// `max_message_size`, or less where the accounts of the message's route send no larger.
    limit: u64,
    too_big: bool,
}

impl Session {
    pub fn new(policy: Arc<Policy>, peer: SocketAddr, tls: bool) -> Session {
        Session {
            policy,
            peer,
            tls,
            helo: None,
            esmtp: false,
            user: None,
            txn: None,
            mode: Mode::Command,
            line: Vec::new(),
            line_too_long: false,
            errors: 0,
            auth_failures: 0,
            data: None,
            last: None,
            crlf_client: false,
            junk: 0,
            surplus: 0,
            given: std::collections::HashSet::new(),
        }
    }

    pub fn greeting(&self) -> Reply {
        Reply::bare(
            220,
            vec![format!("{} ESMTP relay", self.policy.hostname).into()],
        )
    }

    /// The AUTH user, once logged in.
    pub fn user(&self) -> Option<&str> {
        self.user.as_deref()
    }

    /// For the log line of a refused MAIL, RCPT or DATA: the command, the address it named (empty for DATA or
    /// when it could not be parsed), and the transaction's sender when there is one. `None` after any other
    /// command.
    pub fn last_mail_command(&self) -> Option<(&'static str, &str, Option<&str>)> {
        let (verb, address) = self.last.as_ref()?;
        Some((verb, address, self.txn.as_ref().map(|t| t.sender.as_str())))
    }

    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    pub fn is_receiving_data(&self) -> bool {
        matches!(self.mode, Mode::Data)
    }

    /// Takes bytes from `input` (advancing it) until there is something to do.
    pub fn next(&mut self, input: &mut &[u8]) -> Step {
        debug_assert!(!self.is_receiving_data(), "body bytes go to feed_data");
        let line = match self.take_line(input) {
            None => return Step::NeedInput,
            Some(Err(())) => {
                self.last = None;
                // An over-long answer ends an AUTH exchange (RFC 4954 section 4): the client's next line is a
                // command again, never taken for a credential.
                if !matches!(
                    std::mem::replace(&mut self.mode, Mode::Command),
                    Mode::Command
                ) {
                    return self.error(Reply::new(
                        500,
                        "5.5.6",
                        "Authentication exchange line is too long",
                    ));
                }
                return self.error(Reply::new(500, "5.5.2", "Line too long"));
            }
            Some(Ok(line)) => line,
        };
        self.last = None;
        self.crlf_client |= line.ends_with(b"\r\n");
        match std::mem::replace(&mut self.mode, Mode::Command) {
            Mode::Command => self.command(&line),
            Mode::AuthPlain => self.auth_plain_response(&line),
            Mode::AuthLoginUser => self.auth_login_username(&line),
            Mode::AuthLoginPassword { username } => self.auth_login_password(username, &line),
            Mode::Data => unreachable!("checked above"),
        }
    }

    /// Cuts one line (through its LF) off the input, buffering a partial one. `Err` for a line over
    /// [`MAX_LINE`], reported once its end arrives so that the rest of it is not read as a command.
    fn take_line(&mut self, input: &mut &[u8]) -> Option<Result<Vec<u8>, ()>> {
        match memchr::memchr(b'\n', input) {
            None => {
                if self.line.len() + input.len() > MAX_LINE {
                    self.line_too_long = true;
                    self.line.clear();
                } else if !self.line_too_long {
                    self.line.extend_from_slice(input);
                }
                *input = &[];
                None
            }
            Some(pos) => {
                let (head, tail) = input.split_at(pos + 1);
                *input = tail;
                if std::mem::take(&mut self.line_too_long)
                    || self.line.len() + head.len() > MAX_LINE
                {
                    self.line.clear();
                    return Some(Err(()));
                }
                let mut line = std::mem::take(&mut self.line);
                line.extend_from_slice(head);
                Some(Ok(line))
            }
        }
    }

    fn error(&mut self, reply: Reply) -> Step {
        self.errors += 1;
        match self.too_many_errors() {
            Some(bye) => Step::Close(bye),
            None => Step::Reply(reply),
        }
    }

    fn command(&mut self, line: &[u8]) -> Step {
        // smtp-proto would read such bytes as U+FFFD, and the mail would go to an address the device never gave.
        if let Some(verb @ ("MAIL" | "RCPT")) = mail_verb(line)
            && std::str::from_utf8(line).is_err()
        {
            self.last = Some((verb, raw_path(line)));
            return self.error(bad_address(verb, "not UTF-8"));
        }
        let line = match one_space_after_hello(line) {
            Some(fixed) => Cow::Owned(fixed),
            None => bracket_path(line),
        };
        let (line, literal) = match stand_in_literal(&line) {
            Some((with_stand_in, literal)) => (Cow::Owned(with_stand_in), Some(literal)),
            None => (line, None),
        };
        let line = line.as_ref();
        let request = match Request::parse(&mut line.iter()) {
            Ok(r) => r,
            Err(e) => {
                let verb = mail_verb(line);
                self.last = verb.map(|verb| (verb, raw_path(line)));
                let too_long = matches!(e, ParseError::ResponseTooLong);
                let reply = match (parse_error_reply(e), verb) {
                    // MAIL or RCPT without its colon: the command is known, its parameter is not right.
                    (r, Some(verb @ ("MAIL" | "RCPT"))) if r.code == 500 && !too_long => {
                        Reply::new(
                            501,
                            "5.5.4",
                            if verb == "MAIL" {
                                "Syntax: MAIL FROM:<address>"
                            } else {
                                "Syntax: RCPT TO:<address>"
                            },
                        )
                    }
                    (r, _) => r,
                };
                return self.error(reply);
            }
        };
        // The check above reads the verb where it normally is; smtp-proto also takes one after spaces or with a
        // CR inside it.
        if std::str::from_utf8(line).is_err() {
            let verb = match request {
                Request::Mail { .. } => Some("MAIL"),
                Request::Rcpt { .. } => Some("RCPT"),
                _ => None,
            };
            if let Some(verb) = verb {
                self.last = Some((verb, raw_path(line)));
                return self.error(bad_address(verb, "not UTF-8"));
            }
        }
        let request = match literal {
            Some(literal) => put_back_literal(request, &literal),
            None => request,
        };
        self.last = match &request {
            Request::Mail { from } => Some(("MAIL", from.address.to_string())),
            Request::Rcpt { to } => Some(("RCPT", to.address.to_string())),
            Request::Data => Some(("DATA", String::new())),
            _ => None,
        };
        match request {
            Request::Ehlo { host } => self.hello(host.into_owned(), true),
            Request::Helo { host } => self.hello(host.into_owned(), false),
            Request::Mail { from } => {
                // smtp-proto reads `<postmaster>` as the null path here too.
                let sender = if from.address.is_empty() && names_postmaster(line) {
                    Sender::Postmaster
                } else {
                    Sender::Path(&from.address)
                };
                let unoffered = unoffered_parameter(&from);
                self.mail(sender, declared_size(line), from.flags, unoffered)
            }
            // smtp-proto reads `<postmaster>` as the empty path; only the line tells them apart.
            Request::Rcpt { to } if to.address.is_empty() && names_postmaster(line) => {
                self.last = Some(("RCPT", "postmaster".to_string()));
                self.rcpt_postmaster()
            }
            Request::Rcpt { to } => self.rcpt(&to.address),
            Request::Data if line.trim_ascii_end().len() > "DATA".len() => self.error(Reply::new(
                501,
                "5.5.4",
                "Syntax error (no parameters allowed)",
            )),
            Request::Data => self.data(),
            Request::Rset if line.trim_ascii_end().len() > "RSET".len() => self.error(Reply::new(
                501,
                "5.5.4",
                "Syntax error (no parameters allowed)",
            )),
            Request::Rset => {
                self.txn = None;
                self.junk(Reply::new(250, "2.0.0", "Ok"))
            }
            Request::Noop { .. } => self.junk(Reply::new(250, "2.0.0", "Ok")),
            Request::Quit => Step::Close(Reply::new(221, "2.0.0", "Bye")),
            // RFC 5321 section 3.5.3: 252 when we will take mail for the address but cannot verify it.
            Request::Vrfy { .. } => self.junk(Reply::new(
                252,
                "2.5.0",
                "Cannot VRFY user, but will accept message",
            )),
            Request::Help { .. } => {
                let mut text =
                    String::from("Commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP");
                if self.policy.starttls && !self.tls {
                    text.push_str(" STARTTLS");
                }
                if self.auth_offered() {
                    text.push_str(" AUTH");
                }
                self.junk(Reply::new(214, "2.0.0", text))
            }
            // RFC 3207 section 4: STARTTLS takes no parameters.
            Request::StartTls if line.trim_ascii_end().len() > "STARTTLS".len() => self.error(
                Reply::new(501, "5.5.4", "Syntax error (no parameters allowed)"),
            ),
            Request::StartTls => self.starttls(),
            // RFC 4954: a mechanism and at most an initial response; more is not a command to guess at.
            Request::Auth { .. }
                if line
                    .split(u8::is_ascii_whitespace)
                    .filter(|w| !w.is_empty())
                    .count()
                    > 3 =>
            {
                self.error(Reply::new(
                    501,
                    "5.5.4",
                    "Syntax: AUTH mechanism [initial-response]",
                ))
            }
            Request::Auth {
                mechanism,
                initial_response,
            } => self.auth(mechanism, &initial_response),
            // CHUNKING is not offered, so a BDAT's chunk follows that we would otherwise read as commands:
            // hang up rather than interpret client data as SMTP.
            Request::Bdat { .. } => Step::Close(Reply::new(
                502,
                "5.5.1",
                "BDAT not supported (CHUNKING is not offered)",
            )),
            Request::Expn { .. }
            | Request::Etrn { .. }
            | Request::Atrn { .. }
            | Request::Burl { .. }
            | Request::Lhlo { .. } => {
                self.error(Reply::new(502, "5.5.1", "Command not implemented"))
            }
        }
    }

    /// A recipient that adds none to the message: answered, and past [`RECIPIENT_SURPLUS`] in the transaction
    /// counted as an error.
    fn surplus(&mut self, reply: Reply) -> Step {
        self.surplus += 1;
        if self.surplus > RECIPIENT_SURPLUS {
            return self.error(reply);
        }
        Step::Reply(reply)
    }

    /// A command that moves no mail: answered, and past [`MAX_JUNK`] since the last message counted as an error.
    fn junk(&mut self, reply: Reply) -> Step {
        self.junk += 1;
        if self.junk > MAX_JUNK {
            return self.error(reply);
        }
        Step::Reply(reply)
    }

    fn hello(&mut self, host: String, esmtp: bool) -> Step {
        // A second greeting (after STARTTLS, RFC 3207, or to reset) is normal; one after another moves no mail.
        let again = self.helo.is_some();
        self.txn = None;
        self.esmtp = esmtp;
        // The name is the client's text: its control characters (a NUL, an ESC) are not sent back raw, nor what
        // is not ASCII (a reply's text is ASCII, RFC 5321 section 4.2; smtp-proto gives bytes that are not UTF-8
        // as U+FFFD).
        let shown: String = crate::terminal::printable_str(&host)
            .chars()
            .map(|c| if c.is_ascii() { c } else { '?' })
            .collect();
        let greeting = format!("{} Hello {shown}", self.policy.hostname);
        self.helo = Some(host);
        if !esmtp {
            return self.greeted(again, Reply::bare(250, vec![greeting.into()]));
        }
        let mut lines: Vec<Cow<'static, str>> = vec![
            greeting.into(),
            "PIPELINING".into(),
            format!("SIZE {}", self.policy.max_message_size).into(),
            "8BITMIME".into(),
            "ENHANCEDSTATUSCODES".into(),
            // Non-ASCII addresses and header fields (RFC 6531), passed on as the upstream allows: Microsoft 365
            // and Gmail offer it. Clients such as Python's smtplib will not send such an address without it.
            "SMTPUTF8".into(),
        ];
        if self.policy.starttls && !self.tls {
            lines.push("STARTTLS".into());
        }
        if self.auth_offered() {
            lines.push("AUTH PLAIN LOGIN".into());
            // Old Outlook-era firmware only recognises the pre-standard form.
            lines.push("AUTH=PLAIN LOGIN".into());
        }
        lines.push("HELP".into());
        self.greeted(again, Reply::bare(250, lines))
    }

    fn greeted(&mut self, again: bool, reply: Reply) -> Step {
        if again {
            self.junk(reply)
        } else {
            Step::Reply(reply)
        }
    }

    fn auth_offered(&self) -> bool {
        self.policy.auth != AuthPolicy::None && (self.tls || self.policy.plaintext_auth)
    }

    fn mail(&mut self, sender: Sender<'_>, size: u64, flags: u64, unoffered: Option<&str>) -> Step {
        if self.helo.is_none() {
            return self.error(Reply::new(503, "5.5.1", "Send EHLO or HELO first"));
        }
        if self.txn.is_some() {
            return self.error(Reply::new(503, "5.5.1", "Nested MAIL command"));
        }
        if self.policy.auth == AuthPolicy::Required && self.user.is_none() {
            let text = if self.auth_offered() {
                "Authentication required"
            } else if self.policy.starttls && !self.tls {
                "Authentication required; issue STARTTLS first"
            } else {
                // tls = "none" with plaintext_auth = false: `relay check` warns of it.
                "Authentication required, and this listener offers no way to log in"
            };
            // An error as in Postfix: a client that never logs in cannot hold its connection by asking for ever.
            return self.error(Reply::new(530, "5.7.0", text));
        }
        // With relay's own Received: line, as the data will be counted: a size declared at the limit would
        // otherwise be uploaded whole, then refused.
        // (Its protocol word is 3 bytes longer once the transaction is SMTPUTF8: counted as if it were.) Only for a
        // declared size: the trace line is not made for every MAIL.
        if size > 0 && size.saturating_add(self.trace_len() + 3) > self.policy.max_message_size {
            return self.error(Reply::new(
                552,
                "5.3.4",
                "Message size exceeds fixed maximum message size",
            ));
        }
        let sender = match sender {
            Sender::Path(path) => path,
            // A domainless postmaster is a recipient only (RFC 5321 section 4.1.1.3): taken for the null sender,
            // it made the message look like a bounce.
            Sender::Postmaster => {
                self.last = Some(("MAIL", "postmaster".to_string()));
                return self.error(bad_address("MAIL", "postmaster without a domain"));
            }
        };
        if !sender.is_empty() && !is_plausible_address(sender) {
            return self.error(bad_address("MAIL", "empty local part or domain"));
        }
        if flags & MAIL_BODY_BINARYMIME != 0 {
            return self.error(Reply::new(555, "5.5.4", "BODY=BINARYMIME is not supported"));
        }
        if let Some(name) = unoffered {
            return self.error(Reply::new(555, "5.5.4", format!("{name} is not supported")));
        }
        self.surplus = 0;
        self.given.clear();
        self.txn = Some(Transaction {
            sender: sender.to_string(),
            recipients: Vec::new(),
            body_8bit: flags & MAIL_BODY_8BITMIME != 0,
            smtputf8: flags & MAIL_SMTPUTF8 != 0,
        });
        Step::Room(size)
    }

    /// The answer to [`Step::Room`]: without room, the transaction does not begin. RFC 1870 section 6.1: 452
    /// at MAIL, so the client keeps the message and tries later, before it sends a byte of it. Not counted as
    /// the client's error: the disk is relay's problem.
    pub fn room_checked(&mut self, room: Admission) -> Reply {
        match room {
            Admission::Admitted => Reply::new(250, "2.1.0", "Ok"),
            Admission::Full => {
                self.txn = None;
                full()
            }
            Admission::ReadOnly => {
                self.txn = None;
                local_error()
            }
        }
    }

    fn rcpt(&mut self, recipient: &str) -> Step {
        let max = self.policy.max_recipients;
        let Some(txn) = self.txn.as_mut() else {
            return self.error(Reply::new(503, "5.5.1", "Need MAIL before RCPT"));
        };
        if recipient.is_empty() {
            return self.error(Reply::new(501, "5.1.3", "Empty recipient address"));
        }
        if !is_plausible_address(recipient) {
            return self.error(bad_address("RCPT", "empty local part or domain"));
        }
        // The same address twice gets one copy, as from Postfix; not counted twice against the limits either.
        // Only the domain is compared without case: the local part is the receiving host's to read (RFC 5321
        // section 2.4), and `John.Smith@` and `john.smith@` may be two mailboxes.
        let folded = match recipient.rsplit_once('@') {
            Some((local, domain)) => format!("{local}@{}", domain.to_ascii_lowercase()),
            None => recipient.to_string(),
        };
        if self.given.contains(&folded) {
            return self.surplus(Reply::new(250, "2.1.5", "Ok"));
        }
        if txn.recipients.len() >= max {
            // RFC 5321 section 4.5.3.1.10: 452 for too many recipients, so the client sends the rest later.
            return self.surplus(Reply::new(452, "4.5.3", "Too many recipients"));
        }
        txn.recipients.push(recipient.to_string());
        self.given.insert(folded);
        Step::Reply(Reply::new(250, "2.1.5", "Ok"))
    }

    /// RFC 5321 section 4.5.1: every server that relays must take mail for `<postmaster>`. relay has no
    /// mailbox of its own, so the address is the one the config names (see `Config::postmaster`).
    fn rcpt_postmaster(&mut self) -> Step {
        let Some(address) = self.policy.postmaster.clone() else {
            if self.txn.is_none() {
                return self.error(Reply::new(503, "5.5.1", "Need MAIL before RCPT"));
            }
            return self.error(Reply::new(
                550,
                "5.1.1",
                "No postmaster mailbox here: set postmaster (or [alerts] mail_to) in relay's config",
            ));
        };
        self.rcpt(&address)
    }

    /// `lenient` is for devices that end every line with LF alone, `LF . LF` included. A client whose commands
    /// end with CRLF does not end its data that way: an `LF . LF` in its body came with the text it passes on
    /// (a web form, a forwarded report), and taking it for the end would turn one message into two (SMTP
    /// smuggling). Its bare line endings are normalized instead.
    fn body_line_endings(&self) -> BareLineEndings {
        match self.policy.bare_lf {
            BareLineEndings::Lenient if self.crlf_client => BareLineEndings::Normalize,
            policy => policy,
        }
    }

    fn data(&mut self) -> Step {
        match &self.txn {
            None => self.error(Reply::new(503, "5.5.1", "Need MAIL command")),
            Some(t) if t.recipients.is_empty() => {
                self.error(Reply::new(554, "5.5.1", "No valid recipients"))
            }
            Some(_) => {
                self.mode = Mode::Data;
                self.data = Some(DataState {
                    receiver: DataReceiver::new(self.body_line_endings()),
                    len: 0,
                    reserved: self.trace_len(),
                    limit: self.policy.max_message_size,
                    too_big: false,
                });
                Step::Data(Reply::new(354, "2.0.0", "End data with <CR><LF>.<CR><LF>"))
            }
        }
    }

    /// Feeds body bytes; the body (unstuffed, policy applied) is appended to `out`. Returns `Done` at the
    /// final dot, with `input` advanced past it. Check [`refusal`](Session::refusal) to stop storing early.
    pub fn feed_data(&mut self, input: &mut &[u8], out: &mut Vec<u8>) -> Progress {
        let Some(state) = self.data.as_mut() else {
            return Progress::Done;
        };
        let before = out.len();
        let progress = state.receiver.feed(input, out);
        state.len += (out.len() - before) as u64;
        if state.len + state.reserved > state.limit {
            state.too_big = true;
        }
        progress
    }

    /// Lowers the most the message being received may be (the accounts of its route send no larger): past it,
    /// it is refused at its end, as past the listener's `max_message_size`.
    pub fn limit_message(&mut self, most: u64) {
        if let Some(state) = self.data.as_mut() {
            state.limit = state.limit.min(most);
        }
    }

    /// Every command so far ended with LF alone: a device that ends its data with `LF . LF` too.
    pub fn commands_end_with_lf(&self) -> bool {
        !self.crlf_client
    }

    /// The body being received has had a bare CR or LF so far.
    pub fn data_saw_bare(&self) -> bool {
        self.data.as_ref().is_some_and(|d| d.receiver.saw_bare)
    }

    /// The body ended as an LF-only client ends it, on a `reject` listener: the message is refused and the
    /// connection must be closed after the reply.
    pub fn data_ended_by_bare_lf(&self) -> bool {
        self.data
            .as_ref()
            .is_some_and(|d| d.receiver.ended_by_bare_lf)
    }

    /// Why the message being received will be refused, if it will be. The body must still be read to its
    /// end: stopping early would make the rest of it commands.
    pub fn refusal(&self) -> Option<Reply> {
        let state = self.data.as_ref()?;
        if state.too_big && state.limit < self.policy.max_message_size {
            return Some(Reply::new(
                552,
                "5.3.4",
                format!(
                    "Message size exceeds what its account can send ({} bytes at most)",
                    state.limit
                ),
            ));
        }
        if state.too_big {
            return Some(Reply::new(
                552,
                "5.3.4",
                "Message size exceeds fixed maximum message size",
            ));
        }
        if state.receiver.saw_bare && self.policy.bare_lf == BareLineEndings::Reject {
            // RFC 5321 section 2.3.8: CR and LF only as CRLF. Accepting them enables SMTP smuggling.
            return Some(Reply::new(
                550,
                "5.6.0",
                "Message refused: bare CR or LF in DATA (RFC 5321 section 2.3.8)",
            ));
        }
        None
    }

    /// Whether the message is refused for its bare CR or LF (a `reject` listener), for the log line's advice.
    pub fn refused_for_bare_line_ends(&self) -> bool {
        self.data.as_ref().is_some_and(|state| {
            !state.too_big
                && state.receiver.saw_bare
                && self.policy.bare_lf == BareLineEndings::Reject
        })
    }

    /// The final dot was seen and the message refused: the transaction ends, and the refusal counts as an
    /// error (see [`too_many_errors`](Self::too_many_errors)).
    pub fn data_refused(&mut self) -> Reply {
        let reply = self
            .refusal()
            .unwrap_or_else(|| Reply::new(554, "5.0.0", "Message refused"));
        self.end_data();
        self.errors += 1;
        reply
    }

    /// The 421 that ends a session whose errors reached the limit, if they did: asked after a refused message,
    /// whose own refusal goes first.
    pub fn too_many_errors(&self) -> Option<Reply> {
        (self.errors >= MAX_ERRORS)
            .then(|| Reply::new(421, "4.7.0", "Too many errors, closing connection"))
    }

    /// The final dot was seen and the connection code stored the message (or failed to).
    pub fn data_stored(&mut self, result: Result<QueueId, StoreFailed>) -> Reply {
        self.end_data();
        match result {
            Ok(id) => {
                // Postfix's error limit is on errors "without delivering mail": a pooled connection that sends
                // message after message is not cut off by one error in each.
                self.junk = 0;
                self.errors = 0;
                Reply::new(250, "2.0.0", format!("Ok: queued as {id}"))
            }
            Err(StoreFailed::Full) => full(),
            Err(StoreFailed::Other) => local_error(),
        }
    }

    /// The connection code refuses the message before its body (after the session said 354 should follow): the
    /// transaction ends, and `reply` is sent instead of the 354.
    pub fn cancel_data(&mut self, reply: Reply) -> Reply {
        self.end_data();
        reply
    }

    fn end_data(&mut self) {
        self.mode = Mode::Command;
        self.data = None;
        self.txn = None;
    }

    /// The envelope of the message being received.
    pub fn envelope(&self, id: QueueId, received_at: SystemTime) -> Option<Envelope> {
        let txn = self.txn.as_ref()?;
        Some(Envelope {
            id,
            sender: txn.sender.clone(),
            recipients: txn.recipients.clone(),
            client: self.peer.to_string(),
            helo: self.helo.clone(),
            user: self.user.clone(),
            listener: self.policy.listener.clone(),
            received_at,
            body_8bit: txn.body_8bit,
            smtputf8: txn.smtputf8,
            via: None,
        })
    }

    /// The length of relay's own trace line as it stands now, which `max_message_size` counts with the data.
    fn trace_len(&self) -> u64 {
        self.received_header(QueueId::new(), SystemTime::now())
            .len() as u64
    }

    /// The trace line put in front of the message (RFC 5321 section 4.4), with the protocol names of RFC 3848.
    pub fn received_header(&self, id: QueueId, date: SystemTime) -> String {
        // A login after HELO is still an ESMTP extension used (RFC 3848 has no "SMTPA").
        let proto = match (
            self.esmtp || self.user.is_some(),
            self.tls,
            self.user.is_some(),
        ) {
            (false, _, _) => "SMTP",
            (true, false, false) => "ESMTP",
            (true, true, false) => "ESMTPS",
            (true, false, true) => "ESMTPA",
            (true, true, true) => "ESMTPSA",
        };
        // RFC 6531 section 3.7.3: UTF8SMTP, UTF8SMTPS, UTF8SMTPA, UTF8SMTPSA.
        let utf8 = self.txn.as_ref().is_some_and(|t| t.smtputf8);
        let proto = match proto.strip_prefix("ESMTP") {
            Some(rest) if utf8 => format!("UTF8SMTP{rest}"),
            _ => proto.to_string(),
        };
        // Only what a domain or an address literal is made of: a `(` would open a comment that swallows the
        // date, a `;` would end the field's tokens early (RFC 5322 section 3.6.7).
        let helo: String = self
            .helo
            .as_deref()
            .unwrap_or_default()
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | '[' | ']' | ':'))
            .take(255)
            .collect();
        let helo = if helo.is_empty() {
            "unknown".to_string()
        } else {
            helo
        };
        let date = crate::mailgen::date(date);
        format!(
            "Received: from {helo} ([{ip}])\r\n\tby {host} (relay) with {proto}\r\n\tid {id}; {date}\r\n",
            ip = self.peer.ip(),
            host = self.policy.hostname,
        )
    }

    fn starttls(&mut self) -> Step {
        if self.tls {
            return self.error(Reply::new(503, "5.5.1", "TLS already active"));
        }
        if !self.policy.starttls {
            return self.error(Reply::new(502, "5.5.1", "STARTTLS not offered"));
        }
        Step::StartTls(Reply::new(220, "2.0.0", "Ready to start TLS"))
    }

    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// TLS is up: RFC 3207 section 4.2 says to forget everything learnt before it.
    pub fn tls_started(&mut self) {
        self.tls = true;
        self.helo = None;
        self.esmtp = false;
        self.user = None;
        self.txn = None;
        self.mode = Mode::Command;
        self.line.clear();
    }

    fn auth(&mut self, mechanism: u64, initial: &str) -> Step {
        if self.policy.auth == AuthPolicy::None {
            return self.error(Reply::new(502, "5.5.1", "AUTH not offered on this port"));
        }
        // After HELO too, as Postfix takes it: old firmware greets with HELO and then logs in.
        if self.helo.is_none() {
            return self.error(Reply::new(503, "5.5.1", "Send EHLO first"));
        }
        if self.user.is_some() {
            return self.error(Reply::new(503, "5.5.1", "Already authenticated"));
        }
        if self.txn.is_some() {
            return self.error(Reply::new(
                503,
                "5.5.1",
                "AUTH not allowed during a mail transaction",
            ));
        }
        if !self.auth_offered() && !self.policy.starttls {
            // No TLS on this listener, and no login without it (`relay check` warns of such a listener): asking
            // for encryption would send the client looking for a STARTTLS that is not there.
            return self.error(Reply::new(
                503,
                "5.5.1",
                "AUTH not available: this listener offers no TLS and takes no password without it",
            ));
        }
        if mechanism != AUTH_PLAIN && mechanism != AUTH_LOGIN {
            // Before the 538: encryption would not make this mechanism work (RFC 4954 section 4).
            return self.error(Reply::new(504, "5.5.4", "Unrecognized authentication type"));
        }
        if !self.auth_offered() {
            // RFC 4954 section 6.
            return Step::Reply(Reply::new(
                538,
                "5.7.11",
                "Encryption required for requested authentication mechanism",
            ));
        }
        // RFC 4954 section 4: "=" is an empty initial response. Empty credentials mean nothing for PLAIN, and
        // devices that send it expect to be asked: both are taken as no initial response.
        let initial = if initial == "=" { "" } else { initial };
        match mechanism {
            AUTH_PLAIN if initial.is_empty() => {
                self.mode = Mode::AuthPlain;
                Step::Reply(Reply::bare(334, vec!["".into()]))
            }
            AUTH_PLAIN => self.auth_plain_response(initial.as_bytes()),
            AUTH_LOGIN if initial.is_empty() => {
                self.mode = Mode::AuthLoginUser;
                Step::Reply(Reply::bare(334, vec!["VXNlcm5hbWU6".into()]))
            }
            AUTH_LOGIN => self.auth_login_username(initial.as_bytes()),
            _ => self.error(Reply::new(504, "5.5.4", "Unrecognized authentication type")),
        }
    }

    fn auth_plain_response(&mut self, line: &[u8]) -> Step {
        let decoded = match decode_response(line) {
            Ok(d) => d,
            Err(reply) => return self.error(reply),
        };
        // RFC 4616: [authzid] NUL authcid NUL passwd. Acting as another user is not supported.
        let mut parts = decoded.split(|&b| b == 0);
        let (Some(authzid), Some(authcid), Some(password), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return self.error(Reply::new(501, "5.5.2", "Malformed AUTH PLAIN response"));
        };
        if !authzid.is_empty() && authzid != authcid {
            return Step::Authenticate(Credentials {
                mechanism: "PLAIN",
                username: String::from_utf8_lossy(authcid).into_owned(),
                password: SecretString::from(String::new()),
                refused: Some(
                    "it asked to act as another user (an authorization identity), which relay does not allow",
                ),
            });
        }
        self.credentials("PLAIN", authcid, password)
    }

    fn auth_login_username(&mut self, line: &[u8]) -> Step {
        match decode_response(line) {
            Ok(user) => {
                let username = String::from_utf8_lossy(&user).into_owned();
                self.mode = Mode::AuthLoginPassword { username };
                Step::Reply(Reply::bare(334, vec!["UGFzc3dvcmQ6".into()]))
            }
            // Counted, like Postfix's "AUTH aborted": a client cancelling AUTH for ever holds a connection.
            Err(reply) => self.error(reply),
        }
    }

    fn auth_login_password(&mut self, username: String, line: &[u8]) -> Step {
        match decode_response(line) {
            Ok(password) => self.credentials("LOGIN", username.as_bytes(), &password),
            Err(reply) => self.error(reply),
        }
    }

    fn credentials(&mut self, mechanism: &'static str, username: &[u8], password: &[u8]) -> Step {
        match (std::str::from_utf8(username), std::str::from_utf8(password)) {
            (Ok(u), Ok(p)) if !u.is_empty() => Step::Authenticate(Credentials {
                mechanism,
                username: u.to_string(),
                password: SecretString::from(p.to_string()),
                refused: None,
            }),
            _ => Step::Authenticate(Credentials {
                mechanism,
                username: String::from_utf8_lossy(username).into_owned(),
                password: SecretString::from(String::new()),
                refused: Some("the user name is empty, or it or the password is not UTF-8"),
            }),
        }
    }

    /// The [`Credentials`] were good: the session is now that user's.
    pub fn auth_succeeded(&mut self, username: String) -> Step {
        self.user = Some(username);
        Step::Reply(Reply::new(235, "2.7.0", "Authentication successful"))
    }

    /// The password could not be checked now (the checks are saturated): 454, and the client may try again.
    /// Counted as an error: a client asking again and again (an address whose checks are crowded) is cut off as
    /// any client repeating a refused command is.
    pub fn auth_unavailable(&mut self) -> Step {
        self.error(Reply::new(
            454,
            "4.7.0",
            "Temporary authentication failure, try again later",
        ))
    }

    /// The client's address failed to log in too often lately: hang up without checking anything.
    pub fn auth_throttled(&mut self) -> Step {
        Step::Close(Reply::new(
            421,
            "4.7.0",
            "Too many failed logins from your address, try again later",
        ))
    }

    /// A failed check: 535, or hang up after repeated failures.
    pub fn auth_failed(&mut self) -> Step {
        self.auth_failures += 1;
        if self.auth_failures >= MAX_AUTH_FAILURES {
            return Step::Close(Reply::new(
                421,
                "4.7.0",
                "Too many failed authentications, closing connection",
            ));
        }
        Step::Reply(Reply::new(
            535,
            "5.7.8",
            "Authentication credentials invalid",
        ))
    }
}

/// `local@domain` with neither part empty and no control characters or spaces in the domain: anything less would
/// be taken now and refused by the upstream later, so the device would never hear of it.
fn is_plausible_address(address: &str) -> bool {
    address.rsplit_once('@').is_some_and(|(local, domain)| {
        !local.is_empty()
            && !domain.is_empty()
            && !address.chars().any(char::is_control)
            && !domain.contains([' ', '\t'])
    })
}

/// 501 for a MAIL or RCPT address, with its enhanced code (RFC 3463: X.1.7 sender, X.1.3 recipient).
fn bad_address(verb: &str, why: &str) -> Reply {
    if verb == "MAIL" {
        Reply::new(501, "5.1.7", format!("Bad sender address syntax ({why})"))
    } else {
        Reply::new(
            501,
            "5.1.3",
            format!("Bad recipient address syntax ({why})"),
        )
    }
}

/// Stands in for an address literal while smtp-proto parses the line: it has none (`[` ends an address there).
const LITERAL_STAND_IN: &str = "address-literal.invalid";

/// A `MAIL FROM:` or `RCPT TO:` line whose path ends in an address literal (`scan@[192.0.2.1]`,
/// `a@[IPv6:2001:db8::1]`; RFC 5321 section 4.1.3), as devices without a DNS name of their own write their
/// sender: the line with [`LITERAL_STAND_IN`] for the literal, and the literal. `None` for any other line, or a
/// literal that is not an IPv4 or IPv6 address.
fn stand_in_literal(line: &[u8]) -> Option<(Vec<u8>, String)> {
    let verb = line.get(..8)?;
    if !verb.eq_ignore_ascii_case(b"MAIL FRO") && !verb.eq_ignore_ascii_case(b"RCPT TO:") {
        return None;
    }
    // The literal ends the path, and the path ends at the first `>` outside a quoted local part (which may hold
    // `@[…]>` itself: `"q@[192.0.2.1]>"@example.com` is an address at example.com).
    let start = memchr::memchr(b'<', line)?;
    let end = path_end(line, start)?;
    let close = end.checked_sub(1).filter(|&c| line[c] == b']')?;
    let open = line[..close].iter().rposition(|&b| b == b'[')?;
    if open == 0 || line[open - 1] != b'@' {
        return None;
    }
    let inside = std::str::from_utf8(&line[open + 1..close]).ok()?;
    let valid = match inside.get(..5) {
        Some(tag) if tag.eq_ignore_ascii_case("IPv6:") => {
            inside[5..].parse::<std::net::Ipv6Addr>().is_ok()
        }
        _ => inside.parse::<std::net::Ipv4Addr>().is_ok(),
    };
    if !valid {
        return None;
    }
    let mut out = Vec::with_capacity(line.len() + LITERAL_STAND_IN.len());
    out.extend_from_slice(&line[..open]);
    out.extend_from_slice(LITERAL_STAND_IN.as_bytes());
    out.extend_from_slice(&line[close + 1..]);
    Some((out, format!("[{inside}]")))
}

/// Where the path that opens at `start` (its `<`) ends: the first `>` outside a quoted string (RFC 5321
/// section 4.1.2: a quoted local part may hold any character, a backslash quoting the next one).
fn path_end(line: &[u8], start: usize) -> Option<usize> {
    let (mut quoted, mut escaped) = (false, false);
    for (i, &b) in line.iter().enumerate().skip(start) {
        match b {
            _ if escaped => escaped = false,
            b'\\' if quoted => escaped = true,
            b'"' => quoted = !quoted,
            b'>' if !quoted => return Some(i),
            _ => {}
        }
    }
    None
}

/// The path of a MAIL command as smtp-proto parsed it, or the domainless `<postmaster>` it reads as the null path.
enum Sender<'a> {
    Path(&'a str),
    Postmaster,
}

/// A MAIL parameter of an extension relay does not offer, which smtp-proto parses all the same: taken and
/// dropped, it would break what the client asked for (REQUIRETLS's TLS all the way, FUTURERELEASE's hold, a
/// deadline, a priority). RFC 5321 section 4.1.1.11: 555. The DSN parameters (`RET`, `ENVID`) are let through
/// without effect, as before: devices send them whatever the server offers, and refused, their mail would not go.
fn unoffered_parameter(from: &smtp_proto::MailFrom<Cow<'_, str>>) -> Option<&'static str> {
    use smtp_proto::{
        MAIL_BY_NOTIFY, MAIL_BY_RETURN, MAIL_BY_TRACE, MAIL_CONPERM, MAIL_REQUIRETLS,
    };
    if from.flags & MAIL_REQUIRETLS != 0 {
        Some("REQUIRETLS")
    } else if from.hold_for != 0 || from.hold_until != 0 {
        Some("HOLDFOR/HOLDUNTIL (FUTURERELEASE)")
    } else if from.by != 0 || from.flags & (MAIL_BY_NOTIFY | MAIL_BY_RETURN | MAIL_BY_TRACE) != 0 {
        Some("BY (DELIVERBY)")
    } else if from.mt_priority != 0 {
        Some("MT-PRIORITY")
    } else if from.flags & MAIL_CONPERM != 0 {
        Some("CONPERM")
    } else if from.trans_id.is_some() {
        Some("TRANSID")
    } else if from.solicit.is_some() {
        Some("SOLICIT")
    } else if from.mtrk.is_some() {
        Some("MTRK")
    } else {
        None
    }
}

/// Puts the literal that [`stand_in_literal`] took out back into the parsed address.
fn put_back_literal<'a>(request: Request<Cow<'a, str>>, literal: &str) -> Request<Cow<'a, str>> {
    let swap = |address: &mut Cow<'a, str>| {
        if let Some(local) = address.strip_suffix(LITERAL_STAND_IN) {
            *address = Cow::Owned(format!("{local}{literal}"));
        }
    };
    match request {
        Request::Mail { mut from } => {
            swap(&mut from.address);
            Request::Mail { from }
        }
        Request::Rcpt { mut to } => {
            swap(&mut to.address);
            Request::Rcpt { to }
        }
        other => other,
    }
}

/// Where the path of a MAIL or RCPT line is: the first word after `MAIL FROM:` or `RCPT TO:`, in any case and
/// with the spaces smtp-proto allows around the keyword and the colon (`RCPT  TO : <a@b>`). `None` for other
/// lines, and for a line with nothing after the colon.
fn path_span(line: &[u8]) -> Option<std::ops::Range<usize>> {
    let keyword: &[u8] = match line.get(..4) {
        Some(v) if v.eq_ignore_ascii_case(b"MAIL") => b"FROM",
        Some(v) if v.eq_ignore_ascii_case(b"RCPT") => b"TO",
        _ => return None,
    };
    let spaces = |from: usize| from + line[from..].iter().take_while(|&&b| b == b' ').count();
    let at = spaces(4);
    let after = at + keyword.len();
    if !line.get(at..after)?.eq_ignore_ascii_case(keyword) {
        return None;
    }
    let colon = spaces(after);
    if line.get(colon) != Some(&b':') {
        return None;
    }
    let start = spaces(colon + 1);
    let len = line[start..]
        .iter()
        .take_while(|&&b| !matches!(b, b' ' | b'\r' | b'\n'))
        .count();
    (len > 0).then_some(start..start + len)
}

/// The path of a RCPT (or MAIL) line is `<postmaster>` or `<"postmaster">`, in any case: the forms smtp-proto
/// reads as the empty path.
fn names_postmaster(line: &[u8]) -> bool {
    let Some(path) = path_span(line).map(|span| &line[span]) else {
        return false;
    };
    let Some(inside) = path
        .strip_prefix(b"<")
        .and_then(|p| p.iter().position(|&b| b == b'>').map(|end| &p[..end]))
    else {
        return false;
    };
    let inside = inside
        .strip_prefix(b"\"")
        .and_then(|q| q.strip_suffix(b"\""))
        .unwrap_or(inside);
    inside.eq_ignore_ascii_case(b"postmaster")
}

/// `MAIL FROM:a@lan.test` as `MAIL FROM:<a@lan.test>` (and the same for RCPT TO): RFC 5321 wants the angle
/// brackets, but devices written against lenient servers leave them out, and Postfix takes that by default
/// (`strict_rfc821_envelopes = no`). The path is the first word after the colon; parameters may follow it.
fn bracket_path(line: &[u8]) -> Cow<'_, [u8]> {
    let Some(span) = path_span(line).filter(|span| line[span.start] != b'<') else {
        return Cow::Borrowed(line);
    };
    let mut fixed = Vec::with_capacity(line.len() + 2);
    fixed.extend_from_slice(&line[..span.start]);
    fixed.push(b'<');
    fixed.extend_from_slice(&line[span.clone()]);
    fixed.push(b'>');
    fixed.extend_from_slice(&line[span.end..]);
    Cow::Owned(fixed)
}

/// `HELO  name` (two spaces, or a tab and a space) as `HELO name`: smtp-proto refuses it, and a device that
/// sends it would never get its mail through; Postfix takes it.
fn one_space_after_hello(line: &[u8]) -> Option<Vec<u8>> {
    let verb = line.get(..4)?;
    if !(verb.eq_ignore_ascii_case(b"HELO") || verb.eq_ignore_ascii_case(b"EHLO")) {
        return None;
    }
    let rest = &line[4..];
    let blanks = rest
        .iter()
        .take_while(|b| matches!(b, b' ' | b'\t'))
        .count();
    if blanks < 2 {
        return None;
    }
    let mut fixed = Vec::with_capacity(line.len());
    fixed.extend_from_slice(verb);
    fixed.push(b' ');
    fixed.extend_from_slice(&rest[blanks..]);
    Some(fixed)
}

/// Decodes one SASL response line; `*` cancels the exchange (RFC 4954 section 4).
fn decode_response(line: &[u8]) -> Result<Vec<u8>, Reply> {
    let text = line.strip_suffix(b"\n").unwrap_or(line);
    let text = text.strip_suffix(b"\r").unwrap_or(text);
    let text = trim_ascii(text);
    if text == b"*" {
        return Err(Reply::new(501, "5.0.0", "Authentication cancelled"));
    }
    if text == b"=" {
        return Ok(Vec::new());
    }
    BASE64
        .decode(text)
        .map_err(|_| Reply::new(501, "5.5.2", "Invalid base64 in AUTH response"))
}

fn trim_ascii(b: &[u8]) -> &[u8] {
    let start = b
        .iter()
        .position(|c| !c.is_ascii_whitespace())
        .unwrap_or(b.len());
    let end = b
        .iter()
        .rposition(|c| !c.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    &b[start..end.max(start)]
}

/// The SIZE= parameter of a MAIL line (RFC 1870), saturating. Read here rather than from smtp-proto because its
/// parser wraps around past `usize::MAX` digits (SIZE=99999999999999999999999 comes out small), and a size
/// check that a long enough number slips past is no check.
fn declared_size(line: &[u8]) -> u64 {
    line.split(|b| b.is_ascii_whitespace())
        .filter_map(|word| {
            let (key, value) = word.split_at_checked(5)?;
            key.eq_ignore_ascii_case(b"SIZE=").then_some(value)
        })
        .map(|digits| {
            digits
                .iter()
                .take_while(|d| d.is_ascii_digit())
                .fold(0u64, |n, d| {
                    n.saturating_mul(10).saturating_add(u64::from(d - b'0'))
                })
        })
        .max()
        .unwrap_or(0)
}

fn parse_error_reply(e: ParseError) -> Reply {
    match e {
        ParseError::UnknownCommand => Reply::new(500, "5.5.2", "Command unrecognized"),
        ParseError::InvalidSenderAddress => Reply::new(501, "5.1.7", "Bad sender address syntax"),
        ParseError::InvalidRecipientAddress => {
            Reply::new(501, "5.1.3", "Bad recipient address syntax")
        }
        ParseError::SyntaxError { syntax } => Reply::new(501, "5.5.4", format!("Syntax: {syntax}")),
        ParseError::InvalidParameter { param } => {
            Reply::new(501, "5.5.4", format!("Invalid parameter {param}"))
        }
        ParseError::UnsupportedParameter { param } => {
            let param: String = param
                .chars()
                .filter(|c| c.is_ascii_graphic())
                .take(64)
                .collect();
            Reply::new(555, "5.5.4", format!("Unsupported parameter {param}"))
        }
        ParseError::ResponseTooLong => Reply::new(500, "5.5.2", "Line too long"),
        _ => Reply::new(500, "5.5.2", "Syntax error"),
    }
}

#[cfg(test)]
#[path = "session_tests.rs"]
mod tests;
