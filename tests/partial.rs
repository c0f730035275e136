//! Partial delivery through the real binary: the upstream refuses some recipients of a message and takes it
//! for the others. Those it took get it once; those refused for good are bounced (and only they); those refused
//! for now are tried again, alone.

mod common;

use common::idp::{accounts_config, idp_issuing};
use common::upstream::{FakeUpstream, Received};
use common::*;

const TO: [&str; 3] = ["a@example.com", "b@example.com", "c@example.com"];
const UNKNOWN: &str = "550 5.1.1 <b@example.com>: Recipient address rejected: user unknown";

/// A daemon with one account on `upstream`; `top`: top-level keys (`bounce = "sender"`).
async fn daemon(
    upstream: &FakeUpstream,
    top: &str,
) -> (tempfile::TempDir, Daemon, wiremock::MockServer) {
    daemon_with(upstream, top, "").await
}

/// As [`daemon`], with `more` tables (`[queue]`).
async fn daemon_with(
    upstream: &FakeUpstream,
    top: &str,
    more: &str,
) -> (tempfile::TempDir, Daemon, wiremock::MockServer) {
    let dir = tempfile::tempdir().unwrap();
    let idp = idp_issuing("tok").await;
    let config = accounts_config(dir.path(), &idp.uri(), &[("office", upstream)], top, more);
    let daemon = Daemon::spawn(&config);
    (dir, daemon, idp)
}

/// Sends one message from scanner@lan.test to `to`; its queue id.
async fn send(addr: std::net::SocketAddr, to: &[&str]) -> String {
    let mut c = RawClient::ready(addr).await;
    c.cmd("MAIL FROM:<scanner@lan.test>", 250).await;
    for r in to {
        c.cmd(&format!("RCPT TO:<{r}>"), 250).await;
    }
    c.cmd("DATA", 354).await;
    c.send(b"From: <scanner@lan.test>\r\nSubject: scan 42\r\n\r\nhello\r\n.\r\n")
        .await;
    let reply = c.expect(250).await;
    c.cmd("QUIT", 221).await;
    reply.trim_end().rsplit(' ').next().unwrap().to_string()
}

/// Everything the upstream has received by now, without waiting.
fn drain(upstream: &mut FakeUpstream) -> Vec<Received> {
    std::iter::from_fn(|| upstream.received.try_recv().ok()).collect()
}

