//! The little of a message's MIME structure the HTTP transports need: who its headers address, and where its
//! attachments lie, as byte ranges of the queued message, so that large ones can be cut out and uploaded
//! separately (Graph) without decoding the whole message. Header fields are read with mail-parser; the walk over
//! boundaries is ours, because mail-parser decodes every part into memory and a 40 MiB message would double.

use std::borrow::Cow;
use std::io;
use std::ops::Range;

use base64::Engine;
use mail_parser::{MessageParser, MimeHeaders};

/// Nesting deeper than this is not looked into (its parts stay in the message as they are).
const MAX_DEPTH: usize = 8;
/// Parts looked at, at most.
const MAX_PARTS: usize = 1000;
/// Lines starting with "--" (boundary candidates) noted, at most: 800 KB of offsets.
const MAX_DASH_LINES: usize = 100_000;
/// A part's header block read, at most; a part whose header is longer is left in the message.
const MAX_PART_HEAD: usize = 64 << 10;
/// Transport padding after a boundary that is still taken for it (the line's SMTP limit).
const MAX_PADDING: usize = 998;
/// Bytes read at a time when scanning.
const PIECE: usize = 256 << 10;

/// Where a message's bytes come from, a range at a time: memory, or its queue file (`Outgoing`, with blocking
/// reads: walk it on the blocking pool). So that a 40 MiB message is walked without being read whole.
pub trait Source {
    fn size(&self) -> usize;
    fn read(&self, range: Range<usize>) -> io::Result<Cow<'_, [u8]>>;
}

impl Source for &[u8] {
    fn size(&self) -> usize {
        self.len()
    }

    fn read(&self, range: Range<usize>) -> io::Result<Cow<'_, [u8]>> {
        let end = range.end.min(self.len());
        Ok(Cow::Borrowed(&self[range.start.min(end)..end]))
    }
}

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

/// The local part as it goes on the wire, or into a header or an API's recipient. The inbound parser keeps a quoted local part unquoted (`"john smith"`
/// is stored as `john smith`, `"a\"b"` as `a"b`), so one that is not a dot-string is quoted again (RFC 5321
/// section 4.1.2), or the upstream would read a different address, or none.
pub fn local_part(user: &str) -> std::borrow::Cow<'_, str> {
    let atext =
        |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~".contains(c) || !c.is_ascii();
    let dot_string = user
        .split('.')
        .all(|atom| !atom.is_empty() && atom.chars().all(atext));
    if dot_string {
        return user.into();
    }
    let mut quoted = String::with_capacity(user.len() + 2);
    quoted.push('"');
    for c in user.chars() {
        if c == '"' || c == '\\' {
            quoted.push('\\');
        }
        quoted.push(c);
    }
    quoted.push('"');
    quoted.into()
}

/// An envelope address as written anywhere it leaves relay: its local part quoted where it must be.
pub fn written_address(address: &str) -> String {
    match address.rsplit_once('@') {
        Some((user, domain)) => format!("{}@{domain}", local_part(user)),
        None => address.to_string(),
    }
}

/// An address as compared across the envelope and the headers: lowercase, its domain in ASCII (a header's
/// `user@bücher.de` is the envelope's `user@xn--bcher-kva.de`).
pub fn address_key(address: &str) -> String {
    let lower = address.to_lowercase();
    match lower.rsplit_once('@') {
        Some((local, domain)) if !domain.is_ascii() => match idna::domain_to_ascii(domain) {
            Ok(ascii) => format!("{local}@{ascii}"),
            Err(_) => lower,
        },
        _ => lower,
    }
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
    /// Its Content-ID, without the angle brackets: what a `cid:` reference in the HTML names.
    pub content_id: Option<String>,
    /// Shown in the body rather than as an attachment: it has a Content-ID (an image a `cid:` of the HTML body
    /// names), and no `Content-Disposition: attachment`.
    pub inline: bool,
}

