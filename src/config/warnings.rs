//! What a config may say but a sysadmin probably did not mean: `relay check` prints these, and `relay serve`
//! logs them at start. None of them stops relay.

use super::{AuthPolicy, Config, Flow, ListenerTls, RewriteFrom, TlsCompat, TlsMode, Transport};

/// One warning: the key it is about, and what to know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    pub key: String,
    pub text: String,
}

impl Config {
    /// Routes that can never be taken: a user or listener the config does not have (a typo sends the device's
    /// mail through another account, silently), or a route after one that takes every message.
    fn route_warnings(&self, warn: &mut impl FnMut(String, String)) {
        let wild = |p: &str| p.contains(['*', '?']);
        let mut catch_all: Option<usize> = None;
        for (i, r) in self.routes.iter().enumerate() {
            let key = format!("route[{i}]");
            if let Some(first) = catch_all {
                warn(
                    key.clone(),
                    format!(
                        "comes after route[{first}], which takes every message: it is never taken"
                    ),
                );
            }
            if let Some(u) = r.user.as_deref().filter(|u| !wild(u))
                && !self.users.iter().any(|x| x.name.eq_ignore_ascii_case(u))
            {
                warn(
                    format!("{key}.user"),
                    format!(
                        "no [[user]] is named {u:?}: the route is never taken, and that login's mail goes by the next route that matches"
                    ),
                );
            }
            if let Some(l) = r.listener.as_deref().filter(|l| !wild(l))
                && !self
                    .listeners
                    .iter()
                    .any(|x| x.address.to_string().eq_ignore_ascii_case(l))
            {
                let known: Vec<String> = self
                    .listeners
                    .iter()
                    .map(|x| x.address.to_string())
                    .collect();
                warn(
                    format!("{key}.listener"),
                    format!(
                        "no [[listener]] has the address {l:?} (they are {}): the route is never taken",
                        known.join(", ")
                    ),
                );
            }
            // (`sender = ""` takes only bounces.)
            let every = |p: &Option<String>| {
                p.as_deref()
                    .is_none_or(|p| !p.is_empty() && p.chars().all(|c| c == '*'))
            };
            if catch_all.is_none()
                && every(&r.sender)
                && every(&r.recipient)
                // (`user = "*"` takes only mail from a login.)
                && r.user.is_none()
                && every(&r.listener)
            {
                catch_all = Some(i);
            }
        }
    }

