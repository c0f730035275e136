//! Token files sealed at rest (`token_encryption`): a copied state dir, or a backup of it, holds no usable token.
//!
//! A sealed file is one line of JSON, `{"v":1,"alg":"AES-256-GCM","nonce":"…","ct":"…"}`: the plain token file
//! encrypted with AES-256-GCM under a 32-byte key, a fresh random 96-bit nonce per write, and the account's name
//! as associated data (so a file copied to another account's name does not open). Random nonces are safe here
//! for far more writes than relay makes (NIST SP 800-38D allows 2^32 per key; relay writes a few a day).
//!
//! The key comes from a file, or from systemd: `LoadCredentialEncrypted=relay-token-key:/etc/relay/token-key.cred`
//! decrypts it (TPM-bound where the host has a TPM) into `$CREDENTIALS_DIRECTORY/relay-token-key`, readable by
//! the service alone. Outside the service (`relay authorize`, `relay status` run from a root shell), relay asks
//! `systemd-creds decrypt` for the same credential.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};

use crate::config::TokenEncryption;

/// The credential's name, in `LoadCredentialEncrypted=` and `systemd-creds encrypt --name=`.
pub const CREDENTIAL_NAME: &str = "relay-token-key";
/// Where the encrypted credential lives, for the unit and for `systemd-creds decrypt` outside it.
pub const CREDENTIAL_FILE: &str = "/etc/relay/token-key.cred";

const VERSION: u32 = 1;
const ALG: &str = "AES-256-GCM";
const KEY_LEN: usize = 32;
/// A key file is a few bytes; anything much larger is not one.
const MAX_KEY_FILE: u64 = 4096;

#[derive(Debug, thiserror::Error)]
#[error("token_encryption: {0}")]
pub struct KeyError(String);

impl KeyError {
    /// What is wrong, without the key's name (for an error that names it apart).
    pub fn reason(&self) -> &str {
        &self.0
    }
}

/// The key that seals token files. Its bytes never leave this type; `Debug` shows where it came from only.
pub struct TokenKey {
    key: LessSafeKey,
    /// The key file, or the credential: named in errors.
    pub origin: String,
}

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenKey")
            .field("origin", &self.origin)
            .field("key", &"[redacted]")
            .finish()
    }
}

/// A sealed token file as stored.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    v: u32,
    alg: String,
    nonce: String,
    ct: String,
}

/// Why a sealed file did not open.
#[derive(Debug, PartialEq, Eq)]
pub enum OpenError {
    /// Another key, or a changed file (the tag does not match).
    WrongKey,
    /// A version or algorithm this relay does not know.
    Unknown(String),
}

impl Envelope {
    /// The envelope, if `bytes` are one; a plain token file is not.
    pub fn parse(bytes: &[u8]) -> Option<Envelope> {
        serde_json::from_slice(bytes).ok()
    }
}

/// Checks a `token_encryption` setting at config time: a key file must exist, be private and hold a key. The
/// systemd credential exists only inside the service, so it is checked when it is loaded.
pub fn check(setting: &TokenEncryption) -> Result<(), String> {
    match setting {
        TokenEncryption::SystemdCreds => Ok(()),
        TokenEncryption::KeyFile(path) => read_key_file(path).map(drop),
    }
}

impl TokenKey {
    /// Loads the key the setting names.
    pub fn load(setting: &TokenEncryption) -> Result<TokenKey, KeyError> {
        match setting {
            TokenEncryption::KeyFile(path) => {
                let key = read_key_file(path).map_err(KeyError)?;
                Ok(TokenKey::new(&key, path.display().to_string()))
            }
            TokenEncryption::SystemdCreds => {
                let (bytes, origin) = credential().map_err(KeyError)?;
                let key = parse_key(&bytes).map_err(|r| KeyError(format!("{origin}: {r}")))?;
                Ok(TokenKey::new(&key, origin))
            }
        }
    }

    /// A key of `byte` repeated, for other modules' tests.
    #[cfg(test)]
    pub(crate) fn for_tests(byte: u8) -> TokenKey {
        TokenKey::new(&[byte; KEY_LEN], "test".into())
    }

