//! The parts of `benches/side-by-side.sh` that need a Rust client or the XOAUTH2 sink: each subcommand starts the
//! release binary in a fresh state dir under /var/tmp, measures one thing, and prints `key=value` lines on stdout
//! for the script (progress goes to stderr).
//!
//! - `auth SESSIONS MESSAGES`: the fresh-connection login rate. A listener with `auth = "required"` and one
//!   `[[user]]`, every limit at its default (per-client cap 50, the 2 s delay after a failed login, the per-address
//!   failure ledger). Each message on its own connection, as a device sends it: connect, EHLO, AUTH PLAIN, MAIL,
//!   RCPT, DATA, a 4 KiB message, QUIT, each command waiting for its reply (no pipelining). `SESSIONS` such
//!   clients at once. The password is checked once with argon2, then from relay's cache of successful logins.
//! - `drain MESSAGES SESSIONS LIMIT_S`: the forward rate. Starts the sink (`common/sink.rs`) and measures its own
//!   ceiling first: `smtp-source -s SESSIONS -d -m MESSAGES -l 4096` straight at it (one connection per session,
//!   kept for every message). Then fills a queue with MESSAGES 4 KiB messages through a daemon without an account,
//!   stops it, and starts one whose default account delivers to the sink (XOAUTH2, no TLS, a valid token in the
//!   state dir). The drain rate is counted from the sink's first accepted message to its last; the drain is cut
//!   off after LIMIT_S seconds (then the rate is what arrived until then). With `aiosmtpd` the sink is
//!   `common/aiosink.py` instead, aiosmtpd in a python3 process: an ordinary third-party server, whose ceiling
//!   is of the order of the one the issue measured its own local sink at.
//! - `big MIB`: memory. A daemon with that account, 2 s idle (its VmRSS), then one message of MIB MiB (76-column
//!   lines) sent to it and relayed to the sink; VmHWM once the sink has it.
//! - `sink SECONDS`: only the sink, for trying things by hand: prints its address, serves for SECONDS, prints
//!   the messages it took.
//!
//! Binary: `$RELAY_BIN`, else the release build next to this bench (see `common/daemon.rs`). State dirs go under
//! `$RELAY_BENCH_DIR` (else /var/tmp) and are left there for the script to remove at the end.

#[path = "common/aiosink.rs"]
mod aiosink;
#[path = "common/daemon.rs"]
mod daemon;
#[path = "common/sink.rs"]
mod sink;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use daemon::{
    Daemon, auth_listener, count_msgs, expect, fill, free_port, kept_dir, message, open_listener,
    plain, relay_binary, reply, sink_account, state_line,
};
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const USAGE: &str = "usage: load auth SESSIONS MESSAGES | drain MESSAGES SESSIONS LIMIT_S [aiosmtpd] | big MIB | sink SECONDS";

fn main() {
    // `cargo bench` adds `--bench`; the script runs the executable directly.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let num = |i: usize| -> u64 {
        args.get(i).and_then(|v| v.parse().ok()).unwrap_or_else(|| {
            eprintln!("{USAGE}");
            std::process::exit(2)
        })
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    match args.first().map(String::as_str) {
        Some("auth") => runtime.block_on(auth(relay_binary(), num(1) as usize, num(2) as usize)),
        Some("drain") => runtime.block_on(drain(
            relay_binary(),
            num(1) as usize,
            num(2),
            num(3),
            args.get(4).map(String::as_str),
        )),
        Some("big") => runtime.block_on(big(relay_binary(), num(1))),
        Some("sink") => runtime.block_on(serve_sink(num(1))),
        _ => {
            eprintln!("{USAGE}");
            std::process::exit(2)
        }
    }
}

/// Prints one result for the script.
fn out(key: &str, value: impl std::fmt::Display) {
    println!("{key}={value}");
}

