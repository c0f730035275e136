//! Microsoft Graph and the Gmail API as transports, against fakes that enforce the real request shapes and
//! limits (`tests/common/http_api.rs`): messages of every size arrive intact, large Graph messages through
//! upload sessions, throttling and refusals are handled as the providers mean them, and an SMTP account whose
//! tenant switched SMTP AUTH off falls back to Graph.

mod common;

use std::time::{Duration, SystemTime};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use common::http_api::{Chunk, FakeApi, graph_error};
use common::idp::idp_issuing;
use common::upstream::FakeUpstream;
use common::*;
use wiremock::{MockServer, ResponseTemplate};

const LISTENER: &str =
    "[[listener]]\naddress = \"127.0.0.1:0\"\nauth = \"none\"\nmax_message_size = \"60MiB\"\n";
const MAILBOX: &str = "relay@example.com";

fn secret(dir: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join("secret");
    std::fs::write(&p, "s3cret\n").unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// One client-credentials account, `office`, with `lines` for its transport.
fn top(dir: &std::path::Path, idp: &str, provider: &str, lines: &str) -> String {
    secret(dir);
    format!(
        "default_account = \"office\"\n[queue]\nretry = [\"1s\"]\n[[account]]\nname = \"office\"\nprovider = \"{provider}\"\ntenant = \"contoso.onmicrosoft.com\"\nflow = \"client_credentials\"\nmailbox = \"{MAILBOX}\"\nclient_id = \"cid\"\nclient_secret_file = \"{dir}/secret\"\ntoken_url = \"{idp}/token\"\n{lines}\n",
        dir = dir.display()
    )
}

/// [`top`] for a Microsoft account on SMTP at `smtp_port` with Graph (`api`) as its fallback transport.
fn smtp_falling_back_to_graph(
    dir: &std::path::Path,
    idp: &MockServer,
    smtp_port: u16,
    api: &FakeApi,
) -> String {
    top(
        dir,
        &idp.uri(),
        "microsoft",
        &format!(
            "smtp_host = \"127.0.0.1\"\nsmtp_port = {smtp_port}\nsmtp_tls = \"none\"\nfallback_transport = \"graph\"\ngraph_url = \"{}\"",
            api.uri()
        ),
    )
}

/// `dir/relay.toml` with the state dir in `dir`, `top` (accounts, queue) and [`LISTENER`].
fn config_file(dir: &std::path::Path, top: &str) -> std::path::PathBuf {
    let config = dir.join("relay.toml");
    std::fs::write(
        &config,
        format!("state_dir = {:?}\n{top}\n{LISTENER}", dir.join("state")),
    )
    .unwrap();
    config
}

/// Graph's answer when it fails on its side (the request may or may not have been carried out).
fn graph_500() -> ResponseTemplate {
    graph_error(
        500,
        "InternalServerError",
        "An internal server error occurred.",
    )
}

/// A scan with a PDF of `size` bytes, base64 in 76-character lines; returns the message and the PDF.
fn scan(size: usize) -> (Vec<u8>, Vec<u8>) {
    let pdf: Vec<u8> = (0..size as u64)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let mut msg = b"From: scanner@lan.test\r\nTo: ops@example.test\r\nSubject: scan\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n--b1\r\nContent-Type: text/plain\r\n\r\nscan attached\r\n".to_vec();
    msg.extend_from_slice(b"--b1\r\nContent-Type: application/pdf; name=\"scan.pdf\"\r\nContent-Disposition: attachment; filename=\"scan.pdf\"\r\nContent-Transfer-Encoding: base64\r\n\r\n");
    let b64 = B64.encode(&pdf);
    for line in b64.as_bytes().chunks(76) {
        msg.extend_from_slice(line);
        msg.extend_from_slice(b"\r\n");
    }
    msg.extend_from_slice(b"--b1--\r\n");
    (msg, pdf)
}

/// What the draft must be: the message without the PDF's part.
fn without_pdf(msg: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(msg);
    let start = text.find("--b1\r\nContent-Type: application/pdf").unwrap();
    let end = text.rfind("--b1--").unwrap();
    [&msg[..start], &msg[end..]].concat()
}

async fn send_to(addr: std::net::SocketAddr, rcpt: &[&str], msg: &[u8]) {
    let mut c = RawClient::connect(addr).await;
    c.expect(220).await;
    c.cmd("EHLO scanner.lan", 250).await;
    c.cmd("MAIL FROM:<scanner@lan.test>", 250).await;
    for r in rcpt {
        c.cmd(&format!("RCPT TO:<{r}>"), 250).await;
    }
    c.cmd("DATA", 354).await;
    c.send(msg).await;
    c.send(b".\r\n").await;
    c.expect(250).await;
    c.cmd("QUIT", 221).await;
}

/// The account lines for sending through `api`: Graph for "microsoft", the Gmail API for "google".
fn through(provider: &str, api: &FakeApi) -> String {
    match provider {
        "google" => format!(
            "transport = \"gmail_api\"\ngmail_api_url = \"{}\"\nscope = \"https://mail.google.com/\"",
            api.uri()
        ),
        _ => format!("transport = \"graph\"\ngraph_url = \"{}\"", api.uri()),
    }
}

/// A relay whose default account sends through the fake API: Graph for "microsoft", the Gmail API for "google";
/// `more` goes after the account's keys. The identity provider is returned to be kept alive; the API can be
/// scripted before a message is sent.
async fn relay_through_api(provider: &str, more: &str) -> (MockServer, FakeApi, TestRelay) {
    let idp = idp_issuing("tok").await;
    let api = FakeApi::start("tok", MAILBOX).await;
    let dir = tempfile::tempdir().unwrap();
    let t = top(
        dir.path(),
        &idp.uri(),
        provider,
        &format!("{}\n{more}", through(provider, &api)),
    );
    let relay = TestRelay::start_with(dir, &t, LISTENER).await;
    (idp, api, relay)
}

/// The real binary, its account as [`relay_through_api`]'s, with `bounce = "sender"`: a message moved to dead/
/// would be bounced to its sender through the same API, and the fake would get the report. Returns the identity
/// provider, the API, the daemon and its directory, each to be kept alive.
async fn daemon_through_api(provider: &str) -> (MockServer, FakeApi, Daemon, tempfile::TempDir) {
    daemon_through_api_with(provider, "").await
}

/// [`daemon_through_api`] with `more` after the account's keys.
async fn daemon_through_api_with(
    provider: &str,
    more: &str,
) -> (MockServer, FakeApi, Daemon, tempfile::TempDir) {
    let idp = idp_issuing("tok").await;
    let api = FakeApi::start("tok", MAILBOX).await;
    let dir = tempfile::tempdir().unwrap();
    let t = top(
        dir.path(),
        &idp.uri(),
        provider,
        &format!("{}\n{more}", through(provider, &api)),
    );
    let config = dir.path().join("relay.toml");
    let state = dir.path().join("state");
    std::fs::write(
        &config,
        format!("state_dir = {state:?}\nbounce = \"sender\"\n{t}\n{LISTENER}"),
    )
    .unwrap();
    let daemon = Daemon::spawn(&config);
    (idp, api, daemon, dir)
}

/// Waits for the next deferral and checks that its line has every one of `words`.
fn deferred_saying(d: &mut Daemon, words: &[&str]) -> String {
    let line = d.wait_log("relay_event=\"deferred\"");
    for w in words {
        assert!(line.contains(w), "{w:?} not in {line}");
    }
    line
}

/// No deferral among the log lines read so far.
fn none_deferred(d: &Daemon) {
    let deferred: Vec<&String> = d
        .unmatched()
        .iter()
        .filter(|l| l.contains("relay_event=\"deferred\""))
        .collect();
    assert!(deferred.is_empty(), "{deferred:?}");
}

/// Nothing went to dead/ and nobody was bounced: `sent` (all the fake got) are the messages, no report among them.
fn none_dead_nor_bounced(d: &Daemon, dir: &std::path::Path, sent: &[common::http_api::Sent]) {
    let dead = files_in(&dir.join("state"), "dead");
    assert!(dead.is_empty(), "{dead:?}");
    let events: Vec<&String> = d
        .unmatched()
        .iter()
        .filter(|l| l.contains("relay_event=\"dead\"") || l.contains("bounce_queued"))
        .collect();
    assert!(events.is_empty(), "{events:?}");
    for s in sent {
        assert!(
            !String::from_utf8_lossy(&s.mime).contains("multipart/report"),
            "a bounce was sent"
        );
    }
}

/// Six 1 MB PDFs (over the 4 MB request limit together, each under Graph's 2 MiB upload-session minimum) and a
/// 3.5 MB image shown in the HTML body (`cid:`): each small one goes in one request, the image through an upload
/// session, still inline with its Content-ID. Before, every cut-out attachment went through an upload session,
/// and Graph's 400 ErrorAttachmentSizeShouldNotBeLessThanMinimumSize put the message in dead/.
#[tokio::test]
async fn graph_attaches_small_files_in_one_request_and_keeps_inline_images_inline() {
    let (_idp, api, relay) = relay_through_api("microsoft", "").await;
    let part = |i: u64, size: usize| -> Vec<u8> {
        (0..size as u64)
            .map(|n| (n.wrapping_mul(2_654_435_761 + i) >> 13) as u8)
            .collect()
    };
    let b64 = |bytes: &[u8]| -> Vec<u8> {
        let text = B64.encode(bytes);
        text.as_bytes()
            .chunks(76)
            .flat_map(|l| [l, b"\r\n"].concat())
            .collect()
    };
    let image = part(99, 3_500_000);
    let mut msg = b"From: scanner@lan.test\r\nTo: ops@example.test\r\nSubject: pages\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"m\"\r\n\r\n--m\r\nContent-Type: multipart/related; boundary=\"r\"\r\n\r\n--r\r\nContent-Type: text/html\r\n\r\n<img src=\"cid:logo@scanner\">\r\n--r\r\nContent-Type: image/png\r\nContent-ID: <logo@scanner>\r\nContent-Transfer-Encoding: base64\r\n\r\n".to_vec();
    msg.extend_from_slice(&b64(&image));
    msg.extend_from_slice(b"--r--\r\n");
    let pdfs: Vec<Vec<u8>> = (0..6).map(|i| part(i, 1_000_000)).collect();
    for (i, pdf) in pdfs.iter().enumerate() {
        msg.extend_from_slice(format!("--m\r\nContent-Type: application/pdf; name=\"p{i}.pdf\"\r\nContent-Disposition: attachment; filename=\"p{i}.pdf\"\r\nContent-Transfer-Encoding: base64\r\n\r\n").as_bytes());
        msg.extend_from_slice(&b64(pdf));
    }
    msg.extend_from_slice(b"--m--\r\n");
    send_to(relay.addr(), &["ops@example.test"], &msg).await;
    let sent = api.sent(1).await;
    assert_eq!(sent[0].path, "draft");
    let logo = sent[0]
        .attachments
        .iter()
        .find(|a| a.content_type == "image/png")
        .expect("the image was attached");
    assert!(logo.bytes == image, "the image arrived changed");
    assert_eq!(
        (logo.how, logo.inline, logo.content_id.as_deref()),
        ("upload", true, Some("logo@scanner"))
    );
    let posted: Vec<_> = sent[0]
        .attachments
        .iter()
        .filter(|a| a.how == "post")
        .collect();
    assert!(!posted.is_empty(), "{:?}", sent[0].attachments.len());
    for a in &posted {
        let i: usize = a.name[1..2].parse().unwrap();
        assert!(
            a.bytes == pdfs[i] && !a.inline,
            "{} arrived changed",
            a.name
        );
    }
    // What was not cut out is in the draft's MIME, whole.
    let draft = String::from_utf8_lossy(&sent[0].mime);
    for i in 0..6 {
        let named = format!("name=\"p{i}.pdf\"");
        assert!(
            draft.contains(&named) != posted.iter().any(|a| a.name == format!("p{i}.pdf")),
            "p{i}.pdf is either in the draft or attached"
        );
    }
}

#[tokio::test]
async fn graph_sends_small_messages_whole_and_large_ones_as_drafts_with_uploads() {
    let (_idp, api, relay) = relay_through_api("microsoft", "").await;
    let small = b"From: scanner@lan.test\r\nTo: ops@example.test\r\nSubject: 1k\r\n\r\n".to_vec();
    let small = [small, vec![b'x'; 1000], b"\r\n".to_vec()].concat();
    send_to(relay.addr(), &["ops@example.test"], &small).await;
    let sent = api.sent(1).await;
    assert_eq!(sent[0].path, "sendMail");
    assert_eq!(strip_received(&sent[0].mime), &small[..]);

    // 3.5 MiB: over the 4 MB request limit once in base64.
    let (msg, pdf) = scan(2_650_000);
    assert!(msg.len() > 3_600_000, "{}", msg.len());
    send_to(relay.addr(), &["ops@example.test"], &msg).await;
    let sent = api.sent(2).await;
    assert_eq!(sent[1].path, "draft");
    assert_eq!(strip_received(&sent[1].mime), &without_pdf(&msg)[..]);
    assert_eq!(sent[1].attachments.len(), 1);
    let a = &sent[1].attachments[0];
    assert_eq!(
        (a.name.as_str(), a.content_type.as_str(), a.how),
        ("scan.pdf", "application/pdf", "post"),
        "under 3 MB: one request (Graph refuses an upload session for it)"
    );
    assert!(a.bytes == pdf, "the attachment arrived changed");
    assert!(sent[1].patch.is_none(), "{:?}", sent[1].patch);
    assert!(api.errors().is_empty(), "{:?}", api.errors());
    assert_eq!(api.drafts_left(), 0);
}

#[tokio::test]
async fn graph_carries_envelope_only_recipients_and_honours_save_to_sent_items() {
    let (_idp, api, relay) = relay_through_api("microsoft", "save_to_sent_items = false").await;
    let msg = b"From: scanner@lan.test\r\nTo: ops@example.test\r\nSubject: bcc\r\n\r\nhi\r\n";
    send_to(
        relay.addr(),
        &["ops@example.test", "audit@example.test"],
        msg,
    )
    .await;
    let sent = api.sent(1).await;
    assert_eq!(sent[0].path, "draft");
    let patch = sent[0].patch.as_ref().expect("a patch");
    assert_eq!(
        patch["toRecipients"][0]["emailAddress"]["address"],
        "ops@example.test"
    );
    assert_eq!(
        patch["bccRecipients"][0]["emailAddress"]["address"],
        "audit@example.test"
    );
    assert_eq!(
        patch["singleValueExtendedProperties"][0]["id"],
        "Boolean 0x0E01"
    );
    assert_eq!(strip_received(&sent[0].mime), &msg[..]);
}

/// Google's usual 429 has no Retry-After: the account pauses (a minute), as for a 403 rate limit, instead of each
/// message trying again on its own schedule while the API says too many. `relay queue retry` ends the pause, and
/// the message goes. The log says what the quota refusal means.
#[tokio::test]
async fn a_gmail_429_without_retry_after_pauses_the_account() {
    let (_idp, api, mut d, dir) = daemon_through_api("google").await;
    api.script(vec![google_error(
        429,
        "RESOURCE_EXHAUSTED",
        "rateLimitExceeded",
        "User-rate limit exceeded",
    )]);
    let msg = b"From: scanner@lan.test\r\nTo: ops@example.test\r\nSubject: t\r\n\r\nhi\r\n";
    send_to(d.addr, &["ops@example.test"], msg).await;
    let line = d.wait_log("the provider asked the account to pause");
    assert!(line.contains("relay_event=\"paused\""), "{line}");
    assert!(line.contains("Gmail API 429"), "{line}");
    assert!(line.contains("fewer requests a minute"), "{line}");
    let pause = dir.path().join("state/rate/office.pause");
    assert!(pause.exists(), "the pause is on file");
    // The account's next message waits, and its line says why (not "sending limits").
    send_to(d.addr, &["ops@example.test"], msg).await;
    d.wait_log("held: the provider asked the account to pause");
    queue_retry(&dir.path().join("relay.toml"), "--all");
    let sent = api.sent(2).await;
    assert!(sent.iter().all(|s| strip_received(&s.mime) == &msg[..]));
}

/// `relay test` through Graph meets a token the API refuses (revoked, rotated early) as deliveries do: one renewal,
/// one more try (before, it failed, and `relay status` said "relay test: failing" while mail flowed). A refusal
/// whose words carry the transport's advice shows it as the diagnosis, not "relay has no advice".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_test_renews_a_refused_token_and_shows_the_transports_advice() {
    let idp = common::idp::idp_stale_then_fresh().await;
    let api = FakeApi::start("fresh", MAILBOX).await;
    let dir = tempfile::tempdir().unwrap();
    let t = top(
        dir.path(),
        &idp.uri(),
        "microsoft",
        &through("microsoft", &api),
    );
    let config = write_config_with(dir.path(), &t, "address = \"127.0.0.1:0\"\n");
    let run = || {
        let config = config.clone();
        tokio::task::spawn_blocking(move || {
            run_bounded(
                std::process::Command::new(relay_bin())
                    .args(["test", "office", "--to", "ops@example.test", "--config"])
                    .arg(&config),
            )
        })
    };
    let out = run().await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{text}");
    assert!(text.contains("renewing it once and trying again"), "{text}");
    assert!(text.contains("delivered: Graph 202"), "{text}");

    api.script(vec![graph_error(
        403,
        "ErrorAccessDenied",
        "Access is denied. Check credentials and try again.",
    )]);
    let out = run().await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains(
            "diagnosis: the app may not send from this mailbox: grant it the Mail.Send permission"
        ),
        "{text}"
    );
}