/// The name Graph shows for a part that has none: numbered, with the extension of its type, so that a mail
/// program opens it (a forwarded message as a `.eml`, a scan as a `.pdf`). A short table of what devices send
/// rather than a crate of every type: anything else keeps no extension, as before.
fn unnamed(n: usize, ctype: &str, subtype: &str) -> String {
    let t = format!("{ctype}/{subtype}").to_ascii_lowercase();
    let ext = match t.as_str() {
        "message/rfc822" | "message/global" => ".eml",
        "application/pdf" => ".pdf",
        "image/jpeg" | "image/jpg" | "image/pjpeg" => ".jpg",
        "image/png" => ".png",
        "image/gif" => ".gif",
        "image/tiff" => ".tif",
        "text/csv" => ".csv",
        "text/html" => ".html",
        "text/plain" => ".txt",
        "text/calendar" => ".ics",
        "application/zip" => ".zip",
        "application/xml" | "text/xml" => ".xml",
        "application/json" => ".json",
        "audio/wav" | "audio/x-wav" => ".wav",
        "audio/mpeg" => ".mp3",
        _ => "",
    };
    format!("attachment-{n}{ext}")
}

fn is_symbol(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'+' || b == b'/'
}

impl Leaf {
    /// The decoded size, without decoding (reading the part once, a piece at a time).
    pub fn size<S: Source + ?Sized>(&self, message: &S) -> io::Result<u64> {
        if !self.base64 {
            return Ok(self.body.len() as u64);
        }
        let mut symbols = 0u64;
        let mut at = self.body.start;
        while at < self.body.end {
            let end = (at + PIECE).min(self.body.end);
            let piece = message.read(at..end)?;
            if piece.is_empty() {
                break;
            }
            symbols += piece.iter().filter(|b| is_symbol(**b)).count() as u64;
            at += piece.len();
        }
        Ok(symbols * 3 / 4)
    }

    /// The decoded content in pieces of at most `chunk` bytes (a multiple of 3), without holding more than one.
    pub fn chunks<S: Source>(&self, message: S, chunk: usize) -> Chunks<S> {
        Chunks {
            message,
            at: self.body.start,
            end: self.body.end,
            base64: self.base64,
            chunk: (chunk / 3 * 3).max(3),
        }
    }
}

/// See [`Leaf::chunks`].
pub struct Chunks<S> {
    message: S,
    at: usize,
    end: usize,
    base64: bool,
    chunk: usize,
}

impl<S: Source> Iterator for Chunks<S> {
    type Item = io::Result<Vec<u8>>;

    fn next(&mut self) -> Option<io::Result<Vec<u8>>> {
        if self.at >= self.end {
            return None;
        }
        if !self.base64 {
            let end = (self.at + self.chunk).min(self.end);
            let piece = self.message.read(self.at..end).map(Cow::into_owned);
            self.at = if matches!(&piece, Ok(p) if !p.is_empty()) {
                end
            } else {
                self.end
            };
            return Some(piece);
        }
        // Gather the symbols of one chunk (skipping line breaks and anything else not base64), then decode.
        let want = self.chunk / 3 * 4;
        let mut symbols = Vec::with_capacity(want);
        while symbols.len() < want && self.at < self.end {
            let end = (self.at + PIECE).min(self.end);
            let piece = match self.message.read(self.at..end) {
                Ok(p) if p.is_empty() => {
                    self.at = self.end;
                    break;
                }
                Ok(p) => p,
                Err(e) => {
                    self.at = self.end;
                    return Some(Err(e));
                }
            };
            let mut used = 0;
            for &b in piece.iter() {
                if symbols.len() == want {
                    break;
                }
                used += 1;
                if is_symbol(b) {
                    symbols.push(b);
                }
            }
            self.at += used;
        }
        if symbols.is_empty() {
            self.at = self.end;
            return None;
        }
        // A stray last symbol cannot stand for a byte; the lenient engine takes any padding or none.
        if symbols.len() % 4 == 1 {
            symbols.pop();
        }
        Some(
            LENIENT
                .decode(&symbols)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e)),
        )
    }
}

const LENIENT: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    base64::engine::GeneralPurposeConfig::new()
        .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent)
        .with_decode_allow_trailing_bits(true),
);

