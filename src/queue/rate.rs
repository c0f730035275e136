//! Provider sending limits: how many messages an account has sent in the last minute and how many recipients in
//! the last 24 hours, whether a message may go now, and when one that may not could.
//!
//! Counts live in sliding windows of buckets (seconds for the minute, minutes for the day), so their size is fixed
//! whatever the traffic: at most 61 and 1,441 buckets. A count stays in its window until the bucket after the
//! window's end, so relay's window always covers the provider's (it is up to one bucket longer, never shorter).
//!
//! A message is counted from the moment its attempt takes a place (in flight) until it is done; then it is
//! counted at the time it finished, when the upstream has seen it. So whatever the upstream's latency, no window
//! of the provider's holds more than the limit. Every attempt that went to the upstream counts as a message; only
//! accepted messages count their recipients (an outage must not use up the day). An attempt whose outcome is
//! unknown (stopped in the middle) counts in full.
//!
//! The counts of an account with limits are written to `STATE_DIR/rate/ACCOUNT.json` (atomically, fsynced)
//! before each message goes out and after it is done, because the provider keeps counting across a restart. An
//! account without limits writes the same file every couple of seconds, as a report. A file that cannot be read is
//! taken as the worst case: every limit reached when it was last written.

use super::lock;
use std::collections::VecDeque;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::config::RateConfig;
use crate::queue::pause::ProviderPause;

/// The per-minute window: one-second buckets over 60 seconds.
const MINUTE: (u64, u64) = (1, 60);
/// The daily window: one-minute buckets over 24 hours.
const DAY: (u64, u64) = (60, 1440);
/// Largest counters file read; a full one is about 30 KiB.
const MAX_FILE: u64 = 256 * 1024;
const VERSION: u32 = 1;

/// Where an account's counters are kept.
pub fn rate_path(state_dir: &Path, account: &str) -> PathBuf {
    state_dir.join("rate").join(format!("{account}.json"))
}

fn epoch_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Counts in buckets of `width` seconds, kept while they are within `span` buckets of the present.
#[derive(Debug, Clone)]
struct Window {
    width: u64,
    span: u64,
    /// Ascending bucket numbers, non-zero counts; at most `span + 1` of them.
    buckets: VecDeque<(u64, u64)>,
}

impl Window {
    fn new((width, span): (u64, u64)) -> Window {
        Window {
            width,
            span,
            buckets: VecDeque::new(),
        }
    }

    fn bucket(&self, t: SystemTime) -> u64 {
        epoch_secs(t) / self.width
    }

    /// Drops what has left the window. Buckets ahead of `now` (the clock went back) are moved to `now`, so they
    /// still count for a whole window, and the window keeps its size.
    fn prune(&mut self, now: SystemTime) {
        let current = self.bucket(now);
        while self
            .buckets
            .front()
            .is_some_and(|&(b, _)| b.saturating_add(self.span) < current)
        {
            self.buckets.pop_front();
        }
        let mut ahead = 0u64;
        while let Some(&(b, n)) = self.buckets.back() {
            if b <= current {
                break;
            }
            ahead = ahead.saturating_add(n);
            self.buckets.pop_back();
        }
        if ahead > 0 {
            self.put(current, ahead);
        }
    }

    fn put(&mut self, bucket: u64, n: u64) {
        match self.buckets.back_mut() {
            Some((b, count)) if *b == bucket => *count = count.saturating_add(n),
            _ => self.buckets.push_back((bucket, n)),
        }
    }

    fn add(&mut self, now: SystemTime, n: u64) {
        if n == 0 {
            return;
        }
        self.prune(now);
        self.put(self.bucket(now), n);
    }

    fn total(&mut self, now: SystemTime) -> u64 {
        self.prune(now);
        self.sum()
    }

    fn sum(&self) -> u64 {
        self.buckets.iter().map(|&(_, n)| n).sum()
    }

    /// When at least `n` of the counts will have left the window; `None` if the window holds fewer.
    fn frees_at(&self, n: u64) -> Option<SystemTime> {
        let mut freed = 0u64;
        for &(b, count) in &self.buckets {
            freed = freed.saturating_add(count);
            if freed >= n {
                let secs = b
                    .saturating_add(self.span)
                    .saturating_add(1)
                    .saturating_mul(self.width);
                return Some(UNIX_EPOCH + Duration::from_secs(secs));
            }
        }
        None
    }
}

