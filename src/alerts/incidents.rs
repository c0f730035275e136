//! Incidents: which conditions are open, and the one notice each opening and each recovery is worth.
//!
//! Fed events as they happen ([`Tracker::event`]) and the queue's and credentials' state now and then
//! ([`Tracker::tick`]); returns the notices to send, and never does I/O itself. An incident is keyed by its kind and
//! subject (an account, `account/credential`, or `queue`), opens once, counts what happens while it is open,
//! and closes once:
//!
//! | kind | opens | closes |
//! | --- | --- | --- |
//! | `authorization_needed` | the provider refused the grant (`invalid_grant`) | a token refreshed, or a delivery through the account |
//! | `token_refresh_failed` | `refresh_failures` failures in a row | a token refreshed |
//! | `credential_expiring` | 30, 7, 1 days ahead, expired (each a new notice) | the date is more than 30 days off again |
//! | `dead` | a message moved to `dead/` (per account; `queue` when none was tried), or a file to `quarantine/` (`queue`) | `dead_window` without another |
//! | `queue_age` | the oldest queued message is older than `queue_age` | it no longer is (or the queue is empty) |
//! | `disk_full` | the state dir's filesystem has less than `[queue] min_free_space` left: new mail is refused | it has room again |
//! | `disk_read_only` | the state dir's filesystem is mounted read-only: new mail is refused | it is writable again |
//! | `upstream_unreachable` | an account's SMTP upstream has not answered a connection for [`UNREACHABLE_ALERT`] | it answers again |
//! | `login_refused` | the upstream refused the account's freshly fetched token (SMTP AUTH off, a missing permission): its mail waits | a delivery through the account |

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::events::Event;
use crate::oauth::expiry::{Expiry, threshold_reached, warning};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    AuthorizationNeeded,
    TokenRefreshFailed,
    CredentialExpiring,
    Dead,
    QueueAge,
    DiskFull,
    UpstreamUnreachable,
    LoginRefused,
    DiskReadOnly,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::AuthorizationNeeded => "authorization_needed",
            Kind::TokenRefreshFailed => "token_refresh_failed",
            Kind::CredentialExpiring => "credential_expiring",
            Kind::Dead => "dead",
            Kind::QueueAge => "queue_age",
            Kind::DiskFull => "disk_full",
            Kind::UpstreamUnreachable => "upstream_unreachable",
            Kind::LoginRefused => "login_refused",
            Kind::DiskReadOnly => "disk_read_only",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Open,
    Recovered,
}

/// An open incident, as kept in `STATE_DIR/alerts.json` so that a restart does not announce it again.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Incident {
    pub kind: Kind,
    pub subject: String,
    #[serde(with = "humantime_serde")]
    pub opened: SystemTime,
    /// The last event that belonged to it.
    #[serde(with = "humantime_serde")]
    pub last: SystemTime,
    /// Events that belonged to it (messages moved to dead/, refresh failures).
    pub count: u64,
    /// For `credential_expiring`: the threshold reached (30, 7, 1 days; 0 once expired).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<u64>,
}

/// One announcement: an incident opened or recovered.
#[derive(Debug, Clone, Serialize)]
pub struct Notice {
    #[serde(rename = "event")]
    pub kind: &'static str,
    pub account: Option<String>,
    /// `KIND:SUBJECT`, the same for an incident's opening and its recovery.
    pub incident: String,
    pub state: State,
    pub text: String,
    #[serde(serialize_with = "rfc3339")]
    pub at: SystemTime,
    pub count: u64,
}

fn rfc3339<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_seconds(*t))
}

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub queue_age: Duration,
    pub refresh_failures: u32,
    pub dead_window: Duration,
}

impl From<&crate::config::AlertsConfig> for Limits {
    fn from(c: &crate::config::AlertsConfig) -> Limits {
        Limits {
            queue_age: c.queue_age,
            refresh_failures: c.refresh_failures,
            dead_window: c.dead_window,
        }
    }
}

