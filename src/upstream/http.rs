//! What the Graph and Gmail API transports share: the HTTP client, `Retry-After`, and turning a refusal into
//! an [`Outcome`] with the provider's reason in plain words.

use std::time::{Duration, SystemTime};

use super::Outcome;
use super::outgoing::Outgoing;

/// At most this much of an error reply is read: it is for the log line.
const MAX_ERROR_BODY: usize = 64 * 1024;
/// At most this much of a success reply is read where it is a few kilobytes of JSON (Gmail's message id,
/// Graph's upload session).
pub const MAX_REPLY_BODY: usize = 1 << 20;
/// The longest wait a provider's `Retry-After` can impose on one message.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(6 * 3600);

/// The HTTP client for upload and send calls: no redirects (they would carry the token elsewhere), rustls, and a
/// connect timeout; each request gets its own overall timeout.
pub fn client() -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(30))
        .build()
}

/// Time to send `bytes` at a slow 32 KiB/s, plus a minute for the reply.
pub fn time_for(bytes: usize) -> Duration {
    Duration::from_secs(60 + bytes as u64 / 32_768)
}

/// A request body read from the queue file while it is sent, a piece at a time ([`Outgoing::chunks`]), so that a
/// delivery holds a piece, never the whole message: `prefix`, then the message; with `base64`, the standard
/// base64 of both (Graph's MIME upload), each piece cut at a multiple of 3 bytes so that the pieces' encodings
/// join into the encoding of the whole. Its length is [`streamed_len`]. A queue file that changed since it was
/// sealed ends the stream with an error, and the request is abandoned unfinished, as SMTP leaves out the final
/// dot.
pub fn streamed(message: &Outgoing, prefix: Vec<u8>, base64: bool) -> reqwest::Body {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD as B64;
    let encode = move |bytes: Vec<u8>| {
        if base64 {
            B64.encode(bytes).into_bytes()
        } else {
            bytes
        }
    };
    // (pieces, bytes not sent yet, whether the last piece went)
    let start = (message.chunks(false), prefix, false);
    let pieces =
        futures_util::stream::try_unfold(start, move |(mut chunks, mut carry, done)| async move {
            if done {
                return Ok(None);
            }
            while let Some(piece) = chunks.next().await? {
                carry.extend_from_slice(&piece);
                let whole = if base64 {
                    carry.len() / 3 * 3
                } else {
                    carry.len()
                };
                if whole > 0 {
                    let rest = carry.split_off(whole);
                    return Ok(Some((encode(carry), (chunks, rest, false))));
                }
            }
            Ok::<_, std::io::Error>(
                (!carry.is_empty()).then(|| (encode(carry), (chunks, Vec::new(), true))),
            )
        });
    reqwest::Body::wrap_stream(pieces)
}

/// The length of [`streamed`]'s body.
pub fn streamed_len(message: &Outgoing, prefix: usize, base64: bool) -> usize {
    let raw = prefix + message.len() as usize;
    if base64 { base64_len(raw) } else { raw }
}

/// The length of `n` bytes in padded base64.
pub fn base64_len(n: usize) -> usize {
    n.div_ceil(3) * 4
}

/// `Retry-After`: seconds, or an HTTP date.
pub fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let v = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    let wait = match v.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => httpdate::parse_http_date(v)
            .ok()?
            .duration_since(SystemTime::now())
            .unwrap_or_default(),
    };
    Some(wait.min(MAX_RETRY_AFTER))
}

/// The error reply's body, bounded.
pub async fn error_text(resp: reqwest::Response) -> String {
    String::from_utf8_lossy(&bounded_body(resp, MAX_ERROR_BODY).await.0).into_owned()
}

/// A success reply's JSON (an id, an upload URL), or `None` when it is not that or is longer than `limit`
/// bytes: an upstream that keeps sending is not read into memory.
pub async fn json_reply<T: serde::de::DeserializeOwned>(
    resp: reqwest::Response,
    limit: usize,
) -> Option<T> {
    let (body, whole) = bounded_body(resp, limit).await;
    whole.then(|| serde_json::from_slice(&body).ok()).flatten()
}

