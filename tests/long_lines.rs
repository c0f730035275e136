//! Lines over 998 octets (devices send base64 without line breaks): taken and stored whole, and sent to an SMTP
//! upstream wrapped, as a message that decodes to what the device sent.

mod common;
#[path = "common/mime.rs"]
mod mime;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use common::idp::{idp_issuing, relay_with_account};
use common::upstream::FakeUpstream;
use common::*;

/// 15,000 octets of binary data, and its base64: one line of exactly 20,000 characters.
fn scan_pdf() -> (Vec<u8>, String) {
    let data: Vec<u8> = (0u32..15_000)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let line = B64.encode(&data);
    assert_eq!(line.len(), 20_000);
    (data, line)
}

/// A 20,000-octet line of text: words, an `=`, dots and trailing-space traps.
fn report_line(extra: &str) -> String {
    let mut line = String::new();
    let mut i = 0;
    while line.len() < 20_000 {
        line.push_str(&format!("sensor{i}=23.{i} ok. {extra}"));
        i += 1;
    }
    line.truncate(line.floor_char_boundary(20_000));
    while line.len() < 20_000 {
        line.push('.');
    }
    line
}

/// Sends `message` as a device would (dot-stuffed). The upstream first defers it, so that the queue file can be
/// read: it must hold the message as sent, long lines whole. Then, after a retry (what `relay queue retry` asks
/// for), the upstream takes it: CRLF lines of at most 998 octets, decoding to the same parts as `message`.
/// Returns what the upstream got (without relay's Received line) and its decoded parts.
async fn through_relay(message: &[u8]) -> (Vec<u8>, Vec<Vec<u8>>) {
    let idp = idp_issuing("tok").await;
    let mut upstream = FakeUpstream::start(&["tok"]).await;
    *upstream.data_reply.lock().unwrap() = "451 4.3.0 try again later".into();
    let mut relay = relay_with_account(&idp, &upstream).await;
    let mut wire = Vec::new();
    for line in message.split_inclusive(|&b| b == b'\n') {
        if line.starts_with(b".") {
            wire.push(b'.');
        }
        wire.extend_from_slice(line);
    }
    let id = send_message(relay.addr(), &wire).await;
    relay.attempts_done(1).await;
    let queued = relay.queued();
    assert_eq!(queued.len(), 1, "deferred, so still queued");
    assert!(
        strip_received(&queued[0].1) == message,
        "stored as sent, the long line whole"
    );

    *upstream.data_reply.lock().unwrap() = "250 2.0.0 OK".into();
    let id = relay::queue::QueueStore::parse_id(&id).unwrap();
    relay::queue::retry::request_retry(&relay.state(), Some(&[id])).unwrap();
    let got = upstream.next().await;
    relay.attempts_done(2).await;
    assert!(relay.queued().is_empty(), "delivered");

    // Re-encoded, it is larger than it was queued (quoted-printable triples an 8-bit octet): no SIZE is declared
    // rather than one smaller than what comes (RFC 1870 asks for the message's size).
    assert!(!got.mail_params.contains("SIZE="), "{:?}", got.mail_params);
    let got = strip_received(&got.data).to_vec();
    let lines: Vec<&[u8]> = got.split(|&b| b == b'\n').collect();
    for (i, line) in lines.iter().enumerate() {
        let text = line.strip_suffix(b"\r").unwrap_or(line);
        assert!(text.len() <= 998, "line {i} is {} octets", text.len());
        assert!(!text.contains(&b'\r'), "bare CR in line {i}");
        assert!(
            i + 1 == lines.len() || line.ends_with(b"\r"),
            "line {i} ends in LF alone"
        );
    }
    let parts = mime::assert_same_leaves(message, &got);
    (got, parts)
}

fn header_block(message: &[u8]) -> String {
    let text = String::from_utf8_lossy(message);
    text[..text.find("\r\n\r\n").expect("a header block")].to_string()
}

#[tokio::test]
async fn a_base64_attachment_on_one_line() {
    let (pdf, line) = scan_pdf();
    let message = format!(
        "From: scanner@lan.test\r\nTo: office@example.com\r\nSubject: Scan 0042\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"----=_scan_0042\"\r\n\r\nThis is a multi-part message in MIME format.\r\n------=_scan_0042\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\nScanned document attached.\r\n------=_scan_0042\r\nContent-Type: application/pdf; name=\"scan0042.pdf\"\r\nContent-Transfer-Encoding: base64\r\nContent-Disposition: attachment; filename=\"scan0042.pdf\"\r\n\r\n{line}\r\n------=_scan_0042--\r\n"
    );
    let (got, parts) = through_relay(message.as_bytes()).await;
    assert_eq!(parts[0], b"Scanned document attached.");
    assert!(parts[1] == pdf, "the attachment decodes to the same octets");
    // Only the base64 lines changed: re-broken at 76 characters.
    let text = String::from_utf8_lossy(&got);
    assert_eq!(header_block(&got), header_block(message.as_bytes()));
    let body: Vec<&str> = text[text.find(&line[..76]).unwrap()..]
        .split("\r\n")
        .take_while(|l| !l.starts_with("------=_scan_0042"))
        .collect();
    assert_eq!(body.concat(), line);
    assert!(body.iter().all(|l| l.len() <= 76));
    assert!(text.ends_with("\r\n------=_scan_0042--\r\n"));
}

#[tokio::test]
async fn a_plain_text_line_in_a_message_without_mime() {
    let line = report_line("");
    let message =
        format!("From: meter@lan.test\r\nSubject: readings\r\n\r\n{line}\r\n.end of report \r\n");
    let (got, parts) = through_relay(message.as_bytes()).await;
    assert!(parts[0] == format!("{line}\r\n.end of report \r\n").as_bytes());
    // Re-encoded as quoted-printable, which the header now says, and a MIME message.
    assert_eq!(
        header_block(&got),
        "From: meter@lan.test\r\nSubject: readings\r\nMIME-Version: 1.0\r\nContent-Transfer-Encoding: quoted-printable"
    );
    let text = String::from_utf8_lossy(&got);
    assert!(
        text.ends_with("\r\n=2Eend of report=20\r\n"),
        "{}",
        &text[text.len() - 100..]
    );
    assert!(text.lines().all(|l| l.len() <= 76));
}

#[tokio::test]
async fn an_eight_bit_text_part_in_a_multipart() {
    let line = report_line("Grüße, ");
    let (pdf, attachment) = scan_pdf();
    let attachment: Vec<&str> = attachment
        .as_bytes()
        .chunks(76)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    let attachment = attachment.join("\r\n");
    let message = format!(
        "From: nas@lan.test\r\nSubject: =?utf-8?q?Bericht?=\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed;\r\n\tboundary=\"nas-report\"\r\n\r\n--nas-report\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\nReport follows:\r\n{line}\r\n--nas-report\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n{attachment}\r\n--nas-report--\r\n"
    );
    let (got, parts) = through_relay(message.as_bytes()).await;
    assert!(parts[0] == format!("Report follows:\r\n{line}").as_bytes());
    assert!(parts[1] == pdf);
    let text = String::from_utf8_lossy(&got);
    assert!(
        text.contains("--nas-report\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\nReport follows:\r\n"),
        "the part's encoding header replaced"
    );
    assert_eq!(text.matches("Content-Transfer-Encoding").count(), 2);
    assert!(
        text.contains(&format!("\r\n\r\n{attachment}\r\n--nas-report--\r\n")),
        "the well-formed base64 part is untouched"
    );
}
