//! A new user's first hour, through the real binary: the shipped example config, the queue's delivery state, a
//! password typed on a terminal, an account still waiting for `relay authorize`, a config with several mistakes, a
//! port already taken, `relay authorize` without network, and the man page and completions the .deb installs.

mod common;

use std::process::{Command, Output, Stdio};
use std::time::{Duration, SystemTime};

use common::*;

fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).into_owned()
}

/// Runs `relay ARGS` to its end, within [`LIMIT`]: a hung process is killed and fails the test.
fn relay(args: &[&str]) -> Output {
    run_bounded(
        Command::new(relay_bin())
            .args(args)
            .env_remove("JOURNAL_STREAM"),
    )
}

#[test]
fn the_example_config_passes_its_own_check_as_shipped() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/config/relay.example.toml");
    let out = relay(&["check", "--config", example]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains(&format!("# {example} is valid")),
        "{}",
        text(&out.stdout)
    );
}

#[tokio::test]
async fn queue_list_and_show_include_attempts_next_try_and_last_error() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "address = \"127.0.0.1:0\"\nauth = \"none\"");
    let cfg = config.to_str().unwrap();
    let daemon = Daemon::spawn(&config);
    let tried = send_message(daemon.addr, b"Subject: tried\r\n\r\nbody\r\n").await;
    let fresh = send_message(daemon.addr, b"Subject: fresh\r\n\r\nbody\r\n").await;
    assert_eq!(daemon.terminate().code(), Some(0));

    // What the scheduler writes after a failed attempt (`queue/ID.state`).
    let queue = dir.path().join("state/queue");
    let next = SystemTime::now() + Duration::from_secs(600);
    let mut state = relay::queue::state::DeliveryState::default();
    for _ in 0..3 {
        state.failed("451 4.7.500 Server busy. Please try again later.");
    }
    state.next_attempt = Some(next);
    let id = relay::queue::QueueId::parse(&tried).unwrap();
    relay::queue::state::write_state(&queue, id, &state).unwrap();

    let out = relay(&["queue", "list", "--config", cfg]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let list = text(&out.stdout);
    assert!(
        list.contains("attempts") && list.contains("next try"),
        "{list}"
    );
    let row = list.lines().find(|l| l.starts_with(&tried)).expect(&list);
    assert!(row.contains(" 3 ") && row.contains("in 9m"), "{row}");
    assert!(
        list.contains("last error: 451 4.7.500 Server busy"),
        "{list}"
    );
    let row = list.lines().find(|l| l.starts_with(&fresh)).expect(&list);
    assert!(row.contains(" 0 ") && row.contains("now"), "{row}");

    let out = relay(&["queue", "list", "--json", "--config", cfg]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let entries = json.as_array().unwrap();
    let tried_json = entries.iter().find(|e| e["id"] == tried.as_str()).unwrap();
    assert_eq!(tried_json["attempts"], 3);
    let shown = humantime::parse_rfc3339(tried_json["next_attempt"].as_str().unwrap()).unwrap();
    assert_eq!(
        humantime::format_rfc3339_seconds(shown).to_string(),
        humantime::format_rfc3339_seconds(next).to_string()
    );
    assert!(
        tried_json["last_error"]
            .as_str()
            .unwrap()
            .starts_with("451 4.7.500")
    );
    let fresh_json = entries.iter().find(|e| e["id"] == fresh.as_str()).unwrap();
    assert_eq!(fresh_json["attempts"], 0);
    assert!(fresh_json["next_attempt"].is_null() && fresh_json["last_error"].is_null());

    let out = relay(&["queue", "show", &tried, "--config", cfg]);
    let show = text(&out.stdout);
    assert!(show.contains("attempts:    3"), "{show}");
    assert!(
        show.contains(&format!(
            "next try:    {} (in 9m",
            humantime::format_rfc3339_seconds(next)
        )),
        "{show}"
    );
    assert!(
        show.contains("last error:  451 4.7.500 Server busy"),
        "{show}"
    );
    assert!(show.contains("Subject: tried"), "{show}");
    let out = relay(&["queue", "show", &tried, "--json", "--config", cfg]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(json["attempts"], 3);
    assert!(json["last_error"].as_str().unwrap().contains("Server busy"));
}

#[test]
fn hash_password_reads_a_pipe_without_prompting() {
    use std::io::Write;
    let mut child = Command::new(relay_bin())
        .arg("hash-password")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"piped secret\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stderr),
        "",
        "no prompt when stdin is not a terminal"
    );
    let hash = text(&out.stdout);
    assert_eq!(hash.lines().count(), 1, "{hash}");
    assert_verifies(hash.trim(), "piped secret");
}

fn assert_verifies(hash: &str, password: &str) {
    use argon2::PasswordVerifier;
    assert!(hash.starts_with("$argon2id$"), "{hash}");
    assert!(
        argon2::Argon2::default()
            .verify_password(password.as_bytes(), hash)
            .is_ok(),
        "{hash} is not a hash of {password:?}"
    );
}

/// Drives `relay hash-password` on a pseudo-terminal: waits for each prompt, and for echo to be off (the pty's
/// termios, read from the master, is the one the child set), then types. Prints the exit code and the terminal's
/// whole output as JSON.
const ON_A_TERMINAL: &str = r#"
import json, os, pty, select, sys, termios, time
relay, first, second = sys.argv[1:4]
deadline = time.monotonic() + 20
pid, fd = pty.fork()
if pid == 0:
    os.execv(relay, [relay, "hash-password"])
out = b""
def read_until(needle):
    global out
    while needle is None or needle not in out:
        left = deadline - time.monotonic()
        if left <= 0:
            sys.exit("timed out waiting for %r; terminal so far: %r" % (needle, out))
        if select.select([fd], [], [], left)[0]:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                chunk = b""
            if not chunk:
                if needle is None:
                    return
                sys.exit("terminal closed before %r: %r" % (needle, out))
            out += chunk
def type_hidden(line):
    while termios.tcgetattr(fd)[3] & termios.ECHO:
        if time.monotonic() > deadline:
            sys.exit("echo was never turned off; terminal so far: %r" % out)
        select.select([], [], [], 0.005)
    os.write(fd, line.encode() + b"\n")
read_until(b"Password: ")
type_hidden(first)
read_until(b"Again: ")
type_hidden(second)
read_until(None)
_, status = os.waitpid(pid, 0)
print(json.dumps({"code": os.waitstatus_to_exitcode(status), "terminal": out.decode()}))
"#;

fn on_a_terminal(first: &str, second: &str) -> (i64, String) {
    let child = Command::new("python3")
        .args(["-c", ON_A_TERMINAL, relay_bin(), first, second])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 (the tests need it; .ci/run installs it)");
    // The script bounds its own waits (20 s).
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let result: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    (
        result["code"].as_i64().unwrap(),
        result["terminal"].as_str().unwrap().to_string(),
    )
}

#[test]
fn hash_password_on_a_terminal_asks_twice_without_echo() {
    let (code, terminal) = on_a_terminal("tty secret 42", "tty secret 42");
    assert_eq!(code, 0, "{terminal}");
    assert!(
        terminal.contains("Password: ") && terminal.contains("Again: "),
        "{terminal}"
    );
    assert!(
        !terminal.contains("tty secret"),
        "the password was echoed: {terminal}"
    );
    let hash = terminal
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("$argon2id$"))
        .unwrap_or_else(|| panic!("no hash printed: {terminal}"));
    assert_verifies(hash, "tty secret 42");

    let (code, terminal) = on_a_terminal("tty secret 42", "tty secret 43");
    assert_eq!(code, 1, "{terminal}");
    assert!(terminal.contains("differ"), "{terminal}");
    assert!(!terminal.contains("$argon2id$"), "{terminal}");
}

