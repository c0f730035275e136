//! The dates of a PEM certificate (its first, the one a chain is for): an account's client certificate and a
//! listener's server certificate are both warned about before they expire. And a listener's chain as clients
//! build it: certbot's `cert.pem` named where `fullchain.pem` belongs was served without a word, and every
//! device then refused it ("unknown CA").

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
    Ok(dates(&cert))
}

/// A parsed certificate's dates (one before 1970 read as 1970).
fn dates(cert: &x509_parser::certificate::X509Certificate<'_>) -> Validity {
    let at = |t: &x509_parser::time::ASN1Time| {
        SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(t.timestamp()).unwrap_or(0))
    };
    Validity {
        not_before: at(&cert.validity().not_before),
        not_after: at(&cert.validity().not_after),
    }
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

/// Where this machine's CA store is on Debian (`update-ca-certificates` writes it): a chain that ends at an issuer
/// found there is complete.
const SYSTEM_STORE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// What is wrong with the chain in a listener's certificate file, as clients build it: certificates out of
/// order or foreign to it, an intermediate out of its dates, or a last issuer that neither the file nor this
/// machine's CA store holds (a missing intermediate; or a private CA, which the devices must have). `None` when
/// the file cannot be read (the TLS load says why) or all is well.
pub fn chain_warning(path: &Path, now: SystemTime) -> Option<String> {
    chain_warning_with(path, now, Path::new(SYSTEM_STORE))
}

fn chain_warning_with(path: &Path, now: SystemTime, store: &Path) -> Option<String> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let ders: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .ok()?
        .collect::<Result<_, _>>()
        .ok()?;
    let certs: Vec<_> = ders
        .iter()
        .map(|d| x509_parser::parse_x509_certificate(d.as_ref()).map(|(_, c)| c))
        .collect::<Result<_, _>>()
        .ok()?;
    let file = path.display();
    for pair in certs.windows(2) {
        if pair[0].issuer().as_raw() != pair[1].subject().as_raw() {
            return Some(format!(
                "in {file}, {} is followed by {}, not by its issuer {}: clients may refuse the chain; put each certificate before its issuer, as certbot's fullchain.pem has them",
                pair[0].subject(),
                pair[1].subject(),
                pair[0].issuer()
            ));
        }
    }
    // Walked as a client builds it, up to the first certificate the store vouches for (its subject is a root
    // the store holds, or its issuer is): what lies past that (a cross-signed root, an expired old root) is
    // never needed, and was taken for a broken chain.
    let trusted = store_subjects(store);
    let in_store = |name: &[u8]| trusted.as_ref().is_some_and(|t| t.contains(name));
    for (i, c) in certs.iter().enumerate() {
        if i > 0 {
            if in_store(c.subject().as_raw()) {
                return None;
            }
            let when = match dates(c).trouble(now) {
                Some(Trouble::Expired(t)) => Some(format!("expired on {}", day(t))),
                Some(Trouble::NotYetValid(t)) => Some(format!("is not valid until {}", day(t))),
                _ => None,
            };
            if let Some(when) = when {
                return Some(format!(
                    "in {file}, the issuing certificate {} {when}: clients refuse the chain; use the CA's current chain (certbot's fullchain.pem after a renewal)",
                    c.subject()
                ));
            }
        }
        if in_store(c.issuer().as_raw()) || c.issuer().as_raw() == c.subject().as_raw() {
            return None;
        }
    }
    // Without the store, a missing issuer is not judged: it may be a root found there.
    trusted.as_ref()?;
    let last = certs.last()?;
    Some(format!(
        "{file} ends with a certificate issued by {}, which neither the file nor this machine's CA store ({}) holds: a device that lacks it refuses the certificate. From a public CA, the file needs its intermediates (certbot's fullchain.pem, not cert.pem); from a private CA, append the CA's own certificate to the file (the chain then ends there) and give it to the devices",
        last.issuer(),
        store.display()
    ))
}