async fn auth(bin: PathBuf, sessions: usize, messages: usize) {
    let dir = kept_dir("load-auth-");
    let addr = free_port();
    let password = "bench-password";
    let hash = relay::smtp::auth::hash_password(password).expect("an argon2 hash");
    let config = state_line(&dir)
        + &auth_listener(addr)
        + &format!("[[user]]\nname = \"printer\"\npassword_hash = \"{hash}\"\n");
    let daemon = Daemon::start(&bin, &[], &dir, &config, addr).await;
    let login = Arc::new(plain("printer", password));
    let body = Arc::new(message());
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let first_error = Arc::new(std::sync::Mutex::new(None::<String>));
    let started = Instant::now();
    let mut clients = tokio::task::JoinSet::new();
    for s in 0..sessions {
        let n = messages / sessions + usize::from(s < messages % sessions);
        let (login, body, ok, failed, first_error) = (
            login.clone(),
            body.clone(),
            ok.clone(),
            failed.clone(),
            first_error.clone(),
        );
        clients.spawn(async move {
            for _ in 0..n {
                match device_message(addr, &login, &body).await {
                    Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        if let Ok(mut first) = first_error.lock() {
                            first.get_or_insert(e.to_string());
                        }
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
        });
    }
    let finished = tokio::time::timeout(Duration::from_secs(300), async {
        while clients.join_next().await.is_some() {}
    })
    .await;
    let elapsed = started.elapsed().as_secs_f64();
    let mem = daemon.mem();
    let stop = daemon.stop().await;
    let ok = ok.load(Ordering::Relaxed);
    out("auth_rate", format!("{:.0}", ok as f64 / elapsed));
    out("auth_ok", ok);
    out("auth_failed", failed.load(Ordering::Relaxed));
    out("auth_hwm_kib", mem.hwm_kib);
    if finished.is_err() {
        out("auth_note", "cut off after 300 s");
    }
    if let Some(e) = first_error.lock().ok().and_then(|e| e.clone()) {
        eprintln!("auth: first failure: {e}");
        out("auth_first_error", e.replace(char::is_whitespace, " "));
    }
    if let Some(stop) = stop {
        out("auth_stop", stop);
    }
}

/// One device-style submission on its own connection, each command waiting for its reply.
async fn device_message(addr: SocketAddr, login: &str, body: &[u8]) -> std::io::Result<()> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let mut r = BufReader::new(tcp);
    expect(&mut r, 220).await?;
    for (command, code) in [
        ("EHLO device.bench\r\n", 250),
        (login, 235),
        ("MAIL FROM:<device@example.com>\r\n", 250),
        ("RCPT TO:<sink@example.com>\r\n", 250),
        ("DATA\r\n", 354),
    ] {
        r.get_mut().write_all(command.as_bytes()).await?;
        expect(&mut r, code).await?;
    }
    r.get_mut().write_all(body).await?;
    expect(&mut r, 250).await?;
    r.get_mut().write_all(b"QUIT\r\n").await?;
    expect(&mut r, 221).await
}

/// Where `drain` delivers.
enum Upstream {
    /// `common/sink.rs`, in this process: as fast as a server can answer here.
    InProcess(sink::Sink),
    /// `common/aiosink.py`: aiosmtpd, an ordinary third-party server, in a python3 process.
    Aiosmtpd(Box<aiosink::AioSink>),
}

impl Upstream {
    async fn start(which: Option<&str>) -> Upstream {
        match which {
            None => Upstream::InProcess(sink::Sink::start(false).await.expect("start the sink")),
            Some("aiosmtpd") => Upstream::Aiosmtpd(Box::new(
                aiosink::AioSink::start()
                    .await
                    .expect("start the aiosmtpd sink"),
            )),
            Some(other) => {
                eprintln!("unknown sink {other:?}\n{USAGE}");
                std::process::exit(2)
            }
        }
    }

    fn addr(&self) -> SocketAddr {
        match self {
            Upstream::InProcess(s) => s.addr,
            Upstream::Aiosmtpd(s) => s.addr,
        }
    }

    /// Messages taken, connections accepted, and the seconds from the first message taken since the clock's
    /// restart to the latest one.
    async fn counts(&mut self) -> (u64, u64, f64) {
        match self {
            Upstream::InProcess(s) => {
                let span = s.first_and_last().map_or(0.0, |(first, last)| {
                    last.duration_since(first).as_secs_f64()
                });
                (s.messages(), s.connections(), span)
            }
            Upstream::Aiosmtpd(s) => {
                let c = s.counts().await.expect("ask the aiosmtpd sink");
                (c.messages, c.connections, c.span)
            }
        }
    }

    async fn restart_clock(&mut self) {
        match self {
            Upstream::InProcess(s) => s.restart_clock(),
            Upstream::Aiosmtpd(s) => s.restart_clock().await.expect("restart the sink's clock"),
        }
    }
}

async fn drain(bin: PathBuf, messages: usize, sessions: u64, limit_s: u64, which: Option<&str>) {
    let mut sink = Upstream::start(which).await;

    // The sink's own ceiling, from smtp-source.
    let started = Instant::now();
    let status = tokio::process::Command::new("smtp-source")
        .args([
            "-s",
            &sessions.to_string(),
            "-d",
            "-m",
            &messages.to_string(),
        ])
        .args([
            "-l",
            "4096",
            "-f",
            "bench@example.com",
            "-t",
            "sink@example.com",
        ])
        .arg(sink.addr().to_string())
        .kill_on_drop(true)
        .status();
    let status = tokio::time::timeout(Duration::from_secs(limit_s), status).await;
    let elapsed = started.elapsed().as_secs_f64();
    let (reached, _, _) = sink.counts().await;
    match status {
        Ok(Ok(s)) if s.success() => {}
        other => out("sink_note", format!("smtp-source: {other:?}")),
    }
    out("sink_rate", format!("{:.0}", reached as f64 / elapsed));
    out("sink_messages", reached);
    eprintln!(
        "drain: sink ceiling {reached} in {elapsed:.1} s ({:.0}/s)",
        reached as f64 / elapsed
    );

    // Fill a queue through a daemon without an account.
    let dir = kept_dir("load-drain-");
    let queue = dir.join("state/queue");
    let addr = free_port();
    let config = state_line(&dir) + &open_listener(addr);
    let daemon = Daemon::start(&bin, &[], &dir, &config, addr).await;
    let filling = Instant::now();
    fill(addr, messages, 20, 100, Duration::from_secs(300)).await;
    let fill_s = filling.elapsed().as_secs_f64();
    if let Some(stop) = daemon.stop().await {
        out("drain_note", stop);
    }
    let queued = count_msgs(&queue);
    eprintln!("drain: {queued} queued in {fill_s:.1} s");
    out("drain_queued", queued);

    // Drain it into the sink.
    sink.restart_clock().await;
    let (before, sink_at_start, _) = sink.counts().await;
    let addr = free_port();
    let config = state_line(&dir) + &sink_account(&dir, sink.addr().port()) + &open_listener(addr);
    let started = Instant::now();
    let daemon = Daemon::start(&bin, &[], &dir, &config, addr).await;
    let limit = Duration::from_secs(limit_s);
    let mut peak = daemon.mem();
    let mut timed_out = false;
    while sink.counts().await.0 - before < queued as u64 {
        if started.elapsed() > limit {
            timed_out = true;
            break;
        }
        let m = daemon.mem();
        peak.rss_kib = peak.rss_kib.max(m.rss_kib);
        peak.threads = peak.threads.max(m.threads);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let total_s = started.elapsed().as_secs_f64();
    let hwm = daemon.mem().hwm_kib;
    let stop = daemon.stop().await;
    let (taken, connections, span) = sink.counts().await;
    let delivered = taken - before;
    // Steady rate: from the first message the sink took from relay to the last (start-up and the queue scan
    // left out; when cut off, to the last one taken before).
    let steady = if delivered > 1 && span > 0.0 {
        (delivered - 1) as f64 / span
    } else {
        0.0
    };
    eprintln!(
        "drain: {delivered} of {queued} delivered in {total_s:.1} s from daemon start (steady {steady:.0}/s)"
    );
    out("drain_rate", format!("{steady:.0}"));
    out("drain_delivered", delivered);
    out("drain_total_s", format!("{total_s:.1}"));
    out("drain_connections", connections - sink_at_start);
    out("drain_hwm_kib", hwm);
    out("drain_threads", peak.threads);
    out("drain_left", count_msgs(&queue));
    if timed_out {
        out("drain_note", format!("cut off after {limit_s} s"));
    }
    if let Some(stop) = stop {
        out("drain_stop", stop);
    }
}

async fn big(bin: PathBuf, mib: u64) {
    let sink = sink::Sink::start(false).await.expect("start the sink");
    let dir = kept_dir("load-big-");
    let addr = free_port();
    let config = state_line(&dir) + &sink_account(&dir, sink.addr.port()) + &open_listener(addr);
    let daemon = Daemon::start(&bin, &[], &dir, &config, addr).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle = daemon.mem();
    out("idle_rss_kib", idle.rss_kib);
    out("idle_hwm_kib", idle.hwm_kib);

    let started = Instant::now();
    let sent = send_big(addr, mib << 20).await;
    let deadline = Instant::now() + Duration::from_secs(120);
    while sent.is_ok() && sink.messages() < 1 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let m = daemon.mem();
    let stop = daemon.stop().await;
    eprintln!(
        "big: {mib} MiB, sent {sent:?}, relayed {} in {:.1} s, {m:?}",
        sink.messages(),
        started.elapsed().as_secs_f64()
    );
    out("big_hwm_kib", m.hwm_kib);
    out("big_relayed", sink.messages());
    if let Err(e) = sent {
        out("big_note", e.to_string().replace(char::is_whitespace, " "));
    }
    if let Some(stop) = stop {
        out("big_stop", stop);
    }
}

/// Sends one message of about `size` bytes: 76 letters and CRLF per line, written in 64 KiB pieces.
async fn send_big(addr: SocketAddr, size: u64) -> std::io::Result<()> {
    let tcp = TcpStream::connect(addr).await?;
    let mut r = BufReader::new(tcp);
    expect(&mut r, 220).await?;
    r.get_mut()
        .write_all(b"EHLO bench\r\nMAIL FROM:<bench@example.com>\r\nRCPT TO:<sink@example.com>\r\nDATA\r\n")
        .await?;
    for code in [250, 250, 250, 354] {
        expect(&mut r, code).await?;
    }
    let line = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMN\r\n";
    let chunk = line.repeat(64 * 1024 / line.len());
    r.get_mut().write_all(b"Subject: big\r\n\r\n").await?;
    let mut written = 0;
    while written < size {
        r.get_mut().write_all(&chunk).await?;
        written += chunk.len() as u64;
    }
    r.get_mut().write_all(b".\r\n").await?;
    let (code, text) = reply(&mut r).await?;
    if code != 250 {
        return Err(std::io::Error::other(format!(
            "the big message was refused: {text}"
        )));
    }
    r.get_mut().write_all(b"QUIT\r\n").await?;
    Ok(())
}

async fn serve_sink(seconds: u64) {
    let sink = sink::Sink::start(false).await.expect("start the sink");
    out("sink_addr", sink.addr);
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    out("sink_messages", sink.messages());
}
