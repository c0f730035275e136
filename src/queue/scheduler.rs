//! When each queued message is due: new messages from the spool at once, deferred ones at their recorded next
//! attempt, everything again when `relay queue retry` touches the trigger. Each attempt runs as its own task
//! (`delivery.rs`); this loop only decides when.
//!
//! Bounded by design: at most [`MAX_IN_FLIGHT`] attempts exist at a time (the rest wait here as an id and a
//! time, 32 bytes each), at most [`MAX_SCHEDULED`] of those wait in memory (beyond that the queue directory is
//! read again once the schedule has room), and on shutdown attempts in flight get [`DRAIN`] to finish; the rest
//! are stopped and their messages stay queued.
//!
//! A message whose accounts cannot take it now (connections in use, a sending limit reached) is parked with the
//! rest of its pool's mail, oldest first, and costs no attempt: it comes back when one of those accounts ends a
//! delivery, or at the moment the limit's window frees room (a timed wake-up per pool, never a polling loop).

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

use super::QueueId;
use super::delivery::{Account, Attempted, Delivery, Wait, Waiting};
use super::layout::{self, FileKind};
use super::retry::{TRIGGER_CHECK, trigger_mtime};
use super::state::read_state;
use crate::config::Config;
use crate::health::{Health, test_wedge};

/// Delivery attempts that exist at once, across accounts (each account further limits its own connections).
const MAX_IN_FLIGHT: usize = 64;
/// Messages the schedule holds in memory; a larger backlog is read from disk again as the schedule drains.
const MAX_SCHEDULED: usize = 100_000;
/// When a message that could not be parked (too many are) is looked at again, if nothing says sooner.
/// The least time between two readings of the queue directory that nothing asked for (see `Scheduler::reread`).
const REREAD_PAUSE: Duration = Duration::from_secs(1);
const PARKED_FULL_RECHECK: Duration = Duration::from_secs(30);
/// How long a shutdown waits for deliveries in flight.
pub const DRAIN: Duration = Duration::from_secs(20);

/// [`DRAIN`]; `RELAY_TEST_DRAIN_MS` in a test, so that it sees the drain run out.
fn drain_time() -> Duration {
    crate::test_hooks::duration("RELAY_TEST_DRAIN_MS", DRAIN)
}

type Due = BinaryHeap<Reverse<(SystemTime, QueueId)>>;

pub struct Scheduler {
    /// Counts finished delivery attempts, so that tests (and status) can wait for one without polling.
    pub attempts: watch::Sender<u64>,
    delivery: Arc<Delivery>,
    /// Where a reload (SIGHUP) sends the delivery built from the new config.
    deliveries: watch::Sender<Arc<Delivery>>,
}

impl Scheduler {
    /// The accounts whose upstream answers again: what waited for it, untried, goes now with every connection;
    /// what it deferred meanwhile too, instead of at its next retry.
    fn wake_recovered(&self, s: &mut Schedule) {
        for (account, back) in self.delivery.take_recovered() {
            let since = back.since;
            self.delivery.recovered(&account);
            for &pool in self.delivery.pools_with(&account) {
                s.unpark(pool, self.delivery.room(pool).max(1), SystemTime::now());
            }
            // Mail a route's other account deferred (its token trouble, say) may go through this one now.
            let woken: usize = self
                .delivery
                .pool_mates(&account)
                .iter()
                .map(|a| s.wake_deferred(a, since))
                .sum();
            if woken > 0 {
                tracing::info!(relay_account = %account, messages = woken, "the account can send again ({}): the mail it deferred meanwhile is due now", back.what());
            }
        }
    }

    pub fn new(config: &Config, accounts: Vec<Arc<Account>>) -> Scheduler {
        let delivery = Arc::new(Delivery::new(config, accounts));
        Scheduler {
            attempts: watch::channel(0).0,
            deliveries: watch::channel(delivery.clone()).0,
            delivery,
        }
    }

    /// Takes a new delivery (accounts, routes, retry schedule) for the attempts that start from now on; those in
    /// flight finish with the one they began with.
    pub fn deliveries(&self) -> watch::Sender<Arc<Delivery>> {
        self.deliveries.clone()
    }

