//! `relay authorize ACCOUNT`: obtains an account's grant interactively and stores its tokens.
//!
//! Device code (RFC 8628): print where to go and what to type, poll at the interval the provider asks for, slow
//! down when told to, and explain in plain words why it failed when it does. The daemon rereads the token file
//! when it changes, so this works while relay runs.

use std::io::Write;
use std::time::{Duration, Instant, SystemTime};

use crate::config::{AccountConfig, Config, Flow};
use crate::oauth::{DevicePoll, OAuthError, TokenClient};
use crate::tokens::{StoredTokens, TokenStore};

#[derive(Debug, thiserror::Error)]
pub enum AuthorizeError {
    #[error("no [[account]] is named `{0}`")]
    NoSuchAccount(String),
    #[error("{0}")]
    Failed(String),
}

fn failed(s: impl Into<String>) -> AuthorizeError {
    AuthorizeError::Failed(s.into())
}

/// Runs the account's grant; progress and instructions go to `out`.
pub async fn authorize(
    config: &Config,
    name: &str,
    out: &mut (impl Write + Send),
) -> Result<(), AuthorizeError> {
    let account = config
        .accounts
        .iter()
        .find(|a| a.name == name)
        .ok_or_else(|| AuthorizeError::NoSuchAccount(name.to_string()))?;
    let http = crate::accounts::http_client().map_err(|e| failed(e.to_string()))?;
    let (ep, client) = crate::accounts::token_client(account, &http).map_err(failed)?;
    let store = TokenStore::new(&config.state_dir);
    let grant = match account.flow {
        Flow::DeviceCode => {
            let url = ep.device_authorization_url.clone().ok_or_else(|| {
                failed("device_authorization_url: required for flow = \"device_code\"")
            })?;
            device_code(account, &client, &url, out).await?
        }
        Flow::ClientCredentials => {
            let _ = writeln!(
                out,
                "Account {name} uses client credentials: relay fetches its tokens itself. Checking that it can…"
            );
            client
                .client_credentials()
                .await
                .map_err(|e| failed(explain(&e)))?
        }
        other => {
            return Err(failed(format!(
                "flow {other:?} is not supported by this version of relay authorize"
            )));
        }
    };
    let now = SystemTime::now();
    let tokens = StoredTokens {
        access_token: grant.access_token,
        expires_at: grant.expires_at,
        obtained_at: now,
        refresh_token: grant.refresh_token,
        last_refresh: Some(now),
        needs_authorization: false,
        last_error: None,
    };
    store
        .save(name, &tokens)
        .map_err(|e| failed(e.to_string()))?;
    // Mail deferred while the account waited for this is due now.
    let _ = crate::queue::scheduler::request_retry(&config.state_dir, None);
    let _ = writeln!(
        out,
        "Authorized {} (account {name}). Tokens stored in {}; a running relay picks them up by itself.",
        account.mailbox,
        store.path(name).display()
    );
    Ok(())
}

async fn device_code(
    account: &AccountConfig,
    client: &TokenClient,
    url: &str,
    out: &mut (impl Write + Send),
) -> Result<crate::oauth::Grant, AuthorizeError> {
    let device = client
        .device_start(url)
        .await
        .map_err(|e| failed(explain(&e)))?;
    let _ = writeln!(
        out,
        "To let relay send as {} (account {}):",
        account.mailbox, account.name
    );
    let _ = writeln!(out, "  1. Open {}", device.verification_uri);
    let _ = writeln!(out, "  2. Enter the code {}", device.user_code);
    let _ = writeln!(out, "  3. Sign in as {} and accept.", account.mailbox);
    let _ = writeln!(
        out,
        "Waiting for the sign-in (the code is valid for {})…",
        humantime::format_duration(device.expires_in)
    );
    let _ = out.flush();
    let deadline = Instant::now() + device.expires_in;
    let mut interval = device.interval;
    loop {
        tokio::time::sleep(interval).await;
        match client.device_poll(&device).await {
            Ok(DevicePoll::Granted(grant)) => return Ok(grant),
            Ok(DevicePoll::Pending) => {}
            // RFC 8628 section 3.5: every slow_down adds 5 seconds to the interval, for good.
            Ok(DevicePoll::SlowDown) => interval += Duration::from_secs(5),
            Err(e) => return Err(failed(explain(&e))),
        }
        if Instant::now() >= deadline {
            return Err(failed(expired(account)));
        }
    }
}

fn expired(account: &AccountConfig) -> String {
    format!(
        "the code expired before the sign-in was finished (authorization_pending until the end). Run `relay authorize {}` again and complete the sign-in in the browser before the code runs out.",
        account.name
    )
}

/// Plain words for the errors a sysadmin meets.
fn explain(e: &OAuthError) -> String {
    match e {
        OAuthError::Endpoint {
            error, description, ..
        } => match error.as_str() {
            "expired_token" => format!(
                "the code expired before the sign-in was finished (expired_token). Run relay authorize again and sign in promptly. ({description})"
            ),
            "access_denied" | "authorization_declined" => format!(
                "the sign-in was declined ({error}): the user pressed Cancel, or an administrator has not consented to the app. Ask the tenant admin to grant consent, then run relay authorize again. ({description})"
            ),
            "invalid_client" | "unauthorized_client" => format!(
                "the provider does not accept this client ({error}): check client_id, the client secret, and that the app registration allows this flow (\"Allow public client flows\" for device code). ({description})"
            ),
            "invalid_scope" => format!(
                "the provider refused the scope ({error}): check `scope` and the app's API permissions. ({description})"
            ),
            _ => e.to_string(),
        },
        _ => e.to_string(),
    }
}
