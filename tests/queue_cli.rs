//! `relay queue` on dead mail and odd state dirs, through the real binary: a message the upstream refused for
//! good is listed, shown, moved back to the queue (and delivered by the running daemon, to the recipients it had
//! not reached yet) or deleted; every subcommand says the same about a state dir that is not there; and what a
//! client wrote is printed with its terminal controls escaped.

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, SystemTime};

use common::idp::{accounts_config, idp_issuing};
use common::upstream::FakeUpstream;
use common::*;

const TO: [&str; 2] = ["a@example.com", "b@example.com"];
const REFUSED: &str = "554 5.7.1 Message rejected as spam by Content Filtering";

fn relay(config: &Path, args: &[&str]) -> Output {
    Command::new(relay_bin())
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .expect("relay runs")
}

fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).into_owned()
}

/// `relay ARGS`, which must succeed; its stdout.
fn ok(config: &Path, args: &[&str]) -> String {
    let out = relay(config, args);
    assert!(
        out.status.success(),
        "relay {args:?}: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// A daemon with one account on `upstream`.
async fn daemon(
    upstream: &FakeUpstream,
) -> (
    tempfile::TempDir,
    std::path::PathBuf,
    Daemon,
    wiremock::MockServer,
) {
    let dir = tempfile::tempdir().unwrap();
    let idp = idp_issuing("tok").await;
    let config = accounts_config(dir.path(), &idp.uri(), &[("office", upstream)], "", "");
    let daemon = Daemon::spawn(&config);
    (dir, config, daemon, idp)
}

/// Sends one message from scanner@lan.test to `to`; its queue id.
async fn send(addr: std::net::SocketAddr, to: &[&str], subject: &[u8]) -> String {
    let mut c = RawClient::ready(addr).await;
    c.cmd("MAIL FROM:<scanner@lan.test>", 250).await;
    for r in to {
        c.cmd(&format!("RCPT TO:<{r}>"), 250).await;
    }
    c.cmd("DATA", 354).await;
    let mut data = b"From: <scanner@lan.test>\r\nSubject: ".to_vec();
    data.extend_from_slice(subject);
    data.extend_from_slice(b"\r\n\r\nhello\r\n.\r\n");
    c.send(&data).await;
    let reply = c.expect(250).await;
    c.cmd("QUIT", 221).await;
    reply.trim_end().rsplit(' ').next().unwrap().to_string()
}

/// The whole path: delivered to one recipient, refused for good for the other (dead, with the record of the
/// first), seen by every queue command, moved back, and delivered by the running daemon to the second alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_message_is_listed_shown_and_retried_to_the_recipients_it_had_not_reached() {
    let mut upstream = FakeUpstream::start(&["tok"]).await;
    upstream.answer_rcpt(TO[1], "451 4.2.1 mailbox busy, try later");
    let (dir, cfg, mut d, _idp) = daemon(&upstream).await;
    let id = send(d.addr, &TO, b"scan 42").await;
    assert_eq!(upstream.next().await.to, [TO[0]]);
    let line = d.wait_log("relay_event=\"deferred\"");
    assert!(line.contains(&id), "{line}");

    // The second recipient's attempt, now, is refused for good: the message goes to dead/.
    *upstream.data_reply.lock().unwrap() = REFUSED.into();
    ok(&cfg, &["queue", "retry", &id]);
    let line = d.wait_log("relay_event=\"dead\"");
    assert!(line.contains(&id), "{line}");
    let state = dir.path().join("state");
    assert!(state.join(format!("dead/{id}.msg")).exists());

    let list = ok(&cfg, &["queue", "list"]);
    assert!(!list.contains("queue is empty"), "{list}");
    let row = list.lines().find(|l| l.starts_with(&id)).expect(&list);
    assert!(row.contains(" dead "), "{row}");
    // With the account it goes through: the sysadmin of several accounts sees whose trouble it is.
    assert!(
        list.contains(&format!("  last error (account office): {REFUSED}")),
        "{list}"
    );
    assert!(list.contains("0 message(s) queued, 1 dead"), "{list}");
    let json: serde_json::Value =
        serde_json::from_str(&ok(&cfg, &["queue", "list", "--json"])).unwrap();
    let entries = json.as_array().unwrap();
    assert_eq!(entries.len(), 1, "{json}");
    assert_eq!(entries[0]["id"], id.as_str());
    assert_eq!(entries[0]["state"], "dead");
    assert_eq!(entries[0]["last_error"], REFUSED);
    assert_eq!(entries[0]["accounts"], serde_json::json!(["office"]));
    assert_eq!(entries[0]["finished"], serde_json::json!([TO[0]]));

    let show = ok(&cfg, &["queue", "show", &id]);
    assert!(show.contains("state:       dead"), "{show}");
    assert!(show.contains(&format!("last error:  {REFUSED}")), "{show}");
    assert!(show.contains(&format!("finished:    {}", TO[0])), "{show}");
    assert!(show.contains("Subject: scan 42"), "{show}");
    let json: serde_json::Value =
        serde_json::from_str(&ok(&cfg, &["queue", "show", &id, "--json"])).unwrap();
    assert_eq!(json["state"], "dead");

    let out = relay(&cfg, &["status"]);
    assert_eq!(out.status.code(), Some(1), "dead mail needs attention");
    let status = text(&out.stdout);
    assert!(status.contains("1 dead"), "{status}");
    assert!(status.contains("relay queue retry ID"), "{status}");

    // Fixed upstream; the sysadmin sends it again. The running daemon takes it, for the recipient left alone.
    *upstream.data_reply.lock().unwrap() = "250 2.0.0 OK".into();
    let out = ok(&cfg, &["queue", "retry", &id]);
    assert!(
        out.contains("moved") && out.contains("back to the queue"),
        "{out}"
    );
    assert!(!state.join(format!("dead/{id}.msg")).exists());
    assert!(!state.join(format!("dead/{id}.state")).exists());
    let got = upstream.next().await;
    assert_eq!(got.to, [TO[1]], "not again to the recipient it reached");
    let line = d.wait_log("relay_event=\"delivered\"");
    assert!(line.contains(&id), "{line}");
    // The files go just after that line: once the daemon has stopped, they are gone.
    assert_eq!(d.terminate().code(), Some(0));
    assert!(files_in(&state, "dead").is_empty());
    let status = text(&relay(&cfg, &["status"]).stdout);
    assert!(status.contains("0 queued (0 deferred), 0 dead"), "{status}");
    assert_eq!(ok(&cfg, &["queue", "list"]).trim(), "queue is empty");
}

/// `retry --all` leaves dead mail alone unless `--dead` says otherwise; `delete` removes a dead message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_all_leaves_dead_mail_unless_asked_and_delete_removes_it() {
    let mut upstream = FakeUpstream::start(&["tok"]).await;
    *upstream.data_reply.lock().unwrap() = REFUSED.into();
    let (dir, cfg, mut d, _idp) = daemon(&upstream).await;
    let first = send(d.addr, &TO[..1], b"one").await;
    d.wait_log("relay_event=\"dead\"");
    let second = send(d.addr, &TO[..1], b"two").await;
    d.wait_log("relay_event=\"dead\"");
    let state = dir.path().join("state");
    assert_eq!(
        files_in(&state, "dead").len(),
        4,
        "two messages, two states"
    );

    let out = ok(&cfg, &["queue", "retry", "--all"]);
    assert!(out.contains("0 message(s) due now"), "{out}");
    assert!(out.contains("2 dead message(s) left in dead/"), "{out}");
    assert_eq!(files_in(&state, "dead").len(), 4);

    let out = ok(&cfg, &["queue", "delete", &first]);
    assert_eq!(out.trim(), format!("deleted {first} (from dead/)"));
    assert_eq!(
        files_in(&state, "dead").len(),
        2,
        "the message and its state"
    );
    let out = relay(&cfg, &["queue", "show", &first]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("no message"), "{out:?}");
    let out = relay(&cfg, &["queue", "delete", &first]);
    assert_eq!(out.status.code(), Some(1));

    let out = relay(&cfg, &["queue", "retry", "--dead"]);
    assert_eq!(out.status.code(), Some(2), "--dead goes with --all");

    *upstream.data_reply.lock().unwrap() = "250 2.0.0 OK".into();
    let out = ok(&cfg, &["queue", "retry", "--all", "--dead"]);
    assert!(out.contains("1 message(s) due now"), "{out}");
    assert!(out.contains("1 of them moved back from dead/"), "{out}");
    upstream.next().await;
    let line = d.wait_log("relay_event=\"delivered\"");
    assert!(line.contains(&second), "{line}");
    assert_eq!(d.terminate().code(), Some(0));
    assert!(files_in(&state, "dead").is_empty());
    assert!(files_in(&state, "queue").is_empty());
}

