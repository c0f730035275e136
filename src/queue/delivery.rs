//! One delivery attempt: read a queued message, send it through its account, and act on the outcome: remove it
//! (delivered), retry later on the `[queue] retry` schedule (deferred), move it to `dead/`, or to
//! `quarantine/` when its file is damaged.
//!
//! Memory is bounded here, not by how much mail waits: a message's bytes are read only once the attempt holds
//! its account's connection slot and its share of [`DELIVERY_MEMORY`], so a backlog of any size costs the
//! scheduler a few dozen bytes per message and no more.
//!
//! Sending limits are checked here too (`rate.rs`): a message whose accounts have no room is not attempted; it
//! waits, parked by the scheduler with the rest of its pool's mail, and nothing about it is recorded.

use super::lock;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use super::QueueId;
use super::envelope::Envelope;
use super::file::{self, FileError};
use super::lane::Lane;
use super::layout::{SpoolPaths, msg_path, state_path};
use super::rate::{AccountRate, Reservation};
use super::route::{Addressing, Routing};
use super::seeking::Seekers;
pub use super::seeking::Seeking;
use super::spool::quarantine;
use super::state::{DeliveryState, KeptDraft, KeptUpload, try_read_state, write_state};
use crate::config::{Config, QueueConfig, RateConfig};
use crate::tokens::AccountTokens;
use crate::upstream::diagnosis::Diagnosed;
use crate::upstream::gmail::UploadSession;
use crate::upstream::kept::{Draft, ResumePoint};
use crate::upstream::outgoing::Outgoing;
use crate::upstream::rewrite::SenderRewrite;
use crate::upstream::smtp::Reachability;
use crate::upstream::{MailFlags, Outcome, Refusal, Transports};

/// Recipients named one by one in a log line (or a deferral's reason) before "and N more".
const SHOWN: usize = 10;

/// Deliveries in flight per account unless `max_connections` says otherwise: Microsoft allows a few concurrent
/// SMTP connections per mailbox.
const PER_ACCOUNT: usize = 4;
/// How long connections given up after an upstream refused more ([`Account::narrow`]) stay given up: then they
/// are all given back, and the next refusal, if the other senders of the mailbox are still there, narrows again.
const NARROWED_FOR: Duration = Duration::from_secs(600);
/// Message bytes held by all deliveries together, as `Transports::memory_for` charges them (a few chunks for a
/// streamed delivery, up to a few megabytes for Graph's drafts); a charge larger than the budget runs alone.
pub const DELIVERY_MEMORY: usize = 32 << 20;

/// An upstream account as delivery sees it.
pub struct Account {
    pub name: String,
    pub tokens: Arc<AccountTokens>,
    pub transports: Transports,
    /// `rewrite_from`: applied to every attempt, whatever the transport.
    pub rewrite: SenderRewrite,
    /// Its sending limits, and what it has sent against them.
    pub rate: Arc<AccountRate>,
    /// What its files (secret, key, certificate…) held when it was built ([`crate::accounts::files_hash`]).
    pub files: blake3::Hash,
    slots: Arc<Semaphore>,
    /// How many `slots` holds when none is taken.
    connections: usize,
    /// Slots given up because the upstream refused more connections than the account's others ([`Self::narrow`]).
    narrowed: Mutex<Narrowed>,
    last_written: Mutex<Option<(std::time::Instant, &'static str)>>,
    /// When an attempt through it last failed for its own sake (no token, a deferral, a refused login), until one
    /// goes through: a route with other accounts gives them its mail first ([`TROUBLE_REMEMBERED`]).
    trouble: Mutex<Option<std::time::Instant>>,
}

/// How long an account whose last attempt failed is passed over by a route with other accounts: then it gets
/// mail again by its share (its trouble may be over; a deferral may have been the message's own), and is
/// passed over again if that fails too. Without it, an account whose token could not be had had sent the least
/// and was picked for every message, which used up their retry schedules while the route's others sat idle.
const TROUBLE_REMEMBERED: Duration = Duration::from_secs(300);

/// `STATE_DIR/accounts/NAME.json`: the last delivery result, for `relay status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LastDelivery {
    #[serde(with = "humantime_serde")]
    pub at: SystemTime,
    /// `delivered`, `deferred` or `dead`; or `reachable`: the upstream answers again after an outage during which
    /// the last message was deferred, and no message went since.
    pub outcome: String,
    pub reply: String,
}

pub fn last_delivery_path(state_dir: &Path, account: &str) -> PathBuf {
    state_dir.join("accounts").join(format!("{account}.json"))
}

pub fn read_last_delivery(state_dir: &Path, account: &str) -> Option<LastDelivery> {
    let path = last_delivery_path(state_dir, account);
    crate::small_files::report(&path)
}

/// What [`Account::narrow`] gave up.
#[derive(Debug, Default)]
struct Narrowed {
    /// Slots given up, and when the last was.
    given_up: Option<(usize, std::time::Instant)>,
    /// Whether that was said at warning level already: once in the daemon's life, since the sysadmin needs to
    /// hear it once, not every ten minutes while another device keeps the mailbox busy.
    warned: bool,
}

impl Account {
    pub fn new(
        name: String,
        tokens: Arc<AccountTokens>,
        transports: Transports,
        rewrite: SenderRewrite,
    ) -> Account {
        Account {
            rate: Arc::new(AccountRate::unpersisted(&name, RateConfig::default())),
            files: blake3::Hash::from_bytes([0; 32]),
            name,
            tokens,
            transports,
            rewrite,
            slots: Arc::new(Semaphore::new(PER_ACCOUNT)),
            connections: PER_ACCOUNT,
            narrowed: Mutex::new(Narrowed::default()),
            last_written: Mutex::new(None),
            trouble: Mutex::new(None),
        }
    }

    /// Notes how an attempt through it went: `ok`, it took mail (or refused a message for the message's sake).
    fn went(&self, ok: bool) {
        *lock(&self.trouble) = (!ok).then(std::time::Instant::now);
    }

    /// Whether an attempt through it failed for its own sake within [`TROUBLE_REMEMBERED`].
    fn troubled(&self, now: std::time::Instant) -> bool {
        lock(&self.trouble)
            .is_some_and(|since| now.saturating_duration_since(since) < TROUBLE_REMEMBERED)
    }

    /// The upstream refused one more connection (`reply`, an [`Outcome::Busy`]). With others of the account
    /// open (connected: what the server counts; the refused one itself, given back to the pool after a 432, among
    /// them), it takes no more than those: this attempt's slot is given up
    /// until [`Self::widen`] gives it back, and `None` says the message waits for one of them. With none open
    /// (every connection refused: the server's limit is taken by others, or it is going away), or this the last
    /// slot in use, the slot is handed back: the refusal is the message's, a deferral like any 4xx.
    fn narrow(&self, slot: OwnedSemaphorePermit, reply: &str) -> Option<OwnedSemaphorePermit> {
        let mut narrowed = lock(&self.narrowed);
        let given_up = narrowed.given_up.map_or(0, |(n, _)| n);
        // Slots in use, this attempt's included.
        let in_use = self
            .connections
            .saturating_sub(given_up)
            .saturating_sub(self.slots.available_permits());
        let open = self.transports.open_connections();
        if in_use <= 1 || open == 0 {
            return Some(slot);
        }
        slot.forget();
        narrowed.given_up = Some((given_up + 1, std::time::Instant::now()));
        let left = in_use - 1;
        if narrowed.warned {
            tracing::info!(relay_account = %self.name, relay_upstream_reply = %reply, connections = left, "the upstream refused one more connection: no more than {left} for now");
        } else {
            narrowed.warned = true;
            tracing::warn!(relay_account = %self.name, relay_upstream_reply = %reply, connections = left, max_connections = self.connections, "the upstream refused one more connection while the account had others open: no more than {left} for the next {}, then more are tried again; its mail waits for them meanwhile (lower `max_connections` if this repeats: other devices or programs sending as this mailbox count too; said once)", humantime::format_duration(NARROWED_FOR));
        }
        None
    }

    /// Gives back the slots [`Self::narrow`] gave up, once they have been given up for [`NARROWED_FOR`].
    fn widen(&self, now: std::time::Instant) {
        let mut narrowed = lock(&self.narrowed);
        if let Some((n, since)) = narrowed.given_up
            && now.saturating_duration_since(since) >= NARROWED_FOR
        {
            self.slots.add_permits(n);
            narrowed.given_up = None;
            tracing::info!(relay_account = %self.name, max_connections = self.connections, "trying up to {} upstream connections again", self.connections);
        }
    }

    /// At most `n` deliveries (and so upstream connections) at once.
    pub fn with_connections(mut self, n: usize) -> Account {
        self.slots = Arc::new(Semaphore::new(n.max(1)));
        self.connections = n.max(1);
        self
    }

    /// The account's limits and its counts so far (see [`AccountRate::load`]); without, it has no limits.
    pub fn with_rate(mut self, rate: AccountRate) -> Account {
        self.rate = Arc::new(rate);
        self
    }

    /// Records the last result for `relay status`: at once when the kind of outcome changes, else at most once a
    /// second, so a busy relay does not write a file per message. Not fsynced: it is a report, not mail. Every
    /// dead message is recorded: whether the account is failing depends on its reply (`status.rs`), and moving
    /// a message to dead/ costs more writes than this one anyway.
    fn record(&self, state_dir: &Path, outcome: &'static str, reply: &str) {
        let now = std::time::Instant::now();
        if let Ok(mut last) = self.last_written.lock() {
            if let Some((at, kind)) = *last
                && kind == outcome
                && outcome != "dead"
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
        let written = crate::state_files::replace(
            &path,
            &serde_json::to_vec_pretty(&doc).unwrap_or_default(),
        );
        if let Err(e) = written {
            tracing::debug!(error = %e, "cannot record the last delivery");
        }
    }
}

/// What every delivery attempt shares.
pub struct Delivery {
    paths: SpoolPaths,
    queue: QueueConfig,
    routing: Routing,
    accounts: HashMap<String, Arc<Account>>,
    /// The pools each account belongs to: when one of its deliveries ends, their mail may go.
    pools_with: HashMap<String, Vec<usize>>,
    waiting: Arc<Waiting>,
    /// [`DELIVERY_MEMORY`] in KiB.
    /// Shared with the `Delivery` a reload replaces this one with, so that old and new together stay within it.
    memory: Arc<Semaphore>,
    /// Delivered, but their file could not be removed: never sent again by this run.
    /// Shared across reloads too: a message delivered before a reload is not sent again after it.
    delivered: Arc<Mutex<HashSet<QueueId>>>,
    /// What a state file that could not be written (a full disk) would have said: the recipients finished with,
    /// so that this run does not send them the message again, and the attempts made, so that its retries still
    /// back off. Small (a count and the finished list, rarely any): one entry per message whose write failed.
    /// Shared across reloads, like `delivered`.
    unrecorded: Arc<Mutex<HashMap<QueueId, Unrecorded>>>,
    /// Messages whose state file cannot be read, and when that was last said (a warning each, then again every
    /// [`STATE_RESAID`]; at most [`MAX_SAID`] remembered). Forgotten once the file reads again.
    state_unreadable_said: Arc<Mutex<HashMap<QueueId, std::time::Instant>>>,
    /// Attempts started that have not yet taken (or given up on) a connection, and a wake-up for the scheduler
    /// when a delivery hands its connection back: with these the scheduler starts no more attempts than there
    /// are connections free, rather than attempts that read their message only to be parked.
    seekers: Arc<Seekers>,
    slot_freed: Arc<Notify>,
    /// Accounts whose upstream answers again after it did not, and since when it did not: the scheduler makes
    /// the mail they deferred meanwhile due at once ([`Delivery::take_recovered`]). Emptied at every attempt's
    /// end; one entry per account at most. Shared across reloads: an attempt begun before one reports here.
    recovered: Arc<Mutex<HashMap<String, Recovered>>>,
    /// Where each attempt's closing file work runs (shared with the delivery a reload puts in its place).
    lane: Lane,
}

const MEMORY_UNITS: u32 = (DELIVERY_MEMORY >> 10) as u32;

/// A charge of `bytes` in KiB units; one larger than the whole budget takes all of it, and so runs alone.
fn memory_units(bytes: u64) -> u32 {
    u32::try_from(bytes >> 10)
        .unwrap_or(u32::MAX)
        .clamp(1, MEMORY_UNITS)
}

/// A message up to this size is read on the runtime's thread, not on the blocking pool: its envelope was just read
/// there (`file::read_open`), and the kernel's first readahead of the file brought in the few pages after it, so
/// the read waits for no disk in practice. Larger ones, which would, go to the blocking pool.
const READ_INLINE: u64 = 16 << 10;

/// When a message that could not be looked at now (still arriving, an attempt that failed oddly, a wait with no
/// end of its own) comes up again.
const RECHECK: Duration = Duration::from_secs(30);
/// The longest a limit may keep a message past `max_age` from its last try: a per-minute window (counted from the
/// end of the deliveries in it, so a little over a minute from now).
const BRIEF_LIMIT: Duration = Duration::from_secs(120);

/// When a message whose state file cannot be read is looked at again.
const STATE_RECHECK: Duration = Duration::from_secs(300);

/// How often a message whose state file still cannot be read is said again: it waits until the file is fixed.
const STATE_RESAID: Duration = Duration::from_secs(3600);

/// The most messages whose unreadable state is remembered as said; past it, the rest are said at debug.
const MAX_SAID: usize = 10_000;

/// A hold by a sending limit longer than this is written into the message's state for `relay queue` and `relay
/// status` (a per-minute limit's seconds are not worth a write per message).
const LONG_HOLD: Duration = Duration::from_secs(5 * 60);

/// At most this many blocking-pool tasks do the attempts' closing file work at once ([`Lane`]). Measured on the
/// development machine (2 cores, ext4 with `discard`), `load drain 20000 4 60`, alternating rounds, medians: one
/// `spawn_blocking` per attempt 11,900–13,700 msg/s across five sets; 2 runners 14,100–16,700 in the same sets
/// (higher in every set); 1 runner ≈ 10,000 (the unlinks' discards one after the other); 3 ≈ 15,400; 4 ≈ 12,200
/// (more runners than cores compete with the runtime's thread).
const SETTLE_RUNNERS: usize = 2;

/// A provider's wait at least this long (a 429's minute, a used-up quota's hour) is the account's pause: the
/// message that met it uses no step of its retry schedule. A shorter one is deferred as any message is.
const ACCOUNT_PAUSE: Duration = Duration::from_secs(30);

/// What the scheduler does with a message after an attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempted {
    /// Nothing more: delivered, moved to `dead/` or `quarantine/`, or gone.
    Done { account: Option<String> },
    /// Still queued: look again at this time.
    Later {
        at: SystemTime,
        account: Option<String>,
    },
    /// Still arriving (a reread of the queue listed the file of a message being received): not an attempt. Its
    /// commit announces it; it is looked at again at `at` all the same, since a reread made meanwhile (which
    /// leaves out what is in flight) can drop that announcement from the schedule.
    Arriving { at: SystemTime },
    /// None of its accounts can take it now: it waits in its pool (see [`Routing`]) and was not an attempt.
    /// `recipients`: how many it is still for (what a limit must have room for).
    Waiting {
        pool: usize,
        wait: Wait,
        recipients: usize,
    },
}

