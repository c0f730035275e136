//! Nothing is lost and nothing half-written is kept: restarts, cut-off sessions, full or broken disks.

mod common;

use common::idp::{account_top, idp_issuing};
use common::upstream::FakeUpstream;
use common::*;

const LISTENER: &str = "[[listener]]\naddress = \"127.0.0.1:0\"\nauth = \"none\"\n";

async fn send_one(relay: &TestRelay, subject: &str) -> String {
    send_message(
        relay.addr(),
        format!("Subject: {subject}\r\n\r\nbody\r\n").as_bytes(),
    )
    .await
}

#[tokio::test]
async fn restart_keeps_every_queued_message() {
    let relay = TestRelay::start(LISTENER).await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(send_one(&relay, &format!("message {i}")).await);
    }
    let dir = relay.stop().await;
    let relay = TestRelay::start_in(dir, LISTENER).await;
    let queued = relay.queued();
    let mut found: Vec<String> = queued
        .iter()
        .map(|(env, _)| env["id"].as_str().unwrap().to_string())
        .collect();
    found.sort();
    ids.sort();
    assert_eq!(found, ids);
    for (i, (_, eml)) in relay.queued().iter().enumerate() {
        assert!(
            String::from_utf8_lossy(eml).contains("Subject: message "),
            "message {i} intact"
        );
    }
    // And the restarted relay takes more.
    send_one(&relay, "after restart").await;
    assert_eq!(relay.queued().len(), 6);
}

#[tokio::test]
async fn session_cut_off_mid_data_leaves_nothing() {
    let mut relay = TestRelay::start(LISTENER).await;
    let mut c = RawClient::in_data(relay.addr()).await;
    // More than the in-memory part, so that the message's file exists when the connection drops.
    let line = format!("{}\r\n", "y".repeat(998));
    for _ in 0..300 {
        c.send(line.as_bytes()).await;
    }
    drop(c);
    relay.idle().await;
    assert!(
        files_in(&relay.state(), "queue").is_empty(),
        "partial file left in queue/"
    );
}

/// A message file renamed with its id in upper case (by hand, a copy from elsewhere) would be neither delivered
/// nor listed: at start it goes to quarantine/, where a person looks.
#[tokio::test]
async fn a_message_file_named_otherwise_is_kept_aside_at_start() {
    let relay = TestRelay::start(LISTENER).await;
    send_one(&relay, "one").await;
    let dir = relay.stop().await;
    let queue = dir.path().join("state/queue");
    let name = std::fs::read_dir(&queue)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .file_name()
        .into_string()
        .unwrap();
    let upper = name.replace(".msg", "").to_ascii_uppercase() + ".msg";
    std::fs::copy(queue.join(&name), queue.join(&upper)).unwrap();
    let relay = TestRelay::start_in(dir, LISTENER).await;
    assert_eq!(files_in(&relay.state(), "quarantine"), [upper]);
    assert_eq!(files_in(&relay.state(), "queue"), [name]);
}