/// At most `limit` bytes of a reply's body, and whether that was all of it.
pub async fn bounded_body(mut resp: reqwest::Response, limit: usize) -> (Vec<u8>, bool) {
    let mut body = Vec::new();
    loop {
        match resp.chunk().await {
            Ok(Some(chunk)) => {
                let room = limit.saturating_sub(body.len());
                body.extend_from_slice(&chunk[..chunk.len().min(room)]);
                if room < chunk.len() {
                    return (body, false);
                }
            }
            Ok(None) => return (body, true),
            Err(_) => return (body, false),
        }
    }
}

/// `{"error": {"code": …, "message": …}}` (Graph), or Google's `{"error": {"code": 403, "status": …,
/// "message": …, "errors": [{"reason": …}]}}`: the code words and the message.
pub fn error_code(body: &str) -> (String, String) {
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
    let e = &v["error"];
    let code = [
        &e["code"],
        &e["status"],
        &e["errors"][0]["reason"],
        &e["innerError"]["code"],
    ]
    .iter()
    .filter_map(|c| c.as_str())
    .collect::<Vec<_>>()
    .join(" ");
    let message = e["message"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| body.chars().take(300).collect());
    // Decoded JSON may hold control characters (`\u001b`); they go into log lines and terminals as escapes.
    let safe = |s: String| crate::terminal::printable_str(&s).into_owned();
    (safe(code), safe(message))
}

/// Whose a provider's refusal is, as its transport's table ([`Diagnose`]) reads the code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The account's or its mailbox's settings (a permission, an API switched off, a mailbox Graph cannot
    /// send from): every message of the account is refused the same way until an admin fixes it, so the message
    /// waits, as the SMTP upstream's session-level refusals do, instead of being bounced with all the others.
    Account,
    /// This message's (a recipient, its size, its From:): sending it again will not change the answer.
    Message,
}

/// A transport's reading of a refusal (status, code words): what it means in words that name the fix, and whose
/// it is.
pub type Diagnose = fn(u16, &str) -> Option<(&'static str, Fault)>;

/// A reply that is not the one the request wanted, as [`judge`] reads it.
pub struct Reply<'a> {
    pub service: &'a str,
    pub status: u16,
    /// `Retry-After`.
    pub wait: Option<Duration>,
    /// A redirect's target, as [`shown_url`] shows it.
    pub location: Option<String>,
    /// The body (bounded).
    pub body: &'a str,
}

/// A reply that is not the one the request wanted, read and turned into an outcome by [`judge`].
pub async fn refusal(service: &str, resp: reqwest::Response, diagnose: Diagnose) -> Outcome {
    let status = resp.status().as_u16();
    let wait = retry_after(resp.headers());
    let location = resp
        .headers()
        .get(reqwest::header::LOCATION)
        .and_then(|l| l.to_str().ok())
        .map(shown_url);
    let body = error_text(resp).await;
    let reply = Reply {
        service,
        status,
        wait,
        location,
        body: &body,
    };
    judge(&reply, diagnose)
}

