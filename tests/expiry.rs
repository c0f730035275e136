//! Credentials that expire: warnings in the log and in `relay status`, and an expired secret's failure that
//! names the fix.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::{Duration, SystemTime};

use common::*;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

fn date_in(days: u64) -> String {
    humantime::format_rfc3339_seconds(SystemTime::now() + Duration::from_secs(days * 86_400))
        .to_string()[..10]
        .to_string()
}

fn write_config(idp: &MockServer, expires: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "s").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let path = dir.path().join("relay.toml");
    std::fs::write(
        &path,
        format!(
            "state_dir = {state:?}\ndefault_account = \"office\"\n[[listener]]\naddress = \"127.0.0.1:0\"\nauth = \"none\"\n[[account]]\nname = \"office\"\nprovider = \"microsoft\"\ntenant = \"contoso.onmicrosoft.com\"\nflow = \"client_credentials\"\nmailbox = \"noreply@example.com\"\nclient_id = \"c\"\nclient_secret_file = {secret:?}\nclient_secret_expires = \"{expires}\"\ntoken_url = \"{idp}/token\"\nsmtp_host = \"127.0.0.1\"\nsmtp_port = 9\nsmtp_tls = \"none\"\n",
            state = dir.path().join("state"),
            idp = idp.uri(),
        ),
    )
    .unwrap();
    (dir, path)
}

fn status(config: &std::path::Path) -> (Option<i32>, serde_json::Value, String) {
    let json = Command::new(relay_bin())
        .args(["status", "--json", "--config"])
        .arg(config)
        .output()
        .unwrap();
    let text = Command::new(relay_bin())
        .args(["status", "--config"])
        .arg(config)
        .output()
        .unwrap();
    (
        json.status.code(),
        serde_json::from_slice(&json.stdout).unwrap(),
        String::from_utf8_lossy(&text.stdout).into_owned(),
    )
}

#[tokio::test]
async fn secret_expiring_soon_is_warned_about() {
    let idp = MockServer::start().await;
    let (_dir, config) = write_config(&idp, &date_in(10));
    let mut daemon = Daemon::spawn(&config);
    let line = daemon.wait_log("relay_event=\"credential_expiring\"");
    assert!(line.contains("client secret expires in"), "{line}");
    let (code, json, text) = status(&config);
    assert_eq!(code, Some(1), "an expiring secret needs attention");
    let warning = json["accounts"][0]["warnings"][0].as_str().unwrap();
    assert!(
        warning.contains("client secret expires in") && warning.contains("client_secret_file"),
        "{warning}"
    );
    assert!(
        text.contains("warning: account office: the client secret expires in"),
        "{text}"
    );
    assert_eq!(daemon.terminate().code(), Some(0));

    // Far enough ahead: no warning.
    let (_dir, config) = write_config(&idp, &date_in(90));
    let (_, json, _) = status(&config);
    assert_eq!(json["accounts"][0]["warnings"], serde_json::json!([]));
}

#[tokio::test]
async fn expired_secret_failure_names_the_fix() {
    let idp = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/token"))
        .respond_with(ResponseTemplate::new(401).set_body_json(serde_json::json!({
            "error": "invalid_client",
            "error_description": "AADSTS7000222: The provided client secret keys for app 'c' are expired.",
            "error_codes": [7000222]
        })))
        .mount(&idp)
        .await;
    let (_dir, config) = write_config(&idp, "2020-01-01");
    let mut daemon = Daemon::spawn(&config);
    send_message(daemon.addr, b"Subject: x\r\n\r\nbody\r\n").await;
    let line = daemon.wait_log("relay_event=\"deferred\"");
    assert!(line.contains("create a new secret"), "{line}");
    let (code, json, _) = status(&config);
    assert_eq!(code, Some(1));
    let account = &json["accounts"][0];
    assert_eq!(account["state"], "failing", "{account}");
    assert!(
        account["last_delivery"]["reply"]
            .as_str()
            .unwrap()
            .contains("create a new secret"),
        "{account}"
    );
    assert!(
        account["warnings"][0]
            .as_str()
            .unwrap()
            .contains("expired on 2020-01-01"),
        "{account}"
    );
    assert_eq!(daemon.terminate().code(), Some(0));
}
