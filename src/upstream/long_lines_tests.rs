use super::*;

// The same decoding as the tests through sockets use: mail-parser, a dev-dependency.
#[path = "../../tests/common/mime.rs"]
mod mime;

/// Wraps, and checks that the message decodes to the same parts. Returns the wrapped message, also as text.
fn wrapped_same(message: &[u8]) -> (Vec<u8>, String) {
    let out = wrapped(message, 0);
    mime::assert_same_leaves(message, &out);
    let text = show(&out);
    (out, text)
}

/// Both passes fed in chunks of `scan` and `write` octets.
fn wrap_in_chunks(message: &[u8], scan: usize, write: usize) -> (Vec<u8>, usize) {
    let mut scanner = Scanner::new();
    for chunk in message.chunks(scan) {
        scanner.feed(chunk);
    }
    let mut rewriter = Rewriter::new(scanner.finish());
    let mut out = Vec::new();
    for chunk in message.chunks(write) {
        rewriter.feed(chunk, &mut out);
    }
    let unfoldable = rewriter.finish(&mut out);
    (out, unfoldable)
}

/// The wrapped message, checked to be the same however the message is cut into chunks, and to have no line over
/// 998 octets but `unfoldable` header lines.
fn wrapped(message: &[u8], unfoldable: usize) -> Vec<u8> {
    let whole = wrap(message).into_owned();
    for (scan, write) in [(1, 1), (3, 1000), (999, 7), (1000, 1001), (4096, 2)] {
        let (out, n) = wrap_in_chunks(message, scan, write);
        assert_eq!(n, unfoldable, "unfoldable header lines ({scan}, {write})");
        assert!(
            out == whole,
            "chunks of {scan} and {write} give another result"
        );
    }
    assert_eq!(wrapped_len(message), Some(whole.len()));
    let over = lines(&whole).filter(|l| l.len() > MAX_LINE).count();
    assert_eq!(over, unfoldable, "lines over 998:\n{}", show(&whole));
    whole
}

/// Lines without their CRLF.
fn lines(message: &[u8]) -> impl Iterator<Item = &[u8]> {
    message
        .strip_suffix(b"\r\n")
        .unwrap_or(message)
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
}

fn show(message: &[u8]) -> String {
    String::from_utf8_lossy(message).into_owned()
}

/// The header block of the part that contains `marker` in its body.
fn headers_of<'a>(message: &'a [u8], marker: &str) -> &'a str {
    let text = std::str::from_utf8(message).unwrap();
    let at = text.find(marker).expect("marker");
    let body_start = text[..at].rfind("\r\n\r\n").unwrap();
    let start = text[..body_start].rfind("\r\n--").map_or(0, |p| p + 2);
    &text[start..body_start]
}

fn base64_line(n: usize) -> String {
    use base64::Engine;
    let data: Vec<u8> = (0..n * 3 / 4).map(|i| (i * 7 % 256) as u8).collect();
    base64::engine::general_purpose::STANDARD.encode(data)
}

fn text_line(n: usize) -> String {
    let words = [
        "Meter", "reading", "23.5", "kWh", "ok;", "Grüße", "a=b", "--", ".",
    ];
    let mut s = String::new();
    let mut i = 0;
    while s.len() < n {
        s.push_str(words[i % words.len()]);
        s.push(' ');
        i += 1;
    }
    s.truncate(s.floor_char_boundary(n));
    s
}

#[test]
fn a_message_without_long_lines_is_not_copied() {
    for message in [
        &b""[..],
        b"\r\n",
        b"\r\n\r\n\r\n",
        b"Subject: x\r\n\r\nshort\r\n",
        b"no line end",
    ] {
        assert!(matches!(wrap(message), Cow::Borrowed(m) if std::ptr::eq(m, message)));
        assert_eq!(wrapped_len(message), None);
        let (out, _) = wrap_in_chunks(message, 1, 1);
        assert_eq!(out, message, "a rewriter given the plan passes it through");
    }
    // 998 octets and CRLF is the limit; the CR of CRLF does not count, a CR that ends the message does.
    let mut limit = b"Subject: x\r\n\r\n".to_vec();
    limit.extend_from_slice(&[b'a'; 998]);
    limit.extend_from_slice(b"\r\n");
    assert!(!needs_wrapping(&limit));
    assert!(Scanner::new().finish().unchanged());
    let mut over = limit.clone();
    over.insert(20, b'a');
    assert!(needs_wrapping(&over));
    let ends_in_cr = &limit[..limit.len() - 1];
    assert!(needs_wrapping(ends_in_cr));
    assert!(show(&wrapped(ends_in_cr, 0)).ends_with("aaa=0D"));
}

