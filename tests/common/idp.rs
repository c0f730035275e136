//! The fake identity provider (wiremock): token replies in Microsoft's JSON, a relay with an account pointed
//! at it and at a fake upstream, and reading what the fake received.

use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use super::TestRelay;
use super::upstream::FakeUpstream;

/// Account keys for tests about what the client sent: its MAIL FROM goes upstream unchanged (the default,
/// `envelope`, sends the mailbox instead).
pub const AS_SENT: &str = "rewrite_from = \"none\"";

pub const LISTENER: &str = "[[listener]]\naddress = \"127.0.0.1:0\"\nauth = \"none\"\n";

/// The form fields of the last request to `/token`.
pub async fn last_token_form(idp: &MockServer) -> Vec<(String, String)> {
    let requests = idp.received_requests().await.unwrap();
    let last = requests
        .iter()
        .rev()
        .find(|r| r.url.path() == "/token")
        .expect("a token request");
    reqwest::Url::parse(&format!(
        "http://x/?{}",
        String::from_utf8_lossy(&last.body)
    ))
    .unwrap()
    .query_pairs()
    .map(|(k, v)| (k.into_owned(), v.into_owned()))
    .collect()
}

/// How many requests the fake identity provider got at its token endpoint.
pub async fn token_requests_made(idp: &MockServer) -> usize {
    idp.received_requests()
        .await
        .unwrap()
        .iter()
        .filter(|r| r.url.path() == "/token")
        .count()
}

/// One form field, if present.
pub fn form_field<'a>(form: &'a [(String, String)], key: &str) -> Option<&'a str> {
    form.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

pub fn token(access: &str) -> ResponseTemplate {
    ResponseTemplate::new(200).set_body_json(serde_json::json!({
        "token_type": "Bearer", "expires_in": 3599, "ext_expires_in": 3599, "access_token": access
    }))
}

/// The requests to the token endpoint, `/token`, to be narrowed (`.and(...)`) and answered.
pub fn token_request() -> wiremock::MockBuilder {
    Mock::given(method("POST")).and(path("/token"))
}

/// Answers every token request at `idp` with `reply`.
pub async fn answer_token_requests(idp: &MockServer, reply: ResponseTemplate) {
    token_request().respond_with(reply).mount(idp).await;
}

/// A fake identity provider that answers every token request with `reply`.
pub async fn idp_answering(reply: ResponseTemplate) -> MockServer {
    let idp = MockServer::start().await;
    answer_token_requests(&idp, reply).await;
    idp
}

/// A fake identity provider that issues `access` to every token request.
pub async fn idp_issuing(access: &str) -> MockServer {
    idp_answering(token(access)).await
}

/// A fake identity provider whose first token is `stale` (the upstream refuses it) and every later one `fresh`.
pub async fn idp_stale_then_fresh() -> MockServer {
    let idp = MockServer::start().await;
    token_request()
        .respond_with(token("stale"))
        .up_to_n_times(1)
        .mount(&idp)
        .await;
    answer_token_requests(&idp, token("fresh")).await;
    idp
}

/// A client-credentials account pointed at the fakes.
pub async fn relay_with_account(idp: &MockServer, upstream: &FakeUpstream) -> TestRelay {
    relay_with_account_and(idp, upstream, "").await
}

/// As [`relay_with_account`], with more TOML tables (e.g. `[queue]`) after the account.
pub async fn relay_with_account_and(
    idp: &MockServer,
    upstream: &FakeUpstream,
    more: &str,
) -> TestRelay {
    relay_with_account_at(&idp.uri(), upstream, more).await
}

/// As [`relay_with_account_and`], with the identity provider at `idp` (which need not be up).
pub async fn relay_with_account_at(idp: &str, upstream: &FakeUpstream, more: &str) -> TestRelay {
    let dir = tempfile::tempdir().unwrap();
    let top = account_top(dir.path(), idp, upstream, more);
    TestRelay::start_with(dir, &top, LISTENER).await
}

/// The top of a config with one client-credentials account, `office`, pointed at the fakes (its secret file is
/// written into `dir`); `more` goes after the account's keys.
pub fn account_top(
    dir: &std::path::Path,
    idp: &str,
    upstream: &FakeUpstream,
    more: &str,
) -> String {
    write_secret_value(dir, "s3cret-value");
    format!(
        r#"default_account = "office"
[[account]]
name = "office"
provider = "generic"
flow = "client_credentials"
mailbox = "relay@example.com"
client_id = "cid-123"
client_secret_file = "{{dir}}/secret"
token_url = "{idp}/token"
scope = "https://outlook.office365.com/.default"
smtp_host = "127.0.0.1"
smtp_port = {port}
smtp_tls = "none"
{more}
"#,
        port = upstream.addr.port(),
    )
}

