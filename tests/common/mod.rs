//! Shared test helpers: an in-process relay on port 0, a raw SMTP client, TLS certificates, the real binary.
#![allow(dead_code)] // each test binary uses a different part of this

pub mod http_api;
pub mod idp;
pub mod upstream;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Once;
use std::time::Duration;

use tokio::io::{
    AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader as TokioBufReader,
};
use tokio::net::TcpStream;
use tokio::sync::{oneshot, watch};

/// Every wait in the tests is bounded by this.
pub const LIMIT: Duration = Duration::from_secs(20);

pub const PASSWORD: &str = "correct horse";

/// An argon2id hash of [`PASSWORD`], made once per test binary.
pub fn password_hash() -> String {
    static HASH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    HASH.get_or_init(|| relay::smtp::auth::hash_password(PASSWORD).expect("hash"))
        .clone()
}

pub fn install_crypto() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    });
}

/// A self-signed certificate for `localhost`, written as PEM files into `dir`.
pub struct TestCert {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub pem: String,
}

pub fn make_cert(dir: &Path) -> TestCert {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("rcgen");
    let pem = ck.cert.pem();
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    std::fs::write(&cert, &pem).unwrap();
    write_private(&key, ck.signing_key.serialize_pem());
    TestCert { cert, key, pem }
}

/// Writes a secret (a private key, a client secret) as an operator must: mode 0600 whatever the umask, because
/// relay refuses secret files that others can read.
pub fn write_private(path: &Path, contents: impl AsRef<[u8]>) {
    std::fs::write(path, contents).unwrap();
    make_private(path);
}

/// Takes away every permission but the owner's (for a key written by another tool, e.g. `openssl req`).
pub fn make_private(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// A relay running in this process.
pub struct TestRelay {
    pub dir: tempfile::TempDir,
    pub addrs: Vec<SocketAddr>,
    pub sessions: watch::Receiver<usize>,
    pub attempts: watch::Receiver<u64>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl TestRelay {
    /// Starts relay with `listeners` (TOML for `[[listener]]` tables, `{cert}`/`{key}` replaced) plus one user,
    /// `printer`, whose password is [`PASSWORD`].
    pub async fn start(listeners: &str) -> TestRelay {
        Self::start_in(tempfile::tempdir().unwrap(), listeners).await
    }

    pub async fn start_in(dir: tempfile::TempDir, listeners: &str) -> TestRelay {
        Self::start_with(dir, "", listeners).await
    }

    /// As [`start_in`](Self::start_in), with top-level TOML (`default_account`, `[[account]]`) before the
    /// listeners; `{dir}` in it is replaced by the test directory.
    pub async fn start_with(dir: tempfile::TempDir, top: &str, listeners: &str) -> TestRelay {
        install_crypto();
        let cert = if dir.path().join("cert.pem").exists() {
            TestCert {
                cert: dir.path().join("cert.pem"),
                key: dir.path().join("key.pem"),
                pem: std::fs::read_to_string(dir.path().join("cert.pem")).unwrap(),
            }
        } else {
            make_cert(dir.path())
        };
        let text = format!(
            "state_dir = {state:?}\nhostname = \"relay.test\"\n{top}\n{listeners}\n[[user]]\nname = \"printer\"\npassword_hash = {hash:?}\n",
            state = dir.path().join("state"),
            top = top.replace("{dir}", &dir.path().display().to_string()),
            listeners = listeners
                .replace("{cert}", &cert.cert.display().to_string())
                .replace("{key}", &cert.key.display().to_string()),
            hash = password_hash(),
        );
        let config = relay::config::Config::parse(&text, "test.toml").expect("test config");
        let relay = relay::Relay::start(&config).await.expect("relay starts");
        let addrs = relay.local_addrs().to_vec();
        let sessions = relay.sessions();
        let attempts = relay.delivery_attempts();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            relay
                .run(async {
                    let _ = stopped.await;
                })
                .await
                .expect("relay runs");
        });
        TestRelay {
            dir,
            addrs,
            sessions,
            attempts,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addrs[0]
    }

    pub fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn cert_pem(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("cert.pem")).unwrap()
    }

    /// Waits (bounded) until the server has closed every connection, so that its clean-up has run.
    pub async fn idle(&mut self) {
        tokio::time::timeout(LIMIT, self.sessions.wait_for(|n| *n == 0))
            .await
            .expect("sessions end in time")
            .expect("relay alive");
    }

    /// Waits (bounded) until `n` delivery attempts have finished.
    pub async fn attempts_done(&mut self, n: u64) {
        tokio::time::timeout(LIMIT, self.attempts.wait_for(|done| *done >= n))
            .await
            .expect("delivery attempts in time")
            .expect("relay alive");
    }

    /// Waits (bounded) until the queue is empty, checking after each finished delivery attempt.
    pub async fn drained(&mut self) {
        let state = self.state();
        tokio::time::timeout(
            LIMIT,
            self.attempts.wait_for(|_| queued_in(&state).is_empty()),
        )
        .await
        .expect("the queue empties in time")
        .expect("relay alive");
    }

    /// Stops the relay (clean drain) and gives back its directory for a restart.
    pub async fn stop(mut self) -> tempfile::TempDir {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(LIMIT, task)
                .await
                .expect("stops in time")
                .expect("no panic");
        }
        self.dir
    }

    /// Queued messages: (envelope JSON, message bytes).
    pub fn queued(&self) -> Vec<(serde_json::Value, Vec<u8>)> {
        queued_in(&self.state())
    }
}