/// What a reply that is not the wanted one means for the message. A message is given up (and bounced) only on
/// a refusal that is about it: a 4xx the provider gives for the request it was sent, unless the provider's code
/// says the account is at fault. 401 is the token's; 429, 503 and 504 ask for a wait; other 5xx and 408 are
/// passing trouble. Anything else says nothing about the message (an interim 1xx, a success reply that is not
/// the provider's, a redirect, a proxy's 407, a status HTTP does not define, which load balancers invent), and
/// the message waits: a captive portal or a login page in the way must not bounce the queue.
pub fn judge(reply: &Reply, diagnose: Diagnose) -> Outcome {
    let Reply {
        service, status, ..
    } = *reply;
    let (code, message) = error_code(reply.body);
    let mut text = format!("{service} {status} {code}: {message}");
    let diagnosis = diagnose(status, &code);
    if let Some((why, _)) = diagnosis {
        text = format!("{text} — {why}");
    }
    let for_account = diagnosis.is_some_and(|(_, fault)| fault == Fault::Account);
    // Google answers some rate limits with 403 and a reason instead of 429: a daily quota, or a rate.
    let named = |reasons: &[&str]| reasons.iter().any(|r| code.split(' ').any(|c| c == *r));
    let daily = named(&["dailyLimitExceeded", "quotaExceeded"]);
    let rate_limited = named(&["rateLimitExceeded", "userRateLimitExceeded"]);
    let not_about_message = |what: String| {
        Outcome::Transient(format!(
            "{text} — {what}: not an answer about the message, which is tried again"
        ))
    };
    let defined = reqwest::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .is_some();
    match status {
        401 => Outcome::AuthRejected(text),
        // Without Retry-After, a used-up day pauses the account as Gmail's SMTP 550 5.4.5 does, a rate for a
        // minute.
        403 if daily || rate_limited => {
            let fallback = if daily {
                super::QUOTA_PAUSE
            } else {
                Duration::from_secs(60)
            };
            Outcome::Throttled(text, reply.wait.unwrap_or(fallback))
        }
        // Too many requests is about the account whatever the header says: without Retry-After (Google's
        // usual 429) the account pauses a minute, as for a 403 rate limit, rather than each message trying again
        // on its own.
        429 => {
            let fallback = if daily {
                super::QUOTA_PAUSE
            } else {
                Duration::from_secs(60)
            };
            Outcome::Throttled(text, reply.wait.unwrap_or(fallback))
        }
        503 | 504 => match reply.wait {
            Some(w) => Outcome::Throttled(text, w),
            None => Outcome::Transient(text),
        },
        408 | 500..=599 => Outcome::Transient(text),
        _ if for_account => Outcome::Transient(format!(
            "{text} (the account's, not the message's: its mail waits until this is fixed, up to max_age)"
        )),
        100..=199 => not_about_message("an interim reply where a final one was due".into()),
        // What a proxy or captive portal in front of the API answers with its own page. A provider that had
        // taken the message would have said so its own way, so it goes again: at worst twice, never lost.
        200..=299 => Outcome::Transient(format!(
            "{text} — a success reply that is not {service}'s own for this request (a proxy or captive portal \
             answering for it?): the message may or may not have gone, and is tried again"
        )),
        // The client follows no redirects (they would carry the token elsewhere); the APIs do not redirect.
        300..=399 => not_about_message(match &reply.location {
            Some(to) => format!("a redirect to {to} (a proxy or login page in the way?)"),
            None => "a redirect (a proxy or login page in the way?)".into(),
        }),
        407 => not_about_message("a proxy in the way wants credentials".into()),
        // A connection reused for another host: the next attempt connects afresh.
        421 => not_about_message("the request reached a server that is not the API's".into()),
        // What relay asked for is not there (a wrong `graph_url` or `gmail_api_url`, a proxy's page, an upload
        // session or a draft of relay's own that is gone): about the request, never the message's content. A
        // recipient or mailbox that does not exist has a code of its own above.
        404 | 405 | 410 => not_about_message("what relay asked for is not at that address".into()),
        // A clash with the state of what relay is building (Exchange's change-key conflict on a draft,
        // `ErrorIrresolvableConflict`; an upload session's ranges; a lock): the next attempt builds it afresh.
        409 | 412 | 416 | 423 => not_about_message(
            "a conflict with the state of the draft or upload relay was building".into(),
        ),
        400..=499 if defined => Outcome::Permanent(text),
        _ => not_about_message("a status HTTP does not define (a load balancer's own?)".into()),
    }
}

/// A URL for a log line: without its query, which may carry a credential (an upload session's, a login page's).
pub fn shown_url(url: &str) -> String {
    let url = crate::terminal::printable_str(url);
    match url.split_once('?') {
        Some((bare, _)) => format!("{bare}?(query not shown)"),
        None => url.into_owned(),
    }
}

/// A request that never got a reply.
pub fn failed(service: &str, e: &reqwest::Error) -> Outcome {
    // The URL without its query: an upload session's URL carries its own credential (Graph's `?authtoken=`,
    // Gmail's `upload_id`), and this text goes to the log, the queue's state and `relay status`.
    let shown = match e.url() {
        Some(url) if url.query().is_some() => {
            let mut bare = url.clone();
            bare.set_query(None);
            e.to_string()
                .replace(url.as_str(), &format!("{bare}?(query not shown)"))
        }
        _ => e.to_string(),
    };
    let mut text = format!("{service}: {shown}");
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(&format!(": {s}"));
        source = s.source();
    }
    Outcome::Transient(text)
}

