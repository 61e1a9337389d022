//! Real OS processes: three members started with the default configuration find each other, and
//! one killed with SIGKILL is declared down by the others.

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_processes_find_each_other_by_default_and_detect_a_sigkill() {
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

    // The survivors leave gracefully and exit cleanly.
    for m in &mut members[..2] {
        let mut stdin = m.child.stdin.take().expect("stdin");
        stdin.write_all(b"leave\n").await.expect("write");
    }
    pump(&mut members, &mut rx, "survivors to leave", |m| {
        m[..2].iter().all(|m| m.said_bye)
    })
    .await;
    for m in &mut members[..2] {
        let status = tokio::time::timeout(Duration::from_secs(10), m.child.wait())
            .await
            .expect("exits")
            .expect("status");
        assert!(status.success(), "member exited with {status}");
    }
}