/// Mail deferred while the API was in trouble (503s without Retry-After) goes as soon as a delivery goes through
/// again, as after an SMTP upstream that could not be reached, not at its retry schedule's next step (an hour
/// here; hours after a long outage).
#[tokio::test]
async fn mail_deferred_during_an_api_outage_goes_when_the_api_takes_mail_again() {
    let idp = idp_issuing("tok").await;
    let api = FakeApi::start("tok", MAILBOX).await;
    let dir = tempfile::tempdir().unwrap();
    let t = top(
        dir.path(),
        &idp.uri(),
        "microsoft",
        &through("microsoft", &api),
    )
    .replace("retry = [\"1s\"]", "retry = [\"1h\"]");
    let mut relay = TestRelay::start_with(dir, &t, LISTENER).await;
    api.script(vec![
        graph_error(503, "ServiceUnavailable", "Service Unavailable"),
        graph_error(503, "ServiceUnavailable", "Service Unavailable"),
    ]);
    let msg = |n: usize| {
        format!("From: scanner@lan.test\r\nTo: ops@example.test\r\nSubject: m{n}\r\n\r\nhi\r\n")
            .into_bytes()
    };
    for n in 0..2 {
        send_to(relay.addr(), &["ops@example.test"], &msg(n)).await;
        relay.attempts_done(n as u64 + 1).await;
    }
    // The API is back: the next message goes, and the two deferred for an hour follow at once.
    send_to(relay.addr(), &["ops@example.test"], &msg(2)).await;
    let sent = api.sent(3).await;
    let mut subjects: Vec<String> = sent
        .iter()
        .map(|s| {
            let text = String::from_utf8_lossy(&s.mime).into_owned();
            text.lines()
                .find(|l| l.starts_with("Subject: "))
                .unwrap_or("")
                .to_string()
        })
        .collect();
    subjects.sort();
    assert_eq!(subjects, ["Subject: m0", "Subject: m1", "Subject: m2"]);
}

#[tokio::test]
async fn graph_throttling_waits_for_retry_after_then_delivers() {
    let (_idp, api, relay) = relay_through_api("microsoft", "").await;
    api.script(vec![
        ResponseTemplate::new(429)
            .insert_header("Retry-After", "3")
            .set_body_json(serde_json::json!({"error": {"code": "ApplicationThrottled", "message": "Application is over its MailboxConcurrency limit."}})),
    ]);
    let msg = b"From: scanner@lan.test\r\nTo: ops@example.test\r\nSubject: t\r\n\r\nhi\r\n";
    send_to(relay.addr(), &["ops@example.test"], msg).await;
    let sent = api.sent(1).await;
    let refused_at = api
        .log()
        .iter()
        .find(|(m, p, _)| m == "POST" && p.ends_with("/sendMail"))
        .map(|(_, _, at)| *at)
        .unwrap();
    let waited = sent[0].at.duration_since(refused_at).unwrap();
    assert!(waited >= Duration::from_secs(3), "retried after {waited:?}");
    assert_eq!(strip_received(&sent[0].mime), &msg[..]);
}

/// A `Retry-After` under 30 s defers the message without the account's `paused` line (README: 30 s or more is the
/// account's pause); it logged both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_retry_after_is_a_deferral_not_a_pause() {
    let (_idp, api, mut d, _dir) = daemon_through_api("microsoft").await;
    api.script(vec![
        ResponseTemplate::new(429)
            .insert_header("Retry-After", "2")
            .set_body_json(serde_json::json!({"error": {"code": "ApplicationThrottled", "message": "Application is over its MailboxConcurrency limit."}})),
    ]);
    let msg = b"From: scanner@lan.test\r\nTo: ops@example.test\r\nSubject: t\r\n\r\nhi\r\n";
    send_to(d.addr, &["ops@example.test"], msg).await;
    d.wait_log("relay_event=\"deferred\"");
    d.wait_log("relay_event=\"delivered\"");
    let log = d.terminate_with_log();
    assert!(
        !log.iter().any(|l| l.contains("relay_event=\"paused\"")),
        "{log:#?}"
    );
    assert_eq!(api.sent(1).await.len(), 1);
}

fn google_error(status: u16, grpc: &str, reason: &str, message: &str) -> ResponseTemplate {
    ResponseTemplate::new(status).set_body_json(serde_json::json!({"error": {
        "code": status,
        "message": message,
        "errors": [{"message": message, "domain": "global", "reason": reason}],
        "status": grpc,
    }}))
}

