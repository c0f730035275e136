//! Sender rewriting (`rewrite_from`): what goes upstream as MAIL FROM and From:, per account.
//!
//! Microsoft 365 refuses a MAIL FROM or a From: that the authenticated mailbox may not send as (554 5.2.252
//! SendAsDenied), and devices send as whatever they were set up with. So:
//! - `none`: the client's envelope and bytes, as they are;
//! - `envelope` (default): MAIL FROM becomes the mailbox;
//! - `header`: MAIL FROM and From: become the mailbox; the From: keeps its display name, and the original From:
//!   becomes Reply-To unless the message has one, so that replies still reach the device's owner.
//!
//! The null sender `<>` (a bounce) stays null in every mode: a bounce must never be answered by another.
//!
//! Only the header section is read, and only the From: field is replaced (Reply-To: is added right after it);
//! every other header field and every body byte goes upstream byte for byte. [`rewrite_header`] is pure and
//! gives back the new start of the message and the offset where the untouched rest begins, so a sender that
//! streams the message can write the one and then copy the other from the queue file. A message it cannot read
//! (no end of the header section within [`HEADER_LIMIT`], a line that is not a header field, several From:
//! fields, a From: without an address) goes as it is: never refused or lost over this.

use std::fmt::Display;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use mail_parser::parsers::MessageStream;
use mail_parser::{Address, HeaderValue};

use crate::config::RewriteFrom;
use crate::upstream::outgoing::Outgoing;

/// How far into a message its header section may end. Real header sections are a few KiB; this bounds the work
/// (and the copy) for a message that has no blank line at all.
pub const HEADER_LIMIT: usize = 1 << 20;

/// Why a header section was left as it is, though header mode asked for a rewrite.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("no end of the header section within the first {HEADER_LIMIT} bytes")]
    TooLong,
    #[error("line {0} of the header section is not a header field")]
    NotAField(usize),
    #[error("{0} From: fields")]
    SeveralFrom(usize),
    #[error("the From: field holds no address")]
    NoAddress,
}

/// What header mode does with a message that it can read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderChange {
    /// The message upstream is `head` followed by `message[rest..]`.
    Rewritten(NewHead),
    /// Nothing to change.
    Kept(Kept),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kept {
    /// From: is the mailbox already.
    AlreadyTheMailbox,
    /// No From: field: there is no name or reply address to keep, and adding a From: is not this mode's job.
    NoFrom,
}

/// The new start of a message: the header fields before From:, the new From:, and Reply-To: when one is added.
/// Everything from `rest` on (the fields after From:, the blank line, the body) is the original's, not copied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewHead {
    pub head: Vec<u8>,
    pub rest: usize,
    /// The original From: value, unfolded and trimmed (for the log).
    pub original: String,
    pub reply_to_added: bool,
}

/// One account's sender rewriting.
#[derive(Debug, Clone)]
pub struct SenderRewrite {
    mailbox: String,
    mode: RewriteFrom,
}

impl SenderRewrite {
    pub fn new(mailbox: String, mode: RewriteFrom) -> SenderRewrite {
        SenderRewrite { mailbox, mode }
    }

    /// Whether From: is rewritten to the mailbox (`rewrite_from = "header"`).
    pub fn rewrites_header(&self) -> bool {
        self.mode == RewriteFrom::Header
    }

    /// The MAIL FROM that goes upstream.
    pub fn envelope_sender<'a>(&'a self, sender: &'a str) -> &'a str {
        match self.mode {
            RewriteFrom::None => sender,
            _ if sender.is_empty() => sender,
            RewriteFrom::Envelope | RewriteFrom::Header => &self.mailbox,
        }
    }

    /// The envelope sender and the message for one delivery attempt, with a log line for what changed (debug)
    /// or for a message header mode could not read (warn). Only the header block is looked at and replaced; the
    /// body is read from the queue file as it was. The queue file itself is never changed.
    pub fn prepare(
        &self,
        queue_id: impl Display,
        sender: &str,
        message: Outgoing,
    ) -> (String, Outgoing) {
        let upstream_sender = self.envelope_sender(sender);
        if upstream_sender != sender {
            tracing::debug!(relay_queue_id = %queue_id, from = sender, to = upstream_sender, "MAIL FROM rewritten");
        }
        let upstream_sender = upstream_sender.to_string();
        if self.mode != RewriteFrom::Header {
            return (upstream_sender, message);
        }
        // An empty block: the section has no end within the 1 MiB the message keeps of it.
        let head = message.header_block();
        let change = if head.is_empty() && !message.is_empty() {
            Err(HeaderError::TooLong)
        } else {
            rewrite_header(&self.mailbox, head)
        };
        match change {
            Ok(HeaderChange::Rewritten(new)) => {
                tracing::debug!(relay_queue_id = %queue_id, from = new.original.as_str(), to = self.mailbox.as_str(), reply_to_added = new.reply_to_added, "From: rewritten");
                let rewritten = message.with_head(new.head, new.rest);
                (upstream_sender, rewritten)
            }
            Ok(HeaderChange::Kept(why)) => {
                tracing::debug!(relay_queue_id = %queue_id, reason = ?why, "From: left as it is");
                (upstream_sender, message)
            }
            Err(e) => {
                tracing::warn!(relay_queue_id = %queue_id, error = %e, "From: not rewritten (rewrite_from = \"header\"); the message goes as it is");
                (upstream_sender, message)
            }
        }
    }
}

