//! The OpenSSL acceptor behind `tls_compat = "legacy"`: TLS 1.0 and 1.1, RSA key exchange and CBC suites, which
//! printers and scanners made before about 2016 offer and rustls refuses by design. Opt-in per listener; modern
//! listeners never touch this code.

use std::io;
use std::path::Path;
use std::pin::Pin;

use openssl::ssl::{Ssl, SslAcceptor, SslFiletype, SslMethod, SslOptions, SslVersion};
use tokio::net::TcpStream;
use tokio_openssl::SslStream;

use super::tls::TlsError;

/// Modern suites first (the server's order wins), then whatever else OpenSSL has that is not broken outright
/// (no anonymous, null, export, RC4, MD5 or single-DES suites). OpenSSL 3 refuses TLS 1.0/1.1 and SHA-1
/// signatures above security level 0, whatever the protocol range says.
const LEGACY_CIPHERS: &str = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:ALL:!aNULL:!eNULL:!EXPORT:!RC4:!MD5:!DES:!PSK:!SRP:@SECLEVEL=0";

pub fn acceptor(cert: &Path, key: &Path) -> Result<SslAcceptor, TlsError> {
    let e =
        |what: &str, err: openssl::error::ErrorStack| TlsError::Legacy(format!("{what}: {err}"));
    let mut b = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls_server())
        .map_err(|err| e("set-up", err))?;
    // The intermediate profile (curves, DH parameters, TLS 1.3 suites) with its TLS 1.2 floor taken out.
    b.clear_options(SslOptions::NO_TLSV1 | SslOptions::NO_TLSV1_1);
    // The profile leaves the choice to the client; here the server's order must win, or a client listing RSA key
    // exchange first would get it even though it can do ECDHE with GCM.
    b.set_options(SslOptions::CIPHER_SERVER_PREFERENCE);
    b.set_min_proto_version(Some(SslVersion::TLS1))
        .map_err(|err| e("TLS 1.0 minimum", err))?;
    b.set_cipher_list(LEGACY_CIPHERS)
        .map_err(|err| e("cipher list", err))?;
    b.set_certificate_chain_file(cert)
        .map_err(|err| e(&cert.display().to_string(), err))?;
    b.set_private_key_file(key, SslFiletype::PEM)
        .map_err(|err| e(&key.display().to_string(), err))?;
    b.check_private_key()
        .map_err(|err| e("certificate and key do not fit together", err))?;
    Ok(b.build())
}

pub async fn accept(acceptor: &SslAcceptor, tcp: TcpStream) -> io::Result<SslStream<TcpStream>> {
    let ssl = Ssl::new(acceptor.context()).map_err(io::Error::other)?;
    let mut stream = SslStream::new(ssl, tcp).map_err(io::Error::other)?;
    Pin::new(&mut stream).accept().await.map_err(|err| {
        // A client that hangs up before or during its hello (a health check's connect and close) is an end of
        // file, as rustls reports it, so that it is not logged as a failed handshake.
        if hung_up(&err) {
            return io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "closed during the TLS handshake",
            );
        }
        match err.into_io_error() {
            Ok(io) => io,
            Err(err) => io::Error::other(err.to_string()),
        }
    })?;
    Ok(stream)
}

/// OpenSSL's ways of saying the peer closed mid-handshake: a syscall error without an errno (1.1), or
/// `SSL_R_UNEXPECTED_EOF_WHILE_READING` (3.0).
fn hung_up(err: &openssl::ssl::Error) -> bool {
    const UNEXPECTED_EOF_WHILE_READING: std::ffi::c_int = 294;
    let syscall_eof = err.code() == openssl::ssl::ErrorCode::SYSCALL
        && err.io_error().is_none()
        && err
            .ssl_error()
            .is_none_or(|stack| stack.errors().is_empty());
    let eof_reason = err.ssl_error().is_some_and(|stack| {
        stack
            .errors()
            .iter()
            .any(|e| e.reason_code() == UNEXPECTED_EOF_WHILE_READING)
    });
    syscall_eof || eof_reason
}
