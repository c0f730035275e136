//! The real binary: `relay check --route FROM TO [--user U] [--listener L]`, and how `relay check` shows and
//! refuses sending limits and multi-account routes.

mod common;

use std::process::Command;

use common::*;

/// `relay ARGS…`: its exit code, stdout and stderr.
fn run(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(relay_bin())
        .args(args)
        .output()
        .expect("relay runs");
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code(), text(&out.stdout), text(&out.stderr))
}

/// `relay check --config CONFIG --route ARGS…`.
fn check_route(config: &str, args: &[&str]) -> (Option<i32>, String, String) {
    let mut all = vec!["check", "--config", config, "--route"];
    all.extend_from_slice(args);
    run(&all)
}

fn account(name: &str, provider: &str, mailbox: &str) -> String {
    let tenant = if provider == "microsoft" {
        "tenant = \"contoso.onmicrosoft.com\"\n"
    } else {
        ""
    };
    let flow = if provider == "google" {
        "authorization_code"
    } else {
        "device_code"
    };
    format!(
        "[[account]]\nname = \"{name}\"\nprovider = \"{provider}\"\nflow = \"{flow}\"\n{tenant}client_id = \"c\"\nmailbox = \"{mailbox}\"\n"
    )
}

/// Two listeners, three accounts, a user with an account of its own, and routes of each kind.
fn write_routed_config(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("relay.toml");
    let text = format!(
        r#"state_dir = {state:?}
default_account = "office"

[[listener]]
address = "127.0.0.1:2525"
auth = "none"

[[listener]]
address = "127.0.0.1:2587"
auth = "required"

[[user]]
name = "printer"
password_hash = {hash:?}
account = "printer-box"

{office}{printer}{gmail}
[[route]]
sender = "*@scanner.lan"
account = "gmail"

[[route]]
recipient = "*@contoso.com"
listener = "127.0.0.1:2587"
accounts = ["office", "gmail"]
"#,
        state = dir.join("state"),
        hash = password_hash(),
        office = account("office", "microsoft", "noreply@contoso.com"),
        printer = account("printer-box", "microsoft", "printer@contoso.com"),
        gmail = account("gmail", "google", "scanner@gmail.com"),
    );
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn check_route_says_which_account_and_why() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_routed_config(dir.path());
    let cfg = config.to_str().unwrap();
    for (args, expected) in [
        (
            vec!["copier@scanner.lan", "ops@example.com"],
            "account gmail: route[0] matched (sender = \"*@scanner.lan\")\n",
        ),
        (
            vec![
                "a@example.com",
                "ops@contoso.com",
                "--listener",
                "127.0.0.1:2587",
            ],
            "accounts office, gmail: route[1] matched (recipient = \"*@contoso.com\", listener = \"127.0.0.1:2587\"); each message goes through one that has room, the least used first\n",
        ),
        (
            vec!["a@example.com", "b@example.com", "--user", "printer"],
            "account printer-box: user printer's account\n",
        ),
        (
            vec![
                "a@example.com",
                "b@example.com",
                "--listener",
                "127.0.0.1:2525",
            ],
            "account office: default_account\n",
        ),
        (
            // Every recipient must match a route's `recipient`.
            vec![
                "a@example.com",
                "ops@contoso.com",
                "ceo@example.com",
                "--listener",
                "127.0.0.1:2587",
            ],
            "account office: default_account\n",
        ),
    ] {
        let (code, stdout, stderr) = check_route(cfg, &args);
        assert_eq!(code, Some(0), "{args:?}: {stderr}");
        assert_eq!(stdout, expected, "{args:?}");
    }
    // Without --listener (two are configured), a route that tests it cannot be judged, and the answer says so.
    let (code, stdout, _) = check_route(cfg, &["a@x", "ops@contoso.com"]);
    assert_eq!(code, Some(0));
    assert!(
        stdout.starts_with("account office: default_account\n")
            && stdout.contains("note: route[1] would match on some listener"),
        "{stdout}"
    );
}

