//! Faults upstream and at the identity provider: clients keep getting 250 meanwhile, the mail waits in the
//! queue, and every accepted message is delivered once the fault clears.

mod common;

use std::time::Duration;

use common::idp::{
    account_config, account_top, answer_token_requests, generic_account_at, idp_answering,
    idp_issuing, relay_with_account_and, relay_with_account_at, token, token_request, write_secret,
};
use common::upstream::FakeUpstream;
use common::*;
use wiremock::{MockServer, ResponseTemplate};

const BODY: &[u8] = b"Subject: fault\r\n\r\nwaiting out the fault\r\n";
/// Retries come after a second, so that recovery shows within the tests' bounds.
const FAST_RETRY: &str = "[queue]\nretry = [\"1s\"]\n";

/// A message accepted (250) while the fault lasts; returns its queue id.
async fn accepted_during_fault(relay: &TestRelay) -> String {
    send_message(relay.addr(), BODY).await
}

/// The upstream answers well again: the message that waited is delivered at its retry (the second attempt), and
/// nothing is left in the queue.
async fn fault_clears(upstream: &mut FakeUpstream, mut relay: TestRelay, fault: &str) {
    *upstream.data_reply.lock().unwrap() = "250 2.0.0 OK".into();
    let got = upstream.next().await;
    assert_eq!(strip_received(&got.data), BODY, "{fault}");
    relay.attempts_done(2).await;
    assert!(relay.queued().is_empty(), "{fault}");
    relay.stop().await;
}

/// How many BDAT and DATA commands the upstream got, in all.
#[track_caller]
fn assert_bdat_and_data(upstream: &FakeUpstream, bdat: usize, data: usize) {
    let commands = upstream.commands.lock().unwrap().clone();
    let count = |verb: &str| commands.iter().filter(|c| c.starts_with(verb)).count();
    assert_eq!((count("BDAT"), count("DATA")), (bdat, data), "{commands:?}");
}

/// The subject of a message as the upstream got it.
fn subject(data: &[u8]) -> Option<String> {
    String::from_utf8_lossy(data)
        .lines()
        .find_map(|l| l.strip_prefix("Subject: ").map(str::to_string))
}

/// Receives messages at `upstream` until `at_least` subjects are in, and returns the distinct ones.
async fn distinct_subjects(upstream: &mut FakeUpstream, at_least: usize) -> Vec<String> {
    let mut subjects = Vec::new();
    while subjects.len() < at_least {
        subjects.extend(subject(&upstream.next().await.data));
    }
    subjects.sort();
    subjects.dedup();
    subjects
}

/// A relay whose account's upstream answers the end of each message with `reply` (see `FakeUpstream::data_reply`),
/// offering CHUNKING or not, retrying after a second.
async fn upstream_answering(
    chunking: bool,
    reply: &str,
) -> (wiremock::MockServer, FakeUpstream, TestRelay) {
    let idp = idp_issuing("tok").await;
    let upstream = FakeUpstream::start(&["tok"]).await;
    upstream
        .chunking
        .store(chunking, std::sync::atomic::Ordering::SeqCst);
    *upstream.data_reply.lock().unwrap() = reply.into();
    let relay = relay_with_account_and(&idp, &upstream, FAST_RETRY).await;
    (idp, upstream, relay)
}

#[tokio::test]
async fn upstream_4xx_and_dropped_connections_defer_then_deliver() {
    for fault in [
        "421 4.3.2 Service not available, closing transmission channel",
        "451 4.3.0 Temporary server error. Please try again later",
        "DROP",
    ] {
        let (_idp, mut upstream, mut relay) = upstream_answering(false, fault).await;
        let id = accepted_during_fault(&relay).await;
        relay.attempts_done(1).await;
        assert_eq!(relay.queued().len(), 1, "{fault}: the message waits");
        let state = relay::queue::state::read_state(&relay.state().join("queue"), {
            relay::queue::QueueStore::parse_id(&id).unwrap()
        });
        assert_eq!(state.attempts, 1, "{fault}");
        assert!(state.last_error.is_some(), "{fault}");
        fault_clears(&mut upstream, relay, fault).await;
    }
}

#[tokio::test]
async fn a_stalled_upstream_times_out_and_the_mail_waits() {
    let idp = idp_issuing("tok").await;
    let mut upstream = FakeUpstream::start(&["tok"]).await;
    *upstream.data_reply.lock().unwrap() = "STALL".into();
    let more = format!("smtp_timeout = \"1s\"\n{FAST_RETRY}");
    let mut relay = relay_with_account_and(&idp, &upstream, &more).await;
    accepted_during_fault(&relay).await;
    relay.attempts_done(1).await;
    assert_eq!(relay.queued().len(), 1);
    fault_clears(&mut upstream, relay, "STALL").await;
}

/// The identity provider answers 500, then broken JSON, then slowly, then well: the mail waits through the
/// failures and goes out with the first good token.
#[tokio::test]
async fn identity_provider_errors_and_broken_json_defer_then_deliver() {
    let idp = MockServer::start().await;
    token_request()
        .respond_with(ResponseTemplate::new(500).set_body_string("<html>oops</html>"))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&idp)
        .await;
    token_request()
        .respond_with(
            ResponseTemplate::new(200)
                .insert_header("content-type", "application/json")
                .set_body_string("{\"access_token\": \"tok\", \"expires_in\": "),
        )
        .up_to_n_times(1)
        .with_priority(2)
        .mount(&idp)
        .await;
    token_request()
        .respond_with(token("tok").set_delay(Duration::from_secs(2)))
        .with_priority(3)
        .mount(&idp)
        .await;
    let mut upstream = FakeUpstream::start(&["tok"]).await;
    let mut relay = relay_with_account_and(&idp, &upstream, FAST_RETRY).await;
    accepted_during_fault(&relay).await;
    let got = upstream.next().await;
    assert_eq!(strip_received(&got.data), BODY);
    relay.drained().await;
}

/// The identity provider is down (nothing listens), then comes back on the same address.
#[tokio::test]
async fn identity_provider_down_then_back() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let url = format!("http://127.0.0.1:{port}");
    let mut upstream = FakeUpstream::start(&["tok"]).await;
    let mut relay = relay_with_account_at(&url, &upstream, FAST_RETRY).await;
    accepted_during_fault(&relay).await;
    relay.attempts_done(1).await;
    assert_eq!(relay.queued().len(), 1);
    let listener = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    let idp = MockServer::builder().listener(listener).start().await;
    answer_token_requests(&idp, token("tok")).await;
    let got = upstream.next().await;
    assert_eq!(strip_received(&got.data), BODY);
}

/// `expires_in` as providers get it wrong: missing, 0, negative, past any clock, a float, a string. Each gives a
/// usable token, and the daemon goes on serving.
#[tokio::test]
async fn odd_expires_in_values_never_stop_delivery() {
    for expires_in in [
        serde_json::Value::Null,
        serde_json::json!(0),
        serde_json::json!(-5),
        serde_json::json!(18446744073709551615u64),
        serde_json::json!(1e30),
        serde_json::json!("3599"),
    ] {
        let idp = MockServer::start().await;
        let mut reply = serde_json::json!({"token_type": "Bearer", "access_token": "tok"});
        if !expires_in.is_null() {
            reply["expires_in"] = expires_in.clone();
        }
        answer_token_requests(&idp, ResponseTemplate::new(200).set_body_json(reply)).await;
        let mut upstream = FakeUpstream::start(&["tok"]).await;
        let mut relay = relay_with_account_and(&idp, &upstream, FAST_RETRY).await;
        for _ in 0..2 {
            accepted_during_fault(&relay).await;
            let got = upstream.next().await;
            assert_eq!(strip_received(&got.data), BODY, "expires_in {expires_in}");
        }
        relay.attempts_done(2).await;
        assert!(relay.queued().is_empty(), "expires_in {expires_in}");
        relay.stop().await;
    }
}

