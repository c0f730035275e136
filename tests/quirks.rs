//! Devices written against lenient servers: each quirk over a real socket, with the message queued and then
//! forwarded upstream in canonical form (CRLF lines, the envelope in angle brackets).

mod common;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use common::idp::{AS_SENT, account_top, idp_issuing};
use common::upstream::FakeUpstream;
use common::*;

/// A relay whose listener takes logins when offered, delivering to a fake upstream; the fake identity provider
/// comes back too, as it must live as long as the relay.
async fn relay(upstream: &FakeUpstream) -> (TestRelay, wiremock::MockServer) {
    let idp = idp_issuing("tok").await;
    let dir = tempfile::tempdir().unwrap();
    let top = account_top(dir.path(), &idp.uri(), upstream, AS_SENT);
    let relay = TestRelay::start_with(
        dir,
        &top,
        "[[listener]]\naddress = \"127.0.0.1:0\"\nauth = \"optional\"\nauth_failure_delay = \"0s\"\n",
    )
    .await;
    (relay, idp)
}

/// Sends `script` as raw bytes (after the greeting, unless `early`), then reads until the 250 for the message.
async fn session(relay: &TestRelay, script: &[u8], early: bool) -> Vec<String> {
    let mut c = RawClient::connect(relay.addr()).await;
    if !early {
        c.expect(220).await;
    }
    c.send(script).await;
    let mut replies = Vec::new();
    loop {
        let (code, text) = c.reply().await.expect("a reply");
        replies.push(text.clone());
        if code == 250 && text.contains("queued") {
            return replies;
        }
        assert!(code < 400, "refused: {text} (after {replies:?})");
    }
}

const BODY: &[u8] = b"Subject: quirk\r\n\r\nscan attached\r\n";

async fn forwarded(upstream: &mut FakeUpstream, from: &str, to: &str, body: &[u8]) {
    let got = upstream.next().await;
    assert_eq!(got.from, from);
    assert_eq!(got.to, [to]);
    assert_eq!(strip_received(&got.data), body);
}

#[tokio::test]
async fn envelopes_without_angle_brackets_lower_case_spaces_and_address_literals() {
    let mut upstream = FakeUpstream::start(&["tok"]).await;
    let (relay, _idp) = relay(&upstream).await;
    for script in [
        &b"EHLO printer\r\nMAIL FROM:a@lan.test\r\nRCPT TO:b@example.test\r\nDATA\r\n"[..],
        b"ehlo printer\r\nmail from:<a@lan.test>\r\nrcpt to:<b@example.test>\r\ndata\r\n",
        b"EHLO printer\r\nMAIL FROM: <a@lan.test>\r\nRCPT TO: <b@example.test>\r\nDATA\r\n",
        b"EHLO printer\r\nMAIL FROM: a@lan.test\r\nRCPT TO: b@example.test\r\nDATA\r\n",
    ] {
        let mut all = script.to_vec();
        all.extend_from_slice(BODY);
        all.extend_from_slice(b".\r\n");
        session(&relay, &all, false).await;
        forwarded(&mut upstream, "a@lan.test", "b@example.test", BODY).await;
    }
    // A device without a DNS name of its own gives its address as the sender's domain (RFC 5321 address literal).
    let mut all =
        b"EHLO [192.0.2.7]\r\nMAIL FROM:scan@[192.0.2.7]\r\nRCPT TO:<b@example.test>\r\nDATA\r\n"
            .to_vec();
    all.extend_from_slice(BODY);
    all.extend_from_slice(b".\r\n");
    session(&relay, &all, false).await;
    forwarded(&mut upstream, "scan@[192.0.2.7]", "b@example.test", BODY).await;
}

