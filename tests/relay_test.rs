//! `relay test ACCOUNT --to ADDR` through the binary: the transcript with tokens redacted, the result, the
//! diagnosis of a failure, and what `relay status` remembers of it.

mod common;

use common::idp::{account_top, idp_issuing};
use common::upstream::FakeUpstream;
use common::*;

/// Runs `relay ARGS --config CONFIG` off the runtime (the fakes answer on it) and returns (exit code, stdout).
async fn relay(config: &std::path::Path, args: &[&str]) -> (i32, String) {
    let mut cmd = std::process::Command::new(relay_bin());
    cmd.args(args).arg("--config").arg(config);
    let out = tokio::time::timeout(
        LIMIT,
        tokio::task::spawn_blocking(move || cmd.output().unwrap()),
    )
    .await
    .expect("relay answers in time")
    .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_test_message_shows_the_transcript_and_is_remembered() {
    let idp = idp_issuing("tok-secret-1").await;
    let mut upstream = FakeUpstream::start(&["tok-secret-1"]).await;
    let dir = tempfile::tempdir().unwrap();
    let top = account_top(dir.path(), &idp.uri(), &upstream, "");
    let config = write_config_with(dir.path(), &top, "address = \"127.0.0.1:0\"\n");

    let (code, out) = relay(&config, &["test", "office", "--to", "ops@example.com"]).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("C: EHLO "), "{out}");
    assert!(out.contains("(smtp_tls = none)"), "{out}");
    assert!(
        out.contains("C: AUTH XOAUTH2 [credentials redacted]"),
        "{out}"
    );
    assert!(out.contains("S: 235 2.7.0 Accepted"), "{out}");
    assert!(out.contains("C: RCPT TO:<ops@example.com>"), "{out}");
    assert!(out.contains("delivered: 250"), "{out}");
    assert!(
        !out.contains("tok-secret-1"),
        "a token reached the output: {out}"
    );
    let got = upstream.next().await;
    assert_eq!(got.to, ["ops@example.com"]);
    assert!(String::from_utf8_lossy(&got.data).contains("Subject: relay test message from "));

    let (_, status) = relay(&config, &["status"]).await;
    assert!(status.contains("relay test: verified"), "{status}");

    // Microsoft's tenant-wide refusal: the test fails, says so, and status remembers it.
    upstream.tokens.lock().unwrap().push(
        "REFUSE 535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant."
            .into(),
    );
    let (code, out) = relay(&config, &["test", "office", "--to", "ops@example.com"]).await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("failed: 535 5.7.139"), "{out}");
    assert!(out.contains("diagnosis: "), "{out}");
    let (_, status) = relay(&config, &["status", "--json"]).await;
    let doc: serde_json::Value = serde_json::from_str(status.lines().next().unwrap()).unwrap();
    assert_eq!(doc["accounts"][0]["test"]["result"], "failing", "{doc}");

    let (code, out) = relay(&config, &["test", "nosuch", "--to", "ops@example.com"]).await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("no account named `nosuch`"), "{out}");
}

/// The upstream deferred a message and the daemon stopped; the sysadmin fixes the upstream and runs `relay test`:
/// it goes through, so status no longer says `failing` for the old deferral (before: until the next message, for
/// ever on a quiet relay), and the deferred message is due now, not at its next retry step an hour away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_test_that_goes_through_clears_failing_and_makes_waiting_mail_due() {
    let common::idp::OneDeferred {
        idp: _idp,
        mut upstream,
        dir,
        config,
        id,
    } = common::idp::one_deferred_message().await;
    let (_, doc) = status_json(&config);
    assert_eq!(doc["accounts"][0]["state"], "failing", "{doc}");

    // Another account's pause (a used-up quota) is not the tester's to end.
    let other_pause = dir.path().join("state/rate/other.pause");
    std::fs::create_dir_all(other_pause.parent().unwrap()).unwrap();
    std::fs::write(&other_pause, "{}").unwrap();
    *upstream.data_reply.lock().unwrap() = "250 2.0.0 OK".into();
    let (code, out) = relay(&config, &["test", "office", "--to", "ops@example.com"]).await;
    assert!(
        other_pause.exists(),
        "another account's pause ended by a test"
    );
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("1 queued message(s) made due now"), "{out}");
    upstream.next().await;
    let (_, doc) = status_json(&config);
    assert_eq!(doc["accounts"][0]["state"], "ok", "{doc}");

    // Due now: the daemon started again sends it at once, not an hour after its deferral.
    let mut d = Daemon::spawn(&config);
    let line = d.wait_log("relay_event=\"delivered\"");
    assert!(line.contains(&id), "{line}");
    assert!(strip_received(&upstream.next().await.data).ends_with(b"hi\r\n"));
    assert_eq!(d.terminate().code(), Some(0));
}

