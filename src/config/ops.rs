//! The operator's side of the config: `[alerts]`, `[metrics]` and `bounce`. Kept apart from `raw.rs` so that
//! each table's checks sit beside its keys.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::ConfigError;

/// `[alerts]`: where incidents are announced, and when a condition becomes one.
#[derive(Debug, Clone, Serialize)]
pub struct AlertsConfig {
    /// Sent through a healthy account, from its mailbox.
    pub mail_to: Option<String>,
    /// A JSON POST per notice. Shown by `relay check` without its path, which often holds a token (Slack, Teams).
    #[serde(serialize_with = "url_without_path")]
    pub webhook_url: Option<String>,
    /// The oldest queued message older than this opens an incident.
    #[serde(with = "humantime_serde")]
    pub queue_age: Duration,
    /// This many token refresh failures in a row (without a success between) open an incident.
    pub refresh_failures: u32,
    /// Mail moved to `dead/` within this long of the last such message belongs to the same incident; the
    /// incident closes once this long has passed without one.
    #[serde(with = "humantime_serde")]
    pub dead_window: Duration,
}

/// `[metrics]`: Prometheus text format over HTTP.
#[derive(Debug, Clone, Serialize)]
pub struct MetricsConfig {
    pub address: SocketAddr,
}

/// `bounce`: what relay does for the sender when a message goes to `dead/`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Bounce {
    /// Nothing: the message waits in `dead/` for a person.
    #[default]
    None,
    /// A delivery status notification (RFC 3464) to the envelope sender, queued like any message.
    Sender,
}

pub const DEFAULT_METRICS_ADDRESS: &str = "127.0.0.1:9325";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAlerts {
    mail_to: Option<String>,
    webhook_url: Option<String>,
    #[serde(default, with = "humantime_serde::option")]
    queue_age: Option<Duration>,
    refresh_failures: Option<u32>,
    #[serde(default, with = "humantime_serde::option")]
    dead_window: Option<Duration>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMetrics {
    address: Option<String>,
}

fn err(file: &str, key: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::new(file, key, reason)
}

impl RawAlerts {
    pub(super) fn validate(self, file: &str, accounts: usize) -> Result<AlertsConfig, ConfigError> {
        if self.mail_to.is_none() && self.webhook_url.is_none() {
            return Err(err(
                file,
                "alerts",
                "give `mail_to`, `webhook_url` or both (or leave the table out)",
            ));
        }
        if let Some(to) = &self.mail_to {
            super::raw::check_mailbox(to).map_err(|r| err(file, "alerts.mail_to", r))?;
            if accounts == 0 {
                return Err(err(
                    file,
                    "alerts.mail_to",
                    "alert mail goes out through an [[account]], and none is configured",
                ));
            }
        }
        if let Some(url) = &self.webhook_url {
            check_url(url).map_err(|r| err(file, "alerts.webhook_url", r))?;
        }
        let duration = |key: &str, v: Option<Duration>, default: u64| match v {
            None => Ok(Duration::from_secs(default)),
            Some(d) if d < Duration::from_secs(1) => Err(err(file, key, "must be at least 1s")),
            Some(d) if d > Duration::from_secs(365 * 86_400) => {
                Err(err(file, key, "must be at most a year"))
            }
            Some(d) => Ok(d),
        };
        Ok(AlertsConfig {
            queue_age: duration("alerts.queue_age", self.queue_age, 3600)?,
            dead_window: duration("alerts.dead_window", self.dead_window, 3600)?,
            refresh_failures: match self.refresh_failures {
                None => 3,
                Some(n @ 1..=1000) => n,
                Some(_) => return Err(err(file, "alerts.refresh_failures", "must be 1 to 1000")),
            },
            mail_to: self.mail_to,
            webhook_url: self.webhook_url,
        })
    }
}

impl RawMetrics {
    pub(super) fn validate(self, file: &str) -> Result<MetricsConfig, ConfigError> {
        let text = self
            .address
            .unwrap_or_else(|| DEFAULT_METRICS_ADDRESS.to_string());
        let address = text.parse().map_err(|_| {
            err(
                file,
                "metrics.address",
                format!("`{text}` is not IP:PORT (e.g. \"{DEFAULT_METRICS_ADDRESS}\")"),
            )
        })?;
        Ok(MetricsConfig { address })
    }
}

/// https anywhere; plain http only to loopback (a local forwarder), as for every other URL relay talks to.
fn check_url(url: &str) -> Result<(), String> {
    // The URL itself is not repeated in the errors: a webhook's path is often its secret.
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("not a URL: {e}"))?;
    match parsed.scheme() {
        "https" => Ok(()),
        "http" => {
            let host = parsed.host_str().unwrap_or("");
            if crate::oauth::provider::is_loopback_host(
                host.trim_start_matches('[').trim_end_matches(']'),
            ) {
                Ok(())
            } else {
                Err(format!(
                    "plain http is allowed only to a loopback host, not {}",
                    redact_url(url)
                ))
            }
        }
        other => Err(format!("`{other}:` is not http or https")),
    }
}

