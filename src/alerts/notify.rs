//! Sending a notice: a JSON POST to `webhook_url`, and a short mail to `mail_to` through a healthy account.
//!
//! Alert mail does not go through the queue: it is built in memory and handed to an account's transport, like a
//! delivery, so that it reports trouble even when the queue is what is in trouble. A healthy account is one whose
//! last delivery got through, or else one whose token is valid; accounts with an open authorization or refresh
//! incident are not tried. Failures are logged and counted; nothing here ever waits on or holds up delivery.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Serialize;

use super::Setup;
use super::incidents::{Notice, State};
use super::outbox::{Channel, Sent};
use crate::mailgen;
use crate::queue::delivery::{Account, read_last_delivery};
use crate::upstream::{MailFlags, Outcome};

/// Tries of a webhook POST, and the pause after each failed one.
const WEBHOOK_TRIES: [Duration; 3] = [
    Duration::from_secs(1),
    Duration::from_secs(5),
    Duration::ZERO,
];
const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(10);

/// An account alert mail may go through, and the mailbox it sends from.
pub struct MailAccount {
    pub account: Arc<Account>,
    pub mailbox: String,
}

/// What sends notices; where to and through which accounts is the current [`Setup`]'s.
pub struct Notifier {
    pub http: reqwest::Client,
    pub state_dir: PathBuf,
    /// With the key when token files are sealed.
    pub tokens: crate::tokens::TokenStore,
}

#[derive(Serialize)]
struct Payload<'a> {
    #[serde(flatten)]
    notice: &'a Notice,
    host: &'a str,
}

impl Notifier {
    /// Sends `notice` through `channel` as `setup` configures it. `avoid`: accounts not to send mail through.
    pub async fn deliver(
        &self,
        channel: Channel,
        notice: &Notice,
        setup: &Setup,
        avoid: HashSet<String>,
    ) -> Sent {
        match channel {
            Channel::Webhook => match &setup.config.webhook_url {
                Some(url) => self.post(url, &setup.hostname, notice).await,
                None => Sent::Off,
            },
            Channel::Mail => match &setup.config.mail_to {
                Some(to) => self.mail(to, setup, notice, avoid).await,
                None => Sent::Off,
            },
        }
    }

    async fn post(&self, url: &str, host: &str, notice: &Notice) -> Sent {
        let shown = crate::config::redact_url(url);
        let payload = Payload { notice, host };
        let mut last = String::new();
        for pause in WEBHOOK_TRIES {
            let sent = self
                .http
                .post(url)
                .timeout(WEBHOOK_TIMEOUT)
                .json(&payload)
                .send()
                .await;
            match sent {
                Ok(r) if r.status().is_success() => {
                    counted("webhook", "sent");
                    tracing::info!(relay_event = "alert_sent", channel = "webhook", incident = %notice.incident, url = %shown, "alert sent to the webhook");
                    return Sent::Yes;
                }
                // The webhook will never take this one (a wrong path, a payload it refuses): said once, and not
                // tried again, so that it does not hold up the notices after it.
                Ok(r)
                    if r.status().is_client_error()
                        && !matches!(r.status().as_u16(), 408 | 425 | 429) =>
                {
                    counted("webhook", "failed");
                    tracing::warn!(relay_event = "alert_failed", channel = "webhook", incident = %notice.incident, url = %shown, error = %format!("HTTP {}", r.status()), "the webhook refused the alert; it is not sent again");
                    return Sent::Refused;
                }
                Ok(r) => last = format!("HTTP {}", r.status()),
                // reqwest names the URL in its errors, and a webhook's path is often its secret.
                Err(e) => last = error_chain(&e.without_url()),
            }
            tokio::time::sleep(pause).await;
        }
        counted("webhook", "failed");
        tracing::warn!(relay_event = "alert_failed", channel = "webhook", incident = %notice.incident, url = %shown, error = %last, "cannot send the alert to the webhook");
        Sent::Failed
    }

