//! Tokens sealed at rest (`token_encryption`), through the real binary: `relay authorize` writes a file that
//! holds no token, the daemon refreshes and delivers with it, `relay status` reads it; without the key, or
//! with another, relay says which file and what to do; a key file others can read is refused; the systemd
//! credential works from `$CREDENTIALS_DIRECTORY` and, outside the service, through `systemd-creds`.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;

use common::idp::{account_top, device_code_top, idp_issuing};
use common::upstream::FakeUpstream;
use common::*;
use wiremock::matchers::{body_string_contains, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

const LISTENER: &str = "address = \"127.0.0.1:0\"\nauth = \"none\"";

/// Writes a key file (64 hex digits) with `mode`.
fn key_file(dir: &Path, name: &str, hex_byte: &str, mode: u32) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, format!("{}\n", hex_byte.repeat(32))).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    path
}

/// A copy of `config` with its `token_encryption = …` line replaced by `line`.
fn variant(config: &Path, name: &str, line: &str) -> PathBuf {
    let text: Vec<String> = std::fs::read_to_string(config)
        .unwrap()
        .lines()
        .map(|l| match l.starts_with("token_encryption") {
            true => line.to_string(),
            false => l.to_string(),
        })
        .collect();
    let path = config.with_file_name(name);
    std::fs::write(&path, text.join("\n")).unwrap();
    path
}

/// Runs `relay ARGS --config CONFIG` to its end (bounded), with extra environment.
async fn relay(args: &[&str], config: &Path, env: &[(&str, &str)]) -> Output {
    let mut cmd = tokio::process::Command::new(relay_bin());
    cmd.args(args)
        .arg("--config")
        .arg(config)
        .env_remove("JOURNAL_STREAM")
        .env_remove("CREDENTIALS_DIRECTORY")
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    tokio::time::timeout(LIMIT, cmd.output())
        .await
        .expect("relay finishes in time")
        .unwrap()
}

