//! A fake Microsoft 365 / Gmail SMTP endpoint speaking AUTH XOAUTH2 the way they do: 235 for a good token; for
//! a bad one, Gmail's 334 with a base64 JSON error, then 535 after the client's empty line.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

/// A message as the fake received it.
#[derive(Debug, Clone)]
pub struct Received {
    pub auth: String,
    pub from: String,
    pub to: Vec<String>,
    pub data: Vec<u8>,
    /// What followed the sender's `>` on the MAIL FROM line (` SIZE=… BODY=8BITMIME`).
    pub mail_params: String,
    /// When the fake accepted it (just before its reply to the final dot).
    pub at: std::time::SystemTime,
}

pub struct FakeUpstream {
    pub addr: SocketAddr,
    pub received: mpsc::UnboundedReceiver<Received>,
    /// Tokens accepted ([`ANY_TOKEN`]: all of them, XOAUTH2 or OAUTHBEARER; [`OPEN`]: mail without AUTH too);
    /// anything else gets the 334/535 treatment. An entry "REFUSE <reply>" answers every AUTH
    /// with that reply (e.g. Microsoft's "535 5.7.139 … SmtpClientAuthentication is disabled for the Tenant"),
    /// one "MAILREFUSE <reply>" every MAIL after a successful AUTH, one "NOBDAT <reply>" every BDAT.
    pub tokens: Arc<Mutex<Vec<String>>>,
    /// Reply to the final dot, e.g. "250 2.0.0 OK", "451 4.3.0 try later", "550 5.7.1 no"; or "DROP" (hang up
    /// right after 354, in the middle of the data), "MIDWAY <reply>" (answer after 64 KiB of the body and hang up
    /// with the rest unread), "STALL" (read the data, then never answer) or "SLOW 250 …"
    /// (report the message at once, answer a second later) or "HOLD 250 …" (report the message at once, answer
    /// when [`release`](Self::release) is notified) or "HANGUP 250 …" (answer, then close the connection
    /// without a word, as a server that drops idle sessions does) or "STRAY 250 …" (answer, then, once
    /// `release` is notified, send one more reply nobody asked for; [`strays`](Self::strays) says when) or
    /// "TAKEDROP" (keep the message, then close without answering: the lost reply of RFC 1047; once, then
    /// "250 2.0.0 OK").
    pub data_reply: Arc<Mutex<String>>,
    /// Connections accepted so far.
    pub connections: Arc<std::sync::atomic::AtomicUsize>,
    /// At most this many sessions at once (0: no limit); one more is answered as Postfix answers past
    /// `smtpd_client_connection_count_limit` (`421 4.7.0 … too many connections from …`) and closed.
    pub max_sessions: Arc<std::sync::atomic::AtomicUsize>,
    /// Sessions refused by `max_sessions` so far.
    pub refused_sessions: Arc<std::sync::atomic::AtomicUsize>,
    /// Accept connections and never greet them (an upstream that has stopped answering), holding each until the
    /// client hangs up; counted in `connections` too.
    pub silent: Arc<std::sync::atomic::AtomicBool>,
    /// Connections accepted while `silent`.
    pub unanswered: Arc<std::sync::atomic::AtomicUsize>,
    /// Every command line received (AUTH's argument left out), in order; a line that arrived with more
    /// commands already behind it in the same read (pipelined, RFC 2920) ends in " +".
    pub commands: Arc<Mutex<Vec<String>>>,
    /// (recipient, reply): the first entry for a recipient answers its next RCPT instead of 250 and is used up,
    /// e.g. ("x@example.com", "550 5.1.1 user unknown"). A refused recipient does not get the message; DATA with
    /// none accepted is refused.
    pub rcpt_replies: Arc<Mutex<Vec<(String, String)>>>,
    /// Offer CHUNKING (RFC 3030) in EHLO, as Microsoft 365 and Gmail do, and take BDAT. With BDAT, `data_reply`
    /// answers the LAST chunk; only plain replies, TAKEDROP and "CHUNKDROP" (hang up at the first chunk that is
    /// not the last, without answering it, the rest of the message unsent; once, then "250 2.0.0 OK"). No DROP,
    /// STALL, SLOW, HANGUP.
    pub chunking: Arc<std::sync::atomic::AtomicBool>,
    /// Offer SMTPUTF8 (RFC 6531) in EHLO, as Microsoft 365 and Gmail do; on by default.
    pub smtputf8: Arc<std::sync::atomic::AtomicBool>,
    /// Lets a "HOLD …" reply go, and a "STRAY …" reply's extra line.
    pub release: Arc<tokio::sync::Notify>,
    /// Notified once a "STRAY …" reply's extra line was written.
    pub strays: Arc<tokio::sync::Notify>,
}