/// Checks that `dsn` is a report to the sender naming `failed` and no other of [`TO`]; its text.
fn assert_dsn_for(dsn: &Received, failed: &str) -> String {
    assert_eq!(dsn.from, "", "a DSN has the null sender");
    assert_eq!(dsn.to, ["scanner@lan.test"]);
    let text = String::from_utf8_lossy(&dsn.data).into_owned();
    for r in TO {
        let named = text.contains(&format!("Final-Recipient: rfc822; {r}\r\n"));
        assert_eq!(named, r == failed, "{r}: {text}");
    }
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recipient_refused_for_good_is_bounced_and_the_others_get_the_message() {
    let mut upstream = FakeUpstream::start(&["tok"]).await;
    upstream.answer_rcpt(TO[1], UNKNOWN);
    let (dir, mut d, _idp) = daemon(&upstream, "bounce = \"sender\"").await;
    let id = send(d.addr, &TO).await;

    let line = d.wait_log("relay_event=\"recipient_refused\"");
    assert!(
        line.contains(&id) && line.contains(TO[1]) && line.contains("5.1.1"),
        "{line}"
    );
    assert!(line.contains("WARN"), "{line}");
    let got = upstream.next().await;
    assert_eq!(got.to, [TO[0], TO[2]]);
    assert_eq!(got.from, "office@example.com");

    // The DSN, for the refused recipient alone, to the sender.
    let line = d.wait_log("relay_event=\"bounce_queued\"");
    assert!(line.contains(&id), "{line}");
    let dsn = upstream.next().await;
    let text = assert_dsn_for(&dsn, TO[1]);
    assert!(text.contains("Status: 5.1.1\r\n"), "{text}");
    // The message, then its DSN.
    let lines = [
        d.wait_log("relay_event=\"delivered\""),
        d.wait_log("relay_event=\"delivered\""),
    ];
    assert!(lines.iter().any(|l| l.contains(&id)), "{lines:?}");

    let state = dir.path().join("state");
    assert!(queued_in(&state).is_empty(), "the message left the queue");
    assert!(files_in(&state, "dead").is_empty(), "nothing in dead/");
    assert!(drain(&mut upstream).is_empty(), "one copy each");
}

/// A refused non-ASCII recipient (SMTPUTF8, RFC 6531) is reported with RFC 6533's types: `utf-8;` addresses in a
/// `message/global-delivery-status`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_utf8_recipient_is_bounced_with_the_global_report_types() {
    const JUERGEN: &str = "jürgen@example.com";
    let mut upstream = FakeUpstream::start(&["tok"]).await;
    upstream.answer_rcpt(JUERGEN, "550 5.1.1 user unknown");
    let (_dir, mut d, _idp) = daemon(&upstream, "bounce = \"sender\"").await;
    let mut c = RawClient::ready(d.addr).await;
    c.cmd("MAIL FROM:<scanner@lan.test> SMTPUTF8", 250).await;
    c.cmd(&format!("RCPT TO:<{JUERGEN}>"), 250).await;
    c.cmd(&format!("RCPT TO:<{}>", TO[0]), 250).await;
    c.cmd("DATA", 354).await;
    c.send("From: <scanner@lan.test>\r\nTo: Jürgen <jürgen@example.com>\r\nSubject: scan\r\n\r\nhello\r\n.\r\n".as_bytes())
        .await;
    c.expect(250).await;
    c.cmd("QUIT", 221).await;

    assert_eq!(upstream.next().await.to, [TO[0]]);
    d.wait_log("relay_event=\"bounce_queued\"");
    let dsn = upstream.next().await;
    assert_eq!(dsn.to, ["scanner@lan.test"]);
    let text = String::from_utf8_lossy(&dsn.data).into_owned();
    assert!(
        text.contains("report-type=global-delivery-status;"),
        "{text}"
    );
    assert!(
        text.contains("\r\nContent-Type: message/global-delivery-status\r\n"),
        "{text}"
    );
    assert!(
        text.contains(&format!("\r\nFinal-Recipient: utf-8; {JUERGEN}\r\n")),
        "{text}"
    );
    assert!(
        text.contains("\r\nContent-Type: message/global-headers\r\n"),
        "{text}"
    );
}