    /// Runs until `stop`: takes new messages from `committed`, and every queued one when it falls due. The loop
    /// beats a heartbeat in `health` from its own ticker, so that the watchdog sees it turn.
    pub async fn run(
        mut self,
        mut committed: super::announce::Announcements,
        mut stop: watch::Receiver<bool>,
        health: Arc<Health>,
    ) {
        let heartbeat = health.register("delivery scheduler");
        let mut beat = health.ticker();
        let mut updates = self.deliveries.subscribe();
        while !self.delivery.has_accounts() {
            // Nothing to deliver through: mail stays queued, untouched, until a reload brings an account; then the
            // queue is read from disk. The announcements of new mail are read and dropped meanwhile.
            tokio::select! {
                Some(_) = committed.recv() => {}
                Ok(()) = updates.changed() => self.delivery = updates.borrow_and_update().clone(),
                _ = beat.tick() => heartbeat.beat(),
                _ = stop.wait_for(|s| *s) => {
                    heartbeat.retire();
                    return;
                }
            }
            test_wedge("scheduler").await;
        }
        let state_dir = self.delivery.paths().state_dir().to_path_buf();
        let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
        let mut tasks: JoinSet<Attempted> = JoinSet::new();
        // Each attempt with the reload generation it started under: a pool number means something only in the
        // delivery (routes, accounts) the attempt ran on.
        let mut running: HashMap<tokio::task::Id, (QueueId, u64)> = HashMap::new();
        let mut generation = 0u64;
        let mut s = Schedule::new(self.delivery.waiting());
        let mut trigger_seen = trigger_mtime(&state_dir);
        // What was dropped before this first reading is in it.
        committed.missed();
        match self.reread(&mut s, &heartbeat, &mut beat).await {
            Ok(()) => {}
            Err(e) => {
                // Marked incomplete, so that it is read again at the next turn of the loop.
                s.overflow = true;
                tracing::error!(error = %e, "cannot read the queue; retrying shortly");
            }
        }
        let mut check = tokio::time::interval(TRIGGER_CHECK);
        let mut ticked = false;
        let mut saving: Option<tokio::task::JoinHandle<()>> = None;
        // dead/'s retention: a while after start, then every hour (sooner while a backlog lasts), one sweep at a
        // time.
        let mut tidying: Option<tokio::task::JoinHandle<bool>> = None;
        let mut next_tidy = Instant::now() + super::dead::first_sweep();
        // The same across reloads (`Delivery::succeeded_by` keeps it).
        let slot_freed = self.delivery.slot_freed();
        loop {
            if committed.missed() {
                // New mail found the announcements full: it is on disk, and read from there.
                s.missed = true;
            }
            let now = SystemTime::now();
            let woken: Vec<usize> = s
                .wakes
                .iter()
                .filter(|(_, at)| **at <= now)
                .map(|(pool, _)| *pool)
                .collect();
            for pool in woken {
                s.wakes.remove(&pool);
                // As many as can go now; at least one, whose attempt says when to look again.
                s.unpark(pool, self.delivery.room(pool).max(1), now);
            }
            while let Some(Reverse((at, id))) = s.due.peek().copied() {
                // A reload left no account: mail waits, untried, as it does when relay starts without one, and
                // goes as soon as a reload brings one (an attempt now would only count a failure against it).
                if at > now || !self.delivery.has_accounts() {
                    break;
                }
                if s.in_flight.contains(&id) {
                    // Its attempt is running: look again once it ends.
                    s.due.pop();
                    s.rerun.insert(id);
                    continue;
                }
                if s.in_flight.len() >= self.delivery.attempt_budget() || !self.delivery.may_start()
                {
                    break;
                }
                let Ok(permit) = slots.clone().try_acquire_owned() else {
                    break;
                };
                s.due.pop();
                s.forget_parked(id);
                s.deferred.remove(&id);
                // Kept while it waits for its accounts (parked), so that it is not held by its old time then.
                let early = s.early.contains(&id);
                s.in_flight.insert(id);
                let delivery = self.delivery.clone();
                let seeking = delivery.seeking(id);
                let handle = tasks.spawn(async move {
                    let attempted = delivery.attempt(id, seeking, early).await;
                    drop(permit);
                    attempted
                });
                running.insert(handle.id(), (id, generation));
            }
            if s.read_wanted()
                && Instant::now() >= s.read_after
                && self.reread(&mut s, &heartbeat, &mut beat).await.is_ok()
            {
                continue;
            }
            let waiting_for_slot = s.due.peek().is_some_and(|Reverse((at, _))| *at <= now);
            let sleep = match s.due.peek() {
                _ if waiting_for_slot => Duration::from_secs(3600),
                Some(Reverse((at, _))) => at.duration_since(now).unwrap_or_default(),
                None => Duration::from_secs(3600),
            };
            let sleep = match s.wakes.values().min() {
                Some(at) => sleep.min(at.duration_since(now).unwrap_or_default()),
                None => sleep,
            };
            let sleep = match s.read_wanted() {
                true => sleep.min(s.read_after.saturating_duration_since(Instant::now())),
                false => sleep,
            };
            tokio::select! {
                Some(id) = committed.recv() => s.push(SystemTime::now(), id),
                Some(joined) = tasks.join_next_with_id(), if !tasks.is_empty() => {
                    let (task, attempted) = match joined {
                        Ok((task, attempted)) => (task, Some(attempted)),
                        Err(e) => {
                            let task = e.id();
                            let attempted = running.get(&task).map(|(id, _)| {
                                tracing::error!(relay_queue_id = %id, error = %e, "delivery attempt failed unexpectedly; the message stays queued");
                                self.delivery.after_failure(*id, "delivery attempt failed unexpectedly")
                            });
                            (task, attempted)
                        }
                    };
                    // A message that waits for its accounts, or that is still arriving, was not an attempt.
                    let parked = matches!(
                        attempted,
                        Some(Attempted::Waiting { .. } | Attempted::Arriving { .. })
                    );
                    let ran = running.remove(&task);
                    if let Some((id, _)) = ran {
                        // Parked below if it is to be; either way its attempt's own hold has done its work.
                        s.waiting.release(id);
                    }
                    match (ran, attempted) {
                        // Waiting in a pool of the delivery before a reload: due now, to find its pool in this one.
                        (Some((id, started)), Some(Attempted::Waiting { .. }))
                            if started != generation =>
                        {
                            s.in_flight.remove(&id);
                            s.rerun.remove(&id);
                            s.unparked.remove(&id);
                            s.push(SystemTime::now(), id);
                        }
                        (Some((id, _)), Some(attempted)) => s.finished(id, attempted, &self.delivery),
                        _ => {}
                    }
                    self.wake_recovered(&mut s);
                    if !parked {
                        self.attempts.send_modify(|n| *n += 1);
                    }
                }
                _ = tokio::time::sleep(sleep) => {}
                _ = slot_freed.notified() => {}
                _ = check.tick() => ticked = true,
                _ = beat.tick() => heartbeat.beat(),
                Ok(()) = updates.changed() => {
                    let delivery = updates.borrow_and_update().clone();
                    s.replan(delivery.waiting());
                    self.delivery = delivery;
                    generation += 1;
                }
                _ = stop.wait_for(|s| *s) => break,
            }
            test_wedge("scheduler").await;
            if std::mem::take(&mut ticked) {
                // The counters of accounts without limits are written here rather than per message; one write at a
                // time, so that a slow disk does not pile them up on the blocking pool.
                if saving.as_ref().is_none_or(|h| h.is_finished()) {
                    let delivery = self.delivery.clone();
                    saving = Some(tokio::task::spawn_blocking(move || {
                        delivery.save_counters()
                    }));
                }
                // A pool whose mail waits for a connection that was freed without its attempt saying so (rare, but
                // it must not strand mail): one message comes back each tick. That includes pools waiting for a
                // limit's window: one account paused for an hour while another's delivery ended just before the
                // message was parked must not hold it (and the mail behind it) for the hour. (`room` is 0 for an
                // account that is paused or at its limits; a first message held for its recipients counts room
                // for all of them, so that it does not come back each tick while they do not fit.)
                self.delivery.widen_connections();
                self.delivery.close_idle();
                if tidying.as_ref().is_some_and(|h| h.is_finished())
                    && let Some(done) = tidying.take()
                    && matches!(done.await, Ok(true))
                {
                    next_tidy = next_tidy.min(Instant::now() + super::dead::SWEEP_AGAIN);
                }
                if tidying.is_none() && Instant::now() >= next_tidy {
                    next_tidy = Instant::now() + super::dead::SWEEP_EVERY;
                    let delivery = self.delivery.clone();
                    tidying = Some(tokio::task::spawn_blocking(move || delivery.tidy_dead()));
                }
                // An upstream that is down with no mail left to try it is tried on its own, so that its return
                // is seen; and seen returned, its mail goes.
                self.delivery
                    .check_unreachable(|pool| s.parked.get(&pool).is_some_and(|p| !p.is_empty()));
                self.wake_recovered(&mut s);
                let pools: Vec<usize> = s.parked.keys().copied().collect();
                for pool in pools {
                    let go = match s.held_first(pool) {
                        // Held for its recipients: taken up again once they fit, or once it is gone (`relay queue
                        // delete` says nothing to the daemon), so that the mail behind it does not wait for a
                        // window it no longer needs.
                        Some((id, need)) => {
                            self.delivery.room_for(pool, need) > 0 || !self.delivery.is_queued(id)
                        }
                        None => self.delivery.room(pool) > 0,
                    };
                    if go {
                        s.unpark(pool, 1, SystemTime::now());
                    }
                }
                let now_seen = trigger_mtime(&state_dir);
                if now_seen != trigger_seen {
                    // Replaced only once the new schedule is read: a failed read keeps the old one.
                    match self.reread(&mut s, &heartbeat, &mut beat).await {
                        Ok(()) => {
                            trigger_seen = now_seen;
                            // Attempts start at the next turn of the loop, so none of the mail made due meets
                            // a hold lifted here.
                            let only = super::retry::trigger_accounts(&state_dir);
                            let reach = self.delivery.lift_holds(only.as_deref());
                            if self.delivery.lift_pauses(only.as_deref()) | reach {
                                // The mail held by the pauses waits for their end: it is due now instead, and so
                                // is that of attempts still deciding (a new generation), which saw them.
                                s.wake_all();
                                generation += 1;
                            }
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "cannot reread the queue; keeping the current schedule")
                        }
                    }
                }
            }
        }
        heartbeat.retire();
        self.drain(tasks, running).await;
        let delivery = self.delivery.clone();
        let _ = tokio::task::spawn_blocking(move || delivery.save_counters()).await;
    }

    /// Lets attempts in flight finish within [`DRAIN`]; stops the rest, whose messages stay queued.
    /// `running`: each attempt's message, by its task.
    async fn drain(
        &self,
        mut tasks: JoinSet<Attempted>,
        mut running: HashMap<tokio::task::Id, (QueueId, u64)>,
    ) {
        if tasks.is_empty() {
            return;
        }
        tracing::info!(deliveries = tasks.len(), "waiting for deliveries in flight");
        let finished = tokio::time::timeout(drain_time(), async {
            while let Some(joined) = tasks.join_next_with_id().await {
                let task = match &joined {
                    Ok((task, _)) => *task,
                    Err(e) => e.id(),
                };
                running.remove(&task);
                self.attempts.send_modify(|n| *n += 1);
            }
        })
        .await;
        if finished.is_err() {
            tracing::warn!(
                deliveries = tasks.len(),
                "deliveries still in flight after the drain timeout; their messages stay queued"
            );
            // Each by its id: one whose upstream had the whole message and had not answered yet (a slow scan)
            // may have taken it, and goes again at the next start. (Said, not written into its state: the
            // attempt's own file work may still be running.)
            for (id, _) in running.values() {
                tracing::warn!(relay_queue_id = %id, "stopped in the middle of its delivery attempt: it stays queued and goes again at the next start; if the upstream had been sent the whole message and had not answered yet, it may arrive twice");
            }
            tasks.shutdown().await;
        }
    }

    /// Replaces the schedule with what `queue/` holds, and says when it may be read again unasked: at least a
    /// second later, and four times as long as this reading took, so that rereading a large queue never takes
    /// more than a fifth of the scheduler's time (nor starves the attempts it should start). A failed read keeps
    /// the schedule.
    async fn reread(
        &self,
        s: &mut Schedule,
        heartbeat: &crate::health::Heartbeat,
        beat: &mut tokio::time::Interval,
    ) -> std::io::Result<()> {
        let started = Instant::now();
        let read = self.load(s, heartbeat, beat).await;
        s.read_after = Instant::now() + REREAD_PAUSE.max(started.elapsed() * 4);
        let (due, overflow) = read?;
        (s.due, s.overflow, s.missed) = (due, overflow, false);
        s.after_reread();
        Ok(())
    }

    /// Reads the schedule from disk on the blocking pool, leaving out what is in flight or parked. The heartbeat
    /// goes on while it reads: a backlog of a hundred thousand state files on a cold disk can take longer than the
    /// watchdog interval, and a restart would only read them again (a restart loop that delivers nothing).
    async fn load(
        &self,
        s: &Schedule,
        heartbeat: &crate::health::Heartbeat,
        beat: &mut tokio::time::Interval,
    ) -> std::io::Result<(Due, bool)> {
        let queue = self.delivery.paths().queue.clone();
        let skip: HashSet<QueueId> = s
            .in_flight
            .iter()
            .chain(s.parked_ids.keys())
            .copied()
            .collect();
        let read = tokio::task::spawn_blocking(move || load_schedule(&queue, &skip));
        tokio::pin!(read);
        loop {
            tokio::select! {
                done = &mut read => return done.map_err(std::io::Error::other)?,
                _ = beat.tick() => heartbeat.beat(),
            }
        }
    }
}

