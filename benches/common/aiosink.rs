//! The aiosmtpd sink (`common/aiosink.py`) in its own python3 process, and a control connection to it that asks
//! for its counts (`XSTAT`) and restarts its clock (`XRESET`).
#![allow(dead_code)] // only `load drain` uses it

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

use crate::daemon::{expect, reply};

pub struct AioSink {
    pub addr: SocketAddr,
    _child: Child,
    control: BufReader<TcpStream>,
}

/// What the sink has taken so far.
pub struct Counts {
    pub messages: u64,
    pub connections: u64,
    /// Seconds from the first message since the last restart of the clock to the latest one.
    pub span: f64,
}

impl AioSink {
    /// Starts the sink (bounded: 30 s to say where it listens) and opens its control connection.
    pub async fn start() -> std::io::Result<AioSink> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/common/aiosink.py");
        let mut child = Command::new("python3")
            .arg(&script)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| std::io::Error::other("no stdout"))?;
        let mut line = String::new();
        tokio::time::timeout(
            Duration::from_secs(30),
            BufReader::new(stdout).read_line(&mut line),
        )
        .await
        .map_err(|_| std::io::Error::other("aiosink.py said nothing within 30 s"))??;
        let addr: SocketAddr = line
            .trim()
            .strip_prefix("aiosink_addr=")
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| {
                std::io::Error::other(format!(
                    "aiosink.py did not start (is aiosmtpd installed? `pip install aiosmtpd`): {line:?}"
                ))
            })?;
        let mut control = BufReader::new(TcpStream::connect(addr).await?);
        expect(&mut control, 220).await?;
        Ok(AioSink {
            addr,
            _child: child,
            control,
        })
    }

    pub async fn counts(&mut self) -> std::io::Result<Counts> {
        let (_, line) = self.command("XSTAT").await?;
        let mut words = line.split_whitespace().skip(1);
        let mut next = || words.next().and_then(|w| w.parse::<f64>().ok());
        match (next(), next(), next()) {
            (Some(m), Some(c), Some(span)) => Ok(Counts {
                messages: m as u64,
                connections: c as u64,
                span,
            }),
            _ => Err(std::io::Error::other(format!("XSTAT: {line:?}"))),
        }
    }

    pub async fn restart_clock(&mut self) -> std::io::Result<()> {
        self.command("XRESET").await.map(drop)
    }

    async fn command(&mut self, verb: &str) -> std::io::Result<(u16, String)> {
        self.control
            .get_mut()
            .write_all(format!("{verb}\r\n").as_bytes())
            .await?;
        let (code, line) = tokio::time::timeout(Duration::from_secs(10), reply(&mut self.control))
            .await
            .map_err(|_| std::io::Error::other(format!("{verb}: no answer within 10 s")))??;
        if code != 250 {
            return Err(std::io::Error::other(format!("{verb}: {line:?}")));
        }
        Ok((code, line))
    }
}
