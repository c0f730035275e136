//! What an upstream's refusal means, in plain words, and what fixes it: the answers sysadmins otherwise search
//! the web for. One table, used by the journal (`relay_diagnosis` on `deferred`, `dead`, `token_refresh_failed`
//! and `authorization_needed`), by `relay status` (through the token file's last error) and by `relay test`.
//!
//! Pure: text in (an SMTP reply, an HTTP API error, a token endpoint's `error` and `error_description`), a
//! diagnosis out. Codes are matched as whole codes (`5.7.3` is not `5.7.30`), case-insensitively; the first
//! entry that matches wins, so an entry that needs more words comes before the plain one for the same code.

use crate::config::Provider;

/// One row of the table.
#[derive(Debug, PartialEq, Eq)]
pub struct Diagnosis {
    /// The code as people search for it, e.g. `535 5.7.139` or `AADSTS7000222`.
    pub code: &'static str,
    /// What it means, in one line.
    pub cause: &'static str,
    /// What to do: which admin page, setting or command. `ACCOUNT` stands for the account's name.
    pub fix: &'static str,
    /// Any of these matches; each is a list of words that must all be in the text.
    matches: &'static [&'static [&'static str]],
    /// The provider whose servers say these words, where others may say them and mean something else: such a
    /// row is skipped for an account of another provider (a `generic` one on its own server was told about
    /// Exchange Online's admin center for a 535 5.7.3), unless the text names that provider's servers.
    only: Option<Provider>,
}

impl Diagnosis {
    /// The diagnosis as one line, for the journal and for `relay test`.
    pub fn text(&self, account: Option<&str>) -> String {
        let fix = match account {
            Some(a) => self.fix.replace("ACCOUNT", a),
            None => self.fix.to_string(),
        };
        format!("{} ({}){DIAGNOSED}{fix}", self.cause, self.code)
    }
}

/// The diagnosis for an upstream's or a token endpoint's words, if the table knows them. `provider`: the
/// account's, where known (rows of another provider's servers are skipped).
pub fn diagnose(text: &str, provider: Option<Provider>) -> Option<&'static Diagnosis> {
    let lower = text.to_ascii_lowercase();
    TABLE.iter().find(|d| {
        d.only.is_none_or(|p| fits(p, provider, &lower))
            && d.matches
                .iter()
                .any(|words| words.iter().all(|w| contains_code(&lower, w)))
    })
}

/// Whether a row for `row`'s servers fits an account of `account`'s provider: its own, or a generic account's
/// whose upstream names itself as one of `row`'s (a generic account pointed at Microsoft's servers, or at a test
/// double of them). `lower`: the text, lower-cased.
fn fits(row: Provider, account: Option<Provider>, lower: &str) -> bool {
    let names: &[&str] = match row {
        Provider::Microsoft => &["outlook.com", "office365", "aka.ms", "microsoft"],
        Provider::Google => &["gsmtp", "google.com", "googleapis"],
        Provider::Generic => &[],
    };
    match account {
        None => true,
        Some(Provider::Generic) => names.iter().any(|n| lower.contains(n)),
        Some(p) => p == row,
    }
}

/// [`diagnose`], as the text a log line carries (`relay_diagnosis`), for `account`. A text that already carries
/// its diagnosis (a token error explained where the account's flow was known: [`for_grant`]) gets that one
/// again, not a second one that could contradict it.
pub fn for_log(text: &str, account: Option<&str>, provider: Option<Provider>) -> Option<String> {
    let account = account.filter(|a| !a.is_empty());
    let text = text
        .split_once(super::NO_NEW_TOKEN)
        .map_or(text, |(_, cause)| cause);
    if text.contains(DIAGNOSED) {
        let given = TABLE
            .iter()
            .chain([&CREDENTIALS, &SEND_AS_REWRITTEN])
            .map(|d| d.text(account))
            // As given, or as fitted to an account's LoadCredential= copies (see `Diagnosed::advised`).
            .find(|d| {
                text.contains(d.as_str()) || text.contains(&crate::config::rotation::restarting(d))
            });
        if given.is_some() {
            return given;
        }
    }
    diagnose(text, provider).map(|d| d.text(account))
}

/// What [`Diagnosis::text`] puts between the cause and the fix.
const DIAGNOSED: &str = "; fix: ";

/// [`for_log`] for a token endpoint's refusal of an account's grant. A grant that needs no person (client
/// credentials, a service account, a password) has no refresh token for `relay authorize` to replace: where the
/// table blames a refresh token, such an account's own credentials are at fault instead.
pub fn for_grant(
    text: &str,
    account: Option<&str>,
    interactive: bool,
    provider: Option<Provider>,
) -> Option<String> {
    let d = diagnose(text, provider)?;
    let blames_refresh_token = d.fix == RELAY_AUTHORIZE || d.cause.contains("refresh token");
    let d = if blames_refresh_token && !interactive {
        &CREDENTIALS
    } else {
        d
    };
    Some(d.text(account.filter(|a| !a.is_empty())))
}

/// A refused grant of an account that needs no person: see [`for_grant`].
static CREDENTIALS: Diagnosis = Diagnosis {
    code: "invalid_grant",
    cause: "the token endpoint refused the account's own credentials (this flow has no refresh token for `relay authorize` to replace)",
    only: None,
    fix: "check the account's credentials and the user it acts for (username and password_file, client_secret_file, certificate_file and private_key_file, or service_account_file and mailbox); `relay authorize ACCOUNT` tries them at once; then `systemctl reload relay` (SIGHUP) makes the daemon read them",
    matches: &[],
};

/// A refused sender when relay already rewrote From: to the account's mailbox (`rewrite_from = "header"`): the
/// table's fix, to set that, is what was done.
static SEND_AS_REWRITTEN: Diagnosis = Diagnosis {
    only: None,
    code: "554 5.2.252 SendAsDenied",
    cause: "the mailbox may not send as the sender of the message relay sent, though rewrite_from = \"header\" already made its From: the account's mailbox",
    fix: "check that `mailbox` is the exact primary address of the user the token is for (an alias, or a shared mailbox that user has no Send As on, is refused), and that the device's message carries no Sender: header with another address (relay keeps it as it is); or give the user Send As on that address (Exchange admin center > Recipients > Mailboxes > Delegation, or `Add-RecipientPermission`)",
    matches: &[],
};

/// A log line's diagnosis: the `relay_diagnosis` field, and the same text after the message (`Display` gives
/// `: TEXT`, or nothing when the table has no entry).
pub struct Diagnosed(Option<String>);

impl Diagnosed {
    pub fn of(text: &str, account: Option<&str>, provider: Option<Provider>) -> Diagnosed {
        Diagnosed(for_log(text, account, provider))
    }

