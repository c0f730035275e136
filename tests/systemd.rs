//! relay under systemd, with the test playing systemd: it holds the notify socket (`NOTIFY_SOCKET`), sets the
//! watchdog interval (`WATCHDOG_USEC`), and sends the signals systemd sends (SIGHUP for `systemctl reload`,
//! SIGTERM for `systemctl stop`). Also: secrets through `$CREDENTIALS_DIRECTORY`, the exit code that keeps systemd
//! from restarting relay on a bad config, and the unit's hardening score.

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::idp::{account_top, idp_issuing, token};
use common::upstream::FakeUpstream;
use common::*;
use wiremock::matchers::{body_string_contains, method, path};
use wiremock::{Mock, MockServer};

const BODY: &[u8] = b"Subject: via systemd\r\n\r\nhello\r\n";
const UNIT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/systemd/relay.service");
/// The watchdog interval the tests give relay: pings every 250 ms.
const WATCHDOG_USEC: &str = "500000";

/// The service manager's end of the notify socket.
struct Systemd {
    socket: UnixDatagram,
    path: PathBuf,
}

impl Systemd {
    fn bind(dir: &Path) -> Systemd {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("notify socket");
        Systemd { socket, path }
    }

    /// The next notification, if one comes within `wait`.
    fn next_within(&self, wait: Duration) -> Option<String> {
        self.socket
            .set_read_timeout(Some(wait.max(Duration::from_millis(1))))
            .unwrap();
        let mut buf = [0u8; 4096];
        match self.socket.recv(&mut buf) {
            Ok(n) => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                None
            }
            Err(e) => panic!("notify socket: {e}"),
        }
    }

    /// Waits (bounded) for a notification with `needle` in it, skipping others.
    fn wait_for(&self, needle: &str) -> String {
        let deadline = Instant::now() + LIMIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_within(left) {
                Some(n) if n.contains(needle) => return n,
                Some(_) => {}
                None => panic!("no notification with {needle:?} within {LIMIT:?}"),
            }
        }
    }

    /// Everything already sent, without waiting.
    fn drain(&self) -> Vec<String> {
        std::iter::from_fn(|| self.next_within(Duration::from_millis(1))).collect()
    }
}

fn listener_on(port: u16) -> String {
    format!("address = \"127.0.0.1:{port}\"\nauth = \"none\"\n")
}

fn addr(port: u16) -> std::net::SocketAddr {
    std::net::SocketAddr::from(([127, 0, 0, 1], port))
}

/// `relay serve` under the test's "systemd", not waited for.
fn serve(config: &Path, systemd: &Systemd, env: &[(&str, &Path)]) -> Daemon {
    let mut cmd = Command::new(relay_bin());
    cmd.args(["serve", "--config"])
        .arg(config)
        .env("NOTIFY_SOCKET", &systemd.path)
        .env("WATCHDOG_USEC", WATCHDOG_USEC)
        .env_remove("WATCHDOG_PID");
    for (k, v) in env {
        cmd.env(k, v);
    }
    Daemon::launch(cmd)
}

fn signal(daemon: &Daemon, sig: i32) {
    // SAFETY: kill with the pid of our own child and a valid signal.
    assert_eq!(unsafe { libc::kill(daemon.pid() as i32, sig) }, 0);
}

/// Connects and reads the greeting, all within a short bound: the port accepts now.
fn greeted(port: u16) -> bool {
    use std::io::Read;
    let Ok(mut tcp) = std::net::TcpStream::connect_timeout(&addr(port), Duration::from_secs(2))
    else {
        return false;
    };
    tcp.set_read_timeout(Some(LIMIT)).unwrap();
    let mut greeting = [0u8; 3];
    tcp.read_exact(&mut greeting).is_ok() && &greeting == b"220"
}

#[test]
fn ready_status_watchdog_and_stopping_as_systemd_sees_them() {
    let dir = tempfile::tempdir().unwrap();
    let systemd = Systemd::bind(dir.path());
    let port = free_port();
    let config = write_config(dir.path(), &listener_on(port));
    let wedge = dir.path().join("wedge");
    let mut daemon = serve(
        &config,
        &systemd,
        &[("RELAY_TEST_WEDGE_SCHEDULER", wedge.as_path())],
    );

    // Nothing before READY=1, and at READY=1 the port takes a connection.
    let first = systemd.next_within(LIMIT).expect("a notification");
    assert!(first.contains("READY=1"), "first notification: {first:?}");
    assert!(greeted(port), "READY=1 came before the port accepted");
    assert!(
        first.contains("STATUS=queue: 0 queued (0 deferred), 0 dead"),
        "{first:?}"
    );

    // Pings at half the interval, while every loop turns.
    for _ in 0..3 {
        systemd.wait_for("WATCHDOG=1");
    }

    // A wedged scheduler stops the pings: once relay says so, none comes for six ping periods.
    std::fs::write(&wedge, b"").unwrap();
    let stalled = daemon.wait_log("relay_event=\"stalled\"");
    assert!(stalled.contains("delivery scheduler"), "{stalled}");
    systemd.drain();
    let quiet_until = Instant::now() + Duration::from_millis(1500);
    while let Some(n) = systemd.next_within(quiet_until.saturating_duration_since(Instant::now())) {
        assert!(
            !n.contains("WATCHDOG=1"),
            "pinged while the scheduler was stuck"
        );
    }
    // The accept loop is not the one stuck: the port still greets.
    assert!(greeted(port));
    // Unstuck, the pings come back.
    std::fs::remove_file(&wedge).unwrap();
    daemon.wait_log("watchdog pings resume");
    systemd.wait_for("WATCHDOG=1");

    // STATUS= follows the queue (no account: the message stays queued).
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(send_message(addr(port), BODY));
    systemd.wait_for("STATUS=queue: 1 queued (0 deferred), 0 dead");

    signal(&daemon, libc::SIGTERM);
    systemd.wait_for("STOPPING=1");
    let status = daemon.terminate();
    assert!(status.success(), "{status:?}");
    assert!(
        !systemd.drain().iter().any(|n| n.contains("WATCHDOG=1")),
        "pinged after STOPPING=1"
    );
}

