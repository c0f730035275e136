//! Accept throughput: concurrent sessions each sending 4 KiB messages, every one on disk before its 250.
//!
//! `cargo bench --bench accept` starts relay in this process and drives it with a minimal SMTP client on
//! loopback (client and server share the machine's cores, as with smtp-source). It prints the rate and records it
//! in BENCHMARKS.md between the `accept` markers. Knobs: RELAY_BENCH_SESSIONS (20), RELAY_BENCH_MESSAGES
//! (20000), RELAY_BENCH_DIR (a fresh directory under /var/tmp, left in place afterwards).

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

/// One message on its own connection, as a device sends it.
async fn send(addr: std::net::SocketAddr, body: &[u8]) {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    tcp.set_nodelay(true).ok();
    let mut r = BufReader::new(tcp);
    expect(&mut r, "220").await;
    r.get_mut().write_all(b"EHLO bench\r\n").await.unwrap();
    expect(&mut r, "250").await;
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
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let rate = runtime.block_on(async {
        let text = format!(
            "state_dir = {:?}\n[[listener]]\naddress = \"127.0.0.1:0\"\nauth = \"none\"\n",
            format!("{dir}/state")
        );
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
                    send(addr, &body).await;
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
    let line = format!(
        "{rate:.0} messages/s: {messages} messages of 4 KiB from {sessions} concurrent sessions, one connection per message, \
         in-process client (`cargo bench --bench accept`, {})",
        humantime::format_rfc3339_seconds(std::time::SystemTime::now())
    );
    println!("{line}");
    record("accept", &line);
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
