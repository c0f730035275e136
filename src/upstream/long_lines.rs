//! Lines over 998 octets, made fit for SMTP without changing what the message says.
//!
//! RFC 5321 section 4.5.3.1.6 caps a line at 998 octets plus CRLF, and Microsoft 365 and Gmail enforce it; devices
//! send base64 without line breaks, or a whole report on one line. relay stores such a message as it came, and on
//! the way to an SMTP upstream wraps each long line in a way the reader's mail program undoes:
//! - in a base64 part, lines are re-broken at 76 characters (decoders skip line breaks, RFC 2045 section 6.8);
//! - in a quoted-printable part, soft line breaks (`=` CRLF) are inserted, never inside an `=XX` escape;
//! - any other leaf part (7bit, 8bit, binary, or none) with a long line is re-encoded as quoted-printable and its
//!   `Content-Transfer-Encoding` replaced, `MIME-Version: 1.0` added to a message that had none;
//! - a long header line is folded at whitespace (RFC 5322 section 2.2.3); one with no whitespace to fold at is
//!   left as it is: there is no lossless way to shorten it, and upstreams that refuse it refuse it with a 5xx;
//! - preamble, epilogue, and parts whose encoding relay does not know are broken at 998 octets (nobody reads the
//!   first two, and the last cannot be re-encoded without knowing what they are).
//!
//! Protocol logic only, no I/O, and streaming: a message is handled in chunks cut anywhere, in two passes (it is on
//! disk, so reading it twice costs nothing in memory). [`Scanner`] walks the MIME structure and records which
//! parts have a long line ([`Plan`]); [`Rewriter`] walks it again and rewrites them, since a part's
//! `Content-Transfer-Encoding` header comes before the line that makes it change. State is bounded: the first
//! 1000 octets of the current line, the boundaries of at most 32 nested multiparts, a `Content-Type` of at most
//! 4 KiB, a header word of at most 998 octets; the plan holds one entry per part with a long line (so at most one
//! per 999 octets of message).
//!
//! The quoted-printable encoder is our own: the `quoted_printable` crate (in the tree through lettre) encodes one
//! whole slice per call and keeps no column or pending whitespace between calls, so a 20 MB line would have to be
//! in memory at once; it also leaves a line-leading `.` as it is. mail-parser parses whole messages in memory.

use std::borrow::Cow;

use memchr::{memchr, memchr_iter};

/// The longest line SMTP allows, without its CRLF (RFC 5321 section 4.5.3.1.6).
pub const MAX_LINE: usize = 998;
/// The longest base64 or quoted-printable line (RFC 2045 sections 6.7 and 6.8).
const WIDTH: usize = 76;
/// Bytes of a line held until it is known to be long: 999 content octets and one more, which may be the CR of its
/// CRLF. A boundary line and a header's name always fit in them.
const HOLD: usize = MAX_LINE + 2;
/// Nested multiparts followed; a deeper one is treated as a part of unknown encoding.
const MAX_DEPTH: usize = 32;
/// RFC 2046 allows 70 characters; a longer boundary is taken as a part of unknown encoding.
const MAX_BOUNDARY: usize = 200;
/// `Content-Type` and `Content-Transfer-Encoding` values kept; a longer one makes the part of unknown encoding.
const MAX_FIELD: usize = 4096;
/// Where a folded header line is broken when it can be (RFC 5322 section 2.1.1's recommended 78).
const FOLD_AT: usize = 78;

/// Whether any line is over [`MAX_LINE`] octets (without its CRLF). The fast path: a message without one is sent
/// as it is, with no copy.
pub fn needs_wrapping(message: &[u8]) -> bool {
    let mut start = 0;
    for lf in memchr_iter(b'\n', message) {
        let line = &message[start..lf];
        if line.strip_suffix(b"\r").unwrap_or(line).len() > MAX_LINE {
            return true;
        }
        start = lf + 1;
    }
    message.len() - start > MAX_LINE
}

/// The message as an SMTP upstream must get it: itself when no line is over [`MAX_LINE`] octets, else a wrapped
/// copy (at most about 3.2 times the size of the parts re-encoded as quoted-printable, if every octet of them needs
/// escaping; a few percent more than the message for text and base64).
pub fn wrap(message: &[u8]) -> Cow<'_, [u8]> {
    if !needs_wrapping(message) {
        return Cow::Borrowed(message);
    }
    let mut rewriter = Rewriter::new(plan(message));
    let mut out = Vec::with_capacity(message.len() + message.len() / 16);
    rewriter.feed(message, &mut out);
    rewriter.finish(&mut out);
    Cow::Owned(out)
}

