//! Checking a device's SMTP AUTH password against the `[[user]]` argon2 hashes.
//!
//! An argon2 verification costs tens of milliseconds of CPU on purpose. Devices that open a fresh connection and
//! log in for every message would pay that each time, so a successful verification is remembered in memory,
//! keyed by a keyed hash of user and password (the key is random per process, so the table says nothing about
//! the passwords even in a core dump). Failures are never remembered: a wrong password always pays full price.

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, OnceLock};

use argon2::{Argon2, PasswordHasher, PasswordVerifier};
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::Semaphore;

use crate::config::UserConfig;

/// Remembered logins before the table is cleared; a device fleet is far smaller.
const CACHE_LIMIT: usize = 10_000;

pub struct Authenticator {
    hashes: HashMap<String, String>,
    key: [u8; 32],
    verified: Mutex<HashSet<[u8; 32]>>,
    /// Argon2 runs on the blocking pool; a password-guessing flood must not take all of it.
    slots: Semaphore,
}

impl Authenticator {
    pub fn new(users: &[UserConfig]) -> Authenticator {
        Authenticator {
            hashes: users
                .iter()
                .map(|u| (u.name.clone(), u.password_hash.clone()))
                .collect(),
            key: rand::random(),
            verified: Mutex::new(HashSet::new()),
            slots: Semaphore::new(2),
        }
    }

    fn cache_key(&self, user: &str, password: &str) -> [u8; 32] {
        let mut h = blake3::Hasher::new_keyed(&self.key);
        h.update(&(user.len() as u64).to_le_bytes());
        h.update(user.as_bytes());
        h.update(password.as_bytes());
        *h.finalize().as_bytes()
    }

    /// True when `password` is the user's.
    pub async fn verify(&self, user: &str, password: &SecretString) -> bool {
        let key = self.cache_key(user, password.expose_secret());
        if self.verified.lock().is_ok_and(|set| set.contains(&key)) {
            return true;
        }
        // Unknown users are checked against a dummy hash, so that the time taken does not tell which
        // user names exist.
        let (hash, known) = match self.hashes.get(user) {
            Some(h) => (h.clone(), true),
            None => (dummy_hash().to_string(), false),
        };
        let Ok(_slot) = self.slots.acquire().await else {
            return false;
        };
        let password = password.clone();
        let ok = tokio::task::spawn_blocking(move || {
            Argon2::default()
                .verify_password(password.expose_secret().as_bytes(), hash.as_str())
                .is_ok()
        })
        .await
        .unwrap_or(false)
            && known;
        if ok && let Ok(mut set) = self.verified.lock() {
            if set.len() >= CACHE_LIMIT {
                set.clear();
            }
            set.insert(key);
        }
        ok
    }
}

fn dummy_hash() -> &'static str {
    static DUMMY: OnceLock<String> = OnceLock::new();
    DUMMY.get_or_init(|| hash_password(&rand::random::<u64>().to_string()).unwrap_or_default())
}

/// An argon2id hash in PHC form, for `relay hash-password`.
pub fn hash_password(password: &str) -> Result<String, argon2::password_hash::Error> {
    Ok(Argon2::default()
        .hash_password(password.as_bytes())?
        .to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn verifies_and_remembers() {
        let hash = hash_password("s3cret").unwrap();
        assert!(hash.starts_with("$argon2id$"));
        let auth = Authenticator::new(&[UserConfig {
            name: "printer".into(),
            password_hash: hash,
            account: None,
        }]);
        assert!(auth.verify("printer", &SecretString::from("s3cret")).await);
        assert!(auth.verify("printer", &SecretString::from("s3cret")).await);
        assert!(!auth.verify("printer", &SecretString::from("wrong")).await);
        assert!(!auth.verify("nobody", &SecretString::from("s3cret")).await);
        assert_eq!(auth.verified.lock().unwrap().len(), 1);
    }
}
