//! `bounce = "sender"`: when a message goes to `dead/`, a delivery status notification (RFC 3464) goes to its
//! envelope sender, queued like any message (durable, retried, routed) with the null sender `<>`.
//!
//! Never for a message whose sender is null: that is a bounce already (RFC 5321 section 4.5.5), and a DSN that
//! itself goes to `dead/` has a null sender, so bounces cannot loop. The DSN is handed to the spool as the
//! message is moved to `dead/`; only a crash between the two loses it (the message itself stays in `dead/`).
//!
//! A DSN names only the recipients that did not get the message: those the upstream refused for good while it
//! took the message for others (bounced then, the message still queued), and, for a dead message, those not
//! finished with by an earlier partial delivery (its state file says which).

use std::path::PathBuf;
use std::time::SystemTime;

use crate::events::{Event, Watcher};
use crate::mailgen;
use crate::queue::layout::msg_path;
use crate::queue::{Envelope, QueueId, Spool};

/// The most of the original header section a DSN carries: enough for every header a person looks at, and a
/// DSN stays small whatever the original was.
const MAX_HEADERS: usize = 64 * 1024;

pub struct Bouncer {
    spool: Spool,
    dead: PathBuf,
    queue: PathBuf,
    /// The config's hostname (the DSN's Reporting-MTA and sender): a reload may change it.
    hostname: std::sync::Mutex<String>,
}

/// Which of a message's recipients a DSN is for.
enum Failed<'a> {
    /// Moved to `dead/`: all but those an earlier attempt finished with; those named here with their own
    /// refusal, the others with the reason the message died of.
    Dead(&'a [(String, String)]),
    /// Refused for good while the others got it or wait (the message is still in `queue/`): each recipient with
    /// the reply to its RCPT.
    Refused(&'a [(String, String)]),
}

impl Bouncer {
    pub fn new(spool: Spool, hostname: &str) -> Bouncer {
        Bouncer {
            dead: spool.paths().dead.clone(),
            queue: spool.paths().queue.clone(),
            spool,
            hostname: std::sync::Mutex::new(hostname.to_string()),
        }
    }

    /// The hostname after a reload.
    pub fn follow_hostname(&self, hostname: &str) {
        *self.hostname() = hostname.to_string();
    }

    fn hostname(&self) -> std::sync::MutexGuard<'_, String> {
        self.hostname
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// `account`: the one the failed message went through, which carries the report too (see `Envelope::via`).
    fn bounce(&self, id: QueueId, failed: Failed<'_>, why: &str, account: Option<&str>) {
        let dir = match failed {
            Failed::Dead(_) => &self.dead,
            Failed::Refused(_) => &self.queue,
        };
        let original = match crate::queue::file::read(&msg_path(dir, id)) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(relay_queue_id = %id, error = %e, "cannot read the message to bounce it");
                return;
            }
        };
        if original.envelope.sender.is_empty() {
            return;
        }
        let failures: Vec<(String, String)> = match failed {
            Failed::Dead(refused) => {
                let own: std::collections::HashMap<&str, &str> = refused
                    .iter()
                    .map(|(to, reply)| (to.as_str(), reply.as_str()))
                    .collect();
                crate::queue::state::read_state(&self.dead, id)
                    .remaining(&original.envelope.recipients)
                    .into_iter()
                    .map(|r| {
                        let why = own.get(r.as_str()).copied().unwrap_or(why).to_string();
                        (r, why)
                    })
                    .collect()
            }
            Failed::Refused(refused) => refused.to_vec(),
        };
        if failures.is_empty() {
            return;
        }
        let headers = match original.header_block() {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(relay_queue_id = %id, error = %e, "cannot read the dead message's headers; bouncing without them");
                Vec::new()
            }
        };
        let now = SystemTime::now();
        let hostname = self.hostname().clone();
        let report = dsn(&hostname, &original.envelope, &failures, &headers, now);
        let envelope = Envelope {
            id: QueueId::new(),
            sender: String::new(),
            recipients: vec![original.envelope.sender.clone()],
            client: "local:bounce".into(),
            helo: None,
            user: None,
            listener: String::new(),
            received_at: now,
            body_8bit: !report.is_ascii(),
            // Its header section names the sender as it is.
            smtputf8: !original.envelope.sender.is_ascii(),
            via: account.map(str::to_string),
        };
        let dsn_id = envelope.id;
        let to = original.envelope.sender.clone();
        let queued = self.spool.submit(&envelope, &report);
        let wait = match queued {
            Ok(wait) => wait,
            Err(e) => {
                tracing::error!(relay_queue_id = %id, error = %e, "cannot queue the bounce");
                return;
            }
        };
        // Said once the bounce is durable; the dead message's own handling never waits for it.
        let shown = to.clone();
        let logged = async move {
            match wait.await {
                Ok(Ok(())) => {
                    crate::metrics::global().bounces.inc();
                    tracing::info!(relay_event = "bounce_queued", relay_queue_id = %id, bounce_id = %dsn_id, to = %to, "delivery status notification queued to the sender");
                }
                Ok(Err(e)) => {
                    tracing::error!(relay_queue_id = %id, error = %e, "cannot queue the bounce")
                }
                Err(_) => {
                    tracing::error!(relay_queue_id = %id, "cannot queue the bounce: the spool stopped")
                }
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(logged);
            }
            Err(_) => {
                tracing::info!(relay_event = "bounce_queued", relay_queue_id = %id, bounce_id = %dsn_id, to = %shown, "delivery status notification handed to the spool")
            }
        }
    }
}

