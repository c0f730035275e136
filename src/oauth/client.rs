//! Token endpoint requests (RFC 6749 section 4.4 and 6, RFC 8628).
//!
//! Written over reqwest rather than with the oauth2 crate: each grant here is one form POST and one JSON reply,
//! and the crate's device flow expects `verification_uri` where Google sends `verification_url`, so we would
//! be working around it in the flow that most needs to be clear to users.

use std::time::{Duration, SystemTime};

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use super::OAuthError;

/// Tokens as the endpoint issued them.
#[derive(Debug, Clone)]
pub struct Grant {
    pub access_token: SecretString,
    pub expires_at: SystemTime,
    pub refresh_token: Option<SecretString>,
}

/// What `relay authorize` shows the user, and what it polls with.
#[derive(Debug, Clone)]
pub struct DeviceAuthorization {
    pub device_code: SecretString,
    pub user_code: String,
    pub verification_uri: String,
    pub expires_in: Duration,
    pub interval: Duration,
    pub message: Option<String>,
}

/// One step of device-code polling.
#[derive(Debug)]
pub enum DevicePoll {
    Granted(Grant),
    /// `authorization_pending`: ask again after the interval.
    Pending,
    /// `slow_down`: ask again, 5 seconds more apart (RFC 8628 section 3.5).
    SlowDown,
}

#[derive(Deserialize)]
struct TokenReply {
    access_token: String,
    expires_in: Option<serde_json::Value>,
    refresh_token: Option<String>,
}

/// Longest token reply read: real ones are a few KiB; a misbehaving endpoint must not fill memory.
const MAX_REPLY: usize = 1 << 20;

/// Bounds on durations that come from the network. A token that claims to live longer is still renewed daily;
/// one that claims to be dead already (0, negative) is used for a minute rather than renewed in a tight loop.
const TOKEN_LIFETIME: (Duration, Duration) = (Duration::from_secs(60), Duration::from_secs(86_400));
const DEVICE_CODE_LIFETIME: (Duration, Duration) = (Duration::ZERO, Duration::from_secs(3600));
const POLL_INTERVAL: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(60));

/// A duration in seconds as providers send it, clamped to `bounds`: a JSON number (integer or not, negative,
/// or far past any clock) or a string holding one (Azure AD's v1 endpoint sends `"3599"`). Anything else, or
/// nothing, is `default`.
fn seconds(
    v: Option<&serde_json::Value>,
    default: Duration,
    bounds: (Duration, Duration),
) -> Duration {
    let n = match v {
        Some(serde_json::Value::Number(n)) => n.as_f64(),
        Some(serde_json::Value::String(s)) => s.trim().parse::<f64>().ok(),
        _ => None,
    };
    match n {
        Some(n) if n.is_nan() => default,
        // Saturating: f64 comparisons first, so no conversion can overflow.
        Some(n) if n <= bounds.0.as_secs_f64() => bounds.0,
        Some(n) if n >= bounds.1.as_secs_f64() => bounds.1,
        Some(n) => Duration::from_secs_f64(n),
        None => default,
    }
}

/// Parses a token endpoint's success reply. Public for the fuzz target: whatever the bytes, this returns.
pub fn parse_token_reply(body: &[u8], before: SystemTime) -> Result<Grant, OAuthError> {
    let t: TokenReply =
        serde_json::from_slice(body).map_err(|e| OAuthError::Malformed(described(&e)))?;
    grant(t, before)
}

/// A reply that did not parse, in words that never quote it: serde quotes a string it did not expect (`invalid
/// type: string "eyJ0…"`), and in a token endpoint's reply that string may be the token.
fn described(e: &serde_json::Error) -> String {
    let text = e.to_string();
    if !text.contains('"') {
        return text;
    }
    let at = format!("at line {} column {}", e.line(), e.column());
    match e.classify() {
        serde_json::error::Category::Data => {
            format!("JSON, but not a token reply's shape (a value of another type {at})")
        }
        serde_json::error::Category::Syntax => format!("not valid JSON ({at})"),
        serde_json::error::Category::Eof => format!("JSON cut short ({at})"),
        serde_json::error::Category::Io => format!("unreadable ({at})"),
    }
}

#[derive(Deserialize)]
struct ErrorReply {
    error: String,
    error_description: Option<String>,
}

#[derive(Deserialize)]
struct DeviceReply {
    device_code: String,
    user_code: String,
    // RFC 8628 says verification_uri; Google says verification_url.
    #[serde(alias = "verification_url")]
    verification_uri: String,
    expires_in: Option<serde_json::Value>,
    interval: Option<serde_json::Value>,
    message: Option<String>,
}