/// `relay queue delete` of a message the daemon is sending at that moment refuses, rather than report it deleted
/// while the upstream takes it; once the delivery has ended, the message is gone by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_and_retry_refuse_a_message_being_delivered() {
    let mut upstream = FakeUpstream::start(&["tok"]).await;
    *upstream.data_reply.lock().unwrap() = "HOLD 250 2.0.0 OK".into();
    let (dir, cfg, mut d, _idp) = daemon(&upstream).await;
    let id = send(d.addr, &TO[..1], b"in flight").await;
    // The upstream has the whole message and has not answered yet.
    upstream.next().await;
    // Listed as being sent, not as due "now".
    let list = ok(&cfg, &["queue", "list"]);
    let row = list.lines().find(|l| l.starts_with(&id)).unwrap();
    assert!(row.contains("sending now"), "{list}");
    let json: serde_json::Value =
        serde_json::from_str(&ok(&cfg, &["queue", "list", "--json"])).unwrap();
    assert_eq!(json[0]["sending"], true, "{json}");
    assert!(ok(&cfg, &["queue", "show", &id]).contains("next try:    being sent now"));
    let out = relay(&cfg, &["queue", "delete", &id]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "message {id} is in a delivery attempt right now: not deleted"
        )),
        "{stderr}"
    );
    // Nor made due: the attempt's own outcome, written at its end, would overwrite that.
    let out = relay(&cfg, &["queue", "retry", &id]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("in a delivery attempt right now: not made due"),
        "{out:?}"
    );
    assert!(ok(&cfg, &["queue", "retry", "--all"]).contains("1 message(s) due now"));
    upstream.release.notify_one();
    let line = d.wait_log("relay_event=\"delivered\"");
    assert!(line.contains(&id), "{line}");
    let out = relay(&cfg, &["queue", "delete", &id]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("no message"), "{out:?}");
    assert_eq!(d.terminate().code(), Some(0));
    assert!(files_in(&dir.path().join("state"), "queue").is_empty());
}