/// The subjects (DER) of the CA store's certificates; `None` when it cannot be read (nothing is judged then).
fn store_subjects(store: &Path) -> Option<std::collections::HashSet<Vec<u8>>> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    Some(
        CertificateDer::pem_file_iter(store)
            .ok()?
            .flatten()
            .filter_map(|der| {
                x509_parser::parse_x509_certificate(der.as_ref())
                    .ok()
                    .map(|(_, c)| c.subject().as_raw().to_vec())
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A CA, an intermediate it signs (valid `from`..`to`), and a leaf the intermediate signs: PEMs.
    fn chain(from: (i32, u8, u8), to: (i32, u8, u8)) -> (String, String, String) {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.distinguished_name
            .push(rcgen::DnType::CommonName, "Test Root");
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let ca_issuer = rcgen::Issuer::new(ca, ca_key);
        let int_key = rcgen::KeyPair::generate().unwrap();
        let mut int = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        int.distinguished_name
            .push(rcgen::DnType::CommonName, "Test Intermediate");
        int.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        int.not_before = rcgen::date_time_ymd(from.0, from.1, from.2);
        int.not_after = rcgen::date_time_ymd(to.0, to.1, to.2);
        let int_cert = int.signed_by(&int_key, &ca_issuer).unwrap();
        let int_issuer = rcgen::Issuer::new(int, int_key);
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let leaf = rcgen::CertificateParams::new(vec!["mail.example.net".to_string()]).unwrap();
        let leaf_cert = leaf.signed_by(&leaf_key, &int_issuer).unwrap();
        (leaf_cert.pem(), int_cert.pem(), ca_cert.pem())
    }

    #[test]
    fn a_chain_is_judged_as_clients_build_it() {
        let dir = tempfile::tempdir().unwrap();
        let now = SystemTime::now();
        let (leaf, int, ca) = chain((2020, 1, 1), (2099, 1, 1));
        let store = dir.path().join("store.crt");
        std::fs::write(&store, &ca).unwrap();
        let file = |name: &str, pems: &[&str]| {
            let p = dir.path().join(name);
            std::fs::write(&p, pems.concat()).unwrap();
            p
        };
        let judge = |p: &Path| chain_warning_with(p, now, &store);

        assert_eq!(judge(&file("full.pem", &[&leaf, &int])), None);
        assert_eq!(judge(&file("with-root.pem", &[&leaf, &int, &ca])), None);
        let w = judge(&file("leaf.pem", &[&leaf])).unwrap();
        assert!(
            w.contains("issued by CN=Test Intermediate") && w.contains("fullchain.pem"),
            "{w}"
        );
        let w = judge(&file("reversed.pem", &[&int, &leaf])).unwrap();
        assert!(w.contains("not by its issuer"), "{w}");
        let (_, other, _) = chain((2020, 1, 1), (2099, 1, 1));
        let w = judge(&file("foreign.pem", &[&leaf, &other, &int])).unwrap();
        assert!(w.contains("not by its issuer"), "{w}");
        let (old_leaf, old_int, old_ca) = chain((2020, 1, 1), (2021, 1, 1));
        std::fs::write(&store, &old_ca).unwrap();
        let w = judge(&file("old.pem", &[&old_leaf, &old_int])).unwrap();
        assert!(
            w.contains("CN=Test Intermediate expired on 2021-01-01"),
            "{w}"
        );
        // Cross-signed: the root the store holds, under its own name, signed by an older root long expired (as
        // ISRG Root X1 by DST Root CA X3): clients stop at the store's root, and the rest is never looked at.
        let old_key = rcgen::KeyPair::generate().unwrap();
        let mut old = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        old.distinguished_name
            .push(rcgen::DnType::CommonName, "Old Root");
        old.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let old_issuer = rcgen::Issuer::new(old, old_key);
        let mut cross = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        cross
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Test Root");
        cross.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        cross.not_before = rcgen::date_time_ymd(2019, 1, 1);
        cross.not_after = rcgen::date_time_ymd(2021, 9, 30);
        let cross = cross
            .signed_by(&rcgen::KeyPair::generate().unwrap(), &old_issuer)
            .unwrap();
        assert_eq!(
            judge(&file("cross.pem", &[&leaf, &int, &cross.pem()])),
            None
        );
        // No store to look in: a missing issuer is not judged.
        assert_eq!(
            chain_warning_with(&dir.path().join("leaf.pem"), now, &dir.path().join("none")),
            None
        );
        // A self-signed certificate ends its own chain.
        let key = rcgen::KeyPair::generate().unwrap();
        let own = rcgen::CertificateParams::new(vec!["relay.lan".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        assert_eq!(judge(&file("own.pem", &[&own.pem()])), None);
    }
}
