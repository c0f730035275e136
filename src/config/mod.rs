//! The configuration: TOML in, a validated [`Config`] out.
//!
//! Parsing happens in two steps: serde turns the file into `raw::*` structs (unknown keys are an error), then
//! [`validate`](raw::RawConfig::validate) checks what serde cannot and produces the types the rest of relay uses.
//! Every error names the file, the key and the reason, because a sysadmin reads it in `journalctl` without the
//! source at hand.

mod ops;
mod raw;
pub mod rotation;
mod size;
mod warnings;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::Serialize;

pub use ops::{AlertsConfig, Bounce, MetricsConfig, redact_url};
pub use rotation::Rotation;
pub use size::ByteSize;
pub use warnings::{Warning, listener_cert_warning};

/// The embedded default: loopback only, plain, no authentication, no accounts.
pub const EMBEDDED_DEFAULT: &str = r#"
[[listener]]
address = "127.0.0.1:2525"
tls = "none"
auth = "none"
allow = ["127.0.0.0/8", "::1/128"]
"#;

/// Where the default config file lives when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/relay/relay.toml";

/// What is wrong with a config: the first problem, and in `more` every other one validation found, so that one
/// `relay check` lists them all. (A TOML syntax error or an unknown key stops the reading, so it comes alone.)
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    pub file: String,
    pub key: String,
    pub reason: String,
    pub more: Vec<ConfigError>,
}

impl ConfigError {
    pub fn new(file: impl Into<String>, key: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError {
            file: file.into(),
            key: key.into(),
            reason: reason.into(),
            more: Vec::new(),
        }
    }

    /// Every problem (each one's own `file`, `key` and `reason`; `more` is empty but in the first).
    pub fn problems(&self) -> impl Iterator<Item = &ConfigError> {
        std::iter::once(self).chain(&self.more)
    }
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}: {}", self.file, self.key, self.reason)?;
        for p in &self.more {
            write!(f, "\n{p}")?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Config {
    /// Where this config came from: a path, or `<embedded default>`.
    #[serde(skip)]
    pub source: String,
    /// Keys whose `$CREDENTIALS_DIRECTORY/…` path only the service can resolve, for a command that does not read
    /// them ([`Secrets::NotRead`]); their files are checked when the service starts.
    #[serde(skip)]
    pub credentials_at_start: Vec<String>,
    /// BLAKE3 of the config's text, so that `relay status` can tell whether the file is still the one the
    /// running daemon loaded (`running.rs`).
    #[serde(skip)]
    pub digest: String,
    pub state_dir: PathBuf,
    pub hostname: String,
    pub default_account: Option<String>,
    /// Where mail to `<postmaster>` goes: the `postmaster` key, else `[alerts] mail_to`, else the default
    /// account's mailbox.
    pub postmaster: Option<String>,
    #[serde(rename = "listener")]
    pub listeners: Vec<ListenerConfig>,
    #[serde(rename = "user")]
    pub users: Vec<UserConfig>,
    #[serde(rename = "account")]
    pub accounts: Vec<AccountConfig>,
    #[serde(rename = "route")]
    pub routes: Vec<RouteConfig>,
    pub queue: QueueConfig,
    /// `bounce = "sender"`: a DSN to the envelope sender when mail goes to `dead/`.
    pub bounce: Bounce,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alerts: Option<AlertsConfig>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics: Option<MetricsConfig>,
    /// `token_encryption`: token files sealed with this key; none, they are plain (mode 0640).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_encryption: Option<TokenEncryption>,
}

/// Where the key that seals token files comes from (`token_encryption`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenEncryption {
    /// `"systemd-creds"`: the credential `relay-token-key`, which systemd decrypts (with the host's TPM where it
    /// has one) and hands over in `$CREDENTIALS_DIRECTORY` (`LoadCredentialEncrypted=`).
    SystemdCreds,
    /// A file holding the key (32 random bytes, or 64 hex digits), mode 0640 or stricter.
    KeyFile(PathBuf),
}

impl TokenEncryption {
    /// Parses the config value: `"systemd-creds"` or an absolute path.
    pub fn parse(value: &str) -> Result<TokenEncryption, String> {
        if value == "systemd-creds" {
            return Ok(TokenEncryption::SystemdCreds);
        }
        let path = PathBuf::from(value);
        if !path.is_absolute() {
            return Err(format!(
                "`{value}` is neither \"systemd-creds\" nor an absolute path to a key file"
            ));
        }
        Ok(TokenEncryption::KeyFile(path))
    }
}

impl Serialize for TokenEncryption {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            TokenEncryption::SystemdCreds => s.serialize_str("systemd-creds"),
            TokenEncryption::KeyFile(p) => s.serialize_str(&p.display().to_string()),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    None,
    Starttls,
    Implicit,
}

