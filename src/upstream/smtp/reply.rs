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
        code.get_or_insert(this);
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
    pub fn is_positive(&self) -> bool {
        (200..400).contains(&self.code)
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
            match keyword.to_ascii_uppercase().as_str() {
                "PIPELINING" => o.pipelining = true,
                "STARTTLS" => o.starttls = true,
                "8BITMIME" => o.eight_bit_mime = true,
                "SMTPUTF8" => o.smtputf8 = true,
                "CHUNKING" => o.chunking = true,
                "SIZE" => o.size = Some(words.next().and_then(|n| n.parse().ok()).unwrap_or(0)),
                "AUTH" => o.xoauth2 |= words.any(|m| m.eq_ignore_ascii_case("XOAUTH2")),
                _ => {}
            }
        }
        o
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
    }
}
