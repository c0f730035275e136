//! Fakes of Microsoft Graph (`sendMail`, drafts, attachment upload sessions, send) and the Gmail API
//! (`messages.send`, media and resumable uploads) that enforce the real request shapes and size limits: a bearer
//! token on API calls and none on upload URLs, base64 MIME as `text/plain`, Graph's 4 MB request limit and 150
//! MB message limit, upload chunks in order with `Content-Range` and at most 4 MiB each (Graph) or in multiples
//! of 256 KiB (Gmail), Gmail's 35 MB.
// A refusal is a whole reply template; boxing it would only add noise to a test fake.
#![allow(clippy::result_large_err)]

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use wiremock::matchers::any;
use wiremock::{Mock, MockServer, Request, ResponseTemplate};

/// A message as the fake got it: the MIME, and for a Graph draft, the attachments added separately.
#[derive(Debug, Clone)]
pub struct Sent {
    pub mime: Vec<u8>,
    pub attachments: Vec<Attached>,
    /// Graph: the PATCH of the draft (recipients, extended properties), if any.
    pub patch: Option<serde_json::Value>,
    /// How it came: "sendMail", "draft", "media", "resumable".
    pub path: &'static str,
    pub at: SystemTime,
}

/// An attachment added to a Graph draft.
#[derive(Debug, Clone)]
pub struct Attached {
    pub name: String,
    pub content_type: String,
    pub bytes: Vec<u8>,
    pub inline: bool,
    pub content_id: Option<String>,
    /// "post" (one request, contentBytes) or "upload" (an upload session).
    pub how: &'static str,
}

#[derive(Default)]
struct Draft {
    mime: Vec<u8>,
    patch: Option<serde_json::Value>,
    attachments: Vec<Attached>,
    /// Made with `Prefer: IdType="ImmutableId"`: once sent, the copy in Sent Items keeps its id.
    immutable: bool,
}

#[derive(Default)]
struct Upload {
    draft: String,
    name: String,
    content_type: String,
    size: usize,
    bytes: Vec<u8>,
    /// Graph: the AttachmentItem's isInline and contentId.
    inline: bool,
    content_id: Option<String>,
}

#[derive(Default)]
struct State {
    sent: Vec<Sent>,
    drafts: HashMap<String, Draft>,
    uploads: HashMap<String, Upload>,
    next: usize,
    /// Canned replies for the next send calls (sendMail, draft send, Gmail send).
    script: VecDeque<ResponseTemplate>,
    /// Replies for the next Graph draft sends, given after the draft was sent.
    sent_then: VecDeque<ResponseTemplate>,
    /// Graph: the copies of sent drafts in Sent Items, by the id they keep (made with an immutable id).
    sent_items: std::collections::HashSet<String>,
    /// Graph upload chunks still to hold unanswered (not kept).
    held_graph_chunks: usize,
    /// Replies for the next Graph upload chunks instead of Graph's (the chunk not kept).
    graph_chunk_answers: VecDeque<ResponseTemplate>,
    /// GETs of a sent draft still to answer "not found", as Graph does until it has moved the draft to Sent Items.
    late_copies: usize,
    /// What becomes of the next Gmail resumable chunks.
    chunks: VecDeque<Chunk>,
    /// Replies to the next Gmail status queries, instead of what the session holds.
    status_replies: VecDeque<ResponseTemplate>,
    /// Every request's method and path, in order.
    log: Vec<(String, String, SystemTime)>,
    /// Resumable sessions whose upload is complete: a status query is answered with the send's reply.
    completed: std::collections::HashSet<String>,
    errors: Vec<String>,
}

