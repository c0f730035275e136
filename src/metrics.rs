//! `[metrics]`: Prometheus text format (0.0.4) at `GET /metrics`.
//!
//! Counters and histograms live in memory and are updated by [`events`](crate::events) as things happen. What
//! is a state rather than an event (queue depth, the oldest message, token expiry) is read at scrape time from the
//! state dir: the queue from file names alone (ids are time-ordered, so the oldest id gives the oldest age; no
//! file is opened), the tokens from their small files, and the result is kept for [`SNAPSHOT_TTL`] so that
//! frequent scrapes of a large queue cost one directory listing every few seconds at most. Label sets are bounded
//! by the configured accounts (and the empty account, for attempts that never reached one): a reload adds the new
//! accounts' series and removes those of the accounts it removed, and an event that names an account no longer
//! configured (an attempt that began before the reload) is not counted per account, so that it cannot bring a
//! removed account's series back.

use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore, watch};

use crate::events::Event;
use crate::queue::SpoolPaths;

/// How long a reading of the state dir serves scrapes.
pub const SNAPSHOT_TTL: Duration = Duration::from_secs(5);
/// Connections served at once. When all are taken, the one that has waited longest for its request gives its
/// place to the new one (a scraper sends its request at once: connections that send nothing cannot keep it
/// out); when every one is being answered, the new one is turned away rather than queued.
const MAX_CONNECTIONS: usize = 32;
/// How long a new connection waits for the place of one evicted while it waited for its request.
const EVICTION_WAIT: Duration = Duration::from_millis(200);
/// A request must arrive whole within this, and be at most [`MAX_REQUEST`] bytes.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_REQUEST: usize = 8192;

const ACCEPT_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// From arrival to delivery: seconds for a healthy relay, hours when an account is down.
const DELIVERY_BUCKETS: &[f64] = &[
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14_400.0, 86_400.0,
];

pub struct Metrics {
    registry: Registry,
    accepted: IntCounter,
    accept_latency: Histogram,
    deliveries: IntCounterVec,
    delivery_latency: Histogram,
    refreshes: IntCounterVec,
    refresh_failures: IntCounterVec,
    queue: IntGaugeVec,
    oldest: IntGauge,
    token_expiry: IntGaugeVec,
    /// No labels; absent when the figures cannot be read (never a 0 that would look like a full disk).
    free_bytes: IntGaugeVec,
    free_files: IntGaugeVec,
    pub alerts: IntCounterVec,
    pub alerts_dropped: IntCounter,
    pub bounces: IntCounter,
    recipients_refused: IntCounterVec,
    login_refusals: IntCounterVec,
    /// The accounts whose series exist ([`Metrics::know_accounts`], [`Metrics::forget_accounts`]).
    accounts: RwLock<HashSet<String>>,
}

/// The process's metrics (see [`events`](crate::events) for why they are process-wide).
pub fn global() -> &'static Metrics {
    static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);
    &METRICS
}