impl Watcher for Bouncer {
    /// `Dead` and `RecipientsRefused` are emitted from delivery's work on the blocking pool, so reading the
    /// message here is in place.
    fn seen(&self, event: &Event<'_>) {
        match *event {
            Event::Dead {
                id,
                why,
                account,
                refused,
            } => self.bounce(id, Failed::Dead(refused), why, account),
            Event::RecipientsRefused {
                id,
                refused,
                account,
            } => self.bounce(id, Failed::Refused(refused), "", Some(account)),
            _ => {}
        }
    }
}

/// The enhanced status code (RFC 3463) for a DSN: the one in the upstream's reply made permanent, 5.4.7 for mail
/// that expired in the queue, else 5.0.0.
fn status(why: &str) -> String {
    if why.starts_with("expired after") {
        return "5.4.7".into();
    }
    match enhanced_status(why) {
        Some(c) => format!("5{}", &c[1..]),
        None => "5.0.0".into(),
    }
}

/// The first enhanced status code (RFC 3463, `5.1.1`) in a reason, if there is one.
pub fn enhanced_status(why: &str) -> Option<&str> {
    why.split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .map(|w| w.trim_end_matches('.'))
        .find(|w| {
            let parts: Vec<&str> = w.split('.').collect();
            parts.len() == 3
                && matches!(parts[0], "2" | "4" | "5")
                && parts[1..]
                    .iter()
                    .all(|p| (1..=3).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit()))
        })
}

/// `Diagnostic-Code`: an SMTP reply as `smtp; CODE TEXT`, anything else (an HTTP API's error, relay's own reason)
/// as `X-relay;`. Folded to fit a header (RFC 5322 section 2.2.3).
fn diagnostic(why: &str) -> String {
    let why = mailgen::one_line(why, 2000);
    let value = match smtp_reply(&why) {
        Some((code, text)) => format!("smtp; {code} {text}"),
        None => format!("X-relay; {why}"),
    };
    fold(&format!("Diagnostic-Code: {value}"))
}

/// The SMTP reply in an error text, whatever words the transport put around it (`550 5.1.1 …`, `permanent error
/// (550): 5.1.1 …`): a 4xx or 5xx code, then an enhanced status code. An HTTP status (`403 ErrorAccessDenied`)
/// has no enhanced code, and is not taken for one.
fn smtp_reply(why: &str) -> Option<(&str, &str)> {
    let bytes = why.as_bytes();
    (0..bytes.len().saturating_sub(2)).find_map(|i| {
        let code = why.get(i..i + 3)?;
        let bounded = (i == 0 || !bytes[i - 1].is_ascii_digit())
            && bytes.get(i + 3).is_none_or(|b| !b.is_ascii_digit());
        if !bounded || !matches!(bytes[i], b'4' | b'5') || !code.bytes().all(|b| b.is_ascii_digit())
        {
            return None;
        }
        let text = why[i + 3..].trim_start_matches([')', ':', ' ', '-']);
        let enhanced = text.split_whitespace().next()?;
        (enhanced.starts_with(&code[..1]) && status(enhanced) != "5.0.0").then_some((code, text))
    })
}

