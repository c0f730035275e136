//! What `relay status` reports: the queue's counts and each account's health, read from the state dir (the
//! daemon need not run). The command line only prints this.

use std::time::SystemTime;

use serde::Serialize;

use crate::config::{AccountConfig, Config, Flow};
use crate::queue::delivery::{LastDelivery, read_last_delivery};
use crate::queue::pause::{PauseReport, read_pause};
use crate::queue::rate::{Usage, usage_from_file};
use crate::queue::state::read_state;
use crate::queue::{QueueStore, StoreError};
use crate::tokens::TokenStore;

#[derive(Debug, Serialize)]
pub struct QueueCounts {
    pub queued: usize,
    /// Queued, with at least one failed attempt.
    pub deferred: usize,
    pub dead: usize,
    /// Files moved to `quarantine/` (unreadable, or their seal did not match): never delivered, never removed.
    pub quarantined: usize,
    /// Files in `queue/` that cannot be read (the daemon quarantines them when it meets them).
    pub unreadable: usize,
    /// Queued, and held by their account's sending limits (or a pause its provider asked for) for longer than a
    /// few minutes, as the daemon last wrote it (a day's limit used up).
    pub held: usize,
    /// The latest end of those holds.
    #[serde(with = "humantime_serde::option")]
    pub held_until: Option<SystemTime>,
    /// Queued, and no account of this config takes them (a reload removed their route's account or
    /// `default_account`): retried in vain until `max_age`.
    pub unroutable: usize,
    #[serde(skip)]
    pub oldest: Option<SystemTime>,
    pub oldest_age_seconds: Option<u64>,
}