    pub fn warnings(&self) -> Vec<Warning> {
        let mut out = Vec::new();
        let mut warn = |key: String, text: String| out.push(Warning { key, text });
        for key in &self.credentials_at_start {
            let text = if key == "token_encryption" {
                "\"systemd-creds\": the key reaches only the service, through $CREDENTIALS_DIRECTORY (LoadCredentialEncrypted=): it is not checked here, nor are the token files it opens; the service reads them when it starts"
            } else {
                "names $CREDENTIALS_DIRECTORY, which systemd sets only inside the service (LoadCredential=): the file is not checked here, and is read when the service starts"
            };
            warn(key.clone(), text.into());
        }
        if self.listeners.is_empty() {
            warn(
                "listener".into(),
                "no [[listener]] is configured: relay accepts no mail and only delivers what is already queued (an empty config file replaces the embedded default too)".into(),
            );
        }
        for a in self.accounts.iter().filter(|a| a.flow == Flow::Password) {
            warn(
                format!("account {}", a.name),
                "flow = \"password\" stops working as soon as the mailbox needs MFA or a Conditional Access policy applies, and Microsoft is retiring it; prefer device_code, authorization_code or client_credentials".into(),
            );
        }
        // Graph takes no envelope sender: the message goes with its own From:, which Exchange refuses
        // (ErrorSendAsDenied) unless it is the mailbox or one it may send as.
        for a in self
            .accounts
            .iter()
            .filter(|a| a.transport == Transport::Graph && a.rewrite_from == RewriteFrom::Envelope)
        {
            warn(
                format!("account {}.rewrite_from", a.name),
                "transport = \"graph\" has no envelope sender, so rewrite_from = \"envelope\" (the default) changes nothing: mail goes with the device's own From:, which Exchange refuses (ErrorSendAsDenied) unless the mailbox may send as it; set rewrite_from = \"header\" to send as the mailbox (the device's address kept in Reply-To), or \"none\" if the devices already use the mailbox's address".into(),
            );
        }
        // A TLS mode the port does not speak: neither side says why (relay waits for a greeting an SMTPS server
        // never sends; a plain server's greeting is no TLS hello), and every attempt fails.
        for a in self
            .accounts
            .iter()
            .filter(|a| a.transport == Transport::Smtp)
        {
            let tls = a.smtp_tls.unwrap_or(TlsMode::Starttls);
            match (a.smtp_port, tls) {
                (Some(465), TlsMode::Starttls | TlsMode::None) => warn(
                    format!("account {}.smtp_tls", a.name),
                    "smtp_port = 465 is implicit TLS (SMTPS): the server expects TLS first and says nothing until then; set smtp_tls = \"implicit\"".into(),
                ),
                (Some(port @ (25 | 587)), TlsMode::Implicit) => warn(
                    format!("account {}.smtp_tls", a.name),
                    format!("smtp_port = {port} speaks plain SMTP first, then STARTTLS: set smtp_tls = \"starttls\" (or smtp_port = 465 for implicit TLS)"),
                ),
                _ => {}
            }
        }
        self.route_warnings(&mut warn);
        // The provider counts a mailbox's sending, whichever account of relay's sent it.
        for (i, a) in self.accounts.iter().enumerate() {
            if let Some(b) = self.accounts[..i]
                .iter()
                .find(|b| b.mailbox.eq_ignore_ascii_case(&a.mailbox))
            {
                warn(
                    format!("account {}.mailbox", a.name),
                    format!(
                        "account {} sends as the same mailbox ({}): relay counts each account's sending limits apart, while the provider counts the mailbox's together, so together they may send twice what its limits allow; use one account, or halve the limits (rate = {{ ... }})",
                        b.name, a.mailbox
                    ),
                );
            }
        }
        for (i, l) in self.listeners.iter().enumerate() {
            let key = format!("listener[{i}] ({})", l.address);
            if l.tls_compat == TlsCompat::Legacy {
                warn(key.clone(), "tls_compat = \"legacy\" also accepts TLS 1.0/1.1, RSA key exchange and CBC suites, which are weaker; keep it on a port that only the old devices use, with an allow list".into());
            }
            if l.auth == AuthPolicy::Required && l.tls == ListenerTls::None && !l.plaintext_auth {
                warn(
                    key.clone(),
                    "auth = \"required\" without TLS and with plaintext_auth = false: no client can log in, so this listener takes no mail; set plaintext_auth = true (a trusted LAN) or tls = \"starttls\"".into(),
                );
            } else if l.auth == AuthPolicy::Required && self.users.is_empty() {
                warn(
                    key.clone(),
                    "auth = \"required\" but no [[user]] is configured: no client can log in, so this listener takes no mail; add a [[user]] (`relay hash-password`), or set auth = \"none\" with an allow list of your devices".into(),
                );
            }
            if l.allow.is_empty() {
                warn(
                    key.clone(),
                    "allow = [] admits no client: every connection is refused; list your devices' addresses (or remove `allow` for the default)".into(),
                );
            }
            match (&l.cert, l.tls) {
                (Some(_), ListenerTls::None) => warn(
                    format!("{key}.tls"),
                    "cert and key are set but tls is not, so they are not used and this listener offers no TLS (tls defaults to \"none\"); set tls = \"starttls\", \"implicit\" or \"auto\"".into(),
                ),
                (Some(cert), _) => {
                    let now = std::time::SystemTime::now();
                    if let Some(text) = listener_cert_warning(cert, now) {
                        warn(format!("{key}.cert"), text);
                    }
                    if let Some(text) = crate::certs::chain_warning(cert, now) {
                        warn(format!("{key}.cert"), text);
                    }
                }
                (None, _) => {}
            }
            // RFC 5321 section 4.5.3.2.7 asks for 5 minutes; a device that pauses (a scanner between pages, a
            // PBX rendering a voicemail) is cut off by much less.
            for (name, t) in [
                ("command_timeout", l.command_timeout),
                ("data_timeout", l.data_timeout),
            ] {
                if t < std::time::Duration::from_secs(30) {
                    warn(
                        format!("{key}.{name}"),
                        format!(
                            "{} is short: RFC 5321 asks a server to wait minutes, and slow devices pause that long mid-message; the default is {}",
                            humantime::format_duration(t),
                            if name == "command_timeout" {
                                "5m"
                            } else {
                                "10m"
                            }
                        ),
                    );
                }
            }
            // Bound to loopback, it hears no one else, whatever its allow list says.
            if l.address.ip().is_loopback() {
                continue;
            }
            let public: Vec<String> = l
                .allow
                .iter()
                .filter(|n| !super::raw::is_private(n))
                .map(ToString::to_string)
                .collect();
            if public.is_empty() {
                continue;
            }
            let from = public.join(", ");
            match l.auth {
                AuthPolicy::None | AuthPolicy::Optional => warn(
                    key,
                    format!(
                        "takes mail without a login from public addresses ({from}): anyone who reaches this port can send through your accounts; allow only your devices' addresses, or set auth = \"required\""
                    ),
                ),
                AuthPolicy::Required if l.tls == ListenerTls::None && l.plaintext_auth => warn(
                    key,
                    format!(
                        "takes passwords without TLS from public addresses ({from}): they cross the network readable; use tls = \"starttls\" or \"implicit\""
                    ),
                ),
                // Offered before STARTTLS, a password goes readable whenever a client does not ask for TLS.
                AuthPolicy::Required
                    if l.plaintext_auth
                        && matches!(l.tls, ListenerTls::Starttls | ListenerTls::Auto) =>
                {
                    warn(
                        format!("{key}.plaintext_auth"),
                        format!(
                            "takes passwords before STARTTLS from public addresses ({from}): a client that does not start TLS sends its password readable; set plaintext_auth = false (the default), or allow only your devices' addresses"
                        ),
                    )
                }
                AuthPolicy::Required => {}
            }
        }
        if let Some(m) = self
            .metrics
            .as_ref()
            .filter(|m| !m.address.ip().is_loopback())
        {
            warn(
                "metrics.address".into(),
                format!(
                    "{} is not loopback: whoever reaches it sees account names, queue sizes and token expiry; restrict it with a firewall",
                    m.address
                ),
            );
        }
        out
    }
}

