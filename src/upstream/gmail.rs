//! Delivery through the Gmail API (`users.messages.send`), the queued bytes as raw RFC 5322: a simple media
//! upload up to 5 MiB, a resumable upload in chunks above that, up to Gmail's 35 MB. Gmail takes the recipients
//! from the headers: envelope recipients the headers do not name (Bcc) are added as a `Bcc:` line, which Gmail
//! removes before delivery, and header addresses the envelope does not name (mail for them routed through another
//! account, or already delivered) are taken out of To: and Cc: (as Graph's draft recipients are set from the
//! envelope). A resumable chunk that fails (a server error, no answer) is followed by a status query,
//! as Google advises: the upload goes on where the session says, and one the session holds whole was sent.
//!
//! The session outlives the attempt: it is kept with the message's delivery state ([`ResumePoint`]) before the
//! first chunk goes, so that an attempt cut short (a stop, a crash, a chunk with no answer) leaves the next one
//! to ask the same session first. Uploaded again in a new session, a message the old one held whole would be
//! sent twice: so only a session that says it is gone or incomplete lets a new upload begin, and one that gives
//! no clear answer is kept and asked again by the next attempt (within Google's week).

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use secrecy::{ExposeSecret, SecretString};

use super::Outcome;
use super::http::{
    Fault, MAX_REPLY_BODY, Reply, bounded_body, client, failed, failed_send, judge, refusal,
    streamed, time_for,
};
use super::kept::ResumePoint;
use super::mime;
use super::outgoing::Outgoing;

/// Gmail's largest message.
pub const MESSAGE_LIMIT: usize = 35 * 1024 * 1024;
/// Above this, the resumable protocol (Google's advice for uploads over 5 MB).
pub const SIMPLE_LIMIT: usize = 5 * 1024 * 1024;
/// Resumable chunks: a multiple of 256 KiB, as the protocol requires.
pub const CHUNK: usize = 16 * 256 * 1024;

/// A resumable upload's session, as kept between attempts. Its URL is a credential (Google's `upload_id` lets
/// whoever holds it upload into the session): it is never logged nor put in a reply.
#[derive(Clone, PartialEq, Eq)]
pub struct UploadSession {
    pub url: String,
    /// The bytes the upload was begun for (the `Bcc:` line and the message): another count is another upload.
    pub total: u64,
    /// [`fingerprint`] of the bytes it was begun for; `None` for a session kept before fingerprints (then it is
    /// taken as another upload's: asked, never resumed).
    pub fingerprint: Option<String>,
    /// When it was begun; `None` for a session kept before this was (taken as young: asked, and `max_age`
    /// bounds it).
    pub begun_at: Option<SystemTime>,
}

/// How long Google keeps a resumable upload session: a week. An older one is gone (or, asked, would be someone
/// else's answer to fear): the message is uploaded anew.
pub const SESSION_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);

/// What of an upload can differ between attempts of one queued message while its length stays the same: the
/// `Bcc:` line (the recipients not finished with) and the header block as rewritten (`rewrite_from` and the
/// account's mailbox, which a reload may change). The body is the sealed queue file's, the same every time.
pub fn fingerprint(prefix: &[u8], header_block: &[u8]) -> String {
    let mut h = blake3::Hasher::new();
    // The prefix's length first, so that a byte moved between the two parts is another fingerprint.
    h.update(&(prefix.len() as u64).to_le_bytes());
    h.update(prefix);
    h.update(header_block);
    h.finalize().to_hex().to_string()
}

impl std::fmt::Debug for UploadSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UploadSession")
            .field("url", &"(not shown)")
            .field("total", &self.total)
            .field("fingerprint", &self.fingerprint)
            .field("begun_at", &self.begun_at)
            .finish()
    }
}

pub struct GmailUpstream {
    http: reqwest::Client,
    url: String,
    /// `url` parsed, for the origin a kept session's URL must share.
    endpoint: Option<reqwest::Url>,
}

impl GmailUpstream {
    pub fn new(gmail_api_url: &str) -> Result<Self, String> {
        let url = format!("{gmail_api_url}/upload/gmail/v1/users/me/messages/send");
        Ok(GmailUpstream {
            http: client().map_err(|e| e.to_string())?,
            endpoint: reqwest::Url::parse(&url).ok(),
            url,
        })
    }

    /// Whether `session` is on the Gmail endpoint's scheme, host and port, or, for Google's own endpoint, on
    /// the other of Google's API hosts over HTTPS (a session may be given on `www.googleapis.com`): the account's
    /// bearer token goes with every request to it, and a URL read back from a state file could have been pointed
    /// anywhere.
    fn is_own(&self, session: &str) -> bool {
        let Some(endpoint) = &self.endpoint else {
            return false;
        };
        // Named, not any `*.googleapis.com`: some of those are names users choose (Cloud Storage buckets).
        let google = |u: &reqwest::Url| {
            u.scheme() == "https"
                && u.port().is_none()
                && matches!(
                    u.host_str(),
                    Some("gmail.googleapis.com" | "www.googleapis.com")
                )
        };
        reqwest::Url::parse(session)
            .is_ok_and(|u| u.origin() == endpoint.origin() || (google(&u) && google(endpoint)))
    }

    /// Where its requests go (for `relay test`'s transcript).
    pub fn endpoint(&self) -> &str {
        &self.url
    }

