//! OAuth flows against a fake identity provider speaking the real wire formats: device code (with
//! authorization_pending, slow_down, expired_token, access_denied), refresh with rotation, invalid_grant.

mod common;

use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, SystemTime};

use common::idp::{answer_token_requests, token_request, token_requests_made};
use common::upstream::FakeUpstream;
use common::*;
use wiremock::matchers::{body_string_contains, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

fn oauth_error(code: &str) -> ResponseTemplate {
    ResponseTemplate::new(400).set_body_json(serde_json::json!({
        "error": code, "error_description": format!("AADSTS: {code}"), "error_codes": [70016]
    }))
}

fn tokens(access: &str, refresh: &str) -> ResponseTemplate {
    ResponseTemplate::new(200).set_body_json(serde_json::json!({
        "token_type": "Bearer", "scope": "https://outlook.office.com/SMTP.Send", "expires_in": 3599,
        "access_token": access, "refresh_token": refresh
    }))
}

/// A config with one device-code account pointed at the fakes; returns (dir, config path).
fn device_config(idp: &MockServer, smtp_port: u16) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let account = format!(
        r#"default_account = "office"
[[account]]
name = "office"
provider = "generic"
flow = "device_code"
mailbox = "noreply@example.com"
client_id = "cid-dev"
token_url = "{idp}/token"
device_authorization_url = "{idp}/devicecode"
scope = "https://outlook.office.com/SMTP.Send offline_access"
smtp_host = "127.0.0.1"
smtp_port = {smtp_port}
smtp_tls = "none"
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

/// A poll for the code [`device_code_idp`] hands out.
fn device_code_poll() -> wiremock::MockBuilder {
    token_request()
        .and(body_string_contains(
            "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Adevice_code",
        ))
        .and(body_string_contains("device_code=DEVICE-CODE-1"))
}

/// An identity provider that starts a device-code sign-in whose code lasts `expires_in` seconds; its token
/// endpoint is the test's to answer.
async fn device_code_idp(expires_in: u64) -> MockServer {
    let idp = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/devicecode"))
        .and(body_string_contains("client_id=cid-dev"))
        .respond_with(ResponseTemplate::new(200).set_body_json(serde_json::json!({
            "device_code": "DEVICE-CODE-1", "user_code": "ABCD-EFGH",
            "verification_uri": "https://microsoft.com/devicelogin",
            "expires_in": expires_in, "interval": 0,
            "message": "To sign in, use a web browser to open the page https://microsoft.com/devicelogin"
        })))
        .mount(&idp)
        .await;
    idp
}

/// `relay authorize office`, which must succeed: what it printed.
async fn authorize_succeeds(config: &std::path::Path) -> String {
    let out = run_authorize(config).await;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// `relay authorize office`, which must fail with exit code 1: what it said on stderr.
async fn authorize_fails(config: &std::path::Path) -> String {
    let out = run_authorize(config).await;
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

async fn run_authorize(config: &std::path::Path) -> std::process::Output {
    let child = tokio::process::Command::new(relay_bin())
        .args(["authorize", "office", "--config"])
        .arg(config)
        .output();
    tokio::time::timeout(LIMIT, child)
        .await
        .expect("authorize finishes")
        .unwrap()
}

#[tokio::test]
async fn device_code_polls_slows_down_and_stores_tokens() {
    let idp = device_code_idp(900).await;
    device_code_poll()
        .respond_with(oauth_error("authorization_pending"))
        .up_to_n_times(2)
        .mount(&idp)
        .await;
    device_code_poll()
        .respond_with(oauth_error("slow_down"))
        .up_to_n_times(1)
        .mount(&idp)
        .await;
    device_code_poll()
        .respond_with(tokens("access-1", "refresh-1"))
        .mount(&idp)
        .await;
    let (dir, config) = device_config(&idp, 9);
    let stdout = authorize_succeeds(&config).await;
    assert!(
        stdout.contains("https://microsoft.com/devicelogin") && stdout.contains("ABCD-EFGH"),
        "{stdout}"
    );
    assert_eq!(
        token_requests_made(&idp).await,
        4,
        "pending, pending, slow_down, granted"
    );
    assert!(stdout.contains("asked to be polled less often"), "{stdout}");
    let file = dir.path().join("state/tokens/office.json");
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o640);
    let stored = token_file(&dir.path().join("state"));
    assert_eq!(stored["refresh_token"], "refresh-1");
    assert_eq!(stored["access_token"], "access-1");
    assert!(
        !stdout.contains("access-1") && !stdout.contains("refresh-1"),
        "tokens never printed"
    );
}

#[tokio::test]
async fn device_code_failures_are_explained() {
    for (error, words) in [("expired_token", "expired"), ("access_denied", "declined")] {
        let idp = device_code_idp(900).await;
        answer_token_requests(&idp, oauth_error(error)).await;
        let (dir, config) = device_config(&idp, 9);
        let stderr = authorize_fails(&config).await;
        assert!(
            stderr.contains(words) && stderr.contains(error),
            "{error}: {stderr}"
        );
        assert!(!dir.path().join("state/tokens/office.json").exists());
    }
}

/// A device authorization endpoint that answers with something other than OAuth (a wrong URL's 404) is named as
/// that endpoint's setting, not as the token endpoint.
#[tokio::test]
async fn a_failed_device_authorization_names_its_endpoint() {
    let idp = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/devicecode"))
        .respond_with(ResponseTemplate::new(404).set_body_string("no such page"))
        .mount(&idp)
        .await;
    let (_dir, config) = device_config(&idp, 9);
    let stderr = authorize_fails(&config).await;
    assert!(
        stderr.contains("device authorization endpoint (device_authorization_url)")
            && stderr.contains("404")
            && !stderr.contains("token endpoint"),
        "{stderr}"
    );
}

#[tokio::test]
async fn device_code_that_stays_pending_runs_out() {
    let idp = device_code_idp(0).await;
    answer_token_requests(&idp, oauth_error("authorization_pending")).await;
    let (_dir, config) = device_config(&idp, 9);
    let stderr = authorize_fails(&config).await;
    assert!(
        stderr.contains("expired before the sign-in was finished"),
        "{stderr}"
    );
}

/// Writes a token file as `relay authorize` would, with an access token that has already expired.
fn expired_tokens(state: &std::path::Path, refresh: &str) {
    let store = relay::tokens::TokenStore::new(state);
    let past = SystemTime::now() - Duration::from_secs(60);
    store
        .save(
            "office",
            &relay::tokens::StoredTokens {
                access_token: "old-access".to_string().into(),
                expires_at: past,
                obtained_at: past - Duration::from_secs(3600),
                refresh_token: Some(refresh.to_string().into()),
                last_refresh: Some(past),
                needs_authorization: false,
                last_error: None,
            },
        )
        .unwrap();
}

#[tokio::test]
async fn refresh_rotates_and_delivers_then_invalid_grant_needs_authorization() {
    let idp = MockServer::start().await;
    token_request()
        .and(body_string_contains("grant_type=refresh_token"))
        .and(body_string_contains("refresh_token=refresh-1"))
        .respond_with(tokens("access-2", "refresh-2"))
        .mount(&idp)
        .await;
    token_request()
        .and(body_string_contains("refresh_token=refresh-2"))
        .respond_with(oauth_error("invalid_grant"))
        .mount(&idp)
        .await;
    let mut upstream = FakeUpstream::start(&["access-2"]).await;
    let (dir, config) = device_config(&idp, upstream.addr.port());
    let state = dir.path().join("state");
    expired_tokens(&state, "refresh-1");
    let mut daemon = Daemon::spawn(&config);
    send_message(daemon.addr, b"Subject: one\r\n\r\nbody\r\n").await;
    let got = upstream.next().await;
    assert!(got.auth.contains("Bearer access-2"));
    daemon.wait_log("relay_event=\"delivered\"");
    let stored: serde_json::Value = token_file(&state);
    assert_eq!(
        stored["refresh_token"], "refresh-2",
        "the rotated refresh token is saved"
    );

    // Now the grant is revoked: the next refresh gets invalid_grant; mail stays queued.
    expired_tokens(&state, "refresh-2");
    let id = send_message(daemon.addr, b"Subject: two\r\n\r\nbody\r\n").await;
    let line = daemon.wait_log("relay_event=\"authorization_needed\"");
    assert!(line.contains("relay authorize office"), "{line}");
    daemon.wait_log("relay_event=\"deferred\"");
    assert!(
        state.join(format!("queue/{id}.msg")).exists(),
        "never bounced"
    );
    let (code, status) = status_json(&config);
    assert_eq!(
        status["accounts"][0]["state"], "needs-authorization",
        "{status}"
    );
    assert_eq!(code, Some(1));
    assert_eq!(daemon.terminate().code(), Some(0));
}

/// `relay authorize` is often run as root: the token file must then belong to the state dir's owner (the daemon's
/// user), or the daemon could not read it.
#[tokio::test]
async fn token_file_written_by_root_belongs_to_the_state_dir_owner() {
    if !is_root() {
        eprintln!("SKIPPED: needs root to change file ownership");
        return;
    }
    let idp = device_code_idp(900).await;
    answer_token_requests(&idp, tokens("a", "r")).await;
    let (dir, config) = device_config(&idp, 9);
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    std::os::unix::fs::chown(&state, Some(65534), Some(65534)).unwrap();
    authorize_succeeds(&config).await;
    use std::os::unix::fs::MetadataExt;
    // Everything the daemon's user must later open, the lock file included.
    for path in ["tokens/office.json", "tokens", "tokens/.office.lock"] {
        let meta = std::fs::metadata(state.join(path)).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (65534, 65534), "{path}");
    }
}

/// Writes the account's token file, as `relay authorize` would.
fn save_tokens(state: &std::path::Path, t: &relay::tokens::StoredTokens) {
    relay::tokens::TokenStore::new(state)
        .save("office", t)
        .unwrap();
}

/// Tokens with a valid access token whose refresh token was last used `ago`.
fn idle_since(ago: Duration) -> relay::tokens::StoredTokens {
    stored(Duration::from_secs(3000), Duration::from_secs(3600), ago)
}

/// The account's token file as JSON.
fn token_file(state: &std::path::Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(state.join("tokens/office.json")).unwrap()).unwrap()
}

fn stored(
    access_valid_for: Duration,
    lifetime: Duration,
    last_refresh_ago: Duration,
) -> relay::tokens::StoredTokens {
    let now = SystemTime::now();
    relay::tokens::StoredTokens {
        access_token: "current".to_string().into(),
        expires_at: now + access_valid_for,
        obtained_at: now + access_valid_for - lifetime,
        refresh_token: Some("refresh-1".to_string().into()),
        last_refresh: Some(now - last_refresh_ago),
        needs_authorization: false,
        last_error: None,
    }
}

/// An upstream taking the token `current`, and a device-code account on it and `idp` whose access token
/// `current` has five minutes left of an hour: inside the renewal window (the last ten minutes).
async fn in_renewal_window(
    idp: &MockServer,
    last_refresh_ago: Duration,
) -> (FakeUpstream, tempfile::TempDir, std::path::PathBuf) {
    let upstream = FakeUpstream::start(&["current"]).await;
    let (dir, config) = device_config(idp, upstream.addr.port());
    save_tokens(
        &dir.path().join("state"),
        &stored(
            Duration::from_secs(300),
            Duration::from_secs(3600),
            last_refresh_ago,
        ),
    );
    (upstream, dir, config)
}

/// With no mail at all, a refresh token unused for a day is used, so that it never reaches its idle expiry.
#[tokio::test]
async fn idle_refresh_token_is_kept_alive() {
    let idp = MockServer::start().await;
    token_request()
        .and(body_string_contains("refresh_token=refresh-1"))
        .respond_with(tokens("access-2", "refresh-2"))
        .expect(1)
        .mount(&idp)
        .await;
    let (dir, config) = device_config(&idp, 9);
    let state = dir.path().join("state");
    save_tokens(&state, &idle_since(Duration::from_secs(86_400 + 3600)));
    let mut daemon = Daemon::spawn(&config);
    daemon.wait_log("relay_event=\"token_refreshed\"");
    let file: serde_json::Value = token_file(&state);
    assert_eq!(file["refresh_token"], "refresh-2");
    assert_eq!(daemon.terminate().code(), Some(0));
}

/// The access token is renewed before it expires, without any delivery asking for it.
#[tokio::test]
async fn access_token_is_renewed_ahead_of_expiry() {
    let idp = MockServer::start().await;
    answer_token_requests(&idp, tokens("access-2", "refresh-2")).await;
    let (dir, config) = device_config(&idp, 9);
    let state = dir.path().join("state");
    // An 8-second token: renewal is due when a quarter of its life (2 s) remains, 6 s from now; the margin
    // keeps the test honest on a loaded machine.
    let t = stored(
        Duration::from_secs(8),
        Duration::from_secs(8),
        Duration::ZERO,
    );
    let expires_at = t.expires_at;
    save_tokens(&state, &t);
    let mut daemon = Daemon::spawn(&config);
    daemon.wait_log("relay_event=\"token_refreshed\"");
    let file: serde_json::Value = token_file(&state);
    let refreshed = humantime::parse_rfc3339(file["last_refresh"].as_str().unwrap()).unwrap();
    assert!(
        refreshed < expires_at,
        "renewed before the old token expired"
    );
    assert_eq!(file["access_token"], "access-2");
    assert_eq!(daemon.terminate().code(), Some(0));
}

/// Saving a renewed grant can wait: on the disk (its flushes, on a busy disk) or on `relay authorize`, which holds
/// the account's lock while it writes. The daemon's runtime has a single worker on a 2-core machine; if the save
/// waited on it, every SMTP session would wait too. Here the test holds the lock, so the save waits (up to its
/// 60 s) while a client sends a message. The daemon runs with one worker, as on such a machine.
#[tokio::test]
async fn a_token_save_waiting_for_its_lock_does_not_hold_up_mail() {
    let idp = MockServer::start().await;
    answer_token_requests(&idp, tokens("access-2", "refresh-2")).await;
    let (dir, config) = device_config(&idp, 9);
    let state = dir.path().join("state");
    expired_tokens(&state, "refresh-1");
    let lock = std::fs::File::open(state.join("tokens/.office.lock")).unwrap();
    // SAFETY: flock on a file descriptor this test owns.
    assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) }, 0);
    let mut d = Daemon::spawn_with(&config, |c| {
        c.env("TOKIO_WORKER_THREADS", "1");
    });
    // Where `/proc/PID/syscall` is closed to this process (Yama ptrace_scope 3, some sandboxes), the wait cannot
    // be seen.
    if std::fs::read_to_string(format!("/proc/{}/syscall", d.pid())).is_err() {
        eprintln!("SKIPPED: cannot read the daemon's /proc/PID/syscall here");
        return;
    }
    // The refresher renews the expired grant at once, and its save waits for the lock.
    let deadline = std::time::Instant::now() + LIMIT;
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    while !waits_for_lock(d.pid()) {
        assert!(
            std::time::Instant::now() < deadline,
            "no thread of relay waits for the token lock"
        );
        tick.tick().await;
    }
    let id = tokio::time::timeout(
        LIMIT,
        send_message(d.addr, b"Subject: meanwhile\r\n\r\nbody\r\n"),
    )
    .await
    .expect("a message is accepted while a token save waits");
    assert!(
        files_in(&state, "queue").iter().any(|f| f.starts_with(&id)),
        "{id} queued"
    );
    assert_eq!(token_file(&state)["refresh_token"], "refresh-1");
    assert!(
        !d.unmatched().iter().any(|l| l.contains("token_refreshed")),
        "the save still waits"
    );

    drop(lock);
    d.wait_log("relay_event=\"token_refreshed\"");
    assert_eq!(token_file(&state)["refresh_token"], "refresh-2");
    assert_eq!(d.terminate().code(), Some(0));
}

