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
    let store = TokenStore::for_config(config).map_err(|e| failed(e.to_string()))?;
    // Before anyone signs in: an approved grant that cannot be saved is lost (and a provider may count it).
    if matches!(account.flow, Flow::DeviceCode | Flow::AuthorizationCode) {
        store.check_writable().map_err(|e| {
            failed(format!(
                "cannot store tokens: {e}; run it as root (sudo relay authorize {name}) or as the service's user"
            ))
        })?;
    }
    // The browser of an authorization-code sign-in, waiting on the loopback redirect for the outcome.
    let mut browser = None;
    let grant = match account.flow {
        Flow::DeviceCode => {
            let url = ep.device_authorization_url.clone().ok_or_else(|| {
                failed("device_authorization_url: required for flow = \"device_code\"")
            })?;
            device_code(account, &client, &url, out).await?
        }
        Flow::AuthorizationCode => {
            let (grant, tcp) = authorization_code(account, &ep, &client, out).await?;
            browser = tcp;
            grant
        }
        Flow::ClientCredentials | Flow::ServiceAccount | Flow::Password => {
            let how = match account.flow {
                Flow::ClientCredentials => "client credentials: relay fetches its tokens itself",
                Flow::ServiceAccount => "a service account: relay signs its own requests",
                _ => "the password flow: relay signs in by itself",
            };
            let _ = writeln!(out, "Account {name} uses {how}. Checking that it can…");
            let renewal = crate::oauth::Renewal::for_account(account)
                .map_err(|(k, r)| failed(format!("{k}: {r}")))?;
            renewal.obtain(&client, None).await.map_err(|e| match e {
                // The table's words where it knows the refusal: they name the setting to fix.
                crate::oauth::RenewalError::OAuth(e) => {
                    let text = e.to_string();
                    let provider = Some(account.provider);
                    match crate::upstream::diagnosis::for_grant(&text, Some(name), false, provider)
                    {
                        Some(_) => failed(e.explained(
                            name,
                            false,
                            &crate::config::Rotation::of(account),
                            provider,
                        )),
                        None => failed(explain(&e)),
                    }
                }
                other => failed(other.to_string()),
            })?
        }
    };
    let now = SystemTime::now();
    // Only a person's grant is renewed with a refresh token; the other flows fetch a new one by themselves.
    let renewable = grant.refresh_token.is_some()
        || !matches!(account.flow, Flow::DeviceCode | Flow::AuthorizationCode);
    let expires_at = grant.expires_at;
    let tokens = StoredTokens {
        access_token: grant.access_token,
        expires_at: grant.expires_at,
        obtained_at: now,
        refresh_token: grant.refresh_token,
        last_refresh: Some(now),
        needs_authorization: false,
        last_error: None,
    };
    let saved = store.save(name, &tokens).map_err(|e| failed(e.to_string()));
    // The browser is told only now, once the tokens are stored or could not be.
    if let Some(tcp) = browser {
        answer_browser(tcp, saved.as_ref().map_err(ToString::to_string).copied()).await;
    }
    saved?;
    // Mail deferred while the account waited for this is due now.
    let _ = crate::queue::retry::request_retry(&config.state_dir, None);
    let _ = writeln!(
        out,
        "Authorized {} (account {name}). Tokens stored in {}; a running relay picks them up by itself.",
        account.mailbox,
        store.path(name).display()
    );
    if !renewable {
        let _ = writeln!(
            out,
            "Warning: the provider gave no refresh token, so relay cannot renew this grant: its access token lasts until {}, then the account needs `relay authorize {name}` again. Most often the scope lacks offline_access (Microsoft) or the app is not allowed offline access.",
            humantime::format_rfc3339_seconds(expires_at)
        );
    }
    Ok(())
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The page the browser shows after the redirect.
const DONE_PAGE: &str = "<!doctype html><meta charset=utf-8><title>relay</title><h1>relay is authorized</h1><p>You can close this tab.</p>";

