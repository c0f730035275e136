//! A message on its way upstream, read from its queue file in pieces rather than whole.
//!
//! Delivery opens the queued message once ([`Outgoing::open`]; on the blocking pool, but for a small message whose
//! pages the envelope's read already brought in): it checks the bytes against
//! the seal, notes whether a line is over 998 octets (the plan [`long_lines`] needs before it can rewrite), and
//! keeps the header block, which `rewrite_from = "header"` may replace. A small message is kept in memory from
//! that pass, so it is read once; a large one is read again from the file, a chunk at a time, as it is sent. So
//! what a delivery holds is bounded by [`SMALL`] and the chunk size, whatever the message's size.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use super::long_lines::{self, Plan};
use super::mime;

/// Messages up to this size stay in memory after the first read (one read instead of two).
pub const SMALL: u64 = 256 << 10;
/// How much of the file one read takes.
pub const CHUNK: usize = 256 << 10;
/// The longest header block kept for rewriting and for the HTTP transports' header reading; a message whose
/// header block is longer is sent as it is.
const MAX_HEAD: usize = 1 << 20;

/// The message's bytes: its new start (`head`, empty when nothing was rewritten), then the rest of the original.
#[derive(Clone)]
pub struct Outgoing {
    head: Arc<[u8]>,
    rest: Rest,
    /// Where the header block ends in the message as sent (for [`Outgoing::header_block`]).
    head_end: usize,
    /// From the first pass; `None` when no line is over 998 octets.
    long_lines: Option<Arc<Plan>>,
    /// For a message read again from its file: the seal, and the hash of the original header block, so that the
    /// second read is checked too (the file could change between the reads, if something other than relay wrote
    /// to it).
    reread: Option<Arc<Reread>>,
    /// Some octet is over 127: the SMTP upstream is told BODY=8BITMIME (RFC 6152), which old devices often
    /// leave out.
    eight_bit: bool,
}

struct Reread {
    head_hash: blake3::Hasher,
    len: u64,
    seal: String,
}

#[derive(Clone)]
enum Rest {
    Memory(Arc<[u8]>),
    File {
        file: Arc<File>,
        /// Bytes of the file that follow `head`.
        range: Range<u64>,
    },
}

impl Outgoing {
    /// A message built in memory (a test message, an alert, a bounce).
    pub fn from_bytes(bytes: Vec<u8>) -> Outgoing {
        let mut scanner = long_lines::Scanner::new();
        scanner.feed(&bytes);
        let plan = scanner.finish();
        let head_end = mime::body_start(&bytes);
        Outgoing {
            eight_bit: !bytes.is_ascii(),
            head: Arc::from(&[][..]),
            rest: Rest::Memory(bytes.into()),
            head_end,
            long_lines: (!plan.unchanged()).then(|| Arc::new(plan)),
            reread: None,
        }
    }