/// The switchable EHLO offers, and the HOLD release, as the sessions see them.
#[derive(Clone)]
struct Offers {
    chunking: Arc<std::sync::atomic::AtomicBool>,
    smtputf8: Arc<std::sync::atomic::AtomicBool>,
    release: Arc<tokio::sync::Notify>,
    strays: Arc<tokio::sync::Notify>,
}

impl FakeUpstream {
    pub async fn start(tokens: &[&str]) -> FakeUpstream {
        Self::start_tls(tokens, None).await
    }

    /// The next RCPT for `recipient` is answered with `reply` (see [`rcpt_replies`](Self::rcpt_replies)).
    pub fn answer_rcpt(&self, recipient: &str, reply: &str) {
        self.rcpt_replies
            .lock()
            .unwrap()
            .push((recipient.into(), reply.into()));
    }

    /// A server (or a middlebox in front of it) that offers CHUNKING but does not know BDAT: it answers BDAT
    /// with 500 and hangs up.
    pub fn without_bdat(&self) {
        self.chunking
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.tokens
            .lock()
            .unwrap()
            .push("NOBDAT 500 5.5.1 Command unrecognized: BDAT".into());
    }

    /// A server that offers OAUTHBEARER (RFC 7628) and not XOAUTH2, as some self-hosted servers do: AUTH
    /// XOAUTH2 gets 504. A refused token gets RFC 7628's 334 challenge, whose only right answer is `AQ==` (a
    /// single ^A), then 535.
    pub fn only_oauthbearer(&self) {
        self.tokens.lock().unwrap().push(ONLY_OAUTHBEARER.into());
    }

    /// On a port chosen before (one that refused connections until now: an upstream that comes back).
    pub async fn start_on(tokens: &[&str], port: u16) -> FakeUpstream {
        Self::start_tls_at(tokens, None, &format!("127.0.0.1:{port}")).await
    }

    /// With `tls`, the fake speaks implicit TLS (port-465 style) with that acceptor.
    pub async fn start_tls(
        tokens: &[&str],
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> FakeUpstream {
        Self::start_tls_at(tokens, tls, "127.0.0.1:0").await
    }

    async fn start_tls_at(
        tokens: &[&str],
        tls: Option<tokio_rustls::TlsAcceptor>,
        bind: &str,
    ) -> FakeUpstream {
        let listener = TcpListener::bind(bind).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, received) = mpsc::unbounded_channel();
        let tokens = Arc::new(Mutex::new(
            tokens.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        ));
        let data_reply = Arc::new(Mutex::new("250 2.0.0 OK queued upstream".to_string()));
        let (t, d) = (tokens.clone(), data_reply.clone());
        let commands = Arc::new(Mutex::new(Vec::new()));
        let log = commands.clone();
        let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = connections.clone();
        let rcpt_replies = Arc::new(Mutex::new(Vec::new()));
        let r = rcpt_replies.clone();
        let chunking = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let smtputf8 = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let release = Arc::new(tokio::sync::Notify::new());
        let strays = Arc::new(tokio::sync::Notify::new());
        let c = Offers {
            chunking: chunking.clone(),
            smtputf8: smtputf8.clone(),
            release: release.clone(),
            strays: strays.clone(),
        };
        let max_sessions = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let refused_sessions = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (max, refused) = (max_sessions.clone(), refused_sessions.clone());
        let silent = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let unanswered = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (quiet, ignored) = (silent.clone(), unanswered.clone());
        let open = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        tokio::spawn(async move {
            use std::sync::atomic::Ordering::SeqCst;
            while let Ok((mut tcp, _)) = listener.accept().await {
                counter.fetch_add(1, SeqCst);
                if quiet.load(SeqCst) {
                    ignored.fetch_add(1, SeqCst);
                    tokio::spawn(async move {
                        let mut sink = [0u8; 512];
                        while matches!(tcp.read(&mut sink).await, Ok(n) if n > 0) {}
                    });
                    continue;
                }
                let limit = max.load(SeqCst);
                if limit > 0 && open.load(SeqCst) >= limit {
                    refused.fetch_add(1, SeqCst);
                    tokio::spawn(async move {
                        let _ = tcp
                            .write_all(b"421 4.7.0 fake.test Error: too many connections from 127.0.0.1\r\n")
                            .await;
                    });
                    continue;
                }
                open.fetch_add(1, SeqCst);
                let (tx, t, d, tls) = (tx.clone(), t.clone(), d.clone(), tls.clone());
                let (log, r, c, open) = (log.clone(), r.clone(), c.clone(), open.clone());
                tokio::spawn(async move {
                    // Counted down however the session ends.
                    struct Open(Arc<std::sync::atomic::AtomicUsize>);
                    impl Drop for Open {
                        fn drop(&mut self) {
                            self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                        }
                    }
                    let _open = Open(open);
                    match tls {
                        Some(acceptor) => {
                            if let Ok(stream) = acceptor.accept(tcp).await {
                                session(stream, tx, t, d, log, r, c).await;
                            }
                        }
                        None => session(tcp, tx, t, d, log, r, c).await,
                    }
                });
            }
        });
        FakeUpstream {
            addr,
            received,
            tokens,
            data_reply,
            connections,
            max_sessions,
            refused_sessions,
            silent,
            unanswered,
            commands,
            rcpt_replies,
            chunking,
            smtputf8,
            release,
            strays,
        }
    }