#[tokio::test]
async fn leftovers_of_a_crash_are_cleared_at_start() {
    // Two messages queued, then a stop; then what a crash in the middle of a third leaves: its file with the
    // envelope line still unsealed, and one cut off inside the envelope line.
    let relay = TestRelay::start(LISTENER).await;
    send_one(&relay, "one").await;
    send_one(&relay, "two").await;
    let dir = relay.stop().await;
    let queue = dir.path().join("state/queue");
    let (_, kept) = std::fs::read_dir(&queue)
        .unwrap()
        .map(|e| e.unwrap().path())
        .map(|p| (p.clone(), std::fs::read(p).unwrap()))
        .next()
        .unwrap();
    let unsealed = String::from_utf8(kept.clone()).unwrap().replace(
        &format!("\"seal\":\"{}", &sealed_of(&kept)),
        &format!("\"seal\":\"{}", "0".repeat(80)),
    );
    std::fs::write(queue.join("01a20a2d000000000000000000000001.msg"), unsealed).unwrap();
    // Cut off inside the seal's placeholder: never acknowledged either.
    std::fs::write(
        queue.join("01a20a2d000000000000000000000003.msg"),
        "{\"seal\":\"0000",
    )
    .unwrap();
    // Not what relay writes: it might have been acknowledged, so it is kept aside, never removed.
    std::fs::write(
        queue.join("01a20a2d000000000000000000000002.msg"),
        "{\"id\":",
    )
    .unwrap();
    // A move back from dead/ (`relay queue retry --dead`) cut off between its rename and the unlink of dead/'s
    // state file: the message and its state are in queue/ already, and the state file left in dead/ would stay
    // for ever.
    let dead = dir.path().join("state/dead");
    std::fs::create_dir_all(&dead).unwrap();
    std::fs::write(
        dead.join("01a20a2d000000000000000000000004.state"),
        "{\"attempts\":3}",
    )
    .unwrap();
    let relay = TestRelay::start_in(dir, LISTENER).await;
    assert_eq!(
        files_in(&relay.state(), "queue").len(),
        2,
        "only the two acknowledged messages stay"
    );
    assert!(files_in(&relay.state(), "dead").is_empty());
    assert_eq!(
        files_in(&relay.state(), "quarantine"),
        ["01a20a2d000000000000000000000002.msg"]
    );
    assert_eq!(relay.queued().len(), 2);
    send_one(&relay, "after the crash").await;
    assert_eq!(relay.queued().len(), 3);
    // `relay status` says so, and that it needs attention.
    let cli = relay.dir.path().join("cli.toml");
    std::fs::write(&cli, format!("state_dir = {:?}\n", relay.state())).unwrap();
    let status = |args: &[&str]| {
        std::process::Command::new(relay_bin())
            .arg("status")
            .args(args)
            .arg("--config")
            .arg(&cli)
            .output()
            .unwrap()
    };
    let out = status(&["--json"]);
    assert_eq!(out.status.code(), Some(1));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["queue"]["quarantined"], 1, "{doc}");
    assert_eq!(doc["queue"]["queued"], 3, "{doc}");
    let out = status(&[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("quarantine: 1 file(s)"), "{text}");
    assert!(!text.contains("unreadable:"), "{text}");
    // A file in queue/ that is not a message is named as such, apart from what is in quarantine/.
    let state = relay.state();
    let _dir = relay.stop().await;
    std::fs::write(
        state.join("queue/01a20a2d0000000000000000000000ff.msg"),
        "garbage",
    )
    .unwrap();
    let out = status(&[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("quarantine: 1 file(s)") && text.contains("unreadable: 1 file(s)"),
        "{text}"
    );
}

/// The seal in a queue file's envelope line.
fn sealed_of(file: &[u8]) -> String {
    let nl = file.iter().position(|&b| b == b'\n').unwrap();
    let line: serde_json::Value = serde_json::from_slice(&file[..nl]).unwrap();
    line["seal"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn unwritable_spool_answers_451_local_error_and_keeps_nothing() {
    let mut relay = TestRelay::start(LISTENER).await;
    // Root ignores file modes; a regular file where the queue directory should be fails for anyone.
    let queue = relay.state().join("queue");
    std::fs::remove_dir(&queue).unwrap();
    std::fs::write(&queue, "not a directory").unwrap();
    for size in [100, 200_000] {
        let mut c = RawClient::in_data(relay.addr()).await;
        let mut body = b"Subject: x\r\n\r\n".to_vec();
        body.extend(std::iter::repeat_n(b'z', size));
        body.extend_from_slice(b"\r\n.\r\n");
        c.send(&body).await;
        // Not "storage" (ENOTDIR, not ENOSPC): a local error, so that nobody looks at `df` for it.
        let reply = c.expect(451).await;
        assert!(reply.starts_with("451 4.3.0 "), "{reply}");
        c.cmd("NOOP", 250).await;
    }
    relay.idle().await;
    assert!(files_in(&relay.state(), "queue").is_empty());
}

/// A real ENOSPC from a 256 KiB tmpfs. Needs root and mount(2); where the sandbox forbids it, the test says so
/// and checks nothing (the unwritable-spool test above covers a failed write, with its own reply).
#[tokio::test]
async fn full_disk_answers_452_and_leaves_no_partial_file() {
    let dir = tempfile::tempdir().unwrap();
    let Some(_guard) = tmpfs_state(dir.path(), "256k") else {
        return;
    };
    // An account whose upstream refuses for now, so that the mail stays on the full disk.
    let idp = idp_issuing("tok").await;
    let mut upstream = FakeUpstream::start(&["tok"]).await;
    *upstream.data_reply.lock().unwrap() = "451 4.3.0 try later".into();
    let top = account_top(
        dir.path(),
        &idp.uri(),
        &upstream,
        // No margin: this test is about the write that fails (the margin is the next test's).
        "[queue]\nretry = [\"1s\"]\nmin_free_space = \"0\"\n",
    );
    let mut relay = TestRelay::start_with(dir, &top, LISTENER).await;
    // A small message fits.
    let mut c = RawClient::in_data(relay.addr()).await;
    c.send(b"Subject: fits\r\n\r\nsmall\r\n.\r\n").await;
    c.expect(250).await;
    // One MiB does not.
    c.begin_message().await;
    let line = format!("{}\r\n", "q".repeat(1022));
    for _ in 0..1024 {
        c.send(line.as_bytes()).await;
    }
    c.send(b".\r\n").await;
    let reply = c.expect(452).await;
    assert!(reply.starts_with("452 4.3.1 "), "{reply}");
    // The space the refused message took is free again: the next small message is taken.
    c.begin_message().await;
    c.send(b"Subject: after\r\n\r\nsmall again\r\n.\r\n").await;
    c.expect(250).await;
    c.cmd("QUIT", 221).await;
    relay.idle().await;
    let msgs: Vec<String> = files_in(&relay.state(), "queue")
        .into_iter()
        .filter(|f| f.ends_with(".msg"))
        .collect();
    assert_eq!(msgs.len(), 2, "partial file left behind: {msgs:?}");
    // The upstream takes mail again: both acknowledged messages go out.
    *upstream.data_reply.lock().unwrap() = "250 2.0.0 OK".into();
    let mut subjects = Vec::new();
    for _ in 0..2 {
        let got = upstream.next().await;
        let text = String::from_utf8_lossy(&got.data).into_owned();
        subjects.push(
            text.lines()
                .find(|l| l.starts_with("Subject: "))
                .unwrap_or("")
                .to_string(),
        );
    }
    subjects.sort();
    assert_eq!(subjects, ["Subject: after", "Subject: fits"]);
    relay.drained().await;
    relay.stop().await;
}

/// Mounts a tmpfs of `size` as `dir/state`, unmounted when the guard goes. Needs root and mount(2); where the
/// sandbox forbids it, `None`, and the test says so and checks nothing.
fn tmpfs_state(dir: &std::path::Path, size: &str) -> Option<Unmount> {
    let state = dir.join("state");
    std::fs::create_dir_all(&state).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(&state)
        .output()
        .is_ok_and(|o| o.status.success());
    if !mounted {
        eprintln!("SKIPPED: cannot mount a tmpfs here (not root, or no CAP_SYS_ADMIN)");
        return None;
    }
    Some(Unmount(state))
}

struct Unmount(std::path::PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// The disk fills up: a MAIL whose declared SIZE does not fit, and then any MAIL once less than
/// `min_free_space` is left, is answered 452 4.3.1 before the client sends its body, with one log line when the
/// disk becomes short and one when it has room again; what was queued stays, and mail is taken again once space
/// is freed. Through the binary, on a 4 MiB tmpfs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nearly_full_disk_refuses_mail_at_mail_and_takes_it_again_once_freed() {
    let dir = tempfile::tempdir().unwrap();
    let Some(_guard) = tmpfs_state(dir.path(), "4m") else {
        return;
    };
    let hook = fake_webhook().await;
    // queue_age sets how often the alerts look at the state dir (a quarter of it, at least every second).
    let config = write_config_with(
        dir.path(),
        &format!(
            "[queue]\nmin_free_space = \"1MiB\"\n[alerts]\nwebhook_url = \"{}/hook\"\nqueue_age = \"4s\"\n",
            hook.uri()
        ),
        "address = \"127.0.0.1:0\"\nauth = \"none\"",
    );
    let mut relay = Daemon::spawn(&config);
    let addr = relay.addr;
    let mut c = RawClient::ready(addr).await;
    // 3.5 MB would leave less than the margin on a 4 MiB disk: refused before a byte of it is sent.
    let reply = c.cmd("MAIL FROM:<a@example.com> SIZE=3500000", 452).await;
    assert!(reply.starts_with("452 4.3.1 "), "{reply}");
    c.cmd("RCPT TO:<b@example.com>", 503).await;
    // A small one fits.
    c.cmd("MAIL FROM:<a@example.com> SIZE=2000", 250).await;
    c.cmd("RCPT TO:<b@example.com>", 250).await;
    c.cmd("DATA", 354).await;
    c.send(b"Subject: kept\r\n\r\nsmall\r\n.\r\n").await;
    c.expect(250).await;
    let refused = relay.wait_log("command refused");
    assert!(refused.contains("452 4.3.1"), "{refused}");
    // Something else fills the disk until less than the margin is left.
    let filler = dir.path().join("state/filler");
    std::fs::write(&filler, vec![0u8; 3_400_000]).unwrap();
    for _ in 0..3 {
        let reply = c.cmd("MAIL FROM:<a@example.com>", 452).await;
        assert!(reply.starts_with("452 4.3.1 "), "{reply}");
    }
    let short = relay.wait_log("relay_event=\"disk_full\"");
    assert!(
        short.contains("nearly full") && short.contains("WARN"),
        "{short}"
    );
    // `relay status` says so, and that it needs attention; so does an alert.
    let (code, doc) = status_json(&config);
    assert_eq!(code, Some(1), "{doc}");
    assert_eq!(doc["disk"]["short"], true, "{doc}");
    let text = run_bounded(
        std::process::Command::new(relay_bin())
            .args(["status", "--config"])
            .arg(&config),
    );
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("min_free_space") && text.contains("452 4.3.1"),
        "{text}"
    );
    relay.wait_log("alert open: disk_full");
    std::fs::remove_file(&filler).unwrap();
    c.begin_message().await;
    c.send(b"Subject: after\r\n\r\nsmall\r\n.\r\n").await;
    c.expect(250).await;
    c.cmd("QUIT", 221).await;
    let back = relay.wait_log("relay_event=\"disk_full\"");
    assert!(back.contains("room again"), "{back}");
    assert_eq!(status_json(&config).1["disk"]["short"], false);
    relay.wait_log("alert recovered: disk_full");
    // Both notices posted (a queue_age alert may come and go meanwhile: the kept message waits for an account).
    for _ in 0..2 {
        relay.wait_log("channel=\"webhook\" incident=disk_full:queue");
    }
    let log = relay.terminate_with_log();
    // The short disk was said once, not at every refused MAIL.
    assert!(
        !log.iter().any(|l| l.contains("relay_event=\"disk_full\"")),
        "{log:?}"
    );
    let posted: Vec<serde_json::Value> = hook
        .received_requests()
        .await
        .unwrap_or_default()
        .iter()
        .filter_map(|r| serde_json::from_slice(&r.body).ok())
        .filter(|n: &serde_json::Value| n["event"] == "disk_full")
        .collect();
    assert_eq!(posted.len(), 2, "{posted:#?}");
    assert_eq!(posted[0]["state"], "open");
    assert_eq!(posted[1]["state"], "recovered");
    let subjects: Vec<String> = queued_in(&dir.path().join("state"))
        .iter()
        .map(|(_, eml)| String::from_utf8_lossy(eml).into_owned())
        .collect();
    assert_eq!(subjects.len(), 2, "{subjects:?}");
    assert!(subjects.iter().any(|m| m.contains("Subject: kept")));
}

/// A `queue/` the daemon's user cannot write (a chown or chmod by hand) refuses every message with 451, and
/// `relay status` says so with the user, the owner and the mode, read off the running daemon (here `nobody`);
/// once it can write again, status is quiet about it. Root only (the daemon is started as another user).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_the_daemon_cannot_write_is_said_by_status() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    use std::process::Command;
    if !is_root() {
        return;
    }
    let id = |flag: &str| -> u32 {
        let out = run_bounded(Command::new("id").args([flag, "nobody"]));
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
    };
    let (uid, gid) = (id("-u"), id("-g"));
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    std::os::unix::fs::chown(&state, Some(uid), Some(gid)).unwrap();
    let config = write_config_with(dir.path(), "", "address = \"127.0.0.1:0\"\nauth = \"none\"");
    let relay = Daemon::spawn_with(&config, |c| {
        c.uid(uid).gid(gid);
    });
    let queue = state.join("queue");
    std::fs::set_permissions(&queue, std::fs::Permissions::from_mode(0o500)).unwrap();
    let mut c = RawClient::ready(relay.addr).await;
    c.cmd("MAIL FROM:<a@example.com>", 250).await;
    c.cmd("RCPT TO:<b@example.com>", 250).await;
    c.cmd("DATA", 354).await;
    c.send(b"Subject: refused\r\n\r\nsmall\r\n.\r\n").await;
    let reply = c.expect(451).await;
    assert!(reply.starts_with("451 4.3.0 "), "{reply}");
    let (code, doc) = status_json(&config);
    assert_eq!(code, Some(1), "{doc}");
    let why = doc["queue_unwritable"].as_str().unwrap_or_default();
    assert!(
        why.contains("the daemon's user nobody cannot write to")
            && why.contains(&queue.display().to_string())
            && why.contains("mode 0500"),
        "{doc}"
    );
    let text = run_bounded(
        Command::new(relay_bin())
            .args(["status", "--config"])
            .arg(&config),
    );
    assert!(
        String::from_utf8_lossy(&text.stdout).contains("new mail is refused with 451 4.3.0"),
        "{text:?}"
    );

    std::fs::set_permissions(&queue, std::fs::Permissions::from_mode(0o750)).unwrap();
    assert_eq!(
        status_json(&config).1["queue_unwritable"],
        serde_json::Value::Null
    );
    // The state dir itself: tokens, counters and reports cannot be saved.
    std::os::unix::fs::chown(&state, Some(0), Some(0)).unwrap();
    let (code, doc) = status_json(&config);
    assert_eq!(code, Some(1), "{doc}");
    assert!(
        doc["state_dir_unwritable"]
            .as_str()
            .is_some_and(|w| w.contains("the daemon's user nobody cannot write to")),
        "{doc}"
    );
    std::os::unix::fs::chown(&state, Some(uid), Some(gid)).unwrap();
    assert_eq!(
        status_json(&config).1["state_dir_unwritable"],
        serde_json::Value::Null
    );
    assert!(relay.terminate().success());
}

/// The state dir's filesystem goes read-only under the daemon (ext4's `errors=remount-ro` after disk errors): MAIL
/// is refused with 451 4.3.0 (not 452 4.3.1 "storage": nobody should look at `df`), said once in the log,
/// by `relay status` and by an alert; once it is writable again, mail is taken and the alert recovers. A start on a
/// read-only state dir fails, naming the path and the reason (it started and took no mail, looking healthy).
/// Through the binary, on a tmpfs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_state_dir_refuses_mail_with_a_local_error_and_is_said() {
    let dir = tempfile::tempdir().unwrap();
    let Some(_guard) = tmpfs_state(dir.path(), "4m") else {
        return;
    };
    let state = dir.path().join("state");
    // Opened read-only by the daemon when it exists: a file open for writing would keep the remount from happening.
    std::fs::write(state.join(".lock"), b"").unwrap();
    let remount = |how: &str| {
        let out = run_bounded(
            std::process::Command::new("mount")
                .args(["-o", &format!("remount,{how}")])
                .arg(&state),
        );
        assert!(out.status.success(), "{out:?}");
    };
    let hook = fake_webhook().await;
    let config = write_config_with(
        dir.path(),
        &format!(
            "[alerts]\nwebhook_url = \"{}/hook\"\nqueue_age = \"4s\"\n",
            hook.uri()
        ),
        "address = \"127.0.0.1:0\"\nauth = \"none\"",
    );
    let mut relay = Daemon::spawn(&config);
    let mut c = RawClient::ready(relay.addr).await;
    remount("ro");
    let reply = c.cmd("MAIL FROM:<a@example.com>", 451).await;
    assert!(reply.starts_with("451 4.3.0 "), "{reply}");
    let line = relay.wait_log("relay_event=\"disk_read_only\"");
    assert!(
        line.contains("read-only") && line.contains("ERROR"),
        "{line}"
    );
    let (code, doc) = status_json(&config);
    assert_eq!(code, Some(1), "{doc}");
    assert_eq!(doc["disk"]["read_only"], true, "{doc}");
    relay.wait_log("alert open: disk_read_only");

    remount("rw");
    c.cmd("MAIL FROM:<a@example.com>", 250).await;
    c.cmd("RCPT TO:<b@example.com>", 250).await;
    c.cmd("DATA", 354).await;
    c.send(b"Subject: after\r\n\r\nsmall\r\n.\r\n").await;
    c.expect(250).await;
    c.cmd("QUIT", 221).await;
    let back = relay.wait_log("relay_event=\"disk_read_only\"");
    assert!(back.contains("writable again"), "{back}");
    relay.wait_log("alert recovered: disk_read_only");
    assert_eq!(status_json(&config).1["disk"]["read_only"], false);
    assert!(relay.terminate().success());

    remount("ro");
    let out = run_bounded(
        std::process::Command::new(relay_bin())
            .args(["serve", "--config"])
            .arg(&config),
    );
    remount("rw");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("queue/.write-check") && err.contains("Read-only file system"),
        "{err}"
    );
}

