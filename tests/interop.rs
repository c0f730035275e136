//! relay against a real OpenID provider, not a fake: panva's `oidc-provider` (OpenID Certified), run by node from
//! `tests/interop/` (`npm ci` there at first use). It checks what a fake written from the same reading of the
//! RFCs cannot: client authentication by secret (post and basic) and by a signed assertion (private_key_jwt,
//! validated strictly: audience, issuer, lifetime, jti), the device code grant with its real polling errors, the
//! authorization code grant with PKCE through relay's loopback redirect, and refresh tokens rotated at each use
//! (a rotated one sent again would revoke the grant). A person's sign-in is `tests/interop/user.py` filling the
//! provider's forms. Tokens reach a fake SMTP upstream that takes any XOAUTH2 token; each is then checked at the
//! provider's introspection endpoint: active, and issued to the right client.
//! Without node (or npm and the registry for the first install) the tests say SKIPPED.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::Receiver;
use std::sync::{Mutex, PoisonError};

use common::upstream::{ANY_TOKEN, FakeUpstream};
use common::*;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
const INTEROP: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/interop");
/// The client the test introspects tokens with (oidc-provider lets any authenticated client do so).
const INTROSPECTOR: (&str, &str) = ("cc-post", "post-secret-0123456789");

/// One install for the tests of this binary, which run at once.
static INSTALL: Mutex<()> = Mutex::new(());

/// Whether node and oidc-provider are there, installing the package (pinned by `package-lock.json`) if needed.
fn provider_installed() -> bool {
    let _once = INSTALL.lock().unwrap_or_else(PoisonError::into_inner);
    if let Err(e) = Command::new("node").arg("--version").output() {
        eprintln!("SKIPPED: node is not installed ({e}); .ci/run installs it");
        return false;
    }
    if Path::new(INTEROP)
        .join("node_modules/oidc-provider")
        .exists()
    {
        return true;
    }
    let npm = Command::new("timeout")
        .args(["300", "npm", "ci", "--no-audit", "--no-fund"])
        .current_dir(INTEROP)
        .output();
    match npm {
        Ok(out) if out.status.success() => true,
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
    let deadline = std::time::Instant::now() + LIMIT;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.contains(needle) => return line,
            Ok(_) => {}
            Err(e) => panic!("no line with {needle:?}: {e}"),
        }
    }
}

struct Provider {
    child: Child,
    url: String,
}

impl Provider {
    /// Access tokens live `ttl` seconds; `redirect` is the web client's registered redirect URI.
    fn start(ttl: u32, redirect: &str) -> Provider {
        let mut child = Command::new("node")
            .arg(Path::new(INTEROP).join("idp.mjs"))
            .env("CERT", format!("{FIXTURES}/rsa-cert.pem"))
            .env("AT_TTL", ttl.to_string())
            .env("REDIRECT", redirect)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("node starts");
        let out = lines_of(child.stdout.take().expect("piped"));
        let port = line_with(&out, "listening ")
            .rsplit(' ')
            .next()
            .map(str::to_string)
            .unwrap_or_default();
        Provider {
            child,
            url: format!("http://127.0.0.1:{port}"),
        }
    }

    /// RFC 7662 introspection of an access token: (active, client_id).
    async fn introspect(&self, token: &str) -> (bool, String) {
        let reply: serde_json::Value = reqwest::Client::new()
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

impl Drop for Provider {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The token of an XOAUTH2 initial response as the upstream decoded it.
fn bearer(auth: &str) -> &str {
    auth.split("auth=Bearer ")
        .nth(1)
        .unwrap_or("")
        .trim_end_matches('\x01')
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

/// Client credentials three ways: a secret in the form, a secret in HTTP Basic, and a signed assertion
/// (private_key_jwt, PS256 with x5t#S256, relay's default), each through `relay test` to the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_credentials_by_secret_and_by_assertion() {
    if !provider_installed() {
        return;
    }
    let idp = Provider::start(3600, "http://127.0.0.1:9/");
    let mut upstream = FakeUpstream::start(&[ANY_TOKEN]).await;
    let dir = tempfile::tempdir().unwrap();
    let post = secret(dir.path(), "post", "post-secret-0123456789");
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
        let out = Command::new(relay_bin())
            .args(["test", account, "--to", "someone@example.com", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{account}: {text}");
        let got = upstream.next().await;
        assert_eq!(got.from, format!("{account}@example.com"));
        let (active, issued_to) = idp.introspect(bearer(&got.auth)).await;
        assert!(active, "{account}: the provider's own token");
        assert_eq!(issued_to, client);
    }
}

/// Runs `relay authorize ACCOUNT` while `user.py` plays the person: with the device code it prints, or at the
/// authorization URL it prints (the browser then comes back to relay's loopback redirect). Waits for relay to
/// say the tokens are stored.
fn authorize(config: &Path, account: &str, idp: &str) {
    let mut relay = Command::new(relay_bin())
        .args(["authorize", account, "--config"])
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let out = lines_of(relay.stdout.take().expect("piped"));
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
    let signed_in = user.output().unwrap();
    assert!(
        signed_in.status.success(),
        "{}",
        String::from_utf8_lossy(&signed_in.stderr)
    );
    line_with(&out, "Authorized ");
    assert!(relay.wait().unwrap().success());
}

/// The two grants a person makes (device code; authorization code with PKCE), then refreshes whose refresh
/// tokens the provider rotates each time: an upstream refusing the access token makes relay refresh (and retry
/// once), twice in a row, so that the second refresh must use the refresh token the first was given in exchange
/// (the one before it is dead, and sending it again would revoke the grant). Then the mail goes with the last
/// token, which the provider knows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grants_a_person_makes_and_their_rotated_refreshes() {
    if !provider_installed() {
        return;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    let redirect = format!("http://127.0.0.1:{port}/");
    let idp = Provider::start(3600, &redirect);
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
            "{person}flow = \"authorization_code\"\nclient_id = \"web\"\nclient_secret_file = {web:?}\nauthorization_url = \"{}/auth\"\nredirect_uri = \"{redirect}\"",
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
        let (active, issued_to) = idp.introspect(bearer(&got.auth)).await;
        assert!(active, "{client}: a token the provider knows");
        assert_eq!(issued_to, client);
    }
    assert!(daemon.terminate().success());
}
