//! The file's shape as serde sees it, and the checks that turn it into a [`Config`].

use std::cell::RefCell;
use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

use super::*;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    state_dir: Option<PathBuf>,
    hostname: Option<String>,
    default_account: Option<String>,
    postmaster: Option<String>,
    #[serde(default)]
    listener: Vec<RawListener>,
    #[serde(default)]
    user: Vec<RawUser>,
    #[serde(default)]
    account: Vec<AccountConfig>,
    #[serde(default)]
    route: Vec<RouteConfig>,
    queue: Option<RawQueue>,
    token_encryption: Option<String>,
    #[serde(default)]
    bounce: super::Bounce,
    alerts: Option<super::ops::RawAlerts>,
    metrics: Option<super::ops::RawMetrics>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListener {
    address: String,
    tls: Option<ListenerTls>,
    tls_compat: Option<TlsCompat>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    auth: Option<AuthPolicy>,
    plaintext_auth: Option<bool>,
    bare_lf: Option<BareLineEndings>,
    allow: Option<Vec<String>>,
    max_message_size: Option<ByteSize>,
    max_recipients: Option<usize>,
    #[serde(default, with = "humantime_serde")]
    command_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    data_timeout: Option<Duration>,
    max_connections: Option<usize>,
    max_connections_per_client: Option<usize>,
    #[serde(default, with = "humantime_serde")]
    auth_failure_delay: Option<Duration>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUser {
    name: String,
    password_hash: String,
    account: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawQueue {
    #[serde(default, with = "humantime_serde::option")]
    max_age: Option<Duration>,
    retry: Option<Vec<String>>,
    min_free_space: Option<ByteSize>,
    #[serde(default, with = "humantime_serde::option")]
    dead_max_age: Option<Duration>,
}

/// Builds errors that all name the same file, and collects them: validation goes on past a mistake, so that one
/// run reports every one.
struct Errs<'a> {
    file: &'a str,
    found: RefCell<Vec<ConfigError>>,
}

impl Errs<'_> {
    fn at(&self, key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
        ConfigError::new(self.file, key, reason)
    }

    /// Notes a problem and goes on.
    fn add(&self, key: impl Into<String>, reason: impl Into<String>) {
        let e = self.at(key, reason);
        self.found.borrow_mut().push(e);
    }

    /// The value, or `None` with its problem noted.
    fn ok<T>(&self, r: Result<T, ConfigError>) -> Option<T> {
        r.map_err(|e| self.found.borrow_mut().push(e)).ok()
    }

    /// `value` if no problem was noted, else every problem.
    fn finish<T>(self, value: T) -> Result<T, ConfigError> {
        let mut found = self.found.into_inner().into_iter();
        match found.next() {
            None => Ok(value),
            Some(mut first) => {
                first.more = found.collect();
                Err(first)
            }
        }
    }
}

/// Postfix's default `message_size_limit` is 10 MB; Microsoft 365 accepts 35 MB (before base64 growth), and that
/// is what the scanners and NAS boxes we replace Postfix for tend to send.
const DEFAULT_MAX_MESSAGE_SIZE: u64 = 35 << 20;

