//! Token endpoint requests (RFC 6749 section 4.4 and 6, RFC 8628).
//!
//! Written over reqwest rather than with the oauth2 crate: each grant here is one form POST and one JSON reply,
//! and the crate's device flow expects `verification_uri` where Google sends `verification_url`, so we would
//! be working around it in the flow that most needs to be clear to users.

use std::time::{Duration, SystemTime};

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use super::OAuthError;

/// Tokens as the endpoint issued them.
#[derive(Debug, Clone)]
pub struct Grant {
    pub access_token: SecretString,
    pub expires_at: SystemTime,
    pub refresh_token: Option<SecretString>,
}

/// What `relay authorize` shows the user, and what it polls with.
#[derive(Debug, Clone)]
pub struct DeviceAuthorization {
    pub device_code: SecretString,
    pub user_code: String,
    pub verification_uri: String,
    pub expires_in: Duration,
    pub interval: Duration,
    pub message: Option<String>,
}

/// One step of device-code polling.
#[derive(Debug)]
pub enum DevicePoll {
    Granted(Grant),
    /// `authorization_pending`: ask again after the interval.
    Pending,
    /// `slow_down`: ask again, 5 seconds more apart (RFC 8628 section 3.5).
    SlowDown,
}

#[derive(Deserialize)]
struct TokenReply {
    access_token: String,
    expires_in: Option<u64>,
    refresh_token: Option<String>,
}

#[derive(Deserialize)]
struct ErrorReply {
    error: String,
    error_description: Option<String>,
}

#[derive(Deserialize)]
struct DeviceReply {
    device_code: String,
    user_code: String,
    // RFC 8628 says verification_uri; Google says verification_url.
    #[serde(alias = "verification_url")]
    verification_uri: String,
    expires_in: u64,
    interval: Option<u64>,
    message: Option<String>,
}

/// A client for one account's token endpoint.
#[derive(Clone)]
pub struct TokenClient {
    http: reqwest::Client,
    pub token_url: String,
    pub client_id: String,
    pub client_secret: Option<SecretString>,
    pub scope: String,
    /// Authenticates with a signed assertion (private_key_jwt) instead of a secret.
    pub certificate: Option<std::sync::Arc<super::assertion::ClientCertificate>>,
    /// Send the secret in an HTTP Basic header (client_secret_basic) rather than in the form.
    pub basic_auth: bool,
}

impl TokenClient {
    pub fn new(
        http: reqwest::Client,
        token_url: String,
        client_id: String,
        client_secret: Option<SecretString>,
        scope: String,
    ) -> Self {
        TokenClient {
            http,
            token_url,
            client_id,
            client_secret,
            scope,
            certificate: None,
            basic_auth: false,
        }
    }

    /// The client credentials grant (app-only).
    pub async fn client_credentials(&self) -> Result<Grant, OAuthError> {
        self.token(&[("grant_type", "client_credentials"), ("scope", &self.scope)])
            .await
    }

