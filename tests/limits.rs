//! Provider sending limits through real sockets: mail over a limit waits in the queue and goes when the window
//! frees, the counts survive a crash, and a route naming two accounts spreads its mail over both.

mod common;

use std::time::{Duration, SystemTime};

use common::idp::{account_top, idp_issuing, relay_with_account_and};
use common::upstream::{DAY_USED_UP, FakeUpstream, Received};
use common::*;

const LISTENER: &str = "[[listener]]\naddress = \"127.0.0.1:0\"\nauth = \"none\"\n";

/// A client-credentials account named `name`, pointed at the fakes (the secret file is `{dir}/secret`, which
/// [`account_top`] writes).
fn account(name: &str, idp: &str, upstream: &FakeUpstream, more: &str) -> String {
    format!(
        "[[account]]\nname = \"{name}\"\nprovider = \"generic\"\nflow = \"client_credentials\"\nmailbox = \"{name}@example.com\"\nclient_id = \"cid-123\"\nclient_secret_file = \"{{dir}}/secret\"\ntoken_url = \"{idp}/token\"\nscope = \"s\"\nsmtp_host = \"127.0.0.1\"\nsmtp_port = {port}\nsmtp_tls = \"none\"\n{more}\n",
        port = upstream.addr.port()
    )
}

/// A relay whose route for `*@example.com` names two accounts, `a` on `first` and `b` on `second`; `more`: tables
/// after it (`[queue]`).
async fn route_of_two(
    idp: &wiremock::MockServer,
    first: &FakeUpstream,
    second: &FakeUpstream,
    more: &str,
) -> TestRelay {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "s3cret-value\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o640)).unwrap();
    let top = format!(
        "{}{}[[route]]\nrecipient = \"*@example.com\"\naccounts = [\"a\", \"b\"]\n{more}",
        account("a", &idp.uri(), first, ""),
        account("b", &idp.uri(), second, ""),
    );
    TestRelay::start_with(dir, &top, LISTENER).await
}

/// Sends one message to `recipients` on a fresh connection; returns its queue id.
async fn send_to(addr: std::net::SocketAddr, recipients: &[&str], subject: &str) -> String {
    let mut c = RawClient::ready(addr).await;
    c.cmd("MAIL FROM:<nas@example.com>", 250).await;
    for r in recipients {
        c.cmd(&format!("RCPT TO:<{r}>"), 250).await;
    }
    c.cmd("DATA", 354).await;
    c.send(format!("Subject: {subject}\r\n\r\nbody\r\n.\r\n").as_bytes())
        .await;
    let reply = c.expect(250).await;
    c.cmd("QUIT", 221).await;
    reply.trim_end().rsplit(' ').next().unwrap().to_string()
}

/// The next message an upstream accepts, waiting at most `limit`.
async fn next_within(upstream: &mut FakeUpstream, limit: Duration) -> Received {
    tokio::time::timeout(limit, upstream.received.recv())
        .await
        .expect("a delivery in time")
        .expect("the fake upstream runs")
}

fn subject(r: &Received) -> String {
    let text = String::from_utf8_lossy(&r.data);
    text.lines()
        .find_map(|l| l.strip_prefix("Subject: "))
        .unwrap_or_default()
        .to_string()
}

