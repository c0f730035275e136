//! The real `relay` binary: check, hash-password, serve, queue commands, status, memory while streaming.

mod common;

use std::process::Command;

use common::*;

fn relay(args: &[&str]) -> std::process::Output {
    Command::new(relay_bin())
        .args(args)
        .output()
        .expect("relay runs")
}

fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).into_owned()
}

#[test]
fn check_prints_resolved_config_with_secrets_redacted() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "address = \"127.0.0.1:0\"\nauth = \"required\"");
    let out = relay(&["check", "--config", config.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("password_hash = \"[redacted]\""),
        "{stdout}"
    );
    assert!(!stdout.contains("$argon2id$"), "hash leaked: {stdout}");
    assert!(
        stdout.contains("bare_lf = \"reject\""),
        "defaults shown: {stdout}"
    );
    // The global option works after the subcommand's own words too.
    let out = Command::new(relay_bin())
        .args(["--config", config.to_str().unwrap(), "check"])
        .output()
        .unwrap();
    assert!(out.status.success());
}

/// `relay check` shows where mail to `<postmaster>` goes, and a bad `postmaster` fails with its key.
#[test]
fn check_shows_the_postmaster_address_and_refuses_a_bad_one() {
    let dir = tempfile::tempdir().unwrap();
    let listener = "address = \"127.0.0.1:0\"\nauth = \"required\"";
    let config = write_config_with(dir.path(), "postmaster = \"it@example.com\"", listener);
    let out = relay(&["check", "--config", config.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("postmaster = \"it@example.com\""),
        "{}",
        text(&out.stdout)
    );
    let config = write_config_with(dir.path(), "postmaster = \"it @example.com\"", listener);
    let out = relay(&["check", "--config", config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("relay.toml: postmaster: `it @example.com` is not a plain address"),
        "{stderr}"
    );
}

/// `relay queue list | head -1`: a reader that goes away ends the command as it ends `ls` (SIGPIPE), without a
/// panic and its backtrace on stderr.
#[test]
fn a_closed_pipe_ends_the_printing_commands_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "address = \"127.0.0.1:0\"");
    for args in [&["queue", "list"][..], &["status"], &["check"]] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = Command::new(relay_bin())
            .args(args)
            .arg("--config")
            .arg(&config)
            .stdout(writer)
            .output()
            .unwrap();
        assert_eq!(
            out.status.signal(),
            Some(libc::SIGPIPE),
            "{args:?}: {out:?}"
        );
        assert!(
            !text(&out.stderr).contains("panicked"),
            "{args:?}: {}",
            text(&out.stderr)
        );
    }
}

