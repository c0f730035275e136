//! Delivery through Microsoft Graph, for tenants that switched SMTP AUTH off. The queued bytes go as MIME
//! (base64, `Content-Type: text/plain`), unchanged. A message over Graph's 4 MB request limit goes as a draft
//! made from the message without its largest attachments; those are then added to it, decoded from the queued
//! copy (under 3 MB in one request each, larger ones in chunks through upload sessions, as Graph requires), and
//! the draft is sent. Graph takes the recipients from
//! the headers, so when the envelope says otherwise (Bcc), the draft's recipients are set from the envelope.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use secrecy::{ExposeSecret, SecretString};
use serde_json::json;

use super::Outcome;
use super::http::{
    Fault, MAX_REPLY_BODY, base64_len, client, failed, failed_send, json_reply, refusal, streamed,
    streamed_len, time_for,
};
use super::kept::{Draft, ResumePoint};
use super::mime::{self, Field, Leaf, Source};
use super::outgoing::Outgoing;

/// Graph refuses a request body over 4 MB.
pub const REQUEST_LIMIT: usize = 4_000_000;
/// The most of a draft's reply read: the message resource with its body as JSON text (the draft's 4 MB at most,
/// with room for JSON's escapes). It is parsed as it arrives, never held.
const DRAFT_REPLY_LIMIT: u64 = 16 * REQUEST_LIMIT as u64;
/// Graph's largest message with its attachments.
pub const MESSAGE_LIMIT: u64 = 150 * 1024 * 1024;
/// Upload chunks: a multiple of 320 KiB as upload sessions want, under 4 MB.
pub const CHUNK: usize = 12 * 320 * 1024;
/// Attachments under this size go in one request, larger ones through an upload session: Graph's documented
/// split ("under 3 MB"); it refuses an upload session under 2 MiB and a single request over about 3.1 MB.
pub const SMALL_ATTACHMENT: u64 = 3_000_000;
/// MAPI's PR_DELETE_AFTER_SUBMIT: what Graph's own `saveToSentItems: false` sets, which MIME sends cannot pass.
const DELETE_AFTER_SUBMIT: &str = "Boolean 0x0E01";
/// Asks Graph for a draft's immutable id, which it keeps when the draft moves to Sent Items as it is sent (a
/// plain id changes then): so a draft whose `/send` went unanswered can be asked later whether it went. Sent with
/// every request about the draft, since the header applies to the request it is on.
const IMMUTABLE_ID: (&str, &str) = ("Prefer", "IdType=\"ImmutableId\"");
/// How long a question about a draft (is it sent, remove it) may take.
const DRAFT_QUESTION: Duration = Duration::from_secs(30);
/// How long after its `/send` a draft may still read as a draft, or as not there: Graph moves a sent draft to
/// Sent Items once it has gone out, which "may take time" (Microsoft's words). Until then the draft is neither
/// removed nor sent anew: either could send the message twice.
const SEND_SETTLES: Duration = Duration::from_secs(15 * 60);

fn send_settles() -> Duration {
    crate::test_hooks::duration("RELAY_TEST_GRAPH_SEND_SETTLES_MS", SEND_SETTLES)
}

/// Why a draft asked for another account, not sent, leaves the message to that account.
pub const DRAFT_NOT_SENT: &str =
    "Graph: the draft an earlier attempt made was not sent (removed, or gone)";

/// What Graph says of a draft an attempt made.
enum Asked {
    /// No longer a draft: sent.
    Sent,
    /// Still a draft: not sent (yet).
    Draft,
    /// Graph's own "not found": removed by someone, on its way to Sent Items, or sent from a mailbox that keeps no
    /// copy (`save_to_sent_items = false`).
    Gone,
    /// No clear answer.
    Unclear(Outcome),
}

pub struct GraphUpstream {
    http: reqwest::Client,
    base: String,
    mailbox: String,
    save_to_sent_items: bool,
}

impl GraphUpstream {
    pub fn new(graph_url: &str, mailbox: String, save_to_sent_items: bool) -> Result<Self, String> {
        Ok(GraphUpstream {
            http: client().map_err(|e| e.to_string())?,
            base: format!("{graph_url}/v1.0/users/{mailbox}"),
            mailbox,
            save_to_sent_items,
        })
    }