#[tokio::test]
async fn commands_ended_by_bare_lf_and_an_early_talker() {
    let mut upstream = FakeUpstream::start(&["tok"]).await;
    let (relay, _idp) = relay(&upstream).await;
    // Commands with LF alone (the body itself in CRLF: bare LF in DATA is a separate policy).
    let mut script =
        b"EHLO printer\nMAIL FROM:<a@lan.test>\nRCPT TO:<b@example.test>\nDATA\n".to_vec();
    script.extend_from_slice(BODY);
    script.extend_from_slice(b".\r\n");
    session(&relay, &script, false).await;
    forwarded(&mut upstream, "a@lan.test", "b@example.test", BODY).await;
    // Everything sent before the greeting arrives.
    let mut script =
        b"EHLO printer\r\nMAIL FROM:<a@lan.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n".to_vec();
    script.extend_from_slice(BODY);
    script.extend_from_slice(b".\r\n");
    let replies = session(&relay, &script, true).await;
    assert!(replies[0].starts_with("220 "), "{replies:?}");
    forwarded(&mut upstream, "a@lan.test", "b@example.test", BODY).await;
}

#[tokio::test]
async fn auth_login_with_an_initial_response_and_auth_plain_with_an_empty_one() {
    let mut upstream = FakeUpstream::start(&["tok"]).await;
    let (relay, _idp) = relay(&upstream).await;
    let user = B64.encode("printer");
    let pass = B64.encode(PASSWORD);
    let plain = B64.encode(format!("\0printer\0{PASSWORD}"));
    for login in [
        format!("AUTH LOGIN {user}\r\n{pass}\r\n"),
        format!("AUTH PLAIN =\r\n{plain}\r\n"),
    ] {
        let mut c = RawClient::ready(relay.addr()).await;
        let mut lines = login.lines();
        let first = lines.next().unwrap();
        c.cmd(first, 334).await;
        c.cmd(lines.next().unwrap(), 235).await;
        c.begin_message().await;
        c.send(BODY).await;
        c.send(b".\r\n").await;
        c.expect(250).await;
        forwarded(&mut upstream, "a@example.com", "b@example.com", BODY).await;
    }
}

#[tokio::test]
async fn eight_bit_bodies_dsn_parameters_and_vrfy() {
    let mut upstream = FakeUpstream::start(&["tok"]).await;
    let (relay, _idp) = relay(&upstream).await;
    let mut c = RawClient::ready(relay.addr()).await;
    let reply = c.cmd("VRFY postmaster", 252).await;
    assert!(reply.starts_with("252 2.5.0 "), "{reply}");
    c.cmd("MAIL FROM:<a@lan.test> RET=HDRS ENVID=scan-42", 250)
        .await;
    c.cmd(
        "RCPT TO:<b@example.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;b@example.test",
        250,
    )
    .await;
    c.cmd("DATA", 354).await;
    // 8-bit text without BODY=8BITMIME, as old devices send it.
    let body = "Subject: Scan vom Drucker\r\n\r\nGrüße aus dem Büro\r\n".as_bytes();
    c.send(body).await;
    c.send(b".\r\n").await;
    c.expect(250).await;
    let got = upstream.next().await;
    assert_eq!(strip_received(&got.data), body);
    // The upstream is told what the device did not say: the body is 8-bit (RFC 6152). And its size, which is
    // what goes (RFC 1870): the queued bytes, relay's Received: line among them.
    assert!(got.mail_params.contains("BODY=8BITMIME"), "{got:?}");
    assert!(
        got.mail_params
            .contains(&format!("SIZE={}", got.data.len())),
        "{got:?}"
    );
    // A 7-bit body is not declared 8-bit.
    c.cmd("MAIL FROM:<a@lan.test>", 250).await;
    c.cmd("RCPT TO:<b@example.test>", 250).await;
    c.cmd("DATA", 354).await;
    c.send(b"Subject: plain\r\n\r\nhello\r\n.\r\n").await;
    c.expect(250).await;
    let got = upstream.next().await;
    assert!(!got.mail_params.contains("BODY="), "{got:?}");
}

