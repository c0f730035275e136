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

#[derive(Debug, thiserror::Error)]
pub enum OAuthError {
    /// The endpoint answered with an OAuth error (RFC 6749 section 5.2).
    #[error("token endpoint said {error} (HTTP {status}): {description}")]
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

    /// What to do about it, where we know: the fixes sysadmins otherwise search the web for.
    pub fn hint(&self, token_url: &str) -> Option<&'static str> {
        let OAuthError::Endpoint {
            error, description, ..
        } = self
        else {
            return None;
        };
        if description.contains("AADSTS7000222") {
            return Some(
                "the client secret has expired: create a new secret in the app registration (Certificates & secrets), write it to client_secret_file and update client_secret_expires",
            );
        }
        if error == "invalid_client" && description.contains("AADSTS7000215") {
            return Some(
                "the client secret is wrong: copy the secret's Value (not its ID) into client_secret_file",
            );
        }
        if error == "invalid_grant" && token_url.contains("googleapis.com") {
            return Some(
                "if the app's OAuth consent screen is in \"Testing\" status, Google expires its refresh tokens after 7 days: publish the app (\"In production\") and run relay authorize again",
            );
        }
        None
    }

    /// The error with its hint, for logs, the token file and `relay status`.
    pub fn explained(&self, token_url: &str) -> String {
        match self.hint(token_url) {
            Some(h) => format!("{self}; fix: {h}"),
            None => self.to_string(),
        }
    }

    /// Worth retrying later: the network, or the endpoint's own trouble.
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
    fn hints_name_the_fix() {
        let expired = endpoint(
            "invalid_client",
            "AADSTS7000222: The provided client secret keys are expired.",
        );
        assert!(
            expired
                .explained("https://login.microsoftonline.com/t/oauth2/v2.0/token")
                .contains("create a new secret")
        );
        let google = endpoint("invalid_grant", "Token has been expired or revoked.");
        assert!(
            google
                .explained("https://oauth2.googleapis.com/token")
                .contains("Testing")
        );
        assert!(google.needs_authorization());
        assert_eq!(
            google.hint("https://login.microsoftonline.com/t/oauth2/v2.0/token"),
            None
        );
        assert!(!endpoint("invalid_client", "x").is_transient());
        // RFC 6749 section 4.1.2.1: these two say "later", whatever the HTTP status.
        assert!(endpoint("temporarily_unavailable", "x").is_transient());
        assert!(endpoint("server_error", "x").is_transient());
    }
}