/// The leaf parts of a multipart message that have a name or are not text, and whose encoding can be undone
/// chunk by chunk (base64, or none). The first text part (the body people read) is never one of them. The
/// message is read twice, a piece at a time: once for the lines that start with "--" (where delimiters can be),
/// then only around those lines and part headers.
pub fn leaves<S: Source + ?Sized>(message: &S) -> io::Result<Vec<Leaf>> {
    let mut out = Vec::new();
    let window = message.read(0..message.size().min(1 << 20))?;
    let start = body_start(&window);
    if start == window.len() && window.len() < message.size() {
        // A header block over 1 MiB: nothing of it is taken apart.
        return Ok(out);
    }
    if let Some(boundary) = boundary_of(&window[..start]) {
        let walker = Walker {
            message,
            dash_lines: dash_lines(message)?,
        };
        walker.walk(start..message.size(), &boundary, 0, &mut out)?;
    }
    Ok(out)
}

/// Offsets of the lines that start with "--", in order (at most [`MAX_DASH_LINES`]).
fn dash_lines<S: Source + ?Sized>(message: &S) -> io::Result<Vec<usize>> {
    let mut out = Vec::new();
    let (mut at, size) = (0, message.size());
    // Whether the byte before the current piece ends a line, and a line start at the last byte seen that is '-'.
    let (mut line_start, mut pending) = (true, None::<usize>);
    while at < size && out.len() < MAX_DASH_LINES {
        let piece = message.read(at..(at + PIECE).min(size))?;
        if piece.is_empty() {
            break;
        }
        if let Some(p) = pending.take()
            && piece[0] == b'-'
        {
            out.push(p);
        }
        let mut check = |i: usize| match (piece.get(i), piece.get(i + 1)) {
            (Some(b'-'), Some(b'-')) => out.push(at + i),
            (Some(b'-'), None) => pending = Some(at + i),
            _ => {}
        };
        if line_start {
            check(0);
        }
        for lf in memchr::memchr_iter(b'\n', &piece) {
            check(lf + 1);
        }
        line_start = piece.last() == Some(&b'\n');
        at += piece.len();
    }
    Ok(out)
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

struct Walker<'a, S: ?Sized> {
    message: &'a S,
    dash_lines: Vec<usize>,
}

impl<S: Source + ?Sized> Walker<'_, S> {
    fn walk(
        &self,
        body: Range<usize>,
        boundary: &str,
        depth: usize,
        out: &mut Vec<Leaf>,
    ) -> io::Result<()> {
        if depth >= MAX_DEPTH || out.len() >= MAX_PARTS {
            return Ok(());
        }
        let lines = self.delimiters(body, boundary)?;
        for pair in lines.windows(2) {
            let (open, next) = (&pair[0], &pair[1]);
            if open.close {
                break;
            }
            // The CRLF before the next delimiter belongs to that delimiter (RFC 2046 section 5.1.1).
            let part = open.after..next.start.saturating_sub(2).max(open.after);
            let window = self
                .message
                .read(part.start..part.end.min(part.start + MAX_PART_HEAD))?;
            let rel = body_start(&window);
            if rel == window.len() && window.len() < part.len() {
                continue;
            }
            let head = &window[..rel];
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
                    self.walk(content, b, depth + 1, out)?;
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
            let content_id = p
                .content_id()
                .map(|id| {
                    id.trim()
                        .trim_start_matches('<')
                        .trim_end_matches('>')
                        .to_string()
                })
                .filter(|id| !id.is_empty());
            // Inline only where the body can refer to it: an inline part without a Content-ID (how scanners and
            // Apple Mail mark attachments) would be hidden by Outlook, which lists no inline part nothing shows.
            let inline = content_id.is_some()
                && p.content_disposition()
                    .is_none_or(|d| d.ctype().eq_ignore_ascii_case("inline"));
            out.push(Leaf {
                cut: open.start..next.start,
                body: content,
                name: name.unwrap_or_else(|| unnamed(out.len() + 1, ctype, subtype)),
                content_type: format!("{ctype}/{subtype}"),
                base64,
                content_id,
                inline,
            });
            if out.len() >= MAX_PARTS {
                break;
            }
        }
        Ok(())
    }

    /// The delimiter lines of `boundary` within `body`, up to and including the closing one.
    fn delimiters(&self, body: Range<usize>, boundary: &str) -> io::Result<Vec<Delimiter>> {
        let dashes = format!("--{boundary}");
        let mut out = Vec::new();
        let first = self.dash_lines.partition_point(|&at| at < body.start);
        for &at in self.dash_lines[first..]
            .iter()
            .take_while(|&&at| at < body.end)
        {
            // The line up to where it must end: dashes, "--", transport padding (spaces, tabs), CRLF.
            let end = (at + dashes.len() + 2 + MAX_PADDING + 2).min(body.end);
            let line = self.message.read(at..end)?;
            let Some(rest) = line.strip_prefix(dashes.as_bytes()) else {
                continue;
            };
            let close = rest.starts_with(b"--");
            let rest = &rest[if close { 2 } else { 0 }..];
            let pad = rest
                .iter()
                .take_while(|b| **b == b' ' || **b == b'\t')
                .count();
            let tail = &rest[pad..];
            let after = if tail.starts_with(b"\r\n") {
                end - tail.len() + 2
            } else if tail.is_empty() && end == body.end {
                body.end
            } else {
                continue; // "--boundary-more": a longer line, not this delimiter
            };
            out.push(Delimiter {
                start: at,
                after,
                close,
            });
            if close {
                break;
            }
        }
        Ok(out)
    }
}