/// What a waiting message waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// Every connection of its accounts is in use: a delivery's end frees one.
    Connection,
    /// A sending limit: room comes at this time, or (`None`) when a delivery in flight ends.
    Limit(Option<SystemTime>),
    /// Older mail waits for the same accounts, and goes first.
    Behind,
    /// Its accounts' upstream could not be reached a moment ago (`upstream/smtp/reach.rs`): one connection tries
    /// it again at this time.
    Upstream(SystemTime),
}

/// The oldest message parked in each pool, as the scheduler last set it, and the messages whose attempts found
/// they must wait, until the scheduler has their answer: so that a newer message does not overtake them. One
/// entry per pool, and one per attempt in flight at most.
#[derive(Debug, Default)]
pub struct Waiting(Mutex<WaitingLines>);

#[derive(Debug, Default)]
struct WaitingLines {
    parked: HashMap<usize, QueueId>,
    /// Held by their attempts (see [`Waiting::hold`]): id → pool.
    held: HashMap<QueueId, usize>,
}

impl Waiting {
    pub fn set(&self, pool: usize, oldest: Option<QueueId>) {
        if let Ok(mut w) = self.0.lock() {
            match oldest {
                Some(id) => w.parked.insert(pool, id),
                None => w.parked.remove(&pool),
            };
        }
    }

    /// `id` is to be parked in `pool`, as its attempt is about to tell the scheduler: newer mail of the pool that
    /// chooses before the scheduler has heard (attempts that end at once) already waits behind it. Kept apart
    /// from what the scheduler sets, which may change meanwhile, until the scheduler has the attempt's answer
    /// ([`Self::release`]).
    fn hold(&self, pool: usize, id: QueueId) {
        if let Ok(mut w) = self.0.lock() {
            w.held.insert(id, pool);
        }
    }

    /// The scheduler has the answer of `id`'s attempt (parked, or not: then nothing of it stays here).
    pub fn release(&self, id: QueueId) {
        if let Ok(mut w) = self.0.lock() {
            w.held.remove(&id);
        }
    }

    fn is_behind(&self, pool: usize, id: QueueId) -> bool {
        self.0.lock().is_ok_and(|w| {
            w.parked.get(&pool).is_some_and(|oldest| *oldest < id)
                || w.held.iter().any(|(held, p)| *p == pool && *held < id)
        })
    }
}

impl Attempted {
    fn later(at: SystemTime) -> Attempted {
        Attempted::Later { at, account: None }
    }

    /// Notes the account whose connection slot the attempt held (and has now given back).
    fn with_account(self, name: String) -> Attempted {
        match self {
            Attempted::Done { .. } => Attempted::Done {
                account: Some(name),
            },
            Attempted::Later { at, .. } => Attempted::Later {
                at,
                account: Some(name),
            },
            waiting => waiting,
        }
    }

    /// The account whose connection slot this attempt gave back.
    pub fn freed(&self) -> Option<&str> {
        match self {
            Attempted::Done { account } | Attempted::Later { account, .. } => account.as_deref(),
            Attempted::Arriving { .. } | Attempted::Waiting { .. } => None,
        }
    }

    /// When to look at the message again, if ever (a waiting message is parked instead).
    pub fn next(&self) -> Option<SystemTime> {
        match self {
            Attempted::Later { at, .. } | Attempted::Arriving { at } => Some(*at),
            _ => None,
        }
    }
}

impl Delivery {
    pub fn new(config: &Config, accounts: Vec<Arc<Account>>) -> Delivery {
        let routing = Routing::new(config);
        let mut pools_with: HashMap<String, Vec<usize>> = HashMap::new();
        for (pool, names) in routing.pools().iter().enumerate() {
            for name in names {
                pools_with.entry(name.clone()).or_default().push(pool);
            }
        }
        Delivery {
            paths: SpoolPaths::new(&config.state_dir),
            queue: config.queue.clone(),
            routing,
            pools_with,
            waiting: Arc::default(),
            accounts: accounts.into_iter().map(|a| (a.name.clone(), a)).collect(),
            memory: Arc::new(Semaphore::new(MEMORY_UNITS as usize)),
            delivered: Arc::default(),
            unrecorded: Arc::default(),
            state_unreadable_said: Arc::default(),
            seekers: Arc::default(),
            slot_freed: Arc::default(),
            recovered: Arc::default(),
            lane: Lane::new(SETTLE_RUNNERS),
        }
    }

    /// The delivery a reload puts in this one's place: the new config's routes and accounts, and this one's
    /// memory budget and record of delivered messages (deliveries in flight finish on this one meanwhile).
    pub fn succeeded_by(&self, config: &Config, accounts: Vec<Arc<Account>>) -> Delivery {
        Delivery {
            memory: self.memory.clone(),
            delivered: self.delivered.clone(),
            unrecorded: self.unrecorded.clone(),
            state_unreadable_said: self.state_unreadable_said.clone(),
            // Attempts begun before the reload still seek connections of the accounts it kept.
            seekers: self.seekers.clone(),
            slot_freed: self.slot_freed.clone(),
            recovered: self.recovered.clone(),
            lane: self.lane.clone(),
            ..Delivery::new(config, accounts)
        }
    }

    pub fn paths(&self) -> &SpoolPaths {
        &self.paths
    }

    /// How many attempts are worth running at once: twice the connections of all accounts (one sending, one
    /// being read and routed), so that a backlog does not start attempts that only find every connection taken
    /// and are parked, each having read its queue and state files for nothing.
    pub fn attempt_budget(&self) -> usize {
        self.accounts
            .values()
            .map(|a| a.connections)
            .sum::<usize>()
            .saturating_mul(2)
            .max(4)
    }

    /// Counts an attempt about to start among those seeking a connection (see [`Self::may_start`]).
    pub fn seeking(&self, id: QueueId) -> Seeking {
        self.seekers.start(id)
    }

    /// Whether the attempt of `id` may start now: fewer are seeking a connection than there are connections
    /// free. Only where every message goes to the same accounts (one pool) does that say anything about this
    /// message; with several pools, one pool's busy connections must not hold back another's mail, and every
    /// message may start (it is parked if its pool is busy). A message past `max_age` waits its turn too: it is
    /// tried once more before it goes to dead/.
    pub fn may_start(&self) -> bool {
        if self.routing.pools().len() != 1 {
            return true;
        }
        let free: usize = self
            .accounts
            .values()
            .map(|a| a.slots.available_permits())
            .sum();
        self.seekers.count() < free
    }

    /// Resolves when a delivery hands back its connection.
    pub fn slot_freed(&self) -> Arc<Notify> {
        self.slot_freed.clone()
    }

    pub fn has_accounts(&self) -> bool {
        !self.accounts.is_empty()
    }

    /// The pools an account belongs to.
    pub fn pools_with(&self, account: &str) -> &[usize] {
        self.pools_with.get(account).map_or(&[], Vec::as_slice)
    }

    /// `account` can send again (its upstream answers, its token could be had): it is no longer passed over for
    /// its last failure, so that the mail woken for it goes through it rather than back to a mate in trouble.
    pub fn recovered(&self, account: &str) {
        if let Some(a) = self.accounts.get(account) {
            a.went(true);
        }
    }

    /// The accounts that share a pool with `account`, itself included: mail one of them deferred may go through
    /// `account` once it can send again.
    pub fn pool_mates(&self, account: &str) -> Vec<String> {
        let mut mates: Vec<String> = self
            .pools_with(account)
            .iter()
            .filter_map(|&p| self.routing.pools().get(p))
            .flatten()
            .cloned()
            .collect();
        mates.push(account.to_string());
        mates.sort();
        mates.dedup();
        mates
    }

    /// Where the scheduler tells delivery which message of each pool waits longest.
    pub fn waiting(&self) -> Arc<Waiting> {
        self.waiting.clone()
    }

    /// For the dead-letter reason of a message that was never tried: an account of its route whose upstream is
    /// not answering now (its mail waits untried while one connection at a time tries it), in words. Said as a
    /// fact about now, not as the cause: the message may have waited for other reasons before.
    /// The first of `accounts` that its provider asked to pause, with the pause.
    fn pause_of(
        &self,
        accounts: &[String],
        now: SystemTime,
    ) -> Option<(String, super::pause::PauseReport)> {
        accounts.iter().find_map(|name| {
            let pause = self.accounts.get(name)?.rate.pause(now)?;
            Some((name.clone(), pause))
        })
    }

    fn outage_of(&self, envelope: &Envelope) -> Option<String> {
        let now = std::time::Instant::now();
        let decision = self.routing.route(Addressing::from(envelope))?;
        decision.accounts.iter().find_map(|name| {
            let (down, why) = self.accounts.get(name)?.transports.outage(now)?;
            Some(format!(
                "the upstream of account {name} is not answering (for {}: {why})",
                humantime::format_duration(Duration::from_secs(down.as_secs()))
            ))
        })
    }

    /// How many of a pool's messages could go now: free connections, within the per-minute limits, of accounts
    /// whose day is not used up. A guess (a message's recipients may not fit), never used to refuse anything.
    pub fn room(&self, pool: usize) -> usize {
        self.room_for(pool, 1)
    }

    /// [`Self::room`] for a message to `recipients` recipients: an account whose day has room for smaller mail
    /// only does not count.
    pub fn room_for(&self, pool: usize, recipients: usize) -> usize {
        let now = SystemTime::now();
        let instant = std::time::Instant::now();
        let Some(names) = self.routing.pools().get(pool) else {
            return 0;
        };
        names
            .iter()
            .filter_map(|n| self.accounts.get(n))
            .map(|a| {
                let rate = usize::try_from(a.rate.room_for(now, recipients)).unwrap_or(usize::MAX);
                // An upstream that could not be reached: none while held or tried, one (the probe) after.
                let reach = match a.transports.ready(instant) {
                    Reachability::Up => usize::MAX,
                    Reachability::Probe => 1,
                    Reachability::Held(_) | Reachability::Probing => 0,
                };
                a.slots.available_permits().min(rate).min(reach)
            })
            .fold(0, usize::saturating_add)
    }

    /// `relay queue retry` (or `relay authorize`) was run: a pause a provider asked for ends now, so that mail
    /// made due goes at once (a quota raised, a throttle past); if the cause is still there, one refusal says so.
    /// Whether any was lifted.
    /// `only`: those accounts' alone (a `relay test` went through them).
    pub fn lift_pauses(&self, only: Option<&[String]>) -> bool {
        let now = SystemTime::now();
        let mut lifted = false;
        for a in self
            .accounts
            .values()
            .filter(|a| only.is_none_or(|o| o.contains(&a.name)))
        {
            if a.rate.lift_pause(now) {
                lifted = true;
                tracing::info!(relay_account = %a.name, "the pause the provider asked for is lifted (relay queue retry or relay authorize)");
            }
        }
        lifted
    }

