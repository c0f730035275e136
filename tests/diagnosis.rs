//! The journal explains failures in plain words with their fix (`relay_diagnosis`), through the real binary:
//! an upstream's refusal on a deferral or a dead letter, and a token endpoint's AADSTS error on refresh.

mod common;

use common::idp::{account_top, device_code_top, idp_issuing};
use common::upstream::FakeUpstream;
use common::*;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

const LISTENER: &str = "address = \"127.0.0.1:0\"\nauth = \"none\"";

/// The daemon with one client-credentials account pointed at the fakes.
fn daemon(dir: &std::path::Path, idp: &str, upstream: &FakeUpstream) -> Daemon {
    let top = account_top(dir, idp, upstream, "");
    Daemon::spawn(&write_config_with(dir, &top, LISTENER))
}

/// A fake Microsoft token endpoint that answers every request with this OAuth error, worded as Microsoft does.
async fn idp_refusing(status: u16, error: &str, description: &str) -> MockServer {
    let code: u64 = description[6..description.find(':').unwrap()]
        .parse()
        .unwrap();
    let reply = ResponseTemplate::new(status).set_body_json(serde_json::json!({
        "error": error,
        "error_description": format!("{description}\r\nTrace ID: 2f6a1c0e-8e1b-4c1a-9e42-5b1c3d9e0a00\r\nCorrelation ID: 0b8e4a52-3c7d-4f0e-a0d2-9c5f1e6b7a11\r\nTimestamp: 2024-05-01 10:00:00Z"),
        "error_codes": [code],
        "timestamp": "2024-05-01 10:00:00Z",
    }));
    let idp = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/token"))
        .respond_with(reply)
        .mount(&idp)
        .await;
    idp
}

