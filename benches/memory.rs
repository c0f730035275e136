//! Peak memory (VmHWM) of the real release binary under idle, hostile and heavy load.
//!
//! `cargo build --release && cargo bench --bench memory`: builds nothing itself, but runs `target/release/relay`
//! (or `$CARGO_TARGET_DIR/release/relay`, or `$RELAY_BIN`) as `relay serve --config FILE`, a fresh daemon in a
//! fresh state dir under /var/tmp for each scenario, drives it from this process with raw SMTP over loopback, and
//! reads `VmHWM` (peak RSS) and `VmRSS` from `/proc/PID/status`. Scenarios:
//!
//! 1. idle: started, 2 s later;
//! 2. 100 concurrent clients with a wrong password for 15 s, each from its own loopback address (127.0.0.2 to
//!    127.0.0.101: all of 127/8 is loopback on Linux), so that the per-address limits do not hide the cost;
//! 3. 20 first-time logins at the same moment (20 users, 20 addresses), then a 4 KiB message each;
//! 4. a backlog of 50,000 queued 4 KiB messages (`RELAY_BENCH_BACKLOG`) filled over SMTP by a daemon without an
//!    account, then drained by a second daemon into a local XOAUTH2 sink (`common/sink.rs`).
//!
//! It prints a markdown table and records it in BENCHMARKS.md between the `memory` markers. Knobs:
//! `RELAY_BENCH_SCENARIOS` (e.g. "2,3"), `RELAY_BENCH_DAEMON_ENV` (space-separated `KEY=VALUE` pairs for the
//! daemon, e.g. "MALLOC_ARENA_MAX=2"), `RELAY_BENCH_SINK_QUICKACK` (the sink acknowledges message bodies at
//! once, which shows what the kernel's delayed ACK costs the drain); with any set, the table is printed but not
//! recorded.

#[path = "common/daemon.rs"]
mod daemon;
#[path = "common/sink.rs"]
mod sink;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use daemon::{
    Daemon, Mem, auth_listener, client_ip, connect_from, count_msgs, expect, fill, free_port,
    message, one_message, open_listener, plain, relay_binary, reply, sink_account, state_line,
    temp_dir,
};
use tokio::io::AsyncWriteExt;

/// The target for scenarios 2 to 4.
const TARGET_MIB: f64 = 64.0;
/// Hostile clients in scenario 2, each on its own address.
const HOSTILE_CLIENTS: u8 = 100;
const HOSTILE_FOR: Duration = Duration::from_secs(15);
/// First-time logins in scenario 3.
const LOGINS: u8 = 20;
/// Sessions filling the backlog in scenario 4, and messages per connection.
const FILL_SESSIONS: usize = 20;
const FILL_PER_CONNECTION: usize = 100;

fn main() {
    let bin = relay_binary();
    let backlog = std::env::var("RELAY_BENCH_BACKLOG")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50_000usize);
    let only = std::env::var("RELAY_BENCH_SCENARIOS").ok();
    let daemon_env: Vec<(String, String)> = std::env::var("RELAY_BENCH_DAEMON_ENV")
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let wanted = |n: u8| {
        only.as_deref()
            .is_none_or(|s| s.split(',').any(|w| w.trim() == n.to_string()))
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let bench = Bench {
        bin: bin.clone(),
        env: daemon_env.clone(),
    };
    let mut rows = Vec::new();
    runtime.block_on(async {
        if wanted(1) {
            rows.push(bench.idle().await);
        }
        if wanted(2) {
            rows.push(bench.wrong_passwords().await);
        }
        if wanted(3) {
            rows.push(bench.first_logins().await);
        }
        if wanted(4) {
            rows.extend(bench.backlog(backlog).await);
        }
    });

    let date = humantime::format_rfc3339_seconds(SystemTime::now());
    let env_note = if daemon_env.is_empty() {
        String::new()
    } else {
        let pairs: Vec<String> = daemon_env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        format!(", daemon environment `{}`", pairs.join(" "))
    };
    let mut table = String::from(
        "| scenario | VmHWM MiB | VmRSS after MiB | notes |\n| --- | ---: | ---: | --- |\n",
    );
    for r in &rows {
        table.push_str(&format!(
            "| {} | {} | {} | {} |\n",
            r.scenario,
            mib(r.hwm_kib),
            r.rss_after_kib.map_or("-".into(), mib),
            r.notes
        ));
    }
    table.push_str(&format!(
        "\n{date}: `{}`{env_note}, 2-core VM. Hostile and login clients bind their sockets to 127.0.0.2, 127.0.0.3, … \
         before connecting (all of 127/8 is loopback on Linux), so that each counts as a different client address. \
         Target: at most {TARGET_MIB} MiB VmHWM in scenarios 2 to 4.",
        bin.display()
    ));
    println!("\n{table}");
    if only.is_none()
        && daemon_env.is_empty()
        && std::env::var_os("RELAY_BENCH_SINK_QUICKACK").is_none()
    {
        record("memory", &table);
    } else {
        eprintln!(
            "not recorded in BENCHMARKS.md (a RELAY_BENCH_SCENARIOS, _DAEMON_ENV or _SINK_QUICKACK knob is set)"
        );
    }
}