async fn authorization_code(
    account: &AccountConfig,
    ep: &crate::oauth::Endpoints,
    client: &TokenClient,
    out: &mut (impl Write + Send),
) -> Result<(crate::oauth::Grant, Option<tokio::net::TcpStream>), AuthorizeError> {
    use crate::oauth::authcode::{Pkce, authorization_url, new_state};
    let configured = account
        .redirect_uri
        .clone()
        .unwrap_or_else(|| "http://127.0.0.1:0/".to_string());
    let mut redirect =
        reqwest::Url::parse(&configured).map_err(|e| failed(format!("redirect_uri: {e}")))?;
    // A loopback redirect gets a one-shot listener (RFC 8252 section 7.3); port 0 picks a free port.
    let listener = match (redirect.scheme(), redirect.host_str()) {
        ("http", Some(host))
            if crate::oauth::provider::is_loopback_host(host.trim_matches(['[', ']'])) =>
        {
            let addr = format!("{}:{}", host, redirect.port().unwrap_or(80));
            let l = tokio::net::TcpListener::bind(&addr)
                .await
                .map_err(|e| failed(format!("cannot listen on {addr} for the redirect: {e}")))?;
            let port = l.local_addr().map_err(|e| failed(e.to_string()))?.port();
            let _ = redirect.set_port(Some(port));
            Some(l)
        }
        _ => None,
    };
    let redirect_uri = redirect.to_string();
    let pkce = Pkce::new();
    let state = new_state();
    let url = authorization_url(ep, account, &redirect_uri, &pkce, &state).map_err(failed)?;
    let _ = writeln!(
        out,
        "To let relay send as {} (account {}), open this address and sign in:",
        account.mailbox, account.name
    );
    let _ = writeln!(out, "{url}");
    if listener.is_some() {
        let _ = writeln!(
            out,
            "Waiting for the browser to come back to {redirect_uri} …"
        );
        let _ = writeln!(
            out,
            "On a machine without a browser, sign in elsewhere and paste here the address the browser ends up on."
        );
    } else {
        let _ = writeln!(out, "Then paste here the address the browser ends up on.");
    }
    let _ = out.flush();

    let (code, browser) = wait_for_redirect(listener, &state).await?;
    // The browser's page says what became of the sign-in only once it is known (the exchange here, the save by
    // the caller): "authorized" first could be followed by a failure that only the terminal showed.
    match client
        .exchange_code(&code, &redirect_uri, &pkce.verifier)
        .await
    {
        Ok(grant) => Ok((grant, browser)),
        Err(e) => {
            let e = failed(explain(&e));
            if let Some(tcp) = browser {
                answer_browser(tcp, Err(e.to_string())).await;
            }
            Err(e)
        }
    }
}

/// Answers the browser's redirect: the done page, or why relay was not authorized.
async fn answer_browser(mut tcp: tokio::net::TcpStream, result: Result<(), String>) {
    use tokio::io::AsyncWriteExt;
    let (status, page) = match result {
        Ok(()) => ("200 OK", DONE_PAGE.to_string()),
        Err(e) => (
            "400 Bad Request",
            format!(
                "<!doctype html><meta charset=utf-8><title>relay</title><h1>relay was not authorized</h1><p>{}</p>",
                html_escape(&e)
            ),
        ),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{page}",
        page.len()
    );
    let _ = tcp.write_all(response.as_bytes()).await;
    let _ = tcp.shutdown().await;
}

/// The redirect target: from the loopback listener, or pasted on stdin, whichever comes first. The code, and the
/// browser's connection if it came that way, to be answered once the code is exchanged.
async fn wait_for_redirect(
    listener: Option<tokio::net::TcpListener>,
    state: &str,
) -> Result<(String, Option<tokio::net::TcpStream>), AuthorizeError> {
    use crate::oauth::authcode::{Redirect, parse_redirect};
    // The code, or why there is none. `Ok(None)`: not this sign-in's redirect (another state, none on a
    // refusal through the loopback port, which anything on this machine can reach): answered, and waited past.
    // Pasted by the user, a refusal without a state is taken: only they could have typed it.
    const NOT_THIS_ONE: &str = "the redirect's state does not match this sign-in (refused: it may be an old tab or a forged request)";
    let check = |target: &str, pasted: bool| -> Result<Option<String>, AuthorizeError> {
        let redirect = match parse_redirect(target) {
            Ok(r) => r,
            // Through the loopback port (anything on this machine, any page the browser opens, can send a
            // `?code=` without a state): not this sign-in's, answered and waited past.
            Err(_) if !pasted => return Ok(None),
            Err(e) => return Err(failed(e)),
        };
        match redirect {
            Redirect::Code { code, state: got } if got == state => Ok(Some(code)),
            Redirect::Error { state: got, .. }
                if got.as_deref().is_some_and(|g| g != state) || (got.is_none() && !pasted) =>
            {
                Ok(None)
            }
            Redirect::Code { .. } => Ok(None),
            Redirect::Error {
                error, description, ..
            } => Err(failed(explain(&OAuthError::Endpoint {
                status: 400,
                error,
                description,
            }))),
        }
    };
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    let mut stdin_open = true;
    loop {
        let accept = async {
            match &listener {
                Some(l) => l.accept().await.ok(),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            Some((mut tcp, _)) = accept => {
                let mut buf = vec![0u8; 8192];
                let mut len = 0;
                // Bounded: a connection that sends nothing would otherwise hold the only listener, now that a
                // request that is not the redirect no longer ends the wait.
                let head_by = tokio::time::Instant::now() + Duration::from_secs(10);
                while len < buf.len() && !buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
                    match tokio::time::timeout_at(head_by, tcp.read(&mut buf[len..])).await {
                        Ok(Ok(0) | Err(_)) | Err(_) => break,
                        Ok(Ok(n)) => len += n,
                    }
                }
                let head = String::from_utf8_lossy(&buf[..len]);
                let target = head.lines().next().and_then(|l| l.split(' ').nth(1)).unwrap_or("").to_string();
                if !target.contains("code=") && !target.contains("error=") {
                    // A favicon or a stray request: not the redirect.
                    let _ = tcp.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").await;
                    continue;
                }
                match check(&target, false) {
                    Ok(Some(code)) => return Ok((code, Some(tcp))),
                    Ok(None) => {
                        answer_browser(tcp, Err(format!("{NOT_THIS_ONE}; the sign-in in progress goes on"))).await;
                        continue;
                    }
                    Err(e) => {
                        answer_browser(tcp, Err(e.to_string())).await;
                        return Err(e);
                    }
                }
            }
            line = stdin.next_line(), if stdin_open => match line {
                Ok(Some(l)) if !l.trim().is_empty() => {
                    return match check(&l, true)? {
                        Some(code) => Ok((code, None)),
                        None => Err(failed(format!("{NOT_THIS_ONE}; run relay authorize again"))),
                    };
                }
                Ok(Some(_)) => {}
                _ => {
                    stdin_open = false;
                    if listener.is_none() {
                        return Err(failed("no redirect address was pasted"));
                    }
                }
            },
        }
    }
}