#[test]
fn base64_attachment_is_rebroken_at_76() {
    let b64 = base64_line(20_000);
    let message = format!(
        "From: scanner@lan.test\r\nSubject: scan\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n--b1\r\nContent-Type: text/plain\r\n\r\nscan attached\r\n--b1\r\nContent-Type: application/pdf; name=scan.pdf\r\nContent-Transfer-Encoding: base64\r\n\r\n{b64}\r\n--b1--\r\n"
    );
    let (_, text) = wrapped_same(message.as_bytes());
    assert!(
        text.starts_with(&message[..message.find(&b64).unwrap()]),
        "headers unchanged"
    );
    let body: Vec<&str> = text[text.find("base64\r\n\r\n").unwrap() + 10..]
        .split("\r\n")
        .take_while(|l| !l.starts_with("--b1"))
        .collect();
    assert_eq!(body.concat(), b64);
    assert!(body.iter().all(|l| l.len() <= 76));
    assert!(body[..body.len() - 1].iter().all(|l| l.len() == 76));
    assert!(text.ends_with("\r\n--b1--\r\n"));
}

#[test]
fn quoted_printable_escapes_are_never_split() {
    // An escape at every offset around the 75th column, and a long line of nothing but escapes.
    for lead in 60..80 {
        let line = format!("{}{}", "x".repeat(lead), "=C3=A9t=3D".repeat(200));
        let message = format!(
            "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n{line}\r\nend\r\n"
        );
        let (_, text) = wrapped_same(message.as_bytes());
        let body = &text[text.find("\r\n\r\n").unwrap() + 4..];
        for l in body.split("\r\n") {
            assert!(l.len() <= 76, "{l:?}");
            // Every `=` starts a whole escape, or is the soft break at the end of the line.
            for (i, _) in l.match_indices('=') {
                let rest = &l[i + 1..];
                assert!(
                    rest.is_empty()
                        || (rest.len() >= 2
                            && rest.as_bytes()[..2].iter().all(u8::is_ascii_hexdigit)),
                    "split escape in {l:?}"
                );
            }
        }
    }
}

#[test]
fn soft_breaks_never_start_a_line_with_a_dot_or_a_dash() {
    let line = ".-".repeat(600);
    let message = format!(
        "Content-Type: multipart/mixed; boundary=\"-\"\r\n\r\n---\r\nContent-Transfer-Encoding: Quoted-Printable\r\n\r\n{line}\r\n-----\r\n"
    );
    let (_, text) = wrapped_same(message.as_bytes());
    let body = &text[text.find("\r\n\r\n").unwrap() + 4..];
    let made: Vec<&str> = body.split("=\r\n").skip(1).collect();
    assert!(made.len() > 10);
    assert!(
        made.iter()
            .all(|l| l.starts_with("=2E") || l.starts_with("=2D")),
        "{body}"
    );
}

#[test]
fn a_non_mime_message_is_reencoded_as_quoted_printable() {
    let line = text_line(20_000);
    let message = format!(
        "From: meter@lan.test\r\nSubject: readings\r\n\r\nfirst\r\n{line}\r\n.leading dot\r\ntrailing space \r\ntab\t\r\n\r\nlast\r\n"
    );
    let (out, text) = wrapped_same(message.as_bytes());
    assert!(text.starts_with(
        "From: meter@lan.test\r\nSubject: readings\r\nMIME-Version: 1.0\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\nfirst\r\n"
    ), "{text}");
    assert!(text.contains("\r\n=2Eleading dot\r\ntrailing space=20\r\ntab=09\r\n\r\nlast\r\n"));
    assert!(lines(&out).all(|l| l.len() <= 76));
    assert!(
        !lines(&out).any(|l| l.starts_with(b".")),
        "no line starts with a dot"
    );
    assert!(lines(&out).all(|l| !l.ends_with(b" ") && !l.ends_with(b"\t")));
}