/// What the scheduler holds in memory.
struct Schedule {
    due: Due,
    /// The schedule is incomplete: the queue directory is read again once it has room.
    overflow: bool,
    /// New mail was announced while the announcements were full, or came due with the schedule full: the queue
    /// directory is read again (whatever the schedule holds, since that mail may be due before all of it).
    missed: bool,
    /// The earliest time the queue directory is read again for `overflow` or `missed`.
    read_after: Instant,
    in_flight: HashSet<QueueId>,
    /// Came due while its attempt was running: looked at again when that attempt ends.
    rerun: HashSet<QueueId>,
    /// Waiting for their accounts, per pool, oldest (lowest id) first.
    parked: HashMap<usize, BTreeSet<QueueId>>,
    parked_ids: HashMap<QueueId, usize>,
    /// When a pool's limits free room: the earliest, one per pool.
    wakes: HashMap<usize, SystemTime>,
    /// A pool's first message held by a limit, and how many recipients it needs room for: the tick takes it up
    /// again only when they fit (while it is still first). One per pool at most.
    needs: HashMap<usize, (QueueId, usize)>,
    /// Each pool's oldest parked message, for delivery to keep newer mail behind it.
    waiting: Arc<Waiting>,
    /// Deferred by this run, in the schedule: by which account, and when (for [`Schedule::wake_deferred`]).
    /// Within [`MAX_SCHEDULED`], like the schedule.
    deferred: HashMap<QueueId, (String, Instant)>,
    /// Made due before their recorded time by [`Schedule::wake_deferred`], until their attempt is made (parked
    /// meanwhile, they stay).
    early: HashSet<QueueId>,
    /// Woken from a pool's parked list, their attempt not yet over: one whose attempt ends without taking a
    /// place of the pool (expired, nothing left to send, gone) hands its turn to the next parked message, which
    /// would otherwise wait for the pool's next wake (a hold's end, a delivery's end). Within [`MAX_SCHEDULED`].
    unparked: HashMap<QueueId, usize>,
}

