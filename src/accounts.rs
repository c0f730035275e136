//! Building each configured account's token manager and upstream at start.

use std::sync::Arc;

use secrecy::SecretString;

use crate::config::{AccountConfig, Config, ListenerConfig, ListenerTls};
use crate::config::{Flow, Transport};
use crate::oauth::assertion::ClientCertificate;
use crate::oauth::{Endpoints, TokenClient, endpoints};
use crate::queue::delivery::Account;
use crate::queue::rate::AccountRate;
use crate::tokens::{AccountTokens, TokenStore};
use crate::upstream::gmail::GmailUpstream;
use crate::upstream::graph::GraphUpstream;
use crate::upstream::rewrite::SenderRewrite;
use crate::upstream::smtp::SmtpUpstream;
use crate::upstream::transports::{Primary, Transports};

#[derive(Debug, thiserror::Error)]
#[error("account {account}: {reason}")]
pub struct AccountError {
    pub account: String,
    pub reason: String,
}

/// One HTTP client for every token endpoint: no redirects (a token endpoint never redirects, and following one
/// would resend the secret elsewhere), rustls only.
pub fn http_client() -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(std::time::Duration::from_secs(30))
        .build()
}

/// A problem with one of an account's settings: its key (`private_key_file`) and why.
pub type SettingProblem = (&'static str, String);

/// An account's endpoints and a client for its token endpoint, with its secret read from its file.
pub fn token_client(
    a: &AccountConfig,
    http: &reqwest::Client,
) -> Result<(Endpoints, TokenClient), String> {
    let shown = |(k, r): SettingProblem| format!("{k}: {r}");
    let ep = endpoints(a).map_err(shown)?;
    let secret = client_secret(a).map_err(shown)?;
    let certificate = client_certificate(a).map_err(shown)?;
    let client = client_for(a, http, &ep, secret, certificate);
    Ok((ep, client))
}

/// `client_secret_file`, read.
fn client_secret(a: &AccountConfig) -> Result<Option<SecretString>, SettingProblem> {
    let Some(p) = &a.client_secret_file else {
        return Ok(None);
    };
    let text = crate::small_files::read_to_string(p, crate::small_files::SMALL)
        .map_err(|e| ("client_secret_file", format!("{}: {e}", p.display())))?;
    Ok(Some(SecretString::from(text.trim().to_string())))
}

/// `certificate_file` and `private_key_file`, loaded, where the account signs client assertions with them.
fn client_certificate(a: &AccountConfig) -> Result<Option<Arc<ClientCertificate>>, SettingProblem> {
    let use_certificate = a
        .client_auth
        .is_none_or(|c| c == crate::config::ClientAuth::PrivateKeyJwt);
    let (Some(cert), Some(key), true) = (&a.certificate_file, &a.private_key_file, use_certificate)
    else {
        return Ok(None);
    };
    let alg = a
        .assertion_algorithm
        .unwrap_or(crate::config::AssertionAlgorithm::PS256);
    Ok(Some(Arc::new(ClientCertificate::load(cert, key, alg)?)))
}

fn client_for(
    a: &AccountConfig,
    http: &reqwest::Client,
    ep: &Endpoints,
    secret: Option<SecretString>,
    certificate: Option<Arc<ClientCertificate>>,
) -> TokenClient {
    let mut client = TokenClient::new(
        http.clone(),
        ep.token_url.clone(),
        a.client_id.clone().unwrap_or_default(),
        secret,
        ep.scope.clone(),
    );
    client.basic_auth = a.client_auth == Some(crate::config::ClientAuth::ClientSecretBasic);
    client.certificate = certificate;
    client
}

/// The user name and password of a `flow = "password"` account.
pub fn password(a: &AccountConfig) -> Result<(String, SecretString), SettingProblem> {
    let path = a.password_file.as_ref().ok_or((
        "password_file",
        "required for flow = \"password\"".to_string(),
    ))?;
    let text = crate::small_files::read_to_string(path, crate::small_files::SMALL)
        .map_err(|e| ("password_file", format!("{}: {e}", path.display())))?;
    let user = a.username.clone().unwrap_or_else(|| a.mailbox.clone());
    Ok((
        user,
        SecretString::from(text.trim_end_matches(['\r', '\n']).to_string()),
    ))
}

/// What an account is made of, read from its files and checked: its token client, how it renews, its upstreams.
/// Everything about an account that `relay serve` refuses to start on is found here, for the daemon (at start,
/// at a reload) and for `relay check` alike.
pub struct Parts {
    pub client: TokenClient,
    pub renewal: crate::oauth::Renewal,
    pub primary: Primary,
    /// Graph, when it is the fallback transport, and the scope of its tokens.
    pub fallback: Option<(GraphUpstream, String)>,
}

/// Builds an account's [`Parts`]; reads no state. Each file is read whatever became of the others, so that one
/// run names every problem, each with its key.
pub fn parts(
    config: &Config,
    a: &AccountConfig,
    http: &reqwest::Client,
) -> Result<Parts, Vec<SettingProblem>> {
    fn ok<T>(problems: &mut Vec<SettingProblem>, r: Result<T, SettingProblem>) -> Option<T> {
        r.map_err(|p| problems.push(p)).ok()
    }
    let mut problems = Vec::new();
    let ep = ok(&mut problems, endpoints(a));
    let secret = ok(&mut problems, client_secret(a));
    let certificate = ok(&mut problems, client_certificate(a));
    let ca = ok(&mut problems, ca_file(a));
    let renewal = ok(&mut problems, crate::oauth::Renewal::for_account(a));
    let upstreams = match (&ep, ca) {
        (Some(ep), Some(ca)) => ok(&mut problems, upstreams(config, a, ep, ca)),
        _ => None,
    };
    let (Some(ep), Some(secret), Some(certificate), Some(renewal), Some((primary, fallback))) =
        (ep, secret, certificate, renewal, upstreams)
    else {
        return Err(problems);
    };
    Ok(Parts {
        client: client_for(a, http, &ep, secret, certificate),
        renewal,
        primary,
        fallback,
    })
}

/// The account's transport, and Graph where it is the fallback (with the scope of its tokens).
type Upstreams = (Primary, Option<(GraphUpstream, String)>);

fn upstreams(
    config: &Config,
    a: &AccountConfig,
    ep: &Endpoints,
    ca: Option<Vec<u8>>,
) -> Result<Upstreams, SettingProblem> {
    let graph = || {
        GraphUpstream::new(&ep.graph_url, a.mailbox.clone(), a.save_to_sent_items)
            .map_err(|r| ("transport", r))
    };
    let primary = match a.transport {
        Transport::Smtp => Primary::Smtp(
            SmtpUpstream::new(
                &config.hostname,
                &a.name,
                a.mailbox.clone(),
                ep.clone(),
                ca,
                a.smtp_timeout,
                a.connections(),
            )
            // Only the trust store can fail here: ca_file's certificates, or the system's without one.
            .map_err(|r| {
                let r = r.strip_prefix("ca_file: ").unwrap_or(&r);
                let r = match &a.ca_file {
                    Some(p) => format!("{}: {r}", p.display()),
                    None => r.to_string(),
                };
                ("ca_file", r)
            })?,
        ),
        Transport::Graph => Primary::Graph(graph()?),
        Transport::GmailApi => {
            Primary::Gmail(GmailUpstream::new(&ep.gmail_api_url).map_err(|r| ("transport", r))?)
        }
    };
    let fallback = match a.fallback_transport {
        Some(Transport::Graph) => Some((graph()?, ep.graph_scope.clone())),
        _ => None,
    };
    Ok((primary, fallback))
}

/// `ca_file`'s bytes.
fn ca_file(a: &AccountConfig) -> Result<Option<Vec<u8>>, SettingProblem> {
    let Some(p) = &a.ca_file else {
        return Ok(None);
    };
    crate::small_files::read(p, crate::small_files::SMALL)
        .map(Some)
        .map_err(|e| ("ca_file", format!("{}: {e}", p.display())))
}

/// Whether the account's token file opens with the store's key (`check`: the store's own check, or a read that
/// changes nothing). A key that does not open it is a setting to fix before relay runs; anything else about the
/// file is met, and explained, at its first use.
pub fn tokens_open(
    account: &str,
    check: Result<(), crate::tokens::StoreError>,
) -> Result<(), String> {
    match check {
        Err(e) if e.is_key_problem() => Err(e.to_string()),
        Err(e) => {
            tracing::warn!(relay_account = %account, error = %e, "cannot read the token file");
            Ok(())
        }
        Ok(()) => Ok(()),
    }
}

pub fn build(config: &Config) -> Result<Vec<Arc<Account>>, AccountError> {
    let http = shared_http()?;
    let store = token_store(config)?;
    warn_unauthorized(&config.accounts, &store);
    config
        .accounts
        .iter()
        .map(|a| build_one(config, a, &http, &store, None).map(Arc::new))
        .collect()
}

/// The HTTP client every account's token endpoint requests go through.
pub fn shared_http() -> Result<reqwest::Client, AccountError> {
    http_client().map_err(|e| AccountError {
        account: "*".into(),
        reason: e.to_string(),
    })
}

/// The token store, with the key that opens every account's tokens (`token_encryption`).
pub fn token_store(config: &Config) -> Result<TokenStore, AccountError> {
    TokenStore::for_config(config).map_err(|e| AccountError {
        account: config
            .accounts
            .iter()
            .map(|a| a.name.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        reason: e.to_string(),
    })
}

/// One account's token manager and upstream. `rate`: the counters it keeps (a reload keeps an account's counts,
/// and gives them the new limits itself once the reload can no longer fail); else they are read from the state
/// dir.
pub fn build_one(
    config: &Config,
    a: &AccountConfig,
    http: &reqwest::Client,
    store: &TokenStore,
    rate: Option<Arc<AccountRate>>,
) -> Result<Account, AccountError> {
    let err = |reason: String| AccountError {
        account: a.name.clone(),
        reason,
    };
    // Before they are read: a file that changes meanwhile is then seen as changed at the next reload.
    let files = files_hash(a);
    let Parts {
        client,
        renewal,
        primary,
        fallback,
    } = parts(config, a, http).map_err(|problems| {
        err(problems
            .into_iter()
            .map(|(k, r)| format!("{k}: {r}"))
            .collect::<Vec<_>>()
            .join("; "))
    })?;
    tokens_open(&a.name, store.check(&a.name)).map_err(err)?;
    let tokens = Arc::new(
        AccountTokens::new(a.name.clone(), renewal, client, store.clone())
            .with_rotation(crate::config::Rotation::of(a))
            .with_provider(a.provider),
    );
    let transports =
        Transports::new(&a.name, &config.state_dir, primary, fallback).with_provider(a.provider);
    let rewrite = SenderRewrite::new(a.mailbox.clone(), a.rewrite_from);
    let mut account =
        Account::new(a.name.clone(), tokens, transports, rewrite).with_connections(a.connections());
    account.files = files;
    account.rate = match rate {
        Some(rate) => rate,
        None => Arc::new(AccountRate::load(&config.state_dir, &a.name, a.limits())),
    };
    Ok(account)
}

/// What the account's files hold now (client secret, password, certificate and private key, service-account key,
/// CA), as one hash: a reload rebuilds an account whose files changed though its config did not, so that a secret
/// rotated in place is taken up by `systemctl reload relay`. A file that cannot be read counts by its error.
pub fn files_hash(a: &AccountConfig) -> blake3::Hash {
    use std::os::unix::ffi::OsStrExt;
    let mut hash = blake3::Hasher::new();
    let mut field = |bytes: &[u8]| {
        hash.update(&(bytes.len() as u64).to_le_bytes());
        hash.update(bytes);
    };
    let files = [
        &a.client_secret_file,
        &a.certificate_file,
        &a.private_key_file,
        &a.service_account_file,
        &a.password_file,
        &a.ca_file,
    ];
    for path in files.into_iter().flatten() {
        field(path.as_os_str().as_bytes());
        match crate::small_files::read(path, crate::small_files::SMALL) {
            Ok(contents) => field(&contents),
            Err(e) => field(format!("unreadable: {:?}", e.kind()).as_bytes()),
        }
    }
    hash.finalize()
}

/// One warning per account that waits for `relay authorize` (its flow needs a person to sign in, and it has no
/// tokens yet), so that the first hint is not a deferred message. Flows that get their own tokens need none.
/// At start, and for the accounts a reload adds.
pub fn warn_unauthorized<'a>(
    accounts: impl IntoIterator<Item = &'a AccountConfig>,
    store: &TokenStore,
) {
    for a in accounts {
        if matches!(a.flow, Flow::DeviceCode | Flow::AuthorizationCode)
            && store.mtime(&a.name).is_none()
        {
            tracing::warn!(
                relay_event = "authorization_needed",
                relay_account = %a.name,
                "account {} has no tokens yet: its mail stays queued until `relay authorize {}` is run",
                a.name,
                a.name
            );
        }
    }
}

/// Logs `credential_expiring` once per credential at each of 30, 7 and 1 days ahead (and once expired), checking
/// hourly, so that `journalctl -u relay RELAY_EVENT=credential_expiring` shows it coming. The listeners'
/// certificates too (with `LISTENER=`): a device that checks the certificate stops sending the day it expires.
pub async fn watch_expiries(
    accounts: Vec<AccountConfig>,
    listeners: Vec<ListenerConfig>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    use crate::oauth::expiry::{THRESHOLDS, expiries, threshold_reached, warning};
    let mut logged = std::collections::HashSet::new();
    let mut certs_logged = std::collections::HashSet::new();
    loop {
        let now = std::time::SystemTime::now();
        for a in &accounts {
            for e in expiries(a) {
                if let Some(t) = threshold_reached(&e, now)
                    && logged.insert((a.name.clone(), e.what, t))
                    && let Some(w) = warning(&a.name, &e, now)
                {
                    tracing::warn!(relay_event = "credential_expiring", relay_account = %a.name, "{w}");
                }
            }
        }
        for l in listeners.iter().filter(|l| l.tls != ListenerTls::None) {
            let Some(cert) = &l.cert else { continue };
            let Ok(v) = crate::certs::validity(cert) else {
                continue;
            };
            let reached = match v.not_after.duration_since(now) {
                // Not valid yet: said once, as a threshold of its own.
                Ok(_) if now < v.not_before => Some(u64::MAX),
                Err(_) => Some(0),
                Ok(left) => THRESHOLDS
                    .iter()
                    .rev()
                    .copied()
                    .find(|t| left.as_secs() / 86_400 < *t),
            };
            if let Some(t) = reached
                && certs_logged.insert((cert.clone(), v.not_after, t))
                && let Some(w) = crate::config::listener_cert_warning(cert, now)
            {
                tracing::warn!(relay_event = "credential_expiring", listener = %l.address, "{w}");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_secs(3600)) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}
