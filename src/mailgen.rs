//! The little that relay needs to write mail of its own (alert mail, delivery status notifications): an RFC 5322
//! date, a Message-ID, and text broken into lines that any SMTP server takes.

use std::time::SystemTime;

/// `Tue, 15 Nov 1994 08:12:31 +0000` (RFC 5322 section 3.3), always in UTC. A time outside 1970 to 9999 (a clock
/// set wrong, an edited queue file's arrival) is written as the nearest of those: httpdate panics on it.
pub fn date(t: SystemTime) -> String {
    let last = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(253_402_300_799);
    let http = httpdate::fmt_http_date(t.clamp(SystemTime::UNIX_EPOCH, last));
    // HTTP dates are the same fixed form with "GMT", which RFC 5322 keeps only as an obsolete zone.
    match http.strip_suffix(" GMT") {
        Some(rest) => format!("{rest} +0000"),
        None => http,
    }
}

/// A fresh `<…@host>` Message-ID.
pub fn message_id(host: &str) -> String {
    format!("<{}@{host}>", uuid::Uuid::now_v7().simple())
}

/// Text as CRLF lines of at most `width` characters where spaces allow (a longer word is cut at `width`), with
/// CR, LF and other control characters of the input made into line breaks or spaces: whatever a reply or an
/// error said, the result is safe in a message body.
pub fn wrap(text: &str, width: usize) -> String {
    let mut out = String::with_capacity(text.len() + text.len() / width.max(1) * 2 + 2);
    for paragraph in text.split('\n') {
        let mut line = String::new();
        for word in paragraph.split([' ', '\t', '\r']).filter(|w| !w.is_empty()) {
            let word: String = word
                .chars()
                .map(|c| if c.is_control() { ' ' } else { c })
                .collect();
            let mut word = word.as_str();
            loop {
                let len = line.chars().count();
                let wlen = word.chars().count();
                if len > 0 && len + 1 + wlen > width {
                    out.push_str(&line);
                    out.push_str("\r\n");
                    line.clear();
                }
                if wlen <= width {
                    if !line.is_empty() {
                        line.push(' ');
                    }
                    line.push_str(word);
                    break;
                }
                let cut = word
                    .char_indices()
                    .nth(width)
                    .map_or(word.len(), |(i, _)| i);
                out.push_str(&word[..cut]);
                out.push_str("\r\n");
                word = &word[cut..];
            }
        }
        out.push_str(&line);
        out.push_str("\r\n");
    }
    out
}

/// A header field's value made one line: CR, LF and control characters become spaces, and the value is cut to
/// `max` characters.
pub fn one_line(value: &str, max: usize) -> String {
    value
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(max)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_outside_what_a_date_field_holds_are_clamped() {
        assert_eq!(
            date(SystemTime::UNIX_EPOCH),
            "Thu, 01 Jan 1970 00:00:00 +0000"
        );
        let before = SystemTime::UNIX_EPOCH - std::time::Duration::from_secs(86_400);
        assert_eq!(date(before), "Thu, 01 Jan 1970 00:00:00 +0000");
        let after = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(300_000_000_000);
        assert_eq!(date(after), "Fri, 31 Dec 9999 23:59:59 +0000");
    }

    #[test]
    fn dates_are_rfc5322() {
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(784_887_151);
        assert_eq!(date(t), "Tue, 15 Nov 1994 08:12:31 +0000");
    }

    #[test]
    fn wraps_at_spaces_and_cuts_long_words() {
        let long = "x".repeat(25);
        let text = format!("one two three\r\nfour {long}\n\nend");
        let wrapped = wrap(&text, 10);
        for line in wrapped.split("\r\n") {
            assert!(line.chars().count() <= 10, "{line:?} in {wrapped:?}");
        }
        assert!(
            wrapped.starts_with("one two\r\nthree\r\nfour\r\nxxxxxxxxxx\r\n"),
            "{wrapped:?}"
        );
        assert!(wrapped.ends_with("\r\n\r\nend\r\n"), "{wrapped:?}");
        assert!(!wrapped.replace("\r\n", "").contains(['\r', '\n']));
    }
}
