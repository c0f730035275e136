//! Delivery through a fake XOAUTH2 upstream with tokens from a fake token endpoint (wiremock).

mod common;

use std::sync::Arc;

use common::idp::{
    account_top, idp_answering, idp_issuing, idp_stale_then_fresh, relay_with_account,
    relay_with_account_and, token, token_request,
};
use common::upstream::FakeUpstream;
use common::*;
use wiremock::matchers::body_string_contains;
use wiremock::{MockServer, ResponseTemplate};

const LISTENER: &str = "[[listener]]\naddress = \"127.0.0.1:0\"\nauth = \"none\"\n";

/// The message, and as the client sends it (dot-stuffed, RFC 5321 section 4.5.2).
const BODY: &[u8] = b"From: scanner@example.com\r\nTo: ops@example.com\r\nSubject: scan\r\n\r\n.dot line\r\nend\r\n";
const WIRE: &[u8] = b"From: scanner@example.com\r\nTo: ops@example.com\r\nSubject: scan\r\n\r\n..dot line\r\nend\r\n";

/// `relay serve` on `config` with one of its debug-build test hooks set (`RELAY_TEST_…_MS`, see
/// `relay::test_hooks`).
fn daemon_with_hook(config: &std::path::Path, hook: &str, value: &str) -> Daemon {
    Daemon::spawn_with(config, |c| {
        c.env(hook, value);
    })
}

/// The state file of message `id` in `dir` (queue or dead).
fn state_file(relay: &TestRelay, dir: &str, id: &str) -> String {
    std::fs::read_to_string(relay.state().join(format!("{dir}/{id}.state"))).unwrap()
}

#[tokio::test]
async fn delivers_byte_for_byte_with_xoauth2() {
    let idp = MockServer::start().await;
    token_request()
        .and(body_string_contains("grant_type=client_credentials"))
        .and(body_string_contains("client_secret=s3cret-value"))
        .and(body_string_contains("client_id=cid-123"))
        .respond_with(token("tok-1"))
        .expect(1)
        .mount(&idp)
        .await;
    let mut upstream = FakeUpstream::start(&["tok-1"]).await;
    let mut relay = relay_with_account(&idp, &upstream).await;
    let id = send_message(relay.addr(), WIRE).await;
    let got = upstream.next().await;
    assert_eq!(
        got.auth,
        "user=relay@example.com\x01auth=Bearer tok-1\x01\x01"
    );
    // rewrite_from's default, `envelope`: MAIL FROM is the mailbox, the message is untouched.
    assert_eq!(got.from, "relay@example.com");
    assert_eq!(got.to, ["b@example.com"]);
    relay.attempts_done(1).await;
    // What arrived upstream is what was queued: relay's Received line, then the client's bytes.
    assert!(got.data.starts_with(b"Received: from device.lan"));
    assert_eq!(strip_received(&got.data), BODY);
    assert!(
        got.data.windows(32).any(|w| w == id.as_bytes()),
        "the Received line names the queue id"
    );
    assert!(relay.queued().is_empty(), "delivered mail leaves the queue");
    // A second message reuses the token (the mock expects one token request) and the upstream connection.
    send_message(relay.addr(), WIRE).await;
    upstream.next().await;
    relay.attempts_done(2).await;
    assert_eq!(
        upstream
            .connections
            .load(std::sync::atomic::Ordering::SeqCst),
        1,
        "connection reused"
    );
}

/// A server that offers OAUTHBEARER (RFC 7628) and not XOAUTH2 gets OAUTHBEARER: the mailbox in the GS2 header,
/// the host and port relay connected to, the bearer token. A refused token is answered with the single ^A
/// that RFC 7628 asks for, the token is refreshed, and the message goes.
#[tokio::test]
async fn a_server_offering_only_oauthbearer_gets_oauthbearer() {
    let idp = idp_stale_then_fresh().await;
    let mut upstream = FakeUpstream::start(&["fresh"]).await;
    upstream.only_oauthbearer();
    let mut relay = relay_with_account(&idp, &upstream).await;
    send_message(relay.addr(), WIRE).await;
    let got = upstream.next().await;
    assert_eq!(
        got.auth,
        format!(
            "n,a=relay@example.com,\x01host=127.0.0.1\x01port={}\x01auth=Bearer fresh\x01\x01",
            upstream.addr.port()
        )
    );
    assert_eq!(strip_received(&got.data), BODY);
    relay.attempts_done(1).await;
    assert!(relay.queued().is_empty(), "delivered mail leaves the queue");
    let commands = upstream.commands.lock().unwrap().clone();
    assert!(
        commands.iter().any(|c| c == "AQ=="),
        "the refused token's challenge is answered with ^A: {commands:?}"
    );
}

