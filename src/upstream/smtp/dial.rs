//! Connecting to an upstream name with several addresses: smtp.office365.com and smtp.gmail.com each resolve to
//! IPv6 and IPv4 addresses. Tried one after the other (what `TcpStream::connect` does with a name), an address
//! that drops packets (IPv6 on a host whose IPv6 route goes nowhere, a firewall) takes the whole `smtp_timeout`,
//! the working addresses behind it are never tried, and the upstream counts as not answering. Here the next
//! address starts a moment later, alongside, the families taking turns (RFC 8305's connection attempts, without
//! its DNS part); the first connection made wins. Written here because tokio has no such connect, and the crates
//! that do bring their own resolver and runtime glue for 60 lines of logic.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// RFC 8305 section 5's recommended connection attempt delay.
const STAGGER: Duration = Duration::from_millis(250);

/// Resolves `host` and connects to the first of its addresses that answers.
pub async fn connect(host: &str, port: u16) -> io::Result<TcpStream> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port)).await?.collect();
    connect_any(addrs).await
}

/// Connects to the first of `addrs` that answers, starting each next one [`STAGGER`] after the last, or at once
/// when the last failed. The error is the last failure's.
pub async fn connect_any(addrs: Vec<SocketAddr>) -> io::Result<TcpStream> {
    let mut pending = interleave(addrs).into_iter().peekable();
    let mut attempts: JoinSet<io::Result<TcpStream>> = JoinSet::new();
    let mut last_error = io::Error::new(io::ErrorKind::NotFound, "the name has no address");
    let mut next_start = Instant::now();
    loop {
        if pending.peek().is_some() && Instant::now() >= next_start {
            if let Some(addr) = pending.next() {
                attempts.spawn(TcpStream::connect(addr));
                next_start = Instant::now() + STAGGER;
            }
            continue;
        }
        if attempts.is_empty() {
            return Err(last_error);
        }
        tokio::select! {
            done = attempts.join_next() => match done {
                // Dropping the set aborts the attempts still in flight.
                Some(Ok(Ok(tcp))) => return Ok(tcp),
                Some(Ok(Err(e))) => {
                    last_error = e;
                    next_start = Instant::now();
                }
                Some(Err(e)) => last_error = io::Error::other(e),
                None => {}
            },
            () = tokio::time::sleep_until(next_start), if pending.peek().is_some() => {}
        }
    }
}

/// The addresses with the families taking turns, starting with the resolver's first (RFC 8305 section 4).
fn interleave(addrs: Vec<SocketAddr>) -> Vec<SocketAddr> {
    let first_v6 = addrs.first().is_some_and(SocketAddr::is_ipv6);
    let (mut first, mut second): (Vec<_>, Vec<_>) =
        addrs.into_iter().partition(|a| a.is_ipv6() == first_v6);
    first.reverse();
    second.reverse();
    let mut out = Vec::with_capacity(first.len() + second.len());
    while let Some(a) = first.pop() {
        out.push(a);
        out.extend(second.pop());
    }
    out.extend(second.into_iter().rev());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_take_turns_from_the_resolvers_first() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        let got = interleave(vec![
            a("[2001:db8::1]:25"),
            a("[2001:db8::2]:25"),
            a("[2001:db8::3]:25"),
            a("192.0.2.1:25"),
        ]);
        assert_eq!(
            got,
            [
                a("[2001:db8::1]:25"),
                a("192.0.2.1:25"),
                a("[2001:db8::2]:25"),
                a("[2001:db8::3]:25")
            ]
        );
        let got = interleave(vec![
            a("192.0.2.1:25"),
            a("192.0.2.2:25"),
            a("[2001:db8::1]:25"),
        ]);
        assert_eq!(
            got,
            [a("192.0.2.1:25"), a("[2001:db8::1]:25"), a("192.0.2.2:25")]
        );
    }

    /// An address that never answers (a listener whose accept queue is full drops the SYNs) does not keep the
    /// next one from being reached. Connected one after the other, this waited until the test's limit.
    #[tokio::test]
    async fn an_address_that_drops_packets_does_not_hold_up_the_next() {
        let full = tokio::net::TcpSocket::new_v4().unwrap();
        full.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let full = full.listen(1).unwrap();
        let dead = full.local_addr().unwrap();
        // Fill its accept queue (never accepted): the kernel drops further SYNs.
        let mut fillers = Vec::new();
        for _ in 0..4 {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            if let Ok(Ok(s)) =
                tokio::time::timeout(Duration::from_millis(300), socket.connect(dead)).await
            {
                fillers.push(s);
            }
        }
        let good = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let good_addr = good.local_addr().unwrap();
        let tcp = tokio::time::timeout(Duration::from_secs(20), connect_any(vec![dead, good_addr]))
            .await
            .expect("connected before the test's limit")
            .unwrap();
        assert_eq!(tcp.peer_addr().unwrap(), good_addr);
        drop(fillers);
    }

    #[tokio::test]
    async fn every_address_refused_gives_the_last_error() {
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let e = connect_any(vec![closed, closed]).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused);
        let e = connect_any(Vec::new()).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
    }
}
