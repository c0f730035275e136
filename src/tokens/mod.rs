//! An account's tokens in the daemon: fresh when asked for, renewed ahead of expiry, kept alive when idle.
//!
//! One [`AccountTokens`] per account. Its lock is held across a refresh, so there is one refresh in flight per
//! account whoever asks (the refresher, a delivery, a delivery that just got 535); a lock file in `tokens/` does
//! the same between processes (`relay test` while the daemon runs). The token file is reread when it changes, so
//! a `relay authorize` run while the daemon runs takes effect at once.

pub mod seal;
pub mod store;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use secrecy::SecretString;
use tokio::sync::Mutex;

use crate::oauth::{OAuthError, Renewal, RenewalError, TokenClient};
use crate::upstream::diagnosis::Diagnosed;
pub use store::{StoreError, StoredTokens, TokenStore};

/// Renew once the smaller of this and a quarter of the token's lifetime remains.
const RENEW_AHEAD: Duration = Duration::from_secs(600);
/// After a transient refresh failure (network, 5xx), wait this long, doubling up to 10 minutes.
const FIRST_BACKOFF: Duration = Duration::from_secs(5);
/// Use the refresh token at least this often: Microsoft's die after 90 days unused, Google's "Testing" ones in 7.
pub const KEEP_ALIVE: Duration = Duration::from_secs(86_400);

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("account {0} needs authorization: run `relay authorize {0}`")]
    NeedsAuthorization(String),
    #[error("account {account}: {explained}")]
    OAuth {
        account: String,
        source: OAuthError,
        /// The error with its fix, where one is known (`OAuthError::explained`).
        explained: String,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    /// relay is stopping (or a reload replaced the account): no renewal begins that could be cut off before its
    /// answer is saved.
    #[error("account {0}: relay is stopping; the token is renewed after it starts again")]
    Stopping(String),
    /// The last renewal failed moments ago, with these words: not asked again for every message.
    #[error("{0} ({RECENTLY_FAILED})")]
    RecentlyFailed(String),
    /// The refresher's renewal this delivery waited for failed, with these words (and whether mail waits on it).
    #[error("{why}")]
    Waited { why: String, transient: bool },
}

/// How [`TokenError::RecentlyFailed`] ends: delivery logs such a deferral at debug level only, since the failure
/// it repeats was logged once (a token endpoint down for minutes otherwise logged a deferral per queued message at
/// each retry step, thousands a minute).
pub const RECENTLY_FAILED: &str =
    "renewal failed moments ago; asked again within 30 s, not for every message";

impl TokenError {
    /// Mail waits (never bounces) on these: they may clear up by themselves or by `relay authorize`.
    pub fn is_transient(&self) -> bool {
        match self {
            TokenError::NeedsAuthorization(_) => true,
            TokenError::OAuth { source, .. } => {
                source.is_transient() || source.needs_authorization()
            }
            TokenError::Store(_) | TokenError::RecentlyFailed(_) | TokenError::Stopping(_) => true,
            TokenError::Waited { transient, .. } => *transient,
        }
    }
}

pub struct AccountTokens {
    pub name: String,
    renewal: Renewal,
    client: TokenClient,
    store: TokenStore,
    /// In an Arc so that a reload's copy of an unsaved grant can hold it from a task (see `copy_unsaved_from`).
    state: Arc<Mutex<State>>,
    /// A token for another resource (Graph, when it is the fallback): in memory only, renewed from the same
    /// grant when needed.
    scoped: Mutex<Option<(String, SecretString, SystemTime)>>,
    /// When the last request for a `scoped` token failed, and its words: as `failed`, for Graph's tokens (each
    /// message of an account switched to Graph asked again, with `flow = "password"` a failed sign-in each).
    scoped_failed: std::sync::Mutex<Option<(std::time::Instant, String)>>,
    /// When the last renewal a delivery asked for failed, and its words (see [`RENEW_RETRY`]). Apart from
    /// `state`, so that `relay queue retry` can end the wait without waiting for a renewal in flight.
    failed: std::sync::Mutex<Option<(std::time::Instant, String)>>,
    /// Since when renewals have failed with none succeeding since; and once one succeeds after that, since when
    /// they had failed, until delivery takes it ([`AccountTokens::take_came_back`]).
    trouble: std::sync::Mutex<(Option<std::time::Instant>, Option<std::time::Instant>)>,
    /// How its rewritten files reach the daemon, for the fix advice on a refused grant.
    rotation: crate::config::Rotation,
    /// For the diagnosis of a token endpoint's refusal (Google's words are not another provider's).
    provider: Option<crate::config::Provider>,
    /// Set when the account's refresher stops (relay stops, or a reload replaced the account).
    stopping: std::sync::atomic::AtomicBool,
    /// Told when a delivery replaced the token out of turn (the upstream refused it): the refresher's wait was
    /// computed from the old one, which may have lasted longer.
    replaced: tokio::sync::Notify,
    /// The access token as last seen under `state`'s lock, and its expiry: what deliveries take while a renewal
    /// holds the lock (see [`AccountTokens::access_token`]).
    in_hand: std::sync::Mutex<Option<(SecretString, SystemTime)>>,
    /// The last token an upstream refused: never put in hand again (a look at the tokens before its replacement
    /// is fetched would otherwise hand it out once more).
    refused: std::sync::Mutex<Option<SecretString>>,
    /// A refresher task renews this account's token on its own schedule (the daemon's; not `relay test`): a
    /// delivery then leaves a renewal it does not need yet to it.
    followed: std::sync::atomic::AtomicBool,
    /// How the refresher's last renewal failed (when, its words, whether mail waits on it), until a delivery
    /// takes it (see [`AccountTokens::refresher_failure`]).
    refresher_failed: std::sync::Mutex<Option<(std::time::Instant, String, bool)>>,
}

#[derive(Default)]
struct State {
    tokens: Option<StoredTokens>,
    file_mtime: Option<SystemTime>,
    /// Hash of the file as last read or written: a refresh never replaces a file that changed meanwhile.
    file_hash: Option<blake3::Hash>,
    /// `tokens` are newer than the file, which could not be written: a provider that rotates refresh tokens may
    /// already have invalidated the one in the file, so these are kept (and used) until they can be saved.
    unsaved: bool,
    /// The file could not be read, and that was said: once per spell, not at every delivery.
    unreadable_said: bool,
    /// A grant without a refresh token was said to be unrenewable: once while its access token lasts.
    no_refresh_said: bool,
}

/// After a failed renewal, how long deliveries take its answer instead of asking the endpoint again. Each
/// attempt used to ask: an endpoint that hangs made every message wait its timeout (30 s) in turn, behind the
/// account's lock, and with `flow = "password"` each ask is a failed sign-in that an ADFS lockout policy counts.
/// The refresher keeps trying on its own schedule; `relay authorize` writes a file that is taken at once.
const RENEW_RETRY: Duration = Duration::from_secs(30);
/// How long the token in hand must still be good for a delivery to take it while a renewal holds the tokens:
/// time for a delivery to connect and log in with it.
const IN_HAND_MARGIN: Duration = Duration::from_secs(60);
/// The longest the refresher sleeps before it looks at the account's renewal time again.
const DUE_RECHECK: Duration = Duration::from_secs(60);
/// How long a renewal waits for another process's renewal of the same grant: longer than that one's token
/// request may take (30 s), with room for its save.
const RENEWAL_WAIT: Duration = Duration::from_secs(60);
/// How long a stopping refresher lets a renewal under way finish: a token request's timeout (30 s), within the
/// daemon's drain (30 s), which aborts what is left.
const RENEWAL_FINISH: Duration = Duration::from_secs(30);