/// One account's upstream hangs: its deliveries wait (four at a time), and the rest of its mail waits parked,
/// not in the scheduler's places, so another account's mail still goes out at once.
#[tokio::test]
async fn a_stalled_account_does_not_hold_up_another() {
    let idp = idp_issuing("tok").await;
    let stalled = FakeUpstream::start(&["tok"]).await;
    *stalled.data_reply.lock().unwrap() = "STALL".into();
    let mut healthy = FakeUpstream::start(&["tok"]).await;
    let dir = tempfile::tempdir().unwrap();
    write_secret(dir.path());
    let account =
        |name: &str, port: u16| generic_account_at(name, &idp.uri(), port, "client_credentials");
    let top = format!(
        "default_account = \"healthy\"\n{}{}[[route]]\nsender = \"*@stalled.test\"\naccount = \"stalled\"\n",
        account("stalled", stalled.addr.port()),
        account("healthy", healthy.addr.port()),
    );
    let relay = TestRelay::start_with(
        dir,
        &top,
        "[[listener]]\naddress = \"127.0.0.1:0\"\nauth = \"none\"\n",
    )
    .await;
    // More messages for the stalled account than the scheduler has places (64).
    let mut c = RawClient::ready(relay.addr()).await;
    for i in 0..80 {
        c.cmd("MAIL FROM:<scanner@stalled.test>", 250).await;
        c.cmd("RCPT TO:<ops@example.com>", 250).await;
        c.cmd("DATA", 354).await;
        c.send(format!("Subject: stalled {i}\r\n\r\nx\r\n.\r\n").as_bytes())
            .await;
        c.expect(250).await;
    }
    c.cmd("MAIL FROM:<printer@lan.test>", 250).await;
    c.cmd("RCPT TO:<ops@example.com>", 250).await;
    c.cmd("DATA", 354).await;
    c.send(BODY).await;
    c.send(b".\r\n").await;
    c.expect(250).await;
    let got = healthy.next().await;
    assert_eq!(strip_received(&got.data), BODY);
    assert_eq!(got.from, "healthy@example.com");
}

/// A damaged token file of an account whose grant needs no person (client credentials) is set aside, kept for a
/// look, and a new token obtained: the mail goes, instead of waiting until someone replaces the file.
#[tokio::test]
async fn a_damaged_token_file_is_set_aside_and_a_new_token_obtained() {
    let idp = idp_issuing("tok").await;
    let mut upstream = FakeUpstream::start(&["tok"]).await;
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("state/tokens");
    std::fs::create_dir_all(&tokens).unwrap();
    write_private(&tokens.join("office.json"), "{ not a token file");
    let top = account_top(dir.path(), &idp.uri(), &upstream, "");
    let mut relay = TestRelay::start_with(dir, &top, common::idp::LISTENER).await;
    accepted_during_fault(&relay).await;
    let got = upstream.next().await;
    assert!(got.auth.contains("Bearer tok"), "{got:?}");
    relay.drained().await;
    let tokens = relay.state().join("tokens");
    let aside = files_in(&relay.state(), "tokens")
        .into_iter()
        .find(|f| f.starts_with("office.json.damaged-"))
        .expect("the damaged file kept");
    assert_eq!(
        std::fs::read_to_string(tokens.join(aside)).unwrap(),
        "{ not a token file"
    );
    assert!(
        std::fs::read_to_string(tokens.join("office.json"))
            .unwrap()
            .contains("access_token")
    );
}

/// A person's grant (device code) whose token file stops being readable while relay holds the grant: the mail
/// goes on with the grant in memory. A damaged file is set aside and the grant written back (a restart finds it);
/// one that cannot be read is left alone, and a grant `relay authorize` stores later is taken. No token request.
#[tokio::test]
async fn an_unreadable_token_file_does_not_stop_a_grant_held_in_memory() {
    let idp = MockServer::start().await;
    let mut upstream = FakeUpstream::start(&["tok", "tok2"]).await;
    let dir = tempfile::tempdir().unwrap();
    let top = common::idp::device_code_top(dir.path(), &idp.uri(), &upstream, "");
    write_valid_tokens(
        &dir.path().join("state"),
        "office",
        "tok",
        Duration::from_secs(3600),
    );
    let mut relay = TestRelay::start_with(dir, &top, common::idp::LISTENER).await;
    let file = relay.state().join("tokens/office.json");
    accepted_during_fault(&relay).await;
    assert!(upstream.next().await.auth.contains("Bearer tok"));

    write_private(&file, "{ not a token file");
    accepted_during_fault(&relay).await;
    let got = upstream.next().await;
    assert!(got.auth.contains("Bearer tok"), "{got:?}");
    relay.drained().await;
    let aside = files_in(&relay.state(), "tokens")
        .into_iter()
        .find(|f| f.starts_with("office.json.damaged-"))
        .expect("the damaged file kept");
    let tokens = relay::tokens::TokenStore::new(&relay.state());
    assert_eq!(
        std::fs::read_to_string(relay.state().join("tokens").join(aside)).unwrap(),
        "{ not a token file"
    );
    let back = tokens
        .load("office")
        .unwrap()
        .expect("the grant written back");
    use secrecy::ExposeSecret;
    assert_eq!(
        back.refresh_token.unwrap().expose_secret(),
        "refresh-unused"
    );

    std::fs::remove_file(&file).unwrap();
    std::fs::create_dir(&file).unwrap();
    accepted_during_fault(&relay).await;
    let got = upstream.next().await;
    assert!(got.auth.contains("Bearer tok"), "{got:?}");

    std::fs::remove_dir(&file).unwrap();
    write_valid_tokens(&relay.state(), "office", "tok2", Duration::from_secs(3600));
    accepted_during_fault(&relay).await;
    let got = upstream.next().await;
    assert!(got.auth.contains("Bearer tok2"), "{got:?}");
    assert!(idp.received_requests().await.unwrap().is_empty());
    relay.stop().await;
}

/// What is no answer to the final dot (through DATA and through BDAT) never counts as "taken": a 3xx, a code
/// outside SMTP's, a reply whose lines disagree. The message waits, and goes once the upstream answers well.
#[tokio::test]
async fn a_final_reply_that_is_no_answer_defers_the_message() {
    for chunking in [false, true] {
        for fault in [
            "354 go on then",
            "399 weird",
            "699 what",
            "250-2.0.0 queued\r\n554 5.7.1 rejected after all",
        ] {
            let (_idp, mut upstream, mut relay) = upstream_answering(chunking, fault).await;
            accepted_during_fault(&relay).await;
            relay.attempts_done(1).await;
            assert_eq!(
                relay.queued().len(),
                1,
                "{fault} (chunking {chunking}): waits"
            );
            assert!(
                files_in(&relay.state(), "dead").is_empty(),
                "{fault} (chunking {chunking}): not dead"
            );
            // What the fake counted as received under the fault is not a delivery.
            while upstream.received.try_recv().is_ok() {}
            fault_clears(&mut upstream, relay, fault).await;
        }
    }
}

/// A reply that arrives while a pooled connection is idle (a server out of step) is never read as the answer
/// to the next message: the connection is not used again, and the next message's own refusal is what counts.
#[tokio::test]
async fn a_late_reply_on_an_idle_connection_is_never_taken_for_the_next_message() {
    for chunking in [true, false] {
        let (_idp, mut upstream, mut relay) =
            upstream_answering(chunking, "STRAY 250 2.0.0 OK").await;
        accepted_during_fault(&relay).await;
        upstream.next().await;
        relay.attempts_done(1).await;
        upstream.release.notify_one();
        tokio::time::timeout(LIMIT, upstream.strays.notified())
            .await
            .expect("the stray reply was sent");

        *upstream.data_reply.lock().unwrap() = "554 5.7.1 REJECTED the second message".into();
        let second = accepted_during_fault(&relay).await;
        relay.attempts_done(2).await;
        let mut dead = files_in(&relay.state(), "dead");
        dead.sort();
        assert_eq!(
            dead,
            [format!("{second}.msg"), format!("{second}.state")],
            "chunking {chunking}: refused, not delivered"
        );
        assert_eq!(
            upstream
                .connections
                .load(std::sync::atomic::Ordering::SeqCst),
            2,
            "chunking {chunking}: a fresh connection"
        );
        relay.stop().await;
    }
}

/// An account whose logins keep failing (every AUTH refused, or Microsoft's `530 5.7.57` to MAIL after a 235)
/// gets one token refresh and one retry; its other messages then wait without logging in again, and none goes
/// to dead/ (where each would also have been bounced). Their wait is not an attempt, and neither is the refusal
/// itself (the account's, not the message's): no message uses a step of its retry schedule (before, each held
/// message used one at each of its tries, so that after hours of a missing permission the mail waited hours more
/// once it was granted).
#[tokio::test]
async fn refused_logins_hold_the_accounts_mail_instead_of_hammering() {
    for refusal in [
        "REFUSE 535 5.7.3 Authentication unsuccessful",
        "MAILREFUSE 530 5.7.57 Client not authenticated to send mail.",
    ] {
        let idp = idp_issuing("tok").await;
        let upstream = FakeUpstream::start(&["tok"]).await;
        upstream.tokens.lock().unwrap().push(refusal.into());
        let more = format!("max_connections = 1\n{FAST_RETRY}");
        let mut relay = relay_with_account_and(&idp, &upstream, &more).await;
        for _ in 0..5 {
            accepted_during_fault(&relay).await;
        }
        // The first message is refused (with a fresh token too); the others then wait untried for the hold's end.
        relay.attempts_done(1).await;
        assert_eq!(relay.queued().len(), 5, "{refusal}: all wait");
        let states: Vec<serde_json::Value> = files_in(&relay.state(), "queue")
            .iter()
            .filter(|f| f.ends_with(".state"))
            .map(|f| {
                serde_json::from_slice(&std::fs::read(relay.state().join("queue").join(f)).unwrap())
                    .unwrap()
            })
            .collect();
        let attempts: u64 = states
            .iter()
            .map(|s| s["attempts"].as_u64().unwrap_or(0))
            .sum();
        assert_eq!(
            attempts, 0,
            "{refusal}: a refusal of the account's fresh token is the account's, and uses no message's retry step: {states:?}"
        );
        assert!(files_in(&relay.state(), "dead").is_empty(), "{refusal}");
        assert_eq!(
            upstream
                .connections
                .load(std::sync::atomic::Ordering::SeqCst),
            2,
            "{refusal}: one login, and one with a fresh token"
        );
        let fetched = idp.received_requests().await.unwrap_or_default().len();
        assert!(fetched <= 2, "{refusal}: {fetched} token requests");
        relay.stop().await;
    }
}