/// Graph's refusals, through the binary. A refusal of the account (the app lacks Mail.Send, a sending mailbox
/// Graph cannot send from) used to move the message to dead/ and bounce it, and so every message queued for
/// the account, for one permission mistake the admin fixes in a minute. It says nothing about the message: the
/// message now waits, deferred with the diagnosis in its reason and the log, until the account works (here the
/// fake answers normally again) or `max_age`, as the SMTP upstream's session-level refusals do. A refusal of the
/// message itself (an invalid recipient) still goes to dead/ with the reason; a 401 refreshes the token once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graph_account_refusals_wait_message_refusals_go_to_dead_and_401_refreshes_once() {
    let (idp, api, mut d, dir) = daemon_through_api("microsoft").await;
    api.script(vec![
        graph_error(
            403,
            "ErrorAccessDenied",
            "Access is denied. Check credentials and try again.",
        ),
        graph_error(
            404,
            "MailboxNotEnabledForRESTAPI",
            "The mailbox is either inactive, soft-deleted, or is hosted on-premise.",
        ),
        graph_error(
            404,
            "ErrorInvalidUser",
            "The requested user 'relay@example.com' is invalid.",
        ),
        graph_error(
            403,
            "ErrorMessageSubmissionBlocked",
            "Cannot send mail. The sender is restricted from sending.",
        ),
        // The sending mailbox full (Sent Items fill it): not the message's size, whatever the status says.
        graph_error(
            413,
            "ErrorQuotaExceeded",
            "The process failed to get the correct properties. Mailbox has exceeded maximum mailbox size.",
        ),
        graph_error(
            403,
            "Authorization_RequestDenied",
            "Insufficient privileges to complete the operation.",
        ),
    ]);
    let msg = b"From: scanner@lan.test\r\nTo: ops@example.test\r\nSubject: t\r\n\r\nhi\r\n";
    send_to(d.addr, &["ops@example.test"], msg).await;
    let account = "the account's, not the message's";
    deferred_saying(
        &mut d,
        &["Graph 403 ErrorAccessDenied", "Mail.Send", account],
    );
    deferred_saying(
        &mut d,
        &[
            "Graph 404 MailboxNotEnabledForRESTAPI",
            "Exchange Online mailbox",
            account,
        ],
    );
    deferred_saying(
        &mut d,
        &["Graph 404 ErrorInvalidUser", "wrong `mailbox`", account],
    );
    deferred_saying(
        &mut d,
        &[
            "Graph 403 ErrorMessageSubmissionBlocked",
            "Restricted entities",
            account,
        ],
    );
    deferred_saying(
        &mut d,
        &[
            "Graph 413 ErrorQuotaExceeded",
            "over its storage quota",
            "save_to_sent_items = false",
            account,
        ],
    );
    deferred_saying(
        &mut d,
        &[
            "Graph 403 Authorization_RequestDenied",
            "Mail.Send",
            account,
        ],
    );
    let sent = api.sent(1).await;
    assert_eq!(strip_received(&sent[0].mime), &msg[..]);
    d.wait_log("relay_event=\"delivered\"");
    none_dead_nor_bounced(&d, dir.path(), &sent);

    api.script(vec![graph_error(
        400,
        "ErrorInvalidRecipients",
        "At least one recipient is not valid., Recipient 'nobody@' is not resolved.",
    )]);
    send_to(d.addr, &["ops@example.test"], msg).await;
    let line = d.wait_log("relay_event=\"dead\"");
    assert!(line.contains("Graph 400 ErrorInvalidRecipients"), "{line}");
    let dead = files_in(&dir.path().join("state"), "dead");
    let state = dead.iter().find(|f| f.ends_with(".state")).expect("dead");
    let state = std::fs::read_to_string(dir.path().join("state/dead").join(state)).unwrap();
    assert!(
        state.contains("a recipient address is not valid"),
        "{state}"
    );
    // Its bounce, through Graph too.
    d.wait_log("bounce_queued");
    let sent = api.sent(2).await;
    assert!(String::from_utf8_lossy(&sent[1].mime).contains("multipart/report"));

    api.script(vec![graph_error(
        401,
        "InvalidAuthenticationToken",
        "Lifetime validation failed, the token is expired.",
    )]);
    let tokens_before = idp.received_requests().await.unwrap().len();
    send_to(d.addr, &["ops@example.test"], msg).await;
    let sent = api.sent(3).await;
    assert_eq!(strip_received(&sent[2].mime), &msg[..]);
    let tokens_after = idp.received_requests().await.unwrap().len();
    assert_eq!(tokens_after, tokens_before + 1, "one refresh after the 401");
    assert_eq!(d.terminate().code(), Some(0));
}

/// The Gmail API's refusals of the account (a token without a Gmail scope, the API not enabled in the Cloud
/// project, Gmail off for the user) wait as Graph's do, through the binary: deferred with the diagnosis, never to
/// dead/ nor bounced, and delivered once the account works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gmail_account_refusals_wait_until_the_account_works() {
    let (_idp, api, mut d, dir) = daemon_through_api("google").await;
    api.script(vec![
        google_error(
            403,
            "PERMISSION_DENIED",
            "insufficientPermissions",
            "Request had insufficient authentication scopes.",
        ),
        google_error(
            403,
            "PERMISSION_DENIED",
            "accessNotConfigured",
            "Gmail API has not been used in project 1234 before or it is disabled.",
        ),
        google_error(
            400,
            "FAILED_PRECONDITION",
            "failedPrecondition",
            "Precondition check failed.",
        ),
    ]);
    let msg = b"From: scanner@lan.test\r\nTo: ops@example.test\r\nSubject: t\r\n\r\nhi\r\n";
    send_to(d.addr, &["ops@example.test"], msg).await;
    let account = "the account's, not the message's";
    deferred_saying(
        &mut d,
        &[
            "Gmail API 403",
            "insufficientPermissions",
            "relay authorize",
            account,
        ],
    );
    deferred_saying(
        &mut d,
        &[
            "Gmail API 403",
            "accessNotConfigured",
            "Library > Gmail API",
            account,
        ],
    );
    deferred_saying(
        &mut d,
        &["Gmail API 400", "failedPrecondition", "suspended", account],
    );
    let sent = api.sent(1).await;
    assert_eq!(strip_received(&sent[0].mime), &msg[..]);
    d.wait_log("relay_event=\"delivered\"");
    none_dead_nor_bounced(&d, dir.path(), &sent);
    assert_eq!(d.terminate().code(), Some(0));
}

/// Replies that are not the API's answer about the message, through the binary: a captive proxy's 200 page in
/// front of `sendMail`, a 302 to a login page, a proxy's 407, a load balancer's status HTTP does not define, and a
/// 200 to the Gmail API's send without the sent message. Each used to send the message to dead/ (Gmail's 200:
/// delivered, and lost); now it waits, the reason naming the status, and goes once the API answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_that_say_nothing_about_the_message_defer_it() {
    let portal = "<html><body>Sign in to the guest network</body></html>";
    let (_idp, api, mut d, dir) = daemon_through_api("microsoft").await;
    api.script(vec![
        ResponseTemplate::new(200).set_body_string(portal),
        ResponseTemplate::new(302)
            .insert_header("Location", "https://login.example/portal?ticket=T0P"),
        ResponseTemplate::new(407).set_body_string(portal),
        ResponseTemplate::new(460),
        graph_error(
            409,
            "ErrorIrresolvableConflict",
            "The send or update operation could not be performed because the change key passed in the request does not match the current change key for the item.",
        ),
    ]);
    let msg = b"From: scanner@lan.test\r\nTo: ops@example.test\r\nSubject: t\r\n\r\nhi\r\n";
    send_to(d.addr, &["ops@example.test"], msg).await;
    deferred_saying(
        &mut d,
        &[
            "Graph 200",
            "Sign in to the guest network",
            "may or may not have gone",
        ],
    );
    let line = deferred_saying(
        &mut d,
        &["Graph 302", "redirect to https://login.example/portal"],
    );
    assert!(!line.contains("T0P"), "{line}");
    deferred_saying(&mut d, &["Graph 407", "wants credentials"]);
    deferred_saying(&mut d, &["Graph 460", "does not define"]);
    deferred_saying(
        &mut d,
        &[
            "Graph 409 ErrorIrresolvableConflict",
            "a conflict with the state",
        ],
    );
    let sent = api.sent(1).await;
    assert_eq!(strip_received(&sent[0].mime), &msg[..]);
    d.wait_log("relay_event=\"delivered\"");
    none_dead_nor_bounced(&d, dir.path(), &sent);
    assert_eq!(d.terminate().code(), Some(0));

    let (_idp, api, mut d, dir) = daemon_through_api("google").await;
    api.script(vec![ResponseTemplate::new(200).set_body_string(portal)]);
    send_to(d.addr, &["ops@example.test"], msg).await;
    deferred_saying(&mut d, &["Gmail API 200", "may or may not have gone"]);
    let sent = api.sent(1).await;
    assert_eq!(strip_received(&sent[0].mime), &msg[..]);
    let line = d.wait_log("relay_event=\"delivered\"");
    assert!(line.contains("id 18c0ffee"), "{line}");
    none_dead_nor_bounced(&d, dir.path(), &sent);
    assert_eq!(d.terminate().code(), Some(0));
}

/// Google's signs to start a resumable upload again, through the binary: the session gone (404, 410: it
/// expired) and a 308 to the last chunk (the session is missing bytes). Each used to send the message to dead/
/// and bounce it; now the message waits and the next attempt uploads it in a new session. A 308 whose `Range`
/// shows the session holds part of what was sent is resumed from there in the same attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gmail_resumable_upload_starts_again_when_google_says_so() {
    let (_idp, api, mut d, dir) = daemon_through_api("google").await;
    // Two chunks: 4 MiB, then the rest.
    let (msg, _) = scan(4_500_000);
    assert!(msg.len() > 5 * 1024 * 1024 && msg.len() < 8 * 1024 * 1024);
    let cases: [(&[Chunk], &[&str]); 3] = [
        (&[Chunk::Gone(404)], &["Gmail API 404", "session is gone"]),
        (
            &[Chunk::Taken, Chunk::Gone(410)],
            &["Gmail API 410", "session is gone"],
        ),
        (
            &[Chunk::Taken, Chunk::Keeps(0)],
            &["Gmail API 308", "holds 4194304 of the", "new session"],
        ),
    ];
    for (n, (chunks, words)) in cases.into_iter().enumerate() {
        api.script_chunks(chunks.to_vec());
        send_to(d.addr, &["ops@example.test"], &msg).await;
        deferred_saying(&mut d, words);
        let sent = api.sent(n + 1).await;
        assert!(
            strip_received(&sent[n].mime) == &msg[..],
            "changed on the way"
        );
        d.wait_log("relay_event=\"delivered\"");
    }
    // Part of the first chunk, then part of the last: resumed where the session's Range says, no deferral.
    api.script_chunks(vec![
        Chunk::Keeps(300_000),
        Chunk::Taken,
        Chunk::Keeps(1000),
    ]);
    send_to(d.addr, &["ops@example.test"], &msg).await;
    let sent = api.sent(4).await;
    assert!(
        strip_received(&sent[3].mime) == &msg[..],
        "changed on the way"
    );
    d.wait_log("relay_event=\"delivered\"");
    none_deferred(&d);
    none_dead_nor_bounced(&d, dir.path(), &sent);
    assert!(api.errors().is_empty(), "{:?}", api.errors());
    assert_eq!(d.terminate().code(), Some(0));
}

