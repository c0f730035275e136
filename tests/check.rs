//! `relay check` against `relay serve`, through the real binary: whatever keeps the daemon from starting (an
//! account's key, certificate or service-account file that is missing, readable by others or not what it should
//! be; a token file its key does not open), check finds first, with the file, the key and the reason, and exits 2
//! as serve does. Secrets that only the unit supplies are skipped with a warning.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

fn relay(args: &[&str], config: &Path) -> Output {
    Command::new(relay_bin())
        .args(args)
        .arg("--config")
        .arg(config)
        // As from a root shell: the variable only the unit sets is not there.
        .env_remove("CREDENTIALS_DIRECTORY")
        .output()
        .expect("relay runs")
}

fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).into_owned()
}

/// A client-credentials account signing its assertions with `key` and the fixture certificate; `more` is added
/// to the account.
fn certificate_account(name: &str, key: &str, more: &str) -> String {
    format!(
        "[[account]]\nname = \"{name}\"\nprovider = \"generic\"\nflow = \"client_credentials\"\nmailbox = \"noreply@example.com\"\nclient_id = \"app\"\ncertificate_file = \"{FIXTURES}/rsa-cert.pem\"\nprivate_key_file = {key:?}\ntoken_url = \"http://127.0.0.1:9/token\"\nscope = \"s\"\nsmtp_host = \"127.0.0.1\"\nsmtp_tls = \"none\"\n{more}"
    )
}

/// A copy of the fixture RSA key at 0600.
fn good_key(dir: &Path) -> PathBuf {
    let to = dir.join("app-key.pem");
    write_private(
        &to,
        std::fs::read(format!("{FIXTURES}/rsa-key.pem")).unwrap(),
    );
    to
}

fn config(dir: &Path, accounts: &str) -> PathBuf {
    write_config_with(dir, accounts, "address = \"127.0.0.1:0\"\nauth = \"none\"")
}

/// A config with one [`certificate_account`], `app`, whose key is `key`.
fn app_config(dir: &Path, key: &str) -> PathBuf {
    config(dir, &certificate_account("app", key, ""))
}

/// `relay check` and `relay serve` both refuse `config` with exit 2, in the same words: the file, the key and the
/// reason. Returns check's stderr.
fn both_refuse(config: &Path, key: &str, reason: &str) -> String {
    let cfg = config.to_str().unwrap();
    let check = relay(&["check"], config);
    let err = text(&check.stderr);
    assert_eq!(check.status.code(), Some(2), "relay check: {err}");
    assert!(
        err.contains(&format!("relay: invalid config: {cfg}: {key}: ")) && err.contains(reason),
        "relay check: want {key}: {reason}: {err}"
    );
    let serve = relay(&["serve"], config);
    let serve_err = text(&serve.stderr);
    assert_eq!(serve.status.code(), Some(2), "relay serve: {serve_err}");
    assert_eq!(serve_err, err, "relay serve says what relay check says");
    err
}

#[test]
fn a_good_certificate_account_passes() {
    let dir = tempfile::tempdir().unwrap();
    let key = good_key(dir.path());
    let config = app_config(dir.path(), key.to_str().unwrap());
    let out = relay(&["check"], &config);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        !text(&out.stdout).contains("PRIVATE KEY"),
        "the key is never printed"
    );
}

#[test]
fn a_missing_private_key_is_refused_with_its_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("gone.pem");
    let config = app_config(dir.path(), missing.to_str().unwrap());
    both_refuse(
        &config,
        "account[0].private_key_file",
        &format!("{}: No such file", missing.display()),
    );
}

#[test]
fn a_private_key_readable_by_others_is_refused_with_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let key = good_key(dir.path());
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let config = app_config(dir.path(), key.to_str().unwrap());
    let err = both_refuse(
        &config,
        "account[0].private_key_file",
        "readable by others (mode 0644)",
    );
    assert!(
        err.contains(&format!("chmod 640 {}", key.display())),
        "{err}"
    );
}

/// Others may not read it, but may replace it: refused too, and said as that.
#[test]
fn a_private_key_others_may_write_is_refused_in_those_words() {
    let dir = tempfile::tempdir().unwrap();
    let key = good_key(dir.path());
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o602)).unwrap();
    let config = app_config(dir.path(), key.to_str().unwrap());
    both_refuse(
        &config,
        "account[0].private_key_file",
        "is open to others (mode 0602)",
    );
}