    /// Opens the message at `offset..offset + len` of `file`, checking it against `seal` as it reads (`Ok(None)`:
    /// the bytes do not match, the file was damaged on disk). Blocking: call it on the blocking pool, unless the
    /// pages are known to be in memory.
    pub fn open(
        file: Arc<File>,
        offset: u64,
        len: u64,
        seal: &str,
    ) -> io::Result<Option<Outgoing>> {
        (&*file).seek(SeekFrom::Start(offset))?;
        let mut hasher = blake3::Hasher::new();
        let mut scanner = long_lines::Scanner::new();
        let mut head = Vec::new();
        let mut head_end = None;
        let small = len <= SMALL;
        let mut kept = Vec::with_capacity(if small { len as usize } else { 0 });
        // No larger than the message: a 256 KiB buffer per small message is an mmap and munmap each time.
        let mut buf = vec![0; usize::try_from(len).unwrap_or(CHUNK).clamp(1, CHUNK)];
        let mut read = 0u64;
        let mut eight_bit = false;
        let mut reader = (&*file).take(len);
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            let chunk = &buf[..n];
            hasher.update(chunk);
            scanner.feed(chunk);
            eight_bit = eight_bit || !chunk.is_ascii();
            if small {
                kept.extend_from_slice(chunk);
            } else if head_end.is_none() && head.len() < MAX_HEAD {
                head.extend_from_slice(chunk);
                head_end = header_end(&head);
            }
            read += n as u64;
        }
        if crate::queue::seal::seal(read, &hasher.finalize()) != seal {
            return Ok(None);
        }
        let plan = scanner.finish();
        let long_lines = (!plan.unchanged()).then(|| Arc::new(plan));
        if small {
            return Ok(Some(Outgoing {
                head: Arc::from(&[][..]),
                head_end: mime::body_start(&kept),
                rest: Rest::Memory(kept.into()),
                long_lines,
                reread: None,
                eight_bit,
            }));
        }
        // Only the header block is kept; the rest is read again as it is sent.
        let head_end = head_end.unwrap_or(0);
        head.truncate(head_end);
        let mut head_hash = blake3::Hasher::new();
        head_hash.update(&head);
        let reread = Some(Arc::new(Reread {
            head_hash,
            len,
            seal: seal.to_string(),
        }));
        Ok(Some(Outgoing {
            head: head.into(),
            head_end,
            rest: Rest::File {
                file,
                range: offset + head_end as u64..offset + len,
            },
            long_lines,
            reread,
            eight_bit,
        }))
    }

    /// Bytes as stored (after a header rewrite), before any long-line wrapping.
    pub fn len(&self) -> u64 {
        self.head.len() as u64
            + match &self.rest {
                Rest::Memory(b) => b.len() as u64,
                Rest::File { range, .. } => range.end - range.start,
            }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The header block, up to and including the empty line (empty when longer than the 1 MiB kept).
    pub fn header_block(&self) -> &[u8] {
        match &self.rest {
            Rest::Memory(b) if self.head.is_empty() => &b[..self.head_end.min(b.len())],
            _ => &self.head[..self.head_end.min(self.head.len())],
        }
    }

    /// The message with its header block replaced by `head` (`rewrite_from = "header"`); `old` is how many bytes
    /// of the current header block `head` stands for.
    pub fn with_head(&self, new_head: Vec<u8>, old: usize) -> Outgoing {
        let block = self.header_block();
        let old = old.min(block.len());
        let eight_bit = self.eight_bit || !new_head.is_ascii();
        let mut head = new_head;
        let rest = match &self.rest {
            Rest::Memory(b) if self.head.is_empty() => {
                head.extend_from_slice(&b[old..self.head_end.min(b.len())]);
                let end = head.len();
                let rest: Arc<[u8]> = Arc::from(&b[self.head_end.min(b.len())..]);
                return Outgoing {
                    head_end: end,
                    head: head.into(),
                    rest: Rest::Memory(rest),
                    long_lines: self.long_lines.clone(),
                    reread: None,
                    eight_bit,
                };
            }
            other => {
                head.extend_from_slice(&block[old..]);
                other.clone()
            }
        };
        Outgoing {
            head_end: head.len(),
            head: head.into(),
            rest,
            long_lines: self.long_lines.clone(),
            reread: self.reread.clone(),
            eight_bit,
        }
    }

    /// Whether some octet is over 127 (the SMTP upstream is told BODY=8BITMIME).
    pub fn is_eight_bit(&self) -> bool {
        self.eight_bit
    }

    /// Whether some line is over 998 octets (SMTP wraps those).
    pub fn has_long_lines(&self) -> bool {
        self.long_lines.is_some()
    }

    /// The whole message in memory (what the tests compare; deliveries stream it).
    #[cfg(test)]
    pub async fn read_all(&self) -> io::Result<Vec<u8>> {
        self.read_range(0..self.len()).await
    }

    /// Bytes `range` of the message (before wrapping), read from memory or the file into one buffer (a whole
    /// large message is read straight into the buffer returned, never copied).
    pub async fn read_range(&self, range: Range<u64>) -> io::Result<Vec<u8>> {
        match &self.rest {
            Rest::Memory(_) => self.read_blocking(range),
            Rest::File { .. } => {
                let this = self.clone();
                tokio::task::spawn_blocking(move || this.read_blocking(range))
                    .await
                    .map_err(io::Error::other)?
            }
        }
    }

    /// As [`Outgoing::read_range`], blocking: on the blocking pool only.
    pub fn read_blocking(&self, range: Range<u64>) -> io::Result<Vec<u8>> {
        let end = range.end.min(self.len());
        let start = range.start.min(end);
        let head_len = self.head.len() as u64;
        let mut out = Vec::with_capacity((end - start) as usize);
        out.extend_from_slice(&self.head[start.min(head_len) as usize..end.min(head_len) as usize]);
        let (from, to) = (start.max(head_len) - head_len, end.saturating_sub(head_len));
        if to > from {
            match &self.rest {
                Rest::Memory(b) => out.extend_from_slice(&b[from as usize..to as usize]),
                Rest::File { file, range } => {
                    let filled = out.len();
                    out.resize(filled + (to - from) as usize, 0);
                    file.read_exact_at(&mut out[filled..], range.start + from)?;
                }
            }
        }
        Ok(out)
    }

    /// The message in pieces of about [`CHUNK`] bytes; with `wrap`, lines over 998 octets are wrapped on the way
    /// ([`long_lines`]): what an SMTP upstream must get.
    pub fn chunks(&self, wrap: bool) -> Chunks {
        Chunks {
            check: self.reread.as_ref().map(|r| r.head_hash.clone()),
            message: self.clone(),
            at: 0,
            rewriter: match (&self.long_lines, wrap) {
                (Some(plan), true) => Some(long_lines::Rewriter::new(Plan::clone(plan))),
                _ => None,
            },
            done: false,
        }
    }
}