/// Whether a thread of process `pid` is in flock(2), or in the sleep between two tries of it (the first field of
/// its `/proc` syscall file): nothing else in relay sleeps that way.
fn waits_for_lock(pid: u32) -> bool {
    let waits = [
        libc::SYS_flock,
        libc::SYS_nanosleep,
        libc::SYS_clock_nanosleep,
    ]
    .map(|n| n.to_string());
    std::fs::read_dir(format!("/proc/{pid}/task")).is_ok_and(|tasks| {
        tasks.flatten().any(|t| {
            std::fs::read_to_string(t.path().join("syscall")).is_ok_and(|s| {
                s.split(' ')
                    .next()
                    .is_some_and(|n| waits.iter().any(|w| w == n))
            })
        })
    })
}

/// Mail for an account that is not yet authorized waits; `relay authorize`, run while the daemon runs, lets it
/// go at once, without a restart. So for a grant the provider revoked, authorized again: the daemon also says it
/// took the new grant up (`token_refreshed`, which closes the `authorization_needed` incident) when it first reads
/// it.
#[tokio::test]
async fn authorize_while_the_daemon_runs_releases_waiting_mail() {
    for revoked in [false, true] {
        let idp = device_code_idp(900).await;
        device_code_poll()
            .respond_with(tokens("access-1", "refresh-1"))
            .mount(&idp)
            .await;
        let mut upstream = FakeUpstream::start(&["access-1"]).await;
        let (dir, config) = device_config(&idp, upstream.addr.port());
        if revoked {
            let mut t = stored(
                Duration::ZERO,
                Duration::from_secs(3600),
                Duration::from_secs(3600),
            );
            t.needs_authorization = true;
            save_tokens(&dir.path().join("state"), &t);
        }
        let mut daemon = Daemon::spawn(&config);
        let id = send_message(daemon.addr, b"Subject: waiting\r\n\r\nbody\r\n").await;
        let line = daemon.wait_log("relay_event=\"deferred\"");
        assert!(line.contains(&id), "{line}");
        if !revoked {
            assert!(line.contains("relay authorize office"), "{line}");
        }
        authorize_succeeds(&config).await;
        if revoked {
            let line = daemon.wait_log("a new grant was stored");
            assert!(line.contains("relay_event=\"token_refreshed\""), "{line}");
        }
        let got = upstream.next().await;
        assert!(got.auth.contains("Bearer access-1"));
        assert!(String::from_utf8_lossy(&got.data).contains("Subject: waiting"));
        let delivered = daemon.wait_log("relay_event=\"delivered\"");
        assert!(delivered.contains(&id), "{delivered}");
        assert_eq!(daemon.terminate().code(), Some(0));
    }
}

