//! The session state machine without sockets: every reply code the issue names, and the odd inputs.

use secrecy::ExposeSecret;

use super::*;

fn policy(auth: AuthPolicy, plaintext_auth: bool, starttls: bool) -> Arc<Policy> {
    Arc::new(Policy {
        hostname: "relay.test".into(),
        listener: "127.0.0.1:2525".into(),
        auth,
        plaintext_auth,
        starttls,
        bare_lf: BareLineEndings::Reject,
        max_message_size: 1000,
        max_recipients: 2,
        postmaster: Some("admin@example.com".into()),
    })
}

fn session(auth: AuthPolicy) -> Session {
    Session::new(
        policy(auth, true, true),
        "192.0.2.7:40000".parse().unwrap(),
        false,
    )
}

/// A session on `policy`, from the same client address as [`session`].
fn session_on(policy: Arc<Policy>) -> Session {
    Session::new(policy, "192.0.2.7:1".parse().unwrap(), false)
}

/// A listener that offers neither AUTH nor STARTTLS.
fn plain_session() -> Session {
    session_on(policy(AuthPolicy::None, false, false))
}

/// A listener with no `postmaster` address configured.
fn session_without_postmaster() -> Session {
    let mut unset = (*policy(AuthPolicy::None, true, false)).clone();
    unset.postmaster = None;
    session_on(Arc::new(unset))
}

/// A session past its `EHLO x`, whose reply is dropped.
fn greeted(auth: AuthPolicy) -> Session {
    let mut s = session(auth);
    steps(&mut s, b"EHLO x\r\n");
    s
}

/// Feeds `input` and collects every step until the session wants more input.
fn steps(s: &mut Session, input: &[u8]) -> Vec<Step> {
    let mut input = input;
    let mut out = Vec::new();
    loop {
        match s.next(&mut input) {
            Step::NeedInput => return out,
            // The queue has room (the connection code asks the spool).
            Step::Room(_) => out.push(Step::Reply(s.room_checked(Admission::Admitted))),
            step => {
                let stop = matches!(step, Step::Data(_) | Step::StartTls(_) | Step::Close(_));
                out.push(step);
                if stop {
                    return out;
                }
            }
        }
    }
}

/// The reply codes with enhanced status, e.g. "250 2.1.0".
fn codes(steps: &[Step]) -> Vec<String> {
    steps
        .iter()
        .map(|s| match s {
            Step::Reply(r) | Step::Data(r) | Step::StartTls(r) | Step::Close(r) => {
                format!("{} {}", r.code, r.status.unwrap_or("-"))
            }
            Step::Authenticate(c) => format!("auth {} {}", c.mechanism, c.username),
            Step::Room(size) => format!("room {size}"),
            Step::NeedInput => "need".into(),
        })
        .collect()
}

fn reply_text(step: &Step) -> String {
    match step {
        Step::Reply(r) | Step::Data(r) | Step::StartTls(r) | Step::Close(r) => r.to_string(),
        other => format!("{other:?}"),
    }
}

fn b64(s: &[u8]) -> String {
    BASE64.encode(s)
}

/// The reply codes to `input`, as [`codes`] writes them.
fn replies(s: &mut Session, input: &[u8]) -> Vec<String> {
    codes(&steps(s, input))
}

/// The envelope of the transaction so far, which must have a sender and a recipient.
fn envelope(s: &Session) -> Envelope {
    s.envelope(QueueId::new(), SystemTime::UNIX_EPOCH).unwrap()
}

/// Ends an open DATA with a one-line body and stores it, as the connection does.
fn store_a_one_line_message(s: &mut Session) {
    let (mut input, mut body) = (&b"x\r\n.\r\n"[..], Vec::new());
    assert_eq!(s.feed_data(&mut input, &mut body), Progress::Done);
    assert_eq!(s.data_stored(Ok(QueueId::new())).code, 250);
}

#[test]
fn ehlo_lists_extensions() {
    let mut s = session(AuthPolicy::Required);
    let out = steps(&mut s, b"EHLO printer\r\n");
    let text = reply_text(&out[0]);
    for ext in [
        "PIPELINING",
        "SIZE 1000",
        "8BITMIME",
        "ENHANCEDSTATUSCODES",
        "SMTPUTF8",
        "STARTTLS",
        "AUTH PLAIN LOGIN",
    ] {
        assert!(text.contains(ext), "{ext} missing from {text}");
    }
    assert!(text.starts_with("250-relay.test Hello printer\r\n"));
}

/// RFC 5321 section 4.5.1: `<postmaster>` (no domain, any case, quoted or with the spaces smtp-proto allows) is
/// taken, for the configured address; `postmaster@` a domain is an address like any other (relay's hostname may
/// be the organisation's own domain, whose postmaster is a real mailbox upstream); the null path stays refused.
#[test]
fn postmaster_is_taken_for_the_configured_address() {
    let mut s = session(AuthPolicy::None);
    assert_eq!(
        replies(
            &mut s,
            b"EHLO x\r\nMAIL FROM:<a@b>\r\nRCPT TO:<PostMaster>\r\nRCPT  TO : <\"postmaster\"> NOTIFY=NEVER\r\nrcpt to:<POSTMASTER>\r\nRCPT TO:<>\r\nRCPT TO:<postmaster@relay.test>\r\n"
        )[1..],
        [
            "250 2.1.0",
            "250 2.1.5",
            "250 2.1.5",
            "250 2.1.5",
            "501 5.1.3",
            "250 2.1.5"
        ]
    );
    let env = envelope(&s);
    assert_eq!(
        env.recipients,
        ["admin@example.com", "postmaster@relay.test"]
    );

    let mut s = session_without_postmaster();
    assert_eq!(
        replies(
            &mut s,
            b"EHLO x\r\nRCPT TO:<postmaster>\r\nMAIL FROM:<a@b>\r\nRCPT TO:<postmaster>\r\nRCPT TO:<postmaster@relay.test>\r\n"
        )[1..],
        ["503 5.5.1", "250 2.1.0", "550 5.1.1", "250 2.1.5"]
    );
}