pub struct Tracker {
    limits: Limits,
    open: BTreeMap<(Kind, String), Incident>,
    /// Refresh failures in a row, per account.
    failures: HashMap<String, u32>,
    /// The configured accounts, once [`Tracker::follow`] has said which: the token and delivery events of any
    /// other (an attempt or refresh begun before a reload removed its account) open and close nothing.
    accounts: Option<HashSet<String>>,
    /// Something worth saving changed since [`Tracker::take_changed`].
    changed: bool,
}

const QUEUE: &str = "queue";
/// One account's upstream for [`Tracker::unreachable`]: its unreachable report, and when it was last seen answering
/// (the account's last delivery, when it was `delivered` or `reachable`).
pub struct UpstreamReport {
    pub account: String,
    pub down: Option<crate::upstream::transports::Unreachable>,
    pub answered_at: Option<SystemTime>,
}

/// How long an upstream may not answer before it is an incident.
pub const UNREACHABLE_ALERT: Duration = Duration::from_secs(5 * 60);

fn age(d: Duration) -> String {
    humantime::format_duration(Duration::from_secs(d.as_secs())).to_string()
}

impl Tracker {
    pub fn new(limits: Limits, open: Vec<Incident>) -> Tracker {
        Tracker {
            limits,
            open: open
                .into_iter()
                .map(|i| ((i.kind, i.subject.clone()), i))
                .collect(),
            failures: HashMap::new(),
            accounts: None,
            changed: false,
        }
    }

