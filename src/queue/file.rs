//! The queue file format, used by the writer (`spool.rs`) and every reader (`store.rs`, delivery, the command
//! line): `ID.msg` is one line of JSON, the seal first and then the envelope, followed by the message bytes.
//!
//! The seal (length + BLAKE3 of the message, `seal.rs`) always sits at bytes `SEAL_AT..SEAL_AT + SEAL_LEN`: the
//! writer puts it first in the line, so its place never depends on what a client sent. (An earlier format found
//! the placeholder as the first run of 80 zeros in the line, and an envelope holding 80 zeros moved it into
//! client text: acknowledged mail was then taken for unsealed and removed.) A file is written with the
//! placeholder, and writing the seal is the last step before the flush, so after a crash a file is either
//! unsealed (its client never heard 250: safe to remove) or sealed and whole. Anything else was damaged
//! outside relay, and goes to `quarantine/` rather than being removed.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::Envelope;
use super::layout::parse_file_name;
use super::seal::{SEAL_LEN, UNSEALED, is_sealed, seal};

/// The line starts `{"seal":"`, then the seal's hex digits.
const PREFIX: &[u8] = b"{\"seal\":\"";
/// Where the seal's hex digits start in the file.
pub const SEAL_AT: usize = PREFIX.len();
/// Longest envelope line we read: the most recipients a listener may take (`max_recipients`, at most 1,000)
/// with command lines of the longest length the session accepts (4 KiB) fit.
const MAX_ENVELOPE_LINE: u64 = 8 << 20;

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    /// Still being written, or cut off before it was sealed: its client never heard 250.
    #[error("{path}: not sealed (still arriving, or cut off before it was acknowledged)")]
    Unsealed { path: PathBuf },
    /// Not what relay writes: damaged, or written by something else. Never delivered, never removed.
    #[error("{path}: unreadable queue file: {reason}")]
    Corrupt { path: PathBuf, reason: String },
}

impl FileError {
    pub fn is_not_found(&self) -> bool {
        matches!(self, FileError::Io { source, .. } if source.kind() == io::ErrorKind::NotFound)
    }
}

/// A message in the queue: its envelope, and where its bytes are.
#[derive(Debug, Clone, Serialize)]
pub struct QueuedMessage {
    #[serde(flatten)]
    pub envelope: Envelope,
    /// Bytes of the message: relay's `Received:` line plus what the client sent.
    pub size: u64,
    #[serde(skip)]
    pub path: PathBuf,
    /// Where the message starts in the file (after the envelope line).
    #[serde(skip)]
    pub offset: u64,
    /// Length and hash of the message (`seal.rs`).
    #[serde(skip)]
    pub seal: String,
}

#[derive(Serialize)]
struct LineOut<'a> {
    // First, so that it sits at SEAL_AT whatever the envelope holds.
    seal: &'a str,
    #[serde(flatten)]
    envelope: &'a Envelope,
}

#[derive(Deserialize)]
struct LineIn {
    seal: String,
    #[serde(flatten)]
    envelope: Envelope,
}

/// The first line of a queue file, with the unsealed placeholder at [`SEAL_AT`] (compact JSON never holds a
/// raw newline).
pub fn unsealed_line(envelope: &Envelope) -> Vec<u8> {
    let line = LineOut {
        seal: UNSEALED,
        envelope,
    };
    // Serialising plain strings, numbers and times cannot fail; an empty line would fail `read` loudly.
    let mut bytes = serde_json::to_vec(&line).unwrap_or_default();
    debug_assert!(bytes.starts_with(PREFIX));
    bytes.push(b'\n');
    bytes
}

/// The seal of a complete message, to be written at [`SEAL_AT`].
pub fn seal_for(len: u64, hash: &blake3::Hash) -> String {
    seal(len, hash)
}

/// What the first bytes of a file say, before any JSON is parsed.
fn is_placeholder(head: &[u8]) -> bool {
    let n = head.len().min(SEAL_AT + SEAL_LEN);
    let expected = PREFIX.iter().chain(UNSEALED.as_bytes());
    head[..n].iter().zip(expected).all(|(a, b)| a == b)
}

/// Reads the envelope line of a queue file. Only a sealed message is returned; see [`FileError`] for the rest.
pub fn read(path: &Path) -> Result<QueuedMessage, FileError> {
    read_open(path).map(|(msg, _)| msg)
}

