//! Shared by the benches that drive the real binary (`memory.rs`, `load.rs`): a `relay serve` child in its own
//! state dir, its memory figures from /proc, and a minimal raw SMTP client.
#![allow(dead_code)] // each bench uses a different part of this

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};
use tokio::process::{Child, Command};

/// The release binary: `$RELAY_BIN`, else `$CARGO_TARGET_DIR/release/relay`, else next to this bench's own
/// directory (`target/release/deps/..`), else `target/release/relay` in the package.
pub fn relay_binary() -> PathBuf {
    let mut candidates = Vec::new();
    if let Some(p) = std::env::var_os("RELAY_BIN") {
        candidates.push(PathBuf::from(p));
    }
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        candidates.push(PathBuf::from(dir).join("release/relay"));
    }
    if let Ok(exe) = std::env::current_exe()
        && let Some(release) = exe.parent().and_then(Path::parent)
    {
        candidates.push(release.join("relay"));
    }
    candidates.push(PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/target/release/relay"
    )));
    let Some(bin) = candidates.iter().find(|p| p.is_file()) else {
        eprintln!(
            "the release binary is missing (looked at {candidates:?}): run `cargo build --release` first \
             (with the same CARGO_TARGET_DIR)"
        );
        std::process::exit(2);
    };
    // A stale binary measures old code: say so.
    let built = std::fs::metadata(bin).and_then(|m| m.modified()).ok();
    let newest = newest_mtime(Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/src")));
    if let (Some(built), Some(newest)) = (built, newest)
        && newest > built
    {
        eprintln!(
            "warning: {} is older than the newest file in src/: run `cargo build --release` to measure the current code",
            bin.display()
        );
    }
    eprintln!("measuring {}", bin.display());
    bin.clone()
}

fn newest_mtime(dir: &Path) -> Option<SystemTime> {
    let mut newest = None;
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        let t = if path.is_dir() {
            newest_mtime(&path)
        } else {
            entry.metadata().and_then(|m| m.modified()).ok()
        };
        newest = newest.max(t);
    }
    newest
}

/// VmHWM, VmRSS and Threads from `/proc/PID/status`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Mem {
    pub hwm_kib: u64,
    pub rss_kib: u64,
    pub threads: u64,
}

pub fn mem(pid: u32) -> Mem {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("/proc/PID/status of the daemon (is it still running?)");
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Mem {
        hwm_kib: field("VmHWM:"),
        rss_kib: field("VmRSS:"),
        threads: field("Threads:"),
    }
}

/// A running `relay serve`, its state dir and its log.
pub struct Daemon {
    child: Child,
    pub pid: u32,
    pub addr: SocketAddr,
    log: PathBuf,
}