impl RawConfig {
    pub(super) fn validate(mut self, file: &str, secrets: Secrets) -> Result<Config, ConfigError> {
        let errs = Errs {
            file,
            found: RefCell::default(),
        };
        let mut at_start = Vec::new();
        errs.ok(self.expand_credentials(&errs, secrets, &mut at_start));

        // Every name counts as known, even a badly spelt one, so that its mistake is reported once and not again
        // at each place that refers to it.
        let mut accounts = HashSet::new();
        for (i, a) in self.account.iter().enumerate() {
            if a.name.is_empty()
                || !a
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                errs.add(
                    format!("account[{i}].name"),
                    "must be non-empty and use only letters, digits, '-', '_' and '.' (it names a token file)",
                );
            } else if a.name.starts_with('.') {
                errs.add(format!("account[{i}].name"), "must not start with '.'");
            }
            if !accounts.insert(a.name.as_str()) {
                errs.add(
                    format!("account[{i}].name"),
                    format!("duplicate account `{}`", a.name),
                );
            }
            if !a.mailbox.contains('@') {
                errs.add(
                    format!("account[{i}].mailbox"),
                    "must be an address: the mailbox that sends",
                );
            }
            errs.ok(crate::oauth::endpoints(a)
                .map_err(|(key, reason)| errs.at(format!("account[{i}].{key}"), reason)));
            // Providers allow a few concurrent sessions per mailbox (Exchange Online: 3 SMTP submissions) and
            // refuse the rest; more than 100 would only trade one limit for another.
            if !(1..=100).contains(&a.connections()) {
                errs.add(
                    format!("account[{i}].max_connections"),
                    "must be between 1 and 100",
                );
            }
            if let Some(rate) = &a.rate {
                for (key, value) in [
                    ("per_minute", rate.per_minute),
                    ("recipients_per_day", rate.recipients_per_day),
                ] {
                    match value {
                        // Zero would hold the account's mail for ever; leaving the key out takes the provider's.
                        Some(0) => errs.add(
                            format!("account[{i}].rate.{key}"),
                            "must be at least 1 (leave it out for the provider's default)",
                        ),
                        Some(n) if n > MAX_RATE => errs.add(
                            format!("account[{i}].rate.{key}"),
                            format!("must be at most {MAX_RATE}"),
                        ),
                        _ => {}
                    }
                }
            }
            for (key, file) in [
                ("client_secret_file", &a.client_secret_file),
                ("password_file", &a.password_file),
                ("private_key_file", &a.private_key_file),
                ("service_account_file", &a.service_account_file),
                ("certificate_file", &a.certificate_file),
                ("ca_file", &a.ca_file),
            ] {
                if let Some(path) = file
                    && secrets != Secrets::Unchecked
                    && !at_start.contains(&format!("account[{i}].{key}"))
                    && let Err(reason) =
                        check_secret_file(path, !matches!(key, "ca_file" | "certificate_file"))
                {
                    errs.add(format!("account[{i}].{key}"), reason);
                }
            }
        }
        // `accounts/NAME.json` holds an account's last delivery, `NAME.test.json` its last `relay test`,
        // `NAME.transport.json` its transport switch and `NAME.unreachable.json` an upstream that does not answer:
        // an account named after another's report would share its file.
        for (i, a) in self.account.iter().enumerate() {
            for report in [".test", ".transport", ".unreachable"] {
                if let Some(other) = a.name.strip_suffix(report)
                    && accounts.contains(other)
                {
                    errs.add(
                        format!("account[{i}].name"),
                        format!(
                            "`{}` would share the file accounts/{}.json with account `{other}`'s report; rename one of them",
                            a.name, a.name
                        ),
                    );
                }
            }
        }
        let known_account = |key: String, name: &Option<String>| {
            if let Some(n) = name
                && !accounts.contains(n.as_str())
            {
                errs.add(key, format!("no [[account]] is named `{n}`"));
            }
        };
        known_account("default_account".into(), &self.default_account);

        let listeners: Vec<ListenerConfig> = self
            .listener
            .into_iter()
            .enumerate()
            .filter_map(|(i, l)| l.validate(&errs, i, &at_start, secrets == Secrets::Unchecked))
            .collect();
        let mut addrs = HashSet::new();
        for (i, l) in listeners.iter().enumerate() {
            if l.address.port() != 0 && !addrs.insert(l.address) {
                errs.add(
                    format!("listener[{i}].address"),
                    format!("{} is listed twice", l.address),
                );
            }
        }

        let mut names = HashSet::new();
        let mut users = Vec::new();
        for (i, u) in self.user.into_iter().enumerate() {
            if u.name.is_empty() || u.name.contains(['\0', '\r', '\n']) {
                errs.add(format!("user[{i}].name"), "must be non-empty and one line");
            } else if !names.insert(u.name.clone()) {
                errs.add(
                    format!("user[{i}].name"),
                    format!("duplicate user `{}`", u.name),
                );
            }
            if let Err(why) = check_password_hash(&u.password_hash) {
                errs.add(
                    format!("user[{i}].password_hash"),
                    format!("{why}; make one with `relay hash-password`"),
                );
            }
            known_account(format!("user[{i}].account"), &u.account);
            users.push(UserConfig {
                name: u.name,
                password_hash: u.password_hash,
                account: u.account,
            });
        }