/// Header mode on a message (CRLF or LF lines): the new From: is `mailbox` with the first display name of the
/// original, and the original From: value becomes Reply-To: unless the message has a Reply-To: field already.
///
/// What a From: with more than one mailbox becomes (RFC 5322 allows a list, and RFC 6854 a group):
/// - the display name is the first item's: a group's name (`Scanners: a@x, b@y;` → `Scanners <mailbox>`), or the
///   first mailbox's; the new From: holds the one mailbox;
/// - Reply-To: gets the whole original value, list or group, which Reply-To: allows; an empty group
///   (`Undisclosed:;`) has no one to reply to, so no Reply-To: is added for it;
/// - it is left alone only when it holds exactly one mailbox and that is the account's (case-insensitive).
pub fn rewrite_header(mailbox: &str, message: &[u8]) -> Result<HeaderChange, HeaderError> {
    let fields = header_fields(message)?;
    let mut from = fields.iter().filter(|f| f.is(message, b"from"));
    let Some(field) = from.next() else {
        return Ok(HeaderChange::Kept(Kept::NoFrom));
    };
    let others = from.count();
    if others > 0 {
        return Err(HeaderError::SeveralFrom(others + 1));
    }
    let value = &message[field.colon + 1..field.end];
    let parsed = parse_from(value)?;
    if parsed.mailboxes.len() == 1 && parsed.mailboxes[0].eq_ignore_ascii_case(mailbox) {
        return Ok(HeaderChange::Kept(Kept::AlreadyTheMailbox));
    }
    let add_reply_to =
        !parsed.mailboxes.is_empty() && !fields.iter().any(|f| f.is(message, b"reply-to"));

    let mut head = Vec::with_capacity(field.start + mailbox.len() + 2 * value.len() + 32);
    head.extend_from_slice(&message[..field.start]);
    head.extend_from_slice(b"From: ");
    match &parsed.display_name {
        Some(name) => {
            head.extend_from_slice(name);
            head.extend_from_slice(b" <");
            head.extend_from_slice(mailbox.as_bytes());
            head.push(b'>');
        }
        None => head.extend_from_slice(mailbox.as_bytes()),
    }
    head.extend_from_slice(b"\r\n");
    if add_reply_to {
        // The original value as it was, folding and encoded words included: it is a valid address-list.
        head.extend_from_slice(b"Reply-To:");
        head.extend_from_slice(value);
        if !value.ends_with(b"\n") {
            head.extend_from_slice(b"\r\n");
        }
    }
    Ok(HeaderChange::Rewritten(NewHead {
        head,
        rest: field.end,
        original: String::from_utf8_lossy(&unfold(value)).trim().to_string(),
        reply_to_added: add_reply_to,
    }))
}