    /// [`for_grant`]'s diagnosis.
    pub fn of_grant(
        text: &str,
        account: Option<&str>,
        interactive: bool,
        provider: Option<Provider>,
    ) -> Diagnosed {
        Diagnosed(for_grant(text, account, interactive, provider))
    }

    /// The diagnosis as it applies to an account whose files are as `rotation` says (a restart, not a reload, to
    /// take up a rewritten `LoadCredential=` copy).
    pub fn advised(self, rotation: &crate::config::Rotation) -> Diagnosed {
        Diagnosed(self.0.map(|d| rotation.advise(&d)))
    }

    /// The diagnosis as it applies to an account that rewrites From: already (`header`): a send-as refusal's fix
    /// is not to set what is set.
    pub fn rewriting(self, header: bool, text: &str, account: Option<&str>) -> Diagnosed {
        let send_as = |d: &Diagnosis| d.fix.contains("set rewrite_from = \"header\"");
        match diagnose(text, None) {
            Some(d) if header && send_as(d) => Diagnosed(Some(
                SEND_AS_REWRITTEN.text(account.filter(|a| !a.is_empty())),
            )),
            _ => self,
        }
    }

    /// The field's value: absent from the line when there is no diagnosis.
    pub fn field(&self) -> Option<&str> {
        self.0.as_deref()
    }
}

impl std::fmt::Display for Diagnosed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Some(d) => write!(f, ": {d}"),
            None => Ok(()),
        }
    }
}

/// Whether `word` (lower case) is in `text` (lower case) as a whole: for a code, not as part of a longer one
/// (`5.7.3` in `5.7.30`, `AADSTS50076` in `AADSTS500761`). Words that are text match anywhere.
fn contains_code(text: &str, word: &str) -> bool {
    let code_like = word.bytes().last().is_some_and(|b| b.is_ascii_digit());
    if !code_like {
        return text.contains(word);
    }
    let digit_or_dot = |b: Option<&u8>| b.is_some_and(|b| b.is_ascii_digit() || *b == b'.');
    text.match_indices(word).any(|(at, _)| {
        let bytes = text.as_bytes();
        let before = at.checked_sub(1).and_then(|i| bytes.get(i));
        let after = &bytes[at + word.len()..];
        // A dot after a code only continues it when a digit follows (`5.7.3.` ends a sentence).
        let continues = after.first().is_some_and(u8::is_ascii_digit)
            || (after.first() == Some(&b'.') && after.get(1).is_some_and(u8::is_ascii_digit));
        // A numeric code also must not be the tail of a longer one (`15.7.8`, `2.5.7.8`).
        let extends = word.as_bytes()[0].is_ascii_digit() && digit_or_dot(before);
        !extends && !continues
    })
}

const RELAY_AUTHORIZE: &str = "run `relay authorize ACCOUNT`";

