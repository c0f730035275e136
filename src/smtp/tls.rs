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

use crate::config::TlsCompat;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: cannot read certificates: {reason}")]
    Cert { path: String, reason: String },
    #[error("{path}: cannot read a private key: {reason}")]
    Key { path: String, reason: String },
    #[error("certificate and key do not fit together: {0}")]
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
pub fn handshake_failure(e: &io::Error, compat: TlsCompat) -> Option<String> {
    use rustls::{AlertDescription, Error};
    if matches!(
        e.kind(),
        io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
    ) {
        return None;
    }
    let Some(tls) = e.get_ref().and_then(|inner| inner.downcast_ref::<Error>()) else {
        return Some(e.to_string());
    };
    let hint = match tls {
        // TLS 1.0/1.1 clients fail for want of an extension TLS 1.2 made mandatory; others for want of a cipher
        // or key exchange in common. Both are old devices, which the OpenSSL listener serves.
        Error::PeerIncompatible(_) if compat == TlsCompat::Modern => {
            "the client's TLS is older than this listener takes (TLS 1.2 and 1.3, modern ciphers); for old devices set tls_compat = \"legacy\" on this listener"
        }
        Error::InvalidMessage(_) => {
            "what the client sent is not TLS: a plain SMTP client on a port with tls = \"implicit\" needs a listener with tls = \"starttls\" or \"auto\""
        }
        Error::AlertReceived(
            AlertDescription::UnknownCA
            | AlertDescription::BadCertificate
            | AlertDescription::CertificateUnknown
            | AlertDescription::CertificateExpired
            | AlertDescription::UnsupportedCertificate,
        ) => {
            "the client does not accept this listener's certificate (its issuer, its name or its dates): give the device the CA, or a certificate it trusts"
        }
        _ => return Some(tls.to_string()),
    };
    Some(format!("{tls}: {hint}"))
}

pub fn rustls_acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, TlsError> {
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::Cert {
            path: cert.display().to_string(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Cert {
            path: cert.display().to_string(),
            reason: "no CERTIFICATE block found".into(),
        });
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Key {
        path: key.display().to_string(),
        reason: e.to_string(),
    })?;
    let config = ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    Ok(TlsAcceptor::from(Arc::new(config)))
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

    #[test]
    fn a_failed_handshake_says_what_to_do() {
        let old = wrapped(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::SignatureAlgorithmsExtensionRequired,
        ));
        let said = handshake_failure(&old, TlsCompat::Modern).unwrap();
        assert!(said.contains("tls_compat = \"legacy\""), "{said}");
        // A legacy listener already is what the hint would suggest.
        let said = handshake_failure(&old, TlsCompat::Legacy).unwrap();
        assert!(!said.contains("tls_compat"), "{said}");
        let untrusted = wrapped(rustls::Error::AlertReceived(
            rustls::AlertDescription::UnknownCA,
        ));
        let said = handshake_failure(&untrusted, TlsCompat::Modern).unwrap();
        assert!(
            said.contains("does not accept this listener's certificate"),
            "{said}"
        );
        let gone = io::Error::new(io::ErrorKind::UnexpectedEof, "tls handshake eof");
        assert_eq!(handshake_failure(&gone, TlsCompat::Modern), None);
    }
}
