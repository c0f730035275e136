//! Signed JWTs that stand in for a secret: client assertions (private_key_jwt, RFC 7523 section 2.2, as
//! Microsoft's certificate credentials use them) and Google's service-account JWT bearer grant (RFC 7523
//! section 2.1).

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use serde::{Deserialize, Serialize};

use sha1::Digest as _;

/// How long an assertion is valid: it is used at once, so a few minutes is plenty (Microsoft allows up to 10).
const ASSERTION_LIFETIME: Duration = Duration::from_secs(300);

pub use crate::config::AssertionAlgorithm;

/// A client certificate and its key, for `client_assertion`.
pub struct ClientCertificate {
    key: EncodingKey,
    x5t: String,
    x5t_s256: String,
    pub algorithm: AssertionAlgorithm,
}

#[derive(Serialize)]
struct AssertionClaims<'a> {
    aud: &'a str,
    iss: &'a str,
    sub: &'a str,
    jti: String,
    nbf: u64,
    iat: u64,
    exp: u64,
}

/// Why a PEM did not give an RSA key, in words (jsonwebtoken's are its enum's: `InvalidKeyFormat`,
/// `InvalidCharacter(45)`).
fn key_problem(e: &jsonwebtoken::errors::Error) -> String {
    use jsonwebtoken::errors::ErrorKind;
    match e.kind() {
        ErrorKind::InvalidKeyFormat => {
            "no PEM block holding an RSA private key, PKCS#1 or PKCS#8 (an EC key, a certificate, a key with a passphrase?)".into()
        }
        ErrorKind::Base64(_) => "its PEM block's base64 is damaged (cut or edited?)".into(),
        ErrorKind::InvalidRsaKey(why) => format!("the RSA key is not valid ({why})"),
        _ => e.to_string(),
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

impl ClientCertificate {
    pub fn load(
        cert: &Path,
        key: &Path,
        algorithm: AssertionAlgorithm,
    ) -> Result<ClientCertificate, (&'static str, String)> {
        let der = CertificateDer::from_pem_file(cert)
            .map_err(|e| ("certificate_file", format!("{}: {e}", cert.display())))?;
        let pem = crate::small_files::read(key, crate::small_files::SMALL)
            .map_err(|e| ("private_key_file", format!("{}: {e}", key.display())))?;
        let key = EncodingKey::from_rsa_pem(&pem).map_err(|e| {
            (
                "private_key_file",
                format!(
                    "{}: not an RSA private key: {}",
                    key.display(),
                    key_problem(&e)
                ),
            )
        })?;
        Ok(ClientCertificate {
            key,
            x5t: B64URL.encode(sha1::Sha1::digest(der.as_ref())),
            x5t_s256: B64URL.encode(sha2::Sha256::digest(der.as_ref())),
            algorithm,
        })
    }

    /// A fresh assertion for one token request: `aud` is the token URL, `jti` new each time.
    pub fn assertion(&self, client_id: &str, token_url: &str) -> Result<String, String> {
        let mut header = match self.algorithm {
            AssertionAlgorithm::PS256 => Header::new(Algorithm::PS256),
            AssertionAlgorithm::RS256 => Header::new(Algorithm::RS256),
        };
        match self.algorithm {
            AssertionAlgorithm::PS256 => header.x5t_s256 = Some(self.x5t_s256.clone()),
            AssertionAlgorithm::RS256 => header.x5t = Some(self.x5t.clone()),
        }
        let now = now_secs();
        let claims = AssertionClaims {
            aud: token_url,
            iss: client_id,
            sub: client_id,
            jti: uuid::Uuid::now_v7().to_string(),
            nbf: now,
            iat: now,
            exp: now + ASSERTION_LIFETIME.as_secs(),
        };
        jsonwebtoken::encode(&header, &claims, &self.key)
            .map_err(|e| format!("cannot sign the client assertion: {e}"))
    }
}

/// Google's service-account key file (the fields relay uses).
#[derive(Deserialize)]
struct KeyFile {
    client_email: String,
    private_key: String,
    private_key_id: Option<String>,
}

pub struct ServiceAccount {
    pub client_email: String,
    key_id: Option<String>,
    key: EncodingKey,
}

#[derive(Serialize)]
struct BearerClaims<'a> {
    iss: &'a str,
    sub: &'a str,
    scope: &'a str,
    aud: &'a str,
    iat: u64,
    exp: u64,
}

impl ServiceAccount {
    pub fn load(path: &Path) -> Result<ServiceAccount, String> {
        let text = crate::small_files::read(path, crate::small_files::SMALL)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let k: KeyFile = serde_json::from_slice(&text).map_err(|e| {
            format!(
                "{}: not a Google service account key (JSON): {e}",
                path.display()
            )
        })?;
        let key = EncodingKey::from_rsa_pem(k.private_key.as_bytes()).map_err(|e| {
            format!(
                "{}: private_key is not an RSA private key: {}",
                path.display(),
                key_problem(&e)
            )
        })?;
        Ok(ServiceAccount {
            client_email: k.client_email,
            key_id: k.private_key_id,
            key,
        })
    }

    /// The JWT for the jwt-bearer grant: acting as `mailbox` (domain-wide delegation, Workspace only).
    pub fn assertion(&self, mailbox: &str, scope: &str, token_url: &str) -> Result<String, String> {
        let mut header = Header::new(Algorithm::RS256);
        header.kid = self.key_id.clone();
        let now = now_secs();
        let claims = BearerClaims {
            iss: &self.client_email,
            sub: mailbox,
            scope,
            aud: token_url,
            iat: now,
            // Google's maximum.
            exp: now + 3600,
        };
        jsonwebtoken::encode(&header, &claims, &self.key)
            .map_err(|e| format!("cannot sign the service-account JWT: {e}"))
    }
}