impl Metrics {
    fn new() -> Metrics {
        let registry = Registry::new();
        // The definitions are constants (names, labels, buckets), checked by a unit test: they cannot fail here.
        fn reg<M: prometheus::core::Collector + Clone + 'static>(r: &Registry, m: M) -> M {
            r.register(Box::new(m.clone()))
                .expect("metric definitions are valid");
            m
        }
        let hist = |name: &str, help: &str, buckets: &[f64]| {
            Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))
                .expect("histogram definition is valid")
        };
        let counters = |name: &str, help: &str, labels: &[&str]| {
            IntCounterVec::new(Opts::new(name, help), labels).expect("counter definition is valid")
        };
        let gauges = |name: &str, help: &str, labels: &[&str]| {
            IntGaugeVec::new(Opts::new(name, help), labels).expect("gauge definition is valid")
        };
        let counter = |name: &str, help: &str| {
            IntCounter::new(name, help).expect("counter definition is valid")
        };
        Metrics {
            accepted: reg(
                &registry,
                counter(
                    "relay_messages_accepted_total",
                    "Messages queued (the client heard 250).",
                ),
            ),
            accept_latency: reg(
                &registry,
                hist(
                    "relay_accept_latency_seconds",
                    "From a message's final dot to its 250: writing it durably.",
                    ACCEPT_BUCKETS,
                ),
            ),
            deliveries: reg(
                &registry,
                counters(
                    "relay_deliveries_total",
                    "Delivery attempts by result (delivered, deferred, dead) and account.",
                    &["result", "account"],
                ),
            ),
            delivery_latency: reg(
                &registry,
                hist(
                    "relay_delivery_latency_seconds",
                    "From a message's arrival to its delivery upstream.",
                    DELIVERY_BUCKETS,
                ),
            ),
            refreshes: reg(
                &registry,
                counters(
                    "relay_token_refreshes_total",
                    "Access tokens obtained, per account.",
                    &["account"],
                ),
            ),
            refresh_failures: reg(
                &registry,
                counters(
                    "relay_token_refresh_failures_total",
                    "Token refreshes that failed (authorization_needed included), per account.",
                    &["account"],
                ),
            ),
            queue: reg(
                &registry,
                gauges(
                    "relay_queue_messages",
                    "Messages by state: queued (not yet tried, or held by a sending limit), deferred (after a failed attempt), dead, quarantined.",
                    &["state"],
                ),
            ),
            oldest: reg(
                &registry,
                IntGauge::new(
                    "relay_queue_oldest_age_seconds",
                    "Age of the oldest queued message (0 when the queue is empty).",
                )
                .expect("gauge definition is valid"),
            ),
            token_expiry: reg(
                &registry,
                gauges(
                    "relay_token_expiry_seconds",
                    "Seconds until the account's access token expires (negative once expired); absent before its first token.",
                    &["account"],
                ),
            ),
            free_bytes: reg(
                &registry,
                gauges(
                    "relay_state_dir_free_bytes",
                    "Free space on the state dir's filesystem (blocks reserved for root not counted); under [queue] min_free_space, new mail is refused with 452.",
                    &[],
                ),
            ),
            free_files: reg(
                &registry,
                gauges(
                    "relay_state_dir_free_inodes",
                    "Free inodes on the state dir's filesystem; absent where it has no fixed number.",
                    &[],
                ),
            ),
            alerts: reg(
                &registry,
                counters(
                    "relay_alerts_total",
                    "Alert notices by channel (webhook, mail) and result (sent, failed).",
                    &["channel", "result"],
                ),
            ),
            alerts_dropped: reg(
                &registry,
                counter(
                    "relay_alerts_dropped_total",
                    "Alert notices dropped because the sender was too far behind.",
                ),
            ),
            bounces: reg(
                &registry,
                counter(
                    "relay_bounces_total",
                    "Delivery status notifications queued to senders (bounce = \"sender\").",
                ),
            ),
            recipients_refused: reg(
                &registry,
                counters(
                    "relay_recipients_refused_total",
                    "Recipients the upstream refused for good while it took the message for the others.",
                    &["account"],
                ),
            ),
            login_refusals: reg(
                &registry,
                counters(
                    "relay_upstream_login_refusals_total",
                    "Times the upstream refused an account's freshly fetched token (its mail then waits), per account.",
                    &["account"],
                ),
            ),
            accounts: RwLock::new(HashSet::new()),
            registry,
        }
    }

    pub fn record(&self, event: &Event<'_>) {
        // Not counted per account: an account no longer configured, whose series a reload removed. Held until the
        // count is made: a reload removing the account in between would bring its series back.
        let known = self.accounts.read().unwrap_or_else(|p| p.into_inner());
        let gone = |account: Option<&str>| account.is_some_and(|a| !known.contains(a));
        let account = match *event {
            Event::Accepted { .. } | Event::Quarantined { .. } => None,
            Event::Delivered { account, .. }
            | Event::PartlyDelivered { account, .. }
            | Event::RecipientsRefused { account, .. }
            | Event::TokenRefreshed { account }
            | Event::TokenRefreshFailed { account, .. }
            | Event::AuthorizationNeeded { account, .. }
            | Event::LoginRefused { account, .. } => Some(account),
            Event::Deferred { account, .. } | Event::Dead { account, .. } => account,
        };
        if gone(account) {
            if let Event::Delivered { id, .. } = *event {
                self.observe_delivery(id);
            }
            return;
        }
        match *event {
            Event::Accepted { latency } => {
                self.accepted.inc();
                self.accept_latency.observe(latency.as_secs_f64());
            }
            Event::Delivered { id, account } => {
                self.deliveries
                    .with_label_values(&["delivered", account])
                    .inc();
                self.observe_delivery(id);
            }
            // Counted once the message is delivered to all (or dead); quarantined files by the census.
            Event::PartlyDelivered { .. } | Event::Quarantined { .. } => {}
            Event::Deferred { account, .. } => self
                .deliveries
                .with_label_values(&["deferred", account.unwrap_or("")])
                .inc(),
            Event::Dead { account, .. } => self
                .deliveries
                .with_label_values(&["dead", account.unwrap_or("")])
                .inc(),
            // The message itself is counted by its own outcome (delivered or deferred).
            Event::RecipientsRefused {
                account, refused, ..
            } => self
                .recipients_refused
                .with_label_values(&[account])
                .inc_by(refused.len() as u64),
            Event::TokenRefreshed { account } => {
                self.refreshes.with_label_values(&[account]).inc();
            }
            Event::TokenRefreshFailed { account, .. }
            | Event::AuthorizationNeeded { account, .. } => {
                self.refresh_failures.with_label_values(&[account]).inc();
            }
            Event::LoginRefused { account, .. } => {
                self.login_refusals.with_label_values(&[account]).inc();
            }
        }
    }

    fn observe_delivery(&self, id: crate::queue::QueueId) {
        let waited = SystemTime::now()
            .duration_since(id.created_at())
            .unwrap_or_default();
        self.delivery_latency.observe(waited.as_secs_f64());
    }

    /// Makes every series of the configured accounts exist from the start, at zero: a rate over a series that
    /// appears only with its first failure misses that failure. At a reload, the accounts it added.
    pub fn know_accounts(&self, accounts: &[String]) {
        let mut known = self.accounts.write().unwrap_or_else(|p| p.into_inner());
        for a in accounts {
            known.insert(a.clone());
            for result in ["delivered", "deferred", "dead"] {
                self.deliveries.with_label_values(&[result, a]);
            }
            self.refreshes.with_label_values(&[a]);
            self.refresh_failures.with_label_values(&[a]);
            self.recipients_refused.with_label_values(&[a]);
            self.login_refusals.with_label_values(&[a]);
        }
        for channel in ["webhook", "mail"] {
            for result in ["sent", "failed"] {
                self.alerts.with_label_values(&[channel, result]);
            }
        }
    }

    /// Removes the series of accounts a reload removed: a scrape no longer shows them, and memory holds only the
    /// configured accounts' series however many reloads come and go.
    pub fn forget_accounts(&self, accounts: &[String]) {
        let mut known = self.accounts.write().unwrap_or_else(|p| p.into_inner());
        for a in accounts {
            known.remove(a);
            for result in ["delivered", "deferred", "dead"] {
                let _ = self.deliveries.remove_label_values(&[result, a]);
            }
            let _ = self.refreshes.remove_label_values(&[a]);
            let _ = self.refresh_failures.remove_label_values(&[a]);
            let _ = self.recipients_refused.remove_label_values(&[a]);
            let _ = self.login_refusals.remove_label_values(&[a]);
        }
    }

    fn render(&self, snapshot: &Snapshot) -> String {
        let c = &snapshot.census;
        for (state, n) in [
            ("queued", c.queued),
            ("deferred", c.deferred),
            ("dead", c.dead),
            ("quarantined", c.quarantined),
        ] {
            self.queue
                .with_label_values(&[state])
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        self.oldest
            .set(c.oldest_age().map_or(0, |d| d.as_secs() as i64));
        self.token_expiry.reset();
        let now = SystemTime::now();
        for (account, expires) in &snapshot.tokens {
            let secs = match expires.duration_since(now) {
                Ok(left) => left.as_secs() as i64,
                Err(past) => -(past.duration().as_secs() as i64),
            };
            self.token_expiry.with_label_values(&[account]).set(secs);
        }
        self.free_bytes.reset();
        self.free_files.reset();
        if let Some(free) = snapshot.free {
            let gauge = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
            self.free_bytes
                .with_label_values(&[] as &[&str])
                .set(gauge(free.bytes));
            if let Some(files) = free.files {
                self.free_files
                    .with_label_values(&[] as &[&str])
                    .set(gauge(files));
            }
        }
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::warn!(error = %e, "cannot encode the metrics");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

/// The queue's counts, from file names.
#[derive(Debug, Clone, Default)]
pub struct Census {
    /// In `queue/`, without a failed attempt.
    pub queued: u64,
    /// In `queue/`, with a failed attempt (an `ID.state` beside it).
    pub deferred: u64,
    pub dead: u64,
    pub quarantined: u64,
    /// When the oldest message in `queue/` arrived.
    pub oldest: Option<SystemTime>,
}

impl Census {
    pub fn oldest_age(&self) -> Option<Duration> {
        self.oldest
            .map(|t| SystemTime::now().duration_since(t).unwrap_or_default())
    }

    /// Reads the queue directories' names (memory does not grow with them); a missing one is empty.
    pub fn take(paths: &SpoolPaths) -> Census {
        let queue = crate::queue::layout::count_queue(&paths.queue).unwrap_or_default();
        let count = |dir: &Path| crate::queue::layout::count_messages(dir).unwrap_or(0);
        Census {
            queued: queue.messages - queue.with_state,
            deferred: queue.with_state,
            dead: count(&paths.dead),
            quarantined: count(&paths.quarantine),
            oldest: queue.oldest.map(|id| id.created_at()),
        }
    }
}

/// What scrapes (and the alerts' queue-age check) read from the state dir, and when it was read.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub census: Census,
    /// Each configured account that has tokens: when its access token expires.
    pub tokens: Vec<(String, SystemTime)>,
    /// The state dir's filesystem, when its figures could be read.
    pub free: Option<crate::queue::room::Free>,
}

/// Reads the state dir at most once per [`SNAPSHOT_TTL`], whoever asks.
pub struct StateReader {
    state_dir: PathBuf,
    /// With the key when token files are sealed.
    tokens: crate::tokens::TokenStore,
    /// The configured accounts, replaced at a reload. Locked after `last`, never before.
    accounts: Mutex<Vec<String>>,
    last: Mutex<Option<(Instant, Arc<Snapshot>)>>,
}

impl StateReader {
    pub fn new(
        state_dir: &Path,
        tokens: crate::tokens::TokenStore,
        accounts: Vec<String>,
    ) -> StateReader {
        StateReader {
            state_dir: state_dir.to_path_buf(),
            tokens,
            accounts: Mutex::new(accounts),
            last: Mutex::new(None),
        }
    }

    /// Reads the tokens of `accounts` from now on (a reload); the next scrape reads the disk again, so that it
    /// shows the new accounts and not the removed ones.
    pub fn follow(&self, accounts: Vec<String>) {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        *self.accounts.lock().unwrap_or_else(|p| p.into_inner()) = accounts;
        *last = None;
    }

    /// The latest snapshot; reads the disk (on the blocking pool) when the last one is too old.
    pub async fn snapshot(self: &Arc<Self>) -> Arc<Snapshot> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.snapshot_blocking())
            .await
            .unwrap_or_else(|_| {
                Arc::new(Snapshot {
                    census: Census::default(),
                    tokens: Vec::new(),
                    free: None,
                })
            })
    }

    fn snapshot_blocking(&self) -> Arc<Snapshot> {
        // Held while reading, so that scrapes arriving together read the disk once.
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((at, s)) = &*last
            && at.elapsed() < SNAPSHOT_TTL
        {
            return s.clone();
        }
        let store = &self.tokens;
        let accounts = self
            .accounts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let tokens = accounts
            .iter()
            .filter_map(|a| {
                let t = store.load(a).ok().flatten()?;
                Some((a.clone(), t.expires_at))
            })
            .collect();
        let paths = SpoolPaths::new(&self.state_dir);
        let free = std::fs::File::open(&paths.queue)
            .and_then(|dir| crate::queue::room::Free::of(&dir))
            .ok();
        let snapshot = Arc::new(Snapshot {
            census: Census::take(&paths),
            tokens,
            free,
        });
        *last = Some((Instant::now(), snapshot.clone()));
        snapshot
    }
}

