//! SMTP replies (parsed by smtp-proto's incremental receiver) and what an EHLO reply offers. Pure.

use std::fmt;

/// One reply, possibly of several lines (joined with `\n` in `text`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    /// The enhanced status code (RFC 3463), when the server gave one.
    pub status: Option<[u8; 3]>,
    pub text: String,
}

impl Reply {
    pub fn is_positive(&self) -> bool {
        (200..400).contains(&self.code)
    }

    pub fn is_permanent(&self) -> bool {
        self.code >= 500
    }
}

impl From<smtp_proto::Response<String>> for Reply {
    fn from(r: smtp_proto::Response<String>) -> Reply {
        Reply {
            code: r.code,
            status: (r.esc != [0, 0, 0]).then_some(r.esc),
            text: r.message,
        }
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
        let mut r = smtp_proto::response::parser::ResponseReceiver::default();
        Reply::from(r.parse(&mut bytes.iter()).unwrap())
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