impl AccountTokens {
    pub fn new(
        name: String,
        renewal: Renewal,
        client: TokenClient,
        store: TokenStore,
    ) -> AccountTokens {
        AccountTokens {
            name,
            renewal,
            client,
            store,
            state: Arc::new(Mutex::new(State::default())),
            scoped: Mutex::new(None),
            failed: std::sync::Mutex::new(None),
            scoped_failed: std::sync::Mutex::new(None),
            trouble: std::sync::Mutex::new((None, None)),
            rotation: crate::config::Rotation::default(),
            provider: None,
            stopping: std::sync::atomic::AtomicBool::new(false),
            replaced: tokio::sync::Notify::new(),
            in_hand: std::sync::Mutex::new(None),
            refused: std::sync::Mutex::new(None),
            followed: std::sync::atomic::AtomicBool::new(false),
            refresher_failed: std::sync::Mutex::new(None),
        }
    }

    /// Whose files are as `rotation` says (see [`crate::config::rotation`]).
    pub fn with_rotation(mut self, rotation: crate::config::Rotation) -> AccountTokens {
        self.rotation = rotation;
        self
    }

    /// Whose token endpoint this is, for the diagnosis of its refusals.
    pub fn with_provider(mut self, provider: crate::config::Provider) -> AccountTokens {
        self.provider = Some(provider);
        self
    }

    pub fn provider(&self) -> Option<crate::config::Provider> {
        self.provider
    }

    /// A token endpoint's refusal with the table's diagnosis, fitted to this account.
    fn explain(&self, e: &crate::oauth::OAuthError) -> String {
        e.explained(
            &self.name,
            self.renewal.is_interactive(),
            &self.rotation,
            self.provider,
        )
    }

    pub fn rotation(&self) -> &crate::config::Rotation {
        &self.rotation
    }

    /// A valid access token, refreshed first if it is close to expiry.
    ///
    /// While another holds the tokens (a renewal under way, the refresher's or another delivery's, whose request
    /// may take its whole timeout against a token endpoint that hangs), the token in hand is taken as long as it
    /// has [`IN_HAND_MARGIN`] left: mail is not held up behind a renewal it does not need yet.
    pub async fn access_token(&self) -> Result<SecretString, TokenError> {
        let mut state = match self.state.try_lock() {
            Ok(state) => state,
            Err(_) => match self.in_hand() {
                Some(token) => return Ok(token),
                None => self.state.lock().await,
            },
        };
        let token = self.access_token_locked(&mut state).await;
        self.keep_in_hand(&state);
        token
    }

    fn in_hand(&self) -> Option<SecretString> {
        let in_hand = self.in_hand.lock().unwrap_or_else(|p| p.into_inner());
        in_hand
            .as_ref()
            .filter(|(_, expires)| SystemTime::now() + IN_HAND_MARGIN < *expires)
            .map(|(token, _)| token.clone())
    }

    /// Notes the token `state` holds, for deliveries that come while a renewal holds the lock.
    fn keep_in_hand(&self, state: &State) {
        use secrecy::ExposeSecret;
        let refused = self.refused.lock().unwrap_or_else(|p| p.into_inner());
        *self.in_hand.lock().unwrap_or_else(|p| p.into_inner()) = state
            .tokens
            .as_ref()
            .filter(|t| !t.needs_authorization)
            .filter(|t| {
                refused
                    .as_ref()
                    .is_none_or(|r| r.expose_secret() != t.access_token.expose_secret())
            })
            .map(|t| (t.access_token.clone(), t.expires_at));
    }

    async fn access_token_locked(&self, state: &mut State) -> Result<SecretString, TokenError> {
        self.reload_if_changed(state)?;
        if let Some(t) = &state.tokens
            && !t.needs_authorization
            && SystemTime::now() < renew_at(t)
        {
            return Ok(t.access_token.clone());
        }
        // In the renewal window with time left: the refresher renews it (at its due time, within a minute), and
        // a message is not made to wait on the token endpoint for a token it does not need yet.
        if let Some(t) = &state.tokens
            && !t.needs_authorization
            && SystemTime::now() + IN_HAND_MARGIN < t.expires_at
            && self.followed.load(std::sync::atomic::Ordering::Relaxed)
            && !self.stopping.load(std::sync::atomic::Ordering::Relaxed)
        {
            return Ok(t.access_token.clone());
        }
        let usable = state
            .tokens
            .as_ref()
            .filter(|t| !t.needs_authorization && SystemTime::now() < t.expires_at)
            .map(|t| t.access_token.clone());
        if usable.is_none()
            && let Some(failed) = self.refresher_failure()
        {
            return Err(failed);
        }
        if let Some(why) = self.recent_failure() {
            return usable.ok_or(TokenError::RecentlyFailed(why));
        }
        let renewed = self.refresh_locked(state).await;
        self.note_renewal(&renewed);
        match renewed {
            // The renewal window opens well before expiry: while the old token is still good, a failed renewal
            // need not hold up mail, whatever the failure (the endpoint down, a proxy's page, a reply not
            // understood, a refused client secret: the token already issued stays valid till it expires). Only
            // a dead grant stops it: `invalid_grant` for a person's grant, which `refresh_locked` has marked.
            // (A grant without a refresh token cannot be renewed either, but its token is good until it expires:
            // `cannot_renew` marks it only then.)
            Err(e)
                if !matches!(e, TokenError::NeedsAuthorization(_))
                    || state
                        .tokens
                        .as_ref()
                        .is_some_and(|t| !t.needs_authorization) =>
            {
                match &state.tokens {
                    Some(t) if !t.needs_authorization && SystemTime::now() < t.expires_at => {
                        Ok(t.access_token.clone())
                    }
                    _ => Err(e),
                }
            }
            other => other,
        }
    }

    /// Follows renewals that fail and the first that works again (see `trouble`).
    fn renewal_went(&self, ok: bool) {
        let mut t = self.trouble.lock().unwrap_or_else(|p| p.into_inner());
        if !ok {
            t.0.get_or_insert_with(std::time::Instant::now);
        } else if let Some(since) = t.0.take() {
            t.1 = Some(t.1.map_or(since, |c| c.min(since)));
        }
    }

    /// Since when renewals had failed, once one works again (once): the mail deferred meanwhile for want of a
    /// token goes now, not at its next retry step (hours later after a long outage of the token endpoint).
    pub fn take_came_back(&self) -> Option<std::time::Instant> {
        self.trouble
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .1
            .take()
    }