struct Row {
    scenario: String,
    hwm_kib: u64,
    rss_after_kib: Option<u64>,
    notes: String,
}

fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

fn over_target(hwm_kib: u64) -> Option<String> {
    (hwm_kib as f64 / 1024.0 > TARGET_MIB).then(|| format!("**over the {TARGET_MIB} MiB target**"))
}

#[derive(Default)]
struct Counts {
    connections: AtomicU64,
    r535: AtomicU64,
    r454: AtomicU64,
    r421: AtomicU64,
    other: AtomicU64,
    errors: AtomicU64,
}

fn add(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

fn get(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

struct Bench {
    bin: PathBuf,
    env: Vec<(String, String)>,
}

impl Bench {
    async fn idle(&self) -> Row {
        let dir = temp_dir("relay-memory-");
        let addr = free_port();
        let config = state_line(dir.path()) + &open_listener(addr);
        let daemon = Daemon::start(&self.bin, &self.env, dir.path(), &config, addr).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let m = daemon.mem();
        let stop = daemon.stop().await;
        eprintln!("1 idle: {m:?}");
        Row {
            scenario: "1. idle (2 s after start, no account)".into(),
            hwm_kib: m.hwm_kib,
            rss_after_kib: Some(m.rss_kib),
            notes: join([Some(format!("{} threads", m.threads)), stop]),
        }
    }

    async fn wrong_passwords(&self) -> Row {
        let dir = temp_dir("relay-memory-");
        let addr = free_port();
        let hash = relay::smtp::auth::hash_password("the-right-password").expect("an argon2 hash");
        let config = state_line(dir.path())
            + &auth_listener(addr)
            + &format!("[[user]]\nname = \"printer\"\npassword_hash = \"{hash}\"\n");
        let daemon = Daemon::start(&self.bin, &self.env, dir.path(), &config, addr).await;
        let counts = Arc::new(Counts::default());
        let deadline = tokio::time::Instant::now() + HOSTILE_FOR;
        let mut clients = tokio::task::JoinSet::new();
        for n in 0..HOSTILE_CLIENTS {
            let counts = counts.clone();
            clients.spawn(async move {
                while tokio::time::Instant::now() < deadline {
                    add(&counts.connections);
                    match tokio::time::timeout_at(deadline, hostile(client_ip(n), addr, &counts))
                        .await
                    {
                        Err(_) => return,
                        Ok(Err(_)) => add(&counts.errors),
                        Ok(Ok(())) => {}
                    }
                }
            });
        }
        // Peak RSS as sampled, besides the kernel's own high-water mark.
        let mut peak = Mem::default();
        while !clients.is_empty() {
            tokio::select! {
                _ = clients.join_next() => {}
                _ = tokio::time::sleep(Duration::from_millis(200)) => {
                    let m = daemon.mem();
                    peak.rss_kib = peak.rss_kib.max(m.rss_kib);
                    peak.threads = peak.threads.max(m.threads);
                }
            }
        }
        let during = daemon.mem();
        tokio::time::sleep(Duration::from_secs(3)).await;
        let after = daemon.mem();
        let stop = daemon.stop().await;
        let c = &counts;
        eprintln!("2 wrong passwords: during {during:?}, after {after:?}, peak sampled {peak:?}");
        Row {
            scenario: format!(
                "2. {HOSTILE_CLIENTS} concurrent wrong-password clients, {} s",
                HOSTILE_FOR.as_secs()
            ),
            hwm_kib: during.hwm_kib,
            rss_after_kib: Some(after.rss_kib),
            notes: join([
                Some(format!(
                    "{} connections; replies to AUTH: {} × 535, {} × 454, {} × 421, {} other; {} connection errors; up to {} threads",
                    get(&c.connections),
                    get(&c.r535),
                    get(&c.r454),
                    get(&c.r421),
                    get(&c.other),
                    get(&c.errors),
                    peak.threads
                )),
                over_target(during.hwm_kib),
                stop,
            ]),
        }
    }

    async fn first_logins(&self) -> Row {
        let dir = temp_dir("relay-memory-");
        let addr = free_port();
        let hashing = Instant::now();
        let users = tokio::task::spawn_blocking(|| {
            (0..LOGINS)
                .map(|i| {
                    let password = format!("password-{i}-bench");
                    let hash = relay::smtp::auth::hash_password(&password).expect("an argon2 hash");
                    (format!("user{i}"), password, hash)
                })
                .collect::<Vec<_>>()
        })
        .await
        .expect("hash the passwords");
        eprintln!("3: {LOGINS} argon2id hashes in {:?}", hashing.elapsed());
        let mut config = state_line(dir.path()) + &auth_listener(addr);
        for (name, _, hash) in &users {
            config.push_str(&format!(
                "[[user]]\nname = \"{name}\"\npassword_hash = \"{hash}\"\n"
            ));
        }
        let daemon = Daemon::start(&self.bin, &self.env, dir.path(), &config, addr).await;
        let before = daemon.mem();
        let barrier = Arc::new(tokio::sync::Barrier::new(usize::from(LOGINS)));
        let body = Arc::new(message());
        let mut clients = tokio::task::JoinSet::new();
        for (n, (name, password, _)) in users.into_iter().enumerate() {
            let (barrier, body) = (barrier.clone(), body.clone());
            clients.spawn(async move {
                let mut r = connect_from(client_ip(n as u8), addr).await?;
                expect(&mut r, 220).await?;
                r.get_mut().write_all(b"EHLO bench\r\n").await?;
                expect(&mut r, 250).await?;
                barrier.wait().await;
                let sent = Instant::now();
                r.get_mut()
                    .write_all(plain(&name, &password).as_bytes())
                    .await?;
                expect(&mut r, 235).await?;
                let login = sent.elapsed();
                one_message(&mut r, &body).await?;
                r.get_mut().write_all(b"QUIT\r\n").await?;
                expect(&mut r, 221).await?;
                std::io::Result::Ok(login)
            });
        }
        let mut ok = 0;
        let mut slowest = Duration::ZERO;
        let mut failures = Vec::new();
        let all = tokio::time::timeout(Duration::from_secs(120), async {
            while let Some(done) = clients.join_next().await {
                match done.expect("a login client") {
                    Ok(login) => {
                        ok += 1;
                        slowest = slowest.max(login);
                    }
                    Err(e) => failures.push(e.to_string()),
                }
            }
        })
        .await;
        let during = daemon.mem();
        tokio::time::sleep(Duration::from_secs(3)).await;
        let after = daemon.mem();
        let stop = daemon.stop().await;
        eprintln!(
            "3 first logins: before {before:?}, during {during:?}, after {after:?}; failures {failures:?}"
        );
        Row {
            scenario: format!("3. {LOGINS} first-time logins at once, then a 4 KiB message each"),
            hwm_kib: during.hwm_kib,
            rss_after_kib: Some(after.rss_kib),
            notes: join([
                Some(format!(
                    "{ok}/{LOGINS} got 235 and 250; slowest login {:.2} s",
                    slowest.as_secs_f64()
                )),
                (!failures.is_empty()).then(|| format!("failures: {}", failures.join("; "))),
                all.is_err().then(|| "timed out after 120 s".to_string()),
                over_target(during.hwm_kib),
                stop,
            ]),
        }
    }

    /// Fills a queue with `count` messages through a daemon without an account, then drains it through a second
    /// daemon whose account delivers to the sink.
    async fn backlog(&self, count: usize) -> Vec<Row> {
        let dir = temp_dir("relay-memory-");
        let queue = dir.path().join("state/queue");

        // Fill.
        let addr = free_port();
        let config = state_line(dir.path()) + &open_listener(addr);
        let daemon = Daemon::start(&self.bin, &self.env, dir.path(), &config, addr).await;
        let started = Instant::now();
        fill(
            addr,
            count,
            FILL_SESSIONS,
            FILL_PER_CONNECTION,
            Duration::from_secs(1200),
        )
        .await;
        let fill_time = started.elapsed();
        let fill_mem = daemon.mem();
        let stop = daemon.stop().await;
        let queued = count_msgs(&queue);
        eprintln!(
            "4 fill: {queued} queued in {fill_time:?} ({:.0}/s), {fill_mem:?}",
            count as f64 / fill_time.as_secs_f64()
        );
        let fill_row = Row {
            scenario: format!(
                "4a. accepting the backlog: {count} messages of 4 KiB over SMTP, no account"
            ),
            hwm_kib: fill_mem.hwm_kib,
            rss_after_kib: None,
            notes: join([
                Some(format!(
                    "{FILL_SESSIONS} sessions, {FILL_PER_CONNECTION} messages per connection; {:.0} messages/s; {queued} queued",
                    count as f64 / fill_time.as_secs_f64()
                )),
                stop,
            ]),
        };

        // Drain.
        let quickack = std::env::var_os("RELAY_BENCH_SINK_QUICKACK").is_some();
        let sink = sink::Sink::start(quickack).await.expect("start the sink");
        let addr = free_port();
        let config = state_line(dir.path())
            + &sink_account(dir.path(), sink.addr.port())
            + &open_listener(addr);
        let started = Instant::now();
        let daemon = Daemon::start(&self.bin, &self.env, dir.path(), &config, addr).await;
        let limit = Duration::from_secs(900);
        let mut peak_threads = 0;
        let mut last_scan = Instant::now();
        let mut timed_out = false;
        loop {
            if sink.messages() >= queued as u64 {
                break;
            }
            if last_scan.elapsed() >= Duration::from_secs(2) {
                last_scan = Instant::now();
                if count_msgs(&queue) == 0 {
                    break;
                }
            }
            if started.elapsed() > limit {
                timed_out = true;
                break;
            }
            peak_threads = peak_threads.max(daemon.mem().threads);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let drain_time = started.elapsed();
        let during = daemon.mem();
        tokio::time::sleep(Duration::from_secs(3)).await;
        let after = daemon.mem();
        let stop = daemon.stop().await;
        let delivered = sink.messages();
        let left = count_msgs(&queue);
        let dead = count_msgs(&dir.path().join("state/dead"));
        let rate = delivered as f64 / drain_time.as_secs_f64();
        eprintln!(
            "4 drain: {delivered} delivered in {drain_time:?} ({rate:.0}/s), {left} left, {dead} dead, {} upstream connections; during {during:?}, after {after:?}",
            sink.connections()
        );
        let drain_row = Row {
            scenario: format!("4b. draining the backlog of {queued} into a local XOAUTH2 sink"),
            hwm_kib: during.hwm_kib,
            rss_after_kib: Some(after.rss_kib),
            notes: join([
                Some(format!(
                    "{delivered} delivered in {:.1} s from daemon start ({rate:.0} messages/s), {} upstream connections, up to {peak_threads} threads",
                    drain_time.as_secs_f64(),
                    sink.connections()
                )),
                (left > 0 || dead > 0).then(|| format!("{left} still queued, {dead} dead")),
                quickack.then(|| "sink with TCP_QUICKACK".to_string()),
                timed_out.then(|| format!("timed out after {} s", limit.as_secs())),
                over_target(during.hwm_kib),
                stop,
            ]),
        };
        vec![fill_row, drain_row]
    }
}

/// One hostile connection: EHLO, then up to 3 logins with a wrong password.
async fn hostile(from: Ipv4Addr, to: SocketAddr, counts: &Counts) -> std::io::Result<()> {
    let mut r = connect_from(from, to).await?;
    expect(&mut r, 220).await?;
    r.get_mut().write_all(b"EHLO hostile\r\n").await?;
    expect(&mut r, 250).await?;
    let auth = plain("printer", "a-wrong-password");
    for _ in 0..3 {
        r.get_mut().write_all(auth.as_bytes()).await?;
        match reply(&mut r).await?.0 {
            535 => add(&counts.r535),
            454 => add(&counts.r454),
            421 => {
                add(&counts.r421);
                return Ok(());
            }
            _ => {
                add(&counts.other);
                return Ok(());
            }
        }
    }
    r.get_mut().write_all(b"QUIT\r\n").await?;
    let _ = reply(&mut r).await;
    Ok(())
}

fn join<const N: usize>(notes: [Option<String>; N]) -> String {
    notes.into_iter().flatten().collect::<Vec<_>>().join("; ")
}

/// Replaces the text between `<!-- NAME -->` and `<!-- /NAME -->` in BENCHMARKS.md, adding the section first
/// when the markers are missing.
fn record(name: &str, text: &str) {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/BENCHMARKS.md");
    let Ok(mut doc) = std::fs::read_to_string(path) else {
        return;
    };
    let (open, close) = (format!("<!-- {name} -->"), format!("<!-- /{name} -->"));
    if !(doc.contains(&open) && doc.contains(&close)) {
        doc.push_str(&format!(
            "\n## Memory (peak RSS of the real binary)\n\n`cargo build --release && cargo bench --bench memory`: \
             a fresh `target/release/relay serve` per scenario, driven over loopback from the bench process; VmHWM \
             and VmRSS from /proc/PID/status. Machine: the 2-core development VM.\n\n{open}\n{close}\n"
        ));
    }
    if let (Some(a), Some(b)) = (doc.find(&open), doc.find(&close)) {
        let updated = format!("{}{open}\n{text}\n{}", &doc[..a], &doc[b..]);
        let _ = std::fs::write(path, updated);
    }
}
