//! Authorization code with PKCE through the real binary, the test acting as the browser: the loopback redirect,
//! the pasted redirect URL, a wrong `state`; and the password flow.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};

use base64::Engine;
use common::idp::{answer_token_requests, form_field, last_token_form, token_request};
use common::upstream::FakeUpstream;
use common::*;
use sha2::Digest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wiremock::matchers::body_string_contains;
use wiremock::{MockServer, ResponseTemplate};

fn config(
    idp: &MockServer,
    flow: &str,
    extra: &str,
    smtp_port: u16,
) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let account = format!(
        r#"default_account = "gmail"
[[account]]
name = "gmail"
provider = "generic"
flow = "{flow}"
mailbox = "scanner@example.org"
client_id = "cid-web"
token_url = "{idp}/token"
authorization_url = "{idp}/authorize"
scope = "https://mail.google.com/"
smtp_host = "127.0.0.1"
smtp_port = {smtp_port}
smtp_tls = "none"
{extra}
"#,
        idp = idp.uri(),
    );
    let path = write_config_with(
        dir.path(),
        &account,
        "address = \"127.0.0.1:0\"\nauth = \"none\"",
    );
    (dir, path)
}

/// `relay authorize` running, and the authorization URL it printed.
fn start_authorize(config: &std::path::Path) -> (Child, reqwest::Url) {
    let mut child = Command::new(relay_bin())
        .args(["authorize", "gmail", "--config"])
        .arg(config)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    loop {
        match rx.recv_timeout(LIMIT) {
            Ok(line) if line.starts_with("http") => {
                return (child, reqwest::Url::parse(&line).unwrap());
            }
            Ok(_) => {}
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("relay authorize printed no URL: {e}");
            }
        }
    }
}

fn param(url: &reqwest::Url, key: &str) -> String {
    url.query_pairs()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

/// The browser following the provider's redirect to relay's loopback listener.
async fn browser_get(redirect_uri: &str, query: &str) -> String {
    let url = reqwest::Url::parse(redirect_uri).unwrap();
    let addr = format!("{}:{}", url.host_str().unwrap(), url.port().unwrap());
    let mut tcp = tokio::time::timeout(LIMIT, tokio::net::TcpStream::connect(&addr))
        .await
        .unwrap()
        .unwrap();
    let request = format!(
        "GET {}?{query} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n",
        url.path()
    );
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut page = String::new();
    tokio::time::timeout(LIMIT, tcp.read_to_string(&mut page))
        .await
        .unwrap()
        .unwrap();
    page
}

fn field<'a>(form: &'a [(String, String)], key: &str) -> &'a str {
    form_field(form, key).unwrap_or("")
}

/// `relay authorize`, which must succeed once the browser or the user has done their part.
async fn authorized(child: Child) {
    let out = wait(child).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn wait(child: Child) -> std::process::Output {
    tokio::time::timeout(
        LIMIT,
        tokio::task::spawn_blocking(move || child.wait_with_output().unwrap()),
    )
    .await
    .expect("relay authorize finishes")
    .unwrap()
}

fn tokens(access: &str, refresh: &str) -> ResponseTemplate {
    ResponseTemplate::new(200).set_body_json(serde_json::json!({
        "access_token": access, "expires_in": 3599, "refresh_token": refresh, "scope": "https://mail.google.com/",
        "token_type": "Bearer"
    }))
}

#[tokio::test]
async fn loopback_redirect_with_pkce_then_delivery() {
    let idp = MockServer::start().await;
    answer_token_requests(&idp, tokens("access-ac", "refresh-ac")).await;
    let mut upstream = FakeUpstream::start(&["access-ac"]).await;
    let (dir, config) = config(&idp, "authorization_code", "", upstream.addr.port());
    let (child, url) = start_authorize(&config);
    assert_eq!(url.path(), "/authorize");
    assert_eq!(param(&url, "response_type"), "code");
    assert_eq!(param(&url, "client_id"), "cid-web");
    assert_eq!(param(&url, "code_challenge_method"), "S256");
    assert_eq!(param(&url, "prompt"), "consent");
    assert_eq!(param(&url, "login_hint"), "scanner@example.org");
    let redirect_uri = param(&url, "redirect_uri");
    assert!(
        redirect_uri.starts_with("http://127.0.0.1:"),
        "{redirect_uri}"
    );
    let page = browser_get(
        &redirect_uri,
        &format!("code=the-code&state={}", param(&url, "state")),
    )
    .await;
    assert!(
        page.starts_with("HTTP/1.1 200") && page.contains("You can close this tab"),
        "{page}"
    );
    authorized(child).await;

    let form = last_token_form(&idp).await;
    assert_eq!(field(&form, "grant_type"), "authorization_code");
    assert_eq!(field(&form, "code"), "the-code");
    assert_eq!(field(&form, "redirect_uri"), redirect_uri);
    let verifier = field(&form, "code_verifier");
    let challenge = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(sha2::Sha256::digest(verifier.as_bytes()));
    assert_eq!(
        challenge,
        param(&url, "code_challenge"),
        "code_verifier matches the code_challenge"
    );

    // The grant is used for delivery.
    let daemon = Daemon::spawn(&config);
    send_message(daemon.addr, b"Subject: via auth code\r\n\r\nhi\r\n").await;
    let got = upstream.next().await;
    assert_eq!(
        got.auth,
        "user=scanner@example.org\x01auth=Bearer access-ac\x01\x01"
    );
    drop(dir);
}

/// The browser's page says what became of the sign-in once relay knows: a code the token endpoint then refuses
/// is "not authorized" there too, not "authorized" with the failure on the terminal only. And a refusal redirect
/// that is not this sign-in's (no state, or another) cannot end it as the user's refusal.
#[tokio::test]
async fn the_browser_is_told_the_outcome_and_a_refusal_needs_the_state() {
    let idp = MockServer::start().await;
    token_request()
        .respond_with(ResponseTemplate::new(400).set_body_json(serde_json::json!({
            "error": "invalid_grant", "error_description": "AADSTS70000: the code was already used"
        })))
        .mount(&idp)
        .await;
    let (_dir, config) = config(&idp, "authorization_code", "", 9);
    let (child, url) = start_authorize(&config);
    let page = browser_get(
        &param(&url, "redirect_uri"),
        &format!("code=the-code&state={}", param(&url, "state")),
    )
    .await;
    assert!(
        page.starts_with("HTTP/1.1 400") && page.contains("relay was not authorized"),
        "{page}"
    );
    let out = wait(child).await;
    assert_eq!(out.status.code(), Some(1));

    // A refusal without the state is not this sign-in's: answered, and the sign-in goes on; the user's own
    // refusal, with the state, ends it with the provider's words.
    let (child, url) = start_authorize(&config);
    let redirect = param(&url, "redirect_uri");
    let page = browser_get(&redirect, "error=access_denied&error_description=forged").await;
    assert!(
        page.starts_with("HTTP/1.1 400") && page.contains("goes on"),
        "{page}"
    );
    // Nor is a code without a state (any page the browser opens can send one).
    let page = browser_get(&redirect, "code=forged").await;
    assert!(
        page.starts_with("HTTP/1.1 400") && page.contains("goes on"),
        "{page}"
    );
    let page = browser_get(
        &redirect,
        &format!(
            "error=access_denied&error_description=the+user+declined&state={}",
            param(&url, "state")
        ),
    )
    .await;
    assert!(page.starts_with("HTTP/1.1 400"), "{page}");
    let out = wait(child).await;
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("access_denied") && !err.contains("state does not match"),
        "{err}"
    );
}