/// relay restarted on a state dir whose filesystem is full starts (its start-up write check does not take a full
/// disk for one it cannot write) and delivers what is queued, freeing the space. Through the binary, on a tmpfs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_on_a_full_disk_delivers_what_is_queued() {
    let dir = tempfile::tempdir().unwrap();
    let Some(_guard) = tmpfs_state(dir.path(), "2m") else {
        return;
    };
    let idp = idp_issuing("tok").await;
    let mut upstream = FakeUpstream::start(&["tok"]).await;
    *upstream.data_reply.lock().unwrap() = "451 4.3.0 try later".into();
    let config = common::idp::account_config(
        dir.path(),
        &idp.uri(),
        &upstream,
        "[queue]\nretry = [\"1s\"]\n",
    );
    let mut daemon = Daemon::spawn(&config);
    send_message(daemon.addr, b"Subject: kept\r\n\r\nbody\r\n").await;
    daemon.wait_log("relay_event=\"deferred\"");
    assert!(daemon.terminate().success());
    // Filled to the last byte by something else.
    let filler = dir.path().join("state/filler");
    let mut f = std::fs::File::create(&filler).unwrap();
    let chunk = vec![0u8; 64 * 1024];
    while std::io::Write::write_all(&mut f, &chunk).is_ok() {}
    drop(f);
    *upstream.data_reply.lock().unwrap() = "250 2.0.0 OK".into();
    let mut daemon = Daemon::spawn(&config);
    let got = upstream.next().await;
    assert!(String::from_utf8_lossy(&got.data).contains("Subject: kept"));
    daemon.wait_log("relay_event=\"delivered\"");
    assert!(daemon.terminate().success());
}

