//! relay against a real OpenID provider, not a fake: panva's `oidc-provider` (OpenID Certified), run by node from
//! `tests/interop/` (`npm ci` there at first use). It checks what a fake written from the same reading of the
//! RFCs cannot: client authentication by secret (post and basic) and by a signed assertion (private_key_jwt,
//! validated strictly: audience, issuer, lifetime, jti), the device code grant with its real polling errors, the
//! authorization code grant with PKCE through relay's loopback redirect, and refresh tokens rotated at each use
//! (a rotated one sent again would revoke the grant). A person's sign-in is `tests/interop/user.py` filling the
//! provider's forms. Tokens reach a fake SMTP upstream that takes any XOAUTH2 token; each is then checked at the
//! provider's introspection endpoint: active, and issued to the right client.
//! Dovecot's submission server stands in for a self-hosted upstream (it needs root, and Debian's dovecot-core
//! and dovecot-submissiond). Without node (or npm and the registry for the first install), or Dovecot, the tests
//! say SKIPPED.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc::Receiver;
use std::sync::{Mutex, PoisonError};

use common::upstream::{ANY_TOKEN, FakeUpstream, OPEN, xoauth2_token};
use common::*;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
const INTEROP: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/interop");
/// The client the test introspects tokens with (oidc-provider lets any authenticated client do so).
const INTROSPECTOR: (&str, &str) = ("cc-post", "post-secret-0123456789");

/// One install for the tests of this binary, which run at once.
static INSTALL: Mutex<()> = Mutex::new(());

/// Written once `npm ci` has finished: an install cut short must not pass for a done one.
const INSTALLED: &str = "node_modules/.relay-interop-installed";

/// Whether node (18 or later, as oidc-provider 8 needs) and oidc-provider are there, installing the package
/// (pinned by `package-lock.json`, no install scripts) if needed.
fn provider_installed() -> bool {
    let _once = INSTALL.lock().unwrap_or_else(PoisonError::into_inner);
    let major = Command::new("node")
        .args(["-p", "process.versions.node.split('.')[0]"])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|v| v.trim().parse::<u32>().ok());
    match major {
        None => {
            eprintln!("SKIPPED: node is not installed; .ci/run installs it");
            return false;
        }
        Some(v) if v < 18 => {
            eprintln!("SKIPPED: node {v} is too old for oidc-provider 8 (18 or later)");
            return false;
        }
        Some(_) => {}
    }
    let dir = Path::new(INTEROP);
    if dir.join(INSTALLED).exists() {
        return true;
    }
    let npm = Command::new("timeout")
        .args([
            "300",
            "npm",
            "ci",
            "--ignore-scripts",
            "--no-audit",
            "--no-fund",
        ])
        .current_dir(dir)
        .output();
    match npm {
        Ok(out) if out.status.success() => {
            std::fs::write(dir.join(INSTALLED), b"").unwrap();
            true
        }
        Ok(out) => {
            eprintln!(
                "SKIPPED: `npm ci` in tests/interop failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            false
        }
        Err(e) => {
            eprintln!("SKIPPED: cannot run npm ({e})");
            false
        }
    }
}

/// Lines a child prints, read on a thread so that every wait for one is bounded. Read to the end even once
/// nobody listens: a closed pipe would kill the child at its next line.
fn lines_of(out: impl std::io::Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    rx
}

/// The next line of `rx` containing `needle`, within the tests' limit.
fn line_with(rx: &Receiver<String>, needle: &str) -> String {
    line_with_any(rx, &[needle])
}

/// The next line of `rx` containing any of `needles`, within the tests' limit (one deadline for them all).
fn line_with_any(rx: &Receiver<String>, needles: &[&str]) -> String {
    let deadline = std::time::Instant::now() + LIMIT;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if needles.iter().any(|n| line.contains(n)) => return line,
            Ok(line) => seen.push(line),
            Err(e) => panic!("no line with any of {needles:?} ({e}); seen: {seen:#?}"),
        }
    }
}

struct Provider {
    _node: Stopped,
    url: String,
}

