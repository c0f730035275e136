//! Delivery to Microsoft 365 / Gmail over SMTP with AUTH XOAUTH2 (lettre).

use std::sync::Mutex;
use std::time::Duration;

use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{Certificate, CertificateStore, Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Tokio1Executor};
use secrecy::{ExposeSecret, SecretString};

use super::{Outcome, UpstreamError, long_lines};
use crate::config::TlsMode;
use crate::oauth::Endpoints;

/// One account's SMTP upstream. Connections are pooled by lettre and reused while the token stays the same;
/// a new token means a new transport, because lettre fixes credentials per transport.
pub struct SmtpUpstream {
    mailbox: String,
    endpoints: Endpoints,
    ca: Option<Vec<u8>>,
    timeout: Duration,
    transport: Mutex<Option<(blake3::Hash, AsyncSmtpTransport<Tokio1Executor>)>>,
}

/// Default for `smtp_timeout`: per step (connect, each reply), not for the whole message.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

impl SmtpUpstream {
    pub fn new(
        mailbox: String,
        endpoints: Endpoints,
        ca: Option<Vec<u8>>,
        timeout: Duration,
    ) -> SmtpUpstream {
        SmtpUpstream {
            mailbox,
            endpoints,
            ca,
            // A zero timeout would fail every attempt; a huge one would hold a delivery slot for good.
            timeout: timeout.clamp(Duration::from_secs(1), Duration::from_secs(600)),
            transport: Mutex::new(None),
        }
    }

    fn transport(
        &self,
        token: &SecretString,
    ) -> Result<AsyncSmtpTransport<Tokio1Executor>, UpstreamError> {
        let key = blake3::hash(token.expose_secret().as_bytes());
        let mut slot = self
            .transport
            .lock()
            .map_err(|_| UpstreamError::Setup("transport lock poisoned".into()))?;
        if let Some((k, t)) = slot.as_ref()
            && *k == key
        {
            return Ok(t.clone());
        }
        let e = &self.endpoints;
        let tls = || -> Result<TlsParameters, UpstreamError> {
            let mut b = TlsParameters::builder(e.smtp_host.clone());
            if let Some(pem) = &self.ca {
                let cert = Certificate::from_pem(pem)
                    .map_err(|e| UpstreamError::Setup(format!("ca_file: {e}")))?;
                b = b
                    .certificate_store(CertificateStore::None)
                    .add_root_certificate(cert);
            }
            b.build_rustls()
                .map_err(|e| UpstreamError::Setup(e.to_string()))
        };
        let tls = match e.smtp_tls {
            TlsMode::Starttls => Tls::Required(tls()?),
            TlsMode::Implicit => Tls::Wrapper(tls()?),
            TlsMode::None => Tls::None,
        };
        let transport =
            AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(e.smtp_host.clone())
                .port(e.smtp_port)
                .tls(tls)
                .credentials(Credentials::new(
                    self.mailbox.clone(),
                    token.expose_secret().to_string(),
                ))
                .authentication(vec![Mechanism::Xoauth2])
                .timeout(Some(self.timeout))
                .build();
        *slot = Some((key, transport.clone()));
        Ok(transport)
    }

    /// Sends the queued bytes as they are, but for lines over 998 octets, wrapped so that the message stays the same
    /// ([`long_lines`]). `message` must use CRLF line endings (the spool guarantees it).
    pub async fn send(
        &self,
        token: &SecretString,
        sender: &str,
        recipients: &[String],
        message: &[u8],
    ) -> Outcome {
        let envelope = match envelope(sender, recipients) {
            Ok(e) => e,
            Err(reply) => return Outcome::Permanent(reply),
        };
        // SMTP caps a line at 998 octets (RFC 5321 section 4.5.3.1.6), and Microsoft 365 and Gmail refuse longer
        // ones; devices send base64 without line breaks. Only this transport wraps them: the stored copy keeps
        // them, and so would a transport that is not SMTP. A message without one is sent from `message` itself;
        // the copy of one with them is at most about 3.2 times its size (a part re-encoded as quoted-printable,
        // every octet escaped), usually a few percent more, and delivery charges it (`queue/delivery.rs`).
        let message = long_lines::wrap(message);
        // lettre always writes CRLF "." CRLF after the body: a body that already ends in CRLF would gain an
        // empty line, so one trailing CRLF goes (DEPENDENCIES.md, trap 1).
        let body = message.strip_suffix(b"\r\n").unwrap_or(&message);
        let transport = match self.transport(token) {
            Ok(t) => t,
            Err(e) => return Outcome::Transient(e.to_string()),
        };
        // lettre's own timeout covers only the connect: a server that stops answering would hold this delivery
        // (and its account's connection slot) for good. So the whole attempt has a deadline: a few replies' worth
        // plus the time to send the body at a slow 32 KiB/s.
        let deadline = self.timeout * 4 + Duration::from_secs(body.len() as u64 / 32_768);
        match tokio::time::timeout(deadline, transport.send_raw(&envelope, body)).await {
            Ok(Ok(reply)) => Outcome::Delivered(format!(
                "{} {}",
                reply.code(),
                reply.message().collect::<Vec<_>>().join(" ")
            )),
            Ok(Err(e)) => classify(&e),
            Err(_) => {
                // The connection was cut off mid-conversation and lettre would put it back in its pool: start a
                // new pool, so that no later message is sent on a connection in an unknown state.
                if let Ok(mut slot) = self.transport.lock() {
                    *slot = None;
                }
                Outcome::Transient(format!(
                    "upstream {}:{} did not answer within {} (smtp_timeout)",
                    self.endpoints.smtp_host,
                    self.endpoints.smtp_port,
                    humantime::format_duration(deadline)
                ))
            }
        }
    }
}

