//! `STATE_DIR/tokens/ACCOUNT.json`: one file per account, mode 0640, replaced atomically (temp file, fsync,
//! rename, fsync dir). Written by the daemon and by `relay authorize`, which may run as root: the file then
//! goes to the state dir's owner, so that the daemon's user can still read it.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a token file: {reason}")]
    Corrupt { path: PathBuf, reason: String },
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

#[derive(Debug, Clone)]
pub struct TokenStore {
    dir: PathBuf,
}

impl TokenStore {
    pub fn new(state_dir: &Path) -> TokenStore {
        TokenStore {
            dir: state_dir.join("tokens"),
        }
    }

    pub fn path(&self, account: &str) -> PathBuf {
        self.dir.join(format!("{account}.json"))
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

    /// The file's bytes (None if there is none). Token files are a few KiB.
    fn read_bytes(&self, account: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let path = self.path(account);
        match std::fs::read(&path) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
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
        let f: File = serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let tokens = StoredTokens {
            access_token: SecretString::from(f.access_token),
            expires_at: f.expires_at,
            obtained_at: f.obtained_at,
            refresh_token: f.refresh_token.map(SecretString::from),
            last_refresh: f.last_refresh,
            needs_authorization: f.needs_authorization,
            last_error: f.last_error,
        };
        Ok((Some(tokens), Some(hash)))
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

    pub fn save(&self, account: &str, t: &StoredTokens) -> Result<(), StoreError> {
        let _lock = self.lock(account)?;
        self.write(account, t).map(|_| ())
    }

    /// An exclusive lock on `tokens/.ACCOUNT.lock`, held while a file is compared and replaced: the daemon and
    /// `relay authorize` are different processes, and may be different users (root and the daemon's). The lock
    /// file is opened read-only (flock needs no more) and, created by root, given to the state dir's owner like
    /// the token file; if it still cannot be opened, the hash comparison alone has to do.
    fn lock(&self, account: &str) -> Result<Option<std::fs::File>, StoreError> {
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::OpenOptionsExt;
        let path = self.dir.join(format!(".{account}.lock"));
        let io = |source| StoreError::Io {
            path: path.clone(),
            source,
        };
        self.create_dir().map_err(io)?;
        let file = match std::fs::File::open(&path) {
            Ok(f) => f,
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
                f
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot open the token lock file; going on without it");
                return Ok(None);
            }
        };
        // SAFETY: the descriptor is open for the duration of the call. Released when the file is closed.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(io(std::io::Error::last_os_error()));
        }
        Ok(Some(file))
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
        let body = serde_json::to_vec_pretty(&File {
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
        let mut file = atomic_write_file::AtomicWriteFile::open(&path).map_err(io)?;
        // Set explicitly: the mode given at creation would be cut by the umask, and this must be exact.
        file.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o640))
            .map_err(io)?;
        if root {
            std::os::unix::fs::fchown(file.as_file(), Some(owner.uid()), Some(owner.gid()))
                .map_err(io)?;
        }
        file.write_all(&body).map_err(io)?;
        file.commit().map_err(io)?;
        Ok(blake3::hash(&body))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

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