/// The disk fills after a message was queued, so its deferrals cannot be written: its retries still back off
/// along the schedule (the attempts are kept in memory), instead of each reading "never tried" from its file
/// and waiting the first step again, for ever. Through the binary, on a full tmpfs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deferrals_that_cannot_be_written_still_back_off() {
    let dir = tempfile::tempdir().unwrap();
    let Some(_guard) = tmpfs_state(dir.path(), "2m") else {
        return;
    };
    let idp = idp_issuing("tok").await;
    let upstream = FakeUpstream::start(&["tok"]).await;
    *upstream.data_reply.lock().unwrap() = "451 4.3.0 try later".into();
    let top = account_top(
        dir.path(),
        &idp.uri(),
        &upstream,
        "[queue]\nretry = [\"1s\", \"1s\", \"1s\", \"1s\", \"1h\"]\nmin_free_space = \"0\"\n",
    );
    let config = write_config_with(
        dir.path(),
        &top,
        "address = \"127.0.0.1:0\"\nauth = \"none\"",
    );
    let mut relay = Daemon::spawn(&config);
    let id = send_message(relay.addr, b"Subject: waits\r\n\r\nbody\r\n").await;
    relay.wait_log("relay_event=\"deferred\"");
    // Something else takes every byte left.
    let filled = std::fs::write(dir.path().join("state/filler"), vec![0u8; 4 << 20]);
    assert!(filled.is_err(), "the tmpfs is full");
    relay.wait_log("cannot record the deferral");
    // Within the five steps, a deferral an hour ahead.
    let mut waits = Vec::new();
    loop {
        let line = relay.wait_log("relay_event=\"deferred\"");
        assert!(line.contains(&id), "{line}");
        let next = line
            .split("next_attempt=")
            .nth(1)
            .and_then(|t| t.split_whitespace().next())
            .and_then(|t| humantime::parse_rfc3339(t).ok())
            .unwrap_or_else(|| panic!("no next_attempt in {line}"));
        let wait = next
            .duration_since(std::time::SystemTime::now())
            .unwrap_or_default();
        waits.push(wait.as_secs());
        if wait > std::time::Duration::from_secs(1800) {
            break;
        }
        assert!(waits.len() < 6, "the retries do not back off: {waits:?}");
    }
    assert!(
        files_in(&dir.path().join("state"), "queue").contains(&format!("{id}.msg")),
        "still queued"
    );
    // Said once, not at every deferral (a line per message per retry on a full disk).
    let rest = relay.terminate_with_log();
    assert!(
        !rest
            .iter()
            .any(|l| l.contains("cannot record the deferral")),
        "{rest:#?}"
    );
}

