//! SIGKILL under load: nothing acknowledged is ever lost.
//!
//! The real binary (`relay serve`) takes mail from several concurrent clients (some with hostile but valid
//! envelopes) and delivers it to a recording XOAUTH2 upstream in this process, while the test kills it with
//! SIGKILL at seeded random moments and starts it again on the same state dir. A client counts a message as
//! acknowledged only once it has read the `250` to its final dot. At the end every acknowledged message must
//! have reached the upstream, intact and with its envelope; duplicates (upstream accepted it, relay was killed
//! before removing it from the queue) are allowed and counted.
//!
//! `RELAY_CRASH_SEED` replays a run's kill schedule and client choices (timing differs from run to run);
//! `RELAY_CRASH_KILLS` changes the number of kills (default 30).

mod common;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::upstream::{FakeUpstream, Received};
use common::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, oneshot, watch};

const DEFAULT_SEED: u64 = 0x5EED_C0DE_2025;
const DEFAULT_KILLS: usize = 30;
/// Client tasks, one per [`Class`].
const CLASSES: [Class; 6] = [
    Class::Plain,
    Class::ZeroHelo,
    Class::LongHelo,
    Class::Atext,
    Class::LongLocal,
    Class::Quoted,
];
/// One client read or write; a relay that stops answering for this long is reported, not waited for.
const OP_LIMIT: Duration = Duration::from_secs(10);
/// The whole backlog's delivery after the last restart.
const DRAIN_LIMIT: Duration = Duration::from_secs(90);
/// Acknowledged but not yet delivered messages at which clients hold back. Relay accepts mail an order of
/// magnitude faster than it delivers it (about 120/s here, see the report); without this the backlog would grow
/// by thousands per second and its final delivery would not fit in CI's time. The queue stays non-empty, so
/// kills still land in the middle of deliveries.
const MAX_BACKLOG: u64 = 300;
/// How long a client holds back at most before it sends anyway (relay may be down, delivering nothing).
const BACKLOG_WAIT: Duration = Duration::from_secs(2);
const TOKEN: &str = "crash-access-token";

/// What a client sends: each class is one client task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Class {
    /// An ordinary device; every 25th message is large enough to spill to its file while arriving.
    Plain,
    /// `EHLO` with 80 zeros, braces in the addresses.
    ZeroHelo,
    /// A 255-character EHLO (or HELO), two recipients.
    LongHelo,
    /// Every atext special in the local part.
    Atext,
    /// Local parts of 80 to 100 zeros (over RFC 5321's 64 octets).
    LongLocal,
    /// Quoted local parts with quotes, backslashes and spaces.
    Quoted,
}

impl Class {
    fn hello(self, rng: &mut StdRng) -> String {
        match self {
            Class::Plain => "EHLO device.lan".into(),
            Class::ZeroHelo | Class::LongLocal => format!("EHLO {}", "0".repeat(80)),
            Class::LongHelo => {
                let host = ["a", "b", "c", "d"].map(|c| c.repeat(63)).join(".");
                assert_eq!(host.len(), 255);
                let verb = if rng.random_bool(0.3) { "HELO" } else { "EHLO" };
                format!("{verb} {host}")
            }
            Class::Atext => "EHLO printer-3f.office.lan".into(),
            Class::Quoted => "EHLO [127.0.0.1]".into(),
        }
    }

