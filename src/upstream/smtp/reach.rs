//! Whether an upstream answers connections, and what an attempt does when it did not a moment ago.
//!
//! Without this, every message makes its own connection: against an upstream that drops packets (a firewall,
//! a link down) each one waits the whole `smtp_timeout` holding one of the account's few connection slots, so
//! that a backlog of 1,000 on 4 slots spent about four hours per round of retries connecting, and each message
//! was one more connection to nowhere. Here, once a fresh connection got no answer (the TCP connect failed or
//! timed out, the TLS handshake or the greeting timed out, the server hung up before greeting), the upstream is
//! *down* until a connection is answered again:
//!
//! - for as long as that failed connection took (its *hold*: the whole timeout for a silent upstream, an
//!   instant for a refused connect), the account's other messages are not tried: each is deferred with the
//!   failure's words, as Postfix defers mail to a destination it cannot reach;
//! - after the hold, one connection at a time tries the upstream (the *probe*); attempts that come meanwhile wait
//!   for it, and then connect (answered) or are deferred with its failure (not answered).
//!
//! The hold scales with what the failure cost: a refused connect costs nothing to try again, so it holds
//! nothing back; a silent upstream is tried once per two timeouts instead of once per message. A connection
//! started before another was answered and failing after it says nothing about the upstream now, and is not
//! counted (a stale failure must not bring a hold right after the upstream came back).

use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::watch;

/// What an attempt does before it opens a fresh connection.
pub enum Before<'a> {
    /// Connect; say what came of it through the [`Try`].
    Connect(Try<'a>),
    /// Another connection is trying the upstream: wait for its end, then ask again.
    Wait(watch::Receiver<u64>),
    /// Not tried: a connection failed this moment ago. Why, in words for the log.
    Hold(String),
}

#[derive(Default)]
pub struct Reach {
    state: Mutex<State>,
    /// Counts the probes that ended, for those waiting on one.
    ended: watch::Sender<u64>,
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
    /// The first unanswered connection of this outage.
    since: Instant,
    /// The last one's end, how long it took, and why.
    failed_at: Instant,
    took: Duration,
    why: String,
}

/// One fresh connection's try; a probe's end lets those waiting on it go on, however the attempt ends.
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

    pub fn before(&self, now: Instant) -> Before<'_> {
        let mut s = self.state();
        let Some(down) = &s.down else {
            return Before::Connect(Try {
                reach: self,
                started: now,
                probe: false,
            });
        };
        let ago = now.saturating_duration_since(down.failed_at);
        if ago < down.took {
            return Before::Hold(format!(
                "{} (not tried: the account's last connection to the upstream got no answer {} ago)",
                down.why,
                humantime::format_duration(round(ago))
            ));
        }
        if s.probing {
            return Before::Wait(self.ended.subscribe());
        }
        s.probing = true;
        Before::Connect(Try {
            reach: self,
            started: now,
            probe: true,
        })
    }

    /// `relay queue retry`: the sysadmin says the upstream may answer now (a firewall opened), so the next
    /// attempt tries it (one at a time still) instead of being deferred by the hold. Whether one was held.
    pub fn lift(&self, now: Instant) -> bool {
        let mut s = self.state();
        let Some(down) = &mut s.down else {
            return false;
        };
        let held = now.saturating_duration_since(down.failed_at) < down.took;
        down.took = Duration::ZERO;
        held
    }

    /// A connection that does not count as the probe: for an attempt that waited too long for one.
    pub fn unguarded(&self, now: Instant) -> Try<'_> {
        Try {
            reach: self,
            started: now,
            probe: false,
        }
    }

    /// The moment a wait gives up on a probe that seems never to end (it cannot: each of its steps is bounded).
    pub fn wait_bound(timeout: Duration) -> Duration {
        timeout.saturating_mul(3) + Duration::from_secs(1)
    }
}

