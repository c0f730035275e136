//! `rewrite_from` end to end: a device sends over a real socket, relay queues the message and delivers it to a fake
//! upstream; what arrives there is checked byte for byte: the envelope sender, the rewritten From: and Reply-To:,
//! and every other header field and body byte exactly as the device sent them.

mod common;

use common::http_api::FakeApi;
use common::idp::{LISTENER, account_config, account_top, idp_issuing, relay_with_account_and};
use common::upstream::{FakeUpstream, Received};
use common::*;

const MAILBOX: &str = "relay@example.com";
const DEVICE: &str = "scanner@lan.test";

/// Header fields before and after the From: field, with encoded words, folding and 8-bit text that must all pass
/// untouched.
const BEFORE: &str = "Date: Mon, 1 Jan 2024 09:00:00 +0100\r\nMessage-ID: <scan-42@lan.test>\r\n";
const AFTER: &str = "To: \"Ops\" <ops@example.com>, =?UTF-8?Q?B=C3=BCro?= <buero@example.com>\r\nSubject: =?UTF-8?B?U2NhbiB2b20gRHJ1Y2tlcg==?=\r\nX-Folded: one\r\n\ttwo  \r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n";
/// The blank line and a body with lines that look like header fields, a leading dot and 8-bit text.
const BODY: &str = "\r\nFrom: in the body, not a header\r\nReply-To: also the body\r\n.leading dot\r\nGrüße aus dem Büro\r\n \r\nend\r\n";

/// The message a device sends, with `from` (whole header lines) in the middle of its header section.
fn message(from: &str, extra: &str) -> Vec<u8> {
    format!("{BEFORE}{from}{AFTER}{extra}{BODY}").into_bytes()
}

/// Sends `message` with MAIL FROM `sender` to ops@example.com, and sees it queued.
async fn submit(relay: &TestRelay, sender: &str, message: &[u8]) {
    let mut c = RawClient::ready(relay.addr()).await;
    c.cmd(&format!("MAIL FROM:<{sender}>"), 250).await;
    c.cmd("RCPT TO:<ops@example.com>", 250).await;
    c.cmd("DATA", 354).await;
    c.send(&dot_stuffed(message)).await;
    c.send(b".\r\n").await;
    c.expect(250).await;
    c.cmd("QUIT", 221).await;
}

/// Sends `message` with MAIL FROM `sender` and returns what the upstream got.
async fn deliver(
    relay: &TestRelay,
    upstream: &mut FakeUpstream,
    sender: &str,
    message: &[u8],
) -> Received {
    submit(relay, sender, message).await;
    let got = upstream.next().await;
    assert_eq!(got.to, ["ops@example.com"]);
    got
}

/// The upstream got relay's Received: field and then exactly `expected`.
fn assert_forwarded(got: &Received, expected: &[u8], case: &str) {
    assert_eq!(
        String::from_utf8_lossy(strip_received(&got.data)),
        String::from_utf8_lossy(expected),
        "{case}"
    );
    assert_eq!(strip_received(&got.data), expected, "{case}: bytes");
}

/// The header section of what the upstream got, lower-cased, for counting fields.
fn header_section(got: &Received) -> String {
    let text = String::from_utf8_lossy(&got.data).to_ascii_lowercase();
    text.split("\r\n\r\n").next().unwrap_or("").to_string()
}

async fn relay_in_mode(mode: &str, upstream: &FakeUpstream) -> (TestRelay, wiremock::MockServer) {
    let idp = idp_issuing("tok").await;
    let relay = relay_with_account_and(&idp, upstream, &format!("rewrite_from = \"{mode}\"")).await;
    (relay, idp)
}

const NAMED: &str = "From: \"Scanner 3F\" <scanner@lan.test>\r\n";

#[tokio::test]
async fn envelope_and_none_modes_leave_the_message_alone() {
    for (mode, sender) in [("envelope", MAILBOX), ("none", DEVICE)] {
        let mut upstream = FakeUpstream::start(&["tok"]).await;
        let (relay, _idp) = relay_in_mode(mode, &upstream).await;
        let sent = message(NAMED, "");
        let got = deliver(&relay, &mut upstream, DEVICE, &sent).await;
        assert_eq!(got.from, sender, "{mode}");
        assert_forwarded(&got, &sent, mode);
        // A bounce keeps its null sender.
        let got = deliver(&relay, &mut upstream, "", &sent).await;
        assert_eq!(got.from, "", "{mode}");
        assert_forwarded(&got, &sent, mode);
    }
}

#[tokio::test]
async fn header_mode_rewrites_from_keeps_the_name_and_adds_reply_to() {
    let mut upstream = FakeUpstream::start(&["tok"]).await;
    let (relay, _idp) = relay_in_mode("header", &upstream).await;
    // (case, From: sent, other fields sent after the rest, From: (and Reply-To:) expected)
    let cases = [
        (
            "display name",
            NAMED,
            "",
            "From: \"Scanner 3F\" <relay@example.com>\r\nReply-To: \"Scanner 3F\" <scanner@lan.test>\r\n",
        ),
        (
            "encoded word",
            "From: =?UTF-8?B?U2Nhbm5lciBCw7xybyAzRg==?= <scanner@lan.test>\r\n",
            "",
            "From: =?UTF-8?B?U2Nhbm5lciBCw7xybyAzRg==?= <relay@example.com>\r\nReply-To: =?UTF-8?B?U2Nhbm5lciBCw7xybyAzRg==?= <scanner@lan.test>\r\n",
        ),
        (
            "group",
            "From: Scanners: \"Scanner 3F\" <s3@lan.test>, s4@lan.test;\r\n",
            "",
            "From: Scanners <relay@example.com>\r\nReply-To: Scanners: \"Scanner 3F\" <s3@lan.test>, s4@lan.test;\r\n",
        ),
        (
            "folded",
            "from:  \"Scanner\r\n 3F\"\r\n\t<scanner@lan.test>\r\n",
            "",
            "From: \"Scanner\r\n 3F\" <relay@example.com>\r\nReply-To:  \"Scanner\r\n 3F\"\r\n\t<scanner@lan.test>\r\n",
        ),
        (
            "no display name",
            "From: scanner@lan.test\r\n",
            "",
            "From: relay@example.com\r\nReply-To: scanner@lan.test\r\n",
        ),
        (
            "Reply-To already there",
            NAMED,
            "REPLY-TO:\r\n helpdesk@example.com\r\n",
            "From: \"Scanner 3F\" <relay@example.com>\r\n",
        ),
    ];
    for (case, from, extra, expected) in cases {
        let got = deliver(&relay, &mut upstream, DEVICE, &message(from, extra)).await;
        assert_eq!(got.from, MAILBOX, "{case}");
        assert_forwarded(&got, &message(expected, extra), case);
        assert_eq!(
            header_section(&got).matches("\r\nreply-to:").count(),
            1,
            "{case}: one Reply-To"
        );
    }
}

