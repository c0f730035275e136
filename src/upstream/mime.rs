//! The little of a message's MIME structure the HTTP transports need: who its headers address, and where its
//! attachments lie, as byte ranges of the queued message, so that large ones can be cut out and uploaded
//! separately (Graph) without decoding the whole message. Header fields are read with mail-parser; the walk over
//! boundaries is ours, because mail-parser decodes every part into memory and a 40 MiB message would double.

use std::ops::Range;

use base64::Engine;
use mail_parser::{MessageParser, MimeHeaders};

/// Nesting deeper than this is not looked into (its parts stay in the message as they are).
const MAX_DEPTH: usize = 8;
/// Parts looked at, at most.
const MAX_PARTS: usize = 1000;

/// Where the header section ends: the offset of the body (after the blank line), or the end of the message.
pub fn body_start(message: &[u8]) -> usize {
    if message.starts_with(b"\r\n") {
        return 2;
    }
    memchr::memmem::find(message, b"\r\n\r\n").map_or(message.len(), |at| at + 4)
}

/// Which header an address was found in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    To,
    Cc,
    Bcc,
}

/// Every address in To:, Cc: and Bcc:, lower-cased, groups flattened.
pub fn header_recipients(message: &[u8]) -> Vec<(Field, String)> {
    let head = &message[..body_start(message)];
    let Some(m) = MessageParser::default().parse_headers(head) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (field, addrs) in [
        (Field::To, m.to()),
        (Field::Cc, m.cc()),
        (Field::Bcc, m.bcc()),
    ] {
        for a in addrs.into_iter().flat_map(|a| a.iter()) {
            if let Some(addr) = a.address() {
                out.push((field, addr.to_ascii_lowercase()));
            }
        }
    }
    out
}

/// A leaf part that could go as a separate upload: its bytes, and what it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leaf {
    /// Cutting this range out removes the part and its boundary line and leaves a valid multipart.
    pub cut: Range<usize>,
    /// The encoded content.
    pub body: Range<usize>,
    pub name: String,
    pub content_type: String,
    /// base64 (else the bytes are the content: 7bit, 8bit, binary).
    pub base64: bool,
}

impl Leaf {
    /// The decoded size, without decoding.
    pub fn size(&self, message: &[u8]) -> u64 {
        let body = &message[self.body.clone()];
        if !self.base64 {
            return body.len() as u64;
        }
        let symbols = body
            .iter()
            .filter(|b| b.is_ascii_alphanumeric() || **b == b'+' || **b == b'/')
            .count() as u64;
        symbols * 3 / 4
    }

    /// The decoded content in pieces of at most `chunk` bytes (a multiple of 3), without holding more than one.
    pub fn chunks<'a>(&self, message: &'a [u8], chunk: usize) -> Chunks<'a> {
        Chunks {
            rest: &message[self.body.clone()],
            base64: self.base64,
            chunk: (chunk / 3 * 3).max(3),
        }
    }
}

/// See [`Leaf::chunks`].
pub struct Chunks<'a> {
    rest: &'a [u8],
    base64: bool,
    chunk: usize,
}

impl Iterator for Chunks<'_> {
    type Item = Vec<u8>;

    fn next(&mut self) -> Option<Vec<u8>> {
        if self.rest.is_empty() {
            return None;
        }
        if !self.base64 {
            let n = self.chunk.min(self.rest.len());
            let (head, tail) = self.rest.split_at(n);
            self.rest = tail;
            return Some(head.to_vec());
        }
        // Gather the symbols of one chunk (skipping line breaks and anything else not base64), then decode.
        let want = self.chunk / 3 * 4;
        let mut symbols = Vec::with_capacity(want);
        let mut used = 0;
        for &b in self.rest {
            if symbols.len() == want {
                break;
            }
            used += 1;
            if b.is_ascii_alphanumeric() || b == b'+' || b == b'/' {
                symbols.push(b);
            }
        }
        self.rest = &self.rest[used..];
        if symbols.is_empty() {
            self.rest = &[];
            return None;
        }
        // A stray last symbol cannot stand for a byte; the lenient engine takes any padding or none.
        if symbols.len() % 4 == 1 {
            symbols.pop();
        }
        LENIENT.decode(&symbols).ok()
    }
}