#[test]
fn an_eight_bit_part_gets_its_encoding_header_replaced_even_when_folded() {
    let line = text_line(5_000);
    let head = format!(
        "MIME-Version: 1.0\r\nContent-Type: multipart/mixed;\r\n boundary=\"outer\"\r\n\r\n--outer\r\nContent-type: text/plain; charset=utf-8\r\nCONTENT-TRANSFER-ENCODING:\r\n\t8bit\r\nX-After: kept\r\n\r\n{line}\r\nbinary "
    );
    let tail = " and a bare \r CR\r\n--outer\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: 8bit\r\n\r\nshort part, not re-encoded\r\n--outer--\r\n";
    let message = [head.as_bytes(), b"\x00\x01\x7f\xff", tail.as_bytes()].concat();
    let (out, text) = wrapped_same(&message);
    assert_eq!(
        headers_of(&out, "Meter"),
        "--outer\r\nContent-type: text/plain; charset=utf-8\r\nX-After: kept\r\nContent-Transfer-Encoding: quoted-printable"
    );
    assert!(text.contains("binary =00=01=7F=FF and a bare =0D CR\r\n--outer\r\n"));
    assert!(text.contains("Content-Transfer-Encoding: 8bit\r\n\r\nshort part, not re-encoded\r\n"));
    assert_eq!(text.matches("MIME-Version").count(), 1);
}

#[test]
fn nested_multiparts_and_case_and_quoting_in_content_type() {
    let b64 = base64_line(3_000);
    let text = text_line(3_000);
    let qp = "=E2=82=AC ".repeat(300);
    let message = format!(
        "MIME-Version: 1.0\r\ncontent-TYPE: Multipart/Mixed;\r\n\tcharset=x; BOUNDARY = \"=_outer; \\\"q\\\" 1\" (comment)\r\n\r\npreamble\r\n--=_outer; \"q\" 1\r\nContent-Type: multipart/alternative; boundary=inner.2\r\n\r\n--inner.2\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{text}\r\n--inner.2\r\nContent-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n<p>{qp}</p>\r\n--inner.2--\r\ninner epilogue\r\n--=_outer; \"q\" 1\r\nContent-Type: image/png\r\nContent-Transfer-Encoding: BASE64\r\n\r\n{b64}\r\n--=_outer; \"q\" 1--\r\nepilogue\r\n"
    );
    let (out, _) = wrapped_same(message.as_bytes());
    assert!(lines(&out).all(|l| l.len() <= 78));
    assert!(headers_of(&out, "Meter").ends_with("Content-Transfer-Encoding: quoted-printable"));
    assert!(headers_of(&out, "<p>").ends_with("Content-Transfer-Encoding: quoted-printable"));
    let text = show(&out);
    assert_eq!(
        text.matches("Content-Transfer-Encoding: quoted-printable")
            .count(),
        2
    );
    assert!(text.contains("\r\n--inner.2--\r\ninner epilogue\r\n--=_outer; \"q\" 1\r\n"));
}

#[test]
fn an_outer_boundary_ends_an_inner_multipart_left_open() {
    let line = text_line(2_000);
    let message = format!(
        "Content-Type: multipart/mixed; boundary=outer\r\n\r\n--outer\r\nContent-Type: multipart/related; boundary=outer-inner\r\n\r\n--outer-inner\r\n\r\nunclosed\r\n--outer\r\n\r\n{line}\r\n--outer--\r\n"
    );
    let out = wrapped(message.as_bytes(), 0);
    // The last part follows the outer boundary: it is a part of its own, re-encoded with a header of its own, as
    // Python's email package reads it. (mail-parser reads the rest of the message into the unclosed inner part
    // instead; the input breaks RFC 2046 section 5.1.2 either way.)
    assert_eq!(
        headers_of(&out, "Meter"),
        "--outer\r\nContent-Transfer-Encoding: quoted-printable"
    );
}