impl Provider {
    /// Access tokens live `ttl` seconds.
    fn start(ttl: u32) -> Provider {
        // Owned before the wait, so that a provider that never says it listens is stopped all the same.
        let mut node = Stopped(Some(
            Command::new("node")
                .arg(Path::new(INTEROP).join("idp.mjs"))
                .env("CERT", format!("{FIXTURES}/rsa-cert.pem"))
                .env("AT_TTL", ttl.to_string())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("node starts"),
        ));
        let out = lines_of(node.child().stdout.take().expect("piped"));
        let port = line_with(&out, "listening ")
            .rsplit(' ')
            .next()
            .map(str::to_string)
            .unwrap_or_default();
        Provider {
            _node: node,
            url: format!("http://127.0.0.1:{port}"),
        }
    }

    /// RFC 7662 introspection of an access token: (active, client_id).
    async fn introspect(&self, token: &str) -> (bool, String) {
        let reply: serde_json::Value = reqwest::Client::builder()
            .timeout(LIMIT)
            .build()
            .unwrap()
            .post(format!("{}/token/introspection", self.url))
            .form(&[
                ("token", token),
                ("client_id", INTROSPECTOR.0),
                ("client_secret", INTROSPECTOR.1),
            ])
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        (
            reply["active"] == true,
            reply["client_id"].as_str().unwrap_or("").to_string(),
        )
    }
}

/// An `[[account]]` of the generic provider at `idp`, delivering to `upstream`.
fn account(name: &str, idp: &str, upstream: &FakeUpstream, more: &str) -> String {
    format!(
        "[[account]]\nname = \"{name}\"\nprovider = \"generic\"\nmailbox = \"{name}@example.com\"\ntoken_url = \"{idp}/token\"\nsmtp_host = \"127.0.0.1\"\nsmtp_port = {}\nsmtp_tls = \"none\"\n{more}\n",
        upstream.addr.port()
    )
}

fn secret(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    write_private(&path, text);
    path
}

/// `relay test ACCOUNT`, which must deliver; its transcript.
fn relay_test(config: &Path, account: &str) -> String {
    let out = run_bounded(
        Command::new(relay_bin())
            .args(["test", account, "--to", "someone@example.com", "--config"])
            .arg(config),
    );
    let transcript = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{account}: {transcript}");
    transcript
}

/// Client credentials three ways: a secret in the form, a secret in HTTP Basic, and a signed assertion
/// (private_key_jwt, PS256 with x5t#S256, relay's default), each through `relay test` to the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_credentials_by_secret_and_by_assertion() {
    if !provider_installed() {
        return;
    }
    let idp = Provider::start(3600);
    let mut upstream = FakeUpstream::start(&[ANY_TOKEN]).await;
    let dir = tempfile::tempdir().unwrap();
    let post = secret(dir.path(), "post", INTROSPECTOR.1);
    let basic = secret(dir.path(), "basic", "basic-secret-0123456789\n");
    let key = dir.path().join("key.pem");
    write_private(
        &key,
        std::fs::read(format!("{FIXTURES}/rsa-key.pem")).unwrap(),
    );
    let cc = "flow = \"client_credentials\"\nscope = \"mail\"\n";
    let mut config = format!("state_dir = {:?}\n", dir.path().join("state"));
    config += &account(
        "post",
        &idp.url,
        &upstream,
        &format!("{cc}client_id = \"cc-post\"\nclient_secret_file = {post:?}"),
    );
    config += &account(
        "basic",
        &idp.url,
        &upstream,
        &format!(
            "{cc}client_id = \"cc-basic\"\nclient_auth = \"client_secret_basic\"\nclient_secret_file = {basic:?}"
        ),
    );
    config += &account(
        "jwt",
        &idp.url,
        &upstream,
        &format!(
            "{cc}client_id = \"cc-jwt\"\ncertificate_file = \"{FIXTURES}/rsa-cert.pem\"\nprivate_key_file = {key:?}"
        ),
    );
    let path = dir.path().join("relay.toml");
    std::fs::write(&path, config).unwrap();
    for (account, client) in [
        ("post", "cc-post"),
        ("basic", "cc-basic"),
        ("jwt", "cc-jwt"),
    ] {
        relay_test(&path, account);
        let got = upstream.next().await;
        assert_eq!(got.from, format!("{account}@example.com"));
        let (active, issued_to) = idp.introspect(xoauth2_token(&got.auth)).await;
        assert!(active, "{account}: the provider's own token");
        assert_eq!(issued_to, client);
    }
}

