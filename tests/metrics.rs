//! `[metrics]` through the real binary: the endpoint is scraped over a socket and its Prometheus text parsed.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::Path;

use common::idp::{accounts_config, generic_account, idp_issuing};
use common::upstream::FakeUpstream;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const LISTENER: &str = "address = \"127.0.0.1:0\"\nauth = \"none\"";

/// One HTTP/1.1 request; returns the status line, the headers and the body.
async fn get(addr: SocketAddr, request: &str) -> (String, String, String) {
    let mut tcp = tokio::time::timeout(LIMIT, tokio::net::TcpStream::connect(addr))
        .await
        .unwrap()
        .unwrap();
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(LIMIT, tcp.read_to_end(&mut raw))
        .await
        .expect("the response in time")
        .unwrap();
    let raw = String::from_utf8(raw).expect("UTF-8");
    let (head, body) = raw.split_once("\r\n\r\n").expect("a head and a body");
    let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    (status.to_string(), headers.to_string(), body.to_string())
}

/// Samples of the text format: `name{labels}` (labels as written, sorted by the encoder) → value.
fn samples(body: &str) -> HashMap<String, f64> {
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').expect("a sample line");
            (series.to_string(), value.parse().expect("a number"))
        })
        .collect()
}

/// The metrics address a daemon logged.
fn metrics_address(daemon: &mut Daemon) -> SocketAddr {
    let line = daemon.wait_log("relay_event=\"metrics_listening\"");
    line.rsplit("address=")
        .next()
        .and_then(|a| a.split_whitespace().next())
        .unwrap()
        .parse()
        .expect("the metrics address in the log")
}

async fn scrape(metrics: SocketAddr) -> String {
    let (status, _, body) = get(metrics, "GET /metrics HTTP/1.1\r\nHost: relay\r\n\r\n").await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    body
}

/// Every account some series names.
fn accounts_shown(body: &str) -> BTreeSet<String> {
    samples(body)
        .keys()
        .filter_map(|k| k.split("account=\"").nth(1)?.split('"').next())
        .filter(|a| !a.is_empty())
        .map(str::to_string)
        .collect()
}

/// Rewrites the config with `accounts` (client credentials, the first the default), mail to `*@NAME.test` routed
/// to account NAME, and `[metrics]` on the port it was bound to at start.
fn rewrite(dir: &Path, idp: &str, accounts: &[(&str, &FakeUpstream)]) {
    let mut text = format!("default_account = \"{}\"\n", accounts[0].0);
    for (name, upstream) in accounts {
        text.push_str(&generic_account(name, idp, upstream, "client_credentials"));
    }
    for (name, _) in accounts {
        text.push_str(&format!(
            "[[route]]\nrecipient = \"*@{name}.test\"\naccount = \"{name}\"\n"
        ));
    }
    text.push_str("[metrics]\naddress = \"127.0.0.1:0\"\n");
    write_config_with(dir, &text, LISTENER);
}

