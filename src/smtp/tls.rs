//! Server TLS from PEM files: rustls for every listener, OpenSSL (`legacy`) only where a listener opts in for
//! devices that rustls cannot serve. The session above sees one stream type either way.

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

use crate::config::{ListenerTls, TlsCompat};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: cannot read certificates: {reason}")]
    Cert { path: String, reason: String },
    #[error("{path}: cannot read a private key: {reason}")]
    Key { path: String, reason: String },
    #[error(
        "the key in {key} is not the key of the first certificate in {cert}: the server's own certificate must come first, its chain after it"
    )]
    Mismatch { cert: String, key: String },
    #[error("certificate and key cannot be used: {0}")]
    Config(#[from] rustls::Error),
    #[error("legacy TLS (OpenSSL): {0}")]
    Legacy(String),
}

impl TlsError {
    /// The listener's config key the error is about, so that `relay check` names the file that needs fixing.
    pub fn config_key(&self) -> &'static str {
        match self {
            TlsError::Key { .. } => "key",
            _ => "cert",
        }
    }
}

/// A listener's TLS acceptor.
#[derive(Clone)]
pub enum ServerTls {
    Modern(TlsAcceptor),
    #[cfg(feature = "legacy-tls")]
    Legacy(Arc<openssl::ssl::SslAcceptor>),
}

/// Loads a certificate chain and its key into an acceptor of the listener's kind.
pub fn acceptor(cert: &Path, key: &Path, compat: TlsCompat) -> Result<ServerTls, TlsError> {
    // The rustls load runs for legacy listeners too: it checks the files with the same messages.
    let modern = rustls_acceptor(cert, key)?;
    match compat {
        TlsCompat::Modern => Ok(ServerTls::Modern(modern)),
        #[cfg(feature = "legacy-tls")]
        TlsCompat::Legacy => Ok(ServerTls::Legacy(Arc::new(super::tls_legacy::acceptor(
            cert, key,
        )?))),
        #[cfg(not(feature = "legacy-tls"))]
        TlsCompat::Legacy => Err(TlsError::Legacy(
            "this relay was built without the `legacy-tls` feature".into(),
        )),
    }
}

impl ServerTls {
    /// Runs the server side of a handshake.
    pub async fn accept(&self, tcp: TcpStream) -> io::Result<TlsConn> {
        match self {
            ServerTls::Modern(a) => Ok(TlsConn::Modern(Box::new(a.accept(tcp).await?))),
            #[cfg(feature = "legacy-tls")]
            ServerTls::Legacy(a) => Ok(TlsConn::Legacy(Box::new(
                super::tls_legacy::accept(a, tcp).await?,
            ))),
        }
    }
}

/// What a failed handshake is logged as: the error with what a sysadmin can do about it, or `None` for a client
/// that just hung up (a health check's connect and close, a client giving up).
/// `mode`: where the listener's TLS begins. At connect (implicit), a plain client's bytes arrive where a
/// ClientHello is awaited; `auto` has already told plain SMTP apart, so what fails there is an old device's
/// SSLv2-format hello; on a STARTTLS listener the client asked for TLS itself.
pub fn handshake_failure(e: &io::Error, compat: TlsCompat, mode: ListenerTls) -> Option<String> {
    use rustls::{AlertDescription, Error, InvalidMessage};
    if matches!(
        e.kind(),
        io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
    ) {
        return None;
    }
    let Some(tls) = e.get_ref().and_then(|inner| inner.downcast_ref::<Error>()) else {
        // The legacy listener's OpenSSL says it in its own words: the same hints, found in them.
        let text = e.to_string();
        return Some(match openssl_hint(&text, mode) {
            Some(hint) => format!("{text}: {hint}"),
            None => text,
        });
    };
    let hint = match tls {
        // TLS 1.0/1.1 clients fail for want of an extension TLS 1.2 made mandatory; others for want of a cipher
        // or key exchange in common. Both are old devices, which the OpenSSL listener serves.
        Error::PeerIncompatible(_) if compat == TlsCompat::Modern => {
            "the client's TLS is older than this listener takes (TLS 1.2 and 1.3, modern ciphers); for old devices set tls_compat = \"legacy\" on this listener"
        }
        Error::InvalidMessage(InvalidMessage::InvalidContentType)
            if mode == ListenerTls::Implicit =>
        {
            "what the client sent is not TLS 1.2 or later: a plain SMTP client on a port with tls = \"implicit\" needs a listener with tls = \"starttls\" or \"auto\"; an old device's SSLv2-format hello needs tls_compat = \"legacy\""
        }
        Error::InvalidMessage(InvalidMessage::InvalidContentType) if mode == ListenerTls::Auto => {
            "what the client sent is neither plain SMTP nor TLS 1.2 or later (an old device's SSLv2-format hello?): set tls_compat = \"legacy\" on this listener"
        }
        Error::AlertReceived(
            AlertDescription::UnknownCA
            | AlertDescription::BadCertificate
            | AlertDescription::CertificateUnknown
            | AlertDescription::CertificateExpired
            | AlertDescription::UnsupportedCertificate,
        ) => CERT_REFUSED,
        _ => return Some(tls.to_string()),
    };
    Some(format!("{tls}: {hint}"))
}

