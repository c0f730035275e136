//! DATA's transparency (RFC 5321 section 4.5.2), streaming: a line that starts with "." gets one more, and the
//! end of the message is CRLF "." CRLF. Pure, so that pieces cut anywhere can be tested without a socket.

use memchr::memchr_iter;

/// Feed the message in pieces cut anywhere; [`DotStuffer::finish`] appends the terminator.
pub struct DotStuffer {
    /// The next byte starts a line.
    at_line_start: bool,
    /// Nothing fed yet.
    empty: bool,
}

impl Default for DotStuffer {
    fn default() -> Self {
        DotStuffer {
            at_line_start: true,
            empty: true,
        }
    }
}

impl DotStuffer {
    pub fn feed(&mut self, piece: &[u8], out: &mut Vec<u8>) {
        if piece.is_empty() {
            return;
        }
        out.reserve(piece.len() + 8);
        let mut start = 0;
        if self.at_line_start && piece[0] == b'.' {
            out.push(b'.');
        }
        for lf in memchr_iter(b'\n', piece) {
            if piece.get(lf + 1) == Some(&b'.') {
                out.extend_from_slice(&piece[start..=lf]);
                out.push(b'.');
                start = lf + 1;
            }
        }
        out.extend_from_slice(&piece[start..]);
        let last = piece[piece.len() - 1];
        self.at_line_start = last == b'\n';
        self.empty = false;
    }

    /// The end of DATA: CRLF first if the message does not end with one (the terminator's CRLF would otherwise
    /// join its last line).
    pub fn finish(self, out: &mut Vec<u8>) {
        if !self.empty && !self.at_line_start {
            // A message ending in a bare CR would become CR CRLF: the spool never stores one (CRLF only).
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b".\r\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stuffed(message: &[u8], cut: usize) -> Vec<u8> {
        let mut s = DotStuffer::default();
        let mut out = Vec::new();
        let (a, b) = message.split_at(cut.min(message.len()));
        s.feed(a, &mut out);
        s.feed(b, &mut out);
        s.finish(&mut out);
        out
    }

    #[test]
    fn leading_dots_are_doubled_wherever_the_piece_is_cut() {
        let msg = b".first\r\nmid\r\n.\r\n..two\r\nlast";
        let want = b"..first\r\nmid\r\n..\r\n...two\r\nlast\r\n.\r\n";
        for cut in 0..=msg.len() {
            assert_eq!(stuffed(msg, cut), want, "cut at {cut}");
        }
    }

    #[test]
    fn the_terminator_follows_a_final_crlf_directly() {
        assert_eq!(stuffed(b"a\r\n", 1), b"a\r\n.\r\n");
        assert_eq!(stuffed(b"", 0), b".\r\n");
        assert_eq!(stuffed(b"a", 0), b"a\r\n.\r\n");
    }
}
