//! Whether relay's long-running loops are still making progress, for systemd's watchdog.
//!
//! A timer that pings the watchdog proves only that the runtime has a free thread. Instead, each loop that must
//! keep turning (every listener's accept loop, the delivery scheduler) has a [`Heartbeat`] that it beats from a
//! tick of its own `select!`, so that a loop stuck anywhere (a lock, a blocking call, a future that never
//! completes) stops beating; the watchdog task (`service.rs`) pings only while every heartbeat is fresh.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How often a loop beats when nothing asks for faster (no watchdog, or a slow one).
pub const DEFAULT_BEAT: Duration = Duration::from_secs(1);

/// The heartbeats of the loops that must keep turning.
pub struct Health {
    epoch: Instant,
    /// The beat period in milliseconds: set once, before the loops start.
    every_ms: AtomicU64,
    beats: Mutex<Vec<Arc<Heartbeat>>>,
}

/// One loop's heartbeat.
pub struct Heartbeat {
    name: String,
    epoch: Instant,
    /// Milliseconds since `epoch` at the last beat.
    last: AtomicU64,
    /// The loop ended on purpose (shutdown, a listener closed by a reload): no longer expected to beat.
    retired: AtomicBool,
}

impl Health {
    pub fn new() -> Arc<Health> {
        Arc::new(Health {
            epoch: Instant::now(),
            every_ms: AtomicU64::new(DEFAULT_BEAT.as_millis() as u64),
            beats: Mutex::new(Vec::new()),
        })
    }

    /// Loops beat at least this often; the watchdog sets it to a fraction of its interval, so that a healthy loop
    /// is never taken for a stuck one. Read by each loop when it starts.
    pub fn set_every(&self, every: Duration) {
        let ms = every.as_millis().clamp(10, DEFAULT_BEAT.as_millis()) as u64;
        self.every_ms.store(ms, Ordering::Relaxed);
    }

    pub fn every(&self) -> Duration {
        Duration::from_millis(self.every_ms.load(Ordering::Relaxed))
    }

    /// The ticker a loop beats from. A late tick is not made up for in a burst: one beat says as much as ten.
    pub fn ticker(&self) -> tokio::time::Interval {
        let mut tick = tokio::time::interval(self.every());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick
    }

    /// A new heartbeat, fresh now, that the watchdog watches until it is retired.
    pub fn register(&self, name: impl Into<String>) -> Arc<Heartbeat> {
        let beat = Arc::new(Heartbeat {
            name: name.into(),
            epoch: self.epoch,
            last: AtomicU64::new(0),
            retired: AtomicBool::new(false),
        });
        beat.beat();
        if let Ok(mut beats) = self.beats.lock() {
            beats.retain(|b| !b.retired.load(Ordering::Relaxed));
            beats.push(beat.clone());
        }
        beat
    }

    /// The loops that have not beaten within `within`, with how long they have been silent.
    pub fn stalled(&self, within: Duration) -> Vec<(String, Duration)> {
        let now = self.epoch.elapsed();
        let Ok(beats) = self.beats.lock() else {
            // A panic while registering: nothing can be vouched for.
            return vec![("heartbeat registry".into(), Duration::ZERO)];
        };
        beats
            .iter()
            .filter(|b| !b.retired.load(Ordering::Relaxed))
            .filter_map(|b| {
                let silent =
                    now.saturating_sub(Duration::from_millis(b.last.load(Ordering::Relaxed)));
                (silent > within).then(|| (b.name.clone(), silent))
            })
            .collect()
    }
}

impl Heartbeat {
    pub fn beat(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.last.store(ms, Ordering::Relaxed);
    }

    /// The loop has ended on purpose. A loop that ends by panicking never retires, and so stops the watchdog.
    pub fn retire(&self) {
        self.retired.store(true, Ordering::Relaxed);
    }
}

/// Test hook, compiled into debug builds only (release builds ignore it): while the file named by the environment
/// variable `RELAY_TEST_WEDGE_<LOOP>` exists, the loop that calls this stops turning, as a stuck loop would, so
/// that a test can see the watchdog pings stop. Not part of relay's interface.
pub async fn test_wedge(loop_name: &str) {
    #[cfg(debug_assertions)]
    {
        let var = format!("RELAY_TEST_WEDGE_{}", loop_name.to_ascii_uppercase());
        if let Some(path) = std::env::var_os(var) {
            let path = std::path::PathBuf::from(path);
            if path.exists() {
                tracing::warn!(loop_name, "wedged by the test hook");
                while path.exists() {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }
    #[cfg(not(debug_assertions))]
    let _ = loop_name;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_silent_loop_is_named_until_it_retires() {
        let health = Health::new();
        let scheduler = health.register("scheduler");
        let listener = health.register("listener");
        assert!(health.stalled(Duration::from_secs(60)).is_empty());
        std::thread::sleep(Duration::from_millis(30));
        listener.beat();
        let stalled = health.stalled(Duration::from_millis(20));
        assert_eq!(
            stalled.len(),
            1,
            "{:?}",
            stalled.iter().map(|s| &s.0).collect::<Vec<_>>()
        );
        assert_eq!(stalled[0].0, "scheduler");
        scheduler.retire();
        assert!(health.stalled(Duration::from_millis(20)).is_empty());
    }
}