/// The group may read it (0640, for a service user in the file's group) but not change it: 0660 is refused.
#[test]
fn a_private_key_its_group_may_write_is_refused_in_those_words() {
    let dir = tempfile::tempdir().unwrap();
    let key = good_key(dir.path());
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o660)).unwrap();
    let config = app_config(dir.path(), key.to_str().unwrap());
    let err = both_refuse(
        &config,
        "account[0].private_key_file",
        "is writable by its group (mode 0660)",
    );
    assert!(
        err.contains(&format!("chmod 640 {}", key.display())),
        "{err}"
    );
}

/// A secret file not yet filled in would go to the provider as an empty secret, and fail there in its words.
#[test]
fn an_empty_secret_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let key = good_key(dir.path());
    std::fs::write(&key, "").unwrap();
    let config = app_config(dir.path(), key.to_str().unwrap());
    both_refuse(
        &config,
        "account[0].private_key_file",
        &format!("{} is empty", key.display()),
    );
}

/// A state dir that is a file: said by check (for anyone who runs it, whoever the service's user is) and by
/// serve, before it starts.
#[test]
fn a_state_dir_that_is_a_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), "");
    let state = dir.path().join("state");
    std::fs::write(&state, "not a directory").unwrap();
    both_refuse(
        &config,
        "state_dir",
        &format!("{} is not a directory", state.display()),
    );
}

/// Garbage, and a real key of the wrong kind (rcgen's ECDSA: client assertions are signed with RSA): serve
/// cannot sign with either, and check says so before it is asked to.
#[test]
fn a_private_key_that_is_not_an_rsa_key_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("app-key.pem");
    let ecdsa = rcgen::KeyPair::generate().unwrap().serialize_pem();
    for contents in ["not a key at all\n", ecdsa.as_str()] {
        write_private(&key, contents);
        let config = app_config(dir.path(), key.to_str().unwrap());
        let err = both_refuse(
            &config,
            "account[0].private_key_file",
            &format!("{}: not an RSA private key", key.display()),
        );
        assert!(!err.contains("BEGIN"), "the key is never printed: {err}");
    }
}

/// Every problem at once, across accounts and within one: a sysadmin fixes them all in one round.
#[test]
fn every_unusable_file_is_named_in_one_run() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("bad-key.pem");
    write_private(&key, "garbage\n");
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, "no certificate here\n").unwrap();
    let service = dir.path().join("service.json");
    write_private(&service, "{\"type\": \"service_account\"}\n");
    let cert = dir.path().join("cert.pem");
    std::fs::write(&cert, "not a certificate\n").unwrap();
    let other_key = good_key(dir.path());
    let accounts = format!(
        "{}{}[[account]]\nname = \"gmail\"\nprovider = \"google\"\nflow = \"service_account\"\nmailbox = \"scanner@example.org\"\nservice_account_file = {service:?}\n",
        certificate_account("app", key.to_str().unwrap(), &format!("ca_file = {ca:?}\n")),
        certificate_account("other", other_key.to_str().unwrap(), "")
            .replace(&format!("{FIXTURES}/rsa-cert.pem"), cert.to_str().unwrap()),
    );
    let config = config(dir.path(), &accounts);
    let out = relay(&["check"], &config);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    let cfg = config.display();
    for (key, reason) in [
        ("account[0].private_key_file", "not an RSA private key"),
        ("account[0].ca_file", "no certificate in it"),
        ("account[1].certificate_file", &cert.display().to_string()),
        (
            "account[2].service_account_file",
            "not a Google service account key",
        ),
    ] {
        assert!(
            err.contains(&format!("{cfg}: {key}: ")) && err.contains(reason),
            "want {key}: {reason}: {err}"
        );
    }
    assert_eq!(err.lines().count(), 4, "one line each: {err}");
}

