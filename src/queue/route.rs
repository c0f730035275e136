//! Which account a message goes through: the first `[[route]]` that matches, else the AUTH user's `account`,
//! else `default_account`. A route may name several accounts; delivery picks one of them for each attempt.
//!
//! Every set of accounts a message can be routed to is a *pool* (one per account, one per distinct multi-account
//! route), numbered once at start: mail that waits for its accounts waits per pool, in order.

use std::collections::HashMap;
use std::fmt;

use super::Envelope;
use crate::config::{Config, RouteConfig};

/// What routing looks at in a message.
#[derive(Debug, Clone, Copy)]
pub struct Addressing<'a> {
    pub sender: &'a str,
    pub recipients: &'a [String],
    /// The listener's address; `None` when unknown (`relay check --route` without `--listener`), so that a
    /// route testing the listener does not match.
    pub listener: Option<&'a str>,
    pub user: Option<&'a str>,
    /// The account a report must go through (`Envelope::via`), when it is still configured.
    pub via: Option<&'a str>,
}

impl<'a> From<&'a Envelope> for Addressing<'a> {
    fn from(e: &'a Envelope) -> Self {
        Addressing {
            sender: &e.sender,
            recipients: &e.recipients,
            listener: Some(&e.listener),
            user: e.user.as_deref(),
            via: e.via.as_deref(),
        }
    }
}

/// Why a message goes where it goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// `route[i]` matched.
    Route(usize),
    /// No route matched; the AUTH user names an account.
    User(String),
    /// Neither: `default_account`.
    Default,
    /// A delivery status notification, through the account its failed message went through.
    Report,
}

/// Where a message goes.
#[derive(Debug, Clone, Copy)]
pub struct Decision<'a> {
    pub pool: usize,
    /// The pool's accounts, in the order the config names them.
    pub accounts: &'a [String],
    pub reason: &'a Reason,
}

pub struct Routing {
    /// The configured accounts, by name: pool i is account i.
    accounts: HashMap<String, usize>,
    routes: Vec<(RouteConfig, usize, Reason)>,
    users: HashMap<String, (usize, Reason)>,
    default: Option<(usize, Reason)>,
    pools: Vec<Vec<String>>,
}

impl Routing {
    pub fn new(config: &Config) -> Routing {
        // Pool i is account i, so that every account has one; then one per distinct multi-account route.
        let mut pools: Vec<Vec<String>> = config
            .accounts
            .iter()
            .map(|a| vec![a.name.clone()])
            .collect();
        let mut pool_of = |names: Vec<String>| {
            let mut key = names.clone();
            key.sort();
            match pools.iter().position(|p| {
                let mut k = p.clone();
                k.sort();
                k == key
            }) {
                Some(i) => i,
                None => {
                    pools.push(names);
                    pools.len() - 1
                }
            }
        };
        let routes = config
            .routes
            .iter()
            .enumerate()
            .map(|(i, r)| (r.clone(), pool_of(r.targets()), Reason::Route(i)))
            .collect();
        let users = config
            .users
            .iter()
            .filter_map(|u| {
                let account = u.account.clone()?;
                Some((
                    u.name.clone(),
                    (pool_of(vec![account]), Reason::User(u.name.clone())),
                ))
            })
            .collect();
        let default = config
            .default_account
            .clone()
            .map(|a| (pool_of(vec![a]), Reason::Default));
        Routing {
            accounts: config
                .accounts
                .iter()
                .enumerate()
                .map(|(i, a)| (a.name.clone(), i))
                .collect(),
            routes,
            users,
            default,
            pools,
        }
    }