/// Every one of `words` is in the log line.
fn assert_says(line: &str, words: &[&str]) {
    for w in words {
        assert!(line.contains(w), "{w:?} not in {line}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deferral_for_smtp_auth_disabled_says_what_to_change() {
    let idp = idp_issuing("tok").await;
    let upstream = FakeUpstream::start(&["REFUSE 535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant. Visit https://aka.ms/smtp_auth_disabled for more information. [AM0PR02CA0013.eurprd02.prod.outlook.com]"]).await;
    let dir = tempfile::tempdir().unwrap();
    let mut d = daemon(dir.path(), &idp.uri(), &upstream);
    let id = send_message(d.addr, b"Subject: t\r\n\r\nhi\r\n").await;
    let line = d.wait_log("relay_event=\"deferred\"");
    assert_says(
        &line,
        &[
            &id,
            "relay_diagnosis=\"SMTP AUTH is turned off for the whole tenant (535 5.7.139); fix:",
        ],
    );
    // The message says it too, for a reader of `journalctl -u relay` without fields.
    assert_says(
        &line,
        &[
            "deferred: SMTP AUTH is turned off for the whole tenant",
            "Turn off SMTP AUTH protocol",
        ],
    );
    assert_eq!(d.terminate().code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_for_send_as_denied_names_rewrite_from() {
    let idp = idp_issuing("tok").await;
    let upstream = FakeUpstream::start(&["tok"]).await;
    *upstream.data_reply.lock().unwrap() = "554 5.2.252 SendAsDenied; relay@example.com not allowed to send as a@example.com; STOREDRV.Submission.Exception:SendAsDeniedException.MapiExceptionSendAsDenied; Failed to process message due to a permanent exception with message [BeginDiagnosticData]Cannot submit message.".into();
    let dir = tempfile::tempdir().unwrap();
    let mut d = daemon(dir.path(), &idp.uri(), &upstream);
    send_message(d.addr, b"Subject: t\r\n\r\nhi\r\n").await;
    let line = d.wait_log("relay_event=\"dead\"");
    assert_says(
        &line,
        &[
            "relay_diagnosis=\"the mailbox may not send as the sender address",
            "rewrite_from",
        ],
    );
    // `relay status` says it under the last delivery too (it showed the reply alone).
    let out = run_bounded(
        std::process::Command::new(relay_bin())
            .args(["status", "--config"])
            .arg(dir.path().join("relay.toml")),
    );
    let status = String::from_utf8_lossy(&out.stdout);
    assert!(
        status.contains("  diagnosis: the mailbox may not send as the sender address"),
        "{status}"
    );
    assert_eq!(d.terminate().code(), Some(0));
}

/// The same refusal for an account that already rewrites From: to its mailbox: the fix is not to set what is
/// set, but the mailbox's own address, a Sender: header, or Send As rights.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_as_refusal_with_from_rewritten_already_says_what_else_to_check() {
    let idp = idp_issuing("tok").await;
    let upstream = FakeUpstream::start(&["tok"]).await;
    *upstream.data_reply.lock().unwrap() = "554 5.2.252 SendAsDenied; relay@example.com not allowed to send as relay@example.com; STOREDRV.Submission.Exception:SendAsDeniedException.MapiExceptionSendAsDenied".into();
    let dir = tempfile::tempdir().unwrap();
    let top = account_top(
        dir.path(),
        &idp.uri(),
        &upstream,
        "rewrite_from = \"header\"\n",
    );
    let config = write_config_with(dir.path(), &top, LISTENER);
    // `relay test` says the same.
    let out = tokio::task::spawn_blocking({
        let config = config.clone();
        move || {
            std::process::Command::new(relay_bin())
                .args(["test", "office", "--to", "ops@example.com", "--config"])
                .arg(&config)
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("already made its From:") && !said.contains("set rewrite_from"),
        "{said}"
    );
    let mut d = Daemon::spawn(&config);
    send_message(d.addr, b"Subject: t\r\n\r\nhi\r\n").await;
    let line = d.wait_log("relay_event=\"dead\"");
    assert_says(
        &line,
        &[
            "already made its From: the account's mailbox",
            "Sender: header",
            "primary address",
        ],
    );
    assert!(!line.contains("set rewrite_from"), "{line}");
    assert_eq!(d.terminate().code(), Some(0));
}

/// An expired Azure client secret (AADSTS7000222) on refresh: the refresh failure and the deferral both say to
/// create a new secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_failure_from_the_identity_platform_is_diagnosed() {
    let idp = idp_refusing(401, "invalid_client", "AADSTS7000222: The provided client secret keys for app '3f2a9c1e-0000-4000-8000-000000000001' are expired. Visit the Azure portal to create new keys for your app: https://aka.ms/NewClientSecret, or consider using certificate credentials for added security: https://aka.ms/certCreds.").await;
    let upstream = FakeUpstream::start(&["tok"]).await;
    let dir = tempfile::tempdir().unwrap();
    let mut d = daemon(dir.path(), &idp.uri(), &upstream);
    let line = d.wait_log("relay_event=\"token_refresh_failed\"");
    assert_says(
        &line,
        &[
            "relay_diagnosis=\"the client secret has expired (AADSTS7000222); fix: create a new secret",
            "token refresh failed: the client secret has expired",
        ],
    );
    send_message(d.addr, b"Subject: t\r\n\r\nhi\r\n").await;
    let line = d.wait_log("relay_event=\"deferred\"");
    assert_says(&line, &["relay_diagnosis=\"the client secret has expired"]);
    assert_eq!(d.terminate().code(), Some(0));
}

/// A refresh token dead after 90 idle days (AADSTS700082, `invalid_grant`): the account needs authorization,
/// and the line says so with the command.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_expired_refresh_token_asks_for_relay_authorize() {
    let idp = idp_refusing(400, "invalid_grant", "AADSTS700082: The refresh token has expired due to inactivity. The token was issued on 2024-01-01T10:00:00.0000000Z and was inactive for 90.00:00:00.").await;
    let upstream = FakeUpstream::start(&["tok"]).await;
    let dir = tempfile::tempdir().unwrap();
    let top = device_code_top(dir.path(), &idp.uri(), &upstream, "");
    // A token file whose access token has expired, so that the daemon refreshes at once.
    let past = std::time::SystemTime::now() - std::time::Duration::from_secs(60);
    relay::tokens::TokenStore::new(&dir.path().join("state"))
        .save(
            "office",
            &relay::tokens::StoredTokens {
                access_token: "old".to_string().into(),
                expires_at: past,
                obtained_at: past - std::time::Duration::from_secs(3600),
                refresh_token: Some("refresh-1".to_string().into()),
                last_refresh: Some(past),
                needs_authorization: false,
                last_error: None,
            },
        )
        .unwrap();
    let mut d = Daemon::spawn(&write_config_with(dir.path(), &top, LISTENER));
    let line = d.wait_log("relay_event=\"authorization_needed\"");
    assert_says(
        &line,
        &[
            "relay_diagnosis=\"the refresh token expired after 90 days without use (AADSTS700082); fix: run `relay authorize office`\"",
        ],
    );
    assert_eq!(d.terminate().code(), Some(0));
}