/// A domainless postmaster is a recipient only (RFC 5321 section 4.1.1.3): as a sender it is refused like any
/// address without a domain, not taken for the null sender (which made the message look like a bounce).
#[test]
fn postmaster_is_not_a_sender() {
    let mut s = session(AuthPolicy::None);
    assert_eq!(
        replies(
            &mut s,
            b"EHLO x\r\nMAIL FROM:<postmaster>\r\nMAIL FROM:<\"PostMaster\">\r\nMAIL FROM:<postmaster@relay.test>\r\n"
        )[1..],
        ["501 5.1.7", "501 5.1.7", "250 2.1.0"]
    );
    // Checked where any sender is: after the session's own checks, and logged by name.
    let mut s = session(AuthPolicy::None);
    assert_eq!(
        replies(&mut s, b"MAIL FROM:<postmaster>\r\n"),
        ["503 5.5.1"]
    );
    steps(&mut s, b"EHLO x\r\nMAIL FROM:<postmaster>\r\n");
    assert_eq!(
        s.last_mail_command().map(|c| (c.0, c.1.to_string())),
        Some(("MAIL", "postmaster".to_string()))
    );
    let mut s = session(AuthPolicy::None);
    assert_eq!(
        replies(&mut s, b"EHLO x\r\nMAIL FROM:<>\r\n")[1..],
        ["250 2.1.0"],
        "the null sender is still one"
    );
}

/// MAIL parameters of extensions relay does not offer are refused (RFC 5321 section 4.1.1.11), not taken and
/// dropped: REQUIRETLS asks for TLS all the way, HOLDUNTIL for a later delivery, BY for a deadline. The DSN ones,
/// which devices send regardless, still pass.
#[test]
fn parameters_of_extensions_not_offered_are_refused() {
    for params in [
        "REQUIRETLS",
        "HOLDUNTIL=2030-01-01T00:00:00Z",
        "HOLDFOR=100",
        "BY=120;R",
        "MT-PRIORITY=3",
        "CONPERM",
        "TRANSID=<a@b>",
        "SOLICIT=x",
    ] {
        let mut s = session(AuthPolicy::None);
        let line = format!("EHLO x\r\nMAIL FROM:<a@b.example> {params}\r\n");
        let out = replies(&mut s, line.as_bytes());
        assert_eq!(out[1..], ["555 5.5.4"], "{params}");
    }
    let mut s = session(AuthPolicy::None);
    assert_eq!(
        replies(
            &mut s,
            b"EHLO x\r\nMAIL FROM:<a@b.example> SIZE=10 BODY=8BITMIME RET=HDRS ENVID=x1 SMTPUTF8\r\n"
        )[1..],
        ["250 2.1.0"]
    );
}

/// A refused `<postmaster>` is logged as that, not as the empty path smtp-proto reads it as.
#[test]
fn a_refused_postmaster_is_logged_by_name() {
    let mut s = session_without_postmaster();
    assert_eq!(
        replies(
            &mut s,
            b"EHLO x\r\nMAIL FROM:<a@b>\r\nRCPT TO:<Postmaster>\r\n"
        )[2..],
        ["550 5.1.1"]
    );
    assert_eq!(
        s.last_mail_command(),
        Some(("RCPT", "postmaster", Some("a@b")))
    );
}

/// The HELO/EHLO name is echoed in the greeting, but a control character in it (a NUL, an ESC) is sent back
/// escaped, never raw.
#[test]
fn the_hello_echo_escapes_control_characters() {
    for verb in ["EHLO", "HELO"] {
        let mut s = session(AuthPolicy::None);
        let out = steps(&mut s, format!("{verb} a\x00b\x1b[2J\r\n").as_bytes());
        let text = reply_text(&out[0]);
        let first = text.lines().next().unwrap_or_default();
        assert!(first.starts_with("250"), "{text:?}");
        assert!(first.contains("Hello a\\x00b\\x1b[2J"), "{text:?}");
        let mut s = session(AuthPolicy::None);
        let out = steps(&mut s, format!("{verb} h\u{e9}te\r\n").as_bytes());
        let text = reply_text(&out[0]);
        assert!(text.is_ascii() && text.contains("Hello h?te"), "{text:?}");
        assert!(
            !text.bytes().any(|b| b < 0x20 && b != b'\r' && b != b'\n'),
            "{text:?}"
        );
    }
}

/// Address literals (RFC 5321 section 4.1.3), as devices without a DNS name of their own write their sender; a
/// literal that is not an IP address is still a syntax error.
#[test]
fn address_literals_are_taken() {
    let mut s = session(AuthPolicy::None);
    assert_eq!(
        replies(
            &mut s,
            b"EHLO [192.0.2.7]\r\nMAIL FROM:<scan@[192.0.2.7]> SIZE=10\r\nRCPT TO:<ops@[IPv6:2001:db8::1]>\r\nRCPT TO:<x@[not-an-ip]>\r\nRCPT TO:<y@[192.0.2.300]>\r\n"
        )[1..],
        ["250 2.1.0", "250 2.1.5", "501 5.1.3", "501 5.1.3"]
    );
    let env = envelope(&s);
    assert_eq!(env.sender, "scan@[192.0.2.7]");
    assert_eq!(env.recipients, ["ops@[IPv6:2001:db8::1]"]);
    // A quoted local part may hold `@[…]>`: the address is at the domain after it (the literal's stand-in once
    // leaked into such an address, and the message went to another mailbox).
    let mut s = session(AuthPolicy::None);
    assert_eq!(
        replies(
            &mut s,
            b"EHLO x\r\nMAIL FROM:<\"s@[192.0.2.1]>\"@x.example>\r\nRCPT TO:<\"q@[192.0.2.1]>\"@x.example>\r\nRCPT TO:<\"a]>\"@[192.0.2.1]>\r\n"
        )[1..],
        ["250 2.1.0", "250 2.1.5", "250 2.1.5"]
    );
    let env = envelope(&s);
    assert!(!format!("{env:?}").contains(LITERAL_STAND_IN), "{env:?}");
    assert!(env.sender.ends_with("@x.example"), "{env:?}");
    assert!(env.recipients[0].ends_with("@x.example"), "{env:?}");
    assert!(env.recipients[1].ends_with("@[192.0.2.1]"), "{env:?}");
    for line in [
        &b"MAIL FROM:<@[1.2.3.4]>\r\n"[..],
        b"MAIL FROM:<a@[1.2.3.4]\r\n",
        b"RCPT TO:<a@[\r\n",
        b"RCPT TO:<a@[]>\r\n",
        b"RCPT TO:<a@[IPv6:]>\r\n",
        b"RCPT TO:<\"a@[1.2.3.4]>\"@[1.2.3.4]>\r\n",
        b"MAIL FR",
        "RCPT TO:<é@[1.2.3.4]>\r\n".as_bytes(),
    ] {
        // Whatever the line, no panic, and a reply.
        let mut s = session(AuthPolicy::None);
        steps(&mut s, b"EHLO x\r\nMAIL FROM:<a@b>\r\n");
        let _ = steps(&mut s, line);
    }
}

