//! `STATE_DIR/tokens/ACCOUNT.json`: one file per account, mode 0640, replaced atomically (temp file, fsync,
//! rename, fsync dir). Written by the daemon and by `relay authorize`, which may run as root: the file then
//! goes to the state dir's owner, so that the daemon's user can still read it.
//!
//! With `token_encryption`, the file is sealed (`seal.rs`); a plain file found then is read, and sealed at its next
//! write (at the latest when the daemon starts).

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use super::seal::{Envelope, OpenError, TokenKey};
use crate::config::Config;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a token file: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error(transparent)]
    Key(#[from] super::seal::KeyError),
    #[error(
        "{path} is encrypted, but token_encryption is not set: set it to the key the file was written with, or remove the file and run `relay authorize {account}`"
    )]
    NoKey { path: PathBuf, account: String },
    #[error(
        "{path} cannot be decrypted with the token key from {origin}: it was written with another key (or changed since). Restore that key, or remove the file and run `relay authorize {account}`"
    )]
    WrongKey {
        path: PathBuf,
        origin: String,
        account: String,
    },
    #[error("{path}: {format}, which this relay does not know: it was written by a newer relay")]
    UnknownFormat { path: PathBuf, format: String },
}

impl StoreError {
    /// The file cannot be opened with the key relay has (or has not): a setting to fix, not a passing failure.
    pub fn is_key_problem(&self) -> bool {
        matches!(
            self,
            StoreError::Key(_)
                | StoreError::NoKey { .. }
                | StoreError::WrongKey { .. }
                | StoreError::UnknownFormat { .. }
        )
    }
}

/// An account's tokens and what the daemon learnt about them.
#[derive(Clone)]
pub struct StoredTokens {
    pub access_token: SecretString,
    pub expires_at: SystemTime,
    pub obtained_at: SystemTime,
    pub refresh_token: Option<SecretString>,
    /// When the refresh token was last used (the keep-alive counts from here).
    pub last_refresh: Option<SystemTime>,
    /// `invalid_grant` was seen: only `relay authorize` helps.
    pub needs_authorization: bool,
    pub last_error: Option<String>,
}

impl std::fmt::Debug for StoredTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredTokens")
            .field("access_token", &"[redacted]")
            .field(
                "expires_at",
                &humantime::format_rfc3339_seconds(self.expires_at),
            )
            .field(
                "refresh_token",
                &self.refresh_token.as_ref().map(|_| "[redacted]"),
            )
            .field("needs_authorization", &self.needs_authorization)
            .finish()
    }
}

/// The file's shape. Secrets are plain strings only here, on their way to and from the 0640 file.
#[derive(Serialize, Deserialize)]
struct File {
    access_token: String,
    #[serde(with = "humantime_serde")]
    expires_at: SystemTime,
    #[serde(with = "humantime_serde")]
    obtained_at: SystemTime,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    refresh_token: Option<String>,
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    last_refresh: Option<SystemTime>,
    #[serde(default)]
    needs_authorization: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    last_error: Option<String>,
}

/// A renewed grant the daemon holds in memory only (see [`TokenStore::mark_unsaved`]).
#[derive(Debug, Serialize, Deserialize)]
pub struct Unsaved {
    #[serde(with = "humantime_serde")]
    pub since: SystemTime,
    pub why: String,
    /// The daemon that held it has stopped (see [`TokenStore::unsaved_lost`]).
    #[serde(default)]
    pub lost: bool,
    /// The process that holds it: the daemon, or `relay test`, whose grant goes when it exits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
}

impl Unsaved {
    /// Whether the grant may still be held: not said lost, and its process (if known) still running.
    pub fn may_be_held(&self) -> bool {
        !self.lost && self.pid.is_none_or(process_runs)
    }
}