/// A client for one account's token endpoint.
#[derive(Clone)]
pub struct TokenClient {
    http: reqwest::Client,
    pub token_url: String,
    pub client_id: String,
    pub client_secret: Option<SecretString>,
    pub scope: String,
    /// Authenticates with a signed assertion (private_key_jwt) instead of a secret.
    pub certificate: Option<std::sync::Arc<super::assertion::ClientCertificate>>,
    /// Send the secret in an HTTP Basic header (client_secret_basic) rather than in the form.
    pub basic_auth: bool,
}

impl TokenClient {
    pub fn new(
        http: reqwest::Client,
        token_url: String,
        client_id: String,
        client_secret: Option<SecretString>,
        scope: String,
    ) -> Self {
        TokenClient {
            http,
            token_url,
            client_id,
            client_secret,
            scope,
            certificate: None,
            basic_auth: false,
        }
    }

    /// The client credentials grant (app-only).
    pub async fn client_credentials(&self) -> Result<Grant, OAuthError> {
        self.token(&[("grant_type", "client_credentials"), ("scope", &self.scope)])
            .await
    }

    /// The refresh token grant. Microsoft rotates refresh tokens: the grant may carry a new one.
    pub async fn refresh(&self, refresh_token: &SecretString) -> Result<Grant, OAuthError> {
        self.token(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh_token.expose_secret()),
            ("scope", &self.scope),
        ])
        .await
    }

    /// The authorization code grant, with the PKCE verifier (RFC 7636 section 4.5).
    pub async fn exchange_code(
        &self,
        code: &str,
        redirect_uri: &str,
        verifier: &str,
    ) -> Result<Grant, OAuthError> {
        self.token(&[
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", redirect_uri),
            ("code_verifier", verifier),
        ])
        .await
    }

    /// The resource owner password grant (RFC 6749 section 4.3). Breaks with MFA and Conditional Access.
    pub async fn password(
        &self,
        username: &str,
        password: &SecretString,
    ) -> Result<Grant, OAuthError> {
        self.token(&[
            ("grant_type", "password"),
            ("username", username),
            ("password", password.expose_secret()),
            ("scope", &self.scope),
        ])
        .await
    }

    /// The JWT bearer grant (RFC 7523 section 2.1): Google service accounts. No client authentication.
    pub async fn jwt_bearer(&self, assertion: &str) -> Result<Grant, OAuthError> {
        let form = [
            ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
            ("assertion", assertion),
        ];
        let before = SystemTime::now();
        let t: TokenReply = self.post(&self.token_url, &form).await?;
        grant(t, before)
    }

    /// Starts the device authorization grant.
    pub async fn device_start(&self, device_url: &str) -> Result<DeviceAuthorization, OAuthError> {
        let form = [
            ("client_id", self.client_id.as_str()),
            ("scope", &self.scope),
        ];
        let d: DeviceReply = self.post(device_url, &form).await?;
        Ok(DeviceAuthorization {
            device_code: SecretString::from(d.device_code),
            user_code: d.user_code,
            verification_uri: d.verification_uri,
            expires_in: seconds(
                d.expires_in.as_ref(),
                Duration::from_secs(900),
                DEVICE_CODE_LIFETIME,
            ),
            interval: seconds(d.interval.as_ref(), Duration::from_secs(5), POLL_INTERVAL),
            message: d.message,
        })
    }

    /// Asks once whether the user has approved the device code.
    pub async fn device_poll(
        &self,
        device: &DeviceAuthorization,
    ) -> Result<DevicePoll, OAuthError> {
        let result = self
            .token(&[
                ("grant_type", "urn:ietf:params:oauth:grant-type:device_code"),
                ("device_code", device.device_code.expose_secret()),
            ])
            .await;
        match result {
            Ok(grant) => Ok(DevicePoll::Granted(grant)),
            Err(OAuthError::Endpoint { error, .. }) if error == "authorization_pending" => {
                Ok(DevicePoll::Pending)
            }
            Err(OAuthError::Endpoint { error, .. }) if error == "slow_down" => {
                Ok(DevicePoll::SlowDown)
            }
            Err(e) => Err(e),
        }
    }

    /// One form POST; a JSON reply on success, the endpoint's OAuth error otherwise.
    async fn post<T: serde::de::DeserializeOwned>(
        &self,
        url: &str,
        form: &[(&str, &str)],
    ) -> Result<T, OAuthError> {
        let mut request = self.http.post(url).form(form);
        let enc = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
        // An endpoint's error may quote the request (debug proxies and firewall pages echo it), and its words go
        // to the log, the queue's state and `relay status`: every value sent but the few that are not secret is
        // cut out of them.
        let mut secrets: Vec<String> = form
            .iter()
            .filter(|(k, _)| !PUBLIC_FIELDS.contains(k))
            .flat_map(|(_, v)| [v.to_string(), enc(v)])
            .collect();
        if self.basic_auth
            && url == self.token_url
            && let Some(secret) = &self.client_secret
        {
            secrets.push(secret.expose_secret().to_string());
            // RFC 6749 section 2.3.1: both parts form-urlencoded before the Basic encoding.
            let (id, secret) = (enc(&self.client_id), enc(secret.expose_secret()));
            {
                use base64::Engine;
                let header =
                    base64::engine::general_purpose::STANDARD.encode(format!("{id}:{secret}"));
                secrets.push(header);
            }
            secrets.push(secret.clone());
            request = request.basic_auth(id, Some(secret));
        }
        let mut reply = request.send().await?;
        let status = reply.status();
        let content_type = reply
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("no content type")
            .to_string();
        let mut body = Vec::new();
        while let Some(chunk) = reply.chunk().await? {
            if body.len() + chunk.len() > MAX_REPLY {
                return Err(OAuthError::Malformed(format!(
                    "reply over {MAX_REPLY} bytes (HTTP {status})"
                )));
            }
            body.extend_from_slice(&chunk);
        }
        if !status.is_success() {
            let body = quotable(&String::from_utf8_lossy(&body), &secrets);
            // Again for each part quoted: a description may itself hold escaped text.
            return Err(match endpoint_error(status.as_u16(), body.as_bytes()) {
                OAuthError::Endpoint {
                    status,
                    error,
                    description,
                } => OAuthError::Endpoint {
                    status,
                    error: quotable(&error, &secrets),
                    description: quotable(&description, &secrets),
                },
                // A page in place of an OAuth error, whatever its status: a gateway's 502 as much as a portal's 200.
                OAuthError::Http { status, body } if html_page(&content_type, &body) => {
                    OAuthError::Http {
                        status,
                        body: format!(
                            "{} (a page, not the identity provider's JSON: a proxy or a firewall may be answering in its place)",
                            quotable(&body, &secrets)
                        ),
                    }
                }
                OAuthError::Http { status, body } => OAuthError::Http {
                    status,
                    body: quotable(&body, &secrets),
                },
                other => other,
            });
        }
        serde_json::from_slice(&body).map_err(|e| {
            let e = quotable(&described(&e), &secrets);
            OAuthError::Malformed(
                match not_json(status.as_u16(), &content_type, &body, &secrets) {
                    Some(what) => format!("{what} ({e})"),
                    None => e,
                },
            )
        })
    }

    async fn token(&self, params: &[(&str, &str)]) -> Result<Grant, OAuthError> {
        let mut form: Vec<(&str, &str)> = params.to_vec();
        form.push(("client_id", &self.client_id));
        let assertion;
        if let Some(cert) = &self.certificate {
            assertion = cert
                .assertion(&self.client_id, &self.token_url)
                .map_err(OAuthError::Signing)?;
            form.push((
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            ));
            form.push(("client_assertion", &assertion));
        } else if let Some(secret) = &self.client_secret
            && !self.basic_auth
        {
            form.push(("client_secret", secret.expose_secret()));
        }
        let before = SystemTime::now();
        let t: TokenReply = self.post(&self.token_url, &form).await?;
        grant(t, before)
    }
}

