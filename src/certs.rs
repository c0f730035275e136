//! The dates of a PEM certificate (its first, the one a chain is for): an account's client certificate and a
//! listener's server certificate are both warned about before they expire.

use std::path::Path;
use std::time::{Duration, SystemTime};

/// When a certificate becomes and stops being valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

/// The first certificate's dates in a PEM file.
pub fn validity(path: &Path) -> Result<Validity, String> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let der =
        CertificateDer::from_pem_file(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|e| format!("{}: not an X.509 certificate: {e}", path.display()))?;
    let at =
        |secs: i64| SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).unwrap_or(0));
    Ok(Validity {
        not_before: at(cert.validity().not_before.timestamp()),
        not_after: at(cert.validity().not_after.timestamp()),
    })
}

/// Days ahead at which a listener's certificate is warned about.
pub const WARN_DAYS: u64 = 30;

/// Why clients checking a certificate refuse it, or soon will.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trouble {
    NotYetValid(SystemTime),
    Expired(SystemTime),
    /// Fewer than [`WARN_DAYS`] left: whole days, and the end.
    Expiring(u64, SystemTime),
}

impl Validity {
    pub fn trouble(&self, now: SystemTime) -> Option<Trouble> {
        if now < self.not_before {
            return Some(Trouble::NotYetValid(self.not_before));
        }
        match self.not_after.duration_since(now) {
            Err(_) => Some(Trouble::Expired(self.not_after)),
            Ok(left) if left.as_secs() / 86_400 < WARN_DAYS => {
                Some(Trouble::Expiring(left.as_secs() / 86_400, self.not_after))
            }
            Ok(_) => None,
        }
    }
}

/// "2027-05-01", as the warnings say dates.
pub fn day(t: SystemTime) -> String {
    let full = humantime::format_rfc3339_seconds(t).to_string();
    full.get(..10).unwrap_or(&full).to_string()
}