/// The envelope as the client gave it. lettre's own address check is stricter than what relay accepts inbound
/// (it refuses a local part over 64 octets, which devices do send and providers take), and a message relay has
/// acknowledged must not die on it; so an address is only checked for what could break the command line.
fn envelope(sender: &str, recipients: &[String]) -> Result<lettre::address::Envelope, String> {
    let from = if sender.is_empty() {
        None
    } else {
        Some(address(sender).map_err(|e| format!("sender <{sender}> not accepted: {e}"))?)
    };
    let to = recipients
        .iter()
        .map(|r| address(r).map_err(|e| format!("recipient <{r}> not accepted: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    lettre::address::Envelope::new(from, to).map_err(|e| e.to_string())
}

fn address(a: &str) -> Result<lettre::Address, &'static str> {
    if a.bytes().any(|b| b.is_ascii_control()) {
        return Err("control characters");
    }
    let (user, domain) = a.rsplit_once('@').ok_or("no @domain")?;
    // Anything else in the local part is quoted on the way out; the domain has no quoting.
    if user.is_empty() || domain.is_empty() || domain.contains([' ', '<', '>', '"']) {
        return Err("empty local part or bad domain");
    }
    Ok(lettre::Address::new_dangerous(local_part(user), domain))
}

/// The local part as it goes on the wire. The inbound parser keeps a quoted local part unquoted (`"john smith"`
/// is stored as `john smith`, `"a\"b"` as `a"b`), so one that is not a dot-string is quoted again (RFC 5321
/// section 4.1.2), or the upstream would read a different address, or none.
fn local_part(user: &str) -> std::borrow::Cow<'_, str> {
    let atext =
        |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~".contains(c) || !c.is_ascii();
    let dot_string = user
        .split('.')
        .all(|atom| !atom.is_empty() && atom.chars().all(atext));
    if dot_string {
        return user.into();
    }
    let mut quoted = String::with_capacity(user.len() + 2);
    quoted.push('"');
    for c in user.chars() {
        if c == '"' || c == '\\' {
            quoted.push('\\');
        }
        quoted.push(c);
    }
    quoted.push('"');
    quoted.into()
}

fn classify(e: &lettre::transport::smtp::Error) -> Outcome {
    let text = e.to_string();
    // Gmail answers a bad XOAUTH2 token with a 334 challenge carrying a JSON error (the 535 only follows the
    // client's empty reply); lettre gives up at the 334 with this client error. It means the same as 535.
    if e.is_client() && text.contains("does not expect a challenge") {
        return Outcome::AuthRejected(
            "334 XOAUTH2 token refused (challenge instead of 235)".into(),
        );
    }
    match e.status().map(|c| c.to_string()) {
        // XOAUTH2 refused: the token may be stale or revoked (Google and Microsoft both answer 535).
        Some(code) if code == "535" || code == "534" => Outcome::AuthRejected(text),
        _ if e.is_permanent() => Outcome::Permanent(text),
        _ => Outcome::Transient(text),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_parts_are_quoted_only_when_they_must_be() {
        assert_eq!(local_part("scanner.3f+{x}"), "scanner.3f+{x}");
        assert_eq!(local_part(&"0".repeat(80)), "0".repeat(80));
        assert_eq!(local_part("john smith"), "\"john smith\"");
        assert_eq!(local_part("a\"b\\c"), r#""a\"b\\c""#);
        assert_eq!(local_part("a@b"), "\"a@b\"");
        assert_eq!(local_part("a..b"), "\"a..b\"");
        assert_eq!(
            address("a@b@example.com").unwrap().to_string(),
            "\"a@b\"@example.com"
        );
        assert!(address("a\r\nRCPT TO:<x>@example.com").is_err());
        assert_eq!(
            address("a<b>@example.com").unwrap().to_string(),
            "\"a<b>\"@example.com"
        );
        assert!(address("a@exa>mple.com").is_err());
    }
}