/// A server error to a resumable chunk (Google's front end failing after its back end took the bytes): relay
/// asks the session what it holds and goes on from there, in the same attempt. After the last chunk the session
/// says the message was sent: it is delivered once, not uploaded again in a new session (which sent it twice).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gmail_resumable_upload_resumes_after_a_server_error_and_never_sends_twice() {
    let (_idp, api, mut d, dir) = daemon_through_api("google").await;
    let (msg, _) = scan(4_500_000);
    for (n, chunks) in [
        vec![Chunk::TakenButFails(503)],
        vec![Chunk::Taken, Chunk::TakenButFails(500)],
        vec![Chunk::Keeps(1000), Chunk::TakenButFails(502), Chunk::Taken],
        // The first status query refused (a proxy's 400): not the message's refusal; the next one answers.
        vec![Chunk::TakenButFails(503)],
    ]
    .into_iter()
    .enumerate()
    {
        if n == 3 {
            api.script_status_replies(vec![400]);
        }
        api.script_chunks(chunks.clone());
        send_to(d.addr, &["ops@example.test"], &msg).await;
        let delivered = d.wait_log("relay_event=\"delivered\"");
        assert!(
            delivered.contains("Gmail API 200 id"),
            "{chunks:?}: {delivered}"
        );
        let sent = api.sent(n + 1).await;
        assert_eq!(sent.len(), n + 1, "{chunks:?}: sent twice");
        assert!(
            strip_received(&sent[n].mime) == &msg[..],
            "changed on the way"
        );
    }
    none_deferred(&d);
    let sent = api.sent(4).await;
    none_dead_nor_bounced(&d, dir.path(), &sent);
    assert!(api.errors().is_empty(), "{:?}", api.errors());
    assert_eq!(d.terminate().code(), Some(0));
}

/// Gmail sends to every address of the headers: one the envelope does not name (a device sending one
/// transaction per recipient with a shared To:, or mail for that recipient routed through another account) is
/// taken out of To: and Cc: (Bcc: goes; the envelope's hidden ones come back in relay's own `Bcc:` line), display
/// names kept. Before, the message went to all of them: each recipient got a copy per transaction.
#[tokio::test]
async fn gmail_api_sends_to_the_envelope_not_to_every_header_address() {
    let (_idp, api, relay) = relay_through_api("google", "").await;
    let msg = b"From: scanner@lan.test\r\nTo: Only One <only@example.test>, notme@example.test\r\nCc: \"Doe, Jane\" <jane@example.test>,\r\n other@example.test\r\nBcc: secret@example.test\r\nSubject: shared\r\n\r\nhello\r\n";
    send_to(
        relay.addr(),
        &[
            "only@example.test",
            "jane@example.test",
            "hidden@example.test",
        ],
        msg,
    )
    .await;
    let sent = api.sent(1).await;
    let text = String::from_utf8_lossy(&sent[0].mime).into_owned();
    let head = &text[..text.find("\r\n\r\n").unwrap()];
    assert!(head.starts_with("Bcc: hidden@example.test\r\n"), "{head}");
    assert!(
        head.contains("\r\nTo: Only One <only@example.test>\r\n"),
        "{head}"
    );
    assert!(
        head.contains("\r\nCc: \"Doe, Jane\" <jane@example.test>\r\n"),
        "{head}"
    );
    for gone in ["notme@", "other@", "secret@"] {
        assert!(!head.contains(gone), "{gone} still named: {head}");
    }
    assert!(text.ends_with("Subject: shared\r\n\r\nhello\r\n"), "{text}");

    // Every header address is the envelope's, and one more is hidden: one Bcc: line names both (a message has
    // at most one), not the message's own and relay's.
    let msg = b"From: scanner@lan.test\r\nTo: only@example.test\r\nBcc: secret@example.test\r\nSubject: two\r\n\r\nhi\r\n";
    let to = [
        "only@example.test",
        "secret@example.test",
        "hidden@example.test",
    ];
    send_to(relay.addr(), &to, msg).await;
    let sent = api.sent(2).await;
    let text = String::from_utf8_lossy(&sent[1].mime).into_owned();
    let head = &text[..text.find("\r\n\r\n").unwrap()];
    assert_eq!(head.matches("Bcc:").count(), 1, "{head}");
    assert!(
        head.starts_with("Bcc: secret@example.test, hidden@example.test\r\n"),
        "{head}"
    );
}

#[tokio::test]
async fn gmail_api_media_and_resumable_uploads_and_its_size_limit() {
    let (_idp, api, relay) = relay_through_api("google", "").await;
    let small = b"From: scanner@lan.test\r\nTo: ops@example.test\r\nSubject: 1k\r\n\r\nhello\r\n";
    send_to(
        relay.addr(),
        &["ops@example.test", "hidden@example.test"],
        small,
    )
    .await;
    let sent = api.sent(1).await;
    assert_eq!(sent[0].path, "media");
    assert!(
        sent[0]
            .mime
            .starts_with(b"Bcc: hidden@example.test\r\nReceived: ")
    );
    assert_eq!(strip_received(&sent[0].mime[26..]), &small[..]);

    let (big, _) = scan(6_000_000);
    send_to(relay.addr(), &["ops@example.test"], &big).await;
    let sent = api.sent(2).await;
    assert_eq!(sent[1].path, "resumable");
    assert!(
        strip_received(&sent[1].mime) == &big[..],
        "changed on the way"
    );

    // Over Gmail's 35 MB, under the listener's 60 MiB: refused at its end, where the device hears it (it was
    // taken with 250, then left in dead/ "Gmail takes at most 35 MB").
    let (too_big, _) = scan(27_000_000);
    let mut c = RawClient::ready(relay.addr()).await;
    c.cmd("MAIL FROM:<scanner@lan.test>", 250).await;
    c.cmd("RCPT TO:<ops@example.test>", 250).await;
    c.cmd("DATA", 354).await;
    c.send(&too_big).await;
    c.send(b".\r\n").await;
    let reply = c.expect(552).await;
    assert!(
        reply.starts_with(
            "552 5.3.4 Message size exceeds what its account can send (36700160 bytes at most)"
        ),
        "{reply}"
    );
    c.cmd("QUIT", 221).await;
    assert!(queued_in(&relay.state()).is_empty());
    assert!(files_in(&relay.state(), "dead").is_empty());
    assert!(api.errors().is_empty(), "{:?}", api.errors());
}

/// The real binary: SMTP AUTH refused tenant-wide (535 5.7.139), the message goes through Graph; then a 40 MiB
/// message goes through the upload path, and the daemon's peak memory stays within 1.5 × its size + 16 MiB.
/// Multi-threaded: the fakes must keep answering while the test thread waits for the daemon's log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtp_refused_falls_back_to_graph_and_a_40_mib_message_uploads_within_memory() {
    let idp = idp_issuing("tok").await;
    let api = FakeApi::start("tok", MAILBOX).await;
    let upstream = FakeUpstream::start(&["REFUSE 535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant. Visit https://aka.ms/smtp_auth_disabled for more information."]).await;
    let dir = tempfile::tempdir().unwrap();
    let t = smtp_falling_back_to_graph(dir.path(), &idp, upstream.addr.port(), &api);
    let config = config_file(dir.path(), &t);
    let mut daemon = Daemon::spawn(&config);
    let msg = b"From: scanner@lan.test\r\nTo: ops@example.test\r\nSubject: t\r\n\r\nhi\r\n";
    send_to(daemon.addr, &["ops@example.test"], msg).await;
    let line = daemon.wait_log("transport_switched");
    assert!(line.contains("5.7.139"), "{line}");
    let sent = api.sent(1).await;
    assert_eq!(strip_received(&sent[0].mime), &msg[..]);
    let out = std::process::Command::new(relay_bin())
        .args(["status", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let status = String::from_utf8_lossy(&out.stdout);
    assert!(
        status.contains("transport: graph (fallback since"),
        "{status}"
    );

    let (big, pdf) = scan(30 * 1024 * 1024);
    send_to(daemon.addr, &["ops@example.test"], &big).await;
    let sent = api.sent(2).await;
    assert_eq!(sent[1].path, "draft");
    assert!(
        sent[1].attachments[0].bytes == pdf && sent[1].attachments[0].how == "upload",
        "the 30 MiB attachment arrived changed"
    );
    assert_eq!(strip_received(&sent[1].mime), &without_pdf(&big)[..]);
    let hwm = proc_kib(daemon.pid(), "VmHWM:") * 1024;
    let limit = big.len() as u64 * 3 / 2 + (16 << 20);
    assert!(
        hwm <= limit,
        "peak RSS {} MiB over {} MiB for a {} MiB message",
        hwm >> 20,
        limit >> 20,
        big.len() >> 20
    );
    eprintln!(
        "peak RSS {} MiB for a {} MiB message",
        hwm >> 20,
        big.len() >> 20
    );
}

/// An SMTP account switched to Graph sends a message as a Graph draft whose `/send` Graph carries out but answers
/// with a 500 (the copy slow to show in Sent Items, so the attempt cannot tell). When SMTP's daily try comes (here:
/// a restart with the switch's last SMTP try two days back) and SMTP takes logins again, the message's kept
/// draft is asked through Graph first and found sent: the message is not sent again through SMTP. Before, SMTP's
/// try sent it a second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_graph_draft_is_asked_before_smtp_is_tried_again() {
    let idp = idp_issuing("tok").await;
    let api = FakeApi::start("tok", MAILBOX).await;
    let mut upstream = FakeUpstream::start(&["REFUSE 535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant."]).await;
    let dir = tempfile::tempdir().unwrap();
    let t = smtp_falling_back_to_graph(dir.path(), &idp, upstream.addr.port(), &api);
    let config = config_file(dir.path(), &t);
    let mut d = Daemon::spawn(&config);
    api.script_sent_then(vec![graph_500()]);
    api.late_copies(1000);
    let msg = b"From: scanner@lan.test\r\nTo: ops@example.test\r\nSubject: bcc\r\n\r\nhi\r\n";
    send_to(d.addr, &["ops@example.test", "audit@example.test"], msg).await;
    d.wait_log("transport_switched");
    deferred_saying(&mut d, &["does not say yet whether the draft was sent"]);
    assert_eq!(d.terminate().code(), Some(0));

    // SMTP takes logins again, its daily try is due, and the draft's copy is now in Sent Items.
    *upstream.tokens.lock().unwrap() = vec!["tok".into()];
    let switch = dir.path().join("state/accounts/office.transport.json");
    let mut sw: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&switch).unwrap()).unwrap();
    let long_ago = SystemTime::now() - Duration::from_secs(2 * 86_400);
    sw["smtp_tried"] = humantime::format_rfc3339_seconds(long_ago)
        .to_string()
        .into();
    std::fs::write(&switch, sw.to_string()).unwrap();
    api.copies_now();
    let mut d = Daemon::spawn(&config);
    let line = d.wait_log("relay_event=\"delivered\"");
    assert!(line.contains("earlier attempt made was sent"), "{line}");
    assert_eq!(api.sent(1).await.len(), 1);
    assert!(
        upstream.received.try_recv().is_err(),
        "sent again through SMTP"
    );
    assert_eq!(d.terminate().code(), Some(0));
}

