//! Signed-JWT client authentication against the fake identity provider: client credentials with a certificate
//! (private_key_jwt, PS256 + x5t#S256 or RS256 + x5t) and Google's service-account JWT bearer grant. Each
//! assertion is verified with the public key, then the token is used for a real delivery.

mod common;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use common::idp::{form_field, idp_answering, last_token_form};
use common::upstream::FakeUpstream;
use common::*;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use rustls_pki_types::pem::PemObject;
use sha2::Digest;
use wiremock::{MockServer, ResponseTemplate};

const LISTENER: &str = "[[listener]]\naddress = \"127.0.0.1:0\"\nauth = \"none\"\n";
const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

fn token() -> ResponseTemplate {
    ResponseTemplate::new(200).set_body_json(serde_json::json!({"access_token": "jwt-token", "expires_in": 3599, "token_type": "Bearer"}))
}

/// An identity provider that issues `jwt-token`, an upstream that takes it, and a directory for the config.
async fn fakes() -> (MockServer, FakeUpstream, tempfile::TempDir) {
    (
        idp_answering(token()).await,
        FakeUpstream::start(&["jwt-token"]).await,
        tempfile::tempdir().unwrap(),
    )
}

/// Copies a fixture into `dir` with mode 0600 (relay refuses private keys readable by others).
fn private_copy(dir: &std::path::Path, name: &str) -> std::path::PathBuf {
    let to = dir.join(name);
    write_private(&to, std::fs::read(format!("{FIXTURES}/{name}")).unwrap());
    to
}

/// How long a signed assertion is valid for, in seconds.
fn lifetime(claims: &serde_json::Value) -> u64 {
    claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap()
}

fn public_key() -> DecodingKey {
    DecodingKey::from_rsa_pem(&std::fs::read(format!("{FIXTURES}/rsa-pub.pem")).unwrap()).unwrap()
}

fn cert_der() -> Vec<u8> {
    rustls_pki_types::CertificateDer::from_pem_file(format!("{FIXTURES}/rsa-cert.pem"))
        .unwrap()
        .as_ref()
        .to_vec()
}

async fn deliver_with(top: String, dir: tempfile::TempDir, upstream: &mut FakeUpstream) -> String {
    let mut relay = TestRelay::start_with(dir, &top, LISTENER).await;
    send_message(relay.addr(), b"Subject: jwt\r\n\r\nhi\r\n").await;
    let got = upstream.next().await;
    relay.attempts_done(1).await;
    got.auth
}

async fn certificate_flow(alg: &str) -> (jsonwebtoken::Header, serde_json::Value, MockServer) {
    let (idp, mut upstream, dir) = fakes().await;
    let key = private_copy(dir.path(), "rsa-key.pem");
    let top = format!(
        "default_account = \"app\"\n[[account]]\nname = \"app\"\nprovider = \"generic\"\nflow = \"client_credentials\"\nmailbox = \"noreply@example.com\"\nclient_id = \"app-client-id\"\ncertificate_file = \"{FIXTURES}/rsa-cert.pem\"\nprivate_key_file = {key:?}\n{alg}token_url = \"{}/token\"\nscope = \"https://outlook.office365.com/.default\"\nsmtp_host = \"127.0.0.1\"\nsmtp_port = {}\nsmtp_tls = \"none\"\n",
        idp.uri(),
        upstream.addr.port()
    );
    let auth = deliver_with(top, dir, &mut upstream).await;
    assert_eq!(
        auth,
        "user=noreply@example.com\x01auth=Bearer jwt-token\x01\x01"
    );
    let form = last_token_form(&idp).await;
    assert_eq!(form_field(&form, "grant_type"), Some("client_credentials"));
    assert_eq!(
        form_field(&form, "client_assertion_type"),
        Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
    );
    assert_eq!(
        form_field(&form, "client_secret"),
        None,
        "no secret alongside an assertion"
    );
    let jwt = form_field(&form, "client_assertion")
        .expect("client_assertion")
        .to_string();
    let header = jsonwebtoken::decode_header(&jwt).unwrap();
    let mut validation = Validation::new(header.alg);
    validation.set_audience(&[format!("{}/token", idp.uri())]);
    validation.set_issuer(&["app-client-id"]);
    validation.set_required_spec_claims(&["exp", "aud", "iss", "sub"]);
    let claims = jsonwebtoken::decode::<serde_json::Value>(&jwt, &public_key(), &validation)
        .expect("assertion verifies with the certificate's public key")
        .claims;
    (header, claims, idp)
}

fn check_claims(claims: &serde_json::Value) {
    assert_eq!(claims["sub"], "app-client-id");
    assert!(!claims["jti"].as_str().unwrap_or("").is_empty(), "a jti");
    let lifetime = lifetime(claims);
    assert!(lifetime <= 600, "short-lived assertion: {lifetime} s");
}