    /// A message within Graph's 4 MB request limit goes whole, as base64 MIME read from the queue file as it is
    /// sent. A larger one is taken apart where
    /// it lies in the queue file: the draft is the message without its largest attachments (at most 4 MB), and
    /// each of those is decoded and uploaded a chunk at a time. So a delivery holds at most a few megabytes,
    /// whatever the message's size ([`super::Transports::memory_for`]).
    ///
    /// `kept`: where the draft's id is kept between attempts (none for `relay test`): a draft an earlier attempt
    /// left (relay stopped or killed while it uploaded, or before it heard `/send`'s answer) is asked first, and
    /// the message counts as delivered if that draft was sent; else it is removed, and a new one made.
    pub async fn send(
        &self,
        token: &SecretString,
        recipients: &[String],
        message: &Outgoing,
        kept: Option<&Arc<dyn ResumePoint>>,
    ) -> Outcome {
        if let Some(kept) = kept
            && let Some(draft) = kept.draft()
        {
            // (Read back from a file: checked as Graph's reply was, since it goes into the request's path.)
            if !usable_id(&draft.id) {
                forget(Some(kept)).await;
            } else if let Err(outcome) = self.earlier_draft(token, &draft, kept).await {
                return outcome;
            }
        }
        // Asked for another account of the route, which sends the message if this draft did not.
        if kept.is_some_and(|k| k.ask_only()) {
            return Outcome::Transient(DRAFT_NOT_SENT.into());
        }
        let size = message.len();
        if size > MESSAGE_LIMIT {
            return Outcome::Permanent(format!(
                "Graph: the message is {size} bytes; Graph takes at most 150 MB"
            ));
        }
        let patch = self.draft_changes(recipients, message.header_block());
        if base64_len(size as usize) <= REQUEST_LIMIT && patch.is_none() {
            return self.send_mime(token, message).await;
        }
        let m = message.clone();
        let taken_apart = tokio::task::spawn_blocking(move || {
            let cut = largest_first(&m)?;
            // Refused before the draft is built: a large message with nothing to cut out would be read whole.
            let kept = m.size() - cut.iter().map(|l| l.cut.len()).sum::<usize>();
            if base64_len(kept) > REQUEST_LIMIT {
                return Ok(Err(kept));
            }
            let draft = without(&m, &cut)?;
            Ok::<_, std::io::Error>(Ok((cut, draft)))
        })
        .await
        .map_err(std::io::Error::other)
        .and_then(|r| r);
        let (cut, draft_mime) = match taken_apart {
            Ok(Ok(parts)) => parts,
            Ok(Err(kept)) => {
                return Outcome::Permanent(format!(
                    "Graph: without the attachments relay can upload on their own (base64, 7bit, 8bit or binary parts), the message is {kept} bytes, {} as base64, over Graph's 4 MB request limit: its body (or a quoted-printable attachment) is too large for Graph; such mail goes through SMTP or the Gmail API",
                    base64_len(kept)
                ));
            }
            Err(e) => return unreadable(e),
        };
        let (id, is_draft) = match self.create_draft(token, &draft_mime).await {
            Ok(made) => made,
            Err(outcome) => return outcome,
        };
        drop(draft_mime);
        // Asked later only if Graph made it a draft, as it does from MIME: were it ever not one, "not a draft"
        // would not mean "sent".
        let kept = kept.filter(|_| is_draft);
        // Kept before anything more is done with it: a stop or a crash from here on leaves the next attempt to
        // find it. (Not kept, the attempt goes on: at worst the draft stays in Drafts, as before drafts were kept.)
        keep(kept, &self.mailbox, &id, None).await;
        let built = async {
            if let Some(p) = &patch {
                self.call(token, reqwest::Method::PATCH, &format!("/messages/{id}"), p)
                    .await?;
            }
            for leaf in &cut {
                self.attach(token, &id, leaf, message).await?;
            }
            Ok(())
        }
        .await;
        let outcome = match built {
            // Posted only once its time is on disk: a crash after it leaves the next attempt to wait for Graph
            // to move a sent draft, not to take it for one never sent (removed, and the message sent again).
            Ok(()) if !keep(kept, &self.mailbox, &id, Some(SystemTime::now())).await => {
                Err((
                    Outcome::Transient(
                        "cannot record in the message's state that its Graph draft is being sent; not sent, tried again"
                            .into(),
                    ),
                    false,
                ))
            }
            Ok(()) => self.send_draft(token, &id).await,
            Err(outcome) => Err((outcome, false)),
        };
        let outcome = match outcome {
            Ok(()) if cut.is_empty() => {
                return Outcome::Delivered(
                    "Graph 202 Accepted (a draft, its recipients set from the envelope)".into(),
                );
            }
            Ok(()) => {
                return Outcome::Delivered(format!(
                    "Graph 202 Accepted (draft with {} attachment(s) added separately)",
                    cut.len()
                ));
            }
            // `/send` got no clear answer: the draft says whether it went, if Graph has moved it yet. Otherwise it
            // is kept, not removed, and the next attempt asks again (removed, a sent draft's copy would go from
            // Sent Items, and sent anew, the message would go twice).
            Err((outcome, true)) if kept.is_some() => match self.ask(token, &id).await {
                Asked::Sent => {
                    return Outcome::Delivered(format!(
                        "Graph sent the draft ({}; the draft, asked, was sent)",
                        outcome.reply()
                    ));
                }
                _ => {
                    let why = format!(
                        "{}; Graph does not say yet whether the draft was sent: it is asked again before the message is sent anew",
                        outcome.reply()
                    );
                    // A wait Graph asked for stands.
                    return match outcome {
                        Outcome::Throttled(_, wait) => Outcome::Throttled(why, wait),
                        _ => Outcome::Transient(why),
                    };
                }
            },
            // Not kept (`relay test`), so never asked: left alone, since it may be the copy in Sent Items.
            Err((outcome, true)) => return outcome,
            // Refused before it was sent: a half-built draft would otherwise stay in the mailbox's Drafts folder
            // at every retry. (A clear refusal of `/send` is taken at its word: the draft is removed.)
            Err((outcome, false)) => outcome,
        };
        if self.remove_draft(token, &id).await {
            forget(kept).await;
        } else {
            // Kept as not sent: the next attempt removes it.
            keep(kept, &self.mailbox, &id, None).await;
        }
        outcome
    }