/// Where a fake upstream gives its refusal.
enum Refusal {
    /// Answering AUTH XOAUTH2.
    Auth(&'static str),
    /// Answering the end of the data.
    Data(&'static str),
    /// The token endpoint's error and description (HTTP status, error, error_description).
    Token(u16, &'static str, &'static str),
}

/// Every code issue 10 lists, answered by a fake as Microsoft and Google answer it: `relay test` prints the
/// matching diagnosis (its code in parentheses) and exits 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_listed_failure_gets_its_diagnosis() {
    use Refusal::*;
    let cases: &[(Refusal, &str)] = &[
        (
            Auth(
                "535 5.7.3 Authentication unsuccessful [SN4PR0501CA0036.namprd05.prod.outlook.com]",
            ),
            "535 5.7.3",
        ),
        (
            Auth(
                "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant. Visit https://aka.ms/smtp_auth_disabled for more information. [MN2PR11CA0012.namprd11.prod.outlook.com]",
            ),
            "535 5.7.139",
        ),
        (
            Auth("550 5.7.30 Basic authentication is not supported for Client Submission."),
            "550 5.7.30",
        ),
        (
            Data(
                "554 5.2.252 SendAsDenied; relay@example.com not allowed to send as scanner@lan.test; STOREDRV.Submission.Exception:SendAsDeniedException.MapiExceptionSendAsDenied",
            ),
            "554 5.2.252 SendAsDenied",
        ),
        (
            Data(
                "550 5.7.60 SMTP; Client does not have permissions to send as this sender [AM6PR0202MB3381.eurprd02.prod.outlook.com]",
            ),
            "550 5.7.60",
        ),
        (
            Data(
                "550 5.7.708 Service unavailable. Access denied, traffic not accepted from this IP. AS(7208)",
            ),
            "550 5.7.708",
        ),
        (
            Auth("501 5.5.127 Invalid XOAUTH2 auth data [AM0PR10CA0027.EURPRD10.PROD.OUTLOOK.COM]"),
            "501 5.5.127",
        ),
        (
            Data(
                "432 4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded [Hostname=AM0PR10MB2003.EURPRD10.PROD.OUTLOOK.COM]",
            ),
            "432 4.3.2",
        ),
        (
            Auth(
                "432 4.3.2 Concurrent connections limit exceeded. Visit https://aka.ms/concurrent_sending for more information. [Hostname=BY5PR04MB6993.namprd04.prod.outlook.com]",
            ),
            "432 4.3.2",
        ),
        (
            Auth(
                "535-5.7.8 Username and Password not accepted. For more information, go to\r\n535 5.7.8  https://support.google.com/mail/?p=BadCredentials - gsmtp",
            ),
            "535 5.7.8",
        ),
        (
            Auth(
                "534-5.7.9 Application-specific password required. Learn more at\r\n534 5.7.9  https://support.google.com/mail/?p=InvalidSecondFactor - gsmtp",
            ),
            "534 5.7.9",
        ),
        (
            Token(
                400,
                "invalid_grant",
                "AADSTS50076: Due to a configuration change made by your administrator, or because you moved to a new location, you must use multi-factor authentication to access '00000002-0000-0ff1-ce00-000000000000'.",
            ),
            "AADSTS50076",
        ),
        (
            Token(
                400,
                "invalid_grant",
                "AADSTS50079: Due to a configuration change made by your administrator, or because you moved to a new location, you must enroll in multi-factor authentication to access '00000002-0000-0ff1-ce00-000000000000'.",
            ),
            "AADSTS50079",
        ),
        (
            Token(
                400,
                "invalid_grant",
                "AADSTS50126: Error validating credentials due to invalid username or password.",
            ),
            "AADSTS50126",
        ),
        (
            Token(
                400,
                "invalid_grant",
                "AADSTS50034: The user account {EUII Hidden} does not exist in the contoso.onmicrosoft.com directory.",
            ),
            "AADSTS50034",
        ),
        (
            Token(
                400,
                "invalid_grant",
                "AADSTS65001: The user or administrator has not consented to use the application with ID '3f2a' named 'relay'.",
            ),
            "AADSTS65001",
        ),
        (
            Token(
                400,
                "unauthorized_client",
                "AADSTS700016: Application with identifier '3f2a' was not found in the directory 'Contoso'.",
            ),
            "AADSTS700016",
        ),
        (
            Token(
                401,
                "invalid_client",
                "AADSTS7000215: Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID.",
            ),
            "AADSTS7000215",
        ),
        (
            Token(
                401,
                "invalid_client",
                "AADSTS7000222: The provided client secret keys for app '3f2a' are expired.",
            ),
            "AADSTS7000222",
        ),
        (
            Token(
                400,
                "invalid_grant",
                "AADSTS700082: The refresh token has expired due to inactivity. The token was issued on 2024-01-01T10:00:00.0000000Z and was inactive for 90.00:00:00.",
            ),
            // The account uses client credentials: it has no refresh token, so its credentials are blamed (the
            // table's AADSTS700082 row, for a person's grant, is checked in `upstream::diagnosis`).
            "invalid_grant",
        ),
        (
            Token(
                400,
                "invalid_grant",
                "AADSTS70043: The refresh token has expired or is invalid due to sign-in frequency checks by conditional access.",
            ),
            "AADSTS70043",
        ),
        (
            Token(
                400,
                "invalid_request",
                "AADSTS90002: Tenant 'contoso.onmicrosoft.co' not found. Check to make sure you have the correct tenant ID and are signing into the correct cloud.",
            ),
            "AADSTS90002",
        ),
        (
            Token(400, "invalid_grant", "Token has been expired or revoked."),
            "invalid_grant",
        ),
        // (Google's service-account refusals fit only a Google account: `upstream::diagnosis`'s tests.)
    ];
    for (refusal, code) in cases {
        let idp = wiremock::MockServer::start().await;
        let token_reply = match refusal {
            Token(status, error, description) => wiremock::ResponseTemplate::new(*status)
                .set_body_json(
                    serde_json::json!({"error": error, "error_description": description}),
                ),
            _ => common::idp::token("tok-1"),
        };
        wiremock::Mock::given(wiremock::matchers::path("/token"))
            .respond_with(token_reply)
            .mount(&idp)
            .await;
        let upstream = FakeUpstream::start(&["tok-1"]).await;
        match refusal {
            Auth(reply) => upstream
                .tokens
                .lock()
                .unwrap()
                .push(format!("REFUSE {reply}")),
            Data(reply) => *upstream.data_reply.lock().unwrap() = reply.to_string(),
            Token(..) => {}
        }
        let diagnosis = failed_test_diagnosis(&idp, &upstream).await;
        assert!(
            diagnosis.contains(&format!("({code})")),
            "{code}: {diagnosis}"
        );
    }
}

/// A `generic` account's own server words its refusals as Exchange Online or Gmail do, meaning its own things:
/// no advice about Microsoft's admin center or Google's scopes (the probe's on-premises 535 5.7.3 got both).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generic_servers_refusal_gets_no_microsoft_or_google_advice() {
    let idp = idp_issuing("tok-1").await;
    for (reply, says) in [
        (
            "535 5.7.3 Authentication unsuccessful",
            "relay has no advice",
        ),
        ("535 5.7.8 Error: authentication failed", "(535 5.7.8)"),
    ] {
        let upstream = FakeUpstream::start(&[&format!("REFUSE {reply}")]).await;
        let diagnosis = failed_test_diagnosis(&idp, &upstream).await;
        assert!(diagnosis.contains(says), "{reply}: {diagnosis}");
        for other in ["Exchange", "Microsoft 365", "Gmail", "mail.google.com"] {
            assert!(!diagnosis.contains(other), "{reply}: {diagnosis}");
        }
    }
}

