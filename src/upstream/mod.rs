//! Upstream transports. One module per transport; each turns a delivery into an [`Outcome`] the queue acts on
//! without looking inside it.

// Not a transport: makes lines over 998 octets fit the SMTP one.
pub mod long_lines;
pub mod smtp;

/// What became of one delivery attempt, and so what the queue does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Accepted upstream: remove from the queue. Carries the upstream reply.
    Delivered(String),
    /// Try again later (4xx, connection or TLS trouble, no token yet).
    Transient(String),
    /// Refused for good (5xx): move to `dead/`.
    Permanent(String),
    /// The upstream refused the token (535): refresh once and retry, then defer.
    AuthRejected(String),
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("upstream set-up: {0}")]
    Setup(String),
}