/// The same through BDAT (CHUNKING, RFC 3030): the refused recipient's reply comes back with the others, after
/// the message was sent; the message goes to the others, and a message to no accepted recipient is refused and
/// moved to dead/ (that connection is closed; the next message goes on a fresh one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_chunking_a_refused_recipient_is_bounced_and_the_others_get_the_message() {
    let mut upstream = FakeUpstream::start(&["tok"]).await;
    upstream
        .chunking
        .store(true, std::sync::atomic::Ordering::SeqCst);
    upstream.answer_rcpt(TO[1], UNKNOWN);
    let (dir, mut d, _idp) = daemon(&upstream, "bounce = \"none\"").await;
    let id = send(d.addr, &TO).await;
    let line = d.wait_log("relay_event=\"recipient_refused\"");
    assert!(line.contains(&id) && line.contains(TO[1]), "{line}");
    let got = upstream.next().await;
    assert_eq!(got.to, [TO[0], TO[2]]);
    assert!(
        String::from_utf8_lossy(&got.data).ends_with("\r\n\r\nhello\r\n"),
        "{:?}",
        String::from_utf8_lossy(&got.data)
    );
    let line = d.wait_log("relay_event=\"delivered\"");
    assert!(line.contains(&id), "{line}");

    // Every recipient refused for good: the transaction is refused as a whole, the message goes to dead/.
    upstream.answer_rcpt(TO[0], UNKNOWN);
    let dead = send(d.addr, &TO[..1]).await;
    let line = d.wait_log("relay_event=\"dead\"");
    assert!(line.contains(&dead) && line.contains("5.1.1"), "{line}");
    let next = send(d.addr, &TO[2..]).await;
    assert_eq!(upstream.next().await.to, [TO[2]]);
    let line = d.wait_log("relay_event=\"delivered\"");
    assert!(line.contains(&next), "{line}");
    let state = dir.path().join("state");
    assert!(queued_in(&state).is_empty(), "nothing left queued");
    assert_eq!(
        files_in(&state, "dead").len(),
        2,
        "the dead message and its state"
    );
    assert_eq!(
        upstream
            .connections
            .load(std::sync::atomic::Ordering::SeqCst),
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recipient_refused_for_now_is_retried_alone() {
    let mut upstream = FakeUpstream::start(&["tok"]).await;
    upstream.answer_rcpt(TO[2], "451 4.3.0 mailbox busy, try later");
    let (dir, mut d, _idp) = daemon(&upstream, "").await;
    let id = send(d.addr, &TO).await;

    let got = upstream.next().await;
    assert_eq!(got.to, [TO[0], TO[1]]);
    // The journal says who has it now, not only once the last recipient does.
    let line = d.wait_log("relay_event=\"partly_delivered\"");
    assert!(
        line.contains(&id) && line.contains(&format!("recipients=\"{}, {}\"", TO[0], TO[1])),
        "{line}"
    );
    let line = d.wait_log("relay_event=\"deferred\"");
    assert!(
        line.contains(&id) && line.contains(TO[2]) && line.contains("451"),
        "{line}"
    );
    let state_file = dir.path().join(format!("state/queue/{id}.state"));
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&state_file).unwrap()).unwrap();
    assert_eq!(
        state["finished"],
        serde_json::json!([TO[0], TO[1]]),
        "{state}"
    );
    assert_eq!(state["attempts"], 1);
    let show = std::process::Command::new(relay_bin())
        .args(["queue", "show", &id, "--config"])
        .arg(dir.path().join("relay.toml"))
        .output()
        .unwrap();
    let show = String::from_utf8_lossy(&show.stdout).into_owned();
    assert!(
        show.contains(&format!("finished:    {}, {} (", TO[0], TO[1])),
        "{show}"
    );

    // The next try is a minute away: now instead.
    queue_retry(&dir.path().join("relay.toml"), &id);
    let got = upstream.next().await;
    assert_eq!(got.to, [TO[2]], "only the recipient that waited");
    let line = d.wait_log("relay_event=\"delivered\"");
    assert!(line.contains(&id), "{line}");
    let state = dir.path().join("state");
    assert!(queued_in(&state).is_empty());
    assert!(!state_file.exists(), "the state file goes with the message");
    assert!(drain(&mut upstream).is_empty(), "one copy each");
    let rcpts: Vec<String> = upstream
        .commands
        .lock()
        .unwrap()
        .iter()
        .filter(|c| c.starts_with("RCPT"))
        .cloned()
        .collect();
    assert_eq!(rcpts.len(), 4, "three, then the one that waited: {rcpts:?}");
}

/// A recipient refused because the account's daily quota ran out (Gmail's 550 5.4.5) is refused for now, not
/// for good, whatever the 5xx says: it waits for another try, and nobody is bounced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recipient_refused_for_a_used_up_quota_waits_and_is_not_bounced() {
    let mut upstream = FakeUpstream::start(&["tok"]).await;
    upstream.answer_rcpt(
        TO[2],
        "550 5.4.5 Daily user sending limit exceeded. For more information on Gmail sending limits go to https://support.google.com/a/answer/166852 - gsmtp",
    );
    let (dir, mut d, _idp) = daemon(&upstream, "bounce = \"sender\"").await;
    let id = send(d.addr, &TO).await;

    let got = upstream.next().await;
    assert_eq!(got.to, [TO[0], TO[1]]);
    let line = d.wait_log("relay_event=\"deferred\"");
    assert!(line.contains(&id) && line.contains(TO[2]), "{line}");
    let state = dir.path().join("state");
    assert_eq!(
        queued_in(&state).len(),
        1,
        "it waits for the third recipient"
    );
    assert!(files_in(&state, "dead").is_empty());
    assert!(drain(&mut upstream).is_empty(), "no bounce");
}