#[test]
fn check_warns_about_a_legacy_tls_listener() {
    let dir = tempfile::tempdir().unwrap();
    let cert = make_cert(dir.path());
    let listener = format!(
        "address = \"127.0.0.1:0\"\ntls = \"auto\"\ntls_compat = \"legacy\"\ncert = {:?}\nkey = {:?}",
        cert.cert, cert.key
    );
    let config = write_config(dir.path(), &listener);
    let out = relay(&["check", "--config", config.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.contains("warning: listener[0]") && err.contains("weaker"),
        "{err}"
    );
    let stdout = text(&out.stdout);
    assert!(stdout.contains("tls_compat = \"legacy\""), "{stdout}");
    assert!(stdout.contains("tls = \"auto\""), "{stdout}");
}

/// A listener open to public addresses without a login, and a config without any listener, are valid but
/// almost never meant: `relay check` says so, and so does the daemon's log at start.
#[test]
fn check_and_serve_warn_about_an_open_listener_and_a_config_without_listeners() {
    let dir = tempfile::tempdir().unwrap();
    // On every address (a listener bound to loopback hears no one public, whatever its allow list).
    let config = write_config(
        dir.path(),
        "address = \"0.0.0.0:0\"\nauth = \"optional\"\nallow = [\"0.0.0.0/0\"]",
    );
    let out = relay(&["check", "--config", config.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.contains("warning: listener[0]")
            && err.contains("without a login from public addresses"),
        "{err}"
    );
    let daemon = Daemon::spawn(&config);
    let line = daemon
        .unmatched()
        .iter()
        .find(|l| l.contains("without a login from public addresses"))
        .cloned();
    assert!(
        line.is_some_and(|l| l.contains("WARN")),
        "{:?}",
        daemon.unmatched()
    );
    assert!(daemon.terminate().success());

    let empty = dir.path().join("empty.toml");
    std::fs::write(
        &empty,
        format!("state_dir = {:?}\n", dir.path().join("state2")),
    )
    .unwrap();
    let out = relay(&["check", "--config", empty.to_str().unwrap()]);
    assert!(out.status.success());
    assert!(
        text(&out.stderr).contains("no [[listener]] is configured"),
        "{}",
        text(&out.stderr)
    );
}

/// `relay status` and `relay queue` read the state dir only: a sysadmin who may not read an account's secret
/// (root:root 0600 while the daemon reads it through LoadCredential=) still sees them. Before: "invalid config:
/// …client_secret_file: Permission denied", exit 2. `relay check` still reads it.
#[test]
fn status_and_queue_do_not_look_at_the_secret_files() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "s3cret").unwrap();
    // Not even its owner may read it: as root, what no group or other bit would stop.
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o000)).unwrap();
    let account = format!(
        "default_account = \"office\"\n[[account]]\nname = \"office\"\nprovider = \"microsoft\"\nflow = \"client_credentials\"\ntenant = \"t\"\nclient_id = \"c\"\nmailbox = \"office@example.com\"\nclient_secret_file = {:?}\n",
        secret.display().to_string()
    );
    let config = write_config_with(
        dir.path(),
        &account,
        "address = \"127.0.0.1:0\"\nauth = \"none\"",
    );
    let run = |args: &[&str]| {
        run_bounded(
            relay_without_file_override()
                .args(args)
                .arg("--config")
                .arg(&config),
        )
    };
    let out = run(&["status"]);
    // Not running: needs attention, but no invalid config.
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("office"),
        "{}",
        text(&out.stdout)
    );
    let out = run(&["queue", "list"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let out = run(&["check"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("Permission denied"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn bad_config_fails_with_file_key_and_reason() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    for (body, key, reason) in [
        (
            "[[listener]]\naddress = \"127.0.0.1:25\"\nmax_mesage_size = \"1MiB\"\n",
            "line 3",
            "unknown field `max_mesage_size`",
        ),
        (
            "[[listener]]\naddress = \"127.0.0.1:25\"\nallow = [\"10.0.0.0/33\"]\n",
            "listener[0].allow[0]",
            "not a CIDR",
        ),
        (
            "[[listener]]\naddress = \"127.0.0.1:25\"\ntls = \"implicit\"\n",
            "listener[0].cert",
            "required",
        ),
        (
            "[[listener]]\naddress = \"127.0.0.1:25\"\nmax_message_size = \"35 parsecs\"\n",
            "line 3",
            "unknown unit",
        ),
        (
            "[[listener]]\naddress = \"127.0.0.1:25\"\ntls_compat = \"legacy\"\n",
            "listener[0].tls_compat",
            "needs a TLS listener",
        ),
        (
            "[queue]\nretry = [\"1m\", \"soon\"]\n",
            "queue.retry[1]",
            "soon",
        ),
        // A step of nothing: a message refused for now would be sent again in a loop (hundreds a second).
        (
            "[queue]\nretry = [\"1m\", \"0s\"]\n",
            "queue.retry[1]",
            "`0s` is shorter than 1s",
        ),
        (
            "[[account]]\nname = \"office\"\nprovider = \"generic\"\nflow = \"client_credentials\"\nmailbox = \"a@example.com\"\ntoken_url = \"http://127.0.0.1:9/token\"\nsmtp_host = \"127.0.0.1\"\nsmtp_tls = \"none\"\n[[account]]\nname = \"office.test\"\nprovider = \"generic\"\nflow = \"client_credentials\"\nmailbox = \"b@example.com\"\ntoken_url = \"http://127.0.0.1:9/token\"\nsmtp_host = \"127.0.0.1\"\nsmtp_tls = \"none\"\n",
            "account[1].name",
            "would share the file accounts/office.test.json",
        ),
        (
            "[[account]]\nname = \"office\"\nprovider = \"generic\"\nflow = \"client_credentials\"\nmailbox = \"a@example.com\"\ntoken_url = \"http://127.0.0.1:9/token\"\nsmtp_host = \"127.0.0.1\"\nsmtp_tls = \"none\"\n[[account]]\nname = \"office.unreachable\"\nprovider = \"generic\"\nflow = \"client_credentials\"\nmailbox = \"b@example.com\"\ntoken_url = \"http://127.0.0.1:9/token\"\nsmtp_host = \"127.0.0.1\"\nsmtp_tls = \"none\"\n",
            "account[1].name",
            "would share the file accounts/office.unreachable.json",
        ),
    ] {
        std::fs::write(&path, body).unwrap();
        let out = relay(&["check", "--config", path.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(2), "{body}");
        let err = text(&out.stderr);
        assert!(err.contains(path.to_str().unwrap()), "file missing: {err}");
        assert!(err.contains(key), "key {key} missing: {err}");
        assert!(err.contains(reason), "reason {reason} missing: {err}");
        // serve refuses the same config at start, with the same words and the same exit code.
        let out = relay(&["serve", "--config", path.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(2));
        assert!(text(&out.stderr).contains(key));
    }
}

/// `TOKIO_WORKER_THREADS` (the runtime's worker count, one fewer than the cores by default) is read by relay: a
/// value it cannot use stops `relay serve` with a sentence, before anything is bound, not with tokio's panic or
/// an abort.
#[test]
fn serve_refuses_a_worker_count_it_cannot_use() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("relay.toml");
    let state = dir.path().join("state");
    std::fs::write(
        &path,
        format!(
            "state_dir = \"{}\"\n[[listener]]\naddress = \"127.0.0.1:0\"\n",
            state.display()
        ),
    )
    .unwrap();
    for bad in ["0", "many", "257", "99999999999999999999"] {
        let out = Command::new(relay_bin())
            .args(["serve", "--config", path.to_str().unwrap()])
            .env("TOKIO_WORKER_THREADS", bad)
            .output()
            .expect("relay runs");
        assert_eq!(out.status.code(), Some(1), "{bad}");
        let err = text(&out.stderr);
        assert!(
            err.contains(
                "TOKIO_WORKER_THREADS in the environment is not a number of threads from 1 to 256"
            ),
            "{bad}: {err}"
        );
        assert!(!err.contains("panicked"), "{bad}: {err}");
    }
}

/// A listener's TLS key is a secret like an account's: `relay check` and `relay serve` refuse one that others can
/// read, naming the file, the key and the fix; at 0600 it is taken. Through `$CREDENTIALS_DIRECTORY`, where
/// systemd leaves credentials at 0400 or 0440, it is taken too.
#[test]
fn listener_key_readable_by_others_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let cert = make_cert(dir.path());
    std::fs::set_permissions(&cert.key, std::fs::Permissions::from_mode(0o644)).unwrap();
    for tls in ["starttls", "implicit", "auto"] {
        let config = write_config(
            dir.path(),
            &format!(
                "address = \"127.0.0.1:0\"\ntls = \"{tls}\"\ncert = {:?}\nkey = {:?}",
                cert.cert, cert.key
            ),
        );
        let cfg = config.to_str().unwrap();
        for cmd in ["check", "serve"] {
            let out = relay(&[cmd, "--config", cfg]);
            assert_eq!(out.status.code(), Some(2), "relay {cmd} ({tls})");
            let err = text(&out.stderr);
            assert!(
                err.contains(&format!("{cfg}: listener[0].key: "))
                    && err.contains("readable by others (mode 0644)")
                    && err.contains(&format!("chmod 640 {}", cert.key.display())),
                "relay {cmd} ({tls}): {err}"
            );
            assert!(
                !err.contains("PRIVATE KEY"),
                "the key itself is never printed"
            );
        }
    }
    std::fs::set_permissions(&cert.key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let config = dir.path().join("relay.toml");
    let out = relay(&["check", "--config", config.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));

    // systemd's credentials: read-only for the service's user (0400), or its group too (0440).
    let creds = dir.path().join("credentials");
    std::fs::create_dir(&creds).unwrap();
    std::fs::copy(&cert.cert, creds.join("relay-cert")).unwrap();
    std::fs::copy(&cert.key, creds.join("relay-key")).unwrap();
    let config = write_config(
        dir.path(),
        "address = \"127.0.0.1:0\"\ntls = \"starttls\"\ncert = \"$CREDENTIALS_DIRECTORY/relay-cert\"\nkey = \"$CREDENTIALS_DIRECTORY/relay-key\"",
    );
    for mode in [0o400, 0o440] {
        std::fs::set_permissions(
            creds.join("relay-key"),
            std::fs::Permissions::from_mode(mode),
        )
        .unwrap();
        let out = check_with_credentials(&config, &creds);
        assert!(out.status.success(), "{mode:o}: {}", text(&out.stderr));
    }
}

#[test]
fn hash_password_prints_a_hash_that_logs_in() {
    use std::io::Write;
    let mut child = Command::new(relay_bin())
        .arg("hash-password")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"hunter2\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let hash = text(&out.stdout).trim().to_string();
    assert!(hash.starts_with("$argon2id$"), "{hash}");
    use argon2::PasswordVerifier;
    assert!(
        argon2::Argon2::default()
            .verify_password(b"hunter2", hash.as_str())
            .is_ok()
    );
}

#[tokio::test]
async fn serve_queue_commands_status_and_clean_stop() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "address = \"127.0.0.1:0\"\nauth = \"none\"");
    let cfg = config.to_str().unwrap().to_string();
    let mut daemon = Daemon::spawn(&config);
    let mut ids = Vec::new();
    for subject in ["first", "second"] {
        let body = format!("From: nas@example.com\r\nSubject: {subject}\r\n\r\nbody\r\n");
        ids.push(send_message(daemon.addr, body.as_bytes()).await);
    }
    // The accepted event carries the queue id (journald field RELAY_QUEUE_ID under systemd).
    let line = daemon.wait_log("relay_event=\"accepted\"");
    assert!(
        line.contains(&format!("relay_queue_id={}", ids[0])),
        "{line}"
    );

    // While the daemon runs.
    let out = relay(&["queue", "list", "--config", &cfg]);
    assert!(out.status.success());
    let list = text(&out.stdout);
    assert!(list.contains(&ids[0]) && list.contains(&ids[1]), "{list}");
    let out = relay(&["queue", "list", "--json", "--config", &cfg]);
    let json: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("--json prints JSON only");
    assert_eq!(json.as_array().unwrap().len(), 2);

    let out = relay(&["queue", "show", &ids[0], "--config", &cfg]);
    assert!(out.status.success());
    let show = text(&out.stdout);
    assert!(
        show.contains("Subject: first") && show.contains("nas@example.com"),
        "{show}"
    );

    let out = relay(&["queue", "show", "../../etc/passwd", "--config", &cfg]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("not a queue id"));

    let out = relay(&["queue", "delete", &ids[0], "--config", &cfg]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = relay(&["queue", "show", &ids[0], "--config", &cfg]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("no message"));

    let out = relay(&["status", "--config", &cfg]);
    let status = text(&out.stdout);
    assert!(status.contains("1 queued"), "{status}");
    assert!(status.contains("no account is configured"), "{status}");
    assert_eq!(out.status.code(), Some(1), "no account: needs attention");
    let out = relay(&["status", "--json", "--config", &cfg]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["queue"]["queued"], 1);
    assert_eq!(json["running"], true, "{json}");
    assert!(status.contains("daemon: running"), "{status}");

    let status = daemon.terminate();
    assert_eq!(status.code(), Some(0), "clean exit on SIGTERM");
    assert_eq!(queued_in(&dir.path().join("state")).len(), 1);

    // Stopped: status says so first, and it needs attention whatever else is true (mail waits for nothing).
    let out = relay(&["status", "--config", &cfg]);
    let status = text(&out.stdout);
    assert!(
        status.contains("daemon: not running") && status.contains("1 queued"),
        "{status}"
    );
    assert_eq!(out.status.code(), Some(1));
    let out = relay(&["status", "--json", "--config", &cfg]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["running"], false, "{json}");
    assert_eq!(json["ok"], false, "{json}");
}

#[tokio::test]
async fn fifty_mib_message_streams_to_disk() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        "address = \"127.0.0.1:0\"\nauth = \"none\"\nmax_message_size = \"60MiB\"",
    );
    let daemon = Daemon::spawn(&config);
    let mut c = RawClient::connect(daemon.addr).await;
    c.expect(220).await;
    c.cmd("EHLO scanner.lan", 250).await;
    let before = proc_kib(daemon.pid(), "VmRSS:");
    c.cmd("MAIL FROM:<scanner@example.com> SIZE=52428800", 250)
        .await;
    c.cmd("RCPT TO:<ops@example.com>", 250).await;
    c.cmd("DATA", 354).await;
    c.send(b"Subject: big scan\r\n\r\n").await;
    // 50 MiB in 1 KiB lines, generated as we go so that this process does not hold it either.
    let line = format!("{}\r\n", "s".repeat(1022));
    let chunk = line.repeat(64);
    for _ in 0..(50 * 1024 / 64) {
        c.send(chunk.as_bytes()).await;
    }
    c.send(b".\r\n").await;
    let reply = c.expect(250).await;
    let peak = proc_kib(daemon.pid(), "VmHWM:");
    let queued = queued_in(&dir.path().join("state"));
    assert_eq!(queued.len(), 1, "{reply}");
    assert_eq!(strip_received(&queued[0].1).len(), 21 + 50 * 1024 * 1024);
    eprintln!("RSS before {before} KiB, peak {peak} KiB");
    // Streaming keeps the process well under the message size; holding it whole would add 50 MiB at least.
    let growth_mib = peak.saturating_sub(before) / 1024;
    assert!(
        growth_mib < 16,
        "peak RSS grew by {growth_mib} MiB (from {before} KiB to {peak} KiB)"
    );
}

#[tokio::test]
async fn embedded_default_serves_loopback_2525_with_a_state_dir_it_creates() {
    if std::path::Path::new("/etc/relay/relay.toml").exists() {
        eprintln!(
            "SKIPPED: /etc/relay/relay.toml exists, so the embedded default is not what runs"
        );
        return;
    }
    let state = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(relay_bin());
    // systemd's StateDirectory= wins over every other default, for root and others alike.
    cmd.arg("serve")
        .env("STATE_DIRECTORY", state.path().join("relay"));
    let daemon = Daemon::start(cmd);
    assert_eq!(daemon.addr.to_string(), "127.0.0.1:2525");
    send_message(daemon.addr, b"Subject: default\r\n\r\nhi\r\n").await;
    assert_eq!(queued_in(&state.path().join("relay")).len(), 1);
    assert_eq!(daemon.terminate().code(), Some(0));
}

#[test]
fn secret_file_readable_by_others_is_refused_at_start() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("office.secret");
    std::fs::write(&secret, "s3cret").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
    let config = dir.path().join("relay.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = {:?}\n[[account]]\nname = \"office\"\nprovider = \"microsoft\"\nflow = \"client_credentials\"\ntenant = \"contoso.onmicrosoft.com\"\nmailbox = \"noreply@example.com\"\nclient_id = \"c\"\nclient_secret_file = {:?}\n",
            dir.path().join("state"),
            secret
        ),
    )
    .unwrap();
    let cfg = config.to_str().unwrap();
    for args in [
        vec!["check", "--config", cfg],
        vec!["serve", "--config", cfg],
    ] {
        let out = relay(&args);
        assert_ne!(out.status.code(), Some(0));
        let err = text(&out.stderr);
        assert!(
            err.contains("account[0].client_secret_file") && err.contains("readable by others"),
            "{err}"
        );
        assert!(
            !err.contains("s3cret"),
            "the secret itself is never printed"
        );
    }
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o640)).unwrap();
    let out = relay(&["check", "--config", cfg]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(!text(&out.stdout).contains("s3cret"));
}

