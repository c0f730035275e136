//! Who holds a listener's connection slots, and shedding under pressure.
//!
//! A connection flood (idle connections, or ones that trickle a byte now and then) must not lock devices out
//! until its connections time out. Two mechanisms, after Postfix's stress mode:
//! - under pressure (three quarters of the slots taken) a session waiting for a command gets
//!   [`STRESS_TIMEOUT`] for the whole command instead of the configured `command_timeout`;
//! - when every slot is taken, a new connection evicts a session that is waiting for a command without having
//!   logged in, chosen from the client address holding the most connections, longest idle first. Sessions in
//!   the middle of a message, or logged in, are never evicted.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};

/// The whole-command timeout for idle sessions while the listener is under pressure.
pub const STRESS_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) struct Occupancy {
    max: AtomicUsize,
    sessions: Mutex<HashMap<u64, Arc<Tracked>>>,
    next_id: AtomicU64,
    stress: watch::Sender<bool>,
    /// Sessions asked to leave that have not yet: their places are on their way back.
    leaving: AtomicUsize,
}

/// One session as the listener sees it.
pub(crate) struct Tracked {
    ip: IpAddr,
    /// Since when the session waits for a command without being logged in; None while it is busy (receiving a
    /// message, logged in, or working on a command).
    idle_since: Mutex<Option<Instant>>,
    kick: Notify,
    /// Set when the session is chosen for eviction; cleared when it turns busy first, so that a wake-up stored
    /// in `kick` from then on is ignored.
    kicked: std::sync::atomic::AtomicBool,
    /// Counted in [`Occupancy::leaving`]; cleared (and the count lowered) once when it leaves or turns busy first.
    leaving: std::sync::atomic::AtomicBool,
}

/// A session's registration; dropping it (however the session ends, panics included) frees its place.
pub(crate) struct Seat {
    occupancy: Arc<Occupancy>,
    id: u64,
    tracked: Arc<Tracked>,
}

impl Occupancy {
    pub fn new(max: usize) -> Arc<Occupancy> {
        Arc::new(Occupancy {
            max: AtomicUsize::new(max),
            sessions: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            stress: watch::channel(false).0,
            leaving: AtomicUsize::new(0),
        })
    }

    pub fn seat(self: &Arc<Self>, ip: IpAddr) -> Seat {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let tracked = Arc::new(Tracked {
            ip,
            idle_since: Mutex::new(None),
            kick: Notify::new(),
            kicked: std::sync::atomic::AtomicBool::new(false),
            leaving: std::sync::atomic::AtomicBool::new(false),
        });
        if let Ok(mut m) = self.sessions.lock() {
            m.insert(id, tracked.clone());
            self.update_stress(m.len());
        }
        Seat {
            occupancy: self.clone(),
            id,
            tracked,
        }
    }

    fn update_stress(&self, live: usize) {
        let stressed = live * 4 >= self.max.load(Ordering::Relaxed) * 3;
        self.stress
            .send_if_modified(|s| std::mem::replace(s, stressed) != stressed);
    }

    pub fn stress(&self) -> watch::Receiver<bool> {
        self.stress.subscribe()
    }

    /// A reload changed `max_connections`: pressure is measured against the new size.
    pub fn resize(&self, max: usize) {
        self.max.store(max, Ordering::Relaxed);
        if let Ok(m) = self.sessions.lock() {
            self.update_stress(m.len());
        }
    }

    /// Makes room for the new clients waiting for a place (`waiting`, the caller's included). A place given back
    /// goes first to the `owed` ones a reload's shrink withdraws, then to a waiting client; the sessions already
    /// asked to leave give theirs. The rest are asked of idle, logged-out sessions, from the address holding the
    /// most connections, longest idle first; all of them or none: too few, and hanging up on devices would admit
    /// nobody. False then.
    pub fn make_room(&self, owed: usize, waiting: usize) -> bool {
        let need = (owed + waiting).saturating_sub(self.leaving.load(Ordering::SeqCst));
        if need == 0 {
            return true;
        }
        let Ok(m) = self.sessions.lock() else {
            return false;
        };
        let mut per_ip: HashMap<IpAddr, usize> = HashMap::new();
        for t in m.values() {
            *per_ip.entry(t.ip).or_default() += 1;
        }
        let mut idle: Vec<(usize, Instant, &Arc<Tracked>)> = m
            .values()
            .filter_map(|t| {
                let since = (*t.idle_since.lock().ok()?)?;
                Some((per_ip.get(&t.ip).copied().unwrap_or(0), since, t))
            })
            .collect();
        if idle.len() < need {
            return false;
        }
        idle.sort_by_key(|&(n, since, _)| (Reverse(n), since));
        // Chosen under each session's own lock, which `set_idle` takes too, all held until the choice is made: one
        // that turned busy meanwhile is passed over, and with too few left nothing changes. (Only this function
        // holds more than one of these locks, and only under `sessions`.)
        let mut chosen = Vec::with_capacity(need);
        for (_, _, t) in idle {
            if chosen.len() == need {
                break;
            }
            if let Ok(since) = t.idle_since.lock()
                && since.is_some()
            {
                chosen.push((since, t));
            }
        }
        if chosen.len() < need {
            return false;
        }
        for (mut since, t) in chosen {
            *since = None;
            t.kicked.store(true, Ordering::SeqCst);
            if !t.leaving.swap(true, Ordering::SeqCst) {
                self.leaving.fetch_add(1, Ordering::SeqCst);
            }
            t.kick.notify_one();
        }
        true
    }