/// Runs `relay authorize ACCOUNT` while `user.py` plays the person: with the device code it prints, or at the
/// authorization URL it prints (the browser then comes back to relay's loopback redirect). Waits for relay to
/// say the tokens are stored.
fn authorize(config: &Path, account: &str, idp: &str) {
    let mut relay = Stopped(Some(
        Command::new(relay_bin())
            .args(["authorize", account, "--config"])
            .arg(config)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    ));
    let out = lines_of(relay.child().stdout.take().expect("piped"));
    let mut user = Command::new("python3");
    user.arg(Path::new(INTEROP).join("user.py"));
    let first = line_with(&out, "To let relay send as");
    if first.contains("open this address") {
        let url = line_with(&out, "http");
        user.args([url.trim(), &format!("{account}@example.com")]);
    } else {
        let code = line_with(&out, "Enter the code ");
        let code = code.rsplit(' ').next().unwrap_or_default().to_string();
        user.args([
            &format!("{idp}/device"),
            &format!("{account}@example.com"),
            &code,
        ]);
    }
    let signed_in = run_bounded(&mut user);
    assert!(
        signed_in.status.success(),
        "{}",
        String::from_utf8_lossy(&signed_in.stderr)
    );
    line_with(&out, "Authorized ");
    assert!(relay.wait().is_some_and(|s| s.success()));
}

/// The two grants a person makes (device code; authorization code with PKCE, the browser coming back to relay's
/// loopback listener on a port of its choosing, RFC 8252), then refreshes whose refresh tokens the provider
/// rotates each time: an upstream refusing the access token makes relay refresh (and retry
/// once), twice in a row, so that the second refresh must use the refresh token the first was given in exchange
/// (the one before it is dead, and sending it again would revoke the grant). Then the mail goes with the last
/// token, which the provider knows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grants_a_person_makes_and_their_rotated_refreshes() {
    if !provider_installed() {
        return;
    }
    let idp = Provider::start(3600);
    // Refuses every token until the end.
    let mut upstream = FakeUpstream::start(&[]).await;
    let dir = tempfile::tempdir().unwrap();
    let web = secret(dir.path(), "web", "web-secret-0123456789");
    let person = "scope = \"openid offline_access mail\"\n";
    let mut config = format!(
        "state_dir = {:?}\n[[listener]]\naddress = \"127.0.0.1:0\"\nauth = \"none\"\n[[route]]\nsender = \"*@web.lan\"\naccount = \"web\"\n[[route]]\nsender = \"*\"\naccount = \"dev\"\n",
        dir.path().join("state")
    );
    config += &account(
        "dev",
        &idp.url,
        &upstream,
        &format!(
            "{person}flow = \"device_code\"\nclient_id = \"dev\"\ndevice_authorization_url = \"{}/device/auth\"",
            idp.url
        ),
    );
    config += &account(
        "web",
        &idp.url,
        &upstream,
        &format!(
            "{person}flow = \"authorization_code\"\nclient_id = \"web\"\nclient_secret_file = {web:?}\nauthorization_url = \"{}/auth\"",
            idp.url
        ),
    );
    let path = dir.path().join("relay.toml");
    std::fs::write(&path, config).unwrap();
    authorize(&path, "dev", &idp.url);
    authorize(&path, "web", &idp.url);

    let mut daemon = Daemon::spawn(&path);
    let mut ids = Vec::new();
    for sender in ["a@dev.lan", "b@web.lan"] {
        let mut device = RawClient::ready(daemon.addr).await;
        device.cmd(&format!("MAIL FROM:<{sender}>"), 250).await;
        device.cmd("RCPT TO:<x@example.com>", 250).await;
        device.cmd("DATA", 354).await;
        let queued = device.cmd("Subject: interop\r\n\r\nhi\r\n.", 250).await;
        ids.push(
            queued
                .trim_end()
                .rsplit(' ')
                .next()
                .unwrap_or_default()
                .to_string(),
        );
    }
    for round in 0..2 {
        for account in ["dev", "web"] {
            daemon.wait_log(&format!(
                "relay_event=\"token_refreshed\" relay_account={account}"
            ));
            daemon.wait_log(&format!(
                "relay_event=\"deferred\" relay_queue_id={}",
                ids[usize::from(account == "web")]
            ));
        }
        if round == 0 {
            queue_retry(&path, "--all");
        }
    }
    upstream.tokens.lock().unwrap().push(ANY_TOKEN.into());
    queue_retry(&path, "--all");
    for _ in 0..2 {
        let got = upstream.next().await;
        let client = got.from.split('@').next().unwrap_or_default().to_string();
        let (active, issued_to) = idp.introspect(xoauth2_token(&got.auth)).await;
        assert!(active, "{client}: a token the provider knows");
        assert_eq!(issued_to, client);
    }
    assert!(daemon.terminate().success());
}