impl Try<'_> {
    /// The server answered (its greeting, whatever it said): the upstream is up.
    pub fn answered(self, now: Instant) -> Option<CameBack> {
        let mut s = self.reach.state();
        s.answered_at = Some(s.answered_at.map_or(now, |a| a.max(now)));
        s.down
            .take()
            .map(|d| CameBack(now.saturating_duration_since(d.since)))
    }

    /// No answer: `why`, after connecting from `self.started` until `now`.
    pub fn unanswered(self, now: Instant, why: &str) -> Option<WentDown> {
        let mut s = self.reach.state();
        if s.answered_at.is_some_and(|a| a > self.started) {
            return None;
        }
        let took = now.saturating_duration_since(self.started);
        match &mut s.down {
            Some(d) => {
                d.failed_at = now;
                d.took = took;
                d.why = why.to_string();
                None
            }
            None => {
                s.down = Some(Down {
                    since: now,
                    failed_at: now,
                    took,
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
            self.reach.ended.send_modify(|n| *n = n.wrapping_add(1));
        }
    }
}

/// To the second, for the log (above a second) or the millisecond.
fn round(d: Duration) -> Duration {
    if d >= Duration::from_secs(1) {
        Duration::from_secs(d.as_secs())
    } else {
        Duration::from_millis(d.as_millis() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connect(b: Before<'_>) -> Try<'_> {
        match b {
            Before::Connect(t) => t,
            Before::Wait(_) => panic!("waits"),
            Before::Hold(why) => panic!("held: {why}"),
        }
    }

    #[test]
    fn up_connects_freely_and_a_failure_holds_for_as_long_as_it_took() {
        let reach = Reach::default();
        let t0 = Instant::now();
        let a = connect(reach.before(t0));
        let b = connect(reach.before(t0));
        let failed = t0 + Duration::from_secs(60);
        assert!(a.unanswered(failed, "cannot connect: timed out").is_some());
        // A second failure of the same outage is not a new one.
        assert!(b.unanswered(failed, "cannot connect: timed out").is_none());
        match reach.before(failed + Duration::from_secs(59)) {
            Before::Hold(why) => assert!(
                why.starts_with("cannot connect: timed out (not tried") && why.contains("59s ago"),
                "{why}"
            ),
            _ => panic!("held"),
        }
        // After the hold: one probe, the others wait for it.
        let after = failed + Duration::from_secs(60);
        let probe = connect(reach.before(after));
        let Before::Wait(mut ended) = reach.before(after) else {
            panic!("waits for the probe")
        };
        assert!(probe.answered(after + Duration::from_millis(5)).is_some());
        assert!(ended.has_changed().unwrap());
        ended.mark_unchanged();
        // Up again: no probe, no wait.
        let x = connect(reach.before(after));
        let y = connect(reach.before(after));
        assert!(x.answered(after).is_none() && y.answered(after).is_none());
        assert!(!ended.has_changed().unwrap(), "only probes count");
    }

    #[test]
    fn a_refused_connect_holds_nothing_back_but_still_goes_one_at_a_time() {
        let reach = Reach::default();
        let t0 = Instant::now();
        let a = connect(reach.before(t0));
        assert!(a.unanswered(t0, "connection refused").is_some());
        let probe = connect(reach.before(t0 + Duration::from_millis(1)));
        assert!(matches!(reach.before(t0), Before::Wait(_)));
        drop(probe);
        // A probe ended without a word (its attempt stopped): the next one may go.
        let _again = connect(reach.before(t0 + Duration::from_millis(1)));
    }

    #[test]
    fn a_failure_of_a_connection_older_than_an_answer_is_not_an_outage() {
        let reach = Reach::default();
        let t0 = Instant::now();
        let old = connect(reach.before(t0));
        let fresh = connect(reach.before(t0 + Duration::from_secs(1)));
        assert!(fresh.answered(t0 + Duration::from_secs(2)).is_none());
        assert!(
            old.unanswered(t0 + Duration::from_secs(60), "timed out")
                .is_none()
        );
        let _ = connect(reach.before(t0 + Duration::from_secs(60)));
    }

    #[test]
    fn a_retry_lifts_the_hold_but_not_the_one_at_a_time() {
        let reach = Reach::default();
        let t0 = Instant::now();
        assert!(!reach.lift(t0), "nothing to lift");
        connect(reach.before(t0)).unanswered(t0 + Duration::from_secs(60), "timed out");
        let now = t0 + Duration::from_secs(61);
        assert!(matches!(reach.before(now), Before::Hold(_)));
        assert!(reach.lift(now));
        let _probe = connect(reach.before(now));
        assert!(matches!(reach.before(now), Before::Wait(_)));
    }

    #[test]
    fn coming_back_says_how_long_it_was_down() {
        let reach = Reach::default();
        let t0 = Instant::now();
        connect(reach.before(t0)).unanswered(t0 + Duration::from_secs(10), "timed out");
        let at = t0 + Duration::from_secs(20);
        connect(reach.before(at)).unanswered(at + Duration::from_secs(10), "timed out");
        let at = at + Duration::from_secs(25);
        let back = connect(reach.before(at)).answered(at).map(|b| b.0);
        assert_eq!(back, Some(Duration::from_secs(35)));
    }
}
