//! SMTP replies and what an EHLO reply offers. Pure.
//!
//! Our own reply parser, not smtp-proto's: its receiver keeps an enhanced status code's parts in bytes, so
//! Microsoft's `5.7.708` came out as `5.7.255`, and those codes are what a sysadmin searches for.

use std::fmt;

/// Longest reply accepted (all its lines): far beyond any real EHLO, and a bound on what a server can make relay
/// hold.
pub const MAX_REPLY: usize = 16 << 10;

/// One reply, possibly of several lines (joined with `\n` in `text`, each without its code and status).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    /// The enhanced status code (RFC 3463), when the server gave one.
    pub status: Option<[u16; 3]>,
    pub text: String,
}

/// Why bytes are not a reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    #[error("a reply line does not start with a three-digit code: {0:?}")]
    Malformed(String),
    #[error("a reply longer than {MAX_REPLY} bytes")]
    TooLong,
    #[error("the lines of one reply have different codes: {0:?}")]
    Mixed(String),
}

/// The first whole reply at the start of `buf`, and how many bytes it took; `Ok(None)` while it is incomplete.
pub fn parse(buf: &[u8]) -> Result<Option<(Reply, usize)>, ReplyError> {
    let mut at = 0;
    let mut lines: Vec<String> = Vec::new();
    let mut code = None;
    loop {
        let Some(lf) = memchr::memchr(b'\n', &buf[at..]) else {
            return if buf.len() > MAX_REPLY {
                Err(ReplyError::TooLong)
            } else {
                Ok(None)
            };
        };
        let raw = &buf[at..at + lf];
        at += lf + 1;
        if at > MAX_REPLY {
            return Err(ReplyError::TooLong);
        }
        // Escaped here, once: a server's words go into log lines, state files and terminals, where an ESC or a
        // NUL would act or hide the line (journald stores a line with control characters as a blob).
        let line = crate::terminal::printable(raw.strip_suffix(b"\r").unwrap_or(raw));
        let digits = line
            .get(..3)
            .filter(|d| d.bytes().all(|b| b.is_ascii_digit()));
        let (Some(digits), sep) = (digits, line.as_bytes().get(3).copied()) else {
            return Err(ReplyError::Malformed(line.chars().take(80).collect()));
        };
        if !matches!(sep, None | Some(b' ') | Some(b'-')) {
            return Err(ReplyError::Malformed(line.chars().take(80).collect()));
        }
        // Checked to be three ASCII digits.
        let this: u16 = digits.parse().unwrap_or(0);
        // RFC 5321 section 4.2: the first digit is 2 to 5 and the second 0 to 5. Anything else is no answer at
        // all: a `354` or `399` to the final dot must never be read as "taken", nor a `699` as "refused".
        if !(2..=5).contains(&(this / 100)) || this / 10 % 10 > 5 {
            return Err(ReplyError::Malformed(line.chars().take(80).collect()));
        }
        // Every line of one reply carries the same code (section 4.2.1): `250-queued` then `554 rejected` says
        // both, and neither can be trusted.
        if *code.get_or_insert(this) != this {
            return Err(ReplyError::Mixed(line.chars().take(80).collect()));
        }
        lines.push(line.get(4..).unwrap_or("").to_string());
        if sep != Some(b'-') {
            break;
        }
    }
    let code = code.unwrap_or(0);
    let status = lines.first().and_then(|l| enhanced(l));
    let text = lines
        .iter()
        .map(|l| match (status, enhanced(l)) {
            // Each line repeats the status; it is kept once.
            (Some(s), Some(t)) if s == t => {
                l.split_once(' ').map_or("", |(_, rest)| rest).trim_start()
            }
            _ => l.as_str(),
        })
        .collect::<Vec<_>>()
        .join("\n");
    Ok(Some((Reply { code, status, text }, at)))
}