/// A boundary delimiter line: where it starts, where the part after it starts, and whether it closes.
struct Delimiter {
    start: usize,
    after: usize,
    close: bool,
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
    fn only_a_part_the_body_can_name_is_inline() {
        let part = |headers: &str| {
            let msg = format!(
                "Content-Type: multipart/mixed; boundary=\"b\"\r\n\r\n--b\r\nContent-Type: image/png\r\n{headers}Content-Transfer-Encoding: base64\r\n\r\naGk=\r\n--b--\r\n"
            );
            let l = leaves(&msg.as_bytes()).unwrap();
            (l[0].inline, l[0].content_id.clone())
        };
        assert_eq!(
            part("Content-ID: <logo@x>\r\n"),
            (true, Some("logo@x".into()))
        );
        // Apple Mail and scanners mark attachments inline without a Content-ID: Outlook would hide them.
        assert_eq!(
            part("Content-Disposition: inline; filename=\"p.png\"\r\n"),
            (false, None)
        );
        assert!(!part("Content-ID: <logo@x>\r\nContent-Disposition: attachment\r\n").0);
    }

    #[test]
    fn an_unnamed_part_is_named_with_its_types_extension() {
        let msg = b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nsee below\r\n--b\r\nContent-Type: message/rfc822\r\n\r\nSubject: fwd\r\n\r\nold\r\n--b\r\nContent-Type: application/PDF\r\nContent-Transfer-Encoding: base64\r\n\r\naGk=\r\n--b\r\nContent-Type: application/x-vendor\r\n\r\nraw\r\n--b--\r\n";
        let names: Vec<String> = leaves(&&msg[..])
            .unwrap()
            .into_iter()
            .map(|l| l.name)
            .collect();
        assert_eq!(
            names,
            ["attachment-1.eml", "attachment-2.pdf", "attachment-3"]
        );
    }

    #[test]
    fn an_attachment_is_found_cut_and_decoded() {
        let l = leaves(&MSG).unwrap();
        assert_eq!(l.len(), 1, "{l:?}");
        let a = &l[0];
        assert_eq!(a.name, "scan.pdf");
        assert_eq!(a.content_type, "application/pdf");
        assert_eq!(a.size(&MSG).unwrap(), 11);
        let all: Vec<u8> = a.chunks(MSG, 3).flat_map(Result::unwrap).collect();
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
        let nested = &nested[..];
        let l = leaves(&nested).unwrap();
        assert_eq!(l.len(), 1);
        assert_eq!(
            l[0].chunks(nested, 30)
                .flat_map(Result::unwrap)
                .collect::<Vec<u8>>(),
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
            let _ = leaves(&junk);
            let _ = header_recipients(junk);
        }
    }
}
