//! Text that came from outside (a client's headers and envelope, an upstream's reply), made safe to print on a
//! person's terminal. A device on the LAN writes the headers that `relay queue show` prints, and root reads them:
//! `Subject: \x1b[2J\x1b]0;pwned\x07` must not clear the screen, retitle the window or write to the clipboard.
//! `--json` output needs none of this: JSON escapes control characters itself.

use std::borrow::Cow;
use std::fmt::Write;

/// `text` with every character a terminal could act on written as an escape (see [`printable`]); borrowed when
/// there is none, as almost always.
pub fn printable_str(text: &str) -> Cow<'_, str> {
    if !text.chars().any(needs_escape) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        push_char(&mut out, c);
    }
    Cow::Owned(out)
}

/// `bytes` as text with every control written as an escape: the C0 controls but tab (ESC as `\x1b`), DEL
/// (`\x7f`), the C1 controls (`\u{9b}`, CSI), Unicode's bidirectional embeddings, overrides and isolates
/// (`\u{202e}`, which reorder what follows on screen), and each byte that is not part of valid UTF-8 (`\xff`:
/// a terminal in an 8-bit locale reads a lone 0x9b as CSI). Everything else, non-ASCII text included, is kept.
/// A backslash is kept as it is: the escapes are for reading, not for parsing back.
pub fn printable(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            push_char(&mut out, c);
        }
        for b in chunk.invalid() {
            // Writing to a String cannot fail.
            let _ = write!(out, "\\x{b:02x}");
        }
    }
    out
}

/// As [`printable`] for several lines: each `\n` is kept as a line end, and everything else is escaped (a `\r`
/// too, which would let a line overwrite the one before it).
pub fn printable_lines(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
        if i > 0 {
            out.push('\n');
        }
        out.push_str(&printable(line));
    }
    out
}

fn needs_escape(c: char) -> bool {
    (c.is_control() && c != '\t')
        || matches!(c, '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

fn push_char(out: &mut String, c: char) {
    if !needs_escape(c) {
        out.push(c);
    } else if c.is_ascii() {
        let _ = write!(out, "\\x{:02x}", c as u32);
    } else {
        let _ = write!(out, "\\u{{{:x}}}", c as u32);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_sequences_are_shown_not_run() {
        assert_eq!(
            printable(b"Subject: \x1b[2J\x1b]0;pwned\x07"),
            "Subject: \\x1b[2J\\x1b]0;pwned\\x07"
        );
        // OSC 52 (write to the clipboard), ended by ST.
        assert_eq!(
            printable(b"X: \x1b]52;c;cm0gLXJmIH4=\x1b\\"),
            "X: \\x1b]52;c;cm0gLXJmIH4=\\x1b\\"
        );
        assert_eq!(printable(b"a\rb\x00c\x7fd\x08"), "a\\x0db\\x00c\\x7fd\\x08");
    }

    #[test]
    fn tab_and_ordinary_text_are_kept() {
        let text = "Subject:\tR\u{e9}sum\u{e9} \u{1f4e0} \\x1b [ok]";
        assert_eq!(printable(text.as_bytes()), text);
        assert!(matches!(printable_str(text), Cow::Borrowed(_)));
    }

    #[test]
    fn c1_controls_in_utf8_and_as_lone_bytes() {
        // U+009B (CSI) encoded in UTF-8, and the raw byte 0x9b an 8-bit terminal takes for CSI.
        assert_eq!(printable("a\u{9b}2J".as_bytes()), "a\\u{9b}2J");
        assert_eq!(printable(b"a\x9b2J"), "a\\x9b2J");
        assert_eq!(printable(b"\xff\xfe ok \xc3"), "\\xff\\xfe ok \\xc3");
        assert_eq!(printable_str("a\u{85}b"), "a\\u{85}b");
    }

    #[test]
    fn bidi_overrides_cannot_reorder_the_line() {
        assert_eq!(
            printable_str("invoice\u{202e}fdp.exe"),
            "invoice\\u{202e}fdp.exe"
        );
        assert_eq!(printable_str("a\u{2066}b\u{2069}"), "a\\u{2066}b\\u{2069}");
    }

    #[test]
    fn lines_keep_their_ends_and_nothing_else() {
        assert_eq!(
            printable_lines(b"From: a\nSubject: \x1b[2J\r\n"),
            "From: a\nSubject: \\x1b[2J\\x0d\n"
        );
        assert_eq!(printable_lines(b""), "");
    }
}