/// The case, at its scale: 100 messages through an account allowed 30 a minute. None is refused, each
/// arrives once, and no 60 seconds at the upstream hold more than 30: the rest waits in the queue and goes as
/// each window frees (about three minutes in all).
#[tokio::test]
async fn a_hundred_messages_at_thirty_a_minute_all_arrive_within_the_limit() {
    const MESSAGES: usize = 100;
    const PER_MINUTE: usize = 30;
    let idp = idp_issuing("tok").await;
    let mut upstream = FakeUpstream::start(&["tok"]).await;
    let mut relay = relay_with_account_and(
        &idp,
        &upstream,
        &format!("rate = {{ per_minute = {PER_MINUTE} }}"),
    )
    .await;
    for i in 0..MESSAGES {
        send_to(relay.addr(), &["ops@example.com"], &format!("m{i:03}")).await;
    }
    let mut got = Vec::new();
    for _ in 0..MESSAGES {
        // Each window's mail goes when the window frees: never more than a minute and a bit apart.
        got.push(next_within(&mut upstream, Duration::from_secs(150)).await);
    }
    relay.drained().await;
    assert!(files_in(&relay.state(), "dead").is_empty(), "none refused");
    let mut subjects: Vec<String> = got.iter().map(subject).collect();
    // (Not compared with the order received: four deliveries run at once, and finish in any order.)
    subjects.sort();
    subjects.dedup();
    assert_eq!(subjects.len(), MESSAGES, "each message once");
    let mut at: Vec<SystemTime> = got.iter().map(|r| r.at).collect();
    at.sort();
    for w in at.windows(PER_MINUTE + 1) {
        let span = w[PER_MINUTE].duration_since(w[0]).unwrap();
        assert!(
            span >= Duration::from_secs(60),
            "{} messages within {span:?}",
            PER_MINUTE + 1
        );
    }
}

/// The daily recipient count survives a crash: after SIGKILL and a restart, mail over the day's limit waits (not
/// an attempt: no retry state), and `relay status` shows the account at its limit.
#[tokio::test]
async fn the_day_count_survives_a_crash_and_holds_mail_after_the_restart() {
    let idp = idp_issuing("tok").await;
    let mut upstream = FakeUpstream::start(&["tok"]).await;
    let dir = tempfile::tempdir().unwrap();
    let top = account_top(
        dir.path(),
        &idp.uri(),
        &upstream,
        "rate = { recipients_per_day = 3 }",
    )
    .replace("{dir}", &dir.path().display().to_string());
    let config = dir.path().join("relay.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = {:?}\nhostname = \"relay.test\"\n{top}\n{LISTENER}",
            dir.path().join("state")
        ),
    )
    .unwrap();

    let mut daemon = Daemon::spawn(&config);
    send_to(
        daemon.addr,
        &["a@example.com", "b@example.com", "c@example.com"],
        "first",
    )
    .await;
    let got = upstream.next().await;
    assert_eq!(got.to.len(), 3);
    daemon.wait_log("relay_event=\"delivered\"");
    drop(daemon); // SIGKILL: no clean shutdown

    let mut daemon = Daemon::spawn(&config);
    let id = send_to(daemon.addr, &["d@example.com"], "second").await;
    let held = daemon.wait_log("relay_event=\"held\"");
    assert!(held.contains(&id), "{held}");
    let state = dir.path().join("state");
    // Waiting is not an attempt; a day's hold is noted for `relay queue` and `relay status`.
    let noted: serde_json::Value =
        serde_json::from_slice(&std::fs::read(state.join(format!("queue/{id}.state"))).unwrap())
            .unwrap();
    assert_eq!(noted["attempts"], 0, "waiting is not an attempt: {noted}");
    assert!(noted["held_until"].is_string(), "{noted}");
    let (code, json) = status_json(&config);
    assert_eq!(code, Some(1), "a used-up day needs attention");
    let rate = &json["accounts"][0]["rate"];
    assert_eq!(rate["recipients_last_24h"], 3, "{json}");
    assert_eq!(rate["recipients_per_day"], 3, "{json}");
    let text = std::process::Command::new(relay_bin())
        .args(["status", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout).into_owned();
    assert!(text.contains("3/3 recipients in the last 24 h"), "{text}");
    assert!(
        upstream.received.try_recv().is_err(),
        "nothing went over the limit"
    );
    assert_eq!(daemon.terminate().code(), Some(0));
    assert_eq!(queued_in(&state).len(), 1, "the held message stays queued");
}

/// The binary with two accounts on their own routes: `a` (for `*@a.example`, on `limited`) may send to 3
/// recipients a day, `b` (for `*@b.example`, on a fake refusing with a 451 at each try). One message to one
/// recipient has gone through `a`, and one to three (`big`) is held: two of the day's three are left, and three
/// recipients do not fit until the first one's 24 hours are over.
struct DayLimited {
    daemon: Daemon,
    limited: FakeUpstream,
    big: String,
    dir: tempfile::TempDir,
    _refusing: FakeUpstream,
    _idp: wiremock::MockServer,
}

