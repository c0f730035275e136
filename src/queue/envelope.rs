//! What relay knows about a queued message besides its bytes: stored as `queue/ID.json` beside `queue/ID.eml`.

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
    /// Bytes in `ID.eml`: the `Received:` line plus the message as the client sent it.
    pub size: u64,
    /// The client declared BODY=8BITMIME.
    #[serde(default)]
    pub body_8bit: bool,
    /// Delivery attempts so far.
    #[serde(default)]
    pub attempts: u32,
    #[serde(
        default,
        with = "humantime_serde::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub next_attempt: Option<SystemTime>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}
