//! Waits that tests through the binary shorten from the environment, in debug builds only (release builds ignore
//! the variables). Not part of relay's interface.

use std::time::Duration;

/// `default`, or in a debug build the milliseconds the environment variable `name` gives.
pub fn duration(name: &str, default: Duration) -> Duration {
    #[cfg(debug_assertions)]
    if let Some(ms) = std::env::var(name).ok().and_then(|v| v.parse().ok()) {
        return Duration::from_millis(ms);
    }
    #[cfg(not(debug_assertions))]
    let _ = name;
    default
}