/// Two recipients refused for good with different replies (Microsoft's name the recipient): one DSN for both,
/// each with its own status and reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recipients_refused_with_different_replies_share_one_dsn() {
    let mut upstream = FakeUpstream::start(&["tok"]).await;
    upstream.answer_rcpt(TO[1], UNKNOWN);
    upstream.answer_rcpt(TO[2], "550 5.7.1 <c@example.com>: relaying denied");
    let (dir, mut d, _idp) = daemon(&upstream, "bounce = \"sender\"").await;
    let id = send(d.addr, &TO).await;

    let got = upstream.next().await;
    assert_eq!(got.to, [TO[0]]);
    let dsn = upstream.next().await;
    assert_eq!(dsn.from, "");
    let text = String::from_utf8_lossy(&dsn.data).into_owned();
    assert!(
        text.contains(&format!(
            "Final-Recipient: rfc822; {}\r\nAction: failed\r\nStatus: 5.1.1\r\n",
            TO[1]
        )) && text.contains(&format!(
            "Final-Recipient: rfc822; {}\r\nAction: failed\r\nStatus: 5.7.1\r\n",
            TO[2]
        )),
        "{text}"
    );
    assert!(!text.contains(&format!("rfc822; {}\r\n", TO[0])), "{text}");
    let line = d.wait_log("relay_event=\"bounce_queued\"");
    assert!(line.contains(&id), "{line}");
    d.wait_log("relay_event=\"delivered\"");
    d.wait_log("relay_event=\"delivered\"");
    assert!(queued_in(&dir.path().join("state")).is_empty());
    assert!(drain(&mut upstream).is_empty(), "one DSN, one copy");
}

/// The upstream refuses one recipient at RCPT and then the message itself for the others (a content filter's 554
/// after the data): the report gives each recipient its own reason, the refused one its RCPT reply (before, every
/// recipient got the data's). Reports go through a second account, which takes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recipient_refused_at_rcpt_keeps_its_own_reason_when_the_data_is_refused_too() {
    let upstream = FakeUpstream::start(&["tok"]).await;
    upstream.answer_rcpt(TO[1], UNKNOWN);
    *upstream.data_reply.lock().unwrap() = "554 5.7.1 content rejected (virus)".into();
    let mut reports = FakeUpstream::start(&["tok"]).await;
    let dir = tempfile::tempdir().unwrap();
    let idp = idp_issuing("tok").await;
    let config = accounts_config(
        dir.path(),
        &idp.uri(),
        &[("office", &upstream), ("reports", &reports)],
        "bounce = \"sender\"",
        "[[route]]\nrecipient = \"scanner@lan.test\"\naccount = \"reports\"\n",
    );
    let mut d = Daemon::spawn(&config);
    let id = send(d.addr, &TO).await;
    let line = d.wait_log("relay_event=\"dead\"");
    assert!(line.contains(&id), "{line}");
    let dsn = reports.next().await;
    assert_eq!(dsn.to, ["scanner@lan.test"]);
    let text = String::from_utf8_lossy(&dsn.data).into_owned();
    let block = |r: &str| {
        let start = text
            .find(&format!("Final-Recipient: rfc822; {r}\r\n"))
            .unwrap_or_else(|| panic!("{r} is named: {text}"));
        let rest = &text[start..];
        rest[..rest.find("\r\n\r\n").unwrap_or(rest.len())].to_string()
    };
    let refused = block(TO[1]);
    assert!(
        refused.contains("Status: 5.1.1\r\n") && refused.contains("user unknown"),
        "its own RCPT reply: {refused}"
    );
    assert!(!refused.contains("5.7.1"), "{refused}");
    for r in [TO[0], TO[2]] {
        let b = block(r);
        assert!(
            b.contains("Status: 5.7.1\r\n") && b.contains("virus"),
            "{b}"
        );
    }
    // (The report's file goes before its line is logged.)
    d.wait_log("relay_event=\"delivered\"");
    assert!(queued_in(&dir.path().join("state")).is_empty());
}

