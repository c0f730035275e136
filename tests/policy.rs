//! Listener policy over real sockets: authentication, allow lists, size limits, SMTP smuggling, caps, timeouts.

mod common;

use common::*;

#[tokio::test]
async fn auth_required_refuses_mail_before_auth() {
    let relay =
        TestRelay::start("[[listener]]\naddress = \"127.0.0.1:0\"\nauth = \"required\"\n").await;
    let mut c = RawClient::ready(relay.addr()).await;
    let reply = c.cmd("MAIL FROM:<a@example.com>", 530).await;
    assert!(reply.starts_with("530 5.7.0 "), "{reply}");
    c.cmd("RCPT TO:<b@example.com>", 503).await;
    assert!(relay.queued().is_empty());
}

/// RFC 5321 section 3.1: after its 554 greeting the refused client is answered 503 until it says QUIT (the
/// connection was closed at once), and then closed.
#[tokio::test]
async fn client_outside_allow_list_gets_554_then_503_until_quit() {
    let relay = TestRelay::start(
        "[[listener]]\naddress = \"127.0.0.1:0\"\nauth = \"none\"\nallow = [\"10.0.0.0/8\", \"192.168.10.0/24\"]\n",
    )
    .await;
    let mut c = RawClient::connect(relay.addr()).await;
    let (code, text) = c.reply().await.expect("a reply before the close");
    assert_eq!(code, 554, "{text}");
    assert!(text.starts_with("554 5.7.1 "), "{text}");
    let reply = c.cmd("EHLO printer", 503).await;
    assert!(reply.starts_with("503 5.5.1 "), "{reply}");
    c.cmd("MAIL FROM:<a@example.com>", 503).await;
    c.cmd("QUIT", 221).await;
    assert!(c.closed().await);
    assert!(relay.queued().is_empty());
}

const SMALL: &str = "[[listener]]\naddress = \"127.0.0.1:0\"\nauth = \"none\"\nmax_message_size = \"4KiB\"\nbare_lf = \"reject\"\n";

#[tokio::test]
async fn oversized_message_is_refused_with_552_and_nothing_is_kept() {
    let mut relay = TestRelay::start(SMALL).await;
    let mut c = RawClient::ready(relay.addr()).await;
    // Declared too big: refused at MAIL.
    let reply = c.cmd("MAIL FROM:<a@example.com> SIZE=5000", 552).await;
    assert!(reply.starts_with("552 5.3.4 "), "{reply}");
    // Undeclared: refused at the final dot, after the whole body was read.
    too_big(&mut c, 200).await;
    // The session goes on.
    c.cmd("NOOP", 250).await;
    c.cmd("QUIT", 221).await;
    relay.idle().await;
    assert!(relay.queued().is_empty());
    assert!(files_in(&relay.state(), "queue").is_empty());
}

/// A message refused for its size after it had begun to go to disk (past the 64 KiB kept in memory): its partial
/// file is gone before the 552 is sent (its removal runs on the blocking pool, and the reply waits for it).
#[tokio::test]
async fn a_refused_message_that_reached_the_disk_is_gone_before_its_552() {
    let relay = TestRelay::start(
        "[[listener]]\naddress = \"127.0.0.1:0\"\nauth = \"none\"\nmax_message_size = \"200KiB\"\n",
    )
    .await;
    let mut c = RawClient::ready(relay.addr()).await;
    too_big(&mut c, 400).await;
    assert!(files_in(&relay.state(), "queue").is_empty());
    c.cmd("QUIT", 221).await;
}

/// A message of `lines` lines of 1,000 bytes, undeclared: refused at its final dot for its size.
async fn too_big(c: &mut RawClient<tokio::net::TcpStream>, lines: usize) {
    c.begin_message().await;
    let line = format!("{}\r\n", "x".repeat(998));
    for _ in 0..lines {
        c.send(line.as_bytes()).await;
    }
    c.send(b".\r\n").await;
    let reply = c.expect(552).await;
    assert!(reply.starts_with("552 5.3.4 "), "{reply}");
}

#[tokio::test]
async fn smuggling_vectors_are_refused_and_never_end_the_message() {
    let relay = TestRelay::start(SMALL).await;
    for vector in VECTORS {
        let mut c = RawClient::in_data(relay.addr()).await;
        c.send(&smuggling_payload(vector)).await;
        // Exactly one reply for the whole thing: the refusal. A smuggled MAIL would have produced a 250 here.
        let reply = c.expect(550).await;
        assert!(reply.starts_with("550 5.6.0 "), "{vector:?}: {reply}");
        if lf_only_end(vector) {
            // An LF-only client's end of data: refused at once, and the rest is never read as commands.
            assert!(c.closed().await, "{vector:?}: the connection stays open");
            continue;
        }
        let noop = c.cmd("NOOP", 250).await;
        assert!(noop.starts_with("250 2.0.0"), "{vector:?}: {noop}");
        c.cmd("QUIT", 221).await;
    }
    assert!(relay.queued().is_empty(), "nothing may be queued");
}