        for (i, r) in self.route.iter().enumerate() {
            match (&r.account, &r.accounts) {
                (Some(_), Some(_)) => errs.add(
                    format!("route[{i}]"),
                    "give `account` or `accounts`, not both",
                ),
                (None, None) => errs.add(
                    format!("route[{i}].account"),
                    "required (or `accounts = [\"a\", \"b\"]` to spread mail across several)",
                ),
                (Some(one), None) => {
                    known_account(format!("route[{i}].account"), &Some(one.clone()))
                }
                (None, Some(list)) => {
                    if list.is_empty() {
                        errs.add(format!("route[{i}].accounts"), "needs at least one account");
                    }
                    let mut seen = HashSet::new();
                    for (j, name) in list.iter().enumerate() {
                        known_account(format!("route[{i}].accounts[{j}]"), &Some(name.clone()));
                        if !seen.insert(name) {
                            errs.add(
                                format!("route[{i}].accounts[{j}]"),
                                format!("`{name}` is listed twice"),
                            );
                        }
                    }
                }
            }
        }

        let mut queue = QueueConfig::default();
        if let Some(q) = self.queue {
            if let Some(steps) = q.retry {
                if steps.is_empty() {
                    errs.add("queue.retry", "needs at least one interval");
                }
                queue.retry = steps
                    .iter()
                    .enumerate()
                    .filter_map(|(j, s)| {
                        errs.ok(humantime::parse_duration(s)
                            .map_err(|e| format!("`{s}`: {e}"))
                            .and_then(|d| at_most(d, YEAR, s))
                            .and_then(|d| at_least_a_second(d, s))
                            .map_err(|r| errs.at(format!("queue.retry[{j}]"), r)))
                    })
                    .collect();
            }
            if let Some(max_age) = q.max_age
                && let Some(max_age) = errs.ok(at_most(
                    max_age,
                    10 * YEAR,
                    &humantime::format_duration(max_age).to_string(),
                )
                .map_err(|r| errs.at("queue.max_age", r)))
            {
                queue.max_age = max_age;
            }
            if let Some(min_free) = q.min_free_space {
                queue.min_free_space = min_free;
            }
            if let Some(keep) = q.dead_max_age
                && let Some(keep) = errs.ok(at_most(
                    keep,
                    10 * YEAR,
                    &humantime::format_duration(keep).to_string(),
                )
                .map_err(|r| errs.at("queue.dead_max_age", r)))
            {
                queue.dead_max_age = keep;
            }
        }

        if let Some(dir) = &self.state_dir
            && !dir.is_absolute()
        {
            // A relative path would depend on the directory relay was started from, and `relay status` run from
            // elsewhere would look at another queue.
            errs.add(
                "state_dir",
                format!("{dir:?} is not an absolute path (for example \"/var/lib/relay\")"),
            );
        }
        if let Some(name) = &self.hostname
            && let Err(why) = check_hostname(name)
        {
            errs.add("hostname", why);
        }
        if let Some(address) = &self.postmaster
            && let Err(why) = check_mailbox(address)
        {
            errs.add("postmaster", why);
        }
        let token_encryption = match &self.token_encryption {
            Some(v) => errs.ok(TokenEncryption::parse(v)
                // (Status and the queue do not look at the key: `Secrets::Unchecked`.)
                .and_then(|e| {
                    if secrets == Secrets::Unchecked {
                        return Ok(e);
                    }
                    crate::tokens::seal::check(&e).map(|()| e)
                })
                .map_err(|r| errs.at("token_encryption", r))),
            None => None,
        };
        let alerts = match self.alerts {
            Some(a) => errs.ok(a.validate(file, self.account.len())),
            None => None,
        };
        let metrics = match self.metrics {
            Some(m) => errs.ok(m.validate(file)),
            None => None,
        };