/// What the fake does with a Gmail resumable chunk, as Google does when it wants an upload resumed or started
/// again.
#[derive(Debug, Clone, Copy)]
pub enum Chunk {
    /// Taken whole: 308 with `Range` for all so far, or the send's reply after the last chunk.
    Taken,
    /// The session is gone (Google's 404 or 410 for an expired one): this status, and the session forgotten.
    Gone(u16),
    /// Only the chunk's first `n` bytes kept: 308 with `Range` for what the session holds (none: no `Range`),
    /// whether or not it was the last chunk.
    Keeps(usize),
    /// Taken whole (after the last chunk: the message sent), but answered with this server error, as when
    /// Google's front end fails after its back end took the bytes. A status query then says what happened.
    TakenButFails(u16),
    /// Taken whole (after the last chunk: the message sent), but its answer is held for [`HELD`]: relay stops
    /// or is killed before it hears it.
    TakenButHeld,
    /// Not kept, and answered by a proxy's page: 200, HTML.
    Page,
    /// Not kept, and its answer held for [`HELD`]: the session holds what it held before.
    Held,
}

/// A proxy's or captive portal's page where the API's answer was due.
pub fn page(status: u16) -> ResponseTemplate {
    ResponseTemplate::new(status).set_body_raw(
        "<html><body>Please sign in to the guest network</body></html>",
        "text/html",
    )
}

/// How long a held answer takes: longer than any test runs.
pub const HELD: std::time::Duration = std::time::Duration::from_secs(600);

pub struct FakeApi {
    pub server: MockServer,
    state: Arc<Mutex<State>>,
}

const GRAPH_REQUEST_LIMIT: usize = 4_000_000;
const GRAPH_CHUNK_LIMIT: usize = 4 * 1024 * 1024;
/// Graph's attachment limits as measured (microsoftgraph/msgraph-sdk-java#52): an upload session refuses less
/// than 2 MiB, a single POST more than 3,145,611 bytes.
const GRAPH_UPLOAD_MIN: usize = 2 * 1024 * 1024;
const GRAPH_POST_MAX: usize = 3_145_611;
const GMAIL_LIMIT: usize = 35 * 1024 * 1024;

/// An error in Graph's shape: `{"error": {"code", "message"}}` with `status`.
pub fn graph_error(status: u16, code: &str, message: &str) -> ResponseTemplate {
    ResponseTemplate::new(status)
        .set_body_json(serde_json::json!({"error": {"code": code, "message": message}}))
}

impl FakeApi {
    /// Starts a fake accepting bearer `token` for `mailbox`.
    pub async fn start(token: &str, mailbox: &str) -> FakeApi {
        let server = MockServer::start().await;
        let state = Arc::new(Mutex::new(State::default()));
        let (st, token, mailbox, uri) = (
            state.clone(),
            token.to_string(),
            mailbox.to_string(),
            server.uri(),
        );
        Mock::given(any())
            .respond_with(move |req: &Request| {
                let mut s = st.lock().unwrap();
                // A Gmail upload with its kind: a small bounce's media upload is not the message's resumable one.
                let path = match req.url.query_pairs().find(|(k, _)| k == "uploadType") {
                    Some((_, kind)) => format!("{}?uploadType={kind}", req.url.path()),
                    None => req.url.path().to_string(),
                };
                s.log
                    .push((req.method.to_string(), path, SystemTime::now()));
                let reply = handle(&mut s, req, &token, &mailbox, &uri);
                if reply.is_err() {
                    let range = req
                        .headers
                        .get("content-range")
                        .and_then(|v| v.to_str().ok());
                    s.errors.push(format!(
                        "{} {} {range:?} ({} bytes)",
                        req.method,
                        req.url,
                        req.body.len()
                    ));
                }
                reply.unwrap_or_else(|r| r)
            })
            .mount(&server)
            .await;
        FakeApi { server, state }
    }

    pub fn uri(&self) -> String {
        self.server.uri()
    }

    /// The next send calls get these replies instead (then the fake works normally again).
    pub fn script(&self, replies: Vec<ResponseTemplate>) {
        self.state.lock().unwrap().script.extend(replies);
    }

    /// The next Graph draft sends send the draft, then answer with these (a 500, an answer held for [`HELD`]).
    pub fn script_sent_then(&self, replies: Vec<ResponseTemplate>) {
        self.state.lock().unwrap().sent_then.extend(replies);
    }

    /// The next `n` GETs of a sent draft find nothing (404 ErrorItemNotFound): its copy is not in Sent Items yet.
    pub fn late_copies(&self, n: usize) {
        self.state.lock().unwrap().late_copies += n;
    }

