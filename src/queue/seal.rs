//! The seal on a queue file: the message's length and BLAKE3 hash, written into the envelope line when the
//! message is complete.
//!
//! A message is written straight into `queue/` and made durable with one flush shared by the whole batch. The
//! seal is what tells a finished message from one still arriving (its seal is all zeros) and from one cut off by a
//! crash in the middle of the flush (its bytes do not match the seal; such a message was never acknowledged). It
//! replaces the usual temp-file-then-rename, whose directory flush was a second disk flush per batch.

use std::fmt::Write as _;

/// Hex digits in a seal: 16 for the length, 64 for the hash.
pub const SEAL_LEN: usize = 80;

/// The seal of a message still being received.
pub const UNSEALED: &str =
    "00000000000000000000000000000000000000000000000000000000000000000000000000000000";

/// Seals `len` bytes that hash to `hash`.
pub fn seal(len: u64, hash: &blake3::Hash) -> String {
    let mut s = String::with_capacity(SEAL_LEN);
    let _ = write!(s, "{len:016x}{}", hash.to_hex());
    s
}

/// Whether a seal is a finished one (it may still fail [`verify`] after a crash).
pub fn is_sealed(seal: &str) -> bool {
    seal.len() == SEAL_LEN && seal != UNSEALED
}

/// Whether `message` is what was sealed. Delivery checks this before sending.
pub fn verify(seal_hex: &str, message: &[u8]) -> bool {
    is_sealed(seal_hex) && seal(message.len() as u64, &blake3::hash(message)) == seal_hex
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seals_and_verifies() {
        assert_eq!(UNSEALED.len(), SEAL_LEN);
        let s = seal(5, &blake3::hash(b"hello"));
        assert_eq!(s.len(), SEAL_LEN);
        assert!(verify(&s, b"hello"));
        assert!(!verify(&s, b"hellO"));
        assert!(!verify(UNSEALED, b""));
    }
}
