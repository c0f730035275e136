//! Delivery: takes queued messages when they are due, sends them through their account, and acts on the
//! outcome: remove (delivered), retry later on the `[queue] retry` schedule (deferred), or move to `dead/`.
//!
//! Delivery state that changes (attempts, next try, last error) lives in `queue/ID.state`, written atomically
//! after each failed attempt; the message file itself is never rewritten.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, mpsc, watch};

use super::route::Routing;
use super::seal::verify;
use super::spool::{SpoolPaths, msg_path};
use super::store::QueuedMessage;
use super::{QueueId, QueueStore};
use crate::config::{Config, QueueConfig};
use crate::tokens::{AccountTokens, TokenError};
use crate::upstream::Outcome;
use crate::upstream::smtp::SmtpUpstream;

/// Deliveries in flight per account: Microsoft allows a few concurrent SMTP connections per mailbox.
const PER_ACCOUNT: usize = 4;

/// An upstream account as delivery sees it.
pub struct Account {
    pub name: String,
    pub tokens: Arc<AccountTokens>,
    pub upstream: SmtpUpstream,
    slots: Semaphore,
    last_written: std::sync::Mutex<Option<(std::time::Instant, &'static str)>>,
}

/// `STATE_DIR/accounts/NAME.json`: the last delivery result, for `relay status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LastDelivery {
    #[serde(with = "humantime_serde")]
    pub at: SystemTime,
    /// `delivered`, `deferred` or `dead`.
    pub outcome: String,
    pub reply: String,
}

pub fn last_delivery_path(state_dir: &Path, account: &str) -> PathBuf {
    state_dir.join("accounts").join(format!("{account}.json"))
}

pub fn read_last_delivery(state_dir: &Path, account: &str) -> Option<LastDelivery> {
    serde_json::from_slice(&std::fs::read(last_delivery_path(state_dir, account)).ok()?).ok()
}

impl Account {
    /// Records the last result for `relay status`: at once when the kind of outcome changes, else at most once a
    /// second, so a busy relay does not write a file per message. Not fsynced: it is a report, not mail.
    fn record(&self, state_dir: &Path, outcome: &'static str, reply: &str) {
        let now = std::time::Instant::now();
        if let Ok(mut last) = self.last_written.lock() {
            if let Some((at, kind)) = *last
                && kind == outcome
                && now.duration_since(at) < Duration::from_secs(1)
            {
                return;
            }
            *last = Some((now, outcome));
        }
        let path = last_delivery_path(state_dir, &self.name);
        let doc = LastDelivery {
            at: SystemTime::now(),
            outcome: outcome.to_string(),
            reply: reply.to_string(),
        };
        let tmp = path.with_extension("json.tmp");
        let written = std::fs::create_dir_all(path.parent().unwrap_or(state_dir))
            .and_then(|()| {
                std::fs::write(&tmp, serde_json::to_vec_pretty(&doc).unwrap_or_default())
            })
            .and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = written {
            tracing::debug!(error = %e, "cannot record the last delivery");
        }
    }

    pub fn new(name: String, tokens: Arc<AccountTokens>, upstream: SmtpUpstream) -> Account {
        Account {
            name,
            tokens,
            upstream,
            slots: Semaphore::new(PER_ACCOUNT),
            last_written: std::sync::Mutex::new(None),
        }
    }
}

/// `queue/ID.state` (and `dead/ID.state`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DeliveryState {
    pub attempts: u32,
    #[serde(
        default,
        with = "humantime_serde::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub next_attempt: Option<SystemTime>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

