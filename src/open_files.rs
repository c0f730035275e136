//! The daemon's open-file limit.
//!
//! systemd starts services with a soft limit of 1024 open files (and a hard one of 524288), and each SMTP
//! session can hold two descriptors (its socket and, while a message arrives, its queue file): three listeners at
//! their default 200 sessions may need more than 1024. A descriptor refused then fails whatever asked for it: a
//! session's queue file (451), a delivery attempt's files, a token file's write, an accepted connection. So
//! `relay serve` raises its soft limit to the hard one at start, as Go's runtime does for its programs, and says
//! (at start and after a reload) when the configured connections could still need more than that.

use crate::config::{Config, Warning};

/// Descriptors beyond the connections: the state dir's lock, logs, the committer's and lanes' files, token and
/// report files, the metrics endpoint, DNS and HTTPS to the providers.
const RESERVE: u64 = 256;

/// Never asked for beyond this, whatever the hard limit says (`RLIM_INFINITY`, or above the kernel's
/// `fs.nr_open`, would be refused).
const CEILING: u64 = 1 << 20;

/// Raises the soft limit to the hard one (at most [`CEILING`]); returns the limit now in force, and what it was
/// when raised.
// `rlim_t` is u64 here, u32 on some 32-bit targets: the conversions are needed there.
#[allow(clippy::useless_conversion)]
pub fn raise() -> std::io::Result<(u64, Option<u64>)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let (soft, hard) = (u64::from(lim.rlim_cur), u64::from(lim.rlim_max));
    let target = hard.min(CEILING);
    if soft >= target {
        return Ok((soft, None));
    }
    lim.rlim_cur = libc::rlim_t::try_from(target).unwrap_or(lim.rlim_max);
    // SAFETY: setrlimit reads the struct we own; a soft limit up to the hard one needs no privilege.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((target, Some(soft)))
}

/// The soft limit in force.
#[allow(clippy::useless_conversion)]
fn current() -> Option<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    (unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0)
        .then(|| u64::from(lim.rlim_cur))
}

/// What the config may hold open at once: two per inbound session (socket, queue file), two per upstream
/// connection (socket, the message's file), and the reserve.
pub fn needed(config: &Config) -> u64 {
    let inbound: usize = config.listeners.iter().map(|l| l.max_connections).sum();
    let upstream: usize = config.accounts.iter().map(|a| a.connections()).sum();
    (inbound as u64 + upstream as u64) * 2 + RESERVE
}

/// Said when the connections the config allows could need more descriptors than the process may open.
pub fn warning(config: &Config) -> Option<Warning> {
    let limit = current()?;
    let need = needed(config);
    (need > limit).then(|| Warning {
        key: "listener.max_connections".into(),
        text: format!(
            "the listeners' and accounts' max_connections may need {need} open files at once, above this process's limit of {limit}: past it, connections and queue files fail (451); raise LimitNOFILE= in the unit (systemctl edit relay), or lower max_connections"
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_listener_needs_room_for_its_sessions_files() {
        let config = Config::embedded_default();
        assert_eq!(
            needed(&config),
            config.listeners[0].max_connections as u64 * 2 + RESERVE
        );
    }
}