/// One account's health.
#[derive(Debug, Serialize)]
pub struct AccountStatus {
    pub name: String,
    pub mailbox: String,
    /// `ok`, `needs-authorization` or `failing`.
    pub state: &'static str,
    pub token_valid_until: Option<String>,
    pub last_refresh: Option<String>,
    pub last_error: Option<String>,
    pub last_delivery: Option<LastDelivery>,
    /// What the last delivery's refusal means and what fixes it, where relay knows (the journal's
    /// `relay_diagnosis`): a TLS error's own words are a library's.
    pub last_delivery_diagnosis: Option<String>,
    /// `smtp`, `graph` or `gmail_api`: the transport in use now.
    pub transport: &'static str,
    /// Set while a fallback is in use: since when, and why.
    pub transport_switched: Option<crate::upstream::transports::Switch>,
    /// How close it is to its sending limits.
    pub rate: Usage,
    /// A pause the provider asked for (a used-up quota, a `Retry-After`), while it lasts: its mail is held.
    pub paused: Option<PauseReport>,
    /// The SMTP upstream has not answered a connection since then, as the daemon last saw it: its mail waits
    /// untried while one connection at a time tries it.
    pub unreachable: Option<crate::upstream::transports::Unreachable>,
    /// The last `relay test`: verified or failing, and when.
    pub test: Option<crate::probe::LastTest>,
    /// Credentials expiring within 30 days, or expired; the day's sending limit reached; unreadable counters; a
    /// pause the provider asked for; an upstream that does not answer.
    pub warnings: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct Status {
    pub queue: QueueCounts,
    pub accounts: Vec<AccountStatus>,
    /// A relay (`serve`) holds the state dir: without one, nothing is accepted or delivered, whatever the files
    /// say.
    pub running: bool,
    /// What the running daemon loaded, next to the config this command read (`running.rs`); `None` when no
    /// daemon runs, or its report cannot be read.
    pub daemon: Option<crate::running::DaemonReport>,
    /// The state dir's filesystem; `None` when it cannot be read (no state dir yet).
    pub disk: Option<crate::queue::room::DiskReport>,
    /// Token files of accounts the config no longer names (a few of them): each still holds that account's grant,
    /// which nothing uses or renews any more. Said, not removed: the account may come back.
    pub stale_tokens: Vec<String>,
    /// The state dir is there but its `queue/` is not (removed while the daemon ran): no new mail can be stored
    /// until the daemon's next start makes it again.
    pub queue_dir_missing: bool,
    /// Why the running daemon cannot make files in `queue/` (its user, the directory's owner and mode): every
    /// new message is refused with 451 4.3.0. A chown or chmod by hand, or a `sudo relay serve` before the unit.
    pub queue_unwritable: Option<String>,
    /// Why the running daemon cannot make files in the state dir itself: its tokens, counters and reports are not
    /// saved (a renewed refresh token lost at the next restart).
    pub state_dir_unwritable: Option<String>,
    /// The running daemon's listener certificates that clients checking them refuse (expired, not valid yet) or
    /// soon will (within 30 days and a fifth of its lifetime): as loaded, which a renewal without a reload does
    /// not change.
    pub certificates: Vec<String>,
    pub ok: bool,
}

pub fn status(config: &Config) -> Result<Status, StoreError> {
    // Each message is looked at and let go: a backlog of any size costs this command no memory.
    let store = QueueStore::new(&config.state_dir);
    let queue_dir = &store.paths().queue;
    let (mut queued, mut deferred, mut held, mut unroutable) = (0, 0, 0, 0);
    let routing = crate::queue::route::Routing::new(config);
    // A config without accounts says so on its own (and a stand-in for an invalid one has none).
    let routed = |e: &crate::queue::Envelope| {
        config.accounts.is_empty()
            || routing
                .route(crate::queue::route::Addressing::from(e))
                .is_some_and(|d| {
                    !d.accounts.is_empty()
                        && d.accounts
                            .iter()
                            .all(|n| config.accounts.iter().any(|a| &a.name == n))
                })
    };
    let mut oldest: Option<SystemTime> = None;
    let mut held_until: Option<SystemTime> = None;
    let now = SystemTime::now();
    let unreadable = store.each(queue_dir, |m| {
        queued += 1;
        let state = read_state(queue_dir, m.envelope.id);
        if state.attempts > 0 {
            deferred += 1;
        }
        if let Some(until) = state.held_until.filter(|t| *t > now) {
            held += 1;
            held_until = Some(held_until.map_or(until, |h| h.max(until)));
        }
        if !routed(&m.envelope) {
            unroutable += 1;
        }
        let at = m.envelope.received_at;
        oldest = Some(oldest.map_or(at, |o| o.min(at)));
    })?;
    let mut dead = 0;
    store.each(&store.paths().dead, |_| dead += 1)?;
    let quarantined = store.count_quarantined()?;
    let queue = QueueCounts {
        queued,
        deferred,
        dead,
        quarantined,
        unreadable,
        held,
        held_until,
        unroutable,
        oldest,
        oldest_age_seconds: oldest.map(|t| {
            SystemTime::now()
                .duration_since(t)
                .unwrap_or_default()
                .as_secs()
        }),
    };
    let accounts: Vec<AccountStatus> = config
        .accounts
        .iter()
        .map(|a| account_status(config, a))
        .collect();
    let running = crate::queue::relay_runs_on(&config.state_dir);
    let daemon = running.then(|| crate::running::read(config)).flatten();
    let stale_tokens = stale_tokens(config);
    let disk = crate::queue::room::DiskReport::of(&config.state_dir, config.queue.min_free_space.0);
    // Only under a running daemon: before the first `relay serve` (a `relay authorize` made the state dir) there is
    // no queue/ yet, and nothing is wrong.
    let queue_dir_missing =
        running && config.state_dir.is_dir() && !config.state_dir.join("queue").is_dir();
    let daemon_user = daemon
        .as_ref()
        .and_then(|d| crate::access::User::of_process(d.pid));
    let queue_unwritable = daemon_user
        .as_ref()
        .and_then(|user| user.may_write_dir(queue_dir).err());
    let state_dir_unwritable = daemon_user
        .as_ref()
        .and_then(|user| user.may_write_dir(&config.state_dir).err());
    let certificates = daemon
        .as_ref()
        .map(|d| served_warnings(&d.certificates, config, now))
        .unwrap_or_default();
    let ok = !(!running
        || daemon.as_ref().is_some_and(|d| d.reload_refused.is_some())
        || disk.as_ref().is_some_and(|d| d.short || d.read_only)
        || queue_dir_missing
        || queue_unwritable.is_some()
        || state_dir_unwritable.is_some()
        || !certificates.is_empty()
        || accounts.is_empty()
        || queue.dead > 0
        || queue.quarantined > 0
        || queue.unreadable > 0
        || queue.held > 0
        || queue.unroutable > 0
        || accounts
            .iter()
            .any(|a| a.state != "ok" || !a.warnings.is_empty()));
    Ok(Status {
        queue,
        accounts,
        running,
        daemon,
        disk,
        stale_tokens,
        queue_dir_missing,
        queue_unwritable,
        state_dir_unwritable,
        certificates,
        ok,
    })
}

/// What is wrong with the certificates the daemon serves, one line each: those that clients checking them refuse, or
/// will within [`crate::certs::WARN_DAYS`]. Said of what was loaded, with what the file holds now when that
/// differs (renewed, not yet reloaded).
fn served_warnings(
    served: &[crate::running::Served],
    config: &Config,
    now: SystemTime,
) -> Vec<String> {
    use crate::certs::{Trouble, Validity, day};
    served
        .iter()
        .filter_map(|c| {
            let loaded = Validity {
                not_before: c.not_before,
                not_after: c.not_after,
            };
            let trouble = match due(&loaded, now)? {
                Trouble::NotYetValid(at) => format!("is not valid until {}", day(at)),
                Trouble::Expired(at) => {
                    format!(
                        "expired on {}: clients that check it refuse to send",
                        day(at)
                    )
                }
                Trouble::Expiring(days, at) => format!("expires in {days} day(s), on {}", day(at)),
            };
            // Read again only where this config names it, and only a plain file: daemon.json is the service
            // user's to write, and this command often runs as root (a FIFO named there would hang it).
            let named = config
                .listeners
                .iter()
                .any(|l| l.cert.as_deref() == Some(c.file.as_path()))
                && std::fs::metadata(&c.file).is_ok_and(|m| m.is_file() && m.len() < 1 << 20);
            let fix = match named.then(|| crate::certs::validity(&c.file)) {
                Some(Ok(v)) if v != loaded && due(&v, now).is_none() => format!(
                    "the file now holds one valid until {}: `systemctl reload relay` serves it",
                    day(v.not_after)
                ),
                // Dated from the future: most often this machine's clock, or a CA's mistake.
                _ if now < c.not_before => {
                    "check this machine's clock (`timedatectl`), or have the certificate reissued"
                        .to_string()
                }
                _ => "renew it, then `systemctl reload relay`".to_string(),
            };
            Some(format!(
                "listener {} serves a certificate ({}) that {trouble}; {fix}",
                c.listener,
                c.file.display()
            ))
        })
        .collect()
}

/// A certificate's trouble as `relay status` counts it: out of its dates, or near its end for its lifetime
/// (within 30 days, and within a fifth of its lifetime: renewed at a third, as certbot does, a 90-day
/// certificate is not said at 29 days left, nor a 6-day one all the time).
fn due(v: &crate::certs::Validity, now: SystemTime) -> Option<crate::certs::Trouble> {
    let trouble = v.trouble(now)?;
    if let crate::certs::Trouble::Expiring(..) = trouble {
        let lifetime = v.not_after.duration_since(v.not_before).unwrap_or_default();
        let left = v.not_after.duration_since(now).unwrap_or_default();
        if left >= lifetime / 5 {
            return None;
        }
    }
    Some(trouble)
}

/// How many [`Status::stale_tokens`] are named.
const STALE_SHOWN: usize = 10;

/// The accounts of `STATE_DIR/tokens/NAME.json` files that the config does not name, a few of them.
fn stale_tokens(config: &Config) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(config.state_dir.join("tokens")) else {
        return Vec::new();
    };
    let mut stale: Vec<String> = dir
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let account = name.strip_suffix(".json")?;
            (!account.starts_with('.') && !config.accounts.iter().any(|a| a.name == account))
                .then(|| account.to_string())
        })
        .take(STALE_SHOWN)
        .collect();
    stale.sort();
    stale
}