/// Below their single-request limits, Graph's `sendMail` (base64 MIME) and the Gmail API's media upload are read
/// from the queue file while they are sent, as SMTP's are: the daemon's peak memory grows by less than the
/// message (measured: 1.2 MiB for 2.7 MiB through Graph, 0.6 MiB for 4.8 MiB through Gmail; holding it whole,
/// and Graph's base64 beside it, had grown 6.7 MiB for the same 2.7 MiB).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_request_uploads_are_read_from_the_queue_file_as_they_go() {
    // (provider, transport lines, PDF size: the message just under the request limit, path at the fake)
    let cases = [
        (
            "microsoft",
            "transport = \"graph\"\ngraph_url",
            2_100_000,
            "sendMail",
        ),
        (
            "google",
            "scope = \"https://mail.google.com/\"\ntransport = \"gmail_api\"\ngmail_api_url",
            3_700_000,
            "media",
        ),
    ];
    for (provider, lines, pdf_size, path) in cases {
        let idp = idp_issuing("tok").await;
        let api = FakeApi::start("tok", MAILBOX).await;
        let dir = tempfile::tempdir().unwrap();
        let t = top(
            dir.path(),
            &idp.uri(),
            provider,
            &format!("{lines} = \"{}\"", api.uri()),
        );
        let config = dir.path().join("relay.toml");
        let state = dir.path().join("state");
        std::fs::write(&config, format!("state_dir = {state:?}\n{t}\n{LISTENER}")).unwrap();
        let daemon = Daemon::spawn(&config);
        // The first delivery sets up what every later one shares (the token, the HTTP client's connection).
        let small = b"From: scanner@lan.test\r\nTo: ops@example.test\r\nSubject: t\r\n\r\nhi\r\n";
        send_to(daemon.addr, &["ops@example.test"], small).await;
        api.sent(1).await;
        let before = proc_kib(daemon.pid(), "VmHWM:") * 1024;

        let (msg, _) = scan(pdf_size);
        send_to(daemon.addr, &["ops@example.test"], &msg).await;
        let sent = api.sent(2).await;
        assert_eq!(sent[1].path, path, "{provider}");
        assert!(
            strip_received(&sent[1].mime) == &msg[..],
            "{provider}: changed on the way"
        );
        let grown = (proc_kib(daemon.pid(), "VmHWM:") * 1024).saturating_sub(before);
        eprintln!(
            "{provider}: peak RSS grew {} KiB for a {} KiB message",
            grown >> 10,
            msg.len() >> 10
        );
        assert!(
            grown < msg.len() as u64 * 3 / 4,
            "{provider}: peak RSS grew {} KiB for a {} KiB message",
            grown >> 10,
            msg.len() >> 10
        );
        assert!(api.errors().is_empty(), "{provider}: {:?}", api.errors());
    }
}

/// An account on Graph since SMTP AUTH was refused tries SMTP again daily. When that try fails for another reason
/// (here the SMTP upstream cannot be reached at all), the account stays on Graph and the message goes through it
/// at once: before, any failure but an AUTH refusal was taken for "SMTP AUTH works again", the account went back
/// to an SMTP upstream it could not reach, and its mail waited there with Graph working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switched_accounts_daily_smtp_try_that_cannot_connect_stays_on_graph() {
    let idp = idp_issuing("tok").await;
    let api = FakeApi::start("tok", MAILBOX).await;
    let dir = tempfile::tempdir().unwrap();
    let t = smtp_falling_back_to_graph(dir.path(), &idp, free_port(), &api);
    let state = dir.path().join("state");
    std::fs::create_dir_all(state.join("accounts")).unwrap();
    // Switched two days ago, SMTP last tried then: today's try is due with the first message.
    let then =
        humantime::format_rfc3339_seconds(SystemTime::now() - Duration::from_secs(2 * 86_400));
    std::fs::write(
        state.join("accounts/office.transport.json"),
        format!(
            r#"{{"transport":"graph","since":"{then}","smtp_tried":"{then}","reason":"535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant."}}"#
        ),
    )
    .unwrap();
    let config = dir.path().join("relay.toml");
    std::fs::write(&config, format!("state_dir = {state:?}\n{t}\n{LISTENER}")).unwrap();
    let mut daemon = Daemon::spawn(&config);
    let msg = b"From: scanner@lan.test\r\nTo: ops@example.test\r\nSubject: t\r\n\r\nhi\r\n";
    send_to(daemon.addr, &["ops@example.test"], msg).await;
    let sent = api.sent(1).await;
    assert_eq!(strip_received(&sent[0].mime), &msg[..]);
    daemon.wait_log("relay_event=\"delivered\"");
    let restored: Vec<&String> = daemon
        .unmatched()
        .iter()
        .filter(|l| l.contains("transport_restored") || l.contains("relay_event=\"deferred\""))
        .collect();
    assert!(restored.is_empty(), "{restored:?}");
    let switch = std::fs::read_to_string(state.join("accounts/office.transport.json")).unwrap();
    let switch: serde_json::Value = serde_json::from_str(&switch).unwrap();
    assert_eq!(switch["transport"], "graph", "{switch}");
    assert_ne!(
        switch["smtp_tried"],
        then.to_string(),
        "tried today: {switch}"
    );
    assert_eq!(daemon.terminate().code(), Some(0));
}

/// SIGTERM, and the exit status within `bound` (the drain of a delivery whose answer never comes is 20 s).
fn stop_within(mut d: Daemon, bound: Duration) -> std::process::ExitStatus {
    // SAFETY: kill with the pid of our own child and a valid signal.
    assert_eq!(unsafe { libc::kill(d.pid() as i32, libc::SIGTERM) }, 0);
    let deadline = std::time::Instant::now() + bound;
    loop {
        if let Some(status) = d.child.try_wait().unwrap() {
            return status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "relay still running {bound:?} after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Sends `msg` to the daemon, whose Gmail account uploads it in two chunks, the first taken and the last's
/// answer held (`last`: [`Chunk::Held`] or [`Chunk::TakenButHeld`]), and kills the daemon (SIGKILL) once both
/// chunks came: the session is kept in the message's state, its last answer unheard.
async fn killed_mid_upload(d: Daemon, api: &FakeApi, msg: &[u8], last: Chunk) {
    api.script_chunks(vec![Chunk::Taken, last]);
    send_to(d.addr, &["ops@example.test"], msg).await;
    api.requests(2, is_chunk).await;
    drop(d);
}

/// Waits for the message's delivery and checks that the API got it once, unchanged; its delivered line. `case`
/// names the case in the assertions' messages.
async fn delivered_once(d: &mut Daemon, api: &FakeApi, msg: &[u8], case: &str) -> String {
    let line = d.wait_log("relay_event=\"delivered\"");
    let sent = api.sent(1).await;
    assert_eq!(sent.len(), 1, "{case}: sent twice");
    assert!(
        strip_received(&sent[0].mime) == msg,
        "{case}: changed on the way"
    );
    line
}

/// Resumable uploads begun (not a bounce's media upload: past `max_age` at once, it is tried once, at a moment of
/// its own, and was counted with the message's some of the time).
fn resumable_starts(api: &FakeApi) -> usize {
    api.log()
        .iter()
        .filter(|(m, p, _)| m == "POST" && p.ends_with("/messages/send?uploadType=resumable"))
        .count()
}

fn is_chunk(method: &str, path: &str) -> bool {
    method == "PUT" && path.starts_with("/gmail-session/")
}

/// The session URL (Google's carries its `upload_id`, a credential) is in no log line.
fn session_not_logged(lines: &[&String]) {
    for l in lines {
        assert!(!l.contains("SECRET-"), "the session URL was logged: {l}");
    }
}

/// A Gmail resumable upload whose last chunk's answer never comes (Google took the message, sent it, and the
/// answer is lost), and relay is stopped meanwhile (SIGTERM: the drain's 20 s run out). The session was kept with
/// the message's state before its first chunk (0640, never logged): the restarted relay asks that session first,
/// hears the message was sent, and removes it. One upload session, one message: before, the next attempt began
/// a new session and Gmail sent the message twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gmail_upload_cut_short_by_a_stop_is_asked_again_and_sent_once() {
    use std::os::unix::fs::PermissionsExt;
    let (_idp, api, d, dir) = daemon_through_api("google").await;
    let state = dir.path().join("state");
    let (msg, _) = scan(4_500_000);
    api.script_chunks(vec![Chunk::Taken, Chunk::TakenButHeld]);
    send_to(d.addr, &["ops@example.test"], &msg).await;
    // The fake has the whole message (sent); relay waits for its answer.
    api.sent(1).await;
    let kept = files_in(&state, "queue")
        .into_iter()
        .find(|f| f.ends_with(".state"))
        .expect("a state file with the session");
    let kept = state.join("queue").join(kept);
    let text = std::fs::read_to_string(&kept).unwrap();
    assert!(text.contains("upload_id=SECRET-"), "{text}");
    let mode = std::fs::metadata(&kept).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o640);
    let before: Vec<String> = d.unmatched().to_vec();
    let status = stop_within(d, Duration::from_secs(60));
    assert!(status.code().is_some(), "{status:?}");

    let mut d = Daemon::spawn(&dir.path().join("relay.toml"));
    let line = d.wait_log("relay_event=\"delivered\"");
    assert!(line.contains("Gmail API 200 id 18c0ffee"), "{line}");
    assert!(
        line.contains("upload session of an earlier attempt"),
        "{line}"
    );
    let sent = api.sent(1).await;
    assert_eq!(sent.len(), 1, "sent twice");
    assert!(
        strip_received(&sent[0].mime) == &msg[..],
        "changed on the way"
    );
    assert_eq!(resumable_starts(&api), 1, "a second upload session");
    assert!(
        files_in(&state, "queue").is_empty(),
        "{:?}",
        files_in(&state, "queue")
    );
    session_not_logged(
        &before
            .iter()
            .chain(d.unmatched())
            .chain([&line])
            .collect::<Vec<_>>(),
    );
    assert!(api.errors().is_empty(), "{:?}", api.errors());
    assert_eq!(d.terminate().code(), Some(0));
}

/// relay killed (a crash) while a resumable upload's last chunk is unanswered and not taken: the restarted relay
/// asks the kept session, which holds the first chunk, and sends only the rest in the same session. And when
/// Google has dropped the session meanwhile (404), a new upload begins, and the message is sent once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gmail_upload_cut_short_by_a_crash_resumes_its_session_or_begins_anew_if_gone() {
    let (msg, _) = scan(4_500_000);
    for gone in [false, true] {
        let (_idp, api, d, dir) = daemon_through_api("google").await;
        killed_mid_upload(d, &api, &msg, Chunk::Held).await;
        if gone {
            api.drop_gmail_sessions();
        }
        let mut d = Daemon::spawn(&dir.path().join("relay.toml"));
        let line = delivered_once(&mut d, &api, &msg, &format!("gone {gone}")).await;
        if gone {
            assert!(!line.contains("earlier attempt"), "{line}");
            assert_eq!(resumable_starts(&api), 2);
            // The first run's two chunks, the status query (404), the new session's two chunks.
            let chunks = api.log().iter().filter(|(m, p, _)| is_chunk(m, p)).count();
            assert_eq!(chunks, 5, "{:?}", api.log());
        } else {
            assert!(
                line.contains("resumed the upload session of an earlier attempt at byte 4194304"),
                "{line}"
            );
            assert_eq!(resumable_starts(&api), 1, "a second upload session");
            // A status query, then the last chunk only.
            let chunks = api.log().iter().filter(|(m, p, _)| is_chunk(m, p)).count();
            assert_eq!(chunks, 4, "{:?}", api.log());
        }
        none_deferred(&d);
        session_not_logged(&d.unmatched().iter().chain([&line]).collect::<Vec<_>>());
        assert!(api.errors().is_empty(), "{:?}", api.errors());
        assert_eq!(d.terminate().code(), Some(0));
    }
}