    /// A request about a draft: every one names the draft by its immutable id (kept in the message's state), so
    /// each carries the bearer token and the `Prefer` header that makes Graph use such ids.
    fn draft_request(
        &self,
        method: reqwest::Method,
        url: String,
        token: &SecretString,
    ) -> reqwest::RequestBuilder {
        self.http
            .request(method, url)
            .bearer_auth(token.expose_secret())
            .header(IMMUTABLE_ID.0, IMMUTABLE_ID.1)
    }

    /// `/send` of a draft: `Err` with whether its answer leaves open that it was sent (no answer, a server error).
    async fn send_draft(&self, token: &SecretString, id: &str) -> Result<(), (Outcome, bool)> {
        let url = format!("{}/messages/{id}/send", self.base);
        let resp = self
            .draft_request(reqwest::Method::POST, url, token)
            .header(reqwest::header::CONTENT_LENGTH, 0)
            .timeout(time_for(0))
            .send()
            .await
            // (`failed`, not `failed_send`: whether it may arrive twice is what the draft is asked.)
            .map_err(|e| (failed("Graph", &e), !e.is_connect() && !e.is_builder()))?;
        let status = resp.status().as_u16();
        if status == 202 && !is_page(&resp) {
            return Ok(());
        }
        // A 429 or 503 with Retry-After was turned away before it was taken; any other 5xx, a 408 or a success
        // that is not Graph's may have been taken.
        let unclear = matches!(status, 200..=299 | 408 | 500..=502 | 504..=599)
            || (status == 503 && resp.headers().get(reqwest::header::RETRY_AFTER).is_none());
        Err((refusal("Graph", resp, diagnose).await, unclear))
    }

    /// The draft an earlier attempt left: `Err` with the outcome when it was sent (delivered) or cannot be told
    /// yet (asked again at the next attempt); else it is removed, and the attempt makes another.
    async fn earlier_draft(
        &self,
        token: &SecretString,
        draft: &Draft,
        kept: &Arc<dyn ResumePoint>,
    ) -> Result<(), Outcome> {
        let id = &draft.id;
        // Its `/send` was posted a short while ago: Graph may not have moved it to Sent Items yet.
        // (Ahead of the clock by more than that, the clock stepped back: not waited for until it catches up.)
        let settling = draft
            .sent_at
            .filter(|at| match SystemTime::now().duration_since(*at) {
                Ok(age) => age < send_settles(),
                Err(ahead) => ahead.duration() < send_settles(),
            });
        let wait = |at: SystemTime, what: &str| {
            Err(Outcome::Transient(format!(
                "Graph: the draft an earlier attempt sent at {} {what}; Graph may not have moved it to Sent Items yet: it is asked again before the message is sent anew",
                humantime::format_rfc3339_seconds(at)
            )))
        };
        match self.ask(token, id).await {
            Asked::Sent => Err(Outcome::Delivered(
                "Graph: the draft an earlier attempt made was sent (found in the mailbox, no longer a draft; not sent again)"
                    .into(),
            )),
            Asked::Draft => match settling {
                Some(at) => wait(at, "is still a draft"),
                None => {
                    // Not removed: said by `remove_draft`; a new draft is made all the same (this one was not sent).
                    self.remove_draft(token, id).await;
                    forget(Some(kept)).await;
                    Ok(())
                }
            },
            Asked::Gone => match settling {
                Some(at) => wait(at, "is not found"),
                None => {
                    forget(Some(kept)).await;
                    Ok(())
                }
            },
            // The token (refreshed, and asked again), Graph busy or away: asked again at the next attempt, since a
            // new draft would send the message twice if this one went.
            Asked::Unclear(outcome @ (Outcome::AuthRejected(_) | Outcome::Throttled(..))) => {
                Err(outcome)
            }
            Asked::Unclear(Outcome::Transient(why)) => Err(Outcome::Transient(format!(
                "cannot ask Graph whether the draft an earlier attempt made was sent (asked again next time): {why}"
            ))),
            // Refused for what relay asked while the draft may have gone: asked again.
            Asked::Unclear(outcome) if settling.is_some() => Err(Outcome::Transient(format!(
                "cannot ask Graph whether the draft an earlier attempt sent was sent (asked again next time): {}",
                outcome.reply()
            ))),
            // Refused for what relay asked (an id Graph does not take): nothing to ask, and the message goes anew.
            Asked::Unclear(outcome) => {
                tracing::warn!(mailbox = %self.mailbox, reply = %outcome.reply(), "Graph does not answer about the draft an earlier attempt left: it is forgotten, and the message sent anew");
                forget(Some(kept)).await;
                Ok(())
            }
        }
    }