/// A message that died of old age is given `max_age` again from its move back, not sent straight back to dead/.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_expired_is_delivered_after_a_retry() {
    let mut upstream = FakeUpstream::start(&["tok"]).await;
    let (dir, cfg, mut d, _idp) = daemon(&upstream).await;
    // Written into dead/ as relay writes it: received six days ago (max_age is five), expired.
    let state = dir.path().join("state");
    let body =
        b"Received: from device.lan\r\n\tby relay.test; x\r\n\tid x\r\nSubject: old\r\n\r\nhi\r\n";
    let envelope = relay::queue::Envelope {
        id: relay::queue::QueueId::new(),
        sender: "scanner@lan.test".into(),
        recipients: vec![TO[0].into()],
        client: "192.0.2.7:1234".into(),
        helo: Some("device.lan".into()),
        user: None,
        listener: "127.0.0.1:25".into(),
        received_at: SystemTime::now() - Duration::from_secs(6 * 86400),
        body_8bit: false,
        smtputf8: false,
        via: None,
    };
    let id = envelope.id.to_string();
    let mut file = relay::queue::file::unsealed_line(&envelope);
    let seal = relay::queue::file::seal_for(body.len() as u64, &blake3::hash(body));
    let at = relay::queue::file::SEAL_AT;
    file[at..at + seal.len()].copy_from_slice(seal.as_bytes());
    file.extend_from_slice(body);
    std::fs::write(state.join(format!("dead/{id}.msg")), file).unwrap();
    std::fs::write(
        state.join(format!("dead/{id}.state")),
        r#"{"attempts": 9, "last_error": "expired after 5days in the queue; last error: 451 4.7.0 try later"}"#,
    )
    .unwrap();
    let show = ok(&cfg, &["queue", "show", &id]);
    assert!(show.contains("state:       dead"), "{show}");
    assert!(show.contains("attempts:    9"), "{show}");

    ok(&cfg, &["queue", "retry", &id]);
    let got = upstream.next().await;
    assert_eq!(got.to, [TO[0]]);
    assert!(got.data.ends_with(b"Subject: old\r\n\r\nhi\r\n"));
    let line = d.wait_log("relay_event=\"delivered\"");
    assert!(line.contains(&id), "{line}");
    assert!(!line.contains("expired"), "{line}");
    assert_eq!(d.terminate().code(), Some(0));
    assert!(files_in(&state, "dead").is_empty());
    assert!(files_in(&state, "queue").is_empty());
}