    /// The words of a renewal that failed less than [`RENEW_RETRY`] ago, to be taken instead of asking again.
    fn recent_failure(&self) -> Option<String> {
        self.failed_lock()
            .as_ref()
            .filter(|(at, _)| at.elapsed() < RENEW_RETRY)
            .map(|(_, why)| why.clone())
    }

    /// Keeps the refresher's last renewal's failure for the next delivery that needs a token (cleared when it
    /// worked).
    fn note_refresher<T>(&self, renewed: &Result<T, TokenError>) {
        *self
            .refresher_failed
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = match renewed {
            Err(e) if !matches!(e, TokenError::NeedsAuthorization(_)) => {
                Some((std::time::Instant::now(), e.to_string(), e.is_transient()))
            }
            _ => None,
        };
    }

    /// The refresher's renewal that failed less than [`RENEW_RETRY`] ago, taken by the first delivery that needs a
    /// token: that delivery says it in full, and the deliveries after it meet it as their own recent failure (a
    /// debug line each). Asking again at once would hold them for a second timeout of an endpoint that hangs, and
    /// with `flow = "password"` be one more failed sign-in.
    fn refresher_failure(&self) -> Option<TokenError> {
        let (at, why, transient) = self
            .refresher_failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .filter(|(at, _, _)| at.elapsed() < RENEW_RETRY)?;
        *self.failed_lock() = Some((at, why.clone()));
        Some(TokenError::Waited { why, transient })
    }

    /// Remembers how a renewal that deliveries asked for went (see [`RENEW_RETRY`]); a dead grant is not
    /// remembered here: it is marked in the tokens themselves.
    fn note_renewal<T>(&self, renewed: &Result<T, TokenError>) {
        *self.failed_lock() = match renewed {
            Err(e) if !matches!(e, TokenError::NeedsAuthorization(_)) => {
                Some((std::time::Instant::now(), e.to_string()))
            }
            _ => None,
        };
    }

    fn failed_lock(&self) -> std::sync::MutexGuard<'_, Option<(std::time::Instant, String)>> {
        self.failed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// `relay queue retry` (or `relay authorize`): the sysadmin says the cause may be gone, so the next delivery
    /// asks the token endpoint again at once. Whether a failed renewal was being answered from.
    pub fn forget_failed_renewal(&self) -> bool {
        self.failed_lock()
            .take()
            .is_some_and(|(at, _)| at.elapsed() < RENEW_RETRY)
    }

    /// A new access token now, whatever the old one's expiry.
    pub async fn force_refresh(&self) -> Result<SecretString, TokenError> {
        let mut state = self.state.lock().await;
        self.reload_if_changed(&mut state)?;
        let renewed = self.refresh_locked(&mut state).await;
        self.note_refresher(&renewed);
        self.keep_in_hand(&state);
        renewed
    }

    /// A token to try instead of `refused`, which the upstream refused at `refused_at` (535), and whether it was
    /// fetched for this call: one obtained since the refusal (by another attempt refused at the same time, or a
    /// `relay authorize`) if there is one, else a new one. The account's attempts refused together then share
    /// one refresh. A token obtained before the refusal is no replacement, even if it differs: an upstream that
    /// revokes every token issued before an event (a password change) refuses it too.
    pub async fn replace_refused(
        &self,
        refused: &SecretString,
        refused_at: SystemTime,
    ) -> Result<(SecretString, bool), TokenError> {
        use secrecy::ExposeSecret;
        // Not handed to deliveries again while its replacement is fetched.
        {
            *self.refused.lock().unwrap_or_else(|p| p.into_inner()) = Some(refused.clone());
            let mut in_hand = self.in_hand.lock().unwrap_or_else(|p| p.into_inner());
            if in_hand
                .as_ref()
                .is_some_and(|(t, _)| t.expose_secret() == refused.expose_secret())
            {
                *in_hand = None;
            }
        }
        let mut state = self.state.lock().await;
        self.reload_if_changed(&mut state)?;
        if let Some(t) = &state.tokens
            && !t.needs_authorization
            && t.access_token.expose_secret() != refused.expose_secret()
            && t.obtained_at >= refused_at
            && SystemTime::now() < t.expires_at
        {
            return Ok((t.access_token.clone(), false));
        }
        // A renewal failed moments ago (the token endpoint refuses the client's secret, say): each refused
        // message would otherwise ask again, and with `flow = "password"` each ask is a failed sign-in.
        if let Some(why) = self.recent_failure() {
            return Err(TokenError::RecentlyFailed(why));
        }
        let renewed = self.refresh_locked(&mut state).await;
        self.note_renewal(&renewed);
        if renewed.is_ok() {
            self.replaced.notify_one();
        }
        renewed.map(|t| (t, true))
    }

    /// A token for `scope` from the account's grant (the stored refresh token, or the client's credentials),
    /// kept in memory only. Microsoft lets one refresh token mint tokens for every resource the grant consented
    /// to, so an SMTP account can also send through Graph without a second `relay authorize`.
    pub async fn scoped_token(&self, scope: &str, fresh: bool) -> Result<SecretString, TokenError> {
        let mut cache = self.scoped.lock().await;
        if !fresh
            && let Some((s, token, expires)) = &*cache
            && s == scope
            && SystemTime::now() + RENEW_AHEAD / 10 < *expires
        {
            return Ok(token.clone());
        }
        let scoped_failed = || self.scoped_failed.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((at, why)) = &*scoped_failed()
            && at.elapsed() < RENEW_RETRY
        {
            return Err(TokenError::RecentlyFailed(why.clone()));
        }
        let refresh = {
            let mut state = self.state.lock().await;
            self.reload_if_changed(&mut state)?;
            state.tokens.as_ref().and_then(|t| t.refresh_token.clone())
        };
        let mut client = self.client.clone();
        client.scope = scope.to_string();
        let grant = match self.renewal.obtain(&client, refresh.as_ref()).await {
            Ok(g) => g,
            Err(RenewalError::NoGrant) => {
                return Err(TokenError::NeedsAuthorization(self.name.clone()));
            }
            Err(RenewalError::OAuth(e)) => {
                let failed = TokenError::OAuth {
                    account: self.name.clone(),
                    explained: self.explain(&e),
                    source: e,
                };
                *scoped_failed() = Some((std::time::Instant::now(), failed.to_string()));
                return Err(failed);
            }
        };
        *scoped_failed() = None;
        *cache = Some((
            scope.to_string(),
            grant.access_token.clone(),
            grant.expires_at,
        ));
        Ok(grant.access_token)
    }

    /// When the refresher should next act for this account.
    pub async fn next_due(&self) -> Result<SystemTime, TokenError> {
        let mut state = self.state.lock().await;
        self.reload_if_changed(&mut state)?;
        self.keep_in_hand(&state);
        Ok(match &state.tokens {
            None => SystemTime::now(),
            Some(t) if t.needs_authorization => SystemTime::now() + Duration::from_secs(60),
            Some(t) => due_at(t),
        })
    }