/// A token file the key cannot open stops the daemon at start (here: sealed, and no `token_encryption`); check
/// finds it, and leaves the file as it is.
#[test]
fn a_token_file_the_key_does_not_open_is_refused_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let key = good_key(dir.path());
    let config = app_config(dir.path(), key.to_str().unwrap());
    let tokens = dir.path().join("state/tokens");
    std::fs::create_dir_all(&tokens).unwrap();
    let sealed =
        "{\"v\":1,\"alg\":\"AES-256-GCM\",\"nonce\":\"AAAAAAAAAAAAAAAA\",\"ct\":\"AAAA\"}\n";
    let file = tokens.join("app.json");
    std::fs::write(&file, sealed).unwrap();
    both_refuse(
        &config,
        "token_encryption",
        &format!(
            "{} is encrypted, but token_encryption is not set",
            file.display()
        ),
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), sealed);
}

/// A key the unit hands over with LoadCredential= is not there for a shell: check warns and passes. Inside the
/// unit (`$CREDENTIALS_DIRECTORY` set) the same key is read, and refused if it is no key.
#[test]
fn a_key_from_the_credentials_directory_is_checked_only_where_it_exists() {
    let dir = tempfile::tempdir().unwrap();
    let config = app_config(dir.path(), "$CREDENTIALS_DIRECTORY/app-key");
    let out = relay(&["check"], &config);
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("warning: account[0].private_key_file: names $CREDENTIALS_DIRECTORY"),
        "{err}"
    );

    let creds = dir.path().join("credentials");
    std::fs::create_dir(&creds).unwrap();
    write_private(&creds.join("app-key"), "garbage\n");
    let out = check_with_credentials(&config, &creds);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("account[0].private_key_file: ") && err.contains("not an RSA private key"),
        "{err}"
    );
}

/// `token_encryption = "systemd-creds"`: systemd decrypts the key into the unit's `$CREDENTIALS_DIRECTORY`
/// alone; from a shell, check says it is not checked and passes.
#[test]
fn the_systemd_credential_is_left_to_the_service() {
    let dir = tempfile::tempdir().unwrap();
    let key = good_key(dir.path());
    let config = config(
        dir.path(),
        &format!(
            "token_encryption = \"systemd-creds\"\n{}",
            certificate_account("app", key.to_str().unwrap(), "")
        ),
    );
    let out = relay(&["check"], &config);
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("warning: token_encryption: \"systemd-creds\"") && err.contains("not checked"),
        "{err}"
    );
}

/// `relay check` on `config` passes without a word about an address in use.
fn no_address_warning(config: &Path) {
    let out = relay(&["check"], config);
    let stderr = text(&out.stderr);
    assert!(
        out.status.success() && !stderr.contains("in use"),
        "{stderr}"
    );
}

/// A listener's address that another program holds (exim4 on port 25) is a warning from `relay check`, which the
/// daemon would fail on; a running relay's own addresses are not (its state dir's lock says it runs).
#[test]
fn an_address_another_program_holds_is_a_warning_but_not_a_running_relays_own() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = write_config_with(
        dir.path(),
        "",
        &format!("address = \"127.0.0.1:{port}\"\nauth = \"none\""),
    );
    no_address_warning(&config);

    let other = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    let out = relay(&["check"], &config);
    assert!(out.status.success(), "a warning, not an invalid config");
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("warning: listener[0].address: ")
            && stderr.contains(&format!("127.0.0.1:{port} is in use by another program")),
        "{stderr}"
    );
    drop(other);

    let daemon = Daemon::spawn(&config);
    no_address_warning(&config);
    assert!(daemon.terminate().success());
}

/// A self-signed certificate for `localhost` valid between the two dates, and its key (0600), in `dir`.
fn dated_cert(
    dir: &Path,
    name: &str,
    from: (i32, u8, u8),
    to: (i32, u8, u8),
) -> (PathBuf, PathBuf) {
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params.not_before = rcgen::date_time_ymd(from.0, from.1, from.2);
    params.not_after = rcgen::date_time_ymd(to.0, to.1, to.2);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    let (cert_path, key_path) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&cert_path, cert.pem()).unwrap();
    write_private(&key_path, key.serialize_pem());
    (cert_path, key_path)
}

