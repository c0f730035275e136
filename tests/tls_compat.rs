//! Old TLS and one-port TLS, driven by third-party clients: `openssl s_client` offering TLS 1.0, TLS 1.1 and the
//! RSA-key-exchange and CBC suites of printers made before about 2016, and swaks on a `tls = "auto"` port. Each
//! message must be queued and forwarded upstream byte-exact. `.ci/run` installs openssl and swaks.

mod common;

use std::path::Path;
use std::process::Stdio;

use common::idp::{AS_SENT, account_top, idp_issuing};
use common::upstream::FakeUpstream;
use common::*;
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

/// What a device of each kind offers. OpenSSL 3 on the client side also refuses these below security level 0.
const OLD_CLIENTS: [(&str, &[&str]); 4] = [
    ("TLS 1.0", &["-tls1", "-cipher", "DEFAULT@SECLEVEL=0"]),
    ("TLS 1.1", &["-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0"]),
    (
        "TLS 1.2 with RSA key exchange",
        &["-tls1_2", "-cipher", "AES128-SHA@SECLEVEL=0"],
    ),
    (
        "TLS 1.2 with a CBC suite",
        &["-tls1_2", "-cipher", "ECDHE-RSA-AES128-SHA@SECLEVEL=0"],
    ),
];

/// The message each client sends (s_client's `-crlf` turns the line ends into CRLF), and what must arrive.
const SCRIPT: &str = "EHLO printer\nMAIL FROM:<a@lan.test>\nRCPT TO:<b@example.test>\nDATA\nSubject: old tls\n\nscan\n.\nQUIT\n";
const FORWARDED: &[u8] = b"Subject: old tls\r\n\r\nscan\r\n";

fn require(tool: &str) {
    let found = std::process::Command::new(tool)
        .arg(if tool == "swaks" {
            "--version"
        } else {
            "version"
        })
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "`{tool}` is not installed: run .ci/run, or apt-get install {tool}"
    );
}

