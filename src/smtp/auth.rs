//! Checking a device's SMTP AUTH password against the `[[user]]` argon2 hashes.
//!
//! An argon2id verification costs tens of milliseconds of CPU and about 19 MiB of memory on purpose, so it is
//! bounded three ways:
//! - a successful verification is remembered in memory, keyed by a keyed hash of user and password (the key is
//!   random per process, so the table says nothing about the passwords even in a core dump): devices that log in
//!   for every message pay once;
//! - verifications run on a fixed pool of one thread per core, at most [`MAX_THREADS`], so no more run at once
//!   than there are cores (the memory peak is 19 MiB per thread, whatever the number of clients); at most
//!   [`MAX_WAITING`] wait, each at most [`MAX_WAIT`], and the rest are told to come back (454 4.7.0);
//! - failures are counted per client address across connections ([`FailureLedger`]): an address that keeps
//!   failing is refused without any argon2 work for a while, and that is logged once per incident.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Mutex, OnceLock, mpsc};
use std::time::{Duration, Instant};

use argon2::{Argon2, PasswordHasher, PasswordVerifier};
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::oneshot;

use crate::config::UserConfig;

/// Remembered logins before the table is cleared; a device fleet is far smaller.
const CACHE_LIMIT: usize = 10_000;
/// Password-check threads: one per core, at most this many. Each check holds 19 MiB while it runs, so this caps
/// what a burst of logins can take, and two manage ~50 first-time logins a second (later ones are cached).
const MAX_THREADS: usize = 2;
/// Verifications waiting for a pool thread; more than this are refused at once.
const MAX_WAITING: usize = 256;
/// Longest wait for a pool thread before the client is told to try again.
const MAX_WAIT: Duration = Duration::from_secs(10);

/// What became of one AUTH attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Accepted,
    Refused,
    /// The password checks are saturated: try again later (454 4.7.0).
    Busy,
    /// The client's address failed too often lately and is refused for now (no password was checked).
    Throttled,
}

pub struct Authenticator {
    hashes: HashMap<String, String>,
    key: [u8; 32],
    verified: Mutex<HashSet<[u8; 32]>>,
    pool: mpsc::SyncSender<Job>,
    failures: FailureLedger,
}

struct Job {
    password: SecretString,
    hash: String,
    /// The client stopped waiting after this: skip the work.
    deadline: Instant,
    done: oneshot::Sender<bool>,
}

impl Authenticator {
    pub fn new(users: &[UserConfig]) -> Authenticator {
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(MAX_THREADS);
        Authenticator {
            hashes: users
                .iter()
                .map(|u| (u.name.clone(), u.password_hash.clone()))
                .collect(),
            key: rand::random(),
            verified: Mutex::new(HashSet::new()),
            pool: start_pool(threads),
            failures: FailureLedger::new(FailurePolicy::default()),
        }
    }

    fn cache_key(&self, user: &str, password: &str) -> [u8; 32] {
        let mut h = blake3::Hasher::new_keyed(&self.key);
        h.update(&(user.len() as u64).to_le_bytes());
        h.update(user.as_bytes());
        h.update(password.as_bytes());
        *h.finalize().as_bytes()
    }

    /// Checks `password` for `user`, on behalf of a client at `client`.
    pub async fn verify(&self, client: IpAddr, user: &str, password: &SecretString) -> Verdict {
        let now = Instant::now();
        if self.failures.is_blocked(client, now) {
            return Verdict::Throttled;
        }
        let key = self.cache_key(user, password.expose_secret());
        if self.verified.lock().is_ok_and(|set| set.contains(&key)) {
            return Verdict::Accepted;
        }
        // Unknown users are checked against a dummy hash, so that the time taken does not tell which
        // user names exist.
        let (hash, known) = match self.hashes.get(user) {
            Some(h) => (h.clone(), true),
            None => (dummy_hash().to_string(), false),
        };
        match self.failures.start_check(client, now) {
            Start::Go => {}
            Start::Blocked => return Verdict::Throttled,
            Start::Crowded => return Verdict::Busy,
        }
        // Given back however this ends, the client gone mid-check included.
        let _checking = Checking {
            ledger: &self.failures,
            ip: client,
        };
        let (done, result) = oneshot::channel();
        let job = Job {
            password: password.clone(),
            hash,
            deadline: now + MAX_WAIT,
            done,
        };
        if self.pool.try_send(job).is_err() {
            return Verdict::Busy;
        }
        let ok = match tokio::time::timeout(MAX_WAIT, result).await {
            Ok(Ok(ok)) => ok && known,
            _ => return Verdict::Busy,
        };
        if !ok {
            return self.failed(client);
        }
        if let Ok(mut set) = self.verified.lock() {
            if set.len() >= CACHE_LIMIT {
                set.clear();
            }
            set.insert(key);
        }
        Verdict::Accepted
    }
}