    /// The same trigger ends the minute an account's mail waits after its fresh token was refused (a permission
    /// granted meanwhile, a mailbox enabled): the next attempt tries the token instead of answering from the hold.
    /// And the hold after an upstream could not be reached (a firewall opened meanwhile): it is tried at once.
    /// Whether such a hold was lifted (the mail waiting for its end is due now).
    pub fn lift_holds(&self, only: Option<&[String]>) -> bool {
        let mut reach = false;
        for a in self
            .accounts
            .values()
            .filter(|a| only.is_none_or(|o| o.contains(&a.name)))
        {
            if a.transports.lift_hold() {
                reach = true;
                tracing::info!(relay_account = %a.name, "the account's refused token is tried again (relay queue retry or relay authorize)");
            }
            if a.tokens.forget_failed_renewal() {
                tracing::info!(relay_account = %a.name, "the account's failed token renewal is tried again at once (relay queue retry or relay authorize)");
            }
            if a.transports.lift_unreachable() {
                reach = true;
                tracing::info!(relay_account = %a.name, "the account's upstream, which could not be reached, is tried again at once (relay queue retry or relay authorize)");
            }
        }
        reach
    }

    /// Gives back the connections accounts gave up when their upstream refused more, where that was long enough
    /// ago (the scheduler's tick; the mail waiting for them then finds room).
    pub fn widen_connections(&self) {
        let now = std::time::Instant::now();
        for a in self.accounts.values() {
            a.widen(now);
        }
    }

    /// Removes the mail kept in `dead/` past `[queue] dead_max_age` (see `dead.rs`); whether more is left for a
    /// sweep soon. May wait on the disk.
    pub fn tidy_dead(&self) -> bool {
        super::dead::tidy(&self.paths.dead, self.queue.dead_max_age)
    }

    /// Closes the upstream connections idle too long (see `Transports::close_idle`).
    pub fn close_idle(&self) {
        for a in self.accounts.values() {
            a.transports.close_idle();
        }
    }

    /// Writes every account's counters that changed (every couple of seconds, and at shutdown after the last
    /// delivery).
    pub fn save_counters(&self) {
        for a in self.accounts.values() {
            a.rate.save_report();
        }
    }