/// A path that names something far larger than a secret or a config (a log file, a disk image) is refused at
/// start with the file and the reason, not read into memory. Sparse files: nothing is written to disk.
#[test]
fn a_file_far_larger_than_it_should_be_is_refused_not_read() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("office.secret");
    std::fs::File::create(&secret)
        .unwrap()
        .set_len(2 * 1024 * 1024)
        .unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let config = dir.path().join("relay.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = {:?}\n[[listener]]\naddress = \"127.0.0.1:0\"\nauth = \"none\"\n[[account]]\nname = \"office\"\nprovider = \"microsoft\"\nflow = \"client_credentials\"\ntenant = \"contoso.onmicrosoft.com\"\nmailbox = \"noreply@example.com\"\nclient_id = \"c\"\nclient_secret_file = {:?}\n",
            dir.path().join("state"),
            secret
        ),
    )
    .unwrap();
    let out = relay(&["serve", "--config", config.to_str().unwrap()]);
    assert_ne!(out.status.code(), Some(0));
    let err = text(&out.stderr);
    assert!(
        err.contains(secret.to_str().unwrap()) && err.contains("larger than 1 MiB"),
        "{err}"
    );

    let huge = dir.path().join("huge.toml");
    std::fs::File::create(&huge)
        .unwrap()
        .set_len(17 * 1024 * 1024)
        .unwrap();
    for command in ["check", "serve"] {
        let out = relay(&[command, "--config", huge.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(2), "{command}");
        let err = text(&out.stderr);
        assert!(
            err.contains(huge.to_str().unwrap()) && err.contains("larger than 16 MiB"),
            "{command}: {err}"
        );
    }
}

