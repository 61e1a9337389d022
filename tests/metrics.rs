//! `grid.metrics()`, and the HTTP listener's `/metrics` (Prometheus text) and `/health`, on a
//! real cluster.

mod common;

use std::net::SocketAddr;

use common::{Cluster, DEADLINE, wait_for};
use peergrid::{MapConfig, NearCacheConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A plain HTTP/1.1 GET: the status code and the body.
async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connects");
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_the_member_did_and_serve_as_prometheus_text() {
    let mut cluster = Cluster::start_with(0, |_| {}).await;
    for i in 0..3 {
        let mut config = cluster.config();
        if i == 0 {
            config.metrics_bind = Some("127.0.0.1:0".parse().unwrap());
            config.maps = vec![(
                "near".to_string(),
                MapConfig {
                    near_cache: Some(NearCacheConfig::default()),
                    ..MapConfig::default()
                },
            )];
        }
        cluster.add_with(config).await;
    }
    cluster.wait_converged().await;
    cluster.wait_table_settled().await;
    let grid = cluster.grid(0);
    let map = grid.map::<String, String>("m");
    for i in 0..200 {
        map.put(&format!("k{i}"), &"v".repeat(10)).await.unwrap();
    }
    for i in 0..300 {
        map.get(&format!("k{i}")).await.unwrap();
    }
    // A key another member leads, read until the near cache answers it.
    let near = grid.map::<String, u64>("near");
    let me = grid.local_member().id;
    let remote = (0..)
        .map(|i| format!("x{i}"))
        .find(|k| near.owner(k).unwrap() != Some(me))
        .unwrap();
    near.put(&remote, &1).await.unwrap();
    wait_for("a near-cache hit", DEADLINE, || {
        let near = near.clone();
        let remote = remote.clone();
        async move {
            near.get(&remote).await.unwrap();
            (near.local_stats().near_cache_hits > 0).then_some(())
        }
    })
    .await;

    let metrics = grid.metrics();
    assert_eq!(metrics.members, 3);
    assert_eq!(metrics.partition_count, grid.config().partition_count);
    assert!(metrics.partitions_owned > 0 && metrics.partitions_backed_up > 0);
    let owned_everywhere: u32 = cluster.live().map(|g| g.metrics().partitions_owned).sum();
    assert_eq!(owned_everywhere, metrics.partition_count);
    assert!(
        // One operation in 16 is timed, counted per thread: about 19 of 302 reads.
        metrics.read_latency.count >= 10,
        "{:?}",
        metrics.read_latency
    );
    assert!(metrics.write_latency.count >= 6);
    let (p50, p99) = (
        metrics.read_latency.p50.unwrap(),
        metrics.read_latency.p99.unwrap(),
    );
    assert!(p50 <= p99, "p50 {p50:?} p99 {p99:?}");
    let stats = |name: &str| {
        metrics
            .maps
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, s)| *s)
            .unwrap_or_else(|| panic!("map {name} in {:?}", metrics.maps))
    };
    assert!(!metrics.maps.iter().any(|(n, _)| n.starts_with('\0')));
    // Entries and hits are counted by each key's primary: summed over the members, exact.
    let m: Vec<_> = cluster
        .live()
        .map(|g| {
            let mm = g.metrics();
            mm.maps
                .iter()
                .find(|(n, _)| n == "m")
                .map(|(_, s)| *s)
                .unwrap_or_default()
        })
        .collect();
    assert_eq!(m.iter().map(|s| s.owned_entries).sum::<u64>(), 200);
    assert_eq!(m.iter().map(|s| s.hits).sum::<u64>(), 200);
    assert_eq!(m.iter().map(|s| s.misses).sum::<u64>(), 100);
    assert_eq!(stats("m").owned_entries, m[0].owned_entries);
    let near_stats = stats("near");
    assert!(near_stats.near_cache_hits > 0 && near_stats.near_cache_misses > 0);
    assert_eq!(near_stats.near_cache_entries, 1);

    // The same figures as Prometheus text.
    let addr = grid.metrics_addr().expect("listener bound");
    let (status, body) = get(addr, "/metrics").await;
    assert_eq!(status, 200, "{body}");
    let scrape = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string())))
        .expect("Prometheus text format");
    let value = |name: &str, label: Option<(&str, &str)>| -> f64 {
        scrape
            .samples
            .iter()
            .find(|s| s.metric == name && label.is_none_or(|(k, v)| s.labels.get(k) == Some(v)))
            .map(|s| match s.value {
                prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => f64::NAN,
            })
            .unwrap_or_else(|| panic!("{name} {label:?} in the scrape"))
    };
    assert_eq!(value("peergrid_members", None), 3.0);
    assert_eq!(
        value("peergrid_map_entries", Some(("map", "m"))),
        m[0].owned_entries as f64
    );
    assert_eq!(
        value("peergrid_partitions_owned", None),
        f64::from(metrics.partitions_owned)
    );
    value(
        "peergrid_datagrams_dropped",
        Some(("reason", "unauthenticated")),
    );
    let histogram = scrape
        .samples
        .iter()
        .find(|s| s.metric == "peergrid_map_read_seconds")
        .expect("read latency histogram");
    assert!(matches!(
        histogram.value,
        prometheus_parse::Value::Histogram(_)
    ));
    let (status, _) = get(addr, "/nothing").await;
    assert_eq!(status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_turns_ready_when_the_cluster_is_safe_again_after_a_crash() {
    let mut cluster = Cluster::start_with(0, |_| {}).await;
    for i in 0..3 {
        let mut config = cluster.config();
        if i == 0 {
            config.metrics_bind = Some("127.0.0.1:0".parse().unwrap());
        }
        cluster.add_with(config).await;
    }
    cluster.wait_converged().await;
    let addr = cluster.grid(0).metrics_addr().unwrap();
    let map = cluster.grid(0).map::<String, u64>("m");
    for i in 0..100 {
        map.put(&format!("k{i}"), &i).await.unwrap();
    }
    wait_for("/health to be ready", DEADLINE, || async {
        (get(addr, "/health").await.0 == 200).then_some(())
    })
    .await;
    // A crash leaves partitions without a backup until they are copied again: not ready.
    cluster.crash(2);
    wait_for("/health to report the unsafe cluster", DEADLINE, || async {
        let (status, body) = get(addr, "/health").await;
        (status == 503 && body.contains("not ready")).then_some(())
    })
    .await;
    wait_for("/health to be ready again", DEADLINE, || async {
        (get(addr, "/health").await.0 == 200).then_some(())
    })
    .await;
    assert!(cluster.grid(0).is_ready().await);
    assert_eq!(cluster.grid(0).metrics().members, 2);
}
