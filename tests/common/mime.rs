//! What a mail program shows of a message (mail-parser decoding), to check that wrapping long lines kept it.
//! Shared by `tests/long_lines.rs` and the unit tests of `src/upstream/long_lines.rs`, which include this file.

use mail_parser::{Message, MessageParser, PartType};

/// Each leaf part's decoded content, nested messages included.
pub fn leaves(raw: &[u8]) -> Vec<Vec<u8>> {
    fn collect(message: &Message<'_>, out: &mut Vec<Vec<u8>>) {
        for part in &message.parts {
            match &part.body {
                PartType::Multipart(_) => {}
                PartType::Message(m) => collect(m, out),
                _ => out.push(part.contents().to_vec()),
            }
        }
    }
    let message = MessageParser::default()
        .parse(raw)
        .expect("a message mail-parser reads");
    let mut out = Vec::new();
    collect(&message, &mut out);
    out
}

/// `wrapped` decodes to the same parts as `original`; returns them.
pub fn assert_same_leaves(original: &[u8], wrapped: &[u8]) -> Vec<Vec<u8>> {
    let (a, b) = (leaves(original), leaves(wrapped));
    assert_eq!(
        a.len(),
        b.len(),
        "as many parts:\n{}",
        String::from_utf8_lossy(wrapped)
    );
    for (i, (a, b)) in a.iter().zip(&b).enumerate() {
        assert!(
            a == b,
            "part {i} decodes to something else:\n{}",
            String::from_utf8_lossy(wrapped)
        );
    }
    b
}