    /// Where a message goes, or `None` when nothing names an account for it.
    pub fn route(&self, m: Addressing<'_>) -> Option<Decision<'_>> {
        const REPORT: &Reason = &Reason::Report;
        let (pool, reason) = match self.routes.iter().find(|(r, ..)| matches(r, m)) {
            Some((_, pool, reason)) => (*pool, reason),
            None => match m
                .user
                .and_then(|u| self.users.get(u))
                .or(self.default.as_ref())
            {
                Some((pool, reason)) => (*pool, reason),
                // A report nothing else routes goes through its failed message's account.
                None => (*m.via.and_then(|v| self.accounts.get(v))?, REPORT),
            },
        };
        Some(Decision {
            pool,
            accounts: self.pools.get(pool).map_or(&[], Vec::as_slice),
            reason,
        })
    }

    /// Every pool's accounts, by pool number.
    pub fn pools(&self) -> &[Vec<String>] {
        &self.pools
    }

    /// Routes that would match but for a listener that is not known (`relay check --route` without
    /// `--listener` says so).
    fn undecided<'r>(&'r self, m: Addressing<'r>) -> impl Iterator<Item = usize> + 'r {
        self.routes
            .iter()
            .enumerate()
            .filter(move |(_, (r, ..))| {
                let any_listener = RouteConfig {
                    listener: None,
                    ..r.clone()
                };
                m.listener.is_none() && r.listener.is_some() && matches(&any_listener, m)
            })
            .map(|(i, _)| i)
    }

    /// The route's conditions as the config writes them, for explanations.
    pub fn conditions(&self, route: usize) -> String {
        let Some((r, ..)) = self.routes.get(route) else {
            return String::new();
        };
        let parts: Vec<String> = [
            ("sender", &r.sender),
            ("recipient", &r.recipient),
            ("listener", &r.listener),
            ("user", &r.user),
        ]
        .into_iter()
        .filter_map(|(key, value)| Some(format!("{key} = {:?}", value.as_deref()?)))
        .collect();
        if parts.is_empty() {
            "no conditions: it takes every message".into()
        } else {
            parts.join(", ")
        }
    }
}

/// `relay check --route`: an unknown user or listener is a mistake in the question, not an answer.
#[derive(Debug, thiserror::Error)]
pub enum RouteCheckError {
    #[error("no [[user]] is named `{0}`")]
    UnknownUser(String),
    #[error("no [[listener]] has the address `{given}` (configured: {known})")]
    UnknownListener { given: String, known: String },
}

/// Where a message would go and why, as `relay check --route` prints it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explanation {
    /// The accounts, one unless a route names several; empty when nothing names one.
    pub accounts: Vec<String>,
    pub why: String,
    /// Things the answer could not take into account.
    pub notes: Vec<String>,
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.accounts.as_slice() {
            [] => writeln!(f, "no account: {}", self.why)?,
            [one] => writeln!(f, "account {one}: {}", self.why)?,
            many => writeln!(
                f,
                "accounts {}: {}; each message goes through one that has room, the least used first",
                many.join(", "),
                self.why
            )?,
        }
        for n in &self.notes {
            writeln!(f, "note: {n}")?;
        }
        Ok(())
    }
}

/// Where a message from `sender` to `recipients` would go, sent by `user` (an AUTH user) on `listener` (an
/// address as the config writes it; the only listener when there is one and none is given).
pub fn explain(
    config: &Config,
    sender: &str,
    recipients: &[String],
    user: Option<&str>,
    listener: Option<&str>,
) -> Result<Explanation, RouteCheckError> {
    if let Some(u) = user
        && !config.users.iter().any(|c| c.name == u)
    {
        return Err(RouteCheckError::UnknownUser(u.to_string()));
    }
    let listener = match listener {
        Some(given) => {
            let found = given
                .parse::<std::net::SocketAddr>()
                .ok()
                .filter(|a| config.listeners.iter().any(|l| l.address == *a));
            match found {
                Some(a) => Some(a.to_string()),
                None => {
                    let known: Vec<String> = config
                        .listeners
                        .iter()
                        .map(|l| l.address.to_string())
                        .collect();
                    return Err(RouteCheckError::UnknownListener {
                        given: given.to_string(),
                        known: if known.is_empty() {
                            "none".into()
                        } else {
                            known.join(", ")
                        },
                    });
                }
            }
        }
        None => match config.listeners.as_slice() {
            [only] => Some(only.address.to_string()),
            _ => None,
        },
    };
    let routing = Routing::new(config);
    let m = Addressing {
        sender,
        recipients,
        listener: listener.as_deref(),
        user,
        via: None,
    };
    let decision = routing.route(m);
    // Routes after the one that matched did not matter; those before it that test the listener might have.
    let matched = match decision.map(|d| d.reason) {
        Some(Reason::Route(i)) => *i,
        _ => usize::MAX,
    };
    let notes = routing
        .undecided(m)
        .filter(|i| *i < matched)
        .map(|i| {
            format!("route[{i}] would match on some listener and was skipped; give --listener to take it into account")
        })
        .collect();
    let Some(d) = decision else {
        let user_part = match user {
            Some(u) => format!("user {u} names no account"),
            None => "no user".to_string(),
        };
        // As the listener answers it: with accounts configured, such a message is refused at DATA for now.
        let then = if config.accounts.is_empty() {
            "the message would be queued until an account is configured"
        } else {
            "relay refuses the message at DATA with 451 4.3.5 (the device keeps it and tries again)"
        };
        return Ok(Explanation {
            accounts: Vec::new(),
            why: format!("no route matched, {user_part}, and default_account is not set; {then}"),
            notes,
        });
    };
    let why = match d.reason {
        Reason::Route(i) => format!("route[{i}] matched ({})", routing.conditions(*i)),
        Reason::User(u) => format!("user {u}'s account"),
        Reason::Default => "default_account".to_string(),
        Reason::Report => "the account its failed message went through".to_string(),
    };
    Ok(Explanation {
        accounts: d.accounts.to_vec(),
        why,
        notes,
    })
}

/// Every condition a route gives must hold. `recipient` must match every recipient, so that a route meant for
/// some addresses never carries mail for others.
fn matches(r: &RouteConfig, m: Addressing<'_>) -> bool {
    let ok = |pattern: &Option<String>, value: Option<&str>| match pattern.as_deref() {
        None => true,
        Some(p) => value.is_some_and(|v| glob(p, v)),
    };
    ok(&r.sender, Some(m.sender))
        && r.recipient
            .as_deref()
            .is_none_or(|p| m.recipients.iter().all(|to| glob(p, to)))
        && ok(&r.listener, m.listener)
        && ok(&r.user, m.user)
}