async fn device_code(
    account: &AccountConfig,
    client: &TokenClient,
    url: &str,
    out: &mut (impl Write + Send),
) -> Result<crate::oauth::Grant, AuthorizeError> {
    // OAuthError's words name the token endpoint, where most requests go; this one went to the device
    // authorization endpoint, and the sysadmin must look at that setting.
    let device = client.device_start(url).await.map_err(|e| {
        let text = explain(&e);
        // Only OAuthError's own prefix: a provider's description quoted further on stays as it was.
        failed(match text.strip_prefix("token endpoint") {
            Some(rest) => format!("device authorization endpoint (device_authorization_url){rest}"),
            None => text,
        })
    })?;
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
    // The wait before the next poll: the interval, or longer while the endpoint fails.
    let mut wait = interval;
    // A line now and then while nothing happens, so that a sysadmin sees it still waits, and for how long.
    let mut said_at = Instant::now();
    let last_failure = loop {
        tokio::time::sleep(wait).await;
        let failure = match client.device_poll(&device).await {
            Ok(DevicePoll::Granted(grant)) => return Ok(grant),
            Ok(DevicePoll::Pending) => None,
            // RFC 8628 section 3.5: every slow_down adds 5 seconds to the interval, for good.
            Ok(DevicePoll::SlowDown) => {
                interval = (interval + Duration::from_secs(5)).min(MAX_POLL_WAIT);
                let _ = writeln!(
                    out,
                    "The provider asked to be polled less often: every {} from now on.",
                    humantime::format_duration(interval)
                );
                None
            }
            // RFC 8628 section 3.5: a poll that times out (and, alike, a refused connection, a 5xx, a 429) is
            // asked again, less often, until the code expires: the sign-in in progress is the user's, and the
            // endpoint's trouble may pass before they finish it.
            // A page in the endpoint's place (a captive portal on a laptop's Wi-Fi) too: it ended the sign-in at
            // once.
            Err(e) if e.is_transient() || e.is_intercepted() => {
                // Never past the code's end: "asking again in 8s" with 2 s left was a promise not kept.
                let left = deadline.saturating_duration_since(Instant::now());
                wait = (wait * 2).min(MAX_POLL_WAIT).min(left);
                let _ = writeln!(
                    out,
                    "The poll failed ({e}); asking again in {}…",
                    humantime::format_duration(wait)
                );
                let _ = out.flush();
                Some(e)
            }
            Err(e) => return Err(failed(explain(&e))),
        };
        if failure.is_none() {
            wait = interval;
            if said_at.elapsed() >= Duration::from_secs(60) && Instant::now() < deadline {
                let left = Duration::from_secs(
                    deadline.saturating_duration_since(Instant::now()).as_secs(),
                );
                let _ = writeln!(
                    out,
                    "Still waiting for the sign-in ({} left)…",
                    humantime::format_duration(left)
                );
                let _ = out.flush();
                said_at = Instant::now();
            }
        }
        if Instant::now() >= deadline {
            break failure;
        }
    };
    Err(failed(match last_failure {
        Some(e) => format!(
            "the code expired while the provider did not answer ({e}). Run `relay authorize {}` again once it does.",
            account.name
        ),
        None => expired(account),
    }))
}

/// The longest wait between two polls: past it, a user who has finished signing in waits too long for relay.
const MAX_POLL_WAIT: Duration = Duration::from_secs(120);

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
