//! Log set-up: journald with structured fields under systemd, plain lines on stderr elsewhere.
//!
//! Events carry their fields as `relay_event`, `relay_queue_id`, `relay_client`, …; journald upper-cases them,
//! which gives the `RELAY_EVENT=…` fields that `journalctl -u relay RELAY_EVENT=deferred` filters on.

use std::fmt;

use tracing::field::{Field, Visit};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::FormatFields;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Whether stderr is the journal's stream: `JOURNAL_STREAM` names its device and inode (systemd.exec(5)), and is
/// inherited by whatever the service starts, so it counts only when stderr is still that stream (relay run by a
/// script of a service, its stderr sent to a file, logs to the file).
fn stderr_is_the_journal() -> bool {
    use std::os::fd::AsFd;
    use std::os::unix::fs::MetadataExt;
    let Some(named) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(stderr) = std::io::stderr().as_fd().try_clone_to_owned() else {
        return false;
    };
    std::fs::File::from(stderr)
        .metadata()
        .is_ok_and(|m| names_stream(&named, m.dev(), m.ino()))
}

/// Whether a `JOURNAL_STREAM` value ("DEVICE:INODE", decimal) names the file `(dev, ino)`.
fn names_stream(value: &std::ffi::OsStr, dev: u64, ino: u64) -> bool {
    value
        .to_str()
        .and_then(|s| s.split_once(':'))
        .is_some_and(|(d, i)| d.parse() == Ok(dev) && i.parse() == Ok(ino))
}

/// Installs the global subscriber. `RUST_LOG` overrides the default level (info).
pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // JOURNAL_STREAM is set by systemd when stderr is connected to the journal: only then is the native
    // protocol worth using (and only then is the socket sure to exist).
    if stderr_is_the_journal()
        && let Ok(journald) = tracing_journald::layer()
    {
        // Levels as journalctl's priorities read them (`-p info` is the daemon's default output, `-p notice`
        // what needs a look): the crate maps INFO to NOTICE, which put every delivery among the notices.
        let priorities = tracing_journald::PriorityMappings {
            info: tracing_journald::Priority::Informational,
            debug: tracing_journald::Priority::Debug,
            ..tracing_journald::PriorityMappings::new()
        };
        let journald = journald
            .with_field_prefix(None)
            .with_syslog_identifier("relay".into())
            .with_priority_mappings(priorities);
        let _ = tracing_subscriber::registry()
            .with(filter)
            .with(journald)
            .try_init();
        return;
    }
    let fmt = tracing_subscriber::fmt::layer()
        .fmt_fields(Fields)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(false);
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .try_init();
}

/// The fields of a plain line, `name=value` as tracing-subscriber writes them, except that a value given for
/// display (`%reply`) is quoted and escaped unless it is one plain word. Those values carry other parties' text
/// (an upstream's reply, a token endpoint's error): unquoted, `554 x relay_event="delivered"` would read as a
/// line with a second `relay_event` field to anything that parses the log, and to a person.
struct Fields;

impl<'w> FormatFields<'w> for Fields {
    fn format_fields<R: RecordFields>(&self, mut writer: Writer<'w>, fields: R) -> fmt::Result {
        let mut visitor = FieldWriter {
            writer: &mut writer,
            result: Ok(()),
            first: true,
        };
        fields.record(&mut visitor);
        visitor.result
    }
}

struct FieldWriter<'a, 'w> {
    writer: &'a mut Writer<'w>,
    result: fmt::Result,
    first: bool,
}

impl FieldWriter<'_, '_> {
    fn write(&mut self, field: &Field, value: fmt::Arguments<'_>) {
        if self.result.is_err() {
            return;
        }
        let sep = if self.first { "" } else { " " };
        self.first = false;
        self.result = if field.name() == "message" {
            write!(self.writer, "{sep}{value}")
        } else {
            write!(self.writer, "{sep}{}={value}", field.name())
        };
    }
}

/// One word that cannot be mistaken for more than one value: no space, quote, `=` or control character.
fn plain_word(s: &str) -> bool {
    !s.is_empty()
        && !s
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '"' || c == '=')
}

/// `"…"` with every quote and backslash inside escaped, and no control character: one value, as Debug quotes a
/// string.
fn quoted_value(s: &str) -> bool {
    let Some(inside) = s.strip_prefix('"').and_then(|rest| rest.strip_suffix('"')) else {
        return false;
    };
    let mut chars = inside.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.next().is_none() => return false,
            '"' => return false,
            c if c.is_control() => return false,
            _ => {}
        }
    }
    true
}

impl Visit for FieldWriter<'_, '_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.write(field, format_args!("{value:?}"));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "message" {
            return self.write(field, format_args!("{value:?}"));
        }
        let text = format!("{value:?}");
        // A word, or already one quoted value (a `?string` field, as Debug writes it): as it is.
        if plain_word(&text) || quoted_value(&text) {
            self.write(field, format_args!("{text}"));
        } else {
            self.write(field, format_args!("{text:?}"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .map_err(|_| std::io::Error::other("poisoned"))?
                .extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn journal_stream_counts_only_for_the_file_it_names() {
        let named = |v: &str| names_stream(std::ffi::OsStr::new(v), 64769, 2114);
        assert!(named("64769:2114"));
        assert!(!named("64769:2115"));
        assert!(!named("1:2114"));
        assert!(!named("64769"));
        assert!(!named(""));
        assert!(!named("64769:2114:1"));
    }

    #[test]
    fn text_from_elsewhere_stays_one_quoted_value() {
        let buffer = Buffer::default();
        let out = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .fmt_fields(Fields)
            .with_writer(move || out.clone())
            .with_target(false)
            .with_ansi(false)
            .without_time()
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let reply = "554 5.7.1 no relay_event=\"delivered\"\nrelay_queue_id=01fake";
            let client: std::net::SocketAddr =
                "192.0.2.1:25".parse().unwrap_or_else(|_| unreachable!());
            tracing::info!(relay_event = "dead", relay_client = %client, relay_upstream_reply = %reply, count = 3, empty = %"", address = ?"a@b", forged = %"\"x\" y=\"z\"", "moved to dead/");
        });
        let line = String::from_utf8(buffer.0.lock().map(|b| b.clone()).unwrap_or_default())
            .unwrap_or_default();
        assert_eq!(
            line.trim(),
            r#"INFO moved to dead/ relay_event="dead" relay_client=192.0.2.1:25 relay_upstream_reply="554 5.7.1 no relay_event=\"delivered\"\nrelay_queue_id=01fake" count=3 empty="" address="a@b" forged="\"x\" y=\"z\"""#
        );
    }
}