impl Schedule {
    fn new(waiting: Arc<Waiting>) -> Schedule {
        Schedule {
            due: Due::default(),
            overflow: false,
            missed: false,
            read_after: Instant::now(),
            in_flight: HashSet::new(),
            rerun: HashSet::new(),
            parked: HashMap::new(),
            parked_ids: HashMap::new(),
            wakes: HashMap::new(),
            needs: HashMap::new(),
            waiting,
            deferred: HashMap::new(),
            early: HashSet::new(),
            unparked: HashMap::new(),
        }
    }

    /// Whether the queue directory should be read again (once `read_after` has come).
    fn read_wanted(&self) -> bool {
        self.missed || (self.overflow && self.due.len() < MAX_SCHEDULED / 2)
    }

    fn push(&mut self, at: SystemTime, id: QueueId) {
        if self.due.len() < MAX_SCHEDULED {
            self.due.push(Reverse((at, id)));
        } else if at <= SystemTime::now() {
            // Due now, with no room: a schedule full of later retries (a backlog of one account that keeps
            // failing) must not keep it waiting until that backlog drains. The reread keeps the soonest.
            self.missed = true;
        } else {
            self.overflow = true;
        }
    }

    fn finished(&mut self, id: QueueId, attempted: Attempted, delivery: &Delivery) {
        self.in_flight.remove(&id);
        self.pass_turn(id, &attempted);
        if !matches!(attempted, Attempted::Waiting { .. }) {
            self.early.remove(&id);
        }
        if let Some(account) = attempted.freed() {
            for &pool in delivery.pools_with(account) {
                // A first message held for recipients that still do not fit waits for the tick that finds room
                // (each delivery's end took it up again, to be held and logged again).
                if self
                    .held_first(pool)
                    .is_some_and(|(_, need)| delivery.room_for(pool, need) == 0)
                {
                    continue;
                }
                self.unpark(pool, 1, SystemTime::now());
            }
        }
        let rerun = self.rerun.remove(&id);
        match attempted {
            Attempted::Waiting {
                pool,
                wait,
                recipients,
            } => {
                if self.parked_ids.len() >= MAX_SCHEDULED {
                    // No room to park it: it is looked at again later, like a deferred message.
                    let at = match wait {
                        Wait::Limit(Some(at)) | Wait::Upstream(at) => at,
                        _ => SystemTime::now() + PARKED_FULL_RECHECK,
                    };
                    self.push(at, id);
                    return;
                }
                self.park(pool, id);
                match wait {
                    Wait::Limit(at) => {
                        if let Some(at) = at {
                            let wake = self.wakes.entry(pool).or_insert(at);
                            *wake = (*wake).min(at);
                        }
                        // First in line (older mail would have kept it behind): what the pool's tick asks room for.
                        self.needs.insert(pool, (id, recipients));
                    }
                    // Its upstream's hold ends then (`room` counts the one connection that may try it after); another
                    // account of the pool that freed a connection meanwhile takes it now, as below.
                    Wait::Upstream(at) => {
                        self.drop_need(pool, id);
                        let wake = self.wakes.entry(pool).or_insert(at);
                        *wake = (*wake).min(at);
                        if self.parked.get(&pool).and_then(BTreeSet::first) == Some(&id)
                            && delivery.room(pool) > 0
                        {
                            self.unpark(pool, 1, SystemTime::now());
                        }
                    }
                    // What it waited for may have ended before it was parked (older mail gone, a delivery over):
                    // first in line with room, it goes now. Never loops: with room, an attempt finds a connection
                    // (or, refused one by the upstream, gives its slot up: at most `max_connections - 1` times).
                    Wait::Connection | Wait::Behind => {
                        self.drop_need(pool, id);
                        // Room for its own recipients: an account with room for one, and not for these, would
                        // otherwise have it taken up again at once, and again, while the busy one stays busy.
                        if self.parked.get(&pool).and_then(BTreeSet::first) == Some(&id)
                            && delivery.room_for(pool, recipients) > 0
                        {
                            self.unpark(pool, 1, SystemTime::now());
                        }
                    }
                }
            }
            // Found still arriving, and announced committed while it was being looked at: due now, not at its
            // recheck.
            Attempted::Arriving { .. } if rerun => self.push(SystemTime::now(), id),
            other => match other.next() {
                Some(at) => {
                    if let Some(account) = other.freed()
                        && self.deferred.len() < MAX_SCHEDULED
                    {
                        self.deferred
                            .insert(id, (account.to_string(), Instant::now()));
                    }
                    self.push(at, id)
                }
                None if rerun => self.push(SystemTime::now(), id),
                None => {}
            },
        }
    }