/// Whether a process `pid` runs (one of another user's counts). A pid the system gave to a new process since
/// reads as running: the mark then stays "held" until the next write of the token file, as it did before marks
/// named their process.
fn process_runs(pid: u32) -> bool {
    // 0 (an edited or damaged mark) would ask about our own process group.
    let Some(pid) = i32::try_from(pid).ok().filter(|p| *p > 0) else {
        return false;
    };
    // SAFETY: signal 0 sends nothing; it only checks that the process exists and may be signalled.
    let signalled = unsafe { libc::kill(pid, 0) } == 0;
    signalled || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

#[derive(Debug, Clone)]
pub struct TokenStore {
    dir: PathBuf,
    /// Seals every file written, and opens sealed ones; without, files are plain.
    key: Option<Arc<TokenKey>>,
}

impl TokenStore {
    /// A store of plain files.
    pub fn new(state_dir: &Path) -> TokenStore {
        TokenStore {
            dir: state_dir.join("tokens"),
            key: None,
        }
    }

    /// A store that seals its files with `key`.
    pub fn sealed(state_dir: &Path, key: Arc<TokenKey>) -> TokenStore {
        TokenStore {
            key: Some(key),
            ..TokenStore::new(state_dir)
        }
    }

    /// The store the config asks for: sealed with its `token_encryption` key, if it has one.
    pub fn for_config(config: &Config) -> Result<TokenStore, StoreError> {
        Ok(match &config.token_encryption {
            Some(setting) => {
                TokenStore::sealed(&config.state_dir, Arc::new(TokenKey::load(setting)?))
            }
            None => TokenStore::new(&config.state_dir),
        })
    }

    pub fn path(&self, account: &str) -> PathBuf {
        self.dir.join(format!("{account}.json"))
    }

    /// `STATE_DIR/accounts/ACCOUNT.unsaved`: the daemon holds a renewed grant that it could not write to the token
    /// file, since when and why. For `relay status`, which reads files; beside the accounts' other reports, since
    /// the tokens directory is usually what cannot be written.
    fn unsaved_path(&self, account: &str) -> PathBuf {
        let state_dir = self.dir.parent().unwrap_or(&self.dir);
        state_dir
            .join("accounts")
            .join(format!("{account}.unsaved"))
    }

    /// Says (once, keeping the first time) that the account's renewed grant is in memory only.
    pub fn mark_unsaved(&self, account: &str, why: &str) {
        if self.unsaved(account).is_some_and(|u| u.may_be_held()) {
            return;
        }
        self.write_unsaved(
            account,
            &Unsaved {
                since: SystemTime::now(),
                why: why.to_string(),
                lost: false,
                pid: Some(std::process::id()),
            },
        );
    }

    /// At the daemon's start: a grant an earlier run held in memory only went with it.
    pub fn unsaved_lost(&self, account: &str) {
        if let Some(mut u) = self.unsaved(account).filter(|u| !u.lost) {
            u.lost = true;
            self.write_unsaved(account, &u);
        }
    }

    fn write_unsaved(&self, account: &str, doc: &Unsaved) {
        let path = self.unsaved_path(account);
        let written = path
            .parent()
            .map_or(Ok(()), crate::state_files::create_dir_all)
            .and_then(|()| {
                let doc = serde_json::to_vec(doc).unwrap_or_default();
                crate::runtime::off_worker(|| crate::state_files::replace(&path, &doc))
            });
        if let Err(e) = written {
            tracing::warn!(relay_account = %account, path = %path.display(), error = %e, "cannot record for relay status that the account's renewed grant is in memory only");
        }
    }

    /// The grant is in the file again.
    pub fn clear_unsaved(&self, account: &str) {
        let _ = std::fs::remove_file(self.unsaved_path(account));
    }

    /// Whether the daemon said its renewed grant is in memory only (see [`Self::mark_unsaved`]).
    pub fn unsaved(&self, account: &str) -> Option<Unsaved> {
        crate::small_files::report(&self.unsaved_path(account))
    }

    /// The modification time of the account's file, to notice a new grant from `relay authorize`.
    pub fn mtime(&self, account: &str) -> Option<SystemTime> {
        std::fs::metadata(self.path(account))
            .and_then(|m| m.modified())
            .ok()
    }

    pub fn load(&self, account: &str) -> Result<Option<StoredTokens>, StoreError> {
        Ok(self.load_hashed(account)?.0)
    }

    /// The file's bytes (None if there is none). Token files are a few KiB; a larger one is an error.
    fn read_bytes(&self, account: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let path = self.path(account);
        match crate::small_files::read_own(&path, crate::small_files::SMALL) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            // Far too large to be tokens: damaged, like a file that does not parse.
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => Err(StoreError::Corrupt {
                path,
                reason: e.to_string(),
            }),
            Err(source) => Err(StoreError::Io { path, source }),
        }
    }

    /// The tokens, and a hash of the file they came from: what [`save_if_unchanged`](Self::save_if_unchanged)
    /// compares with. (Modification times are too coarse: two writes within one clock tick share one.)
    pub fn load_hashed(
        &self,
        account: &str,
    ) -> Result<(Option<StoredTokens>, Option<blake3::Hash>), StoreError> {
        let path = self.path(account);
        let Some(bytes) = self.read_bytes(account)? else {
            return Ok((None, None));
        };
        let hash = blake3::hash(&bytes);
        let tokens = self.decode(account, &path, &bytes)?;
        Ok((Some(tokens), Some(hash)))
    }

    fn decode(&self, account: &str, path: &Path, bytes: &[u8]) -> Result<StoredTokens, StoreError> {
        let plain = self.unseal(account, path, bytes)?;
        // Where and what kind, not serde's words: those quote the value they choke on, which may be a token.
        let f: File = serde_json::from_slice(&plain).map_err(|e| StoreError::Corrupt {
            path: path.to_path_buf(),
            reason: format!(
                "not a token file ({:?} error at line {}, column {})",
                e.classify(),
                e.line(),
                e.column()
            ),
        })?;
        Ok(StoredTokens {
            access_token: SecretString::from(f.access_token),
            expires_at: f.expires_at,
            obtained_at: f.obtained_at,
            refresh_token: f.refresh_token.map(SecretString::from),
            last_refresh: f.last_refresh,
            needs_authorization: f.needs_authorization,
            last_error: f.last_error,
        })
    }

    /// The plain token file in `bytes`: opened if sealed, as it is if not.
    fn unseal<'a>(
        &self,
        account: &str,
        path: &Path,
        bytes: &'a [u8],
    ) -> Result<std::borrow::Cow<'a, [u8]>, StoreError> {
        let Some(envelope) = Envelope::parse(bytes) else {
            return Ok(bytes.into());
        };
        let Some(key) = &self.key else {
            return Err(StoreError::NoKey {
                path: path.to_path_buf(),
                account: account.to_string(),
            });
        };
        match key.open(account, &envelope) {
            Ok(plain) => Ok(plain.into()),
            Err(OpenError::WrongKey) => Err(StoreError::WrongKey {
                path: path.to_path_buf(),
                origin: key.origin.clone(),
                account: account.to_string(),
            }),
            Err(OpenError::Unknown(format)) => Err(StoreError::UnknownFormat {
                path: path.to_path_buf(),
                format,
            }),
        }
    }

    /// Checks that the account's file opens with this store's key, and seals it if it is still plain. The daemon
    /// runs this at start, so that turning encryption on seals every file at once, and a missing or wrong key is
    /// found before any mail waits on it.
    pub fn check(&self, account: &str) -> Result<(), StoreError> {
        let (tokens, read) = self.load_hashed(account)?;
        let (Some(tokens), Some(_)) = (tokens, &self.key) else {
            return Ok(());
        };
        let _lock = self.lock(account)?;
        // Only a plain file still as it was read: `relay authorize` may have written a sealed one meanwhile.
        if let Some(bytes) = self.read_bytes(account)?
            && Some(blake3::hash(&bytes)) == read
            && Envelope::parse(&bytes).is_none()
        {
            // The file's own grant, sealed as it is: not a grant held in memory, so a mark that one is unsaved (a
            // running daemon's, at a reload, or a stopped one's, which the start then says is lost) stays.
            self.write_file(account, &tokens)?;
        }
        Ok(())
    }

    /// Replaces the account's file, unless it changed since it was read (its hash is no longer `read`): then
    /// someone else (`relay authorize`) stored a newer grant, and it wins. Returns the new file's hash if it was
    /// written, None if not. The check and the write hold the account's lock, as [`save`](Self::save) does.
    pub fn save_if_unchanged(
        &self,
        account: &str,
        t: &StoredTokens,
        read: Option<blake3::Hash>,
    ) -> Result<Option<blake3::Hash>, StoreError> {
        let _lock = self.lock(account)?;
        if self.read_bytes(account)?.map(|b| blake3::hash(&b)) != read {
            return Ok(None);
        }
        self.write(account, t).map(Some)
    }

    /// Renames a damaged file to `ACCOUNT.json.damaged-SECONDS`, to be looked at; the account then has no tokens
    /// until its next grant is saved. Checked again under the lock: a file that `relay authorize` (or another
    /// process) replaced since it was read is left, and `None` returned.
    pub fn set_aside(&self, account: &str) -> Result<Option<PathBuf>, StoreError> {
        let _lock = self.lock(account)?;
        let path = self.path(account);
        let damaged = match self.read_bytes(account) {
            Ok(Some(bytes)) => self.decode(account, &path, &bytes),
            Ok(None) => return Ok(None),
            Err(e) => Err(e),
        };
        match damaged {
            Err(StoreError::Corrupt { .. }) => {}
            Err(e @ StoreError::Io { .. }) => return Err(e),
            _ => return Ok(None),
        }
        let secs = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let aside = self.dir.join(format!("{account}.json.damaged-{secs}"));
        std::fs::rename(&path, &aside).map_err(|source| StoreError::Io { path, source })?;
        Ok(Some(aside))
    }

    /// Whether this process may write token files (before `relay authorize` asks a person to sign in: a grant
    /// approved and then not saved is lost).
    pub fn check_writable(&self) -> Result<(), StoreError> {
        use std::os::unix::ffi::OsStrExt;
        let io = |source| StoreError::Io {
            path: self.dir.clone(),
            source,
        };
        self.create_dir().map_err(io)?;
        let path = std::ffi::CString::new(self.dir.as_os_str().as_bytes())
            .map_err(|e| io(std::io::Error::other(e)))?;
        // SAFETY: access reads the NUL-terminated path we own.
        if unsafe { libc::access(path.as_ptr(), libc::W_OK | libc::X_OK) } != 0 {
            return Err(io(std::io::Error::last_os_error()));
        }
        Ok(())
    }

    pub fn save(&self, account: &str, t: &StoredTokens) -> Result<(), StoreError> {
        let _lock = self.lock(account)?;
        self.write(account, t).map(|_| ())
    }

    /// An exclusive lock on `tokens/.ACCOUNT.lock`, held while a file is compared and replaced: the daemon and
    /// `relay authorize` are different processes, and may be different users (root and the daemon's). If the
    /// lock file cannot be opened, the hash comparison alone has to do.
    fn lock(&self, account: &str) -> Result<Option<std::fs::File>, StoreError> {
        let Some(file) = self.lock_file(&format!(".{account}.lock"))? else {
            return Ok(None);
        };
        match crate::runtime::off_worker(|| flock_within(&file, SAVE_LOCK_WAIT)) {
            Ok(()) => Ok(Some(file)),
            Err(source) => Err(StoreError::Io {
                path: self.dir.join(format!(".{account}.lock")),
                source,
            }),
        }
    }

    /// `tokens/.ACCOUNT.renew`, to be locked across a whole renewal, the token request and the save (see
    /// [`try_flock`]). Apart from the save's lock, which the renewal takes inside it. None if it cannot be
    /// opened (said in the log): the renewal then goes on without it, as before there was one.
    pub fn renewal_lock_file(&self, account: &str) -> Option<std::fs::File> {
        self.lock_file(&format!(".{account}.renew"))
            .unwrap_or_else(|e| {
                tracing::warn!(relay_account = %account, error = %e, "cannot make the token directory for the renewal lock; renewing without it");
                None
            })
    }

    /// Opens (or creates) a lock file in `tokens/`. It is opened read-only (flock needs no more) and, created by
    /// root, given to the state dir's owner like the token file.
    fn lock_file(&self, name: &str) -> Result<Option<std::fs::File>, StoreError> {
        use std::os::unix::fs::OpenOptionsExt;
        let path = self.dir.join(name);
        self.create_dir().map_err(|source| StoreError::Io {
            path: path.clone(),
            source,
        })?;
        match std::fs::File::open(&path) {
            Ok(f) => Ok(Some(f)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let created = std::fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .mode(0o640)
                    .open(&path);
                let f = match created {
                    Ok(f) => f,
                    Err(e) => {
                        tracing::warn!(path = %path.display(), error = %e, "cannot create the token lock file; going on without it");
                        return Ok(None);
                    }
                };
                // SAFETY: geteuid has no preconditions.
                if unsafe { libc::geteuid() } == 0 {
                    let given = std::fs::metadata(self.dir.parent().unwrap_or(&self.dir))
                        .and_then(|o| std::os::unix::fs::fchown(&f, Some(o.uid()), Some(o.gid())));
                    if let Err(e) = given {
                        tracing::warn!(path = %path.display(), error = %e, "cannot give the token lock file to the state dir's owner");
                    }
                }
                Ok(Some(f))
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot open the token lock file; going on without it");
                Ok(None)
            }
        }
    }

    /// Creates `tokens/` (0750) if needed; when root creates it, it goes to the state dir's owner.
    fn create_dir(&self) -> std::io::Result<()> {
        if self.dir.exists() {
            return Ok(());
        }
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o750)
            .create(&self.dir)?;
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            let owner = std::fs::metadata(self.dir.parent().unwrap_or(&self.dir))?;
            std::os::unix::fs::chown(&self.dir, Some(owner.uid()), Some(owner.gid()))?;
        }
        Ok(())
    }

    fn write(&self, account: &str, t: &StoredTokens) -> Result<blake3::Hash, StoreError> {
        let hash = self.write_file(account, t)?;
        // The daemon's grant is saved, or `relay authorize` stored a new one: nothing is in memory only.
        self.clear_unsaved(account);
        Ok(hash)
    }

    fn write_file(&self, account: &str, t: &StoredTokens) -> Result<blake3::Hash, StoreError> {
        let path = self.path(account);
        let io = |source| StoreError::Io {
            path: path.clone(),
            source,
        };
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        // The daemon's user writes here too (every refresh replaces the file).
        self.create_dir().map_err(io)?;
        let owner = std::fs::metadata(self.dir.parent().unwrap_or(&self.dir)).map_err(io)?;
        let plain = serde_json::to_vec_pretty(&File {
            access_token: t.access_token.expose_secret().to_string(),
            expires_at: t.expires_at,
            obtained_at: t.obtained_at,
            refresh_token: t
                .refresh_token
                .as_ref()
                .map(|r| r.expose_secret().to_string()),
            last_refresh: t.last_refresh,
            needs_authorization: t.needs_authorization,
            last_error: t.last_error.clone(),
        })
        .map_err(|e| io(e.into()))?;
        let body = match &self.key {
            Some(key) => {
                let sealed = key.seal(account, &plain).map_err(io)?;
                // Said once per file: the next write finds it sealed.
                if let Ok(old) = crate::small_files::read_own(&path, crate::small_files::SMALL)
                    && Envelope::parse(&old).is_none()
                {
                    tracing::info!(relay_account = %account, path = %path.display(), "the token file was plain; it is encrypted from now on");
                }
                sealed
            }
            None => plain,
        };
        // The write and its flushes wait on the disk, a busy one for long.
        let owner = root.then_some(&owner);
        crate::runtime::off_worker(|| write_atomically(&path, &body, owner)).map_err(io)?;
        Ok(blake3::hash(&body))
    }
}