impl DayLimited {
    /// `queue`: the `[queue]` table's lines.
    async fn start(queue: &str) -> DayLimited {
        DayLimited::start_with(queue, false).await
    }

    /// `first_in_flight`: the first message's delivery is not over when `big` is held (the upstream holds its
    /// reply to the dot until `limited.release` is notified; its place in the day is taken all the same).
    async fn start_with(queue: &str, first_in_flight: bool) -> DayLimited {
        let idp = idp_issuing("tok").await;
        let mut limited = FakeUpstream::start(&["tok"]).await;
        let refusing = FakeUpstream::start(&["tok"]).await;
        *refusing.data_reply.lock().unwrap() = "451 4.3.0 try again later".into();
        let dir = tempfile::tempdir().unwrap();
        write_private(&dir.path().join("secret"), "s3cret-value\n");
        let top = format!(
            "{}{}[[route]]\nrecipient = \"*@a.example\"\naccounts = [\"a\"]\n[[route]]\nrecipient = \"*@b.example\"\naccounts = [\"b\"]\n[queue]\n{queue}\n",
            account(
                "a",
                &idp.uri(),
                &limited,
                "rate = { recipients_per_day = 3 }"
            ),
            account("b", &idp.uri(), &refusing, ""),
        );
        let config = write_config_with(
            dir.path(),
            &top,
            "address = \"127.0.0.1:0\"\nauth = \"none\"",
        );
        let mut daemon = Daemon::spawn(&config);
        if first_in_flight {
            *limited.data_reply.lock().unwrap() = "HOLD 250 2.0.0 OK".into();
        }
        send_to(daemon.addr, &["one@a.example"], "first").await;
        next_within(&mut limited, LIMIT).await;
        if !first_in_flight {
            daemon.wait_log("relay_event=\"delivered\"");
        }
        let three = ["x@a.example", "y@a.example", "z@a.example"];
        let big = send_to(daemon.addr, &three, "big").await;
        let held = daemon.wait_log("relay_event=\"held\"");
        assert!(held.contains(&big), "{held}");
        DayLimited {
            daemon,
            limited,
            big,
            dir,
            _refusing: refusing,
            _idp: idp,
        }
    }

    /// Stops the daemon (SIGTERM) and starts it again on the same config and state.
    fn restart(self) -> DayLimited {
        let config = self.dir.path().join("relay.toml");
        assert_eq!(self.daemon.terminate().code(), Some(0));
        DayLimited {
            daemon: Daemon::spawn(&config),
            ..self
        }
    }

    /// Waits until the other account (`b`, whose upstream refuses every message for now) has deferred `clock`
    /// twice more: the time of two of its retry steps, in which the scheduler turns at least twice.
    fn two_retries_of(&mut self, clock: &str) {
        for _ in 0..2 {
            let line = self.daemon.wait_log("relay_event=\"deferred\"");
            assert!(line.contains(clock), "{line}");
        }
    }

    fn held_lines(&self) -> usize {
        self.daemon
            .unmatched()
            .iter()
            .filter(|l| l.contains(&self.big) && l.contains("relay_event=\"held\""))
            .count()
    }

    /// Nothing went over the limit, and the daemon stops cleanly.
    fn end(mut self) {
        assert!(
            self.limited.received.try_recv().is_err(),
            "nothing over the limit"
        );
        assert_eq!(self.daemon.terminate().code(), Some(0));
    }
}

/// A message whose recipients do not fit what is left of the day's allowance waits for the window: it is not
/// taken up again at each turn of the scheduler while the account has room for smaller mail (it was, every 2 s,
/// with a "held" line each time, all day). Time is told by the other account's retries: between its first and
/// third attempts (two 3 s waits) the scheduler turns at least twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mail_that_does_not_fit_the_day_is_held_once_not_every_tick() {
    let mut t = DayLimited::start("retry = [\"3s\"]").await;
    let clock = send_to(t.daemon.addr, &["ops@b.example"], "clock").await;
    // (Counted from the clock's first attempt: the first message's end, if the scheduler learns of it after the
    // hold, rightly takes the big one up once more.)
    assert!(
        t.daemon
            .wait_log("relay_event=\"deferred\"")
            .contains(&clock)
    );
    let before = t.held_lines();
    for _ in 0..2 {
        let line = t.daemon.wait_log("relay_event=\"deferred\"");
        assert!(line.contains(&clock), "{line}");
    }
    assert_eq!(
        t.held_lines(),
        before,
        "taken up again while it cannot fit: {:?}",
        t.daemon.unmatched()
    );
    t.end();
}