    /// Whether a draft relay made was sent.
    async fn ask(&self, token: &SecretString, id: &str) -> Asked {
        let resp = self
            .draft_request(
                reqwest::Method::GET,
                format!("{}/messages/{id}?$select=isDraft", self.base),
                token,
            )
            .timeout(DRAFT_QUESTION)
            .send()
            .await;
        let resp = match resp {
            Ok(r) => r,
            Err(e) => return Asked::Unclear(failed("Graph", &e)),
        };
        match resp.status().as_u16() {
            200 => {
                let reply: Option<serde_json::Value> = json_reply(resp, MAX_REPLY_BODY).await;
                // The item asked for, in Graph's words: a proxy's page or another item says nothing of it.
                let this = reply.as_ref().filter(|r| r["id"].as_str() == Some(id));
                match this.and_then(|r| r["isDraft"].as_bool()) {
                    Some(false) => Asked::Sent,
                    Some(true) => Asked::Draft,
                    None => Asked::Unclear(Outcome::Transient(
                        "Graph: the reply about the draft is not the draft's (a proxy's page?)"
                            .into(),
                    )),
                }
            }
            404 => {
                // Graph's own "not found" only: a proxy's or a wrong host's 404 says nothing of the draft.
                let (code, _) = super::http::error_code(&super::http::error_text(resp).await);
                if code.split(' ').any(|c| c == "ErrorItemNotFound") {
                    Asked::Gone
                } else {
                    Asked::Unclear(Outcome::Transient(format!(
                        "Graph 404 {code}: not Graph's answer about the draft (a proxy?)"
                    )))
                }
            }
            _ => Asked::Unclear(refusal("Graph", resp, diagnose).await),
        }
    }

    /// Removes a draft relay made (never one whose `/send` may have gone: by its immutable id, that would be the
    /// copy in Sent Items); whether it is gone.
    async fn remove_draft(&self, token: &SecretString, id: &str) -> bool {
        let deleted = self
            .draft_request(
                reqwest::Method::DELETE,
                format!("{}/messages/{id}", self.base),
                token,
            )
            .timeout(DRAFT_QUESTION)
            .send()
            .await;
        let why = match deleted {
            Ok(r) if (r.status().is_success() && !is_page(&r)) || r.status().as_u16() == 404 => {
                return true;
            }
            Ok(r) => format!("HTTP {}", r.status().as_u16()),
            Err(e) => e.to_string(),
        };
        // Said, so that a sysadmin who finds drafts with the device's mail in the mailbox knows why.
        tracing::warn!(mailbox = %self.mailbox, error = %why, "cannot remove the half-built draft of a message that did not go: it stays in the mailbox's Drafts folder until an attempt can remove it (the message itself is tried again)");
        false
    }

    /// The message as base64 MIME in one `sendMail` request, read from the queue file as it is sent.
    async fn send_mime(&self, token: &SecretString, message: &Outgoing) -> Outcome {
        let len = streamed_len(message, 0, true);
        let resp = self
            .http
            .post(format!("{}/sendMail", self.base))
            .bearer_auth(token.expose_secret())
            .header(reqwest::header::CONTENT_TYPE, "text/plain")
            .header(reqwest::header::CONTENT_LENGTH, len)
            .body(streamed(message, Vec::new(), true))
            .timeout(time_for(len))
            .send()
            .await;
        match resp {
            Ok(r) if r.status().as_u16() == 202 && !is_page(&r) => {
                Outcome::Delivered("Graph 202 Accepted (sendMail)".into())
            }
            Ok(r) => refusal("Graph", r, diagnose).await,
            Err(e) => failed_send("Graph", &e),
        }
    }

    /// The draft's id, and whether Graph says it is a draft.
    async fn create_draft(
        &self,
        token: &SecretString,
        mime: &[u8],
    ) -> Result<(String, bool), Outcome> {
        let body = B64.encode(mime);
        let len = body.len();
        let resp = self
            .draft_request(
                reqwest::Method::POST,
                format!("{}/messages", self.base),
                token,
            )
            .header(reqwest::header::CONTENT_TYPE, "text/plain")
            .body(body)
            .timeout(time_for(len))
            .send()
            .await
            .map_err(|e| failed("Graph", &e))?;
        if resp.status().as_u16() != 201 {
            return Err(refusal("Graph", resp, diagnose).await);
        }
        draft_id(resp)
            .await
            .filter(|(id, _)| usable_id(id))
            .ok_or_else(|| {
                Outcome::Transient(
                    "Graph: the draft reply has no usable id; a draft may be left in the mailbox's Drafts folder"
                        .into(),
                )
            })
    }