#[tokio::test]
async fn rejected_token_is_refreshed_once_then_delivered() {
    let idp = idp_stale_then_fresh().await;
    let mut upstream = FakeUpstream::start(&["fresh"]).await;
    let mut relay = relay_with_account(&idp, &upstream).await;
    send_message(relay.addr(), WIRE).await;
    let got = upstream.next().await;
    assert!(got.auth.contains("Bearer fresh"));
    relay.attempts_done(1).await;
    assert!(relay.queued().is_empty());
    assert_eq!(
        idp.received_requests().await.unwrap().len(),
        2,
        "one refresh after the 334/535"
    );
}

#[tokio::test]
async fn upstream_4xx_defers_and_5xx_goes_to_dead() {
    let idp = idp_issuing("tok").await;
    let upstream = FakeUpstream::start(&["tok"]).await;
    *upstream.data_reply.lock().unwrap() =
        "451 4.3.0 Mail server temporarily rejected message".into();
    let mut relay = relay_with_account(&idp, &upstream).await;
    let deferred = send_message(relay.addr(), WIRE).await;
    relay.attempts_done(1).await;
    let state: serde_json::Value = serde_json::from_slice(
        &std::fs::read(relay.state().join(format!("queue/{deferred}.state"))).unwrap(),
    )
    .unwrap();
    assert_eq!(state["attempts"], 1);
    assert!(
        state["last_error"].as_str().unwrap().contains("451"),
        "{state}"
    );
    assert!(state["next_attempt"].is_string());
    assert_eq!(relay.queued().len(), 1, "deferred mail stays queued");

    *upstream.data_reply.lock().unwrap() =
        "550 5.7.60 SMTP; Client does not have permissions to send as this sender".into();
    let dead = send_message(relay.addr(), WIRE).await;
    relay.attempts_done(2).await;
    assert!(relay.state().join(format!("dead/{dead}.msg")).exists());
    let state = std::fs::read_to_string(relay.state().join(format!("dead/{dead}.state"))).unwrap();
    assert!(state.contains("5.7.60"), "{state}");
    assert_eq!(relay.queued().len(), 1);
}

/// dead/ removed while the daemon runs (a clean-up script, an admin emptying it by hand): mail that fails for
/// good still goes there, with its reason, instead of staying queued with nothing said.
#[tokio::test]
async fn a_removed_dead_dir_is_made_again_for_mail_that_fails_for_good() {
    let idp = idp_issuing("tok").await;
    let upstream = FakeUpstream::start(&["tok"]).await;
    *upstream.data_reply.lock().unwrap() = "550 5.7.1 refused".into();
    let mut relay = relay_with_account(&idp, &upstream).await;
    std::fs::remove_dir_all(relay.state().join("dead")).unwrap();
    let id = send_message(relay.addr(), WIRE).await;
    relay.attempts_done(1).await;
    assert!(relay.state().join(format!("dead/{id}.msg")).exists());
    let state = state_file(&relay, "dead", &id);
    assert!(state.contains("5.7.1 refused"), "{state}");
    assert!(relay.queued().is_empty());
}

/// Queue files relay did not write that way: an envelope without recipients is quarantined (not removed as
/// "delivered to every recipient"), and a next attempt in the year 9999 (a clock stepped back, a hand edit) does
/// not keep a message from being tried.
#[tokio::test]
async fn odd_queue_files_are_neither_removed_unsent_nor_stranded() {
    let relay = TestRelay::start(LISTENER).await;
    let empty = send_message(relay.addr(), WIRE).await;
    let later = send_message(relay.addr(), WIRE).await;
    let dir = relay.stop().await;
    let queue = dir.path().join("state/queue");
    let path = queue.join(format!("{empty}.msg"));
    let bytes = std::fs::read(&path).unwrap();
    let cut = bytes.iter().position(|&b| b == b'\n').unwrap();
    let mut envelope: serde_json::Value = serde_json::from_slice(&bytes[..cut]).unwrap();
    envelope["recipients"] = serde_json::json!([]);
    let mut edited = serde_json::to_vec(&envelope).unwrap();
    edited.extend_from_slice(&bytes[cut..]);
    std::fs::write(&path, edited).unwrap();
    let mut state = relay::queue::state::DeliveryState::default();
    state.failed("451 4.3.0 try later");
    state.next_attempt = Some(humantime::parse_rfc3339("9999-01-01T00:00:00Z").unwrap());
    relay::queue::state::write_state(
        &queue,
        relay::queue::QueueId::parse(&later).unwrap(),
        &state,
    )
    .unwrap();

    let idp = idp_issuing("tok").await;
    let mut upstream = FakeUpstream::start(&["tok"]).await;
    let top = account_top(dir.path(), &idp.uri(), &upstream, "");
    let mut relay = TestRelay::start_with(dir, &top, LISTENER).await;
    upstream.next().await;
    relay.drained().await;
    assert_eq!(
        files_in(&relay.state(), "quarantine"),
        [format!("{empty}.msg")]
    );
    assert!(files_in(&relay.state(), "dead").is_empty());
}