    /// The schedule was read from disk again: mail made due early keeps that (the disk has its old time), and
    /// what is no longer scheduled, parked or in flight is forgotten.
    fn after_reread(&mut self) {
        if self.deferred.is_empty() && self.early.is_empty() && self.unparked.is_empty() {
            return;
        }
        let now = SystemTime::now();
        let due = std::mem::take(&mut self.due);
        let mut scheduled = HashSet::with_capacity(due.len());
        self.due = due
            .into_iter()
            .map(|Reverse((at, id))| {
                scheduled.insert(id);
                if at > now && self.early.contains(&id) {
                    Reverse((now, id))
                } else {
                    Reverse((at, id))
                }
            })
            .collect();
        self.deferred.retain(|id, _| scheduled.contains(id));
        let in_flight = &self.in_flight;
        self.unparked
            .retain(|id, _| scheduled.contains(id) || in_flight.contains(id));
        let (parked, in_flight) = (&self.parked_ids, &self.in_flight);
        self.early.retain(|id| {
            scheduled.contains(id) || parked.contains_key(id) || in_flight.contains(id)
        });
    }

    /// `account`'s upstream answers again after it did not since `since`: the mail it deferred since then is
    /// due now, rather than at its next retry (hours away after a long outage). How many.
    fn wake_deferred(&mut self, account: &str, since: Instant) -> usize {
        let ids: HashSet<QueueId> = self
            .deferred
            .iter()
            .filter(|(_, (a, at))| a == account && *at >= since)
            .map(|(id, _)| *id)
            .collect();
        if ids.is_empty() {
            return 0;
        }
        self.deferred.retain(|id, _| !ids.contains(id));
        let now = SystemTime::now();
        let mut woken = 0;
        let due = std::mem::take(&mut self.due);
        self.due = due
            .into_iter()
            .map(|Reverse((at, id))| {
                if at > now && ids.contains(&id) {
                    woken += 1;
                    self.early.insert(id);
                    Reverse((now, id))
                } else {
                    Reverse((at, id))
                }
            })
            .collect();
        woken
    }