/// The grant a success reply holds; an empty `access_token` is no token (sent, it would be `auth=Bearer ` with
/// nothing after it, and the account taken for renewed).
fn grant(t: TokenReply, before: SystemTime) -> Result<Grant, OAuthError> {
    if t.access_token.trim().is_empty() {
        return Err(OAuthError::Malformed("empty access_token".into()));
    }
    Ok(Grant {
        access_token: SecretString::from(t.access_token),
        // Counted from before the request, so that a slow reply never makes a token look fresher than it is.
        expires_at: before
            + seconds(
                t.expires_in.as_ref(),
                Duration::from_secs(3600),
                TOKEN_LIFETIME,
            ),
        refresh_token: t.refresh_token.map(SecretString::from),
    })
}

/// Form fields whose values are not secret: the rest (client secret, refresh token, authorization code, PKCE
/// verifier, device code, password, signed assertion) never appear in what relay says about a reply.
const PUBLIC_FIELDS: [&str; 6] = [
    "grant_type",
    "client_id",
    "scope",
    "client_assertion_type",
    "redirect_uri",
    "username",
];

/// What a success reply that is not JSON at all looks like: a proxy, a firewall or a captive portal answering
/// in the identity provider's place sends an HTML page, whose first words name it. Only such a page is quoted
/// (cut short after the request's secrets are cut out of it): a reply that starts as JSON, a form-encoded one
/// (`access_token=…`, as some providers answer) or XML may hold a token.
fn not_json(status: u16, content_type: &str, body: &[u8], secrets: &[String]) -> Option<String> {
    let text = String::from_utf8_lossy(body);
    let text = trim_json_start(&text);
    if text.starts_with(['{', '[']) {
        return None;
    }
    if text.is_empty() {
        return Some(format!(
            "HTTP {status} with {content_type} and an empty body"
        ));
    }
    if !html_page(content_type, text) {
        return Some(format!(
            "HTTP {status} with {content_type}, not JSON (not shown: it may hold a token)"
        ));
    }
    let start: String = quotable(text, secrets)
        .chars()
        .take(120)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let start = start.split_whitespace().collect::<Vec<_>>().join(" ");
    Some(format!(
        "HTTP {status} with {content_type}, not JSON: \"{start}…\"; a proxy or a firewall may be answering in the identity provider's place"
    ))
}