/// `relay test office --to TO` through an account pointed at the fakes: (exit code, output).
async fn test_office(
    idp: &wiremock::MockServer,
    upstream: &FakeUpstream,
    to: &str,
) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let top = account_top(dir.path(), &idp.uri(), upstream, "");
    let config = write_config_with(dir.path(), &top, "address = \"127.0.0.1:0\"\n");
    relay(&config, &["test", "office", "--to", to]).await
}

/// `relay test office` through an account pointed at the fakes: it fails (exit 1), and its diagnosis line.
async fn failed_test_diagnosis(idp: &wiremock::MockServer, upstream: &FakeUpstream) -> String {
    let (exit, out) = test_office(idp, upstream, "ops@example.com").await;
    assert_eq!(exit, 1, "{out}");
    out.lines()
        .find(|l| l.starts_with("diagnosis: "))
        .unwrap_or_else(|| panic!("no diagnosis line in {out}"))
        .to_string()
}

/// An upstream port where nothing listens: the test says so, with what to check, not that relay does not know
/// the upstream's words (there were none).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_refuses_the_connection_is_diagnosed() {
    let idp = idp_issuing("tok-1").await;
    let upstream = FakeUpstream::start(&["tok-1"]).await;
    let dir = tempfile::tempdir().unwrap();
    let closed = free_port();
    let top = account_top(dir.path(), &idp.uri(), &upstream, "").replace(
        &format!("smtp_port = {}", upstream.addr.port()),
        &format!("smtp_port = {closed}"),
    );
    let config = write_config_with(dir.path(), &top, "address = \"127.0.0.1:0\"\n");
    let (exit, out) = relay(&config, &["test", "office", "--to", "ops@example.com"]).await;
    assert_eq!(exit, 1, "{out}");
    let diagnosis = out
        .lines()
        .find(|l| l.starts_with("diagnosis: "))
        .unwrap_or_else(|| panic!("no diagnosis line in {out}"));
    assert!(
        diagnosis.contains("(connection refused)") && diagnosis.contains("smtp_port"),
        "{diagnosis}"
    );
}