#[test]
fn check_route_refuses_an_unknown_user_or_listener() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_routed_config(dir.path());
    let cfg = config.to_str().unwrap();
    let (code, _, err) = check_route(cfg, &["a@x", "b@y", "--user", "ghost"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("no [[user]] is named `ghost`"), "{err}");
    let (code, _, err) = check_route(cfg, &["a@x", "b@y", "--listener", "0.0.0.0:25"]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("no [[listener]] has the address `0.0.0.0:25`")
            && err.contains("127.0.0.1:2525, 127.0.0.1:2587"),
        "{err}"
    );
    // --user means nothing without --route.
    let (code, ..) = run(&["check", "--config", cfg, "--user", "printer"]);
    assert_eq!(code, Some(2));
    let (code, ..) = check_route(cfg, &["only-a-sender@x"]);
    assert_eq!(code, Some(2), "a recipient is required");
    // An invalid config: exit 2 and relay check's words, as without --route.
    std::fs::write(dir.path().join("bad.toml"), "unknown_key = 1\n").unwrap();
    let bad = dir.path().join("bad.toml");
    let (code, _, err) = check_route(bad.to_str().unwrap(), &["a@x", "b@y"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.starts_with("relay: invalid config: "), "{err}");
}

#[test]
fn check_shows_the_providers_default_limits() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_routed_config(dir.path());
    let (code, stdout, stderr) = run(&["check", "--config", config.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stdout.contains("per_minute = 30") && stdout.contains("recipients_per_day = 10000"),
        "Exchange Online's: {stdout}"
    );
    assert!(
        stdout.contains("recipients_per_day = 500"),
        "a consumer Gmail mailbox's: {stdout}"
    );
    assert!(stdout.contains("accounts = ["), "{stdout}");
    // Upstream connections: 3 for Microsoft over SMTP (Exchange Online refuses a fourth per mailbox), else 4.
    let doc: toml::Table = stdout.parse().expect("relay check prints TOML");
    let connections = |name: &str| {
        doc["account"]
            .as_array()
            .and_then(|a| a.iter().find(|a| a["name"].as_str() == Some(name)))
            .and_then(|a| a.get("max_connections"))
            .and_then(toml::Value::as_integer)
    };
    assert_eq!(connections("office"), Some(3), "{stdout}");
    assert_eq!(connections("gmail"), Some(4), "{stdout}");
}

/// A `max_connections` the config sets is kept, for Microsoft too.
#[test]
fn check_keeps_the_max_connections_the_config_sets() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("relay.toml");
    std::fs::write(
        &path,
        format!(
            "state_dir = {:?}\n{}max_connections = 5\n",
            dir.path().join("state"),
            account("office", "microsoft", "noreply@contoso.com")
        ),
    )
    .unwrap();
    let (code, stdout, stderr) = run(&["check", "--config", path.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("max_connections = 5"), "{stdout}");
}

#[test]
fn bad_limits_and_routes_fail_with_file_key_and_reason() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    let office = account("office", "microsoft", "noreply@contoso.com");
    for (body, key, reason) in [
        (
            format!("{office}rate = {{ per_minute = 0 }}\n"),
            "account[0].rate.per_minute",
            "at least 1",
        ),
        (
            format!("{office}rate = {{ recipients_per_day = 5000000 }}\n"),
            "account[0].rate.recipients_per_day",
            "at most 1000000",
        ),
        (
            format!("{office}rate = {{ per_hour = 5 }}\n"),
            "line",
            "unknown field `per_hour`",
        ),
        (
            format!("{office}[[route]]\naccounts = [\"office\", \"other\"]\n"),
            "route[0].accounts[1]",
            "no [[account]] is named `other`",
        ),
        (
            format!("{office}[[route]]\naccounts = []\n"),
            "route[0].accounts",
            "at least one",
        ),
        (
            format!("{office}[[route]]\naccount = \"office\"\naccounts = [\"office\"]\n"),
            "route[0]",
            "not both",
        ),
        (
            format!("{office}[[route]]\nsender = \"*\"\n"),
            "route[0].account",
            "required",
        ),
    ] {
        std::fs::write(&path, &body).unwrap();
        let (code, _, err) = run(&["check", "--config", path.to_str().unwrap()]);
        assert_eq!(code, Some(2), "{body}");
        assert!(err.contains(path.to_str().unwrap()), "file missing: {err}");
        assert!(err.contains(key), "key {key} missing: {err}");
        assert!(err.contains(reason), "reason {reason} missing: {err}");
    }
}