/// How a listener speaks TLS. Separate from [`TlsMode`] (upstream), which has no `auto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ListenerTls {
    None,
    Starttls,
    Implicit,
    /// Implicit TLS when the client's first byte opens a TLS handshake, else plain with STARTTLS: for devices
    /// that let you type a port but not a mode.
    Auto,
}

impl ListenerTls {
    pub fn name(self) -> &'static str {
        match self {
            ListenerTls::None => "none",
            ListenerTls::Starttls => "starttls",
            ListenerTls::Implicit => "implicit",
            ListenerTls::Auto => "auto",
        }
    }
}

/// Which TLS versions and suites a listener accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsCompat {
    /// rustls: TLS 1.2 with AEAD suites and TLS 1.3.
    #[default]
    Modern,
    /// OpenSSL, also TLS 1.0/1.1, RSA key exchange and CBC suites: for devices made before about 2016.
    Legacy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthPolicy {
    /// MAIL is refused until the client has authenticated.
    Required,
    /// AUTH is offered; clients inside `allow` may also send without it.
    Optional,
    /// AUTH is not offered; every client inside `allow` may send.
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BareLineEndings {
    /// Refuse the message (SMTP smuggling defence, RFC 5321 section 2.3.8).
    Reject,
    /// Turn each bare CR or LF into CRLF; for devices that cannot be fixed. Only CRLF.CRLF ends a message.
    Normalize,
    /// For legacy devices that end every line with LF alone: LF ends a line in commands and in DATA, `LF . LF`
    /// ends the message (only for a client that has not ended a command with CRLF: from one that has, it is
    /// text, as under `Normalize`), and everything is stored and forwarded with CRLF. The default for a listener whose allow
    /// list holds only loopback and private ranges (as Postfix exempts `$mynetworks`).
    Lenient,
}

#[derive(Debug, Clone, Serialize)]
pub struct ListenerConfig {
    pub address: SocketAddr,
    pub tls: ListenerTls,
    pub tls_compat: TlsCompat,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub auth: AuthPolicy,
    pub plaintext_auth: bool,
    pub bare_lf: BareLineEndings,
    pub allow: Vec<IpNet>,
    pub max_message_size: ByteSize,
    pub max_recipients: usize,
    #[serde(with = "humantime_serde")]
    pub command_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub data_timeout: Duration,
    pub max_connections: usize,
    pub max_connections_per_client: usize,
    #[serde(with = "humantime_serde")]
    pub auth_failure_delay: Duration,
}

#[derive(Clone, Serialize)]
pub struct UserConfig {
    pub name: String,
    #[serde(serialize_with = "redacted")]
    pub password_hash: String,
    pub account: Option<String>,
}

/// A hash is not the password, but it is what an offline guesser needs: keep it out of logs too.
impl std::fmt::Debug for UserConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserConfig")
            .field("name", &self.name)
            .field("password_hash", &"[redacted]")
            .field("account", &self.account)
            .finish()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    Microsoft,
    Google,
    Generic,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Flow {
    DeviceCode,
    AuthorizationCode,
    ClientCredentials,
    Password,
    ServiceAccount,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Transport {
    Smtp,
    Graph,
    GmailApi,
}

/// How the client authenticates to the token endpoint (RFC 6749 section 2.3, RFC 7523).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuth {
    /// The secret in the form body (Microsoft's and Google's usual way).
    ClientSecretPost,
    /// The secret in an HTTP Basic header.
    ClientSecretBasic,
    /// A JWT signed with `private_key_file` (needs `certificate_file` too).
    PrivateKeyJwt,
}

/// The signature of a client assertion (private_key_jwt).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
pub enum AssertionAlgorithm {
    /// PS256 with an `x5t#S256` header: what Microsoft's current documentation asks for.
    PS256,
    /// RS256 with a SHA-1 `x5t` header: older Microsoft documentation, and some other providers.
    RS256,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RewriteFrom {
    None,
    Envelope,
    Header,
}

/// An upstream account. Issue 2 only reads and checks these; delivery uses them from issue 3 on.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountConfig {
    pub name: String,
    pub provider: Provider,
    pub flow: Flow,
    #[serde(default = "default_transport")]
    pub transport: Transport,
    pub mailbox: String,
    pub tenant: Option<String>,
    pub client_id: Option<String>,
    pub client_secret_file: Option<PathBuf>,
    pub certificate_file: Option<PathBuf>,
    pub private_key_file: Option<PathBuf>,
    /// PS256 (default) or RS256, for client assertions signed with `private_key_file`.
    pub assertion_algorithm: Option<AssertionAlgorithm>,
    /// Default: private_key_jwt with a certificate, else client_secret_post.
    pub client_auth: Option<ClientAuth>,
    pub service_account_file: Option<PathBuf>,
    pub password_file: Option<PathBuf>,
    pub username: Option<String>,
    pub redirect_uri: Option<String>,
    pub client_secret_expires: Option<String>,
    #[serde(default = "default_rewrite")]
    pub rewrite_from: RewriteFrom,
    pub token_url: Option<String>,
    pub device_authorization_url: Option<String>,
    pub authorization_url: Option<String>,
    pub scope: Option<String>,
    pub smtp_host: Option<String>,
    pub smtp_port: Option<u16>,
    pub smtp_tls: Option<TlsMode>,
    /// How long the upstream SMTP server may take over any one step before the attempt is deferred (60 s).
    #[serde(default, with = "humantime_serde")]
    pub smtp_timeout: Option<Duration>,
    pub ca_file: Option<PathBuf>,
    /// Upstream connections (and so deliveries in flight) at once for this account; see
    /// [`AccountConfig::connections`]. After validation this holds the effective value, for `relay check`.
    #[serde(default)]
    pub max_connections: Option<usize>,
    pub graph_url: Option<String>,
    pub gmail_api_url: Option<String>,
    /// Where a Microsoft SMTP account goes when the tenant has SMTP AUTH off (535 5.7.139, 550 5.7.30): only
    /// `graph`.
    pub fallback_transport: Option<Transport>,
    /// Graph: keep a copy in the mailbox's Sent Items (Graph's own default).
    #[serde(default = "yes")]
    pub save_to_sent_items: bool,
    /// Sending limits; each key left out takes the provider's default (see [`RateConfig::provider_default`]).
    /// After validation this holds the effective limits, so that `relay check` prints them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<RateConfig>,
}

fn yes() -> bool {
    true
}

/// An account's sending limits, as the provider counts them; a limit that is absent does not apply.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateConfig {
    /// Messages in any 60 seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_minute: Option<u32>,
    /// Recipients in any 24 hours.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recipients_per_day: Option<u32>,
}