/// Reads through a reply too long to keep ([`MAX_REPLY`]: one endless line, or continuation lines without end)
/// to its last line, keeping the start of its first line and of its last, so that the reply still counts. To the
/// final dot that matters: a message the server took, answered with a reply too long to read, would otherwise be
/// deferred and sent again at every retry. What it reads is bounded by the caller's time limit, not by memory.
#[derive(Debug, Default)]
pub struct Skim {
    code: Option<u16>,
    /// The first bytes of the line being read (its code and separator), and its text up to [`SKIM_KEEP`].
    head: Vec<u8>,
    text: Vec<u8>,
    first: Option<Vec<u8>>,
    cut: u64,
}

/// What a skimmed reply keeps of its first and last lines.
const SKIM_KEEP: usize = 512;

impl Skim {
    /// Feeds the next bytes of the reply; once its last line has ended, the reply and how many of `bytes` it
    /// took (the rest is what the server sent after it).
    pub fn feed(&mut self, bytes: &[u8]) -> Result<Option<(Reply, usize)>, ReplyError> {
        for (i, &b) in bytes.iter().enumerate() {
            if b != b'\n' {
                if self.head.len() < 4 {
                    self.head.push(b);
                } else if self.text.len() < SKIM_KEEP {
                    self.text.push(b);
                } else {
                    self.cut += 1;
                }
                continue;
            }
            let head = std::mem::take(&mut self.head);
            let text = std::mem::take(&mut self.text);
            let head = head.strip_suffix(b"\r").unwrap_or(&head);
            let malformed = || ReplyError::Malformed(String::from_utf8_lossy(head).into_owned());
            let code: u16 = match head.get(..3) {
                Some(d) if d.iter().all(u8::is_ascii_digit) => std::str::from_utf8(d)
                    .ok()
                    .and_then(|d| d.parse().ok())
                    .ok_or_else(malformed)?,
                _ => return Err(malformed()),
            };
            if *self.code.get_or_insert(code) != code {
                return Err(ReplyError::Mixed(
                    String::from_utf8_lossy(head).into_owned(),
                ));
            }
            let text = text.strip_suffix(b"\r").unwrap_or(&text).to_vec();
            let last = match head.get(3) {
                None | Some(b' ') => true,
                Some(b'-') => false,
                Some(_) => return Err(malformed()),
            };
            if last {
                // Rebuilt as a reply of one or two short lines (its first, its last), escaped by `parse`.
                let mut whole = Vec::new();
                if let Some(first) = self.first.take() {
                    whole.extend_from_slice(format!("{code}-").as_bytes());
                    whole.extend_from_slice(&first);
                    whole.extend_from_slice(b"\r\n");
                }
                whole.extend_from_slice(format!("{code} ").as_bytes());
                whole.extend_from_slice(&text);
                whole.extend_from_slice(
                    format!(" ({} bytes of the reply not kept)\r\n", self.cut).as_bytes(),
                );
                // A reply of two short lines: parsed as any other.
                let reply = parse(&whole)?.map(|(r, _)| r).ok_or(ReplyError::TooLong)?;
                return Ok(Some((reply, i + 1)));
            }
            match self.first {
                None => self.first = Some(text),
                // Lines in between count only as bytes cut.
                Some(_) => self.cut += text.len() as u64 + 4,
            }
        }
        Ok(None)
    }
}

/// `5.7.139` at the start of a line's text (RFC 3463: class, subject and detail of up to three digits each).
fn enhanced(text: &str) -> Option<[u16; 3]> {
    let word = text.split(' ').next()?;
    let mut parts = word.split('.');
    let mut out = [0u16; 3];
    for slot in &mut out {
        let p = parts.next()?;
        if p.is_empty() || p.len() > 3 || !p.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        *slot = p.parse().ok()?;
    }
    (parts.next().is_none() && matches!(out[0], 2 | 4 | 5)).then_some(out)
}

impl Reply {
    /// 250, 251 or 252: the command was done. (MAIL, RCPT, BDAT and the final dot have no intermediate reply;
    /// DATA's 354 and AUTH's 334 are checked by their code.) Another 2xx is not a transaction's success: a `221
    /// closing` to the final dot is a server going away, not a message taken.
    pub fn is_positive(&self) -> bool {
        (250..=252).contains(&self.code)
    }

    pub fn is_permanent(&self) -> bool {
        self.code >= 500
    }
}