/// Mail held for the day's room keeps the newer mail of its account behind it across a restart, when every
/// queued message is due at once: the newer, smaller message went first before (its attempt, started last, was
/// run first), leaving the held one behind it, contrary to the order the README promises.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_mail_keeps_the_newer_mail_behind_it_across_a_restart() {
    let t = DayLimited::start("retry = [\"2s\"]").await;
    let small = send_to(t.daemon.addr, &["two@a.example"], "small").await;
    let mut t = t.restart();
    let held = t.daemon.wait_log("relay_event=\"held\"");
    assert!(held.contains(&t.big), "{held}");
    let clock = send_to(t.daemon.addr, &["ops@b.example"], "clock").await;
    t.two_retries_of(&clock);
    let queue = t.dir.path().join("state/queue");
    assert!(
        queue.join(format!("{small}.msg")).exists(),
        "still behind the held one"
    );
    t.end();
}

/// A message held for recipients that do not fit is not taken up again (and held, and logged, again) each time a
/// delivery of its account ends while they still do not fit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_ending_does_not_take_up_again_mail_that_still_does_not_fit() {
    let mut t = DayLimited::start_with("retry = [\"2s\"]", true).await;
    *t.limited.data_reply.lock().unwrap() = "250 2.0.0 OK".into();
    t.limited.release.notify_one();
    t.daemon.wait_log("relay_event=\"delivered\"");
    let clock = send_to(t.daemon.addr, &["ops@b.example"], "clock").await;
    t.two_retries_of(&clock);
    assert_eq!(t.held_lines(), 0, "held again: {:?}", t.daemon.unmatched());
    t.end();
}

/// Recipients the upstream refuses at RCPT were sent nothing, and take nothing of the day's allowance: after a
/// message to three recipients of which two were refused, a day of 3 still has room for two more (before, all
/// three counted, and the next message waited a day).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recipients_the_upstream_refuses_do_not_count_towards_the_day() {
    let mut upstream = FakeUpstream::start(&["tok"]).await;
    upstream.answer_rcpt("b@example.com", "550 5.1.1 <b@example.com>: user unknown");
    upstream.answer_rcpt("c@example.com", "550 5.1.1 <c@example.com>: user unknown");
    let dir = tempfile::tempdir().unwrap();
    let idp = idp_issuing("tok").await;
    let config = common::idp::accounts_config(
        dir.path(),
        &idp.uri(),
        &[("office", &upstream)],
        "",
        "rate = { recipients_per_day = 3 }\n",
    );
    let d = Daemon::spawn(&config);
    send_to(
        d.addr,
        &["a@example.com", "b@example.com", "c@example.com"],
        "first",
    )
    .await;
    let first = next_within(&mut upstream, Duration::from_secs(20)).await;
    assert_eq!(first.to, ["a@example.com"]);
    send_to(d.addr, &["d@example.com", "e@example.com"], "second").await;
    let second = next_within(&mut upstream, Duration::from_secs(20)).await;
    assert_eq!(subject(&second), "second", "not held for the day");
    assert_eq!(d.terminate().code(), Some(0));
}

