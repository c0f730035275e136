//! An account's way out: its configured transport, and for a Microsoft SMTP account with
//! `fallback_transport = "graph"`, the switch to Graph when the tenant has SMTP AUTH off (535 5.7.139) or the
//! mailbox may not use it (550 5.7.30). The switch is logged once (`transport_switched`), kept in
//! `STATE_DIR/accounts/NAME.transport.json` for `relay status` and restarts, and SMTP is tried again daily.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use secrecy::SecretString;
use serde::{Deserialize, Serialize};

use super::gmail::GmailUpstream;
use super::graph::GraphUpstream;
use super::kept::ResumePoint;
use super::outgoing::Outgoing;
use super::smtp::SmtpUpstream;
use super::transcript::TranscriptHandle;
use super::{MailFlags, Outcome};
use crate::tokens::{AccountTokens, TokenError};

/// How often a switched account tries SMTP again.
pub const SMTP_RETRY: Duration = Duration::from_secs(86_400);

// One per account, built once: the size difference costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
pub enum Primary {
    Smtp(SmtpUpstream),
    Graph(GraphUpstream),
    Gmail(GmailUpstream),
}

/// `STATE_DIR/accounts/NAME.transport.json`: the account delivers through Graph since `since`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Switch {
    pub transport: String,
    #[serde(with = "humantime_serde")]
    pub since: SystemTime,
    /// When SMTP was last tried (and refused).
    #[serde(with = "humantime_serde")]
    pub smtp_tried: SystemTime,
    pub reason: String,
}

/// `STATE_DIR/accounts/NAME.KIND.json`: a report on the account's upstream, for `relay status`.
fn report_path(state_dir: &Path, account: &str, kind: &str) -> PathBuf {
    state_dir
        .join("accounts")
        .join(format!("{account}.{kind}.json"))
}

pub fn switch_path(state_dir: &Path, account: &str) -> PathBuf {
    report_path(state_dir, account, "transport")
}

pub fn read_switch(state_dir: &Path, account: &str) -> Option<Switch> {
    crate::small_files::report(&switch_path(state_dir, account))
}

/// `STATE_DIR/accounts/NAME.unreachable.json`: the account's SMTP upstream has not answered a connection since
/// `since`, as the daemon last saw it (written when it stops answering, removed when it answers again and when
/// the daemon starts), for `relay status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Unreachable {
    /// `host:port`.
    pub upstream: String,
    #[serde(with = "humantime_serde")]
    pub since: SystemTime,
    /// Why the connection that began the outage got no answer.
    pub reason: String,
}

pub fn unreachable_path(state_dir: &Path, account: &str) -> PathBuf {
    report_path(state_dir, account, "unreachable")
}

pub fn read_unreachable(state_dir: &Path, account: &str) -> Option<Unreachable> {
    crate::small_files::report(&unreachable_path(state_dir, account))
}

/// At the daemon's start every upstream counts as reachable until a connection says otherwise: a report left
/// by an earlier run is not true any more.
pub fn forget_unreachable(state_dir: &Path, account: &str) {
    let path = unreachable_path(state_dir, account);
    if let Err(e) = remove_report(&path) {
        tracing::warn!(relay_account = %account, error = %e, path = %path.display(), "cannot remove the report of an earlier run that the upstream could not be reached; relay status may show it until the upstream is tried");
    }
}