/// An account's counts: what its windows hold, and what is in flight now.
#[derive(Debug, Clone)]
struct Counts {
    messages: Window,
    recipients: Window,
    flying_messages: u64,
    flying_recipients: u64,
    /// Bumped at every change, so that a write can tell whether it is still needed.
    generation: u64,
}

impl Counts {
    fn empty() -> Counts {
        Counts {
            messages: Window::new(MINUTE),
            recipients: Window::new(DAY),
            flying_messages: 0,
            flying_recipients: 0,
            generation: 0,
        }
    }
}

/// The counters file.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CountsFile {
    version: u32,
    /// Seconds since the epoch.
    written_at: u64,
    /// Messages and recipients of attempts that had not finished when the file was written.
    in_flight: (u64, u64),
    /// `[second, messages]`.
    messages: Vec<(u64, u64)>,
    /// `[minute, recipients]` (minutes since the epoch).
    recipients: Vec<(u64, u64)>,
}

/// How close an account is to its limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Usage {
    /// Messages in the last minute, those in flight included.
    pub messages_this_minute: u64,
    pub per_minute: Option<u32>,
    /// Recipients in the last 24 hours, those in flight included.
    pub recipients_last_24h: u64,
    pub recipients_per_day: Option<u32>,
}

impl Usage {
    /// The daily limit is reached: mail waits, possibly for hours.
    pub fn day_exhausted(&self) -> bool {
        self.recipients_per_day
            .is_some_and(|l| self.recipients_last_24h >= u64::from(l))
    }
}

/// One account's limits and counts.
#[derive(Debug)]
pub struct AccountRate {
    account: String,
    /// Replaced when a reload (SIGHUP) changes them; the counts stay.
    limits: Mutex<RateConfig>,
    /// `None`: counted in memory only (an account built without a state dir).
    path: Option<PathBuf>,
    counts: Mutex<Counts>,
    /// Serialises writes of the file; holds the generation last written.
    written: Mutex<u64>,
    /// A write failed last time: said once in the log until one succeeds.
    failing: AtomicBool,
    /// The provider asked for a pause (a quota refusal, HTTP 429 with `Retry-After`): no message goes before.
    pause: ProviderPause,
}

impl AccountRate {
    /// Counting in memory only, from zero.
    pub fn unpersisted(account: &str, limits: RateConfig) -> AccountRate {
        AccountRate {
            account: account.to_string(),
            limits: Mutex::new(limits),
            path: None,
            counts: Mutex::new(Counts::empty()),
            written: Mutex::new(0),
            failing: AtomicBool::new(false),
            pause: ProviderPause::unpersisted(),
        }
    }

    /// The account's counts from the state dir. A file that cannot be read is logged, and taken as the worst
    /// case (see [`load`]).
    pub fn load(state_dir: &Path, account: &str, limits: RateConfig) -> AccountRate {
        let path = rate_path(state_dir, account);
        let (counts, problem) = load(&path, limits, SystemTime::now());
        if let Some(problem) = problem {
            tracing::error!(relay_account = %account, path = %path.display(), "{problem}");
        }
        AccountRate {
            account: account.to_string(),
            limits: Mutex::new(limits),
            path: Some(path),
            counts: Mutex::new(counts),
            written: Mutex::new(0),
            failing: AtomicBool::new(false),
            pause: ProviderPause::load(state_dir, account, SystemTime::now()),
        }
    }

    /// The provider refused a message for the account's sake (its quota used up, or too many requests): no
    /// message of the account goes before `until` (a later pause already asked for stays). Whether the account
    /// was not paused before.
    pub fn pause_until(&self, until: SystemTime, reply: &str) -> bool {
        self.pause.extend(until, reply)
    }

    /// Ends a pause early (`relay queue retry`: the sysadmin says the cause is gone); whether there was one.
    pub fn lift_pause(&self, now: SystemTime) -> bool {
        self.pause.lift(now)
    }