/// An account that needs a person to sign in, added by a reload, is said to need `relay authorize` at once, as
/// at start, not first by its deferred mail.
#[tokio::test]
async fn an_account_added_by_a_reload_without_tokens_is_said_to_need_authorizing() {
    let idp = MockServer::start().await;
    let (dir, config) = device_config(&idp, 9);
    let with_account = std::fs::read_to_string(&config).unwrap();
    write_config_with(dir.path(), "", "address = \"127.0.0.1:0\"\nauth = \"none\"");
    let mut daemon = Daemon::spawn(&config);
    std::fs::write(&config, with_account).unwrap();
    daemon.reload();
    let line = daemon.wait_log("relay_event=\"authorization_needed\"");
    assert!(line.contains("relay authorize office"), "{line}");
    assert_eq!(daemon.terminate().code(), Some(0));
}

/// A refresh that fails for a passing reason (503) is retried after a short backoff; nothing is lost.
#[tokio::test]
async fn transient_refresh_failure_is_retried() {
    let idp = MockServer::start().await;
    token_request()
        .respond_with(ResponseTemplate::new(503).set_body_string("Service Unavailable"))
        .up_to_n_times(1)
        .mount(&idp)
        .await;
    answer_token_requests(&idp, tokens("access-2", "refresh-2")).await;
    let (dir, config) = device_config(&idp, 9);
    let state = dir.path().join("state");
    save_tokens(&state, &idle_since(Duration::from_secs(86_400 + 60)));
    let mut daemon = Daemon::spawn(&config);
    let failed = daemon.wait_log("relay_event=\"token_refresh_failed\"");
    assert!(failed.contains("503"), "{failed}");
    daemon.wait_log("relay_event=\"token_refreshed\"");
    let file: serde_json::Value = token_file(&state);
    assert_eq!(file["refresh_token"], "refresh-2");
    assert_eq!(file["needs_authorization"], false);
    assert_eq!(daemon.terminate().code(), Some(0));
}