    /// A JSON call whose reply body is not needed.
    async fn call(
        &self,
        token: &SecretString,
        method: reqwest::Method,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<serde_json::Value, Outcome> {
        // Sized for its timeout: a small attachment's JSON is megabytes.
        let body =
            serde_json::to_vec(body).map_err(|e| Outcome::Transient(format!("Graph: {e}")))?;
        let resp = self
            .draft_request(method, format!("{}{path}", self.base), token)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .timeout(time_for(body.len()))
            .body(body)
            .send()
            .await
            .map_err(|e| failed("Graph", &e))?;
        if !resp.status().is_success() {
            return Err(refusal("Graph", resp, diagnose).await);
        }
        // A PATCH answers with the message resource; only an upload session's reply (its URL) is used.
        Ok(json_reply(resp, MAX_REPLY_BODY).await.unwrap_or_default())
    }

    /// One attachment cut out of the draft: under [`SMALL_ATTACHMENT`] in one request (Graph refuses an upload
    /// session for it, "ErrorAttachmentSizeShouldNotBeLessThanMinimumSize"), else through an upload session.
    async fn attach(
        &self,
        token: &SecretString,
        id: &str,
        leaf: &Leaf,
        message: &Outgoing,
    ) -> Result<(), Outcome> {
        let size = read_leaf(leaf, message, |leaf, m| leaf.size(&m)).await?;
        if size < SMALL_ATTACHMENT {
            self.post_attachment(token, id, leaf, message).await
        } else {
            self.upload(token, id, leaf, size, message).await
        }
    }

    /// A small attachment as a fileAttachment resource, its content base64 in the JSON: held whole (a few MB at
    /// most, as the draft itself is).
    async fn post_attachment(
        &self,
        token: &SecretString,
        id: &str,
        leaf: &Leaf,
        message: &Outgoing,
    ) -> Result<(), Outcome> {
        let content = read_leaf(leaf, message, |leaf, m| {
            let mut all = Vec::new();
            for chunk in leaf.chunks(m, CHUNK) {
                all.extend_from_slice(&chunk?);
            }
            Ok(B64.encode(all))
        })
        .await?;
        let mut attachment = json!({
            "@odata.type": "#microsoft.graph.fileAttachment",
            "name": leaf.name,
            "contentType": leaf.content_type,
            "isInline": leaf.inline,
            "contentBytes": content,
        });
        if let Some(cid) = &leaf.content_id {
            attachment["contentId"] = cid.as_str().into();
        }
        self.call(
            token,
            reqwest::Method::POST,
            &format!("/messages/{id}/attachments"),
            &attachment,
        )
        .await
        .map(drop)
    }

    /// One attachment through an upload session, decoded from the queue file a chunk at a time.
    async fn upload(
        &self,
        token: &SecretString,
        id: &str,
        leaf: &Leaf,
        size: u64,
        message: &Outgoing,
    ) -> Result<(), Outcome> {
        let mut item = json!({
            "attachmentType": "file",
            "name": leaf.name,
            "size": size,
            "contentType": leaf.content_type,
            "isInline": leaf.inline,
        });
        if let Some(cid) = &leaf.content_id {
            item["contentId"] = cid.as_str().into();
        }
        let session = self
            .call(
                token,
                reqwest::Method::POST,
                &format!("/messages/{id}/attachments/createUploadSession"),
                &json!({ "AttachmentItem": item }),
            )
            .await?;
        let Some(url) = session["uploadUrl"].as_str() else {
            return Err(Outcome::Transient(
                "Graph: the upload session has no uploadUrl".into(),
            ));
        };
        let mut at = 0u64;
        let mut chunks = leaf.chunks(message.clone(), CHUNK);
        loop {
            // Each chunk is read and decoded on the blocking pool, the iterator handed there and back.
            let (it, next) = tokio::task::spawn_blocking(move || {
                let next = chunks.next();
                (chunks, next)
            })
            .await
            .map_err(|e| unreadable(std::io::Error::other(e)))?;
            chunks = it;
            let Some(chunk) = next else { break };
            let chunk = chunk.map_err(unreadable)?;
            if chunk.is_empty() {
                // A stray last symbol decodes to nothing: there is no range to send.
                continue;
            }
            let len = chunk.len() as u64;
            // The upload URL carries its own authorization; Graph refuses a bearer token on it.
            let resp = self
                .http
                .put(url)
                .header(
                    reqwest::header::CONTENT_RANGE,
                    format!("bytes {at}-{}/{size}", at + len - 1),
                )
                .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
                .timeout(time_for(chunk.len()))
                .body(chunk)
                .send()
                .await
                .map_err(|e| failed("Graph upload", &e))?;
            // Graph answers a chunk before the last with 200 (202 for some upload sessions) and the ranges it
            // expects next, the last with 201 (or 200): another success, or a page (a proxy's), is not its answer,
            // and the draft is built afresh next time.
            let last = at + len == size;
            let status = resp.status().as_u16();
            if resp.status().is_success()
                && (is_page(&resp) || (!last && !matches!(status, 200 | 202)))
            {
                return Err(Outcome::Transient(format!(
                    "Graph upload {status}: not Graph's answer to an upload chunk (a proxy's page?); tried again"
                )));
            }
            if !resp.status().is_success() {
                return Err(refusal("Graph upload", resp, diagnose).await);
            }
            at += len;
        }
        if at != size {
            return Err(Outcome::Permanent(format!(
                "Graph: attachment {} decoded to {at} bytes, not the {size} announced (bad base64)",
                leaf.name
            )));
        }
        Ok(())
    }

    /// What the draft must say that its MIME does not: the envelope's recipients when they differ from the
    /// headers', and no copy in Sent Items when the account says so.
    fn draft_changes(&self, recipients: &[String], header: &[u8]) -> Option<serde_json::Value> {
        let headers = mime::header_recipients(header);
        let envelope: HashSet<String> = recipients.iter().map(|r| r.to_ascii_lowercase()).collect();
        let named: HashSet<&String> = headers.iter().map(|(_, a)| a).collect();
        // Exactly the envelope's addresses, or the envelope's are set: a header's `hans@bücher.example` then goes
        // as the envelope's `hans@xn--bcher-kva.example`, which every server reads.
        let same = named.len() == envelope.len() && envelope.iter().all(|r| named.contains(r));
        let mut patch = serde_json::Map::new();
        if !same {
            // Each in the field the headers name it in, compared as the Gmail API compares them (`address_key`:
            // the same domain in Unicode or in ASCII).
            let keyed: Vec<(Field, String)> = headers
                .iter()
                .map(|(f, a)| (*f, mime::address_key(a)))
                .collect();
            let field = |r: &str| {
                keyed
                    .iter()
                    .find(|(f, a)| a == r && *f != Field::Bcc)
                    .map_or(Field::Bcc, |(f, _)| *f)
            };
            let list = |want: Field| {
                recipients
                    .iter()
                    .filter(|r| field(&mime::address_key(r)) == want)
                    .map(|r| json!({"emailAddress": {"address": mime::written_address(r)}}))
                    .collect::<Vec<_>>()
            };
            patch.insert("toRecipients".into(), list(Field::To).into());
            patch.insert("ccRecipients".into(), list(Field::Cc).into());
            patch.insert("bccRecipients".into(), list(Field::Bcc).into());
        }
        if !self.save_to_sent_items {
            patch.insert(
                "singleValueExtendedProperties".into(),
                json!([{"id": DELETE_AFTER_SUBMIT, "value": "true"}]),
            );
        }
        (!patch.is_empty()).then_some(serde_json::Value::Object(patch))
    }

    /// Where its requests go (for `relay test`'s transcript).
    pub fn endpoint(&self) -> &str {
        &self.base
    }

    pub fn mailbox(&self) -> &str {
        &self.mailbox
    }
}

/// The id of the draft Graph created and whether it says it is a draft (said, or not said), from its reply: the whole message resource, its body as JSON text
/// included, parsed as it arrives on the blocking pool, every other field skipped without being kept. So the
/// reply costs a read buffer, whatever the draft's body.
async fn draft_id(resp: reqwest::Response) -> Option<(String, bool)> {
    use futures_util::TryStreamExt;
    use std::io::Read;
    #[derive(serde::Deserialize)]
    struct Made {
        id: String,
        #[serde(rename = "isDraft")]
        is_draft: Option<bool>,
    }
    let body = resp.bytes_stream().map_err(std::io::Error::other);
    let reader = tokio_util::io::SyncIoBridge::new(tokio_util::io::StreamReader::new(body));
    tokio::task::spawn_blocking(move || {
        let reader = std::io::BufReader::new(reader).take(DRAFT_REPLY_LIMIT);
        serde_json::from_reader::<_, Made>(reader)
            .ok()
            .map(|d| (d.id, d.is_draft != Some(false)))
    })
    .await
    .ok()
    .flatten()
}

/// Whether a draft id can go into a request's path as it is. (Graph's ids are base64url, about 150 characters.)
fn usable_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 1024 && !id.contains(['/', '?', '#', '%'])
}