/// A TLS mode the upstream's port does not speak is diagnosed, both ways: implicit TLS to a port that greets in
/// plain text (587) is told to use STARTTLS (it was "relay has no advice"), and STARTTLS to a port (not 25 or 587)
/// that takes the connection and says nothing, as an SMTPS port (465) waiting for a TLS hello does, is told of
/// implicit TLS (it read only as an upstream that cannot be reached). `relay check` warns of either pair with 465, 587 or 25.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_mode_the_upstreams_port_does_not_speak_is_diagnosed() {
    let idp = idp_issuing("tok-1").await;
    let upstream = FakeUpstream::start(&["tok-1"]).await;
    let dir = tempfile::tempdir().unwrap();
    let top = account_top(dir.path(), &idp.uri(), &upstream, "")
        .replace("smtp_tls = \"none\"", "smtp_tls = \"implicit\"");
    let config = write_config_with(dir.path(), &top, "address = \"127.0.0.1:0\"\n");
    let (exit, out) = relay(&config, &["test", "office", "--to", "ops@example.com"]).await;
    assert_eq!(exit, 1, "{out}");
    assert!(
        out.contains("diagnosis: ")
            && out.contains("(TLS InvalidContentType)")
            && out.contains("set smtp_tls = \"starttls\" with this port"),
        "{out}"
    );

    // Taken by the kernel, never answered: what an SMTPS server does until it hears a TLS hello.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let top = account_top(dir.path(), &idp.uri(), &upstream, "smtp_timeout = \"1s\"")
        .replace(
            &format!("smtp_port = {}", upstream.addr.port()),
            &format!("smtp_port = {}", silent.local_addr().unwrap().port()),
        )
        .replace("smtp_tls = \"none\"", "smtp_tls = \"starttls\"");
    let config = write_config_with(dir.path(), &top, "address = \"127.0.0.1:0\"\n");
    let (exit, out) = relay(&config, &["test", "office", "--to", "ops@example.com"]).await;
    assert_eq!(exit, 1, "{out}");
    assert!(
        out.contains(
            "did not answer within 1s (smtp_timeout): it took the connection but sent no greeting"
        ) && out.contains("(no greeting)")
            && out.contains("(465), set smtp_tls = \"implicit\" for office"),
        "{out}"
    );

    for (port, tls, says) in [
        (465, "starttls", "set smtp_tls = \"implicit\""),
        (587, "implicit", "set smtp_tls = \"starttls\""),
    ] {
        let top = account_top(dir.path(), &idp.uri(), &upstream, "")
            .replace(
                &format!("smtp_port = {}", upstream.addr.port()),
                &format!("smtp_port = {port}"),
            )
            .replace("smtp_tls = \"none\"", &format!("smtp_tls = \"{tls}\""));
        let config = write_config_with(dir.path(), &top, "address = \"127.0.0.1:0\"\n");
        let (exit, out) = relay(&config, &["check"]).await;
        assert_eq!(exit, 0, "{out}");
        assert!(
            out.contains("account office.smtp_tls") && out.contains(says),
            "{port} {tls}: {out}"
        );
    }
}