    /// Sent drafts' copies are found in Sent Items from now on (the `late_copies` left are dropped).
    pub fn copies_now(&self) {
        self.state.lock().unwrap().late_copies = 0;
    }

    /// The next Graph upload chunks get these replies instead, and are not kept.
    pub fn script_graph_chunks(&self, replies: Vec<ResponseTemplate>) {
        self.state
            .lock()
            .unwrap()
            .graph_chunk_answers
            .extend(replies);
    }

    /// The next `n` Graph upload chunks are held unanswered for [`HELD`], and not kept.
    pub fn hold_graph_chunks(&self, n: usize) {
        self.state.lock().unwrap().held_graph_chunks += n;
    }

    /// The next Gmail resumable chunks, in order, meet these (then chunks are taken whole again).
    pub fn script_chunks(&self, chunks: Vec<Chunk>) {
        self.state.lock().unwrap().chunks.extend(chunks);
    }

    /// The next Gmail status queries are answered with these statuses (a proxy's 400, a 401).
    pub fn script_status_replies(&self, statuses: Vec<u16>) {
        self.script_status_answers(
            statuses
                .into_iter()
                .map(|status| graph_error(status, "badRequest", "scripted status reply"))
                .collect(),
        );
    }

    /// The next Gmail status queries get these replies (a 2xx whose body is not Gmail's, say).
    pub fn script_status_answers(&self, replies: Vec<ResponseTemplate>) {
        self.state.lock().unwrap().status_replies.extend(replies);
    }

