//! `relay test ACCOUNT --to ADDR` through the binary: the transcript with tokens redacted, the result, the
//! diagnosis of a failure, and what `relay status` remembers of it.

mod common;

use common::idp::{account_top, idp_issuing};
use common::upstream::FakeUpstream;
use common::*;

/// Runs `relay ARGS --config CONFIG` off the runtime (the fakes answer on it) and returns (exit code, stdout).
async fn relay(config: &std::path::Path, args: &[&str]) -> (i32, String) {
    let mut cmd = std::process::Command::new(relay_bin());
    cmd.args(args).arg("--config").arg(config);
    let out = tokio::time::timeout(
        LIMIT,
        tokio::task::spawn_blocking(move || cmd.output().unwrap()),
    )
    .await
    .expect("relay answers in time")
    .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_test_message_shows_the_transcript_and_is_remembered() {
    let idp = idp_issuing("tok-secret-1").await;
    let mut upstream = FakeUpstream::start(&["tok-secret-1"]).await;
    let dir = tempfile::tempdir().unwrap();
    let top = account_top(dir.path(), &idp.uri(), &upstream, "");
    let config = write_config_with(dir.path(), &top, "address = \"127.0.0.1:0\"\n");

    let (code, out) = relay(&config, &["test", "office", "--to", "ops@example.com"]).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("C: EHLO "), "{out}");
    assert!(
        out.contains("C: AUTH XOAUTH2 [credentials redacted]"),
        "{out}"
    );
    assert!(out.contains("S: 235 2.7.0 Accepted"), "{out}");
    assert!(out.contains("C: RCPT TO:<ops@example.com>"), "{out}");
    assert!(out.contains("delivered: 250"), "{out}");
    assert!(
        !out.contains("tok-secret-1"),
        "a token reached the output: {out}"
    );
    let got = upstream.next().await;
    assert_eq!(got.to, ["ops@example.com"]);
    assert!(String::from_utf8_lossy(&got.data).contains("Subject: relay test message from "));

    let (_, status) = relay(&config, &["status"]).await;
    assert!(status.contains("relay test: verified"), "{status}");

    // Microsoft's tenant-wide refusal: the test fails, says so, and status remembers it.
    upstream.tokens.lock().unwrap().push(
        "REFUSE 535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant."
            .into(),
    );
    let (code, out) = relay(&config, &["test", "office", "--to", "ops@example.com"]).await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("failed: 535 5.7.139"), "{out}");
    assert!(out.contains("diagnosis: "), "{out}");
    let (_, status) = relay(&config, &["status", "--json"]).await;
    let doc: serde_json::Value = serde_json::from_str(status.lines().next().unwrap()).unwrap();
    assert_eq!(doc["accounts"][0]["test"]["result"], "failing", "{doc}");

    let (code, out) = relay(&config, &["test", "nosuch", "--to", "ops@example.com"]).await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("no account named `nosuch`"), "{out}");
}
