//! When each queued message is due: new messages from the spool at once, deferred ones at their recorded next
//! attempt, everything again when `relay queue retry` touches the trigger. Each attempt runs as its own task
//! (`delivery.rs`); this loop only decides when.
//!
//! Bounded by design: at most [`MAX_IN_FLIGHT`] attempts exist at a time (the rest wait here as an id and a
//! time, 32 bytes each), at most [`MAX_SCHEDULED`] of those wait in memory (beyond that the queue directory is
//! read again once the schedule has room), and on shutdown attempts in flight get [`DRAIN`] to finish; the rest
//! are stopped and their messages stay queued.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinSet;

use super::QueueId;
use super::delivery::{Account, Delivery};
use super::layout::{FileKind, parse_file_name};
use super::retry::{TRIGGER_CHECK, trigger_mtime};
use super::state::read_state;
use crate::config::Config;

/// Delivery attempts that exist at once, across accounts (each account further limits its own connections).
const MAX_IN_FLIGHT: usize = 64;
/// Messages the schedule holds in memory; a larger backlog is read from disk again as the schedule drains.
const MAX_SCHEDULED: usize = 100_000;
/// How long a shutdown waits for deliveries in flight.
pub const DRAIN: Duration = Duration::from_secs(20);

type Due = BinaryHeap<Reverse<(SystemTime, QueueId)>>;

pub struct Scheduler {
    /// Counts finished delivery attempts, so that tests (and status) can wait for one without polling.
    pub attempts: watch::Sender<u64>,
    delivery: Arc<Delivery>,
}

impl Scheduler {
    pub fn new(config: &Config, accounts: Vec<Arc<Account>>) -> Scheduler {
        Scheduler {
            attempts: watch::channel(0).0,
            delivery: Arc::new(Delivery::new(config, accounts)),
        }
    }

    /// Runs until `stop`: takes new messages from `committed`, and every queued one when it falls due.
    pub async fn run(
        self,
        mut committed: mpsc::UnboundedReceiver<QueueId>,
        mut stop: watch::Receiver<bool>,
    ) {
        if !self.delivery.has_accounts() {
            // Nothing to deliver through: mail stays queued, untouched, until an account is configured. The
            // announcements of new mail are refused rather than left to pile up unread.
            drop(committed);
            let _ = stop.wait_for(|s| *s).await;
            return;
        }
        let state_dir = self.delivery.paths().state_dir().to_path_buf();
        let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
        let mut tasks: JoinSet<Option<SystemTime>> = JoinSet::new();
        let mut running: HashMap<tokio::task::Id, QueueId> = HashMap::new();
        let mut in_flight: HashSet<QueueId> = HashSet::new();
        let mut trigger_seen = trigger_mtime(&state_dir);
        let mut due = Due::new();
        // Some when the schedule is incomplete: a reread is needed once it has room.
        let mut overflow = false;
        match self.load_schedule(&in_flight) {
            Ok((d, o)) => (due, overflow) = (d, o),
            Err(e) => tracing::error!(error = %e, "cannot read the queue; retrying shortly"),
        }
        let mut check = tokio::time::interval(TRIGGER_CHECK);
        loop {
            let now = SystemTime::now();
            while let Some(Reverse((at, id))) = due.peek().copied() {
                if at > now {
                    break;
                }
                let Ok(permit) = slots.clone().try_acquire_owned() else {
                    break;
                };
                due.pop();
                if in_flight.insert(id) {
                    let delivery = self.delivery.clone();
                    let handle = tasks.spawn(async move {
                        let next = delivery.attempt(id).await;
                        drop(permit);
                        next
                    });
                    running.insert(handle.id(), id);
                }
            }
            if overflow
                && due.len() < MAX_SCHEDULED / 2
                && let Ok((d, o)) = self.load_schedule(&in_flight)
            {
                (due, overflow) = (d, o);
                continue;
            }
            let waiting_for_slot = due.peek().is_some_and(|Reverse((at, _))| *at <= now);
            let sleep = match due.peek() {
                _ if waiting_for_slot => Duration::from_secs(3600),
                Some(Reverse((at, _))) => at.duration_since(now).unwrap_or_default(),
                None => Duration::from_secs(3600),
            };
            tokio::select! {
                Some(id) = committed.recv() => {
                    if due.len() < MAX_SCHEDULED {
                        due.push(Reverse((SystemTime::now(), id)));
                    } else {
                        overflow = true;
                    }
                }
                Some(joined) = tasks.join_next_with_id(), if !tasks.is_empty() => {
                    let (task, next) = match joined {
                        Ok((task, next)) => (task, next),
                        Err(e) => {
                            let task = e.id();
                            let next = running.get(&task).and_then(|id| {
                                tracing::error!(relay_queue_id = %id, error = %e, "delivery attempt failed unexpectedly; the message stays queued");
                                self.delivery.after_failure(*id, "delivery attempt failed unexpectedly")
                            });
                            (task, next)
                        }
                    };
                    if let Some(id) = running.remove(&task) {
                        in_flight.remove(&id);
                        if let Some(at) = next {
                            if due.len() < MAX_SCHEDULED {
                                due.push(Reverse((at, id)));
                            } else {
                                overflow = true;
                            }
                        }
                    }
                    self.attempts.send_modify(|n| *n += 1);
                }
                _ = tokio::time::sleep(sleep) => {}
                _ = check.tick() => {
                    let now_seen = trigger_mtime(&state_dir);
                    if now_seen != trigger_seen {
                        // Replaced only once the new schedule is read: a failed read keeps the old one.
                        match self.load_schedule(&in_flight) {
                            Ok((d, o)) => {
                                trigger_seen = now_seen;
                                (due, overflow) = (d, o);
                            }
                            Err(e) => tracing::error!(error = %e, "cannot reread the queue; keeping the current schedule"),
                        }
                    }
                }
                _ = stop.wait_for(|s| *s) => break,
            }
        }
        self.drain(tasks).await;
    }

