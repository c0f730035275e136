//! The queue file reader, two ways on every input.
//!
//! 1. The input is a queue file as found on disk (arbitrary bytes; the first 4 bytes, read as a little-endian
//!    u32, say how much longer the file is than what is given). `parse` must return, and what it returns as sealed
//!    must really be a seal at `SEAL_AT`, with the message starting right after the first newline.
//! 2. The input is cut at 0xFF bytes (never in UTF-8) into the envelope's strings and a body. relay writes that
//!    envelope with `unsealed_line`, then the seal at `SEAL_AT`: the unsealed file must read as `Unsealed`, the
//!    sealed one as exactly that envelope with a seal that verifies the body, and no cut-off line as sealed. So
//!    no client-supplied envelope text can move the seal or forge one.
#![no_main]

use std::path::Path;
use std::time::{Duration, UNIX_EPOCH};

use libfuzzer_sys::fuzz_target;
use relay::queue::file::{SEAL_AT, parse, seal_for, unsealed_line};
use relay::queue::seal::{SEAL_LEN, UNSEALED, is_sealed, verify};
use relay::queue::{Envelope, FileError, QueueId};

const PATH: &str = "/var/lib/relay/queue/fuzz.msg";

fuzz_target!(|input: &[u8]| {
    as_found_on_disk(input);
    as_written_by_relay(input);
});

fn as_found_on_disk(input: &[u8]) {
    let (extra, head) = match input.split_first_chunk::<4>() {
        Some((n, rest)) => (u64::from(u32::from_le_bytes(*n)), rest),
        None => (0, input),
    };
    let len = head.len() as u64 + extra;
    let Ok(m) = parse(head, len, Path::new(PATH)) else { return };
    let nl = head.iter().position(|&b| b == b'\n').expect("sealed without a complete first line");
    let offset = nl + 1;
    assert_eq!(m.offset, offset as u64);
    assert_eq!(m.size, len - m.offset);
    assert_eq!(m.path, Path::new(PATH));
    assert!(head.starts_with(b"{\"seal\":\""));
    assert_eq!(SEAL_AT, 9);
    assert_eq!(m.seal.len(), SEAL_LEN);
    assert!(is_sealed(&m.seal) && m.seal != UNSEALED);
    assert_eq!(&head[SEAL_AT..SEAL_AT + SEAL_LEN], m.seal.as_bytes(), "the seal is not at SEAL_AT");
    // Delivery checks the message bytes against the seal: whatever the seal holds, that must just answer.
    let _ = verify(&m.seal, &head[offset..]);
}

fn as_written_by_relay(input: &[u8]) {
    // Fixed-size knobs first, then the strings.
    let (knobs, rest) = input.split_at(input.len().min(29));
    let mut k = [0u8; 29];
    k[..knobs.len()].copy_from_slice(knobs);
    let id = QueueId::parse(&k[..16].iter().map(|b| format!("{b:02x}")).collect::<String>()).unwrap();
    // humantime writes times from the epoch to the end of year 9999; relay's are `SystemTime::now()`.
    let secs = u64::from_le_bytes(k[16..24].try_into().unwrap()) % 253_402_300_800;
    let nanos = u32::from_le_bytes(k[24..28].try_into().unwrap()) % 1_000_000_000;
    let flags = k[28];

    let mut parts = rest.split(|&b| b == 0xFF);
    let mut text = || String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
    let sender = text();
    let client = text();
    let helo = text();
    let user = text();
    let listener = text();
    let body = parts.next().unwrap_or_default().to_vec();
    let recipients: Vec<String> = parts.map(|p| String::from_utf8_lossy(p).into_owned()).collect();
    let envelope = Envelope {
        id,
        sender,
        recipients,
        client,
        helo: (flags & 1 != 0).then_some(helo),
        user: (flags & 2 != 0).then_some(user),
        listener,
        received_at: UNIX_EPOCH + Duration::new(secs, nanos),
        body_8bit: flags & 4 != 0,
    };

    let line = unsealed_line(&envelope);
    assert!(line.starts_with(b"{\"seal\":\""), "{line:?}");
    assert_eq!(&line[SEAL_AT..SEAL_AT + SEAL_LEN], UNSEALED.as_bytes());
    assert_eq!(line.iter().position(|&b| b == b'\n'), Some(line.len() - 1), "one line, newline last");
    let mut file = line.clone();
    file.extend_from_slice(&body);
    let len = file.len() as u64;
    let path = Path::new(PATH);

    // Unsealed, whole or cut anywhere (a crash mid-write): never taken for a sealed message.
    assert!(matches!(parse(&file, len, path), Err(FileError::Unsealed { .. })));
    let cut = usize::from(flags >> 3) * line.len() / 32;
    assert!(matches!(parse(&file[..cut], len, path), Err(FileError::Unsealed { .. } | FileError::Corrupt { .. })));

    // Sealed: exactly this envelope, and a seal that verifies exactly this body.
    let seal = seal_for(body.len() as u64, &blake3::hash(&body));
    file[SEAL_AT..SEAL_AT + SEAL_LEN].copy_from_slice(seal.as_bytes());
    let m = match parse(&file, len, path) {
        Ok(m) => m,
        Err(e) => panic!("relay's own file refused: {e}\n{:?}", String::from_utf8_lossy(&file[..line.len()])),
    };
    assert_eq!(m.envelope, envelope);
    assert_eq!(m.offset, line.len() as u64);
    assert_eq!(m.size, body.len() as u64);
    assert_eq!(m.seal, seal);
    assert!(verify(&m.seal, &file[line.len()..]));
    let mut other = body.clone();
    other.push(flags);
    assert!(!verify(&m.seal, &other));
    // A sealed line cut short has no newline: not a message.
    assert!(parse(&file[..cut.min(line.len() - 1)], len, path).is_err());
}