/// A listener's certificate that clients checking it refuse (expired, not yet valid) or soon will. Read at each
/// `relay check`, start and reload; the daemon also looks hourly (`accounts::watch_expiries`).
pub fn listener_cert_warning(cert: &std::path::Path, now: std::time::SystemTime) -> Option<String> {
    use crate::certs::{Trouble, day};
    // A certificate that cannot be read is refused at load, in the TLS load's words.
    let v = crate::certs::validity(cert).ok()?;
    let fix = "renew it, then `systemctl reload relay`";
    Some(match v.trouble(now)? {
        Trouble::NotYetValid(at) => format!(
            "the certificate in {} is not valid until {}: clients that check it refuse it until then",
            cert.display(),
            day(at)
        ),
        Trouble::Expired(at) => format!(
            "the certificate in {} expired on {}: clients that check it refuse to send; {fix}",
            cert.display(),
            day(at)
        ),
        Trouble::Expiring(days, at) => format!(
            "the certificate in {} expires in {days} day(s), on {}: {fix}",
            cert.display(),
            day(at)
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(toml: &str) -> Vec<(String, String)> {
        Config::parse(toml, "x.toml")
            .unwrap()
            .warnings()
            .into_iter()
            .map(|w| (w.key, w.text))
            .collect()
    }

    #[test]
    fn two_accounts_of_one_mailbox_are_warned_about() {
        let account = |name: &str, mailbox: &str| {
            format!(
                "[[account]]\nname = \"{name}\"\nprovider = \"microsoft\"\nflow = \"device_code\"\ntenant = \"t\"\nclient_id = \"c\"\nmailbox = \"{mailbox}\"\n"
            )
        };
        let w = keys(&format!(
            "{}{}{}",
            account("a", "office@contoso.com"),
            account("b", "Office@Contoso.com"),
            account("c", "other@contoso.com")
        ));
        let same: Vec<_> = w.iter().filter(|w| w.1.contains("same mailbox")).collect();
        assert_eq!(same.len(), 1, "{w:?}");
        assert_eq!(same[0].0, "account b.mailbox");
    }

    #[test]
    fn open_listeners_and_an_empty_config_are_warned_about() {
        let w = keys("");
        assert!(
            w[0].0 == "listener" && w[0].1.contains("no [[listener]]"),
            "{w:?}"
        );
        let w = keys(
            "[[listener]]\naddress = \"0.0.0.0:25\"\nauth = \"optional\"\nallow = [\"0.0.0.0/0\"]\n",
        );
        assert!(
            w[0].1
                .contains("without a login from public addresses (0.0.0.0/0)"),
            "{w:?}"
        );
        let w = keys("[[listener]]\naddress = \"0.0.0.0:587\"\nauth = \"required\"\n");
        assert!(
            w.iter().any(|w| w.1.contains("passwords without TLS")),
            "{w:?}"
        );
        let w = keys(
            "[[listener]]\naddress = \"0.0.0.0:25\"\nauth = \"none\"\nallow = [\"192.168.1.0/24\", \"127.0.0.1\"]\n",
        );
        assert!(w.is_empty(), "{w:?}");
        // Bound to loopback: no one public can reach it, whatever the allow list says.
        let w = keys(
            "[[listener]]\naddress = \"127.0.0.1:25\"\nauth = \"none\"\nallow = [\"0.0.0.0/0\"]\n",
        );
        assert!(w.is_empty(), "{w:?}");
    }

    #[test]
    fn a_graph_account_rewriting_only_the_envelope_is_warned_about() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "s").unwrap();
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
        let config = |rewrite: &str| {
            format!(
                "state_dir = {:?}\n[[listener]]\naddress = \"127.0.0.1:25\"\nauth = \"none\"\n[[account]]\nname = \"o\"\nprovider = \"microsoft\"\nflow = \"client_credentials\"\ntransport = \"graph\"\nmailbox = \"box@example.com\"\ntenant = \"t.onmicrosoft.com\"\nclient_id = \"c\"\nclient_secret_file = {secret:?}\n{rewrite}",
                dir.path()
            )
        };
        let w = keys(&config(""));
        assert!(
            w.iter()
                .any(|(k, t)| k == "account o.rewrite_from" && t.contains("ErrorSendAsDenied")),
            "{w:?}"
        );
        for quiet in ["rewrite_from = \"header\"\n", "rewrite_from = \"none\"\n"] {
            let w = keys(&config(quiet));
            assert!(!w.iter().any(|(k, _)| k.contains("rewrite_from")), "{w:?}");
        }
    }

    #[test]
    fn a_listener_certificate_is_warned_about_in_its_last_thirty_days() {
        let dir = tempfile::tempdir().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params.not_before = rcgen::date_time_ymd(2027, 1, 1);
        params.not_after = rcgen::date_time_ymd(2027, 6, 1);
        let key = rcgen::KeyPair::generate().unwrap();
        let path = dir.path().join("cert.pem");
        std::fs::write(&path, params.self_signed(&key).unwrap().pem()).unwrap();
        let at = |d: &str| crate::oauth::expiry::parse_date(d).unwrap();
        assert_eq!(listener_cert_warning(&path, at("2027-05-01")), None);
        let w = listener_cert_warning(&path, at("2027-05-25")).unwrap();
        assert!(w.contains("expires in 7 day(s), on 2027-06-01"), "{w}");
        let w = listener_cert_warning(&path, at("2027-06-02")).unwrap();
        assert!(w.contains("expired on 2027-06-01"), "{w}");
        let w = listener_cert_warning(&path, at("2026-12-01")).unwrap();
        assert!(w.contains("not valid until 2027-01-01"), "{w}");
    }

    #[test]
    fn a_listener_that_admits_no_one_or_waits_too_little_is_warned_about() {
        let w = keys("[[listener]]\naddress = \"127.0.0.1:2525\"\nauth = \"none\"\nallow = []\n");
        assert!(w.len() == 1 && w[0].1.contains("admits no client"), "{w:?}");
        let w = keys(
            "[[listener]]\naddress = \"127.0.0.1:2525\"\nauth = \"none\"\ncommand_timeout = \"1s\"\n",
        );
        assert!(
            w.len() == 1
                && w[0].0.ends_with(".command_timeout")
                && w[0].1.starts_with("1s is short"),
            "{w:?}"
        );
    }

    #[test]
    fn a_listener_no_client_can_log_in_to_is_warned_about() {
        const USER: &str = "[[user]]\nname = \"p\"\npassword_hash = \"$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$ZmFrZWhhc2hmYWtlaGFzaGZha2VoYXNoZmFrZWg\"\n";
        let listener = "[[listener]]\naddress = \"127.0.0.1:2525\"\nauth = \"required\"\n";
        let w = keys(listener);
        assert!(
            w.len() == 1 && w[0].1.contains("no [[user]] is configured"),
            "{w:?}"
        );
        assert!(keys(&format!("{listener}{USER}")).is_empty());
        let w = keys(&format!("{listener}plaintext_auth = false\n{USER}"));
        assert!(
            w.len() == 1 && w[0].1.contains("no client can log in"),
            "{w:?}"
        );
    }

    /// Passwords before STARTTLS from public addresses are warned about as passwords without TLS are.
    #[test]
    fn passwords_before_starttls_from_public_addresses_are_warned_about() {
        const USER: &str = "[[user]]\nname = \"p\"\npassword_hash = \"$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$ZmFrZWhhc2hmYWtlaGFzaGZha2VoYXNoZmFrZWg\"\n";
        let listener = |tls: &str, allow: &str| {
            format!(
                "[[listener]]\naddress = \"0.0.0.0:587\"\nauth = \"required\"\ntls = \"{tls}\"\ncert = \"/c\"\nkey = \"/k\"\nplaintext_auth = true\nallow = [\"{allow}\"]\n{USER}"
            )
        };
        for tls in ["starttls", "auto"] {
            let w = keys(&listener(tls, "0.0.0.0/0"));
            assert!(
                w.iter().any(|(k, t)| k.ends_with(".plaintext_auth")
                    && t.contains(
                        "takes passwords before STARTTLS from public addresses (0.0.0.0/0)"
                    )),
                "{tls}: {w:?}"
            );
        }
        let quiet = |tls, allow| {
            !keys(&listener(tls, allow))
                .iter()
                .any(|(_, t)| t.contains("before STARTTLS"))
        };
        assert!(quiet("starttls", "192.168.0.0/16"));
        assert!(quiet("implicit", "0.0.0.0/0"));
    }
}