/// A header field folded at spaces into lines of about 78 characters.
fn fold(field: &str) -> String {
    mailgen::wrap(field, 76)
        .trim_end_matches("\r\n")
        .replace("\r\n", "\r\n ")
}

/// The DSN for a message that failed for good: the human-readable part, the `message/delivery-status` report
/// with one block per recipient, and the original header section as `text/rfc822-headers` (RFC 3464, RFC 6522).
pub fn dsn(
    host: &str,
    original: &Envelope,
    failures: &[(String, String)],
    headers: &[u8],
    now: SystemTime,
) -> Vec<u8> {
    let host = mailgen::one_line(host, 255);
    let boundary = format!("=_relay_dsn_{}", uuid::Uuid::now_v7().simple());
    let failures: Vec<(String, &str)> = failures
        .iter()
        .map(|(r, why)| (mailgen::one_line(r, 512), why.as_str()))
        .collect();
    let recipients: Vec<&str> = failures.iter().map(|(r, _)| r.as_str()).collect();
    // One reason for all (a dead message), or each recipient's own (refused one by one).
    let reasons = match failures.first() {
        Some((_, first)) if failures.iter().all(|(_, why)| why == first) => {
            format!("The reason: {}", mailgen::one_line(first, 2000))
        }
        _ => failures
            .iter()
            .map(|(r, why)| format!("{r}: {}", mailgen::one_line(why, 2000)))
            .collect::<Vec<_>>()
            .join("\n"),
    };
    let human = mailgen::wrap(
        &format!(
            "This is the mail relay at {host}.\n\nYour message could not be delivered to {}. It has been given up on; no further attempts will be made.\n\n{reasons}\n\nThe headers of your message are attached.",
            recipients.join(", "),
        ),
        76,
    );
    // RFC 6533: a report about non-ASCII addresses, quoting non-ASCII header fields, or giving a reason in words
    // that are not ASCII (a localised upstream's `Empfänger unbekannt`), uses the `global` types, which carry UTF-8
    // as it is (`message/delivery-status` and `text/rfc822-headers` are ASCII only).
    let global = !original.sender.is_ascii()
        || failures
            .iter()
            .any(|(r, why)| !r.is_ascii() || !why.is_ascii())
        || !headers.is_ascii();
    // Each part says it is 8-bit where it is (RFC 2045: no Content-Transfer-Encoding means 7bit).
    let encoding = |text: &[u8]| {
        if text.is_ascii() {
            ""
        } else {
            "Content-Transfer-Encoding: 8bit\r\n"
        }
    };
    let (report_type, status_type, headers_type) = if global {
        (
            "global-delivery-status",
            "message/global-delivery-status",
            "message/global-headers",
        )
    } else {
        (
            "delivery-status",
            "message/delivery-status",
            "text/rfc822-headers",
        )
    };
    let mut report = format!(
        "Reporting-MTA: dns; {host}\r\nX-Relay-Queue-ID: {id}\r\nArrival-Date: {arrived}\r\n",
        id = original.id,
        arrived = mailgen::date(original.received_at),
    );
    for (r, why) in &failures {
        report.push_str(&format!(
            "\r\nFinal-Recipient: {}\r\nAction: failed\r\nStatus: {}\r\n{}\r\nLast-Attempt-Date: {}\r\n",
            final_recipient(r),
            status(why),
            diagnostic(why),
            mailgen::date(now),
        ));
    }
    let mut out = format!(
        "From: Mail Delivery System <MAILER-DAEMON@{host}>\r\nTo: <{to}>\r\nSubject: Undelivered Mail Returned to Sender\r\nDate: {date}\r\nMessage-ID: {mid}\r\nAuto-Submitted: auto-replied\r\nMIME-Version: 1.0\r\nContent-Type: multipart/report; report-type={report_type};\r\n boundary=\"{boundary}\"\r\n\r\nThis is a MIME-encapsulated message: a delivery status notification.\r\n\r\n--{boundary}\r\nContent-Type: text/plain; charset=utf-8\r\n{human_encoding}Content-Description: Notification\r\n\r\n{human}\r\n--{boundary}\r\nContent-Type: {status_type}\r\n{report_encoding}Content-Description: Delivery report\r\n\r\n{report}\r\n--{boundary}\r\nContent-Type: {headers_type}\r\n{headers_encoding}Content-Description: Undelivered Message Headers\r\n\r\n",
        to = mailgen::one_line(&original.sender, 512),
        date = mailgen::date(now),
        mid = mailgen::message_id(&host),
        human_encoding = encoding(human.as_bytes()),
        report_encoding = encoding(report.as_bytes()),
        headers_encoding = encoding(headers),
    )
    .into_bytes();
    out.extend_from_slice(&crlf_headers(headers));
    out.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    out
}