    /// New `[alerts]` thresholds (a reload): they apply to what happens from now on.
    pub fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
    }

    /// Follows the configured accounts and their dated credentials (at start, and at each reload): incidents and
    /// failure counts of accounts and credentials no longer configured are dropped, and their events are ignored
    /// from now on. Each dropped incident is announced as recovered, saying why: a monitor that was told it
    /// opened must not keep it open for ever. What was left about removed accounts is bounded by the accounts
    /// configured now, however many reloads come and go.
    pub fn follow(
        &mut self,
        accounts: HashSet<String>,
        expiries: &[(String, Expiry)],
        now: SystemTime,
    ) -> Vec<Notice> {
        let credentials: HashSet<String> = expiries
            .iter()
            .map(|(account, e)| format!("{account}/{}", e.what))
            .collect();
        let gone: Vec<(Kind, String)> = self
            .open
            .keys()
            .filter(|(kind, subject)| match kind {
                Kind::AuthorizationNeeded
                | Kind::TokenRefreshFailed
                | Kind::UpstreamUnreachable
                | Kind::LoginRefused => !accounts.contains(subject),
                Kind::CredentialExpiring => !credentials.contains(subject),
                // Mail moved to dead/ is the messages' story, not the account's: it closes after its window.
                Kind::Dead | Kind::QueueAge | Kind::DiskFull | Kind::DiskReadOnly => false,
            })
            .cloned()
            .collect();
        let mut out = Vec::new();
        for (kind, subject) in gone {
            self.closing(kind, &subject, now, &mut out, |i| match i.kind {
                Kind::CredentialExpiring => format!(
                    "credential {subject} is no longer configured (replaced or its account removed): this alert is closed."
                ),
                _ => format!(
                    "account {subject} is no longer configured: this alert is closed (nothing about the account can recover any more)."
                ),
            });
        }
        self.failures.retain(|a, _| accounts.contains(a));
        self.accounts = Some(accounts);
        out
    }

    fn follows(&self, account: &str) -> bool {
        self.accounts.as_ref().is_none_or(|a| a.contains(account))
    }

    /// The open incidents, for saving.
    pub fn open(&self) -> Vec<Incident> {
        self.open.values().cloned().collect()
    }

    pub fn is_open(&self, kind: Kind, subject: &str) -> bool {
        self.open.contains_key(&(kind, subject.to_string()))
    }

    /// Whether anything changed since the last call.
    pub fn take_changed(&mut self) -> bool {
        std::mem::take(&mut self.changed)
    }

    pub fn event(&mut self, event: &Event<'_>, now: SystemTime) -> Vec<Notice> {
        let mut out = Vec::new();
        let account = match *event {
            Event::AuthorizationNeeded { account, .. }
            | Event::TokenRefreshFailed { account, .. }
            | Event::TokenRefreshed { account }
            | Event::LoginRefused { account, .. }
            | Event::Delivered { account, .. }
            | Event::PartlyDelivered { account, .. } => Some(account),
            _ => None,
        };
        if account.is_some_and(|a| !self.follows(a)) {
            return out;
        }
        match *event {
            Event::AuthorizationNeeded { account, why } => {
                self.opening(Kind::AuthorizationNeeded, account, now, None, &mut out, || {
                    format!("account {account} needs authorization: the provider refused its grant ({why}). Its mail waits in the queue. Fix: run `relay authorize {account}`.")
                });
            }
            Event::TokenRefreshFailed { account, why } => {
                let n = self.failures.entry(account.to_string()).or_default();
                *n = n.saturating_add(1);
                let n = *n;
                if n >= self.limits.refresh_failures {
                    self.opening(Kind::TokenRefreshFailed, account, now, None, &mut out, || {
                        format!("account {account}: {n} token refreshes failed in a row; the last said: {why}. Mail goes on while the current access token lasts and the upstream takes it, then waits in the queue.")
                    });
                }
            }
            Event::TokenRefreshed { account } => {
                self.failures.remove(account);
                self.closing(Kind::TokenRefreshFailed, account, now, &mut out, |i| {
                    format!(
                        "account {account}: a token was refreshed again, after {} failure(s).",
                        i.count
                    )
                });
                self.closing(Kind::AuthorizationNeeded, account, now, &mut out, |_| {
                    format!("account {account} is authorized again: a token was refreshed, and its mail goes out.")
                });
            }
            // Refused every few minutes while it lasts (each hold's end tries again): counted, said once. A new
            // token does not close it (the upstream refused a fresh one); mail that goes through does.
            Event::LoginRefused { account, why } => {
                self.opening(Kind::LoginRefused, account, now, None, &mut out, || {
                    format!("account {account}: the upstream refused its login with a freshly fetched token: {why}. Its mail waits in the queue and is tried again every few minutes (at once after `relay queue retry --all`); `relay test {account} --to ADDRESS` shows the upstream's answer.")
                });
            }
            Event::Delivered { account, .. } | Event::PartlyDelivered { account, .. } => {
                self.closing(Kind::AuthorizationNeeded, account, now, &mut out, |_| {
                    format!("account {account} is authorized again: mail was delivered through it.")
                });
                self.closing(Kind::LoginRefused, account, now, &mut out, |i| {
                    format!(
                        "account {account}: the upstream takes its login again: mail was delivered through it (refused {} time(s) before).",
                        i.count
                    )
                });
            }
            Event::Dead {
                id, account, why, ..
            } => {
                let subject = account.unwrap_or(QUEUE);
                let via = account.map_or(String::new(), |a| format!(" (account {a})"));
                let window = age(self.limits.dead_window);
                self.opening(Kind::Dead, subject, now, None, &mut out, || {
                    format!("message {id}{via} was moved to dead/: {why}. Further messages moved to dead/ within {window} of the last one belong to this incident and are counted, not announced one by one. `relay status` shows the count; the files are in STATE_DIR/dead/.")
                });
            }
            // A `dead` incident of the queue's: mail a client was promised that will not go, as dead mail.
            Event::Quarantined { id, why } => {
                let which = id.map_or("a queue file".to_string(), |id| format!("message {id}"));
                let window = age(self.limits.dead_window);
                self.opening(Kind::Dead, QUEUE, now, None, &mut out, || {
                    format!("{which} was moved to quarantine/ and will not be delivered: {why}. Look at it in STATE_DIR/quarantine/, then move it back to queue/ or remove it. Further messages moved to dead/ or quarantine/ within {window} belong to this incident and are counted.")
                });
            }
            Event::Accepted { .. } | Event::Deferred { .. } | Event::RecipientsRefused { .. } => {}
        }
        out
    }

    /// Now and then: each configured account's SMTP upstream as the daemon last saw it. An outage is announced
    /// once it has lasted [`UNREACHABLE_ALERT`], so that a blip is not an incident; it recovers only once the
    /// upstream was seen answering after the incident opened (a delivery, or the idle check's greeting): no
    /// report alone is not enough, since a restart or a reload removes the reports before anything is tried.
    pub fn unreachable(&mut self, now: SystemTime, reports: &[UpstreamReport]) -> Vec<Notice> {
        let mut out = Vec::new();
        for UpstreamReport {
            account,
            down,
            answered_at,
        } in reports
        {
            if !self.follows(account) {
                continue;
            }
            match down {
                Some(r) => {
                    let down = now.duration_since(r.since).unwrap_or_default();
                    if down < UNREACHABLE_ALERT {
                        continue;
                    }
                    self.opening(Kind::UpstreamUnreachable, account, now, None, &mut out, || {
                        format!("account {account}: its upstream {} has not answered a connection for {} (last: {}); its mail waits in the queue, untried (or goes through another account of its route), and goes once it answers. Check the network path and the upstream's address (`relay test {account}`).", r.upstream, age(down), r.reason)
                    });
                }
                None => {
                    let seen = self
                        .open
                        .get(&(Kind::UpstreamUnreachable, account.clone()))
                        .is_some_and(|i| answered_at.is_some_and(|at| at >= i.opened));
                    if !seen {
                        continue;
                    }
                    self.closing(Kind::UpstreamUnreachable, account, now, &mut out, |i| {
                        format!(
                            "account {account}: its upstream answers again (the alert opened at {}).",
                            humantime::format_rfc3339_seconds(i.opened)
                        )
                    });
                }
            }
        }
        out
    }

    /// Now and then: the state dir's free space (`None` when it could not be read: nothing opens or closes).
    pub fn disk(
        &mut self,
        now: SystemTime,
        report: Option<&crate::queue::room::DiskReport>,
    ) -> Vec<Notice> {
        let mut out = Vec::new();
        let Some(d) = report else {
            return out;
        };
        if d.read_only {
            self.opening(Kind::DiskReadOnly, QUEUE, now, None, &mut out, || {
                "the state dir's filesystem is read-only (remounted after disk errors?): new mail is refused with 451 4.3.0 (devices keep it and try again). Check the kernel log (`journalctl -k`), repair the filesystem, and remount it read-write.".to_string()
            });
        } else {
            self.closing(Kind::DiskReadOnly, QUEUE, now, &mut out, |_| {
                "the state dir's filesystem is writable again: new mail is taken.".to_string()
            });
        }
        let free = d.described();
        if d.short {
            let margin = crate::queue::room::rounded(d.min_free_space);
            self.opening(Kind::DiskFull, QUEUE, now, None, &mut out, || {
                format!("the state dir's filesystem has {free}, under [queue] min_free_space ({margin}): new mail is refused with 452 4.3.1 until space is freed (devices keep it and try again). Queued mail is still delivered; free space on that filesystem.")
            });
        } else {
            self.closing(Kind::DiskFull, QUEUE, now, &mut out, |_| {
                format!("the state dir's filesystem has room again ({free}): new mail is taken.")
            });
        }
        out
    }

    /// Now and then: the oldest queued message's age, and the dated credentials of each account.
    pub fn tick(
        &mut self,
        now: SystemTime,
        oldest: Option<Duration>,
        queued: u64,
        expiries: &[(String, Expiry)],
    ) -> Vec<Notice> {
        let mut out = Vec::new();
        let window = self.limits.dead_window;
        let quiet: Vec<String> = self
            .open
            .values()
            .filter(|i| i.kind == Kind::Dead)
            .filter(|i| now.duration_since(i.last).is_ok_and(|d| d >= window))
            .map(|i| i.subject.clone())
            .collect();
        for subject in quiet {
            // The queue's incident counts files moved to quarantine/ too.
            let (via, place) = if subject == QUEUE {
                (String::new(), "dead/ or quarantine/")
            } else {
                (format!(" through account {subject}"), "dead/")
            };
            self.closing(Kind::Dead, &subject, now, &mut out, |i| {
                format!(
                    "no message{via} has been moved to {place} for {}; {} message(s) went there in this incident, from {} to {}.",
                    age(window),
                    i.count,
                    humantime::format_rfc3339_seconds(i.opened),
                    humantime::format_rfc3339_seconds(i.last)
                )
            });
        }
        let limit = self.limits.queue_age;
        match oldest {
            Some(a) if a > limit => {
                self.opening(Kind::QueueAge, QUEUE, now, None, &mut out, || {
                    format!("the oldest queued message has waited {} (more than {}); {queued} message(s) are queued. `relay status` and `relay queue list` say why.", age(a), age(limit))
                });
            }
            _ => {
                let now_text = match oldest {
                    Some(a) => format!("the oldest queued message has waited {}", age(a)),
                    None => "the queue is empty".to_string(),
                };
                self.closing(Kind::QueueAge, QUEUE, now, &mut out, |_| {
                    format!(
                        "the queue is young again: {now_text} (limit {}).",
                        age(limit)
                    )
                });
            }
        }
        let mut current = Vec::new();
        for (account, e) in expiries {
            let subject = format!("{account}/{}", e.what);
            current.push(subject.clone());
            match threshold_reached(e, now) {
                Some(level) => {
                    let key = (Kind::CredentialExpiring, subject.clone());
                    if self.open.get(&key).is_some_and(|i| i.level == Some(level)) {
                        continue;
                    }
                    // A nearer threshold is a new notice: the incident opens again at its new level.
                    self.open.remove(&key);
                    let text = warning(account, e, now).unwrap_or_default();
                    self.opening(
                        Kind::CredentialExpiring,
                        &subject,
                        now,
                        Some(level),
                        &mut out,
                        || text,
                    );
                }
                None => {
                    let date = humantime::format_rfc3339_seconds(e.at).to_string();
                    self.closing(Kind::CredentialExpiring, &subject, now, &mut out, |_| {
                        format!(
                            "account {account}: the {} is now valid until {}.",
                            e.what,
                            &date[..10]
                        )
                    });
                }
            }
        }
        // Credentials no longer configured: nothing to announce.
        let before = self.open.len();
        self.open.retain(|(kind, subject), _| {
            *kind != Kind::CredentialExpiring || current.contains(subject)
        });
        self.changed |= self.open.len() != before;
        out
    }

    fn opening(
        &mut self,
        kind: Kind,
        subject: &str,
        now: SystemTime,
        level: Option<u64>,
        out: &mut Vec<Notice>,
        text: impl FnOnce() -> String,
    ) {
        self.changed = true;
        if let Some(open) = self.open.get_mut(&(kind, subject.to_string())) {
            open.count = open.count.saturating_add(1);
            open.last = now;
            return;
        }
        let incident = Incident {
            kind,
            subject: subject.to_string(),
            opened: now,
            last: now,
            count: 1,
            level,
        };
        out.push(notice(&incident, State::Open, text(), now));
        self.open.insert((kind, subject.to_string()), incident);
    }

    fn closing(
        &mut self,
        kind: Kind,
        subject: &str,
        now: SystemTime,
        out: &mut Vec<Notice>,
        text: impl FnOnce(&Incident) -> String,
    ) {
        if let Some(incident) = self.open.remove(&(kind, subject.to_string())) {
            self.changed = true;
            out.push(notice(&incident, State::Recovered, text(&incident), now));
        }
    }
}