    /// Lets attempts in flight finish within [`DRAIN`]; stops the rest, whose messages stay queued.
    async fn drain(&self, mut tasks: JoinSet<Option<SystemTime>>) {
        if tasks.is_empty() {
            return;
        }
        tracing::info!(deliveries = tasks.len(), "waiting for deliveries in flight");
        let finished = tokio::time::timeout(DRAIN, async {
            while tasks.join_next().await.is_some() {
                self.attempts.send_modify(|n| *n += 1);
            }
        })
        .await;
        if finished.is_err() {
            tracing::warn!(
                deliveries = tasks.len(),
                "deliveries still in flight after the drain timeout; their messages stay queued"
            );
            tasks.shutdown().await;
        }
    }

    /// Every queued message not in flight, due at its recorded next attempt (now, if none): the
    /// [`MAX_SCHEDULED`] soonest, and whether some were left out. Reads file names and state files only.
    fn load_schedule(&self, in_flight: &HashSet<QueueId>) -> std::io::Result<(Due, bool)> {
        let queue = &self.delivery.paths().queue;
        let mut messages = Vec::new();
        let mut with_state = HashSet::new();
        for entry in std::fs::read_dir(queue)? {
            match parse_file_name(&entry?.path()) {
                Some((id, FileKind::Message)) if !in_flight.contains(&id) => messages.push(id),
                Some((id, FileKind::State)) => {
                    with_state.insert(id);
                }
                _ => {}
            }
        }
        // Keep the soonest MAX_SCHEDULED: a max-heap of that size, whose top is the latest kept.
        let mut kept: BinaryHeap<(SystemTime, QueueId)> = BinaryHeap::new();
        let mut overflow = false;
        for id in messages {
            let at = if with_state.contains(&id) {
                read_state(queue, id)
                    .next_attempt
                    .unwrap_or(SystemTime::UNIX_EPOCH)
            } else {
                SystemTime::UNIX_EPOCH
            };
            kept.push((at, id));
            if kept.len() > MAX_SCHEDULED {
                kept.pop();
                overflow = true;
            }
        }
        Ok((kept.into_iter().map(Reverse).collect(), overflow))
    }
}
