//! OAuth2: providers' endpoints (`provider`) and the grants relay uses (`client`).

pub mod assertion;
pub mod authcode;
pub mod client;
pub mod provider;

pub use client::{DeviceAuthorization, DevicePoll, Grant, TokenClient};
pub use provider::{Endpoints, endpoints};

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
    #[error("cannot reach the token endpoint: {0}")]
    Network(#[from] reqwest::Error),
    #[error("token endpoint reply not understood: {0}")]
    Malformed(String),
    #[error("{0}")]
    Signing(String),
}

impl OAuthError {
    /// The grant is dead: only a new `relay authorize` helps.
    pub fn needs_authorization(&self) -> bool {
        matches!(self, OAuthError::Endpoint { error, .. } if error == "invalid_grant")
    }

    /// Worth retrying later: the network, or the endpoint's own trouble.
    pub fn is_transient(&self) -> bool {
        match self {
            OAuthError::Network(_) => true,
            OAuthError::Http { status, .. } | OAuthError::Endpoint { status, .. } => {
                *status >= 500 || *status == 429
            }
            OAuthError::Malformed(_) | OAuthError::Signing(_) => false,
        }
    }
}