    /// Waits (bounded) until `n` messages were sent, and returns them.
    pub async fn sent(&self, n: usize) -> Vec<Sent> {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            {
                let s = self.state.lock().unwrap();
                if s.sent.len() >= n {
                    return s.sent.clone();
                }
            }
            if tokio::time::Instant::now() >= deadline {
                let (count, log) = {
                    let s = self.state.lock().unwrap();
                    (s.sent.len(), s.log.clone())
                };
                panic!("{count} sent, {n} expected; requests: {log:?}");
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// Requests (method, path, when) so far.
    pub fn log(&self) -> Vec<(String, String, SystemTime)> {
        self.state.lock().unwrap().log.clone()
    }

    /// Requests the fake refused as malformed.
    pub fn errors(&self) -> Vec<String> {
        self.state.lock().unwrap().errors.clone()
    }

    /// Waits (bounded) until `n` requests whose method and path satisfy `pred` came.
    pub async fn requests(&self, n: usize, pred: impl Fn(&str, &str) -> bool) {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let log = self.log();
            if log.iter().filter(|(m, p, _)| pred(m, p)).count() >= n {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "fewer than {n} such requests; requests: {log:?}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// Google drops every Gmail upload session (as when they expire): status queries to them get 404.
    pub fn drop_gmail_sessions(&self) {
        let mut s = self.state.lock().unwrap();
        s.uploads.retain(|id, _| !id.starts_with('s'));
        s.completed.clear();
    }

    pub fn drafts_left(&self) -> usize {
        self.state.lock().unwrap().drafts.len()
    }
}

type Reply = Result<ResponseTemplate, ResponseTemplate>;

fn handle(s: &mut State, req: &Request, token: &str, mailbox: &str, uri: &str) -> Reply {
    let path = req.url.path().to_string();
    let method = req.method.as_str();
    // Upload URLs carry their own authorization: Graph refuses a bearer token there, Gmail needs it.
    if let Some(rest) = path.strip_prefix("/graph-upload/") {
        if req.headers.contains_key("authorization") {
            return Err(graph_error(
                401,
                "InvalidAuthenticationToken",
                "upload URLs take no Authorization header",
            ));
        }
        return graph_upload(s, req, rest);
    }
    let auth = req
        .headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if auth != format!("Bearer {token}") {
        return Err(graph_error(
            401,
            "InvalidAuthenticationToken",
            "Access token is empty or invalid.",
        ));
    }
    if let Some(rest) = path.strip_prefix(&format!("/v1.0/users/{mailbox}/")) {
        return graph(s, req, rest, uri);
    }
    if path.starts_with("/v1.0/users/") {
        return Err(graph_error(
            404,
            "ErrorInvalidUser",
            "The requested user is invalid.",
        ));
    }
    if path == "/upload/gmail/v1/users/me/messages/send" {
        return gmail_start(s, req, uri);
    }
    if let Some(id) = path.strip_prefix("/gmail-session/") {
        return gmail_chunk(s, req, id);
    }
    let _ = method;
    Err(ResponseTemplate::new(404))
}

fn content_type(req: &Request) -> String {
    req.headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

/// A base64 MIME body as Graph wants it.
fn mime_body(req: &Request) -> Result<Vec<u8>, ResponseTemplate> {
    if !content_type(req).starts_with("text/plain") {
        return Err(graph_error(
            415,
            "UnsupportedMediaType",
            "MIME content must be sent as text/plain",
        ));
    }
    if req.body.len() > GRAPH_REQUEST_LIMIT {
        return Err(graph_error(
            413,
            "RequestBodyTooLarge",
            "The maximum request length supported is 4MB.",
        ));
    }
    B64.decode(&req.body).map_err(|_| {
        graph_error(
            400,
            "ErrorMimeContentInvalidBase64String",
            "Invalid base64 string for MIME content.",
        )
    })
}

fn graph(s: &mut State, req: &Request, rest: &str, uri: &str) -> Reply {
    let method = req.method.as_str();
    let parts: Vec<&str> = rest.split('/').collect();
    match (method, parts.as_slice()) {
        ("POST", ["sendMail"]) => {
            let mime = mime_body(req)?;
            if let Some(r) = s.script.pop_front() {
                return Ok(r);
            }
            s.sent.push(Sent {
                mime,
                attachments: Vec::new(),
                patch: None,
                path: "sendMail",
                at: SystemTime::now(),
            });
            Ok(ResponseTemplate::new(202))
        }
        ("POST", ["messages"]) => {
            let mime = mime_body(req)?;
            s.next += 1;
            let id = format!("AAMkAD{}", s.next);
            // As Graph answers: the message resource, its body as text among its fields (here the whole MIME,
            // and before the id, as a JSON object's keys come in any order).
            let reply = serde_json::json!({
                "@odata.context": "https://graph.microsoft.com/v1.0/$metadata#users('relay')/messages/$entity",
                "body": {"contentType": "text", "content": String::from_utf8_lossy(&mime)},
                "id": id,
                "isDraft": true,
            });
            let immutable = req
                .headers
                .get("prefer")
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v == "IdType=\"ImmutableId\"");
            s.drafts.insert(
                id.clone(),
                Draft {
                    mime,
                    immutable,
                    ..Draft::default()
                },
            );
            Ok(ResponseTemplate::new(201).set_body_json(reply))
        }
        ("PATCH", ["messages", id]) => {
            let body: serde_json::Value = serde_json::from_slice(&req.body)
                .map_err(|_| graph_error(400, "BadRequest", "not JSON"))?;
            let d = s
                .drafts
                .get_mut(*id)
                .ok_or_else(|| graph_error(404, "ErrorItemNotFound", "no such draft"))?;
            d.patch = Some(body.clone());
            Ok(ResponseTemplate::new(200).set_body_json(body))
        }
        ("DELETE", ["messages", id]) => {
            if s.drafts.remove(*id).is_none() && !s.sent_items.remove(*id) {
                return Err(graph_error(404, "ErrorItemNotFound", "no such item"));
            }
            Ok(ResponseTemplate::new(204))
        }
        ("GET", ["messages", id]) => {
            let draft = if s.drafts.contains_key(*id) {
                true
            } else if s.sent_items.contains(*id) && s.late_copies > 0 {
                // Not an error of the request: Graph's answer while the copy is on its way.
                s.late_copies -= 1;
                return Ok(graph_error(
                    404,
                    "ErrorItemNotFound",
                    "The specified object was not found in the store.",
                ));
            } else if s.sent_items.contains(*id) {
                false
            } else {
                return Err(graph_error(
                    404,
                    "ErrorItemNotFound",
                    "The specified object was not found in the store.",
                ));
            };
            Ok(ResponseTemplate::new(200).set_body_json(serde_json::json!({
                "@odata.context": "https://graph.microsoft.com/v1.0/$metadata#users('relay')/messages(isDraft)/$entity",
                "@odata.etag": "W/\"CQAAABYAAAA\"",
                "id": id,
                "isDraft": draft,
            })))
        }
        ("POST", ["messages", id, "attachments", "createUploadSession"]) => {
            if !s.drafts.contains_key(*id) {
                return Err(graph_error(404, "ErrorItemNotFound", "no such draft"));
            }
            let body: serde_json::Value = serde_json::from_slice(&req.body)
                .map_err(|_| graph_error(400, "BadRequest", "not JSON"))?;
            let item = &body["AttachmentItem"];
            let size = item["size"].as_u64().unwrap_or(0) as usize;
            if item["attachmentType"] != "file"
                || item["name"].as_str().is_none_or(str::is_empty)
                || size == 0
                || size > 150 * 1024 * 1024
            {
                return Err(graph_error(400, "BadRequest", "bad AttachmentItem"));
            }
            if size < GRAPH_UPLOAD_MIN {
                return Err(graph_error(
                    400,
                    "ErrorAttachmentSizeShouldNotBeLessThanMinimumSize",
                    "Attachment size must be greater than the minimum size.",
                ));
            }
            s.next += 1;
            let up = format!("up{}", s.next);
            s.uploads.insert(up.clone(), {
                let a = attached(item, Vec::new(), "upload");
                Upload {
                    draft: id.to_string(),
                    name: a.name,
                    content_type: a.content_type,
                    size,
                    bytes: Vec::new(),
                    inline: a.inline,
                    content_id: a.content_id,
                }
            });
            Ok(ResponseTemplate::new(201).set_body_json(serde_json::json!({
                "uploadUrl": format!("{uri}/graph-upload/{up}"),
                "expirationDateTime": "2030-01-01T00:00:00Z",
                "nextExpectedRanges": ["0-"],
            })))
        }
        ("POST", ["messages", id, "attachments"]) => {
            let body: serde_json::Value = serde_json::from_slice(&req.body)
                .map_err(|_| graph_error(400, "BadRequest", "not JSON"))?;
            let bytes = body["contentBytes"]
                .as_str()
                .and_then(|b| B64.decode(b).ok())
                .ok_or_else(|| graph_error(400, "BadRequest", "contentBytes is not base64"))?;
            if body["@odata.type"] != "#microsoft.graph.fileAttachment"
                || body["name"].as_str().is_none_or(str::is_empty)
            {
                return Err(graph_error(400, "BadRequest", "bad fileAttachment"));
            }
            if bytes.len() > GRAPH_POST_MAX {
                return Err(graph_error(
                    413,
                    "ErrorRequestEntityTooLarge",
                    "Request Entity Too Large",
                ));
            }
            let d = s
                .drafts
                .get_mut(*id)
                .ok_or_else(|| graph_error(404, "ErrorItemNotFound", "no such draft"))?;
            let size = bytes.len();
            d.attachments.push(attached(&body, bytes, "post"));
            Ok(ResponseTemplate::new(201).set_body_json(serde_json::json!({
                "@odata.type": "#microsoft.graph.fileAttachment",
                "id": "AAMkADatt",
                "name": body["name"],
                "size": size,
            })))
        }
        ("POST", ["messages", id, "send"]) => {
            if let Some(r) = s.script.pop_front() {
                return Ok(r);
            }
            if s.uploads.values().any(|u| u.draft == *id) {
                return Err(graph_error(
                    400,
                    "ErrorInvalidRequest",
                    "an upload is unfinished",
                ));
            }
            let d = s
                .drafts
                .remove(*id)
                .ok_or_else(|| graph_error(404, "ErrorItemNotFound", "no such draft"))?;
            // A copy in Sent Items, unless the draft asked to be deleted after it is sent.
            let kept = d
                .patch
                .as_ref()
                .is_none_or(|p| p["singleValueExtendedProperties"][0]["value"] != "true");
            if d.immutable && kept {
                s.sent_items.insert(id.to_string());
            }
            s.sent.push(Sent {
                mime: d.mime,
                attachments: d.attachments,
                patch: d.patch,
                path: "draft",
                at: SystemTime::now(),
            });
            Ok(s.sent_then
                .pop_front()
                .unwrap_or_else(|| ResponseTemplate::new(202)))
        }
        _ => Err(graph_error(400, "BadRequest", "unexpected Graph call")),
    }
}

/// An attachment resource's fields (an AttachmentItem or a fileAttachment: the same names).
fn attached(item: &serde_json::Value, bytes: Vec<u8>, how: &'static str) -> Attached {
    Attached {
        name: item["name"].as_str().unwrap_or("").to_string(),
        content_type: item["contentType"].as_str().unwrap_or("").to_string(),
        bytes,
        inline: item["isInline"].as_bool().unwrap_or(false),
        content_id: item["contentId"].as_str().map(str::to_string),
        how,
    }
}

/// `Content-Range: bytes A-B/N`.
fn content_range(req: &Request) -> Option<(usize, usize, usize)> {
    let v = req.headers.get("content-range")?.to_str().ok()?;
    let (range, total) = v.strip_prefix("bytes ")?.split_once('/')?;
    let (a, b) = range.split_once('-')?;
    Some((a.parse().ok()?, b.parse().ok()?, total.parse().ok()?))
}

fn graph_upload(s: &mut State, req: &Request, up: &str) -> Reply {
    let bad = |m: &str| graph_error(400, "InvalidRequest", m);
    if req.method.as_str() != "PUT" {
        return Err(bad("uploads are PUT"));
    }
    if let Some(r) = s.graph_chunk_answers.pop_front() {
        return Ok(r);
    }
    if s.held_graph_chunks > 0 {
        s.held_graph_chunks -= 1;
        return Ok(ResponseTemplate::new(200).set_delay(HELD));
    }
    let (a, b, total) = content_range(req).ok_or_else(|| bad("Content-Range missing"))?;
    let u = s.uploads.get_mut(up).ok_or_else(|| bad("no such upload"))?;
    if req.body.len() > GRAPH_CHUNK_LIMIT
        || a != u.bytes.len()
        || b + 1 - a != req.body.len()
        || total != u.size
        || b >= total
    {
        return Err(bad("chunk out of order, too large or not as announced"));
    }
    u.bytes.extend_from_slice(&req.body);
    if u.bytes.len() < u.size {
        return Ok(ResponseTemplate::new(200).set_body_json(
            serde_json::json!({"nextExpectedRanges": [format!("{}-", u.bytes.len())]}),
        ));
    }
    let u = s.uploads.remove(up).unwrap();
    if let Some(d) = s.drafts.get_mut(&u.draft) {
        d.attachments.push(Attached {
            name: u.name,
            content_type: u.content_type,
            bytes: u.bytes,
            inline: u.inline,
            content_id: u.content_id,
            how: "upload",
        });
    }
    Ok(ResponseTemplate::new(201))
}

fn gmail_start(s: &mut State, req: &Request, uri: &str) -> Reply {
    let query: HashMap<String, String> = req.url.query_pairs().into_owned().collect();
    match query.get("uploadType").map(String::as_str) {
        Some("media") => {
            if content_type(req) != "message/rfc822" {
                return Err(graph_error(400, "badContent", "want message/rfc822"));
            }
            if req.body.len() > GMAIL_LIMIT {
                return Err(ResponseTemplate::new(413));
            }
            gmail_sent(s, req.body.clone(), "media")
        }
        Some("resumable") => {
            let header = |k: &str| {
                req.headers
                    .get(k)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string()
            };
            let size: usize = header("x-upload-content-length").parse().unwrap_or(0);
            if header("x-upload-content-type") != "message/rfc822" || size == 0 {
                return Err(graph_error(400, "badRequest", "resumable start headers"));
            }
            if size > GMAIL_LIMIT {
                return Err(ResponseTemplate::new(413));
            }
            s.next += 1;
            let id = format!("s{}", s.next);
            s.uploads.insert(
                id.clone(),
                Upload {
                    size,
                    ..Upload::default()
                },
            );
            // Google's session URL carries its own credential in the query: relay must never log it.
            Ok(ResponseTemplate::new(200).insert_header(
                "Location",
                format!("{uri}/gmail-session/{id}?upload_id=SECRET-{id}").as_str(),
            ))
        }
        _ => Err(graph_error(400, "badRequest", "uploadType")),
    }
}

fn gmail_chunk(s: &mut State, req: &Request, id: &str) -> Reply {
    let bad = |m: &str| graph_error(400, "badRequest", m);
    // A status query (`Content-Range: bytes */TOTAL`, no body): what the session holds, or the send's answer.
    let range = req
        .headers
        .get("content-range")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if range.starts_with("bytes */") {
        if !req.body.is_empty() {
            return Err(bad("a status query has no body"));
        }
        if let Some(reply) = s.status_replies.pop_front() {
            return Ok(reply);
        }
        if s.completed.contains(id) {
            return Ok(ResponseTemplate::new(200).set_body_json(
                serde_json::json!({"id": "18c0ffee", "threadId": "18c0ffee", "labelIds": ["SENT"]}),
            ));
        }
        // Gone (expired, dropped): Google's answer, not a malformed request.
        let Some(u) = s.uploads.get(id) else {
            return Ok(ResponseTemplate::new(404));
        };
        let resume = ResponseTemplate::new(308);
        return Ok(match u.bytes.len() {
            0 => resume,
            n => resume.insert_header("Range", format!("bytes=0-{}", n - 1).as_str()),
        });
    }
    let (a, b, total) = content_range(req).ok_or_else(|| bad("Content-Range"))?;
    let fate = s.chunks.pop_front().unwrap_or(Chunk::Taken);
    let u = s
        .uploads
        .get_mut(id)
        .ok_or_else(|| bad("no such session"))?;
    let last = b + 1 == total;
    if a != u.bytes.len()
        || b + 1 - a != req.body.len()
        || total != u.size
        || (!last && !req.body.len().is_multiple_of(256 * 1024))
    {
        return Err(bad("chunk out of order or not a multiple of 256 KiB"));
    }
    let kept = match fate {
        Chunk::Gone(status) => {
            s.uploads.remove(id);
            return Ok(ResponseTemplate::new(status));
        }
        Chunk::Keeps(n) => n.min(req.body.len()),
        Chunk::Held | Chunk::Page => 0,
        Chunk::Taken | Chunk::TakenButFails(_) | Chunk::TakenButHeld => req.body.len(),
    };
    u.bytes.extend_from_slice(&req.body[..kept]);
    let failed = match fate {
        Chunk::TakenButFails(status) => Some(ResponseTemplate::new(status)),
        Chunk::TakenButHeld | Chunk::Held => Some(ResponseTemplate::new(503).set_delay(HELD)),
        Chunk::Page => Some(page(200)),
        _ => None,
    };
    if let Some(reply) = failed {
        if u.bytes.len() == u.size {
            let u = s.uploads.remove(id).unwrap();
            s.completed.insert(id.to_string());
            gmail_sent(s, u.bytes, "resumable")?;
        }
        return Ok(reply);
    }
    if u.bytes.len() < u.size {
        let resume = ResponseTemplate::new(308);
        return Ok(match u.bytes.len() {
            0 => resume,
            n => resume.insert_header("Range", format!("bytes=0-{}", n - 1).as_str()),
        });
    }
    let u = s.uploads.remove(id).unwrap();
    s.completed.insert(id.to_string());
    gmail_sent(s, u.bytes, "resumable")
}

fn gmail_sent(s: &mut State, mime: Vec<u8>, path: &'static str) -> Reply {
    if let Some(r) = s.script.pop_front() {
        return Ok(r);
    }
    s.sent.push(Sent {
        mime,
        attachments: Vec::new(),
        patch: None,
        path,
        at: SystemTime::now(),
    });
    Ok(ResponseTemplate::new(200).set_body_json(
        serde_json::json!({"id": "18c0ffee", "threadId": "18c0ffee", "labelIds": ["SENT"]}),
    ))
}
