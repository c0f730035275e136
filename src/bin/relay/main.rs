//! The `relay` command line. Everything here is argument parsing and printing; the work is in the library.
//! The commands with most to print have a module each: `status`, `queue`, `man`.

use std::io::{BufRead, Read};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use clap::{CommandFactory, Parser, Subcommand};

use relay::config::{Config, ConfigError, DEFAULT_CONFIG_PATH, Secrets};

mod man;
mod queue;
mod status;

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
    /// Print an argon2id hash of a password for a [[user]] entry: asks twice on a terminal, else reads a line on
    /// stdin
    HashPassword,
    /// Obtain an account's OAuth2 grant (device code: prints a URL and a code, then waits) and store its tokens
    Authorize {
        /// The account's name, as its [[account]] entry gives it
        account: String,
    },
    /// Queue counts, account health and what the daemon runs; exit 0 all well, 1 something needs attention, 2 the
    /// config is invalid, 3 the state dir cannot be read
    Status {
        /// One JSON document instead of text
        #[arg(long)]
        json: bool,
    },
    /// Inspect and act on the queue
    #[command(subcommand)]
    Queue(QueueCommand),
    /// Send a test message through an account now, bypassing the queue; print the upstream transcript (tokens
    /// redacted) and, on failure, what it means and how to fix it
    Test {
        /// The account's name, as its [[account]] entry gives it
        account: String,
        /// The recipient
        #[arg(long, value_name = "ADDR")]
        to: String,
    },
    /// Print a completion script for SHELL (bash, zsh, fish, elvish, powershell)
    Completions { shell: clap_complete::Shell },
    /// Print the relay(8) man page (roff)
    Man,
}

#[derive(Subcommand)]
enum QueueCommand {
    /// List queued messages, oldest first, with their attempts, next try and last error; then the dead ones
    /// (failed for good, kept in dead/), marked dead
    List {
        /// One JSON array; each message's "state" is "queued" or "dead"
        #[arg(long)]
        json: bool,
    },
    /// Show one message, queued or dead: envelope, delivery state (a dead one's last error) and headers, with
    /// control characters escaped
    Show {
        /// A queue id, as `relay queue list` prints it
        id: String,
        /// One JSON document instead of text
        #[arg(long)]
        json: bool,
    },
    /// Delete messages, queued or dead, for good: by id, or every queued (--all) or dead (--dead) one, those
    /// of one sender (--from) or one login (--user) only if asked. A message being sent at that moment is left
    Delete {
        /// Queue ids, as `relay queue list` prints them
        ids: Vec<String>,
        /// Every queued message (dead ones stay unless --dead is given too)
        #[arg(long, conflicts_with = "ids")]
        all: bool,
        /// Every dead message (failed for good, in dead/)
        #[arg(long, conflicts_with = "ids")]
        dead: bool,
        /// With --all or --dead: only messages with this envelope sender (`<>` for bounces); case does not matter
        #[arg(long, conflicts_with = "ids")]
        from: Option<String>,
        /// With --all or --dead: only messages from clients logged in as this [[user]]
        #[arg(long, conflicts_with = "ids")]
        user: Option<String>,
    },
    /// Try a message now: a queued one at once; a dead one is moved back to the queue for a fresh attempt
    /// (attempts reset, the recipients it already reached kept). Any retry also ends every pause a provider
    /// asked for (a used-up quota) and the minute an account waits after a refused fresh token
    Retry {
        /// A queue id, as `relay queue list` prints it
        id: Option<String>,
        /// Every queued message. Dead ones stay in dead/: they were refused for good, and sending them all again
        /// mostly brings the same refusals (and a second bounce to each sender); add --dead, or retry them by ID
        #[arg(long, conflicts_with = "id")]
        all: bool,
        /// With --all: move every dead message back to the queue too
        #[arg(long, requires = "all")]
        dead: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if prints_only(&cli.command) {
        // `relay queue list | head -1`: a reader that stops early ends the command quietly, as it does `ls`,
        // rather than with a panic on the broken pipe (Rust ignores SIGPIPE by default). Only for commands that
        // talk to no socket, where an ignored SIGPIPE is what keeps a dropped peer from killing the process.
        // SAFETY: called before any thread is started; SIG_DFL is a valid disposition for SIGPIPE.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("relay: {}", causes(&e));
            ExitCode::from(1)
        }
    }
}