/// Makes a FIFO at `path`.
fn mkfifo(path: &std::path::Path) {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path and a mode.
    assert_eq!(
        unsafe { libc::mkfifo(c.as_ptr(), 0o600) },
        0,
        "mkfifo {path:?}"
    );
}

/// A FIFO where relay expects one of its files (put there by hand or by another program): before, one named as
/// a message hung the start (and `relay status`) on its open, and one named as a state file hung delivery. Now
/// the first is quarantined and the second read as no state; the start, status and delivery go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifos_in_the_queue_neither_hang_the_start_nor_stop_delivery() {
    let idp = idp_issuing("tok").await;
    let mut upstream = FakeUpstream::start(&["tok"]).await;
    *upstream.data_reply.lock().unwrap() = "451 4.3.0 try later".into();
    let dir = tempfile::tempdir().unwrap();
    let top = account_top(
        dir.path(),
        &idp.uri(),
        &upstream,
        "[queue]\nretry = [\"1h\"]\n",
    );
    let config = write_config_with(
        dir.path(),
        &top,
        "address = \"127.0.0.1:0\"\nauth = \"none\"",
    );
    let mut relay = Daemon::spawn(&config);
    let id = send_message(relay.addr, b"Subject: behind a fifo\r\n\r\nbody\r\n").await;
    relay.wait_log("relay_event=\"deferred\"");
    assert_eq!(relay.terminate().code(), Some(0));
    let queue = dir.path().join("state/queue");
    let state_file = queue.join(format!("{id}.state"));
    std::fs::remove_file(&state_file).unwrap();
    mkfifo(&state_file);
    let other = format!(
        "{}{}",
        &id[..id.len() - 1],
        if id.ends_with('0') { '1' } else { '0' }
    );
    mkfifo(&queue.join(format!("{other}.msg")));
    let status = run_bounded(
        std::process::Command::new(relay_bin())
            .args(["status", "--config"])
            .arg(&config),
    );
    assert!(
        String::from_utf8_lossy(&status.stdout).contains("queue:"),
        "{status:?}"
    );
    *upstream.data_reply.lock().unwrap() = "250 2.0.0 OK".into();
    let mut relay = Daemon::spawn(&config);
    let got = upstream.next().await;
    assert!(String::from_utf8_lossy(&got.data).contains("Subject: behind a fifo"));
    relay.wait_log("relay_event=\"delivered\"");
    assert!(
        files_in(&dir.path().join("state"), "quarantine").contains(&format!("{other}.msg")),
        "the FIFO named as a message is quarantined"
    );
    assert_eq!(relay.terminate().code(), Some(0));
}