/// An address over 256 octets (RFC 5321's limit on a path, which smtp-proto enforces) is refused, so that no
/// envelope grows with what a client makes up: at most `max_recipients` addresses of 256 octets.
#[test]
fn addresses_longer_than_a_path_are_refused() {
    let mut s = plain_session();
    let domain = vec!["d".repeat(63); 3].join(".");
    let at_most = format!("{}@{domain}", "a".repeat(256 - 1 - domain.len()));
    assert_eq!(at_most.len(), 256);
    let long = format!("a{at_most}");
    let script = format!(
        "EHLO x\r\nMAIL FROM:<{long}>\r\nMAIL FROM:<{at_most}>\r\nRCPT TO:<{long}>\r\nRCPT TO:<{at_most}>\r\n"
    );
    assert_eq!(
        replies(&mut s, script.as_bytes())[1..],
        ["501 5.1.7", "250 2.1.0", "501 5.1.3", "250 2.1.5"]
    );
}

/// Addresses that would be taken now and refused upstream later are refused at once: bytes that are not UTF-8
/// (smtp-proto would read them as U+FFFD), an empty domain. DATA with words after it is a syntax error, and HELP
/// names only what this session offers.
#[test]
fn addresses_relay_could_not_deliver_are_refused_at_once() {
    let mut s = plain_session();
    let out = steps(
        &mut s,
        b"EHLO x\r\nMAIL FROM:<\xff\xfe@b.c>\r\nMAIL FROM:<a@>\r\nMAIL FROM:<a@b>\r\nRCPT TO:<caf\xe9@y.z>\r\nRCPT TO:<b@>\r\nRCPT TO:<b@y.z>\r\nDATA now\r\nHELP\r\n",
    );
    assert_eq!(
        codes(&out[1..]),
        [
            "501 5.1.7",
            "501 5.1.7",
            "250 2.1.0",
            "501 5.1.3",
            "501 5.1.3",
            "250 2.1.5",
            "501 5.5.4",
            "214 2.0.0"
        ]
    );
    assert!(reply_text(&out[1]).contains("not UTF-8"), "{:?}", out[1]);
    let help = reply_text(&out[8]);
    assert!(
        !help.contains("STARTTLS") && !help.contains("AUTH"),
        "{help}"
    );
    let env = envelope(&s);
    assert_eq!(
        (env.sender.as_str(), env.recipients.as_slice()),
        ("a@b", &["b@y.z".to_string()][..])
    );
}

/// SMTPUTF8 on MAIL is kept in the envelope and named in the `Received:` line (RFC 6531 section 3.7.3).
#[test]
fn smtputf8_is_kept_and_traced() {
    let mut s = session(AuthPolicy::None);
    assert_eq!(
        replies(
            &mut s,
            "EHLO x\r\nMAIL FROM:<jörg@b> SMTPUTF8\r\nRCPT TO:<zoë@d>\r\nDATA\r\n".as_bytes()
        )[1..],
        ["250 2.1.0", "250 2.1.5", "354 2.0.0"]
    );
    let id = QueueId::new();
    let env = s.envelope(id, SystemTime::UNIX_EPOCH).unwrap();
    assert!(env.smtputf8);
    assert_eq!(env.sender, "jörg@b");
    assert!(
        s.received_header(id, SystemTime::UNIX_EPOCH)
            .contains(" with UTF8SMTP\r\n")
    );
}

#[test]
fn auth_is_hidden_without_tls_unless_plaintext_auth() {
    let mut s = session_on(policy(AuthPolicy::Required, false, true));
    let text = reply_text(&steps(&mut s, b"EHLO x\r\n")[0]);
    assert!(!text.contains("AUTH"));
    assert_eq!(replies(&mut s, b"AUTH PLAIN AGEAYg==\r\n"), ["538 5.7.11"]);
    // A mechanism relay does not know is that, with or without TLS.
    assert_eq!(replies(&mut s, b"AUTH CRAM-MD5\r\n"), ["504 5.5.4"]);
    assert_eq!(replies(&mut s, b"MAIL FROM:<a@b>\r\n"), ["530 5.7.0"]);
    s.tls_started();
    let text = reply_text(&steps(&mut s, b"EHLO x\r\n")[0]);
    assert!(text.contains("AUTH PLAIN LOGIN") && !text.contains("STARTTLS"));
    // A listener without TLS that takes no password in the clear: no encryption to ask for.
    let mut s = session_on(policy(AuthPolicy::Required, false, false));
    steps(&mut s, b"EHLO x\r\n");
    assert_eq!(replies(&mut s, b"AUTH PLAIN AGEAYg==\r\n"), ["503 5.5.1"]);
}