/// Binds the metrics address; a non-loopback one is allowed, with a warning.
pub async fn bind(address: SocketAddr) -> std::io::Result<TcpListener> {
    if !address.ip().is_loopback() {
        tracing::warn!(address = %address, "the metrics endpoint listens beyond loopback: whoever reaches it sees account names, queue sizes and token expiry; restrict it with a firewall");
    }
    let listener = TcpListener::bind(address).await?;
    if let Ok(a) = listener.local_addr() {
        tracing::info!(relay_event = "metrics_listening", address = %a, "serving metrics at http://{a}/metrics");
    }
    Ok(listener)
}

/// Serves `GET /metrics` until `stop`.
///
/// A hand-written HTTP/1.1 responder rather than an HTTP server crate: it answers one fixed GET (and HEAD), closes
/// every connection after its response (`Connection: close`), and bounds each request's size, time and the number
/// served at once. Nothing else of HTTP is needed by a Prometheus scraper.
pub async fn serve(
    listener: TcpListener,
    reader: Arc<StateReader>,
    mut stop: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    // The connections still waiting for their request, oldest first, each with what ends it.
    let waiting: Arc<Mutex<Waiting>> = Arc::default();
    let mut next_id = 0u64;
    loop {
        let conn = tokio::select! {
            c = listener.accept() => c,
            _ = stop.wait_for(|s| *s) => return,
        };
        let (stream, _) = match conn {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(error = %e, "metrics accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let permit = match slots.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                // The oldest first; one whose request came meanwhile keeps its place, and the next is asked.
                let mut freed = None;
                while freed.is_none() {
                    let oldest = waiting.lock().ok().and_then(|mut w| w.pop_front());
                    let Some((_, end)) = oldest else {
                        break;
                    };
                    end.notify_one();
                    tokio::select! {
                        p = tokio::time::timeout(EVICTION_WAIT, slots.clone().acquire_owned()) => {
                            freed = p.ok().and_then(Result::ok);
                        }
                        _ = stop.wait_for(|s| *s) => return,
                    }
                }
                match freed {
                    Some(p) => p,
                    None => continue,
                }
            }
        };
        next_id += 1;
        let (id, end) = (next_id, Arc::new(Notify::new()));
        if let Ok(mut w) = waiting.lock() {
            w.push_back((id, end.clone()));
        }
        let (reader, waiting) = (reader.clone(), waiting.clone());
        tokio::spawn(async move {
            let answering = waiting.clone();
            let mut stream = stream;
            let served = async move {
                let head = tokio::select! {
                    h = tokio::time::timeout(REQUEST_TIMEOUT, read_head(&mut stream)) => h,
                    _ = end.notified() => return Ok(()),
                };
                // Its request came: no longer one to evict.
                if let Ok(mut w) = answering.lock() {
                    w.retain(|(i, _)| *i != id);
                }
                respond(stream, head, &reader).await
            };
            let _ = tokio::time::timeout(REQUEST_TIMEOUT * 2, served).await;
            if let Ok(mut w) = waiting.lock() {
                w.retain(|(i, _)| *i != id);
            }
            drop(permit);
        });
    }
}

