//! Files relay reads whole: its config, the secrets, keys and certificates the config names, and its own small
//! JSON files under the state dir. Each is read up to a limit, so that a path that names the wrong thing (a log
//! file, a disk image, `/dev/zero`) is refused with a reason instead of filling memory.

use std::io::{self, Read};
use std::path::Path;

/// A secret, key, certificate or one of relay's JSON files: a few KiB at most in practice.
pub const SMALL: u64 = 1024 * 1024;
/// The config file: a large site's users and accounts fit many times over.
pub const CONFIG: u64 = 16 * 1024 * 1024;

/// The whole file, if it is at most `limit` bytes; `InvalidData` if it is larger.
pub fn read(path: &Path, limit: u64) -> io::Result<Vec<u8>> {
    read_from(std::fs::File::open(path)?, limit)
}

fn read_from(file: std::fs::File, limit: u64) -> io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    file.take(limit.saturating_add(1)).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("larger than {}: not a file relay reads", shown(limit)),
        ));
    }
    Ok(bytes)
}

/// Opens one of relay's own files under the state dir for reading, refusing anything but a regular file. Opened
/// without blocking: a FIFO put in its place would otherwise hang the open (and a start-up, a `relay status`, or
/// every delivery after it) until something writes to it; a directory would fail only at the read.
pub fn open_regular(path: &Path) -> io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    if !file.metadata()?.is_file() {
        // Not `InvalidData`, which callers take for damaged content (set aside, rewritten): nothing was read.
        return Err(io::Error::new(io::ErrorKind::InvalidInput, NOT_REGULAR));
    }
    Ok(file)
}

/// Why [`open_regular`] refused a file.
pub const NOT_REGULAR: &str = "not a regular file (a directory, FIFO or device is in its place)";

/// As [`read`], for relay's own files under the state dir: only a regular file ([`open_regular`]).
pub fn read_own(path: &Path, limit: u64) -> io::Result<Vec<u8>> {
    read_from(open_regular(path)?, limit)
}

/// One of relay's own small JSON files (a report, a pause, open incidents), if it is there and reads as `T`: a
/// missing or damaged report is only a report not shown, never an error.
pub fn report<T: serde::de::DeserializeOwned>(path: &Path) -> Option<T> {
    serde_json::from_slice(&read_own(path, SMALL).ok()?).ok()
}

fn shown(limit: u64) -> String {
    const MIB: u64 = 1024 * 1024;
    if limit >= MIB && limit.is_multiple_of(MIB) {
        format!("{} MiB", limit / MIB)
    } else {
        format!("{limit} bytes")
    }
}

/// As [`read`], as UTF-8 text.
pub fn read_to_string(path: &Path, limit: u64) -> io::Result<String> {
    String::from_utf8(read(path, limit)?).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "stream did not contain valid UTF-8",
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_up_to_the_limit_and_refuses_past_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"12345").unwrap();
        assert_eq!(read(&path, 5).unwrap(), b"12345");
        let e = read(&path, 4).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(e.to_string().contains("larger than 4 bytes"), "{e}");
        assert_eq!(shown(SMALL), "1 MiB");
        // A device that never ends is refused too, after the limit.
        let e = read(Path::new("/dev/zero"), 1024).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert_eq!(
            read(&dir.path().join("none"), 5).unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
    }
}
