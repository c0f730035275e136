//! `relay man`: the relay(8) page, built from the same clap definitions as `--help`.

use std::io::Write;

use clap::CommandFactory;

use crate::Cli;

/// relay(8): one page with every command and its options (clap_mangen alone would point at a page per command),
/// then where relay keeps its files.
pub fn man_page(out: &mut impl Write) -> std::io::Result<()> {
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
        ".SH EXIT STATUS\n.TP\n0\nSuccess; for \\fBstatus\\fR, nothing needs attention.\n.TP\n1\nThe command failed (a test message refused, a message not found, one being sent left undeleted); for \\fBstatus\\fR, something needs attention (an account failing or waiting for \\fBrelay authorize\\fR, the daemon not running, a refused reload, a full disk).\n.TP\n2\nThe config is invalid (each problem on a line of its own, with its file, key and reason); the unit's RestartPreventExitStatus=2 does not restart \\fBrelay serve\\fR then.\n.TP\n3\nFor \\fBstatus\\fR: the state dir cannot be read (permissions, not a directory), so nothing can be said; as a monitoring plugin's UNKNOWN.\n.SH FILES\n.TP\n/etc/relay/relay.toml\nThe config; \\fBrelay check\\fR validates it.\n.TP\n/var/lib/relay\nThe state dir: queue/, dead/, quarantine/, tokens/.\n.SH SEE ALSO\n\\fBsystemctl\\fR(1), \\fBjournalctl\\fR(1), /usr/share/doc/relay/README.md"
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