/// Mail held for the day's window says so where a sysadmin looks: `relay queue list` gives the hold's end
/// instead of "now", `relay queue show` says until when and why, and `relay status` counts it and needs
/// attention (it said the account was ok, exit 0, and the message due now, while it waited a day).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mail_held_for_the_day_says_so_in_queue_list_and_status() {
    let t = DayLimited::start("").await;
    let config = t.dir.path().join("relay.toml");
    let (code, status) = status_json(&config);
    assert_eq!(status["queue"]["held"], 1, "{status:#}");
    assert!(status["queue"]["held_until"].is_string(), "{status:#}");
    assert_eq!(code, Some(1), "{status:#}");
    let run = |args: &[&str]| {
        let out = std::process::Command::new(relay_bin())
            .args(args)
            .arg("--config")
            .arg(&config)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let listed: serde_json::Value =
        serde_json::from_str(&run(&["queue", "list", "--json"])).unwrap();
    let big = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["id"] == t.big.as_str())
        .expect("listed");
    assert!(big["held_until"].is_string(), "{big:#}");
    let text = run(&["queue", "list"]);
    let row = text.lines().find(|l| l.contains(&t.big)).unwrap();
    assert!(row.contains("held, in "), "{text}");
    let shown = run(&["queue", "show", &t.big]);
    assert!(
        shown.contains("held until:") && shown.contains("next try:    when its hold ends"),
        "{shown}"
    );
    assert!(
        shown.contains("held by the account's sending limits until"),
        "{shown}"
    );
    let human = run(&["status"]);
    assert!(human.contains("held: 1 message(s)"), "{human}");
    t.end();
}

/// A message held for the day's window does not keep the mail behind it waiting once it is deleted with `relay
/// queue delete` (which tells the daemon nothing): the small message behind it goes (it waited for the big one's
/// window, a day, before).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_message_deleted_frees_the_mail_behind_it() {
    let mut t = DayLimited::start("").await;
    let small = send_to(t.daemon.addr, &["two@a.example"], "small").await;
    let out = run_bounded(
        std::process::Command::new(relay_bin())
            .args(["queue", "delete", &t.big, "--config"])
            .arg(t.dir.path().join("relay.toml")),
    );
    assert!(out.status.success(), "{out:?}");
    let got = next_within(&mut t.limited, LIMIT).await;
    assert_eq!(subject(&got), "small");
    let delivered = t.daemon.wait_log("relay_event=\"delivered\"");
    assert!(delivered.contains(&small), "{delivered}");
    t.end();
}

/// A message held for the day's window that expires (`max_age`) meanwhile goes to dead/ when it expires, not when
/// the window frees (a day later).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_message_expires_on_time() {
    let mut t = DayLimited::start("max_age = \"4s\"").await;
    let dead = t.daemon.wait_log("relay_event=\"dead\"");
    assert!(dead.contains(&t.big) && dead.contains("expired"), "{dead}");
    let files = files_in(&t.dir.path().join("state"), "dead");
    assert!(
        !files.is_empty() && files.iter().all(|f| f.starts_with(&t.big)),
        "{files:?}"
    );
    t.end();
}

/// Sends four messages (m0 to m3) and waits until `upstream` got all four.
async fn four_sent_all_through(relay: &TestRelay, upstream: &mut FakeUpstream) {
    for i in 0..4 {
        send_to(relay.addr(), &["ops@example.com"], &format!("m{i}")).await;
    }
    let mut subjects = std::collections::HashSet::new();
    while subjects.len() < 4 {
        let got = upstream.next().await;
        let text = String::from_utf8_lossy(&got.data).into_owned();
        subjects.extend(
            text.lines()
                .find(|l| l.starts_with("Subject: "))
                .map(str::to_string),
        );
    }
}