        // Mail to <postmaster> goes to whoever reads relay's alerts, else to the default account's own mailbox.
        let postmaster = self
            .postmaster
            .or_else(|| alerts.as_ref().and_then(|a| a.mail_to.clone()))
            .or_else(|| {
                let default = self.default_account.as_ref()?;
                let account = self.account.iter().find(|a| &a.name == default)?;
                Some(account.mailbox.clone())
            });
        let config = Config {
            source: file.to_string(),
            credentials_at_start: at_start,
            digest: String::new(),
            state_dir: self.state_dir.unwrap_or_else(default_state_dir),
            hostname: self.hostname.unwrap_or_else(system_hostname),
            default_account: self.default_account,
            postmaster,
            listeners,
            users,
            // The effective limits, so that `relay check` shows what applies (nothing when no limit does).
            accounts: self
                .account
                .into_iter()
                .map(|mut a| {
                    a.rate = Some(a.limits()).filter(|r| *r != RateConfig::default());
                    a.max_connections = Some(a.connections());
                    a
                })
                .collect(),
            routes: self.route,
            queue,
            token_encryption,
            bounce: self.bounce,
            alerts,
            metrics,
        };
        errs.finish(config)
    }
}

impl RawListener {
    /// The listener, or `None` with each of its problems noted.
    /// `unchecked`: its key file is not looked at ([`Secrets::Unchecked`]).
    fn validate(
        self,
        errs: &Errs<'_>,
        i: usize,
        at_start: &[String],
        unchecked: bool,
    ) -> Option<ListenerConfig> {
        let before = errs.found.borrow().len();
        let key = |k: &str| format!("listener[{i}].{k}");
        let address: Option<SocketAddr> = self.address.parse().ok();
        if address.is_none() {
            errs.add(
                key("address"),
                format!("`{}` is not IP:PORT (e.g. \"0.0.0.0:587\")", self.address),
            );
        }
        let tls = self.tls.unwrap_or(ListenerTls::None);
        if tls != ListenerTls::None {
            if self.cert.is_none() {
                errs.add(
                    key("cert"),
                    format!("required when tls = \"{}\"", tls.name()),
                );
            }
            if self.key.is_none() {
                errs.add(
                    key("key"),
                    format!("required when tls = \"{}\"", tls.name()),
                );
            }
        }
        // The key is a secret like an account's: refused when others can read it. Only its mode here; a key that
        // cannot be read at all is reported when the TLS files are loaded (at start, `relay check`, a reload).
        if tls != ListenerTls::None
            && let Some(path) = &self.key
            && !unchecked
            && !at_start.contains(&format!("listener[{i}].key"))
            && let Err(reason) = check_key_mode(path)
        {
            errs.add(key("key"), reason);
        }
        let tls_compat = self.tls_compat.unwrap_or_default();
        if tls_compat == TlsCompat::Legacy {
            if tls == ListenerTls::None {
                errs.add(
                    key("tls_compat"),
                    "\"legacy\" needs a TLS listener (tls = \"starttls\", \"implicit\" or \"auto\")",
                );
            } else if !cfg!(feature = "legacy-tls") {
                errs.add(
                    key("tls_compat"),
                    "this relay was built without the `legacy-tls` feature (OpenSSL); rebuild with it or use \"modern\"",
                );
            }
        }
        let auth = self.auth.unwrap_or(AuthPolicy::Required);
        // Without an allow list, a listener that lets clients send without logging in serves loopback only:
        // relay must never become an open relay by omission.
        let allow = match self.allow {
            Some(list) => {
                list.iter()
                    .enumerate()
                    .filter_map(|(j, s)| {
                        errs.ok(parse_cidr(s)
                            .map_err(|r| errs.at(format!("listener[{i}].allow[{j}]"), r)))
                    })
                    .collect::<Vec<_>>()
            }
            None if auth == AuthPolicy::Required => vec![any_v4(), any_v6()],
            None => vec![loopback_v4(), loopback_v6()],
        };
        let max_message_size = self
            .max_message_size
            .unwrap_or(ByteSize(DEFAULT_MAX_MESSAGE_SIZE));
        if max_message_size.0 == 0 {
            errs.add(key("max_message_size"), "must be greater than 0");
        }
        let positive = |k: &str, v: Option<usize>, max: usize| match v {
            Some(0) => errs.add(key(k), "must be at least 1"),
            Some(n) if n > max => errs.add(key(k), format!("must be at most {max}")),
            _ => {}
        };
        // The envelope is one line of the queue file, read whole (`queue/file.rs`).
        positive("max_recipients", self.max_recipients, 1000);
        positive("max_connections", self.max_connections, 100_000);
        positive(
            "max_connections_per_client",
            self.max_connections_per_client,
            usize::MAX,
        );
        // Timeouts are added to clocks: bounded here, so that no value can overflow one.
        let timeout = |k: &str, v: Option<Duration>, default: Duration, min_ok: bool, max: u64| {
            let d = v.unwrap_or(default);
            if d.is_zero() && !min_ok {
                errs.add(key(k), "must be greater than 0");
            } else if let Err(r) = at_most(
                d,
                Duration::from_secs(max),
                &humantime::format_duration(d).to_string(),
            ) {
                errs.add(key(k), r);
            }
            d
        };
        // RFC 5321 section 4.5.3.2.7: the server should wait at least 5 minutes for the next command.
        let command_timeout = timeout(
            "command_timeout",
            self.command_timeout,
            Duration::from_secs(300),
            false,
            86_400,
        );
        // RFC 5321 section 4.5.3.2.6 asks clients for 10 minutes after the final dot; a server waiting 10
        // minutes between data blocks is as patient.
        let data_timeout = timeout(
            "data_timeout",
            self.data_timeout,
            Duration::from_secs(600),
            false,
            86_400,
        );
        // Zero is allowed: no delay after a failed login (tests, trusted LANs).
        let auth_failure_delay = timeout(
            "auth_failure_delay",
            self.auth_failure_delay,
            Duration::from_secs(2),
            true,
            60,
        );
        if errs.found.borrow().len() > before {
            return None;
        }
        Some(ListenerConfig {
            address: address?,
            tls,
            tls_compat,
            cert: self.cert,
            key: self.key,
            auth,
            // Legacy devices on a LAN often cannot do TLS at all; where the operator chose tls = "none", AUTH
            // has to be offered in the clear or those devices cannot log in.
            plaintext_auth: self.plaintext_auth.unwrap_or(tls == ListenerTls::None),
            bare_lf: self.bare_lf.unwrap_or(if allow.iter().all(is_private) {
                BareLineEndings::Lenient
            } else {
                BareLineEndings::Reject
            }),
            allow,
            max_message_size,
            max_recipients: self.max_recipients.unwrap_or(100),
            command_timeout,
            data_timeout,
            max_connections: self.max_connections.unwrap_or(200),
            max_connections_per_client: self.max_connections_per_client.unwrap_or(50),
            auth_failure_delay,
        })
    }
}