/// A listener's certificate file without the certificate that issued it (certbot's `cert.pem` where
/// `fullchain.pem` belongs) is warned about by `relay check`: every device then refused it, and nothing said why
/// but their "unknown CA". With its issuer in the file, nothing is said.
#[test]
fn a_listener_certificate_without_its_issuer_is_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "Relay Test CA");
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let key_path = dir.path().join("privkey.pem");
    write_private(&key_path, key.serialize_pem());
    let check = |cert: &Path| {
        let config = write_config_with(
            dir.path(),
            "",
            &format!(
                "address = \"127.0.0.1:0\"\nauth = \"none\"\ntls = \"starttls\"\ncert = {cert:?}\nkey = {key_path:?}"
            ),
        );
        let out = relay(&["check"], &config);
        assert!(out.status.success(), "{out:?}");
        text(&out.stderr)
    };
    let alone = dir.path().join("cert.pem");
    std::fs::write(&alone, leaf.pem()).unwrap();
    let said = check(&alone);
    // Without the system's CA store, a missing issuer is not judged (it may be a root found there).
    if !Path::new("/etc/ssl/certs/ca-certificates.crt").exists() {
        eprintln!("SKIPPED: no /etc/ssl/certs/ca-certificates.crt here");
        return;
    }
    assert!(
        said.contains("warning: listener[0] (127.0.0.1:0).cert: ")
            && said.contains(
                "issued by CN=Relay Test CA, which neither the file nor this machine's CA store"
            )
            && said.contains("fullchain.pem"),
        "{said}"
    );
    let full = dir.path().join("fullchain.pem");
    std::fs::write(&full, leaf.pem() + &ca_cert.pem()).unwrap();
    let said = check(&full);
    assert!(!said.contains(".cert: "), "{said}");

    // The daemon says it too, at start (a deploy hook reloading with cert.pem left no sign but `relay check`).
    let config = write_config_with(
        dir.path(),
        "",
        &format!(
            "address = \"127.0.0.1:0\"\nauth = \"none\"\ntls = \"starttls\"\ncert = {alone:?}\nkey = {key_path:?}"
        ),
    );
    let daemon = Daemon::spawn(&config);
    let seen = daemon.unmatched().join("\n");
    assert!(
        seen.contains("which neither the file nor this machine's CA store"),
        "{seen}"
    );
    assert!(daemon.terminate().success());
}

/// `relay status` says a listener certificate the daemon serves that clients refuse (exit 1), as loaded: renewed in
/// place without a reload, the old one is still served, and status says the file's is valid and a reload serves
/// it; after the reload it is quiet. Before, an expired certificate left status at exit 0.
#[test]
fn relay_status_says_an_expired_certificate_the_daemon_serves() {
    let dir = tempfile::tempdir().unwrap();
    let (old, old_key) = dated_cert(dir.path(), "old", (2020, 1, 1), (2021, 1, 1));
    let (new, new_key) = dated_cert(dir.path(), "new", (2025, 1, 1), (2035, 1, 1));
    let (live, live_key) = (dir.path().join("live.crt"), dir.path().join("live.key"));
    std::fs::copy(&old, &live).unwrap();
    std::fs::copy(&old_key, &live_key).unwrap();
    let config = write_config_with(
        dir.path(),
        "",
        &format!(
            "address = \"127.0.0.1:0\"\nauth = \"none\"\ntls = \"starttls\"\ncert = {live:?}\nkey = {live_key:?}"
        ),
    );
    let mut daemon = Daemon::spawn(&config);
    let certificates = || status_json(&config).1["certificates"].clone();
    let said = certificates().to_string();
    assert!(
        said.contains("listener 127.0.0.1:0 serves a certificate (")
            && said.contains("expired on 2021-01-01")
            && said.contains("renew it, then `systemctl reload relay`"),
        "{said}"
    );
    let human = text(&relay(&["status"], &config).stdout);
    assert!(
        human.contains("tls: listener 127.0.0.1:0 serves"),
        "{human}"
    );

    // certbot's renewal, without its deploy hook: the files change, what is served does not.
    std::fs::copy(&new, &live).unwrap();
    std::fs::copy(&new_key, &live_key).unwrap();
    let said = certificates().to_string();
    assert!(
        said.contains("expired on 2021-01-01")
            && said.contains(
                "the file now holds one valid until 2035-01-01: `systemctl reload relay` serves it"
            ),
        "{said}"
    );
    let reloaded = daemon.reload();
    assert!(
        reloaded.contains("certificates loaded anew: 127.0.0.1:0 (valid until 2035-01-01)"),
        "{reloaded}"
    );
    assert_eq!(certificates(), serde_json::json!([]));
    // Reloaded again, unchanged: not named.
    assert!(!daemon.reload().contains("certificates loaded anew"));
    assert!(daemon.terminate().success());
}