impl RateConfig {
    /// What the provider enforces per mailbox. Exchange Online: 30 messages a minute and 10,000 recipients a day.
    /// Gmail: 500 recipients a day for a consumer mailbox (`@gmail.com`, `@googlemail.com`), 2,000 for Google
    /// Workspace, and no documented per-minute limit. A generic provider's limits are unknown: none.
    pub fn provider_default(provider: Provider, mailbox: &str) -> RateConfig {
        match provider {
            Provider::Microsoft => RateConfig {
                per_minute: Some(30),
                recipients_per_day: Some(10_000),
            },
            Provider::Google => {
                let domain = mailbox
                    .rsplit('@')
                    .next()
                    .unwrap_or("")
                    .to_ascii_lowercase();
                let consumer = matches!(domain.as_str(), "gmail.com" | "googlemail.com");
                RateConfig {
                    per_minute: None,
                    recipients_per_day: Some(if consumer { 500 } else { 2_000 }),
                }
            }
            Provider::Generic => RateConfig::default(),
        }
    }

    /// Each limit the config sets, else the provider's.
    pub fn or(self, defaults: RateConfig) -> RateConfig {
        RateConfig {
            per_minute: self.per_minute.or(defaults.per_minute),
            recipients_per_day: self.recipients_per_day.or(defaults.recipients_per_day),
        }
    }
}

impl AccountConfig {
    /// Upstream connections at once: `max_connections`, else 3 for Microsoft over SMTP (Exchange Online takes
    /// three concurrent SMTP submissions per mailbox and refuses a fourth with `432 4.3.2 … concurrent connection
    /// limit exceeded`), else 4.
    pub fn connections(&self) -> usize {
        self.max_connections
            .unwrap_or(match (self.provider, self.transport) {
                (Provider::Microsoft, Transport::Smtp) => 3,
                _ => 4,
            })
    }

    /// The limits relay keeps this account under.
    pub fn limits(&self) -> RateConfig {
        self.rate
            .unwrap_or_default()
            .or(RateConfig::provider_default(self.provider, &self.mailbox))
    }
}

fn default_transport() -> Transport {
    Transport::Smtp
}

fn default_rewrite() -> RewriteFrom {
    RewriteFrom::Envelope
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    pub sender: Option<String>,
    pub recipient: Option<String>,
    pub listener: Option<String>,
    pub user: Option<String>,
    /// The account this route's mail goes through; or `accounts`, to spread it across several.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accounts: Option<Vec<String>>,
}

