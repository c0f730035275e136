//! Real SMTP clients (lettre, Python's smtplib, and a pipelining raw client) against a relay on real sockets,
//! over plain TCP, STARTTLS and implicit TLS.

mod common;

use common::*;
use lettre::address::Envelope;
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{Certificate, CertificateStore, Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Tokio1Executor};

const LISTENERS: &str = r#"
[[listener]]
address = "127.0.0.1:0"
tls = "none"
auth = "required"
auth_failure_delay = "0s"

[[listener]]
address = "127.0.0.1:0"
tls = "starttls"
cert = "{cert}"
key = "{key}"
auth = "required"
plaintext_auth = false
auth_failure_delay = "0s"

[[listener]]
address = "127.0.0.1:0"
tls = "implicit"
cert = "{cert}"
key = "{key}"
auth = "required"
auth_failure_delay = "0s"
"#;

/// A body with a leading-dot line (dot-stuffing round trip) and 8-bit bytes. It does not end in CRLF: lettre
/// always writes CRLF "." CRLF after the body, so the message it sends ends with that first CRLF.
const BODY: &[u8] = b"From: printer@example.com\r\nTo: ops@example.com\r\nSubject: scan\r\n\r\n.leading dot\r\n..two dots\r\n8-bit: \xc3\xa9t\xc3\xa9\r\nlast line";

#[derive(Clone, Copy, Debug)]
enum Mode {
    Plain,
    StartTls,
    Implicit,
}

fn mailer(
    relay: &TestRelay,
    mode: Mode,
    mech: Mechanism,
    password: &str,
) -> AsyncSmtpTransport<Tokio1Executor> {
    let tls = || {
        TlsParameters::builder("localhost".into())
            .certificate_store(CertificateStore::None)
            .add_root_certificate(Certificate::from_pem(relay.cert_pem().as_bytes()).unwrap())
            .build_rustls()
            .unwrap()
    };
    let (addr, tls) = match mode {
        Mode::Plain => (relay.addrs[0], Tls::None),
        Mode::StartTls => (relay.addrs[1], Tls::Required(tls())),
        Mode::Implicit => (relay.addrs[2], Tls::Wrapper(tls())),
    };
    AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous("localhost")
        .port(addr.port())
        .tls(tls)
        .credentials(Credentials::new("printer".into(), password.into()))
        .authentication(vec![mech])
        .timeout(Some(LIMIT))
        .build()
}

fn envelope() -> Envelope {
    Envelope::new(
        Some("printer@example.com".parse().unwrap()),
        vec![
            "ops@example.com".parse().unwrap(),
            "boss@example.com".parse().unwrap(),
        ],
    )
    .unwrap()
}

#[tokio::test]
async fn lettre_over_plain_starttls_and_implicit_tls_with_plain_and_login() {
    let relay = TestRelay::start(LISTENERS).await;
    let mut expected = 0;
    for mode in [Mode::Plain, Mode::StartTls, Mode::Implicit] {
        for mech in [Mechanism::Plain, Mechanism::Login] {
            let reply = mailer(&relay, mode, mech, PASSWORD)
                .send_raw(&envelope(), BODY)
                .await
                .unwrap_or_else(|e| panic!("{mode:?} {mech:?}: {e}"));
            assert_eq!(reply.code().to_string(), "250");
            let text = reply.message().collect::<Vec<_>>().join(" ");
            assert!(text.starts_with("2.0.0 Ok: queued as "), "{text}");
            expected += 1;

            let err = mailer(&relay, mode, mech, "wrong password")
                .send_raw(&envelope(), BODY)
                .await
                .expect_err("bad password refused");
            assert_eq!(
                err.status().map(|c| c.to_string()).as_deref(),
                Some("535"),
                "{mode:?} {mech:?}: {err}"
            );
        }
    }
    let queued = relay.queued();
    assert_eq!(queued.len(), expected);
    let mut with_crlf = BODY.to_vec();
    with_crlf.extend_from_slice(b"\r\n");
    for (env, eml) in &queued {
        assert_eq!(strip_received(eml), &with_crlf[..], "stored bytes differ");
        assert_eq!(env["sender"], "printer@example.com");
        assert_eq!(
            env["recipients"],
            serde_json::json!(["ops@example.com", "boss@example.com"])
        );
        assert_eq!(env["user"], "printer");
    }
    // The trace line says how each message came in (RFC 3848).
    let protos: Vec<bool> = queued
        .iter()
        .map(|(_, eml)| String::from_utf8_lossy(&eml[..200]).contains("with ESMTPSA"))
        .collect();
    assert_eq!(protos.iter().filter(|tls| **tls).count(), 4);
}