/// The message's `ID.state` in the queue (one message queued), read.
fn kept_state(state: &std::path::Path) -> (std::path::PathBuf, serde_json::Value) {
    let name = files_in(state, "queue")
        .into_iter()
        .find(|f| f.ends_with(".state"))
        .expect("a state file with the session");
    let path = state.join("queue").join(name);
    let json = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    (path, json)
}

fn status_queries(api: &FakeApi) -> usize {
    // The fake logs method and path only: a status query is a chunk request the fake answered as one, counted
    // by the caller from the totals it expects.
    api.log().iter().filter(|(m, p, _)| is_chunk(m, p)).count()
}

/// relay killed while Google had the whole message (sent) but its answer was not heard; after the restart, the
/// kept session answers its status queries with server errors only: the attempt is deferred with the session
/// kept (no new upload, which would send the message twice), and the next attempt asks again and hears it was
/// sent. And a kept session whose answer is a 2xx too long to be Gmail's (a proxy's page; the session holds
/// only the first chunk) is no answer either: not taken as sent (the message would be lost), asked again, and
/// resumed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_gmail_session_without_a_clear_answer_is_asked_again_not_uploaded_anew() {
    let (msg, _) = scan(4_500_000);
    for sent_already in [true, false] {
        let (_idp, api, d, dir) = daemon_through_api("google").await;
        let held = if sent_already {
            Chunk::TakenButHeld
        } else {
            Chunk::Held
        };
        killed_mid_upload(d, &api, &msg, held).await;
        if sent_already {
            api.script_status_replies(vec![503, 500, 503]);
        } else {
            api.script_status_answers(vec![
                ResponseTemplate::new(200).set_body_bytes(vec![b' '; 2 << 20]),
            ]);
        }
        let mut d = Daemon::spawn(&dir.path().join("relay.toml"));
        let why = deferred_saying(
            &mut d,
            &["gave no clear answer", "asked again at the next attempt"]
                [usize::from(!sent_already)..],
        );
        if !sent_already {
            assert!(why.contains("cut off or too long"), "{why}");
        }
        // Still kept, for the next attempt.
        let (_, state) = kept_state(&dir.path().join("state"));
        assert!(
            state["upload"]["url"]
                .as_str()
                .is_some_and(|u| u.contains("upload_id=SECRET-s")),
            "{state}"
        );
        let line =
            delivered_once(&mut d, &api, &msg, &format!("sent_already {sent_already}")).await;
        assert_eq!(resumable_starts(&api), 1, "a second upload session");
        if sent_already {
            assert!(
                line.contains("sent by the upload session of an earlier attempt"),
                "{line}"
            );
            // Two chunks, three status queries unanswered, one answered.
            assert_eq!(status_queries(&api), 6, "{:?}", api.log());
        } else {
            assert!(
                line.contains("resumed the upload session of an earlier attempt at byte 4194304"),
                "{line}"
            );
            // Two chunks, the status query with the long 2xx, the one with the 308, the last chunk.
            assert_eq!(status_queries(&api), 5, "{:?}", api.log());
        }
        assert!(files_in(&dir.path().join("state"), "queue").is_empty());
        session_not_logged(
            &d.unmatched()
                .iter()
                .chain([&line, &why])
                .collect::<Vec<_>>(),
        );
        assert!(api.errors().is_empty(), "{:?}", api.errors());
        assert_eq!(d.terminate().code(), Some(0));
    }
}

/// A kept session's URL edited in `ID.state` to another host would get the account's bearer token with its
/// status query: it is not asked (a warning that shows no URL), and the message is uploaded anew. A session
/// begun over a week ago is past Google's lifetime: not asked either, uploaded anew. Sent once each time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_gmail_session_on_another_host_or_past_a_week_is_not_asked() {
    let (msg, _) = scan(4_500_000);
    let elsewhere = MockServer::start().await;
    for edit in ["host", "age"] {
        let (_idp, api, d, dir) = daemon_through_api("google").await;
        killed_mid_upload(d, &api, &msg, Chunk::Held).await;
        let (path, mut state) = kept_state(&dir.path().join("state"));
        let upload = &mut state["upload"];
        assert!(upload["begun_at"].is_string(), "{upload}");
        assert!(upload["fingerprint"].is_string(), "{upload}");
        if edit == "host" {
            let url = upload["url"]
                .as_str()
                .unwrap()
                .replace(&api.uri(), &elsewhere.uri());
            upload["url"] = url.into();
        } else {
            let week_ago = SystemTime::now() - Duration::from_secs(7 * 86_400 + 60);
            upload["begun_at"] = humantime::format_rfc3339(week_ago).to_string().into();
        }
        std::fs::write(&path, serde_json::to_vec(&state).unwrap()).unwrap();
        let mut d = Daemon::spawn(&dir.path().join("relay.toml"));
        let line = d.wait_log("relay_event=\"delivered\"");
        assert!(!line.contains("earlier attempt"), "{edit}: {line}");
        let sent = api.sent(1).await;
        assert_eq!(sent.len(), 1, "{edit}: sent twice");
        assert!(
            strip_received(&sent[0].mime) == &msg[..],
            "changed on the way"
        );
        assert_eq!(resumable_starts(&api), 2, "{edit}");
        // The first run's two chunks and the new session's two: the kept session was not asked.
        assert_eq!(status_queries(&api), 4, "{edit}: {:?}", api.log());
        let asked_elsewhere = elsewhere.received_requests().await.unwrap_or_default();
        assert!(
            asked_elsewhere.is_empty(),
            "{edit}: the token went to another host"
        );
        let warned: Vec<&String> = d
            .unmatched()
            .iter()
            .filter(|l| l.contains("not on the scheme, host and port of gmail_api_url"))
            .collect();
        assert_eq!(
            warned.len(),
            usize::from(edit == "host"),
            "{edit}: {warned:?}"
        );
        for l in d.unmatched().iter().chain([&line]) {
            assert!(
                !l.contains(&elsewhere.uri()),
                "{edit}: the URL was logged: {l}"
            );
        }
        session_not_logged(&d.unmatched().iter().chain([&line]).collect::<Vec<_>>());
        assert!(api.errors().is_empty(), "{:?}", api.errors());
        assert_eq!(d.terminate().code(), Some(0));
    }
}

/// The bytes of a resumable upload change while their length stays (a reload gives the account another mailbox
/// of the same length, and `rewrite_from = "header"` puts it in From:): the kept session, which holds the old
/// bytes' first chunk, is asked (it could have sent them) but not resumed, or the message would be the old
/// header spliced onto the rest. A new upload sends the new bytes, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_gmail_session_for_other_bytes_of_the_same_length_is_not_resumed() {
    let (msg, _) = scan(4_500_000);
    let (_idp, api, d, dir) = daemon_through_api_with("google", "rewrite_from = \"header\"").await;
    killed_mid_upload(d, &api, &msg, Chunk::Held).await;
    let config = dir.path().join("relay.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    let other = MAILBOX.replace(".com", ".org");
    assert_eq!(other.len(), MAILBOX.len());
    std::fs::write(&config, text.replace(MAILBOX, &other)).unwrap();
    let mut d = Daemon::spawn(&config);
    let line = d.wait_log("relay_event=\"delivered\"");
    assert!(!line.contains("earlier attempt"), "{line}");
    let sent = api.sent(1).await;
    assert_eq!(sent.len(), 1, "sent twice");
    let sent = String::from_utf8_lossy(&sent[0].mime);
    assert!(sent.contains(&other), "{}", &sent[..600]);
    assert!(!sent.contains(MAILBOX), "spliced: {}", &sent[..600]);
    assert!(sent.ends_with("--b1--\r\n"));
    assert_eq!(resumable_starts(&api), 2);
    // Two chunks, the status query, the new session's two.
    assert_eq!(status_queries(&api), 5, "{:?}", api.log());
    none_deferred(&d);
    assert!(api.errors().is_empty(), "{:?}", api.errors());
    assert_eq!(d.terminate().code(), Some(0));
}

/// A message whose Gmail upload was cut short (relay killed before the last chunk's answer) and which is past
/// `max_age` when relay starts again: its kept session is asked before it is bounced. The session that holds the
/// whole message sent it: delivered, nobody told it failed. One that holds only its first chunk did not: bounced
/// as expired, and not a byte more uploaded. One that gives no clear answer: deferred with the session kept (not
/// bounced for mail that may have gone), and asked again at the next retry step. And when the account that kept
/// the session is gone from the config, nobody can ask it: bounced at once, saying the session may have sent it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_message_asks_its_kept_gmail_session_before_it_is_bounced() {
    let (msg, _) = scan(4_500_000);
    for case in ["sent", "part", "unclear", "renamed", "host"] {
        let (_idp, api, d, dir) = daemon_through_api("google").await;
        let last = if case == "part" {
            Chunk::Held
        } else {
            Chunk::TakenButHeld
        };
        killed_mid_upload(d, &api, &msg, last).await;
        let config = dir.path().join("relay.toml");
        let mut text = std::fs::read_to_string(&config).unwrap();
        let queue = "[queue]\nretry = [\"1s\"]\n";
        assert!(text.contains(queue));
        // (An hour: the test reads the state file the deferral kept, then makes the message due itself; a step
        // of seconds raced the read on a loaded machine.)
        text = text.replace(queue, "[queue]\nretry = [\"1h\"]\nmax_age = \"0s\"\n");
        if case == "renamed" {
            text = text.replace("\"office\"", "\"office2\"");
        }
        std::fs::write(&config, text).unwrap();
        if case == "unclear" {
            api.script_status_replies(vec![503, 500, 503]);
        }
        if case == "host" {
            let (path, mut kept) = kept_state(&dir.path().join("state"));
            let url = kept["upload"]["url"]
                .as_str()
                .unwrap()
                .replace(&api.uri(), "http://127.0.0.1:9");
            kept["upload"]["url"] = url.into();
            std::fs::write(&path, serde_json::to_vec(&kept).unwrap()).unwrap();
        }
        let mut d = Daemon::spawn(&config);
        let state = dir.path().join("state");
        match case {
            "sent" => {
                let line = d.wait_log("relay_event=\"delivered\"");
                assert!(
                    line.contains("sent by the upload session of an earlier attempt"),
                    "{line}"
                );
                let sent = api.sent(1).await;
                none_dead_nor_bounced(&d, dir.path(), &sent);
                // The two chunks and one status query.
                assert_eq!(status_queries(&api), 3, "{:?}", api.log());
            }
            "part" => {
                let line = d.wait_log("relay_event=\"dead\"");
                assert!(line.contains("expired after 0s"), "{line}");
                assert!(line.contains("did not send it"), "{line}");
                // Its sender is told (the bounce itself expires at once with `max_age = 0s`: not sent here).
                d.wait_log("bounce_queued");
                // The two chunks and one status query (308, the first chunk held): nothing more uploaded.
                assert_eq!(status_queries(&api), 3, "{:?}", api.log());
                // The message's and the bounce's (expired too): no session URL kept in dead/.
                let dead = files_in(&state, "dead");
                let states: Vec<_> = dead.iter().filter(|f| f.ends_with(".state")).collect();
                assert!(!states.is_empty(), "{dead:?}");
                for f in states {
                    let kept = std::fs::read_to_string(state.join("dead").join(f)).unwrap();
                    assert!(!kept.contains("upload_id="), "{kept}");
                }
            }
            "host" => {
                let line = d.wait_log("relay_event=\"dead\"");
                assert!(line.contains("expired after 0s"), "{line}");
                assert!(line.contains("could not be asked"), "{line}");
                assert!(line.contains("may have sent"), "{line}");
                assert!(!line.contains("127.0.0.1:9"), "{line}");
                d.wait_log("bounce_queued");
                assert_eq!(status_queries(&api), 2, "{:?}", api.log());
            }
            "renamed" => {
                let line = d.wait_log("relay_event=\"dead\"");
                assert!(line.contains("expired after 0s"), "{line}");
                assert!(line.contains("account office kept"), "{line}");
                assert!(line.contains("may have sent"), "{line}");
                d.wait_log("bounce_queued");
                // Nothing asked, nothing uploaded: the first run's two chunks only.
                assert_eq!(status_queries(&api), 2, "{:?}", api.log());
            }
            _ => {
                let why = deferred_saying(&mut d, &["gave no clear answer", "past max_age"]);
                let (_, kept) = kept_state(&state);
                assert!(kept["upload"]["url"].is_string(), "{kept}");
                assert!(files_in(&state, "dead").is_empty());
                // Asked again at the next attempt: now it answers, and the message was sent.
                queue_retry(&config, "--all");
                let line = d.wait_log("relay_event=\"delivered\"");
                assert!(
                    line.contains("sent by the upload session of an earlier attempt"),
                    "{line}"
                );
                let sent = api.sent(1).await;
                none_dead_nor_bounced(&d, dir.path(), &sent);
                session_not_logged(&[&why]);
            }
        }
        assert_eq!(resumable_starts(&api), 1, "{case}: {:?}", api.log());
        session_not_logged(&d.unmatched().iter().collect::<Vec<_>>());
        assert!(api.errors().is_empty(), "{case}: {:?}", api.errors());
        assert_eq!(d.terminate().code(), Some(0), "{case}");
    }
}