/// An identity provider and an upstream that take the token `tok`, and a test directory holding the notify
/// socket.
async fn fakes() -> (MockServer, FakeUpstream, tempfile::TempDir, Systemd) {
    let idp = idp_issuing("tok").await;
    let upstream = FakeUpstream::start(&["tok"]).await;
    let dir = tempfile::tempdir().unwrap();
    let systemd = Systemd::bind(dir.path());
    (idp, upstream, dir, systemd)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_with_a_new_account_delivers_through_it_without_a_restart() {
    let (idp, mut upstream, dir, systemd) = fakes().await;
    let (old_port, new_port) = (free_port(), free_port());
    let config = write_config(dir.path(), &listener_on(old_port));
    let mut daemon = serve(&config, &systemd, &[]);
    systemd.wait_for("READY=1");
    // Queued with no account to go through.
    send_message(addr(old_port), BODY).await;
    systemd.wait_for("STATUS=queue: 1 queued");

    // The new config adds an account and moves the listener.
    let top = account_top(dir.path(), &idp.uri(), &upstream, "");
    write_config_with(dir.path(), &top, &listener_on(new_port));
    signal(&daemon, libc::SIGHUP);
    systemd.wait_for("RELOADING=1");
    let ready = systemd.wait_for("READY=1");
    assert!(ready.contains("STATUS=queue:"), "{ready:?}");
    let reloaded = daemon.wait_log("relay_event=\"reloaded\"");
    assert!(reloaded.contains("accounts added: office"), "{reloaded}");
    assert!(
        reloaded.contains(&format!("opened: 127.0.0.1:{new_port}"))
            && reloaded.contains(&format!("closed: 127.0.0.1:{old_port}")),
        "{reloaded}"
    );

    // The mail that waited goes through the new account, and so does new mail on the new port.
    let got = upstream.next().await;
    assert_eq!(strip_received(&got.data), BODY);
    assert!(got.auth.contains("Bearer tok"));
    assert!(!greeted(old_port), "the old listener still accepts");
    send_message(addr(new_port), BODY).await;
    upstream.next().await;
    daemon.wait_log("relay_event=\"delivered\"");
    daemon.wait_log("relay_event=\"delivered\"");
    // The file goes just after the log line: the status the daemon reports says when.
    systemd.wait_for("STATUS=queue: 0 queued");
    assert!(queued_in(&dir.path().join("state")).is_empty());
    assert!(daemon.terminate().success());
}

/// A reload that takes every account away holds new mail untried, as a start without one does; the reload that
/// brings an account back sends it at once, not at its next retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_without_accounts_holds_mail_until_one_is_back() {
    let (idp, mut upstream, dir, systemd) = fakes().await;
    let port = free_port();
    let top = account_top(dir.path(), &idp.uri(), &upstream, "");
    let config = write_config_with(dir.path(), &top, &listener_on(port));
    let mut daemon = serve(&config, &systemd, &[]);
    systemd.wait_for("READY=1");
    send_message(addr(port), BODY).await;
    upstream.next().await;
    daemon.wait_log("relay_event=\"delivered\"");

    write_config(dir.path(), &listener_on(port));
    signal(&daemon, libc::SIGHUP);
    daemon.wait_log("relay_event=\"reloaded\"");
    let held = send_message(addr(port), BODY).await;

    write_config_with(dir.path(), &top, &listener_on(port));
    signal(&daemon, libc::SIGHUP);
    daemon.wait_log("relay_event=\"reloaded\"");
    upstream.next().await;
    let delivered = daemon.wait_log("relay_event=\"delivered\"");
    assert!(delivered.contains(&held), "{delivered}");
    assert!(
        !daemon
            .unmatched()
            .iter()
            .any(|l| l.contains("relay_event=\"deferred\"")),
        "tried without an account: {:?}",
        daemon.unmatched()
    );
    assert!(daemon.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_with_a_broken_config_keeps_the_running_one() {
    let (idp, mut upstream, dir, systemd) = fakes().await;
    let port = free_port();
    let top = account_top(dir.path(), &idp.uri(), &upstream, "");
    let config = write_config_with(dir.path(), &top, &listener_on(port));
    let good = std::fs::read_to_string(&config).unwrap();
    let mut daemon = serve(&config, &systemd, &[]);
    systemd.wait_for("READY=1");
    send_message(addr(port), BODY).await;
    upstream.next().await;

    // A config that fails validation twice: refused, with its file, keys and reasons in one log line, and in
    // the STATUS= that `systemctl status` shows.
    std::fs::write(
        &config,
        format!(
            "{good}\n[queue]\nretry = [\"soon\"]\n[[user]]\nname = \"bad\"\npassword_hash = \"plain\"\n"
        ),
    )
    .unwrap();
    signal(&daemon, libc::SIGHUP);
    systemd.wait_for("RELOADING=1");
    let ready = systemd.wait_for("READY=1");
    let refused = daemon.wait_log("relay_event=\"reload_refused\"");
    assert!(
        refused.contains(&config.display().to_string())
            && refused.contains("queue.retry")
            && refused.contains("password_hash")
            && refused.contains("problems=2"),
        "{refused}"
    );
    assert!(
        ready.contains("STATUS=queue:")
            && ready.contains("the last reload was refused")
            && ready.contains("queue.retry"),
        "{ready:?}"
    );

    // A valid config that names a certificate relay cannot read, and a listener on a new port: refused as a
    // whole, so the new port is not left bound.
    let other = free_port();
    let tls_listener = format!(
        "{}[[listener]]\naddress = \"127.0.0.1:{other}\"\ntls = \"implicit\"\ncert = \"{}/missing.pem\"\nkey = \"{}/missing.key\"\n",
        listener_on(port),
        dir.path().display(),
        dir.path().display()
    );
    write_config_with(dir.path(), &top, &tls_listener);
    signal(&daemon, libc::SIGHUP);
    let refused = daemon.wait_log("relay_event=\"reload_refused\"");
    assert!(
        refused.contains("listener[1]") && refused.contains("missing.pem"),
        "{refused}"
    );
    // With the key and the reason as fields, as a config that does not parse gets them (journalctl RELAY_KEY=).
    assert!(
        refused.contains("key=\"listener[1].cert\"") && refused.contains("reason="),
        "{refused}"
    );
    assert!(!greeted(other), "a refused reload left a port bound");

    // A TLS listener whose key others can read: refused as at start, with the file, the key and the fix.
    let cert = make_cert(dir.path());
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&cert.key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let tls_listener = format!(
        "{}[[listener]]\naddress = \"127.0.0.1:{other}\"\ntls = \"implicit\"\ncert = {:?}\nkey = {:?}\n",
        listener_on(port),
        cert.cert,
        cert.key
    );
    write_config_with(dir.path(), &top, &tls_listener);
    signal(&daemon, libc::SIGHUP);
    let refused = daemon.wait_log("relay_event=\"reload_refused\"");
    assert!(
        refused.contains("listener[1].key")
            && refused.contains("readable by others")
            && refused.contains("chmod 640"),
        "{refused}"
    );
    assert!(!greeted(other), "a refused reload left a port bound");

    // The running config still accepts and delivers.
    assert!(greeted(port));
    send_message(addr(port), BODY).await;
    let got = upstream.next().await;
    assert_eq!(strip_received(&got.data), BODY);

    // A reload that succeeds clears the word from STATUS=.
    std::fs::write(&config, &good).unwrap();
    signal(&daemon, libc::SIGHUP);
    daemon.wait_log("relay_event=\"reloaded\"");
    // The refused reloads' own READY=1 come first (not waited for above); each wait is bounded, so a word that
    // stays fails here.
    while systemd.wait_for("READY=1").contains("refused") {}
    assert!(daemon.terminate().success());
}

/// What the daemon sets up once at start (the token key, alerts, metrics, bounces) is not changed by a reload:
/// such a change is refused with the key that needs a restart, not dropped silently, and the running config
/// goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_refuses_changes_that_need_a_restart() {
    use std::os::unix::fs::PermissionsExt;
    let (idp, mut upstream, dir, systemd) = fakes().await;
    let port = free_port();
    let top = account_top(dir.path(), &idp.uri(), &upstream, "");
    let config = write_config_with(dir.path(), &top, &listener_on(port));
    let good = std::fs::read_to_string(&config).unwrap();
    let key = dir.path().join("token.key");
    std::fs::write(&key, "ab".repeat(32)).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut daemon = serve(&config, &systemd, &[]);
    systemd.wait_for("READY=1");

    let changes = [
        (
            "token_encryption",
            format!("token_encryption = {key:?}\n{good}"),
        ),
        ("bounce", format!("bounce = \"sender\"\n{good}")),
        (
            "alerts",
            format!("{good}\n[alerts]\nwebhook_url = \"http://127.0.0.1:9/hook\"\n"),
        ),
        (
            "metrics",
            format!(
                "{good}\n[metrics]\naddress = \"127.0.0.1:{}\"\n",
                free_port()
            ),
        ),
    ];
    for (key, text) in changes {
        std::fs::write(&config, text).unwrap();
        signal(&daemon, libc::SIGHUP);
        let refused = daemon.wait_log("relay_event=\"reload_refused\"");
        assert!(
            refused.contains(&format!(": {key}: changing it needs a restart")),
            "{key}: {refused}"
        );
        assert!(refused.contains(&format!("key=\"{key}\"")), "{refused}");
    }

    std::fs::write(&config, &good).unwrap();
    send_message(addr(port), BODY).await;
    let got = upstream.next().await;
    assert_eq!(strip_received(&got.data), BODY);
    assert!(daemon.terminate().success());
}

/// A reload that raises an account's sending limit lets its held mail go at once (not when the old limit's
/// minute ends); one that points the account at another upstream sends new mail there. The counts carry over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_new_limits_and_account_settings_to_queued_mail() {
    let (idp, mut upstream, dir, systemd) = fakes().await;
    let port = free_port();
    let with = |upstream: &FakeUpstream, rate: &str| {
        let top = account_top(dir.path(), &idp.uri(), upstream, rate);
        write_config_with(dir.path(), &top, &listener_on(port))
    };
    let config = with(&upstream, "rate = { per_minute = 1 }");
    let mut daemon = serve(&config, &systemd, &[]);
    systemd.wait_for("READY=1");
    send_message(addr(port), BODY).await;
    upstream.next().await;
    let held = send_message(addr(port), BODY).await;
    assert!(daemon.wait_log("relay_event=\"held\"").contains(&held));

    // Only the limit changes: the account is kept, and its held message goes now.
    with(&upstream, "rate = { per_minute = 5 }");
    signal(&daemon, libc::SIGHUP);
    let reloaded = daemon.wait_log("relay_event=\"reloaded\"");
    assert!(
        reloaded.contains("changed: none") && reloaded.contains("sending limits changed: office"),
        "{reloaded}"
    );
    upstream.next().await;

    // Its upstream changes: the account is rebuilt, and new mail goes to the new one.
    let mut moved = FakeUpstream::start(&["tok"]).await;
    with(&moved, "rate = { per_minute = 5 }");
    signal(&daemon, libc::SIGHUP);
    let reloaded = daemon.wait_log("relay_event=\"reloaded\"");
    assert!(reloaded.contains("changed: office"), "{reloaded}");
    send_message(addr(port), BODY).await;
    moved.next().await;
    assert!(upstream.received.try_recv().is_err());

    // A reload that would rebuild the account with a higher limit but is refused (a listener whose address
    // another program holds) leaves the limit as it was: two more messages make five this minute, the sixth
    // waits. (The rebuilt account's counts took the new limit before the refusal.)
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = holder.local_addr().unwrap().port();
    let third = FakeUpstream::start(&["tok"]).await;
    let top = account_top(dir.path(), &idp.uri(), &third, "rate = { per_minute = 50 }");
    write_config_with(
        dir.path(),
        &top,
        &format!("{}[[listener]]\n{}", listener_on(port), listener_on(taken)),
    );
    signal(&daemon, libc::SIGHUP);
    daemon.wait_log("relay_event=\"reload_refused\"");
    for _ in 0..2 {
        send_message(addr(port), BODY).await;
        moved.next().await;
    }
    let over = send_message(addr(port), BODY).await;
    let held = daemon.wait_log("relay_event=\"held\"");
    assert!(held.contains(&over), "{held}");
    drop(holder);
    with(&moved, "rate = { per_minute = 5 }");
    assert!(daemon.terminate().success());
    let status = Command::new(relay_bin())
        .args(["status", "--json", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(
        json["accounts"][0]["rate"]["messages_this_minute"], 5,
        "every message counted across the reloads: {json}"
    );
}

/// A large queue is checked before the listeners open; systemd is asked for more time as it goes (and told how
/// far it is), so that a big backlog after a reboot does not outlast the start timeout and get relay killed and
/// started again for ever.
#[test]
fn a_long_queue_check_at_start_asks_systemd_for_more_time() {
    let dir = tempfile::tempdir().unwrap();
    let systemd = Systemd::bind(dir.path());
    let port = free_port();
    let config = write_config(dir.path(), &listener_on(port));
    let queue = dir.path().join("state/queue");
    std::fs::create_dir_all(&queue).unwrap();
    // What a crash leaves of messages still arriving (never acknowledged): each is looked at, then removed.
    for n in 0..2500u32 {
        std::fs::write(
            queue.join(format!("01a20a2d0000000000000000{n:08x}.msg")),
            "{\"seal\":\"0000",
        )
        .unwrap();
    }
    let mut daemon = serve(&config, &systemd, &[]);
    let mut extended = Vec::new();
    loop {
        let n = systemd.next_within(LIMIT).expect("a notification");
        if n.contains("READY=1") {
            break;
        }
        assert!(n.contains("EXTEND_TIMEOUT_USEC="), "{n:?}");
        extended.push(n);
    }
    assert_eq!(extended.len(), 2, "{extended:?}");
    assert!(
        extended[1].contains("STATUS=checking the queue before accepting mail: 2000 files so far"),
        "{extended:?}"
    );
    assert!(greeted(port));
    signal(&daemon, libc::SIGTERM);
    assert_eq!(daemon.child.wait().unwrap().code(), Some(0));
}

/// `LoadCredential=office-secret:…` in the unit, `$CREDENTIALS_DIRECTORY/office-secret` in the config: `relay
/// check` shows where it points, and the daemon sends the secret it holds to the token endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_come_from_the_credentials_directory() {
    let idp = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/token"))
        .and(body_string_contains("client_secret=from-credentials"))
        .respond_with(token("tok"))
        .mount(&idp)
        .await;
    let mut upstream = FakeUpstream::start(&["tok"]).await;
    let dir = tempfile::tempdir().unwrap();
    let creds = dir.path().join("credentials");
    std::fs::create_dir(&creds).unwrap();
    let secret = creds.join("office-secret");
    std::fs::write(&secret, "from-credentials\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    // As systemd leaves them: readable by the service's user only.
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o400)).unwrap();
    let top = account_top(dir.path(), &idp.uri(), &upstream, "").replace(
        "client_secret_file = \"{dir}/secret\"",
        "client_secret_file = \"${CREDENTIALS_DIRECTORY}/office-secret\"",
    );
    let config = write_config_with(dir.path(), &top, &listener_on(0));

    let check = |creds: Option<&Path>| {
        let mut cmd = Command::new(relay_bin());
        cmd.args(["check", "--config"]).arg(&config);
        match creds {
            Some(c) => cmd.env("CREDENTIALS_DIRECTORY", c),
            None => cmd.env_remove("CREDENTIALS_DIRECTORY"),
        };
        cmd.output().unwrap()
    };
    let out = check(Some(&creds));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(
        stdout.contains(&format!("client_secret_file = \"{}\"", secret.display())),
        "{stdout}"
    );
    assert!(!stdout.contains("from-credentials"), "a secret printed");

    // From a shell the variable is unset. `relay check`, `status` and `queue` never read the secret: they work,
    // and check says the file is left to the service's start (monitoring runs `relay status` outside the unit).
    let out = check(None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(
        stderr.contains("warning: account[0].client_secret_file")
            && stderr.contains("read when the service starts"),
        "{stderr}"
    );
    for args in [&["status", "--json"][..], &["queue", "list"]] {
        let out = Command::new(relay_bin())
            .args(args)
            .arg("--config")
            .arg(&config)
            .env_remove("CREDENTIALS_DIRECTORY")
            .output()
            .unwrap();
        assert!(
            !String::from_utf8_lossy(&out.stderr).contains("invalid config")
                && matches!(out.status.code(), Some(0 | 1)),
            "{args:?}: {out:?}"
        );
    }
    // The daemon reads it: without the variable, an error that names the file, the key and the cause, exit 2.
    let out = Command::new(relay_bin())
        .args(["serve", "--config"])
        .arg(&config)
        .env_remove("CREDENTIALS_DIRECTORY")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        stderr.contains(&config.display().to_string())
            && stderr.contains("account[0].client_secret_file")
            && stderr.contains("CREDENTIALS_DIRECTORY"),
        "{stderr}"
    );
    // Said once: not also "$CREDENTIALS_DIRECTORY/office-secret: No such file or directory".
    assert!(!stderr.contains("No such file"), "{stderr}");
    assert_eq!(stderr.matches("client_secret_file").count(), 1, "{stderr}");

    let mut daemon = Daemon::spawn_with(&config, |c| {
        c.env("CREDENTIALS_DIRECTORY", &creds);
    });
    send_message(daemon.addr, BODY).await;
    let got = upstream.next().await;
    assert_eq!(strip_received(&got.data), BODY);
    daemon.wait_log("relay_event=\"delivered\"");
}