/// A message whose only recipient is refused for now at RCPT (a full or busy mailbox) waits for its retry, but the
/// account that sent it is not failing: the upstream took its login and its sender. `relay status` stays ok and
/// exits 0 (it said `failing` and exited 1 until the retry, a false alarm for a sysadmin's monitoring).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recipient_refused_for_now_leaves_the_account_ok() {
    let upstream = FakeUpstream::start(&["tok"]).await;
    upstream.answer_rcpt(TO[0], "450 4.2.1 <a@example.com>: mailbox busy, try later");
    let (dir, mut d, _idp) = daemon(&upstream, "").await;
    let id = send(d.addr, &TO[..1]).await;
    let line = d.wait_log("relay_event=\"deferred\"");
    assert!(line.contains(&id) && line.contains("4.2.1"), "{line}");
    let (code, status) = status_json(&dir.path().join("relay.toml"));
    let account = &status["accounts"][0];
    assert_eq!(account["state"], "ok", "{status:#}");
    assert_eq!(code, Some(0), "{status:#}");
    assert_eq!(queued_in(&dir.path().join("state")).len(), 1, "it waits");
}

/// An upstream that takes only so many recipients per message (452 4.5.3 for the rest, as Gmail and Microsoft
/// do): the rest go in a next message at once, not after the retry schedule's wait, and no attempt is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_recipients_go_on_in_a_next_message_at_once() {
    let mut upstream = FakeUpstream::start(&["tok"]).await;
    upstream.answer_rcpt(TO[2], "452 4.5.3 Too many recipients");
    // A retry schedule of an hour: only the immediate next message can bring the third recipient in time.
    let (dir, mut d, _idp) = daemon_with(&upstream, "", "[queue]\nretry = [\"1h\"]\n").await;
    let id = send(d.addr, &TO).await;

    let first = upstream.next().await;
    assert_eq!(first.to, [TO[0], TO[1]]);
    let second = upstream.next().await;
    assert_eq!(second.to, [TO[2]], "the one left, at once");
    let line = d.wait_log("relay_event=\"delivered\"");
    assert!(line.contains(&id), "{line}");
    assert!(queued_in(&dir.path().join("state")).is_empty());
    assert!(drain(&mut upstream).is_empty(), "one copy each");
    let line = d.wait_log("the 1 left go in a next message now");
    assert!(
        line.contains("INFO") && line.contains(&id) && !line.contains("relay_event"),
        "not a failed attempt, nor a deferral: {line}"
    );
    let line = d.wait_log("relay_event=\"partly_delivered\"");
    assert!(line.contains(&id), "{line}");
    assert!(
        !d.unmatched()
            .iter()
            .any(|l| l.contains("relay_event=\"deferred\"")),
        "{:?}",
        d.unmatched()
    );
}