    /// An account of the pool that can take a message to `recipients` recipients now, with a connection and a
    /// place under its limits; else what the message waits for. Of several, those whose upstream answers go first
    /// (one that could not be reached a moment ago gets mail only when none of them can take it: it has sent the
    /// least, and would otherwise be picked for every message), then those whose last attempt did not fail for
    /// their own sake (a token that cannot be had, a greeting that turns mail away: the same reason), then the
    /// one that has used the least of its day
    /// (then the fewest recipients, then config order), so that mail spreads evenly. Before those, `kept`: the
    /// account whose upload session an earlier attempt kept (it may hold the message whole: another account
    /// would send it again).
    fn take_place(
        &self,
        names: &[String],
        recipients: usize,
        now: SystemTime,
        kept: Option<&str>,
    ) -> Result<(Arc<Account>, OwnedSemaphorePermit, Reservation), Wait> {
        let instant = std::time::Instant::now();
        // (Down, not the kept session's, in trouble, share of the day, recipients used, config order) for the
        // order; where it stands.
        type Candidate<'a> = (
            (bool, bool, bool, u64, u64, usize),
            Reachability,
            &'a Arc<Account>,
        );
        let mut accounts: Vec<Candidate<'_>> = names
            .iter()
            .enumerate()
            .filter_map(|(i, n)| {
                let a = self.accounts.get(n)?;
                let u = a.rate.usage(now);
                let share = u.recipients_per_day.map_or(0, |limit| {
                    u.recipients_last_24h.saturating_mul(1_000_000) / u64::from(limit.max(1))
                });
                let reach = a.transports.ready(instant);
                let down = reach != Reachability::Up;
                let other = kept != Some(n.as_str());
                let troubled = a.troubled(instant);
                Some((
                    (down, other, troubled, share, u.recipients_last_24h, i),
                    reach,
                    a,
                ))
            })
            .collect();
        if names.len() > 1 {
            accounts.sort_unstable_by_key(|&(order, ..)| order);
        }
        let mut limited: Option<Option<SystemTime>> = None;
        let mut unreachable: Option<SystemTime> = None;
        // An account whose connections are all in use but whose limits have room: a delivery's end lets the
        // message go, however long another account's limit lasts.
        let mut busy = false;
        for (_, reach, a) in accounts {
            // An upstream that could not be reached a moment ago is not tried again before its hold ends, and then
            // by one connection at a time; another account of the route may take the message meanwhile.
            match reach {
                Reachability::Held(until) => {
                    let at = SystemTime::now() + until.saturating_duration_since(instant);
                    unreachable = Some(unreachable.map_or(at, |u| u.min(at)));
                    continue;
                }
                Reachability::Probing => continue,
                Reachability::Up | Reachability::Probe => {}
            }
            let Ok(slot) = a.slots.clone().try_acquire_owned() else {
                busy |= a.rate.room_for(now, recipients) > 0;
                continue;
            };
            match a.rate.reserve(now, recipients) {
                Ok(r) => return Ok((a.clone(), slot, r)),
                // The soonest any of them frees.
                Err(at) => {
                    limited = Some(match (limited.flatten(), at) {
                        (Some(x), Some(y)) => Some(x.min(y)),
                        (x, y) => x.or(y),
                    })
                }
            }
        }
        // A limit says when it frees (and is logged so); an unreachable account of the same route whose hold
        // ends sooner is seen by the scheduler's tick, which asks `room_for` (it counts that account again then).
        Err(match (limited, unreachable) {
            _ if busy => Wait::Connection,
            (Some(l), _) => Wait::Limit(l),
            (None, Some(u)) => Wait::Upstream(u),
            (None, None) => Wait::Connection,
        })
    }

    /// Tries, without a message, each account's SMTP upstream that is down with its hold over, no try under way,
    /// and no mail of its pools parked (`parked`: that mail tries it itself), now and then
    /// (`Transports::check_reach`); one that answers is among [`Self::take_recovered`] afterwards.
    pub fn check_unreachable(&self, parked: impl Fn(usize) -> bool) {
        let now = std::time::Instant::now();
        // An account whose token could not be had has one again (the refresher's renewal worked): its mail
        // deferred meanwhile goes now, as when an upstream answers again.
        for account in self.accounts.values() {
            if let Some(since) = account.tokens.take_came_back() {
                Recovered::note(&self.recovered, &account.name, since, Recovered::TOKEN);
            }
        }
        for account in self.accounts.values() {
            if account.transports.reachability(now) != Reachability::Probe
                || self.pools_with(&account.name).iter().any(|&p| parked(p))
            {
                continue;
            }
            let (account, recovered) = (account.clone(), self.recovered.clone());
            let state_dir = self.paths.state_dir().to_path_buf();
            tokio::spawn(async move {
                let greeted = account.transports.check_reach().await;
                let Some(since) = note_came_back(&recovered, &account) else {
                    return;
                };
                // Answered only to refuse (a 421 or 554 greeting, a failed TLS handshake): its mail will be
                // deferred still, and the account stays failing on its last deferral.
                if !greeted {
                    return;
                }
                // The account's report still says its last message was deferred in the outage: `relay status`
                // would call it failing until the next message, hours away on a quiet relay.
                let down_since = SystemTime::now()
                    .checked_sub(since.elapsed())
                    .unwrap_or(SystemTime::UNIX_EPOCH);
                let _ = tokio::task::spawn_blocking(move || {
                    if read_last_delivery(&state_dir, &account.name)
                        .is_some_and(|d| d.outcome == "deferred" && d.at >= down_since)
                    {
                        account.record(
                            &state_dir,
                            "reachable",
                            "the upstream answers again; no message has gone through it since",
                        );
                    }
                })
                .await;
            });
        }
    }

    /// The accounts whose upstream answers again after it did not, each with since when it did not.
    pub fn take_recovered(&self) -> HashMap<String, Recovered> {
        std::mem::take(&mut *lock(&self.recovered))
    }

    /// Whether `id`'s queue file is still there (not delivered or deleted meanwhile).
    pub fn is_queued(&self, id: QueueId) -> bool {
        msg_path(&self.paths.queue, id).exists()
    }

    /// Whether this run already delivered `id` (its file could not be removed).
    pub fn already_delivered(&self, id: QueueId) -> bool {
        self.delivered.lock().is_ok_and(|d| d.contains(&id))
    }

    /// One delivery attempt, and what the scheduler does next with the message. `early`: made due before its
    /// time on purpose (its account's upstream answers again), so its recorded next attempt does not hold it.
    pub async fn attempt(
        self: Arc<Self>,
        id: QueueId,
        mut seeking: Seeking,
        early: bool,
    ) -> Attempted {
        let now = SystemTime::now();
        if self.already_delivered(id) {
            // Ends without choosing an account: newer attempts need not wait for its file work.
            seeking.chosen();
            return self
                .clone()
                .blocking(move |d| d.remove_delivered(id, true))
                .await;
        }
        let path = msg_path(&self.paths.queue, id);
        let (msg, opened) = match file::read_open(&path) {
            Ok(m) => m,
            // Deleted meanwhile (`relay queue delete`), or already delivered by an earlier attempt. What was
            // kept of it for a state file that could not be written goes with it.
            Err(e) if e.is_not_found() => {
                lock(&self.unrecorded).remove(&id);
                return Attempted::Done { account: None };
            }
            // Still arriving (listed by a reread of the queue): its commit announces it, or it goes away.
            Err(FileError::Unsealed { .. }) => {
                return Attempted::Arriving { at: now + RECHECK };
            }
            // Not readable just now (out of descriptors, permissions, I/O): it stays, and is looked at again.
            // Counted as a failed attempt, so that it follows the retry schedule (and is said in the log each time).
            Err(e @ FileError::Io { .. }) => {
                let why = format!("cannot read the queue file: {e}");
                // Its state neither: nothing is written over it (it names the recipients already reached).
                let Ok(mut state) = self.state_to_update(id) else {
                    return Attempted::later(now + STATE_RECHECK);
                };
                // Never readable (a directory by that name, a file root made unreadable to relay's user), its state
                // readable: it expires like any other message, into dead/ with the reason.
                if self.past_max_age(id, now) {
                    seeking.chosen();
                    return self.clone().expire(id, state, why).await;
                }
                seeking.chosen();
                return self
                    .clone()
                    .blocking(move |d| d.defer(id, &mut state, &why, None))
                    .await;
            }
            Err(e) => {
                let why = e.to_string();
                seeking.chosen();
                return self
                    .clone()
                    .blocking(move |d| {
                        quarantine(&d.paths, &path, &why);
                        Attempted::Done { account: None }
                    })
                    .await;
            }
        };
        // Held until this attempt ends (settled, the file removed if delivered): `relay queue delete` takes the
        // same lock, so it never reports a message deleted that is being sent, nor removes one under an attempt.
        match opened.try_lock() {
            Ok(()) => {}
            // `relay queue delete` is removing it this instant (then it is gone at the next look), or some other
            // program holds a lock on it.
            Err(std::fs::TryLockError::WouldBlock) => {
                tracing::info!(relay_queue_id = %id, "the queue file is locked by another program (relay queue delete?); looked at again in 30 s");
                return Attempted::later(now + RECHECK);
            }
            // A filesystem without locks: delivered all the same, as before there was a lock.
            Err(std::fs::TryLockError::Error(e)) => {
                tracing::debug!(relay_queue_id = %id, error = %e, "cannot lock the queue file");
            }
        }
        // Deleted between the open and the lock: its state file may be gone too, and sent now it would go to
        // every recipient again.
        if opened
            .metadata()
            .is_ok_and(|m| std::os::unix::fs::MetadataExt::nlink(&m) == 0)
        {
            return Attempted::Done { account: None };
        }
        // Not expired either while its state cannot be read: its max_age may have begun again (a move back from
        // dead/), and dead/ would get a blank state, the recipients already reached forgotten (and bounced).
        let Ok(mut state) = self.state_to_update(id) else {
            return Attempted::later(now + STATE_RECHECK);
        };
        let opened = Arc::new(opened);
        let locked = opened.clone();
        if let Some(kept) = lock(&self.unrecorded).get(&id) {
            for r in &kept.finished {
                if !state.finished.contains(r) {
                    state.finished.push(r.clone());
                }
            }
            state.attempts = state.attempts.max(kept.attempts);
        }
        // A next attempt further ahead than any wait relay sets is not one it set (a clock stepped back after the
        // deferral, a state file edited by hand): the message is looked at now, so that it is tried or expires.
        let furthest = self
            .queue
            .retry
            .iter()
            .max()
            .copied()
            .unwrap_or_default()
            .max(super::scheduler::FURTHEST);
        if let Some(next) = state.next_attempt
            && next > now
            && !early
            && next
                .duration_since(now)
                .is_ok_and(|ahead| ahead <= furthest)
        {
            // Scheduled twice (a reread of the schedule raced a deferral): keep the later time.
            return Attempted::later(next);
        }
        // relay never queues a message without a recipient: this file was made or changed by something else, and
        // "delivered to every recipient" would remove it unsent.
        if msg.envelope.recipients.is_empty() {
            seeking.chosen();
            return self
                .clone()
                .blocking(move |d| {
                    quarantine(&d.paths, &path, "its envelope has no recipients");
                    Attempted::Done { account: None }
                })
                .await;
        }
        // Only those not finished with in an earlier attempt (accepted, or refused for good).
        let recipients = state.remaining(&msg.envelope.recipients);
        if recipients.is_empty() {
            // The attempt that finished the last of them stopped before the removal (a crash).
            tracing::info!(relay_event = "delivered", relay_queue_id = %id, "delivered (every recipient was finished with before relay stopped; removed now)");
            seeking.chosen();
            return self
                .clone()
                .blocking(move |d| d.remove_delivered(id, true))
                .await;
        }
        let max_age_ends = state
            .age_from(msg.envelope.received_at)
            .checked_add(self.queue.max_age);
        let expired = max_age_ends.is_some_and(|end| end < now);
        // Past max_age with a Gmail upload session an earlier attempt kept (its answer was not heard: a stop, a
        // crash, a session that said nothing clear): the session may have sent the message, and a bounce would
        // tell its sender it failed. It is asked first, through the account that holds it, and nothing more is
        // uploaded; it is bounced once the session says it does not hold the message whole. A session that gives
        // no clear answer is asked again at the retry steps, until Google's week for it ends.
        let asks = expired && state.upload.as_ref().is_some_and(|u| u.is_young(now));
        // Otherwise an expired message is tried once more, as Postfix does (`maximal_queue_lifetime` bounces after
        // a failed attempt): its retry step may have ended past max_age, and the upstream may take it now. A failed
        // attempt past max_age sends it to dead/ (`defer_for`), as does a wait that would keep it from being tried
        // for long (a day's limit, a pause, an upstream held unreachable: `waits_briefly`).
        let last_try = expired && !asks;
        const NO_ACCOUNT: &str = "no account is configured for this message (no [[route]] matches it, and neither its login's account nor default_account names one): add one, then `systemctl reload relay`";
        let decision = match self.routing.route(Addressing::from(&msg.envelope)) {
            None => Err(NO_ACCOUNT.to_string()),
            Some(d) if d.accounts.is_empty() => Err(NO_ACCOUNT.to_string()),
            Some(d) => match d.accounts.iter().find(|n| !self.accounts.contains_key(*n)) {
                Some(name) => Err(format!("account {name} is not configured")),
                None => Ok(d),
            },
        };
        let decision = match decision {
            Ok(d) => d,
            // Expired, its session cannot be asked: as below, when the account holding it no longer takes it.
            Err(why) if asks => {
                let why = format!(
                    "{why}: the Gmail upload session an earlier attempt kept for it was not asked, and may have sent it"
                );
                seeking.chosen();
                return self.clone().expire(id, state, why).await;
            }
            Err(why) => {
                seeking.chosen();
                return self
                    .clone()
                    .blocking(move |d| d.defer(id, &mut state, &why, None))
                    .await;
            }
        };
        // A Graph draft whose `/send` got no clear answer is not asked past max_age, as before the last try: asked,
        // a sent draft that Sent Items does not keep (`save_to_sent_items = false`) reads as gone, and the message
        // would go again. To dead/, its reason saying it may have been delivered.
        if last_try && state.drafts.iter().any(|d| d.sent_at.is_some()) {
            seeking.chosen();
            let why = self.untried_why(&state, &msg.envelope);
            return self
                .clone()
                .expire_untried(id, state, why, decision.accounts)
                .await;
        }
        let pool = decision.pool;
        // An expired message whose kept session is asked goes through the account holding it, or nowhere.
        let holder = state
            .upload
            .as_ref()
            .map(|u| u.account.clone())
            .filter(|_| asks);
        // (Its route may no longer name that account: still configured, it is the one that can ask.)
        let names = match &holder {
            Some(h)
                if self
                    .accounts
                    .get(h)
                    .is_some_and(|a| a.transports.asks_upload_sessions()) =>
            {
                std::slice::from_ref(h)
            }
            Some(h) => {
                let why = format!(
                    "the Gmail upload session account {h} kept for it was not asked (that account is no longer configured, or no longer sends through the Gmail API): it may have sent the message"
                );
                seeking.chosen();
                return self.clone().expire(id, state, why).await;
            }
            None => decision.accounts,
        };
        // Expired and asking: not past the session's week, when it is bounced without being asked.
        let session_end = state
            .upload
            .as_ref()
            .and_then(|u| {
                u.begun_at?
                    .checked_add(crate::upstream::gmail::SESSION_LIFETIME)
            })
            .filter(|_| asks);
        // When a wait for the upstream or a limit must end at the latest: at max_age, or at the session's week. (Not
        // for the last try: its waits are short ones, below, and one ended at once would be taken up again and
        // again.)
        let expires = max_age_ends.filter(|_| !asks && !last_try).or(session_end);
        // Oldest first: attempts begun before this one choose first (see `seeking.rs`).
        seeking.after_older().await;
        if self.waiting.is_behind(pool, id) {
            return Attempted::Waiting {
                pool,
                wait: Wait::Behind,
                recipients: recipients.len(),
            };
        }
        // A message that cannot go now does not hold one of the scheduler's places while it waits: it is parked,
        // and comes back when a delivery of its accounts ends or a limit's window frees.
        let (account, slot, mut reservation) = match self.take_place(
            names,
            recipients.len(),
            now,
            // The account holding a kept session or draft first: it can ask whether that sent the message.
            state
                .upload
                .as_ref()
                .map(|u| u.account.as_str())
                .or_else(|| state.drafts.first().map(|d| d.account.as_str())),
        ) {
            Ok(place) => {
                drop(seeking);
                // No longer held: the note goes, here (once per long hold), since an attempt may end without
                // writing the state (a busy or unreachable upstream), and the note would say "held" for a day.
                if state.held_until.take().is_some() {
                    crate::runtime::off_worker(|| {
                        self.record(
                            id,
                            &state,
                            "cannot record that the message is no longer held",
                        )
                    });
                }
                // Between taking the connection and that drop, the scheduler may have counted this attempt twice
                // and stopped starting others: have it look again.
                self.slot_freed.notify_one();
                place
            }
            // Held for the one account that can ask its session (of its pool or no longer): parked, it would be
            // woken whenever another account of the pool has room (the scheduler's rule is that room means a
            // place), at once and again, and it would keep the pool's newer mail behind it. Looked at again in a
            // while instead.
            Err(wait) if names != decision.accounts => {
                tracing::debug!(relay_queue_id = %id, relay_account = %names.join(","), "expired, waiting for the account that holds its Gmail upload session");
                let at = match wait {
                    Wait::Limit(Some(at)) | Wait::Upstream(at) => {
                        session_end.map_or(at, |end| at.min(end)).max(now + RECHECK)
                    }
                    _ => now + RECHECK,
                };
                return Attempted::later(at);
            }
            // Past max_age, and kept from its last try by more than a connection in use or a minute's limit: a
            // day's limit, a pause, an upstream that does not answer. dead/ now, with why.
            Err(wait) if last_try && !self.waits_briefly(&wait, names) => {
                seeking.chosen();
                let why = self.untried_why(&state, &msg.envelope);
                return self.clone().expire_untried(id, state, why, names).await;
            }
            Err(mut wait) => {
                self.waiting.hold(pool, id);
                seeking.chosen();
                // Taken up again when it expires, if that comes first: it goes to dead/ then (and is reported),
                // not when the window frees, maybe a day later. (Expired already and asking its session: until
                // the session's week ends, or it would be taken up again at once, and again.)
                if let Wait::Connection = wait {
                    tracing::debug!(relay_queue_id = %id, relay_account = %decision.accounts.join(","), "waiting: every connection of the accounts with room is in use");
                }
                if let Wait::Upstream(at) = wait {
                    tracing::debug!(relay_queue_id = %id, relay_account = %decision.accounts.join(","), until = %humantime::format_rfc3339_seconds(at), "waiting: the account's upstream could not be reached, or refused its fresh token, a moment ago");
                    wait = Wait::Upstream(expires.map_or(at, |e| e.min(at)));
                }
                if let Wait::Limit(until) = wait {
                    let shown = until.map_or_else(
                        // The window's room is taken by deliveries still in flight: one that goes through
                        // counts from when it ends, so the room comes a window after that.
                        || "a delivery in flight ends, then (if it went through) its minute, or its day for recipients_per_day".to_string(),
                        |t| humantime::format_rfc3339_seconds(t).to_string(),
                    );
                    // A pause the provider asked for (a 429, a used-up day) holds the same way as a limit.
                    let paused = self.pause_of(decision.accounts, now);
                    let why = if paused.is_some() {
                        "held: the provider asked the account to pause"
                    } else {
                        "held by the account's sending limits"
                    };
                    let accounts = decision.accounts.join(",");
                    let held = msg.envelope.recipients.len();
                    let said = move || {
                        tracing::info!(relay_event = "held", relay_queue_id = %id, relay_account = %accounts, recipients = held, until = %shown, "{why}");
                    };
                    wait = Wait::Limit(match (until, expires) {
                        (Some(u), Some(e)) => Some(u.min(e)),
                        (u, e) => u.or(e),
                    });
                    // A long hold (a day's limit) is written down, once, for `relay queue` and `relay status`: they
                    // cannot see the schedule, and said "next try: now" and "ok" for mail that waits a day. (Said
                    // once written, so that what reads the log finds the file written.)
                    if let Some(until) = until
                        && until > now + LONG_HOLD
                        && state.held_until.is_none_or(|h| {
                            h.max(until)
                                .duration_since(h.min(until))
                                .unwrap_or_default()
                                > Duration::from_secs(60)
                        })
                    {
                        state.held_until = Some(until);
                        // The provider's words too: they are what a bounce after the hold can say of it.
                        let reply =
                            paused.map_or(String::new(), |(_, p)| format!(" ({})", p.reply));
                        state.waits(&format!(
                            "{why} until {}{reply}",
                            humantime::format_rfc3339_seconds(until)
                        ));
                        let waiting = Attempted::Waiting {
                            pool,
                            wait,
                            recipients: recipients.len(),
                        };
                        return self
                            .clone()
                            .blocking(move |d| {
                                d.record(id, &state, "cannot record why the message waits");
                                said();
                                waiting
                            })
                            .await;
                    }
                    said();
                }
                return Attempted::Waiting {
                    pool,
                    wait,
                    recipients: recipients.len(),
                };
            }
        };
        // What the delivery holds of the message: a few chunks where it streams from the file, more for Graph's
        // drafts and Gmail's resumable uploads (`Transports::memory_for`).
        let units = memory_units(account.transports.memory_for(msg.size));
        let Ok(memory) = self.memory.acquire_many(units).await else {
            return Attempted::later(now + RECHECK).with_account(account.name.clone());
        };
        // The counts are written before the message can reach the upstream: a crash during the send must not make
        // the next start forget it (only an account with limits has counts that must survive one). The first read
        // checks the seal and looks for long lines; a small message stays in memory from it. A small message is
        // read here, from the pages its envelope's read brought in ([`READ_INLINE`]): that costs less than the
        // hand-off to the blocking pool (relay's CPU per drained message −15–20%).
        let durable = account.rate.durable();
        let opened = if !durable && msg.size <= READ_INLINE {
            Ok(open_message(&msg, opened))
        } else {
            let msg = msg.clone();
            let rate = account.rate.clone();
            tokio::task::spawn_blocking(move || {
                rate.save();
                open_message(&msg, opened)
            })
            .await
        };
        let opened = match opened {
            Ok(Ok(o)) => Ok(o),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => {
                return Attempted::Done {
                    account: Some(account.name.clone()),
                };
            }
            Ok(Err(e)) => Err(format!("cannot read the queue file: {e}")),
            Err(e) => Err(e.to_string()),
        };
        let message = match opened {
            Ok(Some(m)) => m,
            Ok(None) => {
                let freed = account.name.clone();
                let seen = msg.seal.clone();
                return self
                    .clone()
                    .blocking(move |d| {
                        match reread_seal(&path, &seen) {
                            Reread::Same => {}
                            Reread::Gone => return Attempted::Done { account: None },
                            // Not at once: a file rewritten again and again by something else would be looked at
                            // in a loop.
                            Reread::Changed => {
                                tracing::info!(relay_queue_id = %id, "the queue file's seal changed since it was read (read while it was being written?); looked at again in a second");
                                return Attempted::later(SystemTime::now() + Duration::from_secs(1));
                            }
                            Reread::Unreadable(why) => {
                                tracing::warn!(relay_queue_id = %id, error = %why, "the queue file's bytes did not match its seal and it cannot be read again now; looked at again in 30 s");
                                return Attempted::later(SystemTime::now() + RECHECK);
                            }
                        }
                        quarantine(
                            &d.paths,
                            &path,
                            "the message's bytes do not match its seal (damaged on disk)",
                        );
                        Attempted::Done { account: None }
                    })
                    .await
                    .with_account(freed);
            }
            Err(why) => {
                let freed = account.name.clone();
                return self
                    .clone()
                    .blocking(move |d| d.defer(id, &mut state, &why, None))
                    .await
                    .with_account(freed);
            }
        };
        reservation.sending();
        let (sender, message) = account.rewrite.prepare(id, &msg.envelope.sender, message);
        let flags = MailFlags {
            eight_bit: msg.envelope.body_8bit || message.is_eight_bit(),
            smtputf8: msg.envelope.smtputf8,
        };
        let sending = Sending {
            id,
            sender: &sender,
            recipients: &recipients,
            message: &message,
            flags,
        };
        let mut asked_written = false;
        let asked = match self
            .ask_holder(&account, &sending, &mut state, &mut asked_written)
            .await
        {
            Some(asked) => Some(asked),
            None => {
                self.ask_draft_holder(&account, &sending, &mut state, &mut asked_written)
                    .await
            }
        };
        if let Some((holder, outcome)) = asked {
            // The session's answer stands for the attempt; this account sent nothing.
            drop((message, memory, slot));
            reservation.unsent();
            self.slot_freed.notify_one();
            let name = account.name.clone();
            return self
                .clone()
                .blocking(move |d| {
                    let next =
                        d.settle(id, &holder, outcome, &recipients, &mut state, asked_written);
                    drop(locked);
                    holder.rate.save();
                    next
                })
                .await
                .with_account(name);
        }
        let (outcome, written, went_out) = self
            .send_keeping(&account, &sending, &mut state, asks)
            .await;
        let written = written || asked_written;
        // Not tried: another attempt found the upstream unreachable between this one taking the account and
        // connecting. It waits as if the account had not been taken (`take_place`), not an attempt.
        if let Outcome::Unreachable { until, .. } = &outcome {
            drop((message, memory, slot));
            reservation.unsent();
            self.slot_freed.notify_one();
            let wait = match until {
                Some(until) => {
                    let at = SystemTime::now()
                        + until.saturating_duration_since(std::time::Instant::now());
                    Wait::Upstream(expires.map_or(at, |e| e.min(at)))
                }
                None => Wait::Connection,
            };
            return Attempted::Waiting {
                pool,
                wait,
                recipients: recipients.len(),
            };
        }
        let slot = match outcome {
            // The upstream takes no more connections than the account's others: this one is given up for a
            // while, and the message waits for one of them (not an attempt; it counts toward the per-minute
            // limit only if it was offered).
            Outcome::Busy { ref reply, offered } => match account.narrow(slot, reply) {
                None => {
                    drop((message, memory));
                    if offered {
                        reservation.finish(false);
                    } else {
                        reservation.unsent();
                    }
                    return Attempted::Waiting {
                        pool,
                        wait: Wait::Connection,
                        recipients: recipients.len(),
                    };
                }
                Some(slot) => slot,
            },
            _ => slot,
        };
        account.transports.note_attempt(&outcome, went_out, early);
        // Taken or refused for the message's sake (a 4xx once the message went out, a content scan's, included):
        // the account works. Anything else (no token, a refused login, a greeting that turns mail away) is its
        // own trouble.
        account.went(
            went_out && matches!(outcome, Outcome::Transient(_))
                || matches!(
                    outcome,
                    Outcome::Delivered(_)
                        | Outcome::Partial { .. }
                        | Outcome::Permanent(_)
                        | Outcome::Refused { .. }
                        | Outcome::RecipientsDeferred(_)
                ),
        );
        note_came_back(&self.recovered, &account);
        drop((message, memory, slot));
        self.slot_freed.notify_one();
        let name = account.name.clone();
        self.clone()
            .blocking(move |d| {
                let taken = matches!(outcome, Outcome::Delivered(_) | Outcome::Partial { .. });
                // Nothing went out (no token, no connection or login), or past max_age only the session was asked:
                // the account sent nothing unless it says so.
                if !went_out || (asks && !taken) {
                    reservation.unsent();
                } else if let Outcome::Partial { refused, .. } = &outcome {
                    reservation.finish_refusing(refused.len());
                } else {
                    reservation.finish(taken);
                }
                let next = match outcome {
                    // Asked past max_age, and the session did not send it (forgotten): bounced as expired.
                    Outcome::Transient(reply) if asks && state.upload.is_none() => {
                        let why = d.expired(&format!("last error: {reply}"));
                        d.dead(id, &mut state, &why, None, &[])
                    }
                    Outcome::Transient(reply) if asks => {
                        let why = format!(
                            "{reply}; past max_age: bounced once the session says it does not hold the message whole, or when Google's week for it ends"
                        );
                        d.settle(id, &account, Outcome::Transient(why), &recipients, &mut state, written)
                    }
                    outcome => d.settle(id, &account, outcome, &recipients, &mut state, written),
                };
                // The lock goes once the file is settled. Closed here, on the blocking pool: the last close of
                // a delivered file, unlinked by `settle`, is when the kernel frees it (truncate, free blocks, the
                // discard), which on the runtime's thread cut the drain by a third.
                drop(locked);
                account.rate.save();
                next
            })
            .await
            .with_account(name)
    }

    /// A Gmail upload session another account kept for this message (the route's other account had room first,
    /// the one holding it had none, or the route changed): it may have sent the message, which uploaded anew
    /// through `chosen` would then go twice. So it is asked first, with its own account's token (a status query,
    /// which takes none of that account's connections or limits). `None`: nothing to ask, or the session says it
    /// does not hold the message whole (forgotten): `chosen` sends it. Else the holding account and what the
    /// session's answer makes of the attempt: delivered, or deferred with the session kept (no clear answer).
    async fn ask_holder(
        &self,
        chosen: &Account,
        sending: &Sending<'_>,
        state: &mut DeliveryState,
        written: &mut bool,
    ) -> Option<(Arc<Account>, Outcome)> {
        let id = sending.id;
        let kept = state.upload.as_ref()?;
        if kept.account == chosen.name {
            // Its own attempt asks it, unless the account no longer sends through the Gmail API.
            if !chosen.transports.asks_upload_sessions() {
                tracing::warn!(relay_queue_id = %id, relay_account = %chosen.name, "this account kept a Gmail upload session for this message but no longer sends through the Gmail API, so the session cannot be asked: the message is sent again; should that session have completed unheard, it goes twice");
            }
            return None;
        }
        // A session kept before its time was (no `begun_at`) is asked too: the message's max_age bounds it.
        let young = kept.begun_at.is_none() || kept.is_young(SystemTime::now());
        let Some(holder) = self
            .accounts
            .get(&kept.account)
            .filter(|h| young && h.transports.asks_upload_sessions())
            .cloned()
        else {
            tracing::warn!(relay_queue_id = %id, relay_account = %chosen.name, kept_by = %kept.account, "the Gmail upload session another account kept for this message cannot be asked (that account no longer sends through the Gmail API, or the session is past Google's week): this account uploads the message anew; should that session have completed unheard, it goes twice");
            return None;
        };
        // Only the question goes (with the session's own byte count: these bytes are not sent), with the holding
        // account's token.
        self.ask_through(
            chosen,
            holder,
            sending,
            state,
            written,
            "Gmail upload session",
            |s| s.upload.is_some(),
        )
        .await
    }

    /// Asks the `what` (a Gmail upload session, a Graph draft) `holder` kept for this message whether it sent it,
    /// through `holder`, before `chosen` sends the message. The answer stands for the attempt, unless the thing
    /// asked is forgotten (`still_kept` says no: it did not send the message) or cannot be asked now that its
    /// account's token is refused even fresh (a revoked grant): then `None`, and `chosen` sends it, since nobody
    /// can ask and the message is not held back for that account's repair while this one works. (A token that
    /// cannot be renewed, or no clear answer, defers it.)
    #[allow(clippy::too_many_arguments)]
    async fn ask_through(
        &self,
        chosen: &Account,
        holder: Arc<Account>,
        sending: &Sending<'_>,
        state: &mut DeliveryState,
        written: &mut bool,
        what: &str,
        still_kept: impl Fn(&DeliveryState) -> bool,
    ) -> Option<(Arc<Account>, Outcome)> {
        let id = sending.id;
        tracing::info!(relay_queue_id = %id, relay_account = %chosen.name, kept_by = %holder.name, "asking the {what} another account kept for this message whether it sent it, before this account sends it");
        let (outcome, wrote, _) = self.send_keeping(&holder, sending, state, true).await;
        *written |= wrote;
        match outcome {
            Outcome::Transient(_) if !still_kept(state) => {
                tracing::info!(relay_queue_id = %id, relay_account = %chosen.name, kept_by = %holder.name, "the {what} another account kept for this message did not send it (or cannot be asked): this account sends it");
                None
            }
            Outcome::AuthRejected(reply) | Outcome::Held { reply, .. } => {
                tracing::warn!(relay_queue_id = %id, relay_account = %chosen.name, kept_by = %holder.name, relay_upstream_reply = %reply, "the {what} another account kept for this message cannot be asked: that account's token is refused; this account sends the message anew; should the {what} have sent it unheard, it goes twice");
                None
            }
            // Sent by that account: its daily count gets the recipients an unclear answer left out.
            outcome @ Outcome::Delivered(_) => {
                holder.rate.accepted_later(sending.recipients.len());
                Some((holder, outcome))
            }
            outcome => Some((holder, outcome)),
        }
    }

    /// A Graph draft another account of the route kept for this message, whose `/send` was posted without a clear
    /// answer (that account was busy, held or at its limit when the message came due again): asked through that
    /// account before this one sends the message, as a kept Gmail session is. Sent: delivered by that account;
    /// not yet known (Graph moves a sent draft to Sent Items in its own time): deferred; not sent: removed, and
    /// this account sends it. A draft that was never sent is left to its own account's next attempt.
    async fn ask_draft_holder(
        &self,
        chosen: &Account,
        sending: &Sending<'_>,
        state: &mut DeliveryState,
        written: &mut bool,
    ) -> Option<(Arc<Account>, Outcome)> {
        let id = sending.id;
        let kept = state
            .drafts
            .iter()
            .find(|d| d.account != chosen.name && d.sent_at.is_some())?;
        let name = kept.account.clone();
        let Some(holder) = self
            .accounts
            .get(&name)
            .filter(|h| h.transports.asks_drafts())
            .cloned()
        else {
            tracing::warn!(relay_queue_id = %id, relay_account = %chosen.name, kept_by = %name, "the Graph draft another account sent for this message without a clear answer cannot be asked (that account is no longer configured, or no longer sends through Graph): this account sends the message; should that draft have gone, it goes twice");
            return None;
        };
        self.ask_through(
            chosen,
            holder,
            sending,
            state,
            written,
            "Graph draft",
            |s| s.drafts.iter().any(|d| d.account == name),
        )
        .await
    }

    /// Sends through `account` with the message's state at hand, so that a Gmail upload session can be kept in
    /// it (`ask_only`: see [`ResumePoint::ask_only`]). The outcome, whether the state file was written, and whether
    /// any of the message may have reached the upstream (else it counts for no sending limit).
    async fn send_keeping(
        &self,
        account: &Account,
        sending: &Sending<'_>,
        state: &mut DeliveryState,
        ask_only: bool,
    ) -> (Outcome, bool, bool) {
        let kept = Arc::new(StateResume {
            dir: self.paths.queue.clone(),
            id: sending.id,
            account: account.name.clone(),
            state: Mutex::new(std::mem::take(state)),
            written: AtomicBool::new(false),
            ask_only,
        });
        let resume: Arc<dyn ResumePoint> = kept.clone();
        let went_out = AtomicBool::new(false);
        let outcome = account
            .transports
            .send(
                &account.tokens,
                sending.sender,
                sending.recipients,
                sending.message,
                sending.flags,
                Some(&resume),
                &went_out,
            )
            .await;
        *state = std::mem::take(&mut *lock(&kept.state));
        (
            outcome,
            kept.written.load(Ordering::Acquire),
            went_out.load(Ordering::Relaxed),
        )
    }

    /// Why a message past `max_age` goes to dead/, `then` after the age.
    fn expired(&self, then: &str) -> String {
        format!(
            "expired after {} in the queue; {then}",
            humantime::format_duration(self.queue.max_age)
        )
    }

    /// Whether a last try (past `max_age`) kept by `wait` waits for it rather than going to dead/ untried: a
    /// connection in use (one of its accounts merely busy counts, whatever the others say) or a limit's room that
    /// comes back within a minute (a per-minute window, a delivery in flight ending). A day's limit, a pause, an
    /// upstream held as not answering: it would not be tried before they end.
    fn waits_briefly(&self, wait: &Wait, names: &[String]) -> bool {
        let (now, instant) = (SystemTime::now(), std::time::Instant::now());
        let busy = names.iter().filter_map(|n| self.accounts.get(n)).any(|a| {
            a.slots.available_permits() == 0
                && matches!(
                    a.transports.ready(instant),
                    Reachability::Up | Reachability::Probe | Reachability::Probing
                )
        });
        busy || match wait {
            Wait::Connection | Wait::Behind | Wait::Limit(None) => true,
            Wait::Limit(Some(at)) => at.duration_since(now).unwrap_or_default() <= BRIEF_LIMIT,
            Wait::Upstream(_) => false,
        }
    }

    /// Why a message past `max_age` that cannot be tried now goes to dead/: its last error, or that it was never
    /// tried (and why, if its upstream is not answering), and whether a Graph draft of it may have gone.
    fn untried_why(&self, state: &DeliveryState, envelope: &Envelope) -> String {
        let paused = || {
            let decision = self.routing.route(Addressing::from(envelope))?;
            let (name, p) = self.pause_of(decision.accounts, SystemTime::now())?;
            Some(format!(
                "the provider asked account {name} to pause until {} ({})",
                humantime::format_rfc3339_seconds(p.until),
                p.reply
            ))
        };
        let then = match &state.last_error {
            Some(last) => format!("last error: {last}"),
            None => match self.outage_of(envelope).or_else(paused) {
                Some(why) => format!("never tried; {why}"),
                None => "never tried".to_string(),
            },
        };
        self.expired_with_drafts(state, &then)
    }

    /// [`Self::expired`], saying when a Graph draft of the message was sent without a clear answer: the bounce must
    /// not say for sure that it failed.
    fn expired_with_drafts(&self, state: &DeliveryState, then: &str) -> String {
        let why = self.expired(then);
        match state.drafts.iter().find_map(|d| d.sent_at) {
            Some(at) => format!(
                "{why}; but a Graph draft of it was sent at {} without a clear answer, and Graph never said whether it went: it may have been delivered",
                humantime::format_rfc3339_seconds(at)
            ),
            None => why,
        }
    }

    /// Moves a message past `max_age` that cannot be tried now to dead/, `why` in full. Said as its account's
    /// when only one could take it (the log line, the metrics, the `dead` alert): that account's trouble kept it.
    async fn expire_untried(
        self: Arc<Self>,
        id: QueueId,
        mut state: DeliveryState,
        why: String,
        accounts: &[String],
    ) -> Attempted {
        let account = match accounts {
            [one] if self.accounts.contains_key(one) => Some(one.clone()),
            _ => None,
        };
        self.blocking(move |d| d.dead(id, &mut state, &why, account.as_deref(), &[]))
            .await
    }

    /// Whether a message whose attempt failed is past `max_age` and goes to dead/ for it. Not
    /// while a Gmail upload session an earlier attempt kept may have sent it: that is asked until Google's week
    /// for it ends.
    fn fails_expired(&self, id: QueueId, state: &DeliveryState, now: SystemTime) -> bool {
        let expired = state
            .age_from(id.created_at())
            .checked_add(self.queue.max_age)
            .is_some_and(|end| end < now);
        expired && !state.upload.as_ref().is_some_and(|u| u.is_young(now))
    }

    /// Moves a message past `max_age` to dead/ (and has it bounced), `then` saying why after its age.
    async fn expire(
        self: Arc<Self>,
        id: QueueId,
        mut state: DeliveryState,
        then: String,
    ) -> Attempted {
        self.blocking(move |d| d.dead(id, &mut state, &d.expired(&then), None, &[]))
            .await
    }

    /// Runs file work (writes with fsyncs, renames, unlinks) on the blocking pool, so the runtime's threads do not
    /// wait on the disk.
    async fn blocking(
        self: Arc<Self>,
        work: impl FnOnce(&Delivery) -> Attempted + Send + 'static,
    ) -> Attempted {
        match self.lane.clone().run(move || work(&self)).await {
            Some(a) => a,
            // The work panicked, or the runtime stopped before it ran: the message stays queued, and is looked at
            // again later.
            None => Attempted::later(SystemTime::now() + RECHECK),
        }
    }

    /// Acts on an outcome: remove, dead, or defer. `sent_to`: the recipients this attempt was for; `written`:
    /// the attempt wrote the state file (it kept an upload session).
    fn settle(
        &self,
        id: QueueId,
        account: &Account,
        outcome: Outcome,
        sent_to: &[String],
        state: &mut DeliveryState,
        written: bool,
    ) -> Attempted {
        let state_dir = self.paths.state_dir();
        match &outcome {
            Outcome::Delivered(r) | Outcome::Partial { reply: r, .. } => {
                account.record(state_dir, "delivered", r)
            }
            Outcome::Permanent(r) => account.record(state_dir, "dead", r),
            Outcome::Refused { reply: r, refused } if refused.iter().all(|r| r.permanent) => {
                account.record(state_dir, "dead", r)
            }
            // The login and the sender were taken: the recipients wait, the account works.
            Outcome::RecipientsDeferred(r) => account.record(state_dir, "recipients_deferred", r),
            Outcome::Refused { reply: r, .. }
            | Outcome::Transient(r)
            | Outcome::AuthRejected(r)
            | Outcome::Throttled(r, _)
            | Outcome::Busy { reply: r, .. }
            | Outcome::Unreachable { reply: r, .. }
            | Outcome::Held { reply: r, .. } => account.record(state_dir, "deferred", r),
        }
        match outcome {
            Outcome::Delivered(reply) => {
                self.delivered(id, account, &reply, written || state.may_have_file())
            }
            Outcome::Partial { reply, refused } => {
                self.partial(id, account, &reply, &refused, sent_to, state)
            }
            Outcome::Permanent(reply) => self.dead(id, state, &reply, Some(&account.name), &[]),
            // Refused for good for each: dead, and the bounce gives each recipient its own reply. Where they differ
            // in more than words, the log line and the state name a few of them with theirs.
            Outcome::Refused { reply, refused } if refused.iter().all(|r| r.permanent) => {
                let code = |r: &Refusal| {
                    let status = crate::bounce::enhanced_status(&r.reply).unwrap_or("");
                    (
                        r.reply.get(..3).unwrap_or("").to_string(),
                        status.to_string(),
                    )
                };
                let alike = refused.iter().all(|r| code(r) == code(&refused[0]));
                let why = if alike {
                    reply
                } else {
                    format!("refused for good for every recipient: {}", shown(&refused))
                };
                let each: Vec<(String, String)> = refused
                    .into_iter()
                    .map(|r| (r.recipient, r.reply))
                    .collect();
                self.dead(id, state, &why, Some(&account.name), &each)
            }
            // Some for good, some for now: as after a partial delivery, without one taken.
            Outcome::Refused { reply, refused } => {
                self.partial(id, account, &reply, &refused, sent_to, state)
            }
            // (Busy here: no other connection of the account was open, see `attempt`; Unreachable never comes
            // here, it waits.)
            Outcome::Transient(reply)
            | Outcome::RecipientsDeferred(reply)
            | Outcome::AuthRejected(reply)
            | Outcome::Busy { reply, .. }
            | Outcome::Unreachable { reply, .. } => {
                self.defer(id, state, &reply, Some(&account.name))
            }
            Outcome::Held { reply, tried, .. } => {
                if tried {
                    // It went out and was refused: said as a deferral with its diagnosis (a few a hold at most,
                    // one per connection), though it counts no attempt.
                    let d = self.diagnosed(&reply, Some(&account.name));
                    crate::events::emit(crate::events::Event::Deferred {
                        id,
                        account: Some(&account.name),
                    });
                    tracing::warn!(relay_event = "deferred", relay_queue_id = %id, relay_account = %account.name, relay_upstream_reply = %reply, relay_diagnosis = d.field(), "deferred{d} (with the account's mail, not counted as an attempt: the account was refused, not the message)");
                }
                self.held_back(id, state, &reply, &account.name)
            }
            // The provider said how long to wait. It is the account that waits: its other mail would only be
            // refused the same way meanwhile, so all of it is held (the message too, when it comes due on the
            // retry schedule), while another account of its route may take it sooner.
            Outcome::Throttled(reply, wait) => {
                let now = SystemTime::now();
                let until = now.checked_add(wait).unwrap_or(now);
                // `Retry-After: 0` (or a date past) asks for no pause. A short one holds the account's mail too,
                // but is said as the message's deferral only (README: 30 s or more is the account's pause).
                if !wait.is_zero()
                    && account.rate.pause_until(until, &reply)
                    && wait >= ACCOUNT_PAUSE
                {
                    let d = self.diagnosed(&reply, Some(&account.name));
                    tracing::warn!(
                        relay_event = "paused",
                        relay_account = %account.name,
                        relay_queue_id = %id,
                        relay_upstream_reply = %reply,
                        relay_diagnosis = d.field(),
                        "the provider asked the account to pause: its mail is held until {}; `relay queue retry` ends every account's pause early{d}",
                        humantime::format_rfc3339_seconds(until)
                    );
                }
                // A short wait (a 503's `Retry-After: 5`) is a server's trouble: the message is deferred as for
                // any, at least that long, on its retry schedule (retaken at once, a short pause would have it
                // sent again every second through an outage).
                if wait < ACCOUNT_PAUSE {
                    return self.defer_for(id, state, &reply, Some(&account.name), wait);
                }
                // The account's throttle, not the message's fault: no step of its retry schedule (it would
                // otherwise wait that step after the pause ends, or hours after a long one); it waits with the
                // account's other mail, or goes through another account of its route.
                self.held_back(id, state, &reply, &account.name)
            }
        }
    }

    /// The message reached every recipient it was for (or all that could be reached).
    fn delivered(
        &self,
        id: QueueId,
        account: &Account,
        reply: &str,
        with_state: bool,
    ) -> Attempted {
        if let Ok(mut d) = self.delivered.lock() {
            d.insert(id);
        }
        // Removed first, logged after: once the journal says "delivered", a crash of relay cannot bring the
        // message back to be sent again. (The unlink is not flushed: after a power cut it may come back and go a
        // second time, a duplicate rather than a loss.)
        let next = self.remove_delivered(id, with_state);
        let name = &account.name;
        crate::events::emit(crate::events::Event::Delivered { id, account: name });
        tracing::info!(relay_event = "delivered", relay_queue_id = %id, relay_account = %account.name, relay_upstream_reply = %reply, "delivered");
        next
    }

    /// The upstream took the message for some recipients and refused the others. Those it took and those it
    /// refused for good (5xx) are finished; those refused for now (4xx, a 452 "too many recipients" among
    /// them) wait for the retry schedule's next step. The state is written before anything is logged, as for a
    /// delivery: a crash before the write sends the message to the same recipients again (at least once), never
    /// to nobody.
    fn partial(
        &self,
        id: QueueId,
        account: &Account,
        reply: &str,
        refused: &[Refusal],
        sent_to: &[String],
        state: &mut DeliveryState,
    ) -> Attempted {
        let (failed, later): (Vec<&Refusal>, Vec<&Refusal>) =
            refused.iter().partition(|r| r.permanent);
        let waits = |r: &String| later.iter().any(|l| &l.recipient == r);
        state
            .finished
            .extend(sent_to.iter().filter(|r| !waits(r)).cloned());
        // Said (and bounced) before they are recorded as finished: a crash in between says it twice, never not
        // at all. The bounces read the message from the queue, so before its removal too.
        refused_for_good(id, &account.name, &failed);
        // Taken for some while others wait: said now, not only with the last recipient's delivery (or not at all,
        // should the others end in dead/). Not the message's `delivered`: that one says it left the queue.
        let refused_any = |r: &String| refused.iter().any(|f| &f.recipient == r);
        let taken: Vec<&str> = sent_to
            .iter()
            .filter(|r| !refused_any(r))
            .map(String::as_str)
            .collect();
        if !later.is_empty() && !taken.is_empty() {
            crate::events::emit(crate::events::Event::PartlyDelivered {
                id,
                account: &account.name,
            });
            tracing::info!(relay_event = "partly_delivered", relay_queue_id = %id, relay_account = %account.name, relay_upstream_reply = %reply, recipients = %shown_addresses(&taken), waiting = later.len(), "delivered to these recipients; the others wait");
        }
        let next = if later.is_empty() {
            // Recorded before the removal: should it fail or a crash come between, the next attempt finds every
            // recipient finished and removes the message without sending it again.
            self.record(id, state, "cannot record the recipients delivered to");
            None
        } else {
            let why = shown(later.iter().copied());
            let others = if sent_to.len() > refused.len() {
                "the others have it"
            } else {
                "the others were refused for good"
            };
            let why = format!("refused for now for {why} ({others})");
            // "Too many recipients" ([`too_many_recipients`]) while others were taken: the upstream takes only so
            // many per message (Gmail about 100, Microsoft 500). The rest go in the next transaction, now, not after
            // the retry schedule's wait, and that is not a failed attempt; so does a recipient refused for now for
            // another reason among them (a full mailbox), which that transaction asks again. Each such round
            // finishes at least one recipient, so the rounds end.
            let too_many = |r: &&Refusal| too_many_recipients(&r.reply);
            if later.iter().any(too_many) && sent_to.len() > refused.len() {
                Some(self.more_recipients(id, state, &why, &account.name, later.len()))
            } else {
                Some(self.defer(id, state, &why, Some(&account.name)))
            }
        };
        match next {
            Some(next) => next,
            None => self.delivered(id, account, reply, true),
        }
    }

    /// Removes a delivered message. If that fails it stays in [`Self::delivered`], so this run never sends it
    /// again, and the removal is tried again a minute later.
    ///
    /// `with_state`: whether it may have a state file (an earlier attempt failed); a first attempt's message has
    /// none, and the unlink that would find nothing is skipped. (A state file left over all the same, one that
    /// could not be read, is removed at the next start.)
    fn remove_delivered(&self, id: QueueId, with_state: bool) -> Attempted {
        let path = msg_path(&self.paths.queue, id);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::error!(relay_queue_id = %id, path = %path.display(), error = %e, "cannot remove a delivered message; it is not sent again while relay runs, but would be after a restart: check the queue directory's permissions and the file's attributes (lsattr: immutable or append-only), and that the filesystem is writable");
                return Attempted::later(SystemTime::now() + Duration::from_secs(60));
            }
        }
        if with_state {
            let _ = std::fs::remove_file(state_path(&self.paths.queue, id));
        }
        if let Ok(mut d) = self.delivered.lock() {
            d.remove(&id);
        }
        lock(&self.unrecorded).remove(&id);
        Attempted::Done { account: None }
    }

    /// After an attempt that ended without an outcome (it panicked): the message stays queued and is retried.
    pub fn after_failure(&self, id: QueueId, why: &str) -> Attempted {
        if !msg_path(&self.paths.queue, id).exists() || self.already_delivered(id) {
            return Attempted::Done { account: None };
        }
        let Ok(mut state) = self.state_to_update(id) else {
            return Attempted::later(SystemTime::now() + STATE_RECHECK);
        };
        self.defer(id, &mut state, why, None)
    }

    /// The message's delivery state, for an attempt that writes it back. A state file that is there but cannot
    /// be read just now (out of descriptors, an I/O error, its permissions) is not taken for "never tried":
    /// written back so, the recipients already reached would be forgotten, and sent the message again. An
    /// error then (the reason), and the message waits, said once per message and run (a reread of the schedule sees it
    /// due again). A damaged one (not JSON, or not a file) never reads, so the message goes as on its first
    /// attempt, said in the log.
    fn state_to_update(&self, id: QueueId) -> Result<DeliveryState, String> {
        match try_read_state(&self.paths.queue, id) {
            Ok(state) => {
                if let Ok(mut said) = self.state_unreadable_said.lock()
                    && !said.is_empty()
                {
                    said.remove(&id);
                }
                Ok(state.unwrap_or_default())
            }
            // Damaged, or not a file (a directory or FIFO in its place): it never reads, so the message goes to every
            // recipient again (a duplicate for some, never a loss).
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::InvalidData | std::io::ErrorKind::InvalidInput
                ) =>
            {
                tracing::error!(relay_queue_id = %id, error = %e, "the message's delivery state cannot be read as one; it is sent as on its first attempt, so recipients it already reached may get it twice");
                Ok(DeliveryState::default())
            }
            Err(e) => {
                let first = {
                    let mut said = lock(&self.state_unreadable_said);
                    let due = said.get(&id).is_none_or(|at| at.elapsed() >= STATE_RESAID);
                    let room = said.len() < MAX_SAID || said.contains_key(&id);
                    if due && room {
                        said.insert(id, std::time::Instant::now());
                    }
                    due && room
                };
                if first {
                    tracing::warn!(relay_queue_id = %id, error = %e, "cannot read the message's delivery state, which names the recipients it already reached; it waits, looked at again every 5 minutes (and said again hourly), until the file can be read or the message is deleted");
                } else {
                    tracing::debug!(relay_queue_id = %id, error = %e, "the message's delivery state still cannot be read");
                }
                Err(format!("cannot read its delivery state: {e}"))
            }
        }
    }

    /// Whether `id` has been queued longer than `max_age`, by its id's time.
    fn past_max_age(&self, id: QueueId, now: SystemTime) -> bool {
        id.created_at()
            .checked_add(self.queue.max_age)
            .is_some_and(|end| end < now)
    }

    /// The diagnosis of `why`, fitted to the account's files.
    fn diagnosed(&self, why: &str, account: Option<&str>) -> Diagnosed {
        match account.and_then(|name| self.accounts.get(name)) {
            Some(a) => Diagnosed::of(why, account, a.tokens.provider())
                .advised(a.tokens.rotation())
                .rewriting(a.rewrite.rewrites_header(), why, account),
            None => Diagnosed::of(why, account, None),
        }
    }

    fn defer(
        &self,
        id: QueueId,
        state: &mut DeliveryState,
        why: &str,
        account: Option<&str>,
    ) -> Attempted {
        self.defer_for(id, state, why, account, Duration::ZERO)
    }

    /// Defers for the retry schedule's next step, or `at_least` if that is longer.
    fn defer_for(
        &self,
        id: QueueId,
        state: &mut DeliveryState,
        why: &str,
        account: Option<&str>,
        at_least: Duration,
    ) -> Attempted {
        if self.fails_expired(id, state, SystemTime::now()) {
            let why = self.expired_with_drafts(state, &format!("last error: {why}"));
            return self.dead(id, state, &why, account, &[]);
        }
        state.failed(why);
        let step = self
            .queue
            .retry
            .get(state.attempts as usize - 1)
            .or(self.queue.retry.last())
            .copied()
            .unwrap_or(Duration::from_secs(300))
            .max(at_least);
        let now = SystemTime::now();
        let next = now.checked_add(step).unwrap_or(now);
        state.next_attempt = Some(next);
        self.record(id, state, "cannot record the deferral");
        crate::events::emit(crate::events::Event::Deferred { id, account });
        // A token failure the token manager remembers was said by the deferral that met it first (and by the
        // refresher): repeated for every queued message it would flood the journal (`relay queue show` has it).
        if why.ends_with(&format!("({})", crate::tokens::RECENTLY_FAILED)) {
            tracing::debug!(relay_event = "deferred", relay_queue_id = %id, relay_account = %account.unwrap_or(""), relay_upstream_reply = %why, next_attempt = %humantime::format_rfc3339_seconds(next), "deferred: no token, as for the message before");
            return Attempted::later(next);
        }
        let d = self.diagnosed(why, account);
        tracing::warn!(relay_event = "deferred", relay_queue_id = %id, relay_account = %account.unwrap_or(""), relay_upstream_reply = %why, relay_diagnosis = d.field(), next_attempt = %humantime::format_rfc3339_seconds(next), "deferred{d}");
        Attempted::later(next)
    }

    /// Refused for the account's sake, not the message's: its fresh token was refused ([`Outcome::Held`]; the hold
    /// is seen before an attempt takes the account, by [`Transports::ready`]), or the provider asked the account
    /// to pause. The message is taken up again in a moment, to wait with the account's other mail for the hold's
    /// or the pause's end, or to go through another account of its route: no step of its retry schedule, and no
    /// line but for debugging (the hold or the pause was logged when it began). The reply is kept as its last
    /// error, for `relay queue show` and for the reason it gives should it reach `max_age` this way (a few
    /// writes a minute at most: the mail that waits untried is not taken up).
    fn held_back(
        &self,
        id: QueueId,
        state: &mut DeliveryState,
        why: &str,
        account: &str,
    ) -> Attempted {
        // Past max_age too: not the message's failed attempt. Taken up again, it goes through another account of
        // its route, or to dead/ when every one is held for long (`waits_briefly`).
        tracing::debug!(relay_queue_id = %id, relay_account = %account, reply = %why, "not counted as an attempt: the account was refused, not the message");
        // Its recorded next try goes too: a message woken early (its account's upstream back) would otherwise be
        // taken for not due yet when retaken, and wait for that old step instead of the hold's or pause's end.
        if state.last_error.as_deref() != Some(why) || state.next_attempt.is_some() {
            state.waits(why);
            state.next_attempt = None;
            self.record(id, state, "cannot record why the message waits");
        }
        let now = SystemTime::now();
        Attempted::later(now.checked_add(Duration::from_secs(1)).unwrap_or(now))
    }

    /// Writes the message's state. If that fails, the recipients it finished with are kept in memory, so that
    /// the next attempts of this run skip them all the same (after a restart they would get it again: a
    /// duplicate, not a loss).
    fn record(&self, id: QueueId, state: &DeliveryState, what: &str) {
        match write_state(&self.paths.queue, id, state) {
            Ok(()) => {
                lock(&self.unrecorded).remove(&id);
                if STATE_WRITES_FAIL.swap(false, Ordering::Relaxed) {
                    tracing::info!(relay_queue_id = %id, "delivery state files can be written again");
                }
            }
            Err(e) => {
                // Once, then at debug until a write works: on a full or read-only disk every message's every
                // deferral failed to write its state, an ERROR line each (the disk's own event says the cause).
                if STATE_WRITES_FAIL.swap(true, Ordering::Relaxed) {
                    tracing::debug!(relay_queue_id = %id, error = %e, "{what}");
                } else {
                    tracing::error!(relay_queue_id = %id, error = %e, "{what} (the next failures to write delivery states are logged at debug until one works; meanwhile the recipients delivered to, and the attempts of up to 100,000 messages, are kept in memory)");
                }
                let mut unrecorded = lock(&self.unrecorded);
                // Recipients done with are always kept (a duplicate otherwise); a bare count only while the map is
                // small, so that a huge backlog on a full disk cannot grow it without end (past that, those
                // messages retry at the schedule's first step, as before there was a count).
                if !state.finished.is_empty()
                    || unrecorded.len() < MAX_UNRECORDED
                    || unrecorded.contains_key(&id)
                {
                    unrecorded.insert(
                        id,
                        Unrecorded {
                            attempts: state.attempts,
                            finished: state.finished.clone(),
                        },
                    );
                }
            }
        }
    }

    /// The upstream took as many recipients as it takes per message: the others go at once, in the next
    /// attempt (not counted as a failed one).
    fn more_recipients(
        &self,
        id: QueueId,
        state: &mut DeliveryState,
        why: &str,
        account: &str,
        left: usize,
    ) -> Attempted {
        state.next_attempt = None;
        self.record(id, state, "cannot record the recipients delivered to");
        // Not a deferral (nothing waits; `partly_delivered` said what went), and not counted as one.
        tracing::info!(relay_queue_id = %id, relay_account = %account, relay_upstream_reply = %why, "the upstream takes fewer recipients per message; the {left} left go in a next message now");
        Attempted::later(SystemTime::now())
    }

    fn dead(
        &self,
        id: QueueId,
        state: &mut DeliveryState,
        why: &str,
        account: Option<&str>,
        refused: &[(String, String)],
    ) -> Attempted {
        state.failed(why);
        state.next_attempt = None;
        // Refused for good: an upload session is of no more use, and its URL (a credential) is not kept in dead/.
        state.upload = None;
        let d = self.diagnosed(why, account);
        let queued = msg_path(&self.paths.queue, id);
        // dead/ is made at start; one removed since (by hand, by a clean-up script) is made again, or the message
        // would stay queued with nothing said.
        let moved = crate::state_files::create_dir_all(&self.paths.dead)
            .and_then(|()| write_state(&self.paths.dead, id, state))
            .and_then(|()| std::fs::rename(&queued, msg_path(&self.paths.dead, id)));
        match moved {
            Ok(()) => {
                // Durable like a retry's move back: on ext4 without a journal an unflushed rename can leave the
                // file in neither directory after a power cut.
                for dir in [&self.paths.dead, &self.paths.queue] {
                    if let Err(e) = std::fs::File::open(dir).and_then(|d| d.sync_all()) {
                        tracing::warn!(relay_queue_id = %id, dir = %dir.display(), error = %e, "cannot flush the move to dead/");
                    }
                }
                let _ = std::fs::remove_file(state_path(&self.paths.queue, id));
                lock(&self.unrecorded).remove(&id);
                crate::events::emit(crate::events::Event::Dead {
                    id,
                    account,
                    why,
                    refused,
                });
                // After a partial delivery, the state file in dead/ keeps who had it already.
                let mut finished = state
                    .finished
                    .iter()
                    .take(SHOWN)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ");
                if state.finished.len() > SHOWN {
                    finished.push_str(&format!(" and {} more", state.finished.len() - SHOWN));
                }
                let done = if state.finished.is_empty() {
                    String::new()
                } else {
                    format!(
                        " (recipients already delivered to or refused for good, not concerned: {finished}; all of them in the state file in dead/)"
                    )
                };
                tracing::error!(relay_event = "dead", relay_queue_id = %id, relay_account = %account.unwrap_or(""), relay_upstream_reply = %why, relay_diagnosis = d.field(), relay_finished_recipients = %finished, "moved to dead/{d}{done}");
                Attempted::Done { account: None }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !queued.exists() => {
                // Deleted meanwhile (`relay queue delete`): nothing to keep, not even the state just written.
                let _ = std::fs::remove_file(state_path(&self.paths.dead, id));
                Attempted::Done { account: None }
            }
            Err(e) => {
                let _ = std::fs::remove_file(state_path(&self.paths.dead, id));
                tracing::error!(relay_event = "dead", relay_queue_id = %id, relay_account = %account.unwrap_or(""), relay_upstream_reply = %why, relay_diagnosis = d.field(), error = %e, "failed for good, but cannot move the message to dead/; it stays queued and is tried again later{d}");
                Attempted::later(SystemTime::now() + Duration::from_secs(300))
            }
        }
    }
}