/// `relay serve` and `relay check` agree on exit 2 for a config that cannot work, and the unit does not restart
/// relay on it.
#[test]
fn an_invalid_config_exits_2_and_the_unit_does_not_restart_on_it() {
    let dir = tempfile::tempdir().unwrap();
    let run = |cmd: &str, config: &Path| {
        Command::new(relay_bin())
            .args([cmd, "--config"])
            .arg(config)
            .env_remove("NOTIFY_SOCKET")
            .output()
            .unwrap()
    };
    // Invalid as written.
    let invalid = write_config(dir.path(), "address = \"127.0.0.1:0\"\nbogus = 1\n");
    for cmd in ["check", "serve"] {
        let out = run(cmd, &invalid);
        assert_eq!(out.status.code(), Some(2), "relay {cmd}: {out:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("bogus"));
    }
    // Valid as written, but its certificate cannot be read: only found when the files are opened.
    let unreadable = write_config(
        dir.path(),
        &format!(
            "address = \"127.0.0.1:0\"\ntls = \"implicit\"\ncert = \"{0}/none.pem\"\nkey = \"{0}/none.key\"\n",
            dir.path().display()
        ),
    );
    for cmd in ["check", "serve"] {
        let out = run(cmd, &unreadable);
        assert_eq!(out.status.code(), Some(2), "relay {cmd}: {out:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("none.pem"));
    }
    let unit = std::fs::read_to_string(UNIT).unwrap();
    assert!(
        unit.lines().any(|l| l == "RestartPreventExitStatus=2"),
        "{unit}"
    );
}

/// The unit's exposure score, as `systemd-analyze security` computes it, stays at 1.5 or less; and the unit
/// verifies (but for the binary, which is not installed here).
#[test]
fn the_unit_is_hardened_to_an_exposure_of_at_most_1_5() {
    let out = match Command::new("systemd-analyze")
        .args(["security", "--offline=yes", UNIT])
        .output()
    {
        Ok(out) => out,
        Err(e) => {
            eprintln!(
                "SKIPPED: systemd-analyze is not available here ({e}); install the systemd package"
            );
            return;
        }
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let score: f64 = text
        .lines()
        .find_map(|l| l.split("Overall exposure level for relay.service: ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "no exposure level in: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    assert!(score <= 1.5, "exposure {score}:\n{text}");

    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no", UNIT])
        .output()
        .unwrap();
    let complaints: Vec<String> = String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| !l.contains("/usr/bin/relay is not executable"))
        .map(str::to_string)
        .collect();
    assert!(
        complaints.is_empty(),
        "systemd-analyze verify: {complaints:?}"
    );
}

/// A daemon under the test's "systemd" with one listener whose `max_connections` reloads change.
struct Resizable {
    dir: tempfile::TempDir,
    _systemd: Systemd,
    port: u16,
    daemon: Daemon,
}

impl Resizable {
    fn start(max: usize) -> Resizable {
        let dir = tempfile::tempdir().unwrap();
        let systemd = Systemd::bind(dir.path());
        let port = free_port();
        let config = Self::write(dir.path(), port, max);
        let daemon = serve(&config, &systemd, &[]);
        systemd.wait_for("READY=1");
        Resizable {
            dir,
            _systemd: systemd,
            port,
            daemon,
        }
    }

    fn write(dir: &Path, port: u16, max: usize) -> std::path::PathBuf {
        write_config(
            dir,
            &format!("{}max_connections = {max}\n", listener_on(port)),
        )
    }

    /// Rewrites the config with `max` and reloads it (SIGHUP), until the daemon says it has.
    fn resize(&mut self, max: usize) {
        Self::write(self.dir.path(), self.port, max);
        signal(&self.daemon, libc::SIGHUP);
        self.daemon.wait_log("relay_event=\"reloaded\"");
    }

    fn addr(&self) -> std::net::SocketAddr {
        addr(self.port)
    }
}

/// `max_connections` lowered by a reload while more sessions are open than the new value: they finish, and count
/// against it, so no new client is taken until enough have ended; raised, the new places are there at once.
/// The open sessions are in the middle of a message, which is never evicted to make room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_lowering_max_connections_counts_the_sessions_already_open() {
    let mut r = Resizable::start(3);
    let mut open = Vec::new();
    for _ in 0..3 {
        open.push(RawClient::in_data(r.addr()).await);
    }
    r.resize(2);
    let mut late = RawClient::connect(r.addr()).await;
    assert_eq!(
        late.reply().await.map(|r| r.0),
        Some(421),
        "3 open, 2 allowed"
    );

    // Two end: one is left, and one newcomer fits (as soon as the ended sessions' places are given back, an
    // instant after their 221).
    for mut c in open.drain(..2) {
        c.send(b"Subject: done\r\n\r\nhi\r\n.\r\n").await;
        c.expect(250).await;
        c.cmd("QUIT", 221).await;
        assert!(c.closed().await);
    }
    let mut second = greeted_within_bounded_tries(r.port).await;
    second.cmd("EHLO device.lan", 250).await;
    second.begin_message().await;
    let mut late = RawClient::connect(r.addr()).await;
    assert_eq!(
        late.reply().await.map(|r| r.0),
        Some(421),
        "2 open, 2 allowed"
    );

    // Raised to 4: two more at once.
    r.resize(4);
    let mut more = Vec::new();
    for _ in 0..2 {
        more.push(RawClient::in_data(r.addr()).await);
    }
    let mut late = RawClient::connect(r.addr()).await;
    assert_eq!(
        late.reply().await.map(|r| r.0),
        Some(421),
        "4 open, 4 allowed"
    );
    // Hung up on mid-message, so that the stop need not wait for them.
    drop((open, second, more));
    assert!(r.daemon.terminate().success());
}

/// Lowered below the sessions open, a listener owes places: the first ones given back are withdrawn. A newcomer
/// then gets in by evicting one more idle, logged-out session than are owed (the flood defence, as when every
/// place is taken); where there are not that many, nobody is hung up on for nothing and the newcomer is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_lowering_max_connections_a_newcomer_evicts_what_is_owed_and_one_more() {
    let mut r = Resizable::start(3);
    let mut idle = Vec::new();
    for _ in 0..3 {
        idle.push(RawClient::ready(r.addr()).await);
    }
    // 3 idle, 2 allowed: one place owed, so two leave and the newcomer is served.
    r.resize(2);
    let mut newcomer = RawClient::connect(r.addr()).await;
    assert_eq!(newcomer.reply().await.map(|r| r.0), Some(220));
    newcomer.cmd("EHLO device.lan", 250).await;
    let mut kept = Vec::new();
    for mut c in idle {
        c.send(b"NOOP\r\n").await;
        match c.reply().await {
            Some((250, _)) => kept.push(c),
            Some((421, _)) | None => {}
            other => panic!("unexpected reply {other:?}"),
        }
    }
    assert_eq!(kept.len(), 1, "one more evicted than was owed");

    // One idle, one in the middle of a message, 1 allowed: one place owed, and only one session could leave,
    // which would admit nobody. So nobody is evicted.
    newcomer.begin_message().await;
    r.resize(1);
    let mut late = RawClient::connect(r.addr()).await;
    assert_eq!(
        late.reply().await.map(|r| r.0),
        Some(421),
        "2 open, 1 allowed"
    );
    kept[0].cmd("NOOP", 250).await;
    drop((kept, newcomer));
    assert!(r.daemon.terminate().success());
}

/// Connects until the greeting is a 220 (each refusal is a 421 and a close), a bounded number of times.
async fn greeted_within_bounded_tries(port: u16) -> RawClient<tokio::net::TcpStream> {
    for _ in 0..200 {
        let mut c = RawClient::connect(addr(port)).await;
        match c.reply().await {
            Some((220, _)) => return c,
            Some((421, _)) | None => tokio::task::yield_now().await,
            other => panic!("unexpected greeting {other:?}"),
        }
    }
    panic!("no place came free");
}

/// `systemctl reload` succeeds whether or not relay took the new config, and `relay status` reads the file as it
/// is now: status says what the daemon runs, an edit not yet applied, and a refused reload (exit 1 until a
/// reload succeeds). A reload repeats no warning the sysadmin has already read.
#[test]
fn relay_status_tells_a_refused_or_pending_reload_and_reloads_repeat_no_warning() {
    let dir = tempfile::tempdir().unwrap();
    // A timeout shorter than devices need: a config warning.
    let listener = "address = \"127.0.0.1:0\"\nauth = \"none\"\ndata_timeout = \"10s\"\n";
    let config = write_config(dir.path(), listener);
    let good = std::fs::read_to_string(&config).unwrap();
    // Started with a relative path, as from a shell in /etc/relay: status from elsewhere still finds it.
    let mut cmd = Command::new(relay_bin());
    cmd.current_dir(dir.path())
        .args(["serve", "--config", "relay.toml"]);
    let mut daemon = Daemon::start(cmd);
    let status = |config: &Path| {
        let out = Command::new(relay_bin())
            .args(["status", "--config"])
            .arg(config)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (_, text) = status(&config);
    assert!(
        text.contains(&format!("daemon: running (pid {}", daemon.pid()))
            && text.contains(&format!("config {} as loaded at", config.display()))
            && !text.contains("has changed")
            && !text.contains("refused"),
        "{text}"
    );

    // Edited, not yet reloaded: a change a reload refuses (it needs a restart), valid for `relay status` to read.
    std::fs::write(&config, format!("bounce = \"sender\"\n{good}")).unwrap();
    let (_, text) = status(&config);
    assert!(
        text.contains("has changed since the daemon loaded it") && !text.contains("refused"),
        "{text}"
    );
    // Reloaded, and refused.
    signal(&daemon, libc::SIGHUP);
    daemon.wait_log("relay_event=\"reload_refused\"");
    let (code, text) = status(&config);
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("the last reload, at")
            && text.contains("was refused")
            && text.contains("bounce")
            && text.contains("has changed since"),
        "{text}"
    );
    let (_, json) = status_json(&config);
    assert_eq!(json["daemon"]["config_changed"], true, "{json}");
    assert!(
        json["daemon"]["reload_refused"]["reason"]
            .as_str()
            .unwrap()
            .contains("bounce"),
        "{json}"
    );

    // A typo, and a reload refused: the status of that very file (the usual case) still says what the state dir
    // knows, with the config's problem (before: the problem alone, exit 2, and nothing on stdout for --json).
    let waiting = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(send_message(daemon.addr, b"Subject: waits\r\n\r\nhi\r\n"));
    std::fs::write(&config, format!("bounce_typo = 1\n{good}")).unwrap();
    signal(&daemon, libc::SIGHUP);
    daemon.wait_log("unknown field `bounce_typo`");
    let (code, text) = status(&config);
    assert_eq!(code, Some(2), "{text}");
    assert!(
        text.contains("is invalid")
            && text.contains(&format!("daemon: running (pid {}", daemon.pid()))
            && text.contains("bounce_typo")
            && text.contains("queue: 1 queued"),
        "{text}"
    );
    let (code, json) = status_json(&config);
    assert_eq!(code, Some(2), "{json}");
    assert_eq!(json["running"], true, "{json}");
    assert_eq!(json["ok"], false, "{json}");
    assert!(
        json["config_error"][0]
            .as_str()
            .unwrap()
            .contains("bounce_typo"),
        "{json}"
    );
    assert!(
        json["daemon"]["reload_refused"]["reason"]
            .as_str()
            .unwrap()
            .contains("bounce_typo"),
        "{json}"
    );
    // The queue can be looked at meanwhile, not acted on.
    let queue = |args: &[&str]| {
        Command::new(relay_bin())
            .args(args)
            .arg("--config")
            .arg(&config)
            .output()
            .unwrap()
    };
    let out = queue(&["queue", "list"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains("is invalid") && err.contains("bounce_typo"),
        "{err}"
    );
    // From the daemon's own state dir.
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&waiting),
        "{out:?}"
    );
    assert_ne!(queue(&["queue", "retry", "--all"]).status.code(), Some(0));

    // Another file than the daemon's.
    let other = dir.path().join("other.toml");
    std::fs::write(&other, &good).unwrap();
    let (_, text) = status(&other);
    assert!(
        text.contains(&format!("the daemon runs {}", config.display())),
        "{text}"
    );

    // Fixed and reloaded: nothing left to say, and the listener's warning, already logged at start, is not
    // logged again.
    std::fs::write(&config, &good).unwrap();
    daemon.reload();
    let (_, text) = status(&config);
    assert!(
        !text.contains("refused") && !text.contains("has changed"),
        "{text}"
    );
    let (_, json) = status_json(&config);
    assert!(json["daemon"]["reload_refused"].is_null(), "{json}");
    let log = daemon.terminate_with_log();
    let warned = log
        .iter()
        .filter(|l| l.contains("WARN") && l.contains("data_timeout"))
        .count();
    assert_eq!(warned, 1, "{log:#?}");
    assert!(
        log.iter()
            .any(|l| l.contains("1 config warning(s) as before")),
        "{log:#?}"
    );
}

/// systemd's soft limit of 1024 open files is too few for listeners at their default connections (two
/// descriptors a session while a message arrives): relay raises its soft limit to the hard one, and says so when
/// even that is below what its max_connections may need.
#[test]
fn the_open_file_limit_is_raised_and_a_too_low_one_is_said() {
    let run = |soft: u64, hard: u64| {
        let dir = tempfile::tempdir().unwrap();
        let config = write_config(dir.path(), &listener_on(0));
        let mut cmd = Command::new(relay_bin());
        cmd.args(["serve", "--config"]).arg(&config);
        open_file_limit(&mut cmd, soft, hard);
        let daemon = Daemon::start(cmd);
        let limits = std::fs::read_to_string(format!("/proc/{}/limits", daemon.pid())).unwrap();
        let open_files = limits
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .unwrap()
            .split_whitespace()
            .skip(3)
            .take(2)
            .map(|n| n.parse::<u64>().unwrap())
            .collect::<Vec<_>>();
        let log = daemon.terminate_with_log();
        (open_files, log, dir)
    };
    // The default listener's 200 sessions may need 656 (two each, and a reserve).
    let (limits, log, _dir) = run(64, 512);
    assert_eq!(limits, [512, 512]);
    assert!(
        log.iter().any(|l| l.contains("WARN")
            && l.contains("may need 656 open files at once, above this process's limit of 512")
            && l.contains("LimitNOFILE=")),
        "{log:#?}"
    );
    let (limits, log, _dir) = run(64, 4096);
    assert_eq!(limits, [4096, 4096]);
    assert!(!log.iter().any(|l| l.contains("open files")), "{log:#?}");
}

/// `[[user]]`s added, changed and removed by a reload take effect at once, and the `reloaded` line says which, and
/// which kept listeners got new settings (it named accounts and listeners opened or closed only, so a sysadmin could
/// not tell that a new device's login or a new connection limit was taken).
#[tokio::test]
async fn a_reload_applies_and_names_the_users_added_changed_and_removed() {
    use base64::Engine;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let listener = format!("address = \"127.0.0.1:{port}\"\nauth = \"required\"\ntls = \"none\"\n");
    let user = |name: &str, hash: &str| {
        format!("[[user]]\nname = \"{name}\"\npassword_hash = \"{hash}\"\n")
    };
    let other = relay::smtp::auth::hash_password("another one").unwrap();
    let config = write_config_with(
        dir.path(),
        &format!(
            "{}{}",
            user("scanner", &password_hash()),
            user("pbx", &password_hash())
        ),
        &listener,
    );
    let mut daemon = Daemon::spawn(&config);
    write_config_with(
        dir.path(),
        &format!("{}{}", user("pbx", &other), user("fax", &password_hash())),
        &format!("{listener}max_connections = 50\n"),
    );
    let reloaded = daemon.reload();
    assert!(
        reloaded.contains("users added: fax, changed: pbx, removed: scanner; routes unchanged"),
        "{reloaded}"
    );
    // The listener kept, with a new limit: said too.
    assert!(
        reloaded.contains(&format!(
            "listeners kept: 1 (settings changed: 127.0.0.1:{port})"
        )),
        "{reloaded}"
    );
    for (name, password, code) in [
        ("fax", PASSWORD, 235),
        ("pbx", "another one", 235),
        ("pbx", PASSWORD, 535),
        ("scanner", PASSWORD, 535),
    ] {
        let mut c = RawClient::connect(addr(port)).await;
        c.expect(220).await;
        c.cmd("EHLO device.lan", 250).await;
        let plain =
            base64::engine::general_purpose::STANDARD.encode(format!("\0{name}\0{password}"));
        let (got, text) = c.reply_to(&format!("AUTH PLAIN {plain}")).await;
        assert_eq!(got, code, "{name}: {text}");
    }
}

/// A listener moved from 127.0.0.1 to 0.0.0.0 on the same port cannot be bound while relay's own listener holds
/// the port: the reload is refused, and says it takes a restart (it said only "Address already in use").
#[test]
fn a_listener_moved_onto_its_own_port_says_it_takes_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = write_config(dir.path(), &listener_on(port));
    let mut daemon = Daemon::spawn(&config);
    write_config(
        dir.path(),
        &format!("address = \"0.0.0.0:{port}\"\nauth = \"none\"\n"),
    );
    signal(&daemon, libc::SIGHUP);
    let refused = daemon.wait_log("relay_event=\"reload_refused\"");
    assert!(
        refused.contains(&format!("relay itself listens on 127.0.0.1:{port}"))
            && refused.contains("takes a restart"),
        "{refused}"
    );
    assert!(greeted(port), "the running listener stays");
}
