//! What relay knows about a queued message besides its bytes.
//!
//! A queued message is one file, `queue/ID.msg`: this envelope and the message's seal as one line of JSON, then
//! the message (relay's `Received:` line and the bytes the client sent). One file per message because creating a
//! file is the costliest step of accepting one; see `spool.rs`. Everything here is known when DATA begins, so the
//! line is written first and the body streams after it. Delivery state that changes later (attempts, errors)
//! belongs in a separate file written only when an attempt fails.

use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use super::QueueId;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Envelope {
    pub id: QueueId,
    /// The envelope sender (MAIL FROM); empty for the null sender `<>`.
    pub sender: String,
    pub recipients: Vec<String>,
    /// The client's address, as `IP:PORT`.
    pub client: String,
    /// What the client said in EHLO/HELO.
    pub helo: Option<String>,
    /// The SMTP AUTH user, when the client logged in.
    pub user: Option<String>,
    /// The listener's address the message came in on.
    pub listener: String,
    #[serde(with = "humantime_serde")]
    pub received_at: SystemTime,
    /// The client declared BODY=8BITMIME.
    #[serde(default)]
    pub body_8bit: bool,
    /// The client declared SMTPUTF8 (RFC 6531). Left out of the file when false, as in files written before it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub smtputf8: bool,
    /// A delivery status notification's: the account the failed message went through, which carries the report
    /// when nothing else routes it. The report's own envelope (the null sender, to the device) matches none of the
    /// routes that sent the message (`sender = "*@scanner.lan"`), and without `default_account` it would wait for
    /// an account until max_age.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via: Option<String>,
}

#[cfg(test)]
impl Envelope {
    /// A message from `sender` to `recipients`, received now from a LAN device: what unit tests queue.
    pub(crate) fn example(sender: &str, recipients: &[&str]) -> Envelope {
        Envelope {
            id: QueueId::new(),
            sender: sender.into(),
            recipients: recipients.iter().map(|r| r.to_string()).collect(),
            client: "127.0.0.1:1".into(),
            helo: None,
            user: None,
            listener: "127.0.0.1:25".into(),
            received_at: SystemTime::now(),
            body_8bit: false,
            smtputf8: false,
            via: None,
        }
    }
}
