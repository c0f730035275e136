//! How relay writes under its state dir: every file 0640 and every directory 0750, whatever the umask of whoever
//! runs it (`relay serve` from a shell, `relay queue retry` from root's). Delivery states, account reports and
//! sending counts name mailboxes, recipients and upstream replies: they are for relay and its group, never for
//! other users of the machine.
//!
//! The spool (`queue/*.msg`) and the token store create their files with the same modes themselves; everything
//! else goes through here. When root writes (the CLI run with sudo), what it creates is given to the owner of
//! the directory it is in, so that the daemon's user can still read and replace it.

use std::fs::{DirBuilder, OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use atomic_write_file::AtomicWriteFile;
use atomic_write_file::unix::OpenOptionsExt as _;

/// Every file relay writes under the state dir.
pub const FILE_MODE: u32 = 0o640;
/// Every directory relay makes under the state dir.
pub const DIR_MODE: u32 = 0o750;

/// Creates `dir` and the parents it lacks at 0750: a mode given at creation, which a umask can only make
/// stricter. Directories root makes go to the owner of the one they are made in.
pub fn create_dir_all(dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    let missing: Vec<&Path> = dir
        .ancestors()
        .take_while(|d| !d.as_os_str().is_empty() && !d.exists())
        .collect();
    for d in missing.into_iter().rev() {
        match DirBuilder::new().mode(DIR_MODE).create(d) {
            // lchown: should the new directory be swapped for a symlink meanwhile, only the link changes owner.
            Ok(()) => give_to_parent_owner(d, |uid, gid| std::os::unix::fs::lchown(d, uid, gid)),
            // Made by another process meanwhile (the daemon and a CLI command): as good.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && d.is_dir() => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// An atomic replacement of `path` (a temp file, renamed over it on `commit`), at 0640 exactly: not the umask's
/// mode, and not the mode of the file it replaces, which an older relay may have left readable by all.
pub fn atomic(path: &Path) -> io::Result<AtomicWriteFile> {
    let file = AtomicWriteFile::options().preserve_mode(false).open(path)?;
    // Set on the temp file, so the name never points at a file with another mode.
    file.as_file()
        .set_permissions(Permissions::from_mode(FILE_MODE))?;
    give_to_parent_owner(path, |uid, gid| {
        std::os::unix::fs::fchown(file.as_file(), uid, gid)
    });
    Ok(file)
}

/// Replaces `path` with `bytes` through a temp file and a rename, creating its directory if needed. Not fsynced:
/// for reports, where a write lost to a power cut costs nothing.
pub fn replace(path: &Path, bytes: &[u8]) -> io::Result<()> {
    if let Some(dir) = path.parent() {
        create_dir_all(dir)?;
    }
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    let tmp = path.with_file_name(name);
    write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

/// Writes `bytes` into `path` in place (created or truncated), at 0640 exactly: for a file whose change, not
/// its content, is the message (the retry trigger).
pub fn write(path: &Path, bytes: &[u8]) -> io::Result<()> {
    // Never through a symlink, and never into a file with other names: root runs some commands, and whoever
    // can write in the state dir (the service's user) must not be able to point this write, its chmod and
    // its chown at another file (`ln -s /etc/passwd .retry`). Truncated only once that is checked.
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(FILE_MODE)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() || meta.nlink() != 1 {
        return Err(io::Error::other(format!(
            "{}: not a plain file of its own (a link?); refusing to write it",
            path.display()
        )));
    }
    file.set_len(0)?;
    // A file left by an older relay or a crash keeps its mode when opened: set it, where it differs.
    if meta.mode() & 0o7777 != FILE_MODE {
        file.set_permissions(Permissions::from_mode(FILE_MODE))?;
    }
    give_to_parent_owner(path, |uid, gid| std::os::unix::fs::fchown(&file, uid, gid));
    file.write_all(bytes)
}

/// The directories relay makes in the state dir (the spool's, the token store's, the reports' and the sending
/// counts'), for [`tighten`].
const SUBDIRS: [&str; 6] = ["queue", "dead", "quarantine", "tokens", "accounts", "rate"];

/// Closes to others, at start, the directories an older relay made under a looser umask (0755, or 0777 under
/// umask 000): the files it left in them, written before their modes were set, are then out of others' reach
/// too. Only relay's own directories: the state dir itself is the operator's (systemd's `StateDirectoryMode=`).
/// The token files in `tokens/` likewise (one restored from a backup, copied by hand): each holds a grant. A
/// state dir others may write to is said (anyone could rename relay's directories away): that is the operator's to
/// change. Never fails the start; what cannot be changed is logged.
pub fn tighten(state_dir: &Path) {
    if let Ok(meta) = std::fs::metadata(state_dir)
        && meta.mode() & 0o002 != 0
        && meta.mode() & 0o1000 == 0
    {
        tracing::warn!(path = %state_dir.display(), "the state dir is writable by others (mode {:04o}): anyone on this machine could replace its token files and queue; run `chmod o-w {}`", meta.mode() & 0o7777, state_dir.display());
    }
    tighten_token_files(&state_dir.join("tokens"));
    for name in SUBDIRS {
        let dir = state_dir.join(name);
        let Ok(meta) = std::fs::symlink_metadata(&dir) else {
            continue;
        };
        let mode = meta.mode() & 0o7777;
        // Only the permission bits beyond 0750 go: a setgid bit an operator set (group inheritance) stays.
        let beyond = mode & 0o777 & !DIR_MODE;
        if !meta.is_dir() || beyond == 0 {
            continue;
        }
        let tight = mode & !beyond;
        match std::fs::set_permissions(&dir, Permissions::from_mode(tight)) {
            Ok(()) => {
                tracing::info!(path = %dir.display(), "the directory was mode {mode:04o}, more open than 0750; it is {tight:04o} now")
            }
            Err(e) => {
                tracing::warn!(path = %dir.display(), error = %e, "the directory is mode {mode:04o}, more open than 0750, and cannot be changed; run `chmod g-w,o-rwx {}`", dir.display())
            }
        }
    }
}

/// Token files more open than [`FILE_MODE`] are closed to it (see [`tighten`]).
fn tighten_token_files(tokens: &Path) {
    let Ok(entries) = std::fs::read_dir(tokens) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        // Opened without following a link, and changed through that descriptor: under `sudo relay serve`, a link
        // put in place of a token file must not make root change the mode of what it points at.
        let Ok(file) = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&path)
        else {
            continue;
        };
        let Ok(meta) = file.metadata() else {
            continue;
        };
        let mode = meta.mode() & 0o777;
        if !meta.is_file() || mode & !FILE_MODE == 0 {
            continue;
        }
        let tight = mode & FILE_MODE;
        match file.set_permissions(Permissions::from_mode(tight)) {
            Ok(()) => {
                tracing::warn!(path = %path.display(), "the token file was mode {mode:04o}, more open than 0640 (its grant may have been read by others; `relay authorize` makes a new one); it is {tight:04o} now")
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "the token file is mode {mode:04o}, more open than 0640, and cannot be changed; run `chmod 640 {}`", path.display())
            }
        }
    }
}

/// As root, gives `path` (through `chown`) to the owner of its directory; as anyone else, does nothing (files
/// are theirs already, and chown would fail). Best effort: a write never fails over its owner (root squashed on
/// NFS cannot chown), and the mode already keeps others out.
/// When root made `file` (at `path`), gives it to the owner of the directory it is in: the daemon's user must
/// be able to open what `sudo relay …` left in its state dir.
pub fn give_file_to_parent_owner(path: &Path, file: &std::fs::File) {
    give_to_parent_owner(path, |uid, gid| std::os::unix::fs::fchown(file, uid, gid));
}

fn give_to_parent_owner(
    path: &Path,
    chown: impl FnOnce(Option<u32>, Option<u32>) -> io::Result<()>,
) {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return;
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let given = std::fs::metadata(parent).and_then(|o| chown(Some(o.uid()), Some(o.gid())));
    if let Err(e) = given {
        tracing::warn!(path = %path.display(), error = %e, "cannot give the file to its directory's owner; the service's user may not be able to read it");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode_of(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().mode() & 0o7777
    }

    /// A symlink or a hard link planted where relay writes is refused, and the file it points at is untouched
    /// (root runs `relay queue retry`; the state dir is writable by the service's user).
    #[test]
    fn a_planted_link_is_never_written_through() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("passwd");
        std::fs::write(&target, b"root:x:0:0").unwrap();
        std::fs::set_permissions(&target, Permissions::from_mode(0o644)).unwrap();
        let sym = dir.path().join(".retry");
        std::os::unix::fs::symlink(&target, &sym).unwrap();
        assert!(write(&sym, b"now").is_err());
        let hard = dir.path().join("report.json.tmp");
        std::fs::hard_link(&target, &hard).unwrap();
        assert!(replace(&dir.path().join("report.json"), b"{}").is_err());
        assert_eq!(std::fs::read(&target).unwrap(), b"root:x:0:0");
        assert_eq!(mode_of(&target), 0o644);
    }

    /// The modes are exact whatever the file was before: a report an older relay wrote 0666 comes back 0640, and
    /// so does a temp file a crash left behind.
    #[test]
    fn files_are_0640_and_directories_0750_whatever_was_there() {
        let dir = tempfile::tempdir().unwrap();
        let deep = dir.path().join("a/b");
        create_dir_all(&deep).unwrap();
        for d in [dir.path().join("a"), deep.clone()] {
            let mode = mode_of(&d);
            assert_eq!(mode & !DIR_MODE, 0, "{}: {mode:o}", d.display());
        }
        create_dir_all(&deep).unwrap();

        let report = deep.join("r.json");
        for p in [report.clone(), deep.join("r.json.tmp")] {
            std::fs::write(&p, b"old").unwrap();
            std::fs::set_permissions(&p, Permissions::from_mode(0o666)).unwrap();
        }
        replace(&report, b"new").unwrap();
        assert_eq!(mode_of(&report), FILE_MODE);
        assert_eq!(std::fs::read(&report).unwrap(), b"new");
        assert!(!deep.join("r.json.tmp").exists());

        std::fs::set_permissions(&report, Permissions::from_mode(0o666)).unwrap();
        let mut f = atomic(&report).unwrap();
        f.write_all(b"atomic").unwrap();
        f.commit().unwrap();
        assert_eq!(mode_of(&report), FILE_MODE);
        assert_eq!(std::fs::read(&report).unwrap(), b"atomic");

        std::fs::set_permissions(&report, Permissions::from_mode(0o604)).unwrap();
        write(&report, b"in place").unwrap();
        assert_eq!(mode_of(&report), FILE_MODE);
        assert_eq!(std::fs::read(&report).unwrap(), b"in place");
    }

    /// Relay's own directories and token files left open by an older relay are closed to others at start;
    /// stricter ones, the state dir itself and whatever else is in it are left as they are.
    #[test]
    fn tighten_closes_relays_directories_and_token_files_only() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path();
        std::fs::set_permissions(state, Permissions::from_mode(0o755)).unwrap();
        for (name, mode) in [
            ("accounts", 0o777),
            ("rate", 0o755),
            ("tokens", 0o700),
            ("dead", 0o2775),
            ("mine", 0o777),
        ] {
            std::fs::create_dir(state.join(name)).unwrap();
            std::fs::set_permissions(state.join(name), Permissions::from_mode(mode)).unwrap();
        }
        for (name, mode) in [("office.json", 0o666), ("gmail.json", 0o600)] {
            let file = state.join("tokens").join(name);
            std::fs::write(&file, "{}").unwrap();
            std::fs::set_permissions(&file, Permissions::from_mode(mode)).unwrap();
        }
        tighten(state);
        assert_eq!(mode_of(&state.join("tokens/office.json")), 0o640);
        assert_eq!(mode_of(&state.join("tokens/gmail.json")), 0o600);
        assert_eq!(mode_of(&state.join("accounts")), 0o750);
        assert_eq!(mode_of(&state.join("rate")), 0o750);
        assert_eq!(mode_of(&state.join("tokens")), 0o700);
        assert_eq!(mode_of(&state.join("dead")), 0o2750);
        assert_eq!(mode_of(&state.join("mine")), 0o777);
        assert_eq!(mode_of(state), 0o755);
    }
}