#[tokio::test]
async fn pipelined_session_gets_every_reply_in_order() {
    let relay = TestRelay::start(LISTENERS).await;
    let mut c = RawClient::connect(relay.addrs[0]).await;
    c.expect(220).await;
    let ehlo = c.cmd("EHLO scanner", 250).await;
    assert!(
        ehlo.contains("PIPELINING") && ehlo.contains("AUTH PLAIN LOGIN"),
        "{ehlo}"
    );
    use base64::Engine;
    let plain = base64::engine::general_purpose::STANDARD.encode(format!("\0printer\0{PASSWORD}"));
    // RFC 2920: AUTH ends a group; then MAIL, RCPT, RCPT and DATA go in one write.
    c.cmd(&format!("AUTH PLAIN {plain}"), 235).await;
    c.send(b"MAIL FROM:<scanner@example.com>\r\nRCPT TO:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
        .await;
    for code in [250, 250, 250, 354] {
        c.expect(code).await;
    }
    let body = b"Subject: pipelined\r\n\r\nline\r\n";
    let mut data = body.to_vec();
    data.extend_from_slice(b".\r\nMAIL FROM:<x@example.com>\r\nRSET\r\nQUIT\r\n");
    c.send(&data).await;
    let queued = c.expect(250).await;
    assert!(queued.contains("queued as"));
    c.expect(250).await;
    c.expect(250).await;
    c.expect(221).await;
    let stored = relay.queued();
    assert_eq!(stored.len(), 1);
    assert_eq!(strip_received(&stored[0].1), body);
}

#[tokio::test]
async fn python_smtplib_with_login_over_starttls() {
    if std::process::Command::new("python3")
        .arg("--version")
        .output()
        .is_err()
    {
        panic!("python3 is needed for this test; .ci/run installs it");
    }
    let relay = TestRelay::start(LISTENERS).await;
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, relay.cert_pem()).unwrap();
    let script = r#"
import smtplib, ssl, sys
port, ca, password = int(sys.argv[1]), sys.argv[2], sys.argv[3]
ctx = ssl.create_default_context(cafile=ca)
body = b"Subject: from python\r\n\r\nhello\r\n.dot\r\n"
s = smtplib.SMTP("localhost", port, timeout=20)
s.starttls(context=ctx)
s.ehlo()
try:
    s.login("printer", "nope")
    print("BAD-LOGIN-ACCEPTED")
except smtplib.SMTPAuthenticationError as e:
    print("refused", e.smtp_code)
s.login("printer", password)
print("sent", s.sendmail("py@example.com", ["ops@example.com"], body))
s.quit()
"#;
    let out = tokio::process::Command::new("python3")
        .args([
            "-c",
            script,
            &relay.addrs[1].port().to_string(),
            ca.to_str().unwrap(),
            PASSWORD,
        ])
        .output();
    let out = tokio::time::timeout(LIMIT, out).await.unwrap().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("refused 535"), "{stdout}");
    assert!(stdout.contains("sent {}"), "{stdout}");
    let stored = relay.queued();
    assert_eq!(stored.len(), 1);
    assert_eq!(
        strip_received(&stored[0].1),
        b"Subject: from python\r\n\r\nhello\r\n.dot\r\n"
    );
}

#[tokio::test]
async fn starttls_listener_refuses_auth_in_the_clear() {
    let relay = TestRelay::start(LISTENERS).await;
    let mut c = RawClient::connect(relay.addrs[1]).await;
    c.expect(220).await;
    let ehlo = c.cmd("EHLO x", 250).await;
    assert!(
        ehlo.contains("STARTTLS") && !ehlo.contains("AUTH"),
        "{ehlo}"
    );
    c.cmd("AUTH LOGIN", 538).await;
    c.cmd("MAIL FROM:<a@b.c>", 530).await;
}
