//! How an account gets a new token without a person: the one place where the grant is chosen from the flow.
//! The daemon's token manager renews through this, and `relay authorize` checks the non-interactive flows
//! through it too; only the interactive flows (device code, authorization code) start their grant elsewhere.

use secrecy::SecretString;

use super::assertion::ServiceAccount;
use super::{Grant, OAuthError, TokenClient};
use crate::config::{AccountConfig, Flow};

pub enum Renewal {
    /// Device code and authorization code: the refresh token that `relay authorize` obtained.
    RefreshToken,
    /// Client credentials (a secret or a certificate): asked for again each time.
    ClientCredentials,
    /// A Google service account acting as the mailbox (JWT bearer grant).
    ServiceAccount {
        key: ServiceAccount,
        mailbox: String,
    },
    /// The resource owner password grant, repeated (a refresh token would only add a second secret to keep).
    Password {
        user: String,
        password: SecretString,
    },
}

impl std::fmt::Debug for Renewal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Renewal::RefreshToken => "RefreshToken",
            Renewal::ClientCredentials => "ClientCredentials",
            Renewal::ServiceAccount { .. } => "ServiceAccount",
            Renewal::Password { .. } => "Password",
        })
    }
}

/// Why no token could be had.
#[derive(Debug, thiserror::Error)]
pub enum RenewalError {
    /// Nothing to renew with: `relay authorize` must run first.
    #[error("no grant to renew")]
    NoGrant,
    #[error(transparent)]
    OAuth(#[from] OAuthError),
}

impl Renewal {
    /// Reads whatever the account's flow needs (key file, password file) once, at start.
    /// A problem names its key (`service_account_file`) and says why.
    pub fn for_account(a: &AccountConfig) -> Result<Renewal, (&'static str, String)> {
        Ok(match a.flow {
            Flow::DeviceCode | Flow::AuthorizationCode => Renewal::RefreshToken,
            Flow::ClientCredentials => Renewal::ClientCredentials,
            Flow::ServiceAccount => {
                let key = "service_account_file";
                let path = a
                    .service_account_file
                    .as_ref()
                    .ok_or((key, "required for flow = \"service_account\"".to_string()))?;
                Renewal::ServiceAccount {
                    key: ServiceAccount::load(path).map_err(|r| (key, r))?,
                    mailbox: a.mailbox.clone(),
                }
            }
            Flow::Password => {
                let (user, password) = crate::accounts::password(a)?;
                Renewal::Password { user, password }
            }
        })
    }

    /// Whether a person must start the grant (`relay authorize`) before this can renew it.
    pub fn is_interactive(&self) -> bool {
        matches!(self, Renewal::RefreshToken)
    }

    /// A new grant. `refresh` is the stored refresh token, for the flows that use one.
    pub async fn obtain(
        &self,
        client: &TokenClient,
        refresh: Option<&SecretString>,
    ) -> Result<Grant, RenewalError> {
        Ok(match self {
            Renewal::RefreshToken => {
                client
                    .refresh(refresh.ok_or(RenewalError::NoGrant)?)
                    .await?
            }
            Renewal::ClientCredentials => client.client_credentials().await?,
            Renewal::ServiceAccount { key, mailbox } => {
                let jwt = key
                    .assertion(mailbox, &client.scope, &client.token_url)
                    .map_err(OAuthError::Signing)?;
                client.jwt_bearer(&jwt).await?
            }
            Renewal::Password { user, password } => client.password(user, password).await?,
        })
    }
}