fn remove_report(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// How long an account's mail waits, untried, after the upstream refused a token fetched for the retry too.
const AUTH_HOLD: Duration = Duration::from_secs(60);

pub struct Transports {
    account: String,
    /// For the diagnosis of a refused login (another provider's words mean something else).
    provider: Option<crate::config::Provider>,
    primary: Primary,
    /// Graph, and the scope of its tokens.
    fallback: Option<(GraphUpstream, String)>,
    switch_file: PathBuf,
    switched: Mutex<Option<Switch>>,
    unreachable_file: PathBuf,
    /// Whether this run wrote `unreachable_file` (an earlier report is removed when the account is built).
    unreachable_recorded: Mutex<bool>,
    /// Since when an earlier run's report said the upstream had not answered (the daemon restarted during an
    /// outage): an outage this run meets before the upstream answers once is the same one, and is reported
    /// since then (else a restart, by a reboot or the watchdog, began its count again, and its alert with it).
    earlier_outage: Mutex<Option<SystemTime>>,
    auth_hold: Mutex<Option<AuthHold>>,
    /// Held by the attempt that refreshes a refused token and tries it: the account's other attempts refused
    /// meanwhile wait for its outcome (the hold, or a token that works) instead of each logging in again.
    retrying: tokio::sync::Mutex<()>,
    /// The last refresh of a refused token that failed, and when: the attempts refused before it give up at once
    /// instead of each asking the token endpoint again.
    refresh_failed: Mutex<Option<RefreshFailed>>,
    /// An HTTP API's trouble (no answer, a 5xx, a proxy in the way): since when, and how many attempts met it.
    api_trouble: Mutex<Option<(std::time::Instant, u32)>>,
    /// Since when the API was in trouble, once a delivery went through after it (for the scheduler).
    api_came_back: Mutex<Option<std::time::Instant>>,
}

/// A refused token whose replacement could not be had (the token endpoint down, a refused secret, no refresh
/// token).
struct RefreshFailed {
    at: SystemTime,
    /// Why no new token came.
    why: String,
    /// The refused token, and the upstream's refusal: until [`AUTH_HOLD`] has passed, the account's attempts do
    /// not log in with it again. The token layer still hands it out while it has not expired (it may be good for
    /// another upstream), and each message logged in and failed once more, which lockout policies count.
    token: blake3::Hash,
    reply: String,
    since: std::time::Instant,
}

/// How long an attempt refused with its token waits for another one's refresh and retry (a whole message sent)
/// before it goes on by itself.
const RETRY_WAIT: Duration = Duration::from_secs(30);

/// The upstream refused the account's token, and then the fresh one too: until `until`, the account's other
/// messages are not tried with that token. Each would otherwise fetch a token and log in twice (a queue of 20
/// made 80 token requests and 160 refused logins in 20 s), and Microsoft and Google lock out or throttle an
/// account that keeps failing to log in. A different token (a `relay authorize`, a refresh that brings a new
/// one) is tried at once.
struct AuthHold {
    until: std::time::Instant,
    token: blake3::Hash,
    reply: String,
    /// How long it is: [`AUTH_HOLD`], doubled for each hold that follows soon after the last.
    length: Duration,
}

/// The longest an account's mail waits after its fresh token is refused, however often it was before.
const MAX_AUTH_HOLD: Duration = Duration::from_secs(15 * 60);

impl Transports {
    pub fn new(
        account: &str,
        state_dir: &Path,
        primary: Primary,
        fallback: Option<(GraphUpstream, String)>,
    ) -> Transports {
        let switched = fallback
            .as_ref()
            .and_then(|_| read_switch(state_dir, account));
        let unreachable_file = unreachable_path(state_dir, account);
        // Read before the caller removes the report (`forget_unreachable`): nothing is recorded by this run yet,
        // so the first outage it meets is written.
        let earlier_outage = read_unreachable(state_dir, account)
            .filter(|u| matches!(&primary, Primary::Smtp(s) if s.endpoint() == u.upstream))
            .map(|u| u.since);
        Transports {
            unreachable_file,
            unreachable_recorded: Mutex::new(false),
            earlier_outage: Mutex::new(earlier_outage),
            account: account.to_string(),
            provider: None,
            primary,
            fallback,
            switch_file: switch_path(state_dir, account),
            switched: Mutex::new(switched),
            auth_hold: Mutex::new(None),
            retrying: tokio::sync::Mutex::new(()),
            refresh_failed: Mutex::new(None),
            api_trouble: Mutex::new(None),
            api_came_back: Mutex::new(None),
        }
    }

    /// Whose servers these are, for the diagnosis of their refusals.
    pub fn with_provider(mut self, provider: crate::config::Provider) -> Transports {
        self.provider = Some(provider);
        self
    }

    /// Whether a Gmail upload session an earlier attempt kept can be asked through this account (it sends through
    /// the Gmail API, with nothing to fall back to that would send the message instead).
    pub fn asks_upload_sessions(&self) -> bool {
        matches!((&self.primary, &self.fallback), (Primary::Gmail(_), None))
    }

    /// Whether a Graph draft an earlier attempt kept can be asked through this account (it sends through Graph,
    /// with nothing that would send the message instead).
    pub fn asks_drafts(&self) -> bool {
        matches!((&self.primary, &self.fallback), (Primary::Graph(_), None))
    }

    /// Upstream SMTP connections open now (none for the HTTP transports).
    pub fn open_connections(&self) -> usize {
        match &self.primary {
            Primary::Smtp(s) => s.open_connections(),
            Primary::Graph(_) | Primary::Gmail(_) => 0,
        }
    }

    /// Closes the SMTP connections idle too long, or closed by the server (see `SmtpUpstream::close_idle`).
    pub fn close_idle(&self) {
        if let Primary::Smtp(s) = &self.primary {
            s.close_idle();
        }
    }

    /// Message bytes one delivery may hold in memory. SMTP and the single-request HTTP uploads (Graph's
    /// `sendMail`, Gmail's media upload) stream from the queue file; Graph's drafts hold the message without its
    /// largest attachments, Gmail's resumable upload a chunk at a time.
    pub fn memory_for(&self, size: u64) -> u64 {
        // SMTP: two chunks in flight (read and written) and a wrapped one (up to about 3.2 times its source).
        let streamed =
            (super::outgoing::CHUNK as u64 * 5).min(size.saturating_mul(2).max(64 << 10));
        // Graph: a message up to its 4 MB request limit streams, unless its envelope differs from its headers
        // (then it goes as a draft); a draft is at most that, whole and base64-encoded, then one upload chunk and
        // its base64 symbols at a time.
        let graph = size
            .saturating_mul(2)
            .min(3 * super::graph::REQUEST_LIMIT as u64);
        // Gmail: the simple upload streams, the resumable one holds a chunk at a time.
        // (With room for a Bcc line and a rewritten header, which count toward the simple upload's limit.)
        let gmail = if size + (1 << 20) <= super::gmail::SIMPLE_LIMIT as u64 {
            streamed
        } else {
            super::gmail::CHUNK as u64 * 2
        };
        match (&self.primary, &self.fallback) {
            (Primary::Smtp(_), None) => streamed,
            (Primary::Gmail(_), None) => gmail,
            (Primary::Graph(_), _) | (_, Some(_)) => graph.max(streamed),
        }
    }

    /// Sends through whichever transport is in use; a refused token gets one refresh and one retry. `resume`:
    /// where a Gmail upload session is kept between the message's attempts through this account. `offered` is
    /// set once any of the message may have reached the upstream (for the sending limits); left unset, nothing
    /// did: there was no token, or no connection or login to the SMTP upstream.
    // The message's parts as the transports take them, and the attempt's two links back to the queue.
    #[allow(clippy::too_many_arguments)]
    pub async fn send(
        &self,
        tokens: &AccountTokens,
        sender: &str,
        recipients: &[String],
        message: &Outgoing,
        flags: MailFlags,
        resume: Option<&Arc<dyn ResumePoint>>,
        offered: &AtomicBool,
    ) -> Outcome {
        let out = self
            .send_now(tokens, sender, recipients, message, flags, resume, offered)
            .await;
        self.record_reach();
        out
    }

    /// Follows an HTTP API's trouble, as `smtp/reach.rs` follows an SMTP upstream that does not answer: the first
    /// delivery after two or more attempts met it, with nothing delivered between, says the API is back, and the
    /// mail it deferred meanwhile goes at once instead of at its retry schedule's next step (hours later after a
    /// long outage). An attempt made early that way does not count towards a trouble: messages the API refuses on
    /// their own (a 500 for what it cannot take) are woken once, not at every delivery. `offered`: the API was
    /// asked (no token is not its trouble). Called by delivery with each attempt's outcome.
    pub fn note_attempt(&self, out: &Outcome, offered: bool, early: bool) {
        if matches!(self.primary, Primary::Smtp(_)) && !self.graph_now() {
            return;
        }
        let Ok(mut trouble) = self.api_trouble.lock() else {
            return;
        };
        match out {
            Outcome::Transient(_) if offered && !early => {
                let now = std::time::Instant::now();
                let (since, n) = trouble.unwrap_or((now, 0));
                *trouble = Some((since, n.saturating_add(1)));
            }
            Outcome::Delivered(_) => {
                if let Some((since, n)) = trouble.take()
                    && n >= 2
                    && let Ok(mut back) = self.api_came_back.lock()
                {
                    tracing::info!(relay_account = %self.account, attempts = n, "the account's API takes mail again");
                    *back = Some(back.map_or(since, |b| b.min(since)));
                }
            }
            _ => {}
        }
    }

    /// An SMTP upstream that is down, with its hold over and no try under way: tried once without a message
    /// ([`super::smtp::SmtpUpstream::check_reach`]), and the report kept in step. Whether it greeted with 220.
    pub async fn check_reach(&self) -> bool {
        if let Primary::Smtp(s) = &self.primary
            && !self.graph_now()
            && self.reachability(std::time::Instant::now()) == super::smtp::Reachability::Probe
        {
            let greeted = s.check_reach().await;
            self.record_reach();
            return greeted;
        }
        false
    }

    /// Keeps [`Unreachable`]'s file in step with the SMTP upstream: written when it stops answering, removed
    /// when it answers again. A file operation per change, not per attempt.
    fn record_reach(&self) {
        // Under the lock, so that two attempts ending together write in the order they saw.
        let Ok(mut recorded) = self.unreachable_recorded.lock() else {
            return;
        };
        // Not down for an account that delivers through Graph meanwhile, nor for one that no longer uses SMTP.
        let outage = self.outage(std::time::Instant::now());
        // It answered: a later outage is another one than the earlier run's (also when nothing is to be written).
        if outage.is_none()
            && let Ok(mut e) = self.earlier_outage.lock()
        {
            e.take();
        }
        if outage.is_some() == *recorded {
            return;
        }
        *recorded = outage.is_some();
        let earlier = self.earlier_outage.lock().ok().and_then(|e| *e);
        // Not fsynced: a report; lost in a crash, the daemon's start would remove it anyway.
        let written = match (outage, &self.primary) {
            (Some((down, reason)), Primary::Smtp(s)) => {
                let since = SystemTime::now()
                    .checked_sub(down)
                    .unwrap_or_else(SystemTime::now);
                crate::state_files::replace(
                    &self.unreachable_file,
                    &serde_json::to_vec_pretty(&Unreachable {
                        upstream: s.endpoint(),
                        since: earlier.map_or(since, |e| e.min(since)),
                        reason,
                    })
                    .unwrap_or_default(),
                )
            }
            _ => remove_report(&self.unreachable_file),
        };
        if let Err(e) = written {
            tracing::warn!(relay_account = %self.account, error = %e, "cannot record whether the upstream can be reached (for relay status)");
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn send_now(
        &self,
        tokens: &AccountTokens,
        sender: &str,
        recipients: &[String],
        message: &Outgoing,
        flags: MailFlags,
        resume: Option<&Arc<dyn ResumePoint>>,
        offered: &AtomicBool,
    ) -> Outcome {
        let Some((graph, scope)) = &self.fallback else {
            // A draft kept from when this account had Graph (a reload took `fallback_transport` away) cannot be
            // asked any more: said, since the message may arrive twice.
            if matches!(self.primary, Primary::Smtp(_))
                && let Some(d) = resume.and_then(|r| r.draft())
                && d.sent_at.is_some()
            {
                tracing::warn!(relay_account = %self.account, "the message has a Graph draft sent without a clear answer, and this account no longer sends through Graph to ask it: sent through SMTP, it may arrive twice");
            }
            return self
                .primary(tokens, sender, recipients, message, flags, resume, offered)
                .await;
        };
        let switched = self.switched.lock().ok().and_then(|s| s.clone());
        // A Graph draft an earlier attempt kept may have been sent: only Graph can ask it, and SMTP's daily try
        // (or SMTP back in use) must not send the message anew meanwhile.
        let draft_kept = resume.is_some_and(|r| r.draft().is_some());
        if draft_kept
            || switched
                .as_ref()
                .is_some_and(|sw| SystemTime::now() < sw.smtp_tried + SMTP_RETRY)
        {
            return via_graph(graph, tokens, scope, recipients, message, resume, offered).await;
        }
        let out = self
            .primary(tokens, sender, recipients, message, flags, resume, offered)
            .await;
        // Back to SMTP only once it took mail: the daily try of a switched account failing for another reason
        // (the upstream unreachable, a 4xx, a busy mailbox) says nothing about SMTP AUTH; the message goes
        // through Graph as the others do, and SMTP is tried again the next day. (Switching back on such a
        // failure left the account's mail on an SMTP upstream it could not reach, with Graph working.)
        // (Every recipient refused after MAIL was taken shows the login works as well: those refusals stand.)
        let smtp_took_it = matches!(
            out,
            Outcome::Delivered(_) | Outcome::Partial { .. } | Outcome::Refused { .. }
        );
        if switched.is_none() && !smtp_auth_off(&out) {
            return out;
        }
        if switched.is_some() && smtp_took_it {
            tracing::warn!(relay_event = "transport_restored", relay_account = %self.account, "SMTP AUTH works again for this account: back from Graph to SMTP");
            self.set_switch(None);
            return out;
        }
        let now = SystemTime::now();
        let sw = match switched {
            Some(mut sw) => {
                sw.smtp_tried = now;
                sw
            }
            None => {
                tracing::warn!(relay_event = "transport_switched", relay_account = %self.account, relay_upstream_reply = %out.reply(), "SMTP AUTH is refused for this mailbox; delivering through Microsoft Graph from now on (SMTP is tried again daily)");
                Switch {
                    transport: "graph".into(),
                    since: now,
                    smtp_tried: now,
                    reason: out.reply().to_string(),
                }
            }
        };
        self.set_switch(Some(sw));
        via_graph(graph, tokens, scope, recipients, message, resume, offered).await
    }

    #[allow(clippy::too_many_arguments)]
    async fn primary(
        &self,
        tokens: &AccountTokens,
        sender: &str,
        recipients: &[String],
        message: &Outgoing,
        flags: MailFlags,
        resume: Option<&Arc<dyn ResumePoint>>,
        offered: &AtomicBool,
    ) -> Outcome {
        let attempt = |token: SecretString| async move {
            match &self.primary {
                Primary::Smtp(s) => {
                    s.send(&token, sender, recipients, message, flags, offered)
                        .await
                }
                // An HTTP request carries the message from its first byte.
                Primary::Graph(g) => {
                    offered.store(true, Ordering::Relaxed);
                    g.send(&token, recipients, message, resume).await
                }
                Primary::Gmail(g) => {
                    offered.store(true, Ordering::Relaxed);
                    g.send(&token, recipients, message, resume).await
                }
            }
        };
        let token = match tokens.access_token().await {
            Ok(t) => t,
            Err(e) => return Outcome::Transient(e.to_string()),
        };
        if let Some(reply) = self.held(&token) {
            return Outcome::Held {
                reply,
                tried: false,
            };
        }
        if let Some(why) = self.unreplaced(&token) {
            return Outcome::Transient(why);
        }
        let first = attempt(token.clone()).await;
        if !matches!(first, Outcome::AuthRejected(_)) {
            self.set_hold(None);
            return first;
        }
        // The token may have been revoked or rotated early: one refresh, one retry, then defer. One refresh for
        // the account at a time: the attempts refused meanwhile wait for its retry (bounded), then find its hold,
        // or its token that works.
        let refused_at = SystemTime::now();
        let mut one = tokio::time::timeout(RETRY_WAIT, self.retrying.lock())
            .await
            .ok();
        // Refused with the token another attempt already refreshed to and was refused with again. Here and below,
        // a refusal met under the hold is the account's, not the message's: the message is held (no step of its
        // retry schedule), and goes through another account of its route if it has one.
        if let Some(reply) = self.held(&token) {
            return Outcome::Held { reply, tried: true };
        }
        // The refusal is said with the renewal's failure: alone, the latter pointed at the token endpoint only
        // (`cannot reach …`), and the upstream's 535 was nowhere in the log.
        let refused = |why: &str| {
            Outcome::Transient(format!(
                "the upstream refused the account's token ({}){}{why}",
                first.reply(),
                super::NO_NEW_TOKEN
            ))
        };
        if let Some(failed) = self.refresh_failed_since(refused_at) {
            return refused(&failed);
        }
        let key = token_key(&token);
        let fresh = match tokens.replace_refused(&token, refused_at).await {
            Ok((t, refreshed)) => {
                if !refreshed {
                    // Another attempt's token: tried without holding up the others.
                    one = None;
                }
                t
            }
            Err(e) => {
                let why = e.to_string();
                if let Ok(mut f) = self.refresh_failed.lock() {
                    *f = Some(RefreshFailed {
                        at: SystemTime::now(),
                        why: why.clone(),
                        token: key,
                        reply: first.reply().to_string(),
                        since: std::time::Instant::now(),
                    });
                }
                return refused(&why);
            }
        };
        if let Some(reply) = self.held(&fresh) {
            return Outcome::Held { reply, tried: true };
        }
        let key = token_key(&fresh);
        let second = attempt(fresh).await;
        let Outcome::AuthRejected(reply) = second else {
            self.set_hold(None);
            return second;
        };
        let now = std::time::Instant::now();
        let mut h = self
            .auth_hold
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Two attempts that refreshed together are refused together: the hold is said once.
        let again = h.as_ref().is_some_and(|h| h.token == key && now < h.until);
        // Refused again soon after a hold ended: the next is twice as long (up to MAX_AUTH_HOLD), so that an
        // account left without its permission for days does not log in and fail every minute.
        let length = match h.as_ref() {
            Some(prev) if again => prev.length,
            Some(prev) if now < prev.until + prev.length * 2 => {
                (prev.length * 2).min(MAX_AUTH_HOLD)
            }
            _ => AUTH_HOLD,
        };
        *h = Some(AuthHold {
            until: now + length,
            token: key,
            reply: reply.clone(),
            length,
        });
        drop(h);
        if !again {
            let d = super::diagnosis::Diagnosed::of(&reply, Some(&self.account), self.provider);
            tracing::warn!(relay_event = "login_refused", relay_account = %self.account, relay_upstream_reply = %reply, relay_diagnosis = d.field(), "the upstream refused a freshly fetched token too; the account's mail waits {} before it is tried again (at once after `relay authorize`, `relay queue retry` or a new token){d}", humantime::format_duration(length));
            // An account with Graph to fall back on goes that way now (`send_now`): its mail does not wait.
            let switching =
                self.fallback.is_some() && smtp_auth_off(&Outcome::AuthRejected(reply.clone()));
            if !switching {
                crate::events::emit(crate::events::Event::LoginRefused {
                    account: &self.account,
                    why: &format!("{reply}{d}"),
                });
            }
        }
        drop(one);
        Outcome::Held { reply, tried: true }
    }

    /// Why a refresh of a refused token failed, if one did after `refused_at`.
    fn refresh_failed_since(&self, refused_at: SystemTime) -> Option<String> {
        let failed = self.refresh_failed.lock().ok()?;
        let f = failed.as_ref()?;
        (f.at >= refused_at).then(|| f.why.clone())
    }

    /// Why `token` is not tried now, if the upstream refused it less than [`AUTH_HOLD`] ago and no replacement
    /// could be had: the deferral says both, as the attempt that met them did.
    fn unreplaced(&self, token: &SecretString) -> Option<String> {
        let failed = self.refresh_failed.lock().ok()?;
        let f = failed.as_ref()?;
        (f.token == token_key(token) && f.since.elapsed() < AUTH_HOLD).then(|| {
            format!(
                "the upstream refused the account's token ({}) less than {} ago, not tried again{}{}",
                f.reply,
                humantime::format_duration(AUTH_HOLD),
                super::NO_NEW_TOKEN,
                f.why
            )
        })
    }

    /// Why `token` is not to be tried now, if the upstream refused it moments ago.
    fn held(&self, token: &SecretString) -> Option<String> {
        let hold = self.auth_hold.lock().ok()?;
        let hold = hold.as_ref()?;
        let now = std::time::Instant::now();
        (hold.token == token_key(token) && now < hold.until).then(|| {
            format!(
                "{} (not tried: the upstream refused this account's fresh token less than {} ago)",
                hold.reply,
                humantime::format_duration(hold.length)
            )
        })
    }

    /// `relay queue retry`: the sysadmin says the cause may be gone (a permission granted, a mailbox enabled), so
    /// the account's next attempt tries its token instead of answering from the hold. Whether there was one.
    pub fn lift_hold(&self) -> bool {
        if let Ok(mut f) = self.refresh_failed.lock() {
            *f = None;
        }
        self.auth_hold
            .lock()
            .ok()
            .and_then(|mut h| h.take())
            .is_some_and(|h| std::time::Instant::now() < h.until)
    }

    /// `relay queue retry`: an SMTP upstream that could not be reached a moment ago is tried again at once (one
    /// connection at a time until it answers). Whether its mail was being held.
    pub fn lift_unreachable(&self) -> bool {
        match &self.primary {
            Primary::Smtp(s) => s.lift_hold(),
            Primary::Graph(_) | Primary::Gmail(_) => false,
        }
    }

    /// Whether the account's upstream may be connected to now (an SMTP upstream that did not answer a moment
    /// ago is held, then tried by one connection at a time; see `smtp/reach.rs`). An account switched to Graph
    /// whose daily SMTP try is not due goes through Graph, whatever its SMTP upstream does.
    pub fn reachability(&self, now: std::time::Instant) -> super::smtp::Reachability {
        let Primary::Smtp(s) = &self.primary else {
            return super::smtp::Reachability::Up;
        };
        if self.graph_now() {
            return super::smtp::Reachability::Up;
        }
        s.reachability(now)
    }

    /// Whether the account's mail goes through Graph now (switched, its daily SMTP try not due).
    fn graph_now(&self) -> bool {
        self.fallback.is_some()
            && self.switched.lock().ok().is_some_and(|sw| {
                sw.as_ref()
                    .is_some_and(|sw| SystemTime::now() < sw.smtp_tried + SMTP_RETRY)
            })
    }

    /// Whether the account's mail may go now: [`Self::reachability`], and no hold after its fresh token was
    /// refused. Held, the account is as if down: its mail waits untried (no attempt, no state written), or goes
    /// through another account of its route.
    pub fn ready(&self, now: std::time::Instant) -> super::smtp::Reachability {
        // The hold is on the primary transport's token; mail going through Graph instead does not meet it.
        if self.graph_now() {
            return super::smtp::Reachability::Up;
        }
        let held = self
            .auth_hold
            .lock()
            .ok()
            .and_then(|h| h.as_ref().map(|h| h.until))
            .filter(|until| now < *until);
        match held {
            Some(until) => super::smtp::Reachability::Held(until),
            None => self.reachability(now),
        }
    }

    /// While the account's mail waits for an SMTP upstream that does not answer (see [`Self::reachability`]):
    /// for how long so far, and why its last connection failed.
    pub fn outage(&self, now: std::time::Instant) -> Option<(std::time::Duration, String)> {
        if self.reachability(now) == super::smtp::Reachability::Up {
            return None;
        }
        match &self.primary {
            Primary::Smtp(s) => s.outage(now),
            Primary::Graph(_) | Primary::Gmail(_) => None,
        }
    }

    /// Since when the SMTP upstream did not answer, if it answers again since this was last asked.
    pub fn take_came_back(&self) -> Option<std::time::Instant> {
        // (An SMTP account switched to Graph follows Graph's trouble too.)
        let api = self.api_came_back.lock().ok().and_then(|mut b| b.take());
        match &self.primary {
            Primary::Smtp(s) => match (s.take_came_back(), api) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            },
            Primary::Graph(_) | Primary::Gmail(_) => api,
        }
    }

    fn set_hold(&self, hold: Option<AuthHold>) {
        if let Ok(mut h) = self.auth_hold.lock() {
            *h = hold;
        }
    }

    /// `relay test`: one message through the transport in use now, every step into `transcript`; no token retry
    /// and no fallback switch, so that what is shown is what happened.
    pub async fn probe(
        &self,
        tokens: &AccountTokens,
        sender: &str,
        recipients: &[String],
        message: &Outgoing,
        transcript: TranscriptHandle,
    ) -> Outcome {
        let note = |line: &str| {
            if let Ok(mut t) = transcript.lock() {
                t.note(line);
            }
        };
        let switched = self.switched.lock().is_ok_and(|s| s.is_some());
        let graph = self.fallback.as_ref().filter(|_| switched);
        let token = match graph {
            Some((_, scope)) => tokens.scoped_token(scope, false).await,
            None => tokens.access_token().await,
        };
        let token = match token {
            Ok(t) => t,
            Err(e) => {
                note(&format!("no access token: {e}"));
                return Outcome::Transient(e.to_string());
            }
        };
        note("access token ready (not shown)");
        let out = self
            .probe_once(graph, &token, sender, recipients, message, &transcript)
            .await;
        if !matches!(out, Outcome::AuthRejected(_)) {
            return out;
        }
        // As the daemon does: a token revoked or rotated early gets one renewal and one more try.
        note("the upstream refused the token: renewing it once and trying again");
        let fresh = match graph {
            Some((_, scope)) => tokens.scoped_token(scope, true).await,
            None => tokens
                .replace_refused(&token, SystemTime::now())
                .await
                .map(|(t, _)| t),
        };
        match fresh {
            Ok(t) => {
                self.probe_once(graph, &t, sender, recipients, message, &transcript)
                    .await
            }
            Err(e) => {
                note(&format!("no fresh access token: {e}"));
                out
            }
        }
    }

    /// One try of [`Self::probe`] with `token`, through Graph when `graph` is given (a switched account).
    async fn probe_once(
        &self,
        graph: Option<&(GraphUpstream, String)>,
        token: &SecretString,
        sender: &str,
        recipients: &[String],
        message: &Outgoing,
        transcript: &TranscriptHandle,
    ) -> Outcome {
        let note = |line: &str| {
            if let Ok(mut t) = transcript.lock() {
                t.note(line);
            }
        };
        let http = |method_url: String, out: Outcome| {
            if let Ok(mut t) = transcript.lock() {
                t.client(&method_url);
                t.client("Authorization: Bearer (token)");
                t.server(out.reply());
            }
            out
        };
        match (&self.primary, graph) {
            (_, Some((g, _))) | (Primary::Graph(g), None) => {
                note("through Microsoft Graph");
                let out = g.send(token, recipients, message, None).await;
                http(
                    format!("POST {}/sendMail (or a draft and its send)", g.endpoint()),
                    out,
                )
            }
            (Primary::Gmail(g), None) => {
                note("through the Gmail API");
                // Nothing kept: a test message is sent once, not queued.
                let out = g.send(token, recipients, message, None).await;
                http(format!("POST {}", g.endpoint()), out)
            }
            (Primary::Smtp(s), None) => {
                s.send_traced(token, sender, recipients, message, transcript.clone())
                    .await
            }
        }
    }

    fn set_switch(&self, sw: Option<Switch>) {
        if let Ok(mut s) = self.switched.lock() {
            s.clone_from(&sw);
        }
        // Not fsynced: it is a report and a hint; lost, the next refused SMTP attempt switches again.
        let written = match &sw {
            Some(sw) => crate::state_files::replace(
                &self.switch_file,
                &serde_json::to_vec_pretty(sw).unwrap_or_default(),
            ),
            None => remove_report(&self.switch_file),
        };
        if let Err(e) = written {
            tracing::warn!(relay_account = %self.account, error = %e, "cannot record the transport switch");
        }
    }
}

async fn via_graph(
    graph: &GraphUpstream,
    tokens: &AccountTokens,
    scope: &str,
    recipients: &[String],
    message: &Outgoing,
    resume: Option<&Arc<dyn ResumePoint>>,
    offered: &AtomicBool,
) -> Outcome {
    let token = |fresh| tokens.scoped_token(scope, fresh);
    let send = |t: SecretString| async move {
        offered.store(true, Ordering::Relaxed);
        graph.send(&t, recipients, message, resume).await
    };
    let first = match token(false).await {
        Ok(t) => send(t).await,
        Err(e) => return token_trouble(e),
    };
    if !matches!(first, Outcome::AuthRejected(_)) {
        return first;
    }
    match token(true).await {
        Ok(t) => send(t).await,
        Err(e) => Outcome::Transient(format!(
            "Graph refused the account's token ({}){}{e}",
            first.reply(),
            super::NO_NEW_TOKEN
        )),
    }
}

/// A token, for comparing without keeping it.
fn token_key(token: &SecretString) -> blake3::Hash {
    use secrecy::ExposeSecret;
    blake3::hash(token.expose_secret().as_bytes())
}

fn token_trouble(e: TokenError) -> Outcome {
    Outcome::Transient(format!("no Graph token: {e}"))
}

/// 535 5.7.139: SMTP AUTH is disabled for the tenant; 550 5.7.30: basic authentication / SMTP AUTH is not
/// supported for this mailbox.
fn smtp_auth_off(out: &Outcome) -> bool {
    match out {
        Outcome::AuthRejected(r)
        | Outcome::Permanent(r)
        | Outcome::Transient(r)
        | Outcome::Held { reply: r, .. } => {
            r.contains("5.7.139") || (r.contains("550") && r.contains("5.7.30"))
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_api_outage_ends_with_a_delivery_and_lone_refusals_are_woken_once() {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let dir = tempfile::tempdir().unwrap();
        let graph = GraphUpstream::new("http://127.0.0.1:9", "m@example.com".into(), true).unwrap();
        let t = Transports::new("office", dir.path(), Primary::Graph(graph), None);
        let failed = Outcome::Transient("Graph 503 ServiceUnavailable: down".into());
        let ok = Outcome::Delivered("Graph 202 Accepted".into());
        // One failure, then a delivery: one message the API would not take, not an outage.
        t.note_attempt(&failed, true, false);
        t.note_attempt(&ok, true, false);
        assert_eq!(t.take_came_back(), None);
        // Two, then a delivery: the API is back.
        t.note_attempt(&failed, true, false);
        t.note_attempt(&failed, true, false);
        t.note_attempt(&ok, true, false);
        assert!(t.take_came_back().is_some());
        // The messages woken that way fail again: not a new outage to wake them for at the next delivery.
        t.note_attempt(&failed, true, true);
        t.note_attempt(&failed, true, true);
        t.note_attempt(&ok, true, false);
        assert_eq!(t.take_came_back(), None);
        // Nothing asked (no token): not the API's trouble.
        t.note_attempt(&failed, false, false);
        t.note_attempt(&failed, false, false);
        t.note_attempt(&ok, true, false);
        assert_eq!(t.take_came_back(), None);
    }
}
