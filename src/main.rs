//! The `relay` command line. Everything here is argument parsing and printing; the work is in the library.

use std::io::{BufRead, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use relay::config::{Config, ConfigError, DEFAULT_CONFIG_PATH};
use relay::queue::{QueueStore, QueuedMessage};

#[derive(Parser)]
#[command(
    name = "relay",
    version,
    about = "SMTP relay for legacy devices to Microsoft 365 and Gmail (OAuth2)"
)]
struct Cli {
    /// Config file [default: /etc/relay/relay.toml if it exists, else the embedded default]
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon in the foreground
    Serve,
    /// Validate the config and print what it resolves to (secrets redacted); with --route, say where a message
    /// would go instead
    Check {
        /// Which account a message from FROM to TO (one or more recipients) would go through, and why
        #[arg(long, num_args = 2.., value_names = ["FROM", "TO"])]
        route: Option<Vec<String>>,
        /// The AUTH user that sends it (with --route)
        #[arg(long, requires = "route", value_name = "U")]
        user: Option<String>,
        /// The address of the listener it arrives on, as the config writes it (with --route)
        #[arg(long, requires = "route", value_name = "L")]
        listener: Option<String>,
    },
    /// Read a password on stdin and print an argon2id hash for a [[user]] entry
    HashPassword,
    /// Obtain an account's OAuth2 grant (device code: prints a URL and a code, then waits) and store its tokens
    Authorize { account: String },
    /// Queue counts and account health
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Inspect and act on the queue
    #[command(subcommand)]
    Queue(QueueCommand),
}

#[derive(Subcommand)]
enum QueueCommand {
    /// List queued messages, oldest first
    List {
        #[arg(long)]
        json: bool,
    },
    /// Show one message's envelope and headers
    Show {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Delete one message for good
    Delete { id: String },
    /// Try a deferred message (or every queued message) now
    Retry {
        id: Option<String>,
        #[arg(long, conflicts_with = "id")]
        all: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("relay: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    let config = || load_config(cli.config.as_deref());
    match cli.command {
        Command::Serve => serve(config()?),
        Command::Check {
            route: Some(route),
            user,
            listener,
        } => check_route(&config()?, &route, user.as_deref(), listener.as_deref()),
        Command::Check { route: None, .. } => {
            match load_config(cli.config.as_deref()).and_then(check_files) {
                Ok(c) => {
                    for a in c
                        .accounts
                        .iter()
                        .filter(|a| a.flow == relay::config::Flow::Password)
                    {
                        eprintln!(
                            "warning: account {} uses flow = \"password\": it stops working as soon as the mailbox needs MFA or a Conditional Access policy applies, and Microsoft is retiring it; prefer device_code, authorization_code or client_credentials",
                            a.name
                        );
                    }
                    for (i, l) in c
                        .listeners
                        .iter()
                        .enumerate()
                        .filter(|(_, l)| l.tls_compat == relay::config::TlsCompat::Legacy)
                    {
                        eprintln!(
                            "warning: listener[{i}] ({}) has tls_compat = \"legacy\": it also accepts TLS 1.0/1.1, RSA key exchange and CBC suites, which are weaker; keep it on a port that only the old devices use, with an allow list",
                            l.address
                        );
                    }
                    if let Some(m) = c.metrics.as_ref().filter(|m| !m.address.ip().is_loopback()) {
                        eprintln!(
                            "warning: metrics.address {} is not loopback: whoever reaches it sees account names, queue sizes and token expiry; restrict it with a firewall",
                            m.address
                        );
                    }
                    println!(
                        "# {} is valid; resolved settings follow (secrets redacted)",
                        c.source
                    );
                    print!("{}", c.to_toml());
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    eprintln!("relay: invalid config: {e}");
                    Ok(ExitCode::from(2))
                }
            }
        }
        Command::HashPassword => hash_password(),
        Command::Authorize { account } => authorize(&config()?, &account),
        Command::Status { json } => status(&config()?, json),
        Command::Queue(q) => queue(&config()?, q),
    }
}

/// `relay check --route FROM TO…`: the account and the reason; a user or listener the config does not know is an
/// error.
fn check_route(
    config: &Config,
    route: &[String],
    user: Option<&str>,
    listener: Option<&str>,
) -> Result<ExitCode> {
    let (from, to) = route
        .split_first()
        .context("--route needs the sender and at least one recipient")?;
    let answer = relay::queue::route::explain(config, from, to, user, listener)?;
    print!("{answer}");
    Ok(ExitCode::SUCCESS)
}

/// What `serve` would read at start besides the config itself: certificates and keys.
fn check_files(config: Config) -> Result<Config, ConfigError> {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    for (i, l) in config.listeners.iter().enumerate() {
        if let (Some(cert), Some(key)) = (&l.cert, &l.key)
            && let Err(e) = relay::smtp::tls::acceptor(cert, key, l.tls_compat)
        {
            return Err(ConfigError {
                file: config.source.clone(),
                key: format!("listener[{i}].cert"),
                reason: e.to_string(),
            });
        }
    }
    Ok(config)
}

/// `--config`, else the system file if present, else the embedded default.
fn load_config(path: Option<&Path>) -> Result<Config, ConfigError> {
    match path {
        Some(p) => Config::load(p),
        None if Path::new(DEFAULT_CONFIG_PATH).exists() => {
            Config::load(Path::new(DEFAULT_CONFIG_PATH))
        }
        None => Ok(Config::embedded_default()),
    }
}

fn serve(config: Config) -> Result<ExitCode> {
    relay::memory::give_back_large_blocks();
    relay::logging::init();
    // Two crypto providers end up compiled in through dependencies; rustls refuses to guess between them.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        tracing::info!(config = %config.source, state_dir = %config.state_dir.display(), "starting");
        let relay = relay::Relay::start(&config).await?;
        if config.accounts.is_empty() {
            tracing::warn!("no [[account]] is configured: mail is accepted and queued, but not delivered");
        }
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
        spawn_watchdog();
        relay.run(shutdown_signal()).await?;
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
        tracing::info!("stopped");
        Ok(ExitCode::SUCCESS)
    })
}

/// Pings systemd's watchdog at half its interval while the runtime is alive.
fn spawn_watchdog() {
    if let Some(interval) = sd_notify::watchdog_enabled() {
        let every = interval / 2;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
            }
        });
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers the only way out is being killed; serve on.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}