/// Whether a reply is an HTML page (by its content type, or by its first words).
fn html_page(content_type: &str, text: &str) -> bool {
    let opening: String = trim_json_start(text)
        .chars()
        .take(16)
        .collect::<String>()
        .to_ascii_lowercase();
    content_type.to_ascii_lowercase().starts_with("text/html")
        || opening.starts_with("<!doctype html")
        || opening.starts_with("<html")
}

/// Leading whitespace and a byte order mark, which some Windows gateways put before their JSON.
fn trim_json_start(text: &str) -> &str {
    text.trim_start_matches(|c: char| c.is_whitespace() || c == '\u{feff}')
}

/// What relay may say of a reply (or part of one) to a request that carried `secrets`: the text with each
/// secret cut out, whatever encoding the endpoint chose. A gateway that echoes the request may escape a secret's
/// characters (`\/`, `\u002B` in JSON from PHP and .NET, `%2b`, `&#43;`), so the literal cut is not enough:
/// - a JSON reply is rebuilt from its decoded strings (keys too), each with the secrets cut out, so that what
///   is left of it is still readable;
/// - whatever still holds a secret once decoded (JSON escapes, percent escapes, HTML entities, nested) is not
///   quoted at all.
fn quotable(text: &str, secrets: &[String]) -> String {
    let mut out = redact(text, secrets);
    if let Ok(mut value) = serde_json::from_str::<serde_json::Value>(trim_json_start(text)) {
        redact_json(&mut value, secrets);
        if let Ok(rebuilt) = serde_json::to_string(&value) {
            // Again on the whole: a secret could span two strings.
            out = redact(&rebuilt, secrets);
        }
    }
    if holds_encoded_secret(&out, secrets) {
        return WITHHELD.to_string();
    }
    out
}

/// In place of a reply that quotes a secret relay sent in a form it cannot cut out.
const WITHHELD: &str = "[not shown: it quotes, encoded, a secret relay sent]";

fn redact_json(value: &mut serde_json::Value, secrets: &[String]) {
    use serde_json::Value;
    match value {
        Value::String(s) => *s = redact(s, secrets),
        Value::Array(items) => items.iter_mut().for_each(|v| redact_json(v, secrets)),
        Value::Object(map) => {
            let entries = std::mem::take(map);
            for (key, mut v) in entries {
                redact_json(&mut v, secrets);
                map.insert(redact(&key, secrets), v);
            }
        }
        Value::Null | Value::Bool(_) | Value::Number(_) => {}
    }
}

/// Whether `text`, decoded by JSON's, HTML's and URLs' escapes in turn (up to three layers deep: a JSON string
/// holding a form body holding…), holds a secret, as it is or base64-encoded (once or twice).
fn holds_encoded_secret(text: &str, secrets: &[String]) -> bool {
    let secrets: Vec<&String> = secrets.iter().filter(|s| s.len() >= MIN_SECRET).collect();
    // Base64 once, and base64 of base64 (a gateway's echo of a request that carried the body encoded already).
    let cores: Vec<String> = secrets
        .iter()
        .flat_map(|s| base64_cores(s))
        .flat_map(|core| {
            let mut twice = base64_cores(&core);
            twice.push(core);
            twice
        })
        .collect();
    let found =
        |t: &str| secrets.iter().any(|s| t.contains(s.as_str())) || holds_base64_core(t, &cores);
    if found(text) {
        return true;
    }
    let mut view = text.to_string();
    for _ in 0..3 {
        let before = view.clone();
        for decode in [json_unescape, html_unescape, percent_decode] {
            let next = decode(&view);
            if next != view {
                if found(&next) {
                    return true;
                }
                view = next;
            }
        }
        if view == before {
            break;
        }
    }
    false
}