impl RawConfig {
    /// `$CREDENTIALS_DIRECTORY` at the start of a file key, for secrets handed over by systemd's
    /// `LoadCredential=`. For a command that does not read them, one that cannot be resolved here (the variable
    /// is only set inside the unit) is left as it is and its key added to `at_start`.
    fn expand_credentials(
        &mut self,
        errs: &Errs<'_>,
        secrets: Secrets,
        at_start: &mut Vec<String>,
    ) -> Result<(), ConfigError> {
        let mut expand = |file: &mut Option<PathBuf>, key: String| {
            let Some(path) = file else {
                return Ok(());
            };
            match (expand_credentials(path), secrets) {
                (Ok(p), _) => *path = p,
                (Err(_), Secrets::NotRead | Secrets::Unchecked) => at_start.push(key),
                // Said once: the file's own check would add "$CREDENTIALS_DIRECTORY/x: No such file".
                (Err(reason), Secrets::Read) => {
                    errs.add(key.clone(), reason);
                    at_start.push(key);
                }
            }
            Ok::<(), ConfigError>(())
        };
        for (i, a) in self.account.iter_mut().enumerate() {
            for (key, file) in [
                ("client_secret_file", &mut a.client_secret_file),
                ("password_file", &mut a.password_file),
                ("private_key_file", &mut a.private_key_file),
                ("service_account_file", &mut a.service_account_file),
                ("certificate_file", &mut a.certificate_file),
                ("ca_file", &mut a.ca_file),
            ] {
                expand(file, format!("account[{i}].{key}"))?;
            }
        }
        for (i, l) in self.listener.iter_mut().enumerate() {
            expand(&mut l.cert, format!("listener[{i}].cert"))?;
            expand(&mut l.key, format!("listener[{i}].key"))?;
        }
        // The systemd credential reaches the service alone, in the same directory (LoadCredentialEncrypted=).
        if secrets != Secrets::Read
            && self.token_encryption.as_deref() == Some("systemd-creds")
            && std::env::var_os("CREDENTIALS_DIRECTORY").is_none_or(|d| d.is_empty())
        {
            at_start.push("token_encryption".into());
        }
        Ok(())
    }
}