    /// (sender, recipients, large body) of a message.
    fn envelope(self, rng: &mut StdRng, id: u64) -> (String, Vec<String>, bool) {
        let one = |s: &str| vec![s.to_string()];
        match self {
            Class::Plain => {
                let to = if rng.random_bool(0.2) {
                    vec!["ops@example.com".into(), "backup@example.org".into()]
                } else {
                    one("ops@example.com")
                };
                ("scanner@example.com".into(), to, id.is_multiple_of(25))
            }
            Class::ZeroHelo => ("{x}@example.com".into(), one("{x}.{y}@example.com"), false),
            Class::LongHelo => (
                "alerts@device.example.com".into(),
                vec!["ops@example.com".into(), "{ops}@example.com".into()],
                false,
            ),
            Class::Atext => (
                "a!#$%&'*+-/=?^_`{|}~.z@example.com".into(),
                one("o'brien+tag@example.com"),
                false,
            ),
            Class::LongLocal => {
                if rng.random_bool(0.5) {
                    (
                        format!("{}@example.com", "0".repeat(80)),
                        one("ops@example.com"),
                        false,
                    )
                } else {
                    let n = rng.random_range(80..=100);
                    (
                        "scanner@example.com".into(),
                        one(&format!("{}@example.com", "0".repeat(n))),
                        false,
                    )
                }
            }
            Class::Quoted => match rng.random_range(0..3) {
                0 => (
                    r#""a\"b\\c"@example.com"#.into(),
                    one("ops@example.com"),
                    false,
                ),
                1 => (
                    "scanner@example.com".into(),
                    one(r#""john smith"@example.com"#),
                    false,
                ),
                _ => (
                    r#""x\\y"@example.com"#.into(),
                    one(r#""{q\"}"@example.com"#),
                    false,
                ),
            },
        }
    }
}

/// The message of `id` as the upstream must receive it (after relay's `Received:` line).
fn body_for(id: u64, big: bool) -> Vec<u8> {
    let mut b = format!(
        "From: device@example.com\r\nTo: ops@example.com\r\nSubject: crash test {id}\r\nX-Crash-Id: {id}\r\n\r\nfirst line\r\n.a line that starts with a dot\r\n"
    )
    .into_bytes();
    if big {
        for i in 0..2_000 {
            b.extend_from_slice(format!("{i:05} {}\r\n", "x".repeat(72)).as_bytes());
        }
    }
    b.extend_from_slice(format!("end of {id}\r\n").as_bytes());
    b
}

/// The message as a client sends it in DATA: dot-stuffed (RFC 5321 section 4.5.2), then the final dot.
fn wire(body: &[u8]) -> Vec<u8> {
    let mut out = dot_stuffed(body);
    out.extend_from_slice(b".\r\n");
    out
}

/// The `X-Crash-Id` of a message as stored or delivered.
fn crash_id(data: &[u8]) -> Option<u64> {
    let key = b"\r\nX-Crash-Id: ";
    let at = data.windows(key.len()).position(|w| w == key)? + key.len();
    let digits: Vec<u8> = data[at..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .copied()
        .collect();
    std::str::from_utf8(&digits).ok()?.parse().ok()
}

/// What was sent under an id.
#[derive(Debug, Clone)]
struct Sent {
    class: Class,
    from: String,
    to: Vec<String>,
    big: bool,
}

/// What the clients did.
#[derive(Default)]
struct Ledger {
    next_id: AtomicU64,
    sent: Mutex<HashMap<u64, Sent>>,
    /// Acknowledged ids, with the queue id from the 250.
    acked: Mutex<HashMap<u64, String>>,
    /// Replies other than the expected ones, by command, code and class.
    refused: Mutex<BTreeMap<String, usize>>,
    /// Acknowledged messages (the upstream should receive every one).
    acked_deliverable: AtomicU64,
    conn_errors: AtomicU64,
    timeouts: AtomicU64,
    connections: AtomicU64,
}

impl Ledger {
    fn refuse(&self, what: &str, code: u16, class: Class) {
        *self
            .refused
            .lock()
            .unwrap()
            .entry(format!("{what} {code} ({class:?})"))
            .or_default() += 1;
    }
}

enum Fail {
    Io,
    Timeout,
}

async fn timed<T>(f: impl Future<Output = std::io::Result<T>>) -> Result<T, Fail> {
    match tokio::time::timeout(OP_LIMIT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(_)) => Err(Fail::Io),
        Err(_) => Err(Fail::Timeout),
    }
}

struct Conn {
    s: BufReader<TcpStream>,
}

impl Conn {
    async fn send(&mut self, bytes: &[u8]) -> Result<(), Fail> {
        timed(self.s.get_mut().write_all(bytes)).await
    }

    /// One reply (multi-line replies read to their last line): its code and text.
    async fn reply(&mut self) -> Result<(u16, String), Fail> {
        let mut text = String::new();
        loop {
            let mut line = String::new();
            if timed(self.s.read_line(&mut line)).await? == 0 {
                return Err(Fail::Io);
            }
            text.push_str(&line);
            if line.len() < 4 || line.as_bytes()[3] == b' ' {
                let code = text.get(..3).and_then(|c| c.parse().ok()).ok_or(Fail::Io)?;
                return Ok((code, text));
            }
        }
    }

    async fn cmd(&mut self, line: &str) -> Result<u16, Fail> {
        self.send(format!("{line}\r\n").as_bytes()).await?;
        Ok(self.reply().await?.0)
    }
}

/// One client: connections of one to six messages each, until `stop`.
async fn client(
    class: Class,
    seed: u64,
    ledger: Arc<Ledger>,
    mut addr: watch::Receiver<Option<SocketAddr>>,
    stop: watch::Receiver<bool>,
    mut delivered: watch::Receiver<u64>,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    while !*stop.borrow() {
        let current = *addr.borrow_and_update();
        let result = match current {
            Some(a) => session(class, a, &mut rng, &ledger, &stop, &mut delivered).await,
            None => Err(Fail::Io),
        };
        match result {
            Ok(()) => {}
            Err(fail) => {
                match fail {
                    Fail::Io => ledger.conn_errors.fetch_add(1, Ordering::Relaxed),
                    Fail::Timeout => ledger.timeouts.fetch_add(1, Ordering::Relaxed),
                };
                // Relay is down (killed): wait for the next one to listen, but not for ever.
                let _ = tokio::time::timeout(Duration::from_millis(250), addr.changed()).await;
            }
        }
    }
}

async fn session(
    class: Class,
    addr: SocketAddr,
    rng: &mut StdRng,
    ledger: &Ledger,
    stop: &watch::Receiver<bool>,
    delivered: &mut watch::Receiver<u64>,
) -> Result<(), Fail> {
    let tcp = timed(TcpStream::connect(addr)).await?;
    ledger.connections.fetch_add(1, Ordering::Relaxed);
    let mut c = Conn {
        s: BufReader::new(tcp),
    };
    let (code, _) = c.reply().await?;
    if code != 220 {
        ledger.refuse("greeting", code, class);
        return Ok(());
    }
    let code = c.cmd(&class.hello(rng)).await?;
    if code != 250 {
        ledger.refuse("EHLO", code, class);
        return Ok(());
    }
    'messages: for _ in 0..rng.random_range(1..=6) {
        if *stop.borrow() {
            break;
        }
        // Pacing, not synchronisation: hold back (bounded) while the backlog is large.
        let floor = ledger
            .acked_deliverable
            .load(Ordering::Relaxed)
            .saturating_sub(MAX_BACKLOG);
        let _ = tokio::time::timeout(BACKLOG_WAIT, delivered.wait_for(|d| *d >= floor)).await;
        let id = ledger.next_id.fetch_add(1, Ordering::Relaxed);
        let (from, to, big) = class.envelope(rng, id);
        ledger.sent.lock().unwrap().insert(
            id,
            Sent {
                class,
                from: from.clone(),
                to: to.clone(),
                big,
            },
        );
        let code = c.cmd(&format!("MAIL FROM:<{from}>")).await?;
        if code != 250 {
            ledger.refuse("MAIL", code, class);
            c.cmd("RSET").await?;
            continue;
        }
        for rcpt in &to {
            let code = c.cmd(&format!("RCPT TO:<{rcpt}>")).await?;
            if code != 250 {
                ledger.refuse("RCPT", code, class);
                c.cmd("RSET").await?;
                continue 'messages;
            }
        }
        let code = c.cmd("DATA").await?;
        if code != 354 {
            ledger.refuse("DATA", code, class);
            c.cmd("RSET").await?;
            continue;
        }
        c.send(&wire(&body_for(id, big))).await?;
        let (code, text) = c.reply().await?;
        if code == 250 {
            let queue_id = text.trim_end().rsplit(' ').next().unwrap_or("").to_string();
            ledger.acked.lock().unwrap().insert(id, queue_id);
            ledger.acked_deliverable.fetch_add(1, Ordering::Relaxed);
        } else {
            ledger.refuse("final dot", code, class);
        }
    }
    let _ = c.cmd("QUIT").await;
    Ok(())
}

/// What reached the upstream.
#[derive(Default)]
struct Tally {
    /// Deliveries per id.
    count: HashMap<u64, u32>,
    /// When the upstream accepted each delivery of an id.
    times: HashMap<u64, Vec<std::time::SystemTime>>,
    /// Deliveries that do not match what was sent (bytes or envelope).
    bad: Vec<String>,
}

impl Tally {
    fn take(&mut self, got: Received, sent: &HashMap<u64, Sent>) {
        let Some(id) = crash_id(&got.data) else {
            self.bad.push(format!(
                "a delivery without X-Crash-Id: {:?}",
                String::from_utf8_lossy(&got.data[..got.data.len().min(300)])
            ));
            return;
        };
        *self.count.entry(id).or_default() += 1;
        self.times.entry(id).or_default().push(got.at);
        let Some(s) = sent.get(&id) else {
            self.bad.push(format!("id {id} delivered but never sent"));
            return;
        };
        if !got.auth.contains(TOKEN) {
            self.bad
                .push(format!("id {id}: unexpected AUTH {:?}", got.auth));
        }
        let expected = body_for(id, s.big);
        // Relay's Received line (three lines), then exactly what the client sent.
        let ok_bytes = got.data.starts_with(b"Received: from ")
            && got.data.ends_with(&expected)
            && got.data[..got.data.len() - expected.len()]
                .iter()
                .filter(|&&b| b == b'\n')
                .count()
                == 3;
        if !ok_bytes {
            self.bad.push(format!(
                "id {id} ({:?}): bytes differ from what was sent",
                s.class
            ));
        }
        // Quoted local parts arrive quoted as they were sent (none of the test's holds a '>', which the fake
        // upstream's naive reading would cut at).
        if got.from != s.from || got.to != s.to {
            self.bad.push(format!(
                "id {id} ({:?}): envelope {:?} -> {:?}, sent {:?} -> {:?}",
                s.class, got.from, got.to, s.from, s.to
            ));
        }
    }
}

/// What the daemons logged, over all runs.
#[derive(Default)]
struct DaemonLog {
    events: Mutex<BTreeMap<String, usize>>,
    /// "delivered" lines per queue id: twice means a kill landed between the line and the file's removal
    /// (other duplicates come from before the line: relay sent the final dot but had not yet read the 250).
    delivered: Mutex<HashMap<String, u32>>,
    /// WARN and ERROR lines (and panics), the first 20.
    notable: Mutex<Vec<String>>,
}

struct Daemon {
    child: Child,
    addr: SocketAddr,
    /// Resolves once relay's stderr has closed and its log is written.
    log_task: oneshot::Receiver<()>,
}

impl Daemon {
    /// Starts `relay serve` and waits (bounded) for its "listening" log line.
    async fn start(config: &Path, log_file: &Path, log: Arc<DaemonLog>, run: usize) -> Daemon {
        let mut child = Command::new(relay_bin())
            .args(["serve", "--config"])
            .arg(config)
            .env_remove("JOURNAL_STREAM")
            .env_remove("NOTIFY_SOCKET")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("relay binary starts");
        let stderr = child.stderr.take().expect("stderr piped");
        let (ready, listening) = oneshot::channel();
        let log_file = log_file.to_path_buf();
        // A thread of its own, so that relay never waits on a full pipe however busy the test's runtime is: a
        // daemon blocked writing a log line would widen every window that a kill can land in.
        let stderr = std::fs::File::from(stderr.into_owned_fd().expect("stderr fd"));
        let (log_done, log_task) = oneshot::channel();
        std::thread::spawn(move || {
            use std::io::{BufRead, Write};
            let mut file = std::io::BufWriter::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&log_file)
                    .expect("daemon log file"),
            );
            let _ = writeln!(file, "===== run {run} =====");
            let mut ready = Some(ready);
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                let _ = writeln!(file, "{line}");
                let event = line
                    .split("relay_event=\"")
                    .nth(1)
                    .and_then(|r| r.split('"').next());
                if let Some(event) = event {
                    *log.events.lock().unwrap().entry(event.into()).or_default() += 1;
                    if event == "delivered"
                        && let Some(q) = line
                            .split("relay_queue_id=")
                            .nth(1)
                            .and_then(|r| r.split_whitespace().next())
                    {
                        *log.delivered.lock().unwrap().entry(q.into()).or_default() += 1;
                    }
                    if event == "listening"
                        && let Some(tx) = ready.take()
                    {
                        let _ = file.flush();
                        let addr = line
                            .split("address=")
                            .nth(1)
                            .and_then(|r| r.split_whitespace().next())
                            .and_then(|a| a.parse::<SocketAddr>().ok());
                        let _ = tx.send(addr);
                    }
                }
                if line.contains(" WARN ") || line.contains(" ERROR ") || line.contains("panicked")
                {
                    let mut notable = log.notable.lock().unwrap();
                    if notable.len() < 20 {
                        notable.push(format!("run {run}: {line}"));
                    }
                }
            }
            let _ = file.flush();
            let _ = log_done.send(());
        });
        let addr = tokio::time::timeout(LIMIT, listening)
            .await
            .unwrap_or_else(|_| {
                panic!("run {run}: relay did not log \"listening\" within {LIMIT:?}")
            })
            .unwrap_or_else(|_| {
                panic!("run {run}: relay's stderr ended before it listened (see the daemon log)")
            })
            .expect("an address in the listening line");
        Daemon {
            child,
            addr,
            log_task,
        }
    }

    /// SIGKILL after `uptime`, timed on a thread of its own: a kill timed by the test's busy runtime would land
    /// whenever the runtime gets to it, which is not a random moment for relay.
    async fn sigkill_after(mut self, uptime: Duration) -> std::time::SystemTime {
        let pid = self.child.id().expect("relay still running") as i32;
        let killed = tokio::task::spawn_blocking(move || {
            std::thread::sleep(uptime);
            // SAFETY: kill(2) with the pid of our own child, which is reaped only below.
            (
                unsafe { libc::kill(pid, libc::SIGKILL) },
                std::time::SystemTime::now(),
            )
        });
        let killed = tokio::time::timeout(uptime + LIMIT, killed)
            .await
            .expect("SIGKILL sent in time")
            .expect("kill thread");
        assert_eq!(killed.0, 0, "SIGKILL sent");
        let status = tokio::time::timeout(LIMIT, self.child.wait())
            .await
            .expect("relay dies within LIMIT of SIGKILL")
            .expect("wait for relay");
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGKILL),
            "relay ended before it was killed: {status}"
        );
        self.finish_log().await;
        killed.1
    }

    /// SIGTERM; the exit status (bounded).
    async fn sigterm(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().expect("relay still running") as i32;
        // SAFETY: kill(2) with the pid of our own child, which has not been reaped.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0, "SIGTERM sent");
        let status = tokio::time::timeout(LIMIT, self.child.wait())
            .await
            .expect("relay exits within LIMIT of SIGTERM")
            .expect("wait for relay");
        self.finish_log().await;
        status
    }

    async fn finish_log(self) {
        tokio::time::timeout(LIMIT, self.log_task)
            .await
            .expect("relay's stderr closes once it has exited")
            .expect("log reader thread");
    }
}