#[tokio::test]
async fn normalize_accepts_one_message_with_crlf_only() {
    let relay = TestRelay::start(
        "[[listener]]\naddress = \"127.0.0.1:0\"\nauth = \"none\"\nbare_lf = \"normalize\"\n",
    )
    .await;
    for vector in VECTORS {
        let mut c = RawClient::in_data(relay.addr()).await;
        c.send(&smuggling_payload(vector)).await;
        c.expect(250).await;
        c.cmd("NOOP", 250).await;
    }
    let queued = relay.queued();
    assert_eq!(
        queued.len(),
        VECTORS.len(),
        "one message per session, never two"
    );
    for (env, eml) in queued {
        assert_eq!(env["recipients"], serde_json::json!(["b@example.com"]));
        let body = strip_received(&eml);
        assert!(
            body.ends_with(b"smuggled\r\n"),
            "the smuggled part stays inside the first message"
        );
        // The fake end's dot is the client's text: kept, on a line of its own (sent on dot-stuffed).
        assert!(
            body.windows(5).any(|w| w == b"\r\n.\r\n"),
            "the dot line was dropped: {:?}",
            String::from_utf8_lossy(body)
        );
        for (i, &b) in body.iter().enumerate() {
            if b == b'\n' {
                assert_eq!(body[i - 1], b'\r', "bare LF stored");
            }
            if b == b'\r' {
                assert_eq!(body.get(i + 1), Some(&b'\n'), "bare CR stored");
            }
        }
    }
}

#[tokio::test]
async fn per_client_connection_cap() {
    let relay = TestRelay::start(
        "[[listener]]\naddress = \"127.0.0.1:0\"\nauth = \"none\"\nmax_connections_per_client = 2\n",
    )
    .await;
    let mut a = RawClient::ready(relay.addr()).await;
    let mut b = RawClient::ready(relay.addr()).await;
    let mut c = RawClient::connect(relay.addr()).await;
    c.expect_421_and_close("4.7.0").await;
    a.cmd("QUIT", 221).await;
    assert!(a.closed().await);
    b.cmd("NOOP", 250).await;
}

#[tokio::test]
async fn listener_connection_cap() {
    let relay = TestRelay::start(
        "[[listener]]\naddress = \"127.0.0.1:0\"\nauth = \"none\"\nmax_connections = 1\n",
    )
    .await;
    // A session in the middle of a message is never evicted: the newcomer is refused.
    let mut busy = RawClient::in_data(relay.addr()).await;
    let mut c = RawClient::connect(relay.addr()).await;
    c.expect_421_and_close("4.7.0").await;
    busy.send(b"Subject: still here\r\n\r\nhi\r\n.\r\n").await;
    busy.expect(250).await;
    // Once it waits idle for a command, it makes room for the next client.
    let mut d = RawClient::connect(relay.addr()).await;
    d.expect(220).await;
    busy.expect_421_and_close("4.7.0").await;
    d.cmd("EHLO device.lan", 250).await;
}

#[tokio::test]
async fn idle_client_is_timed_out_with_421() {
    let relay = TestRelay::start(
        "[[listener]]\naddress = \"127.0.0.1:0\"\nauth = \"none\"\ncommand_timeout = \"200ms\"\n",
    )
    .await;
    let mut c = RawClient::connect(relay.addr()).await;
    c.expect(220).await;
    // No command at all: the server gives up on us.
    c.expect_421_and_close("4.4.2").await;
}

#[tokio::test]
async fn repeated_auth_failures_end_the_connection() {
    let relay = TestRelay::start(
        "[[listener]]\naddress = \"127.0.0.1:0\"\nauth = \"required\"\nauth_failure_delay = \"10ms\"\n",
    )
    .await;
    let mut c = RawClient::ready(relay.addr()).await;
    use base64::Engine;
    let bad = base64::engine::general_purpose::STANDARD.encode("\0printer\0guess");
    c.cmd(&format!("AUTH PLAIN {bad}"), 535).await;
    c.cmd(&format!("AUTH PLAIN {bad}"), 535).await;
    c.cmd(&format!("AUTH PLAIN {bad}"), 421).await;
    assert!(c.closed().await);
}