/// Old devices carry RSA certificates, and the RSA key-exchange suites need one: written where the test relay
/// looks for its certificate.
fn rsa_cert(dir: &Path) {
    require("openssl");
    let status = std::process::Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        ])
        .args(["-subj", "/CN=localhost", "-keyout"])
        .arg(dir.join("key.pem"))
        .arg("-out")
        .arg(dir.join("cert.pem"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("openssl runs");
    assert!(status.success(), "openssl req failed");
    // Whatever mode this openssl gives its key: relay refuses one that others can read.
    make_private(&dir.join("key.pem"));
}

async fn relay(upstream: &FakeUpstream, listeners: &str) -> (TestRelay, wiremock::MockServer) {
    let idp = idp_issuing("tok").await;
    let dir = tempfile::tempdir().unwrap();
    rsa_cert(dir.path());
    let top = account_top(dir.path(), &idp.uri(), upstream, AS_SENT);
    (TestRelay::start_with(dir, &top, listeners).await, idp)
}

/// Runs a tool to its end (bounded), with `stdin` as its input; returns its stdout and stderr together.
async fn run(mut cmd: Command, stdin: &str) -> String {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("client starts");
    let mut input = child.stdin.take().expect("stdin");
    input.write_all(stdin.as_bytes()).await.expect("stdin");
    drop(input);
    let out = tokio::time::timeout(LIMIT, child.wait_with_output())
        .await
        .expect("client finished in time")
        .expect("client ran");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

async fn s_client(addr: std::net::SocketAddr, offer: &[&str]) -> String {
    let mut cmd = Command::new("openssl");
    cmd.args(["s_client", "-starttls", "smtp", "-crlf", "-quiet"])
        .arg("-connect")
        .arg(addr.to_string())
        .args(offer);
    run(cmd, SCRIPT).await
}

const LEGACY: &str = "[[listener]]\naddress = \"127.0.0.1:0\"\ntls = \"starttls\"\ntls_compat = \"legacy\"\ncert = \"{cert}\"\nkey = \"{key}\"\nauth = \"none\"\n";
const MODERN: &str = "[[listener]]\naddress = \"127.0.0.1:0\"\ntls = \"starttls\"\ncert = \"{cert}\"\nkey = \"{key}\"\nauth = \"none\"\n";

#[tokio::test]
async fn a_legacy_listener_serves_old_tls_and_forwards_the_message() {
    let mut upstream = FakeUpstream::start(&["tok"]).await;
    let (relay, _idp) = relay(&upstream, LEGACY).await;
    for (device, offer) in OLD_CLIENTS {
        let out = s_client(relay.addr(), offer).await;
        assert!(
            out.contains("250 2.0.0 Ok: queued as"),
            "{device}: not queued:\n{out}"
        );
        let got = upstream.next().await;
        assert_eq!(got.from, "a@lan.test", "{device}");
        assert_eq!(got.to, ["b@example.test"], "{device}");
        assert_eq!(strip_received(&got.data), FORWARDED, "{device}");
    }
    // A modern client still gets modern TLS there.
    let out = s_client(relay.addr(), &["-tls1_3"]).await;
    assert!(out.contains("250 2.0.0 Ok: queued as"), "TLS 1.3:\n{out}");
}

#[tokio::test]
async fn a_default_listener_refuses_old_tls() {
    let upstream = FakeUpstream::start(&["tok"]).await;
    let (relay, _idp) = relay(&upstream, MODERN).await;
    for (device, offer) in OLD_CLIENTS {
        let out = s_client(relay.addr(), offer).await;
        assert!(!out.contains("queued as"), "{device} was served:\n{out}");
        assert!(
            out.contains("alert"),
            "{device}: no handshake alert:\n{out}"
        );
    }
    assert!(relay.queued().is_empty());
    let out = s_client(relay.addr(), &["-tls1_2"]).await;
    assert!(out.contains("250 2.0.0 Ok: queued as"), "TLS 1.2:\n{out}");
}

#[tokio::test]
async fn an_auto_port_serves_implicit_tls_starttls_and_plain() {
    require("swaks");
    let mut upstream = FakeUpstream::start(&["tok"]).await;
    let listener = "[[listener]]\naddress = \"127.0.0.1:0\"\ntls = \"auto\"\ncert = \"{cert}\"\nkey = \"{key}\"\nauth = \"none\"\n";
    let (relay, _idp) = relay(&upstream, listener).await;
    for (mode, flag) in [
        ("implicit TLS", Some("--tls-on-connect")),
        ("STARTTLS", Some("--tls")),
        ("plain", None),
    ] {
        let mut cmd = Command::new("swaks");
        cmd.arg("--server")
            .arg(relay.addr().to_string())
            .args(["--from", "a@lan.test", "--to", "b@example.test"])
            .args(["--header", "Subject: auto", "--body", "scan"])
            .args(["--timeout", "15"])
            .args(flag);
        let out = run(cmd, "").await;
        assert!(out.contains("250 2.0.0 Ok: queued as"), "{mode}:\n{out}");
        let tls = out.contains("=== TLS started with cipher");
        assert_eq!(tls, flag.is_some(), "{mode}: TLS or not:\n{out}");
        // Inside TLS, STARTTLS is no longer offered; in the clear it is.
        let offers_starttls = out.contains("250-STARTTLS") || out.contains("250 STARTTLS");
        assert_eq!(
            offers_starttls,
            flag != Some("--tls-on-connect"),
            "{mode}:\n{out}"
        );
        let got = upstream.next().await;
        assert_eq!(got.to, ["b@example.test"], "{mode}");
        let data = String::from_utf8_lossy(&got.data);
        assert!(data.contains("Subject: auto\r\n"), "{mode}: {data}");
        assert!(data.contains("\r\n\r\nscan\r\n"), "{mode}: {data}");
    }
}