/// A route's account `a` has room for one more recipient today and `b` has its one connection in use: a message
/// to two waits for `b`'s connection (a delivery's end), and goes through `b`. It was logged "held by the
/// account's sending limits" until `a`'s day ends, and written down as held for `relay status`, though `b` took
/// it seconds later; and while it waited, `a`'s room for one had it taken up again at once, over and over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mail_waiting_for_a_busy_account_is_not_held_by_the_others_limit() {
    let idp = idp_issuing("tok").await;
    let mut limited = FakeUpstream::start(&["tok"]).await;
    let mut busy = FakeUpstream::start(&["tok"]).await;
    let dir = tempfile::tempdir().unwrap();
    write_private(&dir.path().join("secret"), "s3cret-value\n");
    let top = format!(
        "{}{}[[route]]\nrecipient = \"*@example.com\"\naccounts = [\"a\", \"b\"]\n",
        account(
            "a",
            &idp.uri(),
            &limited,
            "rate = { recipients_per_day = 2 }"
        ),
        account("b", &idp.uri(), &busy, "max_connections = 1"),
    );
    let config = write_config_with(
        dir.path(),
        &top,
        "address = \"127.0.0.1:0\"\nauth = \"none\"",
    );
    let mut daemon = Daemon::spawn_with(&config, |c| {
        c.env("RUST_LOG", "relay=debug");
    });
    // `a` first (the same share of the day, config order): one of its day's two recipients is used.
    send_to(daemon.addr, &["one@example.com"], "first").await;
    next_within(&mut limited, LIMIT).await;
    daemon.wait_log("relay_event=\"delivered\"");
    *busy.data_reply.lock().unwrap() = "HOLD 250 2.0.0 OK".into();
    send_to(daemon.addr, &["two@example.com"], "second").await;
    next_within(&mut busy, LIMIT).await;
    *busy.data_reply.lock().unwrap() = "250 2.0.0 OK".into();
    let third = send_to(
        daemon.addr,
        &["three@example.com", "four@example.com"],
        "third",
    )
    .await;
    let line = daemon.wait_log_any(&["waiting: every connection", "relay_event=\"held\""]);
    assert!(
        line.contains(&third) && line.contains("waiting: every connection"),
        "{line}"
    );
    // A while for a loop to show (a command run to its end), then `b`'s connection frees.
    run_bounded(
        std::process::Command::new(relay_bin())
            .args(["status", "--config"])
            .arg(&config),
    );
    busy.release.notify_one();
    assert_eq!(subject(&next_within(&mut busy, LIMIT).await), "third");
    let log = daemon.terminate_with_log();
    assert!(
        !log.iter().any(|l| l.contains("relay_event=\"held\"")),
        "{log:#?}"
    );
    // Taken up at most at the scheduler's ticks (2 s apart), not in a loop.
    let retaken = log
        .iter()
        .filter(|l| l.contains("waiting: every connection") && l.contains(&third))
        .count();
    assert!(retaken <= 3, "taken up again {retaken} times");
}

/// Past `max_age` (0 s), a message refused by one account's used-up quota is not bounced: the refusal is the
/// account's, not the message's, and the route's other account takes it (it went to dead/ untried through `b`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_message_refused_by_a_paused_account_goes_through_the_other() {
    let idp = idp_issuing("tok").await;
    let first = FakeUpstream::start(&["tok"]).await;
    *first.data_reply.lock().unwrap() = DAY_USED_UP.into();
    let mut second = FakeUpstream::start(&["tok"]).await;
    let mut relay = route_of_two(&idp, &first, &second, "[queue]\nmax_age = \"0s\"\n").await;
    four_sent_all_through(&relay, &mut second).await;
    relay.drained().await;
    assert!(files_in(&relay.state(), "dead").is_empty());
}

/// One account of a route whose provider says its daily quota is used up is paused; the route's other account
/// takes its mail meanwhile, the refused message included (at its next try), and nothing goes to dead/.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_account_leaves_its_routes_mail_to_the_other() {
    let idp = idp_issuing("tok").await;
    let first = FakeUpstream::start(&["tok"]).await;
    *first.data_reply.lock().unwrap() = DAY_USED_UP.into();
    let mut second = FakeUpstream::start(&["tok"]).await;
    let mut relay = route_of_two(&idp, &first, &second, "[queue]\nretry = [\"1s\"]\n").await;
    four_sent_all_through(&relay, &mut second).await;
    relay.drained().await;
    assert!(files_in(&relay.state(), "dead").is_empty());
    let tried_on_a = || {
        first
            .commands
            .lock()
            .unwrap()
            .iter()
            .filter(|c| c.starts_with("MAIL"))
            .count()
    };
    let before = tried_on_a();
    assert!(before >= 1, "the refusal came from a");
    // Paused: new mail goes to b without a try on a.
    send_to(relay.addr(), &["ops@example.com"], "m4").await;
    second.next().await;
    relay.drained().await;
    assert_eq!(
        tried_on_a(),
        before,
        "nothing more tried on the paused account"
    );
}

