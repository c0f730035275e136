//! Log set-up: journald with structured fields under systemd, plain lines on stderr elsewhere.
//!
//! Events carry their fields as `relay_event`, `relay_queue_id`, `relay_client`, …; journald upper-cases them,
//! which gives the `RELAY_EVENT=…` fields that `journalctl -u relay RELAY_EVENT=deferred` filters on.

use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Installs the global subscriber. `RUST_LOG` overrides the default level (info).
pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // JOURNAL_STREAM is set by systemd when stderr is connected to the journal: only then is the native
    // protocol worth using (and only then is the socket sure to exist).
    if std::env::var_os("JOURNAL_STREAM").is_some()
        && let Ok(journald) = tracing_journald::layer()
    {
        let journald = journald
            .with_field_prefix(None)
            .with_syslog_identifier("relay".into());
        let _ = tracing_subscriber::registry()
            .with(filter)
            .with(journald)
            .try_init();
        return;
    }
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(false);
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .try_init();
}