    /// The refresh token grant. Microsoft rotates refresh tokens: the grant may carry a new one.
    pub async fn refresh(&self, refresh_token: &SecretString) -> Result<Grant, OAuthError> {
        self.token(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh_token.expose_secret()),
            ("scope", &self.scope),
        ])
        .await
    }

    /// The authorization code grant, with the PKCE verifier (RFC 7636 section 4.5).
    pub async fn exchange_code(
        &self,
        code: &str,
        redirect_uri: &str,
        verifier: &str,
    ) -> Result<Grant, OAuthError> {
        self.token(&[
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", redirect_uri),
            ("code_verifier", verifier),
        ])
        .await
    }

    /// The resource owner password grant (RFC 6749 section 4.3). Breaks with MFA and Conditional Access.
    pub async fn password(
        &self,
        username: &str,
        password: &SecretString,
    ) -> Result<Grant, OAuthError> {
        self.token(&[
            ("grant_type", "password"),
            ("username", username),
            ("password", password.expose_secret()),
            ("scope", &self.scope),
        ])
        .await
    }

    /// The JWT bearer grant (RFC 7523 section 2.1): Google service accounts. No client authentication.
    pub async fn jwt_bearer(&self, assertion: &str) -> Result<Grant, OAuthError> {
        let form = [
            ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
            ("assertion", assertion),
        ];
        let before = SystemTime::now();
        let t: TokenReply = self.post(&self.token_url, &form).await?;
        Ok(grant(t, before))
    }

    /// Starts the device authorization grant.
    pub async fn device_start(&self, device_url: &str) -> Result<DeviceAuthorization, OAuthError> {
        let form = [
            ("client_id", self.client_id.as_str()),
            ("scope", &self.scope),
        ];
        let d: DeviceReply = self.post(device_url, &form).await?;
        Ok(DeviceAuthorization {
            device_code: SecretString::from(d.device_code),
            user_code: d.user_code,
            verification_uri: d.verification_uri,
            expires_in: Duration::from_secs(d.expires_in),
            interval: Duration::from_secs(d.interval.unwrap_or(5)),
            message: d.message,
        })
    }

    /// Asks once whether the user has approved the device code.
    pub async fn device_poll(
        &self,
        device: &DeviceAuthorization,
    ) -> Result<DevicePoll, OAuthError> {
        let result = self
            .token(&[
                ("grant_type", "urn:ietf:params:oauth:grant-type:device_code"),
                ("device_code", device.device_code.expose_secret()),
            ])
            .await;
        match result {
            Ok(grant) => Ok(DevicePoll::Granted(grant)),
            Err(OAuthError::Endpoint { error, .. }) if error == "authorization_pending" => {
                Ok(DevicePoll::Pending)
            }
            Err(OAuthError::Endpoint { error, .. }) if error == "slow_down" => {
                Ok(DevicePoll::SlowDown)
            }
            Err(e) => Err(e),
        }
    }

    /// One form POST; a JSON reply on success, the endpoint's OAuth error otherwise.
    async fn post<T: serde::de::DeserializeOwned>(
        &self,
        url: &str,
        form: &[(&str, &str)],
    ) -> Result<T, OAuthError> {
        let mut request = self.http.post(url).form(form);
        if self.basic_auth
            && url == self.token_url
            && let Some(secret) = &self.client_secret
        {
            // RFC 6749 section 2.3.1: both parts form-urlencoded before the Basic encoding.
            let enc = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
            request = request.basic_auth(enc(&self.client_id), Some(enc(secret.expose_secret())));
        }
        let reply = request.send().await?;
        let status = reply.status();
        let body = reply.bytes().await?;
        if !status.is_success() {
            return Err(endpoint_error(status.as_u16(), &body));
        }
        serde_json::from_slice(&body).map_err(|e| OAuthError::Malformed(e.to_string()))
    }

    async fn token(&self, params: &[(&str, &str)]) -> Result<Grant, OAuthError> {
        let mut form: Vec<(&str, &str)> = params.to_vec();
        form.push(("client_id", &self.client_id));
        let assertion;
        if let Some(cert) = &self.certificate {
            assertion = cert
                .assertion(&self.client_id, &self.token_url)
                .map_err(OAuthError::Signing)?;
            form.push((
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            ));
            form.push(("client_assertion", &assertion));
        } else if let Some(secret) = &self.client_secret
            && !self.basic_auth
        {
            form.push(("client_secret", secret.expose_secret()));
        }
        let before = SystemTime::now();
        let t: TokenReply = self.post(&self.token_url, &form).await?;
        Ok(grant(t, before))
    }
}

fn grant(t: TokenReply, before: SystemTime) -> Grant {
    Grant {
        access_token: SecretString::from(t.access_token),
        // Counted from before the request, so that a slow reply never makes a token look fresher than it is.
        expires_at: before + Duration::from_secs(t.expires_in.unwrap_or(3600)),
        refresh_token: t.refresh_token.map(SecretString::from),
    }
}

fn endpoint_error(status: u16, body: &[u8]) -> OAuthError {
    match serde_json::from_slice::<ErrorReply>(body) {
        Ok(e) => OAuthError::Endpoint {
            status,
            error: e.error,
            description: e.error_description.unwrap_or_default(),
        },
        Err(_) => OAuthError::Http {
            status,
            body: String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned(),
        },
    }
}