/// A full mailbox (452 4.2.2) among the recipients the upstream would not take in this message (452 4.5.3):
/// the rest still go in a next message at once, the full one asked again in it; a full mailbox alone waits for
/// the retry schedule, as any refusal for now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_mailbox_among_too_many_recipients_does_not_hold_the_rest() {
    let mut upstream = FakeUpstream::start(&["tok"]).await;
    upstream.answer_rcpt(TO[1], "452 4.2.2 Mailbox full");
    upstream.answer_rcpt(TO[2], "452 4.5.3 Too many recipients");
    let (dir, mut d, _idp) = daemon_with(&upstream, "", "[queue]\nretry = [\"1h\"]\n").await;
    let id = send(d.addr, &TO).await;

    let first = upstream.next().await;
    assert_eq!(first.to, [TO[0]]);
    let second = upstream.next().await;
    assert_eq!(second.to, [TO[1], TO[2]], "the two left, at once");
    let line = d.wait_log("relay_event=\"delivered\"");
    assert!(line.contains(&id), "{line}");
    assert!(queued_in(&dir.path().join("state")).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_recipient_refused_goes_to_dead_as_before() {
    let mut upstream = FakeUpstream::start(&["tok"]).await;
    for r in TO {
        upstream.answer_rcpt(r, &format!("550 5.1.1 <{r}>: user unknown"));
    }
    let (dir, mut d, _idp) = daemon(&upstream, "").await;
    let id = send(d.addr, &TO).await;
    let line = d.wait_log("relay_event=\"dead\"");
    assert!(line.contains(&id) && line.contains("5.1.1"), "{line}");
    let state = dir.path().join("state");
    assert!(state.join(format!("dead/{id}.msg")).exists());
    assert!(queued_in(&state).is_empty());
    assert!(drain(&mut upstream).is_empty(), "nobody got it");
    assert!(
        !d.unmatched()
            .iter()
            .any(|l| l.contains("recipient_refused")),
        "{:?}",
        d.unmatched()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_message_names_the_recipients_it_was_finished_with_and_bounces_only_the_others()
{
    let mut upstream = FakeUpstream::start(&["tok"]).await;
    for _ in 0..20 {
        upstream.answer_rcpt(TO[2], "451 4.2.1 mailbox busy");
    }
    let (dir, mut d, _idp) = daemon_with(
        &upstream,
        "bounce = \"sender\"",
        "[queue]\nretry = [\"1s\"]\nmax_age = \"2s\"\n",
    )
    .await;
    let id = send(d.addr, &TO).await;
    let got = upstream.next().await;
    assert_eq!(got.to, [TO[0], TO[1]]);
    let line = d.wait_log("relay_event=\"dead\"");
    assert!(
        line.contains(&id) && line.contains("expired after"),
        "{line}"
    );
    assert!(line.contains("a@example.com, b@example.com"), "{line}");
    let state = std::fs::read_to_string(dir.path().join(format!("state/dead/{id}.state"))).unwrap();
    assert!(state.contains("\"finished\""), "{state}");
    // The DSN names the one that never got it.
    let dsn = upstream.next().await;
    let text = assert_dsn_for(&dsn, TO[2]);
    assert!(text.contains("Status: 5.4.7\r\n"), "{text}");
    d.wait_log("relay_event=\"delivered\"");
    assert!(drain(&mut upstream).is_empty(), "one copy each");
}

/// The DSN names the relay by the config's hostname, the one in force when it is made: a reload that changes it
/// changes the next DSN.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bounce_after_a_reload_names_the_new_hostname() {
    let mut upstream = FakeUpstream::start(&["tok"]).await;
    for _ in 0..2 {
        upstream.answer_rcpt(TO[1], UNKNOWN);
    }
    let (dir, mut d, _idp) = daemon(&upstream, "bounce = \"sender\"").await;
    let mut reports = Vec::new();
    for round in 0..2 {
        if round == 1 {
            let config = dir.path().join("relay.toml");
            let text = std::fs::read_to_string(&config).unwrap();
            let changed = text.replace(
                "hostname = \"relay.test\"",
                "hostname = \"mail.example.net\"",
            );
            assert_ne!(text, changed);
            std::fs::write(&config, changed).unwrap();
            d.reload();
        }
        send(d.addr, &TO[..2]).await;
        assert_eq!(upstream.next().await.to, [TO[0]]);
        d.wait_log("relay_event=\"bounce_queued\"");
        reports.push(assert_dsn_for(&upstream.next().await, TO[1]));
    }
    assert!(
        reports[0].contains("Reporting-MTA: dns; relay.test\r\n"),
        "{}",
        reports[0]
    );
    assert!(
        reports[1].contains("Reporting-MTA: dns; mail.example.net\r\n"),
        "{}",
        reports[1]
    );
}

/// A DSN that nothing routes goes through the account its failed message went through: its own envelope (the null
/// sender, to the device) matches no route that sent the message (`sender = "*@lan.test"`), and with no
/// `default_account` it would wait for an account until max_age.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bounce_goes_through_the_account_of_its_message_where_only_a_sender_route_names_it() {
    let mut upstream = FakeUpstream::start(&["tok"]).await;
    upstream.answer_rcpt(TO[1], UNKNOWN);
    let dir = tempfile::tempdir().unwrap();
    let idp = idp_issuing("tok").await;
    common::idp::write_secret(dir.path());
    let top = format!(
        "bounce = \"sender\"\n{}[[route]]\nsender = \"*@lan.test\"\naccount = \"office\"\n",
        common::idp::generic_account("office", &idp.uri(), &upstream, "client_credentials")
    );
    let config = write_config_with(
        dir.path(),
        &top,
        "address = \"127.0.0.1:0\"\nauth = \"none\"",
    );
    write_valid_tokens(
        &dir.path().join("state"),
        "office",
        "tok",
        std::time::Duration::from_secs(3600),
    );
    let mut d = Daemon::spawn(&config);
    send(d.addr, &TO[..2]).await;
    assert_eq!(upstream.next().await.to, [TO[0]]);
    d.wait_log("relay_event=\"bounce_queued\"");
    let dsn = upstream.next().await;
    assert_dsn_for(&dsn, TO[1]);
    let delivered = [
        d.wait_log("relay_event=\"delivered\""),
        d.wait_log("relay_event=\"delivered\""),
    ];
    assert!(
        delivered.iter().all(|l| l.contains("relay_account=office")),
        "{delivered:?}"
    );
    assert!(queued_in(&dir.path().join("state")).is_empty());
}

/// Every recipient refused, one for good and one for now: the one refused for good is bounced at once, with its
/// own words, and only the other waits (all of them waited on the 4xx, the unknown address retried for days).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_recipient_refused_bounces_those_refused_for_good_and_the_others_wait() {
    let mut upstream = FakeUpstream::start(&["tok"]).await;
    upstream.answer_rcpt(TO[1], UNKNOWN);
    upstream.answer_rcpt(TO[0], "451 4.2.0 mailbox busy, try again later");
    let (dir, mut d, _idp) = daemon_with(
        &upstream,
        "bounce = \"sender\"",
        "[queue]\nretry = [\"1s\"]\n",
    )
    .await;
    let id = send(d.addr, &TO[..2]).await;

    let line = d.wait_log("relay_event=\"recipient_refused\"");
    assert!(line.contains(&id) && line.contains(TO[1]), "{line}");
    let line = d.wait_log("relay_event=\"deferred\"");
    assert!(
        line.contains(&id) && line.contains(TO[0]) && line.contains("4.2.0"),
        "{line}"
    );
    // The DSN comes first, for the unknown address alone; then the message, to the other, on its retry.
    let dsn = upstream.next().await;
    let text = assert_dsn_for(&dsn, TO[1]);
    assert!(text.contains("Status: 5.1.1\r\n"), "{text}");
    let got = upstream.next().await;
    assert_eq!(got.to, [TO[0]]);
    d.wait_log("relay_event=\"delivered\"");
    d.wait_log("relay_event=\"delivered\"");
    let state = dir.path().join("state");
    assert!(queued_in(&state).is_empty(), "the message left the queue");
    assert!(files_in(&state, "dead").is_empty(), "nothing in dead/");
    assert!(drain(&mut upstream).is_empty(), "one copy each");
}