/// Writes `body` as the token file at `path`, 0640 and given to `owner` (when root writes it), atomically and
/// flushed.
fn write_atomically(
    path: &Path,
    body: &[u8],
    owner: Option<&std::fs::Metadata>,
) -> std::io::Result<()> {
    let mut file = atomic_write_file::AtomicWriteFile::open(path)?;
    // Set explicitly: the mode given at creation would be cut by the umask, and this must be exact.
    file.as_file()
        .set_permissions(std::fs::Permissions::from_mode(0o640))?;
    if let Some(owner) = owner {
        std::os::unix::fs::fchown(file.as_file(), Some(owner.uid()), Some(owner.gid()))?;
    }
    file.write_all(body)?;
    file.commit()
}

/// An exclusive flock on `file`, released when it is closed; Ok(false) at once if another open file holds it.
fn flock(file: &std::fs::File) -> std::io::Result<bool> {
    use std::os::fd::AsRawFd;
    // SAFETY: the descriptor is open for the duration of the call.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    match std::io::Error::last_os_error() {
        // EINTR: a signal came; looked at again like a held lock.
        e if e.kind() == std::io::ErrorKind::WouldBlock
            || e.kind() == std::io::ErrorKind::Interrupted =>
        {
            Ok(false)
        }
        e => Err(e),
    }
}