    /// Until when the provider asked the account to pause, if that is still ahead.
    pub fn paused(&self, now: SystemTime) -> Option<SystemTime> {
        self.pause.until(now)
    }

    /// The pause still ahead, with the provider's words that asked for it.
    pub fn pause(&self, now: SystemTime) -> Option<super::pause::PauseReport> {
        self.pause.report(now)
    }

    pub fn limits(&self) -> RateConfig {
        *lock(&self.limits)
    }

    /// New limits from a reloaded config; what was sent still counts against them.
    /// New limits (a reload). Counts kept so far only as a report are written durably at the next [`Self::save`],
    /// before the next message goes out.
    pub fn set_limits(&self, limits: RateConfig) {
        *lock(&self.limits) = limits;
    }

    pub fn usage(&self, now: SystemTime) -> Usage {
        let limits = self.limits();
        usage(&mut lock(&self.counts), limits, now)
    }

    /// How many more messages could go now, as far as the per-minute limit says (`u64::MAX` without one); zero
    /// when the day's recipients are used up.
    pub fn room(&self, now: SystemTime) -> u64 {
        self.room_for(now, 1)
    }

    /// [`Self::room`] for a message to `recipients` recipients: also zero while they do not fit what is left of
    /// the day's allowance. (One that can never fit goes alone, once the last 24 hours hold none, as
    /// [`Self::reserve`] sends it.)
    pub fn room_for(&self, now: SystemTime, recipients: usize) -> u64 {
        let u = self.usage(now);
        let fits = u.recipients_per_day.map(u64::from).is_none_or(|limit| {
            let (k, used) = (recipients as u64, u.recipients_last_24h);
            if k > limit {
                used == 0
            } else {
                used.saturating_add(k) <= limit
            }
        });
        if !fits || self.paused(now).is_some() {
            return 0;
        }
        u.per_minute.map_or(u64::MAX, |l| {
            u64::from(l).saturating_sub(u.messages_this_minute)
        })
    }

    /// Takes a place for a message to `recipients` recipients, or says when one could free: `Err(None)` when only
    /// an attempt in flight can make room (it wakes the waiting mail when it ends).
    pub fn reserve(
        self: &Arc<Self>,
        now: SystemTime,
        recipients: usize,
    ) -> Result<Reservation, Option<SystemTime>> {
        let k = recipients as u64;
        let limits = self.limits();
        let paused = self.paused(now);
        let mut c = lock(&self.counts);
        let mut waits: Vec<Option<SystemTime>> = Vec::new();
        if paused.is_some() {
            waits.push(paused);
        }
        if let Some(limit) = limits.per_minute.map(u64::from) {
            let used = c.messages.total(now) + c.flying_messages;
            if used + 1 > limit {
                waits.push(c.messages.frees_at(used + 1 - limit));
            }
        }
        let mut oversized = false;
        if let Some(limit) = limits.recipients_per_day.map(u64::from) {
            let counted = c.recipients.total(now);
            let used = counted + c.flying_recipients;
            if k > limit {
                // It can never fit in a day's allowance: it goes alone, once the last 24 hours hold nothing, so that
                // it cannot add to anything else (it must not wait for ever).
                if used > 0 {
                    waits.push(if c.flying_recipients > 0 {
                        None
                    } else {
                        c.recipients.frees_at(counted)
                    });
                } else {
                    oversized = true;
                }
            } else if used + k > limit {
                waits.push(c.recipients.frees_at(used + k - limit));
            }
        }
        if !waits.is_empty() {
            // Every limit must allow it: the latest of the known times, if any is known.
            return Err(waits.into_iter().flatten().max());
        }
        if oversized {
            tracing::warn!(relay_account = %self.account, recipients, limit = limits.recipients_per_day, "a message has more recipients than the account may send to in a day; it goes now that the last 24 hours hold none, and the provider may refuse it or hold the account");
        }
        c.flying_messages += 1;
        c.flying_recipients += k;
        c.generation += 1;
        Ok(Reservation {
            rate: self.clone(),
            recipients: k,
            sending: false,
            done: false,
        })
    }