/// A route of two Gmail API accounts. A message's upload through the first was cut short (relay killed before
/// the last chunk's answer); after the restart the first account is paused (the provider asked it to wait, on
/// file in `rate/office.pause`), so the second one takes the message. The first account's kept session is asked
/// first, with its token: when it holds the whole message (sent), the message is delivered and not uploaded again
/// (before, the second account uploaded it anew: sent twice); when it holds only the first chunk, the second
/// account uploads it, once; when it gives no clear answer, the message is deferred with the session kept, and
/// the next attempt asks again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_another_account_kept_is_asked_before_this_one_uploads_anew() {
    let (msg, _) = scan(4_500_000);
    let refusing = idp_issuing("not-the-api-token").await;
    for case in ["sent", "part", "unclear", "refused"] {
        let sent_already = !matches!(case, "part" | "refused");
        let idp = idp_issuing("tok").await;
        let api = FakeApi::start("tok", MAILBOX).await;
        let dir = tempfile::tempdir().unwrap();
        let t = top(dir.path(), &idp.uri(), "google", &through("google", &api));
        let first = &t[t.find("[[account]]").unwrap()..];
        let second = first.replace("name = \"office\"", "name = \"office2\"");
        assert_ne!(first, second);
        let config = dir.path().join("relay.toml");
        let state = dir.path().join("state");
        std::fs::write(
            &config,
            format!(
                "state_dir = {state:?}\n{t}\n{second}\n[[route]]\nsender = \"*\"\naccounts = [\"office\", \"office2\"]\n{LISTENER}"
            ),
        )
        .unwrap();
        let d = Daemon::spawn(&config);
        let last = if sent_already {
            Chunk::TakenButHeld
        } else {
            Chunk::Held
        };
        killed_mid_upload(d, &api, &msg, last).await;
        let (_, kept) = kept_state(&state);
        assert_eq!(kept["upload"]["account"], "office", "{kept}");
        std::fs::create_dir_all(state.join("rate")).unwrap();
        let until = SystemTime::now() + Duration::from_secs(3600);
        std::fs::write(
            state.join("rate/office.pause"),
            serde_json::json!({
                "until": humantime::format_rfc3339(until).to_string(),
                "reply": "Gmail API 429 rateLimitExceeded",
            })
            .to_string(),
        )
        .unwrap();
        if case == "unclear" {
            api.script_status_replies(vec![503, 500, 503]);
        }
        if case == "refused" {
            // The first account's grant now yields tokens the API refuses (a revoked consent, say).
            let text = std::fs::read_to_string(&config).unwrap();
            let url = format!("token_url = \"{}/token\"", idp.uri());
            let changed = text.replacen(
                &url,
                &format!("token_url = \"{}/token\"", refusing.uri()),
                1,
            );
            assert_ne!(changed, text);
            std::fs::write(&config, changed).unwrap();
            std::fs::remove_file(state.join("tokens/office.json")).unwrap();
        }
        let mut d = Daemon::spawn(&config);
        // The second account took the message (the first is paused), and asks the first's session.
        let asking = d.wait_log("asking the Gmail upload session another account kept");
        assert!(
            asking.contains("relay_account=office2 ") && asking.contains("kept_by=office"),
            "{asking}"
        );
        if case == "unclear" {
            // No clear answer: deferred for the session's account, not uploaded anew; asked again next time.
            let why = deferred_saying(&mut d, &["gave no clear answer"]);
            assert!(why.contains("relay_account=office "), "{why}");
            session_not_logged(&[&why]);
        }
        if case == "refused" {
            // Nobody can ask the session: the second account uploads the message anew, and says it may go twice.
            let warned = d.wait_log("that account's token is refused");
            assert!(warned.contains("goes twice"), "{warned}");
        }
        let line = delivered_once(&mut d, &api, &msg, case).await;
        if sent_already {
            assert!(
                line.contains("sent by the upload session of an earlier attempt"),
                "{line}"
            );
            assert!(line.contains("relay_account=office "), "{line}");
            assert_eq!(resumable_starts(&api), 1, "{:?}", api.log());
            // Two chunks, one status query answered (after three unanswered, "unclear").
            let asked = if case == "unclear" { 6 } else { 3 };
            assert_eq!(status_queries(&api), asked, "{:?}", api.log());
        } else {
            assert!(line.contains("relay_account=office2 "), "{line}");
            assert!(!line.contains("earlier attempt"), "{line}");
            assert_eq!(resumable_starts(&api), 2, "{:?}", api.log());
            if case == "part" {
                // Two chunks, the status query (308: the first chunk), the new session's two.
                assert_eq!(status_queries(&api), 5, "{:?}", api.log());
            }
        }
        if case != "unclear" {
            none_deferred(&d);
        }
        assert!(files_in(&state, "queue").is_empty());
        session_not_logged(&d.unmatched().iter().chain([&line]).collect::<Vec<_>>());
        if case != "refused" {
            assert!(api.errors().is_empty(), "{:?}", api.errors());
        }
        assert_eq!(d.terminate().code(), Some(0));
    }
}

fn graph_calls(api: &FakeApi, method: &str, path_end: &str) -> usize {
    api.log()
        .iter()
        .filter(|(m, p, _)| m == method && p.ends_with(path_end))
        .count()
}

/// relay killed while it uploads a large message's attachment into a Graph draft: the draft's id was kept in
/// the message's state (`draft`), so the restarted relay asks Graph about it, finds it still a draft (not sent),
/// removes it and sends the message once through a new draft. Before, every such crash left a half-built draft
/// with the device's mail in the mailbox's Drafts folder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graph_draft_left_by_a_kill_mid_upload_is_removed_and_the_message_sent_once() {
    let (_idp, api, d, dir) = daemon_through_api("microsoft").await;
    let state = dir.path().join("state");
    let (msg, pdf) = scan(4_500_000);
    api.hold_graph_chunks(1);
    send_to(d.addr, &["ops@example.test"], &msg).await;
    api.requests(1, |m, p| m == "PUT" && p.starts_with("/graph-upload/"))
        .await;
    let (_, kept) = kept_state(&state);
    assert_eq!(kept["drafts"][0]["id"], "AAMkAD1", "{kept}");
    assert_eq!(kept["drafts"][0]["account"], "office", "{kept}");
    assert!(kept["drafts"][0]["sent_at"].is_null(), "{kept}");
    drop(d);
    assert_eq!(api.drafts_left(), 1);

    let mut d = Daemon::spawn(&dir.path().join("relay.toml"));
    let line = d.wait_log("relay_event=\"delivered\"");
    assert!(line.contains("draft with 1 attachment"), "{line}");
    let sent = api.sent(1).await;
    assert_eq!(sent.len(), 1, "sent twice");
    assert!(
        sent[0].attachments[0].bytes == pdf,
        "the PDF arrived changed"
    );
    assert_eq!(api.drafts_left(), 0, "a draft left in the mailbox");
    assert_eq!(graph_calls(&api, "GET", "/messages/AAMkAD1"), 1);
    assert_eq!(graph_calls(&api, "DELETE", "/messages/AAMkAD1"), 1);
    assert!(files_in(&state, "queue").is_empty());
    none_deferred(&d);
    assert!(api.errors().is_empty(), "{:?}", api.errors());
    assert_eq!(d.terminate().code(), Some(0));
}

/// A draft's `/send` that Graph carried out but answered with a 500, or whose answer never came before relay
/// was killed: the draft (made with an immutable id, which its copy in Sent Items keeps) is asked, found sent,
/// and the message counts as delivered, not sent a second time. Its copy in Sent Items is left alone. And when
/// the copy shows only later (Graph moves a sent draft to Sent Items "after it has gone out"), the message waits
/// and is asked again, neither sent anew nor its draft removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graph_draft_sent_without_a_clear_answer_is_not_sent_twice() {
    // An envelope recipient the headers do not name: the message goes as a draft, its recipients patched.
    let msg = b"From: scanner@lan.test\r\nTo: ops@example.test\r\nSubject: bcc\r\n\r\nhi\r\n";
    let rcpt = ["ops@example.test", "audit@example.test"];
    for case in ["500", "killed", "late copy"] {
        let (_idp, api, mut d, dir) = daemon_through_api("microsoft").await;
        let answer = if case == "killed" {
            ResponseTemplate::new(202).set_delay(common::http_api::HELD)
        } else {
            graph_error(
                500,
                "InternalServerError",
                "An internal server error occurred.",
            )
        };
        api.script_sent_then(vec![answer]);
        if case == "late copy" {
            api.late_copies(2);
        }
        send_to(d.addr, &rcpt, msg).await;
        api.sent(1).await;
        let line = match case {
            "killed" => {
                drop(d);
                d = Daemon::spawn(&dir.path().join("relay.toml"));
                let line = d.wait_log("relay_event=\"delivered\"");
                assert!(line.contains("earlier attempt made was sent"), "{line}");
                line
            }
            "500" => {
                let line = d.wait_log("relay_event=\"delivered\"");
                assert!(line.contains("the draft, asked, was sent"), "{line}");
                assert!(line.contains("Graph 500"), "{line}");
                none_deferred(&d);
                line
            }
            _ => {
                deferred_saying(
                    &mut d,
                    &["Graph 500", "does not say yet whether the draft was sent"],
                );
                deferred_saying(
                    &mut d,
                    &[
                        "is not found",
                        "asked again before the message is sent anew",
                    ],
                );
                let line = d.wait_log("relay_event=\"delivered\"");
                assert!(line.contains("earlier attempt made was sent"), "{line}");
                line
            }
        };
        let sent = api.sent(1).await;
        assert_eq!(sent.len(), 1, "{case}: sent twice: {line}");
        let asked = graph_calls(&api, "GET", "/messages/AAMkAD1");
        assert_eq!(asked, if case == "late copy" { 3 } else { 1 }, "{case}");
        assert_eq!(
            graph_calls(&api, "DELETE", "/messages/AAMkAD1"),
            0,
            "{case}"
        );
        assert_eq!(
            graph_calls(&api, "POST", "/messages"),
            1,
            "{case}: a second draft"
        );
        assert!(files_in(&dir.path().join("state"), "queue").is_empty());
        assert!(api.errors().is_empty(), "{:?}", api.errors());
        assert_eq!(d.terminate().code(), Some(0));
    }
}

