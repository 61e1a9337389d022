//! Membership on a real cluster: members in one process, real UDP and TCP sockets on 127.0.0.1.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{Cluster, DEADLINE, wait_for};
use peergrid::{ConfigError, Error, Grid, GridConfig, MembershipEvent};
use tokio::net::UdpSocket;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_members_converge() {
    let cluster = Cluster::start(3).await;
    for grid in cluster.live() {
        let members = grid.members();
        assert_eq!(members.len(), 3);
        assert_eq!(members.iter().filter(|m| m.is_local).count(), 1);
        assert_eq!(members[0].id, grid.local_member().id);
        // Every member learned every other member's rpc address through gossip.
        for m in &members {
            let slot = cluster.slots.iter().find(|s| s.gossip == m.gossip_addr);
            assert_eq!(slot.map(|s| s.rpc), Some(m.rpc_addr));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_members_converge_and_answer_rpc_from_every_member() {
    let cluster = Cluster::start(5).await;
    for grid in cluster.live() {
        for member in grid.members() {
            let info = grid.member_info(member.id).await.expect("member info");
            assert_eq!(info.id, member.id);
            assert_eq!(info.rpc_addr, member.rpc_addr);
            assert_eq!(info.gossip_addr, member.gossip_addr);
            assert_eq!(info.generation, member.generation);
            assert_eq!(info.name, member.name);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_member_is_seen_down_by_every_other() {
    let mut cluster = Cluster::start(3).await;
    let mut events: Vec<_> = cluster.live().map(|g| g.membership_events()).collect();
    let crashed = cluster.crash(2);
    for (i, stream) in events.iter_mut().take(2).enumerate() {
        let event = tokio::time::timeout(DEADLINE, async {
            loop {
                match stream.recv().await {
                    Some(MembershipEvent::Down(m)) if m.id == crashed => return m,
                    Some(MembershipEvent::Left(m)) if m.id == crashed => {
                        panic!("member {i} saw a crash as a leave")
                    }
                    Some(_) => continue,
                    None => panic!("event stream closed"),
                }
            }
        })
        .await
        .expect("down event within the deadline");
        assert_eq!(event.id, crashed);
    }
    cluster.wait_converged().await;
    // The survivors' rpc clients no longer reach the crashed member.
    let err = cluster.grid(0).member_info(crashed).await.unwrap_err();
    assert!(
        matches!(err, Error::UnknownMember(id) if id == crashed),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_leave_is_seen_as_left_before_failure_detection_could_fire() {
    let cluster = Cluster::start(3).await;
    let mut events = cluster.grid(0).membership_events();
    let leaver = cluster.grid(2).clone();
    let leaver_id = leaver.local_member().id;
    let gossip = leaver.local_member().gossip_addr;
    let started = tokio::time::Instant::now();
    leaver.leave().await.expect("leave");
    let event = tokio::time::timeout(DEADLINE, events.recv())
        .await
        .expect("event")
        .expect("stream open");
    // Failure detection would report Down after probe period + suspicion (2 s); a Left event
    // proves the leave notice travelled.
    assert_eq!(event, MembershipEvent::Left(event.member().clone()));
    assert_eq!(event.member().id, leaver_id);
    eprintln!("leave seen after {:?}", started.elapsed());
    // leave() returned after every task stopped: the gossip port is free again.
    UdpSocket::bind(gossip)
        .await
        .expect("gossip socket was closed");
    assert!(matches!(
        leaver.member_info(leaver_id).await,
        Err(Error::Shutdown)
    ));
    leaver.leave().await.expect("a second leave is a no-op");
    // The leaver's own event streams end once it has stopped.
    assert_eq!(leaver.membership_events().recv().await, None);
    wait_for("the survivors to drop the leaver", DEADLINE, || {
        let ok = cluster.grid(1).members().len() == 2 && cluster.grid(0).members().len() == 2;
        async move { ok.then_some(()) }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_member_with_the_same_address_rejoins() {
    let mut cluster = Cluster::start(3).await;
    let old = cluster.crash(1);
    cluster.restart(1).await;
    let new = cluster.grid(1).local_member();
    assert_ne!(new.id, old, "a restarted process is a new member");
    assert_eq!(new.gossip_addr, cluster.slots[1].gossip);
    cluster.wait_converged().await;
    for grid in cluster.live() {
        assert!(grid.members().iter().all(|m| m.id != old));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_isolated_member_is_declared_down_and_rejoins_with_a_new_generation_after_heal() {
    let cluster = Cluster::start(3).await;
    let isolated = cluster.grid(2).local_member();
    let others = [cluster.slots[0].gossip, cluster.slots[1].gossip];
    cluster.switch.split(&[isolated.gossip_addr], &others);
    wait_for(
        "the majority to declare the isolated member down",
        DEADLINE,
        || {
            let gone = (0..2).all(|i| cluster.grid(i).members().len() == 2);
            // And the isolated member to declare the majority down: its verdicts are stale once
            // the link heals.
            let alone = cluster.grid(2).members().len() == 1;
            async move { (gone && alone).then_some(()) }
        },
    )
    .await;
    let majority: Vec<_> = (0..2).map(|i| cluster.grid(i).local_member()).collect();
    let mut events = cluster.grid(0).membership_events();
    // Calls across the cut fail fast with a typed error.
    let err = cluster.grid(0).member_info(isolated.id).await.unwrap_err();
    assert!(
        matches!(err, Error::UnknownMember(_) | Error::Unreachable { .. }),
        "{err}"
    );
    cluster.switch.heal_all();
    cluster.wait_converged().await;
    let back = cluster
        .grid(0)
        .members()
        .into_iter()
        .find(|m| m.id == isolated.id)
        .expect("isolated member is back");
    assert!(
        back.generation > isolated.generation,
        "it rejoined with a renewed identity"
    );
    assert_eq!(cluster.grid(2).local_member().generation, back.generation);
    // The majority kept its identities: the isolated member's stale view declared nobody down.
    for (i, before) in majority.iter().enumerate() {
        assert_eq!(
            cluster.grid(i).local_member().generation,
            before.generation,
            "a healthy member was declared down by the stale view"
        );
    }
    while let Ok(Some(event)) =
        tokio::time::timeout(std::time::Duration::from_millis(10), events.recv()).await
    {
        if let peergrid::MembershipEvent::Down(member) = &event {
            assert_ne!(member.id, majority[1].id, "a healthy member was seen down");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fault_switch_makes_rpc_calls_fail_as_unreachable() {
    let cluster = Cluster::start(2).await;
    let target = cluster.grid(1).local_member();
    cluster
        .switch
        .cut(cluster.slots[0].gossip, target.gossip_addr);
    let err = cluster.grid(0).member_info(target.id).await.unwrap_err();
    assert!(
        matches!(err, Error::Unreachable { member, .. } if member == target.id),
        "{err}"
    );
    cluster.switch.heal_all();
    cluster
        .grid(0)
        .member_info(target.id)
        .await
        .expect("healed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_and_garbage_datagrams_are_dropped_and_counted() {
    let cluster = Cluster::start(2).await;
    let target = cluster.slots[0].gossip;
    let before = cluster.grid(0).datagram_stats();

    // A real member of another cluster, seeded with our member.
    let stranger = Grid::join(GridConfig {
        cluster_name: common::unique_cluster_name(),
        seeds: vec![target],
        join_timeout: Duration::from_millis(300),
        ..GridConfig::ephemeral()
    })
    .await
    .expect("stranger starts alone");
    assert_eq!(stranger.members().len(), 1);

    // Garbage: random bytes, a truncated header, a bad version, and an oversized datagram.
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut seed = 0x5EED_u64;
    for len in [1usize, 7, 12, 13, 200, 1399] {
        let bytes: Vec<u8> = (0..len)
            .map(|_| {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
                (seed >> 33) as u8
            })
            .collect();
        socket.send_to(&bytes, target).await.unwrap();
    }
    socket.send_to(b"PG", target).await.unwrap();
    socket
        .send_to(b"PG\x09\x00aaaaaaaaXXXX", target)
        .await
        .unwrap();
    socket.send_to(&vec![0u8; 3000], target).await.unwrap();
    // A valid header for our cluster followed by a payload foca cannot decode.
    // (Version 2: the cluster hash, then key id 0, as an unsigned datagram of a cluster without
    // a secret has, and the sender's instance, counter and clock.)
    let mut bad_payload = b"PG\x02\x00".to_vec();
    bad_payload
        .extend_from_slice(&xxhash_rust::xxh3::xxh3_64(cluster.name.as_bytes()).to_be_bytes());
    bad_payload.extend_from_slice(&[0u8; 28]);
    bad_payload.extend_from_slice(&[0xff; 40]);
    socket.send_to(&bad_payload, target).await.unwrap();

    let stats = wait_for("the drops to be counted", DEADLINE, || {
        let stats = cluster.grid(0).datagram_stats();
        async move {
            (stats.dropped_foreign_cluster > before.dropped_foreign_cluster
                && stats.dropped_malformed >= before.dropped_malformed + 8
                && stats.dropped_oversized > before.dropped_oversized
                && stats.dropped_invalid_payload > before.dropped_invalid_payload)
                .then_some(stats)
        }
    })
    .await;
    eprintln!("{stats:?}");
    // The member is healthy: still converged, still gossiping, still answering rpc.
    assert_eq!(cluster.grid(0).members().len(), 2);
    assert_eq!(stranger.members().len(), 1);
    let peer = cluster.grid(1).local_member().id;
    cluster
        .grid(0)
        .member_info(peer)
        .await
        .expect("rpc still works");
    let received = cluster.grid(0).datagram_stats().received;
    wait_for("gossip to keep flowing", DEADLINE, || {
        let now = cluster.grid(0).datagram_stats().received;
        async move { (now > received).then_some(()) }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_with_no_answering_seed_starts_alone_and_merges_when_the_seed_appears() {
    // Reserve a port, then free it: nobody listens there when the member joins.
    let free: SocketAddr = {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        s.local_addr().unwrap()
    };
    let name = common::unique_cluster_name();
    let alone = Grid::join(GridConfig {
        cluster_name: name.clone(),
        seeds: vec![free],
        join_timeout: Duration::from_millis(300),
        ..GridConfig::ephemeral()
    })
    .await
    .expect("starts alone");
    assert_eq!(alone.members().len(), 1);
    // The seed comes up later at that address; the lonely member keeps announcing and merges.
    let seed = Grid::join(GridConfig {
        cluster_name: name,
        gossip_bind: free,
        port_count: 1,
        ..GridConfig::ephemeral()
    })
    .await
    .expect("seed starts");
    wait_for("the two to merge", DEADLINE, || {
        let ok = alone.members().len() == 2 && seed.members().len() == 2;
        async move { ok.then_some(()) }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn taken_ports_move_to_the_next_free_one_and_default_style_seeds_find_each_other() {
    // A base port chosen at random in a quiet range, so parallel runs do not collide; the members
    // use Hazelcast-style auto-increment from it, as the defaults do from 5701.
    let base = 20_000 + (rand::random::<u16>() % 20_000);
    let addr = |p: u16| -> SocketAddr { format!("127.0.0.1:{p}").parse().unwrap() };
    let name = common::unique_cluster_name();
    let config = GridConfig {
        cluster_name: name,
        gossip_bind: addr(base),
        rpc_bind: addr(base),
        port_count: 20,
        seeds: (0..5).map(|i| addr(base + i)).collect(),
        join_timeout: Duration::from_millis(500),
        ..GridConfig::default()
    };
    let a = Grid::join(config.clone()).await.expect("first member");
    let b = Grid::join(config.clone()).await.expect("second member");
    let (pa, pb) = (
        a.local_member().gossip_addr.port(),
        b.local_member().gossip_addr.port(),
    );
    assert!(pb > pa, "second member moved up from the taken port");
    assert_eq!(
        b.local_member().rpc_addr.port(),
        pb,
        "both sockets share the number"
    );
    wait_for("the two to see each other", DEADLINE, || {
        let ok = a.members().len() == 2 && b.members().len() == 2;
        async move { ok.then_some(()) }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_configuration_is_a_typed_error_and_starts_nothing() {
    let err = Grid::join(GridConfig {
        backup_count: 9,
        ..GridConfig::ephemeral()
    })
    .await
    .unwrap_err();
    assert!(matches!(
        err,
        Error::Config(ConfigError::BackupCount { got: 9, max: 6 })
    ));
    let err = Grid::join(GridConfig {
        partition_count: 0,
        ..GridConfig::ephemeral()
    })
    .await
    .unwrap_err();
    assert!(matches!(
        err,
        Error::Config(ConfigError::PartitionCount { got: 0, .. })
    ));
    // A port that is taken, with no auto-increment, is a bind error.
    let taken = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let err = Grid::join(GridConfig {
        gossip_bind: taken.local_addr().unwrap(),
        port_count: 1,
        ..GridConfig::ephemeral()
    })
    .await
    .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Bind {
                what: "gossip (udp)",
                ..
            }
        ),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_five_member_cluster_has_no_false_suspicion() {
    let cluster = Cluster::start(5).await;
    let mut streams: Vec<_> = cluster.live().map(|g| g.membership_events()).collect();
    // Watch every member's events for a while; any Down is a false suspicion that went through.
    let watch = tokio::time::sleep(Duration::from_secs(10));
    tokio::pin!(watch);
    let mut downs = Vec::new();
    loop {
        let next = futures::future::select_all(streams.iter_mut().map(|s| Box::pin(s.recv())));
        tokio::select! {
            _ = &mut watch => break,
            (event, _, _) = next => match event {
                Some(MembershipEvent::Up(_)) => {}
                Some(other) => downs.push(other),
                None => panic!("stream closed"),
            },
        }
    }
    assert!(downs.is_empty(), "false suspicion: {downs:?}");
    cluster.wait_converged().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_into_two_groups_of_two_merges_after_heal() {
    let cluster = Cluster::start(4).await;
    let a = [cluster.slots[0].gossip, cluster.slots[1].gossip];
    let b = [cluster.slots[2].gossip, cluster.slots[3].gossip];
    cluster.switch.split(&a, &b);
    wait_for("each side to see only itself", DEADLINE, || {
        let split = (0..4).all(|i| cluster.grid(i).members().len() == 2);
        async move { split.then_some(()) }
    })
    .await;
    // Each side declared the other down; neither has the better view. Both keep telling the
    // other it is down, and past the grace period they obey, renew and merge.
    cluster.switch.heal_all();
    cluster.wait_converged().await;
}