/// [`read`], keeping the file open for whoever reads the message next (a delivery: one open, not two).
pub fn read_open(path: &Path) -> Result<(QueuedMessage, File), FileError> {
    let io_err = |source| FileError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = crate::small_files::open_regular(path).map_err(|e| {
        // A directory or a FIFO by a message's name is no message: quarantined, not tried again and again (nor,
        // a FIFO, waited on for ever).
        if e.kind() == io::ErrorKind::InvalidInput {
            FileError::Corrupt {
                path: path.to_path_buf(),
                reason: crate::small_files::NOT_REGULAR.into(),
            }
        } else {
            io_err(e)
        }
    })?;
    let mut line = Vec::new();
    BufReader::new((&mut file).take(MAX_ENVELOPE_LINE))
        .read_until(b'\n', &mut line)
        .map_err(io_err)?;
    // The length after the seal: the committer writes a message's last bytes before its seal, so a seal seen
    // here means they are all in. Taken before, a file sealed in between had a length short of its seal's, and
    // an acknowledged message was quarantined as damaged.
    let len = file.metadata().map_err(io_err)?.len();
    Ok((parse(&line, len, path)?, file))
}

/// Parses the start of a queue file: `head` holds its first bytes up to and including the first newline (or
/// all of them, if there is none within [`MAX_ENVELOPE_LINE`]); `len` is the file's length. Pure, for the fuzz
/// target: whatever the bytes, this returns.
pub fn parse(head: &[u8], len: u64, path: &Path) -> Result<QueuedMessage, FileError> {
    let corrupt = |reason: String| FileError::Corrupt {
        path: path.to_path_buf(),
        reason,
    };
    let line = match head.iter().position(|&b| b == b'\n') {
        Some(nl) => &head[..=nl],
        None => head,
    };
    if is_placeholder(line) {
        return Err(FileError::Unsealed {
            path: path.to_path_buf(),
        });
    }
    if line.last() != Some(&b'\n') {
        return Err(corrupt("no complete first line".into()));
    }
    let parsed: LineIn = serde_json::from_slice(line).map_err(|e| corrupt(e.to_string()))?;
    let fixed = line
        .get(SEAL_AT..SEAL_AT + SEAL_LEN)
        .is_some_and(|s| line.starts_with(PREFIX) && s == parsed.seal.as_bytes());
    if !fixed || !is_sealed(&parsed.seal) {
        // The earlier format put the seal elsewhere in the line; whether such a file was acknowledged cannot be
        // told safely, so it is neither delivered nor removed.
        return Err(corrupt("the seal is not where relay writes it".into()));
    }
    // A copy or a rename of a queue file by hand would otherwise be delivered, settled and listed under an id
    // that belongs to another file.
    if let Some((named, _)) = parse_file_name(path)
        && named != parsed.envelope.id
    {
        return Err(corrupt(format!(
            "the file's name is not its message's id ({}): a copy or a rename made outside relay",
            parsed.envelope.id
        )));
    }
    let offset = line.len() as u64;
    Ok(QueuedMessage {
        envelope: parsed.envelope,
        size: len.saturating_sub(offset),
        path: path.to_path_buf(),
        offset,
        seal: parsed.seal,
    })
}

impl QueuedMessage {
    /// The message's header block (up to its first empty line), with LF line ends, for people to read; at most
    /// 1 MiB of it: a message may be tens of megabytes.
    pub fn header_block(&self) -> io::Result<Vec<u8>> {
        let mut file = File::open(&self.path)?;
        file.seek(SeekFrom::Start(self.offset))?;
        let mut out = Vec::new();
        let mut line = Vec::new();
        let mut reader = BufReader::new(file.take(MAX_ENVELOPE_LINE));
        while reader.read_until(b'\n', &mut line)? > 0 {
            let text = line.strip_suffix(b"\n").unwrap_or(&line);
            let text = text.strip_suffix(b"\r").unwrap_or(text);
            if text.is_empty() {
                break;
            }
            out.extend_from_slice(text);
            out.push(b'\n');
            line.clear();
        }
        Ok(out)
    }

    /// Whether the file holds as many bytes as the seal says: checked before anything trusts the file's size
    /// (for an allocation, or a read of that length).
    pub fn size_matches_seal(&self) -> bool {
        let sealed_len = self
            .seal
            .get(..16)
            .and_then(|h| u64::from_str_radix(h, 16).ok());
        sealed_len == Some(self.size)
    }