/// One account of a route whose upstream refuses its token even fresh (an app without the permission) is held;
/// the route's other account takes the mail meanwhile, the refused message included, instead of each message
/// waiting out the hold on the first (and, before, using a step of its retry schedule at each try there).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_whose_token_is_refused_leaves_its_routes_mail_to_the_other() {
    let idp = idp_issuing("tok").await;
    let first = FakeUpstream::start(&["tok"]).await;
    first
        .tokens
        .lock()
        .unwrap()
        .push("REFUSE 535 5.7.3 Authentication unsuccessful".into());
    let mut second = FakeUpstream::start(&["tok"]).await;
    let mut relay = route_of_two(&idp, &first, &second, "[queue]\nretry = [\"1s\"]\n").await;
    four_sent_all_through(&relay, &mut second).await;
    relay.drained().await;
    assert!(files_in(&relay.state(), "dead").is_empty());
    let logins = first.connections.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        logins <= 5,
        "a login and one with a fresh token per attempt that took a at once, then none: {logins}"
    );
}

/// A route naming two accounts spreads its mail over both mailboxes; nothing is lost or sent twice.
#[tokio::test]
async fn a_route_naming_two_accounts_splits_the_mail() {
    let idp = idp_issuing("tok").await;
    let mut first = FakeUpstream::start(&["tok"]).await;
    let mut second = FakeUpstream::start(&["tok"]).await;
    let mut relay = route_of_two(&idp, &first, &second, "").await;
    for i in 0..10 {
        send_to(relay.addr(), &["ops@example.com"], &format!("m{i}")).await;
    }
    let (mut to_a, mut to_b) = (Vec::new(), Vec::new());
    while to_a.len() + to_b.len() < 10 {
        tokio::select! {
            Some(r) = first.received.recv() => to_a.push(r),
            Some(r) = second.received.recv() => to_b.push(r),
            _ = tokio::time::sleep(LIMIT) => panic!("only {} of 10 arrived", to_a.len() + to_b.len()),
        }
    }
    relay.drained().await;
    assert!(
        to_a.iter()
            .all(|r| r.auth.starts_with("user=a@example.com\x01"))
            && to_b
                .iter()
                .all(|r| r.auth.starts_with("user=b@example.com\x01")),
        "each upstream saw its own mailbox"
    );
    assert!(
        to_a.len().abs_diff(to_b.len()) <= 2,
        "spread evenly: {} and {}",
        to_a.len(),
        to_b.len()
    );
    let mut subjects: Vec<String> = to_a.iter().chain(&to_b).map(subject).collect();
    subjects.sort();
    subjects.dedup();
    assert_eq!(subjects.len(), 10, "each message once");
    assert!(files_in(&relay.state(), "dead").is_empty());
}

/// Attempts that never reached the upstream (nothing listens on its port, so no connection) use none of the
/// account's per-minute limit: the provider saw nothing. Before, each counted, and mail waited for a window that
/// failed connections had filled once the upstream came back.
#[tokio::test]
async fn attempts_that_could_not_connect_use_none_of_the_limit() {
    let idp = idp_issuing("tok").await;
    let upstream = FakeUpstream::start(&["tok"]).await;
    let dir = tempfile::tempdir().unwrap();
    let closed = free_port();
    let top = account_top(
        dir.path(),
        &idp.uri(),
        &upstream,
        "rate = { per_minute = 2 }",
    )
    .replace(
        &format!("smtp_port = {}", upstream.addr.port()),
        &format!("smtp_port = {closed}"),
    );
    let mut relay = TestRelay::start_with(dir, &top, LISTENER).await;
    for i in 0..3 {
        send_to(relay.addr(), &["ops@example.com"], &format!("m{i}")).await;
    }
    relay.attempts_done(1).await;
    // Stopped (attempts in flight finished, the counts written last), so nothing is counted as in flight.
    let state = relay.state();
    let _dir = relay.stop().await;
    let limits = relay::config::RateConfig {
        per_minute: Some(2),
        recipients_per_day: None,
    };
    let (usage, problem) =
        relay::queue::rate::usage_from_file(&state, "office", limits, SystemTime::now());
    assert_eq!(problem, None);
    assert_eq!(usage.messages_this_minute, 0, "{usage:?}");
    assert_eq!(queued_in(&state).len(), 3);
}