#[tokio::test]
async fn header_mode_leaves_alone_what_it_need_not_or_cannot_change() {
    let mut upstream = FakeUpstream::start(&["tok"]).await;
    let (relay, _idp) = relay_in_mode("header", &upstream).await;
    for (case, from) in [
        ("already the mailbox", "From: Relay <RELAY@example.com>\r\n"),
        ("no address", "From: Scanner 3F\r\n"),
        ("no From:", ""),
    ] {
        let sent = message(from, "");
        let got = deliver(&relay, &mut upstream, DEVICE, &sent).await;
        assert_eq!(got.from, MAILBOX, "{case}");
        assert_forwarded(&got, &sent, case);
    }
    // A bounce: MAIL FROM stays null, and the From: is rewritten all the same (the provider checks it).
    let got = deliver(&relay, &mut upstream, "", &message(NAMED, "")).await;
    assert_eq!(got.from, "");
    assert_forwarded(
        &got,
        &message(
            "From: \"Scanner 3F\" <relay@example.com>\r\nReply-To: \"Scanner 3F\" <scanner@lan.test>\r\n",
            "",
        ),
        "null sender",
    );
}

/// Microsoft Graph is given the message as rewritten, as SMTP is.
#[tokio::test]
async fn graph_is_given_the_rewritten_message() {
    let idp = idp_issuing("tok").await;
    let api = FakeApi::start("tok", MAILBOX).await;
    let unused_smtp = FakeUpstream::start(&["tok"]).await;
    let dir = tempfile::tempdir().unwrap();
    let graph = format!(
        "transport = \"graph\"\ngraph_url = \"{}\"\nrewrite_from = \"header\"",
        api.uri()
    );
    let top = account_top(dir.path(), &idp.uri(), &unused_smtp, &graph);
    let relay = TestRelay::start_with(dir, &top, LISTENER).await;
    submit(&relay, DEVICE, &message(NAMED, "")).await;
    let sent = api.sent(1).await;
    assert_eq!(
        String::from_utf8_lossy(strip_received(&sent[0].mime)),
        String::from_utf8_lossy(&message(
            "From: \"Scanner 3F\" <relay@example.com>\r\nReply-To: \"Scanner 3F\" <scanner@lan.test>\r\n",
            "",
        ))
    );
}

/// The real binary: a message whose From: header mode cannot read is delivered as it was, and the log says so
/// with its queue id; a readable one is rewritten.
#[tokio::test]
async fn the_daemon_logs_a_from_it_cannot_rewrite_and_delivers_the_message() {
    let mut upstream = FakeUpstream::start(&["tok"]).await;
    let idp = idp_issuing("tok").await;
    let dir = tempfile::tempdir().unwrap();
    let config = account_config(
        dir.path(),
        &idp.uri(),
        &upstream,
        "rewrite_from = \"header\"",
    );
    let mut daemon = Daemon::spawn(&config);

    let odd = message("From: Scanner 3F\r\n", "");
    let id = send_message(daemon.addr, &dot_stuffed(&odd)).await;
    let got = upstream.next().await;
    assert_eq!(got.from, MAILBOX);
    // send_message's client says MAIL FROM:<a@example.com> and RCPT TO:<b@example.com>.
    assert_eq!(got.to, ["b@example.com"]);
    assert_forwarded(&got, &odd, "unreadable From:");
    let line = daemon.wait_log("From: not rewritten");
    assert!(line.contains(&id), "{line}");
    assert!(line.contains("holds no address"), "{line}");

    // A header section with no end within the 1 MiB relay reads of it: said too (it went with no line).
    let pad = "X-Pad: 0123456789012345678901234567890123456789012345678901234567890123456789\r\n"
        .repeat(14_000);
    let huge = message(NAMED, &pad);
    let id = send_message(daemon.addr, &dot_stuffed(&huge)).await;
    let got = upstream.next().await;
    assert_forwarded(&got, &huge, "a header section past 1 MiB");
    let line = daemon.wait_log("From: not rewritten");
    assert!(
        line.contains(&id) && line.contains("header section"),
        "{line}"
    );

    let sent = message(NAMED, "");
    send_message(daemon.addr, &dot_stuffed(&sent)).await;
    let got = upstream.next().await;
    assert_forwarded(
        &got,
        &message(
            "From: \"Scanner 3F\" <relay@example.com>\r\nReply-To: \"Scanner 3F\" <scanner@lan.test>\r\n",
            "",
        ),
        "daemon",
    );
    assert_eq!(daemon.terminate().code(), Some(0));
}
