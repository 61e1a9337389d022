//! The `peergrid` command and [`peergrid::Client`] against real clusters: members in this
//! process, and `peergrid node` processes.

mod common;

use std::time::Duration;

use common::{Cluster, DEADLINE, wait_for};
use peergrid::{Client, ClientConfig, Error, Secret};
use tokio::io::BufReader;

/// Runs `peergrid ARGS` with `env`; returns the exit code, stdout and stderr. The variables of
/// this process that the command reads are cleared first.
async fn peergrid(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut command = common::peergrid_command();
    command.args(args);
    command.envs(env.iter().copied());
    let output = tokio::time::timeout(DEADLINE, command.output())
        .await
        .expect("peergrid finishes")
        .expect("peergrid runs");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peergrid_status_shows_the_members_partitions_safety_and_maps_of_a_3_member_cluster() {
    let cluster = Cluster::start_with(3, |c| c.partition_count = 64).await;
    cluster.wait_table_settled().await;
    let sessions = cluster.grid(1).map::<String, String>("sessions");
    for i in 0..100 {
        sessions
            .put(&format!("s{i}"), &"x".repeat(20))
            .await
            .unwrap();
    }
    for i in 0..150 {
        sessions.get(&format!("s{i}")).await.unwrap();
    }
    let seed = cluster.grid(2).local_member().rpc_addr.to_string();
    let (code, out, err) = peergrid(
        &["status", "--seed", &seed, "--cluster-name", &cluster.name],
        &[],
    )
    .await;
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains("cluster: 3 members, 64 partitions"), "{out}");
    assert!(out.contains("safe: yes"), "{out}");
    assert!(out.contains("partitions led: 64 of 64"), "{out}");
    for grid in cluster.live() {
        let me = grid.local_member();
        let line = out
            .lines()
            .find(|l| l.contains(&me.id.to_string()))
            .unwrap_or_else(|| panic!("member {} listed:\n{out}", me.id));
        assert!(line.contains(&me.rpc_addr.to_string()), "{line}");
        // The answering member is marked.
        assert_eq!(
            line.starts_with('*'),
            me.rpc_addr.to_string() == seed,
            "{line}"
        );
    }
    let map_line = out
        .lines()
        .find(|l| l.trim_start().starts_with("sessions"))
        .unwrap_or_else(|| panic!("sessions listed:\n{out}"));
    let numbers: Vec<&str> = map_line.split_whitespace().collect();
    // name, entries, backups, bytes, gets, hits, misses, hit ratio, near hits
    assert_eq!(numbers[1], "100", "{map_line}");
    assert_eq!(numbers[2], "100", "one backup of each: {map_line}");
    assert_eq!(numbers[4], "150", "{map_line}");
    assert_eq!(numbers[5], "100", "{map_line}");
    assert_eq!(numbers[6], "50", "{map_line}");
    assert_eq!(numbers[7], "0.67", "{map_line}");

    // The same figures through the library client.
    let client = Client::connect(ClientConfig {
        cluster_name: cluster.name.clone(),
        ..ClientConfig::new([cluster.grid(0).local_member().rpc_addr])
    })
    .await
    .unwrap();
    let status = client.status().await.unwrap();
    assert_eq!(status.members.len(), 3);
    assert_eq!(status.safe, Ok(true));
    assert_eq!(status.partitions_led(), 64);
    let totals = status.map_totals();
    let (_, stats) = totals.iter().find(|(n, _)| n == "sessions").unwrap();
    assert_eq!(
        (stats.owned_entries, stats.hits, stats.misses),
        (100, 100, 50)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peergrid_map_commands_read_and_write_what_members_see() {
    let cluster = Cluster::start_with(3, |c| c.max_value_size = 4096).await;
    cluster.wait_table_settled().await;
    let seed = cluster.grid(0).local_member().rpc_addr.to_string();
    let name = cluster.name.clone();
    let run = |args: Vec<String>| {
        let mut full = args;
        full.extend(["--seed".to_string(), seed.clone()]);
        full.extend(["--cluster-name".to_string(), name.clone()]);
        async move {
            let args: Vec<&str> = full.iter().map(String::as_str).collect();
            peergrid(&args, &[]).await
        }
    };
    let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();

    let users = cluster.grid(2).map::<String, String>("users");
    // Written by the command, read by every member.
    for i in 0..10 {
        let (code, out, err) = run(args(&["map", "put", "users", &format!("u{i}"), "alice"])).await;
        assert_eq!((code, out.trim()), (0, "(nil)"), "{err}");
    }
    for grid in cluster.live() {
        let users = grid.map::<String, String>("users");
        for i in 0..10 {
            assert_eq!(
                users.get(&format!("u{i}")).await.unwrap().as_deref(),
                Some("alice")
            );
        }
    }
    // Written by a member, read and replaced by the command.
    users
        .put(&"u0".to_string(), &"bob".to_string())
        .await
        .unwrap();
    let (code, out, _) = run(args(&["map", "get", "users", "u0"])).await;
    assert_eq!((code, out.trim()), (0, "bob"));
    let (code, out, _) = run(args(&["map", "put", "users", "u0", "carol"])).await;
    assert_eq!((code, out.trim()), (0, "bob"));
    assert_eq!(users.get("u0").await.unwrap().as_deref(), Some("carol"));
    let (code, out, _) = run(args(&["map", "size", "users"])).await;
    assert_eq!((code, out.trim()), (0, "10"));
    let (code, out, _) = run(args(&["map", "remove", "users", "u0"])).await;
    assert_eq!((code, out.trim()), (0, "carol"));
    assert_eq!(users.get("u0").await.unwrap(), None);
    let (code, out, _) = run(args(&["map", "get", "users", "u0"])).await;
    assert_eq!((code, out.trim()), (0, "(nil)"));
    let (code, out, _) = run(args(&["map", "size", "users"])).await;
    assert_eq!((code, out.trim()), (0, "9"));
    // A value that is not UTF-8 prints as hex.
    cluster
        .grid(1)
        .map::<String, bytes::Bytes>("raw")
        .put("k", &bytes::Bytes::from_static(&[0xff, 0x00, 0x10]))
        .await
        .unwrap();
    let (code, out, _) = run(args(&["map", "get", "raw", "k"])).await;
    assert_eq!((code, out.trim()), (0, "0xff0010"));
    // So does text with control characters, which could drive the terminal.
    users
        .put("esc", &"\u{1b}[31mred".to_string())
        .await
        .unwrap();
    let (code, out, _) = run(args(&["map", "get", "users", "esc"])).await;
    assert_eq!((code, out.trim()), (0, "0x1b5b33316d726564"));
    users.remove("esc").await.unwrap();
    // An oversized value gets a clear error, nothing is stored, and the member keeps serving.
    let big = "v".repeat(5000);
    let (code, _, err) = run(args(&["map", "put", "users", "big", &big])).await;
    assert_eq!(code, 2);
    assert!(
        err.contains("value of 5000 bytes exceeds the maximum of 4096"),
        "{err}"
    );
    let (code, out, _) = run(args(&["map", "size", "users"])).await;
    assert_eq!((code, out.trim()), (0, "9"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_commands_fail_clearly_when_no_cluster_answers_or_the_secret_is_wrong() {
    // Nothing listens on port 1 (privileged, unused), and no test binds it.
    let closed = "127.0.0.1:1".to_string();
    let (code, out, err) = peergrid(&["status", "--seed", &closed], &[]).await;
    assert_eq!(code, 2, "{out}");
    assert!(
        err.contains(&format!("no member answered at {closed}")) && err.contains("refused"),
        "{err}"
    );
    let (code, _, err) = peergrid(&["map", "get", "m", "k", "--seed", &closed], &[]).await;
    assert_eq!(code, 2);
    assert!(err.contains("no member answered"), "{err}");

    let secret = "a-cluster-secret-of-enough-length";
    let cluster = Cluster::start_with(2, |c| {
        c.security.secret = Some(Secret::new(secret));
    })
    .await;
    let seed = cluster.grid(0).local_member().rpc_addr.to_string();
    let base = ["status", "--seed", &seed, "--cluster-name", &cluster.name];
    // No secret, a wrong one, another cluster's name: refused, with the reason.
    let (code, _, err) = peergrid(&base, &[]).await;
    assert_eq!(code, 2);
    assert!(err.contains("refused the call"), "{err}");
    let (code, _, err) = peergrid(&base, &[("PEERGRID_SECRET", "not-the-secret-at-all!!")]).await;
    assert_eq!(code, 2);
    assert!(err.contains("refused the call"), "{err}");
    let (code, _, err) = peergrid(
        &[
            "status",
            "--seed",
            &seed,
            "--cluster-name",
            "another-cluster",
        ],
        &[("PEERGRID_SECRET", secret)],
    )
    .await;
    assert_eq!(code, 2);
    assert!(
        err.contains("no member answered") || err.contains("refused"),
        "{err}"
    );
    // The right secret from the environment, as a member reads it.
    let (code, out, err) = peergrid(&base, &[("PEERGRID_SECRET", secret)]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("cluster: 2 members"), "{out}");

    // The library client reports the same as typed errors.
    let client = |secret: Option<&str>, addr: &str| ClientConfig {
        cluster_name: cluster.name.clone(),
        security: peergrid::SecurityConfig {
            secret: secret.map(Secret::new),
            ..Default::default()
        },
        ..ClientConfig::new([addr.parse().unwrap()])
    };
    assert!(matches!(
        Client::connect(client(None, &seed)).await,
        Err(Error::Unauthenticated { .. })
    ));
    assert!(matches!(
        Client::connect(client(Some(secret), &closed)).await,
        Err(Error::NoMemberAnswered { .. })
    ));
    // The members are unharmed.
    let map = cluster.grid(1).map::<String, u32>("m");
    map.put("k", &1).await.unwrap();
    assert_eq!(map.get("k").await.unwrap(), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_moves_to_another_member_when_its_member_is_gone() {
    let mut cluster = Cluster::start(3).await;
    cluster.wait_table_settled().await;
    let client = Client::connect(ClientConfig {
        cluster_name: cluster.name.clone(),
        timeout: Duration::from_secs(5),
        ..ClientConfig::new([cluster.grid(0).local_member().rpc_addr])
    })
    .await
    .unwrap();
    // Learns every member.
    assert_eq!(client.status().await.unwrap().members.len(), 3);
    assert_eq!(client.members().len(), 3);
    for i in 0..20 {
        client.map_put("m", format!("k{i}"), "v").await.unwrap();
    }
    // Its member leaves: the next calls go to another one, and nothing is lost.
    cluster.grid(0).leave().await.unwrap();
    cluster.slots[0].grid = None;
    cluster.wait_converged().await;
    cluster.wait_table_settled().await;
    for i in 0..20 {
        let value = client.map_get("m", format!("k{i}")).await.unwrap();
        assert_eq!(value.as_deref(), Some(&b"v"[..]), "k{i}");
    }
    assert_eq!(client.map_size("m").await.unwrap(), 20);
    let status = client.status().await.unwrap();
    assert_eq!(status.members.len(), 2);
}

/// A `peergrid node` process: its first stdout line names its addresses.
struct NodeProcess {
    child: tokio::process::Child,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    gossip: String,
    rpc: String,
}

impl NodeProcess {
    async fn start(args: &[&str]) -> NodeProcess {
        let args: Vec<&std::ffi::OsStr> = args.iter().map(std::ffi::OsStr::new).collect();
        let (child, lines, first) = common::start_node(&args).await;
        NodeProcess {
            gossip: common::addr_after(&first, "gossip").to_string(),
            rpc: common::addr_after(&first, "rpc").to_string(),
            child,
            lines,
        }
    }

    /// Reads stdout until a line containing `text`.
    async fn wait_line(&mut self, text: &str) {
        tokio::time::timeout(DEADLINE, async {
            while let Some(line) = self.lines.next_line().await.unwrap() {
                if line.contains(text) {
                    return;
                }
            }
            panic!("stdout ended before {text:?}");
        })
        .await
        .unwrap_or_else(|_| panic!("no line with {text:?}"));
    }
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peergrid_node_processes_form_a_cluster_from_flags_and_a_file_and_leave_on_sigterm() {
    let cluster = common::unique_cluster_name();
    let dir = std::env::temp_dir().join(format!("{cluster}-cli"));
    std::fs::create_dir_all(&dir).unwrap();
    let mut first = NodeProcess::start(&[
        "--cluster-name",
        &cluster,
        "--name",
        "first",
        "--port",
        "0",
        "--seeds",
        "",
        "--partitions",
        "32",
    ])
    .await;
    let file = dir.join("second.toml");
    std::fs::write(
        &file,
        format!(
            "cluster_name = \"{cluster}\"\nmember_name = \"second\"\npartitions = 32\n\
             gossip_bind = \"127.0.0.1:0\"\nrpc_bind = \"127.0.0.1:0\"\nseeds = [\"{}\"]\n\
             [maps.orders]\nbackup_count = 1\n",
            first.gossip
        ),
    )
    .unwrap();
    let second = NodeProcess::start(&["--config", file.to_str().unwrap()]).await;
    first.wait_line("up: second").await;

    let status_args = ["status", "--seed", &second.rpc, "--cluster-name", &cluster];
    let out = wait_for("a safe 2-member cluster", DEADLINE, || async {
        let (code, out, _) = peergrid(&status_args, &[]).await;
        (code == 0 && out.contains("cluster: 2 members") && out.contains("safe: yes"))
            .then_some(out)
    })
    .await;
    assert!(out.contains("first") && out.contains("second"), "{out}");
    assert!(out.contains("partitions led: 32 of 32"), "{out}");
    let map = |args: &[&str]| {
        let mut full: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        full.extend([
            "--seed".into(),
            first.rpc.clone(),
            "--cluster-name".into(),
            cluster.clone(),
        ]);
        async move {
            let args: Vec<&str> = full.iter().map(String::as_str).collect();
            peergrid(&args, &[]).await
        }
    };
    for i in 0..20 {
        let (code, _, err) = map(&["map", "put", "orders", &format!("o{i}"), "paid"]).await;
        assert_eq!(code, 0, "{err}");
    }

    // SIGTERM: the first node hands its partitions over and exits cleanly.
    let pid = first.child.id().expect("running").to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    first.wait_line("left").await;
    let exit = tokio::time::timeout(DEADLINE, first.child.wait())
        .await
        .expect("the node exits")
        .unwrap();
    assert!(exit.success(), "{exit:?}");

    let out = wait_for("the survivor alone and safe", DEADLINE, || async {
        let (code, out, _) = peergrid(&status_args, &[]).await;
        (code == 0 && out.contains("cluster: 1 members") && out.contains("safe: yes"))
            .then_some(out)
    })
    .await;
    assert!(out.contains("partitions led: 32 of 32"), "{out}");
    let line = out
        .lines()
        .find(|l| l.trim_start().starts_with("orders"))
        .unwrap_or_else(|| panic!("orders listed:\n{out}"));
    assert_eq!(
        line.split_whitespace().nth(1),
        Some("20"),
        "nothing lost: {line}"
    );
    drop(second);
    std::fs::remove_dir_all(&dir).unwrap();
}