/// Every recipient refused for good, each for its own reason: the message goes to dead/, and the DSN gives each
/// recipient its own reply (it gave the first one's to all).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_recipient_refused_for_good_is_bounced_each_with_its_own_reply() {
    let mut upstream = FakeUpstream::start(&["tok"]).await;
    upstream.answer_rcpt(TO[0], "550 5.7.1 delivery not authorized, message refused");
    upstream.answer_rcpt(TO[1], UNKNOWN);
    let (dir, mut d, _idp) = daemon(&upstream, "bounce = \"sender\"").await;
    let id = send(d.addr, &TO[..2]).await;

    let line = d.wait_log("relay_event=\"dead\"");
    assert!(
        line.contains(&id) && line.contains("5.7.1") && line.contains("5.1.1"),
        "{line}"
    );
    let dsn = upstream.next().await;
    assert_eq!(dsn.to, ["scanner@lan.test"]);
    let text = String::from_utf8_lossy(&dsn.data).into_owned();
    let block = |to: &str| {
        let at = text
            .find(&format!("Final-Recipient: rfc822; {to}\r\n"))
            .unwrap_or_else(|| panic!("{to} named: {text}"));
        text[at..].split("\r\n\r\n").next().unwrap().to_string()
    };
    assert!(block(TO[0]).contains("Status: 5.7.1\r\n"), "{text}");
    assert!(block(TO[1]).contains("Status: 5.1.1\r\n"), "{text}");
    let state = dir.path().join("state");
    assert_eq!(
        files_in(&state, "dead").len(),
        2,
        "the message and its state"
    );
    assert!(
        queued_in(&state).iter().all(|(e, _)| e["sender"] == ""),
        "only the DSN was queued"
    );
}