    /// A new delivery came with a reload: its pools may be numbered differently, so every parked message is due
    /// now, and waits again in its new pool if it must.
    fn replan(&mut self, waiting: Arc<Waiting>) {
        self.wake_all();
        self.waiting = waiting;
    }

    /// Every parked message is due now, and waits again if it must.
    fn wake_all(&mut self) {
        let now = SystemTime::now();
        let pools: Vec<usize> = self.parked.keys().copied().collect();
        for pool in pools {
            self.unpark(pool, usize::MAX, now);
        }
        // Nothing is left parked to hand a turn to (and after a reload the pools are numbered anew).
        self.unparked.clear();
        self.wakes.clear();
        self.needs.clear();
    }

    fn park(&mut self, pool: usize, id: QueueId) {
        if self.parked_ids.insert(id, pool).is_none() {
            self.parked.entry(pool).or_default().insert(id);
        }
        self.publish(pool);
    }

    /// The pool's first parked message, when a limit holds it, and how many recipients it needs room for.
    fn held_first(&self, pool: usize) -> Option<(QueueId, usize)> {
        match (
            self.needs.get(&pool),
            self.parked.get(&pool).and_then(BTreeSet::first),
        ) {
            (Some(&(id, n)), Some(first)) if id == *first => Some((id, n)),
            _ => None,
        }
    }