    /// The message bytes, checked against the seal: `Ok(None)` when they do not match (damaged on disk).
    #[cfg(test)]
    pub fn read_verified(&self) -> io::Result<Option<Vec<u8>>> {
        if !self.size_matches_seal() {
            return Ok(None);
        }
        let mut file = File::open(&self.path)?;
        file.seek(SeekFrom::Start(self.offset))?;
        let mut bytes = Vec::with_capacity(usize::try_from(self.size).unwrap_or(0));
        file.read_to_end(&mut bytes)?;
        let ok = seal(bytes.len() as u64, &blake3::hash(&bytes)) == self.seal;
        Ok(ok.then_some(bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::QueueId;
    use std::io::Write;
    use std::os::unix::fs::FileExt;

    fn envelope(sender: &str, helo: &str) -> Envelope {
        Envelope {
            id: QueueId::new(),
            sender: sender.into(),
            recipients: vec![format!("{}@example.com", "0".repeat(90))],
            client: "127.0.0.1:1".into(),
            helo: Some(helo.into()),
            user: None,
            listener: "127.0.0.1:25".into(),
            received_at: std::time::SystemTime::now(),
            body_8bit: false,
            smtputf8: false,
            via: None,
        }
    }

    fn write(dir: &Path, env: &Envelope, body: &[u8], sealed: bool) -> PathBuf {
        let path = dir.join(format!("{}.msg", env.id));
        let mut f = File::create(&path).unwrap();
        f.write_all(&unsealed_line(env)).unwrap();
        f.write_all(body).unwrap();
        if sealed {
            let s = seal_for(body.len() as u64, &blake3::hash(body));
            f.write_all_at(s.as_bytes(), SEAL_AT as u64).unwrap();
        }
        path
    }

    #[test]
    fn hostile_envelopes_never_move_the_seal() {
        let dir = tempfile::tempdir().unwrap();
        for (sender, helo) in [
            (format!("{}@x", "0".repeat(80)), "a".to_string()),
            ("a@b".into(), "0".repeat(255)),
            ("\"{\\\"seal\\\":\\\"\"@x".into(), "}{\"".into()),
        ] {
            let env = envelope(&sender, &helo);
            let path = write(dir.path(), &env, b"Subject: x\r\n\r\nhi\r\n", false);
            assert!(matches!(read(&path), Err(FileError::Unsealed { .. })));
            let path = write(dir.path(), &env, b"Subject: x\r\n\r\nhi\r\n", true);
            let m = read(&path).unwrap();
            assert_eq!(m.envelope, env);
            assert_eq!(
                m.read_verified().unwrap().as_deref(),
                Some(&b"Subject: x\r\n\r\nhi\r\n"[..])
            );
        }
    }

    #[test]
    fn a_file_under_another_id_is_not_a_message() {
        let dir = tempfile::tempdir().unwrap();
        let env = envelope("a@b", "h");
        let path = write(dir.path(), &env, b"body\r\n", true);
        let copy = dir.path().join(format!("{}.msg", QueueId::new()));
        std::fs::copy(&path, &copy).unwrap();
        assert!(read(&path).is_ok());
        match read(&copy) {
            Err(FileError::Corrupt { reason, .. }) => assert!(reason.contains("name"), "{reason}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn tells_unsealed_from_damaged() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.msg");
        for head in [&b""[..], b"{\"se", b"{\"seal\":\"0000"] {
            std::fs::write(&p, head).unwrap();
            assert!(
                matches!(read(&p), Err(FileError::Unsealed { .. })),
                "{head:?}"
            );
        }
        for head in [&b"garbage\n"[..], b"{\"seal\":\"12", b"{\"id\":1}\n"] {
            std::fs::write(&p, head).unwrap();
            assert!(
                matches!(read(&p), Err(FileError::Corrupt { .. })),
                "{head:?}"
            );
        }
        let env = envelope("a@b", "h");
        let path = write(dir.path(), &env, b"body\r\n", true);
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        let len = f.metadata().unwrap().len();
        f.write_all_at(b"X", len - 3).unwrap();
        assert_eq!(read(&path).unwrap().read_verified().unwrap(), None);
    }
}