/// A device that ends every line with LF alone, the final `.` included: queued under the default policy of a
/// listener that admits only loopback and private addresses, and forwarded with CRLF.
#[tokio::test]
async fn every_line_with_bare_lf_from_an_allow_listed_private_address() {
    let mut upstream = FakeUpstream::start(&["tok"]).await;
    let (relay, _idp) = relay(&upstream).await;
    let script = b"EHLO printer\nMAIL FROM:<a@lan.test>\nRCPT TO:<b@example.test>\nDATA\nSubject: lf\n\nline one\n..dotted\n.\n";
    session(&relay, script, false).await;
    forwarded(
        &mut upstream,
        "a@lan.test",
        "b@example.test",
        b"Subject: lf\r\n\r\nline one\r\n.dotted\r\n",
    )
    .await;
}

/// The default bare-LF policy follows the allow list: lenient for loopback and private ranges only, reject as
/// soon as a public range may connect; `relay check` shows the effective policy.
#[test]
fn bare_lf_default_follows_the_allow_list() {
    let dir = tempfile::tempdir().unwrap();
    for (allow, policy) in [
        (
            "[\"127.0.0.0/8\", \"192.168.10.0/24\", \"fd00::/8\"]",
            "lenient",
        ),
        ("[\"192.168.10.0/24\", \"0.0.0.0/0\"]", "reject"),
    ] {
        let config = dir.path().join("relay.toml");
        std::fs::write(
            &config,
            format!(
                "state_dir = {:?}\n[[listener]]\naddress = \"127.0.0.1:2525\"\nauth = \"none\"\nallow = {allow}\n",
                dir.path().join("state")
            ),
        )
        .unwrap();
        let out = std::process::Command::new(relay_bin())
            .args(["check", "--config"])
            .arg(&config)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{text}");
        assert!(
            text.contains(&format!("bare_lf = \"{policy}\"")),
            "{allow}: {text}"
        );
    }
}

/// The same LF-only device on a listener open to public addresses (default `reject`): told at once, at its own
/// end of data, and the connection is closed; nothing is queued.
#[tokio::test]
async fn every_line_with_bare_lf_is_refused_at_once_elsewhere() {
    let relay = TestRelay::start(
        "[[listener]]\naddress = \"127.0.0.1:0\"\nauth = \"optional\"\nallow = [\"0.0.0.0/0\"]\n",
    )
    .await;
    let mut c = RawClient::connect(relay.addr()).await;
    c.expect(220).await;
    c.send(b"EHLO printer\nMAIL FROM:<a@lan.test>\nRCPT TO:<b@example.test>\nDATA\nSubject: lf\n\nline one\n.\n")
        .await;
    for code in [250, 250, 250, 354] {
        c.expect(code).await;
    }
    let reply = c.expect(550).await;
    assert!(reply.starts_with("550 5.6.0 "), "{reply}");
    assert!(c.closed().await);
    assert!(relay.queued().is_empty());
}