    /// Whether a renewal is still due now: after the refresher's sleep, a grant stored meanwhile (`relay authorize`)
    /// has its own time, and is not renewed at the old one's. A grant that needs a person, or none, is as before.
    pub async fn still_due(&self) -> bool {
        let mut state = self.state.lock().await;
        if self.reload_if_changed(&mut state).is_err() {
            return true;
        }
        match &state.tokens {
            Some(t) if !t.needs_authorization => due_at(t) <= SystemTime::now(),
            _ => true,
        }
    }

    fn reload_if_changed(&self, state: &mut State) -> Result<(), TokenError> {
        let mtime = self.store.mtime(&self.name);
        if state.unsaved {
            if mtime != state.file_mtime {
                self.reload_over_unsaved(state, mtime);
            }
            return Ok(());
        }
        if mtime != state.file_mtime || state.tokens.is_none() {
            let was_revoked = state.tokens.as_ref().is_some_and(|t| t.needs_authorization);
            (state.tokens, state.file_hash) = match self.store.load_hashed(&self.name) {
                Ok(loaded) => {
                    state.file_mtime = mtime;
                    state.unreadable_said = false;
                    state.no_refresh_said = false;
                    loaded
                }
                // A grant that needs no person (client credentials, a service account, a password) is obtained
                // again: a damaged file would otherwise hold the account's mail until someone replaced it. An
                // interactive grant's refresh token cannot be had again that way; its file stays for a person.
                Err(StoreError::Corrupt { path, reason }) if !self.renewal.is_interactive() => {
                    match self.store.set_aside(&self.name)? {
                        Some(aside) => {
                            tracing::warn!(relay_account = %self.name, file = %path.display(), %reason, kept_as = %aside.display(), "the token file is damaged; it is set aside and a new token is obtained");
                            state.file_mtime = None;
                            (None, None)
                        }
                        // Replaced meanwhile: read what is there now.
                        None => {
                            state.file_mtime = mtime;
                            self.store.load_hashed(&self.name)?
                        }
                    }
                }
                Err(e) => return self.keep_over_unreadable(state, e),
            };
            // `relay authorize` stored a new grant: said, and the incident it was for closed now, not at the
            // next renewal (up to an hour away).
            if was_revoked
                && state
                    .tokens
                    .as_ref()
                    .is_some_and(|t| !t.needs_authorization)
            {
                tracing::info!(relay_event = "token_refreshed", relay_account = %self.name, "a new grant was stored (relay authorize): the account's mail goes again");
                crate::events::emit(crate::events::Event::TokenRefreshed {
                    account: &self.name,
                });
            }
        }
        Ok(())
    }

    /// The token file changed and cannot be read (a permission or owner changed, a bad edit, a disk error, a
    /// file written with another token key) while memory holds the grant: the grant is kept and used. Its token is
    /// still good and its refresh token the live one; failing instead would hold the account's mail until someone
    /// mended a file whose grant relay already has. (A file that is gone is different: removing it is how a grant is
    /// taken away, and it is honoured.) A damaged file, whose bytes cannot be tokens, is set aside for a look and
    /// the grant written back, so that a restart finds it; one that cannot be read is left to the person who
    /// changed it, and read again at each use.
    fn keep_over_unreadable(&self, state: &mut State, e: StoreError) -> Result<(), TokenError> {
        if state.tokens.as_ref().is_none_or(|t| t.needs_authorization) {
            return Err(e.into());
        }
        let path = self.store.path(&self.name);
        if let StoreError::Corrupt { reason, .. } = &e {
            match self.store.set_aside(&self.name) {
                Ok(Some(aside)) => {
                    state.file_hash = None;
                    state.file_mtime = None;
                    state.unreadable_said = false;
                    let saved = match state.tokens.clone() {
                        Some(tokens) => self
                            .store
                            .save_if_unchanged(&self.name, &tokens, None)
                            .map(|h| h.map(|h| (tokens, h))),
                        None => Ok(None),
                    };
                    tracing::warn!(relay_account = %self.name, file = %path.display(), %reason, kept_as = %aside.display(), "the token file is damaged; it is set aside and the grant relay holds in memory is written back");
                    match saved {
                        Ok(Some((tokens, hash))) => self.saved(state, tokens, hash),
                        // Another process wrote a grant meanwhile: read at the next use.
                        Ok(None) => {}
                        Err(e) => {
                            state.unsaved = true;
                            self.unsaved_after_refresh(&e);
                        }
                    }
                    return Ok(());
                }
                // Replaced meanwhile: read at the next use.
                Ok(None) => return Ok(()),
                // Cannot be renamed (a read-only directory): kept in memory all the same, as below.
                Err(_) => {}
            }
        }
        if !state.unreadable_said {
            tracing::warn!(relay_account = %self.name, file = %path.display(), error = %e, "the token file cannot be read; the grant relay holds in memory is used until it can be, or until `relay authorize` stores a new one");
            state.unreadable_said = true;
        }
        Ok(())
    }

    /// The file changed while memory holds tokens it could not be written with. Only a grant stored since
    /// (`relay authorize`) replaces them: a file that is gone, damaged or unreadable does not, and one that is gone
    /// is written anew at the next save.
    fn reload_over_unsaved(&self, state: &mut State, mtime: Option<SystemTime>) {
        match self.store.load_hashed(&self.name) {
            // A failure record written meanwhile (`relay test` renewing with the file's older grant, which a
            // provider rotating strictly refuses) holds nothing live: the unsaved grant stays, and is saved over it.
            Ok((Some(tokens), hash))
                if hash != state.file_hash
                    && (tokens.needs_authorization || tokens.last_error.is_some()) =>
            {
                tracing::warn!(relay_account = %self.name, file = %self.store.path(&self.name).display(), "the token file was rewritten with a failed renewal; the newer grant in memory, not yet saved, is kept and will be saved over it");
                state.file_hash = hash;
                state.file_mtime = mtime;
            }
            Ok((Some(tokens), hash)) if hash != state.file_hash => {
                tracing::info!(relay_account = %self.name, file = %self.store.path(&self.name).display(), "the token file was replaced; its grant is used instead of the unsaved one");
                self.store.clear_unsaved(&self.name);
                state.tokens = Some(tokens);
                state.file_hash = hash;
                state.file_mtime = mtime;
                state.unsaved = false;
            }
            Ok((Some(_), _)) => state.file_mtime = mtime,
            Ok((None, _)) => {
                state.file_hash = None;
                state.file_mtime = mtime;
            }
            Err(_) => {}
        }
    }

    /// Takes on the tokens that `old` (this account before a reload rebuilt it) could not save, so that the
    /// rebuilt account does not go back to the file's older grant. `old` keeps them too, for the attempts that
    /// still run on it. Called before the rebuilt account is used: its state is taken first, so that nothing on it
    /// (its refresher, a delivery) renews before the copy. A renewal in flight on `old` may hold it for up to a
    /// minute and a half (its wait for another process's renewal, then its own request): the reload, which runs
    /// on the daemon's main loop, does not wait for that; a task makes the copy when the renewal ends, and the
    /// rebuilt account waits for it.
    pub async fn copy_unsaved_from(&self, old: &Arc<AccountTokens>) {
        const PATIENCE: Duration = Duration::from_millis(200);
        let mut to = self.state.clone().lock_owned().await;
        match tokio::time::timeout(PATIENCE, old.state.lock()).await {
            Ok(from) => take_unsaved(&mut to, &from),
            Err(_) => {
                let old = old.clone();
                tokio::spawn(async move {
                    let from = old.state.lock().await;
                    take_unsaved(&mut to, &from);
                });
            }
        }
    }