/// Four messages at once through an account whose upstream refuses every login: the attempts refused together
/// share one token refresh and one retry with the new token, and then wait (held) instead of each asking the
/// token endpoint again and logging in once more. The fake identity provider mints a new token per request, as
/// real ones do, slowly enough that the attempts meet at the refresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logins_refused_together_share_one_refresh_and_one_retry() {
    struct Minting(std::sync::atomic::AtomicUsize);
    impl wiremock::Respond for Minting {
        fn respond(&self, _: &wiremock::Request) -> wiremock::ResponseTemplate {
            let n = self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            common::idp::token(&format!("tok-{n}")).set_delay(std::time::Duration::from_millis(300))
        }
    }
    let idp = MockServer::start().await;
    wiremock::Mock::given(wiremock::matchers::path("/token"))
        .respond_with(Minting(Default::default()))
        .mount(&idp)
        .await;
    let upstream = FakeUpstream::start(&[]).await;
    upstream
        .tokens
        .lock()
        .unwrap()
        .push("REFUSE 535 5.7.3 Authentication unsuccessful".into());
    let more = "max_connections = 4\n[queue]\nretry = [\"1h\"]\n";
    let mut relay = relay_with_account_and(&idp, &upstream, more).await;
    for _ in 0..4 {
        accepted_during_fault(&relay).await;
    }
    relay.attempts_done(4).await;
    let fetched = idp.received_requests().await.unwrap_or_default().len();
    assert_eq!(fetched, 2, "the first token and one refresh");
    let logins = upstream
        .connections
        .load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        (2..=5).contains(&logins),
        "each message once at most, and one retry: {logins}"
    );
    assert_eq!(relay.queued().len(), 4);
    relay.stop().await;
}

/// A relay whose account's upstream offers CHUNKING, answers BDAT with 500 and hangs up.
async fn offering_chunking_without_bdat() -> (MockServer, FakeUpstream, TestRelay) {
    let idp = idp_issuing("tok").await;
    let upstream = FakeUpstream::start(&["tok"]).await;
    upstream.without_bdat();
    let relay = relay_with_account_and(&idp, &upstream, FAST_RETRY).await;
    (idp, upstream, relay)
}

/// An upstream that offers CHUNKING but does not know BDAT (a middlebox rewriting SMTP) gets the message
/// through DATA in the same attempt, and every later one through DATA at once; nothing goes to dead/.
#[tokio::test]
async fn an_upstream_that_offers_chunking_but_refuses_bdat_gets_data() {
    let (_idp, mut upstream, mut relay) = offering_chunking_without_bdat().await;
    for n in 1..=2 {
        accepted_during_fault(&relay).await;
        let got = upstream.next().await;
        assert_eq!(strip_received(&got.data), BODY);
        relay.attempts_done(n).await;
    }
    relay.drained().await;
    assert!(files_in(&relay.state(), "dead").is_empty());
    assert_bdat_and_data(&upstream, 1, 2);
    relay.stop().await;

    // A message of several chunks: the server refuses the first and hangs up while the next is being written.
    let (_idp, mut upstream, mut relay) = offering_chunking_without_bdat().await;
    let mut big = b"Subject: scan\r\n\r\n".to_vec();
    for i in 0..20_000 {
        big.extend_from_slice(format!("line {i:06} of a large scanned document\r\n").as_bytes());
    }
    send_message(relay.addr(), &big).await;
    let got = upstream.next().await;
    assert_eq!(strip_received(&got.data), &big[..]);
    relay.drained().await;
    assert!(files_in(&relay.state(), "dead").is_empty());
    relay.stop().await;
}

/// A reply to the final dot too long to keep (a 100 KB line, a thousand continuation lines) is read through to
/// its last line and counts: the message is delivered once, not deferred and sent again at every retry.
#[tokio::test]
async fn a_final_reply_too_long_to_keep_still_counts() {
    for chunking in [false, true] {
        let mut reply = format!("250-2.0.0 queued as {}\r\n", "x".repeat(100_000));
        reply.push_str(&"250-more\r\n".repeat(1000));
        reply.push_str("250 2.0.0 OK");
        let (_idp, mut upstream, mut relay) = upstream_answering(chunking, &reply).await;
        accepted_during_fault(&relay).await;
        upstream.next().await;
        relay.attempts_done(1).await;
        assert!(relay.queued().is_empty(), "chunking {chunking}: delivered");
        // A second message on the same connection: what followed the long reply was read as it should be.
        accepted_during_fault(&relay).await;
        upstream.next().await;
        relay.attempts_done(2).await;
        assert!(relay.queued().is_empty(), "chunking {chunking}");
        assert!(upstream.received.try_recv().is_err(), "once each");
        relay.stop().await;
    }
}

/// An upstream that keeps the message and hangs up before answering the final dot: the message is sent again,
/// since a loss is worse than a duplicate, and its deferral says that it may arrive twice (RFC 1047), so that a
/// sysadmin asking why a scan came twice finds the reason. Through BDAT the same: such a hang-up is not taken for
/// a server that does not know BDAT (the message was sent again through DATA at once, in the same attempt, and
/// arrived twice with nothing in the log at warn); it goes again at its retry, through DATA (a server or a
/// middlebox that silently drops BDAT every time would otherwise refuse it for good).
#[tokio::test]
async fn a_lost_final_reply_defers_and_says_it_may_arrive_twice() {
    for chunking in [false, true] {
        let (_idp, mut upstream, mut relay) = upstream_answering(chunking, "TAKEDROP").await;
        let id = accepted_during_fault(&relay).await;
        let first = upstream.next().await;
        relay.attempts_done(1).await;
        let why = state_of(&relay, &id).last_error.unwrap_or_default();
        assert!(why.contains("may arrive twice"), "{why}");
        let again = upstream.next().await;
        assert_eq!(again.data, first.data);
        relay.attempts_done(2).await;
        assert!(relay.queued().is_empty(), "delivered");
        let (bdat, data) = if chunking { (1, 1) } else { (0, 2) };
        assert_bdat_and_data(&upstream, bdat, data);
        relay.stop().await;
    }
}

/// Queued message `id`'s delivery state.
fn state_of(relay: &TestRelay, id: &str) -> relay::queue::state::DeliveryState {
    relay::queue::state::read_state(
        &relay.state().join("queue"),
        relay::queue::QueueStore::parse_id(id).unwrap(),
    )
}

