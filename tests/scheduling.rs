//! How the scheduler starts attempts, through the real binary: no more than there are connections free.

mod common;

use common::idp::{accounts_config, idp_issuing};
use common::upstream::{DAY_USED_UP, FakeUpstream};
use common::*;

const BODY: &[u8] = b"Subject: scan\r\n\r\nhello\r\n";

/// `relay serve` with one account, `office`, delivering to `upstream` (`account` added to it), and mail past its
/// `max_age` as soon as it is queued (0 s).
async fn office(
    upstream: &FakeUpstream,
    account: &str,
) -> (tempfile::TempDir, wiremock::MockServer, Daemon) {
    let dir = tempfile::tempdir().unwrap();
    let idp = idp_issuing("tok").await;
    let config = accounts_config(
        dir.path(),
        &idp.uri(),
        &[("office", upstream)],
        "",
        &format!("{account}\n[queue]\nmax_age = \"0s\"\n"),
    );
    let daemon = Daemon::spawn(&config);
    (dir, idp, daemon)
}

/// The only account has one connection, held by a message whose final dot the upstream has not answered yet. A
/// second message, past `max_age` (0 s here) from the start, waits for that connection and is tried once it frees:
/// mail past its age is tried once more before it goes to dead/, as Postfix does. (It went to dead/ untried
/// while the connection was busy, bounced though the upstream would have taken it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_message_waits_for_a_busy_connection_and_is_tried() {
    let mut upstream = FakeUpstream::start(&["tok"]).await;
    *upstream.data_reply.lock().unwrap() = "HOLD 250 2.0.0 OK".into();
    let (dir, _idp, mut d) = office(&upstream, "max_connections = 1").await;
    let held = send_message(d.addr, BODY).await;
    // The fake has it and holds its reply: the one connection is taken.
    upstream.next().await;
    *upstream.data_reply.lock().unwrap() = "250 2.0.0 OK".into();
    let waiting = send_message(d.addr, b"Subject: second\r\n\r\nhello\r\n").await;
    upstream.release.notify_one();

    let delivered = [
        d.wait_log("relay_event=\"delivered\""),
        d.wait_log("relay_event=\"delivered\""),
    ]
    .join("\n");
    assert!(
        delivered.contains(&held) && delivered.contains(&waiting),
        "{delivered}"
    );
    let got = upstream.next().await;
    assert!(String::from_utf8_lossy(&got.data).contains("Subject: second"));
    assert!(files_in(&dir.path().join("state"), "dead").is_empty());
    let datas = upstream
        .commands
        .lock()
        .unwrap()
        .iter()
        .filter(|c| c.starts_with("DATA"))
        .count();
    assert_eq!(datas, 2, "each went once");
}

/// Mail past `max_age` (0 s) that its account cannot try for long, its provider having asked it to pause, goes to
/// dead/ with the provider's words: the message refused with its reply, and one never tried with the pause and the
/// reply that asked for it (it said only "never tried").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_mail_held_by_a_pause_goes_to_dead_with_the_providers_words() {
    let upstream = FakeUpstream::start(&["tok"]).await;
    *upstream.data_reply.lock().unwrap() = DAY_USED_UP.into();
    let (_dir, _idp, mut d) = office(&upstream, "").await;
    let refused = send_message(d.addr, BODY).await;
    let first = d.wait_log("relay_event=\"dead\"");
    assert!(
        first.contains(&refused) && first.contains("last error: 550 5.4.5 Daily"),
        "{first}"
    );
    let untried = send_message(d.addr, BODY).await;
    let second = d.wait_log("relay_event=\"dead\"");
    assert!(
        second.contains(&untried)
            && second.contains("never tried; the provider asked account office to pause until ")
            && second.contains("(550 5.4.5 Daily"),
        "{second}"
    );
}

