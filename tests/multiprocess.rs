//! Real OS processes: three members started with the default configuration find each other, and
//! one killed with SIGKILL is declared down by the others; with data in the cluster, a SIGKILL
//! loses no acknowledged write.
//!
//! The tests share the default ports (5701 and up) and seeds, so they run one at a time.

mod common;

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

struct Member {
    child: Child,
    id: Option<String>,
    members: usize,
    saw_down: Vec<String>,
    said_bye: bool,
}

fn spawn(cluster: &str, index: usize, tx: &mpsc::UnboundedSender<(usize, String)>) -> Member {
    let mut child = Command::new(common::example_bin("cluster"))
        .arg("member")
        // Only the cluster name is set, so concurrent runs stay apart; discovery uses the defaults
        // (ports from 5701, seeds 127.0.0.1:5701-5705).
        .env("PEERGRID_CLUSTER_NAME", cluster)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("member process starts");
    let stdout = child.stdout.take().expect("stdout");
    let tx = tx.clone();
    tokio::spawn(async move {
        let mut lines = BufReader::new(stdout).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let _ = tx.send((index, line));
        }
    });
    Member {
        child,
        id: None,
        members: 0,
        saw_down: Vec::new(),
        said_bye: false,
    }
}

async fn pump(
    members: &mut [Member],
    rx: &mut mpsc::UnboundedReceiver<(usize, String)>,
    what: &str,
    done: impl Fn(&[Member]) -> bool,
) {
    let deadline = tokio::time::Instant::now() + common::DEADLINE;
    while !done(members) {
        let (i, line) = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
            .expect("output channel open");
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["joined", id, ..] => members[i].id = Some(id.to_string()),
            ["members", n] => members[i].members = n.parse().expect("count"),
            ["down", id, ..] => members[i].saw_down.push(id.to_string()),
            ["bye"] => members[i].said_bye = true,
            _ => {}
        }
    }
}

/// Serializes the tests of this file: members of two clusters at once could take every default
/// seed port and leave a third member unable to find its own cluster.
static DEFAULT_PORTS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_processes_find_each_other_by_default_and_detect_a_sigkill() {
    let _ports = DEFAULT_PORTS.lock().await;
    let cluster = common::unique_cluster_name();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut members: Vec<Member> = (0..3).map(|i| spawn(&cluster, i, &tx)).collect();
    pump(&mut members, &mut rx, "3 processes to converge", |m| {
        m.iter().all(|m| m.members == 3)
    })
    .await;

    let victim = members[2].id.clone().expect("victim id");
    members[2].child.start_kill().expect("SIGKILL");
    members[2].child.wait().await.expect("reaped");
    pump(
        &mut members,
        &mut rx,
        "survivors to declare the victim down",
        |m| {
            m[..2]
                .iter()
                .all(|m| m.members == 2 && m.saw_down.contains(&victim))
        },
    )
    .await;

    leave_and_exit(&mut members, &mut rx, &[0, 1]).await;
}

/// The members at `which` leave gracefully (told on stdin) and exit cleanly.
async fn leave_and_exit(
    members: &mut [Member],
    rx: &mut mpsc::UnboundedReceiver<(usize, String)>,
    which: &[usize],
) {
    for &i in which {
        let mut stdin = members[i].child.stdin.take().expect("stdin");
        stdin.write_all(b"leave\n").await.expect("write");
    }
    pump(members, rx, "survivors to leave", |m| {
        which.iter().all(|&i| m[i].said_bye)
    })
    .await;
    for &i in which {
        let status = tokio::time::timeout(Duration::from_secs(10), members[i].child.wait())
            .await
            .expect("exits")
            .expect("status");
        assert!(status.success(), "member exited with {status}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_member_process_loses_no_acknowledged_write() {
    let _ports = DEFAULT_PORTS.lock().await;
    let cluster = common::unique_cluster_name();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut members: Vec<Member> = (0..3).map(|i| spawn(&cluster, i, &tx)).collect();
    pump(&mut members, &mut rx, "3 processes to converge", |m| {
        m.iter().all(|m| m.members == 3)
    })
    .await;
    // This test process joins as a fourth member, found the same way (default ports and seeds).
    let grid = peergrid::Grid::join(peergrid::GridConfig {
        cluster_name: cluster.clone(),
        ..peergrid::GridConfig::default()
    })
    .await
    .expect("joins");
    common::wait_for("4 members", common::DEADLINE, || {
        let n = grid.members().len();
        async move { (n == 4).then_some(()) }
    })
    .await;
    grid.wait_safe(common::DEADLINE).await.expect("safe");
    let map: peergrid::Map<String, u64> = grid.map("sigkill");
    let expected: std::collections::HashMap<String, u64> =
        (0..5000u64).map(|i| (format!("k{i}"), i)).collect();
    map.put_all(expected.clone()).await.expect("acknowledged");
    // Every process holds primaries and backups.
    let table = grid.partition_table();
    let victim_id = members[1].id.clone().expect("victim id");
    let led = table
        .replicas
        .iter()
        .filter(|r| r[0].to_string() == victim_id)
        .count();
    assert!(led > 30, "the victim leads {led} partitions");

    members[1].child.start_kill().expect("SIGKILL");
    members[1].child.wait().await.expect("reaped");
    common::wait_for("the victim to be declared down", common::DEADLINE, || {
        let gone = !grid.members().iter().any(|m| m.id.to_string() == victim_id);
        async move { gone.then_some(()) }
    })
    .await;
    grid.wait_safe(common::DEADLINE).await.expect("safe again");
    let keys: Vec<String> = expected.keys().cloned().collect();
    let got = map.get_all(&keys).await.expect("read back");
    let lost = expected
        .iter()
        .filter(|(k, v)| got.get(*k) != Some(v))
        .count();
    assert_eq!(lost, 0, "{lost} acknowledged writes lost to the SIGKILL");

    grid.leave().await.expect("leaves");
    leave_and_exit(&mut members, &mut rx, &[0, 2]).await;
}