/// A sending quota used up (Gmail's daily limit, Exchange Online's recipient rate limit) is answered with a 5xx,
/// but it is about the account's last 24 hours, not the message: the message waits, never goes to dead/, and
/// the account's mail (it too, when due again) is held for an hour instead of being refused the same way.
/// Through the binary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_used_up_sending_quota_holds_the_account_instead_of_failing_its_mail() {
    for reply in [
        "550-5.4.5 Daily user sending limit exceeded. For more information on Gmail\r\n550 5.4.5 sending limits go to https://support.google.com/a/answer/166852 - gsmtp",
        "554 5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException; Failed to process message due to a permanent exception with message [BeginDiagnosticData]Message submission quota exceeded.",
    ] {
        let upstream = FakeUpstream::start(&["tok"]).await;
        *upstream.data_reply.lock().unwrap() = reply.into();
        let dir = tempfile::tempdir().unwrap();
        let idp = idp_issuing("tok").await;
        let config = common::idp::accounts_config(
            dir.path(),
            &idp.uri(),
            &[("office", &upstream)],
            "",
            FAST_RETRY,
        );
        let mut daemon = Daemon::spawn(&config);

        let first = send_message(daemon.addr, BODY).await;
        // The account's pause, not the message's failure: no retry step is used, and the line says why.
        let paused = daemon.wait_log("the provider asked the account to pause");
        assert!(paused.contains(&first), "{paused}");
        assert!(paused.contains("relay_diagnosis="), "{paused}");
        let second = send_message(daemon.addr, BODY).await;
        let held = daemon.wait_log("relay_event=\"held\"");
        assert!(held.contains(&second), "{held}");
        // The first, due again after its 1 s retry, is held as well: not tried, and not failed for good.
        let held = daemon.wait_log("relay_event=\"held\"");
        assert!(held.contains(&first), "{held}");

        let state = dir.path().join("state");
        assert_eq!(files_in(&state, "dead"), Vec::<String>::new(), "{reply}");
        assert_eq!(
            files_in(&state, "queue")
                .iter()
                .filter(|f| f.ends_with(".msg"))
                .count(),
            2
        );
        let mails = || {
            let commands = upstream.commands.lock().unwrap();
            commands.iter().filter(|c| c.starts_with("MAIL")).count()
        };
        assert_eq!(mails(), 1, "the held message was not tried");
        let (code, json) = status_json(&config);
        assert_eq!(code, Some(1), "a paused account needs attention");
        let account = &json["accounts"][0];
        assert_eq!(account["state"], "failing", "{json}");
        assert!(account["paused"]["until"].is_string(), "{json}");
        assert!(
            account["warnings"][0]
                .as_str()
                .is_some_and(|w| w.contains("pause")),
            "{json}"
        );

        // A restart keeps the pause: the first message, due again, is held, not tried.
        assert!(daemon.terminate().success());
        let mut daemon = Daemon::spawn(&config);
        daemon.wait_log("provider asked for a pause until");
        let held = daemon.wait_log("relay_event=\"held\"");
        assert!(held.contains(&first) || held.contains(&second), "{held}");
        assert_eq!(mails(), 1, "nothing tried after the restart");

        // The quota is back (raised, say): `relay queue retry` lifts the pause, and both go at once.
        *upstream.data_reply.lock().unwrap() = "250 2.0.0 OK".into();
        queue_retry(&config, &first);
        daemon.wait_log("pause the provider asked for is lifted");
        let mut delivered = std::collections::HashSet::new();
        for _ in 0..2 {
            let line = daemon.wait_log("relay_event=\"delivered\"");
            delivered.extend(
                [&first, &second]
                    .into_iter()
                    .filter(|id| line.contains(id.as_str())),
            );
        }
        assert_eq!(delivered.len(), 2);
        let (code, json) = status_json(&config);
        assert!(json["accounts"][0]["paused"].is_null(), "{json}");
        assert_eq!(code, Some(0), "{json}");
        assert!(daemon.terminate().success());
    }
}

/// A pooled connection on which the server took MAIL, RCPT and the whole message, then hung up without answering:
/// the connection was alive, and the server may have taken the message. It is not sent again at once on a fresh
/// connection (it was, as if the server had closed an idle connection, and through DATA after that: three copies
/// in one attempt, logged at debug), but deferred, saying that it may arrive twice; its retry goes through DATA.
#[tokio::test]
async fn a_pooled_connection_that_hangs_up_after_the_whole_message_defers_it() {
    let (_idp, mut upstream, mut relay) = upstream_answering(true, "250 2.0.0 OK").await;
    accepted_during_fault(&relay).await;
    upstream.next().await;
    relay.attempts_done(1).await;
    *upstream.data_reply.lock().unwrap() = "TAKEDROP".into();
    let id = accepted_during_fault(&relay).await;
    let first = upstream.next().await;
    relay.attempts_done(2).await;
    let state = state_of(&relay, &id);
    assert_eq!(state.attempts, 1, "a failed attempt");
    let why = state.last_error.unwrap_or_default();
    assert!(why.contains("may arrive twice"), "{why}");
    let again = upstream.next().await;
    assert_eq!(again.data, first.data);
    relay.attempts_done(3).await;
    assert!(relay.queued().is_empty(), "delivered");
    assert!(upstream.received.try_recv().is_err(), "twice, not more");
    assert_bdat_and_data(&upstream, 2, 1);
    assert_eq!(
        upstream
            .connections
            .load(std::sync::atomic::Ordering::SeqCst),
        2,
        "the first connection carried the first two uploads, the retry a fresh one"
    );
    relay.stop().await;
}

/// A hang-up during a BDAT upload (before the whole message was sent, so the server cannot have taken it) may
/// have been a network fault rather than a server that does not know BDAT: the message goes again through DATA
/// at once, and the upstream is on DATA for a while (an hour; a test hook shortens it to nothing here), then
/// gets BDAT again. A BDAT refused in words (500) keeps it on DATA until a restart. Through the binary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bdat_comes_back_after_a_hang_up_but_not_after_a_refusal() {
    for refused_in_words in [false, true] {
        let mut upstream = FakeUpstream::start(&["tok"]).await;
        if refused_in_words {
            upstream.without_bdat();
        } else {
            upstream
                .chunking
                .store(true, std::sync::atomic::Ordering::SeqCst);
            *upstream.data_reply.lock().unwrap() = "CHUNKDROP".into();
        }
        let dir = tempfile::tempdir().unwrap();
        let idp = idp_issuing("tok").await;
        let config =
            common::idp::accounts_config(dir.path(), &idp.uri(), &[("office", &upstream)], "", "");
        let mut daemon = Daemon::spawn_with(&config, |c| {
            c.env("RELAY_TEST_CHUNKING_DOUBT_MS", "0");
        });

        // For the hang-up, large enough to go in many chunks, so that the hang-up after the first one comes while
        // relay still writes the rest. (A large one refused in words would lose its refusal to the reset of a
        // connection closed with the rest unread.)
        let mut message = BODY.to_vec();
        if !refused_in_words {
            message = b"Subject: big\r\n\r\n".to_vec();
            while message.len() < 24 << 20 {
                message.extend_from_slice(&[b'x'; 76]);
                message.extend_from_slice(b"\r\n");
            }
        }
        send_message(daemon.addr, &message).await;
        // Once either way: the hang-up came before the message was whole.
        let got = upstream.next().await;
        assert_eq!(strip_received(&got.data), &message[..]);
        daemon.wait_log("relay_event=\"delivered\"");
        send_message(daemon.addr, BODY).await;
        upstream.next().await;
        daemon.wait_log("relay_event=\"delivered\"");

        if refused_in_words {
            assert_bdat_and_data(&upstream, 1, 2);
        } else {
            assert_bdat_and_data(&upstream, 2, 1);
            daemon.wait_log("trying CHUNKING (BDAT) again");
        }
        assert!(daemon.terminate().success());
    }
}

/// An upstream that takes fewer connections at once than `max_connections` (Postfix's per-client limit; Exchange
/// Online's few per mailbox, shared with every device sending as it) refuses the extra ones with a 421. The
/// account goes on with the connections it has: the refused attempts' mail waits for them (not deferred, no
/// attempt counted), the log says once what happened and what to change, and every message arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_taking_fewer_connections_gets_the_mail_through_those() {
    use std::sync::atomic::Ordering::SeqCst;
    const MESSAGES: usize = 12;
    let idp = idp_issuing("tok").await;
    let mut upstream = FakeUpstream::start(&["tok"]).await;
    upstream.max_sessions.store(2, SeqCst);
    // The first two deliveries keep their connections busy until released, so that relay opens more.
    *upstream.data_reply.lock().unwrap() = "HOLD 250 2.0.0 OK".into();
    let dir = tempfile::tempdir().unwrap();
    let config = account_config(
        dir.path(),
        &idp.uri(),
        &upstream,
        "max_connections = 3\n[queue]\nretry = [\"1h\"]",
    );
    let mut daemon = Daemon::spawn(&config);
    let send = |i: usize| format!("Subject: m{i}\r\n\r\nbody\r\n");
    // Two first, each on a connection of its own that the fake holds in DATA; then the rest, for which relay
    // opens a third.
    for i in 0..2 {
        send_message(daemon.addr, send(i).as_bytes()).await;
    }
    let mut got = vec![upstream.next().await, upstream.next().await];
    for i in 2..MESSAGES {
        send_message(daemon.addr, send(i).as_bytes()).await;
    }
    let narrowed = daemon
        .wait_log("the upstream refused one more connection while the account had others open");
    assert!(
        narrowed.contains("too many connections") && narrowed.contains("no more than 2 "),
        "{narrowed}"
    );
    *upstream.data_reply.lock().unwrap() = "250 2.0.0 OK".into();
    for _ in 0..2 {
        upstream.release.notify_one();
        daemon.wait_log("relay_event=\"delivered\"");
    }
    while got.len() < MESSAGES {
        got.push(upstream.next().await);
    }
    for _ in 2..MESSAGES {
        daemon.wait_log("relay_event=\"delivered\"");
    }
    let mut subjects: Vec<String> = got.iter().filter_map(|r| subject(&r.data)).collect();
    subjects.sort();
    subjects.dedup();
    assert_eq!(subjects.len(), MESSAGES, "each message once");
    assert_eq!(
        upstream.refused_sessions.load(SeqCst),
        1,
        "no more than the two it took are tried once it refused one"
    );
    let deferred: Vec<&String> = daemon
        .unmatched()
        .iter()
        .filter(|l| l.contains("relay_event=\"deferred\""))
        .collect();
    assert!(deferred.is_empty(), "{deferred:?}");
    assert!(queued_in(&dir.path().join("state")).is_empty());
    assert_eq!(daemon.terminate().code(), Some(0));
}