/// A `Final-Recipient` field's value: `rfc822; ADDRESS`, or for a non-ASCII address RFC 6533's `utf-8; ADDRESS`,
/// where `+`, `=` and `\` (xtext's own characters) are written `\x{HEX}`.
fn final_recipient(address: &str) -> String {
    if address.is_ascii() {
        return format!("rfc822; {address}");
    }
    let mut out = String::from("utf-8; ");
    for c in address.chars() {
        match c {
            // xtext's own characters, and what a field value cannot hold as it is.
            '+' | '=' | '\\' => out.push_str(&format!("\\x{{{:X}}}", u32::from(c))),
            c if c.is_whitespace() || c.is_control() => {
                out.push_str(&format!("\\x{{{:X}}}", u32::from(c)))
            }
            c => out.push(c),
        }
    }
    out
}

/// The header section with CRLF line ends, cut at a line end to at most [`MAX_HEADERS`], and at the first line
/// that is neither a header field nor its continuation: a message without the empty line between header and
/// body would otherwise have its text quoted back to whatever address its sender gave (on a listener without
/// logins, anyone's).
fn crlf_headers(headers: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(headers.len().min(MAX_HEADERS) + 64);
    for line in headers.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            continue;
        }
        if !is_header_line(line, out.is_empty()) || out.len() + line.len() + 2 > MAX_HEADERS {
            break;
        }
        out.extend_from_slice(line);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// A header field's first line (RFC 5322 section 2.2: printable ASCII but the colon, then a colon), or, after one,