    /// A rebuilt account (a reload) takes over the old one's failing renewals: once its own first renewal works
    /// (a secret rewritten, then `systemctl reload`), the mail deferred meanwhile goes at once, as when the
    /// endpoint comes back by itself ([`take_came_back`](Self::take_came_back)), not at its next retry step.
    pub fn carry_trouble_from(&self, old: &AccountTokens) {
        let old = *old.trouble.lock().unwrap_or_else(|p| p.into_inner());
        let mut t = self.trouble.lock().unwrap_or_else(|p| p.into_inner());
        let earliest = |a: Option<std::time::Instant>, b: Option<std::time::Instant>| match (a, b) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        // Still failing, and came back but not yet taken by delivery: each carried as it was.
        t.0 = earliest(t.0, old.0);
        t.1 = earliest(t.1, old.1);
    }

    /// Whether the account holds tokens that could not be saved yet.
    pub async fn has_unsaved(&self) -> bool {
        self.state.lock().await.unsaved
    }

    /// Tries again to save tokens that could not be saved when they were obtained. Returns whether some are still
    /// unsaved.
    pub async fn save_unsaved(&self) -> bool {
        let mut state = self.state.lock().await;
        self.reload_if_changed(&mut state).ok();
        if !state.unsaved {
            return false;
        }
        let Some(tokens) = state.tokens.clone() else {
            state.unsaved = false;
            return false;
        };
        match self
            .store
            .save_if_unchanged(&self.name, &tokens, state.file_hash)
        {
            Ok(Some(hash)) => {
                self.saved(&mut state, tokens, hash);
                tracing::info!(relay_event = "token_refreshed", relay_account = %self.name, file = %self.store.path(&self.name).display(), "the renewed tokens are saved now");
                crate::events::emit(crate::events::Event::TokenRefreshed {
                    account: &self.name,
                });
                false
            }
            Ok(None) => {
                tracing::warn!(relay_account = %self.name, file = %self.store.path(&self.name).display(), "the token file changed and cannot be read as tokens; it is left as it is, and the renewed tokens stay in memory only");
                true
            }
            Err(e) => {
                self.unsaved_after_refresh(&e);
                true
            }
        }
    }

    /// A person's grant that came without a refresh token (a `scope` without `offline_access`) cannot be
    /// renewed: said once while its access token lasts; once that has run out the account needs authorizing,
    /// marked and said as a revoked grant is (the file, `authorization_needed`, the alert), not left to look `ok`.
    fn cannot_renew(&self, state: &mut State, previous: Option<&StoredTokens>) {
        let Some(t) = previous.filter(|t| !t.needs_authorization) else {
            return;
        };
        let fix = format!(
            "the grant has no refresh token (the provider gave none: most often the scope lacks offline_access), so relay cannot renew it; run `relay authorize {}`",
            self.name
        );
        if SystemTime::now() < t.expires_at {
            if !std::mem::replace(&mut state.no_refresh_said, true) {
                tracing::warn!(relay_event = "token_refresh_failed", relay_account = %self.name, expires_at = %humantime::format_rfc3339_seconds(t.expires_at), "{fix} before its access token runs out");
            }
            return;
        }
        let mut marked = t.clone();
        marked.needs_authorization = true;
        marked.last_error = Some(fix.clone());
        // Marked in memory whether or not the file can be written: said once, not at every look.
        match self
            .store
            .save_if_unchanged(&self.name, &marked, state.file_hash)
        {
            Ok(Some(hash)) => self.saved(state, marked, hash),
            _ => state.tokens = Some(marked),
        }
        tracing::error!(relay_event = "authorization_needed", relay_account = %self.name, "{fix}; mail stays queued until then");
        crate::events::emit(crate::events::Event::AuthorizationNeeded {
            account: &self.name,
            why: &fix,
        });
    }

    /// Records a successful write of `tokens`, whose file now hashes to `hash`.
    fn saved(&self, state: &mut State, tokens: StoredTokens, hash: blake3::Hash) {
        state.file_hash = Some(hash);
        state.file_mtime = self.store.mtime(&self.name);
        state.tokens = Some(tokens);
        state.unsaved = false;
    }

    /// Says that a renewed grant is in memory only: an error line, and a `token_refresh_failed` for the alerts,
    /// because a restart now loses the grant (a provider that rotates refresh tokens strictly has already
    /// invalidated the one in the file); and, for a grant with a refresh token, a mark that `relay status`, which
    /// reads files, shows until the grant is written.
    fn unsaved_after_refresh(&self, e: &StoreError) {
        let path = self.store.path(&self.name);
        tracing::error!(relay_event = "token_refresh_failed", relay_account = %self.name, file = %path.display(), error = %e, "the access token was renewed, but the token file cannot be written: the new tokens are used from memory and saved as soon as it can be (tried again at every refresh and in between); until then a restart loses them, and with a provider that rotates refresh tokens, the grant");
        let why = format!("the renewed tokens cannot be saved ({e}); they are used from memory");
        // A refresh token is what a restart would lose; a grant without a person is obtained again.
        if self.renewal.is_interactive() {
            self.store.mark_unsaved(&self.name, &e.to_string());
        }
        crate::events::emit(crate::events::Event::TokenRefreshFailed {
            account: &self.name,
            why: &why,
        });
    }