/// An identity provider whose error replies quote the request (debug proxies and firewall pages echo it, and
/// some `error_description`s do) never puts the client secret into the log, the queue's state or `relay status`:
/// relay cuts out every secret value it sent. Through the real binary, with a client secret in the form and one
/// sent as HTTP Basic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_that_echoes_the_request_never_gets_the_secret_logged() {
    const SECRET: &str = "S3CRET-client-xyzzy+/=";
    for basic in [false, true] {
        let idp = MockServer::start().await;
        let echo = |req: &wiremock::Request| {
            let body = String::from_utf8_lossy(&req.body).into_owned();
            let auth = req
                .headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            (body, auth)
        };
        token_request()
            .respond_with(move |req: &wiremock::Request| {
                let (body, auth) = echo(req);
                ResponseTemplate::new(400)
                    .set_body_string(format!("Bad request: {body} (Authorization: {auth})"))
            })
            .up_to_n_times(1)
            .with_priority(1)
            .mount(&idp)
            .await;
        // A JSON encoder that escapes `+`, `/` and `=` (as .NET's and Gson's do): the secret comes back whole once
        // decoded.
        token_request()
            .respond_with(move |_: &wiremock::Request| {
                let escaped = SECRET
                    .replace('+', "\\u002B")
                    .replace('/', "\\/")
                    .replace('=', "\\u003d");
                ResponseTemplate::new(401).set_body_string(format!(
                    r#"{{"error":"invalid_client","error_description":"the secret {escaped} is wrong"}}"#
                ))
            })
            .up_to_n_times(1)
            .with_priority(2)
            .mount(&idp)
            .await;
        // A gateway that keeps the body as binary and echoes it base64-encoded (AWS API Gateway).
        token_request()
            .respond_with(move |req: &wiremock::Request| {
                use base64::Engine;
                let body = base64::engine::general_purpose::STANDARD.encode(&req.body);
                ResponseTemplate::new(400).set_body_json(serde_json::json!({
                    "message": "Bad Request",
                    "isBase64Encoded": true,
                    "body": body,
                }))
            })
            .up_to_n_times(1)
            .with_priority(3)
            .mount(&idp)
            .await;
        token_request()
            .respond_with(move |req: &wiremock::Request| {
                let (body, auth) = echo(req);
                ResponseTemplate::new(401).set_body_json(serde_json::json!({
                    "error": "invalid_client",
                    "error_description": format!("bad client in {body} {auth}"),
                }))
            })
            .with_priority(4)
            .mount(&idp)
            .await;
        let upstream = FakeUpstream::start(&["tok"]).await;
        let dir = tempfile::tempdir().unwrap();
        common::idp::write_secret_value(dir.path(), SECRET);
        let client_auth = if basic {
            "client_auth = \"client_secret_basic\"\n"
        } else {
            ""
        };
        let config = common::idp::office_config(dir.path(), &idp.uri(), &upstream, client_auth);
        let mut d = Daemon::spawn(&config);
        let mut c = RawClient::ready(d.addr).await;
        c.cmd("MAIL FROM:<scanner@lan.test>", 250).await;
        c.cmd("RCPT TO:<a@example.com>", 250).await;
        c.cmd("DATA", 354).await;
        c.send(b"Subject: x\r\n\r\nhi\r\n.\r\n").await;
        c.expect(250).await;
        // One attempt per kind of echo: each ends deferred, and the next is asked for then.
        let mut deferrals = Vec::new();
        for round in 0..4 {
            let deferred = d.wait_log("relay_event=\"deferred\"");
            // With HTTP Basic, the base64 echo of the body holds no secret, and is quoted as it came.
            assert!(
                ["[redacted]", "[not shown", "isBase64Encoded"]
                    .iter()
                    .any(|cut| deferred.contains(cut)),
                "{deferred}"
            );
            deferrals.push(deferred);
            if round < 3 {
                queue_retry(&config, "--all");
            }
        }

        // The base64 echo cannot be cut: it is not quoted at all.
        assert!(
            basic || deferrals.iter().any(|d| d.contains("[not shown")),
            "{deferrals:?}"
        );
        let encoded: String = form_urlencoded::byte_serialize(SECRET.as_bytes()).collect();
        let header = {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD.encode(format!("cid:{encoded}"))
        };
        let leaks = |text: &str| {
            text.contains("S3CRET") || text.contains(&encoded) || text.contains(&header)
        };
        let mut seen: Vec<String> = d.unmatched().to_vec();
        seen.extend(deferrals);
        let queue = dir.path().join("state/queue");
        for entry in std::fs::read_dir(&queue).unwrap() {
            seen.push(std::fs::read_to_string(entry.unwrap().path()).unwrap_or_default());
        }
        let status = std::process::Command::new(relay_bin())
            .args(["status", "--config"])
            .arg(&config)
            .output()
            .unwrap();
        seen.push(String::from_utf8_lossy(&status.stdout).into_owned());
        let list = std::process::Command::new(relay_bin())
            .args(["queue", "list", "--config"])
            .arg(&config)
            .output()
            .unwrap();
        seen.push(String::from_utf8_lossy(&list.stdout).into_owned());
        for text in &seen {
            assert!(!leaks(text), "basic {basic}: the secret in {text}");
        }
        assert_eq!(d.terminate().code(), Some(0));
    }
}

/// A relay config whose default account uses client credentials at a fake identity provider that answers
/// `token_reply`: (the provider, the account's upstream, the config's directory, the config).
async fn client_credentials(
    token_reply: ResponseTemplate,
) -> (
    MockServer,
    FakeUpstream,
    tempfile::TempDir,
    std::path::PathBuf,
) {
    let idp = MockServer::start().await;
    answer_token_requests(&idp, token_reply).await;
    let upstream = FakeUpstream::start(&["tok"]).await;
    let dir = tempfile::tempdir().unwrap();
    common::idp::write_secret(dir.path());
    let config = common::idp::office_config(dir.path(), &idp.uri(), &upstream, "");
    (idp, upstream, dir, config)
}

/// `relay authorize` on a client-credentials account checks that a token can be had, and says nothing of a
/// refresh token: relay fetches the next one by itself (it warned that the grant could not be renewed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorize_on_client_credentials_does_not_warn_of_a_missing_refresh_token() {
    let (_idp, _upstream, _dir, config) = client_credentials(common::idp::token("tok")).await;
    let out = run_authorize(&config).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("Authorized"), "{stdout}");
    assert!(!stdout.contains("Warning"), "{stdout}");
}

/// The identity provider issues tokens again; the waiting mail, retried now, is delivered.
async fn token_endpoint_recovers(
    idp: &MockServer,
    mut upstream: FakeUpstream,
    config: &std::path::Path,
    d: &mut Daemon,
) {
    idp.reset().await;
    answer_token_requests(idp, tokens("tok", "unused")).await;
    queue_retry(config, "--all");
    upstream.next().await;
    d.wait_log("relay_event=\"delivered\"");
}

/// A client-credentials account whose first token cannot be had (the identity provider answers 500) is shown
/// as failing by `relay status`, with the reason, from the first failed fetch: before, with no token file yet,
/// it said "ok". A later good fetch clears it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_tells_when_the_first_token_cannot_be_had() {
    let (idp, upstream, _dir, config) =
        client_credentials(ResponseTemplate::new(500).set_body_string("upstream IdP down")).await;
    let mut d = Daemon::spawn(&config);
    send_message(d.addr, b"Subject: x\r\n\r\nhi\r\n").await;
    d.wait_log("relay_event=\"token_refresh_failed\"");
    // The attempt is over (a retry asked for before its deferral is written would be overwritten by it).
    d.wait_log("relay_event=\"deferred\"");
    let status = || status_json(&config);
    let (code, doc) = status();
    assert_eq!(code, Some(1), "{doc}");
    let account = &doc["accounts"][0];
    assert_eq!(account["state"], "failing", "{doc}");
    assert!(
        account["last_error"].as_str().unwrap_or("").contains("500"),
        "{doc}"
    );
    assert!(account["token_valid_until"].is_null(), "{doc}");

    token_endpoint_recovers(&idp, upstream, &config, &mut d).await;
    let (_, doc) = status();
    assert_eq!(doc["accounts"][0]["state"], "ok", "{doc}");
    assert!(doc["accounts"][0]["token_valid_until"].is_string(), "{doc}");
    assert_eq!(d.terminate().code(), Some(0));
}

/// A client-credentials account refused with invalid_grant is not told to run `relay authorize` for a refresh
/// token it does not have: the log line and `relay status` blame its credentials (failing, not
/// needs-authorization), and `relay authorize` names the same fix. Once the credentials are accepted, the
/// waiting mail goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_grant_without_a_person_blames_the_credentials() {
    let (idp, upstream, _dir, config) = client_credentials(oauth_error("invalid_grant")).await;
    let mut d = Daemon::spawn(&config);
    send_message(d.addr, b"Subject: x\r\n\r\nhi\r\n").await;
    let line = d.wait_log("relay_event=\"token_refresh_failed\"");
    assert!(line.contains("credentials"), "{line}");
    assert!(line.contains("systemctl reload relay"), "{line}");
    let line = d.wait_log("relay_event=\"deferred\"");
    assert!(!line.contains("run `relay authorize"), "{line}");
    assert!(
        !d.unmatched()
            .iter()
            .any(|l| l.contains("authorization_needed")),
        "{:?}",
        d.unmatched()
    );

    let (_, doc) = status_json(&config);
    assert_eq!(doc["accounts"][0]["state"], "failing", "{doc}");
    let why = doc["accounts"][0]["last_error"].as_str().unwrap_or("");
    assert!(why.contains("credentials"), "{doc}");

    let out = run_authorize(&config).await;
    let said =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert_ne!(out.status.code(), Some(0), "{said}");
    assert!(said.contains("client_secret_file"), "{said}");

    token_endpoint_recovers(&idp, upstream, &config, &mut d).await;
    assert_eq!(d.terminate().code(), Some(0));
}