/// A device-code account with no tokens yet, and a client-credentials account, which gets its own: only the first
/// is waiting for `relay authorize`, and the daemon says so once at start, with the command.
#[test]
fn the_daemon_warns_at_start_about_an_account_that_has_no_tokens_yet() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("app.secret");
    std::fs::write(&secret, "s").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let endpoints = "tenant = \"t\"\nclient_id = \"c\"\ntoken_url = \"https://nonexistent.invalid/token\"\ndevice_authorization_url = \"https://nonexistent.invalid/device\"\n";
    let accounts = format!(
        "[[account]]\nname = \"office\"\nprovider = \"microsoft\"\nflow = \"device_code\"\nmailbox = \"office@example.com\"\n{endpoints}\n[[account]]\nname = \"app\"\nprovider = \"microsoft\"\nflow = \"client_credentials\"\nmailbox = \"app@example.com\"\nclient_secret_file = {secret:?}\n{endpoints}"
    );
    let config = write_config_with(
        dir.path(),
        &accounts,
        "address = \"127.0.0.1:0\"\nauth = \"none\"",
    );
    let mut daemon = Daemon::spawn(&config);
    let line = daemon.wait_log("has no tokens yet");
    assert!(
        line.contains("relay_account=office") && line.contains("`relay authorize office`"),
        "{line}"
    );
    assert!(line.contains("WARN"), "{line}");
    // Logged before `listening`, so every such line has been read by now.
    let again: Vec<_> = daemon
        .unmatched()
        .iter()
        .filter(|l| l.contains("has no tokens yet"))
        .collect();
    assert!(again.is_empty(), "one line, for office only: {again:?}");
}