    /// `resume`: where the upload session of a large message is kept between attempts (none for `relay test`).
    pub async fn send(
        &self,
        token: &SecretString,
        recipients: &[String],
        message: &Outgoing,
        resume: Option<&Arc<dyn ResumePoint>>,
    ) -> Outcome {
        // Gmail sends to every address of To:, Cc: and Bcc:, whatever the envelope says.
        let keep: HashSet<String> = recipients.iter().map(|r| mime::address_key(r)).collect();
        // A message with its own Bcc: that names only some of the hidden recipients gets one merged line.
        let adds_bcc = !hidden_recipients(recipients, message.header_block()).is_empty();
        let narrowed = match super::rewrite::narrow_recipients(
            message.header_block(),
            &keep,
            adds_bcc,
        ) {
            Ok(n) => n.map(|(head, old)| message.with_head(head, old)),
            Err(e) => {
                // Gmail would send to every address its headers name: refused rather than sent to recipients
                // the envelope does not name (a Bcc: of the device's, another account's share of the mail).
                let outside: Vec<String> = mime::header_recipients(message.header_block())
                    .into_iter()
                    .map(|(_, a)| a)
                    .filter(|a| !keep.contains(&mime::address_key(a)))
                    .take(5)
                    .collect();
                if !outside.is_empty() {
                    return Outcome::Permanent(format!(
                        "Gmail API: the message's header names recipients its envelope does not ({}), and relay cannot take them out: {e}. The Gmail API sends to every address the header names, so the message is not sent that way (through SMTP or Graph it goes to the envelope's recipients only)",
                        outside.join(", ")
                    ));
                }
                None
            }
        };
        let message = narrowed.as_ref().unwrap_or(message);
        let bcc = hidden_recipients(recipients, message.header_block());
        let total = bcc.len() + message.len() as usize;
        let ask_only = resume.is_some_and(|r| r.ask_only());
        // (Asked only, the session's own count matters, not these bytes'.)
        if total > MESSAGE_LIMIT && !ask_only {
            return Outcome::Permanent(format!(
                "Gmail API: the message is {total} bytes; Gmail takes at most 35 MiB ({MESSAGE_LIMIT} bytes)"
            ));
        }
        // A message an earlier attempt began in a session (its `Bcc:` line or rewriting may have shrunk it since)
        // goes the resumable way, which asks that session first.
        let kept = resume.is_some_and(|r| r.load().is_some());
        if ask_only && !kept {
            return Outcome::Transient(EXPIRED_UNSENT.into());
        }
        if total <= SIMPLE_LIMIT && !kept {
            // Read from the queue file as it is sent.
            let resp = self
                .http
                .post(format!("{}?uploadType=media", self.url))
                .bearer_auth(token.expose_secret())
                .header(reqwest::header::CONTENT_TYPE, "message/rfc822")
                .header(reqwest::header::CONTENT_LENGTH, total)
                .timeout(time_for(total))
                .body(streamed(message, bcc, false))
                .send()
                .await;
            // No session to ask again: a 2xx cut off is taken as sent.
            return match resp {
                Err(e) => failed_send("Gmail API", &e),
                ok => answer(ok, true).await,
            };
        }
        let upload = Upload {
            gmail: self,
            token,
            store: resume,
            total,
            fingerprint: fingerprint(&bcc, message.header_block()),
            on_disk: AtomicBool::new(false),
        };
        upload.run(&bcc, message).await
    }
}

/// The outcome of a reply to the send (or to a status query that stands for it). `cut_off_is_sent`: a 2xx whose
/// body cannot be read whole counts as sent (see [`delivered`]).
async fn answer(resp: Result<reqwest::Response, reqwest::Error>, cut_off_is_sent: bool) -> Outcome {
    match resp {
        Ok(r) if r.status().is_success() => delivered(r, cut_off_is_sent).await,
        Ok(r) => refusal("Gmail API", r, diagnose).await,
        Err(e) => failed("Gmail API", &e),
    }
}

/// One resumable upload of one message.
struct Upload<'a> {
    gmail: &'a GmailUpstream,
    token: &'a SecretString,
    store: Option<&'a Arc<dyn ResumePoint>>,
    total: usize,
    /// [`fingerprint`] of these bytes.
    fingerprint: String,
    /// The session in use is kept on disk with the message: a question to it left without a clear answer can
    /// be asked again by the next attempt, instead of guessed.
    on_disk: AtomicBool,
}

/// What a resumable upload came to: the answer to its last request, for the log how an earlier attempt's
/// session counted in it, and whether that answer came from a status query (not the chunk's own reply).
type Uploaded = (
    Result<reqwest::Response, reqwest::Error>,
    Option<String>,
    bool,
);