/// Connections still waiting for their request: an id, and what ends the wait.
type Waiting = VecDeque<(u64, Arc<Notify>)>;

type Head = Result<std::io::Result<Option<String>>, tokio::time::error::Elapsed>;

async fn respond(
    mut stream: TcpStream,
    head: Head,
    reader: &Arc<StateReader>,
) -> std::io::Result<()> {
    let head = match head {
        Ok(Ok(Some(head))) => head,
        Ok(Ok(None)) => {
            return reply(
                &mut stream,
                "400 Bad Request",
                "Content-Type: text/plain",
                b"bad request\n",
                true,
            )
            .await;
        }
        _ => return Ok(()),
    };
    let mut words = head.split_whitespace();
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let with_body = method != "HEAD";
    match (method, path) {
        ("GET" | "HEAD", "/metrics") => {
            let snapshot = reader.snapshot().await;
            let body = global().render(&snapshot);
            reply(
                &mut stream,
                "200 OK",
                "Content-Type: text/plain; version=0.0.4; charset=utf-8",
                body.as_bytes(),
                with_body,
            )
            .await
        }
        ("GET" | "HEAD", _) => {
            reply(
                &mut stream,
                "404 Not Found",
                "Content-Type: text/plain",
                b"see /metrics\n",
                with_body,
            )
            .await
        }
        _ => {
            reply(
                &mut stream,
                "405 Method Not Allowed",
                // RFC 9110 15.5.6: a 405 names the methods the resource takes.
                "Content-Type: text/plain\r\nAllow: GET, HEAD",
                b"GET only\n",
                true,
            )
            .await
        }
    }
}