fn authorize(config: &Config, account: &str) -> Result<ExitCode> {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut out = std::io::stdout();
    match runtime.block_on(relay::authorize::authorize(config, account, &mut out)) {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) => {
            eprintln!("relay authorize {account}: {e}");
            Ok(ExitCode::from(1))
        }
    }
}

fn hash_password() -> Result<ExitCode> {
    let mut line = String::new();
    let stdin = std::io::stdin();
    if stdin
        .lock()
        .read_line(&mut line)
        .context("cannot read stdin")?
        == 0
    {
        // Allow `printf 'pw' | relay hash-password` without a newline, and nothing else.
        stdin.lock().read_to_string(&mut line)?;
    }
    let password = line.strip_suffix('\n').unwrap_or(&line);
    let password = password.strip_suffix('\r').unwrap_or(password);
    if password.is_empty() {
        eprintln!("relay: no password on stdin");
        return Ok(ExitCode::from(1));
    }
    let hash = relay::smtp::auth::hash_password(password)
        .map_err(|e| anyhow::anyhow!("cannot hash: {e}"))?;
    println!("{hash}");
    Ok(ExitCode::SUCCESS)
}

fn age(t: SystemTime) -> String {
    let secs = SystemTime::now()
        .duration_since(t)
        .unwrap_or_default()
        .as_secs();
    humantime::format_duration(Duration::from_secs(secs)).to_string()
}