/// Dovecot's submission server, run in the foreground; stopped (with its children) when dropped.
struct Dovecot {
    _master: Stopped,
    port: u16,
}

impl Dovecot {
    /// Starts it with the config `conf` writes for a port, on a free port (another, where that one was taken
    /// meanwhile), and waits until it says it is up. `None` (SKIPPED said) where Dovecot's submission server is
    /// not installed, or not as root (its master drops privileges to its own users).
    fn start(conf: impl Fn(u16) -> PathBuf) -> Option<Dovecot> {
        if !Path::new("/usr/sbin/dovecot").exists()
            || !Path::new("/usr/lib/dovecot/submission").exists()
            || !is_root()
        {
            eprintln!(
                "SKIPPED: Dovecot's submission server needs the dovecot-core and dovecot-submissiond packages and root (.ci/run installs them)"
            );
            return None;
        }
        for _ in 0..5 {
            let port = free_port();
            let mut master = Stopped(Some(
                Command::new("/usr/sbin/dovecot")
                    .args(["-F", "-c"])
                    .arg(conf(port))
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped())
                    .spawn()
                    .expect("dovecot starts"),
            ));
            let log = lines_of(master.child().stderr.take().expect("piped"));
            let line = line_with_any(&log, &["starting up", "Address already in use"]);
            if line.contains("starting up") {
                return Some(Dovecot {
                    _master: master,
                    port,
                });
            }
        }
        panic!("Dovecot found no free port in 5 tries");
    }
}

/// A Dovecot submission config: listening on `port` with STARTTLS (OpenSSL, `dir`'s cert.pem and key.pem),
/// checking OAuth logins (`mechanisms`) by introspection at `idp`, relaying what it takes to `relay_port`
/// (trusted, no AUTH).
fn dovecot_conf(dir: &Path, port: u16, mechanisms: &str, idp: &str, relay_port: u16) -> PathBuf {
    let home = dir.join("home");
    std::fs::create_dir_all(&home).unwrap();
    // The submission process runs as `nobody` (the static userdb below) and must reach its home.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o777)).unwrap();
    let (client, secret) = INTROSPECTOR;
    let host = idp.trim_start_matches("http://");
    let oauth2 = dir.join("oauth2.conf");
    std::fs::write(
        &oauth2,
        format!(
            "introspection_mode = post\nintrospection_url = http://{client}:{secret}@{host}/token/introspection\nusername_attribute = sub\nactive_attribute = active\nactive_value = true\nforce_introspection = yes\n"
        ),
    )
    .unwrap();
    let conf = dir.join("dovecot.conf");
    std::fs::write(
        &conf,
        format!(
            "protocols = submission\nlisten = 127.0.0.1\nbase_dir = {base}\nstate_dir = {state}\nlog_path = /dev/stderr\nssl = yes\nssl_cert = <{cert}\nssl_key = <{key}\ndisable_plaintext_auth = no\nauth_mechanisms = {mechanisms}\nhostname = dovecot.test\nmail_location = maildir:~/Maildir\npassdb {{\n  driver = oauth2\n  mechanisms = {mechanisms}\n  args = {oauth2}\n}}\nuserdb {{\n  driver = static\n  args = uid=nobody gid=nogroup home={home}/%u\n}}\nservice submission-login {{\n  inet_listener submission {{\n    port = {port}\n  }}\n}}\nsubmission_relay_host = 127.0.0.1\nsubmission_relay_port = {relay_port}\nsubmission_relay_trusted = yes\n",
            base = dir.join("run").display(),
            cert = dir.join("cert.pem").display(),
            key = dir.join("key.pem").display(),
            state = dir.join("state").display(),
            oauth2 = oauth2.display(),
            home = home.display(),
        ),
    )
    .unwrap();
    conf
}

