//! The `relay` command line. Everything here is argument parsing and printing; the work is in the library.

use std::io::{BufRead, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use clap::{CommandFactory, Parser, Subcommand};

use relay::config::{Config, ConfigError, DEFAULT_CONFIG_PATH, Secrets};
use relay::queue::retry::Retry;
use relay::queue::room::rounded;
use relay::queue::{Place, QueueEntry, QueueStore};
use relay::terminal::{printable_lines, printable_str as safe};

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
    Authorize { account: String },
    /// Queue counts and account health
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Inspect and act on the queue
    #[command(subcommand)]
    Queue(QueueCommand),
    /// Send a test message through an account now, bypassing the queue; print the upstream transcript (tokens
    /// redacted) and, on failure, what it means and how to fix it
    Test {
        account: String,
        /// The recipient
        #[arg(long, value_name = "ADDR")]
        to: String,
    },
    /// Print a completion script for SHELL (bash, zsh, fish, elvish, powershell)
    Completions { shell: clap_complete::Shell },
    /// Print the relay(8) man page (roff)
    #[command(hide = true)]
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
        #[arg(long)]
        json: bool,
    },
    /// Delete one message, queued or dead, for good
    Delete {
        /// A queue id, as `relay queue list` prints it
        id: String,
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
                {
                    eprintln!("warning: {}: {}", w.key, w.text);
                }
                println!(
                    "# {} is valid; resolved settings follow (secrets redacted)",
                    c.source
                );
                print!("{}", c.to_toml());
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
            man_page(&mut std::io::stdout().lock())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Authorize { account } => authorize(&config()?, &account),
        // Exit 2 as `relay check`, not 1: a monitoring script must not read a config it cannot parse as mail
        // needing attention.
        Command::Status { json } => match inspect() {
            Ok(c) => status(&c, json),
            Err(e) => Ok(invalid(&e)),
        },
        Command::Queue(q) => queue(&inspect()?, q),
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

/// relay(8): one page with every command and its options (clap_mangen alone would point at a page per command),
/// then where relay keeps its files.
fn man_page(out: &mut impl Write) -> std::io::Result<()> {
    let cli = Cli::command();
    let man = clap_mangen::Man::new(cli.clone()).section("8");
    man.render_title(out)?;
    man.render_name_section(out)?;
    man.render_synopsis_section(out)?;
    man.render_description_section(out)?;
    man.render_options_section(out)?;
    writeln!(out, ".SH COMMANDS")?;
    // Depth first, in the order of `relay --help`: `queue list` and the other queue commands after `queue`.
    let mut stack: Vec<(String, &clap::Command)> = cli
        .get_subcommands()
        .map(|c| (c.get_name().to_string(), c))
        .collect();
    stack.reverse();
    while let Some((name, cmd)) = stack.pop() {
        if cmd.is_hide_set() {
            continue;
        }
        if cmd.has_subcommands() {
            let mut subs: Vec<_> = cmd
                .get_subcommands()
                .map(|c| (format!("{name} {}", c.get_name()), c))
                .collect();
            subs.reverse();
            stack.extend(subs);
            continue;
        }
        let args: Vec<_> = cmd
            .get_arguments()
            .filter(|a| !a.is_hide_set() && !a.is_global_set() && a.get_id() != "help")
            .collect();
        let usage: Vec<String> = args.iter().map(|a| roff(&arg_usage(a))).collect();
        writeln!(
            out,
            ".TP\n\\fBrelay {}\\fR {}",
            roff(&name),
            usage.join(" ")
        )?;
        writeln!(
            out,
            "{}",
            roff(&cmd.get_about().map(|a| a.to_string()).unwrap_or_default())
        )?;
        for a in args.iter().filter(|a| a.get_help().is_some()) {
            let help = a.get_help().map(|h| h.to_string()).unwrap_or_default();
            writeln!(
                out,
                ".RS\n.TP\n{}\n{}\n.RE",
                roff(&arg_usage(a)),
                roff(&help)
            )?;
        }
    }
    writeln!(
        out,
        ".SH FILES\n.TP\n/etc/relay/relay.toml\nThe config; \\fBrelay check\\fR validates it.\n.TP\n/var/lib/relay\nThe state dir: queue/, dead/, quarantine/, tokens/.\n.SH SEE ALSO\n\\fBsystemctl\\fR(1), \\fBjournalctl\\fR(1), /usr/share/doc/relay/README.md"
    )
}

/// `--json`, `[--user U]`, `ID`: how an argument is written.
fn arg_usage(a: &clap::Arg) -> String {
    let value = a
        .get_value_names()
        .map(|v| {
            v.iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_else(|| a.get_id().as_str().to_uppercase());
    let text = match a.get_long() {
        Some(long) if a.get_action().takes_values() => format!("--{long} {value}"),
        Some(long) => format!("--{long}"),
        None => value,
    };
    if a.is_required_set() {
        text
    } else {
        format!("[{text}]")
    }
}

/// Text for a roff line: backslashes and dashes escaped, and no line read as a request.
fn roff(text: &str) -> String {
    let escaped = text.replace('\\', "\\e").replace('-', "\\-");
    if escaped.starts_with(['.', '\'']) {
        format!("\\&{escaped}")
    } else {
        escaped
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

/// `--config`, else the system file if present, else the embedded default.
fn load_config(path: Option<&Path>, secrets: Secrets) -> Result<Config, ConfigError> {
    match path {
        Some(p) => Config::load_for(p, secrets),
        None if Path::new(DEFAULT_CONFIG_PATH).exists() => {
            Config::load_for(Path::new(DEFAULT_CONFIG_PATH), secrets)
        }
        None => Ok(Config::embedded_default()),
    }
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

fn status(config: &Config, json: bool) -> Result<ExitCode> {
    let status = relay::status::status(config)?;
    if json {
        let doc = serde_json::json!({
            "queue": status.queue,
            "accounts": status.accounts,
            "running": status.running,
            "disk": status.disk,
            "ok": status.ok,
        });
        println!("{doc}");
    } else {
        let q = &status.queue;
        if config.state_dir.exists() {
            println!("state dir: {}", config.state_dir.display());
        } else {
            // Most often the wrong one: another user's default, another config than the daemon's.
            println!(
                "state dir: {} (does not exist: nothing was ever queued there; is it the one the daemon uses? config: {})",
                config.state_dir.display(),
                config.source
            );
        }
        if status.running {
            println!("daemon: running");
        } else {
            println!(
                "daemon: not running (no `relay serve` holds {}): nothing is accepted or delivered until it starts (`systemctl start relay`; `journalctl -u relay` says why it stopped)",
                config.state_dir.join(".lock").display()
            );
        }
        match &status.disk {
            Some(d) if d.short => println!(
                "disk: {} free on the state dir's filesystem{}, under [queue] min_free_space ({}): new mail is refused with 452 4.3.1 until space is freed; queued mail is still delivered",
                rounded(d.free_bytes),
                d.free_files
                    .map_or(String::new(), |f| format!(" ({f} free inodes)")),
                rounded(d.min_free_space),
            ),
            Some(d) => println!("disk: {} free", rounded(d.free_bytes)),
            None => {}
        }
        print!(
            "queue: {} queued ({} deferred), {} dead",
            q.queued, q.deferred, q.dead
        );
        match q.oldest {
            Some(t) => println!(", oldest {}", age(t)),
            None => println!(),
        }
        if q.dead > 0 {
            println!(
                "dead: {} message(s) failed for good: `relay queue list` shows them with their last error; `relay queue retry ID` sends one again, `relay queue delete ID` removes it",
                q.dead
            );
        }
        if q.quarantined > 0 {
            println!(
                "quarantine: {} file(s) in {} could not be read or failed their seal check; they are neither delivered nor deleted: look at them, then move them back to queue/ or remove them",
                q.quarantined,
                config.state_dir.join("quarantine").display()
            );
        }
        if q.unreadable > 0 {
            println!(
                "unreadable: {} file(s) in {} cannot be read as messages; the daemon moves each to quarantine/ when it meets it",
                q.unreadable,
                config.state_dir.join("queue").display()
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
                println!("  last error: {}", safe(e));
            }
            for w in &a.warnings {
                println!("  warning: {}", safe(w));
            }
            println!("  sending: {}", sending(&a.rate));
            if let Some(d) = &a.last_delivery {
                println!(
                    "  last delivery {} ({} ago): {}",
                    d.outcome,
                    age(d.at),
                    safe(&d.reply)
                );
            }
            if let Some(t) = &a.test {
                println!(
                    "  relay test: {} ({} ago, to {}): {}",
                    t.result,
                    age(t.at),
                    safe(&t.to),
                    safe(&t.reply)
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
    // Empty because the state dir is not there: most often the wrong one (another user's default, another config).
    let note_missing = || {
        if let Some(dir) = store.missing_state_dir() {
            eprintln!(
                "relay: note: the state dir {} does not exist, so nothing was ever queued there (config: {}); is it the one the daemon uses?",
                dir.display(),
                config.source
            );
        }
    };
    match cmd {
        QueueCommand::List { json } => {
            // Printed as read, one message at a time: a backlog of any size is listed in little memory.
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            let mut counts = [0usize; 2];
            let mut print = |i: usize, e: QueueEntry| -> Result<()> {
                if json {
                    let sep = if counts == [0, 0] { "[" } else { "," };
                    write!(out, "{sep}{}", serde_json::to_string(&e)?)?;
                } else {
                    if counts == [0, 0] {
                        writeln!(
                            out,
                            "{:<32}  {:>10}  {:>9}  {:>8}  {:<12}  {:<30}  recipients",
                            "id", "age", "size", "attempts", "next try", "sender"
                        )?;
                    }
                    print_row(&mut out, &e)?;
                }
                counts[i] += 1;
                Ok(())
            };
            let (queued, dead) = (store.order(Place::Queued)?, store.order(Place::Dead)?);
            let unreadable_queued = store.each_entry(queued, |e| print(0, e))?;
            let unreadable_dead = store.each_entry(dead, |e| print(1, e))?;
            let [queued, dead] = counts;
            if json {
                writeln!(out, "{}", if queued + dead == 0 { "[]" } else { "]" })?;
            } else if queued + dead == 0 {
                writeln!(out, "queue is empty")?;
            } else if dead == 0 {
                writeln!(out, "{queued} message(s)")?;
            } else {
                writeln!(
                    out,
                    "{queued} message(s) queued, {dead} dead: failed for good, kept with their last error (`relay queue retry ID` sends one again, `relay queue delete ID` removes it)"
                )?;
            }
            out.flush()?;
            // On stderr, so that `--json` stays one document: the list above is not the whole queue.
            for (place, n, then) in [
                (
                    Place::Queued,
                    unreadable_queued,
                    "the daemon moves to quarantine/ those that are not messages, and tries again those it cannot open until max_age",
                ),
                (Place::Dead, unreadable_dead, "look at them by hand"),
            ] {
                if n > 0 {
                    eprintln!(
                        "relay: note: {n} file(s) in {} cannot be read as messages and are not listed; {then}",
                        store.dir(place).display()
                    );
                }
            }
            if queued > 0 {
                note_held_accounts(config);
            }
            note_missing();
            Ok(ExitCode::SUCCESS)
        }
        QueueCommand::Show { id, json } => {
            let entry = store.entry(QueueStore::parse_id(&id)?)?;
            if json {
                println!("{}", serde_json::to_string(&entry)?);
                return Ok(ExitCode::SUCCESS);
            }
            let msg = &entry.message;
            let env = &msg.envelope;
            let mut out = std::io::stdout().lock();
            writeln!(out, "id:          {}", env.id)?;
            match entry.state {
                Place::Queued => writeln!(out, "state:       queued")?,
                Place::Dead => writeln!(
                    out,
                    "state:       dead (failed for good; `relay queue retry {}` sends it again, `relay queue delete {}` removes it)",
                    env.id, env.id
                )?,
            }
            writeln!(
                out,
                "received:    {} ({} ago)",
                humantime::format_rfc3339_seconds(env.received_at),
                age(env.received_at)
            )?;
            if let Some(t) = entry.requeued_at {
                writeln!(
                    out,
                    "requeued:    {} ({} ago, moved back from dead/)",
                    humantime::format_rfc3339_seconds(t),
                    age(t)
                )?;
            }
            // Everything the client or the upstream wrote is escaped: a header can hold terminal controls.
            writeln!(
                out,
                "client:      {} (helo {})",
                env.client,
                safe(env.helo.as_deref().unwrap_or("-"))
            )?;
            writeln!(
                out,
                "user:        {}",
                safe(env.user.as_deref().unwrap_or("-"))
            )?;
            writeln!(out, "listener:    {}", env.listener)?;
            writeln!(out, "sender:      <{}>", safe(&env.sender))?;
            writeln!(out, "recipients:  {}", safe(&env.recipients.join(", ")))?;
            if !entry.finished.is_empty() {
                writeln!(
                    out,
                    "finished:    {} (delivered to or refused for good; not sent to again)",
                    safe(&entry.finished.join(", "))
                )?;
            }
            writeln!(out, "size:        {} bytes", msg.size)?;
            writeln!(out, "attempts:    {}", entry.attempts)?;
            match (entry.state, entry.next_attempt) {
                (Place::Dead, _) => writeln!(out, "next try:    none (dead)")?,
                (Place::Queued, Some(t)) => writeln!(
                    out,
                    "next try:    {} ({})",
                    humantime::format_rfc3339_seconds(t),
                    next_try(Some(t))
                )?,
                (Place::Queued, None) => writeln!(out, "next try:    {}", next_try(None))?,
            }
            writeln!(
                out,
                "last error:  {}",
                safe(entry.last_error.as_deref().unwrap_or("-"))
            )?;
            writeln!(out, "\n--- headers ({}) ---", msg.path.display())?;
            out.write_all(printable_lines(&msg.header_block()?).as_bytes())?;
            Ok(ExitCode::SUCCESS)
        }
        QueueCommand::Retry { id, all, dead } => {
            let what = match (id, all) {
                (Some(id), false) => Retry::One(QueueStore::parse_id(&id)?),
                (None, true) => Retry::All { dead },
                _ => anyhow::bail!("say which message (relay queue retry ID) or --all"),
            };
            let done = relay::queue::retry::retry(&config.state_dir, what)?;
            match what {
                Retry::One(id) if done.requeued > 0 => println!(
                    "moved {id} from dead/ back to the queue, due now (attempts reset; the recipients it already reached are kept); a running relay picks it up within seconds"
                ),
                _ => println!(
                    "{} message(s) due now; a running relay picks them up within seconds",
                    done.due + done.requeued
                ),
            }
            if matches!(what, Retry::All { .. }) && done.requeued > 0 {
                println!(
                    "{} of them moved back from dead/ (attempts reset)",
                    done.requeued
                );
            }
            if done.dead_left > 0 {
                println!(
                    "{} dead message(s) left in dead/: `relay queue retry ID` moves one back, `relay queue retry --all --dead` every one",
                    done.dead_left
                );
            }
            note_missing();
            Ok(ExitCode::SUCCESS)
        }
        QueueCommand::Delete { id } => {
            let id = QueueStore::parse_id(&id)?;
            match store.delete(id)? {
                Place::Queued => println!("deleted {id}"),
                Place::Dead => println!("deleted {id} (from dead/)"),
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// One message per line; its last error, when it has one, on the line below.
/// "next try: now" is when the daemon may try a message, not a promise that it will: mail for an account that
/// needs authorizing, is paused, or whose upstream does not answer waits whatever its row says. Named on stderr,
/// like `relay status` says it, so that `--json` stays one document.
fn note_held_accounts(config: &Config) {
    for account in &config.accounts {
        let s = relay::status::account_status(config, account);
        if s.state == "ok" {
            continue;
        }
        let since = |t: SystemTime| humantime::format_rfc3339_seconds(t).to_string();
        let why = if let Some(u) = &s.unreachable {
            format!(
                "its upstream {} has not answered since {} ({}), as the daemon last saw it",
                u.upstream,
                since(u.since),
                u.reason
            )
        } else if let Some(p) = &s.paused {
            format!(
                "the provider asked it to pause until {} ({})",
                since(p.until),
                p.reply
            )
        } else if let Some(e) = &s.last_error {
            e.clone()
        } else if let Some(d) = &s.last_delivery {
            format!("its last delivery was {}: {}", d.outcome, d.reply)
        } else {
            String::new()
        };
        eprintln!(
            "relay: note: account {} is {}: {}; queued mail for it may wait whatever its next try says (`relay status` has more)",
            account.name,
            s.state,
            safe(&why)
        );
    }
}

fn print_row(out: &mut impl Write, entry: &QueueEntry) -> std::io::Result<()> {
    let m = &entry.message;
    let e = &m.envelope;
    let sender = if e.sender.is_empty() { "<>" } else { &e.sender };
    writeln!(
        out,
        "{:<32}  {:>10}  {:>9}  {:>8}  {:<12}  {:<30}  {}",
        e.id,
        age(e.received_at),
        m.size,
        entry.attempts,
        match entry.state {
            Place::Queued => next_try(entry.next_attempt),
            Place::Dead => "dead".into(),
        },
        safe(sender),
        safe(&e.recipients.join(","))
    )?;
    if let Some(error) = &entry.last_error {
        writeln!(out, "  last error: {}", safe(error))?;
    }
    Ok(())
}

/// `in 4m 30s`, or `now` for a message that is due (never tried, or its time has come).
fn next_try(at: Option<SystemTime>) -> String {
    match at.and_then(|t| t.duration_since(SystemTime::now()).ok()) {
        Some(wait) => format!(
            "in {}",
            humantime::format_duration(Duration::from_secs(wait.as_secs()))
        ),
        None => "now".into(),
    }
}