fn notice(i: &Incident, state: State, text: String, at: SystemTime) -> Notice {
    let account = match i.kind {
        Kind::QueueAge | Kind::DiskFull | Kind::DiskReadOnly => None,
        Kind::Dead if i.subject == QUEUE => None,
        Kind::CredentialExpiring => i.subject.split('/').next().map(str::to_string),
        _ => Some(i.subject.clone()),
    };
    Notice {
        kind: i.kind.name(),
        account,
        incident: format!("{}:{}", i.kind.name(), i.subject),
        state,
        text,
        at,
        count: i.count,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::QueueId;

    fn tracker() -> Tracker {
        Tracker::new(
            Limits {
                queue_age: Duration::from_secs(3600),
                refresh_failures: 3,
                dead_window: Duration::from_secs(3600),
            },
            Vec::new(),
        )
    }

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + secs)
    }

    fn states(n: &[Notice]) -> Vec<(String, State)> {
        n.iter().map(|n| (n.incident.clone(), n.state)).collect()
    }

    #[test]
    fn an_upstream_down_for_five_minutes_is_an_incident_of_its_account() {
        use crate::upstream::transports::Unreachable;
        let mut t = tracker();
        t.follow(HashSet::from(["office".to_string()]), &[], at(0));
        let report = |account: &str, since: Option<SystemTime>, answered_at| UpstreamReport {
            account: account.to_string(),
            down: since.map(|since| Unreachable {
                upstream: "smtp.example.com:587".into(),
                since,
                reason: "connection refused".into(),
            }),
            answered_at,
        };
        let down = |since: SystemTime| vec![report("office", Some(since), None)];
        assert!(t.unreachable(at(100), &down(at(0))).is_empty(), "a blip");
        let opened = t.unreachable(at(400), &down(at(0)));
        assert_eq!(
            states(&opened),
            [("upstream_unreachable:office".to_string(), State::Open)]
        );
        assert_eq!(opened[0].account.as_deref(), Some("office"));
        assert!(t.unreachable(at(500), &down(at(0))).is_empty());
        // No report, and nothing seen answering since (a restart removed the report): still open.
        assert!(
            t.unreachable(at(550), &[report("office", None, Some(at(10)))])
                .is_empty()
        );
        let closed = t.unreachable(at(600), &[report("office", None, Some(at(590)))]);
        assert_eq!(
            states(&closed),
            [("upstream_unreachable:office".to_string(), State::Recovered)]
        );
        // An account no longer configured opens nothing.
        assert!(
            t.unreachable(at(700), &[report("gone", Some(at(0)), None)])
                .is_empty()
        );
    }

    #[test]
    fn a_full_disk_is_one_incident_until_it_has_room_again() {
        use crate::queue::room::{DiskReport, Free};
        let mut t = tracker();
        let report = |bytes: u64| {
            DiskReport::new(
                Free {
                    bytes,
                    files: Some(1000),
                    read_only: false,
                },
                1 << 20,
            )
        };
        assert!(t.disk(at(0), Some(&report(5 << 20))).is_empty());
        let opened = t.disk(at(10), Some(&report(1000)));
        assert_eq!(
            states(&opened),
            [("disk_full:queue".to_string(), State::Open)]
        );
        assert!(opened[0].text.contains("452 4.3.1"), "{}", opened[0].text);
        assert_eq!(opened[0].account, None);
        assert!(t.disk(at(20), Some(&report(10))).is_empty());
        assert!(t.disk(at(25), None).is_empty(), "unreadable: no change");
        let closed = t.disk(at(30), Some(&report(9 << 20)));
        assert_eq!(
            states(&closed),
            [("disk_full:queue".to_string(), State::Recovered)]
        );
    }

    #[test]
    fn a_burst_of_dead_mail_is_one_incident_with_a_count() {
        let mut t = tracker();
        let mut notices = Vec::new();
        for i in 0..5 {
            let dead = Event::Dead {
                id: QueueId::new(),
                account: Some("office"),
                why: "550 5.1.1 no such user",
                refused: &[],
            };
            notices.extend(t.event(&dead, at(i * 60)));
        }
        assert_eq!(states(&notices), [("dead:office".to_string(), State::Open)]);
        assert!(notices[0].text.contains("550 5.1.1"), "{}", notices[0].text);
        assert!(
            t.tick(at(3000), None, 0, &[]).is_empty(),
            "still inside the window"
        );
        let closed = t.tick(at(240 + 3600), None, 0, &[]);
        assert_eq!(
            states(&closed),
            [("dead:office".to_string(), State::Recovered)]
        );
        assert_eq!(closed[0].count, 5);
        assert!(
            closed[0].text.contains("5 message(s)"),
            "{}",
            closed[0].text
        );
        // Mail that never reached an account is the queue's incident.
        let n = t.event(
            &Event::Dead {
                id: QueueId::new(),
                account: None,
                why: "expired",
                refused: &[],
            },
            at(9000),
        );
        assert_eq!(n[0].incident, "dead:queue");
        assert_eq!(n[0].account, None);
    }

    #[test]
    fn refresh_failures_open_after_the_limit_in_a_row_and_close_on_a_refresh() {
        let mut t = tracker();
        let fail = Event::TokenRefreshFailed {
            account: "office",
            why: "HTTP 500",
        };
        assert!(t.event(&fail, at(0)).is_empty());
        assert!(t.event(&fail, at(1)).is_empty());
        // A success in between starts the count again.
        assert!(
            t.event(&Event::TokenRefreshed { account: "office" }, at(2))
                .is_empty()
        );
        assert!(t.event(&fail, at(3)).is_empty());
        assert!(t.event(&fail, at(4)).is_empty());
        let opened = t.event(&fail, at(5));
        assert_eq!(
            states(&opened),
            [("token_refresh_failed:office".to_string(), State::Open)]
        );
        assert!(t.event(&fail, at(6)).is_empty(), "one notice per incident");
        let closed = t.event(&Event::TokenRefreshed { account: "office" }, at(7));
        assert_eq!(
            states(&closed),
            [("token_refresh_failed:office".to_string(), State::Recovered)]
        );
        assert_eq!(closed[0].count, 2);
    }

    #[test]
    fn authorization_needed_closes_on_a_delivery() {
        let mut t = tracker();
        let need = Event::AuthorizationNeeded {
            account: "office",
            why: "invalid_grant",
        };
        let opened = t.event(&need, at(0));
        assert!(opened[0].text.contains("relay authorize office"));
        assert!(t.event(&need, at(60)).is_empty());
        let delivered = Event::Delivered {
            id: QueueId::new(),
            account: "office",
        };
        assert_eq!(t.event(&delivered, at(120))[0].state, State::Recovered);
        assert!(t.event(&delivered, at(180)).is_empty());
    }

    #[test]
    fn a_refused_login_is_said_once_and_closes_on_a_delivery_not_on_a_new_token() {
        let mut t = tracker();
        let refused = Event::LoginRefused {
            account: "office",
            why: "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Mailbox",
        };
        let opened = t.event(&refused, at(0));
        assert_eq!(
            states(&opened),
            [("login_refused:office".into(), State::Open)]
        );
        assert!(opened[0].text.contains("5.7.139"), "{}", opened[0].text);
        assert!(
            t.event(&refused, at(300)).is_empty(),
            "counted, not said again"
        );
        assert!(
            t.event(&Event::TokenRefreshed { account: "office" }, at(400))
                .is_empty(),
            "a new token is not a login the upstream took"
        );
        let delivered = Event::Delivered {
            id: QueueId::new(),
            account: "office",
        };
        let closed = t.event(&delivered, at(500));
        assert_eq!(
            states(&closed),
            [("login_refused:office".into(), State::Recovered)]
        );
        assert_eq!(closed[0].count, 2);
        assert!(
            t.event(&refused, at(600))[0].state == State::Open,
            "a new incident"
        );
    }

    #[test]
    fn mail_that_goes_to_some_of_its_recipients_closes_a_refused_login() {
        let mut t = tracker();
        let refused = Event::LoginRefused {
            account: "office",
            why: "535 5.7.139",
        };
        t.event(&refused, at(0));
        let partly = Event::PartlyDelivered {
            id: QueueId::new(),
            account: "office",
        };
        let closed = t.event(&partly, at(60));
        assert_eq!(
            states(&closed),
            [("login_refused:office".into(), State::Recovered)]
        );
    }

    #[test]
    fn queue_age_opens_and_recovers_once() {
        let mut t = tracker();
        let hour = Duration::from_secs(3600);
        assert!(t.tick(at(0), Some(hour / 2), 3, &[]).is_empty());
        let opened = t.tick(at(10), Some(hour * 2), 3, &[]);
        assert_eq!(
            states(&opened),
            [("queue_age:queue".to_string(), State::Open)]
        );
        assert!(t.tick(at(20), Some(hour * 3), 3, &[]).is_empty());
        let closed = t.tick(at(30), None, 0, &[]);
        assert_eq!(
            states(&closed),
            [("queue_age:queue".to_string(), State::Recovered)]
        );
        assert!(closed[0].text.contains("empty"));
    }

    #[test]
    fn expiry_announces_each_threshold_once_and_a_renewal() {
        let mut t = tracker();
        let day = 86_400;
        let soon = |days: u64| {
            vec![(
                "office".to_string(),
                Expiry {
                    what: "client secret",
                    at: at(days * day + 3600),
                    rotation: Default::default(),
                },
            )]
        };
        let e = soon(20);
        assert_eq!(t.tick(at(0), None, 0, &e).len(), 1);
        assert!(t.tick(at(60), None, 0, &e).is_empty());
        // Six days left: the 7-day threshold is a new notice.
        let n = t.tick(at(14 * day), None, 0, &e);
        assert_eq!(
            states(&n),
            [(
                "credential_expiring:office/client secret".to_string(),
                State::Open
            )]
        );
        assert_eq!(n[0].account.as_deref(), Some("office"));
        // The secret was renewed (a reload with a new date): recovered.
        let renewed = soon(400);
        let n = t.tick(at(14 * day + 60), None, 0, &renewed);
        assert_eq!(n[0].state, State::Recovered);
        assert!(t.open().is_empty());
    }

    #[test]
    fn accounts_a_reload_removes_lose_their_incidents_silently_and_their_late_events_open_none() {
        let mut t = tracker();
        let expiring = |account: &str| {
            (
                account.to_string(),
                Expiry {
                    what: "client secret",
                    at: at(86_400 * 5),
                    rotation: Default::default(),
                },
            )
        };
        let both = [expiring("office"), expiring("old")];
        assert!(
            t.follow(["office", "old"].map(String::from).into(), &both, at(0))
                .is_empty()
        );
        let need = |account| Event::AuthorizationNeeded {
            account,
            why: "invalid_grant",
        };
        let fail = |account| Event::TokenRefreshFailed {
            account,
            why: "HTTP 500",
        };
        assert_eq!(t.event(&need("old"), at(0)).len(), 1);
        assert!(t.event(&fail("office"), at(0)).is_empty());
        assert_eq!(t.tick(at(1), None, 0, &both).len(), 2);
        assert_eq!(t.open().len(), 3);
        t.take_changed();

        // `old` is removed: its incidents are closed, each with a notice saying why, and saved so.
        let one = [expiring("office")];
        let closed = t.follow(["office"].map(String::from).into(), &one, at(2));
        let mut which: Vec<&str> = closed.iter().map(|n| n.incident.as_str()).collect();
        which.sort();
        assert_eq!(
            which,
            [
                "authorization_needed:old",
                "credential_expiring:old/client secret"
            ]
        );
        assert!(closed.iter().all(|n| n.state == State::Recovered
            && n.account.as_deref() == Some("old")
            && n.text.contains("no longer configured")));
        assert!(t.take_changed());
        let open: Vec<String> = t.open().iter().map(|i| i.subject.clone()).collect();
        assert_eq!(open, ["office/client secret"]);
        assert!(t.tick(at(2), None, 0, &one).is_empty());
        // A refresh of `old` that began before the reload fails after it: nothing opens.
        assert!(t.event(&need("old"), at(3)).is_empty());
        for _ in 0..5 {
            assert!(t.event(&fail("old"), at(3)).is_empty());
        }
        assert!(!t.failures.contains_key("old"));
        assert_eq!(t.open().len(), 1);
        // The refresh failures counted for `office` before the reload still count.
        assert!(t.event(&fail("office"), at(4)).is_empty());
        assert_eq!(t.event(&fail("office"), at(5)).len(), 1);

        // A new account is followed as the others are.
        t.follow(["office", "new"].map(String::from).into(), &one, at(6));
        assert_eq!(t.event(&need("new"), at(6)).len(), 1);
    }

    #[test]
    fn open_incidents_survive_a_restart() {
        let mut t = tracker();
        t.event(
            &Event::AuthorizationNeeded {
                account: "a",
                why: "x",
            },
            at(0),
        );
        assert!(t.take_changed());
        let saved = serde_json::to_string(&t.open()).unwrap();
        let mut again = Tracker::new(t.limits, serde_json::from_str(&saved).unwrap());
        assert!(
            again
                .event(
                    &Event::AuthorizationNeeded {
                        account: "a",
                        why: "x"
                    },
                    at(5)
                )
                .is_empty()
        );
    }
}