/// Commands that read files and print, and open no socket.
fn prints_only(command: &Command) -> bool {
    matches!(
        command,
        Command::Check { .. }
            | Command::Completions { .. }
            | Command::Man
            | Command::Status { .. }
            | Command::Queue(_)
    )
}

/// The error and each of its causes, each said once: many errors already carry their cause's words (`cannot
/// listen: Address already in use`), and printing the cause again after them only adds noise.
fn causes(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

fn run(cli: Cli) -> Result<ExitCode> {
    let config = || load_config(cli.config.as_deref(), Secrets::Read);
    // Commands that never read the secrets: run from a shell, they must not need the unit's LoadCredential=.
    let inspect = || load_config(cli.config.as_deref(), Secrets::NotRead);
    // Nor even look at them: status and the queue read the state dir only.
    let report = || load_config(cli.config.as_deref(), Secrets::Unchecked);
    match cli.command {
        // The same exit code as `relay check` for a config that cannot work: the unit's
        // RestartPreventExitStatus=2 stops systemd from restarting relay in a loop on it.
        // What `relay check` finds, said as it says it (file, key, reason, every problem), before anything starts.
        Command::Serve => match config().and_then(relay::check::check) {
            Ok(c) => serve(c, cli.config),
            Err(e) => Ok(invalid(&e)),
        },
        // An invalid config is said, and exits, as `relay check` says it.
        Command::Check {
            route: Some(route),
            user,
            listener,
        } => match inspect() {
            Ok(c) => check_route(&c, &route, user.as_deref(), listener.as_deref()),
            Err(e) => Ok(invalid(&e)),
        },
        Command::Check { route: None, .. } => match inspect().and_then(relay::check::check) {
            Ok(c) => {
                for w in c
                    .warnings()
                    .into_iter()
                    .chain(relay::check::busy_addresses(&c))
                    .chain(relay::check::service_user_access(&c))
                {
                    eprintln!("warning: {}: {}", w.key, w.text);
                }
                println!(
                    "# {} is valid; resolved settings follow (secrets redacted)",
                    c.source
                );
                print!("{}", relay::check::resolved_toml(&c));
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => Ok(invalid(&e)),
        },
        Command::HashPassword => hash_password(),
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "relay", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
        Command::Man => {
            man::man_page(&mut std::io::stdout().lock())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Authorize { account } => authorize(&config()?, &account),
        // Exit 2 as `relay check`, not 1: a monitoring script must not read a config it cannot parse as mail
        // needing attention.
        Command::Status { json } => match report() {
            Ok(c) => status::status(&c, json, None),
            // What the state dir says is still worth hearing: the daemon runs on, and refused the reload.
            Err(e) => {
                let code = invalid(&e);
                match Config::stand_in(cli.config.as_deref(), Path::new(DEFAULT_CONFIG_PATH)) {
                    Some(c) => status::status(&c, json, Some(&e)),
                    None => {
                        if json {
                            let doc = serde_json::json!({"config_error": status::problems(&e), "ok": false});
                            println!("{doc}");
                        }
                        Ok(code)
                    }
                }
            }
        },
        Command::Queue(q) => match report() {
            Ok(c) => queue::queue(&c, q),
            // Looking needs only the state dir: a sysadmin fixing a config still sees what waits. Acting on the
            // queue waits for a config that can be read whole.
            Err(e) if matches!(q, QueueCommand::List { .. } | QueueCommand::Show { .. }) => {
                match Config::stand_in(cli.config.as_deref(), Path::new(DEFAULT_CONFIG_PATH)) {
                    Some(c) => {
                        eprintln!(
                            "relay: note: {} is invalid ({}: {}); the queue is read from the state dir it names, {}",
                            c.source,
                            e.key,
                            e.reason,
                            c.state_dir.display()
                        );
                        queue::queue(&c, q)
                    }
                    None => Err(e.into()),
                }
            }
            Err(e) => Err(e.into()),
        },
        Command::Test { account, to } => test(&config()?, &account, &to),
    }
}

/// `relay test`: the transcript, the result, and the diagnosis of a failure.
fn test(config: &Config, account: &str, to: &str) -> Result<ExitCode> {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let report = runtime.block_on(relay::probe::run(config, account, to))?;
    for line in report.transcript.lines() {
        println!("{line}");
    }
    if report.transcript.dropped() > 0 {
        println!("   ({} more lines not shown)", report.transcript.dropped());
    }
    if report.delivered() {
        println!("delivered: {}", report.outcome.reply());
        if report.due_now > 0 {
            println!(
                "{} queued message(s) made due now: a running relay tries them at once",
                report.due_now
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    println!("failed: {}", report.outcome.reply());
    match &report.diagnosis {
        Some(d) => println!("diagnosis: {d}"),
        None => println!(
            "diagnosis: relay has no advice for this failure; the transcript above shows where it happened"
        ),
    }
    Ok(ExitCode::from(1))
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

/// `--config`, else the system file if present, else the embedded default.
fn load_config(path: Option<&Path>, secrets: Secrets) -> Result<Config, ConfigError> {
    Config::load_chosen(path, Path::new(DEFAULT_CONFIG_PATH), secrets)
}

/// Says every problem of a config that cannot work, one line each; exit 2, which the unit's
/// RestartPreventExitStatus=2 takes as "do not restart".
fn invalid(e: &relay::config::ConfigError) -> ExitCode {
    for p in e.problems() {
        eprintln!("relay: invalid config: {}: {}: {}", p.file, p.key, p.reason);
    }
    ExitCode::from(2)
}

fn serve(config: Config, path: Option<PathBuf>) -> Result<ExitCode> {
    relay::memory::give_back_large_blocks();
    relay::logging::init();
    // Two crypto providers end up compiled in through dependencies; rustls refuses to guess between them.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let runtime = relay::runtime::for_daemon().context("cannot start the async runtime")?;
    // Not `relay check`'s whole construction as at start: that would also judge the accounts the reload leaves
    // as they run (a token file sealed with another key since), and refuse a reload that only moves a listener.
    let reload = move || load_config(path.as_deref(), Secrets::Read);
    match runtime.block_on(relay::service::serve(config, reload)) {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) if e.is_config() => {
            eprintln!("relay: invalid config: {e}");
            Ok(ExitCode::from(2))
        }
        Err(e) => Err(e.into()),
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
            eprintln!(
                "relay authorize {account}: config file in use: {} (state dir {})",
                config.source,
                config.state_dir.display()
            );
            Ok(ExitCode::from(1))
        }
    }
}

fn hash_password() -> Result<ExitCode> {
    use std::io::IsTerminal;
    if std::io::stdin().is_terminal() {
        // rpassword talks to /dev/tty with echo off.
        let first = rpassword::prompt_password("Password: ").context("cannot read the password")?;
        let again = rpassword::prompt_password("Again: ").context("cannot read the password")?;
        if first != again {
            eprintln!("relay: the two passwords differ; nothing was hashed");
            return Ok(ExitCode::from(1));
        }
        return print_hash(&first);
    }
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
    print_hash(password.strip_suffix('\r').unwrap_or(password))
}

fn print_hash(password: &str) -> Result<ExitCode> {
    if password.is_empty() {
        eprintln!("relay: the password is empty");
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