/// Shell-style `*` and `?`, case-insensitive (addresses' domains are). Written here because the glob crates
/// match paths (treating `/` specially) and this is ten lines.
fn glob(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (
        pattern.to_lowercase().chars().collect(),
        text.to_lowercase().chars().collect(),
    );
    // Iterative matching with one backtrack point for the last `*`: linear in practice, no recursion.
    let (mut pi, mut ti, mut star, mut mark) = (0, 0, None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob("*@scanner.lan", "copier@Scanner.LAN"));
        assert!(!glob("*@scanner.lan", "copier@scanner.lan.evil"));
        assert!(glob("pbx?@*", "pbx1@example.com"));
        assert!(glob("*", ""));
        assert!(glob("*:25", "0.0.0.0:25"));
        assert!(!glob("a*b", "ac"));
    }

    fn config(top: &str, extra: &str) -> Config {
        let account = |name: &str| {
            format!(
                "[[account]]\nname = \"{name}\"\nprovider = \"microsoft\"\nflow = \"device_code\"\ntenant = \"t\"\nclient_id = \"c\"\nmailbox = \"{name}@example.com\"\n"
            )
        };
        let text = format!(
            "{top}[[listener]]\naddress = \"127.0.0.1:25\"\nauth = \"none\"\n[[listener]]\naddress = \"127.0.0.1:587\"\n{}{}{}{extra}",
            account("a"),
            account("b"),
            account("c"),
        );
        Config::parse(&text, "t.toml").expect("test config")
    }

    #[test]
    fn pools_are_shared_by_routes_naming_the_same_accounts() {
        let c = config(
            "",
            "[[route]]\nsender = \"x@*\"\naccounts = [\"a\", \"b\"]\n[[route]]\nsender = \"y@*\"\naccounts = [\"b\", \"a\"]\n[[route]]\nsender = \"z@*\"\naccounts = [\"c\"]\n",
        );
        let r = Routing::new(&c);
        assert_eq!(r.pools().len(), 4, "{:?}", r.pools());
        let to = ["t@example.com".to_string()];
        let at = |sender| {
            r.route(Addressing {
                sender,
                recipients: &to,
                listener: None,
                user: None,
                via: None,
            })
            .map(|d| d.pool)
        };
        assert_eq!(at("x@h"), Some(3));
        assert_eq!(at("y@h"), Some(3));
        assert_eq!(
            at("z@h"),
            Some(2),
            "a one-account list is that account's pool"
        );
        assert_eq!(at("w@h"), None);
    }

    #[test]
    fn explains_route_user_and_default() {
        let c = config(
            "default_account = \"c\"\n",
            "[[route]]\nrecipient = \"*@contoso.com\"\nlistener = \"127.0.0.1:587\"\naccount = \"a\"\n[[route]]\nsender = \"scan@*\"\naccounts = [\"a\", \"b\"]\n[[user]]\nname = \"printer\"\npassword_hash = \"$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$K1XcYB0T/Vr5xa6Q0rD0bNPqQHxqx2h8CfPqI9z1Ddk\"\naccount = \"b\"\n",
        );
        let to = |s: &str| vec![s.to_string()];
        let e = explain(
            &c,
            "x@h",
            &to("ops@contoso.com"),
            None,
            Some("127.0.0.1:587"),
        )
        .unwrap();
        assert_eq!(
            e.to_string(),
            "account a: route[0] matched (recipient = \"*@contoso.com\", listener = \"127.0.0.1:587\")\n"
        );
        // Two listeners and none given: the listener route is skipped, and the answer says so.
        let e = explain(&c, "x@h", &to("ops@contoso.com"), None, None).unwrap();
        assert_eq!(e.accounts, ["c"]);
        assert!(
            e.to_string()
                .contains("note: route[0] would match on some listener"),
            "{e}"
        );
        let e = explain(&c, "scan@h", &to("t@x"), None, Some("127.0.0.1:25")).unwrap();
        assert_eq!(e.accounts, ["a", "b"]);
        assert!(
            e.to_string()
                .starts_with("accounts a, b: route[1] matched (sender = \"scan@*\")"),
            "{e}"
        );
        let e = explain(&c, "x@h", &to("t@x"), Some("printer"), Some("127.0.0.1:25")).unwrap();
        assert_eq!(e.to_string(), "account b: user printer's account\n");
        let e = explain(&c, "x@h", &to("t@x"), None, Some("127.0.0.1:25")).unwrap();
        assert_eq!(e.to_string(), "account c: default_account\n");
        assert!(matches!(
            explain(&c, "x@h", &to("t@x"), Some("nobody"), None),
            Err(RouteCheckError::UnknownUser(_))
        ));
        let err = explain(&c, "x@h", &to("t@x"), None, Some("127.0.0.1:2525")).unwrap_err();
        assert!(
            err.to_string().contains("127.0.0.1:25, 127.0.0.1:587"),
            "{err}"
        );
    }
}