/// A refusal about the message, not the account, which goes on sending other mail: a recipient that does not
/// exist or has moved, a mailbox disabled or full, a message too large or in a form the upstream cannot take
/// (RFC 3463's 5.1.1, 5.1.2, 5.1.3, 5.1.6, Microsoft's 5.1.10, 5.2.1 to 5.2.3, 5.3.4, 5.6.x). Not a bad sender
/// (5.1.7, 5.1.8: Microsoft's "bad outbound sender" blocks the account), a sending limit (5.1.90, a 5.2.2
/// `SubmissionQuotaExceeded`), 5.7.x, nor Microsoft's 5.2.252 (SendAsDenied): every later message meets those too.
/// Through Graph: invalid recipients or a message too large; through the Gmail API: a 400 `invalidArgument` (a
/// header Gmail cannot read).
pub fn refused_for_itself(reply: &str) -> bool {
    // The HTTP transports' words for the same (`upstream::http::refusal`: "SERVICE STATUS CODE: message"),
    // looked for before the message, which is the upstream's own text.
    let codes = reply.split_once(": ").map_or(reply, |(codes, _)| codes);
    let words = |w: &str| codes.split(' ').any(|c| c == w);
    if (reply.starts_with("Graph ")
        && (words("ErrorInvalidRecipients")
            || words("ErrorMessageSizeExceeded")
            || (words("413") && !words("ErrorQuotaExceeded"))))
        || (reply.starts_with("Gmail API 400 ") && words("invalidArgument"))
        // relay's own refusal of a message over the API's size limit
        || ["Graph: the message is ", "Graph: without the attachments relay can upload", "Graph: even without its attachments", "Gmail API: the message is "]
            .iter()
            .any(|p| reply.starts_with(p))
    {
        return true;
    }
    let Some(code) = crate::bounce::enhanced_status(reply) else {
        return false;
    };
    let mut parts = code.split('.').skip(1);
    let about_message = matches!(
        (parts.next(), parts.next()),
        (Some("1"), Some("1" | "2" | "3" | "6" | "10"))
            | (Some("2"), Some("1" | "2" | "3"))
            | (Some("3"), Some("4"))
            | (Some("6"), _)
    );
    about_message && !reply.to_ascii_lowercase().contains("submissionquota")
}