/// A listener certificate that clients checking it refuse (expired, not yet valid) is said by `relay check`, by
/// the daemon at start and after a reload that brings one (`credential_expiring` with the listener); before, it
/// was served without a word. A certificate set on a listener without `tls` is said to be unused.
#[test]
fn a_listener_certificate_out_of_its_dates_is_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    let (old, old_key) = dated_cert(dir.path(), "old", (2020, 1, 1), (2021, 1, 1));
    let listener = |tls: &str, cert: &Path, key: &Path| {
        format!("address = \"127.0.0.1:0\"\nauth = \"none\"\n{tls}cert = {cert:?}\nkey = {key:?}")
    };
    let config = write_config_with(
        dir.path(),
        "",
        &listener("tls = \"starttls\"\n", &old, &old_key),
    );
    let out = relay(&["check"], &config);
    let stderr = text(&out.stderr);
    assert!(
        out.status.success(),
        "a warning, not an invalid config: {stderr}"
    );
    assert!(
        stderr.contains("warning: listener[0] (127.0.0.1:0).cert: the certificate in ")
            && stderr.contains("expired on 2021-01-01"),
        "{stderr}"
    );

    let mut daemon = Daemon::spawn(&config);
    let line = daemon.wait_log("relay_event=\"credential_expiring\"");
    assert!(
        line.contains("expired on 2021-01-01") && line.contains("listener=127.0.0.1:0"),
        "{line}"
    );
    // Renewed, but dated from the future (a clock or a CA's mistake): said after the reload.
    let (future, future_key) = dated_cert(dir.path(), "future", (2040, 1, 1), (2041, 1, 1));
    std::fs::write(
        &config,
        std::fs::read_to_string(&config)
            .unwrap()
            .replace(&old.display().to_string(), &future.display().to_string())
            .replace(
                &old_key.display().to_string(),
                &future_key.display().to_string(),
            ),
    )
    .unwrap();
    daemon.reload();
    let line = daemon.wait_log("relay_event=\"credential_expiring\"");
    assert!(line.contains("is not valid until 2040-01-01"), "{line}");
    assert!(daemon.terminate().success());

    let unused = write_config_with(dir.path(), "", &listener("", &future, &future_key));
    let stderr = text(&relay(&["check"], &unused).stderr);
    assert!(
        stderr.contains(
            "warning: listener[0] (127.0.0.1:0).tls: cert and key are set but tls is not"
        ),
        "{stderr}"
    );
}

/// A listener's key that is not its certificate's (a renewal that replaced one file of the two, a chain with the
/// CA first) is refused naming both files and what order the chain needs; before, "keys may not be consistent:
/// KeyMismatch", naming neither.
#[test]
fn a_listener_key_that_is_not_its_certificates_names_both_files() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, _) = dated_cert(dir.path(), "new", (2020, 1, 1), (2099, 1, 1));
    let (_, old_key) = dated_cert(dir.path(), "old", (2020, 1, 1), (2099, 1, 1));
    let config = write_config_with(
        dir.path(),
        "",
        &format!(
            "address = \"127.0.0.1:0\"\nauth = \"none\"\ntls = \"starttls\"\ncert = {cert:?}\nkey = {old_key:?}"
        ),
    );
    let err = both_refuse(
        &config,
        "listener[0].cert",
        &format!(
            "the key in {} is not the key of the first certificate in {}",
            old_key.display(),
            cert.display()
        ),
    );
    assert!(err.contains("its chain after it"), "{err}");
}

/// `relay status` on a config it cannot read says so as `relay check` does, and exits 2 as it does: 1 would read
/// to a monitoring script as mail needing attention.
#[test]
fn status_on_an_invalid_config_exits_as_check_does() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("relay.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = {:?}\n[queue]\nmax_age = \"5d\"\nretries = 3\n",
            dir.path().join("state")
        ),
    )
    .unwrap();
    let status = relay(&["status"], &config);
    let check = relay(&["check"], &config);
    assert_eq!(status.status.code(), Some(2), "{}", text(&status.stderr));
    assert_eq!(text(&status.stderr), text(&check.stderr));
    assert!(text(&status.stderr).contains("relay: invalid config: "));
}