#[test]
fn preamble_epilogue_and_delimiter_padding() {
    let long = "p".repeat(2_500);
    let message = format!(
        "Content-Type: multipart/mixed; boundary=b\r\n\r\n{long}\r\n--b{pad}\r\n\r\npart\r\n--b--{pad}\r\n{long}\r\n",
        pad = " ".repeat(1_200)
    );
    let (out, text) = wrapped_same(message.as_bytes());
    assert!(
        text.contains("\r\n--b\r\n\r\npart\r\n--b--\r\n"),
        "padding dropped"
    );
    let p: Vec<&[u8]> = lines(&out)
        .filter(|l| l.starts_with(b"p") && l != b"part")
        .collect();
    assert_eq!(
        p.iter().map(|l| l.len()).collect::<Vec<_>>(),
        [998, 998, 504, 998, 998, 504]
    );
}

#[test]
fn long_header_lines_are_folded_at_whitespace() {
    let to: Vec<String> = (0..150).map(|i| format!("device{i}@lan.test")).collect();
    let to = to.join(", ");
    let message = format!("To: {to}\r\nSubject: x\r\n\r\nbody\r\n");
    let out = wrapped(message.as_bytes(), 0);
    let text = show(&out);
    let header = &text[..text.find("\r\nSubject").unwrap()];
    assert!(header.split("\r\n").count() > 20);
    assert!(header.split("\r\n").all(|l| l.len() <= 78), "{header}");
    assert!(header.split("\r\n").skip(1).all(|l| l.starts_with(' ')));
    assert_eq!(
        header.replace("\r\n", ""),
        format!("To: {to}"),
        "unfolds to the original"
    );
    assert!(text.ends_with("\r\nSubject: x\r\n\r\nbody\r\n"));
    // A run of whitespace longer than a line is folded before, however little follows it.
    let message = format!("X-Pad: a{}b\r\n\r\nbody\r\n", " ".repeat(1_500));
    let out = wrapped(message.as_bytes(), 0);
    assert_eq!(show(&out).replace("\r\n ", " "), message);
}

#[test]
fn a_header_line_without_whitespace_is_left_as_it_is() {
    let token = "x".repeat(2_000);
    for message in [
        format!("X-Token:{token}\r\nSubject: x\r\n\r\nbody\r\n"),
        format!("X-Token: {token}\r\n\r\nbody\r\n"),
        format!("X-Token: short words {token} {token}   \r\n\r\nbody\r\n"),
    ] {
        let count = message.matches(&token).count();
        let out = wrapped(message.as_bytes(), count);
        let text = show(&out);
        assert_eq!(
            text.replace("\r\n ", " ").replace("\r\n", "\n"),
            message.replace("\r\n", "\n")
        );
        assert!(text.ends_with("\r\n\r\nbody\r\n"));
    }
}

#[test]
fn a_long_content_type_line_still_gives_the_structure() {
    // Folded only after the boundary: the walk reads the boundary from a line over 998 octets.
    let params = (0..120)
        .map(|i| format!("x-p{i}=v{i}"))
        .collect::<Vec<_>>()
        .join("; ");
    let line = text_line(1_500);
    let message = format!(
        "MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=zz; {params}\r\n\r\n--zz\r\n\r\n{line}\r\n--zz--\r\n"
    );
    let (out, _) = wrapped_same(message.as_bytes());
    assert_eq!(
        headers_of(&out, "Meter"),
        "--zz\r\nContent-Transfer-Encoding: quoted-printable"
    );
}

#[test]
fn an_enclosed_message_is_walked_into() {
    let line = text_line(3_000);
    for (outer, default) in [
        ("multipart/mixed", "Content-Type: message/rfc822\r\n"),
        ("multipart/digest", ""),
    ] {
        let message = format!(
            "MIME-Version: 1.0\r\nContent-Type: {outer}; boundary=m\r\n\r\n--m\r\n{default}\r\nSubject: forwarded\r\n\r\n{line}\r\n--m--\r\n"
        );
        let (out, _) = wrapped_same(message.as_bytes());
        assert!(headers_of(&out, "Meter").ends_with(
            "\r\n\r\nSubject: forwarded\r\nMIME-Version: 1.0\r\nContent-Transfer-Encoding: quoted-printable"
        ));
    }
}