/// Queued messages in a state dir: (envelope line as JSON, message bytes), oldest id first.
pub fn queued_in(state: &Path) -> Vec<(serde_json::Value, Vec<u8>)> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(state.join("queue")) else {
        return out;
    };
    let mut paths: Vec<PathBuf> = entries.map(|e| e.unwrap().path()).collect();
    paths.sort();
    for p in paths {
        if p.extension().is_some_and(|e| e == "state") {
            continue;
        }
        assert_eq!(
            p.extension().and_then(|e| e.to_str()),
            Some("msg"),
            "stray file {p:?} in queue/"
        );
        let bytes = match std::fs::read(&p) {
            Ok(b) => b,
            // Delivered (and removed) since the directory was listed: a delivery runs while `drained` looks.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => panic!("{p:?}: {e}"),
        };
        let nl = bytes
            .iter()
            .position(|&b| b == b'\n')
            .expect("envelope line");
        let env: serde_json::Value = serde_json::from_slice(&bytes[..nl]).expect("envelope JSON");
        let message = bytes[nl + 1..].to_vec();
        let seal = env["seal"].as_str().expect("a seal");
        assert!(
            relay::queue::seal::verify(seal, &message),
            "seal does not match {p:?}"
        );
        out.push((env, message));
    }
    out
}

