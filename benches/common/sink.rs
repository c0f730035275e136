//! A minimal upstream SMTP server for benchmarks: it accepts any XOAUTH2 token and every message, and counts them.
//!
//! 220 greeting; EHLO answers `250-sink` / `250-PIPELINING` / `250-8BITMIME` / `250-CHUNKING` / `250 AUTH
//! XOAUTH2` (Microsoft 365 and Gmail offer CHUNKING too); AUTH XOAUTH2 (with or without an initial response) gets
//! `235 2.7.0 Accepted`; MAIL and RCPT get 250; DATA gets 354, the body is read up to the final dot and answered
//! `250 2.0.0 OK`; `BDAT n` has its n octets read and gets 250, the message counted at `BDAT n LAST`; RSET and
//! NOOP get 250; QUIT gets 221. Replies are written once the client's pipelined commands have all been read.
#![allow(dead_code)] // each bench uses a different part of this

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

pub struct Sink {
    pub addr: SocketAddr,
    messages: Arc<Counter>,
    connections: Arc<AtomicU64>,
    accept: JoinHandle<()>,
}

impl Sink {
    /// Listens on a free loopback port. With `quickack`, the body of each message is acknowledged at once
    /// (TCP_QUICKACK) instead of after the kernel's delayed-ACK timer, as a real server would not.
    pub async fn start(quickack: bool) -> std::io::Result<Sink> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let messages = Arc::new(Counter::default());
        let connections = Arc::new(AtomicU64::new(0));
        let (m, c) = (messages.clone(), connections.clone());
        let accept = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                c.fetch_add(1, Ordering::Relaxed);
                let m = m.clone();
                tokio::spawn(async move {
                    let _ = session(tcp, &m, quickack).await;
                });
            }
        });
        Ok(Sink {
            addr,
            messages,
            connections,
            accept,
        })
    }

    /// Messages accepted so far (final dot answered 250).
    pub fn messages(&self) -> u64 {
        self.messages.count.load(Ordering::Relaxed)
    }

    /// When the first and the latest message so far were accepted.
    pub fn first_and_last(&self) -> Option<(Instant, Instant)> {
        self.messages.times.lock().ok().and_then(|t| *t)
    }

    /// Forgets when the first and latest message were taken, so that [`Self::first_and_last`] times only what
    /// comes next (the drain, after the sink's own ceiling was measured on it).
    pub fn restart_clock(&self) {
        if let Ok(mut t) = self.messages.times.lock() {
            *t = None;
        }
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Messages accepted, and when the first and the latest were.
#[derive(Default)]
struct Counter {
    count: AtomicU64,
    times: Mutex<Option<(Instant, Instant)>>,
}

impl Counter {
    fn add(&self) {
        let now = Instant::now();
        if let Ok(mut t) = self.times.lock() {
            *t = Some((t.map_or(now, |(first, _)| first), now));
        }
        self.count.fetch_add(1, Ordering::Relaxed);
    }
}

async fn session(tcp: TcpStream, messages: &Counter, quickack: bool) -> std::io::Result<()> {
    tcp.set_nodelay(true)?;
    let mut r = BufReader::with_capacity(64 * 1024, tcp);
    let mut out = b"220 sink ESMTP\r\n".to_vec();
    let mut line = Vec::with_capacity(1024);
    loop {
        // Pipelined commands are answered together, once nothing more is waiting to be read.
        if !out.is_empty() && r.buffer().is_empty() {
            r.get_mut().write_all(&out).await?;
            out.clear();
        }
        line.clear();
        if r.read_until(b'\n', &mut line).await? == 0 {
            return Ok(());
        }
        let verb = line
            .get(..4)
            .map(|v| v.to_ascii_uppercase())
            .unwrap_or_default();
        match verb.as_slice() {
            b"EHLO" => out.extend_from_slice(
                b"250-sink\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-CHUNKING\r\n250 AUTH XOAUTH2\r\n",
            ),
            b"HELO" => out.extend_from_slice(b"250 sink\r\n"),
            b"AUTH" => {
                let words = line
                    .split(|b| b.is_ascii_whitespace())
                    .filter(|w| !w.is_empty());
                if words.count() < 3 {
                    // No initial response: ask for it, then accept whatever comes.
                    r.get_mut().write_all(&out).await?;
                    out.clear();
                    r.get_mut().write_all(b"334 \r\n").await?;
                    line.clear();
                    if r.read_until(b'\n', &mut line).await? == 0 {
                        return Ok(());
                    }
                }
                out.extend_from_slice(b"235 2.7.0 Accepted\r\n");
            }
            b"MAIL" => out.extend_from_slice(b"250 2.1.0 OK\r\n"),
            b"RCPT" => out.extend_from_slice(b"250 2.1.5 OK\r\n"),
            b"DATA" => {
                r.get_mut().write_all(&out).await?;
                out.clear();
                r.get_mut().write_all(b"354 Go ahead\r\n").await?;
                loop {
                    if quickack && r.buffer().is_empty() {
                        quick_ack(r.get_ref());
                    }
                    line.clear();
                    if r.read_until(b'\n', &mut line).await? == 0 {
                        return Ok(());
                    }
                    if line == b".\r\n" {
                        break;
                    }
                }
                messages.add();
                out.extend_from_slice(b"250 2.0.0 OK\r\n");
            }
            b"BDAT" => {
                let text = String::from_utf8_lossy(&line);
                let mut words = text.split_ascii_whitespace().skip(1);
                let Some(mut left) = words.next().and_then(|n| n.parse::<u64>().ok()) else {
                    out.extend_from_slice(b"501 5.5.4 Bad BDAT\r\n");
                    continue;
                };
                let last = words.next().is_some_and(|w| w.eq_ignore_ascii_case("LAST"));
                // Read and dropped a piece at a time, whatever the chunk's size.
                let mut scratch = [0u8; 16 * 1024];
                while left > 0 {
                    let n = left.min(scratch.len() as u64) as usize;
                    r.read_exact(&mut scratch[..n]).await?;
                    left -= n as u64;
                }
                if last {
                    messages.add();
                    out.extend_from_slice(b"250 2.0.0 OK\r\n");
                } else {
                    out.extend_from_slice(b"250 2.0.0 chunk received\r\n");
                }
            }
            b"RSET" | b"NOOP" => out.extend_from_slice(b"250 2.0.0 OK\r\n"),
            b"QUIT" => {
                out.extend_from_slice(b"221 2.0.0 Bye\r\n");
                r.get_mut().write_all(&out).await?;
                return Ok(());
            }
            _ => out.extend_from_slice(b"500 5.5.2 Unrecognised command\r\n"),
        }
    }
}

/// Asks the kernel to acknowledge what arrives next at once (the flag does not stick: set it before each read).
fn quick_ack(tcp: &TcpStream) {
    use std::os::fd::AsRawFd;
    let one: libc::c_int = 1;
    // SAFETY: setsockopt on a socket we own, with a valid pointer to an int of the stated size.
    unsafe {
        libc::setsockopt(
            tcp.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_QUICKACK,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}