    async fn mail(&self, to: &str, setup: &Setup, notice: &Notice, avoid: HashSet<String>) -> Sent {
        // Every account that was tried refused it for good (the address refused, say): not tried again.
        let mut refused = true;
        let mut errors = Vec::new();
        for m in self.healthy(&setup.accounts, avoid).await {
            let message = crate::upstream::outgoing::Outgoing::from_bytes(alert_message(
                &m.mailbox,
                to,
                &setup.hostname,
                notice,
            ));
            let recipients = [to.to_string()];
            let outcome = m
                .account
                .transports
                .send(
                    &m.account.tokens,
                    &m.mailbox,
                    &recipients,
                    &message,
                    MailFlags::OWN,
                    // An alert is small and not queued: nothing to resume.
                    None,
                    // Nor counted against the account's sending limits.
                    &std::sync::atomic::AtomicBool::new(false),
                )
                .await;
            match outcome {
                Outcome::Delivered(_) => {
                    counted("mail", "sent");
                    tracing::info!(relay_event = "alert_sent", channel = "mail", relay_account = %m.account.name, incident = %notice.incident, to = %to, "alert mailed");
                    return Sent::Yes;
                }
                other => {
                    // Only a refusal of the message itself (the address, its size), not of the account (a
                    // blocked sender, SendAsDenied, 5.7.x), which another account or a later try may not meet.
                    refused &= (matches!(other, Outcome::Permanent(_))
                        || matches!(&other, Outcome::Refused { refused, .. } if refused.iter().all(|r| r.permanent)))
                        && crate::status::refused_for_itself(other.reply());
                    errors.push(format!("{}: {}", m.account.name, other.reply()));
                }
            }
        }
        counted("mail", "failed");
        let why = if errors.is_empty() {
            "no healthy account to send it through (none has delivered lately or holds a valid token)".to_string()
        } else {
            errors.join("; ")
        };
        if refused && !errors.is_empty() {
            tracing::warn!(relay_event = "alert_failed", channel = "mail", incident = %notice.incident, to = %to, error = %why, "the alert mail was refused for good; it is not sent again");
            return Sent::Refused;
        }
        tracing::warn!(relay_event = "alert_failed", channel = "mail", incident = %notice.incident, to = %to, error = %why, "cannot mail the alert");
        Sent::Failed
    }

    /// Accounts to try, best first: last delivery got through, then a valid token.
    async fn healthy<'a>(
        &self,
        accounts: &'a [MailAccount],
        avoid: HashSet<String>,
    ) -> Vec<&'a MailAccount> {
        let names: Vec<String> = accounts.iter().map(|m| m.account.name.clone()).collect();
        let state_dir = self.state_dir.clone();
        let store = self.tokens.clone();
        // Small files, but files: read on the blocking pool like everything else that touches the disk.
        let ranks = tokio::task::spawn_blocking(move || {
            let now = SystemTime::now();
            names
                .iter()
                .map(|name| {
                    if avoid.contains(name) {
                        return None;
                    }
                    if read_last_delivery(&state_dir, name)
                        .is_some_and(|d| d.outcome == "delivered")
                    {
                        return Some(0);
                    }
                    let valid = store
                        .load(name)
                        .ok()
                        .flatten()
                        .is_some_and(|t| !t.needs_authorization && t.expires_at > now);
                    valid.then_some(1)
                })
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        let mut ranked: Vec<(u8, usize)> = ranks
            .iter()
            .enumerate()
            .filter_map(|(i, r)| r.map(|r| (r, i)))
            .collect();
        ranked.sort();
        ranked
            .iter()
            .filter_map(|(_, i)| accounts.get(*i))
            .collect()
    }
}

fn counted(channel: &str, result: &str) {
    crate::metrics::global()
        .alerts
        .with_label_values(&[channel, result])
        .inc();
}

/// The error with its causes: "error sending request: connection refused" says more than its first line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// The alert as a small RFC 5322 message from `from` to `to`. Marked `Auto-Submitted: auto-generated` (RFC 3834),
/// so that responders do not answer it.
pub fn alert_message(from: &str, to: &str, host: &str, n: &Notice) -> Vec<u8> {
    let state = match n.state {
        State::Open => "OPEN",
        State::Recovered => "RECOVERED",
    };
    let subject = mailgen::one_line(&format!("[relay {host}] {state}: {}", n.incident), 200);
    let body = format!(
        "{}\n\nIncident: {}\nState: {}\nAt: {}\nHost: {host}\n",
        n.text,
        n.incident,
        state.to_lowercase(),
        humantime::format_rfc3339_seconds(n.at),
    );
    let body = mailgen::wrap(&body, 76);
    let encoding = if body.is_ascii() { "7bit" } else { "8bit" };
    format!(
        "From: relay on {host} <{from}>\r\nTo: <{to}>\r\nSubject: {subject}\r\nDate: {date}\r\nMessage-ID: {id}\r\nAuto-Submitted: auto-generated\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: {encoding}\r\n\r\n{body}",
        host = mailgen::one_line(host, 100),
        date = mailgen::date(n.at),
        id = mailgen::message_id(host),
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alert_mail_is_a_plain_message() {
        let n = Notice {
            kind: "dead",
            account: Some("office".into()),
            incident: "dead:office".into(),
            state: State::Open,
            text: format!("message x was moved to dead/: 550 {}", "y".repeat(2000)),
            at: SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
            count: 1,
        };
        let m = String::from_utf8(alert_message(
            "relay@example.com",
            "admin@example.com",
            "mx1",
            &n,
        ))
        .unwrap();
        assert!(m.starts_with("From: relay on mx1 <relay@example.com>\r\nTo: <admin@example.com>\r\nSubject: [relay mx1] OPEN: dead:office\r\n"), "{m}");
        assert!(m.contains("\r\nAuto-Submitted: auto-generated\r\n"));
        assert!(m.lines().all(|l| l.len() <= 998));
        assert!(!m.replace("\r\n", "").contains('\n'));
    }
}