const LENIENT: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    base64::engine::GeneralPurposeConfig::new()
        .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent)
        .with_decode_allow_trailing_bits(true),
);

/// The leaf parts of a multipart message that have a name or are not text, and whose encoding can be undone
/// chunk by chunk (base64, or none). The first text part (the body people read) is never one of them.
pub fn leaves(message: &[u8]) -> Vec<Leaf> {
    let mut out = Vec::new();
    let start = body_start(message);
    let head = &message[..start];
    if let Some(boundary) = boundary_of(head) {
        walk(message, start..message.len(), &boundary, 0, &mut out);
    }
    out
}

fn boundary_of(head: &[u8]) -> Option<String> {
    let m = MessageParser::default().parse_headers(head)?;
    let ct = m.root_part().content_type()?;
    if !ct.ctype().eq_ignore_ascii_case("multipart") {
        return None;
    }
    ct.attribute("boundary")
        .filter(|b| !b.is_empty())
        .map(str::to_string)
}

fn walk(message: &[u8], body: Range<usize>, boundary: &str, depth: usize, out: &mut Vec<Leaf>) {
    if depth >= MAX_DEPTH || out.len() >= MAX_PARTS {
        return;
    }
    let lines = delimiters(message, body, boundary);
    for pair in lines.windows(2) {
        let (open, next) = (&pair[0], &pair[1]);
        if open.close {
            break;
        }
        // The CRLF before the next delimiter belongs to that delimiter (RFC 2046 section 5.1.1).
        let part = open.after..next.start.saturating_sub(2).max(open.after);
        let rel = body_start(&message[part.clone()]);
        let head = &message[part.start..part.start + rel];
        let content = part.start + rel..part.end;
        let Some(m) = MessageParser::default().parse_headers(head) else {
            continue;
        };
        let p = m.root_part();
        let (ctype, subtype) = p.content_type().map_or(("text", "plain"), |ct| {
            (ct.ctype(), ct.subtype().unwrap_or(""))
        });
        if ctype.eq_ignore_ascii_case("multipart") {
            if let Some(b) = p.content_type().and_then(|ct| ct.attribute("boundary")) {
                walk(message, content, b, depth + 1, out);
            }
            continue;
        }
        let name = p.attachment_name().map(str::to_string);
        let text = ctype.eq_ignore_ascii_case("text");
        let encoding = p
            .content_transfer_encoding()
            .unwrap_or("7bit")
            .to_ascii_lowercase();
        let base64 = encoding == "base64";
        if (name.is_none() && text)
            || !(base64 || matches!(encoding.as_str(), "7bit" | "8bit" | "binary"))
        {
            continue;
        }
        out.push(Leaf {
            cut: open.start..next.start,
            body: content,
            name: name.unwrap_or_else(|| format!("attachment-{}", out.len() + 1)),
            content_type: format!("{ctype}/{subtype}"),
            base64,
        });
        if out.len() >= MAX_PARTS {
            return;
        }
    }
}

/// A boundary delimiter line: where it starts, where the part after it starts, and whether it closes.
struct Delimiter {
    start: usize,
    after: usize,
    close: bool,
}