/// One attempt's message as it goes upstream, through whichever account sends it or asks its kept session.
struct Sending<'a> {
    id: QueueId,
    sender: &'a str,
    recipients: &'a [String],
    message: &'a Outgoing,
    flags: MailFlags,
}

/// Adds `account` to `recovered` if its upstream answers again since this was last asked (earliest outage kept);
/// since when it did not, if so.
fn note_came_back(
    recovered: &Mutex<HashMap<String, Recovered>>,
    account: &Account,
) -> Option<std::time::Instant> {
    let since = account.transports.take_came_back()?;
    Recovered::note(recovered, &account.name, since, Recovered::UPSTREAM);
    Some(since)
}

/// An account that can send again: since when it could not, and what came back (so that the log says which:
/// a token had again while the upstream is still down was said as "its upstream answers").
#[derive(Debug, Clone, Copy)]
pub struct Recovered {
    pub since: std::time::Instant,
    what: u8,
}

impl Recovered {
    const TOKEN: u8 = 1;
    const UPSTREAM: u8 = 2;

    fn note(
        map: &Mutex<HashMap<String, Recovered>>,
        account: &str,
        since: std::time::Instant,
        what: u8,
    ) {
        let mut map = lock(map);
        let r = map
            .entry(account.to_string())
            .or_insert(Recovered { since, what });
        r.since = r.since.min(since);
        r.what |= what;
    }