/// A sysadmin adds an account and reloads: it is shown like the others, at once; one the reload removes is no
/// longer shown at all. Reloads that come and go leave only the configured accounts' series.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_shows_the_added_accounts_series_and_drops_the_removed_ones() {
    let dir = tempfile::tempdir().unwrap();
    let idp = idp_issuing("tok").await;
    let office = FakeUpstream::start(&["tok"]).await;
    let mut second = FakeUpstream::start(&["tok"]).await;
    let config = accounts_config(
        dir.path(),
        &idp.uri(),
        &[("office", &office)],
        "",
        "[metrics]\naddress = \"127.0.0.1:0\"\n",
    );
    let mut daemon = Daemon::spawn(&config);
    let metrics = metrics_address(&mut daemon);
    let body = scrape(metrics).await;
    assert_eq!(
        accounts_shown(&body),
        BTreeSet::from(["office".to_string()])
    );

    // `relay authorize second` has stored its tokens; the config names it; reload.
    write_valid_tokens(
        &dir.path().join("state"),
        "second",
        "tok",
        std::time::Duration::from_secs(1800),
    );
    rewrite(
        dir.path(),
        &idp.uri(),
        &[("office", &office), ("second", &second)],
    );
    let reloaded = daemon.reload();
    assert!(reloaded.contains("accounts added: second"), "{reloaded}");
    let body = scrape(metrics).await;
    let s = samples(&body);
    let at = |series: &str| -> f64 {
        *s.get(series)
            .unwrap_or_else(|| panic!("no {series} in\n{body}"))
    };
    let expiry = at("relay_token_expiry_seconds{account=\"second\"}");
    assert!((1700.0..=1800.0).contains(&expiry), "{expiry}");
    assert_eq!(
        at("relay_deliveries_total{account=\"second\",result=\"delivered\"}"),
        0.0,
        "the new account's series exist from the reload"
    );
    assert_eq!(
        at("relay_token_refresh_failures_total{account=\"second\"}"),
        0.0
    );
    assert!(s.contains_key("relay_token_expiry_seconds{account=\"office\"}"));

    // Its deliveries are counted.
    let mut c = RawClient::ready(daemon.addr).await;
    c.cmd("MAIL FROM:<a@example.com>", 250).await;
    c.cmd("RCPT TO:<x@second.test>", 250).await;
    c.cmd("DATA", 354).await;
    c.send(b"Subject: via second\r\n\r\nbody\r\n.\r\n").await;
    c.expect(250).await;
    second.next().await;
    let delivered = daemon.wait_log("relay_event=\"delivered\"");
    assert!(delivered.contains("second"), "{delivered}");
    let body = scrape(metrics).await;
    assert_eq!(
        samples(&body)["relay_deliveries_total{account=\"second\",result=\"delivered\"}"],
        1.0,
        "{body}"
    );

    // `office` is removed: none of its series is left, its token expiry included.
    rewrite(dir.path(), &idp.uri(), &[("second", &second)]);
    let reloaded = daemon.reload();
    assert!(reloaded.contains("removed: office"), "{reloaded}");
    let body = scrape(metrics).await;
    assert_eq!(
        accounts_shown(&body),
        BTreeSet::from(["second".to_string()]),
        "{body}"
    );

    // Accounts that come and go, one reload each: only the configured ones are shown in the end.
    for i in 0..10 {
        let name = format!("extra{i}");
        rewrite(
            dir.path(),
            &idp.uri(),
            &[("second", &second), (&name, &office)],
        );
        let reloaded = daemon.reload();
        assert!(reloaded.contains(&format!("added: {name}")), "{reloaded}");
    }
    let body = scrape(metrics).await;
    assert_eq!(
        accounts_shown(&body),
        BTreeSet::from(["second".to_string(), "extra9".to_string()]),
        "{body}"
    );
    assert!(daemon.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_endpoint_shows_queue_depth_deliveries_by_account_token_expiry_and_latency_histograms()
{
    let dir = tempfile::tempdir().unwrap();
    let idp = idp_issuing("tok").await;
    let mut good = FakeUpstream::start(&["tok"]).await;
    let bad = FakeUpstream::start(&["tok"]).await;
    *bad.data_reply.lock().unwrap() = "550 5.7.1 refused".into();
    let later = FakeUpstream::start(&["tok"]).await;
    *later.data_reply.lock().unwrap() = "451 4.3.0 later".into();
    let config = accounts_config(
        dir.path(),
        &idp.uri(),
        &[("good", &good), ("bad", &bad), ("later", &later)],
        "",
        "[[route]]\nrecipient = \"*@bad.test\"\naccount = \"bad\"\n[[route]]\nrecipient = \"*@later.test\"\naccount = \"later\"\n[metrics]\naddress = \"127.0.0.1:0\"\n",
    );
    let mut daemon = Daemon::spawn(&config);
    let line = daemon.wait_log("relay_event=\"metrics_listening\"");
    let metrics: SocketAddr = line
        .rsplit("address=")
        .next()
        .and_then(|a| a.split_whitespace().next())
        .unwrap()
        .parse()
        .expect("the metrics address in the log");

    for _ in 0..2 {
        send_message(daemon.addr, b"Subject: fine\r\n\r\nbody\r\n").await;
        good.next().await;
        daemon.wait_log("relay_event=\"delivered\"");
    }
    let mut c = RawClient::ready(daemon.addr).await;
    for to in ["x@bad.test", "y@later.test"] {
        c.cmd("MAIL FROM:<a@example.com>", 250).await;
        c.cmd(&format!("RCPT TO:<{to}>"), 250).await;
        c.cmd("DATA", 354).await;
        c.send(b"Subject: no\r\n\r\nbody\r\n.\r\n").await;
        c.expect(250).await;
    }
    daemon.wait_log("relay_event=\"dead\"");
    daemon.wait_log("relay_event=\"deferred\"");

    let (status, headers, body) = get(
        metrics,
        "GET /metrics HTTP/1.1\r\nHost: relay\r\nAccept: */*\r\n\r\n",
    )
    .await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(
        headers.contains("Content-Type: text/plain; version=0.0.4; charset=utf-8"),
        "{headers}"
    );
    let s = samples(&body);
    let at = |series: &str| -> f64 {
        *s.get(series)
            .unwrap_or_else(|| panic!("no {series} in\n{body}"))
    };
    assert_eq!(at("relay_queue_messages{state=\"queued\"}"), 0.0);
    assert_eq!(at("relay_queue_messages{state=\"deferred\"}"), 1.0);
    assert_eq!(at("relay_queue_messages{state=\"dead\"}"), 1.0);
    assert_eq!(at("relay_queue_messages{state=\"quarantined\"}"), 0.0);
    assert!(at("relay_queue_oldest_age_seconds") < 60.0);
    assert!(at("relay_state_dir_free_bytes") > 0.0);
    assert_eq!(at("relay_messages_accepted_total"), 4.0);
    assert_eq!(
        at("relay_deliveries_total{account=\"good\",result=\"delivered\"}"),
        2.0
    );
    assert_eq!(
        at("relay_deliveries_total{account=\"bad\",result=\"dead\"}"),
        1.0
    );
    assert_eq!(
        at("relay_deliveries_total{account=\"later\",result=\"deferred\"}"),
        1.0
    );
    assert_eq!(
        at("relay_deliveries_total{account=\"good\",result=\"dead\"}"),
        0.0,
        "every account's series exists"
    );
    let expiry = at("relay_token_expiry_seconds{account=\"good\"}");
    assert!((3000.0..=3600.0).contains(&expiry), "{expiry}");
    assert_eq!(
        at("relay_token_refresh_failures_total{account=\"good\"}"),
        0.0
    );

    // Histograms: cumulative buckets up to +Inf, which equals the count.
    for (name, count) in [
        ("relay_accept_latency_seconds", 4.0),
        ("relay_delivery_latency_seconds", 2.0),
    ] {
        let mut buckets: Vec<(f64, f64)> = s
            .iter()
            .filter_map(|(k, v)| {
                let le = k
                    .strip_prefix(&format!("{name}_bucket{{le=\""))?
                    .strip_suffix("\"}")?;
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().unwrap()
                };
                Some((le, *v))
            })
            .collect();
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        assert!(buckets.len() > 5, "{name} has buckets:\n{body}");
        assert!(
            buckets.windows(2).all(|w| w[0].1 <= w[1].1),
            "{name} is cumulative: {buckets:?}"
        );
        assert_eq!(buckets.last().unwrap(), &(f64::INFINITY, count), "{name}");
        assert_eq!(at(&format!("{name}_count")), count);
        assert!(at(&format!("{name}_sum")) >= 0.0);
    }
    assert!(
        body.contains("# TYPE relay_delivery_latency_seconds histogram"),
        "{body}"
    );

    let (status, _, _) = get(metrics, "GET /other HTTP/1.1\r\n\r\n").await;
    assert_eq!(status, "HTTP/1.1 404 Not Found");
    let (status, headers, _) = get(
        metrics,
        "POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
    )
    .await;
    assert_eq!(status, "HTTP/1.1 405 Method Not Allowed");
    assert!(headers.contains("\r\nAllow: GET, HEAD"), "{headers}");
}