/// A file relay must read at start. Secrets must not be readable by others: the daemon refuses them, because
/// a world-readable client secret is a leaked one.
fn check_secret_file(path: &std::path::Path, secret: bool) -> Result<(), String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if !meta.is_file() {
        return Err(format!("{} is not a regular file", path.display()));
    }
    // Nothing these keys name can be empty (a secret, a password, a key, a certificate): an empty file is one
    // not yet filled in, or truncated; sent as it is, it would fail at the provider in other words.
    if meta.len() == 0 {
        return Err(format!("{} is empty", path.display()));
    }
    if secret {
        refuse_readable_by_others(path, &meta)?;
    }
    std::fs::File::open(path)
        .map(drop)
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// A listener's private key: refused, like the account secrets, when others can read it. A key that is missing or
/// cannot be opened passes here: the TLS load reports it, in its own words, after the certificate.
fn check_key_mode(path: &std::path::Path) -> Result<(), String> {
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_file() => refuse_readable_by_others(path, &meta),
        _ => Ok(()),
    }
}

/// The standard for secret files: 0640 or stricter, nothing for others and no writing by the group.
fn refuse_readable_by_others(
    path: &std::path::Path,
    meta: &std::fs::Metadata,
) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o027 == 0 {
        return Ok(());
    }
    let what = if mode & 0o004 != 0 {
        "readable by others"
    } else if mode & 0o007 != 0 {
        // 0602, 0601: others cannot read it, but may replace or run it, which a secret must not allow either.
        "open to others"
    } else {
        // 0660: anyone in the file's group could put their own key or secret in its place.
        "writable by its group"
    };
    Err(format!(
        "{} is {what} (mode {mode:04o}); run `chmod 640 {}`",
        path.display(),
        path.display()
    ))
}

/// The largest sending limit taken: far above any provider's, and small enough that counts never overflow.
const MAX_RATE: u32 = 1_000_000;

const YEAR: Duration = Duration::from_secs(365 * 86_400);

/// Durations that get added to the clock are kept sane, so that date arithmetic can never overflow.
fn at_most(d: Duration, max: Duration, text: &str) -> Result<Duration, String> {
    if d > max {
        return Err(format!(
            "`{text}` is longer than {}",
            humantime::format_duration(max)
        ));
    }
    Ok(d)
}

/// A retry step: under a second, a message the upstream keeps refusing for now would be sent again and again in a
/// loop (hundreds of logins a second to the provider, a journal line each).
fn at_least_a_second(d: Duration, text: &str) -> Result<Duration, String> {
    if d < Duration::from_secs(1) {
        return Err(format!(
            "`{text}` is shorter than 1s: a message the upstream refuses for now would be retried in a loop"
        ));
    }
    Ok(d)
}

/// Loopback and private ranges (RFC 1918, RFC 4193, link-local): a listener that admits only these serves its own
/// LAN, where legacy devices get the lenient defaults.
pub(super) fn is_private(net: &ipnet::IpNet) -> bool {
    const PRIVATE: [&str; 8] = [
        "127.0.0.0/8",
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "169.254.0.0/16",
        "::1/128",
        "fc00::/7",
        "fe80::/10",
    ];
    PRIVATE
        .iter()
        .filter_map(|p| p.parse::<ipnet::IpNet>().ok())
        .any(|p| p.contains(net))
}