    async fn refresh_locked(&self, state: &mut State) -> Result<SecretString, TokenError> {
        let asked = SystemTime::now();
        // Held until the new grant is saved: another process renewing the same grant meanwhile (`relay test`
        // while the daemon runs, or a second daemon on this state dir) would present a refresh token that the
        // first renewal has just rotated away, and a provider that revokes a grant on refresh-token reuse would
        // kill it.
        let _renewing = self.renewal_lock().await;
        if self.reread_after_wait(state)
            && let Some(t) = &state.tokens
            && !t.needs_authorization
            && t.last_error.is_none()
            && t.obtained_at >= asked
            && SystemTime::now() < t.expires_at
        {
            tracing::info!(relay_event = "token_refreshed", relay_account = %self.name, "the token was renewed meanwhile, by another relay process (or by this one before a reload); using it");
            // A renewal all the same: the alerts' open refresh failure closes, the metrics count it.
            crate::events::emit(crate::events::Event::TokenRefreshed {
                account: &self.name,
            });
            *self.failed_lock() = None;
            self.renewal_went(true);
            return Ok(t.access_token.clone());
        }
        // Stop came while this renewal waited (for the lock, or another's renewal): a request begun now could be
        // cut off by the stop's bound after the provider rotated the grant, before its answer is saved.
        if self.stopping.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(TokenError::Stopping(self.name.clone()));
        }
        let previous = state.tokens.clone();
        if self.renewal.is_interactive() && previous.as_ref().is_some_and(|t| t.needs_authorization)
        {
            return Err(TokenError::NeedsAuthorization(self.name.clone()));
        }
        let refresh = previous.as_ref().and_then(|t| t.refresh_token.as_ref());
        let grant = match self.renewal.obtain(&self.client, refresh).await {
            Ok(g) => Ok(g),
            Err(RenewalError::NoGrant) => {
                if self.renewal.is_interactive() {
                    self.cannot_renew(state, previous.as_ref());
                }
                return Err(TokenError::NeedsAuthorization(self.name.clone()));
            }
            Err(RenewalError::OAuth(e)) => Err(e),
        };
        let now = SystemTime::now();
        match grant {
            Ok(g) => {
                let tokens = StoredTokens {
                    access_token: g.access_token.clone(),
                    expires_at: g.expires_at,
                    obtained_at: now,
                    // A rotated refresh token replaces the old one; without one, the old stays valid.
                    refresh_token: g
                        .refresh_token
                        .or_else(|| previous.and_then(|p| p.refresh_token)),
                    last_refresh: Some(now),
                    needs_authorization: false,
                    last_error: None,
                };
                match self
                    .store
                    .save_if_unchanged(&self.name, &tokens, state.file_hash)
                {
                    Ok(Some(hash)) => {
                        self.saved(state, tokens, hash);
                        tracing::info!(relay_event = "token_refreshed", relay_account = %self.name, expires_at = %humantime::format_rfc3339_seconds(g.expires_at), "access token renewed");
                        crate::events::emit(crate::events::Event::TokenRefreshed {
                            account: &self.name,
                        });
                    }
                    Ok(None) => return self.adopt_newer_file(state, tokens, true),
                    // The new grant is all the account has (its refresh token may have been rotated): used,
                    // and kept for the next refresh, though it cannot be saved now.
                    Err(e) => {
                        state.tokens = Some(tokens);
                        state.unsaved = true;
                        self.unsaved_after_refresh(&e);
                    }
                }
                *self.failed_lock() = None;
                self.renewal_went(true);
                Ok(g.access_token)
            }
            Err(e) => {
                self.renewal_went(false);
                // Only a person's grant waits for `relay authorize`; the others are fetched again on every
                // attempt, so a fixed credential (and `systemctl reload relay`, for a file) is enough.
                let interactive = self.renewal.is_interactive();
                let revoked = e.needs_authorization() && interactive;
                let diagnosis = Diagnosed::of_grant(
                    &e.to_string(),
                    Some(&self.name),
                    interactive,
                    self.provider,
                )
                .advised(&self.rotation);
                let (account, why) = (self.name.as_str(), &e.to_string());
                if revoked {
                    tracing::error!(relay_event = "authorization_needed", relay_account = %self.name, relay_diagnosis = diagnosis.field(), error = %e, "the grant was revoked or expired; mail stays queued until `relay authorize {}` is run{diagnosis}", self.name);
                    crate::events::emit(crate::events::Event::AuthorizationNeeded { account, why });
                } else {
                    tracing::warn!(relay_event = "token_refresh_failed", relay_account = %self.name, relay_diagnosis = diagnosis.field(), error = %e, "token refresh failed{diagnosis}");
                    crate::events::emit(crate::events::Event::TokenRefreshFailed { account, why });
                }
                // Recorded in the token file, so that `relay status` can say what is wrong. A flow that needs no
                // person (client credentials, a service account) has no file before its first token: one with no
                // usable token and the error is written, or status would say "ok" while no token can be had.
                let previous = previous.or_else(|| {
                    (!self.renewal.is_interactive()).then(|| StoredTokens {
                        access_token: SecretString::from(String::new()),
                        expires_at: SystemTime::UNIX_EPOCH,
                        obtained_at: now,
                        refresh_token: None,
                        last_refresh: None,
                        needs_authorization: false,
                        last_error: None,
                    })
                });
                if let Some(mut t) = previous {
                    // A grant without a person never waits for `relay authorize` (an older relay may have
                    // said it did).
                    t.needs_authorization = if interactive {
                        t.needs_authorization || revoked
                    } else {
                        false
                    };
                    t.last_error = Some(self.explain(&e));
                    match self
                        .store
                        .save_if_unchanged(&self.name, &t, state.file_hash)
                    {
                        Ok(Some(hash)) => self.saved(state, t, hash),
                        // A new grant arrived while this refresh failed: the failure was the old grant's.
                        Ok(None) => return self.adopt_newer_file(state, t, false),
                        // The refresh's own failure is what the caller needs to hear. The failure is kept in
                        // memory; a renewed grant that was not saved yet stays unsaved, and is saved later.
                        Err(store) => {
                            tracing::error!(relay_account = %self.name, file = %self.store.path(&self.name).display(), error = %store, "the token file cannot be written: the refresh's failure is not recorded in it, and `relay status` cannot show it");
                            state.tokens = Some(t);
                        }
                    }
                }
                Err(TokenError::OAuth {
                    account: self.name.clone(),
                    explained: self.explain(&e),
                    source: e,
                })
            }
        }
    }
}

