//! The queue's life around deliveries: a stop drains deliveries in flight, a delivered message whose file cannot
//! be removed is never sent again, and the command line reads the queue safely while mail arrives and leaves.

mod common;

use common::idp::{idp_issuing, relay_with_account_and};
use common::upstream::FakeUpstream;
use common::*;

const BODY: &[u8] = b"Subject: lifecycle\r\n\r\nhello\r\n";

#[tokio::test]
async fn a_stop_lets_the_delivery_in_flight_finish() {
    let idp = idp_issuing("tok").await;
    let mut upstream = FakeUpstream::start(&["tok"]).await;
    *upstream.data_reply.lock().unwrap() = "SLOW 250 2.0.0 OK".into();
    let relay = relay_with_account_and(&idp, &upstream, "").await;
    send_message(relay.addr(), BODY).await;
    // The upstream has the message and answers a second later; the stop comes now.
    let got = upstream.next().await;
    assert_eq!(strip_received(&got.data), BODY);
    let state = relay.state();
    relay.stop().await;
    assert!(
        queued_in(&state).is_empty(),
        "the delivery in flight finished and its message was removed before the stop returned"
    );
}

/// The queue directory is made immutable (chattr +i) between a deferral and the successful retry, so the
/// delivered message's file cannot be removed. It must not be sent a second time.
#[tokio::test]
async fn a_delivered_message_whose_file_cannot_be_removed_is_never_sent_again() {
    let idp = idp_issuing("tok").await;
    let mut upstream = FakeUpstream::start(&["tok"]).await;
    *upstream.data_reply.lock().unwrap() = "451 4.3.0 try later".into();
    let mut relay = relay_with_account_and(&idp, &upstream, "[queue]\nretry = [\"1s\"]\n").await;
    send_message(relay.addr(), BODY).await;
    relay.attempts_done(1).await;
    let queue = relay.state().join("queue");
    let immutable = std::process::Command::new("chattr")
        .arg("+i")
        .arg(&queue)
        .status()
        .is_ok_and(|s| s.success());
    if !immutable {
        eprintln!("SKIPPED: chattr +i is not available here (needs root and ext4 or similar)");
        return;
    }
    struct Mutable(std::path::PathBuf);
    impl Drop for Mutable {
        fn drop(&mut self) {
            let _ = std::process::Command::new("chattr")
                .arg("-i")
                .arg(&self.0)
                .status();
        }
    }
    let guard = Mutable(queue.clone());
    *upstream.data_reply.lock().unwrap() = "250 2.0.0 OK".into();
    upstream.next().await;
    relay.attempts_done(2).await;
    assert_eq!(relay.queued().len(), 1, "the file could not be removed");
    // The schedule is reread (as `relay queue retry --all` does): the message comes up again, and is not sent.
    relay::queue::retry::touch_trigger(&relay.state()).unwrap();
    relay.attempts_done(3).await;
    assert!(
        upstream.received.try_recv().is_err(),
        "a delivered message was sent again"
    );
    // Once the directory is writable again, the next look removes it.
    drop(guard);
    relay::queue::retry::touch_trigger(&relay.state()).unwrap();
    relay.drained().await;
    assert!(upstream.received.try_recv().is_err(), "sent once only");
}

/// `relay queue list` and `relay status` run over and over while clients send and the daemon delivers: they
/// never fail, and never list a message that is not complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_list_and_status_never_fail_while_mail_arrives_and_leaves() {
    let idp = idp_issuing("tok").await;
    let mut upstream = FakeUpstream::start(&["tok"]).await;
    let relay = relay_with_account_and(&idp, &upstream, "").await;
    let cli = relay.dir.path().join("cli.toml");
    std::fs::write(&cli, format!("state_dir = {:?}\n", relay.state())).unwrap();
    let addr = relay.addr();
    let mut senders = tokio::task::JoinSet::new();
    for _ in 0..4 {
        senders.spawn(async move {
            for _ in 0..25 {
                send_message(addr, BODY).await;
            }
        });
    }
    let mut runs = 0;
    while !senders.is_empty() {
        let commands: [&[&str]; 2] = [&["queue", "list", "--json"], &["status", "--json"]];
        for args in commands {
            let out = tokio::process::Command::new(relay_bin())
                .args(args)
                .arg("--config")
                .arg(&cli)
                .output()
                .await
                .unwrap();
            // status exits 1 when something needs attention; 2 or a crash would be a failure.
            assert!(
                matches!(out.status.code(), Some(0 | 1)),
                "{args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let doc: serde_json::Value = serde_json::from_slice(&out.stdout)
                .unwrap_or_else(|e| panic!("{args:?} printed no JSON ({e})"));
            if let Some(list) = doc.as_array() {
                for m in list {
                    assert!(m["size"].as_u64().is_some_and(|s| s > 0), "{m}");
                }
            }
            runs += 1;
        }
        if let Some(joined) = senders.try_join_next() {
            joined.expect("sender");
        } else {
            tokio::task::yield_now().await;
        }
    }
    for _ in 0..100 {
        upstream.next().await;
    }
    assert!(runs >= 2);
}