/// The header block's To:, Cc: and Bcc: fields narrowed to the addresses in `keep` (as
/// [`address_key`](super::mime::address_key) gives them), for an upstream
/// that takes a message's recipients from its headers (the Gmail API): a header address the envelope does not
/// name (its recipient's mail routed through another account, or already delivered) must not be sent to. To: and
/// Cc: keep their display names (groups are flattened) and go when nothing is left of them; Bcc: goes (the
/// transport names what the headers do not in a `Bcc:` line of its own). `None` when every header address is
/// kept (and `drop_bcc` is false or there is no Bcc:); an error when the header section cannot be read (so
/// cannot be edited). Otherwise the new start of the message, and how many bytes of it that replaces. `drop_bcc`: the transport is about to add a
/// `Bcc:` line, and a message may have only one (RFC 5322 3.6), so the message's own goes whatever it holds.
pub fn narrow_recipients(
    message: &[u8],
    keep: &std::collections::HashSet<String>,
    drop_bcc: bool,
) -> Result<Option<(Vec<u8>, usize)>, HeaderError> {
    let fields = header_fields(message)?;
    let listed = |f: &Field| {
        [b"to".as_slice(), b"cc", b"bcc"]
            .iter()
            .any(|n| f.is(message, n))
    };
    let addresses = |f: &Field| -> Vec<(Option<String>, String)> {
        let mut text = b"To:".to_vec();
        text.extend_from_slice(&message[f.colon + 1..f.end]);
        text.extend_from_slice(b"\r\n\r\n");
        let Some(parsed) = mail_parser::MessageParser::default().parse_headers(&text) else {
            return Vec::new();
        };
        parsed
            .to()
            .into_iter()
            .flat_map(|a| a.iter())
            .filter_map(|a| {
                let address = a.address()?.to_string();
                Some((a.name().map(str::to_string), address))
            })
            .collect()
    };
    let outside = fields
        .iter()
        .filter(|f| listed(f))
        .flat_map(&addresses)
        .any(|(_, a)| !keep.contains(&super::mime::address_key(&a)));
    let own_bcc = drop_bcc && fields.iter().any(|f| f.is(message, b"bcc"));
    if !outside && !own_bcc {
        return Ok(None);
    }
    let Some(end) = fields.last().map(|f| f.end) else {
        return Ok(None);
    };
    let mut head = Vec::with_capacity(end);
    let mut at = 0;
    for f in &fields {
        head.extend_from_slice(&message[at..f.start]);
        at = f.end;
        if !listed(f) {
            head.extend_from_slice(&message[f.start..f.end]);
            continue;
        }
        if f.is(message, b"bcc") {
            continue;
        }
        let all = addresses(f);
        if all.is_empty() {
            // Nothing in it reads as an address (a bare group name, text): kept as it is.
            head.extend_from_slice(&message[f.start..f.end]);
            continue;
        }
        let kept: Vec<Vec<u8>> = all
            .into_iter()
            .filter(|(_, a)| keep.contains(&super::mime::address_key(a)))
            .map(|(name, a)| match name.filter(|n| !n.trim().is_empty()) {
                Some(n) => [
                    display_name(&n),
                    b" <".to_vec(),
                    a.into_bytes(),
                    b">".to_vec(),
                ]
                .concat(),
                None => a.into_bytes(),
            })
            .collect();
        if kept.is_empty() {
            continue;
        }
        head.extend_from_slice(&message[f.start..=f.colon]);
        head.push(b' ');
        // One address a line: a long list stays under the line limit.
        head.extend_from_slice(&kept.join(&b",\r\n "[..]));
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(&message[at..end]);
    Ok(Some((head, end)))
}

/// One header field: `message[start..end]`, its line ends included; the name ends before `colon`.
#[derive(Debug)]
struct Field {
    start: usize,
    colon: usize,
    end: usize,
}

impl Field {
    /// Whether the field's name is `lower` (RFC 5322 names are case-insensitive; obsolete syntax allows white
    /// space before the colon).
    fn is(&self, message: &[u8], lower: &[u8]) -> bool {
        trim_wsp(&message[self.start..self.colon]).eq_ignore_ascii_case(lower)
    }
}

/// The header section's fields, each with its folded lines, up to the blank line (or the end of a message that
/// has no body).
fn header_fields(message: &[u8]) -> Result<Vec<Field>, HeaderError> {
    let window = &message[..message.len().min(HEADER_LIMIT)];
    let mut fields: Vec<Field> = Vec::new();
    let mut at = 0;
    let mut line_no = 0;
    while at < message.len() {
        line_no += 1;
        let end = match memchr::memchr(b'\n', &window[at..]) {
            Some(n) => at + n + 1,
            None if window.len() == message.len() => message.len(),
            None => return Err(HeaderError::TooLong),
        };
        let line = &message[at..end];
        if line == b"\r\n" || line == b"\n" {
            break;
        }
        if line[0] == b' ' || line[0] == b'\t' {
            // A folded line continues the field above it (RFC 5322 section 2.2.3).
            match fields.last_mut() {
                Some(f) => f.end = end,
                None => return Err(HeaderError::NotAField(line_no)),
            }
        } else {
            let colon = memchr::memchr(b':', line).ok_or(HeaderError::NotAField(line_no))?;
            // A field name is printable US-ASCII without a colon (section 2.2); anything else (an mbox "From "
            // line, a body that starts without a blank line) means this is not a header section to edit.
            let name = trim_wsp(&line[..colon]);
            if name.is_empty() || !name.iter().all(|b| (33..=126).contains(b)) {
                return Err(HeaderError::NotAField(line_no));
            }
            fields.push(Field {
                start: at,
                colon: at + colon,
                end,
            });
        }
        at = end;
    }
    Ok(fields)
}

/// A From: value as header mode needs it.
#[derive(Debug, PartialEq, Eq)]
struct ParsedFrom {
    /// Ready to write before `<mailbox>`: the original's raw bytes when it had a display name, else one made from
    /// a comment (`a@x (Scanner)`), quoted or encoded as needed.
    display_name: Option<Vec<u8>>,
    /// Every address, in order (a group's members included).
    mailboxes: Vec<String>,
}

/// mail-parser reads the addresses (it is lenient, as devices need, and knows groups, comments and encoded
/// words); but it gives display names decoded, and header mode must keep them as they were sent (an encoded word
/// stays an encoded word, a quoted name stays quoted), so the raw name is cut from the value by [`first_item`].
fn parse_from(value: &[u8]) -> Result<ParsedFrom, HeaderError> {
    // mail-parser takes a value's last word only at its line end, which the last line of a message without a
    // body may lack.
    let ended: std::borrow::Cow<'_, [u8]> = if value.ends_with(b"\n") {
        value.into()
    } else {
        [value, b"\r\n"].concat().into()
    };
    let (addrs, group_name) = match MessageStream::new(&ended).parse_address() {
        HeaderValue::Address(Address::List(list)) => (list, None),
        HeaderValue::Address(Address::Group(groups)) => {
            let name = groups.first().and_then(|g| g.name.clone());
            (groups.into_iter().flat_map(|g| g.addresses).collect(), name)
        }
        _ => return Err(HeaderError::NoAddress),
    };
    // Every item must be an address: a name alone (`From: Scanner`) leaves nothing sure to reply to.
    let mailboxes = addrs
        .iter()
        .map(|a| {
            a.address
                .as_deref()
                .map(str::trim)
                .filter(|a| !a.is_empty())
        })
        .collect::<Option<Vec<_>>>()
        .ok_or(HeaderError::NoAddress)?;
    let is_group = group_name.is_some();
    if mailboxes.is_empty() && !is_group {
        return Err(HeaderError::NoAddress);
    }
    let display_name = match first_item(value) {
        First::Named(raw) | First::Group(raw) if !raw.is_empty() => Some(raw.to_vec()),
        First::Named(_) => None,
        // A bare address may carry its name in a comment, which mail-parser gives decoded.
        First::Group(_) | First::Bare => {
            let decoded = if is_group {
                group_name.as_deref()
            } else {
                addrs.first().and_then(|a| a.name.as_deref())
            };
            decoded
                .map(str::trim)
                .filter(|n| !n.is_empty())
                .map(display_name)
        }
    };
    Ok(ParsedFrom {
        display_name,
        mailboxes: mailboxes.into_iter().map(str::to_string).collect(),
    })
}

