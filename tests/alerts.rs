//! `[alerts]` and `bounce = "sender"` through the real binary: a fake webhook (wiremock) and a fake mailbox (a
//! fake upstream) receive one notice when an incident opens and one when it recovers, however many messages or
//! failures belong to it; a message refused with 550 comes back to its sender as an RFC 3464 report.

mod common;

use std::path::Path;
use std::time::{Duration, SystemTime};

use common::idp::{
    accounts_config, generic_account, idp_answering, idp_issuing, token, token_request,
    write_secret,
};
use common::upstream::FakeUpstream;
use common::*;
use mail_parser::MimeHeaders;
use wiremock::{MockServer, ResponseTemplate};

fn date_in(days: u64) -> String {
    humantime::format_rfc3339_seconds(SystemTime::now() + Duration::from_secs(days * 86_400))
        .to_string()[..10]
        .to_string()
}

const LISTENER: &str = "address = \"127.0.0.1:0\"\nauth = \"none\"";
const REFUSED: &str = "550 5.1.1 <x@bad.test>: Recipient address rejected: no such user";

/// A config with one account, `office` (with `flow`), and `[alerts]` posting to a fake webhook, plus `extra`
/// keys; and that webhook.
async fn office_with_alerts(
    dir: &Path,
    idp: &MockServer,
    upstream: &FakeUpstream,
    flow: &str,
    extra: &str,
) -> (std::path::PathBuf, MockServer) {
    write_secret(dir);
    let hook = fake_webhook().await;
    let text = format!(
        "default_account = \"office\"\n{}[alerts]\nwebhook_url = \"{}/hook\"\n{extra}",
        generic_account("office", &idp.uri(), upstream, flow),
        hook.uri()
    );
    (write_config_with(dir, &text, LISTENER), hook)
}

/// The JSON bodies the webhook received, in order.
async fn notices(hook: &MockServer) -> Vec<serde_json::Value> {
    hook.received_requests()
        .await
        .unwrap()
        .iter()
        .map(|r| serde_json::from_slice(&r.body).expect("a JSON body"))
        .collect()
}

/// Sends a message from `from` to `to` and returns its queue id.
async fn send(addr: std::net::SocketAddr, from: &str, to: &str) -> String {
    let mut c = RawClient::ready(addr).await;
    c.cmd(&format!("MAIL FROM:<{from}>"), 250).await;
    c.cmd(&format!("RCPT TO:<{to}>"), 250).await;
    c.cmd("DATA", 354).await;
    c.send(
        format!("From: <{from}>\r\nTo: <{to}>\r\nSubject: scan 42\r\n\r\nhello\r\n.\r\n")
            .as_bytes(),
    )
    .await;
    let reply = c.expect(250).await;
    c.cmd("QUIT", 221).await;
    reply.trim_end().rsplit(' ').next().unwrap().to_string()
}

/// Two accounts: `good` (the default, with a valid token already) and `bad`, whose upstream refuses every
/// message for good; mail to `*@bad.test` goes through `bad`. `more` adds top-level keys and tables.
struct TwoAccounts {
    dir: tempfile::TempDir,
    good: FakeUpstream,
    _bad: FakeUpstream,
    _idp: MockServer,
    daemon: Daemon,
}

