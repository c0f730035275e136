//! Any message through the long-line wrapper (`upstream::long_lines`), its two passes fed in chunks cut anywhere.
//!
//! The first two bytes pick the chunk sizes of the two passes. In the rest, `0xFF n` stands for `(n + 1) * 16`
//! more copies of the byte before it, so that short inputs make lines over 998 octets (`0xFF 0x00`, or `0xFF`
//! with nothing before it, is `0xFF` itself). It must never panic; it must give the same output however it is
//! fed; a message with no long line must come out unchanged; and no line of the output may be over 998 octets
//! except the header lines the rewriter reports as unfoldable, which have no whitespace to fold at.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay::upstream::long_lines::{MAX_LINE, Rewriter, Scanner, needs_wrapping, wrap, wrapped_len};

fuzz_target!(|input: &[u8]| {
    let Some((&[scan, write], rest)) = input.split_first_chunk::<2>() else { return };
    let message = expand(rest);
    let (scan, write) = (usize::from(scan) * 8 + 1, usize::from(write) * 8 + 1);

    let mut scanner = Scanner::new();
    for chunk in message.chunks(scan) {
        scanner.feed(chunk);
    }
    let plan = scanner.finish();
    assert_eq!(plan.unchanged(), !needs_wrapping(&message));
    let mut rewriter = Rewriter::new(plan);
    let mut out = Vec::new();
    for chunk in message.chunks(write) {
        rewriter.feed(chunk, &mut out);
    }
    let unfoldable = rewriter.finish(&mut out);

    let whole = wrap(&message);
    assert!(whole[..] == out[..], "chunked and whole differ");
    if !needs_wrapping(&message) {
        assert!(out == message, "a message without long lines changed");
        assert_eq!(wrapped_len(&message), None);
        return;
    }
    assert_eq!(wrapped_len(&message), Some(out.len()));
    let body = out.strip_suffix(b"\r\n").unwrap_or(&out);
    let mut long = 0;
    for line in body.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.len() > MAX_LINE {
            long += 1;
            // A header word too long to fold: whitespace, if any, only before and after it.
            let start = line.iter().position(|&b| !is_wsp(b)).unwrap_or(line.len());
            let end = line.iter().rposition(|&b| !is_wsp(b)).map_or(start, |p| p + 1);
            assert!(!line[start..end].iter().any(|&b| is_wsp(b)), "a long line with a fold point left");
        }
    }
    assert_eq!(long, unfoldable, "long lines other than unfoldable header lines");
});

fn is_wsp(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

fn expand(input: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(input.len());
    let mut i = 0;
    while i < input.len() {
        let b = input[i];
        if b == 0xFF && i + 1 < input.len() {
            let n = input[i + 1];
            i += 2;
            match out.last().copied() {
                Some(prev) if n > 0 => out.extend(std::iter::repeat_n(prev, (usize::from(n) + 1) * 16)),
                _ => out.push(0xFF),
            }
            continue;
        }
        out.push(b);
        i += 1;
    }
    out
}