/// A state dir that is not there: an empty queue for the commands about the whole queue, "no message" for those
/// about one, every one naming the directory, and nothing created.
#[test]
fn every_queue_command_says_the_same_about_a_missing_state_dir() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nowhere");
    let cfg = dir.path().join("relay.toml");
    std::fs::write(&cfg, format!("state_dir = {missing:?}\n")).unwrap();
    let shown = missing.display().to_string();

    for args in [
        &["queue", "list"][..],
        &["queue", "retry", "--all"],
        &["queue", "retry", "--all", "--dead"],
    ] {
        let out = relay(&cfg, args);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {out:?}");
        let err = text(&out.stderr);
        assert!(
            err.contains(&shown) && err.contains("does not exist"),
            "{args:?}: {err}"
        );
    }
    assert_eq!(ok(&cfg, &["queue", "list"]).trim(), "queue is empty");
    assert!(ok(&cfg, &["queue", "retry", "--all"]).contains("0 message(s) due now"));
    assert_eq!(ok(&cfg, &["queue", "list", "--json"]).trim(), "[]");

    let id = relay::queue::QueueId::new().to_string();
    for args in [
        ["queue", "show", &id],
        ["queue", "retry", &id],
        ["queue", "delete", &id],
    ] {
        let out = relay(&cfg, &args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {out:?}");
        let err = text(&out.stderr);
        assert!(
            err.contains(&format!("no message {id}"))
                && err.contains(&shown)
                && err.contains("does not exist"),
            "{args:?}: {err}"
        );
    }
    // `relay status` says it too, in its first line.
    let out = relay(&cfg, &["status"]);
    let first = text(&out.stdout).lines().next().unwrap_or("").to_string();
    assert!(
        first.contains(&shown) && first.contains("does not exist"),
        "{first}"
    );
    assert!(!missing.exists(), "nothing created");
}

/// Terminal controls in a client's headers are shown as escapes, never sent to the sysadmin's terminal.
#[tokio::test]
async fn show_escapes_terminal_controls_in_headers() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "address = \"127.0.0.1:0\"\nauth = \"none\"");
    let d = Daemon::spawn(&cfg);
    let id = send(
        d.addr,
        &TO[..1],
        b"\x1b[2J\x1b]0;pwned\x07 \xc2\x9b6n \xe2\x80\xae",
    )
    .await;
    let show = relay(&cfg, &["queue", "show", &id]);
    assert!(show.status.success(), "{show:?}");
    let bytes = &show.stdout;
    for control in [&b"\x1b"[..], b"\x07", b"\xc2\x9b", b"\xe2\x80\xae"] {
        assert!(
            !bytes.windows(control.len()).any(|w| w == control),
            "{control:?} printed as is: {}",
            text(bytes)
        );
    }
    let shown = text(bytes);
    assert!(
        shown.contains("Subject: \\x1b[2J\\x1b]0;pwned\\x07 \\u{9b}6n \\u{202e}\n"),
        "{shown}"
    );
    // JSON escapes them itself.
    let json: serde_json::Value =
        serde_json::from_slice(&relay(&cfg, &["queue", "show", &id, "--json"]).stdout).unwrap();
    assert_eq!(json["state"], "queued");
    assert_eq!(d.terminate().code(), Some(0));
}