async fn two_accounts(top: &str, more: &str) -> TwoAccounts {
    let dir = tempfile::tempdir().unwrap();
    let idp = idp_issuing("tok").await;
    let good = FakeUpstream::start(&["tok"]).await;
    let bad = FakeUpstream::start(&["tok"]).await;
    *bad.data_reply.lock().unwrap() = REFUSED.to_string();
    let routes = format!("[[route]]\nrecipient = \"*@bad.test\"\naccount = \"bad\"\n{more}\n");
    let config = accounts_config(
        dir.path(),
        &idp.uri(),
        &[("good", &good), ("bad", &bad)],
        top,
        &routes,
    );
    let daemon = Daemon::spawn(&config);
    TwoAccounts {
        dir,
        good,
        _bad: bad,
        _idp: idp,
        daemon,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_messages_moved_to_dead_are_one_incident_by_webhook_and_mail_then_a_recovery() {
    let hook = fake_webhook().await;
    let alerts = format!(
        "[alerts]\nmail_to = \"admin@example.com\"\nwebhook_url = \"{}/hook\"\ndead_window = \"3s\"\n",
        hook.uri()
    );
    let mut t = two_accounts("", &alerts).await;
    for i in 0..5 {
        send(t.daemon.addr, "scanner@lan.test", &format!("x{i}@bad.test")).await;
    }
    for _ in 0..5 {
        t.daemon.wait_log("relay_event=\"dead\"");
    }
    // Opened once, by both channels; then, after 3 s without another, recovered once.
    for state in ["open", "recovered"] {
        let line = t.daemon.wait_log("relay_event=\"alert\"");
        assert!(line.contains(&format!("state=\"{state}\"")), "{line}");
        assert!(line.contains("incident=dead:bad"), "{line}");
        t.daemon
            .wait_log("relay_event=\"alert_sent\" channel=\"webhook\"");
        t.daemon
            .wait_log("relay_event=\"alert_sent\" channel=\"mail\"");
    }
    let got = notices(&hook).await;
    assert_eq!(
        got.len(),
        2,
        "one notice per state, not per message: {got:#?}"
    );
    let (open, recovered) = (&got[0], &got[1]);
    assert_eq!(open["event"], "dead");
    assert_eq!(open["account"], "bad");
    assert_eq!(open["incident"], "dead:bad");
    assert_eq!(open["state"], "open");
    assert_eq!(open["host"], "relay.test");
    assert!(
        open["text"].as_str().unwrap().contains("5.1.1 <x"),
        "{open}"
    );
    assert!(open["at"].as_str().unwrap().ends_with('Z'), "{open}");
    assert_eq!(recovered["incident"], "dead:bad");
    assert_eq!(recovered["state"], "recovered");
    assert_eq!(
        recovered["count"], 5,
        "the recovery counts the messages: {recovered}"
    );

    // The mail went through the healthy account, from its mailbox, to mail_to: the same two notices.
    for state in ["OPEN", "RECOVERED"] {
        let mail = t.good.next().await;
        assert_eq!(mail.from, "good@example.com");
        assert_eq!(mail.to, ["admin@example.com"]);
        let text = String::from_utf8_lossy(&mail.data);
        assert!(
            text.contains(&format!(
                "Subject: [relay relay.test] {state}: dead:bad\r\n"
            )),
            "{text}"
        );
        assert!(
            text.contains("From: relay on relay.test <good@example.com>\r\n"),
            "{text}"
        );
    }
    assert!(t.good.received.try_recv().is_err(), "no third mail");
    assert!(
        t.dir.path().join("state/alerts.json").exists(),
        "open incidents are kept across restarts"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_needed_is_announced_once_and_recovers_when_mail_flows_again() {
    let dir = tempfile::tempdir().unwrap();
    let idp = idp_answering(ResponseTemplate::new(400).set_body_json(serde_json::json!({
        "error": "invalid_grant", "error_description": "AADSTS70043: The refresh token has expired"
    })))
    .await;
    let mut upstream = FakeUpstream::start(&["fresh"]).await;
    let (config, hook) = office_with_alerts(dir.path(), &idp, &upstream, "device_code", "").await;
    // An expired access token with a refresh token: the refresher tries it at once, and the grant is refused.
    let state = dir.path().join("state");
    let past = SystemTime::now() - Duration::from_secs(7200);
    relay::tokens::TokenStore::new(&state)
        .save(
            "office",
            &relay::tokens::StoredTokens {
                access_token: "old".to_string().into(),
                expires_at: past + Duration::from_secs(3600),
                obtained_at: past,
                refresh_token: Some("dead-refresh".to_string().into()),
                last_refresh: Some(past),
                needs_authorization: false,
                last_error: None,
            },
        )
        .unwrap();
    let mut daemon = Daemon::spawn(&config);
    daemon.wait_log("relay_event=\"authorization_needed\"");
    let line = daemon.wait_log("relay_event=\"alert\"");
    assert!(line.contains("state=\"open\""), "{line}");
    // Mail waits meanwhile; its attempts do not announce the incident again.
    send(daemon.addr, "scanner@lan.test", "ops@example.com").await;
    daemon.wait_log("relay_event=\"deferred\"");
    let line = daemon.wait_log("relay_event=\"alert_sent\" channel=\"webhook\"");
    assert!(
        line.contains("incident=authorization_needed:office"),
        "{line}"
    );

    // `relay authorize` stores a new grant; the next message goes, and the incident recovers.
    write_valid_tokens(&state, "office", "fresh", Duration::from_secs(3600));
    send(daemon.addr, "scanner@lan.test", "ops@example.com").await;
    upstream.next().await;
    let line = daemon.wait_log("relay_event=\"alert\"");
    assert!(line.contains("state=\"recovered\""), "{line}");
    daemon.wait_log("relay_event=\"alert_sent\" channel=\"webhook\"");
    let got = notices(&hook).await;
    let states: Vec<_> = got
        .iter()
        .map(|n| {
            (
                n["incident"].as_str().unwrap(),
                n["state"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        states,
        [
            ("authorization_needed:office", "open"),
            ("authorization_needed:office", "recovered")
        ]
    );
    assert_eq!(got[0]["event"], "authorization_needed");
    assert!(
        got[0]["text"]
            .as_str()
            .unwrap()
            .contains("relay authorize office"),
        "the notice names the fix: {}",
        got[0]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_refresh_failures_open_one_incident_and_a_refresh_closes_it() {
    let dir = tempfile::tempdir().unwrap();
    let idp = MockServer::start().await;
    // Three failures, then tokens again.
    token_request()
        .respond_with(ResponseTemplate::new(503))
        .up_to_n_times(3)
        .with_priority(1)
        .mount(&idp)
        .await;
    token_request()
        .respond_with(token("tok"))
        .with_priority(2)
        .mount(&idp)
        .await;
    let upstream = FakeUpstream::start(&["tok"]).await;
    let (config, hook) = office_with_alerts(
        dir.path(),
        &idp,
        &upstream,
        "client_credentials",
        "refresh_failures = 3\n",
    )
    .await;
    // The refresher's tries fail three times in a row (a fifth of a second apart here, not 5, 10, 20 s), then
    // get a token; the messages' attempts meanwhile take its failures, asking nothing of their own.
    let mut daemon = Daemon::spawn_with(&config, |c| {
        c.env("RELAY_TEST_REFRESH_BACKOFF_MS", "200");
    });
    for _ in 0..3 {
        send(daemon.addr, "scanner@lan.test", "ops@example.com").await;
    }
    for _ in 0..3 {
        daemon.wait_log("relay_event=\"token_refresh_failed\"");
    }
    let line = daemon.wait_log("relay_event=\"alert\"");
    assert!(
        line.contains("incident=token_refresh_failed:office") && line.contains("state=\"open\""),
        "{line}"
    );
    daemon.wait_log("relay_event=\"token_refreshed\"");
    let line = daemon.wait_log("relay_event=\"alert\"");
    assert!(line.contains("state=\"recovered\""), "{line}");
    daemon.wait_log("relay_event=\"alert_sent\" channel=\"webhook\"");
    daemon.wait_log("relay_event=\"alert_sent\" channel=\"webhook\"");
    let got = notices(&hook).await;
    assert_eq!(got.len(), 2, "{got:#?}");
    assert_eq!(got[0]["event"], "token_refresh_failed");
    assert_eq!(got[1]["state"], "recovered");
}

/// One account whose upstream defers every message for now, `queue_age` at 2 s, and the alerts' webhook.
struct QueueAge {
    _dir: tempfile::TempDir,
    _idp: MockServer,
    upstream: FakeUpstream,
    config: std::path::PathBuf,
    hook: MockServer,
}

impl QueueAge {
    async fn new() -> QueueAge {
        let dir = tempfile::tempdir().unwrap();
        let idp = idp_issuing("tok").await;
        let upstream = FakeUpstream::start(&["tok"]).await;
        *upstream.data_reply.lock().unwrap() = "451 4.3.0 try again later".into();
        let (config, hook) = office_with_alerts(
            dir.path(),
            &idp,
            &upstream,
            "client_credentials",
            "queue_age = \"2s\"\n",
        )
        .await;
        QueueAge {
            _dir: dir,
            _idp: idp,
            upstream,
            config,
            hook,
        }
    }
}

/// The webhook answers its next `times` posts with `status`, then as before.
async fn webhook_answers(hook: &MockServer, status: u16, times: u64) {
    wiremock::Mock::given(wiremock::matchers::method("POST"))
        .respond_with(wiremock::ResponseTemplate::new(status))
        .up_to_n_times(times)
        .with_priority(1)
        .mount(hook)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_older_than_queue_age_is_announced_and_recovers_once_it_drains() {
    let QueueAge {
        _dir,
        _idp,
        mut upstream,
        config,
        hook,
    } = QueueAge::new().await;
    let mut daemon = Daemon::spawn(&config);
    send(daemon.addr, "scanner@lan.test", "ops@example.com").await;
    daemon.wait_log("relay_event=\"deferred\"");
    let line = daemon.wait_log("relay_event=\"alert\"");
    assert!(
        line.contains("incident=queue_age:queue") && line.contains("state=\"open\""),
        "{line}"
    );
    // The upstream takes mail again; a retry empties the queue.
    *upstream.data_reply.lock().unwrap() = "250 2.0.0 OK".into();
    queue_retry(&config, "--all");
    upstream.next().await;
    let line = daemon.wait_log("relay_event=\"alert\"");
    assert!(
        line.contains("incident=queue_age:queue") && line.contains("state=\"recovered\""),
        "{line}"
    );
    daemon.wait_log("relay_event=\"alert_sent\"");
    daemon.wait_log("relay_event=\"alert_sent\"");
    let got = notices(&hook).await;
    assert_eq!(got.len(), 2, "{got:#?}");
    assert_eq!(got[0]["event"], "queue_age");
    assert_eq!(got[0]["account"], serde_json::Value::Null);
}

/// A webhook that is down when an incident opens: the notice is tried again later instead of being lost, and
/// the recovery goes after it, never alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notice_the_webhook_could_not_take_is_sent_again_before_the_recovery() {
    let QueueAge {
        _dir,
        _idp,
        mut upstream,
        config,
        hook,
    } = QueueAge::new().await;
    // The first three posts (one notice's tries) fail.
    webhook_answers(&hook, 503, 3).await;
    let mut daemon = Daemon::spawn(&config);
    send(daemon.addr, "scanner@lan.test", "ops@example.com").await;
    daemon.wait_log("alert open: queue_age");
    daemon.wait_log("relay_event=\"alert_failed\"");
    daemon.wait_log("relay_event=\"alert_sent\" channel=\"webhook\" incident=queue_age:queue");
    *upstream.data_reply.lock().unwrap() = "250 2.0.0 OK".into();
    queue_retry(&config, "--all");
    upstream.next().await;
    daemon.wait_log("alert recovered: queue_age");
    daemon.wait_log("relay_event=\"alert_sent\" channel=\"webhook\" incident=queue_age:queue");
    let got = notices(&hook).await;
    let states: Vec<&str> = got
        .iter()
        .map(|n| n["state"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(
        states,
        ["open", "open", "open", "open", "recovered"],
        "three failed posts, the notice again, then the recovery"
    );
    assert_eq!(daemon.terminate().code(), Some(0));
}

/// An account's upstream that has not answered for five minutes (as the daemon records it for `relay status`,
/// in `accounts/office.unreachable.json`, written here as the daemon would) is an incident of its own, and
/// recovers when it is seen answering again (the report removed, and a delivery): before, only `queue_age` (an
/// hour by default) said so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_down_for_minutes_is_announced_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let idp = idp_issuing("tok").await;
    let upstream = FakeUpstream::start(&["tok"]).await;
    let (config, hook) = office_with_alerts(
        dir.path(),
        &idp,
        &upstream,
        "client_credentials",
        "queue_age = \"4s\"\n",
    )
    .await;
    let mut daemon = Daemon::spawn(&config);
    let report = dir.path().join("state/accounts/office.unreachable.json");
    let since = humantime::format_rfc3339_seconds(
        std::time::SystemTime::now() - std::time::Duration::from_secs(600),
    );
    std::fs::create_dir_all(report.parent().unwrap()).unwrap();
    std::fs::write(
        &report,
        format!(
            "{{\"upstream\":\"127.0.0.1:9\",\"since\":\"{since}\",\"reason\":\"connection refused\"}}"
        ),
    )
    .unwrap();
    let line = daemon.wait_log("alert open: upstream_unreachable");
    assert!(line.contains("relay_account=office"), "{line}");
    // The report gone (as at a restart) is not enough: the upstream must be seen answering, here by a delivery.
    std::fs::remove_file(&report).unwrap();
    send(daemon.addr, "scanner@lan.test", "ops@example.com").await;
    daemon.wait_log("relay_event=\"delivered\"");
    daemon.wait_log("alert recovered: upstream_unreachable");
    daemon.wait_log(
        "relay_event=\"alert_sent\" channel=\"webhook\" incident=upstream_unreachable:office",
    );
    daemon.wait_log(
        "relay_event=\"alert_sent\" channel=\"webhook\" incident=upstream_unreachable:office",
    );
    let got: Vec<serde_json::Value> = notices(&hook)
        .await
        .into_iter()
        .filter(|n| n["event"] == "upstream_unreachable")
        .collect();
    assert_eq!(got.len(), 2, "{got:#?}");
    assert_eq!(got[0]["account"], "office");
    assert!(
        got[0]["text"]
            .as_str()
            .is_some_and(|t| t.contains("127.0.0.1:9")),
        "{got:#?}"
    );
    assert_eq!(got[1]["state"], "recovered");
    assert_eq!(daemon.terminate().code(), Some(0));
}

/// The upstream refuses the account's login even with a fresh token (Microsoft's `535 5.7.139`: SMTP AUTH off for
/// the mailbox, the most common reason an M365 relay stops sending): the account's mail waits, and the sysadmin
/// hears it at once, with the diagnosis, not an hour later from `queue_age`. It recovers when mail goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_the_upstream_refuses_even_with_a_fresh_token_is_announced_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let idp = idp_issuing("tok").await;
    let mut upstream = FakeUpstream::start(&["tok"]).await;
    let refusal = "REFUSE 535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Mailbox.";
    upstream.tokens.lock().unwrap().push(refusal.into());
    let (config, hook) =
        office_with_alerts(dir.path(), &idp, &upstream, "client_credentials", "").await;
    let mut daemon = Daemon::spawn(&config);
    for _ in 0..3 {
        send(daemon.addr, "scanner@lan.test", "ops@example.com").await;
    }
    let line = daemon.wait_log("relay_event=\"login_refused\"");
    assert!(line.contains("relay_account=office"), "{line}");
    daemon.wait_log("relay_event=\"alert_sent\" channel=\"webhook\" incident=login_refused:office");

    // The mailbox is allowed SMTP AUTH; the sysadmin says so with `relay queue retry --all`.
    upstream.tokens.lock().unwrap().retain(|t| t != refusal);
    queue_retry(&config, "--all");
    for _ in 0..3 {
        upstream.next().await;
    }
    daemon.wait_log("alert recovered: login_refused");
    daemon.wait_log("relay_event=\"alert_sent\" channel=\"webhook\" incident=login_refused:office");
    let got: Vec<serde_json::Value> = notices(&hook)
        .await
        .into_iter()
        .filter(|n| n["event"] == "login_refused")
        .collect();
    assert_eq!(got.len(), 2, "one opening, one recovery: {got:#?}");
    assert_eq!(got[0]["state"], "open");
    assert_eq!(got[0]["account"], "office");
    let text = got[0]["text"].as_str().unwrap_or_default();
    assert!(
        text.contains("5.7.139") && text.contains("fix:"),
        "the upstream's words and what to do: {text}"
    );
    assert_eq!(got[1]["state"], "recovered");
    assert_eq!(daemon.terminate().code(), Some(0));
}

/// A notice the webhook refuses for good (a 4xx) is not tried again: the notices after it go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notice_the_webhook_refuses_for_good_is_not_retried() {
    let QueueAge {
        _dir,
        _idp,
        mut upstream,
        config,
        hook,
    } = QueueAge::new().await;
    webhook_answers(&hook, 400, 1).await;
    let mut daemon = Daemon::spawn(&config);
    send(daemon.addr, "scanner@lan.test", "ops@example.com").await;
    let refused = daemon.wait_log("relay_event=\"alert_failed\"");
    assert!(refused.contains("not sent again"), "{refused}");
    *upstream.data_reply.lock().unwrap() = "250 2.0.0 OK".into();
    queue_retry(&config, "--all");
    upstream.next().await;
    daemon.wait_log("relay_event=\"alert_sent\" channel=\"webhook\" incident=queue_age:queue");
    let states: Vec<String> = notices(&hook)
        .await
        .iter()
        .map(|n| n["state"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(states, ["open", "recovered"]);
    assert_eq!(daemon.terminate().code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_refused_with_550_comes_back_to_its_sender_as_a_delivery_status_notification() {
    let mut t = two_accounts("bounce = \"sender\"", "").await;
    // A bounce is never bounced: a message with the null sender goes to dead/ without one.
    send(t.daemon.addr, "", "null@bad.test").await;
    t.daemon.wait_log("relay_event=\"dead\"");
    let id = send(t.daemon.addr, "scanner@lan.test", "x@bad.test").await;
    t.daemon.wait_log("relay_event=\"dead\"");
    let line = t.daemon.wait_log("relay_event=\"bounce_queued\"");
    assert!(line.contains(&id), "{line}");

    // The first (and only) message through the good account is the report, from <> to the original sender.
    let dsn = t.good.next().await;
    assert_eq!(dsn.from, "", "a DSN has the null sender");
    assert_eq!(dsn.to, ["scanner@lan.test"]);
    let message = mail_parser::MessageParser::default()
        .parse(&dsn.data)
        .expect("the DSN parses");
    let ct = message.content_type().expect("a Content-Type");
    assert_eq!(ct.ctype(), "multipart");
    assert_eq!(ct.subtype(), Some("report"));
    assert_eq!(ct.attribute("report-type"), Some("delivery-status"));
    let text = String::from_utf8_lossy(&dsn.data).into_owned();
    let parts: Vec<String> = message
        .parts
        .iter()
        .skip(1)
        .map(|p| {
            let ct = p.content_type().expect("each part has a type");
            format!("{}/{}", ct.ctype(), ct.subtype().unwrap_or(""))
        })
        .collect();
    assert_eq!(
        parts,
        [
            "text/plain",
            "message/delivery-status",
            "text/rfc822-headers"
        ],
        "{text}"
    );
    for field in [
        "Reporting-MTA: dns; relay.test\r\n",
        "Final-Recipient: rfc822; x@bad.test\r\n",
        "Action: failed\r\n",
        "Status: 5.1.1\r\n",
        "Diagnostic-Code: smtp; 550 5.1.1 <x@bad.test>:",
        "Auto-Submitted: auto-replied\r\n",
        // The original headers, relay's Received line included.
        "Subject: scan 42\r\n",
        "Received: from device.lan",
    ] {
        assert!(text.contains(field), "no {field:?} in\n{text}");
    }
    assert!(
        text.contains(&format!("X-Relay-Queue-ID: {id}\r\n")),
        "{text}"
    );
    assert!(t.good.received.try_recv().is_err(), "exactly one report");
    assert_eq!(
        files_in(&t.dir.path().join("state"), "dead")
            .iter()
            .filter(|f| f.ends_with(".msg"))
            .count(),
        2
    );
}

/// A sysadmin adds an account whose client secret expires in five days and reloads: it is alerted on at once, like
/// the accounts relay started with. The reload that removes it closes its incident with a notice saying so (before,
/// it was dropped silently, and a monitor kept it open for ever), and the new `[alerts]` settings (another
/// webhook) take effect for that notice and for the account the reload adds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_alerts_on_the_added_accounts_credentials_and_closes_the_removed_ones() {
    let dir = tempfile::tempdir().unwrap();
    let idp = idp_issuing("tok").await;
    let upstream = FakeUpstream::start(&["tok"]).await;
    let (_, hook) = office_with_alerts(dir.path(), &idp, &upstream, "client_credentials", "").await;
    let config = dir.path().join("relay.toml");
    let mut daemon = Daemon::spawn(&config);
    let expiring = |name: &str| {
        format!(
            "{}client_secret_expires = \"{}\"\n",
            generic_account(name, &idp.uri(), &upstream, "client_credentials"),
            date_in(5)
        )
    };
    let rewrite = |accounts: &str, hook: &MockServer| {
        let text = format!(
            "default_account = \"office\"\n{}{accounts}[alerts]\nwebhook_url = \"{}/hook\"\n",
            generic_account("office", &idp.uri(), &upstream, "client_credentials"),
            hook.uri()
        );
        write_config_with(dir.path(), &text, LISTENER);
    };

    rewrite(&expiring("second"), &hook);
    let reloaded = daemon.reload();
    assert!(reloaded.contains("accounts added: second"), "{reloaded}");
    let line = daemon.wait_log("relay_event=\"alert\"");
    assert!(
        line.contains("incident=\"credential_expiring:second/client secret\"")
            && line.contains("state=\"open\""),
        "{line}"
    );
    daemon.wait_log("relay_event=\"alert_sent\" channel=\"webhook\"");
    let got = notices(&hook).await;
    assert_eq!(got.len(), 1, "{got:#?}");
    assert_eq!(
        got[0]["incident"],
        "credential_expiring:second/client secret"
    );
    assert_eq!(got[0]["account"], "second");
    let incidents = dir.path().join("state/alerts.json");
    assert!(
        std::fs::read_to_string(&incidents)
            .unwrap()
            .contains("second/client secret")
    );

    // `second` goes, `third` comes, and the alerts go to another webhook.
    let other = fake_webhook().await;
    rewrite(&expiring("third"), &other);
    let reloaded = daemon.reload();
    assert!(
        reloaded.contains("added: third") && reloaded.contains("removed: second"),
        "{reloaded}"
    );
    // Forgotten before the reload is done, and saved so: a restart would not bring it back.
    let open = std::fs::read_to_string(&incidents).unwrap();
    assert!(!open.contains("second"), "{open}");
    let line = daemon.wait_log("incident=\"credential_expiring:second/client secret\"");
    assert!(
        line.contains("state=\"recovered\"") && line.contains("no longer configured"),
        "{line}"
    );
    let line = daemon.wait_log("incident=\"credential_expiring:third/client secret\"");
    assert!(line.contains("state=\"open\""), "{line}");
    daemon.wait_log("relay_event=\"alert_sent\" channel=\"webhook\"");
    daemon.wait_log("relay_event=\"alert_sent\" channel=\"webhook\"");
    let got = notices(&other).await;
    let said: Vec<(&str, &str)> = got
        .iter()
        .map(|n| {
            (
                n["incident"].as_str().unwrap_or(""),
                n["state"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert!(
        said.len() == 2
            && said.contains(&("credential_expiring:second/client secret", "recovered"))
            && said.contains(&("credential_expiring:third/client secret", "open")),
        "{got:#?}"
    );
    assert_eq!(
        notices(&hook).await.len(),
        1,
        "the old webhook heard nothing more"
    );
    assert!(
        !daemon
            .unmatched()
            .iter()
            .any(|l| l.contains("relay_event=\"alert\"")),
        "no other alert: {:?}",
        daemon.unmatched()
    );
    assert!(daemon.terminate().success());

    // A restart with a config that no longer has `third`: its incident, left open in alerts.json, is closed too.
    rewrite("", &other);
    let mut daemon = Daemon::spawn(&config);
    let line = daemon.wait_log("incident=\"credential_expiring:third/client secret\"");
    assert!(line.contains("state=\"recovered\""), "{line}");
    daemon.wait_log("relay_event=\"alert_sent\" channel=\"webhook\"");
    assert_eq!(notices(&other).await.len(), 3);
    assert!(daemon.terminate().success());
}

/// A queue file relay cannot deliver from (here one the start's scan cannot read) is moved to quarantine/: mail a
/// client was promised that will not go. The `dead` incident of the queue says so (before, no alert did, and the
/// files were found at start, before the alerts ran), the log line carries its queue id, and `relay queue show`
/// says where it is instead of "no message".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_file_moved_to_quarantine_is_alerted_and_found_by_its_id() {
    let dir = tempfile::tempdir().unwrap();
    let idp = idp_issuing("tok").await;
    let upstream = FakeUpstream::start(&["tok"]).await;
    let (config, hook) =
        office_with_alerts(dir.path(), &idp, &upstream, "client_credentials", "").await;
    let id = "01a20a2d000000000000000000000002";
    let queue = dir.path().join("state/queue");
    std::fs::create_dir_all(&queue).unwrap();
    std::fs::write(queue.join(format!("{id}.msg")), "{\"id\":").unwrap();
    let mut daemon = Daemon::spawn(&config);
    let line = daemon.wait_log("relay_event=\"quarantined\"");
    assert!(line.contains(&format!("relay_queue_id={id}")), "{line}");
    let line = daemon.wait_log("relay_event=\"alert_sent\" channel=\"webhook\"");
    assert!(line.contains("incident=dead:queue"), "{line}");
    let got = notices(&hook).await;
    assert_eq!(got[0]["event"], "dead", "{got:#?}");
    let text = got[0].to_string();
    assert!(text.contains(id) && text.contains("quarantine/"), "{text}");
    let out = std::process::Command::new(relay_bin())
        .args(["queue", "show", id, "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("is in quarantine/"), "{said}");
    assert!(daemon.terminate().success());
}

/// `alerts.json` damaged (a full disk's half write, an editor): the start says it cannot read it (it is replaced at
/// the next change), instead of saying nothing; the daemon runs on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_incidents_file_is_said_not_replaced_silently() {
    let dir = tempfile::tempdir().unwrap();
    let idp = idp_issuing("tok").await;
    let upstream = FakeUpstream::start(&["tok"]).await;
    let (config, _hook) =
        office_with_alerts(dir.path(), &idp, &upstream, "client_credentials", "").await;
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let incidents = state.join("alerts.json");
    std::fs::write(&incidents, b"[{\"kind\": \"dead\", \"subj").unwrap();
    let mut daemon = Daemon::spawn(&config);
    let line = daemon.wait_log("cannot read the incidents the last run left open");
    assert!(line.contains("alerts.json"), "{line}");
    send(daemon.addr, "scanner@lan.test", "ops@example.test").await;
    daemon.wait_log("relay_event=\"delivered\"");
    assert!(daemon.terminate().success());
}