/// An HTML page where Graph answers with JSON or nothing: a proxy's or a captive portal's, not Graph's answer.
fn is_page(resp: &reqwest::Response) -> bool {
    resp.headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|t| t.to_str().ok())
        .is_some_and(|t| t.trim_start().to_ascii_lowercase().starts_with("text/html"))
}

/// Keeps the draft's id (and when its `/send` was posted) in the message's state, where there is one: written
/// and flushed on the blocking pool, off the runtime's threads. Whether it is on disk (or there is nowhere to keep
/// it).
async fn keep(
    kept: Option<&Arc<dyn ResumePoint>>,
    mailbox: &str,
    id: &str,
    sent_at: Option<SystemTime>,
) -> bool {
    let draft = Draft {
        id: id.to_string(),
        sent_at,
    };
    match store(kept, Some(draft)).await {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(mailbox = %mailbox, error = %e, "cannot keep the Graph draft's id in the message's state: should relay stop before the message goes, the draft is not asked about (it may stay in the mailbox's Drafts folder)");
            false
        }
    }
}

/// Forgets the account's kept draft: removed, gone, or not one relay can ask about.
async fn forget(kept: Option<&Arc<dyn ResumePoint>>) {
    if let Err(e) = store(kept, None).await {
        tracing::warn!(error = %e, "cannot write the message's state after its Graph draft was removed");
    }
}