impl Upload<'_> {
    /// The whole upload: its outcome, with how an earlier attempt's session counted in it.
    async fn run(&self, prefix: &[u8], message: &Outgoing) -> Outcome {
        let (resp, note, asked) = match self.resumable(prefix, message).await {
            Ok(r) => r,
            Err(outcome) => return outcome,
        };
        // A status query's 2xx cut off can be asked again while the session is kept; guessed otherwise.
        let cut_off_is_sent = !(asked && self.on_disk.load(Ordering::Acquire));
        match (answer(resp, cut_off_is_sent).await, note) {
            (Outcome::Delivered(reply), Some(note)) => {
                Outcome::Delivered(format!("{reply}; {note}"))
            }
            (out, _) => out,
        }
    }

    /// The session an earlier attempt kept: where to go on in it if it is one for these bytes and still open,
    /// or the outcome if it holds a whole message (sent), or if it gives no clear answer (kept, and asked again
    /// by the next attempt). `None`: a new session.
    ///
    /// Only a session that says it is gone (404, 410) or incomplete (308) lets a new upload begin: one that
    /// completed sent the message, and uploaded again in a new session it would be sent twice. Past Google's
    /// week a session is gone whatever it would say.
    async fn earlier(&self) -> Result<Option<(String, usize)>, Outcome> {
        let Some(kept) = self.store.and_then(|s| s.load()) else {
            return Ok(None);
        };
        if !self.gmail.is_own(&kept.url) {
            // The URL is not shown: whatever it is, it is not to be spread further.
            tracing::warn!(
                "the Gmail upload session kept in the message's delivery state is not on the scheme, host and port of gmail_api_url (the state file was edited?); it is not asked, since the account's token would go with the question, and the message is uploaded anew"
            );
            return Ok(None);
        }
        if !self.askable(&kept) {
            return Ok(None);
        }
        // The same bytes (the `Bcc:` line and the queue file, made again the same way), or another upload: the
        // message's recipients, its route or the account's rewriting changed. Another upload's session is asked
        // all the same (it may have sent the message), but never resumed: its bytes and these would be spliced.
        let same = kept.total == self.total as u64
            && kept.fingerprint.as_deref() == Some(self.fingerprint.as_str());
        let r = match self.gmail.status(self.token, &kept.url, kept.total).await {
            Ok(r) => r,
            // The token's: refreshed, and the whole attempt (this question first) made again.
            Err(Outcome::AuthRejected(why)) => return Err(Outcome::AuthRejected(why)),
            Err(no_answer) => {
                return Err(Outcome::Transient(format!(
                    "{}; the upload session of an earlier attempt gave no clear answer to what it holds (it may hold the message, sent): it is kept and asked again at the next attempt, not uploaded anew",
                    no_answer.reply()
                )));
            }
        };
        self.on_disk.store(true, Ordering::Release);
        match r.status().as_u16() {
            // It holds a whole message: sent, by the attempt that began it. Not uploaded again.
            200..=299 => Err(match delivered(r, false).await {
                Outcome::Delivered(reply) => Outcome::Delivered(format!(
                    "{reply}; sent by the upload session of an earlier attempt (its answer was not heard before relay stopped or the attempt ended): not uploaded again"
                )),
                other => other,
            }),
            308 => match held(r.headers()) {
                Some(held) if same && held < self.total => Ok(Some((kept.url, held))),
                _ => {
                    self.keep(None).await;
                    Ok(None)
                }
            },
            // Gone (404, 410: expired or dropped by Google): forgotten (not asked again should the new session
            // fail to begin), and a new session.
            _ => {
                self.keep(None).await;
                Ok(None)
            }
        }
    }

    /// Whether `kept` may be asked what it holds: on the Gmail endpoint (the account's token goes with the
    /// question) and within Google's week.
    fn askable(&self, kept: &UploadSession) -> bool {
        self.gmail.is_own(&kept.url)
            && !kept.begun_at.is_some_and(|at| {
                SystemTime::now()
                    .duration_since(at)
                    .is_ok_and(|age| age > SESSION_LIFETIME)
            })
    }

    /// Keeps the session for the next attempt (`None`: forgets it). Failing that, the upload goes on as before
    /// sessions were kept: cut short, the next attempt would begin a new one.
    async fn keep(&self, session: Option<&str>) {
        let Some(store) = self.store else {
            return;
        };
        let store = store.clone();
        let keeps = session.is_some();
        let session = session.map(|url| UploadSession {
            url: url.to_string(),
            total: self.total as u64,
            fingerprint: Some(self.fingerprint.clone()),
            begun_at: Some(SystemTime::now()),
        });
        let saved = tokio::task::spawn_blocking(move || store.save(session)).await;
        self.on_disk
            .store(keeps && matches!(saved, Ok(Ok(()))), Ordering::Release);
        let failed = match saved {
            Ok(Ok(())) => return,
            Ok(Err(e)) => e.to_string(),
            Err(e) => e.to_string(),
        };
        tracing::warn!(error = %failed, "cannot keep the Gmail upload session with the message's delivery state; should this attempt be cut short, the next one uploads the message again in a new session");
    }

    /// Goes on with an earlier attempt's session, or starts a new one, then sends the bytes in chunks; returns
    /// the reply to the last one.
    async fn resumable(&self, prefix: &[u8], message: &Outgoing) -> Result<Uploaded, Outcome> {
        let (total, token) = (self.total, self.token);
        let askable = self
            .store
            .and_then(|s| s.load())
            .is_some_and(|kept| self.askable(&kept));
        let earlier = self.earlier().await?;
        if self.store.is_some_and(|s| s.ask_only()) {
            // Not sent by it, or not to be asked: what it holds goes no further, and the queue bounces the
            // message, saying which.
            self.keep(None).await;
            let why = if askable {
                EXPIRED_UNSENT
            } else {
                EXPIRED_NOT_ASKED
            };
            return Err(Outcome::Transient(why.into()));
        }
        let (session, mut at, note) = match earlier {
            Some((session, at)) => {
                let note = format!(
                    "resumed the upload session of an earlier attempt at byte {at} of {total}"
                );
                (session, at, Some(note))
            }
            None => (self.begin().await?, 0, None),
        };
        let mut recoveries = 0;
        // Each chunk twice (a session may keep part of one), and the chunks a recovery sends again: a server
        // whose Range creeps forward a byte at a time must not hold the attempt for millions of requests.
        let mut chunks_left = 2 * total.div_ceil(CHUNK) + 2 * MAX_RECOVERIES as usize;
        loop {
            if chunks_left == 0 {
                self.keep(None).await;
                return Err(Outcome::Transient(format!(
                    "Gmail API: the upload session took {at} of the {total} bytes after as many chunks as the message has, twice; the next attempt uploads it again in a new session"
                )));
            }
            chunks_left -= 1;
            let end = (at + CHUNK).min(total);
            // One chunk at a time from the queue file: a 35 MB message never sits in memory whole.
            let chunk = read(message, prefix, at..end).await?;
            let resp = self
                .gmail
                .http
                .put(&session)
                .bearer_auth(token.expose_secret())
                .header(
                    reqwest::header::CONTENT_RANGE,
                    format!("bytes {at}-{}/{total}", end - 1),
                )
                .timeout(time_for(chunk.len()))
                .body(chunk)
                .send()
                .await;
            // A chunk without an answer, or with a server error: Google's advice is to ask the session what it
            // holds and go on from there. After the last chunk, it may hold the whole message, sent: uploading
            // it again in a new session would send it twice.
            let mut resumed = false;
            let r = match resp {
                Ok(r) if !is_server_error(r.status().as_u16()) => r,
                failed => {
                    resumed = true;
                    if recoveries == MAX_RECOVERIES {
                        return Ok((failed, note, false));
                    }
                    recoveries += 1;
                    match self.gmail.status(token, &session, total as u64).await {
                        Ok(r) => r,
                        // The chunk's failure stands; the session stays kept for the next attempt to ask.
                        Err(_) => return Ok((failed, note, false)),
                    }
                }
            };
            match r.status().as_u16() {
                // "Resume Incomplete": `Range` says how much of the upload the session holds, and the rest goes
                // next. Google may hold less than was sent, even after the last chunk; then it wants the rest again.
                // Only a session that holds more than before goes on, so the loop ends.
                308 => match held(r.headers()) {
                    Some(held) if held > at && held <= end && held < total => at = held,
                    // After a failed chunk: wherever the session says (bounded by MAX_RECOVERIES).
                    Some(held) if resumed && held < total => at = held,
                    held => {
                        let holds = match held {
                            Some(h) => format!("the upload session holds {h} of the {total} bytes"),
                            None => "the upload session's Range cannot be read".into(),
                        };
                        // The session says it does not hold the message: given up, it sent nothing.
                        self.keep(None).await;
                        return Err(Outcome::Transient(format!(
                            "Gmail API 308: after bytes {at}-{}, {holds}; the next attempt uploads the message again in a new session",
                            end - 1
                        )));
                    }
                },
                // Google's sign to start the upload again from the beginning: the session expired or was lost.
                404 | 410 => {
                    self.keep(None).await;
                    return Err(Outcome::Transient(format!(
                        "Gmail API {}: the resumable upload session is gone (it expires, and Google may drop it); the next attempt starts a new one",
                        r.status()
                    )));
                }
                // A success before the last byte went is not Gmail's: it sends the message once it has it all.
                // (A status query's answer, after a failed chunk, speaks for the whole session.)
                status if (200..300).contains(&status) && !resumed && end < total => {
                    return Err(Outcome::Transient(format!(
                        "Gmail API {status} after bytes {at}-{} of {total}: a success before the last chunk is not Gmail's answer (a proxy's?); the session is kept and asked at the next attempt",
                        end - 1
                    )));
                }
                _ => return Ok((Ok(r), note, resumed)),
            }
        }
    }

    /// Starts a new upload session, kept for the next attempts before a byte of the message goes; its URL.
    async fn begin(&self) -> Result<String, Outcome> {
        let start = self
            .gmail
            .http
            .post(format!("{}?uploadType=resumable", self.gmail.url))
            .bearer_auth(self.token.expose_secret())
            .header("X-Upload-Content-Type", "message/rfc822")
            .header("X-Upload-Content-Length", self.total)
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/json; charset=UTF-8",
            )
            .body("{}")
            .timeout(time_for(0))
            .send()
            .await
            .map_err(|e| failed("Gmail API", &e))?;
        if !start.status().is_success() {
            return Err(refusal("Gmail API", start, diagnose).await);
        }
        let Some(session) = start
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|l| l.to_str().ok())
            .map(str::to_string)
        else {
            return Err(Outcome::Transient(
                "Gmail API: the resumable upload has no Location".into(),
            ));
        };
        self.keep(Some(&session)).await;
        Ok(session)
    }
}