fn status(config: &Config, json: bool) -> Result<ExitCode> {
    let status = relay::status::status(config)?;
    if json {
        let doc = serde_json::json!({
            "queue": status.queue,
            "accounts": status.accounts,
            "ok": status.ok,
        });
        println!("{doc}");
    } else {
        let q = &status.queue;
        println!("state dir: {}", config.state_dir.display());
        print!(
            "queue: {} queued ({} deferred), {} dead",
            q.queued, q.deferred, q.dead
        );
        match q.oldest {
            Some(t) => println!(", oldest {}", age(t)),
            None => println!(),
        }
        if q.quarantined > 0 || q.unreadable > 0 {
            println!(
                "quarantine: {} file(s) in {} could not be read or failed their seal check; they are neither delivered nor deleted: look at them, then move them back to queue/ or remove them",
                q.quarantined + q.unreadable,
                config.state_dir.join("quarantine").display()
            );
        }
        if status.accounts.is_empty() {
            println!(
                "accounts: no account is configured; mail is queued but not delivered (add an [[account]])"
            );
        }
        for a in &status.accounts {
            println!("account {} <{}>: {}", a.name, a.mailbox, a.state);
            match &a.transport_switched {
                Some(sw) => println!(
                    "  transport: graph (fallback since {}, SMTP refused: {}; SMTP is tried again daily)",
                    humantime::format_rfc3339_seconds(sw.since),
                    sw.reason
                ),
                None => println!("  transport: {}", a.transport),
            }
            if let Some(t) = &a.token_valid_until {
                println!("  token valid until {t}");
            }
            if let Some(t) = &a.last_refresh {
                println!("  last refresh {t}");
            }
            if let Some(e) = &a.last_error {
                println!("  last error: {e}");
            }
            for w in &a.warnings {
                println!("  warning: {w}");
            }
            println!("  sending: {}", sending(&a.rate));
            if let Some(d) = &a.last_delivery {
                println!(
                    "  last delivery {} ({} ago): {}",
                    d.outcome,
                    age(d.at),
                    d.reply
                );
            }
        }
    }
    Ok(if status.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// `12/30 messages this minute, 4310/10000 recipients in the last 24 h`.
fn sending(u: &relay::queue::rate::Usage) -> String {
    let of = |n: u64, limit: Option<u32>| match limit {
        Some(l) => format!("{n}/{l}"),
        None => format!("{n} (no limit)"),
    };
    format!(
        "{} messages this minute, {} recipients in the last 24 h",
        of(u.messages_this_minute, u.per_minute),
        of(u.recipients_last_24h, u.recipients_per_day)
    )
}

fn queue(config: &Config, cmd: QueueCommand) -> Result<ExitCode> {
    let store = QueueStore::new(&config.state_dir);
    match cmd {
        QueueCommand::List { json } => {
            let list = store.list()?;
            if json {
                println!("{}", serde_json::to_string(&list)?);
            } else if list.is_empty() {
                println!("queue is empty");
            } else {
                println!(
                    "{:<32}  {:>10}  {:>9}  {:<30}  recipients",
                    "id", "age", "size", "sender"
                );
                for m in &list {
                    print_row(m);
                }
                println!("{} message(s)", list.len());
            }
            Ok(ExitCode::SUCCESS)
        }
        QueueCommand::Show { id, json } => {
            let msg = store.get(QueueStore::parse_id(&id)?)?;
            if json {
                println!("{}", serde_json::to_string(&msg)?);
                return Ok(ExitCode::SUCCESS);
            }
            let env = &msg.envelope;
            let mut out = std::io::stdout().lock();
            writeln!(out, "id:          {}", env.id)?;
            writeln!(
                out,
                "received:    {} ({} ago)",
                humantime::format_rfc3339_seconds(env.received_at),
                age(env.received_at)
            )?;
            writeln!(
                out,
                "client:      {} (helo {})",
                env.client,
                env.helo.as_deref().unwrap_or("-")
            )?;
            writeln!(out, "user:        {}", env.user.as_deref().unwrap_or("-"))?;
            writeln!(out, "listener:    {}", env.listener)?;
            writeln!(out, "sender:      <{}>", env.sender)?;
            writeln!(out, "recipients:  {}", env.recipients.join(", "))?;
            writeln!(out, "size:        {} bytes", msg.size)?;
            writeln!(out, "\n--- headers ({}) ---", msg.path.display())?;
            out.write_all(&msg.header_block()?)?;
            Ok(ExitCode::SUCCESS)
        }
        QueueCommand::Retry { id, all } => {
            let ids = match (id, all) {
                (Some(id), false) => {
                    let id = QueueStore::parse_id(&id)?;
                    store.get(id)?;
                    Some(vec![id])
                }
                (None, true) => None,
                _ => anyhow::bail!("say which message (relay queue retry ID) or --all"),
            };
            let n = relay::queue::retry::request_retry(&config.state_dir, ids.as_deref())?;
            println!("{n} message(s) due now; a running relay picks them up within seconds");
            Ok(ExitCode::SUCCESS)
        }
        QueueCommand::Delete { id } => {
            let id = QueueStore::parse_id(&id)?;
            store.delete(id)?;
            println!("deleted {id}");
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn print_row(m: &QueuedMessage) {
    let e = &m.envelope;
    let sender = if e.sender.is_empty() { "<>" } else { &e.sender };
    println!(
        "{:<32}  {:>10}  {:>9}  {:<30}  {}",
        e.id,
        age(e.received_at),
        m.size,
        sender,
        e.recipients.join(",")
    );
}