#[tokio::test]
async fn pasted_redirect_url_works_and_wrong_state_is_refused() {
    let idp = MockServer::start().await;
    answer_token_requests(&idp, tokens("access-p", "refresh-p")).await;
    // A confidential client: its secret goes with the code exchange.
    let secret = tempfile::NamedTempFile::new().unwrap();
    write_private(secret.path(), "web-secret\n");
    let extra = format!("client_secret_file = {:?}", secret.path());
    let (dir, config) = config(&idp, "authorization_code", &extra, 9);

    // Headless: the user pastes the address the browser ended on.
    let (mut child, url) = start_authorize(&config);
    let pasted = format!(
        "{}?code=pasted-code&state={}\n",
        param(&url, "redirect_uri"),
        param(&url, "state")
    );
    child
        .stdin
        .as_mut()
        .unwrap()
        .write_all(pasted.as_bytes())
        .unwrap();
    authorized(child).await;
    let form = last_token_form(&idp).await;
    assert_eq!(field(&form, "code"), "pasted-code");
    assert_eq!(field(&form, "client_secret"), "web-secret");
    assert!(
        !field(&form, "code_verifier").is_empty(),
        "PKCE with a confidential client too"
    );
    assert!(dir.path().join("state/tokens/gmail.json").exists());

    // A redirect whose state is not this sign-in's is refused in the browser, and the sign-in goes on: the real
    // redirect after it is taken. Pasted, a wrong state ends the run with the reason.
    let (child, url) = start_authorize(&config);
    let redirect = param(&url, "redirect_uri");
    let page = browser_get(&redirect, "code=forged&state=not-the-state").await;
    assert!(
        page.starts_with("HTTP/1.1 400") && page.contains("goes on"),
        "{page}"
    );
    let page = browser_get(
        &redirect,
        &format!("code=real-code&state={}", param(&url, "state")),
    )
    .await;
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    authorized(child).await;
    assert_eq!(field(&last_token_form(&idp).await, "code"), "real-code");
    let (mut child, url) = start_authorize(&config);
    child
        .stdin
        .as_mut()
        .unwrap()
        .write_all(format!("{}?code=x&state=wrong\n", param(&url, "redirect_uri")).as_bytes())
        .unwrap();
    let out = wait(child).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("state does not match"));
    let requests = idp.received_requests().await.unwrap();
    assert!(
        !requests
            .iter()
            .any(|r| String::from_utf8_lossy(&r.body).contains("forged")),
        "forged code never exchanged"
    );
}

#[tokio::test]
async fn password_flow_signs_in_by_itself() {
    let idp = MockServer::start().await;
    token_request()
        .and(body_string_contains("grant_type=password"))
        .and(body_string_contains("username=scanner%40example.org"))
        .and(body_string_contains("password=p%40ss+word"))
        .respond_with(tokens("access-pw", "refresh-pw"))
        .mount(&idp)
        .await;
    let mut upstream = FakeUpstream::start(&["access-pw"]).await;
    let pw = tempfile::NamedTempFile::new().unwrap();
    write_private(pw.path(), "p@ss word\n");
    let extra = format!("password_file = {:?}", pw.path());
    let (_dir, config) = config(&idp, "password", &extra, upstream.addr.port());
    let out = Command::new(relay_bin())
        .args(["check", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("MFA") && text.contains("Conditional Access"),
        "check warns: {text}"
    );
    let daemon = Daemon::spawn(&config);
    send_message(daemon.addr, b"Subject: pw\r\n\r\nhi\r\n").await;
    let got = upstream.next().await;
    assert!(got.auth.contains("Bearer access-pw"));
}