/// A config in `dir` with [`account_top`]'s account and a listener without AUTH.
pub fn account_config(
    dir: &std::path::Path,
    idp: &str,
    upstream: &FakeUpstream,
    more: &str,
) -> std::path::PathBuf {
    let top = account_top(dir, idp, upstream, more);
    super::write_config_with(dir, &top, "address = \"127.0.0.1:0\"\nauth = \"none\"")
}

/// As [`account_top`], for a device-code account: `relay authorize` starts at `{idp}/devicecode`.
pub fn device_code_top(
    dir: &std::path::Path,
    idp: &str,
    upstream: &FakeUpstream,
    more: &str,
) -> String {
    let more = format!("device_authorization_url = \"{idp}/devicecode\"\n{more}");
    account_top(dir, idp, upstream, &more)
        .replace("flow = \"client_credentials\"", "flow = \"device_code\"")
}

/// A config in `dir` with [`device_code_top`]'s account and a listener without AUTH.
pub fn device_code_config(
    dir: &std::path::Path,
    idp: &str,
    upstream: &FakeUpstream,
    more: &str,
) -> std::path::PathBuf {
    let top = device_code_top(dir, idp, upstream, more);
    super::write_config_with(dir, &top, "address = \"127.0.0.1:0\"\nauth = \"none\"")
}

/// An `[[account]]` named `name` (mailbox `NAME@example.com`) of a generic provider with `flow`, pointed at the
/// fakes; its client secret is `{dir}/secret` (see [`write_secret`]).
pub fn generic_account(name: &str, idp: &str, upstream: &FakeUpstream, flow: &str) -> String {
    generic_account_at(name, idp, upstream.addr.port(), flow)
}

/// As [`generic_account`], with its upstream at `127.0.0.1:{port}` (which need not be up).
pub fn generic_account_at(name: &str, idp: &str, port: u16, flow: &str) -> String {
    format!(
        r#"[[account]]
name = "{name}"
provider = "generic"
flow = "{flow}"
mailbox = "{name}@example.com"
client_id = "cid"
client_secret_file = "{{dir}}/secret"
token_url = "{idp}/token"
device_authorization_url = "{idp}/device"
scope = "smtp"
smtp_host = "127.0.0.1"
smtp_port = {port}
smtp_tls = "none"
"#,
    )
}

/// Writes `dir/secret`, a client secret readable by owner and group only.
pub fn write_secret(dir: &std::path::Path) {
    write_secret_value(dir, "s3cret");
}

/// As [`write_secret`], with the secret `value`.
pub fn write_secret_value(dir: &std::path::Path, value: &str) {
    use std::os::unix::fs::PermissionsExt;
    let secret = dir.join("secret");
    std::fs::write(&secret, format!("{value}\n")).unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o640)).unwrap();
}

/// A config in `dir` whose default account, `office`, is a [`generic_account`] with client credentials at `idp`;
/// `more` goes after the account's keys (more keys of the account, or tables). The secret is the caller's to
/// write ([`write_secret`]).
pub fn office_config(
    dir: &std::path::Path,
    idp: &str,
    upstream: &FakeUpstream,
    more: &str,
) -> std::path::PathBuf {
    let account = generic_account("office", idp, upstream, "client_credentials");
    super::write_config_with(
        dir,
        &format!("default_account = \"office\"\n{account}{more}"),
        "address = \"127.0.0.1:0\"\nauth = \"none\"",
    )
}

/// A config in `dir` with client-credentials accounts `(name, upstream)` of one identity provider: the first is the
/// default and already holds a valid token, `tok`. `top` goes before them (top-level keys), `more` after them
/// (routes, tables).
pub fn accounts_config(
    dir: &std::path::Path,
    idp: &str,
    accounts: &[(&str, &FakeUpstream)],
    top: &str,
    more: &str,
) -> std::path::PathBuf {
    write_secret(dir);
    let mut text = format!("{top}\ndefault_account = \"{}\"\n", accounts[0].0);
    for (name, upstream) in accounts {
        text.push_str(&generic_account(name, idp, upstream, "client_credentials"));
    }
    text.push_str(more);
    let config = super::write_config_with(dir, &text, "address = \"127.0.0.1:0\"\nauth = \"none\"");
    super::write_valid_tokens(
        &dir.join("state"),
        accounts[0].0,
        "tok",
        std::time::Duration::from_secs(3600),
    );
    config
}

/// A token endpoint that rotates refresh tokens strictly, as Okta, Auth0 and Keycloak can be set to: each
/// refresh token is good once, and one presented again is refused with `invalid_grant` (a provider with reuse
/// detection then revokes the whole grant). The first request is held until the test releases it. Each request's
/// refresh token is sent on `asked`.
pub struct RotatingEndpoint {
    pub url: String,
    pub asked: tokio::sync::mpsc::UnboundedReceiver<String>,
    pub release: Option<tokio::sync::oneshot::Sender<()>>,
}

