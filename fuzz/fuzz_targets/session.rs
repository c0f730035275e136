//! Arbitrary bytes through the SMTP session state machine. The first byte picks the listener policy and where
//! the input is cut into reads; the rest is what a client sends.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use relay::config::{AuthPolicy, BareLineEndings};
use relay::smtp::data::Progress;
use relay::smtp::session::{Policy, Session, Step};

fuzz_target!(|input: &[u8]| {
    let Some((&knobs, data)) = input.split_first() else {
        return;
    };
    let policy = Arc::new(Policy {
        hostname: "fuzz".into(),
        listener: "127.0.0.1:25".into(),
        auth: [AuthPolicy::None, AuthPolicy::Optional, AuthPolicy::Required]
            [usize::from(knobs % 3)],
        plaintext_auth: knobs & 4 != 0,
        starttls: knobs & 8 != 0,
        bare_lf: [
            BareLineEndings::Reject,
            BareLineEndings::Normalize,
            BareLineEndings::Lenient,
        ][usize::from(knobs >> 4) % 3],
        max_message_size: 4096,
        max_recipients: 3,
        postmaster: (knobs & 64 != 0).then(|| "admin@example.com".into()),
    });
    let mut session = Session::new(policy, "192.0.2.1:4000".parse().unwrap(), false);
    let cut = usize::from(knobs >> 5) * 7 + 1;
    let mut body = Vec::new();
    for read in data.chunks(cut) {
        let mut rest = read;
        loop {
            if session.is_receiving_data() {
                body.clear();
                let before = rest.len();
                let progress = session.feed_data(&mut rest, &mut body);
                assert!(rest.len() <= before);
                if progress == Progress::Done {
                    let reply = match session.refusal() {
                        Some(_) => session.data_refused(),
                        None => session.data_stored(Err(())),
                    };
                    check(&reply.to_string());
                    continue;
                }
                break;
            }
            match session.next(&mut rest) {
                Step::NeedInput => break,
                Step::Reply(r) | Step::Data(r) => check(&r.to_string()),
                // The queue has room or not, as the declared size says: both answers are fuzzed.
                Step::Room(size) => check(&session.room_checked(size % 2 == 0).to_string()),
                Step::StartTls(r) => {
                    check(&r.to_string());
                    session.tls_started();
                    rest = &[];
                }
                Step::Authenticate(c) => {
                    let step = if c.username.len() % 2 == 0 {
                        session.auth_succeeded(c.username)
                    } else {
                        session.auth_failed()
                    };
                    if let Step::Close(_) = step {
                        return;
                    }
                }
                Step::Close(r) => {
                    check(&r.to_string());
                    return;
                }
            }
        }
    }
});

/// Every reply is one or more CRLF-terminated lines starting with the same three digits.
fn check(reply: &str) {
    assert!(reply.ends_with("\r\n"));
    let code = &reply[..3];
    assert!(code.bytes().all(|b| b.is_ascii_digit()));
    for line in reply.trim_end_matches("\r\n").split("\r\n") {
        assert!(line.starts_with(code), "{reply:?}");
        assert!(!line.contains('\n') && !line.contains('\r'));
    }
}