/// A generic provider's server refusing the login with RFC 4954's code: the diagnosis speaks of the server and
/// the account's settings, not of Gmail (whose replies carry the same code).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_servers_login_refusal_is_not_diagnosed_as_gmails() {
    let idp = idp_issuing("tok-1").await;
    let upstream = FakeUpstream::start(&["tok-1"]).await;
    upstream
        .tokens
        .lock()
        .unwrap()
        .push("REFUSE 535 5.7.8 Error: authentication failed: authentication failure".into());
    let diagnosis = failed_test_diagnosis(&idp, &upstream).await;
    assert!(diagnosis.contains("(535 5.7.8)"), "{diagnosis}");
    assert!(!diagnosis.contains("Gmail"), "{diagnosis}");
    assert!(diagnosis.contains("relay authorize office"), "{diagnosis}");
}

/// A server that quotes the AUTH command back in its refusal: neither the token nor the encoded credentials
/// reach the transcript, the result or the diagnosis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_quoting_the_credentials_back_shows_neither() {
    let encoded = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD
            .encode("user=relay@example.com\x01auth=Bearer tok-quoted-1\x01\x01")
    };
    // Whole on one line, or split over the two lines of a multi-line reply.
    for (refusal, shown) in [
        (
            "500 5.5.1 Unrecognized command: {COMMAND}",
            "S: 500 5.5.1 Unrecognized command: AUTH XOAUTH2 [redacted]",
        ),
        (
            "535-5.7.8 {HEAD}\r\n535 5.7.8 {TAIL}",
            "S: 535 5.7.8 [redacted]",
        ),
    ] {
        let idp = idp_issuing("tok-quoted-1").await;
        let upstream = FakeUpstream::start(&["tok-quoted-1"]).await;
        upstream
            .tokens
            .lock()
            .unwrap()
            .push(format!("REFUSE {refusal}"));
        let (exit, out) = test_office(&idp, &upstream, "ops@example.com").await;
        assert_eq!(exit, 1, "{out}");
        assert!(out.contains(shown), "{out}");
        assert!(
            !out.contains("tok-quoted-1"),
            "the token reached the output: {out}"
        );
        for piece in [
            &encoded[..],
            &encoded[..encoded.len() / 2],
            &encoded[encoded.len() / 2..],
        ] {
            assert!(
                !out.contains(piece),
                "the credentials reached the output: {out}"
            );
        }
    }
}

/// A test message to an internationalized domain through an upstream without SMTPUTF8: the domain goes as IDNA
/// (A-labels), as the daemon sends it, rather than the test failing where delivery would not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_test_to_an_idn_domain_goes_as_idna_where_the_upstream_lacks_smtputf8() {
    let idp = idp_issuing("tok").await;
    let mut upstream = FakeUpstream::start(&["tok"]).await;
    upstream
        .smtputf8
        .store(false, std::sync::atomic::Ordering::SeqCst);
    let (exit, out) = test_office(&idp, &upstream, "ops@bücher.example").await;
    assert_eq!(exit, 0, "{out}");
    let got = upstream.next().await;
    assert_eq!(got.to, ["ops@xn--bcher-kva.example"]);
}

