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

/// The scheduler stops turning (a test hook) while more messages arrive than its announcements of new mail hold
/// (4,096; 16 here, through another test hook): those that found them full are on disk all the same, and are read
/// from there once it turns again. Every message is delivered, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mail_accepted_while_the_scheduler_lags_is_read_from_disk() {
    const CONNECTIONS: usize = 4;
    const EACH: usize = 10;
    let mut upstream = FakeUpstream::start(&["tok"]).await;
    let dir = tempfile::tempdir().unwrap();
    let idp = idp_issuing("tok").await;
    let config = accounts_config(dir.path(), &idp.uri(), &[("office", &upstream)], "", "");
    let wedge = dir.path().join("wedge");
    std::fs::write(&wedge, b"").unwrap();
    let mut cmd = std::process::Command::new(relay_bin());
    cmd.args(["serve", "--config"])
        .arg(&config)
        .env("RELAY_TEST_WEDGE_SCHEDULER", &wedge)
        .env("RELAY_TEST_ANNOUNCEMENTS_HELD", "16");
    let mut d = Daemon::start(cmd);
    d.wait_log("wedged by the test hook");

    let mut senders = tokio::task::JoinSet::new();
    for c in 0..CONNECTIONS {
        let addr = d.addr;
        senders.spawn(async move {
            let mut client = RawClient::ready(addr).await;
            for i in 0..EACH {
                // Pipelined, as relay offers: the three commands in one write.
                client
                    .send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
                    .await;
                for code in [250, 250, 354] {
                    client.expect(code).await;
                }
                client
                    .send(format!("Subject: lag {c}-{i}\r\n\r\nhello\r\n.\r\n").as_bytes())
                    .await;
                client.expect(250).await;
            }
            client.cmd("QUIT", 221).await;
        });
    }
    while let Some(sent) = senders.join_next().await {
        sent.expect("sender");
    }
    assert_eq!(
        files_in(&dir.path().join("state"), "queue").len(),
        CONNECTIONS * EACH,
        "all queued, none delivered while the scheduler is stuck"
    );

    std::fs::remove_file(&wedge).unwrap();
    let mut subjects = std::collections::HashSet::new();
    for _ in 0..CONNECTIONS * EACH {
        let got = upstream.next().await;
        let text = String::from_utf8_lossy(&got.data).into_owned();
        let subject = text
            .lines()
            .find(|l| l.starts_with("Subject: lag "))
            .expect("the subject")
            .to_string();
        assert!(subjects.insert(subject.clone()), "{subject} sent twice");
    }
    assert_eq!(subjects.len(), CONNECTIONS * EACH);
}