/// `relay status` when the state dir cannot be read (here a file in its place): nothing can be said, which is
/// exit 3 (a monitoring plugin's UNKNOWN), not 1 ("needs attention"), and `--json` still prints a document.
#[test]
fn status_says_unknown_when_the_state_dir_cannot_be_read() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "address = \"127.0.0.1:0\"\nauth = \"none\"");
    std::fs::write(dir.path().join("state"), "not a directory").unwrap();
    let out = relay(&["status", "--config", config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("cannot read the state dir"),
        "{}",
        text(&out.stderr)
    );
    let out = relay(&["status", "--json", "--config", config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(3));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("a JSON document");
    assert_eq!(doc["ok"], false);
    assert!(
        doc["error"]
            .as_str()
            .is_some_and(|e| e.contains("state dir")),
        "{doc}"
    );
}

/// A token whose time is over is said to have expired, not to be "valid until" a moment in the past.
#[test]
fn status_says_an_expired_token_expired() {
    let dir = tempfile::tempdir().unwrap();
    common::idp::write_secret(dir.path());
    let top = format!(
        "default_account = \"office\"\n{}",
        common::idp::generic_account_at("office", "http://127.0.0.1:9", 9, "client_credentials")
    );
    let config = write_config_with(dir.path(), &top, "address = \"127.0.0.1:0\"\n");
    let now = std::time::SystemTime::now();
    let hour = std::time::Duration::from_secs(3600);
    relay::tokens::TokenStore::new(&dir.path().join("state"))
        .save(
            "office",
            &relay::tokens::StoredTokens {
                access_token: "A0".to_string().into(),
                expires_at: now - hour,
                obtained_at: now - 2 * hour,
                refresh_token: None,
                last_refresh: Some(now - 2 * hour),
                needs_authorization: false,
                last_error: None,
            },
        )
        .unwrap();
    let out = run_bounded(
        std::process::Command::new(relay_bin())
            .args(["status", "--config"])
            .arg(&config),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("  token expired at "), "{text}");
    assert!(!text.contains("token valid until"), "{text}");
}