impl RouteConfig {
    /// The accounts this route names (one, or those of `accounts`); validation makes sure there is at least one.
    pub fn targets(&self) -> Vec<String> {
        match (&self.account, &self.accounts) {
            (_, Some(list)) => list.clone(),
            (Some(one), None) => vec![one.clone()],
            (None, None) => Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct QueueConfig {
    #[serde(serialize_with = "durations")]
    pub retry: Vec<Duration>,
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// Free space the state dir's filesystem keeps beyond a new message's declared size: below it, MAIL is
    /// answered 452 4.3.1, so that delivery's own writes (state files, tokens, bounces) still fit.
    pub min_free_space: ByteSize,
    /// How long mail that failed for good stays in `dead/` (for `relay queue show` and `retry`) before it is
    /// removed; zero keeps it until it is deleted by hand.
    #[serde(with = "humantime_serde")]
    pub dead_max_age: Duration,
}

impl Default for QueueConfig {
    fn default() -> Self {
        let m = |n: u64| Duration::from_secs(60 * n);
        QueueConfig {
            retry: vec![m(1), m(5), m(15), m(30), m(60), m(120), m(240)],
            max_age: Duration::from_secs(5 * 86400),
            min_free_space: ByteSize(1 << 20),
            dead_max_age: Duration::from_secs(30 * 86400),
        }
    }
}

fn redacted<S: serde::Serializer>(_: &str, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str("[redacted]")
}

fn durations<S: serde::Serializer>(v: &[Duration], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(v.iter().map(|d| humantime::format_duration(*d).to_string()))
}

/// Whether the command being run reads the secret files the config names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Secrets {
    /// `relay serve`, `authorize`, `test`: every file must be there, at its resolved path.
    Read,
    /// `relay check`: run from a shell, outside the unit whose `LoadCredential=` a
    /// `$CREDENTIALS_DIRECTORY/…` path names. Such a path is left as it is, and checked when the service starts.
    NotRead,
    /// `relay status`, `queue`: as [`Secrets::NotRead`], and no secret file is even looked at (its mode, whether
    /// it can be opened): they read the state dir only, and a sysadmin who may not read a root-only secret still
    /// sees the queue (it was "invalid config: …: Permission denied", exit 2).
    Unchecked,
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Self::load_for(path, Secrets::Read)
    }

    /// Reads and validates a config file for a command that does or does not read its secrets.
    pub fn load_for(path: &Path, secrets: Secrets) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = crate::small_files::read_to_string(path, crate::small_files::CONFIG)
            .map_err(|e| ConfigError::new(&file, "(file)", format!("cannot read: {e}")))?;
        Self::parse_for(&text, &file, secrets)
    }

    /// `path` if given, else `default` (the system file) if it exists, else the embedded default. A system file
    /// that cannot be looked at (`/etc/relay` is 0750 root:relay, and the sysadmin is in neither) is an error:
    /// taken as absent, `relay status` described the embedded default's empty state dir while the daemon ran,
    /// and `relay check` called the config valid.
    pub fn load_chosen(
        path: Option<&Path>,
        default: &Path,
        secrets: Secrets,
    ) -> Result<Config, ConfigError> {
        match path {
            Some(p) => Self::load_for(p, secrets),
            None => match default.try_exists() {
                Ok(true) => Self::load_for(default, secrets).map_err(|mut e| {
                    if e.key == "(file)" && e.reason.contains("Permission denied") {
                        e.reason.push_str(" (run as root or as a member of its group, or name a config with --config)");
                    }
                    e
                }),
                Ok(false) => Ok(Self::embedded_default()),
                Err(e) => Err(ConfigError::new(
                    default.display().to_string(),
                    "(file)",
                    format!(
                        "cannot tell whether it exists: {e} (run as root or as a member of its group, or name a config with --config)"
                    ),
                )),
            },
        }
    }

    /// What `relay status` still reports on when the chosen config is invalid: the state dir the file names
    /// (read leniently: a file that is TOML with a bad value elsewhere still names it; else the default one),
    /// with the file's name and digest (for the running daemon's report: the reload it refused, an edit since),
    /// and no accounts. `None` when the file cannot be read, or is not TOML.
    pub fn stand_in(path: Option<&Path>, default: &Path) -> Option<Config> {
        let file = match path {
            Some(p) => p,
            None if default.try_exists().ok()? => default,
            None => return None,
        };
        let text = crate::small_files::read_to_string(file, crate::small_files::CONFIG).ok()?;
        // Not TOML at all: no state dir to trust (the default one may be another daemon's, or none).
        let table = toml::from_str::<toml::Table>(&text).ok()?;
        let named = table
            .get("state_dir")
            .and_then(|v| v.as_str())
            .map(PathBuf::from);
        // No state_dir, and a top-level key relay does not know: perhaps `state_dir` itself misspelt, so the
        // default one would be a guess (it described an empty queue and no daemon while the daemon ran).
        const TOP: &[&str] = &[
            "state_dir",
            "hostname",
            "default_account",
            "postmaster",
            "listener",
            "user",
            "account",
            "route",
            "queue",
            "token_encryption",
            "bounce",
            "alerts",
            "metrics",
        ];
        if named.is_none() && table.keys().any(|k| !TOP.contains(&k.as_str())) {
            return None;
        }
        let mut c = Self::embedded_default();
        c.listeners.clear();
        c.state_dir = named.unwrap_or_else(default_state_dir);
        c.source = file.display().to_string();
        c.digest = blake3::hash(text.as_bytes()).to_hex().to_string();
        Some(c)
    }

