//! Log lines a listener gives one kind of event (a refused connection, a failed TLS handshake) per minute: a
//! scan of the port or a flood would otherwise write one per connection, and journald's rate limit would then
//! drop relay's other lines. Beyond the budget, events are counted and the count said in one line.

use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime};

/// Events of one kind a listener logs one by one per minute.
const LOGGED_PER_MINUTE: u32 = 10;

/// What is being counted, as the summary lines say it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Counted {
    RefusedConnections,
    FailedHandshakes,
}

impl Counted {
    fn words(self) -> (&'static str, &'static str) {
        match self {
            Counted::RefusedConnections => ("rejected", "connections refused"),
            Counted::FailedHandshakes => ("tls_failed", "TLS handshakes failed"),
        }
    }
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
        if self.logged < LOGGED_PER_MINUTE {
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
        // A new minute: counted anew.
        assert!(b.take(t0 + Duration::from_secs(61), listener));
        assert_eq!(b.unlogged, 0);
    }
}