/// A message held by its account's pause says why with the provider's words (`relay queue show`): the bounce, if
/// the hold outlasts `max_age`, says them too (it said only "held: the provider asked the account to pause").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_held_by_a_pause_keeps_the_providers_words() {
    let upstream = FakeUpstream::start(&["tok"]).await;
    *upstream.data_reply.lock().unwrap() = DAY_USED_UP.into();
    let dir = tempfile::tempdir().unwrap();
    let idp = idp_issuing("tok").await;
    let config = accounts_config(dir.path(), &idp.uri(), &[("office", &upstream)], "", "");
    let mut d = Daemon::spawn(&config);
    send_message(d.addr, BODY).await;
    d.wait_log("relay_event=\"paused\"");
    let held = send_message(d.addr, b"Subject: second\r\n\r\nhello\r\n").await;
    let line = d.wait_log("relay_event=\"held\"");
    assert!(line.contains(&held), "{line}");
    let show = |id: &str| {
        let out = run_bounded(
            std::process::Command::new(relay_bin())
                .args(["queue", "show", id, "--config"])
                .arg(&config),
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let shown = show(&held);
    assert!(
        shown.contains("held: the provider asked the account to pause until ")
            && shown.contains("(550 5.4.5 Daily"),
        "{shown}"
    );
    // Mail that arrives during the pause is parked untried, with no state of its own: `queue show` says what it
    // waits for (it said "next try: now" and "last error: -" for the hour).
    let later = send_message(d.addr, b"Subject: third\r\n\r\nhello\r\n").await;
    let shown = show(&later);
    assert!(
        shown.contains(
            "waits for:   account office (failing): the provider asked it to pause until "
        ) && shown.contains("550 5.4.5 Daily"),
        "{shown}"
    );
}

/// A last try past `max_age` (0 s here) that finds its account's per-minute window full waits for the window, as it
/// waits for a busy connection: held, not sent to dead/ untried (a day's limit or a pause would send it there).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_message_waits_for_a_minutes_limit() {
    let mut upstream = FakeUpstream::start(&["tok"]).await;
    let (dir, _idp, mut d) = office(&upstream, "rate = { per_minute = 1 }").await;
    send_message(d.addr, BODY).await;
    upstream.next().await;
    let second = send_message(d.addr, b"Subject: second\r\n\r\nhello\r\n").await;
    let line = d.wait_log_any(&["relay_event=\"held\"", "relay_event=\"dead\""]);
    assert!(
        line.contains("relay_event=\"held\"") && line.contains(&second),
        "{line}"
    );
    assert!(files_in(&dir.path().join("state"), "dead").is_empty());
}

/// The scheduler stops turning (a test hook) while more messages arrive than its announcements of new mail hold
/// (4,096; 16 here, through another test hook): those that found them full are on disk all the same, and are read
/// from there once it turns again. Every message is delivered, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mail_accepted_while_the_scheduler_lags_is_read_from_disk() {
    const CONNECTIONS: usize = 4;
    const EACH: usize = 10;
    let mut upstream = FakeUpstream::start(&["tok"]).await;
    let dir = tempfile::tempdir().unwrap();
    let idp = idp_issuing("tok").await;
    let config = accounts_config(dir.path(), &idp.uri(), &[("office", &upstream)], "", "");
    let wedge = dir.path().join("wedge");
    std::fs::write(&wedge, b"").unwrap();
    let mut d = Daemon::spawn_with(&config, |c| {
        c.env("RELAY_TEST_WEDGE_SCHEDULER", &wedge)
            .env("RELAY_TEST_ANNOUNCEMENTS_HELD", "16");
    });
    d.wait_log("wedged by the test hook");

    let mut senders = tokio::task::JoinSet::new();
    for c in 0..CONNECTIONS {
        let addr = d.addr;
        senders.spawn(async move {
            let mut client = RawClient::ready(addr).await;
            for i in 0..EACH {
                // Pipelined, as relay offers: the three commands in one write.
                client
                    .send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
                    .await;
                for code in [250, 250, 354] {
                    client.expect(code).await;
                }
                client
                    .send(format!("Subject: lag {c}-{i}\r\n\r\nhello\r\n.\r\n").as_bytes())
                    .await;
                client.expect(250).await;
            }
            client.cmd("QUIT", 221).await;
        });
    }
    while let Some(sent) = senders.join_next().await {
        sent.expect("sender");
    }
    assert_eq!(
        files_in(&dir.path().join("state"), "queue").len(),
        CONNECTIONS * EACH,
        "all queued, none delivered while the scheduler is stuck"
    );

    std::fs::remove_file(&wedge).unwrap();
    let mut subjects = std::collections::HashSet::new();
    for _ in 0..CONNECTIONS * EACH {
        let got = upstream.next().await;
        let text = String::from_utf8_lossy(&got.data).into_owned();
        let subject = text
            .lines()
            .find(|l| l.starts_with("Subject: lag "))
            .expect("the subject")
            .to_string();
        assert!(subjects.insert(subject.clone()), "{subject} sent twice");
    }
    assert_eq!(subjects.len(), CONNECTIONS * EACH);
}