impl Authenticator {
    /// Whether `user` is a configured user's name (for log lines: other names are client text).
    pub fn knows(&self, user: &str) -> bool {
        self.hashes.contains_key(user)
    }

    /// A login refused before any password check (a malformed or unsupported request): counted as a failure
    /// like a wrong password, so it cannot be used to probe faster than guessing.
    pub fn refuse(&self, client: IpAddr) -> Verdict {
        if self.failures.is_blocked(client, Instant::now()) {
            return Verdict::Throttled;
        }
        self.failed(client)
    }

    fn failed(&self, client: IpAddr) -> Verdict {
        if let Some(incident) = self.failures.failed(client, Instant::now()) {
            tracing::warn!(relay_event = "auth_failed", relay_client = %client, failures = incident.failures, blocked_for = %humantime::format_duration(incident.blocked_for), "too many failed logins from this address; its logins are refused for a while");
        }
        Verdict::Refused
    }
}

/// The verification threads: a fixed number, fed through a bounded queue.
fn start_pool(threads: usize) -> mpsc::SyncSender<Job> {
    let (tx, rx) = mpsc::sync_channel::<Job>(MAX_WAITING);
    let rx = std::sync::Arc::new(Mutex::new(rx));
    for i in 0..threads {
        let rx = rx.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("relay-argon2-{i}"))
            .spawn(move || {
                loop {
                    let job = match rx.lock() {
                        Ok(rx) => match rx.recv() {
                            Ok(job) => job,
                            Err(_) => return,
                        },
                        Err(_) => return,
                    };
                    if job.done.is_closed() || Instant::now() > job.deadline {
                        continue;
                    }
                    let ok = Argon2::default()
                        .verify_password(job.password.expose_secret().as_bytes(), job.hash.as_str())
                        .is_ok();
                    let _ = job.done.send(ok);
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start a password-check thread");
        }
    }
    tx
}

fn dummy_hash() -> &'static str {
    static DUMMY: OnceLock<String> = OnceLock::new();
    DUMMY.get_or_init(|| hash_password(&rand::random::<u64>().to_string()).unwrap_or_default())
}

/// An argon2id hash in PHC form, for `relay hash-password`.
pub fn hash_password(password: &str) -> Result<String, argon2::password_hash::Error> {
    Ok(Argon2::default()
        .hash_password(password.as_bytes())?
        .to_string())
}

/// A password check under way, from [`FailureLedger::start_check`] until dropped.
struct Checking<'a> {
    ledger: &'a FailureLedger,
    ip: IpAddr,
}

impl Drop for Checking<'_> {
    fn drop(&mut self) {
        self.ledger.end_check(self.ip);
    }
}

/// When an address is refused for failing: `failures` within `window` block it for `block`, doubling for each
/// incident in a row up to `max_block`.
#[derive(Debug, Clone, Copy)]
pub struct FailurePolicy {
    pub failures: u32,
    pub window: Duration,
    pub block: Duration,
    pub max_block: Duration,
    /// Addresses remembered; beyond this the stalest are forgotten (a flood of addresses cannot grow memory).
    pub capacity: usize,
}

impl Default for FailurePolicy {
    fn default() -> Self {
        FailurePolicy {
            failures: 8,
            window: Duration::from_secs(60),
            block: Duration::from_secs(60),
            max_block: Duration::from_secs(900),
            capacity: 4096,
        }
    }
}