fn delimiters(message: &[u8], body: Range<usize>, boundary: &str) -> Vec<Delimiter> {
    let dashes = format!("--{boundary}");
    let text = &message[body.clone()];
    let mut out = Vec::new();
    let mut candidates: Vec<usize> = Vec::new();
    if text.starts_with(dashes.as_bytes()) {
        candidates.push(0);
    }
    let needle = format!("\r\n{dashes}");
    candidates.extend(memchr::memmem::find_iter(text, needle.as_bytes()).map(|at| at + 2));
    for at in candidates {
        let rest = &text[at + dashes.len()..];
        let close = rest.starts_with(b"--");
        // Transport padding (spaces, tabs) may follow the boundary before the line ends.
        let pad = rest[if close { 2 } else { 0 }..]
            .iter()
            .take_while(|b| **b == b' ' || **b == b'\t')
            .count();
        let tail = &rest[if close { 2 } else { 0 } + pad..];
        let after = if tail.starts_with(b"\r\n") {
            at + dashes.len() + if close { 2 } else { 0 } + pad + 2
        } else if tail.is_empty() {
            text.len()
        } else {
            continue; // "--boundary-more": a longer line, not this delimiter
        };
        out.push(Delimiter {
            start: body.start + at,
            after: body.start + after,
            close,
        });
        if close {
            break;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const MSG: &[u8] = b"From: a@lan.test\r\nTo: B <b@example.test>, c@example.test\r\nCc: team: d@example.test;\r\nSubject: scan\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed;\r\n boundary=\"XX\"\r\n\r\npreamble\r\n--XX\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n--XX\r\nContent-Type: application/pdf; name=\"scan.pdf\"\r\nContent-Transfer-Encoding: base64\r\n\r\naGVsbG8g\r\nd29ybGQ=\r\n--XX--\r\nepilogue\r\n";

    #[test]
    fn recipients_from_headers_groups_flattened() {
        let r = header_recipients(MSG);
        assert_eq!(
            r,
            vec![
                (Field::To, "b@example.test".into()),
                (Field::To, "c@example.test".into()),
                (Field::Cc, "d@example.test".into()),
            ]
        );
    }

    #[test]
    fn an_attachment_is_found_cut_and_decoded() {
        let l = leaves(MSG);
        assert_eq!(l.len(), 1, "{l:?}");
        let a = &l[0];
        assert_eq!(a.name, "scan.pdf");
        assert_eq!(a.content_type, "application/pdf");
        assert_eq!(a.size(MSG), 11);
        let all: Vec<u8> = a.chunks(MSG, 3).flatten().collect();
        assert_eq!(all, b"hello world");
        let mut cut = MSG[..a.cut.start].to_vec();
        cut.extend_from_slice(&MSG[a.cut.end..]);
        let cut = String::from_utf8(cut).unwrap();
        assert!(cut.contains("see attached\r\n--XX--\r\nepilogue"), "{cut}");
        assert!(!cut.contains("scan.pdf"));
    }

    #[test]
    fn nested_parts_and_odd_input_never_panic() {
        let nested = b"Content-Type: multipart/mixed; boundary=a\r\n\r\n--a\r\nContent-Type: multipart/alternative; boundary=b\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nx\r\n--b--\r\n--a\r\nContent-Type: image/png\r\nContent-Disposition: attachment; filename*=utf-8''sc%C3%A4n.png\r\nContent-Transfer-Encoding: base64\r\n\r\nAAEC\r\n--a--\r\n";
        let l = leaves(nested);
        assert_eq!(l.len(), 1);
        assert_eq!(
            l[0].chunks(nested, 30).flatten().collect::<Vec<u8>>(),
            [0, 1, 2]
        );
        for junk in [
            &b""[..],
            b"\r\n",
            b"Content-Type: multipart/mixed; boundary=a\r\n\r\n--a",
            b"Content-Type: multipart/mixed; boundary=a\r\n\r\n--a\r\n",
            b"Content-Type: multipart/mixed; boundary=a\r\n\r\n--a--",
            b"Content-Type: multipart/mixed; boundary=\"\"\r\n\r\n--\r\n",
        ] {
            let _ = leaves(junk);
            let _ = header_recipients(junk);
        }
    }
}