    /// A session asked to leave has left, or turned busy first and stays.
    fn left(&self, t: &Tracked) {
        if t.leaving.swap(false, Ordering::SeqCst) {
            self.leaving.fetch_sub(1, Ordering::SeqCst);
        }
    }

    #[cfg(test)]
    fn evictable(&self) -> usize {
        let Ok(m) = self.sessions.lock() else {
            return 0;
        };
        m.values()
            .filter(|t| t.idle_since.lock().is_ok_and(|since| since.is_some()))
            .count()
    }
}

use std::cmp::Reverse;

impl Seat {
    /// Marks the session as waiting for a command (and not logged in): it may be evicted. Busy otherwise.
    pub fn set_idle(&self, idle: bool) {
        if let Ok(mut s) = self.tracked.idle_since.lock() {
            match (idle, s.is_some()) {
                (true, false) => *s = Some(Instant::now()),
                (false, _) => {
                    *s = None;
                    self.tracked.kicked.store(false, Ordering::SeqCst);
                    self.occupancy.left(&self.tracked);
                }
                _ => {}
            }
        }
    }

    /// Completes when the listener wants this session gone. A wake-up left over from a choice the session
    /// outran (it turned busy first) is passed over.
    pub async fn evicted(&self) {
        loop {
            self.tracked.kick.notified().await;
            if self.tracked.kicked.swap(false, Ordering::SeqCst) {
                return;
            }
        }
    }

    pub fn stress(&self) -> watch::Receiver<bool> {
        self.occupancy.stress()
    }
}

impl Drop for Seat {
    fn drop(&mut self) {
        self.occupancy.left(&self.tracked);
        if let Ok(mut m) = self.occupancy.sessions.lock() {
            m.remove(&self.id);
            self.occupancy.update_stress(m.len());
        }
    }
}

/// A listener's connection places (`max_connections`), which a reload may resize while sessions hold places:
/// the sessions already open count against the new size. Shrunk below what is held, the places still owed are
/// withdrawn as sessions end, before any new client gets one; grown, what is owed is forgiven first.
pub(crate) struct Slots {
    places: Arc<Semaphore>,
    size: Mutex<usize>,
    owed: Arc<AtomicUsize>,
}

/// A session's place; given back (or withdrawn, if the listener shrank) when dropped.
pub(crate) struct Slot {
    permit: Option<OwnedSemaphorePermit>,
    owed: Arc<AtomicUsize>,
}

impl Slots {
    pub fn new(size: usize) -> Arc<Slots> {
        Arc::new(Slots {
            places: Arc::new(Semaphore::new(size)),
            size: Mutex::new(size),
            owed: Arc::default(),
        })
    }

    /// A free place, now or never.
    pub fn try_take(&self) -> Option<Slot> {
        let permit = self.places.clone().try_acquire_owned().ok()?;
        Some(self.slot(permit))
    }

    /// The next place given back.
    pub async fn take(&self) -> Option<Slot> {
        let permit = self.places.clone().acquire_owned().await.ok()?;
        Some(self.slot(permit))
    }

    fn slot(&self, permit: OwnedSemaphorePermit) -> Slot {
        Slot {
            permit: Some(permit),
            owed: self.owed.clone(),
        }
    }

    /// Places still owed after a shrink: the first ones given back are withdrawn, not passed on.
    pub fn owed(&self) -> usize {
        self.owed.load(Ordering::SeqCst)
    }