/// What a From: value starts with.
#[derive(Debug, PartialEq, Eq)]
enum First<'a> {
    /// `NAME <addr>`: the raw name, trimmed (empty for `<addr>`).
    Named(&'a [u8]),
    /// `NAME: members;`: the group's raw name, trimmed.
    Group(&'a [u8]),
    /// `addr`, with no name before it.
    Bare,
}

/// Finds the first `<` or `:` outside quoted strings and comments (RFC 5322 section 3.4): what comes before it is
/// a display name as the client wrote it. An `@`, `,` or `;` first means a bare address.
fn first_item(value: &[u8]) -> First<'_> {
    let mut quoted = false;
    let mut comments = 0u32;
    let mut i = 0;
    while i < value.len() {
        let b = value[i];
        if quoted || comments > 0 {
            match b {
                b'\\' => i += 1,
                b'"' if quoted => quoted = false,
                b'(' if !quoted => comments += 1,
                b')' if !quoted => comments -= 1,
                _ => {}
            }
        } else {
            match b {
                b'"' => quoted = true,
                b'(' => comments = 1,
                b'<' => return First::Named(trim_wsp(&value[..i])),
                b':' => return First::Group(trim_wsp(&value[..i])),
                b'@' | b',' | b';' => return First::Bare,
                _ => {}
            }
        }
        i += 1;
    }
    First::Bare
}