/// A second daemon on the same state dir would take the first one's messages still arriving for leftovers of a
/// crash: it refuses to start, and says why.
#[tokio::test]
async fn a_second_daemon_on_the_same_state_dir_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "address = \"127.0.0.1:0\"\nauth = \"none\"");
    let first = Daemon::spawn(&config);
    // A message in the middle of DATA on the first daemon, big enough to be on disk already.
    let mut c = RawClient::in_data(first.addr).await;
    c.send(format!("Subject: big\r\n\r\n{}\r\n", "x".repeat(200_000)).as_bytes())
        .await;
    let second_refused = || {
        let second = run_bounded(
            std::process::Command::new(relay_bin())
                .args(["serve", "--config"])
                .arg(&config),
        );
        assert_eq!(second.status.code(), Some(1));
        let stderr = String::from_utf8_lossy(&second.stderr);
        assert!(
            stderr.contains("another relay is already running on this state dir"),
            "{stderr}"
        );
    };
    second_refused();
    // Nor once `.lock` is removed under the first (a clean-up of dot files): the directory itself is held too. And
    // the commands still see a relay running.
    std::fs::remove_file(dir.path().join("state/.lock")).unwrap();
    second_refused();
    let status = run_bounded(
        std::process::Command::new(relay_bin())
            .args(["status", "--config"])
            .arg(&config),
    );
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(!status.contains("daemon: not running"), "{status}");
    c.send(b".\r\n").await;
    c.expect(250).await;
    assert_eq!(queued_in(&dir.path().join("state")).len(), 1);
}

/// A queued file whose bytes no longer match its seal (damaged on disk) is never sent: delivery moves it to
/// `quarantine/`, and says so.
#[tokio::test]
async fn a_damaged_message_is_quarantined_not_sent() {
    let idp = idp_issuing("tok").await;
    let mut upstream = FakeUpstream::start(&["tok"]).await;
    *upstream.data_reply.lock().unwrap() = "451 4.3.0 try later".into();
    let mut relay = relay_with_account_and(&idp, &upstream, "[queue]\nretry = [\"1s\"]\n").await;
    let id = send_message(relay.addr(), BODY).await;
    relay.attempts_done(1).await;
    let path = relay.state().join(format!("queue/{id}.msg"));
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 3;
    bytes[last] ^= 0x20;
    std::fs::write(&path, bytes).unwrap();
    *upstream.data_reply.lock().unwrap() = "250 2.0.0 OK".into();
    relay.attempts_done(2).await;
    let mut quarantined = files_in(&relay.state(), "quarantine");
    quarantined.sort();
    assert_eq!(quarantined, [format!("{id}.msg"), format!("{id}.state")]);
    assert!(relay.queued().is_empty());
    assert!(
        upstream.received.try_recv().is_err(),
        "a damaged message was sent"
    );
}

/// `sudo relay serve` on the service's state dir (owned by its user): what root makes there (the lock, the
/// queue's directories, the messages, a spilled large one too) goes to the state dir's owner, so that the
/// service starts and reads its mail afterwards. Needs root; elsewhere there is nothing to give away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_root_writes_in_the_state_dir_goes_to_its_owner() {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("not root: nothing to give away, not tested");
        return;
    }
    const NOBODY: u32 = 65534;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    std::os::unix::fs::chown(&state, Some(NOBODY), Some(NOBODY)).unwrap();
    let config = write_config(dir.path(), "address = \"127.0.0.1:0\"\nauth = \"none\"");
    let daemon = Daemon::spawn(&config);
    send_message(daemon.addr, b"Subject: small\r\n\r\nbody\r\n").await;
    let mut big = b"Subject: big\r\n\r\n".to_vec();
    while big.len() < 200 << 10 {
        big.extend_from_slice(&[b'y'; 76]);
        big.extend_from_slice(b"\r\n");
    }
    send_message(daemon.addr, &big).await;
    assert_eq!(daemon.terminate().code(), Some(0));
    let mut paths = vec![
        state.join(".lock"),
        state.join("queue"),
        state.join("dead"),
        state.join("quarantine"),
    ];
    paths.extend(
        std::fs::read_dir(state.join("queue"))
            .unwrap()
            .map(|e| e.unwrap().path()),
    );
    assert_eq!(paths.len(), 6, "{paths:?}");
    for p in paths {
        assert_eq!(
            std::fs::metadata(&p).unwrap().uid(),
            NOBODY,
            "{}",
            p.display()
        );
    }
}