/// An upstream that refuses a large message while it comes (552, then it hangs up with the rest unread): its
/// reply is what the message fails with, for good, instead of "connection reset" and the whole message sent
/// again at every retry until max_age.
#[tokio::test]
async fn a_refusal_in_the_middle_of_the_body_is_heard() {
    let idp = idp_issuing("tok").await;
    let upstream = FakeUpstream::start(&["tok"]).await;
    *upstream.data_reply.lock().unwrap() =
        "MIDWAY 552 5.3.4 Message size exceeds fixed maximum message size".into();
    let mut relay = relay_with_account(&idp, &upstream).await;
    let mut big = b"Subject: scan\r\n\r\n".to_vec();
    while big.len() < 4 << 20 {
        big.extend_from_slice(&[b'x'; 76]);
        big.extend_from_slice(b"\r\n");
    }
    let id = send_message(relay.addr(), &big).await;
    relay.drained().await;
    let state = state_file(&relay, "dead", &id);
    assert!(state.contains("552 5.3.4"), "{state}");
}

/// A directory by a message's name is no message: moved to quarantine/ at start, with its reason in the log,
/// instead of being tried (and deferred) until `max_age`.
#[tokio::test]
async fn a_directory_in_a_messages_place_is_quarantined() {
    let idp = idp_issuing("tok").await;
    let upstream = FakeUpstream::start(&["tok"]).await;
    let dir = tempfile::tempdir().unwrap();
    let name = "01a20a2d000000000000000000000009.msg";
    std::fs::create_dir_all(dir.path().join("state/queue").join(name)).unwrap();
    let top = account_top(dir.path(), &idp.uri(), &upstream, "");
    let relay = TestRelay::start_with(dir, &top, LISTENER).await;
    assert!(relay.state().join("quarantine").join(name).is_dir());
    assert!(files_in(&relay.state(), "queue").is_empty());
    assert!(files_in(&relay.state(), "dead").is_empty());
}

#[tokio::test]
async fn token_endpoint_failure_defers_and_keeps_the_mail() {
    let idp = idp_answering(ResponseTemplate::new(400).set_body_json(serde_json::json!({
            "error": "invalid_client", "error_description": "AADSTS7000215: Invalid client secret provided."
        }))).await;
    let upstream = FakeUpstream::start(&["tok"]).await;
    let mut relay = relay_with_account(&idp, &upstream).await;
    let id = send_message(relay.addr(), WIRE).await;
    relay.attempts_done(1).await;
    let state = state_file(&relay, "queue", &id);
    assert!(state.contains("invalid_client"), "{state}");
    assert_eq!(relay.queued().len(), 1);
}

/// A token endpoint that fails is not asked again by every delivery attempt: ten messages cost the endpoint one
/// request from the deliveries (and the refresher's own), not one each. An endpoint that hangs made each message
/// wait its timeout in turn, and with the password flow each request is a failed sign-in a lockout policy counts.
#[tokio::test]
async fn a_failed_renewal_is_not_asked_again_for_every_message() {
    let idp =
        idp_answering(ResponseTemplate::new(503).set_body_string("down for maintenance")).await;
    let upstream = FakeUpstream::start(&["tok"]).await;
    let mut relay = relay_with_account(&idp, &upstream).await;
    let mut ids = Vec::new();
    for _ in 0..10 {
        ids.push(send_message(relay.addr(), WIRE).await);
    }
    relay.attempts_done(10).await;
    let asked = idp.received_requests().await.unwrap().len();
    assert!(asked <= 3, "{asked} token requests for 10 messages");
    assert_eq!(relay.queued().len(), 10, "all of it waits");
    let reasons: Vec<String> = ids
        .iter()
        .map(|id| state_file(&relay, "queue", id))
        .collect();
    assert!(
        reasons.iter().all(|r| r.contains("503")),
        "each says why: {reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("renewal failed moments ago")),
        "{reasons:?}"
    );
}