/// A display name made from decoded text: as it is when it is a run of atoms, quoted when it has specials, and an
/// RFC 2047 encoded word when it has anything that is not printable US-ASCII (which covers a CR or LF that an
/// encoded word in a comment decoded to: it must not start a header line of its own).
fn display_name(name: &str) -> Vec<u8> {
    let atext = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~".contains(c);
    if name.chars().all(|c| c.is_ascii() && !c.is_ascii_control()) {
        if name
            .split(' ')
            .all(|w| !w.is_empty() && w.chars().all(atext))
        {
            return name.as_bytes().to_vec();
        }
        let mut quoted = Vec::with_capacity(name.len() + 2);
        quoted.push(b'"');
        for b in name.bytes() {
            if b == b'"' || b == b'\\' {
                quoted.push(b'\\');
            }
            quoted.push(b);
        }
        quoted.push(b'"');
        return quoted;
    }
    // An encoded word is at most 75 characters (RFC 2047 section 2): 45 bytes of UTF-8 each, cut between
    // characters, separated by a space (which a decoder drops between encoded words).
    let mut words = Vec::new();
    let mut chunk = String::new();
    for c in name.chars() {
        if chunk.len() + c.len_utf8() > 45 {
            words.push(format!("=?UTF-8?B?{}?=", B64.encode(&chunk)));
            chunk.clear();
        }
        chunk.push(c);
    }
    if !chunk.is_empty() {
        words.push(format!("=?UTF-8?B?{}?=", B64.encode(&chunk)));
    }
    words.join(" ").into_bytes()
}

fn trim_wsp(bytes: &[u8]) -> &[u8] {
    let ws = |b: &u8| matches!(b, b' ' | b'\t' | b'\r' | b'\n');
    let start = bytes.iter().position(|b| !ws(b)).unwrap_or(bytes.len());
    let end = bytes.iter().rposition(|b| !ws(b)).map_or(start, |e| e + 1);
    &bytes[start..end]
}