/// A command line run with umask 000, the most permissive an operator's shell can have.
fn with_open_umask(mut cmd: std::process::Command) -> std::process::Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: umask is async-signal-safe, and touches nothing but the child's own mask.
    unsafe {
        cmd.pre_exec(|| {
            libc::umask(0);
            Ok(())
        });
    }
    cmd
}

/// Every path under `dir`, directories included, with its permission bits.
fn modes_under(dir: &std::path::Path) -> Vec<(std::path::PathBuf, u32)> {
    use std::os::unix::fs::MetadataExt;
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            if meta.is_dir() {
                todo.push(path.clone());
            }
            out.push((path, meta.mode() & 0o7777));
        }
    }
    out
}

/// What relay writes under its state dir is for relay and its group only, whatever the umask it runs with: the
/// daemon and the CLI run with umask 000 write delivery states (queue/ and dead/, with the upstream's last
/// reply), the account reports, the sending counts, the tokens, the open alerts and the retry trigger, and none
/// of them, nor any directory, is group-writable or open to others; nor are what an older relay left open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_files_are_private_whatever_the_umask() {
    use wiremock::matchers::{method, path};
    let idp = idp_issuing("tok").await;
    wiremock::Mock::given(method("POST"))
        .and(path("/hook"))
        .respond_with(wiremock::ResponseTemplate::new(200))
        .mount(&idp)
        .await;
    let upstream = FakeUpstream::start(&["tok"]).await;
    let dir = tempfile::tempdir().unwrap();
    // Sending limits make the counts durable (rate/office.json before each message); alerts keep alerts.json.
    let top = format!(
        "{}[alerts]\nwebhook_url = \"{}/hook\"\n",
        account_top(
            dir.path(),
            &idp.uri(),
            &upstream,
            "rate = { per_minute = 30, recipients_per_day = 10000 }"
        ),
        idp.uri()
    );
    let config = write_config_with(
        dir.path(),
        &top,
        "address = \"127.0.0.1:0\"\nauth = \"none\"",
    );
    let state = dir.path().join("state");
    let cli = |args: &[&str]| {
        let mut cmd = std::process::Command::new(relay_bin());
        cmd.args(args).arg("--config").arg(&config);
        with_open_umask(cmd).output().unwrap()
    };

    // As an older relay left them under umask 000: open directories, and a report readable and writable by all.
    {
        use std::os::unix::fs::PermissionsExt;
        let open = |p: &std::path::Path, mode| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap()
        };
        for sub in ["accounts", "rate"] {
            std::fs::create_dir_all(state.join(sub)).unwrap();
            open(&state.join(sub), 0o777);
        }
        std::fs::write(state.join("accounts/office.json"), b"{}").unwrap();
        open(&state.join("accounts/office.json"), 0o666);
        // A token file restored from a backup, readable and writable by all (its account no longer configured,
        // so that only the start's look, not a renewal's rewrite, can close it).
        common::idp::write_tokens_due(&state, "old", "r-old");
        open(&state.join("tokens/old.json"), 0o666);
    }
    let mut serve = std::process::Command::new(relay_bin());
    serve.args(["serve", "--config"]).arg(&config);
    let mut daemon = Daemon::start(with_open_umask(serve));
    // Deferred: queue/ID.state with the 451.
    *upstream.data_reply.lock().unwrap() = "451 4.3.0 try later".into();
    let first = send_message(daemon.addr, b"Subject: first\r\n\r\nbody\r\n").await;
    daemon.wait_log("relay_event=\"deferred\"");
    // Retried from the CLI (the state rewritten, the trigger touched), then refused for good: dead/ID.state.
    *upstream.data_reply.lock().unwrap() = "554 5.7.1 refused".into();
    let out = cli(&["queue", "retry", &first]);
    assert!(out.status.success(), "{out:?}");
    daemon.wait_log("relay_event=\"dead\"");
    // Another deferred one stays in queue/ with its state.
    *upstream.data_reply.lock().unwrap() = "451 4.3.0 try later".into();
    let second = send_message(daemon.addr, b"Subject: second\r\n\r\nbody\r\n").await;
    daemon.wait_log("relay_event=\"deferred\"");
    // `relay test` records its result next to the daemon's report.
    let out = cli(&["test", "office", "--to", "ops@example.com"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(daemon.terminate().success());

    let modes = modes_under(&state);
    for expected in [
        format!("queue/{second}.msg"),
        format!("queue/{second}.state"),
        format!("dead/{first}.msg"),
        format!("dead/{first}.state"),
        "accounts/office.json".into(),
        "accounts/office.test.json".into(),
        "rate/office.json".into(),
        "tokens/office.json".into(),
        "tokens/old.json".into(),
        "alerts.json".into(),
        ".retry".into(),
    ] {
        assert!(
            modes.iter().any(|(p, _)| p == &state.join(&expected)),
            "{expected} not written: {modes:?}"
        );
    }
    let open: Vec<_> = modes
        .iter()
        .filter(|(_, mode)| mode & 0o027 != 0)
        .map(|(p, mode)| format!("{} {mode:04o}", p.display()))
        .collect();
    assert!(
        open.is_empty(),
        "open to the group's writes or to others: {open:#?}"
    );
}