/// Why an expired message whose kept session did not send it was not uploaded (the queue's dead line and bounce
/// follow it).
pub const EXPIRED_UNSENT: &str = "Gmail API: the upload session of an earlier attempt does not hold the whole message (incomplete or gone), so it did not send it; past max_age, nothing more is uploaded";

/// Why an expired message whose kept session could not be asked was not uploaded.
pub const EXPIRED_NOT_ASKED: &str = "Gmail API: the upload session of an earlier attempt could not be asked (not on gmail_api_url's scheme, host and port, or past Google's week): it may have sent the message; past max_age, nothing more is uploaded";

/// Status queries after failed chunks in one upload: each may find a little more held, and the upload must end.
const MAX_RECOVERIES: u32 = 5;
/// Waits before each status query, and each query's time: short, since a stop's drain is 20 s (cut off, the
/// queries are the next attempt's first, with the session kept in the message's state).
const STATUS_WAITS: [Duration; 3] = [
    Duration::from_millis(500),
    Duration::from_secs(1),
    Duration::from_secs(2),
];
const STATUS_TIMEOUT: Duration = Duration::from_secs(10);

fn is_server_error(status: u16) -> bool {
    matches!(status, 500 | 502 | 503 | 504)
}

impl GmailUpstream {
    /// Asks an upload session what it holds (`Content-Range: bytes */TOTAL`, no body): a 308 with what it holds,
    /// the send's answer if the upload was complete, 404/410 if the session is gone. Anything else after a few
    /// tries is no answer, as what it says (the token's 401 at once: [`Outcome::AuthRejected`]; else
    /// [`Outcome::Transient`]).
    async fn status(
        &self,
        token: &SecretString,
        session: &str,
        total: u64,
    ) -> Result<reqwest::Response, Outcome> {
        let mut last = Outcome::Transient("Gmail API: the upload session was not asked".into());
        for wait in STATUS_WAITS {
            tokio::time::sleep(wait).await;
            let asked = self
                .http
                .put(session)
                .bearer_auth(token.expose_secret())
                .header(reqwest::header::CONTENT_RANGE, format!("bytes */{total}"))
                .header(reqwest::header::CONTENT_LENGTH, 0)
                .timeout(STATUS_TIMEOUT)
                .send()
                .await;
            last = match asked {
                // What the protocol answers a status query with.
                Ok(r) if matches!(r.status().as_u16(), 200..=299 | 308 | 404 | 410) => {
                    return Ok(r);
                }
                // A token that expired during a long upload: refreshed by the caller, not asked again with it.
                Ok(r) if r.status() == reqwest::StatusCode::UNAUTHORIZED => {
                    return Err(Outcome::AuthRejected(
                        refusal("Gmail API", r, diagnose).await.reply().to_string(),
                    ));
                }
                // Anything else (a proxy's 400, a 5xx, a 429) says nothing of the message: it must not be judged
                // a refusal of it, nor taken for a session that is gone.
                Ok(r) => Outcome::Transient(format!(
                    "Gmail API {}: not an answer to a status query",
                    r.status()
                )),
                Err(e) => failed("Gmail API", &e),
            };
        }
        Err(last)
    }
}