/// Messages that come while the refresher's first token request hangs wait for it, then take its failure: they
/// do not ask again, each after the other (before, the next request went out as the first timed out, and held
/// every delivery for a second timeout).
#[tokio::test]
async fn deliveries_waiting_on_the_refreshers_request_take_its_failure() {
    let idp = idp_answering(
        ResponseTemplate::new(503)
            .set_body_string("down for maintenance")
            .set_delay(std::time::Duration::from_secs(2)),
    )
    .await;
    let upstream = FakeUpstream::start(&["tok"]).await;
    let mut relay = relay_with_account(&idp, &upstream).await;
    for _ in 0..3 {
        send_message(relay.addr(), WIRE).await;
    }
    relay.attempts_done(3).await;
    let asked = idp.received_requests().await.unwrap().len();
    assert_eq!(asked, 1, "{asked} token requests");
    assert_eq!(relay.queued().len(), 3, "all of it waits");
}

#[tokio::test]
async fn queue_retry_sends_a_deferred_message_now() {
    let idp = idp_issuing("tok").await;
    let mut upstream = FakeUpstream::start(&["tok"]).await;
    *upstream.data_reply.lock().unwrap() =
        "421 4.3.2 Service not available, closing channel".into();
    let mut relay = relay_with_account(&idp, &upstream).await;
    let id = send_message(relay.addr(), WIRE).await;
    relay.attempts_done(1).await;
    assert_eq!(relay.queued().len(), 1);
    // The next try is a minute away; the sysadmin wants it now.
    *upstream.data_reply.lock().unwrap() = "250 2.0.0 OK".into();
    retry_delivers_the_deferred(&mut relay, &mut upstream, &id).await;
    assert!(relay.queued().is_empty());
}

/// `relay queue retry ID` for a message deferred once: it goes now, its second attempt.
async fn retry_delivers_the_deferred(relay: &mut TestRelay, upstream: &mut FakeUpstream, id: &str) {
    let cli_config = relay.dir.path().join("cli.toml");
    std::fs::write(&cli_config, format!("state_dir = {:?}\n", relay.state())).unwrap();
    queue_retry(&cli_config, id);
    let got = upstream.next().await;
    assert_eq!(strip_received(&got.data), BODY);
    relay.attempts_done(2).await;
}

