//! `relay test ACCOUNT --to ADDR`: one message now, through the account's transport, bypassing the queue, with
//! the conversation recorded (tokens redacted) and a diagnosis in plain words when it fails. The result is
//! remembered in `STATE_DIR/accounts/NAME.test.json` for `relay status`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::upstream::Outcome;
use crate::upstream::outgoing::Outgoing;
use crate::upstream::transcript::Transcript;

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("no account named `{0}` in the config")]
    NoAccount(String),
    #[error("recipient `{0}`: not an address")]
    BadRecipient(String),
    #[error(transparent)]
    Account(#[from] crate::accounts::AccountError),
    #[error(
        "account `{account}`: a running relay process (pid {pid}) holds a renewed grant for it in memory that it could not save to {file} ({why}); a test now would renew the older grant in that file, which the provider may have replaced (a rotated refresh token: using it again can revoke both). Make the token file's directory writable (`relay status` says when the daemon has saved the grant), then test again"
    )]
    GrantHeldUnsaved {
        account: String,
        pid: u32,
        file: String,
        why: String,
    },
}

/// What `relay test` found.
pub struct Report {
    pub account: String,
    pub transcript: Transcript,
    pub outcome: Outcome,
    /// The cause and the fix in plain words, when the failure is one relay knows.
    pub diagnosis: Option<String>,
    /// The account's queued messages made due now by a test that went through: what the sysadmin fixed and
    /// tested is what held them (a running daemon sends them at once, the account's own waits lifted).
    pub due_now: usize,
}

impl Report {
    pub fn delivered(&self) -> bool {
        matches!(self.outcome, Outcome::Delivered(_))
    }
}

/// `STATE_DIR/accounts/NAME.test.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LastTest {
    /// `verified` or `failing`.
    pub result: String,
    #[serde(with = "humantime_serde")]
    pub at: SystemTime,
    pub to: String,
    pub reply: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diagnosis: Option<String>,
}

pub fn last_test_path(state_dir: &Path, account: &str) -> PathBuf {
    state_dir
        .join("accounts")
        .join(format!("{account}.test.json"))
}

pub fn read_last_test(state_dir: &Path, account: &str) -> Option<LastTest> {
    let path = last_test_path(state_dir, account);
    crate::small_files::report(&path)
}

/// Sends the test message and records the result.
pub async fn run(config: &Config, account: &str, to: &str) -> Result<Report, ProbeError> {
    let a = config
        .accounts
        .iter()
        .find(|a| a.name == account)
        .ok_or_else(|| ProbeError::NoAccount(account.to_string()))?;
    if !to.contains('@') || to.bytes().any(|b| b.is_ascii_control() || b == b' ') {
        return Err(ProbeError::BadRecipient(to.to_string()));
    }
    let http = crate::accounts::shared_http()?;
    let store = crate::accounts::token_store(config)?;
    // The daemon's newest grant is in its memory only: a second owner of the grant must not renew the file's.
    // (Only while a relay holds the state dir: a mark whose pid was reused after its daemon stopped is not one.)
    if let Some(u) = store.unsaved(account).filter(|u| u.may_be_held())
        && let Some(pid) = u.pid.filter(|p| *p != std::process::id())
        && crate::queue::relay_runs_on(&config.state_dir)
    {
        return Err(ProbeError::GrantHeldUnsaved {
            account: account.to_string(),
            pid,
            file: store.path(account).display().to_string(),
            why: u.why,
        });
    }
    let built = crate::accounts::build_one(config, a, &http, &store, None)?;
    let transcript = Arc::new(Mutex::new(Transcript::default()));
    let message = Outgoing::from_bytes(test_message(&a.mailbox, to));
    let sender = built.rewrite.envelope_sender(&a.mailbox).to_string();
    let outcome = built
        .transports
        .probe(
            &built.tokens,
            &sender,
            &[to.to_string()],
            &message,
            transcript.clone(),
        )
        .await;
    let diagnosis = match &outcome {
        Outcome::Delivered(_) => None,
        other => {
            let header = a.rewrite_from == crate::config::RewriteFrom::Header;
            crate::upstream::diagnosis::Diagnosed::of(
                other.reply(),
                Some(account),
                Some(a.provider),
            )
            .advised(&crate::config::Rotation::of(a))
            .rewriting(header, other.reply(), Some(account))
            .field()
            .map(str::to_string)
            // The HTTP transports put their own advice after the provider's words.
            .or_else(|| {
                other
                    .reply()
                    .rsplit_once(" — ")
                    .map(|(_, why)| why.to_string())
            })
        }
    };
    let transcript = transcript.lock().map(|t| t.clone()).unwrap_or_default();
    let mut report = Report {
        account: account.to_string(),
        transcript,
        outcome,
        diagnosis,
        due_now: 0,
    };
    record(&config.state_dir, &report, to);
    if report.delivered() {
        // Only the mail this account takes, and only its waits lifted (see `request_account_retry`).
        let routing = crate::queue::route::Routing::new(config);
        let routed = |e: &crate::queue::Envelope| {
            routing
                .route(crate::queue::route::Addressing::from(e))
                .is_some_and(|d| d.accounts.iter().any(|n| n == account))
        };
        report.due_now =
            crate::queue::retry::request_account_retry(&config.state_dir, account, routed)
                .unwrap_or(0);
    }
    Ok(report)
}

fn record(state_dir: &Path, report: &Report, to: &str) {
    let doc = LastTest {
        result: if report.delivered() {
            "verified"
        } else {
            "failing"
        }
        .into(),
        at: SystemTime::now(),
        to: to.to_string(),
        reply: report.outcome.reply().to_string(),
        diagnosis: report.diagnosis.clone(),
    };
    let path = last_test_path(state_dir, &report.account);
    // A report, not mail: not fsynced.
    let written =
        crate::state_files::replace(&path, &serde_json::to_vec_pretty(&doc).unwrap_or_default());
    if let Err(e) = written {
        tracing::warn!(relay_account = %report.account, error = %e, "cannot record the test result");
    }
}

/// A short plain-text message that says what it is.
fn test_message(from: &str, to: &str) -> Vec<u8> {
    let now = SystemTime::now();
    let host = hostname();
    let id = uuid::Uuid::now_v7();
    format!(
        "From: relay test <{from}>\r\n\
         To: <{to}>\r\n\
         Subject: relay test message from {host}\r\n\
         Date: {date}\r\n\
         Message-ID: <{id}@{host}>\r\n\
         MIME-Version: 1.0\r\n\
         Content-Type: text/plain; charset=utf-8\r\n\
         \r\n\
         This message was sent by `relay test` on {host} to check that the account's\r\n\
         upstream accepts mail. No reply is needed.\r\n",
        date = crate::mailgen::date(now),
    )
    .into_bytes()
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}
