//! Log lines a listener gives one kind of event (a refused connection, a failed TLS handshake, a refused command,
//! an idle connection closed for a new one) per minute: a scan of the port or a flood would otherwise write one
//! per connection, and journald's rate limit would then drop relay's other lines. Beyond the budget, events are
//! counted and the count said in one line.

use std::net::SocketAddr;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

/// What is being counted, as the summary lines say it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Counted {
    RefusedConnections,
    FailedHandshakes,
    /// MAIL, RCPT and DATA refused, and messages refused after their data: more of them are logged, since a
    /// device whose mail never arrives is found by them.
    RefusedCommands,
    Evictions,
    /// accept() failing: out of descriptors (EMFILE) it fails again every time the loop tries, ten times a second.
    AcceptErrors,
}

impl Counted {
    fn words(self) -> (&'static str, &'static str) {
        match self {
            Counted::RefusedConnections => ("rejected", "connections refused"),
            Counted::FailedHandshakes => ("tls_failed", "TLS handshakes failed"),
            Counted::RefusedCommands => ("rejected", "commands refused"),
            Counted::Evictions => (
                "evicted",
                "idle connections closed to make room for new clients",
            ),
            Counted::AcceptErrors => ("accept_failed", "accepts failed"),
        }
    }

    /// Events of this kind a listener logs one by one per minute.
    fn per_minute(self) -> u32 {
        match self {
            Counted::RefusedCommands => 100,
            Counted::AcceptErrors => 1,
            _ => 10,
        }
    }
}

/// A listener's budgets for the events its sessions log (its refused connections have their own, in the accept
/// loop).
pub(crate) struct SessionBudgets {
    pub handshakes: Mutex<LogBudget>,
    pub commands: Mutex<LogBudget>,
    pub evictions: Mutex<LogBudget>,
}

impl SessionBudgets {
    pub(crate) fn new() -> SessionBudgets {
        let now = Instant::now();
        SessionBudgets {
            handshakes: Mutex::new(LogBudget::new(Counted::FailedHandshakes, now)),
            commands: Mutex::new(LogBudget::new(Counted::RefusedCommands, now)),
            evictions: Mutex::new(LogBudget::new(Counted::Evictions, now)),
        }
    }
}

/// Whether one more event of `budget`'s kind is logged now.
pub(crate) fn may_log(budget: &Mutex<LogBudget>, listener: SocketAddr) -> bool {
    budget
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take(Instant::now(), listener)
}

pub(crate) struct LogBudget {
    counted: Counted,
    minute_start: Instant,
    /// The same moment, as the log line says it.
    since: SystemTime,
    logged: u32,
    /// Events this minute beyond those logged.
    unlogged: u64,
}

impl LogBudget {
    pub(crate) fn new(counted: Counted, now: Instant) -> LogBudget {
        LogBudget {
            counted,
            minute_start: now,
            since: SystemTime::now(),
            logged: 0,
            unlogged: 0,
        }
    }

    /// Whether one more event is logged; once a minute has passed, says how many were not in the last one.
    pub(crate) fn take(&mut self, now: Instant, listener: SocketAddr) -> bool {
        let (event, what) = self.counted.words();
        if now.duration_since(self.minute_start) >= Duration::from_secs(60) {
            if self.unlogged > 0 {
                // Said with the next event: a scan that stopped leaves its count to the next one.
                tracing::warn!(relay_event = event, listener = %listener, count = self.unlogged, since = %humantime::format_rfc3339_seconds(self.since), "{what} and not logged one by one, in the minute from `since`");
            }
            *self = LogBudget::new(self.counted, now);
        }
        if self.logged < self.counted.per_minute() {
            self.logged += 1;
            return true;
        }
        if self.unlogged == 0 {
            tracing::warn!(listener = %listener, "more {what}; for the rest of the minute they are counted, not logged one by one");
        }
        self.unlogged += 1;
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ten_events_a_minute_are_logged_and_the_rest_counted() {
        let t0 = Instant::now();
        let listener: SocketAddr = "127.0.0.1:25".parse().unwrap();
        let mut b = LogBudget::new(Counted::RefusedConnections, t0);
        let logged = (0..50).filter(|_| b.take(t0, listener)).count();
        assert_eq!((logged, b.unlogged), (10, 40));
        let mut c = LogBudget::new(Counted::RefusedCommands, t0);
        let logged = (0..150).filter(|_| c.take(t0, listener)).count();
        assert_eq!(
            (logged, c.unlogged),
            (100, 50),
            "more refused commands are logged"
        );
        // A new minute: counted anew.
        assert!(b.take(t0 + Duration::from_secs(61), listener));
        assert_eq!(b.unlogged, 0);
    }
}