impl Daemon {
    /// Starts `BIN serve --config CONFIG` (with `env` added to its environment) and waits (bounded) until it
    /// greets on `addr`.
    pub async fn start(
        bin: &Path,
        env: &[(String, String)],
        dir: &Path,
        config: &str,
        addr: SocketAddr,
    ) -> Daemon {
        let path = dir.join("relay.toml");
        std::fs::write(&path, config).expect("write the bench config");
        let check = Command::new(bin)
            .args(["check", "--config"])
            .arg(&path)
            .output()
            .await
            .expect("run `relay check`");
        assert!(
            check.status.success(),
            "`relay check` refused the bench config:\n{config}\n{}{}",
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        );
        let log = dir.join(format!("relay-{}.log", addr.port()));
        let stderr = std::fs::File::create(&log).expect("create the daemon's log file");
        let child = Command::new(bin)
            .args(["serve", "--config"])
            .arg(&path)
            .env_remove("NOTIFY_SOCKET")
            .env_remove("JOURNAL_STREAM")
            .env_remove("STATE_DIRECTORY")
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .expect("start `relay serve`");
        let pid = child.id().expect("the daemon's pid");
        let mut daemon = Daemon {
            child,
            pid,
            addr,
            log,
        };
        daemon.wait_ready().await;
        daemon
    }

    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().expect("poll the daemon") {
                panic!(
                    "relay exited while starting ({status}); its log:\n{}",
                    self.log_tail()
                );
            }
            if let Ok(Ok(true)) =
                tokio::time::timeout(Duration::from_secs(2), greets(self.addr)).await
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "relay did not greet on {} within 60 s; its log:\n{}",
                self.addr,
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn mem(&self) -> Mem {
        mem(self.pid)
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// SIGTERM, then a bounded wait for the exit (SIGKILL after 90 s). Returns a note when the exit was not clean.
    pub async fn stop(mut self) -> Option<String> {
        // SAFETY: kill(2) on our own child's pid, which we have not reaped yet.
        unsafe {
            libc::kill(self.pid as libc::pid_t, libc::SIGTERM);
        }
        match tokio::time::timeout(Duration::from_secs(90), self.child.wait()).await {
            Ok(Ok(status)) if status.success() => None,
            Ok(Ok(status)) => Some(format!("daemon exit: {status}")),
            Ok(Err(e)) => Some(format!("daemon wait failed: {e}")),
            Err(_) => {
                let _ = self.child.kill().await;
                Some("daemon did not exit within 90 s of SIGTERM (killed)".into())
            }
        }
    }
}

/// True when something on `addr` greets with 220 (then it is told QUIT).
pub async fn greets(addr: SocketAddr) -> std::io::Result<bool> {
    let mut r = BufReader::new(TcpStream::connect(addr).await?);
    let (code, _) = reply(&mut r).await?;
    let _ = r.get_mut().write_all(b"QUIT\r\n").await;
    Ok(code == 220)
}

/// Reads one (possibly multi-line) reply: its code and its last line.
pub async fn reply<S: tokio::io::AsyncRead + Unpin>(
    r: &mut BufReader<S>,
) -> std::io::Result<(u16, String)> {
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let code = line
            .get(..3)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("not a reply: {line:?}")))?;
        if line.as_bytes().get(3) != Some(&b'-') {
            return Ok((code, line.trim_end().to_string()));
        }
    }
}

pub async fn expect<S: tokio::io::AsyncRead + Unpin>(
    r: &mut BufReader<S>,
    code: u16,
) -> std::io::Result<()> {
    let (got, line) = reply(r).await?;
    if got != code {
        return Err(std::io::Error::other(format!(
            "expected {code}, got {line:?}"
        )));
    }
    Ok(())
}

/// A free loopback port for a daemon's listener (the daemon binds it a moment later).
pub fn free_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    l.local_addr().expect("its address")
}

/// The `n`th client address: 127.0.0.2, 127.0.0.3, …
pub fn client_ip(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, 2 + n)
}

/// A connection from `from` to `to`.
pub async fn connect_from(from: Ipv4Addr, to: SocketAddr) -> std::io::Result<BufReader<TcpStream>> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(SocketAddr::new(from.into(), 0))?;
    let tcp = socket.connect(to).await?;
    tcp.set_nodelay(true)?;
    Ok(BufReader::new(tcp))
}

/// A 4 KiB message, final dot included.
pub fn message() -> Vec<u8> {
    let mut body =
        b"From: bench@example.com\r\nTo: sink@example.com\r\nSubject: bench\r\n\r\n".to_vec();
    while body.len() < 4096 - 5 {
        body.extend_from_slice(
            b"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef0123456789\r\n",
        );
    }
    body.truncate(4096 - 5);
    // Never a bare CR or LF at the cut (relay rejects those).
    while body.last().is_some_and(|b| matches!(b, b'\r' | b'\n')) {
        body.pop();
    }
    body.extend_from_slice(b"\r\n.\r\n");
    body
}

pub fn plain(user: &str, password: &str) -> String {
    format!(
        "AUTH PLAIN {}\r\n",
        B64.encode(format!("\0{user}\0{password}"))
    )
}

/// A fresh directory under /var/tmp (where the state dirs of the issue's figures live), removed on drop.
pub fn temp_dir(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in("/var/tmp")
        .expect("a temp dir under /var/tmp")
}

/// A fresh directory under `$RELAY_BENCH_DIR` (else /var/tmp), left in place: deleting a queue of thousands of
/// files slows every file creation on ext4 for minutes after (BENCHMARKS.md, "Where the time goes"), so the
/// caller removes it once nothing is measured any more.
pub fn kept_dir(prefix: &str) -> PathBuf {
    let base = std::env::var_os("RELAY_BENCH_DIR")
        .map_or_else(|| PathBuf::from("/var/tmp"), PathBuf::from);
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(&base)
        .unwrap_or_else(|e| panic!("a directory under {}: {e}", base.display()))
        .keep()
}