/// A person's grant (device code, authorization code) without a refresh token: relay cannot renew it.
fn unrenewable(a: &AccountConfig, t: &crate::tokens::StoredTokens) -> bool {
    matches!(a.flow, Flow::DeviceCode | Flow::AuthorizationCode) && t.refresh_token.is_none()
}

pub fn account_status(config: &Config, a: &AccountConfig) -> AccountStatus {
    let rfc = |t: SystemTime| humantime::format_rfc3339_seconds(t).to_string();
    let (state, tokens, error) = match TokenStore::for_config(config).and_then(|s| s.load(&a.name))
    {
        Err(e) => ("failing", None, Some(e.to_string())),
        // Client credentials need no authorize step: the daemon fetches a token when it first needs one.
        Ok(None) if a.flow == Flow::ClientCredentials => ("ok", None, None),
        Ok(None) => (
            "needs-authorization",
            None,
            Some(format!("no tokens yet: run `relay authorize {}`", a.name)),
        ),
        Ok(Some(t)) if t.needs_authorization => {
            ("needs-authorization", Some(t.clone()), t.last_error.clone())
        }
        // A person's grant that came without a refresh token is over once its access token is.
        Ok(Some(t)) if unrenewable(a, &t) && t.expires_at <= SystemTime::now() => (
            "needs-authorization",
            Some(t.clone()),
            Some(format!(
                "the grant has no refresh token and its access token ran out at {}: run `relay authorize {}`",
                rfc(t.expires_at),
                a.name
            )),
        ),
        Ok(Some(t)) if t.last_error.is_some() => ("failing", Some(t.clone()), t.last_error.clone()),
        Ok(Some(t)) => ("ok", Some(t), None),
    };
    let last_delivery = read_last_delivery(&config.state_dir, &a.name);
    let test = crate::probe::read_last_test(&config.state_dir, &a.name);
    // A `relay test` that went through after it outweighs it (a quiet relay otherwise stayed `failing` until
    // its next message, whatever the sysadmin fixed and tested).
    let verified_since = |d: &crate::queue::delivery::LastDelivery| {
        // (Not a dead message: the test's own mail may go where the devices' is refused, SendAsDenied say.)
        d.outcome == "deferred"
            && test
                .as_ref()
                .is_some_and(|t| t.result == "verified" && t.at > d.at)
    };
    // The last delivery did not get through: the account is failing, whatever its token says, unless the
    // upstream refused that one message for itself (its dead/ file and the queue's count say so).
    let state = match &last_delivery {
        Some(d) if state == "ok" && d.outcome == "dead" && refused_for_itself(&d.reply) => state,
        Some(d) if verified_since(d) => state,
        Some(d)
            if state == "ok"
                && !matches!(
                    d.outcome.as_str(),
                    "delivered" | "reachable" | "recipients_deferred"
                ) =>
        {
            "failing"
        }
        _ => state,
    };
    let now = SystemTime::now();
    let paused = read_pause(&config.state_dir, &a.name, now);
    let unreachable = crate::upstream::transports::read_unreachable(&config.state_dir, &a.name);
    // Nothing goes through a paused account, nor to an upstream that does not answer, whatever its last delivery
    // was.
    let state = if (paused.is_some() || unreachable.is_some()) && state == "ok" {
        "failing"
    } else {
        state
    };
    let mut warnings: Vec<String> = crate::oauth::expiry::expiries(a)
        .iter()
        .filter_map(|e| crate::oauth::expiry::warning(&a.name, e, now))
        .collect();
    if let Some(t) = tokens
        .as_ref()
        .filter(|t| unrenewable(a, t) && !t.needs_authorization && t.expires_at > SystemTime::now())
    {
        warnings.push(format!(
            "the grant has no refresh token (most often the scope lacks offline_access), so relay cannot renew it: its access token lasts until {}, then mail waits for `relay authorize {}`",
            rfc(t.expires_at),
            a.name
        ));
    }
    let transport_switched = a
        .fallback_transport
        .and_then(|_| crate::upstream::transports::read_switch(&config.state_dir, &a.name));
    let transport = match (a.transport, &transport_switched) {
        (_, Some(_)) => "graph",
        (crate::config::Transport::Smtp, None) => "smtp",
        (crate::config::Transport::Graph, None) => "graph",
        (crate::config::Transport::GmailApi, None) => "gmail_api",
    };
    let (rate, problem) = usage_from_file(&config.state_dir, &a.name, a.limits(), now);
    warnings.extend(problem);
    if rate.day_exhausted() {
        warnings.push(format!(
            "{} recipients in the last 24 hours: the account's daily limit is reached, and its mail waits until the window moves on",
            rate.recipients_last_24h
        ));
    }
    if let Some(u) = &unreachable {
        warnings.push(format!(
            "the upstream {} has not answered a connection since {} ({}), as the daemon last saw it: the account's mail waits in the queue, untried, while one connection at a time tries it; `relay queue retry` tries it at once",
            u.upstream,
            rfc(u.since),
            u.reason
        ));
    }
    if let Some(u) = TokenStore::new(&config.state_dir).unsaved(&a.name) {
        // (A mark `relay test` left is lost once it has exited, whether or not the daemon runs.)
        warnings.push(if u.may_be_held() && crate::queue::relay_runs_on(&config.state_dir) {
            format!(
                "the daemon renewed the grant at {} but cannot write the token file ({}): the grant is held in memory only, and a restart loses it (with a provider that rotates refresh tokens, for good); fix the tokens directory, and relay saves it within minutes",
                rfc(u.since),
                u.why
            )
        } else {
            format!(
                "relay stopped while it held a renewed grant it could not write to the token file ({}, since {}): the file's grant may have been replaced at the provider; if mail does not go, run `relay authorize {}`",
                u.why,
                rfc(u.since),
                a.name
            )
        });
    }
    if let Some(p) = &paused {
        warnings.push(format!(
            "the provider asked the account to pause until {} ({}): its mail is held until then; `relay queue retry` ends every account's pause early",
            rfc(p.until),
            p.reply
        ));
    }
    AccountStatus {
        name: a.name.clone(),
        mailbox: a.mailbox.clone(),
        state,
        transport,
        transport_switched,
        // A file that only records why no token could be had yet holds none.
        token_valid_until: tokens
            .as_ref()
            .filter(|t| t.expires_at > SystemTime::UNIX_EPOCH)
            .map(|t| rfc(t.expires_at)),
        last_refresh: tokens.as_ref().and_then(|t| t.last_refresh).map(rfc),
        last_error: error,
        last_delivery_diagnosis: last_delivery
            .as_ref()
            .filter(|d| d.outcome == "deferred" || d.outcome == "dead")
            .and_then(|d| {
                crate::upstream::diagnosis::for_log(&d.reply, Some(&a.name), Some(a.provider))
            }),
        last_delivery,
        rate,
        paused,
        unreachable,
        test,
        warnings,
    }
}