    pub fn resize(&self, new: usize) {
        let Ok(mut size) = self.size.lock() else {
            return;
        };
        if new > *size {
            let more = new - *size;
            let owed = self
                .owed
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                    Some(n - n.min(more))
                })
                .unwrap_or(0);
            self.places.add_permits(more - owed.min(more));
        } else {
            let fewer = *size - new;
            let withdrawn = self.places.forget_permits(fewer);
            self.owed.fetch_add(fewer - withdrawn, Ordering::SeqCst);
        }
        *size = new;
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let Some(permit) = self.permit.take() else {
            return;
        };
        let repaid = self
            .owed
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if repaid {
            permit.forget();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn evicted(seat: &Seat) -> bool {
        seat.tracked.kicked.load(Ordering::SeqCst)
    }

    #[test]
    fn evicts_from_the_address_holding_most_and_never_a_busy_session() {
        let occ = Occupancy::new(5);
        let flood: IpAddr = "10.0.0.1".parse().unwrap();
        let device: IpAddr = "10.0.0.2".parse().unwrap();
        let a = occ.seat(flood);
        let b = occ.seat(flood);
        let d = occ.seat(device);
        assert!(!*occ.stress().borrow());
        let busy = occ.seat(flood);
        assert!(*occ.stress().borrow());
        d.set_idle(true);
        a.set_idle(true);
        b.set_idle(true);
        busy.set_idle(false);
        assert!(occ.make_room(0, 1));
        assert!(evicted(&a) && !evicted(&b));
        // Its place is on its way: the next one waiting needs another.
        assert!(occ.make_room(0, 1), "the one leaving is enough for one");
        assert!(!evicted(&b));
        assert!(occ.make_room(0, 2));
        assert!(evicted(&b));
        drop((a, b));
        // Left: the device (idle, one connection) and the busy flood session.
        assert!(occ.make_room(0, 1));
        assert!(evicted(&d));
        drop(d);
        assert!(!occ.make_room(0, 1));
        drop(busy);
        assert!(occ.sessions.lock().unwrap().is_empty());
        assert!(!*occ.stress().borrow());
        assert_eq!(occ.leaving.load(Ordering::SeqCst), 0);
    }

    /// With places owed after a shrink, room for a newcomer means evicting one more session than are owed; with
    /// fewer idle sessions than that, none is evicted. A session that turns busy before it leaves stays, and
    /// is no longer counted as leaving.
    #[test]
    fn making_room_pays_what_is_owed_first() {
        let occ = Occupancy::new(2);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let seats: Vec<Seat> = (0..3).map(|_| occ.seat(ip)).collect();
        seats[0].set_idle(true);
        seats[1].set_idle(true);
        assert!(!occ.make_room(2, 1), "2 idle, 3 needed");
        assert_eq!(occ.evictable(), 2, "nobody evicted for nothing");
        assert!(occ.make_room(1, 1));
        assert_eq!(occ.evictable(), 0);
        assert_eq!(occ.leaving.load(Ordering::SeqCst), 2);
        // A second newcomer while they leave: one more is needed, and none is idle.
        assert!(!occ.make_room(1, 2));
        seats[2].set_idle(true);
        assert!(occ.make_room(1, 2));
        seats[0].set_idle(false);
        assert_eq!(
            occ.leaving.load(Ordering::SeqCst),
            2,
            "one turned busy and stays"
        );
        drop(seats);
        assert_eq!(occ.leaving.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn sessions_open_count_against_a_new_size() {
        let slots = Slots::new(3);
        let held: Vec<Slot> = (0..3).map(|_| slots.try_take().unwrap()).collect();
        slots.resize(2);
        let mut held = held.into_iter();
        drop(held.next());
        assert!(slots.try_take().is_none(), "2 open, 2 allowed");
        drop(held.next());
        let again = slots.try_take().expect("1 open, 2 allowed");
        assert!(slots.try_take().is_none());
        // Grown while a place is owed: the debt is forgiven first.
        let third = held.next().unwrap();
        slots.resize(1);
        slots.resize(3);
        assert!(slots.try_take().is_some_and(|s| {
            drop(s);
            true
        }));
        let fourth = slots.try_take().expect("2 open, 3 allowed");
        assert!(slots.try_take().is_none());
        drop((again, third, fourth));
        let all: Vec<Slot> = (0..3).map(|_| slots.try_take().unwrap()).collect();
        assert!(
            slots.try_take().is_none(),
            "3 in all, whatever happened before"
        );
        drop(all);
    }
}