/// How long a token save waits for another process's save: each holds the lock for a compare, a write with its
/// flush and a rename, seconds at most on a busy disk, so a holder past this is stopped or hung (a `relay
/// authorize` suspended with Ctrl-Z), and the save fails, saying so, rather than hold the account's tokens for
/// ever.
const SAVE_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// An exclusive flock on `file` within `limit`: polled, since flock(2) has no timeout (a signal-based one would
/// reach the daemon's other threads).
fn flock_within(file: &std::fs::File, limit: std::time::Duration) -> std::io::Result<()> {
    let until = std::time::Instant::now() + limit;
    loop {
        if flock(file)? {
            return Ok(());
        }
        if std::time::Instant::now() >= until {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "another process has held this lock for over {} s (a `relay authorize` or `relay serve` that is stopped?)",
                    limit.as_secs()
                ),
            ));
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Takes the renewal lock if it is free: Ok(false) if another process (or another open of it) holds it. Never
/// blocks, so that an async task can wait for it without holding a thread.
pub fn try_flock(file: &std::fs::File) -> std::io::Result<bool> {
    flock(file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A save does not wait for ever for a lock another process holds (one stopped with Ctrl-Z in the middle of
    /// its save): it fails, saying why, and goes once the lock is free.
    #[test]
    fn a_lock_held_elsewhere_is_waited_for_a_bounded_time() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(".office.lock");
        std::fs::write(&path, "").unwrap();
        let holder = std::fs::File::open(&path).unwrap();
        assert!(flock(&holder).unwrap());
        let ours = std::fs::File::open(&path).unwrap();
        let e = flock_within(&ours, Duration::from_millis(50)).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
        assert!(e.to_string().contains("another process"), "{e}");
        drop(holder);
        flock_within(&ours, Duration::from_millis(50)).unwrap();
    }

    fn tokens(access: &str) -> StoredTokens {
        StoredTokens {
            access_token: SecretString::from(access.to_string()),
            expires_at: SystemTime::now() + Duration::from_secs(3600),
            obtained_at: SystemTime::now(),
            refresh_token: Some(SecretString::from("r".to_string())),
            last_refresh: None,
            needs_authorization: false,
            last_error: None,
        }
    }

    /// A damaged file is set aside, named by the time, and its reason never quotes what it holds (a token written
    /// as a bare JSON string, say); one replaced since it was read is left as it is.
    #[test]
    fn a_damaged_file_is_set_aside_but_not_one_replaced_meanwhile() {
        let dir = tempfile::tempdir().unwrap();
        let store = TokenStore::new(dir.path());
        let path = store.path("a");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, "\"eyJ0eXAi.secret-token\"").unwrap();
        let Err(StoreError::Corrupt { reason, .. }) = store.load_hashed("a") else {
            panic!("read as corrupt");
        };
        assert!(!reason.contains("secret-token"), "{reason}");
        store.save("a", &tokens("authorized")).unwrap();
        assert!(store.set_aside("a").unwrap().is_none());
        assert!(store.load_hashed("a").unwrap().0.is_some());
        std::fs::write(store.path("a"), "{ damaged").unwrap();
        let aside = store.set_aside("a").unwrap().expect("set aside");
        assert_eq!(std::fs::read_to_string(aside).unwrap(), "{ damaged");
        assert!(!store.path("a").exists());
        // Far larger than tokens can be: damaged too, and set aside without being read whole.
        std::fs::File::create(store.path("a"))
            .unwrap()
            .set_len(2 * crate::small_files::SMALL)
            .unwrap();
        let Err(StoreError::Corrupt { reason, .. }) = store.load_hashed("a") else {
            panic!("read as corrupt");
        };
        assert!(reason.contains("larger than 1 MiB"), "{reason}");
        assert!(store.set_aside("a").unwrap().is_some());
        assert!(!store.path("a").exists());
    }

    #[test]
    fn an_unsaved_mark_lasts_until_a_write_and_says_when_its_daemon_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let store = TokenStore::new(dir.path());
        assert!(store.unsaved("a").is_none());
        store.mark_unsaved("a", "read-only");
        let first = store.unsaved("a").unwrap();
        assert!(!first.lost && first.why == "read-only");
        // Marked again by the same daemon: the first time stays.
        store.mark_unsaved("a", "again");
        assert_eq!(store.unsaved("a").unwrap().why, "read-only");
        // A new daemon starts: the grant went with the old one; a new mark of its own replaces that.
        store.unsaved_lost("a");
        assert!(store.unsaved("a").unwrap().lost);
        store.mark_unsaved("a", "still read-only");
        let second = store.unsaved("a").unwrap();
        assert!(!second.lost && second.why == "still read-only");
        store.save("a", &tokens("x")).unwrap();
        assert!(store.unsaved("a").is_none(), "a write clears it");
    }

    /// Sealing a plain file at start (`token_encryption` newly set) rewrites the file's own grant: a mark saying
    /// that a stopped daemon held a newer one unsaved must survive it, for the start to say it was lost.
    #[test]
    fn sealing_a_plain_file_keeps_an_unsaved_mark() {
        let dir = tempfile::tempdir().unwrap();
        let plain = TokenStore::new(dir.path());
        plain.save("a", &tokens("old")).unwrap();
        plain.mark_unsaved("a", "read-only");
        let sealed = TokenStore::sealed(dir.path(), Arc::new(TokenKey::for_tests(7)));
        sealed.check("a").unwrap();
        let bytes = std::fs::read(sealed.path("a")).unwrap();
        assert!(Envelope::parse(&bytes).is_some(), "sealed");
        assert!(plain.unsaved("a").is_some(), "the mark stays");
        plain.unsaved_lost("a");
        assert!(plain.unsaved("a").unwrap().lost);
    }

    #[test]
    fn a_file_changed_since_it_was_read_is_never_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let store = TokenStore::new(dir.path());
        store.save("a", &tokens("old")).unwrap();
        let (_, read) = store.load_hashed("a").unwrap();
        // `relay authorize` stores a new grant within the same clock tick.
        store.save("a", &tokens("authorized")).unwrap();
        let mut failed = tokens("old");
        failed.needs_authorization = true;
        assert_eq!(store.save_if_unchanged("a", &failed, read).unwrap(), None);
        let kept = store.load("a").unwrap().unwrap();
        assert_eq!(kept.access_token.expose_secret(), "authorized");
        assert!(!kept.needs_authorization);
        let (_, read) = store.load_hashed("a").unwrap();
        assert!(
            store
                .save_if_unchanged("a", &failed, read)
                .unwrap()
                .is_some()
        );
        assert!(store.load("a").unwrap().unwrap().needs_authorization);
    }
}
