//! Arbitrary bytes as a token endpoint's success reply: `parse_token_reply` must return, and a grant it returns
//! must have a token and an expiry clamped to 60 s ..= 1 day after the request (3600 s when none is given).
#![no_main]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use libfuzzer_sys::fuzz_target;
use relay::oauth::client::parse_token_reply;
use secrecy::ExposeSecret;

fuzz_target!(|body: &[u8]| {
    // Fixed, so that a crash replays; with nanoseconds, so that clamping is seen not to round them away.
    let before: SystemTime = UNIX_EPOCH + Duration::new(1_767_225_600, 123_456_789);
    let Ok(grant) = parse_token_reply(body, before) else { return };
    assert!(!grant.access_token.expose_secret().is_empty());
    let lifetime = grant.expires_at.duration_since(before).expect("expiry before the request");
    assert!(
        (Duration::from_secs(60)..=Duration::from_secs(86_400)).contains(&lifetime),
        "lifetime {lifetime:?} for {:?}",
        String::from_utf8_lossy(body)
    );
    if let Ok(serde_json::Value::Object(reply)) = serde_json::from_slice::<serde_json::Value>(body)
        && !reply.contains_key("expires_in")
    {
        assert_eq!(lifetime, Duration::from_secs(3600));
    }
});