    /// A message an earlier attempt offered, without hearing it was taken, turned out to have been taken: its
    /// recipients count now (safer late than never; the message itself was counted when it went).
    pub fn accepted_later(&self, recipients: usize) {
        let mut c = lock(&self.counts);
        c.recipients.add(SystemTime::now(), recipients as u64);
        c.generation += 1;
    }

    /// `reserved` recipients were in flight; `accepted` of them count towards the day's limit.
    fn settle(&self, now: SystemTime, reserved: u64, sent: bool, accepted: u64) {
        let mut c = lock(&self.counts);
        c.flying_messages = c.flying_messages.saturating_sub(1);
        c.flying_recipients = c.flying_recipients.saturating_sub(reserved);
        if sent {
            c.messages.add(now, 1);
        }
        if accepted > 0 {
            c.recipients.add(now, accepted.min(reserved));
        }
        c.generation += 1;
    }

    /// Writes the counts before and after each message, where that matters: for an account with limits, whose
    /// counts must survive a crash (fsynced). An account without limits has nothing a forgotten count could
    /// break; its file is a report for `relay status`, written by [`Self::save_report`] once every couple of
    /// seconds: per message, the write and rename (and the old file's freeing) cost more than the delivery.
    pub fn save(&self) {
        if self.durable() {
            self.write(true);
        }
    }

    /// Writes the counts if they changed, whether or not the account has limits (the scheduler's periodic write,
    /// and the last one at shutdown).
    pub fn save_report(&self) {
        self.write(self.durable());
    }

    /// Whether the account has limits, and so counts that must be on disk before a message goes.
    pub fn durable(&self) -> bool {
        *lock(&self.limits) != RateConfig::default()
    }

    /// Writes the counts if they changed since the last write. Concurrent callers share writes: one that finds
    /// its change already written returns at once. A failure is logged (once until a write succeeds); the mail
    /// still goes, since refusing it would not make the counts any safer.
    fn write(&self, durable: bool) {
        let Some(path) = &self.path else {
            return;
        };
        let mut written = lock(&self.written);
        let (file, generation) = {
            let mut c = lock(&self.counts);
            if c.generation <= *written {
                return;
            }
            (to_file(&mut c, SystemTime::now()), c.generation)
        };
        match write_file(path, &file, durable) {
            Ok(()) => {
                *written = generation;
                self.failing.store(false, Ordering::Relaxed);
            }
            Err(e) => {
                if !self.failing.swap(true, Ordering::Relaxed) {
                    tracing::error!(relay_account = %self.account, path = %path.display(), error = %e, "cannot save the sending counters; a restart now could forget recent mail and exceed the provider's limits");
                }
            }
        }
    }
}

/// A place taken for one message. Dropped without [`finish`](Self::finish), it gives the place back if the
/// message never went out, and counts it in full if it might have.
#[derive(Debug)]
pub struct Reservation {
    rate: Arc<AccountRate>,
    recipients: u64,
    sending: bool,
    done: bool,
}

impl Reservation {
    /// The message is about to be offered to the upstream.
    pub fn sending(&mut self) {
        self.sending = true;
    }

    /// Nothing of the message reached the upstream after all (it refused the connection): it counts for no limit.
    pub fn unsent(mut self) {
        self.sending = false;
        self.finish(false);
    }

    /// The attempt is over; `accepted` when the upstream took the message.
    pub fn finish(self, accepted: bool) {
        self.finish_at(SystemTime::now(), accepted);
    }

    /// The upstream took the message for all but `refused` of its recipients: those it refused were sent
    /// nothing, and count for no limit (a 4xx one counts when a later attempt gets it through).
    pub fn finish_refusing(mut self, refused: usize) {
        self.done = true;
        let accepted = self.recipients.saturating_sub(refused as u64);
        self.rate
            .settle(SystemTime::now(), self.recipients, self.sending, accepted);
    }

    fn finish_at(mut self, now: SystemTime, accepted: bool) {
        self.done = true;
        let accepted = if accepted { self.recipients } else { 0 };
        self.rate
            .settle(now, self.recipients, self.sending, accepted);
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if !self.done {
            let accepted = if self.sending { self.recipients } else { 0 };
            self.rate
                .settle(SystemTime::now(), self.recipients, self.sending, accepted);
        }
    }
}