    /// The config relay runs on when no file is given.
    pub fn embedded_default() -> Config {
        // The embedded text is a constant checked by a unit test, so this cannot fail at run time.
        Self::parse(EMBEDDED_DEFAULT, "<embedded default>")
            .expect("embedded default config is valid")
    }

    /// Parses config text; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<Config, ConfigError> {
        Self::parse_for(text, file, Secrets::Read)
    }

    /// As [`parse`](Self::parse), for a command that does or does not read the secrets.
    pub fn parse_for(text: &str, file: &str, secrets: Secrets) -> Result<Config, ConfigError> {
        let raw: raw::RawConfig = toml::from_str(text).map_err(|e| {
            let key = match e.span() {
                Some(span) => {
                    let upto = &text[..span.start.min(text.len())];
                    let line = upto.matches('\n').count() + 1;
                    let col = upto.rsplit('\n').next().map_or(0, str::len) + 1;
                    match key_at(text, span.start) {
                        Some(key) => format!("{key} (line {line}, column {col})"),
                        None => format!("line {line}, column {col}"),
                    }
                }
                None => "(document)".into(),
            };
            ConfigError::new(file, key, e.message().trim())
        })?;
        let mut config = raw.validate(file, secrets)?;
        config.digest = blake3::hash(text.as_bytes()).to_hex().to_string();
        Ok(config)
    }

    /// The resolved config as TOML, secrets redacted (for `relay check`).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }
}

/// The dotted key (`listener[1].max_recipients`) on the line of byte `offset`, for a parse error that only
/// knows its place: the tables are followed by their headers (`[[listener]]` counted), the key is what precedes
/// `=` on that line. `None` where that reading does not hold (a value spread over lines, an inline table).
fn key_at(text: &str, offset: usize) -> Option<String> {
    let upto = text.get(..offset)?;
    let line_start = upto.rfind('\n').map_or(0, |i| i + 1);
    let mut table = String::new();
    let mut counts: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for line in text.get(..line_start)?.lines() {
        let l = line.split('#').next().unwrap_or("").trim();
        if let Some(name) = l.strip_prefix("[[").and_then(|r| r.strip_suffix("]]")) {
            let n = counts.entry(name.trim()).or_insert(0);
            table = format!("{}[{n}]", name.trim());
            *n += 1;
        } else if let Some(name) = l.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
            table = name.trim().to_string();
        }
    }
    let (key, _) = text.get(line_start..)?.lines().next()?.split_once('=')?;
    let key = key.trim();
    let plain = !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.\"".contains(&b));
    if !plain {
        return None;
    }
    Some(if table.is_empty() {
        key.to_string()
    } else {
        format!("{table}.{key}")
    })
}

/// Where state lives when the config does not say: systemd's `$STATE_DIRECTORY`, then `/var/lib/relay` for
/// root, then the XDG state directory, so that a newcomer's `relay serve` works without root.
pub fn default_state_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("STATE_DIRECTORY")
        && let Some(first) = dir.to_string_lossy().split(':').next()
        && !first.is_empty()
    {
        return PathBuf::from(first);
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return PathBuf::from("/var/lib/relay");
    }
    if let Some(x) = std::env::var_os("XDG_STATE_HOME").filter(|x| !x.is_empty()) {
        return PathBuf::from(x).join("relay");
    }
    match std::env::var_os("HOME") {
        Some(home) => PathBuf::from(home).join(".local/state/relay"),
        None => PathBuf::from("/var/lib/relay"),
    }
}