/// The HTTP transports walk a large message's MIME structure in place (`mime.rs`).
impl mime::Source for Outgoing {
    fn size(&self) -> usize {
        self.len() as usize
    }

    fn read(&self, range: Range<usize>) -> io::Result<std::borrow::Cow<'_, [u8]>> {
        self.read_blocking(range.start as u64..range.end as u64)
            .map(std::borrow::Cow::Owned)
    }
}

/// Where the header block ends (after its empty line), once the bytes read so far hold it.
fn header_end(bytes: &[u8]) -> Option<usize> {
    if bytes.starts_with(b"\r\n") {
        return Some(2);
    }
    memchr::memmem::find(bytes, b"\r\n\r\n").map(|at| at + 4)
}

/// See [`Outgoing::chunks`].
pub struct Chunks {
    /// The original bytes read so far, hashed, for a message read again from its file.
    check: Option<blake3::Hasher>,
    message: Outgoing,
    at: u64,
    rewriter: Option<long_lines::Rewriter>,
    done: bool,
}

impl Chunks {
    /// Whether the bytes read from the file are still those sealed (once: the hash is used up).
    fn check_seal(&mut self) -> io::Result<()> {
        if let (Some(hash), Some(r)) = (self.check.take(), &self.message.reread)
            && crate::queue::seal::seal(r.len, &hash.finalize()) != r.seal
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the queue file changed while it was sent (its bytes no longer match the seal)",
            ));
        }
        Ok(())
    }

    /// The next piece, or `None` at the end. A wrapped message's pieces may be up to about 3.2 times [`CHUNK`].
    pub async fn next(&mut self) -> io::Result<Option<Vec<u8>>> {
        loop {
            if self.done {
                return Ok(None);
            }
            let len = self.message.len();
            if self.at >= len {
                self.done = true;
                // An empty message's only check.
                self.check_seal()?;
                let mut tail = Vec::new();
                if let Some(r) = self.rewriter.take() {
                    let unfoldable = r.finish(&mut tail);
                    if unfoldable > 0 {
                        tracing::debug!(
                            unfoldable,
                            "header lines over 998 octets with no whitespace to fold at went as they were"
                        );
                    }
                }
                return Ok((!tail.is_empty()).then_some(tail));
            }
            let end = (self.at + CHUNK as u64).min(len);
            let piece = self.message.read_range(self.at..end).await?;
            if piece.is_empty() {
                // The file is shorter than it was when opened: it was changed under relay.
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the queue file shrank while it was sent",
                ));
            }
            if let Some(hash) = &mut self.check {
                // Only what comes from the file: the (possibly rewritten) head was hashed as it was at the open.
                let from_file = (self.message.head.len() as u64).saturating_sub(self.at) as usize;
                hash.update(&piece[from_file.min(piece.len())..]);
            }
            self.at += piece.len() as u64;
            // Checked before the last piece is handed over, so that no consumer can send the whole message as
            // it now reads: the SMTP client writes the final dot with that piece, and an HTTP request with a
            // Content-Length is complete (and taken) once its last byte is out.
            if self.at >= len {
                self.check_seal()?;
            }
            match &mut self.rewriter {
                None => return Ok(Some(piece)),
                Some(r) => {
                    let mut out = Vec::with_capacity(piece.len() + piece.len() / 16);
                    r.feed(&piece, &mut out);
                    if !out.is_empty() {
                        return Ok(Some(out));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file_with(bytes: &[u8]) -> (tempfile::NamedTempFile, String) {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(b"ENVELOPE\n").unwrap();
        f.write_all(bytes).unwrap();
        let seal = crate::queue::seal::seal(bytes.len() as u64, &blake3::hash(bytes));
        (f, seal)
    }

    async fn collect(o: &Outgoing, wrap: bool) -> Vec<u8> {
        let mut c = o.chunks(wrap);
        let mut out = Vec::new();
        while let Some(p) = c.next().await.unwrap() {
            out.extend(p);
        }
        out
    }

    #[tokio::test]
    async fn small_and_large_messages_read_back_the_same() {
        for size in [10usize, SMALL as usize + 1, 3 * CHUNK + 17] {
            let mut msg = b"From: a@b\r\nSubject: s\r\n\r\n".to_vec();
            while msg.len() < size {
                msg.extend_from_slice(b"0123456789abcdef0123456789abcdef\r\n");
            }
            let (f, seal) = file_with(&msg);
            let o = Outgoing::open(Arc::new(f.reopen().unwrap()), 9, msg.len() as u64, &seal)
                .unwrap()
                .unwrap();
            assert_eq!(o.len(), msg.len() as u64);
            assert_eq!(o.header_block(), b"From: a@b\r\nSubject: s\r\n\r\n");
            assert_eq!(collect(&o, true).await, msg);
            assert_eq!(o.read_all().await.unwrap(), msg);
            assert!(!o.has_long_lines());
            let new = o.with_head(b"From: x@y\r\n".to_vec(), 11);
            let mut expected = b"From: x@y\r\n".to_vec();
            expected.extend_from_slice(&msg[11..]);
            assert_eq!(collect(&new, false).await, expected);
            assert_eq!(new.header_block(), b"From: x@y\r\nSubject: s\r\n\r\n");
            assert_eq!(new.read_range(5..20).await.unwrap(), &expected[5..20]);
        }
    }

    #[tokio::test]
    async fn a_file_changed_between_the_reads_is_not_sent_whole() {
        let mut msg = b"Subject: s\r\n\r\n".to_vec();
        msg.extend(std::iter::repeat_n(b'x', 3 * CHUNK));
        msg.extend_from_slice(b"\r\n");
        let (f, seal) = file_with(&msg);
        let o = Outgoing::open(Arc::new(f.reopen().unwrap()), 9, msg.len() as u64, &seal)
            .unwrap()
            .unwrap();
        let o = o.with_head(b"Subject: t\r\n".to_vec(), 12);
        f.as_file()
            .write_all_at(b"y", 9 + 2 * CHUNK as u64)
            .unwrap();
        for wrap in [true, false] {
            let mut c = o.chunks(wrap);
            let mut handed_over = 0;
            let result = loop {
                match c.next().await {
                    Ok(Some(piece)) => handed_over += piece.len(),
                    Ok(None) => break Ok(()),
                    Err(e) => break Err(e),
                }
            };
            assert_eq!(result.unwrap_err().kind(), io::ErrorKind::InvalidData);
            // Never the whole message: its last piece is held back by the check.
            let (clean, seal) = file_with(&msg);
            let whole = Outgoing::open(
                Arc::new(clean.reopen().unwrap()),
                9,
                msg.len() as u64,
                &seal,
            )
            .unwrap()
            .unwrap()
            .with_head(b"Subject: t\r\n".to_vec(), 12);
            let whole = collect(&whole, wrap).await.len();
            assert!(handed_over < whole, "wrap {wrap}: {handed_over} of {whole}");
        }
        // Unchanged, the rewritten head does not upset the check.
        let (f, seal) = file_with(&msg);
        let o = Outgoing::open(Arc::new(f.reopen().unwrap()), 9, msg.len() as u64, &seal)
            .unwrap()
            .unwrap()
            .with_head(b"Subject: t\r\n".to_vec(), 12);
        assert_eq!(collect(&o, false).await.len(), msg.len());
    }

    #[tokio::test]
    async fn a_damaged_file_is_refused() {
        let (f, _) = file_with(b"Subject: s\r\n\r\nhi\r\n");
        let other = crate::queue::seal::seal(18, &blake3::hash(b"Subject: t\r\n\r\nhi\r\n"));
        assert!(
            Outgoing::open(Arc::new(f.reopen().unwrap()), 9, 18, &other)
                .unwrap()
                .is_none()
        );
    }

    #[tokio::test]
    async fn long_lines_are_wrapped_only_when_asked() {
        let mut msg = b"Subject: s\r\n\r\n".to_vec();
        msg.extend(std::iter::repeat_n(b'x', 5000));
        msg.extend_from_slice(b"\r\n");
        let (f, seal) = file_with(&msg);
        let o = Outgoing::open(Arc::new(f.reopen().unwrap()), 9, msg.len() as u64, &seal)
            .unwrap()
            .unwrap();
        assert!(o.has_long_lines());
        assert_eq!(collect(&o, false).await, msg);
        assert_eq!(collect(&o, true).await, long_lines::wrap(&msg).into_owned());
    }
}
