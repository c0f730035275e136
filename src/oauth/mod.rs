//! OAuth2: providers' endpoints (`provider`) and the grants relay uses (`client`).

pub mod assertion;
pub mod authcode;
pub mod client;
pub mod expiry;
pub mod provider;
pub mod renewal;

pub use client::{DeviceAuthorization, DevicePoll, Grant, TokenClient};
pub use provider::{Endpoints, endpoints};
pub use renewal::{Renewal, RenewalError};

/// `: description`, or nothing when the endpoint gave none (`server_error` with an empty description).
fn described(description: &str) -> String {
    if description.is_empty() {
        String::new()
    } else {
        format!(": {description}")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OAuthError {
    /// The endpoint answered with an OAuth error (RFC 6749 section 5.2).
    #[error("token endpoint said {error} (HTTP {status}){}", described(.description))]
    Endpoint {
        status: u16,
        error: String,
        description: String,
    },
    #[error("token endpoint answered HTTP {status}: {body}")]
    Http { status: u16, body: String },
    /// Names the URL that was tried (the device-code endpoint is not the token endpoint) and every cause below
    /// reqwest's "error sending request": the DNS failure, the refused connection, the certificate.
    #[error("{}", unreachable(.0))]
    Network(#[from] reqwest::Error),
    #[error("token endpoint reply not understood: {0}")]
    Malformed(String),
    #[error("{0}")]
    Signing(String),
}

/// `cannot reach URL: client error (Connect): dns error: failed to lookup address information: …`.
fn unreachable(e: &reqwest::Error) -> String {
    let url = e.url().map_or("the token endpoint", |u| u.as_str());
    let mut causes = Vec::new();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        causes.push(c.to_string());
        cause = c.source();
    }
    if causes.is_empty() {
        causes.push(e.to_string());
    }
    format!("cannot reach {url}: {}", causes.join(": "))
}

impl OAuthError {
    /// The grant is dead: only a new `relay authorize` helps.
    pub fn needs_authorization(&self) -> bool {
        matches!(self, OAuthError::Endpoint { error, .. } if error == "invalid_grant")
    }

    /// The error with what it means and how to fix it, where the diagnosis table knows (`upstream::diagnosis`):
    /// for logs, the token file and `relay status`. `interactive`: the account's grant is one a person starts
    /// (`relay authorize`), so a dead grant is its refresh token's, not its credentials'. `rotation`: how the
    /// account's rewritten files reach the daemon, for the fix. `provider`: the account's, where known.
    pub fn explained(
        &self,
        account: &str,
        interactive: bool,
        rotation: &crate::config::Rotation,
        provider: Option<crate::config::Provider>,
    ) -> String {
        let text = self.to_string();
        match crate::upstream::diagnosis::for_grant(&text, Some(account), interactive, provider) {
            Some(d) => format!("{text}; {}", rotation.advise(&d)),
            None => text,
        }
    }

    /// Worth retrying later: the network, or the endpoint's own trouble.
    /// A reply that is not the endpoint's at all: a page in its place (a captive portal's 200 or redirect, a
    /// proxy's login page). While a person is signing in, that may pass (the device-code poll asks again).
    pub fn is_intercepted(&self) -> bool {
        match self {
            OAuthError::Malformed(_) => true,
            OAuthError::Http { status, .. } => *status < 400,
            _ => false,
        }
    }

    pub fn is_transient(&self) -> bool {
        match self {
            OAuthError::Network(_) => true,
            OAuthError::Endpoint { error, .. }
                if error == "temporarily_unavailable" || error == "server_error" =>
            {
                true
            }
            OAuthError::Http { status, .. } | OAuthError::Endpoint { status, .. } => {
                *status >= 500 || *status == 429
            }
            OAuthError::Malformed(_) | OAuthError::Signing(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(error: &str, description: &str) -> OAuthError {
        OAuthError::Endpoint {
            status: 400,
            error: error.into(),
            description: description.into(),
        }
    }

    #[test]
    fn an_error_without_a_description_has_no_empty_tail() {
        assert_eq!(
            endpoint("server_error", "").to_string(),
            "token endpoint said server_error (HTTP 400)"
        );
        assert_eq!(
            endpoint("invalid_grant", "AADSTS70000").to_string(),
            "token endpoint said invalid_grant (HTTP 400): AADSTS70000"
        );
    }

    #[test]
    fn errors_are_explained_with_their_fix() {
        let expired = endpoint(
            "invalid_client",
            "AADSTS7000222: The provided client secret keys are expired.",
        );
        assert!(
            expired
                .explained("office", true, &Default::default(), None)
                .contains("create a new secret")
        );
        let google = endpoint("invalid_grant", "Token has been expired or revoked.");
        assert!(
            google
                .explained("office", true, &Default::default(), None)
                .contains("Testing")
        );
        assert!(google.needs_authorization());
        assert!(
            endpoint("invalid_grant", "gone")
                .explained("office", true, &Default::default(), None)
                .contains("relay authorize office")
        );
        assert_eq!(
            endpoint("invalid_scope", "x").explained("office", true, &Default::default(), None),
            endpoint("invalid_scope", "x").to_string()
        );
        assert!(!endpoint("invalid_client", "x").is_transient());
        // RFC 6749 section 4.1.2.1: these two say "later", whatever the HTTP status.
        assert!(endpoint("temporarily_unavailable", "x").is_transient());
        assert!(endpoint("server_error", "x").is_transient());
    }
}
