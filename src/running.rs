//! `STATE_DIR/daemon.json`: what the running daemon loaded (its pid, the config file and a digest of its text,
//! when) and how its last reload went, written at start and after each SIGHUP, read by `relay status`.
//!
//! `relay status` reads the config file as it is now; without this it could not tell an edit not yet applied, a
//! reload the daemon refused (systemd's `reload` succeeds all the same: the refusal is only in the journal and
//! `STATUS=`), or a daemon running another file than the one the command read.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::config::Config;

/// The file's content.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Loaded {
    pub pid: u32,
    pub version: String,
    #[serde(with = "humantime_serde")]
    pub started_at: SystemTime,
    /// The config's `source`: a path as given, or `<embedded default>`.
    pub config: String,
    /// BLAKE3 of the config's text, as loaded.
    pub config_digest: String,
    #[serde(with = "humantime_serde")]
    pub loaded_at: SystemTime,
    /// The last reload, when it was refused (a later one that succeeds clears it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<Refused>,
    /// The listeners' certificates as loaded: what clients are shown until the next reload, whatever the files
    /// hold now (a renewal without `systemctl reload relay` changes the file, not what is served).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub certificates: Vec<Served>,
}

/// A listener's certificate as the daemon loaded it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Served {
    pub listener: String,
    pub file: PathBuf,
    #[serde(with = "humantime_serde")]
    pub not_before: SystemTime,
    #[serde(with = "humantime_serde")]
    pub not_after: SystemTime,
}

/// The certificates `config`'s TLS listeners load (read from their files, as the listeners just did).
pub fn served(config: &Config) -> Vec<Served> {
    config
        .listeners
        .iter()
        .filter(|l| l.tls != crate::config::ListenerTls::None)
        .filter_map(|l| {
            let file = l.cert.clone()?;
            let v = crate::certs::validity(&file).ok()?;
            Some(Served {
                listener: l.address.to_string(),
                file,
                not_before: v.not_before,
                not_after: v.not_after,
            })
        })
        .collect()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Refused {
    #[serde(with = "humantime_serde")]
    pub at: SystemTime,
    pub reason: String,
}

pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join("daemon.json")
}

/// The daemon's side: keeps the document and rewrites the file at each change.
pub struct Report {
    path: PathBuf,
    doc: Mutex<Loaded>,
}

impl Report {
    /// Called once the state dir is this daemon's (its lock held): a second `relay serve` on the same state dir
    /// stops at the lock and never writes here.
    pub fn started(config: &Config) -> Report {
        let now = SystemTime::now();
        let report = Report {
            path: path(&config.state_dir),
            doc: Mutex::new(Loaded {
                pid: std::process::id(),
                version: env!("CARGO_PKG_VERSION").to_string(),
                started_at: now,
                config: resolved(&config.source),
                config_digest: config.digest.clone(),
                loaded_at: now,
                refused: None,
                certificates: served(config),
            }),
        };
        report.write();
        report
    }

    pub fn reloaded(&self, source: &str, digest: &str, certificates: Vec<Served>) {
        self.change(|d| {
            d.config = resolved(source);
            d.config_digest = digest.to_string();
            d.loaded_at = SystemTime::now();
            d.refused = None;
            d.certificates = certificates;
        });
    }

    /// The listeners' certificates as last loaded.
    pub fn certificates(&self) -> Vec<Served> {
        self.doc
            .lock()
            .map(|d| d.certificates.clone())
            .unwrap_or_default()
    }

    pub fn refused(&self, reason: &str) {
        self.change(|d| {
            d.refused = Some(Refused {
                at: SystemTime::now(),
                reason: reason.to_string(),
            })
        });
    }

    fn change(&self, f: impl FnOnce(&mut Loaded)) {
        if let Ok(mut d) = self.doc.lock() {
            f(&mut d);
        }
        self.write();
    }

    /// A report, not mail: not fsynced. Small, and written at start and on SIGHUP only: on the caller's thread.
    fn write(&self) {
        let Ok(bytes) = self.doc.lock().map(|d| serde_json::to_vec_pretty(&*d)) else {
            return;
        };
        let written = bytes
            .map_err(std::io::Error::other)
            .and_then(|b| crate::state_files::replace(&self.path, &b));
        if let Err(e) = written {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot write the daemon's report for `relay status`");
        }
    }
}