const CERT_REFUSED: &str = "the client does not accept this listener's certificate (its issuer, its name or its dates): give the device the CA, or a certificate it trusts; a file without its intermediates (cert.pem where fullchain.pem belongs) is refused too, and `relay check` says so";

/// The hint for an OpenSSL handshake error (the legacy listener's), from its reason's words.
fn openssl_hint(text: &str, mode: ListenerTls) -> Option<&'static str> {
    let lower = text.to_ascii_lowercase();
    let says = |words: &[&str]| words.iter().any(|w| lower.contains(w));
    if says(&["wrong version number", "http request", "unknown protocol"])
        && mode != ListenerTls::Starttls
    {
        return Some(
            "what the client sent is not TLS: a plain SMTP client on a port with tls = \"implicit\" needs a listener with tls = \"starttls\" or \"auto\"",
        );
    }
    if says(&[
        "alert unknown ca",
        "alert bad certificate",
        "alert certificate unknown",
        "alert certificate expired",
        "alert unsupported certificate",
    ]) {
        return Some(CERT_REFUSED);
    }
    if says(&["no shared cipher"]) {
        return Some(
            "the client offers no cipher this listener can use with its certificate: an old device often wants RSA key exchange, which needs an RSA certificate (an EC key serves ECDSA suites only)",
        );
    }
    if says(&["unsupported protocol", "version too low"]) {
        return Some(
            "the client's TLS is older than even tls_compat = \"legacy\" takes (TLS 1.0 at the least): the device needs a firmware update, or plain SMTP on a trusted LAN",
        );
    }
    None
}

pub fn rustls_acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, TlsError> {
    let cert_error = |reason: String| TlsError::Cert {
        path: cert.display().to_string(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|e| cert_error(pem_words(&e)))?;
    let Some(first) = certs.first() else {
        return Err(cert_error("no CERTIFICATE block found".into()));
    };
    // What rustls would refuse in its own terms ("UnsupportedCertVersion", "failed to parse private key"),
    // said here in a sysadmin's.
    if let Some(reason) = unservable(first) {
        return Err(cert_error(reason));
    }
    let key_error = |reason: String| TlsError::Key {
        path: key.display().to_string(),
        reason,
    };
    let private = PrivateKeyDer::from_pem_file(key).map_err(|e| {
        let encrypted = std::fs::read(key).is_ok_and(|text| {
            memchr::memmem::find(&text, b"ENCRYPTED").is_some()
        });
        if encrypted {
            key_error(format!(
                "the key is protected by a passphrase, which relay cannot ask for: write it out unprotected (0600), e.g. `openssl pkey -in {0} -out {0}.plain`",
                key.display()
            ))
        } else {
            key_error(pem_words(&e))
        }
    })?;
    let config = ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, private)
        .map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => TlsError::Mismatch {
                cert: cert.display().to_string(),
                key: key.display().to_string(),
            },
            other => TlsError::Config(other),
        })?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Why a server certificate that parses cannot be served, if it cannot: not X.509 version 3 (what `openssl x509
/// -req` makes without extensions), or an RSA key too short for the crypto library.
fn unservable(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    // Version 3 is encoded as 2; any other value (up to u32::MAX in a crafted file) is said as encoded plus one.
    let encoded = parsed.version().0;
    if encoded != 2 {
        let version = u64::from(encoded) + 1;
        return Some(format!(
            "the certificate is X.509 version {version}; TLS needs version 3 (`openssl req -x509` makes one, and `openssl x509 -req` does with `-copy_extensions copy` or `-extfile`)"
        ));
    }
    if let Ok(x509_parser::public_key::PublicKey::RSA(rsa)) = parsed.public_key().parsed() {
        let bits = rsa.key_size();
        if bits > 0 && bits < 2048 {
            return Some(format!(
                "the certificate's RSA key has {bits} bits; at least 2048 are needed"
            ));
        }
    }
    None
}

