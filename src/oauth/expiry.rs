//! Credentials that expire on a date: a client secret (`client_secret_expires`, since Azure does not say) and a
//! client certificate (its notAfter). Warned about 30, 7 and 1 days ahead, in the log and in `relay status`.

use std::path::Path;
use std::time::SystemTime;

use crate::config::{AccountConfig, Rotation};

/// Days ahead at which a warning is raised.
pub const THRESHOLDS: [u64; 3] = [30, 7, 1];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expiry {
    /// "client secret" or "certificate".
    pub what: &'static str,
    pub at: SystemTime,
    /// How the account's rewritten files reach the daemon, for the fix.
    pub rotation: Rotation,
}

/// Parses `client_secret_expires` ("YYYY-MM-DD", midnight UTC).
pub fn parse_date(s: &str) -> Result<SystemTime, String> {
    humantime::parse_rfc3339(&format!("{s}T00:00:00Z"))
        .map_err(|_| format!("`{s}` is not a date like \"2027-05-01\""))
}

/// A PEM certificate's notAfter.
pub fn certificate_not_after(path: &Path) -> Result<SystemTime, String> {
    crate::certs::validity(path).map(|v| v.not_after)
}

/// An account's dated credentials.
pub fn expiries(a: &AccountConfig) -> Vec<Expiry> {
    let mut out = Vec::new();
    if let Some(at) = a
        .client_secret_expires
        .as_deref()
        .and_then(|d| parse_date(d).ok())
    {
        out.push(Expiry {
            what: "client secret",
            at,
            rotation: Rotation::of(a),
        });
    }
    if let Some(at) = a
        .certificate_file
        .as_deref()
        .and_then(|p| certificate_not_after(p).ok())
    {
        out.push(Expiry {
            what: "certificate",
            at,
            rotation: Rotation::of(a),
        });
    }
    out
}

/// Whole days left (0 on the last day; `None` once expired).
pub fn days_left(e: &Expiry, now: SystemTime) -> Option<u64> {
    e.at.duration_since(now).ok().map(|d| d.as_secs() / 86_400)
}

/// The warning for `relay status` and the log, if one is due: what expires, when, and what to do.
pub fn warning(account: &str, e: &Expiry, now: SystemTime) -> Option<String> {
    let date = humantime::format_rfc3339_seconds(e.at).to_string();
    let date = &date[..10];
    let fix = e.rotation.advise(match e.what {
        "client secret" => {
            "create a new secret in the app registration, write it to client_secret_file and update client_secret_expires, then `systemctl reload relay`"
        }
        _ => {
            "upload a new certificate to the app registration and point certificate_file and private_key_file at it, then `systemctl reload relay`"
        }
    });
    match days_left(e, now) {
        None => Some(format!(
            "account {account}: the {} expired on {date}: {fix}",
            e.what
        )),
        Some(d) if d < THRESHOLDS[0] => Some(format!(
            "account {account}: the {} expires in {d} day(s), on {date}: {fix}",
            e.what
        )),
        _ => None,
    }
}

/// Which threshold (30, 7, 1 days) a credential has reached, for logging each once.
pub fn threshold_reached(e: &Expiry, now: SystemTime) -> Option<u64> {
    match days_left(e, now) {
        None => Some(0),
        Some(d) => THRESHOLDS.iter().rev().copied().find(|t| d < *t),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn warnings_at_thresholds() {
        let now = parse_date("2027-04-01").unwrap();
        let e = |d: &str| Expiry {
            what: "client secret",
            at: parse_date(d).unwrap(),
            rotation: Rotation::default(),
        };
        assert_eq!(warning("a", &e("2027-06-01"), now), None);
        assert!(
            warning("a", &e("2027-04-20"), now)
                .unwrap()
                .contains("expires in 19 day(s), on 2027-04-20")
        );
        assert!(
            warning("a", &e("2027-03-01"), now)
                .unwrap()
                .contains("expired on 2027-03-01")
        );
        assert_eq!(threshold_reached(&e("2027-04-20"), now), Some(30));
        assert_eq!(threshold_reached(&e("2027-04-05"), now), Some(7));
        assert_eq!(
            threshold_reached(&e("2027-04-01"), now + Duration::from_secs(3600)),
            Some(0)
        );
        assert_eq!(threshold_reached(&e("2027-06-01"), now), None);
        assert!(parse_date("May 1st").is_err());
    }

    #[test]
    fn reads_a_certificates_not_after() {
        let cert = Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/rsa-cert.pem"
        ));
        let at = certificate_not_after(cert).unwrap();
        // The fixture was made for ten years.
        assert!(at > SystemTime::now() + Duration::from_secs(5 * 365 * 86_400));
        assert!(certificate_not_after(Path::new("/nonexistent.pem")).is_err());
    }
}