/// What base64 text holding `secret` must contain, for each of the three offsets the secret can have in it (a
/// gateway may echo the request body base64-encoded: AWS API Gateway's `isBase64Encoded`). The characters that
/// also carry bits of the bytes around the secret differ from one encoding to the next; those between are fixed.
/// Encoding the secret keeps the check linear in the reply; decoding every run of the reply's base64 alphabet
/// from every offset, and each result again, did not.
fn base64_cores(secret: &str) -> Vec<String> {
    use base64::Engine;
    (0..3)
        .filter_map(|offset| {
            let mut bytes = vec![0u8; offset];
            bytes.extend_from_slice(secret.as_bytes());
            let encoded = base64::engine::general_purpose::STANDARD_NO_PAD.encode(&bytes);
            // From the first character with no bit of the prefix to the last with every bit from the secret.
            let first = (8 * offset).div_ceil(6);
            let last = 8 * bytes.len() / 6;
            encoded.get(first..last).map(str::to_string)
        })
        .collect()
}

/// Whether `text` holds one of `cores` (see [`base64_cores`]) as base64 text, in either alphabet, wrapped over
/// lines or not.
fn holds_base64_core(text: &str, cores: &[String]) -> bool {
    let squeezed: String = text
        .chars()
        .filter(|c| !matches!(c, ' ' | '\t' | '\r' | '\n'))
        .map(|c| match c {
            '-' => '+',
            '_' => '/',
            c => c,
        })
        .collect();
    cores.iter().any(|core| squeezed.contains(core.as_str()))
}

/// JSON's backslash escapes decoded wherever they appear (in a reply that is not JSON as a whole, too: a page
/// quoting a JSON request). Anything that is not a valid escape stays as it is.
fn json_unescape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('\\') {
        out.push_str(&rest[..at]);
        let tail = &rest[at + 1..];
        let simple = match tail.chars().next() {
            Some('"') => Some('"'),
            Some('\\') => Some('\\'),
            Some('/') => Some('/'),
            Some('b') => Some('\u{8}'),
            Some('f') => Some('\u{c}'),
            Some('n') => Some('\n'),
            Some('r') => Some('\r'),
            Some('t') => Some('\t'),
            _ => None,
        };
        if let Some(c) = simple {
            out.push(c);
            rest = &tail[1..];
            continue;
        }
        let hex4 = |s: &str| {
            s.get(..4)
                .filter(|h| h.bytes().all(|b| b.is_ascii_hexdigit()))
                .and_then(|h| u32::from_str_radix(h, 16).ok())
        };
        match tail
            .strip_prefix('u')
            .and_then(|u| hex4(u).map(|c| (c, &u[4..])))
        {
            // A surrogate pair: `\uD83D\uDE00`.
            Some((high @ 0xD800..=0xDBFF, after)) => {
                match after
                    .strip_prefix("\\u")
                    .and_then(|u| hex4(u).map(|c| (c, &u[4..])))
                {
                    Some((low @ 0xDC00..=0xDFFF, after)) => {
                        let c = 0x10000 + ((high - 0xD800) << 10) + (low - 0xDC00);
                        out.push(char::from_u32(c).unwrap_or('\u{fffd}'));
                        rest = after;
                    }
                    _ => {
                        out.push('\u{fffd}');
                        rest = after;
                    }
                }
            }
            Some((c, after)) => {
                out.push(char::from_u32(c).unwrap_or('\u{fffd}'));
                rest = after;
            }
            None => {
                out.push('\\');
                rest = tail;
            }
        }
    }
    out.push_str(rest);
    out
}

