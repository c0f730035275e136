//! Where each provider's endpoints are, and what an account's overrides make of them.

use crate::config::{AccountConfig, ClientAuth, Flow, Provider, TlsMode, Transport};

/// An account's resolved endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoints {
    pub token_url: String,
    pub device_authorization_url: Option<String>,
    pub authorization_url: Option<String>,
    pub scope: String,
    pub smtp_host: String,
    pub smtp_port: u16,
    pub smtp_tls: TlsMode,
    /// Microsoft Graph's root (`https://graph.microsoft.com`), for `transport = "graph"` and the fallback.
    pub graph_url: String,
    /// The scope of a Graph token when Graph is the fallback (the account's `scope` is the main transport's).
    pub graph_scope: String,
    /// The Gmail API's root (`https://gmail.googleapis.com`).
    pub gmail_api_url: String,
}

/// Microsoft's delegated scope for SMTP AUTH; `offline_access` brings the refresh token.
pub const MICROSOFT_DELEGATED_SCOPE: &str = "https://outlook.office.com/SMTP.Send offline_access";
/// Microsoft's app-only scope (client credentials, with the SMTP.SendAsApp permission).
pub const MICROSOFT_APP_SCOPE: &str = "https://outlook.office365.com/.default";
pub const GOOGLE_SCOPE: &str = "https://mail.google.com/";
/// Microsoft Graph, delegated: sending as the signed-in mailbox.
pub const GRAPH_DELEGATED_SCOPE: &str = "https://graph.microsoft.com/Mail.Send offline_access";
/// Microsoft Graph, app-only (the Mail.Send application permission).
pub const GRAPH_APP_SCOPE: &str = "https://graph.microsoft.com/.default";