/// A path that starts with `$CREDENTIALS_DIRECTORY` (or `${CREDENTIALS_DIRECTORY}`), with the directory where
/// systemd put the unit's `LoadCredential=` files; any other path as it is.
pub fn expand_credentials(path: &Path) -> Result<PathBuf, String> {
    const VAR: &str = "CREDENTIALS_DIRECTORY";
    let Some(text) = path.to_str() else {
        return Ok(path.to_path_buf());
    };
    let Some(rest) = text
        .strip_prefix("${CREDENTIALS_DIRECTORY}")
        .or_else(|| text.strip_prefix("$CREDENTIALS_DIRECTORY"))
        .filter(|rest| rest.is_empty() || rest.starts_with('/'))
    else {
        return Ok(path.to_path_buf());
    };
    match std::env::var_os(VAR).filter(|d| !d.is_empty()) {
        Some(dir) => Ok(PathBuf::from(dir).join(rest.trim_start_matches('/'))),
        None => Err(format!(
            "`{text}` names ${VAR}, which is not set: systemd sets it for a unit with LoadCredential=; outside systemd, give the file's own path"
        )),
    }
}

/// The host name for the greeting and `Received:` lines.
pub fn system_hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates within it or truncates.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc == 0 {
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        if let Ok(name) = std::str::from_utf8(&buf[..end])
            && !name.is_empty()
        {
            return name.to_string();
        }
    }
    "localhost".into()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A system file that may be there but cannot be looked at is said, not taken for the embedded default.
    #[test]
    fn a_system_config_that_cannot_be_looked_at_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let absent = dir.path().join("relay.toml");
        let c = Config::load_chosen(None, &absent, Secrets::Read).unwrap();
        assert_eq!(c.source, "<embedded default>");
        // (As root no mode hides a file: a path through a file fails the look the same way as EACCES.)
        std::fs::write(dir.path().join("etc"), "").unwrap();
        let hidden = dir.path().join("etc/relay.toml");
        let e = Config::load_chosen(None, &hidden, Secrets::Read).unwrap_err();
        assert_eq!(e.file, hidden.display().to_string());
        assert!(
            e.reason.contains("cannot tell whether it exists"),
            "{}",
            e.reason
        );
    }

    /// What `relay status` reads an invalid config's state dir from: the file's own `state_dir`, never a guess
    /// when it may be that very key misspelt.
    #[test]
    fn a_stand_in_takes_the_state_dir_the_file_names_and_never_guesses() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("relay.toml");
        let absent = dir.path().join("none.toml");
        std::fs::write(&file, "bounce_typo = 1\nstate_dir = \"/srv/relay\"\n").unwrap();
        let c = Config::stand_in(Some(&file), &absent).unwrap();
        assert_eq!(c.state_dir, Path::new("/srv/relay"));
        assert!(c.accounts.is_empty() && c.listeners.is_empty());
        std::fs::write(&file, "state_dr = \"/srv/relay\"\n").unwrap();
        assert!(Config::stand_in(Some(&file), &absent).is_none());
        std::fs::write(&file, "state_dir = \"/srv/relay\n").unwrap();
        assert!(Config::stand_in(Some(&file), &absent).is_none(), "not TOML");
    }

    #[test]
    fn embedded_default_is_valid() {
        let c = Config::embedded_default();
        assert_eq!(c.listeners.len(), 1);
        assert_eq!(c.listeners[0].address.to_string(), "127.0.0.1:2525");
        assert_eq!(c.listeners[0].auth, AuthPolicy::None);
    }

    /// What `relay check` prints for a listener without an allow list that takes mail without a login: the
    /// loopback network as written (it said `127.0.0.1/8`).
    #[test]
    fn the_default_allow_list_is_written_as_networks() {
        let c = Config::parse(
            "[[listener]]\naddress = \"127.0.0.1:25\"\nauth = \"none\"\n",
            "x.toml",
        )
        .unwrap();
        let shown: Vec<String> = c.listeners[0]
            .allow
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(shown, ["127.0.0.0/8", "::1/128"]);
    }

    #[test]
    fn unknown_key_names_line() {
        let e = Config::parse(
            "[[listener]]\naddress = \"127.0.0.1:25\"\nbogus = 1\n",
            "x.toml",
        )
        .unwrap_err();
        assert_eq!(e.file, "x.toml");
        assert!(e.key.contains("line 3"), "{e}");
        assert!(e.reason.contains("bogus"), "{e}");
    }

    /// A value of the wrong type is a parse error, which knows only its place: the key is found from it.
    #[test]
    fn a_wrong_type_names_its_key() {
        let e = Config::parse(
            "hostname = \"relay\"\n[[listener]]\naddress = \"127.0.0.1:25\"\n\n[[listener]]  # second\naddress = \"127.0.0.1:26\"\nmax_recipients = \"ten\"\n",
            "x.toml",
        )
        .unwrap_err();
        assert!(
            e.key.starts_with("listener[1].max_recipients (line 7"),
            "{e}"
        );
        let e = Config::parse("[queue]\nmax_age = 5\n", "x.toml").unwrap_err();
        assert!(e.key.starts_with("queue.max_age (line 2"), "{e}");
        // dead/'s retention: a duration, zero for "kept until deleted", ten years at most.
        let kept = |text: &str| Config::parse(&format!("[queue]\n{text}\n"), "x.toml");
        assert_eq!(
            Config::parse("", "x.toml").unwrap().queue.dead_max_age,
            Duration::from_secs(30 * 86400)
        );
        assert!(
            kept("dead_max_age = \"0s\"")
                .unwrap()
                .queue
                .dead_max_age
                .is_zero()
        );
        for bad in ["dead_max_age = \"soon\"", "dead_max_age = \"11y\""] {
            let e = kept(bad).unwrap_err();
            assert!(e.key.starts_with("queue.dead_max_age"), "{bad}: {e}");
        }
    }

    #[test]
    fn bad_value_names_key() {
        let e = Config::parse(
            "[[listener]]\naddress = \"127.0.0.1:25\"\ntls = \"starttls\"\n",
            "x.toml",
        )
        .unwrap_err();
        assert_eq!(e.key, "listener[0].cert");
        let e = Config::parse("[[listener]]\naddress = \"nowhere\"\n", "x.toml").unwrap_err();
        assert_eq!(e.key, "listener[0].address");
        let e = Config::parse(
            "[[user]]\nname = \"p\"\npassword_hash = \"plain\"\n",
            "x.toml",
        )
        .unwrap_err();
        assert_eq!(e.key, "user[0].password_hash");
    }

    /// A hash relay could never check a login against is refused with the reason, not found out at the first
    /// login as a "wrong password".
    #[test]
    fn password_hashes_must_be_argon2_with_sane_parameters() {
        let salt_and_hash = "c2FsdHNhbHQ$K1XcYB0T/Vr5xa6Q0rD0bNPqQHxqx2h8CfPqI9z1Ddk";
        for (params, why) in [
            ("$bogus$v=19$m=19456,t=2,p=1$", "`bogus` is not argon2"),
            ("$argon2id$v=19$m=4,t=2,p=1$", "argon2 parameters"),
            ("$argon2id$v=19$m=4000000,t=2,p=1$", "more than 1 GiB"),
            (
                "$argon2id$v=19$m=19456,t=4000000,p=1$",
                "more than 100 passes",
            ),
        ] {
            let text =
                format!("[[user]]\nname = \"p\"\npassword_hash = \"{params}{salt_and_hash}\"\n");
            let e = Config::parse(&text, "x.toml").unwrap_err();
            assert_eq!(e.key, "user[0].password_hash", "{params}");
            assert!(e.reason.contains(why), "{params}: {}", e.reason);
        }
        let good = format!(
            "[[user]]\nname = \"p\"\npassword_hash = \"$argon2id$v=19$m=19456,t=2,p=1${salt_and_hash}\"\n"
        );
        assert!(Config::parse(&good, "x.toml").is_ok());
    }

    /// The host name goes into every greeting and `Received:` line; the state dir must not depend on where relay
    /// was started from.
    #[test]
    fn host_names_and_state_dirs_are_checked() {
        for bad in [
            "bad host\r\n250 fake",
            "",
            "a..b",
            "-a.b",
            "a_b.example",
            "[1.2.3.4\n]",
        ] {
            let e = Config::parse(&format!("hostname = {bad:?}\n"), "x.toml").unwrap_err();
            assert_eq!(e.key, "hostname", "{bad:?}: {e}");
        }
        for good in [
            "relay",
            "relay.example.com",
            "mx-1.example.org",
            "[192.0.2.1]",
            "[IPv6:2001:db8::1]",
        ] {
            let c = Config::parse(&format!("hostname = {good:?}\n"), "x.toml").unwrap();
            assert_eq!(c.hostname, good);
        }
        for bad in ["", "state", "./state"] {
            let e = Config::parse(&format!("state_dir = {bad:?}\n"), "x.toml").unwrap_err();
            assert_eq!(e.key, "state_dir", "{bad:?}: {e}");
        }
    }

    #[test]
    fn timeouts_and_limits_that_could_overflow_a_clock_are_refused() {
        for (line, key) in [
            (
                "command_timeout = \"18446744073709551615s\"",
                "listener[0].command_timeout",
            ),
            (
                "data_timeout = \"500000000000y\"",
                "listener[0].data_timeout",
            ),
            ("command_timeout = \"0s\"", "listener[0].command_timeout"),
            (
                "auth_failure_delay = \"1h\"",
                "listener[0].auth_failure_delay",
            ),
            ("max_recipients = 100000", "listener[0].max_recipients"),
        ] {
            let e = Config::parse(
                &format!("[[listener]]\naddress = \"127.0.0.1:25\"\n{line}\n"),
                "x.toml",
            )
            .unwrap_err();
            assert_eq!(e.key, key, "{line}: {e}");
        }
    }

    #[test]
    fn sending_limits_default_to_the_providers_and_each_key_overrides_its_own() {
        let limits = |provider: &str, mailbox: &str, rate: &str| {
            let tenant = if provider == "microsoft" {
                "tenant = \"t\"\n"
            } else {
                ""
            };
            let text = format!(
                "[[account]]\nname = \"a\"\nprovider = \"{provider}\"\nflow = \"device_code\"\n{tenant}client_id = \"c\"\nmailbox = \"{mailbox}\"\ntoken_url = \"https://idp.test/token\"\ndevice_authorization_url = \"https://idp.test/device\"\nsmtp_host = \"smtp.test\"\nscope = \"s\"\n{rate}\n"
            );
            let c = Config::parse(&text, "x.toml").unwrap_or_else(|e| panic!("{e}"));
            (c.accounts[0].limits(), c.accounts[0].rate)
        };
        let (ms, _) = limits("microsoft", "a@contoso.com", "");
        assert_eq!(
            (ms.per_minute, ms.recipients_per_day),
            (Some(30), Some(10_000))
        );
        let (consumer, _) = limits("google", "scanner@GoogleMail.com", "");
        assert_eq!(
            (consumer.per_minute, consumer.recipients_per_day),
            (None, Some(500))
        );
        let (workspace, _) = limits("google", "scanner@example.org", "");
        assert_eq!(workspace.recipients_per_day, Some(2_000));
        let (generic, shown) = limits("generic", "r@example.net", "");
        assert_eq!(generic, RateConfig::default());
        assert_eq!(shown, None, "no limits: nothing to show");
        let (partial, shown) = limits("microsoft", "a@contoso.com", "rate = { per_minute = 10 }");
        assert_eq!(
            (partial.per_minute, partial.recipients_per_day),
            (Some(10), Some(10_000))
        );
        assert_eq!(
            shown,
            Some(partial),
            "relay check shows the limits that apply"
        );
    }

    /// A listener's key is a secret like an account's: refused when others can read it, with the fix; a key at
    /// 0640 or stricter passes, and one that does not exist is left to the TLS load, which names the certificate
    /// first.
    #[test]
    fn a_listener_key_readable_by_others_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("key.pem");
        std::fs::write(&key, "-----BEGIN PRIVATE KEY-----\n").unwrap();
        let text = |tls: &str, key: &Path| {
            format!(
                "[[listener]]\naddress = \"127.0.0.1:0\"\ntls = \"{tls}\"\ncert = \"/nowhere/cert.pem\"\nkey = {key:?}\n"
            )
        };
        for mode in [0o644, 0o604, 0o647] {
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(mode)).unwrap();
            for tls in ["starttls", "implicit", "auto"] {
                let e = Config::parse(&text(tls, &key), "x.toml").unwrap_err();
                assert_eq!(e.key, "listener[0].key", "{e}");
                assert!(
                    e.reason.contains("readable by others")
                        && e.reason.contains(&format!("chmod 640 {}", key.display())),
                    "{e}"
                );
            }
            // A plain listener does not read its key.
            assert!(Config::parse(&text("none", &key), "x.toml").is_ok());
        }
        for mode in [0o640, 0o600, 0o400, 0o440] {
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(mode)).unwrap();
            assert!(
                Config::parse(&text("starttls", &key), "x.toml").is_ok(),
                "{mode:o}"
            );
        }
        assert!(Config::parse(&text("starttls", &dir.path().join("none.pem")), "x.toml").is_ok());
    }

    #[test]
    fn only_a_leading_credentials_directory_is_expanded() {
        for plain in [
            "/etc/relay/secrets/office",
            "$CREDENTIALS_DIRECTORYX/office",
            "/srv/$CREDENTIALS_DIRECTORY/office",
        ] {
            assert_eq!(
                expand_credentials(Path::new(plain)),
                Ok(PathBuf::from(plain))
            );
        }
    }

    #[test]
    fn check_output_redacts_hashes() {
        let c = Config::parse(
            "[[user]]\nname = \"p\"\npassword_hash = \"$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$K1XcYB0T/Vr5xa6Q0rD0bNPqQHxqx2h8CfPqI9z1Ddk\"\n",
            "x.toml",
        )
        .unwrap();
        let out = c.to_toml();
        assert!(out.contains("[redacted]"));
        assert!(!out.contains("argon2id"));
        assert!(!format!("{c:?}").contains("argon2id"));
    }
}