static TABLE: &[Diagnosis] = &[
    // --- Microsoft 365 SMTP (smtp.office365.com). Codes only Microsoft uses fit any account; the others only a
    // Microsoft account's, or one whose upstream names Microsoft's servers (`fits`). ---
    Diagnosis {
        only: None,
        code: "535 5.7.139",
        cause: "SMTP AUTH is turned off for the whole tenant",
        fix: "in the Exchange admin center, Settings > Mail flow, untick \"Turn off SMTP AUTH protocol for your organization\" (or `Set-TransportConfig -SmtpClientAuthenticationDisabled $false`), or set transport = \"graph\" (or fallback_transport = \"graph\") on the account",
        matches: &[&[
            "5.7.139",
            "smtpclientauthentication is disabled for the tenant",
        ]],
    },
    Diagnosis {
        only: None,
        code: "535 5.7.139",
        cause: "Microsoft Entra security defaults or a Conditional Access policy block SMTP AUTH for this mailbox",
        fix: "turn off security defaults (Entra admin center > Identity > Overview > Properties > Manage security defaults), or exclude the mailbox from the Conditional Access policy that blocks it; or set transport = \"graph\" on the account",
        matches: &[
            &["5.7.139", "security defaults"],
            &["5.7.139", "did not meet the criteria"],
            &["5.7.139", "organization configuration doesn't allow"],
        ],
    },
    Diagnosis {
        only: None,
        code: "535 5.7.139",
        cause: "Microsoft refused the sign-in for SMTP AUTH (SMTP AUTH off for the mailbox or the tenant, or a sign-in policy)",
        fix: "in the Microsoft 365 admin center, Users > Active users > the mailbox > Mail > Manage email apps, tick \"Authenticated SMTP\" (or `Set-CASMailbox MAILBOX -SmtpClientAuthenticationDisabled $false`); check the tenant's SMTP AUTH setting; or set transport = \"graph\" on the account",
        matches: &[&["535", "5.7.139"]],
    },
    Diagnosis {
        only: Some(Provider::Microsoft),
        code: "535 5.7.3",
        cause: "Exchange Online did not accept the token for this mailbox: SMTP AUTH is off for the mailbox, the token lacks SMTP.Send, or (app-only) the app's service principal has no access to the mailbox",
        fix: "tick \"Authenticated SMTP\" for the mailbox (Microsoft 365 admin center > Users > Active users > Mail > Manage email apps); delegated flows need the SMTP.Send permission consented; client credentials need `New-ServicePrincipal` and `Add-MailboxPermission -User <service principal> -AccessRights FullAccess` in Exchange Online PowerShell, and the mailbox must be the one the permission names",
        // Exchange's words or its server names: 5.7.3 is not a code of RFC 4954, other servers use it otherwise.
        matches: &[
            &["535", "5.7.3", "authentication unsuccessful"],
            &["535", "5.7.3", "outlook.com"],
        ],
    },
    Diagnosis {
        only: None,
        code: "550 5.7.30",
        cause: "Exchange Online took the login for basic authentication, which it no longer accepts for client submission",
        fix: "make sure the account uses OAuth (a `flow` and, for delegated flows, `relay authorize ACCOUNT`) and that SMTP AUTH is allowed for the mailbox; or set transport = \"graph\" (or fallback_transport = \"graph\") on the account",
        matches: &[&["550", "5.7.30"]],
    },
    Diagnosis {
        only: None,
        code: "554 5.2.252 SendAsDenied",
        cause: "the mailbox may not send as the sender address the device used",
        fix: "set rewrite_from = \"header\" on the account so mail goes as the mailbox (the default, \"envelope\", changes only MAIL FROM, which Graph does not even have, and Exchange Online checks the From: header; \"header\" rewrites both and keeps the device's address in Reply-To), or give the mailbox Send As rights for that address (Exchange admin center > Recipients > Mailboxes > Delegation, or `Add-RecipientPermission`)",
        matches: &[&["5.2.252"], &["sendasdenied"]],
    },
    Diagnosis {
        only: None,
        code: "550 5.7.60",
        cause: "the mailbox has no permission to send as this sender",
        fix: "set rewrite_from = \"header\" on the account (the default, \"envelope\", changes only MAIL FROM, and Exchange Online also checks the From: header; \"header\" rewrites both and keeps the device's address in Reply-To), or grant the mailbox Send As (`Add-RecipientPermission SENDER -AccessRights SendAs -Trustee MAILBOX`)",
        matches: &[&["550", "5.7.60"]],
    },
    Diagnosis {
        only: None,
        code: "550 5.7.708",
        cause: "Microsoft blocks outgoing mail from this tenant (a new or trial tenant without sending reputation, or one flagged for spam)",
        fix: "check Microsoft Defender > Email & collaboration > Review > Restricted entities for a blocked user; a new tenant needs a verified custom domain and time, or a Microsoft support case to lift the block",
        matches: &[&["550", "5.7.708"]],
    },
    Diagnosis {
        only: None,
        code: "501 5.5.127",
        cause: "Exchange Online could not use the XOAUTH2 login data: the user= address or the token in it is not what it expects",
        fix: "make `mailbox` the exact address of the mailbox the token was issued for (its primary SMTP address), then run `relay authorize ACCOUNT` again",
        matches: &[&["501", "5.5.127"]],
    },
    Diagnosis {
        only: None,
        code: "501 5.5.124",
        cause: "Exchange Online refused the XOAUTH2 login data: the user= address is not valid for this token",
        fix: "make `mailbox` the exact primary SMTP address of the mailbox the token was issued for",
        matches: &[&["501", "5.5.124"]],
    },
    Diagnosis {
        only: None,
        code: "554 5.2.0 SubmissionQuotaExceeded",
        cause: "the mailbox has sent to as many recipients as Exchange Online allows in 24 hours (its recipient rate limit, 10,000 by default), counting what other devices and people sent as it",
        fix: "relay holds ACCOUNT's mail and tries again hourly; lower `rate.recipients_per_day` if others send as this mailbox too, or spread the mail over more mailbox accounts (`accounts = [...]` on a route)",
        matches: &[&["submissionquotaexceeded"]],
    },
    Diagnosis {
        only: Some(Provider::Microsoft),
        code: "432 4.3.2",
        cause: "Exchange Online takes at most 3 SMTP connections at once per mailbox and refused one more: relay's own (`max_connections` over 3) or other devices and programs sending as this mailbox at the same time",
        fix: "keep `max_connections` at 3 or less for ACCOUNT (the default for Microsoft), and give the other senders of this mailbox their own mailbox or send their mail through relay; while other connections of ACCOUNT are open, relay uses only those for 10 minutes and the refused message waits for them; with none open, as here, the message is tried again on the retry schedule",
        matches: &[
            &["432", "4.3.2", "concurrent connection"],
            &["432", "4.3.2", "sender thread limit"],
        ],
    },
    // --- Gmail SMTP (smtp.gmail.com) ---
    Diagnosis {
        only: Some(Provider::Google),
        code: "550 5.4.5",
        cause: "the Google account has used up its daily sending limit (500 recipients a day for a consumer account, 2,000 for Google Workspace), counting what other devices and people sent as it",
        fix: "relay holds ACCOUNT's mail and tries again hourly; lower `rate.recipients_per_day` if others send as this mailbox too, or spread the mail over more mailbox accounts (`accounts = [...]` on a route)",
        matches: &[&["5.4.5", "daily"]],
    },
    Diagnosis {
        only: Some(Provider::Google),
        code: "535 5.7.8",
        cause: "Gmail did not accept the token for this mailbox (expired, revoked, for another user, or without the https://mail.google.com/ scope)",
        fix: "check that `mailbox` is the Google account that signed in and that the scope is https://mail.google.com/; then run `relay authorize ACCOUNT` again",
        // Gmail's replies end with `- gsmtp`; any other server's 535 5.7.8 gets the general row below.
        matches: &[&["535", "5.7.8", "gsmtp"], &["535", "5.7.8", "google.com"]],
    },
    Diagnosis {
        only: Some(Provider::Google),
        code: "534 5.7.9",
        cause: "Gmail wants an app password: it took the login for a password login on an account with 2-Step Verification",
        fix: "use OAuth for this account (flow = \"authorization_code\" or \"service_account\") rather than a password; then run `relay authorize ACCOUNT`",
        matches: &[&["534", "5.7.9", "gsmtp"], &["534", "5.7.9", "google.com"]],
    },
    // --- Any SMTP server (RFC 3463's and RFC 4954's codes), for a generic provider's ---
    Diagnosis {
        only: None,
        code: "550 5.1.1",
        cause: "the recipient's address does not exist at its domain (a typo, or a mailbox since removed)",
        fix: "check the address with whoever set it on the device; relay gave up on that recipient (its sender gets a bounce where `bounce` says so); the message's other recipients, if any, are not affected",
        // Microsoft says 5.1.10 (RESOLVER.ADR.RecipientNotFound), Gmail and most others 5.1.1.
        matches: &[&["550", "5.1.1"], &["550", "5.1.10"]],
    },
    Diagnosis {
        only: None,
        code: "535 5.7.8",
        cause: "the upstream did not accept the OAuth login (XOAUTH2 or OAUTHBEARER; authentication credentials invalid): the token is not for this mailbox, has expired or been revoked, or lacks the scope this server wants for SMTP",
        fix: "check that `mailbox` is the user the token was issued for and that `scope` is the one your provider documents for SMTP; `relay test ACCOUNT` shows the exchange; for a grant a person made, run `relay authorize ACCOUNT` again",
        matches: &[&["535", "5.7.8"]],
    },
    Diagnosis {
        only: None,
        code: "534 5.7.9",
        cause: "the upstream finds an OAuth login (XOAUTH2, OAUTHBEARER) too weak a mechanism for this account (it wants another way to log in)",
        fix: "relay logs in with XOAUTH2 or OAUTHBEARER only: ask the provider whether this mailbox may use OAuth for SMTP; `relay test ACCOUNT` shows the mechanisms the server offers",
        matches: &[&["534", "5.7.9"]],
    },
    Diagnosis {
        only: None,
        code: "552 5.3.4",
        cause: "the message is larger than the upstream takes (Microsoft 365: 35 MB by default; Gmail: 35 MB, as its SIZE says; counted as sent, where an attachment is a third larger than its file)",
        fix: "the message is in dead/ and cannot go as it is: ask its sender for a smaller one; set the listener's `max_message_size` at the provider's limit, so that devices are refused at once (552 5.3.4) instead of after relay took their mail",
        matches: &[&["552", "5.3.4"], &["552", "5.2.3"], &["5.3.4", "size"]],
    },
    // --- TLS certificates (rustls' words). `tls: ` is the SMTP client's own prefix: `ca_file` is for that
    // connection only. A message dead of old age quotes its last error after "expired after …", so every row
    // names the certificate error itself, not a bare word. ---
    Diagnosis {
        only: None,
        code: "TLS CaUsedAsEndEntity",
        cause: "the upstream presents a CA certificate as its own (a self-signed certificate made with `openssl req -x509`), and `ca_file` does not hold that very certificate",
        fix: "put the server's own certificate into `ca_file` for ACCOUNT: relay then trusts it as it is",
        matches: &[&["tls: invalid peer certificate", "causedasendentity"]],
    },
    Diagnosis {
        only: None,
        code: "TLS UnknownIssuer",
        cause: "the upstream's TLS certificate is signed by no CA relay trusts: a private CA, or a self-signed certificate",
        fix: "set `ca_file` for ACCOUNT to that CA's certificate, or to the server's own certificate (PEM; `openssl s_client -connect HOST:PORT -starttls smtp -showcerts` prints it)",
        matches: &[&["tls: invalid peer certificate: unknownissuer"]],
    },
    Diagnosis {
        only: None,
        code: "TLS no subjectAltName",
        cause: "the upstream's TLS certificate lists no names in a subjectAltName (its host only in the Common Name, which relay, as browsers, does not read)",
        fix: "reissue the server's certificate with a subjectAltName for its host (`openssl req ... -addext \"subjectAltName=DNS:HOST\"`), or put that very certificate into `ca_file` for ACCOUNT (a pinned self-signed certificate's Common Name is read)",
        matches: &[&["tls: invalid peer certificate", "not valid for any names"]],
    },
    Diagnosis {
        only: None,
        code: "TLS NotValidForName",
        cause: "the upstream's TLS certificate is for another name than the one relay connects to (`smtp_host`)",
        fix: "set `smtp_host` for ACCOUNT to a name the certificate lists (an IP address only if the certificate lists that address)",
        matches: &[
            &["tls: invalid peer certificate: certificate not valid for name"],
            &["tls: invalid peer certificate: notvalidforname"],
        ],
    },
    Diagnosis {
        only: None,
        code: "TLS Expired",
        cause: "the upstream's TLS certificate has expired (or this machine's clock is ahead)",
        fix: "renew the server's certificate (and `ca_file` for ACCOUNT, where it holds that certificate); check this machine's clock with `timedatectl`",
        matches: &[
            &["tls: invalid peer certificate: expired"],
            &["tls: invalid peer certificate: certificate expired"],
        ],
    },
    Diagnosis {
        only: None,
        code: "TLS NotValidYet",
        cause: "the upstream's TLS certificate is not valid yet: this machine's clock is most likely behind",
        fix: "check the clock with `timedatectl` (and that NTP is on: `timedatectl set-ntp true`)",
        matches: &[
            &["tls: invalid peer certificate: notvalidyet"],
            &["tls: invalid peer certificate: certificate not valid yet"],
        ],
    },
    Diagnosis {
        only: None,
        code: "TLS InvalidContentType",
        cause: "relay began TLS at once (smtp_tls = \"implicit\") and the upstream answered in plain text: its port speaks SMTP first (587 or 25, then STARTTLS)",
        fix: "for ACCOUNT set smtp_tls = \"starttls\" with this port, or smtp_port = 465 with smtp_tls = \"implicit\"",
        matches: &[&["tls: received corrupt message", "invalidcontenttype"]],
    },
    Diagnosis {
        only: None,
        code: "no greeting",
        cause: "the upstream took the connection but said nothing: a server that expects TLS first (implicit TLS, as on port 465) waits for relay's TLS hello; or the server hangs",
        fix: "if the port is an implicit-TLS one (465), set smtp_tls = \"implicit\" for ACCOUNT; else the server is stuck (`relay test ACCOUNT` shows the exchange)",
        matches: &[&["sent no greeting", "expects tls first"]],
    },
    Diagnosis {
        only: None,
        code: "TLS certificate",
        cause: "the upstream's TLS certificate was refused",
        fix: "`relay test ACCOUNT` shows the exchange; a private CA or the server's own certificate goes into `ca_file` for ACCOUNT",
        matches: &[&["tls: invalid peer certificate"]],
    },
    Diagnosis {
        only: None,
        code: "TLS certificate",
        cause: "the TLS certificate of the token endpoint or the HTTP API is not trusted (a private CA, or a proxy inspecting TLS)",
        fix: "add that CA to the system's certificate store (`/usr/local/share/ca-certificates/` then `update-ca-certificates`): `ca_file` is for the SMTP upstream only",
        matches: &[&["invalid peer certificate"]],
    },
    // --- Microsoft identity platform (login.microsoftonline.com) ---
    Diagnosis {
        only: None,
        code: "AADSTS50076",
        cause: "the sign-in needs multi-factor authentication, which a password flow cannot do",
        fix: "use flow = \"device_code\" (then `relay authorize ACCOUNT`) or client credentials, or exclude this account from the MFA Conditional Access policy",
        matches: &[&["aadsts50076"]],
    },
    Diagnosis {
        only: None,
        code: "AADSTS50079",
        cause: "the user must enroll in multi-factor authentication, which a password flow cannot do",
        fix: "use flow = \"device_code\" (then `relay authorize ACCOUNT`) or client credentials, or exclude this account from the MFA registration policy",
        matches: &[&["aadsts50079"]],
    },
    Diagnosis {
        only: None,
        code: "AADSTS50126",
        cause: "wrong user name or password",
        fix: "check `username` and the password in password_file (the user's sign-in name, not an alias), then `systemctl reload relay`",
        matches: &[&["aadsts50126"]],
    },
    Diagnosis {
        only: None,
        code: "AADSTS50034",
        cause: "the user does not exist in this tenant",
        fix: "check `mailbox` (or `username`) and `tenant`: the user must be a member of the tenant the app is registered in",
        matches: &[&["aadsts50034"]],
    },
    Diagnosis {
        only: None,
        code: "AADSTS65001",
        cause: "nobody has consented to the app's permissions",
        fix: "grant admin consent: Entra admin center > App registrations > the app > API permissions > \"Grant admin consent\"; then run `relay authorize ACCOUNT`",
        matches: &[&["aadsts65001"]],
    },
    Diagnosis {
        only: None,
        code: "AADSTS700016",
        cause: "no app with this client_id exists in the tenant",
        fix: "copy the Application (client) ID from Entra admin center > App registrations into client_id, and check `tenant` (the app must be registered in, or consented to by, that tenant)",
        matches: &[&["aadsts700016"]],
    },
    Diagnosis {
        only: None,
        code: "AADSTS7000215",
        cause: "the client secret is wrong",
        fix: "copy the secret's Value (not its Secret ID) from App registrations > Certificates & secrets into client_secret_file, then `systemctl reload relay`",
        matches: &[&["aadsts7000215"]],
    },
    Diagnosis {
        only: None,
        code: "AADSTS7000222",
        cause: "the client secret has expired",
        fix: "create a new secret in the app registration (Certificates & secrets), write its Value to client_secret_file and update client_secret_expires, then `systemctl reload relay`",
        matches: &[&["aadsts7000222"]],
    },
    Diagnosis {
        only: None,
        code: "AADSTS700082",
        cause: "the refresh token expired after 90 days without use",
        fix: RELAY_AUTHORIZE,
        matches: &[&["aadsts700082"]],
    },
    Diagnosis {
        only: None,
        code: "AADSTS70043",
        cause: "a Conditional Access sign-in frequency policy ended the session",
        fix: "run `relay authorize ACCOUNT`; to stop it recurring, exclude this account from the sign-in frequency policy or use client credentials",
        matches: &[&["aadsts70043"]],
    },
    Diagnosis {
        only: None,
        code: "AADSTS700027",
        cause: "the app registration does not know the certificate relay signs its client assertion with",
        fix: "upload certificate_file's certificate (its public part) to the app registration (Entra admin center > App registrations > the app > Certificates & secrets > Certificates), or point certificate_file and private_key_file at one that is uploaded, then `systemctl reload relay`",
        matches: &[&["aadsts700027"]],
    },
    Diagnosis {
        only: None,
        code: "AADSTS700024",
        cause: "the client assertion's times are outside what Entra accepts: this machine's clock is off",
        fix: "set the clock right and keep it so (`timedatectl set-ntp true`, then `timedatectl` shows \"System clock synchronized: yes\")",
        matches: &[&["aadsts700024"]],
    },
    Diagnosis {
        only: None,
        code: "AADSTS90002",
        cause: "the tenant does not exist",
        fix: "set `tenant` to the directory (tenant) ID or a verified domain of the tenant (Entra admin center > Overview)",
        matches: &[&["aadsts90002"]],
    },
    // --- Google (oauth2.googleapis.com) ---
    Diagnosis {
        only: Some(Provider::Google),
        code: "invalid_grant",
        cause: "Google expired or revoked the refresh token; an app whose OAuth consent screen is in \"Testing\" gets refresh tokens that last 7 days",
        fix: "publish the app (Google Cloud console > APIs & Services > OAuth consent screen > \"Publish app\", status \"In production\"), then run `relay authorize ACCOUNT`",
        matches: &[&["invalid_grant", "token has been expired or revoked"]],
    },
    Diagnosis {
        only: Some(Provider::Google),
        code: "invalid_grant",
        cause: "Google does not accept the service account key's signature: the key was deleted or disabled in the Cloud console, or service_account_file is another account's",
        fix: "create a key for the service account (Google Cloud console > IAM & Admin > Service Accounts > the account > Keys > Add key > JSON), write it to service_account_file, then `systemctl reload relay` (SIGHUP)",
        matches: &[&["invalid_grant", "invalid jwt signature"]],
    },
    Diagnosis {
        only: Some(Provider::Google),
        code: "invalid_grant",
        cause: "the JWT's times are outside what Google accepts: this machine's clock is off",
        fix: "set the clock right and keep it so (`timedatectl set-ntp true`, then `timedatectl` shows \"System clock synchronized: yes\")",
        matches: &[&["invalid_grant", "short-lived token"]],
    },
    Diagnosis {
        only: Some(Provider::Google),
        code: "invalid_grant",
        cause: "the service account may not act for this user: `mailbox` is not a user of the Workspace domain (a group, an alias or a consumer Gmail address cannot be impersonated)",
        fix: "set `mailbox` to the primary address of a Workspace user in the domain that granted the delegation",
        matches: &[&["invalid_grant", "invalid email or user id"]],
    },
    Diagnosis {
        only: Some(Provider::Google),
        code: "unauthorized_client",
        cause: "the service account has no domain-wide delegation for https://mail.google.com/",
        fix: "in the Google Admin console, Security > Access and data control > API controls > Manage Domain Wide Delegation, add the service account's client ID with the scope https://mail.google.com/ (it can take a while to apply)",
        matches: &[&[
            "unauthorized_client",
            "client is unauthorized to retrieve access tokens",
        ]],
    },
    // Any other provider's dead grant.
    Diagnosis {
        only: None,
        code: "invalid_grant",
        cause: "the grant was revoked or has expired",
        fix: RELAY_AUTHORIZE,
        matches: &[&["invalid_grant"]],
    },
    // --- No answer from the SMTP upstream at all (`smtp/conn.rs`: "upstream HOST:PORT: cannot connect: …") ---
    Diagnosis {
        only: None,
        code: "connection refused",
        cause: "nothing accepts connections at the upstream's address and port, or a firewall rejects them",
        fix: "check the account's smtp_host and smtp_port (Microsoft 365: smtp.office365.com, 587; Gmail: smtp.gmail.com, 587); `nc -vz HOST PORT` from this machine says whether anything answers",
        matches: &[&["cannot connect", "connection refused"]],
    },
    Diagnosis {
        only: None,
        code: "connection timed out",
        cause: "the upstream did not answer the connection: a firewall or the network provider drops outgoing SMTP (port 587, or 25), or the host is down",
        fix: "allow outgoing TCP to the account's smtp_host and smtp_port in the firewall; `nc -vz HOST PORT` from this machine says whether it answers; where the network blocks SMTP, set transport = \"graph\" (Microsoft) or \"gmail_api\" (Google), which use HTTPS",
        matches: &[&["cannot connect", "timed out"]],
    },
    Diagnosis {
        only: None,
        code: "name not resolved",
        cause: "the upstream's host name does not resolve on this machine",
        fix: "check the account's smtp_host for a typo, and this machine's DNS (`getent hosts HOST`)",
        matches: &[
            &["cannot connect", "failed to lookup address"],
            &["cannot connect", "name or service not known"],
            &["cannot connect", "the name has no address"],
        ],
    },
];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::NO_NEW_TOKEN;

    /// Replies as the providers word them (Trace and Correlation IDs shortened), and the code each must get.
    const CASES: &[(&str, &str, &str)] = &[
        (
            "552 5.3.4 Message size exceeds fixed maximum message size",
            "552 5.3.4",
            "max_message_size",
        ),
        (
            "552 5.2.3 Your message exceeded Google's message size limits. Please visit https://support.google.com/mail/?p=MaxSizeError to view our size guidelines. d2e1a72fcca58-7a1b2c3d4e5f - gsmtp",
            "552 5.3.4",
            "max_message_size",
        ),
        (
            "552 5.3.4 Message size exceeds fixed limit",
            "552 5.3.4",
            "max_message_size",
        ),
        (
            "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant. Visit https://aka.ms/smtp_auth_disabled for more information. [AM0PR02CA0013.eurprd02.prod.outlook.com 2024-05-01T10:00:00.000Z 08DC6A]",
            "535 5.7.139",
            "Turn off SMTP AUTH protocol",
        ),
        (
            "535 5.7.139 Authentication unsuccessful, user is locked by your organization's security defaults policy. Contact your administrator. [DB9PR05CA0012.eurprd05.prod.outlook.com]",
            "535 5.7.139",
            "security defaults",
        ),
        (
            "535 5.7.139 Authentication unsuccessful, the request did not meet the criteria to be authenticated successfully. Contact your administrator. [BN9PR03CA0541.namprd03.prod.outlook.com]",
            "535 5.7.139",
            "Conditional Access",
        ),
        (
            "permanent error (535): 5.7.139 Authentication unsuccessful, the user credentials were incorrect. [LO4P123CA0042.GBRP123.PROD.OUTLOOK.COM]",
            "535 5.7.139",
            "Authenticated SMTP",
        ),
        (
            "535 5.7.3 Authentication unsuccessful [SN4PR0501CA0036.namprd05.prod.outlook.com]",
            "535 5.7.3",
            "Add-MailboxPermission",
        ),
        (
            "550 5.7.30 Basic authentication is not supported for Client Submission.",
            "550 5.7.30",
            "graph",
        ),
        (
            "550 5.4.5 Daily user sending limit exceeded. For more information on Gmail sending limits go to https://support.google.com/a/answer/166852 - gsmtp",
            "550 5.4.5",
            "recipients_per_day",
        ),
        (
            "554 5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException; Failed to process message due to a permanent exception with message [BeginDiagnosticData]Message submission quota exceeded.",
            "554 5.2.0 SubmissionQuotaExceeded",
            "recipients_per_day",
        ),
        (
            "554 5.2.252 SendAsDenied; relay@contoso.com not allowed to send as scanner@lan.test; STOREDRV.Submission.Exception:SendAsDeniedException.MapiExceptionSendAsDenied; Failed to process message due to a permanent exception with message [BeginDiagnosticData]Cannot submit message. 0.35250:0A00C0A2, 1.36674:0A000000 [Hostname=AM9PR02MB7028.eurprd02.prod.outlook.com]",
            "554 5.2.252 SendAsDenied",
            "rewrite_from",
        ),
        (
            "Graph answered 403 ErrorSendAsDenied: The user account which was used to submit this request does not have the right to send mail on behalf of the specified sending account.",
            "554 5.2.252 SendAsDenied",
            "rewrite_from",
        ),
        (
            "550 5.7.60 SMTP; Client does not have permissions to send as this sender [AM6PR0202MB3381.eurprd02.prod.outlook.com]",
            "550 5.7.60",
            "SendAs",
        ),
        (
            "550 5.7.708 Service unavailable. Access denied, traffic not accepted from this IP. For more information please go to http://go.microsoft.com/fwlink/?LinkId=526653 AS(7208) [DB8EUR05FT012.eop-eur05.prod.protection.outlook.com]",
            "550 5.7.708",
            "Restricted entities",
        ),
        (
            "501 5.5.127 Invalid XOAUTH2 auth data [AM0PR10CA0027.EURPRD10.PROD.OUTLOOK.COM]",
            "501 5.5.127",
            "mailbox",
        ),
        (
            "501 5.5.124 Invalid XOAUTH2 auth data - User address provided is not valid. Please ensure the auth data has a valid user address",
            "501 5.5.124",
            "mailbox",
        ),
        (
            "535-5.7.8 Username and Password not accepted. For more information, go to\n535 5.7.8  https://support.google.com/mail/?p=BadCredentials d2e1a72fcca58-6f4f2c8d1a3sm1234567b3a.12 - gsmtp",
            "535 5.7.8",
            "relay authorize office",
        ),
        (
            "534-5.7.9 Application-specific password required. Learn more at\n534 5.7.9  https://support.google.com/mail/?p=InvalidSecondFactor a640c23a62f3a-a6f2c1b5e2esm123456466b.77 - gsmtp",
            "534 5.7.9",
            "flow",
        ),
        (
            "token endpoint said invalid_grant (HTTP 400): AADSTS50076: Due to a configuration change made by your administrator, or because you moved to a new location, you must use multi-factor authentication to access '00000002-0000-0ff1-ce00-000000000000'. Trace ID: 0b2f Correlation ID: 7c1e Timestamp: 2024-05-01 10:00:00Z",
            "AADSTS50076",
            "device_code",
        ),
        (
            "token endpoint said invalid_grant (HTTP 400): AADSTS50079: Due to a configuration change made by your administrator, or because you moved to a new location, you must enroll in multi-factor authentication to access '00000002-0000-0ff1-ce00-000000000000'.",
            "AADSTS50079",
            "device_code",
        ),
        (
            "token endpoint said invalid_grant (HTTP 400): AADSTS50126: Error validating credentials due to invalid username or password. Trace ID: 5d1f",
            "AADSTS50126",
            "password_file",
        ),
        (
            "token endpoint said invalid_grant (HTTP 400): AADSTS50034: The user account {EUII Hidden} does not exist in the contoso.onmicrosoft.com directory. To sign into this application, the account must be added to the directory.",
            "AADSTS50034",
            "tenant",
        ),
        (
            "token endpoint said invalid_grant (HTTP 400): AADSTS65001: The user or administrator has not consented to use the application with ID '3f2a' named 'relay'. Send an interactive authorization request for this user and resource.",
            "AADSTS65001",
            "Grant admin consent",
        ),
        (
            "token endpoint said unauthorized_client (HTTP 400): AADSTS700016: Application with identifier '3f2a' was not found in the directory 'Contoso'. This can happen if the application has not been installed by the administrator of the tenant or consented to by any user in the tenant. You may have sent your authentication request to the wrong tenant.",
            "AADSTS700016",
            "client_id",
        ),
        (
            "token endpoint said invalid_client (HTTP 401): AADSTS7000215: Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID, for a secret added to app '3f2a'.",
            "AADSTS7000215",
            "Value",
        ),
        (
            "token endpoint said invalid_client (HTTP 401): AADSTS7000222: The provided client secret keys for app '3f2a' are expired. Visit the Azure portal to create new keys for your app: https://aka.ms/NewClientSecret, or consider using certificate credentials for added security: https://aka.ms/certCreds.",
            "AADSTS7000222",
            "create a new secret",
        ),
        (
            "token endpoint said invalid_grant (HTTP 400): AADSTS700082: The refresh token has expired due to inactivity. The token was issued on 2024-01-01T10:00:00.0000000Z and was inactive for 90.00:00:00.",
            "AADSTS700082",
            "relay authorize office",
        ),
        (
            "token endpoint said invalid_grant (HTTP 400): AADSTS70043: The refresh token has expired or is invalid due to sign-in frequency checks by conditional access. The token was issued on 2023-06-02T14:27:05.8405153Z and the maximum allowed lifetime for this request is 86400.",
            "AADSTS70043",
            "sign-in frequency",
        ),
        (
            "token endpoint said invalid_request (HTTP 400): AADSTS90002: Tenant 'contoso.onmicrosoft.co' not found. Check to make sure you have the correct tenant ID and are signing into the correct cloud.",
            "AADSTS90002",
            "tenant",
        ),
        (
            "token endpoint said invalid_grant (HTTP 400): Token has been expired or revoked.",
            "invalid_grant",
            "Testing",
        ),
        (
            "token endpoint said unauthorized_client (HTTP 401): Client is unauthorized to retrieve access tokens using this method, or client not authorized for any of the scopes requested.",
            "unauthorized_client",
            "Domain Wide Delegation",
        ),
        (
            "token endpoint said invalid_client (HTTP 401): AADSTS700027: Client assertion failed signature validation. Trace ID: 1a2b",
            "AADSTS700027",
            "certificate_file",
        ),
        (
            "token endpoint said invalid_client (HTTP 400): AADSTS700024: Client assertion is not within its valid time range. Current time: 2024-05-01T10:00:00Z, assertion valid from 2024-05-01T11:00:00Z",
            "AADSTS700024",
            "timedatectl",
        ),
        (
            "token endpoint said invalid_grant (HTTP 400): Invalid JWT Signature.",
            "invalid_grant",
            "service_account_file",
        ),
        (
            "token endpoint said invalid_grant (HTTP 400): Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe. Check your iat and exp values in the JWT claim.",
            "invalid_grant",
            "timedatectl",
        ),
        (
            "token endpoint said invalid_grant (HTTP 400): Invalid email or User ID",
            "invalid_grant",
            "Workspace user",
        ),
        (
            "token endpoint said invalid_grant (HTTP 400): refresh token revoked",
            "invalid_grant",
            "relay authorize office",
        ),
    ];

    /// Each TLS refusal gets its own row; a message dead of old age that quotes one gets that one (not "expired"),
    /// and the HTTP clients' refusals are not told to set `ca_file`.
    /// The SMTP client's own words when no connection is made (`smtp/conn.rs`), and the table's advice.
    /// A refused token whose renewal failed is diagnosed by why no new token came, not by the refusal (which read
    /// as "tick Authenticated SMTP" while the token endpoint was down).
    #[test]
    fn a_refused_token_without_a_new_one_is_diagnosed_by_the_renewal() {
        let refused = "535 5.7.3 Authentication unsuccessful";
        assert!(for_log(refused, Some("office"), None).is_some());
        for cause in [
            "account office: token endpoint answered HTTP 503: down",
            "account office: token endpoint refused the grant: invalid_grant: AADSTS70008: The refresh token has expired",
        ] {
            let text = format!(
                "the upstream refused the account's token ({refused}){NO_NEW_TOKEN}{cause}"
            );
            assert_eq!(
                for_log(&text, Some("office"), None),
                for_log(cause, Some("office"), None),
                "{text}"
            );
        }
    }

    #[test]
    fn an_upstream_that_does_not_answer_is_explained() {
        for (text, code) in [
            (
                "upstream 127.0.0.1:2704: cannot connect: Connection refused (os error 111)",
                "connection refused",
            ),
            (
                "upstream smtp.office365.com:587: cannot connect: timed out (smtp_timeout)",
                "connection timed out",
            ),
            (
                "upstream smtp.offce365.com:587: cannot connect: failed to lookup address information: Name or service not known",
                "name not resolved",
            ),
        ] {
            assert_eq!(diagnose(text, None).map(|d| d.code), Some(code), "{text}");
        }
    }

    #[test]
    fn tls_certificate_refusals() {
        let smtp = "upstream mail.example.net:587: TLS: invalid peer certificate: ";
        for (text, code) in [
            (format!("{smtp}UnknownIssuer"), "TLS UnknownIssuer"),
            (
                format!(
                    "expired after 5days in the queue; last error: {smtp}Other(OtherError(CaUsedAsEndEntity))"
                ),
                "TLS CaUsedAsEndEntity",
            ),
            (
                format!("expired after 5days in the queue; last error: {smtp}BadSignature"),
                "TLS certificate",
            ),
            (
                format!(
                    "{smtp}certificate not valid for name \"10.0.0.5\"; certificate is only valid for DnsName(\"mail\")"
                ),
                "TLS NotValidForName",
            ),
            (
                format!(
                    "{smtp}certificate expired: verification time 1800000000 (UNIX), but certificate is not valid after 1700000000 (100000000 seconds ago)"
                ),
                "TLS Expired",
            ),
            (format!("{smtp}NotValidYet"), "TLS NotValidYet"),
            // A CA-issued certificate naming its host in the Common Name only: a new name would not help.
            (
                format!(
                    "{smtp}certificate not valid for name \"localhost\"; certificate is not valid for any names (according to its subjectAltName extension)"
                ),
                "TLS no subjectAltName",
            ),
        ] {
            assert_eq!(diagnose(&text, None).map(|d| d.code), Some(code), "{text}");
        }
        let http = "cannot reach https://idp.example.net/token: client error (Connect): invalid peer certificate: UnknownIssuer";
        let d = diagnose(http, None).unwrap();
        assert!(d.fix.contains("update-ca-certificates"), "{d:?}");
    }

    #[test]
    fn each_listed_reply_gets_its_diagnosis() {
        for (reply, code, fix_word) in CASES {
            let d = diagnose(reply, None).unwrap_or_else(|| panic!("no diagnosis for {reply:?}"));
            assert_eq!(d.code, *code, "{reply}");
            let text = d.text(Some("office"));
            assert!(text.contains(fix_word), "{reply}: {text}");
            assert!(!text.contains("ACCOUNT"), "{text}");
        }
    }

    /// Another server's RFC 4954 codes get words about the server, not Gmail's (nor Exchange's for 5.7.3).
    #[test]
    fn another_servers_login_refusals_are_not_taken_for_gmails() {
        for (reply, code) in [
            (
                "535 5.7.8 Error: authentication failed: authentication failure",
                "535 5.7.8",
            ),
            (
                "534 5.7.9 Authentication mechanism is too weak",
                "534 5.7.9",
            ),
        ] {
            let d = diagnose(reply, None).unwrap_or_else(|| panic!("no diagnosis for {reply:?}"));
            assert_eq!(d.code, code, "{reply}");
            assert!(!d.cause.contains("Gmail"), "{reply}: {}", d.cause);
        }
        assert_eq!(diagnose("535 5.7.3 no such user here", None), None);
        // Exchange on premises says it without a server name.
        let exchange = diagnose("535 5.7.3 Authentication unsuccessful", None).map(|d| d.cause);
        assert!(exchange.is_some_and(|c| c.contains("Exchange")));
    }

    /// A generic account's server says what Exchange Online or Gmail say with other meanings: their rows are
    /// skipped unless the reply names their servers; codes only Microsoft uses still fit.
    #[test]
    fn another_providers_rows_fit_only_when_its_servers_speak() {
        let g = Some(Provider::Generic);
        let code = |text, p| diagnose(text, p).map(|d| d.code);
        let on_prem = "535 5.7.3 Authentication unsuccessful";
        assert_eq!(code(on_prem, g), None);
        assert_eq!(code(on_prem, Some(Provider::Microsoft)), Some("535 5.7.3"));
        assert_eq!(code(on_prem, Some(Provider::Google)), None);
        let online =
            "535 5.7.3 Authentication unsuccessful [SN4PR0501CA0036.namprd05.prod.outlook.com]";
        assert_eq!(code(online, g), Some("535 5.7.3"));
        let gmail = "535 5.7.8 Username and Password not accepted. For more information, go to https://support.google.com/mail/?p=BadCredentials - gsmtp";
        assert_eq!(code(gmail, g), Some("535 5.7.8"));
        let d = diagnose(gmail, g).unwrap();
        assert!(d.cause.contains("Gmail"), "{}", d.cause);
        let other = "535 5.7.8 Error: authentication failed: invalid token";
        let d = diagnose(other, g).unwrap();
        assert!(!d.cause.contains("Gmail"), "{}", d.cause);
        assert!(!d.fix.contains("mail.google.com"), "{}", d.fix);
        let revoked =
            "token endpoint said invalid_grant (HTTP 400): Token has been expired or revoked.";
        assert!(!diagnose(revoked, g).unwrap().cause.contains("Google"));
        assert!(
            diagnose(revoked, Some(Provider::Google))
                .unwrap()
                .cause
                .contains("Google")
        );
        assert_eq!(
            code(
                "550 5.7.30 Basic authentication is not supported for Client Submission.",
                g
            ),
            Some("550 5.7.30")
        );
    }

    #[test]
    fn an_unknown_recipient_is_said_as_such() {
        for reply in [
            "550 5.1.1 <b@example.com>: Recipient address rejected: user unknown",
            "550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup",
            "550-5.1.1 The email account that you tried to reach does not exist. - gsmtp",
        ] {
            assert_eq!(
                diagnose(reply, None).map(|d| d.code),
                Some("550 5.1.1"),
                "{reply}"
            );
        }
        assert_eq!(diagnose("550 5.1.100 other", None), None);
    }

    #[test]
    fn codes_match_whole() {
        for text in [
            // 5.7.30 is not 5.7.3, and without 550 not the 5.7.30 entry either.
            "535 5.7.30 something else",
            "550 5.7.3 not this",
            "451 4.7.500 Server busy",
            "AADSTS500761: unknown",
            "535 15.7.8 no",
            "cannot reach the token endpoint: connection refused",
        ] {
            assert_eq!(diagnose(text, None).map(|d| d.code), None, "{text}");
        }
        assert!(contains_code("535 5.7.3. done", "5.7.3"));
        assert!(!contains_code("535 5.7.3.1", "5.7.3"));
    }

    #[test]
    fn a_refused_grant_that_needs_no_person_blames_its_credentials() {
        let dead = "token endpoint said invalid_grant (HTTP 400): refresh token revoked";
        let expired = "token endpoint said invalid_grant (HTTP 400): AADSTS700082: The refresh token has expired due to inactivity.";
        for text in [dead, expired] {
            let person = for_grant(text, Some("office"), true, None).unwrap();
            assert!(person.contains("relay authorize office"), "{person}");
            let own = for_grant(text, Some("office"), false, None).unwrap();
            assert!(own.contains("credentials"), "{own}");
            assert!(own.contains("systemctl reload relay"), "{own}");
        }
        // Explained once, the text is not diagnosed again (the generic entry would say `relay authorize`).
        let own = for_grant(dead, Some("office"), false, None);
        let explained = format!("account office: {dead}; {}", own.clone().unwrap());
        assert_eq!(for_log(&explained, Some("office"), None), own);
        // What the table says about credentials stays as it is.
        let secret = "token endpoint said invalid_client (HTTP 401): AADSTS7000215: Invalid client secret provided.";
        assert_eq!(
            for_grant(secret, Some("office"), false, None),
            for_log(secret, Some("office"), None)
        );
    }

    /// A refused grant explained for an account whose secret is a LoadCredential= copy says to restart, and a
    /// deferral that carries that text is recognised as explained: its diagnosis is the same one, fitted the same
    /// way, not the table's other words for the code.
    #[test]
    fn the_advice_for_a_credential_copy_is_a_restart_and_is_recognised_again() {
        let dead = "token endpoint said invalid_grant (HTTP 400): refresh token revoked";
        let text = "[[account]]\nname = \"office\"\nprovider = \"generic\"\nflow = \"client_credentials\"\nmailbox = \"a@example.com\"\nclient_id = \"c\"\nclient_secret_file = \"$CREDENTIALS_DIRECTORY/office\"\ntoken_url = \"https://idp.test/token\"\nsmtp_host = \"smtp.test\"\nscope = \"s\"\n";
        let config =
            crate::config::Config::parse_for(text, "x.toml", crate::config::Secrets::NotRead)
                .unwrap_or_else(|e| panic!("{e}"));
        let rotation = crate::config::Rotation::of(&config.accounts[0]);
        let own = Diagnosed::of_grant(dead, Some("office"), false, None).advised(&rotation);
        let own = own.field().unwrap().to_string();
        assert!(own.contains("systemctl restart relay"), "{own}");
        assert!(!own.contains("systemctl reload relay"), "{own}");
        let deferred = format!("cannot get a token: account office: {dead}; {own}");
        let again = Diagnosed::of(&deferred, Some("office"), None).advised(&rotation);
        assert_eq!(again.field(), Some(own.as_str()));
        // Another account's plain file: the same words, a reload.
        let plain = Diagnosed::of(&deferred, Some("office"), None).advised(&Default::default());
        assert!(
            plain
                .field()
                .unwrap()
                .contains("then `systemctl reload relay` (SIGHUP)"),
            "{:?}",
            plain.field()
        );
    }
}
