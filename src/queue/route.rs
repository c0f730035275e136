//! Which account a message goes through: the first `[[route]]` that matches, else the AUTH user's `account`,
//! else `default_account`.

use std::collections::HashMap;

use super::Envelope;
use crate::config::{Config, RouteConfig};

pub struct Routing {
    routes: Vec<RouteConfig>,
    users: HashMap<String, String>,
    default_account: Option<String>,
}

impl Routing {
    pub fn new(config: &Config) -> Routing {
        Routing {
            routes: config.routes.clone(),
            users: config
                .users
                .iter()
                .filter_map(|u| Some((u.name.clone(), u.account.clone()?)))
                .collect(),
            default_account: config.default_account.clone(),
        }
    }

    pub fn account_for(&self, e: &Envelope) -> Option<&str> {
        if let Some(r) = self.routes.iter().find(|r| matches(r, e)) {
            return Some(&r.account);
        }
        e.user
            .as_ref()
            .and_then(|u| self.users.get(u))
            .or(self.default_account.as_ref())
            .map(String::as_str)
    }
}

/// Every condition a route gives must hold. `recipient` must match every recipient, so that a route meant for
/// some addresses never carries mail for others.
fn matches(r: &RouteConfig, e: &Envelope) -> bool {
    let ok =
        |pattern: &Option<String>, value: &str| pattern.as_deref().is_none_or(|p| glob(p, value));
    ok(&r.sender, &e.sender)
        && r.recipient
            .as_deref()
            .is_none_or(|p| e.recipients.iter().all(|to| glob(p, to)))
        && ok(&r.listener, &e.listener)
        && r.user
            .as_deref()
            .is_none_or(|p| e.user.as_deref().is_some_and(|u| glob(p, u)))
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
}