/// A reading of the queue that lists a message still arriving (a large one, whose bytes go to its file as they
/// come, unsealed until its final dot) looks at it and leaves it to its commit: that look is no delivery
/// attempt (it counted as one before), and the message is delivered once, as soon as it is committed.
#[tokio::test]
async fn a_message_still_arriving_when_the_queue_is_read_is_not_an_attempt() {
    let idp = idp_issuing("tok").await;
    let mut upstream = FakeUpstream::start(&["tok"]).await;
    *upstream.data_reply.lock().unwrap() = "451 4.3.0 try later".into();
    let mut relay = relay_with_account(&idp, &upstream).await;
    let deferred = send_message(relay.addr(), WIRE).await;
    relay.attempts_done(1).await;
    *upstream.data_reply.lock().unwrap() = "250 2.0.0 OK".into();

    // The second message's first 256 KiB, without its final dot: its file is in queue/, unsealed.
    let mut arriving = RawClient::in_data(relay.addr()).await;
    let mut big = b"Subject: scan\r\n\r\n".to_vec();
    while big.len() < 256 << 10 {
        big.extend_from_slice(&[b'x'; 76]);
        big.extend_from_slice(b"\r\n");
    }
    arriving.send(&big).await;
    let queue_files = || {
        files_in(&relay.state(), "queue")
            .iter()
            .filter(|f| f.ends_with(".msg"))
            .count()
    };
    tokio::time::timeout(LIMIT, async {
        while queue_files() < 2 {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the arriving message's file appears");

    // `relay queue retry` has the queue read again: the deferred message goes, and the arriving one is looked at.
    retry_delivers_the_deferred(&mut relay, &mut upstream, &deferred).await;

    arriving.send(b".\r\n").await;
    arriving.expect(250).await;
    let got = upstream.next().await;
    assert_eq!(strip_received(&got.data), &big[..]);
    relay.drained().await;
    assert_eq!(
        *relay.attempts.borrow(),
        3,
        "the deferral, the retry and the one delivery of the arriving message"
    );
    assert!(
        upstream.received.try_recv().is_err(),
        "the arriving message went once"
    );
}

#[tokio::test]
async fn concurrent_deliveries_share_one_token_request() {
    let idp = MockServer::start().await;
    token_request()
        .respond_with(token("tok"))
        .expect(1)
        .mount(&idp)
        .await;
    let mut upstream = FakeUpstream::start(&["tok"]).await;
    let mut relay = relay_with_account(&idp, &upstream).await;
    let addr = relay.addr();
    let sends: Vec<_> = (0..6)
        .map(|_| tokio::spawn(send_message(addr, WIRE)))
        .collect();
    for s in sends {
        s.await.unwrap();
    }
    for _ in 0..6 {
        upstream.next().await;
    }
    relay.attempts_done(6).await;
    assert!(relay.queued().is_empty());
}

/// Mail past `max_age` is tried once more, as Postfix does: the upstream may take it now (its last wait, a retry
/// step, a hold, may have ended past the age). Only a failed attempt past `max_age` sends it to dead/, saying the
/// attempt's error. (It went to dead/ untried, bounced though the upstream would have taken it.)
#[tokio::test]
async fn mail_older_than_max_age_is_tried_once_more_then_goes_to_dead() {
    let idp = idp_issuing("tok").await;
    let mut upstream = FakeUpstream::start(&["tok"]).await;
    let mut relay = relay_with_account_and(&idp, &upstream, "[queue]\nmax_age = \"0s\"").await;
    let id = send_message(relay.addr(), WIRE).await;
    relay.attempts_done(1).await;
    let got = upstream.next().await;
    assert!(String::from_utf8_lossy(&got.data).contains("Subject: scan"));
    assert!(relay.queued().is_empty(), "delivered");
    assert!(!relay.state().join(format!("dead/{id}.msg")).exists());

    *upstream.data_reply.lock().unwrap() =
        "451 4.3.0 Mail server temporarily rejected message".into();
    let id = send_message(relay.addr(), WIRE).await;
    relay.attempts_done(2).await;
    let state = state_file(&relay, "dead", &id);
    assert!(
        state.contains("expired after 0s in the queue; last error: 451 4.3.0"),
        "{state}"
    );
}

/// One message through an upstream speaking implicit TLS with `server` (certificate, key), relay trusting only
/// `ca_file` and connecting to `localhost`: delivered, or the last error its state records.
async fn over_tls(server: &(String, String), ca_file: &str) -> Result<(), String> {
    let certs = tempfile::tempdir().unwrap();
    let (cert, key) = (certs.path().join("cert.pem"), certs.path().join("key.pem"));
    std::fs::write(&cert, &server.0).unwrap();
    write_private(&key, &server.1);
    over_tls_with(
        relay::smtp::tls::rustls_acceptor(&cert, &key).unwrap(),
        ca_file,
    )
    .await
}

/// A TLS server that presents `cert` but signs its handshakes with `key`, speaking only `versions`.
fn acceptor(
    cert: &str,
    key: &str,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> tokio_rustls::TlsAcceptor {
    use rustls::pki_types::pem::PemObject;
    #[derive(Debug)]
    struct Always(Arc<rustls::sign::CertifiedKey>);
    impl rustls::server::ResolvesServerCert for Always {
        fn resolve(
            &self,
            _: rustls::server::ClientHello<'_>,
        ) -> Option<Arc<rustls::sign::CertifiedKey>> {
            Some(self.0.clone())
        }
    }
    let provider = rustls::crypto::CryptoProvider::get_default()
        .unwrap()
        .clone();
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
    let signing = provider.key_provider.load_private_key(key).unwrap();
    let chain = vec![rustls::pki_types::CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()];
    let config = rustls::ServerConfig::builder_with_protocol_versions(versions)
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(Always(Arc::new(rustls::sign::CertifiedKey::new(
            chain, signing,
        )))));
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

async fn over_tls_with(acceptor: tokio_rustls::TlsAcceptor, ca_file: &str) -> Result<(), String> {
    install_crypto();
    let idp = idp_issuing("tok").await;
    let certs = tempfile::tempdir().unwrap();
    std::fs::write(certs.path().join("ca.pem"), ca_file).unwrap();
    let mut upstream = FakeUpstream::start_tls(&["tok"], Some(acceptor)).await;
    let dir = tempfile::tempdir().unwrap();
    write_private(&dir.path().join("secret"), "s");
    let top = format!(
        "default_account = \"office\"\n[[account]]\nname = \"office\"\nprovider = \"generic\"\nflow = \"client_credentials\"\nmailbox = \"relay@example.com\"\nclient_id = \"c\"\nclient_secret_file = \"{{dir}}/secret\"\ntoken_url = \"{}/token\"\nscope = \"s\"\nsmtp_host = \"localhost\"\nsmtp_port = {}\nsmtp_tls = \"implicit\"\nca_file = {:?}\n",
        idp.uri(),
        upstream.addr.port(),
        certs.path().join("ca.pem")
    );
    let mut relay = TestRelay::start_with(dir, &top, LISTENER).await;
    let id = send_message(relay.addr(), WIRE).await;
    relay.attempts_done(1).await;
    if relay.queued().is_empty() {
        let got = upstream.next().await;
        assert_eq!(strip_received(&got.data), BODY);
        return Ok(());
    }
    let state = state_file(&relay, "queue", &id);
    Err(state)
}

/// Implicit TLS to the upstream, trusting its certificate through `ca_file` only: a CA's, or the server's own
/// self-signed one, `CA:TRUE` or not (webpki alone refuses a `CA:TRUE` certificate presented by a server, which
/// is how `openssl req -x509` makes them, and so how most self-hosted servers are set up). The server's own
/// certificate is still checked for its name and dates; another self-signed certificate is not trusted.
#[tokio::test]
async fn upstream_over_tls_verified_with_ca_file() {
    install_crypto();
    let certs = tempfile::tempdir().unwrap();
    let cert = make_cert(certs.path());
    let key = std::fs::read_to_string(&cert.key).unwrap();
    assert_eq!(over_tls(&(cert.pem.clone(), key), &cert.pem).await, Ok(()));
    let openssl_style = self_signed("localhost", true, None);
    assert_eq!(over_tls(&openssl_style, &openssl_style.0).await, Ok(()));

    let other = self_signed("localhost", true, None);
    let refused = over_tls(&openssl_style, &other.0).await.unwrap_err();
    assert!(refused.contains("invalid peer certificate"), "{refused}");
    let said = relay::upstream::diagnosis::diagnose(&refused, None).map(|d| d.code);
    assert_eq!(said, Some("TLS CaUsedAsEndEntity"), "{refused}");
    let unknown = over_tls(&self_signed("localhost", false, None), &other.0)
        .await
        .unwrap_err();
    let said = relay::upstream::diagnosis::diagnose(&unknown, None).map(|d| d.code);
    assert_eq!(said, Some("TLS UnknownIssuer"), "{unknown}");
    let elsewhere = self_signed("mail.example.net", true, None);
    let refused = over_tls(&elsewhere, &elsewhere.0).await.unwrap_err();
    assert!(refused.contains("not valid for name"), "{refused}");
    let said = relay::upstream::diagnosis::diagnose(&refused, None).map(|d| d.code);
    assert_eq!(said, Some("TLS NotValidForName"), "{refused}");
    // Dovecot's mkcert.sh makes certificates with a Common Name only: compared whole, as OpenSSL's clients do.
    let cn_only = self_signed("cn:localhost", true, None);
    assert_eq!(over_tls(&cn_only, &cn_only.0).await, Ok(()));
    let cn_elsewhere = self_signed("cn:mail.example.net", true, None);
    assert!(over_tls(&cn_elsewhere, &cn_elsewhere.0).await.is_err());
    // TLS 1.2 as well as 1.3; and the listed certificate is no use without its key.
    let tls12 = acceptor(
        &openssl_style.0,
        &openssl_style.1,
        &[&rustls::version::TLS12],
    );
    assert_eq!(over_tls_with(tls12, &openssl_style.0).await, Ok(()));
    for versions in [&rustls::version::TLS12, &rustls::version::TLS13] {
        let stolen = acceptor(&openssl_style.0, &other.1, &[versions]);
        let refused = over_tls_with(stolen, &openssl_style.0).await.unwrap_err();
        assert!(refused.contains("BadSignature"), "{refused}");
    }
    let expired = self_signed("localhost", true, Some((2021, 1, 1)));
    let refused = over_tls(&expired, &expired.0).await.unwrap_err();
    let said = relay::upstream::diagnosis::diagnose(&refused, None).map(|d| d.code);
    assert_eq!(said, Some("TLS Expired"), "{refused}");
}

/// `[[route]]`: the first match picks the account; other mail goes to `default_account`.
#[tokio::test]
async fn routes_pick_the_account() {
    let idp = idp_issuing("tok").await;
    let mut upstream = FakeUpstream::start(&["tok"]).await;
    let more = format!(
        "[[account]]\nname = \"scan\"\nprovider = \"generic\"\nflow = \"client_credentials\"\nmailbox = \"scans@example.com\"\nclient_id = \"cid-123\"\nclient_secret_file = \"{{dir}}/secret\"\ntoken_url = \"{}/token\"\nscope = \"s\"\nsmtp_host = \"127.0.0.1\"\nsmtp_port = {}\nsmtp_tls = \"none\"\n[[route]]\nsender = \"*@scanner.lan\"\naccount = \"scan\"\n",
        idp.uri(),
        upstream.addr.port()
    );
    let mut relay = relay_with_account_and(&idp, &upstream, &more).await;
    let mut c = RawClient::ready(relay.addr()).await;
    c.cmd("MAIL FROM:<copier@Scanner.lan>", 250).await;
    c.cmd("RCPT TO:<ops@example.com>", 250).await;
    c.cmd("DATA", 354).await;
    c.send(b"Subject: scan\r\n\r\nscan\r\n.\r\n").await;
    c.expect(250).await;
    let got = upstream.next().await;
    assert!(
        got.auth.starts_with("user=scans@example.com\x01"),
        "routed: {:?}",
        got.auth
    );
    relay.attempts_done(1).await;
    send_message(relay.addr(), WIRE).await;
    let got = upstream.next().await;
    assert!(
        got.auth.starts_with("user=relay@example.com\x01"),
        "default: {:?}",
        got.auth
    );
    relay.attempts_done(2).await;
}

/// Three messages through an account held to one upstream connection (offering CHUNKING or not): each arrives
/// as it was sent, on that one connection, and the queue is left empty. Returns the upstream's commands.
async fn three_messages_on_one_connection(chunking: bool) -> Vec<String> {
    let idp = idp_issuing("tok-1").await;
    let mut upstream = FakeUpstream::start(&["tok-1"]).await;
    upstream
        .chunking
        .store(chunking, std::sync::atomic::Ordering::SeqCst);
    let mut relay = relay_with_account_and(&idp, &upstream, "max_connections = 1\n").await;
    for _ in 0..3 {
        send_message(relay.addr(), WIRE).await;
    }
    for _ in 0..3 {
        assert_eq!(strip_received(&upstream.next().await.data), BODY);
    }
    relay.attempts_done(3).await;
    relay.drained().await;
    assert!(relay.queued().is_empty());
    let log = upstream.commands.lock().unwrap().clone();
    assert_eq!(
        upstream
            .connections
            .load(std::sync::atomic::Ordering::SeqCst),
        1,
        "{log:?}"
    );
    log
}

/// Where each of the three transactions in `log` starts (its MAIL), once each MAIL and RCPT is seen to have had
/// the next command behind it in the same write (the fake upstream marks those " +").
fn pipelined_transactions(log: &[String]) -> Vec<usize> {
    let mails: Vec<usize> = (0..log.len())
        .filter(|&i| log[i].starts_with("MAIL FROM:"))
        .collect();
    assert_eq!(mails.len(), 3, "{log:?}");
    for &at in &mails {
        assert!(log[at].ends_with(" +"), "MAIL not pipelined: {log:?}");
        assert!(
            log[at + 1].starts_with("RCPT TO:") && log[at + 1].ends_with(" +"),
            "{log:?}"
        );
    }
    mails
}

/// Issue 11: several messages on one upstream connection, each with MAIL, RCPT and DATA in one write (RFC 2920),
/// and no NOOP before any of them.
#[tokio::test]
async fn one_connection_carries_several_messages_pipelined_without_noop() {
    let log = three_messages_on_one_connection(false).await;
    assert!(!log.iter().any(|c| c.starts_with("NOOP")), "{log:?}");
    for at in pipelined_transactions(&log) {
        assert_eq!(log[at + 2], "DATA", "{log:?}");
    }
}

/// Issue 11: against a server that offers CHUNKING (Microsoft 365 and Gmail do), each message is MAIL, RCPT and
/// `BDAT n LAST` with the message in one write (RFC 3030): one round trip a message, no 354 to wait for and no
/// dot-stuffing, and the message arrives byte for byte.
#[tokio::test]
async fn with_chunking_each_message_goes_in_one_write_with_bdat() {
    let log = three_messages_on_one_connection(true).await;
    assert!(
        !log.iter().any(|c| c == "DATA" || c.starts_with("NOOP")),
        "{log:?}"
    );
    for at in pipelined_transactions(&log) {
        // The message's bytes follow in the same write.
        assert!(
            log[at + 2].starts_with("BDAT ") && log[at + 2].ends_with(" LAST +"),
            "{log:?}"
        );
    }
}

/// Issue 11: a pooled connection the server dropped is found dead at the next message, which goes at once on a
/// fresh connection in the same attempt (a deferral would hold it for the retry schedule's first minute).
#[tokio::test]
async fn a_dead_pooled_connection_is_replaced_within_the_attempt() {
    let idp = idp_issuing("tok-1").await;
    let mut upstream = FakeUpstream::start(&["tok-1"]).await;
    *upstream.data_reply.lock().unwrap() = "HANGUP 250 2.0.0 OK".into();
    let mut relay = relay_with_account_and(&idp, &upstream, "max_connections = 1\n").await;
    send_message(relay.addr(), WIRE).await;
    upstream.next().await;
    relay.attempts_done(1).await;
    send_message(relay.addr(), WIRE).await;
    assert_eq!(strip_received(&upstream.next().await.data), BODY);
    relay.attempts_done(2).await;
    relay.drained().await;
    assert_eq!(
        upstream
            .connections
            .load(std::sync::atomic::Ordering::SeqCst),
        2
    );
    assert!(relay.queued().is_empty());
}

/// A pooled upstream connection idle past its time (a minute; a test hook shortens it here) is closed with QUIT
/// then, not when the next message comes (which opened fresh ones beside the old, the upstream counting both
/// against the mailbox for a moment). Through the binary.
#[tokio::test]
async fn an_idle_upstream_connection_is_closed_without_waiting_for_the_next_message() {
    let idp = idp_issuing("tok").await;
    let mut upstream = FakeUpstream::start(&["tok"]).await;
    let dir = tempfile::tempdir().unwrap();
    let config =
        common::idp::accounts_config(dir.path(), &idp.uri(), &[("office", &upstream)], "", "");
    let mut daemon = daemon_with_hook(&config, "RELAY_TEST_IDLE_MS", "300");
    send_message(daemon.addr, WIRE).await;
    upstream.next().await;
    daemon.wait_log("relay_event=\"delivered\"");
    let quit = || {
        upstream
            .commands
            .lock()
            .unwrap()
            .iter()
            .any(|c| c == "QUIT")
    };
    let deadline = std::time::Instant::now() + LIMIT;
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(50));
    while !quit() {
        assert!(
            std::time::Instant::now() < deadline,
            "no QUIT: {:?}",
            upstream.commands.lock().unwrap()
        );
        tick.tick().await;
    }
    assert!(daemon.terminate().success());
}

/// Mail kept in dead/ longer than `[queue] dead_max_age` (30 days by default) is removed, ten minutes after start
/// (a test hook shortens it here) and every hour after, and said in one line; younger dead mail stays. Without it
/// dead/ grew for ever. Through the binary.
#[tokio::test]
async fn dead_mail_past_dead_max_age_is_removed() {
    let idp = idp_issuing("tok").await;
    let upstream = FakeUpstream::start(&["tok"]).await;
    let dir = tempfile::tempdir().unwrap();
    let config =
        common::idp::accounts_config(dir.path(), &idp.uri(), &[("office", &upstream)], "", "");
    let dead = dir.path().join("state/dead");
    std::fs::create_dir_all(&dead).unwrap();
    let day = std::time::Duration::from_secs(86400);
    let now = std::time::SystemTime::now();
    let (old, young) = (
        "01a20a2d000070008000000000000001",
        "01a20a2d000070008000000000000002",
    );
    for (id, died) in [(old, now - 31 * day), (young, now - 29 * day)] {
        std::fs::write(dead.join(format!("{id}.msg")), "{}\nbody\r\n").unwrap();
        let state = dead.join(format!("{id}.state"));
        std::fs::write(&state, "{\"attempts\":1,\"last_error\":\"550 5.1.1 no\"}").unwrap();
        std::fs::File::options()
            .write(true)
            .open(&state)
            .unwrap()
            .set_modified(died)
            .unwrap();
    }
    let mut daemon = daemon_with_hook(&config, "RELAY_TEST_DEAD_SWEEP_MS", "0");
    let line = daemon.wait_log("relay_event=\"dead_removed\"");
    assert!(
        line.contains("count=1") && line.contains(old) && !line.contains(young),
        "{line}"
    );
    let mut left = files_in(&dir.path().join("state"), "dead");
    left.sort();
    assert_eq!(left, [format!("{young}.msg"), format!("{young}.state")]);
    assert!(daemon.terminate().success());
}

/// A stop that comes while the upstream has the whole message and has not answered (a slow scan): the drain runs
/// out (20 s; a test hook shortens it here), the message stays queued, and its id is said with the warning that
/// it may arrive twice (the line named no message before). Through the binary.
#[tokio::test]
async fn a_delivery_cut_short_by_a_stop_is_named_with_its_risk() {
    let idp = idp_issuing("tok").await;
    let mut upstream = FakeUpstream::start(&["tok"]).await;
    *upstream.data_reply.lock().unwrap() = "HOLD 250 2.0.0 OK".into();
    let dir = tempfile::tempdir().unwrap();
    let config =
        common::idp::accounts_config(dir.path(), &idp.uri(), &[("office", &upstream)], "", "");
    let daemon = daemon_with_hook(&config, "RELAY_TEST_DRAIN_MS", "300");
    let id = send_message(daemon.addr, WIRE).await;
    upstream.next().await;
    let log = daemon.terminate_with_log();
    let named = log
        .iter()
        .find(|l| l.contains("stopped in the middle of its delivery attempt"))
        .unwrap_or_else(|| panic!("{log:#?}"));
    assert!(
        named.contains(&format!("relay_queue_id={id}")) && named.contains("may arrive twice"),
        "{named}"
    );
    assert_eq!(
        files_in(&dir.path().join("state"), "queue"),
        [format!("{id}.msg")]
    );
}