/// Files in `queue/` that are not messages relay can read (damaged, or a copy under another id) are not listed
/// as messages, but the listing says they are there; a retry of one says why it is left, rather than "due now".
#[tokio::test]
async fn list_and_retry_tell_about_files_that_are_not_messages() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "address = \"127.0.0.1:0\"\nauth = \"none\"");
    let d = Daemon::spawn(&cfg);
    let id = send(d.addr, &TO[..1], b"kept").await;
    assert_eq!(d.terminate().code(), Some(0));

    let queue = dir.path().join("state/queue");
    let damaged = relay::queue::QueueId::new().to_string();
    std::fs::write(queue.join(format!("{damaged}.msg")), b"garbage\n").unwrap();
    let copy = relay::queue::QueueId::new().to_string();
    std::fs::copy(
        queue.join(format!("{id}.msg")),
        queue.join(format!("{copy}.msg")),
    )
    .unwrap();

    let out = relay(&cfg, &["queue", "list"]);
    assert!(out.status.success(), "{out:?}");
    let listed = text(&out.stdout);
    assert!(
        listed.contains(&id) && !listed.contains(&copy) && listed.contains("1 message(s)"),
        "{listed}"
    );
    let err = text(&out.stderr);
    assert!(
        err.contains("2 file(s)") && err.contains(&queue.display().to_string()),
        "{err}"
    );
    // The JSON stays one document; the note goes to stderr there too.
    let out = relay(&cfg, &["queue", "list", "--json"]);
    let all: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(all.as_array().map(Vec::len), Some(1));
    assert!(text(&out.stderr).contains("2 file(s)"));

    for bad in [&damaged, &copy] {
        let out = relay(&cfg, &["queue", "retry", bad]);
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        let err = text(&out.stderr);
        assert!(
            err.contains(bad.as_str()) && err.contains("left as it is"),
            "{err}"
        );
        assert!(!text(&out.stdout).contains("due now"));
    }
    assert!(ok(&cfg, &["queue", "retry", &id]).contains("1 message(s) due now"));
}

/// A message refused for itself (a recipient that does not exist) goes to dead/ and makes `relay status` ask for
/// attention, but leaves its account `ok`: the account goes on sending other mail. A refusal about what the
/// account may do (Microsoft's SendAsDenied) makes it `failing`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_refused_for_itself_leaves_its_account_ok() {
    let upstream = FakeUpstream::start(&["tok"]).await;
    upstream.answer_rcpt(TO[0], "550 5.1.1 <a@example.com>: user unknown");
    let (_dir, cfg, mut d, _idp) = daemon(&upstream).await;
    let id = send(d.addr, &TO[..1], b"to nobody").await;
    let line = d.wait_log("relay_event=\"dead\"");
    assert!(line.contains(&id), "{line}");
    let status = |cfg: &Path| {
        let out = relay(cfg, &["status", "--json"]);
        let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        (out.status.code(), doc)
    };
    let (code, doc) = status(&cfg);
    assert_eq!(code, Some(1), "dead mail needs attention: {doc}");
    assert_eq!(doc["queue"]["dead"], 1, "{doc}");
    let account = &doc["accounts"][0];
    assert_eq!(account["state"], "ok", "{doc}");
    assert_eq!(account["last_delivery"]["outcome"], "dead", "{doc}");

    *upstream.data_reply.lock().unwrap() =
        "550 5.7.60 SMTP; Client does not have permissions to send as this sender".into();
    let id = send(d.addr, &TO[1..], b"as someone else").await;
    let line = d.wait_log("relay_event=\"dead\"");
    assert!(line.contains(&id), "{line}");
    let (_, doc) = status(&cfg);
    assert_eq!(doc["accounts"][0]["state"], "failing", "{doc}");
    assert_eq!(d.terminate().code(), Some(0));
}