/// Resolves an account's endpoints; `Err((key, reason))` names the offending key.
pub fn endpoints(a: &AccountConfig) -> Result<Endpoints, (&'static str, String)> {
    let authorization_url =
        a.authorization_url
            .clone()
            .or(match (a.provider, a.tenant.as_deref()) {
                (Provider::Microsoft, Some(tenant)) => Some(format!(
                    "https://login.microsoftonline.com/{tenant}/oauth2/v2.0/authorize"
                )),
                (Provider::Google, _) => {
                    Some("https://accounts.google.com/o/oauth2/v2/auth".to_string())
                }
                _ => None,
            });
    let (token_url, device_url, scope, host) = match a.provider {
        Provider::Microsoft => {
            let tenant = a.tenant.as_deref().ok_or((
                "tenant",
                "required for provider = \"microsoft\" (your directory's domain, e.g. contoso.onmicrosoft.com, or its id)"
                    .to_string(),
            ))?;
            let base = format!("https://login.microsoftonline.com/{tenant}/oauth2/v2.0");
            let scope = match (a.flow == Flow::ClientCredentials, a.transport) {
                (true, Transport::Graph) => GRAPH_APP_SCOPE,
                (false, Transport::Graph) => GRAPH_DELEGATED_SCOPE,
                (true, _) => MICROSOFT_APP_SCOPE,
                (false, _) => MICROSOFT_DELEGATED_SCOPE,
            };
            (
                Some(format!("{base}/token")),
                Some(format!("{base}/devicecode")),
                Some(scope.to_string()),
                Some("smtp.office365.com".to_string()),
            )
        }
        Provider::Google => (
            Some("https://oauth2.googleapis.com/token".to_string()),
            Some("https://oauth2.googleapis.com/device/code".to_string()),
            Some(GOOGLE_SCOPE.to_string()),
            Some("smtp.gmail.com".to_string()),
        ),
        Provider::Generic => (None, None, None, None),
    };
    let token_url = a
        .token_url
        .clone()
        .or(token_url)
        .ok_or(("token_url", required_generic()))?;
    let device_authorization_url = a.device_authorization_url.clone().or(device_url);
    let scope = a
        .scope
        .clone()
        .or(scope)
        .ok_or(("scope", required_generic()))?;
    let smtp_host = a
        .smtp_host
        .clone()
        .or(host)
        .ok_or(("smtp_host", required_generic()))?;
    // `[::1]`, as listener addresses write it: the address inside (the resolver took the brackets for a name).
    let inside = smtp_host.strip_prefix('[').map(|h| h.strip_suffix(']'));
    let smtp_host = match inside {
        Some(Some(ip)) if ip.parse::<std::net::Ipv6Addr>().is_ok() => ip.to_string(),
        Some(_) => {
            return Err((
                "smtp_host",
                format!(
                    "{smtp_host}: only an IPv6 address goes in brackets (the port goes in smtp_port)"
                ),
            ));
        }
        None => smtp_host,
    };
    let smtp_tls = a.smtp_tls.unwrap_or(TlsMode::Starttls);
    let smtp_port = a.smtp_port.unwrap_or(if smtp_tls == TlsMode::Implicit {
        465
    } else {
        587
    });

    check_url("token_url", &token_url)?;
    if let Some(u) = &device_authorization_url {
        check_url("device_authorization_url", u)?;
    }
    if let Some(u) = &authorization_url {
        check_url("authorization_url", u)?;
    }
    if a.flow == Flow::AuthorizationCode && authorization_url.is_none() {
        return Err(("authorization_url", required_generic()));
    }
    if smtp_tls == TlsMode::None && !is_loopback_host(&smtp_host) {
        return Err((
            "smtp_tls",
            format!(
                "\"none\" sends the access token in the clear; allowed only to a loopback host, not {smtp_host}"
            ),
        ));
    }
    let certificate = a.certificate_file.is_some() || a.private_key_file.is_some();
    if certificate && (a.certificate_file.is_none() || a.private_key_file.is_none()) {
        let missing = if a.certificate_file.is_none() {
            "certificate_file"
        } else {
            "private_key_file"
        };
        return Err((
            missing,
            "certificate_file and private_key_file go together (PEM files)".into(),
        ));
    }
    if a.flow == Flow::ClientCredentials && a.client_secret_file.is_none() && !certificate {
        return Err((
            "client_secret_file",
            "flow = \"client_credentials\" needs client_secret_file, or certificate_file and private_key_file".into(),
        ));
    }
    match a.client_auth {
        Some(ClientAuth::PrivateKeyJwt) if !certificate => {
            return Err((
                "client_auth",
                "private_key_jwt needs certificate_file and private_key_file".into(),
            ));
        }
        Some(ClientAuth::ClientSecretPost | ClientAuth::ClientSecretBasic)
            if a.client_secret_file.is_none() =>
        {
            return Err((
                "client_auth",
                "client_secret_post and client_secret_basic need client_secret_file".into(),
            ));
        }
        _ => {}
    }
    if let Some(d) = &a.client_secret_expires {
        super::expiry::parse_date(d).map_err(|r| ("client_secret_expires", r))?;
    }
    if a.flow == Flow::ServiceAccount && a.service_account_file.is_none() {
        return Err((
            "service_account_file",
            "required for flow = \"service_account\" (Google's JSON key)".into(),
        ));
    }
    if a.flow == Flow::Password && a.password_file.is_none() {
        return Err(("password_file", "required for flow = \"password\"".into()));
    }
    // A service account is identified by its key file; every other flow needs the app's client id.
    if a.flow != Flow::ServiceAccount && a.client_id.as_deref().is_none_or(str::is_empty) {
        return Err((
            "client_id",
            "required: the application (client) id of your app registration".into(),
        ));
    }
    let graph_url = a
        .graph_url
        .clone()
        .unwrap_or_else(|| "https://graph.microsoft.com".into());
    check_url("graph_url", &graph_url)?;
    let gmail_api_url = a
        .gmail_api_url
        .clone()
        .unwrap_or_else(|| "https://gmail.googleapis.com".into());
    check_url("gmail_api_url", &gmail_api_url)?;
    match (a.transport, a.provider) {
        (Transport::Graph, Provider::Google) => {
            return Err((
                "transport",
                "\"graph\" is Microsoft's; a Google account uses \"smtp\" or \"gmail_api\"".into(),
            ));
        }
        (Transport::GmailApi, Provider::Microsoft) => {
            return Err((
                "transport",
                "\"gmail_api\" is Google's; a Microsoft account uses \"smtp\" or \"graph\"".into(),
            ));
        }
        _ => {}
    }
    match a.fallback_transport {
        None => {}
        Some(Transport::Graph)
            if a.transport == Transport::Smtp && a.provider != Provider::Google => {}
        Some(_) => {
            return Err((
                "fallback_transport",
                "only \"graph\", for a Microsoft account whose transport is \"smtp\"".into(),
            ));
        }
    }
    let graph_scope = if a.flow == Flow::ClientCredentials {
        GRAPH_APP_SCOPE
    } else {
        GRAPH_DELEGATED_SCOPE
    }
    .to_string();
    Ok(Endpoints {
        token_url,
        device_authorization_url,
        authorization_url,
        scope,
        smtp_host,
        smtp_port,
        smtp_tls,
        graph_url: graph_url.trim_end_matches('/').to_string(),
        graph_scope,
        gmail_api_url: gmail_api_url.trim_end_matches('/').to_string(),
    })
}