/// `550 5.7.1 text`, lines joined by spaces: how a reply appears in logs and the queue's state.
impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.code)?;
        if let Some([a, b, c]) = self.status {
            write!(f, " {a}.{b}.{c}")?;
        }
        for line in self.text.split('\n') {
            write!(f, " {}", line.trim_end_matches('\r'))?;
        }
        Ok(())
    }
}

/// The extensions relay uses, from an EHLO reply's lines after the first.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Offers {
    pub pipelining: bool,
    pub starttls: bool,
    pub xoauth2: bool,
    /// OAUTHBEARER (RFC 7628): used only where XOAUTH2 is not offered.
    pub oauthbearer: bool,
    pub eight_bit_mime: bool,
    pub smtputf8: bool,
    /// CHUNKING (RFC 3030): BDAT instead of DATA.
    pub chunking: bool,
    /// SIZE's limit, 0 when none is given.
    pub size: Option<u64>,
}

impl Offers {
    pub fn parse(ehlo: &Reply) -> Offers {
        let mut o = Offers::default();
        for line in ehlo.text.split('\n').skip(1) {
            let mut words = line.split_ascii_whitespace();
            let Some(keyword) = words.next() else {
                continue;
            };
            // Old servers list their mechanisms as `AUTH=LOGIN PLAIN` too (before RFC 2554 was final).
            if let Some(first) = keyword
                .get(..5)
                .filter(|k| k.eq_ignore_ascii_case("AUTH="))
                .map(|_| &keyword[5..])
            {
                o.note_mechanisms(std::iter::once(first).chain(words));
                continue;
            }
            match keyword.to_ascii_uppercase().as_str() {
                "PIPELINING" => o.pipelining = true,
                "STARTTLS" => o.starttls = true,
                "8BITMIME" => o.eight_bit_mime = true,
                "SMTPUTF8" => o.smtputf8 = true,
                "CHUNKING" => o.chunking = true,
                "SIZE" => o.size = Some(words.next().and_then(|n| n.parse().ok()).unwrap_or(0)),
                "AUTH" => o.note_mechanisms(words),
                _ => {}
            }
        }
        o
    }