/// Python's smtplib sends a non-ASCII address only to a server that offers SMTPUTF8 (RFC 6531): relay offers it,
/// keeps the client's declaration and passes it on. Mail to `<postmaster>` (RFC 5321 section 4.5.1) goes to the
/// postmaster address, here the default account's own mailbox.
#[tokio::test]
async fn utf8_addresses_from_python_smtplib_and_mail_to_postmaster() {
    let mut upstream = FakeUpstream::start(&["tok"]).await;
    let (relay, _idp) = relay(&upstream).await;
    let script = r#"
import smtplib, sys
s = smtplib.SMTP("127.0.0.1", int(sys.argv[1]), timeout=20)
s.ehlo()
print("offers", s.has_extn("smtputf8"))
body = "Subject: Grüße\r\n\r\nzoë\r\n".encode()
s.sendmail("jörg@lan.test", ["zoë@example.test"], body, mail_options=["SMTPUTF8"])
s.sendmail("scanner@lan.test", ["postmaster"], b"Subject: to the postmaster\r\n\r\nhello\r\n")
s.quit()
print("done")
"#;
    let out = tokio::process::Command::new("python3")
        .args(["-c", script, &relay.addr().port().to_string()])
        .output();
    let out = tokio::time::timeout(LIMIT, out).await.unwrap().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("offers True") && stdout.contains("done"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Two messages, delivered in either order.
    let mut got = [upstream.next().await, upstream.next().await];
    got.sort_by_key(|m| m.from.starts_with("scanner"));
    let [utf8, postmaster] = got;
    assert_eq!(utf8.from, "jörg@lan.test");
    assert_eq!(utf8.to, ["zoë@example.test"]);
    assert!(utf8.mail_params.contains("SMTPUTF8"), "{utf8:?}");
    let received = String::from_utf8_lossy(&utf8.data);
    assert!(received.contains("with UTF8SMTP\r\n"), "{received}");
    assert_eq!(postmaster.to, ["relay@example.com"]);
    assert!(
        !postmaster.mail_params.contains("SMTPUTF8"),
        "{postmaster:?}"
    );
    // relay gives the upstream the name it gives its own clients (the config's `hostname`).
    let commands = upstream.commands.lock().unwrap().clone();
    assert!(
        commands.iter().any(|c| c.starts_with("EHLO relay.test")),
        "{commands:?}"
    );
}

/// An upstream without SMTPUTF8 cannot take a non-ASCII local part: a message only for such recipients fails
/// for good, in relay's words, without being sent; in a message with others, those are refused and the others get
/// it, a Unicode domain in its ASCII form. With no postmaster address anywhere, `<postmaster>` is refused saying
/// what to set.
#[tokio::test]
async fn utf8_address_to_an_upstream_without_smtputf8_and_no_postmaster() {
    let mut upstream = FakeUpstream::start(&["tok"]).await;
    upstream
        .smtputf8
        .store(false, std::sync::atomic::Ordering::SeqCst);
    let (mut relay, _idp) = relay(&upstream).await;
    let mut c = RawClient::ready(relay.addr()).await;
    c.cmd("MAIL FROM:<a@lan.test> SMTPUTF8", 250).await;
    c.cmd("RCPT TO:<zoë@example.test>", 250).await;
    c.cmd("DATA", 354).await;
    c.send(b"Subject: x\r\n\r\nhi\r\n.\r\n").await;
    c.expect(250).await;
    relay.attempts_done(1).await;
    let dead = files_in(&relay.state(), "dead");
    let state = dead.iter().find(|f| f.ends_with(".state")).expect("dead");
    let text = std::fs::read_to_string(relay.state().join("dead").join(state)).unwrap();
    assert!(
        text.contains("5.6.7") && text.contains("SMTPUTF8"),
        "{text}"
    );
    assert!(
        !upstream
            .commands
            .lock()
            .unwrap()
            .iter()
            .any(|c| c.starts_with("MAIL")),
        "nothing sent"
    );
    c.cmd("MAIL FROM:<a@lan.test> SMTPUTF8", 250).await;
    for to in ["zoë@example.test", "b@bücher.test", "c@example.test"] {
        c.cmd(&format!("RCPT TO:<{to}>"), 250).await;
    }
    c.cmd("DATA", 354).await;
    c.send(b"Subject: x\r\n\r\nhi\r\n.\r\n").await;
    c.expect(250).await;
    let got = upstream.next().await;
    assert_eq!(got.to, ["b@xn--bcher-kva.test", "c@example.test"]);
    assert!(!got.mail_params.contains("SMTPUTF8"), "{got:?}");

    let dir = tempfile::tempdir().unwrap();
    let bare = TestRelay::start_in(
        dir,
        "[[listener]]\naddress = \"127.0.0.1:0\"\nauth = \"none\"\n",
    )
    .await;
    let mut c = RawClient::ready(bare.addr()).await;
    c.cmd("MAIL FROM:<a@lan.test>", 250).await;
    let reply = c.cmd("RCPT TO:<Postmaster>", 550).await;
    assert!(
        reply.contains("5.1.1") && reply.contains("postmaster"),
        "{reply}"
    );
}