/// A 2xx to the send: delivered if it is Gmail's own answer, the sent message with its id. Anything else (a
/// proxy's page) does not say the message went.
///
/// A 2xx whose body cannot be read whole (cut off, timed out, over the reply cap): Gmail answers 2xx to an upload
/// only once it sent the message, so one cut off after Gmail's status line is, in all likelihood, sent. Where
/// nothing can be asked again (`cut_off_is_sent`: a simple upload, a session not kept), it is taken as sent,
/// since sent again it would arrive twice. But a status query to a session kept with the message can be asked
/// again, and Google answers it the same for the session's week: there it is no answer, and the next attempt
/// asks. Guessing would buy nothing there, and a body over the cap (Gmail's is a hundred bytes) is rather a
/// proxy's page than Gmail's: taken as sent, the message would be lost.
async fn delivered(r: reqwest::Response, cut_off_is_sent: bool) -> Outcome {
    let status = r.status().as_u16();
    // Gmail answers in JSON: a page (a proxy's, a captive portal's) that is cut off or endless is not its answer.
    let json = r
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|t| t.to_str().ok())
        .is_some_and(|t| {
            t.trim_start()
                .to_ascii_lowercase()
                .starts_with("application/json")
        });
    let (body, whole) = bounded_body(r, MAX_REPLY_BODY).await;
    // Over the cap is not "cut off": Gmail's answer is a hundred bytes.
    let cut_off = !whole && json && body.len() < MAX_REPLY_BODY;
    let sent: Option<serde_json::Value> =
        whole.then(|| serde_json::from_slice(&body).ok()).flatten();
    match sent.as_ref().and_then(|v| v["id"].as_str()) {
        Some(id) if !id.is_empty() => Outcome::Delivered(format!(
            "Gmail API {status} id {}",
            crate::terminal::printable_str(id)
        )),
        _ if cut_off && cut_off_is_sent => Outcome::Delivered(format!(
            "Gmail API {status} (its answer was cut off; taken as sent)"
        )),
        _ if !whole && cut_off_is_sent => Outcome::Transient(format!(
            "Gmail API {status}: an answer too long, or not JSON and cut off, is not Gmail's (a proxy's page?): the message may or may not have gone, and is tried again"
        )),
        _ if !whole => Outcome::Transient(format!(
            "Gmail API {status}: the upload session's answer was cut off or too long to be Gmail's; the session is kept and asked again at the next attempt"
        )),
        // Typed JSON but not JSON (cut short with its length, say): as good as one cut off, and Gmail answers 2xx
        // only once the message went; sent again, it would arrive twice. (JSON without an id stays a stranger's.)
        _ if json && sent.is_none() && cut_off_is_sent => Outcome::Delivered(format!(
            "Gmail API {status} (its JSON answer does not parse; taken as sent)"
        )),
        _ => {
            let body = String::from_utf8_lossy(&body);
            let reply = Reply {
                service: "Gmail API",
                status,
                wait: None,
                location: None,
                body: &body,
            };
            judge(&reply, diagnose)
        }
    }
}

/// How many bytes a resumable session holds, from a 308's `Range: bytes=0-N`; 0 without the header (Google:
/// nothing was received).
fn held(headers: &reqwest::header::HeaderMap) -> Option<usize> {
    let Some(range) = headers.get(reqwest::header::RANGE) else {
        return Some(0);
    };
    let last = range.to_str().ok()?.trim().strip_prefix("bytes=0-")?;
    last.parse::<usize>().ok()?.checked_add(1)
}

/// Bytes `range` of `prefix` followed by `message`.
async fn read(
    message: &Outgoing,
    prefix: &[u8],
    range: std::ops::Range<usize>,
) -> Result<Vec<u8>, Outcome> {
    let mut out = Vec::with_capacity(range.len());
    if range.start < prefix.len() {
        out.extend_from_slice(&prefix[range.start..range.end.min(prefix.len())]);
    }
    let (from, to) = (
        range.start.saturating_sub(prefix.len()),
        range.end.saturating_sub(prefix.len()),
    );
    if to > from {
        let bytes = message
            .read_range(from as u64..to as u64)
            .await
            .map_err(|e| Outcome::Transient(format!("cannot read the queue file: {e}")))?;
        out.extend_from_slice(&bytes);
    }
    Ok(out)
}