/// What `relay status` says of the running daemon, next to the config it read itself.
#[derive(Debug, Clone, Serialize)]
pub struct DaemonReport {
    pub pid: u32,
    pub version: String,
    #[serde(with = "humantime_serde")]
    pub started_at: SystemTime,
    pub config: String,
    #[serde(with = "humantime_serde")]
    pub loaded_at: SystemTime,
    /// The daemon runs another config file than the one this command read: the rest of the report describes
    /// a config the daemon does not run.
    pub other_config: bool,
    /// The file has changed since the daemon loaded it: an edit not applied yet (or refused, below).
    pub config_changed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reload_refused: Option<Refused>,
    /// The listeners' certificates as the daemon loaded them.
    pub certificates: Vec<Served>,
}

/// The running daemon's report, when the file is there and its pid is alive (a daemon that has just taken the
/// state dir and not yet written its own would otherwise be described by the last one's).
pub fn read(config: &Config) -> Option<DaemonReport> {
    let loaded: Loaded = crate::small_files::report(&path(&config.state_dir))?;
    if !Path::new("/proc").join(loaded.pid.to_string()).exists() {
        return None;
    }
    let other_config = !same_source(&loaded.config, &config.source);
    Some(DaemonReport {
        pid: loaded.pid,
        config_changed: !other_config && loaded.config_digest != config.digest,
        version: loaded.version,
        started_at: loaded.started_at,
        config: loaded.config,
        loaded_at: loaded.loaded_at,
        other_config,
        reload_refused: loaded.refused,
        certificates: loaded.certificates,
    })
}

/// A config file's path as `relay status` can use it from any directory (a daemon started with `--config
/// relay.toml` had status suggest `--config relay.toml` elsewhere); the embedded default as it is named.
fn resolved(source: &str) -> String {
    std::fs::canonicalize(source)
        .ok()
        .and_then(|p| p.to_str().map(str::to_string))
        .unwrap_or_else(|| source.to_string())
}

/// Two sources name the same file: as written, or once resolved (`relay.toml` from /etc/relay, a symlink).
fn same_source(a: &str, b: &str) -> bool {
    a == b
        || matches!(
            (std::fs::canonicalize(a), std::fs::canonicalize(b)),
            (Ok(x), Ok(y)) if x == y
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path, text: &str) -> Config {
        let file = dir.join("relay.toml");
        std::fs::write(
            &file,
            format!("state_dir = \"{}\"\n{text}", dir.join("state").display()),
        )
        .unwrap();
        Config::load(&file).unwrap()
    }

    #[test]
    fn an_edit_a_refusal_and_a_reload_are_told_apart() {
        let dir = tempfile::tempdir().unwrap();
        let loaded = config(dir.path(), "");
        let report = Report::started(&loaded);
        let now = read(&loaded).unwrap();
        assert!(!now.config_changed && !now.other_config && now.reload_refused.is_none());

        let edited = config(dir.path(), "hostname = \"relay.example\"\n");
        assert!(read(&edited).unwrap().config_changed);
        report.refused("relay.toml: account.x: nope");
        let refused = read(&edited).unwrap();
        assert!(refused.config_changed);
        assert_eq!(
            refused.reload_refused.unwrap().reason,
            "relay.toml: account.x: nope"
        );

        report.reloaded(&edited.source, &edited.digest, Vec::new());
        let now = read(&edited).unwrap();
        assert!(!now.config_changed && now.reload_refused.is_none());
    }

    #[test]
    fn another_config_file_is_said_and_a_dead_pid_reads_as_no_daemon() {
        let dir = tempfile::tempdir().unwrap();
        let loaded = config(dir.path(), "");
        let _report = Report::started(&loaded);
        let mut other = loaded.clone();
        other.source = dir.path().join("other.toml").display().to_string();
        assert!(read(&other).unwrap().other_config);

        let mut doc: Loaded =
            serde_json::from_slice(&std::fs::read(path(&loaded.state_dir)).unwrap()).unwrap();
        doc.pid = u32::MAX;
        std::fs::write(path(&loaded.state_dir), serde_json::to_vec(&doc).unwrap()).unwrap();
        assert!(read(&loaded).is_none());
    }
}