impl AccountTokens {
    /// The account's renewal lock (see `refresh_locked`), waited for without holding a thread. Bounded: a
    /// process that holds it longer than [`RENEWAL_WAIT`] (stopped, or hung) is not waited for any more, and
    /// this renewal goes on without it, as it would without a lock file.
    async fn renewal_lock(&self) -> Option<std::fs::File> {
        let file = self.store.renewal_lock_file(&self.name)?;
        let started = tokio::time::Instant::now();
        let mut said = false;
        loop {
            match store::try_flock(&file) {
                Ok(true) => return Some(file),
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(relay_account = %self.name, error = %e, "cannot lock the token renewal lock file; renewing without it");
                    return None;
                }
            }
            if started.elapsed() >= RENEWAL_WAIT {
                tracing::warn!(relay_account = %self.name, "another process has been renewing this account's token for {}; renewing without waiting for it any longer", humantime::format_duration(RENEWAL_WAIT));
                return None;
            }
            if !said {
                tracing::info!(relay_account = %self.name, "another relay process is renewing this account's token; waiting for it");
                said = true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Under the renewal lock: takes the file as another process left it (a grant it renewed while this one
    /// waited, with the refresh token that is now the live one). Whether the file had changed.
    fn reread_after_wait(&self, state: &mut State) -> bool {
        let mtime = self.store.mtime(&self.name);
        let before = state.file_hash;
        if state.unsaved {
            self.reload_over_unsaved(state, mtime);
            return !state.unsaved;
        }
        match self.store.load_hashed(&self.name) {
            Ok((Some(tokens), hash)) if hash != state.file_hash => {
                state.tokens = Some(tokens);
                state.file_hash = hash;
                state.file_mtime = mtime;
            }
            // Gone, damaged or unreadable: left to the save, which compares the file again.
            _ => {}
        }
        state.file_hash != before
    }

    /// The token file changed while a refresh ran (`relay authorize` stored a new grant): the file wins, and
    /// its token is used if it is good. A file that changed into one that cannot be read holds no grant to prefer:
    /// `held` (the renewed grant, or the old one with its failure) is kept, as [`Self::keep_over_unreadable`] says;
    /// a renewed one is unsaved until it can be written, since its refresh token may be the only live one.
    fn adopt_newer_file(
        &self,
        state: &mut State,
        held: StoredTokens,
        renewed: bool,
    ) -> Result<SecretString, TokenError> {
        let mtime = self.store.mtime(&self.name);
        match self.store.load_hashed(&self.name) {
            // A failure record written meanwhile (another process renewing with the older grant, which a provider
            // rotating strictly refuses) holds nothing live: the renewed grant is saved over it, as
            // `reload_over_unsaved` does.
            Ok((Some(tokens), hash))
                if renewed && (tokens.needs_authorization || tokens.last_error.is_some()) =>
            {
                state.file_hash = hash;
                state.file_mtime = mtime;
                let saved = self.store.save_if_unchanged(&self.name, &held, hash);
                tracing::warn!(relay_account = %self.name, file = %self.store.path(&self.name).display(), "the token file was rewritten with a failed renewal during this one; the renewed grant is saved over it");
                match saved {
                    Ok(Some(hash)) => self.saved(state, held, hash),
                    // Changed once more: read at the next use, over the unsaved grant.
                    Ok(None) => {
                        state.tokens = Some(held);
                        state.unsaved = true;
                    }
                    Err(e) => {
                        state.tokens = Some(held);
                        state.unsaved = true;
                        self.unsaved_after_refresh(&e);
                    }
                }
            }
            Ok((tokens, hash)) => {
                if state.unsaved {
                    self.store.clear_unsaved(&self.name);
                }
                if tokens.is_some() {
                    tracing::info!(relay_account = %self.name, "the token file changed during a refresh; using the newer grant");
                } else {
                    tracing::warn!(relay_account = %self.name, file = %self.store.path(&self.name).display(), "the token file was removed during a refresh: the grant is taken away");
                }
                state.tokens = tokens;
                state.file_hash = hash;
                state.file_mtime = mtime;
                state.unsaved = false;
                state.unreadable_said = false;
            }
            Err(e) => {
                state.tokens = Some(held);
                state.unsaved |= renewed;
                let damaged = match &e {
                    StoreError::Corrupt { path, reason } => Some(StoreError::Corrupt {
                        path: path.clone(),
                        reason: reason.clone(),
                    }),
                    _ => None,
                };
                if renewed && damaged.is_none() {
                    self.unsaved_after_refresh(&e);
                }
                self.keep_over_unreadable(state, e)?;
                // A damaged file that could not be set aside and written over: the renewed grant is in memory only.
                if let Some(damaged) = damaged
                    && renewed
                    && state.unsaved
                {
                    self.unsaved_after_refresh(&damaged);
                }
            }
        }
        match &state.tokens {
            Some(t) if !t.needs_authorization && SystemTime::now() < t.expires_at => {
                Ok(t.access_token.clone())
            }
            _ => Err(TokenError::NeedsAuthorization(self.name.clone())),
        }
    }
}

/// The unsaved grant of `from` (the account before a reload) into `to` (the rebuilt one), unless `to` has moved on:
/// it read another file, or renewed (and saved) on its own.
fn take_unsaved(to: &mut State, from: &State) {
    if !from.unsaved || (to.tokens.is_some() && (to.unsaved || to.file_hash != from.file_hash)) {
        return;
    }
    to.tokens = from.tokens.clone();
    to.file_mtime = from.file_mtime;
    to.file_hash = from.file_hash;
    to.unsaved = true;
}

/// When a grant is renewed: ahead of its token's expiry ([`renew_at`]), or to keep its refresh token alive.
fn due_at(t: &StoredTokens) -> SystemTime {
    let keep_alive = t.last_refresh.unwrap_or(t.obtained_at) + KEEP_ALIVE;
    renew_at(t).min(keep_alive)
}

/// When a token should be renewed: once min(10 minutes, a quarter of its lifetime) remains.
fn renew_at(t: &StoredTokens) -> SystemTime {
    let lifetime = t
        .expires_at
        .duration_since(t.obtained_at)
        .unwrap_or_default();
    let ahead = RENEW_AHEAD.min(lifetime / 4);
    t.expires_at
        .checked_sub(ahead)
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

/// Keeps every account's token fresh and its refresh token alive, whether or not mail flows.
pub async fn refresher(
    accounts: Vec<std::sync::Arc<AccountTokens>>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut tasks = tokio::task::JoinSet::new();
    let renewing = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for account in accounts.iter().cloned() {
        let mut stop = stop.clone();
        let renewing = renewing.clone();
        account
            .followed
            .store(true, std::sync::atomic::Ordering::Relaxed);
        tasks.spawn(async move {
            // (Shortened by tests that watch failures in a row: the refresher's are the only ones now.)
            let first_backoff =
                crate::test_hooks::duration("RELAY_TEST_REFRESH_BACKOFF_MS", FIRST_BACKOFF);
            let mut backoff = first_backoff;
            // Tokens a refresh could not save are saved again soon, not only at the next refresh (up to an hour
            // away): the admin who fixes the file's directory should not have to wait, nor risk a restart.
            let mut save_backoff = FIRST_BACKOFF;
            loop {
                // Stopping: no new renewal begins (one that was under way has just ended).
                if *stop.borrow() {
                    return;
                }
                let due = account
                    .next_due()
                    .await
                    .unwrap_or_else(|_| SystemTime::now() + backoff);
                // Looked at again at least every minute: a delivery may have replaced the token meanwhile (a 535
                // forces a refresh) with one that lasts less than the one this wait was computed from, and an idle
                // relay would let it expire.
                let wait = due
                    .duration_since(SystemTime::now())
                    .unwrap_or_default()
                    .min(DUE_RECHECK);
                let unsaved = account.has_unsaved().await;
                if !unsaved {
                    save_backoff = FIRST_BACKOFF;
                }
                let save_only = tokio::select! {
                    _ = tokio::time::sleep(wait) => false,
                    _ = account.replaced.notified() => continue,
                    _ = tokio::time::sleep(save_backoff), if unsaved => true,
                    _ = stop.wait_for(|s| *s) => return,
                };
                if save_only {
                    if account.save_unsaved().await {
                        save_backoff = (save_backoff * 2).min(Duration::from_secs(600));
                    }
                    continue;
                }
                if !account.still_due().await {
                    continue;
                }
                renewing.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let renewed = account.force_refresh().await;
                renewing.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                match renewed {
                    Ok(_) => backoff = first_backoff,
                    Err(TokenError::NeedsAuthorization(_)) => {
                        // Wait for `relay authorize`: next_due rereads the file.
                        let wait = Duration::from_secs(60);
                        tokio::select! {
                            _ = tokio::time::sleep(wait) => {}
                            _ = stop.wait_for(|s| *s) => return,
                        }
                    }
                    Err(e) => {
                        // A refresh's own failure is logged where it happens; the token file that cannot be
                        // read is not.
                        if let TokenError::Store(e) = &e {
                            tracing::warn!(relay_account = %account.name, error = %e, "the token file cannot be read; the refresh is tried again in {}", humantime::format_duration(backoff));
                        }
                        tokio::select! {
                            _ = tokio::time::sleep(backoff) => {}
                            _ = stop.wait_for(|s| *s) => return,
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(600));
                    }
                }
            }
        });
    }
    let _ = stop.wait_for(|s| *s).await;
    for account in &accounts {
        account
            .stopping
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }
    if renewing.load(std::sync::atomic::Ordering::Relaxed) > 0 {
        tracing::info!(
            "waiting for a token renewal under way to finish before the refresher stops"
        );
    }
    // A renewal under way is let finish (each task stops at its next wait): aborted between the provider's
    // answer and the save, a rotated refresh token would be lost, and with a provider that rotates strictly, the
    // grant with it. Bounded, for a shutdown that systemd times.
    let finished = tokio::time::timeout(RENEWAL_FINISH, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if finished.is_err() {
        tracing::warn!("a token renewal still under way is abandoned as relay stops");
        tasks.shutdown().await;
    }
    // A last chance before the tokens in memory are gone (relay stops, or a reload removed the account; one that
    // a reload rebuilt has its unsaved tokens copied to the new one).
    for account in &accounts {
        if account.save_unsaved().await {
            tracing::error!(relay_account = %account.name, file = %account.store.path(&account.name).display(), "the account's renewed tokens are still unsaved as its token refresher stops: if its provider rotates refresh tokens, the grant in the file may no longer work; make the file writable, and run `relay authorize {}` if the account then needs authorization", account.name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(lifetime: u64) -> StoredTokens {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        StoredTokens {
            access_token: SecretString::from("a"),
            expires_at: now + Duration::from_secs(lifetime),
            obtained_at: now,
            refresh_token: None,
            last_refresh: Some(now),
            needs_authorization: false,
            last_error: None,
        }
    }

    #[test]
    fn renews_when_the_smaller_of_ten_minutes_and_a_quarter_remains() {
        let t = tokens(3600);
        assert_eq!(
            t.expires_at.duration_since(renew_at(&t)).unwrap(),
            Duration::from_secs(600)
        );
        let t = tokens(1200);
        assert_eq!(
            t.expires_at.duration_since(renew_at(&t)).unwrap(),
            Duration::from_secs(300)
        );
    }
}

#[cfg(test)]
mod replace_refused_tests {
    use super::*;

    /// A config with one authorization-code account, `a`, whose endpoints are closed.
    fn one_account(dir: &std::path::Path) -> crate::config::Config {
        crate::config::Config::parse(
            &format!(
                "state_dir = {:?}\n[[listener]]\naddress = \"127.0.0.1:0\"\nauth = \"none\"\n[[account]]\nname = \"a\"\nprovider = \"generic\"\nflow = \"authorization_code\"\nmailbox = \"a@example.com\"\nclient_id = \"c\"\ntoken_url = \"http://127.0.0.1:9/token\"\nauthorization_url = \"http://127.0.0.1:9/authorize\"\nscope = \"smtp\"\nsmtp_host = \"127.0.0.1\"\nsmtp_tls = \"none\"\n",
                dir.join("state")
            ),
            "test.toml",
        )
        .unwrap()
    }

    /// Account `a`'s grant in its token file: `access_token`, obtained (and refreshed) at `obtained`, valid for an
    /// hour from now, with a refresh token.
    fn store_grant(config: &crate::config::Config, access_token: &str, obtained: SystemTime) {
        crate::tokens::TokenStore::new(&config.state_dir)
            .save(
                "a",
                &StoredTokens {
                    access_token: SecretString::from(access_token.to_string()),
                    expires_at: SystemTime::now() + Duration::from_secs(3600),
                    obtained_at: obtained,
                    refresh_token: Some(SecretString::from("r")),
                    last_refresh: Some(obtained),
                    needs_authorization: false,
                    last_error: None,
                },
            )
            .unwrap();
    }

    /// A token obtained before the refusal is no replacement for the refused one, though it differs (the
    /// upstream may have revoked every token issued before some event): a refresh is asked for (here it fails,
    /// the token endpoint being closed). One obtained since is taken as it is.
    #[tokio::test]
    async fn only_a_token_obtained_since_the_refusal_replaces_it() {
        let dir = tempfile::tempdir().unwrap();
        let config = one_account(dir.path());
        let now = SystemTime::now();
        let obtained = now - Duration::from_secs(60);
        store_grant(&config, "second", obtained);
        let accounts = crate::accounts::build(&config).unwrap();
        let tokens = &accounts[0].tokens;
        let first = SecretString::from("first");
        let (since, refreshed) = tokens
            .replace_refused(&first, obtained - Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(
            (secrecy::ExposeSecret::expose_secret(&since), refreshed),
            ("second", false)
        );
        assert!(
            tokens.replace_refused(&first, now).await.is_err(),
            "an older token is not taken: a refresh is tried"
        );
    }

    /// A Graph token (an account switched to Graph) that cannot be had is not asked for again by every message
    /// for 30 s, as the account's own token is not.
    #[tokio::test]
    async fn a_scoped_token_that_failed_is_not_asked_again_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let config = one_account(dir.path());
        store_grant(&config, "smtp", SystemTime::now());
        let accounts = crate::accounts::build(&config).unwrap();
        let tokens = &accounts[0].tokens;
        let first = tokens.scoped_token("graph", false).await;
        assert!(matches!(first, Err(TokenError::OAuth { .. })), "{first:?}");
        let again = tokens.scoped_token("graph", true).await;
        assert!(
            matches!(again, Err(TokenError::RecentlyFailed(_))),
            "{again:?}"
        );
    }

    /// The refresher wakes at the due time it read before its sleep: a grant `relay authorize` stored meanwhile
    /// is not renewed then.
    #[tokio::test]
    async fn a_grant_stored_during_the_wait_is_not_due_at_the_old_time() {
        let dir = tempfile::tempdir().unwrap();
        let config = one_account(dir.path());
        let store = crate::tokens::TokenStore::new(&config.state_dir);
        let now = SystemTime::now();
        let grant = |obtained: SystemTime, expires: SystemTime| StoredTokens {
            access_token: SecretString::from("t"),
            expires_at: expires,
            obtained_at: obtained,
            refresh_token: Some(SecretString::from("r")),
            last_refresh: Some(obtained),
            needs_authorization: false,
            last_error: None,
        };
        // An hour's token with a minute left: due.
        store
            .save(
                "a",
                &grant(
                    now - Duration::from_secs(3540),
                    now + Duration::from_secs(60),
                ),
            )
            .unwrap();
        let accounts = crate::accounts::build(&config).unwrap();
        let tokens = &accounts[0].tokens;
        assert!(tokens.still_due().await);
        store
            .save("a", &grant(now, now + Duration::from_secs(3600)))
            .unwrap();
        // A distinct mtime whatever the clock's granularity: that is how the account sees a new file.
        std::fs::File::options()
            .write(true)
            .open(store.path("a"))
            .unwrap()
            .set_modified(now + Duration::from_secs(10))
            .unwrap();
        assert!(!tokens.still_due().await);
    }
}
