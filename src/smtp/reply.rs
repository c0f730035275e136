//! SMTP replies, with the enhanced status code (RFC 3463) on every line that takes one (RFC 2034).

use std::borrow::Cow;
use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    /// Enhanced status code such as `5.7.1`; `None` for the greeting and EHLO/HELO (RFC 2034 section 3).
    pub status: Option<&'static str>,
    pub lines: Vec<Cow<'static, str>>,
}

impl Reply {
    pub fn new(code: u16, status: &'static str, text: impl Into<Cow<'static, str>>) -> Reply {
        Reply {
            code,
            status: Some(status),
            lines: vec![text.into()],
        }
    }

    /// A reply without an enhanced status code.
    pub fn bare(code: u16, lines: Vec<Cow<'static, str>>) -> Reply {
        Reply {
            code,
            status: None,
            lines,
        }
    }

    pub fn is_positive(&self) -> bool {
        self.code < 400
    }

    /// The reply as sent on the wire, CRLF-terminated.
    pub fn to_wire(&self) -> Vec<u8> {
        self.to_string().into_bytes()
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let last = self.lines.len().saturating_sub(1);
        for (i, line) in self.lines.iter().enumerate() {
            let sep = if i == last { ' ' } else { '-' };
            match self.status {
                Some(st) => write!(f, "{}{}{} {}\r\n", self.code, sep, st, line)?,
                None => write!(f, "{}{}{}\r\n", self.code, sep, line)?,
            }
        }
        if self.lines.is_empty() {
            write!(f, "{}\r\n", self.code)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multiline() {
        let r = Reply::bare(250, vec!["host".into(), "SIZE 10".into()]);
        assert_eq!(r.to_string(), "250-host\r\n250 SIZE 10\r\n");
        assert_eq!(
            Reply::new(530, "5.7.0", "Authentication required").to_string(),
            "530 5.7.0 Authentication required\r\n"
        );
    }
}