fn unfold(value: &[u8]) -> Vec<u8> {
    value
        .iter()
        .copied()
        .filter(|b| *b != b'\r' && *b != b'\n')
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAILBOX: &str = "relay@example.com";
    /// Relay's own Received: field comes first in every queued message.
    const RECEIVED: &str = "Received: from device.lan (127.0.0.1)\r\n\tby relay.test with ESMTP id 1\r\n\tfor <b@example.com>; Mon, 1 Jan 2024 00:00:00 +0000\r\n";
    const BODY: &str = "\r\nFrom: not a header, the body\r\n.\r\n=?UTF-8?B?eA==?=\r\n";

    fn message(from: &str, others: &str) -> Vec<u8> {
        format!("{RECEIVED}Subject: scan\r\n{from}{others}{BODY}").into_bytes()
    }

    /// Header mode's result as the upstream sees it, checked to be the head plus the untouched rest.
    fn rewritten(message: &[u8]) -> Vec<u8> {
        match rewrite_header(MAILBOX, message) {
            Ok(HeaderChange::Rewritten(new)) => {
                assert!(new.rest <= message.len());
                let mut out = new.head.clone();
                out.extend_from_slice(&message[new.rest..]);
                out
            }
            other => panic!("not rewritten: {other:?}"),
        }
    }

    /// `from` (a whole field) becomes `to` (From: and maybe Reply-To:), and nothing else changes.
    fn check(from: &str, others: &str, to: &str) {
        let before = message(from, others);
        let after = rewritten(&before);
        assert_eq!(
            String::from_utf8_lossy(&after),
            String::from_utf8_lossy(&message(to, others)),
        );
    }

    #[test]
    fn header_recipients_are_narrowed_to_the_envelope() {
        let keep = |list: &[&str]| list.iter().map(|s| s.to_string()).collect();
        let msg = b"Received: x\r\nTo: A <a@x>, b@x\r\nCC: team: c@x, =?UTF-8?B?w6k=?= <d@x>;\r\nBcc: e@x\r\nSubject: s\r\n\r\nbody\r\n";
        assert_eq!(
            narrow_recipients(msg, &keep(&["a@x", "b@x", "c@x", "d@x", "e@x"]), false).unwrap(),
            None
        );
        let (head, old) = narrow_recipients(msg, &keep(&["a@x", "d@x"]), false)
            .unwrap()
            .unwrap();
        assert_eq!(&msg[old..], b"\r\nbody\r\n");
        assert_eq!(
            String::from_utf8(head).unwrap(),
            "Received: x\r\nTo: A <a@x>\r\nCC: =?UTF-8?B?w6k=?= <d@x>\r\nSubject: s\r\n"
        );
        // Every address kept, but a Bcc: line is to be added: the message's own goes.
        let (head, _) = narrow_recipients(
            msg,
            &keep(&["a@x", "b@x", "c@x", "d@x", "e@x", "f@x"]),
            true,
        )
        .unwrap()
        .unwrap();
        assert!(!String::from_utf8(head).unwrap().contains("Bcc"));
        // Nothing of To: left: the field goes.
        let (head, _) = narrow_recipients(msg, &keep(&["c@x"]), false)
            .unwrap()
            .unwrap();
        assert_eq!(
            String::from_utf8(head).unwrap(),
            "Received: x\r\nCC: c@x\r\nSubject: s\r\n"
        );
        // A Unicode domain in the header is the envelope's ASCII one; a field with no address stays.
        let idn =
            "To: u@b\u{fc}cher.de, v@x\r\nCc: undisclosed-recipients:;\r\n\r\nbody\r\n".as_bytes();
        let (head, _) = narrow_recipients(idn, &keep(&["u@xn--bcher-kva.de"]), false)
            .unwrap()
            .unwrap();
        assert_eq!(
            String::from_utf8(head).unwrap(),
            "To: u@b\u{fc}cher.de\r\nCc: undisclosed-recipients:;\r\n"
        );
    }

    #[test]
    fn envelope_sender_per_mode_and_the_null_sender_stays_null() {
        let none = SenderRewrite::new(MAILBOX.into(), RewriteFrom::None);
        let envelope = SenderRewrite::new(MAILBOX.into(), RewriteFrom::Envelope);
        let header = SenderRewrite::new(MAILBOX.into(), RewriteFrom::Header);
        assert_eq!(none.envelope_sender("a@lan.test"), "a@lan.test");
        assert_eq!(envelope.envelope_sender("a@lan.test"), MAILBOX);
        assert_eq!(header.envelope_sender("a@lan.test"), MAILBOX);
        for r in [&none, &envelope, &header] {
            assert_eq!(r.envelope_sender(""), "");
        }
    }

    #[test]
    fn a_display_name_is_kept_and_the_original_becomes_reply_to() {
        check(
            "From: \"Scanner 3F\" <scanner@lan.test>\r\n",
            "To: ops@example.com\r\n",
            "From: \"Scanner 3F\" <relay@example.com>\r\nReply-To: \"Scanner 3F\" <scanner@lan.test>\r\n",
        );
        check(
            "From: Scanner 3F <scanner@lan.test>\r\n",
            "",
            "From: Scanner 3F <relay@example.com>\r\nReply-To: Scanner 3F <scanner@lan.test>\r\n",
        );
        // A name with quotes and backslashes inside stays exactly as it was quoted.
        check(
            "From: \"Ops \\\"3F\\\" \\\\ Scan\" <s@lan.test>\r\n",
            "",
            "From: \"Ops \\\"3F\\\" \\\\ Scan\" <relay@example.com>\r\nReply-To: \"Ops \\\"3F\\\" \\\\ Scan\" <s@lan.test>\r\n",
        );
    }

    #[test]
    fn no_display_name_gives_the_bare_mailbox() {
        check(
            "From: scanner@lan.test\r\n",
            "",
            "From: relay@example.com\r\nReply-To: scanner@lan.test\r\n",
        );
        check(
            "From: <scanner@lan.test>\r\n",
            "",
            "From: relay@example.com\r\nReply-To: <scanner@lan.test>\r\n",
        );
    }

    #[test]
    fn encoded_words_and_8bit_names_stay_as_they_were() {
        check(
            "From: =?UTF-8?B?U2Nhbm5lciBCw7xybw==?= <scanner@lan.test>\r\n",
            "",
            "From: =?UTF-8?B?U2Nhbm5lciBCw7xybw==?= <relay@example.com>\r\nReply-To: =?UTF-8?B?U2Nhbm5lciBCw7xybw==?= <scanner@lan.test>\r\n",
        );
        check(
            "From: =?iso-8859-1?Q?B=FCro?= 3F <scanner@lan.test>\r\n",
            "",
            "From: =?iso-8859-1?Q?B=FCro?= 3F <relay@example.com>\r\nReply-To: =?iso-8859-1?Q?B=FCro?= 3F <scanner@lan.test>\r\n",
        );
        check(
            "From: \"Büro 3F\" <scanner@lan.test>\r\n",
            "",
            "From: \"Büro 3F\" <relay@example.com>\r\nReply-To: \"Büro 3F\" <scanner@lan.test>\r\n",
        );
    }

    #[test]
    fn a_name_in_a_comment_is_quoted_or_encoded_as_it_needs() {
        check(
            "From: scanner@lan.test (Scanner)\r\n",
            "",
            "From: Scanner <relay@example.com>\r\nReply-To: scanner@lan.test (Scanner)\r\n",
        );
        check(
            "From: scanner@lan.test (Scanner, 3F)\r\n",
            "",
            "From: \"Scanner, 3F\" <relay@example.com>\r\nReply-To: scanner@lan.test (Scanner, 3F)\r\n",
        );
        // Decoded to something that is not printable US-ASCII: encoded again, so that a CR LF in it can never
        // start a header line of its own.
        let evil = B64.encode("x\r\nBcc: victim@example.com");
        let from = format!("From: scanner@lan.test (=?UTF-8?B?{evil}?=)\r\n");
        let expected = format!(
            "From: =?UTF-8?B?{evil}?= <relay@example.com>\r\nReply-To: scanner@lan.test (=?UTF-8?B?{evil}?=)\r\n"
        );
        check(&from, "", &expected);
        assert_eq!(
            display_name(&"ü".repeat(30)),
            format!(
                "=?UTF-8?B?{}?= =?UTF-8?B?{}?=",
                B64.encode("ü".repeat(22)),
                B64.encode("ü".repeat(8))
            )
            .into_bytes()
        );
    }

    #[test]
    fn groups_and_lists_keep_the_first_name() {
        check(
            "From: Scanners: \"Scanner 3F\" <s3@lan.test>, s4@lan.test;\r\n",
            "",
            "From: Scanners <relay@example.com>\r\nReply-To: Scanners: \"Scanner 3F\" <s3@lan.test>, s4@lan.test;\r\n",
        );
        check(
            "From: \"Floor 3\": s3@lan.test;\r\n",
            "",
            "From: \"Floor 3\" <relay@example.com>\r\nReply-To: \"Floor 3\": s3@lan.test;\r\n",
        );
        // An empty group has no one to reply to.
        check(
            "From: Undisclosed scanners:;\r\n",
            "",
            "From: Undisclosed scanners <relay@example.com>\r\n",
        );
        check(
            "From: \"Scanner 3F\" <s3@lan.test>, Scanner 4F <s4@lan.test>\r\n",
            "",
            "From: \"Scanner 3F\" <relay@example.com>\r\nReply-To: \"Scanner 3F\" <s3@lan.test>, Scanner 4F <s4@lan.test>\r\n",
        );
        // The account's mailbox among others is not "already the mailbox".
        check(
            "From: relay@example.com, s4@lan.test\r\n",
            "",
            "From: relay@example.com\r\nReply-To: relay@example.com, s4@lan.test\r\n",
        );
    }

    #[test]
    fn an_existing_reply_to_is_kept_and_not_repeated() {
        for reply_to in [
            "Reply-To: helpdesk@example.com\r\n",
            "reply-TO :\r\n helpdesk@example.com\r\n",
        ] {
            check(
                "From: \"Scanner 3F\" <scanner@lan.test>\r\n",
                reply_to,
                "From: \"Scanner 3F\" <relay@example.com>\r\n",
            );
        }
        // Before the From: field too.
        let before = format!(
            "{RECEIVED}Reply-To: helpdesk@example.com\r\nFrom: a@lan.test\r\nTo: b@example.com\r\n{BODY}"
        );
        let after = format!(
            "{RECEIVED}Reply-To: helpdesk@example.com\r\nFrom: relay@example.com\r\nTo: b@example.com\r\n{BODY}"
        );
        assert_eq!(rewritten(before.as_bytes()), after.as_bytes());
    }

    #[test]
    fn a_folded_from_is_read_whole_and_reply_to_keeps_its_folding() {
        check(
            "FROM:\r\n \"Scanner\r\n 3F\"\r\n\t<scanner@lan.test>\r\n",
            "X-Folded: a\r\n b\r\n",
            "From: \"Scanner\r\n 3F\" <relay@example.com>\r\nReply-To:\r\n \"Scanner\r\n 3F\"\r\n\t<scanner@lan.test>\r\n",
        );
    }

    #[test]
    fn lf_only_lines_and_a_message_without_a_body() {
        let before = b"Subject: x\nFrom: A <a@lan.test>\nTo: b@example.com\n\nbody\n";
        assert_eq!(
            rewritten(before),
            b"Subject: x\nFrom: A <relay@example.com>\r\nReply-To: A <a@lan.test>\nTo: b@example.com\n\nbody\n"
        );
        let before = b"Subject: x\r\nFrom: a@lan.test\r\n";
        assert_eq!(
            rewritten(before),
            b"Subject: x\r\nFrom: relay@example.com\r\nReply-To: a@lan.test\r\n"
        );
        let before = b"From: a@lan.test";
        assert_eq!(
            rewritten(before),
            b"From: relay@example.com\r\nReply-To: a@lan.test\r\n"
        );
    }

    #[test]
    fn left_alone_when_from_is_the_mailbox_or_absent() {
        for from in [
            "From: relay@example.com\r\n",
            "From: \"Relay\" <RELAY@Example.COM>\r\n",
            "From: Team: relay@example.com;\r\n",
        ] {
            assert_eq!(
                rewrite_header(MAILBOX, &message(from, "")),
                Ok(HeaderChange::Kept(Kept::AlreadyTheMailbox)),
                "{from}"
            );
        }
        assert_eq!(
            rewrite_header(MAILBOX, &message("", "To: b@example.com\r\n")),
            Ok(HeaderChange::Kept(Kept::NoFrom))
        );
        // A "From:" in the body is not a header.
        assert_eq!(
            rewrite_header(MAILBOX, b"Subject: x\r\n\r\nFrom: a@lan.test\r\n"),
            Ok(HeaderChange::Kept(Kept::NoFrom))
        );
    }

    #[test]
    fn what_cannot_be_read_is_left_as_it_is() {
        let mut long = format!("{RECEIVED}From: a@lan.test\r\nX-Long: ").into_bytes();
        long.resize(HEADER_LIMIT + 10, b'x');
        long.extend_from_slice(b"\r\n\r\nbody\r\n");
        assert_eq!(rewrite_header(MAILBOX, &long), Err(HeaderError::TooLong));
        let mut many = format!("{RECEIVED}From: a@lan.test\r\n").into_bytes();
        while many.len() <= HEADER_LIMIT {
            many.extend_from_slice(b"X-Many: line\r\n");
        }
        many.extend_from_slice(b"\r\nbody\r\n");
        assert_eq!(rewrite_header(MAILBOX, &many), Err(HeaderError::TooLong));
        // A header section just under the limit is read.
        let mut near = b"From: a@lan.test\r\nX-Near: ".to_vec();
        near.resize(HEADER_LIMIT - 4, b'x');
        near.extend_from_slice(b"\r\n\r\nbody\r\n");
        assert!(matches!(
            rewrite_header(MAILBOX, &near),
            Ok(HeaderChange::Rewritten(_))
        ));

        for (from, error) in [
            ("From: Scanner 3F\r\n", HeaderError::NoAddress),
            ("From: \r\n", HeaderError::NoAddress),
            ("From: \"Scanner\" <>\r\n", HeaderError::NoAddress),
            (
                "From: a@lan.test\r\nFrom: b@lan.test\r\n",
                HeaderError::SeveralFrom(2),
            ),
            ("From a@lan.test Mon Jan  1\r\n", HeaderError::NotAField(5)),
            (
                "From: a@lan.test\r\nno colon\r\n",
                HeaderError::NotAField(6),
            ),
            ("X Y: z\r\nFrom: a@lan.test\r\n", HeaderError::NotAField(5)),
        ] {
            assert_eq!(
                rewrite_header(MAILBOX, &message(from, "")),
                Err(error),
                "{from:?}"
            );
        }
        assert_eq!(
            rewrite_header(MAILBOX, b" folded first\r\nFrom: a@lan.test\r\n\r\n"),
            Err(HeaderError::NotAField(1))
        );
    }

    #[tokio::test]
    async fn prepare_applies_the_mode_and_never_loses_the_message() {
        let out = |m: &Vec<u8>| Outgoing::from_bytes(m.clone());
        let header = SenderRewrite::new(MAILBOX.into(), RewriteFrom::Header);
        let before = message("From: \"Scanner 3F\" <scanner@lan.test>\r\n", "");
        let (sender, after) = header.prepare("id", "scanner@lan.test", out(&before));
        assert_eq!(sender, MAILBOX);
        assert_eq!(after.read_all().await.unwrap(), rewritten(&before));
        // A bounce: MAIL FROM stays null, the header is rewritten all the same.
        let (sender, after) = header.prepare("id", "", out(&before));
        assert_eq!(sender, "");
        assert_eq!(after.read_all().await.unwrap(), rewritten(&before));
        // Unreadable: as it was.
        let odd = message("From: Scanner 3F\r\n", "");
        let (_, after) = header.prepare("id", "a@lan.test", out(&odd));
        assert_eq!(after.read_all().await.unwrap(), odd);
        for mode in [RewriteFrom::None, RewriteFrom::Envelope] {
            let r = SenderRewrite::new(MAILBOX.into(), mode);
            let (_, after) = r.prepare("id", "a@lan.test", out(&before));
            assert_eq!(after.read_all().await.unwrap(), before);
        }
    }

    #[test]
    fn first_item_skips_quotes_and_comments() {
        assert_eq!(
            first_item(b" \"a <b>: c\" (x <y> : z (n)) <a@b>"),
            First::Named(b"\"a <b>: c\" (x <y> : z (n))")
        );
        assert_eq!(
            first_item(b" \"a\\\"<\" <a@b>"),
            First::Named(b"\"a\\\"<\"")
        );
        assert_eq!(first_item(b" G : a@b;"), First::Group(b"G"));
        assert_eq!(first_item(b" \"a:b\"@c"), First::Bare);
        assert_eq!(first_item(b" a@b (N <x>)"), First::Bare);
        assert_eq!(first_item(b" \"unterminated <a@b>"), First::Bare);
    }
}