/// A device-code account whose tokens are sealed with `DIR/token.key`.
fn sealed_config(dir: &Path, idp: &MockServer, upstream: &FakeUpstream) -> PathBuf {
    let key = key_file(dir, "token.key", "5a", 0o600);
    let top = format!(
        "token_encryption = {key:?}\n{}",
        device_code_top(dir, &idp.uri(), upstream, "")
    );
    write_config_with(dir, &top, LISTENER)
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `relay status --json`, parsed.
async fn status(config: &Path, env: &[(&str, &str)]) -> serde_json::Value {
    let out = relay(&["status", "--json"], config, env).await;
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", stderr(&out)))
}

fn tokens(access: &str, refresh: &str) -> ResponseTemplate {
    ResponseTemplate::new(200).set_body_json(serde_json::json!({
        "token_type": "Bearer", "expires_in": 3599, "access_token": access, "refresh_token": refresh
    }))
}

/// A fake identity provider: the device code flow grants access-1/refresh-1, and refresh-1 refreshes to
/// access-2/refresh-2 (rotated).
async fn identity_provider() -> MockServer {
    let idp = MockServer::start().await;
    let device = serde_json::json!({
        "device_code": "DEVICE-1", "user_code": "ABCD-EFGH",
        "verification_uri": "https://microsoft.com/devicelogin", "expires_in": 900, "interval": 0
    });
    for (at, asked, reply) in [
        (
            "/devicecode",
            "client_id=",
            ResponseTemplate::new(200).set_body_json(device),
        ),
        (
            "/token",
            "device_code=DEVICE-1",
            tokens("access-1", "refresh-1"),
        ),
        (
            "/token",
            "refresh_token=refresh-1",
            tokens("access-2", "refresh-2"),
        ),
    ] {
        Mock::given(method("POST"))
            .and(path(at))
            .and(body_string_contains(asked))
            .respond_with(reply)
            .mount(&idp)
            .await;
    }
    idp
}

/// The token file holds no token and is no plain token file; it opens with the config's key.
fn assert_sealed(config: &Path, state: &Path, secrets: &[&str]) -> relay::tokens::StoredTokens {
    let bytes = std::fs::read(state.join("tokens/office.json")).unwrap();
    let text = String::from_utf8_lossy(&bytes);
    for s in secrets {
        assert!(!text.contains(s), "{s} in the token file: {text}");
    }
    let json: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    assert!(
        json.get("access_token").is_none() && json.get("refresh_token").is_none(),
        "{json}"
    );
    assert_eq!(json["v"], 1, "{json}");
    let config = relay::config::Config::load(config).unwrap();
    relay::tokens::TokenStore::for_config(&config)
        .unwrap()
        .load("office")
        .unwrap()
        .expect("tokens")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sealed_tokens_are_authorized_refreshed_and_used_and_need_their_key() {
    let idp = identity_provider().await;
    // Only the refreshed token is good: the daemon must open the file, refresh with its refresh token, and
    // seal the rotated one.
    let mut upstream = FakeUpstream::start(&["access-2"]).await;
    let dir = tempfile::tempdir().unwrap();
    let config = sealed_config(dir.path(), &idp, &upstream);
    let state = dir.path().join("state");

    let out = relay(&["authorize", "office"], &config, &[]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let stored = assert_sealed(&config, &state, &["access-1", "refresh-1"]);
    assert_eq!(
        secrecy::ExposeSecret::expose_secret(stored.refresh_token.as_ref().unwrap()),
        "refresh-1"
    );
    let s = status(&config, &[]).await;
    assert_eq!(s["accounts"][0]["state"], "ok", "{s}");
    assert!(s["accounts"][0]["token_valid_until"].is_string(), "{s}");

    let mut daemon = Daemon::spawn(&config);
    send_message(daemon.addr, b"Subject: sealed\r\n\r\nbody\r\n").await;
    let got = upstream.next().await;
    assert!(got.auth.contains("Bearer access-2"), "{}", got.auth);
    daemon.wait_log("relay_event=\"delivered\"");
    assert_eq!(daemon.terminate().code(), Some(0));
    let stored = assert_sealed(&config, &state, &["access-2", "refresh-2", "refresh-1"]);
    assert_eq!(
        secrecy::ExposeSecret::expose_secret(stored.refresh_token.as_ref().unwrap()),
        "refresh-2",
        "the rotated refresh token is kept, sealed"
    );

    // The same state dir with another key: the daemon does not start, and says which file and what to do.
    let other = key_file(dir.path(), "other.key", "a5", 0o600);
    let wrong = variant(
        &config,
        "wrong.toml",
        &format!("token_encryption = {other:?}"),
    );
    let out = relay(&["serve"], &wrong, &[]).await;
    let err = stderr(&out);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("tokens/office.json cannot be decrypted with the token key from")
            && err.contains("other.key")
            && err.contains("relay authorize office"),
        "{err}"
    );
    let s = status(&wrong, &[]).await;
    assert_eq!(s["accounts"][0]["state"], "failing", "{s}");
    assert!(
        s["accounts"][0]["last_error"]
            .as_str()
            .unwrap()
            .contains("cannot be decrypted"),
        "{s}"
    );

    // And without any key.
    let none = variant(&config, "none.toml", "");
    let out = relay(&["serve"], &none, &[]).await;
    let err = stderr(&out);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("tokens/office.json is encrypted, but token_encryption is not set"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_file_others_can_read_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path(), "token.key", "5a", 0o644);
    let config = write_config_with(dir.path(), &format!("token_encryption = {key:?}"), LISTENER);
    for cmd in ["serve", "check"] {
        let out = relay(&[cmd], &config, &[]).await;
        let err = stderr(&out);
        assert!(!out.status.success(), "{cmd}: {err}");
        assert!(
            err.contains(&format!(
                "{}: token_encryption: {} has mode 0644",
                config.display(),
                key.display()
            )) && err.contains("0640 or stricter"),
            "{cmd}: {err}"
        );
    }
}

/// A script standing for `systemd-creds`: it prints the key for exactly the call relay makes, else fails as
/// the real one does without the credential.
fn fake_systemd_creds(dir: &Path, key_hex: Option<&str>) -> PathBuf {
    let bin = dir.join(if key_hex.is_some() {
        "good-bin"
    } else {
        "bad-bin"
    });
    std::fs::create_dir_all(&bin).unwrap();
    let body = match key_hex {
        Some(hex) => format!(
            "if [ \"$*\" = \"decrypt --name=relay-token-key /etc/relay/token-key.cred -\" ]; then echo {hex}; exit 0; fi\necho \"unexpected: $*\" >&2; exit 2"
        ),
        None => {
            "echo 'Failed to open /etc/relay/token-key.cred: No such file or directory' >&2; exit 1"
                .into()
        }
    };
    let script = bin.join("systemd-creds");
    std::fs::write(&script, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    bin
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_systemd_credential_seals_plain_tokens_at_start() {
    let idp = idp_issuing("tok").await;
    let mut upstream = FakeUpstream::start(&["tok"]).await;
    let dir = tempfile::tempdir().unwrap();
    let hex = "c3".repeat(32);
    // What systemd leaves after decrypting `LoadCredentialEncrypted=relay-token-key:…`.
    let creds = dir.path().join("credentials");
    std::fs::create_dir(&creds).unwrap();
    key_file(&creds, "relay-token-key", "c3", 0o400);
    let top = format!(
        "token_encryption = \"systemd-creds\"\n{}",
        account_top(dir.path(), &idp.uri(), &upstream, "")
    );
    let config = write_config_with(dir.path(), &top, LISTENER);
    let state = dir.path().join("state");
    // Tokens from before encryption was turned on: plain.
    write_valid_tokens(
        &state,
        "office",
        "tok",
        std::time::Duration::from_secs(3600),
    );

    let mut daemon = Daemon::spawn_with(&config, |c| {
        c.env("CREDENTIALS_DIRECTORY", &creds);
    });
    let line = daemon.wait_log("the token file was plain; it is encrypted from now on");
    assert!(line.contains("relay_account=office"), "{line}");
    send_message(daemon.addr, b"Subject: plain then sealed\r\n\r\nbody\r\n").await;
    assert!(upstream.next().await.auth.contains("Bearer tok"));
    daemon.wait_log("relay_event=\"delivered\"");
    assert_eq!(daemon.terminate().code(), Some(0));
    let bytes = std::fs::read(state.join("tokens/office.json")).unwrap();
    assert!(!String::from_utf8_lossy(&bytes).contains("tok\""));
    assert!(serde_json::from_slice::<serde_json::Value>(&bytes).unwrap()["ct"].is_string());

    // Outside the service, relay asks systemd-creds for the same credential.
    let path = std::env::var("PATH").unwrap_or_default();
    let good = format!(
        "{}:{path}",
        fake_systemd_creds(dir.path(), Some(&hex)).display()
    );
    let s = status(&config, &[("PATH", &good)]).await;
    assert_eq!(s["accounts"][0]["state"], "ok", "{s}");
    let bad = format!("{}:{path}", fake_systemd_creds(dir.path(), None).display());
    let s = status(&config, &[("PATH", &bad)]).await;
    let error = s["accounts"][0]["last_error"].as_str().unwrap_or_default();
    assert!(
        error.contains("systemd-creds decrypt --name=relay-token-key /etc/relay/token-key.cred -")
            && error.contains("No such file"),
        "{s}"
    );

    // In the service, a unit without the credential is told what it lacks.
    let empty = dir.path().join("no-credentials");
    std::fs::create_dir(&empty).unwrap();
    let out = relay(
        &["serve"],
        &config,
        &[("CREDENTIALS_DIRECTORY", empty.to_str().unwrap())],
    )
    .await;
    let err = stderr(&out);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("LoadCredentialEncrypted=relay-token-key:/etc/relay/token-key.cred"),
        "{err}"
    );
}

/// A daemon stopped while it held a renewed grant it could not write; the sysadmin then sets `token_encryption`.
/// The next start seals the plain file (its own, older grant), and `relay status` still says that the renewed
/// grant went with the stopped daemon: sealing the file used to clear that word before the start could give it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sealing_at_start_keeps_the_word_that_an_unsaved_grant_was_lost() {
    let idp = identity_provider().await;
    let upstream = FakeUpstream::start(&["access-1"]).await;
    let dir = tempfile::tempdir().unwrap();
    let config = sealed_config(dir.path(), &idp, &upstream);
    let plain = variant(&config, "plain.toml", "");
    let state = dir.path().join("state");
    let out = relay(&["authorize", "office"], &plain, &[]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    relay::tokens::TokenStore::new(&state).mark_unsaved("office", "read-only file system");

    let daemon = Daemon::spawn(&config);
    assert_sealed(&config, &state, &["access-1", "refresh-1"]);
    let s = status(&config, &[]).await;
    let warnings = s["accounts"][0]["warnings"].to_string();
    assert!(
        warnings.contains("relay stopped while it held a renewed grant")
            && warnings.contains("read-only file system"),
        "{s}"
    );
    assert_eq!(daemon.terminate().code(), Some(0));
}