/// A draft's `/send` answered with a 500 that Graph did not carry out: the draft stays a draft. It is kept and
/// asked again (Graph may be slow to move a sent one) until the time for that is over; then it is removed and
/// the message goes through a new draft, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graph_draft_not_sent_after_a_500_is_removed_once_graph_had_time_and_sent_anew() {
    let msg = b"From: scanner@lan.test\r\nTo: ops@example.test\r\nSubject: bcc\r\n\r\nhi\r\n";
    let (_idp, api, d, dir) = daemon_through_api("microsoft").await;
    drop(d);
    let mut d = Daemon::spawn_with(&dir.path().join("relay.toml"), |c| {
        c.env("RELAY_TEST_GRAPH_SEND_SETTLES_MS", "1500");
    });
    api.script(vec![graph_500()]);
    send_to(d.addr, &["ops@example.test", "audit@example.test"], msg).await;
    deferred_saying(
        &mut d,
        &["Graph 500", "does not say yet whether the draft was sent"],
    );
    let line = d.wait_log("relay_event=\"delivered\"");
    assert!(line.contains("Graph 202 Accepted"), "{line}");
    let sent = api.sent(1).await;
    assert_eq!(sent.len(), 1);
    assert_eq!(graph_calls(&api, "DELETE", "/messages/AAMkAD1"), 1);
    assert_eq!(graph_calls(&api, "POST", "/messages"), 2);
    assert_eq!(api.drafts_left(), 0);
    assert!(api.errors().is_empty(), "{:?}", api.errors());
    assert_eq!(d.terminate().code(), Some(0));
}

/// A page where the API's answer was due (a proxy's, a captive portal's) is not taken for the API's: a Gmail
/// API 200 too long to be Gmail's, a Gmail 200 before the upload's last chunk, a Graph 202 that is an HTML page,
/// a Graph upload chunk answered by a page. Each was taken as sent (the message lost) or led the message to
/// dead/; now it is deferred, and the next attempt sends it, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_where_the_apis_answer_was_due_are_not_taken_as_sent() {
    use common::http_api::page;
    let small =
        b"From: scanner@lan.test\r\nTo: ops@example.test\r\nSubject: s\r\n\r\nhi\r\n".to_vec();
    let (large, _) = scan(4_500_000);
    let long_page = ResponseTemplate::new(200).set_body_raw(vec![b'x'; 1_200_000], "text/html");
    let cases: Vec<(&str, &str, Vec<u8>, &[&str])> = vec![
        (
            "google",
            "long 200",
            small.clone(),
            &["Gmail API 200", "not Gmail's"],
        ),
        (
            "google",
            "200 before the last chunk",
            large.clone(),
            &["before the last chunk"],
        ),
        (
            "microsoft",
            "202 page",
            small.clone(),
            &["Graph 202", "not Graph's own"],
        ),
        (
            "microsoft",
            "chunk page",
            large.clone(),
            &["Graph upload 200", "not Graph's answer"],
        ),
    ];
    for (provider, case, msg, words) in cases {
        let (_idp, api, mut d, dir) = daemon_through_api(provider).await;
        match case {
            "long 200" => api.script(vec![long_page.clone()]),
            "200 before the last chunk" => api.script_chunks(vec![Chunk::Page]),
            "202 page" => api.script(vec![page(202)]),
            _ => api.script_graph_chunks(vec![page(200)]),
        }
        send_to(d.addr, &["ops@example.test"], &msg).await;
        let line = d.wait_log("relay_event=\"deferred\"");
        for w in words {
            assert!(line.contains(w), "{case}: {w:?} not in {line}");
        }
        d.wait_log("relay_event=\"delivered\"");
        let sent = api.sent(1).await;
        assert_eq!(sent.len(), 1, "{case}");
        none_dead_nor_bounced(&d, dir.path(), &sent);
        assert_eq!(api.drafts_left(), 0, "{case}");
        assert_eq!(d.terminate().code(), Some(0));
    }
}

/// A Gmail 200 typed JSON whose body does not parse is taken as sent, as one cut off is: it was tried again, and
/// the message arrived twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gmail_200_whose_json_does_not_parse_is_taken_as_sent_not_sent_twice() {
    let (_idp, api, mut d, _dir) = daemon_through_api("google").await;
    api.script(vec![
        ResponseTemplate::new(200).set_body_raw(b"{\"id\": \"18c".to_vec(), "application/json"),
    ]);
    let small = b"From: scanner@lan.test\r\nTo: ops@example.test\r\nSubject: s\r\n\r\nhi\r\n";
    send_to(d.addr, &["ops@example.test"], small).await;
    let line = d.wait_log_any(&["relay_event=\"delivered\"", "relay_event=\"deferred\""]);
    assert!(
        line.contains("relay_event=\"delivered\"")
            && line.contains("does not parse; taken as sent"),
        "{line}"
    );
    let log = d.terminate_with_log();
    assert!(
        !log.iter().any(|l| l.contains("relay_event=\"deferred\"")),
        "{log:#?}"
    );
    assert!(api.errors().is_empty(), "{:?}", api.errors());
}

/// A route of two Graph accounts: `a` sends the message as a draft whose `/send` Graph carries out but answers
/// with a 500, and the draft's copy is slow to show in Sent Items. `a` is at its per-minute limit when the message
/// comes due again, so `b` takes it: `b` first asks `a`'s draft, through `a`, waits while Graph does not yet say,
/// and finds it sent. Before, `b` made a draft of its own and the message went twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_account_of_the_route_asks_the_draft_a_first_one_sent_before_sending() {
    let idp = idp_issuing("tok").await;
    let api = FakeApi::start("tok", MAILBOX).await;
    let dir = tempfile::tempdir().unwrap();
    secret(dir.path());
    let account = |name: &str, more: &str| {
        format!(
            "[[account]]\nname = \"{name}\"\nprovider = \"microsoft\"\ntenant = \"contoso.onmicrosoft.com\"\nflow = \"client_credentials\"\nmailbox = \"{MAILBOX}\"\nclient_id = \"cid\"\nclient_secret_file = \"{}/secret\"\ntoken_url = \"{}/token\"\ntransport = \"graph\"\ngraph_url = \"{}\"\n{more}\n",
            dir.path().display(),
            idp.uri(),
            api.uri()
        )
    };
    let config = dir.path().join("relay.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = {:?}\n[queue]\nretry = [\"1s\"]\n{}{}[[route]]\naccounts = [\"a\", \"b\"]\n{LISTENER}",
            dir.path().join("state"),
            account("a", "rate = { per_minute = 1 }"),
            account("b", "rate = { per_minute = 1 }"),
        ),
    )
    .unwrap();
    let mut d = Daemon::spawn(&config);
    api.script_sent_then(vec![graph_500()]);
    api.late_copies(3);
    let msg = b"From: scanner@lan.test\r\nTo: ops@example.test\r\nSubject: bcc\r\n\r\nhi\r\n";
    send_to(d.addr, &["ops@example.test", "audit@example.test"], msg).await;
    let first = deferred_saying(&mut d, &["does not say yet whether the draft was sent"]);
    let (first_account, other) = if first.contains("relay_account=a") {
        ("a", "b")
    } else {
        ("b", "a")
    };
    let asked = d.wait_log("asking the Graph draft another account kept");
    assert!(asked.contains(&format!("relay_account={other}")), "{asked}");
    assert!(
        asked.contains(&format!("kept_by={first_account}")),
        "{asked}"
    );
    let line = d.wait_log("relay_event=\"delivered\"");
    assert!(line.contains("earlier attempt made was sent"), "{line}");
    let sent = api.sent(1).await;
    assert_eq!(sent.len(), 1, "sent twice");
    assert_eq!(graph_calls(&api, "POST", "/messages"), 1, "a second draft");
    assert_eq!(graph_calls(&api, "DELETE", "/messages/AAMkAD1"), 0);
    assert!(api.errors().is_empty(), "{:?}", api.errors());
    assert_eq!(d.terminate().code(), Some(0));
}

/// The Gmail API sends to every address the header names. A header section relay cannot edit (a line that is
/// not a field, as devices that fold without indenting write) naming a recipient the envelope does not: the
/// message is refused with the reason, not sent to that recipient too. Sent before, silently.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gmail_api_refuses_a_header_it_cannot_narrow_to_the_envelope() {
    let (_idp, api, mut d, dir) = daemon_through_api("google").await;
    let msg = b"From: scanner@lan.test\r\nTo: ops@example.test\r\nSubject: scan\r\nX-Broken line without colon\r\nBcc: secret@example.test\r\n\r\nhi\r\n";
    send_to(d.addr, &["ops@example.test"], msg).await;
    let line = d.wait_log("relay_event=\"dead\"");
    assert!(
        line.contains("secret@example.test") && line.contains("cannot take them out"),
        "{line}"
    );
    // Whatever the API got is the bounce to the sender, never the message.
    let log = api.log();
    let posts = log.iter().filter(|(m, _, _)| m == "POST").count();
    if posts > 0 {
        let sent = api.sent(posts).await;
        assert!(
            sent.iter()
                .all(|s| String::from_utf8_lossy(&s.mime).contains("multipart/report")),
            "the message itself was sent"
        );
    }
    assert_eq!(files_in(&dir.path().join("state"), "dead").len(), 2);
    assert_eq!(d.terminate().code(), Some(0));
}

/// A message whose Graph draft was sent without a clear answer, and that reaches `max_age` while Graph still does
/// not say whether the draft went: moved to dead/ (it is not asked past max_age), but its reason, and so the
/// bounce, says it may have been delivered, not that it failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_expiring_with_a_draft_sent_unclearly_says_it_may_have_gone() {
    let idp = idp_issuing("tok").await;
    let api = FakeApi::start("tok", MAILBOX).await;
    let dir = tempfile::tempdir().unwrap();
    let t = top(
        dir.path(),
        &idp.uri(),
        "microsoft",
        &through("microsoft", &api),
    )
    .replace("[queue]\n", "[queue]\nmax_age = \"3s\"\n");
    let config = config_file(dir.path(), &t);
    let mut d = Daemon::spawn(&config);
    // Not carried out, and the draft stays a draft: within its 15 minutes it is only asked.
    api.script(vec![graph_500()]);
    let msg = b"From: scanner@lan.test\r\nTo: ops@example.test\r\nSubject: bcc\r\n\r\nhi\r\n";
    send_to(d.addr, &["ops@example.test", "audit@example.test"], msg).await;
    let line = d.wait_log("relay_event=\"dead\"");
    assert!(line.contains("it may have been delivered"), "{line}");
    assert_eq!(graph_calls(&api, "DELETE", "/messages/AAMkAD1"), 0);
    assert_eq!(d.terminate().code(), Some(0));
}