/// A relay whose one account ("office") has an upstream that takes connections and never greets, with
/// `smtp_timeout` at 1 s and `queue` in its `[queue]` table, and `messages` messages sent to it ("Subject: m0"…).
struct Silent {
    idp: MockServer,
    upstream: FakeUpstream,
    dir: tempfile::TempDir,
    config: std::path::PathBuf,
    daemon: Daemon,
}

impl Silent {
    async fn with(queue: &str, messages: usize) -> Silent {
        let idp = idp_issuing("tok").await;
        let upstream = FakeUpstream::start(&["tok"]).await;
        upstream
            .silent
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let dir = tempfile::tempdir().unwrap();
        let config = account_config(
            dir.path(),
            &idp.uri(),
            &upstream,
            &format!("smtp_timeout = \"1s\"\n[queue]\n{queue}"),
        );
        let daemon = Daemon::spawn(&config);
        for i in 0..messages {
            send_message(
                daemon.addr,
                format!("Subject: m{i}\r\n\r\nbody\r\n").as_bytes(),
            )
            .await;
        }
        Silent {
            idp,
            upstream,
            dir,
            config,
            daemon,
        }
    }
}

/// An upstream that stops answering (a firewall dropping packets, a link down: connections get nothing back
/// until `smtp_timeout`): one connection at a time tries it, the account's other mail waits untried (no attempt
/// counted, no deferral), one warning says so, and everything goes once it answers again. Each message used to
/// make its own connection and hold one of the account's slots for the whole timeout; and then each probe that
/// got no answer either was its message's attempt and a `deferred` line, one every couple of seconds all outage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_stops_answering_is_tried_one_connection_at_a_time() {
    use std::sync::atomic::Ordering::SeqCst;
    const MESSAGES: usize = 12;
    // The account's four slots may each connect before the first failure is known; then probes, one at a time.
    const FIRST: usize = 4;
    const TRIES: usize = FIRST + 4;
    let Silent {
        idp: _idp,
        mut upstream,
        dir,
        config,
        mut daemon,
    } = Silent::with("retry = [\"1s\"]", MESSAGES).await;
    let down = daemon.wait_log("the upstream cannot be reached");
    assert!(down.contains("did not answer within 1s"), "{down}");
    // The probes go on, one at a time (each after a hold as long as the last took): watched at the upstream.
    let deadline = std::time::Instant::now() + LIMIT;
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(50));
    while upstream.unanswered.load(SeqCst) < TRIES {
        assert!(
            std::time::Instant::now() < deadline,
            "{} connections tried",
            upstream.unanswered.load(SeqCst)
        );
        tick.tick().await;
    }
    // Only the first connections were attempts of their messages; the probes' messages wait with the others.
    let state = dir.path().join("state").join("queue");
    let untried = std::fs::read_dir(&state)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "msg"))
        .filter(|e| !e.path().with_extension("state").exists())
        .count();
    assert!(
        untried >= MESSAGES - FIRST,
        "mail waits untried, no attempt counted: {untried} of {MESSAGES} without a state file"
    );
    // `relay status` says so: the account failing, the upstream, since when and why, and what happens to its mail.
    let (_, doc) = status_json(&config);
    let account = &doc["accounts"][0];
    assert_eq!(doc["ok"], false, "{doc}");
    assert_eq!(account["state"], "failing", "{doc}");
    let unreachable = &account["unreachable"];
    assert_eq!(
        unreachable["upstream"],
        format!("127.0.0.1:{}", upstream.addr.port()),
        "{doc}"
    );
    assert!(
        unreachable["reason"]
            .as_str()
            .is_some_and(|r| r.contains("did not answer within 1s")),
        "{doc}"
    );
    assert!(unreachable["since"].is_string(), "{doc}");
    assert!(
        account["warnings"]
            .as_array()
            .is_some_and(|w| w.iter().any(|w| w.as_str().is_some_and(|w| w
                .contains("has not answered a connection since")
                && w.contains("untried")))),
        "{doc}"
    );
    // `relay queue list` shows the waiting mail as due ("now"), and names the account that holds it.
    let list = std::process::Command::new(relay_bin())
        .args(["queue", "list", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let (rows, notes) = (
        String::from_utf8_lossy(&list.stdout),
        String::from_utf8_lossy(&list.stderr),
    );
    assert!(rows.contains("message(s)"), "{rows}");
    assert!(
        notes.contains("account office (failing): its upstream 127.0.0.1:")
            && notes.contains("has not answered since"),
        "{notes}"
    );
    upstream.silent.store(false, SeqCst);
    daemon.wait_log("the upstream can be reached again");
    let subjects = distinct_subjects(&mut upstream, MESSAGES).await;
    for _ in 0..MESSAGES {
        daemon.wait_log("relay_event=\"delivered\"");
    }
    assert_eq!(subjects.len(), MESSAGES, "each message once");
    assert!(queued_in(&dir.path().join("state")).is_empty());
    let (_, doc) = status_json(&config);
    assert!(doc["accounts"][0]["unreachable"].is_null(), "{doc}");
    let log = daemon.terminate_with_log();
    let warned_again: Vec<&String> = log
        .iter()
        .filter(|l| l.contains("the upstream cannot be reached"))
        .collect();
    assert!(
        warned_again.is_empty(),
        "one warning per outage: {warned_again:?}"
    );
    let deferred = log
        .iter()
        .filter(|l| l.contains("relay_event=\"deferred\""))
        .count();
    assert!(
        deferred <= FIRST,
        "{deferred} deferred lines: only the first connections' messages are deferred"
    );
    assert!(log.last().is_some_and(|l| l.contains("stopped")), "{log:?}");
}

/// A reload that points the account at another upstream (the sysadmin fixing `smtp_host`) drops the report
/// that the old one could not be reached at once, not at the next message; and the waiting mail goes to the new
/// one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_changes_the_upstream_drops_the_unreachable_report() {
    let Silent {
        idp,
        upstream: _silent,
        dir,
        config,
        mut daemon,
    } = Silent::with("retry = [\"1s\"]", 2).await;
    daemon.wait_log("the upstream cannot be reached");
    daemon.wait_log("relay_event=\"deferred\"");
    assert!(!status_json(&config).1["accounts"][0]["unreachable"].is_null());

    let mut answering = FakeUpstream::start(&["tok"]).await;
    account_config(dir.path(), &idp.uri(), &answering, "smtp_timeout = \"1s\"");
    // SAFETY: kill with the pid of our own child and a valid signal.
    assert_eq!(unsafe { libc::kill(daemon.pid() as i32, libc::SIGHUP) }, 0);
    let reloaded = daemon.wait_log("relay_event=\"reloaded\"");
    assert!(reloaded.contains("changed: office;"), "{reloaded}");
    let (_, doc) = status_json(&config);
    assert!(doc["accounts"][0]["unreachable"].is_null(), "{doc}");
    for _ in 0..2 {
        answering.next().await;
    }
}

/// A report that the upstream could not be reached, left by an earlier run (killed during an outage), is gone
/// once the daemon starts: every upstream counts as reachable until a connection says otherwise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_unreachable_report_is_removed_at_start() {
    let idp = idp_issuing("tok").await;
    let upstream = FakeUpstream::start(&["tok"]).await;
    let dir = tempfile::tempdir().unwrap();
    let config = account_config(dir.path(), &idp.uri(), &upstream, "");
    let report = dir.path().join("state/accounts/office.unreachable.json");
    std::fs::create_dir_all(report.parent().unwrap()).unwrap();
    std::fs::write(
        &report,
        r#"{"upstream": "127.0.0.1:1", "since": "2026-01-01T00:00:00Z", "reason": "earlier run"}"#,
    )
    .unwrap();
    assert!(!status_json(&config).1["accounts"][0]["unreachable"].is_null());
    let _daemon = Daemon::spawn(&config);
    assert!(!report.exists());
    let (_, doc) = status_json(&config);
    assert!(doc["accounts"][0]["unreachable"].is_null(), "{doc}");
}