#[test]
fn a_config_with_several_mistakes_reports_them_all() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("relay.toml");
    std::fs::write(
        &path,
        "default_account = \"nobody\"\n\
         [[listener]]\naddress = \"nowhere\"\nallow = [\"10.0.0.0/33\"]\n\
         [[listener]]\naddress = \"127.0.0.1:25\"\ntls = \"implicit\"\nmax_connections = 0\n\
         [[user]]\nname = \"printer\"\npassword_hash = \"plain text\"\n\
         [queue]\nretry = [\"1m\", \"soon\"]\n",
    )
    .unwrap();
    let file = path.to_str().unwrap();
    let out = relay(&["check", "--config", file]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    let expected = [
        ("default_account", "no [[account]] is named `nobody`"),
        ("listener[0].address", "not IP:PORT"),
        ("listener[0].allow[0]", "not a CIDR"),
        ("listener[1].cert", "required when tls = \"implicit\""),
        ("listener[1].key", "required when tls = \"implicit\""),
        ("listener[1].max_connections", "at least 1"),
        ("user[0].password_hash", "relay hash-password"),
        ("queue.retry[1]", "soon"),
    ];
    for (key, reason) in expected {
        assert!(
            err.lines().any(|l| l.starts_with("relay: invalid config: ")
                && l.contains(&format!("{file}: {key}: "))
                && l.contains(reason)),
            "no line for {key} ({reason}):\n{err}"
        );
    }
    assert_eq!(err.lines().count(), expected.len(), "{err}");
    // serve refuses it with the same list.
    let out = relay(&["serve", "--config", file]);
    assert_ne!(out.status.code(), Some(0));
    let err = text(&out.stderr);
    for (key, _) in expected {
        assert!(err.contains(&format!("{file}: {key}: ")), "{key}: {err}");
    }
}

/// A state dir this user cannot write (the default one under a HOME it cannot write, say): the error names it
/// once and says what to set.
#[test]
fn a_state_dir_that_cannot_be_written_says_how_to_choose_another() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "address = \"127.0.0.1:0\"\nauth = \"none\"");
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o555)).unwrap();
    let out = run_bounded(
        relay_without_file_override()
            .args(["serve", "--config"])
            .arg(&config)
            .env_remove("JOURNAL_STREAM"),
    );
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("Permission denied"), "{err}");
    assert!(err.contains("set state_dir in the config"), "{err}");
    let line = err
        .lines()
        .find(|l| l.starts_with("relay: "))
        .unwrap_or_default();
    assert_eq!(
        line.matches(&state.display().to_string()).count(),
        1,
        "{err}"
    );
}

#[test]
fn an_address_in_use_is_reported_with_the_os_error_once() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &format!("address = \"{addr}\"\nauth = \"none\""),
    );
    let out = relay(&["serve", "--config", config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    let line = err
        .lines()
        .find(|l| l.starts_with("relay: "))
        .unwrap_or_else(|| panic!("{err}"));
    assert!(
        line.contains(&format!("listener[0] ({addr}): cannot listen")),
        "{line}"
    );
    assert_eq!(line.matches("Address already in use").count(), 1, "{line}");
    assert_eq!(line.matches("os error 98").count(), 1, "{line}");
}

#[test]
fn authorize_without_network_shows_the_cause_and_the_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config_with(
        dir.path(),
        "[[account]]\nname = \"office\"\nprovider = \"microsoft\"\nflow = \"device_code\"\nmailbox = \"office@example.com\"\ntenant = \"t\"\nclient_id = \"c\"\ntoken_url = \"https://nonexistent.invalid/token\"\ndevice_authorization_url = \"https://nonexistent.invalid/devicecode\"\n",
        "address = \"127.0.0.1:0\"\nauth = \"none\"",
    );
    let cfg = config.to_str().unwrap();
    let out = relay(&["authorize", "office", "--config", cfg]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    // The URL that was tried, and why it could not be reached (the name does not resolve), whatever words the
    // resolver uses.
    assert!(
        err.contains("cannot reach https://nonexistent.invalid/devicecode: "),
        "{err}"
    );
    assert!(err.to_lowercase().contains("dns error"), "{err}");
    assert!(!err.contains("token endpoint"), "{err}");
    assert!(err.contains(&format!("config file in use: {cfg}")), "{err}");
}

#[test]
fn man_page_and_completions_are_generated_from_the_command_line() {
    let out = relay(&["man"]);
    assert!(out.status.success());
    let man = text(&out.stdout);
    assert!(man.contains(".TH relay 8"), "{man}");
    for sub in ["serve", "check", "authorize", "hash\\-password", "queue"] {
        assert!(man.contains(sub), "{sub} missing from the man page");
    }
    for (shell, marker) in [
        ("bash", "_relay()"),
        ("zsh", "#compdef relay"),
        ("fish", "complete -c relay"),
    ] {
        let out = relay(&["completions", shell]);
        assert!(out.status.success(), "{shell}");
        let script = text(&out.stdout);
        assert!(script.contains(marker), "{shell}: {script}");
        assert!(script.contains("hash-password"), "{shell}");
    }
}