    /// What came back, in words.
    pub fn what(&self) -> &'static str {
        match self.what {
            Self::TOKEN => "its token could be had again",
            Self::UPSTREAM => "its upstream answers again",
            _ => "its token could be had again and its upstream answers",
        }
    }
}

/// Whether the last delivery state written failed (see `Delivery::record`).
static STATE_WRITES_FAIL: AtomicBool = AtomicBool::new(false);

/// Messages whose attempt count alone is kept in memory while their state files cannot be written: about 100
/// bytes each.
const MAX_UNRECORDED: usize = 100_000;

/// The part of a message's state kept in memory when its file could not be written (see `unrecorded`).
struct Unrecorded {
    attempts: u32,
    finished: Vec<String>,
}

/// A message's Gmail upload session, kept in its delivery state for the account its attempt goes through: the
/// attempt's state is here while it sends, and written whole when a session is kept or forgotten. The attempt
/// holds the queue file's lock meanwhile, so nothing else writes the state (`relay queue retry` takes the lock).
struct StateResume {
    dir: PathBuf,
    id: QueueId,
    account: String,
    state: Mutex<DeliveryState>,
    /// The state file was written (one a first attempt may now have).
    written: AtomicBool,
    /// See [`ResumePoint::ask_only`].
    ask_only: bool,
}