fn config_text(state: &Path, upstream: SocketAddr) -> String {
    format!(
        r#"state_dir = {state:?}
hostname = "relay.test"
default_account = "office"

[[listener]]
address = "127.0.0.1:0"
auth = "none"
allow = ["127.0.0.0/8"]

[[account]]
name = "office"
provider = "generic"
flow = "device_code"
mailbox = "relay@example.com"
client_id = "cid-crash"
# Nothing listens here: the token file written before the first start is valid for hours, so relay never asks.
token_url = "http://127.0.0.1:9/token"
device_authorization_url = "http://127.0.0.1:9/devicecode"
scope = "https://outlook.office.com/SMTP.Send offline_access"
smtp_host = "127.0.0.1"
smtp_port = {port}
smtp_tls = "none"
# The envelope sender goes upstream as the client gave it, so that the test can compare it.
rewrite_from = "none"

[queue]
retry = ["1s"]
"#,
        port = upstream.port(),
    )
}

/// Names in a state subdirectory, sorted.
fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = match std::fs::read_dir(dir) {
        Ok(e) => e
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => Vec::new(),
    };
    names.sort();
    names
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a valid value")),
        Err(_) => default,
    }
}

/// Tallies what the upstream receives as it arrives, and publishes how many deliverable ids arrived. On `flush`
/// it takes what is already waiting, and ends.
async fn collect(
    mut received: mpsc::UnboundedReceiver<Received>,
    ledger: Arc<Ledger>,
    tally: Arc<Mutex<Tally>>,
    delivered: watch::Sender<u64>,
    mut flush: oneshot::Receiver<()>,
) {
    let take = |got: Received| {
        let sent = ledger.sent.lock().unwrap();
        let mut tally = tally.lock().unwrap();
        let new = crash_id(&got.data).is_some_and(|id| !tally.count.contains_key(&id));
        let deliverable = crash_id(&got.data).is_some_and(|id| sent.contains_key(&id));
        tally.take(got, &sent);
        if new && deliverable {
            delivered.send_modify(|n| *n += 1);
        }
    };
    loop {
        tokio::select! {
            got = received.recv() => match got {
                Some(got) => take(got),
                None => return,
            },
            _ = &mut flush => {
                while let Ok(got) = received.try_recv() {
                    take(got);
                }
                return;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_load_loses_nothing_acknowledged() {
    let started = Instant::now();
    let seed: u64 = env_or("RELAY_CRASH_SEED", DEFAULT_SEED);
    let kills: usize = env_or("RELAY_CRASH_KILLS", DEFAULT_KILLS);
    println!(
        "crash test: seed {seed}, {kills} kills (RELAY_CRASH_SEED / RELAY_CRASH_KILLS to change)"
    );
    let mut rng = StdRng::seed_from_u64(seed);

    let upstream = FakeUpstream::start(&[TOKEN]).await;
    let upstream_addr = upstream.addr;
    let received = upstream.received;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let config = dir.path().join("relay.toml");
    std::fs::write(&config, config_text(&state, upstream_addr)).unwrap();
    write_valid_tokens(&state, "office", TOKEN, Duration::from_secs(4 * 3600));
    let log_file = dir.path().join("daemon.log");
    let log = Arc::new(DaemonLog::default());

    let mut run = 0;
    let mut daemon = Daemon::start(&config, &log_file, log.clone(), run).await;
    let (addr_tx, addr_rx) = watch::channel(Some(daemon.addr));
    let (stop_tx, stop_rx) = watch::channel(false);
    let ledger = Arc::new(Ledger::default());
    let tally = Arc::new(Mutex::new(Tally::default()));
    let (delivered_tx, delivered_rx) = watch::channel(0u64);
    let (flush, flushed) = oneshot::channel();
    let collector = tokio::spawn(collect(
        received,
        ledger.clone(),
        tally.clone(),
        delivered_tx,
        flushed,
    ));
    let clients: Vec<_> = CLASSES
        .iter()
        .enumerate()
        .map(|(i, &class)| {
            tokio::spawn(client(
                class,
                seed.wrapping_add(1 + i as u64),
                ledger.clone(),
                addr_rx.clone(),
                stop_rx.clone(),
                delivered_rx.clone(),
            ))
        })
        .collect();

    let mut kill_times = Vec::new();
    for _ in 0..kills {
        // The experiment: a random uptime, sometimes very short so that start-up (recovery, the first schedule)
        // is cut off too.
        let uptime = if rng.random_bool(1.0 / 6.0) {
            rng.random_range(5..100)
        } else {
            rng.random_range(100..700)
        };
        kill_times.push(daemon.sigkill_after(Duration::from_millis(uptime)).await);
        addr_tx.send_replace(None);
        run += 1;
        daemon = Daemon::start(&config, &log_file, log.clone(), run).await;
        addr_tx.send_replace(Some(daemon.addr));
    }
    let load_time = started.elapsed();

    // Last run: stop the load, then wait until the queue is empty and every acknowledged message arrived.
    stop_tx.send_replace(true);
    for c in clients {
        tokio::time::timeout(LIMIT + OP_LIMIT, c)
            .await
            .expect("clients stop within LIMIT")
            .expect("client task");
    }
    let acked: HashMap<u64, String> = ledger.acked.lock().unwrap().clone();
    let sent: HashMap<u64, Sent> = ledger.sent.lock().unwrap().clone();
    let queue = state.join("queue");
    let deadline = Instant::now() + DRAIN_LIMIT;
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    loop {
        let queued = names_in(&queue)
            .iter()
            .filter(|n| n.ends_with(".msg"))
            .count();
        let missing = {
            let tally = tally.lock().unwrap();
            acked
                .keys()
                .filter(|id| !tally.count.contains_key(id))
                .count()
        };
        if queued == 0 && missing == 0 {
            break;
        }
        if Instant::now() > deadline {
            let kept = dir.keep();
            panic!(
                "after {DRAIN_LIMIT:?}: {queued} messages still queued, {missing} acknowledged messages not delivered; state and daemon log kept in {}",
                kept.display()
            );
        }
        tick.tick().await;
    }
    let status = daemon.sigterm().await;
    let _ = flush.send(());
    tokio::time::timeout(LIMIT, collector)
        .await
        .expect("collector done in time")
        .expect("collector");
    let tally = std::mem::take(&mut *tally.lock().unwrap());

    // The figures.
    let delivered = tally.count.len();
    let duplicates = tally.count.values().filter(|&&n| n > 1).count();
    let unacked_delivered = tally
        .count
        .keys()
        .filter(|id| !acked.contains_key(id))
        .count();
    let dead = state.join("dead");
    let mut dead_ids: HashMap<u64, String> = HashMap::new();
    let mut dead_other = Vec::new();
    // atomic-write-file's temporary files of a `dead/ID.state` cut off by a kill: removed at start-up.
    let mut dead_temp = Vec::new();
    for name in names_in(&dead) {
        let path = dead.join(&name);
        if let Some(stem) = name.strip_suffix(".msg") {
            let reason = std::fs::read_to_string(dead.join(format!("{stem}.state")))
                .unwrap_or_else(|e| format!("(no state file: {e})"));
            match crash_id(&std::fs::read(&path).unwrap()) {
                Some(id) => {
                    dead_ids.insert(id, reason);
                }
                None => dead_other.push(name),
            }
        } else if name.starts_with('.') && name.contains(".state.") {
            dead_temp.push(name);
        } else if !(name.ends_with(".state") && dead.join(name.replace(".state", ".msg")).exists())
        {
            dead_other.push(name);
        }
    }
    let mut lost = Vec::new();
    for (id, queue_id) in &acked {
        if !tally.count.contains_key(id) {
            lost.push(format!("{id} ({:?}, queue id {queue_id})", sent[id].class));
        }
    }
    let unexpected_dead: Vec<String> = dead_ids
        .iter()
        .map(|(id, reason)| format!("{id}: {}", reason.replace('\n', " ")))
        .collect();
    let mut acked_by_class: BTreeMap<Class, usize> = BTreeMap::new();
    for id in acked.keys() {
        *acked_by_class.entry(sent[id].class).or_default() += 1;
    }

    println!(
        "crash test: seed {seed}, kills {kills}, acknowledged {}, delivered {delivered}, lost {}, duplicates {duplicates}, unacknowledged-but-delivered {unacked_delivered}",
        acked.len(),
        lost.len()
    );
    println!(
        "crash test: sent {}, connections {}, client connection errors {}, client timeouts {}, load {:.1}s, total {:.1}s",
        sent.len(),
        ledger.connections.load(Ordering::Relaxed),
        ledger.conn_errors.load(Ordering::Relaxed),
        ledger.timeouts.load(Ordering::Relaxed),
        load_time.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    println!("crash test: acknowledged by class {acked_by_class:?}");
    let mut dups: Vec<String> = tally
        .count
        .iter()
        .filter(|&(_, &n)| n > 1)
        .map(|(id, n)| {
            format!(
                "{id} x{n} ({})",
                acked.get(id).map_or("unacknowledged", |q| q.as_str())
            )
        })
        .collect();
    dups.sort();
    dups.truncate(10);
    let mut gaps: Vec<i128> = tally
        .times
        .values()
        .filter(|t| t.len() > 1)
        .filter_map(|t| {
            kill_times
                .iter()
                .map(|k| match t[0].duration_since(*k) {
                    Ok(d) => d.as_micros() as i128,
                    Err(e) => -(e.duration().as_micros() as i128),
                })
                .min_by_key(|g| g.abs())
        })
        .collect();
    gaps.sort();
    let after = gaps.iter().filter(|&&g| g >= 0).count();
    println!(
        "crash test: duplicates first accepted upstream just after a kill (relay had sent the final dot, then died): {after}; just before one: {} (at most {} us before); first 10: {dups:?}",
        gaps.len() - after,
        gaps.first().map_or(0, |g| g.min(&0).unsigned_abs())
    );
    let logged_twice = log
        .delivered
        .lock()
        .unwrap()
        .values()
        .filter(|&&n| n > 1)
        .count();
    println!(
        "crash test: queue ids relay logged as delivered more than once (killed between that line and the file's removal): {logged_twice}"
    );
    println!("crash test: refusals {:?}", ledger.refused.lock().unwrap());
    println!("crash test: relay events {:?}", log.events.lock().unwrap());
    for line in log.notable.lock().unwrap().iter() {
        println!("crash test: relay said: {line}");
    }

    let leftovers = names_in(&queue);
    let quarantined = names_in(&state.join("quarantine"));
    let failed = !lost.is_empty()
        || !tally.bad.is_empty()
        || !leftovers.is_empty()
        || !dead_temp.is_empty()
        || !quarantined.is_empty()
        || !unexpected_dead.is_empty()
        || !dead_other.is_empty()
        || status.code() != Some(0);
    let kept: Option<PathBuf> =
        (failed || std::env::var_os("RELAY_CRASH_KEEP").is_some()).then(|| dir.keep());
    let keep_note = kept
        .as_ref()
        .map(|p| format!(" (state dir and daemon.log kept in {})", p.display()))
        .unwrap_or_default();
    if let Some(p) = &kept {
        println!(
            "crash test: state dir and daemon.log kept in {}",
            p.display()
        );
    }
    assert!(
        lost.is_empty(),
        "{} acknowledged messages never reached the upstream{keep_note}: {:?}",
        lost.len(),
        &lost[..lost.len().min(20)]
    );
    assert!(
        tally.bad.is_empty(),
        "deliveries that differ from what was sent{keep_note}: {:?}",
        &tally.bad[..tally.bad.len().min(20)]
    );
    assert!(
        leftovers.is_empty(),
        "files left in queue/{keep_note}: {leftovers:?}"
    );
    assert!(
        dead_temp.is_empty(),
        "temporary files left in dead/{keep_note}: {dead_temp:?}"
    );
    assert!(
        quarantined.is_empty(),
        "files in quarantine/{keep_note}: {quarantined:?}"
    );
    assert!(
        unexpected_dead.is_empty() && dead_other.is_empty(),
        "unexpected files in dead/{keep_note}: {unexpected_dead:?} {dead_other:?}"
    );
    assert_eq!(
        status.code(),
        Some(0),
        "relay's exit status after SIGTERM{keep_note}"
    );
    // The experiment ran: mail of every deliverable class was acknowledged.
    for class in CLASSES.iter() {
        assert!(
            acked_by_class.get(class).copied().unwrap_or(0) > 0,
            "no {class:?} message was acknowledged: the load did not run"
        );
    }
    assert!(
        acked.len() >= 100,
        "too little load: {} acknowledged",
        acked.len()
    );
}

/// Unusual local parts, shown without any crash: quoted ones (with quotes, backslashes or spaces) and ones over
/// 64 octets are acknowledged, then delivered with the envelope the client gave (once they went to `dead/`,
/// because the upstream client library refused them after the client had heard 250).
#[tokio::test]
async fn unusual_local_parts_reach_the_upstream() {
    let mut upstream = FakeUpstream::start(&[TOKEN]).await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let config = dir.path().join("relay.toml");
    std::fs::write(&config, config_text(&state, upstream.addr)).unwrap();
    write_valid_tokens(&state, "office", TOKEN, Duration::from_secs(3600));
    let daemon = Daemon::start(
        &config,
        &dir.path().join("daemon.log"),
        Arc::new(DaemonLog::default()),
        0,
    )
    .await;
    let cases = [
        (
            format!("{}@example.com", "0".repeat(80)),
            "ops@example.com".to_string(),
        ),
        (
            "a@example.com".into(),
            format!("{}@example.com", "0".repeat(80)),
        ),
        (r#""a\"b\\c"@example.com"#.into(), "ops@example.com".into()),
        ("a@example.com".into(), r#""john smith"@example.com"#.into()),
    ];
    for (i, (from, to)) in cases.iter().enumerate() {
        let mut c = RawClient::ready(daemon.addr).await;
        c.cmd(&format!("MAIL FROM:<{from}>"), 250).await;
        c.cmd(&format!("RCPT TO:<{to}>"), 250).await;
        c.cmd("DATA", 354).await;
        c.send(&wire(&body_for(i as u64, false))).await;
        c.expect(250).await;
        // Delivered with the envelope the client gave (a move to dead/ would leave this wait to time out).
        let got = upstream.next().await;
        assert_eq!((&got.from, &got.to), (from, &vec![to.clone()]));
    }
    assert_eq!(daemon.sigterm().await.code(), Some(0));
    assert!(names_in(&state.join("dead")).is_empty());
}
