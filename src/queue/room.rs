//! Whether the queue's filesystem has room for one more message, asked at MAIL.
//!
//! A full disk already fails a message safely (its write fails, the client hears 452 after its body, nothing is
//! acknowledged). Asking before the body saves the client sending a large scan for nothing (RFC 1870: its
//! declared SIZE is compared with the space left), and keeping `[queue] min_free_space` free leaves delivery
//! its own small writes (state files, rotated tokens, bounces) once clients have filled the rest.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};

/// Free inodes kept back, as bytes are: each message takes a file, and its state file another.
const MIN_FREE_FILES: u64 = 64;

/// What the filesystem has left for relay (an unprivileged user's share: blocks reserved for root are not
/// counted, as Postfix does not count them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Free {
    pub bytes: u64,
    /// `None` where the filesystem has no fixed number of inodes (btrfs, some network filesystems say 0).
    pub files: Option<u64>,
    /// Mounted read-only (ext4 remounts so after disk errors with `errors=remount-ro`): nothing can be stored.
    pub read_only: bool,
}

impl Free {
    /// Reads the figures of the filesystem that holds `dir` (an open directory).
    pub fn of(dir: &File) -> std::io::Result<Free> {
        let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
        // SAFETY: fstatvfs writes a whole statvfs into the buffer when it returns 0, and the descriptor is open
        // for as long as `dir` is borrowed.
        let rc = unsafe { libc::fstatvfs(dir.as_raw_fd(), st.as_mut_ptr()) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: initialised by the successful call above.
        let st = unsafe { st.assume_init() };
        #[allow(clippy::unnecessary_cast)] // the field types differ between libc targets
        let (avail, frsize, files, favail, flags) = (
            st.f_bavail as u64,
            st.f_frsize as u64,
            st.f_files as u64,
            st.f_favail as u64,
            st.f_flag as u64,
        );
        #[allow(clippy::unnecessary_cast)]
        let rdonly = libc::ST_RDONLY as u64;
        Ok(Free {
            bytes: avail.saturating_mul(frsize),
            files: (files > 0).then_some(favail),
            read_only: flags & rdonly != 0,
        })
    }

    /// Whether a message of `size` bytes (0: not declared) may begin, with `reserve` bytes left after it.
    pub fn admits(&self, size: u64, reserve: u64) -> bool {
        self.bytes >= size.saturating_add(reserve) && !self.short_of_files(reserve)
    }

    /// Short whatever the message: less than `reserve` left, or almost no inodes.
    pub fn is_short(&self, reserve: u64) -> bool {
        self.bytes < reserve || self.short_of_files(reserve)
    }

    fn short_of_files(&self, reserve: u64) -> bool {
        // `min_free_space = 0` turns the whole check off, inodes included.
        reserve > 0 && self.files.is_some_and(|f| f < MIN_FREE_FILES)
    }
}

/// The state dir's filesystem as `relay status` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DiskReport {
    pub free_bytes: u64,
    /// `None` where the filesystem has no fixed number of inodes.
    pub free_files: Option<u64>,
    pub min_free_space: u64,
    /// Less than `min_free_space` (or almost no inodes) is left: the daemon refuses new mail with 452.
    pub short: bool,
    /// The filesystem is mounted read-only: the daemon refuses new mail with 451.
    pub read_only: bool,
}

impl DiskReport {
    /// The figures of the filesystem holding `dir`; `None` when they cannot be read (no state dir yet).
    pub fn of(dir: &std::path::Path, min_free_space: u64) -> Option<DiskReport> {
        let free = Free::of(&File::open(dir).ok()?).ok()?;
        Some(DiskReport::new(free, min_free_space))
    }

    pub fn new(free: Free, min_free_space: u64) -> DiskReport {
        DiskReport {
            free_bytes: free.bytes,
            free_files: free.files,
            min_free_space,
            short: free.is_short(min_free_space),
            read_only: free.read_only,
        }
    }

    /// The free space in words, inodes too when they are what is short.
    pub fn described(&self) -> String {
        let files = match self.free_files {
            Some(f) if f < MIN_FREE_FILES => format!(" and {f} free inodes"),
            _ => String::new(),
        };
        format!("{} free{files}", rounded(self.free_bytes))
    }
}