/// A listener that wants a login from any loopback address, in plain text (tls = "none").
pub fn auth_listener(addr: SocketAddr) -> String {
    format!(
        "[[listener]]\naddress = \"{addr}\"\ntls = \"none\"\nauth = \"required\"\nallow = [\"127.0.0.0/8\"]\n"
    )
}

/// A listener like the embedded default's: no login, loopback only.
pub fn open_listener(addr: SocketAddr) -> String {
    format!("[[listener]]\naddress = \"{addr}\"\nauth = \"none\"\n")
}

pub fn state_line(dir: &Path) -> String {
    format!(
        "state_dir = {:?}\n",
        dir.join("state").display().to_string()
    )
}

/// An account `bench` (the default account) that delivers to an XOAUTH2 server on loopback `port` without TLS,
/// with a valid access token written into the state dir under `dir`, so that no token endpoint is needed.
pub fn sink_account(dir: &Path, port: u16) -> String {
    let now = SystemTime::now();
    relay::tokens::TokenStore::new(&dir.join("state"))
        .save(
            "bench",
            &relay::tokens::StoredTokens {
                access_token: "tok".to_string().into(),
                expires_at: now + Duration::from_secs(86_400),
                obtained_at: now,
                refresh_token: Some("refresh".to_string().into()),
                last_refresh: Some(now),
                needs_authorization: false,
                last_error: None,
            },
        )
        .expect("write the account's token file");
    format!(
        r#"default_account = "bench"
[[account]]
name = "bench"
provider = "generic"
flow = "authorization_code"
mailbox = "noreply@example.com"
client_id = "bench"
token_url = "http://127.0.0.1:9/token"
authorization_url = "http://127.0.0.1:9/authorize"
scope = "smtp"
smtp_host = "127.0.0.1"
smtp_port = {port}
smtp_tls = "none"
"#
    )
}

pub fn count_msgs(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |d| {
        d.flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".msg"))
            .count()
    })
}

/// One pipelined transaction on an open session: MAIL, RCPT and DATA in one write, then `body` (which ends with
/// the final dot).
pub async fn one_message(r: &mut BufReader<TcpStream>, body: &[u8]) -> std::io::Result<()> {
    r.get_mut()
        .write_all(b"MAIL FROM:<bench@example.com>\r\nRCPT TO:<sink@example.com>\r\nDATA\r\n")
        .await?;
    for code in [250, 250, 354] {
        expect(r, code).await?;
    }
    r.get_mut().write_all(body).await?;
    expect(r, 250).await
}

/// One filling session: `n` messages, `per_connection` on each connection.
async fn fill_session(
    addr: SocketAddr,
    mut n: usize,
    per_connection: usize,
    body: Arc<Vec<u8>>,
) -> std::io::Result<()> {
    while n > 0 {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let mut r = BufReader::new(tcp);
        expect(&mut r, 220).await?;
        r.get_mut().write_all(b"EHLO bench\r\n").await?;
        expect(&mut r, 250).await?;
        for _ in 0..n.min(per_connection) {
            one_message(&mut r, &body).await?;
            n -= 1;
        }
        r.get_mut().write_all(b"QUIT\r\n").await?;
        expect(&mut r, 221).await?;
    }
    Ok(())
}

/// Sends `count` 4 KiB messages to `addr` from `sessions` concurrent sessions, `per_connection` messages on each
/// connection; panics on any SMTP failure, or after `limit`.
pub async fn fill(
    addr: SocketAddr,
    count: usize,
    sessions: usize,
    per_connection: usize,
    limit: Duration,
) {
    let body = Arc::new(message());
    let mut tasks = tokio::task::JoinSet::new();
    for s in 0..sessions {
        let n = count / sessions + usize::from(s < count % sessions);
        tasks.spawn(fill_session(addr, n, per_connection, body.clone()));
    }
    let filled = tokio::time::timeout(limit, async {
        while let Some(done) = tasks.join_next().await {
            done.expect("a fill session")
                .expect("a fill session's SMTP exchange");
        }
    })
    .await;
    assert!(filled.is_ok(), "filling the queue took over {limit:?}");
}