impl ResumePoint for StateResume {
    fn load(&self) -> Option<UploadSession> {
        let state = lock(&self.state);
        let kept = state
            .upload
            .as_ref()
            .filter(|u| u.account == self.account)?;
        Some(UploadSession {
            url: kept.url.clone(),
            total: kept.total,
            fingerprint: kept.fingerprint.clone(),
            begun_at: kept.begun_at,
        })
    }

    fn save(&self, session: Option<UploadSession>) -> std::io::Result<()> {
        let mut state = lock(&self.state);
        let upload = session.map(|s| KeptUpload {
            account: self.account.clone(),
            url: s.url,
            total: s.total,
            fingerprint: s.fingerprint,
            begun_at: s.begun_at,
        });
        if state.upload == upload {
            return Ok(());
        }
        state.upload = upload;
        // Atomic and flushed (`state_files::atomic`): the session must be on disk before the first chunk goes.
        let written = write_state(&self.dir, self.id, &state);
        self.written.store(true, Ordering::Release);
        written
    }

    fn ask_only(&self) -> bool {
        self.ask_only
    }

    fn draft(&self) -> Option<Draft> {
        let state = lock(&self.state);
        let kept = state.drafts.iter().find(|d| d.account == self.account)?;
        Some(Draft {
            id: kept.id.clone(),
            sent_at: kept.sent_at,
        })
    }