#[tokio::test]
async fn garbage_gets_5xx_never_a_crash() {
    let relay =
        TestRelay::start("[[listener]]\naddress = \"127.0.0.1:0\"\nauth = \"none\"\n").await;
    let mut c = RawClient::ready(relay.addr()).await;
    for line in [
        "\u{0}\u{1}\u{2}",
        "MAIL FROM:<<<>>>",
        "RCPT",
        "MAIL FROM:<a@b> SIZE=99999999999999999999999",
    ] {
        let (code, text) = c.reply_to(line).await;
        assert!((500..600).contains(&code), "{line:?} -> {text}");
        assert!(
            text[4..].starts_with("5."),
            "enhanced status code missing: {text}"
        );
    }
    c.send(&[0xff; 5000]).await;
    c.send(b"\r\n").await;
    c.expect(500).await;
    c.cmd("NOOP", 250).await;
}

/// `bare_lf = "lenient"` (the default on a loopback or private allow list): LF alone ends lines, and `LF . LF`
/// ends the data of a client whose commands end with LF alone (`tests/quirks.rs`). This client's commands end
/// with CRLF, so no vector ends its message early: one message each, and every message relay acknowledges
/// reaches the upstream in CRLF only, so the upstream sees each message end exactly where relay did.
#[tokio::test]
async fn lenient_mode_keeps_relay_and_upstream_agreeing_on_every_vector() {
    use common::idp::{account_top, idp_issuing};
    use common::upstream::FakeUpstream;
    let mut upstream = FakeUpstream::start(&["tok"]).await;
    let idp = idp_issuing("tok").await;
    let dir = tempfile::tempdir().unwrap();
    let top = account_top(dir.path(), &idp.uri(), &upstream, "");
    let relay = TestRelay::start_with(
        dir,
        &top,
        "[[listener]]\naddress = \"127.0.0.1:0\"\nauth = \"none\"\n",
    )
    .await;
    for vector in VECTORS {
        let mut c = RawClient::in_data(relay.addr()).await;
        c.send(&smuggling_payload(vector)).await;
        c.send(b"QUIT\r\n").await;
        let mut acknowledged = 0;
        while let Some((code, text)) = c.reply().await {
            assert!(code < 400, "{vector:?}: {text}");
            if text.contains("queued as") {
                acknowledged += 1;
            }
            if code == 221 {
                break;
            }
        }
        assert_eq!(acknowledged, 1, "{vector:?}");
        for _ in 0..acknowledged {
            let got = upstream.next().await;
            for (i, &b) in got.data.iter().enumerate() {
                match b {
                    b'\n' => {
                        assert_eq!(got.data.get(i.wrapping_sub(1)), Some(&b'\r'), "{vector:?}")
                    }
                    b'\r' => assert_eq!(got.data.get(i + 1), Some(&b'\n'), "{vector:?}"),
                    _ => {}
                }
            }
        }
    }
}

/// A device whose commands end with CRLF but which ends its data with `LF . LF` (a lenient listener takes that
/// as text from such a client): it waits out `data_timeout`, and the log line says why its message went nowhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crlf_client_ending_data_with_lf_dot_lf_is_told_in_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        "address = \"127.0.0.1:0\"\nauth = \"none\"\nbare_lf = \"lenient\"\ndata_timeout = \"1s\"",
    );
    let mut daemon = Daemon::spawn(&config);
    let mut c = RawClient::in_data(daemon.addr).await;
    c.send(b"Subject: x\r\n\r\nbody\r\n.\n").await;
    c.expect(421).await;
    let line = daemon.wait_log("no end of data within data_timeout");
    assert!(
        line.contains("only CRLF . CRLF ends the data of a client whose commands end with CRLF")
            && line.contains("relay_event=\"discarded\""),
        "{line}"
    );
    assert_eq!(daemon.terminate().code(), Some(0));

    // A device that ends every line with LF alone, on a `normalize` listener: told which setting takes it.
    let config = write_config(
        dir.path(),
        "address = \"127.0.0.1:0\"\nauth = \"none\"\nbare_lf = \"normalize\"\ndata_timeout = \"1s\"",
    );
    let mut daemon = Daemon::spawn(&config);
    let mut c = RawClient::connect(daemon.addr).await;
    c.expect(220).await;
    for (line, code) in [
        ("EHLO lf.lan", 250),
        ("MAIL FROM:<a@lan.test>", 250),
        ("RCPT TO:<b@example.com>", 250),
        ("DATA", 354),
    ] {
        c.send(format!("{line}\n").as_bytes()).await;
        c.expect(code).await;
    }
    c.send(b"Subject: x\n\nbody\n.\n").await;
    c.expect(421).await;
    let line = daemon.wait_log("no end of data within data_timeout");
    assert!(
        line.contains("ends its lines with LF alone") && line.contains("bare_lf = \"lenient\""),
        "{line}"
    );
    assert_eq!(daemon.terminate().code(), Some(0));
}