/// The request's first line, once the whole head has arrived; `None` if it is too long or not HTTP.
async fn read_head(stream: &mut TcpStream) -> std::io::Result<Option<String>> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
        let end =
            memchr::memmem::find(&buf, b"\r\n\r\n").or_else(|| memchr::memmem::find(&buf, b"\n\n"));
        if end.is_some() {
            let line = buf.split(|&b| b == b'\n').next().unwrap_or_default();
            return Ok(std::str::from_utf8(line)
                .ok()
                .filter(|l| {
                    l.trim_end().ends_with("HTTP/1.1") || l.trim_end().ends_with("HTTP/1.0")
                })
                .map(|l| l.trim_end().to_string()));
        }
        if buf.len() > MAX_REQUEST {
            return Ok(None);
        }
    }
}

async fn reply(
    stream: &mut TcpStream,
    status: &str,
    headers: &str,
    body: &[u8],
    with_body: bool,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\n{headers}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    if with_body {
        stream.write_all(body).await?;
    }
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn definitions_are_valid_and_render() {
        let m = global();
        m.know_accounts(&["office".to_string()]);
        m.record(&Event::Accepted {
            latency: Duration::from_millis(3),
        });
        let text = m.render(&Snapshot {
            census: Census {
                queued: 2,
                ..Census::default()
            },
            tokens: vec![(
                "office".into(),
                SystemTime::now() + Duration::from_secs(100),
            )],
            free: Some(crate::queue::room::Free {
                bytes: 5 << 30,
                files: None,
                read_only: false,
            }),
        });
        assert!(
            text.contains("relay_state_dir_free_bytes 5368709120"),
            "{text}"
        );
        assert!(!text.contains("relay_state_dir_free_inodes "), "{text}");
        assert!(
            text.contains("relay_queue_messages{state=\"queued\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("relay_deliveries_total{account=\"office\",result=\"dead\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("relay_accept_latency_seconds_bucket{le=\"0.005\"}"),
            "{text}"
        );
        assert!(
            text.contains("relay_token_expiry_seconds{account=\"office\"} 9"),
            "{text}"
        );
    }

    /// The accounts named by any per-account series, in a rendering.
    fn accounts_shown(text: &str, prefix: &str) -> std::collections::BTreeSet<String> {
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split("account=\"").nth(1)?.split('"').next())
            .filter(|a| a.starts_with(prefix))
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn a_removed_account_loses_its_series_and_late_events_do_not_bring_them_back() {
        // Its own metrics: a render of the process's, beside another test's, would reset its token gauge.
        let m = Metrics::new();
        let (kept, gone) = ("follow-kept".to_string(), "follow-gone".to_string());
        m.know_accounts(&[kept.clone(), gone.clone()]);
        m.record(&Event::Delivered {
            id: crate::queue::QueueId::new(),
            account: &gone,
        });
        let empty = Snapshot {
            census: Census::default(),
            tokens: Vec::new(),
            free: None,
        };
        let text = m.render(&empty);
        assert!(
            text.contains("relay_deliveries_total{account=\"follow-gone\",result=\"delivered\"} 1"),
            "{text}"
        );
        m.forget_accounts(std::slice::from_ref(&gone));
        // An attempt that began before the reload ends after it.
        m.record(&Event::Delivered {
            id: crate::queue::QueueId::new(),
            account: &gone,
        });
        m.record(&Event::TokenRefreshFailed {
            account: &gone,
            why: "late",
        });
        let text = m.render(&empty);
        assert_eq!(
            accounts_shown(&text, "follow-"),
            [kept].into_iter().collect(),
            "{text}"
        );
    }

    #[test]
    fn reloads_that_come_and_go_leave_only_the_configured_accounts_series() {
        let m = Metrics::new();
        let mut last = String::new();
        for i in 0..200 {
            let name = format!("churn-{i}");
            m.know_accounts(std::slice::from_ref(&name));
            m.record(&Event::TokenRefreshed { account: &name });
            if !last.is_empty() {
                m.forget_accounts(&[last]);
            }
            last = name;
        }
        let text = m.render(&Snapshot {
            census: Census::default(),
            tokens: Vec::new(),
            free: None,
        });
        assert_eq!(
            accounts_shown(&text, "churn-"),
            [last].into_iter().collect(),
            "{text}"
        );
    }

    #[test]
    fn census_counts_file_names() {
        let dir = tempfile::tempdir().unwrap();
        let paths = SpoolPaths::new(dir.path());
        for d in [&paths.queue, &paths.dead, &paths.quarantine] {
            std::fs::create_dir_all(d).unwrap();
        }
        let (a, b) = (crate::queue::QueueId::new(), crate::queue::QueueId::new());
        let touch = |p: PathBuf| std::fs::write(p, b"").unwrap();
        touch(paths.queue.join(format!("{a}.msg")));
        touch(paths.queue.join(format!("{b}.msg")));
        touch(paths.queue.join(format!("{b}.state")));
        // A state file whose message is gone is not a message.
        touch(
            paths
                .queue
                .join(format!("{}.state", crate::queue::QueueId::new())),
        );
        touch(
            paths
                .dead
                .join(format!("{}.msg", crate::queue::QueueId::new())),
        );
        touch(paths.queue.join(".tmp-file"));
        let c = Census::take(&paths);
        assert_eq!((c.queued, c.deferred, c.dead, c.quarantined), (1, 1, 1, 0));
        assert_eq!(c.oldest, Some(a.created_at()));
    }
}
