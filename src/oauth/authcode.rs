//! The authorization code grant with PKCE (RFC 6749 section 4.1, RFC 7636, RFC 8252 for the loopback redirect):
//! the pieces without I/O. `authorize.rs` drives the browser side.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use sha2::{Digest, Sha256};

use super::Endpoints;
use crate::config::{AccountConfig, Provider};

/// A PKCE verifier and its S256 challenge.
pub struct Pkce {
    pub verifier: String,
    pub challenge: String,
}

impl Pkce {
    pub fn new() -> Pkce {
        // 32 random bytes: 43 characters, the minimum RFC 7636 allows and plenty of entropy.
        let verifier = B64URL.encode(rand::random::<[u8; 32]>());
        let challenge = B64URL.encode(Sha256::digest(verifier.as_bytes()));
        Pkce {
            verifier,
            challenge,
        }
    }
}

impl Default for Pkce {
    fn default() -> Self {
        Self::new()
    }
}

/// A fresh `state` value, checked when the redirect comes back (CSRF).
pub fn new_state() -> String {
    B64URL.encode(rand::random::<[u8; 16]>())
}

/// The URL the user opens: consent asked every time (so that a refresh token comes back), the mailbox as login
/// hint, and Google's `access_type=offline` (without it Google issues no refresh token).
pub fn authorization_url(
    ep: &Endpoints,
    account: &AccountConfig,
    redirect_uri: &str,
    pkce: &Pkce,
    state: &str,
) -> Result<String, String> {
    let base = ep
        .authorization_url
        .as_deref()
        .ok_or("authorization_url: not configured")?;
    let client_id = account.client_id.as_deref().unwrap_or_default();
    let mut params = vec![
        ("client_id", client_id),
        ("response_type", "code"),
        ("redirect_uri", redirect_uri),
        ("scope", ep.scope.as_str()),
        ("state", state),
        ("code_challenge", pkce.challenge.as_str()),
        ("code_challenge_method", "S256"),
        ("prompt", "consent"),
        ("login_hint", account.mailbox.as_str()),
    ];
    if account.provider == Provider::Google {
        params.push(("access_type", "offline"));
    }
    reqwest::Url::parse_with_params(base, &params)
        .map(String::from)
        .map_err(|e| format!("authorization_url: {e}"))
}

/// What came back on the redirect.
#[derive(Debug, PartialEq, Eq)]
pub enum Redirect {
    Code {
        code: String,
        state: String,
    },
    /// The provider said no (`error=access_denied` and the like), with the sign-in's `state` as RFC 6749 section
    /// 4.1.2.1 asks (None if it sent none).
    Error {
        error: String,
        description: String,
        state: Option<String>,
    },
}

/// Reads a redirect: a whole URL as pasted from the browser, or just the request target (`/?code=…`).
pub fn parse_redirect(input: &str) -> Result<Redirect, String> {
    let input = input.trim();
    let url = if input.starts_with('/') {
        reqwest::Url::parse(&format!("http://localhost{input}"))
    } else {
        reqwest::Url::parse(input)
    }
    .map_err(|e| {
        format!("not a URL ({e}): paste the whole address from the browser's address bar")
    })?;
    let get = |key: &str| {
        url.query_pairs()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.into_owned())
    };
    if let Some(error) = get("error") {
        return Ok(Redirect::Error {
            error,
            description: get("error_description").unwrap_or_default(),
            state: get("state"),
        });
    }
    match (get("code"), get("state")) {
        (Some(code), Some(state)) => Ok(Redirect::Code { code, state }),
        _ => {
            Err("the address has no code and state: paste the address the sign-in ended on".into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pkce_challenge_is_s256_of_verifier() {
        let p = Pkce::new();
        assert_eq!(p.verifier.len(), 43);
        assert_eq!(
            p.challenge,
            B64URL.encode(Sha256::digest(p.verifier.as_bytes()))
        );
        // RFC 7636 appendix B.
        let v = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
        assert_eq!(
            B64URL.encode(Sha256::digest(v.as_bytes())),
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        );
    }

    #[test]
    fn google_asks_for_offline_access() {
        let account: AccountConfig = toml::from_str(
            "name = \"g\"\nprovider = \"google\"\nflow = \"authorization_code\"\nmailbox = \"m@example.org\"\nclient_id = \"cid\"",
        )
        .unwrap();
        let ep = super::super::endpoints(&account).unwrap();
        let pkce = Pkce::new();
        let url = authorization_url(&ep, &account, "http://127.0.0.1:5555/", &pkce, "st").unwrap();
        let url = reqwest::Url::parse(&url).unwrap();
        assert_eq!(url.host_str(), Some("accounts.google.com"));
        let q: std::collections::HashMap<_, _> = url.query_pairs().into_owned().collect();
        assert_eq!(q["access_type"], "offline");
        assert_eq!(q["prompt"], "consent");
        assert_eq!(q["login_hint"], "m@example.org");
        assert_eq!(q["scope"], "https://mail.google.com/");
        assert_eq!(q["code_challenge"], pkce.challenge);
        assert_eq!(q["redirect_uri"], "http://127.0.0.1:5555/");
    }

    #[test]
    fn redirects() {
        assert_eq!(
            parse_redirect("http://127.0.0.1:5000/?code=abc%2F1&state=xyz").unwrap(),
            Redirect::Code {
                code: "abc/1".into(),
                state: "xyz".into()
            }
        );
        assert_eq!(
            parse_redirect("/cb?state=s&code=c").unwrap(),
            Redirect::Code {
                code: "c".into(),
                state: "s".into()
            }
        );
        assert!(matches!(
            parse_redirect("http://127.0.0.1/?error=access_denied&error_description=no").unwrap(),
            Redirect::Error { error, .. } if error == "access_denied"
        ));
        assert!(parse_redirect("hello").is_err());
        assert!(parse_redirect("http://127.0.0.1/?code=c").is_err());
    }
}