/// HTML's character references (`&#43;`, `&#x2b;`, and the named ones an HTML escaper writes).
fn html_unescape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('&') {
        out.push_str(&rest[..at]);
        let tail = &rest[at + 1..];
        // The longest reference looked for is `&#x10FFFF;`: no need to look further for its end.
        let end = tail.bytes().take(10).position(|b| b == b';');
        let reference = end.and_then(|end| {
            let name = &tail[..end];
            let c = match name {
                "amp" => Some('&'),
                "lt" => Some('<'),
                "gt" => Some('>'),
                "quot" => Some('"'),
                "apos" => Some('\''),
                "sol" => Some('/'),
                "plus" => Some('+'),
                "equals" => Some('='),
                "colon" => Some(':'),
                "tilde" => Some('~'),
                _ => {
                    let number = name.strip_prefix('#')?;
                    let n = match number.strip_prefix(['x', 'X']) {
                        Some(hex) => u32::from_str_radix(hex, 16).ok()?,
                        None => number.parse().ok()?,
                    };
                    char::from_u32(n)
                }
            }?;
            Some((c, &tail[end + 1..]))
        });
        match reference {
            Some((c, after)) => {
                out.push(c);
                rest = after;
            }
            None => {
                out.push('&');
                rest = tail;
            }
        }
    }
    out.push_str(rest);
    out
}

/// URLs' percent escapes, in either case (`%2B`, `%2b`); `+` stays `+`: the form-encoded secret, with its `+`
/// for a space, is cut out literally.
fn percent_decode(text: &str) -> String {
    percent_encoding::percent_decode_str(text)
        .decode_utf8_lossy()
        .into_owned()
}

/// Secrets shorter than this are not cut out: they could not be told from ordinary words.
const MIN_SECRET: usize = 6;

/// `text` with every occurrence of `secrets` (those long enough to be told from ordinary words) replaced.
fn redact(text: &str, secrets: &[String]) -> String {
    let mut out = text.to_string();
    // Longest first: one secret inside another must not leave the longer one's other parts behind.
    let mut secrets: Vec<&String> = secrets.iter().filter(|s| s.len() >= MIN_SECRET).collect();
    secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    for secret in secrets {
        if out.contains(secret.as_str()) {
            out = out.replace(secret.as_str(), "[redacted]");
        }
    }
    out
}

fn endpoint_error(status: u16, body: &[u8]) -> OAuthError {
    match serde_json::from_slice::<ErrorReply>(body) {
        Ok(e) => OAuthError::Endpoint {
            status,
            error: one_line(&e.error),
            description: one_line(&e.error_description.unwrap_or_default()),
        },
        Err(_) => OAuthError::Http {
            status,
            body: one_line(&String::from_utf8_lossy(&body[..body.len().min(200)])),
        },
    }
}