async fn store(kept: Option<&Arc<dyn ResumePoint>>, draft: Option<Draft>) -> std::io::Result<()> {
    let Some(k) = kept.cloned() else {
        return Ok(());
    };
    tokio::task::spawn_blocking(move || k.keep_draft(draft))
        .await
        .map_err(std::io::Error::other)
        .and_then(|r| r)
}

/// `read` on an attachment of the queue file, on the blocking pool.
async fn read_leaf<T: Send + 'static>(
    leaf: &Leaf,
    message: &Outgoing,
    read: impl FnOnce(Leaf, Outgoing) -> std::io::Result<T> + Send + 'static,
) -> Result<T, Outcome> {
    let (leaf, m) = (leaf.clone(), message.clone());
    tokio::task::spawn_blocking(move || read(leaf, m))
        .await
        .map_err(std::io::Error::other)
        .and_then(|r| r)
        .map_err(unreadable)
}

fn unreadable(e: std::io::Error) -> Outcome {
    Outcome::Transient(format!("cannot read the queue file: {e}"))
}

/// The attachments to upload separately: the largest, until what is left fits in one request.
fn largest_first<S: Source + ?Sized>(message: &S) -> std::io::Result<Vec<Leaf>> {
    let mut leaves = mime::leaves(message)?;
    leaves.sort_by_key(|l| std::cmp::Reverse(l.cut.len()));
    let mut left = message.size();
    let mut cut = Vec::new();
    for l in leaves {
        if base64_len(left) <= REQUEST_LIMIT {
            break;
        }
        left -= l.cut.len();
        cut.push(l);
    }
    cut.sort_by_key(|l| l.cut.start);
    Ok(cut)
}

/// The message without the given parts (in order, not overlapping: leaves never contain each other).
fn without<S: Source + ?Sized>(message: &S, cut: &[Leaf]) -> std::io::Result<Vec<u8>> {
    let kept = message.size() - cut.iter().map(|l| l.cut.len()).sum::<usize>();
    let mut out = Vec::with_capacity(kept);
    let mut at = 0;
    for l in cut {
        out.extend_from_slice(&message.read(at..l.cut.start)?);
        at = l.cut.end;
    }
    out.extend_from_slice(&message.read(at..message.size())?);
    Ok(out)
}