/// Accepts a CIDR or a bare address (a host).
fn parse_cidr(s: &str) -> Result<IpNet, String> {
    s.parse::<IpNet>()
        .or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from))
        .map_err(|_| format!("`{s}` is not a CIDR (e.g. \"192.168.10.0/24\") or an IP address"))
}

fn any_v4() -> IpNet {
    IpNet::V4(ipnet::Ipv4Net::default())
}
fn any_v6() -> IpNet {
    IpNet::V6(ipnet::Ipv6Net::default())
}
fn loopback_v4() -> IpNet {
    IpNet::V4(ipnet::Ipv4Net::new_assert(std::net::Ipv4Addr::LOCALHOST, 8).trunc())
}
fn loopback_v6() -> IpNet {
    IpNet::V6(ipnet::Ipv6Net::new_assert(
        std::net::Ipv6Addr::LOCALHOST,
        128,
    ))
}

/// Most memory one login's hash may ask for (KiB): argon2's own limit is 4 TiB, and a hash pasted with a huge
/// `m=` would have every login allocate it.
const MAX_HASH_MEMORY_KIB: u32 = 1 << 20;
/// Most passes one login's hash may ask for: `relay hash-password` uses 2, OWASP's strongest setting 5.
const MAX_HASH_PASSES: u32 = 100;

/// A `[[user]]` hash relay can check: an argon2 PHC string with parameters argon2 accepts. Anything else would pass
/// here and fail every login as a wrong password, which sends the admin after the device.
fn check_password_hash(hash: &str) -> Result<(), String> {
    let parsed =
        argon2::PasswordHash::new(hash).map_err(|e| format!("not a PHC hash string ({e})"))?;
    let algorithm = parsed.algorithm.as_str();
    argon2::Algorithm::try_from(algorithm)
        .map_err(|_| format!("`{algorithm}` is not argon2 (argon2id, argon2i or argon2d)"))?;
    let params =
        argon2::Params::try_from(&parsed).map_err(|e| format!("argon2 parameters: {e}"))?;
    if params.m_cost() > MAX_HASH_MEMORY_KIB {
        return Err(format!(
            "m={} asks every login for more than 1 GiB of memory",
            params.m_cost()
        ));
    }
    if params.t_cost() > MAX_HASH_PASSES {
        return Err(format!(
            "t={} asks every login for more than {MAX_HASH_PASSES} passes (seconds of CPU each)",
            params.t_cost()
        ));
    }
    if parsed.salt.is_none() || parsed.hash.is_none() {
        return Err("no salt or no hash in it".into());
    }
    Ok(())
}

/// An address relay itself sends to: plain, one `@`, no spaces or brackets.
pub(super) fn check_mailbox(to: &str) -> Result<(), String> {
    let plain = to.chars().all(|c| c.is_ascii_graphic()) && !to.contains(['<', '>']);
    if !plain || to.matches('@').count() != 1 || to.starts_with('@') || to.ends_with('@') {
        return Err(format!(
            "`{to}` is not a plain address like \"admin@example.com\""
        ));
    }
    Ok(())
}

/// The name relay gives in its greeting, its EHLO and its `Received:` lines: a domain name (letters, digits,
/// hyphens, dots) or an address literal. Anything else would be sent to clients and written into every message as
/// it is, a line break included.
fn check_hostname(name: &str) -> Result<(), String> {
    let literal = name.starts_with('[') && name.ends_with(']') && name.len() > 2;
    let domain = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    // RFC 5321 section 4.1.3: an IPv4 address, or `IPv6:` and an IPv6 address; an upstream refuses any other
    // literal in EHLO.
    let literal_ok = literal && {
        let inner = &name[1..name.len() - 1];
        match inner.strip_prefix("IPv6:") {
            Some(v6) => v6.parse::<std::net::Ipv6Addr>().is_ok(),
            None => inner.parse::<std::net::Ipv4Addr>().is_ok(),
        }
    };
    if domain || literal_ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a host name (letters, digits, hyphens and dots, such as \"relay.example.com\"; or an address literal such as \"[192.0.2.1]\")"
        ))
    }
}