/// An upstream that offers CHUNKING but does not know BDAT: `relay test` sends again through DATA, as the daemon
/// does, says so in the transcript, and reports the delivery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_test_through_an_upstream_without_bdat_goes_through_data() {
    let idp = idp_issuing("tok").await;
    let mut upstream = FakeUpstream::start(&["tok"]).await;
    upstream.without_bdat();
    let (code, out) = test_office(&idp, &upstream, "ops@example.com").await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("sending again with DATA"), "{out}");
    assert!(out.contains("C: DATA"), "{out}");
    assert!(out.contains("delivered: 250"), "{out}");
    let got = upstream.next().await;
    assert_eq!(got.to, ["ops@example.com"]);
}

/// `relay test` renewing an account's grant while the daemon wants to renew it too: one renewal, not two. Two
/// renewals of one grant at once present the same refresh token twice; a provider that rotates strictly takes
/// the first and refuses the second (and may revoke the grant). The daemon waits for `relay test`'s renewal and
/// takes the token it saved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewal_in_another_process_is_waited_for_not_repeated() {
    let mut endpoint = common::idp::RotatingEndpoint::start("R1").await;
    let mut upstream = FakeUpstream::start(&["A1"]).await;
    let dir = tempfile::tempdir().unwrap();
    let top = common::idp::device_code_top(dir.path(), &endpoint.url, &upstream, "");
    let metrics = free_port();
    let config = write_config_with(
        dir.path(),
        &format!("{top}\n[metrics]\naddress = \"127.0.0.1:{metrics}\"\n"),
        "address = \"127.0.0.1:0\"\nauth = \"none\"\n",
    );
    // Inside the renewal window: both processes renew at once.
    common::idp::write_tokens_due(&dir.path().join("state"), "office", "R1");

    // `relay test` renews first; its request is held at the endpoint.
    let mut test = std::process::Command::new(relay_bin());
    test.args(["test", "office", "--to", "ops@example.com", "--config"])
        .arg(&config);
    let test = tokio::task::spawn_blocking(move || run_bounded(&mut test));
    assert_eq!(endpoint.next_ask().await, "R1");

    // The daemon's refresher finds the token due and waits for the renewal in flight.
    let config_for_daemon = config.clone();
    let mut daemon = tokio::task::spawn_blocking(move || {
        let mut daemon = Daemon::spawn(&config_for_daemon);
        daemon.wait_log("is renewing this account's token; waiting for it");
        daemon
    })
    .await
    .unwrap();
    endpoint.release.take().unwrap().send(()).unwrap();

    let out = test.await.unwrap();
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{printed}");
    assert!(printed.contains("delivered: 250"), "{printed}");
    upstream.next().await;
    let daemon = tokio::task::spawn_blocking(move || {
        daemon.wait_log("the token was renewed meanwhile, by another relay process");
        daemon
    })
    .await
    .unwrap();
    assert!(
        endpoint.asked.try_recv().is_err(),
        "the grant was renewed a second time"
    );
    let saved = relay::tokens::TokenStore::new(&dir.path().join("state"))
        .load("office")
        .unwrap()
        .unwrap();
    assert!(saved.last_error.is_none(), "{:?}", saved.last_error);
    assert_eq!(
        saved
            .refresh_token
            .map(|r| secrecy::ExposeSecret::expose_secret(&r).to_string()),
        Some("R2".to_string())
    );
    // Counted as the account's renewal (an open refresh-failure alert closes on it too).
    let scraped = {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", metrics))
            .await
            .unwrap();
        conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut text = String::new();
        tokio::time::timeout(LIMIT, conn.read_to_string(&mut text))
            .await
            .expect("metrics in time")
            .unwrap();
        text
    };
    assert!(
        scraped.contains("relay_token_refreshes_total{account=\"office\"} 1\n"),
        "{scraped}"
    );
    // The daemon delivers with the token `relay test` obtained.
    send_message(daemon.addr, b"Subject: after\r\n\r\nbody\r\n").await;
    let got = upstream.next().await;
    assert!(String::from_utf8_lossy(&got.data).contains("Subject: after"));
    assert!(endpoint.asked.try_recv().is_err());
}