    fn new(key: &[u8; KEY_LEN], origin: String) -> TokenKey {
        // The length is AES-256's, so this cannot fail.
        let unbound = UnboundKey::new(&AES_256_GCM, key).expect("a 32-byte AES-256 key");
        TokenKey {
            key: LessSafeKey::new(unbound),
            origin,
        }
    }

    /// Seals a token file's bytes for `account`.
    pub fn seal(&self, account: &str, plain: &[u8]) -> std::io::Result<Vec<u8>> {
        let mut nonce = [0u8; NONCE_LEN];
        aws_lc_rs::rand::fill(&mut nonce)
            .map_err(|_| std::io::Error::other("no randomness for a nonce"))?;
        let mut buf = plain.to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad(account)),
                &mut buf,
            )
            .map_err(|_| std::io::Error::other("cannot seal the token file"))?;
        let env = Envelope {
            v: VERSION,
            alg: ALG.into(),
            nonce: B64.encode(nonce),
            ct: B64.encode(&buf),
        };
        let mut out = serde_json::to_vec(&env).map_err(std::io::Error::other)?;
        out.push(b'\n');
        Ok(out)
    }

    /// Opens a sealed file of `account`.
    pub fn open(&self, account: &str, env: &Envelope) -> Result<Vec<u8>, OpenError> {
        if env.v != VERSION || env.alg != ALG {
            return Err(OpenError::Unknown(format!(
                "sealed format v{} with {}",
                env.v, env.alg
            )));
        }
        let nonce: [u8; NONCE_LEN] = B64
            .decode(&env.nonce)
            .ok()
            .and_then(|n| n.try_into().ok())
            .ok_or(OpenError::WrongKey)?;
        let mut buf = B64.decode(&env.ct).map_err(|_| OpenError::WrongKey)?;
        let plain = self
            .key
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad(account)),
                &mut buf,
            )
            .map_err(|_| OpenError::WrongKey)?;
        Ok(plain.to_vec())
    }
}

/// Binds a file to its account and to this format.
fn aad(account: &str) -> Vec<u8> {
    format!("relay token file v{VERSION}\0{account}").into_bytes()
}