/// The endpoint's words on one line: Microsoft ends its description with `\r\nTrace ID: …\r\nCorrelation ID: …`,
/// which would split a log line (and a `relay status` row) in two.
fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_gateway_page_with_an_error_status_is_recognised() {
        assert!(html_page("text/html; charset=utf-8", "anything"));
        assert!(html_page("no content type", "  <!DOCTYPE html><title>502"));
        assert!(!html_page("application/json", "{\"error\":\"x\"}"));
    }

    /// A reply that is a bare JSON string (a gateway's, or a provider's own odd shape) may be the token itself:
    /// the parse error never quotes it.
    #[test]
    fn a_reply_that_does_not_parse_is_never_quoted() {
        let secret = "eyJ0eXAiOiJKV1QiLCJub25jZSI6InNlY3JldCJ9";
        for body in [
            format!("\"{secret}\""),
            format!("[\"{secret}\"]"),
            format!("{{\"access_token\": [\"{secret}\"]}}"),
        ] {
            let e = parse_token_reply(body.as_bytes(), SystemTime::now())
                .err()
                .unwrap()
                .to_string();
            assert!(!e.contains(secret), "{e}");
            assert!(e.contains("line 1"), "{e}");
        }
        let e = parse_token_reply(b"{}", SystemTime::now()).err().unwrap();
        assert!(
            e.to_string().contains("missing field `access_token`"),
            "{e}"
        );
    }

    #[test]
    fn endpoint_errors_are_one_line() {
        let body = json!({"error": "invalid_grant", "error_description": "AADSTS700082: expired.\r\nTrace ID: a\r\nCorrelation ID: b"});
        let e = endpoint_error(400, body.to_string().as_bytes());
        assert_eq!(
            e.to_string(),
            "token endpoint said invalid_grant (HTTP 400): AADSTS700082: expired. Trace ID: a Correlation ID: b"
        );
    }

    #[test]
    fn network_durations_are_clamped() {
        let d = |v: serde_json::Value| seconds(Some(&v), Duration::from_secs(3600), TOKEN_LIFETIME);
        assert_eq!(d(json!(3599)), Duration::from_secs(3599));
        assert_eq!(d(json!("3599")), Duration::from_secs(3599));
        assert_eq!(
            d(json!(18446744073709551615u64)),
            Duration::from_secs(86_400)
        );
        assert_eq!(d(json!(1e30)), Duration::from_secs(86_400));
        assert_eq!(d(json!(-5)), Duration::from_secs(60));
        assert_eq!(d(json!(0)), Duration::from_secs(60));
        assert_eq!(d(json!(null)), Duration::from_secs(3600));
        assert_eq!(d(json!("soon")), Duration::from_secs(3600));
        assert_eq!(
            seconds(None, Duration::from_secs(3600), TOKEN_LIFETIME),
            Duration::from_secs(3600)
        );
    }

    #[test]
    fn token_reply_with_a_huge_lifetime_gives_a_usable_expiry() {
        let now = SystemTime::now();
        let g = parse_token_reply(
            br#"{"access_token":"a","expires_in":18446744073709551615}"#,
            now,
        )
        .unwrap();
        assert_eq!(g.expires_at, now + Duration::from_secs(86_400));
        assert!(parse_token_reply(br#"{"access_token":"","expires_in":1}"#, now).is_err());
        assert!(parse_token_reply(br#"{"access_token":" ","expires_in":1}"#, now).is_err());
        assert!(parse_token_reply(b"{", now).is_err());
    }

    #[test]
    fn a_page_in_place_of_json_is_quoted_but_json_never_is() {
        let page = b"\n<html><head>\n<title>Access Denied</title></head><body>client_secret=s3cret-value</body>";
        let what = not_json(200, "text/html", page, &["s3cret-value".into()]).unwrap();
        assert!(
            what.starts_with(
                "HTTP 200 with text/html, not JSON: \"<html><head> <title>Access Denied"
            ),
            "{what}"
        );
        assert!(!what.contains("s3cret"), "{what}");
        let token = br#"{"access_token":"eyJ0eXAi.secret","expires_in":"soon"}"#;
        assert_eq!(not_json(200, "application/json", token, &[]), None);
        let form = b"access_token=gho_16C7e42F292c6912E7710c838347Ae178B4a&token_type=bearer";
        let what = not_json(200, "application/x-www-form-urlencoded", form, &[]).unwrap();
        assert!(!what.contains("gho_"), "{what}");
        let xml =
            b"<?xml version=\"1.0\"?><token><access_token>secret-xml-token</access_token></token>";
        let what = not_json(200, "application/xml", xml, &[]).unwrap();
        assert!(!what.contains("secret-xml"), "{what}");
        // Cut short only after the secrets are out: one across the cut leaves nothing behind.
        let echo = format!(
            "<html>{}refresh_token=0.AXoAlongsecretvalue</html>",
            "x".repeat(100)
        );
        let what = not_json(
            200,
            "text/html",
            echo.as_bytes(),
            &["0.AXoAlongsecretvalue".into()],
        )
        .unwrap();
        assert!(!what.contains("0.AXo"), "{what}");
    }

    /// A gateway that echoes the request as JSON escapes a secret's characters as its encoder likes (PHP: `\/`;
    /// .NET: `\u002B`): the secret is cut out of the decoded strings, and the rest stays readable.
    #[test]
    fn a_secret_escaped_in_json_is_cut_out() {
        const SECRET: &str = "Ab+cd/ef=gh~12:34";
        let secrets = vec![
            SECRET.to_string(),
            form_urlencoded::byte_serialize(SECRET.as_bytes()).collect(),
        ];
        for body in [
            r#"{"request":{"client_secret":"Ab+cd\/ef=gh~12:34"}}"#,
            r#"{"request":{"client_secret":"Ab\u002Bcd\/ef\u003Dgh\u007E12\u003A34"}}"#,
            r#"{"request":["x", {"Ab\u002bcd\/ef=gh~12:34": "key"}]}"#,
            "\u{feff} {\"client_secret\":\"Ab\\u002Bcd/ef=gh~12:34\"}",
        ] {
            let quoted = quotable(body, &secrets);
            assert!(!quoted.contains("gh~12"), "{body}: {quoted}");
            assert!(quoted.contains("[redacted]"), "{body}: {quoted}");
            assert!(
                quoted.contains("request") || quoted.contains("client_secret"),
                "{quoted}"
            );
        }
        // An OAuth error: its description is cut once decoded, and it stays an OAuth error.
        let body = r#"{"error":"invalid_client","error_description":"secret Ab\u002Bcd\/ef=gh~12:34 is wrong"}"#;
        let e = endpoint_error(401, quotable(body, &secrets).as_bytes());
        assert_eq!(
            e.to_string(),
            "token endpoint said invalid_client (HTTP 401): secret [redacted] is wrong"
        );
    }

    /// Where the reply is not JSON as a whole (a page quoting the JSON, truncated JSON), or the secret is encoded
    /// otherwise (lower-case percent escapes, HTML references, a JSON string holding a form), nothing is quoted.
    #[test]
    fn a_secret_encoded_anywhere_else_withholds_the_reply() {
        const SECRET: &str = "Ab+cd/ef=gh~12:34";
        let secrets = vec![SECRET.to_string()];
        for body in [
            r#"<pre>{"client_secret":"Ab+cd\/ef=gh~12:34"}</pre>"#,
            r#"{"client_secret":"Ab\u002Bcd\/ef=gh~12:34", "cut short"#,
            "client_secret=Ab%2bcd%2fef%3dgh%7e12%3a34",
            "<p>Ab&#43;cd&#x2F;ef&equals;gh~12:34</p>",
            r#"{"body":"client_secret=Ab%2Bcd%2Fef%3Dgh%7E12%3A34"}"#,
            r#"{"echo":"{\"client_secret\":\"Ab\\u002Bcd\\/ef=gh~12:34\"}"}"#,
        ] {
            assert_eq!(quotable(body, &secrets), WITHHELD, "{body}");
        }
        // Base64 of the request, as a gateway echoes a body it holds as binary: either alphabet, padded or
        // not, wrapped over lines, after any text, holding the secret form-encoded (as relay sent it), at each
        // of the three offsets.
        use base64::Engine;
        let encoded: String = form_urlencoded::byte_serialize(SECRET.as_bytes()).collect();
        let secrets = vec![SECRET.to_string(), encoded.clone()];
        let form = format!("grant_type=refresh_token&client_id=cid&client_secret={encoded}");
        let standard = base64::engine::general_purpose::STANDARD.encode(&form);
        let url_safe = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("x{form}"));
        let wrapped = standard
            .as_bytes()
            .chunks(76)
            .map(|l| String::from_utf8_lossy(l).into_owned())
            .collect::<Vec<_>>()
            .join("\r\n");
        let shifted =
            |pad: &str| base64::engine::general_purpose::STANDARD.encode(format!("{pad}{form}"));
        for body in [
            format!(r#"{{"isBase64Encoded":true,"body":"{standard}"}}"#),
            shifted("a"),
            shifted("ab"),
            format!("request body was {url_safe} (rejected)"),
            format!("<pre>\r\n{wrapped}\r\n</pre>"),
            format!(
                r#"{{"echo":"{}"}}"#,
                base64::engine::general_purpose::STANDARD.encode(&standard)
            ),
        ] {
            assert_eq!(quotable(&body, &secrets), WITHHELD, "{body}");
        }
        // Without a secret in it, a reply that is not JSON is quoted as it came, escapes and all.
        let page = r#"<p>a \/ b &amp; c %2F d \u002B</p>"#;
        assert_eq!(quotable(page, &secrets), page);
    }

    /// A block page with an inline image (a megabyte of base64) and escapes nested in it is looked through once
    /// per decoded view: the check stays linear in the reply (decoding each base64 run and each result again
    /// took seconds of a worker thread).
    #[test]
    fn a_large_base64_page_is_looked_through_once() {
        use base64::Engine;
        let image = base64::engine::general_purpose::STANDARD.encode(vec![0x89u8; 700 * 1024]);
        let page = format!(
            "<html><img src=\"data:image/png;base64,{image}\">%2525252F &amp;amp; \\u0026</html>"
        );
        let secrets = vec!["Ab+cd/ef=gh~12:34".to_string()];
        assert_eq!(quotable(&page, &secrets).len(), page.len());
    }

    #[test]
    fn decoders_leave_what_is_not_an_escape() {
        assert_eq!(
            json_unescape(r"a\/b\u002Bc\ud83d\ude00\q\u12"),
            "a/b+c😀\\q\\u12"
        );
        assert_eq!(html_unescape("&#43;&#x2b;&amp;&nope;&"), "++&&nope;&");
        assert_eq!(percent_decode("%2b%2F%zz%"), "+/%zz%");
    }

    #[test]
    fn secrets_are_cut_out_longest_first() {
        let secrets = vec![
            "abc123".to_string(),
            "xxabc123yy".to_string(),
            "s3".to_string(),
        ];
        assert_eq!(
            redact("a xxabc123yy and abc123 and s3", &secrets),
            "a [redacted] and [redacted] and s3"
        );
    }
}