/// A server that answers DATA with 354 although it refused every recipient (as some do after pipelined
/// commands): the test, as a delivery does, closes the connection without a word. It sent QUIT, which such a
/// server reads as a line of the message, and waited for an answer that could not come.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_354_after_every_recipient_refused_gets_no_quit() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = tokio::spawn(async move {
        let (sock, _) = listener.accept().await.unwrap();
        let (read, mut write) = sock.into_split();
        let mut lines = BufReader::new(read).lines();
        write.write_all(b"220 odd.test ESMTP\r\n").await.unwrap();
        let mut after_354 = Vec::new();
        let mut in_data = false;
        // Ends when relay closes the connection (bounded by the test's limit).
        while let Ok(Ok(Some(line))) = tokio::time::timeout(LIMIT, lines.next_line()).await {
            if in_data {
                after_354.push(line);
                continue;
            }
            let verb = line.split(' ').next().unwrap_or("").to_ascii_uppercase();
            let reply: &[u8] = match verb.as_str() {
                "EHLO" => b"250-odd.test\r\n250-PIPELINING\r\n250 AUTH XOAUTH2\r\n",
                "AUTH" => b"235 2.7.0 Accepted\r\n",
                "MAIL" => b"250 2.1.0 OK\r\n",
                "RCPT" => b"550 5.1.1 no such user\r\n",
                "DATA" => {
                    in_data = true;
                    b"354 go ahead\r\n"
                }
                _ => b"250 OK\r\n",
            };
            write.write_all(reply).await.unwrap();
        }
        after_354
    });
    let idp = idp_issuing("tok").await;
    let dir = tempfile::tempdir().unwrap();
    common::idp::write_secret(dir.path());
    let top = format!(
        "default_account = \"office\"\n{}",
        common::idp::generic_account_at("office", &idp.uri(), port, "client_credentials")
    );
    let config = write_config_with(dir.path(), &top, "address = \"127.0.0.1:0\"\n");
    let (code, out) = relay(&config, &["test", "office", "--to", "ops@example.com"]).await;
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("550 5.1.1"), "{out}");
    let after = server.await.unwrap();
    assert!(after.is_empty(), "sent after the 354: {after:?}");
}

/// While the running daemon holds a renewed grant it could not save (`accounts/NAME.unsaved` names its pid), a
/// test does not renew the older grant in the token file: with a provider that rotates refresh tokens, that use
/// would fail (and was said as a revoked grant) or revoke the daemon's grant too. It says why instead, and asks the
/// token endpoint nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_test_leaves_a_grant_the_daemon_holds_unsaved_alone() {
    let idp = idp_issuing("tok").await;
    let upstream = FakeUpstream::start(&["tok"]).await;
    let dir = tempfile::tempdir().unwrap();
    let top = account_top(dir.path(), &idp.uri(), &upstream, "");
    let config = write_config_with(dir.path(), &top, "address = \"127.0.0.1:0\"\n");
    let state = dir.path().join("state");
    common::idp::write_tokens_due(&state, "office", "r-old");
    // This test's own process stands for the daemon: a pid that runs, holding the state dir's lock.
    let lock = std::fs::File::create(state.join(".lock")).unwrap();
    // SAFETY: flock on a descriptor this test owns, open for the rest of the test.
    assert_eq!(
        unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) },
        0
    );
    std::fs::create_dir_all(state.join("accounts")).unwrap();
    std::fs::write(
        state.join("accounts/office.unsaved"),
        format!(
            "{{\"since\": \"{}\", \"why\": \"Permission denied\", \"pid\": {}}}",
            humantime::format_rfc3339_seconds(std::time::SystemTime::now()),
            std::process::id()
        ),
    )
    .unwrap();
    let (code, out) = relay(&config, &["test", "office", "--to", "ops@example.com"]).await;
    assert_ne!(code, 0, "{out}");
    assert!(
        out.contains("holds a renewed grant for it in memory"),
        "{out}"
    );
    assert!(idp.received_requests().await.unwrap().is_empty());
}