/// Failed logins per client address, across connections.
pub struct FailureLedger {
    policy: FailurePolicy,
    entries: Mutex<HashMap<IpAddr, Entry>>,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    window_start: Instant,
    failures: u32,
    blocked_until: Option<Instant>,
    /// Incidents in a row, for the doubling block.
    incidents: u32,
    last_seen: Instant,
    /// Password checks under way: each may yet be a failure.
    checking: u32,
}

/// Whether a password check from an address may start (see [`FailureLedger::start_check`]).
#[derive(Debug, PartialEq, Eq)]
pub enum Start {
    Go,
    /// Refused for failing too often.
    Blocked,
    /// As many checks are under way as failures are left before a block: the client tries again in a moment.
    Crowded,
}

/// An IPv6 client is counted by its /64: one host usually holds a whole /64, and could otherwise change address
/// for every few guesses.
fn ledger_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::from([s[0], s[1], s[2], s[3], 0, 0, 0, 0])
        }
        v4 => v4,
    }
}

/// A block that just began: logged once.
#[derive(Debug, PartialEq, Eq)]
pub struct Incident {
    pub failures: u32,
    pub blocked_for: Duration,
}

impl FailureLedger {
    pub fn new(policy: FailurePolicy) -> FailureLedger {
        FailureLedger {
            policy,
            entries: Mutex::new(HashMap::new()),
        }
    }

    pub fn is_blocked(&self, ip: IpAddr, now: Instant) -> bool {
        let ip = ledger_key(ip);
        self.entries.lock().is_ok_and(|m| {
            m.get(&ip)
                .and_then(|e| e.blocked_until)
                .is_some_and(|t| now < t)
        })
    }

    /// Takes a place for one password check from `ip`, to be given back with [`end_check`](Self::end_check).
    /// Checks run in parallel and a failure counts only once its check ends, so the checks under way count as
    /// failures to come: otherwise many connections at once could each guess before the first failure counted.
    /// A fleet behind one address logging in at once (first logins; later ones are remembered) is told to try
    /// again in a moment, not blocked.
    pub fn start_check(&self, ip: IpAddr, now: Instant) -> Start {
        let ip = ledger_key(ip);
        let p = self.policy;
        let Ok(mut m) = self.entries.lock() else {
            return Start::Go;
        };
        let e = entry(&mut m, ip, now, &p);
        if e.blocked_until.is_some_and(|t| now < t) {
            return Start::Blocked;
        }
        if e.failures + e.checking >= p.failures {
            return Start::Crowded;
        }
        e.checking += 1;
        Start::Go
    }

    /// A check taken with [`start_check`](Self::start_check) ended (its failure, if it failed, counted first).
    pub fn end_check(&self, ip: IpAddr) {
        if let Ok(mut m) = self.entries.lock()
            && let Some(e) = m.get_mut(&ledger_key(ip))
        {
            e.checking = e.checking.saturating_sub(1);
        }
    }

    /// Counts a failure; returns the incident if this one starts a block.
    pub fn failed(&self, ip: IpAddr, now: Instant) -> Option<Incident> {
        let ip = ledger_key(ip);
        let p = self.policy;
        let mut m = self.entries.lock().ok()?;
        let e = entry(&mut m, ip, now, &p);
        e.failures += 1;
        if e.failures < p.failures {
            return None;
        }
        let blocked_for = p
            .block
            .saturating_mul(1 << e.incidents.min(16))
            .min(p.max_block);
        e.incidents += 1;
        e.failures = 0;
        e.window_start = now;
        e.blocked_until = Some(now + blocked_for);
        Some(Incident {
            failures: p.failures,
            blocked_for,
        })
    }
}