#[tokio::test]
async fn client_credentials_with_a_certificate_ps256() {
    let (header, claims, _idp) = certificate_flow("").await;
    assert_eq!(header.alg, Algorithm::PS256);
    assert_eq!(
        header.x5t_s256.as_deref(),
        Some(B64URL.encode(sha2::Sha256::digest(cert_der())).as_str())
    );
    assert_eq!(header.x5t, None);
    check_claims(&claims);
}

#[tokio::test]
async fn client_credentials_with_a_certificate_rs256_on_request() {
    let (header, claims, _idp) = certificate_flow("assertion_algorithm = \"RS256\"\n").await;
    assert_eq!(header.alg, Algorithm::RS256);
    assert_eq!(
        header.x5t.as_deref(),
        Some(B64URL.encode(sha1::Sha1::digest(cert_der())).as_str())
    );
    check_claims(&claims);
}

#[tokio::test]
async fn google_service_account_jwt_bearer() {
    let (idp, mut upstream, dir) = fakes().await;
    let keyfile = dir.path().join("sa.json");
    let key = serde_json::json!({
        "type": "service_account", "project_id": "relay-test", "private_key_id": "kid-123",
        "private_key": std::fs::read_to_string(format!("{FIXTURES}/rsa-key.pem")).unwrap(),
        "client_email": "relay@relay-test.iam.gserviceaccount.com", "client_id": "1234567890",
        "token_uri": "https://oauth2.googleapis.com/token"
    });
    write_private(&keyfile, serde_json::to_vec(&key).unwrap());
    let top = format!(
        "default_account = \"ws\"\n[[account]]\nname = \"ws\"\nprovider = \"google\"\nflow = \"service_account\"\nmailbox = \"scanner@example.org\"\nservice_account_file = {keyfile:?}\ntoken_url = \"{}/token\"\nsmtp_host = \"127.0.0.1\"\nsmtp_port = {}\nsmtp_tls = \"none\"\n",
        idp.uri(),
        upstream.addr.port()
    );
    let auth = deliver_with(top, dir, &mut upstream).await;
    assert_eq!(
        auth,
        "user=scanner@example.org\x01auth=Bearer jwt-token\x01\x01"
    );
    let form = last_token_form(&idp).await;
    assert_eq!(
        form_field(&form, "grant_type"),
        Some("urn:ietf:params:oauth:grant-type:jwt-bearer")
    );
    let jwt = form_field(&form, "assertion").expect("assertion");
    let header = jsonwebtoken::decode_header(jwt).unwrap();
    assert_eq!(header.alg, Algorithm::RS256);
    assert_eq!(header.kid.as_deref(), Some("kid-123"));
    let mut validation = Validation::new(Algorithm::RS256);
    validation.set_audience(&[format!("{}/token", idp.uri())]);
    validation.set_issuer(&["relay@relay-test.iam.gserviceaccount.com"]);
    let claims = jsonwebtoken::decode::<serde_json::Value>(jwt, &public_key(), &validation)
        .unwrap()
        .claims;
    assert_eq!(claims["sub"], "scanner@example.org");
    assert_eq!(claims["scope"], "https://mail.google.com/");
    assert!(lifetime(&claims) <= 3600);
}

/// A generic provider that wants the secret in an HTTP Basic header (client_secret_basic).
#[tokio::test]
async fn generic_provider_with_client_secret_basic() {
    let (idp, mut upstream, dir) = fakes().await;
    let secret = dir.path().join("secret");
    write_private(&secret, "s3cr:t/+\n");
    let top = format!(
        "default_account = \"gen\"\n[[account]]\nname = \"gen\"\nprovider = \"generic\"\nflow = \"client_credentials\"\nclient_auth = \"client_secret_basic\"\nmailbox = \"noreply@example.com\"\nclient_id = \"my client\"\nclient_secret_file = {secret:?}\ntoken_url = \"{}/token\"\nscope = \"smtp\"\nsmtp_host = \"127.0.0.1\"\nsmtp_port = {}\nsmtp_tls = \"none\"\n",
        idp.uri(),
        upstream.addr.port()
    );
    deliver_with(top, dir, &mut upstream).await;
    let requests = idp.received_requests().await.unwrap();
    let request = requests
        .iter()
        .rev()
        .find(|r| r.url.path() == "/token")
        .unwrap();
    let auth = request
        .headers
        .get("authorization")
        .expect("an Authorization header")
        .to_str()
        .unwrap();
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(auth.strip_prefix("Basic ").unwrap())
        .unwrap();
    // RFC 6749 section 2.3.1: each part form-urlencoded first.
    assert_eq!(
        String::from_utf8(decoded).unwrap(),
        "my+client:s3cr%3At%2F%2B"
    );
    let form = last_token_form(&idp).await;
    assert_eq!(
        form_field(&form, "client_secret"),
        None,
        "the secret is not also in the body"
    );
}
