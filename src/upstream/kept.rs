//! What one delivery attempt keeps for the next attempt of the same message through the same account: a Gmail
//! upload session begun, a Graph draft made. Either may have sent the message without relay hearing so (a stop,
//! a crash, an answer lost), and the next attempt asks it first: sent anew, the message would go twice. The queue
//! implements [`ResumePoint`] over the message's delivery state, so that the transports know nothing of its files.

use std::time::SystemTime;

use super::gmail::UploadSession;

/// A Graph draft an attempt made: its immutable id, and when its `/send` was posted, if it was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Draft {
    pub id: String,
    pub sent_at: Option<SystemTime>,
}

/// Where an attempt's upload session or draft is kept, for the account the attempt goes through.
pub trait ResumePoint: Send + Sync {
    /// The session an earlier attempt of this message through this account began, if one is kept.
    fn load(&self) -> Option<UploadSession>;
    /// Keeps `session` in place of any other (`None`: none), on disk before it returns.
    fn save(&self, session: Option<UploadSession>) -> std::io::Result<()>;
    /// The kept session is only asked whether it sent the message, and nothing of it is uploaded: the message
    /// is past the queue's `max_age` (a bounce would tell its sender it failed), or another account is to send it
    /// (uploaded anew, it would go twice if the session had sent it).
    fn ask_only(&self) -> bool {
        false
    }
    /// The Graph draft an earlier attempt of this message through this account made and did not see through
    /// (sent, or removed), if one is kept.
    fn draft(&self) -> Option<Draft> {
        None
    }
    /// Keeps the draft this attempt made in place of this account's earlier one (`None`: none is left), on disk
    /// before it returns.
    fn keep_draft(&self, _draft: Option<Draft>) -> std::io::Result<()> {
        Ok(())
    }
}