    fn keep_draft(&self, draft: Option<Draft>) -> std::io::Result<()> {
        let mut state = lock(&self.state);
        let before = state.drafts.clone();
        // Only this account's: another account's draft stays kept, for that account's next attempt to ask.
        state.drafts.retain(|d| d.account != self.account);
        if let Some(d) = draft {
            state.drafts.push(KeptDraft {
                account: self.account.clone(),
                id: d.id,
                sent_at: d.sent_at,
            });
        }
        if state.drafts == before {
            return Ok(());
        }
        let written = write_state(&self.dir, self.id, &state);
        self.written.store(true, Ordering::Release);
        written
    }
}

/// Says which recipients the upstream refused for good, and has them bounced: one DSN for all of them, each
/// with the reply to its own RCPT (Microsoft's name the recipient, so one DSN per distinct reply would be one per
/// recipient).
fn refused_for_good(id: QueueId, account: &str, failed: &[&Refusal]) {
    for r in failed {
        tracing::warn!(relay_event = "recipient_refused", relay_queue_id = %id, relay_account = %account, relay_recipient = %r.recipient, relay_upstream_reply = %r.reply, "refused for good for this recipient; the message's other recipients are not affected by it");
    }
    if failed.is_empty() {
        return;
    }
    let refused: Vec<(String, String)> = failed
        .iter()
        .map(|r| (r.recipient.clone(), r.reply.clone()))
        .collect();
    crate::events::emit(crate::events::Event::RecipientsRefused {
        id,
        account,
        refused: &refused,
    });
}

/// Addresses for a log line, a few of them and how many more.
fn shown_addresses(all: &[&str]) -> String {
    let mut text = all
        .iter()
        .take(SHOWN)
        .copied()
        .collect::<Vec<_>>()
        .join(", ");
    if all.len() > SHOWN {
        text.push_str(&format!(" and {} more", all.len() - SHOWN));
    }
    text
}

/// Refused recipients with their replies, a few of them: for a log line and the state file, where a thousand long
/// replies would not fit.
fn shown<'a>(refused: impl IntoIterator<Item = &'a Refusal>) -> String {
    let mut refused = refused.into_iter();
    let mut why = refused
        .by_ref()
        .take(SHOWN)
        .map(|r| format!("<{}>: {}", r.recipient, r.reply))
        .collect::<Vec<_>>()
        .join("; ");
    let more = refused.count();
    if more > 0 {
        why.push_str(&format!(" and {more} more"));
    }
    why
}

/// A refusal of a recipient that says the message has too many: `X.5.3` (RFC 3463), or without an enhanced code
/// a 452 or a 552 (as RFC 821 used it). A 452 or 552 whose enhanced code says something else (`4.2.2`, `5.2.2`:
/// a mailbox full) is about that recipient, not the count.
fn too_many_recipients(reply: &str) -> bool {
    let mut words = reply.split_ascii_whitespace();
    let code = words.next().unwrap_or("");
    // Only where relay writes it (`code a.b.c text`): a code quoted in the text is not the reply's.
    match words.next().and_then(crate::bounce::enhanced_status) {
        Some(e) => e.ends_with(".5.3"),
        None => code == "452" || code == "552",
    }
}

/// What a second read of a queue file's seal says, after its bytes failed to match `seen`, the seal read first.
#[derive(Debug, PartialEq, Eq)]
enum Reread {
    /// The same seal: the file's own, and the mismatch is damage.
    Same,
    /// Another seal: the first read caught the committer's last step, the seal's 80-byte write, half done (a
    /// message listed by a reread of the queue while it was being committed). The next attempt checks the bytes
    /// against the seal again.
    Changed,
    /// Gone (delivered or deleted meanwhile): nothing to quarantine.
    Gone,
    /// Not readable now (out of descriptors, a disk error): no proof of damage, so not quarantined for it.
    Unreadable(String),
}

fn reread_seal(path: &Path, seen: &str) -> Reread {
    match file::read(path) {
        Ok(now) if now.seal == seen => Reread::Same,
        Ok(_) => Reread::Changed,
        Err(e) if e.is_not_found() => Reread::Gone,
        // Sealed a moment ago, so a file unsealed or unparsable now was replaced by someone: what it holds now is
        // judged by the next look, like any other file.
        Err(e) => Reread::Unreadable(e.to_string()),
    }
}

/// The queued message, checked against its seal (`Ok(None)`: damaged). Blocking: on the blocking pool, but for a
/// message of at most [`READ_INLINE`] bytes.
fn open_message(
    msg: &super::QueuedMessage,
    file: Arc<std::fs::File>,
) -> std::io::Result<Option<Outgoing>> {
    if !msg.size_matches_seal() {
        return Ok(None);
    }
    // Opened when the envelope was read: a `relay queue delete` since then leaves it readable but unlinked, and
    // a deleted message is not sent.
    if std::os::unix::fs::MetadataExt::nlink(&file.metadata()?) == 0 {
        return Err(std::io::ErrorKind::NotFound.into());
    }
    Outgoing::open(file, msg.offset, msg.size, &msg.seal)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::state::read_state;

    #[test]
    fn too_many_recipients_is_told_from_a_full_mailbox() {
        for reply in [
            "452 4.5.3 Too many recipients",
            "452 Too many recipients",
            "552 Too many recipients",
        ] {
            assert!(too_many_recipients(reply), "{reply}");
        }
        for reply in [
            "452 4.2.2 Mailbox full",
            "552 5.2.2 Mailbox over quota",
            "450 4.2.1 Mailbox busy",
            "550 5.1.1 No such user",
        ] {
            assert!(!too_many_recipients(reply), "{reply}");
        }
    }

    #[test]
    fn a_seal_read_again_tells_a_half_written_one_from_damage() {
        let dir = tempfile::tempdir().expect("tempdir");
        let envelope = Envelope::example("a@example.com", &["b@example.com"]);
        let path = msg_path(dir.path(), envelope.id);
        let message = b"Subject: x\r\n\r\nbody\r\n";
        let seal = file::seal_for(message.len() as u64, &blake3::hash(message));
        let mut bytes = file::unsealed_line(&envelope);
        bytes[file::SEAL_AT..file::SEAL_AT + seal.len()].copy_from_slice(seal.as_bytes());
        bytes.extend_from_slice(message);
        std::fs::write(&path, &bytes).expect("write");
        // What a reader saw while the seal's write was half done: its first half, then the placeholder's zeros.
        let torn = format!("{}{}", &seal[..40], "0".repeat(40));
        assert_eq!(reread_seal(&path, &torn), Reread::Changed);
        assert_eq!(reread_seal(&path, &seal), Reread::Same);
        std::fs::remove_file(&path).expect("remove");
        assert_eq!(reread_seal(&path, &seal), Reread::Gone);
        // Cannot be read (here a directory by that name): no proof of damage either way.
        std::fs::create_dir(&path).expect("mkdir");
        assert!(matches!(reread_seal(&path, &seal), Reread::Unreadable(_)));
    }

    fn kept(dir: &Path, id: QueueId, account: &str, state: DeliveryState) -> StateResume {
        StateResume {
            dir: dir.to_path_buf(),
            id,
            account: account.into(),
            state: Mutex::new(state),
            written: AtomicBool::new(false),
            ask_only: false,
        }
    }

    /// A session is kept on disk with the rest of the state, for its account only, and forgotten on disk too.
    #[test]
    fn an_upload_session_is_kept_in_the_state_for_its_account() {
        let dir = tempfile::tempdir().unwrap();
        let id = QueueId::new();
        let state = DeliveryState {
            attempts: 2,
            last_error: Some("Gmail API: timed out".into()),
            ..DeliveryState::default()
        };
        let gmail = kept(dir.path(), id, "gmail", state);
        assert_eq!(gmail.load(), None);
        let session = UploadSession {
            url: "https://upload.example/s?upload_id=X".into(),
            total: 6_000_000,
            fingerprint: Some("f".into()),
            begun_at: Some(SystemTime::now()),
        };
        gmail.save(Some(session.clone())).unwrap();
        assert!(gmail.written.load(Ordering::Acquire));
        let on_disk = read_state(dir.path(), id);
        assert_eq!(on_disk.attempts, 2);
        assert_eq!(
            on_disk
                .upload
                .as_ref()
                .map(|u| (u.account.as_str(), u.total)),
            Some(("gmail", 6_000_000))
        );
        // The next attempt through the same account finds it; through another (the route changed), not.
        assert_eq!(
            kept(dir.path(), id, "gmail", on_disk.clone()).load(),
            Some(session)
        );
        assert_eq!(kept(dir.path(), id, "other", on_disk).load(), None);
        gmail.save(None).unwrap();
        assert_eq!(read_state(dir.path(), id).upload, None);
    }

    /// Each account's Graph draft is kept apart: one account's attempt neither replaces nor forgets another's,
    /// which that account's next attempt must still ask about.
    #[test]
    fn graph_drafts_are_kept_per_account() {
        let dir = tempfile::tempdir().unwrap();
        let id = QueueId::new();
        let draft = |id: &str| Draft {
            id: id.into(),
            sent_at: None,
        };
        let a = kept(dir.path(), id, "a", DeliveryState::default());
        a.keep_draft(Some(draft("A1"))).unwrap();
        let b = kept(dir.path(), id, "b", read_state(dir.path(), id));
        assert_eq!(b.draft(), None);
        b.keep_draft(Some(draft("B1"))).unwrap();
        b.keep_draft(Some(draft("B2"))).unwrap();
        let on_disk = read_state(dir.path(), id);
        assert_eq!(on_disk.drafts.len(), 2, "{:?}", on_disk.drafts);
        assert_eq!(
            kept(dir.path(), id, "a", on_disk.clone()).draft(),
            Some(draft("A1"))
        );
        assert_eq!(b.draft(), Some(draft("B2")));
        b.keep_draft(None).unwrap();
        let on_disk = read_state(dir.path(), id);
        assert_eq!(on_disk.drafts.len(), 1);
        assert_eq!(on_disk.drafts[0].id, "A1");
    }
}
