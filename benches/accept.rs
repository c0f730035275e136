//! Accept throughput: concurrent sessions each sending 4 KiB messages, every one on disk before its 250.
//!
//! `cargo bench --bench accept` starts relay in this process and drives it with a minimal SMTP client on
//! loopback (client and server share the machine's cores, as with smtp-source). It prints the rate and records it
//! in BENCHMARKS.md between the `accept` markers. Knobs: RELAY_BENCH_SESSIONS (20), RELAY_BENCH_MESSAGES
//! (20000), RELAY_BENCH_DIR (a fresh directory under /var/tmp, left in place afterwards), RELAY_BENCH_AUTH=1
//! (each connection logs in with AUTH PLAIN after EHLO, as devices do; recorded between the `accept-auth`
//! markers: the password is checked once with argon2, then from the cache of successful logins).

use std::time::Instant;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn expect(r: &mut BufReader<TcpStream>, code: &str) {
    let mut line = String::new();
    loop {
        line.clear();
        r.read_line(&mut line).await.expect("read");
        assert!(line.starts_with(code), "expected {code}, got {line:?}");
        if line.as_bytes().get(3) == Some(&b' ') {
            return;
        }
    }
}

/// `AUTH PLAIN` for user `printer`, password `bench`.
const AUTH_LINE: &[u8] = b"AUTH PLAIN AHByaW50ZXIAYmVuY2g=\r\n";

/// One message on its own connection, as a device sends it (after logging in, with `auth`).
async fn send(addr: std::net::SocketAddr, body: &[u8], auth: bool) {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    tcp.set_nodelay(true).ok();
    let mut r = BufReader::new(tcp);
    expect(&mut r, "220").await;
    r.get_mut().write_all(b"EHLO bench\r\n").await.unwrap();
    expect(&mut r, "250").await;
    if auth {
        r.get_mut().write_all(AUTH_LINE).await.unwrap();
        expect(&mut r, "235").await;
    }
    r.get_mut()
        .write_all(b"MAIL FROM:<bench@example.com>\r\nRCPT TO:<sink@example.com>\r\nDATA\r\n")
        .await
        .unwrap();
    expect(&mut r, "250").await;
    expect(&mut r, "250").await;
    expect(&mut r, "354").await;
    r.get_mut().write_all(body).await.unwrap();
    expect(&mut r, "250").await;
    r.get_mut().write_all(b"QUIT\r\n").await.unwrap();
    expect(&mut r, "221").await;
}

fn main() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let sessions = env("RELAY_BENCH_SESSIONS", 20);
    let messages = env("RELAY_BENCH_MESSAGES", 20_000);
    let dir = std::env::var("RELAY_BENCH_DIR")
        .unwrap_or_else(|_| format!("/var/tmp/relay-bench-{}", std::process::id()));
    let auth = std::env::var_os("RELAY_BENCH_AUTH").is_some();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let rate = runtime.block_on(async {
        let text = if auth {
            let hash = relay::smtp::auth::hash_password("bench").unwrap();
            format!(
                "state_dir = {:?}\n[[listener]]\naddress = \"127.0.0.1:0\"\nauth = \"required\"\nallow = [\"127.0.0.0/8\"]\n[[user]]\nname = \"printer\"\npassword_hash = {hash:?}\n",
                format!("{dir}/state")
            )
        } else {
            format!(
                "state_dir = {:?}\n[[listener]]\naddress = \"127.0.0.1:0\"\nauth = \"none\"\n",
                format!("{dir}/state")
            )
        };
        let config = relay::config::Config::parse(&text, "bench").unwrap();
        let relay = relay::Relay::start(&config).await.unwrap();
        let addr = relay.local_addrs()[0];
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(relay.run(async {
            let _ = stopped.await;
        }));
        let mut body = b"Subject: bench\r\n\r\n".to_vec();
        while body.len() < 4096 - 5 {
            body.extend_from_slice(
                b"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef0123456789\r\n",
            );
        }
        body.truncate(4096 - 5);
        body.extend_from_slice(b"\r\n.\r\n");
        let body = std::sync::Arc::new(body);
        let start = Instant::now();
        let mut tasks = Vec::new();
        for s in 0..sessions {
            let body = body.clone();
            let count = messages / sessions + usize::from(s < messages % sessions);
            tasks.push(tokio::spawn(async move {
                for _ in 0..count {
                    send(addr, &body, auth).await;
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let elapsed = start.elapsed();
        let _ = stop.send(());
        let _ = server.await;
        messages as f64 / elapsed.as_secs_f64()
    });
    // The queue is left in place: deleting 20,000 files would slow the next run's file creation (BENCHMARKS.md).
    eprintln!("queue left in {dir}");
    let (how, marker) = if auth {
        (
            "one connection, EHLO, AUTH PLAIN and message each (`RELAY_BENCH_AUTH=1 cargo bench --bench accept`",
            "accept-auth",
        )
    } else {
        (
            "one connection per message (`cargo bench --bench accept`",
            "accept",
        )
    };
    let line = format!(
        "{rate:.0} messages/s: {messages} messages of 4 KiB from {sessions} concurrent sessions, {how}, in-process client, {})",
        humantime::format_rfc3339_seconds(std::time::SystemTime::now())
    );
    println!("{line}");
    record(marker, &line);
}

/// Replaces the text between `<!-- NAME -->` and `<!-- /NAME -->` in BENCHMARKS.md.
fn record(name: &str, line: &str) {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/BENCHMARKS.md");
    let Ok(text) = std::fs::read_to_string(path) else {
        return;
    };
    let (open, close) = (format!("<!-- {name} -->"), format!("<!-- /{name} -->"));
    if let (Some(a), Some(b)) = (text.find(&open), text.find(&close)) {
        let updated = format!("{}{open}\n{line}\n{}", &text[..a], &text[b..]);
        let _ = std::fs::write(path, updated);
    }
}
