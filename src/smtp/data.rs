//! Receiving the DATA body: dot-unstuffing, end-of-data detection and our bare-CR/LF policy in one pass.
//!
//! smtp-proto has a DATA receiver, but it leaves bare LF and bare CR in the body and holds back a trailing CR
//! in its output; applying a reject/normalize policy on top would need a second scanner that tracks line
//! endings across chunk boundaries again. One small state machine that sees every line ending once is
//! simpler to reason about, and that matters here: this is where SMTP smuggling happens.
//!
//! The rule that defeats smuggling: under `reject` and `normalize`, only `<CRLF>.<CRLF>` ends the body, where both
//! CRLFs are real; a dot after a bare LF or a bare CR never ends it and is not unstuffed. Under `lenient` (legacy
//! LAN devices), LF alone ends a line and `.` alone on such a line ends the body; a bare CR still never does (the
//! session gives `lenient` only to a client whose commands end with LF alone, `normalize` to the others). In
//! every mode the stored message has CRLF line ends only, so the upstream sees the message end exactly where
//! relay did.

use memchr::memchr2;

use crate::config::BareLineEndings;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// All input consumed; the body goes on.
    NeedMore,
    /// `<CRLF>.<CRLF>` seen; input after it is the next command.
    Done,
}

pub struct DataReceiver {
    policy: BareLineEndings,
    /// The last bytes were a real CRLF (or DATA just began): a '.' here is special.
    line_start: bool,
    /// A '.' was seen at a line start and is held back until we know whether the line is ".".
    dot: bool,
    /// A CR was seen and is held back until we know whether LF follows.
    cr: bool,
    /// A bare CR or bare LF passed.
    pub saw_bare: bool,
    /// `reject` only: the last byte was a bare LF, so a '.' now may be an LF-only client's end of data.
    after_lf: bool,
    /// `reject` only: a '.' alone so far on a line begun by a bare LF.
    lf_dot: bool,
    /// `reject` only: the body ended the way an LF-only client ends it (`LF . LF`, `LF . CRLF`, `CRLF . LF`).
    /// The message is refused, and the connection is closed: what follows cannot be read safely either way.
    pub ended_by_bare_lf: bool,
}

impl DataReceiver {
    pub fn new(policy: BareLineEndings) -> DataReceiver {
        DataReceiver {
            policy,
            line_start: true,
            dot: false,
            cr: false,
            saw_bare: false,
            after_lf: false,
            lf_dot: false,
            ended_by_bare_lf: false,
        }
    }