/// A restart during an outage (a reboot, the watchdog, an upgrade): the upstream still does not answer, and the
/// new run reports the outage since the earlier run saw it begin. Before, the report was removed at start and
/// never written again, so `relay status` said nothing and the `upstream_unreachable` alert never opened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_that_outlives_a_restart_is_still_reported_since_it_began() {
    let Silent {
        idp: _idp,
        upstream: _silent,
        dir: _dir,
        config,
        mut daemon,
    } = Silent::with("retry = [\"1s\"]", 1).await;
    daemon.wait_log("relay_event=\"deferred\"");
    let (_, doc) = status_json(&config);
    let since = doc["accounts"][0]["unreachable"]["since"].clone();
    assert!(since.is_string(), "{doc}");
    assert!(daemon.terminate().success());
    let mut daemon = Daemon::spawn(&config);
    daemon.wait_log("relay_event=\"deferred\"");
    let (_, doc) = status_json(&config);
    assert_eq!(doc["accounts"][0]["unreachable"]["since"], since, "{doc}");
    assert!(daemon.terminate().success());
}

/// Mail that waited untried behind an upstream that never answered until it passed `max_age`: its dead-letter
/// reason says it was never tried and that the upstream is not answering (for how long, its last failure), not
/// only that it expired; mail that was tried says its last error, as before. And the untried mail goes to dead/
/// together, once past `max_age`: each expired message hands its turn to the next one waiting, where it used to
/// be one per hold (a second apart here, a couple of `smtp_timeout`s in production), so that the outage each
/// reports grew by that much from one to the next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mail_that_expires_untried_behind_a_silent_upstream_says_why() {
    const MESSAGES: usize = 10;
    let Silent {
        idp: _idp,
        upstream: _upstream,
        dir,
        mut daemon,
        ..
    } = Silent::with("max_age = \"3s\"\nretry = [\"1s\"]", MESSAGES).await;
    let (mut outages, mut tried) = (Vec::new(), 0);
    for _ in 0..MESSAGES {
        let dead = daemon.wait_log("relay_event=\"dead\"");
        assert!(dead.contains("expired after 3s in the queue"), "{dead}");
        assert!(dead.contains("did not answer within 1s"), "{dead}");
        // The account whose upstream kept it, though no attempt was under way (metrics and alerts say so too).
        assert!(dead.contains("relay_account=office"), "{dead}");
        let untried = "never tried; the upstream of account office is not answering (for ";
        match dead.split_once(untried) {
            Some((_, rest)) => {
                let secs: u64 = rest
                    .split_once("s: ")
                    .and_then(|(n, _)| n.parse().ok())
                    .unwrap_or_else(|| panic!("seconds of the outage: {dead}"));
                outages.push(secs);
            }
            None => {
                assert!(dead.contains("last error:"), "{dead}");
                tried += 1;
            }
        }
    }
    assert!(
        outages.len() >= 2 && tried >= 1,
        "{outages:?} untried, {tried} tried"
    );
    let (first, last) = (outages.iter().min(), outages.iter().max());
    assert!(
        last.zip(first).is_some_and(|(l, f)| l - f <= 1),
        "the untried mail expired together: outages of {outages:?} s"
    );
    assert!(queued_in(&dir.path().join("state")).is_empty());
}

/// Mail deferred while the upstream could not be reached goes as soon as it answers again, not at its next
/// retry (an hour away here, hours after a long outage): the first connection answered makes it due.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mail_deferred_while_the_upstream_did_not_answer_goes_when_it_answers_again() {
    use std::sync::atomic::Ordering::SeqCst;
    const MESSAGES: usize = 6;
    let idp = idp_issuing("tok").await;
    let mut upstream = FakeUpstream::start(&["tok"]).await;
    upstream.silent.store(true, SeqCst);
    let dir = tempfile::tempdir().unwrap();
    let config = account_config(
        dir.path(),
        &idp.uri(),
        &upstream,
        "smtp_timeout = \"1s\"\n[queue]\nretry = [\"1h\"]",
    );
    let mut daemon = Daemon::spawn(&config);
    for i in 0..MESSAGES {
        send_message(
            daemon.addr,
            format!("Subject: m{i}\r\n\r\nbody\r\n").as_bytes(),
        )
        .await;
    }
    // The first connections' messages are deferred for an hour; the others wait untried, each probe's message
    // too. Some probes go unanswered meanwhile.
    daemon.wait_log("relay_event=\"deferred\"");
    let deadline = std::time::Instant::now() + LIMIT;
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(50));
    while upstream.unanswered.load(SeqCst) < 3 {
        assert!(std::time::Instant::now() < deadline, "no probes");
        tick.tick().await;
    }
    upstream.silent.store(false, SeqCst);
    // New mail, as devices go on sending: it waits for the last try's hold (a second here) if it must, then is
    // the connection that finds the upstream answering.
    let id = send_message(daemon.addr, b"Subject: new\r\n\r\nbody\r\n").await;
    daemon.wait_log(&format!("relay_event=\"delivered\" relay_queue_id={id}"));
    let woken = daemon.wait_log("the mail it deferred meanwhile is due now");
    assert!(woken.contains("messages="), "{woken}");
    let subjects = distinct_subjects(&mut upstream, MESSAGES + 1).await;
    assert_eq!(subjects.len(), MESSAGES + 1, "each message once");
    for _ in 0..MESSAGES {
        daemon.wait_log("relay_event=\"delivered\"");
    }
    assert!(queued_in(&dir.path().join("state")).is_empty());
    assert_eq!(daemon.terminate().code(), Some(0));
}

/// A route of two generic client-credentials accounts, `(name, token endpoint, port, more)` each, the first
/// first in config order (picked when neither has sent anything), with an hour between retries; the daemon's
/// config in `dir`, a listener without AUTH.
fn route_of_two(
    dir: &std::path::Path,
    a: (&str, &str, u16, &str),
    b: (&str, &str, u16, &str),
) -> std::path::PathBuf {
    write_secret(dir);
    let account = |(name, idp, port, more): (&str, &str, u16, &str)| {
        generic_account_at(name, idp, port, "client_credentials") + more
    };
    let top = format!(
        "[queue]\nretry = [\"1h\"]\n{}{}[[route]]\nsender = \"*\"\naccounts = [\"{}\", \"{}\"]\n",
        account(a),
        account(b),
        a.0,
        b.0
    );
    write_config_with(dir, &top, "address = \"127.0.0.1:0\"\nauth = \"none\"")
}

/// A route with two accounts, one of whose upstreams cannot be reached (silent, or refusing connections): the
/// other takes the mail; none of it is deferred through the unreachable one. A refused connect holds only a few
/// seconds, so without the order (an account whose upstream answers first) the unreachable one, having sent the
/// least, would be picked again as soon as its hold ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_account_of_the_route_takes_the_mail_of_one_that_cannot_be_reached() {
    for refusing in [false, true] {
        mail_goes_around_an_unreachable_account(refusing).await;
    }
}

/// A route with two accounts, one of which cannot get a token (its identity provider answers 500): after its
/// first deferral the other takes the mail. Before, the one in trouble had sent the least and was picked for
/// every message: they used up their retry schedules through it while the healthy one sat idle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_account_of_the_route_takes_the_mail_of_one_without_a_token() {
    const MESSAGES: usize = 6;
    let idp = idp_issuing("tok").await;
    let broken_idp =
        idp_answering(ResponseTemplate::new(500).set_body_string("identity provider down")).await;
    let broken = FakeUpstream::start(&["tok"]).await;
    let mut healthy = FakeUpstream::start(&["tok"]).await;
    let dir = tempfile::tempdir().unwrap();
    // The broken one first: with nothing sent yet by either, config order picks it.
    let config = route_of_two(
        dir.path(),
        ("broken", &broken_idp.uri(), broken.addr.port(), ""),
        ("healthy", &idp.uri(), healthy.addr.port(), ""),
    );
    let mut daemon = Daemon::spawn(&config);
    let first = send_message(daemon.addr, b"Subject: first\r\n\r\nbody\r\n").await;
    let line = daemon.wait_log(&format!("relay_event=\"deferred\" relay_queue_id={first}"));
    assert!(line.contains("relay_account=broken"), "{line}");
    for i in 0..MESSAGES {
        let m = format!("Subject: m{i}\r\n\r\nbody\r\n");
        send_message(daemon.addr, m.as_bytes()).await;
        let got = healthy.next().await;
        assert_eq!(got.from, "healthy@example.com");
        daemon.wait_log("relay_event=\"delivered\"");
    }
    let deferred: Vec<&String> = daemon
        .unmatched()
        .iter()
        .filter(|l| l.contains("relay_event=\"deferred\""))
        .collect();
    assert!(deferred.is_empty(), "{deferred:?}");
    assert_eq!(daemon.terminate().code(), Some(0));
}

