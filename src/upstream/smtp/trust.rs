//! Which upstream certificates relay trusts: the system's store, or an account's `ca_file`.
//!
//! A `ca_file` may hold a CA, or the upstream's own self-signed certificate. The second is how most self-hosted
//! servers are set up, and `openssl req -x509`, the usual way to make one, marks it `CA:TRUE`; webpki (rightly,
//! for a CA) refuses such a certificate when a server presents it as its own (`CaUsedAsEndEntity`), where
//! OpenSSL-based clients accept it. So a server certificate that webpki refuses but that is, byte for byte, one
//! of the `ca_file`'s certificates (any of them) is trusted as the file says, once its dates and name are checked
//! here. This trusts nothing new: every certificate in the file is a root already, and whoever holds its key
//! could sign a certificate webpki accepts. The handshake's signature is still checked against the presented
//! certificate's key. A certificate that is not in the file gets webpki's answer, unchanged. rustls has no option
//! for this, hence the verifier.

use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, Error, RootCertStore, SignatureScheme};

/// The client config for an upstream: the platform's verifier, or `ca_file`'s certificates (PEM).
pub fn client_config(ca: Option<&[u8]>) -> Result<rustls::ClientConfig, String> {
    use rustls::pki_types::pem::PemObject;
    let Some(pem) = ca else {
        use rustls_platform_verifier::ConfigVerifierExt;
        return rustls::ClientConfig::with_platform_verifier()
            .map_err(|e| format!("the system's certificate store: {e}"));
    };
    let mut roots = RootCertStore::empty();
    let mut listed = Vec::new();
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert = cert.map_err(|e| format!("ca_file: {e}"))?;
        roots
            .add(cert.clone())
            .map_err(|e| format!("ca_file: {e}"))?;
        listed.push(cert);
    }
    if roots.is_empty() {
        return Err("ca_file: no certificate in it".into());
    }
    let provider = rustls::ClientConfig::builder().crypto_provider().clone();
    let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| format!("ca_file: {e}"))?;
    let verifier = CaFile {
        webpki,
        listed,
        algorithms: provider.signature_verification_algorithms,
    };
    Ok(rustls::ClientConfig::builder()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth())
}

#[derive(Debug)]
struct CaFile {
    webpki: Arc<WebPkiServerVerifier>,
    /// The file's certificates as they are.
    listed: Vec<CertificateDer<'static>>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for CaFile {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let refused = match self.webpki.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Ok(verified) => return Ok(verified),
            Err(e) => e,
        };
        if !self
            .listed
            .iter()
            .any(|c| c.as_ref() == end_entity.as_ref())
        {
            return Err(refused);
        }
        as_listed(end_entity, server_name, now)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// What is still checked of a certificate trusted because `ca_file` lists it: its dates, then its name. The name
/// as OpenSSL's clients check it: the subjectAltName's names, or, in a certificate that has no DNS name there
/// (Dovecot's `mkcert.sh`, `openssl req -x509 -subj /CN=host` without `-addext`), its Common Name, compared whole.
fn as_listed(
    cert: &CertificateDer<'_>,
    server_name: &ServerName<'_>,
    now: UnixTime,
) -> Result<(), Error> {
    let (_, x509) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|_| Error::InvalidCertificate(CertificateError::BadEncoding))?;
    let validity = x509.validity();
    let now = i64::try_from(now.as_secs()).unwrap_or(i64::MAX);
    if now < validity.not_before.timestamp() {
        return Err(Error::InvalidCertificate(CertificateError::NotValidYet));
    }
    if now > validity.not_after.timestamp() {
        return Err(Error::InvalidCertificate(CertificateError::Expired));
    }
    let parsed = rustls::server::ParsedCertificate::try_from(cert)?;
    let refused = match rustls::client::verify_server_name(&parsed, server_name) {
        Ok(()) => return Ok(()),
        Err(e) => e,
    };
    let dns_alt_names = match x509.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter(|n| matches!(n, x509_parser::extensions::GeneralName::DNSName(_)))
            .count(),
        _ => 0,
    };
    let common_name = match server_name {
        ServerName::DnsName(name) if dns_alt_names == 0 => x509
            .subject()
            .iter_common_name()
            .filter_map(|cn| cn.as_str().ok())
            .any(|cn| cn.eq_ignore_ascii_case(name.as_ref())),
        _ => false,
    };
    if common_name { Ok(()) } else { Err(refused) }
}