/// A proxy or firewall that answers the token request with a page (HTTP 200, text/html) is named in the log and
/// in `relay status` by the page's first words, not left as a JSON parser's "expected value at line 1".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_in_place_of_the_token_reply_is_quoted() {
    let page = ResponseTemplate::new(200).set_body_raw(
        "<html><head><title>Sophos Web Appliance: Access Denied</title></head></html>",
        "text/html; charset=utf-8",
    );
    let (_idp, _upstream, _dir, config) = client_credentials(page).await;
    let mut d = Daemon::spawn(&config);
    send_message(d.addr, b"Subject: x\r\n\r\nhi\r\n").await;
    let line = d.wait_log("relay_event=\"token_refresh_failed\"");
    assert!(line.contains("not JSON"), "{line}");
    assert!(line.contains("Sophos Web Appliance"), "{line}");
    d.wait_log("relay_event=\"deferred\"");
    let (_, doc) = status_json(&config);
    let why = doc["accounts"][0]["last_error"].as_str().unwrap_or("");
    assert!(why.contains("a proxy or a firewall"), "{doc}");
    assert_eq!(d.terminate().code(), Some(0));
}

/// The same with an error status, as a gateway answers when the identity provider is down (502): the page is
/// said to be one, not taken for the provider's words.
#[tokio::test]
async fn a_gateway_error_page_is_said_to_be_a_page() {
    let page = ResponseTemplate::new(502).set_body_raw(
        "<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>",
        "text/html",
    );
    let (_idp, _upstream, _dir, config) = client_credentials(page).await;
    let mut d = Daemon::spawn(&config);
    send_message(d.addr, b"Subject: x\r\n\r\nhi\r\n").await;
    let line = d.wait_log("relay_event=\"token_refresh_failed\"");
    assert!(
        line.contains("HTTP 502") && line.contains("a proxy or a firewall"),
        "{line}"
    );
    assert_eq!(d.terminate().code(), Some(0));
}

/// A gateway in front of the token endpoint (PHP, .NET) that answers with the request echoed as JSON, escaped as
/// its encoder likes (`\/` for `/`, `\u002B` for `+`), never gets the client secret into what relay says: not
/// `relay authorize`'s output, the log, the token file, `relay status` or the alert webhook. The reply is still
/// quoted, with the secret cut out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_echoing_the_secret_escaped_in_json_never_gets_it_quoted() {
    const SECRET: &str = "Ab+cd/ef=gh~12:34";
    for reply in [
        r#"{"request":{"client_secret":"Ab+cd\/ef=gh~12:34"}}"#,
        r#"{"request":{"client_secret":"Ab\u002Bcd\/ef=gh~12:34"}}"#,
    ] {
        let idp = MockServer::start().await;
        answer_token_requests(
            &idp,
            ResponseTemplate::new(403).set_body_raw(reply, "application/json"),
        )
        .await;
        let hook = fake_webhook().await;
        let upstream = FakeUpstream::start(&["tok"]).await;
        let dir = tempfile::tempdir().unwrap();
        common::idp::write_secret_value(dir.path(), SECRET);
        let alerts = format!(
            "[alerts]\nwebhook_url = \"{}/hook\"\nrefresh_failures = 1\n",
            hook.uri()
        );
        let config = common::idp::office_config(dir.path(), &idp.uri(), &upstream, &alerts);
        let mut seen = Vec::new();

        let out = run_authorize(&config).await;
        assert_eq!(out.status.code(), Some(1), "{reply}");
        let said = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(said.contains("403"), "{said}");
        seen.push(said);

        let mut d = Daemon::spawn(&config);
        send_message(d.addr, b"Subject: x\r\n\r\nhi\r\n").await;
        let failed = d.wait_log("relay_event=\"token_refresh_failed\"");
        assert!(
            failed.contains("403") && failed.contains("[redacted]"),
            "the reply is quoted, cut: {failed}"
        );
        seen.push(failed);
        seen.push(d.wait_log("relay_event=\"deferred\""));
        seen.push(d.wait_log("relay_event=\"alert_sent\" channel=\"webhook\""));
        let state = dir.path().join("state");
        seen.push(std::fs::read_to_string(state.join("tokens/office.json")).unwrap());
        let (_, status) = status_json(&config);
        assert_eq!(status["accounts"][0]["state"], "failing", "{status}");
        seen.push(status.to_string());
        let status = run_bounded(
            std::process::Command::new(relay_bin())
                .args(["status", "--config"])
                .arg(&config),
        );
        seen.push(String::from_utf8_lossy(&status.stdout).into_owned());
        for request in hook.received_requests().await.unwrap() {
            seen.push(String::from_utf8_lossy(&request.body).into_owned());
        }
        seen.extend(d.unmatched().iter().cloned());
        seen.extend(d.log.try_iter());
        assert_eq!(d.terminate().code(), Some(0));

        // The secret's tail as JSON has it (escaped or not) and as a form has it.
        let leaks = |text: &str| text.contains("gh~12") || text.contains("gh%7E12");
        for text in &seen {
            assert!(!leaks(text), "{reply}: the secret in {text}");
        }
    }
}

/// A directory the daemon cannot write in, as on a full or read-only disk, until [`undo`](Self::undo) or drop:
/// `chattr +i` as root (modes do not stop root), mode 0555 otherwise.
struct Unwritable(std::path::PathBuf);

impl Unwritable {
    /// None where neither works here (a file system without the immutable flag, no chattr): checked by trying.
    fn new(dir: &std::path::Path) -> Option<Unwritable> {
        if is_root() {
            let out = std::process::Command::new("chattr")
                .arg("+i")
                .arg(dir)
                .output()
                .ok()?;
            if !out.status.success() {
                return None;
            }
        } else {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o555)).ok()?;
        }
        let d = Unwritable(dir.to_path_buf());
        std::fs::write(dir.join("probe"), "x").is_err().then_some(d)
    }

    fn undo(&self) {
        if is_root() {
            let _ = std::process::Command::new("chattr")
                .arg("-i")
                .arg(&self.0)
                .output();
        } else {
            let _ = std::fs::set_permissions(&self.0, std::fs::Permissions::from_mode(0o750));
        }
    }
}

impl Drop for Unwritable {
    fn drop(&mut self) {
        self.undo();
    }
}