/// Reads a key file, refusing one that anyone but its owner and group could read or change: the key is what
/// keeps the tokens, so it gets the rule of every other secret file, 0640 or stricter.
fn read_key_file(path: &Path) -> Result<[u8; KEY_LEN], String> {
    let shown = path.display();
    let meta = std::fs::metadata(path).map_err(|e| format!("{shown}: {e}"))?;
    if !meta.is_file() {
        return Err(format!("{shown} is not a regular file"));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & !0o640 != 0 {
        return Err(format!(
            "{shown} has mode {mode:04o}: a token key must be 0640 or stricter (never readable by others); run `chmod 640 {shown}`"
        ));
    }
    let bytes =
        crate::small_files::read(path, MAX_KEY_FILE).map_err(|e| format!("{shown}: {e}"))?;
    parse_key(&bytes).map_err(|r| format!("{shown}: {r}"))
}

/// A key as written: exactly 32 bytes, or 64 hex digits (with any surrounding whitespace, as
/// `openssl rand -hex 32` writes them).
fn parse_key(bytes: &[u8]) -> Result<[u8; KEY_LEN], String> {
    if let Ok(raw) = <[u8; KEY_LEN]>::try_from(bytes) {
        return Ok(raw);
    }
    let text = bytes.trim_ascii();
    let hex = |pair: &[u8]| {
        std::str::from_utf8(pair)
            .ok()
            .and_then(|p| u8::from_str_radix(p, 16).ok())
    };
    if text.len() == 2 * KEY_LEN
        && let Some(key) = text.chunks(2).map(hex).collect::<Option<Vec<u8>>>()
        && let Ok(key) = <[u8; KEY_LEN]>::try_from(key)
    {
        return Ok(key);
    }
    Err(format!(
        "holds {} bytes, not a key: write 32 random bytes, or 64 hex digits (`openssl rand -hex 32`)",
        bytes.len()
    ))
}

/// The credential's bytes, and where they came from. In the service, systemd has put them in
/// `$CREDENTIALS_DIRECTORY`; elsewhere `systemd-creds decrypt` opens the credential file, as systemd would.
fn credential() -> Result<(Vec<u8>, String), String> {
    let create = format!(
        "create it with `openssl rand -hex 32 | systemd-creds encrypt --name={CREDENTIAL_NAME} --with-key=auto - {CREDENTIAL_FILE}`"
    );
    if let Some(dir) = std::env::var_os("CREDENTIALS_DIRECTORY").filter(|d| !d.is_empty()) {
        let path = PathBuf::from(dir).join(CREDENTIAL_NAME);
        return match crate::small_files::read(&path, crate::small_files::SMALL) {
            Ok(b) => Ok((b, path.display().to_string())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(format!(
                "{} does not exist: the unit needs `LoadCredentialEncrypted={CREDENTIAL_NAME}:{CREDENTIAL_FILE}`; {create}",
                path.display()
            )),
            Err(e) => Err(format!("{}: {e}", path.display())),
        };
    }
    let origin = format!("{CREDENTIAL_FILE} (through systemd-creds)");
    let out = std::process::Command::new("systemd-creds")
        .args(["decrypt", &format!("--name={CREDENTIAL_NAME}"), CREDENTIAL_FILE, "-"])
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| {
            format!("$CREDENTIALS_DIRECTORY is not set (systemd sets it for the relay service), and systemd-creds cannot be run: {e}")
        })?;
    if !out.status.success() {
        return Err(format!(
            "$CREDENTIALS_DIRECTORY is not set (systemd sets it for the relay service), and `systemd-creds decrypt --name={CREDENTIAL_NAME} {CREDENTIAL_FILE} -` failed ({}): {}. Outside the service, run relay as root; if the credential does not exist yet, {create}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok((out.stdout, origin))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8) -> TokenKey {
        TokenKey::for_tests(byte)
    }

    #[test]
    fn a_sealed_file_opens_only_with_its_key_and_account() {
        let k = key(7);
        let sealed = k.seal("office", br#"{"access_token":"secret"}"#).unwrap();
        assert!(!String::from_utf8_lossy(&sealed).contains("secret"));
        let env = Envelope::parse(&sealed).expect("an envelope");
        assert_eq!(
            k.open("office", &env).unwrap(),
            br#"{"access_token":"secret"}"#
        );
        assert_eq!(key(8).open("office", &env), Err(OpenError::WrongKey));
        assert_eq!(k.open("other", &env), Err(OpenError::WrongKey));
        // A fresh nonce every time: the same tokens never give the same file.
        assert_ne!(
            sealed,
            k.seal("office", br#"{"access_token":"secret"}"#).unwrap()
        );
        assert!(Envelope::parse(br#"{"access_token":"a","expires_at":"x"}"#).is_none());
    }

    #[test]
    fn keys_are_32_bytes_or_64_hex_digits() {
        assert_eq!(parse_key(&[1; 32]).unwrap(), [1; 32]);
        let hex = format!("{}\n", "ab".repeat(32));
        assert_eq!(parse_key(hex.as_bytes()).unwrap(), [0xab; 32]);
        assert!(parse_key(b"short").unwrap_err().contains("64 hex digits"));
        assert!(parse_key("zz".repeat(32).as_bytes()).is_err());
    }

    #[test]
    fn a_key_file_others_can_read_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        std::fs::write(&path, "11".repeat(32)).unwrap();
        for (mode, ok) in [
            (0o600, true),
            (0o640, true),
            (0o400, true),
            (0o644, false),
            (0o660, false),
        ] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let got = check(&TokenEncryption::KeyFile(path.clone()));
            assert_eq!(got.is_ok(), ok, "{mode:o}: {got:?}");
            // The fix keeps the group's read (the service's user reads a root:relay key through it).
            if let Err(e) = got {
                assert!(e.contains(&format!("chmod 640 {}", path.display())), "{e}");
            }
        }
    }
}
