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
        let path = self.path(account);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(StoreError::Io { path, source }),
        };
        let f: File = serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        Ok(Some(StoredTokens {
            access_token: SecretString::from(f.access_token),
            expires_at: f.expires_at,
            obtained_at: f.obtained_at,
            refresh_token: f.refresh_token.map(SecretString::from),
            last_refresh: f.last_refresh,
            needs_authorization: f.needs_authorization,
            last_error: f.last_error,
        }))
    }

    pub fn save(&self, account: &str, t: &StoredTokens) -> Result<(), StoreError> {
        let path = self.path(account);
        let io = |source| StoreError::Io {
            path: path.clone(),
            source,
        };
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let created = !self.dir.exists();
        if created {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o750)
                .create(&self.dir)
                .map_err(io)?;
        }
        let owner = std::fs::metadata(self.dir.parent().unwrap_or(&self.dir)).map_err(io)?;
        // The daemon's user writes here too (every refresh replaces the file).
        if created && root {
            std::os::unix::fs::chown(&self.dir, Some(owner.uid()), Some(owner.gid()))
                .map_err(io)?;
        }
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
        file.commit().map_err(io)
    }
}