#[cfg(test)]
mod tests {
    use super::refused_for_itself;

    #[test]
    fn a_certificate_is_due_near_its_end_for_its_lifetime() {
        use std::time::{Duration, SystemTime};
        let day = Duration::from_secs(86_400);
        let now = SystemTime::now();
        let cert = |lifetime: u32, left: u32| crate::certs::Validity {
            not_before: now + day * left - day * lifetime,
            not_after: now + day * left,
        };
        // Let's Encrypt's 90 days, renewed at 30 left: not said at 25, said at 10.
        assert!(super::due(&cert(90, 25), now).is_none());
        assert!(super::due(&cert(90, 10), now).is_some());
        // Six days, renewed every two or three: said only in its last day.
        assert!(super::due(&cert(6, 2), now).is_none());
        assert!(super::due(&cert(6, 1), now).is_some());
        assert!(super::due(&cert(365, 29), now).is_some());
        assert!(super::due(&cert(365, 0), now).is_some(), "expired");
    }

    #[test]
    fn tells_a_refused_message_from_a_refused_account() {
        for message in [
            "550 5.1.1 <a@example.com>: user unknown",
            "552 5.2.2 mailbox full",
            "550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup",
            "552 5.3.4 message too big",
            "553 5.6.7 non-ASCII address, and the upstream has no SMTPUTF8",
            "Graph 400 ErrorInvalidRecipients: At least one recipient is not valid — a recipient address is not valid",
            "Graph 413 : request entity too large",
            "Gmail API 400 invalidArgument: Invalid To header",
            "Gmail API: the message is 40000000 bytes; Gmail takes at most 35 MB",
        ] {
            assert!(refused_for_itself(message), "{message}");
        }
        for account in [
            "550 5.1.8 Access denied, bad outbound sender",
            "550 5.1.90 Your message can't be sent because you've reached your daily limit for message recipients",
            "554 5.2.2 mailbox full; STOREDRV.Submission.Exception:SubmissionQuotaExceededException",
            "550 5.1.7 invalid sender",
            "550 5.7.60 SMTP; Client does not have permissions to send as this sender",
            "554 5.2.252 SendAsDenied; a@b not allowed to send as c@d",
            "554 5.7.1 Message rejected as spam",
            "550 no enhanced code",
            "Graph 403 ErrorAccessDenied: Access is denied",
            "Gmail API 400 failedPrecondition: Precondition check failed.",
        ] {
            assert!(!refused_for_itself(account), "{account}");
        }
    }
}