/// The address's entry, made if it has none (forgetting the stalest when the table is full), its window of
/// failures started anew if it has passed.
fn entry<'m>(
    m: &'m mut HashMap<IpAddr, Entry>,
    ip: IpAddr,
    now: Instant,
    p: &FailurePolicy,
) -> &'m mut Entry {
    if !m.contains_key(&ip) && m.len() >= p.capacity {
        // Forget the entries seen longest ago, unblocked ones first, and those with checks under way last (their
        // ends would lower a new entry's count).
        let stale = m
            .iter()
            .min_by_key(|(_, e)| {
                (
                    e.blocked_until.is_some_and(|t| now < t),
                    e.checking > 0,
                    e.last_seen,
                )
            })
            .map(|(ip, _)| *ip);
        if let Some(stale) = stale {
            m.remove(&stale);
        }
    }
    let e = m.entry(ip).or_insert(Entry {
        window_start: now,
        failures: 0,
        blocked_until: None,
        incidents: 0,
        last_seen: now,
        checking: 0,
    });
    e.last_seen = now;
    if now.duration_since(e.window_start) > p.window {
        // A quiet spell after the last block ends the run of incidents.
        if e.blocked_until
            .is_none_or(|t| now.duration_since(t) > p.max_block)
        {
            e.incidents = 0;
        }
        e.window_start = now;
        e.failures = 0;
    }
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_under_way_count_as_failures_to_come() {
        let ledger = FailureLedger::new(FailurePolicy {
            failures: 3,
            ..FailurePolicy::default()
        });
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let t0 = Instant::now();
        assert_eq!(ledger.failed(ip, t0), None);
        assert_eq!(ledger.start_check(ip, t0), Start::Go);
        assert_eq!(ledger.start_check(ip, t0), Start::Go);
        // One failure and two checks under way: a third check could make a fourth guess.
        assert_eq!(ledger.start_check(ip, t0), Start::Crowded);
        ledger.end_check(ip);
        assert_eq!(ledger.start_check(ip, t0), Start::Go);
        // Both fail: the block begins, and no check starts.
        assert_eq!(ledger.failed(ip, t0), None);
        ledger.end_check(ip);
        assert!(ledger.failed(ip, t0).is_some());
        ledger.end_check(ip);
        assert_eq!(ledger.start_check(ip, t0), Start::Blocked);
    }

    #[tokio::test]
    async fn verifies_and_remembers() {
        let hash = hash_password("s3cret").unwrap();
        assert!(hash.starts_with("$argon2id$"));
        let auth = Authenticator::new(&[UserConfig {
            name: "printer".into(),
            password_hash: hash,
            account: None,
        }]);
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let ok = |p: &str| SecretString::from(p.to_string());
        assert_eq!(
            auth.verify(ip, "printer", &ok("s3cret")).await,
            Verdict::Accepted
        );
        assert_eq!(
            auth.verify(ip, "printer", &ok("s3cret")).await,
            Verdict::Accepted
        );
        assert_eq!(
            auth.verify(ip, "printer", &ok("wrong")).await,
            Verdict::Refused
        );
        assert_eq!(
            auth.verify(ip, "nobody", &ok("s3cret")).await,
            Verdict::Refused
        );
        assert_eq!(auth.verified.lock().unwrap().len(), 1);
    }

    #[test]
    fn an_address_that_keeps_failing_is_blocked_once_per_incident() {
        let ledger = FailureLedger::new(FailurePolicy {
            failures: 5,
            capacity: 2,
            ..FailurePolicy::default()
        });
        let (bad, good): (IpAddr, IpAddr) =
            ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let t0 = Instant::now();
        for i in 0..4 {
            assert_eq!(ledger.failed(bad, t0 + Duration::from_secs(i)), None);
        }
        let incident = ledger.failed(bad, t0 + Duration::from_secs(4)).unwrap();
        assert_eq!(incident.blocked_for, Duration::from_secs(60));
        assert!(ledger.is_blocked(bad, t0 + Duration::from_secs(30)));
        assert!(!ledger.is_blocked(good, t0 + Duration::from_secs(30)));
        assert!(!ledger.is_blocked(bad, t0 + Duration::from_secs(65)));
        // The next incident in a row blocks twice as long.
        let t1 = t0 + Duration::from_secs(70);
        for i in 0..4 {
            assert_eq!(ledger.failed(bad, t1 + Duration::from_secs(i)), None);
        }
        let incident = ledger.failed(bad, t1 + Duration::from_secs(4)).unwrap();
        assert_eq!(incident.blocked_for, Duration::from_secs(120));
        // Many other addresses cannot evict a blocked one, nor grow the table.
        for i in 0..100u8 {
            ledger.failed(IpAddr::from([10, 1, 0, i]), t1 + Duration::from_secs(5));
        }
        assert!(ledger.is_blocked(bad, t1 + Duration::from_secs(10)));
        assert!(ledger.entries.lock().unwrap().len() <= 2);
    }
}