#[test]
fn parts_relay_cannot_reencode_are_broken_where_they_are_long() {
    let line = "u".repeat(1_200);
    for kind in [
        "Content-Type: text/plain\r\nContent-Transfer-Encoding: x-uuencode",
        "Content-Type: message/partial; id=1; number=1",
        "Content-Type: multipart/mixed",
    ] {
        let message = format!("MIME-Version: 1.0\r\n{kind}\r\n\r\n{line}\r\nend\r\n");
        let out = wrapped(message.as_bytes(), 0);
        let text = show(&out);
        assert!(
            text.contains(&format!(
                "\r\n\r\n{}\r\n{}\r\nend\r\n",
                &line[..998],
                &line[998..]
            )),
            "{kind}"
        );
        assert!(!text.contains("quoted-printable"), "{kind}");
    }
}

#[test]
fn a_message_that_is_all_body_or_all_line_ends() {
    let line = text_line(1_500);
    // No header at all: the empty first line ends an empty header block.
    let message = format!("\r\n{line}\r\n");
    let out = wrapped(message.as_bytes(), 0);
    assert!(show(&out).starts_with(
        "MIME-Version: 1.0\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\nMeter "
    ));
    mime::assert_same_leaves(message.as_bytes(), &out);
    // Line ends only, with one long line of nothing: every line stays, and the long one is broken.
    let mut message = b"\r\n\r\n\r\n".to_vec();
    message.extend_from_slice(&[b' '; 1_000]);
    message.extend_from_slice(b"\r\n\r\n");
    let out = wrapped(&message, 0);
    assert!(out.starts_with(
        b"MIME-Version: 1.0\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n\r\n\r\n"
    ));
    assert!(out.ends_with(b"=20\r\n\r\n"));
    mime::assert_same_leaves(&message, &out);
}

#[test]
fn bare_line_feeds_and_a_missing_last_line_end() {
    // The spool never hands these over, but nothing breaks on them: LF alone ends a line too.
    let line = "z".repeat(1_100);
    let message = format!("Subject: lf\n\n{line}\nlast {line}");
    let out = wrapped(message.as_bytes(), 0);
    let text = show(&out);
    assert!(text.starts_with(
        "Subject: lf\nMIME-Version: 1.0\r\nContent-Transfer-Encoding: quoted-printable\r\n\n"
    ));
    assert!(!text.ends_with('\n'), "no line end is added to the message");
    assert!(lines(&out).all(|l| l.len() <= 76));
}

#[test]
fn encoder_and_soft_breaks_in_isolation() {
    let mut out = Vec::new();
    let mut e = Encoder::default();
    e.write(b".a= \t b ", &mut out);
    e.end(&mut out);
    assert_eq!(out, b"=2Ea=3D \t b=20");
    out.clear();
    let mut s = SoftBreaks::default();
    s.write(format!("{}=3D", "a".repeat(73)).as_bytes(), &mut out);
    assert_eq!(show(&out), format!("{}=\r\n=3D", "a".repeat(73)));
}

#[test]
fn content_type_parameters() {
    assert_eq!(
        content_type(b" multipart/Mixed ; name=\"a;boundary=x\"; Boundary=\"q\\\"b\" ; x=y"),
        (b"multipart/mixed".to_vec(), Some(b"q\"b".to_vec()))
    );
    assert_eq!(content_type(b"text/plain"), (b"text/plain".to_vec(), None));
    assert_eq!(
        content_type(b"multipart/mixed; boundary=abc(c)"),
        (b"multipart/mixed".to_vec(), Some(b"abc".to_vec()))
    );
    assert_eq!(content_type(b";;=;\"").0, b"");
    assert_eq!(token(b" 8BIT (sent by a printer)"), b"8bit");
}