/// [`failed`], for the request that sends the message: a request that got no reply (in time, or before its
/// connection closed) may have been taken, and is said so (it goes again, and may arrive twice, as after an SMTP
/// final dot left unanswered).
pub fn failed_send(service: &str, e: &reqwest::Error) -> Outcome {
    match failed(service, e) {
        // (A connect that failed or timed out sent nothing.)
        Outcome::Transient(text) if !e.is_connect() && !e.is_builder() => {
            Outcome::Transient(format!(
                "{text} (no reply: {service} may have taken the message, which is tried again and may then arrive twice)"
            ))
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What [`failed_send`] says of a POST to `addr` that fails (within `limit`).
    async fn said_of_a_send_to(addr: std::net::SocketAddr, limit: Duration) -> String {
        let e = reqwest::Client::new()
            .post(format!("http://{addr}/sendMail"))
            .body("x")
            .timeout(limit)
            .send()
            .await
            .unwrap_err();
        match failed_send("Graph", &e) {
            Outcome::Transient(text) => text,
            other => panic!("not transient: {other:?}"),
        }
    }

    /// A send with no reply (in time, or before the connection closed) says the message may have gone; a refused
    /// connection does not.
    #[tokio::test]
    async fn a_send_without_a_reply_in_time_may_have_gone() {
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = silent.local_addr().unwrap();
        let held = tokio::spawn(async move {
            let (_conn, _) = silent.accept().await.unwrap();
            // Holds the connection open, answering nothing, until the test ends.
            std::future::pending::<()>().await;
        });
        let text = said_of_a_send_to(addr, Duration::from_millis(200)).await;
        assert!(text.contains("may have taken the message"), "{text}");
        held.abort();
        // Read, then closed without a reply: the same.
        let closing = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = closing.local_addr().unwrap();
        let reader = tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            let (mut conn, _) = closing.accept().await.unwrap();
            let mut got = vec![0u8; 4096];
            let _ = conn.read(&mut got).await;
        });
        let text = said_of_a_send_to(addr, Duration::from_secs(20)).await;
        assert!(text.contains("may have taken the message"), "{text}");
        reader.abort();
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let gone = closed.local_addr().unwrap();
        drop(closed);
        let text = said_of_a_send_to(gone, Duration::from_secs(20)).await;
        assert!(!text.contains("may have taken"), "{text}");
    }

    #[test]
    fn error_codes_of_both_providers() {
        let (code, msg) = error_code(
            r#"{"error":{"code":"ErrorAccessDenied","message":"Access is denied. Check credentials and try again."}}"#,
        );
        assert_eq!(code, "ErrorAccessDenied");
        assert!(msg.starts_with("Access is denied"));
        let (code, _) = error_code(
            r#"{"error":{"code":403,"message":"Request had insufficient authentication scopes.","errors":[{"message":"x","domain":"global","reason":"insufficientPermissions"}],"status":"PERMISSION_DENIED"}}"#,
        );
        assert_eq!(code, "PERMISSION_DENIED insufficientPermissions");
        let (code, msg) = error_code("<html>bad gateway</html>");
        assert_eq!(code, "");
        assert_eq!(msg, "<html>bad gateway</html>");
    }

    /// A table as the transports' are: a code for the account, one for the message.
    fn table(_: u16, code: &str) -> Option<(&'static str, Fault)> {
        match code {
            "ErrorAccessDenied" => Some(("grant Mail.Send", Fault::Account)),
            "ErrorInvalidRecipients" => Some(("a recipient is not valid", Fault::Message)),
            _ => None,
        }
    }

    fn judged(status: u16, body: &str, location: Option<&str>) -> Outcome {
        let reply = Reply {
            service: "Graph",
            status,
            wait: None,
            location: location.map(shown_url),
            body,
        };
        judge(&reply, table)
    }

    fn graph_error(code: &str) -> String {
        format!(r#"{{"error":{{"code":"{code}","message":"m"}}}}"#)
    }

    #[test]
    fn too_many_requests_pauses_the_account_with_or_without_retry_after() {
        assert_eq!(
            judged(429, "", None),
            Outcome::Throttled("Graph 429 : ".into(), Duration::from_secs(60))
        );
        assert!(matches!(judged(503, "", None), Outcome::Transient(_)));
    }

    #[test]
    fn only_a_refusal_about_the_message_gives_it_up() {
        for (status, body) in [
            (400, graph_error("ErrorInvalidRecipients")),
            (413, String::new()),
            // A 4xx HTTP defines, with no code the table knows, stays the provider's refusal of the request.
            (422, graph_error("Other")),
        ] {
            let out = judged(status, &body, None);
            assert!(matches!(out, Outcome::Permanent(_)), "{status}: {out:?}");
        }
        let account = judged(403, &graph_error("ErrorAccessDenied"), None);
        match &account {
            Outcome::Transient(why) => {
                assert!(
                    why.starts_with("Graph 403 ErrorAccessDenied: m — grant Mail.Send"),
                    "{why}"
                );
                assert!(why.contains("the account's, not the message's"), "{why}");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(judged(401, "", None), Outcome::AuthRejected(_)));
        assert!(matches!(judged(500, "", None), Outcome::Transient(_)));
        assert!(matches!(judged(408, "", None), Outcome::Transient(_)));
    }

    #[test]
    fn a_status_that_says_nothing_about_the_message_defers_it() {
        let page = "<html><body>Sign in to the guest network</body></html>";
        for status in [
            100, 101, 103, 200, 201, 204, 299, 300, 302, 307, 404, 405, 407, 409, 410, 412, 416,
            421, 423, 460, 499, 600, 999,
        ] {
            let out = judged(status, page, None);
            let Outcome::Transient(why) = &out else {
                panic!("{status}: {out:?}");
            };
            assert!(
                why.starts_with(&format!("Graph {status} : <html>")),
                "{why}"
            );
            assert!(why.contains("tried again"), "{why}");
        }
        let Outcome::Transient(why) = judged(200, page, None) else {
            panic!()
        };
        assert!(why.contains("may or may not have gone"), "{why}");
        let Outcome::Transient(why) =
            judged(302, "", Some("https://portal.example/login?session=s3cret"))
        else {
            panic!()
        };
        assert!(
            why.contains("redirect to https://portal.example/login?(query not shown)"),
            "{why}"
        );
        assert!(!why.contains("s3cret"), "{why}");
    }

    #[test]
    fn retry_after_in_seconds_or_as_a_date_and_capped() {
        let mut h = reqwest::header::HeaderMap::new();
        h.insert("retry-after", "7".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(7)));
        h.insert("retry-after", "99999999".parse().unwrap());
        assert_eq!(retry_after(&h), Some(MAX_RETRY_AFTER));
        let later = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(120));
        h.insert("retry-after", later.parse().unwrap());
        let w = retry_after(&h).unwrap();
        assert!(w > Duration::from_secs(100) && w <= Duration::from_secs(120));
        h.insert("retry-after", "soon".parse().unwrap());
        assert_eq!(retry_after(&h), None);
    }

    /// A success reply is read up to its bound: a small one is parsed, a longer one is not read on.
    #[tokio::test]
    async fn success_replies_are_read_within_a_bound() {
        use wiremock::{Mock, MockServer, ResponseTemplate, matchers::any};
        let server = MockServer::start().await;
        let big = format!("{{\"id\":\"{}\"}}", "x".repeat(MAX_REPLY_BODY));
        Mock::given(wiremock::matchers::path("/big"))
            .respond_with(ResponseTemplate::new(200).set_body_string(big))
            .mount(&server)
            .await;
        Mock::given(any())
            .respond_with(ResponseTemplate::new(200).set_body_string(r#"{"id":"m1"}"#))
            .mount(&server)
            .await;
        let http = client().unwrap();
        let get = |p: &str| http.get(format!("{}{p}", server.uri())).send();
        let small: Option<serde_json::Value> =
            json_reply(get("/small").await.unwrap(), MAX_REPLY_BODY).await;
        assert_eq!(small.unwrap()["id"], "m1");
        let big: Option<serde_json::Value> =
            json_reply(get("/big").await.unwrap(), MAX_REPLY_BODY).await;
        assert!(big.is_none());
    }
}