/// A third-party submission server as the upstream: Dovecot, which offers CHUNKING and PIPELINING, speaks
/// STARTTLS through OpenSSL with a self-signed certificate, and checks each XOAUTH2 (then OAUTHBEARER) login by
/// asking the provider whether the token is active and whose it is.
/// The daemon sends a backlog through it (pooled connections, BDAT), then `relay test` logs in with OAUTHBEARER
/// where Dovecot offers nothing else. What Dovecot passes on arrives intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_dovecot_submission_checking_tokens_at_the_provider() {
    if !provider_installed() {
        return;
    }
    let idp = Provider::start(3600);
    let mut sink = FakeUpstream::start(&[OPEN]).await;
    let dir = tempfile::tempdir().unwrap();
    let dovecot_dir = dir.path().join("dovecot");
    std::fs::create_dir_all(&dovecot_dir).unwrap();
    // Self-signed and marked CA:TRUE, as `openssl req -x509` makes them: relay trusts it through `ca_file`.
    let (cert, key) = self_signed("localhost", true, None);
    std::fs::write(dovecot_dir.join("cert.pem"), cert).unwrap();
    write_private(&dovecot_dir.join("key.pem"), key);
    let sink_port = sink.addr.port();
    let conf = |mechanisms: &'static str| {
        let (dir, idp) = (dovecot_dir.clone(), idp.url.clone());
        move |port| dovecot_conf(&dir, port, mechanisms, &idp, sink_port)
    };
    let Some(dovecot) = Dovecot::start(conf("xoauth2 oauthbearer")) else {
        return;
    };
    let config = |port: u16| {
        format!(
            "state_dir = {state:?}\ndefault_account = \"dev\"\n[[listener]]\naddress = \"127.0.0.1:0\"\nauth = \"none\"\n[[account]]\nname = \"dev\"\nprovider = \"generic\"\nmailbox = \"dev@example.com\"\ntoken_url = \"{idp}/token\"\nsmtp_host = \"localhost\"\nsmtp_port = {port}\nsmtp_tls = \"starttls\"\nca_file = {ca:?}\nscope = \"openid offline_access mail\"\nflow = \"device_code\"\nclient_id = \"dev\"\ndevice_authorization_url = \"{idp}/device/auth\"\n",
            state = dir.path().join("state"),
            idp = idp.url,
            ca = dovecot_dir.join("cert.pem"),
        )
    };
    let path = dir.path().join("relay.toml");
    std::fs::write(&path, config(dovecot.port)).unwrap();
    authorize(&path, "dev", &idp.url);

    let daemon = Daemon::spawn(&path);
    let body = |i: usize| {
        format!(
            "Subject: dovecot {i}\r\n\r\n{}",
            format!("line {i}\r\n").repeat(500)
        )
    };
    for i in 0..20 {
        let mut device = RawClient::ready(daemon.addr).await;
        device.begin_message().await;
        device.cmd(&format!("{}.", body(i)), 250).await;
    }
    let mut seen = std::collections::HashSet::new();
    for _ in 0..20 {
        let got = sink.next().await;
        let text = String::from_utf8_lossy(&got.data).into_owned();
        let i = (0..20)
            .find(|&i| text.ends_with(&body(i)))
            .unwrap_or_else(|| panic!("not one of the messages, or not intact: {text:.300}"));
        assert!(seen.insert(i));
        assert_eq!(got.from, "dev@example.com");
    }
    assert!(daemon.terminate().success());
    drop(dovecot);

    // A Dovecot that offers OAUTHBEARER only (on a port of its own: the last one's may still be held).
    let Some(dovecot) = Dovecot::start(conf("oauthbearer")) else {
        return;
    };
    std::fs::write(&path, config(dovecot.port)).unwrap();
    let transcript = relay_test(&path, "dev");
    assert!(transcript.contains("C: STARTTLS"), "{transcript}");
    assert!(transcript.contains("C: AUTH OAUTHBEARER"), "{transcript}");
    sink.next().await;
}