    fn note_mechanisms<'a>(&mut self, mechanisms: impl Iterator<Item = &'a str>) {
        for m in mechanisms {
            self.xoauth2 |= m.eq_ignore_ascii_case("XOAUTH2");
            self.oauthbearer |= m.eq_ignore_ascii_case("OAUTHBEARER");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(bytes: &[u8]) -> Reply {
        let (r, used) = super::parse(bytes).unwrap().unwrap();
        assert_eq!(used, bytes.len());
        r
    }

    #[test]
    fn replies_keep_their_enhanced_codes() {
        let r = parse(b"535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant.\r\n");
        assert_eq!(r.code, 535);
        assert_eq!(r.status, Some([5, 7, 139]));
        assert_eq!(
            r.to_string(),
            "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant."
        );
        assert_eq!(parse(b"354 go ahead\r\n").to_string(), "354 go ahead");
        assert!(parse(b"451 4.3.0 later\r\n").code == 451);
        // Details of three digits over 255 (smtp-proto's receiver made this 5.7.255).
        assert_eq!(
            parse(b"550 5.7.708 Service unavailable. Access denied\r\n").to_string(),
            "550 5.7.708 Service unavailable. Access denied"
        );
        let gmail = parse(b"535-5.7.8 Username and Password not accepted. For more information, go to\r\n535 5.7.8  https://support.google.com/mail/?p=BadCredentials - gsmtp\r\n");
        assert_eq!(gmail.status, Some([5, 7, 8]));
        assert_eq!(
            gmail.to_string(),
            "535 5.7.8 Username and Password not accepted. For more information, go to https://support.google.com/mail/?p=BadCredentials - gsmtp"
        );
    }

    #[test]
    fn partial_and_hostile_replies() {
        assert_eq!(super::parse(b"250-first\r\n250 sec").unwrap(), None);
        assert_eq!(super::parse(b"").unwrap(), None);
        assert!(super::parse(b"hello\r\n").is_err());
        assert!(super::parse(b"25\r\n").is_err());
        assert!(super::parse(b"250x\r\n").is_err());
        // Codes outside SMTP's, and a reply whose lines disagree, are no answer.
        for bad in [
            &b"199 wait\r\n"[..],
            b"699 no\r\n",
            b"000 zero\r\n",
            b"260 odd\r\n",
            b"250-2.0.0 queued\r\n554 5.7.1 rejected after all\r\n",
            b"554-no\r\n250 yes\r\n",
        ] {
            assert!(super::parse(bad).is_err(), "{bad:?}");
        }
        assert!(!parse(b"354 go on then\r\n").is_positive());
        // Too long to keep, read through to its last line.
        let mut skim = Skim::default();
        let mut long = b"250-2.0.0 queued as ".to_vec();
        long.extend(std::iter::repeat_n(b'x', 100_000));
        long.extend_from_slice(b"\r\n");
        for _ in 0..1000 {
            long.extend_from_slice(b"250-more\r\n");
        }
        assert_eq!(skim.feed(&long).unwrap(), None);
        let (r, used) = skim.feed(b"250 2.0.0 done\r\n221 next").unwrap().unwrap();
        assert_eq!((r.code, used), (250, 16));
        assert!(
            r.text.contains("queued as xxx") && r.text.contains("done"),
            "{}",
            r.text
        );
        let mut skim = Skim::default();
        assert!(skim.feed(b"250-ok\r\n554 no\r\n").is_err());
        assert!(parse(b"250 ok\r\n").is_positive());
        assert!(!parse(b"221 2.0.0 closing connection\r\n").is_positive());
        assert_eq!(
            super::parse(&vec![b'2'; MAX_REPLY + 1]),
            Err(ReplyError::TooLong)
        );
        let many = "250-x\r\n".repeat(MAX_REPLY / 7 + 1);
        assert_eq!(super::parse(many.as_bytes()), Err(ReplyError::TooLong));
        let (r, used) = super::parse(b"220 hi\r\n250 next\r\n").unwrap().unwrap();
        assert_eq!((r.code, used), (220, 8));
        assert_eq!(parse(b"250\r\n").text, "");
    }

    /// A server's control characters and bytes that are not UTF-8 never reach a log line or a terminal as they are.
    #[test]
    fn control_characters_in_a_reply_are_escaped() {
        let r = parse(b"550 5.7.1 \x1b[31mred\x1b[0m \xff\xfe bad\x00nul\r\n");
        assert_eq!(r.text, "\\x1b[31mred\\x1b[0m \\xff\\xfe bad\\x00nul");
        assert_eq!(r.status, Some([5, 7, 1]));
    }

    #[test]
    fn ehlo_offers_are_read() {
        let r = parse(
            b"250-smtp.office365.com Hello\r\n250-SIZE 157286400\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-AUTH LOGIN XOAUTH2\r\n250 SMTPUTF8\r\n",
        );
        let o = Offers::parse(&r);
        assert!(o.pipelining && o.xoauth2 && o.eight_bit_mime && o.smtputf8 && !o.starttls);
        assert_eq!(o.size, Some(157_286_400));
        let plain = parse(b"250-x\r\n250 STARTTLS\r\n");
        assert!(Offers::parse(&plain).starttls && !Offers::parse(&plain).pipelining);
        // OAUTHBEARER (RFC 7628), in the AUTH line or in the old `AUTH=` one.
        for ehlo in [
            &b"250-x\r\n250 AUTH PLAIN oauthbearer\r\n"[..],
            b"250-x\r\n250-AUTH=OAUTHBEARER\r\n250 PIPELINING\r\n",
        ] {
            let o = Offers::parse(&parse(ehlo));
            assert!(o.oauthbearer && !o.xoauth2, "{o:?}");
        }
        let o = Offers::parse(&parse(
            b"250-x\r\n250-AUTH=LOGIN XOAUTH2\r\n250 AUTH LOGIN\r\n",
        ));
        assert!(o.xoauth2 && !o.oauthbearer);
    }
}