/// A refresh whose tokens cannot be saved (the tokens directory cannot be written) is not thrown away: its
/// access token is used, its rotated refresh token is kept for the next refresh (this provider honours each
/// refresh token once, so the one in the file is dead), an error line names the file, and the tokens are saved
/// once the directory can be written again, without waiting for the next refresh. A reload that rebuilds the
/// account meanwhile keeps them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_that_cannot_be_saved_is_used_and_saved_later() {
    let idp = MockServer::start().await;
    for (used, access, rotated) in [
        ("refresh-1", "access-2", "refresh-2"),
        ("refresh-2", "access-3", "refresh-3"),
        ("refresh-3", "access-4", "refresh-4"),
    ] {
        token_request()
            .and(body_string_contains(format!("refresh_token={used}")))
            .respond_with(tokens(access, rotated))
            .up_to_n_times(1)
            .with_priority(1)
            .mount(&idp)
            .await;
    }
    token_request()
        .respond_with(oauth_error("invalid_grant"))
        .with_priority(2)
        .mount(&idp)
        .await;
    let mut upstream = FakeUpstream::start(&["access-2"]).await;
    // Each session ends after its message, so that the next message logs in again, with the token of the moment.
    *upstream.data_reply.lock().unwrap() = "HANGUP 250 2.0.0 OK".into();
    let (dir, config) = device_config(&idp, upstream.addr.port());
    let state = dir.path().join("state");
    expired_tokens(&state, "refresh-1");
    let Some(unwritable) = Unwritable::new(&state.join("tokens")) else {
        eprintln!("SKIPPED: cannot make a directory unwritable here (chattr +i)");
        return;
    };
    let mut d = Daemon::spawn(&config);
    // The refresher renews the expired token at once.
    let line = d.wait_log("the token file cannot be written");
    assert!(
        line.contains("relay_event=\"token_refresh_failed\"")
            && line.contains("tokens/office.json")
            && line.contains("access token was renewed"),
        "{line}"
    );
    send_message(d.addr, b"Subject: one\r\n\r\nbody\r\n").await;
    assert!(upstream.next().await.auth.contains("Bearer access-2"));
    d.wait_log("relay_event=\"delivered\"");
    assert_eq!(token_file(&state)["refresh_token"], "refresh-1");
    // `relay status`, which reads the file, says that the grant is in memory only.
    let warned = |status: &serde_json::Value| {
        status["accounts"][0]["warnings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w.as_str().unwrap().contains("held in memory only"))
    };
    let (_, status) = status_json(&config);
    assert!(warned(&status) && status["ok"] == false, "{status}");

    // The upstream wants a newer token: the refresh uses the rotated refresh token, which only memory holds.
    *upstream.tokens.lock().unwrap() = vec!["access-3".into()];
    send_message(d.addr, b"Subject: two\r\n\r\nbody\r\n").await;
    assert!(upstream.next().await.auth.contains("Bearer access-3"));
    d.wait_log("relay_event=\"delivered\"");

    // A reload that rebuilds the account (a setting changed) keeps the unsaved grant.
    let text = std::fs::read_to_string(&config).unwrap();
    let changed = text.replace(
        "smtp_tls = \"none\"\n",
        "smtp_tls = \"none\"\nmax_connections = 2\n",
    );
    assert_ne!(changed, text, "the account's keys are in the config");
    std::fs::write(&config, changed).unwrap();
    // SAFETY: kill with the daemon's pid and a valid signal.
    assert_eq!(unsafe { libc::kill(d.pid() as i32, libc::SIGHUP) }, 0);
    let reloaded = d.wait_log("relay_event=\"reloaded\"");
    assert!(reloaded.contains("changed: office"), "{reloaded}");
    *upstream.tokens.lock().unwrap() = vec!["access-4".into()];
    send_message(d.addr, b"Subject: three\r\n\r\nbody\r\n").await;
    assert!(upstream.next().await.auth.contains("Bearer access-4"));
    d.wait_log("relay_event=\"delivered\"");

    unwritable.undo();
    d.wait_log("the renewed tokens are saved now");
    assert!(!warned(&status_json(&config).1));
    let file = token_file(&state);
    assert_eq!(file["access_token"], "access-4");
    assert_eq!(file["refresh_token"], "refresh-4");
    assert!(file["last_error"].is_null(), "{file}");
    let mut seen = d.unmatched().to_vec();
    seen.extend(d.log.try_iter());
    assert_eq!(d.terminate().code(), Some(0));
    for line in &seen {
        assert!(
            ![
                "access-2",
                "access-3",
                "access-4",
                "refresh-2",
                "refresh-3",
                "refresh-4"
            ]
            .iter()
            .any(|t| line.contains(t)),
            "a token logged: {line}"
        );
    }
}

/// `relay test` renews a grant it cannot save (the tokens directory cannot be written) while the daemon runs
/// with its own, saved grant: the mark `relay test` leaves names its process, so once it has exited `relay
/// status` says that grant went with it, not that the daemon holds a grant in memory only (before, status told
/// the sysadmin to fix the directory so that the daemon would save a grant it never had).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_relay_test_could_not_save_is_not_said_held_by_the_daemon() {
    let idp = MockServer::start().await;
    answer_token_requests(&idp, tokens("access-2", "refresh-2")).await;
    let upstream = FakeUpstream::start(&["access-2"]).await;
    let (dir, config) = device_config(&idp, upstream.addr.port());
    let state = dir.path().join("state");
    relay::tokens::TokenStore::new(&state)
        .save(
            "office",
            &stored(
                Duration::from_secs(3600),
                Duration::from_secs(3600),
                Duration::from_secs(60),
            ),
        )
        .unwrap();
    let d = Daemon::spawn(&config);
    // The file now holds an expired grant, which the daemon (its own valid for an hour) does not look at. The
    // daemon notices a rewritten file by its mtime alone (`reload_if_changed`), so the new file gets the old
    // one's mtime before it is renamed into place, in one step: otherwise the refresher, whenever it next woke (at
    // any time on a loaded machine), would renew the grant itself and leave `relay test` nothing to renew. If that
    // check ever looks at more than the mtime, this setup must change with it.
    let file = state.join("tokens/office.json");
    let mtime = std::fs::metadata(&file).unwrap().modified().unwrap();
    let staging = dir.path().join("staging");
    expired_tokens(&staging, "refresh-1");
    let staged = staging.join("tokens/office.json");
    std::fs::File::options()
        .write(true)
        .open(&staged)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    std::fs::rename(&staged, &file).unwrap();
    let Some(_unwritable) = Unwritable::new(&state.join("tokens")) else {
        eprintln!("SKIPPED: cannot make a directory unwritable here (chattr +i)");
        return;
    };
    let out = std::process::Command::new(relay_bin())
        .args(["test", "office", "--to", "ops@example.com", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        token_requests_made(&idp).await,
        1,
        "relay test renewed the grant: {said}"
    );
    let mark = std::fs::read_to_string(state.join("accounts/office.unsaved")).unwrap();
    assert!(mark.contains("\"pid\""), "{mark}");
    let (_, status) = status_json(&config);
    let warnings = status["accounts"][0]["warnings"].to_string();
    assert!(!warnings.contains("held in memory only"), "{status}");
    assert!(warnings.contains("relay authorize office"), "{status}");
    assert_eq!(d.terminate().code(), Some(0));
}

/// A refresh in the renewal window that fails for a reason other than a dead grant (here a proxy's HTML page
/// with HTTP 400, which is neither an OAuth error nor a passing one) leaves the still-valid access token in use:
/// the message goes with it, and the failure is logged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_still_valid_is_used_when_its_renewal_fails_with_a_page() {
    let idp = MockServer::start().await;
    answer_token_requests(
        &idp,
        ResponseTemplate::new(400).set_body_raw(
            "<html><head><title>400 Bad Request</title></head><body>proxy</body></html>",
            "text/html",
        ),
    )
    .await;
    let (mut upstream, _dir, config) = in_renewal_window(&idp, Duration::from_secs(3300)).await;
    let mut d = Daemon::spawn(&config);
    let id = send_message(d.addr, b"Subject: still valid\r\n\r\nbody\r\n").await;
    let got = upstream.next().await;
    assert!(got.auth.contains("Bearer current"), "{}", got.auth);
    let delivered = d.wait_log("relay_event=\"delivered\"");
    assert!(delivered.contains(&id), "{delivered}");
    let failed = d.wait_log("relay_event=\"token_refresh_failed\"");
    assert!(failed.contains("HTTP 400"), "{failed}");
    assert_eq!(d.terminate().code(), Some(0));
}