/// A `Bcc:` header line for the envelope recipients the headers do not name, or nothing.
fn hidden_recipients(recipients: &[String], message: &[u8]) -> Vec<u8> {
    let named: HashSet<String> = mime::header_recipients(message)
        .into_iter()
        .map(|(_, a)| mime::address_key(&a))
        .collect();
    let hidden: Vec<&str> = recipients
        .iter()
        .filter(|r| !named.contains(&mime::address_key(r)))
        .map(String::as_str)
        .collect();
    if hidden.is_empty() {
        return Vec::new();
    }
    // Quoted where they must be: stored unquoted, `"a,b"@x` would read as two addresses.
    let hidden: Vec<String> = hidden.iter().map(|a| mime::written_address(a)).collect();
    format!("Bcc: {}\r\n", hidden.join(", ")).into_bytes()
}

/// The Gmail API's refusals, in words that name the fix, and whose they are. Every 403 but a rate limit (read
/// before this) is about the account: the API, the scope, the project or the Workspace's policy.
fn diagnose(status: u16, code: &str) -> Option<(&'static str, Fault)> {
    let has = |w: &str| code.split(' ').any(|c| c == w);
    Some(
        if has("insufficientPermissions") || has("ACCESS_TOKEN_SCOPE_INSUFFICIENT") {
            (
                "the token lacks a Gmail scope: authorize the account with https://mail.google.com/ or gmail.send (`relay authorize`)",
                Fault::Account,
            )
        } else if has("accessNotConfigured") || has("SERVICE_DISABLED") {
            (
                "the Gmail API is not enabled in the Google Cloud project of the account's client_id: enable it (Google Cloud console > APIs & Services > Library > Gmail API), then wait a few minutes",
                Fault::Account,
            )
        } else if has("failedPrecondition") || has("FAILED_PRECONDITION") {
            (
                "Gmail will not send for this account: the Gmail service is off for the user, or the account is suspended",
                Fault::Account,
            )
        } else if has("invalidArgument") || has("INVALID_ARGUMENT") || status == 400 {
            (
                "Gmail refused the message as malformed (for example a recipient header it cannot read)",
                Fault::Message,
            )
        } else if has("dailyLimitExceeded") || has("quotaExceeded") {
            (
                "the account used up its daily Gmail sending quota (about 2,000 recipients a day for Workspace, 500 for an @gmail.com mailbox): mail waits and goes again after the pause",
                Fault::Account,
            )
        } else if has("rateLimitExceeded") || has("userRateLimitExceeded") {
            (
                "Gmail asks for fewer requests a minute: mail waits and goes again after the pause; set the account's rate = { per_minute = … } if it recurs",
                Fault::Account,
            )
        } else if status == 403 {
            (
                "the Gmail API refused: check that it is enabled in the Google Cloud project and that the mailbox may use it",
                Fault::Account,
            )
        } else {
            return None;
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An envelope address stored unquoted (`"a,b"@x` as `a,b@x`) is quoted again in the `Bcc:` line: else it reads
    /// as two addresses, `a` and `b@x`.
    #[test]
    fn the_bcc_line_quotes_local_parts_that_need_it() {
        let line = hidden_recipients(
            &[
                "a,b@example.test".into(),
                "john smith@example.test".into(),
                "ok@example.test".into(),
            ],
            b"To: x@example.test\r\n\r\nhi\r\n",
        );
        assert_eq!(
            String::from_utf8(line).unwrap(),
            "Bcc: \"a,b\"@example.test, \"john smith\"@example.test, ok@example.test\r\n"
        );
    }

    #[test]
    fn envelope_only_recipients_become_bcc() {
        let msg = b"To: A <a@example.com>\r\n\r\nhi\r\n";
        assert!(hidden_recipients(&["A@example.com".into()], msg).is_empty());
        assert_eq!(
            hidden_recipients(&["a@example.com".into(), "x@example.com".into()], msg),
            b"Bcc: x@example.com\r\n"
        );
    }

    #[test]
    fn a_308_says_how_much_the_session_holds() {
        let mut h = reqwest::header::HeaderMap::new();
        assert_eq!(held(&h), Some(0));
        h.insert("range", "bytes=0-262143".parse().unwrap());
        assert_eq!(held(&h), Some(262_144));
        h.insert("range", "bytes=5-9".parse().unwrap());
        assert_eq!(held(&h), None);
        h.insert("range", "bytes=0-x".parse().unwrap());
        assert_eq!(held(&h), None);
    }

    /// The account's settings wait; a message Gmail cannot read is given up.
    #[test]
    fn whose_refusal() {
        let fault = |status, code| diagnose(status, code).map(|(_, f)| f);
        for (status, code) in [
            (403, "PERMISSION_DENIED insufficientPermissions"),
            (403, "PERMISSION_DENIED accessNotConfigured"),
            (400, "FAILED_PRECONDITION failedPrecondition"),
            (403, "PERMISSION_DENIED forbidden"),
        ] {
            assert_eq!(fault(status, code), Some(Fault::Account), "{status} {code}");
        }
        assert_eq!(
            fault(400, "INVALID_ARGUMENT invalidArgument"),
            Some(Fault::Message)
        );
    }

    /// A kept session in memory, as the queue keeps one in the message's state.
    #[derive(Default)]
    struct Kept(std::sync::Mutex<Option<UploadSession>>);

    impl ResumePoint for Kept {
        fn load(&self) -> Option<UploadSession> {
            self.0.lock().unwrap().clone()
        }
        fn save(&self, session: Option<UploadSession>) -> std::io::Result<()> {
            *self.0.lock().unwrap() = session;
            Ok(())
        }
    }

    /// A large message to one recipient its header names (no `Bcc:` line), and its fingerprint.
    fn large() -> (Outgoing, String) {
        let message = Outgoing::from_bytes(
            [
                &b"To: a@example.com\r\n\r\n"[..],
                &vec![b'x'; SIMPLE_LIMIT + 10],
            ]
            .concat(),
        );
        let print = fingerprint(b"", message.header_block());
        (message, print)
    }

    /// A Gmail API whose new sessions take every chunk, and an earlier attempt's session at `/session/old` that
    /// answers `old`. Sends [`large`] with `kept` kept; the outcome, what is kept after, how many sessions were
    /// begun, and the requests the old session got.
    async fn send_with_kept(
        kept: UploadSession,
        old: wiremock::ResponseTemplate,
    ) -> (Outcome, Option<UploadSession>, usize, Vec<String>) {
        send_kept(large().0, kept, old).await
    }

    /// As [`send_with_kept`], for `message`.
    async fn send_kept(
        message: Outgoing,
        kept: UploadSession,
        old: wiremock::ResponseTemplate,
    ) -> (Outcome, Option<UploadSession>, usize, Vec<String>) {
        use wiremock::matchers::{method, path};
        use wiremock::{Mock, MockServer, Request, ResponseTemplate};
        let server = MockServer::start().await;
        let new = format!("{}/session/new?upload_id=NEW", server.uri());
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(200).insert_header("Location", new.as_str()))
            .mount(&server)
            .await;
        // A chunk taken whole: 308 for what is held so far, or the sent message `id` after the last.
        fn chunk(r: &Request, id: &str) -> ResponseTemplate {
            let range = r.headers["content-range"].to_str().unwrap().to_string();
            let (span, total) = range.trim_start_matches("bytes ").split_once('/').unwrap();
            let last: u64 = span.split_once('-').unwrap().1.parse().unwrap();
            if last + 1 == total.parse::<u64>().unwrap() {
                ResponseTemplate::new(200).set_body_string(format!(r#"{{"id":"{id}"}}"#))
            } else {
                ResponseTemplate::new(308)
                    .insert_header("Range", format!("bytes=0-{last}").as_str())
            }
        }
        Mock::given(path("/session/old"))
            .respond_with(move |r: &Request| {
                let range = r.headers["content-range"].to_str().unwrap();
                if range.starts_with("bytes */") {
                    old.clone()
                } else {
                    chunk(r, "resumed")
                }
            })
            .mount(&server)
            .await;
        let store: Arc<Kept> = Arc::default();
        let seen = store.clone();
        Mock::given(path("/session/new"))
            .respond_with(move |r: &Request| {
                // Kept before its first chunk came.
                assert!(seen.load().is_some_and(|s| s.url.ends_with("NEW")));
                chunk(r, "new")
            })
            .mount(&server)
            .await;
        let kept = UploadSession {
            url: kept.url.replace("HOST", &server.uri()),
            ..kept
        };
        store.save(Some(kept)).unwrap();
        let resume: Arc<dyn ResumePoint> = store.clone();
        let gmail = GmailUpstream::new(&server.uri()).unwrap();
        let out = gmail
            .send(
                &SecretString::from("tok"),
                &["a@example.com".into()],
                &message,
                Some(&resume),
            )
            .await;
        let requests = server.received_requests().await.unwrap_or_default();
        let begun = requests
            .iter()
            .filter(|r| r.method.as_str() == "POST")
            .count();
        let asked = requests
            .iter()
            .filter(|r| r.url.path() == "/session/old")
            .map(|r| {
                r.headers
                    .get("content-range")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string()
            })
            .collect();
        (out, store.load(), begun, asked)
    }

    fn old_session(total: u64, print: Option<String>, age: Duration) -> UploadSession {
        UploadSession {
            url: "HOST/session/old?upload_id=OLD".into(),
            total,
            fingerprint: print,
            begun_at: Some(SystemTime::now() - age),
        }
    }

    fn holds(n: u64) -> wiremock::ResponseTemplate {
        wiremock::ResponseTemplate::new(308)
            .insert_header("Range", format!("bytes=0-{}", n - 1).as_str())
    }

    /// A session kept for other bytes (the message's recipients, its route, or the account's `rewrite_from` or
    /// mailbox changed since, even to bytes of the same length) is asked, since it may have sent the message, but
    /// never resumed: a new session is begun (kept in its place before its first chunk). Resumed, the other
    /// bytes' first part and these bytes' rest would have been spliced into one message.
    #[tokio::test]
    async fn a_session_kept_for_other_bytes_is_asked_but_never_resumed() {
        let (message, print) = large();
        let total = message.len();
        let day = Duration::from_secs(86_400);
        for kept in [
            old_session(total + 1, Some(print.clone()), day),
            old_session(total, Some("another header block".into()), day),
            // Kept before fingerprints: what it was begun for is not known.
            old_session(total, None, day),
        ] {
            let what = format!("{kept:?}");
            let (out, after, begun, asked) = send_with_kept(kept.clone(), holds(262_144)).await;
            assert_eq!(
                out,
                Outcome::Delivered("Gmail API 200 id new".into()),
                "{what}"
            );
            assert_eq!(begun, 1, "{what}");
            assert_eq!(asked, [format!("bytes */{}", kept.total)], "{what}");
            let after = after.unwrap();
            assert!(after.url.ends_with("upload_id=NEW"), "{what}");
            assert_eq!(after.total, total);
            assert_eq!(after.fingerprint.as_deref(), Some(print.as_str()));
            assert!(after.begun_at.is_some());
        }
        // The same bytes: resumed where the session says.
        let (out, _, begun, asked) =
            send_with_kept(old_session(total, Some(print.clone()), day), holds(262_144)).await;
        assert_eq!(
            out,
            Outcome::Delivered(format!(
                "Gmail API 200 id resumed; resumed the upload session of an earlier attempt at byte 262144 of {total}"
            ))
        );
        assert_eq!(begun, 0);
        assert_eq!(asked.len(), 1 + (total as usize - 262_144).div_ceil(CHUNK));
        // Other bytes, but the session says it sent a message: that one went, and nothing is uploaded.
        let (out, _, begun, _) = send_with_kept(
            old_session(total, Some("another header block".into()), day),
            wiremock::ResponseTemplate::new(200).set_body_string(r#"{"id":"old"}"#),
        )
        .await;
        assert!(
            matches!(&out, Outcome::Delivered(r) if r.starts_with("Gmail API 200 id old; sent by the upload session of an earlier attempt")),
            "{out:?}"
        );
        assert_eq!(begun, 0);
    }

    /// A message that an earlier attempt began in a session, and that is now small enough for a simple upload (its
    /// `Bcc:` line or rewriting shrank it), asks that session first: it may have sent it.
    #[tokio::test]
    async fn a_message_grown_small_asks_its_kept_session_first() {
        let small = Outgoing::from_bytes(b"To: a@example.com\r\nSubject: x\r\n\r\nhi\r\n".to_vec());
        let kept = old_session(SIMPLE_LIMIT as u64 + 10, None, Duration::from_secs(60));
        let (out, _, begun, asked) = send_kept(
            small,
            kept,
            wiremock::ResponseTemplate::new(200).set_body_string(r#"{"id":"old"}"#),
        )
        .await;
        assert!(
            matches!(&out, Outcome::Delivered(r) if r.contains("sent by the upload session of an earlier attempt")),
            "{out:?}"
        );
        assert_eq!(begun, 0, "nothing uploaded");
        assert_eq!(asked.len(), 1);
    }

    /// A session begun over a week ago is past Google's lifetime: not asked, and the message is uploaded anew.
    #[tokio::test]
    async fn a_session_older_than_a_week_is_not_asked() {
        let (message, print) = large();
        let kept = old_session(
            message.len(),
            Some(print),
            SESSION_LIFETIME + Duration::from_secs(60),
        );
        let (out, after, begun, asked) = send_with_kept(
            kept,
            wiremock::ResponseTemplate::new(200).set_body_string(r#"{"id":"old"}"#),
        )
        .await;
        assert_eq!(out, Outcome::Delivered("Gmail API 200 id new".into()));
        assert_eq!((begun, asked.len()), (1, 0));
        assert!(after.unwrap().url.ends_with("NEW"));
    }

    /// A kept session that does not say it is gone or incomplete (a server error, a rate limit, a proxy's
    /// refusal, a 2xx whose body is over the cap) may hold the message, sent: the attempt ends for now, nothing
    /// is uploaded, and the session stays kept for the next attempt to ask. The token's 401 goes to the refresh.
    #[tokio::test]
    async fn a_kept_session_without_a_clear_answer_is_kept_and_nothing_uploaded() {
        use wiremock::ResponseTemplate;
        let (message, print) = large();
        let kept = old_session(message.len(), Some(print), Duration::from_secs(60));
        for (old, tries) in [
            (ResponseTemplate::new(500), 3),
            (ResponseTemplate::new(503), 3),
            (ResponseTemplate::new(429), 3),
            (ResponseTemplate::new(403), 3),
            (ResponseTemplate::new(400), 3),
            (
                ResponseTemplate::new(200).set_body_bytes(vec![b' '; MAX_REPLY_BODY + 1]),
                1,
            ),
            (ResponseTemplate::new(401), 1),
        ] {
            let what = format!("{old:?}");
            let (out, after, begun, asked) = send_with_kept(kept.clone(), old).await;
            match out {
                Outcome::AuthRejected(_) => assert!(what.contains("401"), "{what}"),
                Outcome::Transient(why) => {
                    assert!(why.contains("asked again at the next attempt"), "{why}")
                }
                other => panic!("{what}: {other:?}"),
            }
            assert_eq!(begun, 0, "{what}");
            assert_eq!(asked.len(), tries, "{what}");
            assert_eq!(
                after.as_ref(),
                Some(&UploadSession {
                    url: after.as_ref().unwrap().url.clone(),
                    ..kept.clone()
                })
            );
            assert!(after.unwrap().url.ends_with("OLD"));
        }
    }

    /// Only a URL on the scheme, host and port of `gmail_api_url` gets the token.
    #[test]
    fn a_kept_url_must_be_on_the_gmail_endpoint() {
        let g = GmailUpstream::new("https://gmail.googleapis.com").unwrap();
        assert!(g.is_own("https://gmail.googleapis.com/upload/gmail/v1/users/me/messages/send?uploadType=resumable&upload_id=X"));
        assert!(g.is_own("https://gmail.googleapis.com:443/x"));
        // Google may give the session on another of its API hosts.
        assert!(g.is_own(
            "https://www.googleapis.com/upload/gmail/v1/users/me/messages/send?upload_id=X"
        ));
        let fake = GmailUpstream::new("http://127.0.0.1:9").unwrap();
        assert!(fake.is_own("http://127.0.0.1:9/x"));
        assert!(!fake.is_own("https://www.googleapis.com/x"));
        assert!(!g.is_own("https://bucket.storage.googleapis.com/x"));
        for other in [
            "http://gmail.googleapis.com/x",
            "https://gmail.googleapis.com:8443/x",
            "https://gmail.googleapis.com.evil.example/x",
            "https://evil.example/gmail.googleapis.com",
            "https://user@evil.example/x",
            "/relative",
            "",
        ] {
            assert!(!g.is_own(other), "{other}");
        }
    }

    #[tokio::test]
    async fn chunks_span_the_prefix_and_the_message() {
        let (p, m) = (b"Bcc: x\r\n", b"To: a\r\n\r\nhi\r\n");
        let all: Vec<u8> = [&p[..], &m[..]].concat();
        let m = Outgoing::from_bytes(m.to_vec());
        for cut in 0..all.len() {
            let mut joined = read(&m, p, 0..cut).await.unwrap();
            joined.extend(read(&m, p, cut..all.len()).await.unwrap());
            assert_eq!(joined, all);
        }
    }
}