/// The size of [`wrap`]'s copy, without making it (for memory accounting); `None` when no copy is needed.
pub fn wrapped_len(message: &[u8]) -> Option<usize> {
    if !needs_wrapping(message) {
        return None;
    }
    let mut rewriter = Rewriter::new(plan(message));
    let (mut out, mut len) = (Vec::new(), 0);
    for chunk in message.chunks(64 << 10) {
        rewriter.feed(chunk, &mut out);
        len += out.len();
        out.clear();
    }
    rewriter.finish(&mut out);
    Some(len + out.len())
}

fn plan(message: &[u8]) -> Plan {
    let mut scanner = Scanner::new();
    scanner.feed(message);
    scanner.finish()
}

/// What the first pass found: whether any line is long, and which parts need their lines changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    long_lines: bool,
    /// (entity number, fix), in message order. Entities are numbered as their header blocks begin: 0 is the
    /// message itself.
    fixes: Vec<(u32, Fix)>,
}

impl Plan {
    /// No line is over [`MAX_LINE`]: the message goes out as it is.
    pub fn unchanged(&self) -> bool {
        !self.long_lines
    }

    fn note(&mut self, entity: u32, body: Body) {
        let fix = match body {
            Body::Base64 => Fix::Rebreak,
            Body::QuotedPrintable => Fix::SoftBreaks,
            Body::Identity => Fix::Reencode,
            // Broken where it is long, which needs nothing known in advance.
            Body::Opaque => return,
        };
        if self.fixes.last().map(|f| f.0) != Some(entity) {
            self.fixes.push((entity, fix));
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fix {
    /// base64: lines over 76 characters are broken at 76.
    Rebreak,
    /// quoted-printable: lines over 76 characters get soft line breaks.
    SoftBreaks,
    /// 7bit, 8bit, binary: the whole body becomes quoted-printable, and the header says so.
    Reencode,
}

/// The first pass: feed the message in chunks, then [`finish`](Scanner::finish) for the plan.
#[derive(Default)]
pub struct Scanner {
    lines: Lines,
    walker: Walker,
    plan: Plan,
}

impl Scanner {
    pub fn new() -> Scanner {
        Scanner::default()
    }

    pub fn feed(&mut self, chunk: &[u8]) {
        let Scanner {
            lines,
            walker,
            plan,
        } = self;
        lines.feed(chunk, &mut |piece| scan(walker, plan, piece));
    }

    pub fn finish(mut self) -> Plan {
        let Scanner {
            lines,
            walker,
            plan,
        } = &mut self;
        lines.finish(&mut |piece| scan(walker, plan, piece));
        self.plan
    }
}

fn scan(walker: &mut Walker, plan: &mut Plan, piece: Piece<'_>) {
    match piece {
        Piece::Line(content, _) => {
            walker.start(content);
        }
        Piece::Head(head) => {
            plan.long_lines = true;
            if let Role::Body { entity, body } = walker.start(head) {
                plan.note(entity, body);
            }
        }
        Piece::More(bytes) => walker.more(bytes),
        Piece::End(_) => {}
    }
}

/// The second pass: feed the same message in chunks (cut anywhere), appending the wrapped message to `out`.
pub struct Rewriter {
    lines: Lines,
    walker: Walker,
    plan: Plan,
    /// The first entry of `plan.fixes` not yet passed.
    next_fix: usize,
    /// How the long line being read is written.
    line: Out,
    unfoldable: usize,
}

impl Rewriter {
    pub fn new(plan: Plan) -> Rewriter {
        Rewriter {
            lines: Lines::default(),
            walker: Walker::default(),
            plan,
            next_fix: 0,
            line: Out::Same,
            unfoldable: 0,
        }
    }

    pub fn feed(&mut self, chunk: &[u8], out: &mut Vec<u8>) {
        let mut lines = std::mem::take(&mut self.lines);
        lines.feed(chunk, &mut |piece| self.piece(piece, out));
        self.lines = lines;
    }

    /// Ends the message. Returns how many lines were left over [`MAX_LINE`] octets: parts of header lines with no
    /// whitespace to fold at.
    pub fn finish(mut self, out: &mut Vec<u8>) -> usize {
        let mut lines = std::mem::take(&mut self.lines);
        lines.finish(&mut |piece| self.piece(piece, out));
        self.unfoldable
    }

    fn piece(&mut self, piece: Piece<'_>, out: &mut Vec<u8>) {
        if self.plan.unchanged() {
            // Only a caller that skipped the fast path gets here: the message goes out as it came.
            return match piece {
                Piece::Line(content, end) => {
                    out.extend_from_slice(content);
                    out.extend_from_slice(end);
                }
                Piece::Head(bytes) | Piece::More(bytes) | Piece::End(bytes) => {
                    out.extend_from_slice(bytes)
                }
            };
        }
        match piece {
            Piece::Line(content, end) => {
                let role = self.walker.start(content);
                let mut line = self.out_for(role, false, content.len(), out);
                if matches!(line, Out::Same) {
                    out.extend_from_slice(content);
                    out.extend_from_slice(end);
                } else {
                    line.write(content, out);
                    self.unfoldable += line.end(end, out);
                }
            }
            Piece::Head(head) => {
                let role = self.walker.start(head);
                self.line = self.out_for(role, true, head.len(), out);
                self.line.write(head, out);
            }
            Piece::More(bytes) => {
                self.walker.more(bytes);
                self.line.write(bytes, out);
            }
            Piece::End(end) => {
                let mut line = std::mem::replace(&mut self.line, Out::Same);
                self.unfoldable += line.end(end, out);
            }
        }
    }

    /// The plan's fix for `entity`. Entities come in increasing order, so the plan is read once, front to back.
    fn fix(&mut self, entity: u32) -> Option<Fix> {
        let fixes = &self.plan.fixes;
        while fixes.get(self.next_fix).is_some_and(|f| f.0 < entity) {
            self.next_fix += 1;
        }
        fixes
            .get(self.next_fix)
            .filter(|f| f.0 == entity)
            .map(|f| f.1)
    }

    /// How a line is written, from what it is and whether it is long. Writes the header fields a re-encoded part
    /// gains just before the empty line that ends its header block.
    fn out_for(&mut self, role: Role, long: bool, len: usize, out: &mut Vec<u8>) -> Out {
        match role {
            Role::Header {
                entity,
                field: Field::Encoding,
            } if self.fix(entity) == Some(Fix::Reencode) => Out::Drop,
            Role::Header { .. } if long => Out::Fold(Folder::default()),
            Role::HeadersEnd {
                entity,
                message_without_mime_version,
            } => {
                let reencode = self.fix(entity) == Some(Fix::Reencode);
                // A message that gains a quoted-printable part becomes a MIME message, if it was not one (RFC 2045
                // section 4): the top level whichever part it is, an enclosed message when it is its own body.
                let anywhere = entity == 0 && self.plan.fixes.iter().any(|f| f.1 == Fix::Reencode);
                if message_without_mime_version && (reencode || anywhere) {
                    out.extend_from_slice(b"MIME-Version: 1.0\r\n");
                }
                if reencode {
                    out.extend_from_slice(b"Content-Transfer-Encoding: quoted-printable\r\n");
                }
                Out::Same
            }
            // On a delimiter line this long, what follows the delimiter is transport padding (RFC 2046 section
            // 5.1.1), or text after whitespace that parsers which match delimiters by their start skip: it goes.
            Role::Delimiter { len } if long => Out::Delimiter { left: len },
            Role::Body { entity, body } => {
                let fix = self.fix(entity);
                match body {
                    Body::Identity if fix == Some(Fix::Reencode) => Out::Encode(Encoder::default()),
                    Body::Base64 if long || (fix.is_some() && len > WIDTH) => Out::Break {
                        col: 0,
                        width: WIDTH,
                    },
                    Body::QuotedPrintable if long || (fix.is_some() && len > WIDTH) => {
                        Out::SoftBreaks(SoftBreaks::default())
                    }
                    _ if long => Out::Break {
                        col: 0,
                        width: MAX_LINE,
                    },
                    _ => Out::Same,
                }
            }
            Role::Filler if long => Out::Break {
                col: 0,
                width: MAX_LINE,
            },
            _ => Out::Same,
        }
    }
}

/// How one line is written.
enum Out {
    /// As it came.
    Same,
    /// Not at all: a `Content-Transfer-Encoding` field being replaced.
    Drop,
    /// With a line break every `width` octets.
    Break {
        col: usize,
        width: usize,
    },
    SoftBreaks(SoftBreaks),
    Encode(Encoder),
    Fold(Folder),
    /// The first `left` octets only.
    Delimiter {
        left: usize,
    },
}

impl Out {
    fn write(&mut self, mut bytes: &[u8], out: &mut Vec<u8>) {
        match self {
            Out::Same => out.extend_from_slice(bytes),
            Out::Drop => {}
            Out::Break { col, width } => {
                while !bytes.is_empty() {
                    // The break goes before the next octet, so that a line of exactly `width` gains no empty one.
                    if *col == *width {
                        out.extend_from_slice(b"\r\n");
                        *col = 0;
                    }
                    let n = (*width - *col).min(bytes.len());
                    out.extend_from_slice(&bytes[..n]);
                    *col += n;
                    bytes = &bytes[n..];
                }
            }
            Out::SoftBreaks(s) => s.write(bytes, out),
            Out::Encode(e) => e.write(bytes, out),
            Out::Fold(f) => f.write(bytes, out),
            Out::Delimiter { left } => {
                let n = (*left).min(bytes.len());
                out.extend_from_slice(&bytes[..n]);
                *left -= n;
            }
        }
    }

    /// Ends the line with `end` (CRLF, LF, or nothing at the end of the message); a line that was rewritten ends
    /// in CRLF. Returns how many lines of a header line are left over [`MAX_LINE`].
    fn end(&mut self, end: &[u8], out: &mut Vec<u8>) -> usize {
        let mut unfoldable = 0;
        match self {
            Out::Same => {
                out.extend_from_slice(end);
                return 0;
            }
            Out::Drop => return 0,
            Out::Encode(e) => e.end(out),
            Out::Fold(f) => unfoldable = f.end(out),
            Out::Break { .. } | Out::SoftBreaks(_) | Out::Delimiter { .. } => {}
        }
        if !end.is_empty() {
            out.extend_from_slice(b"\r\n");
        }
        unfoldable
    }
}

fn is_wsp(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

/// `=XX`, upper-case hex as RFC 2045 section 6.7 requires.
fn escape(b: u8, out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    out.extend_from_slice(&[b'=', HEX[usize::from(b >> 4)], HEX[usize::from(b & 15)]]);
}

/// Soft line breaks into an existing quoted-printable line: what it decodes to stays the same.
#[derive(Default)]
struct SoftBreaks {
    col: usize,
    /// Octets of an `=XX` escape still to come: never split from their `=`.
    escape: u8,
}

impl SoftBreaks {
    fn write(&mut self, bytes: &[u8], out: &mut Vec<u8>) {
        for &b in bytes {
            if self.escape > 0 {
                self.escape -= 1;
                out.push(b);
                self.col += 1;
                continue;
            }
            let width = if b == b'=' { 3 } else { 1 };
            // 75 characters and the `=` of the soft break make the 76 allowed.
            if self.col + width > WIDTH - 1 {
                out.extend_from_slice(b"=\r\n");
                self.col = 0;
                // A line we start must not begin with a dot (some gateways still eat it) or look like a delimiter;
                // in quoted-printable `=2E` and `=2D` decode to the same octet.
                if b == b'.' || b == b'-' {
                    escape(b, out);
                    self.col = 3;
                    continue;
                }
            }
            out.push(b);
            self.col += 1;
            if b == b'=' {
                self.escape = 2;
            }
        }
    }
}

/// Quoted-printable encoding of a part's lines (RFC 2045 section 6.7), one line at a time.
#[derive(Default)]
struct Encoder {
    col: usize,
    /// A space or tab not written yet: literal if anything follows it on the line, `=20`/`=09` at its end
    /// (rule 3: decoders drop trailing whitespace).
    held: Option<u8>,
}

impl Encoder {
    fn write(&mut self, bytes: &[u8], out: &mut Vec<u8>) {
        for &b in bytes {
            if let Some(w) = self.held.take() {
                self.put(w, false, out);
            }
            if is_wsp(b) {
                self.held = Some(b);
            } else {
                // Rule 2: printable ASCII but `=` may stand for itself; a CR in a line (not its end) is data too.
                self.put(b, b == b'=' || !(b' '..=b'~').contains(&b), out);
            }
        }
    }

    fn put(&mut self, b: u8, mut escaped: bool, out: &mut Vec<u8>) {
        let mut soft = false;
        if self.col + if escaped { 3 } else { 1 } > WIDTH - 1 {
            out.extend_from_slice(b"=\r\n");
            self.col = 0;
            soft = true;
        }
        // A line-leading dot as `=2E` (as the brief for relay asks, and as some gateways need); a leading `-`
        // after a soft break as `=2D`, so that no line we make can be taken for a boundary.
        escaped |= self.col == 0 && (b == b'.' || (soft && b == b'-'));
        if escaped {
            escape(b, out);
            self.col += 3;
        } else {
            out.push(b);
            self.col += 1;
        }
    }

    fn end(&mut self, out: &mut Vec<u8>) {
        if let Some(w) = self.held.take() {
            self.put(w, true, out);
        }
        self.col = 0;
    }
}

/// Folds one long header line at whitespace (RFC 5322 section 2.2.3: a CRLF goes before a space or tab, and
/// unfolding removes it again), filling lines up to [`FOLD_AT`] where it can.
#[derive(Default)]
struct Folder {
    col: usize,
    /// The word being read (its leading whitespace, then the rest), until it is known where it goes.
    word: Vec<u8>,
    /// The word has something other than whitespace: a fold before it leaves no blank continuation line.
    text: bool,
    /// The word did not fit and has been placed: the rest of it is written as it comes.
    passing: bool,
    /// Lines written over [`MAX_LINE`]: words with no whitespace to fold at.
    over: usize,
}

impl Folder {
    fn write(&mut self, bytes: &[u8], out: &mut Vec<u8>) {
        for &b in bytes {
            if is_wsp(b) && (self.text || self.passing) {
                // A new word: a fold may go before it.
                self.place(out);
                self.passing = false;
            }
            if self.passing {
                out.push(b);
                self.col += 1;
                continue;
            }
            self.word.push(b);
            self.text |= !is_wsp(b);
            let past = self.col + self.word.len() > FOLD_AT;
            // Where the word goes is known once it cannot fit on this line, or it is as long as a line may be.
            if (past && self.text) || self.word.len() >= MAX_LINE {
                self.place(out);
                self.passing = true;
            }
        }
    }

    fn place(&mut self, out: &mut Vec<u8>) {
        // A run of whitespace as long as a line is folded before too, though it may have nothing after it: left
        // where it is, the line would stay over the limit.
        let foldable = self.text || self.word.len() >= MAX_LINE;
        if self.col > 0 && foldable && self.col + self.word.len() > FOLD_AT {
            out.extend_from_slice(b"\r\n");
            self.over += usize::from(self.col > MAX_LINE);
            self.col = 0;
        }
        out.extend_from_slice(&self.word);
        self.col += self.word.len();
        self.word.clear();
        self.text = false;
    }

    /// How many of the lines written are still over [`MAX_LINE`].
    fn end(&mut self, out: &mut Vec<u8>) -> usize {
        // Trailing whitespace stays on its line: moved alone to a continuation line it would make a blank one.
        self.text = false;
        self.place(out);
        self.over + usize::from(self.col > MAX_LINE)
    }
}

/// A line, or part of a long one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Piece<'a> {
    /// A line of at most [`MAX_LINE`] octets, and its end (CRLF, LF, or nothing at the end of the message).
    Line(&'a [u8], &'a [u8]),
    /// The first octets (999) of a longer line: boundaries and header names are in them.
    Head(&'a [u8]),
    /// More of the long line.
    More(&'a [u8]),
    /// The long line's end.
    End(&'a [u8]),
}

/// Cuts chunks into lines (LF ends one; the CR before it is not content), holding at most [`HOLD`] octets.
#[derive(Default)]
struct Lines {
    held: Vec<u8>,
    /// The current line is over [`MAX_LINE`]: its octets pass on as they come.
    long: bool,
    /// (long line) The last octet was a CR, held back until it is known whether an LF follows.
    cr: bool,
}

impl Lines {
    fn feed(&mut self, mut input: &[u8], f: &mut impl FnMut(Piece<'_>)) {
        while !input.is_empty() {
            input = if self.long {
                self.feed_long(input, f)
            } else {
                self.feed_short(input, f)
            };
        }
    }

    fn feed_short<'a>(&mut self, input: &'a [u8], f: &mut impl FnMut(Piece<'_>)) -> &'a [u8] {
        let lf = memchr(b'\n', input);
        let upto = lf.unwrap_or(input.len());
        if self.held.len() + upto >= HOLD {
            // 1000 octets before any LF: more than 998 however it ends.
            let take = HOLD - self.held.len();
            self.held.extend_from_slice(&input[..take]);
            self.start_long(f);
            return &input[take..];
        }
        let Some(lf) = lf else {
            self.held.extend_from_slice(input);
            return &[];
        };
        let whole = if self.held.is_empty() {
            &input[..lf]
        } else {
            self.held.extend_from_slice(&input[..lf]);
            &self.held[..]
        };
        let (content, end) = match whole.strip_suffix(b"\r") {
            Some(c) => (c, &b"\r\n"[..]),
            None => (whole, &b"\n"[..]),
        };
        if content.len() > MAX_LINE {
            f(Piece::Head(content));
            f(Piece::End(end));
        } else {
            f(Piece::Line(content, end));
        }
        self.held.clear();
        &input[lf + 1..]
    }

    /// The held octets begin a long line. The last of them may be the CR of its CRLF, so it goes on through the
    /// long-line path, which knows.
    fn start_long(&mut self, f: &mut impl FnMut(Piece<'_>)) {
        let last = self.held.pop();
        f(Piece::Head(&self.held));
        self.held.clear();
        self.long = true;
        if let Some(last) = last {
            self.feed_long(&[last], f);
        }
    }

    fn feed_long<'a>(&mut self, input: &'a [u8], f: &mut impl FnMut(Piece<'_>)) -> &'a [u8] {
        let lf = memchr(b'\n', input);
        let (seg, rest) = match lf {
            Some(p) => (&input[..p], &input[p + 1..]),
            None => (input, &[][..]),
        };
        if std::mem::take(&mut self.cr) {
            if seg.is_empty() && lf.is_some() {
                f(Piece::End(b"\r\n"));
                self.long = false;
                return rest;
            }
            f(Piece::More(b"\r"));
        }
        let (seg, cr) = match seg.strip_suffix(b"\r") {
            Some(s) => (s, true),
            None => (seg, false),
        };
        if !seg.is_empty() {
            f(Piece::More(seg));
        }
        if lf.is_some() {
            f(Piece::End(if cr { b"\r\n" } else { b"\n" }));
            self.long = false;
        } else {
            self.cr = cr;
        }
        rest
    }

    /// The end of the message: a last line without an LF keeps a final CR as content.
    fn finish(&mut self, f: &mut impl FnMut(Piece<'_>)) {
        if self.long {
            if std::mem::take(&mut self.cr) {
                f(Piece::More(b"\r"));
            }
            f(Piece::End(b""));
            self.long = false;
        } else if self.held.len() > MAX_LINE {
            f(Piece::Head(&self.held));
            f(Piece::End(b""));
        } else if !self.held.is_empty() {
            f(Piece::Line(&self.held, b""));
        }
        self.held.clear();
    }
}

/// What a leaf part's body is, for wrapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Body {
    Base64,
    QuotedPrintable,
    /// 7bit, 8bit, binary, or no `Content-Transfer-Encoding`: may be re-encoded as quoted-printable.
    Identity,
    /// An encoding relay does not know, a body that must not be re-encoded (message/partial), or a structure too
    /// deep or too odd to follow: long lines are broken where they are.
    Opaque,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    ContentType,
    Encoding,
    MimeVersion,
    Other,
}

/// What a line is, known from its first octets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// A header line of `entity` (a continuation line counts as part of the field it continues).
    Header {
        entity: u32,
        field: Field,
    },
    /// The empty line that ends `entity`'s header block.
    HeadersEnd {
        entity: u32,
        message_without_mime_version: bool,
    },
    /// A boundary delimiter line; `len` octets of it make the delimiter (`--`, the boundary, perhaps `--`).
    Delimiter {
        len: usize,
    },
    /// Preamble or epilogue of a multipart.
    Filler,
    Body {
        entity: u32,
        body: Body,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    Headers,
    Body(Body),
    Filler,
}

struct Frame {
    boundary: Vec<u8>,
    /// multipart/digest: a part without a Content-Type is a message/rfc822 (RFC 2046 section 5.1.5).
    digest: bool,
}

/// Follows the MIME structure line by line: header blocks, multipart boundaries (nested), message/rfc822 bodies.
/// Both passes run the same walk over the same octets, so they number entities the same way.
struct Walker {
    /// The enclosing multiparts, outermost first.
    frames: Vec<Frame>,
    place: Place,
    entity: u32,
    entities: u32,
    /// The header block being read is a message's (the top level, or a message/rfc822 body), not a body part's.
    message: bool,
    /// The entity is a part of a multipart/digest.
    in_digest: bool,
    field: Field,
    content_type: Vec<u8>,
    encoding: Vec<u8>,
    /// A field was longer than [`MAX_FIELD`]: what it says is not known.
    cut: bool,
    mime_version: bool,
}

impl Default for Walker {
    fn default() -> Walker {
        let mut w = Walker {
            frames: Vec::new(),
            place: Place::Headers,
            entity: 0,
            entities: 0,
            message: true,
            in_digest: false,
            field: Field::Other,
            content_type: Vec::new(),
            encoding: Vec::new(),
            cut: false,
            mime_version: false,
        };
        w.begin(true, false);
        w
    }
}

impl Walker {
    /// A new entity's header block begins.
    fn begin(&mut self, message: bool, in_digest: bool) {
        self.entity = self.entities;
        self.entities = self.entities.saturating_add(1);
        self.place = Place::Headers;
        self.message = message;
        self.in_digest = in_digest;
        self.field = Field::Other;
        self.content_type.clear();
        self.encoding.clear();
        self.cut = false;
        self.mime_version = false;
    }

    /// A line begins with `head` (all of it, or the first 999 octets of a long one).
    fn start(&mut self, head: &[u8]) -> Role {
        if let Some((level, close, len)) = self.delimiter(head) {
            self.frames.truncate(level + 1);
            if close {
                self.frames.pop();
                self.place = Place::Filler;
            } else {
                let digest = self.frames[level].digest;
                self.begin(false, digest);
            }
            return Role::Delimiter { len };
        }
        match self.place {
            Place::Headers => self.header_line(head),
            Place::Body(body) => Role::Body {
                entity: self.entity,
                body,
            },
            Place::Filler => Role::Filler,
        }
    }

    /// More of a long line.
    fn more(&mut self, bytes: &[u8]) {
        if self.place == Place::Headers {
            self.collect(bytes);
        }
    }

    /// Which enclosing multipart's delimiter the line is, if any: (its level, whether it closes it, the
    /// delimiter's length). Innermost first, as an outer boundary ends the inner parts (RFC 2046 section 5.1.2).
    /// The delimiter must be followed by the line's end or whitespace (transport padding), so that a boundary
    /// that is a prefix of another does not match it.
    fn delimiter(&self, head: &[u8]) -> Option<(usize, bool, usize)> {
        let rest = head.strip_prefix(b"--")?;
        self.frames.iter().enumerate().rev().find_map(|(level, f)| {
            let after = rest.strip_prefix(&f.boundary[..])?;
            let (close, after) = match after.strip_prefix(b"--") {
                Some(a) => (true, a),
                None => (false, after),
            };
            let ends = after.first().is_none_or(|&b| is_wsp(b));
            ends.then_some((level, close, head.len() - after.len()))
        })
    }

    fn header_line(&mut self, line: &[u8]) -> Role {
        let entity = self.entity;
        if line.is_empty() {
            let role = Role::HeadersEnd {
                entity,
                message_without_mime_version: self.message && !self.mime_version,
            };
            self.end_of_headers();
            return role;
        }
        if is_wsp(line[0]) {
            self.collect(line);
        } else {
            let (name, value) = match memchr(b':', line) {
                Some(colon) => (line[..colon].trim_ascii_end(), &line[colon + 1..]),
                None => (line, &[][..]),
            };
            self.field = if name.eq_ignore_ascii_case(b"content-type") {
                self.content_type.clear();
                Field::ContentType
            } else if name.eq_ignore_ascii_case(b"content-transfer-encoding") {
                self.encoding.clear();
                Field::Encoding
            } else if name.eq_ignore_ascii_case(b"mime-version") {
                self.mime_version = true;
                Field::MimeVersion
            } else {
                Field::Other
            };
            self.collect(value);
        }
        Role::Header {
            entity,
            field: self.field,
        }
    }

    /// Keeps (unfolded) the value of the fields that shape the walk.
    fn collect(&mut self, bytes: &[u8]) {
        let value = match self.field {
            Field::ContentType => &mut self.content_type,
            Field::Encoding => &mut self.encoding,
            Field::MimeVersion | Field::Other => return,
        };
        if value.len() + bytes.len() > MAX_FIELD {
            self.cut = true;
        } else {
            value.extend_from_slice(bytes);
        }
    }

    fn end_of_headers(&mut self) {
        let encoding = token(&self.encoding);
        let (kind, boundary) = content_type(&self.content_type);
        let kind: &[u8] = match &kind[..] {
            b"" if self.in_digest => b"message/rfc822",
            b"" => b"text/plain",
            k => k,
        };
        let identity = matches!(&encoding[..], b"" | b"7bit" | b"8bit" | b"binary");
        let by_encoding = match &encoding[..] {
            b"base64" => Body::Base64,
            b"quoted-printable" => Body::QuotedPrintable,
            _ if identity => Body::Identity,
            _ => Body::Opaque,
        };
        if self.cut {
            self.place = Place::Body(Body::Opaque);
        } else if kind.starts_with(b"multipart/") {
            match boundary {
                Some(b)
                    if !b.is_empty()
                        && b.len() <= MAX_BOUNDARY
                        && self.frames.len() < MAX_DEPTH =>
                {
                    self.frames.push(Frame {
                        boundary: b,
                        digest: kind == b"multipart/digest",
                    });
                    self.place = Place::Filler;
                }
                _ => self.place = Place::Body(Body::Opaque),
            }
        } else if kind == b"message/rfc822" && identity {
            // The body is a message: its own header block comes next.
            self.begin(true, false);
        } else if kind.starts_with(b"message/") && identity {
            // RFC 2046 section 5.2: message/partial and message/external-body are 7bit; no other encoding.
            self.place = Place::Body(Body::Opaque);
        } else {
            self.place = Place::Body(by_encoding);
        }
    }
}

/// A header value's first token, lower-case, without surrounding whitespace or a comment after it.
fn token(value: &[u8]) -> Vec<u8> {
    let end = value
        .iter()
        .position(|&b| b == b'(' || b == b';')
        .unwrap_or(value.len());
    value[..end].trim_ascii().to_ascii_lowercase()
}

/// `type/subtype` (lower-case, empty if absent) and the boundary parameter of a Content-Type value (RFC 2045
/// section 5.1: parameters separated by `;`, values a token or a quoted string with `\` escapes).
fn content_type(value: &[u8]) -> (Vec<u8>, Option<Vec<u8>>) {
    let kind = token(value);
    let mut boundary = None;
    let Some(semi) = memchr(b';', value) else {
        return (kind, boundary);
    };
    let mut rest = &value[semi + 1..];
    while !rest.is_empty() {
        rest = rest.trim_ascii_start();
        let name_end = rest
            .iter()
            .position(|&b| b == b'=' || b == b';')
            .unwrap_or(rest.len());
        let name = rest[..name_end].trim_ascii();
        rest = &rest[name_end..];
        let mut param = Vec::new();
        if let Some(after) = rest.strip_prefix(b"=") {
            rest = after.trim_ascii_start();
            if let Some(quoted) = rest.strip_prefix(b"\"") {
                let mut i = 0;
                while i < quoted.len() && quoted[i] != b'"' {
                    if quoted[i] == b'\\' && i + 1 < quoted.len() {
                        i += 1;
                    }
                    param.push(quoted[i]);
                    i += 1;
                }
                rest = quoted.get(i + 1..).unwrap_or_default();
            } else {
                let end = rest
                    .iter()
                    .position(|&b| b == b';' || is_wsp(b) || b == b'(')
                    .unwrap_or(rest.len());
                param.extend_from_slice(&rest[..end]);
                rest = &rest[end..];
            }
        }
        if name.eq_ignore_ascii_case(b"boundary") && boundary.is_none() {
            boundary = Some(param);
        }
        // Whatever is left of this parameter (junk, a comment) up to the next `;`.
        rest = match memchr(b';', rest) {
            Some(p) => &rest[p + 1..],
            None => &[],
        };
    }
    (kind, boundary)
}

#[cfg(test)]
#[path = "long_lines_tests.rs"]
mod tests;