/// A 451 once the message went out (a content scan's, say) is the message's, not the account's: the route's
/// next message still goes through that account by its share (config order here), not around it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deferral_after_the_data_does_not_pass_the_account_over() {
    let idp = idp_issuing("tok").await;
    let mut first = FakeUpstream::start(&["tok"]).await;
    *first.data_reply.lock().unwrap() = "451 4.7.1 content scan failed, try later".into();
    let second = FakeUpstream::start(&["tok"]).await;
    let dir = tempfile::tempdir().unwrap();
    let config = route_of_two(
        dir.path(),
        ("first", &idp.uri(), first.addr.port(), ""),
        ("second", &idp.uri(), second.addr.port(), ""),
    );
    let mut daemon = Daemon::spawn(&config);
    let scanned = send_message(daemon.addr, b"Subject: scanned\r\n\r\nbody\r\n").await;
    let line = daemon.wait_log(&format!(
        "relay_event=\"deferred\" relay_queue_id={scanned}"
    ));
    assert!(line.contains("relay_account=first"), "{line}");
    *first.data_reply.lock().unwrap() = "250 2.0.0 OK".into();
    send_message(daemon.addr, b"Subject: next\r\n\r\nbody\r\n").await;
    let got = first.next().await;
    assert_eq!(got.from, "first@example.com");
    let line = daemon.wait_log("relay_event=\"delivered\"");
    assert!(line.contains("relay_account=first"), "{line}");
    assert_eq!(daemon.terminate().code(), Some(0));
    drop(second);
}

/// A route of two accounts, both in trouble: one's upstream does not answer, the other cannot get a token. The
/// message is deferred (an hour) through the second; when the first's upstream answers again, it goes through
/// the first at once, not at its retry step (only mail the recovered account itself deferred was woken).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mail_another_account_of_the_route_deferred_goes_when_one_recovers() {
    let idp = idp_issuing("tok").await;
    let broken_idp =
        idp_answering(ResponseTemplate::new(500).set_body_string("identity provider down")).await;
    // Refused connections until the fake starts on it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let tokenless = FakeUpstream::start(&["tok"]).await;
    let dir = tempfile::tempdir().unwrap();
    let config = route_of_two(
        dir.path(),
        ("down", &idp.uri(), port, ""),
        ("tokenless", &broken_idp.uri(), tokenless.addr.port(), ""),
    );
    let mut daemon = Daemon::spawn(&config);
    // The first finds `down` refusing (config order picks it): deferred through it. The second, `down` known
    // down, goes to the other, which has no token: deferred through that one.
    let first = send_message(daemon.addr, b"Subject: first\r\n\r\nbody\r\n").await;
    let line = daemon.wait_log(&format!("relay_event=\"deferred\" relay_queue_id={first}"));
    assert!(line.contains("relay_account=down"), "{line}");
    let id = send_message(daemon.addr, b"Subject: waits\r\n\r\nbody\r\n").await;
    let line = daemon.wait_log(&format!("relay_event=\"deferred\" relay_queue_id={id}"));
    assert!(line.contains("relay_account=tokenless"), "{line}");
    let mut down = FakeUpstream::start_on(&["tok"], port).await;
    for _ in 0..2 {
        assert_eq!(down.next().await.from, "down@example.com");
        let line = daemon.wait_log("relay_event=\"delivered\"");
        assert!(line.contains("relay_account=down"), "{line}");
    }
    assert_eq!(daemon.terminate().code(), Some(0));
    drop(tokenless);
}

async fn mail_goes_around_an_unreachable_account(refusing: bool) {
    use std::sync::atomic::Ordering::SeqCst;
    const MESSAGES: usize = 8;
    let idp = idp_issuing("tok").await;
    let silent = FakeUpstream::start(&["tok"]).await;
    silent.silent.store(true, SeqCst);
    let unreachable_port = if refusing {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    } else {
        silent.addr.port()
    };
    let mut healthy = FakeUpstream::start(&["tok"]).await;
    let dir = tempfile::tempdir().unwrap();
    // The unreachable one first: with nothing sent yet by either, config order picks it.
    let timeout = "smtp_timeout = \"5s\"\n";
    let config = route_of_two(
        dir.path(),
        ("unreachable", &idp.uri(), unreachable_port, timeout),
        ("healthy", &idp.uri(), healthy.addr.port(), timeout),
    );
    let mut daemon = Daemon::spawn(&config);
    let first = send_message(daemon.addr, b"Subject: first\r\n\r\nbody\r\n").await;
    let down = daemon.wait_log("the upstream cannot be reached");
    assert!(
        down.contains("relay_event=\"upstream_unreachable\"")
            && down.contains("relay_account=unreachable"),
        "{down}"
    );
    daemon.wait_log(&format!("relay_event=\"deferred\" relay_queue_id={first}"));
    for i in 0..MESSAGES {
        send_message(
            daemon.addr,
            format!("Subject: m{i}\r\n\r\nbody\r\n").as_bytes(),
        )
        .await;
    }
    let mut subjects = Vec::new();
    while subjects.len() < MESSAGES {
        let got = healthy.next().await;
        assert_eq!(got.from, "healthy@example.com");
        subjects.extend(subject(&got.data));
    }
    for _ in 0..MESSAGES {
        daemon.wait_log("relay_event=\"delivered\"");
    }
    subjects.sort();
    subjects.dedup();
    assert_eq!(
        subjects.len(),
        MESSAGES,
        "each message once, through the account that answers (refusing: {refusing})"
    );
    let deferred: Vec<&String> = daemon
        .unmatched()
        .iter()
        .filter(|l| l.contains("relay_event=\"deferred\""))
        .collect();
    assert!(deferred.is_empty(), "refusing: {refusing}: {deferred:?}");
    if !refusing {
        assert_eq!(
            silent.unanswered.load(SeqCst),
            1,
            "the silent one tried once"
        );
    }
    assert_eq!(daemon.terminate().code(), Some(0));
}

/// The upstream refuses the account's token (revoked) and the token endpoint refuses the client too
/// (`invalid_client`: a secret that expired): the first refused message asks for a new token once, and the
/// messages after it take that answer for a while instead of each asking again (nor log in again with the refused
/// token). With `flow = "password"` each ask is a failed sign-in that a lockout policy counts, as each refused
/// login is the upstream's. Every message stays queued.
#[tokio::test]
async fn a_refused_token_and_a_refused_renewal_ask_the_token_endpoint_once_not_per_message() {
    let idp = MockServer::start().await;
    answer_token_requests(
        &idp,
        ResponseTemplate::new(401).set_body_json(serde_json::json!({
            "error": "invalid_client",
            "error_description": "AADSTS7000222: The provided client secret keys are expired."
        })),
    )
    .await;
    let upstream = FakeUpstream::start(&["tok"]).await;
    upstream
        .tokens
        .lock()
        .unwrap()
        .push("REFUSE 535 5.7.3 Authentication unsuccessful".into());
    let dir = tempfile::tempdir().unwrap();
    write_valid_tokens(
        &dir.path().join("state"),
        "office",
        "tok",
        Duration::from_secs(3600),
    );
    let top = account_top(
        dir.path(),
        &idp.uri(),
        &upstream,
        "max_connections = 1\n[queue]\nretry = [\"1h\"]\n",
    );
    let mut relay = TestRelay::start_with(dir, &top, common::idp::LISTENER).await;
    for _ in 0..3 {
        accepted_during_fault(&relay).await;
    }
    relay.attempts_done(3).await;
    assert_eq!(relay.queued().len(), 3);
    let asked = idp.received_requests().await.unwrap_or_default().len();
    assert_eq!(asked, 1, "token requests for three refused messages");
    // Nor does each log in with the refused token again: one failed login, not one per message.
    let logins = upstream
        .commands
        .lock()
        .unwrap()
        .iter()
        .filter(|c| c.starts_with("AUTH"))
        .count();
    assert_eq!(logins, 1, "logins with the refused token");
    // Each says both: the upstream's refusal (it was nowhere before, only the token endpoint's answer) and why no
    // new token came.
    let states = files_in(&relay.state(), "queue");
    let states: Vec<&String> = states.iter().filter(|f| f.ends_with(".state")).collect();
    assert_eq!(states.len(), 3, "{states:?}");
    for name in states {
        let state: serde_json::Value =
            serde_json::from_slice(&std::fs::read(relay.state().join("queue").join(name)).unwrap())
                .unwrap();
        let why = state["last_error"].as_str().unwrap_or_default();
        assert!(
            why.contains("535 5.7.3 Authentication unsuccessful") && why.contains("AADSTS7000222"),
            "{why}"
        );
    }
    relay.stop().await;
}