    /// `id` is no longer held by a limit in `pool` (woken, or parked for another reason).
    fn drop_need(&mut self, pool: usize, id: QueueId) {
        if self.needs.get(&pool).is_some_and(|&(held, _)| held == id) {
            self.needs.remove(&pool);
        }
    }

    /// An attempt of `id` ended as `attempted`: if it had been woken from a pool's parked list and took none of
    /// the pool's places, the next parked message of that pool is due now in its stead.
    fn pass_turn(&mut self, id: QueueId, attempted: &Attempted) {
        let Some(pool) = self.unparked.remove(&id) else {
            return;
        };
        if attempted.freed().is_none() && !matches!(attempted, Attempted::Waiting { .. }) {
            self.unpark(pool, 1, SystemTime::now());
        }
    }

    /// The `n` oldest of a pool's parked messages are due `now`.
    fn unpark(&mut self, pool: usize, n: usize, now: SystemTime) {
        let mut woken = Vec::new();
        if let Some(list) = self.parked.get_mut(&pool) {
            for _ in 0..n {
                let Some(id) = list.pop_first() else { break };
                woken.push(id);
            }
            if list.is_empty() {
                self.parked.remove(&pool);
            }
        }
        // Within the schedule's bound like any other due message (past it, the next reread finds it).
        for id in woken {
            self.drop_need(pool, id);
            self.parked_ids.remove(&id);
            if self.unparked.len() < MAX_SCHEDULED {
                self.unparked.insert(id, pool);
            } else {
                tracing::debug!(relay_queue_id = %id, "woken past the bound of those that hand their turn on; the pool's next wake takes the next one");
            }
            self.push(now, id);
        }
        self.publish(pool);
    }

    /// A parked message that came due another way (a reread of the queue) is no longer parked.
    fn forget_parked(&mut self, id: QueueId) {
        if let Some(pool) = self.parked_ids.remove(&id) {
            self.drop_need(pool, id);
            if let Some(list) = self.parked.get_mut(&pool) {
                list.remove(&id);
                if list.is_empty() {
                    self.parked.remove(&pool);
                }
            }
            self.publish(pool);
        }
    }

    fn publish(&self, pool: usize) {
        let oldest = self.parked.get(&pool).and_then(|l| l.first().copied());
        self.waiting.set(pool, oldest);
    }
}

