//! `relay queue`: list, show, retry and delete, printed for people or as JSON.

use std::io::Write;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::Result;

use relay::config::Config;
use relay::queue::retry::Retry;
use relay::queue::route::{Addressing, Routing};
use relay::queue::{Place, QueueEntry, QueueStore};
use relay::terminal::{printable_lines, printable_str as safe};

use crate::{QueueCommand, age};

/// The accounts a message goes through, by the config as it is now (`relay check --route`'s answer): empty
/// when none takes it.
fn accounts_of(config: &Config, routing: &Routing, e: &relay::queue::Envelope) -> Vec<String> {
    routing
        .route(Addressing::from(e))
        .map(|d| {
            d.accounts
                .iter()
                .filter(|n| config.accounts.iter().any(|a| &a.name == *n))
                .cloned()
                .collect()
        })
        .unwrap_or_default()
}

/// An entry as JSON, with the accounts it goes through (`accounts`).
fn entry_json(entry: &QueueEntry, accounts: Vec<String>) -> Result<String> {
    let mut doc = serde_json::to_value(entry)?;
    doc["accounts"] = accounts.into();
    Ok(doc.to_string())
}

pub fn queue(config: &Config, cmd: QueueCommand) -> Result<ExitCode> {
    let store = QueueStore::new(&config.state_dir);
    let routing = Routing::new(config);
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
                let accounts = accounts_of(config, &routing, &e.message.envelope);
                if json {
                    let sep = if counts == [0, 0] { "[" } else { "," };
                    write!(out, "{sep}{}", entry_json(&e, accounts)?)?;
                } else {
                    if counts == [0, 0] {
                        writeln!(
                            out,
                            "{:<32}  {:>10}  {:>9}  {:>8}  {:<12}  {:<30}  recipients",
                            "id", "age", "size", "attempts", "next try", "sender"
                        )?;
                    }
                    // (A config without accounts says so on its own: `relay status`, the daemon's log.)
                    let accounts = (!config.accounts.is_empty()).then_some(accounts.as_slice());
                    print_row(&mut out, &e, accounts)?;
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
            let accounts = accounts_of(config, &routing, &entry.message.envelope);
            if json {
                println!("{}", entry_json(&entry, accounts)?);
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
            // (A config without accounts, or the stand-in for an invalid one, knows none.)
            if !config.accounts.is_empty() {
                writeln!(out, "account:     {}", shown_accounts(&accounts))?;
            }
            writeln!(out, "size:        {} bytes", msg.size)?;
            writeln!(out, "attempts:    {}", entry.attempts)?;
            match (entry.state, entry.next_attempt) {
                (Place::Dead, _) => writeln!(out, "next try:    none (dead)")?,
                (Place::Queued, _) if entry.sending => writeln!(
                    out,
                    "next try:    being sent now (a delivery attempt holds it; the attempts and last error below are from before it)"
                )?,
                (Place::Queued, Some(t)) => writeln!(
                    out,
                    "next try:    {} ({})",
                    humantime::format_rfc3339_seconds(t),
                    next_try(Some(t))
                )?,
                (Place::Queued, None) if entry.held_until.is_some() => {
                    writeln!(out, "next try:    when its hold ends (below)")?
                }
                (Place::Queued, None) => writeln!(out, "next try:    {}", next_try(None))?,
            }
            if let Some(t) = entry.held_until {
                writeln!(
                    out,
                    "held until:  {} ({}): its account's sending limits, or a pause its provider asked for",
                    humantime::format_rfc3339_seconds(t),
                    next_try(Some(t))
                )?;
            }
            // "next try: now" is when the daemon may try it: mail that arrived during its account's pause (or
            // outage) waits untried, with no state of its own to say so.
            if entry.state == Place::Queued && !entry.sending {
                for name in &accounts {
                    if let Some(account) = config.accounts.iter().find(|a| &a.name == name)
                        && let Some((state, why)) = held_why(config, account)
                    {
                        writeln!(out, "waits for:   account {name} ({state}): {}", safe(&why))?;
                    }
                }
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
        QueueCommand::Delete {
            ids,
            all,
            dead,
            from,
            user,
        } => {
            if !ids.is_empty() {
                return delete_ids(&store, &ids);
            }
            if !all && !dead {
                anyhow::bail!(
                    "say which messages: their ids (relay queue delete ID…), --all (every queued one) or --dead (every dead one), with --from or --user to choose among them"
                );
            }
            // A typo would delete nothing and say only "deleted 0": said, as `check --route --user` does. (Still
            // run: the user may have been removed from the config since its mail came.)
            if let Some(u) = &user
                && !config.users.iter().any(|x| &x.name == u)
            {
                eprintln!(
                    "relay: note: no [[user]] is named {:?} in {}: only mail it sent before it was removed can match",
                    safe(u),
                    config.source
                );
            }
            // `<>` (or nothing) is the null sender of bounces, stored as an empty address.
            let from = from.map(|f| f.trim_matches(['<', '>']).to_lowercase());
            let matches = |e: &relay::queue::Envelope| {
                from.as_ref().is_none_or(|f| e.sender.to_lowercase() == *f)
                    && user.as_ref().is_none_or(|u| e.user.as_ref() == Some(u))
            };
            let (mut busy, mut failed) = (0, false);
            for (place, asked, what) in
                [(Place::Queued, all, "queued"), (Place::Dead, dead, "dead")]
            {
                if !asked {
                    continue;
                }
                let done = store.delete_where(place, matches)?;
                println!("deleted {} {what} message(s)", done.deleted);
                if done.unreadable > 0 {
                    eprintln!(
                        "relay: note: {} file(s) in {} cannot be read as messages and were left",
                        done.unreadable,
                        store.dir(place).display()
                    );
                }
                if let Some(e) = &done.first_error {
                    eprintln!(
                        "relay: {} message(s) could not be deleted; the first: {e}",
                        done.failed
                    );
                    failed = true;
                }
                busy += done.busy;
            }
            note_missing();
            if busy > 0 {
                eprintln!(
                    "relay: {busy} message(s) in a delivery attempt right now were left: if the upstream takes them, they leave the queue by themselves; run the command again in a moment for the others"
                );
            }
            Ok(if busy > 0 || failed {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            })
        }
    }
}

/// `relay queue delete ID…`: each said, and the command fails if one could not be deleted (not there, being
/// sent), after trying the others.
fn delete_ids(store: &QueueStore, ids: &[String]) -> Result<ExitCode> {
    let mut failed = false;
    for id in ids {
        match QueueStore::parse_id(id).and_then(|id| store.delete(id).map(|p| (id, p))) {
            Ok((id, place)) => print_deleted(id, place),
            Err(e) => {
                eprintln!("relay: {e}");
                failed = true;
            }
        }
    }
    Ok(if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

fn print_deleted(id: relay::queue::QueueId, place: Place) {
    match place {
        Place::Queued => println!("deleted {id}"),
        Place::Dead => println!("deleted {id} (from dead/)"),
    }
}

/// One message per line; its last error, when it has one, on the line below.
/// "next try: now" is when the daemon may try a message, not a promise that it will: mail for an account that
/// needs authorizing, is paused, or whose upstream does not answer waits whatever its row says. Named on stderr,
/// like `relay status` says it, so that `--json` stays one document.
fn note_held_accounts(config: &Config) {
    for account in &config.accounts {
        let Some((state, why)) = held_why(config, account) else {
            continue;
        };
        eprintln!(
            "relay: note: account {} ({state}): {}; queued mail for it may wait whatever its next try says (`relay status` has more)",
            account.name,
            safe(&why)
        );
    }
}

/// An account that is not `ok`: its state, and why its mail waits.
fn held_why(
    config: &Config,
    account: &relay::config::AccountConfig,
) -> Option<(&'static str, String)> {
    let s = relay::status::account_status(config, account);
    if s.state == "ok" {
        return None;
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
    Some((s.state, why))
}

/// `office`, `office or gmail`, or what no account means.
fn shown_accounts(accounts: &[String]) -> String {
    if accounts.is_empty() {
        "none: no account of the config takes it".into()
    } else {
        accounts.join(" or ")
    }
}

fn print_row(
    out: &mut impl Write,
    entry: &QueueEntry,
    accounts: Option<&[String]>,
) -> std::io::Result<()> {
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
        match (entry.state, entry.held_until) {
            (Place::Queued, _) if entry.sending => "sending now".into(),
            (Place::Queued, Some(until)) => format!("held, {}", next_try(Some(until))),
            (Place::Queued, None) => next_try(entry.next_attempt),
            (Place::Dead, _) => "dead".into(),
        },
        safe(sender),
        safe(&e.recipients.join(","))
    )?;
    if let Some(error) = &entry.last_error {
        // A token error already names its account.
        let named = |a: &[String]| error.starts_with(&format!("account {}: ", shown_accounts(a)));
        match accounts.filter(|a| !named(a)) {
            Some(a) => writeln!(
                out,
                "  last error (account {}): {}",
                shown_accounts(a),
                safe(error)
            )?,
            None => writeln!(out, "  last error: {}", safe(error))?,
        }
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