/// A grant that came without a refresh token (a `scope` without `offline_access`) cannot be renewed: `relay
/// authorize` says so; `relay status` warns while its access token lasts; once that has run out the daemon marks
/// the account as needing authorization and says so (`authorization_needed`), instead of calling it `ok`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_without_a_refresh_token_is_said_and_needs_authorizing_once_it_runs_out() {
    let idp = device_code_idp(900).await;
    device_code_poll()
        .respond_with(ResponseTemplate::new(200).set_body_json(serde_json::json!({
            "token_type": "Bearer", "scope": "https://outlook.office.com/SMTP.Send", "expires_in": 3599,
            "access_token": "access-1"
        })))
        .mount(&idp)
        .await;
    let (dir, config) = device_config(&idp, 9);
    let stdout = authorize_succeeds(&config).await;
    assert!(
        stdout.contains("no refresh token") && stdout.contains("offline_access"),
        "{stdout}"
    );
    let (code, status) = status_json(&config);
    assert_eq!(code, Some(1), "{status}");
    let warnings = status["accounts"][0]["warnings"].to_string();
    assert!(warnings.contains("no refresh token"), "{warnings}");

    // Its access token has run out.
    let state = dir.path().join("state");
    let mut t = stored(
        Duration::from_secs(300),
        Duration::from_secs(3600),
        Duration::ZERO,
    );
    t.expires_at = SystemTime::now() - Duration::from_secs(1);
    t.refresh_token = None;
    save_tokens(&state, &t);
    let (_, status) = status_json(&config);
    assert_eq!(
        status["accounts"][0]["state"], "needs-authorization",
        "{status}"
    );
    let mut d = Daemon::spawn(&config);
    let line = d.wait_log("relay_event=\"authorization_needed\"");
    assert!(line.contains("no refresh token"), "{line}");
    assert_eq!(token_file(&state)["needs_authorization"], true);
    assert_eq!(d.terminate().code(), Some(0));
}

/// `relay authorize` by someone who cannot write the token files (a sysadmin who forgot sudo) says so before the
/// sign-in starts: approved, then not saved, the grant would be lost.
#[tokio::test]
async fn authorize_without_write_access_to_the_tokens_says_so_before_the_sign_in() {
    use std::os::unix::fs::PermissionsExt;
    let idp = device_code_idp(900).await;
    let (dir, config) = device_config(&idp, 9);
    let tokens = dir.path().join("state/tokens");
    std::fs::create_dir_all(&tokens).unwrap();
    std::fs::set_permissions(&tokens, std::fs::Permissions::from_mode(0o555)).unwrap();
    let mut cmd = tokio::process::Command::from(relay_without_file_override());
    cmd.args(["authorize", "office", "--config"]).arg(&config);
    let out = tokio::time::timeout(LIMIT, cmd.output())
        .await
        .expect("authorize finishes")
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot store tokens") && err.contains("sudo relay authorize office"),
        "{err}"
    );
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("ABCD-EFGH"),
        "no code shown"
    );
    assert_eq!(token_requests_made(&idp).await, 0);
    assert!(
        idp.received_requests().await.unwrap().is_empty(),
        "the sign-in never started"
    );
}

/// A token endpoint that hangs (accepts, never answers: a stalling proxy) while the token in hand is still good:
/// mail goes with that token at once, not behind the renewal's 30 s timeout, message after message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_endpoint_that_hangs_does_not_hold_up_mail_while_the_token_is_good() {
    let idp = MockServer::start().await;
    answer_token_requests(
        &idp,
        tokens("access-2", "refresh-2").set_delay(Duration::from_secs(600)),
    )
    .await;
    // Inside the renewal window: the refresher renews at once, and hangs.
    let (mut upstream, _dir, config) = in_renewal_window(&idp, Duration::ZERO).await;
    let d = Daemon::spawn(&config);
    // The refresher asks at once, and waits; each upstream.next() is bounded (20 s), below the renewal's 30 s
    // timeout.
    for n in 0..3 {
        send_message(d.addr, format!("Subject: {n}\r\n\r\nbody\r\n").as_bytes()).await;
        let got = upstream.next().await;
        assert!(got.auth.contains("Bearer current"), "{}", got.auth);
    }
    let asked = idp.received_requests().await.unwrap().len();
    assert!(
        asked <= 1,
        "the refresher's renewal, and no delivery's: {asked}"
    );
    // Killed: a stop would let the hanging renewal run out its timeout first.
    drop(d);
}

/// A device-code poll that the token endpoint fails (503), or that a page answers in its place (a captive
/// portal's 200 HTML), does not end the sign-in in progress (RFC 8628 section 3.5): relay says so, waits longer,
/// and polls again until the user has approved. (The portal's page ended it at once.)
#[tokio::test]
async fn device_code_polling_outlives_a_failed_poll() {
    let idp = device_code_idp(900).await;
    for (priority, reply) in [
        (
            1,
            ResponseTemplate::new(503).set_body_string("Service Unavailable"),
        ),
        (
            2,
            ResponseTemplate::new(200)
                .insert_header("content-type", "text/html")
                .set_body_string("<html><body>Accept the Wi-Fi terms to continue</body></html>"),
        ),
        (3, oauth_error("authorization_pending")),
    ] {
        token_request()
            .respond_with(reply)
            .up_to_n_times(1)
            .with_priority(priority)
            .mount(&idp)
            .await;
    }
    device_code_poll()
        .respond_with(tokens("access-1", "refresh-1"))
        .with_priority(4)
        .mount(&idp)
        .await;
    let (dir, config) = device_config(&idp, 9);
    let stdout = authorize_succeeds(&config).await;
    assert!(
        stdout.contains("The poll failed") && stdout.contains("503"),
        "{stdout}"
    );
    assert!(stdout.contains("not understood"), "{stdout}");
    assert_eq!(
        token_requests_made(&idp).await,
        4,
        "503, portal, pending, granted"
    );
    let stored = token_file(&dir.path().join("state"));
    assert_eq!(stored["refresh_token"], "refresh-1");
}

/// A code that runs out while the token endpoint keeps failing ends with that failure, not with "pending".
#[tokio::test]
async fn device_code_that_runs_out_while_polls_fail_says_why() {
    let idp = device_code_idp(0).await;
    answer_token_requests(
        &idp,
        ResponseTemplate::new(502).set_body_string("Bad Gateway"),
    )
    .await;
    let (_dir, config) = device_config(&idp, 9);
    let stderr = authorize_fails(&config).await;
    assert!(
        stderr.contains("the code expired while the provider did not answer")
            && stderr.contains("502"),
        "{stderr}"
    );
}

/// A client secret rotated in place (the file rewritten, the config unchanged) is taken up by a reload
/// (`systemctl reload relay`, SIGHUP): the account is rebuilt, and its next token request sends the new secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_takes_up_a_secret_rotated_in_place() {
    let idp = MockServer::start().await;
    for (secret, access) in [("s3cret-value", "tok-1"), ("n3w-secret-value", "tok-2")] {
        token_request()
            .and(body_string_contains(format!("client_secret={secret}")))
            .respond_with(tokens(access, "unused"))
            .mount(&idp)
            .await;
    }
    let mut upstream = FakeUpstream::start(&["tok-1"]).await;
    let dir = tempfile::tempdir().unwrap();
    let config = common::idp::account_config(dir.path(), &idp.uri(), &upstream, "");
    let mut d = Daemon::spawn(&config);
    send_message(d.addr, b"Subject: one\r\n\r\nbody\r\n").await;
    assert!(upstream.next().await.auth.contains("Bearer tok-1"));
    d.wait_log("relay_event=\"delivered\"");

    std::fs::write(dir.path().join("secret"), "n3w-secret-value\n").unwrap();
    // SAFETY: kill with the daemon's pid and a valid signal.
    assert_eq!(unsafe { libc::kill(d.pid() as i32, libc::SIGHUP) }, 0);
    let reloaded = d.wait_log("relay_event=\"reloaded\"");
    assert!(reloaded.contains("changed: office"), "{reloaded}");
    // The old secret's token is refused now: the account asks for a new one, with the new secret.
    *upstream.tokens.lock().unwrap() = vec!["tok-2".into()];
    send_message(d.addr, b"Subject: two\r\n\r\nbody\r\n").await;
    assert!(upstream.next().await.auth.contains("Bearer tok-2"));
    d.wait_log("relay_event=\"delivered\"");
    let form = common::idp::last_token_form(&idp).await;
    assert_eq!(
        common::idp::form_field(&form, "client_secret"),
        Some("n3w-secret-value")
    );

    // A reload with nothing changed keeps the account as it is.
    assert_eq!(unsafe { libc::kill(d.pid() as i32, libc::SIGHUP) }, 0);
    let reloaded = d.wait_log("relay_event=\"reloaded\"");
    assert!(reloaded.contains("changed: none"), "{reloaded}");
    assert_eq!(d.terminate().code(), Some(0));
}