fn required_generic() -> String {
    "required for provider = \"generic\"".into()
}

/// Plain http only to loopback: a token endpoint in the clear elsewhere would leak secrets and tokens.
fn check_url(key: &'static str, url: &str) -> Result<(), (&'static str, String)> {
    if let Some(rest) = url.strip_prefix("http://") {
        let host = rest.split(['/', '?']).next().unwrap_or("");
        let host = host.rsplit_once(':').map_or(host, |(h, _)| h);
        if !is_loopback_host(host.trim_start_matches('[').trim_end_matches(']')) {
            return Err((
                key,
                format!("plain http is allowed only to a loopback host: {url}"),
            ));
        }
        return Ok(());
    }
    if !url.starts_with("https://") {
        return Err((key, format!("not an https:// URL: {url}")));
    }
    Ok(())
}

pub fn is_loopback_host(host: &str) -> bool {
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn account(extra: &str) -> AccountConfig {
        toml::from_str(&format!(
            "name = \"a\"\nmailbox = \"m@example.com\"\nclient_id = \"c\"\n{extra}"
        ))
        .unwrap()
    }

    #[test]
    fn microsoft_defaults() {
        let e = endpoints(&account("provider = \"microsoft\"\nflow = \"device_code\"\ntenant = \"contoso.onmicrosoft.com\""))
            .unwrap();
        assert_eq!(
            e.token_url,
            "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token"
        );
        assert_eq!(
            e.device_authorization_url.as_deref(),
            Some(
                "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/devicecode"
            )
        );
        assert_eq!(e.scope, MICROSOFT_DELEGATED_SCOPE);
        assert_eq!(
            (e.smtp_host.as_str(), e.smtp_port, e.smtp_tls),
            ("smtp.office365.com", 587, TlsMode::Starttls)
        );
        let e = endpoints(&account(
            "provider = \"microsoft\"\nflow = \"client_credentials\"\ntenant = \"t\"\nclient_secret_file = \"/x\"",
        ))
        .unwrap();
        assert_eq!(e.scope, MICROSOFT_APP_SCOPE);
        assert_eq!(
            endpoints(&account("provider = \"microsoft\"\nflow = \"device_code\""))
                .unwrap_err()
                .0,
            "tenant"
        );
    }

    #[test]
    fn google_defaults() {
        let e = endpoints(&account("provider = \"google\"\nflow = \"device_code\"")).unwrap();
        assert_eq!(e.token_url, "https://oauth2.googleapis.com/token");
        assert_eq!(
            e.device_authorization_url.as_deref(),
            Some("https://oauth2.googleapis.com/device/code")
        );
        assert_eq!(e.scope, GOOGLE_SCOPE);
        assert_eq!((e.smtp_host.as_str(), e.smtp_port), ("smtp.gmail.com", 587));
    }

    /// `[::1]` as a listener's address writes it is the address ::1 (plain text allowed: it is loopback); other
    /// brackets are refused with what goes where.
    #[test]
    fn an_ipv6_host_in_brackets_is_the_address() {
        let base = "provider = \"google\"\nflow = \"device_code\"\nsmtp_tls = \"none\"\n";
        let e = endpoints(&account(&format!("{base}smtp_host = \"[::1]\""))).unwrap();
        assert_eq!(e.smtp_host, "::1");
        let (key, why) =
            endpoints(&account(&format!("{base}smtp_host = \"[::1]:25\""))).unwrap_err();
        assert_eq!(key, "smtp_host");
        assert!(why.contains("smtp_port"), "{why}");
    }

    #[test]
    fn plain_text_only_to_loopback() {
        let base = "provider = \"google\"\nflow = \"device_code\"\n";
        assert!(
            endpoints(&account(&format!(
                "{base}token_url = \"http://127.0.0.1:8080/token\""
            )))
            .is_ok()
        );
        assert!(
            endpoints(&account(&format!(
                "{base}token_url = \"http://[::1]:8080/token\""
            )))
            .is_ok()
        );
        let e = endpoints(&account(&format!(
            "{base}token_url = \"http://idp.example.com/token\""
        )))
        .unwrap_err();
        assert_eq!(e.0, "token_url");
        let e = endpoints(&account(&format!("{base}smtp_tls = \"none\""))).unwrap_err();
        assert_eq!(e.0, "smtp_tls");
        assert!(
            endpoints(&account(&format!(
                "{base}smtp_tls = \"none\"\nsmtp_host = \"localhost\""
            )))
            .is_ok()
        );
        assert_eq!(
            endpoints(&account(&format!("{base}smtp_tls = \"implicit\"")))
                .unwrap()
                .smtp_port,
            465
        );
    }
}