/// A message that no account would take (accounts are configured, but no route, user account or
/// `default_account` names one for it) is refused at DATA with a temporary code and a log line, rather than
/// queued to wait out the retry schedule and die; with a `default_account`, the same message is taken.
#[test]
fn a_message_no_account_would_take_is_refused_at_data() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    for (top, refused) in [("", true), ("default_account = \"office\"\n", false)] {
        let dir = tempfile::tempdir().unwrap();
        let top = format!(
            "{top}{}",
            account("office", "microsoft", "noreply@example.com")
        );
        let config = write_config_with(
            dir.path(),
            &top,
            "address = \"127.0.0.1:0\"\nauth = \"optional\"\n",
        );
        let mut relay = Daemon::spawn(&config);
        let addr = relay.addr;
        rt.block_on(async {
            let mut c = RawClient::ready(addr).await;
            c.cmd("MAIL FROM:<scanner@lan.test>", 250).await;
            c.cmd("RCPT TO:<boss@example.com>", 250).await;
            if refused {
                let reply = c.cmd("DATA", 451).await;
                assert!(reply.starts_with("451 4.3.5 "), "{reply}");
                // The transaction is over: a new one starts cleanly.
                c.cmd("MAIL FROM:<scanner@lan.test>", 250).await;
            } else {
                c.cmd("DATA", 354).await;
            }
        });
        if refused {
            let line = relay.wait_log("message refused at DATA");
            assert!(line.contains("relay_event=\"rejected\""), "{line}");
            // As every refused command's line: the command, its addresses, the reply.
            assert!(
                line.contains("command=\"DATA\"")
                    && line.contains("boss@example.com")
                    && line.contains("reply=\"451 4.3.5"),
                "{line}"
            );
        }
        // `relay check --route` says what the listener does.
        let (code, out, err) = check_route(
            config.to_str().unwrap(),
            &["scanner@lan.test", "boss@example.com"],
        );
        assert_eq!(code, Some(0), "{err}");
        assert_eq!(out.contains("451 4.3.5"), refused, "{out}");
        assert!(relay.terminate().success());
    }
}

/// A reload (here, an edit) that leaves queued mail with no account: `relay status` counts it and asks for
/// attention (before: exit 0, "1 queued (1 deferred)", while the message was deferred in vain until `max_age`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_counts_queued_mail_no_account_takes() {
    let common::idp::OneDeferred {
        idp: _idp,
        upstream: _upstream,
        dir: _dir,
        config,
        ..
    } = common::idp::one_deferred_message().await;
    let (_, doc) = status_json(&config);
    assert_eq!(doc["queue"]["unroutable"], 0, "{doc}");

    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, text.replace("default_account = \"office\"", "")).unwrap();
    let (code, doc) = status_json(&config);
    assert_eq!(code, Some(1), "{doc}");
    assert_eq!(doc["queue"]["unroutable"], 1, "{doc}");
    let (_, out, _) = run(&["status", "--config", config.to_str().unwrap()]);
    assert!(
        out.contains("unroutable: 1 queued message(s) match no account"),
        "{out}"
    );
}

/// Routes that can never be taken are warned about: a user no [[user]] has (a typo sent that device's mail
/// through another account, silently), a listener address no listener has, a route after one that takes every
/// message. The shipped routes of [`write_routed_config`] get none of these.
#[test]
fn check_warns_of_routes_that_are_never_taken() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_routed_config(dir.path());
    let cfg = config.to_str().unwrap();
    let (code, _, err) = run(&["check", "--config", cfg]);
    assert_eq!(code, Some(0), "{err}");
    assert!(!err.contains("never taken"), "{err}");
    let text = std::fs::read_to_string(&config).unwrap()
        + "\n[[route]]\nuser = \"prnter\"\naccount = \"gmail\"\n\n[[route]]\nlistener = \"127.0.0.1:2999\"\naccount = \"gmail\"\n\n[[route]]\nsender = \"*\"\naccount = \"office\"\n\n[[route]]\nrecipient = \"*@late.example\"\naccount = \"gmail\"\n";
    std::fs::write(&config, text).unwrap();
    let (code, _, err) = run(&["check", "--config", cfg]);
    assert_eq!(code, Some(0), "{err}");
    for line in [
        "warning: route[2].user: no [[user]] is named \"prnter\"",
        "warning: route[3].listener: no [[listener]] has the address \"127.0.0.1:2999\" (they are 127.0.0.1:2525, 127.0.0.1:2587)",
        "warning: route[5]: comes after route[4], which takes every message",
    ] {
        assert!(err.contains(line), "{line}: {err}");
    }
    assert_eq!(err.matches("never taken").count(), 3, "{err}");
}

/// `relay check` prints each account with its provider's defaults filled in: where tokens come from and where
/// mail goes (it printed only what the file said).
#[test]
fn check_fills_in_the_providers_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_routed_config(dir.path());
    let (code, out, err) = run(&["check", "--config", config.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{err}");
    for line in [
        "token_url = \"https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token\"",
        "smtp_host = \"smtp.office365.com\"",
        "smtp_port = 587",
        "smtp_host = \"smtp.gmail.com\"",
        "scope = \"https://mail.google.com/\"",
    ] {
        assert!(out.contains(line), "{line}: {out}");
    }
}