/// The fix relay names for a refused client secret (rewrite it, reload) sends the mail deferred meanwhile at
/// once, as a token endpoint that comes back does, not at its next retry step (an hour here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mail_deferred_for_a_refused_secret_goes_once_a_reload_brings_the_right_one() {
    let idp = MockServer::start().await;
    token_request()
        .and(body_string_contains("client_secret=n3w-secret-value"))
        .respond_with(tokens("tok-2", "unused"))
        .mount(&idp)
        .await;
    answer_token_requests(
        &idp,
        ResponseTemplate::new(401).set_body_json(serde_json::json!({
            "error": "invalid_client",
            "error_description": "AADSTS7000215: Invalid client secret provided."
        })),
    )
    .await;
    let mut upstream = FakeUpstream::start(&["tok-2"]).await;
    let dir = tempfile::tempdir().unwrap();
    let config = common::idp::account_config(
        dir.path(),
        &idp.uri(),
        &upstream,
        "[queue]\nretry = [\"1h\"]",
    );
    let mut d = Daemon::spawn(&config);
    let id = send_message(d.addr, b"Subject: waits\r\n\r\nbody\r\n").await;
    let deferred = d.wait_log("relay_event=\"deferred\"");
    assert!(deferred.contains(&id), "{deferred}");

    std::fs::write(dir.path().join("secret"), "n3w-secret-value\n").unwrap();
    d.reload();
    let got = upstream.next().await;
    assert!(got.auth.contains("Bearer tok-2"), "{}", got.auth);
    let delivered = d.wait_log("relay_event=\"delivered\"");
    assert!(delivered.contains(&id), "{delivered}");
    assert_eq!(d.terminate().code(), Some(0));
}

/// relay stopping (`systemctl stop`, a restart after an upgrade) while it renews an account's grant lets the
/// renewal finish and saves it: aborted between the provider's answer and the save, a rotated refresh token is
/// lost, and with a provider that rotates strictly, the grant with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewal_under_way_is_finished_and_saved_when_relay_stops() {
    let mut endpoint = common::idp::RotatingEndpoint::start("R1").await;
    let upstream = FakeUpstream::start(&["A1"]).await;
    let dir = tempfile::tempdir().unwrap();
    let config = common::idp::device_code_config(dir.path(), &endpoint.url, &upstream, "");
    // Five minutes left of an hour-long token: the refresher renews it at start.
    common::idp::write_tokens_due(&dir.path().join("state"), "office", "R1");
    let state = dir.path().join("state");
    let mut daemon = Daemon::spawn(&config);
    assert_eq!(endpoint.next_ask().await, "R1");
    // SAFETY: kill with the pid of our own child and a valid signal.
    assert_eq!(unsafe { libc::kill(daemon.pid() as i32, libc::SIGTERM) }, 0);
    let daemon = tokio::task::spawn_blocking(move || {
        daemon.wait_log("waiting for a token renewal under way to finish");
        daemon
    })
    .await
    .unwrap();
    endpoint.release.take().unwrap().send(()).unwrap();
    let status = tokio::task::spawn_blocking(move || daemon.terminate())
        .await
        .unwrap();
    assert!(status.success(), "{status:?}");
    assert_renewed_grant_in(&state);
}

/// While relay renews a grant (the token endpoint holds its answer), `meanwhile` changes the token file; the
/// daemon is let go on once its log says `then`. The state dir and the daemon, for a look at the file.
async fn renewal_while_the_file_changes(
    meanwhile: impl FnOnce(&std::path::Path),
    then: &'static str,
) -> (tempfile::TempDir, Daemon) {
    let mut endpoint = common::idp::RotatingEndpoint::start("R1").await;
    let upstream = FakeUpstream::start(&["A1"]).await;
    let dir = tempfile::tempdir().unwrap();
    let config = common::idp::device_code_config(dir.path(), &endpoint.url, &upstream, "");
    common::idp::write_tokens_due(&dir.path().join("state"), "office", "R1");
    let mut daemon = Daemon::spawn(&config);
    assert_eq!(endpoint.next_ask().await, "R1");
    meanwhile(&dir.path().join("state"));
    endpoint.release.take().unwrap().send(()).unwrap();
    let daemon = tokio::task::spawn_blocking(move || {
        daemon.wait_log(then);
        daemon
    })
    .await
    .unwrap();
    (dir, daemon)
}

/// Asserts that the token file holds the renewed grant (`A1`, rotated refresh token `R2`) of a `RotatingEndpoint`.
fn assert_renewed_grant_in(state: &std::path::Path) {
    use secrecy::ExposeSecret;
    let saved = relay::tokens::TokenStore::new(state)
        .load("office")
        .unwrap()
        .expect("the renewed grant saved");
    assert_eq!(saved.access_token.expose_secret(), "A1");
    assert!(!saved.needs_authorization && saved.last_error.is_none());
    assert_eq!(
        saved
            .refresh_token
            .as_ref()
            .map(|r| r.expose_secret().to_string()),
        Some("R2".to_string())
    );
}

/// As [`assert_renewed_grant_in`], then stops the daemon.
async fn renewed_grant_saved(state: &std::path::Path, daemon: Daemon) {
    assert_renewed_grant_in(state);
    let status = tokio::task::spawn_blocking(move || daemon.terminate())
        .await
        .unwrap();
    assert!(status.success(), "{status:?}");
}

/// The token file turns into something that is not tokens (a bad edit, a disk error) while relay renews the grant:
/// the renewed grant, whose rotated refresh token is the only live one, is not dropped for it. The damaged file is
/// set aside and the renewed grant saved in its place (it was lost, and with a provider rotating strictly, the grant).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_file_damaged_during_a_renewal_does_not_lose_the_renewed_grant() {
    let (dir, daemon) = renewal_while_the_file_changes(
        |state| write_private(&state.join("tokens/office.json"), "{ damaged"),
        "the token file is damaged; it is set aside",
    )
    .await;
    let state = dir.path().join("state");
    let aside = files_in(&state, "tokens")
        .into_iter()
        .find(|f| f.starts_with("office.json.damaged-"))
        .expect("the damaged file kept");
    assert_eq!(
        std::fs::read_to_string(state.join("tokens").join(aside)).unwrap(),
        "{ damaged"
    );
    renewed_grant_saved(&state, daemon).await;
}

/// Another process's failed renewal (`relay test` presenting the older refresh token, which a provider rotating
/// strictly refuses) is written to the token file while relay's own renewal runs: the renewed grant is saved over
/// that failure record, not dropped for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_record_written_during_a_renewal_does_not_replace_the_renewed_grant() {
    let (dir, daemon) = renewal_while_the_file_changes(
        |state| {
            let store = relay::tokens::TokenStore::new(state);
            let mut failed = store.load("office").unwrap().unwrap();
            failed.needs_authorization = true;
            failed.last_error =
                Some("invalid_grant: the refresh token has already been used".into());
            store.save("office", &failed).unwrap();
        },
        "the token file was rewritten with a failed renewal during this one",
    )
    .await;
    renewed_grant_saved(&dir.path().join("state"), daemon).await;
}