/// Files in a state subdirectory (`queue`, `dead`).
pub fn files_in(state: &Path, sub: &str) -> Vec<String> {
    match std::fs::read_dir(state.join(sub)) {
        Ok(e) => e
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// The message as stored, minus relay's own `Received:` line (its first three lines).
pub fn strip_received(eml: &[u8]) -> &[u8] {
    assert!(
        eml.starts_with(b"Received: from "),
        "no Received line first"
    );
    let mut at = 0;
    for _ in 0..3 {
        at += eml[at..].iter().position(|&b| b == b'\n').unwrap() + 1;
    }
    &eml[at..]
}

/// A message as a client sends it in DATA, without the final dot: dot-stuffed (RFC 5321 section 4.5.2).
pub fn dot_stuffed(message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() + 64);
    let mut at_line_start = true;
    for &b in message {
        if at_line_start && b == b'.' {
            out.push(b'.');
        }
        out.push(b);
        at_line_start = b == b'\n';
    }
    out
}

/// A hand-driven SMTP client for exact bytes and odd inputs.
pub struct RawClient<S> {
    stream: TokioBufReader<S>,
}

impl RawClient<TcpStream> {
    pub async fn connect(addr: SocketAddr) -> RawClient<TcpStream> {
        let tcp = tokio::time::timeout(LIMIT, TcpStream::connect(addr))
            .await
            .unwrap()
            .unwrap();
        RawClient {
            stream: TokioBufReader::new(tcp),
        }
    }

    /// Connected, greeted, and EHLO said.
    pub async fn ready(addr: SocketAddr) -> RawClient<TcpStream> {
        let mut c = Self::connect(addr).await;
        c.expect(220).await;
        c.cmd("EHLO device.lan", 250).await;
        c
    }

    /// Ready, then MAIL FROM:<a@example.com>, RCPT TO:<b@example.com> and DATA: the body comes next.
    pub async fn in_data(addr: SocketAddr) -> RawClient<TcpStream> {
        let mut c = Self::ready(addr).await;
        c.begin_message().await;
        c
    }

    pub fn into_inner(self) -> TcpStream {
        self.stream.into_inner()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> RawClient<S> {
    pub fn new(stream: S) -> Self {
        RawClient {
            stream: TokioBufReader::new(stream),
        }
    }

    /// The socket itself, for byte-by-byte writes.
    pub fn stream_mut(&mut self) -> &mut S {
        self.stream.get_mut()
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        tokio::time::timeout(LIMIT, self.stream.get_mut().write_all(bytes))
            .await
            .unwrap()
            .unwrap();
    }

    /// Reads one (possibly multi-line) reply: its code and full text. `None` if the server closed.
    pub async fn reply(&mut self) -> Option<(u16, String)> {
        let mut text = String::new();
        loop {
            let mut line = String::new();
            let n = tokio::time::timeout(LIMIT, self.stream.read_line(&mut line))
                .await
                .expect("reply in time")
                .ok()?;
            if n == 0 {
                return if text.is_empty() {
                    None
                } else {
                    panic!("truncated reply {text:?}")
                };
            }
            text.push_str(&line);
            if line.len() < 4 || line.as_bytes()[3] == b' ' {
                let code = text[..3].parse().expect("numeric reply");
                return Some((code, text));
            }
        }
    }

    pub async fn expect(&mut self, code: u16) -> String {
        let (got, text) = self.reply().await.expect("a reply, not a close");
        assert_eq!(got, code, "unexpected reply {text:?}");
        text
    }

    /// Sends a command line and checks the reply code.
    pub async fn cmd(&mut self, line: &str, code: u16) -> String {
        self.send(format!("{line}\r\n").as_bytes()).await;
        self.expect(code).await
    }

    /// MAIL, RCPT and DATA on an open session.
    pub async fn begin_message(&mut self) {
        self.cmd("MAIL FROM:<a@example.com>", 250).await;
        self.cmd("RCPT TO:<b@example.com>", 250).await;
        self.cmd("DATA", 354).await;
    }

    /// Sends a line and returns whatever reply comes.
    pub async fn reply_to(&mut self, line: &str) -> (u16, String) {
        self.send(format!("{line}\r\n").as_bytes()).await;
        self.reply().await.expect("a reply, not a close")
    }

    /// Expects a 421 with the enhanced `status` (e.g. "4.7.0"), and the connection closed after it.
    pub async fn expect_421_and_close(&mut self, status: &str) {
        let reply = self.expect(421).await;
        assert!(reply.starts_with(&format!("421 {status} ")), "{reply}");
        assert!(self.closed().await, "still open after {reply:?}");
    }

    /// True once the server has closed the connection (bounded).
    pub async fn closed(&mut self) -> bool {
        let mut buf = Vec::new();
        // Only an end of stream (or a reset) counts: a timeout means the connection is still open.
        matches!(
            tokio::time::timeout(
                LIMIT,
                tokio::io::AsyncReadExt::read_to_end(&mut self.stream, &mut buf)
            )
            .await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }
}

/// Sends one message (body without the final dot) on a fresh connection; returns its queue id.
pub async fn send_message(addr: SocketAddr, body: &[u8]) -> String {
    let mut c = RawClient::in_data(addr).await;
    c.send(body).await;
    c.send(b".\r\n").await;
    let reply = c.expect(250).await;
    c.cmd("QUIT", 221).await;
    reply.trim_end().rsplit(' ').next().unwrap().to_string()
}

/// `relay queue retry ID` with `config`: the message's next attempt now.
pub fn queue_retry(config: &Path, id: &str) {
    let out = Command::new(relay_bin())
        .args(["queue", "retry", id, "--config"])
        .arg(config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A loopback port nobody listens on now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port()
}

/// Whether the tests run as root (some need it: file ownership, Dovecot).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Runs `cmd` to its end with its output captured, within [`LIMIT`]: a hung process is killed and fails the test.
pub fn run_bounded(cmd: &mut Command) -> std::process::Output {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the command starts");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(LIMIT) {
        Ok(out) => out.expect("the command's output"),
        Err(_) => {
            // SAFETY: kill with a valid pid and signal.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            panic!("{cmd:?} did not finish within {LIMIT:?}");
        }
    }
}

/// SIGTERM to `child`, and its exit status within [`LIMIT`]; after that SIGKILL, and `None`.
pub fn terminate_within(child: Child) -> Option<std::process::ExitStatus> {
    // SAFETY: kill with a valid pid and signal.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    wait_within(child)
}

/// `child`'s exit status within [`LIMIT`]; after that SIGKILL, and `None`.
pub fn wait_within(mut child: Child) -> Option<std::process::ExitStatus> {
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    match rx.recv_timeout(LIMIT) {
        Ok(status) => status.ok(),
        Err(_) => {
            // SAFETY: kill with a valid pid and signal.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            None
        }
    }
}

/// A child process stopped (SIGTERM, then SIGKILL after [`LIMIT`]) when dropped, a failed assertion included.
pub struct Stopped(pub Option<Child>);

impl Stopped {
    pub fn child(&mut self) -> &mut Child {
        self.0.as_mut().expect("not stopped yet")
    }

    /// Its exit status once it ends by itself, within [`LIMIT`].
    pub fn wait(mut self) -> Option<std::process::ExitStatus> {
        self.0.take().and_then(wait_within)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        if let Some(child) = self.0.take() {
            terminate_within(child);
        }
    }
}

/// A self-signed certificate for `name`, valid until `not_after` (else a year), marked `CA:TRUE` as `openssl req
/// -x509` marks the certificates it makes, or an end entity's: (PEM certificate, PEM key). `name` is the
/// certificate's only subjectAltName, or with `cn:` before it, its Common Name and no subjectAltName.
pub fn self_signed(name: &str, ca: bool, not_after: Option<(i32, u8, u8)>) -> (String, String) {
    // Each its own subject, as separately made certificates have.
    let (alt_names, common_name) = match name.strip_prefix("cn:") {
        Some(cn) => (vec![], cn.to_string()),
        None => (
            vec![name.to_string()],
            format!("{name} {}", rand::random::<u64>()),
        ),
    };
    let mut params = rcgen::CertificateParams::new(alt_names).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, common_name);
    if ca {
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    }
    if let Some((y, m, d)) = not_after {
        params.not_before = rcgen::date_time_ymd(y - 1, m, d);
        params.not_after = rcgen::date_time_ymd(y, m, d);
    }
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    (cert.pem(), key.serialize_pem())
}

/// `relay status --json` for `config`: its exit code and its document.
pub fn status_json(config: &Path) -> (Option<i32>, serde_json::Value) {
    let out = Command::new(relay_bin())
        .args(["status", "--json", "--config"])
        .arg(config)
        .output()
        .unwrap();
    let json = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    (out.status.code(), json)
}

/// The real `relay` binary running `serve`, with its address read from its own log.
pub struct Daemon {
    pub child: Child,
    pub addr: SocketAddr,
    pub log: std::sync::mpsc::Receiver<String>,
    /// Log lines read but not yet matched.
    seen: Vec<String>,
}

pub fn relay_bin() -> &'static str {
    env!("CARGO_BIN_EXE_relay")
}

impl Daemon {
    pub fn spawn(config: &Path) -> Daemon {
        Daemon::spawn_with(config, |_| {})
    }

    /// [`spawn`](Self::spawn), the command set up by `set` first (a test hook's variable, a limit).
    pub fn spawn_with(config: &Path, set: impl FnOnce(&mut Command)) -> Daemon {
        let mut cmd = Command::new(relay_bin());
        cmd.args(["serve", "--config"]).arg(config);
        set(&mut cmd);
        Daemon::start(cmd)
    }

    /// Starts `cmd` (a `relay serve` command line) and waits for it to listen.
    pub fn start(cmd: Command) -> Daemon {
        let mut daemon = Daemon::launch(cmd);
        let line = daemon.wait_log("relay_event=\"listening\"");
        let addr = line.rsplit("address=").next().unwrap().trim();
        daemon.addr = addr.parse().expect("address in the listening line");
        daemon
    }

    /// Starts `cmd` without waiting for anything (`addr` stays unset).
    pub fn launch(mut cmd: Command) -> Daemon {
        // Info, unless the test asked for more.
        if !cmd.get_envs().any(|(k, _)| k == "RUST_LOG") {
            cmd.env("RUST_LOG", "info");
        }
        let mut child = cmd
            .env_remove("JOURNAL_STREAM")
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("relay binary starts");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Daemon {
            child,
            addr: "0.0.0.0:0".parse().unwrap(),
            log: rx,
            seen: Vec::new(),
        }
    }

    /// Waits (bounded) for a log line containing `needle` and returns it. Lines are matched in order, each
    /// once; lines read while looking for another are kept for later calls.
    pub fn wait_log(&mut self, needle: &str) -> String {
        self.wait_log_any(&[needle])
    }

    /// As [`wait_log`](Self::wait_log), for the first line containing any of `needles`.
    pub fn wait_log_any(&mut self, needles: &[&str]) -> String {
        let matches = |l: &str| needles.iter().any(|n| l.contains(n));
        if let Some(i) = self.seen.iter().position(|l| matches(l)) {
            return self.seen.remove(i);
        }
        let deadline = std::time::Instant::now() + LIMIT;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.log.recv_timeout(left) {
                Ok(line) if matches(&line) => return line,
                Ok(line) => self.seen.push(line),
                Err(e) => panic!("no log line with {needles:?} (seen: {:?}): {e}", self.seen),
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `systemctl reload relay`: SIGHUP, then (bounded) the log line saying the new config was applied, which
    /// is returned. Panics with the reason when relay refuses it.
    pub fn reload(&mut self) -> String {
        // SAFETY: kill with the pid of our own child and a valid signal.
        assert_eq!(unsafe { libc::kill(self.pid() as i32, libc::SIGHUP) }, 0);
        let line =
            self.wait_log_any(&["relay_event=\"reloaded\"", "relay_event=\"reload_refused\""]);
        assert!(line.contains("relay_event=\"reloaded\""), "{line}");
        line
    }

    /// Log lines read so far that no [`wait_log`](Self::wait_log) has matched: after [`start`](Self::start), every
    /// line logged before `listening`.
    pub fn unmatched(&self) -> &[String] {
        &self.seen
    }

    /// SIGTERM, then every line not yet matched, to the daemon's last (bounded): for asserting what it did not
    /// log. The last line is `stopped` if it stopped cleanly.
    pub fn terminate_with_log(mut self) -> Vec<String> {
        // SAFETY: kill with the pid of our own child and a valid signal.
        assert_eq!(unsafe { libc::kill(self.pid() as i32, libc::SIGTERM) }, 0);
        let mut all = std::mem::take(&mut self.seen);
        let deadline = std::time::Instant::now() + LIMIT;
        // Ends when the daemon's stderr closes (it exited), or at the deadline.
        while let Ok(line) = self
            .log
            .recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
        {
            all.push(line);
        }
        all
    }

    /// SIGTERM, then the exit status (bounded).
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let child = std::mem::replace(&mut self.child, Command::new("true").spawn().unwrap());
        terminate_within(child).expect("relay exits after SIGTERM")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes a config file for the binary: one listener (given as TOML lines) and the `printer` user.
pub fn write_config(dir: &Path, listener: &str) -> PathBuf {
    write_config_with(dir, "", listener)
}

/// As [`write_config`], with top-level TOML (`default_account`, `[[account]]`) before the listener; `{dir}` in it
/// is replaced by `dir`.
pub fn write_config_with(dir: &Path, top: &str, listener: &str) -> PathBuf {
    let path = dir.join("relay.toml");
    let text = format!(
        "state_dir = {state:?}\nhostname = \"relay.test\"\n{top}\n[[listener]]\n{listener}\n[[user]]\nname = \"printer\"\npassword_hash = {hash:?}\n",
        state = dir.join("state"),
        top = top.replace("{dir}", &dir.display().to_string()),
        hash = password_hash(),
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// `relay check` run as inside the unit, with systemd's credentials in `creds` (`$CREDENTIALS_DIRECTORY`).
pub fn check_with_credentials(config: &Path, creds: &Path) -> std::process::Output {
    Command::new(relay_bin())
        .args(["check", "--config"])
        .arg(config)
        .env("CREDENTIALS_DIRECTORY", creds)
        .output()
        .unwrap()
}

/// A fake alert webhook: it takes every POST to `/hook` with 204 and keeps it (`received_requests`).
pub async fn fake_webhook() -> wiremock::MockServer {
    let hook = wiremock::MockServer::start().await;
    wiremock::Mock::given(wiremock::matchers::method("POST"))
        .and(wiremock::matchers::path("/hook"))
        .respond_with(wiremock::ResponseTemplate::new(204))
        .mount(&hook)
        .await;
    hook
}

/// The vectors of the 2023 SMTP smuggling research: a fake end of data that some servers honour.
pub const VECTORS: [&[u8]; 5] = [b"\n.\n", b"\n.\r\n", b"\r.\r\n", b"\r\n.\n", b"\r\n.\r"];

/// Whether a vector is how an LF-only client ends its data (a dot line begun or ended by a bare LF): a `reject`
/// listener refuses the message there and closes the connection.
pub fn lf_only_end(vector: &[u8]) -> bool {
    matches!(vector, b"\n.\n" | b"\n.\r\n" | b"\r\n.\n")
}

/// A first message, a smuggling vector, then a whole second transaction that must never be executed.
pub fn smuggling_payload(vector: &[u8]) -> Vec<u8> {
    let mut data = b"From: a@example.com\r\nSubject: first\r\n\r\nfirst message".to_vec();
    data.extend_from_slice(vector);
    data.extend_from_slice(
        b"MAIL FROM:<ceo@example.com>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\nSubject: smuggled\r\n\r\nsmuggled\r\n.\r\n",
    );
    data
}

impl RawClient<TcpStream> {
    /// Connects from a chosen loopback address (all of 127/8 is loopback), to stand for another device.
    pub async fn connect_from(addr: SocketAddr, from: std::net::IpAddr) -> RawClient<TcpStream> {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::new(from, 0)).unwrap();
        let tcp = tokio::time::timeout(LIMIT, socket.connect(addr))
            .await
            .expect("connect in time")
            .expect("connect");
        RawClient::new(tcp)
    }
}

/// A loopback address standing for device number `n` (127.0.0.n).
pub fn device_ip(n: u8) -> std::net::IpAddr {
    std::net::IpAddr::from([127, 0, 0, n])
}

/// Writes `STATE_DIR/tokens/ACCOUNT.json` as `relay authorize` would: an access token valid for `valid_for`,
/// just obtained, with a refresh token, so that the daemon needs no identity provider until then.
pub fn write_valid_tokens(state: &Path, account: &str, access: &str, valid_for: Duration) {
    let now = std::time::SystemTime::now();
    relay::tokens::TokenStore::new(state)
        .save(
            account,
            &relay::tokens::StoredTokens {
                access_token: access.to_string().into(),
                expires_at: now + valid_for,
                obtained_at: now,
                refresh_token: Some("refresh-unused".to_string().into()),
                last_refresh: Some(now),
                needs_authorization: false,
                last_error: None,
            },
        )
        .expect("token file written");
}

/// Reads a field (in KiB) from /proc/PID/status.
pub fn proc_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap()
}

/// Starts `cmd` with this open-file limit (`ulimit -n`, as a unit's `LimitNOFILE=soft:hard` gives it).
pub fn open_file_limit(cmd: &mut Command, soft: u64, hard: u64) {
    use std::os::unix::process::CommandExt;
    // SAFETY: only setrlimit, async-signal-safe, between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let lim = libc::rlimit {
                rlim_cur: soft,
                rlim_max: hard,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// `relay` as an ordinary user runs it: root reads and writes any file, so run as root the binary goes without
/// the capabilities that let it (a file left unreadable to the service's user, a directory it cannot write).
pub fn relay_without_file_override() -> Command {
    if is_root() {
        let mut c = Command::new("setpriv");
        c.args(["--bounding-set", "-dac_override,-dac_read_search", "--"])
            .arg(relay_bin());
        c
    } else {
        Command::new(relay_bin())
    }
}