/// a continuation (beginning with a space or a tab).
fn is_header_line(line: &[u8], first: bool) -> bool {
    if !first && matches!(line.first(), Some(b' ' | b'\t')) {
        return true;
    }
    match line.iter().position(|&b| b == b':') {
        Some(colon) if colon > 0 => line[..colon].iter().all(|&b| (33..=126).contains(&b)),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only header fields are quoted: text after a missing separator stops the quote.
    #[test]
    fn only_header_fields_are_quoted_back() {
        let quoted = crlf_headers(
            b"Subject: scan\r\n folded\r\nFrom: a@b\r\nBuy cheap watches at example.com\r\nX-Not: quoted\r\n",
        );
        assert_eq!(quoted, b"Subject: scan\r\n folded\r\nFrom: a@b\r\n");
        assert_eq!(
            crlf_headers(b" leading continuation\r\nSubject: x\r\n"),
            b""
        );
        assert_eq!(
            crlf_headers(b"Subject: x\nTo: y\n"),
            b"Subject: x\r\nTo: y\r\n"
        );
    }

    #[test]
    fn status_codes() {
        assert_eq!(
            status("550 5.1.1 <x@y>: Recipient address rejected"),
            "5.1.1"
        );
        assert_eq!(
            status("554 5.2.252 SendAsDenied; a@b not allowed"),
            "5.2.252"
        );
        assert_eq!(
            status("expired after 5days; last error: 451 4.3.0 later"),
            "5.4.7"
        );
        assert_eq!(status("Graph said 403 ErrorAccessDenied"), "5.0.0");
        assert_eq!(status("450 4.2.2 mailbox full"), "5.2.2");
    }

    #[test]
    fn diagnostic_codes_find_the_smtp_reply() {
        assert_eq!(
            diagnostic("permanent error (550): 5.1.1 <x@y>: no such user"),
            "Diagnostic-Code: smtp; 550 5.1.1 <x@y>: no such user"
        );
        assert_eq!(
            diagnostic("554 5.2.252 SendAsDenied"),
            "Diagnostic-Code: smtp; 554 5.2.252 SendAsDenied"
        );
        assert_eq!(
            diagnostic("Graph refused it: 403 ErrorAccessDenied"),
            "Diagnostic-Code: X-relay; Graph refused it: 403 ErrorAccessDenied"
        );
        let long = diagnostic(&format!("550 5.7.1 {}", "word ".repeat(100)));
        assert!(
            long.split("\r\n").skip(1).all(|l| l.starts_with(' ')),
            "folded: {long}"
        );
    }

    /// A message from scanner@lan.test to `recipients`, as the DSN's tests bounce it.
    fn original(recipients: &[&str]) -> Envelope {
        Envelope {
            client: "192.0.2.1:1234".into(),
            ..Envelope::example("scanner@lan.test", recipients)
        }
    }

    #[test]
    fn a_dsn_has_the_three_parts() {
        let env = original(&["nobody@example.com", "two@example.com"]);
        let long = "x ".repeat(300);
        let why = format!("550 5.1.1 <nobody@example.com>: no such user {long}");
        let failures: Vec<(String, String)> = env
            .recipients
            .iter()
            .map(|r| (r.clone(), why.clone()))
            .collect();
        let m = dsn(
            "relay.test",
            &env,
            &failures,
            b"Subject: scan\nFrom: scanner@lan.test\n",
            SystemTime::now(),
        );
        let text = String::from_utf8(m).unwrap();
        assert!(text.contains("Content-Type: multipart/report; report-type=delivery-status;"));
        assert!(text.contains("\r\nTo: <scanner@lan.test>\r\n"));
        assert!(text.contains("\r\nContent-Type: message/delivery-status\r\n"));
        assert!(text.contains("\r\nFinal-Recipient: rfc822; nobody@example.com\r\nAction: failed\r\nStatus: 5.1.1\r\nDiagnostic-Code: smtp; 550 5.1.1"));
        assert!(text.contains("\r\nFinal-Recipient: rfc822; two@example.com\r\n"));
        assert!(text.contains("\r\nContent-Type: text/rfc822-headers\r\nContent-Description: Undelivered Message Headers\r\n\r\nSubject: scan\r\nFrom: scanner@lan.test\r\n"));
        assert!(text.trim_end().ends_with("--"));
        assert!(
            text.split("\r\n").all(|l| l.len() <= 998),
            "every line fits SMTP"
        );
        assert!(!text.replace("\r\n", "").contains('\n'), "CRLF only");
        assert!(!text.contains("Content-Transfer-Encoding"), "all 7-bit");
    }

    /// A localised upstream's reason (UTF-8 words) makes the report a global one, each 8-bit part marked so.
    #[test]
    fn a_dsn_with_a_reason_in_other_words_than_ascii_is_marked_8bit() {
        let env = original(&["nobody@example.com"]);
        let failures = vec![(
            env.recipients[0].clone(),
            "550 5.1.1 Empfänger unbekannt".into(),
        )];
        let m = dsn(
            "relay.test",
            &env,
            &failures,
            b"Subject: scan\n",
            SystemTime::now(),
        );
        let text = String::from_utf8(m).unwrap();
        assert!(
            text.contains("report-type=global-delivery-status;"),
            "{text}"
        );
        assert!(text.contains(
            "\r\nContent-Type: message/global-delivery-status\r\nContent-Transfer-Encoding: 8bit\r\n"
        ));
        assert!(text.contains(
            "\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n"
        ));
        // The quoted headers are ASCII: 7-bit, as they are.
        assert!(text.contains("\r\nContent-Type: message/global-headers\r\nContent-Description:"));
    }

    #[test]
    fn a_dsn_about_utf8_addresses_uses_the_global_types() {
        let env = original(&["jürgen+x@example.com"]);
        let failures = vec![(env.recipients[0].clone(), "550 5.1.1 no such user".into())];
        let m = dsn(
            "relay.test",
            &env,
            &failures,
            b"Subject: scan\n",
            SystemTime::now(),
        );
        let text = String::from_utf8(m).unwrap();
        assert!(text.contains("report-type=global-delivery-status;"));
        assert!(text.contains("\r\nContent-Type: message/global-delivery-status\r\n"));
        assert!(text.contains("\r\nFinal-Recipient: utf-8; jürgen\\x{2B}x@example.com\r\n"));
        assert!(text.contains("\r\nContent-Type: message/global-headers\r\n"));
        assert!(!text.contains("rfc822"));
    }
}