/// A device's login leaked and the queue filled with spam: `relay queue delete --all` with `--user` or `--from`
/// removes those messages and no other; several ids at once are each said, and one that is not there fails the
/// command without stopping the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_purges_by_login_or_sender_and_takes_several_ids() {
    use base64::Engine;
    // No account: mail is queued and stays there.
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        "address = \"127.0.0.1:0\"\nauth = \"optional\"\nplaintext_auth = true\n",
    );
    let d = Daemon::spawn(&cfg);
    let plain = base64::engine::general_purpose::STANDARD.encode(format!("\0printer\0{PASSWORD}"));
    let queue = |login: bool, from: &'static str| {
        let plain = plain.clone();
        let addr = d.addr;
        async move {
            let mut c = RawClient::ready(addr).await;
            if login {
                c.cmd(&format!("AUTH PLAIN {plain}"), 235).await;
            }
            c.cmd(&format!("MAIL FROM:<{from}>"), 250).await;
            c.cmd("RCPT TO:<a@example.com>", 250).await;
            c.cmd("DATA", 354).await;
            c.send(b"Subject: x\r\n\r\nhello\r\n.\r\n").await;
            let reply = c.expect(250).await;
            c.cmd("QUIT", 221).await;
            reply.trim_end().rsplit(' ').next().unwrap().to_string()
        }
    };
    for _ in 0..3 {
        queue(true, "spam@forged.test").await;
    }
    let spam_unauthenticated = queue(false, "SPAM@forged.test").await;
    let kept: Vec<String> = [
        queue(false, "scanner@lan.test").await,
        queue(false, "").await,
    ]
    .into_iter()
    .collect();

    let out = relay(&cfg, &["queue", "delete", "--from", "spam@forged.test"]);
    assert_eq!(out.status.code(), Some(1), "--from needs --all or --dead");
    assert!(text(&out.stderr).contains("--all"), "{out:?}");
    // A user the config does not have: said, not only "deleted 0".
    let out = relay(&cfg, &["queue", "delete", "--all", "--user", "prnter"]);
    assert_eq!(text(&out.stdout).trim(), "deleted 0 queued message(s)");
    assert!(
        text(&out.stderr).contains("no [[user]] is named \"prnter\""),
        "{out:?}"
    );
    let out = relay(&cfg, &["queue", "delete", "--all", "--user", "printer"]);
    assert_eq!(text(&out.stdout).trim(), "deleted 3 queued message(s)");
    assert!(text(&out.stderr).is_empty(), "{out:?}");
    let out = ok(
        &cfg,
        &["queue", "delete", "--all", "--from", "Spam@Forged.test"],
    );
    assert_eq!(out.trim(), "deleted 1 queued message(s)");
    let list = ok(&cfg, &["queue", "list"]);
    assert!(!list.contains(&spam_unauthenticated), "{list}");
    assert!(kept.iter().all(|id| list.contains(id)), "{list}");
    assert_eq!(
        files_in(&dir.path().join("state"), "queue").len(),
        2,
        "{list}"
    );

    let missing = "0".repeat(32);
    let out = relay(&cfg, &["queue", "delete", &kept[0], &missing, &kept[1]]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stdout),
        format!("deleted {}\ndeleted {}\n", kept[0], kept[1])
    );
    assert!(
        text(&out.stderr).contains(&format!("no message {missing}")),
        "{out:?}"
    );
    assert!(ok(&cfg, &["queue", "list"]).contains("queue is empty"));
    assert_eq!(d.terminate().code(), Some(0));
}
