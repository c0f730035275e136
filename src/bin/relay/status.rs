//! `relay status`: the report of `relay::status`, printed for people or as JSON.

use std::process::ExitCode;

use anyhow::Result;

use relay::config::{Config, ConfigError};
use relay::queue::room::rounded;
use relay::terminal::printable_str as safe;

use crate::age;

/// `invalid`: the config read is invalid (its problems already said on stderr), and `config` stands in for it
/// ([`Config::stand_in`]): what the state dir says is still reported (the daemon, which runs the config it
/// loaded before, the reload it refused, the queue), without accounts; exit 2.
pub fn status(config: &Config, json: bool, invalid: Option<&ConfigError>) -> Result<ExitCode> {
    let mut status = match relay::status::status(config) {
        Ok(s) => s,
        // Nothing can be said, which is not "needs attention" (1): a monitoring plugin's UNKNOWN, and a JSON
        // document all the same, for what reads stdout.
        Err(e) => {
            let why = format!(
                "cannot read the state dir {}: {e:#}",
                config.state_dir.display()
            );
            if json {
                println!("{}", serde_json::json!({"error": why, "ok": false}));
            }
            eprintln!("relay: {why}");
            return Ok(ExitCode::from(3));
        }
    };
    if invalid.is_some() {
        // The stand-in names no account: every token file would read as stale, and be removed on that advice.
        status.stale_tokens.clear();
    }
    if json {
        let mut doc = serde_json::json!({
            "queue": status.queue,
            "accounts": status.accounts,
            "running": status.running,
            "daemon": status.daemon,
            "disk": status.disk,
            "stale_tokens": status.stale_tokens,
            "queue_dir_missing": status.queue_dir_missing,
            "queue_unwritable": status.queue_unwritable,
            "state_dir_unwritable": status.state_dir_unwritable,
            "certificates": status.certificates,
            "ok": status.ok && invalid.is_none(),
        });
        if let Some(e) = invalid {
            doc["config_error"] = problems(e);
        }
        println!("{doc}");
    } else {
        if invalid.is_some() {
            println!(
                "config: {} is invalid (each problem is said above, as `relay check` says it): its accounts are not shown; the rest is read from the state dir",
                safe(&config.source)
            );
        }
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
            print_daemon(config, status.daemon.as_ref());
        } else {
            println!(
                "daemon: not running (no `relay serve` holds {}): nothing is accepted or delivered until it starts (`systemctl start relay`; `journalctl -u relay` says why it stopped)",
                config.state_dir.join(".lock").display()
            );
        }
        if !status.stale_tokens.is_empty() {
            println!(
                "tokens: {} has token files of accounts the config no longer names ({}): each still holds that account's grant, which nothing uses or renews; remove them once the accounts are gone for good",
                config.state_dir.join("tokens").display(),
                safe(&status.stale_tokens.join(", "))
            );
        }
        match &status.disk {
            Some(d) if d.read_only => println!(
                "disk: the state dir's filesystem is read-only (remounted after disk errors? see `journalctl -k`): new mail is refused with 451 4.3.0 until it is writable again"
            ),
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
        if status.queue_dir_missing {
            println!(
                "queue: {} is missing (removed while relay ran?): new mail is refused with 451 4.3.0; `systemctl restart relay` makes it again (what was in it is gone)",
                config.state_dir.join("queue").display()
            );
        }
        for line in &status.certificates {
            println!("tls: {line}");
        }
        if let Some(why) = &status.state_dir_unwritable {
            println!(
                "state dir: {why}: the daemon cannot save its tokens (a renewed refresh token is lost at the next restart), sending counters or reports (give the directory back to that user with chown, or its write bit with chmod)"
            );
        }
        if let Some(why) = &status.queue_unwritable {
            println!(
                "queue: {why}: new mail is refused with 451 4.3.0 until it can (give the directory back to that user with chown, or its write bit with chmod)"
            );
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
        if let (n @ 1.., Some(until)) = (q.held, q.held_until) {
            println!(
                "held: {n} message(s) wait for their account's sending limits (or a pause its provider asked for), the last until {}; newer mail through the same accounts waits behind them, in order; `relay queue list` shows them",
                humantime::format_rfc3339_seconds(until)
            );
        }
        if q.unroutable > 0 {
            println!(
                "unroutable: {} queued message(s) match no account of this config (no [[route]] matches, and neither the login's account nor default_account names one, or names an account that is gone): they are deferred until `max_age`, then bounced; add a route or default_account, then `systemctl reload relay`",
                q.unroutable
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
        if status.accounts.is_empty() && invalid.is_none() {
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
                let expired =
                    humantime::parse_rfc3339(t).is_ok_and(|at| at <= std::time::SystemTime::now());
                if expired {
                    println!("  token expired at {t}");
                } else {
                    println!("  token valid until {t}");
                }
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
                if let Some(why) = &a.last_delivery_diagnosis {
                    println!("  diagnosis: {}", safe(why));
                }
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
    Ok(if invalid.is_some() {
        ExitCode::from(2)
    } else if status.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// A config's problems for JSON: `FILE: KEY: REASON` each.
pub fn problems(e: &ConfigError) -> serde_json::Value {
    e.problems()
        .map(|p| format!("{}: {}: {}", p.file, p.key, p.reason))
        .collect()
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

/// The running daemon, and whether it runs the config this command read: an edit not applied, a reload it
/// refused (systemd's `reload` succeeds all the same), or another file altogether.
fn print_daemon(config: &Config, daemon: Option<&relay::running::DaemonReport>) {
    let Some(d) = daemon else {
        println!("daemon: running");
        return;
    };
    let at = |t| humantime::format_rfc3339_seconds(t).to_string();
    println!(
        "daemon: running (pid {}, relay {}, since {}; config {} as loaded at {})",
        d.pid,
        safe(&d.version),
        at(d.started_at),
        safe(&d.config),
        at(d.loaded_at)
    );
    if let Some(r) = &d.reload_refused {
        println!(
            "reload: the last reload, at {}, was refused: {}; the daemon still runs the config loaded at {}",
            at(r.at),
            safe(&r.reason),
            at(d.loaded_at)
        );
    }
    if d.other_config {
        println!(
            "config: the daemon runs {}, not {} which this command read: what follows describes a config it does not run (`--config {}` reports on its own)",
            safe(&d.config),
            safe(&config.source),
            safe(&d.config)
        );
    } else if d.config_changed {
        println!(
            "config: {} has changed since the daemon loaded it: this report reads the file as it is now; `relay check`, then `systemctl reload relay`, applies it",
            safe(&config.source)
        );
    }
}
