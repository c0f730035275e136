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
        let secrets: Vec<&str> = self.hidden.iter().map(|Hidden(s)| s.as_str()).collect();
        let lines: Vec<String> = line
            .trim_end()
            .split('\n')
            .map(|l| cut_quoted(l.trim_end(), &secrets))
            .collect();
        for l in lines {
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

/// The shortest piece of a credential that is cut out of a server's words when quoted on its own: long enough
/// never to match ordinary words by chance, short enough to catch a quote cut at a line's end or split over the
/// lines of a reply.
const QUOTED_PIECE: usize = 16;

/// `text` with every credential in `secrets` cut out, whole or in pieces: a server may quote the AUTH command
/// back split over several reply lines, or cut where it truncates a line, and each piece of a base64 XOAUTH2
/// string holds part of the token.
pub fn cut_quoted(text: &str, secrets: &[&str]) -> String {
    let mut out = text.to_string();
    for secret in secrets.iter().filter(|s| !s.is_empty()) {
        if out.contains(secret) {
            out = out.replace(secret, "[redacted]");
        }
    }
    // Runs of the characters base64, base64url and JWTs are made of.
    let in_run =
        |c: char| c.is_ascii_alphanumeric() || matches!(c, '+' | '/' | '=' | '-' | '_' | '.');
    let mut cut = String::with_capacity(out.len());
    let mut rest = out.as_str();
    while let Some(start) = rest.find(in_run) {
        cut.push_str(&rest[..start]);
        let run = &rest[start..];
        let end = run.find(|c: char| !in_run(c)).unwrap_or(run.len());
        let piece = &run[..end];
        // A quote cut with `...` (or next to a `-` or `_` of the server's) makes one run of the credential's
        // characters and others': each part counts on its own.
        let quoted = |p: &str| p.len() >= QUOTED_PIECE && secrets.iter().any(|s| s.contains(p));
        if quoted(piece) || piece.split(['.', '-', '_']).any(quoted) {
            cut.push_str("[redacted]");
        } else {
            cut.push_str(piece);
        }
        rest = &run[end..];
    }
    cut.push_str(rest);
    cut
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_of_a_quoted_credential_are_cut_too() {
        let initial = "dXNlcj1yZWxheUBleGFtcGxlLmNvbQFhdXRoPUJlYXJlciB0b2tTRUNSRVQBAQ==";
        let token = "tokSECRET-abc.def_ghi";
        let secrets = [initial, token];
        for (quoted, shown) in [
            (
                format!("500 unknown AUTH XOAUTH2 {initial}"),
                "500 unknown AUTH XOAUTH2 [redacted]",
            ),
            (
                format!("5.7.8 {} (cut)", &initial[..40]),
                "5.7.8 [redacted] (cut)",
            ),
            (initial[30..].to_string(), "[redacted]"),
            (format!("token {token}!"), "token [redacted]!"),
            (
                format!("AUTH XOAUTH2 {}...", &initial[..50]),
                "AUTH XOAUTH2 [redacted]",
            ),
            // Words of the server's own, however long, stay.
            (
                "gsmtp d9443c01a7336-2a0a9a0e1a4sm123456pfb.5".to_string(),
                "gsmtp d9443c01a7336-2a0a9a0e1a4sm123456pfb.5",
            ),
        ] {
            assert_eq!(cut_quoted(&quoted, &secrets), shown);
        }
        let mut t = Transcript::default();
        t.hide(initial);
        t.server(&format!(
            "535-5.7.8 {}\n535 5.7.8 {}",
            &initial[..30],
            &initial[30..]
        ));
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(
            lines,
            ["S: 535-5.7.8 [redacted]", "S: 535 5.7.8 [redacted]"]
        );
    }

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