/// Old firmware that greets with HELO and then logs in, as Postfix lets it: AUTH is taken after HELO (not before
/// any greeting), and the trace line says the session was authenticated.
#[test]
fn auth_after_helo_is_taken_as_postfix_takes_it() {
    let mut s = session_on(policy(AuthPolicy::Required, true, false));
    assert_eq!(replies(&mut s, b"AUTH LOGIN\r\n"), ["503 5.5.1"]);
    steps(&mut s, b"HELO printer\r\n");
    assert_eq!(replies(&mut s, b"AUTH LOGIN\r\n"), ["334 -"]);
    assert_eq!(
        replies(&mut s, format!("{}\r\n", b64(b"printer")).as_bytes()),
        ["334 -"]
    );
    let out = steps(&mut s, format!("{}\r\n", b64(b"pw")).as_bytes());
    assert!(
        matches!(out.first(), Some(Step::Authenticate(c)) if c.username == "printer"),
        "{out:?}"
    );
    assert_eq!(codes(&[s.auth_succeeded("printer".into())]), ["235 2.7.0"]);
    assert_eq!(
        replies(&mut s, b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n"),
        ["250 2.1.0", "250 2.1.5"]
    );
    let trace = s.received_header(QueueId::new(), SystemTime::UNIX_EPOCH);
    assert!(trace.contains(" with ESMTPA\r\n"), "{trace}");
}

#[test]
fn mail_needs_helo_and_auth_when_required() {
    let mut s = session(AuthPolicy::Required);
    assert_eq!(replies(&mut s, b"MAIL FROM:<a@b>\r\n"), ["503 5.5.1"]);
    assert_eq!(
        replies(&mut s, b"EHLO x\r\nMAIL FROM:<a@b>\r\n"),
        ["250 -", "530 5.7.0"]
    );
}

#[test]
fn auth_plain_then_pipelined_transaction() {
    let mut s = greeted(AuthPolicy::Required);
    let line = format!("AUTH PLAIN {}\r\n", b64(b"\0printer\0pw"));
    let out = steps(&mut s, line.as_bytes());
    let Some(Step::Authenticate(c)) = out.first() else {
        panic!("{out:?}")
    };
    assert_eq!(c.username, "printer");
    assert_eq!(c.password.expose_secret(), "pw");
    assert!(
        !format!("{c:?}").contains("pw\""),
        "password must not show in Debug"
    );
    assert_eq!(codes(&[s.auth_succeeded("printer".into())]), ["235 2.7.0"]);
    assert_eq!(
        replies(
            &mut s,
            b"MAIL FROM:<a@b> SIZE=10 BODY=8BITMIME\r\nRCPT TO:<c@d>\r\nRCPT TO:<e@f>\r\nRCPT TO:<g@h>\r\nDATA\r\n"
        ),
        [
            "250 2.1.0",
            "250 2.1.5",
            "250 2.1.5",
            "452 4.5.3",
            "354 2.0.0"
        ]
    );
    let mut body = Vec::new();
    let mut input: &[u8] = b"Subject: t\r\n\r\n..x\r\n.\r\nQUIT\r\n";
    assert_eq!(s.feed_data(&mut input, &mut body), Progress::Done);
    assert_eq!(body, b"Subject: t\r\n\r\n.x\r\n");
    let id = QueueId::new();
    let env = s.envelope(id, SystemTime::UNIX_EPOCH).unwrap();
    assert_eq!(env.recipients, ["c@d", "e@f"]);
    assert_eq!(env.user.as_deref(), Some("printer"));
    assert!(env.body_8bit);
    let header = s.received_header(id, SystemTime::UNIX_EPOCH);
    assert_eq!(
        header,
        format!(
            "Received: from x ([192.0.2.7])\r\n\tby relay.test (relay) with ESMTPA\r\n\tid {id}; Thu, 01 Jan 1970 00:00:00 +0000\r\n"
        )
    );
    let reply = s.data_stored(Ok(id));
    assert_eq!(
        reply.to_string(),
        format!("250 2.0.0 Ok: queued as {id}\r\n")
    );
    assert_eq!(replies(&mut s, input), ["221 2.0.0"]);
}

/// A greeting with a comment's or a field's punctuation in it cannot change the trace line's structure: only what
/// a domain or an address literal is made of is written.
#[test]
fn the_trace_line_takes_only_a_name_from_the_greeting() {
    for (hello, shown) in [
        ("EHLO x(\r\n", "x"),
        ("EHLO a;b\"c\\d\r\n", "abcd"),
        ("EHLO [IPv6:2001:db8::1]\r\n", "[IPv6:2001:db8::1]"),
        ("EHLO ()\r\n", "unknown"),
    ] {
        let mut s = session(AuthPolicy::None);
        steps(&mut s, hello.as_bytes());
        let header = s.received_header(QueueId::new(), SystemTime::UNIX_EPOCH);
        assert!(
            header.starts_with(&format!("Received: from {shown} ([192.0.2.7])\r\n")),
            "{hello:?}: {header}"
        );
    }
}

#[test]
fn auth_login_dialogue() {
    let mut s = greeted(AuthPolicy::Required);
    let out = steps(&mut s, b"AUTH LOGIN\r\n");
    assert_eq!(reply_text(&out[0]), "334 VXNlcm5hbWU6\r\n");
    let out = steps(&mut s, format!("{}\r\n", b64(b"scanner")).as_bytes());
    assert_eq!(reply_text(&out[0]), "334 UGFzc3dvcmQ6\r\n");
    assert_eq!(
        replies(&mut s, format!("{}\r\n", b64(b"secret")).as_bytes()),
        ["auth LOGIN scanner"]
    );
    // Initial response carries the user name.
    let mut s = greeted(AuthPolicy::Required);
    let out = steps(
        &mut s,
        format!("AUTH LOGIN {}\r\n", b64(b"scanner")).as_bytes(),
    );
    assert_eq!(reply_text(&out[0]), "334 UGFzc3dvcmQ6\r\n");
}

#[test]
fn auth_errors() {
    let mut s = greeted(AuthPolicy::Required);
    assert_eq!(
        replies(&mut s, b"AUTH LOGIN\r\n*\r\n"),
        ["334 -", "501 5.0.0"]
    );
    assert_eq!(
        replies(&mut s, b"AUTH PLAIN\r\n!!!\r\n"),
        ["334 -", "501 5.5.2"]
    );
    assert_eq!(replies(&mut s, b"AUTH CRAM-MD5\r\n"), ["504 5.5.4"]);
    // Acting for another user is refused like a wrong password: the connection code counts, delays and logs it.
    let line = format!("AUTH PLAIN {}\r\n", b64(b"admin\0printer\0pw"));
    let out = steps(&mut s, line.as_bytes());
    assert!(
        matches!(&out[..], [Step::Authenticate(c)] if c.refused.is_some() && c.username == "printer"),
        "{out:?}"
    );
    assert_eq!(codes(&[s.auth_failed()]), ["535 5.7.8"]);
    let line = format!("AUTH PLAIN {}\r\n", b64(b"\0\xff\0pw"));
    let out = steps(&mut s, line.as_bytes());
    assert!(
        matches!(&out[..], [Step::Authenticate(c)] if c.refused.is_some()),
        "{out:?}"
    );
    assert_eq!(codes(&[s.auth_failed()]), ["535 5.7.8"]);
    assert!(matches!(s.auth_failed(), Step::Close(r) if r.code == 421));
}

#[test]
fn auth_none_listener_does_not_offer_auth() {
    let mut s = session(AuthPolicy::None);
    let text = reply_text(&steps(&mut s, b"EHLO x\r\n")[0]);
    assert!(!text.contains("AUTH"));
    assert_eq!(replies(&mut s, b"AUTH PLAIN AGEAYg==\r\n"), ["502 5.5.1"]);
    assert_eq!(replies(&mut s, b"MAIL FROM:<>\r\n"), ["250 2.1.0"]);
}

#[test]
fn size_limits() {
    let mut s = session(AuthPolicy::None);
    assert_eq!(
        replies(
            &mut s,
            b"EHLO x\r\nMAIL FROM:<a@b> SIZE=1001\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n"
        ),
        ["250 -", "552 5.3.4", "250 2.1.0", "250 2.1.5", "354 2.0.0"]
    );
    let big = vec![b'x'; 1200];
    let mut input = &big[..];
    let mut body = Vec::new();
    assert_eq!(s.feed_data(&mut input, &mut body), Progress::NeedMore);
    assert_eq!(s.refusal().map(|r| r.code), Some(552));
    let mut input: &[u8] = b"\r\n.\r\n";
    assert_eq!(s.feed_data(&mut input, &mut body), Progress::Done);
    assert_eq!(codes(&[Step::Reply(s.data_refused())]), ["552 5.3.4"]);
    // The transaction is over: a new one starts cleanly.
    assert_eq!(replies(&mut s, b"RCPT TO:<c@d>\r\n"), ["503 5.5.1"]);
}

/// `max_message_size` is what is queued and sent, relay's own `Received:` line included: the default is Gmail's
/// limit to the byte, and a message that fits it must fit Gmail too.
#[test]
fn the_size_limit_counts_relays_own_trace_line() {
    for extra in [0, 1] {
        let mut s = session(AuthPolicy::None);
        steps(&mut s, b"EHLO x\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n");
        let trace = s.received_header(QueueId::new(), SystemTime::now()).len();
        steps(&mut s, b"DATA\r\n");
        let (body, refused) = (1000 - trace + extra, extra == 1);
        let big = vec![b'x'; body];
        let (mut input, mut out) = (&big[..], Vec::new());
        s.feed_data(&mut input, &mut out);
        assert_eq!(s.refusal().is_some(), refused, "{body} + {trace}");
    }
    // A size declared at MAIL is counted so too: refused before the upload, not after it.
    let mut s = session(AuthPolicy::None);
    steps(&mut s, b"EHLO x\r\n");
    let trace = s.received_header(QueueId::new(), SystemTime::now()).len();
    let declared = |n: usize| format!("MAIL FROM:<a@b> SIZE={n}\r\nRSET\r\n");
    assert_eq!(replies(&mut s, declared(1000).as_bytes())[0], "552 5.3.4");
    assert_eq!(
        // (Three bytes kept for an SMTPUTF8 transaction's longer protocol word.)
        replies(&mut s, declared(1000 - trace - 3).as_bytes())[0],
        "250 2.1.0"
    );
}

#[test]
fn bare_lf_is_refused_by_default() {
    let mut s = session(AuthPolicy::None);
    steps(
        &mut s,
        b"EHLO x\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n",
    );
    // A bare LF inside a body that ends properly: refused at the real end, and the session goes on.
    let mut input: &[u8] = b"a\nb\r\n.\r\nNOOP\r\n";
    let mut body = Vec::new();
    assert_eq!(s.feed_data(&mut input, &mut body), Progress::Done);
    assert_eq!(input, b"NOOP\r\n");
    assert!(!s.data_ended_by_bare_lf());
    assert_eq!(codes(&[Step::Reply(s.data_refused())]), ["550 5.6.0"]);
    // An LF-only client's end of data: refused there, and the connection is to be closed.
    steps(
        &mut s,
        b"NOOP\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n",
    );
    let mut input: &[u8] = b"a\n.\nMAIL FROM:<x@y>\r\n";
    assert_eq!(s.feed_data(&mut input, &mut body), Progress::Done);
    assert!(s.data_ended_by_bare_lf());
    assert_eq!(codes(&[Step::Reply(s.data_refused())]), ["550 5.6.0"]);
}

#[test]
fn sequence_errors() {
    let mut s = session(AuthPolicy::None);
    assert_eq!(
        replies(
            &mut s,
            b"EHLO x\r\nRCPT TO:<a@b>\r\nDATA\r\nMAIL FROM:<a@b>\r\nDATA\r\nMAIL FROM:<a@b>\r\nRSET\r\nNOOP\r\nVRFY root\r\nHELP\r\nEXPN x\r\n"
        ),
        [
            "250 -",
            "503 5.5.1",
            "503 5.5.1",
            "250 2.1.0",
            "554 5.5.1",
            "503 5.5.1",
            "250 2.0.0",
            "250 2.0.0",
            "252 2.5.0",
            "214 2.0.0",
            "502 5.5.1"
        ]
    );
}

#[test]
fn malformed_commands_get_5xx_and_then_a_hang_up() {
    let mut s = session(AuthPolicy::None);
    let out = steps(
        &mut s,
        b"EHLO x\r\nMAIL FROM:<a@@b>\r\nRCPT TO:<>\r\nMAIL FROM:<a@b> FOO=BAR\r\nHELO\r\n",
    );
    assert_eq!(codes(&out)[0], "250 -");
    assert!(
        out[1..]
            .iter()
            .all(|s| matches!(s, Step::Reply(r) if r.code >= 500)),
        "{:?}",
        codes(&out)
    );
    let out = steps(&mut s, &b"XYZZY\r\n".repeat(20));
    assert!(
        matches!(out.last(), Some(Step::Close(r)) if r.code == 421),
        "{:?}",
        codes(&out)
    );
}

#[test]
fn long_lines_are_refused_and_the_rest_ignored() {
    let mut s = session(AuthPolicy::None);
    let mut input = vec![b'A'; MAX_LINE + 10];
    input.extend_from_slice(b"MAIL FROM:<a@b>\r\nNOOP\r\n");
    // In pieces, so the long line spans reads.
    let mut all = Vec::new();
    for chunk in input.chunks(1000) {
        all.extend(steps(&mut s, chunk));
    }
    assert_eq!(codes(&all), ["500 5.5.2", "250 2.0.0"]);
}

#[test]
fn starttls_resets_the_session() {
    let mut s = session(AuthPolicy::Optional);
    assert_eq!(
        replies(&mut s, b"EHLO x\r\nSTARTTLS\r\nMAIL FROM:<evil@x>\r\n"),
        ["250 -", "220 2.0.0"]
    );
    s.tls_started();
    assert_eq!(replies(&mut s, b"MAIL FROM:<a@b>\r\n"), ["503 5.5.1"]);
    assert_eq!(
        replies(&mut s, b"EHLO x\r\nSTARTTLS\r\n"),
        ["250 -", "503 5.5.1"]
    );
}

#[test]
fn bdat_hangs_up() {
    let mut s = session(AuthPolicy::None);
    let out = steps(
        &mut s,
        b"EHLO x\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nBDAT 5 LAST\r\n",
    );
    assert!(matches!(out.last(), Some(Step::Close(r)) if r.code == 502));
}

#[test]
fn quit_closes() {
    let mut s = session(AuthPolicy::None);
    assert!(matches!(steps(&mut s, b"QUIT\r\n").as_slice(), [Step::Close(r)] if r.code == 221));
}

#[test]
fn huge_declared_size_is_refused() {
    let mut s = session(AuthPolicy::None);
    assert_eq!(
        replies(
            &mut s,
            b"EHLO x\r\nMAIL FROM:<a@b> SIZE=99999999999999999999999\r\nMAIL FROM:<a@b> size=1001\r\n"
        ),
        ["250 -", "552 5.3.4", "552 5.3.4"]
    );
}

#[test]
fn lenient_envelopes_from_devices() {
    let mut s = session(AuthPolicy::None);
    let got = steps(
        &mut s,
        b"ehlo scanner\r\nMAIL FROM:a@lan.test SIZE=10\r\nrcpt to: b@example.test NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;b@example.test\r\nRCPT TO:<c@example.test>\r\n",
    );
    assert_eq!(
        codes(&got),
        ["250 -", "250 2.1.0", "250 2.1.5", "250 2.1.5"]
    );
    let env = envelope(&s);
    assert_eq!(env.sender, "a@lan.test");
    assert_eq!(env.recipients, ["b@example.test", "c@example.test"]);
    assert_eq!(
        bracket_path(b"MAIL FROM:<>\r\n").as_ref(),
        b"MAIL FROM:<>\r\n"
    );
    assert_eq!(bracket_path(b"MAIL FROM:\r\n").as_ref(), b"MAIL FROM:\r\n");
    assert_eq!(bracket_path(b"NOOP a@b\r\n").as_ref(), b"NOOP a@b\r\n");
    assert_eq!(
        bracket_path(b"rcpt  to : b@c NOTIFY=NEVER\r\n").as_ref(),
        b"rcpt  to : <b@c> NOTIFY=NEVER\r\n"
    );
    assert_eq!(
        bracket_path(b"MAIL TO:a@b\r\n").as_ref(),
        b"MAIL TO:a@b\r\n"
    );
}

#[test]
fn auth_plain_with_an_empty_initial_response_is_asked_for_credentials() {
    let mut s = greeted(AuthPolicy::Required);
    assert_eq!(replies(&mut s, b"AUTH PLAIN =\r\n"), ["334 -"]);
    assert_eq!(
        replies(&mut s, format!("{}\r\n", b64(b"\0printer\0pw")).as_bytes()),
        ["auth PLAIN printer"]
    );
}

/// The same recipient twice gets one copy (only its domain compared without case); a refused MAIL, RCPT or DATA is described for its log line, and
/// nothing else is.
#[test]
fn duplicate_recipients_count_once_and_refusals_name_their_command() {
    let mut s = session(AuthPolicy::None);
    steps(&mut s, b"EHLO x\r\nMAIL FROM:<a@example.com>\r\n");
    assert_eq!(
        s.last_mail_command(),
        Some(("MAIL", "a@example.com", Some("a@example.com")))
    );
    assert_eq!(
        replies(
            &mut s,
            b"RCPT TO:<b@example.com>\r\nRCPT TO:<b@example.com>\r\nRCPT TO:<b@Example.COM>\r\nRCPT TO:<B@example.com>\r\n"
        ),
        ["250 2.1.5"; 4]
    );
    // The domain is compared without case, the local part as given (RFC 5321 section 2.4: `B@` may be another
    // mailbox than `b@`; it was dropped).
    let env = envelope(&s);
    assert_eq!(env.recipients, ["b@example.com", "B@example.com"]);
    assert_eq!(replies(&mut s, b"RCPT TO:<>\r\n"), ["501 5.1.3"]);
    assert_eq!(
        s.last_mail_command(),
        Some(("RCPT", "", Some("a@example.com")))
    );
    assert_eq!(
        replies(&mut s, b"RCPT TO:garbage garbage\r\n")[0]
            .chars()
            .next(),
        Some('5')
    );
    assert_eq!(s.last_mail_command().map(|c| c.0), Some("RCPT"));
    // An address that did not parse is still named, as the client wrote it.
    steps(&mut s, b"RCPT TO:<x@[not-an-ip]> NOTIFY=NEVER\r\n");
    assert_eq!(s.last_mail_command().map(|c| c.1), Some("<x@[not-an-ip]>"));
    steps(&mut s, b"RCPT TO:<bad address@@> NOTIFY=NEVER\r\n");
    assert_eq!(s.last_mail_command().map(|c| c.1), Some("<bad address@@>"));
    steps(&mut s, b"NOOP\r\n");
    assert_eq!(s.last_mail_command(), None);
}

/// RFC 5321's grammar: RSET takes no parameters, MAIL and RCPT need their colon (a parameter error, not an unknown
/// command), and AUTH takes a mechanism and at most an initial response (RFC 4954).
#[test]
fn parameters_out_of_the_grammar_are_syntax_errors() {
    let mut s = greeted(AuthPolicy::None);
    assert_eq!(replies(&mut s, b"RSET now\r\n"), ["501 5.5.4"]);
    assert_eq!(replies(&mut s, b"RSET\r\n"), ["250 2.0.0"]);
    assert_eq!(replies(&mut s, b"MAIL FROM <a@b.c>\r\n"), ["501 5.5.4"]);
    assert_eq!(replies(&mut s, b"MAIL FROM:<a@b.c>\r\n"), ["250 2.1.0"]);
    assert_eq!(replies(&mut s, b"RCPT TO x@y.z\r\n"), ["501 5.5.4"]);
    let mut s = greeted(AuthPolicy::Required);
    assert_eq!(
        replies(&mut s, b"AUTH PLAIN AHByaW50ZXIAc2VjcmV0 extra\r\n"),
        ["501 5.5.4"]
    );
    assert_eq!(
        replies(&mut s, b"AUTH PLAIN AHByaW50ZXIAc2VjcmV0\r\n"),
        ["auth PLAIN printer"]
    );
}

/// Two blanks after HELO or EHLO, as some devices send: taken as one. A HELO without a name is still refused.
#[test]
fn a_hello_with_two_blanks_is_taken() {
    let mut s = session(AuthPolicy::None);
    assert_eq!(replies(&mut s, b"HELO  printer.lan\r\n")[0], "250 -");
    let mut s = session(AuthPolicy::None);
    assert_eq!(replies(&mut s, b"EHLO \t printer.lan\r\n")[0], "250 -");
    assert_eq!(replies(&mut s, b"HELO  \r\n"), ["501 5.5.4"]);
}

#[test]
fn starttls_with_a_parameter_is_a_syntax_error() {
    let mut s = greeted(AuthPolicy::Required);
    assert_eq!(replies(&mut s, b"STARTTLS extra\r\n"), ["501 5.5.4"]);
    assert_eq!(replies(&mut s, b"starttls \r\n"), ["220 2.0.0"]);
}

/// Under `lenient`, `LF . LF` ends the data of a device that frames everything with LF alone; from a client
/// whose commands end with CRLF it is text it passed on, and must not let what follows through as a second
/// message (SMTP smuggling).
#[test]
fn lenient_ends_data_at_a_bare_lf_dot_only_for_an_lf_only_client() {
    let lenient = || {
        let mut p = (*policy(AuthPolicy::None, false, false)).clone();
        p.bare_lf = BareLineEndings::Lenient;
        session_on(Arc::new(p))
    };
    for vector in [&b"\n.\n"[..], b"\n.\r\n", b"\r\n.\n"] {
        let mut s = lenient();
        let out = steps(
            &mut s,
            b"EHLO x\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n",
        );
        assert!(matches!(out.last(), Some(Step::Data(_))), "{out:?}");
        let mut data = b"text".to_vec();
        data.extend_from_slice(vector);
        data.extend_from_slice(
            b"MAIL FROM:<ceo@x>\r\nRCPT TO:<f@y>\r\nDATA\r\nsmuggled\r\n.\r\nQUIT\r\n",
        );
        let (mut input, mut body) = (&data[..], Vec::new());
        assert_eq!(s.feed_data(&mut input, &mut body), Progress::Done);
        assert_eq!(input, b"QUIT\r\n", "{vector:?} ended the body early");
        assert!(body.ends_with(b"smuggled\r\n"), "{vector:?}");
    }
    let mut s = lenient();
    let out = steps(&mut s, b"EHLO x\nMAIL FROM:<a@b>\nRCPT TO:<c@d>\nDATA\n");
    assert!(matches!(out.last(), Some(Step::Data(_))), "{out:?}");
    let (mut input, mut body) = (&b"line\n.\nQUIT\n"[..], Vec::new());
    assert_eq!(s.feed_data(&mut input, &mut body), Progress::Done);
    assert_eq!((input, &body[..]), (&b"QUIT\n"[..], &b"line\r\n"[..]));
}

/// smtp-proto reads the verb after spaces, or with a CR inside it: the UTF-8 check does not depend on where it is.
#[test]
fn addresses_that_are_not_utf8_are_refused_however_the_verb_is_written() {
    let mut s = plain_session();
    assert_eq!(
        replies(
            &mut s,
            b"EHLO x\r\n MAIL FROM:<s\xffender@b.c>\r\nMAIL FROM:<a@b.c>\r\nR\rCPT TO:<r\xfe@b.c>\r\n\rRCPT TO:<z\xff@b.c>\r\n"
        )[1..],
        ["501 5.1.7", "250 2.1.0", "501 5.1.3", "501 5.1.3"]
    );
}

/// An over-long answer in an AUTH exchange ends it: the next line is a command, not a password.
#[test]
fn an_over_long_auth_answer_ends_the_exchange() {
    let long = format!("{}\r\n", "A".repeat(MAX_LINE + 10));
    for start in ["AUTH LOGIN\r\n", "AUTH PLAIN\r\n"] {
        let mut s = greeted(AuthPolicy::Required);
        assert_eq!(replies(&mut s, start.as_bytes()), ["334 -"]);
        assert_eq!(
            replies(&mut s, format!("{long}NOOP\r\nQUIT\r\n").as_bytes()),
            ["500 5.5.6", "250 2.0.0", "221 2.0.0"],
            "{start}"
        );
    }
}

/// A client that sends only NOOP (or RSET, VRFY, HELP) is cut off after Postfix's junk command limit and ten
/// more; one that sends mail between them is not.
#[test]
fn junk_commands_without_mail_end_the_session() {
    let mut s = greeted(AuthPolicy::None);
    let out = steps(&mut s, "NOOP\r\n".repeat(200).as_bytes());
    assert_eq!(
        out.len(),
        MAX_JUNK as usize + MAX_ERRORS as usize,
        "{out:?}"
    );
    assert!(matches!(out.last(), Some(Step::Close(r)) if r.code == 421));
    let mut s = greeted(AuthPolicy::None);
    for _ in 0..3 {
        let out = steps(&mut s, "RSET\r\n".repeat(MAX_JUNK as usize).as_bytes());
        assert!(
            out.iter()
                .all(|o| matches!(o, Step::Reply(r) if r.code == 250))
        );
        steps(&mut s, b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n");
        store_a_one_line_message(&mut s);
    }
}

/// Every way of asking without sending mail ends the session in the end: a MAIL refused for want of a login,
/// an AUTH cancelled, a greeting repeated, a recipient given again, recipients far past the limit.
#[test]
fn no_loop_of_refused_or_idle_commands_holds_a_connection() {
    let closes_after = |auth: AuthPolicy, start: &[u8], each: &[u8], limit: usize| {
        let mut s = session(auth);
        steps(&mut s, start);
        let mut input = Vec::new();
        for _ in 0..limit + 50 {
            input.extend_from_slice(each);
        }
        let out = steps(&mut s, &input);
        assert!(
            matches!(out.last(), Some(Step::Close(r)) if r.code == 421),
            "{:?}: {:?}",
            String::from_utf8_lossy(each),
            codes(&out[out.len().saturating_sub(3)..])
        );
        out.len()
    };
    let errors = MAX_ERRORS as usize;
    let junk = MAX_JUNK as usize;
    assert_eq!(
        closes_after(
            AuthPolicy::Required,
            b"EHLO x\r\n",
            b"MAIL FROM:<a@b>\r\n",
            errors
        ),
        errors
    );
    assert_eq!(
        closes_after(
            AuthPolicy::Required,
            b"EHLO x\r\n",
            b"AUTH PLAIN\r\n*\r\n",
            errors
        ),
        2 * errors
    );
    assert_eq!(
        closes_after(
            AuthPolicy::Required,
            b"EHLO x\r\n",
            b"AUTH LOGIN\r\n*\r\n",
            errors
        ),
        2 * errors
    );
    assert_eq!(
        closes_after(
            AuthPolicy::None,
            b"EHLO x\r\n",
            b"EHLO x\r\n",
            junk + errors
        ),
        junk + errors
    );
    assert_eq!(
        closes_after(
            AuthPolicy::None,
            b"HELO x\r\n",
            b"HELO x\r\n",
            junk + errors
        ),
        junk + errors
    );
    let surplus = RECIPIENT_SURPLUS as usize;
    assert_eq!(
        closes_after(
            AuthPolicy::None,
            b"EHLO x\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n",
            b"RCPT TO:<c@d>\r\n",
            surplus + errors
        ),
        surplus + errors
    );
    // max_recipients is 2 here.
    let mut s = session(AuthPolicy::None);
    steps(&mut s, b"EHLO x\r\nMAIL FROM:<a@b>\r\n");
    let many: String = (0..2 + surplus + errors)
        .map(|i| format!("RCPT TO:<r{i}@d>\r\n"))
        .collect();
    let out = steps(&mut s, many.as_bytes());
    assert_eq!(out.len(), 2 + surplus + errors);
    assert!(matches!(out.last(), Some(Step::Close(r)) if r.code == 421));
}

/// A client that sends more recipients than the limit (and the rest later, RFC 5321 section 4.5.3.1.10), some of
/// them twice (overlapping lists), and one error with each message, message after message, is never cut off.
#[test]
fn ordinary_clients_are_not_cut_off() {
    let mut s = greeted(AuthPolicy::None);
    for _ in 0..MAX_ERRORS + 5 {
        assert_eq!(replies(&mut s, b"RCPT TO:<early@d>\r\n"), ["503 5.5.1"]);
        let many: String = (0..400)
            .map(|i| format!("RCPT TO:<r{}@d>\r\n", i % 150))
            .collect();
        let out = steps(
            &mut s,
            format!("MAIL FROM:<a@b>\r\n{many}DATA\r\n").as_bytes(),
        );
        assert!(
            matches!(out.last(), Some(Step::Data(r)) if r.code == 354),
            "{:?}",
            codes(&out)
        );
        store_a_one_line_message(&mut s);
    }
}

/// A full queue refuses the transaction at MAIL with 452 4.3.1, without counting it as the client's error, and
/// the next MAIL may begin one; the size the client declared is what the room is asked for.
#[test]
fn mail_without_room_in_the_queue_is_refused_for_now() {
    let mut s = greeted(AuthPolicy::None);
    let mut input: &[u8] = b"MAIL FROM:<a@example.com> SIZE=800\r\n";
    assert!(matches!(s.next(&mut input), Step::Room(800)));
    assert_eq!(
        codes(&[Step::Reply(s.room_checked(Admission::Full))]),
        ["452 4.3.1"]
    );
    assert_eq!(
        codes(&steps(&mut s, b"RCPT TO:<b@example.com>\r\n")),
        ["503 5.5.1"]
    );
    for _ in 0..20 {
        let mut input: &[u8] = b"MAIL FROM:<a@example.com>\r\n";
        assert!(matches!(s.next(&mut input), Step::Room(0)));
        assert_eq!(
            codes(&[Step::Reply(s.room_checked(Admission::Full))]),
            ["452 4.3.1"]
        );
    }
    // A read-only filesystem is not "storage" (the sysadmin would look at `df`): a local error, for now too.
    let mut input: &[u8] = b"MAIL FROM:<a@example.com>\r\n";
    assert!(matches!(s.next(&mut input), Step::Room(0)));
    assert_eq!(
        codes(&[Step::Reply(s.room_checked(Admission::ReadOnly))]),
        ["451 4.3.0"]
    );
    assert_eq!(
        codes(&steps(
            &mut s,
            b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n"
        )),
        ["250 2.1.0", "250 2.1.5", "354 2.0.0"]
    );
}