/// The token file of an account a config change removed still holds its grant (a refresh token, an access token)
/// that nothing uses or renews: `relay status` names it, so that a sysadmin who retired the account can remove it.
/// Only the accounts' own files count (not the lock and renewal marks beside them), and nothing is removed.
#[test]
fn status_names_token_files_of_accounts_no_longer_configured() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let config = dir.path().join("relay.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = {state:?}\ndefault_account = \"office\"\n[[account]]\nname = \"office\"\nprovider = \"microsoft\"\nflow = \"device_code\"\ntenant = \"contoso.onmicrosoft.com\"\nclient_id = \"c\"\nmailbox = \"noreply@example.com\"\n"
        ),
    )
    .unwrap();
    let tokens = state.join("tokens");
    std::fs::create_dir_all(&tokens).unwrap();
    for name in [
        "office.json",
        "retired.json",
        ".retired.lock",
        ".office.renew",
    ] {
        std::fs::write(tokens.join(name), "{}").unwrap();
    }
    let (_, json) = status_json(&config);
    assert_eq!(
        json["stale_tokens"],
        serde_json::json!(["retired"]),
        "{json}"
    );
    let out = relay(&["status"], &config);
    let said = text(&out.stdout);
    assert!(
        said.contains("no longer names (retired)") && said.contains("remove them"),
        "{said}"
    );
    assert!(tokens.join("retired.json").exists(), "said, not removed");
}

/// Run as root (`sudo relay check`, as the install steps say), check reads the files the config names and looks at
/// the state dir as the service's user (`relay`; here `nobody`, through `RELAY_SERVICE_USER`) would: a secret only
/// root may read passed the check, then stopped the unit. Once the files are the user's, nothing is said.
#[test]
fn as_root_check_says_what_the_services_user_cannot_read_or_write() {
    if !is_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let secret = dir.path().join("office-secret");
    write_private(&secret, "s3cret");
    // Named through a link in a directory only root may search, as certbot's `live/` holds links to `archive/`.
    let live = dir.path().join("live");
    std::fs::create_dir(&live).unwrap();
    std::fs::set_permissions(&live, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::os::unix::fs::symlink("../office-secret", live.join("office")).unwrap();
    let link = live.join("office");
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).unwrap();
    let config = dir.path().join("relay.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = {state:?}\n[[listener]]\naddress = \"127.0.0.1:0\"\nauth = \"none\"\n[[account]]\nname = \"office\"\nprovider = \"generic\"\nflow = \"client_credentials\"\nmailbox = \"a@example.com\"\nclient_id = \"app\"\nclient_secret_file = {link:?}\ntoken_url = \"http://127.0.0.1:9/token\"\nscope = \"s\"\nsmtp_host = \"127.0.0.1\"\nsmtp_tls = \"none\"\n"
        ),
    )
    .unwrap();
    let check = || {
        run_bounded(
            Command::new(relay_bin())
                .args(["check", "--config"])
                .arg(&config)
                .env("RELAY_SERVICE_USER", "nobody"),
        )
    };
    let out = check();
    assert_eq!(out.status.code(), Some(0), "warnings only");
    let err = text(&out.stderr);
    assert!(
        err.contains("warning: account[0].client_secret_file: the service's user nobody cannot"),
        "{err}"
    );
    assert!(
        err.contains("warning: state_dir: the service's user nobody cannot write to"),
        "{err}"
    );

    let id = run_bounded(Command::new("id").args(["-u", "nobody"]));
    let nobody: u32 = text(&id.stdout).trim().parse().unwrap();
    for path in [&secret, &state] {
        std::os::unix::fs::chown(path, Some(nobody), None).unwrap();
    }
    let err = text(&check().stderr);
    assert!(
        err.contains(&format!(
            "account[0].client_secret_file: the service's user nobody cannot reach anything in {}",
            live.display()
        )),
        "{err}"
    );
    assert!(!err.contains("state_dir"), "{err}");
    std::fs::set_permissions(&live, std::fs::Permissions::from_mode(0o755)).unwrap();
    let err = text(&check().stderr);
    assert!(!err.contains("the service's user"), "{err}");
}