impl RotatingEndpoint {
    pub async fn start(first_refresh: &str) -> RotatingEndpoint {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (asked_tx, asked) = tokio::sync::mpsc::unbounded_channel();
        let (release, held) = tokio::sync::oneshot::channel::<()>();
        let live = std::sync::Arc::new(std::sync::Mutex::new((first_refresh.to_string(), 0u32)));
        tokio::spawn(async move {
            let mut held = Some(held);
            while let Ok((mut conn, _)) = listener.accept().await {
                let mut request = Vec::new();
                let mut buf = [0u8; 4096];
                // The head, then as much body as Content-Length says.
                let body = loop {
                    let n = conn.read(&mut buf).await.unwrap_or(0);
                    if n == 0 {
                        break None;
                    }
                    request.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&request).into_owned();
                    if let Some(end) = text.find("\r\n\r\n") {
                        let length = text[..end]
                            .lines()
                            .find_map(|l| {
                                let (k, v) = l.split_once(':')?;
                                k.eq_ignore_ascii_case("content-length")
                                    .then(|| v.trim().parse::<usize>().ok())?
                            })
                            .unwrap_or(0);
                        if request.len() >= end + 4 + length {
                            break Some(text[end + 4..end + 4 + length].to_string());
                        }
                    }
                };
                let Some(body) = body else { continue };
                let presented = form_urlencoded::parse(body.as_bytes())
                    .find(|(k, _)| k == "refresh_token")
                    .map(|(_, v)| v.into_owned())
                    .unwrap_or_default();
                asked_tx.send(presented.clone()).ok();
                if let Some(held) = held.take() {
                    let _ = tokio::time::timeout(super::LIMIT, held).await;
                }
                let (status, json) = {
                    let mut live = live.lock().unwrap();
                    if presented == live.0 {
                        live.1 += 1;
                        live.0 = format!("R{}", live.1 + 1);
                        (
                            "200 OK",
                            format!(
                                r#"{{"token_type":"Bearer","scope":"smtp","expires_in":3600,"access_token":"A{}","refresh_token":"{}"}}"#,
                                live.1, live.0
                            ),
                        )
                    } else {
                        (
                            "400 Bad Request",
                            r#"{"error":"invalid_grant","error_description":"The refresh token has already been used."}"#
                                .to_string(),
                        )
                    }
                };
                let reply = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{json}",
                    json.len()
                );
                conn.write_all(reply.as_bytes()).await.ok();
                conn.shutdown().await.ok();
            }
        });
        RotatingEndpoint {
            url,
            asked,
            release: Some(release),
        }
    }

    pub async fn next_ask(&mut self) -> String {
        tokio::time::timeout(super::LIMIT, self.asked.recv())
            .await
            .expect("a token request in time")
            .expect("the endpoint runs")
    }
}

/// Writes `STATE/tokens/ACCOUNT.json` with an hour-long access token `A0` that has five minutes left (inside the
/// renewal window: the refresher renews it at start) and the refresh token `refresh`.
pub fn write_tokens_due(state: &std::path::Path, account: &str, refresh: &str) {
    let now = std::time::SystemTime::now();
    let minutes = |m: u64| std::time::Duration::from_secs(60 * m);
    relay::tokens::TokenStore::new(state)
        .save(
            account,
            &relay::tokens::StoredTokens {
                access_token: "A0".to_string().into(),
                expires_at: now + minutes(5),
                obtained_at: now - minutes(55),
                refresh_token: Some(refresh.to_string().into()),
                last_refresh: Some(now - minutes(55)),
                needs_authorization: false,
                last_error: None,
            },
        )
        .expect("token file written");
}

/// A daemon with [`account_top`]'s account, whose upstream answers the data with a 451 (the retry an hour
/// away): one message queued and deferred, then the daemon stopped. The upstream still defers.
pub struct OneDeferred {
    pub idp: MockServer,
    pub upstream: FakeUpstream,
    pub dir: tempfile::TempDir,
    pub config: std::path::PathBuf,
    pub id: String,
}

pub async fn one_deferred_message() -> OneDeferred {
    let idp = idp_issuing("tok").await;
    let upstream = FakeUpstream::start(&["tok"]).await;
    *upstream.data_reply.lock().unwrap() = "451 4.3.0 try again later".into();
    let dir = tempfile::tempdir().unwrap();
    let top = account_top(
        dir.path(),
        &idp.uri(),
        &upstream,
        "[queue]\nretry = [\"1h\"]\n",
    );
    let config = super::write_config_with(
        dir.path(),
        &top,
        "address = \"127.0.0.1:0\"\nauth = \"none\"",
    );
    let mut d = super::Daemon::spawn(&config);
    let id = super::send_message(d.addr, b"Subject: waits\r\n\r\nhi\r\n").await;
    d.wait_log("relay_event=\"deferred\"");
    assert_eq!(d.terminate().code(), Some(0));
    OneDeferred {
        idp,
        upstream,
        dir,
        config,
        id,
    }
}