/// The upstream refuses the stored token, and the token the delivery gets instead lasts less than the old one
/// would have (a minute here, the shortest relay takes): the refresher renews it in its time (15 s ahead), with no mail to ask for it, instead of
/// sleeping until the old token's renewal time while the new one expires (an idle relay then showed an expired
/// token as valid).
#[tokio::test]
async fn a_token_replaced_after_a_refusal_is_renewed_in_its_own_time() {
    struct Minting(std::sync::atomic::AtomicUsize);
    impl wiremock::Respond for Minting {
        fn respond(&self, _: &wiremock::Request) -> ResponseTemplate {
            let n = self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            ResponseTemplate::new(200).set_body_json(serde_json::json!({
                "token_type": "Bearer", "expires_in": 60, "access_token": format!("fresh-{n}")
            }))
        }
    }
    let idp = MockServer::start().await;
    token_request()
        .respond_with(Minting(Default::default()))
        .mount(&idp)
        .await;
    let mut upstream = FakeUpstream::start(&["fresh-0", "fresh-1", "fresh-2"]).await;
    let dir = tempfile::tempdir().unwrap();
    write_valid_tokens(
        &dir.path().join("state"),
        "office",
        "revoked",
        Duration::from_secs(3600),
    );
    let top = account_top(dir.path(), &idp.uri(), &upstream, "");
    let relay = TestRelay::start_with(dir, &top, common::idp::LISTENER).await;
    accepted_during_fault(&relay).await;
    assert!(upstream.next().await.auth.contains("Bearer fresh-0"));
    // No more mail: the refresher alone asks for the next token, 15 s before fresh-0 expires.
    let deadline = std::time::Instant::now() + Duration::from_secs(75);
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    while idp.received_requests().await.unwrap_or_default().len() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the replaced token was not renewed by the refresher"
        );
        tick.tick().await;
    }
    relay.stop().await;
}

/// An upstream that stops answering, with no mail left to try it (here the one message waits an hour for its
/// retry; deleted or expired mail is the same): relay tries it on its own after each hold, so its return is
/// seen (the warning, `relay status`) and the deferred mail goes then, instead of at its next retry or the
/// next message. Before, `relay status` said it was down for as long as no new mail came.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_comes_back_is_seen_without_mail_to_try_it() {
    use std::sync::atomic::Ordering::SeqCst;
    let Silent {
        idp: _idp,
        mut upstream,
        dir: _dir,
        config,
        mut daemon,
    } = Silent::with("retry = [\"1h\"]", 1).await;
    daemon.wait_log("the upstream cannot be reached");
    daemon.wait_log("relay_event=\"deferred\"");
    let (_, doc) = status_json(&config);
    assert!(doc["accounts"][0]["unreachable"].is_object(), "{doc}");
    upstream.silent.store(false, SeqCst);
    daemon.wait_log("the upstream can be reached again");
    let got = upstream.next().await;
    assert!(String::from_utf8_lossy(&got.data).contains("Subject: m0"));
    daemon.wait_log("relay_event=\"delivered\"");
    let (_, doc) = status_json(&config);
    assert!(doc["accounts"][0]["unreachable"].is_null(), "{doc}");
    assert_eq!(daemon.terminate().code(), Some(0));
}

/// The same with the queue emptied during the outage (the message deleted): once the upstream answers again,
/// `relay status` says the account is ok, though no message has gone through it since (before, it stayed
/// `failing` on its last deferral until the next message, and a monitoring check with it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_is_ok_again_when_its_upstream_answers_with_nothing_queued() {
    use std::sync::atomic::Ordering::SeqCst;
    let Silent {
        idp: _idp,
        upstream,
        dir,
        config,
        mut daemon,
    } = Silent::with("retry = [\"1h\"]", 1).await;
    daemon.wait_log("the upstream cannot be reached");
    let deferred = daemon.wait_log("relay_event=\"deferred\"");
    let id = deferred
        .split("relay_queue_id=")
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .expect("the deferred line names its message")
        .to_string();
    let deleted = run_bounded(
        std::process::Command::new(relay_bin())
            .args(["queue", "delete", &id, "--config"])
            .arg(&config),
    );
    assert!(deleted.status.success(), "{deleted:?}");
    assert_eq!(status_json(&config).1["accounts"][0]["state"], "failing");
    upstream.silent.store(false, SeqCst);
    daemon.wait_log("the upstream can be reached again");
    // The report is written just after the line: looked at until it is (bounded).
    let deadline = std::time::Instant::now() + LIMIT;
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(50));
    loop {
        let (code, doc) = status_json(&config);
        if doc["accounts"][0]["state"] == "ok" {
            assert_eq!(code, Some(0), "{doc}");
            assert_eq!(doc["accounts"][0]["last_delivery"]["outcome"], "reachable");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{doc}");
        tick.tick().await;
    }
    assert!(queued_in(&dir.path().join("state")).is_empty());
    assert_eq!(daemon.terminate().code(), Some(0));
}

/// A token endpoint that fails while mail waits: the journal says so once per renewal that failed, not once per
/// queued message at each retry step (the renewal's failure is remembered for 30 s, and each message met it: a
/// four-minute outage with a busy queue logged thousands of `deferred` lines a minute). Each message's state still
/// says why it waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_endpoint_down_is_said_once_not_for_every_queued_message() {
    const MESSAGES: usize = 10;
    let idp = common::idp::idp_answering(
        ResponseTemplate::new(503).set_body_string("down for maintenance"),
    )
    .await;
    let upstream = FakeUpstream::start(&["tok"]).await;
    let dir = tempfile::tempdir().unwrap();
    let config = account_config(dir.path(), &idp.uri(), &upstream, "");
    let daemon = Daemon::spawn(&config);
    for _ in 0..MESSAGES {
        send_message(daemon.addr, BODY).await;
    }
    // Every message tried once: each has its state, with the reason.
    let queue = dir.path().join("state/queue");
    let deadline = std::time::Instant::now() + LIMIT;
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    let states = loop {
        let states: Vec<String> = std::fs::read_dir(&queue)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.path().extension().is_some_and(|x| x == "state"))
            .filter_map(|e| std::fs::read_to_string(e.path()).ok())
            .filter(|s| s.contains("503"))
            .collect();
        if states.len() == MESSAGES {
            break states;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} tried",
            states.len()
        );
        tick.tick().await;
    };
    assert!(
        states.iter().all(|s| s.contains("\"attempts\": 1")),
        "{states:?}"
    );
    let log = daemon.terminate_with_log();
    let deferred = log
        .iter()
        .filter(|l| l.contains("relay_event=\"deferred\""))
        .count();
    let asked = idp.received_requests().await.unwrap_or_default().len();
    assert!(
        (1..=asked.max(1)).contains(&deferred),
        "{deferred} deferred lines for {asked} token requests: {log:#?}"
    );
}

/// Mail deferred because no token could be had goes as soon as the refresher has one again, not at its next retry
/// step: with an hour's step, a token endpoint down for a few seconds held the message for the hour (the account
/// `failing` meanwhile, its token fresh). The retry schedule here is an hour; the refresher's second try (after 5 s)
/// gets a token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mail_deferred_for_want_of_a_token_goes_once_the_refresher_has_one() {
    let idp = MockServer::start().await;
    token_request()
        .respond_with(ResponseTemplate::new(500).set_body_string("down"))
        .up_to_n_times(2)
        .with_priority(1)
        .mount(&idp)
        .await;
    answer_token_requests(&idp, token("tok")).await;
    let mut upstream = FakeUpstream::start(&["tok"]).await;
    let dir = tempfile::tempdir().unwrap();
    let config = account_config(
        dir.path(),
        &idp.uri(),
        &upstream,
        "[queue]\nretry = [\"1h\"]\n",
    );
    let mut daemon = Daemon::spawn(&config);
    let id = send_message(daemon.addr, BODY).await;
    let line = daemon.wait_log("relay_event=\"deferred\"");
    assert!(line.contains(&id) && line.contains("500"), "{line}");
    let got = upstream.next().await;
    assert_eq!(strip_received(&got.data), BODY);
    let line = daemon.wait_log("the account can send again");
    assert!(line.contains("messages=1"), "{line}");
    // Which of the two came back (the upstream never left).
    assert!(line.contains("(its token could be had again)"), "{line}");
    daemon.wait_log("relay_event=\"delivered\"");
    assert_eq!(daemon.terminate().code(), Some(0));
}
