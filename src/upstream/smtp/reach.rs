//! Whether an upstream can be reached, and what an attempt does when it could not a moment ago.
//!
//! Without this, every message made its own connection: against an upstream that drops packets (a firewall,
//! a link down) each one waited the whole `smtp_timeout` holding one of the account's few connection slots, so
//! that a backlog of 1,000 on 4 slots spent about four hours per round of retries connecting, and each message
//! was one more connection to nowhere. Here, once a fresh connection got no answer (the TCP connect failed or
//! timed out, the TLS handshake or the greeting timed out, the server hung up before greeting), the upstream is
//! *down* until a connection is answered again:
//!
//! - for as long as that failed try took, up to the timeout (its *hold*), the account's mail is not tried: it
//!   waits, parked by the scheduler until the hold ends (not an attempt, no retry step used up, no line per
//!   message), while another account of its route may take it;
//! - then one connection at a time tries the upstream (the *probe*); the account's other mail waits for its end.
//!   A probe that is not answered either is not its message's attempt: the message waits with the others (the
//!   outage was said once when it began), so that a long outage is not one `deferred` line every few seconds.
//!
//! The hold scales with what a try costs, from [`MIN_HOLD`]: a silent upstream is tried about once per two
//! timeouts instead of once per message. A refused connect costs nothing to try again: without the floor, a
//! backlog against a closed port was tried one message after another, a hundred times a second. The floor is short because some failures are not an outage
//! (a server that caps connections with a reset before its greeting, no descriptor free here): for those, the
//! account's mail stops and goes again every couple of seconds. A connection started
//! before another was answered and failing after it says nothing about the upstream now, and is not counted (a
//! stale failure must not bring a hold right after the upstream came back).

use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The shortest hold after a connection got no answer (unless the timeout is shorter).
const MIN_HOLD: Duration = Duration::from_secs(2);

/// Where an upstream stands, for the delivery choosing an account and for an attempt about to connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reachability {
    /// Connect freely.
    Up,
    /// Down, and its hold lasts until then: no connection before.
    Held(Instant),
    /// Down, and a probe is connecting: no other connection until it ends.
    Probing,
    /// Down, the hold over, no probe: the next connection is the probe.
    Probe,
}

/// What an attempt does before it opens a fresh connection.
pub enum Before<'a> {
    /// Connect; say what came of it through the [`Try`].
    Connect(Try<'a>),
    /// Not now (held, or another connection is the probe): why, in words for the log, and until when.
    NotNow(String, Reachability),
}

#[derive(Default)]
pub struct Reach {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    down: Option<Down>,
    /// A probe is connecting.
    probing: bool,
    /// When a connection was last answered.
    answered_at: Option<Instant>,
}

struct Down {
    /// When the first unanswered connection of this outage began.
    since: Instant,
    /// Until when no connection is tried, and why the last one failed.
    held_until: Instant,
    why: String,
}

/// One fresh connection's try; a probe's end lets the next one go, however its attempt ends.
pub struct Try<'a> {
    reach: &'a Reach,
    started: Instant,
    probe: bool,
}

/// A new outage: to be said once, with its words.
pub struct WentDown(pub String);

/// The upstream answers again after this long down.
pub struct CameBack(pub Duration);

impl Reach {
    fn state(&self) -> MutexGuard<'_, State> {
        // Nothing here panics while holding the lock; a poisoned one still holds a consistent state.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn now(&self, now: Instant) -> Reachability {
        let s = self.state();
        match &s.down {
            None => Reachability::Up,
            Some(d) if now < d.held_until => Reachability::Held(d.held_until),
            Some(_) if s.probing => Reachability::Probing,
            Some(_) => Reachability::Probe,
        }
    }

    pub fn before(&self, now: Instant) -> Before<'_> {
        let mut s = self.state();
        let Some(down) = &s.down else {
            return Before::Connect(Try {
                reach: self,
                started: now,
                probe: false,
            });
        };
        if now < down.held_until {
            return Before::NotNow(down.why.clone(), Reachability::Held(down.held_until));
        }
        if s.probing {
            return Before::NotNow(down.why.clone(), Reachability::Probing);
        }
        s.probing = true;
        Before::Connect(Try {
            reach: self,
            started: now,
            probe: true,
        })
    }

    /// While the upstream is down: for how long so far, and why its last connection failed.
    pub fn outage(&self, now: Instant) -> Option<(Duration, String)> {
        let s = self.state();
        s.down
            .as_ref()
            .map(|d| (now.saturating_duration_since(d.since), d.why.clone()))
    }

    /// `relay queue retry`: the sysadmin says the upstream may answer now (a firewall opened), so the next
    /// attempt tries it (one at a time still) instead of waiting for the hold's end. Whether one was held.
    pub fn lift(&self, now: Instant) -> bool {
        let mut s = self.state();
        let Some(down) = &mut s.down else {
            return false;
        };
        let held = now < down.held_until;
        down.held_until = down.held_until.min(now);
        held
    }
}

impl Try<'_> {
    /// This connection is the one try of an upstream that was down (see [`Reachability::Probe`]).
    pub fn is_probe(&self) -> bool {
        self.probe
    }

    /// The server answered (its greeting, whatever it said): the upstream is up.
    pub fn answered(self, now: Instant) -> Option<CameBack> {
        let mut s = self.reach.state();
        s.answered_at = Some(s.answered_at.map_or(now, |a| a.max(now)));
        s.down
            .take()
            .map(|d| CameBack(now.saturating_duration_since(d.since)))
    }

    /// No answer: `why`, after connecting from `self.started` until `now`; a hold as long as that took, up to
    /// `limit` (the timeout of one step: a try that spent a timeout connecting and another on the greeting holds
    /// no longer than one).
    pub fn unanswered(self, now: Instant, limit: Duration, why: &str) -> Option<WentDown> {
        let mut s = self.reach.state();
        if s.answered_at.is_some_and(|a| a > self.started) {
            return None;
        }
        let took = now.saturating_duration_since(self.started);
        let held_until = now + took.max(MIN_HOLD).min(limit);
        match &mut s.down {
            Some(d) => {
                d.held_until = d.held_until.max(held_until);
                d.why = why.to_string();
                None
            }
            None => {
                s.down = Some(Down {
                    since: self.started,
                    held_until,
                    why: why.to_string(),
                });
                Some(WentDown(why.to_string()))
            }
        }
    }
}