fn mtime(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

pub fn state_path(dir: &Path, id: QueueId) -> PathBuf {
    dir.join(format!("{id}.state"))
}

pub fn read_state(dir: &Path, id: QueueId) -> DeliveryState {
    std::fs::read(state_path(dir, id))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

fn write_state(dir: &Path, id: QueueId, state: &DeliveryState) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = atomic_write_file::AtomicWriteFile::open(state_path(dir, id))?;
    f.write_all(&serde_json::to_vec_pretty(state).unwrap_or_default())?;
    f.commit()
}

/// `STATE_DIR/.retry`, touched by `relay queue retry` and `relay authorize`: the daemon rereads the queue's
/// schedule when it changes (checked every 2 s; a file, so that it works without a control socket).
pub const RETRY_TRIGGER: &str = ".retry";
/// How often the daemon looks at the trigger.
const TRIGGER_CHECK: Duration = Duration::from_secs(2);

/// Makes messages due now (`ids`, or every queued message) and tells a running daemon. Returns how many.
pub fn request_retry(state_dir: &Path, ids: Option<&[QueueId]>) -> std::io::Result<usize> {
    let paths = SpoolPaths::new(state_dir);
    let all: Vec<QueueId> = match ids {
        Some(ids) => ids.to_vec(),
        None => QueueStore::new(state_dir)
            .list()
            .map_err(|e| std::io::Error::other(e.to_string()))?
            .into_iter()
            .map(|m| m.envelope.id)
            .collect(),
    };
    for id in &all {
        let mut state = read_state(&paths.queue, *id);
        if state.next_attempt.take().is_some() {
            write_state(&paths.queue, *id, &state)?;
        }
    }
    touch_trigger(state_dir)?;
    Ok(all.len())
}

/// Tells a running daemon to reread the queue's schedule.
pub fn touch_trigger(state_dir: &Path) -> std::io::Result<()> {
    let path = state_dir.join(RETRY_TRIGGER);
    std::fs::write(
        path,
        humantime::format_rfc3339_nanos(SystemTime::now()).to_string(),
    )
}

pub struct Scheduler {
    /// Counts finished delivery attempts, so that tests (and status) can wait for one without polling.
    pub attempts: watch::Sender<u64>,
    paths: SpoolPaths,
    queue: QueueConfig,
    routing: Routing,
    accounts: HashMap<String, Arc<Account>>,
}

impl Scheduler {
    pub fn new(config: &Config, accounts: Vec<Arc<Account>>) -> Scheduler {
        Scheduler {
            attempts: watch::channel(0).0,
            paths: SpoolPaths::new(&config.state_dir),
            queue: config.queue.clone(),
            routing: Routing::new(config),
            accounts: accounts.into_iter().map(|a| (a.name.clone(), a)).collect(),
        }
    }

    /// Runs until `stop`: takes new messages from `committed`, and every queued one when it falls due.
    pub async fn run(
        self,
        mut committed: mpsc::UnboundedReceiver<QueueId>,
        mut stop: watch::Receiver<bool>,
    ) {
        if self.accounts.is_empty() {
            // Nothing to deliver through: mail stays queued, untouched, until an account is configured.
            let _ = stop.wait_for(|s| *s).await;
            return;
        }
        let this = Arc::new(self);
        let mut due: BinaryHeap<Reverse<(SystemTime, QueueId)>> = BinaryHeap::new();
        let mut in_flight: HashSet<QueueId> = HashSet::new();
        let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(QueueId, Option<SystemTime>)>();
        let trigger = this
            .paths
            .queue
            .parent()
            .unwrap_or(Path::new("."))
            .join(RETRY_TRIGGER);
        let mut trigger_seen = mtime(&trigger);
        this.load_schedule(&mut due, &in_flight);
        let mut check = tokio::time::interval(TRIGGER_CHECK);
        loop {
            let now = SystemTime::now();
            while let Some(Reverse((at, id))) = due.peek().copied() {
                if at > now {
                    break;
                }
                due.pop();
                if in_flight.insert(id) {
                    let this = this.clone();
                    let done = done_tx.clone();
                    tokio::spawn(async move {
                        let next = this.attempt(id).await;
                        let _ = done.send((id, next));
                    });
                }
            }
            let sleep = due
                .peek()
                .map(|Reverse((at, _))| at.duration_since(now).unwrap_or_default())
                .unwrap_or(Duration::from_secs(3600));
            tokio::select! {
                Some(id) = committed.recv() => due.push(Reverse((SystemTime::now(), id))),
                Some((id, next)) = done_rx.recv() => {
                    in_flight.remove(&id);
                    this.attempts.send_modify(|n| *n += 1);
                    if let Some(at) = next {
                        due.push(Reverse((at, id)));
                    }
                }
                _ = tokio::time::sleep(sleep) => {}
                _ = check.tick() => {
                    let now_seen = mtime(&trigger);
                    if now_seen != trigger_seen {
                        trigger_seen = now_seen;
                        due.clear();
                        this.load_schedule(&mut due, &in_flight);
                    }
                }
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    }

    /// Every queued message not in flight, due at its recorded next attempt (now, if none).
    fn load_schedule(
        &self,
        due: &mut BinaryHeap<Reverse<(SystemTime, QueueId)>>,
        in_flight: &HashSet<QueueId>,
    ) {
        let state_dir = self.paths.queue.parent().unwrap_or(Path::new("."));
        match QueueStore::new(state_dir).list() {
            Ok(list) => {
                for m in list
                    .into_iter()
                    .filter(|m| !in_flight.contains(&m.envelope.id))
                {
                    let state = read_state(&self.paths.queue, m.envelope.id);
                    due.push(Reverse((
                        state.next_attempt.unwrap_or(SystemTime::UNIX_EPOCH),
                        m.envelope.id,
                    )));
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot read the queue"),
        }
    }

    /// One delivery attempt. Returns when to try again, if the message stays queued.
    async fn attempt(&self, id: QueueId) -> Option<SystemTime> {
        let path = msg_path(&self.paths.queue, id);
        let msg = QueuedMessage::read(&path).ok()?;
        let mut state = read_state(&self.paths.queue, id);
        let bytes = match tokio::fs::read(&path).await {
            Ok(b) => b,
            Err(_) => return None, // deleted meanwhile (relay queue delete)
        };
        let message = bytes.get(msg.offset as usize..).unwrap_or_default();
        if !verify(&msg.seal, message) {
            self.dead(
                id,
                &mut state,
                "message file damaged on disk (its seal does not match)",
                None,
            );
            return None;
        }
        if msg
            .envelope
            .received_at
            .checked_add(self.queue.max_age)
            .is_some_and(|end| end < SystemTime::now())
        {
            let why = format!(
                "expired after {} in the queue",
                humantime::format_duration(self.queue.max_age)
            );
            let why = match &state.last_error {
                Some(last) => format!("{why}; last error: {last}"),
                None => why,
            };
            self.dead(id, &mut state, &why, None);
            return None;
        }
        let Some(name) = self.routing.account_for(&msg.envelope) else {
            return self.defer(
                id,
                &mut state,
                "no account is configured for this message",
                None,
            );
        };
        let Some(account) = self.accounts.get(name) else {
            return self.defer(
                id,
                &mut state,
                &format!("account {name} is not configured"),
                None,
            );
        };
        let _slot = account.slots.acquire().await.ok()?;
        let e = &msg.envelope;
        let outcome = match account.tokens.access_token().await {
            Ok(token) => {
                let first = account
                    .upstream
                    .send(&token, &e.sender, &e.recipients, message)
                    .await;
                if let Outcome::AuthRejected(_) = first {
                    // The token may have been revoked or rotated early: one refresh, one retry, then defer.
                    match account.tokens.force_refresh().await {
                        Ok(token) => {
                            account
                                .upstream
                                .send(&token, &e.sender, &e.recipients, message)
                                .await
                        }
                        Err(err) => Outcome::Transient(err.to_string()),
                    }
                } else {
                    first
                }
            }
            Err(err @ TokenError::NeedsAuthorization(_)) => Outcome::Transient(err.to_string()),
            Err(err) if err.is_transient() => Outcome::Transient(err.to_string()),
            Err(err) => Outcome::Transient(err.to_string()),
        };
        let state_dir = self.paths.queue.parent().unwrap_or(Path::new("."));
        match &outcome {
            Outcome::Delivered(r) => account.record(state_dir, "delivered", r),
            Outcome::Permanent(r) => account.record(state_dir, "dead", r),
            Outcome::Transient(r) | Outcome::AuthRejected(r) => {
                account.record(state_dir, "deferred", r)
            }
        }
        match outcome {
            Outcome::Delivered(reply) => {
                let _ = std::fs::remove_file(&path);
                let _ = std::fs::remove_file(state_path(&self.paths.queue, id));
                tracing::info!(relay_event = "delivered", relay_queue_id = %id, relay_account = %account.name, relay_upstream_reply = %reply, "delivered");
                None
            }
            Outcome::Permanent(reply) => {
                self.dead(id, &mut state, &reply, Some(&account.name));
                None
            }
            Outcome::Transient(reply) | Outcome::AuthRejected(reply) => {
                self.defer(id, &mut state, &reply, Some(&account.name))
            }
        }
    }

    fn defer(
        &self,
        id: QueueId,
        state: &mut DeliveryState,
        why: &str,
        account: Option<&str>,
    ) -> Option<SystemTime> {
        state.attempts += 1;
        let step = self
            .queue
            .retry
            .get(state.attempts as usize - 1)
            .or(self.queue.retry.last())
            .copied()
            .unwrap_or(Duration::from_secs(300));
        let next = SystemTime::now() + step;
        state.next_attempt = Some(next);
        state.last_error = Some(why.to_string());
        if let Err(e) = write_state(&self.paths.queue, id, state) {
            tracing::error!(relay_queue_id = %id, error = %e, "cannot record the deferral");
        }
        tracing::warn!(relay_event = "deferred", relay_queue_id = %id, relay_account = account.unwrap_or(""), relay_upstream_reply = %why, next_attempt = %humantime::format_rfc3339_seconds(next), "deferred");
        Some(next)
    }

    fn dead(&self, id: QueueId, state: &mut DeliveryState, why: &str, account: Option<&str>) {
        state.attempts += 1;
        state.next_attempt = None;
        state.last_error = Some(why.to_string());
        let moved = write_state(&self.paths.dead, id, state).and_then(|()| {
            std::fs::rename(
                msg_path(&self.paths.queue, id),
                msg_path(&self.paths.dead, id),
            )
        });
        let _ = std::fs::remove_file(state_path(&self.paths.queue, id));
        if let Err(e) = moved {
            tracing::error!(relay_queue_id = %id, error = %e, "cannot move the message to dead/");
        }
        tracing::error!(relay_event = "dead", relay_queue_id = %id, relay_account = account.unwrap_or(""), relay_upstream_reply = %why, "moved to dead/");
    }
}