/// Graph's refusals, in words that name the fix, and whose they are.
fn diagnose(status: u16, code: &str) -> Option<(&'static str, Fault)> {
    let has = |w: &str| code.split(' ').any(|c| c.eq_ignore_ascii_case(w));
    Some(if has("ErrorSendAsDenied") || has("SendAsDenied") {
        // The message's From:, which another device's message may not share: given up, as SMTP's 5.2.252 is.
        (
            "the mailbox may not send as the message's From: address: set rewrite_from = \"header\" for this account, or grant the mailbox Send As rights for that address",
            Fault::Message,
        )
    } else if has("ErrorAccessDenied") || (status == 403 && code.is_empty()) {
        (
            "the app may not send from this mailbox: grant it the Mail.Send permission (application permission for client credentials) and admin consent, and check any application access policy that limits it to some mailboxes",
            Fault::Account,
        )
    } else if has("ErrorMessageSubmissionBlocked") {
        // Exchange Online's restriction of a mailbox that sent spam (SMTP's 5.1.8): every message of the
        // account would be refused, none is at fault.
        (
            "the mailbox is blocked from sending (Microsoft restricts a mailbox that sent what it took for spam): an admin releases it in the Microsoft Defender portal, Restricted entities; mail waits until then",
            Fault::Account,
        )
    } else if has("ErrorSubmissionQuotaExceeded") {
        (
            "the mailbox's sending limit is used up (Exchange Online: recipients per day); mail waits and goes when the limit frees, or lower this account's rate",
            Fault::Account,
        )
    } else if has("MailboxNotEnabledForRESTAPI")
        || has("MailboxNotFound")
        || has("ErrorInvalidUser")
    {
        // The user in the request's URL, the sending mailbox: a recipient Graph cannot use is ErrorInvalidRecipients.
        (
            "the mailbox is not an Exchange Online mailbox Graph can send from (no licence, on-premises, or a wrong `mailbox`)",
            Fault::Account,
        )
    } else if has("ErrorQuotaExceeded") {
        // The sending mailbox's storage (Exchange: "Mailbox has exceeded maximum mailbox size"), which the copies in
        // Sent Items fill: every message would be refused, none is at fault. Before 413, the status it may come with.
        (
            "the sending mailbox is over its storage quota: free space in it (Sent Items, Deleted Items), raise its quota, or set save_to_sent_items = false for this account; mail waits until then",
            Fault::Account,
        )
    } else if has("ErrorMessageSizeExceeded") || status == 413 {
        (
            "the message is larger than the mailbox's size limit",
            Fault::Message,
        )
    } else if has("ErrorInvalidRecipients") {
        ("a recipient address is not valid", Fault::Message)
    } else if has("InvalidAuthenticationToken") {
        (
            "the token was refused: it may be for the wrong resource (Graph needs https://graph.microsoft.com scopes)",
            Fault::Account,
        )
    } else if status == 403 {
        // Forbidden with a code not above (`Authorization_RequestDenied`, a policy's own): what the app or the
        // mailbox may do, the same for every message, as the Gmail API's unknown 403s are taken.
        (
            "Graph forbids this app or mailbox to send: check the app's Mail.Send permission and admin consent, and any policy on the mailbox; mail waits until then",
            Fault::Account,
        )
    } else {
        return None;
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_largest_attachments_go_until_the_rest_fits() {
        let big = "QUFB".repeat(1_100_000); // 4.4 MB of base64
        let small = "QkJC".repeat(10);
        let msg = format!(
            "Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nhi\r\n--b\r\nContent-Type: application/pdf; name=a.pdf\r\nContent-Transfer-Encoding: base64\r\n\r\n{big}\r\n--b\r\nContent-Type: image/png; name=s.png\r\nContent-Transfer-Encoding: base64\r\n\r\n{small}\r\n--b--\r\n"
        );
        let cut = largest_first(&msg.as_bytes()).unwrap();
        assert_eq!(cut.len(), 1);
        assert_eq!(cut[0].name, "a.pdf");
        assert_eq!(cut[0].size(&msg.as_bytes()).unwrap(), 3_300_000);
        let rest = String::from_utf8(without(&msg.as_bytes(), &cut).unwrap()).unwrap();
        assert!(rest.contains("s.png") && !rest.contains("a.pdf"));
        assert!(rest.ends_with("--b--\r\n"));
    }

    /// The sending mailbox's settings wait; a recipient, the size or the From: address is the message's.
    #[test]
    fn whose_refusal() {
        let fault = |status, code| diagnose(status, code).map(|(_, f)| f);
        for (status, code) in [
            (403, "ErrorAccessDenied"),
            (403, ""),
            (404, "MailboxNotEnabledForRESTAPI"),
            (404, "ErrorInvalidUser"),
            (403, "ErrorMessageSubmissionBlocked"),
            (400, "ErrorMessageSubmissionBlocked"),
            (429, "ErrorSubmissionQuotaExceeded"),
            (413, "ErrorQuotaExceeded"),
            (403, "ErrorQuotaExceeded"),
            (403, "Authorization_RequestDenied"),
        ] {
            assert_eq!(fault(status, code), Some(Fault::Account), "{status} {code}");
        }
        for (status, code) in [
            (400, "ErrorInvalidRecipients"),
            (413, ""),
            (403, "ErrorSendAsDenied"),
        ] {
            assert_eq!(fault(status, code), Some(Fault::Message), "{status} {code}");
        }
    }

    /// A header's Unicode domain is the envelope's punycode one: the same recipient, set in ASCII and kept in
    /// To:, not moved to Bcc with To: emptied.
    #[test]
    fn a_unicode_domain_in_the_headers_is_the_envelopes_ascii_one() {
        let g = GraphUpstream::new("https://graph.test", "box@example.com".into(), true).unwrap();
        let msg = "To: Hans <hans@bücher.example>\r\n\r\nhi\r\n".as_bytes();
        let p = g
            .draft_changes(&["hans@xn--bcher-kva.example".into()], msg)
            .unwrap();
        assert_eq!(
            p["toRecipients"][0]["emailAddress"]["address"],
            "hans@xn--bcher-kva.example"
        );
        assert_eq!(p["bccRecipients"].as_array().unwrap().len(), 0);
    }

    #[test]
    fn the_draft_carries_the_envelope_when_the_headers_differ() {
        let g = GraphUpstream::new("https://graph.test", "box@example.com".into(), true).unwrap();
        let msg = b"To: a@example.com\r\nCc: C <c@example.com>\r\n\r\nhi\r\n";
        assert!(
            g.draft_changes(&["a@example.com".into(), "C@example.com".into()], msg)
                .is_none()
        );
        let p = g
            .draft_changes(&["a@example.com".into(), "hidden@example.com".into()], msg)
            .unwrap();
        assert_eq!(
            p["toRecipients"][0]["emailAddress"]["address"],
            "a@example.com"
        );
        assert_eq!(p["ccRecipients"].as_array().unwrap().len(), 0);
        assert_eq!(
            p["bccRecipients"][0]["emailAddress"]["address"],
            "hidden@example.com"
        );
        let g = GraphUpstream::new("https://graph.test", "box@example.com".into(), false).unwrap();
        let p = g
            .draft_changes(&["a@example.com".into(), "c@example.com".into()], msg)
            .unwrap();
        assert_eq!(
            p["singleValueExtendedProperties"][0]["id"],
            DELETE_AFTER_SUBMIT
        );
        assert!(p.get("toRecipients").is_none());
    }
}