    /// `reject`: a client that ends lines with LF alone gets its answer at its own end of data instead of
    /// waiting out the timeout for a CRLF.CRLF that never comes (Postfix answers at once, too).
    fn bare_end<'a>(&mut self, input: &mut &'a [u8], rest: &'a [u8]) -> Progress {
        self.ended_by_bare_lf = true;
        self.saw_bare = true;
        *input = rest;
        Progress::Done
    }

    /// Feeds bytes, appending body bytes to `out`. Advances `input` past what was consumed.
    pub fn feed(&mut self, input: &mut &[u8], out: &mut Vec<u8>) -> Progress {
        let mut rest = *input;
        while !rest.is_empty() {
            // Fast path: copy a run of ordinary bytes in one go.
            if !self.cr && !self.dot && !self.line_start && !self.after_lf && !self.lf_dot {
                let run = memchr2(b'\r', b'\n', rest).unwrap_or(rest.len());
                out.extend_from_slice(&rest[..run]);
                rest = &rest[run..];
                if rest.is_empty() {
                    break;
                }
            }
            let b = rest[0];
            rest = &rest[1..];
            if self.cr {
                self.cr = false;
                if b == b'\n' {
                    if self.dot {
                        *input = rest;
                        return Progress::Done;
                    }
                    if std::mem::take(&mut self.lf_dot) {
                        return self.bare_end(input, rest);
                    }
                    out.extend_from_slice(b"\r\n");
                    self.line_start = true;
                    continue;
                }
                // A '.' alone on a line that a bare CR ends is text, as with a bare LF.
                if std::mem::take(&mut self.dot) {
                    out.push(b'.');
                }
                self.bare_line_ending(out, b"\r");
                // `b` is examined below as an ordinary byte.
            }
            match b {
                b'\r' => {
                    self.after_lf = false;
                    self.cr = true;
                }
                // Lenient: LF alone ends a line like CRLF, and `LF . LF` ends the body. The upstream gets the same
                // lines in CRLF, so where relay sees the message end is where the upstream sees it end.
                b'\n' if self.policy == BareLineEndings::Lenient => {
                    self.saw_bare = true;
                    if self.dot {
                        *input = rest;
                        return Progress::Done;
                    }
                    out.extend_from_slice(b"\r\n");
                    self.line_start = true;
                }
                b'\n' => {
                    if self.policy == BareLineEndings::Reject && (self.dot || self.lf_dot) {
                        return self.bare_end(input, rest);
                    }
                    // A '.' alone on a line that a bare LF ends is text, kept as `LF . CRLF` keeps it.
                    if std::mem::take(&mut self.dot) {
                        out.push(b'.');
                    }
                    self.line_start = false;
                    self.bare_line_ending(out, b"\n");
                    self.after_lf = self.policy == BareLineEndings::Reject;
                }
                b'.' if self.after_lf => {
                    self.after_lf = false;
                    self.lf_dot = true;
                    out.push(b);
                }
                b'.' if self.line_start => {
                    self.line_start = false;
                    self.dot = true;
                }
                _ => {
                    // The held dot was a stuffing dot (RFC 5321 section 4.5.2): it is dropped.
                    self.dot = false;
                    self.line_start = false;
                    self.after_lf = false;
                    self.lf_dot = false;
                    out.push(b);
                }
            }
        }
        *input = rest;
        Progress::NeedMore
    }

    fn bare_line_ending(&mut self, out: &mut Vec<u8>, raw: &[u8]) {
        self.saw_bare = true;
        // A bare ending never starts a line where '.' could end the body or be unstuffed.
        self.dot = false;
        self.line_start = false;
        self.after_lf = false;
        self.lf_dot = false;
        match self.policy {
            // A bare CR never ends a line that a '.' could follow, in any mode: `CR . CR LF` is a smuggling vector.
            BareLineEndings::Normalize | BareLineEndings::Lenient => out.extend_from_slice(b"\r\n"),
            // The message will be refused; keep the byte so that what is measured stays honest.
            BareLineEndings::Reject => out.extend_from_slice(raw),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(policy: BareLineEndings, chunks: &[&[u8]]) -> (Vec<u8>, Option<Vec<u8>>, bool) {
        let mut r = DataReceiver::new(policy);
        let mut out = Vec::new();
        for (i, chunk) in chunks.iter().enumerate() {
            let mut input = *chunk;
            if r.feed(&mut input, &mut out) == Progress::Done {
                let mut rest = input.to_vec();
                for c in &chunks[i + 1..] {
                    rest.extend_from_slice(c);
                }
                return (out, Some(rest), r.saw_bare);
            }
        }
        (out, None, r.saw_bare)
    }

    fn whole(policy: BareLineEndings, data: &[u8]) -> (Vec<u8>, Option<Vec<u8>>, bool) {
        run(policy, &[data])
    }

    /// Every way of cutting the input in two gives the same result as feeding it whole.
    fn split_everywhere(policy: BareLineEndings, data: &[u8]) -> (Vec<u8>, Option<Vec<u8>>, bool) {
        let expect = whole(policy, data);
        for i in 0..=data.len() {
            let (a, b) = data.split_at(i);
            assert_eq!(
                run(policy, &[a, b]),
                expect,
                "split at {i} of {:?}",
                String::from_utf8_lossy(data)
            );
        }
        let bytes: Vec<&[u8]> = data.chunks(1).collect();
        assert_eq!(run(policy, &bytes), expect);
        expect
    }

    #[test]
    fn plain_body_and_unstuffing() {
        let (out, rest, bare) = split_everywhere(
            BareLineEndings::Reject,
            b"Subject: x\r\n\r\n..dot\r\n.\r\nQUIT\r\n",
        );
        assert_eq!(out, b"Subject: x\r\n\r\n.dot\r\n");
        assert_eq!(rest.as_deref(), Some(&b"QUIT\r\n"[..]));
        assert!(!bare);
    }

    #[test]
    fn empty_body() {
        let (out, rest, _) = split_everywhere(BareLineEndings::Reject, b".\r\n");
        assert!(out.is_empty());
        assert_eq!(rest.as_deref(), Some(&b""[..]));
    }

    #[test]
    fn smuggling_vectors_never_end_the_body() {
        for vector in [
            &b"\n.\n"[..],
            b"\n.\r\n",
            b"\r.\r\n",
            b"\r\n.\n",
            b"\r\n.\r",
        ] {
            let mut data = b"Subject: a\r\n\r\nbody".to_vec();
            data.extend_from_slice(vector);
            data.extend_from_slice(
                b"MAIL FROM:<evil@x>\r\nRCPT TO:<v@y>\r\nDATA\r\nsmuggled\r\n.\r\n",
            );
            // Under reject, an LF-only client's end of data (a dot line begun or ended by a bare LF) ends the
            // body there, flagged, so that the message is refused and the connection closed.
            let lf_end = matches!(vector, b"\n.\n" | b"\n.\r\n" | b"\r\n.\n");
            let mut r = DataReceiver::new(BareLineEndings::Reject);
            let (mut input, mut out) = (&data[..], Vec::new());
            assert_eq!(r.feed(&mut input, &mut out), Progress::Done, "{vector:?}");
            assert_eq!(r.ended_by_bare_lf, lf_end, "{vector:?}");
            assert!(r.saw_bare || !lf_end, "{vector:?} not flagged");
            if lf_end {
                assert!(input.starts_with(b"MAIL FROM:<evil@x>"), "{vector:?}");
            }
            for policy in [BareLineEndings::Reject, BareLineEndings::Normalize] {
                if policy == BareLineEndings::Reject && lf_end {
                    continue;
                }
                let (out, rest, bare) = split_everywhere(policy, &data);
                assert!(bare, "{vector:?} not flagged");
                assert_eq!(
                    rest.as_deref(),
                    Some(&b""[..]),
                    "{vector:?} ended the body early"
                );
                assert!(out.ends_with(b"smuggled\r\n"), "{vector:?}");
                if policy == BareLineEndings::Normalize {
                    for (i, &b) in out.iter().enumerate() {
                        if b == b'\n' {
                            assert_eq!(out[i - 1], b'\r', "bare LF left at {i} for {vector:?}");
                        }
                        if b == b'\r' {
                            assert_eq!(
                                out.get(i + 1),
                                Some(&b'\n'),
                                "bare CR left at {i} for {vector:?}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn lenient_takes_lf_as_a_line_end_and_lf_dot_lf_as_the_end() {
        let (out, rest, bare) = split_everywhere(
            BareLineEndings::Lenient,
            b"Subject: x\n\nline\n..dot\nmixed\r\n.\nQUIT\n",
        );
        assert_eq!(out, b"Subject: x\r\n\r\nline\r\n.dot\r\nmixed\r\n");
        assert_eq!(rest.as_deref(), Some(&b"QUIT\n"[..]));
        assert!(bare);
        // A bare CR is normalised but never starts a line a dot could end.
        let (out, rest, _) = split_everywhere(BareLineEndings::Lenient, b"a\r.\r\nb\r\n.\r\n");
        assert_eq!(out, b"a\r\n.\r\nb\r\n");
        assert_eq!(rest.as_deref(), Some(&b""[..]));
    }

    #[test]
    fn normalize_turns_bare_endings_into_crlf() {
        let (out, rest, bare) = split_everywhere(BareLineEndings::Normalize, b"a\nb\rc\r\n.\r\n");
        assert_eq!(out, b"a\r\nb\r\nc\r\n");
        assert!(rest.is_some());
        assert!(bare);
    }

    #[test]
    fn normalize_keeps_a_dot_line_whichever_of_its_endings_is_bare() {
        for data in [
            &b"a\r\n.\nb\r\n.\r\n"[..],
            b"a\n.\r\nb\r\n.\r\n",
            b"a\r\n.\rb\r\n.\r\n",
        ] {
            let (out, rest, _) = split_everywhere(BareLineEndings::Normalize, data);
            assert_eq!(
                out,
                b"a\r\n.\r\nb\r\n",
                "{:?}",
                String::from_utf8_lossy(data)
            );
            assert_eq!(rest.as_deref(), Some(&b""[..]));
        }
    }

    #[test]
    fn cr_before_crlf_is_bare() {
        let (out, rest, bare) = split_everywhere(BareLineEndings::Normalize, b"a\r\r\n.\r\n");
        assert_eq!(out, b"a\r\n\r\n");
        assert!(rest.is_some());
        assert!(bare);
    }

    #[test]
    fn dot_line_then_more_is_unstuffed() {
        let (out, rest, _) = split_everywhere(BareLineEndings::Reject, b".x\r\n.\r\n");
        assert_eq!(out, b"x\r\n");
        assert!(rest.is_some());
    }
}
