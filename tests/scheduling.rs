//! How the scheduler starts attempts, through the real binary: no more than there are connections free, except
//! for what needs none.

mod common;

use common::idp::{accounts_config, idp_issuing};
use common::upstream::FakeUpstream;
use common::*;

const BODY: &[u8] = b"Subject: scan\r\n\r\nhello\r\n";

/// The only account has one connection, held by a message whose final dot the upstream never answers. A second
/// message waits for that connection, but once it is past `max_age` it needs none: it goes to dead/ then, not
/// when the connection comes back (ten minutes later).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_message_goes_to_dead_while_every_connection_is_busy() {
    let mut upstream = FakeUpstream::start(&["tok"]).await;
    *upstream.data_reply.lock().unwrap() = "STALL".into();
    let dir = tempfile::tempdir().unwrap();
    let idp = idp_issuing("tok").await;
    let config = accounts_config(
        dir.path(),
        &idp.uri(),
        &[("office", &upstream)],
        "",
        "max_connections = 1\n[queue]\nmax_age = \"3s\"\n",
    );
    let mut d = Daemon::spawn(&config);
    // Its attempt starts first and takes the one connection (the second is counted as seeking it meanwhile).
    let stalled = send_message(d.addr, BODY).await;
    let waiting = send_message(d.addr, BODY).await;

    let dead = d.wait_log("relay_event=\"dead\"");
    assert!(
        dead.contains(&waiting) && dead.contains("expired after"),
        "{dead}"
    );
    assert!(!dead.contains(&stalled), "{dead}");
    assert!(upstream.received.try_recv().is_err(), "nothing was sent");
    let datas = upstream
        .commands
        .lock()
        .unwrap()
        .iter()
        .filter(|c| c.starts_with("DATA"))
        .count();
    assert!(datas <= 1, "only the stalled message reached the upstream");
}