/// Bytes as people read them on a disk: "812 KiB", "3.4 GiB".
pub fn rounded(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 || value >= 100.0 {
        format!("{value:.0} {}", UNITS[unit])
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// The queue's room, shared by every session; says in the log when the filesystem becomes short and when it
/// has room again, once each, not at every refused MAIL.
#[derive(Debug)]
pub struct Room {
    dir: File,
    short: AtomicBool,
    read_only: AtomicBool,
}

/// What [`Room::admits`] says of a message about to begin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Admitted,
    /// Too little space (or too few inodes): RFC 3463's 4.3.1, "mail system full".
    Full,
    /// The filesystem is read-only: nothing can be stored until it is writable again.
    ReadOnly,
}

impl Room {
    pub fn new(dir: File) -> Room {
        Room {
            dir,
            short: AtomicBool::new(false),
            read_only: AtomicBool::new(false),
        }
    }

    /// Whether a message of `size` bytes (0: not declared) may begin with `reserve` bytes to spare. When the
    /// figures cannot be read, it may: the write itself still fails safely on a full disk.
    pub fn admits(&self, size: u64, reserve: u64) -> Admission {
        let free = match Free::of(&self.dir) {
            Ok(free) => free,
            Err(e) => {
                tracing::debug!(error = %e, "cannot read the queue filesystem's free space");
                return Admission::Admitted;
            }
        };
        let read_only = free.read_only;
        if read_only != self.read_only.swap(read_only, Ordering::Relaxed) {
            if read_only {
                tracing::error!(
                    relay_event = "disk_read_only",
                    "the state dir's filesystem is read-only (remounted after disk errors?): new mail is refused with 451 4.3.0 until it is writable again"
                );
            } else {
                tracing::info!(
                    relay_event = "disk_read_only",
                    "the state dir's filesystem is writable again: new mail is taken"
                );
            }
        }
        if read_only {
            return Admission::ReadOnly;
        }
        let short = free.is_short(reserve);
        if short != self.short.swap(short, Ordering::Relaxed) {
            let bytes = rounded(free.bytes);
            let files = free.files.map_or("-".to_string(), |f| f.to_string());
            let reserve = crate::config::ByteSize(reserve);
            if short {
                tracing::warn!(relay_event = "disk_full", free = %bytes, free_files = %files, min_free_space = %reserve, "the state dir's filesystem is nearly full: new mail is refused with 452 4.3.1 until space is freed (queued mail is still delivered; [queue] min_free_space sets the margin)");
            } else {
                tracing::info!(relay_event = "disk_full", free = %bytes, free_files = %files, "the state dir's filesystem has room again: new mail is taken");
            }
        }
        if free.admits(size, reserve) {
            Admission::Admitted
        } else {
            Admission::Full
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_declared_size_and_the_margin_must_both_fit() {
        let free = Free {
            bytes: 10 << 20,
            files: Some(1000),
            read_only: false,
        };
        assert!(free.admits(0, 1 << 20));
        assert!(free.admits(9 << 20, 1 << 20));
        assert!(!free.admits((9 << 20) + 1, 1 << 20));
        assert!(!free.admits(u64::MAX, 1 << 20));
        assert!(!free.is_short(1 << 20));
        assert!(free.is_short(11 << 20));
        // Inodes run out before bytes do (a queue of many small messages).
        let no_inodes = Free {
            bytes: 10 << 30,
            files: Some(3),
            read_only: false,
        };
        assert!(!no_inodes.admits(0, 1 << 20));
        assert!(no_inodes.is_short(1 << 20));
        // A filesystem without an inode count, and the check turned off.
        let btrfs = Free {
            bytes: 10 << 30,
            files: None,
            read_only: false,
        };
        assert!(btrfs.admits(0, 1 << 20));
        assert!(no_inodes.admits(0, 0));
        assert!(!no_inodes.is_short(0));
    }

    #[test]
    fn sizes_are_rounded_for_people() {
        assert_eq!(rounded(0), "0 B");
        assert_eq!(rounded(1023), "1023 B");
        assert_eq!(rounded(1536), "1.5 KiB");
        assert_eq!(rounded(700 << 20), "700 MiB");
        assert_eq!(rounded((34 << 30) + (400 << 20)), "34.4 GiB");
    }

    #[test]
    fn reads_the_figures_of_a_real_filesystem() {
        let dir = tempfile::tempdir().unwrap();
        let free = Free::of(&File::open(dir.path()).unwrap()).unwrap();
        assert!(free.bytes > 0);
    }
}