fn usage(c: &mut Counts, limits: RateConfig, now: SystemTime) -> Usage {
    Usage {
        messages_this_minute: c.messages.total(now) + c.flying_messages,
        per_minute: limits.per_minute,
        recipients_last_24h: c.recipients.total(now) + c.flying_recipients,
        recipients_per_day: limits.recipients_per_day,
    }
}

fn to_file(c: &mut Counts, now: SystemTime) -> CountsFile {
    c.messages.prune(now);
    c.recipients.prune(now);
    CountsFile {
        version: VERSION,
        written_at: epoch_secs(now),
        in_flight: (c.flying_messages, c.flying_recipients),
        messages: c.messages.buckets.iter().copied().collect(),
        recipients: c.recipients.buckets.iter().copied().collect(),
    }
}

/// Replaces the file atomically; with `durable`, fsynced (file and directory) before it returns.
fn write_file(path: &Path, file: &CountsFile, durable: bool) -> std::io::Result<()> {
    let bytes = serde_json::to_vec(file).map_err(std::io::Error::other)?;
    if !durable {
        return crate::state_files::replace(path, &bytes);
    }
    if let Some(dir) = path.parent() {
        crate::state_files::create_dir_all(dir)?;
    }
    let mut f = crate::state_files::atomic(path)?;
    f.write_all(&bytes)?;
    f.commit()
}

/// Reads a counters file as of `now`, with what went wrong if it could not be read. No file: nothing was sent.
/// An unreadable one: every limit taken as reached when the file was last written, so that mail waits until the
/// provider's windows have surely moved past whatever it held.
fn load(path: &Path, limits: RateConfig, now: SystemTime) -> (Counts, Option<String>) {
    let bytes = match crate::small_files::read_own(path, MAX_FILE) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return (Counts::empty(), None),
        read => read.map_err(|e| e.to_string()),
    };
    let parsed = bytes.and_then(|b| {
        let f: CountsFile = serde_json::from_slice(&b).map_err(|e| e.to_string())?;
        if f.version != VERSION {
            return Err(format!("version {} is not one this relay reads", f.version));
        }
        Ok(f)
    });
    match parsed {
        Ok(f) => (from_file(f, now), None),
        Err(why) => {
            let since = std::fs::metadata(path)
                .and_then(|m| m.modified())
                .unwrap_or(now)
                .min(now);
            let mut c = Counts::empty();
            if let Some(l) = limits.per_minute {
                c.messages.add(since, u64::from(l));
            }
            if let Some(l) = limits.recipients_per_day {
                c.recipients.add(since, u64::from(l));
            }
            c.messages.prune(now);
            c.recipients.prune(now);
            let until = [&c.messages, &c.recipients]
                .into_iter()
                .filter_map(|w| w.frees_at(w.sum()))
                .max();
            let consequence = match until {
                Some(t) => format!(
                    "its limits are taken as reached when it was last written, so its mail waits until {}",
                    humantime::format_rfc3339_seconds(t)
                ),
                None => "it counted nothing that still matters".to_string(),
            };
            (
                c,
                Some(format!(
                    "the sending counters cannot be read ({why}); {consequence}. To start from zero instead, stop relay and remove {}",
                    path.display()
                )),
            )
        }
    }
}

/// The file's counts as of `now`. What was in flight is counted as sent now: it may have reached the upstream
/// at any moment up to this one.
fn from_file(f: CountsFile, now: SystemTime) -> Counts {
    let mut c = Counts::empty();
    let mut messages = f.messages;
    messages.sort_unstable();
    for (b, n) in messages {
        c.messages.put(b, n);
    }
    let mut recipients = f.recipients;
    recipients.sort_unstable();
    for (b, n) in recipients {
        c.recipients.put(b, n);
    }
    c.messages.prune(now);
    c.recipients.prune(now);
    c.messages.add(now, f.in_flight.0);
    c.recipients.add(now, f.in_flight.1);
    c
}