/// A PEM file's problem in words (the library's own names a missing END line by its bytes).
fn pem_words(e: &rustls_pki_types::pem::Error) -> String {
    use rustls_pki_types::pem::Error;
    match e {
        Error::MissingSectionEnd { .. } => {
            "a PEM block has no END line: the file looks cut short".into()
        }
        Error::IllegalSectionStart { .. } => "a PEM block's BEGIN line is malformed".into(),
        Error::Base64Decode(_) => "a PEM block is not valid base64: the file is damaged".into(),
        Error::NoItemsFound => "no PEM block of the expected kind found".into(),
        other => other.to_string(),
    }
}

/// A server-side TLS connection of either kind. Boxed: a TLS stream carries its buffers inline.
pub enum TlsConn {
    Modern(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    #[cfg(feature = "legacy-tls")]
    Legacy(Box<tokio_openssl::SslStream<TcpStream>>),
}

impl AsyncRead for TlsConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            TlsConn::Modern(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            #[cfg(feature = "legacy-tls")]
            TlsConn::Legacy(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            TlsConn::Modern(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            #[cfg(feature = "legacy-tls")]
            TlsConn::Legacy(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            TlsConn::Modern(s) => Pin::new(s.as_mut()).poll_flush(cx),
            #[cfg(feature = "legacy-tls")]
            TlsConn::Legacy(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            TlsConn::Modern(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            #[cfg(feature = "legacy-tls")]
            TlsConn::Legacy(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wrapped(e: rustls::Error) -> io::Error {
        // As tokio-rustls hands a failed handshake over.
        io::Error::new(io::ErrorKind::InvalidData, e)
    }

    /// Loads `cert` and `key` (PEM text) from files, as a listener would; the error's words.
    fn load_error(cert: &[u8], key: &[u8]) -> String {
        let dir = tempfile::tempdir().unwrap();
        let (c, k) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        std::fs::write(&c, cert).unwrap();
        std::fs::write(&k, key).unwrap();
        match rustls_acceptor(&c, &k) {
            Ok(_) => "loaded".into(),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn certificate_files_that_cannot_be_served_are_said_in_words() {
        let made = |name: &str| {
            let key = rcgen::KeyPair::generate().unwrap();
            let cert = rcgen::CertificateParams::new(vec![name.to_string()])
                .unwrap()
                .self_signed(&key)
                .unwrap();
            (cert.pem(), key.serialize_pem())
        };
        let (cert, key) = made("localhost");
        assert_eq!(load_error(cert.as_bytes(), key.as_bytes()), "loaded");
        // Another certificate first (a chain in the wrong order), or another key: both files are named.
        let (other, other_key) = made("ca");
        let said = load_error(format!("{other}{cert}").as_bytes(), key.as_bytes());
        assert!(
            said.contains("is not the key of the first certificate in")
                && said.contains("key.pem")
                && said.contains("cert.pem")
                && said.contains("must come first"),
            "{said}"
        );
        let said = load_error(cert.as_bytes(), other_key.as_bytes());
        assert!(
            said.contains("is not the key of the first certificate"),
            "{said}"
        );
        // Cut short.
        let said = load_error(&cert.as_bytes()[..cert.len() / 2], key.as_bytes());
        assert!(said.contains("has no END line"), "{said}");
    }

    /// What OpenSSL's command line makes and rustls refuses in its own terms: a version 1 certificate, a 1024-bit
    /// RSA key, a key under a passphrase.
    #[cfg(feature = "legacy-tls")]
    #[test]
    fn what_openssl_makes_and_rustls_refuses_is_said_in_words() {
        use openssl::{asn1::Asn1Time, hash::MessageDigest, pkey::PKey, rsa::Rsa, x509};
        let x509 = |bits: u32, version: i32| {
            let key = PKey::from_rsa(Rsa::generate(bits).unwrap()).unwrap();
            let mut name = x509::X509NameBuilder::new().unwrap();
            name.append_entry_by_text("CN", "localhost").unwrap();
            let name = name.build();
            let mut b = x509::X509Builder::new().unwrap();
            b.set_version(version).unwrap();
            b.set_subject_name(&name).unwrap();
            b.set_issuer_name(&name).unwrap();
            b.set_pubkey(&key).unwrap();
            b.set_not_before(&Asn1Time::days_from_now(0).unwrap())
                .unwrap();
            b.set_not_after(&Asn1Time::days_from_now(30).unwrap())
                .unwrap();
            b.sign(&key, MessageDigest::sha256()).unwrap();
            (b.build().to_pem().unwrap(), key)
        };
        let (v1, key) = x509(2048, 0);
        let plain = key.private_key_to_pem_pkcs8().unwrap();
        let said = load_error(&v1, &plain);
        assert!(
            said.contains("X.509 version 1; TLS needs version 3"),
            "{said}"
        );
        let (short, short_key) = x509(1024, 2);
        let said = load_error(&short, &short_key.private_key_to_pem_pkcs8().unwrap());
        assert!(said.contains("RSA key has 1024 bits"), "{said}");
        let (v3, key) = x509(2048, 2);
        let locked = key
            .private_key_to_pem_pkcs8_passphrase(openssl::symm::Cipher::aes_256_cbc(), b"secret")
            .unwrap();
        let said = load_error(&v3, &locked);
        assert!(said.contains("protected by a passphrase"), "{said}");
        assert_eq!(
            load_error(&v3, &key.private_key_to_pem_pkcs8().unwrap()),
            "loaded"
        );
    }

    #[test]
    fn a_failed_handshake_says_what_to_do() {
        let old = wrapped(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::SignatureAlgorithmsExtensionRequired,
        ));
        let said = handshake_failure(&old, TlsCompat::Modern, ListenerTls::Implicit).unwrap();
        assert!(said.contains("tls_compat = \"legacy\""), "{said}");
        // A legacy listener already is what the hint would suggest.
        let said = handshake_failure(&old, TlsCompat::Legacy, ListenerTls::Implicit).unwrap();
        assert!(!said.contains("tls_compat"), "{said}");
        let untrusted = wrapped(rustls::Error::AlertReceived(
            rustls::AlertDescription::UnknownCA,
        ));
        let said = handshake_failure(&untrusted, TlsCompat::Modern, ListenerTls::Implicit).unwrap();
        assert!(
            said.contains("does not accept this listener's certificate"),
            "{said}"
        );
        let gone = io::Error::new(io::ErrorKind::UnexpectedEof, "tls handshake eof");
        assert_eq!(
            handshake_failure(&gone, TlsCompat::Modern, ListenerTls::Implicit),
            None
        );
        // Plain text where a ClientHello was awaited: the hint only where the listener began TLS itself; a
        // hello too large is not plain text.
        let plain = || {
            wrapped(rustls::Error::InvalidMessage(
                rustls::InvalidMessage::InvalidContentType,
            ))
        };
        let hint = "needs a listener with tls = \"starttls\"";
        let said = handshake_failure(&plain(), TlsCompat::Modern, ListenerTls::Implicit).unwrap();
        assert!(said.contains(hint), "{said}");
        let said = handshake_failure(&plain(), TlsCompat::Modern, ListenerTls::Starttls).unwrap();
        assert!(
            !said.contains(hint) && !said.contains("tls_compat"),
            "{said}"
        );
        // `auto` took plain SMTP for plain SMTP already: what is left is an old device's hello.
        let said = handshake_failure(&plain(), TlsCompat::Modern, ListenerTls::Auto).unwrap();
        assert!(
            !said.contains(hint) && said.contains("tls_compat = \"legacy\""),
            "{said}"
        );
        // The legacy listener's OpenSSL, in its words.
        let openssl = |text: &str, mode| {
            handshake_failure(&io::Error::other(text.to_string()), TlsCompat::Legacy, mode).unwrap()
        };
        let said = openssl(
            "error:0A00010B:SSL routines:ssl3_get_record:wrong version number:../ssl/record/ssl3_record.c:350:",
            ListenerTls::Implicit,
        );
        assert!(said.contains(hint), "{said}");
        let said = openssl(
            "error:0A00010B:SSL routines:ssl3_get_record:wrong version number",
            ListenerTls::Starttls,
        );
        assert!(!said.contains(hint), "{said}");
        let said = openssl(
            "error:0A000418:SSL routines:ssl3_read_bytes:tlsv1 alert unknown ca:../ssl/record/rec_layer_s3.c:1601:SSL alert number 48",
            ListenerTls::Implicit,
        );
        assert!(
            said.contains("does not accept this listener's certificate"),
            "{said}"
        );
        let said = openssl(
            "error:0A0000C1:SSL routines:tls_post_process_client_hello:no shared cipher",
            ListenerTls::Starttls,
        );
        assert!(said.contains("RSA certificate"), "{said}");
        let huge = wrapped(rustls::Error::InvalidMessage(
            rustls::InvalidMessage::HandshakePayloadTooLarge,
        ));
        let said = handshake_failure(&huge, TlsCompat::Modern, ListenerTls::Implicit).unwrap();
        assert!(!said.contains(hint), "{said}");
    }
}