#[test]
fn relay_check_names_a_bad_metrics_address_and_warns_of_one_beyond_loopback() {
    let check = |address: &str| {
        let dir = tempfile::tempdir().unwrap();
        let table = format!("[metrics]\naddress = \"{address}\"\n");
        let config = write_config_with(dir.path(), &table, LISTENER);
        let out = std::process::Command::new(relay_bin())
            .args(["check", "--config"])
            .arg(&config)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, stderr) = check("everywhere");
    assert!(!ok && stderr.contains("metrics.address"), "{stderr}");
    let (ok, stderr) = check("0.0.0.0:9325");
    assert!(
        ok && stderr.contains("warning: metrics.address: 0.0.0.0:9325 is not loopback"),
        "{stderr}"
    );
    let (ok, stderr) = check("127.0.0.1:9325");
    assert!(ok && !stderr.contains("warning"), "{stderr}");
}

/// Connections that never send a request (a port scanner, a stuck client, anyone on the host) cannot keep the
/// scraper out: with every place held by such connections, a scrape evicts the one that has waited longest and is
/// answered. Before, eight idle connections turned every scrape away for five seconds at a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_do_not_keep_scrapes_out() {
    let dir = tempfile::tempdir().unwrap();
    let idp = idp_issuing("tok").await;
    let upstream = FakeUpstream::start(&["tok"]).await;
    let config = accounts_config(
        dir.path(),
        &idp.uri(),
        &[("office", &upstream)],
        "",
        "[metrics]\naddress = \"127.0.0.1:0\"\n",
    );
    let mut daemon = Daemon::spawn(&config);
    let metrics = metrics_address(&mut daemon);
    let mut idle = Vec::new();
    for _ in 0..100 {
        idle.push(tokio::net::TcpStream::connect(metrics).await.unwrap());
    }
    for _ in 0..5 {
        assert!(
            scrape(metrics)
                .await
                .contains("relay_messages_accepted_total")
        );
    }
    drop(idle);
    assert!(daemon.terminate().success());
}