/// How close an account is to its limits, from its file (for `relay status`, which need not run beside the
/// daemon), with what went wrong reading it.
pub fn usage_from_file(
    state_dir: &Path,
    account: &str,
    limits: RateConfig,
    now: SystemTime,
) -> (Usage, Option<String>) {
    let (mut c, problem) = load(&rate_path(state_dir, account), limits, now);
    (usage(&mut c, limits, now), problem)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pause the provider asked for holds every message of the account until it ends; a shorter one asked
    /// meanwhile does not cut it short.
    #[test]
    fn a_pause_holds_the_account_until_it_ends() {
        let rate = Arc::new(AccountRate::unpersisted("a", RateConfig::default()));
        let now = SystemTime::now();
        let hour = now + Duration::from_secs(3600);
        rate.pause_until(hour, "550 5.4.5");
        rate.pause_until(now + Duration::from_secs(60), "429");
        assert_eq!(rate.room(now), 0);
        assert_eq!(rate.reserve(now, 1).err(), Some(Some(hour)));
        let later = hour + Duration::from_secs(1);
        assert_eq!(rate.paused(later), None);
        assert!(rate.reserve(later, 1).is_ok());
        rate.pause_until(hour, "550 5.4.5");
        assert!(rate.lift_pause(now));
        assert!(!rate.lift_pause(now));
        assert_eq!(rate.room(now), u64::MAX);
    }

    fn at(secs: f64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_700_000_000) + Duration::from_secs_f64(secs)
    }

    fn rate(per_minute: Option<u32>, per_day: Option<u32>) -> Arc<AccountRate> {
        Arc::new(AccountRate::unpersisted(
            "t",
            RateConfig {
                per_minute,
                recipients_per_day: per_day,
            },
        ))
    }

    /// Room for a message is room for its recipients: with 2 of 3 left, one recipient fits and three do not
    /// (until the window frees); one over the day's allowance fits only a day that holds none.
    #[test]
    fn room_for_counts_the_messages_recipients_against_what_is_left_of_the_day() {
        let r = rate(None, Some(3));
        let now = at(0.0);
        assert_eq!(r.room_for(now, 4), u64::MAX, "an empty day takes even this");
        let mut res = r.reserve(now, 1).expect("room");
        res.sending();
        res.finish_at(now, true);
        assert_eq!(r.room_for(now, 1), u64::MAX);
        assert_eq!(r.room_for(now, 2), u64::MAX);
        assert_eq!(r.room_for(now, 3), 0);
        assert_eq!(r.room_for(now, 4), 0);
        assert!(r.reserve(now, 3).is_err(), "as reserve says");
        let tomorrow = now + Duration::from_secs(86_400 + 60);
        assert_eq!(r.room_for(tomorrow, 3), u64::MAX);
    }

    #[test]
    fn hundred_messages_at_thirty_a_minute_never_exceed_it_in_any_minute() {
        let r = rate(Some(30), Some(10_000));
        // Four connections; each message goes as soon as it may and takes 0 to 3 s upstream. The upstream sees it
        // somewhere between its start and its end: neither may ever hold 31 in a minute.
        let (mut now, mut queued, mut i) = (at(0.0), 100, 0u64);
        let (mut starts, mut ends) = (Vec::new(), Vec::new());
        let mut flying: Vec<(SystemTime, Reservation)> = Vec::new();
        loop {
            flying.sort_by_key(|(end, _)| *end);
            while flying.first().is_some_and(|(end, _)| *end <= now) {
                let (end, res) = flying.remove(0);
                res.finish_at(end, true);
                ends.push(end);
            }
            if ends.len() == 100 {
                break;
            }
            let mut wake = None;
            while queued > 0 && flying.len() < 4 {
                match r.reserve(now, 1) {
                    Ok(mut res) => {
                        res.sending();
                        queued -= 1;
                        starts.push(now);
                        flying.push((now + Duration::from_millis(i % 4 * 1000), res));
                        i += 1;
                    }
                    Err(t) => {
                        assert!(t.is_none_or(|t| t > now), "a wake-up in the future");
                        wake = t;
                        break;
                    }
                }
            }
            let next_end = flying.iter().map(|(end, _)| *end).min();
            now = [next_end, wake]
                .into_iter()
                .flatten()
                .min()
                .expect("something to wait for");
        }
        for times in [&mut starts, &mut ends] {
            times.sort();
            for w in times.windows(31) {
                let span = w[30].duration_since(w[0]).unwrap();
                assert!(span >= Duration::from_secs(60), "31 within {span:?}");
            }
        }
        let span = ends[99].duration_since(ends[0]).unwrap();
        assert!(
            span < Duration::from_secs(4 * 62),
            "no needless waiting: {span:?}"
        );
    }

    #[test]
    fn recipients_per_day_hold_until_the_window_moves() {
        let r = rate(None, Some(10));
        let first = r.reserve(at(0.0), 6).unwrap();
        first.finish_at(at(1.0), true);
        let until = r.reserve(at(2.0), 5).unwrap_err().expect("a time");
        assert!(until >= at(86_401.0) && until <= at(86_461.0), "{until:?}");
        assert!(r.reserve(at(2.0), 4).is_ok(), "what fits still goes");
    }

    #[test]
    fn refused_mail_does_not_use_up_the_day_but_in_flight_mail_holds_its_place() {
        let r = rate(None, Some(10));
        let a = r.reserve(at(0.0), 8).unwrap();
        assert_eq!(
            r.reserve(at(0.0), 5).unwrap_err(),
            None,
            "only the flight can free it"
        );
        a.finish_at(at(1.0), false);
        assert!(r.reserve(at(2.0), 10).is_ok());
    }

    #[test]
    fn a_message_larger_than_a_day_goes_alone_once_the_day_is_empty() {
        let r = rate(None, Some(10));
        let small = r.reserve(at(0.0), 1).unwrap();
        small.finish_at(at(0.0), true);
        let until = r.reserve(at(5.0), 50).unwrap_err().expect("a time");
        let big = r.reserve(until, 50);
        assert!(big.is_ok(), "it goes when the day is empty");
        assert!(r.reserve(until, 1).is_err(), "and nothing goes beside it");
    }

    #[test]
    fn a_dropped_reservation_gives_back_its_place_unless_it_was_sending() {
        let r = rate(Some(1), Some(5));
        drop(r.reserve(at(0.0), 5).unwrap());
        let mut res = r.reserve(at(0.0), 5).unwrap();
        res.sending();
        drop(res);
        let u = r.usage(SystemTime::now());
        assert_eq!(
            u.recipients_last_24h, 5,
            "an unknown outcome counts in full"
        );
    }

    #[test]
    fn the_clock_going_back_keeps_counts_for_a_whole_window() {
        let mut w = Window::new(MINUTE);
        w.add(at(100.0), 3);
        assert_eq!(w.total(at(10.0)), 3);
        assert_eq!(w.total(at(70.0)), 3);
        assert_eq!(w.total(at(71.0)), 0);
        assert!(w.buckets.len() <= 61);
    }

    #[test]
    fn counters_survive_a_file_round_trip_and_a_damaged_file_is_the_worst_case() {
        let dir = tempfile::tempdir().unwrap();
        let limits = RateConfig {
            per_minute: Some(30),
            recipients_per_day: Some(100),
        };
        let r = Arc::new(AccountRate::load(dir.path(), "a", limits));
        let mut res = r.reserve(SystemTime::now(), 7).unwrap();
        res.sending();
        r.save();
        let (u, problem) = usage_from_file(dir.path(), "a", limits, SystemTime::now());
        assert!(problem.is_none());
        assert_eq!(
            (u.messages_this_minute, u.recipients_last_24h),
            (1, 7),
            "in flight counts"
        );
        res.finish(true);
        r.save();
        let (u, _) = usage_from_file(dir.path(), "a", limits, SystemTime::now());
        assert_eq!((u.messages_this_minute, u.recipients_last_24h), (1, 7));

        std::fs::write(rate_path(dir.path(), "a"), b"{\"version\":1,\"writ").unwrap();
        let (u, problem) = usage_from_file(dir.path(), "a", limits, SystemTime::now());
        assert!(problem.unwrap().contains("cannot be read"));
        assert_eq!((u.messages_this_minute, u.recipients_last_24h), (30, 100));
        let r = Arc::new(AccountRate::load(dir.path(), "a", limits));
        assert!(r.reserve(SystemTime::now(), 1).is_err());
    }
}