    /// The next message the fake accepted (bounded wait).
    pub async fn next(&mut self) -> Received {
        tokio::time::timeout(super::LIMIT, self.received.recv())
            .await
            .expect("a delivery in time")
            .unwrap()
    }
}

const ONLY_OAUTHBEARER: &str = "ONLY OAUTHBEARER";
/// A token entry that takes any token (XOAUTH2 or OAUTHBEARER): for a real token endpoint's tokens, which the
/// test checks itself afterwards (`Received::auth`).
pub const ANY_TOKEN: &str = "ANY";
/// A token entry that takes mail without AUTH: a relay host that trusts its client (Dovecot submission's
/// `submission_relay_host`).
pub const OPEN: &str = "OPEN";

/// The token of an RFC 7628 client response, if it is well formed: `n,a=USER,` (or `n,,`), then `^A`-separated
/// `key=value` pairs with `auth=Bearer TOKEN` among them, ended by `^A^A`.
/// The token of an XOAUTH2 initial response, decoded (`user=…^Aauth=Bearer TOKEN^A^A`).
pub fn xoauth2_token(decoded: &str) -> &str {
    decoded
        .split("auth=Bearer ")
        .nth(1)
        .unwrap_or("")
        .trim_end_matches('\x01')
}

/// Whether the fake takes `token`: listed, or any with [`ANY_TOKEN`].
fn accepts(tokens: &Mutex<Vec<String>>, token: &str) -> bool {
    tokens
        .lock()
        .unwrap()
        .iter()
        .any(|t| t == token || t == ANY_TOKEN)
}

fn oauthbearer_token(response: &str) -> Option<String> {
    let rest = response.strip_prefix("n,")?;
    let (_authzid, pairs) = rest.split_once(",\x01")?;
    let pairs = pairs.strip_suffix("\x01\x01")?;
    let mut token = None;
    for pair in pairs.split('\x01') {
        let (key, value) = pair.split_once('=')?;
        if key == "auth" {
            token = Some(value.strip_prefix("Bearer ")?.to_string());
        }
    }
    token
}