/// To an upstream without SMTPUTF8, a non-ASCII address is refused for good in relay's own words: with the one
/// other recipient refused for now, it is bounced at once and only the other waits (it waited with the other, on
/// the upstream's 4xx, whose refusal alone decided for the message).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_ascii_address_is_bounced_at_once_though_the_others_are_refused_for_now() {
    const ZOE: &str = "zoë@example.com";
    let mut upstream = FakeUpstream::start(&["tok"]).await;
    upstream
        .smtputf8
        .store(false, std::sync::atomic::Ordering::SeqCst);
    upstream.answer_rcpt(TO[0], "451 4.2.0 mailbox busy, try again later");
    let (_dir, mut d, _idp) = daemon_with(
        &upstream,
        "bounce = \"sender\"",
        "[queue]\nretry = [\"1s\"]\n",
    )
    .await;
    let mut c = RawClient::ready(d.addr).await;
    c.cmd("MAIL FROM:<scanner@lan.test> SMTPUTF8", 250).await;
    c.cmd(&format!("RCPT TO:<{ZOE}>"), 250).await;
    c.cmd(&format!("RCPT TO:<{}>", TO[0]), 250).await;
    c.cmd("DATA", 354).await;
    c.send(b"From: <scanner@lan.test>\r\nSubject: scan\r\n\r\nhello\r\n.\r\n")
        .await;
    c.expect(250).await;
    c.cmd("QUIT", 221).await;

    let line = d.wait_log("relay_event=\"recipient_refused\"");
    assert!(line.contains("5.6.7"), "{line}");
    let dsn = upstream.next().await;
    assert_eq!(dsn.to, ["scanner@lan.test"], "the bounce comes first");
    assert!(String::from_utf8_lossy(&dsn.data).contains("5.6.7"));
    assert_eq!(upstream.next().await.to, [TO[0]]);
    assert!(drain(&mut upstream).is_empty(), "one copy each");
}

/// A state file that cannot be read just now (here its permissions; out of descriptors, an I/O error) is not
/// taken for "never tried": the message, already taken for `a`, waits instead of going to `a` again, and once
/// its state reads it goes to the recipient still owed it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_file_that_cannot_be_read_holds_the_message_instead_of_sending_it_again() {
    let mut upstream = FakeUpstream::start(&["tok"]).await;
    upstream.answer_rcpt(TO[1], "450 4.2.1 mailbox busy, try later");
    let (dir, mut d, _idp) = daemon(&upstream, "").await;
    let id = send(d.addr, &TO[..2]).await;
    assert_eq!(upstream.next().await.to, [TO[0]]);
    d.wait_log("relay_event=\"deferred\"");
    assert_eq!(d.terminate().code(), Some(0));

    let state = dir.path().join("state/queue").join(format!("{id}.state"));
    let mut saved: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&state).unwrap()).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o000)).unwrap();
    let config = dir.path().join("relay.toml");
    let mut cmd = relay_without_file_override();
    cmd.args(["serve", "--config"]).arg(&config);
    let mut d = Daemon::start(cmd);
    let line = d.wait_log("cannot read the message's delivery state");
    assert!(line.contains(&id) && line.contains("WARN"), "{line}");
    assert!(
        drain(&mut upstream).is_empty(),
        "sent again to the recipient it had reached"
    );

    // Readable again, and made due.
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o600)).unwrap();
    saved["next_attempt"] = serde_json::Value::Null;
    std::fs::write(&state, serde_json::to_vec(&saved).unwrap()).unwrap();
    queue_retry(&config, &id);
    assert_eq!(upstream.next().await.to, [TO[1]]);
    let line = d.wait_log("relay_event=\"delivered\"");
    assert!(line.contains(&id), "{line}");
    assert_eq!(d.terminate().code(), Some(0));
}