/// The furthest ahead a recorded next attempt is believed when the queue is read: relay's own waits (a retry
/// step, a sending limit's window) are shorter, and a time beyond it (a clock stepped back, a state file edited
/// by hand) would keep a message from ever being tried or expiring, so such a message is due now. The attempt
/// believes longer configured retry steps up to their length.
pub(crate) const FURTHEST: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// Every queued message not in `skip`, due at its recorded next attempt (now, if none): the [`MAX_SCHEDULED`]
/// soonest, and whether some were left out. Reads file names and state files only.
fn load_schedule(queue: &std::path::Path, skip: &HashSet<QueueId>) -> std::io::Result<(Due, bool)> {
    // Nothing here grows with the directory: the state files' names are held up to a bound, messages are
    // looked at as they are listed.
    let states = layout::States::read(queue)?;
    // Keep the soonest MAX_SCHEDULED: a max-heap of that size, whose top is the latest kept.
    let mut kept: BinaryHeap<(SystemTime, QueueId)> = BinaryHeap::new();
    let mut overflow = false;
    let furthest = SystemTime::now() + FURTHEST;
    for file in layout::files(queue)? {
        let (id, kind) = file?;
        if kind != FileKind::Message || skip.contains(&id) {
            continue;
        }
        let at = if states.may_have(id) {
            read_state(queue, id)
                .next_attempt
                .unwrap_or(SystemTime::UNIX_EPOCH)
        } else {
            SystemTime::UNIX_EPOCH
        };
        kept.push((
            if at > furthest {
                SystemTime::UNIX_EPOCH
            } else {
                at
            },
            id,
        ));
        if kept.len() > MAX_SCHEDULED {
            kept.pop();
            overflow = true;
        }
    }
    Ok((kept.into_iter().map(Reverse).collect(), overflow))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A schedule full of later retries: new mail due now asks for a reread (which keeps the soonest), a later
    /// retry only marks the schedule incomplete.
    #[test]
    fn mail_due_now_with_the_schedule_full_asks_for_a_reread() {
        let mut s = Schedule::new(Arc::default());
        let later = SystemTime::now() + Duration::from_secs(3600);
        for _ in 0..MAX_SCHEDULED {
            s.push(later, QueueId::new());
        }
        assert!(!s.read_wanted());
        s.push(later, QueueId::new());
        assert!(s.overflow && !s.missed);
        assert!(!s.read_wanted(), "the schedule holds the soonest already");
        s.push(SystemTime::now(), QueueId::new());
        assert!(s.missed && s.read_wanted());
    }

    fn due_now(s: &Schedule) -> Vec<QueueId> {
        let now = SystemTime::now();
        let mut ids: Vec<QueueId> = s
            .due
            .iter()
            .filter(|Reverse((at, _))| *at <= now)
            .map(|Reverse((_, id))| *id)
            .collect();
        ids.sort();
        ids
    }

    /// A message found still arriving is looked at again at its recheck, or at once if its commit was announced
    /// while it was being looked at.
    #[test]
    fn a_message_announced_while_it_was_found_arriving_is_due_now() {
        let delivery = Delivery::new(&crate::config::Config::embedded_default(), Vec::new());
        let mut s = Schedule::new(Arc::default());
        let (announced, arriving) = (QueueId::new(), QueueId::new());
        s.in_flight.extend([announced, arriving]);
        s.rerun.insert(announced);
        let at = SystemTime::now() + Duration::from_secs(30);
        s.finished(announced, Attempted::Arriving { at }, &delivery);
        s.finished(arriving, Attempted::Arriving { at }, &delivery);
        assert_eq!(due_now(&s), vec![announced]);
        assert_eq!(s.due.len(), 2, "the other at its recheck");
    }

    /// An upstream's return makes due the mail its account deferred during the outage (not before it, not another
    /// account's), and a reread of the queue, which brings back the times recorded on disk, keeps that.
    #[test]
    fn mail_made_due_by_an_upstreams_return_stays_due_across_a_reread() {
        let mut s = Schedule::new(Arc::default());
        let later = SystemTime::now() + Duration::from_secs(3600);
        let t0 = Instant::now();
        let since = t0 + Duration::from_secs(1);
        let (during, before, other) = (QueueId::new(), QueueId::new(), QueueId::new());
        for id in [during, before, other] {
            s.push(later, id);
        }
        s.deferred
            .insert(during, ("office".into(), t0 + Duration::from_secs(2)));
        s.deferred.insert(before, ("office".into(), t0));
        s.deferred
            .insert(other, ("gmail".into(), t0 + Duration::from_secs(2)));
        assert_eq!(s.wake_deferred("office", since), 1);
        assert_eq!(due_now(&s), vec![during]);
        s.due = [during, before, other]
            .into_iter()
            .map(|id| Reverse((later, id)))
            .collect();
        s.after_reread();
        assert_eq!(due_now(&s), vec![during], "still early after a reread");
        // Gone from the queue meanwhile (delivered, deleted): forgotten.
        s.due = [other].into_iter().map(|id| Reverse((later, id))).collect();
        s.after_reread();
        assert!(s.early.is_empty());
        assert_eq!(s.deferred.keys().copied().collect::<Vec<_>>(), vec![other]);
    }

    /// A message woken from its pool whose attempt took no place (it expired, say) hands its turn to the next
    /// parked one, which is due at once; one that took a place, or was parked again, does not.
    #[test]
    fn a_woken_message_that_took_no_place_hands_its_turn_on() {
        let mut s = Schedule::new(Arc::default());
        let mut ids: Vec<QueueId> = (0..4).map(|_| QueueId::new()).collect();
        ids.sort();
        for &id in &ids {
            s.park(0, id);
        }
        s.unpark(0, 1, SystemTime::now());
        assert_eq!(due_now(&s), vec![ids[0]]);
        s.due.clear();
        s.pass_turn(ids[0], &Attempted::Done { account: None });
        assert_eq!(due_now(&s), vec![ids[1]], "expired: the next one's turn");
        s.due.clear();
        s.pass_turn(
            ids[1],
            &Attempted::Done {
                account: Some("office".into()),
            },
        );
        assert!(
            due_now(&s).is_empty(),
            "delivered: the place it freed wakes the next"
        );
        s.unpark(0, 1, SystemTime::now());
        s.due.clear();
        s.pass_turn(
            ids[2],
            &Attempted::Waiting {
                pool: 0,
                wait: Wait::Connection,
                recipients: 1,
            },
        );
        assert!(due_now(&s).is_empty(), "parked again: no turn to hand on");
        s.pass_turn(ids[3], &Attempted::Done { account: None });
        assert!(due_now(&s).is_empty(), "never woken: nothing to hand on");
        assert!(s.unparked.is_empty());
    }
}