async fn session<S: AsyncRead + AsyncWrite + Unpin>(
    tcp: S,
    tx: mpsc::UnboundedSender<Received>,
    tokens: Arc<Mutex<Vec<String>>>,
    data_reply: Arc<Mutex<String>>,
    log: Arc<Mutex<Vec<String>>>,
    rcpt_replies: Arc<Mutex<Vec<(String, String)>>>,
    offers: Offers,
) {
    let mut s = BufReader::new(tcp);
    // BDAT chunks of the message in progress.
    let mut chunks: Vec<u8> = Vec::new();
    let _ = w(&mut s, "220 fake.outlook.test ESMTP".into()).await;
    let mut msg = Received {
        auth: String::new(),
        from: String::new(),
        to: Vec::new(),
        data: Vec::new(),
        mail_params: String::new(),
        at: std::time::SystemTime::UNIX_EPOCH,
    };
    let mut authed = false;
    loop {
        let mut line = String::new();
        if s.read_line(&mut line).await.unwrap_or(0) == 0 {
            return;
        }
        let cmd = line.trim_end().to_string();
        let upper = cmd.to_ascii_uppercase();
        {
            let shown = if upper.starts_with("AUTH ") {
                "AUTH"
            } else {
                cmd.as_str()
            };
            let more = if s.buffer().is_empty() { "" } else { " +" };
            let entry = format!("{shown}{more}");
            log.lock().unwrap().push(entry);
        }
        let reply = if upper.starts_with("EHLO") {
            let offered = |on: &std::sync::atomic::AtomicBool, line: &'static str| {
                if on.load(std::sync::atomic::Ordering::SeqCst) {
                    line
                } else {
                    ""
                }
            };
            let chunking = offered(&offers.chunking, "250-CHUNKING\r\n");
            let smtputf8 = offered(&offers.smtputf8, "250-SMTPUTF8\r\n");
            let mechanisms = if tokens.lock().unwrap().iter().any(|t| t == ONLY_OAUTHBEARER) {
                "PLAIN OAUTHBEARER"
            } else {
                "LOGIN XOAUTH2"
            };
            format!(
                "250-fake.outlook.test\r\n250-SIZE 157286400\r\n250-8BITMIME\r\n{chunking}{smtputf8}250-AUTH {mechanisms}\r\n250 PIPELINING"
            )
        } else if let Some(reply) = upper.strip_prefix("BDAT ").and_then(|_| {
            tokens
                .lock()
                .unwrap()
                .iter()
                .find_map(|t| t.strip_prefix("NOBDAT ").map(str::to_string))
        }) {
            // A server (or a middlebox in front of it) that offers CHUNKING but does not know BDAT: the chunk's
            // lines would come next, read as commands, so it hangs up, as a server does after too many errors.
            let _ = w(&mut s, reply).await;
            return;
        } else if let Some(args) = upper.strip_prefix("BDAT ") {
            let mut words = args.split_ascii_whitespace();
            let n: usize = words.next().and_then(|w| w.parse().ok()).unwrap_or(0);
            let last = words.next() == Some("LAST");
            let mut chunk = vec![0u8; n];
            if s.read_exact(&mut chunk).await.is_err() {
                return;
            }
            chunks.extend_from_slice(&chunk);
            if !last && *data_reply.lock().unwrap() == "CHUNKDROP" {
                *data_reply.lock().unwrap() = "250 2.0.0 OK".into();
                return;
            }
            if !last {
                format!("250 2.0.0 {n} octets received")
            } else if msg.from.is_empty() && msg.to.is_empty() {
                chunks.clear();
                "503 5.5.1 MAIL first".into()
            } else if msg.to.is_empty() {
                chunks.clear();
                "554 5.5.1 No valid recipients".into()
            } else {
                msg.data = std::mem::take(&mut chunks);
                let reply = data_reply.lock().unwrap().clone();
                if reply == "TAKEDROP" {
                    *data_reply.lock().unwrap() = "250 2.0.0 OK".into();
                    msg.at = std::time::SystemTime::now();
                    let _ = tx.send(msg.clone());
                    return;
                }
                if reply.trim_start_matches("STRAY ").starts_with('2') {
                    msg.at = std::time::SystemTime::now();
                    let _ = tx.send(msg.clone());
                }
                reply
            }
        } else if upper.starts_with("AUTH OAUTHBEARER ") {
            let decoded = B64.decode(cmd[17..].trim()).unwrap_or_default();
            let decoded = String::from_utf8_lossy(&decoded).into_owned();
            msg.auth = decoded.clone();
            match oauthbearer_token(&decoded) {
                None => "501 5.5.2 Malformed OAUTHBEARER client response".into(),
                Some(token) if accepts(&tokens, &token) => {
                    authed = true;
                    "235 2.7.0 Accepted".into()
                }
                Some(_) => {
                    let err = B64
                        .encode(r#"{"status":"invalid_token","schemes":"bearer","scope":"mail"}"#);
                    let _ = w(&mut s, format!("334 {err}")).await;
                    let mut answer = String::new();
                    let _ = s.read_line(&mut answer).await;
                    log.lock().unwrap().push(answer.trim_end().to_string());
                    if answer.trim_end() == "AQ==" {
                        "535 5.7.8 Authentication failed".into()
                    } else {
                        "501 5.5.2 A failed OAUTHBEARER exchange ends with a single ^A".into()
                    }
                }
            }
        } else if upper.starts_with("AUTH XOAUTH2 ")
            && tokens.lock().unwrap().iter().any(|t| t == ONLY_OAUTHBEARER)
        {
            "504 5.7.4 Unrecognized authentication type".into()
        } else if upper.starts_with("AUTH XOAUTH2 ") {
            let decoded = B64.decode(cmd[13..].trim()).unwrap_or_default();
            let decoded = String::from_utf8_lossy(&decoded).into_owned();
            msg.auth = decoded.clone();
            let token = xoauth2_token(&decoded).to_string();
            let refusal = tokens
                .lock()
                .unwrap()
                .iter()
                .find_map(|t| t.strip_prefix("REFUSE ").map(str::to_string));
            if let Some(reply) = refusal {
                // Microsoft's tenant-wide refusal comes at once, with no 334 challenge. `{COMMAND}`: a server
                // that quotes the command back.
                // `{HEAD}`, `{TAIL}`: the two halves of the credentials, for a quote split over two lines.
                let arg = cmd.split_whitespace().nth(2).unwrap_or("");
                let (head, tail) = arg.split_at(arg.len() / 2);
                reply
                    .replace("{COMMAND}", &cmd)
                    .replace("{HEAD}", head)
                    .replace("{TAIL}", tail)
            } else if accepts(&tokens, &token) {
                authed = true;
                "235 2.7.0 Accepted".into()
            } else {
                let err = B64.encode(
                    r#"{"status":"401","schemes":"bearer","scope":"https://mail.google.com/"}"#,
                );
                let _ = w(&mut s, format!("334 {err}")).await;
                let mut empty = String::new();
                let _ = s.read_line(&mut empty).await;
                "535 5.7.8 Username and Password not accepted".into()
            }
        } else if upper.starts_with("MAIL FROM:") {
            let refusal = tokens
                .lock()
                .unwrap()
                .iter()
                .find_map(|t| t.strip_prefix("MAILREFUSE ").map(str::to_string));
            if !authed && !tokens.lock().unwrap().iter().any(|t| t == OPEN) {
                "530 5.7.0 Authentication Required".into()
            } else if let Some(reply) = refusal {
                // Microsoft's "530 5.7.57 Client not authenticated to send mail", after a 235.
                reply
            } else {
                msg.from = path(&cmd[10..]);
                msg.mail_params = cmd[10..]
                    .split_once('>')
                    .map_or(String::new(), |(_, p)| p.trim_end().to_string());
                msg.to.clear();
                "250 2.1.0 OK".into()
            }
        } else if upper.starts_with("RCPT TO:") {
            let to = path(&cmd[8..]);
            let mut replies = rcpt_replies.lock().unwrap();
            match replies.iter().position(|(r, _)| *r == to) {
                Some(i) => replies.remove(i).1,
                None => {
                    msg.to.push(to);
                    "250 2.1.5 OK".into()
                }
            }
        } else if upper == "DATA" && msg.to.is_empty() {
            "554 5.5.1 No valid recipients".into()
        } else if upper == "DATA" {
            let _ = w(&mut s, "354 Go ahead".into()).await;
            if *data_reply.lock().unwrap() == "DROP" {
                return;
            }
            let midway = data_reply
                .lock()
                .unwrap()
                .strip_prefix("MIDWAY ")
                .map(str::to_string);
            if let Some(reply) = midway {
                // Refuse while the body comes, as Microsoft 365 does past its size limit, and close with the
                // rest unread (the client's next writes meet a reset).
                let mut some = vec![0u8; 64 * 1024];
                let _ = s.read_exact(&mut some).await;
                let _ = w(&mut s, reply).await;
                return;
            }
            let mut data = Vec::new();
            loop {
                let mut byte = [0u8; 1];
                if s.read_exact(&mut byte).await.is_err() {
                    return;
                }
                data.push(byte[0]);
                if data.ends_with(b"\r\n.\r\n") {
                    break;
                }
            }
            data.truncate(data.len() - 3);
            // Undo the client's dot-stuffing (RFC 5321 section 4.5.2).
            let text = data;
            let mut unstuffed = Vec::with_capacity(text.len());
            let mut at_line_start = true;
            for (i, &b) in text.iter().enumerate() {
                if !(at_line_start && b == b'.' && text.get(i + 1) == Some(&b'.')) {
                    unstuffed.push(b);
                }
                at_line_start = b == b'\n';
            }
            msg.data = unstuffed;
            let reply = data_reply.lock().unwrap().clone();
            if let Some(slow) = reply.strip_prefix("SLOW ") {
                // Take the message, then answer a second late: a delivery in flight for a while.
                let _ = tx.send(msg.clone());
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                if w(&mut s, slow.to_string()).await.is_err() {
                    return;
                }
                continue;
            }
            if let Some(held) = reply.strip_prefix("HOLD ") {
                // Take the message, then answer when the test says: a delivery in flight for as long as needed.
                let _ = tx.send(msg.clone());
                offers.release.notified().await;
                if w(&mut s, held.to_string()).await.is_err() {
                    return;
                }
                continue;
            }
            if reply == "TAKEDROP" {
                // Once: the next message (the same one, sent again) is answered.
                *data_reply.lock().unwrap() = "250 2.0.0 OK".into();
                msg.at = std::time::SystemTime::now();
                let _ = tx.send(msg.clone());
                return;
            }
            if let Some(last) = reply.strip_prefix("HANGUP ") {
                msg.at = std::time::SystemTime::now();
                let _ = tx.send(msg.clone());
                let _ = w(&mut s, last.to_string()).await;
                return;
            }
            if reply == "STALL" {
                // Hold the connection, answer nothing, until the client gives up.
                let mut rest = Vec::new();
                let _ = s.read_to_end(&mut rest).await;
                return;
            }
            if reply.trim_start_matches("STRAY ").starts_with('2') {
                msg.at = std::time::SystemTime::now();
                let _ = tx.send(msg.clone());
            }
            reply
        } else if upper == "QUIT" {
            let _ = w(&mut s, "221 2.0.0 Bye".into()).await;
            return;
        } else if upper == "RSET" || upper == "NOOP" {
            chunks.clear();
            "250 2.0.0 OK".into()
        } else {
            "502 5.5.1 Unrecognized command".into()
        };
        // "STRAY …": the reply, then, when the test says, one more that nothing asked for (a server out of step),
        // sent while the connection is idle.
        let stray = reply.strip_prefix("STRAY ").map(str::to_string);
        if w(&mut s, stray.clone().unwrap_or(reply)).await.is_err() {
            return;
        }
        if stray.is_some() {
            offers.release.notified().await;
            if w(&mut s, "250 2.0.0 stray".into()).await.is_err() {
                return;
            }
            offers.strays.notify_one();
        }
    }
}

/// The address in `<…>` after MAIL FROM: or RCPT TO:.
fn path(arg: &str) -> String {
    let arg = arg.trim().trim_start_matches('<');
    arg.split('>').next().unwrap_or("").to_string()
}

async fn w<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut BufReader<S>,
    line: String,
) -> std::io::Result<()> {
    s.get_mut().write_all((line + "\r\n").as_bytes()).await
}

/// Gmail's reply when the account's day is used up: the provider asks it to pause (an hour).
#[allow(dead_code)] // not every test binary uses it
pub const DAY_USED_UP: &str = "550 5.4.5 Daily user sending limit exceeded. For more information on Gmail sending limits go to https://support.google.com/a/answer/166852 - gsmtp";
