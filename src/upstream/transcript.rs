//! What a transport said and heard, for `relay test`: each line as it went, with tokens redacted and message
//! bodies summarised. Bounded, so that a chatty upstream cannot grow it without end.

/// Lines kept; later ones are counted, not kept.
const MAX_LINES: usize = 500;
/// Longest line kept.
const MAX_LINE: usize = 2000;

/// A transcript shared with the transport writing it.
pub type TranscriptHandle = std::sync::Arc<std::sync::Mutex<Transcript>>;

#[derive(Debug, Default, Clone)]
pub struct Transcript {
    lines: Vec<String>,
    dropped: usize,
    /// Credentials the transport sent, cut out of what the upstream says (a server may quote a command back).
    hidden: Vec<Hidden>,
}

/// A credential; its Debug never shows it.
#[derive(Clone)]
struct Hidden(String);

impl std::fmt::Debug for Hidden {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

impl Transcript {
    /// What relay sent. A line carrying a credential (`AUTH XOAUTH2 …`, a bearer token) is redacted here, so no
    /// caller can forget it.
    pub fn client(&mut self, line: &str) {
        self.push(format!("C: {}", redact(line.trim_end())));
    }

    /// What the upstream answered.
    pub fn server(&mut self, line: &str) {
        for l in line.trim_end().split('\n') {
            let mut l = l.trim_end().to_string();
            for Hidden(secret) in &self.hidden {
                if l.contains(secret.as_str()) {
                    l = l.replace(secret.as_str(), "[redacted]");
                }
            }
            self.push(format!("S: {l}"));
        }
    }

    /// A credential about to be sent: from now on it is cut out of the upstream's lines too.
    pub fn hide(&mut self, secret: &str) {
        if !secret.is_empty() && !self.hidden.iter().any(|Hidden(s)| s == secret) {
            self.hidden.push(Hidden(secret.to_string()));
        }
    }

    /// Something that is not a protocol line (connecting, TLS, a body sent).
    pub fn note(&mut self, line: &str) {
        self.push(format!("   {line}"));
    }

    fn push(&mut self, mut line: String) {
        if self.lines.len() >= MAX_LINES {
            self.dropped += 1;
            return;
        }
        if line.len() > MAX_LINE {
            let mut cut = MAX_LINE;
            while !line.is_char_boundary(cut) {
                cut -= 1;
            }
            line.truncate(cut);
            line.push('…');
        }
        self.lines.push(line);
    }

    pub fn lines(&self) -> impl Iterator<Item = &str> {
        self.lines.iter().map(String::as_str)
    }

    pub fn dropped(&self) -> usize {
        self.dropped
    }
}

/// The line with any credential replaced.
pub fn redact(line: &str) -> String {
    let upper = line.to_ascii_uppercase();
    for prefix in [
        "AUTH XOAUTH2 ",
        "AUTH OAUTHBEARER ",
        "AUTH PLAIN ",
        "AUTH LOGIN ",
    ] {
        if upper.starts_with(prefix) {
            return format!("{}[credentials redacted]", &line[..prefix.len()]);
        }
    }
    if let Some(at) = upper.find("BEARER ") {
        return format!("{}[token redacted]", &line[..at + 7]);
    }
    line.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_never_reach_the_transcript() {
        let mut t = Transcript::default();
        t.client("AUTH XOAUTH2 dXNlcj1hQGIBYXV0aD1CZWFyZXIgc2VjcmV0AQE=");
        t.client("Authorization: Bearer eyJ0eXAiOiJKV1Qi.secret");
        t.client("auth oauthbearer bixhPWFAYi4sAWF1dGg9QmVhcmVyIHNlY3JldAEB");
        t.hide("bixhPWFAYi4sAWF1dGg9QmVhcmVyIHNlY3JldAEB");
        t.hide("secret");
        t.server("500 unknown: AUTH OAUTHBEARER bixhPWFAYi4sAWF1dGg9QmVhcmVyIHNlY3JldAEB (secret)");
        assert!(!format!("{t:?}").contains("secret"));
        t.server("250-first\n250 second");
        let all: Vec<_> = t.lines().collect();
        assert_eq!(
            all,
            [
                "C: AUTH XOAUTH2 [credentials redacted]",
                "C: Authorization: Bearer [token redacted]",
                "C: auth oauthbearer [credentials redacted]",
                "S: 500 unknown: AUTH OAUTHBEARER [redacted] ([redacted])",
                "S: 250-first",
                "S: 250 second"
            ]
        );
    }

    #[test]
    fn it_is_bounded() {
        let mut t = Transcript::default();
        for _ in 0..MAX_LINES + 10 {
            t.note(&"x".repeat(MAX_LINE * 2));
        }
        assert_eq!(t.lines().count(), MAX_LINES);
        assert_eq!(t.dropped(), 10);
        assert!(t.lines().all(|l| l.len() <= MAX_LINE + 4));
    }
}