impl Drop for Try<'_> {
    fn drop(&mut self) {
        if self.probe {
            self.reach.state().probing = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(60);

    fn connect(b: Before<'_>) -> Try<'_> {
        match b {
            Before::Connect(t) => t,
            Before::NotNow(why, r) => panic!("not now ({r:?}): {why}"),
        }
    }

    #[test]
    fn up_connects_freely_and_a_failure_holds_for_as_long_as_it_took() {
        let reach = Reach::default();
        let t0 = Instant::now();
        let a = connect(reach.before(t0));
        let b = connect(reach.before(t0));
        let failed = t0 + T;
        assert!(
            a.unanswered(failed, T, "cannot connect: timed out")
                .is_some()
        );
        // A second failure of the same outage is not a new one.
        assert!(
            b.unanswered(failed, T, "cannot connect: timed out")
                .is_none()
        );
        let held = reach.now(failed + Duration::from_secs(59));
        assert_eq!(held, Reachability::Held(failed + T));
        match reach.before(failed + Duration::from_secs(59)) {
            Before::NotNow(why, r) => {
                assert_eq!(r, held);
                assert_eq!(why, "cannot connect: timed out");
            }
            Before::Connect(_) => panic!("held"),
        }
        // After the hold: one probe, the others wait for it.
        let after = failed + T;
        assert_eq!(reach.now(after), Reachability::Probe);
        let probe = connect(reach.before(after));
        assert_eq!(reach.now(after), Reachability::Probing);
        assert!(matches!(
            reach.before(after),
            Before::NotNow(_, Reachability::Probing)
        ));
        assert!(probe.answered(after + Duration::from_millis(5)).is_some());
        // Up again: no probe, no wait.
        assert_eq!(reach.now(after), Reachability::Up);
        let x = connect(reach.before(after));
        let y = connect(reach.before(after));
        assert!(x.answered(after).is_none() && y.answered(after).is_none());
    }

    #[test]
    fn a_hold_is_never_longer_than_one_timeout() {
        let reach = Reach::default();
        let t0 = Instant::now();
        let a = connect(reach.before(t0));
        // A connect just under the timeout, then a greeting that never came.
        let failed = t0 + 2 * T;
        a.unanswered(failed, T, "no greeting");
        assert_eq!(reach.now(failed), Reachability::Held(failed + T));
    }

    #[test]
    fn a_refused_connect_holds_for_a_few_seconds_then_goes_one_at_a_time() {
        let reach = Reach::default();
        let t0 = Instant::now();
        let a = connect(reach.before(t0));
        assert!(a.unanswered(t0, T, "connection refused").is_some());
        assert_eq!(reach.now(t0), Reachability::Held(t0 + MIN_HOLD));
        let after = t0 + MIN_HOLD;
        let probe = connect(reach.before(after));
        assert_eq!(reach.now(after), Reachability::Probing);
        drop(probe);
        // A probe ended without a word (its attempt stopped): the next one may go.
        assert_eq!(reach.now(after), Reachability::Probe);
        let _again = connect(reach.before(after));
        // A timeout shorter than the floor bounds it.
        let short = Reach::default();
        let b = connect(short.before(t0));
        b.unanswered(t0, Duration::from_secs(1), "connection refused");
        assert_eq!(
            short.now(t0),
            Reachability::Held(t0 + Duration::from_secs(1))
        );
    }

    #[test]
    fn a_failure_of_a_connection_older_than_an_answer_is_not_an_outage() {
        let reach = Reach::default();
        let t0 = Instant::now();
        let old = connect(reach.before(t0));
        let fresh = connect(reach.before(t0 + Duration::from_secs(1)));
        assert!(fresh.answered(t0 + Duration::from_secs(2)).is_none());
        assert!(old.unanswered(t0 + T, T, "timed out").is_none());
        assert_eq!(reach.now(t0 + T), Reachability::Up);
    }

    #[test]
    fn a_retry_lifts_the_hold_but_not_the_one_at_a_time() {
        let reach = Reach::default();
        let t0 = Instant::now();
        assert!(!reach.lift(t0), "nothing to lift");
        connect(reach.before(t0)).unanswered(t0 + T, T, "timed out");
        let now = t0 + T + Duration::from_secs(1);
        assert!(matches!(reach.now(now), Reachability::Held(_)));
        assert!(reach.lift(now));
        let _probe = connect(reach.before(now));
        assert_eq!(reach.now(now), Reachability::Probing);
    }

    #[test]
    fn coming_back_says_how_long_it_was_down() {
        let reach = Reach::default();
        let t0 = Instant::now();
        connect(reach.before(t0)).unanswered(t0 + Duration::from_secs(10), T, "timed out");
        let at = t0 + Duration::from_secs(20);
        connect(reach.before(at)).unanswered(at + Duration::from_secs(10), T, "timed out");
        let at = at + Duration::from_secs(25);
        let back = connect(reach.before(at)).answered(at).map(|b| b.0);
        assert_eq!(back, Some(Duration::from_secs(45)));
    }
}