fn url_without_path<S: serde::Serializer>(url: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
    match url.as_deref().map(redact_url) {
        Some(shown) => s.serialize_some(&shown),
        None => s.serialize_none(),
    }
}

/// A URL as it may be logged or printed: scheme, host and port, and no path or query.
pub fn redact_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(u) => format!(
            "{}://{}{}/[redacted]",
            u.scheme(),
            u.host_str().unwrap_or(""),
            u.port().map(|p| format!(":{p}")).unwrap_or_default()
        ),
        Err(_) => "[redacted]".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::super::Config;

    const ACCOUNT: &str = "[[account]]\nname = \"a\"\nprovider = \"generic\"\nflow = \"device_code\"\nclient_id = \"c\"\ndevice_authorization_url = \"https://idp.test/device\"\nmailbox = \"a@example.com\"\ntoken_url = \"https://idp.test/token\"\nsmtp_host = \"smtp.test\"\nscope = \"s\"\n";

    #[test]
    fn alerts_and_metrics_take_defaults_and_refuse_what_would_not_work() {
        let c = Config::parse(
            &format!("{ACCOUNT}[alerts]\nmail_to = \"ops@example.com\"\nwebhook_url = \"https://hooks.example.com/T0/B1/secret\"\n[metrics]\n"),
            "x.toml",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let a = c.alerts.as_ref().unwrap();
        assert_eq!(
            (
                a.queue_age.as_secs(),
                a.dead_window.as_secs(),
                a.refresh_failures
            ),
            (3600, 3600, 3)
        );
        assert_eq!(
            c.metrics.as_ref().unwrap().address.to_string(),
            "127.0.0.1:9325"
        );
        assert_eq!(c.bounce, super::Bounce::None);
        let shown = c.to_toml();
        assert!(
            shown.contains("https://hooks.example.com/[redacted]"),
            "{shown}"
        );
        assert!(
            !shown.contains("secret"),
            "the webhook's path is not shown: {shown}"
        );

        for (text, key, reason) in [
            ("[alerts]\n", "alerts", "mail_to"),
            (
                "[alerts]\nmail_to = \"ops@example.com\"\n",
                "alerts.mail_to",
                "none is configured",
            ),
            (
                &format!("{ACCOUNT}[alerts]\nmail_to = \"Ops <ops@example.com>\"\n"),
                "alerts.mail_to",
                "plain address",
            ),
            (
                "[alerts]\nwebhook_url = \"http://hooks.example.com/x\"\n",
                "alerts.webhook_url",
                "loopback",
            ),
            (
                "[alerts]\nwebhook_url = \"ftp://127.0.0.1/x\"\n",
                "alerts.webhook_url",
                "not http",
            ),
            (
                "[alerts]\nwebhook_url = \"http://127.0.0.1:9/x\"\nqueue_age = \"0s\"\n",
                "alerts.queue_age",
                "at least 1s",
            ),
            (
                "[alerts]\nwebhook_url = \"http://[::1]:9/x\"\nrefresh_failures = 0\n",
                "alerts.refresh_failures",
                "1 to 1000",
            ),
            (
                "[metrics]\naddress = \"localhost\"\n",
                "metrics.address",
                "IP:PORT",
            ),
        ] {
            let e = Config::parse(text, "x.toml").unwrap_err();
            assert_eq!(e.key, key, "{text}: {e}");
            assert!(e.reason.contains(reason), "{text}: {e}");
        }
        for (text, line) in [
            ("[alerts]\nwebhook = \"x\"\n", "line 2"),
            ("bounce = \"always\"\n", "line 1"),
        ] {
            let e = Config::parse(text, "x.toml").unwrap_err();
            assert!(e.key.contains(line), "{text}: {e}");
        }
        let c = Config::parse(
            "bounce = \"sender\"\n[alerts]\nwebhook_url = \"http://localhost:8080/x\"\n",
            "x.toml",
        )
        .unwrap();
        assert_eq!(c.bounce, super::Bounce::Sender);
    }
}
